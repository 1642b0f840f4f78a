/* Public HTTP/1.1 front end; see gw_h1.h.
 *
 * Input is fed to http-parser from evbuffer_peek() iovecs and drained as
 * consumed. Three things stop the feeding: a finished request whose response
 * is still going out (pipelining: the parser is paused), a request body
 * buffer above H1_BODY_HIGH (resumed by body_drained), and an upgrade.
 *
 * Upgrades. `Upgrade: websocket` on a GET becomes the neutral RFC 8441 form
 * (CONNECT, protocol "websocket", h1_upgrade) and goes to the bridge like any
 * request; the parser stops after the head, and from then on the
 * connection's input is the WebSocket's bytes (raw mode), read into the
 * request body with the same backpressure. The upstream's 2xx head becomes
 * our 101 with the Sec-WebSocket-Accept for the client's key; any other
 * answer passes through as it is, then the connection closes. A
 * /tunnel/connect upgrade is the tunnel endpoint's: it takes the whole
 * connection (take_conn), which this front end hands over from its own
 * callback once the parser stopped. `Upgrade: h2c` is ignored (RFC 9110
 * 7.8 allows it; curl sends it on http://); any other upgrade is 501.
 *
 * Strictness (RFC 9112, 9110): what a proxy in front could read differently
 * is refused with 400 and the connection closed, before routing where the
 * head shows it: a field name that is not a token (whitespace before the
 * colon), several Host lines, a Transfer-Encoding other than one "chunked",
 * an HTTP version other than 1.0/1.1 (505). A chunked body is decoded here,
 * not by http-parser (which accepts a bare LF as a line end, so the local API
 * would see another body than a proxy in front): the parser is told the
 * message has no body and is paused, and the connection reads the chunks
 * itself (chunk_*), CRLF only, trailers bounded by max-header-bytes.
 *
 * Timeouts: a new connection, or one between requests, is closed after
 * header-timeout / keepalive-timeout of silence (the bufferevent's read
 * timeout); a request head must be complete within header-timeout of its
 * first byte (head_timer: a slow sender's bytes do not extend it), else 408.
 *
 * The connection frees itself only from its own event callbacks (read, write,
 * event, and the deferred "kick" event): fe ops called from a tunnel never
 * free it, they set flags and activate the kick. */
#include "gw_h1.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <http_parser.h>

#include "gw.h"
#include "gw_cfg.h"
#include "gw_ipt.h"
#include "gw_px.h"
#include "gw_req.h"
#include "log.h"
#include "tls.h"
#include "util.h"
#include "ws.h"

#define H1_BODY_HIGH (256 * 1024)     /* stop reading the client's body */
#define H1_BODY_LOW (64 * 1024)       /* resume once the tunnel took this much */
#define H1_OUT_HIGH (256 * 1024)      /* withhold window from the agent */
#define H1_OUT_LOW (32 * 1024)        /* return window again */
#define H1_CHUNK_LINE_MAX 4096        /* a chunk-size line with its extensions */
#define H1_CLOSE_LINGER_S 5           /* flushing a final response */
#define H1_IN_HIGH (256 * 1024)       /* read watermark: stop reading the socket */

struct gw_h1 {
    struct gw_conn_link link;         /* in ctx->conns; first member */
    struct gw_ctx *ctx;
    uint64_t id;
    struct bufferevent *bev;          /* owned */
    struct event *kick;               /* deferred resume/free */
    struct sockaddr_storage peer;
    socklen_t peerlen;
    const char *scheme;
    http_parser parser;
    struct gw_req *req;               /* owned; the request being parsed or served */

    /* header parsing */
    char *url;                        /* owned, grows */
    size_t url_len;
    char *field;                      /* owned; current header name */
    size_t field_len;
    char *value;                      /* owned; current header value */
    size_t value_len;
    bool in_value;                    /* last callback was a value */
    size_t head_bytes;                /* for max-header-bytes */
    bool head_too_large;
    bool expect_continue;
    bool missing_host;
    bool up_websocket;                /* Upgrade lists websocket */
    bool up_h2c_only;                 /* Upgrade is h2c alone: ignored */
    size_t head_fields;               /* for max-header-count */
    unsigned host_lines;
    unsigned te_lines;                /* Transfer-Encoding lines */
    bool te_bad;                      /* ... not exactly one "chunked" */
    char *conn_opts;                  /* owned; Connection's values, comma-joined */
    size_t conn_opts_len;
    struct event *head_timer;         /* header-timeout for the head being read */

    /* a chunked request body, decoded here (see the top) */
    enum {
        CHUNK_OFF = 0,                /* no chunked body in progress */
        CHUNK_SIZE,                   /* hex digits */
        CHUNK_EXT,                    /* ";..." to the CR */
        CHUNK_SIZE_LF,                /* the LF after the size line's CR */
        CHUNK_DATA,
        CHUNK_DATA_CR,                /* CRLF after the data */
        CHUNK_DATA_LF,
        CHUNK_TRAILER,                /* a trailer line, or the final empty one */
        CHUNK_TRAILER_LF,
    } chunk;
    uint64_t chunk_left;              /* CHUNK_SIZE: the size so far; DATA: bytes left */
    size_t chunk_line;                /* bytes of the current size or trailer line */
    size_t chunk_trailer_bytes;       /* all trailer bytes, for max-header-bytes */
    unsigned chunk_digits;
    uint8_t http_major, http_minor;   /* the request's version (the parser moves on) */

    /* upgrades */
    bool ws_pass;                     /* a WebSocket to an agent: raw once the parser stops */
    bool raw;                         /* the parser stopped: input is the WebSocket's */
    bool upgraded;                    /* our 101 went out: output is the WebSocket's */
    char ws_accept[29];               /* Sec-WebSocket-Accept for the 101 */
    gw_take_conn_cb take_cb;          /* the tunnel endpoint wants the connection */
    struct event *linger;             /* raw mode after the client's half-close; NULL before */
    const void *take_arg;

    /* request state */
    bool msg_done;                    /* parser finished the request message */
    bool resp_done;                   /* response fully written to the output */
    bool keepalive;                   /* keep the connection after this one */
    bool body_paused;                 /* req->body above H1_BODY_HIGH */
    bool discard_body;                /* answered already; drop body bytes */

    /* response state */
    bool resp_chunked;
    bool resp_no_body;
    size_t unconsumed;                /* response bytes not yet returned */
    bool out_blocked;                 /* output above H1_OUT_HIGH */

    /* lifecycle */
    bool closing;                     /* flush then free */
    bool dead;                        /* free at the next kick */
};

static void h1_on_read(struct bufferevent *bev, void *arg);
static void h1_on_write(struct bufferevent *bev, void *arg);
static void h1_on_event(struct bufferevent *bev, short what, void *arg);
static void h1_on_kick(evutil_socket_t fd, short what, void *arg);
static void h1_on_head_timeout(evutil_socket_t fd, short what, void *arg);
static void h1_finish(struct gw_h1 *h);
static void h1_process(struct gw_h1 *h);

/* ---- teardown ---- */

static void h1_free(struct gw_h1 *h)
{
    if (h->take_cb != NULL) {
        /* promised to the tunnel endpoint, never handed over */
        gw_take_conn_cb cb = h->take_cb;
        h->take_cb = NULL;
        cb(h->req, NULL, h->take_arg);
    }
    gw_conn_link_del(h->ctx, &h->link);
    if (h->bev != NULL) /* an upgraded connection counts as a tunnel now */
        gw_ipt_conn_release(h->ctx->ipt, (struct sockaddr *)&h->peer);
    if (h->req != NULL) {
        gw_req_cancel(h->req);
        if (!h->req->logged)
            gw_req_log(h->req, "client_gone");
        gw_req_free(h->req);
    }
    if (h->bev != NULL)
        bufferevent_free(h->bev);
    event_free(h->kick);
    event_free(h->head_timer);
    if (h->linger != NULL)
        event_free(h->linger);
    free(h->conn_opts);
    free(h->url);
    free(h->field);
    free(h->value);
    free(h);
}

static void h1_kick(struct gw_h1 *h)
{
    event_active(h->kick, EV_TIMEOUT, 0);
}

/* Waiting for a request: closed after s of silence (0 = never). */
static void h1_set_idle_timeout(struct gw_h1 *h, uint64_t s)
{
    struct timeval tv = {(time_t)s, 0};

    bufferevent_set_timeouts(h->bev, s != 0 ? &tv : NULL, NULL);
}

/* Stop reading and free once the output is flushed (or after a linger). */
static void h1_close_after_flush(struct gw_h1 *h)
{
    struct timeval tv = {H1_CLOSE_LINGER_S, 0};

    h->closing = true;
    bufferevent_disable(h->bev, EV_READ);
    bufferevent_set_timeouts(h->bev, NULL, &tv);
    bufferevent_setwatermark(h->bev, EV_WRITE, 0, 0);
    if (evbuffer_get_length(bufferevent_get_output(h->bev)) == 0)
        h->dead = true;
    h1_kick(h);
}

/* ---- writing responses ---- */

/* The response (error or proxied) is fully in the output buffer. */
static void h1_resp_finished(struct gw_h1 *h)
{
    h->resp_done = true;
    h1_kick(h);
}

/* The local API accepted the WebSocket: our 101, with what it negotiated. */
static int h1_head_upgraded(struct gw_h1 *h, const nghttp2_nv *nv, size_t n)
{
    struct evbuffer *out = bufferevent_get_output(h->bev);

    evbuffer_add_printf(out,
                        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                        "connection: Upgrade\r\nsec-websocket-accept: %s\r\n",
                        h->ws_accept);
    for (size_t i = 0; i < n; i++) {
        if ((nv[i].namelen == 14 && memcmp(nv[i].name, "content-length", 14) == 0) ||
            (nv[i].namelen == 17 && memcmp(nv[i].name, "transfer-encoding", 17) == 0))
            continue;
        evbuffer_add(out, nv[i].name, nv[i].namelen);
        evbuffer_add(out, ": ", 2);
        evbuffer_add(out, nv[i].value, nv[i].valuelen);
        evbuffer_add(out, "\r\n", 2);
    }
    evbuffer_add(out, "\r\n", 2);
    h->upgraded = true;
    h->keepalive = false;
    h->resp_chunked = false;
    h->resp_no_body = false;
    bufferevent_enable(h->bev, EV_WRITE);
    return 0;
}

static int h1_fe_head(struct gw_req *r, int status, const nghttp2_nv *nv, size_t n)
{
    struct gw_h1 *h = r->fe_data;
    struct evbuffer *out = bufferevent_get_output(h->bev);
    bool has_length = false;
    bool has_te = false;

    if (h->closing)
        return -1;
    if (h->ws_pass && status >= 200 && status < 300)
        return h1_head_upgraded(h, nv, n);
    if (h->ws_pass)
        h->keepalive = false; /* refused: the local API's answer, then close */
    evbuffer_add_printf(out, "HTTP/1.1 %d %s\r\n", status, herr_reason(status));
    for (size_t i = 0; i < n; i++) {
        if (nv[i].namelen == 14 && memcmp(nv[i].name, "content-length", 14) == 0)
            has_length = true;
        if (nv[i].namelen == 17 && memcmp(nv[i].name, "transfer-encoding", 17) == 0) {
            has_te = true;
            continue; /* h2 never carries it; framing is ours */
        }
        evbuffer_add(out, nv[i].name, nv[i].namelen);
        evbuffer_add(out, ": ", 2);
        evbuffer_add(out, nv[i].value, nv[i].valuelen);
        evbuffer_add(out, "\r\n", 2);
    }
    (void)has_te;
    h->resp_no_body = r->is_head || status == 204 || status == 304 || status < 200;
    h->resp_chunked = false;
    if (!h->resp_no_body && !has_length) {
        if (h->http_major == 1 && h->http_minor >= 1) {
            h->resp_chunked = true;
            evbuffer_add(out, "transfer-encoding: chunked\r\n", 28);
        } else {
            h->keepalive = false; /* HTTP/1.0: the close delimits the body */
        }
    }
    if (!h->msg_done)
        h->keepalive = false; /* body still arriving; simplest correct choice */
    if (!h->keepalive)
        evbuffer_add(out, "connection: close\r\n", 19);
    evbuffer_add(out, "\r\n", 2);
    bufferevent_enable(h->bev, EV_WRITE);
    return 0;
}

static int h1_fe_body(struct gw_req *r, const uint8_t *data, size_t len)
{
    struct gw_h1 *h = r->fe_data;
    struct evbuffer *out = bufferevent_get_output(h->bev);

    if (h->closing || len == 0)
        return h->closing ? -1 : 0;
    if (!h->resp_no_body) {
        char sz[20];
        int szn = h->resp_chunked ? snprintf(sz, sizeof(sz), "%zx\r\n", len) : 0;
        if ((szn > 0 && tls_out_add(out, sz, (size_t)szn) != 0) ||
            tls_out_add(out, data, len) != 0 ||
            (h->resp_chunked && tls_out_add(out, "\r\n", 2) != 0))
            return -1;
    }
    tls_bev_kick_write(h->bev);
    h->unconsumed += len;
    if (evbuffer_get_length(out) < H1_OUT_HIGH) {
        size_t n = h->unconsumed;
        h->unconsumed = 0;
        gw_req_consumed(r, n);
    } else if (!h->out_blocked) {
        h->out_blocked = true;
        bufferevent_setwatermark(h->bev, EV_WRITE, H1_OUT_LOW, 0);
    }
    return 0;
}

static void h1_fe_end(struct gw_req *r, bool complete)
{
    struct gw_h1 *h = r->fe_data;

    if (complete && h->resp_chunked)
        evbuffer_add(bufferevent_get_output(h->bev), "0\r\n\r\n", 5);
    if (!complete) {
        /* never make a cut response look complete: close without the
         * terminating chunk (or short of Content-Length) */
        h->keepalive = false;
    }
    gw_req_log(r, complete ? "done" : "aborted");
    h1_resp_finished(h);
}

static void h1_fe_error(struct gw_req *r, enum herr e)
{
    struct gw_h1 *h = r->fe_data;

    r->status = herr_status(e);
    /* a malformed request may be framed otherwise than we read it: nothing
     * after it on this connection is to be trusted */
    if (e == HERR_BAD_REQUEST || e == HERR_VERSION_NOT_SUPPORTED || e == HERR_REQUEST_TIMEOUT)
        h->keepalive = false;
    if (h->ws_pass || (!h->msg_done && !(r->has_content_length && r->content_length == 0))) {
        /* a body (or a WebSocket's bytes) may still arrive: answer now and
         * close rather than read what nobody will use */
        h->keepalive = false;
        h->discard_body = true;
    }
    herr_write_h1(bufferevent_get_output(h->bev), e, r->is_head, !h->keepalive);
    bufferevent_enable(h->bev, EV_WRITE);
    gw_req_log(r, "error");
    h1_resp_finished(h);
}

static void h1_fe_body_drained(struct gw_req *r)
{
    struct gw_h1 *h = r->fe_data;

    if (h->body_paused && evbuffer_get_length(r->body) <= H1_BODY_LOW) {
        h->body_paused = false;
        h1_kick(h);
    }
}

/* The tunnel endpoint takes the connection once the parser has stopped at
 * the upgrade (h1_process hands it over). */
static int h1_fe_take_conn(struct gw_req *r, gw_take_conn_cb cb, const void *arg)
{
    struct gw_h1 *h = r->fe_data;

    if (h->closing || h->take_cb != NULL || !r->h1_upgrade)
        return -1;
    h->take_cb = cb;
    h->take_arg = arg;
    return 0;
}

static const struct gw_fe_ops h1_fe_ops = {
    .head = h1_fe_head,
    .body = h1_fe_body,
    .end = h1_fe_end,
    .error = h1_fe_error,
    .body_drained = h1_fe_body_drained,
    .take_conn = h1_fe_take_conn,
};

/* ---- parsing ---- */

static int grow_append(char **buf, size_t *len, const char *at, size_t n)
{
    char *p = realloc(*buf, *len + n + 1);

    if (p == NULL)
        return -1;
    memcpy(p + *len, at, n);
    *len += n;
    p[*len] = '\0';
    *buf = p;
    return 0;
}

static bool count_head(struct gw_h1 *h, size_t n)
{
    size_t max = h->ctx->cfg->max_header_bytes;

    h->head_bytes += n;
    if (max != 0 && h->head_bytes > max)
        h->head_too_large = true;
    return !h->head_too_large;
}

static int on_message_begin(http_parser *p)
{
    struct gw_h1 *h = p->data;

    h->req = gw_req_new(h->ctx, &h1_fe_ops, h, h->id, h->scheme);
    if (h->req == NULL)
        return -1;
    h->url_len = 0;
    h->field_len = 0;
    h->value_len = 0;
    h->in_value = false;
    h->head_bytes = 0;
    h->head_too_large = false;
    h->expect_continue = false;
    h->up_websocket = false;
    h->up_h2c_only = false;
    h->msg_done = false;
    h->resp_done = false;
    h->discard_body = false;
    h->resp_chunked = false;
    h->resp_no_body = false;
    h->unconsumed = 0;
    h->head_fields = 0;
    h->host_lines = 0;
    h->te_lines = 0;
    h->te_bad = false;
    h->conn_opts_len = 0;
    h->chunk = CHUNK_OFF;
    /* a request is being read: the idle timeout no longer applies, the
     * head's deadline does (a slow sender's bytes do not extend it) */
    bufferevent_set_timeouts(h->bev, NULL, NULL);
    if (h->ctx->cfg->header_timeout_s != 0) {
        struct timeval tv = {(time_t)h->ctx->cfg->header_timeout_s, 0};
        evtimer_add(h->head_timer, &tv);
    }
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    struct gw_h1 *h = p->data;

    if (!count_head(h, n))
        return 0;
    return grow_append(&h->url, &h->url_len, at, n);
}

/* Upgrade: a comma list of protocols (RFC 9110 7.8), case-insensitive. */
static void note_upgrade(struct gw_h1 *h)
{
    struct iov list = {h->value != NULL ? h->value : "", h->value_len};
    struct iov item;
    bool other = false;
    bool h2c = false;

    while (util_list_next(&list, &item)) {
        if (util_iov_ieq_str(item, "websocket"))
            h->up_websocket = true;
        else if (util_iov_ieq_str(item, "h2c"))
            h2c = true;
        else if (item.len > 0)
            other = true;
    }
    h->up_h2c_only = h2c && !other && !h->up_websocket;
}

static int commit_header(struct gw_h1 *h)
{
    struct gw_req *r = h->req;
    int rv;

    if (h->field_len == 0)
        return 0;
    if (h->ctx->cfg->max_header_count != 0 && ++h->head_fields > h->ctx->cfg->max_header_count)
        h->head_too_large = true;
    if (h->head_too_large)
        goto reset;
    /* RFC 9110 5.5: surrounding whitespace is not part of the value (and
     * HTTP/2 forbids it) */
    while (h->value_len > 0 &&
           (h->value[h->value_len - 1] == ' ' || h->value[h->value_len - 1] == '\t'))
        h->value_len--;
    if (h->field_len == 4 && util_iov_ieq_str((struct iov){h->field, 4}, "host")) {
        if (h->host_lines++ == 0)
            r->authority = strndup(h->value ? h->value : "", h->value_len);
        goto reset;
    }
    if (h->field_len == 17 && util_iov_ieq_str((struct iov){h->field, 17}, "transfer-encoding")) {
        /* the only coding served is chunked, once (RFC 9112 6.1, 7) */
        if (h->te_lines++ > 0 || h->value_len != 7 ||
            !util_iov_ieq_str((struct iov){h->value, 7}, "chunked"))
            h->te_bad = true;
        goto reset;
    }
    if (h->field_len == 10 && util_iov_ieq_str((struct iov){h->field, 10}, "connection")) {
        /* the fields it names are this hop's too (RFC 9110 7.6.1) */
        if ((h->conn_opts_len > 0 && grow_append(&h->conn_opts, &h->conn_opts_len, ",", 1) != 0) ||
            grow_append(&h->conn_opts, &h->conn_opts_len, h->value ? h->value : "",
                        h->value_len) != 0)
            return -1;
        goto reset;
    }
    if (h->field_len == 6 && util_iov_ieq_str((struct iov){h->field, 6}, "expect")) {
        if (h->value_len == 12 && util_iov_ieq_str((struct iov){h->value, 12}, "100-continue"))
            h->expect_continue = true;
        goto reset;
    }
    if (h->field_len == 7 && util_iov_ieq_str((struct iov){h->field, 7}, "upgrade")) {
        note_upgrade(h);
        goto reset;
    }
    if (gw_hdr_is_hop_by_hop(h->field, h->field_len))
        goto reset;
    rv = gw_hdrs_add(&r->hdrs, h->field, h->field_len, h->value ? h->value : "", h->value_len,
                     h->ctx->cfg->max_header_bytes);
    if (rv == -1)
        return -1;
    if (rv == -2)
        h->head_too_large = true;
reset:
    h->field_len = 0;
    h->value_len = 0;
    if (h->value != NULL)
        h->value[0] = '\0';
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n)
{
    struct gw_h1 *h = p->data;

    if (h->in_value) {
        if (commit_header(h) != 0)
            return -1;
        h->in_value = false;
    }
    if (!count_head(h, n))
        return 0;
    return grow_append(&h->field, &h->field_len, at, n);
}

static int on_header_value(http_parser *p, const char *at, size_t n)
{
    struct gw_h1 *h = p->data;

    h->in_value = true;
    if (!count_head(h, n))
        return 0;
    return grow_append(&h->value, &h->value_len, at, n);
}

/* An HTTP/1.1 upgrade, checked once the head is in. Returns HERR_NONE (a
 * WebSocket, now in RFC 8441 form, or an ignored h2c) or the error. */
static enum herr h1_take_upgrade(struct gw_h1 *h, http_parser *p)
{
    struct gw_req *r = h->req;
    const nghttp2_nv *key;
    const nghttp2_nv *ver;

    if (h->up_h2c_only) {
        p->upgrade = 0; /* served as plain HTTP/1.1 (RFC 9110 7.8) */
        return HERR_NONE;
    }
    if (!h->up_websocket || p->method != HTTP_GET)
        return HERR_UNSUPPORTED_UPGRADE;
    key = gw_hdrs_get(&r->hdrs, "sec-websocket-key");
    ver = gw_hdrs_get(&r->hdrs, "sec-websocket-version");
    /* a WebSocket handshake has no body (RFC 6455 4.1) */
    if (key == NULL || ver == NULL || strcmp((const char *)ver->value, "13") != 0 ||
        ws_accept_key((const char *)key->value, key->valuelen, h->ws_accept) != 0 ||
        !(r->has_content_length && r->content_length == 0))
        return HERR_BAD_REQUEST;
    free(r->method);
    r->method = strdup("CONNECT");
    r->protocol = strdup("websocket");
    if (r->method == NULL || r->protocol == NULL)
        return HERR_INTERNAL;
    r->h1_upgrade = true;
    h->ws_pass = true;
    h->keepalive = false;
    return HERR_NONE;
}

/* The target: origin-form as it is; absolute-form (RFC 9112 3.2.2) gives
 * the authority, which replaces Host, and the path. Returns 0, or -1 if out
 * of memory; a target of any other form stays as it is for gw_req_check. */
static int h1_set_target(struct gw_h1 *h, struct gw_req *r)
{
    struct http_parser_url u;
    const char *url = h->url != NULL ? h->url : "/";
    size_t len = h->url != NULL ? h->url_len : 1;

    http_parser_url_init(&u);
    if (len > 0 && url[0] != '/' && http_parser_parse_url(url, len, 0, &u) == 0 &&
        (u.field_set & (1 << UF_SCHEMA)) && (u.field_set & (1 << UF_HOST))) {
        const struct iov sch = {url + u.field_data[UF_SCHEMA].off, u.field_data[UF_SCHEMA].len};
        size_t hoff = u.field_data[UF_HOST].off;
        size_t hend = hoff + u.field_data[UF_HOST].len;
        size_t pend = len;
        if (!util_iov_ieq_str(sch, "http") && !util_iov_ieq_str(sch, "https"))
            goto as_is;
        if (hoff > 0 && url[hoff - 1] == '[')
            hoff--, hend++; /* the parser leaves out an IPv6 literal's brackets */
        if (u.field_set & (1 << UF_PORT))
            hend = u.field_data[UF_PORT].off + u.field_data[UF_PORT].len;
        if (u.field_set & (1 << UF_FRAGMENT))
            pend = u.field_data[UF_FRAGMENT].off - 1;
        free(r->authority);
        r->authority = strndup(url + hoff, hend - hoff);
        if (u.field_set & (1 << UF_PATH))
            r->path = strndup(url + u.field_data[UF_PATH].off, pend - u.field_data[UF_PATH].off);
        else if (u.field_set & (1 << UF_QUERY)) {
            size_t qoff = u.field_data[UF_QUERY].off - 1;
            if ((r->path = malloc(pend - qoff + 2)) != NULL) {
                r->path[0] = '/';
                memcpy(r->path + 1, url + qoff, pend - qoff);
                r->path[pend - qoff + 1] = '\0';
            }
        } else {
            r->path = strdup("/");
        }
        return r->authority != NULL && r->path != NULL ? 0 : -1;
    }
as_is:
    r->path = strndup(url, len);
    return r->path != NULL ? 0 : -1;
}

/* Drops the fields Connection named (hop-by-hop ones are gone already). */
static void h1_drop_connection_opts(struct gw_h1 *h, struct gw_req *r)
{
    struct iov list = {h->conn_opts != NULL ? h->conn_opts : "", h->conn_opts_len};
    struct iov item;

    while (util_list_next(&list, &item))
        if (item.len > 0)
            gw_hdrs_remove(&r->hdrs, item.base, item.len);
}

/* Head errors found once it is in: HERR_NONE or the answer. */
static enum herr h1_head_error(struct gw_h1 *h, http_parser *p)
{
    if (h->head_too_large)
        return HERR_HEADER_TOO_LARGE;
    if (p->http_major != 1 || p->http_minor > 1)
        return HERR_VERSION_NOT_SUPPORTED;
    if (h->host_lines > 1 || h->te_bad || h->req->authority == NULL || p->method == HTTP_CONNECT)
        return HERR_BAD_REQUEST;
    return HERR_NONE;
}

static int on_headers_complete(http_parser *p)
{
    struct gw_h1 *h = p->data;
    struct gw_req *r = h->req;
    enum herr e;

    if (commit_header(h) != 0)
        return -1;
    evtimer_del(h->head_timer);
    h->http_major = (uint8_t)p->http_major;
    h->http_minor = (uint8_t)p->http_minor;
    r->method = strdup(http_method_str(p->method));
    if (r->method == NULL)
        return -1;
    if (h->head_too_large)
        r->path = strdup("-");
    else if (h1_set_target(h, r) != 0)
        return -1;
    if (r->path == NULL)
        return -1;
    gw_req_set_peer(r, (struct sockaddr *)&h->peer);
    e = h1_head_error(h, p);
    if (e != HERR_NONE) {
        gw_req_fail(r, e);
        h->keepalive = false;
        h->discard_body = true;
        return 0;
    }
    h1_drop_connection_opts(h, r);
    r->is_head = p->method == HTTP_HEAD;
    h->keepalive = http_should_keep_alive(p) != 0;
    if ((p->flags & F_CONTENTLENGTH) != 0) {
        r->has_content_length = true;
        r->content_length = p->content_length;
    } else if ((p->flags & F_CHUNKED) == 0) {
        r->has_content_length = true; /* no body at all */
        r->content_length = 0;
    }
    if (p->upgrade) {
        e = h1_take_upgrade(h, p);
        if (e != HERR_NONE) {
            gw_req_fail(r, e);
            h->keepalive = false;
            h->discard_body = true;
            return 0;
        }
    }
    /* a WebSocket's bytes come after the head, for as long as it lives */
    r->body_eof = !h->ws_pass && r->has_content_length && r->content_length == 0;
    if ((p->flags & F_CHUNKED) != 0 && !h->ws_pass) {
        h->chunk = CHUNK_SIZE;
        h->chunk_left = 0;
        h->chunk_line = 0;
        h->chunk_digits = 0;
        h->chunk_trailer_bytes = 0;
    }
    gw_px_start(r);
    /* RFC 9110 10.1.1: only once the request will really be forwarded */
    if (h->expect_continue && !r->body_eof && !h->ws_pass && r->err == HERR_NONE &&
        r->status == 0 && r->up != NULL)
        evbuffer_add(bufferevent_get_output(h->bev), "HTTP/1.1 100 Continue\r\n\r\n", 25);
    /* a chunked body is ours to read: to the parser, the message ends here */
    return h->chunk != CHUNK_OFF ? 1 : 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    struct gw_h1 *h = p->data;
    struct gw_req *r = h->req;

    if (h->discard_body || h->resp_done)
        return 0;
    if (gw_req_body_add(r, at, n) < 0)
        return -1;
    if (gw_req_body_avail(r) > H1_BODY_HIGH)
        h->body_paused = true;
    return 0;
}

static int on_message_complete(http_parser *p)
{
    struct gw_h1 *h = p->data;

    /* one request at a time: later pipelined bytes wait in the buffer */
    http_parser_pause(p, 1);
    if (h->chunk != CHUNK_OFF)
        return 0; /* its body follows, read by h1_process_chunked */
    h->msg_done = true;
    /* an upgrade "completes" at its head; its bytes follow in raw mode */
    if (!h->ws_pass && !h->discard_body && !h->resp_done)
        gw_req_body_eof(h->req);
    return 0;
}

static const http_parser_settings h1_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* Hands the connection to the tunnel endpoint (take_conn); bytes after the
 * head stay in the bufferevent's input for the tunnel. */
static void h1_hand_over(struct gw_h1 *h)
{
    struct bufferevent *bev = h->bev;
    gw_take_conn_cb cb = h->take_cb;

    bufferevent_setcb(bev, NULL, NULL, NULL, NULL);
    bufferevent_set_timeouts(bev, NULL, NULL);
    h->bev = NULL;
    h->take_cb = NULL;
    /* it counts as a tunnel now, not as a public connection */
    gw_ipt_conn_release(h->ctx->ipt, (struct sockaddr *)&h->peer);
    cb(h->req, bev, h->take_arg);
    gw_req_free(h->req);
    h->req = NULL;
    h->dead = true;
}

/* Raw mode: the input is the WebSocket's, into the request body with the
 * same backpressure as a body. */
static void h1_process_raw(struct gw_h1 *h)
{
    struct evbuffer *in = bufferevent_get_input(h->bev);
    struct gw_req *r = h->req;

    while (!h->body_paused && !h->closing && !h->dead && r->up != NULL) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1 || v.iov_len == 0)
            return;
        if (gw_req_body_add(r, v.iov_base, v.iov_len) < 0) {
            gw_req_cancel(r);
            h->dead = true;
            return;
        }
        evbuffer_drain(in, v.iov_len);
        if (gw_req_body_avail(r) > H1_BODY_HIGH)
            h->body_paused = true;
    }
    if (r->up == NULL && r->status == 0 && r->err == HERR_NONE)
        return; /* not opened yet */
    if (r->up == NULL || r->err != HERR_NONE)
        evbuffer_drain(in, evbuffer_get_length(in)); /* answered: nobody reads these */
}

/* A malformed chunked body: answered 400 if nothing was answered yet (the
 * upstream, if opened, is cancelled first), else the response is cut. */
static void h1_chunk_error(struct gw_h1 *h)
{
    struct gw_req *r = h->req;

    h->chunk = CHUNK_OFF;
    h->keepalive = false;
    h->msg_done = true;
    if (r->status == 0 && r->err == HERR_NONE) {
        gw_req_cancel(r);
        gw_req_fail(r, HERR_BAD_REQUEST);
    } else {
        gw_req_cancel(r);
    }
    h1_close_after_flush(h);
}

/* One framing byte of a chunked body (RFC 9112 7.1: chunk-size [ext] CRLF
 * data CRLF ... 0 [ext] CRLF *(trailer CRLF) CRLF). Returns 0, 1 when the
 * body is complete, -1 on malformed framing. */
static int h1_chunk_byte(struct gw_h1 *h, char c)
{
    size_t max = h->ctx->cfg->max_header_bytes;
    int d;

    switch (h->chunk) {
    case CHUNK_SIZE:
        d = util_hex_val((unsigned char)c);
        if (d >= 0) {
            if (++h->chunk_digits > 15) /* 2^60: no overflow, far beyond any limit */
                return -1;
            h->chunk_left = h->chunk_left * 16 + (uint64_t)d;
            return 0;
        }
        if (h->chunk_digits == 0)
            return -1;
        if (c == '\r') {
            h->chunk = CHUNK_SIZE_LF;
            return 0;
        }
        if (c != ';' && c != ' ' && c != '\t') /* BWS before an extension */
            return -1;
        h->chunk = CHUNK_EXT;
        h->chunk_line = h->chunk_digits + 1;
        return 0;
    case CHUNK_EXT:
        if (c == '\r') {
            h->chunk = CHUNK_SIZE_LF;
            return 0;
        }
        /* extensions are not interpreted, only bounded and kept printable */
        if (++h->chunk_line > H1_CHUNK_LINE_MAX || c == '\n' || c == '\0' ||
            ((unsigned char)c < 0x20 && c != '\t') || c == 0x7f)
            return -1;
        return 0;
    case CHUNK_SIZE_LF:
        if (c != '\n')
            return -1;
        h->chunk_digits = 0;
        if (h->chunk_left == 0) {
            h->chunk = CHUNK_TRAILER;
            h->chunk_line = 0;
        } else {
            h->chunk = CHUNK_DATA;
        }
        return 0;
    case CHUNK_DATA_CR:
        if (c != '\r')
            return -1;
        h->chunk = CHUNK_DATA_LF;
        return 0;
    case CHUNK_DATA_LF:
        if (c != '\n')
            return -1;
        h->chunk = CHUNK_SIZE;
        h->chunk_left = 0;
        return 0;
    case CHUNK_TRAILER:
        if (max != 0 && ++h->chunk_trailer_bytes > max)
            return -1;
        if (c == '\r') {
            h->chunk = CHUNK_TRAILER_LF;
            return 0;
        }
        if (c == '\n' || c == '\0')
            return -1;
        h->chunk_line++;
        return 0;
    case CHUNK_TRAILER_LF:
        if (c != '\n')
            return -1;
        if (h->chunk_line == 0)
            return 1; /* the empty line: done */
        h->chunk = CHUNK_TRAILER;
        h->chunk_line = 0;
        return 0;
    case CHUNK_OFF:
    case CHUNK_DATA:
        break;
    }
    return -1;
}

/* Reads a chunked body from the input into the request body (trailers are
 * read and dropped), with the same backpressure as any body. */
static void h1_process_chunked(struct gw_h1 *h)
{
    struct evbuffer *in = bufferevent_get_input(h->bev);
    struct gw_req *r = h->req;

    while (h->chunk != CHUNK_OFF && !h->body_paused && !h->closing && !h->dead) {
        struct evbuffer_iovec v;
        const char *b;
        size_t i = 0;

        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1 || v.iov_len == 0)
            return;
        b = v.iov_base;
        while (i < v.iov_len && h->chunk != CHUNK_OFF) {
            if (h->chunk == CHUNK_DATA) {
                size_t n = v.iov_len - i;
                if (n > h->chunk_left)
                    n = (size_t)h->chunk_left;
                if (!h->discard_body && !h->resp_done && gw_req_body_add(r, b + i, n) < 0) {
                    evbuffer_drain(in, i + n);
                    h1_chunk_error(h);
                    return;
                }
                i += n;
                h->chunk_left -= n;
                if (h->chunk_left == 0)
                    h->chunk = CHUNK_DATA_CR;
                if (gw_req_body_avail(r) > H1_BODY_HIGH) {
                    h->body_paused = true;
                    break;
                }
                continue;
            }
            int rv = h1_chunk_byte(h, b[i++]);
            if (rv < 0) {
                evbuffer_drain(in, i);
                LOG_DEBUG(h->ctx->log, "bad_chunk", LOG_U("conn", h->id));
                h1_chunk_error(h);
                return;
            }
            if (rv == 1) {
                h->chunk = CHUNK_OFF;
                h->msg_done = true;
                if (!h->discard_body && !h->resp_done)
                    gw_req_body_eof(r);
            }
        }
        evbuffer_drain(in, i);
    }
}

/* Feeds buffered input to the parser until something says stop. */
static void h1_process(struct gw_h1 *h)
{
    struct evbuffer *in = bufferevent_get_input(h->bev);

    while (!h->closing && !h->dead) {
        struct evbuffer_iovec v;
        size_t n;

        if (h->req != NULL && h->resp_done && !h->keepalive) {
            h1_close_after_flush(h);
            return;
        }
        if (h->raw) {
            h1_process_raw(h);
            return;
        }
        if (h->chunk != CHUNK_OFF) {
            h1_process_chunked(h);
            if (h->chunk != CHUNK_OFF || h->closing || h->dead)
                return;
            continue;
        }
        if (h->req != NULL && h->msg_done) {
            if (!h->resp_done)
                return; /* pipelined bytes wait for this response */
            /* request fully served */
            gw_req_free(h->req);
            h->req = NULL;
            if (!h->keepalive) {
                h1_close_after_flush(h);
                return;
            }
            h1_set_idle_timeout(h, h->ctx->cfg->keepalive_timeout_s);
            http_parser_pause(&h->parser, 0);
        }
        if (h->body_paused)
            return;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1 || v.iov_len == 0)
            break;
        /* bound each step so body backpressure can act between steps */
        n = v.iov_len > 16384 ? 16384 : v.iov_len;
        size_t used = http_parser_execute(&h->parser, &h1_settings, v.iov_base, n);
        evbuffer_drain(in, used);
        enum http_errno err = HTTP_PARSER_ERRNO(&h->parser);
        if (h->parser.upgrade && (err == HPE_OK || err == HPE_PAUSED) && h->req != NULL &&
            h->msg_done) {
            /* the parser stopped at the upgrade: the rest is not HTTP */
            if (h->take_cb != NULL) {
                h1_hand_over(h);
                return;
            }
            if (h->ws_pass) {
                h->raw = true;
                continue;
            }
            /* refused (answered already): close once it is out */
            h->keepalive = false;
            continue;
        }
        if (err == HPE_PAUSED)
            continue;
        if (err != HPE_OK) {
            if (h->req != NULL && h->req->status == 0 && h->req->err == HERR_NONE &&
                h->req->up == NULL) {
                if (h->req->method == NULL)
                    h->req->method = strdup("-");
                if (h->req->path == NULL)
                    h->req->path = strdup("-");
                h->keepalive = false;
                h->msg_done = true;
                gw_req_fail(h->req, err == HPE_HEADER_OVERFLOW ? HERR_HEADER_TOO_LARGE
                                                               : HERR_BAD_REQUEST);
                h1_close_after_flush(h);
                return;
            }
            if (h->req == NULL) /* garbage between requests */
                herr_write_h1(bufferevent_get_output(h->bev),
                              err == HPE_HEADER_OVERFLOW ? HERR_HEADER_TOO_LARGE : HERR_BAD_REQUEST,
                              false, true);
            else
                gw_req_cancel(h->req);
            h1_close_after_flush(h);
            return;
        }
    }
}

/* ---- event callbacks (the only places that free) ---- */

/* The head did not come whole within header-timeout of its first byte. */
static void h1_on_head_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct gw_h1 *h = arg;
    struct gw_req *r = h->req;

    if (h->dead || h->closing || r == NULL || r->status != 0 || r->err != HERR_NONE)
        return;
    if (r->method == NULL)
        r->method = strdup("-");
    if (r->path == NULL)
        r->path = strdup("-");
    gw_req_set_peer(r, (struct sockaddr *)&h->peer);
    h->keepalive = false;
    h->msg_done = true;
    gw_metrics_limit(h->ctx, GW_LIMIT_HEADER_TIMEOUT);
    gw_req_fail(r, HERR_REQUEST_TIMEOUT);
    h1_close_after_flush(h);
    h1_finish(h);
}

static void h1_finish(struct gw_h1 *h)
{
    if (h->dead)
        h1_free(h);
}

/* Input fell below the read watermark: make libevent read what OpenSSL
 * already holds (see tls_bev_kick_read). */
static void h1_kick_read(struct gw_h1 *h)
{
    if (!h->dead && !h->closing && h->bev != NULL &&
        evbuffer_get_length(bufferevent_get_input(h->bev)) < H1_IN_HIGH)
        tls_bev_kick_read(h->bev);
}

static void h1_on_read(struct bufferevent *bev, void *arg)
{
    struct gw_h1 *h = arg;

    /* The next read is queued before processing: the body this callback
     * hands upstream is sent after the records still buffered (tun_kick). */
    h1_kick_read(h);
    h1_process(h);
    h1_kick_read(h);
    h1_finish(h);
}

static void h1_on_write(struct bufferevent *bev, void *arg)
{
    struct gw_h1 *h = arg;

    if (h->out_blocked &&
        evbuffer_get_length(bufferevent_get_output(bev)) <= H1_OUT_LOW) {
        h->out_blocked = false;
        bufferevent_setwatermark(bev, EV_WRITE, 0, 0);
        if (h->req != NULL && h->unconsumed > 0) {
            size_t n = h->unconsumed;
            h->unconsumed = 0;
            gw_req_consumed(h->req, n);
        }
    }
    if (h->closing && evbuffer_get_length(bufferevent_get_output(bev)) == 0)
        h->dead = true;
    h1_finish(h);
}

/* Raw mode, the client half-closed: the upstream gets the end of its bytes
 * (the local API sees the FIN), and what it still sends may go out; the
 * connection lives on only for a linger. */
/* The half-closed connection outlived its linger: the upstream never ended. */
static void h1_on_linger(evutil_socket_t fd, short what, void *arg)
{
    struct gw_h1 *h = arg;

    h->dead = true;
    h1_finish(h);
}

static void h1_raw_eof(struct gw_h1 *h)
{
    struct timeval tv = {H1_CLOSE_LINGER_S, 0};

    bufferevent_disable(h->bev, EV_READ);
    if (h->req == NULL || h->req->up == NULL || h->resp_done) {
        h->dead = true;
        return;
    }
    gw_req_body_eof(h->req);
    /* a timer of its own: the bufferevent's timeouts count only while it
     * waits to read or write, and here it may do neither */
    h->linger = evtimer_new(h->ctx->base, h1_on_linger, h);
    if (h->linger == NULL || evtimer_add(h->linger, &tv) != 0)
        h->dead = true;
}

static void h1_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct gw_h1 *h = arg;

    /* EOF while reading is the client's half-close; while writing (the
     * OpenSSL bufferevent reports a reset so when output is pending) the
     * connection is gone */
    if ((what & BEV_EVENT_EOF) && (what & BEV_EVENT_READING) &&
        !(what & (BEV_EVENT_ERROR | BEV_EVENT_WRITING)) && h->raw && !h->dead && !h->closing &&
        !(h->req != NULL && h->req->body_eof)) {
        h1_raw_eof(h);
    } else if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)) {
        if (what & BEV_EVENT_ERROR)
            tls_drain_errors();
        h->dead = true;
    }
    h1_finish(h);
}

static void h1_on_kick(evutil_socket_t fd, short what, void *arg)
{
    struct gw_h1 *h = arg;

    if (!h->dead && !h->closing) {
        h1_process(h);
        h1_kick_read(h);
    }
    if (h->closing && evbuffer_get_length(bufferevent_get_output(h->bev)) == 0)
        h->dead = true;
    h1_finish(h);
}

static void h1_free_now(struct gw_conn_link *l)
{
    h1_free((struct gw_h1 *)l);
}

int gw_h1_start(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                socklen_t peerlen, const char *scheme, uint64_t conn_id)
{
    struct gw_h1 *h = calloc(1, sizeof(*h));

    if (h == NULL)
        goto fail_bev;
    h->kick = event_new(ctx->base, -1, 0, h1_on_kick, h);
    h->head_timer = evtimer_new(ctx->base, h1_on_head_timeout, h);
    if (h->kick == NULL || h->head_timer == NULL)
        goto fail_h;
    h->ctx = ctx;
    h->link.free_now = h1_free_now;
    gw_conn_link_add(ctx, &h->link);
    h->id = conn_id;
    h->bev = bev;
    memcpy(&h->peer, peer, peerlen);
    h->peerlen = peerlen;
    h->scheme = scheme;
    http_parser_init(&h->parser, HTTP_REQUEST);
    h->parser.data = h;
    bufferevent_setcb(bev, h1_on_read, h1_on_write, h1_on_event, h);
    tls_bev_read_ahead(bev); /* h1_on_read kicks after every read */
    /* the first request: header-timeout from the connection's start */
    h1_set_idle_timeout(h, ctx->cfg->header_timeout_s);
    bufferevent_setwatermark(bev, EV_READ, 0, H1_IN_HIGH);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    /* bytes may already be buffered (TLS handshake, h2c sniffing) */
    if (evbuffer_get_length(bufferevent_get_input(bev)) > 0)
        h1_kick(h);
    return 0;

fail_h:
    if (h->kick != NULL)
        event_free(h->kick);
    if (h->head_timer != NULL)
        event_free(h->head_timer);
    free(h);
fail_bev:
    bufferevent_free(bev);
    return -1;
}
