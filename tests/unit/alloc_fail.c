/* Allocation-failure injection; see alloc_fail.h. Test-harness state lives at
 * file scope here on purpose: the linker's wrappers have no context to carry
 * it. Live blocks are kept in a small array (a window sees tens of them),
 * stored complemented so that LeakSanitizer does not take the array for a
 * reference and still reports a leaked block. */
#include "alloc_fail.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#define LIVE_MAX 65536

static struct {
    unsigned long seen;     /* allocation calls since arm/track */
    unsigned long nth;      /* the call that fails; 0 = none */
    bool from;              /* every call from nth on fails */
    bool fired;             /* an injected failure happened */
    bool tracking;          /* record live blocks */
    size_t nlive;
    uintptr_t live[LIVE_MAX]; /* ~address of blocks allocated while tracking */
} af;

static void restart(unsigned long nth, bool from)
{
    af.seen = 0;
    af.nth = nth;
    af.from = from;
    af.fired = false;
    af.tracking = true;
    af.nlive = 0;
}

void alloc_fail_arm(unsigned long nth)
{
    restart(nth, false);
}

void alloc_fail_arm_from(unsigned long nth)
{
    restart(nth, true);
}

void alloc_fail_track(void)
{
    restart(0, false);
}

void alloc_fail_disarm(void)
{
    af.nth = 0;
    af.from = false;
    af.tracking = false;
}

bool alloc_fail_fired(void)
{
    return af.fired;
}

unsigned long alloc_fail_seen(void)
{
    return af.seen;
}

size_t alloc_fail_live(void)
{
    return af.nlive;
}

bool alloc_fail_is_live(const void *p)
{
    for (size_t i = 0; i < af.nlive; i++) {
        if (af.live[i] == ~(uintptr_t)p)
            return true;
    }
    return false;
}

/* Counts one allocation call; true if it is to fail. */
static bool should_fail(void)
{
    af.seen++;
    if (af.nth != 0 && (af.seen == af.nth || (af.from && af.seen > af.nth))) {
        af.fired = true;
        return true;
    }
    return false;
}

static void live_add(void *p)
{
    if (!af.tracking || p == NULL)
        return;
    if (af.nlive == LIVE_MAX) {
        fprintf(stderr, "alloc_fail: more than %d live blocks tracked\n", LIVE_MAX);
        abort();
    }
    af.live[af.nlive++] = ~(uintptr_t)p;
}

static void live_del(void *p)
{
    if (p == NULL)
        return;
    for (size_t i = af.nlive; i-- > 0;) {
        if (af.live[i] == ~(uintptr_t)p) {
            af.live[i] = af.live[--af.nlive];
            return;
        }
    }
}

void *__wrap_malloc(size_t n)
{
    void *p;

    if (should_fail())
        return NULL;
    p = __real_malloc(n);
    live_add(p);
    return p;
}

void *__wrap_calloc(size_t nmemb, size_t n)
{
    void *p;

    if (should_fail())
        return NULL;
    p = __real_calloc(nmemb, n);
    live_add(p);
    return p;
}

void *__wrap_realloc(void *old, size_t n)
{
    void *p;

    if (should_fail())
        return NULL;
    p = __real_realloc(old, n);
    if (p != NULL || n == 0)
        live_del(old);
    live_add(p);
    return p;
}

void __wrap_free(void *p)
{
    live_del(p);
    __real_free(p);
}

char *__wrap_strdup(const char *s)
{
    size_t n = strlen(s);
    char *d = __wrap_malloc(n + 1);

    if (d != NULL)
        memcpy(d, s, n + 1);
    return d;
}

char *__wrap_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *d = __wrap_malloc(len + 1);

    if (d != NULL) {
        memcpy(d, s, len);
        d[len] = '\0';
    }
    return d;
}

void alloc_fail_hook_libevent(void)
{
    event_set_mem_functions(__wrap_malloc, __wrap_realloc, __wrap_free);
}
