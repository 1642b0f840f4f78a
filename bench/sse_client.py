#!/usr/bin/python3
"""SSE load client for bench/run (stdlib only).

Opens --streams concurrent HTTP/1.1 connections (TLS when the URL is https),
each asking for GET /sse?n=EVENTS&interval_ms=MS, and measures per stream the
time to the first response byte and per event the delay between the origin's
send timestamp (ts_us, CLOCK_REALTIME) and its arrival here. Prints one JSON
object on stdout:
  {"streams":N,"events_expected":N,"events_received":N,"lost":N,"errors":[...],
   "ttfb_ms":{"p50","p99","max"},"latency_ms":{"p50","p99","max"}}
Every wait is bounded by --timeout."""
import argparse
import asyncio
import json
import re
import ssl
import sys
import time
import urllib.parse

EVENT_RE = re.compile(rb'data: \{"seq":(\d+),"ts_us":(\d+)\}')


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


class Body:
    """Decodes an HTTP/1.1 body (chunked, Content-Length or until EOF) and
    yields complete SSE events ("...\\n\\n") as they arrive."""

    def __init__(self, headers):
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self.raw = b""
        self.data = b""
        self.done = False

    def feed(self, b):
        self.raw += b
        if not self.chunked:
            self.data += self.raw
            self.raw = b""
        else:
            while True:
                nl = self.raw.find(b"\r\n")
                if nl < 0:
                    break
                size = int(self.raw[:nl].split(b";")[0], 16)
                if size == 0:
                    self.done = True
                    self.raw = b""
                    break
                if len(self.raw) < nl + 2 + size + 2:
                    break
                self.data += self.raw[nl + 2:nl + 2 + size]
                self.raw = self.raw[nl + 2 + size + 2:]
        events = []
        while True:
            end = self.data.find(b"\n\n")
            if end < 0:
                break
            events.append(self.data[:end])
            self.data = self.data[end + 2:]
        return events


async def one_stream(args, u, sslctx, result, delay_s):
    # Staggered starts spread the origin's timers over the interval, so that
    # events do not arrive in bursts of --streams and queue in this client.
    await asyncio.sleep(delay_s)
    host = u.hostname
    port = u.port or (443 if u.scheme == "https" else 80)
    chost, cport = host, port
    if args.connect:
        chost, cport = args.connect.rsplit(":", 1)
        cport = int(cport)
    path = "%s?n=%d&interval_ms=%d" % (u.path or "/sse", args.events, args.interval_ms)
    netloc = u.netloc
    received = 0
    writer = None
    try:
        reader, writer = await asyncio.open_connection(
            chost, cport, ssl=sslctx, server_hostname=host if sslctx else None)
        writer.write(("GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
                      "Connection: close\r\n\r\n" % (path, netloc)).encode())
        t_req = time.time()
        status_line = await reader.readline()
        result["ttfb"].append((time.time() - t_req) * 1000.0)
        parts = status_line.split()
        if len(parts) < 2 or parts[1] != b"200":
            raise RuntimeError("status %r" % status_line[:80])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        body = Body(headers)
        while received < args.events and not body.done:
            b = await reader.read(65536)
            if not b:
                break
            now_us = time.time() * 1e6
            for ev in body.feed(b):
                m = EVENT_RE.search(ev)
                if m is None:
                    continue
                received += 1
                result["lat"].append((now_us - int(m.group(2))) / 1000.0)
    except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError, ssl.SSLError) as e:
        result["errors"].append("%s: %s" % (type(e).__name__, e))
    finally:
        result["received"] += received
        if writer is not None:
            writer.close()


async def run(args):
    u = urllib.parse.urlsplit(args.url)
    sslctx = None
    if u.scheme == "https":
        sslctx = ssl.create_default_context(cafile=args.cacert) if args.cacert else \
            ssl._create_unverified_context()
        sslctx.set_alpn_protocols(["http/1.1"])
    result = {"ttfb": [], "lat": [], "errors": [], "received": 0}
    step_s = args.interval_ms / 1000.0 / max(1, args.streams)
    tasks = [asyncio.create_task(one_stream(args, u, sslctx, result, i * step_s))
             for i in range(args.streams)]
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for t in pending:
        t.cancel()
    if pending:
        result["errors"].append("%d streams timed out after %ss" % (len(pending), args.timeout))
        await asyncio.gather(*pending, return_exceptions=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="https://HOST:PORT/sse or http://...")
    ap.add_argument("--connect", help="HOST:PORT to dial instead of the URL's")
    ap.add_argument("--cacert", help="CA file; without it TLS is not verified")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--events", type=int, default=50)
    ap.add_argument("--interval-ms", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    r = asyncio.run(run(args))
    expected = args.streams * args.events
    out = {
        "streams": args.streams,
        "events_expected": expected,
        "events_received": r["received"],
        "lost": expected - r["received"],
        "errors": r["errors"][:10],
        "ttfb_ms": {"p50": percentile(r["ttfb"], 50), "p99": percentile(r["ttfb"], 99),
                    "max": max(r["ttfb"]) if r["ttfb"] else None},
        "latency_ms": {"p50": percentile(r["lat"], 50), "p99": percentile(r["lat"], 99),
                       "max": max(r["lat"]) if r["lat"] else None},
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
