/* Unit tests for gateway/gw_req's routing by host (gw_req_route) and its
 * forwarding-header trust (gw_req_set_peer), on requests made with
 * gw_req_new() against a context holding a real loaded configuration:
 * --domain example.com --trust-proxy 10.0.0.0/8,127.0.0.1/32. */
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
#include <sys/socket.h>

#include <cmocka.h>
#include <event2/event.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_req.h"

#define FAKE_NOW_MS 5000000u

static struct {
    struct gw_cfg cfg;
    struct clk clk;
    struct gw_ctx ctx;
} g;

static uint64_t fake_mono(void *arg)
{
    return FAKE_NOW_MS;
}

static int64_t fake_unix(void *arg)
{
    return 1700000000;
}

static int fake_rand(void *arg, uint8_t *buf, size_t n)
{
    memset(buf, 0x5a, n);
    return 0;
}

static void fe_error(struct gw_req *r, enum herr e)
{
    fail_msg("fe->error called (%d)", (int)e);
}

static const struct gw_fe_ops fe_ops = {.error = fe_error};

static int group_setup(void **state)
{
    char *argv[] = {"tunnel-gateway", "--domain", "example.com", "--trust-proxy",
                    "10.0.0.0/8,127.0.0.1/32", NULL};
    char err[512];

    unsetenv("TUNNEL_GATEWAY_DOMAIN");
    unsetenv("TUNNEL_GATEWAY_TRUST_PROXY");
    unsetenv("TUNNEL_GATEWAY_CONFIG");
    if (gw_cfg_load(&g.cfg, 5, argv, err, sizeof(err)) != 0) {
        fprintf(stderr, "gw_cfg_load: %s\n", err);
        return -1;
    }
    g.clk = (struct clk){fake_mono, fake_unix, fake_rand, NULL};
    g.ctx.base = event_base_new();
    if (g.ctx.base == NULL)
        return -1;
    g.ctx.cfg = &g.cfg;
    g.ctx.clk = &g.clk;
    return 0;
}

static int group_teardown(void **state)
{
    event_base_free(g.ctx.base);
    gw_cfg_cleanup(&g.cfg);
    return 0;
}

static struct gw_req *req_new(const char *scheme)
{
    uint64_t id = g.ctx.next_id;
    struct gw_req *r = gw_req_new(&g.ctx, &fe_ops, NULL, 77, scheme);

    assert_non_null(r);
    assert_int_equal(r->id, id + 1);
    assert_int_equal(r->conn_id, 77);
    assert_int_equal(r->start_ms, FAKE_NOW_MS);
    assert_int_equal(r->resp_timeout_ms, g.cfg.resp_header_timeout_s * 1000u);
    assert_ptr_equal(r->scheme, scheme);
    return r;
}

/* ---- routing ---- */

struct route_result {
    enum gw_route_kind route;
    enum herr err;
    uint8_t addr[ID_ADDR_LEN];
};

static struct route_result route_of(const char *authority)
{
    struct gw_req *r = req_new("https");
    struct route_result res;

    if (authority != NULL) {
        r->authority = strdup(authority);
        assert_non_null(r->authority);
    }
    gw_req_route(r);
    res.route = r->route;
    res.err = r->route_err;
    memcpy(res.addr, r->addr, ID_ADDR_LEN);
    gw_req_free(r);
    return res;
}

static void expect_apex(const char *authority)
{
    struct route_result res = route_of(authority);

    if (res.route != GW_ROUTE_APEX)
        fail_msg("\"%s\": route %d (err %d), not APEX", authority, (int)res.route, (int)res.err);
}

static void expect_error(const char *authority, enum herr want)
{
    struct route_result res = route_of(authority);

    if (res.route != GW_ROUTE_ERROR || res.err != want)
        fail_msg("\"%s\": route %d err %d, not ERROR err %d", authority ? authority : "(null)",
                 (int)res.route, (int)res.err, (int)want);
}

static const char hex40[] = "00112233445566778899aabbccddeeff0a1b2c3d";
static const uint8_t bin20[ID_ADDR_LEN] = {0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66,
                                           0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                                           0xee, 0xff, 0x0a, 0x1b, 0x2c, 0x3d};

static void expect_agent(const char *authority)
{
    struct route_result res = route_of(authority);

    if (res.route != GW_ROUTE_AGENT)
        fail_msg("\"%s\": route %d (err %d), not AGENT", authority, (int)res.route, (int)res.err);
    assert_memory_equal(res.addr, bin20, ID_ADDR_LEN);
}

static void test_route_apex(void **state)
{
    expect_apex("example.com");
    expect_apex("example.com:8443");
    expect_apex("example.com:443");
    expect_apex("example.com.");
    expect_apex("example.com.:8443");
    expect_apex("EXAMPLE.COM");
    expect_apex("Example.Com:80");
    expect_apex("example.com:"); /* an empty port (RFC 3986 3.2.3) */
    expect_apex("[::1]:");
}

static void test_route_agent(void **state)
{
    char host[128];

    snprintf(host, sizeof(host), "0x%s.example.com", hex40);
    expect_agent(host);
    snprintf(host, sizeof(host), "0x%s.example.com:8443", hex40);
    expect_agent(host);
    snprintf(host, sizeof(host), "0x%s.example.com.", hex40);
    expect_agent(host);
    /* EIP-55 mixed case and an uppercase 0X decode the same */
    snprintf(host, sizeof(host), "0X00112233445566778899AaBbCcDdEeFf0A1B2c3D.EXAMPLE.com");
    expect_agent(host);

    /* all zeros and all ones */
    struct route_result res = route_of("0x0000000000000000000000000000000000000000.example.com");
    assert_int_equal(res.route, GW_ROUTE_AGENT);
    static const uint8_t zero[ID_ADDR_LEN] = {0};
    assert_memory_equal(res.addr, zero, ID_ADDR_LEN);
    res = route_of("0xffffffffffffffffffffffffffffffffffffffff.example.com");
    assert_int_equal(res.route, GW_ROUTE_AGENT);
    for (size_t i = 0; i < ID_ADDR_LEN; i++)
        assert_int_equal(res.addr[i], 0xff);
}

static void test_route_bad_label(void **state)
{
    char host[160];

    /* 39 and 41 hex digits */
    snprintf(host, sizeof(host), "0x%.39s.example.com", hex40);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    snprintf(host, sizeof(host), "0x%s0.example.com", hex40);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    /* a non-hex digit */
    snprintf(host, sizeof(host), "0x%.39sg.example.com", hex40);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    /* 42 hex digits, no 0x */
    snprintf(host, sizeof(host), "%s00.example.com", hex40);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    /* 0x in the wrong place */
    snprintf(host, sizeof(host), "x0%s.example.com", hex40);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    snprintf(host, sizeof(host), "1x%s.example.com", hex40);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    snprintf(host, sizeof(host), "00%s.example.com", hex40);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    /* an address under a further label, or with one under it */
    snprintf(host, sizeof(host), "www.0x%s.example.com", hex40);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    snprintf(host, sizeof(host), "0x%.30s.%.10s.example.com", hex40, hex40 + 30);
    expect_error(host, HERR_INVALID_SUBDOMAIN);
    expect_error("www.example.com", HERR_INVALID_SUBDOMAIN);
    expect_error("a.example.com:8443", HERR_INVALID_SUBDOMAIN);
    expect_error("WWW.Example.Com.", HERR_INVALID_SUBDOMAIN);
}

static void test_route_unknown_host(void **state)
{
    char host[160];

    expect_error("example.org", HERR_UNKNOWN_HOST);
    expect_error("localhost", HERR_UNKNOWN_HOST);
    expect_error("localhost:8443", HERR_UNKNOWN_HOST);
    /* the domain as a suffix without a dot is another domain */
    expect_error("notexample.com", HERR_UNKNOWN_HOST);
    snprintf(host, sizeof(host), "0x%sexample.com", hex40);
    expect_error(host, HERR_UNKNOWN_HOST);
    expect_error("example.com.evil.test", HERR_UNKNOWN_HOST);
    expect_error("example.co", HERR_UNKNOWN_HOST);
    expect_error("xample.com", HERR_UNKNOWN_HOST);
    expect_error("com", HERR_UNKNOWN_HOST);
    /* not IP literals */
    expect_error("1.2.3", HERR_UNKNOWN_HOST);
    expect_error("1.2.3.256", HERR_UNKNOWN_HOST);
    expect_error("[zz::1]", HERR_UNKNOWN_HOST);
    expect_error("[]", HERR_UNKNOWN_HOST);
    /* one trailing dot is the same host, two are not */
    expect_error("example.com..", HERR_UNKNOWN_HOST);
}

static void test_route_ip_literal(void **state)
{
    expect_apex("127.0.0.1");
    expect_apex("127.0.0.1:8443");
    expect_apex("10.1.2.3:443");
    expect_apex("[::1]");
    expect_apex("[::1]:8443");
    expect_apex("[2001:db8::1]:443");
    expect_apex("[::ffff:192.0.2.1]");
}

static void test_route_malformed(void **state)
{
    char longhost[400];

    expect_error(NULL, HERR_BAD_REQUEST);
    expect_error("", HERR_BAD_REQUEST);
    expect_error(":8443", HERR_BAD_REQUEST);
    expect_error(":", HERR_BAD_REQUEST);
    expect_error("[::1", HERR_BAD_REQUEST);
    expect_error("[", HERR_BAD_REQUEST);
    /* after the host only ':' and a port of digits up to 65535 (none is allowed) */
    expect_error("[::1]junk", HERR_BAD_REQUEST);
    expect_error("example.com:abc", HERR_BAD_REQUEST);
    expect_error("example.com:65536", HERR_BAD_REQUEST);
    expect_error("example.com:123456", HERR_BAD_REQUEST);
    expect_error("example.com:-1", HERR_BAD_REQUEST);
    expect_error("example.com:80:80", HERR_BAD_REQUEST);
    /* an unbracketed IPv6 literal is host "" with a port */
    expect_error("::1", HERR_BAD_REQUEST);
    /* a host longer than any DNS name */
    memset(longhost, 'a', 300);
    memcpy(longhost + 300, ".example.com", 13);
    expect_error(longhost, HERR_BAD_REQUEST);
}

/* ---- what every upstream can carry (gw_req_check) ---- */

static enum herr check_of(const char *method, const char *path, const char *name,
                          const char *value)
{
    struct gw_req *r = req_new("https");
    enum herr e;

    r->method = strdup(method);
    r->path = strdup(path);
    r->authority = strdup("example.com");
    if (name != NULL)
        assert_int_equal(gw_hdrs_add(&r->hdrs, name, strlen(name), value, strlen(value), 0), 0);
    e = gw_req_check(r);
    gw_req_free(r);
    return e;
}

static void test_req_check(void **state)
{
    static const char *const bad_paths[] = {
        "*", "", "example.com/x", "/a/../b", "/..", "/../", "/.", "/./x", "/a/.",
        "/%2e%2e/x", "/%2E%2e", "/.%2e/x", "/%2e/x", "/a/..?q", "/a\tb", "/a\x0c" "b",
        "/a b", "/a\x7f" "b",
    };
    static const char *const good_paths[] = {
        "/", "/a", "/a/b/", "/...", "/.x", "/x.", "/a..b", "/%2e%2e%2e", "/a?x=/../",
        "/a?q=%2e%2e", "//x", "/%2fx",
    };

    for (size_t i = 0; i < sizeof(bad_paths) / sizeof(bad_paths[0]); i++)
        if (check_of("GET", bad_paths[i], NULL, NULL) != HERR_BAD_REQUEST)
            fail_msg("path \"%s\" accepted", bad_paths[i]);
    for (size_t i = 0; i < sizeof(good_paths) / sizeof(good_paths[0]); i++)
        if (check_of("GET", good_paths[i], NULL, NULL) != HERR_NONE)
            fail_msg("path \"%s\" refused", good_paths[i]);
    assert_int_equal(check_of("G@T", "/", NULL, NULL), HERR_BAD_REQUEST);
    assert_int_equal(check_of("", "/", NULL, NULL), HERR_BAD_REQUEST);
    assert_int_equal(check_of("PROPFIND", "/", NULL, NULL), HERR_NONE);
    assert_int_equal(check_of("GET", "/", "x-ok", "a b\tc"), HERR_NONE);
    assert_int_equal(check_of("GET", "/", "bad name", "v"), HERR_BAD_REQUEST);
    assert_int_equal(check_of("GET", "/", "x-a", "a\x7f"), HERR_BAD_REQUEST); /* a CTL */
    assert_int_equal(check_of("GET", "/", "x-a", "caf\xc3\xa9"), HERR_NONE);  /* obs-text */
    assert_int_equal(check_of("GET", "/", "x-a", " lead"), HERR_BAD_REQUEST);
    assert_int_equal(check_of("GET", "/", "x-a", "a\rb"), HERR_BAD_REQUEST);
}

/* ---- forwarding headers ---- */

struct peer {
    struct sockaddr_storage ss;
};

static const struct sockaddr *peer4(struct peer *p, const char *ip)
{
    struct sockaddr_in *s = (struct sockaddr_in *)&p->ss;

    memset(p, 0, sizeof(*p));
    s->sin_family = AF_INET;
    s->sin_port = htons(40000);
    assert_int_equal(inet_pton(AF_INET, ip, &s->sin_addr), 1);
    return (const struct sockaddr *)&p->ss;
}

static const struct sockaddr *peer6(struct peer *p, const char *ip)
{
    struct sockaddr_in6 *s = (struct sockaddr_in6 *)&p->ss;

    memset(p, 0, sizeof(*p));
    s->sin6_family = AF_INET6;
    s->sin6_port = htons(40000);
    assert_int_equal(inet_pton(AF_INET6, ip, &s->sin6_addr), 1);
    return (const struct sockaddr *)&p->ss;
}

static void add_hdr(struct gw_req *r, const char *name, const char *value)
{
    assert_int_equal(gw_hdrs_add(&r->hdrs, name, strlen(name), value, strlen(value), 0), 0);
}

/* The outcome of gw_req_set_peer for one peer and header set. */
struct fwd {
    char client_ip[INET6_ADDRSTRLEN];
    char chain[512];
    char proto[8];
    char host[300];
    bool has_host;
};

/* hdrs: name, value pairs, NULL-terminated. */
static struct fwd fwd_of(const struct sockaddr *peer, const char *scheme, const char *const *hdrs)
{
    struct gw_req *r = req_new(scheme);
    struct fwd f;

    for (size_t i = 0; hdrs != NULL && hdrs[i] != NULL; i += 2)
        add_hdr(r, hdrs[i], hdrs[i + 1]);
    gw_req_set_peer(r, peer);
    assert_int_equal(r->peer.ss_family, peer->sa_family);
    snprintf(f.client_ip, sizeof(f.client_ip), "%s", r->client_ip);
    snprintf(f.chain, sizeof(f.chain), "%s", r->xff_chain);
    snprintf(f.proto, sizeof(f.proto), "%s", r->fwd_proto);
    f.has_host = r->fwd_host != NULL;
    snprintf(f.host, sizeof(f.host), "%s", r->fwd_host != NULL ? r->fwd_host : "");
    gw_req_free(r);
    return f;
}

/* Client IP and chain the gateway derives from a trusted peer's XFF value. */
static void expect_xff(const char *xff, const char *want_ip, const char *want_chain)
{
    struct peer p;
    const char *h[] = {"X-Forwarded-For", xff, NULL};
    struct fwd f = fwd_of(peer4(&p, "10.0.0.1"), "https", h);

    if (strcmp(f.client_ip, want_ip) != 0 || strcmp(f.chain, want_chain) != 0)
        fail_msg("XFF \"%s\": client \"%s\" chain \"%s\", want \"%s\" \"%s\"", xff, f.client_ip,
                 f.chain, want_ip, want_chain);
}

static void test_untrusted_peer(void **state)
{
    struct peer p;
    const char *h[] = {"X-Forwarded-For", "1.2.3.4", "X-Forwarded-Proto", "http",
                       "X-Forwarded-Host", "evil.test", "X-Real-IP", "5.6.7.8", NULL};
    struct fwd f = fwd_of(peer4(&p, "203.0.113.5"), "https", h);

    assert_string_equal(f.client_ip, "203.0.113.5");
    assert_string_equal(f.chain, "");
    assert_string_equal(f.proto, "https");
    assert_false(f.has_host);

    f = fwd_of(peer4(&p, "203.0.113.5"), "http", h);
    assert_string_equal(f.proto, "http");
    /* just outside the trusted ranges */
    f = fwd_of(peer4(&p, "11.0.0.1"), "https", h);
    assert_string_equal(f.client_ip, "11.0.0.1");
    f = fwd_of(peer4(&p, "127.0.0.2"), "https", h);
    assert_string_equal(f.client_ip, "127.0.0.2");
    assert_false(f.has_host);
    f = fwd_of(peer6(&p, "2001:db8::5"), "https", h);
    assert_string_equal(f.client_ip, "2001:db8::5");
    assert_string_equal(f.chain, "");
    /* IPv6 loopback is not 127.0.0.1/32 */
    f = fwd_of(peer6(&p, "::1"), "https", h);
    assert_string_equal(f.client_ip, "::1");
    assert_false(f.has_host);
}

static void test_trusted_peer_no_headers(void **state)
{
    struct peer p;
    struct fwd f = fwd_of(peer4(&p, "10.0.0.1"), "https", NULL);

    assert_string_equal(f.client_ip, "10.0.0.1");
    assert_string_equal(f.chain, "");
    assert_string_equal(f.proto, "https");
    assert_false(f.has_host);
    f = fwd_of(peer4(&p, "127.0.0.1"), "http", NULL);
    assert_string_equal(f.client_ip, "127.0.0.1");
    assert_string_equal(f.proto, "http");
}

static void test_xff_rightmost_untrusted(void **state)
{
    expect_xff("1.2.3.4", "1.2.3.4", "");
    expect_xff("9.9.9.9, 1.2.3.4", "1.2.3.4", "9.9.9.9");
    expect_xff("9.9.9.9,1.2.3.4", "1.2.3.4", "9.9.9.9");
    /* trusted hops on the right are skipped (real_ip_recursive) */
    expect_xff("1.2.3.4, 10.0.0.7", "1.2.3.4", "");
    expect_xff("6.6.6.6, 1.2.3.4, 10.0.0.7, 127.0.0.1", "1.2.3.4", "6.6.6.6");
    expect_xff("8.8.8.8, 6.6.6.6, 1.2.3.4, 10.9.9.9", "1.2.3.4", "8.8.8.8, 6.6.6.6");
    /* a trusted address left of the client is just chain */
    expect_xff("10.5.5.5, 1.2.3.4", "1.2.3.4", "10.5.5.5");
    /* every hop trusted: the left-most one */
    expect_xff("10.1.1.1, 10.2.2.2", "10.1.1.1", "");
    expect_xff("127.0.0.1", "127.0.0.1", "");
    /* spaces and tabs around entries */
    expect_xff("  1.1.1.1 ,\t 2.2.2.2\t", "2.2.2.2", "1.1.1.1");
    /* IPv6 entries */
    expect_xff("2001:db8::1", "2001:db8::1", "");
    expect_xff("2001:db8::1, 2001:db8::2, 10.0.0.3", "2001:db8::2", "2001:db8::1");
    /* an IPv4-mapped trusted hop counts as trusted */
    expect_xff("1.2.3.4, ::ffff:10.0.0.9", "1.2.3.4", "");
}

static void test_xff_garbage(void **state)
{
    /* right-most entry unparsable: nothing believed, the peer stays */
    expect_xff("1.2.3.4, garbage", "10.0.0.1", "");
    expect_xff("1.2.3.4,", "10.0.0.1", "");
    expect_xff("", "10.0.0.1", "");
    expect_xff(" , ", "10.0.0.1", "");
    expect_xff("unknown", "10.0.0.1", "");
    /* ports and brackets are not addresses here */
    expect_xff("1.2.3.4:5678", "10.0.0.1", "");
    expect_xff("[2001:db8::1]", "10.0.0.1", "");
    /* garbage behind trusted hops: the last trusted hop is the client */
    expect_xff("1.2.3.4, garbage, 10.0.0.9", "10.0.0.9", "");
    expect_xff("1.2.3.4, , 10.0.0.9", "10.0.0.9", "");
    /* garbage left of the client is passed along as chain */
    expect_xff("junk, 1.2.3.4", "1.2.3.4", "junk");
    /* leading zeros and out-of-range octets are not IPv4 */
    expect_xff("01.2.3.4", "10.0.0.1", "");
    expect_xff("1.2.3.400", "10.0.0.1", "");
    /* a value too long for an address */
    expect_xff("1111:2222:3333:4444:5555:6666:7777:8888:9999:aaaa", "10.0.0.1", "");
}

static void test_xff_long_chain(void **state)
{
    char xff[1024];
    char want[1024];
    size_t o = 0;

    /* 30 hops of "100.64.x.y, " then the client: the chain fits in 511 */
    for (int i = 0; i < 30; i++)
        o += (size_t)snprintf(xff + o, sizeof(xff) - o, "100.64.%d.%d, ", i, i + 100);
    memcpy(want, xff, o - 2);
    want[o - 2] = '\0';
    snprintf(xff + o, sizeof(xff) - o, "1.2.3.4, 10.0.0.2");
    assert_true(strlen(want) < 512);
    expect_xff(xff, "1.2.3.4", want);
}

static void test_xfp(void **state)
{
    struct peer p;
    const char *http[] = {"X-Forwarded-Proto", "http", NULL};
    const char *https[] = {"x-forwarded-proto", "https", NULL};
    struct fwd f;

    f = fwd_of(peer4(&p, "10.0.0.1"), "https", http);
    assert_string_equal(f.proto, "http");
    f = fwd_of(peer4(&p, "10.0.0.1"), "http", https);
    assert_string_equal(f.proto, "https");
    /* only http and https, exactly, are believed: the proxy's own value,
     * the last item of the last line */
    static const char *const bad[] = {"ftp", "HTTPS", "Http", "http, HTTPS", "https, ", "",
                                      "httpsx", "ws"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *h[] = {"X-Forwarded-Proto", bad[i], NULL};
        f = fwd_of(peer4(&p, "10.0.0.1"), "http", h);
        if (strcmp(f.proto, "http") != 0)
            fail_msg("X-Forwarded-Proto \"%s\" believed: %s", bad[i], f.proto);
    }
    /* the proxy appends: "https" from the client, then "http" from it */
    const char *two[] = {"X-Forwarded-Proto", "https", "X-Forwarded-Proto", "http", NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "https", two);
    assert_string_equal(f.proto, "http");
    const char *list[] = {"X-Forwarded-Proto", "http, https", NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "http", list);
    assert_string_equal(f.proto, "https");
    /* never from an untrusted peer */
    f = fwd_of(peer4(&p, "192.0.2.1"), "https", http);
    assert_string_equal(f.proto, "https");
}

/* Two X-Forwarded-For lines (the client's own, then the one its proxy
 * appended) are one list in order: the client cannot spoof its address by
 * sending the first line (issue: client-address spoofing behind
 * --trust-proxy). */
static void test_xff_several_lines(void **state)
{
    struct peer p;
    const char *spoof[] = {"X-Forwarded-For", "6.6.6.6", "X-Forwarded-For", "1.2.3.4", NULL};
    struct fwd f = fwd_of(peer4(&p, "10.0.0.1"), "https", spoof);

    (void)state;
    assert_string_equal(f.client_ip, "1.2.3.4");
    assert_string_equal(f.chain, "6.6.6.6");
    /* trusted hops in the last line are skipped into the earlier one */
    const char *hops[] = {"X-Forwarded-For", "7.7.7.7, 1.2.3.4", "X-Forwarded-For",
                          "10.0.0.2, 10.0.0.3", NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "https", hops);
    assert_string_equal(f.client_ip, "1.2.3.4");
    assert_string_equal(f.chain, "7.7.7.7");
    /* garbage in the last line stops the walk: nothing left of it is believed */
    const char *bad[] = {"X-Forwarded-For", "1.2.3.4", "X-Forwarded-For", "junk", NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "https", bad);
    assert_string_equal(f.client_ip, "10.0.0.1");
    /* X-Forwarded-Host: the proxy's (last) value */
    const char *host[] = {"X-Forwarded-Host", "evil.test", "X-Forwarded-Host", "good.test", NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "https", host);
    assert_string_equal(f.host, "good.test");
}

/* A chain longer than the gateway keeps drops its oldest entries, whole,
 * instead of all of it. */
static void test_xff_chain_too_long(void **state)
{
    struct peer p;
    char xff[2048];
    size_t o = 0;
    struct fwd f;

    (void)state;
    for (int i = 0; i < 60; i++)
        o += (size_t)snprintf(xff + o, sizeof(xff) - o, "100.64.%d.%d, ", i, i + 100);
    snprintf(xff + o, sizeof(xff) - o, "1.2.3.4");
    const char *h[] = {"X-Forwarded-For", xff, NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "https", h);
    assert_string_equal(f.client_ip, "1.2.3.4");
    assert_true(strlen(f.chain) > 400 && strlen(f.chain) < 512);
    /* it ends with the hop nearest the client and starts with a whole entry */
    assert_non_null(strstr(f.chain, "100.64.59.159"));
    assert_int_equal(strncmp(f.chain, "100.64.", 7), 0);
    assert_true(f.chain[strlen(f.chain) - 1] != ' ');
}

static void test_xfh(void **state)
{
    struct peer p;
    const char *h[] = {"X-Forwarded-Host", "app.example.net", NULL};
    struct fwd f;
    char big[300];

    f = fwd_of(peer4(&p, "10.0.0.1"), "https", h);
    assert_true(f.has_host);
    assert_string_equal(f.host, "app.example.net");
    f = fwd_of(peer4(&p, "127.0.0.1"), "https", h);
    assert_string_equal(f.host, "app.example.net");
    f = fwd_of(peer4(&p, "192.0.2.1"), "https", h);
    assert_false(f.has_host);
    /* empty and over-long values are not believed */
    const char *empty[] = {"X-Forwarded-Host", "", NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "https", empty);
    assert_false(f.has_host);
    memset(big, 'h', 255);
    big[255] = '\0';
    const char *h255[] = {"X-Forwarded-Host", big, NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "https", h255);
    assert_true(f.has_host);
    assert_int_equal(strlen(f.host), 255);
    big[255] = 'h';
    big[256] = '\0';
    const char *h256[] = {"X-Forwarded-Host", big, NULL};
    f = fwd_of(peer4(&p, "10.0.0.1"), "https", h256);
    assert_false(f.has_host);
}

/* All three headers from a trusted IPv4-mapped IPv6 peer. */
static void test_trusted_v4_mapped_peer(void **state)
{
    struct peer p;
    const char *h[] = {"X-Forwarded-For", "9.9.9.9, 1.2.3.4", "X-Forwarded-Proto", "http",
                       "X-Forwarded-Host", "a.test", NULL};
    struct fwd f = fwd_of(peer6(&p, "::ffff:10.20.30.40"), "https", h);

    assert_string_equal(f.client_ip, "1.2.3.4");
    assert_string_equal(f.chain, "9.9.9.9");
    assert_string_equal(f.proto, "http");
    assert_string_equal(f.host, "a.test");
    /* a mapped untrusted peer believes nothing */
    f = fwd_of(peer6(&p, "::ffff:192.0.2.1"), "https", h);
    assert_string_equal(f.chain, "");
    assert_string_equal(f.proto, "https");
    assert_false(f.has_host);
}

/* gw_req_set_peer called again replaces what the first call derived. */
static void test_set_peer_twice(void **state)
{
    struct gw_req *r = req_new("https");
    struct peer p;

    add_hdr(r, "X-Forwarded-For", "9.9.9.9, 1.2.3.4");
    add_hdr(r, "X-Forwarded-Host", "a.test");
    gw_req_set_peer(r, peer4(&p, "10.0.0.1"));
    assert_string_equal(r->client_ip, "1.2.3.4");
    assert_string_equal(r->xff_chain, "9.9.9.9");
    gw_req_set_peer(r, peer4(&p, "10.0.0.2"));
    assert_string_equal(r->client_ip, "1.2.3.4");
    assert_string_equal(r->fwd_host, "a.test");
    gw_req_set_peer(r, peer4(&p, "192.0.2.9"));
    assert_string_equal(r->client_ip, "192.0.2.9");
    assert_string_equal(r->xff_chain, "");
    gw_req_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_apex),
        cmocka_unit_test(test_route_agent),
        cmocka_unit_test(test_route_bad_label),
        cmocka_unit_test(test_route_unknown_host),
        cmocka_unit_test(test_route_ip_literal),
        cmocka_unit_test(test_route_malformed),
        cmocka_unit_test(test_req_check),
        cmocka_unit_test(test_untrusted_peer),
        cmocka_unit_test(test_trusted_peer_no_headers),
        cmocka_unit_test(test_xff_rightmost_untrusted),
        cmocka_unit_test(test_xff_garbage),
        cmocka_unit_test(test_xff_long_chain),
        cmocka_unit_test(test_xfp),
        cmocka_unit_test(test_xff_several_lines),
        cmocka_unit_test(test_xff_chain_too_long),
        cmocka_unit_test(test_xfh),
        cmocka_unit_test(test_trusted_v4_mapped_peer),
        cmocka_unit_test(test_set_peer_twice),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
