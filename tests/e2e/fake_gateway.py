"""A malicious gateway for fault tests of tunnel-agent (test_faults.py).

Unlike helpers_daemon.FakeGateway (Python websockets + python-h2, which only
send well-formed traffic), this one writes the WebSocket and HTTP/2 layers by
hand on a plain socket, so a test can send what no library would: a frame
declaring a length far above any limit, an HPACK bomb in HEADERS +
CONTINUATION, control messages of the wrong shape, floods.

* FakeGateway(ping_interval): listens on 127.0.0.1 (ws://, so the agent dials
  plain TCP). Each connection that asks for the WebSocket upgrade becomes a
  FakeConn; a plain GET (the agent's end-to-end probe) gets a 502 and is closed.
  .pre_auth: list of functions, one per new connection in order; a function
  given instead of the challenge flow (it gets the FakeConn, after the 101).
  Connections beyond the list get the normal flow: challenge, the agent's
  auth (not verified: the agent is the one under test), auth_ok for every
  address it listed, then the HTTP/2 client preface.
* FakeConn: send_frame (raw WebSocket frame, any opcode/length), send_text,
  send_h2 (raw HTTP/2 bytes in one binary message), request (an HTTP/2
  request encoded with our own HPACK encoder), and what the agent sent:
  texts, close code, HTTP/2 responses, RST_STREAM, GOAWAY, PING ACKs.
"""

import base64
import hashlib
import json
import secrets
import socket
import struct
import threading
import time

import hpack

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# HTTP/2 frame types and flags (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def h2_frame(ftype, flags, sid, payload):
    return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack("!I", sid & 0x7FFFFFFF) + payload


def ws_header(opcode, length, fin=True, rsv=0):
    """An unmasked (server) frame header declaring `length` payload bytes."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    if length < 126:
        return bytes([b0, length])
    if length < 1 << 16:
        return bytes([b0, 126]) + struct.pack("!H", length)
    return bytes([b0, 127]) + struct.pack("!Q", length)


class H2Response:
    def __init__(self):
        self.status = None
        self.headers = []
        self.body = bytearray()
        self.ended = False
        self.reset = None
        self.done = threading.Event()


class FakeConn:
    def __init__(self, gw, sock, index):
        self.gw = gw
        self.sock = sock
        self.index = index                  # 0 for the first connection
        self.opened_at = time.monotonic()
        self.wlock = threading.Lock()
        self.cond = threading.Condition()
        self.auth = None                    # the agent's auth message
        self.addrs = []
        self.texts = []                     # text messages from the agent (decoded JSON or str)
        self.close_code = None              # the code of the agent's close frame
        self.close_reason = None
        self.eof = False                    # the agent's side of the socket ended
        self.closed = threading.Event()     # close frame or EOF seen
        self.bytes_in = 0
        # HTTP/2 (we are the client)
        self.h2_started = False
        self.settings_seen = threading.Event()
        self.dec = hpack.Decoder()
        self.dec.max_header_list_size = 1 << 20
        self.enc = hpack.Encoder()
        self.next_sid = 1
        self.responses = {}
        self.goaway = None                  # (last stream id, error code)
        self.ping_acks = []
        self._h2buf = b""
        self._hblock = None                 # (sid, flags, bytes) of a header block in progress

    # ---- writing ----
    def send_raw(self, data):
        with self.wlock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def send_frame(self, opcode, payload=b"", fin=True, declared=None, rsv=0):
        """One frame; declared: the length put in the header (default the payload's)."""
        n = len(payload) if declared is None else declared
        return self.send_raw(ws_header(opcode, n, fin, rsv) + payload)

    def send_text(self, obj):
        data = obj if isinstance(obj, (bytes, bytearray)) else \
            (obj if isinstance(obj, str) else json.dumps(obj)).encode()
        return self.send_frame(1, bytes(data))

    def send_h2(self, data):
        return self.send_frame(2, data)

    def close(self, code=1000):
        self.send_frame(8, struct.pack("!H", code))

    def shutdown(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- HTTP/2 client ----
    def h2_start(self):
        self.h2_started = True
        self.send_h2(H2_PREFACE + h2_frame(SETTINGS, 0, 0, b"") +
                     h2_frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", (64 << 20) - 65535)))

    def new_sid(self):
        sid = self.next_sid
        self.next_sid += 2
        with self.cond:
            self.responses[sid] = H2Response()
        return sid

    def req_headers(self, addr, method="GET", path="/", extra=()):
        host = f"{addr}.localhost:{self.gw.port}"
        return [(":method", method), (":scheme", "http"), (":authority", host), (":path", path),
                *extra, ("x-forwarded-for", "127.0.0.1"), ("x-forwarded-proto", "http"),
                ("x-forwarded-host", host), ("x-agent-address", addr)]

    def request(self, addr, method="GET", path="/", extra=(), body=None):
        """A well-formed request; returns its H2Response."""
        sid = self.new_sid()
        block = self.enc.encode(self.req_headers(addr, method, path, extra))
        out = h2_frame(HEADERS, END_HEADERS | (END_STREAM if body is None else 0), sid, block)
        if body is not None:
            out += h2_frame(DATA, END_STREAM, sid, body)
        self.send_h2(out)
        return self.responses[sid]

    def ping(self, opaque=b"fakeping"):
        self.send_h2(h2_frame(PING, 0, 0, opaque))

    def _on_h2_frame(self, ftype, flags, sid, payload):
        if ftype == SETTINGS:
            if not flags & ACK:
                self.send_h2(h2_frame(SETTINGS, ACK, 0, b""))
                self.settings_seen.set()
        elif ftype == PING:
            if flags & ACK:
                with self.cond:
                    self.ping_acks.append(payload)
                    self.cond.notify_all()
            else:
                self.send_h2(h2_frame(PING, ACK, 0, payload))
        elif ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                if flags & 0x8:  # PADDED
                    payload = payload[1:len(payload) - payload[0]]
                if flags & 0x20:  # PRIORITY
                    payload = payload[5:]
                self._hblock = (sid, flags, bytearray(payload))
            elif self._hblock is not None:
                self._hblock[2].extend(payload)
            if flags & END_HEADERS and self._hblock is not None:
                hsid, hflags, block = self._hblock
                self._hblock = None
                headers = self.dec.decode(bytes(block))
                with self.cond:
                    r = self.responses.setdefault(hsid, H2Response())
                    if r.status is None:
                        r.status = int(dict(headers).get(":status", 0))
                        r.headers = headers
                    if hflags & END_STREAM:
                        r.ended = True
                        r.done.set()
                    self.cond.notify_all()
        elif ftype == DATA:
            n = len(payload)
            if flags & 0x8:
                payload = payload[1:len(payload) - payload[0]]
            with self.cond:
                r = self.responses.setdefault(sid, H2Response())
                r.body += payload
                if flags & END_STREAM:
                    r.ended = True
                    r.done.set()
                self.cond.notify_all()
            if n:
                self.send_h2(h2_frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", n)) +
                             h2_frame(WINDOW_UPDATE, 0, sid, struct.pack("!I", n)))
        elif ftype == RST_STREAM:
            with self.cond:
                r = self.responses.setdefault(sid, H2Response())
                r.reset = struct.unpack("!I", payload[:4])[0]
                r.done.set()
                self.cond.notify_all()
        elif ftype == GOAWAY:
            with self.cond:
                self.goaway = struct.unpack("!II", payload[:8])
                self.cond.notify_all()

    def _on_binary(self, data):
        self._h2buf += data
        while len(self._h2buf) >= 9:
            n = int.from_bytes(self._h2buf[:3], "big")
            if len(self._h2buf) < 9 + n:
                break
            ftype, flags = self._h2buf[3], self._h2buf[4]
            sid = struct.unpack("!I", self._h2buf[5:9])[0] & 0x7FFFFFFF
            payload = self._h2buf[9:9 + n]
            self._h2buf = self._h2buf[9 + n:]
            self._on_h2_frame(ftype, flags, sid, payload)

    # ---- reading (the connection's thread) ----
    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            d = self.sock.recv(n - len(buf))
            if not d:
                raise EOFError
            buf += d
        self.bytes_in += n
        return bytes(buf)

    def read_frame(self):
        """(fin, opcode, payload) of the agent's next frame (masked: a client's)."""
        b0, b1 = self._recv_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._recv_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._recv_exact(8))[0]
        mask = self._recv_exact(4) if b1 & 0x80 else b"\0\0\0\0"
        data = self._recv_exact(n)
        data = bytes(c ^ mask[i & 3] for i, c in enumerate(data)) if b1 & 0x80 else data
        return bool(b0 & 0x80), b0 & 0x0F, data

    def read_message(self):
        """(opcode, payload) of the next whole message, answering pings."""
        parts, first = [], None
        while True:
            fin, op, data = self.read_frame()
            if op == 9:
                self.send_frame(10, data)
                continue
            if op >= 8:
                return op, data
            if op != 0:
                first = op
            parts.append(data)
            if fin:
                return first, b"".join(parts)

    def wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
                self.cond.wait(min(left, 0.1))

    def _record_close(self, data):
        with self.cond:
            self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
            self.close_reason = data[2:].decode(errors="replace")
            self.cond.notify_all()

    def run(self, pre_auth):
        try:
            if pre_auth is not None:
                pre_auth(self)
            else:
                self._auth_flow()
            while True:
                op, data = self.read_message()
                if op == 8:
                    self._record_close(data)
                    self.send_raw(ws_header(8, len(data[:2])) + data[:2])
                    break
                if op == 2:
                    self._on_binary(data)
                elif op == 1:
                    try:
                        m = json.loads(data)
                    except ValueError:
                        m = data.decode(errors="replace")
                    with self.cond:
                        self.texts.append(m)
                        self.cond.notify_all()
        except (EOFError, OSError):
            pass
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()
            self.closed.set()
            try:
                self.sock.close()
            except OSError:
                pass

    def challenge(self):
        self.nonce = secrets.token_hex(32)
        self.send_text({"type": "challenge", "nonce": self.nonce, "expires_in": 30})

    def _auth_flow(self):
        self.challenge()
        op, data = self.read_message()
        if op != 1:
            if op == 8:
                self._record_close(data)
            raise EOFError
        self.auth = json.loads(data)
        self.addrs = [e["address"] for e in self.auth["agents"]]
        self.send_text({
            "type": "auth_ok", "region": "fake", "ping_interval": self.gw.ping_interval,
            "agents": [{"address": a, "url": f"http://{a}.localhost:{self.gw.port}"}
                       for a in self.addrs],
            "rejected": []})
        self.h2_start()
        with self.gw.cond:
            self.gw.cond.notify_all()


class FakeGateway:
    def __init__(self, ping_interval=20):
        self.ping_interval = ping_interval
        self.domain = "localhost"
        self.scheme = "http"
        self.ca = None
        self.pre_auth = []
        self.conns = []
        self.probes = 0
        self.cond = threading.Condition()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        s.settimeout(120)
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                d = s.recv(4096)
                if not d:
                    s.close()
                    return
                head += d
                if len(head) > 65536:
                    s.close()
                    return
        except OSError:
            s.close()
            return
        lines = head.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if hdrs.get("upgrade", "").lower() != "websocket":
            with self.cond:
                self.probes += 1
            s.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            s.close()
            return
        accept = base64.b64encode(hashlib.sha1(hdrs["sec-websocket-key"].encode() + WS_GUID)
                                  .digest()).decode()
        s.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + "\r\n"
                   "Sec-WebSocket-Protocol: tunnel-h2.v1\r\n\r\n").encode())
        with self.cond:
            c = FakeConn(self, s, len(self.conns))
            pre = self.pre_auth[c.index] if c.index < len(self.pre_auth) else None
            self.conns.append(c)
            self.cond.notify_all()
        c.run(pre)

    def wait_conn(self, n, timeout=15, ready=True):
        """The n-th connection (1-based); ready: authenticated and the agent's
        SETTINGS seen (the normal flow only)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.conns) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.conns)} connections, wanted {n}")
                self.cond.wait(left)
            c = self.conns[n - 1]
        if ready and not c.settings_seen.wait(max(0.1, deadline - time.monotonic())):
            raise TimeoutError(f"connection {n}: no SETTINGS from the agent")
        return c

    def stop(self):
        self.stopping = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        try:
            self.lsock.close()
        except OSError:
            pass
        with self.cond:
            conns = list(self.conns)
        for c in conns:
            c.shutdown()
