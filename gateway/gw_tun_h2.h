/* The native tunnel protocol (tunnel-h2.v1, proto/PROTOCOL.md sections 5-8):
 * once authenticated, the WebSocket's binary messages carry an HTTP/2
 * connection in which the gateway is the client. Each public request is one
 * stream (an upstream of the bridge, gw_up.h): real flow control both ways,
 * RST_STREAM to cancel, extended CONNECT (RFC 8441) for WebSockets, GOAWAY to
 * drain, PING for keepalive. */
#ifndef GW_TUN_H2_H
#define GW_TUN_H2_H

#include "gw_tun.h"

extern const struct gw_tun_proto gw_tun_h2_proto;

#endif
