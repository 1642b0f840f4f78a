/* The gateway's one context per event loop (struct gw_ctx, gw_ctx.c): every
 * long-lived object reaches the loop, configuration, clock, TLS, registry,
 * log and counters through it. No other mutable state exists outside objects
 * owned from here. */
#ifndef GW_H
#define GW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gw_admin.h"
#include "gw_cfg.h"
#include "gw_metrics.h"
#include "h2mem.h"
#include "list.h"

struct clk;
struct event_base;
struct event;
struct log_sink;
struct gw_cfg;
struct tls_server;
struct gw_reg;
struct gw_lsn;
struct gw_allow;
struct gw_ipt;
struct gw_rds;
struct gw_node;

/* With a shared registry, the longest a draining node waits for its agents'
 * tunnels to move to other nodes before draining them the one-node way. */
#define GW_HANDOVER_MAX_S 30

/* Monotonic counters exported by /stats and /metrics. */
struct gw_counters {
    uint64_t conns_accepted;       /* public TCP connections accepted */
    uint64_t conns_refused;        /* refused by max-conns-per-ip */
    uint64_t requests_total;       /* public requests routed to an agent */
    uint64_t requests_failed;      /* of those, answered with a gateway error */
    uint64_t websockets_total;     /* of those, WebSocket upgrades */
    uint64_t tunnel_connections;   /* tunnel WebSocket upgrades accepted */
    uint64_t auth_failures;        /* tunnels closed for failed auth */
    uint64_t bytes_to_agents;      /* request body bytes forwarded */
    uint64_t bytes_from_agents;    /* response body bytes forwarded */
    uint64_t takeovers;            /* agents superseded by another instance's registration */
    uint64_t invalid_frames;       /* Osaurus frames the schema refused (dropped or fatal) */
    uint64_t bad_host_responses;   /* Osaurus requests failed for their agent's frames */
    uint64_t slow_consumer_aborts; /* Osaurus streams cut for a caller reading too slowly */
    uint64_t node_out;             /* requests forwarded to the node holding the agent */
    uint64_t node_in;              /* requests accepted from other nodes (proof valid) */
    uint64_t node_refused;         /* node-listener requests refused (no or bad proof) */
};

struct gw_ctx {
    struct event_base *base;
    const struct clk *clk;          /* time and randomness (clk_system in the program) */
    const struct gw_cfg *cfg;       /* immutable; the current one (== cfg_own) */
    struct gw_cfg *cfg_own;         /* owned (heap): replaced whole on SIGHUP; restart-only
                                     * keys keep their strings, so pointers into them
                                     * (domain, paths) stay valid; nothing may keep a
                                     * pointer to a live key's value across the loop */
    struct log_sink *log;
    struct tls_server *tls;         /* NULL with --no-tls and no TLS listener */
    struct gw_reg *reg;             /* address -> route */
    struct gw_allow *allow;         /* --allow list, NULL when open */
    struct gw_ipt *ipt;             /* per-IP connection and tunnel counts */
    struct event *sweep_ev;         /* periodic housekeeping (per-IP table) */
    struct gw_lsn *lsn_main;        /* main listener (TLS unless --no-tls) */
    struct gw_lsn *lsn_plain;       /* --plain-listen, or NULL */
    struct gw_lsn *lsn_node;        /* --node-listen (with --redis), or NULL */
    struct gw_rds *rds;             /* the shared registry (--redis), or NULL */
    struct gw_node *node;           /* connections to other nodes (--redis), or NULL */
    uint16_t main_port;             /* the main listener's bound port (for URLs) */
    char node_id[GW_NODE_ID_MAX + 1]; /* --node-id, or HOST:PORT once listening */
    struct list conns;              /* struct gw_conn_link: public connections, for shutdown */
    struct list tuns;               /* struct gw_tun: all tunnels, authenticated or not */
    struct event *sig_term;
    struct event *sig_int;
    struct event *sig_hup;
    struct event *summary_ev;       /* periodic summary log line */
    struct event *drain_ev;         /* polls the drain until streams are done */
    uint64_t next_id;               /* numbers connections, tunnels, streams */
    uint64_t start_ms;              /* monotonic start time */
    bool draining;                  /* SIGTERM seen: no new tunnels */
    uint64_t drain_deadline_ms;     /* monotonic end of the drain grace */
    bool handover;                  /* draining, waiting for agents to move (gw_rds) */
    uint64_t handover_deadline_ms;  /* monotonic end of that wait */
    bool drain_closing;             /* drained: listeners closed, last streams end */
    uint64_t drain_exit_ms;         /* monotonic: exit no sooner (claims released) */
    size_t tunnels_live;            /* authenticated tunnels */
    size_t tunnels_pending;         /* upgraded, not yet authenticated */
    uint64_t fd_limit;              /* RLIMIT_NOFILE soft limit (raised to the hard one) */
    size_t osr_body_memory;         /* Osaurus request bodies being collected (gw_osr) */
    int exit_code;
    struct gw_counters n;
    struct gw_metrics m;            /* /metrics state and the access log (gw_metrics.h) */
    struct gw_deny deny;            /* /admin/deny (gw_admin.h) */
    struct h2mem h2mem;             /* every nghttp2 session's allocator (h2mem.h) */
};

/* A context for cfg (a loaded heap struct gw_cfg; the context owns it from
 * here, also on failure, and frees it with gw_cfg_cleanup + free), with its
 * loop, log, registry and per-IP table, signals and timers armed. Returns NULL
 * with a message in err. */
struct gw_ctx *gw_ctx_new(struct gw_cfg *cfg, const struct clk *clk, char *err, size_t errlen);

/* Loads TLS and the allow list, opens the listeners and runs the loop until
 * the drain ends or a second signal. Returns the process exit status. */
int gw_ctx_run(struct gw_ctx *ctx);

/* Frees everything, public connections first (their SSLs reference the TLS
 * state, their requests are borrowed by tunnel streams), then tunnels.
 * Takes NULL. */
void gw_ctx_free(struct gw_ctx *ctx);

/* Embedded in every public connection object (handshake, h1, h2) so that
 * shutdown can free them all before the TLS state they reference. */
struct gw_conn_link {
    struct list node;                           /* in ctx->conns */
    void (*free_now)(struct gw_conn_link *l);   /* frees the containing object */
};

static inline void gw_conn_link_add(struct gw_ctx *ctx, struct gw_conn_link *l)
{
    list_insert_tail(&ctx->conns, &l->node);
}

static inline void gw_conn_link_del(struct gw_ctx *ctx, struct gw_conn_link *l)
{
    (void)ctx;
    list_unlink(&l->node);
}

static inline uint64_t gw_next_id(struct gw_ctx *ctx)
{
    return ++ctx->next_id;
}

#endif
