"""Several gateway nodes sharing routes in a real redis-server (test_cluster.py).

Redis: Debian's redis-server on a reserved loopback port, persistence off, so
that it can be stopped and started again where the nodes expect it. Nodes:
tunnel-gateway with --redis, --node-listen on a reserved port and one cluster
secret; they share one state directory, so one local CA signs every node's
certificate and a client (or an agent behind HAProxy) trusts them all.
HAProxy (Debian's), when a test needs one, in TCP mode in front of the
nodes' main listeners, with /health checks.
"""

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from tunnel_env import Proc, reserve_port, wait_for


def redis_ping(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Redis:
    def __init__(self, tmp, name="redis"):
        self.tmp = Path(tmp)
        self.name = name
        self.port = reserve_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self):
        d = self.tmp / f"{self.name}-dir"
        d.mkdir(exist_ok=True)
        self.proc = Proc(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", d,
                          "--daemonize", "no", "--protected-mode", "no"],
                         self.tmp / f"{self.name}-{int(time.time() * 1000)}.log")
        wait_for(lambda: redis_ping(self.port), 10, "redis-server answering PING")

    def stop(self):
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def cmd(self, *args):
        """One command through redis-cli; its output, stripped."""
        r = subprocess.run(["redis-cli", "-p", str(self.port), *[str(a) for a in args]],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip()


class Node(Proc):
    """One gateway node. restart() brings it back on the same ports."""

    def __init__(self, build_dir, tmp, name, redis_url, secret, *extra, state=None,
                 ping_s=1, start=True, port=None):
        self.build_dir = Path(build_dir)
        self.tmp = Path(tmp)
        self.name = name
        self.domain = "localhost"
        self.scheme = "https"
        self.state = Path(state) if state else self.tmp / "cluster-state"
        self.ca = self.state / "local-ca.pem"
        # port 0: the kernel's choice, read back (a reserved port cannot be
        # shared with --reuse-port: the reserving socket does not set it)
        self.port = reserve_port() if port is None else port
        self.node_port = reserve_port()
        self.redis_url = redis_url
        self.secret = secret
        self.ping_s = ping_s
        self.extra = list(extra)
        if start:
            self.start()

    def argv(self):
        return [self.build_dir / "gateway/tunnel-gateway", "--listen", f"127.0.0.1:{self.port}",
                "--state-dir", self.state, "--domain", self.domain, "--log-level", "debug",
                "--summary-interval", "0", "--node-id", self.name,
                "--redis", self.redis_url, "--node-listen", f"127.0.0.1:{self.node_port}",
                "--cluster-secret-file", self.secret, "--ping-interval", str(self.ping_s),
                *self.extra]

    def start(self):
        super().__init__(self.argv(), self.tmp / f"{self.name}-{int(time.time() * 1000)}.log")
        self.wait_log(r"event=listening addr=\S+ port=\d+ scheme=h2c")
        if self.port == 0:
            self.port = int(self.wait_log(r"event=listening addr=\S+ port=(\d+) scheme=https",
                                          since=0).group(1))

    def health(self):
        """(status, JSON) of GET /health on the apex."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        req = urllib.request.Request(f"https://localhost:{self.port}/health")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def url(self, host=None):
        return f"https://{host or self.domain}:{self.port}"


def write_secret(tmp, data=b"s" * 48, name="cluster.secret"):
    p = Path(tmp) / name
    p.write_bytes(data)
    os.chmod(p, 0o600)
    return p


class Cluster:
    def __init__(self, build_dir, tmp, n=3, ping_s=1, extra=()):
        self.tmp = Path(tmp)
        self.redis = Redis(tmp)
        self.secret = write_secret(tmp)
        self.nodes = []
        for i in range(n):
            self.nodes.append(Node(build_dir, tmp, "abc"[i] if i < 3 else f"n{i}", self.redis.url,
                                   self.secret, *extra, ping_s=ping_s))

    def stop(self):
        for n in self.nodes:
            n.stop()
        self.redis.stop()


class Haproxy(Proc):
    """TCP (TLS passed through) to the nodes' main listeners, first server
    first, others as backups; /health checked every 200 ms."""

    def __init__(self, tmp, nodes, name="haproxy"):
        self.port = reserve_port()
        self.domain = "localhost"
        self.scheme = "https"
        self.ca = nodes[0].ca
        lines = ["global", "  log stderr format short local0 info", "defaults",
                 "  mode tcp", "  log global", "  timeout connect 2s", "  timeout client 600s",
                 "  timeout server 600s", "  retries 3", "  option redispatch",
                 f"frontend fe", f"  bind 127.0.0.1:{self.port}", "  default_backend nodes",
                 "backend nodes", "  balance first", "  option httpchk",
                 "  http-check send meth GET uri /health ver HTTP/1.1 hdr Host localhost",
                 "  http-check expect status 200"]
        for i, n in enumerate(nodes):
            lines.append(f"  server {n.name} 127.0.0.1:{n.port} check check-ssl verify none "
                         f"check-sni localhost inter 200 fall 1 rise 2")
        cfg = Path(tmp) / f"{name}.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        super().__init__(["haproxy", "-db", "-f", cfg], Path(tmp) / f"{name}.log")
        wait_for(lambda: connects(self.port), 10, "haproxy listening")


def connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
