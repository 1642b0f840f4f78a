"""The tunnel end to end: curl (HTTP/1.1 and HTTP/2) -> tunnel-gateway ->
native tunnel -> tunnel-agent -> a local API, all real processes on loopback.
Asserts statuses, headers and bytes; memory bounds only in release builds."""

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from local_api import LocalApi, det_bytes, stream_digest
from tunnel_env import SANITIZED, TIME_SCALE, Agent, Gateway, reserve_port, wait_for

MiB = 1 << 20
HTTP = ["--http1.1", "--http2"]


class Env:
    pass


@pytest.fixture(scope="module")
def env(build_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tunnel")
    e = Env()
    e.tmp = tmp
    e.api = LocalApi()
    # a header limit below nghttp2's own receive limit (64 KiB), so that h2
    # clients get our 431 rather than nghttp2's REFUSED_STREAM
    e.gw = Gateway(build_dir, tmp, "--max-header-bytes", "32768")
    e.agent = Agent(build_dir, tmp)
    e.addr = e.agent.new("api", e.api.url)
    e.agent.cli("set", "api", "--max-inflight", "1000")
    e.dead_addr = e.agent.new("dead", f"http://127.0.0.1:{reserve_port()}")
    e.agent.run(e.gw)
    e.agent.wait_connected(timeout=30)
    e.host = f"{e.addr}.localhost"
    e.base = f"https://{e.host}:{e.gw.port}"
    yield e
    e.agent.stop()
    e.gw.stop()
    e.api.stop()


def curl(e, path, *args, http="--http1.1", host=None, timeout=60, check=True):
    """Runs curl; returns (status, headers dict of lists, body bytes)."""
    url = f"https://{host or e.host}:{e.gw.port}{path}"
    hdr_file = e.tmp / f"h{threading.get_ident()}-{random.random()}"
    # every host name goes to the gateway on 127.0.0.1
    r = subprocess.run(["curl", "-sS", http, "--cacert", str(e.gw.ca), "-D", str(hdr_file),
                        "--connect-to", "::127.0.0.1:", *args, url], capture_output=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"curl {path} failed ({r.returncode}): {r.stderr.decode()}")
    heads = {}
    status = 0
    if hdr_file.exists():
        for line in hdr_file.read_text(errors="replace").splitlines():
            if line.startswith("HTTP/"):
                status = int(line.split()[1])
                heads = {}
            elif ":" in line:
                k, v = line.split(":", 1)
                heads.setdefault(k.strip().lower(), []).append(v.strip())
        hdr_file.unlink()
    return status, heads, r.stdout


@pytest.mark.parametrize("http", HTTP)
def test_methods_headers_and_bodies(env, http):
    e = env
    st, h, body = curl(e, "/echo/a?x=1&y=%20z", "-H", "X-Rep: a", "-H", "X-Rep: b",
                       "-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Agent-Address: 0xevil",
                       "-H", "X-Tunnel-Origin: local", "-H", "Cookie: c=1",
                       "-H", "Authorization: Bearer t", http=http)
    assert st == 200
    j = json.loads(body)
    assert j["method"] == "GET" and j["path"] == "/echo/a?x=1&y=%20z"
    hd = j["headers"]
    assert hd["x-rep"] == ["a", "b"] or hd["x-rep"] == ["a, b"]
    assert hd["x-forwarded-for"] == ["127.0.0.1"]           # the client's value replaced
    assert hd["x-forwarded-proto"] == ["https"]
    assert hd["x-forwarded-host"] == [f"{e.host}:{e.gw.port}"]
    assert hd["x-agent-address"] == [e.addr]
    assert hd["x-tunnel-origin"] == ["public"]
    assert len(hd["x-agent-id"][0]) == 36
    assert hd["host"] == [f"127.0.0.1:{e.api.port}"]
    assert hd["cookie"] == ["c=1"] and hd["authorization"] == ["Bearer t"]

    data = os.urandom(100_000)
    (e.tmp / "post.bin").write_bytes(data)
    st, h, body = curl(e, "/echo", "--data-binary", f"@{e.tmp / 'post.bin'}", http=http)
    j = json.loads(body)
    assert st == 200 and j["method"] == "POST" and j["len"] == len(data)
    assert j["sha256"] == hashlib.sha256(data).hexdigest()

    st, h, body = curl(e, "/echo", "--data-binary", f"@{e.tmp / 'post.bin'}",
                       "-H", "Transfer-Encoding: chunked", http=http)
    assert json.loads(body)["sha256"] == hashlib.sha256(data).hexdigest()

    st, h, body = curl(e, "/echo", "-X", "POST", "--data-binary", "", http=http)
    assert st == 200 and json.loads(body)["len"] == 0
    st, h, body = curl(e, "/echo", "-X", "DELETE", http=http)
    assert st == 200 and json.loads(body)["method"] == "DELETE"
    # HEAD: the length of the GET, no body (curl -I prints the head on stdout)
    st, h, body = curl(e, "/bytes?n=1000", "-I", http=http)
    assert st == 200 and h["content-length"] == ["1000"] and body.endswith(b"\r\n\r\n")
    for code in (204, 304):
        st, h, body = curl(e, f"/status/{code}", http=http)
        assert st == code and body == b""
    st, h, body = curl(e, "/cookies", http=http)
    assert st == 200 and h["set-cookie"] == ["a=1; Path=/", "b=2; Path=/"]
    st, h, body = curl(e, "/chunked?n=300000&seed=3", http=http)
    assert st == 200 and len(body) == 300000


@pytest.mark.parametrize("http", HTTP)
def test_100_concurrent_binary_bodies(env, http):
    e = env
    rnd = random.Random(1 if http == "--http1.1" else 2)
    cfg = []
    expect = []
    for i in range(100):
        n = rnd.randrange(0, MiB + 1)
        p = e.tmp / f"in{i}"
        data = rnd.randbytes(n)
        p.write_bytes(data)
        expect.append(hashlib.sha256(data).hexdigest())
        cfg.append(f'url = "{e.base}/upload?id=c{i}"\ndata-binary = "@{p}"\n'
                   f'output = "{e.tmp / f"out{i}"}"\ncacert = "{e.gw.ca}"\n{http[2:]}\nmax-time = 60\n')
    (e.tmp / "curl.cfg").write_text("next\n".join(cfg))
    # options must be repeated per transfer: "next" resets them
    r = subprocess.run(["curl", "-sS", "-Z", "--parallel-max", "100",
                        "-K", str(e.tmp / "curl.cfg")], capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr
    for i in range(100):
        got = json.loads((e.tmp / f"out{i}").read_bytes())
        assert got.get("sha256") == expect[i], (i, got)
    # and downloads: bytes back identical
    cfg = []
    for i in range(100):
        n = rnd.randrange(0, MiB + 1)
        cfg.append(f'url = "{e.base}/bytes?n={n}&seed={i}"\noutput = "{e.tmp / f"dl{i}"}"\n'
                   f'cacert = "{e.gw.ca}"\n{http[2:]}\n')
        expect[i] = hashlib.sha256(random.Random(str(i)).randbytes(n)).hexdigest()
    (e.tmp / "curl2.cfg").write_text("next\n".join(cfg))
    r = subprocess.run(["curl", "-sS", "-Z", "--parallel-max", "100",
                        "-K", str(e.tmp / "curl2.cfg")], capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr
    for i in range(100):
        assert hashlib.sha256((e.tmp / f"dl{i}").read_bytes()).hexdigest() == expect[i], i


@pytest.mark.parametrize("http", HTTP)
def test_sse_events_arrive_spaced(env, http):
    e = env
    p = subprocess.Popen(["curl", "-sSN", http, "--cacert", str(e.gw.ca),
                          f"{e.base}/sse?n=20&interval_ms=100"], stdout=subprocess.PIPE)
    arrivals = []
    for line in p.stdout:
        if line.startswith(b"data:"):
            arrivals.append(time.monotonic())
    p.wait(30)
    assert len(arrivals) == 20
    # written 100 ms apart: they must arrive spread out, not in one burst
    assert arrivals[-1] - arrivals[0] >= 1.5
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(1 for g in gaps if g >= 0.05) >= 15, gaps


def sample_rss(procs, stop, peaks):
    while not stop.is_set():
        for i, p in enumerate(procs):
            try:
                peaks[i] = max(peaks[i], p.rss_kib())
            except (FileNotFoundError, ProcessLookupError):
                pass
        time.sleep(0.05)


def with_rss(e, fn):
    procs = [e.gw, e.agent.proc]
    base = [p.rss_kib() for p in procs]
    peaks = list(base)
    stop = threading.Event()
    t = threading.Thread(target=sample_rss, args=(procs, stop, peaks))
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return [(pk - b) / 1024 for pk, b in zip(peaks, base)]


@pytest.mark.skipif(SANITIZED, reason="memory bounds apply to release builds")
def test_1gib_download_and_upload_bounded_memory(env):
    e = env
    n = 1 << 30

    def down():
        p = subprocess.run(["curl", "-sS", "--cacert", str(e.gw.ca), f"{e.base}/stream?n={n}"],
                           stdout=subprocess.PIPE, timeout=600)
        assert p.returncode == 0 and len(p.stdout) == n
        assert hashlib.sha256(p.stdout).hexdigest() == stream_digest(n)

    growth = with_rss(e, down)
    assert max(growth) <= 32, f"RSS growth MiB gateway/agent: {growth}"

    big = e.tmp / "big.bin"
    with open(big, "wb") as f:
        f.truncate(n)  # sparse: reads as zeros
    zero_digest = hashlib.sha256()
    chunk = bytes(MiB)
    for _ in range(n // MiB):
        zero_digest.update(chunk)

    def up():
        # -T streams the file (--data-binary would load 1 GiB into curl)
        st, h, body = curl(e, "/upload?id=big", "-T", str(big), "-X", "POST", timeout=600)
        j = json.loads(body)
        assert j["len"] == n and j["sha256"] == zero_digest.hexdigest()

    growth = with_rss(e, up)
    big.unlink()
    assert max(growth) <= 32, f"RSS growth MiB gateway/agent: {growth}"


@pytest.mark.skipif(SANITIZED, reason="memory bounds apply to release builds")
def test_slow_reader_bounded_and_stopped_reader_does_not_stall_others(env):
    e = env
    n = 64 * MiB

    def slow():
        p = subprocess.run(["curl", "-sS", "--limit-rate", "2M", "--cacert", str(e.gw.ca),
                            f"{e.base}/stream?n={n}"], stdout=subprocess.PIPE, timeout=120)
        assert p.returncode == 0 and len(p.stdout) == n
        assert hashlib.sha256(p.stdout).hexdigest() == stream_digest(n)

    growth = with_rss(e, slow)
    assert max(growth) <= 32, f"RSS growth MiB gateway/agent: {growth}"

    # a stopped reader on the same tunnel must not slow another download; it
    # is stopped only once its response streams (a reader stopped before its
    # first byte would hold nothing on the tunnel and prove nothing)
    got = e.tmp / "stopped.out"
    stopped = subprocess.Popen(["curl", "-sS", "--cacert", str(e.gw.ca),
                                f"{e.base}/stream?n={1 << 30}", "-o", str(got)])
    try:
        wait_for(lambda: got.exists() and got.stat().st_size >= MiB, 10, "bytes at the reader")
        os.kill(stopped.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        p = subprocess.run(["curl", "-sS", "--cacert", str(e.gw.ca), f"{e.base}/stream?n={n}"],
                           stdout=subprocess.PIPE, timeout=60)
        assert p.returncode == 0 and len(p.stdout) == n
        assert time.monotonic() - t0 < 30 * TIME_SCALE
    finally:
        os.kill(stopped.pid, signal.SIGKILL)
        stopped.wait()
        got.unlink(missing_ok=True)


def test_upload_streams_before_client_finishes_and_slow_local_reader(env):
    """The local API sees an upload's first bytes while the client still sends."""
    import http.client
    import ssl
    e = env
    ctx = ssl.create_default_context(cafile=str(e.gw.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", e.gw.port, context=ctx, timeout=30)
    seen_first = {}

    def body():
        yield os.urandom(64 * 1024)
        # do not send more until the local API has the first bytes
        wait_for(lambda: "stream1" in e.api.state.first_byte, 10, "first byte at the local API")
        seen_first["at"] = time.monotonic()
        for _ in range(64):
            yield os.urandom(64 * 1024)

    conn.putrequest("POST", "/upload?id=stream1&slow=8000000", skip_host=True)
    conn.putheader("Host", f"{e.host}:{e.gw.port}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for c in body():
        conn.send(b"%x\r\n%s\r\n" % (len(c), c))
    conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    j = json.loads(r.read())
    assert r.status == 200 and j["len"] == 65 * 64 * 1024
    assert "at" in seen_first


@pytest.mark.parametrize("http", HTTP)
@pytest.mark.parametrize("after_head", [False, True])
def test_client_disconnect_cancels_local_request(env, http, after_head):
    e = env
    hid = f"hold-{http}-{after_head}"
    q = f"/hold?id={hid}" + ("&after_head=1" if after_head else "")
    p = subprocess.Popen(["curl", "-sSN", http, "--cacert", str(e.gw.ca), e.base + q],
                         stdout=subprocess.PIPE)
    wait_for(lambda: hid in e.api.state.opened, 10, "request at the local API")
    if after_head:
        assert p.stdout.read(5) == b"hello"
    t0 = time.monotonic()
    p.kill()
    p.wait()
    wait_for(lambda: hid in e.api.state.closed, 5, "the local request closed")
    assert e.api.state.closed[hid] - t0 < 2.0 * TIME_SCALE


@pytest.mark.parametrize("http", HTTP)
def test_gateway_errors(env, http):
    e = env
    st, h, body = curl(e, "/x", http=http, host="0x" + "ab" * 20 + ".localhost")
    assert st == 502 and json.loads(body)["error"] == "agent_offline"
    st, h, body = curl(e, "/x", http=http, host=f"{e.dead_addr}.localhost")
    assert st == 502 and json.loads(body)["error"] == "local_unreachable"
    st, h, body = curl(e, "/x", http=http, host="not-an-address.localhost")
    assert st == 400 and json.loads(body)["error"] == "invalid_subdomain"
    st, h, body = curl(e, "/x", "-k", http=http, host="example.org")  # apex certificate
    assert st == 404 and json.loads(body)["error"] == "unknown_host"
    # two fields of 20 KB: over max-header-bytes (32 KiB here) in total
    st, h, body = curl(e, "/x", "-H", "X-Big1: " + "a" * 20000, "-H", "X-Big2: " + "b" * 20000,
                       http=http)
    assert st == 431 and json.loads(body)["error"] == "header_too_large"
    # the apex's own endpoints are not reachable on agent hosts: /health is the agent's
    st, h, body = curl(e, "/health", http=http)
    assert st == 404 and body == b'{"error":"nope"}'


def test_local_api_failing_mid_body_delivers_what_it_sent(env):
    """A local API that closes after part of its body: the caller gets every
    byte it sent, then sees the transfer cut (HTTP/1.1: curl's partial-file
    error; HTTP/2: RST_STREAM INTERNAL_ERROR after the DATA, read with
    python-h2 on a raw socket, since curl 7.88 drops DATA that arrives in the
    same read as the reset)."""
    import socket
    import ssl

    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    e = env
    sent = det_bytes(3000, "short")
    st, h, body = curl(e, "/short?n=3000&of=10000", check=False)
    assert (st, h["content-length"], body) == (200, ["10000"], sent)

    for _ in range(5):
        ctx = ssl.create_default_context(cafile=str(e.gw.ca))
        ctx.set_alpn_protocols(["h2"])
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", e.gw.port)),
                            server_hostname=e.host)
        s.settimeout(10)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":path", "/short?n=3000&of=10000"),
                              (":scheme", "https"), (":authority", f"{e.host}:{e.gw.port}")],
                          end_stream=True)
        s.sendall(conn.data_to_send())
        data, status, end = b"", None, None
        with s:
            while end is None:
                d = s.recv(65536)
                assert d, "connection closed before the stream ended"
                for ev in conn.receive_data(d):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = dict(ev.headers)[b":status"]
                    elif isinstance(ev, h2.events.DataReceived):
                        data += ev.data
                    elif isinstance(ev, h2.events.StreamReset):
                        end = ("reset", ev.error_code)
                    elif isinstance(ev, h2.events.StreamEnded):
                        end = ("end", None)
                s.sendall(conn.data_to_send())
        assert status == b"200"
        assert (len(data), data == sent) == (3000, True)
        assert end == ("reset", h2.errors.ErrorCodes.INTERNAL_ERROR)


def test_completed_and_cancelled_streams_do_not_leak_tunnel_window(env):
    """Every response byte must give its flow-control window back, also when
    the stream ended (or was cancelled) before the client had read it: a
    leak of one 16 KB response per request would exhaust the tunnel's 64 MiB
    connection window within ~4,200 requests and stall every stream."""
    e = env
    args = ["-H", f":authority: {e.host}:{e.gw.port}"]
    url = f"https://127.0.0.1:{e.gw.port}"
    r = subprocess.run(["h2load", "-n6000", "-c2", "-m20", *args, f"{url}/bytes?n=16000"],
                       capture_output=True, text=True, timeout=120)
    assert "6000 succeeded" in r.stdout, r.stdout
    r = subprocess.run(["h2load", "-c10", "-m20", "-D2", *args, f"{url}/bytes?n=262144"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["h2load", "-n200", "-c1", "-m100", *args, f"{url}/bytes?n=16000"],
                       capture_output=True, text=True, timeout=60)
    assert "200 succeeded" in r.stdout, r.stdout
