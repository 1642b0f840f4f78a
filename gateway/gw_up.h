/* The upstream interface of the proxy bridge (gw_px): where a public request
 * goes once it is routed. An upstream kind provides one struct gw_up_ops;
 * there are three: the native tunnel's HTTP/2 streams (gw_tun_h2), the
 * Osaurus JSON frames (gw_osr), and the node-to-node forwarder (gw_node),
 * whose routes come from the shared registry (gw_rds) and point at the node
 * that holds the agent's tunnel.
 *
 * A route (struct gw_route) says where requests for one agent address go now.
 * It is owned by the upstream that serves the address (a tunnel's agent
 * entry embeds one); the registry (gw_reg) only borrows it, and the owner
 * removes it from the registry before freeing it. The bridge looks the route
 * up once and opens the request on it:
 *
 *   rt = gw_reg_get(reg, addr);          one lookup
 *   e  = rt->up->open(rt, r);            attaches a stream to r, or refuses
 *
 * From then on the front end talks to the stream only through r (gw_req.h):
 *   body_more  request body bytes arrived (or the body ended): take them with
 *              gw_req_body_take(); for an upgraded request the "body" is the
 *              client's raw bytes, for as long as the connection lives;
 *   consumed   n response bytes the upstream delivered left for the client:
 *              flow-control window may go back to the agent;
 *   cancel     the client left or the front end gave up: reset and never
 *              touch r again. Front ends call gw_req_cancel(), which calls
 *              it and clears r->up; nothing calls the op directly.
 * and the stream answers through gw_req_head/_body/_end/_fail.
 *
 * Upgrades (WebSocket) are requests like the others, in RFC 8441 form:
 * method CONNECT, r->protocol "websocket", whatever the client's HTTP
 * version; a 2xx head means the local API accepted, and the body bytes both
 * ways are then the WebSocket's. An upstream that cannot carry them refuses
 * at open (HERR_UNSUPPORTED_UPGRADE). Nothing in this interface is called
 * from inside another call of it: an op never frees its caller. */
#ifndef GW_UP_H
#define GW_UP_H

#include <stddef.h>
#include <stdint.h>

#include "herr.h"
#include "id.h"

struct gw_req;
struct gw_route;

struct gw_up_ops {
    const char *name; /* for logs: "tunnel", "osaurus", ... */
    /* Opens a stream for r on the route and attaches it (gw_req_attach).
     * Returns HERR_NONE, or the error the bridge answers (nothing attached). */
    enum herr (*open)(struct gw_route *rt, struct gw_req *r);
    /* Per stream (the pointer open attached): see above. */
    void (*body_more)(void *stream);
    void (*consumed)(void *stream, size_t n);
    void (*cancel)(void *stream);
};

struct gw_route {
    uint8_t addr[ID_ADDR_LEN];
    char addr_str[ID_ADDR_STR_LEN + 1]; /* lowercase 0x + 40 hex */
    uint64_t resp_timeout_ms;           /* the agent asked for this; 0 = the gateway's */
    const struct gw_up_ops *up;         /* serves the route */
    void *owner;                        /* the upstream's state behind it (a tunnel session) */
    /* for /metrics and /admin/agents (gw_metrics, gw_admin) */
    uint64_t since_unix_ms;             /* registered at (wall clock, ms) */
    uint64_t claim_ms;                  /* the registration's time in the shared registry
                                         * (wall clock, ms: newest claim wins, gw_rds) */
    const char *instance;               /* the registering agent's instance id ("" or NULL
                                         * = none); the owner's storage */
    char peer_ip[46];                   /* client IP of the tunnel (INET6_ADDRSTRLEN) */
    uint64_t n_requests;                /* requests finished on this registration */
    uint64_t n_bytes_in;                /* their request body bytes */
    uint64_t n_bytes_out;               /* their response body bytes */
    uint64_t n_errors;                  /* of them, answered with a gateway error */
};

#endif
