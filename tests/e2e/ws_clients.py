"""Real WebSocket clients for the end-to-end tests, all driven the same way:
open(id, url, protocols), send_text / send_binary, close, ... and a log of
events, each stamped with time.monotonic() in the test process when it arrived
(the local API, in-process, uses the same clock).

* PyClient: Python `websockets` 10.4 (HTTP/1.1), in an asyncio loop of its own thread.
* NodeClient: Node `ws` (ws_node_client.js, a child process, JSON lines).
* ChromiumClient: headless Chromium driven over the DevTools protocol (CDP
  client: Python websockets); the page lives on the agent host, so with HTTP/2
  on, Chromium carries its WebSockets over the page's h2 connection (RFC 8441).

Events: {"ev": "open", "protocol", "extensions"}, {"ev": "message", "binary",
"data": bytes}, {"ev": "pong"}, {"ev": "close", "code", "reason"},
{"ev": "refused", "status", "body" (bytes or None)}, {"ev": "error", "message"};
every event has "id" and "t".
"""

import asyncio
import base64
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import websockets
import websockets.exceptions

HERE = Path(__file__).resolve().parent
MAX_SIZE = 64 << 20


class Events:
    def __init__(self):
        self.cond = threading.Condition()
        self.items = []

    def push(self, ev):
        ev.setdefault("t", time.monotonic())
        with self.cond:
            self.items.append(ev)
            self.cond.notify_all()

    def find(self, pred, start=0):
        with self.cond:
            for i in range(start, len(self.items)):
                if pred(self.items[i]):
                    return i, self.items[i]
        return None

    def wait(self, pred, timeout, what, start=0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.items)):
                    if pred(self.items[i]):
                        return self.items[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    mine = [{k: (v if k != "data" else f"<{len(v)} bytes>") for k, v in e.items()}
                            for e in self.items[-12:]]
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; "
                                       f"last events: {mine}")
                self.cond.wait(min(left, 0.5))


class Client:
    """Shared bookkeeping: per-connection cursors so next_message() returns
    each message once, in order."""
    name = "?"
    can_fragment = False
    can_ping = False
    refusal_body = False
    can_pause = False

    def __init__(self):
        self.events = Events()
        self._cursor = {}

    def wait(self, cid, ev, timeout, what=None):
        return self.events.wait(lambda e: e["id"] == cid and e["ev"] == ev, timeout,
                                what or f"{ev} on {cid} ({self.name})")

    def wait_open(self, cid, timeout):
        """The open event, or raises with what happened instead."""
        e = self.events.wait(lambda e: e["id"] == cid and e["ev"] in ("open", "close", "refused",
                                                                     "error"),
                             timeout, f"open on {cid} ({self.name})")
        if e["ev"] != "open":
            # let a refused/close that follows an error arrive, for the message
            time.sleep(0.2)
            raise AssertionError(f"{self.name} {cid} did not open: "
                                 f"{[x for x in self.events.items if x['id'] == cid]}")
        return e

    def next_message(self, cid, timeout):
        start = self._cursor.get(cid, 0)
        deadline = time.monotonic() + timeout
        while True:
            r = self.events.find(lambda e: e["id"] == cid and e["ev"] in ("message", "close"), start)
            if r is not None:
                i, e = r
                if e["ev"] == "close":
                    raise AssertionError(f"{self.name} {cid} closed while a message was "
                                         f"expected: {e}")
                self._cursor[cid] = i + 1
                return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} {cid}: no message within {timeout}s")
            with self.events.cond:
                self.events.cond.wait(min(left, 0.2))


# ---------------------------------------------------------------- Python
class PyClient(Client):
    name = "python"
    can_fragment = True
    can_ping = True
    can_pause = True

    def __init__(self, ca):
        super().__init__()
        self.ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conns = {}
        self.paused = {}
        self.close_durations = {}

    def _run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self, cid, url, protocols=None, max_queue=32):
        async def go():
            host = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
            kw = {}
            if url.startswith("wss:"):
                kw = {"ssl": self.ctx, "server_hostname": host}
            try:
                ws = await websockets.connect(url, host="127.0.0.1", subprotocols=protocols,
                                              max_size=MAX_SIZE, max_queue=max_queue,
                                              ping_interval=None, close_timeout=10,
                                              open_timeout=30, **kw)
            except websockets.exceptions.InvalidStatusCode as e:
                self.events.push({"id": cid, "ev": "refused", "status": e.status_code,
                                  "body": None})
                return
            except Exception as e:  # noqa: BLE001 (reported as an event)
                self.events.push({"id": cid, "ev": "error", "message": repr(e)})
                return
            self.conns[cid] = ws
            self.paused[cid] = asyncio.Event()
            self.paused[cid].set()
            self.events.push({"id": cid, "ev": "open", "protocol": ws.subprotocol or "",
                              "extensions": ws.response_headers.get("Sec-WebSocket-Extensions",
                                                                    "")})
            self.loop.create_task(self._reader(cid, ws))
        asyncio.run_coroutine_threadsafe(go(), self.loop)

    async def _reader(self, cid, ws):
        try:
            while True:
                await self.paused[cid].wait()
                msg = await ws.recv()
                self.events.push({"id": cid, "ev": "message", "binary": isinstance(msg, bytes),
                                  "data": msg if isinstance(msg, bytes) else msg.encode()})
        except websockets.exceptions.ConnectionClosed:
            self.events.push({"id": cid, "ev": "close", "code": ws.close_code,
                              "reason": ws.close_reason})

    def send_text(self, cid, s):
        self._run(self.conns[cid].send(s))

    def send_binary(self, cid, b):
        self._run(self.conns[cid].send(b))

    def send_fragments(self, cid, parts, binary=True):
        self._run(self.conns[cid].send(iter(parts if binary else [p.decode() for p in parts])))

    def ping(self, cid, data=b"p"):
        async def go():
            waiter = await self.conns[cid].ping(data)
            await waiter
            self.events.push({"id": cid, "ev": "pong"})
        asyncio.run_coroutine_threadsafe(go(), self.loop)

    def close(self, cid, code, reason):
        async def go():
            t0 = time.monotonic()
            await self.conns[cid].close(code, reason)
            self.close_durations[cid] = time.monotonic() - t0
        asyncio.run_coroutine_threadsafe(go(), self.loop)

    def terminate(self, cid):
        self.loop.call_soon_threadsafe(self.conns[cid].transport.abort)

    def pause(self, cid):
        self.loop.call_soon_threadsafe(self.paused[cid].clear)

    def resume(self, cid):
        self.loop.call_soon_threadsafe(self.paused[cid].set)

    def stop(self):
        async def closeall():
            for ws in list(self.conns.values()):
                ws.transport.abort()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=5) if tasks else None
        try:
            self._run(closeall(), 10)
        except Exception:  # noqa: BLE001
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


# ---------------------------------------------------------------- Node
class NodeClient(Client):
    name = "node"
    can_fragment = True
    can_ping = True
    refusal_body = True
    can_pause = True

    def __init__(self, ca, log_path):
        super().__init__()
        self.ca = str(ca) if ca else None
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            raise AssertionError("node is not installed (scripts/install-deps.sh installs it)")
        if not Path("/usr/share/nodejs/ws").is_dir():
            raise AssertionError("node-ws is not installed (/usr/share/nodejs/ws)")
        env = dict(os.environ, NODE_PATH="/usr/share/nodejs")
        self.err = open(log_path, "wb")
        self.p = subprocess.Popen([node, str(HERE / "ws_node_client.js")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, env=env,
                                  start_new_session=True)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.events.wait(lambda e: e["ev"] == "ready", 30, "node client ready")

    def _read(self):
        for line in self.p.stdout:
            t = time.monotonic()
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            e["t"] = t
            if e["ev"] == "message":
                e["data"] = base64.b64decode(e.pop("b64"))
            elif e["ev"] == "refused":
                e["body"] = base64.b64decode(e["body"])
            self.events.push(e)

    def _cmd(self, **c):
        with self.lock:
            self.p.stdin.write(json.dumps(c).encode() + b"\n")
            self.p.stdin.flush()

    def open(self, cid, url, protocols=None):
        self._cmd(op="open", id=cid, url=url, protocols=protocols or [], ca=self.ca)

    def send_text(self, cid, s):
        self._cmd(op="send", id=cid, b64=base64.b64encode(s.encode()).decode(), binary=False)

    def send_binary(self, cid, b):
        self._cmd(op="send", id=cid, b64=base64.b64encode(b).decode(), binary=True)

    def send_fragments(self, cid, parts, binary=True):
        for i, p in enumerate(parts):
            self._cmd(op="send", id=cid, b64=base64.b64encode(p).decode(), binary=binary,
                      fin=i == len(parts) - 1)

    def ping(self, cid, data=b"p"):
        self._cmd(op="ping", id=cid, b64=base64.b64encode(data).decode())

    def close(self, cid, code, reason):
        self._cmd(op="close", id=cid, code=code, reason=reason)

    def terminate(self, cid):
        self._cmd(op="terminate", id=cid)

    def pause(self, cid):
        self._cmd(op="pause", id=cid)

    def resume(self, cid):
        self._cmd(op="resume", id=cid)

    def stop(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)
        self.err.close()


# ---------------------------------------------------------------- Chromium
PAGE_JS = r"""
(() => {
  if (window.__open) return 'already';
  window.__socks = {};
  const b64 = (u8) => { let s = ''; for (let i = 0; i < u8.length; i += 0x8000)
      s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000)); return btoa(s); };
  window.__unb64 = (b) => { const s = atob(b); const u = new Uint8Array(s.length);
      for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i); return u; };
  window.__open = (id, url, protos) => {
    const rep = (o) => { o.id = id; report(JSON.stringify(o)); };
    let ws;
    try { ws = new WebSocket(url, protos); } catch (e) { rep({ev: 'error', message: String(e)}); return; }
    ws.binaryType = 'arraybuffer';
    __socks[id] = ws;
    ws.onopen = () => rep({ev: 'open', protocol: ws.protocol, extensions: ws.extensions});
    ws.onmessage = (m) => {
      if (typeof m.data === 'string') rep({ev: 'message', binary: false, b64: b64(new TextEncoder().encode(m.data))});
      else rep({ev: 'message', binary: true, b64: b64(new Uint8Array(m.data))});
    };
    ws.onclose = (e) => rep({ev: 'close', code: e.code, reason: e.reason, clean: e.wasClean});
    ws.onerror = () => rep({ev: 'error', message: 'error event'});
  };
  return 'installed';
})()
"""


class ChromiumClient(Client):
    can_fragment = False   # the browser API sends whole messages only
    can_ping = False       # ... and has no ping; the server-initiated ping is tested instead
    refusal_body = False   # the status is visible (DevTools), the body is not

    def __init__(self, tmp, http2=True):
        super().__init__()
        self.http2 = http2
        self.name = "chromium-h2" if http2 else "chromium-h1"
        exe = "/usr/bin/chromium"
        if not os.access(exe, os.X_OK):
            raise AssertionError("/usr/bin/chromium is not installed (scripts/install-deps.sh "
                                 "installs it)")
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp))
        argv = [exe, "--headless=new", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", "--ignore-certificate-errors",
                "--host-resolver-rules=MAP *.localhost 127.0.0.1",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu",
                "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--password-store=basic", "--use-mock-keychain", "--mute-audio"]
        if os.geteuid() == 0:
            argv.append("--no-sandbox")
        if not http2:
            argv.append("--disable-http2")
        argv.append("about:blank")
        self.log = open(Path(tmp) / f"{self.name}.log", "wb")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while True:
            if port_file.exists():
                lines = port_file.read_text().split("\n")
                if len(lines) >= 2 and lines[1].startswith("/devtools/"):
                    break
            if self.p.poll() is not None:
                raise AssertionError(f"chromium exited ({self.p.returncode}), see {self.log.name}")
            if time.monotonic() > deadline:
                raise AssertionError("chromium wrote no DevToolsActivePort within 60 s")
            time.sleep(0.05)
        self.cdp_url = f"ws://127.0.0.1:{int(lines[0])}{lines[1]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._id = 0
        self._pending = {}
        self.handshakes = {}   # ws url -> {"status", "headers"} (Network events)
        self.frame_errors = {}  # ws url -> error message
        self._ws_urls = {}     # CDP requestId -> url
        self.loads = 0
        self.origin = None
        self._run(self._connect())

    def _run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self):
        self.cdp = await websockets.connect(self.cdp_url, max_size=None, ping_interval=None,
                                            open_timeout=30)
        self.loop.create_task(self._cdp_reader())
        targets = await self._call("Target.getTargets")
        page = next(t for t in targets["targetInfos"] if t["type"] == "page")
        r = await self._call("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        self.session = r["sessionId"]
        for m in ("Page.enable", "Runtime.enable", "Network.enable"):
            await self._call(m, session=True)
        await self._call("Security.setIgnoreCertificateErrors", session=True, ignore=True)
        await self._call("Runtime.addBinding", session=True, name="report")

    async def _call(self, method, session=False, **params):
        self._id += 1
        mid = self._id
        fut = self.loop.create_future()
        self._pending[mid] = fut
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        await self.cdp.send(json.dumps(msg))
        r = await asyncio.wait_for(fut, 60)
        if "error" in r:
            raise AssertionError(f"CDP {method}: {r['error']}")
        return r.get("result", {})

    async def _cdp_reader(self):
        try:
            async for raw in self.cdp:
                t = time.monotonic()
                m = json.loads(raw)
                if "id" in m:
                    fut = self._pending.pop(m["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(m)
                    continue
                meth, p = m.get("method"), m.get("params", {})
                if meth == "Runtime.bindingCalled" and p.get("name") == "report":
                    e = json.loads(p["payload"])
                    e["t"] = t
                    if e["ev"] == "message":
                        e["data"] = base64.b64decode(e.pop("b64"))
                    self.events.push(e)
                elif meth == "Page.loadEventFired":
                    self.loads += 1
                    self.events.push({"id": None, "ev": "load"})
                elif meth == "Network.webSocketCreated":
                    self._ws_urls[p["requestId"]] = p["url"]
                elif meth == "Network.webSocketHandshakeResponseReceived":
                    url = self._ws_urls.get(p["requestId"])
                    self.handshakes[url] = {"status": p["response"]["status"],
                                            "headers": p["response"].get("headers", {})}
                elif meth == "Network.webSocketFrameError":
                    url = self._ws_urls.get(p["requestId"])
                    self.frame_errors[url] = p.get("errorMessage", "")
        except websockets.exceptions.ConnectionClosed:
            pass

    def evaluate(self, expr, timeout=60):
        r = self._run(self._call("Runtime.evaluate", session=True, expression=expr,
                                 returnByValue=True), timeout)
        if "exceptionDetails" in r:
            raise AssertionError(f"JS exception: {r['exceptionDetails']}")
        return r["result"].get("value")

    def goto(self, base):
        """Puts the page on the agent host (an HTTP/2 connection to it, with
        HTTP/2 on), with the client script installed."""
        if self.origin == base:
            return
        n = self.loads
        self._run(self._call("Page.navigate", session=True, url=f"{base}/page"))
        self.events.wait(lambda e: e["ev"] == "load" and self.loads > n, 30, "page load")
        got = self.evaluate("location.origin + ' ' + document.title")
        assert got.startswith(base) and got.endswith("ws test"), got
        self.evaluate(PAGE_JS)
        self.origin = base
        self._cursor = {}

    def open(self, cid, url, protocols=None):
        self._urls = getattr(self, "_urls", {})
        self._urls[cid] = url
        self.evaluate(f"__open({json.dumps(cid)}, {json.dumps(url)}, {json.dumps(protocols or [])})")

    def handshake_of(self, cid):
        return self.handshakes.get(self._urls[cid])

    def refusal_of(self, cid):
        """(status or None, error text) of a refused handshake, from DevTools."""
        url = self._urls[cid]
        hs = self.handshakes.get(url)
        return (hs["status"] if hs else None), self.frame_errors.get(url, "")

    def send_text(self, cid, s):
        self.evaluate(f"__socks[{json.dumps(cid)}].send({json.dumps(s)})")

    def send_binary(self, cid, b):
        b64 = base64.b64encode(b).decode()
        self.evaluate(f"__socks[{json.dumps(cid)}].send(__unb64('{b64}'))")

    def close(self, cid, code, reason):
        self.evaluate(f"__socks[{json.dumps(cid)}].close({int(code)}, {json.dumps(reason)})")

    def stop(self):
        try:
            self._run(self.cdp.close(), 10)
        except Exception:  # noqa: BLE001
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, 15)
                self.p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.p.pid, 9)
                self.p.wait(5)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
