/* The agents of a running daemon (ag_agt.h): the ctx->agents list, reference
 * counts, the state shown by status, and the probe schedule. Probe reports
 * (agt_on_probe_done) only record the outcome and arm the next probe; the
 * finished probe is freed by the context's reap event or by this agent's
 * next probe timer, never inside its own report. */
#include "ag_agt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "ag_fwd.h"
#include "ag_probe.h"
#include "log.h"
#include "util.h"

#define PROBE_PERIOD_MS 60000u
#define PROBE_RETRY_MIN_MS 2000u

static const char *const state_names[] = {
    [AG_AGT_ST_DISCONNECTED] = "disconnected",
    [AG_AGT_ST_CONNECTING] = "connecting",
    [AG_AGT_ST_CONNECTED] = "connected",
    [AG_AGT_ST_ERROR] = "error",
};

const char *ag_agt_state_name(enum ag_agt_state st) { return state_names[st]; }

static const char *const local_names[] = {
    [AG_AGT_LOCAL_NONE] = "none",
    [AG_AGT_LOCAL_OK] = "ok",
    [AG_AGT_LOCAL_REFUSED] = "refused",
    [AG_AGT_LOCAL_TIMEOUT] = "timeout",
};

const char *ag_agt_local_name(enum ag_agt_local r) { return local_names[r]; }

void ag_agt_local_result(struct ag_agt *a, enum ag_agt_local r, const char *detail)
{
    bool was_failing = a->local_error[0] != '\0';

    a->local = r;
    a->local_ms = clk_unix_s(a->ctx->clk) * 1000;
    if (r == AG_AGT_LOCAL_OK) {
        if (was_failing)
            LOG_INFO(a->ctx->log, "local_reachable", LOG_S("addr", a->cfg.address),
                     LOG_S("name", a->cfg.name));
        a->local_error[0] = '\0';
        return;
    }
    (void)util_snprintf(a->local_error, sizeof(a->local_error), "%s: %s %s",
                        r == AG_AGT_LOCAL_TIMEOUT ? "local_timeout" : "local_unreachable",
                        a->cfg.target, detail != NULL ? detail : "");
}

/* Reached only through the last ag_agt_unref(); a is off ctx->agents. */
static void agt_free(struct ag_agt *a)
{
    ag_probe_free(a->probe);
    a->probe = NULL;
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

bool ag_agt_any_wanted(const struct ag_ctx *ctx)
{
    const struct list *n;

    for (n = ctx->agents.next; n != &ctx->agents; n = n->next)
        if (ag_agt_wanted(AG_AGT_OF(n)))
            return true;
    return false;
}

struct ag_agt *ag_agt_find(struct ag_ctx *ctx, const char *addr)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        struct ag_agt *a = AG_AGT_OF(n);
        if (strcmp(a->cfg.address, addr) == 0)
            return a;
    }
    return NULL;
}

struct ag_agt *ag_agt_find_id(struct ag_ctx *ctx, const char *id)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        struct ag_agt *a = AG_AGT_OF(n);
        if (strcmp(a->cfg.id, id) == 0)
            return a;
    }
    return NULL;
}

void ag_agt_update_state(struct ag_agt *a)
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
    if (st == AG_AGT_ST_CONNECTED && !a->announced && a->ctx->opts->announce_id[0] != '\0' &&
        strcmp(a->ctx->opts->announce_id, a->cfg.id) == 0) {
        /* tunnel-agent http: the URL on stdout once the probe passed */
        a->announced = true;
        printf("Forwarding %s -> %s\n", a->url, a->cfg.target);
        fflush(stdout);
    }
    if (st == AG_AGT_ST_CONNECTED)
        LOG_INFO(a->ctx->log, "agent_connected", LOG_S("addr", a->cfg.address),
                 LOG_S("name", a->cfg.name), LOG_S("url", a->url),
                 LOG_U("probe_rtt_ms", a->probe_rtt_ms));
    else
        LOG_INFO(a->ctx->log, "agent_state", LOG_S("addr", a->cfg.address),
                 LOG_S("name", a->cfg.name), LOG_S("state", state_names[st]),
                 LOG_S("err", a->error[0] != '\0' ? a->error : NULL));
}

/* ---- probes ---------------------------------------------------------------- */

/* Abandons the probe in flight (no report follows) and the next one. Never
 * called inside a probe's report: the reports come from the probe's events
 * and only arm timers. */
static void agt_probe_stop(struct ag_agt *a)
{
    ag_probe_free(a->probe);
    a->probe = NULL;
    event_del(a->probe_ev);
}

static void probe_in(struct ag_agt *a, uint64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};

    evtimer_add(a->probe_ev, &tv);
}

/* From the probe's own event: record the outcome and arm the next probe.
 * The probe is dead but still a->probe; reap_ev frees it. */
static void agt_on_probe_done(void *arg, bool ok, uint64_t rtt_ms, const char *err)
{
    struct ag_agt *a = arg;

    ag_ctx_reap_soon(a->ctx);
    if (!a->online)
        return;
    if (ok) {
        a->probe_ok = true;
        a->last_probe_ms = clk_unix_s(a->ctx->clk) * 1000;
        a->probe_rtt_ms = rtt_ms;
        a->probe_backoff_ms = PROBE_RETRY_MIN_MS;
        a->error[0] = '\0';
        LOG_DEBUG(a->ctx->log, "probe_ok", LOG_S("addr", a->cfg.address), LOG_U("rtt_ms", rtt_ms));
        probe_in(a, PROBE_PERIOD_MS);
    } else {
        a->probe_ok = false;
        (void)util_snprintf(a->error, sizeof(a->error), "%s", err);
        LOG_WARN(a->ctx->log, "probe_failed", LOG_S("addr", a->cfg.address), LOG_S("err", err),
                 LOG_U("retry_ms", a->probe_backoff_ms));
        probe_in(a, a->probe_backoff_ms);
        a->probe_backoff_ms =
            a->probe_backoff_ms * 2 > PROBE_PERIOD_MS ? PROBE_PERIOD_MS : a->probe_backoff_ms * 2;
    }
    ag_agt_update_state(a);
}

static const struct ag_probe_cbs agt_probe_cbs = {
    .on_done = agt_on_probe_done,
};

static void on_probe_timer(evutil_socket_t fd, short what, void *arg)
{
    struct ag_agt *a = arg;

    if (a->probe != NULL && ag_probe_is_done(a->probe)) {
        /* finished, not reaped yet: this timer is not the probe's frame */
        ag_probe_free(a->probe);
        a->probe = NULL;
    }
    if (!a->online || a->probe != NULL || a->url[0] == '\0')
        return;
    a->probe = ag_probe_start(a, &agt_probe_cbs, a);
    if (a->probe == NULL) {
        struct timeval tv = {PROBE_RETRY_MIN_MS / 1000, 0};
        evtimer_add(a->probe_ev, &tv);
    }
}

/* ---- facts from the tunnels --------------------------------------------------- */

void ag_agt_set_offline(struct ag_agt *a)
{
    a->online = false;
    a->probe_ok = false;
    agt_probe_stop(a);
}

void ag_agt_set_leaving(struct ag_agt *a)
{
    /* stays reachable on the old tunnel until the new one replaces it */
    a->online = false;
    agt_probe_stop(a);
}

void ag_agt_stop(struct ag_agt *a, const char *why)
{
    a->stopped = true;
    (void)util_snprintf(a->error, sizeof(a->error), "%s", why);
    ag_agt_set_offline(a);
    ag_agt_update_state(a);
}

void ag_agt_set_online(struct ag_agt *a, const char *url)
{
    a->online = true;
    if (url[0] != '\0')
        (void)util_snprintf(a->url, sizeof(a->url), "%s", url);
    a->error[0] = '\0';
    a->probe_backoff_ms = PROBE_RETRY_MIN_MS;
    agt_probe_stop(a);
    probe_in(a, 0);
    ag_agt_update_state(a);
}

/* ---- the list ------------------------------------------------------------------ */

void ag_agt_load(struct ag_agt *a, struct ag_store *st, struct ag_agent *cfg)
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

struct ag_agt *ag_agt_add(struct ag_ctx *ctx, struct ag_store *st, struct ag_agent *cfg)
{
    struct ag_agt *a = calloc(1, sizeof(*a));

    if (a == NULL)
        return NULL;
    a->ctx = ctx;
    a->refs = 1;
    list_init(&a->link);
    a->state = AG_AGT_ST_DISCONNECTED;
    a->probe_backoff_ms = PROBE_RETRY_MIN_MS;
    a->pool = ag_fwd_pool_new(a);
    if (a->pool == NULL)
        goto fail_a;
    a->probe_ev = evtimer_new(ctx->base, on_probe_timer, a);
    if (a->probe_ev == NULL)
        goto fail_pool;
    ag_agt_load(a, st, cfg);
    list_insert_tail(&ctx->agents, &a->link);
    return a;

fail_pool:
    ag_fwd_pool_free(a->pool);
fail_a:
    free(a);
    return NULL;
}

void ag_agt_remove(struct ag_agt *a)
{
    list_unlink(&a->link);
    ag_agt_set_offline(a);
    a->gone = true;
    ag_agt_unref(a);
}
