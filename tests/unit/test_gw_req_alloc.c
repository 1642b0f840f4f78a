/* Allocation failures in gateway/gw_req: every allocation of gw_req_new()
 * (the request, its body evbuffer, its timer: libevent allocates through
 * alloc_fail too) and of gw_hdrs_add() is failed in turn. A failed call
 * returns NULL / -1, leaks nothing (alloc_fail_live, and ASan's leak check)
 * and leaves what it was given as it was. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cmocka.h>
#include <event2/event.h>

#include "alloc_fail.h"
#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_req.h"

static struct {
    struct gw_cfg cfg;
    struct gw_ctx ctx;
} g;

static void fe_error(struct gw_req *r, enum herr e)
{
    fail_msg("fe->error called (%d)", (int)e);
}

static const struct gw_fe_ops fe_ops = {.error = fe_error};

static int group_setup(void **state)
{
    char *argv[] = {"tunnel-gateway", "--domain", "example.com", "--trust-proxy",
                    "10.0.0.0/8", NULL};
    char err[512];

    /* before libevent allocates anything */
    alloc_fail_hook_libevent();
    unsetenv("TUNNEL_GATEWAY_CONFIG");
    if (gw_cfg_load(&g.cfg, 5, argv, err, sizeof(err)) != 0) {
        fprintf(stderr, "gw_cfg_load: %s\n", err);
        return -1;
    }
    g.ctx.base = event_base_new();
    if (g.ctx.base == NULL)
        return -1;
    g.ctx.cfg = &g.cfg;
    g.ctx.clk = &clk_system;
    return 0;
}

static int group_teardown(void **state)
{
    event_base_free(g.ctx.base);
    gw_cfg_cleanup(&g.cfg);
    return 0;
}

static void test_req_new(void **state)
{
    struct gw_req *r;
    unsigned long fails = 0;
    uint64_t id0 = g.ctx.next_id;

    for (unsigned long n = 1;; n++) {
        alloc_fail_arm(n);
        r = gw_req_new(&g.ctx, &fe_ops, NULL, 1, "https");
        bool fired = alloc_fail_fired();
        size_t live = alloc_fail_live();
        alloc_fail_disarm();
        if (!fired)
            break;
        fails++;
        if (r != NULL)
            fail_msg("allocation %lu failed, gw_req_new returned a request", n);
        if (live != 0)
            fail_msg("allocation %lu failed: %zu blocks leaked", n, live);
        /* a failed creation takes no id */
        assert_int_equal(g.ctx.next_id, id0);
    }
    assert_non_null(r);
    /* the request, its body buffer, its timer */
    assert_int_equal(fails, 3);
    assert_int_equal(r->id, id0 + 1);

    /* and what a successful one allocated, gw_req_free() gives back */
    gw_req_free(r);
    alloc_fail_track();
    r = gw_req_new(&g.ctx, &fe_ops, NULL, 1, "https");
    assert_non_null(r);
    assert_int_equal(alloc_fail_seen(), 3);
    assert_int_equal(alloc_fail_live(), 3);
    r->authority = strdup("example.com");
    r->method = strdup("GET");
    assert_int_equal(gw_hdrs_add(&r->hdrs, "A", 1, "b", 1, 0), 0);
    assert_int_equal(alloc_fail_live(), 8);
    gw_req_free(r);
    assert_int_equal(alloc_fail_live(), 0);
    alloc_fail_disarm();
}

/* A request that owns everything gw_req_free() frees, built under failure:
 * whatever step failed, freeing it leaks nothing. */
static void test_req_build_and_free(void **state)
{
    for (unsigned long n = 1;; n++) {
        alloc_fail_arm(n);
        struct gw_req *r = gw_req_new(&g.ctx, &fe_ops, NULL, 2, "https");
        if (r != NULL) {
            r->method = strdup("POST");
            r->path = strdup("/x?y=1");
            r->authority = strdup("0x00112233445566778899aabbccddeeff0a1b2c3d.example.com");
            r->protocol = strdup("websocket");
            (void)gw_hdrs_add(&r->hdrs, "X-Forwarded-Host", 16, "a.test", 6, 0);
            (void)gw_hdrs_add(&r->hdrs, "Content-Type", 12, "text/plain", 10, 0);
            struct sockaddr_in sin = {.sin_family = AF_INET};
            sin.sin_addr.s_addr = htonl(0x0a000001);
            gw_req_set_peer(r, (const struct sockaddr *)&sin); /* strdup of fwd_host */
            gw_req_route(r);
        }
        bool fired = alloc_fail_fired();
        gw_req_free(r);
        size_t live = alloc_fail_live();
        alloc_fail_disarm();
        if (live != 0)
            fail_msg("allocation %lu failed: %zu blocks leaked", n, live);
        if (!fired) {
            /* 3 (request) + 4 strdup + 3 + 2 (headers) + 1 (X-Forwarded-Host) */
            assert_int_equal(alloc_fail_seen(), 13);
            break;
        }
    }
}

/* X-Forwarded-Host's copy failing leaves fwd_host NULL (the authority is
 * forwarded instead), nothing else changes. */
static void test_set_peer_fwd_host(void **state)
{
    struct gw_req *r = gw_req_new(&g.ctx, &fe_ops, NULL, 3, "https");
    struct sockaddr_in sin = {.sin_family = AF_INET};

    assert_non_null(r);
    sin.sin_addr.s_addr = htonl(0x0a000001);
    assert_int_equal(gw_hdrs_add(&r->hdrs, "x-forwarded-for", 15, "1.2.3.4", 7, 0), 0);
    assert_int_equal(gw_hdrs_add(&r->hdrs, "x-forwarded-host", 16, "a.test", 6, 0), 0);
    alloc_fail_arm_from(1);
    gw_req_set_peer(r, (const struct sockaddr *)&sin);
    assert_true(alloc_fail_fired());
    alloc_fail_disarm();
    assert_null(r->fwd_host);
    assert_string_equal(r->client_ip, "1.2.3.4");
    gw_req_set_peer(r, (const struct sockaddr *)&sin);
    assert_string_equal(r->fwd_host, "a.test");
    gw_req_free(r);
}

/* The list as it was: n entries name<i>/value<i>, bytes. */
static void check_list(const struct gw_hdrs *h, size_t n, size_t bytes)
{
    char name[32], value[32];

    assert_int_equal(h->n, n);
    assert_int_equal(h->bytes, bytes);
    assert_true(h->cap >= h->n);
    for (size_t i = 0; i < n; i++) {
        snprintf(name, sizeof(name), "name-%zu", i);
        snprintf(value, sizeof(value), "Value %zu", i);
        assert_int_equal(h->nv[i].namelen, strlen(name));
        assert_int_equal(h->nv[i].valuelen, strlen(value));
        assert_string_equal((const char *)h->nv[i].name, name);
        assert_string_equal((const char *)h->nv[i].value, value);
        assert_ptr_equal(gw_hdrs_get(h, name), &h->nv[i]);
    }
}

/* A list of k entries, name-<i> / Value <i>; returns its byte count. */
static size_t fill(struct gw_hdrs *h, size_t k)
{
    char name[32], value[32];
    size_t bytes = 0;

    for (size_t i = 0; i < k; i++) {
        int nl = snprintf(name, sizeof(name), "Name-%zu", i);
        int vl = snprintf(value, sizeof(value), "Value %zu", i);
        assert_int_equal(gw_hdrs_add(h, name, (size_t)nl, value, (size_t)vl, 0), 0);
        bytes += (size_t)(nl + vl);
    }
    check_list(h, k, bytes);
    return bytes;
}

/* On a list of k entries, fails each allocation of one more add in turn (a
 * fresh list each time). */
static void hdrs_case(size_t k, unsigned long want_fails)
{
    char name[32], value[32];
    unsigned long fails = 0;
    int nl = snprintf(name, sizeof(name), "NAME-%zu", k);
    int vl = snprintf(value, sizeof(value), "Value %zu", k);
    char lname[32];

    snprintf(lname, sizeof(lname), "name-%zu", k);
    for (unsigned long n = 1;; n++) {
        struct gw_hdrs h = {0};
        size_t bytes = fill(&h, k);
        const nghttp2_nv *nv_before = h.nv;

        alloc_fail_arm(n);
        int rv = gw_hdrs_add(&h, name, (size_t)nl, value, (size_t)vl, 0);
        bool fired = alloc_fail_fired();
        size_t live = alloc_fail_live();
        bool grown_live = h.nv != nv_before && alloc_fail_is_live(h.nv);
        alloc_fail_disarm();
        if (!fired) {
            assert_int_equal(rv, 0);
            check_list(&h, k + 1, bytes + (size_t)(nl + vl));
            assert_string_equal((const char *)h.nv[k].name, lname);
            gw_hdrs_cleanup(&h);
            assert_null(h.nv);
            assert_int_equal(h.n, 0);
            assert_int_equal(h.cap, 0);
            assert_int_equal(h.bytes, 0);
            break;
        }
        fails++;
        assert_int_equal(rv, -1);
        check_list(&h, k, bytes);
        assert_null(gw_hdrs_get(&h, lname));
        /* nothing leaked; a grown array is the list's own (it keeps it) */
        if (live != 0 && !(live == 1 && grown_live))
            fail_msg("k=%zu, allocation %lu failed: %zu blocks leaked", k, n, live);
        /* still usable */
        assert_int_equal(gw_hdrs_add(&h, name, (size_t)nl, value, (size_t)vl, 0), 0);
        check_list(&h, k + 1, bytes + (size_t)(nl + vl));
        gw_hdrs_cleanup(&h);
    }
    assert_int_equal(fails, want_fails);
}

static void test_hdrs_add(void **state)
{
    hdrs_case(0, 3);  /* array, name, value */
    hdrs_case(1, 2);  /* name, value */
    hdrs_case(15, 2);
    hdrs_case(16, 3); /* the array grows past 16 */
    hdrs_case(17, 2);
    hdrs_case(32, 3);
}

/* Over the byte limit allocates nothing and changes nothing. */
static void test_hdrs_limit(void **state)
{
    struct gw_hdrs h = {0};

    assert_int_equal(gw_hdrs_add(&h, "Name-0", 6, "Value 0", 7, 20), 0);
    alloc_fail_arm_from(1);
    assert_int_equal(gw_hdrs_add(&h, "abc", 3, "12345678", 8, 20), -2);
    assert_int_equal(gw_hdrs_add(&h, "a", 1, "12345678901234567890", 20, 20), -2);
    assert_false(alloc_fail_fired());
    alloc_fail_disarm();
    check_list(&h, 1, 13);
    /* exactly at the limit fits */
    assert_int_equal(gw_hdrs_add(&h, "abc", 3, "1234", 4, 20), 0);
    assert_int_equal(h.bytes, 20);
    assert_int_equal(gw_hdrs_add(&h, "", 0, "", 0, 20), 0);
    assert_int_equal(gw_hdrs_add(&h, "x", 1, "", 0, 20), -2);
    gw_hdrs_cleanup(&h);
    gw_hdrs_cleanup(&h); /* twice is safe */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_req_new),
        cmocka_unit_test(test_req_build_and_free),
        cmocka_unit_test(test_set_peer_fwd_host),
        cmocka_unit_test(test_hdrs_add),
        cmocka_unit_test(test_hdrs_limit),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
