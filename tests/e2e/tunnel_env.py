"""Processes for end-to-end tests: a gateway, a local API, an agent daemon.

Everything binds 127.0.0.1 with port 0 and reports the port it got; every
wait is bounded. Processes are killed (and reaped) when the test ends.
"""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "vectors"))
import eip191_ref  # noqa: E402  (independent EIP-191: ecdsa + pycryptodome)

SANITIZED = os.environ.get("TG_SANITIZED") == "1"
# Wall-clock bounds on how fast something happens are multiplied by this in
# sanitizer builds (ASan/UBSan run the programs 2-5x slower); bounds on how
# late something may happen at the earliest (a timeout must not fire early)
# are not.
TIME_SCALE = 3 if SANITIZED else 1


def wait_for(pred, timeout, what, interval=0.05):
    """Polls pred until it returns something true (returned); the deadline is
    timeout seconds, times TIME_SCALE in sanitizer builds."""
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Proc:
    """A child process whose stderr+stdout go to a log file we can grep."""

    def __init__(self, argv, log_path, env=None):
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "wb")
        self.log_offset = 0
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.p = subprocess.Popen([str(a) for a in argv], stdout=self.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)

    def text(self, since=0):
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def mark(self):
        """Remembers the log's current end: the next wait_log() looks only at
        lines written after it, so an old line cannot satisfy a new wait.
        Returns the offset (for wait_log(since=...))."""
        self.log.flush()
        self.log_offset = self.log_path.stat().st_size
        return self.log_offset

    def wait_log(self, pattern, timeout=10, since=None):
        """The first match of pattern in the log from offset since (default:
        the last mark(), the start if none); bounded by timeout (scaled in
        sanitizer builds)."""
        rx = re.compile(pattern)
        start = self.log_offset if since is None else since

        def find():
            if self.p.poll() is not None:
                raise RuntimeError(f"process exited ({self.p.returncode}):\n{self.text()[-3000:]}")
            return rx.search(self.text(start))
        return wait_for(find, timeout, f"/{pattern}/ in {self.log_path.name}")

    def pid(self):
        return self.p.pid

    def rss_kib(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self.log.close()
        return self.p.returncode


class Gateway(Proc):
    def __init__(self, build_dir, tmp, *extra, domain="localhost", name="gateway", wrap=(),
                 start_timeout=10):
        """wrap: a command the gateway runs under (valgrind, say)."""
        self.state = Path(tmp) / f"{name}-state"
        self.domain = domain
        argv = [*wrap, Path(build_dir) / "gateway/tunnel-gateway", "--listen", "127.0.0.1:0",
                "--state-dir", self.state, "--domain", domain, "--log-level", "debug",
                "--summary-interval", "0", *extra]
        super().__init__(argv, Path(tmp) / f"{name}.log")
        m = self.wait_log(r"event=listening addr=\S+ port=(\d+) scheme=(\w+)",
                          timeout=start_timeout)
        self.port = int(m.group(1))
        self.scheme = m.group(2)
        self.ca = self.state / "local-ca.pem"

    def ssl_context(self):
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return ctx

    def url(self, host=None):
        return f"{self.scheme}://{host or self.domain}:{self.port}"


_reserved = []  # sockets holding reserved ports, open until the test process exits


def reserve_port():
    """A port of 127.0.0.1 from binding port 0, kept bound (SO_REUSEADDR, never
    listening) for the rest of the test run: nothing else takes it, a connect
    to it is refused (a dead local API), and a gateway (which binds with
    SO_REUSEADDR) can listen on it, be killed and come back on it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _reserved.append(s)
    return s.getsockname()[1]


class Agent:
    """tunnel-agent with one home; create agents, run the daemon."""

    def __init__(self, build_dir, tmp, name="agent"):
        self.exe = Path(build_dir) / "agent/tunnel-agent"
        self.home = Path(tmp) / f"{name}-home"
        self.tmp = Path(tmp)
        self.name = name
        self.proc = None

    def cli(self, *args, check=True, timeout=30):
        r = subprocess.run([str(self.exe), "--home", str(self.home), *[str(a) for a in args]],
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, start_new_session=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"tunnel-agent {args} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def new(self, name, target, enable=True, extra=()):
        r = self.cli("new", name, "--target", target, *extra)
        addr = re.search(r"0x[0-9a-f]{40}", r.stdout).group(0)
        if enable:
            self.cli("enable", name, "--yes")
        return addr

    def run(self, gw, *extra, wrap=(), env=None):
        scheme = "wss" if gw.scheme == "https" else "ws"
        argv = [*wrap, self.exe, "--home", self.home, "run", "--gateway", f"{scheme}://{gw.domain}:{gw.port}",
                *(["--ca-file", gw.ca] if scheme == "wss" else []), "--log-level", "debug", *extra]
        self.proc = Proc(argv, self.tmp / f"{self.name}.log", env=env)
        return self.proc

    def status(self):
        r = self.cli("status", "--json", check=False)
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return None

    def wait_connected(self, name=None, timeout=20):
        def ok():
            st = self.status()
            if not st:
                return None
            agents = [a for a in st.get("agents", []) if name is None or a.get("name") == name]
            if agents and all(a.get("state") == "connected" for a in agents if a.get("enabled")):
                return st
            return None
        return wait_for(ok, timeout, f"agent {name or '*'} connected")

    def stop(self):
        if self.proc is not None:
            self.proc.stop()
