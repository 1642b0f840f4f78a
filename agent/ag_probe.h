/* The end-to-end probe that makes an agent "connected" (PRODUCT.md): an
 * HTTP/1.1 GET for the agent's own public URL, sent to the address the
 * tunnel dialled (TLS with SNI and Host set to the public name, verified like
 * the tunnel; cleartext for ws://), carrying a one-time nonce in
 * X-Tunnel-Probe. The tunnel answers that request itself (ag_tun) and echoes
 * the nonce; the probe succeeds when the echo comes back. Owned by its agent
 * (ag_agt: a->probe); it reports once through struct ag_probe_cbs and is then
 * dead until its owner frees it from the loop. */
#ifndef AG_PROBE_H
#define AG_PROBE_H

#include <stdbool.h>
#include <stdint.h>

struct ag_agt;
struct ag_probe;

struct ag_probe_cbs {
    /* Terminal, exactly once: the echo came back (ok, rtt_ms the round trip)
     * or the probe failed (err says why). Only ever called from the probe's
     * own events (never inside ag_probe_start() or ag_probe_free()). The
     * probe has closed its connection and is dead (ag_probe_is_done); the
     * owner must not free it here but from the loop (ag_ctx_reap_soon). */
    void (*on_done)(void *arg, bool ok, uint64_t rtt_ms, const char *err);
};

/* Starts a probe for a (a->url must be set; borrowed for the probe's
 * lifetime): sets a->probe_nonce. Returns NULL if it could not start (no
 * report follows). */
struct ag_probe *ag_probe_start(struct ag_agt *a, const struct ag_probe_cbs *cb, void *arg);

/* True once on_done was called. */
bool ag_probe_is_done(const struct ag_probe *p);

/* Frees the probe; if it is still running it is abandoned and no report
 * follows. Clears a->probe_nonce if it is still this probe's. The owner
 * clears its pointer. Takes NULL. */
void ag_probe_free(struct ag_probe *p);

#endif
