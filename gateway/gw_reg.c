/* Route registry; see gw_reg.h. Open addressing with linear probing and
 * backward-shift deletion, keyed by the address: addresses are keccak
 * outputs, so their first bytes are already a uniform hash. */
#include "gw_reg.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>


struct slot {
    uint8_t addr[ID_ADDR_LEN];
    struct gw_route *a;          /* borrowed; NULL = empty slot */
};

struct gw_reg {
    struct slot *slots;          /* owned; cap entries */
    size_t cap;                  /* power of two */
    size_t n;                    /* used slots */
};

static size_t hash(const uint8_t *addr)
{
    size_t h;

    memcpy(&h, addr, sizeof(h));
    return h;
}

struct gw_reg *gw_reg_new(void)
{
    struct gw_reg *reg = calloc(1, sizeof(*reg));

    if (reg == NULL)
        return NULL;
    reg->cap = 64;
    reg->slots = calloc(reg->cap, sizeof(*reg->slots));
    if (reg->slots == NULL) {
        free(reg);
        return NULL;
    }
    return reg;
}

void gw_reg_free(struct gw_reg *reg)
{
    if (reg == NULL)
        return;
    free(reg->slots);
    free(reg);
}

static struct slot *find(const struct gw_reg *reg, const uint8_t *addr)
{
    size_t mask = reg->cap - 1;

    for (size_t i = hash(addr) & mask;; i = (i + 1) & mask) {
        struct slot *s = &reg->slots[i];
        if (s->a == NULL || memcmp(s->addr, addr, ID_ADDR_LEN) == 0)
            return s;
    }
}

static int grow(struct gw_reg *reg)
{
    struct slot *old = reg->slots;
    size_t oldcap = reg->cap;
    struct slot *slots = calloc(oldcap * 2, sizeof(*slots));

    if (slots == NULL)
        return -1;
    reg->slots = slots;
    reg->cap = oldcap * 2;
    for (size_t i = 0; i < oldcap; i++) {
        if (old[i].a != NULL)
            *find(reg, old[i].addr) = old[i];
    }
    free(old);
    return 0;
}

struct gw_route *gw_reg_get(const struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN])
{
    return find(reg, addr)->a;
}

struct gw_route *gw_reg_set(struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN],
                            struct gw_route *a, int *oom)
{
    struct slot *s;
    struct gw_route *old;

    *oom = 0;
    if ((reg->n + 1) * 4 > reg->cap * 3 && grow(reg) != 0) {
        *oom = 1;
        return NULL;
    }
    s = find(reg, addr);
    old = s->a;
    if (old == NULL) {
        memcpy(s->addr, addr, ID_ADDR_LEN);
        reg->n++;
    }
    s->a = a;
    return old;
}

void gw_reg_remove(struct gw_reg *reg, const uint8_t addr[ID_ADDR_LEN],
                   const struct gw_route *a)
{
    size_t mask = reg->cap - 1;
    struct slot *s = find(reg, addr);
    size_t i;

    if (s->a == NULL || s->a != a)
        return;
    /* backward-shift deletion keeps probe chains intact without tombstones */
    i = (size_t)(s - reg->slots);
    for (size_t j = (i + 1) & mask; reg->slots[j].a != NULL; j = (j + 1) & mask) {
        size_t home = hash(reg->slots[j].addr) & mask;
        /* move j into the hole at i if its home is not cyclically in (i, j] */
        bool in_range = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!in_range) {
            reg->slots[i] = reg->slots[j];
            i = j;
        }
    }
    reg->slots[i].a = NULL;
    reg->n--;
}

size_t gw_reg_count(const struct gw_reg *reg)
{
    return reg->n;
}
