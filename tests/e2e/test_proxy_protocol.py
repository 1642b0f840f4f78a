"""PROXY protocol v2 (--proxy-protocol) end to end: HAProxy from Debian in
TCP mode with `send-proxy-v2` in front of the gateway's TLS listener, the
agent's tunnel and the clients both through it; clients bind other loopback
addresses (127.0.0.5, 127.0.0.6) so that the address the header carries
differs from the socket's peer (HAProxy on 127.0.0.1). Raw sockets check the
listener's side: no header, a version 1 header, a header in pieces, LOCAL,
and max-conns-per-ip counted per header address."""

import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest

from local_api import LocalApi
from tunnel_env import Agent, Gateway, Proc, reserve_port, wait_for

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def pp2(src, sport, dst="127.0.0.1", dport=443, cmd=1):
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(">HH", sport, dport)
    return SIG + bytes([0x20 | cmd, 0x11]) + struct.pack(">H", len(block)) + block


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Env:
    pass


@pytest.fixture(scope="module")
def env(build_dir, tmp_path_factory):
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy not installed (scripts/install-deps.sh installs it)")
    tmp = tmp_path_factory.mktemp("pp")
    e = Env()
    e.tmp = tmp
    e.api = LocalApi()
    # --open: with --proxy-protocol a loopback listener is not enough for the
    # gateway to take "open" as its default (test_open_needs_a_word)
    e.gw = Gateway(build_dir, tmp, "--proxy-protocol", "--open", "--plain-listen", "127.0.0.1:0",
                   "--max-conns-per-ip", "3")
    ports = re.findall(r"event=listening addr=\S+ port=(\d+) scheme=(\w+)", e.gw.text())
    e.plain = next(int(p) for p, sch in ports[1:] if sch == "http")
    e.front = reserve_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""global
    log stderr format short local0 info
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend front
    bind 127.0.0.1:{e.front}
    default_backend gw
backend gw
    server gw 127.0.0.1:{e.gw.port} send-proxy-v2 source 127.0.0.9
""")
    e.haproxy = Proc(["haproxy", "-db", "-f", cfg], tmp / "haproxy.log")
    wait_for(lambda: listening(e.front), 20, "haproxy listening")
    e.agent = Agent(build_dir, tmp)
    e.addr = e.agent.new("api", e.api.url)
    # the agent dials HAProxy: its tunnel arrives with a header too
    front_gw = Env()
    front_gw.scheme, front_gw.domain, front_gw.port, front_gw.ca = \
        "https", "localhost", e.front, e.gw.ca
    e.agent.run(front_gw)
    e.agent.wait_connected(timeout=30)
    e.host = f"{e.addr}.localhost"
    yield e
    e.agent.stop()
    e.haproxy.stop()
    e.gw.stop()
    e.api.stop()


def curl(e, path, *args, http="--http1.1", src="127.0.0.5", host=None):
    r = subprocess.run(["curl", "-sS", http, "--interface", src, "--cacert", str(e.gw.ca),
                        "--connect-to", f"::127.0.0.1:{e.front}", "-w", "\n%{http_code}",
                        *args, f"https://{host or e.host}:{e.front}{path}"],
                       capture_output=True, timeout=60)
    body, _, code = r.stdout.rpartition(b"\n")
    return r.returncode, int(code or 0), body, r.stderr.decode(errors="replace")


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_client_address_from_the_header(env, http):
    e = env
    mark = e.gw.mark()
    rc, st, body, err = curl(e, "/echo/pp", "-H", "X-Forwarded-For: 6.6.6.6", http=http)
    assert (rc, st) == (0, 200), err
    h = json.loads(body)["headers"]
    # the header's source, not HAProxy's 127.0.0.1, nor the client's claim
    assert h["x-forwarded-for"] == ["127.0.0.5"], h
    assert e.gw.wait_log(r"event=request .*client=127\.0\.0\.5 .*status=200", since=mark)


def test_tunnel_came_through_haproxy(env):
    # the agent's only way in is HAProxy (a listener with --proxy-protocol
    # closes anything else), which connects from 127.0.0.9: the tunnel's peer
    # is the agent's own 127.0.0.1, from the header
    assert re.search(r"event=tunnel_up .*peer=127\.0\.0\.1", env.gw.text())
    assert "peer=127.0.0.9" not in env.gw.text()
    assert re.search(r"event=agent_registered .*addr=" + env.addr, env.gw.text())


def raw(port, data, read=True, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    if not read:
        return s
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except ConnectionResetError:
        pass  # closed with our bytes unread: a reset, as good as a close here
    s.close()
    return out


def test_direct_connection_without_header_is_closed(env):
    e = env
    mark = e.gw.mark()
    # TLS straight to the listener: closed before any TLS byte comes back
    ctx = ssl.create_default_context(cafile=str(e.gw.ca))
    with socket.create_connection(("127.0.0.1", e.gw.port), timeout=10) as s:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ctx.wrap_socket(s, server_hostname="localhost")
    assert e.gw.wait_log(r"event=proxy_header_refused err=no_proxy_header", since=mark)
    # plain HTTP on the cleartext listener: no answer at all, the connection closed
    mark = e.gw.mark()
    assert raw(e.plain, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n") == b""
    assert e.gw.wait_log(r"event=proxy_header_refused err=no_proxy_header peer=127\.0\.0\.1",
                         since=mark)
    mark = e.gw.mark()
    assert raw(e.plain, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET /health HTTP/1.1\r\n\r\n") == b""
    assert e.gw.wait_log(r"event=proxy_header_refused err=proxy_v1_not_accepted", since=mark)
    rc, st, body, err = curl(e, "/health", host="localhost")  # through HAProxy, still served
    assert (rc, st) == (0, 200), err
    rc, st, body, err = curl(e, "/metrics", host="localhost")
    assert (rc, st) == (0, 200), err
    assert re.search(rb'tunnel_gateway_rate_limited_total\{kind="proxy_header"\} [1-9]',
                     body), body[-3000:]


def metric(e, kind):
    rc, st, body, err = curl(e, "/metrics", host="localhost")
    assert (rc, st) == (0, 200), err
    m = re.search(rb'^tunnel_gateway_rate_limited_total\{kind="%s"\} (\d+)$' % kind.encode(),
                  body, re.M)
    return int(m.group(1))


def test_refusal_lines_are_bounded(env):
    """40 bad connections at once: each counted, at most 5 lines a second on
    the listener, and every refusal accounted for: the lines plus the
    unlogged=N they report add up to the refusals before the last line."""
    e = env
    before = metric(e, "proxy_header")
    mark = e.gw.mark()
    for _ in range(40):
        raw(e.plain, b"GET / HTTP/1.1\r\n\r\n")
    wait_for(lambda: metric(e, "proxy_header") >= before + 40, 10, "40 refusals counted")
    lines = re.findall(r"event=proxy_header_refused .*", e.gw.text(mark))
    assert 1 <= len(lines) <= 10, len(lines)  # at most two one-second windows

    def unlogged_line():
        raw(e.plain, b"x")
        return re.search(r"event=proxy_header_refused .*unlogged=[1-9]", e.gw.text(mark))
    wait_for(unlogged_line, 10, "a line with unlogged=N", interval=0.2)
    lines = re.findall(r"event=proxy_header_refused .*port=%d .*unlogged=(\d+)" % e.plain,
                       e.gw.text(mark))
    accounted = len(lines) + sum(int(n) for n in lines)
    assert before + 40 <= before + accounted <= metric(e, "proxy_header"), \
        (accounted, lines)


def test_header_in_pieces_then_request_in_the_same_write(env):
    e = env
    h = pp2("198.51.100.20", 40000)
    s = socket.create_connection(("127.0.0.1", e.plain), timeout=10)
    s.sendall(h[:5])
    s.sendall(h[5:17])
    # the header's last bytes and the request together: nothing past the
    # header may be swallowed by the header reader
    s.sendall(h[17:] + b"GET /echo/x HTTP/1.1\r\nHost: " + e.host.encode() +
              b"\r\nConnection: close\r\n\r\n")
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["headers"]["x-forwarded-for"] == ["198.51.100.20"]


def test_local_command_uses_the_socket_peer(env):
    e = env
    out = raw(e.plain, pp2("198.51.100.30", 1, cmd=0) +
              b"GET /echo/l HTTP/1.1\r\nHost: " + e.host.encode() + b"\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["headers"]["x-forwarded-for"] == ["127.0.0.1"]


def test_connection_limit_counts_the_header_address(env):
    e = env
    req = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    held = []
    for i in range(3):
        # each held connection waits on a request the local API holds open, so
        # its header was read and its slot is taken
        hold = (f"GET /hold?id=pp{i} HTTP/1.1\r\nHost: {e.host}\r\n\r\n").encode()
        held.append(raw(e.plain, pp2("198.51.100.40", 1000 + i) + hold, read=False))
        wait_for(lambda: f"pp{i}" in e.api.state.opened, 10, f"hold pp{i} at the local API")
    try:
        # a fourth from the same client address: over --max-conns-per-ip 3
        out = raw(e.plain, pp2("198.51.100.40", 2000) + req)
        assert out.startswith(b"HTTP/1.1 429"), out[:200]
        # another client behind the same balancer is not affected
        out = raw(e.plain, pp2("198.51.100.41", 2000) + req)
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
    finally:
        for s in held:
            s.close()


def test_open_needs_a_word(build_dir, tmp_path):
    """Behind a balancer the world's clients arrive on a loopback listener:
    --proxy-protocol without --allow or --open is refused at start."""
    r = subprocess.run([str(build_dir / "gateway/tunnel-gateway"), "--check-config",
                        "--state-dir", str(tmp_path), "--proxy-protocol"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--proxy-protocol puts a load balancer's clients on this gateway" in r.stderr + r.stdout
    r = subprocess.run([str(build_dir / "gateway/tunnel-gateway"), "--check-config",
                        "--state-dir", str(tmp_path), "--proxy-protocol", "--open"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_partial_header_times_out(env):
    e = env
    mark = e.gw.mark()
    s = raw(e.plain, SIG[:6], read=False, timeout=30)
    t0 = time.monotonic()
    assert s.recv(1) == b""  # closed by the gateway, not by us
    took = time.monotonic() - t0
    s.close()
    assert 5 <= took <= 25, took
    assert e.gw.wait_log(r"event=proxy_header_refused err=timeout", since=mark)
