#!/usr/bin/python3
"""Checks tunnel-bench-swarm against a real tunnel-gateway: 20 tunnels come
up (all_up), a request to one swarm address through the gateway gets that
tunnel's 200, the gateway's /stats counts them, and after a gateway restart
(SIGTERM, then a new gateway on the same port and state dir) the swarm
reports `recovered` with all 20 back. Also --print-addresses and a clean
exit on SIGTERM. No speed thresholds.
Usage: test_swarm.py SWARM GATEWAY (meson test suite 'bench')."""
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

COUNT = 20
TIMEOUT_S = 60


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout_s, proc):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check(proc.poll() is None, "gateway exited with %s" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise Failure("gateway not listening on %d after %d s" % (port, timeout_s))


class Gateway:
    def __init__(self, exe, tmp):
        self.exe = exe
        self.tmp = tmp
        self.port = free_port()
        self.state = os.path.join(tmp, "gw-state")
        self.ca = os.path.join(self.state, "local-ca.pem")
        self.proc = None
        self.n = 0

    def start(self):
        self.n += 1
        log = open(os.path.join(self.tmp, "gateway-%d.log" % self.n), "wb")
        self.proc = subprocess.Popen(
            [self.exe, "--listen", "127.0.0.1:%d" % self.port, "--state-dir", self.state,
             "--domain", "localhost", "--log-level", "warn", "--max-conns-per-ip", "0",
             "--max-tunnels-per-ip", "0", "--tunnel-connects-per-ip-per-min", "0",
             "--max-pending-tunnels-per-ip", "0", "--max-pending-tunnels", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        wait_port(self.port, 15, self.proc)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.ca) and time.monotonic() < deadline:
            time.sleep(0.05)
        check(os.path.exists(self.ca), "no %s" % self.ca)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # drains: GOAWAY + draining to every tunnel, then exits
            try:
                self.proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, host, path):
        """curl through the gateway: (status, body)."""
        r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", self.ca,
                            "--resolve", "%s:%d:127.0.0.1" % (host, self.port),
                            "-w", "\n%{http_code}", "https://%s:%d%s" % (host, self.port, path)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
        body, _, code = r.stdout.rpartition("\n")
        return code.strip(), body

    def stats(self):
        code, body = self.get("localhost", "/stats")
        check(code == "200", "GET /stats: %s" % code)
        return json.loads(body)


class Swarm:
    def __init__(self, exe, gw, tmp, count, seed):
        self.err = open(os.path.join(tmp, "swarm.log"), "wb")
        self.proc = subprocess.Popen(
            [exe, "--gateway", "wss://localhost:%d" % gw.port, "--connect-host", "127.0.0.1",
             "--ca", gw.ca, "--count", str(count), "--seed", seed, "--duration", "120",
             "--status-ms", "500"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.q.put(json.loads(line))
        self.q.put(None)

    def wait(self, name, timeout_s=TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            try:
                ev = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise Failure("no %s event within %d s; last: %s" % (name, timeout_s, last))
            check(ev is not None, "swarm exited (%s) before %s; last: %s" % (
                self.proc.poll(), name, last))
            if ev["event"] == name:
                return ev
            last = ev

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.err.close()
        return rc


def addresses(exe, count, seed, first=0):
    r = subprocess.run([exe, "--print-addresses", "--count", str(count), "--seed", seed,
                        "--first", str(first)], capture_output=True, text=True, timeout=30)
    check(r.returncode == 0, "--print-addresses exit %d: %s" % (r.returncode, r.stderr))
    return r.stdout.split()


def test_print_addresses(exe):
    a = addresses(exe, 5, "s1")
    check(len(a) == 5 and len(set(a)) == 5, "5 distinct addresses: %s" % a)
    check(all(x.startswith("0x") and len(x) == 42 and x == x.lower() for x in a),
          "lowercase 0x + 40 hex: %s" % a)
    check(addresses(exe, 5, "s1") == a, "same seed, same addresses")
    check(addresses(exe, 2, "s1", first=3) == a[3:5], "--first offsets the index")
    check(not set(addresses(exe, 5, "s2")) & set(a), "another seed, other addresses")


def test_swarm(exe, gw_exe, tmp):
    gw = Gateway(gw_exe, tmp)
    gw.start()
    seed = "test-swarm"
    sw = Swarm(exe, gw, tmp, COUNT, seed)
    try:
        ev = sw.wait("all_up")
        check(ev["count"] == COUNT, "all_up count %s" % ev)
        check(sum(ev["failures"].values()) == 0, "failures during the ramp: %s" % ev)
        st = gw.stats()
        check(st["active_agents"] == COUNT and st["active_tunnels"] == COUNT,
              "gateway /stats after all_up: %s" % st)
        # A request to one of them is answered by that tunnel's HTTP/2 server.
        addrs = addresses(exe, COUNT, seed)
        i = 7
        code, body = gw.get("%s.localhost" % addrs[i], "/anything?x=1")
        check(code == "200", "GET via the gateway: %s %s" % (code, body))
        check(body == "tunnel-bench-swarm %d %s\n" % (i, addrs[i]), "body %r" % body)

        # Gateway restart: the swarm drops, reconnects (drain: at once; then
        # backoff) and reports all COUNT registered again.
        gw.stop()
        drop = sw.wait("drop")
        check(drop["up"] < COUNT, "drop event: %s" % drop)
        time.sleep(1.0)
        gw.start()
        rec = sw.wait("recovered")
        check(rec["count"] == COUNT and rec["dropped"] == COUNT, "recovered: %s" % rec)
        check(rec["registrations"] >= COUNT, "registrations in the cycle: %s" % rec)
        check(rec["failures"]["auth_error"] == 0 and rec["removed"] == 0, "recovered: %s" % rec)
        check(rec["from_drop_ms"] >= rec["from_listener_ms"] >= 0, "times: %s" % rec)
        st = gw.stats()
        check(st["active_agents"] == COUNT, "gateway /stats after recovery: %s" % st)
        code, body = gw.get("%s.localhost" % addrs[3], "/")
        check(code == "200" and addrs[3] in body, "GET after recovery: %s %r" % (code, body))
    finally:
        rc = sw.stop()
        gw.stop()
    check(rc == 0, "swarm exit code %s on SIGTERM" % rc)


def main():
    if len(sys.argv) != 3:
        print("usage: test_swarm.py SWARM GATEWAY", file=sys.stderr)
        return 2
    if shutil.which("curl") is None:
        print("SKIP: curl not installed")
        return 77
    exe, gw_exe = sys.argv[1], sys.argv[2]
    tmp = tempfile.mkdtemp(prefix="test-swarm-")
    tests = [("test_print_addresses", lambda: test_print_addresses(exe)),
             ("test_swarm", lambda: test_swarm(exe, gw_exe, tmp))]
    failed = 0
    for name, t in tests:
        try:
            t()
            print("ok", name)
        except (Failure, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
            failed += 1
            print("FAIL", name, e)
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".log"):
                    with open(os.path.join(tmp, f), errors="replace") as fh:
                        print("--- %s (tail)\n%s" % (f, fh.read()[-1500:]))
    shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (len(tests) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
