"""The agent's local inspector (issue 15, docs/INSPECTOR.md): `tunnel-agent run
--inspect` captures what the tunnel forwards, serves a page and a JSON API on
loopback and replays captured requests to the local API.

Real processes: tunnel-gateway, tunnel-agent and the test's local API; the
page is driven in Debian's headless Chromium over the DevTools protocol
(python3-websockets), never a downloaded browser. The inspector binds port 0
and its port is read back from the agent's inspector_listening line."""

import asyncio
import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import websockets

from local_api import LocalApi
from tunnel_env import SANITIZED, TIME_SCALE, Agent, Gateway, Proc, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def api():
    a = LocalApi()
    a.server.socket.listen(512)
    yield a
    a.stop()


@pytest.fixture
def procs():
    """Processes stopped at the end (SIGTERM, so sanitizer builds run their
    leak check); no sanitizer report may then appear in an agent's log."""
    live = []
    yield live
    for p in reversed(live):
        try:
            p.stop(signal.SIGTERM)
        except Exception:
            pass
    bad = [p.log_path.name for p in live if p.log_path.name.startswith("agent")
           and re.search(r"Sanitizer|runtime error", p.text())]
    assert not bad, bad


class Env:
    """A gateway, one agent (name "hook") on the local API, the daemon with
    --inspect 127.0.0.1:0 (plus extra) and the inspector's port."""

    def __init__(self, build_dir, tmp, api, procs, *extra, inspect="127.0.0.1:0"):
        self.gw = Gateway(build_dir, tmp)
        procs.append(self.gw)
        self.ag = Agent(build_dir, tmp)
        self.addr = self.ag.new("hook", api.url)
        self.proc = self.ag.run(self.gw, "--inspect", inspect, *extra)
        procs.append(self.proc)
        m = self.proc.wait_log(r"event=inspector_listening addr=\S+ port=(\d+)")
        self.port = int(m.group(1))
        self.ag.wait_connected("hook")
        self.api = api

    # ---- through the tunnel ----
    def curl(self, path, *args, timeout=60):
        url = f"https://{self.addr}.localhost:{self.gw.port}{path}"
        r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(self.gw.ca), "-o", "-",
                            "-w", "\n%{http_code}", *args, url], capture_output=True,
                           timeout=timeout * TIME_SCALE)
        body, _, code = r.stdout.rpartition(b"\n")
        return int(code or b"0"), body

    # ---- the inspector ----
    def req(self, method, path, body=None, headers=None, host="127.0.0.1"):
        c = http.client.HTTPConnection(host, self.port, timeout=30 * TIME_SCALE)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
            return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data
        finally:
            c.close()

    def get(self, path, **kw):
        st, h, data = self.req("GET", path, **kw)
        assert st == 200, (path, st, data)
        return json.loads(data)

    def entries(self):
        return self.get("/api/requests")["entries"]

    def entry(self, eid, reveal=False):
        return self.get(f"/api/requests/{eid}" + ("?reveal=1" if reveal else ""))

    def wait_entry(self, pred, what, timeout=10):
        def find():
            for e in self.entries():
                if pred(e):
                    return e
            return None
        return wait_for(find, timeout, what)

    def replay(self, eid, edits=None):
        st, _, data = self.req("POST", f"/api/requests/{eid}/replay",
                               body=json.dumps(edits or {}),
                               headers={"Content-Type": "application/json"})
        return st, json.loads(data)

    def wait_done(self, eid, timeout=10):
        return wait_for(lambda: (lambda d: d if not d["active"] else None)(self.entry(eid)),
                        timeout, f"entry {eid} done")


def hdr(d, name, side="request"):
    return [h["value"] for h in d[side]["headers"] if h["name"] == name]


def body_bytes(d, side="request"):
    return base64.b64decode(d[side]["body"]["b64"])


# ---- API ------------------------------------------------------------------------------------


def test_webhook_captured_with_headers_body_and_masking(build_dir, tmp_path, api, procs):
    env = Env(build_dir, tmp_path, api, procs)
    payload = json.dumps({"type": "charge.succeeded", "data": {"amount": 4200}}).encode()
    st, echo = env.curl("/echo/hook?src=stripe", "-X", "POST", "--data-binary", payload,
                        "-H", "Content-Type: application/json", "-H", "Stripe-Signature: t=1,v1=ab",
                        "-H", "Authorization: Bearer sekrit-token", "-H", "Cookie: sid=chocolate")
    assert st == 200
    e = env.wait_entry(lambda e: e["path"] == "/echo/hook?src=stripe" and not e["active"],
                       "the webhook entry")
    assert e["method"] == "POST" and e["status"] == 200 and e["agent"] == "hook"
    assert e["address"] == env.addr and e["error"] is None and e["replay_of"] is None
    assert e["req_bytes"] == len(payload) and e["resp_bytes"] == len(echo)
    assert e["client"] == "127.0.0.1" and e["total_ms"] >= e["head_ms"] >= 0
    assert re.fullmatch(r"[0-9a-f]{32}", e["request_id"]), e["request_id"]  # the gateway's
    assert json.loads(echo)["headers"]["x-request-id"] == [e["request_id"]]
    d = env.entry(e["id"])
    assert body_bytes(d) == payload and body_bytes(d, "response") == echo
    assert hdr(d, "stripe-signature") == ["t=1,v1=ab"]
    assert hdr(d, "content-type") == ["application/json"]
    # secrets are masked unless asked for
    assert hdr(d, "authorization") == ["********"] and hdr(d, "cookie") == ["********"]
    assert "sekrit" not in json.dumps(d) and "chocolate" not in json.dumps(d)
    r = env.entry(e["id"], reveal=True)
    assert hdr(r, "authorization") == ["Bearer sekrit-token"]
    assert hdr(r, "cookie") == ["sid=chocolate"]
    # Set-Cookie in a response too
    st, _ = env.curl("/cookies")
    assert st == 200
    c = env.wait_entry(lambda e: e["path"] == "/cookies" and not e["active"], "cookies entry")
    d = env.entry(c["id"])
    assert hdr(d, "set-cookie", "response") == ["********", "********"]
    assert hdr(env.entry(c["id"], reveal=True), "set-cookie", "response") == ["a=1; Path=/",
                                                                             "b=2; Path=/"]
    stats = env.get("/api/stats")
    assert stats["entries"] == 2 and stats["max_entries"] == 200
    assert stats["body_bytes"] == 1 << 20
    assert 0 < stats["memory_bytes"] <= stats["memory_limit_bytes"]


def test_ring_keeps_the_last_n(build_dir, tmp_path, api, procs):
    n = 10
    env = Env(build_dir, tmp_path, api, procs, "--inspect-max", str(n))
    for i in range(n + 50):
        st, _ = env.curl(f"/status/204?i={i}")
        assert st == 204
    es = wait_for(lambda: (lambda es: es if len(es) == n and not any(e["active"] for e in es)
                           and es[-1]["path"] == f"/status/204?i={n + 49}" else None)(
        env.entries()), 10, "the ring settled")
    assert [e["path"] for e in es] == [f"/status/204?i={i}" for i in range(50, n + 50)]
    assert env.get("/api/stats")["entries"] == n
    # the evicted ones are gone, clear empties it
    assert env.req("GET", f"/api/requests/{es[0]['id'] - 1}")[0] == 404
    st, _, data = env.req("DELETE", "/api/requests")
    assert st == 200 and json.loads(data)["entries"] == 0
    assert env.entries() == []


def test_body_truncation_is_marked(build_dir, tmp_path, api, procs):
    env = Env(build_dir, tmp_path, api, procs, "--inspect-body-bytes", "1000")
    up = os.urandom(5000)
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(env.gw.ca), "--data-binary",
                        "@-", "-H", "Content-Type: application/octet-stream",
                        f"https://{env.addr}.localhost:{env.gw.port}/upload?id=t"],
                       input=up, capture_output=True, timeout=60 * TIME_SCALE)
    assert json.loads(r.stdout) == {"len": 5000, "sha256": hashlib.sha256(up).hexdigest()}
    st, got = env.curl("/bytes?n=3000&seed=9")
    assert st == 200 and len(got) == 3000
    up_e = env.wait_entry(lambda e: e["path"] == "/upload?id=t" and not e["active"], "upload")
    by_e = env.wait_entry(lambda e: e["path"].startswith("/bytes") and not e["active"], "bytes")
    d = env.entry(up_e["id"])
    b = d["request"]["body"]
    assert b["truncated"] and b["len"] == 1000 and b["total"] == 5000
    assert body_bytes(d) == up[:1000]
    d = env.entry(by_e["id"])
    b = d["response"]["body"]
    assert b["truncated"] and b["len"] == 1000 and b["total"] == 3000
    assert body_bytes(d, "response") == got[:1000]
    # a truncated body cannot be replayed as it was, only with a new one
    st, j = env.replay(up_e["id"])
    assert st == 409 and j["error"] == "body_truncated"
    st, j = env.replay(up_e["id"], {"body_b64": base64.b64encode(b"short").decode()})
    assert st == 202
    rd = env.wait_done(j["id"])
    assert json.loads(body_bytes(rd, "response")) == {
        "len": 5, "sha256": hashlib.sha256(b"short").hexdigest()}


def test_sse_recorded_while_the_client_receives_it(build_dir, tmp_path, api, procs):
    env = Env(build_dir, tmp_path, api, procs)
    url = f"https://{env.addr}.localhost:{env.gw.port}/sse?n=4&interval_ms=400"
    p = subprocess.Popen(["curl", "-sSN", "--http1.1", "--cacert", str(env.gw.ca), url],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        seen = b""
        for i in range(4):
            # the client gets event i ...
            while f"id: {i}\n".encode() not in seen:
                chunk = p.stdout.read1(4096)
                assert chunk, f"stream ended before event {i}"
                seen += chunk
            if i == 3:
                break
            # ... and while the stream is still open, the inspector has it too
            e = env.wait_entry(lambda e: e["path"].startswith("/sse"), "the sse entry")
            d = wait_for(lambda: (lambda d: d if f"id: {i}\n".encode() in body_bytes(d, "response")
                                  else None)(env.entry(e["id"])), 5, f"event {i} captured")
            assert d["active"] and d["status"] == 200
            assert hdr(d, "content-type", "response") == ["text/event-stream"]
            assert f"id: {i + 1}\n".encode() not in seen  # the client has not got the next yet
        assert p.wait(30 * TIME_SCALE) == 0
        seen += p.stdout.read()
    finally:
        p.kill()
        p.wait()
    e = env.wait_entry(lambda e: e["path"].startswith("/sse") and not e["active"], "sse done")
    d = env.entry(e["id"])
    assert body_bytes(d, "response") == seen and seen.count(b"data: ") == 4


def test_binary_body_hex_and_byte_identical_replay(build_dir, tmp_path, api, procs):
    env = Env(build_dir, tmp_path, api, procs)
    blob = bytes(range(256)) * 8 + b"\x00\xff\xfe"
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(env.gw.ca), "--data-binary",
                        "@-", "-H", "Content-Type: application/octet-stream", "-H", "X-Sig: 1",
                        f"https://{env.addr}.localhost:{env.gw.port}/echo/bin"],
                       input=blob, capture_output=True, timeout=60 * TIME_SCALE)
    orig = json.loads(r.stdout)
    assert orig["sha256"] == hashlib.sha256(blob).hexdigest()
    e = env.wait_entry(lambda e: e["path"] == "/echo/bin" and not e["active"], "binary entry")
    d = env.entry(e["id"])
    assert body_bytes(d) == blob
    st, j = env.replay(e["id"])
    assert st == 202 and j["id"] > e["id"]
    rd = env.wait_done(j["id"])
    assert rd["replay_of"] == e["id"] and rd["status"] == 200 and rd["error"] is None
    again = json.loads(body_bytes(rd, "response"))
    # what the local API saw: the same method, target, headers and body
    assert again == orig
    assert body_bytes(rd) == blob
    # the list marks it
    assert [x for x in env.entries() if x["id"] == j["id"]][0]["replay_of"] == e["id"]


def test_edited_replay_sends_the_edit(build_dir, tmp_path, api, procs):
    env = Env(build_dir, tmp_path, api, procs)
    st, _ = env.curl("/echo/a", "-X", "POST", "--data-binary", '{"a":1}',
                     "-H", "Content-Type: application/json")
    assert st == 200
    e = env.wait_entry(lambda e: e["path"] == "/echo/a" and not e["active"], "entry")
    body = b'{"a":2,"edited":true}'
    st, j = env.replay(e["id"], {"method": "PUT", "path": "/echo/b?x=1",
                                 "headers": [{"name": "Content-Type", "value": "application/json"},
                                             {"name": "X-Edited", "value": "yes"},
                                             {"name": "Content-Length", "value": "1"}],
                                 "body_b64": base64.b64encode(body).decode()})
    assert st == 202
    rd = env.wait_done(j["id"])
    seen = json.loads(body_bytes(rd, "response"))
    assert seen["method"] == "PUT" and seen["path"] == "/echo/b?x=1"
    assert seen["headers"]["x-edited"] == ["yes"]
    assert seen["headers"]["content-length"] == [str(len(body))]
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    # refused edits
    for bad in ({"method": "GE T"}, {"path": "no-slash"}, {"path": "/a b"},
                {"headers": [{"name": "x", "value": "a\r\nb"}]}, {"body_b64": "!!"}):
        st, j = env.replay(e["id"], bad)
        assert st == 400 and j["error"] == "bad_request", bad
    assert env.replay(99999)[0] == 404


def test_memory_bound_under_1000_requests_of_1_mib(build_dir, tmp_path, api, procs):
    if SANITIZED:
        pytest.skip("release build only (the bound is on the release allocator's RSS)")
    n = 20
    env = Env(build_dir, tmp_path, api, procs, "--inspect-max", str(n))
    blob = os.urandom(1 << 20)
    digest = hashlib.sha256(blob).hexdigest()
    ctx = env.gw.ssl_context()
    c = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=60)
    host = f"{env.addr}.localhost"
    raw = socket.create_connection(("127.0.0.1", env.gw.port))
    c.sock = ctx.wrap_socket(raw, server_hostname=host)
    peak = 0
    for i in range(1000):
        c.request("POST", f"/upload?id={i}", body=blob, headers={"Host": f"{host}:{env.gw.port}"})
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["sha256"] == digest
        if i % 100 == 99:
            peak = max(peak, env.proc.rss_kib())
    c.close()
    stats = wait_for(lambda: (lambda s: s if s["entries"] == n else None)(
        env.get("/api/stats")), 10, "ring at n")
    # every kept request body is the whole MiB; nothing else is kept
    assert stats["memory_bytes"] <= stats["memory_limit_bytes"]
    assert n << 20 <= stats["memory_bytes"] <= n * ((1 << 20) + (64 << 10))
    es = env.entries()
    assert len(es) == n and es[-1]["path"] == "/upload?id=999"
    # 20 MiB of captures: the daemon stays far below the 1,000 MiB that went through
    peak = max(peak, env.proc.rss_kib())
    assert peak < 160 * 1024, f"agent RSS {peak} KiB"


def test_cross_origin_and_foreign_hosts_refused(build_dir, tmp_path, api, procs):
    env = Env(build_dir, tmp_path, api, procs)
    st, _ = env.curl("/echo/x")
    assert st == 200
    e = env.wait_entry(lambda e: not e["active"], "an entry")
    own = f"127.0.0.1:{env.port}"
    for host in (own, f"localhost:{env.port}"):
        st, h, _ = env.req("GET", "/api/requests", headers={"Host": host})
        assert st == 200 and "access-control-allow-origin" not in h
    # DNS rebinding: another name for 127.0.0.1
    st, _, data = env.req("GET", "/api/requests", headers={"Host": f"evil.example:{env.port}"})
    assert st == 403 and json.loads(data)["error"] == "inspect_bad_host"
    st, _, _ = env.req("GET", "/", headers={"Host": "127.0.0.1"})
    assert st == 403
    # another origin can neither read nor replay
    for method, path, extra in (("GET", "/api/requests", {}),
                                ("GET", "/api/events", {}),
                                ("POST", f"/api/requests/{e['id']}/replay",
                                 {"Content-Type": "application/json"}),
                                ("DELETE", "/api/requests", {}),
                                ("OPTIONS", "/api/requests",
                                 {"Access-Control-Request-Method": "POST"})):
        st, h, data = env.req(method, path, body="{}" if method == "POST" else None,
                              headers={"Origin": "http://evil.example", **extra})
        assert st == 403, (method, path, st)
        assert json.loads(data)["error"] == "inspect_cross_origin"
        assert not any(k.startswith("access-control-") for k in h), h
    st, _, _ = env.req("GET", "/api/requests", headers={"Origin": f"http://{own}"})
    assert st == 200
    st, _, _ = env.req("GET", "/api/requests", headers={"Sec-Fetch-Site": "cross-site"})
    assert st == 403
    st, _, _ = env.req("GET", "/api/requests", headers={"Origin": "null"})
    assert st == 403
    # a replay needs a JSON body type (a cross-site form cannot send one unpreflighted)
    st, _, data = env.req("POST", f"/api/requests/{e['id']}/replay", body="{}",
                          headers={"Content-Type": "text/plain"})
    assert st == 415
    n = api.state.requests
    assert env.entries()[-1]["id"] == e["id"]  # nothing was replayed
    assert api.state.requests == n
    st, h, page = env.req("GET", "/")
    assert st == 200 and h["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in h["content-security-policy"]
    # self-contained: nothing loaded from elsewhere
    assert b"<script>" in page and b"<script src" not in page and b"<link" not in page
    assert b"https://" not in page.replace(b'"https://" + d.host', b"")


def test_remote_clients_need_the_token(build_dir, tmp_path, api, procs):
    addrs = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    v4 = [a for a in addrs if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", a) and not a.startswith("127.")]
    if not v4:
        pytest.skip("no non-loopback IPv4 address on this machine")
    ag = Agent(build_dir, tmp_path, name="agent-cli")
    ag.new("x", api.url)
    # a non-loopback address without --inspect-allow-remote, or without a token: refused
    r = ag.cli("run", "--gateway", "ws://127.0.0.1:1", "--inspect", "0.0.0.0:0", check=False)
    assert r.returncode == 2 and "--inspect-allow-remote" in r.stderr
    r = ag.cli("run", "--gateway", "ws://127.0.0.1:1", "--inspect", "0.0.0.0:0",
               "--inspect-allow-remote", check=False)
    assert r.returncode == 2 and "--inspect-token-file" in r.stderr
    tok = tmp_path / "token"
    tok.write_text("0123456789abcdef-token\n")
    tok.chmod(0o644)
    r = ag.cli("run", "--gateway", "ws://127.0.0.1:1", "--inspect", "0.0.0.0:0",
               "--inspect-allow-remote", "--inspect-token-file", tok, check=False)
    assert r.returncode == 2 and "chmod 600" in r.stderr
    tok.chmod(0o600)
    env = Env(build_dir, tmp_path, api, procs, "--inspect-allow-remote", "--inspect-token-file",
              tok, inspect="0.0.0.0:0")
    there = v4[0]
    st, h, data = env.req("GET", "/api/requests", host=there)
    assert st == 401 and json.loads(data)["error"] == "inspect_token_required"
    st, _, _ = env.req("GET", "/api/requests", host=there,
                       headers={"Authorization": "Bearer 0123456789abcdef-tokeX"})
    assert st == 401
    st, _, data = env.req("GET", "/api/requests", host=there,
                          headers={"Authorization": "Bearer 0123456789abcdef-token"})
    assert st == 200 and "entries" in json.loads(data)
    # the page hands the token over as a same-site cookie
    st, h, _ = env.req("GET", "/?token=0123456789abcdef-token", host=there)
    assert st == 200 and "HttpOnly" in h["set-cookie"] and "SameSite=Strict" in h["set-cookie"]
    st, _, _ = env.req("GET", "/api/stats", host=there,
                       headers={"Cookie": "a=b; tg_inspect=0123456789abcdef-token"})
    assert st == 200
    # loopback needs no token
    st, _, _ = env.req("GET", "/api/stats")
    assert st == 200


def test_websocket_listed_with_message_counts(build_dir, tmp_path, procs):
    from ws_local_api import WsLocalApi
    wsapi = WsLocalApi()
    try:
        env = Env(build_dir, tmp_path, wsapi, procs)
        host = f"{env.addr}.localhost"
        ctx = env.gw.ssl_context()

        async def talk():
            ws = await websockets.connect(f"wss://{host}:{env.gw.port}/echo?id=i1",
                                          host="127.0.0.1", port=env.gw.port, ssl=ctx,
                                          server_hostname=host, ping_interval=None,
                                          open_timeout=30)
            got = []
            for m in ("one", b"\x00two", "three"):
                await ws.send(m)
                got.append(await ws.recv())
            await ws.close()
            return got
        got = asyncio.run(asyncio.wait_for(talk(), 60 * TIME_SCALE))
        assert got == ["one", b"\x00two", "three"]
        e = env.wait_entry(lambda e: e["websocket"] and not e["active"], "the websocket entry")
        assert e["method"] == "GET" and e["status"] == 101 and e["path"] == "/echo?id=i1"
        # three messages each way (the close frames are not messages)
        assert e["ws_messages_in"] == 3 and e["ws_messages_out"] == 3
        d = env.entry(e["id"])
        assert e["req_bytes"] == d["request"]["body"]["total"] > 3 + 4 + 5
        st, j = env.replay(e["id"])
        assert st == 409 and j["error"] == "not_replayable"
    finally:
        wsapi.stop()


def test_saved_captures_survive_a_restart_and_replay_from_the_cli(build_dir, tmp_path, api,
                                                                  procs):
    save = tmp_path / "captures"
    args = ("--inspect-save", save, "--inspect-max", "3")
    env = Env(build_dir, tmp_path, api, procs, *args)
    assert stat.S_IMODE(save.stat().st_mode) == 0o700
    for i in range(4):
        st, _ = env.curl(f"/echo/s?i={i}", "-X", "POST", "--data-binary", f"body {i}",
                         "-H", "Authorization: Bearer saved-secret")
        assert st == 200
    es = wait_for(lambda: (lambda es: es if [e["path"] for e in es if not e["active"]] ==
                           [f"/echo/s?i={i}" for i in (1, 2, 3)] else None)(env.entries()),
                  10, "three kept")
    ids = [e["id"] for e in es]
    want = sorted(f"{i}.{x}" for i in ids for x in ("json", "req", "resp"))
    # written as each completes; the evicted first one's files are gone
    wait_for(lambda: sorted(p.name for p in save.iterdir()) == want, 10, "saved files")
    for p in save.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    saved = json.loads((save / f"{ids[1]}.json").read_text())
    assert {"name": "authorization", "value": "Bearer saved-secret", "masked": False} in \
        saved["request"]["headers"]
    assert (save / f"{ids[1]}.req").read_bytes() == b"body 2"
    before = env.entry(ids[1], reveal=True)

    env.proc.stop()
    assert not re.search(r"Sanitizer|runtime error", env.proc.text())
    p2 = env.ag.run(env.gw, "--inspect", "127.0.0.1:0", *args)
    procs.append(p2)
    env.proc = p2
    env.port = int(p2.wait_log(r"event=inspector_listening addr=\S+ port=(\d+)").group(1))
    p2.wait_log(r"event=inspect_loaded entries=3 files=3 restored=3")
    assert env.entry(ids[1], reveal=True) == before
    env.ag.wait_connected("hook")

    # tunnel-agent replay ID: through the running daemon, to the local API
    n = api.state.requests
    r = env.ag.cli("replay", ids[1])
    m = re.fullmatch(rf"replayed {ids[1]} as (\d+)\n", r.stdout)
    assert m, r.stdout
    new = int(m.group(1))
    assert new == ids[-1] + 1  # numbering goes on after the saved ones
    rd = env.wait_done(new)
    assert api.state.requests == n + 1
    assert rd["replay_of"] == ids[1]
    assert json.loads(body_bytes(rd, "response")) == json.loads(body_bytes(before, "response"))
    r = env.ag.cli("replay", "999", check=False)
    assert r.returncode == 1 and "no entry 999" in r.stderr
    r = env.ag.cli("replay", "x", check=False)
    assert r.returncode == 2
    # a directory others can enter is refused
    p2.stop()
    assert not re.search(r"Sanitizer|runtime error", p2.text())
    os.chmod(save, 0o755)
    r = env.ag.cli("run", "--inspect", "127.0.0.1:0", "--inspect-save", save, check=False)
    assert r.returncode != 0 and "chmod 700" in r.stderr


def test_without_inspect_nothing_listens(build_dir, tmp_path, api, procs):
    gw = Gateway(build_dir, tmp_path)
    procs.append(gw)
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("plain", api.url)
    p = ag.run(gw)
    procs.append(p)
    ag.wait_connected("plain")
    assert "inspector_listening" not in p.text()
    r = ag.cli("run", "--inspect-max", "5", check=False)
    assert r.returncode == 2 and "need --inspect" in r.stderr
    r = ag.cli("replay", "1", check=False)
    assert r.returncode == 1 and "without --inspect" in r.stderr
    p.stop()
    r = ag.cli("replay", "1", check=False)
    assert r.returncode == 1 and "no daemon runs" in r.stderr


# ---- the page, in headless Chromium ------------------------------------------------------


class Browser:
    """Debian's chromium --headless with the DevTools protocol over a
    WebSocket (python3-websockets), one page."""

    def __init__(self, tmp):
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp))
        self.proc = Proc([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                          "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
                          f"--user-data-dir={self.profile}", "--window-size=1400,900",
                          "about:blank"], Path(tmp) / "chromium.log")
        m = self.proc.wait_log(r"DevTools listening on (ws://\S+)", timeout=30)
        browser_ws = m.group(1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.next_id = 0
        async def connect():
            return await websockets.connect(browser_ws, max_size=64 << 20)
        self.ws = self._run(connect())
        tid = self.call("Target.createTarget", url="about:blank")["targetId"]
        sid = self.call("Target.attachToTarget", targetId=tid, flatten=True)["sessionId"]
        self.session = sid
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def _run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout * TIME_SCALE)

    def call(self, method, session=False, **params):
        self.next_id += 1
        mid = self.next_id
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session

        async def go():
            await self.ws.send(json.dumps(msg))
            while True:
                r = json.loads(await self.ws.recv())
                if r.get("id") == mid:
                    if "error" in r:
                        raise RuntimeError(f"{method}: {r['error']}")
                    return r["result"]
        return self._run(go())

    def js(self, expr):
        r = self.call("Runtime.evaluate", session=True, expression=expr, awaitPromise=True,
                      returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def goto(self, url):
        self.call("Page.navigate", session=True, url=url)
        wait_for(lambda: self.js("document.readyState === 'complete' && "
                                 "document.getElementById('live') !== null && "
                                 "document.getElementById('live').classList.contains('on')"),
                 15, "the page loaded and live")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        try:
            async def close():
                await self.ws.close()
            self._run(close(), timeout=5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.proc.stop()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser(tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("chromium not installed (scripts/install-deps.sh test)")
    b = Browser(tmp_path)
    yield b
    b.close()


def rows(b):
    return b.js("Array.from(document.querySelectorAll('#list .row')).map(r => "
                "({id: +r.dataset.id, text: r.textContent}))")


def test_page_live_list_detail_replay_edit_filter(build_dir, tmp_path, api, procs, browser):
    env = Env(build_dir, tmp_path, api, procs)
    b = browser
    b.goto(f"http://127.0.0.1:{env.port}/")
    assert rows(b) == []
    hook = {"id": "evt_1", "type": "push", "repository": {"full_name": "o/r"}}
    payload = json.dumps(hook).encode()
    st, echo = env.curl("/echo/github?delivery=1", "-X", "POST", "--data-binary", payload,
                        "-H", "Content-Type: application/json", "-H", "X-GitHub-Event: push",
                        "-H", "X-Hub-Signature-256: sha256=abc")
    assert st == 200
    done = time.monotonic()
    # in the page within 1 s, without a reload (server-sent events)
    r = wait_for(lambda: [x for x in rows(b) if "/echo/github?delivery=1" in x["text"]], 1,
                 "the webhook row in the page", interval=0.02)
    assert time.monotonic() - done < 1 * TIME_SCALE
    eid = r[0]["id"]
    b.js(f"document.querySelector('#list .row[data-id=\"{eid}\"]').click()")
    wait_for(lambda: b.js("!!document.getElementById('req-headers')"), 5, "detail shown")
    heads = b.js("document.getElementById('req-headers').textContent")
    assert "x-github-event" in heads and "push" in heads and "sha256=abc" in heads
    shown = b.js("document.getElementById('req-body').textContent")
    assert b.js("document.getElementById('req-body').dataset.view") == "json"
    assert json.loads(shown) == hook and "\n  " in shown  # pretty-printed
    assert "POST /echo/github?delivery=1" in b.js("document.getElementById('d-title').textContent")
    # copy as curl
    b.js("document.getElementById('copy-curl').click()")
    curl_cmd = wait_for(lambda: b.js("document.getElementById('curl-out').textContent"), 5, "curl")
    assert curl_cmd.startswith("curl -X POST") and "'x-github-event: push'" in curl_cmd
    assert f"https://{env.addr}.localhost:{env.gw.port}/echo/github?delivery=1" in curl_cmd

    # Replay: the local API gets an identical request, and a new entry appears
    before = api.state.requests
    b.js("document.getElementById('replay').click()")
    wait_for(lambda: api.state.requests == before + 1, 5, "the replay at the local API")
    new = wait_for(lambda: [x for x in rows(b) if "replay of #" + str(eid) in x["text"]], 5,
                   "the replay's row")
    rid = new[0]["id"]
    rd = env.wait_done(rid)
    assert json.loads(body_bytes(rd, "response")) == json.loads(echo)  # headers + body hash
    wait_for(lambda: f"replay of #{eid}" in b.js("document.getElementById('d-meta').textContent"),
             5, "the replay selected")

    # an edited replay sends the edit
    b.js(f"document.querySelector('#list .row[data-id=\"{eid}\"]').click()")
    wait_for(lambda: b.js(f"document.getElementById('d-meta').textContent.startsWith('#{eid} ')"),
             5, "original selected")
    b.js("document.getElementById('edit').click()")
    wait_for(lambda: b.js("document.getElementById('edit-form').classList.contains('open') && "
                          "document.getElementById('edit-path').value !== ''"), 5, "edit form")
    b.js("""(() => {
        document.getElementById('edit-path').value = '/echo/edited?x=2';
        const h = document.getElementById('edit-headers');
        h.value = h.value + '\\nx-edited: by-page';
        document.getElementById('edit-body').value = '{"edited": true}';
        document.getElementById('edit-send').click();
    })()""")
    ed = env.wait_entry(lambda e: e["path"] == "/echo/edited?x=2" and not e["active"],
                        "the edited replay")
    seen = json.loads(body_bytes(env.entry(ed["id"]), "response"))
    assert seen["method"] == "POST" and seen["headers"]["x-edited"] == ["by-page"]
    assert seen["headers"]["x-github-event"] == ["push"]
    assert seen["sha256"] == hashlib.sha256(b'{"edited": true}').hexdigest()
    assert ed["replay_of"] == eid

    # the filter
    st, _ = env.curl("/status/404")
    assert st == 404
    wait_for(lambda: any("/status/404" in x["text"] for x in rows(b)), 5, "the 404 row")
    total = len(rows(b))
    assert total == 4
    b.js("(() => { const f = document.getElementById('f-status'); f.value = '4xx'; "
         "f.dispatchEvent(new Event('input')); })()")
    wait_for(lambda: len(rows(b)) == 1 and "/status/404" in rows(b)[0]["text"], 5,
             "status filter")
    b.js("(() => { const f = document.getElementById('f-status'); f.value = ''; "
         "f.dispatchEvent(new Event('input')); const t = document.getElementById('f-text'); "
         "t.value = 'edited'; t.dispatchEvent(new Event('input')); })()")
    wait_for(lambda: [x["id"] for x in rows(b)] == [ed["id"]], 5, "text filter")
    b.js("(() => { const t = document.getElementById('f-text'); t.value = ''; "
         "t.dispatchEvent(new Event('input')); const m = document.getElementById('f-method'); "
         "m.value = 'GET'; m.dispatchEvent(new Event('input')); })()")
    wait_for(lambda: len(rows(b)) == 1, 5, "method filter")
    b.js("(() => { const m = document.getElementById('f-method'); m.value = ''; "
         "m.dispatchEvent(new Event('input')); })()")
    wait_for(lambda: len(rows(b)) == total, 5, "filters off")
    b.js(f"document.querySelector('#list .row[data-id=\"{eid}\"]').click()")
    wait_for(lambda: b.js(f"document.getElementById('d-meta').textContent.startsWith('#{eid} ')"),
             5, "original selected again")
    shot = Path(os.environ.get("TG_BUILD_DIR", tmp_path)) / "inspector-screenshot.png"
    b.screenshot(shot)
    assert shot.stat().st_size > 10000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


def test_page_masks_secrets_and_shows_binary_as_hex(build_dir, tmp_path, api, procs, browser):
    env = Env(build_dir, tmp_path, api, procs)
    b = browser
    b.goto(f"http://127.0.0.1:{env.port}/")
    blob = bytes(range(0, 256, 7))
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(env.gw.ca), "--data-binary",
                        "@-", "-H", "Content-Type: application/octet-stream",
                        "-H", "Authorization: Bearer page-secret",
                        f"https://{env.addr}.localhost:{env.gw.port}/echo/blob"],
                       input=blob, capture_output=True, timeout=60 * TIME_SCALE)
    assert r.returncode == 0
    row = wait_for(lambda: [x for x in rows(b) if "/echo/blob" in x["text"]], 5, "blob row")
    b.js(f"document.querySelector('#list .row[data-id=\"{row[0]['id']}\"]').click()")
    wait_for(lambda: b.js("!!document.getElementById('req-body')"), 5, "detail")
    assert b.js("document.getElementById('req-body').dataset.view") == "hex"
    hexed = b.js("document.getElementById('req-body').textContent")
    assert hexed.startswith("00000000  00 07 0e 15 1c 23 2a 31")
    heads = b.js("document.getElementById('req-headers').textContent")
    assert "page-secret" not in heads and "********" in heads
    b.js("Array.from(document.querySelectorAll('#req-headers td.masked'))[0].click()")
    wait_for(lambda: "Bearer page-secret" in b.js(
        "document.getElementById('req-headers').textContent"), 5, "revealed on click")
