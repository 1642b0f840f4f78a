/* One tunnel from the daemon to the gateway: dial (TCP, TLS for wss://),
 * WebSocket upgrade, challenge-response authentication of the wanted agents,
 * then the data path: native (tunnel-h2.v1, proto/PROTOCOL.md sections 2-8)
 * an HTTP/2 server session in the binary messages (one stream per public
 * request, forwarded with ag_fwd), PING keepalive; or, with run --protocol
 * osaurus, the Osaurus relay protocol (section 9): JSON request/response
 * frames, served by ag_osr. Control messages alongside (add/remove agents,
 * draining). Owned by the context (ctx->tun, ctx->old, then ctx->dead); it
 * reports to its owner through struct ag_tun_cbs. A tunnel that ends marks
 * itself dead, goes quiet and reports on_down; the owner frees it later from
 * the loop (ag_ctx_bury_tun), never inside a report. */
#ifndef AG_TUN_H
#define AG_TUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ag_agt;
struct ag_ctx;
struct ag_tun;
struct list;

#define AG_TUN_SUBPROTOCOL "tunnel-h2.v1"

/* Reports to the tunnel's owner. Guarantees:
 * 1. They are only ever called from the tunnel's own events (WebSocket,
 *    dial, timers, its flush kick), never inside an ag_tun_* call, so the
 *    owner may call ag_tun_* on any tunnel from inside them.
 * 2. No report frees anything: the owner must not ag_tun_free() the tunnel
 *    inside one (on_down included); it frees it from the loop.
 * 3. on_down comes exactly once, last; the tunnel is then dead: it sends
 *    nothing more and ignores its remaining events until it is freed. */
struct ag_tun_cbs {
    /* auth_ok: the HTTP/2 session runs (ag_tun_is_up). */
    void (*on_up)(void *arg, struct ag_tun *t);
    /* The gateway accepted a (auth_ok or agent_added); url is its public URL. */
    void (*on_agent_online)(void *arg, struct ag_tun *t, struct ag_agt *a, const char *url);
    /* A registration was refused with a permanent code (transient ones are
     * retried by the tunnel); message may be NULL. */
    void (*on_agent_refused)(void *arg, struct ag_tun *t, struct ag_agt *a, const char *code,
                             const char *message);
    /* agent_removed: reason is "removed", "replaced", "superseded",
     * "not_allowed" or the gateway's unknown reason text. */
    void (*on_agent_removed)(void *arg, struct ag_tun *t, struct ag_agt *a, const char *reason);
    /* The gateway drains (GOAWAY or "draining"): no new streams here; the
     * tunnel closes once its streams have finished. */
    void (*on_draining)(void *arg, struct ag_tun *t);
    /* The tunnel ended (or never came up). reason is for logs and status;
     * auth_code is the auth_error code, or NULL. */
    void (*on_down)(void *arg, struct ag_tun *t, const char *reason, const char *auth_code);
};

/* Starts dialling the gateway of ctx->opts; cb (static) and arg are kept for
 * the reports. The agents to authenticate are those wanted (ag_agt_wanted)
 * when the challenge arrives. Returns NULL if out of memory; failures after
 * that come as on_down. */
struct ag_tun *ag_tun_new(struct ag_ctx *ctx, const struct ag_tun_cbs *cb, void *arg);

/* Frees the tunnel at once: streams are reset by dropping the connection,
 * their local requests closed. No report follows. Never call it inside one
 * of t's reports. Takes NULL. */
void ag_tun_free(struct ag_tun *t);

/* The owner's list node (ctx->old, ctx->dead); ag_tun never touches it. */
struct list *ag_tun_link(struct ag_tun *t);
struct ag_tun *ag_tun_from_link(struct list *node);

/* True once on_down was reported. */
bool ag_tun_is_dead(const struct ag_tun *t);

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

/* A tunnel draining at the gateway's request ("draining") stays open for
 * the streams the gateway still sends it until this is called (the next
 * tunnel is up) or 30 s passed; then it closes once idle. */
void ag_tun_release(struct ag_tun *t);

/* Stops taking streams (GOAWAY) and closes the tunnel once its open streams
 * have finished (then on_down, from the loop). */
void ag_tun_drain(struct ag_tun *t);

/* True if the gateway said it restarts (Osaurus relay_restarting, or a close
 * with 1012): the owner reconnects in about a second, not with the backoff. */
bool ag_tun_restarting(const struct ag_tun *t);

/* Last HTTP/2 PING round trip in ms, 0 if none yet. */
uint64_t ag_tun_rtt_ms(const struct ag_tun *t);

#endif
