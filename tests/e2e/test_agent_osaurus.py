"""tunnel-agent run --protocol osaurus against a minimal Osaurus relay written
from ANCHORS.md (osaurus_relay.py): authentication of several agents, live
add/remove, request/response and stream frames, binary bodies, host_busy,
cancel, both pings, relay_restarting + 1012, superseded, auth errors, a
silent relay."""

import base64
import hashlib
import json
import time

import pytest

from connect_proxy import ConnectProxy
from local_api import LocalApi, det_bytes, stream_digest, text_body
from osaurus_relay import OsaurusRelay, RelayRequest
from tunnel_env import SANITIZED, TIME_SCALE, Agent, wait_for


def agent_of(st, name):
    return next(a for a in st["agents"] if a["name"] == name)


@pytest.fixture
def api():
    a = LocalApi()
    yield a
    a.stop()


@pytest.fixture
def relay():
    r = OsaurusRelay(ping_interval=30)
    yield r
    r.stop()


PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
              "ALL_PROXY", "no_proxy", "NO_PROXY")


def start(build_dir, tmp_path, relay, api, names=("a1",), extra_new=(), run_extra=(),
          proxy=None):
    ag = Agent(build_dir, tmp_path)
    addrs = {n: ag.new(n, api.url, extra=extra_new) for n in names}
    env = {k: "" for k in PROXY_VARS}
    if proxy is not None:
        env["http_proxy"] = proxy.url
    ag.run(relay, "--protocol", "osaurus", *run_extra, env=env)
    try:
        ag.wait_connected(timeout=20)
    except Exception:
        ag.stop()  # a failed setup must not leave the daemon running
        raise
    return ag, addrs


@pytest.fixture(params=["direct", "proxy"])
def via(request):
    """Each relay test runs directly and through an HTTP CONNECT proxy."""
    if request.param == "direct":
        yield None
        return
    p = ConnectProxy()
    yield p
    assert p.tunnels >= 1  # the tunnel really went through it
    p.stop()


@pytest.fixture
def one(build_dir, tmp_path, relay, api, via):
    ag, addrs = start(build_dir, tmp_path, relay, api, proxy=via)
    t = relay.wait_tunnels(1)
    yield ag, addrs["a1"], t
    ag.stop()


def test_several_agents_authenticate_then_one_added_and_one_removed_live(
        build_dir, tmp_path, relay, api, via):
    ag = Agent(build_dir, tmp_path)
    a1 = ag.new("a1", api.url)
    a2 = ag.new("a2", api.url)
    a3 = ag.new("a3", api.url, enable=False)
    env = {k: "" for k in PROXY_VARS}
    if via is not None:
        env["http_proxy"] = via.url
    ag.run(relay, "--protocol", "osaurus", env=env)
    try:
        st = ag.wait_connected(timeout=20)
        t = relay.wait_tunnels(1)
        # one auth frame for both, no subprotocol, signed over the Osaurus text
        # (verified by the relay with an independent EIP-191 implementation)
        assert sorted(e["address"] for e in t.auth["agents"]) == sorted([a1, a2])
        assert isinstance(t.auth["timestamp"], int)
        assert t.ws.subprotocol is None
        assert agent_of(st, "a1")["url"] == relay.url_of(a1)
        assert agent_of(st, "a2")["url"] == relay.url_of(a2)
        assert agent_of(st, "a3")["state"] == "disconnected"

        ag.cli("enable", "a3", "--yes")
        st = ag.wait_connected("a3", timeout=20)
        assert agent_of(st, "a3")["url"] == relay.url_of(a3)
        kinds = [m["type"] for _, m in t.texts]
        assert "request_challenge" in kinds and "add_agent" in kinds
        assert a3 in t.addrs

        ag.cli("disable", "a1")
        t.wait_for(lambda: any(m["type"] == "remove_agent" and m["address"] == a1
                               for _, m in t.texts), 10 * TIME_SCALE, "remove_agent")
        assert a1 not in t.addrs
        assert len(relay.tunnels) == 1  # all of it on the one live tunnel
        # each agent served on that tunnel
        for a in (a2, a3):
            r = t.request(a, path="/echo?who=" + a).wait()
            assert r.status == 200
            assert json.loads(r.body)["headers"]["x-agent-address"] == [a]
    finally:
        ag.stop()


def test_challenges_answered_in_the_order_asked(build_dir, tmp_path, relay, api):
    ag = Agent(build_dir, tmp_path)
    ag.new("a1", api.url)
    later = [ag.new(f"b{i}", api.url, enable=False) for i in range(3)]
    ag.run(relay, "--protocol", "osaurus")
    try:
        ag.wait_connected(timeout=20)
        t = relay.wait_tunnels(1)
        for i in range(3):
            ag.cli("enable", f"b{i}", "--yes")
        for i in range(3):
            ag.wait_connected(f"b{i}", timeout=30)
        # every add_agent used the oldest challenge outstanding (the relay pops
        # them FIFO and refuses any other nonce): none was refused
        assert not [m for _, m in t.texts if m["type"] == "error"]
        assert all(a in t.addrs for a in later)
    finally:
        ag.stop()


def test_get_post_and_headers(one, api):
    ag, addr, t = one
    r = t.request(addr, path="/echo?q=1", headers={"authorization": "Bearer x",
                                                    "accept": "a, b"}).wait()
    assert r.status == 200 and not r.streamed
    seen = json.loads(r.body)
    assert seen["path"] == "/echo?q=1"
    assert seen["headers"]["authorization"] == ["Bearer x"]
    assert seen["headers"]["accept"] == ["a, b"]
    assert seen["headers"]["x-forwarded-for"] == ["127.0.0.9"]
    assert seen["headers"]["x-forwarded-proto"] == ["http"]      # from the relay's URL
    assert seen["headers"]["x-forwarded-host"] == [relay_host(t, addr)]

    body = "héllo wörld 😀 " * 1000
    r = t.request(addr, method="POST", path="/echo", body=body,
                  headers={"content-type": "text/plain", "content-length": "3"}).wait()
    seen = json.loads(r.body)
    raw = body.encode()
    # the frame's body with its own length, never the caller's stale one
    assert seen["len"] == len(raw) and seen["sha256"] == hashlib.sha256(raw).hexdigest()
    assert seen["headers"]["content-length"] == [str(len(raw))]

    r = t.request(addr, method="POST", path="/echo").wait()
    assert json.loads(r.body)["len"] == 0


def relay_host(t, addr):
    return f"{addr}.localhost:{t.relay.port}"


def test_large_text_response_streams_in_frames_under_1mb(one):
    ag, addr, t = one
    n = 5 * 1024 * 1024
    r = t.request(addr, path=f"/text?n={n}").wait(60 * TIME_SCALE)
    assert r.status == 200
    assert r.streamed  # too big for one frame
    assert bytes(r.body) == text_body(n)
    assert r.headers["content-length"] == str(n)
    chunks = [f for _, f in r.frames if f["type"] == "stream_chunk"]
    assert len(chunks) >= 20
    assert t.max_frame < 1024 * 1024
    # a small one is one response frame
    r = t.request(addr, path="/text?n=1000").wait()
    assert not r.streamed and bytes(r.body) == text_body(1000)


def test_sse_arrives_event_by_event(one):
    ag, addr, t = one
    r = t.request(addr, path="/sse?n=5&interval_ms=300")
    r.wait(30 * TIME_SCALE)
    assert r.streamed and r.status == 200
    assert r.headers["content-type"] == "text/event-stream"
    chunks = [(ts, f["data"]) for ts, f in r.frames if f["type"] == "stream_chunk"]
    text = "".join(d for _, d in chunks)
    assert [ln for ln in text.split("\n") if ln.startswith("id:")] == \
        [f"id: {i}" for i in range(5)]
    # every chunk ends at a newline (flushed per line), and the events came
    # spread over the local API's 1.2 s, not at the end in one go
    assert all(d.endswith("\n") for _, d in chunks)
    first = next(ts for ts, d in chunks if "id: 0" in d)
    last = next(ts for ts, d in chunks if "id: 4" in d)
    assert last - first > 0.8


def test_binary_body_502_without_base64_and_base64_where_offered(build_dir, tmp_path, api):
    for features in ([], ["base64"]):
        relay = OsaurusRelay(features=features)
        sub = tmp_path / ("b64" if features else "plain")
        sub.mkdir()
        ag, addrs = start(build_dir, sub, relay, api)
        try:
            t = relay.wait_tunnels(1)
            addr = addrs["a1"]
            data = det_bytes(3 * 1024 * 1024 + 7, "bin")
            r = t.request(addr, path="/bytes?n=%d&seed=bin" % len(data)).wait(60 * TIME_SCALE)
            small = t.request(addr, path="/bytes?n=100&seed=s").wait()
            if not features:
                # never mangled bytes: a clear 502 and a log line
                assert r.status == 502 and json.loads(r.body)["error"] == \
                    "binary_body_unsupported"
                assert small.status == 502
                assert "binary_body_unsupported" in ag.proc.text()
                assert not any(f.get("bodyEncoding") for _, f in r.frames)
            else:
                assert r.status == 200 and bytes(r.body) == data
                assert bytes(small.body) == det_bytes(100, "s")
                assert any(f.get("bodyEncoding") == "base64" for _, f in r.frames)
                assert t.max_frame < 1024 * 1024
            # the auth frame asked for base64 either way (ignored by the relay)
            assert t.auth.get("features") == ["base64"]
            # a binary request body from a relay that offers base64 arrives intact
            if features:
                payload = det_bytes(50000, "up")
                r = t.request(addr, method="POST", path="/echo",
                              body=base64.b64encode(payload).decode(), encoding="base64").wait()
                assert json.loads(r.body)["sha256"] == hashlib.sha256(payload).hexdigest()
        finally:
            ag.stop()
            relay.stop()


def test_204_304_and_head(one):
    ag, addr, t = one
    for code in (204, 304):
        r = t.request(addr, path=f"/status/{code}").wait()
        assert r.status == code and r.body == b"" and not r.streamed
        assert r.frames[0][1]["body"] == ""
    r = t.request(addr, method="HEAD", path="/text?n=5000").wait()
    assert r.status == 200 and r.body == b""
    assert r.headers["content-length"] == "5000"


def test_host_busy_past_max_inflight(build_dir, tmp_path, relay, api):
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a1", api.url)
    ag.cli("set", "a1", "--max-inflight", "2")
    ag.run(relay, "--protocol", "osaurus")
    try:
        ag.wait_connected(timeout=20)
        t = relay.wait_tunnels(1)
        held = [t.request(addr, path=f"/hold?id=busy{i}") for i in range(2)]
        wait_for(lambda: len(api.state.opened) >= 2, 10, "two requests held")
        r = t.request(addr, path="/echo").wait()
        assert r.status == 503 and json.loads(r.body)["error"] == "host_busy"
        for h in held:
            t.cancel(h.id)
        wait_for(lambda: len(api.state.closed) >= 2, 10, "held requests closed")
        r = t.request(addr, path="/echo").wait()
        assert r.status == 200
    finally:
        ag.stop()


def test_cancel_reaches_the_local_api_within_a_second(one, api):
    ag, addr, t = one
    r = t.request(addr, path="/hold?id=c1")
    wait_for(lambda: "c1" in api.state.opened, 10, "held request at the local API")
    t0 = time.monotonic()
    t.cancel(r.id)
    wait_for(lambda: "c1" in api.state.closed, 5 * TIME_SCALE, "local connection closed")
    assert api.state.closed["c1"] - t0 < 1.0 * TIME_SCALE
    # and frames for it never come; the tunnel goes on
    assert not r.frames
    assert t.request(addr, path="/echo").wait().status == 200
    assert "err=cancelled" in ag.proc.text()


def test_json_ping_and_websocket_ping(one):
    ag, addr, t = one
    t.send({"type": "ping", "ts": 1234567})
    t.wait_for(lambda: t.pongs, 10, "pong")
    assert t.pongs[0] == {"type": "pong", "ts": 1234567}
    assert t.ws_ping() < 5


def test_relay_restarting_reconnects_in_about_a_second(one, relay):
    ag, addr, t = one
    relay.restart(t)
    t.closed.wait(10)
    t_close = time.monotonic()
    t2 = relay.wait_tunnels(2, timeout=10 * TIME_SCALE)
    delay = relay.attempts[-1][0] - t_close
    assert 0.5 < delay < 2.5 * TIME_SCALE, delay
    ag.wait_connected(timeout=20)
    assert t2.request(addr, path="/echo").wait().status == 200
    # twice more: the delay does not grow (no backoff for a restart)
    for n in (3, 4):
        relay.restart(relay.tunnels[-1])
        relay.tunnels[-1].closed.wait(10)
        tc = time.monotonic()
        relay.wait_tunnels(n, timeout=10 * TIME_SCALE)
        assert relay.attempts[-1][0] - tc < 2.5 * TIME_SCALE


def assert_no_reconnect_after_down(ag):
    """The daemon logs tunnel_down and, in the same callback, reconnect_in_ms if
    it will dial again. A status call is answered by the daemon's loop after
    that callback, so once it returns the log holds the decision: no waiting
    for a reconnect that must not come."""
    ag.proc.wait_log(r"event=tunnel_down", timeout=10, since=0)
    assert ag.status() is not None
    text = ag.proc.text()
    after = text[text.rindex("event=tunnel_down"):]
    assert "event=reconnect_in_ms" not in after, after[-2000:]


def test_superseded_stops_without_reconnecting(one, relay):
    ag, addr, t = one
    relay.supersede(t, addr)
    t.closed.wait(10)
    st = wait_for(lambda: (lambda s: s if s and agent_of(s, "a1")["state"] == "error" else None)(
        ag.status()), 10 * TIME_SCALE, "agent in error")
    assert "superseded" in agent_of(st, "a1")["error"]
    # no reconnect fight: the daemon decides when the tunnel goes down, in the
    # same report that logs it, and schedules no reconnect
    assert_no_reconnect_after_down(ag)
    assert len(relay.connects) == 1


def test_auth_error_shown_in_status(build_dir, tmp_path, api):
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a1", api.url)
    relay = OsaurusRelay(refuse={addr: "signature_verification_failed"})
    ag.run(relay, "--protocol", "osaurus")
    try:
        def refused():
            st = ag.status()
            a = st and agent_of(st, "a1")
            return a if a and a["state"] == "error" else None
        a = wait_for(refused, 20, "agent refused")
        assert "signature_verification_failed" in a["error"]
        n = len(relay.attempts)
        assert n >= 1
        # a permanent refusal: not retried
        assert_no_reconnect_after_down(ag)
        assert len(relay.attempts) == n == 1
    finally:
        ag.stop()
        relay.stop()


def test_silent_relay_detected_within_three_intervals(build_dir, tmp_path, api):
    relay = OsaurusRelay(ping_interval=1)
    ag, addrs = start(build_dir, tmp_path, relay, api)
    try:
        t = relay.wait_tunnels(1)
        t.wait_for(lambda: len(t.pongs) >= 2, 10, "two pongs")  # the agent learnt 1 s
        t.go_silent()
        t0 = time.monotonic()
        wait_for(lambda: len(relay.connects) >= 2, 15 * TIME_SCALE, "reconnect")
        # 3 intervals of 1 s, then the reconnect backoff (about 1 s)
        assert time.monotonic() - t0 < 7 * TIME_SCALE
        assert "keepalive_timeout" in ag.proc.text()
    finally:
        ag.stop()
        relay.stop()


def test_probe_and_plain_get_through_the_relay_front(one):
    """The relay's own HTTP side (how the probe came in): a GET for the agent's
    host is relayed as a request frame and answered."""
    import urllib.request
    ag, addr, t = one
    st = ag.status()
    assert agent_of(st, "a1")["state"] == "connected" and agent_of(st, "a1")["probes"] >= 1
    req = urllib.request.Request(f"http://127.0.0.1:{t.relay.port}/echo?via=front",
                                 headers={"Host": relay_host(t, addr)})
    with urllib.request.urlopen(req, timeout=10) as resp:
        seen = json.loads(resp.read())
    assert seen["path"] == "/echo?via=front"
    assert seen["headers"]["x-agent-address"] == [addr]


def test_bad_request_frames_and_joined_headers(one):
    ag, addr, t = one
    # a request frame the schema refuses, with a readable id: 400 invalid_request
    rid = "bad-method-1"
    r = t.requests.setdefault(rid, RelayRequest(rid))
    t.send({"type": "request", "id": rid, "method": "GE T", "path": "/echo", "headers": {},
            "body": ""})
    r.wait()
    assert r.status == 400 and json.loads(r.body)["error"] == "invalid_request"
    # an unreadable id: nothing to answer, logged; the tunnel goes on
    t.send({"type": "request", "id": "x" * 65, "method": "GET", "path": "/", "headers": {},
            "body": ""})
    assert t.request(addr, path="/echo").wait().status == 200
    assert "request_frame_invalid" in ag.proc.text()
    # repeated response fields become one value, in order (a JSON object has one per name)
    r = t.request(addr, path="/cookies").wait()
    assert r.headers["set-cookie"] == "a=1; Path=/, b=2; Path=/"
    assert bytes(r.body) == b"ok"


def test_a_slow_relay_holds_the_local_api_not_the_agents_memory(build_dir, tmp_path, api):
    """Backpressure: while the relay does not read, the agent stops reading the
    local API instead of buffering the body; once it reads again, every byte
    arrives."""
    relay = OsaurusRelay(features=["base64"])
    ag, addrs = start(build_dir, tmp_path, relay, api)
    try:
        t = relay.wait_tunnels(1)
        addr = addrs["a1"]
        n = 64 << 20
        base = ag.proc.rss_kib()
        t.pause_reading()
        r = t.request(addr, path=f"/stream?n={n}")

        def out():
            return agent_of(ag.status(), "a1")["bytes_out"]
        seen = []

        def stalled():
            seen.append(out())
            return len(seen) >= 6 and seen[-1] == seen[-6] and seen[-1] > 0
        wait_for(stalled, 30, "the agent's output to stall", interval=0.2)
        grown_mib = (ag.proc.rss_kib() - base) / 1024
        assert seen[-1] < n // 4, seen[-1]          # held back, not read to the end
        if not SANITIZED:
            assert grown_mib < 16, grown_mib
        t.pause_reading(False)
        r.wait(120 * TIME_SCALE)
        assert r.status == 200 and len(r.body) == n
        assert hashlib.sha256(r.body).hexdigest() == stream_digest(n)
    finally:
        ag.stop()
        relay.stop()


def test_sigterm_removes_the_agents_and_finishes_in_flight(build_dir, tmp_path, relay, api):
    import signal
    ag, addrs = start(build_dir, tmp_path, relay, api)
    addr = addrs["a1"]
    try:
        t = relay.wait_tunnels(1)
        slow = t.request(addr, path="/sse?n=4&interval_ms=300")
        wait_for(lambda: any(p.startswith("/sse") for p in api.state.paths), 10,
                 "slow request at the local API")
        ag.proc.p.send_signal(signal.SIGTERM)
        t.wait_for(lambda: any(m["type"] == "remove_agent" for _, m in t.texts), 10 * TIME_SCALE,
                   "remove_agent")
        late = t.request(addr, path="/echo").wait()
        # the shutting-down answer (its code is the relay's for a drain)
        assert late.status == 503 and json.loads(late.body)["error"] == "relay_restarting"
        slow.wait(20 * TIME_SCALE)
        assert slow.status == 200 and slow.body.count(b"id: ") == 4
        assert ag.proc.p.wait(20 * TIME_SCALE) == 0
        assert t.closed.wait(5) and t.close_code == 1000
    finally:
        ag.stop()
