/* One native tunnel (tunnel-h2.v1, proto/PROTOCOL.md sections 2-8) from the
 * daemon to the gateway: dial (TCP, TLS for wss://), WebSocket upgrade,
 * challenge-response authentication of the wanted agents, then an HTTP/2
 * server session in the binary messages (one stream per public request,
 * forwarded with ag_fwd), control messages alongside (add/remove agents,
 * draining), PING keepalive. Owned by ag_daemon (ctx->tun or ctx->old); it
 * reports through the ag_daemon_on_* functions of ag_ctx.h and is freed by
 * the daemon, inside ag_daemon_on_tun_down() or at shutdown. */
#ifndef AG_TUN_H
#define AG_TUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ag_agt;
struct ag_ctx;
struct ag_tun;

#define AG_TUN_SUBPROTOCOL "tunnel-h2.v1"

/* Starts dialling the gateway of ctx->opts. The agents to authenticate are
 * those wanted (ag_agt_wanted) when the challenge arrives. Returns NULL if
 * out of memory; failures after that come as ag_daemon_on_tun_down(). */
struct ag_tun *ag_tun_new(struct ag_ctx *ctx);

/* Frees the tunnel at once: streams are reset by dropping the connection,
 * their local requests closed. No report follows. Takes NULL. */
void ag_tun_free(struct ag_tun *t);

uint64_t ag_tun_id(const struct ag_tun *t);

/* After auth_ok, until it goes down or drains. */
bool ag_tun_is_up(const struct ag_tun *t);

/* Registers a (another) agent on a live tunnel: request_challenge, then
 * add_agent with the fresh nonce; also refreshes an agent already there.
 * Before authentication it does nothing (auth takes every wanted agent). */
void ag_tun_register(struct ag_tun *t, struct ag_agt *a);

/* Unregisters: remove_agent, and new streams for it are refused at once;
 * its streams in flight finish. */
void ag_tun_unregister(struct ag_tun *t, struct ag_agt *a);

/* True if addr is registered (accepted by the gateway) on t. */
bool ag_tun_serves(const struct ag_tun *t, const char *addr);

/* Streams open on t. */
size_t ag_tun_streams(const struct ag_tun *t);

/* Stops taking streams (GOAWAY) and closes the tunnel once its open streams
 * have finished (then ag_daemon_on_tun_down()). */
void ag_tun_drain(struct ag_tun *t);

/* Last HTTP/2 PING round trip in ms, 0 if none yet. */
uint64_t ag_tun_rtt_ms(const struct ag_tun *t);

#endif
