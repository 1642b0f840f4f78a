/* Per-IP accounting; see gw_ipt.h. A chained hash table of small entries,
 * grown by doubling; entries are freed by release (when they count nothing
 * and carry no live rate window) or by the periodic sweep. */
#include "gw_ipt.h"

#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#define RATE_WINDOW_MS 60000u

struct ip_entry {
    uint8_t key[16];            /* IPv6, or IPv4 as ::ffff:a.b.c.d */
    uint32_t conns;             /* open public connections */
    uint32_t tunnels;           /* open tunnels */
    uint32_t pending;           /* of which not yet authenticated */
    uint64_t window_start_ms;   /* start of the current minute of upgrades */
    uint32_t window_count;      /* upgrades in that minute */
    uint64_t presence_start_ms; /* start of the current minute of /presence calls */
    uint32_t presence_count;    /* calls in that minute */
    struct ip_entry *next;
};

struct gw_ipt {
    struct ip_entry **buckets;  /* owned */
    size_t nbuckets;            /* power of two */
    size_t n;
};

static void key_of(const struct sockaddr *sa, uint8_t key[16])
{
    memset(key, 0, 16);
    if (sa->sa_family == AF_INET) {
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        memcpy(key, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    }
}

static size_t hash(const uint8_t key[16])
{
    uint64_t h = 1469598103934665603u; /* FNV-1a */

    for (int i = 0; i < 16; i++) {
        h ^= key[i];
        h *= 1099511628211u;
    }
    return (size_t)h;
}

struct gw_ipt *gw_ipt_new(void)
{
    struct gw_ipt *t = calloc(1, sizeof(*t));

    if (t == NULL)
        return NULL;
    t->nbuckets = 256;
    t->buckets = calloc(t->nbuckets, sizeof(*t->buckets));
    if (t->buckets == NULL) {
        free(t);
        return NULL;
    }
    return t;
}

void gw_ipt_free(struct gw_ipt *t)
{
    if (t == NULL)
        return;
    for (size_t i = 0; i < t->nbuckets; i++) {
        struct ip_entry *e = t->buckets[i];
        while (e != NULL) {
            struct ip_entry *next = e->next;
            free(e);
            e = next;
        }
    }
    free(t->buckets);
    free(t);
}

static void grow(struct gw_ipt *t)
{
    size_t nb = t->nbuckets * 2;
    struct ip_entry **b = calloc(nb, sizeof(*b));

    if (b == NULL)
        return; /* keep the longer chains */
    for (size_t i = 0; i < t->nbuckets; i++) {
        struct ip_entry *e = t->buckets[i];
        while (e != NULL) {
            struct ip_entry *next = e->next;
            size_t j = hash(e->key) & (nb - 1);
            e->next = b[j];
            b[j] = e;
            e = next;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = nb;
}

/* The entry for sa, created if create; NULL if absent or out of memory. */
static struct ip_entry *find(struct gw_ipt *t, const struct sockaddr *sa, bool create)
{
    uint8_t key[16];
    struct ip_entry *e;
    size_t i;

    key_of(sa, key);
    i = hash(key) & (t->nbuckets - 1);
    for (e = t->buckets[i]; e != NULL; e = e->next) {
        if (memcmp(e->key, key, 16) == 0)
            return e;
    }
    if (!create)
        return NULL;
    if (t->n >= t->nbuckets * 2) {
        grow(t);
        i = hash(key) & (t->nbuckets - 1);
    }
    e = calloc(1, sizeof(*e));
    if (e == NULL)
        return NULL;
    memcpy(e->key, key, 16);
    e->next = t->buckets[i];
    t->buckets[i] = e;
    t->n++;
    return e;
}

/* Frees an entry that counts nothing; one with a rate window is left to
 * gw_ipt_sweep(), so reconnecting never resets a client's per-minute count. */
static void drop_if_idle(struct gw_ipt *t, struct ip_entry *victim)
{
    if (victim->conns != 0 || victim->tunnels != 0 || victim->window_count != 0 ||
        victim->presence_count != 0)
        return;
    size_t i = hash(victim->key) & (t->nbuckets - 1);
    for (struct ip_entry **pp = &t->buckets[i]; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == victim) {
            *pp = victim->next;
            free(victim);
            t->n--;
            return;
        }
    }
}

bool gw_ipt_conn_acquire(struct gw_ipt *t, const struct sockaddr *sa, uint64_t max)
{
    struct ip_entry *e = find(t, sa, true);

    if (e == NULL)
        return max == 0; /* out of memory: only unlimited proceeds */
    if (max != 0 && e->conns >= max)
        return false;
    e->conns++;
    return true;
}

void gw_ipt_conn_release(struct gw_ipt *t, const struct sockaddr *sa)
{
    struct ip_entry *e = find(t, sa, false);

    if (e == NULL || e->conns == 0)
        return;
    e->conns--;
    drop_if_idle(t, e);
}

enum gw_ipt_verdict gw_ipt_tunnel_acquire(struct gw_ipt *t, const struct sockaddr *sa,
                                          uint64_t max_tunnels, uint64_t per_min, uint64_t now_ms)
{
    struct ip_entry *e = find(t, sa, true);

    if (e == NULL)
        return max_tunnels == 0 && per_min == 0 ? GW_IPT_OK : GW_IPT_TOO_MANY;
    /* a new entry's first upgrade starts its window (not the clock's zero) */
    if (e->window_count == 0 || now_ms < e->window_start_ms ||
        now_ms - e->window_start_ms >= RATE_WINDOW_MS) {
        e->window_start_ms = now_ms;
        e->window_count = 0;
    }
    if (per_min != 0 && e->window_count >= per_min)
        return GW_IPT_RATE;
    if (max_tunnels != 0 && e->tunnels >= max_tunnels)
        return GW_IPT_TOO_MANY;
    e->window_count++;
    e->tunnels++;
    return GW_IPT_OK;
}

void gw_ipt_tunnel_release(struct gw_ipt *t, const struct sockaddr *sa)
{
    struct ip_entry *e = find(t, sa, false);

    if (e != NULL && e->tunnels > 0)
        e->tunnels--;
}

bool gw_ipt_pending_acquire(struct gw_ipt *t, const struct sockaddr *sa, uint64_t max)
{
    struct ip_entry *e = find(t, sa, false);

    if (e == NULL || (max != 0 && e->pending >= max))
        return e == NULL && max == 0;
    e->pending++;
    return true;
}

void gw_ipt_pending_release(struct gw_ipt *t, const struct sockaddr *sa)
{
    struct ip_entry *e = find(t, sa, false);

    if (e != NULL && e->pending > 0)
        e->pending--;
}

bool gw_ipt_presence_hit(struct gw_ipt *t, const struct sockaddr *sa, uint64_t per_min,
                         uint64_t now_ms)
{
    struct ip_entry *e;

    if (per_min == 0)
        return true;
    e = find(t, sa, true);
    if (e == NULL)
        return false;
    if (e->presence_count == 0 || now_ms < e->presence_start_ms ||
        now_ms - e->presence_start_ms >= RATE_WINDOW_MS) {
        e->presence_start_ms = now_ms;
        e->presence_count = 0;
    }
    if (e->presence_count >= per_min)
        return false;
    e->presence_count++;
    return true;
}

void gw_ipt_sweep(struct gw_ipt *t, uint64_t now_ms)
{
    for (size_t i = 0; i < t->nbuckets; i++) {
        struct ip_entry **pp = &t->buckets[i];
        while (*pp != NULL) {
            struct ip_entry *e = *pp;
            if (e->conns == 0 && e->tunnels == 0 &&
                (e->window_count == 0 || now_ms - e->window_start_ms >= RATE_WINDOW_MS) &&
                (e->presence_count == 0 || now_ms - e->presence_start_ms >= RATE_WINDOW_MS)) {
                *pp = e->next;
                free(e);
                t->n--;
            } else {
                pp = &e->next;
            }
        }
    }
}

size_t gw_ipt_count(const struct gw_ipt *t)
{
    return t->n;
}
