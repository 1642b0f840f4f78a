"""WebSocket pass-through end to end (proto/PROTOCOL.md section 6) with real
clients: Python websockets (HTTP/1.1 Upgrade), Node ws (HTTP/1.1 Upgrade),
headless Chromium with HTTP/2 (RFC 8441 extended CONNECT on the page's h2
connection) and with --disable-http2 (HTTP/1.1 Upgrade), all through
tunnel-gateway -> tunnel -> tunnel-agent -> a local websockets server
(ws_local_api.py, in this process, sharing its monotonic clock).

Time bounds are scaled by 3 in sanitizer builds (TG_SANITIZED=1); memory
bounds apply to release builds only."""

import hashlib
import json
import os
import random
import re
import socket
import ssl
import string
import subprocess
import threading
import time

import pytest

from tunnel_env import SANITIZED, Agent, Gateway, wait_for
from ws_clients import ChromiumClient, NodeClient, PyClient
from ws_local_api import REFUSE_BODY, WsLocalApi, frag_payload

S = 3 if SANITIZED else 1          # wall-clock scale
MiB = 1 << 20
CLIENTS = ["python", "node", "chromium-h2", "chromium-h1"]


class Env:
    pass


def start_env(build_dir, tmp, *gw_args, name):
    e = Env()
    e.tmp = tmp
    e.api = WsLocalApi()
    e.gw = Gateway(build_dir, tmp, *gw_args, name=name)
    e.agent = Agent(build_dir, tmp, name=f"{name}-agent")
    e.addr = e.agent.new("ws", e.api.url)
    e.agent.cli("set", "ws", "--max-inflight", "1000")
    e.agent.run(e.gw)
    e.agent.wait_connected(timeout=30 * S)
    e.host = f"{e.addr}.localhost"
    e.base = f"https://{e.host}:{e.gw.port}"
    ports = re.findall(r"event=listening addr=\S+ port=(\d+) scheme=(\w+)", e.gw.text())
    e.plain_port = next((int(p) for p, sch in ports[1:] if sch == "http"), None)
    return e


def stop_env(e):
    e.agent.stop()
    e.gw.stop()
    e.api.stop()


@pytest.fixture(scope="module")
def env(build_dir, tmp_path_factory):
    e = start_env(build_dir, tmp_path_factory.mktemp("ws"), "--plain-listen", "127.0.0.1:0",
                  name="wsgw")
    yield e
    stop_env(e)


@pytest.fixture(scope="module")
def idle_env(build_dir, tmp_path_factory):
    e = start_env(build_dir, tmp_path_factory.mktemp("wsidle"), "--stream-idle-timeout", "2",
                  name="wsidle")
    yield e
    stop_env(e)


@pytest.fixture(scope="module")
def browsers(tmp_path_factory):
    """One headless Chromium per mode, started on first use (a missing
    /usr/bin/chromium fails the test: it is a declared dependency)."""
    tmp = tmp_path_factory.mktemp("chromium")
    made = {}

    def get(http2):
        if http2 not in made:
            made[http2] = ChromiumClient(tmp, http2=http2)
        return made[http2]
    yield get
    for c in made.values():
        c.stop()


@pytest.fixture
def make_client(browsers, tmp_path):
    made = []

    def make(kind, e):
        if kind == "python":
            c = PyClient(e.gw.ca)
            made.append(c)
        elif kind == "node":
            c = NodeClient(e.gw.ca, tmp_path / f"node-{len(made)}.log")
            made.append(c)
        elif kind.startswith("chromium"):
            c = browsers(kind == "chromium-h2")
            c.goto(e.base)
        else:
            raise ValueError(kind)
        return c
    yield make
    for c in made:
        c.stop()


_seq = iter(range(1, 1 << 30))


def new_id(kind, what):
    return f"{kind}-{what}-{next(_seq)}"


def wss(e, path):
    return f"wss://{e.host}:{e.gw.port}{path}"


def open_echo(c, e, cid, protocols=None):
    c.open(cid, wss(e, f"/echo?id={cid}"), protocols)
    return c.wait_open(cid, 30 * S)


def echo(c, cid, data, binary, timeout=30):
    if binary:
        c.send_binary(cid, data)
    else:
        c.send_text(cid, data.decode())
    m = c.next_message(cid, timeout * S)
    assert m["binary"] == binary, (c.name, cid, "binary" if m["binary"] else "text")
    assert len(m["data"]) == len(data) and m["data"] == data, \
        (c.name, cid, len(m["data"]), len(data))
    return m


# ---------------------------------------------------------------- messages
@pytest.mark.parametrize("kind", CLIENTS)
def test_text_binary_fragmented_and_1mib_messages_echo_intact(env, make_client, kind):
    e = env
    c = make_client(kind, e)
    cid = new_id(kind, "echo")
    open_echo(c, e, cid)
    echo(c, cid, "héllo wörld ✓".encode(), binary=False)
    echo(c, cid, bytes(range(256)) * 3, binary=True)
    echo(c, cid, b"", binary=True)
    # fragmented by the client: one message of three fragments at the local API
    if c.can_fragment:
        before = e.api.get("messages", cid)
        parts = [b"\x00\x01" * 5000, b"\xfe" * 3, bytes(range(256)) * 100]
        c.send_fragments(cid, parts, binary=True)
        m = c.next_message(cid, 30 * S)
        assert m["binary"] and m["data"] == b"".join(parts)
        assert e.api.get("messages", cid) == before + 1
        tparts = ["frag-é-".encode(), b"middle ", "end ✓".encode()]
        c.send_fragments(cid, tparts, binary=False)
        m = c.next_message(cid, 30 * S)
        assert not m["binary"] and m["data"] == b"".join(tparts)
    # fragmented by the local API (5 fragments of 70,000 bytes): one message at the client
    c.send_text(cid, "cmd:frag:5:70000")
    m = c.next_message(cid, 30 * S)
    assert m["binary"] and m["data"] == frag_payload(5, 70000), (kind, len(m["data"]))
    # 1 MiB both ways, binary and text
    rnd = random.Random(kind)
    echo(c, cid, rnd.randbytes(MiB), binary=True, timeout=60)
    text = ("".join(rnd.choices(string.ascii_letters + " ", k=MiB - 3)) + "✓").encode()
    assert len(text) == MiB
    echo(c, cid, text, binary=False, timeout=60)
    # several in a row keep their order
    for i in range(20):
        c.send_text(cid, f"n{i}")
    got = [c.next_message(cid, 30 * S)["data"] for _ in range(20)]
    assert got == [f"n{i}".encode() for i in range(20)]
    if kind.startswith("chromium"):
        # which protocol the browser used, as DevTools reports the handshake:
        # HTTP/2 extended CONNECT answers 200, an HTTP/1.1 Upgrade 101
        hs = c.handshake_of(cid)
        want = 200 if kind == "chromium-h2" else 101
        assert hs and hs["status"] == want, hs


@pytest.mark.parametrize("kind", CLIENTS)
def test_ping_pong(env, make_client, kind):
    e = env
    c = make_client(kind, e)
    cid = new_id(kind, "ping")
    open_echo(c, e, cid)
    if c.can_ping:
        t0 = time.monotonic()
        c.ping(cid, b"are-you-there")
        ev = c.wait(cid, "pong", 10 * S)
        assert ev["t"] - t0 < 2 * S
    # the local API pings the client; the client's pong gets back to it
    c.send_text(cid, "cmd:ping")
    m = c.next_message(cid, 15 * S)
    assert m["data"] == b"pong-received"
    echo(c, cid, b"after ping", binary=False)


# ---------------------------------------------------------------- close
@pytest.mark.parametrize("kind", CLIENTS)
def test_client_close_reaches_local_api_within_1s(env, make_client, kind):
    e = env
    c = make_client(kind, e)
    cid = new_id(kind, "cclose")
    open_echo(c, e, cid)
    echo(c, cid, b"x", binary=False)
    assert e.api.get("closed", cid) is None
    t0 = time.monotonic()
    c.close(cid, 4000, "client bye")
    wait_for(lambda: e.api.get("closed", cid), 10 * S, "the local API to see the close")
    dt = e.api.get("closed", cid) - t0
    assert dt < 1.0 * S, f"local API saw the client's close after {dt:.3f}s"
    assert (e.api.get("close_code", cid), e.api.get("close_reason", cid)) == (4000, "client bye")
    ev = c.wait(cid, "close", 10 * S)
    assert ev["t"] - t0 < 1.0 * S, f"client's closing handshake took {ev['t'] - t0:.3f}s"
    assert ev["code"] == 4000
    if kind == "python":
        wait_for(lambda: cid in c.close_durations, 10 * S, "close() to return")
        assert c.close_durations[cid] < 1.0 * S, c.close_durations[cid]


@pytest.mark.parametrize("kind", CLIENTS)
def test_server_close_reaches_client_within_1s(env, make_client, kind):
    e = env
    c = make_client(kind, e)
    cid = new_id(kind, "sclose")
    open_echo(c, e, cid)
    echo(c, cid, b"x", binary=False)
    c.send_text(cid, "cmd:close:4001:server bye")
    ev = c.wait(cid, "close", 10 * S)
    t_server = e.api.get("server_close", cid)
    assert t_server is not None
    dt = ev["t"] - t_server
    assert dt < 1.0 * S, f"client saw the server's close after {dt:.3f}s"
    assert (ev["code"], ev["reason"]) == (4001, "server bye"), ev
    # and the client's reply got back: the local API's closing handshake completed
    wait_for(lambda: e.api.get("closed", cid), 10 * S, "the local API's close to complete")
    assert e.api.get("closed", cid) - t_server < 1.0 * S
    assert e.api.get("close_code", cid) == 4001


@pytest.mark.parametrize("kind", ["python", "node"])
def test_connection_drop_either_side_ends_the_other_within_1s(env, make_client, kind):
    """No close frame at all: the client drops TCP (the local API's connection
    ends), or the local API drops TCP (the client's WebSocket ends, 1006)."""
    e = env
    c = make_client(kind, e)
    cid = new_id(kind, "cdrop")
    open_echo(c, e, cid)
    echo(c, cid, b"x", binary=False)
    t0 = time.monotonic()
    c.terminate(cid)
    wait_for(lambda: e.api.get("closed", cid), 10 * S, "the local API to see the drop")
    assert e.api.get("closed", cid) - t0 < 1.0 * S
    assert e.api.get("close_code", cid) == 1006

    cid = new_id(kind, "sdrop")
    open_echo(c, e, cid)
    echo(c, cid, b"x", binary=False)
    c.send_text(cid, "cmd:abort")
    ev = c.wait(cid, "close", 10 * S)
    dt = ev["t"] - e.api.get("server_close", cid)
    assert dt < 1.0 * S, f"client saw the local API's drop after {dt:.3f}s"
    assert ev["code"] == 1006, ev


# ---------------------------------------------------------------- refusal
@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("status", [403, 404])
def test_local_refusal_reaches_client(env, make_client, kind, status):
    e = env
    c = make_client(kind, e)
    cid = new_id(kind, f"refuse{status}")
    c.open(cid, wss(e, f"/refuse?status={status}&id={cid}"))
    if kind.startswith("chromium"):
        ev = c.wait(cid, "close", 30 * S)
        assert ev["code"] == 1006 and c.events.find(
            lambda x: x["id"] == cid and x["ev"] == "open") is None
        wait_for(lambda: any(c.refusal_of(cid)), 10 * S, "DevTools handshake events")
        st, err = c.refusal_of(cid)
        assert st == status or f"Unexpected response code: {status}" in err, (st, err)
    else:
        ev = c.events.wait(lambda x: x["id"] == cid and x["ev"] in ("open", "refused", "error"),
                           30 * S, f"refusal of {cid}")
        assert ev["ev"] == "refused", ev
        assert ev["status"] == status
        if c.refusal_body:
            assert ev["body"] == REFUSE_BODY
            assert ev["headers"].get("x-refused-by") == "local-api", ev["headers"]
    assert e.api.requests_for(f"/refuse?status={status}&id={cid}")


def raw_tls(e, host=None):
    ctx = ssl.create_default_context(cafile=str(e.gw.ca))
    ctx.set_alpn_protocols(["http/1.1"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", e.gw.port), timeout=30 * S),
                        server_hostname=host or e.host)
    return s


def read_response(s, limit=1 << 20):
    """Reads an HTTP/1.1 response head and its Content-Length body."""
    buf = b""
    deadline = time.monotonic() + 30 * S
    while b"\r\n\r\n" not in buf:
        assert time.monotonic() < deadline and len(buf) < limit
        d = s.recv(65536)
        if not d:
            break
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        hdrs.setdefault(k.strip().lower(), []).append(v.strip())
    n = int(hdrs.get("content-length", ["0"])[0])
    while len(body) < n:
        assert time.monotonic() < deadline
        d = s.recv(65536)
        if not d:
            break
        body += d
    return status, hdrs, body


def test_refusal_status_headers_and_body_unchanged_raw_h1(env):
    """What the local API answered instead of 101 reaches an HTTP/1.1 client
    byte for byte: status, its headers, its body."""
    e = env
    with raw_tls(e) as s:
        s.sendall((f"GET /refuse?status=403&id=raw HTTP/1.1\r\nHost: {e.host}:{e.gw.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        status, hdrs, body = read_response(s)
    assert status == 403, (status, hdrs, body)
    assert body == REFUSE_BODY
    assert hdrs.get("x-refused-by") == ["local-api"]
    assert "sec-websocket-accept" not in hdrs


def test_2xx_without_upgrade_is_not_an_open_websocket(env):
    """A local API that answers the upgrade 200 (no 101) has not accepted a
    WebSocket: an HTTP/1.1 client gets 502, not 101, and an HTTP/2 client's
    extended CONNECT gets 502, not the 200 that would open it (RFC 8441 5)."""
    e = env
    with raw_tls(e) as s:
        s.sendall((f"GET /refuse?status=200&id=ok1 HTTP/1.1\r\nHost: {e.host}:{e.gw.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        status, hdrs, body = read_response(s)
    assert status == 502, (status, hdrs, body)
    assert "sec-websocket-accept" not in hdrs
    import h2.config
    import h2.connection
    import h2.events
    ctx = ssl.create_default_context(cafile=str(e.gw.ca))
    ctx.set_alpn_protocols(["h2"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", e.gw.port), timeout=30 * S),
                         server_hostname=e.host) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        while not conn.remote_settings.enable_connect_protocol:
            conn.receive_data(s.recv(65536))
            s.sendall(conn.data_to_send())
        conn.send_headers(1, [(":method", "CONNECT"), (":protocol", "websocket"),
                              (":scheme", "https"), (":path", "/refuse?status=200&id=ok2"),
                              (":authority", f"{e.host}:{e.gw.port}"),
                              ("sec-websocket-version", "13")])
        s.sendall(conn.data_to_send())
        status = None
        deadline = time.monotonic() + 30 * S
        while status is None and time.monotonic() < deadline:
            for ev in conn.receive_data(s.recv(65536)):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
            s.sendall(conn.data_to_send())
    assert status == b"502", status
    assert e.api.requests_for("/refuse?status=200&id=ok2")


def test_101_accept_is_for_the_clients_key_raw_h1(env):
    import base64
    e = env
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    with raw_tls(e) as s:
        s.sendall((f"GET /echo?id=raw101 HTTP/1.1\r\nHost: {e.host}:{e.gw.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        deadline = time.monotonic() + 30 * S
        while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
            d = s.recv(4096)
            if not d:
                break
            buf += d
        head = buf.split(b"\r\n\r\n")[0].decode("latin-1")
        assert head.startswith("HTTP/1.1 101"), head
        want = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        accept = re.findall(r"(?im)^sec-websocket-accept:\s*(\S+)", head)
        assert accept == [want], head
        assert re.search(r"(?im)^upgrade:\s*websocket", head) and \
            re.search(r"(?im)^connection:\s*upgrade", head), head
    wait_for(lambda: e.api.get("closed", "raw101"), 10 * S, "the local API to see the drop")


# ---------------------------------------------------------------- negotiation
@pytest.mark.parametrize("kind", CLIENTS)
def test_subprotocol_and_extension_negotiation_pass_through(env, make_client, kind):
    e = env
    c = make_client(kind, e)
    cid = new_id(kind, "proto")
    ev = open_echo(c, e, cid, protocols=["chat.v1.example", "chat.v2.example"])
    # the local API supports only chat.v2.example: it picked the client's second offer
    assert ev["protocol"] == "chat.v2.example", ev
    # permessage-deflate, offered by every one of these clients and accepted by the
    # local API, negotiated end to end
    assert "permessage-deflate" in ev["extensions"], ev
    c.send_text(cid, "cmd:headers")
    j = json.loads(c.next_message(cid, 15 * S)["data"])
    hd = j["headers"]
    assert j["subprotocol"] == "chat.v2.example"
    offered = [p.strip() for v in hd.get("sec-websocket-protocol", []) for p in v.split(",")]
    assert offered == ["chat.v1.example", "chat.v2.example"], hd
    assert "permessage-deflate" in ",".join(hd.get("sec-websocket-extensions", [])), hd
    assert hd["x-forwarded-proto"] == ["https"]
    assert hd["x-agent-address"] == [e.addr]
    assert hd["x-tunnel-origin"] == ["public"]
    assert hd["x-forwarded-for"] == ["127.0.0.1"]
    assert len(hd.get("sec-websocket-key", [])) == 1
    # compressed frames (deflate on) still echo intact
    echo(c, cid, b"z" * 200000, binary=True)
    # no offer: no protocol
    cid2 = new_id(kind, "noproto")
    ev = open_echo(c, e, cid2)
    assert ev["protocol"] == ""


# ---------------------------------------------------------------- idleness
@pytest.mark.parametrize("kind", CLIENTS)
def test_quiet_websocket_outlives_stream_idle_timeout(idle_env, make_client, kind):
    """The gateway runs with --stream-idle-timeout 2; a WebSocket quiet for 5 s
    is still open and echoes afterwards."""
    e = idle_env
    c = make_client(kind, e)
    cid = new_id(kind, "quiet")
    open_echo(c, e, cid)
    echo(c, cid, b"before", binary=False)
    # the quiet itself is what is tested here: nothing is sent for 2.5x the timeout
    time.sleep(5)
    assert c.events.find(lambda x: x["id"] == cid and x["ev"] == "close") is None, \
        "the WebSocket was closed while quiet"
    assert e.api.get("closed", cid) is None
    echo(c, cid, b"after", binary=False)
    echo(c, cid, os.urandom(100000), binary=True)


def test_stream_idle_timeout_is_in_force_for_request_bodies(idle_env):
    """Control for the test above: the same gateway does end a request body
    that stalls (so the WebSocket's survival is not an accident)."""
    e = idle_env
    with raw_tls(e) as s:
        s.sendall((f"GET /hold HTTP/1.1\r\nHost: {e.host}:{e.gw.port}\r\n"
                   "Content-Length: 1000\r\n\r\nabc").encode())
        t0 = time.monotonic()
        try:
            got = s.recv(65536)   # a response or the close, whichever the gateway does
        except (ConnectionError, ssl.SSLError):
            got = b""
        dt = time.monotonic() - t0
    assert b"held" not in got, got
    assert 1.5 <= dt < 10 * S, dt


# ---------------------------------------------------------------- many, slow
def test_100_concurrent_websockets_on_one_tunnel_echo(env):
    e = env
    c = PyClient(e.gw.ca)
    try:
        ids = [f"conc-{i}" for i in range(100)]
        for cid in ids:
            c.open(cid, wss(e, f"/echo?id={cid}"))
        for cid in ids:
            c.wait_open(cid, 60 * S)
        rnd = random.Random(100)
        expect = {}
        for cid in ids:
            msgs = [(True, rnd.randbytes(rnd.randrange(0, 65536))),
                    (False, f"text for {cid}".encode()),
                    (True, rnd.randbytes(rnd.randrange(0, 300000)))]
            expect[cid] = msgs
            for binary, d in msgs:
                (c.send_binary if binary else lambda i, x: c.send_text(i, x.decode()))(cid, d)
        for cid in ids:
            for binary, d in expect[cid]:
                m = c.next_message(cid, 60 * S)
                assert (m["binary"], len(m["data"]), m["data"] == d) == (binary, len(d), True), cid
        assert all(e.api.get("opened", cid) for cid in ids)
    finally:
        c.stop()


def sample_rss(procs, stop, peaks):
    while not stop.is_set():
        for i, p in enumerate(procs):
            try:
                peaks[i] = max(peaks[i], p.rss_kib())
            except (FileNotFoundError, ProcessLookupError):
                pass
        time.sleep(0.05)


def test_stopped_reader_does_not_stall_others_or_grow_memory(env):
    """A client that stops reading while the local API floods it: the flood is
    held back (flow control end to end), other WebSockets on the same tunnel
    keep echoing at speed, and neither gateway nor agent buffers the flood."""
    e = env
    c = PyClient(e.gw.ca)
    procs = [e.gw, e.agent.proc]
    try:
        # warm up (connections, TLS, pools) before the memory baseline
        open_echo(c, e, "warm")
        echo(c, "warm", os.urandom(MiB), binary=True)
        base = [p.rss_kib() for p in procs]
        peaks = list(base)
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(procs, stop, peaks))
        sampler.start()
        try:
            c.open("stall", wss(e, "/flood?id=stall"), max_queue=1)
            c.wait_open("stall", 30 * S)
            c.next_message("stall", 30 * S)
            c.pause("stall")
            # the flood stops once every buffer on the way is full
            last = [-1, time.monotonic()]

            def settled():
                n = e.api.get("flood_sent", "stall")
                now = time.monotonic()
                if n != last[0]:
                    last[:] = [n, now]
                    return False
                return now - last[1] >= 1.5
            wait_for(settled, 60 * S, "the flood to be held back (back-pressure)", interval=0.1)
            held = e.api.get("flood_sent", "stall")
            assert held < 96 * MiB, f"local API sent {held / MiB:.1f} MiB to a stopped reader"
            # others on the same tunnel: a connection that was open before, and new ones
            t0 = time.monotonic()
            echo(c, "warm", os.urandom(MiB), binary=True, timeout=10)
            for i in range(5):
                cid = f"beside-{i}"
                open_echo(c, e, cid)
                echo(c, cid, os.urandom(MiB), binary=True, timeout=10)
            assert time.monotonic() - t0 < 15 * S
            # the flood is still held: nothing got through to the stopped reader meanwhile
            assert e.api.get("flood_sent", "stall") - held < 4 * MiB
        finally:
            stop.set()
            sampler.join()
        growth = [(pk - b) / 1024 for pk, b in zip(peaks, base)]
        print(f"held {held / MiB:.1f} MiB; RSS growth MiB gateway/agent: {growth}")
        if not SANITIZED:
            assert max(growth) <= 16, f"RSS growth MiB gateway/agent: {growth}"
    finally:
        c.stop()


def wait_flood_held(e, cid):
    last = [-1, time.monotonic()]

    def settled():
        n = e.api.get("flood_sent", cid)
        now = time.monotonic()
        if n != last[0]:
            last[:] = [n, now]
            return False
        return bool(n) and now - last[1] >= 1.0
    wait_for(settled, 60 * S, f"the flood {cid} to be held back", interval=0.1)


def h2_stalled_flood(e, cid):
    """An HTTP/2 client (python-h2, RFC 8441) that opens /flood and never
    reads: its windows are huge, so what holds the flood is TCP back-pressure."""
    import h2.config
    import h2.connection
    import h2.settings
    ctx = ssl.create_default_context(cafile=str(e.gw.ca))
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", e.gw.port), timeout=30 * S),
                        server_hostname=e.host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    s.sendall(conn.data_to_send())
    for _ in range(10):
        if conn.remote_settings.enable_connect_protocol:
            break
        conn.receive_data(s.recv(65536))
        s.sendall(conn.data_to_send())
    assert conn.remote_settings.enable_connect_protocol, "no SETTINGS_ENABLE_CONNECT_PROTOCOL"
    conn.send_headers(1, [(":method", "CONNECT"), (":protocol", "websocket"),
                          (":scheme", "https"), (":path", f"/flood?id={cid}"),
                          (":authority", f"{e.host}:{e.gw.port}"),
                          ("sec-websocket-version", "13")])
    s.sendall(conn.data_to_send())
    return s


@pytest.mark.parametrize("front", ["http1-python", "http2-raw"])
def test_stopped_reader_that_leaves_ends_the_local_websocket(env, front):
    """A client whose WebSocket is held back (it stopped reading, every buffer
    on the way is full) and then disconnects: the local API's connection
    ends promptly, as it does for a client that was reading."""
    e = env
    cid = f"leave-{front}"
    c = None
    if front == "http1-python":
        c = PyClient(e.gw.ca)
        c.open(cid, wss(e, f"/flood?id={cid}"), max_queue=1)
        c.wait_open(cid, 30 * S)
        c.next_message(cid, 30 * S)
        c.pause(cid)
    else:
        s = h2_stalled_flood(e, cid)
    try:
        wait_flood_held(e, cid)
        assert e.api.get("closed", cid) is None
        t0 = time.monotonic()
        if c is not None:
            c.terminate(cid)
        else:
            s.close()
        wait_for(lambda: e.api.get("closed", cid), 10 * S,
                 f"the local API's connection of {cid} to end after the client left")
        assert e.api.get("closed", cid) - t0 < 1.0 * S
    finally:
        if c is not None:
            c.stop()


# ---------------------------------------------------------------- other upgrades
def test_upgrade_foo_gets_501_unsupported_upgrade(env):
    e = env
    with raw_tls(e) as s:
        s.sendall((f"GET /echo?id=foo HTTP/1.1\r\nHost: {e.host}:{e.gw.port}\r\n"
                   "Upgrade: foo\r\nConnection: Upgrade\r\n\r\n").encode())
        status, hdrs, body = read_response(s)
    assert status == 501, (status, body)
    assert json.loads(body)["error"] == "unsupported_upgrade", body
    assert hdrs["content-type"][0].startswith("application/json")
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(e.gw.ca),
                        "--connect-to", "::127.0.0.1:", "-H", "Upgrade: foo/2",
                        "-H", "Connection: Upgrade", "-w", "\n%{http_code}",
                        f"{e.base}/echo?id=foo2"], capture_output=True, text=True, timeout=30 * S)
    body, _, code = r.stdout.rpartition("\n")
    assert code == "501" and json.loads(body)["error"] == "unsupported_upgrade", r.stdout
    assert not e.api.requests_for("/echo?id=foo")


def test_upgrade_h2c_is_served_as_plain_http1(env):
    e = env
    assert e.plain_port, "the gateway did not report its --plain-listen port"
    # curl --http2 on cleartext sends Upgrade: h2c + HTTP2-Settings
    r = subprocess.run(["curl", "-sS", "-v", "--http2", "--connect-to", "::127.0.0.1:",
                        "-w", "\n%{http_code} %{http_version}",
                        f"http://{e.host}:{e.plain_port}/plain"],
                       capture_output=True, text=True, timeout=30 * S)
    assert "Upgrade: h2c" in r.stderr, r.stderr    # it did offer the upgrade
    body, _, tail = r.stdout.rpartition("\n")
    assert tail == "200 1.1", (tail, body, r.stderr[-2000:])
    hd = json.loads(body)["headers"]
    assert "upgrade" not in hd and "http2-settings" not in hd, hd
    assert hd["x-forwarded-proto"] == ["http"]
    # the same on the TLS listener with a raw socket
    with raw_tls(e) as s:
        s.sendall((f"GET /plain HTTP/1.1\r\nHost: {e.host}:{e.gw.port}\r\n"
                   "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n").encode())
        status, hdrs, body = read_response(s)
    assert status == 200, (status, body)
    hd = json.loads(body)["headers"]
    assert "upgrade" not in hd and "http2-settings" not in hd, hd


def test_websocket_on_the_plain_listener(env):
    e = env
    assert e.plain_port
    c = PyClient(None)
    try:
        cid = "plain-ws"
        c.open(cid, f"ws://{e.host}:{e.plain_port}/echo?id={cid}")
        c.wait_open(cid, 30 * S)
        echo(c, cid, os.urandom(300000), binary=True)
        c.send_text(cid, "cmd:headers")
        hd = json.loads(c.next_message(cid, 15 * S)["data"])["headers"]
        assert hd["x-forwarded-proto"] == ["http"]
    finally:
        c.stop()
