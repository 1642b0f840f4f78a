/* Unit tests for common/clk: the fixed-window rate limit with a fake clock
 * (time is the now_ms argument), and the system clock's basic contract. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "clk.h"

#define WIN 60000u
#define T0 1000000u /* any start; the window follows the first hit */

static void test_unlimited(void **state)
{
    struct rate_win w = {0};

    for (uint64_t i = 0; i < 100000; i++)
        assert_int_equal(rate_win_hit(&w, T0 + i % 7, WIN, 0), 1);
    /* limit 0 counts nothing */
    assert_int_equal(w.count, 0);
    assert_int_equal(w.start_ms, 0);
}

static void test_exact_limit(void **state)
{
    struct rate_win w = {0};

    for (uint32_t i = 0; i < 5; i++) {
        assert_int_equal(rate_win_hit(&w, T0 + i, WIN, 5), 1);
        assert_int_equal(w.count, i + 1);
    }
    assert_int_equal(w.start_ms, T0);
    assert_int_equal(rate_win_hit(&w, T0 + 10, WIN, 5), 0);
    assert_int_equal(w.count, 5);
    /* limit 1: one hit, then refusal */
    struct rate_win w1 = {0};
    assert_int_equal(rate_win_hit(&w1, T0, WIN, 1), 1);
    assert_int_equal(rate_win_hit(&w1, T0, WIN, 1), 0);
    assert_int_equal(w1.count, 1);
}

static void test_window_boundary(void **state)
{
    struct rate_win w = {0};

    for (int i = 0; i < 3; i++)
        assert_int_equal(rate_win_hit(&w, T0, WIN, 3), 1);
    /* just before the end of the window: still refused */
    assert_int_equal(rate_win_hit(&w, T0 + WIN - 1, WIN, 3), 0);
    assert_int_equal(w.start_ms, T0);
    /* exactly window_ms after its start: a new window */
    assert_int_equal(rate_win_hit(&w, T0 + WIN, WIN, 3), 1);
    assert_int_equal(w.start_ms, T0 + WIN);
    assert_int_equal(w.count, 1);
    assert_int_equal(rate_win_hit(&w, T0 + WIN, WIN, 3), 1);
    assert_int_equal(rate_win_hit(&w, T0 + 2 * WIN - 1, WIN, 3), 1);
    assert_int_equal(rate_win_hit(&w, T0 + 2 * WIN - 1, WIN, 3), 0);
    /* just after a window: new one starting at that hit, not at the old edge */
    assert_int_equal(rate_win_hit(&w, T0 + 2 * WIN + 1, WIN, 3), 1);
    assert_int_equal(w.start_ms, T0 + 2 * WIN + 1);
    assert_int_equal(w.count, 1);
    /* a long pause: new window */
    assert_int_equal(rate_win_hit(&w, T0 + 100 * WIN, WIN, 3), 1);
    assert_int_equal(w.start_ms, T0 + 100 * WIN);
    assert_int_equal(w.count, 1);
}

/* The window follows the first hit even when that comes early on the clock. */
static void test_first_hit_starts_window(void **state)
{
    struct rate_win w = {0};

    assert_int_equal(rate_win_hit(&w, 30000, WIN, 1), 1);
    assert_int_equal(w.start_ms, 30000);
    assert_int_equal(rate_win_hit(&w, 60000, WIN, 1), 0);
    assert_int_equal(rate_win_hit(&w, 89999, WIN, 1), 0);
    assert_int_equal(rate_win_hit(&w, 90000, WIN, 1), 1);
    /* time 0 is a valid start */
    struct rate_win z = {0};
    assert_int_equal(rate_win_hit(&z, 0, WIN, 2), 1);
    assert_int_equal(rate_win_hit(&z, 0, WIN, 2), 1);
    assert_int_equal(rate_win_hit(&z, WIN - 1, WIN, 2), 0);
    assert_int_equal(rate_win_hit(&z, WIN, WIN, 2), 1);
}

static void test_clock_backwards(void **state)
{
    struct rate_win w = {0};

    assert_int_equal(rate_win_hit(&w, T0, WIN, 2), 1);
    assert_int_equal(rate_win_hit(&w, T0, WIN, 2), 1);
    assert_int_equal(rate_win_hit(&w, T0 + 1, WIN, 2), 0);
    /* one millisecond back: a new window from there */
    assert_int_equal(rate_win_hit(&w, T0 - 1, WIN, 2), 1);
    assert_int_equal(w.start_ms, T0 - 1);
    assert_int_equal(w.count, 1);
    assert_int_equal(rate_win_hit(&w, T0 - 1, WIN, 2), 1);
    assert_int_equal(rate_win_hit(&w, T0, WIN, 2), 0);
    /* far back, to 0 */
    assert_int_equal(rate_win_hit(&w, 0, WIN, 2), 1);
    assert_int_equal(w.start_ms, 0);
    assert_int_equal(w.count, 1);
}

static void test_over_limit_not_counted(void **state)
{
    struct rate_win w = {0};

    assert_int_equal(rate_win_hit(&w, T0, WIN, 2), 1);
    assert_int_equal(rate_win_hit(&w, T0, WIN, 2), 1);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(rate_win_hit(&w, T0 + (uint64_t)i, WIN, 2), 0);
    assert_int_equal(w.count, 2);
    assert_int_equal(w.start_ms, T0);
    /* refusals did not extend or refill the window */
    assert_int_equal(rate_win_hit(&w, T0 + WIN, WIN, 2), 1);
    assert_int_equal(w.count, 1);
    assert_int_equal(rate_win_hit(&w, T0 + WIN, WIN, 2), 1);
    assert_int_equal(rate_win_hit(&w, T0 + WIN, WIN, 2), 0);
    /* a larger limit on the same window counts on from where it was */
    assert_int_equal(rate_win_hit(&w, T0 + WIN, WIN, 3), 1);
    assert_int_equal(w.count, 3);
}

static void test_extremes(void **state)
{
    struct rate_win w = {0};

    /* near the end of the clock's range, no overflow in now - start */
    assert_int_equal(rate_win_hit(&w, UINT64_MAX - 10, WIN, 1), 1);
    assert_int_equal(rate_win_hit(&w, UINT64_MAX, WIN, 1), 0);
    /* window 0: every hit starts a new window */
    struct rate_win z = {0};
    for (int i = 0; i < 10; i++)
        assert_int_equal(rate_win_hit(&z, T0, 0, 1), 1);
    assert_int_equal(z.count, 1);
    /* the largest limit */
    struct rate_win m = {.start_ms = T0, .count = UINT32_MAX - 1};
    assert_int_equal(rate_win_hit(&m, T0, WIN, UINT32_MAX), 1);
    assert_int_equal(m.count, UINT32_MAX);
    assert_int_equal(rate_win_hit(&m, T0, WIN, UINT32_MAX), 0);
    assert_int_equal(m.count, UINT32_MAX);
}

/* A scripted clock through struct clk: the accessors pass arg through. */
struct fake {
    uint64_t mono;
    int64_t unix_s;
    uint8_t next;
};

static uint64_t fake_mono(void *arg)
{
    return ((struct fake *)arg)->mono;
}

static int64_t fake_unix(void *arg)
{
    return ((struct fake *)arg)->unix_s;
}

static int fake_rand(void *arg, uint8_t *buf, size_t n)
{
    struct fake *f = arg;

    for (size_t i = 0; i < n; i++)
        buf[i] = f->next++;
    return n > 64 ? -1 : 0;
}

static void test_clk_accessors(void **state)
{
    struct fake f = {.mono = 123456789, .unix_s = 1700000000, .next = 7};
    const struct clk c = {fake_mono, fake_unix, fake_rand, &f};
    uint8_t buf[4];

    assert_int_equal(clk_mono_ms(&c), 123456789);
    f.mono += 5;
    assert_int_equal(clk_mono_ms(&c), 123456794);
    assert_int_equal(clk_unix_s(&c), 1700000000);
    assert_int_equal(clk_rand(&c, buf, sizeof(buf)), 0);
    assert_int_equal(buf[0], 7);
    assert_int_equal(buf[3], 10);
    uint8_t big[65];
    assert_int_equal(clk_rand(&c, big, sizeof(big)), -1);

    /* the system clock: monotonic, a plausible wall clock, random bytes */
    uint64_t a = clk_mono_ms(&clk_system);
    uint64_t b = clk_mono_ms(&clk_system);
    assert_true(b >= a);
    assert_true(clk_unix_s(&clk_system) > 1600000000);
    uint8_t r1[32], r2[32];
    assert_int_equal(clk_rand(&clk_system, r1, sizeof(r1)), 0);
    assert_int_equal(clk_rand(&clk_system, r2, sizeof(r2)), 0);
    assert_memory_not_equal(r1, r2, sizeof(r1));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unlimited),
        cmocka_unit_test(test_exact_limit),
        cmocka_unit_test(test_window_boundary),
        cmocka_unit_test(test_first_hit_starts_window),
        cmocka_unit_test(test_clock_backwards),
        cmocka_unit_test(test_over_limit_not_counted),
        cmocka_unit_test(test_extremes),
        cmocka_unit_test(test_clk_accessors),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
