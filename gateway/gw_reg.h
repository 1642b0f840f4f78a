/* The route registry: agent address -> the tunnel agent entry that serves it
 * now (the newest registration). Entries are borrowed pointers owned by their
 * tunnels, which remove themselves before they go. A tunnel that lost an
 * address (replaced, superseded, draining) keeps finishing the streams it
 * already has; the registry only decides where new requests go. */
#ifndef GW_REG_H
#define GW_REG_H

#include <stddef.h>
#include <stdint.h>

#include "id.h"

struct gw_reg;
struct gw_tun;
struct gw_tun_agent;

struct gw_reg *gw_reg_new(void);
void gw_reg_free(struct gw_reg *reg);

/* The agent entry now serving addr, or NULL. */
struct gw_tun_agent *gw_reg_get(const struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN]);

/* The tunnel now serving addr, or NULL. */
struct gw_tun *gw_reg_lookup(const struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN]);

/* Makes a serve addr; returns the entry it replaced (NULL if none) so the
 * caller can tell its tunnel. Returns NULL and leaves the table unchanged
 * only if out of memory, with *oom set. */
struct gw_tun_agent *gw_reg_set(struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN],
                                struct gw_tun_agent *a, int *oom);

/* Removes addr if (and only if) a is the entry serving it. */
void gw_reg_remove(struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN],
                   const struct gw_tun_agent *a);

/* Number of addresses routed. */
size_t gw_reg_count(const struct gw_reg *reg);

#endif
