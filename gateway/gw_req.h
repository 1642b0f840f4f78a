/* A public request, independent of the HTTP version it arrived in. gw_h1 and
 * gw_h2 (front ends) build one per request and own it; an upstream (a tunnel
 * stream, native or Osaurus) borrows it while the exchange runs. The two meet
 * only through the ops tables below, so one proxy path serves both front ends
 * (the shape of h2o's h2o_req_t + generator).
 *
 * Lifecycle:
 *   1. front end: gw_req_new(), fills the head, gw_req_route(), gw_req_start()
 *   2. upstream: attaches (gw_req_attach), streams the response through fe ops
 *   3. the upstream always ends with exactly one of fe->error (no head sent),
 *      fe->end (after head) — and detaches before calling it;
 *      or the front end cancels first: up->cancel() detaches and drops.
 *   4. front end: gw_req_free() once its response is out. */
#ifndef GW_REQ_H
#define GW_REQ_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <nghttp2/nghttp2.h>

#include "herr.h"
#include "id.h"
#include "util.h"

struct evbuffer;
struct event;
struct gw_ctx;
struct gw_req;

/* Header list in HTTP/2 form: lowercase names, owned copies. */
struct gw_hdrs {
    nghttp2_nv *nv;   /* name/value pairs; both strings malloc'd, NUL-terminated */
    size_t n;         /* entries used */
    size_t cap;       /* entries allocated */
    size_t bytes;     /* sum of name + value lengths, for the 431 limit */
};

/* Implemented by gw_h1 and gw_h2; called by the upstream. */
struct gw_fe_ops {
    /* Response head. nv excludes pseudo-headers and hop-by-hop headers.
     * Returns 0, or -1 if the front end is gone (upstream must cancel). */
    int (*head)(struct gw_req *r, int status, const nghttp2_nv *nv, size_t n);
    /* Response body bytes, in order. The front end counts them as unconsumed
     * and returns them through up->consumed() once they left for the client. */
    int (*body)(struct gw_req *r, const uint8_t *data, size_t len);
    /* Response done: complete (all bytes, clean end) or aborted. The upstream
     * has already detached. */
    void (*end)(struct gw_req *r, bool complete);
    /* Failed before any head: the front end answers with the JSON error. The
     * upstream has already detached. */
    void (*error)(struct gw_req *r, enum herr e);
    /* The upstream took bytes from r->body; the front end may read more. */
    void (*body_drained)(struct gw_req *r);
};

/* Implemented by tunnel streams; called by the front end. */
struct gw_up_ops {
    /* r->body has new bytes or r->body_eof became true. */
    void (*body_more)(void *up);
    /* n response bytes handed to fe->body left for the client. */
    void (*consumed)(void *up, size_t n);
    /* The client went away or the front end gave up: reset the stream, detach
     * (r->up becomes NULL) and never touch r again. */
    void (*cancel)(void *up);
};

enum gw_route {
    GW_ROUTE_AGENT = 0, /* <address>.<domain> */
    GW_ROUTE_APEX,      /* <domain>, or a host outside the domain (IP literal) */
    GW_ROUTE_ERROR,     /* see route_err */
};

struct gw_req {
    struct gw_ctx *ctx;
    uint64_t id;                     /* for logs */
    uint64_t conn_id;                /* public connection's id */
    const struct gw_fe_ops *fe;      /* front end; never NULL */
    void *fe_data;                   /* gw_h1 conn or gw_h2 stream */
    const struct gw_up_ops *up;      /* NULL until attached, and after detach */
    void *up_data;

    /* head, as the client sent it */
    char *method;                    /* owned */
    char *path;                      /* owned; path + query */
    char *authority;                 /* owned; Host or :authority, port included */
    char *protocol;                  /* owned; :protocol (extended CONNECT) or NULL */
    const char *scheme;              /* "https" or "http" (static) */
    struct gw_hdrs hdrs;             /* client headers, hop-by-hop removed */
    char client_ip[INET6_ADDRSTRLEN];
    char xff_chain[512];             /* trusted X-Forwarded-For prefix, or "" */
    char fwd_proto[8];               /* scheme for X-Forwarded-Proto */
    char *fwd_host;                  /* owned or NULL: trusted X-Forwarded-Host */
    bool is_head;                    /* HEAD: no response body */
    bool is_upgrade;                 /* WebSocket pass-through */
    bool has_content_length;
    uint64_t content_length;

    /* routing */
    enum gw_route route;
    enum herr route_err;
    uint8_t addr[ID_ADDR_LEN];       /* agent address when route == AGENT */

    /* request body: client -> agent */
    struct evbuffer *body;           /* read from the client, not yet sent */
    bool body_eof;                   /* the client's body is complete */
    uint64_t body_in;                /* bytes received from the client */
    uint64_t body_out;               /* bytes taken by the upstream */

    /* response progress */
    int status;                      /* sent status, 0 before head */
    uint64_t resp_bytes;             /* response body bytes delivered */
    uint64_t start_ms;
    uint64_t resp_timeout_ms;        /* response-header timeout; 0 = none */
    struct event *timer;             /* response-header / body-idle timeout */
    enum herr err;                   /* error answered, or HERR_NONE */
    bool logged;                     /* the access line was written */
};

/* A new request owned by the caller. Returns NULL if out of memory. */
struct gw_req *gw_req_new(struct gw_ctx *ctx, const struct gw_fe_ops *fe, void *fe_data,
                          uint64_t conn_id, const char *scheme);

/* Takes NULL. The upstream must be detached (or is cancelled first). */
void gw_req_free(struct gw_req *r);

/* Adds a header (name lowercased) unless it is hop-by-hop or one the gateway
 * sets itself. Returns 0, -1 out of memory, or -2 past max_bytes (431). */
int gw_hdrs_add(struct gw_hdrs *h, const char *name, size_t nlen, const char *value,
                size_t vlen, size_t max_bytes);
void gw_hdrs_cleanup(struct gw_hdrs *h);
/* First value of name (lowercase), or NULL. */
const nghttp2_nv *gw_hdrs_get(const struct gw_hdrs *h, const char *name);

/* True for hop-by-hop headers (RFC 9110 7.6.1) and ones only the gateway sets. */
bool gw_hdr_is_hop_by_hop(const char *name, size_t len);
bool gw_hdr_is_gateway_set(const char *name, size_t len);

/* Sets r->route/route_err/addr from r->authority and the configured domain. */
void gw_req_route(struct gw_req *r);

/* Fills client_ip / xff_chain / fwd_proto / fwd_host from the peer address
 * and, when the peer is a trusted proxy, its forwarding headers. */
void gw_req_set_peer(struct gw_req *r, const struct sockaddr *peer);

/* Dispatches a routed request with a complete head: admin endpoints, agent
 * streams, or an error through fe->error. Call once. */
void gw_req_start(struct gw_req *r);

/* Called by the front end when bytes arrive in r->body (or eof). */
void gw_req_body_more(struct gw_req *r);

/* The front end tells the upstream n response bytes left. */
void gw_req_consumed(struct gw_req *r, size_t n);

/* Cancels the upstream, if any (client gone). Safe to call twice. */
void gw_req_cancel(struct gw_req *r);

/* Upstream side: attach / detach. */
void gw_req_attach(struct gw_req *r, const struct gw_up_ops *up, void *up_data);
void gw_req_detach(struct gw_req *r);

/* Upstream side, in this order: gw_req_head() once, gw_req_body() any
 * number of times, then gw_req_end(); or gw_req_fail() instead of all three
 * when no head was sent. end and fail detach the upstream first. */
int gw_req_head(struct gw_req *r, int status, const nghttp2_nv *nv, size_t n);
int gw_req_body(struct gw_req *r, const uint8_t *data, size_t len);
void gw_req_end(struct gw_req *r, bool complete);
void gw_req_fail(struct gw_req *r, enum herr e);

/* Starts/rearms the request timer; fires gw_req_on_timeout. 0 = disarm. */
void gw_req_arm_timer(struct gw_req *r, uint64_t ms);

/* Writes a short access log line. */
void gw_req_log(struct gw_req *r, const char *outcome);

#endif
