/* libFuzzer target for the gateway's HTTP/1.1 front end (gateway/gw_h1.c on
 * http-parser, with the bridge, the apex endpoints and the tunnel endpoint
 * behind it): arbitrary bytes from one public client into a real gateway
 * context (fz_gw.h), pipelining, bodies, upgrades and the limits included.
 * Hosts <agent>.example.com reach a fake upstream registered in the real
 * registry; it answers from the loop, as a tunnel would.
 *
 * The first byte chooses: bits 0-1 the upstream's answer (0: 200 with a
 * Content-Length body, 1: 200 without length then end, 2: no answer until
 * the input is all sent, then 200, 3: a 502 failure from the loop), bit 2
 * small limits (max-header-bytes 1024, max-header-count 12, max-body-bytes
 * 4096), bit 3 send in pieces of ((byte >> 4) + 1) * 3 bytes (bits 4-7)
 * with the loop run in between; with bit 3 off, bit 4 is a half-close after
 * the input. The rest is the client's bytes. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "fz_gw.h"
#include "gw.h"
#include "gw_reg.h"
#include "gw_req.h"
#include "gw_up.h"
#include "id.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum fz_answer {
    FZ_ANS_LENGTH = 0,
    FZ_ANS_NO_LENGTH,
    FZ_ANS_LATE,
    FZ_ANS_FAIL,
};

/* One request opened on the fake upstream. Freed when the front end cancels
 * it, or by us from our event once we ended it. */
struct fz_st {
    struct gw_req *r;
    struct event *ev;   /* answers from the loop */
    struct fz_h1 *h;
    bool head_sent;
    bool ended;
    struct fz_st *next; /* h->streams */
};

struct fz_h1 {
    struct fz_gw gw;
    struct gw_route route;
    enum fz_answer answer;
    bool release;       /* FZ_ANS_LATE: the input is all sent */
    struct fz_st *streams;
};

static const struct gw_up_ops fz_up;

static void fz_st_free(struct fz_st *st)
{
    struct fz_st **pp = &st->h->streams;

    while (*pp != st)
        pp = &(*pp)->next;
    *pp = st->next;
    event_free(st->ev);
    free(st);
}

static void fz_st_kick(struct fz_st *st)
{
    event_active(st->ev, EV_TIMEOUT, 0);
}

static void fz_st_end(struct fz_st *st, bool complete)
{
    st->ended = true;
    gw_req_end(st->r, complete);
}

/* The upstream's answer, from the loop. */
static void fz_st_on_ev(evutil_socket_t fd, short what, void *arg)
{
#define FZ_NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1, 0}
    static const nghttp2_nv with_len[] = {FZ_NV("content-type", "text/plain"),
                                          FZ_NV("content-length", "5")};
    static const nghttp2_nv ws_hdrs[] = {FZ_NV("sec-websocket-protocol", "chat"),
                                         FZ_NV("x-fuzz", "1")};
    struct fz_st *st = arg;
    struct gw_req *r = st->r;
    size_t avail;

    if (st->ended) {
        fz_st_free(st);
        return;
    }
    /* the request body (or a WebSocket's bytes) is taken as it comes */
    avail = gw_req_body_avail(r);
    if (avail > 0 && gw_req_body_take(r, NULL, avail) != 0) {
        fz_st_end(st, false);
        fz_st_kick(st);
        return;
    }
    if (st->h->answer == FZ_ANS_LATE && !st->h->release)
        return;
    if (st->h->answer == FZ_ANS_FAIL) {
        st->ended = true;
        gw_req_fail(r, HERR_AGENT_OFFLINE);
        fz_st_kick(st);
        return;
    }
    if (!st->head_sent) {
        bool ws = gw_req_is_websocket(r);
        const nghttp2_nv *nv = ws ? ws_hdrs : with_len;
        size_t n = ws ? 2 : st->h->answer == FZ_ANS_NO_LENGTH ? 1 : 2;
        st->head_sent = true;
        if (gw_req_head(r, 200, nv, n) != 0) {
            fz_st_end(st, false);
            fz_st_kick(st);
            return;
        }
        if (ws) {
            /* an open WebSocket: echo what comes, never end by itself */
            if (avail > 0)
                gw_req_body(r, (const uint8_t *)"echo!", 5);
            return;
        }
        if (gw_req_body(r, (const uint8_t *)"hello", 5) != 0) {
            fz_st_end(st, false);
            fz_st_kick(st);
            return;
        }
        fz_st_end(st, true);
        fz_st_kick(st);
        return;
    }
    if (avail > 0 && gw_req_is_websocket(r))
        gw_req_body(r, (const uint8_t *)"echo!", 5);
    if (r->body_eof && gw_req_is_websocket(r)) {
        fz_st_end(st, true);
        fz_st_kick(st);
    }
}

static enum herr fz_open(struct gw_route *rt, struct gw_req *r)
{
    struct fz_h1 *h = rt->owner;
    struct fz_st *st = calloc(1, sizeof(*st));

    if (st == NULL)
        return HERR_INTERNAL;
    st->ev = event_new(h->gw.ctx->base, -1, 0, fz_st_on_ev, st);
    if (st->ev == NULL) {
        free(st);
        return HERR_INTERNAL;
    }
    st->r = r;
    st->h = h;
    st->next = h->streams;
    h->streams = st;
    gw_req_attach(r, &fz_up, st);
    fz_st_kick(st);
    return HERR_NONE;
}

static void fz_body_more(void *stream)
{
    fz_st_kick(stream);
}

static void fz_consumed(void *stream, size_t n)
{
}

static void fz_cancel(void *stream)
{
    struct fz_st *st = stream;

    gw_req_detach(st->r);
    fz_st_free(st);
}

static const struct gw_up_ops fz_up = {
    .name = "fuzz",
    .open = fz_open,
    .body_more = fz_body_more,
    .consumed = fz_consumed,
    .cancel = fz_cancel,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const small[] = {"--max-header-bytes", "1024", "--max-header-count", "12",
                                        "--max-body-bytes", "4096", NULL};
    static struct fz_h1 h;
    const char *addr;
    uint8_t cfg;
    int oom = 0;
    int c;

    if (size < 1)
        return 0;
    cfg = data[0];
    data++;
    size--;
    memset(&h, 0, sizeof(h));
    h.answer = (enum fz_answer)(cfg & 3);
    fz_gw_new(&h.gw, (cfg & 4) ? small : NULL);
    addr = fz_gw_agent_addr();
    if (id_addr_parse(addr, strlen(addr), h.route.addr) != ID_OK)
        abort();
    memcpy(h.route.addr_str, addr, strlen(addr) + 1);
    h.route.up = &fz_up;
    h.route.owner = &h;
    if (gw_reg_set(h.gw.ctx->reg, h.route.addr, &h.route, &oom) != NULL || oom != 0)
        abort();

    if (cfg & 8) {
        size_t piece = (size_t)((cfg >> 4) + 1) * 3;
        c = fz_gw_client(&h.gw, NULL, 0);
        for (size_t off = 0; off < size; off += piece) {
            size_t n = size - off < piece ? size - off : piece;
            fz_gw_client_send(&h.gw, c, data + off, n);
            fz_gw_pump(&h.gw);
        }
    } else {
        c = fz_gw_client(&h.gw, data, size);
        fz_gw_pump(&h.gw);
        if ((cfg & 0x10) && h.gw.cli[c].fd >= 0)
            shutdown(h.gw.cli[c].fd, SHUT_WR);
    }
    fz_gw_pump(&h.gw);
    h.release = true;
    for (struct fz_st *st = h.streams; st != NULL; st = st->next)
        fz_st_kick(st);
    fz_gw_pump(&h.gw);

    gw_reg_remove(h.gw.ctx->reg, h.route.addr, &h.route);
    /* ours to free: streams we ended whose event has not run; the others
     * are cancelled by their front end in gw_ctx_free (or leak: ASan says) */
    for (struct fz_st *st = h.streams, *next; st != NULL; st = next) {
        next = st->next;
        if (st->ended)
            fz_st_free(st);
    }
    fz_gw_free(&h.gw);
    return 0;
}
