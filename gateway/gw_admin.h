/* The gateway's own endpoints on the apex domain: GET /health, /stats,
 * /metrics (Prometheus text, gw_metrics), the plain-GET answer of
 * /tunnel/connect, and the operator's /admin API (agents, disconnect, deny
 * list), which exists only with --admin-token-file and wants
 * "Authorization: Bearer <token>". Never reachable on agent hosts, whose
 * paths all belong to the agent. */
#ifndef GW_ADMIN_H
#define GW_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "id.h"

struct gw_ctx;
struct gw_req;

/* The deny list (/admin/deny): addresses refused as not_allowed, on live
 * tunnels and at registration. Embedded in struct gw_ctx; plain data. */
struct gw_deny {
    uint8_t (*addrs)[ID_ADDR_LEN]; /* owned, unordered */
    size_t n;                      /* entries used */
    size_t cap;                    /* entries allocated */
};

/* Answers r (route APEX) through its front end. */
void gw_admin_handle(struct gw_req *r);

/* True if addr is on the deny list. */
bool gw_admin_denied(const struct gw_ctx *ctx, const uint8_t *addr);

/* Frees the deny list. Safe twice. */
void gw_admin_cleanup(struct gw_ctx *ctx);

#endif
