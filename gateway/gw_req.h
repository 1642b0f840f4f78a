/* A public request, independent of the HTTP version it arrived in. gw_h1 and
 * gw_h2 (front ends) build one per request and own it; the bridge (gw_px)
 * routes it, and an upstream stream (gw_up.h) borrows it while the exchange
 * runs. Front end and upstream meet only through this API and the two ops
 * tables (struct gw_fe_ops here, struct gw_up_ops in gw_up.h), so one proxy
 * path serves both front ends and every upstream (the shape of h2o's
 * h2o_req_t + generator).
 *
 * Lifecycle:
 *   1. front end: gw_req_new(), fills the head (method, path, authority,
 *      protocol, headers), gw_req_set_peer(), then gw_px_start()
 *   2. the bridge routes it and an upstream attaches (gw_req_attach)
 *   3. request body, front end -> upstream: gw_req_body_add() /
 *      gw_req_body_eof(); the upstream takes it with gw_req_body_take(),
 *      which tells the front end to read more (fe->body_drained)
 *   4. response, upstream -> front end: gw_req_head(), gw_req_body(), then
 *      gw_req_end(); or gw_req_fail() when no head was sent. end and fail
 *      detach the upstream first; or the front end cancels first
 *      (gw_req_cancel: up->cancel detaches and drops)
 *   5. front end: gw_req_free() once its response is out.
 * WebSocket upgrades have one form whatever the client spoke (RFC 8441):
 * method "CONNECT", protocol "websocket"; h1_upgrade says the client asked
 * with HTTP/1.1 Upgrade (the front end then answers 101 itself). */
#ifndef GW_REQ_H
#define GW_REQ_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <nghttp2/nghttp2.h>

#include "gw_up.h"
#include "herr.h"
#include "id.h"
#include "util.h"

/* Longest X-Request-Id kept from a client; [A-Za-z0-9._-] only. */
#define GW_REQ_ID_MAX 128

struct bufferevent;
struct evbuffer;
struct event;
struct gw_ctx;
struct gw_req;
struct gw_node_in;

/* Called once with the connection a front end handed over (take_conn), or
 * with bev NULL if the connection ended before it could be handed over. */
typedef void (*gw_take_conn_cb)(struct gw_req *r, struct bufferevent *bev, const void *arg);

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
    /* Hands the whole connection over (a /tunnel/connect upgrade): the front
     * end stops reading requests and, from its own event callback once the
     * current read is done, gives its bufferevent (bytes after the head still
     * in its input) to cb and frees itself; cb gets NULL if the connection
     * ends first. NULL (or -1) where it cannot: HTTP/2 streams share their
     * connection. */
    int (*take_conn)(struct gw_req *r, gw_take_conn_cb cb, const void *arg);
};

enum gw_route_kind {
    GW_ROUTE_NONE = 0,  /* not routed (yet): the request failed before */
    GW_ROUTE_AGENT,     /* <address>.<domain> */
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
    struct sockaddr_storage peer;    /* the TCP peer */
    char client_ip[INET6_ADDRSTRLEN];
    char xff_chain[512];             /* trusted X-Forwarded-For prefix, or "" */
    char fwd_proto[8];               /* scheme for X-Forwarded-Proto */
    char *fwd_host;                  /* owned or NULL: trusted X-Forwarded-Host */
    bool is_head;                    /* HEAD: no response body */
    bool from_node;                  /* came to --node-listen from another node */
    bool forwarded;                  /* sent on to the node holding the agent (gw_node) */
    struct gw_node_in *node_in;      /* owned or NULL: its forwarding fields (from_node) */
    bool h1_upgrade;                 /* an HTTP/1.1 Upgrade: websocket (answered 101) */
    bool has_content_length;
    uint64_t content_length;

    /* routing */
    enum gw_route_kind route;
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
    uint64_t head_ms;                /* monotonic time the response head (or error) went,
                                      * 0 before */
    bool ws_counted;                 /* counted in ctx->m.websockets_active */
    char rid[GW_REQ_ID_MAX + 1];     /* request id: the client's valid X-Request-Id, or
                                      * ours; "" before gw_req_set_request_id() */
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
/* Removes every field named name (any case). */
void gw_hdrs_remove(struct gw_hdrs *h, const char *name, size_t len);
/* First value of name (lowercase), or NULL. */
const nghttp2_nv *gw_hdrs_get(const struct gw_hdrs *h, const char *name);

/* True for hop-by-hop headers (RFC 9110 7.6.1) and ones only the gateway sets. */
bool gw_hdr_is_hop_by_hop(const char *name, size_t len);
bool gw_hdr_is_gateway_set(const char *name, size_t len);

/* The head is one every upstream can carry (an agent's HTTP/2 would refuse
 * what nghttp2's checks refuse, RFC 9113 8.2.1 and 8.3.1): method, an
 * origin-form path without dot segments (".", "..", also percent-encoded,
 * which would leave the agent's base path), authority, protocol, header
 * names and values. HERR_NONE or HERR_BAD_REQUEST. */
enum herr gw_req_check(const struct gw_req *r);

/* Sets r->route/route_err/addr from r->authority and the configured domain
 * (gw_px_start calls it). */
void gw_req_route(struct gw_req *r);

/* Fills peer / client_ip / xff_chain / fwd_proto / fwd_host from the peer
 * address and, when the peer is a trusted proxy, its forwarding headers. */
void gw_req_set_peer(struct gw_req *r, const struct sockaddr *peer);

/* True for an extended CONNECT websocket request (either HTTP version). */
bool gw_req_is_websocket(const struct gw_req *r);

/* Front end: request body bytes from the client (copied), and its end. Both
 * apply max-body-bytes and tell the upstream. add returns 0 (taken), 1
 * (dropped: the request was answered already; an HTTP/2 front end returns
 * the window itself) or -1 (out of memory: the front end closes). */
int gw_req_body_add(struct gw_req *r, const void *data, size_t len);
void gw_req_body_eof(struct gw_req *r);

/* Upstream: request body bytes waiting, and taking n of them (into dst, or
 * dropped when dst is NULL); the front end is told to read more. Returns 0
 * or -1. */
size_t gw_req_body_avail(const struct gw_req *r);
int gw_req_body_take(struct gw_req *r, struct evbuffer *dst, size_t n);
/* The same, copied into dst (n bytes of room). */
int gw_req_body_copy(struct gw_req *r, void *dst, size_t n);

/* Starts the request's wait clock once it has an upstream (gw_px). */
void gw_req_arm_wait(struct gw_req *r);

/* The front end tells the upstream n response bytes left. */
void gw_req_consumed(struct gw_req *r, size_t n);

/* Cancels the upstream, if any (client gone). Safe to call twice. */
void gw_req_cancel(struct gw_req *r);

/* Upstream side: attach (in up->open) / detach. */
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

/* Sets r->rid: the client's X-Request-Id if valid (1-128 of [A-Za-z0-9._-]),
 * else 32 random hex digits, which also replace the client's header so the
 * agent's local API sees the id the access line names (gw_px_start calls it).
 * Returns 0, or -1 out of memory. */
int gw_req_set_request_id(struct gw_req *r);

/* The request is over: counts it in /metrics and writes its access line
 * (gw_metrics_request). Once per request; later calls do nothing. */
void gw_req_log(struct gw_req *r, const char *outcome);

#endif
