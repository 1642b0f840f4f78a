/* Unit tests for agent/ag_insp_ring, the inspector's capture ring: the bound
 * on finished entries (active ones are never evicted), body truncation,
 * header budgets, masking in the JSON views, clear, list paging and the
 * memory accounting (back to 0 once everything is freed). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "ag_insp_ring.h"

static const struct ag_insp_origin origin = {"hook", "00000000-0000-4000-8000-000000000000",
                                             "0x0123456789abcdef0123456789abcdef01234567", 0};

static struct ag_insp_ent *begin(struct ag_insp_ring *r, const char *path)
{
    struct ag_fwd_hdr h[3] = {
        {IOV_LIT("content-type"), IOV_LIT("application/json")},
        {IOV_LIT("authorization"), IOV_LIT("Bearer sekrit")},
        {IOV_LIT("x-forwarded-for"), IOV_LIT("203.0.113.7, 10.0.0.1")},
    };
    struct ag_fwd_request rq = {
        .method = IOV_LIT("POST"),
        .path = {path, strlen(path)},
        .authority = IOV_LIT("0xabc.example.com"),
        .hdrs = h,
        .nhdrs = 3,
        .has_body = true,
    };
    struct ag_insp_ent *e = ag_insp_ring_begin(r, &rq, &origin, 1700000000000, 1000);

    assert_non_null(e);
    return e;
}

static void finish(struct ag_insp_ring *r, struct ag_insp_ent *e)
{
    nghttp2_nv nv[1] = {{(uint8_t *)"set-cookie", (uint8_t *)"a=1", 10, 3, 0}};

    ag_insp_ring_resp_head(r, e, 200, nv, 1, 1005);
    ag_insp_ring_resp_body(r, e, (const uint8_t *)"ok", 2);
    ag_insp_ring_end(r, e, NULL, 1010);
    ag_insp_ring_trim(r);
}

static void test_bound(void **state)
{
    struct ag_insp_ring *r = ag_insp_ring_new(3, 1024);
    char path[32];

    assert_non_null(r);
    for (int i = 1; i <= 10; i++) {
        snprintf(path, sizeof(path), "/p%d", i);
        finish(r, begin(r, path));
    }
    assert_int_equal(ag_insp_ring_count(r), 3);
    assert_null(ag_insp_ring_find(r, 7));
    assert_non_null(ag_insp_ring_find(r, 8));
    assert_string_equal(ag_insp_ring_find(r, 10)->path, "/p10");
    assert_true(ag_insp_ring_mem(r) > 0);
    assert_true(ag_insp_ring_mem(r) <= ag_insp_ring_mem_limit(r));
    ag_insp_ring_clear(r);
    assert_int_equal(ag_insp_ring_count(r), 0);
    assert_int_equal(ag_insp_ring_mem(r), 0);
    ag_insp_ring_free(r);
}

static void test_active_never_evicted(void **state)
{
    struct ag_insp_ring *r = ag_insp_ring_new(2, 1024);
    struct ag_insp_ent *live = begin(r, "/sse");

    for (int i = 0; i < 5; i++)
        finish(r, begin(r, "/x"));
    assert_int_equal(ag_insp_ring_count(r), 3); /* 2 finished + the live one */
    assert_ptr_equal(ag_insp_ring_find(r, live->id), live);
    ag_insp_ring_resp_body(r, live, (const uint8_t *)"data: 1\n\n", 9);
    ag_insp_ring_clear(r); /* keeps the live one */
    assert_int_equal(ag_insp_ring_count(r), 1);
    finish(r, begin(r, "/y"));
    finish(r, begin(r, "/z"));
    /* ending the oldest-begun one past the bound frees it at once */
    ag_insp_ring_end(r, live, "cancelled", 2000);
    assert_int_equal(ag_insp_ring_count(r), 3); /* ended, not yet trimmed */
    assert_string_equal(live->err, "cancelled");
    ag_insp_ring_trim(r);
    assert_int_equal(ag_insp_ring_count(r), 2);
    assert_null(ag_insp_ring_find(r, 1));
    ag_insp_ring_free(r);
}

static void test_body_truncation(void **state)
{
    struct ag_insp_ring *r = ag_insp_ring_new(4, 10);
    struct ag_insp_ent *e = begin(r, "/up");

    ag_insp_ring_req_body(r, e, (const uint8_t *)"abcd", 4);
    ag_insp_ring_req_body(r, e, (const uint8_t *)"efgh", 4);
    assert_false(e->req_body.truncated);
    ag_insp_ring_req_body(r, e, (const uint8_t *)"ijkl", 4);
    assert_true(e->req_body.truncated);
    assert_int_equal(e->req_body.len, 10);
    assert_int_equal(e->req_body.total, 12);
    assert_memory_equal(e->req_body.data, "abcdefghij", 10);
    assert_true(e->req_body.cap <= 10);
    ag_insp_ring_req_body(r, e, (const uint8_t *)"m", 1);
    assert_int_equal(e->req_body.total, 13);
    finish(r, e);
    ag_insp_ring_free(r);
}

static void test_zero_body_bytes(void **state)
{
    struct ag_insp_ring *r = ag_insp_ring_new(1, 0);
    struct ag_insp_ent *e = begin(r, "/n");

    ag_insp_ring_req_body(r, e, (const uint8_t *)"x", 1);
    assert_true(e->req_body.truncated);
    assert_int_equal(e->req_body.len, 0);
    assert_null(e->req_body.data);
    finish(r, e);
    ag_insp_ring_free(r);
}

static void test_header_budget(void **state)
{
    struct ag_insp_ring *r = ag_insp_ring_new(1, 0);
    char *big = malloc(AG_INSP_HDR_BYTES);
    struct ag_fwd_hdr h[2];
    struct ag_fwd_request rq = {.method = IOV_LIT("GET"), .path = IOV_LIT("/"), .hdrs = h,
                                .nhdrs = 2};
    struct ag_insp_ent *e;

    assert_non_null(big);
    memset(big, 'v', AG_INSP_HDR_BYTES);
    h[0] = (struct ag_fwd_hdr){IOV_LIT("a"), IOV_LIT("1")};
    h[1] = (struct ag_fwd_hdr){IOV_LIT("b"), {big, AG_INSP_HDR_BYTES}};
    e = ag_insp_ring_begin(r, &rq, &origin, 0, 0);
    assert_non_null(e);
    assert_int_equal(e->req_hdrs.n, 1);
    assert_true(e->req_hdrs.truncated);
    assert_string_equal(e->client, "");
    ag_insp_ring_end(r, e, NULL, 0);
    free(big);
    ag_insp_ring_free(r);
}

static const cJSON *find_hdr(const cJSON *d, const char *side, const char *name)
{
    const cJSON *hs = cJSON_GetObjectItem(cJSON_GetObjectItem(d, side), "headers");
    const cJSON *h;

    cJSON_ArrayForEach(h, hs)
    {
        if (strcmp(cJSON_GetObjectItem(h, "name")->valuestring, name) == 0)
            return h;
    }
    return NULL;
}

static void test_json_masking(void **state)
{
    struct ag_insp_ring *r = ag_insp_ring_new(2, 64);
    struct ag_insp_ent *e = begin(r, "/hook?q=1");
    cJSON *d, *v, *s;
    char *text;

    ag_insp_ring_req_body(r, e, (const uint8_t *)"{\"a\":1}", 7);
    finish(r, e);
    assert_string_equal(e->client, "203.0.113.7");
    d = ag_insp_ring_detail_json(e, false);
    assert_non_null(d);
    text = cJSON_PrintUnformatted(d);
    assert_null(strstr(text, "sekrit"));
    assert_null(strstr(text, "a=1\""));
    free(text);
    assert_string_equal(cJSON_GetObjectItem(find_hdr(d, "request", "authorization"), "value")
                            ->valuestring,
                        "********");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(find_hdr(d, "request", "authorization"),
                                                 "masked")));
    assert_string_equal(cJSON_GetObjectItem(find_hdr(d, "request", "content-type"), "value")
                            ->valuestring,
                        "application/json");
    assert_string_equal(
        cJSON_GetObjectItem(find_hdr(d, "response", "set-cookie"), "value")->valuestring,
        "********");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(d, "request"),
                                                                "body"),
                                            "b64")
                            ->valuestring,
                        "eyJhIjoxfQ==");
    assert_int_equal(cJSON_GetObjectItem(d, "status")->valueint, 200);
    assert_int_equal(cJSON_GetObjectItem(d, "head_ms")->valueint, 5);
    assert_int_equal(cJSON_GetObjectItem(d, "total_ms")->valueint, 10);
    cJSON_Delete(d);
    v = ag_insp_ring_detail_json(e, true);
    assert_string_equal(cJSON_GetObjectItem(find_hdr(v, "request", "authorization"), "value")
                            ->valuestring,
                        "Bearer sekrit");
    cJSON_Delete(v);
    s = ag_insp_ring_stats_json(r);
    assert_int_equal(cJSON_GetObjectItem(s, "entries")->valueint, 1);
    cJSON_Delete(s);
    assert_true(ag_insp_ring_is_secret("Cookie", 6));
    assert_true(ag_insp_ring_is_secret("PROXY-AUTHORIZATION", 19));
    assert_false(ag_insp_ring_is_secret("cookies", 7));
    ag_insp_ring_free(r);
}

static void test_list_paging(void **state)
{
    struct ag_insp_ring *r = ag_insp_ring_new(10, 0);
    cJSON *l;

    for (int i = 0; i < 6; i++)
        finish(r, begin(r, "/l"));
    l = ag_insp_ring_list_json(r, 2, 100);
    assert_int_equal(cJSON_GetArraySize(l), 4);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(l, 0), "id")->valueint, 3);
    cJSON_Delete(l);
    l = ag_insp_ring_list_json(r, 0, 2); /* the newest two */
    assert_int_equal(cJSON_GetArraySize(l), 2);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(l, 0), "id")->valueint, 5);
    cJSON_Delete(l);
    ag_insp_ring_free(r);
}

static size_t ws_stream(uint8_t *b)
{
    size_t n = 0;

    /* a masked text "hi" (FIN) */
    memcpy(b + n, "\x81\x82\x01\x02\x03\x04\x69\x6b", 8);
    n += 8;
    /* a binary message in two fragments, a ping between them */
    {
        static const uint8_t frag[] = {0x02, 0x03, 'a', 'b', 'c', 0x89, 0x00, 0x80, 0x02, 'd', 'e'};
        memcpy(b + n, frag, sizeof(frag));
        n += sizeof(frag);
    }
    /* 16-bit length: 256 bytes */
    memcpy(b + n, "\x82\x7e\x01\x00", 4);
    n += 4;
    memset(b + n, 'x', 256);
    n += 256;
    /* 64-bit length: 70000 bytes, unmasked */
    memcpy(b + n, "\x82\x7f\x00\x00\x00\x00\x00\x01\x11\x70", 10);
    n += 10;
    memset(b + n, 'y', 70000);
    n += 70000;
    /* a close frame */
    memcpy(b + n, "\x88\x02\x03\xe8", 4);
    n += 4;
    return n;
}

static void test_ws_counts(void **state)
{
    uint8_t *b = malloc(80000);
    struct ag_insp_wsc one = {0}, bytewise = {0};
    size_t n;

    assert_non_null(b);
    n = ws_stream(b);
    ag_insp_ring_ws_feed(&one, b, n);
    for (size_t i = 0; i < n; i++)
        ag_insp_ring_ws_feed(&bytewise, b + i, 1);
    for (int k = 0; k < 2; k++) {
        const struct ag_insp_wsc *w = k == 0 ? &one : &bytewise;
        assert_int_equal(w->frames, 7);
        assert_int_equal(w->messages, 4); /* text, fragmented binary, 256, 70000 */
        assert_int_equal(w->left, 0);
        assert_int_equal(w->hlen, 0);
    }
    free(b);
}

static void test_save_restore(void **state)
{
    struct ag_insp_ring *r = ag_insp_ring_new(4, 64);
    struct ag_insp_ring *r2 = ag_insp_ring_new(4, 64);
    struct ag_insp_ent *e = begin(r, "/saved?x=1");
    cJSON *saved, *d1, *d2;
    char *text, *t1, *t2;
    size_t before;

    ag_insp_ring_req_body(r, e, (const uint8_t *)"{\"a\":1}", 7);
    finish(r, e);
    saved = ag_insp_ring_save_json(e);
    assert_non_null(saved);
    text = cJSON_PrintUnformatted(saved);
    assert_non_null(strstr(text, "Bearer sekrit")); /* saved as it was */
    assert_null(strstr(text, "b64"));                /* bodies are saved alongside */
    assert_int_equal(ag_insp_ring_restore(r2, text, strlen(text), e->req_body.data,
                                          e->req_body.len, e->resp_body.data, e->resp_body.len),
                     0);
    d1 = ag_insp_ring_detail_json(e, true);
    d2 = ag_insp_ring_detail_json(ag_insp_ring_find(r2, e->id), true);
    t1 = cJSON_PrintUnformatted(d1);
    t2 = cJSON_PrintUnformatted(d2);
    assert_string_equal(t1, t2);
    /* the same id again, junk, and a body longer than its total are refused */
    before = ag_insp_ring_mem(r2);
    assert_int_equal(ag_insp_ring_restore(r2, text, strlen(text), NULL, 0, NULL, 0), -1);
    assert_int_equal(ag_insp_ring_restore(r2, "{\"id\":9}", 8, NULL, 0, NULL, 0), -1);
    assert_int_equal(ag_insp_ring_restore(r2, "[", 1, NULL, 0, NULL, 0), -1);
    assert_int_equal(ag_insp_ring_count(r2), 1);
    assert_int_equal(ag_insp_ring_mem(r2), before);
    /* new entries number on after the restored one */
    finish(r2, begin(r2, "/next"));
    assert_non_null(ag_insp_ring_find(r2, e->id + 1));
    free(t1);
    free(t2);
    cJSON_Delete(d1);
    cJSON_Delete(d2);
    free(text);
    cJSON_Delete(saved);
    ag_insp_ring_free(r);
    ag_insp_ring_free(r2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bound),          cmocka_unit_test(test_active_never_evicted),
        cmocka_unit_test(test_body_truncation), cmocka_unit_test(test_zero_body_bytes),
        cmocka_unit_test(test_header_budget),   cmocka_unit_test(test_json_masking),
        cmocka_unit_test(test_list_paging),    cmocka_unit_test(test_ws_counts),
        cmocka_unit_test(test_save_restore),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
