/* Unit tests for gateway/gw_reg: the address -> route table (open addressing,
 * linear probing, backward-shift deletion). The hash is the address's first
 * 8 bytes (little-endian here), masked by the capacity, so the tests craft
 * addresses by their home slot: addr[0] is the home at capacity 64, the last
 * bytes tell addresses apart. Routes are opaque borrowed pointers to the
 * registry; distinct slots of a local array serve. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "alloc_fail.h"
#include "gw_reg.h"

/* The registry's entry type (opaque here). */
#define ENTRY struct gw_route

#define CAP0 64      /* initial capacity */
#define MAX_AT_CAP0 48 /* entries it holds before growing (load factor 3/4) */

static max_align_t pool[4096];

static ENTRY *ent(size_t i)
{
    assert_true(i < sizeof(pool) / sizeof(pool[0]));
    return (ENTRY *)&pool[i];
}

/* An address with home slot home (at capacity 64) and identity id. */
static void mk_addr(uint8_t addr[ID_ADDR_LEN], uint8_t home, uint32_t id)
{
    memset(addr, 0, ID_ADDR_LEN);
    addr[0] = home;
    addr[16] = (uint8_t)(id >> 24);
    addr[17] = (uint8_t)(id >> 16);
    addr[18] = (uint8_t)(id >> 8);
    addr[19] = (uint8_t)id;
}

static void set_new(struct gw_reg *reg, const uint8_t *addr, ENTRY *e)
{
    int oom = 7;

    assert_null(gw_reg_set(reg, addr, e, &oom));
    assert_int_equal(oom, 0);
    assert_ptr_equal(gw_reg_get(reg, addr), e);
}

static void test_basic(void **state)
{
    struct gw_reg *reg = gw_reg_new();
    uint8_t a[ID_ADDR_LEN], b[ID_ADDR_LEN];
    int oom;

    assert_non_null(reg);
    mk_addr(a, 5, 1);
    mk_addr(b, 9, 2);
    assert_int_equal(gw_reg_count(reg), 0);
    assert_null(gw_reg_get(reg, a));
    set_new(reg, a, ent(0));
    assert_int_equal(gw_reg_count(reg), 1);
    assert_null(gw_reg_get(reg, b));
    set_new(reg, b, ent(1));
    assert_int_equal(gw_reg_count(reg), 2);
    assert_ptr_equal(gw_reg_get(reg, a), ent(0));
    assert_ptr_equal(gw_reg_get(reg, b), ent(1));

    /* replace: the old entry comes back, the count stays */
    assert_ptr_equal(gw_reg_set(reg, a, ent(2), &oom), ent(0));
    assert_int_equal(oom, 0);
    assert_int_equal(gw_reg_count(reg), 2);
    assert_ptr_equal(gw_reg_get(reg, a), ent(2));
    /* setting the same entry again returns it */
    assert_ptr_equal(gw_reg_set(reg, a, ent(2), &oom), ent(2));
    assert_int_equal(gw_reg_count(reg), 2);

    /* remove only if the entry matches: the replaced one cannot remove the new */
    gw_reg_remove(reg, a, ent(0));
    assert_int_equal(gw_reg_count(reg), 2);
    assert_ptr_equal(gw_reg_get(reg, a), ent(2));
    gw_reg_remove(reg, a, ent(1)); /* b's entry, wrong address */
    assert_int_equal(gw_reg_count(reg), 2);
    assert_ptr_equal(gw_reg_get(reg, a), ent(2));
    assert_ptr_equal(gw_reg_get(reg, b), ent(1));
    gw_reg_remove(reg, a, NULL);
    assert_int_equal(gw_reg_count(reg), 2);
    gw_reg_remove(reg, a, ent(2));
    assert_int_equal(gw_reg_count(reg), 1);
    assert_null(gw_reg_get(reg, a));
    assert_ptr_equal(gw_reg_get(reg, b), ent(1));
    /* removing an absent address is a no-op */
    gw_reg_remove(reg, a, ent(2));
    assert_int_equal(gw_reg_count(reg), 1);
    /* same home slot, different address: not confused */
    uint8_t b2[ID_ADDR_LEN];
    mk_addr(b2, 9, 3);
    assert_null(gw_reg_get(reg, b2));
    gw_reg_remove(reg, b2, ent(1));
    assert_int_equal(gw_reg_count(reg), 1);
    assert_ptr_equal(gw_reg_get(reg, b), ent(1));
    gw_reg_remove(reg, b, ent(1));
    assert_int_equal(gw_reg_count(reg), 0);
    assert_null(gw_reg_get(reg, b));
    /* re-adding after removal */
    set_new(reg, a, ent(3));
    assert_int_equal(gw_reg_count(reg), 1);
    gw_reg_free(reg);
    gw_reg_free(NULL);
}

/* A set of crafted addresses and which are still present. */
struct fixture {
    size_t n;
    uint8_t addr[64][ID_ADDR_LEN];
    bool present[64];
};

static void fx_add(struct fixture *fx, struct gw_reg *reg, uint8_t home)
{
    size_t i = fx->n++;

    assert_true(i < 64);
    mk_addr(fx->addr[i], home, (uint32_t)(1000 + i));
    set_new(reg, fx->addr[i], ent(i));
    fx->present[i] = true;
}

static void fx_del(struct fixture *fx, struct gw_reg *reg, size_t i)
{
    size_t before = gw_reg_count(reg);

    assert_true(fx->present[i]);
    gw_reg_remove(reg, fx->addr[i], ent(i));
    fx->present[i] = false;
    assert_int_equal(gw_reg_count(reg), before - 1);
}

/* Every present address maps to its own entry, removed ones to nothing. */
static void fx_check(const struct fixture *fx, const struct gw_reg *reg)
{
    size_t want = 0;

    for (size_t i = 0; i < fx->n; i++) {
        const ENTRY *got = gw_reg_get(reg, fx->addr[i]);
        if (fx->present[i]) {
            want++;
            if (got != ent(i))
                fail_msg("address %zu (home %u) maps to %p, not %p", i, fx->addr[i][0],
                         (const void *)got, (void *)ent(i));
        } else if (got != NULL) {
            fail_msg("removed address %zu (home %u) still maps to %p", i, fx->addr[i][0],
                     (const void *)got);
        }
    }
    assert_int_equal(gw_reg_count(reg), want);
}

/* One chain of 6 addresses with the same home; delete at each position. */
static void chain_case(uint8_t home, size_t del_first, size_t del_second)
{
    struct gw_reg *reg = gw_reg_new();
    struct fixture fx = {0};

    assert_non_null(reg);
    for (int i = 0; i < 6; i++)
        fx_add(&fx, reg, home);
    fx_check(&fx, reg);
    fx_del(&fx, reg, del_first);
    fx_check(&fx, reg);
    fx_del(&fx, reg, del_second);
    fx_check(&fx, reg);
    /* the holes are reusable and the chain still ends where it should */
    fx_add(&fx, reg, home);
    fx_check(&fx, reg);
    for (size_t i = 0; i < fx.n; i++) {
        if (fx.present[i]) {
            fx_del(&fx, reg, i);
            fx_check(&fx, reg);
        }
    }
    assert_int_equal(gw_reg_count(reg), 0);
    gw_reg_free(reg);
}

static void test_chain_delete(void **state)
{
    /* start, middle, end of a chain in the middle of the table */
    chain_case(10, 0, 1);
    chain_case(10, 2, 3);
    chain_case(10, 5, 4);
    chain_case(10, 0, 5);
    /* a chain that wraps around the end: homes 61 -> slots 61..63, 0..2 */
    for (size_t d1 = 0; d1 < 6; d1++) {
        for (size_t d2 = 0; d2 < 6; d2++) {
            if (d1 != d2) {
                chain_case(61, d1, d2);
                chain_case(63, d1, d2);
            }
        }
    }
}

/* Interleaved chains: entries displaced by a neighbouring cluster, across the
 * wrap. Homes 62, 63, 0, 1 each get several addresses, so the cluster runs
 * 62..63,0..N and contains entries whose homes lie on both sides of the wrap;
 * deleting any one of them must shift the right ones back. */
static void test_wrap_clusters(void **state)
{
    static const uint8_t homes[] = {62, 63, 0, 62, 1, 63, 0, 62, 2, 1, 63, 0};
    const size_t n = sizeof(homes) / sizeof(homes[0]);

    for (size_t del = 0; del < n; del++) {
        for (size_t del2 = 0; del2 < n; del2++) {
            struct gw_reg *reg = gw_reg_new();
            struct fixture fx = {0};

            assert_non_null(reg);
            for (size_t i = 0; i < n; i++)
                fx_add(&fx, reg, homes[i]);
            /* entries just outside the cluster must stay put too */
            fx_add(&fx, reg, 30);
            fx_add(&fx, reg, 60);
            fx_check(&fx, reg);
            fx_del(&fx, reg, del);
            fx_check(&fx, reg);
            if (del2 != del) {
                fx_del(&fx, reg, del2);
                fx_check(&fx, reg);
            }
            /* re-insert a colliding one and look again */
            fx_add(&fx, reg, homes[del]);
            fx_check(&fx, reg);
            gw_reg_free(reg);
        }
    }
}

/* Entries whose home is after the hole must not move before their home: a
 * chain at home 20 followed (contiguously) by entries homed at 23, 24. */
static void test_no_shift_before_home(void **state)
{
    struct gw_reg *reg = gw_reg_new();
    struct fixture fx = {0};

    assert_non_null(reg);
    fx_add(&fx, reg, 20); /* slot 20 */
    fx_add(&fx, reg, 20); /* 21 */
    fx_add(&fx, reg, 20); /* 22 */
    fx_add(&fx, reg, 23); /* 23 (own home) */
    fx_add(&fx, reg, 20); /* 24 (displaced past 23) */
    fx_add(&fx, reg, 24); /* 25 */
    fx_add(&fx, reg, 21); /* 26 */
    fx_check(&fx, reg);
    fx_del(&fx, reg, 1); /* hole at 21 */
    fx_check(&fx, reg);
    fx_del(&fx, reg, 3); /* the one at its own home */
    fx_check(&fx, reg);
    fx_del(&fx, reg, 0);
    fx_check(&fx, reg);
    gw_reg_free(reg);
}

/* Growth past the load factor keeps every entry, also colliding ones. */
static void test_growth(void **state)
{
    struct gw_reg *reg = gw_reg_new();
    enum { N = 3000 };
    static uint8_t addrs[N][ID_ADDR_LEN];

    assert_non_null(reg);
    for (size_t i = 0; i < N; i++) {
        /* a third of them share the whole first 8 bytes: one hash at any size */
        if (i % 3 == 0)
            mk_addr(addrs[i], 7, (uint32_t)i);
        else {
            memset(addrs[i], 0, ID_ADDR_LEN);
            for (int k = 0; k < 8; k++)
                addrs[i][k] = (uint8_t)((i * 2654435761u) >> (k * 3));
            addrs[i][0] = (uint8_t)i;
            addrs[i][1] = (uint8_t)(i >> 8);
            addrs[i][19] = 0xee;
        }
        set_new(reg, addrs[i], ent(i));
        assert_int_equal(gw_reg_count(reg), i + 1);
        /* right around each growth point, everything so far is found */
        if (i + 1 == MAX_AT_CAP0 || i + 1 == MAX_AT_CAP0 + 1 || i + 1 == 97 || i + 1 == 1537) {
            for (size_t j = 0; j <= i; j++)
                assert_ptr_equal(gw_reg_get(reg, addrs[j]), ent(j));
        }
    }
    for (size_t j = 0; j < N; j++)
        assert_ptr_equal(gw_reg_get(reg, addrs[j]), ent(j));
    /* remove the odd ones; the even ones stay */
    for (size_t j = 1; j < N; j += 2)
        gw_reg_remove(reg, addrs[j], ent(j));
    assert_int_equal(gw_reg_count(reg), N / 2);
    for (size_t j = 0; j < N; j++)
        assert_ptr_equal(gw_reg_get(reg, addrs[j]), j % 2 == 0 ? ent(j) : NULL);
    gw_reg_free(reg);
}

/* xorshift64*, fixed seed: the same run every time. */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

/* Random set/replace/remove/get against a plain array; keys from a small pool
 * with few distinct hashes so probe chains are long and deletions shift. */
static void test_model(void **state)
{
    enum { KEYS = 300, ITER = 200000 };
    static uint8_t keys[KEYS][ID_ADDR_LEN];
    ENTRY *model[KEYS] = {0};
    struct gw_reg *reg = gw_reg_new();
    uint64_t s = 0x9e3779b97f4a7c15ull;
    size_t count = 0;
    size_t max_count = 0;

    assert_non_null(reg);
    for (size_t i = 0; i < KEYS; i++) {
        memset(keys[i], 0, ID_ADDR_LEN);
        switch (i % 3) {
        case 0: /* home 63 at 64 slots: chains wrap */
            keys[i][0] = 63;
            break;
        case 1: /* 8 homes spread over low bits */
            keys[i][0] = (uint8_t)(i % 8);
            break;
        default: /* anything */
            for (int k = 0; k < 8; k++)
                keys[i][k] = (uint8_t)rng_next(&s);
            break;
        }
        keys[i][18] = (uint8_t)(i >> 8);
        keys[i][19] = (uint8_t)i;
    }
    for (unsigned it = 0; it < ITER; it++) {
        size_t k = (size_t)(rng_next(&s) % KEYS);
        unsigned op = (unsigned)(rng_next(&s) % 10);
        /* keep the load moving up and down: phases favour set or remove */
        bool grow_phase = (it / 20000) % 2 == 0;
        ENTRY *e = ent(1 + (size_t)(rng_next(&s) % 4000));
        int oom;

        if (op < (grow_phase ? 6u : 3u)) {
            ENTRY *old = gw_reg_set(reg, keys[k], e, &oom);
            assert_int_equal(oom, 0);
            assert_ptr_equal(old, model[k]);
            if (model[k] == NULL)
                count++;
            model[k] = e;
        } else if (op < 9) {
            /* remove with the right entry, or sometimes a wrong one */
            ENTRY *who = model[k] != NULL && (rng_next(&s) % 4 != 0) ? model[k] : e;
            gw_reg_remove(reg, keys[k], who);
            if (model[k] != NULL && model[k] == who) {
                model[k] = NULL;
                count--;
            }
        } else {
            assert_ptr_equal(gw_reg_get(reg, keys[k]), model[k]);
        }
        if (count > max_count)
            max_count = count;
        assert_int_equal(gw_reg_count(reg), count);
        if (it % 997 == 0) {
            for (size_t j = 0; j < KEYS; j++)
                assert_ptr_equal(gw_reg_get(reg, keys[j]), model[j]);
        }
    }
    for (size_t j = 0; j < KEYS; j++)
        assert_ptr_equal(gw_reg_get(reg, keys[j]), model[j]);
    /* the run did go past the first growth and back down */
    assert_true(max_count > MAX_AT_CAP0);
    gw_reg_free(reg);
}

/* Out of memory: creation fails cleanly; a set that needs to grow reports oom
 * and leaves the table as it was. */
static void test_oom(void **state)
{
    struct gw_reg *reg;
    uint8_t addrs[MAX_AT_CAP0 + 1][ID_ADDR_LEN];
    unsigned long fails = 0;
    int oom;

    for (unsigned long n = 1;; n++) {
        alloc_fail_arm(n);
        reg = gw_reg_new();
        bool fired = alloc_fail_fired();
        size_t live = alloc_fail_live();
        alloc_fail_disarm();
        if (!fired)
            break;
        fails++;
        assert_null(reg);
        assert_int_equal(live, 0);
    }
    assert_non_null(reg);
    assert_int_equal(fails, 2); /* the registry, its slots */

    for (size_t i = 0; i < MAX_AT_CAP0; i++) {
        mk_addr(addrs[i], (uint8_t)(i % 5), (uint32_t)i);
        set_new(reg, addrs[i], ent(i));
    }
    mk_addr(addrs[MAX_AT_CAP0], 3, 999);
    /* the 49th address needs the table to grow */
    alloc_fail_arm(1);
    assert_null(gw_reg_set(reg, addrs[MAX_AT_CAP0], ent(MAX_AT_CAP0), &oom));
    assert_int_equal(oom, 1);
    assert_true(alloc_fail_fired());
    alloc_fail_disarm();
    assert_int_equal(gw_reg_count(reg), MAX_AT_CAP0);
    assert_null(gw_reg_get(reg, addrs[MAX_AT_CAP0]));
    for (size_t i = 0; i < MAX_AT_CAP0; i++)
        assert_ptr_equal(gw_reg_get(reg, addrs[i]), ent(i));
    /* memory back: the same set succeeds */
    set_new(reg, addrs[MAX_AT_CAP0], ent(MAX_AT_CAP0));
    assert_int_equal(gw_reg_count(reg), MAX_AT_CAP0 + 1);
    for (size_t i = 0; i <= MAX_AT_CAP0; i++)
        assert_ptr_equal(gw_reg_get(reg, addrs[i]), ent(i));
    gw_reg_free(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basic),
        cmocka_unit_test(test_chain_delete),
        cmocka_unit_test(test_wrap_clusters),
        cmocka_unit_test(test_no_shift_before_home),
        cmocka_unit_test(test_growth),
        cmocka_unit_test(test_model),
        cmocka_unit_test(test_oom),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
