"""The local WebSocket API that the WebSocket end-to-end tests expose through
the tunnel (Python `websockets` 10.4 server, asyncio, in a thread of the test
process, so tests read what it saw and share its clock, time.monotonic()).

Paths (the query's id=X names the connection in `state`):
  /echo?id=X        echoes every message (text as text, binary as binary).
                    Text commands, answered instead of echoed:
                      "cmd:close:CODE:REASON"  the server closes (time recorded
                                               in state.server_close[X])
                      "cmd:abort"              drops the TCP connection, no close frame
                      "cmd:frag:N:SIZE"        sends one binary message as N
                                               fragments of SIZE bytes (byte i = i % 251)
                      "cmd:ping"               pings the client; answers
                                               "pong-received" once the pong came
                      "cmd:headers"            answers the request headers as JSON
  /refuse?status=N  refuses the upgrade: HTTP N with body REFUSE_BODY
  /flood?id=X       sends 64 KiB binary messages for as long as the socket takes
                    them; state.flood_sent[X] counts the bytes
  /page             (no Upgrade) a small HTML page, so a browser can have an
                    origin on the agent host (and an HTTP/2 connection to it)
  /hold             (no Upgrade) answers 200 "held" after 15 s
  /plain            (no Upgrade) JSON {"headers": {...}} of the request
Subprotocols: the server supports only SUBPROTOCOLS; of what a client offers it
picks the first it supports, so "the local API picked it" is visible.

state.opened[X] / state.closed[X]: monotonic times a connection's handler began
/ saw the connection end; state.close_code[X] / close_reason[X]: what the
client's close frame said (1006 when there was none).
"""

import asyncio
import http
import json
import random
import threading
import time

import websockets
import websockets.exceptions
import websockets.server

SUBPROTOCOLS = ["chat.v2.example"]
REFUSE_BODY = b'{"error":"local api says no"}'
FLOOD_CHUNK = random.Random(64).randbytes(64 * 1024)  # incompressible (deflate is on)
MAX_SIZE = 16 << 20


def frag_payload(n, size):
    return bytes(i % 251 for i in range(n * size))


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.opened = {}
        self.closed = {}
        self.close_code = {}
        self.close_reason = {}
        self.server_close = {}
        self.flood_sent = {}
        self.requests = []          # (path, headers dict lower-case) of every request
        self.messages = {}          # id -> count of messages received

    def rec(self, d, k, v):
        with self.lock:
            d[k] = v


def _query(path):
    q = {}
    if "?" in path:
        for part in path.split("?", 1)[1].split("&"):
            k, _, v = part.partition("=")
            q[k] = v
    return q


class WsLocalApi:
    def __init__(self):
        self.state = State()
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._started.wait(10):
            raise RuntimeError("local WebSocket API did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    # -- server ----------------------------------------------------------
    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self):
        self._stop = asyncio.Event()
        async with websockets.serve(self._handler, "127.0.0.1", 0,
                                    process_request=self._process_request,
                                    subprotocols=SUBPROTOCOLS,
                                    select_subprotocol=self._select,
                                    max_size=MAX_SIZE, max_queue=64,
                                    ping_interval=None, close_timeout=5) as srv:
            self.port = srv.sockets[0].getsockname()[1]
            self._started.set()
            await self._stop.wait()

    def _select(self, client_protos, server_protos):
        for p in client_protos:
            if p in server_protos:
                return p
        return None

    async def _process_request(self, path, headers):
        hd = {}
        for k, v in headers.raw_items():
            hd.setdefault(k.lower(), []).append(v)
        with self.state.lock:
            self.state.requests.append((path, hd))
        p = path.split("?", 1)[0]
        q = _query(path)
        if p == "/refuse":
            status = http.HTTPStatus(int(q.get("status", "403")))
            return status, [("Content-Type", "application/json"), ("X-Refused-By", "local-api")], \
                REFUSE_BODY
        if p == "/page":
            return http.HTTPStatus.OK, [("Content-Type", "text/html")], b"<!doctype html><title>ws test</title>ok"
        if p == "/hold":
            try:
                await asyncio.wait_for(self._stop.wait(), 15)   # 15 s, or until stop()
            except asyncio.TimeoutError:
                pass
            return http.HTTPStatus.OK, [("Content-Type", "text/plain")], b"held"
        if p == "/plain":
            return http.HTTPStatus.OK, [("Content-Type", "application/json")], json.dumps({"headers": hd}).encode()
        return None

    async def _handler(self, ws, path=None):
        path = ws.path
        p = path.split("?", 1)[0]
        cid = _query(path).get("id", path)
        st = self.state
        st.rec(st.opened, cid, time.monotonic())
        try:
            if p == "/flood":
                st.rec(st.flood_sent, cid, 0)
                while True:
                    await ws.send(FLOOD_CHUNK)
                    with st.lock:
                        st.flood_sent[cid] += len(FLOOD_CHUNK)
            else:
                await self._echo(ws, cid, path)
        except websockets.exceptions.ConnectionClosed:
            pass
        finally:
            st.rec(st.closed, cid, time.monotonic())
            st.rec(st.close_code, cid, ws.close_code)
            st.rec(st.close_reason, cid, ws.close_reason)

    async def _echo(self, ws, cid, path):
        st = self.state
        async for msg in ws:
            with st.lock:
                st.messages[cid] = st.messages.get(cid, 0) + 1
            if isinstance(msg, str) and msg.startswith("cmd:"):
                parts = msg.split(":")
                if parts[1] == "close":
                    st.rec(st.server_close, cid, time.monotonic())
                    await ws.close(int(parts[2]), parts[3])
                    return
                if parts[1] == "abort":
                    st.rec(st.server_close, cid, time.monotonic())
                    ws.transport.abort()
                    return
                if parts[1] == "frag":
                    n, size = int(parts[2]), int(parts[3])
                    data = frag_payload(n, size)
                    await ws.send(data[i * size:(i + 1) * size] for i in range(n))
                elif parts[1] == "ping":
                    waiter = await ws.ping()
                    await asyncio.wait_for(waiter, 10)
                    await ws.send("pong-received")
                elif parts[1] == "headers":
                    hd = {}
                    for k, v in ws.request_headers.raw_items():
                        hd.setdefault(k.lower(), []).append(v)
                    await ws.send(json.dumps({"path": path, "headers": hd,
                                              "subprotocol": ws.subprotocol}))
                continue
            await ws.send(msg)

    # -- for tests -------------------------------------------------------
    def get(self, name, cid):
        with self.state.lock:
            return getattr(self.state, name).get(cid)

    def requests_for(self, prefix):
        with self.state.lock:
            return [r for r in self.state.requests if r[0].startswith(prefix)]

    def stop(self):
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)
