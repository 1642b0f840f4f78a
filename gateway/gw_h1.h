/* One public HTTP/1.1 connection (http-parser): keep-alive, pipelining (one
 * request served at a time; the parser pauses meanwhile), chunked and
 * Content-Length bodies, Expect: 100-continue, and the hand-over of a
 * /tunnel/connect upgrade to gw_tun. Owned by itself: it frees itself when
 * the client leaves or the connection is done. */
#ifndef GW_H1_H
#define GW_H1_H

#include <stdint.h>
#include <sys/socket.h>

struct bufferevent;
struct gw_ctx;

/* Takes ownership of bev, also on failure. scheme is "https" or "http".
 * Returns 0 or -1. */
int gw_h1_start(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                socklen_t peerlen, const char *scheme, uint64_t conn_id);

#endif
