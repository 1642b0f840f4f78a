"""A minimal Osaurus relay for the tests, written from ../shared/ANCHORS.md alone
(the relay's handshake, control frames, request/response frames, keepalive and
drain), independent of tunnel-gateway: Python websockets, signatures checked
with tests/vectors/eip191_ref.py.

It listens on 127.0.0.1 (ws://) and serves:
  * WebSocket /tunnel/connect without a subprotocol: challenge, auth (all or
    nothing, `osaurus-tunnel:<address as sent>:<nonce>:<timestamp>`, +-30 s),
    auth_ok with https://-less URLs http://<addr>.localhost:<port>, then
    request_challenge / add_agent / remove_agent, JSON pings every
    `ping_interval` seconds;
  * plain GETs for <addr>.localhost[:port] (how the agent's probe and simple
    test clients come in): relayed as a `request` frame, answered from the
    `response` or the collected stream (not streamed: process_request cannot).
Tests drive the rest through RelayTunnel: inject request frames, read every
frame the client sent with its arrival time, cancel, ping, restart, supersede.

Not the relay: no Redis, no rate limits, no CORS, and it accepts "features"
only when told to (`features=["base64"]`), as our gateway does."""

import asyncio
import http
import json
import secrets
import threading
import time
import uuid

import websockets

from tunnel_env import eip191_ref  # noqa: E402  (tests/vectors)


class RelayRequest:
    """What the client answered for one request id."""

    def __init__(self, rid):
        self.id = rid
        self.status = None
        self.headers = None
        self.body = bytearray()
        self.frames = []          # (monotonic time, frame) of every frame for this id
        self.streamed = False
        self.ended = False
        self.done = threading.Event()
        self.changed = threading.Condition()

    def add(self, frame):
        with self.changed:
            self.frames.append((time.monotonic(), frame))
            t = frame["type"]
            if t in ("response", "stream_start"):
                self.status = frame["status"]
                self.headers = frame["headers"]
                self.streamed = t == "stream_start"
            data = frame.get("body") if t == "response" else frame.get("data")
            if data is not None:
                if frame.get("bodyEncoding") == "base64":
                    import base64
                    self.body += base64.b64decode(data)
                else:
                    self.body += data.encode()
            if t in ("response", "stream_end"):
                self.ended = True
                self.done.set()
            self.changed.notify_all()

    def wait(self, timeout=20):
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id}: no complete answer in {timeout}s "
                               f"({len(self.frames)} frames)")
        return self


class RelayTunnel:
    """One authenticated tunnel; methods are thread-safe."""

    def __init__(self, relay, ws):
        self.relay = relay
        self.ws = ws
        self.auth = None
        self.addrs = []              # lowercase addresses registered
        self.sent_as = {}            # lowercase -> the form the client sent
        self.texts = []              # every text frame after auth, (time, frame)
        self.requests = {}
        self.pongs = []
        self.max_frame = 0           # largest text frame from the client, bytes
        self.nonces = []             # challenges handed out after auth, FIFO
        self.closed = threading.Event()
        self.close_code = None
        self.silent = False          # go_silent(): no reading, no pings
        self.changed = threading.Condition()

    def _call(self, coro_fn, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.relay.loop).result(timeout)

    def wait_for(self, pred, timeout=10, what="condition"):
        with self.changed:
            if not self.changed.wait_for(pred, timeout):
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def request(self, addr, method="GET", path="/", headers=None, body="", encoding=None):
        rid = str(uuid.uuid4())
        r = RelayRequest(rid)
        self.requests[rid] = r
        hs = {k.lower(): v for k, v in (headers or {}).items()}
        hs.setdefault("x-agent-address", addr.lower())
        hs.setdefault("x-forwarded-for", "127.0.0.9")
        frame = {"type": "request", "id": rid, "method": method, "path": path,
                 "headers": hs, "body": body}
        if encoding:
            frame["bodyEncoding"] = encoding
        self.send(frame)
        return r

    def send(self, obj):
        async def go():
            await self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))
        self._call(go)

    def cancel(self, rid):
        self.send({"type": "cancel", "id": rid})

    def ws_ping(self):
        """An RFC 6455 ping; returns the round trip in seconds."""
        async def go():
            t0 = time.monotonic()
            waiter = await self.ws.ping()
            await asyncio.wait_for(waiter, 10)
            return time.monotonic() - t0
        return self._call(go, timeout=15)

    def close(self, code=1000, reason=""):
        async def go():
            await self.ws.close(code, reason)
        self._call(go)

    def pause_reading(self, paused=True):
        """A slow relay: stops (or resumes) reading the socket."""
        async def go():
            if paused:
                self.ws.transport.pause_reading()
            else:
                self.ws.transport.resume_reading()
        self._call(go)

    def go_silent(self):
        """Stops reading the socket (so no pong either) and stops pinging."""
        async def go():
            self.silent = True
            self.ws.transport.pause_reading()
        self._call(go)


class OsaurusRelay:
    def __init__(self, ping_interval=30, features=None, refuse=None, domain="localhost"):
        self.ping_interval = ping_interval
        self.features = features or []     # what auth_ok promises ("base64"), [] = the relay
        self.refuse = refuse or {}         # lowercase address -> auth_error code
        self.domain = domain
        self.pinging = True
        self.tunnels = []
        self.attempts = []                 # (monotonic time, auth frame) of every auth
        self.connects = []                 # monotonic time of every upgrade
        self.changed = threading.Condition()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("relay did not start")
        self.scheme = "http"
        self.ca = None

    # ---- server ----
    def _run(self, started):
        asyncio.set_event_loop(self.loop)

        async def main():
            self.server = await websockets.serve(self._handler, "127.0.0.1", 0,
                                                 process_request=self._http,
                                                 ping_interval=None, max_size=None)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            await self.server.wait_closed()
        try:
            self.loop.run_until_complete(main())
        except Exception:
            pass

    def url_of(self, addr):
        return f"http://{addr}.{self.domain}:{self.port}"

    def _tunnel_for(self, addr):
        for t in reversed(self.tunnels):
            if addr in t.addrs and not t.closed.is_set():
                return t
        return None

    async def _http(self, path, headers):
        if path.startswith("/tunnel/connect"):
            if headers.get("Upgrade", "").lower() != "websocket":
                return (http.HTTPStatus.BAD_REQUEST, [("Content-Type", "application/json")],
                        b'{"error":"websocket_required"}')
            return None
        host = headers.get("Host", "").split(":")[0].lower()
        addr = host.split(".")[0]
        t = self._tunnel_for(addr)
        if t is None:
            return (http.HTTPStatus.BAD_GATEWAY, [("Content-Type", "application/json")],
                    b'{"error":"agent_offline"}')
        skip = {"host", "cookie", "proxy-authorization", "x-forwarded-proto",
                "x-forwarded-host", "x-forwarded-port", "x-real-ip", "connection"}
        hs = {}
        for k, v in headers.raw_items():
            k = k.lower()
            if k in skip or k.startswith("fly-") or k.startswith("cf-"):
                continue
            hs[k] = hs[k] + ", " + v if k in hs else v
        hs["x-agent-address"] = addr
        hs["x-forwarded-for"] = "127.0.0.1"
        rid = str(uuid.uuid4())
        r = RelayRequest(rid)
        t.requests[rid] = r
        await t.ws.send(json.dumps({"type": "request", "id": rid, "method": "GET",
                                    "path": path, "headers": hs, "body": ""}))
        ok = await asyncio.get_running_loop().run_in_executor(None, r.done.wait, 30)
        if not ok:
            await t.ws.send(json.dumps({"type": "cancel", "id": rid}))
            return (http.HTTPStatus.GATEWAY_TIMEOUT, [], b'{"error":"gateway_timeout"}')
        out = [(k, v) for k, v in r.headers.items()
               if k not in ("content-length", "transfer-encoding", "connection")]
        return (http.HTTPStatus(r.status), out, bytes(r.body))

    async def _pinger(self, t):
        while not t.closed.is_set():
            await asyncio.sleep(self.ping_interval)
            if self.pinging and not t.silent and not t.closed.is_set():
                try:
                    await t.ws.send(json.dumps({"type": "ping", "ts": int(time.time())}))
                except websockets.ConnectionClosed:
                    return

    def _verify(self, addr_sent, sig, nonce, ts):
        text = f"osaurus-tunnel:{addr_sent}:{nonce}:{ts}".encode()
        return eip191_ref.verify(addr_sent, text, sig)

    async def _handler(self, ws, path=None):
        with self.changed:
            self.connects.append(time.monotonic())
            self.changed.notify_all()
        t = RelayTunnel(self, ws)
        nonce = secrets.token_hex(32)
        await ws.send(json.dumps({"type": "challenge", "nonce": nonce}))
        try:
            auth = json.loads(await asyncio.wait_for(ws.recv(), 10))
        except (asyncio.TimeoutError, websockets.ConnectionClosed):
            await ws.close(4001)
            return
        with self.changed:
            self.attempts.append((time.monotonic(), auth))
            self.changed.notify_all()
        t.auth = auth
        err = None
        if auth.get("type") != "auth":
            err = "expected_auth_frame"
        elif auth.get("nonce") != nonce:
            err = "invalid_nonce"
        elif not auth.get("agents"):
            err = "no_agents"
        elif abs(int(time.time()) - auth["timestamp"]) > 30:
            err = "signature_verification_failed"
        else:
            for e in auth["agents"]:
                low = e["address"].lower()
                if low in self.refuse:
                    err = self.refuse[low]
                elif not self._verify(e["address"], e["signature"], nonce, auth["timestamp"]):
                    err = "signature_verification_failed"
        if err is not None:
            await ws.send(json.dumps({"type": "auth_error", "error": err}))
            await ws.close(4001 if err.startswith("signature") else 4000)
            return
        for e in auth["agents"]:
            low = e["address"].lower()
            t.addrs.append(low)
            t.sent_as[low] = e["address"]
            for old in self.tunnels:       # the newest session wins
                if old is not t and low in old.addrs and not old.closed.is_set():
                    old.addrs.remove(low)
                    if old.silent:
                        continue
                    try:
                        await old.ws.send(json.dumps({"type": "agent_removed", "address": low,
                                                      "reason": "superseded"}))
                        if not old.addrs:
                            await old.ws.close(1000)
                    except websockets.ConnectionClosed:
                        pass
        ok = {"type": "auth_ok", "region": "test",
              "agents": [{"address": a, "url": self.url_of(a)} for a in t.addrs]}
        if self.features:
            ok["features"] = self.features
        await ws.send(json.dumps(ok))
        with self.changed:
            self.tunnels.append(t)
            self.changed.notify_all()
        pinger = asyncio.ensure_future(self._pinger(t))
        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    continue            # binary frames are ignored
                t.max_frame = max(t.max_frame, len(msg.encode()))
                m = json.loads(msg)
                with t.changed:
                    t.texts.append((time.monotonic(), m))
                    t.changed.notify_all()
                await self._on_text(t, m)
        except websockets.ConnectionClosed:
            pass
        finally:
            pinger.cancel()
            t.close_code = ws.close_code
            t.closed.set()
            with t.changed:
                t.changed.notify_all()

    async def _on_text(self, t, m):
        typ = m.get("type")
        if typ in ("response", "stream_start", "stream_chunk", "stream_end"):
            r = t.requests.get(m.get("id"))
            if r is not None:
                r.add(m)
        elif typ == "pong":
            t.pongs.append(m)
        elif typ == "request_challenge":
            n = secrets.token_hex(32)
            t.nonces.append(n)
            await t.ws.send(json.dumps({"type": "challenge", "nonce": n}))
        elif typ == "add_agent":
            low = m["address"].lower()
            n = t.nonces.pop(0) if t.nonces else None
            if n is None or m.get("nonce") != n:
                await t.ws.send(json.dumps({"type": "error", "error": "invalid_nonce"}))
            elif not self._verify(m["address"], m["signature"], n, m["timestamp"]):
                await t.ws.send(json.dumps({"type": "error", "error": "invalid_signature"}))
            else:
                if low not in t.addrs:
                    t.addrs.append(low)
                await t.ws.send(json.dumps({"type": "agent_added", "address": low,
                                            "url": self.url_of(low), "region": "test"}))
        elif typ == "remove_agent":
            low = m["address"].lower()
            if low in t.addrs:
                t.addrs.remove(low)
                await t.ws.send(json.dumps({"type": "agent_removed", "address": low}))

    # ---- for tests ----
    def wait_tunnels(self, n, timeout=20):
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.tunnels) >= n, timeout):
                raise TimeoutError(f"{len(self.tunnels)} tunnels, wanted {n}")
            return self.tunnels[n - 1]

    def restart(self, t):
        """The relay's drain end: error relay_restarting, then close 1012."""
        async def go():
            await t.ws.send(json.dumps({"type": "error", "error": "relay_restarting"}))
            await t.ws.close(1012)
        t._call(go)

    def supersede(self, t, addr):
        """Another machine took addr: agent_removed superseded, close once empty."""
        async def go():
            if addr in t.addrs:
                t.addrs.remove(addr)
            await t.ws.send(json.dumps({"type": "agent_removed", "address": addr,
                                        "reason": "superseded"}))
            if not t.addrs:
                await t.ws.close(1000)
        t._call(go)

    def stop(self):
        async def go():
            self.server.close()
        try:
            asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)
        except Exception:
            pass
        self.thread.join(5)
