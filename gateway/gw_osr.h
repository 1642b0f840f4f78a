/* The Osaurus-compatible half of a tunnel (proto/PROTOCOL.md section 9): each
 * public request becomes a JSON "request" frame; "response" or "stream_start"
 * + "stream_chunk"s + "stream_end" come back; "cancel" when the caller leaves.
 * Bodies travel as UTF-8 text (or base64 when the client asked for it), so
 * request bodies are collected up to 10 MB first, as the relay does. State
 * (struct gw_osr) is owned by its gw_tun; pending requests are borrowed
 * gw_reqs detached on every exit path. */
#ifndef GW_OSR_H
#define GW_OSR_H

#include <stdbool.h>
#include <stddef.h>

#include "herr.h"
#include "tun_msg.h"

struct gw_tun;
struct gw_req;

/* After auth_ok. Returns 0 or -1 (out of memory). */
int gw_osr_start(struct gw_tun *t);

/* Opens a request on t. Returns HERR_NONE on success or the error. */
enum herr gw_osr_open_stream(struct gw_tun *t, struct gw_req *r);

/* A decoded ping/pong/response/stream_* frame. */
void gw_osr_on_frame(struct gw_tun *t, const struct tun_msg *m);

/* A frame that failed to decode; returns true if it was a data frame that
 * gw_osr handled (its request answered 502 bad_host_response + cancel). */
bool gw_osr_on_bad_frame(struct gw_tun *t, const struct tun_msg *m, enum tun_err e);

/* Keepalive tick: JSON ping, and the unanswered-ping count. */
void gw_osr_ping(struct gw_tun *t);

/* SIGTERM: relay_restarting + close 1012 once requests are done. */
void gw_osr_drain(struct gw_tun *t);

/* The tunnel lost its last agent (superseded): close (1000) once the
 * requests already pending are answered. */
void gw_osr_drain_when_idle(struct gw_tun *t);

/* The tunnel is closing: every pending request fails or aborts. */
void gw_osr_fail_all(struct gw_tun *t);

/* The tunnel is being freed. */
void gw_osr_free_all(struct gw_tun *t);

/* Requests in flight. */
size_t gw_osr_pending(const struct gw_tun *t);

#endif
