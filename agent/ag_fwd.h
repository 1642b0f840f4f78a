/* Forwarding one tunnel stream to an agent's local API over HTTP/1.1, with a
 * keep-alive connection pool per agent. The stream (ag_tun) hands over the
 * request head and then the body as it arrives; ag_fwd writes them to the
 * local connection and reports the response head, body chunks and the end
 * through callbacks, which are only ever called from the local connection's
 * own events (never inside an ag_fwd_* call). */
#ifndef AG_FWD_H
#define AG_FWD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

#include "util.h"

struct evbuffer;
struct ag_agt;
struct ag_fwd;
struct ag_fwd_pool;

/* A request header, name lowercase (HTTP/2 rules), borrowed. */
struct ag_fwd_hdr {
    struct iov name;
    struct iov value;
};

/* The request as the stream received it. Borrowed for the ag_fwd_start() call. */
struct ag_fwd_request {
    struct iov method;
    struct iov path;               /* path and query, as received */
    struct iov authority;          /* public host */
    bool websocket;                /* extended CONNECT, :protocol websocket (RFC 8441):
                                    * a local WebSocket upgrade, then raw bytes both ways */
    const struct ag_fwd_hdr *hdrs; /* regular headers, in order */
    size_t nhdrs;
    bool has_body; /* the HEADERS frame had no END_STREAM */
};

enum ag_fwd_err {
    AG_FWD_E_UNREACHABLE = 0, /* connect failed, or the local API failed before its head */
    AG_FWD_E_TIMEOUT,         /* no response head within the agent's response timeout */
    AG_FWD_E_ABORTED,         /* the local API broke off after its head */
};

struct ag_fwd_cbs {
    /* The final response head; names lowercase, hop-by-hop fields removed.
     * no_body: HEAD request, 204 or 304 (no on_body, on_end follows).
     * WebSocket: a local 101 is reported as 200 with only the negotiated
     * sec-websocket-protocol / -extensions; on_body then carries the raw
     * bytes from the local API, and on_end its EOF. */
    void (*on_head)(void *arg, int status, const nghttp2_nv *nv, size_t nnv, bool no_body);
    /* A chunk of the response body (decoded from chunked framing). */
    void (*on_body)(void *arg, const uint8_t *data, size_t len);
    /* Optional: the first len bytes of src are response body; the callee
     * removes exactly those (evbuffer_remove_buffer() moves whole chains
     * without copying). Used for a Content-Length body, which is not parsed
     * byte by byte; without it such bodies come through on_body too. */
    void (*on_body_move)(void *arg, struct evbuffer *src, size_t len);
    /* Terminal: the response is complete. The fwd is gone: never touch it again. */
    void (*on_end)(void *arg);
    /* Terminal: the request failed. The fwd is gone: never touch it again. */
    void (*on_error)(void *arg, enum ag_fwd_err err, const char *detail);
    /* n request body bytes given to ag_fwd_write_body() have left towards the
     * local API (return that much flow-control window). */
    void (*on_body_sent)(void *arg, size_t n);
};

/* Starts forwarding rq to agent a (borrowed: the caller keeps a reference for
 * the fwd's lifetime): takes an idle pooled connection or dials a new one.
 * Returns NULL if out of memory or the head cannot be built. */
struct ag_fwd *ag_fwd_start(struct ag_agt *a, const struct ag_fwd_request *rq,
                            const struct ag_fwd_cbs *cb, void *arg);

/* Queues request body bytes (copied). Returns how many of them may be
 * acknowledged at once (they are below the local output's high water mark);
 * the rest are reported later through on_body_sent. */
size_t ag_fwd_write_body(struct ag_fwd *f, const uint8_t *data, size_t len);

/* The request body is complete (WebSocket: the client half-closed, so the
 * local connection is shut down for writing once its output is out). */
void ag_fwd_end_body(struct ag_fwd *f);

/* Stops (true) or resumes reading the local response (the stream's buffer
 * is full / drained). */
void ag_fwd_pause_read(struct ag_fwd *f, bool paused);

/* Aborts: closes the local connection at once (never pooled). No callback
 * follows. Takes NULL. */
void ag_fwd_free(struct ag_fwd *f);

/* The agent's pool of idle connections. */
struct ag_fwd_pool *ag_fwd_pool_new(struct ag_agt *a);
/* Closes every idle connection (target changed). */
void ag_fwd_pool_flush(struct ag_fwd_pool *p);
size_t ag_fwd_pool_idle(const struct ag_fwd_pool *p);
void ag_fwd_pool_free(struct ag_fwd_pool *p);

#endif
