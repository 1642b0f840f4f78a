/* The agent's tunnel (ag_tun.h). Phases: DIAL (ag_net), UPGRADE (TLS
 * handshake and the 101 on a bufferevent), AUTH (WebSocket up: challenge,
 * auth, auth_ok), UP (native: HTTP/2 server over the binary messages;
 * Osaurus mode: ag_osr over the text messages), DRAINING (no new streams,
 * closes when the last stream ends). The two modes share everything up to
 * auth_ok and the registrations; t->h2 or t->osr holds the data path. One 1-second tick drives
 * the phase deadline, PINGs, the keepalive check and delayed add retries.
 *
 * Re-entrancy: nghttp2 calls are made only from loop entry points (WebSocket
 * callbacks, timers, the flush event). ag_fwd callbacks and the owner's
 * ag_tun_* calls only queue frames and activate the flush event, so a stream
 * is never freed while its forwarder is on the stack (STYLE.md 3.4).
 *
 * Reports go to the owner through t->cb, only from those entry points. The
 * end is tun_down(): it marks the tunnel dead, stops its timer, dial and
 * reads, then reports on_down. The owner frees the tunnel later from the
 * loop, so the code after a tun_down() call still runs on a live struct;
 * every entry point returns at once on a dead tunnel. */
#include "ag_tun.h"

#include <assert.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/x509.h>

#include "ag_agt.h"
#include "ag_ctx.h"
#include "ag_fwd.h"
#include "ag_net.h"
#include "ag_osr.h"
#include "ag_pxy.h"
#include "herr.h"
#include "id.h"
#include "list.h"
#include "log.h"
#include "tls.h"
#include "tun_msg.h"
#include "util.h"
#include "ws.h"

#define TUN_DIAL_TIMEOUT_MS 10000u
#define TUN_AUTH_TIMEOUT_MS 20000u  /* dial to auth_ok */
#define TUN_MSG_CHUNK (64u * 1024u) /* binary message size */
#define TUN_MAX_STREAMS 1024
#define TUN_STREAM_WINDOW (1u << 20) /* 1 MiB per stream */
#define TUN_CONN_WINDOW (64u << 20)  /* 64 MiB per connection */
#define TUN_RESP_HIGH (1u << 20)     /* pause the local API above this */
#define TUN_RESP_LOW (256u * 1024u)  /* resume below this */
#define TUN_ADD_RETRY_MS 5000u
#define TUN_DEFAULT_PING_S 20u
#define TUN_HOLD_MAX_MS 30000u /* a draining tunnel kept for new streams, at most */
#define TUN_IO_MAX (256u * 1024u) /* bytes per socket read / write call */
/* A request's header list as decoded, counted as fields arrive (RFC 7541 4.1
 * sizes: name + value + 32 each), so that a few bytes of HPACK references to
 * one large table entry cannot expand into a huge head for the local API.
 * Past either limit the rest of the list is dropped unstored and the stream
 * is answered 431 header_too_large. Advertised as SETTINGS_MAX_HEADER_LIST_SIZE. */
#define TUN_MAX_HEADER_LIST (256u * 1024u)
#define TUN_MAX_HEADER_FIELDS 4096u

enum tun_state {
    TUN_ST_DIAL = 0,
    TUN_ST_UPGRADE,
    TUN_ST_AUTH,
    TUN_ST_UP,
    TUN_ST_DRAINING,
    TUN_ST_CLOSING,
};

enum reg_pending {
    REG_NONE = 0,
    REG_IN_AUTH,  /* listed in the auth message, awaiting auth_ok */
    REG_WANT_ADD, /* needs a challenge for add_agent */
    REG_ADDING,   /* add_agent sent */
};

/* One address on this tunnel. */
struct tun_reg {
    char addr[ID_ADDR_STR_LEN + 1];
    bool active; /* accepted by the gateway: streams are served */
    enum reg_pending pending;
    uint64_t retry_at_ms; /* REG_WANT_ADD not before (mono ms) */
};

struct tun_hdr {
    nghttp2_rcbuf *name;
    nghttp2_rcbuf *value;
};

/* One request stream. nghttp2 owns the stream; this is freed in
 * on_stream_close (or with the tunnel). */
struct tun_stream {
    struct ag_tun *t;
    struct list link; /* t->streams */
    int32_t id;
    uint64_t log_id;
    struct ag_agt *agt; /* reference held once routed */
    bool counted;       /* counted in agt->inflight */
    bool is_probe;      /* our own probe: its bytes are not the agent's traffic */
    struct ag_fwd *fwd; /* local request, NULL when none or done */
    nghttp2_rcbuf *method, *path, *authority, *protocol;
    char addr[ID_ADDR_STR_LEN + 1]; /* x-agent-address, lowercase */
    char probe[33];                 /* x-tunnel-probe */
    struct tun_hdr *hdrs;
    size_t nhdrs, hcap;
    uint64_t hdr_list_bytes; /* RFC 7541 size of the fields received so far */
    size_t hdr_fields;       /* fields received so far, pseudo-headers included */
    bool hdr_overflow;       /* over a limit: nothing more stored, answered 431 */
    bool started;          /* routing decided */
    bool req_end;          /* END_STREAM received */
    bool responded;        /* response HEADERS submitted */
    bool resp_eof;         /* nothing more will be added to resp */
    bool deferred;         /* data source returned DEFERRED */
    bool read_paused;      /* ag_fwd_pause_read(true) in effect */
    struct evbuffer *resp; /* response body waiting for DATA frames */
    size_t unconsumed;     /* request bytes received but not yet consumed */
    int status;
    uint64_t bytes_in, bytes_out;
    uint64_t start_ms;
    char err[64]; /* for the access line */
};

struct ag_tun {
    struct ag_ctx *ctx;
    enum tun_mode mode; /* native, or the Osaurus relay protocol (run --protocol) */
    const struct ag_tun_cbs *cb; /* reports to the owner */
    void *arg;
    struct list link; /* the owner's (ctx->old, ctx->dead) */
    uint64_t id;
    enum tun_state state;
    struct ag_pxy_dial *dial;
    struct bufferevent *bev; /* until the WebSocket takes it */
    struct ws_conn *ws;
    char ws_key[25];
    nghttp2_session *h2;  /* native, once up */
    struct ag_osr *osr;   /* Osaurus mode, once up */
    struct evbuffer *out; /* h2 bytes for the next binary messages */
    struct event *tick_ev;
    struct event *flush_ev;
    uint64_t start_ms;
    uint64_t up_ms;
    uint32_t ping_s;
    uint64_t next_ping_ms;
    uint64_t rtt_ms;
    struct tun_reg regs[TUN_MAX_AGENTS * 2];
    size_t nregs;
    bool challenge_wanted; /* request_challenge sent, challenge not yet here */
    bool auth_sent;
    bool goaway_sent;    /* we drain */
    bool hold;           /* draining, kept open for new streams until the next tunnel is up */
    uint64_t hold_until_ms;
    bool down;           /* dead: on_down reported, waiting to be freed */
    bool restart;        /* the gateway restarts (relay_restarting, close 1012): back soon */
    uint64_t last_ping_ms; /* Osaurus mode: when the relay's last JSON ping came */
    struct list streams; /* struct tun_stream */
    size_t nstreams;
    char close_reason[AG_ERR_MAX];
};

static void tun_flush(struct ag_tun *t);
static void tun_schedule_flush(struct ag_tun *t);
static void tun_down(struct ag_tun *t, const char *reason, const char *auth_code);
static void stream_free(struct tun_stream *s);

uint64_t ag_tun_id(const struct ag_tun *t) { return t->id; }

struct list *ag_tun_link(struct ag_tun *t) { return &t->link; }

struct ag_tun *ag_tun_from_link(struct list *node) { return LIST_ENTRY(node, struct ag_tun, link); }

bool ag_tun_is_dead(const struct ag_tun *t) { return t->down; }

static uint64_t tun_now_ms(const struct ag_tun *t) { return clk_mono_ms(t->ctx->clk); }

bool ag_tun_is_up(const struct ag_tun *t) { return t->state == TUN_ST_UP; }

size_t ag_tun_streams(const struct ag_tun *t)
{
    return t->osr != NULL ? ag_osr_requests(t->osr) : t->nstreams;
}

bool ag_tun_restarting(const struct ag_tun *t) { return t->restart; }

/* Subprotocol of the upgrade: none for an Osaurus relay. */
static const char *tun_subprotocol(const struct ag_tun *t)
{
    return t->mode == TUN_MODE_NATIVE ? AG_TUN_SUBPROTOCOL : NULL;
}

uint64_t ag_tun_rtt_ms(const struct ag_tun *t) { return t->rtt_ms; }

/* ---- registrations --------------------------------------------------------- */

static struct tun_reg *reg_find(const struct ag_tun *t, const char *addr)
{
    for (size_t i = 0; i < t->nregs; i++)
        if (strcmp(t->regs[i].addr, addr) == 0)
            return (struct tun_reg *)&t->regs[i];
    return NULL;
}

static struct tun_reg *reg_get(struct ag_tun *t, const char *addr)
{
    struct tun_reg *r = reg_find(t, addr);

    if (r != NULL)
        return r;
    /* reuse a dead slot first */
    for (size_t i = 0; i < t->nregs; i++) {
        r = &t->regs[i];
        if (!r->active && r->pending == REG_NONE) {
            (void)util_snprintf(r->addr, sizeof(r->addr), "%s", addr);
            return r;
        }
    }
    if (t->nregs == sizeof(t->regs) / sizeof(t->regs[0]))
        return NULL;
    r = &t->regs[t->nregs++];
    memset(r, 0, sizeof(*r));
    (void)util_snprintf(r->addr, sizeof(r->addr), "%s", addr);
    return r;
}

bool ag_tun_serves(const struct ag_tun *t, const char *addr)
{
    const struct tun_reg *r = reg_find(t, addr);

    return r != NULL && r->active;
}

/* ---- control messages (common/tun_msg) -------------------------------------- */

static int send_msg(struct ag_tun *t, const struct tun_msg *m)
{
    size_t len = 0;
    char *text = tun_msg_encode(m, &len);
    int rc = -1;

    if (text == NULL)
        return -1;
    if (t->ws != NULL)
        rc = ws_send_text(t->ws, text, len);
    free(text);
    return rc;
}

static int send_request_challenge(struct ag_tun *t)
{
    struct tun_msg m;

    tun_msg_init(&m, TUN_MSG_REQUEST_CHALLENGE, t->mode);
    return send_msg(t, &m);
}

static int send_remove(struct ag_tun *t, const char *addr)
{
    struct tun_msg m;

    tun_msg_init(&m, TUN_MSG_REMOVE_AGENT, t->mode);
    if (id_addr_parse(addr, strlen(addr), m.remove_agent.addr) != ID_OK)
        return -1;
    return send_msg(t, &m);
}

/* Fills one registration entry: address and the signature of the native text
 * (PROTOCOL.md 4.3) over nonce and ts. Returns 0 or -1. */
static int fill_reg(const struct ag_tun *t, struct tun_msg_agent_auth *e, const struct ag_agt *a,
                    const char *nonce, int64_t ts)
{
    char text[TUN_SIGNED_TEXT_MAX];
    uint8_t raw[ID_SIG_LEN];
    int n;

    memset(e, 0, sizeof(*e));
    if (id_addr_parse(a->cfg.address, strlen(a->cfg.address), e->addr) != ID_OK)
        return -1;
    if (t->mode == TUN_MODE_OSAURUS) {
        /* the address exactly as sent: lowercase (the relay lowercases anyway) */
        id_addr_to_str(e->addr, e->addr_str);
        n = tun_msg_osaurus_signed_text(text, sizeof(text), e->addr_str, nonce, ts);
    } else {
        n = tun_msg_native_signed_text(text, sizeof(text), t->ctx->domain, e->addr, nonce, ts);
    }
    if (n < 0 || id_sign(&a->key, text, (size_t)n, raw) != ID_OK)
        return -1;
    id_sig_to_str(raw, e->sig);
    e->response_timeout_s = a->cfg.response_timeout_s;
    return 0;
}

/* Our agent for a decoded address; out gets the lowercase form. */
static struct ag_agt *msg_agent(struct ag_tun *t, const uint8_t addr[ID_ADDR_LEN],
                                char out[ID_ADDR_STR_LEN + 1])
{
    id_addr_to_str(addr, out);
    return ag_agt_find(t->ctx, out);
}

static void tun_fail(struct ag_tun *t, int code, const char *reason, const char *why)
{
    (void)util_snprintf(t->close_reason, sizeof(t->close_reason), "%s", why);
    ws_close(t->ws, code, reason);
    t->state = TUN_ST_CLOSING;
}

static void send_auth(struct ag_tun *t, const char *nonce)
{
    struct ag_ctx *ctx = t->ctx;
    struct tun_msg *m = calloc(1, sizeof(*m));
    int64_t ts = clk_unix_s(ctx->clk);
    struct tun_msg_auth *au;
    struct list *n, *tmp;

    if (m == NULL) {
        tun_fail(t, WS_CLOSE_INTERNAL, "internal_error", "out of memory");
        return;
    }
    tun_msg_init(m, TUN_MSG_AUTH, t->mode);
    au = &m->auth;
    memcpy(au->nonce, nonce, sizeof(au->nonce));
    au->timestamp = ts;
    (void)util_snprintf(au->instance, sizeof(au->instance), "%s", ctx->instance);
    if (t->mode == TUN_MODE_OSAURUS)
        au->features = TUN_FEAT_BASE64; /* ignored by the relay; our gateway says yes */
    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        struct ag_agt *a = AG_AGT_OF(n);
        struct tun_reg *r;

        if (au->n_agents == TUN_MAX_AGENTS)
            break;
        if (!ag_agt_wanted(a))
            continue;
        r = reg_get(t, a->cfg.address);
        if (r == NULL || fill_reg(t, &au->agents[au->n_agents], a, nonce, ts) != 0) {
            LOG_ERROR(ctx->log, "auth_entry_failed", LOG_S("addr", a->cfg.address));
            continue;
        }
        r->pending = REG_IN_AUTH;
        au->n_agents++;
    }
    if (au->n_agents == 0) {
        free(m);
        tun_fail(t, WS_CLOSE_NORMAL, "no agents", "no enabled agents");
        return;
    }
    if (send_msg(t, m) != 0) {
        free(m);
        tun_fail(t, WS_CLOSE_INTERNAL, "internal_error", "cannot send the auth message");
        return;
    }
    t->auth_sent = true;
    LOG_DEBUG(ctx->log, "auth_sent", LOG_U("tun", t->id), LOG_U("agents", au->n_agents));
    free(m);
}

/* Asks for a challenge if some registration waits for one. */
static void adds_kick(struct ag_tun *t)
{
    uint64_t now = tun_now_ms(t);

    if (t->state != TUN_ST_UP || t->challenge_wanted)
        return;
    for (size_t i = 0; i < t->nregs; i++) {
        if (t->regs[i].pending == REG_WANT_ADD && t->regs[i].retry_at_ms <= now) {
            if (send_request_challenge(t) == 0)
                t->challenge_wanted = true;
            return;
        }
    }
}

/* A challenge on a live tunnel: spend it on the first waiting registration. */
static void on_add_challenge(struct ag_tun *t, const char *nonce)
{
    uint64_t now = tun_now_ms(t);

    t->challenge_wanted = false;
    for (size_t i = 0; i < t->nregs; i++) {
        struct tun_reg *r = &t->regs[i];
        struct ag_agt *a;
        struct tun_msg m;
        int64_t ts = clk_unix_s(t->ctx->clk);

        if (r->pending != REG_WANT_ADD || r->retry_at_ms > now)
            continue;
        a = ag_agt_find(t->ctx, r->addr);
        if (a == NULL || !ag_agt_wanted(a)) {
            r->pending = REG_NONE;
            continue;
        }
        tun_msg_init(&m, TUN_MSG_ADD_AGENT, t->mode);
        memcpy(m.add_agent.nonce, nonce, sizeof(m.add_agent.nonce));
        m.add_agent.timestamp = ts;
        if (fill_reg(t, &m.add_agent.agent, a, nonce, ts) != 0 || send_msg(t, &m) != 0) {
            r->retry_at_ms = now + TUN_ADD_RETRY_MS;
            break;
        }
        r->pending = REG_ADDING;
        LOG_DEBUG(t->ctx->log, "add_agent_sent", LOG_U("tun", t->id), LOG_S("addr", r->addr));
        break;
    }
    adds_kick(t);
}

/* The gateway accepted a; activates the route unless a is no longer wanted. */
static void reg_accepted(struct ag_tun *t, struct tun_reg *r, struct ag_agt *a, const char *url)
{
    r->pending = REG_NONE;
    if (a == NULL || !ag_agt_wanted(a)) {
        r->active = false;
        send_remove(t, r->addr);
        return;
    }
    r->active = true;
    t->cb->on_agent_online(t->arg, t, a, url);
}

/* PROTOCOL.md 4.7: retried with the normal backoff. */
static bool err_is_transient(enum tun_err e)
{
    return e == TUN_E_INVALID_NONCE || e == TUN_E_AUTH_TIMEOUT ||
           e == TUN_E_TIMESTAMP_OUT_OF_RANGE || e == TUN_E_RATE_LIMITED ||
           e == TUN_E_MAX_AGENTS_REACHED || e == TUN_E_INTERNAL_ERROR;
}

static int h2_start(struct ag_tun *t);

static bool osr_serves(void *arg, const char *addr) { return ag_tun_serves(arg, addr); }

static void osr_on_idle(void *arg) { tun_schedule_flush(arg); }

static const struct ag_osr_cbs tun_osr_cbs = {
    .serves = osr_serves,
    .on_idle = osr_on_idle,
};

static void on_auth_ok(struct ag_tun *t, const struct tun_msg_auth_ok *ok)
{
    char addr[ID_ADDR_STR_LEN + 1];
    struct list *n, *tmp;

    t->ping_s = ok->ping_interval_s >= 1 && ok->ping_interval_s <= 3600 ? ok->ping_interval_s
                                                                        : TUN_DEFAULT_PING_S;
    if (t->mode == TUN_MODE_OSAURUS)
        t->ping_s = TUN_OSR_PING_INTERVAL_S; /* the relay's, until its pings say otherwise */
    t->state = TUN_ST_UP;
    t->up_ms = tun_now_ms(t);
    t->next_ping_ms = t->up_ms + (uint64_t)t->ping_s * 1000u;
    if (t->mode == TUN_MODE_OSAURUS) {
        t->osr = ag_osr_new(t->ctx, t->id, t->ws, ok->features, &tun_osr_cbs, t);
        if (t->osr == NULL) {
            tun_fail(t, WS_CLOSE_INTERNAL, "internal_error", "out of memory");
            return;
        }
        /* request frames carry whole bodies (up to 10 MB, escaped) */
        ws_set_max_text(t->ws, TUN_OSR_MAX_FRAME_BYTES);
    } else if (h2_start(t) != 0) {
        tun_fail(t, WS_CLOSE_INTERNAL, "internal_error", "cannot start HTTP/2");
        return;
    }
    LOG_INFO(t->ctx->log, "auth_ok", LOG_U("tun", t->id), LOG_U("agents", ok->n_agents),
             LOG_U("rejected", ok->n_rejected), LOG_S("region", ok->region),
             LOG_U("ping_interval", t->ping_s));
    t->cb->on_up(t->arg, t);
    for (size_t i = 0; i < ok->n_agents; i++) {
        struct ag_agt *a = msg_agent(t, ok->agents[i].addr, addr);
        struct tun_reg *r = reg_find(t, addr);
        if (r != NULL)
            reg_accepted(t, r, a, ok->agents[i].url);
    }
    for (size_t i = 0; i < ok->n_rejected; i++) {
        const struct tun_msg_rejected *rj = &ok->rejected[i];
        struct ag_agt *a = msg_agent(t, rj->addr, addr);
        struct tun_reg *r = reg_find(t, addr);
        LOG_WARN(t->ctx->log, "agent_rejected", LOG_U("tun", t->id), LOG_S("addr", addr),
                 LOG_S("err", rj->error));
        if (r == NULL)
            continue;
        r->active = false;
        r->pending = REG_NONE;
        if (err_is_transient(rj->err)) {
            r->pending = REG_WANT_ADD;
            r->retry_at_ms = tun_now_ms(t) + TUN_ADD_RETRY_MS;
        } else if (a != NULL) {
            t->cb->on_agent_refused(t->arg, t, a, rj->error, NULL);
        }
    }
    /* listed in auth but in neither list, or wanted since: add them now */
    for (size_t i = 0; i < t->nregs; i++)
        if (t->regs[i].pending == REG_IN_AUTH)
            t->regs[i].pending = REG_WANT_ADD;
    LIST_FOREACH_SAFE(n, tmp, &t->ctx->agents)
    {
        struct ag_agt *a = AG_AGT_OF(n);
        struct tun_reg *r;
        if (!ag_agt_wanted(a) || ag_tun_serves(t, a->cfg.address))
            continue;
        r = reg_get(t, a->cfg.address);
        if (r != NULL && r->pending == REG_NONE)
            r->pending = REG_WANT_ADD;
    }
    adds_kick(t);
}

static void on_error_msg(struct ag_tun *t, const struct tun_msg_error *e)
{
    char addr[ID_ADDR_STR_LEN + 1] = "";
    struct ag_agt *a = e->has_addr ? msg_agent(t, e->addr, addr) : NULL;
    struct tun_reg *r = e->has_addr ? reg_find(t, addr) : NULL;

    LOG_WARN(t->ctx->log, "gateway_error", LOG_U("tun", t->id), LOG_S("err", e->code),
             LOG_S("addr", e->has_addr ? addr : NULL),
             LOG_S("message", e->message[0] != '\0' ? e->message : NULL));
    if (e->err == TUN_E_RELAY_RESTARTING) {
        /* the relay's drain: it closes with 1012 next; we come back in about 1 s */
        t->restart = true;
        return;
    }
    if (r == NULL) {
        /* no address: a failed add we cannot pin down, or a rate limit */
        for (size_t i = 0; i < t->nregs; i++)
            if (t->regs[i].pending == REG_ADDING) {
                t->regs[i].pending = REG_WANT_ADD;
                t->regs[i].retry_at_ms = tun_now_ms(t) + TUN_ADD_RETRY_MS;
            }
        if (e->err == TUN_E_INVALID_NONCE || e->err == TUN_E_RATE_LIMITED)
            t->challenge_wanted = false;
        return;
    }
    if (r->pending != REG_ADDING)
        return;
    r->pending = REG_NONE;
    if (err_is_transient(e->err)) {
        r->pending = REG_WANT_ADD;
        r->retry_at_ms = tun_now_ms(t) + TUN_ADD_RETRY_MS;
    } else if (a != NULL) {
        t->cb->on_agent_refused(t->arg, t, a, e->code, e->message[0] != '\0' ? e->message : NULL);
    }
}

/* hold: the gateway asked us to move ("draining"): it keeps routing new
 * requests here until our next tunnel has taken the routes (on another node,
 * make-before-break), so this one stays open, idle or not, until
 * ag_tun_release() or TUN_HOLD_MAX_MS. */
static void tun_start_draining(struct ag_tun *t, const char *why, bool hold)
{
    if (t->state != TUN_ST_UP)
        return;
    t->state = TUN_ST_DRAINING;
    t->hold = hold;
    t->hold_until_ms = tun_now_ms(t) + TUN_HOLD_MAX_MS;
    for (size_t i = 0; i < t->nregs; i++)
        t->regs[i].pending = REG_NONE;
    LOG_INFO(t->ctx->log, "tunnel_draining", LOG_U("tun", t->id), LOG_S("reason", why),
             LOG_U("streams", t->nstreams));
    t->cb->on_draining(t->arg, t);
    tun_schedule_flush(t); /* closes at once if no stream is open */
}

static const char *reason_name(const struct tun_msg_agent_removed *r)
{
    switch (r->reason) {
    case TUN_REASON_NONE:
    case TUN_REASON_REMOVED:
        return "removed";
    case TUN_REASON_REPLACED:
        return "replaced";
    case TUN_REASON_SUPERSEDED:
        return "superseded";
    case TUN_REASON_NOT_ALLOWED:
        return "not_allowed";
    case TUN_REASON_OTHER:
        break;
    }
    return r->reason_str[0] != '\0' ? r->reason_str : "superseded";
}

/* The relay's JSON pings set the keepalive clock: silence for three of its
 * intervals (1-30 s, as measured between two pings) ends the tunnel. */
static void osr_note_ping(struct ag_tun *t)
{
    uint64_t now = tun_now_ms(t);

    if (t->last_ping_ms != 0 && now > t->last_ping_ms) {
        uint64_t s = (now - t->last_ping_ms + 500u) / 1000u; /* nearest second */
        t->ping_s = (uint32_t)(s < 1 ? 1 : s > TUN_OSR_PING_INTERVAL_S ? TUN_OSR_PING_INTERVAL_S : s);
    }
    t->last_ping_ms = now;
}

static void on_text(void *arg, const char *data, size_t len)
{
    struct ag_tun *t = arg;
    struct tun_msg *m = malloc(sizeof(*m)); /* ~25 KiB: not on the stack */
    const char *code = NULL;
    char addr[ID_ADDR_STR_LEN + 1];

    if (m == NULL || t->down)
        goto out;
    if (tun_msg_decode(data, len, t->mode, m, &code) != 0) {
        if (m->type == TUN_MSG_REQUEST && t->osr != NULL) {
            ag_osr_on_bad_request(t->osr, m->http.id, code);
            goto out;
        }
        /* unknown types are ignored (PROTOCOL.md 3 rule 4); a bad known one is logged */
        if (m->type != TUN_MSG_NONE)
            LOG_WARN(t->ctx->log, "tunnel_bad_message", LOG_U("tun", t->id),
                     LOG_S("type", tun_msg_type_name(m->type)), LOG_S("err", code));
        else
            LOG_DEBUG(t->ctx->log, "tunnel_unknown_message", LOG_U("tun", t->id),
                      LOG_U("bytes", len));
        goto out;
    }
    switch (m->type) {
    case TUN_MSG_CHALLENGE:
        if (t->state == TUN_ST_AUTH && !t->auth_sent)
            send_auth(t, m->challenge.nonce);
        else if (t->state == TUN_ST_UP)
            on_add_challenge(t, m->challenge.nonce);
        break;
    case TUN_MSG_AUTH_OK:
        if (t->state == TUN_ST_AUTH && t->auth_sent)
            on_auth_ok(t, &m->auth_ok);
        break;
    case TUN_MSG_AUTH_ERROR:
        if (t->state != TUN_ST_AUTH)
            break;
        if (m->error.err == TUN_E_SIGNATURE_VERIFICATION_FAILED && m->error.domain[0] != '\0' &&
            strcasecmp(m->error.domain, t->ctx->domain) != 0)
            /* the usual cause: dialled by IP or another name (PROTOCOL.md 4.6) */
            (void)util_snprintf(t->close_reason, sizeof(t->close_reason),
                                "auth_error %s: the gateway expects signatures for domain "
                                "\"%s\" but this agent signed for \"%s\"; dial the gateway "
                                "by that name, or run with --domain %s",
                                m->error.code, m->error.domain, t->ctx->domain,
                                m->error.domain);
        else
            (void)util_snprintf(t->close_reason, sizeof(t->close_reason), "auth_error %s%s%s",
                                m->error.code, m->error.message[0] != '\0' ? ": " : "",
                                m->error.message);
        tun_down(t, t->close_reason, m->error.code);
        break;
    case TUN_MSG_AGENT_ADDED: {
        struct ag_agt *a = msg_agent(t, m->agent_added.addr, addr);
        struct tun_reg *r = reg_find(t, addr);
        if (t->state == TUN_ST_UP && r != NULL && r->pending == REG_ADDING)
            reg_accepted(t, r, a, m->agent_added.url);
        break;
    }
    case TUN_MSG_AGENT_REMOVED: {
        struct ag_agt *a = msg_agent(t, m->agent_removed.addr, addr);
        struct tun_reg *r = reg_find(t, addr);
        const char *reason = reason_name(&m->agent_removed);
        if (r != NULL) {
            r->active = false;
            r->pending = REG_NONE;
        }
        LOG_INFO(t->ctx->log, "agent_removed", LOG_U("tun", t->id), LOG_S("addr", addr),
                 LOG_S("reason", reason));
        if (a != NULL)
            t->cb->on_agent_removed(t->arg, t, a, reason);
        break;
    }
    case TUN_MSG_ERROR:
        on_error_msg(t, &m->error);
        break;
    case TUN_MSG_DRAINING:
        tun_start_draining(t, "gateway draining", true);
        break;
    case TUN_MSG_PING:
        osr_note_ping(t);
        /* fall through */
    case TUN_MSG_REQUEST:
    case TUN_MSG_CANCEL:
        if (t->osr != NULL)
            ag_osr_on_msg(t->osr, m);
        break;
    default:
        /* a known type in the wrong direction: ignored (PROTOCOL.md 3 rule 5) */
        LOG_DEBUG(t->ctx->log, "tunnel_unexpected_message", LOG_U("tun", t->id),
                  LOG_S("type", tun_msg_type_name(m->type)));
        break;
    }
    tun_msg_clear(m);
out:
    free(m);
}

/* ---- streams ------------------------------------------------------------- */

static struct iov rc_iov(nghttp2_rcbuf *rc)
{
    nghttp2_vec v;

    if (rc == NULL)
        return (struct iov){"", 0};
    v = nghttp2_rcbuf_get_buf(rc);
    return (struct iov){(const char *)v.base, v.len};
}

static bool rc_is(nghttp2_rcbuf *rc, const char *lit) { return util_iov_ieq_str(rc_iov(rc), lit); }

static void stream_consume(struct tun_stream *s, size_t n)
{
    if (n == 0 || s->t->h2 == NULL)
        return;
    if (n > s->unconsumed)
        n = s->unconsumed;
    s->unconsumed -= n;
    nghttp2_session_consume(s->t->h2, s->id, n);
}

/* DATA frames carry their payload straight from s->resp into the WebSocket
 * (NGHTTP2_DATA_FLAG_NO_COPY, on_send_data): nghttp2 only learns how much. */
static ssize_t on_read_data(nghttp2_session *h2, int32_t id, uint8_t *buf, size_t length,
                            uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct tun_stream *s = src->ptr;
    size_t avail = evbuffer_get_length(s->resp);
    size_t n;

    if (avail == 0) {
        if (s->resp_eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            return 0;
        }
        s->deferred = true;
        return NGHTTP2_ERR_DEFERRED;
    }
    n = avail < length ? avail : length;
    *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
    if (s->resp_eof && n == avail)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* DATA payloads up to one binary message (the gateway allows frames that
 * large, PROTOCOL.md 5): a quarter of the frames and messages of 16 KiB. */
static ssize_t on_data_length(nghttp2_session *h2, uint8_t frame_type, int32_t id,
                              int32_t session_window, int32_t stream_window,
                              uint32_t max_frame_size, void *user)
{
    ssize_t n = max_frame_size < TUN_MSG_CHUNK ? (ssize_t)max_frame_size : (ssize_t)TUN_MSG_CHUNK;

    if (session_window < n)
        n = session_window;
    if (stream_window < n)
        n = stream_window;
    return n > 0 ? n : 1;
}

/* One DATA frame: what nghttp2 queued before it (t->out), its header and
 * length bytes of s->resp become one binary message, masked straight from
 * the response's own buffers. */
static int on_send_data(nghttp2_session *h2, nghttp2_frame *frame, const uint8_t *framehd,
                        size_t length, nghttp2_data_source *src, void *user)
{
    struct ag_tun *t = user;
    struct tun_stream *s = src->ptr;

    if (t->ws == NULL || !ws_is_writable(t->ws))
        return NGHTTP2_ERR_WOULDBLOCK;
    if (frame->data.padlen != 0 || evbuffer_get_length(s->resp) < length)
        return NGHTTP2_ERR_CALLBACK_FAILURE; /* no padding is ever asked for */
    if (evbuffer_add(t->out, framehd, 9) != 0 ||
        ws_send_binary_buffers(t->ws, t->out, evbuffer_get_length(t->out), s->resp, length) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    s->bytes_out += length;
    if (s->agt != NULL && !s->is_probe)
        s->agt->bytes_out += length;
    if (s->read_paused && s->fwd != NULL && evbuffer_get_length(s->resp) < TUN_RESP_LOW) {
        s->read_paused = false;
        ag_fwd_pause_read(s->fwd, false);
    }
    return 0;
}

static void stream_resume(struct tun_stream *s)
{
    if (s->deferred && s->t->h2 != NULL) {
        s->deferred = false;
        nghttp2_session_resume_data(s->t->h2, s->id);
    }
    tun_schedule_flush(s->t);
}

/* Submits a complete response whose body is in s->resp (or none). */
static void stream_respond(struct tun_stream *s, int status, const nghttp2_nv *extra, size_t nextra,
                           const char *ctype, const char *body)
{
    nghttp2_nv nv[8];
    size_t n = 0;
    char st[4];
    char clen[24];
    nghttp2_data_provider prd = {.source.ptr = s, .read_callback = on_read_data};
    size_t blen = body != NULL ? strlen(body) : 0;

    (void)util_snprintf(st, sizeof(st), "%d", status);
    (void)util_snprintf(clen, sizeof(clen), "%zu", blen);
    nv[n++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)st, 7, strlen(st), 0};
    if (ctype != NULL)
        nv[n++] = (nghttp2_nv){(uint8_t *)"content-type", (uint8_t *)ctype, 12, strlen(ctype), 0};
    nv[n++] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)clen, 14, strlen(clen), 0};
    for (size_t i = 0; i < nextra && n < sizeof(nv) / sizeof(nv[0]); i++)
        nv[n++] = extra[i];
    s->status = status;
    s->responded = true;
    s->resp_eof = true;
    if (blen > 0)
        evbuffer_add(s->resp, body, blen);
    nghttp2_submit_response(s->t->h2, s->id, nv, n, blen > 0 ? &prd : NULL);
    stream_resume(s);
}

static void stream_respond_herr(struct tun_stream *s, enum herr e)
{
    char body[256];

    if (herr_json(e, body, sizeof(body)) < 0)
        body[0] = '\0';
    (void)util_snprintf(s->err, sizeof(s->err), "%s", herr_code(e));
    stream_respond(s, herr_status(e), NULL, 0, "application/json", body);
}

/* ag_fwd callbacks (never inside an ag_fwd call; see the file header) */

static void fwd_on_head(void *arg, int status, const nghttp2_nv *hv, size_t nhv, bool no_body)
{
    struct tun_stream *s = arg;
    nghttp2_nv *nv = calloc(nhv + 1, sizeof(*nv));
    char st[4];
    nghttp2_data_provider prd = {.source.ptr = s, .read_callback = on_read_data};

    if (nv == NULL) {
        /* the fwd is on the stack: the reset's stream close frees it later */
        (void)util_snprintf(s->err, sizeof(s->err), "out_of_memory");
        nghttp2_submit_rst_stream(s->t->h2, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_INTERNAL_ERROR);
        tun_schedule_flush(s->t);
        return;
    }
    ag_agt_local_result(s->agt, AG_AGT_LOCAL_OK, NULL);
    (void)util_snprintf(st, sizeof(st), "%d", status);
    nv[0] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)st, 7, strlen(st), 0};
    memcpy(nv + 1, hv, nhv * sizeof(*nv));
    s->status = status;
    s->responded = true;
    if (no_body)
        s->resp_eof = true;
    nghttp2_submit_response(s->t->h2, s->id, nv, nhv + 1, no_body ? NULL : &prd);
    free(nv);
    tun_schedule_flush(s->t);
}

/* Response bytes could not be queued (out of memory): the stream is reset,
 * never carried on with a hole (its close frees the fwd later). */
static void stream_body_lost(struct tun_stream *s)
{
    (void)util_snprintf(s->err, sizeof(s->err), "out_of_memory");
    s->resp_eof = true;
    nghttp2_submit_rst_stream(s->t->h2, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_INTERNAL_ERROR);
    tun_schedule_flush(s->t);
}

static void stream_body_queued(struct tun_stream *s)
{
    if (!s->read_paused && evbuffer_get_length(s->resp) > TUN_RESP_HIGH) {
        s->read_paused = true;
        ag_fwd_pause_read(s->fwd, true);
    }
    stream_resume(s);
}

static void fwd_on_body(void *arg, const uint8_t *data, size_t len)
{
    struct tun_stream *s = arg;

    if (s->resp_eof)
        return;
    if (evbuffer_add(s->resp, data, len) != 0) {
        stream_body_lost(s);
        return;
    }
    stream_body_queued(s);
}

static void fwd_on_body_move(void *arg, struct evbuffer *src, size_t len)
{
    struct tun_stream *s = arg;
    size_t before = evbuffer_get_length(src);

    if (s->resp_eof) {
        evbuffer_drain(src, len);
        return;
    }
    if (evbuffer_remove_buffer(src, s->resp, len) != (int)len) {
        evbuffer_drain(src, len - (before - evbuffer_get_length(src)));
        stream_body_lost(s);
        return;
    }
    stream_body_queued(s);
}

static void fwd_on_end(void *arg)
{
    struct tun_stream *s = arg;

    s->fwd = NULL;
    s->resp_eof = true;
    stream_resume(s);
}

static void fwd_on_error(void *arg, enum ag_fwd_err err, const char *detail)
{
    struct tun_stream *s = arg;

    s->fwd = NULL;
    LOG_DEBUG(s->t->ctx->log, "local_error", LOG_U("tun", s->t->id), LOG_U("stream", s->log_id),
              LOG_S("detail", detail));
    if (!s->responded) {
        ag_agt_local_result(s->agt,
                            err == AG_FWD_E_TIMEOUT ? AG_AGT_LOCAL_TIMEOUT : AG_AGT_LOCAL_REFUSED,
                            detail);
        stream_respond_herr(s, err == AG_FWD_E_TIMEOUT ? HERR_GATEWAY_TIMEOUT
                                                       : HERR_LOCAL_UNREACHABLE);
        if (err != AG_FWD_E_TIMEOUT)
            LOG_WARN(s->t->ctx->log, "local_unreachable", LOG_S("addr", s->addr),
                     LOG_S("detail", detail));
        return;
    }
    (void)util_snprintf(s->err, sizeof(s->err), "local_aborted");
    nghttp2_submit_rst_stream(s->t->h2, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_INTERNAL_ERROR);
    tun_schedule_flush(s->t);
}

static void fwd_on_body_sent(void *arg, size_t n)
{
    struct tun_stream *s = arg;

    stream_consume(s, n);
    tun_schedule_flush(s->t);
}

static const struct ag_fwd_cbs stream_fwd_cbs = {
    .on_head = fwd_on_head,
    .on_body = fwd_on_body,
    .on_body_move = fwd_on_body_move,
    .on_end = fwd_on_end,
    .on_error = fwd_on_error,
    .on_body_sent = fwd_on_body_sent,
};

/* The request head is complete: route, answer or forward. */
static void stream_start(struct tun_stream *s, bool end_stream)
{
    struct ag_tun *t = s->t;
    struct ag_agt *a;
    struct ag_fwd_hdr *fh;
    struct ag_fwd_request rq;

    s->started = true;
    s->req_end = end_stream;
    if (s->hdr_overflow) {
        stream_respond_herr(s, HERR_HEADER_TOO_LARGE);
        return;
    }
    a = s->addr[0] != '\0' ? ag_agt_find(t->ctx, s->addr) : NULL;
    if (a == NULL || !ag_tun_serves(t, s->addr) || !ag_agt_wanted(a) || t->ctx->stopping ||
        s->method == NULL || s->path == NULL) {
        (void)util_snprintf(s->err, sizeof(s->err), "refused_stream");
        nghttp2_submit_rst_stream(t->h2, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_REFUSED_STREAM);
        return;
    }
    s->agt = a;
    ag_agt_ref(a);
    /* our own probe: answered here, never forwarded (PRODUCT.md "Connected"),
     * and not a request (status counts them apart) */
    if (s->probe[0] != '\0' && a->probe_nonce[0] != '\0' &&
        strlen(s->probe) == strlen(a->probe_nonce) &&
        CRYPTO_memcmp(s->probe, a->probe_nonce, strlen(s->probe)) == 0) {
        nghttp2_nv echo = {(uint8_t *)"x-tunnel-probe", (uint8_t *)s->probe, 14, strlen(s->probe),
                           0};
        a->probes++;
        s->is_probe = true;
        (void)util_snprintf(s->err, sizeof(s->err), "probe");
        stream_respond(s, 200, &echo, 1, "text/plain", "ok\n");
        return;
    }
    a->requests++;
    if (s->protocol != NULL && (!rc_is(s->method, "CONNECT") || !rc_is(s->protocol, "websocket"))) {
        /* RFC 8441 extended CONNECT: only the WebSocket protocol is known */
        stream_respond_herr(s, HERR_UNSUPPORTED_UPGRADE);
        return;
    }
    if (a->inflight >= a->cfg.max_inflight) {
        stream_respond_herr(s, HERR_HOST_BUSY);
        return;
    }
    fh = calloc(s->nhdrs + 1, sizeof(*fh));
    if (fh == NULL) {
        stream_respond_herr(s, HERR_INTERNAL);
        return;
    }
    for (size_t i = 0; i < s->nhdrs; i++) {
        fh[i].name = rc_iov(s->hdrs[i].name);
        fh[i].value = rc_iov(s->hdrs[i].value);
    }
    rq.method = rc_iov(s->method);
    rq.path = rc_iov(s->path);
    rq.authority = rc_iov(s->authority);
    rq.hdrs = fh;
    rq.nhdrs = s->nhdrs;
    rq.has_body = !end_stream;
    rq.websocket = s->protocol != NULL;
    s->fwd = ag_fwd_start(a, &rq, &stream_fwd_cbs, s);
    free(fh);
    if (s->fwd == NULL) {
        stream_respond_herr(s, HERR_INTERNAL);
        return;
    }
    a->inflight++;
    s->counted = true;
}

static void stream_log(struct tun_stream *s, uint32_t error_code)
{
    struct iov m = rc_iov(s->method);
    struct iov p = rc_iov(s->path);

    if (!s->started)
        return;
    LOG_INFO(s->t->ctx->log, "request", LOG_U("tun", s->t->id), LOG_U("stream", s->log_id),
             LOG_S("addr", s->addr), LOG_M("method", m.base, m.len), LOG_M("path", p.base, p.len),
             LOG_U("status", s->status), LOG_U("bytes_in", s->bytes_in),
             LOG_U("bytes_out", s->bytes_out), LOG_U("dur_ms", tun_now_ms(s->t) - s->start_ms),
             LOG_S("err", s->err[0] != '\0' ? s->err : NULL), LOG_U("h2_error", error_code));
}

static void stream_free(struct tun_stream *s)
{
    struct ag_tun *t = s->t;

    ag_fwd_free(s->fwd);
    if (s->counted)
        s->agt->inflight--;
    if (s->agt != NULL)
        ag_agt_unref(s->agt);
    list_unlink(&s->link);
    t->nstreams--;
    for (size_t i = 0; i < s->nhdrs; i++) {
        nghttp2_rcbuf_decref(s->hdrs[i].name);
        nghttp2_rcbuf_decref(s->hdrs[i].value);
    }
    free(s->hdrs);
    nghttp2_rcbuf_decref(s->method);
    nghttp2_rcbuf_decref(s->path);
    nghttp2_rcbuf_decref(s->authority);
    nghttp2_rcbuf_decref(s->protocol);
    evbuffer_free(s->resp);
    free(s);
}

/* ---- nghttp2 callbacks ------------------------------------------------------ */

static ssize_t on_send(nghttp2_session *h2, const uint8_t *data, size_t len, int flags, void *user)
{
    struct ag_tun *t = user;

    if (t->ws == NULL || !ws_is_writable(t->ws))
        return NGHTTP2_ERR_WOULDBLOCK;
    if (evbuffer_add(t->out, data, len) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    while (evbuffer_get_length(t->out) >= TUN_MSG_CHUNK)
        if (ws_send_binary_buffer(t->ws, t->out, TUN_MSG_CHUNK) != 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
    return (ssize_t)len;
}

static int on_begin_headers(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct ag_tun *t = user;
    struct tun_stream *s;

    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* resets the stream */
    s->resp = evbuffer_new();
    if (s->resp == NULL) {
        free(s);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    s->t = t;
    s->id = frame->hd.stream_id;
    s->log_id = ++t->ctx->next_id;
    s->start_ms = tun_now_ms(t);
    list_insert_head(&t->streams, &s->link);
    t->nstreams++;
    nghttp2_session_set_stream_user_data(h2, s->id, s);
    return 0;
}

static int on_header(nghttp2_session *h2, const nghttp2_frame *frame, nghttp2_rcbuf *name,
                     nghttp2_rcbuf *value, uint8_t flags, void *user)
{
    struct tun_stream *s;
    struct iov n = rc_iov(name);
    struct iov v = rc_iov(value);
    nghttp2_rcbuf **slot = NULL;

    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0; /* trailers: dropped */
    s = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
    if (s == NULL || s->hdr_overflow)
        return 0;
    s->hdr_fields++;
    s->hdr_list_bytes += (uint64_t)n.len + v.len + 32u;
    if (s->hdr_fields > TUN_MAX_HEADER_FIELDS || s->hdr_list_bytes > TUN_MAX_HEADER_LIST) {
        s->hdr_overflow = true;
        LOG_WARN(s->t->ctx->log, "request_headers_too_large", LOG_U("tun", s->t->id),
                 LOG_U("stream", s->log_id), LOG_U("fields", s->hdr_fields),
                 LOG_U("bytes", s->hdr_list_bytes));
        return 0;
    }
    if (n.len > 0 && n.base[0] == ':') {
        if (rc_is(name, ":method"))
            slot = &s->method;
        else if (rc_is(name, ":path"))
            slot = &s->path;
        else if (rc_is(name, ":authority"))
            slot = &s->authority;
        else if (rc_is(name, ":protocol"))
            slot = &s->protocol;
        if (slot != NULL && *slot == NULL) {
            nghttp2_rcbuf_incref(value);
            *slot = value;
        }
        return 0;
    }
    if (rc_is(name, "x-agent-address")) {
        uint8_t raw[ID_ADDR_LEN];
        if (id_addr_parse(v.base, v.len, raw) == ID_OK)
            id_addr_to_str(raw, s->addr);
    } else if (rc_is(name, "x-tunnel-probe")) {
        if (v.len < sizeof(s->probe)) {
            memcpy(s->probe, v.base, v.len);
            s->probe[v.len] = '\0';
        }
        return 0;
    }
    if (s->nhdrs == s->hcap) {
        size_t cap = s->hcap != 0 ? s->hcap * 2 : 16;
        struct tun_hdr *nh = realloc(s->hdrs, cap * sizeof(*nh));
        if (nh == NULL)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        s->hdrs = nh;
        s->hcap = cap;
    }
    nghttp2_rcbuf_incref(name);
    nghttp2_rcbuf_incref(value);
    s->hdrs[s->nhdrs].name = name;
    s->hdrs[s->nhdrs].value = value;
    s->nhdrs++;
    return 0;
}

static int on_frame_recv(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct ag_tun *t = user;
    struct tun_stream *s;
    bool end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;

    switch (frame->hd.type) {
    case NGHTTP2_HEADERS:
        s = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
        if (s == NULL)
            break;
        if (!s->started && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
            stream_start(s, end);
        else if (end && !s->req_end) {
            s->req_end = true;
            if (s->fwd != NULL)
                ag_fwd_end_body(s->fwd);
        }
        break;
    case NGHTTP2_DATA:
        s = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
        if (s != NULL && end && !s->req_end) {
            s->req_end = true;
            if (s->fwd != NULL)
                ag_fwd_end_body(s->fwd);
        }
        break;
    case NGHTTP2_PING:
        if (frame->hd.flags & NGHTTP2_FLAG_ACK) {
            uint64_t sent = 0;
            for (size_t i = 0; i < 8; i++)
                sent = (sent << 8) | frame->ping.opaque_data[i];
            t->rtt_ms = tun_now_ms(t) - sent;
        }
        break;
    case NGHTTP2_GOAWAY:
        tun_start_draining(t, "goaway", false);
        break;
    default:
        break;
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *h2, uint8_t flags, int32_t stream_id, const uint8_t *data,
                         size_t len, void *user)
{
    struct tun_stream *s = nghttp2_session_get_stream_user_data(h2, stream_id);
    size_t now;

    if (s == NULL) {
        nghttp2_session_consume_connection(h2, len);
        return 0;
    }
    s->bytes_in += len;
    if (s->agt != NULL && !s->is_probe)
        s->agt->bytes_in += len;
    s->unconsumed += len;
    if (s->fwd == NULL) {
        stream_consume(s, len); /* nobody to take it: discard */
        return 0;
    }
    now = ag_fwd_write_body(s->fwd, data, len);
    stream_consume(s, now);
    return 0;
}

static int on_frame_send(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct tun_stream *s;

    if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
        !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    s = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
    /* response complete while the request body still comes: RFC 9113 8.1 */
    if (s != NULL && !s->req_end)
        nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_NO_ERROR);
    return 0;
}

static int on_stream_close(nghttp2_session *h2, int32_t stream_id, uint32_t error_code, void *user)
{
    struct tun_stream *s = nghttp2_session_get_stream_user_data(h2, stream_id);

    if (s == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(h2, stream_id, NULL);
    if (s->unconsumed > 0)
        nghttp2_session_consume_connection(h2, s->unconsumed);
    s->unconsumed = 0;
    if (error_code == NGHTTP2_CANCEL && s->err[0] == '\0')
        (void)util_snprintf(s->err, sizeof(s->err), "cancelled");
    stream_log(s, error_code);
    stream_free(s);
    return 0;
}

static int h2_start(struct ag_tun *t)
{
    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, TUN_MAX_STREAMS},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, TUN_STREAM_WINDOW},
        {NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL, 1},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, TUN_MAX_HEADER_LIST},
    };
    int rv;

    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return -1;
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cbs);
        return -1;
    }
    nghttp2_session_callbacks_set_send_callback(cbs, on_send);
    nghttp2_session_callbacks_set_send_data_callback(cbs, on_send_data);
    nghttp2_session_callbacks_set_data_source_read_length_callback(cbs, on_data_length);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback2(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_option_set_no_auto_window_update(opt, 1);
    rv = nghttp2_session_server_new2(&t->h2, cbs, t, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0)
        return -1;
    if (nghttp2_submit_settings(t->h2, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0])) != 0 ||
        nghttp2_session_set_local_window_size(t->h2, NGHTTP2_FLAG_NONE, 0, TUN_CONN_WINDOW) != 0)
        return -1;
    tun_flush(t);
    return 0;
}

/* ---- output, keepalive --------------------------------------------------- */

/* Runs nghttp2's output into binary messages; closes a drained tunnel. */
static void tun_flush(struct ag_tun *t)
{
    int rv;

    if (t->ws == NULL || t->state == TUN_ST_CLOSING)
        return;
    if (t->osr != NULL) {
        if ((t->state == TUN_ST_DRAINING || t->goaway_sent) && ag_osr_requests(t->osr) == 0) {
            (void)util_snprintf(t->close_reason, sizeof(t->close_reason), "drained");
            ws_close(t->ws, WS_CLOSE_NORMAL, "drained");
            t->state = TUN_ST_CLOSING;
        }
        return;
    }
    if (t->h2 == NULL)
        return;
    rv = nghttp2_session_send(t->h2);
    if (evbuffer_get_length(t->out) > 0)
        (void)ws_send_binary_buffer(t->ws, t->out, evbuffer_get_length(t->out));
    if (rv != 0) {
        (void)util_snprintf(t->close_reason, sizeof(t->close_reason), "http2: %s",
                            nghttp2_strerror(rv));
        ws_close(t->ws, 4000, "protocol_error");
        t->state = TUN_ST_CLOSING;
        return;
    }
    /* the close frame queues behind the GOAWAY and any last frames */
    if (((t->state == TUN_ST_DRAINING && !t->hold) || t->goaway_sent) && t->nstreams == 0 &&
        !nghttp2_session_want_write(t->h2)) {
        (void)util_snprintf(t->close_reason, sizeof(t->close_reason), "drained");
        ws_close(t->ws, WS_CLOSE_NORMAL, "drained");
        t->state = TUN_ST_CLOSING;
    }
}

static void on_flush_ev(evutil_socket_t fd, short what, void *arg)
{
    struct ag_tun *t = arg;

    if (t->down)
        return;
    if (t->state == TUN_ST_CLOSING && t->ws == NULL) {
        tun_down(t, "closed before authentication", NULL); /* drained while dialling */
        return;
    }
    tun_flush(t);
}

static void tun_schedule_flush(struct ag_tun *t) { event_active(t->flush_ev, 0, 0); }

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct ag_tun *t = arg;
    uint64_t now = tun_now_ms(t);

    if (t->down)
        return;
    switch (t->state) {
    case TUN_ST_DIAL:
    case TUN_ST_UPGRADE:
    case TUN_ST_AUTH:
        if (now - t->start_ms > TUN_AUTH_TIMEOUT_MS) {
            tun_down(t, t->state == TUN_ST_AUTH ? "authentication timed out" : "upgrade timed out",
                     NULL);
            return;
        }
        break;
    case TUN_ST_UP:
    case TUN_ST_DRAINING:
        if (t->hold && now >= t->hold_until_ms) {
            LOG_INFO(t->ctx->log, "tunnel_hold_timeout", LOG_U("tun", t->id));
            ag_tun_release(t);
        }
        if (now - ws_last_rx_ms(t->ws) > 3u * 1000u * (uint64_t)t->ping_s) {
            LOG_WARN(t->ctx->log, "keepalive_timeout", LOG_U("tun", t->id),
                     LOG_U("silent_ms", now - ws_last_rx_ms(t->ws)));
            ws_close(t->ws, WS_CLOSE_INTERNAL, "keepalive_timeout");
            tun_down(t, "keepalive_timeout", NULL);
            return;
        }
        if (now >= t->next_ping_ms && t->osr != NULL) {
            /* the relay pings us; an RFC 6455 ping when it has been quiet for
             * an interval makes a live one answer */
            t->next_ping_ms = now + (uint64_t)t->ping_s * 1000u;
            if (now - ws_last_rx_ms(t->ws) >= (uint64_t)t->ping_s * 1000u)
                (void)ws_ping(t->ws);
        } else if (now >= t->next_ping_ms) {
            uint8_t opaque[8];
            for (size_t i = 0; i < 8; i++)
                opaque[i] = (uint8_t)(now >> (56 - 8 * i));
            t->next_ping_ms = now + (uint64_t)t->ping_s * 1000u;
            nghttp2_submit_ping(t->h2, NGHTTP2_FLAG_NONE, opaque);
            tun_flush(t);
        }
        adds_kick(t);
        break;
    case TUN_ST_CLOSING:
        break;
    }
}

/* ---- WebSocket ---------------------------------------------------------- */

static int on_binary(void *arg, const uint8_t *data, size_t len)
{
    struct ag_tun *t = arg;
    ssize_t rv;

    if (t->down || t->mode == TUN_MODE_OSAURUS)
        return 0; /* the relay protocol has no binary frames: ignored, as the relay does */
    if (t->h2 == NULL) {
        (void)util_snprintf(t->close_reason, sizeof(t->close_reason), "binary data before auth_ok");
        ws_close(t->ws, 4000, "protocol_error");
        t->state = TUN_ST_CLOSING;
        return 0;
    }
    if (t->state == TUN_ST_CLOSING)
        return 0;
    rv = nghttp2_session_mem_recv(t->h2, data, len);
    if (rv < 0) {
        (void)util_snprintf(t->close_reason, sizeof(t->close_reason), "http2: %s",
                            nghttp2_strerror((int)rv));
        nghttp2_session_terminate_session(t->h2, NGHTTP2_PROTOCOL_ERROR);
        nghttp2_session_send(t->h2);
        if (evbuffer_get_length(t->out) > 0)
            (void)ws_send_binary_buffer(t->ws, t->out, evbuffer_get_length(t->out));
        ws_close(t->ws, 4000, "protocol_error");
        t->state = TUN_ST_CLOSING;
        return 0;
    }
    tun_flush(t);
    return 0;
}

static void on_ws_close(void *arg, int code, const char *reason)
{
    struct ag_tun *t = arg;
    char why[256];

    if (t->down)
        return;
    if (code == WS_CLOSE_RESTART)
        t->restart = true; /* the gateway restarts: reconnect in about 1 s */
    if (t->close_reason[0] != '\0')
        (void)util_snprintf(why, sizeof(why), "%s", t->close_reason);
    else
        (void)util_snprintf(why, sizeof(why), "websocket closed %d %s", code, reason);
    tun_down(t, why, NULL);
}

static void on_writable(void *arg)
{
    struct ag_tun *t = arg;

    if (t->down)
        return;
    if (t->osr != NULL)
        ag_osr_on_writable(t->osr);
    tun_flush(t);
}

static const struct ws_callbacks tun_ws_cbs = {
    .on_text = on_text,
    .on_binary = on_binary,
    .on_close = on_ws_close,
    .on_writable = on_writable,
};

/* ---- dial and upgrade --------------------------------------------------- */

static void up_on_read(struct bufferevent *bev, void *arg)
{
    struct ag_tun *t = arg;
    char err[256];
    int status = 0;
    int rc;

    if (t->down)
        return;
    rc = ws_client_parse_response(bufferevent_get_input(bev), t->ws_key, tun_subprotocol(t),
                                  &status, err, sizeof(err));
    if (rc == 1)
        return;
    if (rc != 0) {
        char why[320];
        if (status == 101 && t->mode == TUN_MODE_OSAURUS)
            (void)util_snprintf(why, sizeof(why),
                                "gateway does not speak the Osaurus relay protocol; drop "
                                "--protocol osaurus for a tunnel-gateway (%s)",
                                err);
        else if (status == 101)
            (void)util_snprintf(why, sizeof(why),
                                "gateway does not speak " AG_TUN_SUBPROTOCOL
                                "; use --protocol osaurus for an Osaurus relay (%s)",
                                err);
        else
            (void)util_snprintf(why, sizeof(why), "upgrade refused: %s", err);
        tun_down(t, why, NULL);
        return;
    }
    t->ws = ws_conn_new(t->ctx->base, bev, true, TUN_CTL_MAX_BYTES, &tun_ws_cbs, t);
    t->bev = NULL; /* the WebSocket owns it now, also on failure */
    if (t->ws == NULL) {
        tun_down(t, "out of memory", NULL);
        return;
    }
    t->state = TUN_ST_AUTH;
    LOG_DEBUG(t->ctx->log, "tunnel_upgraded", LOG_U("tun", t->id));
}

static void up_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct ag_tun *t = arg;
    char why[320];

    if (t->down || (what & BEV_EVENT_CONNECTED))
        return;
    if (t->ctx->ssl_ctx != NULL) {
        SSL *ssl = bufferevent_openssl_get_ssl(bev);
        long vr = ssl != NULL ? SSL_get_verify_result(ssl) : X509_V_OK;
        unsigned long e = bufferevent_get_openssl_error(bev);
        if (vr != X509_V_OK) {
            (void)util_snprintf(why, sizeof(why), "TLS: certificate verification failed: %s",
                                X509_verify_cert_error_string(vr));
            tls_drain_errors();
            tun_down(t, why, NULL);
            return;
        }
        if (e != 0) {
            char buf[200];
            ERR_error_string_n(e, buf, sizeof(buf));
            (void)util_snprintf(why, sizeof(why), "TLS: %s", buf);
            tls_log_errors(t->ctx->log, "tunnel_tls_error");
            tun_down(t, why, NULL);
            return;
        }
    }
    (void)util_snprintf(why, sizeof(why), "%s during the upgrade",
                        (what & BEV_EVENT_EOF) ? "connection closed" : "connection error");
    tun_down(t, why, NULL);
}

static void on_dialled(void *arg, evutil_socket_t fd, const char *err)
{
    struct ag_tun *t = arg;
    struct ag_ctx *ctx = t->ctx;
    struct evbuffer *req;
    char why[512];

    t->dial = NULL;
    if (fd < 0) {
        (void)util_snprintf(why, sizeof(why), "gateway %s:%u unreachable: %s",
                            ctx->opts->gateway.host, (unsigned)ctx->opts->gateway.port, err);
        tun_down(t, why, NULL);
        return;
    }
    if (ctx->ssl_ctx != NULL) {
        SSL *ssl = SSL_new(ctx->ssl_ctx);
        if (ssl == NULL || tls_client_prepare(ssl, ctx->opts->gateway.host) != 0) {
            SSL_free(ssl);
            evutil_closesocket(fd);
            tun_down(t, "TLS setup failed", NULL);
            return;
        }
        t->bev = bufferevent_openssl_socket_new(ctx->base, fd, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
        if (t->bev != NULL)
            bufferevent_openssl_set_allow_dirty_shutdown(t->bev, 1);
    } else {
        t->bev =
            bufferevent_socket_new(ctx->base, fd, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
    }
    if (t->bev == NULL) {
        evutil_closesocket(fd);
        tun_down(t, "out of memory", NULL);
        return;
    }
    t->state = TUN_ST_UPGRADE;
    bufferevent_set_max_single_read(t->bev, TUN_IO_MAX);
    bufferevent_set_max_single_write(t->bev, TUN_IO_MAX);
    bufferevent_setcb(t->bev, up_on_read, NULL, up_on_event, t);
    req = bufferevent_get_output(t->bev);
    if (ws_client_key(t->ws_key) != 0 ||
        ws_client_request(req, ctx->host_port, AG_TUNNEL_PATH, t->ws_key, tun_subprotocol(t),
                          NULL) != 0) {
        tun_down(t, "cannot build the upgrade request", NULL);
        return;
    }
    bufferevent_enable(t->bev, EV_READ | EV_WRITE);
}

struct ag_tun *ag_tun_new(struct ag_ctx *ctx, const struct ag_tun_cbs *cb, void *arg)
{
    struct ag_tun *t = calloc(1, sizeof(*t));
    struct timeval sec = {1, 0};

    if (t == NULL)
        return NULL;
    t->ctx = ctx;
    t->mode = ctx->opts->protocol == AG_PROTO_OSAURUS ? TUN_MODE_OSAURUS : TUN_MODE_NATIVE;
    t->cb = cb;
    t->arg = arg;
    list_init(&t->link);
    list_init(&t->streams);
    t->id = ++ctx->next_id;
    t->start_ms = clk_mono_ms(ctx->clk);
    t->ping_s = TUN_DEFAULT_PING_S;
    t->out = evbuffer_new();
    t->tick_ev = event_new(ctx->base, -1, EV_PERSIST, on_tick, t);
    t->flush_ev = event_new(ctx->base, -1, 0, on_flush_ev, t);
    if (t->out == NULL || t->tick_ev == NULL || t->flush_ev == NULL)
        goto fail_t;
    event_add(t->tick_ev, &sec);
    LOG_INFO(ctx->log, "tunnel_connecting", LOG_U("tun", t->id),
             LOG_S("gateway", ctx->opts->gateway_url));
    t->dial = ag_pxy_dial_start(ctx->base, ctx->dns, &ctx->opts->proxy, ctx->opts->gateway.host,
                                ctx->opts->gateway.port, TUN_DIAL_TIMEOUT_MS, on_dialled, t);
    if (t->dial == NULL)
        goto fail_t;
    return t;

fail_t:
    ag_tun_free(t);
    return NULL;
}

void ag_tun_free(struct ag_tun *t)
{
    if (t == NULL)
        return;
    while (!list_is_empty(&t->streams)) /* nghttp2_session_del() does not report closes */
        stream_free(LIST_ENTRY(t->streams.next, struct tun_stream, link));
    if (t->h2 != NULL)
        nghttp2_session_del(t->h2);
    t->h2 = NULL;
    ag_osr_free(t->osr); /* before the WebSocket it sends on */
    t->osr = NULL;
    ag_pxy_dial_cancel(t->dial);
    if (t->bev != NULL)
        bufferevent_free(t->bev);
    ws_free(t->ws);
    if (t->tick_ev != NULL)
        event_free(t->tick_ev);
    if (t->flush_ev != NULL)
        event_free(t->flush_ev);
    if (t->out != NULL)
        evbuffer_free(t->out);
    free(t);
}

/* The end, reported once: t goes dead and quiet (no timer, dial or reads;
 * the connection stays open until ag_tun_free()) and tells its owner, which
 * frees it later from the loop. The caller may go on touching t. */
static void tun_down(struct ag_tun *t, const char *reason, const char *auth_code)
{
    char why[256];
    char code[TUN_CODE_MAX + 1];

    if (t->down)
        return;
    t->down = true;
    t->state = TUN_ST_CLOSING;
    (void)util_snprintf(why, sizeof(why), "%s", reason);
    (void)util_snprintf(code, sizeof(code), "%s", auth_code != NULL ? auth_code : "");
    event_del(t->tick_ev);
    event_del(t->flush_ev);
    ag_pxy_dial_cancel(t->dial); /* NULL when called from on_dialled */
    t->dial = NULL;
    if (t->bev != NULL)
        bufferevent_disable(t->bev, EV_READ | EV_WRITE);
    t->cb->on_down(t->arg, t, why, auth_code != NULL ? code : NULL);
}

/* ---- daemon API ------------------------------------------------------------ */

void ag_tun_register(struct ag_tun *t, struct ag_agt *a)
{
    struct tun_reg *r;

    if (t->state != TUN_ST_UP)
        return;
    r = reg_get(t, a->cfg.address);
    if (r == NULL || r->pending == REG_ADDING || r->pending == REG_WANT_ADD)
        return;
    r->pending = REG_WANT_ADD;
    r->retry_at_ms = 0;
    adds_kick(t);
}

void ag_tun_unregister(struct ag_tun *t, struct ag_agt *a)
{
    struct tun_reg *r = reg_find(t, a->cfg.address);

    if (r == NULL)
        return;
    if (r->active || r->pending == REG_ADDING) {
        if (t->ws != NULL && t->state != TUN_ST_CLOSING)
            send_remove(t, r->addr);
    }
    r->active = false;
    if (r->pending != REG_IN_AUTH) /* auth_ok will remove it (reg_accepted) */
        r->pending = REG_NONE;
}

void ag_tun_release(struct ag_tun *t)
{
    if (!t->hold)
        return;
    t->hold = false;
    tun_schedule_flush(t);
}

void ag_tun_drain(struct ag_tun *t)
{
    if (t->goaway_sent || t->down)
        return;
    t->goaway_sent = true;
    if (t->osr != NULL && t->state != TUN_ST_CLOSING) {
        /* no GOAWAY in the relay protocol: the relay stops routing to us once
         * the agents are removed; what is in flight finishes, then we close */
        for (size_t i = 0; i < t->nregs; i++) {
            struct tun_reg *r = &t->regs[i];
            if (r->active || r->pending == REG_ADDING)
                send_remove(t, r->addr);
            r->active = false;
            r->pending = REG_NONE;
        }
        ag_osr_drain(t->osr);
        if (t->state == TUN_ST_UP)
            t->state = TUN_ST_DRAINING;
        tun_schedule_flush(t);
        return;
    }
    if (t->h2 == NULL || t->state == TUN_ST_CLOSING) {
        if (t->ws != NULL && t->state != TUN_ST_CLOSING) {
            ws_close(t->ws, WS_CLOSE_NORMAL, "shutting down");
            t->state = TUN_ST_CLOSING;
        } else if (t->ws == NULL) {
            /* still dialling or upgrading: nothing to finish */
            t->state = TUN_ST_CLOSING;
            event_active(t->flush_ev, 0, 0);
        }
        return;
    }
    nghttp2_submit_goaway(t->h2, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(t->h2),
                          NGHTTP2_NO_ERROR, NULL, 0);
    tun_schedule_flush(t);
}
