"""Hardening (issue 11): what a hostile client, agent or malformed byte does
to the real gateway, each attack reproduced and its bounded outcome asserted.
Raw sockets (TLS from Python's ssl), python3-h2/hpack for hand-made HTTP/2,
python3-websockets and tests/vectors/eip191_ref.py for a hand-made agent.
RSS bounds hold in the release build only (sanitizers keep freed memory in
quarantine); everything else runs in both builds."""

import asyncio
import json
import os
import re
import resource
import secrets
import socket
import ssl
import struct
import subprocess
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
import websockets

from local_api import LocalApi
from test_osaurus import OsrClient
from tunnel_env import REPO, SANITIZED, TIME_SCALE, Agent, Gateway, Proc, eip191_ref, wait_for

MiB = 1 << 20
NATIVE = "tunnel-h2.v1"
release_only = pytest.mark.skipif(SANITIZED, reason="RSS bounds: release build only")


@pytest.fixture
def api():
    a = LocalApi()
    yield a
    a.stop()


def stop_all(*procs):
    """Stops each; all must exit 0 (a sanitizer report, a leak at exit or a
    crash would not)."""
    procs = [p.proc if isinstance(p, Agent) else p for p in procs]
    rcs = [(p, p.stop()) for p in procs if p is not None]
    bad = [(getattr(p, "log_path", p), rc) for p, rc in rcs if rc != 0]
    assert not bad, bad


def start_agent(build_dir, tmp, gw, api, names=("api",), name="agent"):
    ag = Agent(build_dir, tmp, name=name)
    addrs = [ag.new(n, api.url) for n in names]
    for n in names:
        ag.cli("set", n, "--max-inflight", "1000")
    ag.run(gw)
    ag.wait_connected(timeout=30)
    return ag, addrs


# ---- raw HTTP/1.1 over TLS or cleartext ----

def connect(gw, host="localhost", alpn=("http/1.1",), timeout=10):
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    if gw.scheme != "https":
        return s
    ctx = gw.ssl_context()
    ctx.set_alpn_protocols(list(alpn))
    return ctx.wrap_socket(s, server_hostname=host)


def read_all(s, timeout=10, limit=1 << 22):
    """Everything until the peer closes (or timeout): (bytes, closed)."""
    s.settimeout(timeout)
    buf = b""
    try:
        while len(buf) < limit:
            d = s.recv(65536)
            if not d:
                return buf, True
            buf += d
    except (socket.timeout, TimeoutError):
        return buf, False
    except (ConnectionResetError, ssl.SSLError, OSError):
        return buf, True
    return buf, False


def status_of(raw):
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(m.group(1)) if m else 0


def body_of(raw):
    return raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""


def exchange(gw, data, host="localhost", timeout=10):
    """Sends data on a new connection; (status, raw answer, closed by the gateway)."""
    with connect(gw, host) as s:
        s.sendall(data)
        raw, closed = read_all(s, timeout)
    return status_of(raw), raw, closed


# ---- item 9: HTTP/1.1 conformance ----

def test_h1_conformance(build_dir, tmp_path, api):
    gw = Gateway(build_dir, tmp_path)
    ag = None
    try:
        ag, (addr,) = start_agent(build_dir, tmp_path, gw, api)
        H = f"{addr}.localhost".encode()

        def req(head, body=b""):
            return head.replace(b"{H}", H) + b"\r\n" + body

        def refused(data, want=400, what=""):
            before = api.state.requests
            st, raw, closed = exchange(gw, data, host=H.decode())
            assert st == want, (what, raw[:300])
            assert closed, what  # nothing after a malformed request is trusted
            assert api.state.requests == before, f"{what}: reached the local API"
            return raw

        # whitespace before the colon: not a field name (and not Transfer-Encoding)
        refused(req(b"POST /echo HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding : chunked\r\n",
                    b"5\r\nhello\r\n0\r\n\r\n"), what="space before colon")
        # codings other than exactly one final chunked, several TE lines
        refused(req(b"POST /echo HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: gzip, chunked\r\n",
                    b"0\r\n\r\n"), what="gzip, chunked")
        refused(req(b"POST /echo HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n"
                    b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"), what="two TE lines")
        # more than one Host
        refused(req(b"GET /echo HTTP/1.1\r\nHost: {H}\r\nHost: {H}\r\n"), what="two Hosts")
        # unknown versions
        refused(req(b"GET /echo HTTP/1.2\r\nHost: {H}\r\n"), want=505, what="HTTP/1.2")
        refused(req(b"GET /echo HTTP/2.0\r\nHost: {H}\r\n"), want=505, what="HTTP/2.0 on h1")
        # targets that leave the agent's base path, or that its HTTP/2 would refuse
        for path in (b"/a/../echo", b"/%2e%2e/echo", b"/.%2E/echo", b"/./echo", b"/echo/..",
                     b"*"):
            refused(req(b"GET " + path + b" HTTP/1.1\r\nHost: {H}\r\n"), what=path)
        refused(req(b"OPTIONS * HTTP/1.1\r\nHost: {H}\r\n"), what="OPTIONS *")
        refused(req(b"GET /echo HTTP/1.1\r\nHost: {H}\r\nBad@Name: 1\r\n"), what="bad name")
        raw = refused(req(b"GET /echo HTTP/1.1\r\nHost: {H}\r\nX-A: a\x7fb\r\n"), what="DEL")
        assert json.loads(body_of(raw))["error"] == "bad_request"
        # a bare LF inside the chunk framing: the local API would see another body
        # than a proxy in front; refused before any of it is answered
        for body in (b"5\nhello\r\n0\r\n\r\n", b"5\r\nhello\n0\r\n\r\n",
                     b"5\r\nhello\r\n0\r\n\n", b"zz\r\nhello\r\n0\r\n\r\n",
                     b"5\r\nhelloXX0\r\n\r\n", b"10000000000000000\r\n"):
            data = req(b"POST /echo HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n", body)
            st, raw, closed = exchange(gw, data, host=H.decode())
            assert st == 400 and closed, (body, raw[:200])
        # a well-formed chunked body with extensions and trailers still passes
        st, raw, _ = exchange(gw, req(b"POST /echo HTTP/1.1\r\nHost: {H}\r\n"
                                      b"Transfer-Encoding: chunked\r\nConnection: close\r\n",
                                      b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"),
                              host=H.decode())
        assert st == 200, raw[:300]
        j = json.loads(body_of(raw).split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
                       if b"chunked" in raw.split(b"\r\n\r\n")[0].lower() else body_of(raw))
        assert j["len"] == 11
        # absolute-form routes by its authority (Host is ignored, RFC 9112 3.2.2)
        st, raw, _ = exchange(gw, req(b"GET https://{H}/echo?q=1 HTTP/1.1\r\nHost: other.example\r\n"
                                      b"Connection: close\r\n"), host=H.decode())
        assert st == 200, raw[:300]
        j = json.loads(body_of(raw))
        assert j["path"] == "/echo?q=1"
        # the fields Connection names are this hop's: never forwarded
        st, raw, _ = exchange(gw, req(b"GET /echo HTTP/1.1\r\nHost: {H}\r\n"
                                      b"Connection: close, X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n"),
                              host=H.decode())
        assert st == 200, raw[:300]
        hdrs = json.loads(body_of(raw))["headers"]
        assert "x-secret" not in hdrs and hdrs["x-kept"] == ["2"]
        # ~4,000 small headers under max-header-bytes: 431 by max-header-count, never 502
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(4000))
        st, raw, _ = exchange(gw, req(b"GET /echo HTTP/1.1\r\nHost: {H}\r\n" + many))
        assert st == 431, raw[:300]
        # item 11: a request that failed before routing is logged without an address
        log = gw.text()
        lines = [ln for ln in log.splitlines() if "event=request" in ln and "status=400" in ln]
        assert lines and all("addr=0x0000000000" not in ln for ln in lines), lines[:3]
        assert any(re.search(r"addr=- ", ln) for ln in lines), lines[:3]
        # and the gateway serves normally afterwards
        st, raw, _ = exchange(gw, req(b"GET /echo HTTP/1.1\r\nHost: {H}\r\nConnection: close\r\n"),
                              host=H.decode())
        assert st == 200
    finally:
        stop_all(ag, gw)


def test_many_header_lines_forwarded_when_allowed(build_dir, tmp_path, api):
    """With max-header-count raised, 2,000 small headers (under max-header-bytes)
    reach the local API or get 431: never 502 agent_offline."""
    gw = Gateway(build_dir, tmp_path, "--max-header-count", "5000")
    ag = None
    try:
        ag, (addr,) = start_agent(build_dir, tmp_path, gw, api)
        H = f"{addr}.localhost".encode()
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
        st, raw, _ = exchange(gw, b"GET /echo HTTP/1.1\r\nHost: " + H + b"\r\nConnection: close\r\n"
                              + many + b"\r\n", host=H.decode())
        assert st in (200, 431), raw[:300]
        if st == 200:
            assert json.loads(body_of(raw))["headers"]["x-h1999"] == ["v"]
    finally:
        stop_all(ag, gw)


MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nContent-Length: 1x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: identity\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\n Folded: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nNo-Colon\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\n: empty-name\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nX\x00Y: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nX: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nHost: {H}\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1]junk\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: example.com:abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}:99999\r\n\r\n",
    b"GET /a/../b HTTP/1.1\r\nHost: {H}\r\n\r\n",
    b"GET /%2e%2E/b HTTP/1.1\r\nHost: {H}\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: {H}\r\n\r\n",
    b"GET /a\x0cb HTTP/1.1\r\nHost: {H}\r\n\r\n",
    b"GET /a\tb HTTP/1.1\r\nHost: {H}\r\n\r\n",
    b"GET /a b HTTP/1.1\r\nHost: {H}\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: {H}\r\n\r\n",
    b"GET / HTTP/1.1x\r\nHost: {H}\r\n\r\n",
    b"G@T / HTTP/1.1\r\nHost: {H}\r\n\r\n",
    b"CONNECT {H}:443 HTTP/1.1\r\nHost: {H}\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n",
    b"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
    b"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcde\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: {H}\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"\x00\x00\x00\x00\r\n\r\n",
]


def test_thousand_malformed_requests(build_dir, tmp_path, api):
    """1,000 malformed requests of varied kinds (the list above, cut and
    mutated at random) each get a 4xx/5xx or a close; then the gateway serves."""
    gw = Gateway(build_dir, tmp_path, "--no-tls", "--log-level", "info")
    ag = None
    rng = secrets.SystemRandom()
    try:
        ag, (addr,) = start_agent(build_dir, tmp_path, gw, api)
        H = f"{addr}.localhost".encode()
        before = api.state.requests
        seen = {}
        for i in range(1000):
            data = MALFORMED[i % len(MALFORMED)].replace(b"{H}", H)
            if i >= len(MALFORMED):
                b = bytearray(data)
                for _ in range(rng.randint(1, 3)):  # a few random byte edits
                    b[rng.randrange(len(b))] = rng.choice(b"\x00\r\n :;\t\x7f\xff/aZ9")
                data = bytes(b)
            with connect(gw) as s:
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                raw, closed = read_all(s, timeout=10 * TIME_SCALE)
            st = status_of(raw)
            assert closed, (data, raw[:200])
            # the untouched malformed requests are all refused; a mutation may by
            # chance be valid (2xx from the agent) or unroutable (404)
            if i < len(MALFORMED):
                assert raw == b"" or 400 <= st < 600, (data, raw[:200])
            else:
                assert raw == b"" or st != 0, (data, raw[:200])
            seen[st] = seen.get(st, 0) + 1
        assert api.state.requests - before <= 1000 - len(MALFORMED)
        assert seen.get(400, 0) > 300, seen
        st, raw, _ = exchange(gw, b"GET /echo HTTP/1.1\r\nHost: " + H + b"\r\nConnection: close\r\n\r\n")
        assert st == 200, raw[:200]
        assert gw.p.poll() is None
    finally:
        stop_all(ag, gw)


# ---- item 5: slow clients ----

def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def test_slowloris_h1(build_dir, tmp_path, api):
    gw = Gateway(build_dir, tmp_path, "--header-timeout", "2", "--keepalive-timeout", "3")
    ag = None
    try:
        ag, (addr,) = start_agent(build_dir, tmp_path, gw, api)
        H = f"{addr}.localhost"
        # one byte, then nothing: 408 at the header timeout, closed
        for first in (b"G", b"GET /echo HTTP/1.1\r\nHost: " + H.encode() + b"\r\nX-A: "):
            with connect(gw, H) as s:
                t0 = time.monotonic()
                s.sendall(first)
                raw, closed = read_all(s, timeout=10 * TIME_SCALE)
                dt = time.monotonic() - t0
            assert status_of(raw) == 408 and closed, raw[:200]
            assert json.loads(body_of(raw))["error"] == "request_timeout"
            assert 1.5 <= dt < 2 + 3 * TIME_SCALE, dt
        # a trickle (one byte every 0.4 s) does not extend the deadline
        with connect(gw, H) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: " + H.encode() + b"\r\n")
            s.settimeout(0.4)
            raw = b""
            while time.monotonic() - t0 < 10 * TIME_SCALE:
                try:
                    s.sendall(b"X")
                    d = s.recv(4096)
                    if not d:
                        break
                    raw += d
                except (socket.timeout, TimeoutError):
                    continue
                except OSError:
                    break
            dt = time.monotonic() - t0
        assert status_of(raw) == 408, raw[:200]
        assert dt < 2 + 3 * TIME_SCALE, dt
        # a connection that sends nothing, or nothing after a response, closes
        with connect(gw, H) as s:
            t0 = time.monotonic()
            raw, closed = read_all(s, timeout=10 * TIME_SCALE)
            assert closed and raw == b"" and 1.5 <= time.monotonic() - t0 < 2 + 3 * TIME_SCALE
        with connect(gw, H) as s:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: " + H.encode() + b"\r\n\r\n")
            t0 = time.monotonic()
            raw, closed = read_all(s, timeout=10 * TIME_SCALE)
            dt = time.monotonic() - t0
            assert status_of(raw) == 200 and closed, raw[:200]
            assert 2.5 <= dt < 3 + 3 * TIME_SCALE, dt
        assert gw.wait_log(r"event=request .*status=408", since=0)
    finally:
        stop_all(ag, gw)


def test_slowloris_500_connections_do_not_delay_others(build_dir, tmp_path, api):
    gw = Gateway(build_dir, tmp_path, "--log-level", "info")
    ag = None
    socks = []
    try:
        ag, (addr,) = start_agent(build_dir, tmp_path, gw, api)
        H = f"{addr}.localhost"
        ctx = gw.ssl_context()
        ctx.set_alpn_protocols(["http/1.1"])
        for i in range(500):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=10),
                                server_hostname=H)
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: " + H.encode() + b"\r\nX-Slow: ")
            socks.append(s)
        for _ in range(3):
            t0 = time.monotonic()
            r = subprocess.run(["curl", "-sS", "--cacert", str(gw.ca), "--connect-to",
                                f"{H}:{gw.port}:127.0.0.1:{gw.port}", "-o", "/dev/null", "-w",
                                "%{http_code}", f"https://{H}:{gw.port}/echo"],
                               capture_output=True, text=True, timeout=30)
            dt = time.monotonic() - t0
            assert r.stdout == "200", r.stderr
            assert dt < 1.0 * TIME_SCALE, dt
    finally:
        for s in socks:
            s.close()
        stop_all(ag, gw)


def test_idle_tls_connections_do_not_stop_new_ones(build_dir, tmp_path, api):
    n = 1000 if SANITIZED else 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n + 200), hard))
    gw = Gateway(build_dir, tmp_path, "--log-level", "info", "--max-conns-per-ip", "0",
                 "--header-timeout", "600")
    ag = None
    socks = []
    try:
        ag, (addr,) = start_agent(build_dir, tmp_path, gw, api)
        H = f"{addr}.localhost"
        ctx = gw.ssl_context()
        for i in range(n):
            socks.append(ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port),
                                                                  timeout=10),
                                         server_hostname=H))
        r = subprocess.run(["curl", "-sS", "--cacert", str(gw.ca), "--connect-to",
                            f"{H}:{gw.port}:127.0.0.1:{gw.port}", "-o", "/dev/null", "-w",
                            "%{http_code}", f"https://{H}:{gw.port}/echo"],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout == "200", r.stderr
        # they are all still open (a read times out rather than seeing EOF)
        socks[0].settimeout(0.2)
        with pytest.raises((socket.timeout, TimeoutError)):
            socks[0].recv(1)
    finally:
        for s in socks:
            s.close()
        stop_all(ag, gw)


# ---- item 5: slow HTTP/2 clients ----

def h2_frame(ftype, flags, sid, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", sid) + payload


def read_h2_frames(s, timeout):
    """Frames until the connection closes or timeout: [(type, flags, sid, payload)], closed."""
    raw, closed = read_all(s, timeout)
    out = []
    while len(raw) >= 9:
        n = int.from_bytes(raw[:3], "big")
        if len(raw) < 9 + n:
            break
        out.append((raw[3], raw[4], int.from_bytes(raw[5:9], "big") & 0x7fffffff, raw[9:9 + n]))
        raw = raw[9 + n:]
    return out, closed


def test_slow_h2_header_block_and_unclosed_stream(build_dir, tmp_path, api):
    gw = Gateway(build_dir, tmp_path, "--header-timeout", "2")
    ag = None
    try:
        ag, (addr,) = start_agent(build_dir, tmp_path, gw, api)
        H = f"{addr}.localhost"
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"")
        block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "https"),
                                        (":authority", H), (":path", "/status/200")])
        # HEADERS without END_HEADERS: the connection goes at the header timeout
        with connect(gw, H, alpn=("h2",)) as s:
            assert s.selected_alpn_protocol() == "h2"
            s.sendall(preface + h2_frame(1, 0x1, 1, block[:3]))
            t0 = time.monotonic()
            frames, closed = read_h2_frames(s, 10 * TIME_SCALE)
            dt = time.monotonic() - t0
        assert closed and 1.5 <= dt < 2 + 3 * TIME_SCALE, dt
        # a header block nghttp2 refuses (an uppercase name) does not leave the
        # header clock running: the connection still serves after the timeout
        bad = hpack.Encoder().encode([(":method", "GET"), (":scheme", "https"),
                                      (":authority", H), (":path", "/status/200")]) + \
            b"\x00\x03X-A\x01v"
        with connect(gw, H, alpn=("h2",)) as s:
            s.sendall(preface + h2_frame(1, 0x5, 1, bad))
            frames, _ = read_h2_frames(s, 3)  # past the 2 s header timeout
            assert any(t == 3 and sid == 1 for t, _, sid, _ in frames), frames
            s.sendall(h2_frame(1, 0x5, 3, block))
            frames, _ = read_h2_frames(s, 3 * TIME_SCALE)
            assert any(t == 1 and sid == 3 for t, _, sid, _ in frames), frames
        # an answered stream the client never half-closes: reset NO_ERROR after a linger
        with connect(gw, H, alpn=("h2",)) as s:
            s.sendall(preface + h2_frame(1, 0x4, 1, block))  # END_HEADERS, no END_STREAM
            t0 = time.monotonic()
            s.settimeout(1)
            got, buf = None, b""
            while time.monotonic() - t0 < 15 * TIME_SCALE and got is None:
                try:
                    d = s.recv(65536)
                except (socket.timeout, TimeoutError):
                    continue
                if not d:
                    break
                buf += d
                while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                    n = int.from_bytes(buf[:3], "big")
                    if buf[3] == 3 and int.from_bytes(buf[5:9], "big") == 1:
                        got = (time.monotonic() - t0, int.from_bytes(buf[9:13], "big"))
                    buf = buf[9 + n:]
        assert got is not None, "no RST_STREAM"
        assert got[1] == 0 and 4 <= got[0] < 5 + 3 * TIME_SCALE, got
    finally:
        stop_all(ag, gw)


# ---- item 6: out of descriptors ----

def test_descriptor_exhaustion_does_not_spin(build_dir, tmp_path, api):
    exe = build_dir / "gateway/tunnel-gateway"
    state = tmp_path / "fd-state"
    g = Proc(["prlimit", "--nofile=80:80", exe, "--listen", "127.0.0.1:0", "--state-dir", state,
              "--no-tls", "--summary-interval", "0"], tmp_path / "fd-gw.log")
    socks = []
    try:
        m = g.wait_log(r"event=listening addr=\S+ port=(\d+).* fd_limit=80")
        port = int(m.group(1))
        for i in range(150):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        # let it try to serve them: the extra ones are closed at once, not spun on
        c0 = cpu_s(g.pid())
        t0 = time.monotonic()
        deadline = t0 + 2
        while time.monotonic() < deadline:
            time.sleep(0.1)
        used = cpu_s(g.pid()) - c0
        assert used < 0.5 * (time.monotonic() - t0), used
        log = g.text()
        assert len(log) < 100_000, len(log)
        assert log.count("event=fd_reserve ") + log.count("event=accept_paused ") <= 3, log[-2000:]
        assert "event=fd_reserve" in log or "event=accept_paused" in log, log[-2000:]
        for s in socks:
            s.close()
        socks = []

        def served():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                raw, _ = read_all(s, 5)
            return status_of(raw) == 200
        wait_for(served, 10 * TIME_SCALE, "served again")
    finally:
        for s in socks:
            s.close()
        stop_all(g)


# ---- item 1: pre-auth memory, unauthenticated connection caps ----

def ws_upgrade(gw, subprotocol=None):
    s = connect(gw, "localhost")
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    s.sendall(("GET /tunnel/connect HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: " + key + "\r\n"
               "Sec-WebSocket-Version: 13\r\n" +
               (f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else "") +
               "\r\n").encode())
    s.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        d = s.recv(1)
        if not d:
            break
        head += d
    return s, status_of(head), head


def ws_frame(opcode, payload, masked=True, fin=True, rsv=0, length=None):
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    if n < 126:
        head = bytes([b0, (0x80 if masked else 0) | n])
    elif n < 65536:
        head = bytes([b0, (0x80 if masked else 0) | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, (0x80 if masked else 0) | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = secrets.token_bytes(4)
    return head + key + bytes(c ^ key[i & 3] for i, c in enumerate(payload))


def ws_read_until_close(s, timeout):
    """Unmasked server frames until a close frame: (texts, close code or None)."""
    s.settimeout(timeout)
    buf, texts = b"", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while len(buf) >= 2:
            n = buf[1] & 0x7f
            off = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + n:
                break
            op, payload = buf[0] & 0x0f, buf[off:off + n]
            buf = buf[off + n:]
            if op == 8:
                return texts, int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if op == 1:
                texts.append(json.loads(payload))
        try:
            d = s.recv(65536)
        except (socket.timeout, TimeoutError):
            break
        except OSError:
            return texts, None
        if not d:
            return texts, None
        buf += d
    return texts, None


@pytest.mark.parametrize("subprotocol", [None, NATIVE])
def test_preauth_declared_length_refused_at_once(build_dir, tmp_path, subprotocol):
    # 20 at once from one address, as in the attack (past the default pending cap)
    gw = Gateway(build_dir, tmp_path, "--log-level", "info", "--max-pending-tunnels-per-ip", "32")
    socks = []
    try:
        rss0 = gw.rss_kib()
        for i in range(20):
            s, st, head = ws_upgrade(gw, subprotocol)
            assert st == 101, head
            # a text frame declaring 63 MiB, and its first 256 KiB
            s.sendall(ws_frame(1, b"", length=63 * MiB))
            try:
                s.sendall(b"{" * (256 * 1024))
            except OSError:
                pass
            socks.append(s)
        for s in socks:
            t0 = time.monotonic()
            texts, code = ws_read_until_close(s, 5 * TIME_SCALE)
            assert code == 1009, (texts, code)
            assert time.monotonic() - t0 < 3 * TIME_SCALE
        if not SANITIZED:
            assert gw.rss_kib() - rss0 < 24 * 1024, (rss0, gw.rss_kib())
    finally:
        for s in socks:
            s.close()
        stop_all(gw)


def test_preauth_rfc6455_violations(build_dir, tmp_path):
    gw = Gateway(build_dir, tmp_path)
    try:
        cases = [
            ("unmasked", ws_frame(1, b"{}", masked=False), 1002),
            ("reserved opcode", ws_frame(3, b"x"), 1002),
            ("rsv bits", ws_frame(1, b"{}", rsv=4), 1002),
            ("fragmented ping", ws_frame(9, b"x", fin=False), 1002),
            ("oversized ping", ws_frame(9, b"x" * 126), 1002),
            ("invalid utf-8", ws_frame(1, b"\xff\xfe"), 1007),
            ("declared over the limit", ws_frame(1, b"", length=1 << 40)[:14], 1009),
        ]
        for what, data, want in cases:
            for sp in (None, NATIVE):
                s, st, _ = ws_upgrade(gw, sp)
                assert st == 101
                texts, _ = ws_read_until_close(s, 0.3)  # the challenge
                s.sendall(data)
                texts, code = ws_read_until_close(s, 5 * TIME_SCALE)
                s.close()
                assert code == want, (what, sp, code)
        # a binary message before auth: auth_error expected_auth_frame (native)
        s, st, _ = ws_upgrade(gw, NATIVE)
        ws_read_until_close(s, 0.3)
        s.sendall(ws_frame(2, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"))
        texts, code = ws_read_until_close(s, 5 * TIME_SCALE)
        s.close()
        assert {"type": "auth_error", "error": "expected_auth_frame"}.items() <= \
            (texts[-1] if texts else {}).items(), texts
        assert code == 4000
    finally:
        stop_all(gw)


def test_unauthenticated_tunnel_caps(build_dir, tmp_path):
    gw = Gateway(build_dir, tmp_path, "--max-pending-tunnels-per-ip", "3",
                 "--max-pending-tunnels", "5")
    socks = []
    try:
        for i in range(3):
            s, st, _ = ws_upgrade(gw)
            assert st == 101
            socks.append(s)
        s, st, head = ws_upgrade(gw)
        assert st == 429 and b"too_many_connections" in head + read_all(s, 2)[0], head
        s.close()
        # another address (127.0.0.2) has its own three, but the total is five
        def up_from(src):
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10,
                                           source_address=(src, 0))
            ctx = gw.ssl_context()
            t = ctx.wrap_socket(raw, server_hostname="localhost")
            t.sendall(b"GET /tunnel/connect HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Sec-WebSocket-Version: 13\r\n\r\n")
            t.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                d = t.recv(1)
                if not d:
                    break
                head += d
            return t, status_of(head), head
        for i in range(2):
            t, st, _ = up_from("127.0.0.2")
            assert st == 101
            socks.append(t)
        t, st, head = up_from("127.0.0.2")
        assert st == 503, head
        body, _ = read_all(t, 2)
        assert b"gateway_busy" in head + body
        t.close()
        # one that authenticates (or goes) gives its slot back
        socks.pop(0).close()
        wait_for(lambda: ws_upgrade_ok(gw), 5 * TIME_SCALE, "a slot again")
        assert "pending_tunnels" in gw.text()
    finally:
        for s in socks:
            s.close()
        stop_all(gw)


def ws_upgrade_ok(gw):
    s, st, _ = ws_upgrade(gw)
    s.close()
    return st == 101


# ---- items 2 and 3: a client that stops reading; a hostile agent ----

def test_stalled_clients_do_not_stall_other_agents(build_dir, tmp_path, api):
    gw = Gateway(build_dir, tmp_path, "--log-level", "info")
    ag = None
    stalled = []
    nghttp = None
    try:
        ag, (a1, a2) = start_agent(build_dir, tmp_path, gw, api, names=("a1", "a2"))
        h = json.loads(subprocess.run(["curl", "-sS", "--cacert", str(gw.ca),
                                       f"https://localhost:{gw.port}/health"],
                                      capture_output=True, text=True).stdout)
        assert h["tunnels"] == 1 and h["agents"] == 2, h  # one tunnel carries both
        H1 = f"{a1}.localhost"
        # 64 HTTP/2 streams with a zero window, and 64 HTTP/1.1 clients that never read
        nghttp = subprocess.Popen(["nghttp", "-n", "-w", "0", "-m", "64", "--no-dep",
                                   f"https://127.0.0.1:{gw.port}/stream?n={32 * MiB}",
                                   "-H", f":authority: {H1}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(64):
            s = connect(gw, H1)
            s.sendall(f"GET /stream?n={32 * MiB} HTTP/1.1\r\nHost: {H1}\r\n\r\n".encode())
            stalled.append(s)
        wait_for(lambda: api.state.requests >= 100, 20 * TIME_SCALE, "stalled requests reached")
        time.sleep(0.5)  # let them fill every window they can (no assertion waits on this)
        # another client of the other agent on the same tunnel gets its whole body
        H2 = f"{a2}.localhost"
        for proto in ("--http1.1", "--http2"):
            t0 = time.monotonic()
            r = subprocess.run(["curl", "-sS", proto, "--cacert", str(gw.ca), "--connect-to",
                                f"{H2}:{gw.port}:127.0.0.1:{gw.port}", "-o", "/dev/null",
                                "-w", "%{http_code} %{size_download}", "--max-time", "30",
                                f"https://{H2}:{gw.port}/stream?n={8 * MiB}"],
                               capture_output=True, text=True)
            assert r.stdout == f"200 {8 * MiB}", (proto, r.stdout, r.stderr)
            assert time.monotonic() - t0 < 10 * TIME_SCALE
        if not SANITIZED:
            assert gw.rss_kib() < 200 * 1024, gw.rss_kib()
    finally:
        if nghttp is not None:
            nghttp.kill()
            nghttp.wait()
        for s in stalled:
            s.close()
        stop_all(ag, gw)


def native_text(domain, addr, nonce, ts):
    return f"tunnel-gateway:v1:{domain}:{addr.lower()}:{nonce}:{ts}".encode()


class EvilAgent:
    """A native agent written here: the WebSocket and auth as PROTOCOL.md says,
    then an HTTP/2 server (python3-h2) that answers with what `respond` writes."""

    def __init__(self, gw):
        self.gw = gw
        d = secrets.randbelow(eip191_ref.N - 1) + 1
        self.d = d
        self.addr = "0x" + eip191_ref.address_from_priv(d).hex()

    async def open(self):
        ctx = ssl.create_default_context(cafile=str(self.gw.ca))
        self.ws = await websockets.connect(f"wss://localhost:{self.gw.port}/tunnel/connect",
                                           ssl=ctx, subprotocols=[NATIVE], max_size=None,
                                           open_timeout=5, close_timeout=5, ping_interval=None)
        ch = json.loads(await self.ws.recv())
        ts = int(time.time())
        sig = "0x" + eip191_ref.sign(self.d, native_text(self.gw.domain, self.addr, ch["nonce"],
                                                         ts)).hex()
        await self.ws.send(json.dumps({"type": "auth", "nonce": ch["nonce"], "timestamp": ts,
                                       "instance": "evil-agent-1",
                                       "agents": [{"address": self.addr, "signature": sig}]}))
        while True:
            m = await self.ws.recv()
            if isinstance(m, str) and json.loads(m)["type"] == "auth_ok":
                break
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.initiate_connection()
        await self.ws.send(self.h2.data_to_send())

    async def serve(self, respond):
        """Answers each request with respond(stream_id) -> raw HTTP/2 bytes."""
        try:
            async for m in self.ws:
                if isinstance(m, str):
                    continue
                for ev in self.h2.receive_data(m):
                    if isinstance(ev, h2.events.RequestReceived):
                        out = self.h2.data_to_send()
                        await self.ws.send(out + respond(ev.stream_id))
                out = self.h2.data_to_send()
                if out:
                    await self.ws.send(out)
        except (websockets.ConnectionClosed, h2.exceptions.ProtocolError):
            pass


def hpack_bomb(sid, continuations):
    """:status 200, one 4,000-byte header added to the dynamic table, then
    one-byte references to it (index 62) filling HEADERS and CONTINUATIONs."""
    # literal with incremental indexing, new name "x-big", a 4000-byte value:
    # 4000 = 127 + 3873 (7-bit prefix full), 3873 = 0x21 + 0x1e * 128 -> 0xa1 0x1e
    lit = b"\x40\x05x-big\x7f\xa1\x1e" + b"v" * 4000
    first = b"\x88" + lit
    first += b"\xbe" * (16384 - len(first))
    out = h2_frame(1, 0x1 if continuations else 0x5, sid, first)
    for i in range(continuations):
        out += h2_frame(9, 0x4 if i == continuations - 1 else 0, sid, b"\xbe" * 16384)
    return out


@pytest.mark.parametrize("continuations", [0, 7])
def test_hpack_bomb_from_agent(build_dir, tmp_path, continuations):
    gw = Gateway(build_dir, tmp_path, "--log-level", "info")
    try:
        evil = EvilAgent(gw)
        host = f"{evil.addr}.localhost"
        result = {}

        async def go():
            await evil.open()
            server = asyncio.create_task(evil.serve(lambda sid: hpack_bomb(sid, continuations)))
            rss0 = gw.rss_kib()
            peak = [rss0]

            def sample():
                while "done" not in result:
                    peak[0] = max(peak[0], gw.rss_kib())
                    time.sleep(0.01)
            th = threading.Thread(target=sample)
            th.start()
            p = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--cacert", str(gw.ca), "--connect-to",
                f"{host}:{gw.port}:127.0.0.1:{gw.port}", "-w", "\n%{http_code}",
                f"https://{host}:{gw.port}/x", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(p.communicate(), 30 * TIME_SCALE)
            result["done"] = True
            th.join()
            result["out"], result["peak"], result["rss0"] = out.decode(), peak[0], rss0
            server.cancel()
            await evil.ws.close()
        asyncio.run(go())
        body, _, code = result["out"].rpartition("\n")
        assert code == "502", result["out"]
        assert json.loads(body)["error"] == "bad_host_response"
        if not SANITIZED:
            assert result["peak"] - result["rss0"] < 16 * 1024, result
        assert "event=agent_header_too_large" in gw.text()
    finally:
        stop_all(gw)


# ---- item 4: Osaurus-mode bodies ----

@release_only
def test_osaurus_bodies_bounded(build_dir, tmp_path):
    gw = Gateway(build_dir, tmp_path, "--log-level", "info",
                 "--max-osaurus-body-memory", str(40 * MiB))
    socks = []
    try:
        async def go():
            c = await OsrClient(gw).open()
            rss0 = gw.rss_kib()
            n = 9_990_000  # uploads of 9.99 MB, each held 1 KB short of complete
            answers = []
            for i in range(8):
                s = connect(gw, c.host)
                s.sendall(f"PUT /up HTTP/1.1\r\nHost: {c.host}\r\nContent-Length: {n}\r\n\r\n"
                          .encode())
                raw, closed = read_all(s, 0.5 * TIME_SCALE)
                answers.append(raw)
                if raw == b"":
                    s.sendall(b"a" * (n - 1024))
                socks.append(s)
            # four fit in the 40 MiB (counted by their Content-Length at once); the
            # others are answered 503 gateway_busy before any byte of their bodies
            taken = [a for a in answers if a == b""]
            busy = [a for a in answers if a != b""]
            assert len(taken) == 4 and answers[:4] == [b""] * 4, answers
            assert all(status_of(a) == 503 and b"gateway_busy" in a for a in busy), busy
            await c.expect_nothing(0.5)  # no `request` frame went out for any of them
            wait_for(lambda: gw.rss_kib() - rss0 > 30 * 1024, 10, "the bodies arrived")
            held = gw.rss_kib() - rss0
            assert held < 60 * 1024, (rss0, held)  # about the 40 MB held, not twice that
            for s in socks:
                s.close()
            # and back to the baseline once they are gone
            wait_for(lambda: gw.rss_kib() - rss0 < 12 * 1024, 10, "the bodies freed")
            await c.close()
        asyncio.run(asyncio.wait_for(go(), 120))
        assert "event=osr_body_memory" in gw.text()
    finally:
        for s in socks:
            s.close()
        stop_all(gw)
