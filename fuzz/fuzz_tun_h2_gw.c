/* libFuzzer target for the gateway's side of the native tunnel
 * (gateway/gw_tun_h2.c: the HTTP/2 client session in the WebSocket's binary
 * messages, behind gw_tun.c): a real gateway context (fz_gw.h), a tunnel
 * authenticated as the harness's agent, three public HTTP/1.1 requests in
 * flight (GET, a POST with a body, a WebSocket upgrade: streams 1, 3, 5),
 * then the input as the agent's HTTP/2 bytes (SETTINGS, HEADERS and
 * CONTINUATION with HPACK, DATA, RST_STREAM, GOAWAY, PUSH_PROMISE, ...).
 *
 * The first byte chooses: bits 0-3 the message size ((n * 11) bytes, 0: the
 * whole input in one message), bit 4 the POST's client leaves halfway, bit 5
 * SIGTERM's drain halfway, bit 6 the agent closes the WebSocket at the end,
 * bit 7 small limits (max-header-bytes 2048, max-header-count 16). The rest
 * is the agent's bytes: the server preface (a SETTINGS frame) first.
 *
 * FZ_DUMP=file writes what the gateway sent in the tunnel (the client
 * preface and the requests): seeds for fuzz_tun_h2_agent. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "fz_gw.h"
#include "gw_tun.h"
#include "gw_tun_h2.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fz_dump(struct fz_gw *f)
{
    const char *path = getenv("FZ_DUMP");
    struct evbuffer *b = f->agent.bin;
    FILE *fp;

    if (path == NULL || b == NULL)
        return;
    fp = fopen(path, "wb");
    if (fp == NULL)
        return;
    fwrite(evbuffer_pullup(b, -1), 1, evbuffer_get_length(b), fp);
    fclose(fp);
}

/* The three public requests, all for the harness's agent. */
static void fz_requests(struct fz_gw *f, char *host, size_t hostlen)
{
    char req[1024];
    int n;

    snprintf(host, hostlen, "%s.example.com", fz_gw_agent_addr());
    n = snprintf(req, sizeof(req), "GET /a?x=1 HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n\r\n", host);
    fz_gw_client(f, req, (size_t)n);
    n = snprintf(req, sizeof(req),
                 "POST /b HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n"
                 "Content-Type: text/plain\r\n\r\nhello",
                 host);
    fz_gw_client(f, req, (size_t)n);
    n = snprintf(req, sizeof(req),
                 "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Protocol: chat\r\n\r\n",
                 host);
    fz_gw_client(f, req, (size_t)n);
    fz_gw_pump(f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const small[] = {"--max-header-bytes", "2048", "--max-header-count", "16",
                                        NULL};
    static struct fz_gw f;
    char host[128];
    uint8_t cfg;
    size_t piece;
    size_t half;

    if (size < 1)
        return 0;
    cfg = data[0];
    data++;
    size--;
    piece = (cfg & 15) != 0 ? (size_t)(cfg & 15) * 11 : size;
    half = size / 2;
    fz_gw_new(&f, (cfg & 0x80) ? small : NULL);
    if (!fz_gw_tunnel(&f, &gw_tun_h2_proto))
        abort(); /* the harness's own auth failed */
    fz_requests(&f, host, sizeof(host));
    for (size_t off = 0; off < size; off += piece) {
        size_t n = size - off < piece ? size - off : piece;
        bool crossed = off <= half && off + n > half;
        fz_gw_agent_binary(&f, data + off, n);
        fz_gw_pump(&f);
        if (crossed && (cfg & 0x10))
            fz_gw_client_close(&f, 1);
        if (crossed && (cfg & 0x20))
            gw_tun_drain_all(f.ctx, (cfg & 1) != 0); /* handover or not */
        /* a WebSocket client's bytes, for the upgraded stream */
        if (crossed)
            fz_gw_client_send(&f, 2, "\x81\x82\x00\x00\x00\x00hi", 8);
    }
    if (cfg & 0x40)
        fz_gw_agent_close(&f, 1000);
    fz_gw_pump(&f);
    fz_dump(&f);
    fz_gw_free(&f);
    return 0;
}
