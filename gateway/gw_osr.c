/* Osaurus mode; see gw_osr.h and proto/PROTOCOL.md section 9.
 *
 * Each public request is one struct osr_req in its tunnel's id table, from
 * gw_osr_open_stream() until exactly one of these ends it:
 *   1. its response is complete (a `response`, or `stream_end`);
 *   2. the client's frame for its id is invalid (502 bad_host_response or an
 *      aborted response, and `cancel`);
 *   3. the caller leaves or a gw_req timer fires (up->cancel; `cancel`);
 *   4. the caller reads a stream too slowly (OSR_MAX_UNSENT; `cancel`);
 *   5. its request body is too large (413, before the client saw it);
 *   6. the tunnel closes (gw_osr_fail_all).
 * Leaving the table is what makes later frames for that id ignored.
 *
 * States: OSR_RQ_BODY (collecting the body: the `request` frame needs all of
 * it) -> OSR_RQ_WAIT (`request` sent; gw_req's response-header timer runs)
 * -> OSR_RQ_STREAM (`stream_start` relayed; never cut for being quiet).
 *
 * The osr_req borrows its gw_req and clears the link before ending it. The
 * struct gw_osr is the tunnel's session (struct gw_tun_proto), owned by its
 * gw_tun and freed with it (osr_sess_free). Header handling follows the relay where it differs from
 * the native path: X-Forwarded-Proto/-Host, fly-* and cf-* are stripped,
 * OPTIONS is answered here (CORS), and CORS headers are added. Cookies pass
 * through (the relay drops them; PRODUCT.md forwards the client's headers,
 * cookies included, and the local API does its own auth). */
#include "gw_osr.h"

#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <nghttp2/nghttp2.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_req.h"
#include "gw_tun.h"
#include "gw_up.h"
#include "id.h"
#include "log.h"
#include "util.h"
#include "ws.h"

#define OSR_MAX_REQ_BODY ((size_t)TUN_OSR_MAX_BODY) /* request body, bytes (the relay's 10 MB) */
#define OSR_MAX_UNSENT ((size_t)4 * 1024 * 1024)    /* streamed bytes the caller has not taken */
/* A `request` frame carries its whole body, so bodies are collected before
 * they go: memory bounded per tunnel (a few maximum bodies) and per gateway
 * (--max-osaurus-body-memory), counted by what each body declared
 * (Content-Length, reserved at once) or has brought so far (chunked). Past
 * either, 503 gateway_busy before the client saw anything. */
#define OSR_TUNNEL_BODY_MEMORY ((size_t)64 * 1024 * 1024)
#define OSR_BUCKETS 256u                            /* id table size; a power of two */
#define OSR_ID_LEN 36                               /* util_uuid4() */

/* The relay's preflight answer (its http.ts CORS_HEADERS). */
#define OSR_CORS_METHODS "GET, POST, PUT, PATCH, DELETE, OPTIONS"
#define OSR_CORS_HEADERS "content-type, authorization, x-request-id"
#define OSR_CORS_MAX_AGE "86400"

enum osr_rq_state {
    OSR_RQ_BODY = 0, /* collecting the request body; the client has not seen the id */
    OSR_RQ_WAIT,     /* `request` sent, no response frame yet */
    OSR_RQ_STREAM,   /* `stream_start` relayed (head sent), chunks follow */
};

struct osr_req {
    struct gw_osr *osr;      /* owner */
    struct gw_req *req;      /* borrowed; NULL once detached */
    char id[OSR_ID_LEN + 1]; /* the `request` frame's id */
    enum osr_rq_state state;
    uint8_t *body;         /* OSR_RQ_BODY: body collected so far (owned); NULL after */
    size_t body_len;
    size_t body_cap;       /* allocated: the declared length, or doubling to the limit */
    size_t reserved;       /* body memory counted for it (tunnel and gateway) */
    size_t unsent;         /* streamed bytes handed to the front end, not yet consumed */
    bool no_body;          /* HEAD, 204, 205, 304: response bytes are not relayed */
    struct osr_req *next;  /* bucket chain */
};

struct gw_osr {
    struct gw_tun *tun;                   /* owner */
    struct gw_ctx *ctx;
    struct ws_conn *ws;                   /* the tunnel's; borrowed */
    uint64_t id;                          /* the tunnel's, for logs */
    bool base64;                          /* the client asked for base64 bodies */
    struct osr_req *buckets[OSR_BUCKETS]; /* id table, chained */
    size_t pending;                       /* requests in the table */
    size_t body_memory;                   /* reserved by its requests' bodies */
    unsigned unanswered_pings;            /* JSON pings sent since the last pong */
    bool draining;                        /* relay_restarting sent: close 1012 once idle */
    bool retiring;                        /* lost its last agent: close 1000 once idle */
    bool closed;                          /* gw_osr_fail_all ran: the tunnel is going */
};

static const struct gw_up_ops osr_up_ops;

static struct gw_ctx *osr_ctx(const struct gw_osr *o)
{
    return o->ctx;
}

/* ---- id table ---- */

/* FNV-1a; ids are random UUIDs, so any spread is fine. */
static size_t osr_bucket(const char *id)
{
    uint32_t h = 2166136261u;

    for (const unsigned char *p = (const unsigned char *)id; *p != '\0'; p++)
        h = (h ^ *p) * 16777619u;
    return h & (OSR_BUCKETS - 1);
}

static struct osr_req *osr_find(const struct gw_osr *o, const char *id)
{
    for (struct osr_req *q = o->buckets[osr_bucket(id)]; q != NULL; q = q->next) {
        if (strcmp(q->id, id) == 0)
            return q;
    }
    return NULL;
}

static void osr_insert(struct gw_osr *o, struct osr_req *q)
{
    size_t b = osr_bucket(q->id);

    q->next = o->buckets[b];
    o->buckets[b] = q;
    o->pending++;
}

/* Counts q's body as want bytes (never less than before): 0, or -1 past
 * the tunnel's or the gateway's bound (nothing counted then). */
static int osr_reserve(struct osr_req *q, size_t want)
{
    struct gw_osr *o = q->osr;
    struct gw_ctx *ctx = o->ctx;
    size_t more = want > q->reserved ? want - q->reserved : 0;
    uint64_t cap = ctx->cfg->max_osaurus_body_memory;

    if (more == 0)
        return 0;
    if (o->body_memory + more > OSR_TUNNEL_BODY_MEMORY ||
        (cap != 0 && ctx->osr_body_memory + more > cap)) {
        gw_metrics_limit(ctx, GW_LIMIT_OSAURUS_BODY_MEMORY);
        LOG_WARN(ctx->log, "osr_body_memory", LOG_U("tun", o->id), LOG_U("want", want),
                 LOG_U("tunnel", o->body_memory), LOG_U("gateway", ctx->osr_body_memory));
        return -1;
    }
    q->reserved += more;
    o->body_memory += more;
    ctx->osr_body_memory += more;
    return 0;
}

static void osr_unreserve(struct osr_req *q)
{
    q->osr->body_memory -= q->reserved;
    q->osr->ctx->osr_body_memory -= q->reserved;
    q->reserved = 0;
}

/* Unlinks q from the table and frees it. */
static void osr_req_free(struct osr_req *q)
{
    struct gw_osr *o = q->osr;
    struct osr_req **pp = &o->buckets[osr_bucket(q->id)];

    while (*pp != NULL && *pp != q)
        pp = &(*pp)->next;
    if (*pp == q) {
        *pp = q->next;
        o->pending--;
    }
    free(q->body);
    osr_unreserve(q);
    free(q);
}

/* ---- sending ---- */

static int osr_send(struct gw_osr *o, const struct tun_msg *m)
{
    size_t len;
    char *s = tun_msg_encode(m, &len);
    int rv;

    if (s == NULL)
        return -1;
    rv = ws_send_text(o->ws, s, len);
    free(s);
    return rv;
}

static void osr_send_cancel(struct gw_osr *o, const char *id)
{
    struct tun_msg m;

    tun_msg_init(&m, TUN_MSG_CANCEL, TUN_MODE_OSAURUS);
    util_snprintf(m.http.id, sizeof(m.http.id), "%s", id);
    osr_send(o, &m);
}

/* A draining tunnel closes once its last request is done. */
static void osr_maybe_close(struct gw_osr *o)
{
    if (o->closed || o->pending != 0)
        return;
    if (o->draining)
        gw_tun_close(o->tun, WS_CLOSE_RESTART, "relay_restarting");
    else if (o->retiring)
        gw_tun_close(o->tun, WS_CLOSE_NORMAL, "no agents");
}

/* ---- ending a request ---- */

/* Ends q as a failure: the JSON error e before the head, an aborted response
 * after it; sends `cancel` if asked and the client has seen the request.
 * Frees q. */
static void osr_abort(struct osr_req *q, enum herr e, bool cancel)
{
    struct gw_osr *o = q->osr;
    struct gw_req *r = q->req;
    bool head_sent = q->state == OSR_RQ_STREAM;

    q->req = NULL;
    if (cancel && q->state != OSR_RQ_BODY)
        osr_send_cancel(o, q->id);
    osr_req_free(q);
    if (r != NULL) {
        if (head_sent)
            gw_req_end(r, false);
        else
            gw_req_fail(r, e);
    }
    osr_maybe_close(o);
}

/* The front end refused a head or body (it is closing and will free r):
 * detach without ending, as the native path does. Frees q. */
static void osr_drop(struct osr_req *q, bool cancel)
{
    struct gw_osr *o = q->osr;

    if (q->req != NULL)
        gw_req_detach(q->req);
    q->req = NULL;
    if (cancel)
        osr_send_cancel(o, q->id);
    osr_req_free(q);
    osr_maybe_close(o);
}

/* The response is complete. Frees q. */
static void osr_complete(struct osr_req *q)
{
    struct gw_osr *o = q->osr;
    struct gw_req *r = q->req;

    q->req = NULL;
    osr_req_free(q);
    if (r != NULL)
        gw_req_end(r, true);
    osr_maybe_close(o);
}

static void osr_violation(struct osr_req *q, enum herr e, const char *why)
{
    struct gw_osr *o = q->osr;

    osr_ctx(o)->n.bad_host_responses++;
    LOG_WARN(osr_ctx(o)->log, "bad_host_response", LOG_U("tun", o->id),
             LOG_U("req", q->req != NULL ? q->req->id : 0), LOG_S("id", q->id), LOG_S("why", why));
    osr_abort(q, e, true);
}

/* ---- the request frame ---- */

/* Headers the relay never forwards (its http.ts), besides hop-by-hop ones and
 * those the gateway sets itself. */
static bool osr_req_hdr_stripped(const char *name, size_t len)
{
    static const char *const names[] = {
        "proxy-authorization", "x-forwarded-proto", "x-forwarded-host",
        "x-forwarded-port",    "x-real-ip",
    };
    const struct iov n = {name, len};

    if (len == 0 || name[0] == ':')
        return true;
    if ((len >= 4 && util_iov_ieq((struct iov){name, 4}, IOV_LIT("fly-"))) ||
        (len >= 3 && util_iov_ieq((struct iov){name, 3}, IOV_LIT("cf-"))))
        return true;
    if (gw_hdr_is_hop_by_hop(name, len) || gw_hdr_is_gateway_set(name, len))
        return true;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (util_iov_ieq(n, (struct iov){names[i], strlen(names[i])}))
            return true;
    }
    return false;
}

struct osr_hdr_ref {
    const nghttp2_nv *nv;
    size_t idx; /* position in the request, so equal names keep their order */
};

static int osr_hdr_ref_cmp(const void *pa, const void *pb)
{
    const struct osr_hdr_ref *a = pa;
    const struct osr_hdr_ref *b = pb;
    size_t n = a->nv->namelen < b->nv->namelen ? a->nv->namelen : b->nv->namelen;
    int c = memcmp(a->nv->name, b->nv->name, n);

    if (c != 0)
        return c;
    if (a->nv->namelen != b->nv->namelen)
        return a->nv->namelen < b->nv->namelen ? -1 : 1;
    return a->idx < b->idx ? -1 : (a->idx > b->idx ? 1 : 0);
}

/* The request frame's header object: one member per lowercase name, repeated
 * headers joined with ", " in arrival order (sorting groups them in
 * O(n log n) however many a client sends). */
struct osr_req_hdrs {
    struct tun_msg_hdr *h; /* entries */
    size_t n;
    char *joined; /* storage of the joined values */
};

static void osr_req_hdrs_cleanup(struct osr_req_hdrs *rh)
{
    free(rh->h);
    free(rh->joined);
    memset(rh, 0, sizeof(*rh));
}

/* Returns HERR_NONE, HERR_INTERNAL (out of memory) or HERR_HEADER_TOO_LARGE
 * (more names than a client accepts). addr and xff must outlive rh. */
static enum herr osr_req_hdrs_build(struct osr_req_hdrs *rh, const struct gw_req *r,
                                    const char *addr, const char *xff)
{
    const struct gw_hdrs *in = &r->hdrs;
    struct osr_hdr_ref *refs;
    size_t nrefs = 0;
    size_t vbytes = 0;
    char *jp;
    enum herr e = HERR_NONE;

    memset(rh, 0, sizeof(*rh));
    refs = calloc(in->n + 1, sizeof(*refs));
    rh->h = calloc(in->n + 4, sizeof(*rh->h));
    if (refs == NULL || rh->h == NULL) {
        e = HERR_INTERNAL;
        goto out;
    }
    for (size_t i = 0; i < in->n; i++) {
        const nghttp2_nv *nv = &in->nv[i];
        if (osr_req_hdr_stripped((const char *)nv->name, nv->namelen))
            continue;
        refs[nrefs++] = (struct osr_hdr_ref){nv, i};
        vbytes += nv->valuelen + 2;
    }
    qsort(refs, nrefs, sizeof(*refs), osr_hdr_ref_cmp);
    rh->joined = malloc(vbytes + 1);
    if (rh->joined == NULL) {
        e = HERR_INTERNAL;
        goto out;
    }
    jp = rh->joined;
    for (size_t i = 0; i < nrefs;) {
        const nghttp2_nv *first = refs[i].nv;
        size_t j = i + 1;
        while (j < nrefs && refs[j].nv->namelen == first->namelen &&
               memcmp(refs[j].nv->name, first->name, first->namelen) == 0)
            j++;
        struct tun_msg_hdr *x = &rh->h[rh->n++];
        x->name = (struct iov){(const char *)first->name, first->namelen};
        if (j == i + 1) {
            x->value = (struct iov){(const char *)first->value, first->valuelen};
        } else {
            char *start = jp;
            for (size_t k = i; k < j; k++) {
                if (k > i) {
                    memcpy(jp, ", ", 2);
                    jp += 2;
                }
                memcpy(jp, refs[k].nv->value, refs[k].nv->valuelen);
                jp += refs[k].nv->valuelen;
            }
            x->value = (struct iov){start, (size_t)(jp - start)};
        }
        i = j;
    }
    rh->h[rh->n++] = (struct tun_msg_hdr){IOV_LIT("x-agent-address"), {addr, strlen(addr)}};
    rh->h[rh->n++] = (struct tun_msg_hdr){IOV_LIT("x-forwarded-for"), {xff, strlen(xff)}};
    /* set, where the relay strips them (PROTOCOL.md 9.4): the local API can
     * build its own public URLs */
    {
        const char *fh = r->fwd_host != NULL ? r->fwd_host : r->authority;
        rh->h[rh->n++] = (struct tun_msg_hdr){IOV_LIT("x-forwarded-proto"),
                                              {r->fwd_proto, strlen(r->fwd_proto)}};
        rh->h[rh->n++] = (struct tun_msg_hdr){IOV_LIT("x-forwarded-host"), {fh, strlen(fh)}};
    }
    if (rh->n > TUN_OSR_MAX_REQ_HEADERS)
        e = HERR_HEADER_TOO_LARGE;

out:
    free(refs);
    if (e != HERR_NONE)
        osr_req_hdrs_cleanup(rh);
    return e;
}

/* Sends q's `request` frame with the whole body. Returns HERR_NONE or the
 * error to answer. */
static enum herr osr_send_request(struct osr_req *q)
{
    struct gw_osr *o = q->osr;
    struct gw_req *r = q->req;
    struct gw_ctx *ctx = osr_ctx(o);
    struct tun_msg m;
    struct osr_req_hdrs rh;
    char addr[ID_ADDR_STR_LEN + 1];
    size_t blen = q->body_len;
    size_t len;
    char *s;
    enum herr e;

    id_addr_to_str(r->addr, addr);
    e = osr_req_hdrs_build(&rh, r, addr, r->client_ip);
    if (e != HERR_NONE)
        return e;
    tun_msg_init(&m, TUN_MSG_REQUEST, TUN_MODE_OSAURUS);
    memcpy(m.http.id, q->id, sizeof(q->id));
    m.http.method = (struct iov){r->method, strlen(r->method)};
    m.http.path = (struct iov){r->path, strlen(r->path)};
    m.http.hdrs = rh.h;
    m.http.n_hdrs = rh.n;
    m.http.body = (struct iov){"", 0};
    if (blen > 0)
        m.http.body = (struct iov){(const char *)q->body, blen};
    /* text bodies: the codec turns invalid UTF-8 into U+FFFD, as the relay's
     * TextDecoder does; base64 only for clients that asked for it */
    m.http.base64 = o->base64;
    s = tun_msg_encode(&m, &len);
    osr_req_hdrs_cleanup(&rh);
    if (s == NULL)
        return HERR_INTERNAL;
    if (ws_send_text(o->ws, s, len) != 0) {
        free(s);
        return HERR_TUNNEL_CLOSED;
    }
    free(s);
    ctx->n.bytes_to_agents += blen;
    free(q->body);
    q->body = NULL;
    q->body_len = q->body_cap = 0;
    osr_unreserve(q);
    q->state = OSR_RQ_WAIT;
    LOG_DEBUG(ctx->log, "osr_request", LOG_U("tun", o->id), LOG_U("req", r->id),
              LOG_S("id", q->id), LOG_U("body", blen));
    return HERR_NONE;
}

/* Moves what arrived of the body into q; sends the request once it is all
 * there. Returns HERR_NONE or the error to answer. */
static enum herr osr_take_body(struct osr_req *q)
{
    struct gw_req *r = q->req;
    size_t n = gw_req_body_avail(r);

    if (n > 0) {
        /* 413 past 10 MB, chunked or not, as the relay */
        if (n > OSR_MAX_REQ_BODY - q->body_len)
            return HERR_BODY_TOO_LARGE;
        if (osr_reserve(q, q->body_len + n) != 0)
            return HERR_GATEWAY_BUSY;
        /* one contiguous buffer, copied into: the front end's chains carry as
         * much slack as data, and the frame needs the body in one piece */
        if (q->body_len + n > q->body_cap) {
            size_t cap = q->body_cap > 0 ? q->body_cap : 64 * 1024;
            uint8_t *p;
            while (cap < q->body_len + n)
                cap *= 2;
            if (cap > OSR_MAX_REQ_BODY)
                cap = OSR_MAX_REQ_BODY;
            p = realloc(q->body, cap);
            if (p == NULL)
                return HERR_INTERNAL;
            q->body = p;
            q->body_cap = cap;
        }
        if (gw_req_body_copy(r, q->body + q->body_len, n) != 0)
            return HERR_INTERNAL;
        q->body_len += n;
    }
    if (!r->body_eof)
        return HERR_NONE;
    return osr_send_request(q);
}

/* The relay answers every OPTIONS on an agent host itself. The allowed
 * headers echo the preflight's request, else the relay's fixed list. */
static void osr_answer_preflight(struct gw_req *r)
{
    const nghttp2_nv *acrh = gw_hdrs_get(&r->hdrs, "access-control-request-headers");
    const char *allow =
        acrh != NULL && acrh->valuelen > 0 ? (const char *)acrh->value : OSR_CORS_HEADERS;
    nghttp2_nv nv[] = {
        {(uint8_t *)"access-control-allow-origin", (uint8_t *)"*", 27, 1, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"access-control-allow-methods", (uint8_t *)OSR_CORS_METHODS, 28,
         sizeof(OSR_CORS_METHODS) - 1, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"access-control-allow-headers", (uint8_t *)allow, 28, strlen(allow),
         NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"access-control-max-age", (uint8_t *)OSR_CORS_MAX_AGE, 22,
         sizeof(OSR_CORS_MAX_AGE) - 1, NGHTTP2_NV_FLAG_NONE},
    };

    if (gw_req_head(r, 204, nv, sizeof(nv) / sizeof(nv[0])) == 0)
        gw_req_end(r, true);
}

static enum herr osr_up_open(struct gw_route *rt, struct gw_req *r)
{
    struct gw_osr *o = rt->owner;
    const struct gw_cfg *cfg = o->ctx->cfg;
    struct osr_req *q;
    enum herr e;

    if (o->draining || o->closed)
        return HERR_AGENT_OFFLINE;
    /* JSON frames cannot carry a tunnel */
    if (gw_req_is_websocket(r))
        return HERR_UNSUPPORTED_UPGRADE;
    if (strcmp(r->method, "CONNECT") == 0)
        return HERR_METHOD_NOT_ALLOWED;
    if (strcmp(r->method, "OPTIONS") == 0) {
        osr_answer_preflight(r);
        return HERR_NONE;
    }
    if (cfg->max_streams_per_tunnel != 0 && o->pending >= cfg->max_streams_per_tunnel)
        return HERR_HOST_BUSY;
    if (r->has_content_length && r->content_length > OSR_MAX_REQ_BODY)
        return HERR_BODY_TOO_LARGE;
    q = calloc(1, sizeof(*q));
    if (q == NULL)
        return HERR_INTERNAL;
    /* a declared length is the buffer's size from the start (its pages
     * are only touched as the bytes come) */
    if (r->has_content_length && r->content_length > 0) {
        q->body = malloc((size_t)r->content_length);
        q->body_cap = (size_t)r->content_length;
    }
    if ((q->body == NULL && q->body_cap > 0) || util_uuid4(q->id) != 0) {
        free(q->body);
        free(q);
        return HERR_INTERNAL;
    }
    q->osr = o;
    q->req = r;
    q->state = OSR_RQ_BODY;
    osr_insert(o, q);
    gw_req_attach(r, &osr_up_ops, q);
    /* a declared length is counted at once: uploads held just short of
     * complete cannot add up past the bounds */
    e = r->has_content_length && osr_reserve(q, (size_t)r->content_length) != 0
            ? HERR_GATEWAY_BUSY
            : osr_take_body(q);
    if (e != HERR_NONE) {
        /* the bridge answers e */
        gw_req_detach(r);
        q->req = NULL;
        osr_req_free(q);
        return e;
    }
    return HERR_NONE;
}

/* ---- front end -> request ---- */

static void osr_up_body_more(void *arg)
{
    struct osr_req *q = arg;
    enum herr e;

    if (q->req == NULL || q->state != OSR_RQ_BODY)
        return;
    e = osr_take_body(q);
    if (e != HERR_NONE)
        osr_abort(q, e, false);
}

static void osr_up_consumed(void *arg, size_t n)
{
    struct osr_req *q = arg;

    q->unsent = n >= q->unsent ? 0 : q->unsent - n;
}

static void osr_up_cancel(void *arg)
{
    struct osr_req *q = arg;
    struct gw_osr *o = q->osr;

    LOG_DEBUG(osr_ctx(o)->log, "osr_cancel", LOG_U("tun", o->id),
              LOG_U("req", q->req != NULL ? q->req->id : 0), LOG_S("id", q->id),
              LOG_B("sent", q->state != OSR_RQ_BODY));
    q->req = NULL;
    /* nothing to tell a client that never saw the request */
    if (q->state != OSR_RQ_BODY)
        osr_send_cancel(o, q->id);
    osr_req_free(q);
    osr_maybe_close(o);
}

/* ---- response frames ---- */

/* A response head as the front end takes it: lowercase names, hop-by-hop
 * headers dropped, framing ours, CORS headers added when the host set none
 * (as the relay). */
struct osr_head {
    nghttp2_nv *nv;
    size_t n;
    char *names;   /* lowercase copies of the names */
    char clen[24]; /* content-length of a whole `response` */
};

static void osr_head_cleanup(struct osr_head *hd)
{
    free(hd->nv);
    free(hd->names);
}

/* whole: a `response` (its body length is known). Returns 0 or -1 (out of
 * memory). */
static int osr_head_build(struct osr_head *hd, const struct gw_req *r, const struct tun_msg_http *h,
                          bool whole)
{
    size_t total = 0;
    bool acao = false;
    bool aceh = false;
    bool nobody_status = h->status == 204 || h->status == 304;
    char *p;

    memset(hd, 0, sizeof(*hd));
    for (size_t i = 0; i < h->n_hdrs; i++)
        total += h->hdrs[i].name.len;
    hd->nv = calloc(h->n_hdrs + 3, sizeof(*hd->nv));
    hd->names = malloc(total + 1);
    if (hd->nv == NULL || hd->names == NULL) {
        osr_head_cleanup(hd);
        return -1;
    }
    p = hd->names;
    for (size_t i = 0; i < h->n_hdrs; i++) {
        const struct tun_msg_hdr *x = &h->hdrs[i];
        size_t len = x->name.len;
        for (size_t j = 0; j < len; j++) {
            char c = x->name.base[j];
            p[j] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
        }
        if (gw_hdr_is_hop_by_hop(p, len))
            continue;
        /* the host's length only describes a HEAD answer; otherwise the
         * framing is ours (a `response` gets its body's length below) */
        if (len == 14 && memcmp(p, "content-length", 14) == 0 && !(r->is_head && !nobody_status))
            continue;
        if (len == 27 && memcmp(p, "access-control-allow-origin", 27) == 0)
            acao = true;
        if (len == 29 && memcmp(p, "access-control-expose-headers", 29) == 0)
            aceh = true;
        hd->nv[hd->n++] = (nghttp2_nv){(uint8_t *)p, (uint8_t *)x->value.base, len, x->value.len,
                                       NGHTTP2_NV_FLAG_NONE};
        p += len;
    }
    if (!acao)
        hd->nv[hd->n++] = (nghttp2_nv){(uint8_t *)"access-control-allow-origin", (uint8_t *)"*", 27,
                                       1, NGHTTP2_NV_FLAG_NONE};
    if (!aceh)
        hd->nv[hd->n++] = (nghttp2_nv){(uint8_t *)"access-control-expose-headers", (uint8_t *)"*",
                                       29, 1, NGHTTP2_NV_FLAG_NONE};
    if (whole && !r->is_head && !nobody_status) {
        int n = util_snprintf(hd->clen, sizeof(hd->clen), "%zu", h->body.len);
        hd->nv[hd->n++] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)hd->clen, 14,
                                       (size_t)n, NGHTTP2_NV_FLAG_NONE};
    }
    return 0;
}

/* Sends the head of a `response` or `stream_start`. Returns true if q lives
 * on; false if it was ended (and freed). */
static bool osr_send_head(struct osr_req *q, const struct tun_msg_http *h, bool whole)
{
    struct gw_req *r = q->req;
    struct osr_head hd;
    int rv;

    if (r == NULL) {
        osr_drop(q, true);
        return false;
    }
    q->no_body = r->is_head || h->status == 204 || h->status == 205 || h->status == 304;
    if (osr_head_build(&hd, r, h, whole) != 0) {
        osr_abort(q, HERR_INTERNAL, true);
        return false;
    }
    q->state = OSR_RQ_STREAM;
    rv = gw_req_head(r, h->status, hd.nv, hd.n);
    osr_head_cleanup(&hd);
    if (rv != 0) {
        osr_drop(q, !whole);
        return false;
    }
    return true;
}

static void osr_on_response(struct osr_req *q, const struct tun_msg_http *h)
{
    struct gw_ctx *ctx = osr_ctx(q->osr);

    if (!osr_send_head(q, h, true))
        return;
    /* The whole body is here already: the caller's pace cannot change what
     * the gateway holds, so OSR_MAX_UNSENT does not apply. */
    if (!q->no_body && h->body.len > 0) {
        ctx->n.bytes_from_agents += h->body.len;
        if (gw_req_body(q->req, (const uint8_t *)h->body.base, h->body.len) != 0) {
            osr_drop(q, false);
            return;
        }
    }
    osr_complete(q);
}

static void osr_on_chunk(struct osr_req *q, const struct tun_msg_http *h)
{
    struct gw_osr *o = q->osr;
    struct gw_ctx *ctx = osr_ctx(o);

    if (q->req == NULL) {
        osr_drop(q, true);
        return;
    }
    if (q->no_body || h->body.len == 0)
        return;
    ctx->n.bytes_from_agents += h->body.len;
    q->unsent += h->body.len;
    if (gw_req_body(q->req, (const uint8_t *)h->body.base, h->body.len) != 0) {
        osr_drop(q, true);
        return;
    }
    /* JSON frames have no flow control: past this the caller is not keeping
     * up, and the relay gives up too (slow_consumer) */
    if (q->unsent > OSR_MAX_UNSENT) {
        ctx->n.slow_consumer_aborts++;
        LOG_WARN(ctx->log, "slow_consumer", LOG_U("tun", o->id),
                 LOG_U("req", q->req->id), LOG_S("id", q->id), LOG_U("unsent", q->unsent));
        osr_abort(q, HERR_NONE, true);
    }
}

static void osr_on_data(void *arg, const struct tun_msg *m)
{
    struct gw_osr *o = arg;
    struct osr_req *q;

    switch (m->type) {
    case TUN_MSG_PONG:
        o->unanswered_pings = 0;
        return;
    case TUN_MSG_RESPONSE:
    case TUN_MSG_STREAM_START:
    case TUN_MSG_STREAM_CHUNK:
    case TUN_MSG_STREAM_END:
        break;
    default:
        return; /* a client's ping: the relay has none to answer */
    }
    q = osr_find(o, m->http.id);
    if (q == NULL || q->state == OSR_RQ_BODY) {
        LOG_DEBUG(osr_ctx(o)->log, "osr_frame_ignored", LOG_U("tun", o->id),
                  LOG_S("type", tun_msg_type_name(m->type)), LOG_S("id", m->http.id));
        return;
    }
    switch (m->type) {
    case TUN_MSG_RESPONSE:
        if (q->state != OSR_RQ_WAIT)
            osr_violation(q, HERR_BAD_HOST_RESPONSE, "response after stream_start");
        else
            osr_on_response(q, &m->http);
        return;
    case TUN_MSG_STREAM_START:
        if (q->state != OSR_RQ_WAIT)
            osr_violation(q, HERR_BAD_HOST_RESPONSE, "second stream_start");
        else
            osr_send_head(q, &m->http, false);
        return;
    case TUN_MSG_STREAM_CHUNK:
        if (q->state != OSR_RQ_STREAM)
            osr_violation(q, HERR_BAD_HOST_RESPONSE, "stream_chunk before stream_start");
        else
            osr_on_chunk(q, &m->http);
        return;
    default: /* stream_end */
        if (q->state != OSR_RQ_STREAM)
            osr_violation(q, HERR_BAD_HOST_RESPONSE, "stream_end before stream_start");
        else
            osr_complete(q);
        return;
    }
}

static bool osr_on_bad_data(void *arg, const struct tun_msg *m, enum tun_err e)
{
    struct gw_osr *o = arg;
    struct osr_req *q;

    if (m->type < TUN_MSG_RESPONSE || m->type > TUN_MSG_STREAM_END)
        return false;
    osr_ctx(o)->n.invalid_frames++;
    q = m->http.id[0] != '\0' ? osr_find(o, m->http.id) : NULL;
    if (q == NULL || q->state == OSR_RQ_BODY) {
        /* no live id to fail: dropped, as the relay does */
        LOG_DEBUG(osr_ctx(o)->log, "osr_frame_ignored", LOG_U("tun", o->id),
                  LOG_S("type", tun_msg_type_name(m->type)), LOG_S("id", m->http.id),
                  LOG_S("err", tun_err_code(e)));
        return true;
    }
    osr_violation(q, e == TUN_E_INTERNAL_ERROR ? HERR_INTERNAL : HERR_BAD_HOST_RESPONSE,
                  tun_err_code(e));
    return true;
}

/* ---- the session (struct gw_tun_proto) ---- */

static void *osr_sess_new(struct gw_tun *t, struct gw_ctx *ctx, struct ws_conn *ws, uint64_t id)
{
    struct gw_osr *o = calloc(1, sizeof(*o));

    if (o == NULL)
        return NULL;
    o->tun = t;
    o->ctx = ctx;
    o->ws = ws;
    o->id = id;
    return o;
}

static int osr_start(void *arg, unsigned features)
{
    struct gw_osr *o = arg;

    o->base64 = (features & TUN_FEAT_BASE64) != 0;
    return 0;
}

static void osr_ping(void *arg)
{
    struct gw_osr *o = arg;
    struct tun_msg m;

    if (o->closed)
        return;
    if (o->unanswered_pings >= TUN_DEAD_AFTER_PINGS) {
        LOG_INFO(osr_ctx(o)->log, "tunnel_silent", LOG_U("tun", o->id),
                 LOG_U("pings_unanswered", o->unanswered_pings));
        gw_tun_close(o->tun, WS_CLOSE_GOING_AWAY, "keepalive timeout");
        return;
    }
    tun_msg_init(&m, TUN_MSG_PING, TUN_MODE_OSAURUS);
    m.ping.has_ts = true;
    m.ping.ts = clk_unix_s(o->ctx->clk);
    if (osr_send(o, &m) == 0)
        o->unanswered_pings++;
    ws_ping(o->ws); /* the relay's WebSocket layer pings too */
}

static void osr_flush(void *arg)
{
    (void)arg; /* every frame went out when it was made */
}

static void osr_drain(void *arg)
{
    struct gw_osr *o = arg;
    struct tun_msg m;

    if (o->draining || o->closed)
        return;
    o->draining = true;
    tun_msg_init(&m, TUN_MSG_ERROR, TUN_MODE_OSAURUS);
    m.error.err = TUN_E_RELAY_RESTARTING;
    osr_send(o, &m);
    LOG_INFO(osr_ctx(o)->log, "tunnel_draining", LOG_U("tun", o->id), LOG_U("pending", o->pending));
    /* Unlike the relay, in-flight requests finish (up to the drain grace):
     * the client reconnects at once for new ones. */
    osr_maybe_close(o);
}

/* The tunnel lost its last agent (superseded): close (1000) once the
 * requests already pending are answered. */
static void osr_retire(void *arg)
{
    struct gw_osr *o = arg;

    o->retiring = true;
    osr_maybe_close(o);
}

static void osr_fail_all(void *arg)
{
    struct gw_osr *o = arg;

    o->closed = true;
    for (size_t b = 0; b < OSR_BUCKETS; b++) {
        while (o->buckets[b] != NULL)
            osr_abort(o->buckets[b], HERR_TUNNEL_CLOSED, false);
    }
}

static void osr_sess_free(void *arg)
{
    struct gw_osr *o = arg;

    if (o == NULL)
        return;
    osr_fail_all(o); /* normally empty already: the tunnel closed first */
    free(o);
}

static size_t osr_streams(const void *arg)
{
    const struct gw_osr *o = arg;

    return o->pending;
}

static int osr_signed_text(char *buf, size_t size, const char *domain,
                           const struct tun_msg_agent_auth *a, const char *nonce, int64_t ts)
{
    /* the address exactly as sent (the Osaurus app sends EIP-55 mixed case);
     * no domain in this protocol */
    (void)domain;
    return tun_msg_osaurus_signed_text(buf, size, a->addr_str, nonce, ts);
}

static const struct gw_up_ops osr_up_ops = {
    .name = "osaurus",
    .open = osr_up_open,
    .body_more = osr_up_body_more,
    .consumed = osr_up_consumed,
    .cancel = osr_up_cancel,
};

const struct gw_tun_proto gw_osr_proto = {
    .name = "osaurus",
    .mode = TUN_MODE_OSAURUS,
    .subprotocol = NULL,
    .max_text = TUN_OSR_MAX_FRAME_BYTES,
    .ctl_per_min = TUN_CTL_RATE_OSAURUS,
    .removed_reason = TUN_REASON_NONE,
    .auth_all_or_nothing = true,
    .signs_domain = false,
    .up = &osr_up_ops,
    .signed_text = osr_signed_text,
    .sess_new = osr_sess_new,
    .start = osr_start,
    .on_binary = NULL, /* binary frames are ignored, as the relay does */
    .on_data = osr_on_data,
    .on_bad_data = osr_on_bad_data,
    .ping = osr_ping,
    .flush = osr_flush,
    .drain = osr_drain,
    .retire = osr_retire,
    .fail_all = osr_fail_all,
    .sess_free = osr_sess_free,
    .streams = osr_streams,
};
