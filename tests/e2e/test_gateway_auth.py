"""Tunnel authentication at the gateway, driven by an independent client:
python3-websockets for the WebSocket and tests/vectors/eip191_ref.py (ecdsa +
pycryptodome) for EIP-191. Covers native and Osaurus modes, every refusal the
spec names, takeover (replaced / superseded), and garbage after the upgrade."""

import asyncio
import json
import secrets
import socket
import subprocess
import ssl
import time
import urllib.request

import pytest
import websockets

from tunnel_env import TIME_SCALE, Gateway, eip191_ref

NATIVE = "tunnel-h2.v1"


@pytest.fixture
def gw(build_dir, tmp_path):
    g = Gateway(build_dir, tmp_path)
    yield g
    rc = g.stop()
    assert rc == 0, g.text()[-2000:]


def new_key():
    d = secrets.randbelow(eip191_ref.N - 1) + 1
    addr = "0x" + eip191_ref.address_from_priv(d).hex()
    return d, addr


def native_text(domain, addr, nonce, ts):
    return f"tunnel-gateway:v1:{domain}:{addr.lower()}:{nonce}:{ts}".encode()


def sign(d, text):
    return "0x" + eip191_ref.sign(d, text).hex()


async def connect(gw, subprotocols=(NATIVE,)):
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    return await websockets.connect(f"wss://localhost:{gw.port}/tunnel/connect", ssl=ctx,
                                    subprotocols=list(subprotocols) or None, max_size=None,
                                    open_timeout=5, close_timeout=5)


async def recv_json(ws, timeout=5):
    """The next text message; binary ones (the native tunnel's HTTP/2) are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        m = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(m, str):
            return json.loads(m)


async def wait_closed(ws, timeout=5):
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except websockets.ConnectionClosed:
        pass
    return ws.close_code


def auth_frame(gw, keys, nonce, ts=None, instance="test-instance-1", domain=None, mutate=None):
    ts = int(time.time()) if ts is None else ts
    agents = []
    for d, addr in keys:
        sig = sign(d, native_text(domain or gw.domain, addr, nonce, ts))
        if mutate:
            sig = mutate(sig)
        agents.append({"address": addr, "signature": sig})
    return {"type": "auth", "nonce": nonce, "timestamp": ts, "instance": instance,
            "agents": agents}


def health(gw):
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    with urllib.request.urlopen(f"https://localhost:{gw.port}/health", context=ctx, timeout=5) as r:
        return json.loads(r.read())


def stats(gw):
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    with urllib.request.urlopen(f"https://localhost:{gw.port}/stats", context=ctx, timeout=5) as r:
        return json.loads(r.read())


def node_host():
    """The default --node-id's host part: the host name, cut to the allowed characters."""
    name = socket.gethostname()
    return "".join(ch for ch in name if ch.isascii() and (ch.isalnum() or ch in "._:-"))[:48] \
        or "gateway"


def run(coro):
    return asyncio.run(coro)


def test_native_auth_ok(gw):
    async def go():
        ws = await connect(gw)
        assert ws.subprotocol == NATIVE
        ch = await recv_json(ws)
        assert ch["type"] == "challenge" and len(ch["nonce"]) == 64 and ch["expires_in"] == 30
        k1, k2 = new_key(), new_key()
        await ws.send(json.dumps(auth_frame(gw, [k1, k2], ch["nonce"])))
        ok = await recv_json(ws)
        assert ok["type"] == "auth_ok", ok
        assert [a["address"] for a in ok["agents"]] == [k1[1], k2[1]]
        assert ok["agents"][0]["url"] == f"https://{k1[1]}.localhost:{gw.port}"
        assert ok["rejected"] == [] and ok["ping_interval"] == 20
        h = health(gw)
        assert h == {"status": "ok", "tunnels": 1, "agents": 2, "region": "local",
                     "machine": f"{node_host()}:{gw.port}"}
        await ws.close()
    run(go())


@pytest.mark.parametrize("case,code,close", [
    ("bad_signature", "signature_verification_failed", 4001),
    ("other_domain", "signature_verification_failed", 4001),
    ("stale_timestamp", "timestamp_out_of_range", 4000),
    ("future_timestamp", "timestamp_out_of_range", 4000),
    ("wrong_nonce", "invalid_nonce", 4000),
    ("no_agents", "no_agents", 4000),
    ("not_json", "invalid_json", 4000),
    ("wrong_type", "expected_auth_frame", 4000),
])
def test_native_auth_refused(gw, case, code, close):
    async def go():
        ws = await connect(gw)
        ch = await recv_json(ws)
        k = new_key()
        nonce = ch["nonce"]
        if case == "bad_signature":
            # a valid signature by another key for this address
            other = new_key()
            f = auth_frame(gw, [k], nonce)
            f["agents"][0]["signature"] = sign(other[0], native_text(gw.domain, k[1], nonce, f["timestamp"]))
        elif case == "other_domain":
            f = auth_frame(gw, [k], nonce, domain="gateway.example.com")
        elif case == "stale_timestamp":
            f = auth_frame(gw, [k], nonce, ts=int(time.time()) - 120)
        elif case == "future_timestamp":
            f = auth_frame(gw, [k], nonce, ts=int(time.time()) + 120)
        elif case == "wrong_nonce":
            f = auth_frame(gw, [k], secrets.token_hex(32))
        elif case == "no_agents":
            f = auth_frame(gw, [], nonce)
        elif case == "wrong_type":
            f = {"type": "add_agent", "nonce": nonce}
        if case == "not_json":
            await ws.send("{this is not json")
        else:
            await ws.send(json.dumps(f))
        err = await recv_json(ws)
        assert err["type"] == "auth_error" and err["error"] == code, err
        assert err["message"]
        assert await wait_closed(ws) == close
        assert health(gw)["tunnels"] == 0
    run(go())


def test_replayed_nonce_refused(gw):
    """A nonce is bound to its connection and single use."""
    async def go():
        a = await connect(gw)
        ch = await recv_json(a)
        k = new_key()
        frame = auth_frame(gw, [k], ch["nonce"])
        await a.send(json.dumps(frame))
        assert (await recv_json(a))["type"] == "auth_ok"
        # the same signed frame on a second connection
        b = await connect(gw)
        await recv_json(b)
        await b.send(json.dumps(frame))
        err = await recv_json(b)
        assert err["error"] == "invalid_nonce"
        assert await wait_closed(b) == 4000
        # and a fresh challenge on the live tunnel cannot be used twice
        await a.send(json.dumps({"type": "request_challenge"}))
        ch2 = await recv_json(a)
        k2 = new_key()
        ts = int(time.time())
        add = {"type": "add_agent", "address": k2[1], "nonce": ch2["nonce"], "timestamp": ts,
               "signature": sign(k2[0], native_text(gw.domain, k2[1], ch2["nonce"], ts))}
        await a.send(json.dumps(add))
        added = await recv_json(a)
        assert added["type"] == "agent_added" and added["address"] == k2[1]
        await a.send(json.dumps(add))
        again = await recv_json(a)
        assert (again["type"], again["error"], again["address"]) == ("error", "invalid_nonce", k2[1])
        assert health(gw)["agents"] == 2
        await a.send(json.dumps({"type": "remove_agent", "address": k2[1]}))
        rm = await recv_json(a)
        assert rm == {"type": "agent_removed", "address": k2[1], "reason": "removed"}
        assert health(gw)["agents"] == 1
        await a.close()
    run(go())


def test_takeover_replaced_and_superseded(gw):
    async def go():
        k = new_key()
        takeovers = stats(gw)["total_takeovers"]
        a = await connect(gw)
        ch = await recv_json(a)
        await a.send(json.dumps(auth_frame(gw, [k], ch["nonce"], instance="instance-aaaa")))
        assert (await recv_json(a))["type"] == "auth_ok"
        # same instance: a reconnect replaces silently (reason "replaced")
        b = await connect(gw)
        ch = await recv_json(b)
        await b.send(json.dumps(auth_frame(gw, [k], ch["nonce"], instance="instance-aaaa")))
        assert (await recv_json(b))["type"] == "auth_ok"
        msg = await recv_json(a)
        assert msg == {"type": "agent_removed", "address": k[1], "reason": "replaced"}
        assert await wait_closed(a) == 1000
        # another instance: the older tunnel is told it was superseded
        c = await connect(gw)
        ch = await recv_json(c)
        await c.send(json.dumps(auth_frame(gw, [k], ch["nonce"], instance="instance-bbbb")))
        assert (await recv_json(c))["type"] == "auth_ok"
        msg = await recv_json(b)
        assert msg == {"type": "agent_removed", "address": k[1], "reason": "superseded"}
        assert await wait_closed(b) == 1000
        h = health(gw)
        assert (h["status"], h["tunnels"], h["agents"]) == ("ok", 1, 1)
        # the same instance coming back is not a takeover; another one is
        assert stats(gw)["total_takeovers"] == takeovers + 1
        await c.close()
    run(go())


def test_osaurus_auth_ok_and_all_or_nothing(gw):
    async def go():
        k1, k2 = new_key(), new_key()
        ws = await connect(gw, subprotocols=())
        assert ws.subprotocol is None
        ch = await recv_json(ws)
        ts = int(time.time())
        agents = []
        for d, addr in (k1, k2):
            cs = eip191_ref.to_checksum(bytes.fromhex(addr[2:]))
            text = f"osaurus-tunnel:{cs}:{ch['nonce']}:{ts}".encode()
            agents.append({"address": cs, "signature": sign(d, text)})
        await ws.send(json.dumps({"type": "auth", "agents": agents, "nonce": ch["nonce"],
                                  "timestamp": ts}))
        ok = await recv_json(ws)
        assert ok["type"] == "auth_ok"
        assert [a["address"] for a in ok["agents"]] == [k1[1], k2[1]]
        assert "rejected" not in ok and "ping_interval" not in ok
        await ws.close()

        # one bad signature fails the whole frame
        ws = await connect(gw, subprotocols=())
        ch = await recv_json(ws)
        ts = int(time.time())
        good = {"address": k1[1], "signature": sign(k1[0], f"osaurus-tunnel:{k1[1]}:{ch['nonce']}:{ts}".encode())}
        bad = {"address": k2[1], "signature": sign(k1[0], f"osaurus-tunnel:{k2[1]}:{ch['nonce']}:{ts}".encode())}
        await ws.send(json.dumps({"type": "auth", "agents": [good, bad], "nonce": ch["nonce"],
                                  "timestamp": ts}))
        err = await recv_json(ws)
        assert err["type"] == "auth_error" and err["error"] == "signature_verification_failed"
        assert await wait_closed(ws) == 4001
        assert health(gw)["agents"] == 0
    run(go())


def test_auth_timeout(gw):
    async def go():
        ws = await connect(gw)
        await recv_json(ws)
        t0 = time.monotonic()
        err = await recv_json(ws, timeout=15)
        assert err["error"] == "auth_timeout"
        assert 9 <= time.monotonic() - t0 <= 10 + 3 * TIME_SCALE
        assert await wait_closed(ws) == 4001
    run(go())


def test_garbage_after_upgrade_closes_tunnel_only(gw):
    import socket
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(b"GET /tunnel/connect HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tunnel-h2.v1\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head  # RFC 6455 1.3
    # not WebSocket frames: RSV bits with no extension, unmasked, then noise
    s.sendall(bytes([0xF2, 0x7E]) + secrets.token_bytes(4094))
    s.settimeout(5)
    got = head.split(b"\r\n\r\n", 1)[1]  # frames that came with the 101
    try:
        while True:
            c = s.recv(4096)
            if not c:
                break
            got += c
    except (ssl.SSLError, ConnectionResetError):
        pass
    s.close()
    # what the gateway sent: the challenge, then a close 1002 (RFC 6455 5.2:
    # RSV bits without an extension fail the connection), then nothing
    frames = []
    while got:
        assert len(got) >= 2, got
        n, off = got[1] & 0x7F, 2
        if n == 126:
            n, off = int.from_bytes(got[2:4], "big"), 4
        elif n == 127:
            n, off = int.from_bytes(got[2:10], "big"), 10
        assert not got[1] & 0x80, "a server frame is never masked"
        frames.append((got[0] & 0x0F, got[off:off + n]))
        got = got[off + n:]
    assert [op for op, _ in frames] == [1, 8], frames
    assert json.loads(frames[0][1])["type"] == "challenge"
    assert int.from_bytes(frames[1][1][:2], "big") == 1002, frames[1]
    # the gateway is unharmed
    assert health(gw)["status"] == "ok"


def raw_request(gw, head):
    import socket
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=5),
                        server_hostname="localhost")
    s.sendall(head)
    data = b""
    try:
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
    except (socket.timeout, ssl.SSLError, ConnectionResetError):
        pass
    s.close()
    return data


def test_plain_get_and_unsupported_subprotocol(gw):
    ws_head = (b"GET /tunnel/connect HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n")
    r = raw_request(gw, ws_head + b"Sec-WebSocket-Protocol: chat, other\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 400"), r[:200]
    assert json.loads(r.split(b"\r\n\r\n", 1)[1])["error"] == "unsupported_protocol"
    r = raw_request(gw, b"GET /tunnel/connect HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 400"), r[:200]
    assert json.loads(r.split(b"\r\n\r\n", 1)[1])["error"] == "websocket_required"
    # a bad Sec-WebSocket-Key is refused before the upgrade
    r = raw_request(gw, ws_head.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short") + b"\r\n")
    assert r.startswith(b"HTTP/1.1 400"), r[:200]


def test_per_ip_limits(build_dir, tmp_path):
    import socket
    ws_head = (b"GET /tunnel/connect HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tunnel-h2.v1\r\n\r\n")

    def tls_conn(g):
        ctx = ssl.create_default_context(cafile=str(g.ca))
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port), timeout=5),
                               server_hostname="localhost")

    def upgrade(g):
        s = tls_conn(g)
        s.sendall(ws_head)
        head = b""
        while b"\r\n\r\n" not in head:
            c = s.recv(4096)
            if not c:
                break
            head += c
        return s, head

    # max-conns-per-ip: the third connection is answered 429 and closed
    g = Gateway(build_dir, tmp_path, "--max-conns-per-ip", "2", name="gw-conns")
    try:
        a, b = tls_conn(g), tls_conn(g)
        r = raw_request(g, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 429"), r[:100]
        assert json.loads(r.split(b"\r\n\r\n", 1)[1])["error"] == "too_many_connections"
        # an h2 client gets the same 429 (then GOAWAY), not a bare close
        for _ in range(2):
            c = subprocess.run(["curl", "-sS", "--http2", "--cacert", str(g.ca), "-w",
                                "\n%{http_code} %{http_version}",
                                f"https://localhost:{g.port}/health"],
                               capture_output=True, timeout=30)
            assert c.returncode == 0, c.stderr
            body, code = c.stdout.rsplit(b"\n", 1)
            assert code == b"429 2", c.stdout
            assert json.loads(body)["error"] == "too_many_connections"
        # the refused connections held no slot: still two taken, a third refused
        r = raw_request(g, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 429"), r[:100]
        a.close()
        b.close()
        wait = time.monotonic() + 5
        while time.monotonic() < wait:
            r = raw_request(g, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            if r.startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.1)
        assert r.startswith(b"HTTP/1.1 200"), r[:100]
    finally:
        assert g.stop() == 0

    # max-tunnels-per-ip: a second open tunnel is refused while the first lives
    g = Gateway(build_dir, tmp_path, "--max-tunnels-per-ip", "1", name="gw-tuns")
    try:
        s1, h1 = upgrade(g)
        assert h1.startswith(b"HTTP/1.1 101"), h1
        s2, h2 = upgrade(g)
        assert h2.startswith(b"HTTP/1.1 429") and b"too_many_connections" in h2 + s2.recv(4096)
        s2.close()
        s1.close()
    finally:
        assert g.stop() == 0

    # tunnel-connects-per-ip-per-min: the third upgrade in a minute is refused
    g = Gateway(build_dir, tmp_path, "--tunnel-connects-per-ip-per-min", "2", name="gw-rate")
    try:
        socks = []
        for i in range(2):
            s, h = upgrade(g)
            assert h.startswith(b"HTTP/1.1 101"), h
            s.close()
        s, h = upgrade(g)
        assert h.startswith(b"HTTP/1.1 429")
        assert b"rate_limited" in h + s.recv(4096)
        s.close()
    finally:
        assert g.stop() == 0
