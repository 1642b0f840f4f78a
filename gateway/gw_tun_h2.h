/* The native tunnel protocol (tunnel-h2.v1, proto/PROTOCOL.md sections 5-8):
 * once authenticated, the WebSocket's binary messages carry an HTTP/2
 * connection in which the gateway is the client. Each public request is one
 * stream (an upstream of the bridge, gw_up.h): real flow control both ways,
 * RST_STREAM to cancel, extended CONNECT (RFC 8441) for WebSockets, GOAWAY to
 * drain, PING for keepalive. */
#ifndef GW_TUN_H2_H
#define GW_TUN_H2_H

#include "gw_tun.h"

extern const struct gw_tun_proto gw_tun_h2_proto;

/* The same HTTP/2 client session over a node-to-node TCP connection
 * (gw_node): the third upstream of the bridge reuses the tunnel's streams,
 * flow control, cancellation and RFC 8441 WebSockets. The peer owns the
 * session; the session calls back into it for I/O (gw_node_peer_*). */
struct gw_node_peer;
struct gw_req;
struct gw_tun_h2;

struct gw_tun_h2 *gw_tun_h2_peer_new(struct gw_ctx *ctx, struct gw_node_peer *peer, uint64_t id);
enum herr gw_tun_h2_peer_open(struct gw_tun_h2 *s, struct gw_req *r);
/* Bytes read from the connection. 0, or -1: close it. */
int gw_tun_h2_peer_recv(struct gw_tun_h2 *s, const uint8_t *data, size_t len);
/* Sends what waits (the peer's kick, or its socket drained). */
void gw_tun_h2_peer_flush(struct gw_tun_h2 *s);
size_t gw_tun_h2_peer_streams(const struct gw_tun_h2 *s);
/* Takes new streams (no GOAWAY either way, not failed). */
bool gw_tun_h2_peer_usable(const struct gw_tun_h2 *s);
/* Every stream in flight fails (agent_offline before its head). */
void gw_tun_h2_peer_fail_all(struct gw_tun_h2 *s);
void gw_tun_h2_peer_free(struct gw_tun_h2 *s);

#endif
