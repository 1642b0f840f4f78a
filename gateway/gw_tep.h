/* The tunnel endpoint: `/tunnel/connect` on the apex. It checks the upgrade
 * (a GET with a WebSocket key and version 13 over HTTP/1.1, a known
 * subprotocol, not draining, the per-IP tunnel quota), picks the tunnel
 * protocol from the subprotocol (tunnel-h2.v1: native; none: Osaurus), asks
 * the front end for the connection and starts a tunnel (gw_tun) on it. A
 * plain request there answers 400 websocket_required. */
#ifndef GW_TEP_H
#define GW_TEP_H

struct gw_req;

void gw_tep_handle(struct gw_req *r);

#endif
