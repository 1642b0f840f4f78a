/* Node-to-node forwarding: the third upstream of the proxy bridge (gw_up.h).
 *
 * A request for an agent whose tunnel another node holds (the shared
 * registry, gw_rds, says which) goes to that node over a pooled HTTP/2
 * connection to its --node-advertise address: the tunnel's own client
 * session (gw_tun_h2) on TCP, so flow control, cancellation, RFC 8441
 * WebSockets and timeouts are the tunnel's. The receiving node accepts it on
 * --node-listen (cleartext HTTP/2, gw_lsn + gw_h2), checks its proof and
 * serves it from its own tunnel, never forwarding it again (one hop).
 *
 * The proof: the forwarding fields below and the request head, signed with
 * HMAC-SHA256 under --cluster-secret-file, with a timestamp that must be
 * within GW_NODE_PROOF_SKEW_S of the receiver's clock. The fields carry what
 * the first node learned (client address, trusted X-Forwarded-* chain,
 * scheme) and are believed only on the node listener with a valid proof;
 * public requests never carry them (gw_req drops every x-tg- header).
 *
 * Peers (struct gw_node_peer) are owned by the context's struct gw_node,
 * one live connection per advertise address; a peer that failed or got
 * GOAWAY stays until its streams are done and is freed from its own event
 * callback. */
#ifndef GW_NODE_H
#define GW_NODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "herr.h"

struct evbuffer;
struct gw_ctx;
struct gw_node;
struct gw_node_peer;
struct gw_req;
struct gw_route;

#define GW_NODE_PROOF_SKEW_S 60 /* |receiver clock - proof time| accepted */
#define GW_NODE_FWD_FIELDS 9    /* forwarding header fields a request carries */
#define GW_NODE_ADDR_MAX 63     /* an advertise address, "[v6]:port" */

/* The forwarding fields of one request (names static, values in buf). */
struct gw_node_fwd {
    const char *name[GW_NODE_FWD_FIELDS];
    const char *value[GW_NODE_FWD_FIELDS];
    size_t n;
    char ts[24];
    char proof[65];
};

/* Fields received on the node listener (x-tg-*), before the proof check.
 * Owned by the request (gw_req.node_in), freed with it. */
struct gw_node_in {
    char *v[GW_NODE_FWD_FIELDS];  /* owned; in the order of the names table */
};

struct gw_node *gw_node_new(struct gw_ctx *ctx);
/* Frees every peer (their requests have been aborted). Takes NULL. */
void gw_node_free(struct gw_node *n);

/* The upstream for remote routes: rt->owner is the advertise address
 * (a NUL-terminated string the route's owner keeps). */
extern const struct gw_up_ops gw_node_up_ops;

/* Streams in flight to other nodes (the drain waits for them too). */
size_t gw_node_streams(const struct gw_node *n);
/* Peer connections open. */
size_t gw_node_peers(const struct gw_node *n);

/* The forwarding fields for r (to another node), signed. 0 or -1. */
int gw_node_fwd_fields(struct gw_ctx *ctx, const struct gw_req *r, struct gw_node_fwd *out);

/* gw_h2 on the node listener: a request header named x-tg-*. Returns 1 if
 * it was one of the forwarding fields (kept in r->node_in), 0 if not (an
 * unknown x-tg- name, dropped), -1 out of memory. */
int gw_node_in_header(struct gw_req *r, const char *name, size_t nlen, const char *value,
                      size_t vlen);

/* The bridge, for a request from the node listener: checks the proof and
 * applies the fields (client address, forwarding chain, scheme). HERR_NONE,
 * HERR_NODE_FORBIDDEN (logged) or HERR_LOOP_DETECTED. */
enum herr gw_node_accept(struct gw_req *r);

/* For the peer's session (gw_tun_h2), see there. */
bool gw_node_peer_writable(const struct gw_node_peer *p);
int gw_node_peer_send(struct gw_node_peer *p, struct evbuffer *buf);
void gw_node_peer_kick(struct gw_node_peer *p);
void gw_node_peer_close(struct gw_node_peer *p, const char *reason);

#endif
