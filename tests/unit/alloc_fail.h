/* Allocation-failure injection for unit tests. A test executable linked with
 * ALLOC_FAIL_LINK_ARGS (tests/unit/meson.build: alloc_fail_link_args) sends
 * every malloc/calloc/realloc/strdup/strndup/free made by the code compiled
 * into it (its own files and the static common library; not shared libraries)
 * through the wrappers in alloc_fail.c. alloc_fail_hook_libevent() routes
 * libevent's allocations there too (call it before anything else touches
 * libevent).
 *
 * Walking every allocation of an operation, as nghttp2's failmalloc test does:
 *
 *     for (unsigned long n = 1;; n++) {
 *         alloc_fail_arm(n);             // the n-th allocation from now fails
 *         obj = thing_new(...);
 *         bool fired = alloc_fail_fired();
 *         alloc_fail_disarm();
 *         if (!fired)
 *             break;                     // n is past the last allocation
 *         assert_null(obj);
 *         assert_int_equal(alloc_fail_live(), 0); // nothing leaked
 *     }
 *
 * alloc_fail_live() counts the blocks allocated through the wrappers since the
 * last arm/track call and not freed since, so leaks show in a release build
 * too (the ASan build reports them as well). */
#ifndef ALLOC_FAIL_H
#define ALLOC_FAIL_H

#include <stdbool.h>
#include <stddef.h>

/* The nth allocation from now (1-based) fails, once; later ones succeed.
 * Also restarts the counters and live-block tracking. */
void alloc_fail_arm(unsigned long nth);
/* As alloc_fail_arm, but the nth and every later allocation fail. */
void alloc_fail_arm_from(unsigned long nth);
/* Restarts counters and live-block tracking without failing anything. */
void alloc_fail_track(void);
/* Stops failing and tracking (counters keep their values). */
void alloc_fail_disarm(void);

/* Whether an injected failure happened since the last arm. */
bool alloc_fail_fired(void);
/* Allocation calls seen since the last arm/track (failed ones included). */
unsigned long alloc_fail_seen(void);
/* Blocks allocated since the last arm/track and not freed yet. */
size_t alloc_fail_live(void);
/* Whether p is one of those blocks. */
bool alloc_fail_is_live(const void *p);

/* Makes libevent allocate through the wrappers (event_set_mem_functions). */
void alloc_fail_hook_libevent(void);

/* The linker's --wrap names (declared for -Wmissing-prototypes). */
void *__real_malloc(size_t n);
void *__real_calloc(size_t nmemb, size_t n);
void *__real_realloc(void *p, size_t n);
void __real_free(void *p);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t nmemb, size_t n);
void *__wrap_realloc(void *p, size_t n);
void __wrap_free(void *p);
char *__wrap_strdup(const char *s);
char *__wrap_strndup(const char *s, size_t n);

#endif
