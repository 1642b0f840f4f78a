/* --allow FILE: the addresses that may register, one per line (0x + 40 hex,
 * any case; EIP-55 mixed case must checksum), '#' comments and blank lines
 * ignored. Loaded at start and on SIGHUP; immutable once loaded. */
#ifndef GW_ALLOW_H
#define GW_ALLOW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "id.h"

struct gw_allow;

/* Returns NULL with "FILE:LINE: reason" in err on any bad line or I/O error. */
struct gw_allow *gw_allow_load(const char *path, char *err, size_t errlen);
bool gw_allow_has(const struct gw_allow *a, const uint8_t addr[ID_ADDR_LEN]);
size_t gw_allow_count(const struct gw_allow *a);
void gw_allow_free(struct gw_allow *a);

#endif
