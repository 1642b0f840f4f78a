#!/usr/bin/python3
"""Checks tunnel-bench-origin over raw sockets: every route, pipelining,
Expect: 100-continue, chunked uploads and the SSE timestamps.
With a second argument, also runs the SSE load client tunnel-bench-sse
against it. Usage: test_origin.py ORIGIN [SSE_CLIENT] (meson test suite 'bench')."""
import json
import re
import socket
import subprocess
import sys
import time

TIMEOUT_S = 10


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


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    return s, s.makefile("rb")


def read_response(f):
    """Reads one HTTP/1.1 response; returns (status, headers dict, body bytes)."""
    status_line = f.readline()
    check(status_line.startswith(b"HTTP/1.1 "), "status line %r" % status_line)
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = f.readline()
        check(line.endswith(b"\r\n"), "header line %r" % line)
        if line == b"\r\n":
            break
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    if status == 100:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(f.readline().strip(), 16)
            chunk = f.read(size)
            check(f.read(2) == b"\r\n", "chunk end")
            if size == 0:
                break
            body += chunk
        return status, headers, body
    n = int(headers["content-length"])
    return status, headers, f.read(n)


def test_routes(port):
    s, f = connect(port)
    for path, size in (("/small", 1024), ("/1m", 1 << 20), ("/bytes?n=7", 7), ("/bytes?n=0", 0)):
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        st, h, body = read_response(f)
        check(st == 200 and len(body) == size, "%s: %d %d" % (path, st, len(body)))
        check(h.get("connection") == "keep-alive", "%s keep-alive" % path)
    for req, want in ((b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
                      (b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
                      (b"GET /sse?n=abc HTTP/1.1\r\nHost: x\r\n\r\n", 400),
                      (b"GET /bytes?n=-1 HTTP/1.1\r\nHost: x\r\n\r\n", 400)):
        s.sendall(req)
        st, _, _ = read_response(f)
        check(st == want, "%r -> %d, want %d" % (req, st, want))
    s.close()


def test_1g_streams(port):
    """A 1 GiB body streams; only the head is read, then the socket is closed."""
    s, f = connect(port)
    s.sendall(b"GET /1g HTTP/1.1\r\nHost: x\r\n\r\n")
    check(f.readline().startswith(b"HTTP/1.1 200"), "1g status")
    while f.readline() != b"\r\n":
        pass
    got = len(f.read(4 << 20))
    check(got == 4 << 20, "1g first bytes")
    s.close()


def test_pipelining(port):
    s, f = connect(port)
    s.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /sse?n=2&interval_ms=10 HTTP/1.1\r\nHost: x\r\n\r\n"
              b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
              b"GET /bytes?n=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    sizes = []
    for _ in range(4):
        st, h, body = read_response(f)
        check(st == 200, "pipelined status %d" % st)
        sizes.append(body)
    check(len(sizes[0]) == 1024, "pipelined small")
    check(sizes[1].count(b"data: ") == 2, "pipelined sse")
    check(json.loads(sizes[2]) == {"bytes": 5}, "pipelined sink")
    check(sizes[3] == b"abc", "pipelined last body %r" % sizes[3])
    check(f.read() == b"", "closed after Connection: close")
    s.close()


def test_sink(port):
    s, f = connect(port)
    body = b"x" * 300000
    s.sendall(b"PUT /sink HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body))
    st, _, _ = read_response(f)
    check(st == 100, "expect 100-continue, got %d" % st)
    s.sendall(body)
    st, _, resp = read_response(f)
    check(st == 200 and json.loads(resp) == {"bytes": len(body)}, "sink length")
    s.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    st, _, resp = read_response(f)
    check(st == 200 and json.loads(resp) == {"bytes": 7}, "chunked sink")
    s.close()


def test_sse(port):
    s, f = connect(port)
    t0 = time.time()
    s.sendall(b"GET /sse?n=5&interval_ms=40 HTTP/1.1\r\nHost: x\r\n\r\n")
    st, h, body = read_response(f)
    elapsed = time.time() - t0
    check(st == 200 and h["content-type"] == "text/event-stream", "sse head")
    events = [json.loads(m) for m in re.findall(rb"data: (\{.*?\})\n\n", body)]
    check([e["seq"] for e in events] == list(range(5)), "sse seqs %r" % events)
    stamps = [e["ts_us"] for e in events]
    check(all(b - a >= 30000 for a, b in zip(stamps, stamps[1:])), "sse interval %r" % stamps)
    check(abs(stamps[0] / 1e6 - t0) < 1.0, "sse timestamp is CLOCK_REALTIME us")
    check(0.15 < elapsed < 2.0, "sse took %.3f s" % elapsed)
    s.close()


def test_sse_client(port, client):
    """tunnel-bench-sse counts every event and measures plausible delays."""
    r = subprocess.run([client, "--url", "http://127.0.0.1:%d/sse" % port, "--streams", "20",
                        "--events", "10", "--interval-ms", "10", "--timeout", "20"],
                       capture_output=True, text=True, timeout=TIMEOUT_S * 3)
    check(r.returncode == 0, "sse client exit %d: %s" % (r.returncode, r.stderr))
    d = json.loads(r.stdout)
    check(d["events_expected"] == 200 and d["events_received"] == 200 and d["lost"] == 0,
          "sse client counts %r" % d)
    check(d["errors"] == [], "sse client errors %r" % d["errors"])
    check(0 <= d["latency_ms"]["p50"] <= d["latency_ms"]["p99"] <= d["latency_ms"]["max"] < 1000,
          "sse latency %r" % d["latency_ms"])
    check(0 <= d["ttfb_ms"]["p50"] < 1000, "sse ttfb %r" % d["ttfb_ms"])
    r = subprocess.run([client, "--url", "http://127.0.0.1:%d/nope" % port, "--streams", "2",
                        "--events", "1", "--timeout", "20"],
                       capture_output=True, text=True, timeout=TIMEOUT_S * 3)
    d = json.loads(r.stdout)
    check(d["lost"] == 2 and "status 404" in d["errors"], "sse client on 404: %r" % d)


def main():
    if len(sys.argv) not in (2, 3):
        print("usage: test_origin.py ORIGIN [SSE_CLIENT]", file=sys.stderr)
        return 2
    proc, port = start(sys.argv[1])
    tests = [test_routes, test_1g_streams, test_pipelining, test_sink, test_sse]
    if len(sys.argv) == 3:
        client = sys.argv[2]
        tests.append(lambda p: test_sse_client(p, client))
        tests[-1].__name__ = "test_sse_client"
    failed = 0
    try:
        for t in tests:
            try:
                t(port)
                print("ok", t.__name__)
            except (Failure, OSError, ValueError, KeyError) as e:
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
