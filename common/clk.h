/* Time and randomness as a value, reached through each program's context, so
 * that routing, registries, per-IP accounting and rate limits can be unit
 * tested with a fake clock and a scripted random source. clk_system is the
 * real one (monotonic clock, wall clock, the OS CSPRNG); it is const. */
#ifndef CLK_H
#define CLK_H

#include <stddef.h>
#include <stdint.h>

struct clk {
    uint64_t (*mono_ms)(void *arg);                       /* monotonic milliseconds */
    int64_t (*unix_s)(void *arg);                         /* wall-clock seconds */
    int (*rand_bytes)(void *arg, uint8_t *buf, size_t n); /* 0, or -1 on failure */
    void *arg;
};

extern const struct clk clk_system;

static inline uint64_t clk_mono_ms(const struct clk *c)
{
    return c->mono_ms(c->arg);
}

static inline int64_t clk_unix_s(const struct clk *c)
{
    return c->unix_s(c->arg);
}

static inline int clk_rand(const struct clk *c, uint8_t *buf, size_t n)
{
    return c->rand_bytes(c->arg, buf, n);
}

/* A fixed-window rate limit: at most limit hits per window_ms. */
struct rate_win {
    uint64_t start_ms; /* start of the current window */
    uint32_t count;    /* hits counted in it */
};

/* Counts a hit at now_ms; returns 1 if it is within the limit, 0 if over it
 * (an over-limit hit is not counted). limit 0 means no limit. */
int rate_win_hit(struct rate_win *w, uint64_t now_ms, uint64_t window_ms, uint32_t limit);

#endif
