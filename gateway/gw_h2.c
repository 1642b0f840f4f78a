/* Public HTTP/2 front end; see gw_h2.h.
 *
 * Ownership: struct gw_h2 owns the bufferevent and the nghttp2 session; each
 * struct gw_h2s (stream) is attached with set_stream_user_data and freed only
 * in on_stream_close, together with its gw_req. fe ops (called from tunnel
 * callbacks) only submit and activate the kick event; nghttp2_session_send
 * and the connection's free happen in this module's own event callbacks. */
#include "gw_h2.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>

#include "gw.h"
#include "gw_cfg.h"
#include "gw_ipt.h"
#include "gw_px.h"
#include "gw_node.h"
#include "gw_req.h"
#include "h2mem.h"
#include "log.h"
#include "tls.h"

#define H2_OUT_HIGH (512 * 1024)        /* stop producing frames */
#define H2_OUT_LOW (64 * 1024)          /* produce again */
#define H2_STREAM_WINDOW (256 * 1024)   /* request body window per stream */
#define H2_CONN_WINDOW (16 * 1024 * 1024)
#define H2_MAX_STREAMS 256
#define H2_NODE_MAX_STREAMS 4096        /* one node-to-node connection carries many clients */
#define H2_REFUSED_TIMEOUT_S 5         /* a refused connection's whole life */
#define H2_LINGER_S 5                  /* a complete response's stream, client side open */

struct gw_h2 {
    struct gw_conn_link link;         /* in ctx->conns; first member */
    struct gw_ctx *ctx;
    uint64_t id;
    struct bufferevent *bev;          /* owned */
    nghttp2_session *session;         /* owned */
    struct event *kick;               /* deferred send / free */
    struct event *head_timer;         /* header-timeout of the header block being read */
    struct sockaddr_storage peer;
    socklen_t peerlen;
    const char *scheme;
    bool dead;                        /* free at the end of the current callback */
    bool in_io;                       /* inside mem_recv/send: no nested send */
    bool refused;                     /* over max-conns-per-ip: 429, GOAWAY, holds no slot */
    bool node;                        /* from --node-listen: forwarded requests (gw_node) */
    struct gw_h2s *streams;           /* live streams (nghttp2 owns their lifetime) */
    size_t nstreams;
};

struct gw_h2s {
    struct gw_h2 *h2;                 /* back pointer (borrowed) */
    int32_t stream_id;
    struct gw_req *req;               /* owned */
    struct evbuffer *resp;            /* response body not yet framed */
    bool resp_eof;                    /* no more response bytes will come */
    bool resp_abort;                  /* reset the stream once resp is sent */
    bool submitted;                   /* response HEADERS submitted */
    size_t resp_unconsumed;           /* bytes to return to the tunnel once sent */
    uint64_t body_returned;           /* request body bytes whose window we returned */
    size_t head_bytes;                /* for max-header-bytes */
    size_t head_fields;               /* for max-header-count */
    bool head_pending;                /* its header block is still arriving (head_timer) */
    struct event *linger;             /* owned or NULL: the response is complete, the
                                       * client's side is still open */
    bool head_too_large;
    struct gw_h2s *next, *prev;       /* in gw_h2.streams */
};

static void h2_send(struct gw_h2 *h);
static void h2_finish(struct gw_h2 *h);

static void h2_kick(struct gw_h2 *h)
{
    event_active(h->kick, EV_TIMEOUT, 0);
}

/* No stream open: the connection closes after s of silence (0 = never). */
static void h2_set_idle_timeout(struct gw_h2 *h, uint64_t s)
{
    struct timeval tv = {(time_t)s, 0};

    bufferevent_set_timeouts(h->bev, s != 0 ? &tv : NULL, NULL);
}

/* ---- fe ops ---- */

static ssize_t resp_read_cb(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                            size_t length, uint32_t *flags, nghttp2_data_source *source,
                            void *user_data)
{
    struct gw_h2s *s = source->ptr;
    size_t have = evbuffer_get_length(s->resp);

    if (have == 0) {
        if (s->resp_abort)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* RST_STREAM INTERNAL_ERROR */
        if (s->resp_eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            return 0;
        }
        return NGHTTP2_ERR_DEFERRED;
    }
    if (length > have)
        length = have;
    *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
    if (length == have && s->resp_eof)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)length;
}

static int h2_submit(struct gw_h2s *s, int status, const nghttp2_nv *nv, size_t n, bool body)
{
    nghttp2_nv *all = calloc(n + 1, sizeof(*all));
    char st[4];
    nghttp2_data_provider prd = {.source.ptr = s, .read_callback = resp_read_cb};
    int rv;

    if (all == NULL)
        return -1;
    snprintf(st, sizeof(st), "%03d", status);
    all[0] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)st, 7, 3, NGHTTP2_NV_FLAG_NONE};
    if (n > 0) /* nv may be NULL then (a WebSocket accept with nothing negotiated) */
        memcpy(all + 1, nv, n * sizeof(*nv));
    rv = nghttp2_submit_response(s->h2->session, s->stream_id, all, n + 1, body ? &prd : NULL);
    free(all);
    s->submitted = true;
    h2_kick(s->h2);
    return rv == 0 ? 0 : -1;
}

static int h2_fe_head(struct gw_req *r, int status, const nghttp2_nv *nv, size_t n)
{
    struct gw_h2s *s = r->fe_data;
    bool body = !(r->is_head || status == 204 || status == 304);

    return h2_submit(s, status, nv, n, body);
}

static int h2_fe_body(struct gw_req *r, const uint8_t *data, size_t len)
{
    struct gw_h2s *s = r->fe_data;

    if (evbuffer_add(s->resp, data, len) != 0)
        return -1;
    s->resp_unconsumed += len;
    nghttp2_session_resume_data(s->h2->session, s->stream_id);
    h2_kick(s->h2);
    return 0;
}

static void h2_fe_end(struct gw_req *r, bool complete)
{
    struct gw_h2s *s = r->fe_data;

    gw_req_log(r, complete ? "done" : "aborted");
    if (complete) {
        s->resp_eof = true;
        nghttp2_session_resume_data(s->h2->session, s->stream_id);
    } else if (s->submitted && evbuffer_get_length(s->resp) > 0) {
        /* the bytes that came before the failure go out first; the data
         * source resets the stream once they have (resp_read_cb) */
        s->resp_abort = true;
        nghttp2_session_resume_data(s->h2->session, s->stream_id);
    } else {
        nghttp2_submit_rst_stream(s->h2->session, NGHTTP2_FLAG_NONE, s->stream_id,
                                  NGHTTP2_INTERNAL_ERROR);
    }
    h2_kick(s->h2);
}

static void h2_fe_error(struct gw_req *r, enum herr e)
{
    struct gw_h2s *s = r->fe_data;
    char body[256];
    char clen[24];
    int blen = herr_json(e, body, sizeof(body));
    nghttp2_nv nv[3] = {
        {(uint8_t *)"content-type", (uint8_t *)"application/json", 12, 16, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-length", (uint8_t *)clen, 14, 0, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"cache-control", (uint8_t *)"no-store", 13, 8, NGHTTP2_NV_FLAG_NONE},
    };

    r->status = herr_status(e);
    if (blen < 0)
        blen = 0;
    nv[1].valuelen = (size_t)snprintf(clen, sizeof(clen), "%d", blen);
    gw_req_log(r, "error");
    if (!r->is_head)
        evbuffer_add(s->resp, body, (size_t)blen);
    s->resp_eof = true;
    h2_submit(s, r->status, nv, 3, !r->is_head);
}

static void h2_fe_body_drained(struct gw_req *r)
{
    struct gw_h2s *s = r->fe_data;
    uint64_t taken = r->body_out;

    /* window goes back to the client only for bytes the tunnel took */
    if (taken > s->body_returned) {
        nghttp2_session_consume(s->h2->session, s->stream_id, (size_t)(taken - s->body_returned));
        s->body_returned = taken;
        h2_kick(s->h2);
    }
}

static const struct gw_fe_ops h2_fe_ops = {
    .head = h2_fe_head,
    .body = h2_fe_body,
    .end = h2_fe_end,
    .error = h2_fe_error,
    .body_drained = h2_fe_body_drained,
    .take_conn = NULL, /* streams share the connection: no tunnels over h2 */
};

/* ---- nghttp2 callbacks ---- */

static ssize_t on_send(nghttp2_session *session, const uint8_t *data, size_t len, int flags,
                       void *user_data)
{
    struct gw_h2 *h = user_data;
    struct evbuffer *out = bufferevent_get_output(h->bev);

    if (evbuffer_get_length(out) >= H2_OUT_HIGH)
        return NGHTTP2_ERR_WOULDBLOCK;
    if (tls_out_add(out, data, len) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    h2mem_discard(&h->ctx->h2mem, data, len); /* a large header block's pages */
    return (ssize_t)len;
}

static int on_send_data(nghttp2_session *session, nghttp2_frame *frame, const uint8_t *framehd,
                        size_t length, nghttp2_data_source *source, void *user_data)
{
    struct gw_h2 *h = user_data;
    struct gw_h2s *s = source->ptr;
    struct evbuffer *out = bufferevent_get_output(h->bev);

    if (evbuffer_get_length(out) >= H2_OUT_HIGH)
        return NGHTTP2_ERR_WOULDBLOCK;
    /* copied rather than moved: s->resp's chains are as small as the pieces
     * that arrived, and the frame header would be a chain (a TLS record) */
    if (tls_out_add(out, framehd, 9) != 0 || tls_out_add_buffer(out, s->resp, length) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    /* the bytes left for the client: the agent may send more */
    if (s->req != NULL) {
        size_t n = s->resp_unconsumed < length ? s->resp_unconsumed : length;
        s->resp_unconsumed -= n;
        gw_req_consumed(s->req, n);
    }
    return 0;
}

static void h2s_on_linger(evutil_socket_t fd, short what, void *arg)
{
    struct gw_h2s *s = arg;
    struct gw_h2 *h = s->h2;

    nghttp2_submit_rst_stream(h->session, NGHTTP2_FLAG_NONE, s->stream_id, NGHTTP2_NO_ERROR);
    h2_send(h);
    h2_finish(h);
}

/* The response is complete while the client still has its side of the
 * stream open (a body nobody will read, or a client that never half-closes):
 * it has H2_LINGER_S to finish (the rest of its body is dropped), then the
 * stream is reset with NO_ERROR (RFC 9113 8.1) rather than kept forever.
 * Not at once: curl 7.x reports a reset during its upload as an error even
 * after a complete response. */
static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    struct gw_h2 *h = user_data;
    int32_t id = frame->hd.stream_id;
    struct gw_h2s *s;
    struct timeval tv = {H2_LINGER_S, 0};

    if ((frame->hd.type != NGHTTP2_DATA && frame->hd.type != NGHTTP2_HEADERS) ||
        !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM) || id <= 0 ||
        nghttp2_session_get_stream_remote_close(session, id) != 0)
        return 0;
    s = nghttp2_session_get_stream_user_data(session, id);
    if (s == NULL || s->linger != NULL)
        return 0;
    s->linger = evtimer_new(h->ctx->base, h2s_on_linger, s);
    if (s->linger == NULL || evtimer_add(s->linger, &tv) != 0)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, id, NGHTTP2_NO_ERROR);
    return 0;
}

/* A header block was not whole within header-timeout. */
static void h2_on_head_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct gw_h2 *h = arg;

    gw_metrics_limit(h->ctx, GW_LIMIT_HEADER_TIMEOUT);
    LOG_INFO(h->ctx->log, "header_timeout", LOG_U("conn", h->id));
    h->dead = true;
    h2_finish(h);
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    struct gw_h2 *h = user_data;
    struct gw_h2s *s;

    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    s->resp = evbuffer_new();
    s->req = gw_req_new(h->ctx, &h2_fe_ops, s, h->id, h->scheme);
    if (s->req != NULL)
        s->req->from_node = h->node;
    if (s->resp == NULL || s->req == NULL) {
        if (s->resp != NULL)
            evbuffer_free(s->resp);
        gw_req_free(s->req);
        free(s);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    s->h2 = h;
    s->stream_id = frame->hd.stream_id;
    nghttp2_session_set_stream_user_data(session, s->stream_id, s);
    s->next = h->streams;
    if (h->streams != NULL)
        h->streams->prev = s;
    h->streams = s;
    if (h->nstreams++ == 0)
        bufferevent_set_timeouts(h->bev, NULL, NULL);
    /* the block (HEADERS + CONTINUATION) must be whole within header-timeout;
     * nothing else can come on the connection meanwhile */
    if (h->ctx->cfg->header_timeout_s != 0) {
        struct timeval tv = {(time_t)h->ctx->cfg->header_timeout_s, 0};
        evtimer_add(h->head_timer, &tv);
        s->head_pending = true;
    }
    return 0;
}

static char *dup_n(const uint8_t *p, size_t n)
{
    return strndup((const char *)p, n);
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user_data)
{
    struct gw_h2 *h = user_data;
    struct gw_h2s *s;
    struct gw_req *r;
    size_t max = h->ctx->cfg->max_header_bytes;

    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0; /* trailers are not forwarded */
    s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (s == NULL)
        return 0;
    r = s->req;
    s->head_bytes += namelen + valuelen;
    if ((max != 0 && s->head_bytes > max) ||
        (h->ctx->cfg->max_header_count != 0 && ++s->head_fields > h->ctx->cfg->max_header_count)) {
        s->head_too_large = true;
        return 0;
    }
    if (namelen > 0 && name[0] == ':') {
        char **dst = NULL;
        if (namelen == 7 && memcmp(name, ":method", 7) == 0)
            dst = &r->method;
        else if (namelen == 5 && memcmp(name, ":path", 5) == 0)
            dst = &r->path;
        else if (namelen == 10 && memcmp(name, ":authority", 10) == 0)
            dst = &r->authority;
        else if (namelen == 9 && memcmp(name, ":protocol", 9) == 0)
            dst = &r->protocol;
        if (dst != NULL && *dst == NULL)
            *dst = dup_n(value, valuelen);
        return 0;
    }
    if (namelen == 4 && memcmp(name, "host", 4) == 0) {
        if (r->authority == NULL)
            r->authority = dup_n(value, valuelen);
        return 0;
    }
    if (gw_hdr_is_hop_by_hop((const char *)name, namelen))
        return 0;
    if (h->node && namelen > 5 && memcmp(name, "x-tg-", 5) == 0)
        return gw_node_in_header(r, (const char *)name, namelen, (const char *)value,
                                 valuelen) < 0
                   ? NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
                   : 0;
    if (gw_hdrs_add(&r->hdrs, (const char *)name, namelen, (const char *)value, valuelen, 0) ==
        -1)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

static void h2_request_ready(struct gw_h2 *h, struct gw_h2s *s, bool end_stream)
{
    struct gw_req *r = s->req;
    const nghttp2_nv *cl;

    gw_req_set_peer(r, (struct sockaddr *)&h->peer);
    if (r->method == NULL)
        r->method = strdup("-");
    if (r->path == NULL)
        r->path = strdup("-");
    if (s->head_too_large) {
        gw_req_fail(r, HERR_HEADER_TOO_LARGE);
        return;
    }
    r->is_head = strcmp(r->method, "HEAD") == 0;
    r->body_eof = end_stream;
    cl = gw_hdrs_get(&r->hdrs, "content-length");
    if (end_stream) {
        r->has_content_length = true;
        r->content_length = 0;
    } else if (cl != NULL && util_parse_u64((const char *)cl->value, cl->valuelen,
                                            &r->content_length) == 0) {
        r->has_content_length = true;
    }
    if (h->refused) {
        /* the answer an HTTP/1.1 client gets (gw_lsn), then no more streams */
        gw_req_fail(r, HERR_TOO_MANY_CONNECTIONS);
        nghttp2_submit_goaway(h->session, NGHTTP2_FLAG_NONE, s->stream_id, NGHTTP2_NO_ERROR,
                              NULL, 0);
        return;
    }
    if (strcmp(r->method, "CONNECT") == 0 && r->protocol == NULL) {
        gw_req_fail(r, HERR_METHOD_NOT_ALLOWED);
        return;
    }
    gw_px_start(r);
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    struct gw_h2 *h = user_data;
    struct gw_h2s *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    bool end_stream = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;

    if (s == NULL)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && s->head_pending) {
        s->head_pending = false;
        evtimer_del(h->head_timer);
    }
    switch (frame->hd.type) {
    case NGHTTP2_HEADERS:
        if (frame->headers.cat == NGHTTP2_HCAT_REQUEST)
            h2_request_ready(h, s, end_stream);
        else if (end_stream) /* trailers end the body */
            gw_req_body_eof(s->req);
        break;
    case NGHTTP2_DATA:
        if (end_stream)
            gw_req_body_eof(s->req);
        break;
    default:
        break;
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                         const uint8_t *data, size_t len, void *user_data)
{
    struct gw_h2s *s = nghttp2_session_get_stream_user_data(session, stream_id);
    struct gw_req *r;

    if (s == NULL)
        return 0;
    r = s->req;
    switch (gw_req_body_add(r, data, len)) {
    case 0:
        return 0;
    case 1: /* answered already: dropped, but keep the client's window open */
        nghttp2_session_consume(session, stream_id, len);
        return 0;
    default:
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
}

/* Unlinks and frees a stream and its request, cancelling the upstream. */
static void h2s_free(struct gw_h2 *h, struct gw_h2s *s)
{
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        h->streams = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    if (s->head_pending) /* reset before its block was whole (nghttp2 refused it) */
        evtimer_del(h->head_timer);
    gw_req_cancel(s->req);
    if (!s->req->logged)
        gw_req_log(s->req, "client_gone");
    gw_req_free(s->req);
    evbuffer_free(s->resp);
    if (s->linger != NULL)
        event_free(s->linger);
    free(s);
    if (--h->nstreams == 0 && !h->dead)
        h2_set_idle_timeout(h, h->refused ? H2_REFUSED_TIMEOUT_S : h->ctx->cfg->keepalive_timeout_s);
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                           void *user_data)
{
    struct gw_h2 *h = user_data;
    struct gw_h2s *s = nghttp2_session_get_stream_user_data(session, stream_id);

    if (s == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(session, stream_id, NULL);
    h2s_free(h, s);
    return 0;
}

/* ---- I/O ---- */

static void h2_send(struct gw_h2 *h)
{
    int rv;

    if (h->dead || h->in_io)
        return;
    h->in_io = true;
    rv = nghttp2_session_send(h->session);
    h->in_io = false;
    if (rv != 0) {
        h->dead = true;
        return;
    }
    tls_bev_kick_write(h->bev);
    if (!nghttp2_session_want_read(h->session) && !nghttp2_session_want_write(h->session) &&
        evbuffer_get_length(bufferevent_get_output(h->bev)) == 0)
        h->dead = true;
}

static void h2_free(struct gw_h2 *h)
{
    h->dead = true;
    gw_conn_link_del(h->ctx, &h->link);
    if (!h->refused)
        gw_ipt_conn_release(h->ctx->ipt, (struct sockaddr *)&h->peer);
    /* nghttp2_session_del() does not call on_stream_close: free ours here */
    while (h->streams != NULL)
        h2s_free(h, h->streams);
    nghttp2_session_del(h->session);
    bufferevent_free(h->bev);
    event_free(h->kick);
    event_free(h->head_timer);
    free(h);
}

static void h2_finish(struct gw_h2 *h)
{
    if (h->dead)
        h2_free(h);
}

static void h2_free_now(struct gw_conn_link *l)
{
    h2_free((struct gw_h2 *)l);
}

static void h2_on_read(struct bufferevent *bev, void *arg)
{
    struct gw_h2 *h = arg;
    struct evbuffer *in = bufferevent_get_input(bev);

    /* records OpenSSL read ahead come in the next callback, queued before
     * the body goes upstream (tun_kick), as in h1_on_read */
    tls_bev_kick_read(bev);
    while (!h->dead && evbuffer_get_length(in) > 0) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        h->in_io = true;
        ssize_t n = nghttp2_session_mem_recv(h->session, v.iov_base, v.iov_len);
        h->in_io = false;
        if (n < 0) {
            h->dead = true;
            break;
        }
        evbuffer_drain(in, (size_t)n);
    }
    h2_send(h);
    h2_finish(h);
}

static void h2_on_write(struct bufferevent *bev, void *arg)
{
    struct gw_h2 *h = arg;

    h2_send(h);
    h2_finish(h);
}

static void h2_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct gw_h2 *h = arg;

    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)) {
        if (what & BEV_EVENT_ERROR)
            tls_drain_errors();
        h->dead = true;
    }
    h2_finish(h);
}

static void h2_on_kick(evutil_socket_t fd, short what, void *arg)
{
    struct gw_h2 *h = arg;

    h2_send(h);
    h2_finish(h);
}

int gw_h2_start(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                socklen_t peerlen, const char *scheme, uint64_t conn_id, bool refused,
                bool node)
{
    struct gw_h2 *h = calloc(1, sizeof(*h));
    nghttp2_session_callbacks *cbs = NULL;
    nghttp2_option *opt = NULL;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, H2_MAX_STREAMS},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, H2_STREAM_WINDOW},
        {NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL, 1},
    };

    if (h == NULL)
        goto fail_bev;
    h->refused = refused;
    h->node = node;
    if (refused)
        iv[0].value = 1; /* one request, answered 429 */
    else if (node)
        iv[0].value = H2_NODE_MAX_STREAMS;
    h->kick = event_new(ctx->base, -1, 0, h2_on_kick, h);
    h->head_timer = evtimer_new(ctx->base, h2_on_head_timeout, h);
    if (h->kick == NULL || h->head_timer == NULL)
        goto fail_h;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        goto fail_kick;
    nghttp2_session_callbacks_set_send_callback(cbs, on_send);
    nghttp2_session_callbacks_set_send_data_callback(cbs, on_send_data);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    if (nghttp2_option_new(&opt) != 0)
        goto fail_cbs;
    nghttp2_option_set_no_auto_window_update(opt, 1);
    if (nghttp2_session_server_new3(&h->session, cbs, h, opt, h2mem_get(&ctx->h2mem)) != 0)
        goto fail_opt;
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    h->ctx = ctx;
    h->link.free_now = h2_free_now;
    gw_conn_link_add(ctx, &h->link);
    h->id = conn_id;
    h->bev = bev;
    memcpy(&h->peer, peer, peerlen);
    h->peerlen = peerlen;
    h->scheme = scheme;
    nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0]));
    nghttp2_session_set_local_window_size(h->session, NGHTTP2_FLAG_NONE, 0, H2_CONN_WINDOW);
    bufferevent_setcb(bev, h2_on_read, h2_on_write, h2_on_event, h);
    tls_bev_read_ahead(bev); /* h2_on_read kicks every read */
    bufferevent_setwatermark(bev, EV_WRITE, H2_OUT_LOW, 0);
    /* the first request: header-timeout from the connection's start */
    h2_set_idle_timeout(h, refused ? H2_REFUSED_TIMEOUT_S : ctx->cfg->header_timeout_s);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    h2_send(h);
    if (evbuffer_get_length(bufferevent_get_input(bev)) > 0)
        h2_on_read(bev, h);
    return 0;

fail_opt:
    nghttp2_option_del(opt);
fail_cbs:
    nghttp2_session_callbacks_del(cbs);
fail_kick:
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
