/* Per-client-address accounting for the per-IP limits: open public
 * connections (max-conns-per-ip), open tunnels (max-tunnels-per-ip),
 * tunnel upgrades per minute (tunnel-connects-per-ip-per-min) and /presence
 * calls per minute (presence-per-ip-per-min). An entry lives
 * while it counts anything; idle ones are swept. Keys are the TCP peer
 * address (IPv4-mapped IPv6 folded to IPv4). */
#ifndef GW_IPT_H
#define GW_IPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct gw_ipt;

struct gw_ipt *gw_ipt_new(void);
void gw_ipt_free(struct gw_ipt *t);

/* One more public connection from sa; refused (false) at max (0 = no limit).
 * A refused connection is not counted. */
bool gw_ipt_conn_acquire(struct gw_ipt *t, const struct sockaddr *sa, uint64_t max);
void gw_ipt_conn_release(struct gw_ipt *t, const struct sockaddr *sa);

enum gw_ipt_verdict {
    GW_IPT_OK = 0,
    GW_IPT_TOO_MANY,   /* max-tunnels-per-ip */
    GW_IPT_RATE,       /* tunnel-connects-per-ip-per-min */
};

/* A tunnel upgrade from sa at now_ms; counted only when GW_IPT_OK. */
enum gw_ipt_verdict gw_ipt_tunnel_acquire(struct gw_ipt *t, const struct sockaddr *sa,
                                          uint64_t max_tunnels, uint64_t per_min, uint64_t now_ms);
void gw_ipt_tunnel_release(struct gw_ipt *t, const struct sockaddr *sa);

/* One more unauthenticated tunnel from sa (max-pending-tunnels-per-ip),
 * which holds a tunnel slot already (gw_ipt_tunnel_acquire): refused (false)
 * at max (0 = no limit). Released when it authenticates or goes. */
bool gw_ipt_pending_acquire(struct gw_ipt *t, const struct sockaddr *sa, uint64_t max);
void gw_ipt_pending_release(struct gw_ipt *t, const struct sockaddr *sa);

/* One /presence call from sa at now_ms: false past per_min calls in its
 * current minute (0 = no limit; refused calls are not counted). */
bool gw_ipt_presence_hit(struct gw_ipt *t, const struct sockaddr *sa, uint64_t per_min,
                         uint64_t now_ms);

/* Drops entries that count nothing and whose rate window has passed. */
void gw_ipt_sweep(struct gw_ipt *t, uint64_t now_ms);

size_t gw_ipt_count(const struct gw_ipt *t);

#endif
