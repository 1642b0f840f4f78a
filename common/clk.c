/* The system clock and the fixed-window rate limit; see clk.h. */
#include "clk.h"

#include "util.h"

static uint64_t sys_mono_ms(void *arg)
{
    (void)arg;
    return util_mono_ms();
}

static int64_t sys_unix_s(void *arg)
{
    (void)arg;
    return util_unix_time();
}

static int sys_rand(void *arg, uint8_t *buf, size_t n)
{
    (void)arg;
    return util_rand_bytes(buf, n);
}

const struct clk clk_system = {sys_mono_ms, sys_unix_s, sys_rand, NULL};

int rate_win_hit(struct rate_win *w, uint64_t now_ms, uint64_t window_ms, uint32_t limit)
{
    if (limit == 0)
        return 1;
    if (w->count == 0 || now_ms < w->start_ms || now_ms - w->start_ms >= window_ms) {
        w->start_ms = now_ms;
        w->count = 0;
    }
    if (w->count >= limit)
        return 0;
    w->count++;
    return 1;
}
