/* Gateway observability: the counters, histograms and gauges /metrics
 * exports (Prometheus text format 0.0.4), and the access log (one line per
 * request, to the main log, a file of its own, or nowhere). The state is
 * plain data embedded in struct gw_ctx (ctx->m); the code that sees an event
 * counts it with the gw_metrics_* calls below, and gw_req_log() observes
 * each finished request once. */
#ifndef GW_METRICS_H
#define GW_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "herr.h"

struct evbuffer;
struct gw_ctx;
struct gw_req;
struct log_sink;

/* Outcomes of a tunnel's authentication, label outcome="..." */
enum gw_auth_outcome {
    GW_AUTH_OK = 0,
    GW_AUTH_SIGNATURE,       /* a signature did not verify */
    GW_AUTH_NONCE,           /* nonce unknown, reused or expired */
    GW_AUTH_TIMESTAMP,       /* timestamp outside the window */
    GW_AUTH_NOT_ALLOWED,     /* address not allowed (allow list, deny list) */
    GW_AUTH_TIMEOUT,         /* no auth message in time */
    GW_AUTH_TOO_MANY_AGENTS, /* more agents than --max-agents-per-tunnel */
    GW_AUTH_MALFORMED,       /* anything else: the message did not decode */
    GW_AUTH_COUNT_
};

/* Rate limits and quotas, label kind="..." */
enum gw_limit_kind {
    GW_LIMIT_CONNS_PER_IP = 0,   /* --max-conns-per-ip */
    GW_LIMIT_TUNNEL_CONNECTS,    /* --tunnel-connects-per-ip-per-min */
    GW_LIMIT_TUNNELS_PER_IP,     /* --max-tunnels-per-ip */
    GW_LIMIT_CONTROL_MESSAGES,   /* control messages per tunnel per minute */
    GW_LIMIT_PENDING_TUNNELS,    /* --max-pending-tunnels */
    GW_LIMIT_PENDING_TUNNELS_PER_IP, /* --max-pending-tunnels-per-ip */
    GW_LIMIT_HEADER_TIMEOUT,     /* --header-timeout */
    GW_LIMIT_DESCRIPTORS,        /* out of file descriptors (or within the reserve) */
    GW_LIMIT_OSAURUS_BODY_MEMORY,/* Osaurus-mode request bodies being collected */
    GW_LIMIT_PROXY_HEADER,       /* --proxy-protocol: a connection without a valid header */
    GW_LIMIT_PRESENCE,           /* --presence-per-ip-per-min */
    GW_LIMIT_COUNT_
};

#define GW_HIST_BUCKETS 16 /* finite upper bounds, 5 ms .. 300 s; +Inf is count */

/* A fixed-bucket histogram of durations. */
struct gw_hist {
    uint64_t le[GW_HIST_BUCKETS]; /* observations <= bound i (not cumulative) */
    uint64_t count;               /* all observations */
    uint64_t sum_ms;              /* their sum, milliseconds */
};

/* Plain data; zeroed with the context. */
struct gw_metrics {
    uint64_t status_class[6];       /* agent-host requests by status / 100 (1..5; 0 unused) */
    uint64_t by_err[HERR_COUNT_];   /* of those, answered with a gateway error, by code */
    struct gw_hist ttfb;            /* time to response headers */
    struct gw_hist dur;             /* whole request duration */
    struct gw_hist fwd_ttfb;        /* time to response headers, forwarded to another node */
    struct gw_hist from_node_ttfb;  /* the same, for requests other nodes forwarded here */
    uint64_t req_body_bytes;        /* request body bytes received from clients */
    uint64_t resp_body_bytes;       /* response body bytes sent to clients */
    uint64_t websockets_active;     /* upgraded requests open now */
    uint64_t auth[GW_AUTH_COUNT_];  /* tunnel authentications by outcome */
    uint64_t limit[GW_LIMIT_COUNT_];/* refusals by rate limit / quota */
    /* gw_metrics_request once gw_metrics_start ran (NULL before: a context
     * in a unit test counts nothing); a pointer, so gw_req links alone */
    void (*on_request)(struct gw_req *r, const char *outcome);
    struct log_sink *access;        /* owned: --access-log FILE's sink, or NULL */
    int access_fd;                  /* its fd, -1 when none */
};

/* At start (gw_ctx_run, before the listeners): opens --access-log FILE
 * (append, mode 0600). Returns 0, or -1 with a message in err. */
int gw_metrics_start(struct gw_ctx *ctx, char *err, size_t errlen);

/* SIGHUP: reopens --access-log FILE (after log rotation). On failure the old
 * file stays in use and an error is logged. Returns 0 or -1. */
int gw_access_log_reopen(struct gw_ctx *ctx);

/* Shutdown: closes the access log, frees the admin deny list. Safe twice. */
void gw_metrics_cleanup(struct gw_ctx *ctx);

/* Counts one tunnel authentication outcome / one rate-limit refusal. */
void gw_metrics_auth(struct gw_ctx *ctx, enum gw_auth_outcome o);
void gw_metrics_limit(struct gw_ctx *ctx, enum gw_limit_kind k);

/* A finished request (called once, from gw_req_log): counts it, and writes
 * its access line unless --access-log off. */
void gw_metrics_request(struct gw_req *r, const char *outcome);

/* Appends the whole /metrics text to out. Returns 0 or -1 (out of memory). */
int gw_metrics_render(struct gw_ctx *ctx, struct evbuffer *out);

/* Label value for an outcome or kind. */
const char *gw_auth_outcome_name(enum gw_auth_outcome o);
const char *gw_limit_kind_name(enum gw_limit_kind k);

#endif
