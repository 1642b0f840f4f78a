/* One public HTTP/2 connection (nghttp2 server). Each stream becomes a
 * gw_req. Request bodies are flow-controlled by hand: window goes back to the
 * client only as the tunnel takes bytes. Response bodies leave through
 * NO_COPY DATA frames straight from the stream's buffer. Owned by itself. */
#ifndef GW_H2_H
#define GW_H2_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

struct bufferevent;
struct gw_ctx;

/* Takes ownership of bev, also on failure. node: the connection came to
 * --node-listen from another node, its requests carry forwarding fields
 * (x-tg-*, kept for gw_node_accept instead of forwarded). A refused connection (over
 * max-conns-per-ip; it holds no per-IP slot) answers its first request with
 * the JSON 429 too_many_connections, then sends GOAWAY. Returns 0 or -1. */
int gw_h2_start(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                socklen_t peerlen, const char *scheme, uint64_t conn_id, bool refused,
                bool node);

#endif
