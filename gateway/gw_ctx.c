/* The gateway context; see gw.h. Signals (SIGTERM/SIGINT drain; SIGHUP: log
 * files reopened, the configuration re-read and its live keys applied,
 * certificates and the allow list reloaded), the periodic summary and sweep,
 * and the start-up and shutdown order live here so that gw_main only parses
 * the command line. */
#include "gw.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>

#include <event2/event.h>
#include <http_parser.h>

#include "clk.h"
#include "gw_allow.h"
#include "gw_cfg.h"
#include "gw_ipt.h"
#include "gw_lsn.h"
#include "gw_node.h"
#include "gw_rds.h"
#include "gw_reg.h"
#include "gw_tun.h"
#include "log.h"
#include "tg_config.h"
#include "tls.h"
#include "util.h"

#define DRAIN_POLL_MS 200
#define DRAIN_CLOSE_MS 300 /* after drain_done with --redis: the releases' replies */
#define SWEEP_INTERVAL_S 60

/* The drain ends once nothing is in flight (and, with a shared registry,
 * every tunnel's agents moved to another node or the hand-over time ran
 * out), or at the drain deadline. Then the public listeners close (a
 * balancer that has not yet seen /health's 503 gets refused connects and
 * retries another node), the claims are released, and the loop ends once
 * the requests that came in meanwhile are done too (forwarded ones count in
 * gw_node_streams), at least DRAIN_CLOSE_MS later, or at the deadline. */
static void on_drain_poll(evutil_socket_t fd, short what, void *arg)
{
    struct gw_ctx *ctx = arg;
    size_t streams = gw_tun_streams_total(ctx) + gw_node_streams(ctx->node);
    uint64_t now = clk_mono_ms(ctx->clk);

    if (ctx->drain_closing) {
        if ((streams == 0 && now >= ctx->drain_exit_ms) || now >= ctx->drain_deadline_ms) {
            if (streams != 0)
                LOG_WARN(ctx->log, "drain_cut", LOG_U("streams_cut", streams));
            evtimer_del(ctx->drain_ev);
            event_base_loopexit(ctx->base, NULL);
        }
        return;
    }

    if (ctx->handover && (gw_reg_count(ctx->reg) == 0 || now >= ctx->handover_deadline_ms)) {
        /* agents that did not move in time drain the single-node way */
        if (gw_reg_count(ctx->reg) > 0)
            LOG_WARN(ctx->log, "drain_handover_timeout", LOG_U("routes", gw_reg_count(ctx->reg)));
        else
            LOG_INFO(ctx->log, "drain_handover_done");
        ctx->handover = false;
        gw_tun_drain_all(ctx, false);
    }
    if ((streams == 0 && !ctx->handover) || now >= ctx->drain_deadline_ms) {
        LOG_INFO(ctx->log, "drain_done", LOG_U("streams_cut", streams));
        gw_lsn_disable(ctx->lsn_main);
        gw_lsn_disable(ctx->lsn_plain);
        ctx->drain_closing = true;
        ctx->drain_exit_ms = now;
        if (ctx->rds != NULL) {
            /* claims still held go now; give their replies a moment */
            gw_rds_release_all(ctx->rds);
            ctx->drain_exit_ms = now + DRAIN_CLOSE_MS;
        }
        if (now >= ctx->drain_deadline_ms) {
            evtimer_del(ctx->drain_ev);
            event_base_loopexit(ctx->base, NULL);
        }
        return;
    }
}

static void start_drain(struct gw_ctx *ctx)
{
    struct timeval tv = {0, DRAIN_POLL_MS * 1000};
    uint64_t now = clk_mono_ms(ctx->clk);
    uint64_t ho_s = ctx->cfg->drain_timeout_s < GW_HANDOVER_MAX_S ? ctx->cfg->drain_timeout_s
                                                                  : GW_HANDOVER_MAX_S;

    ctx->draining = true;
    ctx->drain_deadline_ms = now + ctx->cfg->drain_timeout_s * 1000u;
    /* make-before-break with a shared registry: agents keep this node's
     * tunnels until their new ones on other nodes have claimed the routes */
    ctx->handover = ctx->rds != NULL;
    ctx->handover_deadline_ms = now + ho_s * 1000u;
    LOG_INFO(ctx->log, "drain_start", LOG_U("tunnels", ctx->tunnels_live),
             LOG_U("grace_s", ctx->cfg->drain_timeout_s), LOG_B("handover", ctx->handover));
    gw_tun_drain_all(ctx, ctx->handover);
    evtimer_add(ctx->drain_ev, &tv);
}

static void on_term(evutil_socket_t sig, short what, void *arg)
{
    struct gw_ctx *ctx = arg;

    if (ctx->draining) {
        LOG_INFO(ctx->log, "shutdown_now", LOG_I("signal", sig));
        event_base_loopexit(ctx->base, NULL);
        return;
    }
    start_drain(ctx);
}

/* http-parser's header cap is process-wide; we count header bytes ourselves
 * for the 431 answer, so the parser only needs room above our limit. Set at
 * start and again when a reload changes max-header-bytes (one thread). */
static void apply_parser_limit(const struct gw_cfg *cfg)
{
    http_parser_set_max_header_size(cfg->max_header_bytes == 0 ||
                                            cfg->max_header_bytes > 0x7fffffff
                                        ? 0x7fffffffu
                                        : (uint32_t)cfg->max_header_bytes + 16384u);
}

static void arm_summary(struct gw_ctx *ctx)
{
    struct timeval tv = {(time_t)ctx->cfg->summary_interval_s, 0};

    evtimer_del(ctx->summary_ev);
    if (ctx->cfg->summary_interval_s != 0)
        evtimer_add(ctx->summary_ev, &tv);
}

/* Counts the changes gw_cfg_reload() reports, for the summary line. */
struct reload_report {
    struct gw_ctx *ctx;
    size_t changed;      /* keys applied */
    size_t need_restart; /* keys kept at their old value */
};

static void on_cfg_change(void *arg, const char *key, const char *old_value,
                          const char *new_value, bool live)
{
    struct reload_report *rr = arg;

    if (live) {
        rr->changed++;
        LOG_INFO(rr->ctx->log, "config_changed", LOG_S("key", key), LOG_S("old", old_value),
                 LOG_S("new", new_value));
    } else {
        rr->need_restart++;
        LOG_WARN(rr->ctx->log, "config_needs_restart", LOG_S("key", key),
                 LOG_S("old", old_value), LOG_S("new", new_value));
    }
}

/* Re-reads the configuration; a bad one is refused whole and the old one
 * stays. The old struct is freed at once: after gw_cfg_reload() the strings of
 * restart-only keys (domain, paths: what TLS, listeners and URLs point into)
 * live in the new one, and live keys are only ever read through ctx->cfg. */
static void reload_cfg(struct gw_ctx *ctx)
{
    struct reload_report rr = {ctx, 0, 0};
    struct gw_cfg *old = ctx->cfg_own;
    struct gw_cfg *nw = calloc(1, sizeof(*nw));
    char err[1024];

    if (nw == NULL) {
        LOG_ERROR(ctx->log, "config_reload_refused", LOG_S("err", "out of memory"));
        return;
    }
    /* an operator asked for this reload: its lines are written even under
     * --log-level warn or error */
    if (old->log_level > LOG_LVL_INFO)
        log_set_level(ctx->log, LOG_LVL_INFO);
    if (gw_cfg_reload(old, nw, on_cfg_change, &rr, err, sizeof(err)) != 0) {
        LOG_ERROR(ctx->log, "config_reload_refused", LOG_S("err", err),
                  LOG_S("kept", "the running configuration"));
        log_set_level(ctx->log, old->log_level);
        free(nw);
        return;
    }
    ctx->cfg_own = nw;
    ctx->cfg = nw;
    if (nw->max_header_bytes != old->max_header_bytes)
        apply_parser_limit(nw);
    if (nw->summary_interval_s != old->summary_interval_s)
        arm_summary(ctx);
    for (size_t i = 0; i < nw->n_warnings; i++)
        LOG_WARN(ctx->log, "config_warning", LOG_S("msg", nw->warnings[i]));
    LOG_INFO(ctx->log, "reloaded", LOG_S("what", "config"), LOG_U("changed", rr.changed),
             LOG_U("need_restart", rr.need_restart));
    log_set_level(ctx->log, nw->log_level);
    gw_cfg_cleanup(old);
    free(old);
}

static void on_hup(evutil_socket_t sig, short what, void *arg)
{
    struct gw_ctx *ctx = arg;
    char err[512];

    /* first, so that every line about this reload lands in the new file */
    if (log_reopen(ctx->log) != 0)
        LOG_ERROR(ctx->log, "reload_failed", LOG_S("what", "log"), LOG_S("err", strerror(errno)));
    reload_cfg(ctx);

    gw_access_log_reopen(ctx);
    if (ctx->tls != NULL) {
        if (tls_server_reload(ctx->tls, err, sizeof(err)) != 0)
            LOG_ERROR(ctx->log, "reload_failed", LOG_S("what", "tls"), LOG_S("err", err));
        else
            LOG_INFO(ctx->log, "reloaded", LOG_S("what", "tls"));
    }
    if (ctx->cfg->allow_path != NULL) {
        struct gw_allow *a = gw_allow_load(ctx->cfg->allow_path, err, sizeof(err));
        if (a == NULL) {
            LOG_ERROR(ctx->log, "reload_failed", LOG_S("what", "allow"), LOG_S("err", err));
        } else {
            gw_allow_free(ctx->allow);
            ctx->allow = a;
            LOG_INFO(ctx->log, "reloaded", LOG_S("what", "allow"),
                     LOG_U("addresses", gw_allow_count(a)));
            gw_tun_apply_allow(ctx);
        }
    }
}

static void on_summary(evutil_socket_t fd, short what, void *arg)
{
    struct gw_ctx *ctx = arg;

    LOG_INFO(ctx->log, "summary", LOG_U("tunnels", ctx->tunnels_live),
             LOG_U("agents", gw_reg_count(ctx->reg)), LOG_U("streams", gw_tun_streams_total(ctx)),
             LOG_U("requests", ctx->n.requests_total), LOG_U("failed", ctx->n.requests_failed));
}

static void on_sweep(evutil_socket_t fd, short what, void *arg)
{
    struct gw_ctx *ctx = arg;

    gw_ipt_sweep(ctx->ipt, clk_mono_ms(ctx->clk));
}

/* The soft descriptor limit raised to the hard one: every connection and
 * tunnel is a descriptor, and the default soft limit (1024) is far below
 * what a gateway holds. Returns the limit in force (0 = unknown). */
static uint64_t raise_fd_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 0;
    if (rl.rlim_cur < rl.rlim_max) {
        struct rlimit want = {rl.rlim_max, rl.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &want) == 0)
            rl.rlim_cur = rl.rlim_max;
    }
    return rl.rlim_cur == RLIM_INFINITY ? 0 : (uint64_t)rl.rlim_cur;
}

struct gw_ctx *gw_ctx_new(struct gw_cfg *cfg, const struct clk *clk, char *err, size_t errlen)
{
    struct gw_ctx *ctx = calloc(1, sizeof(*ctx));
    struct timeval sweep = {SWEEP_INTERVAL_S, 0};
    int rc;

    if (ctx == NULL)
        goto oom;
    ctx->cfg = cfg;
    ctx->cfg_own = cfg;
    ctx->clk = clk;
    list_init(&ctx->conns);
    list_init(&ctx->tuns);
    h2mem_init(&ctx->h2mem);
    ctx->start_ms = clk_mono_ms(clk);
    ctx->log = log_new("tunnel-gateway", cfg->log_level, cfg->log_format, 2);
    if (ctx->log == NULL)
        goto fail_ctx;
    rc = cfg->log_dir != NULL ? log_open_dir(ctx->log, cfg->log_dir) : 0;
    if (rc == LOG_E_MKDIR) {
        util_snprintf(err, errlen, "--log-dir %s: cannot create the directory: %s", cfg->log_dir,
                      strerror(errno));
        goto fail_log_msg;
    }
    if (rc != 0) {
        util_snprintf(err, errlen, "--log-dir %s: cannot open tunnel-gateway.log there: %s",
                      cfg->log_dir, strerror(errno));
        goto fail_log_msg;
    }
    apply_parser_limit(cfg);
    ctx->fd_limit = raise_fd_limit();
    ctx->base = util_event_base_new();
    if (ctx->base == NULL)
        goto fail_log;
    ctx->reg = gw_reg_new();
    if (ctx->reg == NULL)
        goto fail_base;
    ctx->ipt = gw_ipt_new();
    if (ctx->ipt == NULL)
        goto fail_reg;
    ctx->sig_term = evsignal_new(ctx->base, SIGTERM, on_term, ctx);
    ctx->sig_int = evsignal_new(ctx->base, SIGINT, on_term, ctx);
    ctx->sig_hup = evsignal_new(ctx->base, SIGHUP, on_hup, ctx);
    ctx->drain_ev = event_new(ctx->base, -1, EV_PERSIST, on_drain_poll, ctx);
    ctx->summary_ev = event_new(ctx->base, -1, EV_PERSIST, on_summary, ctx);
    ctx->sweep_ev = event_new(ctx->base, -1, EV_PERSIST, on_sweep, ctx);
    if (ctx->sig_term == NULL || ctx->sig_int == NULL || ctx->sig_hup == NULL ||
        ctx->drain_ev == NULL || ctx->summary_ev == NULL || ctx->sweep_ev == NULL)
        goto fail_events;
    evsignal_add(ctx->sig_term, NULL);
    evsignal_add(ctx->sig_int, NULL);
    evsignal_add(ctx->sig_hup, NULL);
    evtimer_add(ctx->sweep_ev, &sweep);
    arm_summary(ctx);
    for (size_t i = 0; i < cfg->n_warnings; i++)
        LOG_WARN(ctx->log, "config_warning", LOG_S("msg", cfg->warnings[i]));
    return ctx;

fail_events:
    if (ctx->sweep_ev != NULL)
        event_free(ctx->sweep_ev);
    if (ctx->summary_ev != NULL)
        event_free(ctx->summary_ev);
    if (ctx->drain_ev != NULL)
        event_free(ctx->drain_ev);
    if (ctx->sig_hup != NULL)
        event_free(ctx->sig_hup);
    if (ctx->sig_int != NULL)
        event_free(ctx->sig_int);
    if (ctx->sig_term != NULL)
        event_free(ctx->sig_term);
    gw_ipt_free(ctx->ipt);
fail_reg:
    gw_reg_free(ctx->reg);
fail_base:
    event_base_free(ctx->base);
fail_log:
    log_free(ctx->log);
fail_ctx:
    free(ctx);
oom:
    util_snprintf(err, errlen, "out of memory");
    gw_cfg_cleanup(cfg);
    free(cfg);
    return NULL;
fail_log_msg:
    log_free(ctx->log);
    free(ctx);
    gw_cfg_cleanup(cfg);
    free(cfg);
    return NULL;
}

/* --node-id, or HOST:PORT (the host name cut to the allowed characters). */
static void set_node_id(struct gw_ctx *ctx)
{
    char host[256] = "";
    size_t o = 0;

    if (ctx->cfg->node_id != NULL) {
        util_snprintf(ctx->node_id, sizeof(ctx->node_id), "%s", ctx->cfg->node_id);
        return;
    }
    if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0')
        util_snprintf(host, sizeof(host), "gateway");
    for (size_t i = 0; host[i] != '\0' && o < 48; i++) {
        if (gw_cfg_node_id_ok(&host[i], 1))
            host[o++] = host[i];
    }
    host[o] = '\0';
    util_snprintf(ctx->node_id, sizeof(ctx->node_id), "%s:%u", o > 0 ? host : "gateway",
                  (unsigned)ctx->main_port);
}

int gw_ctx_run(struct gw_ctx *ctx)
{
    const struct gw_cfg *cfg = ctx->cfg;
    char err[1024];
    const char *ca_path = NULL;

    if (!cfg->no_tls) {
        struct tls_server_opts o = {
            .cert_file = cfg->cert_path,
            .key_file = cfg->key_path,
            .state_dir = cfg->state_dir,
            .domain = cfg->domain,
            .alpn = "h2,http/1.1",
            .log = ctx->log,
        };
        ctx->tls = tls_server_new(&o, err, sizeof(err));
        if (ctx->tls == NULL) {
            LOG_ERROR(ctx->log, "tls_failed", LOG_S("err", err));
            return 1;
        }
        if (tls_server_is_local_ca(ctx->tls))
            ca_path = tls_server_ca_path(ctx->tls);
    }
    if (gw_metrics_start(ctx, err, sizeof(err)) != 0) {
        LOG_ERROR(ctx->log, "access_log_failed", LOG_S("err", err));
        return 1;
    }
    if (cfg->allow_path != NULL) {
        ctx->allow = gw_allow_load(cfg->allow_path, err, sizeof(err));
        if (ctx->allow == NULL) {
            LOG_ERROR(ctx->log, "allow_failed", LOG_S("err", err));
            return 1;
        }
    }
    ctx->lsn_main = gw_lsn_new(ctx, &cfg->listen, !cfg->no_tls, err, sizeof(err));
    if (ctx->lsn_main == NULL) {
        LOG_ERROR(ctx->log, "listen_failed", LOG_S("err", err));
        return 1;
    }
    ctx->main_port = gw_lsn_port(ctx->lsn_main);
    set_node_id(ctx);
    if (cfg->plain_listen.text != NULL) {
        ctx->lsn_plain = gw_lsn_new(ctx, &cfg->plain_listen, false, err, sizeof(err));
        if (ctx->lsn_plain == NULL) {
            LOG_ERROR(ctx->log, "listen_failed", LOG_S("err", err));
            return 1;
        }
    }
    LOG_INFO(ctx->log, "listening", LOG_S("addr", cfg->listen.host),
             LOG_U("port", gw_lsn_port(ctx->lsn_main)), LOG_S("scheme", cfg->no_tls ? "http" : "https"),
             LOG_S("domain", cfg->domain), LOG_S("ca", ca_path),
             LOG_S("access", cfg->open_effective ? "open" : "allow-list"),
             LOG_U("fd_limit", ctx->fd_limit), LOG_S("node", ctx->node_id),
             LOG_S("version", TG_VERSION));
    if (ctx->lsn_plain != NULL)
        LOG_INFO(ctx->log, "listening", LOG_S("addr", cfg->plain_listen.host),
                 LOG_U("port", gw_lsn_port(ctx->lsn_plain)), LOG_S("scheme", "http"),
                 LOG_S("domain", cfg->domain));
    if (cfg->redis.text != NULL) {
        ctx->lsn_node = gw_lsn_new_node(ctx, &cfg->node_listen, err, sizeof(err));
        if (ctx->lsn_node == NULL) {
            LOG_ERROR(ctx->log, "listen_failed", LOG_S("err", err));
            return 1;
        }
        ctx->node = gw_node_new(ctx);
        ctx->rds = gw_rds_new(ctx);
        if (ctx->node == NULL || ctx->rds == NULL) {
            LOG_ERROR(ctx->log, "start_failed", LOG_S("err", "out of memory"));
            return 1;
        }
        LOG_INFO(ctx->log, "listening", LOG_S("addr", cfg->node_listen.host),
                 LOG_U("port", gw_lsn_port(ctx->lsn_node)), LOG_S("scheme", "h2c"),
                 LOG_S("for", "nodes"),
                 LOG_S("advertise", cfg->node_advertise != NULL ? cfg->node_advertise
                                                                : cfg->node_listen.text),
                 LOG_S("redis", cfg->redis.host), LOG_U("redis_port", cfg->redis.port));
    }
    event_base_dispatch(ctx->base);
    return ctx->exit_code;
}

void gw_ctx_free(struct gw_ctx *ctx)
{
    if (ctx == NULL)
        return;
    while (!list_is_empty(&ctx->conns)) {
        struct gw_conn_link *l = LIST_ENTRY(ctx->conns.next, struct gw_conn_link, node);
        l->free_now(l);
    }
    /* their requests are gone: the peers and lookups that borrowed them go,
     * then the tunnels, which no longer release claims */
    gw_node_free(ctx->node);
    ctx->node = NULL;
    gw_rds_free(ctx->rds);
    ctx->rds = NULL;
    gw_tun_free_all(ctx);
    gw_lsn_free(ctx->lsn_node);
    gw_lsn_free(ctx->lsn_plain);
    gw_lsn_free(ctx->lsn_main);
    event_free(ctx->sweep_ev);
    event_free(ctx->summary_ev);
    event_free(ctx->drain_ev);
    event_free(ctx->sig_hup);
    event_free(ctx->sig_int);
    event_free(ctx->sig_term);
    gw_allow_free(ctx->allow);
    gw_metrics_cleanup(ctx);
    gw_ipt_free(ctx->ipt);
    tls_server_free(ctx->tls);
    gw_reg_free(ctx->reg);
    event_base_free(ctx->base);
    log_free(ctx->log);
    gw_cfg_cleanup(ctx->cfg_own);
    free(ctx->cfg_own);
    h2mem_cleanup(&ctx->h2mem); /* every session went with its connection */
    free(ctx);
}
