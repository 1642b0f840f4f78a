/* One tunnel: the WebSocket an agent daemon opened to /tunnel/connect, its
 * authentication (challenge-response, several agents), and, once live,
 * either the native protocol (an HTTP/2 connection in binary messages, the
 * gateway as h2 client, one stream per public request) or the Osaurus JSON
 * protocol (gw_osr). Owned by the gw_ctx list; it frees itself when its
 * WebSocket ends. Streams borrow their gw_req and detach before ending it. */
#ifndef GW_TUN_H
#define GW_TUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "herr.h"
#include "tun_msg.h"

struct bufferevent;
struct gw_ctx;
struct gw_req;
struct gw_tun;
struct gw_tun_agent;

/* Completes the upgrade (writes the 101 answer with ws_accept, the
 * Sec-WebSocket-Accept value) and starts authentication. The caller has
 * counted a tunnel for peer in ctx->ipt; the tunnel releases it when it
 * goes (also on failure here). Takes ownership of bev, also on failure.
 * Returns 0 or -1. */
int gw_tun_accept(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                  const char *ws_accept, enum tun_mode mode, uint64_t conn_id,
                  const char *client_ip);

/* Opens a stream for r on t and attaches it. Returns HERR_NONE on success,
 * else the error to answer (host_busy past max-streams-per-tunnel,
 * agent_offline if the tunnel is going away). */
enum herr gw_tun_open_stream(struct gw_tun *t, struct gw_req *r);

/* The tunnel an agent entry belongs to. */
struct gw_tun *gw_tun_agent_tun(const struct gw_tun_agent *a);

/* SIGTERM: every tunnel is told to go (native: GOAWAY + "draining"; Osaurus:
 * relay_restarting + 1012 once its requests are done), its routes removed. */
void gw_tun_drain_all(struct gw_ctx *ctx);

/* Streams in flight over all tunnels. */
size_t gw_tun_streams_total(const struct gw_ctx *ctx);

/* After an allow-list reload: agents no longer allowed are removed. */
void gw_tun_apply_allow(struct gw_ctx *ctx);

/* Shutdown: frees every tunnel at once (their requests are aborted). */
void gw_tun_free_all(struct gw_ctx *ctx);

/* For gw_osr, the Osaurus half of a tunnel. */
struct gw_osr;
struct gw_ctx *gw_tun_ctx(const struct gw_tun *t);
uint64_t gw_tun_id(const struct gw_tun *t);
int gw_tun_send_text(struct gw_tun *t, const char *data, size_t len);
bool gw_tun_wants_base64(const struct gw_tun *t);
struct gw_osr *gw_tun_osr(const struct gw_tun *t);
void gw_tun_set_osr(struct gw_tun *t, struct gw_osr *osr);
/* Starts closing the tunnel (frees it later, from its own callbacks). */
void gw_tun_close(struct gw_tun *t, int code, const char *reason);
size_t gw_tun_agent_count(const struct gw_tun *t);
/* The agent's response-header timeout request, 0 = the gateway default. */
uint64_t gw_tun_agent_resp_timeout_ms(const struct gw_tun *t, const uint8_t *addr);

#endif
