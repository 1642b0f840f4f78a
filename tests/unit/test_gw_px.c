/* The proxy bridge (gateway/gw_px.c, gw_px_start) with a fake upstream: a
 * route in a real registry (gateway/gw_reg.c) whose gw_up_ops.open records
 * its calls. Apex paths reach the real gw_admin and gw_tep; agent hosts are
 * looked up and opened once; every error the bridge answers reaches the fake
 * front end's error callback with its code. gw_tun_accept and the two
 * tunnel-protocol tables that gw_tep.c names are stubs here: no upgrade
 * happens in these tests. */
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

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_node.h"
#include "gw_osr.h"
#include "gw_rds.h"
#include "gw_px.h"
#include "gw_reg.h"
#include "gw_req.h"
#include "gw_tun.h"
#include "gw_tun_h2.h"
#include "gw_up.h"
#include "id.h"

#define FAKE_NOW_MS 9000000u
#define ADDR_STR "0x00112233445566778899aabbccddeeff0a1b2c3d"
#define OTHER_STR "0xffeeddccbbaa99887766554433221100f0e1d2c3"

/* ---- no shared registry in these tests (ctx->rds NULL, no node listener) ---- */

enum herr gw_rds_route(struct gw_req *r)
{
    fail_msg("the bridge asked the shared registry without --redis");
    return HERR_INTERNAL;
}

bool gw_rds_ok(const struct gw_rds *rds)
{
    fail_msg("/health asked the shared registry without --redis");
    return false;
}

uint64_t gw_rds_errors(const struct gw_rds *rds)
{
    fail_msg("/metrics asked the shared registry without --redis");
    return 0;
}

size_t gw_rds_cached(const struct gw_rds *rds)
{
    fail_msg("/metrics asked the shared registry without --redis");
    return 0;
}

size_t gw_node_peers(const struct gw_node *n)
{
    fail_msg("/metrics asked for node peers without --redis");
    return 0;
}

size_t gw_node_streams(const struct gw_node *n)
{
    fail_msg("/metrics asked for node streams without --redis");
    return 0;
}

enum herr gw_node_accept(struct gw_req *r)
{
    fail_msg("a public request was checked as a node-to-node one");
    return HERR_INTERNAL;
}

/* ---- stubs for gw_tep.c ---- */

const struct gw_tun_proto gw_tun_h2_proto = {.name = "native"};
const struct gw_tun_proto gw_osr_proto = {.name = "osaurus"};

int gw_tun_accept(struct gw_ctx *ctx, struct bufferevent *bev, const struct sockaddr *peer,
                  const char *ws_accept, const struct gw_tun_proto *proto, uint64_t conn_id,
                  const char *client_ip)
{
    fail_msg("gw_tun_accept called");
    return -1;
}

/* ---- stubs for gw_admin.c and gw_metrics.c: no tunnels here ---- */

size_t gw_tun_streams_total(const struct gw_ctx *ctx)
{
    return 0;
}

void gw_tun_each_route(struct gw_ctx *ctx, void (*cb)(struct gw_route *rt, void *arg), void *arg)
{
}

int gw_tun_remove_route(struct gw_ctx *ctx, const uint8_t *addr)
{
    return -1;
}

void gw_tun_apply_allow(struct gw_ctx *ctx)
{
}

/* ---- fake front end ---- */

struct fe_rec {
    int heads;
    int status;
    char hdrs[1024];
    size_t hlen;
    char body[4096];
    size_t blen;
    int ends;
    bool complete;
    int errors;
    enum herr err;
    int take_conns;
};

static int fe_head(struct gw_req *r, int status, const nghttp2_nv *nv, size_t n)
{
    struct fe_rec *f = r->fe_data;

    f->heads++;
    f->status = status;
    for (size_t i = 0; i < n; i++) {
        int k = snprintf(f->hdrs + f->hlen, sizeof(f->hdrs) - f->hlen, "%.*s: %.*s\n",
                         (int)nv[i].namelen, (const char *)nv[i].name, (int)nv[i].valuelen,
                         (const char *)nv[i].value);
        assert_true(k > 0 && (size_t)k < sizeof(f->hdrs) - f->hlen);
        f->hlen += (size_t)k;
    }
    return 0;
}

static int fe_body(struct gw_req *r, const uint8_t *data, size_t len)
{
    struct fe_rec *f = r->fe_data;

    assert_true(f->blen + len < sizeof(f->body));
    memcpy(f->body + f->blen, data, len);
    f->blen += len;
    f->body[f->blen] = '\0';
    return 0;
}

static void fe_end(struct gw_req *r, bool complete)
{
    struct fe_rec *f = r->fe_data;

    f->ends++;
    f->complete = complete;
}

static void fe_error(struct gw_req *r, enum herr e)
{
    struct fe_rec *f = r->fe_data;

    assert_null(r->up);
    f->errors++;
    f->err = e;
}

static void fe_body_drained(struct gw_req *r)
{
}

static int fe_take_conn(struct gw_req *r, gw_take_conn_cb cb, const void *arg)
{
    struct fe_rec *f = r->fe_data;

    f->take_conns++;
    return -1;
}

static const struct gw_fe_ops fe_ops = {
    .head = fe_head,
    .body = fe_body,
    .end = fe_end,
    .error = fe_error,
    .body_drained = fe_body_drained,
    .take_conn = fe_take_conn,
};

/* ---- fake upstream ---- */

static const struct gw_up_ops fake_up;

static struct {
    int opens;
    struct gw_route *rt;             /* of the last open */
    struct gw_req *r;
    uint64_t resp_timeout_at_open;   /* r->resp_timeout_ms when open ran */
    enum herr rv;                    /* what open returns */
    int cancels;
} up;

static enum herr fake_open(struct gw_route *rt, struct gw_req *r)
{
    up.opens++;
    up.rt = rt;
    up.r = r;
    up.resp_timeout_at_open = r->resp_timeout_ms;
    assert_null(r->up);
    if (up.rv == HERR_NONE)
        gw_req_attach(r, &fake_up, &up);
    return up.rv;
}

static void fake_body_more(void *stream)
{
}

static void fake_consumed(void *stream, size_t n)
{
}

static void fake_cancel(void *stream)
{
    assert_ptr_equal(stream, &up);
    up.cancels++;
}

static const struct gw_up_ops fake_up = {
    .name = "fake",
    .open = fake_open,
    .body_more = fake_body_more,
    .consumed = fake_consumed,
    .cancel = fake_cancel,
};

/* ---- context ---- */

static struct {
    struct gw_cfg cfg;      /* --max-body-bytes 100, response-header timeout 300 s */
    struct gw_cfg cfg_nolimit; /* --response-header-timeout 0 */
    struct clk clk;
    struct gw_ctx ctx;
    struct gw_route route;  /* ADDR_STR, in ctx.reg */
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

static int load(struct gw_cfg *cfg, char **argv, int argc)
{
    char err[512];

    if (gw_cfg_load(cfg, argc, argv, err, sizeof(err)) != 0) {
        fprintf(stderr, "gw_cfg_load: %s\n", err);
        return -1;
    }
    return 0;
}

static int group_setup(void **state)
{
    char *argv[] = {"tunnel-gateway", "--domain", "example.com", "--max-body-bytes", "100", NULL};
    char *argv0[] = {"tunnel-gateway", "--domain", "example.com", "--response-header-timeout",
                     "0", NULL};
    int oom = 0;

    unsetenv("TUNNEL_GATEWAY_CONFIG");
    unsetenv("TUNNEL_GATEWAY_DOMAIN");
    unsetenv("TUNNEL_GATEWAY_MAX_BODY_BYTES");
    unsetenv("TUNNEL_GATEWAY_RESPONSE_HEADER_TIMEOUT");
    if (load(&g.cfg, argv, 5) != 0 || load(&g.cfg_nolimit, argv0, 5) != 0)
        return -1;
    if (g.cfg.resp_header_timeout_s != 300 || g.cfg.max_body_bytes != 100 ||
        g.cfg_nolimit.resp_header_timeout_s != 0)
        return -1;
    g.clk = (struct clk){fake_mono, fake_unix, fake_rand, NULL};
    g.ctx.base = event_base_new();
    g.ctx.reg = gw_reg_new();
    if (g.ctx.base == NULL || g.ctx.reg == NULL)
        return -1;
    g.ctx.cfg = &g.cfg;
    g.ctx.clk = &g.clk;
    g.ctx.start_ms = FAKE_NOW_MS - 12000;
    if (id_addr_parse(ADDR_STR, strlen(ADDR_STR), g.route.addr) != ID_OK)
        return -1;
    snprintf(g.route.addr_str, sizeof(g.route.addr_str), "%s", ADDR_STR);
    g.route.up = &fake_up;
    g.route.owner = &up;
    if (gw_reg_set(g.ctx.reg, g.route.addr, &g.route, &oom) != NULL || oom != 0)
        return -1;
    return 0;
}

static int group_teardown(void **state)
{
    gw_reg_remove(g.ctx.reg, g.route.addr, &g.route);
    gw_reg_free(g.ctx.reg);
    event_base_free(g.ctx.base);
    gw_cfg_cleanup(&g.cfg);
    gw_cfg_cleanup(&g.cfg_nolimit);
    return 0;
}

static int test_setup(void **state)
{
    memset(&up, 0, sizeof(up));
    memset(&g.ctx.n, 0, sizeof(g.ctx.n));
    g.ctx.cfg = &g.cfg;
    g.ctx.draining = false;
    g.route.resp_timeout_ms = 0;
    return 0;
}

static void add_hdr(struct gw_req *r, const char *name, const char *value)
{
    assert_int_equal(gw_hdrs_add(&r->hdrs, name, strlen(name), value, strlen(value), 0), 0);
}

/* A request with a complete head and no body; authority NULL for none. */
static struct gw_req *req_new(struct fe_rec *f, const char *method, const char *authority,
                              const char *path)
{
    struct gw_req *r = gw_req_new(&g.ctx, &fe_ops, f, 5, "https");
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(40000)};

    memset(f, 0, sizeof(*f));
    assert_non_null(r);
    r->method = strdup(method);
    r->path = strdup(path);
    assert_non_null(r->method);
    assert_non_null(r->path);
    if (authority != NULL) {
        r->authority = strdup(authority);
        assert_non_null(r->authority);
    }
    assert_int_equal(inet_pton(AF_INET, "198.51.100.3", &sin.sin_addr), 1);
    gw_req_set_peer(r, (const struct sockaddr *)&sin);
    r->body_eof = true;
    return r;
}

static void expect_line(const char *hdrs, const char *line)
{
    size_t n = strlen(line);

    for (const char *p = hdrs; *p != '\0';) {
        const char *nl = strchr(p, '\n');
        size_t len = nl != NULL ? (size_t)(nl - p) : strlen(p);
        if (len == n && memcmp(p, line, n) == 0)
            return;
        p += len + (nl != NULL ? 1 : 0);
    }
    fail_msg("missing \"%s\" in:\n%s", line, hdrs);
}

/* Runs one request through the bridge and expects the error e, no open. */
static void expect_error(const char *method, const char *authority, const char *path, enum herr e)
{
    struct fe_rec f;
    struct gw_req *r = req_new(&f, method, authority, path);
    int opens = up.opens;

    gw_px_start(r);
    if (f.errors != 1 || f.err != e)
        fail_msg("%s %s %s: %d errors, last %d (%s); want %s", method,
                 authority != NULL ? authority : "(none)", path, f.errors, (int)f.err,
                 herr_code(f.err), herr_code(e));
    assert_int_equal(r->err, e);
    assert_int_equal(f.heads + f.ends, 0);
    assert_null(r->up);
    assert_int_equal(up.opens, opens);
    gw_req_free(r);
}

/* ---- apex ---- */

static void test_apex_health(void **state)
{
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "GET", "example.com", "/health");
    const char *want = "{\"status\":\"ok\",\"tunnels\":0,\"agents\":1,\"region\":\"local\","
                       "\"machine\":\"n1:8443\"}\n";
    char clen[32];

    snprintf(g.ctx.node_id, sizeof(g.ctx.node_id), "n1:8443");
    gw_px_start(r);
    assert_int_equal(f.errors, 0);
    assert_int_equal(f.heads, 1);
    assert_int_equal(f.status, 200);
    expect_line(f.hdrs, "content-type: application/json");
    snprintf(clen, sizeof(clen), "content-length: %zu", strlen(want));
    expect_line(f.hdrs, clen);
    expect_line(f.hdrs, "cache-control: no-store");
    assert_string_equal(f.body, want);
    assert_int_equal(f.ends, 1);
    assert_true(f.complete);
    assert_int_equal(up.opens, 0);
    /* the apex is not agent traffic */
    assert_int_equal(g.ctx.n.requests_total, 0);
    assert_int_equal(g.ctx.n.requests_failed, 0);
    gw_req_free(r);

    /* with a query, on a port, by IP literal, HEAD (no body) */
    r = req_new(&f, "HEAD", "127.0.0.1:8443", "/health?probe=1");
    r->is_head = true;
    gw_px_start(r);
    assert_int_equal(f.status, 200);
    assert_int_equal(f.blen, 0);
    assert_int_equal(f.ends, 1);
    gw_req_free(r);

    /* draining: 503 shutting_down status body */
    g.ctx.draining = true;
    r = req_new(&f, "GET", "EXAMPLE.com:443", "/health");
    gw_px_start(r);
    assert_int_equal(f.status, 503);
    assert_string_equal(f.body, "{\"status\":\"shutting_down\",\"tunnels\":0,\"agents\":1,"
                                "\"region\":\"local\",\"machine\":\"n1:8443\"}\n");
    gw_req_free(r);
    g.ctx.draining = false;

    expect_error("POST", "example.com", "/health", HERR_METHOD_NOT_ALLOWED);
    expect_error("GET", "example.com", "/healthz", HERR_NOT_FOUND);
    expect_error("GET", "example.com", "/", HERR_NOT_FOUND);
    assert_int_equal(g.ctx.n.requests_failed, 0);
}

static void test_apex_tunnel_connect(void **state)
{
    struct fe_rec f;
    struct gw_req *r;

    /* a plain GET: 400 websocket_required, the front end keeps its connection */
    expect_error("GET", "example.com", "/tunnel/connect", HERR_WEBSOCKET_REQUIRED);
    expect_error("GET", "example.com", "/tunnel/connect?x=1", HERR_WEBSOCKET_REQUIRED);
    /* an HTTP/2 extended CONNECT cannot be a tunnel (it shares its connection) */
    r = req_new(&f, "CONNECT", "example.com", "/tunnel/connect");
    r->protocol = strdup("websocket");
    assert_non_null(r->protocol);
    add_hdr(r, "sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    add_hdr(r, "sec-websocket-version", "13");
    gw_px_start(r);
    assert_int_equal(f.errors, 1);
    assert_int_equal(f.err, HERR_WEBSOCKET_REQUIRED);
    assert_int_equal(f.take_conns, 0);
    gw_req_free(r);
    /* only the exact path is the endpoint */
    expect_error("GET", "example.com", "/tunnel/connectx", HERR_NOT_FOUND);
    assert_int_equal(up.opens, 0);
    assert_int_equal(g.ctx.n.requests_total, 0);
}

/* ---- routing errors ---- */

static void test_route_errors(void **state)
{
    expect_error("GET", "www.example.com", "/", HERR_INVALID_SUBDOMAIN);
    expect_error("GET", "example.org", "/", HERR_UNKNOWN_HOST);
    expect_error("GET", NULL, "/", HERR_BAD_REQUEST);
    expect_error("GET", "", "/", HERR_BAD_REQUEST);
    assert_int_equal(g.ctx.n.requests_total, 0);
    assert_int_equal(g.ctx.n.requests_failed, 0);
}

/* ---- agent hosts ---- */

static void test_agent_offline(void **state)
{
    expect_error("GET", OTHER_STR ".example.com", "/", HERR_AGENT_OFFLINE);
    assert_int_equal(g.ctx.n.requests_total, 1);
    assert_int_equal(g.ctx.n.requests_failed, 1);
}

static void test_agent_open_once(void **state)
{
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "GET", ADDR_STR ".example.com:8443", "/tunnel/connect");

    /* an agent's paths are all the agent's, /tunnel/connect included */
    gw_px_start(r);
    assert_int_equal(up.opens, 1);
    assert_ptr_equal(up.rt, &g.route);
    assert_ptr_equal(up.r, r);
    assert_ptr_equal(r->up, &fake_up);
    assert_ptr_equal(r->up_data, &up);
    assert_int_equal(f.errors + f.heads + f.ends, 0);
    assert_int_equal(g.ctx.n.requests_total, 1);
    assert_int_equal(g.ctx.n.requests_failed, 0);
    assert_int_equal(g.ctx.n.websockets_total, 0);
    /* the response-header clock runs (the body is complete) */
    assert_true(evtimer_pending(r->timer, NULL));
    assert_int_equal(up.cancels, 0);
    gw_req_free(r); /* the front end's free cancels the stream */
    assert_int_equal(up.cancels, 1);

    /* a WebSocket is counted as one */
    r = req_new(&f, "CONNECT", ADDR_STR ".example.com", "/ws");
    r->protocol = strdup("websocket");
    assert_non_null(r->protocol);
    gw_px_start(r);
    assert_int_equal(up.opens, 2);
    assert_int_equal(g.ctx.n.requests_total, 2);
    assert_int_equal(g.ctx.n.websockets_total, 1);
    gw_req_cancel(r);
    assert_int_equal(up.cancels, 2);
    assert_null(r->up);
    gw_req_free(r);
    assert_int_equal(up.cancels, 2);
}

static void test_agent_open_error(void **state)
{
    static const enum herr errs[] = {HERR_HOST_BUSY, HERR_INTERNAL, HERR_UNSUPPORTED_UPGRADE,
                                     HERR_AGENT_OFFLINE, HERR_METHOD_NOT_ALLOWED,
                                     HERR_BODY_TOO_LARGE};

    for (size_t i = 0; i < sizeof(errs) / sizeof(errs[0]); i++) {
        struct fe_rec f;
        struct gw_req *r = req_new(&f, "GET", ADDR_STR ".example.com", "/x");

        up.rv = errs[i];
        gw_px_start(r);
        assert_int_equal(up.opens, (int)i + 1);
        assert_int_equal(f.errors, 1);
        assert_int_equal(f.err, errs[i]);
        assert_int_equal(r->err, errs[i]);
        assert_null(r->up);
        assert_false(evtimer_pending(r->timer, NULL)); /* no wait clock */
        assert_int_equal(g.ctx.n.requests_failed, i + 1);
        gw_req_free(r);
    }
    assert_int_equal(up.cancels, 0);
    assert_int_equal(g.ctx.n.requests_total, sizeof(errs) / sizeof(errs[0]));
}

static void test_max_body_bytes(void **state)
{
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "POST", ADDR_STR ".example.com", "/upload");

    r->has_content_length = true;
    r->content_length = 101;
    r->body_eof = false;
    gw_px_start(r);
    assert_int_equal(up.opens, 0);
    assert_int_equal(f.errors, 1);
    assert_int_equal(f.err, HERR_BODY_TOO_LARGE);
    assert_int_equal(g.ctx.n.requests_total, 1);
    assert_int_equal(g.ctx.n.requests_failed, 1);
    gw_req_free(r);

    /* exactly the limit, and an unknown length (checked as it streams) */
    r = req_new(&f, "POST", ADDR_STR ".example.com", "/upload");
    r->has_content_length = true;
    r->content_length = 100;
    gw_px_start(r);
    assert_int_equal(up.opens, 1);
    assert_int_equal(f.errors, 0);
    gw_req_free(r);
    r = req_new(&f, "POST", ADDR_STR ".example.com", "/upload");
    r->body_eof = false;
    gw_px_start(r);
    assert_int_equal(up.opens, 2);
    assert_int_equal(f.errors, 0);
    gw_req_free(r);

    /* no limit configured: any declared length is opened */
    g.ctx.cfg = &g.cfg_nolimit;
    r = req_new(&f, "POST", ADDR_STR ".example.com", "/upload");
    r->has_content_length = true;
    r->content_length = UINT64_MAX;
    gw_px_start(r);
    assert_int_equal(up.opens, 3);
    assert_int_equal(f.errors, 0);
    gw_req_free(r);
}

/* The response-header timeout at open, for a route asking route_ms, with the
 * gateway's config cfg; also whether the wait clock runs afterwards. */
static uint64_t timeout_at_open(const struct gw_cfg *cfg, uint64_t route_ms, bool *pending)
{
    struct fe_rec f;
    struct gw_req *r;
    uint64_t ms;

    g.ctx.cfg = cfg;
    g.route.resp_timeout_ms = route_ms;
    r = req_new(&f, "GET", ADDR_STR ".example.com", "/slow");
    gw_px_start(r);
    assert_int_equal(f.errors, 0);
    assert_ptr_equal(r->up, &fake_up);
    ms = up.resp_timeout_at_open;
    assert_int_equal(r->resp_timeout_ms, ms);
    *pending = evtimer_pending(r->timer, NULL) != 0;
    gw_req_free(r);
    return ms;
}

static void test_resp_timeout(void **state)
{
    bool pending;

    /* the gateway's 300 s, longer asked for: applied */
    assert_int_equal(timeout_at_open(&g.cfg, 600000, &pending), 600000);
    assert_true(pending);
    /* shorter or equal: the gateway's stays */
    assert_int_equal(timeout_at_open(&g.cfg, 100000, &pending), 300000);
    assert_int_equal(timeout_at_open(&g.cfg, 300000, &pending), 300000);
    assert_int_equal(timeout_at_open(&g.cfg, 300001, &pending), 300001);
    /* the route did not ask */
    assert_int_equal(timeout_at_open(&g.cfg, 0, &pending), 300000);
    assert_true(pending);
    /* the gateway has none: nothing replaces it, and no clock runs */
    assert_int_equal(timeout_at_open(&g.cfg_nolimit, 600000, &pending), 0);
    assert_false(pending);
    assert_int_equal(timeout_at_open(&g.cfg_nolimit, 0, &pending), 0);
    assert_false(pending);
    assert_int_equal(up.opens, 7);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_apex_health, test_setup),
        cmocka_unit_test_setup(test_apex_tunnel_connect, test_setup),
        cmocka_unit_test_setup(test_route_errors, test_setup),
        cmocka_unit_test_setup(test_agent_offline, test_setup),
        cmocka_unit_test_setup(test_agent_open_once, test_setup),
        cmocka_unit_test_setup(test_agent_open_error, test_setup),
        cmocka_unit_test_setup(test_max_body_bytes, test_setup),
        cmocka_unit_test_setup(test_resp_timeout, test_setup),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
