"""Gateway options on the request path, each with a real gateway + agent:
the cleartext listener (ws:// tunnel, HTTP/1.1 and h2c prior knowledge),
--allow, max-streams-per-tunnel, response-header-timeout, max-body-bytes."""

import json
import subprocess
import threading
import time

import pytest

from local_api import LocalApi
from tunnel_env import TIME_SCALE, Agent, Gateway, wait_for


@pytest.fixture
def api():
    a = LocalApi()
    yield a
    a.stop()


def start(build_dir, tmp, api, *gw_args, name="gw"):
    gw = Gateway(build_dir, tmp, *gw_args, name=name)
    ag = Agent(build_dir, tmp, name=f"{name}-agent")
    addr = ag.new("api", api.url)
    ag.cli("set", "api", "--max-inflight", "1000")
    ag.run(gw)
    return gw, ag, addr


def curl(url, *args, host, port, timeout=30):
    r = subprocess.run(["curl", "-sS", "--connect-to", f"{host}:{port}:127.0.0.1:{port}",
                        "-w", "\n%{http_code}", *args, url],
                       capture_output=True, text=True, timeout=timeout)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def test_cleartext_gateway_ws_tunnel_and_h2c(build_dir, tmp_path, api):
    gw, ag, addr = start(build_dir, tmp_path, api, "--no-tls")
    try:
        assert gw.scheme == "http"
        ag.wait_connected(timeout=30)
        host = f"{addr}.localhost"
        url = f"http://{host}:{gw.port}/echo"
        for proto in ("--http1.1", "--http2-prior-knowledge"):
            code, body = curl(url, proto, host=host, port=gw.port)
            assert code == 200, body
            j = json.loads(body)
            assert j["headers"]["x-forwarded-proto"] == ["http"]
            assert j["headers"]["x-agent-address"] == [addr]
    finally:
        ag.stop()
        assert gw.stop() == 0


def test_allow_list_refuses_unlisted_address(build_dir, tmp_path, api):
    allow = tmp_path / "allow.txt"
    allow.write_text("# nobody yet\n")
    gw = Gateway(build_dir, tmp_path, "--allow", allow, name="gw-allow")
    ag = Agent(build_dir, tmp_path, name="allow-agent")
    addr = ag.new("api", api.url)
    try:
        ag.run(gw)
        # refused: the agent shows why and does not loop
        st = wait_for(lambda: (s := ag.status()) and s["agents"][0]["state"] == "error" and s,
                      30, "agent in error state")
        assert "address_not_allowed" in json.dumps(st["agents"][0])
        ag.stop()
        # listed after a reload (SIGHUP): registered
        import signal
        allow.write_text(addr + "\n")
        gw.mark()
        gw.p.send_signal(signal.SIGHUP)
        gw.wait_log(r"event=reloaded what=allow addresses=1")
        ag.run(gw)
        ag.wait_connected(timeout=30)
        host = f"{addr}.localhost"
        code, body = curl(f"https://{host}:{gw.port}/echo", "--cacert", str(gw.ca), host=host,
                          port=gw.port)
        assert code == 200
        # SIGHUP with the address gone: the live tunnel loses it
        allow.write_text("")
        gw.p.send_signal(signal.SIGHUP)
        def offline():
            c, b = curl(f"https://{host}:{gw.port}/echo", "--cacert", str(gw.ca), host=host,
                        port=gw.port)
            return c == 502 and json.loads(b)["error"] == "agent_offline"
        wait_for(offline, 10, "address removed after SIGHUP")
    finally:
        ag.stop()
        assert gw.stop() == 0


def test_limits_host_busy_timeout_and_body_size(build_dir, tmp_path, api):
    gw, ag, addr = start(build_dir, tmp_path, api, "--max-streams-per-tunnel", "2",
                         "--response-header-timeout", "2", "--max-body-bytes", "100000")
    try:
        ag.wait_connected(timeout=30)
        host = f"{addr}.localhost"
        base = f"https://{host}:{gw.port}"
        ca = ["--cacert", str(gw.ca)]
        # 504 after the response-header timeout, and the local request is closed
        t0 = time.monotonic()
        code, body = curl(f"{base}/hold?id=t1", *ca, host=host, port=gw.port)
        assert code == 504 and json.loads(body)["error"] == "gateway_timeout"
        assert 1.5 <= time.monotonic() - t0 < 6 * TIME_SCALE
        wait_for(lambda: "t1" in api.state.closed, 5, "local request closed after 504")
        # two streams held: the third is answered 503 host_busy at once
        held = [subprocess.Popen(["curl", "-sS", "-N", *ca, "--connect-to",
                                  f"{host}:{gw.port}:127.0.0.1:{gw.port}",
                                  f"{base}/hold?id=h{i}&after_head=1"],
                                 stdout=subprocess.DEVNULL) for i in range(2)]
        try:
            wait_for(lambda: "h0" in api.state.opened and "h1" in api.state.opened, 10,
                     "two held requests")
            t0 = time.monotonic()
            code, body = curl(f"{base}/echo", *ca, host=host, port=gw.port)
            assert code == 503 and json.loads(body)["error"] == "host_busy"
            assert time.monotonic() - t0 < 2 * TIME_SCALE
        finally:
            for p in held:
                p.kill()
                p.wait()
        # bodies: an announced length over the limit, and a chunked one
        big = tmp_path / "big.bin"
        big.write_bytes(b"x" * 200000)
        code, body = curl(f"{base}/upload", *ca, "--data-binary", f"@{big}", host=host,
                          port=gw.port)
        assert code == 413 and json.loads(body)["error"] == "body_too_large"
        code, body = curl(f"{base}/upload", *ca, "--data-binary", f"@{big}", "-H",
                          "Transfer-Encoding: chunked", host=host, port=gw.port)
        assert code == 413, body
        code, body = curl(f"{base}/upload", *ca, "--data-binary", "small", host=host,
                          port=gw.port)
        assert code == 200 and json.loads(body)["len"] == 5
    finally:
        ag.stop()
        assert gw.stop() == 0


def test_redis_needs_the_node_listener_and_the_secret(build_dir, tmp_path):
    """--redis alone would make a node that others cannot forward to: refused
    at start with exit 2, naming what is missing; --help documents the group."""
    exe = f"{build_dir}/gateway/tunnel-gateway"
    r = subprocess.run([exe, "--redis", "redis://127.0.0.1:6399", "--listen", "127.0.0.1:0",
                        "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r
    assert "--node-listen" in r.stderr and "--cluster-secret-file" in r.stderr, r.stderr
    h = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10)
    assert h.returncode == 0 and "Several nodes (Redis)" in h.stdout
    assert "Not yet" not in h.stdout
