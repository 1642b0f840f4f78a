"""A smoke scenario with both daemons under valgrind's memcheck (release
build only: valgrind and AddressSanitizer do not mix): a gateway with TLS, an
agent daemon, a local HTTP API and a local WebSocket API; curl over HTTP/1.1
and HTTP/2 (GET, a POST body, chunked and event-stream responses, a client
that leaves mid-body, /health and /metrics), a WebSocket echo through the
tunnel, an Osaurus-mode relay client serving one request; then SIGTERM to
both. Each must exit 0 with valgrind's own error exit code (99) not taken:
no invalid read or write, no use of uninitialised memory, no definitely or
indirectly lost block at exit."""

import asyncio
import hashlib
import json
import re
import secrets
import shutil
import ssl
import subprocess
import time

import pytest
import websockets

from local_api import LocalApi, stream_digest
from tunnel_env import SANITIZED, Agent, Gateway, eip191_ref, wait_for
from ws_clients import PyClient
from ws_local_api import WsLocalApi

pytestmark = [
    pytest.mark.skipif(SANITIZED, reason="valgrind runs on the release build (not under ASan)"),
    pytest.mark.skipif(shutil.which("valgrind") is None,
                       reason="valgrind not installed (scripts/install-deps.sh installs it)"),
]

VG_ERR = 99
# memcheck slows the programs by 20-50x: every wait here is generous
SLOW = 20


def memcheck(log):
    return ["valgrind", "--tool=memcheck", f"--error-exitcode={VG_ERR}", "--leak-check=full",
            "--show-leak-kinds=definite,indirect", "--errors-for-leak-kinds=definite,indirect",
            "--track-origins=yes", "--num-callers=30", f"--log-file={log}"]


def curl(gw, host, path, *args, http="--http1.1", timeout=60 * SLOW):
    r = subprocess.run(["curl", "-sS", "-N", http, "--cacert", str(gw.ca), "-o", "-",
                        "-w", "\n%{http_code}", *args, f"https://{host}:{gw.port}{path}"],
                       capture_output=True, timeout=timeout)
    body, _, code = r.stdout.rpartition(b"\n")
    return r.returncode, int(code or 0), body


async def osaurus_round_trip(gw):
    """Registers one address in Osaurus mode, serves one request (a curl in
    the background) with a response frame, returns curl's result."""
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    t = 60 * SLOW
    async with websockets.connect(f"wss://localhost:{gw.port}/tunnel/connect", ssl=ctx,
                                  max_size=None, open_timeout=t, close_timeout=t,
                                  ping_interval=None) as ws:
        ch = json.loads(await asyncio.wait_for(ws.recv(), t))
        d = secrets.randbelow(eip191_ref.N - 1) + 1
        raw = eip191_ref.address_from_priv(d)
        checksum = eip191_ref.to_checksum(raw)
        ts = int(time.time())
        sig = eip191_ref.sign(d, f"osaurus-tunnel:{checksum}:{ch['nonce']}:{ts}".encode())
        await ws.send(json.dumps({"type": "auth", "nonce": ch["nonce"], "timestamp": ts,
                                  "agents": [{"address": checksum,
                                              "signature": "0x" + sig.hex()}]}))
        ok = json.loads(await asyncio.wait_for(ws.recv(), t))
        assert ok["type"] == "auth_ok", ok
        host = f"0x{raw.hex()}.localhost"
        cu = asyncio.create_task(asyncio.to_thread(curl, gw, host, "/osr", "--data-binary",
                                                   "ping ✓", "-H", "Content-Type: text/plain"))
        while True:
            f = json.loads(await asyncio.wait_for(ws.recv(), t))
            if f["type"] == "ping":
                await ws.send(json.dumps({"type": "pong", "ts": f["ts"]}))
                continue
            break
        assert f["type"] == "request" and f["body"] == "ping ✓", f
        await ws.send(json.dumps({"type": "response", "id": f["id"], "status": 200,
                                  "headers": {"Content-Type": "text/plain"},
                                  "body": "pong ✓"}))
        return await asyncio.wait_for(cu, t)


def test_smoke_scenario_clean_under_memcheck(build_dir, tmp_path):
    api = LocalApi()
    wsapi = WsLocalApi()
    gw_vg, ag_vg = tmp_path / "gateway.vg", tmp_path / "agent.vg"
    gw = agent = None
    client = None
    try:
        gw = Gateway(build_dir, tmp_path, wrap=memcheck(gw_vg), start_timeout=60 * SLOW)
        agent = Agent(build_dir, tmp_path)
        addr = agent.new("api", api.url)
        ws_addr = agent.new("ws", wsapi.url)
        agent.run(gw, wrap=memcheck(ag_vg))
        agent.wait_connected(timeout=60 * SLOW)
        host, ws_host = f"{addr}.localhost", f"{ws_addr}.localhost"

        for http in ("--http1.1", "--http2"):
            rc, st, body = curl(gw, host, "/echo/x?q=1", "-H", "X-A: 1", http=http)
            assert (rc, st) == (0, 200) and json.loads(body)["path"] == "/echo/x?q=1"
            payload = bytes(range(256)) * 1024
            (tmp_path / "up").write_bytes(payload)
            rc, st, body = curl(gw, host, "/upload", "--data-binary", f"@{tmp_path / 'up'}",
                                http=http)
            assert (rc, st) == (0, 200)
            assert json.loads(body) == {"len": len(payload),
                                        "sha256": hashlib.sha256(payload).hexdigest()}
            rc, st, body = curl(gw, host, "/stream?n=3000000", http=http)
            assert (rc, st, len(body)) == (0, 200, 3000000)
            assert hashlib.sha256(body).hexdigest() == stream_digest(3000000)
            rc, st, body = curl(gw, host, "/chunked?n=200000", http=http)
            assert (rc, st, len(body)) == (0, 200, 200000)
            rc, st, body = curl(gw, host, "/sse?n=5&interval_ms=20", http=http)
            assert (rc, st) == (0, 200) and body.count(b"data: ") == 5
            # a client that leaves halfway: the stream is cancelled on both sides
            rc, st, body = curl(gw, host, "/slowbytes?n=100000&chunk=1000&interval_ms=20",
                                "--max-time", "2", http=http)
            assert rc == 28, (rc, st)
            rc, st, body = curl(gw, "localhost", "/health", http=http)
            assert (rc, st) == (0, 200) and json.loads(body)["status"] == "ok"
        rc, st, body = curl(gw, "localhost", "/metrics")
        assert (rc, st) == (0, 200) and b"tunnel_gateway_" in body

        client = PyClient(gw.ca)
        client.open("e", f"wss://{ws_host}:{gw.port}/echo?id=e")
        client.wait_open("e", 60 * SLOW)
        for msg in ("hello", "x" * 70000):
            client.send_text("e", msg)
            m = client.next_message("e", 60 * SLOW)
            assert m["data"] == msg.encode()
        client.close("e", 1000, "bye")
        client.wait("e", "close", 60 * SLOW)

        rc, st, body = asyncio.run(osaurus_round_trip(gw))
        assert (rc, st, body) == (0, 200, "pong ✓".encode())
    finally:
        if client is not None:
            client.stop()
        if agent is not None:
            agent_rc = agent.proc.stop(timeout=120 * SLOW) if agent.proc else None
        if gw is not None:
            gw_rc = gw.stop(timeout=120 * SLOW)
        api.stop()
        wsapi.stop()
    for name, rc, vg in (("agent", agent_rc, ag_vg), ("gateway", gw_rc, gw_vg)):
        report = vg.read_text(errors="replace")
        assert re.search(r"ERROR SUMMARY: 0 errors", report), f"{name}:\n{report[-6000:]}"
        assert rc == 0, f"{name} exited {rc}:\n{report[-6000:]}"
        assert "Invalid read" not in report and "Invalid write" not in report
        for kind in ("definitely", "indirectly"):
            m = re.search(rf"{kind} lost: ([\d,]+) bytes", report)
            assert m is None or m.group(1) == "0", f"{name}: {m.group(0)}\n{report[-6000:]}"
