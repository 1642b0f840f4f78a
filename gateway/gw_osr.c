/* Osaurus mode; see gw_osr.h. Until the data frames are implemented, an
 * Osaurus tunnel authenticates and registers but answers every request with
 * 502 agent_unreachable-equivalent (agent_offline). */
#include "gw_osr.h"

#include "gw_tun.h"

int gw_osr_start(struct gw_tun *t)
{
    (void)t;
    return 0;
}

enum herr gw_osr_open_stream(struct gw_tun *t, struct gw_req *r)
{
    (void)t;
    (void)r;
    return HERR_AGENT_OFFLINE;
}

void gw_osr_on_frame(struct gw_tun *t, const struct tun_msg *m)
{
    (void)t;
    (void)m;
}

bool gw_osr_on_bad_frame(struct gw_tun *t, const struct tun_msg *m, enum tun_err e)
{
    (void)t;
    (void)m;
    (void)e;
    return false;
}

void gw_osr_ping(struct gw_tun *t)
{
    (void)t;
}

void gw_osr_drain(struct gw_tun *t)
{
    gw_tun_close(t, 1012, "relay_restarting");
}

void gw_osr_fail_all(struct gw_tun *t)
{
    (void)t;
}

void gw_osr_free_all(struct gw_tun *t)
{
    (void)t;
}

size_t gw_osr_pending(const struct gw_tun *t)
{
    (void)t;
    return 0;
}
