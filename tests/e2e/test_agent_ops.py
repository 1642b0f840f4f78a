"""tunnel-agent made operable: status tells the truth about the local API
(local_unreachable while it is down, cleared when it answers again; probes
counted apart from requests), status --watch with and without a terminal,
`http PORT` publishing a port at once, the domain-mismatch message and
run --domain, `enable` retrying an agent in error, and `verify` against the
independent EIP-191 vectors."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers_daemon import agent_state, curl, wait_state
from local_api import LocalApi
from tunnel_env import REPO, SANITIZED, Agent, Gateway, Proc, wait_for

SCALE = 3 if SANITIZED else 1


@pytest.fixture
def procs():
    live = []
    yield live
    for p in reversed(live):
        try:
            p.stop(signal.SIGTERM)
        except Exception:
            pass
    bad = [p.log_path.name for p in live if re.search(r"Sanitizer|runtime error", p.text())]
    assert not bad, bad


@pytest.fixture
def api():
    a = LocalApi()
    yield a
    a.stop()


def start(build_dir, tmp_path, api, procs, *gw_extra):
    gw = Gateway(build_dir, tmp_path, *gw_extra)
    procs.append(gw)
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a", api.url)
    procs.append(ag.run(gw))
    wait_state(ag, "a", "connected", 20 * SCALE)
    return gw, ag, addr


# ---- status ---------------------------------------------------------------------


API_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from local_api import Handler, Server, State
srv = Server(("127.0.0.1", int(sys.argv[2])), Handler)
srv.daemon_threads = True
srv.state = State()
print("port", srv.server_address[1], flush=True)
srv.serve_forever()
"""


class ApiProcess(Proc):
    """The local API in its own process, so that stopping it also closes the
    keep-alive connections the agent pools."""

    def __init__(self, tmp, port=0):
        super().__init__(["/usr/bin/python3", "-c", API_SCRIPT, REPO / "tests" / "e2e", port],
                         Path(tmp) / f"api-{port}-{time.monotonic_ns()}.log")
        self.port = int(self.wait_log(r"port (\d+)").group(1))
        self.url = f"http://127.0.0.1:{self.port}"


def test_status_local_unreachable_then_cleared_and_probes_not_requests(build_dir, tmp_path, procs):
    lapi = ApiProcess(tmp_path)
    procs.append(lapi)
    gw, ag, addr = start(build_dir, tmp_path, lapi, procs)
    a = agent_state(ag, "a")
    # the probe that made it connected went through the tunnel, not counted
    assert a["probes"] >= 1 and a["requests"] == 0, a
    assert a["local_result"] == "none" and a["error"] is None, a
    assert a["last_probe_ms"] > 0

    st, body = curl(gw, addr, "/echo")
    assert st == 200, body
    a = agent_state(ag, "a")
    assert a["requests"] == 1 and a["local_result"] == "ok" and a["bytes_out"] >= len(body), a
    assert abs(a["local_result_ms"] / 1000 - time.time()) < 60

    # the local API stops: the next request says so in status
    lapi.stop(signal.SIGKILL)
    st, body = curl(gw, addr, "/echo")
    assert st == 502 and b"local_unreachable" in body, (st, body)
    a = agent_state(ag, "a")
    assert a["state"] == "connected", a  # the tunnel still works
    assert a["local_result"] == "refused", a
    assert a["error"].startswith("local_unreachable"), a
    assert a["local_error"] == a["error"]
    assert a["requests"] == 2
    text = ag.cli("status").stdout
    assert "local_unreachable" in text and "refused" in text, text

    # it comes back on the same port: the next request clears the error
    back = ApiProcess(tmp_path, lapi.port)
    procs.append(back)
    st, body = curl(gw, addr, "/echo")
    assert st == 200, body
    a = agent_state(ag, "a")
    assert a["error"] is None and a["local_error"] is None and a["local_result"] == "ok", a
    assert a["requests"] == 3
    assert a["probes"] >= 1


def test_status_watch_without_terminal_prints_lines(build_dir, tmp_path, api, procs):
    gw, ag, addr = start(build_dir, tmp_path, api, procs)
    p = subprocess.Popen([str(ag.exe), "--home", str(ag.home), "status", "--watch"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        os.set_blocking(p.stdout.fileno(), False)
        got = []

        def seen():
            try:
                chunk = os.read(p.stdout.fileno(), 65536)
            except BlockingIOError:
                chunk = b""
            got.append(chunk.decode())
            return "agent=a state=connected" in "".join(got)
        wait_for(seen, 10 * SCALE, "a watch line for agent a")
        text = "".join(got)
        assert "daemon running" in text, text
        assert f"url=https://{addr}.localhost:{gw.port}" in text, text
        # no change: no new agent line within two refreshes
        n = text.count("agent=a ")
        assert n == 1, text
        p.send_signal(signal.SIGINT)
        assert p.wait(5 * SCALE) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_status_watch_on_a_terminal(build_dir, tmp_path, api, procs):
    gw, ag, addr = start(build_dir, tmp_path, api, procs)
    sock = f"tg-watch-{os.getpid()}"
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    cmd = f"{ag.exe} --home {ag.home} status --watch; echo watch-exit=$?; sleep 30"
    subprocess.run([*tmux, "new-session", "-d", "-s", "w", "-x", "160", "-y", "40", cmd],
                   check=True, timeout=10)
    try:
        def screen():
            r = subprocess.run([*tmux, "capture-pane", "-p", "-t", "w"], capture_output=True,
                               text=True, timeout=10)
            return r.stdout
        wait_for(lambda: re.search(r"^a\s+connected\s", screen(), re.M), 10 * SCALE,
                 "agent a connected on the watch screen")
        s = screen()
        assert "tunnel-agent status --watch" in s and "REQ/S" in s, s
        assert f"https://{addr}.localhost:{gw.port}" in s, s
        subprocess.run([*tmux, "send-keys", "-t", "w", "q"], check=True, timeout=10)
        wait_for(lambda: "watch-exit=0" in screen(), 5 * SCALE, "watch exits on q")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)


# ---- http -----------------------------------------------------------------------


def test_http_bare_port_prints_a_url_that_answers(build_dir, tmp_path, api, procs):
    gw = Gateway(build_dir, tmp_path)
    procs.append(gw)
    ag = Agent(build_dir, tmp_path)
    gw_url = f"wss://localhost:{gw.port}"
    # without a terminal and without --yes: refused, exit 2
    r = ag.cli("http", str(api.port), "--gateway", gw_url, "--ca-file", gw.ca, check=False)
    assert r.returncode == 2 and "--yes" in r.stderr, r
    r = ag.cli("http", "ftp://x:1", check=False)
    assert r.returncode == 2 and "want a port" in r.stderr, r

    proc = Proc([ag.exe, "--home", ag.home, "http", str(api.port), "--gateway", gw_url,
                 "--ca-file", gw.ca, "--yes"], tmp_path / "agent-http.log")
    procs.append(proc)
    m = proc.wait_log(r"Forwarding (https://(0x[0-9a-f]{40})\.localhost:\d+) -> "
                      r"http://127\.0\.0\.1:(\d+)", 20 * SCALE)
    url, addr = m.group(1), m.group(2)
    assert int(m.group(3)) == api.port
    r = subprocess.run(["curl", "-sS", "--cacert", str(gw.ca), f"{url}/echo"],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["headers"]["x-agent-address"] == [addr]
    st = ag.status()
    assert [a["name"] for a in st["agents"]] == [f"http-{api.port}"]
    assert st["agents"][0]["target"] == f"http://127.0.0.1:{api.port}"

    # HOST:PORT names the same target: the agent is reused, the running
    # daemon keeps publishing it
    r = ag.cli("http", f"127.0.0.1:{api.port}", "--yes")
    assert "already runs" in r.stdout and addr in ag.cli("list").stdout, r
    assert len(ag.status()["agents"]) == 1
    # localhost:PORT is another target: a second agent
    r = ag.cli("http", f"localhost:{api.port}", "--yes")
    names = {a["name"]: a["target"] for a in ag.status()["agents"]}
    assert names.get(f"http-{api.port}-2") == f"http://localhost:{api.port}", names


# ---- errors that name the cause -----------------------------------------------------


def test_domain_mismatch_names_both_domains_and_run_domain_fixes_it(build_dir, tmp_path, api,
                                                                    procs):
    gw = Gateway(build_dir, tmp_path, "--no-tls", domain="example.test")
    procs.append(gw)
    ag = Agent(build_dir, tmp_path)
    ag.new("a", api.url)
    gw_url = f"ws://127.0.0.1:{gw.port}"
    p = Proc([ag.exe, "--home", ag.home, "run", "--gateway", gw_url], tmp_path / "agent-ip.log")
    procs.append(p)
    a = wait_state(ag, "a", "error", 20 * SCALE)
    assert "signature_verification_failed" in a["error"], a
    assert 'expects signatures for domain "example.test"' in a["error"], a
    assert 'signed for "127.0.0.1"' in a["error"], a
    assert "--domain example.test" in a["error"], a
    p.stop()

    p = Proc([ag.exe, "--home", ag.home, "run", "--gateway", gw_url, "--domain", "example.test"],
             tmp_path / "agent-domain.log")
    procs.append(p)
    a = wait_state(ag, "a", "connected", 20 * SCALE)
    assert a["url"].startswith(f"http://{a['address']}.example.test:"), a
    r = ag.cli("run", "--domain", "bad_domain!", check=False)
    assert r.returncode == 2 and "--domain" in r.stderr, r
    assert "--domain DOMAIN" in ag.cli("run", "--help").stdout


def test_enable_retries_an_agent_in_error(build_dir, tmp_path, api, procs):
    allow = tmp_path / "allow.txt"
    allow.write_text("# nobody yet\n")
    gw = Gateway(build_dir, tmp_path, "--allow", allow)
    procs.append(gw)
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a", api.url)
    procs.append(ag.run(gw))
    a = wait_state(ag, "a", "error", 20 * SCALE)
    assert "address_not_allowed" in a["error"], a
    allow.write_text(addr + "\n")
    gw.mark()
    gw.p.send_signal(signal.SIGHUP)
    gw.wait_log(r"event=reloaded what=allow addresses=1")
    # still in error: a refused agent is not retried in a loop
    assert agent_state(ag, "a")["state"] == "error"
    r = ag.cli("enable", "a", "--yes")
    assert "retries it now" in r.stdout, r.stdout
    wait_state(ag, "a", "connected", 20 * SCALE)
    st, _ = curl(gw, addr, "/echo")
    assert st == 200
    # connected and enabled: enable says so and does nothing
    assert "already enabled" in ag.cli("enable", "a", "--yes").stdout


# ---- verify -------------------------------------------------------------------------

N_HALF = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def vectors():
    d = json.loads((REPO / "tests" / "vectors" / "eip191.json").read_text())
    # passed as argv: no NUL, and the text is the bytes
    return [v for v in d["vectors"] if "00" not in [v["message_hex"][i:i + 2]
            for i in range(0, len(v["message_hex"]), 2)]
            and v["message"].encode() == bytes.fromhex(v["message_hex"])]


def test_verify_good_bad_and_high_s(build_dir, tmp_path):
    ag = Agent(build_dir, tmp_path)
    vs = vectors()
    assert len(vs) >= 3
    for v in vs:
        msg = v["message"]
        args = ["verify", "--", v["address"], msg, v["signature"]] if msg.startswith("-") else \
            ["verify", v["address"], msg, v["signature"]]
        r = ag.cli(*args, check=False)
        assert r.returncode == 0 and r.stdout.startswith("valid"), (v["name"], r)
        r = ag.cli("verify", v["address_checksum"], msg, v["signature"], check=False) \
            if not msg.startswith("-") else r
        assert r.returncode == 0, (v["name"], r)
    v = vs[1]
    # bad: another message, another address
    r = ag.cli("verify", v["address"], v["message"] + "x", v["signature"], check=False)
    assert r.returncode == 1 and r.stdout.startswith("invalid"), r
    other = "0x" + ("%040x" % (int(v["address"], 16) ^ 1))
    r = ag.cli("verify", other, v["message"], v["signature"], check=False)
    assert r.returncode == 1 and "recover " + v["address"] in r.stdout, r
    # high s: the same signature with s' = n - s (and v flipped) recovers the
    # same key in plain ECDSA but is refused, as the gateway refuses it
    sig = bytes.fromhex(v["signature"][2:])
    s = int.from_bytes(sig[32:64], "big")
    assert s <= N_HALF
    hs = sig[:32] + (N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    r = ag.cli("verify", v["address"], v["message"], "0x" + hs.hex(), check=False)
    assert r.returncode == 1 and "s is high" in r.stdout, r
    # usage: malformed address or signature, missing argument
    r = ag.cli("verify", "0x1234", "m", v["signature"], check=False)
    assert r.returncode == 2 and "ADDRESS" in r.stderr, r
    r = ag.cli("verify", v["address"], "m", "0xzz", check=False)
    assert r.returncode == 2 and "SIGNATURE" in r.stderr, r
    r = ag.cli("verify", v["address"], "m", check=False)
    assert r.returncode == 2, r
    assert "verify ADDRESS MESSAGE SIGNATURE" in ag.cli("--help").stdout
