"""Faults, with real processes: an agent killed or stopped mid-flight, a
gateway killed under 200 agents, a local API that never answers, and an agent
facing a malicious gateway (fake_gateway.py: oversized frames, an HPACK bomb,
bogus and flooded control messages). Each test asserts the bounded outcome:
the error a client sees, the time a failure takes to be noticed, memory (RSS,
release builds only), the close code, the log line and the reconnect."""

import datetime
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from fake_gateway import (CONTINUATION, END_HEADERS, END_STREAM, HEADERS, PING, FakeGateway,
                          h2_frame, ws_header)
from helpers_daemon import FixedGateway, wait_state
from local_api import LocalApi
from tunnel_env import SANITIZED, TIME_SCALE, Agent, Gateway, reserve_port, wait_for

MiB = 1 << 20
# RSS bounds (release builds): what one scenario may add to a process
RSS_BOUND_MIB = 16


@pytest.fixture
def api():
    a = LocalApi()
    a.server.socket.listen(512)
    yield a
    a.stop()


@pytest.fixture
def procs():
    """Processes stopped at the end (SIGTERM: sanitizer builds run their leak
    check); then no sanitizer report may be in any of their logs."""
    live = []
    yield live
    for p in reversed(live):
        try:
            if p.p.poll() is None:
                os.killpg(p.p.pid, signal.SIGCONT)
            p.stop(signal.SIGTERM)
        except Exception:
            pass
    bad = [p.log_path.name for p in live if re.search(r"Sanitizer|runtime error", p.text())]
    assert not bad, bad


class RssPeak:
    """Samples the RSS of processes every 20 ms while a block runs."""

    def __init__(self, *procs):
        self.procs = procs

    def __enter__(self):
        self.base = [p.rss_kib() for p in self.procs]
        self.peak = list(self.base)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.02)

    def sample(self):
        for i, p in enumerate(self.procs):
            try:
                self.peak[i] = max(self.peak[i], p.rss_kib())
            except (FileNotFoundError, ProcessLookupError):
                pass

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()
        self.sample()

    def growth_mib(self):
        return [(pk - b) / 1024 for pk, b in zip(self.peak, self.base)]

    def check(self, bound=RSS_BOUND_MIB):
        if not SANITIZED:
            assert max(self.growth_mib()) <= bound, f"RSS growth MiB: {self.growth_mib()}"


def start(procs, agent, gw, *extra):
    p = agent.run(gw, *extra)
    procs.append(p)
    return p


def curl_cmd(gw, addr, path, *args, http="--http1.1"):
    return ["curl", "-sS", http, "--cacert", str(gw.ca), *args,
            f"https://{addr}.localhost:{gw.port}{path}"]


def get(gw, addr, path, *args, http="--http1.1", timeout=30):
    """(status, body) of one request through the gateway; status 0 if curl failed."""
    r = subprocess.run(curl_cmd(gw, addr, path, "-o", "-", "-w", "\n%{http_code}", *args,
                                http=http), capture_output=True, timeout=timeout)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or b"0"), body


def health(gw):
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    with urllib.request.urlopen(f"https://localhost:{gw.port}/health", context=ctx,
                                timeout=5) as r:
        return json.loads(r.read())


def log_ts(line):
    """The ts= of a log line as seconds since the epoch."""
    m = re.search(r"ts=(\S+)Z", line)
    return datetime.datetime.fromisoformat(m.group(1)).replace(
        tzinfo=datetime.timezone.utc).timestamp()


# ---- the agent dies or stops under a response --------------------------------------


@pytest.mark.parametrize("kind", ["h1_length", "h1_chunked", "h2"])
def test_agent_killed_mid_response_is_an_error_for_the_client(build_dir, tmp_path, api, procs,
                                                              kind):
    """SIGKILL of the agent while a response streams: HTTP/1.1 closes the
    connection short of its Content-Length or before the last chunk, HTTP/2
    resets the stream; never a clean end of a truncated body."""
    gw = Gateway(build_dir, tmp_path)
    procs.append(gw)
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a", api.url)
    proc = start(procs, ag, gw)
    wait_state(ag, "a", "connected", 20)
    out = tmp_path / "out.bin"
    n = 4 * MiB
    if kind == "h1_length":
        cmd = curl_cmd(gw, addr, f"/slowbytes?n={n}&chunk=4096&interval_ms=10", "-o", str(out))
    elif kind == "h1_chunked":
        # --raw: the chunked framing as it came, so the last chunk is visible
        cmd = curl_cmd(gw, addr, "/sse?n=100000&interval_ms=10", "--raw", "-N", "-o", str(out))
    else:
        # no Content-Length: only the stream's end says whether the body is whole
        cmd = curl_cmd(gw, addr, "/sse?n=100000&interval_ms=10", "-N", "-o", str(out),
                       http="--http2")
    c = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: out.exists() and out.stat().st_size >= 2000, 10,
                 "response bytes at the client")
        os.killpg(proc.p.pid, signal.SIGKILL)
        rc = c.wait(10 * TIME_SCALE)
    finally:
        if c.poll() is None:
            c.kill()
            c.wait()
    err = c.stderr.read().decode(errors="replace")
    body = out.read_bytes()
    if kind == "h1_length":
        assert rc == 18, (rc, err)  # CURLE_PARTIAL_FILE: closed short of Content-Length
        assert 2000 <= len(body) < n
    elif kind == "h1_chunked":
        assert rc == 18, (rc, err)  # closed with outstanding read data
        assert b"data:" in body and not body.endswith(b"0\r\n\r\n"), body[-64:]
    else:
        assert rc == 92, (rc, err)  # CURLE_HTTP2_STREAM: RST_STREAM, not END_STREAM
        assert "not closed cleanly" in err, err
        assert b"data:" in body
    # the gateway forgot the agent: the next request is agent_offline
    st, b = get(gw, addr, "/echo")
    assert st == 502 and json.loads(b)["error"] == "agent_offline"


def test_agent_stopped_tunnel_dropped_within_3_pings_then_back_on_sigcont(build_dir, tmp_path,
                                                                           api, procs):
    """SIGSTOP: the gateway drops the silent tunnel within 3 keepalive
    intervals (PRODUCT.md: "a silent peer is detected within 3 intervals"),
    requests get 502 agent_offline, and after SIGCONT the agent reconnects."""
    interval = 1
    gw = Gateway(build_dir, tmp_path, "--ping-interval", str(interval))
    procs.append(gw)
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a", api.url)
    proc = start(procs, ag, gw)
    wait_state(ag, "a", "connected", 20)
    assert get(gw, addr, "/echo")[0] == 200
    gw.mark()
    t0 = time.monotonic()
    os.killpg(proc.p.pid, signal.SIGSTOP)
    try:
        gw.wait_log(r"event=tunnel_down .*reason=\"?keepalive", timeout=10)
        took = time.monotonic() - t0
        print(f"SIGSTOP: tunnel dropped by the gateway after {took:.2f} s "
              f"(ping interval {interval} s)")
        # the agent's last bytes (its PING, our PING's ACK) came at most one
        # interval before the stop: never dropped before 2 intervals of silence
        assert took >= 2 * interval - 0.1, took
        # within 3 keepalive intervals of the last byte (PRODUCT.md)
        assert took <= 3 * interval + 0.3 * TIME_SCALE, took
        st, b = get(gw, addr, "/echo")
        assert st == 502 and json.loads(b)["error"] == "agent_offline"
        proc.mark()
    finally:
        os.killpg(proc.p.pid, signal.SIGCONT)
    # the agent notices (the gateway's close, or its own keepalive) and dials again
    proc.wait_log(r"event=tunnel_down", timeout=10)
    proc.wait_log(r"event=agent_registered", timeout=10)

    def served():
        st, b = get(gw, addr, "/echo")
        return st == 200 and json.loads(b)["headers"]["x-tunnel-origin"] == ["public"]
    wait_for(served, 10, "served again")


# ---- the gateway dies under 200 agents --------------------------------------------


def test_gateway_killed_with_200_agents_all_back_within_backoff_spread(build_dir, tmp_path, api,
                                                                        procs):
    daemons, per = 20, 10
    port = reserve_port()
    gw = FixedGateway(build_dir, tmp_path, port)  # default limits
    procs.append(gw)
    agents = [Agent(build_dir, tmp_path, name=f"agent{i}") for i in range(daemons)]

    def create(ag):
        return [ag.new(f"a{j}", api.url) for j in range(per)]
    with ThreadPoolExecutor(8) as ex:
        addrs = [a for lst in ex.map(create, agents) for a in lst]
    assert len(set(addrs)) == daemons * per
    # started one after the other: 20 daemons dialling in the same millisecond
    # would exceed the gateway's unauthenticated tunnels per address (8), and
    # a refused first attempt leaves a daemon's backoff at 2 s for a minute
    dprocs = []
    for ag in agents:
        dprocs.append(start(procs, ag, gw, "--log-level", "info"))
        dprocs[-1].wait_log(r"event=tunnel_up", timeout=10)
    wait_for(lambda: health(gw)["agents"] == daemons * per, 60, "200 agents up")
    assert health(gw)["tunnels"] == daemons

    for p in dprocs:
        p.mark()
    gw.stop(signal.SIGKILL)
    t_kill = time.monotonic()
    gw2 = FixedGateway(build_dir, tmp_path, port)
    procs.append(gw2)
    t_listen = time.monotonic() - t_kill

    def all_back():
        try:
            return health(gw2)["agents"] == daemons * per
        except OSError:
            return False
    wait_for(all_back, 30, "200 agents back")
    took = time.monotonic() - t_kill
    # the first retry comes 1 s +-20 % after the drop (ag_daemon.c backoff_next);
    # if the new gateway was not listening by 0.8 s, one more (2 s +-20 %) may be needed
    bound = 1.2 if t_listen < 0.8 else 1.2 + 2.4
    assert took <= bound + 1.5 * TIME_SCALE, (took, t_listen)
    first = []
    for p in dprocs:
        p.wait_log(r"event=tunnel_up", timeout=5)
        delays = [int(v) for v in re.findall(r"event=reconnect_in_ms ms=(\d+)", p.text(p.log_offset))]
        assert delays, p.log_path
        first.append(delays[0])
    assert all(800 <= d <= 1200 for d in first), first
    assert len(set(first)) >= daemons // 2, first  # jittered, not one value for all
    # the gateway saw the tunnels arrive spread over the jitter window, not in one burst
    ups = sorted(log_ts(line) for line in gw2.text().splitlines() if "event=tunnel_up" in line)
    assert len(ups) == daemons, len(ups)
    spread = ups[-1] - ups[0]
    assert spread >= 0.1, f"{daemons} reconnects within {spread * 1000:.0f} ms"
    print(f"reconnect: all {daemons * per} back in {took:.2f} s (gateway listening at "
          f"{t_listen:.2f} s); tunnel_up spread {spread * 1000:.0f} ms; first delays "
          f"{min(first)}-{max(first)} ms")
    st, body = get(gw2, addrs[-1], "/echo")
    assert st == 200


# ---- a local API that accepts and never answers -------------------------------------


class HungApi:
    """Accepts connections, reads what comes, never answers; counts the
    connections the agent closed."""

    def __init__(self):
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(1024)
        self.port = self.ls.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.open = []
        self.accepted = 0
        self.closed = 0
        self.stopping = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stopping:
            with self.lock:
                socks = [self.ls] + self.open
            r, _, _ = select.select(socks, [], [], 0.05)
            for s in r:
                if s is self.ls:
                    try:
                        c, _ = self.ls.accept()
                    except OSError:
                        return
                    with self.lock:
                        self.open.append(c)
                        self.accepted += 1
                    continue
                try:
                    d = s.recv(65536)
                except OSError:
                    d = b""
                if not d:
                    s.close()
                    with self.lock:
                        self.open.remove(s)
                        self.closed += 1

    def stop(self):
        self.stopping = True
        self.ls.close()


def run_many(gw, addr, path, n, parallel, tmp):
    cfg = "next\n".join(
        f'url = "https://{addr}.localhost:{gw.port}{path}&i={i}"\ncacert = "{gw.ca}"\n'
        f'silent\noutput = "/dev/null"\nwrite-out = "%{{http_code}}\\n"\n' for i in range(n))
    (tmp / "many.cfg").write_text(cfg)
    r = subprocess.run(["curl", "-Z", "--parallel-max", str(parallel), "-K", str(tmp / "many.cfg")],
                       capture_output=True, text=True, timeout=120 * TIME_SCALE)
    return [int(c) for c in r.stdout.split()]


@pytest.mark.parametrize("who", ["gateway", "agent"])
def test_hung_local_api_times_out_and_memory_stays_flat(build_dir, tmp_path, procs, who):
    """who=gateway: --response-header-timeout 1 at the gateway, none at the
    agent; who=agent: the agent's --response-timeout 1. Either way 504
    gateway_timeout after about a second, the local connection closed, and
    200 such requests leave both processes' memory where it was."""
    hung = HungApi()
    try:
        gw = Gateway(build_dir, tmp_path, *(["--response-header-timeout", "1"]
                                            if who == "gateway" else []))
        procs.append(gw)
        ag = Agent(build_dir, tmp_path)
        addr = ag.new("a", hung.url)
        ag.cli("set", "a", "--max-inflight", "1000",
               *(["--response-timeout", "1"] if who == "agent" else []))
        proc = start(procs, ag, gw)
        wait_state(ag, "a", "connected", 20)
        proc.mark()
        gw.mark()
        t0 = time.monotonic()
        st, body = get(gw, addr, "/hang?x=1", timeout=30)
        took = time.monotonic() - t0
        assert st == 504 and json.loads(body)["error"] == "gateway_timeout", (st, body)
        assert 0.9 <= took <= 3 * TIME_SCALE, took
        if who == "agent":  # the agent answered it: its access line says so
            proc.wait_log(r"event=request .*status=504 .*err=gateway_timeout", timeout=5)
        else:  # the gateway gave up and cancelled the stream at the agent
            proc.wait_log(r"event=request .*h2_error=8", timeout=5)
        wait_for(lambda: hung.accepted >= 1 and hung.closed == hung.accepted, 5,
                 "the local connection closed")

        codes = run_many(gw, addr, "/hang?x=2", 50, 50, tmp_path)  # warm-up: pools, buffers
        assert codes == [504] * 50, codes
        with RssPeak(gw, proc) as rss:
            codes = run_many(gw, addr, "/hang?x=3", 200, 50, tmp_path)
        assert codes == [504] * 200, sorted(set(codes))
        wait_for(lambda: hung.closed == hung.accepted, 10,
                 "every local connection closed")
        assert hung.accepted >= 251
        print(f"hung local API ({who}): RSS growth MiB gateway/agent {rss.growth_mib()}")
        rss.check(8)
    finally:
        hung.stop()


# ---- a malicious gateway ---------------------------------------------------------


@pytest.fixture
def fake():
    g = FakeGateway(ping_interval=20)
    yield g
    g.stop()


def agent_on_fake(build_dir, tmp_path, api, fake, procs):
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a", api.url)
    proc = start(procs, ag, fake)
    return ag, addr, proc


def assert_reconnects_and_serves(fake, n, addr, t_close):
    """Connection n arrives within the first backoff (1 s +-20 %) and serves."""
    c = fake.wait_conn(n, timeout=10 * TIME_SCALE)
    assert c.opened_at - t_close <= 1.2 + 1.0 * TIME_SCALE, c.opened_at - t_close
    r = c.request(addr, path="/echo")
    assert r.done.wait(5 * TIME_SCALE) and r.status == 200, (r.status, r.reset)
    return c


def oversized_text(declared):
    """A text frame header declaring far more than 64 KiB, then some bytes of it."""
    def go(conn):
        if declared:
            conn.send_raw(ws_header(1, 1 << 40) + b"{" * 65536)
        else:
            conn.send_text(b'{"type":"x","pad":"' + b"a" * 65536 + b'"}')
    return go


@pytest.mark.parametrize("declared", [True, False], ids=["declared_1TiB", "actual_64KiB+"])
@pytest.mark.parametrize("when", ["before_auth", "after_auth"])
def test_fake_oversized_text_message_closed_1009_and_reconnects(build_dir, tmp_path, api, fake,
                                                                 procs, declared, when):
    if when == "before_auth":
        fake.pre_auth = [oversized_text(declared)]
    ag, addr, proc = agent_on_fake(build_dir, tmp_path, api, fake, procs)
    c1 = fake.wait_conn(1, ready=when == "after_auth")
    with RssPeak(proc) as rss:
        if when == "after_auth":
            assert c1.request(addr, path="/echo").done.wait(5 * TIME_SCALE)
            oversized_text(declared)(c1)
        c1.wait(lambda: c1.close_code is not None or c1.eof, 10 * TIME_SCALE, "the agent's close")
    t_close = time.monotonic()
    assert c1.close_code == 1009, (c1.close_code, c1.close_reason)
    proc.wait_log(r"event=tunnel_down .*1009", timeout=5)
    assert_reconnects_and_serves(fake, 2, addr, t_close)
    rss.check()


def test_fake_binary_before_auth_closed_4000(build_dir, tmp_path, api, fake, procs):
    fake.pre_auth = [lambda conn: conn.send_frame(2, b"\x00" * 64)]
    ag, addr, proc = agent_on_fake(build_dir, tmp_path, api, fake, procs)
    c1 = fake.wait_conn(1, ready=False)
    c1.wait(lambda: c1.close_code is not None or c1.eof, 10 * TIME_SCALE, "the agent's close")
    t_close = time.monotonic()
    assert c1.close_code == 4000 and c1.close_reason == "protocol_error", c1.close_code
    proc.wait_log(r"event=tunnel_down .*binary data before auth_ok", timeout=5)
    assert_reconnects_and_serves(fake, 2, addr, t_close)


def test_fake_huge_binary_frame_is_streamed_not_reserved(build_dir, tmp_path, api, fake, procs):
    """A binary frame declaring 1 TiB: its payload is HTTP/2 the agent uses
    as it arrives (PING answered from inside it), never a reservation."""
    ag, addr, proc = agent_on_fake(build_dir, tmp_path, api, fake, procs)
    c = fake.wait_conn(1)
    assert c.request(addr, path="/echo").done.wait(5 * TIME_SCALE)
    filler = h2_frame(0xFA, 0, 0, b"\0" * 16384)  # an unknown frame type: ignored
    with RssPeak(proc) as rss:
        c.send_raw(ws_header(2, 1 << 40))
        for i in range(16):  # 16 x 4 MiB
            c.send_raw(filler * 256 + h2_frame(PING, 0, 0, b"%08d" % i))
            c.wait(lambda: len(c.ping_acks) > i, 10 * TIME_SCALE, f"PING ACK {i}")
    assert c.ping_acks[:16] == [b"%08d" % i for i in range(16)]
    assert c.close_code is None and not c.eof
    print(f"1 TiB binary frame, 64 MiB sent: agent RSS growth {rss.growth_mib()[0]:.1f} MiB")
    rss.check()


def hpack_bomb(c, addr, continuations=7):
    """One 4,000-byte header into the HPACK table, then one-byte references to
    it (0xBE: dynamic entry 62, the newest) filling HEADERS and CONTINUATION
    frames of 16 KiB: about 130,000 fields, 520 MB decoded from 128 KiB."""
    sid = c.new_sid()
    block = c.enc.encode(c.req_headers(addr, path="/echo?bomb=1") + [("x-bomb", "a" * 4000)])
    out = h2_frame(HEADERS, END_STREAM | (END_HEADERS if continuations == 0 else 0), sid,
                   block + b"\xbe" * (16384 - len(block)))
    for i in range(continuations):
        out += h2_frame(CONTINUATION, END_HEADERS if i == continuations - 1 else 0, sid,
                        b"\xbe" * 16384)
    c.send_h2(out)
    return c.responses[sid]


def test_fake_hpack_bomb_answered_431_memory_flat(build_dir, tmp_path, api, fake, procs):
    ag, addr, proc = agent_on_fake(build_dir, tmp_path, api, fake, procs)
    c = fake.wait_conn(1)
    assert c.request(addr, path="/echo").done.wait(5 * TIME_SCALE)
    before = api.state.requests
    proc.mark()
    with RssPeak(proc) as rss:
        r = hpack_bomb(c, addr)
        assert r.done.wait(10 * TIME_SCALE), "no answer to the bomb"
    assert r.status == 431 and json.loads(r.body)["error"] == "header_too_large", (r.status,
                                                                                   r.reset)
    proc.wait_log(r"event=request_headers_too_large .*bytes=\d+", timeout=5)
    # thousands of small distinct fields: the field count limit
    sid = c.new_sid()
    many = [(f"x-h{i}", "v") for i in range(5000)]
    block = c.enc.encode(c.req_headers(addr, path="/echo?many=1") + many, huffman=False)
    frames = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    out = h2_frame(HEADERS, END_STREAM | (END_HEADERS if len(frames) == 1 else 0), sid, frames[0])
    for i, f in enumerate(frames[1:], 1):
        out += h2_frame(CONTINUATION, END_HEADERS if i == len(frames) - 1 else 0, sid, f)
    assert len(frames) <= 8
    c.send_h2(out)
    r2 = c.responses[sid]
    assert r2.done.wait(10 * TIME_SCALE) and r2.status == 431, (r2.status, r2.reset)
    # nothing of either reached the local API; the tunnel and its HPACK state are fine
    assert api.state.requests == before
    r = c.request(addr, path="/echo?after=1")
    assert r.done.wait(5 * TIME_SCALE) and r.status == 200
    assert api.state.requests == before + 1
    assert c.close_code is None and not c.eof
    print(f"HPACK bomb: agent RSS growth {rss.growth_mib()[0]:.1f} MiB")
    rss.check()


def test_fake_continuation_flood_ends_the_tunnel_and_reconnects(build_dir, tmp_path, api, fake,
                                                                procs):
    ag, addr, proc = agent_on_fake(build_dir, tmp_path, api, fake, procs)
    c = fake.wait_conn(1)
    with RssPeak(proc) as rss:
        hpack_bomb(c, addr, continuations=64)
        c.wait(lambda: c.close_code is not None or c.eof, 10 * TIME_SCALE, "the agent's close")
    t_close = time.monotonic()
    assert c.close_code == 4000, (c.close_code, c.close_reason)
    assert c.goaway is not None and c.goaway[1] != 0, c.goaway  # GOAWAY with an error first
    proc.wait_log(r"event=tunnel_down .*http2", timeout=5)
    assert_reconnects_and_serves(fake, 2, addr, t_close)
    rss.check()


BOGUS = [
    {"type": "no_such_type", "x": 1},
    {"type": "agent_removed", "address": 12345, "reason": "superseded"},
    {"type": "agent_removed", "address": "0x" + "zz" * 20},
    {"type": "challenge", "nonce": ["not", "a", "string"], "expires_in": 30},
    {"type": "challenge", "nonce": "ab" * 32, "expires_in": -1},
    {"type": "auth_ok", "agents": [], "region": 7, "ping_interval": "soon"},
    {"type": "auth_error", "error": "signature_verification_failed"},
    {"type": "agent_added", "address": None, "url": {"a": 1}},
    {"type": "error", "error": "x" * 60000, "message": "y" * 4000},
    {"type": "error", "error": "invalid_nonce", "address": "0x" + "00" * 20},
    {"type": 42},
    {"nope": "no type"},
    "[1, 2, 3]",
    "\"a string\"",
    "{\"type\": \"error\", \"type\": \"error\"}",
    "{\"type\": \"error\", " + "\"a\": 1, " * 5000 + "\"z\": 0}",
    "[" * 30000 + "]" * 30000,
    "{{{{ not json",
    "{\"type\": \"error\", \"message\": \"\\ud800\"}",
    "",
]


def test_fake_bogus_and_flooded_control_messages_are_ignored(build_dir, tmp_path, api, fake,
                                                             procs):
    ag, addr, proc = agent_on_fake(build_dir, tmp_path, api, fake, procs)
    c = fake.wait_conn(1)
    assert c.request(addr, path="/echo").done.wait(5 * TIME_SCALE)
    proc.mark()
    with RssPeak(proc) as rss:
        for m in BOGUS:
            assert c.send_text(m)
        r = c.request(addr, path="/echo?after=bogus")
        assert r.done.wait(5 * TIME_SCALE) and r.status == 200
        # floods: 20,000 unknown messages, 2,000 WebSocket pings, 5,000 bad errors
        one = b'{"type":"flood","n":1234567890}'
        flood = (ws_header(1, len(one)) + one) * 20000
        pings = (ws_header(9, 4) + b"ping") * 2000
        errs = b"".join(ws_header(1, len(e)) + e for e in
                        [b'{"type":"error","error":' + b'"%d"' % i + b'}' for i in range(5000)])
        for chunk in (flood, pings, errs):
            assert c.send_raw(chunk)
        c.ping()
        c.wait(lambda: len(c.ping_acks) >= 1, 10 * TIME_SCALE, "PING ACK after the flood")
        r = c.request(addr, path="/echo?after=flood")
        assert r.done.wait(5 * TIME_SCALE) and r.status == 200
    assert c.close_code is None and not c.eof, (c.close_code, c.close_reason)
    # each bad message of a known type is logged; unknown types only at debug
    text = proc.text(proc.log_offset)
    assert len(re.findall(r"event=tunnel_bad_message", text)) >= 5
    assert "event=tunnel_unknown_message" in text
    assert "event=tunnel_down" not in text
    print(f"bogus control messages: agent RSS growth {rss.growth_mib()[0]:.1f} MiB")
    rss.check()


def test_fake_invalid_utf8_text_fails_the_connection(build_dir, tmp_path, api, fake, procs):
    """RFC 6455 8.1: a text message that is not UTF-8 fails the connection (1007)."""
    ag, addr, proc = agent_on_fake(build_dir, tmp_path, api, fake, procs)
    c = fake.wait_conn(1)
    assert c.request(addr, path="/echo").done.wait(5 * TIME_SCALE)
    c.send_text(b'{"type":"error","error":"\xc3\x28"}')
    c.wait(lambda: c.close_code is not None or c.eof, 10 * TIME_SCALE, "the agent's close")
    t_close = time.monotonic()
    assert c.close_code == 1007, (c.close_code, c.close_reason)
    assert_reconnects_and_serves(fake, 2, addr, t_close)
