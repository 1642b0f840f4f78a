#!/usr/bin/python3
"""Checks tunnel-bench-origin's WebSocket echo (GET /ws) over raw sockets:
the RFC 6455 handshake, binary and text echoes (fragmented, 16- and 64-bit
lengths), ping/pong between fragments, the closing handshake, a protocol error
and refused upgrades; then the load client tunnel-bench-ws against it, plain
and through a TLS-terminating proxy (SNI, certificate verification, a wrong
name refused). No speed thresholds.
Usage: test_ws.py ORIGIN WS_CLIENT (meson test suite 'bench')."""
import base64
import hashlib
import json
import os
import re
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading

TIMEOUT_S = 10
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def start(origin):
    proc = subprocess.Popen([origin, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.match(r"listening 127\.0\.0\.1:(\d+)$", line.strip())
    if not m:
        proc.kill()
        raise Failure("no ready line: %r" % line)
    return proc, int(m.group(1))


def read_head(f):
    """One HTTP/1.1 response head: (status, headers dict)."""
    line = f.readline()
    check(line.startswith(b"HTTP/1.1 "), "status line %r" % line)
    status = int(line.split()[1])
    headers = {}
    while True:
        line = f.readline()
        check(line.endswith(b"\r\n"), "header line %r" % line)
        if line == b"\r\n":
            return status, headers
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()


def upgrade(port, key=b"dGhlIHNhbXBsZSBub25jZQ==", extra=b""):
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
              b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + key +
              b"\r\nSec-WebSocket-Version: 13\r\n" + extra + b"\r\n")
    return s, s.makefile("rb")


def frame(opcode, payload, fin=True, mask=True):
    """A client frame (masked unless told otherwise)."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(f):
    """A server frame: (fin, opcode, payload); the server never masks."""
    h = f.read(2)
    check(len(h) == 2, "frame header: got %r" % h)
    fin, opcode, masked, n = h[0] >> 7, h[0] & 0x0f, h[1] >> 7, h[1] & 0x7f
    check(not masked, "server frame is masked")
    check(h[0] & 0x70 == 0, "RSV bits set")
    if n == 126:
        n = struct.unpack("!H", f.read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", f.read(8))[0]
    payload = f.read(n)
    check(len(payload) == n, "frame payload %d of %d" % (len(payload), n))
    return fin, opcode, payload


def test_handshake_and_echo(port):
    s, f = upgrade(port)
    st, h = read_head(f)
    check(st == 101, "upgrade status %d" % st)
    check(h.get("upgrade", "").lower() == "websocket", "Upgrade %r" % h)
    check(h.get("connection", "").lower() == "upgrade", "Connection %r" % h)
    # RFC 6455 section 1.3's example key and accept value.
    check(h.get("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "accept %r" % h)
    for size in (0, 1, 125, 126, 1000, 65535, 65536, 200000):
        payload = os.urandom(size)
        s.sendall(frame(0x2, payload))
        check(read_frame(f) == (1, 0x2, payload), "binary echo of %d bytes" % size)
    # A fragmented text message with a ping between the fragments: the pong
    # comes first, then the whole message as one frame.
    s.sendall(frame(0x1, "héllo ".encode(), fin=False) + frame(0x9, b"ping!") +
              frame(0x0, b"wor", fin=False) + frame(0x0, b"ld"))
    check(read_frame(f) == (1, 0xA, b"ping!"), "pong")
    check(read_frame(f) == (1, 0x1, "héllo world".encode()), "fragmented text echo")
    # A fragmented binary message, a ping and single-frame messages in one
    # write: every answer in order (the origin's wslay path and its fast path
    # for single frames take turns).
    s.sendall(frame(0x2, b"frag", fin=False) + frame(0x0, b"mented") + frame(0x9, b"") +
              frame(0x2, b"x" * 300) + frame(0x2, b"frag", fin=False) + frame(0x9, b"2") +
              frame(0x0, b"!"))
    check(read_frame(f) == (1, 0x2, b"fragmented"), "fragmented binary echo")
    check(read_frame(f) == (1, 0xA, b""), "empty pong")
    check(read_frame(f) == (1, 0x2, b"x" * 300), "single frame after fragments")
    check(read_frame(f) == (1, 0xA, b"2"), "pong between fragments")
    check(read_frame(f) == (1, 0x2, b"frag!"), "second fragmented echo")
    # Several messages in one write come back in order.
    s.sendall(b"".join(frame(0x2, struct.pack("!I", i) * 8) for i in range(50)))
    for i in range(50):
        check(read_frame(f) == (1, 0x2, struct.pack("!I", i) * 8), "pipelined echo %d" % i)
    s.sendall(frame(0x8, struct.pack("!H", 1000) + b"bye"))
    fin, op, payload = read_frame(f)
    check(op == 0x8 and payload[:2] == struct.pack("!H", 1000), "close reply %r" % payload)
    check(f.read() == b"", "server closes TCP after the closing handshake")
    s.close()


def test_protocol_error(port):
    """An unmasked client frame is a protocol error: close 1002 (RFC 6455 5.1)."""
    s, f = upgrade(port, key=base64.b64encode(os.urandom(16)))
    check(read_head(f)[0] == 101, "upgrade")
    s.sendall(frame(0x2, b"abc", mask=False))
    fin, op, payload = read_frame(f)
    check(op == 0x8 and payload[:2] == struct.pack("!H", 1002), "close 1002, got %r" % payload)
    check(f.read() == b"", "closed after the protocol error")
    s.close()


def test_bad_length(port):
    """A 16-bit length field holding a value under 126 is not minimal: the
    connection is failed with a close frame (wslay sends it without a code for
    frame-level errors, 1002 otherwise) and TCP closed."""
    s, f = upgrade(port, key=base64.b64encode(os.urandom(16)))
    check(read_head(f)[0] == 101, "upgrade")
    s.sendall(struct.pack("!BBH", 0x82, 0x80 | 126, 5) + b"\0\0\0\0" + b"hello")
    fin, op, payload = read_frame(f)
    check(op == 0x8 and payload[:2] in (b"", struct.pack("!H", 1002)), "close, got %r" % payload)
    check(f.read() == b"", "closed after the protocol error")
    s.close()


def test_refused_upgrades(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    f = s.makefile("rb")
    for req, want in ((b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),
                      (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                       b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       b"Sec-WebSocket-Version: 8\r\n\r\n", 426),
                      (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                       b"\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
                      (b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405)):
        s.sendall(req)
        st, h = read_head(f)
        body = f.read(int(h["content-length"]))
        check(st == want, "%r -> %d %r, want %d" % (req[:60], st, body, want))
        if st == 426:
            check(h.get("sec-websocket-version") == "13", "426 names version 13: %r" % h)
    # Still HTTP/1.1 keep-alive after a refused upgrade.
    s.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    st, h = read_head(f)
    check(st == 200 and len(f.read(int(h["content-length"]))) == 1024, "GET /small after")
    s.close()


def run_client(client, args, timeout=30):
    r = subprocess.run([client] + args, capture_output=True, text=True, timeout=timeout)
    check(r.returncode == 0, "client exit %d: %s" % (r.returncode, r.stderr))
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise Failure("client output not JSON: %r %r" % (r.stdout, r.stderr))


def check_clean(d, conns, size, what):
    check(d["conns_up"] == conns and d["size"] == size, "%s: %r" % (what, d))
    check(d["errors_total"] == 0 and d["errors"] == [] and d["lost"] == 0,
          "%s errors: %r" % (what, d))
    check(d["messages"] > 0 and d["bytes"] == d["messages"] * size, "%s counts: %r" % (what, d))
    check(d["msgs_per_s"] > 0 and abs(d["mb_s"] - d["msgs_per_s"] * size / 1e6) < 0.01 *
          d["mb_s"] + 1e-6, "%s rates: %r" % (what, d))
    lat = d["latency_ms"]
    check(0 <= lat["p50"] <= lat["p99"] <= lat["max"] < 5000, "%s latency %r" % (what, lat))


def test_client(port, client):
    url = "ws://127.0.0.1:%d/ws" % port
    d = run_client(client, ["--url", url, "--conns", "8", "--size", "128", "--inflight", "2",
                            "--warmup-ms", "100", "--duration-ms", "500"])
    check_clean(d, 8, 128, "small")
    check(0.45 < d["window_s"] < 1.5, "window %r" % d["window_s"])
    d = run_client(client, ["--url", url, "--conns", "2", "--size", "65536", "--inflight", "3",
                            "--warmup-ms", "0", "--duration-ms", "500"])
    check_clean(d, 2, 65536, "large")
    # The count bound ends the window early.
    d = run_client(client, ["--url", url, "--conns", "4", "--size", "64", "--messages", "500",
                            "--duration-ms", "20000", "--timeout", "20"])
    check_clean(d, 4, 64, "count-bounded")
    check(d["messages"] == 500 and d["window_s"] < 10, "count bound: %r" % d)
    # A refused upgrade is an error per connection, with the status.
    d = run_client(client, ["--url", "ws://127.0.0.1:%d/nope" % port, "--conns", "3",
                            "--duration-ms", "100"])
    check(d["conns_up"] == 0 and d["messages"] == 0 and d["msgs_per_s"] is None, "404: %r" % d)
    check(d["errors_total"] == 3 and all("HTTP 404" in e for e in d["errors"]), "404: %r" % d)
    # Nothing listening: connection errors, still a JSON answer.
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead = spare.getsockname()[1]
    d = run_client(client, ["--url", "ws://127.0.0.1:%d/ws" % dead, "--conns", "2",
                            "--duration-ms", "100"])
    check(d["conns_up"] == 0 and d["errors_total"] == 2, "refused: %r" % d)


class TlsProxy:
    """TLS in front of the origin (one thread per connection), recording
    the SNI names it was asked for."""

    def __init__(self, certdir, origin_port):
        self.origin_port = origin_port
        self.sni = []
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(os.path.join(certdir, "server.pem"),
                                 os.path.join(certdir, "server.key"))
        self.ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name) and None
        self.lsn = socket.socket()
        self.lsn.bind(("127.0.0.1", 0))
        self.lsn.listen(64)
        self.port = self.lsn.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                raw, _ = self.lsn.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        try:
            raw.settimeout(TIMEOUT_S)
            tls = self.ctx.wrap_socket(raw, server_side=True)
            up = socket.create_connection(("127.0.0.1", self.origin_port), timeout=TIMEOUT_S)
        except (OSError, ssl.SSLError):
            raw.close()
            return

        # One thread per connection: an SSL object must not be read and
        # written from two threads at once.
        try:
            while True:
                ready = [tls] if tls.pending() else select.select([tls, up], [], [],
                                                                  TIMEOUT_S)[0]
                if not ready:
                    break
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        raise EOFError
                    (up if src is tls else tls).sendall(data)
        except (OSError, ssl.SSLError, EOFError):
            pass
        tls.close()
        up.close()

    def close(self):
        self.lsn.close()


def make_certs(certdir):
    with open(os.path.join(certdir, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:bench.localhost\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth\n")
    for argv in (["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                  "ca.key"],
                 ["openssl", "req", "-x509", "-new", "-key", "ca.key", "-days", "1", "-subj",
                  "/CN=test_ws CA", "-out", "ca.pem"],
                 ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                  "server.key"],
                 ["openssl", "req", "-new", "-key", "server.key", "-subj", "/CN=bench.localhost",
                  "-out", "server.csr"],
                 ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey",
                  "ca.key", "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out",
                  "server.pem"]):
        r = subprocess.run(argv, cwd=certdir, capture_output=True, timeout=30)
        check(r.returncode == 0, "openssl: %s" % r.stderr.decode()[-200:])


def test_client_tls(port, client):
    """wss:// through a TLS proxy: SNI and Host are the URL's name while the
    client dials 127.0.0.1 (--connect), as bench/run does for the tunnel."""
    if shutil.which("openssl") is None:
        print("skip test_client_tls: no openssl")
        return
    tmp = tempfile.mkdtemp(prefix="test-ws-")
    try:
        make_certs(tmp)
        proxy = TlsProxy(tmp, port)
        try:
            base = ["--connect", "127.0.0.1:%d" % proxy.port, "--conns", "3", "--inflight", "2",
                    "--warmup-ms", "0", "--duration-ms", "300"]
            url = "wss://bench.localhost:%d/ws" % proxy.port
            d = run_client(client, ["--url", url, "--cacert", os.path.join(tmp, "ca.pem"),
                                    "--size", "20000"] + base)
            check_clean(d, 3, 20000, "wss verified")
            check(proxy.sni and set(proxy.sni) == {"bench.localhost"}, "SNI %r" % proxy.sni)
            d = run_client(client, ["--url", url] + base)
            check_clean(d, 3, 128, "wss unverified")
            # Verification names the host: a certificate for another name fails.
            d = run_client(client, ["--url", "wss://other.localhost:%d/ws" % proxy.port,
                                    "--cacert", os.path.join(tmp, "ca.pem")] + base)
            check(d["conns_up"] == 0 and d["errors_total"] == 3 and
                  all("certificate verification failed" in e for e in d["errors"]),
                  "wrong name: %r" % d)
        finally:
            proxy.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    if len(sys.argv) != 3:
        print("usage: test_ws.py ORIGIN WS_CLIENT", file=sys.stderr)
        return 2
    client = sys.argv[2]
    proc, port = start(sys.argv[1])
    tests = [test_handshake_and_echo, test_protocol_error, test_bad_length,
             test_refused_upgrades, lambda p: test_client(p, client),
             lambda p: test_client_tls(p, client)]
    tests[-2].__name__ = "test_client"
    tests[-1].__name__ = "test_client_tls"
    failed = 0
    try:
        for t in tests:
            try:
                t(port)
                print("ok", t.__name__)
            except (Failure, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                failed += 1
                print("FAIL", t.__name__, e)
        check(proc.poll() is None, "origin still running")
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -1
    if rc != 0:
        failed += 1
        print("FAIL origin exit code", rc)
    print("%d passed, %d failed" % (len(tests) - min(failed, len(tests)), failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
