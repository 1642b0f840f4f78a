/* Unit tests for gateway/gw_ipt: per-IP connection and tunnel accounting.
 * Time is the now_ms argument, so a fake clock is just numbers; T0 is well
 * past the first minute of the clock (see test_tunnel_rate_window). */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmocka.h>

#include "alloc_fail.h"
#include "gw_ipt.h"

#define MIN_MS 60000u
#define T0 10000000u

struct addr {
    struct sockaddr_storage ss;
};

static const struct sockaddr *v4(struct addr *a, const char *ip)
{
    struct sockaddr_in *s = (struct sockaddr_in *)&a->ss;

    memset(a, 0, sizeof(*a));
    s->sin_family = AF_INET;
    s->sin_port = htons(1234);
    assert_int_equal(inet_pton(AF_INET, ip, &s->sin_addr), 1);
    return (const struct sockaddr *)&a->ss;
}

static const struct sockaddr *v6(struct addr *a, const char *ip)
{
    struct sockaddr_in6 *s = (struct sockaddr_in6 *)&a->ss;

    memset(a, 0, sizeof(*a));
    s->sin6_family = AF_INET6;
    s->sin6_port = htons(4321);
    assert_int_equal(inet_pton(AF_INET6, ip, &s->sin6_addr), 1);
    return (const struct sockaddr *)&a->ss;
}

/* 10.x.y.z from the low 24 bits of i */
static const struct sockaddr *v4_n(struct addr *a, uint32_t i)
{
    struct sockaddr_in *s = (struct sockaddr_in *)&a->ss;

    memset(a, 0, sizeof(*a));
    s->sin_family = AF_INET;
    s->sin_addr.s_addr = htonl(0x0a000000u | (i & 0xffffffu));
    return (const struct sockaddr *)&a->ss;
}

static void test_conn_limit(void **state)
{
    struct gw_ipt *t = gw_ipt_new();
    struct addr a, b;
    const struct sockaddr *pa = v4(&a, "192.0.2.1");
    const struct sockaddr *pb = v4(&b, "192.0.2.2");

    assert_non_null(t);
    assert_int_equal(gw_ipt_count(t), 0);
    assert_true(gw_ipt_conn_acquire(t, pa, 3));
    assert_true(gw_ipt_conn_acquire(t, pa, 3));
    assert_true(gw_ipt_conn_acquire(t, pa, 3));
    assert_int_equal(gw_ipt_count(t), 1);
    assert_false(gw_ipt_conn_acquire(t, pa, 3));
    assert_false(gw_ipt_conn_acquire(t, pa, 3));
    /* another address has its own budget */
    assert_true(gw_ipt_conn_acquire(t, pb, 3));
    assert_int_equal(gw_ipt_count(t), 2);
    /* refusals were not counted: one release makes exactly one room */
    gw_ipt_conn_release(t, pa);
    assert_true(gw_ipt_conn_acquire(t, pa, 3));
    assert_false(gw_ipt_conn_acquire(t, pa, 3));
    /* a lower limit applies to what is already open */
    assert_false(gw_ipt_conn_acquire(t, pa, 2));
    /* released down to zero, the entry goes at once */
    gw_ipt_conn_release(t, pa);
    gw_ipt_conn_release(t, pa);
    assert_int_equal(gw_ipt_count(t), 2);
    gw_ipt_conn_release(t, pa);
    assert_int_equal(gw_ipt_count(t), 1);
    /* extra releases, of it or of an unknown address, are no-ops */
    gw_ipt_conn_release(t, pa);
    gw_ipt_conn_release(t, pa);
    struct addr c;
    gw_ipt_conn_release(t, v4(&c, "198.51.100.7"));
    assert_int_equal(gw_ipt_count(t), 1);
    /* and did not go negative: the full budget is back */
    for (int i = 0; i < 3; i++)
        assert_true(gw_ipt_conn_acquire(t, pa, 3));
    assert_false(gw_ipt_conn_acquire(t, pa, 3));
    gw_ipt_free(t);
    gw_ipt_free(NULL);
}

static void test_conn_unlimited(void **state)
{
    struct gw_ipt *t = gw_ipt_new();
    struct addr a;
    const struct sockaddr *pa = v6(&a, "2001:db8::1");

    assert_non_null(t);
    for (int i = 0; i < 100000; i++)
        assert_true(gw_ipt_conn_acquire(t, pa, 0));
    assert_int_equal(gw_ipt_count(t), 1);
    /* all of them were counted */
    assert_false(gw_ipt_conn_acquire(t, pa, 100000));
    assert_true(gw_ipt_conn_acquire(t, pa, 100002));
    for (int i = 0; i < 100000; i++)
        gw_ipt_conn_release(t, pa);
    assert_int_equal(gw_ipt_count(t), 1);
    gw_ipt_conn_release(t, pa);
    assert_int_equal(gw_ipt_count(t), 0);
    gw_ipt_free(t);
}

static void test_v4_mapped(void **state)
{
    struct gw_ipt *t = gw_ipt_new();
    struct addr a, m, c, o, u;
    const struct sockaddr *pa = v4(&a, "192.0.2.1");
    const struct sockaddr *pm = v6(&m, "::ffff:192.0.2.1");
    const struct sockaddr *pc = v6(&c, "::192.0.2.1");       /* IPv4-compatible: not mapped */
    const struct sockaddr *po = v6(&o, "::ffff:192.0.2.2");  /* mapped, other address */
    const struct sockaddr *pu = v6(&u, "64:ff9b::192.0.2.1"); /* NAT64: not folded */

    assert_non_null(t);
    assert_true(gw_ipt_conn_acquire(t, pa, 3));
    assert_true(gw_ipt_conn_acquire(t, pm, 3));
    assert_true(gw_ipt_conn_acquire(t, pa, 3));
    assert_int_equal(gw_ipt_count(t), 1);
    assert_false(gw_ipt_conn_acquire(t, pm, 3));
    assert_false(gw_ipt_conn_acquire(t, pa, 3));
    assert_true(gw_ipt_conn_acquire(t, pc, 3));
    assert_true(gw_ipt_conn_acquire(t, po, 3));
    assert_true(gw_ipt_conn_acquire(t, pu, 3));
    assert_int_equal(gw_ipt_count(t), 4);
    /* released through either form */
    gw_ipt_conn_release(t, pm);
    gw_ipt_conn_release(t, pm);
    gw_ipt_conn_release(t, pa);
    assert_int_equal(gw_ipt_count(t), 3);
    /* tunnels fold the same way */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 1, 0, T0), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pm, 1, 0, T0), GW_IPT_TOO_MANY);
    gw_ipt_tunnel_release(t, pm);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 1, 0, T0), GW_IPT_OK);
    gw_ipt_free(t);
}

static void test_tunnel_max(void **state)
{
    struct gw_ipt *t = gw_ipt_new();
    struct addr a;
    const struct sockaddr *pa = v4(&a, "203.0.113.9");

    assert_non_null(t);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 2, 0, T0), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 2, 0, T0 + 1), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 2, 0, T0 + 2), GW_IPT_TOO_MANY);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 2, 0, T0 + 5 * MIN_MS), GW_IPT_TOO_MANY);
    gw_ipt_tunnel_release(t, pa);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 2, 0, T0 + 5 * MIN_MS), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 2, 0, T0 + 5 * MIN_MS), GW_IPT_TOO_MANY);
    /* tunnels and connections are separate counts */
    assert_true(gw_ipt_conn_acquire(t, pa, 1));
    assert_false(gw_ipt_conn_acquire(t, pa, 1));
    /* unlimited */
    for (int i = 0; i < 1000; i++)
        assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 0, T0 + 6 * MIN_MS), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 1002, 0, T0 + 6 * MIN_MS), GW_IPT_TOO_MANY);
    assert_int_equal(gw_ipt_count(t), 1);
    /* extra releases stop at zero */
    for (int i = 0; i < 1100; i++)
        gw_ipt_tunnel_release(t, pa);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 1, 0, T0 + 6 * MIN_MS), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 1, 0, T0 + 6 * MIN_MS), GW_IPT_TOO_MANY);
    gw_ipt_free(t);
}

static void test_tunnel_rate_window(void **state)
{
    struct gw_ipt *t = gw_ipt_new();
    struct addr a, b, c;
    const struct sockaddr *pa = v4(&a, "203.0.113.1");
    const struct sockaddr *pb = v4(&b, "203.0.113.2");
    const struct sockaddr *pc = v4(&c, "203.0.113.3");

    assert_non_null(t);
    /* 3 per minute; each tunnel closes at once so only the rate counts */
    for (int i = 0; i < 3; i++) {
        assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 3, T0 + (uint64_t)i), GW_IPT_OK);
        gw_ipt_tunnel_release(t, pa);
    }
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 3, T0 + 3), GW_IPT_RATE);
    /* just before the minute is up */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 3, T0 + MIN_MS - 1), GW_IPT_RATE);
    /* exactly at 60 s after the window's first upgrade: a new window */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 3, T0 + MIN_MS), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 3, T0 + MIN_MS), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 3, T0 + 2 * MIN_MS - 1), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 3, T0 + 2 * MIN_MS - 1), GW_IPT_RATE);

    /* just after the minute */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pb, 0, 1, T0), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pb, 0, 1, T0 + MIN_MS - 1), GW_IPT_RATE);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pb, 0, 1, T0 + MIN_MS + 1), GW_IPT_OK);
    /* the new window started at that upgrade, not at the old window's end */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pb, 0, 1, T0 + 2 * MIN_MS), GW_IPT_RATE);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pb, 0, 1, T0 + 2 * MIN_MS + 1), GW_IPT_OK);

    /* refused upgrades (either reason) are not counted in the window */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pc, 1, 3, T0), GW_IPT_OK);
    for (int i = 0; i < 10; i++)
        assert_int_equal(gw_ipt_tunnel_acquire(t, pc, 1, 3, T0 + 1), GW_IPT_TOO_MANY);
    gw_ipt_tunnel_release(t, pc);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pc, 1, 3, T0 + 2), GW_IPT_OK);
    gw_ipt_tunnel_release(t, pc);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pc, 1, 3, T0 + 3), GW_IPT_OK);
    /* the rate is checked before the tunnel count */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pc, 1, 3, T0 + 4), GW_IPT_RATE);
    gw_ipt_tunnel_release(t, pc);
    for (int i = 0; i < 10; i++)
        assert_int_equal(gw_ipt_tunnel_acquire(t, pc, 1, 3, T0 + 5), GW_IPT_RATE);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pc, 1, 3, T0 + MIN_MS), GW_IPT_OK);
    assert_int_equal(gw_ipt_count(t), 3);
    gw_ipt_free(t);
}

/* Reconnecting (release, entry still there) never resets the minute. */
static void test_rate_survives_release(void **state)
{
    struct gw_ipt *t = gw_ipt_new();
    struct addr a;
    const struct sockaddr *pa = v4(&a, "198.51.100.1");

    assert_non_null(t);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 2, T0), GW_IPT_OK);
    assert_true(gw_ipt_conn_acquire(t, pa, 0));
    gw_ipt_tunnel_release(t, pa);
    gw_ipt_conn_release(t, pa);
    assert_int_equal(gw_ipt_count(t), 1); /* kept for its rate window */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 2, T0 + 10), GW_IPT_OK);
    gw_ipt_tunnel_release(t, pa);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 2, T0 + 20), GW_IPT_RATE);
    /* a sweep inside the window keeps it */
    gw_ipt_sweep(t, T0 + MIN_MS - 1);
    assert_int_equal(gw_ipt_count(t), 1);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 2, T0 + MIN_MS - 1), GW_IPT_RATE);
    gw_ipt_free(t);
}

/* /presence calls: a window of their own per address, swept like the others,
 * refusals not counted, 0 = no limit and no entry. */
static void test_presence_window(void **state)
{
    struct gw_ipt *t = gw_ipt_new();
    struct addr a, b;
    const struct sockaddr *pa = v4(&a, "203.0.113.7");
    const struct sockaddr *pb = v4(&b, "203.0.113.8");

    (void)state;
    assert_true(gw_ipt_presence_hit(t, pa, 0, T0));
    assert_int_equal(gw_ipt_count(t), 0);
    for (int i = 0; i < 3; i++)
        assert_true(gw_ipt_presence_hit(t, pa, 3, T0 + (uint64_t)i));
    assert_false(gw_ipt_presence_hit(t, pa, 3, T0 + 10));
    assert_false(gw_ipt_presence_hit(t, pa, 3, T0 + MIN_MS - 1));
    assert_true(gw_ipt_presence_hit(t, pb, 3, T0 + 10)); /* another address */
    /* the window does not interfere with the tunnel one, nor connections */
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 1, 1, T0 + 20), GW_IPT_OK);
    gw_ipt_tunnel_release(t, pa);
    assert_true(gw_ipt_conn_acquire(t, pa, 1));
    gw_ipt_conn_release(t, pa);
    /* an entry with a live window survives the sweep, then goes */
    gw_ipt_sweep(t, T0 + MIN_MS - 1);
    assert_int_equal(gw_ipt_count(t), 2);
    assert_true(gw_ipt_presence_hit(t, pa, 3, T0 + MIN_MS)); /* a new minute */
    gw_ipt_sweep(t, T0 + 3 * MIN_MS);
    assert_int_equal(gw_ipt_count(t), 0);
    gw_ipt_free(t);
}

static void test_sweep(void **state)
{
    struct gw_ipt *t = gw_ipt_new();
    struct addr a, b, c, d;
    const struct sockaddr *pa = v4(&a, "192.0.2.10"); /* rate window only */
    const struct sockaddr *pb = v4(&b, "192.0.2.11"); /* open connection */
    const struct sockaddr *pc = v4(&c, "192.0.2.12"); /* open tunnel */
    const struct sockaddr *pd = v6(&d, "2001:db8::12"); /* window, later start */

    assert_non_null(t);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 10, T0), GW_IPT_OK);
    gw_ipt_tunnel_release(t, pa);
    assert_true(gw_ipt_conn_acquire(t, pb, 0));
    assert_int_equal(gw_ipt_tunnel_acquire(t, pc, 0, 10, T0), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pd, 0, 10, T0 + 1000), GW_IPT_OK);
    gw_ipt_tunnel_release(t, pd);
    assert_int_equal(gw_ipt_count(t), 4);

    gw_ipt_sweep(t, T0 + 1000);
    assert_int_equal(gw_ipt_count(t), 4);
    gw_ipt_sweep(t, T0 + MIN_MS - 1);
    assert_int_equal(gw_ipt_count(t), 4);
    /* a's window is over; d's is not (it started 1 s later) */
    gw_ipt_sweep(t, T0 + MIN_MS);
    assert_int_equal(gw_ipt_count(t), 3);
    gw_ipt_sweep(t, T0 + MIN_MS + 999);
    assert_int_equal(gw_ipt_count(t), 3);
    gw_ipt_sweep(t, T0 + MIN_MS + 1000);
    assert_int_equal(gw_ipt_count(t), 2);
    /* anything still open is never swept */
    gw_ipt_sweep(t, T0 + 1000 * MIN_MS);
    assert_int_equal(gw_ipt_count(t), 2);
    /* a's entry was really dropped: a fresh window for it */
    for (int i = 0; i < 10; i++)
        assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 10, T0 + MIN_MS + 2000), GW_IPT_OK);
    assert_int_equal(gw_ipt_tunnel_acquire(t, pa, 0, 10, T0 + MIN_MS + 2000), GW_IPT_RATE);
    assert_int_equal(gw_ipt_count(t), 3);
    /* closed tunnel: the entry stays until a sweep after its window */
    gw_ipt_tunnel_release(t, pc);
    assert_int_equal(gw_ipt_count(t), 3);
    gw_ipt_sweep(t, T0 + 1000 * MIN_MS);
    assert_int_equal(gw_ipt_count(t), 2); /* c gone, a still open, b open */
    gw_ipt_conn_release(t, pb);
    assert_int_equal(gw_ipt_count(t), 1);
    gw_ipt_free(t);
}

/* 10,000 addresses: growth keeps every count, releases and a sweep empty it. */
static void test_many(void **state)
{
    enum { N = 10000 };
    struct gw_ipt *t = gw_ipt_new();
    struct addr a;

    assert_non_null(t);
    for (uint32_t i = 0; i < N; i++)
        assert_true(gw_ipt_conn_acquire(t, v4_n(&a, (i * 7919u) & 0xffffffu), 1));
    assert_int_equal(gw_ipt_count(t), N);
    /* after all the growing, each address is still at its limit */
    for (uint32_t i = 0; i < N; i++)
        assert_false(gw_ipt_conn_acquire(t, v4_n(&a, (i * 7919u) & 0xffffffu), 1));
    for (uint32_t i = 0; i < N; i++)
        assert_int_equal(gw_ipt_tunnel_acquire(t, v4_n(&a, (i * 7919u) & 0xffffffu), 1, 5, T0 + i),
                         GW_IPT_OK);
    for (uint32_t i = 0; i < N; i++)
        assert_int_equal(gw_ipt_tunnel_acquire(t, v4_n(&a, (i * 7919u) & 0xffffffu), 1, 5, T0 + N),
                         GW_IPT_TOO_MANY);
    for (uint32_t i = 0; i < N; i++) {
        gw_ipt_conn_release(t, v4_n(&a, (i * 7919u) & 0xffffffu));
        gw_ipt_tunnel_release(t, v4_n(&a, (i * 7919u) & 0xffffffu));
    }
    assert_int_equal(gw_ipt_count(t), N); /* rate windows still open */
    gw_ipt_sweep(t, T0 + MIN_MS - 1);
    assert_int_equal(gw_ipt_count(t), N);
    /* the windows started at T0 + i: half of them are over at T0 + 60 s + N/2 */
    gw_ipt_sweep(t, T0 + MIN_MS + N / 2 - 1);
    assert_int_equal(gw_ipt_count(t), N / 2);
    gw_ipt_sweep(t, T0 + MIN_MS + N - 1);
    assert_int_equal(gw_ipt_count(t), 0);
    /* the emptied table still works */
    assert_true(gw_ipt_conn_acquire(t, v4_n(&a, 1), 1));
    assert_int_equal(gw_ipt_count(t), 1);
    gw_ipt_free(t);
}

/* Out of memory: creation fails cleanly; a new address that cannot get an
 * entry proceeds only where there is no limit to enforce; a failed growth
 * keeps the table working. */
static void test_oom(void **state)
{
    struct gw_ipt *t;
    struct addr a;
    unsigned long fails = 0;

    for (unsigned long n = 1;; n++) {
        alloc_fail_arm(n);
        t = gw_ipt_new();
        bool fired = alloc_fail_fired();
        size_t live = alloc_fail_live();
        alloc_fail_disarm();
        if (!fired)
            break;
        fails++;
        assert_null(t);
        assert_int_equal(live, 0);
    }
    assert_non_null(t);
    assert_int_equal(fails, 2); /* the table, its buckets */

    alloc_fail_arm_from(1);
    assert_false(gw_ipt_conn_acquire(t, v4_n(&a, 1), 5));
    assert_true(gw_ipt_conn_acquire(t, v4_n(&a, 1), 0));
    assert_int_equal(gw_ipt_tunnel_acquire(t, v4_n(&a, 1), 5, 0, T0), GW_IPT_TOO_MANY);
    assert_int_equal(gw_ipt_tunnel_acquire(t, v4_n(&a, 1), 0, 5, T0), GW_IPT_TOO_MANY);
    assert_int_equal(gw_ipt_tunnel_acquire(t, v4_n(&a, 1), 0, 0, T0), GW_IPT_OK);
    alloc_fail_disarm();
    assert_int_equal(gw_ipt_count(t), 0);

    /* 512 entries fill 256 buckets two deep; the 513th grows, which fails */
    for (uint32_t i = 0; i < 512; i++)
        assert_true(gw_ipt_conn_acquire(t, v4_n(&a, i), 1));
    alloc_fail_arm(1); /* the bucket array; the entry itself succeeds */
    assert_true(gw_ipt_conn_acquire(t, v4_n(&a, 512), 1));
    assert_true(alloc_fail_fired());
    alloc_fail_disarm();
    assert_int_equal(gw_ipt_count(t), 513);
    for (uint32_t i = 0; i <= 512; i++)
        assert_false(gw_ipt_conn_acquire(t, v4_n(&a, i), 1));
    /* later growth succeeds and keeps everything */
    for (uint32_t i = 513; i < 3000; i++)
        assert_true(gw_ipt_conn_acquire(t, v4_n(&a, i), 1));
    for (uint32_t i = 0; i < 3000; i++)
        assert_false(gw_ipt_conn_acquire(t, v4_n(&a, i), 1));
    for (uint32_t i = 0; i < 3000; i++)
        gw_ipt_conn_release(t, v4_n(&a, i));
    assert_int_equal(gw_ipt_count(t), 0);
    gw_ipt_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conn_limit),
        cmocka_unit_test(test_conn_unlimited),
        cmocka_unit_test(test_v4_mapped),
        cmocka_unit_test(test_tunnel_max),
        cmocka_unit_test(test_tunnel_rate_window),
        cmocka_unit_test(test_rate_survives_release),
        cmocka_unit_test(test_presence_window),
        cmocka_unit_test(test_sweep),
        cmocka_unit_test(test_many),
        cmocka_unit_test(test_oom),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
