/* The daemon's context (ag_ctx.h): built in one ladder, freed in reverse. It
 * owns the lists of run-time objects and their deferred frees: a tunnel
 * that reported on_down is buried (ctx->dead) and a probe that reported
 * on_done stays on its agent, both freed by reap_ev, a deferred event that
 * runs once the current callbacks have returned. So no object is freed
 * under its own frame, and no call site has to return at once after a
 * report. */
#include "ag_ctx.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>

#include "ag_agt.h"
#include "ag_ctl.h"
#include "ag_insp.h"
#include "ag_probe.h"
#include "ag_tun.h"
#include "log.h"
#include "tls.h"
#include "util.h"

/* From the loop: nothing of a buried tunnel or a finished probe is on the
 * stack here. */
static void ctx_on_reap(evutil_socket_t fd, short what, void *arg)
{
    struct ag_ctx *ctx = arg;
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &ctx->dead)
    {
        list_unlink(n);
        ag_tun_free(ag_tun_from_link(n));
    }
    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        struct ag_agt *a = AG_AGT_OF(n);
        if (a->probe != NULL && ag_probe_is_done(a->probe)) {
            ag_probe_free(a->probe);
            a->probe = NULL;
        }
    }
}

void ag_ctx_reap_soon(struct ag_ctx *ctx) { event_active(ctx->reap_ev, 0, 0); }

void ag_ctx_bury_tun(struct ag_ctx *ctx, struct ag_tun *t)
{
    struct list *l = ag_tun_link(t);

    list_unlink(l); /* from ctx->old, if it was draining */
    list_insert_tail(&ctx->dead, l);
    ag_ctx_reap_soon(ctx);
}

/* Lowercase gateway host (the signed domain) and the upgrade's Host. */
static int ctx_set_names(struct ag_ctx *ctx)
{
    const struct ag_gateway *g = &ctx->opts->gateway;
    bool v6 = strchr(g->host, ':') != NULL;
    bool dflt = g->port == (g->tls ? 443 : 80);
    const char *d = ctx->opts->domain[0] != '\0' ? ctx->opts->domain : g->host;
    char host[AG_HOST_MAX + 1];
    size_t i;

    /* run --domain signs for another name than the one dialled */
    for (i = 0; d[i] != '\0' && i < sizeof(ctx->domain) - 1; i++)
        ctx->domain[i] = (char)((d[i] >= 'A' && d[i] <= 'Z') ? d[i] - 'A' + 'a' : d[i]);
    ctx->domain[i] = '\0';
    for (i = 0; g->host[i] != '\0' && i < sizeof(host) - 1; i++)
        host[i] =
            (char)((g->host[i] >= 'A' && g->host[i] <= 'Z') ? g->host[i] - 'A' + 'a' : g->host[i]);
    host[i] = '\0';
    if (util_snprintf(ctx->host_port, sizeof(ctx->host_port), "%s%s%s", v6 ? "[" : "", host,
                      v6 ? "]" : "") < 0)
        return -1;
    if (!dflt) {
        size_t l = strlen(ctx->host_port);
        if (util_snprintf(ctx->host_port + l, sizeof(ctx->host_port) - l, ":%u",
                          (unsigned)g->port) < 0)
            return -1;
    }
    return 0;
}

/* A random RFC 4122 version-4 UUID from the context's random source
 * (util_uuid4() would read the OS CSPRNG behind the clock's back). */
static int ctx_set_instance(struct ag_ctx *ctx)
{
    uint8_t b[16];
    char hex[33];

    if (clk_rand(ctx->clk, b, sizeof(b)) != 0)
        return -1;
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40); /* version 4 */
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    util_hex_encode(b, sizeof(b), hex);
    (void)util_snprintf(ctx->instance, sizeof(ctx->instance), "%.8s-%.4s-%.4s-%.4s-%.12s", hex,
                        hex + 8, hex + 12, hex + 16, hex + 20);
    return 0;
}

struct ag_ctx *ag_ctx_new(const char *home, const struct ag_run_opts *opts, const struct clk *clk)
{
    struct ag_ctx *ctx = calloc(1, sizeof(*ctx));
    char err[512];

    if (ctx == NULL) {
        fprintf(stderr, "tunnel-agent: out of memory\n");
        return NULL;
    }
    ctx->clk = clk;
    ctx->home = home;
    ctx->opts = opts;
    list_init(&ctx->agents);
    list_init(&ctx->old);
    list_init(&ctx->dead);
    ctx->log = log_new("tunnel-agent", opts->log_level, opts->log_format, STDERR_FILENO);
    if (ctx->log == NULL) {
        fprintf(stderr, "tunnel-agent: out of memory\n");
        goto fail_ctx;
    }
    if (ctx_set_names(ctx) != 0) {
        fprintf(stderr, "tunnel-agent: run: gateway host too long\n");
        goto fail_log;
    }
    if (ctx_set_instance(ctx) != 0) {
        fprintf(stderr, "tunnel-agent: the random generator failed\n");
        goto fail_log;
    }
    if (opts->gateway.tls) {
        ctx->ssl_ctx = tls_client_ctx_new(opts->ca_file[0] != '\0' ? opts->ca_file : NULL,
                                          "http/1.1", err, sizeof(err));
        if (ctx->ssl_ctx == NULL) {
            fprintf(stderr, "tunnel-agent: run: %s\n", err);
            goto fail_log;
        }
    }
    ctx->base = util_event_base_new();
    if (ctx->base == NULL) {
        fprintf(stderr, "tunnel-agent: cannot create the event loop\n");
        goto fail_ssl;
    }
    ctx->dns = evdns_base_new(ctx->base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
    if (ctx->dns == NULL) {
        /* no usable resolv.conf: literals and /etc/hosts still work */
        ctx->dns = evdns_base_new(ctx->base, 0);
        if (ctx->dns != NULL)
            evdns_base_load_hosts(ctx->dns, NULL);
    }
    if (ctx->dns == NULL) {
        fprintf(stderr, "tunnel-agent: out of memory\n");
        goto fail_base;
    }
    ctx->reap_ev = event_new(ctx->base, -1, 0, ctx_on_reap, ctx);
    if (ctx->reap_ev == NULL) {
        fprintf(stderr, "tunnel-agent: out of memory\n");
        goto fail_dns;
    }
    return ctx;

fail_dns:
    evdns_base_free(ctx->dns, 1);
fail_base:
    event_base_free(ctx->base);
fail_ssl:
    SSL_CTX_free(ctx->ssl_ctx);
fail_log:
    log_free(ctx->log);
fail_ctx:
    free(ctx);
    return NULL;
}

static void ctx_free_tun_list(struct list *head)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, head)
    {
        list_unlink(n);
        ag_tun_free(ag_tun_from_link(n));
    }
}

void ag_ctx_free(struct ag_ctx *ctx)
{
    struct list *n, *tmp;

    if (ctx == NULL)
        return;
    /* tunnels first: their streams hold agent references */
    ag_tun_free(ctx->tun);
    ctx->tun = NULL;
    ctx_free_tun_list(&ctx->old);
    ctx_free_tun_list(&ctx->dead);
    /* the inspector after the tunnels (their fwds end their captures), before
     * the agents (its replays hold references) */
    ag_insp_free(ctx->insp);
    ctx->insp = NULL;
    LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
    {
        ag_agt_remove(AG_AGT_OF(n));
    }
    /* what the daemon added after ag_ctx_new(), newest first */
    ag_ctl_server_free(ctx->ctl);
    for (size_t i = 0; i < sizeof(ctx->sig_ev) / sizeof(ctx->sig_ev[0]); i++)
        if (ctx->sig_ev[i] != NULL)
            event_free(ctx->sig_ev[i]);
    if (ctx->grace_ev != NULL)
        event_free(ctx->grace_ev);
    if (ctx->reconnect_ev != NULL)
        event_free(ctx->reconnect_ev);
    /* then ag_ctx_new()'s ladder, in reverse */
    event_free(ctx->reap_ev);
    evdns_base_free(ctx->dns, 1);
    event_base_free(ctx->base);
    SSL_CTX_free(ctx->ssl_ctx);
    log_free(ctx->log);
    free(ctx);
}
