/* The daemon's context: one struct ag_ctx per event loop (`tunnel-agent run`).
 * It holds the loop, DNS, the TLS client context, the log, the clock and
 * random source, and owns every run-time object: the agents (ag_agt), the
 * active, draining and dead tunnels (ag_tun), the control socket and the
 * daemon's events. ag_daemon creates it and decides policy; the modules below
 * borrow it. Dead tunnels and finished probes are freed here, from reap_ev,
 * never under the frame of the object that reported. Internal to `run`. */
#ifndef AG_CTX_H
#define AG_CTX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "ag_opts.h"
#include "clk.h"
#include "list.h"

struct ag_ctl_server;
struct ag_insp;
struct ag_tun;
struct event;
struct event_base;
struct evdns_base;
struct log_sink;

#define AG_ERR_MAX 256
#define AG_URL_MAX 512
#define AG_INSTANCE_LEN 36 /* a UUID */

struct ag_ctx {
    const struct clk *clk; /* time and randomness (&clk_system) */
    struct event_base *base;
    struct evdns_base *dns;
    struct log_sink *log;
    const char *home;                   /* borrowed from ag_main */
    const struct ag_run_opts *opts;     /* borrowed from ag_main */
    char domain[AG_HOST_MAX + 1];       /* signed domain, lowercase: run --domain, else the
                                         * gateway host */
    char host_port[AG_HOST_MAX + 8];    /* Host of the upgrade: host[:port] */
    char instance[AG_INSTANCE_LEN + 1]; /* random, new per start */
    SSL_CTX *ssl_ctx;                   /* wss:// tunnels and probes, NULL for ws:// */
    struct list agents;                 /* struct ag_agt, file order; one reference each */
    struct ag_tun *tun;                 /* the active tunnel, or NULL */
    struct list old;                    /* draining tunnels, finishing their streams */
    struct list dead;                   /* tunnels that reported on_down, freed by reap_ev */
    struct event *reap_ev;              /* deferred: frees dead tunnels and finished probes */
    struct event *reconnect_ev;         /* backoff timer (ag_daemon) */
    uint64_t backoff_ms;                /* next reconnect delay before jitter */
    uint64_t tun_up_mono_ms;            /* when the active tunnel came up, 0 if not */
    char gw_error[AG_ERR_MAX];          /* why the last tunnel failed */
    struct ag_ctl_server *ctl;          /* control socket (ag_daemon) */
    struct ag_insp *insp;               /* run --inspect (ag_daemon), or NULL */
    struct event *sig_ev[3];            /* SIGTERM, SIGINT, SIGHUP (ag_daemon) */
    struct event *grace_ev;             /* shutdown deadline (ag_daemon) */
    bool stopping;                      /* SIGTERM/SIGINT seen */
    uint64_t next_id;                   /* numbers tunnels and streams in logs */
};

/* Builds a context for home and opts (both borrowed for its lifetime): log,
 * domain and Host, instance id (from clk), TLS client context for wss://,
 * event loop, DNS, reap event. Returns NULL after printing why on stderr. */
struct ag_ctx *ag_ctx_new(const char *home, const struct ag_run_opts *opts, const struct clk *clk);

/* Frees every tunnel (no reports follow), agent, the control socket, the
 * daemon's events and then the context's own parts in reverse order of
 * ag_ctx_new(). Call it only from outside the loop. Takes NULL. */
void ag_ctx_free(struct ag_ctx *ctx);

/* The daemon keeps a tunnel that reported on_down here; it is freed from
 * reap_ev once the current callbacks have returned. */
void ag_ctx_bury_tun(struct ag_ctx *ctx, struct ag_tun *t);

/* Asks reap_ev to run: it frees buried tunnels and every agent's finished
 * probe (ag_probe_is_done). Safe to call from any callback. */
void ag_ctx_reap_soon(struct ag_ctx *ctx);

#endif
