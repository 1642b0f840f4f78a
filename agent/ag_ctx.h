/* The daemon's shared types: struct ag_ctx (one per event loop: base, DNS,
 * TLS client context, log, the live agents, the tunnels) and struct ag_agt
 * (one configured agent at run time: settings copy, key, state, counters,
 * connection pool, probe). Internal to `tunnel-agent run`: ag_daemon owns
 * both; ag_tun, ag_fwd and ag_probe borrow them and report back through the
 * ag_daemon_on_* functions declared here. */
#ifndef AG_CTX_H
#define AG_CTX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "ag_daemon.h"
#include "ag_store.h"
#include "id.h"

struct ag_ctl_server;
struct ag_fwd_pool;
struct ag_probe;
struct ag_tun;
struct event;
struct event_base;
struct evdns_base;
struct log_sink;

#define AG_ERR_MAX 256
#define AG_URL_MAX 512
#define AG_INSTANCE_LEN 36 /* a UUID */

/* What status reports per agent. */
enum ag_agt_state {
    AG_AGT_ST_DISCONNECTED = 0, /* disabled, or no tunnel wanted */
    AG_AGT_ST_CONNECTING,       /* wanted: dialling, authenticating or probing */
    AG_AGT_ST_CONNECTED,        /* registered and the last probe came back */
    AG_AGT_ST_ERROR,            /* stopped: refused permanently or superseded */
};

/* One agent of agents.json at run time. Owned by ctx->agents (one reference);
 * every stream serving it holds another (ag_agt_ref). An agent removed from
 * agents.json is unlinked (gone) and freed with its last reference. */
struct ag_agt {
    struct ag_ctx *ctx;      /* back-pointer */
    struct ag_agt *next;     /* ctx->agents list */
    unsigned refs;           /* ctx list + streams */
    bool gone;               /* no longer in agents.json */
    struct ag_agent cfg;     /* settings as last read */
    struct ag_target target; /* cfg.target parsed */
    uint64_t target_gen;     /* bumped when the target changes: pooled conns die */
    struct id_key key;       /* wiped at free */
    bool key_ok;             /* key loaded and matches the address */
    enum ag_agt_state state;
    bool stopped;              /* permanent refusal / superseded: not registered */
    char error[AG_ERR_MAX];    /* last error, "" for none */
    char url[AG_URL_MAX];      /* public URL from the gateway, "" before */
    bool online;               /* registered on the active tunnel */
    uint64_t requests;         /* streams served (all outcomes) */
    uint32_t inflight;         /* streams forwarded now (max_inflight cap) */
    bool probe_ok;             /* the last probe since going online came back */
    bool target_ok;            /* cfg.target parsed */
    int64_t last_probe_ms;     /* unix ms of the last successful probe, 0 none */
    uint64_t probe_rtt_ms;     /* its round trip */
    char probe_nonce[33];      /* nonce of the probe in flight, "" none */
    struct ag_probe *probe;    /* probe in flight, owned */
    struct event *probe_ev;    /* next probe */
    uint64_t probe_backoff_ms; /* delay after a failed probe */
    struct ag_fwd_pool *pool;  /* idle local connections, owned */
};

/* One daemon (one event loop). Owned by ag_daemon_run(). */
struct ag_ctx {
    struct event_base *base;
    struct evdns_base *dns;
    struct log_sink *log;
    const char *home;
    const struct ag_run_opts *opts;
    char domain[AG_HOST_MAX + 1];       /* gateway host, lowercase: the signed domain */
    char host_port[AG_HOST_MAX + 8];    /* Host of the upgrade: host[:port] */
    char instance[AG_INSTANCE_LEN + 1]; /* random, new per start */
    SSL_CTX *ssl_ctx;                   /* wss:// tunnels and probes, NULL for ws:// */
    struct ag_agt *agents;              /* every agent of agents.json, file order */
    struct ag_tun *tun;                 /* the active tunnel, or NULL */
    struct ag_tun **old;                /* draining tunnels, finishing their streams */
    size_t nold;
    struct event *reconnect_ev; /* backoff timer */
    uint64_t backoff_ms;        /* next reconnect delay before jitter */
    uint64_t tun_up_mono_ms;    /* when the active tunnel came up, 0 if not */
    char gw_error[AG_ERR_MAX];  /* why the last tunnel failed */
    struct ag_ctl_server *ctl;
    struct event *sig_ev[4];
    struct event *grace_ev; /* shutdown deadline */
    bool stopping;          /* SIGTERM/SIGINT seen */
    int exit_code;
    uint64_t next_id; /* numbers tunnels and streams in logs */
};

/* Reference counting of agents (streams keep theirs alive across reloads). */
void ag_agt_ref(struct ag_agt *a);
void ag_agt_unref(struct ag_agt *a);

/* True if the agent should be registered on the tunnel now. */
bool ag_agt_wanted(const struct ag_agt *a);

/* The agent with this lowercase address, or NULL. */
struct ag_agt *ag_ctx_find_addr(struct ag_ctx *ctx, const char *addr);

/* Reports from the tunnels. t may be freed by the daemon only inside
 * ag_daemon_on_tun_down(); after that call the tunnel code returns at once. */
void ag_daemon_on_tun_up(struct ag_ctx *ctx, struct ag_tun *t);
void ag_daemon_on_agent_online(struct ag_ctx *ctx, struct ag_tun *t, struct ag_agt *a,
                               const char *url);
/* A registration was refused: code from the gateway; permanent unless it is
 * a transient code (then the daemon retries with the next tunnel). */
void ag_daemon_on_agent_refused(struct ag_ctx *ctx, struct ag_tun *t, struct ag_agt *a,
                                const char *code, const char *message);
void ag_daemon_on_agent_removed(struct ag_ctx *ctx, struct ag_tun *t, struct ag_agt *a,
                                const char *reason);
void ag_daemon_on_tun_draining(struct ag_ctx *ctx, struct ag_tun *t);
/* The tunnel ended (or never came up). reason is for logs and status;
 * auth_code is the auth_error code or NULL. The daemon frees t here. */
void ag_daemon_on_tun_down(struct ag_ctx *ctx, struct ag_tun *t, const char *reason,
                           const char *auth_code);
/* A probe came back (ok) or failed. */
void ag_daemon_on_probe_done(struct ag_ctx *ctx, struct ag_agt *a, bool ok, uint64_t rtt_ms,
                             const char *err);

#endif
