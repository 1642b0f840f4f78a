/* Public HTTP/1.1 front end; see gw_h1.h.
 *
 * Input is fed to http-parser from evbuffer_peek() iovecs and drained as
 * consumed. Three things stop the feeding: a finished request whose response
 * is still going out (pipelining: the parser is paused), a request body
 * buffer above H1_BODY_HIGH (resumed by body_drained), and an upgrade.
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
#include "gw_req.h"
#include "gw_tun.h"
#include "log.h"
#include "tls.h"
#include "tun_msg.h"
#include "ws.h"

#define H1_BODY_HIGH (256 * 1024)     /* stop reading the client's body */
#define H1_BODY_LOW (64 * 1024)       /* resume once the tunnel took this much */
#define H1_OUT_HIGH (256 * 1024)      /* withhold window from the agent */
#define H1_OUT_LOW (32 * 1024)        /* return window again */
#define H1_IDLE_TIMEOUT_S 75          /* keep-alive / header wait */
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
    bool ws_tunnel;                   /* a valid /tunnel/connect upgrade */
    enum tun_mode ws_mode;
    char ws_accept[29];               /* Sec-WebSocket-Accept for the 101 */

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
static void h1_process(struct gw_h1 *h);

/* ---- teardown ---- */

static void h1_free(struct gw_h1 *h)
{
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
    free(h->url);
    free(h->field);
    free(h->value);
    free(h);
}

static void h1_kick(struct gw_h1 *h)
{
    event_active(h->kick, EV_TIMEOUT, 0);
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

static const char *reason_phrase(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Status";
    }
}

/* The response (error or proxied) is fully in the output buffer. */
static void h1_resp_finished(struct gw_h1 *h)
{
    h->resp_done = true;
    h1_kick(h);
}

static int h1_fe_head(struct gw_req *r, int status, const nghttp2_nv *nv, size_t n)
{
    struct gw_h1 *h = r->fe_data;
    struct evbuffer *out = bufferevent_get_output(h->bev);
    bool has_length = false;
    bool has_te = false;

    if (h->closing)
        return -1;
    evbuffer_add_printf(out, "HTTP/1.1 %d %s\r\n", status, reason_phrase(status));
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
        if (h->parser.http_major == 1 && h->parser.http_minor >= 1) {
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
    struct evbuffer *out = bufferevent_get_output(h->bev);
    char body[256];
    int blen = herr_json(e, body, sizeof(body));

    r->status = herr_status(e);
    if (!h->msg_done && !(r->has_content_length && r->content_length == 0)) {
        /* a body is still arriving: answer now and close rather than read
         * what nobody will use */
        h->keepalive = false;
        h->discard_body = true;
    }
    evbuffer_add_printf(out,
                        "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                        "content-length: %d\r\ncache-control: no-store\r\n%s\r\n",
                        r->status, reason_phrase(r->status), r->is_head ? 0 : blen,
                        h->keepalive ? "" : "connection: close\r\n");
    if (!r->is_head && blen > 0)
        evbuffer_add(out, body, (size_t)blen);
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

static const struct gw_fe_ops h1_fe_ops = {
    .head = h1_fe_head,
    .body = h1_fe_body,
    .end = h1_fe_end,
    .error = h1_fe_error,
    .body_drained = h1_fe_body_drained,
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
    h->ws_tunnel = false;
    h->msg_done = false;
    h->resp_done = false;
    h->discard_body = false;
    h->resp_chunked = false;
    h->resp_no_body = false;
    h->unconsumed = 0;
    /* a request is being served: the idle timeout no longer applies */
    bufferevent_set_timeouts(h->bev, NULL, NULL);
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    struct gw_h1 *h = p->data;

    if (!count_head(h, n))
        return 0;
    return grow_append(&h->url, &h->url_len, at, n);
}

static int commit_header(struct gw_h1 *h)
{
    struct gw_req *r = h->req;
    int rv;

    if (h->field_len == 0)
        return 0;
    if (h->head_too_large)
        goto reset;
    /* RFC 9110 5.5: surrounding whitespace is not part of the value (and
     * HTTP/2 forbids it) */
    while (h->value_len > 0 &&
           (h->value[h->value_len - 1] == ' ' || h->value[h->value_len - 1] == '\t'))
        h->value_len--;
    if (h->field_len == 4 && util_iov_ieq_str((struct iov){h->field, 4}, "host")) {
        if (r->authority == NULL)
            r->authority = strndup(h->value ? h->value : "", h->value_len);
        goto reset;
    }
    if (h->field_len == 6 && util_iov_ieq_str((struct iov){h->field, 6}, "expect")) {
        if (h->value_len == 12 && util_iov_ieq_str((struct iov){h->value, 12}, "100-continue"))
            h->expect_continue = true;
        goto reset;
    }
    if (gw_hdr_is_hop_by_hop(h->field, h->field_len)) {
        /* te: trailers is the one hop-by-hop value worth keeping */
        goto reset;
    }
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

/* Sec-WebSocket-Protocol: a comma list; decide the tunnel mode. */
static int pick_subprotocol(const nghttp2_nv *nv, enum tun_mode *mode)
{
    const char *v;
    size_t len;

    if (nv == NULL) {
        *mode = TUN_MODE_OSAURUS;
        return 0;
    }
    v = (const char *)nv->value;
    len = nv->valuelen;
    while (len > 0) {
        size_t i = 0;
        while (i < len && v[i] != ',')
            i++;
        const char *item = v;
        size_t ilen = i;
        while (ilen > 0 && (*item == ' ' || *item == '\t')) {
            item++;
            ilen--;
        }
        while (ilen > 0 && (item[ilen - 1] == ' ' || item[ilen - 1] == '\t'))
            ilen--;
        if (ilen == strlen(TUN_SUBPROTOCOL) && memcmp(item, TUN_SUBPROTOCOL, ilen) == 0) {
            *mode = TUN_MODE_NATIVE;
            return 0;
        }
        v += i < len ? i + 1 : i;
        len -= i < len ? i + 1 : i;
    }
    return -1;
}

static int on_headers_complete(http_parser *p)
{
    struct gw_h1 *h = p->data;
    struct gw_req *r = h->req;

    if (commit_header(h) != 0)
        return -1;
    if (h->head_too_large) {
        r->method = strdup(http_method_str(p->method));
        r->path = strdup("-");
        gw_req_set_peer(r, (struct sockaddr *)&h->peer);
        gw_req_fail(r, HERR_HEADER_TOO_LARGE);
        h->keepalive = false;
        h->discard_body = true;
        return 0;
    }
    r->method = strdup(http_method_str(p->method));
    r->path = h->url != NULL ? strndup(h->url, h->url_len) : strdup("/");
    if (r->method == NULL || r->path == NULL)
        return -1;
    r->is_head = p->method == HTTP_HEAD;
    h->keepalive = http_should_keep_alive(p) != 0;
    if ((p->flags & F_CONTENTLENGTH) != 0) {
        r->has_content_length = true;
        r->content_length = p->content_length;
    } else if ((p->flags & F_CHUNKED) == 0) {
        r->has_content_length = true; /* no body at all */
        r->content_length = 0;
    }
    gw_req_set_peer(r, (struct sockaddr *)&h->peer);
    if (r->authority == NULL || p->method == HTTP_CONNECT) {
        gw_req_fail(r, HERR_BAD_REQUEST);
        h->keepalive = false;
        h->discard_body = true;
        return 0;
    }
    gw_req_route(r);

    if (p->upgrade && r->route == GW_ROUTE_APEX && strcmp(r->path, "/tunnel/connect") == 0) {
        const nghttp2_nv *key = gw_hdrs_get(&r->hdrs, "sec-websocket-key");
        const nghttp2_nv *ver = gw_hdrs_get(&r->hdrs, "sec-websocket-version");
        if (p->method != HTTP_GET || key == NULL ||
            ver == NULL || strcmp((const char *)ver->value, "13") != 0) {
            gw_req_fail(r, HERR_WEBSOCKET_REQUIRED);
            h->keepalive = false;
            return 0;
        }
        if (pick_subprotocol(gw_hdrs_get(&r->hdrs, "sec-websocket-protocol"), &h->ws_mode) != 0) {
            gw_req_fail(r, HERR_UNSUPPORTED_PROTOCOL);
            h->keepalive = false;
            return 0;
        }
        if (ws_accept_key((const char *)key->value, key->valuelen, h->ws_accept) != 0) {
            gw_req_fail(r, HERR_WEBSOCKET_REQUIRED);
            h->keepalive = false;
            return 0;
        }
        if (h->ctx->draining) {
            gw_req_fail(r, HERR_SHUTTING_DOWN);
            h->keepalive = false;
            return 0;
        }
        const struct gw_cfg *cfg = h->ctx->cfg;
        enum gw_ipt_verdict v = gw_ipt_tunnel_acquire(
            h->ctx->ipt, (struct sockaddr *)&h->peer, cfg->max_tunnels_per_ip,
            cfg->tunnel_connects_per_ip_per_min, util_mono_ms());
        if (v != GW_IPT_OK) {
            LOG_WARN(h->ctx->log, "tunnel_refused", LOG_U("conn", h->id),
                     LOG_S("peer", r->client_ip),
                     LOG_S("err", v == GW_IPT_RATE ? "rate_limited" : "too_many_connections"));
            gw_req_fail(r, v == GW_IPT_RATE ? HERR_RATE_LIMITED : HERR_TOO_MANY_CONNECTIONS);
            h->keepalive = false;
            return 0;
        }
        h->ws_tunnel = true;
        return 0;
    }
    if (p->upgrade) {
        /* WebSocket pass-through to agents arrives with extended CONNECT;
         * until then an upgrade is served as an ordinary request whose
         * Upgrade header was dropped as hop-by-hop. */
        r->is_upgrade = false;
    }
    r->body_eof = r->has_content_length && r->content_length == 0;
    gw_req_start(r);
    /* RFC 9110 10.1.1: only once the request will really be forwarded */
    if (h->expect_continue && !r->body_eof && r->err == HERR_NONE && r->status == 0)
        evbuffer_add(bufferevent_get_output(h->bev), "HTTP/1.1 100 Continue\r\n\r\n", 25);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    struct gw_h1 *h = p->data;
    struct gw_req *r = h->req;

    if (h->discard_body || h->resp_done || r->err != HERR_NONE)
        return 0;
    if (evbuffer_add(r->body, at, n) != 0)
        return -1;
    r->body_in += n;
    if (evbuffer_get_length(r->body) > H1_BODY_HIGH)
        h->body_paused = true;
    gw_req_body_more(r);
    return 0;
}

static int on_message_complete(http_parser *p)
{
    struct gw_h1 *h = p->data;
    struct gw_req *r = h->req;

    h->msg_done = true;
    if (!r->body_eof) {
        r->body_eof = true;
        if (!h->discard_body && !h->resp_done && r->err == HERR_NONE)
            gw_req_body_more(r);
    }
    /* one request at a time: later pipelined bytes wait in the buffer */
    http_parser_pause(p, 1);
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

/* Hands the connection to the tunnel module after a valid upgrade. */
static void h1_upgrade_to_tunnel(struct gw_h1 *h)
{
    struct bufferevent *bev = h->bev;
    struct gw_req *r = h->req;

    bufferevent_setcb(bev, NULL, NULL, NULL, NULL);
    bufferevent_set_timeouts(bev, NULL, NULL);
    h->bev = NULL;
    gw_ipt_conn_release(h->ctx->ipt, (struct sockaddr *)&h->peer);
    gw_tun_accept(h->ctx, bev, (struct sockaddr *)&h->peer, h->ws_accept, h->ws_mode, h->id,
                  r->client_ip);
    gw_req_free(r);
    h->req = NULL;
    h->dead = true;
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
            struct timeval tv = {H1_IDLE_TIMEOUT_S, 0};
            bufferevent_set_timeouts(h->bev, &tv, NULL);
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
        if (h->ws_tunnel && h->parser.upgrade) {
            h1_upgrade_to_tunnel(h);
            return;
        }
        if (err == HPE_PAUSED)
            continue;
        if (err != HPE_OK || (h->parser.upgrade && !h->ws_tunnel)) {
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
            if (h->req == NULL) {
                /* garbage between requests */
                char body[256];
                int blen = herr_json(err == HPE_HEADER_OVERFLOW ? HERR_HEADER_TOO_LARGE
                                                                : HERR_BAD_REQUEST,
                                     body, sizeof(body));
                evbuffer_add_printf(bufferevent_get_output(h->bev),
                                    "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                                    "content-length: %d\r\nconnection: close\r\n\r\n%s",
                                    err == HPE_HEADER_OVERFLOW ? 431 : 400,
                                    err == HPE_HEADER_OVERFLOW ? reason_phrase(431)
                                                               : reason_phrase(400),
                                    blen, body);
            } else {
                gw_req_cancel(h->req);
            }
            h1_close_after_flush(h);
            return;
        }
    }
}

/* ---- event callbacks (the only places that free) ---- */

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

static void h1_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct gw_h1 *h = arg;

    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)) {
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
    struct timeval tv = {H1_IDLE_TIMEOUT_S, 0};

    if (h == NULL)
        goto fail_bev;
    h->kick = event_new(ctx->base, -1, 0, h1_on_kick, h);
    if (h->kick == NULL)
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
    bufferevent_set_timeouts(bev, &tv, NULL);
    bufferevent_setwatermark(bev, EV_READ, 0, H1_IN_HIGH);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    /* bytes may already be buffered (TLS handshake, h2c sniffing) */
    if (evbuffer_get_length(bufferevent_get_input(bev)) > 0)
        h1_kick(h);
    return 0;

fail_h:
    free(h);
fail_bev:
    bufferevent_free(bev);
    return -1;
}
