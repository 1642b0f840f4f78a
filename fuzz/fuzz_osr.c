/* libFuzzer target for the gateway's Osaurus session (gateway/gw_osr.c, the
 * relay protocol of proto/PROTOCOL.md section 9, decoded by common/tun_msg.c
 * in Osaurus mode, behind gw_tun.c): a real gateway context (fz_gw.h), an
 * Osaurus tunnel authenticated as the harness's agent, three public requests
 * in flight (GET, a POST with a body, a GET asking for an event stream),
 * then the input as the agent's text messages: response, stream_start,
 * stream_chunk, stream_end, ping, pong, error, add_agent, remove_agent...
 *
 * The first byte chooses: bit 0 the "base64" feature in auth, bit 1 the
 * POST's client leaves halfway, bit 2 SIGTERM's drain halfway, bit 3 the
 * agent closes at the end, bit 4 small limits (max-body-bytes 64). The rest
 * is split at '\n' into one text message each; "$1" .. "$3" in a message are
 * replaced with the ids of the gateway's first three "request" frames, so
 * answers land on the requests in flight. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fz_gw.h"
#include "gw_osr.h"
#include "gw_tun.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fz_requests(struct fz_gw *f)
{
    char host[128];
    char req[1024];
    int n;

    snprintf(host, sizeof(host), "%s.example.com", fz_gw_agent_addr());
    n = snprintf(req, sizeof(req), "GET /a?x=1 HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n\r\n", host);
    fz_gw_client(f, req, (size_t)n);
    n = snprintf(req, sizeof(req),
                 "POST /b HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n"
                 "Content-Type: application/json\r\n\r\n[1,2]",
                 host);
    fz_gw_client(f, req, (size_t)n);
    n = snprintf(req, sizeof(req),
                 "GET /events HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", host);
    fz_gw_client(f, req, (size_t)n);
    fz_gw_pump(f);
}

/* One message with $1..$3 replaced by the request ids. */
static void fz_send(struct fz_gw *f, const uint8_t *p, size_t len)
{
    static char buf[1 << 17];
    size_t o = 0;

    for (size_t i = 0; i < len && o < sizeof(buf) - TUN_ID_MAX - 1; i++) {
        if (p[i] == '$' && i + 1 < len && p[i + 1] >= '1' && p[i + 1] <= '3') {
            int k = p[i + 1] - '1';
            const char *id = k < f->agent.nreq_ids ? f->agent.req_ids[k] : "none";
            size_t n = strlen(id);
            memcpy(buf + o, id, n);
            o += n;
            i++;
            continue;
        }
        buf[o++] = (char)p[i];
    }
    fz_gw_agent_text(f, buf, o);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const small[] = {"--max-body-bytes", "64", NULL};
    static struct fz_gw f;
    uint8_t cfg;
    size_t half;

    if (size < 1)
        return 0;
    cfg = data[0];
    data++;
    size--;
    half = size / 2;
    fz_gw_new(&f, (cfg & 0x10) ? small : NULL);
    f.agent.features = (cfg & 1) ? TUN_FEAT_BASE64 : 0;
    if (!fz_gw_tunnel(&f, &gw_osr_proto))
        abort(); /* the harness's own auth failed */
    fz_requests(&f);
    for (size_t off = 0; off <= size;) {
        const uint8_t *nl = memchr(data + off, '\n', size - off);
        size_t n = nl != NULL ? (size_t)(nl - (data + off)) : size - off;
        bool crossed = off <= half && off + n + 1 > half;
        fz_send(&f, data + off, n);
        fz_gw_pump(&f);
        if (crossed && (cfg & 2))
            fz_gw_client_close(&f, 1);
        if (crossed && (cfg & 4))
            gw_tun_drain_all(f.ctx, (cfg & 1) != 0); /* handover or not */
        off += n + 1;
    }
    if (cfg & 8)
        fz_gw_agent_close(&f, 1000);
    fz_gw_pump(&f);
    fz_gw_free(&f);
    return 0;
}
