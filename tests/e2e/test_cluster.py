"""Several nodes sharing routes in Redis (issue 12, PRODUCT.md "Beyond one
machine"): a real redis-server, three tunnel-gateway processes, HAProxy in
front where a test needs one, the agent daemon and a local API, all on
loopback. The agent's tunnel is on node A; requests come in through B and C
and are forwarded to A over the node-to-node HTTP/2 connection."""

import hashlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from cluster_env import Cluster, Haproxy, Node, write_secret
from local_api import LocalApi, stream_digest
from tunnel_env import SANITIZED, TIME_SCALE, Agent, wait_for
from ws_local_api import WsLocalApi

MiB = 1 << 20
HTTP = ["--http1.1", "--http2"]


def curl(node, addr, path, *args, http="--http1.1", timeout=60, check=True, tmp=None):
    """curl through node; (status, headers dict of lists, body)."""
    url = f"https://{addr}.localhost:{node.port}{path}"
    r = subprocess.run(["curl", "-sS", http, "--cacert", str(node.ca), "-D", "/dev/stderr",
                        "--connect-to", "::127.0.0.1:", *args, url], capture_output=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"curl {path} via {node.name} failed ({r.returncode}): "
                             f"{r.stderr.decode(errors='replace')[-500:]}")
    status, heads = 0, {}
    for line in r.stderr.decode(errors="replace").splitlines():
        if line.startswith("HTTP/"):
            status, heads = int(line.split()[1]), {}
        elif ":" in line and status:
            k, v = line.split(":", 1)
            heads.setdefault(k.strip().lower(), []).append(v.strip())
    return status, heads, r.stdout


class Env:
    pass


@pytest.fixture(scope="module")
def cl(build_dir, tmp_path_factory):
    """Redis, nodes a b c, the agent's tunnel on a."""
    tmp = tmp_path_factory.mktemp("cluster")
    e = Env()
    e.tmp = tmp
    e.api = LocalApi()
    e.wsapi = WsLocalApi()
    e.c = Cluster(build_dir, tmp)
    e.a, e.b, e.cc = e.c.nodes
    e.agent = Agent(build_dir, tmp)
    e.addr = e.agent.new("api", e.api.url)
    e.agent.cli("set", "api", "--max-inflight", "1000")
    e.ws_addr = e.agent.new("ws", e.wsapi.url)
    e.agent.run(e.a)
    e.agent.wait_connected(timeout=30)
    for n in e.c.nodes:
        wait_for(lambda n=n: curl(n, e.addr, "/status/204", check=False)[0] == 204, 10,
                 f"the agent reachable through {n.name}")
    yield e
    e.agent.stop()
    codes = [n.stop() for n in e.c.nodes]
    e.c.stop()
    e.api.stop()
    e.wsapi.stop()
    # SIGTERM: every node drains and exits 0 (sanitizer reports make it fail)
    assert codes == [0, 0, 0]


def seen(body):
    j = json.loads(body)
    h = dict(j["headers"])
    h.pop("x-agent-id")          # one per request
    h.pop("x-request-id")        # one per request
    return j["method"], j["path"], h


@pytest.mark.parametrize("http", HTTP)
def test_requests_through_other_nodes_match_a_direct_one(cl, http):
    e = cl
    hdrs = ["-H", "X-Rep: a", "-H", "X-Rep: b", "-H", "Cookie: c=1",
            "-H", "X-TG-From: evil", "-H", "X-TG-Hop: 0", "-H", "X-TG-Client-IP: 6.6.6.6",
            "-H", "X-Forwarded-For: 6.6.6.6"]
    st, h0, direct = curl(e.a, e.addr, "/echo/p?q=1", *hdrs, http=http)
    assert st == 200
    m0, p0, s0 = seen(direct)
    assert s0["x-forwarded-for"] == ["127.0.0.1"]
    assert not any(k.startswith("x-tg-") for k in s0)
    for n in (e.b, e.cc):
        st, h, body = curl(n, e.addr, "/echo/p?q=1", *hdrs, http=http)
        assert st == 200
        m, p, s = seen(body)
        # the public host differs only by the node's port
        assert s.pop("x-forwarded-host") == [f"{e.addr}.localhost:{n.port}"]
        want = dict(s0)
        want.pop("x-forwarded-host")
        assert (m, p, s) == (m0, p0, want)
        assert sorted(h) == sorted(h0)
        for k in h0:
            if k not in ("date", "x-request-id"):
                assert h[k] == h0[k], k

    # POST bodies, 204/304, chunked, Set-Cookie
    data = os.urandom(300_000)
    (e.tmp / "post.bin").write_bytes(data)
    for n in (e.b, e.cc):
        st, h, body = curl(n, e.addr, "/echo", "--data-binary", f"@{e.tmp / 'post.bin'}",
                           http=http)
        j = json.loads(body)
        assert st == 200 and j["len"] == len(data)
        assert j["sha256"] == hashlib.sha256(data).hexdigest()
        for code in (204, 304):
            st, h, body = curl(n, e.addr, f"/status/{code}", http=http)
            assert st == code and body == b""
        st, h, body = curl(n, e.addr, "/cookies", http=http)
        assert h["set-cookie"] == ["a=1; Path=/", "b=2; Path=/"]
        st, h, body = curl(n, e.addr, "/chunked?n=300000&seed=3", http=http)
        assert st == 200 and len(body) == 300000
    fwd = json.loads(subprocess.run(
        ["curl", "-sS", "--cacert", str(e.b.ca), f"https://localhost:{e.b.port}/stats"],
        capture_output=True, timeout=10).stdout)
    assert fwd["total_forwarded_out"] >= 5 and fwd["redis"] == "ok"
    assert e.b.health()[1]["redis"] == "ok"


def test_sse_arrives_incrementally_through_another_node(cl):
    e = cl
    p = subprocess.Popen(["curl", "-sSN", "--cacert", str(e.b.ca), "--connect-to",
                          "::127.0.0.1:",
                          f"https://{e.addr}.localhost:{e.b.port}/sse?n=20&interval_ms=100"],
                         stdout=subprocess.PIPE)
    arrivals = []
    for line in p.stdout:
        if line.startswith(b"data:"):
            arrivals.append(time.monotonic())
    p.wait(30)
    assert len(arrivals) == 20
    assert arrivals[-1] - arrivals[0] >= 1.5
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(1 for g in gaps if g >= 0.05) >= 15, gaps


def test_websocket_echo_through_another_node(cl):
    e = cl
    script = (
        "import asyncio, ssl, sys, websockets\n"
        "async def main():\n"
        f"    ctx = ssl.create_default_context(cafile='{e.b.ca}')\n"
        "    ctx.check_hostname = False\n"
        f"    async with websockets.connect('wss://{e.ws_addr}.localhost:{e.b.port}/echo',\n"
        "            ssl=ctx, host='127.0.0.1') as ws:\n"
        "        for m in ['hello', b'\\x00\\x01' * 40000]:\n"
        "            await ws.send(m)\n"
        "            r = await ws.recv()\n"
        "            assert r == m, (type(r), len(r))\n"
        "        print('ok')\n"
        "asyncio.run(main())\n")
    r = subprocess.run(["/usr/bin/python3", "-c", script], capture_output=True, text=True,
                       timeout=30)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("http", HTTP)
def test_client_disconnect_through_another_node_cancels_local_request(cl, http):
    e = cl
    hid = f"c-hold-{http}"
    p = subprocess.Popen(["curl", "-sSN", http, "--cacert", str(e.cc.ca), "--connect-to",
                          "::127.0.0.1:",
                          f"https://{e.addr}.localhost:{e.cc.port}/hold?id={hid}&after_head=1"],
                         stdout=subprocess.PIPE)
    wait_for(lambda: hid in e.api.state.opened, 10, "request at the local API")
    assert p.stdout.read(5) == b"hello"
    t0 = time.monotonic()
    p.kill()
    p.wait()
    wait_for(lambda: hid in e.api.state.closed, 5, "the local request closed")
    assert e.api.state.closed[hid] - t0 < 1.0 * TIME_SCALE


def rss_during(procs, fn):
    base = [p.rss_kib() for p in procs]
    peaks = list(base)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for i, p in enumerate(procs):
                try:
                    peaks[i] = max(peaks[i], p.rss_kib())
                except (FileNotFoundError, ProcessLookupError):
                    pass
            time.sleep(0.05)
    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return [(pk - b) / 1024 for pk, b in zip(peaks, base)]


@pytest.mark.skipif(SANITIZED, reason="memory bounds apply to release builds")
def test_256mib_download_and_upload_through_another_node(cl):
    e = cl
    n = 256 * MiB
    procs = [e.a, e.b, e.agent.proc]
    url = f"https://{e.addr}.localhost:{e.b.port}"

    def down():
        p = subprocess.run(["curl", "-sS", "--cacert", str(e.b.ca), "--connect-to",
                            "::127.0.0.1:", f"{url}/stream?n={n}"], stdout=subprocess.PIPE,
                           timeout=300)
        assert p.returncode == 0 and len(p.stdout) == n
        assert hashlib.sha256(p.stdout).hexdigest() == stream_digest(n)
    growth = rss_during(procs, down)
    assert max(growth) <= 32, f"RSS growth MiB a/b/agent: {growth}"

    big = e.tmp / "big.bin"
    with open(big, "wb") as f:
        f.truncate(n)
    zero = hashlib.sha256(bytes(n)).hexdigest()

    def up():
        st, h, body = curl(e.b, e.addr, "/upload?id=big", "-T", str(big), "-X", "POST",
                           timeout=300)
        j = json.loads(body)
        assert j["len"] == n and j["sha256"] == zero
    growth = rss_during(procs, up)
    big.unlink()
    assert max(growth) <= 32, f"RSS growth MiB a/b/agent: {growth}"


def test_forged_node_requests_are_refused(cl):
    """The node listener speaks cleartext HTTP/2 and believes nothing without
    the cluster proof; public clients cannot set the forwarding headers (the
    first test checks that the local API never sees them)."""
    e = cl
    base = f"http://{e.addr}.localhost:{e.b.node_port}/echo"
    for extra in ([], ["-H", "X-TG-From: a", "-H", "X-TG-Ts: 1", "-H", "X-TG-Proof: " + "0" * 64,
                       "-H", "X-TG-Hop: 1"]):
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--connect-to",
                            "::127.0.0.1:", *extra, "-o", "-", "-w", "\n%{http_code}", base],
                           capture_output=True, timeout=10)
        body, _, code = r.stdout.rpartition(b"\n")
        assert code == b"403", (code, body)
        assert json.loads(body)["error"] == "node_proof_invalid"
    e.b.wait_log(r"node_proof_invalid|node_refused", since=0)
    # plain HTTP/1.1 on the node listener is not served at all
    r = subprocess.run(["curl", "-sS", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}",
                        "--connect-to", "::127.0.0.1:", base], capture_output=True, timeout=10)
    assert r.stdout != b"200"


def test_unknown_agent_through_a_node_is_agent_offline_at_once(cl):
    e = cl
    t0 = time.monotonic()
    st, h, body = curl(e.b, "0x" + "ab" * 20, "/x")
    assert st == 502 and json.loads(body)["error"] == "agent_offline"
    assert time.monotonic() - t0 < 2 * TIME_SCALE


# ---------------------------------------------------------------- each with its own cluster

def owner(redis, addr):
    """The node id in the registry's value for addr ("v1|ms|node|adv|inst"), or None."""
    v = redis.cmd("GET", f"agent:{addr}")
    return v.split("|")[2] if v.count("|") >= 4 else None


def api_hits(api):
    with api.state.lock:
        return list(api.state.paths)


@pytest.fixture
def fresh(build_dir, tmp_path):
    made = []

    def make(n=3, extra=(), haproxy=False):
        e = Env()
        e.tmp = tmp_path
        e.api = LocalApi()
        e.c = Cluster(build_dir, tmp_path, n=n, extra=extra)
        e.hap = Haproxy(tmp_path, e.c.nodes) if haproxy else None
        made.append(e)
        return e
    yield make
    for e in made:
        for p in getattr(e, "procs", []):
            p.stop()
        if e.hap is not None:
            e.hap.stop()
        e.c.stop()
        e.api.stop()


def test_takeover_across_nodes(build_dir, fresh):
    e = fresh()
    a, b, c = e.c.nodes
    api2 = LocalApi()
    try:
        ag1 = Agent(build_dir, e.tmp, name="one")
        addr = ag1.new("api", e.api.url)
        e.procs = [ag1.run(a)]
        ag1.wait_connected()
        wait_for(lambda: curl(c, addr, "/echo", check=False)[0] == 200, 10, "reachable via c")
        assert owner(e.c.redis, addr) == "a"

        ag2 = Agent(build_dir, e.tmp, name="two")
        assert ag2.new("api", api2.url, extra=("--key-file", ag1.home / "keys/api.key")) == addr
        e.procs.append(ag2.run(b))
        ag2.wait_connected()
        t0 = time.monotonic()
        # within one keepalive interval (1 s here) every node sends to b's tunnel
        for n in (c, a, b):
            wait_for(lambda n=n: curl(n, addr, "/echo?n=" + n.name, check=False)[0] == 200 and
                     api_hits(api2)[-1:] == ["/echo?n=" + n.name], 2, f"{n.name} to b's tunnel")
        assert time.monotonic() - t0 < 1.0 + 1.0 * TIME_SCALE
        assert owner(e.c.redis, addr) == "b"
        st = wait_for(lambda: (s := next((x for x in (ag1.status() or {}).get("agents", [])
                                          if x["name"] == "api"), None)) and
                      s.get("state") == "error" and s, 5, "a's agent superseded")
        assert "superseded" in st["error"]
        a.wait_log(r"agent_superseded_remote", since=0)
    finally:
        api2.stop()


def test_osaurus_takeover_across_nodes(build_dir, fresh):
    """Osaurus mode: the same address registered on node b takes over from
    node a's tunnel, which is told `agent_removed` `superseded` within one
    keepalive interval (1 s here), as on one node; requests then reach b's."""
    import asyncio

    from test_osaurus import OsrClient
    from tunnel_env import eip191_ref

    e = fresh(n=2)
    a, b = e.c.nodes
    key = random.randrange(1, eip191_ref.N)

    async def go():
        c1 = await OsrClient(a, key=key).open()
        wait_for(lambda: owner(e.c.redis, c1.addr) == "a", 5, "a's claim")
        c2 = await OsrClient(b, key=key).open()
        assert c2.addr == c1.addr
        t0 = time.monotonic()
        f = await c1.next("agent_removed", timeout=3 * TIME_SCALE)
        took = time.monotonic() - t0
        assert f["reason"] == "superseded" and f["address"].lower() == c1.addr, f
        assert took < 1.0 + 1.0 * TIME_SCALE, took
        assert owner(e.c.redis, c1.addr) == "b"
        # a request through a now goes to b's tunnel
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, lambda: curl(a, c1.addr, "/osr", check=False))
        req = await c2.next("request", timeout=10)
        await c2.send({"type": "response", "id": req["id"], "status": 200,
                       "headers": {"content-type": "text/plain"}, "body": "from b"})
        st, h, body = await fut
        assert (st, body) == (200, b"from b"), (st, body)
        await c1.close()
        await c2.close()
        return took

    took = asyncio.run(asyncio.wait_for(go(), 60))
    print(f"Osaurus-mode takeover across nodes told in {took:.2f} s")


def test_kill_9_of_the_owner_node(build_dir, fresh):
    e = fresh(haproxy=True)
    a, b, c = e.c.nodes
    ag = Agent(build_dir, e.tmp)
    addr = ag.new("api", e.api.url)
    e.procs = [ag.run(e.hap)]
    ag.wait_connected()
    assert owner(e.c.redis, addr) == "a"
    # a second agent that only knows node a: it never comes back elsewhere
    lone = Agent(build_dir, e.tmp, name="lone")
    lone_addr = lone.new("lone", e.api.url)
    e.procs.append(lone.run(a))
    lone.wait_connected()
    wait_for(lambda: curl(c, lone_addr, "/echo", check=False)[0] == 200, 10, "lone via c")

    t_kill = time.monotonic()
    os.killpg(a.p.pid, signal.SIGKILL)
    a.p.wait(5)
    statuses = []
    while True:
        t = time.monotonic()
        st, h, body = curl(b, addr, "/echo", "--max-time", "5", check=False)
        assert time.monotonic() - t < 3 * TIME_SCALE, "a request hung"
        statuses.append(st)
        if st == 200:
            break
        assert st == 502 and json.loads(body)["error"] == "agent_offline", (st, body)
        assert time.monotonic() - t_kill < 15 * TIME_SCALE, "the agent did not come back"
        time.sleep(0.1)
    back_s = time.monotonic() - t_kill
    assert owner(e.c.redis, addr) in ("b", "c")
    assert curl(c, addr, "/echo")[0] == 200
    # the lone agent's claim (a's) is gone within the TTL (3 keepalive intervals)
    st, h, body = curl(b, lone_addr, "/echo", "--max-time", "5", check=False)
    assert st == 502 and json.loads(body)["error"] == "agent_offline"
    wait_for(lambda: e.c.redis.cmd("EXISTS", f"agent:{lone_addr}") == "0", 3 + 2,
             "a's stale claim gone")
    print(f"agent back through another node {back_s:.2f} s after kill -9; statuses {statuses}")


def test_sigterm_drain_hands_over_without_an_error(build_dir, fresh):
    e = fresh(extra=("--drain-timeout", "120"), haproxy=True)
    a, b, c = e.c.nodes
    ag = Agent(build_dir, e.tmp)
    addr = ag.new("api", e.api.url)
    ag.cli("set", "api", "--max-inflight", "1000")
    e.procs = [ag.run(e.hap)]
    ag.wait_connected()
    assert owner(e.c.redis, addr) == "a"
    events = 20 if SANITIZED else 60
    sse = subprocess.Popen(["curl", "-sSN", "--cacert", str(a.ca), "--connect-to", "::127.0.0.1:",
                            f"https://{addr}.localhost:{a.port}/sse?n={events}&interval_ms=1000"],
                           stdout=subprocess.PIPE)
    n_dl = 8 * MiB
    dl = subprocess.Popen(["curl", "-sS", "--cacert", str(a.ca), "--connect-to", "::127.0.0.1:",
                           f"https://{addr}.localhost:{a.port}"
                           f"/slowbytes?n={n_dl}&chunk=262144&interval_ms=300"],
                          stdout=subprocess.PIPE)
    while not sse.stdout.readline().startswith(b"data:"):
        pass
    wait_for(lambda: any(p.startswith("/slowbytes") for p in api_hits(e.api)), 10, "download")
    os.killpg(a.p.pid, signal.SIGTERM)
    a.wait_log(r"event=drain_start", since=0)
    t0 = time.monotonic()
    bad = []
    n = 0
    moved_at = None
    while time.monotonic() - t0 < 10 * TIME_SCALE:
        for node in (b, c):
            st, h, body = curl(node, addr, f"/echo?d={n}", "--max-time", "10", check=False)
            n += 1
            if st != 200:
                bad.append((node.name, st, body[:200]))
        if moved_at is None and owner(e.c.redis, addr) in ("b", "c"):
            moved_at = time.monotonic() - t0
        if moved_at is not None and time.monotonic() - t0 > moved_at + 2:
            break
    assert not bad, bad
    assert moved_at is not None, "the agent's new tunnel never claimed the address"
    assert n > 10
    # the old tunnel's streams finish
    out, _ = dl.communicate(timeout=120)
    assert dl.returncode == 0 and len(out) == n_dl
    got = 1 + sum(1 for line in sse.stdout if line.startswith(b"data:"))
    assert sse.wait(120) == 0 and got == events
    assert a.p.wait(60) == 0
    assert "streams_cut=0" in a.text()
    assert curl(b, addr, "/echo")[0] == 200
    print(f"moved after {moved_at:.2f} s, {n} requests during the drain, none failed")


def test_redis_down_and_back(build_dir, fresh):
    e = fresh()
    a, b, c = e.c.nodes
    ag1 = Agent(build_dir, e.tmp, name="one")
    addr1 = ag1.new("one", e.api.url)
    ag2 = Agent(build_dir, e.tmp, name="two")
    addr2 = ag2.new("two", e.api.url)
    e.procs = [ag1.run(a), ag2.run(b)]
    ag1.wait_connected()
    ag2.wait_connected()
    wait_for(lambda: curl(c, addr1, "/echo", check=False)[0] == 200 and
             curl(c, addr2, "/echo", check=False)[0] == 200, 10, "both via c")
    marks = [n.mark() for n in e.c.nodes]

    e.c.redis.stop()
    t0 = time.monotonic()
    degraded = set()
    down_s = 20
    while time.monotonic() - t0 < down_s:
        # each node keeps serving the tunnels it holds
        assert curl(a, addr1, "/echo")[0] == 200
        assert curl(b, addr2, "/echo")[0] == 200
        # an owner elsewhere: from the cache or 502 within --redis-timeout, never a hang
        t = time.monotonic()
        st, h, body = curl(c, addr1, "/echo", "--max-time", "5", check=False)
        assert st in (200, 502) and time.monotonic() - t < 2 * TIME_SCALE, (st, body)
        for n in e.c.nodes:
            if n.name not in degraded and n.health()[1].get("redis") == "degraded":
                degraded.add(n.name)
        time.sleep(0.25)
    assert degraded == {"a", "b", "c"}
    m = metrics(c)[1]
    assert m["tunnel_gateway_redis_up"] == 0 and m["tunnel_gateway_redis_errors_total"] >= 1
    for n, m in zip(e.c.nodes, marks):
        assert len(__import__("re").findall(r"event=redis_degraded", n.text(m))) == 1, n.name

    e.c.redis.start()
    t1 = time.monotonic()
    wait_for(lambda: owner(e.c.redis, addr1) == "a" and owner(e.c.redis, addr2) == "b",
             2 * TIME_SCALE + 1, "claims again")
    wait_for(lambda: curl(c, addr1, "/echo", check=False)[0] == 200 and
             curl(a, addr2, "/echo", check=False)[0] == 200, 2, "routes complete")
    assert time.monotonic() - t1 < 1.0 + 1.0 + 2 * TIME_SCALE
    for n in e.c.nodes:
        assert n.health()[1]["redis"] == "ok"
        assert metrics(n)[1]["tunnel_gateway_redis_up"] == 1
        n.wait_log(r"event=redis_up", since=0)


def node_request(node, secret, addr, path="/echo", hop="1", ts=None, client="203.0.113.9",
                 xff="", proto="https", host="", method="GET", tamper=None):
    """A request on node's node listener signed as another node would, by an
    independent implementation of the proof (proto/PROTOCOL.md, node to node)."""
    import hmac
    authority = f"{addr}.localhost:{node.node_port}"
    fields = [("x-tg-ts", str(int(time.time()) if ts is None else ts)), ("x-tg-from", "z"),
              ("x-tg-hop", hop), ("x-tg-scheme", "https"), ("x-tg-client-ip", client),
              ("x-tg-xff", xff), ("x-tg-proto", proto), ("x-tg-host", host)]
    msg = b"tg-node-v1\n" + b"".join(v.encode() + b"\n" for _, v in fields) + \
        b"".join(x.encode() + b"\n" for x in (method, authority, path, ""))
    proof = hmac.new(secret, msg, "sha256").hexdigest()
    if tamper:
        fields = [(k, tamper.get(k, v)) for k, v in fields]
    args = []
    for k, v in fields + [("x-tg-proof", proof)]:
        args += ["-H", f"{k}: {v}" if v else f"{k};"]
    r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--connect-to", "::127.0.0.1:",
                        "-X", method, *args, "-o", "-", "-w", "\n%{http_code}",
                        f"http://{authority}{path}"], capture_output=True, timeout=10)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or b"0"), body


def test_node_proof_checked_and_at_most_one_hop(cl):
    e = cl
    secret = e.c.secret.read_bytes()
    # a valid proof: served from a's own tunnel, the first node's client believed
    st, body = node_request(e.a, secret, e.addr)
    assert st == 200, body
    hd = json.loads(body)["headers"]
    assert hd["x-forwarded-for"] == ["203.0.113.9"]
    assert not any(k.startswith("x-tg-") for k in hd)
    # any field changed after signing, a wrong secret, a stale time: 403
    for tamper in ({"x-tg-client-ip": "198.51.100.1"}, {"x-tg-hop": "0"}, {"x-tg-from": "y"}):
        st, body = node_request(e.a, secret, e.addr, tamper=tamper)
        assert st == 403 and json.loads(body)["error"] == "node_proof_invalid", tamper
    st, body = node_request(e.a, b"w" * 48, e.addr)
    assert st == 403
    st, body = node_request(e.a, secret, e.addr, ts=int(time.time()) - 120)
    assert st == 403
    # a second hop is a loop: 508, never followed
    st, body = node_request(e.a, secret, e.addr, hop="2")
    assert st == 508 and json.loads(body)["error"] == "loop_detected"
    # b has no tunnel for the agent: a forwarded request is not forwarded again
    st, body = node_request(e.b, secret, e.addr)
    assert st == 502 and json.loads(body)["error"] == "agent_offline"


def metrics(node):
    r = subprocess.run(["curl", "-sS", "--cacert", str(node.ca),
                        f"https://localhost:{node.port}/metrics"], capture_output=True, timeout=10)
    vals = {}
    for line in r.stdout.decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            vals[k] = float(v)
    return r.stdout, vals


def test_metrics_of_forwarding_and_redis(cl):
    e = cl
    for _ in range(3):
        assert curl(e.cc, e.addr, "/echo")[0] == 200
    text, b = metrics(e.cc)
    assert b["tunnel_gateway_redis_up"] == 1
    assert b["tunnel_gateway_forwarded_out_total"] >= 3
    assert b["tunnel_gateway_forwarded_time_to_headers_seconds_count"] >= 3
    assert b["tunnel_gateway_node_peers"] >= 1
    assert b['tunnel_gateway_build_info{version="%s",node="c"}' % next(
        k.split('"')[1] for k in b if k.startswith("tunnel_gateway_build_info"))] == 1
    text_a, a = metrics(e.a)
    assert a["tunnel_gateway_forwarded_in_total"] >= 3
    assert a["tunnel_gateway_from_node_time_to_headers_seconds_count"] >= 3
    assert a["tunnel_gateway_tunnels"] == 1 and a["tunnel_gateway_agents"] == 2
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_reuse_port_several_nodes_on_one_public_port(build_dir, tmp_path):
    c = Cluster(build_dir, tmp_path, n=0)
    api = LocalApi()
    procs = []
    try:
        a = Node(build_dir, tmp_path, "a", c.redis.url, c.secret, "--reuse-port", port=0)
        procs.append(a)
        # without --reuse-port the port is taken
        lone = Node(build_dir, tmp_path, "x", c.redis.url, c.secret, port=a.port, start=False)
        r = subprocess.run([str(x) for x in lone.argv()], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode != 0 and "cannot listen" in r.stdout + r.stderr
        b = Node(build_dir, tmp_path, "b", c.redis.url, c.secret, "--reuse-port", port=a.port)
        procs.append(b)
        ag = Agent(build_dir, tmp_path)
        addr = ag.new("api", api.url)
        procs.append(ag.run(a))
        ag.wait_connected()
        # the kernel spreads connections over both processes; every request
        # reaches the agent, wherever it landed
        machines = set()
        for i in range(40):
            machines.add(a.health()[1]["machine"])
            assert curl(a, addr, f"/echo?i={i}")[0] == 200
            if machines == {"a", "b"} and i >= 10:
                break
        assert machines == {"a", "b"}
    finally:
        for p in reversed(procs):
            p.stop()
        c.stop()
        api.stop()
