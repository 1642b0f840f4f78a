/* One tunnel: the WebSocket an agent daemon opened to /tunnel/connect, its
 * authentication (challenge-response, several agents, each its own route),
 * control messages (add/remove agents, rate-limited), keepalive, drain, and
 * close. What runs inside the WebSocket once it is authenticated is a tunnel
 * protocol (struct gw_tun_proto): the native HTTP/2 session (gw_tun_h2) or
 * the Osaurus JSON frames (gw_osr). This file knows neither; it drives the
 * protocol's session through the table below, and the session opens public
 * requests on the tunnel's routes as an upstream (gw_up.h).
 *
 * Owned by the gw_ctx list; it frees itself (and its session) from its own
 * event callbacks once its WebSocket has ended, never under a caller's frame.
 * Agent entries (each embedding the struct gw_route the registry borrows) are
 * owned by the tunnel and leave the registry before they are freed. */
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
struct gw_route;
struct gw_tun;
struct gw_up_ops;
struct ws_conn;

/* A tunnel protocol. Every hook gets the session sess_new returned. None is
 * called from inside another hook of the same session. */
struct gw_tun_proto {
    const char *name;            /* "native", "osaurus": logs */
    enum tun_mode mode;          /* for the tun_msg codec and its error mapping */
    const char *subprotocol;     /* answered in the 101, NULL for none */
    size_t max_text;             /* largest text message accepted */
    unsigned ctl_per_min;        /* control messages per minute */
    enum tun_reason removed_reason; /* in agent_removed after a remove_agent */
    bool auth_all_or_nothing;    /* one bad entry fails the whole auth message */
    bool signs_domain;           /* signed texts name the gateway's domain (auth_error says which) */
    const struct gw_up_ops *up;  /* opens public requests on its routes */
    /* The text an agent entry of an auth or add_agent message signed. */
    int (*signed_text)(char *buf, size_t size, const char *domain,
                       const struct tun_msg_agent_auth *a, const char *nonce, int64_t ts);
    /* At accept, before authentication. NULL = out of memory. */
    void *(*sess_new)(struct gw_tun *t, struct gw_ctx *ctx, struct ws_conn *ws, uint64_t id);
    /* auth_ok went out: start; features are the auth message's (TUN_FEAT_*).
     * 0, or -1 (the tunnel closes). */
    int (*start)(void *sess, unsigned features);
    /* A binary message after auth. 0, or -1: the tunnel closes (protocol
     * error). NULL: the protocol has none, binary messages are ignored
     * (before auth too); otherwise one before auth fails auth with
     * expected_auth_frame. */
    int (*on_binary)(void *sess, const uint8_t *data, size_t len);
    /* A decoded ping/pong/response/stream_* text message after auth. */
    void (*on_data)(void *sess, const struct tun_msg *m);
    /* One that failed to decode: true if the session handled it. */
    bool (*on_bad_data)(void *sess, const struct tun_msg *m, enum tun_err e);
    /* Keepalive tick. */
    void (*ping)(void *sess);
    /* The tunnel's kick, or its WebSocket became writable: send what waits. */
    void (*flush)(void *sess);
    /* SIGTERM (the routes are gone already): tell the agent, finish the
     * streams in flight, then close the tunnel. */
    void (*drain)(void *sess);
    /* Drain with a shared registry (optional): tell the agent to open its
     * next tunnel now while this one keeps serving; NULL = drain at once. */
    void (*drain_notice)(void *sess);
    /* The tunnel lost its last agent: close once the streams are done. */
    void (*retire)(void *sess);
    /* The tunnel is closing: every stream fails or aborts now. */
    void (*fail_all)(void *sess);
    void (*sess_free)(void *sess);
    /* Streams in flight. */
    size_t (*streams)(const void *sess);
};

/* Writes the 101 answer (ws_accept: the Sec-WebSocket-Accept value; the
 * protocol's subprotocol) and starts authentication. The caller has counted
 * a tunnel for peer in ctx->ipt, and a pending one there and in
 * ctx->tunnels_pending; the tunnel releases them when it authenticates (the
 * pending one) or goes (also on failure here). Takes ownership of bev, also on failure. Returns 0 or -1. */
int gw_tun_accept(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                  const char *ws_accept, const struct gw_tun_proto *proto, uint64_t conn_id,
                  const char *client_ip);

/* SIGTERM: routes removed, every tunnel told to go (its protocol's drain).
 * With handover (a shared registry), tunnels whose protocol has a
 * drain_notice keep their routes and only get the notice; a later call
 * without handover drains those that are still here. */
void gw_tun_drain_all(struct gw_ctx *ctx, bool handover);

/* Another node's newer claim took addr (gw_rds): the route goes and its
 * tunnel is told agent_removed, "replaced" for the same agent instance
 * (it moved), "superseded" otherwise. */
void gw_tun_supersede(struct gw_ctx *ctx, const uint8_t *addr, bool same_instance);

/* Streams in flight over all tunnels. */
size_t gw_tun_streams_total(const struct gw_ctx *ctx);

/* After an allow-list reload: agents no longer allowed are removed. */
void gw_tun_apply_allow(struct gw_ctx *ctx);

/* Calls cb for every route of every live tunnel (each routed address once).
 * cb must not add or remove routes. */
void gw_tun_each_route(struct gw_ctx *ctx, void (*cb)(struct gw_route *rt, void *arg), void *arg);

/* /admin: removes the route serving addr and tells its tunnel (agent_removed,
 * the protocol's "removed" reason). Returns 0, or -1 if addr is not routed. */
int gw_tun_remove_route(struct gw_ctx *ctx, const uint8_t *addr);

/* Shutdown: frees every tunnel at once (their requests are aborted). */
void gw_tun_free_all(struct gw_ctx *ctx);

/* ---- for tunnel sessions ---- */

/* Sends a control message (JSON text). Returns 0 or -1. */
int gw_tun_send_msg(struct gw_tun *t, const struct tun_msg *m);

/* Starts closing the tunnel: routes go, streams fail (fail_all), the close
 * frame goes out; freed later from the tunnel's own callbacks. */
void gw_tun_close(struct gw_tun *t, int code, const char *reason);

/* Runs the session's flush from the loop, after every callback already
 * queued in this pass (so what one read brought leaves as one message). */
void gw_tun_kick(struct gw_tun *t);

#endif
