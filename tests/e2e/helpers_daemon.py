"""Helpers for the agent daemon tests (test_agent_daemon.py): a gateway on a
given port (tunnel_env.reserve_port(), so that it can be restarted where the
agent expects it), curl
calls through the tunnel, log scraping. Built on tunnel_env.py."""

import re
import subprocess
import time
from pathlib import Path

from tunnel_env import Proc, wait_for


class FixedGateway(Proc):
    """tunnel-gateway on 127.0.0.1:port with a given state dir (reused across
    restarts, so the local CA, and the agent's --ca-file, stay valid)."""

    def __init__(self, build_dir, tmp, port, name="gw", extra=()):
        self.state = Path(tmp) / f"{name}-state"
        self.domain = "localhost"
        self.port = port
        self.scheme = "https"
        self.ca = self.state / "local-ca.pem"
        argv = [Path(build_dir) / "gateway/tunnel-gateway", "--listen", f"127.0.0.1:{port}",
                "--state-dir", self.state, "--log-level", "debug", "--summary-interval", "0",
                *extra]
        super().__init__(argv, Path(tmp) / f"{name}-{int(time.time() * 1000)}.log")
        self.wait_log(r"event=listening addr=\S+ port=(\d+)")


def curl(gw, addr, path, *args, http="--http1.1", timeout=60):
    """GET (or whatever args say) https://<addr>.localhost:<port><path>.
    Returns (status, body bytes); status 0 if curl failed."""
    url = f"https://{addr}.localhost:{gw.port}{path}"
    r = subprocess.run(["curl", "-sS", http, "--cacert", str(gw.ca), "-o", "-", "-w",
                        "\n%{http_code}", *args, url], capture_output=True, timeout=timeout)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or b"0"), body


def agent_state(agent, name):
    st = agent.status()
    if not st:
        return None
    for a in st.get("agents", []):
        if a.get("name") == name:
            return a
    return None


def wait_state(agent, name, state, timeout):
    def ok():
        a = agent_state(agent, name)
        return a if a is not None and a.get("state") == state else None
    return wait_for(ok, timeout, f"agent {name} {state}")


def log_values(proc, event, key):
    """Every value of key= on lines with event=<event> in proc's log."""
    rx = re.compile(rf"event={event}\b.*?\b{key}=(\S+)")
    return [m.group(1) for m in rx.finditer(proc.text())]


# ---- a scriptable fake gateway (native protocol, ws://) ---------------------
#
# Independent of tunnel-gateway: Python websockets + h2 as the HTTP/2 client,
# signatures checked with tests/vectors/eip191_ref.py. Lets a test drive what
# the real gateway does rarely or not yet: GOAWAY + "draining", agent_removed
# reasons, a silent peer, extended CONNECT.

import asyncio  # noqa: E402
import json as _json  # noqa: E402
import secrets  # noqa: E402
import threading  # noqa: E402

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402
import websockets  # noqa: E402

import eip191_ref  # noqa: E402  (tunnel_env put tests/vectors on sys.path)


class FakeResponse:
    def __init__(self):
        self.status = None
        self.headers = []
        self.body = bytearray()
        self.ended = False
        self.reset = None
        self.event = threading.Event()   # set on any change
        self.done = threading.Event()    # ended or reset


class FakeTunnel:
    """One tunnel accepted by FakeGateway; methods are thread-safe."""

    def __init__(self, gw, ws):
        self.gw = gw
        self.ws = ws
        self.auth = None            # the agent's auth message
        self.addrs = []             # accepted addresses
        self.texts = []             # every text message after auth
        self.h2 = None
        self.responses = {}
        self.settings_seen = threading.Event()
        self.closed = threading.Event()
        self.silent = False         # stop answering anything (keepalive test)

    # -- called on the loop --
    async def _send_h2(self):
        data = self.h2.data_to_send()
        if data:
            await self.ws.send(data)

    def _on_h2(self, data):
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self.settings_seen.set()
            elif isinstance(ev, h2.events.ResponseReceived):
                r = self.responses[ev.stream_id]
                r.status = int(dict(ev.headers)[":status"])
                r.headers = ev.headers
                r.event.set()
            elif isinstance(ev, h2.events.DataReceived):
                r = self.responses[ev.stream_id]
                r.body += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                r.event.set()
            elif isinstance(ev, h2.events.StreamEnded):
                r = self.responses[ev.stream_id]
                r.ended = True
                r.done.set()
                r.event.set()
            elif isinstance(ev, h2.events.StreamReset):
                r = self.responses.get(ev.stream_id)
                if r is not None:
                    r.reset = int(ev.error_code)
                    r.done.set()
                    r.event.set()

    def _call(self, coro_fn, timeout=10):
        fut = asyncio.run_coroutine_threadsafe(coro_fn(), self.gw.loop)
        return fut.result(timeout)

    # -- public --
    def request(self, addr, method="GET", path="/", headers=(), body=None, protocol=None,
                end=None):
        """Opens a stream; returns (stream_id, FakeResponse)."""
        async def go():
            sid = self.h2.get_next_available_stream_id()
            hs = [(":method", method), (":scheme", "http"),
                  (":authority", f"{addr}.localhost:{self.gw.port}"), (":path", path)]
            if protocol:
                hs.append((":protocol", protocol))
            hs += list(headers)
            hs += [("x-forwarded-for", "127.0.0.1"), ("x-forwarded-proto", "http"),
                   ("x-forwarded-host", f"{addr}.localhost:{self.gw.port}"),
                   ("x-agent-address", addr)]
            r = FakeResponse()
            self.responses[sid] = r
            fin = (body is None) if end is None else end
            self.h2.send_headers(sid, hs, end_stream=fin and body is None)
            if body is not None:
                self.h2.send_data(sid, body, end_stream=fin)
            await self._send_h2()
            return sid, r
        return self._call(go)

    def send_data(self, sid, data, end=False):
        async def go():
            self.h2.send_data(sid, data, end_stream=end)
            await self._send_h2()
        self._call(go)

    def reset(self, sid, code=8):
        async def go():
            self.h2.reset_stream(sid, code)
            await self._send_h2()
        self._call(go)

    def send_text(self, obj):
        async def go():
            await self.ws.send(_json.dumps(obj))
        self._call(go)

    def drain(self, grace=600):
        """GOAWAY (last stream 0) + {"type":"draining"} as the gateway does."""
        async def go():
            # a raw frame: python-h2 refuses all input once it sent GOAWAY
            goaway = bytes([0, 0, 8, 7, 0, 0, 0, 0, 0]) + bytes(8)  # last id 0, NO_ERROR
            await self._send_h2()
            await self.ws.send(goaway)
            await self.ws.send(_json.dumps({"type": "draining", "grace": grace}))
        self._call(go)

    def close(self, code=1000):
        async def go():
            await self.ws.close(code)
        self._call(go)


class FakeGateway:
    """Listens on 127.0.0.1 (ws://). Accepts every validly signed agent unless
    its address is in .refuse (address -> error code)."""

    def __init__(self, ping_interval=20, domain="localhost"):
        self.ping_interval = ping_interval
        self.domain = domain
        self.tunnels = []
        self.attempts = 0           # auth messages received
        self.refuse = {}
        self.new_tunnel = threading.Condition()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)
        self.scheme = "http"
        self.ca = None

    def _run(self, started):
        asyncio.set_event_loop(self.loop)

        async def main():
            self.server = await websockets.serve(self._handler, "127.0.0.1", 0,
                                                 subprotocols=["tunnel-h2.v1"],
                                                 ping_interval=None, max_size=None)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            await self.server.wait_closed()
        try:
            self.loop.run_until_complete(main())
        except Exception:
            pass

    async def _handler(self, ws, path=None):
        t = FakeTunnel(self, ws)
        nonce = secrets.token_hex(32)
        await ws.send(_json.dumps({"type": "challenge", "nonce": nonce, "expires_in": 30}))
        auth = _json.loads(await ws.recv())
        t.auth = auth
        self.attempts += 1
        accepted, rejected = [], []
        for e in auth["agents"]:
            a = e["address"]
            text = f"tunnel-gateway:v1:{self.domain}:{a}:{nonce}:{auth['timestamp']}".encode()
            if not eip191_ref.verify(a, text, e["signature"]):
                rejected.append({"address": a, "error": "signature_verification_failed"})
            elif a in self.refuse:
                rejected.append({"address": a, "error": self.refuse[a]})
            else:
                accepted.append(a)
        if not accepted:
            err = rejected[0]["error"] if rejected else "no_agents"
            await ws.send(_json.dumps({"type": "auth_error", "error": err, "message": "refused"}))
            await ws.close(4001 if err.startswith("signature") else 4003)
            return
        t.addrs = accepted
        await ws.send(_json.dumps({
            "type": "auth_ok", "region": "fake", "ping_interval": self.ping_interval,
            "agents": [{"address": a, "url": f"http://{a}.{self.domain}:{self.port}"}
                       for a in accepted],
            "rejected": rejected}))
        t.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                    header_encoding="utf-8"))
        t.h2.initiate_connection()
        await t._send_h2()
        with self.new_tunnel:
            self.tunnels.append(t)
            self.new_tunnel.notify_all()
        try:
            async for msg in ws:
                if t.silent:
                    continue
                if isinstance(msg, bytes):
                    t._on_h2(msg)
                    await t._send_h2()
                else:
                    m = _json.loads(msg)
                    t.texts.append(m)
                    await self._on_text(t, m)
        except websockets.ConnectionClosed:
            pass
        except Exception:
            import traceback
            traceback.print_exc()
            raise
        finally:
            t.closed.set()

    async def _on_text(self, t, m):
        if m["type"] == "request_challenge":
            t.nonce = secrets.token_hex(32)
            await t.ws.send(_json.dumps({"type": "challenge", "nonce": t.nonce, "expires_in": 30}))
        elif m["type"] == "add_agent":
            a = m["address"]
            text = f"tunnel-gateway:v1:{self.domain}:{a}:{t.nonce}:{m['timestamp']}".encode()
            if not eip191_ref.verify(a, text, m["signature"]):
                await t.ws.send(_json.dumps({"type": "error", "address": a,
                                             "error": "signature_verification_failed"}))
            elif a in self.refuse:
                await t.ws.send(_json.dumps({"type": "error", "address": a,
                                             "error": self.refuse[a]}))
            else:
                if a not in t.addrs:
                    t.addrs.append(a)
                await t.ws.send(_json.dumps({"type": "agent_added", "address": a,
                                             "url": f"http://{a}.{self.domain}:{self.port}",
                                             "region": "fake"}))
        elif m["type"] == "remove_agent":
            if m["address"] in t.addrs:
                t.addrs.remove(m["address"])
                await t.ws.send(_json.dumps({"type": "agent_removed", "address": m["address"],
                                             "reason": "removed"}))

    def wait_tunnels(self, n, timeout=15):
        """Waits until n tunnels have authenticated; returns the n-th."""
        with self.new_tunnel:
            ok = self.new_tunnel.wait_for(lambda: len(self.tunnels) >= n, timeout)
        if not ok:
            raise TimeoutError(f"{len(self.tunnels)} tunnels, wanted {n}")
        t = self.tunnels[n - 1]
        if not t.settings_seen.wait(10):
            raise TimeoutError("no SETTINGS from the agent")
        return t

    def stop(self):
        async def go():
            self.server.close()
        try:
            asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)
        except Exception:
            pass
        self.thread.join(5)
