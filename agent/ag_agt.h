/* The agents of a running daemon: struct ag_agt (one configured agent at run
 * time: settings copy, key, state, counters, connection pool, probe) and the
 * context's list of them (ctx->agents, file order). This module owns the list
 * (add, find, remove), each agent's reference count, the state that status
 * shows, and the probe schedule: it starts probes (ag_probe) and takes their
 * reports. The tunnels (ag_tun) and the daemon read and report facts; what
 * state follows from them is decided here. */
#ifndef AG_AGT_H
#define AG_AGT_H

#include <stdbool.h>
#include <stdint.h>

#include "ag_ctx.h"
#include "ag_store.h"
#include "id.h"
#include "list.h"

struct ag_fwd_pool;
struct ag_probe;
struct event;

/* What status reports per agent. */
enum ag_agt_state {
    AG_AGT_ST_DISCONNECTED = 0, /* disabled, or no tunnel wanted */
    AG_AGT_ST_CONNECTING,       /* wanted: dialling, authenticating or probing */
    AG_AGT_ST_CONNECTED,        /* registered and the last probe came back */
    AG_AGT_ST_ERROR,            /* stopped: refused permanently or superseded */
};

/* The last attempt to reach the local API, as status shows it. */
enum ag_agt_local {
    AG_AGT_LOCAL_NONE = 0, /* no request yet */
    AG_AGT_LOCAL_OK,       /* it answered with a response head */
    AG_AGT_LOCAL_REFUSED,  /* connect failed, or it closed before answering */
    AG_AGT_LOCAL_TIMEOUT,  /* no response head within the response timeout */
};

/* One agent of agents.json at run time. Owned by ctx->agents (one reference);
 * every stream serving it holds another (ag_agt_ref). An agent removed from
 * agents.json is unlinked (gone) and freed with its last reference. */
struct ag_agt {
    struct ag_ctx *ctx;      /* back-pointer */
    struct list link;        /* ctx->agents; unlinked once gone */
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
    uint64_t requests;         /* public streams served (all outcomes), probes not counted */
    uint64_t probes;           /* our own probes answered by the tunnel */
    bool announced;            /* its URL was printed (tunnel-agent http) */
    uint64_t bytes_in;         /* request body bytes from the public side */
    uint64_t bytes_out;        /* response body bytes to the public side */
    enum ag_agt_local local;   /* last local-API result */
    int64_t local_ms;          /* its unix ms, 0 none yet */
    char local_error[AG_ERR_MAX]; /* "local_unreachable: ..." while the local API fails */
    uint32_t inflight;         /* streams forwarded now (max_inflight cap) */
    bool probe_ok;             /* the last probe since going online came back */
    bool target_ok;            /* cfg.target parsed */
    int64_t last_probe_ms;     /* unix ms of the last successful probe, 0 none */
    uint64_t probe_rtt_ms;     /* its round trip */
    char probe_nonce[33];      /* nonce of the probe in flight, "" none */
    struct ag_probe *probe;    /* probe in flight or finished (freed by reap_ev), owned */
    struct event *probe_ev;    /* next probe */
    uint64_t probe_backoff_ms; /* delay after a failed probe */
    struct ag_fwd_pool *pool;  /* idle local connections, owned */
};

/* The agent of a node of ctx->agents. */
#define AG_AGT_OF(node) LIST_ENTRY(node, struct ag_agt, link)

/* Makes an agent from cfg (its key read through st) and appends it to
 * ctx->agents. Returns NULL if out of memory. */
struct ag_agt *ag_agt_add(struct ag_ctx *ctx, struct ag_store *st, struct ag_agent *cfg);

/* Applies settings read again from agents.json to a (same id): a changed
 * target flushes the pool, a missing key is retried, a reload gives a refused
 * agent one new attempt. */
void ag_agt_load(struct ag_agt *a, struct ag_store *st, struct ag_agent *cfg);

/* Unlinks a from ctx->agents (gone, offline) and drops the list's reference:
 * freed now, or by the last stream still serving it. */
void ag_agt_remove(struct ag_agt *a);

/* Reference counting of agents (streams keep theirs alive across reloads). */
void ag_agt_ref(struct ag_agt *a);
void ag_agt_unref(struct ag_agt *a);

/* True if the agent should be registered on the tunnel now. */
bool ag_agt_wanted(const struct ag_agt *a);

/* True if some agent of ctx is wanted. */
bool ag_agt_any_wanted(const struct ag_ctx *ctx);

/* The agent with this lowercase address, or NULL. */
struct ag_agt *ag_agt_find(struct ag_ctx *ctx, const char *addr);

/* The agent with this id, or NULL. */
struct ag_agt *ag_agt_find_id(struct ag_ctx *ctx, const char *id);

/* Records the outcome of one forwarded request (detail: why it failed, or
 * NULL). A failure sets a->local_error (local_unreachable / local_timeout),
 * shown as the agent's error while no request succeeds; the state is left
 * alone (the tunnel still works: status says connected with that error). */
void ag_agt_local_result(struct ag_agt *a, enum ag_agt_local r, const char *detail);

/* "none", "ok", "refused" or "timeout". */
const char *ag_agt_local_name(enum ag_agt_local r);

/* "disconnected", "connecting", "connected" or "error". */
const char *ag_agt_state_name(enum ag_agt_state st);

/* Derives the state shown by status from the facts; logs transitions. */
void ag_agt_update_state(struct ag_agt *a);

/* Not registered any more: offline, probe abandoned. The caller updates the
 * state (ag_agt_update_state) when it is done changing facts. */
void ag_agt_set_offline(struct ag_agt *a);

/* Registered on a tunnel that is going away: reachable there until the next
 * one replaces it, but no longer counted online; the probe is abandoned. */
void ag_agt_set_leaving(struct ag_agt *a);

/* Permanently stopped (refused, superseded): offline, why in a->error. */
void ag_agt_stop(struct ag_agt *a, const char *why);

/* The gateway accepted a on the active tunnel; url is its public URL ("" to
 * keep the one known). Starts probing at once. */
void ag_agt_set_online(struct ag_agt *a, const char *url);

#endif
