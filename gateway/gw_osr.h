/* The Osaurus-compatible tunnel protocol (proto/PROTOCOL.md section 9): each
 * public request becomes a JSON "request" frame; "response" or
 * "stream_start" + "stream_chunk"s + "stream_end" come back; "cancel" when
 * the caller leaves. Bodies travel as UTF-8 text (or base64 when the client
 * asked for it), so request bodies are collected up to 10 MB first, as the
 * relay does. A tunnel protocol (gw_tun.h) whose requests are an upstream of
 * the bridge (gw_up.h); WebSockets cannot be carried (501). */
#ifndef GW_OSR_H
#define GW_OSR_H

#include "gw_tun.h"

extern const struct gw_tun_proto gw_osr_proto;

#endif
