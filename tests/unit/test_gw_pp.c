/* Unit tests for gateway/gw_pp: the PROXY protocol v2 header parser. Headers
 * are built here byte by byte from HAProxy's proxy-protocol.txt (2.2). */
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

#include "gw_pp.h"

static const uint8_t sig[12] = "\r\n\r\n\0\r\nQUIT\n";

/* A header: version 2, cmd, fam, then the block (addresses and TLVs). */
static size_t build(uint8_t *out, uint8_t cmd, uint8_t fam, const uint8_t *block, size_t blen)
{
    memcpy(out, sig, 12);
    out[12] = (uint8_t)(0x20 | cmd);
    out[13] = fam;
    out[14] = (uint8_t)(blen >> 8);
    out[15] = (uint8_t)blen;
    if (blen > 0)
        memcpy(out + 16, block, blen);
    return 16 + blen;
}

static const uint8_t tcp4_block[12] = {203, 0, 113, 7, 10, 0, 0, 1, 0xc3, 0x50, 0x01, 0xbb};

/* Feeds h one byte more at a time: every prefix says "more", with a want
 * that never reaches past the header; the whole says done. */
static int parse_by_prefixes(const uint8_t *h, size_t n, struct gw_pp_hdr *out, const char **why)
{
    size_t want = 0;

    for (size_t i = 0; i < n; i++) {
        int rc = gw_pp_parse(h, i, &want, out, why);
        if (rc != 0)
            return rc;
        if (!(want > i && want <= (n > GW_PP_HEAD ? n : GW_PP_HEAD)))
            fail_msg("prefix %zu of %zu: want %zu", i, n, want);
    }
    return gw_pp_parse(h, n, &want, out, why) == 1 && want == n ? 1 : -1;
}

static void test_tcp4(void **state)
{
    uint8_t h[64];
    struct gw_pp_hdr out;
    const char *why;
    size_t n = build(h, 1, 0x11, tcp4_block, sizeof(tcp4_block));
    const struct sockaddr_in *sin = (const struct sockaddr_in *)&out.src;
    char ip[INET_ADDRSTRLEN];

    (void)state;
    assert_int_equal(parse_by_prefixes(h, n, &out, &why), 1);
    assert_int_equal(out.srclen, sizeof(struct sockaddr_in));
    assert_int_equal(sin->sin_family, AF_INET);
    assert_string_equal(inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip)), "203.0.113.7");
    assert_int_equal(ntohs(sin->sin_port), 50000);
}

static void test_tcp6_with_tlvs(void **state)
{
    uint8_t block[36 + 5 + 3 + 5], h[128];
    struct gw_pp_hdr out;
    const char *why;
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&out.src;
    char ip[INET6_ADDRSTRLEN];
    size_t n;

    (void)state;
    memset(block, 0, sizeof(block));
    assert_int_equal(inet_pton(AF_INET6, "2001:db8::42", block), 1);
    block[32] = 0x1f; /* source port 8080 */
    block[33] = 0x90;
    /* ALPN "h2", an empty NOOP, then a 2-byte unique id */
    memcpy(block + 36, "\x01\x00\x02h2", 5);
    memcpy(block + 41, "\x04\x00\x00", 3);
    memcpy(block + 44, "\x05\x00\x02id", 5);
    n = build(h, 1, 0x21, block, sizeof(block));
    assert_int_equal(parse_by_prefixes(h, n, &out, &why), 1);
    assert_int_equal(sin6->sin6_family, AF_INET6);
    assert_string_equal(inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip)), "2001:db8::42");
    assert_int_equal(ntohs(sin6->sin6_port), 8080);
}

static void test_local_and_unspec_keep_the_peer(void **state)
{
    uint8_t h[64];
    struct gw_pp_hdr out;
    const char *why;
    size_t n;

    (void)state;
    n = build(h, 0, 0x00, NULL, 0); /* LOCAL: a balancer's health check */
    assert_int_equal(parse_by_prefixes(h, n, &out, &why), 1);
    assert_int_equal(out.srclen, 0);
    n = build(h, 0, 0x11, tcp4_block, sizeof(tcp4_block)); /* LOCAL: the block is ignored */
    assert_int_equal(parse_by_prefixes(h, n, &out, &why), 1);
    assert_int_equal(out.srclen, 0);
    n = build(h, 1, 0x00, NULL, 0); /* PROXY UNSPEC */
    assert_int_equal(parse_by_prefixes(h, n, &out, &why), 1);
    assert_int_equal(out.srclen, 0);
}

static void expect_refused(const uint8_t *h, size_t n, const char *what)
{
    struct gw_pp_hdr out;
    const char *why = NULL;

    assert_int_equal(parse_by_prefixes(h, n, &out, &why), -1);
    assert_non_null(why);
    assert_string_equal(why, what);
}

static void test_refusals(void **state)
{
    uint8_t h[GW_PP_MAX + 64], block[GW_PP_MAX];
    size_t n;

    (void)state;
    memset(block, 0, sizeof(block));
    expect_refused((const uint8_t *)"GET / HTTP/1.1\r\n\r\n", 18, "no_proxy_header");
    expect_refused((const uint8_t *)"\x16\x03\x01\x02\x00\x01", 6, "no_proxy_header");
    expect_refused((const uint8_t *)"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 32,
                   "proxy_v1_not_accepted");
    n = build(h, 1, 0x11, tcp4_block, sizeof(tcp4_block));
    h[12] = 0x11; /* version 1 in the binary form */
    expect_refused(h, n, "bad_version");
    h[12] = 0x22; /* command 2 */
    expect_refused(h, n, "bad_command");
    expect_refused(h, build(h, 1, 0x12, tcp4_block, sizeof(tcp4_block)), "unsupported_family");
    expect_refused(h, build(h, 1, 0x11, tcp4_block, 11), "short_address_block");
    expect_refused(h, build(h, 1, 0x21, tcp4_block, 12), "short_address_block");
    memcpy(block, tcp4_block, 12);
    memcpy(block + 12, "\x01\x00\x05h2", 5); /* a TLV longer than what is left */
    expect_refused(h, build(h, 1, 0x11, block, 17), "bad_tlv");
    memcpy(block + 12, "\x01\x00", 2); /* a TLV cut in its header */
    expect_refused(h, build(h, 1, 0x11, block, 14), "bad_tlv");
    memset(block + 12, 0, sizeof(block) - 12);
    expect_refused(h, build(h, 1, 0x11, block, GW_PP_MAX - 16 + 1), "header_too_long");
    /* the longest accepted: TLVs filling GW_PP_MAX exactly */
    block[12] = 0x04;
    block[13] = (uint8_t)((GW_PP_MAX - 16 - 12 - 3) >> 8);
    block[14] = (uint8_t)(GW_PP_MAX - 16 - 12 - 3);
    n = build(h, 1, 0x11, block, GW_PP_MAX - 16);
    {
        struct gw_pp_hdr out;
        const char *why;
        size_t want;

        assert_int_equal(gw_pp_parse(h, n, &want, &out, &why), 1);
        assert_int_equal(want, GW_PP_MAX);
        /* a byte past the header is the caller's mistake, refused */
        assert_int_equal(gw_pp_parse(h, n + 1, &want, &out, &why), -1);
        assert_string_equal(why, "bytes_past_header");
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tcp4),
        cmocka_unit_test(test_tcp6_with_tlvs),
        cmocka_unit_test(test_local_and_unspec_keep_the_peer),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
