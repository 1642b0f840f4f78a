/* The end-to-end probe that makes an agent "connected" (PRODUCT.md): an
 * HTTP/1.1 GET for the agent's own public URL, sent to the address the
 * tunnel dialled (TLS with SNI and Host set to the public name, verified like
 * the tunnel; cleartext for ws://), carrying a one-time nonce in
 * X-Tunnel-Probe. The tunnel answers that request itself (ag_tun) and echoes
 * the nonce; the probe succeeds when the echo comes back. */
#ifndef AG_PROBE_H
#define AG_PROBE_H

struct ag_agt;
struct ag_probe;

/* Starts a probe for a (a->url must be set): sets a->probe_nonce and reports
 * with ag_daemon_on_probe_done() from the loop (the probe is freed before
 * that call; a->probe is cleared). Returns NULL if it could not start. */
struct ag_probe *ag_probe_start(struct ag_agt *a);

/* Abandons a probe; no report follows. Clears a->probe_nonce. Takes NULL. */
void ag_probe_free(struct ag_probe *p);

#endif
