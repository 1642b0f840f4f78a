"""Osaurus mode end to end: a relay client written only from
/work/shared/ANCHORS.md (python3-websockets, no subprotocol, EIP-55 address,
`osaurus-tunnel:` signed text via tests/vectors/eip191_ref.py) serves requests
that curl (HTTP/1.1 and HTTP/2) sends to the real gateway. Asserts the frames
the client sees and the statuses, headers and bytes curl gets."""

import asyncio
import base64
import json
import os
import re
import secrets
import signal
import socket
import ssl
import time
import urllib.request

import pytest
import websockets

from tunnel_env import TIME_SCALE, Gateway, eip191_ref

MiB = 1 << 20
HTTP = ["--http1.1", "--http2"]
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture
def gw(build_dir, tmp_path):
    g = Gateway(build_dir, tmp_path)
    yield g
    assert g.stop() == 0, g.text()[-2000:]


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class OsrClient:
    """A relay client as ANCHORS.md describes one: connect to /tunnel/connect
    without a subprotocol, sign `osaurus-tunnel:<EIP-55 address>:<nonce>:<ts>`,
    answer `ping` with `pong`, take `request`/`cancel` frames."""

    def __init__(self, gw, features=None, answer_pings=True, key=None):
        self.gw = gw
        self.key = key  # a private key (int) to sign with; None: a fresh one
        self.features = features
        self.answer_pings = answer_pings
        self.frames = asyncio.Queue()
        self.pings = []
        self.closed = asyncio.Event()
        self.close_code = None

    async def open(self):
        ctx = ssl.create_default_context(cafile=str(self.gw.ca))
        self.ws = await websockets.connect(f"wss://localhost:{self.gw.port}/tunnel/connect",
                                           ssl=ctx, max_size=None, open_timeout=5,
                                           close_timeout=5, ping_interval=None)
        assert self.ws.subprotocol is None
        ch = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        assert ch["type"] == "challenge" and re.fullmatch(r"[0-9a-f]{64}", ch["nonce"])
        while True:  # an address whose EIP-55 form has upper case, as the app sends it
            d = self.key or secrets.randbelow(eip191_ref.N - 1) + 1
            raw = eip191_ref.address_from_priv(d)
            checksum = eip191_ref.to_checksum(raw)
            if checksum != checksum.lower() or self.key:
                break
        ts = int(time.time())
        sig = eip191_ref.sign(d, f"osaurus-tunnel:{checksum}:{ch['nonce']}:{ts}".encode())
        auth = {"type": "auth", "agents": [{"address": checksum, "signature": "0x" + sig.hex()}],
                "nonce": ch["nonce"], "timestamp": ts}
        if self.features is not None:
            auth["features"] = self.features
        await self.ws.send(json.dumps(auth))
        ok = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        assert ok["type"] == "auth_ok", ok
        self.addr = "0x" + raw.hex()
        assert ok["agents"][0]["address"] == self.addr
        self.host = f"{self.addr}.localhost"
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self):
        try:
            async for m in self.ws:
                if not isinstance(m, str):
                    continue
                f = json.loads(m)
                f["_t"] = time.monotonic()
                if f["type"] == "ping":
                    self.pings.append(f)
                    if self.answer_pings:
                        await self.ws.send(json.dumps({"type": "pong", "ts": f["ts"]}))
                    continue
                await self.frames.put(f)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()

    async def next(self, type=None, timeout=5):
        f = await asyncio.wait_for(self.frames.get(), timeout)
        if type is not None:
            assert f["type"] == type, f
        return f

    async def expect_nothing(self, secs=0.5):
        try:
            f = await asyncio.wait_for(self.frames.get(), secs)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected frame {f}")

    async def send(self, f):
        await self.ws.send(json.dumps(f))

    async def wait_closed(self, timeout=10):
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    async def close(self):
        await self.ws.close()
        self.reader.cancel()


def masked_text(f):
    """f as one masked WebSocket text frame (RFC 6455 5.2), for writing
    several frames in one TLS record past the library."""
    p = json.dumps(f).encode()
    assert len(p) < 65536
    key = secrets.token_bytes(4)
    head = bytes([0x81, 0x80 | len(p)]) if len(p) < 126 else \
        bytes([0x81, 0x80 | 126]) + len(p).to_bytes(2, "big")
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(p))


def parse_head(path):
    status, heads = 0, {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("HTTP/"):
                status = int(line.split()[1])
                heads = {}
            elif ":" in line:
                k, v = line.split(":", 1)
                heads.setdefault(k.strip().lower(), []).append(v.strip())
    return status, heads


class Curl:
    """curl in the background; the body is read as it arrives (with times)."""

    def __init__(self, gw, host, path, *args, http="--http1.1", stdin=None):
        self.gw, self.host, self.path, self.args, self.http = gw, host, path, args, http
        self.stdin = stdin
        self.hdr = gw.state.parent / f"curl-head-{secrets.token_hex(6)}"
        self.chunks = []  # (monotonic time, bytes)

    async def start(self):
        url = f"https://{self.host}:{self.gw.port}{self.path}"
        self.p = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-N", self.http, "--cacert", str(self.gw.ca), "-D", str(self.hdr),
            *self.args, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=self.stdin if self.stdin is not None else asyncio.subprocess.DEVNULL)
        self.task = asyncio.create_task(self._pump())
        return self

    async def _pump(self):
        while True:
            b = await self.p.stdout.read(65536)
            if not b:
                break
            self.chunks.append((time.monotonic(), b))

    async def result(self, timeout=30):
        await asyncio.wait_for(self.task, timeout)
        err = await self.p.stderr.read()
        rc = await asyncio.wait_for(self.p.wait(), timeout)
        st, h = parse_head(self.hdr)
        self.rc, self.stderr = rc, err.decode(errors="replace")
        return st, h, b"".join(c for _, c in self.chunks)

    def kill(self):
        self.p.kill()


async def curl(gw, host, path, *args, http="--http1.1"):
    c = await Curl(gw, host, path, *args, http=http).start()
    st, h, body = await c.result()
    return st, h, body, c.rc


def stats(gw):
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    with urllib.request.urlopen(f"https://localhost:{gw.port}/stats", context=ctx,
                                timeout=5) as r:
        return json.loads(r.read())


def error_code(body):
    return json.loads(body)["error"]


# ---- requests and responses ----

@pytest.mark.parametrize("http", HTTP)
def test_request_frame_and_response(gw, tmp_path, http):
    async def go():
        c = await OsrClient(gw).open()
        payload = "héllo wörld ✓ {\"model\":\"m\"}".encode()
        (tmp_path / "body").write_bytes(payload)
        cu = await Curl(gw, c.host, "/v1/chat/completions?stream=true&q=%20x",
                        "--data-binary", f"@{tmp_path / 'body'}",
                        "-H", "Content-Type: application/json",
                        "-H", "Cookie: session=secret", "-H", "Authorization: Bearer tok",
                        "-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Forwarded-Proto: gopher",
                        "-H", "X-Forwarded-Host: evil.example", "-H", "X-Forwarded-Port: 1",
                        "-H", "X-Real-IP: 6.6.6.6", "-H", "Fly-Client-IP: 6.6.6.6",
                        "-H", "CF-Connecting-IP: 6.6.6.6", "-H", "Proxy-Authorization: x",
                        "-H", "X-Agent-Address: 0xevil", "-H", "X-Multi: a",
                        "-H", "X-Multi: b", http=http).start()
        req = await c.next("request")
        assert set(req) == {"type", "id", "method", "path", "headers", "body", "_t"}
        assert UUID4.match(req["id"]), req["id"]
        assert req["method"] == "POST"
        assert req["path"] == "/v1/chat/completions?stream=true&q=%20x"
        h = req["headers"]
        assert all(k == k.lower() for k in h)
        assert h["x-agent-address"] == c.addr
        assert h["x-forwarded-for"] == "127.0.0.1"
        # set from the request, the client's claims replaced (PROTOCOL.md 9.4)
        assert h["x-forwarded-proto"] == "https"
        assert h["x-forwarded-host"] == f"{c.host}:{gw.port}"
        assert h["authorization"] == "Bearer tok"
        assert h["x-multi"] == "a, b"
        assert h["content-type"] == "application/json"
        assert h["content-length"] == str(len(payload))
        assert h["cookie"] == "session=secret"  # forwarded, unlike the relay
        for gone in ("host", ":authority", "proxy-authorization",
                     "x-forwarded-port", "x-real-ip", "fly-client-ip",
                     "cf-connecting-ip"):
            assert gone not in h, gone
        assert req["body"] == payload.decode()

        await c.send({"type": "response", "id": req["id"], "status": 201,
                      "headers": {"Content-Type": "text/plain; charset=utf-8", "X-Custom": "yes",
                                  "Set-Cookie": "a=1; Path=/", "Connection": "close",
                                  "Content-Length": "999"},
                      "body": "créé ✓"})
        st, hd, body = await cu.result()
        assert cu.rc == 0, cu.stderr
        assert st == 201
        assert body == "créé ✓".encode()
        assert hd["x-custom"] == ["yes"] and hd["set-cookie"] == ["a=1; Path=/"]
        assert hd["content-type"] == ["text/plain; charset=utf-8"]
        assert hd["content-length"] == [str(len(body))]  # ours, not the host's
        assert hd["access-control-allow-origin"] == ["*"]
        assert hd["access-control-expose-headers"] == ["*"]

        # a host's own CORS origin is kept; an empty body; no body member at all
        cu = await Curl(gw, c.host, "/x", http=http).start()
        req = await c.next("request")
        assert req["method"] == "GET" and req["body"] == "" and req["path"] == "/x"
        await c.send({"type": "response", "id": req["id"], "status": 404,
                      "headers": {"access-control-allow-origin": "https://app.example"}})
        st, hd, body = await cu.result()
        assert (st, body) == (404, b"")
        assert hd["access-control-allow-origin"] == ["https://app.example"]
        assert hd["access-control-expose-headers"] == ["*"]
        await c.close()
    run(go())


@pytest.mark.parametrize("http", HTTP)
def test_stream_arrives_as_sent(gw, http):
    async def go():
        c = await OsrClient(gw).open()
        cu = await Curl(gw, c.host, "/events", http=http).start()
        req = await c.next("request")
        await c.send({"type": "stream_start", "id": req["id"], "status": 200,
                      "headers": {"content-type": "text/event-stream"}})
        sent = []
        events = [f"data: {{\"n\":{i}}}\n\n" for i in range(4)]
        for ev in events:
            sent.append(time.monotonic())
            await c.send({"type": "stream_chunk", "id": req["id"], "data": ev})
            await asyncio.sleep(0.4)
        await c.send({"type": "stream_end", "id": req["id"]})
        st, hd, body = await cu.result()
        assert cu.rc == 0, cu.stderr
        assert st == 200 and hd["content-type"] == ["text/event-stream"]
        assert body == "".join(events).encode()
        assert "content-length" not in hd
        if http == "--http1.1":
            assert hd["transfer-encoding"] == ["chunked"]
        # each event reached curl before the next one was sent
        for i in range(len(events) - 1):
            need = len("".join(events[:i + 1]))
            t_have = next(t for t, acc in _prefixes(cu.chunks) if len(acc) >= need)
            assert t_have < sent[i + 1], (i, t_have - sent[i + 1])
        await c.close()
    run(go())


def _prefixes(chunks):
    """(time, body so far) after each read."""
    acc = b""
    for t, b in chunks:
        acc += b
        yield t, acc


def test_head_and_no_body_statuses(gw):
    async def go():
        c = await OsrClient(gw).open()
        # HEAD: the host's length describes the GET, no body follows
        cu = await Curl(gw, c.host, "/file", "-I").start()
        req = await c.next("request")
        assert req["method"] == "HEAD"
        await c.send({"type": "response", "id": req["id"], "status": 200,
                      "headers": {"content-length": "1234"}, "body": ""})
        st, hd, body = await cu.result()
        assert (st, hd["content-length"], cu.rc) == (200, ["1234"], 0)
        assert body.endswith(b"\r\n\r\n")  # -I prints the head; nothing follows it
        # 204 with a body: the body is discarded (relay docs: "Any body is discarded")
        cu = await Curl(gw, c.host, "/nothing").start()
        req = await c.next("request")
        await c.send({"type": "response", "id": req["id"], "status": 204, "headers": {},
                      "body": "not allowed here"})
        st, hd, body = await cu.result()
        assert cu.rc == 0, cu.stderr
        assert (st, body) == (204, b"")
        await c.expect_nothing(0.3)  # no cancel: not a violation
        await c.close()
    run(go())


# ---- violations, cancel ----


def test_abort_after_head_sends_data_then_reset(gw):
    """An h2 caller gets every byte sent before a violation, then RST_STREAM
    INTERNAL_ERROR, even when the last chunk and the bad frame arrive
    together (python-h2 on a raw socket: the frames in wire order)."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    def h2_get(host, path):
        ctx = ssl.create_default_context(cafile=str(gw.ca))
        ctx.set_alpn_protocols(["h2"])
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port)),
                            server_hostname=host)
        s.settimeout(10)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "https"),
                              (":authority", f"{host}:{gw.port}")], end_stream=True)
        s.sendall(conn.data_to_send())
        return s, conn

    def read_stream(s, conn):
        seen = []
        while True:
            d = s.recv(65536)
            if not d:
                return seen
            for e in conn.receive_data(d):
                if isinstance(e, h2.events.DataReceived):
                    seen.append(("data", e.data))
                elif isinstance(e, h2.events.StreamReset):
                    seen.append(("reset", e.error_code))
                    return seen
                elif isinstance(e, h2.events.StreamEnded):
                    seen.append(("end", None))
                    return seen

    async def go():
        c = await OsrClient(gw).open()
        loop = asyncio.get_running_loop()
        for _ in range(5):
            s, conn = h2_get(c.host, "/cut")
            try:
                req = await c.next("request")
                await c.send({"type": "stream_start", "id": req["id"], "status": 200,
                              "headers": {}})
                await c.send({"type": "stream_chunk", "id": req["id"], "data": "pa"})
                # the last good chunk and the bad frame in one TLS record, so
                # the gateway takes them in one read
                c.ws.transport.write(
                    masked_text({"type": "stream_chunk", "id": req["id"], "data": "rt"})
                    + masked_text({"type": "stream_chunk", "id": req["id"], "data": 5}))
                seen = await loop.run_in_executor(None, read_stream, s, conn)
            finally:
                s.close()
            assert b"".join(d for k, d in seen if k == "data") == b"part", seen
            assert seen[-1] == ("reset", h2.errors.ErrorCodes.INTERNAL_ERROR), seen
            assert (await c.next("cancel"))["id"] == req["id"]
        await c.close()
    run(go())

@pytest.mark.parametrize("http", HTTP)
def test_bad_host_response_fails_and_cancels(gw, http):
    async def go():
        c = await OsrClient(gw).open()
        before = stats(gw)
        bad_frames = [
            lambda i: {"type": "response", "id": i, "status": 99, "headers": {}, "body": ""},
            lambda i: {"type": "response", "id": i, "status": 200, "headers": {"x": "a\r\nb"}},
            lambda i: {"type": "response", "id": i, "status": 200, "headers": {"x": "y"},
                       "body": "!!", "bodyEncoding": "base64"},
            lambda i: {"type": "stream_chunk", "id": i, "data": "too early"},
            lambda i: {"type": "stream_end", "id": i},
        ]
        for make in bad_frames:
            cu = await Curl(gw, c.host, "/bad", http=http).start()
            req = await c.next("request")
            await c.send(make(req["id"]))
            st, hd, body = await cu.result()
            assert st == 502 and error_code(body) == "bad_host_response", (make(req["id"]), body)
            cancel = await c.next("cancel")
            assert cancel == {"type": "cancel", "id": req["id"], "_t": cancel["_t"]}
            # frames for the cancelled id are ignored
            await c.send({"type": "response", "id": req["id"], "status": 200, "headers": {}})
            await c.expect_nothing(0.2)

        # after the head: the response is aborted (curl sees a cut transfer).
        # curl 7.88 over h2 drops DATA that arrives in the same read as the
        # RST_STREAM, so the bad frame waits until curl has printed "part";
        # test_abort_after_head_sends_data_then_reset checks the frame order.
        cu = await Curl(gw, c.host, "/cut", http=http).start()
        req = await c.next("request")
        await c.send({"type": "stream_start", "id": req["id"], "status": 200, "headers": {}})
        await c.send({"type": "stream_chunk", "id": req["id"], "data": "part"})
        for _ in range(100):
            if cu.chunks:
                break
            await asyncio.sleep(0.05)
        assert cu.chunks, "curl never printed the first part"
        await c.send({"type": "stream_chunk", "id": req["id"], "data": 5})
        st, hd, body = await cu.result()
        assert st == 200 and body == b"part" and cu.rc != 0, (cu.rc, cu.stderr, cu.chunks)
        assert (await c.next("cancel"))["id"] == req["id"]

        # a response for an id that never existed changes nothing
        await c.send({"type": "response", "id": "not-a-request", "status": 200, "headers": {}})
        cu = await Curl(gw, c.host, "/ok", http=http).start()
        req = await c.next("request")
        await c.send({"type": "response", "id": req["id"], "status": 200, "headers": {},
                      "body": "fine"})
        st, hd, body = await cu.result()
        assert (st, body) == (200, b"fine")
        # /stats counts them as the relay does: six requests failed for their
        # agent's frames; the schema refused at least the non-string chunk
        after = stats(gw)
        assert after["total_bad_host_responses"] - before["total_bad_host_responses"] == 6
        assert after["total_invalid_frames"] - before["total_invalid_frames"] >= 1
        await c.close()
    run(go())


@pytest.mark.parametrize("http", HTTP)
def test_client_disconnect_sends_cancel(gw, http):
    async def go():
        c = await OsrClient(gw).open()
        # before the first byte
        cu = await Curl(gw, c.host, "/slow", http=http).start()
        req = await c.next("request")
        t0 = time.monotonic()
        cu.kill()
        cancel = await c.next("cancel", timeout=3)
        assert cancel["id"] == req["id"]
        assert cancel["_t"] - t0 < 1.0 * TIME_SCALE, cancel["_t"] - t0
        # in the middle of a stream
        cu = await Curl(gw, c.host, "/stream", http=http).start()
        req = await c.next("request")
        await c.send({"type": "stream_start", "id": req["id"], "status": 200, "headers": {}})
        await c.send({"type": "stream_chunk", "id": req["id"], "data": "x" * 100})
        for _ in range(100):
            if cu.chunks:
                break
            await asyncio.sleep(0.02)
        assert cu.chunks
        t0 = time.monotonic()
        cu.kill()
        cancel = await c.next("cancel", timeout=3)
        assert cancel["id"] == req["id"] and cancel["_t"] - t0 < 1.0 * TIME_SCALE
        await c.close()
    run(go())


def test_options_answered_by_gateway(gw):
    async def go():
        c = await OsrClient(gw).open()
        st, hd, body, rc = await curl(gw, c.host, "/v1/chat", "-X", "OPTIONS",
                                      "-H", "Origin: https://app.example",
                                      "-H", "Access-Control-Request-Method: POST",
                                      "-H", "Access-Control-Request-Headers: content-type, x-api-key")
        assert (st, body) == (204, b"")
        assert hd["access-control-allow-origin"] == ["*"]
        assert "POST" in hd["access-control-allow-methods"][0]
        assert hd["access-control-allow-headers"] == ["content-type, x-api-key"]
        assert hd["access-control-max-age"] == ["86400"]
        st, hd, body, rc = await curl(gw, c.host, "/", "-X", "OPTIONS", http="--http2")
        assert st == 204 and hd["access-control-allow-origin"] == ["*"]
        assert hd["access-control-allow-headers"] == ["content-type, authorization, x-request-id"]
        await c.expect_nothing(0.3)
        # the next thing the client sees is the GET that follows
        cu = await Curl(gw, c.host, "/after").start()
        req = await c.next("request")
        assert (req["method"], req["path"]) == ("GET", "/after")
        await c.send({"type": "response", "id": req["id"], "status": 200, "headers": {}})
        assert (await cu.result())[0] == 200
        await c.close()
    run(go())


# ---- bodies ----

@pytest.mark.parametrize("http", HTTP)
def test_base64_feature_round_trips_binary(gw, tmp_path, http):
    async def go():
        c = await OsrClient(gw, features=["base64"]).open()
        data = bytes(range(256)) * 64 + os.urandom(50_000) + b"\x00\xff\xfe"
        (tmp_path / "in.bin").write_bytes(data)
        cu = await Curl(gw, c.host, "/upload", "--data-binary", f"@{tmp_path / 'in.bin'}",
                        "-o", str(tmp_path / "out.bin"), http=http).start()
        req = await c.next("request")
        assert req["bodyEncoding"] == "base64"
        assert base64.b64decode(req["body"], validate=True) == data
        back = os.urandom(200_000) + b"\x00" * 10
        await c.send({"type": "response", "id": req["id"], "status": 200,
                      "headers": {"content-type": "application/octet-stream"},
                      "body": base64.b64encode(back).decode(), "bodyEncoding": "base64"})
        st, hd, _ = await cu.result()
        assert st == 200 and (tmp_path / "out.bin").read_bytes() == back
        assert hd["content-length"] == [str(len(back))]

        # streamed chunks in base64 too; an empty body is an empty base64 text
        cu = await Curl(gw, c.host, "/s", "-o", str(tmp_path / "s.bin"), http=http).start()
        req = await c.next("request")
        assert req["body"] == "" and req["bodyEncoding"] == "base64"
        await c.send({"type": "stream_start", "id": req["id"], "status": 200, "headers": {}})
        parts = [os.urandom(70_000) for _ in range(3)]
        for p in parts:
            await c.send({"type": "stream_chunk", "id": req["id"],
                          "data": base64.b64encode(p).decode(), "bodyEncoding": "base64"})
        await c.send({"type": "stream_end", "id": req["id"]})
        st, hd, _ = await cu.result()
        assert st == 200 and (tmp_path / "s.bin").read_bytes() == b"".join(parts)
        await c.close()
    run(go())


def test_text_bodies_replace_invalid_utf8(gw, tmp_path):
    async def go():
        c = await OsrClient(gw).open()  # no features: text, as the relay
        (tmp_path / "in").write_bytes(b"ab\xffcd\xc3 \xe2\x82 ok \xf0\x9f\x98\x80")
        cu = await Curl(gw, c.host, "/t", "--data-binary", f"@{tmp_path / 'in'}").start()
        req = await c.next("request")
        assert "bodyEncoding" not in req
        assert req["body"] == "ab\ufffdcd\ufffd \ufffd ok \U0001F600"
        await c.send({"type": "response", "id": req["id"], "status": 200, "headers": {},
                      "body": "\U0001F600"})
        st, hd, body = await cu.result()
        assert (st, body) == (200, "\U0001F600".encode())
        await c.close()
    run(go())


def test_body_limit(gw, tmp_path):
    async def go():
        c = await OsrClient(gw).open()
        big = tmp_path / "big"
        big.write_bytes(b"a" * (11 * 10**6))
        # announced by Content-Length (HTTP/1.1 and HTTP/2)
        for http in HTTP:
            cu = await Curl(gw, c.host, "/up", "--data-binary", f"@{big}", http=http).start()
            st, hd, body = await cu.result()
            assert st == 413 and error_code(body) == "body_too_large", (http, st, body)
            # refused on the announced length, before reading the body (no 100 Continue)
            assert "HTTP/1.1 100" not in cu.hdr.read_text()
        # no length (HTTP/2 upload from a pipe): counted as it arrives
        rfd, wfd = os.pipe()
        cu = await Curl(gw, c.host, "/up", "-T", "-", http="--http2", stdin=rfd).start()
        os.close(rfd)

        def feed():
            try:
                for _ in range(11):
                    os.write(wfd, b"b" * 10**6)
            except OSError:  # curl stopped reading
                pass
            finally:
                os.close(wfd)
        feeder = asyncio.get_running_loop().run_in_executor(None, feed)
        st, hd, body = await cu.result()
        await feeder
        assert st == 413 and error_code(body) == "body_too_large", (st, body, cu.stderr)
        await c.expect_nothing(0.3)  # none of them reached the client
        # exactly 10 MiB passes
        exact = tmp_path / "exact"
        exact.write_bytes(b"z" * (10 * MiB))
        cu = await Curl(gw, c.host, "/up", "--data-binary", f"@{exact}").start()
        req = await c.next("request", timeout=20)
        assert len(req["body"]) == 10 * MiB and req["body"] == "z" * (10 * MiB)
        await c.send({"type": "response", "id": req["id"], "status": 200, "headers": {}})
        assert (await cu.result())[0] == 200
        await c.close()
    run(go())


# ---- limits and timers ----

def test_host_busy_past_max_streams(build_dir, tmp_path):
    g = Gateway(build_dir, tmp_path, "--max-streams-per-tunnel", "2")

    async def go():
        c = await OsrClient(g).open()
        held = []
        for i in range(2):
            cu = await Curl(g, c.host, f"/h{i}").start()
            held.append((cu, await c.next("request")))
        st, hd, body, rc = await curl(g, c.host, "/third")
        assert st == 503 and error_code(body) == "host_busy"
        for cu, req in held:
            await c.send({"type": "response", "id": req["id"], "status": 200, "headers": {}})
            assert (await cu.result())[0] == 200
        cu = await Curl(g, c.host, "/again").start()
        req = await c.next("request")
        await c.send({"type": "response", "id": req["id"], "status": 200, "headers": {}})
        assert (await cu.result())[0] == 200
        await c.close()
    try:
        run(go())
    finally:
        assert g.stop() == 0


def test_response_header_timeout_cancels(build_dir, tmp_path):
    g = Gateway(build_dir, tmp_path, "--response-header-timeout", "1")

    async def go():
        c = await OsrClient(g).open()
        t0 = time.monotonic()
        cu = await Curl(g, c.host, "/never").start()
        req = await c.next("request")
        st, hd, body = await cu.result()
        assert st == 504 and error_code(body) == "gateway_timeout"
        assert 0.8 < time.monotonic() - t0 < 4 * TIME_SCALE
        assert (await c.next("cancel"))["id"] == req["id"]
        # a started stream is not cut for being quiet
        cu = await Curl(g, c.host, "/quiet").start()
        req = await c.next("request")
        await c.send({"type": "stream_start", "id": req["id"], "status": 200, "headers": {}})
        await asyncio.sleep(2.5)
        await c.send({"type": "stream_chunk", "id": req["id"], "data": "late"})
        await c.send({"type": "stream_end", "id": req["id"]})
        st, hd, body = await cu.result()
        assert (st, body, cu.rc) == (200, b"late", 0)
        await c.close()
    try:
        run(go())
    finally:
        assert g.stop() == 0


def test_tunnel_closed_fails_pending(gw):
    async def go():
        c = await OsrClient(gw).open()
        cu = await Curl(gw, c.host, "/pending").start()
        await c.next("request")
        await c.close()
        st, hd, body = await cu.result()
        assert st == 502 and error_code(body) == "tunnel_closed"
    run(go())


def test_slow_consumer_is_cancelled(gw):
    """A caller that stops reading: past 4 MiB unsent the response is cut and
    the client told, as the relay does (JSON frames cannot be throttled)."""
    async def go():
        c = await OsrClient(gw).open()
        gw.mark()
        before = stats(gw)["total_slow_consumer_aborts"]
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", gw.port))
        tls = ssl.create_default_context(cafile=str(gw.ca)).wrap_socket(s, server_hostname=c.host)
        tls.sendall(f"GET /big HTTP/1.1\r\nHost: {c.host}:{gw.port}\r\n\r\n".encode())
        req = await c.next("request")
        await c.send({"type": "stream_start", "id": req["id"], "status": 200, "headers": {}})
        chunk = "y" * MiB
        cancel = None
        for i in range(40):
            await c.send({"type": "stream_chunk", "id": req["id"], "data": chunk})
            try:
                cancel = await c.next("cancel", timeout=0.1)
                break
            except asyncio.TimeoutError:
                pass
        assert cancel is not None and cancel["id"] == req["id"], "no cancel after 40 MiB"
        assert 4 <= i < 40
        gw.wait_log(r"event=slow_consumer .*unsent=\d+")
        assert stats(gw)["total_slow_consumer_aborts"] == before + 1
        tls.close()
        await c.close()
    run(go())


# ---- keepalive and drain ----

def test_keepalive_pings_and_silent_client(build_dir, tmp_path):
    g = Gateway(build_dir, tmp_path, "--ping-interval", "1")

    async def go():
        good = await OsrClient(g).open()
        mute = await OsrClient(g, answer_pings=False).open()
        t0 = time.monotonic()
        code = await mute.wait_closed(timeout=10)
        dt = time.monotonic() - t0
        assert code == 1001, code
        assert 2.5 <= dt <= 6 * TIME_SCALE, dt
        assert len(mute.pings) == 3
        for p in mute.pings:
            assert set(p) == {"type", "ts", "_t"} and abs(p["ts"] - time.time()) < 10
        # the client that answers stays
        assert not good.closed.is_set() and len(good.pings) >= 3
        cu = await Curl(g, good.host, "/alive").start()
        req = await good.next("request")
        await good.send({"type": "response", "id": req["id"], "status": 200, "headers": {}})
        assert (await cu.result())[0] == 200
        await good.close()
    try:
        run(go())
    finally:
        assert g.stop() == 0


def test_sigterm_drains_then_closes_1012(build_dir, tmp_path):
    g = Gateway(build_dir, tmp_path)

    async def go():
        idle = await OsrClient(g).open()
        busy = await OsrClient(g).open()
        cu = await Curl(g, busy.host, "/long").start()
        req = await busy.next("request")
        await busy.send({"type": "stream_start", "id": req["id"], "status": 200, "headers": {}})
        await busy.send({"type": "stream_chunk", "id": req["id"], "data": "one,"})
        os.kill(g.pid(), signal.SIGTERM)
        for c in (idle, busy):
            err = await c.next("error", timeout=3)
            assert err["error"] == "relay_restarting"
        assert await idle.wait_closed(5) == 1012
        # the busy tunnel finishes its stream first
        await asyncio.sleep(0.5)
        assert not busy.closed.is_set()
        await busy.send({"type": "stream_chunk", "id": req["id"], "data": "two"})
        await busy.send({"type": "stream_end", "id": req["id"]})
        st, hd, body = await cu.result()
        assert (st, body, cu.rc) == (200, b"one,two", 0)
        assert await busy.wait_closed(5) == 1012
    try:
        run(go())
        assert g.p.wait(10) == 0
    finally:
        g.stop()
