/* tunnel-agent's daemon (ag_daemon.h): one struct ag_ctx per run, the live
 * agents (struct ag_agt, from agents.json), the active tunnel and the
 * draining ones, reconnect backoff, probes, the control socket and signals.
 * Tunnels report here through the ag_daemon_on_* functions (ag_ctx.h); the
 * daemon decides what each agent's state is and when to dial again.
 * Lifecycle of the tunnel slot:
 * 1. no tunnel: the reconnect timer dials when some agent is wanted;
 * 2. ctx->tun: dialling .. up; on down, backoff (1 s doubling to 60 s, +-20 %
 *    jitter, reset after 60 s up) and back to 1;
 * 3. gateway drains (GOAWAY / "draining"): the tunnel moves to ctx->old to
 *    finish its streams and a new one is dialled at once. */
#include "ag_daemon.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <openssl/rand.h>

#include "ag_ctl.h"
#include "ag_ctx.h"
#include "ag_fwd.h"
#include "ag_probe.h"
#include "ag_tun.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define BACKOFF_MIN_MS 1000u
#define BACKOFF_MAX_MS 60000u
#define HEALTHY_RESET_MS 60000u /* up this long: the backoff starts again at 1 s */
#define PROBE_PERIOD_MS 60000u
#define PROBE_RETRY_MIN_MS 2000u
#define SHUTDOWN_GRACE_S 30

static void daemon_apply(struct ag_ctx *ctx);
static void daemon_schedule_reconnect(struct ag_ctx *ctx, uint64_t delay_ms);

/* ---- agents ---------------------------------------------------------------- */

static const char *const state_names[] = {
    [AG_AGT_ST_DISCONNECTED] = "disconnected",
    [AG_AGT_ST_CONNECTING] = "connecting",
    [AG_AGT_ST_CONNECTED] = "connected",
    [AG_AGT_ST_ERROR] = "error",
};

static void agt_free(struct ag_agt *a)
{
    ag_probe_free(a->probe);
    if (a->probe_ev != NULL)
        event_free(a->probe_ev);
    ag_fwd_pool_free(a->pool);
    id_key_clear(&a->key);
    free(a);
}

void ag_agt_ref(struct ag_agt *a) { a->refs++; }

void ag_agt_unref(struct ag_agt *a)
{
    if (a == NULL)
        return;
    if (--a->refs == 0)
        agt_free(a);
}

bool ag_agt_wanted(const struct ag_agt *a)
{
    return !a->gone && a->cfg.enabled && !a->stopped && a->key_ok && a->target_ok &&
           !a->ctx->stopping;
}

struct ag_agt *ag_ctx_find_addr(struct ag_ctx *ctx, const char *addr)
{
    for (struct ag_agt *a = ctx->agents; a != NULL; a = a->next)
        if (strcmp(a->cfg.address, addr) == 0)
            return a;
    return NULL;
}

static bool any_wanted(const struct ag_ctx *ctx)
{
    for (const struct ag_agt *a = ctx->agents; a != NULL; a = a->next)
        if (ag_agt_wanted(a))
            return true;
    return false;
}

/* Derives the state shown by status from the facts; logs transitions. */
static void agt_update_state(struct ag_agt *a)
{
    enum ag_agt_state st;

    if (!a->cfg.enabled)
        st = AG_AGT_ST_DISCONNECTED;
    else if (a->stopped || !a->key_ok || !a->target_ok)
        st = AG_AGT_ST_ERROR;
    else if (a->online && a->probe_ok)
        st = AG_AGT_ST_CONNECTED;
    else if (a->ctx->stopping)
        st = AG_AGT_ST_DISCONNECTED;
    else
        st = AG_AGT_ST_CONNECTING;
    if (st == a->state)
        return;
    a->state = st;
    if (st == AG_AGT_ST_CONNECTED)
        LOG_INFO(a->ctx->log, "agent_connected", LOG_S("addr", a->cfg.address),
                 LOG_S("name", a->cfg.name), LOG_S("url", a->url),
                 LOG_U("probe_rtt_ms", a->probe_rtt_ms));
    else
        LOG_INFO(a->ctx->log, "agent_state", LOG_S("addr", a->cfg.address),
                 LOG_S("name", a->cfg.name), LOG_S("state", state_names[st]),
                 LOG_S("err", a->error[0] != '\0' ? a->error : NULL));
}

static void agt_set_offline(struct ag_agt *a)
{
    a->online = false;
    a->probe_ok = false;
    ag_probe_free(a->probe);
    event_del(a->probe_ev);
}

static void agt_stop(struct ag_agt *a, const char *why)
{
    a->stopped = true;
    (void)util_snprintf(a->error, sizeof(a->error), "%s", why);
    agt_set_offline(a);
    agt_update_state(a);
}

static void on_probe_timer(evutil_socket_t fd, short what, void *arg)
{
    struct ag_agt *a = arg;

    if (!a->online || a->probe != NULL || a->url[0] == '\0')
        return;
    if (ag_probe_start(a) == NULL) {
        struct timeval tv = {PROBE_RETRY_MIN_MS / 1000, 0};
        evtimer_add(a->probe_ev, &tv);
    }
}

static void probe_in(struct ag_agt *a, uint64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};

    evtimer_add(a->probe_ev, &tv);
}

/* Settings of one agent from agents.json into a (new or existing). */
static void agt_load(struct ag_agt *a, struct ag_store *st, struct ag_agent *cfg)
{
    char err[AG_STORE_ERR_LEN];
    struct ag_ctx *ctx = a->ctx;
    bool first = a->cfg.id[0] == '\0';
    bool target_changed = first || strcmp(a->cfg.target, cfg->target) != 0;

    a->cfg = *cfg;
    if (target_changed) {
        a->target_ok = ag_store_target_parse(cfg->target, &a->target, err, sizeof(err)) == 0;
        if (a->target_ok && a->target.tls) {
            a->target_ok = false;
            (void)util_snprintf(err, sizeof(err),
                                "https:// targets are not forwarded yet; use http://");
        }
        if (!a->target_ok) {
            (void)util_snprintf(a->error, sizeof(a->error), "target: %s", err);
            LOG_ERROR(ctx->log, "agent_bad_target", LOG_S("name", cfg->name), LOG_S("err", err));
        }
        a->target_gen++;
        ag_fwd_pool_flush(a->pool);
    }
    if (!a->key_ok) {
        if (ag_store_load_key(st, &a->cfg, &a->key, err, sizeof(err)) == 0) {
            a->key_ok = true;
        } else {
            (void)util_snprintf(a->error, sizeof(a->error), "key: %s", err);
            LOG_ERROR(ctx->log, "agent_bad_key", LOG_S("name", cfg->name), LOG_S("err", err));
        }
    }
    if (first && cfg->superseded) {
        a->stopped = true;
        (void)util_snprintf(a->error, sizeof(a->error),
                            "superseded by another instance holding the key "
                            "(enable the agent again to take it back)");
    }
    if (!first && a->stopped && !cfg->superseded) {
        /* A reload is the owner acting (enable, set, SIGHUP): an agent the
         * gateway refused gets one new attempt, not a retry loop (PROTOCOL.md
         * 4.7); a superseded one only once `enable` cleared the flag. */
        a->stopped = false;
        a->error[0] = '\0';
    }
}

static struct ag_agt *agt_new(struct ag_ctx *ctx, struct ag_store *st, struct ag_agent *cfg)
{
    struct ag_agt *a = calloc(1, sizeof(*a));

    if (a == NULL)
        return NULL;
    a->ctx = ctx;
    a->refs = 1;
    a->state = AG_AGT_ST_DISCONNECTED;
    a->probe_backoff_ms = PROBE_RETRY_MIN_MS;
    a->pool = ag_fwd_pool_new(a);
    a->probe_ev = evtimer_new(ctx->base, on_probe_timer, a);
    if (a->pool == NULL || a->probe_ev == NULL) {
        agt_free(a);
        return NULL;
    }
    agt_load(a, st, cfg);
    return a;
}

/* Re-reads agents.json and applies it: new, changed, re-enabled, disabled
 * and removed agents. Returns 0, or -1 (file unreadable: nothing changed). */
static int daemon_reload(struct ag_ctx *ctx)
{
    char err[AG_STORE_ERR_LEN];
    struct ag_store *st = ag_store_open(ctx->home, AG_STORE_READ, err, sizeof(err));
    struct ag_agt **tail;
    struct ag_agt *keep = NULL, **ktail = &keep;
    bool *seen;
    size_t n;

    if (st == NULL) {
        LOG_ERROR(ctx->log, "reload_failed", LOG_S("err", err));
        return -1;
    }
    n = ag_store_count(st);
    seen = calloc(n + 1, sizeof(*seen));
    if (seen == NULL) {
        ag_store_free(st);
        return -1;
    }
    /* existing agents, matched by id */
    for (struct ag_agt *a = ctx->agents; a != NULL; a = a->next) {
        for (size_t i = 0; i < n; i++) {
            struct ag_agent *c = ag_store_agent(st, i);
            if (strcmp(c->id, a->cfg.id) == 0) {
                uint32_t old_rt = a->cfg.response_timeout_s;
                agt_load(a, st, c);
                seen[i] = true;
                if (old_rt != c->response_timeout_s && ctx->tun != NULL &&
                    ag_tun_serves(ctx->tun, a->cfg.address))
                    ag_tun_register(ctx->tun, a); /* refreshes response_timeout */
                break;
            }
        }
    }
    /* split: kept ones in order, removed ones released */
    while (ctx->agents != NULL) {
        struct ag_agt *a = ctx->agents;
        bool found = false;
        ctx->agents = a->next;
        a->next = NULL;
        for (size_t i = 0; i < n && !found; i++)
            found = strcmp(ag_store_agent(st, i)->id, a->cfg.id) == 0;
        if (found) {
            *ktail = a;
            ktail = &a->next;
            continue;
        }
        LOG_INFO(ctx->log, "agent_removed_locally", LOG_S("name", a->cfg.name),
                 LOG_S("addr", a->cfg.address));
        if (ctx->tun != NULL)
            ag_tun_unregister(ctx->tun, a);
        agt_set_offline(a);
        a->gone = true;
        ag_agt_unref(a);
    }
    ctx->agents = keep;
    tail = &ctx->agents;
    while (*tail != NULL)
        tail = &(*tail)->next;
    for (size_t i = 0; i < n; i++) {
        struct ag_agt *a;
        if (seen[i])
            continue;
        a = agt_new(ctx, st, ag_store_agent(st, i));
        if (a == NULL) {
            LOG_ERROR(ctx->log, "agent_load_failed", LOG_S("name", ag_store_agent(st, i)->name),
                      LOG_S("err", "out of memory"));
            continue;
        }
        *tail = a;
        tail = &a->next;
    }
    free(seen);
    ag_store_free(st);
    daemon_apply(ctx);
    return 0;
}

/* Brings the tunnel in line with what is wanted. */
static void daemon_apply(struct ag_ctx *ctx)
{
    for (struct ag_agt *a = ctx->agents; a != NULL; a = a->next) {
        bool wanted = ag_agt_wanted(a);
        if (ctx->tun != NULL && ag_tun_is_up(ctx->tun)) {
            if (wanted && !ag_tun_serves(ctx->tun, a->cfg.address))
                ag_tun_register(ctx->tun, a);
            else if (!wanted)
                ag_tun_unregister(ctx->tun, a);
        }
        if (!wanted)
            agt_set_offline(a);
        agt_update_state(a);
    }
    if (ctx->tun == NULL && !ctx->stopping && any_wanted(ctx) &&
        !evtimer_pending(ctx->reconnect_ev, NULL))
        daemon_schedule_reconnect(ctx, 0);
}

/* Writes superseded = true for a into agents.json (so a restart keeps it). */
static void persist_superseded(struct ag_ctx *ctx, const struct ag_agt *a)
{
    char err[AG_STORE_ERR_LEN];
    struct ag_store *st = ag_store_open(ctx->home, AG_STORE_WRITE, err, sizeof(err));
    struct ag_agent *c;

    if (st == NULL) {
        LOG_ERROR(ctx->log, "store_write_failed", LOG_S("err", err));
        return;
    }
    c = ag_store_find(st, a->cfg.name);
    if (c != NULL && strcmp(c->id, a->cfg.id) == 0 && !c->superseded) {
        c->superseded = true;
        if (ag_store_save(st, err, sizeof(err)) != 0)
            LOG_ERROR(ctx->log, "store_write_failed", LOG_S("err", err));
    }
    ag_store_free(st);
}

/* ---- tunnel reports ---------------------------------------------------------- */

static void daemon_connect(struct ag_ctx *ctx)
{
    if (ctx->tun != NULL || ctx->stopping || !any_wanted(ctx))
        return;
    ctx->tun_up_mono_ms = 0;
    ctx->tun = ag_tun_new(ctx);
    if (ctx->tun == NULL) {
        (void)util_snprintf(ctx->gw_error, sizeof(ctx->gw_error), "out of memory");
        daemon_schedule_reconnect(ctx, BACKOFF_MIN_MS);
    }
}

static void on_reconnect(evutil_socket_t fd, short what, void *arg) { daemon_connect(arg); }

static void daemon_schedule_reconnect(struct ag_ctx *ctx, uint64_t delay_ms)
{
    struct timeval tv = {(time_t)(delay_ms / 1000), (suseconds_t)((delay_ms % 1000) * 1000)};

    evtimer_add(ctx->reconnect_ev, &tv);
}

/* The next backoff delay with +-20 % jitter; doubles the base. */
static uint64_t backoff_next(struct ag_ctx *ctx)
{
    uint32_t r = 0;
    uint64_t base = ctx->backoff_ms;
    uint64_t d;

    if (RAND_bytes((unsigned char *)&r, sizeof(r)) != 1)
        r = (uint32_t)util_mono_ms();
    /* base * [0.8, 1.2) */
    d = base * 8 / 10 + (base * 4 / 10) * (r % 1000u) / 1000u;
    ctx->backoff_ms = base * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : base * 2;
    return d;
}

void ag_daemon_on_tun_up(struct ag_ctx *ctx, struct ag_tun *t)
{
    if (t != ctx->tun)
        return;
    ctx->tun_up_mono_ms = util_mono_ms();
    ctx->gw_error[0] = '\0';
    LOG_INFO(ctx->log, "tunnel_up", LOG_U("tun", ag_tun_id(t)),
             LOG_S("gateway", ctx->opts->gateway_url));
}

void ag_daemon_on_agent_online(struct ag_ctx *ctx, struct ag_tun *t, struct ag_agt *a,
                               const char *url)
{
    if (t != ctx->tun)
        return;
    a->online = true;
    if (url[0] != '\0')
        (void)util_snprintf(a->url, sizeof(a->url), "%s", url);
    a->error[0] = '\0';
    a->probe_backoff_ms = PROBE_RETRY_MIN_MS;
    LOG_INFO(ctx->log, "agent_registered", LOG_U("tun", ag_tun_id(t)),
             LOG_S("addr", a->cfg.address), LOG_S("url", a->url));
    ag_probe_free(a->probe);
    event_del(a->probe_ev);
    probe_in(a, 0);
    agt_update_state(a);
}

void ag_daemon_on_agent_refused(struct ag_ctx *ctx, struct ag_tun *t, struct ag_agt *a,
                                const char *code, const char *message)
{
    char why[AG_ERR_MAX];

    (void)util_snprintf(why, sizeof(why), "%s%s%s", code, message != NULL ? ": " : "",
                        message != NULL ? message : "");
    LOG_WARN(ctx->log, "agent_rejected", LOG_S("addr", a->cfg.address), LOG_S("err", code));
    agt_stop(a, why);
}

void ag_daemon_on_agent_removed(struct ag_ctx *ctx, struct ag_tun *t, struct ag_agt *a,
                                const char *reason)
{
    if (t != ctx->tun || strcmp(reason, "removed") == 0 || strcmp(reason, "replaced") == 0) {
        /* ours, or a reconnect of ours took it (PROTOCOL.md 7.4) */
        if (t == ctx->tun && strcmp(reason, "replaced") == 0) {
            agt_set_offline(a);
            agt_update_state(a);
        }
        return;
    }
    if (strcmp(reason, "not_allowed") == 0) {
        agt_stop(a, "address_not_allowed: the gateway's allow list no longer permits it");
        return;
    }
    /* superseded, or a reason we do not know (treated alike) */
    agt_stop(a, "superseded by another instance holding the key (enable the agent again to "
                "take it back)");
    a->cfg.superseded = true;
    persist_superseded(ctx, a);
}

void ag_daemon_on_tun_draining(struct ag_ctx *ctx, struct ag_tun *t)
{
    struct ag_tun **old;

    if (t != ctx->tun)
        return;
    old = realloc(ctx->old, (ctx->nold + 1) * sizeof(*old));
    if (old == NULL)
        return; /* stays active until it goes down */
    ctx->old = old;
    ctx->old[ctx->nold++] = t;
    ctx->tun = NULL;
    for (struct ag_agt *a = ctx->agents; a != NULL; a = a->next) {
        /* stays reachable on the old tunnel until the new one replaces it */
        a->online = false;
        ag_probe_free(a->probe);
        event_del(a->probe_ev);
    }
    if (!ctx->stopping) {
        event_del(ctx->reconnect_ev);
        daemon_connect(ctx); /* at once, no backoff (PROTOCOL.md 8.4) */
    }
}

static bool code_is_permanent(const char *code)
{
    static const char *const perm[] = {
        "signature_verification_failed", "address_not_allowed", "invalid_address", "invalid_json",
        "expected_auth_frame",           "no_agents",           "too_many_agents",
    };

    for (size_t i = 0; i < sizeof(perm) / sizeof(perm[0]); i++)
        if (strcmp(code, perm[i]) == 0)
            return true;
    return false;
}

void ag_daemon_on_tun_down(struct ag_ctx *ctx, struct ag_tun *t, const char *reason,
                           const char *auth_code)
{
    uint64_t now = util_mono_ms();

    if (t == ctx->tun) {
        bool was_up = ctx->tun_up_mono_ms != 0;
        ctx->tun = NULL;
        (void)util_snprintf(ctx->gw_error, sizeof(ctx->gw_error), "%s", reason);
        LOG_WARN(ctx->log, "tunnel_down", LOG_U("tun", ag_tun_id(t)), LOG_S("reason", reason),
                 LOG_U("up_ms", was_up ? now - ctx->tun_up_mono_ms : 0));
        if (was_up && now - ctx->tun_up_mono_ms >= HEALTHY_RESET_MS)
            ctx->backoff_ms = BACKOFF_MIN_MS;
        ctx->tun_up_mono_ms = 0;
        for (struct ag_agt *a = ctx->agents; a != NULL; a = a->next) {
            if (auth_code != NULL && code_is_permanent(auth_code) && ag_agt_wanted(a)) {
                LOG_WARN(ctx->log, "agent_rejected", LOG_S("addr", a->cfg.address),
                         LOG_S("err", auth_code));
                agt_stop(a, reason);
                continue;
            }
            agt_set_offline(a);
            agt_update_state(a);
        }
        ag_tun_free(t);
        if (!ctx->stopping && any_wanted(ctx)) {
            uint64_t d = backoff_next(ctx);
            LOG_INFO(ctx->log, "reconnect_in_ms", LOG_U("ms", d));
            daemon_schedule_reconnect(ctx, d);
        }
    } else {
        for (size_t i = 0; i < ctx->nold; i++) {
            if (ctx->old[i] != t)
                continue;
            ctx->old[i] = ctx->old[--ctx->nold];
            break;
        }
        LOG_INFO(ctx->log, "tunnel_closed", LOG_U("tun", ag_tun_id(t)), LOG_S("reason", reason));
        ag_tun_free(t);
    }
    if (ctx->stopping && ctx->tun == NULL && ctx->nold == 0)
        event_base_loopexit(ctx->base, NULL);
}

void ag_daemon_on_probe_done(struct ag_ctx *ctx, struct ag_agt *a, bool ok, uint64_t rtt_ms,
                             const char *err)
{
    if (!a->online)
        return;
    if (ok) {
        a->probe_ok = true;
        a->last_probe_ms = util_unix_time() * 1000;
        a->probe_rtt_ms = rtt_ms;
        a->probe_backoff_ms = PROBE_RETRY_MIN_MS;
        a->error[0] = '\0';
        LOG_DEBUG(ctx->log, "probe_ok", LOG_S("addr", a->cfg.address), LOG_U("rtt_ms", rtt_ms));
        probe_in(a, PROBE_PERIOD_MS);
    } else {
        a->probe_ok = false;
        (void)util_snprintf(a->error, sizeof(a->error), "%s", err);
        LOG_WARN(ctx->log, "probe_failed", LOG_S("addr", a->cfg.address), LOG_S("err", err),
                 LOG_U("retry_ms", a->probe_backoff_ms));
        probe_in(a, a->probe_backoff_ms);
        a->probe_backoff_ms =
            a->probe_backoff_ms * 2 > PROBE_PERIOD_MS ? PROBE_PERIOD_MS : a->probe_backoff_ms * 2;
    }
    agt_update_state(a);
}

/* ---- control socket ---------------------------------------------------------- */

static cJSON *status_agent(struct ag_ctx *ctx, const struct ag_agt *a)
{
    cJSON *o = cJSON_CreateObject();
    char url[AG_URL_MAX];

    if (o == NULL)
        return NULL;
    if (a->url[0] != '\0')
        (void)util_snprintf(url, sizeof(url), "%s", a->url);
    else if (ag_store_public_url(&ctx->opts->gateway, a->cfg.address, url, sizeof(url)) != 0)
        url[0] = '\0';
    if (cJSON_AddStringToObject(o, "name", a->cfg.name) == NULL ||
        cJSON_AddStringToObject(o, "id", a->cfg.id) == NULL ||
        cJSON_AddStringToObject(o, "address", a->cfg.address) == NULL ||
        cJSON_AddStringToObject(o, "target", a->cfg.target) == NULL ||
        cJSON_AddBoolToObject(o, "enabled", a->cfg.enabled) == NULL ||
        cJSON_AddStringToObject(o, "state", state_names[a->state]) == NULL ||
        cJSON_AddStringToObject(o, "url", url) == NULL ||
        (a->error[0] != '\0' ? cJSON_AddStringToObject(o, "error", a->error)
                             : cJSON_AddNullToObject(o, "error")) == NULL ||
        cJSON_AddNumberToObject(o, "requests", (double)a->requests) == NULL ||
        cJSON_AddNumberToObject(o, "inflight", a->inflight) == NULL ||
        cJSON_AddNumberToObject(o, "last_probe_ms", (double)a->last_probe_ms) == NULL ||
        cJSON_AddNumberToObject(o, "probe_rtt_ms", (double)a->probe_rtt_ms) == NULL ||
        cJSON_AddBoolToObject(o, "superseded", a->cfg.superseded) == NULL ||
        cJSON_AddBoolToObject(o, "preserve_host", a->cfg.preserve_host) == NULL ||
        cJSON_AddNumberToObject(o, "max_inflight", a->cfg.max_inflight) == NULL ||
        cJSON_AddStringToObject(o, "id_header", a->cfg.id_header) == NULL ||
        cJSON_AddNumberToObject(o, "response_timeout", a->cfg.response_timeout_s) == NULL ||
        cJSON_AddNumberToObject(o, "idle_connections", (double)ag_fwd_pool_idle(a->pool)) == NULL) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static char *status_text(struct ag_ctx *ctx)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *arr = root != NULL ? cJSON_AddArrayToObject(root, "agents") : NULL;
    cJSON *gw;
    const char *gst;
    char *text;

    if (arr == NULL)
        goto fail;
    for (struct ag_agt *a = ctx->agents; a != NULL; a = a->next) {
        cJSON *o = status_agent(ctx, a);
        if (o == NULL || !cJSON_AddItemToArray(arr, o)) {
            cJSON_Delete(o);
            goto fail;
        }
    }
    gst = ctx->tun != NULL && ag_tun_is_up(ctx->tun) ? "connected"
          : ctx->tun != NULL                         ? "connecting"
                                                     : "disconnected";
    gw = cJSON_AddObjectToObject(root, "gateway");
    if (cJSON_AddBoolToObject(root, "daemon", true) == NULL ||
        cJSON_AddNumberToObject(root, "pid", (double)getpid()) == NULL ||
        cJSON_AddStringToObject(root, "instance", ctx->instance) == NULL || gw == NULL ||
        cJSON_AddStringToObject(gw, "url", ctx->opts->gateway_url) == NULL ||
        cJSON_AddStringToObject(gw, "state", gst) == NULL ||
        (ctx->gw_error[0] != '\0' ? cJSON_AddStringToObject(gw, "error", ctx->gw_error)
                                  : cJSON_AddNullToObject(gw, "error")) == NULL ||
        cJSON_AddNumberToObject(gw, "tunnel", ctx->tun != NULL ? (double)ag_tun_id(ctx->tun) : 0) ==
            NULL ||
        cJSON_AddNumberToObject(gw, "rtt_ms",
                                ctx->tun != NULL ? (double)ag_tun_rtt_ms(ctx->tun) : 0) == NULL ||
        cJSON_AddNumberToObject(gw, "draining_tunnels", (double)ctx->nold) == NULL)
        goto fail;
    text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return text;

fail:
    cJSON_Delete(root);
    return NULL;
}

static char *on_ctl(void *arg, const char *line)
{
    struct ag_ctx *ctx = arg;
    cJSON *req = cJSON_Parse(line);
    const cJSON *cmd = cJSON_GetObjectItemCaseSensitive(req, "cmd");
    char *answer = NULL;

    if (cJSON_IsString(cmd) && strcmp(cmd->valuestring, "status") == 0) {
        answer = status_text(ctx);
    } else if (cJSON_IsString(cmd) && strcmp(cmd->valuestring, "reload") == 0) {
        LOG_INFO(ctx->log, "reload", LOG_S("from", "control socket"));
        answer = strdup(daemon_reload(ctx) == 0 ? "{\"ok\":true}"
                                                : "{\"ok\":false,\"error\":\"reload_failed\"}");
    } else {
        answer = strdup("{\"error\":\"unknown_command\"}");
    }
    cJSON_Delete(req);
    return answer;
}

/* ---- signals, shutdown ---------------------------------------------------------- */

static void on_grace(evutil_socket_t fd, short what, void *arg)
{
    struct ag_ctx *ctx = arg;

    LOG_WARN(ctx->log, "shutdown_grace_over", LOG_U("tunnels", ctx->nold + (ctx->tun != NULL)));
    event_base_loopexit(ctx->base, NULL);
}

static void daemon_shutdown(struct ag_ctx *ctx)
{
    struct timeval tv = {SHUTDOWN_GRACE_S, 0};

    if (ctx->stopping) {
        LOG_WARN(ctx->log, "shutdown_now", LOG_S("reason", "second signal"));
        event_base_loopexit(ctx->base, NULL);
        return;
    }
    ctx->stopping = true;
    LOG_INFO(ctx->log, "shutting_down", LOG_U("grace_s", SHUTDOWN_GRACE_S));
    event_del(ctx->reconnect_ev);
    for (struct ag_agt *a = ctx->agents; a != NULL; a = a->next) {
        agt_set_offline(a);
        agt_update_state(a);
    }
    if (ctx->tun == NULL && ctx->nold == 0) {
        event_base_loopexit(ctx->base, NULL);
        return;
    }
    evtimer_add(ctx->grace_ev, &tv);
    /* ag_tun_drain() may report down synchronously only through the loop */
    if (ctx->tun != NULL)
        ag_tun_drain(ctx->tun);
    for (size_t i = 0; i < ctx->nold; i++)
        ag_tun_drain(ctx->old[i]);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    struct ag_ctx *ctx = arg;

    if (sig == SIGHUP) {
        LOG_INFO(ctx->log, "reload", LOG_S("from", "SIGHUP"));
        daemon_reload(ctx);
        return;
    }
    daemon_shutdown(ctx);
}

/* ---- run ------------------------------------------------------------------------ */

static int ctx_init(struct ag_ctx *ctx, const char *home, const struct ag_run_opts *opts)
{
    char err[512];
    const struct ag_gateway *g = &opts->gateway;
    bool v6 = strchr(g->host, ':') != NULL;
    bool dflt = g->port == (g->tls ? 443 : 80);
    size_t i;

    ctx->home = home;
    ctx->opts = opts;
    ctx->backoff_ms = BACKOFF_MIN_MS;
    ctx->log = log_new("tunnel-agent", opts->log_level, opts->log_format, STDERR_FILENO);
    if (ctx->log == NULL) {
        fprintf(stderr, "tunnel-agent: out of memory\n");
        return -1;
    }
    for (i = 0; g->host[i] != '\0' && i < sizeof(ctx->domain) - 1; i++)
        ctx->domain[i] =
            (char)((g->host[i] >= 'A' && g->host[i] <= 'Z') ? g->host[i] - 'A' + 'a' : g->host[i]);
    ctx->domain[i] = '\0';
    if (util_snprintf(ctx->host_port, sizeof(ctx->host_port), "%s%s%s", v6 ? "[" : "", ctx->domain,
                      v6 ? "]" : "") < 0)
        return -1;
    if (!dflt) {
        size_t l = strlen(ctx->host_port);
        if (util_snprintf(ctx->host_port + l, sizeof(ctx->host_port) - l, ":%u",
                          (unsigned)g->port) < 0)
            return -1;
    }
    if (util_uuid4(ctx->instance) != 0) {
        fprintf(stderr, "tunnel-agent: the random generator failed\n");
        return -1;
    }
    if (g->tls) {
        ctx->ssl_ctx = tls_client_ctx_new(opts->ca_file[0] != '\0' ? opts->ca_file : NULL,
                                          "http/1.1", err, sizeof(err));
        if (ctx->ssl_ctx == NULL) {
            fprintf(stderr, "tunnel-agent: run: %s\n", err);
            return -1;
        }
    }
    ctx->base = util_event_base_new();
    if (ctx->base == NULL) {
        fprintf(stderr, "tunnel-agent: cannot create the event loop\n");
        return -1;
    }
    ctx->dns = evdns_base_new(ctx->base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
    if (ctx->dns == NULL) {
        /* no usable resolv.conf: literals and /etc/hosts still work */
        ctx->dns = evdns_base_new(ctx->base, 0);
        if (ctx->dns != NULL)
            evdns_base_load_hosts(ctx->dns, NULL);
    }
    ctx->reconnect_ev = evtimer_new(ctx->base, on_reconnect, ctx);
    ctx->grace_ev = evtimer_new(ctx->base, on_grace, ctx);
    if (ctx->dns == NULL || ctx->reconnect_ev == NULL || ctx->grace_ev == NULL) {
        fprintf(stderr, "tunnel-agent: out of memory\n");
        return -1;
    }
    return 0;
}

static void ctx_cleanup(struct ag_ctx *ctx)
{
    ag_tun_free(ctx->tun);
    ctx->tun = NULL;
    for (size_t i = 0; i < ctx->nold; i++)
        ag_tun_free(ctx->old[i]);
    free(ctx->old);
    ctx->old = NULL;
    ctx->nold = 0;
    while (ctx->agents != NULL) {
        struct ag_agt *a = ctx->agents;
        ctx->agents = a->next;
        a->gone = true;
        ag_agt_unref(a);
    }
    ag_ctl_server_free(ctx->ctl);
    for (size_t i = 0; i < sizeof(ctx->sig_ev) / sizeof(ctx->sig_ev[0]); i++)
        if (ctx->sig_ev[i] != NULL)
            event_free(ctx->sig_ev[i]);
    if (ctx->reconnect_ev != NULL)
        event_free(ctx->reconnect_ev);
    if (ctx->grace_ev != NULL)
        event_free(ctx->grace_ev);
    if (ctx->dns != NULL)
        evdns_base_free(ctx->dns, 1);
    if (ctx->base != NULL)
        event_base_free(ctx->base);
    SSL_CTX_free(ctx->ssl_ctx);
    log_free(ctx->log);
}

int ag_daemon_run(const char *home, const struct ag_run_opts *opts)
{
    static const int sigs[] = {SIGTERM, SIGINT, SIGHUP};
    struct ag_ctx ctx;
    char err[512];
    bool busy = false;
    size_t nagents = 0;
    int rc = 1;

    memset(&ctx, 0, sizeof(ctx));
    if (opts->protocol != AG_PROTO_NATIVE) {
        fprintf(stderr,
                "tunnel-agent: run: --protocol %s is not implemented yet; use "
                "--protocol native\n",
                ag_store_protocol_name(opts->protocol));
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    if (ctx_init(&ctx, home, opts) != 0)
        goto out;
    ctx.ctl = ag_ctl_server_new(ctx.base, home, on_ctl, &ctx, &busy, err, sizeof(err));
    if (ctx.ctl == NULL) {
        fprintf(stderr, "tunnel-agent: run: %s\n", err);
        goto out;
    }
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        ctx.sig_ev[i] = evsignal_new(ctx.base, sigs[i], on_signal, &ctx);
        if (ctx.sig_ev[i] == NULL || event_add(ctx.sig_ev[i], NULL) != 0) {
            fprintf(stderr, "tunnel-agent: run: cannot install signal handlers\n");
            goto out;
        }
    }
    if (daemon_reload(&ctx) != 0) {
        fprintf(stderr, "tunnel-agent: run: cannot read the agents of %s\n", home);
        goto out;
    }
    for (struct ag_agt *a = ctx.agents; a != NULL; a = a->next)
        nagents += ag_agt_wanted(a);
    LOG_INFO(ctx.log, "daemon_started", LOG_S("gateway", opts->gateway_url),
             LOG_S("instance", ctx.instance), LOG_U("agents", nagents), LOG_S("home", home),
             LOG_U("pid", getpid()));
    if (nagents == 0)
        LOG_WARN(ctx.log, "no_enabled_agents",
                 LOG_S("hint", "enable one with: tunnel-agent enable NAME"));
    event_base_dispatch(ctx.base);
    LOG_INFO(ctx.log, "daemon_stopped", LOG_U("pid", getpid()));
    rc = 0;
out:
    ctx_cleanup(&ctx);
    return rc;
}
