/* Tunnels; see gw_tun.h.
 *
 * States: AUTH (challenge sent, waiting for auth, 10 s deadline) -> LIVE
 * (agents registered; native: h2 client session running) -> CLOSING (close
 * frame sent or connection lost; streams failed) -> freed in ws on_close.
 *
 * Ownership:
 * - gw_ctx.tuns lists every tunnel; a tunnel frees itself (tun_free) only
 *   from its own event callbacks (ws on_close, the kick event), never from
 *   inside nghttp2 or ws processing.
 * - struct gw_tun_agent entries are owned by their tunnel; the registry
 *   borrows them, and each is removed from the registry before it is freed.
 * - struct tstream is owned by nghttp2's stream (freed in on_stream_close, or
 *   by tun_free since nghttp2_session_del does not call it); it borrows its
 *   gw_req and both sides clear the link on detach. */
#include "gw_tun.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>

#include "gw.h"
#include "gw_allow.h"
#include "gw_cfg.h"
#include "gw_ipt.h"
#include "gw_lsn.h"
#include "gw_osr.h"
#include "gw_reg.h"
#include "gw_req.h"
#include "id.h"
#include "log.h"
#include "util.h"
#include "ws.h"

#define GW_TUN_STREAM_WINDOW (1024 * 1024)         /* response bytes in flight per stream */
#define GW_TUN_CONN_WINDOW (64 * 1024 * 1024)      /* ... and per tunnel */
#define GW_TUN_FLUSH_BYTES (64 * 1024)             /* one WebSocket message at most */

enum gw_tun_state {
    GW_TUN_ST_AUTH = 0,
    GW_TUN_ST_LIVE,
    GW_TUN_ST_CLOSING,
};

struct gw_tun_agent {
    struct gw_tun *tun;                  /* owner */
    uint8_t addr[ID_ADDR_LEN];
    char addr_str[ID_ADDR_STR_LEN + 1];  /* lowercase */
    uint64_t resp_timeout_ms;            /* 0 = the gateway's default */
    struct gw_tun_agent *next;
};

struct tstream {
    struct gw_tun *tun;                  /* borrowed */
    int32_t id;
    struct gw_req *req;                  /* borrowed; NULL once detached */
    int status;                          /* response status, 0 before head */
    struct gw_hdrs resp_hdrs;            /* response headers being received */
    bool head_done;
    uint64_t delivered;                  /* response bytes handed to the front end */
    uint64_t returned;                   /* of those, window given back to the agent */
    struct tstream *next, *prev;         /* in gw_tun.streams */
};

struct gw_tun {
    struct gw_ctx *ctx;
    uint64_t id;
    struct gw_tun *next, *prev;          /* in ctx->tuns */
    struct ws_conn *ws;                  /* owned */
    enum tun_mode mode;
    enum gw_tun_state state;
    char peer_ip[INET6_ADDRSTRLEN];
    struct sockaddr_storage peer;        /* TCP peer, for the per-IP tunnel count */
    char instance[65];                   /* from auth; "" in Osaurus mode without one */

    char nonce[65];                      /* outstanding challenge, "" if none */
    uint64_t nonce_expiry_ms;

    struct event *auth_timer;            /* AUTH deadline */
    struct event *ping_timer;            /* keepalive */
    struct event *kick;                  /* deferred send / free */

    struct gw_tun_agent *agents;         /* owned list */
    size_t nagents;

    nghttp2_session *h2;                 /* native, LIVE: owned */
    struct evbuffer *wsbuf;              /* h2 bytes not yet framed into ws */
    struct tstream *streams;             /* live streams */
    size_t nstreams;
    bool in_io;                          /* inside mem_recv / session_send */
    bool goaway;                         /* no new streams */
    bool dead;                           /* free at the next kick */
    bool counted;                        /* counted in ctx->tunnels_live */
    bool features_base64;                /* Osaurus: the client asked for base64 bodies */
    struct gw_osr *osr;                  /* Osaurus mode state, owned; NULL if native */

    uint64_t ctl_window_ms;              /* control-frame rate limit window */
    unsigned ctl_count;
};

static void tun_close(struct gw_tun *t, int code, const char *reason);
static void tun_send_h2(struct gw_tun *t);
static void tun_kick(struct gw_tun *t);

struct gw_tun *gw_tun_agent_tun(const struct gw_tun_agent *a)
{
    return a->tun;
}

struct gw_ctx *gw_tun_ctx(const struct gw_tun *t)
{
    return t->ctx;
}

uint64_t gw_tun_id(const struct gw_tun *t)
{
    return t->id;
}

int gw_tun_send_text(struct gw_tun *t, const char *data, size_t len)
{
    return ws_send_text(t->ws, data, len);
}

bool gw_tun_wants_base64(const struct gw_tun *t)
{
    return t->features_base64;
}

struct gw_osr *gw_tun_osr(const struct gw_tun *t)
{
    return t->osr;
}

void gw_tun_set_osr(struct gw_tun *t, struct gw_osr *osr)
{
    t->osr = osr;
}

void gw_tun_close(struct gw_tun *t, int code, const char *reason)
{
    tun_close(t, code, reason);
}

size_t gw_tun_agent_count(const struct gw_tun *t)
{
    return t->nagents;
}

uint64_t gw_tun_agent_resp_timeout_ms(const struct gw_tun *t, const uint8_t *addr)
{
    for (const struct gw_tun_agent *a = t->agents; a != NULL; a = a->next) {
        if (memcmp(a->addr, addr, ID_ADDR_LEN) == 0)
            return a->resp_timeout_ms;
    }
    return 0;
}

/* ---- control messages (encoded by tun_msg) ---- */

static void tun_send_msg(struct gw_tun *t, const struct tun_msg *m)
{
    size_t len;
    char *s = tun_msg_encode(m, &len);

    if (s != NULL) {
        ws_send_text(t->ws, s, len);
        free(s);
    }
}

static int tun_new_nonce(struct gw_tun *t)
{
    uint8_t raw[32];

    if (util_rand_bytes(raw, sizeof(raw)) != 0)
        return -1;
    util_hex_encode(raw, sizeof(raw), t->nonce);
    t->nonce_expiry_ms = util_mono_ms() + TUN_NONCE_TTL_S * 1000u;
    return 0;
}

static void tun_send_challenge(struct gw_tun *t)
{
    struct tun_msg m;

    if (tun_new_nonce(t) != 0) {
        tun_close(t, WS_CLOSE_INTERNAL, "rng");
        return;
    }
    tun_msg_init(&m, TUN_MSG_CHALLENGE, t->mode);
    memcpy(m.challenge.nonce, t->nonce, sizeof(m.challenge.nonce));
    m.challenge.expires_in_s = TUN_NONCE_TTL_S;
    tun_send_msg(t, &m);
}

/* Consumes the outstanding nonce if it matches and is fresh. */
static bool tun_take_nonce(struct gw_tun *t, const char *nonce)
{
    bool ok = t->nonce[0] != '\0' && strlen(nonce) == TUN_NONCE_HEX_LEN &&
              CRYPTO_memcmp(nonce, t->nonce, TUN_NONCE_HEX_LEN) == 0 &&
              util_mono_ms() <= t->nonce_expiry_ms;

    t->nonce[0] = '\0';
    return ok;
}

static void tun_auth_error(struct gw_tun *t, enum tun_err e)
{
    struct tun_msg m;
    enum tun_err sent = tun_err_for_mode(e, t->mode, TUN_MSG_AUTH);
    int code;

    if (sent == TUN_E_NONE)
        sent = e;
    t->ctx->n.auth_failures++;
    tun_msg_init(&m, TUN_MSG_AUTH_ERROR, t->mode);
    m.error.err = sent;
    tun_send_msg(t, &m);
    LOG_INFO(t->ctx->log, "auth_failed", LOG_U("tun", t->id), LOG_S("peer", t->peer_ip),
             LOG_S("err", tun_err_code(sent)));
    code = tun_err_close_code(sent);
    tun_close(t, code != 0 ? code : 4000, tun_err_code(sent));
}

static void tun_send_error(struct gw_tun *t, enum tun_err e, enum tun_msg_type in_reply_to,
                           const uint8_t *addr)
{
    struct tun_msg m;
    enum tun_err sent = tun_err_for_mode(e, t->mode, in_reply_to);

    if (sent == TUN_E_NONE)
        return; /* this mode stays silent */
    tun_msg_init(&m, TUN_MSG_ERROR, t->mode);
    m.error.err = sent;
    if (addr != NULL) {
        m.error.has_addr = true;
        memcpy(m.error.addr, addr, ID_ADDR_LEN);
    }
    tun_send_msg(t, &m);
}

static void tun_send_agent_removed(struct gw_tun *t, const uint8_t *addr, enum tun_reason reason)
{
    struct tun_msg m;

    tun_msg_init(&m, TUN_MSG_AGENT_REMOVED, t->mode);
    memcpy(m.agent_removed.addr, addr, ID_ADDR_LEN);
    m.agent_removed.reason = reason;
    tun_send_msg(t, &m);
}

static void agent_url(const struct gw_tun *t, const char *addr, char *out, size_t size)
{
    const struct gw_cfg *cfg = t->ctx->cfg;

    if (cfg->public_url.text != NULL) {
        if (cfg->public_url.port != 0)
            util_snprintf(out, size, "%s://%s.%s:%u", cfg->public_url.https ? "https" : "http",
                          addr, cfg->public_url.host, cfg->public_url.port);
        else
            util_snprintf(out, size, "%s://%s.%s", cfg->public_url.https ? "https" : "http",
                          addr, cfg->public_url.host);
        return;
    }
    uint16_t port = cfg->listen.port;
    if (t->ctx->lsn_main != NULL)
        port = gw_lsn_port(t->ctx->lsn_main);
    bool https = !cfg->no_tls;
    if ((https && port == 443) || (!https && port == 80))
        util_snprintf(out, size, "%s://%s.%s", https ? "https" : "http", addr, cfg->domain);
    else
        util_snprintf(out, size, "%s://%s.%s:%u", https ? "https" : "http", addr, cfg->domain,
                      port);
}

/* ---- agents and registration ---- */

static void agent_unlink_free(struct gw_tun *t, struct gw_tun_agent *a)
{
    struct gw_tun_agent **pp = &t->agents;

    while (*pp != NULL && *pp != a)
        pp = &(*pp)->next;
    if (*pp == a) {
        *pp = a->next;
        t->nagents--;
    }
    gw_reg_remove(t->ctx->reg, a->addr, a);
    free(a);
}

static struct gw_tun_agent *tun_find_agent(const struct gw_tun *t, const uint8_t *addr)
{
    for (struct gw_tun_agent *a = t->agents; a != NULL; a = a->next) {
        if (memcmp(a->addr, addr, ID_ADDR_LEN) == 0)
            return a;
    }
    return NULL;
}

/* A tunnel that lost its last agent to another has nothing left to serve:
 * native tunnels finish their streams first (GOAWAY), Osaurus ones close. */
static void tun_retire_if_empty(struct gw_tun *t)
{
    if (t->nagents > 0 || t->state != GW_TUN_ST_LIVE)
        return;
    if (t->mode == TUN_MODE_NATIVE && t->h2 != NULL) {
        if (!t->goaway) {
            t->goaway = true;
            nghttp2_submit_goaway(t->h2, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(t->h2), NGHTTP2_NO_ERROR,
                                  NULL, 0);
        }
        if (t->nstreams == 0)
            tun_close(t, WS_CLOSE_NORMAL, "no agents");
        else
            tun_kick(t);
        return;
    }
    /* Osaurus: close once its pending requests are answered */
    if (gw_osr_pending(t) == 0)
        tun_close(t, WS_CLOSE_NORMAL, "no agents");
    else
        gw_osr_drain_when_idle(t);
}

/* Registers addr on t; tells the tunnel that held it before. */
static int tun_register(struct gw_tun *t, const uint8_t *addr, uint64_t resp_timeout_s)
{
    struct gw_tun_agent *a = tun_find_agent(t, addr);
    struct gw_tun_agent *old;
    int oom;

    if (a == NULL) {
        a = calloc(1, sizeof(*a));
        if (a == NULL)
            return -1;
        a->tun = t;
        memcpy(a->addr, addr, ID_ADDR_LEN);
        id_addr_to_str(addr, a->addr_str);
        a->next = t->agents;
        t->agents = a;
        t->nagents++;
    }
    if (resp_timeout_s != 0) {
        uint64_t max = t->ctx->cfg->max_resp_header_timeout_s;
        a->resp_timeout_ms = (max != 0 && resp_timeout_s > max ? max : resp_timeout_s) * 1000u;
    }
    old = gw_reg_set(t->ctx->reg, addr, a, &oom);
    if (oom) {
        agent_unlink_free(t, a);
        return -1;
    }
    if (old != NULL && old != a) {
        struct gw_tun *ot = old->tun;
        bool same = t->instance[0] != '\0' && strcmp(ot->instance, t->instance) == 0;
        LOG_INFO(t->ctx->log, same ? "agent_replaced" : "agent_superseded",
                 LOG_S("addr", old->addr_str), LOG_U("old_tun", ot->id), LOG_U("tun", t->id));
        /* the registry already points at a: unlink old without touching it */
        struct gw_tun_agent **pp = &ot->agents;
        while (*pp != NULL && *pp != old)
            pp = &(*pp)->next;
        if (*pp == old) {
            *pp = old->next;
            ot->nagents--;
        }
        if (ot->state == GW_TUN_ST_LIVE)
            tun_send_agent_removed(ot, old->addr, same ? TUN_REASON_REPLACED
                                                       : TUN_REASON_SUPERSEDED);
        free(old);
        tun_retire_if_empty(ot);
    }
    return 0;
}

static bool addr_allowed(const struct gw_tun *t, const uint8_t *addr)
{
    if (t->ctx->allow != NULL)
        return gw_allow_has(t->ctx->allow, addr);
    return t->ctx->cfg->open_effective;
}

/* Verifies one agent entry: the signature over the mode's signed text. */
static enum tun_err check_agent(struct gw_tun *t, const char *addr_sent, const uint8_t *addr,
                                const char *sig, const char *nonce, int64_t ts)
{
    char text[TUN_SIGNED_TEXT_MAX];
    int n;

    if (t->mode == TUN_MODE_NATIVE)
        n = tun_msg_native_signed_text(text, sizeof(text), t->ctx->cfg->domain, addr, nonce, ts);
    else
        n = tun_msg_osaurus_signed_text(text, sizeof(text), addr_sent, nonce, ts);
    if (n < 0 || id_verify(text, (size_t)n, sig, strlen(sig), addr) != ID_OK)
        return TUN_E_SIGNATURE_VERIFICATION_FAILED;
    if (!addr_allowed(t, addr))
        return TUN_E_ADDRESS_NOT_ALLOWED;
    return TUN_E_NONE;
}

/* ---- streams (native) ---- */

static void tstream_unlink(struct gw_tun *t, struct tstream *s)
{
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        t->streams = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    t->nstreams--;
}

/* The stream no longer waits for its bytes to reach the client (it ended,
 * failed or was cancelled): give the agent back the connection window for
 * every byte still counted as in flight, or the tunnel's connection window
 * shrinks with each such stream until nothing moves. nghttp2 applies it to
 * the connection even when the stream is already closed. */
static void tstream_release_window(struct tstream *s)
{
    uint64_t n = s->delivered - s->returned;

    s->returned = s->delivered;
    if (n > 0 && s->tun->h2 != NULL) {
        nghttp2_session_consume(s->tun->h2, s->id, (size_t)n);
        tun_kick(s->tun);
    }
}

/* Ends s's request as a stream failure; e applies before the head. */
static void tstream_fail(struct tstream *s, enum herr e)
{
    struct gw_req *r = s->req;

    if (r == NULL)
        return;
    s->req = NULL;
    tstream_release_window(s);
    if (s->head_done)
        gw_req_end(r, false);
    else
        gw_req_fail(r, e);
}

static void tstream_free(struct gw_tun *t, struct tstream *s)
{
    tstream_unlink(t, s);
    gw_hdrs_cleanup(&s->resp_hdrs);
    free(s);
}

static void up_body_more(void *arg)
{
    struct tstream *s = arg;

    if (s->tun->h2 != NULL) {
        nghttp2_session_resume_data(s->tun->h2, s->id);
        tun_kick(s->tun);
    }
}

static void up_consumed(void *arg, size_t n)
{
    struct tstream *s = arg;

    s->returned += n;
    if (s->tun->h2 != NULL) {
        nghttp2_session_consume(s->tun->h2, s->id, n);
        tun_kick(s->tun);
    }
}

static void up_cancel(void *arg)
{
    struct tstream *s = arg;

    s->req = NULL;
    tstream_release_window(s);
    if (s->tun->h2 != NULL) {
        nghttp2_submit_rst_stream(s->tun->h2, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_CANCEL);
        tun_kick(s->tun);
    }
}

static const struct gw_up_ops tun_up_ops = {
    .body_more = up_body_more,
    .consumed = up_consumed,
    .cancel = up_cancel,
};

static ssize_t body_read_cb(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                            size_t length, uint32_t *flags, nghttp2_data_source *source,
                            void *user_data)
{
    struct tstream *s = source->ptr;
    struct gw_req *r = s->req;
    size_t have;

    if (r == NULL) /* cancelled; the RST is on its way */
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    have = evbuffer_get_length(r->body);
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

static int nv_push(nghttp2_nv *nv, size_t *n, const char *name, const char *value)
{
    nv[*n] = (nghttp2_nv){(uint8_t *)name, (uint8_t *)value, strlen(name), strlen(value),
                          NGHTTP2_NV_FLAG_NONE};
    (*n)++;
    return 0;
}

enum herr gw_tun_open_stream(struct gw_tun *t, struct gw_req *r)
{
    const struct gw_cfg *cfg = t->ctx->cfg;
    struct gw_tun_agent *a = tun_find_agent(t, r->addr);
    nghttp2_data_provider prd;
    nghttp2_nv *nv;
    size_t n = 0;
    struct tstream *s;
    char xff[600];
    int32_t id;

    if (t->state != GW_TUN_ST_LIVE || t->goaway || a == NULL)
        return HERR_AGENT_OFFLINE;
    if (t->mode != TUN_MODE_NATIVE)
        return gw_osr_open_stream(t, r);
    if (cfg->max_streams_per_tunnel != 0 && t->nstreams >= cfg->max_streams_per_tunnel)
        return HERR_HOST_BUSY;
    s = calloc(1, sizeof(*s));
    nv = calloc(r->hdrs.n + 10, sizeof(*nv));
    if (s == NULL || nv == NULL) {
        free(s);
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
        if (gw_hdr_is_gateway_set((const char *)r->hdrs.nv[i].name, r->hdrs.nv[i].namelen))
            continue;
        nv[n++] = r->hdrs.nv[i];
    }
    if (r->xff_chain[0] != '\0')
        util_snprintf(xff, sizeof(xff), "%s, %s", r->xff_chain, r->client_ip);
    else
        util_snprintf(xff, sizeof(xff), "%s", r->client_ip);
    nv_push(nv, &n, "x-forwarded-for", xff);
    nv_push(nv, &n, "x-forwarded-proto", r->fwd_proto);
    nv_push(nv, &n, "x-forwarded-host", r->fwd_host != NULL ? r->fwd_host : r->authority);
    nv_push(nv, &n, "x-agent-address", a->addr_str);
    prd.source.ptr = s;
    prd.read_callback = body_read_cb;
    s->tun = t;
    s->req = r;
    id = nghttp2_submit_request(t->h2, NULL, nv, n,
                                r->body_eof && evbuffer_get_length(r->body) == 0 ? NULL : &prd,
                                s);
    free(nv);
    if (id < 0) {
        free(s);
        return HERR_AGENT_OFFLINE;
    }
    s->id = id;
    s->next = t->streams;
    if (t->streams != NULL)
        t->streams->prev = s;
    t->streams = s;
    t->nstreams++;
    if (a->resp_timeout_ms > r->resp_timeout_ms)
        r->resp_timeout_ms = a->resp_timeout_ms;
    gw_req_attach(r, &tun_up_ops, s);
    tun_kick(t);
    return HERR_NONE;
}

/* ---- nghttp2 client callbacks ---- */

static ssize_t h2_on_send(nghttp2_session *session, const uint8_t *data, size_t len, int flags,
                          void *user_data)
{
    struct gw_tun *t = user_data;

    /* the WebSocket's output is full: resume from on_writable */
    if (!ws_is_writable(t->ws))
        return NGHTTP2_ERR_WOULDBLOCK;
    if (evbuffer_add(t->wsbuf, data, len) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    if (evbuffer_get_length(t->wsbuf) >= GW_TUN_FLUSH_BYTES &&
        ws_send_binary_buffer(t->ws, t->wsbuf, evbuffer_get_length(t->wsbuf)) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    return (ssize_t)len;
}

static int h2_on_send_data(nghttp2_session *session, nghttp2_frame *frame, const uint8_t *framehd,
                           size_t length, nghttp2_data_source *source, void *user_data)
{
    struct gw_tun *t = user_data;
    struct tstream *s = source->ptr;
    struct gw_req *r = s->req;

    if (!ws_is_writable(t->ws))
        return NGHTTP2_ERR_WOULDBLOCK;
    if (r == NULL)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    evbuffer_add(t->wsbuf, framehd, 9);
    if (evbuffer_remove_buffer(r->body, t->wsbuf, length) != (int)length)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    r->body_out += length;
    t->ctx->n.bytes_to_agents += length;
    if (evbuffer_get_length(t->wsbuf) >= GW_TUN_FLUSH_BYTES)
        ws_send_binary_buffer(t->ws, t->wsbuf, evbuffer_get_length(t->wsbuf));
    r->fe->body_drained(r);
    return 0;
}

static int h2_on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *user_data)
{
    struct tstream *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);

    if (s == NULL || frame->hd.type != NGHTTP2_HEADERS || s->head_done)
        return 0; /* trailers are not relayed */
    if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
        uint64_t st;
        if (util_parse_u64((const char *)value, valuelen, &st) == 0 && st >= 100 && st <= 999)
            s->status = (int)st;
        return 0;
    }
    if (namelen > 0 && name[0] == ':')
        return 0;
    if (gw_hdr_is_hop_by_hop((const char *)name, namelen))
        return 0;
    if (gw_hdrs_add(&s->resp_hdrs, (const char *)name, namelen, (const char *)value, valuelen,
                    0) != 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

static int h2_on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                            void *user_data)
{
    struct gw_tun *t = user_data;
    struct tstream *s;
    bool end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;

    if (frame->hd.type == NGHTTP2_GOAWAY) {
        /* the agent is going away: no new streams here */
        t->goaway = true;
        return 0;
    }
    s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (s == NULL)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && !s->head_done) {
        if (s->status == 0) {
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_PROTOCOL_ERROR);
            tstream_fail(s, HERR_BAD_HOST_RESPONSE);
            return 0;
        }
        if (s->status < 200) { /* interim: wait for the final head */
            gw_hdrs_cleanup(&s->resp_hdrs);
            s->status = 0;
            return 0;
        }
        s->head_done = true;
        if (s->req != NULL &&
            gw_req_head(s->req, s->status, s->resp_hdrs.nv, s->resp_hdrs.n) != 0) {
            struct gw_req *r = s->req;
            s->req = NULL;
            tstream_release_window(s);
            gw_req_detach(r);
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_CANCEL);
        }
        gw_hdrs_cleanup(&s->resp_hdrs);
    }
    if (end && s->req != NULL && s->head_done) {
        struct gw_req *r = s->req;
        s->req = NULL;
        tstream_release_window(s);
        gw_req_end(r, true);
    }
    return 0;
}

static int h2_on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                            const uint8_t *data, size_t len, void *user_data)
{
    struct gw_tun *t = user_data;
    struct tstream *s = nghttp2_session_get_stream_user_data(session, stream_id);

    if (s == NULL || s->req == NULL) {
        nghttp2_session_consume(session, stream_id, len);
        return 0;
    }
    t->ctx->n.bytes_from_agents += len;
    s->delivered += len;
    if (gw_req_body(s->req, data, len) != 0) {
        struct gw_req *r = s->req;
        s->req = NULL;
        tstream_release_window(s);
        gw_req_detach(r);
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_CANCEL);
    }
    return 0;
}

static int h2_on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                              void *user_data)
{
    struct gw_tun *t = user_data;
    struct tstream *s = nghttp2_session_get_stream_user_data(session, stream_id);

    if (s == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(session, stream_id, NULL);
    tstream_fail(s, error_code == NGHTTP2_REFUSED_STREAM ? HERR_AGENT_OFFLINE
                                                         : HERR_LOCAL_UNREACHABLE);
    tstream_free(t, s);
    if (t->nagents == 0 && t->nstreams == 0 && t->goaway)
        tun_close(t, WS_CLOSE_NORMAL, "no agents");
    return 0;
}

static int tun_h2_start(struct gw_tun *t)
{
    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, GW_TUN_STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 256 * 1024},
    };
    int rv = -1;

    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return -1;
    if (nghttp2_option_new(&opt) != 0)
        goto out_cbs;
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_session_callbacks_set_send_callback(cbs, h2_on_send);
    nghttp2_session_callbacks_set_send_data_callback(cbs, h2_on_send_data);
    nghttp2_session_callbacks_set_on_header_callback(cbs, h2_on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, h2_on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, h2_on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, h2_on_stream_close);
    if (nghttp2_session_client_new2(&t->h2, cbs, t, opt) != 0)
        goto out_opt;
    nghttp2_submit_settings(t->h2, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0]));
    nghttp2_session_set_local_window_size(t->h2, NGHTTP2_FLAG_NONE, 0, GW_TUN_CONN_WINDOW);
    rv = 0;
out_opt:
    nghttp2_option_del(opt);
out_cbs:
    nghttp2_session_callbacks_del(cbs);
    return rv;
}

/* Runs nghttp2_session_send and frames what it produced. */
static void tun_send_h2(struct gw_tun *t)
{
    if (t->h2 == NULL || t->in_io || t->state == GW_TUN_ST_CLOSING)
        return;
    t->in_io = true;
    int rv = nghttp2_session_send(t->h2);
    t->in_io = false;
    if (evbuffer_get_length(t->wsbuf) > 0)
        ws_send_binary_buffer(t->ws, t->wsbuf, evbuffer_get_length(t->wsbuf));
    if (rv != 0) {
        LOG_WARN(t->ctx->log, "tunnel_h2_error", LOG_U("tun", t->id),
                 LOG_S("err", nghttp2_strerror(rv)));
        tun_close(t, WS_CLOSE_PROTOCOL_ERROR, "h2 error");
    }
}

/* ---- authentication and control messages ---- */

static void tun_go_live(struct gw_tun *t, const struct tun_msg *ok)
{
    t->state = GW_TUN_ST_LIVE;
    evtimer_del(t->auth_timer);
    t->ctx->tunnels_live++;
    t->counted = true;
    tun_send_msg(t, ok);
    if (t->mode == TUN_MODE_NATIVE) {
        if (tun_h2_start(t) != 0) {
            tun_close(t, WS_CLOSE_INTERNAL, "out of memory");
            return;
        }
        tun_send_h2(t);
    } else if (gw_osr_start(t) != 0) {
        tun_close(t, WS_CLOSE_INTERNAL, "out of memory");
        return;
    }
    if (t->ctx->cfg->ping_interval_s != 0) {
        struct timeval tv = {(time_t)t->ctx->cfg->ping_interval_s, 0};
        evtimer_add(t->ping_timer, &tv);
    }
    LOG_INFO(t->ctx->log, "tunnel_up", LOG_U("tun", t->id), LOG_S("peer", t->peer_ip),
             LOG_S("mode", t->mode == TUN_MODE_NATIVE ? "native" : "osaurus"),
             LOG_U("agents", t->nagents), LOG_S("instance", t->instance));
}

static bool ts_fresh(int64_t ts)
{
    int64_t now = util_unix_time();

    return ts <= now + TUN_TS_WINDOW_S && ts >= now - TUN_TS_WINDOW_S;
}

static void tun_on_auth(struct gw_tun *t, const char *data, size_t len)
{
    struct tun_msg m; /* ~20 KiB each: fixed agent arrays */
    struct tun_msg ok;
    enum tun_err errs[TUN_MAX_AGENTS];
    enum tun_err first_err = TUN_E_NONE;
    size_t accepted = 0;
    int rv;

    rv = tun_msg_decode_auth(data, len, t->mode, &m, NULL);
    if (rv != 0) {
        tun_auth_error(t, (enum tun_err)rv);
        return;
    }
    if (t->ctx->cfg->max_agents_per_tunnel != 0 &&
        m.auth.n_agents > t->ctx->cfg->max_agents_per_tunnel) {
        tun_msg_clear(&m);
        tun_auth_error(t, TUN_E_TOO_MANY_AGENTS);
        return;
    }
    if (!tun_take_nonce(t, m.auth.nonce)) {
        tun_msg_clear(&m);
        tun_auth_error(t, TUN_E_INVALID_NONCE);
        return;
    }
    if (!ts_fresh(m.auth.timestamp)) {
        tun_msg_clear(&m);
        tun_auth_error(t, TUN_E_TIMESTAMP_OUT_OF_RANGE);
        return;
    }
    util_snprintf(t->instance, sizeof(t->instance), "%s", m.auth.instance);
    t->features_base64 = (m.auth.features & TUN_FEAT_BASE64) != 0;
    /* check every entry before registering any (Osaurus: all or nothing) */
    for (size_t i = 0; i < m.auth.n_agents; i++) {
        const struct tun_msg_agent_auth *a = &m.auth.agents[i];
        errs[i] = check_agent(t, a->addr_str, a->addr, a->sig, m.auth.nonce, m.auth.timestamp);
        if (errs[i] != TUN_E_NONE && first_err == TUN_E_NONE)
            first_err = errs[i];
        if (errs[i] == TUN_E_NONE)
            accepted++;
    }
    if (accepted == 0 || (t->mode == TUN_MODE_OSAURUS && first_err != TUN_E_NONE)) {
        tun_msg_clear(&m);
        tun_auth_error(t, first_err);
        return;
    }
    tun_msg_init(&ok, TUN_MSG_AUTH_OK, t->mode);
    for (size_t i = 0; i < m.auth.n_agents; i++) {
        const struct tun_msg_agent_auth *a = &m.auth.agents[i];
        char lower[ID_ADDR_STR_LEN + 1];
        id_addr_to_str(a->addr, lower);
        if (errs[i] != TUN_E_NONE) {
            struct tun_msg_rejected *rj = &ok.auth_ok.rejected[ok.auth_ok.n_rejected++];
            memcpy(rj->addr, a->addr, ID_ADDR_LEN);
            rj->err = errs[i];
            LOG_INFO(t->ctx->log, "agent_rejected", LOG_U("tun", t->id), LOG_S("addr", lower),
                     LOG_S("err", tun_err_code(errs[i])));
            continue;
        }
        if (tun_find_agent(t, a->addr) != NULL)
            continue; /* listed twice: counts once */
        if (tun_register(t, a->addr, a->response_timeout_s) != 0) {
            tun_msg_clear(&m);
            tun_close(t, WS_CLOSE_INTERNAL, "out of memory");
            return;
        }
        struct tun_msg_agent_url *u = &ok.auth_ok.agents[ok.auth_ok.n_agents++];
        memcpy(u->addr, a->addr, ID_ADDR_LEN);
        agent_url(t, lower, u->url, sizeof(u->url));
        LOG_INFO(t->ctx->log, "agent_registered", LOG_U("tun", t->id), LOG_S("addr", lower));
    }
    util_snprintf(ok.auth_ok.region, sizeof(ok.auth_ok.region), "%s", t->ctx->cfg->region);
    if (t->mode == TUN_MODE_NATIVE)
        ok.auth_ok.ping_interval_s = (uint32_t)t->ctx->cfg->ping_interval_s;
    tun_msg_clear(&m);
    tun_go_live(t, &ok);
}

static void tun_on_add_agent(struct gw_tun *t, const struct tun_msg_add_agent *add)
{
    const struct tun_msg_agent_auth *a = &add->agent;
    struct tun_msg m;
    enum tun_err e;
    char lower[ID_ADDR_STR_LEN + 1];

    id_addr_to_str(a->addr, lower);
    if (t->ctx->draining) {
        /* no routes onto a tunnel that is going away */
        tun_send_error(t, TUN_E_RELAY_RESTARTING, TUN_MSG_ADD_AGENT, a->addr);
        return;
    }
    if (!tun_take_nonce(t, add->nonce)) {
        tun_send_error(t, TUN_E_INVALID_NONCE, TUN_MSG_ADD_AGENT, a->addr);
        return;
    }
    if (!ts_fresh(add->timestamp)) {
        tun_send_error(t, TUN_E_TIMESTAMP_OUT_OF_RANGE, TUN_MSG_ADD_AGENT, a->addr);
        return;
    }
    e = check_agent(t, a->addr_str, a->addr, a->sig, add->nonce, add->timestamp);
    if (e == TUN_E_NONE && tun_find_agent(t, a->addr) == NULL &&
        t->ctx->cfg->max_agents_per_tunnel != 0 && t->nagents >= t->ctx->cfg->max_agents_per_tunnel)
        e = TUN_E_MAX_AGENTS_REACHED;
    if (e != TUN_E_NONE) {
        tun_send_error(t, e, TUN_MSG_ADD_AGENT, a->addr);
        return;
    }
    if (tun_register(t, a->addr, a->response_timeout_s) != 0) {
        tun_close(t, WS_CLOSE_INTERNAL, "out of memory");
        return;
    }
    tun_msg_init(&m, TUN_MSG_AGENT_ADDED, t->mode);
    memcpy(m.agent_added.addr, a->addr, ID_ADDR_LEN);
    agent_url(t, lower, m.agent_added.url, sizeof(m.agent_added.url));
    util_snprintf(m.agent_added.region, sizeof(m.agent_added.region), "%s", t->ctx->cfg->region);
    tun_send_msg(t, &m);
    LOG_INFO(t->ctx->log, "agent_registered", LOG_U("tun", t->id), LOG_S("addr", lower));
}

/* Control frames after auth, rate-limited per connection; Osaurus data
 * frames go to gw_osr. */
static void tun_on_control(struct gw_tun *t, const char *data, size_t len)
{
    struct tun_msg m;
    uint64_t now = util_mono_ms();
    unsigned limit = t->mode == TUN_MODE_NATIVE ? TUN_CTL_RATE_NATIVE : TUN_CTL_RATE_OSAURUS;
    int rv = tun_msg_decode(data, len, t->mode, &m, NULL);

    if (rv != 0) {
        if (t->mode == TUN_MODE_OSAURUS && gw_osr_on_bad_frame(t, &m, (enum tun_err)rv))
            return;
        tun_send_error(t, (enum tun_err)rv, m.type, NULL);
        return;
    }
    switch (m.type) {
    case TUN_MSG_PING:
    case TUN_MSG_PONG:
    case TUN_MSG_RESPONSE:
    case TUN_MSG_STREAM_START:
    case TUN_MSG_STREAM_CHUNK:
    case TUN_MSG_STREAM_END:
        if (t->mode == TUN_MODE_OSAURUS)
            gw_osr_on_frame(t, &m);
        tun_msg_clear(&m);
        return;
    default:
        break;
    }
    if (now - t->ctl_window_ms >= 60000) {
        t->ctl_window_ms = now;
        t->ctl_count = 0;
    }
    if (++t->ctl_count > limit) {
        tun_send_error(t, TUN_E_RATE_LIMITED, m.type, NULL);
        tun_msg_clear(&m);
        return;
    }
    switch (m.type) {
    case TUN_MSG_REQUEST_CHALLENGE:
        tun_send_challenge(t);
        break;
    case TUN_MSG_ADD_AGENT:
        tun_on_add_agent(t, &m.add_agent);
        break;
    case TUN_MSG_REMOVE_AGENT: {
        struct gw_tun_agent *a = tun_find_agent(t, m.remove_agent.addr);
        if (a != NULL) {
            uint8_t addr[ID_ADDR_LEN];
            memcpy(addr, a->addr, sizeof(addr));
            LOG_INFO(t->ctx->log, "agent_unregistered", LOG_U("tun", t->id),
                     LOG_S("addr", a->addr_str), LOG_S("reason", "removed"));
            agent_unlink_free(t, a);
            tun_send_agent_removed(t, addr, t->mode == TUN_MODE_NATIVE ? TUN_REASON_REMOVED
                                                                       : TUN_REASON_NONE);
        }
        break;
    }
    default:
        tun_send_error(t, TUN_E_UNEXPECTED_MESSAGE, m.type, NULL);
        break;
    }
    tun_msg_clear(&m);
}

/* ---- WebSocket callbacks, timers, lifecycle ---- */

static void tun_on_text(void *arg, const char *data, size_t len)
{
    struct gw_tun *t = arg;

    if (t->state == GW_TUN_ST_AUTH)
        tun_on_auth(t, data, len);
    else if (t->state == GW_TUN_ST_LIVE)
        tun_on_control(t, data, len);
}

static int tun_on_binary(void *arg, const uint8_t *data, size_t len)
{
    struct gw_tun *t = arg;
    ssize_t n;

    if (t->mode != TUN_MODE_NATIVE)
        return 0; /* Osaurus: binary frames are ignored */
    if (t->state != GW_TUN_ST_LIVE || t->h2 == NULL) {
        tun_close(t, WS_CLOSE_PROTOCOL_ERROR, "binary before auth");
        return 0;
    }
    t->in_io = true;
    n = nghttp2_session_mem_recv(t->h2, data, len);
    t->in_io = false;
    if (n < 0) {
        LOG_WARN(t->ctx->log, "tunnel_h2_error", LOG_U("tun", t->id),
                 LOG_S("err", nghttp2_strerror((int)n)));
        tun_close(t, WS_CLOSE_PROTOCOL_ERROR, "h2 error");
        return 0;
    }
    tun_kick(t);
    return 0;
}

static void tun_free(struct gw_tun *t);

static void tun_on_close(void *arg, int code, const char *reason)
{
    struct gw_tun *t = arg;

    if (t->state != GW_TUN_ST_CLOSING)
        tun_close(t, code, reason);
    t->dead = true;
    tun_kick(t);
}

static void tun_on_writable(void *arg)
{
    struct gw_tun *t = arg;

    tun_send_h2(t);
}

static const struct ws_callbacks tun_ws_cbs = {
    .on_text = tun_on_text,
    .on_binary = tun_on_binary,
    .on_close = tun_on_close,
    .on_writable = tun_on_writable,
};

/* Runs tun_on_kick after every callback already queued in this pass of the
 * loop, however often it is kicked: an active kick moves to the end of the
 * queue. A front end that reads a client's body one TLS record per callback
 * queues its next read before it kicks (h1_on_read), so the tunnel sends
 * what the whole read brought in one message, not one per record. */
static void tun_kick(struct gw_tun *t)
{
    event_del(t->kick);
    event_active(t->kick, EV_TIMEOUT, 0);
}

static void tun_on_kick(evutil_socket_t fd, short what, void *arg)
{
    struct gw_tun *t = arg;

    if (t->dead) {
        tun_free(t);
        return;
    }
    tun_send_h2(t);
    if (t->dead)
        tun_free(t);
}

static void tun_on_auth_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct gw_tun *t = arg;

    if (t->state == GW_TUN_ST_AUTH)
        tun_auth_error(t, TUN_E_AUTH_TIMEOUT);
}

static void tun_on_ping(evutil_socket_t fd, short what, void *arg)
{
    struct gw_tun *t = arg;
    uint64_t interval_ms = t->ctx->cfg->ping_interval_s * 1000u;
    struct timeval tv = {(time_t)t->ctx->cfg->ping_interval_s, 0};

    if (t->state != GW_TUN_ST_LIVE)
        return;
    if (util_mono_ms() - ws_last_rx_ms(t->ws) > 3 * interval_ms) {
        LOG_INFO(t->ctx->log, "tunnel_silent", LOG_U("tun", t->id),
                 LOG_U("silent_ms", util_mono_ms() - ws_last_rx_ms(t->ws)));
        tun_close(t, WS_CLOSE_GOING_AWAY, "keepalive timeout");
        return;
    }
    if (t->mode == TUN_MODE_NATIVE && t->h2 != NULL) {
        nghttp2_submit_ping(t->h2, NGHTTP2_FLAG_NONE, NULL);
        tun_kick(t);
    } else {
        gw_osr_ping(t);
        ws_ping(t->ws);
    }
    evtimer_add(t->ping_timer, &tv);
}

/* Starts closing: routes go at once, streams fail, the close frame goes out;
 * the tunnel is freed once ws reports on_close. */
static void tun_close(struct gw_tun *t, int code, const char *reason)
{
    if (t->state == GW_TUN_ST_CLOSING)
        return;
    if (t->state == GW_TUN_ST_LIVE)
        LOG_INFO(t->ctx->log, "tunnel_down", LOG_U("tun", t->id), LOG_S("peer", t->peer_ip),
                 LOG_I("code", code), LOG_S("reason", reason));
    t->state = GW_TUN_ST_CLOSING;
    while (t->agents != NULL)
        agent_unlink_free(t, t->agents);
    for (struct tstream *s = t->streams; s != NULL; s = s->next)
        tstream_fail(s, HERR_TUNNEL_CLOSED);
    gw_osr_fail_all(t);
    if (t->counted) {
        t->ctx->tunnels_live--;
        t->counted = false;
    }
    evtimer_del(t->auth_timer);
    evtimer_del(t->ping_timer);
    if (code < 1000 || code == WS_CLOSE_ABNORMAL || code == WS_CLOSE_NO_STATUS)
        code = WS_CLOSE_GOING_AWAY;
    ws_close(t->ws, code, reason);
}

static void tun_free(struct gw_tun *t)
{
    if (t->state != GW_TUN_ST_CLOSING)
        tun_close(t, WS_CLOSE_GOING_AWAY, "shutdown");
    while (t->streams != NULL) {
        if (t->h2 != NULL)
            nghttp2_session_set_stream_user_data(t->h2, t->streams->id, NULL);
        tstream_free(t, t->streams);
    }
    gw_osr_free_all(t);
    nghttp2_session_del(t->h2);
    if (t->prev != NULL)
        t->prev->next = t->next;
    else
        t->ctx->tuns = t->next;
    if (t->next != NULL)
        t->next->prev = t->prev;
    gw_ipt_tunnel_release(t->ctx->ipt, (struct sockaddr *)&t->peer);
    ws_free(t->ws);
    evbuffer_free(t->wsbuf);
    event_free(t->kick);
    event_free(t->ping_timer);
    event_free(t->auth_timer);
    free(t);
}

int gw_tun_accept(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                  const char *ws_accept, enum tun_mode mode, uint64_t conn_id,
                  const char *client_ip)
{
    struct gw_tun *t;
    struct evbuffer *out = bufferevent_get_output(bev);
    struct timeval tv = {TUN_AUTH_TIMEOUT_S, 0};

    t = calloc(1, sizeof(*t));
    if (t == NULL)
        goto fail_bev;
    t->wsbuf = evbuffer_new();
    t->kick = event_new(ctx->base, -1, 0, tun_on_kick, t);
    t->ping_timer = evtimer_new(ctx->base, tun_on_ping, t);
    t->auth_timer = evtimer_new(ctx->base, tun_on_auth_timeout, t);
    if (t->wsbuf == NULL || t->kick == NULL || t->ping_timer == NULL || t->auth_timer == NULL)
        goto fail_t;
    t->ctx = ctx;
    t->id = conn_id;
    t->mode = mode;
    memcpy(&t->peer, peer,
           peer->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    util_snprintf(t->peer_ip, sizeof(t->peer_ip), "%s", client_ip);
    evbuffer_add_printf(out,
                        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                        "connection: Upgrade\r\nsec-websocket-accept: %s\r\n%s\r\n",
                        ws_accept,
                        mode == TUN_MODE_NATIVE ? "sec-websocket-protocol: " TUN_SUBPROTOCOL "\r\n"
                                                : "");
    /* Osaurus bodies travel in text messages; native control messages are small */
    t->ws = ws_conn_new(ctx->base, bev, false,
                        mode == TUN_MODE_NATIVE ? TUN_CTL_MAX_BYTES : TUN_OSR_MAX_FRAME_BYTES,
                        &tun_ws_cbs, t);
    bev = NULL; /* owned by ws now, also on failure */
    if (t->ws == NULL)
        goto fail_t;
    t->next = ctx->tuns;
    if (ctx->tuns != NULL)
        ctx->tuns->prev = t;
    ctx->tuns = t;
    ctx->n.tunnel_connections++;
    evtimer_add(t->auth_timer, &tv);
    LOG_DEBUG(ctx->log, "tunnel_open", LOG_U("tun", t->id), LOG_S("peer", t->peer_ip),
              LOG_S("mode", mode == TUN_MODE_NATIVE ? "native" : "osaurus"));
    tun_send_challenge(t);
    return 0;

fail_t:
    if (t->wsbuf != NULL)
        evbuffer_free(t->wsbuf);
    if (t->kick != NULL)
        event_free(t->kick);
    if (t->ping_timer != NULL)
        event_free(t->ping_timer);
    if (t->auth_timer != NULL)
        event_free(t->auth_timer);
    free(t);
fail_bev:
    gw_ipt_tunnel_release(ctx->ipt, peer);
    if (bev != NULL)
        bufferevent_free(bev);
    return -1;
}

void gw_tun_drain_all(struct gw_ctx *ctx)
{
    for (struct gw_tun *t = ctx->tuns; t != NULL; t = t->next) {
        if (t->state == GW_TUN_ST_AUTH) {
            tun_close(t, WS_CLOSE_RESTART, "draining");
            continue;
        }
        if (t->state != GW_TUN_ST_LIVE)
            continue;
        while (t->agents != NULL)
            agent_unlink_free(t, t->agents);
        if (t->mode == TUN_MODE_NATIVE) {
            struct tun_msg m;
            tun_msg_init(&m, TUN_MSG_DRAINING, t->mode);
            m.draining.grace_s = (uint32_t)ctx->cfg->drain_timeout_s;
            tun_send_msg(t, &m);
            t->goaway = true;
            nghttp2_submit_goaway(t->h2, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(t->h2), NGHTTP2_NO_ERROR,
                                  NULL, 0);
            if (t->nstreams == 0)
                tun_close(t, WS_CLOSE_RESTART, "draining");
            else
                tun_kick(t);
        } else {
            gw_osr_drain(t);
        }
    }
}

size_t gw_tun_streams_total(const struct gw_ctx *ctx)
{
    size_t n = 0;

    for (const struct gw_tun *t = ctx->tuns; t != NULL; t = t->next)
        n += t->nstreams + gw_osr_pending(t);
    return n;
}

void gw_tun_apply_allow(struct gw_ctx *ctx)
{
    for (struct gw_tun *t = ctx->tuns; t != NULL; t = t->next) {
        if (t->state != GW_TUN_ST_LIVE)
            continue;
        struct gw_tun_agent *a = t->agents;
        while (a != NULL) {
            struct gw_tun_agent *next = a->next;
            if (!addr_allowed(t, a->addr)) {
                uint8_t addr[ID_ADDR_LEN];
                memcpy(addr, a->addr, sizeof(addr));
                LOG_INFO(ctx->log, "agent_unregistered", LOG_U("tun", t->id),
                         LOG_S("addr", a->addr_str), LOG_S("reason", "not_allowed"));
                agent_unlink_free(t, a);
                tun_send_agent_removed(t, addr, TUN_REASON_NOT_ALLOWED);
            }
            a = next;
        }
        tun_retire_if_empty(t);
    }
}

void gw_tun_free_all(struct gw_ctx *ctx)
{
    while (ctx->tuns != NULL)
        tun_free(ctx->tuns);
}
