/* The shared route registry in Redis (--redis): which node holds the tunnel
 * of each agent address, so that any node can take the agent's requests and
 * forward them (gw_node).
 *
 * Keys: "agent:<0x address>" = "v1|<claimed at, unix ms>|<node id>|<advertise
 * HOST:PORT>|<instance>", with a TTL of three refresh intervals. A node
 * claims an address when one of its tunnels registers it and re-claims it
 * every interval (the tunnels' keepalive); the newest claim wins (claim time,
 * then node id), checked and written in one Lua script; a node releases with
 * compare-and-delete. Every claim and release that changes the key is
 * published on the channel "tg:claims" (pub/sub, not keyspace notifications:
 * those need a server setting and do not carry the old value), which is how
 * the node that held an older claim learns at once that its tunnel was
 * superseded; a refresh that meets a newer claim learns it too, within one
 * interval, should a message be lost while Redis was away.
 *
 * Lookups of addresses without a local tunnel go through a small cache
 * (GW_RDS_CACHE_MS), kept current by the same messages: a cached route is at
 * most that old when a message was lost, and a stale one reaches a node that
 * no longer has the agent, which answers 502 agent_offline at once (it never
 * forwards again), so staleness costs an error, never a wrong agent.
 *
 * Redis down: the node keeps serving its own tunnels, lookups answer 502
 * agent_offline at once (or within --redis-timeout when a reply does not
 * come), the state change is logged once, /health shows "redis":"degraded",
 * and every address is claimed again when the connection is back. */
#ifndef GW_RDS_H
#define GW_RDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gw_cfg.h"
#include "gw_node.h"
#include "herr.h"
#include "id.h"
#include "tun_msg.h"

struct gw_ctx;
struct gw_rds;
struct gw_req;
struct gw_route;

#define GW_RDS_CACHE_MS 2000      /* a looked-up remote route is used this long */
#define GW_RDS_MAX_LOOKUPS 4096   /* lookups waiting for Redis at once */

/* Starts connecting (the node serves while it does). NULL if out of memory. */
struct gw_rds *gw_rds_new(struct gw_ctx *ctx);
/* Takes NULL. Pending lookups are answered (their requests are gone). */
void gw_rds_free(struct gw_rds *rds);

/* Both connections (commands, subscription) are up. */
bool gw_rds_ok(const struct gw_rds *rds);

/* A local tunnel registered rt (the registry points at it): claim it. */
void gw_rds_claim(struct gw_rds *rds, struct gw_route *rt);
/* rt leaves the registry: release its claim if it is still ours. */
void gw_rds_release(struct gw_rds *rds, const struct gw_route *rt);
/* Drain end: every local route's claim released (replies not awaited). */
void gw_rds_release_all(struct gw_rds *rds);

/* The bridge, for a request whose agent has no tunnel here: finds the node
 * that holds it and opens the request there (gw_node), now from the cache or
 * once Redis answers. Returns HERR_NONE when the request was opened or waits
 * (an upstream is attached either way); otherwise the error to answer. */
enum herr gw_rds_route(struct gw_req *r);

/* A peer connection to advertise address addr ended: forget the routes
 * through it; dead (it could not be reached at all): delete their claims too
 * (compare-and-delete: the owner is gone, and claims again within an
 * interval if it is alive after all). */
void gw_rds_peer_gone(struct gw_rds *rds, const char *addr, bool dead);

/* A claim's value, "v1|<ms>|<node id>|<advertise>|<instance>", parsed. */
struct gw_rds_claim {
    uint64_t ms;
    char node[GW_NODE_ID_MAX + 1];
    char adv[GW_NODE_ADDR_MAX + 1];
    char inst[TUN_INSTANCE_MAX + 1];
};

/* 0, or -1 if v is not a claim this version writes. */
int gw_rds_claim_parse(const char *v, size_t len, struct gw_rds_claim *c);

/* One "tg:claims" message, "agent:<0x addr> <claim>" or "agent:<0x addr> -":
 * 0 a claim (in c), 1 a release, -1 not a message of ours. value points at
 * the claim's text in msg. */
int gw_rds_msg_parse(const char *msg, size_t len, uint8_t addr[ID_ADDR_LEN],
                     struct gw_rds_claim *c, const char **value);

/* For /metrics. */
uint64_t gw_rds_errors(const struct gw_rds *rds);
size_t gw_rds_cached(const struct gw_rds *rds);

#endif
