"""The local API that end-to-end tests expose through the tunnel.

Runs in the test process (threads), so tests can read what it saw:
  GET  /echo...          JSON: method, path, headers (lists), body sha256/len
  ANY  /echo             same, for POST/PUT/DELETE with a body
  GET  /bytes?n=N&seed=S N deterministic pseudo-random bytes (Content-Length)
  GET  /chunked?n=N      N bytes, chunked, 64 KiB chunks
  GET  /slowbytes?n=&chunk=&interval_ms=  N bytes (Content-Length), a chunk per interval
  POST /upload?id=X      reads the body as it comes (records the time of its first
                         byte), answers {"len","sha256"}; &slow=BPS reads slowly
  GET  /sse?n=&interval_ms=  server-sent events, one per interval, timestamped
  GET  /text?n=N         N bytes of UTF-8 text with 2-, 3- and 4-byte characters
                         (text_body(N)), text/plain, Content-Length
  GET  /status/NNN       answers NNN with no body
  GET  /cookies          two Set-Cookie headers
  GET  /hold?id=X[&after_head=1]  never answers (or sends a head and holds);
                         records when the client side closes
"""

import hashlib
import json
import random
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


BLOCK = random.Random(7).randbytes(1 << 20)


def stream_digest(n):
    """sha256 of the first n bytes of BLOCK repeated (what /stream?n= sends)."""
    h = hashlib.sha256()
    left = n
    while left:
        c = BLOCK if left >= len(BLOCK) else BLOCK[:left]
        h.update(c)
        left -= len(c)
    return h.hexdigest()


_TEXT_UNIT = "line é € 😀 ascii\n".encode()


def text_body(n):
    """n bytes of UTF-8 text (what /text?n= sends), cut at a character boundary
    and padded with ASCII to exactly n."""
    out = (_TEXT_UNIT * (n // len(_TEXT_UNIT) + 1))[:n]
    while out:
        try:
            out.decode()
            break
        except UnicodeDecodeError:
            out = out[:-1]
    return out + b"x" * (n - len(out))


def det_bytes(n, seed):
    return random.Random(seed).randbytes(n)


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.first_byte = {}    # upload id -> monotonic time of its first body byte
        self.closed = {}        # hold id -> monotonic time the connection closed
        self.opened = {}        # hold id -> monotonic time the request arrived
        self.requests = 0
        self.paths = []         # every request's target, in order of arrival
        self.last_headers = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "local-api"

    def log_message(self, fmt, *args):
        pass

    @property
    def st(self):
        return self.server.state

    def q(self):
        u = urlparse(self.path)
        return u.path, {k: v[0] for k, v in parse_qs(u.query).items()}

    def send_body(self, status, body, ctype="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self, slow_bps=0, upload_id=None):
        h = hashlib.sha256()
        total = 0
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        first = True

        def got(chunk):
            nonlocal total, first
            if first and chunk and upload_id:
                with self.st.lock:
                    self.st.first_byte[upload_id] = time.monotonic()
                first = False
            h.update(chunk)
            total += len(chunk)
            if slow_bps:
                time.sleep(len(chunk) / slow_bps)

        if "chunked" in te:
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    c = self.rfile.read(min(left, 65536))
                    if not c:
                        raise ConnectionError("short chunk")
                    got(c)
                    left -= len(c)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                c = self.rfile.read1(min(left, 65536)) if hasattr(self.rfile, "read1") else self.rfile.read(min(left, 65536))
                if not c:
                    raise ConnectionError("short body")
                got(c)
                left -= len(c)
        return total, h.hexdigest()

    def handle_any(self):
        path, q = self.q()
        with self.st.lock:
            self.st.requests += 1
            self.st.paths.append(self.path)
            self.st.last_headers = self.headers
        if path.startswith("/echo"):
            n, digest = self.read_body()
            hdrs = {}
            for k, v in self.headers.items():
                hdrs.setdefault(k.lower(), []).append(v)
            body = json.dumps({"method": self.command, "path": self.path, "headers": hdrs,
                               "len": n, "sha256": digest}).encode()
            self.send_body(200, body)
        elif path == "/bytes":
            data = det_bytes(int(q.get("n", "0")), q.get("seed", "0"))
            self.send_body(200, data, "application/octet-stream")
        elif path == "/text":
            self.send_body(200, text_body(int(q.get("n", "0"))), "text/plain; charset=utf-8")
        elif path == "/stream":
            # n bytes: BLOCK repeated (the client knows the digest), chunked
            n = int(q.get("n", "0"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            left = n
            while left:
                c = BLOCK if left >= len(BLOCK) else BLOCK[:left]
                self.wfile.write(c)
                left -= len(c)
        elif path == "/slowbytes":
            # n bytes (Content-Length), in chunks of `chunk` bytes, one per interval
            n, chunk = int(q.get("n", "0")), int(q.get("chunk", "1024"))
            iv = int(q.get("interval_ms", "50")) / 1000
            data = det_bytes(n, "slow")
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            for i in range(0, n, chunk):
                self.wfile.write(data[i:i + chunk])
                self.wfile.flush()
                time.sleep(iv)
        elif path == "/chunked":
            n = int(q.get("n", "0"))
            data = det_bytes(n, q.get("seed", "0"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, n, 65536):
                c = data[i:i + 65536]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/upload":
            n, digest = self.read_body(float(q.get("slow", "0")), q.get("id"))
            self.send_body(200, json.dumps({"len": n, "sha256": digest}).encode())
        elif path == "/sse":
            n = int(q.get("n", "20"))
            iv = int(q.get("interval_ms", "100")) / 1000
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                ev = f"id: {i}\ndata: {time.time():.6f}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                self.wfile.flush()
                time.sleep(iv)
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/short":
            # promises `of` bytes, sends `n` of them in one write, then closes
            n, of = int(q.get("n", "0")), int(q.get("of", "0"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(of))
            self.end_headers()
            self.wfile.write(det_bytes(n, "short"))
            self.wfile.flush()
            self.close_connection = True
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            self.send_response(code)
            if code not in (204, 304):
                self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/cookies":
            self.send_response(200)
            self.send_header("Set-Cookie", "a=1; Path=/")
            self.send_header("Set-Cookie", "b=2; Path=/")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        elif path == "/hold":
            hid = q.get("id", "x")
            with self.st.lock:
                self.st.opened[hid] = time.monotonic()
            if q.get("after_head"):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"5\r\nhello\r\n")
                self.wfile.flush()
            sock = self.connection
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r, _, _ = select.select([sock], [], [], 0.05)
                if r:
                    try:
                        if sock.recv(1, socket.MSG_PEEK) == b"":
                            break
                    except OSError:
                        break
            with self.st.lock:
                self.st.closed[hid] = time.monotonic()
            self.close_connection = True
        else:
            self.send_body(404, b'{"error":"nope"}')

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 refuses bursts


class LocalApi:
    def __init__(self):
        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.state = State()
        self.state = self.server.state
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
