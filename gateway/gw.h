/* The gateway's one context per event loop: every long-lived object reaches
 * the loop, configuration, TLS, registry, log and counters through it. No
 * other mutable state exists outside objects owned from here. */
#ifndef GW_H
#define GW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct event;
struct log_sink;
struct gw_cfg;
struct tls_server;
struct gw_reg;
struct gw_lsn;
struct gw_tun;
struct gw_allow;
struct gw_ipt;

/* Monotonic counters exported by /stats and /metrics. */
struct gw_counters {
    uint64_t conns_accepted;       /* public TCP connections accepted */
    uint64_t conns_refused;        /* refused by max-conns-per-ip */
    uint64_t requests_total;       /* public requests routed to an agent */
    uint64_t requests_failed;      /* of those, answered with a gateway error */
    uint64_t tunnel_connections;   /* tunnel WebSocket upgrades accepted */
    uint64_t auth_failures;        /* tunnels closed for failed auth */
    uint64_t bytes_to_agents;      /* request body bytes forwarded */
    uint64_t bytes_from_agents;    /* response body bytes forwarded */
};

struct gw_ctx {
    struct event_base *base;
    const struct gw_cfg *cfg;       /* immutable; replaced on SIGHUP */
    struct log_sink *log;
    struct tls_server *tls;         /* NULL with --no-tls and no TLS listener */
    struct gw_reg *reg;             /* address -> tunnel routes */
    struct gw_allow *allow;         /* --allow list, NULL when open */
    struct gw_ipt *ipt;             /* per-IP connection and tunnel counts */
    struct event *sweep_ev;         /* periodic housekeeping (per-IP table) */
    struct gw_lsn *lsn_main;        /* main listener (TLS unless --no-tls) */
    struct gw_lsn *lsn_plain;       /* --plain-listen, or NULL */
    struct gw_conn_link *conns;     /* all public connections, for shutdown */
    struct gw_tun *tuns;            /* all tunnels, authenticated or not */
    struct event *sig_term;
    struct event *sig_int;
    struct event *sig_hup;
    struct event *summary_ev;       /* periodic summary log line */
    struct event *drain_ev;         /* fires at the end of the drain grace */
    uint64_t next_id;               /* numbers connections, tunnels, streams */
    uint64_t start_ms;              /* monotonic start time */
    bool draining;                  /* SIGTERM seen: no new tunnels */
    uint64_t drain_deadline_ms;     /* monotonic end of the drain grace */
    size_t tunnels_live;            /* authenticated tunnels */
    int exit_code;
    struct gw_counters n;
};

/* Embedded in every public connection object (handshake, h1, h2) so that
 * shutdown can free them all before the TLS state they reference. */
struct gw_conn_link {
    struct gw_conn_link *next, *prev;
    void (*free_now)(struct gw_conn_link *l); /* frees the containing object */
};

static inline void gw_conn_link_add(struct gw_ctx *ctx, struct gw_conn_link *l)
{
    l->prev = NULL;
    l->next = ctx->conns;
    if (ctx->conns != NULL)
        ctx->conns->prev = l;
    ctx->conns = l;
}

static inline void gw_conn_link_del(struct gw_ctx *ctx, struct gw_conn_link *l)
{
    if (l->prev != NULL)
        l->prev->next = l->next;
    else if (ctx->conns == l)
        ctx->conns = l->next;
    if (l->next != NULL)
        l->next->prev = l->prev;
    l->next = l->prev = NULL;
}

static inline uint64_t gw_next_id(struct gw_ctx *ctx)
{
    return ++ctx->next_id;
}

#endif
