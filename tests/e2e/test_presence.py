"""GET /presence (--presence-token-file), as the Osaurus relay answers it:
which of up to 100 agents are online, for a bearer token; and the relay's
internal headers never reaching a local API from a public client."""

import json
import os
import re
import subprocess
import time

import pytest

from local_api import LocalApi
from tunnel_env import Agent, Gateway

TOKEN = "presence-secret-0123456789abcdef-xyz"  # 36 characters
UNKNOWN = "0x" + "ab" * 20


def token_file(tmp, text=TOKEN, mode=0o600):
    p = tmp / f"presence-token-{mode:o}-{len(text)}"
    p.write_text(text + "\n")
    os.chmod(p, mode)
    return p


class Env:
    pass


@pytest.fixture(scope="module")
def env(build_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("presence")
    e = Env()
    e.api = LocalApi()
    e.gw = Gateway(build_dir, tmp, "--presence-token-file", token_file(tmp),
                   "--presence-per-ip-per-min", "0")
    e.agent = Agent(build_dir, tmp)
    e.addr = e.agent.new("api", e.api.url)
    e.agent.run(e.gw)
    e.agent.wait_connected(timeout=30)
    e.tmp = tmp
    yield e
    e.agent.stop()
    e.gw.stop()
    e.api.stop()


def get(gw, path, *args, token=TOKEN, host="localhost", method=None):
    cmd = ["curl", "-sS", "--cacert", str(gw.ca), "-w", "\n%{http_code}",
           "--connect-to", "::127.0.0.1:"]
    if token is not None:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    if method:
        cmd += ["-X", method]
    r = subprocess.run(cmd + list(args) + [f"https://{host}:{gw.port}{path}"],
                       capture_output=True, timeout=30)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), body


def test_online_and_offline(env):
    e = env
    t0 = int(time.time() * 1000)
    # any case, spaces, an encoded comma, a repeat: each address once, lowercase
    mixed = e.addr.upper().replace("0X", "0x")
    st, body = get(e.gw, f"/presence?addresses={mixed},%20{UNKNOWN}%2C{e.addr}")
    assert st == 200, body
    p = json.loads(body)["presence"]
    assert set(p) == {e.addr, UNKNOWN}
    assert p[e.addr]["online"] is True
    assert t0 - 2000 <= p[e.addr]["last_seen"] <= int(time.time() * 1000) + 2000
    assert p[UNKNOWN] == {"online": False, "last_seen": None}
    assert get(e.gw, f"/presence?addresses={e.addr}", method="HEAD", *["-I"])[0] == 200


def test_auth_and_method(env):
    e = env
    for tok in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        st, body = get(e.gw, f"/presence?addresses={e.addr}", token=tok)
        assert st == 401 and json.loads(body)["error"] == "unauthorized", (tok, body)
    assert get(e.gw, f"/presence?addresses={e.addr}", method="POST")[0] == 405
    # on an agent host, /presence is the agent's own path
    st, body = get(e.gw, "/presence?addresses=x", host=f"{e.addr}.localhost")
    assert st == 404 and b"nope" in body
    assert re.search(r"event=presence_unauthorized", e.gw.text())


COUNT = "addresses must contain 1-100 entries"
FORM = "addresses: each must be 0x and 40 hex digits"
ENC = "addresses: too long or badly encoded"
HUNDRED_ONE = ",".join("0x%040x" % i for i in range(101))


@pytest.mark.parametrize("q,msg", [
    ("", COUNT), ("?addresses=", COUNT), ("?addresses=,,%20,", COUNT), ("?other=1", COUNT),
    ("?addresses=not-an-address", FORM), ("?addresses=0x" + "g" * 40, FORM),
    ("?addresses=0x" + "a" * 39, FORM),
    ("?addresses=" + HUNDRED_ONE, COUNT),
    ("?addresses=" + "x" * 5000, ENC), ("?addresses=%zz", ENC),
    # an encoded NUL or control character must not end the list early
    ("?addresses=" + UNKNOWN + "%00not-an-address", ENC),
    ("?addresses=" + UNKNOWN + "%0a,0xzz", ENC),
    ("?addresses=" + UNKNOWN + "%00," + HUNDRED_ONE, ENC),
])
def test_bad_lists(env, q, msg):
    st, body = get(env.gw, "/presence" + q)
    assert st == 400, (q[:80], body)
    assert json.loads(body) == {"error": "bad_request", "message": msg}, (q[:80], body)


def test_one_hundred_distinct_and_duplicates(env):
    many = ["0x%040x" % i for i in range(100)]
    st, body = get(env.gw, "/presence?addresses=" + ",".join(many + many[:10]))
    assert st == 200
    assert len(json.loads(body)["presence"]) == 100


def test_without_token_file_404(build_dir, tmp_path):
    gw = Gateway(build_dir, tmp_path)
    try:
        st, body = get(gw, "/presence?addresses=" + UNKNOWN)
        assert st == 404 and json.loads(body)["error"] == "not_found"
    finally:
        gw.stop()


def test_rate_limit_per_ip(build_dir, tmp_path):
    gw = Gateway(build_dir, tmp_path, "--presence-token-file", token_file(tmp_path),
                 "--presence-per-ip-per-min", "3")
    try:
        codes = [get(gw, "/presence?addresses=" + UNKNOWN)[0] for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        # a refused call is not a token guess: 401 stays 401
        assert get(gw, "/presence?addresses=" + UNKNOWN, token="bad")[0] == 401
    finally:
        gw.stop()


@pytest.mark.parametrize("text,mode,why", [
    ("short-token", 0o600, r"the token has 11 characters; it needs 32"),
    (TOKEN, 0o644, r"must be owned by this user and not accessible to group or others"),
    ("has a space " + TOKEN, 0o600, r"one line of printable characters"),
])
def test_bad_token_files_refused_at_start(build_dir, tmp_path, text, mode, why):
    r = subprocess.run([str(build_dir / "gateway/tunnel-gateway"), "--check-config",
                        "--state-dir", str(tmp_path / "st"),
                        "--presence-token-file", str(token_file(tmp_path, text, mode))],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--presence-token-file" in r.stdout + r.stderr
    assert re.search(why, r.stdout + r.stderr), r.stdout + r.stderr


def test_relay_internal_headers_never_reach_the_local_api(env):
    e = env
    for http in ("--http1.1", "--http2"):
        st, body = get(e.gw, "/echo/h", http, "-H", "X-Relay-Internal-Hop: 1",
                       "-H", "X-Relay-Client-IP: 6.6.6.6", "-H", "X-Keep: yes",
                       token=None, host=f"{e.addr}.localhost")
        assert st == 200, body
        h = json.loads(body)["headers"]
        assert "x-relay-internal-hop" not in h and "x-relay-client-ip" not in h, h
        assert h["x-keep"] == ["yes"] and h["x-forwarded-for"] == ["127.0.0.1"]
