/* The route registry: agent address -> the route (gw_up.h) that serves it
 * now (the newest registration). Routes are borrowed pointers owned by their
 * upstreams (a tunnel's agent entries), which remove them before they go. A
 * tunnel that lost an address (replaced, superseded, draining) keeps
 * finishing the streams it already has; the registry only decides where new
 * requests go. */
#ifndef GW_REG_H
#define GW_REG_H

#include <stddef.h>
#include <stdint.h>

#include "id.h"

struct gw_reg;
struct gw_route;

struct gw_reg *gw_reg_new(void);
void gw_reg_free(struct gw_reg *reg);

/* The route now serving addr, or NULL. */
struct gw_route *gw_reg_get(const struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN]);

/* Makes rt serve addr; returns the route it replaced (NULL if none) so the
 * caller can tell its owner. Returns NULL and leaves the table unchanged
 * only if out of memory, with *oom set. */
struct gw_route *gw_reg_set(struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN],
                            struct gw_route *rt, int *oom);

/* Removes addr if (and only if) rt is the route serving it. */
void gw_reg_remove(struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN],
                   const struct gw_route *rt);

/* Number of addresses routed. */
size_t gw_reg_count(const struct gw_reg *reg);

#endif
