/* Unit tests for common/h2mem: the counts, which blocks get a mapping of
 * their own and how much of it is resident (mincore), the pages given back
 * after a send, the table of mappings through growth and deletion, and two
 * nghttp2 sessions on it: one resident page each while idle, large header
 * blocks carried intact twice, every byte returned at the end. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>
#include <nghttp2/nghttp2.h>

#include "h2mem.h"

/* Pages of [p, p + len) in memory: mincore over the whole pages it spans. */
static size_t resident_pages(const void *p, size_t len)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)p / pg * pg;
    uintptr_t hi = ((uintptr_t)p + len + pg - 1) / pg * pg;
    size_t n = (hi - lo) / pg;
    unsigned char vec[64];
    size_t in = 0;

    assert_true(n <= sizeof(vec));
    assert_int_equal(mincore((void *)lo, hi - lo, vec), 0);
    for (size_t i = 0; i < n; i++)
        in += vec[i] & 1;
    return in;
}

static void test_counts_and_kinds(void **state)
{
    struct h2mem m;
    nghttp2_mem *mem;
    uint8_t *small;
    uint8_t *big;
    uint8_t *z;

    (void)state;
    h2mem_init(&m);
    mem = h2mem_get(&m);
    small = mem->malloc(100, mem->mem_user_data);
    assert_non_null(small);
    assert_int_equal(m.live_bytes, 100);
    assert_int_equal(m.mapped_blocks, 0);
    memset(small, 0xab, 100);
    /* small to big: moves into a mapping, bytes kept */
    big = mem->realloc(small, 16394, mem->mem_user_data);
    assert_non_null(big);
    assert_int_equal(m.live_bytes, 16394);
    assert_int_equal(m.mapped_blocks, 1);
    assert_int_equal(m.mapped_bytes, 16394);
    for (int i = 0; i < 100; i++)
        assert_int_equal(big[i], 0xab);
    /* a mapping starts at its first byte: only the page copied into is in */
    assert_int_equal((uintptr_t)big % (uintptr_t)sysconf(_SC_PAGESIZE), 0);
    assert_int_equal(resident_pages(big, 16394), 1);
    assert_int_equal(h2mem_resident_pages(&m), 1);
    /* big to small: back on the heap */
    small = mem->realloc(big, 50, mem->mem_user_data);
    assert_non_null(small);
    assert_int_equal(m.live_bytes, 50);
    assert_int_equal(m.mapped_blocks, 0);
    assert_int_equal(small[49], 0xab);
    /* a zeroed mapping nobody wrote costs no page */
    z = mem->calloc(1, 4096, mem->mem_user_data);
    assert_non_null(z);
    assert_int_equal(m.mapped_blocks, 1);
    assert_int_equal(h2mem_resident_pages(&m), 0);
    mem->free(z, mem->mem_user_data);
    z = mem->calloc(3, 8192, mem->mem_user_data);
    assert_non_null(z);
    assert_int_equal(m.mapped_blocks, 1);
    for (size_t i = 0; i < 3 * 8192; i++)
        assert_int_equal(z[i], 0);
    assert_null(mem->calloc(SIZE_MAX / 2, 4, mem->mem_user_data));
    mem->free(z, mem->mem_user_data);
    mem->free(small, mem->mem_user_data);
    mem->free(NULL, mem->mem_user_data);
    assert_int_equal(m.live_bytes, 0);
    assert_int_equal(m.mapped_bytes, 0);
    assert_int_equal(m.mapped_blocks, 0);
    h2mem_cleanup(&m);
}

/* Many mappings and heap blocks freed in a scrambled order: the table grows,
 * deletes without losing the entries after a removed one, and no heap block
 * is ever page-aligned (that is what tells the kinds apart). */
static void test_many(void **state)
{
    enum { N = 600 };
    static void *big[N];
    static void *small[N];
    struct h2mem m;
    nghttp2_mem *mem;
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);

    (void)state;
    h2mem_init(&m);
    mem = h2mem_get(&m);
    for (size_t i = 0; i < N; i++) {
        big[i] = mem->malloc(4096 + i, mem->mem_user_data);
        small[i] = mem->malloc(1 + i % 300, mem->mem_user_data);
        assert_non_null(big[i]);
        assert_non_null(small[i]);
        assert_int_not_equal((uintptr_t)small[i] % pg, 0);
        ((char *)big[i])[4095 + i] = 7;
    }
    assert_int_equal(m.mapped_blocks, N);
    for (size_t k = 0; k < N; k++) {
        size_t i = (k * 337) % N; /* 337 is prime to N: every i once */
        /* a realloc first: the block must be found by its address */
        big[i] = mem->realloc(big[i], 5000 + i, mem->mem_user_data);
        assert_non_null(big[i]);
        assert_int_equal(((char *)big[i])[4095 + i], 7);
        mem->free(big[i], mem->mem_user_data);
        mem->free(small[i], mem->mem_user_data);
    }
    assert_int_equal(m.mapped_blocks, 0);
    assert_int_equal(m.live_bytes, 0);
    h2mem_cleanup(&m);
}

static void test_discard(void **state)
{
    struct h2mem m;
    nghttp2_mem *mem;
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    uint8_t *b;

    (void)state;
    h2mem_init(&m);
    mem = h2mem_get(&m);
    b = mem->malloc(5 * pg, mem->mem_user_data);
    assert_non_null(b);
    memset(b, 0x5a, 5 * pg);
    assert_true(resident_pages(b, 5 * pg) >= 5);
    /* under a page: nothing */
    h2mem_discard(&m, b + 10, pg - 1);
    assert_int_equal(m.discarded_pages, 0);
    /* the pages wholly inside go; the partial ones at either end stay */
    h2mem_discard(&m, b + 10, 4 * pg);
    assert_int_equal(m.discarded_pages, 3);
    assert_int_equal(b[9], 0x5a);
    assert_int_equal(b[4 * pg + 9], 0x5a);
    assert_int_equal(resident_pages(b, 16), 1);
    /* a discarded page reads back as zeros and works as memory */
    assert_int_equal(b[2 * pg], 0);
    b[2 * pg] = 1;
    assert_int_equal(b[2 * pg], 1);
    mem->free(b, mem->mem_user_data);
    assert_int_equal(m.live_bytes, 0);
    h2mem_cleanup(&m);
}

/* ---- two sessions on one h2mem, bytes through a buffer ---- */

struct pipe {
    struct h2mem *m;
    uint8_t buf[1 << 18];
    size_t len;
    size_t value_len;     /* the big header's value length seen by the server */
    int value_ok;         /* ... and whether every byte was right */
    int requests;
};

static ssize_t on_send(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *user)
{
    struct pipe *p = user;

    (void)s;
    (void)flags;
    if (len > sizeof(p->buf) - p->len)
        return NGHTTP2_ERR_WOULDBLOCK;
    memcpy(p->buf + p->len, data, len);
    p->len += len;
    h2mem_discard(p->m, data, len); /* as gw_tun_h2 and gw_h2 do */
    return (ssize_t)len;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user)
{
    struct pipe *p = user;

    (void)s;
    (void)f;
    (void)flags;
    if (namelen == 5 && memcmp(name, "x-big", 5) == 0) {
        p->value_len = valuelen;
        p->value_ok = 1;
        for (size_t i = 0; i < valuelen; i++)
            if (value[i] != (uint8_t)('a' + i % 26))
                p->value_ok = 0;
        p->requests++;
    }
    return 0;
}

static void pump(nghttp2_session *from, struct pipe *pf, nghttp2_session *to)
{
    assert_int_equal(nghttp2_session_send(from), 0);
    assert_int_equal(nghttp2_session_mem_recv(to, pf->buf, pf->len), (ssize_t)pf->len);
    pf->len = 0;
}

static void test_sessions(void **state)
{
    static struct pipe cp, sp; /* client's output, server's output */
    struct h2mem m;
    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    nghttp2_session *cl;
    nghttp2_session *sv;
    static char big[40000];
    nghttp2_nv nv[] = {
        {(uint8_t *)":method", (uint8_t *)"GET", 7, 3, 0},
        {(uint8_t *)":scheme", (uint8_t *)"https", 7, 5, 0},
        {(uint8_t *)":authority", (uint8_t *)"x", 10, 1, 0},
        {(uint8_t *)":path", (uint8_t *)"/", 5, 1, 0},
        /* never indexed: the second request sends it whole again */
        {(uint8_t *)"x-big", (uint8_t *)big, 5, sizeof(big), NGHTTP2_NV_FLAG_NO_INDEX},
    };

    (void)state;
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (char)('a' + i % 26);
    h2mem_init(&m);
    cp.m = sp.m = &m;
    assert_int_equal(nghttp2_session_callbacks_new(&cbs), 0);
    nghttp2_session_callbacks_set_send_callback(cbs, on_send);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    assert_int_equal(nghttp2_option_new(&opt), 0);
    nghttp2_option_set_max_send_header_block_length(opt, 1u << 20);
    assert_int_equal(nghttp2_session_client_new3(&cl, cbs, &cp, opt, h2mem_get(&m)), 0);
    assert_int_equal(nghttp2_session_server_new3(&sv, cbs, &sp, opt, h2mem_get(&m)), 0);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    /* each session's frame buffer is a mapping of its own */
    assert_true(m.mapped_blocks >= 2);
    assert_true(m.mapped_bytes >= 2 * 16384);
    nghttp2_settings_entry iv = {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 1u << 20};
    assert_int_equal(nghttp2_submit_settings(cl, NGHTTP2_FLAG_NONE, &iv, 1), 0);
    assert_int_equal(nghttp2_submit_settings(sv, NGHTTP2_FLAG_NONE, &iv, 1), 0);
    pump(cl, &cp, sv);
    pump(sv, &sp, cl);
    pump(cl, &cp, sv);
    /* idle after the SETTINGS exchange: each session's frame buffer has one
     * page in memory, its stream table none */
    assert_int_equal(h2mem_resident_pages(&m), 2);
    for (int round = 1; round <= 2; round++) {
        uint64_t before = m.discarded_pages;
        assert_true(nghttp2_submit_request(cl, NULL, nv, sizeof(nv) / sizeof(nv[0]), NULL,
                                           NULL) > 0);
        pump(cl, &cp, sv);
        assert_int_equal(sp.requests, round);
        assert_int_equal(sp.value_len, sizeof(big));
        assert_true(sp.value_ok);
        /* the header block went through the client's frame buffer, and the
         * pages it reached were given back */
        assert_true(m.discarded_pages > before);
        pump(sv, &sp, cl);
    }
    nghttp2_session_del(cl);
    nghttp2_session_del(sv);
    assert_int_equal(m.live_bytes, 0);
    assert_int_equal(m.mapped_blocks, 0);
    h2mem_cleanup(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counts_and_kinds),
        cmocka_unit_test(test_discard),
        cmocka_unit_test(test_many),
        cmocka_unit_test(test_sessions),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
