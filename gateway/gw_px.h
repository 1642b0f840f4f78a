/* The proxy bridge between front ends (gw_h1, gw_h2) and upstreams
 * (gw_up.h). A front end hands over a protocol-neutral request whose head is
 * complete and knows nothing else; the bridge routes it by host name:
 *   - the apex: /tunnel/connect goes to the tunnel endpoint (gw_tep), every
 *     other path to the gateway's own endpoints (gw_admin);
 *   - <address>.<domain>: the registry's route for the address (one lookup),
 *     and the request is opened on that route's upstream; with a shared
 *     registry (gw_rds), an address without a tunnel here goes to the node
 *     that holds it (gw_node), unless the request came from another node:
 *     it is served here or answered, never forwarded twice;
 *   - anything else: the JSON error.
 * Errors the bridge answers go back through the front end (fe->error). */
#ifndef GW_PX_H
#define GW_PX_H

struct gw_req;

/* Call once per request, with the head complete and the peer set. */
void gw_px_start(struct gw_req *r);

/* A request that waited for the shared registry while a tunnel for its
 * agent registered here: routes it again (counted once). */
void gw_px_restart(struct gw_req *r);

#endif
