/* Tunnels; see gw_tun.h.
 *
 * States: AUTH (challenge sent, waiting for auth, 10 s deadline) -> LIVE
 * (agents registered, the protocol's session started) -> CLOSING (close
 * frame sent or connection lost; streams failed) -> freed at the next kick
 * once ws reported on_close.
 *
 * Ownership:
 * - gw_ctx.tuns lists every tunnel; a tunnel frees itself (tun_free) only
 *   from its own kick event, never from inside ws or session processing.
 * - struct gw_tun_agent entries are owned by their tunnel; the registry
 *   borrows their struct gw_route, which leaves it before the entry is freed.
 * - the session (proto->sess_new) is owned by the tunnel and freed with it;
 *   its streams borrow their gw_reqs (see the protocol's file). */
#include "gw_tun.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "clk.h"
#include "gw.h"
#include "gw_allow.h"
#include "gw_cfg.h"
#include "gw_ipt.h"
#include "gw_rds.h"
#include "gw_reg.h"
#include "gw_up.h"
#include "id.h"
#include "list.h"
#include "log.h"
#include "util.h"
#include "ws.h"

enum gw_tun_state {
    GW_TUN_ST_AUTH = 0,
    GW_TUN_ST_LIVE,
    GW_TUN_ST_CLOSING,
};

struct gw_tun_agent {
    struct gw_route rt;                  /* borrowed by the registry */
    struct gw_tun *tun;                  /* owner */
    struct list node;                    /* in gw_tun.agents */
};

struct gw_tun {
    struct gw_ctx *ctx;
    uint64_t id;
    struct list node;                    /* in ctx->tuns */
    struct ws_conn *ws;                  /* owned */
    const struct gw_tun_proto *proto;
    void *sess;                          /* the protocol's session, owned */
    enum gw_tun_state state;
    char peer_ip[INET6_ADDRSTRLEN];
    struct sockaddr_storage peer;        /* TCP peer, for the per-IP tunnel count */
    char instance[65];                   /* from auth; "" in Osaurus mode without one */

    char nonce[65];                      /* outstanding challenge, "" if none */
    uint64_t nonce_expiry_ms;

    struct event *auth_timer;            /* AUTH deadline */
    struct event *ping_timer;            /* keepalive: the next ping or the silence deadline */
    uint64_t next_ping_ms;               /* when the next ping is due */
    struct event *kick;                  /* deferred flush / free */

    struct list agents;                  /* struct gw_tun_agent, owned */
    size_t nagents;

    bool dead;                           /* free at the next kick */
    bool handed_over;                    /* drain: told to move, routes kept meanwhile */
    bool counted;                        /* counted in ctx->tunnels_live */
    bool pending;                        /* holds a pending slot (ctx and per IP) */
    unsigned features;                   /* TUN_FEAT_* from the auth message */
    struct rate_win ctl_rate;            /* control-message rate limit */
};

static struct gw_tun_agent *agent_of(struct list *n)
{
    return LIST_ENTRY(n, struct gw_tun_agent, node);
}

static uint64_t now_ms(const struct gw_tun *t)
{
    return clk_mono_ms(t->ctx->clk);
}

/* ---- control messages (encoded by tun_msg) ---- */

int gw_tun_send_msg(struct gw_tun *t, const struct tun_msg *m)
{
    size_t len;
    char *s = tun_msg_encode(m, &len);
    int rv;

    if (s == NULL)
        return -1;
    rv = ws_send_text(t->ws, s, len);
    free(s);
    return rv;
}

static int tun_new_nonce(struct gw_tun *t)
{
    uint8_t raw[32];

    if (clk_rand(t->ctx->clk, raw, sizeof(raw)) != 0)
        return -1;
    util_hex_encode(raw, sizeof(raw), t->nonce);
    t->nonce_expiry_ms = now_ms(t) + TUN_NONCE_TTL_S * 1000u;
    return 0;
}

static void tun_send_challenge(struct gw_tun *t)
{
    struct tun_msg m;

    if (tun_new_nonce(t) != 0) {
        gw_tun_close(t, WS_CLOSE_INTERNAL, "rng");
        return;
    }
    tun_msg_init(&m, TUN_MSG_CHALLENGE, t->proto->mode);
    memcpy(m.challenge.nonce, t->nonce, sizeof(m.challenge.nonce));
    m.challenge.expires_in_s = TUN_NONCE_TTL_S;
    gw_tun_send_msg(t, &m);
}

/* Consumes the outstanding nonce if it matches and is fresh. */
static bool tun_take_nonce(struct gw_tun *t, const char *nonce)
{
    bool ok = t->nonce[0] != '\0' && strlen(nonce) == TUN_NONCE_HEX_LEN &&
              CRYPTO_memcmp(nonce, t->nonce, TUN_NONCE_HEX_LEN) == 0 &&
              now_ms(t) <= t->nonce_expiry_ms;

    t->nonce[0] = '\0';
    return ok;
}

static enum gw_auth_outcome auth_outcome(enum tun_err e)
{
    switch (e) {
    case TUN_E_SIGNATURE_VERIFICATION_FAILED:
    case TUN_E_INVALID_SIGNATURE:
        return GW_AUTH_SIGNATURE;
    case TUN_E_INVALID_NONCE:
        return GW_AUTH_NONCE;
    case TUN_E_TIMESTAMP_OUT_OF_RANGE:
        return GW_AUTH_TIMESTAMP;
    case TUN_E_ADDRESS_NOT_ALLOWED:
        return GW_AUTH_NOT_ALLOWED;
    case TUN_E_AUTH_TIMEOUT:
        return GW_AUTH_TIMEOUT;
    case TUN_E_TOO_MANY_AGENTS:
        return GW_AUTH_TOO_MANY_AGENTS;
    default:
        return GW_AUTH_MALFORMED;
    }
}

static void tun_auth_error(struct gw_tun *t, enum tun_err e)
{
    struct tun_msg m;
    enum tun_err sent = tun_err_for_mode(e, t->proto->mode, TUN_MSG_AUTH);
    int code;

    if (sent == TUN_E_NONE)
        sent = e;
    t->ctx->n.auth_failures++;
    gw_metrics_auth(t->ctx, auth_outcome(e));
    tun_msg_init(&m, TUN_MSG_AUTH_ERROR, t->proto->mode);
    m.error.err = sent;
    /* which domain signatures must name, so an agent that dialled us by IP
     * or another name can say so (PROTOCOL.md 4.6), where the protocol signs one */
    if (sent == TUN_E_SIGNATURE_VERIFICATION_FAILED && t->proto->signs_domain)
        (void)util_snprintf(m.error.domain, sizeof(m.error.domain), "%s", t->ctx->cfg->domain);
    gw_tun_send_msg(t, &m);
    LOG_INFO(t->ctx->log, "auth_failed", LOG_U("tun", t->id), LOG_S("peer", t->peer_ip),
             LOG_S("err", tun_err_code(sent)));
    code = tun_err_close_code(sent);
    gw_tun_close(t, code != 0 ? code : 4000, tun_err_code(sent));
}

static void tun_send_error(struct gw_tun *t, enum tun_err e, enum tun_msg_type in_reply_to,
                           const uint8_t *addr)
{
    struct tun_msg m;
    enum tun_err sent = tun_err_for_mode(e, t->proto->mode, in_reply_to);

    if (sent == TUN_E_NONE)
        return; /* this mode stays silent */
    tun_msg_init(&m, TUN_MSG_ERROR, t->proto->mode);
    m.error.err = sent;
    if (addr != NULL) {
        m.error.has_addr = true;
        memcpy(m.error.addr, addr, ID_ADDR_LEN);
    }
    gw_tun_send_msg(t, &m);
}

static void tun_send_agent_removed(struct gw_tun *t, const uint8_t *addr, enum tun_reason reason)
{
    struct tun_msg m;

    tun_msg_init(&m, TUN_MSG_AGENT_REMOVED, t->proto->mode);
    memcpy(m.agent_removed.addr, addr, ID_ADDR_LEN);
    m.agent_removed.reason = reason;
    gw_tun_send_msg(t, &m);
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
    uint16_t port = t->ctx->main_port != 0 ? t->ctx->main_port : cfg->listen.port;
    bool https = !cfg->no_tls;
    if ((https && port == 443) || (!https && port == 80))
        util_snprintf(out, size, "%s://%s.%s", https ? "https" : "http", addr, cfg->domain);
    else
        util_snprintf(out, size, "%s://%s.%s:%u", https ? "https" : "http", addr, cfg->domain,
                      port);
}

/* ---- agents and registration ---- */

/* Unlinks a from its tunnel and the registry, and frees it. */
static void agent_unlink_free(struct gw_tun *t, struct gw_tun_agent *a)
{
    if (list_is_linked(&a->node)) {
        list_unlink(&a->node);
        t->nagents--;
    }
    if (gw_reg_get(t->ctx->reg, a->rt.addr) == &a->rt)
        gw_rds_release(t->ctx->rds, &a->rt);
    gw_reg_remove(t->ctx->reg, a->rt.addr, &a->rt);
    free(a);
}

static struct gw_tun_agent *tun_find_agent(struct gw_tun *t, const uint8_t *addr)
{
    struct list *n;
    struct list *tmp;

    LIST_FOREACH_SAFE(n, tmp, &t->agents)
    {
        if (memcmp(agent_of(n)->rt.addr, addr, ID_ADDR_LEN) == 0)
            return agent_of(n);
    }
    return NULL;
}

/* A tunnel that lost its last agent to another has nothing left to serve:
 * its protocol closes it once its streams are done. */
static void tun_retire_if_empty(struct gw_tun *t)
{
    if (t->nagents > 0 || t->state != GW_TUN_ST_LIVE)
        return;
    t->proto->retire(t->sess);
}

/* Registers addr on t; tells the tunnel that held it before. */
static int tun_register(struct gw_tun *t, const uint8_t *addr, uint64_t resp_timeout_s)
{
    struct gw_tun_agent *a = tun_find_agent(t, addr);
    struct gw_route *old;
    int oom;

    if (a == NULL) {
        a = calloc(1, sizeof(*a));
        if (a == NULL)
            return -1;
        a->tun = t;
        memcpy(a->rt.addr, addr, ID_ADDR_LEN);
        id_addr_to_str(addr, a->rt.addr_str);
        a->rt.up = t->proto->up;
        a->rt.owner = t->sess;
        a->rt.since_unix_ms = (uint64_t)clk_unix_s(t->ctx->clk) * 1000u;
        a->rt.instance = t->instance;
        util_snprintf(a->rt.peer_ip, sizeof(a->rt.peer_ip), "%s", t->peer_ip);
        list_insert_tail(&t->agents, &a->node);
        t->nagents++;
    }
    if (resp_timeout_s != 0) {
        uint64_t max = t->ctx->cfg->max_resp_header_timeout_s;
        a->rt.resp_timeout_ms = (max != 0 && resp_timeout_s > max ? max : resp_timeout_s) * 1000u;
    }
    a->rt.claim_ms = util_unix_ms();
    old = gw_reg_set(t->ctx->reg, addr, &a->rt, &oom);
    if (oom) {
        agent_unlink_free(t, a);
        return -1;
    }
    gw_rds_claim(t->ctx->rds, &a->rt);
    if (old != NULL && old != &a->rt) {
        /* every route in the registry is a tunnel's agent entry */
        struct gw_tun_agent *oa = LIST_ENTRY(old, struct gw_tun_agent, rt);
        struct gw_tun *ot = oa->tun;
        bool same = t->instance[0] != '\0' && strcmp(ot->instance, t->instance) == 0;
        if (!same)
            t->ctx->n.takeovers++;
        LOG_INFO(t->ctx->log, same ? "agent_replaced" : "agent_superseded",
                 LOG_S("addr", oa->rt.addr_str), LOG_U("old_tun", ot->id), LOG_U("tun", t->id));
        /* the registry already points at a: unlink the old entry without
         * touching the registry */
        list_unlink(&oa->node);
        ot->nagents--;
        if (ot->state == GW_TUN_ST_LIVE)
            tun_send_agent_removed(ot, oa->rt.addr, same ? TUN_REASON_REPLACED
                                                         : TUN_REASON_SUPERSEDED);
        free(oa);
        tun_retire_if_empty(ot);
    }
    return 0;
}

static bool addr_allowed(const struct gw_tun *t, const uint8_t *addr)
{
    if (gw_admin_denied(t->ctx, addr))
        return false;
    if (t->ctx->allow != NULL)
        return gw_allow_has(t->ctx->allow, addr);
    return t->ctx->cfg->open_effective;
}

/* Verifies one agent entry: the signature over the protocol's signed text. */
static enum tun_err check_agent(struct gw_tun *t, const struct tun_msg_agent_auth *a,
                                const char *nonce, int64_t ts)
{
    char text[TUN_SIGNED_TEXT_MAX];
    int n = t->proto->signed_text(text, sizeof(text), t->ctx->cfg->domain, a, nonce, ts);

    if (n < 0 || id_verify(text, (size_t)n, a->sig, strlen(a->sig), a->addr) != ID_OK)
        return TUN_E_SIGNATURE_VERIFICATION_FAILED;
    if (!addr_allowed(t, a->addr))
        return TUN_E_ADDRESS_NOT_ALLOWED;
    return TUN_E_NONE;
}

/* ---- authentication and control messages ---- */

/* Gives back the slot of an unauthenticated tunnel (gw_tep took it). */
static void tun_release_pending(struct gw_tun *t)
{
    if (!t->pending)
        return;
    t->pending = false;
    t->ctx->tunnels_pending--;
    gw_ipt_pending_release(t->ctx->ipt, (struct sockaddr *)&t->peer);
}

static void tun_go_live(struct gw_tun *t, const struct tun_msg *ok)
{
    t->state = GW_TUN_ST_LIVE;
    evtimer_del(t->auth_timer);
    tun_release_pending(t);
    ws_set_max_text(t->ws, t->proto->max_text);
    t->ctx->tunnels_live++;
    t->counted = true;
    gw_metrics_auth(t->ctx, GW_AUTH_OK);
    gw_tun_send_msg(t, ok);
    if (t->proto->start(t->sess, t->features) != 0) {
        gw_tun_close(t, WS_CLOSE_INTERNAL, "out of memory");
        return;
    }
    if (t->ctx->cfg->ping_interval_s != 0) {
        struct timeval tv = {(time_t)t->ctx->cfg->ping_interval_s, 0};
        t->next_ping_ms = now_ms(t) + t->ctx->cfg->ping_interval_s * 1000u;
        evtimer_add(t->ping_timer, &tv);
    }
    LOG_INFO(t->ctx->log, "tunnel_up", LOG_U("tun", t->id), LOG_S("peer", t->peer_ip),
             LOG_S("mode", t->proto->name), LOG_U("agents", t->nagents),
             LOG_S("instance", t->instance));
}

static bool ts_fresh(const struct gw_tun *t, int64_t ts)
{
    int64_t now = clk_unix_s(t->ctx->clk);

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

    rv = tun_msg_decode_auth(data, len, t->proto->mode, &m, NULL);
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
    if (!ts_fresh(t, m.auth.timestamp)) {
        tun_msg_clear(&m);
        tun_auth_error(t, TUN_E_TIMESTAMP_OUT_OF_RANGE);
        return;
    }
    util_snprintf(t->instance, sizeof(t->instance), "%s", m.auth.instance);
    t->features = m.auth.features;
    /* check every entry before registering any (Osaurus: all or nothing) */
    for (size_t i = 0; i < m.auth.n_agents; i++) {
        const struct tun_msg_agent_auth *a = &m.auth.agents[i];
        errs[i] = check_agent(t, a, m.auth.nonce, m.auth.timestamp);
        if (errs[i] != TUN_E_NONE && first_err == TUN_E_NONE)
            first_err = errs[i];
        if (errs[i] == TUN_E_NONE)
            accepted++;
    }
    if (accepted == 0 || (t->proto->auth_all_or_nothing && first_err != TUN_E_NONE)) {
        tun_msg_clear(&m);
        tun_auth_error(t, first_err);
        return;
    }
    tun_msg_init(&ok, TUN_MSG_AUTH_OK, t->proto->mode);
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
            gw_tun_close(t, WS_CLOSE_INTERNAL, "out of memory");
            return;
        }
        struct tun_msg_agent_url *u = &ok.auth_ok.agents[ok.auth_ok.n_agents++];
        memcpy(u->addr, a->addr, ID_ADDR_LEN);
        agent_url(t, lower, u->url, sizeof(u->url));
        LOG_INFO(t->ctx->log, "agent_registered", LOG_U("tun", t->id), LOG_S("addr", lower));
    }
    util_snprintf(ok.auth_ok.region, sizeof(ok.auth_ok.region), "%s", t->ctx->cfg->region);
    ok.auth_ok.ping_interval_s = (uint32_t)t->ctx->cfg->ping_interval_s; /* native only */
    /* Osaurus mode: what we accept from this client (tunnel-agent sends base64 bodies
     * only where this says so; the relay never does) */
    ok.auth_ok.features = t->features & TUN_FEAT_BASE64;
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
    if (!ts_fresh(t, add->timestamp)) {
        tun_send_error(t, TUN_E_TIMESTAMP_OUT_OF_RANGE, TUN_MSG_ADD_AGENT, a->addr);
        return;
    }
    e = check_agent(t, a, add->nonce, add->timestamp);
    if (e == TUN_E_NONE && tun_find_agent(t, a->addr) == NULL &&
        t->ctx->cfg->max_agents_per_tunnel != 0 && t->nagents >= t->ctx->cfg->max_agents_per_tunnel)
        e = TUN_E_MAX_AGENTS_REACHED;
    if (e != TUN_E_NONE) {
        tun_send_error(t, e, TUN_MSG_ADD_AGENT, a->addr);
        return;
    }
    if (tun_register(t, a->addr, a->response_timeout_s) != 0) {
        gw_tun_close(t, WS_CLOSE_INTERNAL, "out of memory");
        return;
    }
    tun_msg_init(&m, TUN_MSG_AGENT_ADDED, t->proto->mode);
    memcpy(m.agent_added.addr, a->addr, ID_ADDR_LEN);
    agent_url(t, lower, m.agent_added.url, sizeof(m.agent_added.url));
    util_snprintf(m.agent_added.region, sizeof(m.agent_added.region), "%s", t->ctx->cfg->region);
    gw_tun_send_msg(t, &m);
    LOG_INFO(t->ctx->log, "agent_registered", LOG_U("tun", t->id), LOG_S("addr", lower));
}

/* Control messages after auth, rate-limited per connection; data messages
 * (ping, pong, response, stream_*) go to the session. */
static void tun_on_control(struct gw_tun *t, const char *data, size_t len)
{
    struct tun_msg m;
    int rv = tun_msg_decode(data, len, t->proto->mode, &m, NULL);

    if (rv != 0) {
        if (t->proto->on_bad_data(t->sess, &m, (enum tun_err)rv))
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
        t->proto->on_data(t->sess, &m);
        tun_msg_clear(&m);
        return;
    default:
        break;
    }
    if (!rate_win_hit(&t->ctl_rate, now_ms(t), 60000, t->proto->ctl_per_min)) {
        gw_metrics_limit(t->ctx, GW_LIMIT_CONTROL_MESSAGES);
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
            memcpy(addr, a->rt.addr, sizeof(addr));
            LOG_INFO(t->ctx->log, "agent_unregistered", LOG_U("tun", t->id),
                     LOG_S("addr", a->rt.addr_str), LOG_S("reason", "removed"));
            agent_unlink_free(t, a);
            tun_send_agent_removed(t, addr, t->proto->removed_reason);
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

    if (t->proto->on_binary == NULL || t->state == GW_TUN_ST_CLOSING)
        return 0; /* a protocol without binary messages ignores them (as the relay does) */
    if (t->state == GW_TUN_ST_AUTH) { /* the first message is auth */
        tun_auth_error(t, TUN_E_EXPECTED_AUTH_FRAME);
        return 0;
    }
    if (t->proto->on_binary(t->sess, data, len) != 0) {
        gw_tun_close(t, WS_CLOSE_PROTOCOL_ERROR, "protocol error");
        return 0;
    }
    gw_tun_kick(t);
    return 0;
}

static void tun_on_close(void *arg, int code, const char *reason)
{
    struct gw_tun *t = arg;

    if (t->state != GW_TUN_ST_CLOSING)
        gw_tun_close(t, code, reason);
    t->dead = true;
    gw_tun_kick(t);
}

static void tun_on_writable(void *arg)
{
    struct gw_tun *t = arg;

    if (t->state != GW_TUN_ST_CLOSING)
        t->proto->flush(t->sess);
}

static const struct ws_callbacks tun_ws_cbs = {
    .on_text = tun_on_text,
    .on_binary = tun_on_binary,
    .on_close = tun_on_close,
    .on_writable = tun_on_writable,
};

/* An active kick moves to the end of the loop's queue, however often it is
 * kicked: a front end that reads a client's body one TLS record per callback
 * queues its next read before it kicks (h1_on_read), so the session sends
 * what the whole read brought in one message, not one per record. */
void gw_tun_kick(struct gw_tun *t)
{
    event_del(t->kick);
    event_active(t->kick, EV_TIMEOUT, 0);
}

static void tun_free(struct gw_tun *t);

static void tun_on_kick(evutil_socket_t fd, short what, void *arg)
{
    struct gw_tun *t = arg;

    if (!t->dead && t->state != GW_TUN_ST_CLOSING)
        t->proto->flush(t->sess);
    if (t->dead)
        tun_free(t);
}

static void tun_on_auth_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct gw_tun *t = arg;

    if (t->state == GW_TUN_ST_AUTH)
        tun_auth_error(t, TUN_E_AUTH_TIMEOUT);
}

/* Keepalive: a ping every interval, and the tunnel closed once nothing has
 * arrived for TUN_DEAD_AFTER_PINGS intervals. The timer fires at whichever
 * comes first, so the silence is caught at its deadline, not at the next
 * ping after it (up to an interval late). */
static void tun_on_ping(evutil_socket_t fd, short what, void *arg)
{
    struct gw_tun *t = arg;
    uint64_t interval_ms = t->ctx->cfg->ping_interval_s * 1000u;
    uint64_t now = now_ms(t);
    uint64_t last = ws_last_rx_ms(t->ws);
    uint64_t dead_at = last + TUN_DEAD_AFTER_PINGS * interval_ms;
    uint64_t next;
    struct timeval tv;

    if (t->state != GW_TUN_ST_LIVE)
        return;
    if (now >= dead_at) {
        LOG_INFO(t->ctx->log, "tunnel_silent", LOG_U("tun", t->id), LOG_U("silent_ms", now - last));
        gw_tun_close(t, WS_CLOSE_GOING_AWAY, "keepalive timeout");
        return;
    }
    if (now >= t->next_ping_ms) {
        t->proto->ping(t->sess);
        t->next_ping_ms = now + interval_ms;
    }
    next = (t->next_ping_ms < dead_at ? t->next_ping_ms : dead_at) - now;
    tv.tv_sec = (time_t)(next / 1000u);
    tv.tv_usec = (suseconds_t)(next % 1000u) * 1000;
    evtimer_add(t->ping_timer, &tv);
}

void gw_tun_close(struct gw_tun *t, int code, const char *reason)
{
    if (t->state == GW_TUN_ST_CLOSING)
        return;
    if (t->state == GW_TUN_ST_LIVE)
        LOG_INFO(t->ctx->log, "tunnel_down", LOG_U("tun", t->id), LOG_S("peer", t->peer_ip),
                 LOG_I("code", code), LOG_S("reason", reason));
    t->state = GW_TUN_ST_CLOSING;
    while (!list_is_empty(&t->agents))
        agent_unlink_free(t, agent_of(t->agents.next));
    t->proto->fail_all(t->sess);
    tun_release_pending(t);
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
        gw_tun_close(t, WS_CLOSE_GOING_AWAY, "shutdown");
    t->proto->sess_free(t->sess);
    list_unlink(&t->node);
    gw_ipt_tunnel_release(t->ctx->ipt, (struct sockaddr *)&t->peer);
    ws_free(t->ws);
    event_free(t->kick);
    event_free(t->ping_timer);
    event_free(t->auth_timer);
    free(t);
}

int gw_tun_accept(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                  const char *ws_accept, const struct gw_tun_proto *proto, uint64_t conn_id,
                  const char *client_ip)
{
    struct gw_tun *t;
    struct evbuffer *out = bufferevent_get_output(bev);
    struct timeval tv = {TUN_AUTH_TIMEOUT_S, 0};

    t = calloc(1, sizeof(*t));
    if (t == NULL)
        goto fail_bev;
    list_init(&t->agents);
    t->kick = event_new(ctx->base, -1, 0, tun_on_kick, t);
    t->ping_timer = evtimer_new(ctx->base, tun_on_ping, t);
    t->auth_timer = evtimer_new(ctx->base, tun_on_auth_timeout, t);
    if (t->kick == NULL || t->ping_timer == NULL || t->auth_timer == NULL)
        goto fail_t;
    t->ctx = ctx;
    t->id = conn_id;
    t->proto = proto;
    t->pending = true;
    memcpy(&t->peer, peer,
           peer->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    util_snprintf(t->peer_ip, sizeof(t->peer_ip), "%s", client_ip);
    evbuffer_add_printf(out,
                        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                        "connection: Upgrade\r\nsec-websocket-accept: %s\r\n",
                        ws_accept);
    if (proto->subprotocol != NULL)
        evbuffer_add_printf(out, "sec-websocket-protocol: %s\r\n", proto->subprotocol);
    evbuffer_add(out, "\r\n", 2);
    /* before auth, every message is an auth message: at most a control
     * message's size in both modes (raised in tun_go_live) */
    t->ws = ws_conn_new(ctx->base, bev, false,
                        proto->max_text < TUN_CTL_MAX_BYTES ? proto->max_text : TUN_CTL_MAX_BYTES,
                        &tun_ws_cbs, t);
    bev = NULL; /* owned by ws now, also on failure */
    if (t->ws == NULL)
        goto fail_t;
    t->sess = proto->sess_new(t, ctx, t->ws, t->id);
    if (t->sess == NULL)
        goto fail_ws;
    list_insert_tail(&ctx->tuns, &t->node);
    ctx->n.tunnel_connections++;
    evtimer_add(t->auth_timer, &tv);
    LOG_DEBUG(ctx->log, "tunnel_open", LOG_U("tun", t->id), LOG_S("peer", t->peer_ip),
              LOG_S("mode", proto->name));
    tun_send_challenge(t);
    return 0;

fail_ws:
    ws_free(t->ws);
fail_t:
    if (t->kick != NULL)
        event_free(t->kick);
    if (t->ping_timer != NULL)
        event_free(t->ping_timer);
    if (t->auth_timer != NULL)
        event_free(t->auth_timer);
    free(t);
fail_bev:
    gw_ipt_pending_release(ctx->ipt, peer);
    ctx->tunnels_pending--;
    gw_ipt_tunnel_release(ctx->ipt, peer);
    if (bev != NULL)
        bufferevent_free(bev);
    return -1;
}

static struct gw_tun *tun_of(struct list *n)
{
    return LIST_ENTRY(n, struct gw_tun, node);
}

void gw_tun_drain_all(struct gw_ctx *ctx, bool handover)
{
    struct list *n;
    struct list *tmp;

    LIST_FOREACH_SAFE(n, tmp, &ctx->tuns)
    {
        struct gw_tun *t = tun_of(n);
        if (t->state == GW_TUN_ST_AUTH) {
            gw_tun_close(t, WS_CLOSE_RESTART, "draining");
            continue;
        }
        if (t->state != GW_TUN_ST_LIVE || (handover && t->handed_over))
            continue;
        if (handover && t->proto->drain_notice != NULL) {
            /* make-before-break: the agent opens its next tunnel (on
             * another node) while this one keeps serving; its routes move
             * when that one claims them (gw_tun_supersede) */
            t->handed_over = true;
            t->proto->drain_notice(t->sess);
            continue;
        }
        while (!list_is_empty(&t->agents))
            agent_unlink_free(t, agent_of(t->agents.next));
        t->proto->drain(t->sess);
    }
}

size_t gw_tun_streams_total(const struct gw_ctx *ctx)
{
    size_t total = 0;

    for (const struct list *n = ctx->tuns.next; n != &ctx->tuns; n = n->next) {
        const struct gw_tun *t = LIST_ENTRY(n, const struct gw_tun, node);
        total += t->proto->streams(t->sess);
    }
    return total;
}

void gw_tun_apply_allow(struct gw_ctx *ctx)
{
    struct list *n;
    struct list *tmp;

    LIST_FOREACH_SAFE(n, tmp, &ctx->tuns)
    {
        struct gw_tun *t = tun_of(n);
        struct list *an;
        struct list *atmp;
        if (t->state != GW_TUN_ST_LIVE)
            continue;
        LIST_FOREACH_SAFE(an, atmp, &t->agents)
        {
            struct gw_tun_agent *a = agent_of(an);
            if (!addr_allowed(t, a->rt.addr)) {
                uint8_t addr[ID_ADDR_LEN];
                memcpy(addr, a->rt.addr, sizeof(addr));
                LOG_INFO(ctx->log, "agent_unregistered", LOG_U("tun", t->id),
                         LOG_S("addr", a->rt.addr_str), LOG_S("reason", "not_allowed"));
                agent_unlink_free(t, a);
                tun_send_agent_removed(t, addr, TUN_REASON_NOT_ALLOWED);
            }
        }
        tun_retire_if_empty(t);
    }
}

void gw_tun_free_all(struct gw_ctx *ctx)
{
    while (!list_is_empty(&ctx->tuns))
        tun_free(tun_of(ctx->tuns.next));
}

void gw_tun_each_route(struct gw_ctx *ctx, void (*cb)(struct gw_route *rt, void *arg), void *arg)
{
    struct list *n;
    struct list *an;

    for (n = ctx->tuns.next; n != &ctx->tuns; n = n->next) {
        struct gw_tun *t = tun_of(n);
        if (t->state != GW_TUN_ST_LIVE)
            continue;
        for (an = t->agents.next; an != &t->agents; an = an->next)
            cb(&agent_of(an)->rt, arg);
    }
}

void gw_tun_supersede(struct gw_ctx *ctx, const uint8_t *addr, bool same_instance)
{
    struct gw_route *rt = gw_reg_get(ctx->reg, addr);
    struct gw_tun_agent *a;
    struct gw_tun *t;
    uint8_t copy[ID_ADDR_LEN];

    if (rt == NULL)
        return;
    a = LIST_ENTRY(rt, struct gw_tun_agent, rt);
    t = a->tun;
    memcpy(copy, addr, sizeof(copy));
    if (!same_instance)
        ctx->n.takeovers++;
    /* the newer claim is not ours to release: leave the registry first */
    gw_reg_remove(ctx->reg, a->rt.addr, &a->rt);
    agent_unlink_free(t, a);
    if (t->state == GW_TUN_ST_LIVE)
        tun_send_agent_removed(t, copy, same_instance ? TUN_REASON_REPLACED : TUN_REASON_SUPERSEDED);
    tun_retire_if_empty(t);
}

int gw_tun_remove_route(struct gw_ctx *ctx, const uint8_t *addr)
{
    struct gw_route *rt = gw_reg_get(ctx->reg, addr);
    struct gw_tun_agent *a;
    struct gw_tun *t;
    uint8_t copy[ID_ADDR_LEN];

    if (rt == NULL)
        return -1;
    /* every route in the registry is a tunnel's agent entry */
    a = LIST_ENTRY(rt, struct gw_tun_agent, rt);
    t = a->tun;
    memcpy(copy, addr, sizeof(copy));
    LOG_INFO(ctx->log, "agent_unregistered", LOG_U("tun", t->id), LOG_S("addr", a->rt.addr_str),
             LOG_S("reason", "admin"));
    agent_unlink_free(t, a);
    if (t->state == GW_TUN_ST_LIVE)
        tun_send_agent_removed(t, copy, t->proto->removed_reason);
    tun_retire_if_empty(t);
    return 0;
}
