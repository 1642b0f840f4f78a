/* The gateway's own endpoints on the apex domain: GET /health, /stats,
 * /metrics (Prometheus text), and the plain-GET answer of /tunnel/connect.
 * Never reachable on agent hosts, whose paths all belong to the agent. */
#ifndef GW_ADMIN_H
#define GW_ADMIN_H

struct gw_req;

/* Answers r (route APEX) through its front end. */
void gw_admin_handle(struct gw_req *r);

#endif
