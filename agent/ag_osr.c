/* The agent's Osaurus-mode data path (ag_osr.h).
 *
 * One struct osr_req per `request` frame, on o->reqs, found by its id. Its
 * life: routed and forwarded (ag_fwd) -> head (mode chosen) -> body bytes
 * gathered in r->buf -> frames -> done; then freed from the session's kick
 * event. The fwd callbacks and ag_osr_on_writable only record facts and
 * schedule that event, which does all the sending (req_pump), so frames go out
 * in one place and a request is never freed under its forwarder's frame.
 * `cancel` frees at once: it comes from the WebSocket, not from the fwd. */
#include "ag_osr.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <openssl/crypto.h>

#include "ag_agt.h"
#include "ag_ctx.h"
#include "ag_fwd.h"
#include "herr.h"
#include "id.h"
#include "list.h"
#include "log.h"
#include "tun_msg.h"
#include "util.h"
#include "ws.h"

#define OSR_HOLD_MAX (1u << 20)          /* a body not streamed: held this much at most */
#define OSR_WHOLE_MAX (256u * 1024u)     /* a `response` frame's body, at most */
#define OSR_CHUNK_MAX (256u * 1024u)     /* a bulk `stream_chunk`, at most */
#define OSR_LINE_FLUSH (16u * 1024u)     /* an event stream's chunk, at most */
#define OSR_PAUSE_HIGH (1u << 20)        /* unsent bytes that stop the local read */
#define OSR_PAUSE_LOW (256u * 1024u)     /* ... and resume it */
#define OSR_MAX_RESP_HEADERS TUN_OSR_MAX_RESP_HEADERS
#define OSR_MAX_HEADER_VALUE TUN_OSR_MAX_HEADER_VALUE

enum osr_mode {
    OSR_WAIT = 0, /* no response head yet */
    OSR_WHOLE,    /* gathering a body to send whole */
    OSR_STREAM,   /* stream_start (to be) sent; chunks as they come */
    OSR_FINISHED, /* the last frame went out: free it */
};

struct osr_req {
    struct ag_osr *o;
    struct list link; /* o->reqs */
    char id[TUN_ID_MAX + 1];
    uint64_t log_id;
    struct ag_agt *agt; /* reference held once routed */
    bool counted;       /* counted in agt->inflight */
    bool is_probe;
    struct ag_fwd *fwd; /* NULL once the local request ended */
    enum osr_mode mode;
    bool lines;         /* text/event-stream or application/x-ndjson: flush per line */
    bool start_pending; /* stream_start not yet sent */
    bool local_done;    /* the local body is complete */
    bool no_body;       /* HEAD, 204, 304 */
    bool paused;        /* ag_fwd_pause_read(true) in effect */
    bool base64;        /* this body goes out base64 (not UTF-8, gateway takes it) */
    enum herr fail;     /* why the local side failed, HERR_NONE while it has not */
    int status;
    struct tun_msg_hdr *hdrs; /* response headers, one block with their bytes */
    size_t nhdrs;
    struct evbuffer *buf; /* body bytes not yet framed */
    uint64_t bytes_in, bytes_out, start_ms;
    char addr[ID_ADDR_STR_LEN + 1];
    char method[16];
    char path[128];
    char err[48];
};

struct ag_osr {
    struct ag_ctx *ctx;
    uint64_t tun_id;
    struct ws_conn *ws;
    const struct ag_osr_cbs *cb;
    void *arg;
    bool base64_ok; /* the gateway takes "bodyEncoding":"base64" from us */
    bool draining;
    struct list reqs;
    size_t nreqs;
    struct event *kick_ev;
};

static void req_free(struct osr_req *r);

static void osr_kick(struct ag_osr *o) { event_active(o->kick_ev, 0, 0); }

size_t ag_osr_requests(const struct ag_osr *o) { return o->nreqs; }

/* ---- frames ------------------------------------------------------------------- */

static int send_frame(struct ag_osr *o, const struct tun_msg *m)
{
    size_t len = 0;
    char *text = tun_msg_encode(m, &len);
    int rc;

    if (text == NULL)
        return -1;
    rc = ws_send_text(o->ws, text, len);
    free(text);
    return rc;
}

static int send_http(struct osr_req *r, enum tun_msg_type type, const void *body, size_t len,
                     bool base64)
{
    struct tun_msg m;

    tun_msg_init(&m, type, TUN_MODE_OSAURUS);
    (void)util_snprintf(m.http.id, sizeof(m.http.id), "%s", r->id);
    m.http.status = r->status;
    m.http.hdrs = r->hdrs;
    m.http.n_hdrs = type == TUN_MSG_RESPONSE || type == TUN_MSG_STREAM_START ? r->nhdrs : 0;
    m.http.body = (struct iov){body != NULL ? body : "", len};
    m.http.base64 = base64;
    if ((type == TUN_MSG_RESPONSE || type == TUN_MSG_STREAM_CHUNK) && r->agt != NULL &&
        !r->is_probe)
        r->agt->bytes_out += len;
    r->bytes_out += len;
    return send_frame(r->o, &m);
}

/* Replaces the response headers with one built here (an error or the probe). */
static int set_simple_headers(struct osr_req *r, const char *ctype, const char *extra_name,
                              const char *extra_value)
{
    size_t sz = 2 * sizeof(struct tun_msg_hdr) + strlen(ctype) + 1 +
                (extra_name != NULL ? strlen(extra_value) + 1 : 0);
    struct tun_msg_hdr *h = malloc(sz);
    char *p;

    if (h == NULL)
        return -1;
    free(r->hdrs);
    r->hdrs = h;
    p = (char *)(h + 2);
    memcpy(p, ctype, strlen(ctype) + 1);
    h[0] = (struct tun_msg_hdr){IOV_LIT("content-type"), {p, strlen(ctype)}};
    r->nhdrs = 1;
    if (extra_name != NULL) {
        char *v = p + strlen(ctype) + 1;
        memcpy(v, extra_value, strlen(extra_value) + 1);
        h[1] = (struct tun_msg_hdr){{extra_name, strlen(extra_name)}, {v, strlen(extra_value)}};
        r->nhdrs = 2;
    }
    return 0;
}

/* Answers with one whole `response` of status and body (an error here, the
 * probe) and finishes the request; the local request, if any, is closed. */
static void req_answer(struct osr_req *r, int status, const char *ctype, const char *body,
                       const char *extra_name, const char *extra_value)
{
    ag_fwd_free(r->fwd);
    r->fwd = NULL;
    r->status = status;
    if (set_simple_headers(r, ctype, extra_name, extra_value) != 0) {
        free(r->hdrs);
        r->hdrs = NULL;
        r->nhdrs = 0;
    }
    (void)send_http(r, TUN_MSG_RESPONSE, body, strlen(body), false);
    r->mode = OSR_FINISHED;
    osr_kick(r->o);
}

static void req_answer_herr(struct osr_req *r, enum herr e)
{
    char body[256];

    if (herr_json(e, body, sizeof(body)) < 0)
        body[0] = '\0';
    (void)util_snprintf(r->err, sizeof(r->err), "%s", herr_code(e));
    req_answer(r, herr_status(e), "application/json", body, NULL, NULL);
}

/* A body the gateway cannot carry (not UTF-8, no base64): 502 if nothing went
 * out yet, else the stream ends here (logged; the caller sees a short body). */
static void req_binary(struct osr_req *r)
{
    LOG_WARN(r->o->ctx->log, "binary_body_unsupported", LOG_U("tun", r->o->tun_id),
             LOG_U("req", r->log_id), LOG_S("addr", r->addr), LOG_S("path", r->path),
             LOG_B("streaming", r->mode == OSR_STREAM && !r->start_pending));
    if (r->mode != OSR_STREAM || r->start_pending) {
        req_answer_herr(r, HERR_BINARY_BODY);
        return;
    }
    (void)util_snprintf(r->err, sizeof(r->err), "binary_body_unsupported");
    ag_fwd_free(r->fwd);
    r->fwd = NULL;
    evbuffer_drain(r->buf, evbuffer_get_length(r->buf));
    r->local_done = true;
}

/* ---- pumping a request's body into frames ---------------------------------------- */

/* How many of the first n of the avail bytes at p to send as one chunk now:
 * cut back to a UTF-8 boundary, and for an event stream still coming to its
 * last newline (a line longer than 16 KiB goes at 16 KiB). 0: wait for more.
 * *bad: not UTF-8 (a sequence cut by the end of the body included). */
static size_t chunk_take(const struct osr_req *r, const uint8_t *p, size_t n, size_t avail,
                         bool *bad)
{
    size_t ok = n;
    int rv;

    *bad = false;
    if (r->base64)
        return n;
    rv = util_utf8_check(p, n, &ok);
    if (rv < 0 || (rv > 0 && n == avail && r->local_done)) {
        *bad = true;
        return 0;
    }
    if (r->lines && !r->local_done && n < OSR_LINE_FLUSH)
        while (ok > 0 && p[ok - 1] != '\n')
            ok--;
    return ok;
}

/* Sends what can go now; returns false once the request is finished. */
static bool req_pump_stream(struct osr_req *r)
{
    struct ag_osr *o = r->o;

    if (r->start_pending) {
        if (!ws_is_writable(o->ws))
            return true;
        if (send_http(r, TUN_MSG_STREAM_START, NULL, 0, false) != 0)
            return true; /* the connection is going: its close ends us */
        r->start_pending = false;
    }
    while (ws_is_writable(o->ws)) {
        size_t avail = evbuffer_get_length(r->buf);
        size_t max = r->lines ? OSR_LINE_FLUSH : OSR_CHUNK_MAX;
        size_t n = avail > max ? max : avail;
        const uint8_t *p;
        bool bad = false;

        if (n == 0)
            break;
        p = evbuffer_pullup(r->buf, (ev_ssize_t)n);
        if (p == NULL)
            break;
        n = chunk_take(r, p, n, avail, &bad);
        if (bad && !o->base64_ok) {
            req_binary(r);
            if (r->mode == OSR_FINISHED)
                return false;
            break;
        }
        if (bad) {
            r->base64 = true; /* from here on, every chunk */
            n = avail > max ? max : avail;
        }
        if (n == 0)
            break;
        if (send_http(r, TUN_MSG_STREAM_CHUNK, p, n, r->base64) != 0)
            return true;
        evbuffer_drain(r->buf, n);
    }
    if (r->paused && r->fwd != NULL && evbuffer_get_length(r->buf) < OSR_PAUSE_LOW) {
        r->paused = false;
        ag_fwd_pause_read(r->fwd, false);
    } else if (!r->paused && r->fwd != NULL && evbuffer_get_length(r->buf) > OSR_PAUSE_HIGH) {
        r->paused = true;
        ag_fwd_pause_read(r->fwd, true);
    }
    if (r->local_done && evbuffer_get_length(r->buf) == 0) {
        (void)send_http(r, TUN_MSG_STREAM_END, NULL, 0, false);
        r->mode = OSR_FINISHED;
        return false;
    }
    return true;
}

/* A held body: goes out whole once complete; past OSR_HOLD_MAX it streams. */
static bool req_pump_whole(struct osr_req *r)
{
    size_t n = evbuffer_get_length(r->buf);
    const uint8_t *p;
    size_t ok = 0;
    int rv;

    if (!r->local_done && n <= OSR_HOLD_MAX)
        return true;
    p = n > 0 ? evbuffer_pullup(r->buf, -1) : (const uint8_t *)"";
    if (p == NULL) {
        req_answer_herr(r, HERR_INTERNAL);
        return false;
    }
    rv = util_utf8_check(p, n, &ok);
    if (rv < 0 || (rv > 0 && r->local_done)) {
        if (!r->o->base64_ok) {
            req_binary(r); /* 502: nothing went out yet */
            return false;
        }
        r->base64 = true;
    }
    if (r->local_done && n <= OSR_WHOLE_MAX) {
        if (!ws_is_writable(r->o->ws))
            return true;
        (void)send_http(r, TUN_MSG_RESPONSE, p, n, r->base64);
        evbuffer_drain(r->buf, n);
        r->mode = OSR_FINISHED;
        return false;
    }
    /* too big for one frame, or still coming: a stream with the same head */
    r->mode = OSR_STREAM;
    r->start_pending = true;
    return req_pump_stream(r);
}

static void req_pump_failed(struct osr_req *r);

static void req_pump(struct osr_req *r)
{
    req_pump_failed(r);
    if (r->mode == OSR_WHOLE)
        (void)req_pump_whole(r);
    else if (r->mode == OSR_STREAM)
        (void)req_pump_stream(r);
}

static void on_kick(evutil_socket_t fd, short what, void *arg)
{
    struct ag_osr *o = arg;
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &o->reqs)
    {
        struct osr_req *r = LIST_ENTRY(n, struct osr_req, link);
        req_pump(r);
        if (r->mode == OSR_FINISHED)
            req_free(r);
    }
    if (o->nreqs == 0)
        o->cb->on_idle(o->arg); /* the tunnel decides whether that matters */
}

/* ---- the local request's reports (ag_fwd) -------------------------------------- */

static bool ctype_streams(const nghttp2_nv *nv, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char v[256];
        size_t len = nv[i].valuelen < sizeof(v) - 1 ? nv[i].valuelen : sizeof(v) - 1;
        if (nv[i].namelen != 12 || memcmp(nv[i].name, "content-type", 12) != 0)
            continue;
        for (size_t k = 0; k < len; k++)
            v[k] = (char)(nv[i].value[k] >= 'A' && nv[i].value[k] <= 'Z' ? nv[i].value[k] + 32
                                                                          : nv[i].value[k]);
        v[len] = '\0';
        return strstr(v, "text/event-stream") != NULL || strstr(v, "application/x-ndjson") != NULL;
    }
    return false;
}

static bool nv_same_name(const nghttp2_nv *a, const nghttp2_nv *b)
{
    return a->namelen == b->namelen && memcmp(a->name, b->name, a->namelen) == 0;
}

/* True if nv[i]'s name came before i. */
static bool nv_seen(const nghttp2_nv *nv, size_t i)
{
    for (size_t k = 0; k < i; k++)
        if (nv_same_name(&nv[k], &nv[i]))
            return true;
    return false;
}

/* The response head as the relay takes it: one value per name (repeats joined
 * with ", ", in order of arrival), at most 128 names, values of at most
 * 16 KiB, in one block. Returns 0, -1 out of memory, or 1 if the relay would
 * refuse it. */
static int copy_headers(struct osr_req *r, const nghttp2_nv *nv, size_t n)
{
    size_t bytes = 1;
    size_t names = 0;
    struct tun_msg_hdr *h;
    char *p;

    for (size_t i = 0; i < n; i++) {
        bytes += nv[i].namelen + nv[i].valuelen + 2;
        if (!nv_seen(nv, i))
            names++;
    }
    h = malloc((names > 0 ? names : 1) * sizeof(*h) + bytes);
    if (h == NULL)
        return -1;
    p = (char *)(h + (names > 0 ? names : 1));
    names = 0;
    for (size_t i = 0; i < n; i++) {
        char *v;
        if (nv_seen(nv, i))
            continue;
        memcpy(p, nv[i].name, nv[i].namelen);
        h[names].name = (struct iov){p, nv[i].namelen};
        p += nv[i].namelen;
        v = p;
        for (size_t k = i; k < n; k++) {
            if (!nv_same_name(&nv[k], &nv[i]))
                continue;
            if (k != i) {
                memcpy(p, ", ", 2);
                p += 2;
            }
            memcpy(p, nv[k].value, nv[k].valuelen);
            p += nv[k].valuelen;
        }
        h[names].value = (struct iov){v, (size_t)(p - v)};
        names++;
    }
    free(r->hdrs);
    r->hdrs = h;
    r->nhdrs = names;
    if (names > OSR_MAX_RESP_HEADERS)
        return 1;
    for (size_t i = 0; i < names; i++)
        if (h[i].value.len > OSR_MAX_HEADER_VALUE)
            return 1;
    return 0;
}

static void fwd_on_head(void *arg, int status, const nghttp2_nv *nv, size_t nnv, bool no_body)
{
    struct osr_req *r = arg;
    int rv;

    ag_agt_local_result(r->agt, AG_AGT_LOCAL_OK, NULL);
    r->status = status;
    r->no_body = no_body;
    rv = copy_headers(r, nv, nnv);
    if (rv != 0) {
        if (rv > 0)
            LOG_WARN(r->o->ctx->log, "response_head_refused", LOG_U("tun", r->o->tun_id),
                     LOG_U("req", r->log_id), LOG_S("addr", r->addr),
                     LOG_S("why", "more than 128 header names or a value over 16 KiB, which "
                                  "the relay refuses"));
        /* answered from the kick event: the fwd is on the stack */
        r->fail = rv > 0 ? HERR_BAD_HOST_RESPONSE : HERR_INTERNAL;
        r->mode = OSR_WAIT;
        r->local_done = true;
        osr_kick(r->o);
        return;
    }
    if (no_body) {
        r->mode = OSR_WHOLE; /* empty; goes out at on_end, the connection pooled */
    } else if (ctype_streams(nv, nnv)) {
        r->lines = true;
        r->mode = OSR_STREAM;
        r->start_pending = true;
    } else {
        r->mode = OSR_WHOLE;
    }
    osr_kick(r->o);
}

static void fwd_on_body(void *arg, const uint8_t *data, size_t len)
{
    struct osr_req *r = arg;

    if (r->local_done)
        return;
    if (evbuffer_add(r->buf, data, len) != 0) {
        /* never a body with a hole: a held one becomes a 500, a stream ends here */
        LOG_ERROR(r->o->ctx->log, "out_of_memory", LOG_U("tun", r->o->tun_id),
                  LOG_U("req", r->log_id));
        (void)util_snprintf(r->err, sizeof(r->err), "out_of_memory");
        r->fail = HERR_INTERNAL;
        if (r->mode == OSR_WHOLE)
            r->mode = OSR_WAIT;
        r->local_done = true;
        osr_kick(r->o);
        return;
    }
    if (!r->paused && evbuffer_get_length(r->buf) > OSR_PAUSE_HIGH) {
        r->paused = true;
        ag_fwd_pause_read(r->fwd, true);
    }
    osr_kick(r->o);
}

static void fwd_on_end(void *arg)
{
    struct osr_req *r = arg;

    r->fwd = NULL;
    r->local_done = true;
    osr_kick(r->o);
}

static void fwd_on_error(void *arg, enum ag_fwd_err err, const char *detail)
{
    struct osr_req *r = arg;

    r->fwd = NULL;
    LOG_DEBUG(r->o->ctx->log, "local_error", LOG_U("tun", r->o->tun_id), LOG_U("req", r->log_id),
              LOG_S("detail", detail));
    if (r->mode == OSR_WAIT) {
        ag_agt_local_result(r->agt,
                            err == AG_FWD_E_TIMEOUT ? AG_AGT_LOCAL_TIMEOUT : AG_AGT_LOCAL_REFUSED,
                            detail);
        if (err != AG_FWD_E_TIMEOUT)
            LOG_WARN(r->o->ctx->log, "local_unreachable", LOG_S("addr", r->addr),
                     LOG_S("detail", detail));
        r->fail = err == AG_FWD_E_TIMEOUT ? HERR_GATEWAY_TIMEOUT : HERR_LOCAL_UNREACHABLE;
        r->local_done = true;
        osr_kick(r->o);
        return;
    }
    /* broke off after its head: what came goes out, then the end (a `response`
     * cannot say "incomplete"; a stream ends short, and the log says so) */
    LOG_WARN(r->o->ctx->log, "local_aborted", LOG_U("tun", r->o->tun_id), LOG_U("req", r->log_id),
             LOG_S("addr", r->addr), LOG_S("detail", detail));
    (void)util_snprintf(r->err, sizeof(r->err), "local_aborted");
    r->fail = HERR_LOCAL_UNREACHABLE;
    if (r->mode == OSR_WHOLE) {
        /* a whole body that is not whole: 502 rather than a short one */
        r->mode = OSR_WAIT;
    }
    r->local_done = true;
    osr_kick(r->o);
}

static void fwd_on_body_sent(void *arg, size_t n)
{
    (void)arg;
    (void)n; /* the body is in the frame already: nothing to acknowledge */
}

static const struct ag_fwd_cbs req_fwd_cbs = {
    .on_head = fwd_on_head,
    .on_body = fwd_on_body,
    .on_end = fwd_on_end,
    .on_error = fwd_on_error,
    .on_body_sent = fwd_on_body_sent,
};

/* A request that ended before its head (OSR_WAIT + local_done) is answered from
 * the kick event; this runs there, ahead of req_pump. */
static void req_pump_failed(struct osr_req *r)
{
    if (r->mode != OSR_WAIT || !r->local_done)
        return;
    req_answer_herr(r, r->fail != HERR_NONE ? r->fail : HERR_BAD_HOST_RESPONSE);
}

/* ---- requests ------------------------------------------------------------------- */

static void req_log(struct osr_req *r)
{
    LOG_INFO(r->o->ctx->log, "request", LOG_U("tun", r->o->tun_id), LOG_U("req", r->log_id),
             LOG_S("id", r->id), LOG_S("addr", r->addr), LOG_S("method", r->method),
             LOG_S("path", r->path), LOG_U("status", r->status), LOG_U("bytes_in", r->bytes_in),
             LOG_U("bytes_out", r->bytes_out),
             LOG_U("dur_ms", clk_mono_ms(r->o->ctx->clk) - r->start_ms),
             LOG_S("err", r->err[0] != '\0' ? r->err : NULL));
}

static void req_free(struct osr_req *r)
{
    struct ag_osr *o = r->o;

    req_log(r);
    ag_fwd_free(r->fwd);
    if (r->counted)
        r->agt->inflight--;
    if (r->agt != NULL)
        ag_agt_unref(r->agt);
    list_unlink(&r->link);
    o->nreqs--;
    free(r->hdrs);
    if (r->buf != NULL)
        evbuffer_free(r->buf);
    free(r);
}

static struct osr_req *req_find(struct ag_osr *o, const char *id)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &o->reqs)
    {
        struct osr_req *r = LIST_ENTRY(n, struct osr_req, link);
        if (strcmp(r->id, id) == 0 && r->mode != OSR_FINISHED)
            return r;
    }
    return NULL;
}

static struct osr_req *req_new(struct ag_osr *o, const char *id)
{
    struct osr_req *r = calloc(1, sizeof(*r));

    if (r == NULL)
        return NULL;
    r->buf = evbuffer_new();
    if (r->buf == NULL) {
        free(r);
        return NULL;
    }
    r->o = o;
    (void)util_snprintf(r->id, sizeof(r->id), "%s", id);
    r->log_id = ++o->ctx->next_id;
    r->start_ms = clk_mono_ms(o->ctx->clk);
    list_insert_tail(&o->reqs, &r->link);
    o->nreqs++;
    return r;
}

static const struct tun_msg_hdr *hdr_get(const struct tun_msg_http *h, const char *name)
{
    for (size_t i = 0; i < h->n_hdrs; i++)
        if (util_iov_ieq_str(h->hdrs[i].name, name))
            return &h->hdrs[i];
    return NULL;
}

/* Request headers the frame carries that we set ourselves. */
static bool req_hdr_replaced(struct iov n)
{
    return util_iov_ieq_str(n, "content-length") || util_iov_ieq_str(n, "transfer-encoding");
}

/* Host of a public URL ("https://0x..host[:port]/..."), or "". */
static struct iov url_host(const char *url)
{
    const char *s = strstr(url, "://");
    size_t n;

    if (s == NULL)
        return (struct iov){"", 0};
    s += 3;
    n = strcspn(s, "/?#");
    return (struct iov){s, n};
}

static void req_forward(struct osr_req *r, const struct tun_msg_http *h)
{
    struct ag_agt *a = r->agt;
    struct ag_fwd_hdr *fh = calloc(h->n_hdrs + 3, sizeof(*fh));
    struct ag_fwd_request rq;
    char clen[24];
    size_t n = 0;
    bool has_body = h->body.len > 0 || util_iov_ieq_str(h->method, "POST") ||
                    util_iov_ieq_str(h->method, "PUT") || util_iov_ieq_str(h->method, "PATCH");

    if (fh == NULL) {
        req_answer_herr(r, HERR_INTERNAL);
        return;
    }
    for (size_t i = 0; i < h->n_hdrs; i++) {
        if (req_hdr_replaced(h->hdrs[i].name))
            continue;
        fh[n].name = h->hdrs[i].name;
        fh[n].value = h->hdrs[i].value;
        n++;
    }
    /* the body as the frame carried it: its own length, never the caller's */
    (void)util_snprintf(clen, sizeof(clen), "%zu", h->body.len);
    if (has_body) {
        fh[n].name = (struct iov)IOV_LIT("content-length");
        fh[n].value = (struct iov){clen, strlen(clen)};
        n++;
    }
    /* the relay strips them; the native gateway always sets them (PRODUCT.md) */
    if (hdr_get(h, "x-forwarded-host") == NULL && url_host(a->url).len > 0) {
        fh[n].name = (struct iov)IOV_LIT("x-forwarded-host");
        fh[n].value = url_host(a->url);
        n++;
    }
    if (hdr_get(h, "x-forwarded-proto") == NULL) {
        fh[n].name = (struct iov)IOV_LIT("x-forwarded-proto");
        fh[n].value = strncmp(a->url, "http://", 7) == 0 ? (struct iov)IOV_LIT("http")
                                                         : (struct iov)IOV_LIT("https");
        n++;
    }
    rq.method = h->method;
    rq.path = h->path;
    rq.authority = url_host(a->url);
    rq.hdrs = fh;
    rq.nhdrs = n;
    rq.has_body = has_body;
    rq.websocket = false;
    r->fwd = ag_fwd_start(a, &rq, &req_fwd_cbs, r);
    free(fh);
    if (r->fwd == NULL) {
        req_answer_herr(r, HERR_INTERNAL);
        return;
    }
    a->inflight++;
    r->counted = true;
    if (h->body.len > 0)
        (void)ag_fwd_write_body(r->fwd, (const uint8_t *)h->body.base, h->body.len);
    ag_fwd_end_body(r->fwd);
}

static void on_request(struct ag_osr *o, const struct tun_msg_http *h)
{
    const struct tun_msg_hdr *ah = hdr_get(h, "x-agent-address");
    const struct tun_msg_hdr *ph = hdr_get(h, "x-tunnel-probe");
    struct osr_req *r;
    struct ag_agt *a = NULL;
    uint8_t raw[ID_ADDR_LEN];

    if (req_find(o, h->id) != NULL) {
        LOG_WARN(o->ctx->log, "request_id_in_use", LOG_U("tun", o->tun_id), LOG_S("id", h->id));
        return;
    }
    r = req_new(o, h->id);
    if (r == NULL) {
        LOG_ERROR(o->ctx->log, "out_of_memory", LOG_U("tun", o->tun_id), LOG_S("id", h->id));
        return;
    }
    (void)util_snprintf(r->method, sizeof(r->method), "%.*s", (int)h->method.len, h->method.base);
    (void)util_snprintf(r->path, sizeof(r->path), "%.*s", (int)h->path.len, h->path.base);
    r->bytes_in = h->body.len;
    if (ah != NULL && id_addr_parse(ah->value.base, ah->value.len, raw) == ID_OK) {
        id_addr_to_str(raw, r->addr);
        a = ag_agt_find(o->ctx, r->addr);
    }
    if (o->draining || o->ctx->stopping) {
        /* the agents were removed; the relay may still have sent this one */
        req_answer_herr(r, HERR_SHUTTING_DOWN);
        return;
    }
    if (a == NULL || !o->cb->serves(o->arg, r->addr) || !ag_agt_wanted(a)) {
        req_answer_herr(r, HERR_AGENT_OFFLINE);
        return;
    }
    r->agt = a;
    ag_agt_ref(a);
    /* our own probe: answered here, never forwarded, not counted as a request */
    if (ph != NULL && a->probe_nonce[0] != '\0' && ph->value.len == strlen(a->probe_nonce) &&
        CRYPTO_memcmp(ph->value.base, a->probe_nonce, ph->value.len) == 0) {
        char echo[sizeof(a->probe_nonce)];
        (void)util_snprintf(echo, sizeof(echo), "%s", a->probe_nonce);
        a->probes++;
        r->is_probe = true;
        (void)util_snprintf(r->err, sizeof(r->err), "probe");
        req_answer(r, 200, "text/plain", "ok\n", "x-tunnel-probe", echo);
        return;
    }
    a->requests++;
    a->bytes_in += h->body.len;
    if (a->inflight >= a->cfg.max_inflight) {
        req_answer_herr(r, HERR_HOST_BUSY);
        return;
    }
    req_forward(r, h);
}

void ag_osr_on_bad_request(struct ag_osr *o, const char *id, const char *code)
{
    struct osr_req *r;

    LOG_WARN(o->ctx->log, "request_frame_invalid", LOG_U("tun", o->tun_id),
             LOG_S("id", id[0] != '\0' ? id : NULL), LOG_S("err", code));
    if (id[0] == '\0' || req_find(o, id) != NULL)
        return;
    r = req_new(o, id);
    if (r != NULL)
        req_answer_herr(r, HERR_INVALID_REQUEST);
}

void ag_osr_on_msg(struct ag_osr *o, const struct tun_msg *m)
{
    struct osr_req *r;
    struct tun_msg pong;

    switch (m->type) {
    case TUN_MSG_REQUEST:
        on_request(o, &m->http);
        break;
    case TUN_MSG_CANCEL:
        r = req_find(o, m->http.id);
        if (r == NULL)
            break; /* finished already, or never ours */
        (void)util_snprintf(r->err, sizeof(r->err), "cancelled");
        req_free(r); /* closes the local connection now */
        osr_kick(o);  /* on_idle, if that was the last, from the event */
        break;
    case TUN_MSG_PING:
        tun_msg_init(&pong, TUN_MSG_PONG, TUN_MODE_OSAURUS);
        pong.ping = m->ping;
        (void)send_frame(o, &pong);
        break;
    default:
        break;
    }
}

void ag_osr_on_writable(struct ag_osr *o) { osr_kick(o); }

void ag_osr_drain(struct ag_osr *o) { o->draining = true; }

struct ag_osr *ag_osr_new(struct ag_ctx *ctx, uint64_t tun_id, struct ws_conn *ws,
                          uint32_t features, const struct ag_osr_cbs *cb, void *arg)
{
    struct ag_osr *o = calloc(1, sizeof(*o));

    if (o == NULL)
        return NULL;
    o->ctx = ctx;
    o->tun_id = tun_id;
    o->ws = ws;
    o->cb = cb;
    o->arg = arg;
    o->base64_ok = (features & TUN_FEAT_BASE64) != 0;
    list_init(&o->reqs);
    o->kick_ev = event_new(ctx->base, -1, 0, on_kick, o);
    if (o->kick_ev == NULL) {
        free(o);
        return NULL;
    }
    return o;
}

void ag_osr_free(struct ag_osr *o)
{
    if (o == NULL)
        return;
    while (!list_is_empty(&o->reqs)) {
        struct osr_req *r = LIST_ENTRY(o->reqs.next, struct osr_req, link);
        if (r->mode != OSR_FINISHED && r->err[0] == '\0')
            (void)util_snprintf(r->err, sizeof(r->err), "tunnel_closed");
        req_free(r);
    }
    event_free(o->kick_ev);
    free(o);
}
