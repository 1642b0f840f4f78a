/* tunnel-agent's daemon (ag_daemon.h): the policy of one run. It builds the
 * context (ag_ctx), loads agents.json into it (ag_agt), keeps the tunnel
 * slot filled with reconnect backoff, takes the tunnels' reports (struct
 * ag_tun_cbs), answers the control socket and handles signals. Reports only
 * change facts and timers; a tunnel that went down is handed to the context
 * (ag_ctx_bury_tun), which frees it from the loop.
 * Lifecycle of the tunnel slot:
 * 1. no tunnel: the reconnect timer dials when some agent is wanted;
 * 2. ctx->tun: dialling .. up; on down, backoff (1 s doubling to 60 s, +-20 %
 *    jitter, reset after 60 s up) and back to 1;
 * 3. gateway drains (GOAWAY / "draining"): the tunnel moves to ctx->old to
 *    finish its streams and a new one is dialled at once. */
#include "ag_daemon.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <event2/event.h>

#include "ag_agt.h"
#include "ag_ctl.h"
#include "ag_ctx.h"
#include "ag_fwd.h"
#include "ag_insp.h"
#include "ag_tun.h"
#include "clk.h"
#include "list.h"
#include "log.h"
#include "util.h"

#define BACKOFF_MIN_MS 1000u
#define BACKOFF_MAX_MS 60000u
#define HEALTHY_RESET_MS 60000u /* up this long: the backoff starts again at 1 s */
#define SHUTDOWN_GRACE_S 30

static void daemon_apply(struct ag_ctx *ctx);
static void daemon_schedule_reconnect(struct ag_ctx *ctx, uint64_t delay_ms);

/* ---- agents.json ------------------------------------------------------------- */

/* The index of the store entry with this id, or n. */
static size_t store_index(struct ag_store *st, size_t n, const char *id)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(ag_store_agent(st, i)->id, id) == 0)
            return i;
    return n;
}

/* Re-reads agents.json and applies it: new, changed, re-enabled, disabled
 * and removed agents. Returns 0, or -1 (file unreadable: nothing changed). */
static int daemon_reload(struct ag_ctx *ctx)
{
    char err[AG_STORE_ERR_LEN];
    struct ag_store *st = ag_store_open(ctx->home, AG_STORE_READ, err, sizeof(err));
    struct list *n, *tmp;
    bool *seen;
    size_t count;

    if (st == NULL) {
        LOG_ERROR(ctx->log, "reload_failed", LOG_S("err", err));
        return -1;
    }
    count = ag_store_count(st);
    seen = calloc(count + 1, sizeof(*seen));
    if (seen == NULL) {
        ag_store_free(st);
        return -1;
    }
    /* existing agents, matched by id; the others are released */
    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        struct ag_agt *a = AG_AGT_OF(n);
        size_t i = store_index(st, count, a->cfg.id);
        uint32_t old_rt = a->cfg.response_timeout_s;

        if (i == count) {
            LOG_INFO(ctx->log, "agent_removed_locally", LOG_S("name", a->cfg.name),
                     LOG_S("addr", a->cfg.address));
            if (ctx->tun != NULL)
                ag_tun_unregister(ctx->tun, a);
            ag_agt_remove(a);
            continue;
        }
        ag_agt_load(a, st, ag_store_agent(st, i));
        seen[i] = true;
        if (old_rt != a->cfg.response_timeout_s && ctx->tun != NULL &&
            ag_tun_serves(ctx->tun, a->cfg.address))
            ag_tun_register(ctx->tun, a); /* refreshes response_timeout */
    }
    for (size_t i = 0; i < count; i++) {
        if (seen[i])
            continue;
        if (ag_agt_add(ctx, st, ag_store_agent(st, i)) == NULL)
            LOG_ERROR(ctx->log, "agent_load_failed", LOG_S("name", ag_store_agent(st, i)->name),
                      LOG_S("err", "out of memory"));
    }
    free(seen);
    ag_store_free(st);
    daemon_apply(ctx);
    return 0;
}

/* Brings the tunnel in line with what is wanted. */
static void daemon_apply(struct ag_ctx *ctx)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        struct ag_agt *a = AG_AGT_OF(n);
        bool wanted = ag_agt_wanted(a);
        if (ctx->tun != NULL && ag_tun_is_up(ctx->tun)) {
            if (wanted && !ag_tun_serves(ctx->tun, a->cfg.address))
                ag_tun_register(ctx->tun, a);
            else if (!wanted)
                ag_tun_unregister(ctx->tun, a);
        }
        if (!wanted)
            ag_agt_set_offline(a);
        ag_agt_update_state(a);
    }
    if (ctx->tun == NULL && !ctx->stopping && ag_agt_any_wanted(ctx) &&
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

/* ---- the tunnel slot and the tunnels' reports ------------------------------------ */

static const struct ag_tun_cbs daemon_tun_cbs;

static void daemon_connect(struct ag_ctx *ctx)
{
    if (ctx->tun != NULL || ctx->stopping || !ag_agt_any_wanted(ctx))
        return;
    ctx->tun_up_mono_ms = 0;
    ctx->tun = ag_tun_new(ctx, &daemon_tun_cbs, ctx);
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

/* base with +-20 % jitter: base * [0.8, 1.2). */
static uint64_t jittered(struct ag_ctx *ctx, uint64_t base)
{
    uint32_t r = 0;

    if (clk_rand(ctx->clk, (uint8_t *)&r, sizeof(r)) != 0)
        r = (uint32_t)clk_mono_ms(ctx->clk);
    return base * 8 / 10 + (base * 4 / 10) * (r % 1000u) / 1000u;
}

/* The next backoff delay, jittered; doubles the base. */
static uint64_t backoff_next(struct ag_ctx *ctx)
{
    uint64_t base = ctx->backoff_ms;

    ctx->backoff_ms = base * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : base * 2;
    return jittered(ctx, base);
}

static void daemon_on_tun_up(void *arg, struct ag_tun *t)
{
    struct ag_ctx *ctx = arg;

    if (t != ctx->tun)
        return;
    ctx->tun_up_mono_ms = clk_mono_ms(ctx->clk);
    ctx->gw_error[0] = '\0';
    /* make-before-break: the tunnels of a draining gateway may go now */
    for (struct list *n = ctx->old.next; n != &ctx->old; n = n->next)
        ag_tun_release(ag_tun_from_link(n));
    LOG_INFO(ctx->log, "tunnel_up", LOG_U("tun", ag_tun_id(t)),
             LOG_S("gateway", ctx->opts->gateway_url));
}

static void daemon_on_agent_online(void *arg, struct ag_tun *t, struct ag_agt *a, const char *url)
{
    struct ag_ctx *ctx = arg;

    if (t != ctx->tun)
        return;
    LOG_INFO(ctx->log, "agent_registered", LOG_U("tun", ag_tun_id(t)),
             LOG_S("addr", a->cfg.address), LOG_S("url", url[0] != '\0' ? url : a->url));
    ag_agt_set_online(a, url);
}

static void daemon_on_agent_refused(void *arg, struct ag_tun *t, struct ag_agt *a, const char *code,
                                    const char *message)
{
    struct ag_ctx *ctx = arg;
    char why[AG_ERR_MAX];

    (void)util_snprintf(why, sizeof(why), "%s%s%s", code, message != NULL ? ": " : "",
                        message != NULL ? message : "");
    LOG_WARN(ctx->log, "agent_rejected", LOG_S("addr", a->cfg.address), LOG_S("err", code));
    ag_agt_stop(a, why);
}

static void daemon_on_agent_removed(void *arg, struct ag_tun *t, struct ag_agt *a,
                                    const char *reason)
{
    struct ag_ctx *ctx = arg;

    if (t != ctx->tun || strcmp(reason, "removed") == 0 || strcmp(reason, "replaced") == 0) {
        /* ours, or a reconnect of ours took it (PROTOCOL.md 7.4) */
        if (t == ctx->tun && strcmp(reason, "replaced") == 0) {
            ag_agt_set_offline(a);
            ag_agt_update_state(a);
        }
        return;
    }
    if (strcmp(reason, "not_allowed") == 0) {
        ag_agt_stop(a, "address_not_allowed: the gateway's allow list no longer permits it");
        return;
    }
    /* superseded, or a reason we do not know (treated alike) */
    ag_agt_stop(a, "superseded by another instance holding the key (enable the agent again to "
                   "take it back)");
    a->cfg.superseded = true;
    persist_superseded(ctx, a);
}

static void daemon_on_tun_draining(void *arg, struct ag_tun *t)
{
    struct ag_ctx *ctx = arg;
    struct list *n, *tmp;

    if (t != ctx->tun)
        return;
    list_insert_tail(&ctx->old, ag_tun_link(t));
    ctx->tun = NULL;
    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        ag_agt_set_leaving(AG_AGT_OF(n));
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

/* From one of t's own events: t is dead but still allocated. It is buried
 * (ctx->dead) and freed by the context's reap event, after this returns. */
static void daemon_on_tun_down(void *arg, struct ag_tun *t, const char *reason,
                               const char *auth_code)
{
    struct ag_ctx *ctx = arg;
    uint64_t now = clk_mono_ms(ctx->clk);

    if (t == ctx->tun) {
        bool was_up = ctx->tun_up_mono_ms != 0;
        struct list *n, *tmp;

        ctx->tun = NULL;
        (void)util_snprintf(ctx->gw_error, sizeof(ctx->gw_error), "%s", reason);
        LOG_WARN(ctx->log, "tunnel_down", LOG_U("tun", ag_tun_id(t)), LOG_S("reason", reason),
                 LOG_U("up_ms", was_up ? now - ctx->tun_up_mono_ms : 0));
        if (was_up && now - ctx->tun_up_mono_ms >= HEALTHY_RESET_MS)
            ctx->backoff_ms = BACKOFF_MIN_MS;
        ctx->tun_up_mono_ms = 0;
        LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
        {
            struct ag_agt *a = AG_AGT_OF(n);
            if (auth_code != NULL && code_is_permanent(auth_code) && ag_agt_wanted(a)) {
                LOG_WARN(ctx->log, "agent_rejected", LOG_S("addr", a->cfg.address),
                         LOG_S("err", auth_code));
                ag_agt_stop(a, reason);
                continue;
            }
            ag_agt_set_offline(a);
            ag_agt_update_state(a);
        }
        ag_ctx_bury_tun(ctx, t);
        if (!ctx->stopping && ag_agt_any_wanted(ctx)) {
            /* a gateway that restarts is back at once (elsewhere): about 1 s,
             * jittered, and the backoff stays where it was */
            uint64_t d = ag_tun_restarting(t) ? jittered(ctx, BACKOFF_MIN_MS) : backoff_next(ctx);
            LOG_INFO(ctx->log, "reconnect_in_ms", LOG_U("ms", d));
            daemon_schedule_reconnect(ctx, d);
        }
    } else {
        LOG_INFO(ctx->log, "tunnel_closed", LOG_U("tun", ag_tun_id(t)), LOG_S("reason", reason));
        ag_ctx_bury_tun(ctx, t); /* off ctx->old */
    }
    if (ctx->stopping && ctx->tun == NULL && list_is_empty(&ctx->old))
        event_base_loopexit(ctx->base, NULL);
}

static const struct ag_tun_cbs daemon_tun_cbs = {
    .on_up = daemon_on_tun_up,
    .on_agent_online = daemon_on_agent_online,
    .on_agent_refused = daemon_on_agent_refused,
    .on_agent_removed = daemon_on_agent_removed,
    .on_draining = daemon_on_tun_draining,
    .on_down = daemon_on_tun_down,
};

/* ---- control socket ---------------------------------------------------------- */

static cJSON *status_agent(struct ag_ctx *ctx, const struct ag_agt *a)
{
    cJSON *o = cJSON_CreateObject();
    char url[AG_URL_MAX];
    /* a stop (refused, superseded, bad key) outranks a failing local API */
    const char *err = a->error[0] != '\0' ? a->error : a->local_error;

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
        cJSON_AddStringToObject(o, "state", ag_agt_state_name(a->state)) == NULL ||
        cJSON_AddStringToObject(o, "url", url) == NULL ||
        (err[0] != '\0' ? cJSON_AddStringToObject(o, "error", err)
                        : cJSON_AddNullToObject(o, "error")) == NULL ||
        cJSON_AddNumberToObject(o, "requests", (double)a->requests) == NULL ||
        cJSON_AddNumberToObject(o, "probes", (double)a->probes) == NULL ||
        cJSON_AddNumberToObject(o, "bytes_in", (double)a->bytes_in) == NULL ||
        cJSON_AddNumberToObject(o, "bytes_out", (double)a->bytes_out) == NULL ||
        cJSON_AddStringToObject(o, "local_result", ag_agt_local_name(a->local)) == NULL ||
        cJSON_AddNumberToObject(o, "local_result_ms", (double)a->local_ms) == NULL ||
        (a->local_error[0] != '\0' ? cJSON_AddStringToObject(o, "local_error", a->local_error)
                                   : cJSON_AddNullToObject(o, "local_error")) == NULL ||
        cJSON_AddNumberToObject(o, "inflight", a->inflight) == NULL ||
        cJSON_AddNumberToObject(o, "last_probe_ms", (double)a->last_probe_ms) == NULL ||
        cJSON_AddNumberToObject(o, "probe_rtt_ms", (double)a->probe_rtt_ms) == NULL ||
        cJSON_AddBoolToObject(o, "superseded", a->cfg.superseded) == NULL ||
        cJSON_AddBoolToObject(o, "preserve_host", a->cfg.preserve_host) == NULL ||
        cJSON_AddNumberToObject(o, "max_inflight", a->cfg.max_inflight) == NULL ||
        cJSON_AddStringToObject(o, "id_header", a->cfg.id_header) == NULL ||
        cJSON_AddStringToObject(o, "preset", ag_store_preset_name(a->cfg.preset)) == NULL ||
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
    struct list *n, *tmp;

    if (arr == NULL)
        goto fail;
    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        cJSON *o = status_agent(ctx, AG_AGT_OF(n));
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
        cJSON_AddStringToObject(gw, "domain", ctx->domain) == NULL ||
        (ctx->gw_error[0] != '\0' ? cJSON_AddStringToObject(gw, "error", ctx->gw_error)
                                  : cJSON_AddNullToObject(gw, "error")) == NULL ||
        cJSON_AddNumberToObject(gw, "tunnel", ctx->tun != NULL ? (double)ag_tun_id(ctx->tun) : 0) ==
            NULL ||
        cJSON_AddNumberToObject(gw, "rtt_ms",
                                ctx->tun != NULL ? (double)ag_tun_rtt_ms(ctx->tun) : 0) == NULL ||
        cJSON_AddNumberToObject(gw, "draining_tunnels", (double)list_count(&ctx->old)) == NULL)
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
    } else if (cJSON_IsString(cmd) && strcmp(cmd->valuestring, "replay") == 0) {
        answer = ag_insp_ctl_replay(ctx->insp, cJSON_GetObjectItemCaseSensitive(req, "id"));
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

    LOG_WARN(ctx->log, "shutdown_grace_over",
             LOG_U("tunnels", list_count(&ctx->old) + (ctx->tun != NULL)));
    event_base_loopexit(ctx->base, NULL);
}

static void daemon_shutdown(struct ag_ctx *ctx)
{
    struct timeval tv = {SHUTDOWN_GRACE_S, 0};
    struct list *n, *tmp;

    if (ctx->stopping) {
        LOG_WARN(ctx->log, "shutdown_now", LOG_S("reason", "second signal"));
        event_base_loopexit(ctx->base, NULL);
        return;
    }
    ctx->stopping = true;
    LOG_INFO(ctx->log, "shutting_down", LOG_U("grace_s", SHUTDOWN_GRACE_S));
    event_del(ctx->reconnect_ev);
    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        ag_agt_set_offline(AG_AGT_OF(n));
        ag_agt_update_state(AG_AGT_OF(n));
    }
    if (ctx->tun == NULL && list_is_empty(&ctx->old)) {
        event_base_loopexit(ctx->base, NULL);
        return;
    }
    evtimer_add(ctx->grace_ev, &tv);
    /* ag_tun_drain() never reports inside the call: on_down comes from the loop */
    if (ctx->tun != NULL)
        ag_tun_drain(ctx->tun);
    LIST_FOREACH_SAFE(n, tmp, &ctx->old)
    {
        ag_tun_drain(ag_tun_from_link(n));
    }
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

/* The daemon's part of the context: timers, control socket, signals, and
 * agents.json. What it acquired is freed by ag_ctx_free(), also on failure.
 * Returns 0, or -1 after printing why on stderr. */
static int daemon_start(struct ag_ctx *ctx)
{
    static const int sigs[] = {SIGTERM, SIGINT, SIGHUP};
    char err[512];
    bool busy = false;

    ctx->backoff_ms = BACKOFF_MIN_MS;
    ctx->reconnect_ev = evtimer_new(ctx->base, on_reconnect, ctx);
    ctx->grace_ev = evtimer_new(ctx->base, on_grace, ctx);
    if (ctx->reconnect_ev == NULL || ctx->grace_ev == NULL) {
        fprintf(stderr, "tunnel-agent: out of memory\n");
        return -1;
    }
    ctx->ctl = ag_ctl_server_new(ctx->base, ctx->home, on_ctl, ctx, &busy, err, sizeof(err));
    if (ctx->ctl == NULL) {
        fprintf(stderr, "tunnel-agent: run: %s\n", err);
        return -1;
    }
    if (ctx->opts->inspect.enabled) {
        err[0] = '\0';
        ctx->insp = ag_insp_new(ctx, err, sizeof(err));
        if (ctx->insp == NULL) {
            fprintf(stderr, "tunnel-agent: run: %s\n", err);
            return -1;
        }
    }
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        ctx->sig_ev[i] = evsignal_new(ctx->base, sigs[i], on_signal, ctx);
        if (ctx->sig_ev[i] == NULL || event_add(ctx->sig_ev[i], NULL) != 0) {
            fprintf(stderr, "tunnel-agent: run: cannot install signal handlers\n");
            return -1;
        }
    }
    if (daemon_reload(ctx) != 0) {
        fprintf(stderr, "tunnel-agent: run: cannot read the agents of %s\n", ctx->home);
        return -1;
    }
    return 0;
}

int ag_daemon_run(const char *home, const struct ag_run_opts *opts)
{
    struct ag_ctx *ctx;
    struct list *n, *tmp;
    size_t nagents = 0;
    int rc = 1;

    signal(SIGPIPE, SIG_IGN);
    ctx = ag_ctx_new(home, opts, &clk_system);
    if (ctx == NULL)
        return 1;
    if (daemon_start(ctx) != 0)
        goto out;
    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        nagents += ag_agt_wanted(AG_AGT_OF(n));
    }
    LOG_INFO(ctx->log, "daemon_started", LOG_S("gateway", opts->gateway_url),
             LOG_S("instance", ctx->instance), LOG_U("agents", nagents), LOG_S("home", home),
             LOG_S("protocol", ag_store_protocol_name(opts->protocol)),
             LOG_S("proxy", opts->proxy.set ? opts->proxy.shown : NULL), LOG_U("pid", getpid()));
    if (nagents == 0)
        LOG_WARN(ctx->log, "no_enabled_agents",
                 LOG_S("hint", "enable one with: tunnel-agent enable NAME"));
    event_base_dispatch(ctx->base);
    LOG_INFO(ctx->log, "daemon_stopped", LOG_U("pid", getpid()));
    rc = 0;
out:
    ag_ctx_free(ctx);
    return rc;
}
