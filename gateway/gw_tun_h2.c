/* The native tunnel session; see gw_tun_h2.h.
 *
 * Ownership:
 * - struct gw_tun_h2 is owned by its gw_tun (proto->sess_new/sess_free).
 * - struct tstream is owned by nghttp2's stream: freed in on_stream_close,
 *   or by sess_free, since nghttp2_session_del does not call it. It borrows
 *   its gw_req; both sides clear the link on detach (gw_req_end/_fail, or
 *   the front end's cancel).
 * - Nothing here frees its caller: nghttp2 runs only from flush (the
 *   tunnel's kick or its WebSocket's on_writable) and on_binary, guarded by
 *   in_io against re-entry; closing the tunnel from inside marks it and the
 *   tunnel frees itself later from its own kick. */
#include "gw_tun_h2.h"

#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <nghttp2/nghttp2.h>

#include "gw.h"
#include "gw_cfg.h"
#include "gw_node.h"
#include "gw_req.h"
#include "gw_up.h"
#include "h2mem.h"
#include "list.h"
#include "log.h"
#include "util.h"
#include "ws.h"

/* Flow control. A response's bytes count against its stream's window until
 * its client has taken them (up_consumed), so a client that stops reading
 * stops only its own stream, holding at most its stream window. The
 * connection window is given back as the bytes arrive, while the tunnel
 * holds less than GW_TUN_HELD_MAX for its clients: no stalled client takes
 * the other streams' share (PRODUCT.md: a stopped client never stalls other
 * streams). Past it, the connection window waits for the clients too, which
 * bounds a tunnel's response memory at GW_TUN_HELD_MAX + GW_TUN_CONN_WINDOW.
 * A stream starts with the small window and grows to the large one once it
 * has moved two windows' worth with room to spare: bulk transfers get the
 * large window, a crowd of stalled streams holds the small one each. */
#define GW_TUN_STREAM_WINDOW (256 * 1024)          /* a new stream's receive window */
#define GW_TUN_STREAM_WINDOW_MAX (1024 * 1024)     /* a moving stream's */
#define GW_TUN_CONN_WINDOW (64 * 1024 * 1024)      /* the tunnel's */
#define GW_TUN_HELD_MAX (64u * 1024 * 1024)        /* response bytes held for clients */
#define GW_TUN_FLUSH_BYTES (64 * 1024)             /* one WebSocket message at most */
/* A response head as the agent sends it: decoded bytes (RFC 9113 6.5.2: name
 * + value + 32 per field) and fields. Beyond either the stream is reset and
 * the client gets 502, before anything is kept: HPACK lets a few bytes on
 * the wire reference a large header many times. */
#define GW_TUN_MAX_HEADER_LIST (256u * 1024)
#define GW_TUN_MAX_HEADER_FIELDS 1000u

struct gw_tun_h2 {
    struct gw_tun *tun;                  /* owner (a tunnel), or NULL for a node peer */
    struct gw_node_peer *peer;           /* owner (a node-to-node connection), or NULL */
    struct gw_ctx *ctx;
    struct ws_conn *ws;                  /* the tunnel's; borrowed; NULL for a peer */
    uint64_t id;                         /* the tunnel's, for logs */
    nghttp2_session *h2;                 /* owned; NULL before start */
    struct evbuffer *wsbuf;              /* h2 bytes not yet framed into ws */
    struct list streams;                 /* struct tstream */
    size_t nstreams;
    bool in_io;                          /* inside mem_recv / session_send */
    bool goaway;                         /* no new streams */
    bool retiring;                       /* close once the streams are done */
    bool draining;                       /* ... with 1012: the gateway drains */
    bool closed;                         /* fail_all ran: the tunnel is going */
    enum herr fail_err;                  /* what a request in flight gets when the session goes */
    uint64_t held;                       /* response bytes received, not yet taken by clients */
    uint64_t conn_owed;                  /* connection window not yet given back */
};

struct tstream {
    struct gw_tun_h2 *sess;              /* borrowed */
    int32_t id;
    struct gw_req *req;                  /* borrowed; NULL once detached */
    int status;                          /* response status, 0 before head */
    struct gw_hdrs resp_hdrs;            /* response headers being received */
    bool head_done;
    uint64_t delivered;                  /* response bytes handed to the front end */
    uint64_t returned;                   /* of those, taken by the client */
    uint32_t window;                     /* the stream's receive window */
    uint32_t hdr_bytes;                  /* the response head so far (RFC 9113 6.5.2) */
    uint32_t hdr_fields;
    struct list node;                    /* in gw_tun_h2.streams */
};

static void h2s_send(struct gw_tun_h2 *s);

/* ---- the carrier: a tunnel's WebSocket, or a node peer's TCP connection ---- */

static bool io_writable(struct gw_tun_h2 *s)
{
    return s->peer != NULL ? gw_node_peer_writable(s->peer) : ws_is_writable(s->ws);
}

static int io_send(struct gw_tun_h2 *s)
{
    size_t n = evbuffer_get_length(s->wsbuf);

    if (n == 0)
        return 0;
    return s->peer != NULL ? gw_node_peer_send(s->peer, s->wsbuf)
                           : ws_send_binary_buffer(s->ws, s->wsbuf, n);
}

static void io_kick(struct gw_tun_h2 *s)
{
    if (s->peer != NULL)
        gw_node_peer_kick(s->peer);
    else
        gw_tun_kick(s->tun);
}

static void io_close(struct gw_tun_h2 *s, int code, const char *reason)
{
    if (s->peer != NULL)
        gw_node_peer_close(s->peer, reason);
    else
        gw_tun_close(s->tun, code, reason);
}

/* ---- streams ---- */

/* n response bytes of st reached its client (or never will): its stream
 * window, the connection window owed, and a larger window for a stream that
 * moves. */
static void tstream_consumed(struct tstream *st, uint64_t n)
{
    struct gw_tun_h2 *s = st->sess;

    if (n == 0)
        return;
    st->returned += n;
    s->held -= n;
    if (s->h2 == NULL)
        return;
    nghttp2_session_consume_stream(s->h2, st->id, (size_t)n);
    if (s->conn_owed > 0 && s->held < GW_TUN_HELD_MAX) {
        nghttp2_session_consume_connection(s->h2, (size_t)s->conn_owed);
        s->conn_owed = 0;
    }
    if (st->window < GW_TUN_STREAM_WINDOW_MAX && st->req != NULL &&
        st->returned >= 2ull * st->window && s->held < GW_TUN_HELD_MAX / 2 &&
        nghttp2_session_set_local_window_size(s->h2, NGHTTP2_FLAG_NONE, st->id,
                                              GW_TUN_STREAM_WINDOW_MAX) == 0)
        st->window = GW_TUN_STREAM_WINDOW_MAX;
    io_kick(s);
}

/* The stream no longer waits for its bytes to reach the client (it ended,
 * failed or was cancelled): give the agent back the connection window for
 * every byte still counted as in flight, or the tunnel's connection window
 * shrinks with each such stream until nothing moves. nghttp2 applies it to
 * the connection even when the stream is already closed. */
static void tstream_release_window(struct tstream *st)
{
    tstream_consumed(st, st->delivered - st->returned);
}

/* Ends st's request as a stream failure; e applies before the head. */
static void tstream_fail(struct tstream *st, enum herr e)
{
    struct gw_req *r = st->req;

    if (r == NULL)
        return;
    st->req = NULL;
    tstream_release_window(st);
    if (st->head_done)
        gw_req_end(r, false);
    else
        gw_req_fail(r, e);
}

static void tstream_free(struct gw_tun_h2 *s, struct tstream *st)
{
    list_unlink(&st->node);
    s->nstreams--;
    gw_hdrs_cleanup(&st->resp_hdrs);
    free(st);
}

/* The front end refused a head or body (it is closing and frees r itself):
 * detach without ending it, and reset the stream. */
static void tstream_drop(struct tstream *st)
{
    struct gw_req *r = st->req;

    st->req = NULL;
    tstream_release_window(st);
    gw_req_detach(r);
    nghttp2_submit_rst_stream(st->sess->h2, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_CANCEL);
}

/* ---- the upstream interface (gw_up.h) ---- */

static void up_body_more(void *arg)
{
    struct tstream *st = arg;

    if (st->sess->h2 != NULL) {
        nghttp2_session_resume_data(st->sess->h2, st->id);
        io_kick(st->sess);
    }
}

static void up_consumed(void *arg, size_t n)
{
    tstream_consumed(arg, n);
}

static void up_cancel(void *arg)
{
    struct tstream *st = arg;

    st->req = NULL;
    tstream_release_window(st);
    if (st->sess->h2 != NULL) {
        nghttp2_submit_rst_stream(st->sess->h2, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_CANCEL);
        io_kick(st->sess);
    }
}

static ssize_t body_read_cb(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                            size_t length, uint32_t *flags, nghttp2_data_source *source,
                            void *user_data)
{
    struct tstream *st = source->ptr;
    struct gw_req *r = st->req;
    size_t have;

    if (r == NULL) /* cancelled; the RST is on its way */
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    have = gw_req_body_avail(r);
    if (have == 0) {
        if (r->body_eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            return 0;
        }
        return NGHTTP2_ERR_DEFERRED;
    }
    if (length > have)
        length = have;
    *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
    if (length == have && r->body_eof)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)length;
}

static void nv_push(nghttp2_nv *nv, size_t *n, const char *name, const char *value)
{
    nv[*n] = (nghttp2_nv){(uint8_t *)name, (uint8_t *)value, strlen(name), strlen(value),
                          NGHTTP2_NV_FLAG_NONE};
    (*n)++;
}

static const struct gw_up_ops tun_h2_up_ops;

/* Opens r as a stream of s: on a tunnel, to the agent of rt; on a node
 * peer (rt NULL), to the node that holds the agent, with the forwarding
 * headers that node believes once their proof checks out (gw_node). */
static enum herr open_on(struct gw_tun_h2 *s, const struct gw_route *rt, struct gw_req *r)
{
    const struct gw_cfg *cfg = s->ctx->cfg;
    nghttp2_data_provider prd;
    nghttp2_nv *nv;
    size_t n = 0;
    struct tstream *st;
    char xff[600];
    struct gw_node_fwd fwd;
    int32_t id;
    bool ws = gw_req_is_websocket(r);

    if (s->h2 == NULL || s->goaway || s->closed)
        return HERR_AGENT_OFFLINE;
    if (s->peer == NULL && cfg->max_streams_per_tunnel != 0 &&
        s->nstreams >= cfg->max_streams_per_tunnel)
        return HERR_HOST_BUSY;
    st = calloc(1, sizeof(*st));
    nv = calloc(r->hdrs.n + 10 + GW_NODE_FWD_FIELDS, sizeof(*nv));
    if (st == NULL || nv == NULL) {
        free(st);
        free(nv);
        return HERR_INTERNAL;
    }
    nv_push(nv, &n, ":method", r->method);
    nv_push(nv, &n, ":scheme", r->scheme);
    nv_push(nv, &n, ":authority", r->authority);
    nv_push(nv, &n, ":path", r->path);
    if (r->protocol != NULL)
        nv_push(nv, &n, ":protocol", r->protocol);
    for (size_t i = 0; i < r->hdrs.n; i++) {
        const nghttp2_nv *h = &r->hdrs.nv[i];
        if (gw_hdr_is_gateway_set((const char *)h->name, h->namelen))
            continue;
        /* an HTTP/1.1 client's key is answered by the gateway's 101; RFC
         * 8441 streams carry neither it nor the version (PROTOCOL.md 6) */
        if (ws && ((h->namelen == 17 && memcmp(h->name, "sec-websocket-key", 17) == 0) ||
                   (h->namelen == 21 && memcmp(h->name, "sec-websocket-version", 21) == 0)))
            continue;
        nv[n++] = *h;
    }
    if (s->peer != NULL) {
        if (gw_node_fwd_fields(s->ctx, r, &fwd) != 0) {
            free(st);
            free(nv);
            return HERR_INTERNAL;
        }
        for (size_t i = 0; i < fwd.n; i++)
            nv_push(nv, &n, fwd.name[i], fwd.value[i]);
    } else {
        if (r->xff_chain[0] != '\0')
            util_snprintf(xff, sizeof(xff), "%s, %s", r->xff_chain, r->client_ip);
        else
            util_snprintf(xff, sizeof(xff), "%s", r->client_ip);
        nv_push(nv, &n, "x-forwarded-for", xff);
        nv_push(nv, &n, "x-forwarded-proto", r->fwd_proto);
        nv_push(nv, &n, "x-forwarded-host", r->fwd_host != NULL ? r->fwd_host : r->authority);
        nv_push(nv, &n, "x-agent-address", rt->addr_str);
    }
    prd.source.ptr = st;
    prd.read_callback = body_read_cb;
    st->sess = s;
    st->req = r;
    st->window = GW_TUN_STREAM_WINDOW;
    /* a WebSocket's bytes come later: its stream always has a body */
    id = nghttp2_submit_request(s->h2, NULL, nv, n,
                                !ws && r->body_eof && gw_req_body_avail(r) == 0 ? NULL : &prd,
                                st);
    free(nv);
    if (id < 0) {
        free(st);
        return HERR_AGENT_OFFLINE;
    }
    st->id = id;
    list_insert_tail(&s->streams, &st->node);
    s->nstreams++;
    gw_req_attach(r, &tun_h2_up_ops, st);
    io_kick(s);
    return HERR_NONE;
}

static enum herr up_open(struct gw_route *rt, struct gw_req *r)
{
    return open_on(rt->owner, rt, r);
}

static const struct gw_up_ops tun_h2_up_ops = {
    .name = "tunnel",
    .open = up_open,
    .body_more = up_body_more,
    .consumed = up_consumed,
    .cancel = up_cancel,
};

/* ---- nghttp2 client callbacks ---- */

static ssize_t h2_on_send(nghttp2_session *session, const uint8_t *data, size_t len, int flags,
                          void *user_data)
{
    struct gw_tun_h2 *s = user_data;

    /* the WebSocket's output is full: resume from on_writable (flush) */
    if (!io_writable(s))
        return NGHTTP2_ERR_WOULDBLOCK;
    if (evbuffer_add(s->wsbuf, data, len) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    h2mem_discard(&s->ctx->h2mem, data, len); /* a large header block's pages */
    if (evbuffer_get_length(s->wsbuf) >= GW_TUN_FLUSH_BYTES && io_send(s) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    return (ssize_t)len;
}

static int h2_on_send_data(nghttp2_session *session, nghttp2_frame *frame, const uint8_t *framehd,
                           size_t length, nghttp2_data_source *source, void *user_data)
{
    struct gw_tun_h2 *s = user_data;
    struct tstream *st = source->ptr;
    struct gw_req *r = st->req;

    if (!io_writable(s))
        return NGHTTP2_ERR_WOULDBLOCK;
    if (r == NULL)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    evbuffer_add(s->wsbuf, framehd, 9);
    if (gw_req_body_take(r, s->wsbuf, length) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    if (s->peer == NULL)
        s->ctx->n.bytes_to_agents += length;
    if (evbuffer_get_length(s->wsbuf) >= GW_TUN_FLUSH_BYTES)
        io_send(s);
    return 0;
}

static int h2_on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *user_data)
{
    struct tstream *st = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);

    if (st == NULL || frame->hd.type != NGHTTP2_HEADERS || st->head_done)
        return 0; /* trailers are not relayed */
    /* counted as decoded, interim heads included, before anything is kept */
    st->hdr_bytes += (uint32_t)(namelen + valuelen + 32); /* each at most 64 KiB (nghttp2) */
    if (++st->hdr_fields > GW_TUN_MAX_HEADER_FIELDS || st->hdr_bytes > GW_TUN_MAX_HEADER_LIST) {
        struct gw_tun_h2 *s = user_data;
        LOG_WARN(s->ctx->log, "agent_header_too_large", LOG_U("tun", s->id),
                 LOG_I("stream", st->id), LOG_U("fields", st->hdr_fields),
                 LOG_U("bytes", st->hdr_bytes));
        gw_hdrs_cleanup(&st->resp_hdrs);
        tstream_fail(st, HERR_BAD_HOST_RESPONSE);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* RST_STREAM; the block is still decoded */
    }
    if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
        uint64_t code;
        if (util_parse_u64((const char *)value, valuelen, &code) == 0 && code >= 100 &&
            code <= 999)
            st->status = (int)code;
        return 0;
    }
    if (namelen > 0 && name[0] == ':')
        return 0;
    if (gw_hdr_is_hop_by_hop((const char *)name, namelen))
        return 0;
    if (gw_hdrs_add(&st->resp_hdrs, (const char *)name, namelen, (const char *)value, valuelen,
                    0) != 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

static int h2_on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                            void *user_data)
{
    struct gw_tun_h2 *s = user_data;
    struct tstream *st;
    bool end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;

    if (frame->hd.type == NGHTTP2_GOAWAY) {
        /* the agent is going away: no new streams here */
        s->goaway = true;
        return 0;
    }
    st = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (st == NULL)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && !st->head_done) {
        if (st->status == 0) {
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_PROTOCOL_ERROR);
            tstream_fail(st, HERR_BAD_HOST_RESPONSE);
            return 0;
        }
        if (st->status < 200) { /* interim: wait for the final head */
            gw_hdrs_cleanup(&st->resp_hdrs);
            st->status = 0;
            return 0;
        }
        st->head_done = true;
        if (st->req != NULL &&
            gw_req_head(st->req, st->status, st->resp_hdrs.nv, st->resp_hdrs.n) != 0)
            tstream_drop(st);
        gw_hdrs_cleanup(&st->resp_hdrs);
    }
    if (end && st->req != NULL && st->head_done) {
        struct gw_req *r = st->req;
        st->req = NULL;
        tstream_release_window(st);
        /* the response is complete but our side is not (a WebSocket the
         * local API closed, an answer before the whole upload): nobody will
         * send the rest, so close the stream instead of leaving it
         * half-open on the tunnel (RFC 9113 8.1) */
        if (!nghttp2_session_get_stream_local_close(session, st->id))
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_NO_ERROR);
        gw_req_end(r, true);
    }
    return 0;
}

static int h2_on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                            const uint8_t *data, size_t len, void *user_data)
{
    struct gw_tun_h2 *s = user_data;
    struct tstream *st = nghttp2_session_get_stream_user_data(session, stream_id);

    if (st == NULL || st->req == NULL) {
        nghttp2_session_consume(session, stream_id, len);
        return 0;
    }
    if (s->peer == NULL)
        s->ctx->n.bytes_from_agents += len;
    st->delivered += len;
    s->held += len;
    if (s->held <= GW_TUN_HELD_MAX)
        nghttp2_session_consume_connection(session, len);
    else
        s->conn_owed += len;
    if (gw_req_body(st->req, data, len) != 0)
        tstream_drop(st);
    return 0;
}

static int h2_on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                              void *user_data)
{
    struct gw_tun_h2 *s = user_data;
    struct tstream *st = nghttp2_session_get_stream_user_data(session, stream_id);

    if (st == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(session, stream_id, NULL);
    tstream_fail(st, error_code == NGHTTP2_REFUSED_STREAM ? HERR_AGENT_OFFLINE
                                                          : HERR_LOCAL_UNREACHABLE);
    tstream_free(s, st);
    if (s->retiring && s->nstreams == 0 && !s->closed) {
        if (s->draining)
            gw_tun_close(s->tun, WS_CLOSE_RESTART, "draining");
        else
            gw_tun_close(s->tun, WS_CLOSE_NORMAL, "no agents");
    }
    return 0;
}

/* ---- the session (struct gw_tun_proto) ---- */

static void *h2s_new(struct gw_tun *t, struct gw_ctx *ctx, struct ws_conn *ws, uint64_t id)
{
    struct gw_tun_h2 *s = calloc(1, sizeof(*s));

    if (s == NULL)
        return NULL;
    s->wsbuf = evbuffer_new();
    if (s->wsbuf == NULL) {
        free(s);
        return NULL;
    }
    s->tun = t;
    s->ctx = ctx;
    s->ws = ws;
    s->id = id;
    s->fail_err = HERR_TUNNEL_CLOSED;
    list_init(&s->streams);
    return s;
}

static int h2s_start(void *arg, unsigned features)
{
    struct gw_tun_h2 *s = arg;
    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, GW_TUN_STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 256 * 1024},
        /* DATA frames as large as one WebSocket message: an agent sends a
         * quarter of the frames (and messages) of the 16 KiB default */
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, GW_TUN_FLUSH_BYTES},
    };
    int rv = -1;

    (void)features;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return -1;
    if (nghttp2_option_new(&opt) != 0)
        goto out_cbs;
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* what a request's head may be is max-header-bytes/-count's to say; the
     * default (64 KiB of deflate bound, ~12 bytes a field over the raw size)
     * would turn many small headers into a stream error */
    nghttp2_option_set_max_send_header_block_length(opt, 1u << 20);
    nghttp2_session_callbacks_set_send_callback(cbs, h2_on_send);
    nghttp2_session_callbacks_set_send_data_callback(cbs, h2_on_send_data);
    nghttp2_session_callbacks_set_on_header_callback(cbs, h2_on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, h2_on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, h2_on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, h2_on_stream_close);
    if (nghttp2_session_client_new3(&s->h2, cbs, s, opt, h2mem_get(&s->ctx->h2mem)) != 0)
        goto out_opt;
    nghttp2_submit_settings(s->h2, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0]));
    nghttp2_session_set_local_window_size(s->h2, NGHTTP2_FLAG_NONE, 0, GW_TUN_CONN_WINDOW);
    rv = 0;
    h2s_send(s);
out_opt:
    nghttp2_option_del(opt);
out_cbs:
    nghttp2_session_callbacks_del(cbs);
    return rv;
}

/* Runs nghttp2_session_send and frames what it produced. */
static void h2s_send(struct gw_tun_h2 *s)
{
    int rv;

    if (s->h2 == NULL || s->in_io || s->closed)
        return;
    s->in_io = true;
    rv = nghttp2_session_send(s->h2);
    s->in_io = false;
    io_send(s);
    if (rv != 0) {
        LOG_WARN(s->ctx->log, s->peer != NULL ? "node_h2_error" : "tunnel_h2_error",
                 LOG_U(s->peer != NULL ? "peer" : "tun", s->id),
                 LOG_S("err", nghttp2_strerror(rv)));
        io_close(s, WS_CLOSE_PROTOCOL_ERROR, "h2 error");
        return;
    }
    /* The session ended itself (a connection error it answered with GOAWAY,
     * such as a PUSH_PROMISE, or the agent's GOAWAY with nothing left in
     * flight): a tunnel that can carry nothing must not stay routed, and its
     * streams must not wait for their timeouts. */
    if (!nghttp2_session_want_read(s->h2) && !nghttp2_session_want_write(s->h2)) {
        LOG_WARN(s->ctx->log, s->peer != NULL ? "node_h2_ended" : "tunnel_h2_ended",
                 LOG_U(s->peer != NULL ? "peer" : "tun", s->id),
                 LOG_U("streams", s->nstreams), LOG_B("goaway_from_agent", s->goaway));
        io_close(s, WS_CLOSE_PROTOCOL_ERROR, "h2 session ended");
    }
}

static int h2s_on_binary(void *arg, const uint8_t *data, size_t len)
{
    struct gw_tun_h2 *s = arg;
    ssize_t n;

    if (s->h2 == NULL)
        return -1;
    s->in_io = true;
    n = nghttp2_session_mem_recv(s->h2, data, len);
    s->in_io = false;
    if (n < 0) {
        LOG_WARN(s->ctx->log, "tunnel_h2_error", LOG_U("tun", s->id),
                 LOG_S("err", nghttp2_strerror((int)n)));
        return -1;
    }
    return 0;
}

static void h2s_on_data(void *arg, const struct tun_msg *m)
{
    (void)arg; /* JSON ping/pong and Osaurus data frames mean nothing here */
    (void)m;
}

static bool h2s_on_bad_data(void *arg, const struct tun_msg *m, enum tun_err e)
{
    (void)arg;
    (void)m;
    (void)e;
    return false;
}

static void h2s_ping(void *arg)
{
    struct gw_tun_h2 *s = arg;

    if (s->h2 == NULL)
        return;
    nghttp2_submit_ping(s->h2, NGHTTP2_FLAG_NONE, NULL);
    io_kick(s);
}

static void h2s_flush(void *arg)
{
    h2s_send(arg);
}

static void h2s_goaway(struct gw_tun_h2 *s)
{
    if (s->goaway || s->h2 == NULL)
        return;
    s->goaway = true;
    nghttp2_submit_goaway(s->h2, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(s->h2),
                          NGHTTP2_NO_ERROR, NULL, 0);
}

static void h2s_drain(void *arg)
{
    struct gw_tun_h2 *s = arg;
    struct tun_msg m;

    tun_msg_init(&m, TUN_MSG_DRAINING, TUN_MODE_NATIVE);
    m.draining.grace_s = (uint32_t)s->ctx->cfg->drain_timeout_s;
    gw_tun_send_msg(s->tun, &m);
    h2s_goaway(s);
    s->retiring = true;
    s->draining = true;
    if (s->nstreams == 0)
        gw_tun_close(s->tun, WS_CLOSE_RESTART, "draining");
    else
        io_kick(s);
}

static void h2s_drain_notice(void *arg)
{
    struct gw_tun_h2 *s = arg;
    struct tun_msg m;

    tun_msg_init(&m, TUN_MSG_DRAINING, TUN_MODE_NATIVE);
    m.draining.grace_s = (uint32_t)s->ctx->cfg->drain_timeout_s;
    gw_tun_send_msg(s->tun, &m);
    s->draining = true; /* closes with 1012 once retired and idle */
    io_kick(s);
}

static void h2s_retire(void *arg)
{
    struct gw_tun_h2 *s = arg;

    /* finish the streams first (GOAWAY), then close; a tunnel told to
     * drain (its agents moved to another node) closes as draining */
    h2s_goaway(s);
    s->retiring = true;
    if (s->nstreams == 0)
        gw_tun_close(s->tun, s->draining ? WS_CLOSE_RESTART : WS_CLOSE_NORMAL,
                     s->draining ? "draining" : "no agents");
    else
        io_kick(s);
}

static void h2s_fail_all(void *arg)
{
    struct gw_tun_h2 *s = arg;
    struct list *n;
    struct list *tmp;

    s->closed = true;
    LIST_FOREACH_SAFE(n, tmp, &s->streams)
    tstream_fail(LIST_ENTRY(n, struct tstream, node), s->fail_err);
}

static void h2s_free(void *arg)
{
    struct gw_tun_h2 *s = arg;

    if (s == NULL)
        return;
    h2s_fail_all(s);
    while (!list_is_empty(&s->streams)) {
        struct tstream *st = LIST_ENTRY(s->streams.next, struct tstream, node);
        if (s->h2 != NULL)
            nghttp2_session_set_stream_user_data(s->h2, st->id, NULL);
        tstream_free(s, st);
    }
    nghttp2_session_del(s->h2);
    evbuffer_free(s->wsbuf);
    free(s);
}

static size_t h2s_streams(const void *arg)
{
    const struct gw_tun_h2 *s = arg;

    return s->nstreams;
}

static int h2s_signed_text(char *buf, size_t size, const char *domain,
                           const struct tun_msg_agent_auth *a, const char *nonce, int64_t ts)
{
    /* the gateway's domain is signed: a signature for one gateway is useless
     * at another */
    return tun_msg_native_signed_text(buf, size, domain, a->addr, nonce, ts);
}

const struct gw_tun_proto gw_tun_h2_proto = {
    .name = "native",
    .mode = TUN_MODE_NATIVE,
    .subprotocol = TUN_SUBPROTOCOL,
    .max_text = TUN_CTL_MAX_BYTES,
    .ctl_per_min = TUN_CTL_RATE_NATIVE,
    .removed_reason = TUN_REASON_REMOVED,
    .auth_all_or_nothing = false,
    .signs_domain = true,
    .up = &tun_h2_up_ops,
    .signed_text = h2s_signed_text,
    .sess_new = h2s_new,
    .start = h2s_start,
    .on_binary = h2s_on_binary,
    .on_data = h2s_on_data,
    .on_bad_data = h2s_on_bad_data,
    .ping = h2s_ping,
    .flush = h2s_flush,
    .drain = h2s_drain,
    .drain_notice = h2s_drain_notice,
    .retire = h2s_retire,
    .fail_all = h2s_fail_all,
    .sess_free = h2s_free,
    .streams = h2s_streams,
};

/* ---- node peers (gw_node): the same client session on a TCP connection ---- */

struct gw_tun_h2 *gw_tun_h2_peer_new(struct gw_ctx *ctx, struct gw_node_peer *peer, uint64_t id)
{
    struct gw_tun_h2 *s = h2s_new(NULL, ctx, NULL, id);

    if (s == NULL)
        return NULL;
    s->peer = peer;
    s->fail_err = HERR_AGENT_OFFLINE; /* the node holding the agent is gone */
    if (h2s_start(s, 0) != 0) {
        h2s_free(s);
        return NULL;
    }
    return s;
}

enum herr gw_tun_h2_peer_open(struct gw_tun_h2 *s, struct gw_req *r)
{
    return open_on(s, NULL, r);
}

int gw_tun_h2_peer_recv(struct gw_tun_h2 *s, const uint8_t *data, size_t len)
{
    return h2s_on_binary(s, data, len);
}

void gw_tun_h2_peer_flush(struct gw_tun_h2 *s)
{
    h2s_send(s);
}

size_t gw_tun_h2_peer_streams(const struct gw_tun_h2 *s)
{
    return s->nstreams;
}

bool gw_tun_h2_peer_usable(const struct gw_tun_h2 *s)
{
    return s->h2 != NULL && !s->goaway && !s->closed;
}

void gw_tun_h2_peer_fail_all(struct gw_tun_h2 *s)
{
    h2s_fail_all(s);
}

void gw_tun_h2_peer_free(struct gw_tun_h2 *s)
{
    h2s_free(s);
}
