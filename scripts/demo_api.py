#!/usr/bin/python3
"""A small local API for the demo: /hello, /echo (POST body back), and
/stream (server-sent events, one per 0.5 s). Prints "demo_api: listening
port=N" once it accepts connections (--port 0 picks a free port).
DEMO_API_DELAY=SECONDS waits that long before listening, to stand in for a
local API that is slow to start (tests use it)."""
import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(10):
                ev = f"data: event {i} at {time.time():.3f}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                self.wfile.flush()
                time.sleep(0.5)
            self.wfile.write(b"0\r\n\r\n")
            return
        body = json.dumps({
            "hello": "from your local API",
            "path": self.path,
            "agent_address": self.headers.get("X-Agent-Address"),
            "agent_id": self.headers.get("X-Agent-Id"),
            "origin": self.headers.get("X-Tunnel-Origin"),
            "client": self.headers.get("X-Forwarded-For"),
        }).encode() + b"\n"
        self._send(200, body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        self._send(200, body, self.headers.get("Content-Type", "application/octet-stream"))

    def log_message(self, fmt, *args):
        print("api:", fmt % args, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args()
    delay = os.environ.get("DEMO_API_DELAY", "0")
    try:
        delay_s = float(delay)
    except ValueError:
        delay_s = -1.0
    if not 0 <= delay_s <= 60:
        sys.exit(f"demo_api: DEMO_API_DELAY={delay!r}: want seconds from 0 to 60")
    time.sleep(delay_s)
    try:
        srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    except OSError as e:
        sys.exit(f"demo_api: cannot listen on 127.0.0.1:{a.port}: {e.strerror}")
    print(f"demo_api: listening port={srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
