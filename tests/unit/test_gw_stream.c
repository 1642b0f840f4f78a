/* Stream open on both tunnel protocols (gateway/gw_tun_h2.c, gateway/gw_osr.c),
 * driven through their struct gw_tun_proto and struct gw_up_ops tables, with
 * a fake tunnel and a fake WebSocket defined here (gw_tun_send_msg,
 * gw_tun_close, gw_tun_kick; ws_is_writable, ws_send_binary_buffer,
 * ws_send_text, ws_ping), so neither gw_tun.c nor the common library's ws.o
 * is linked. The native session talks to a real nghttp2 server session in
 * memory (the agent's side); the Osaurus session's frames are captured and
 * answered with decoded tun_msgs. Every allocation of open is failed in turn
 * (alloc_fail, libevent included): open refuses with HERR_INTERNAL, attaches
 * nothing, leaves the stream count alone and leaks nothing.
 *
 * The fakes have no context to carry their state, so it lives at file scope
 * (struct g), as in alloc_fail.c. */
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
#include <event2/buffer.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>

#include "alloc_fail.h"
#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_osr.h"
#include "gw_node.h"
#include "gw_req.h"
#include "gw_tun.h"
#include "gw_tun_h2.h"
#include "gw_up.h"
#include "h2mem.h"
#include "id.h"
#include "tun_msg.h"
#include "ws.h"

#define FAKE_NOW_MS 7000000u
#define ADDR_STR "0x00112233445566778899aabbccddeeff0a1b2c3d"
#define AUTHORITY ADDR_STR ".example.com"
#define CLIENT_IP "203.0.113.7"
#define MAX_STREAMS 2
#define MAX_TEXTS 16
#define TEXT_MAX 16384

/* The opaque types the sessions point at: ours. */
struct gw_tun {
    int unused;
};
struct ws_conn {
    int unused;
};

/* What a fake front end saw for one request. */
struct fe_rec {
    int heads;
    int status;
    char hdrs[2048]; /* "name: value\n" per response header (up to 64 of them) */
    size_t nhdrs;
    size_t hlen;
    int bodies;
    char body[4096];
    size_t blen;
    int ends;
    bool complete;
    int errors;
    enum herr err;
    int drained;
};

static struct {
    struct gw_cfg cfg;
    struct clk clk;
    struct gw_ctx ctx;
    struct gw_tun tun;
    struct ws_conn ws;
    /* fake tunnel */
    int kicks;
    int closes;
    int close_code;
    char close_reason[64];
    int msgs;
    enum tun_msg_type msg_type;
    uint32_t msg_grace;
    /* fake WebSocket */
    bool writable;
    struct evbuffer *c2s;    /* binary messages the gateway sent (to the agent) */
    int bin_msgs;
    int ntexts;              /* text messages sent */
    char texts[MAX_TEXTS][TEXT_MAX];
    size_t text_len[MAX_TEXTS];
    int pings;
    /* fake metrics */
    int limits;
    enum gw_limit_kind last_limit;
} g;

/* ---- fake tunnel (gw_tun.h) ---- */

static void *g_close_sess; /* the native session: closing fails its streams, as gw_tun_close does */

int gw_tun_send_msg(struct gw_tun *t, const struct tun_msg *m)
{
    assert_ptr_equal(t, &g.tun);
    g.msgs++;
    g.msg_type = m->type;
    if (m->type == TUN_MSG_DRAINING)
        g.msg_grace = m->draining.grace_s;
    return 0;
}


void gw_tun_close(struct gw_tun *t, int code, const char *reason)
{
    assert_ptr_equal(t, &g.tun);
    if (g_close_sess != NULL && g.closes == 0)
        gw_tun_h2_proto.fail_all(g_close_sess);
    g.closes++;
    g.close_code = code;
    snprintf(g.close_reason, sizeof(g.close_reason), "%s", reason);
}

void gw_tun_kick(struct gw_tun *t)
{
    assert_ptr_equal(t, &g.tun);
    g.kicks++;
}

/* ---- no node peers here (gw_node.h): the sessions under test are tunnels' ---- */

bool gw_node_peer_writable(const struct gw_node_peer *p)
{
    fail_msg("a tunnel session used the node-peer carrier");
    return false;
}

int gw_node_peer_send(struct gw_node_peer *p, struct evbuffer *buf)
{
    fail_msg("a tunnel session used the node-peer carrier");
    return -1;
}

void gw_node_peer_kick(struct gw_node_peer *p)
{
    fail_msg("a tunnel session used the node-peer carrier");
}

void gw_node_peer_close(struct gw_node_peer *p, const char *reason)
{
    fail_msg("a tunnel session used the node-peer carrier");
}

int gw_node_fwd_fields(struct gw_ctx *ctx, const struct gw_req *r, struct gw_node_fwd *out)
{
    fail_msg("a tunnel session asked for node forwarding fields");
    return -1;
}

/* ---- fake metrics (gw_metrics.h) ---- */

void gw_metrics_limit(struct gw_ctx *ctx, enum gw_limit_kind k)
{
    (void)ctx;
    g.limits++;
    g.last_limit = k;
}

/* ---- fake WebSocket (ws.h) ---- */

bool ws_is_writable(const struct ws_conn *ws)
{
    assert_ptr_equal(ws, &g.ws);
    return g.writable;
}

int ws_send_binary_buffer(struct ws_conn *ws, struct evbuffer *src, size_t len)
{
    assert_ptr_equal(ws, &g.ws);
    if (evbuffer_get_length(src) < len)
        return -1;
    assert_int_equal(evbuffer_remove_buffer(src, g.c2s, len), (int)len);
    g.bin_msgs++;
    return 0;
}

int ws_send_text(struct ws_conn *ws, const char *data, size_t len)
{
    assert_ptr_equal(ws, &g.ws);
    assert_true(g.ntexts < MAX_TEXTS);
    assert_true(len < TEXT_MAX);
    memcpy(g.texts[g.ntexts], data, len);
    g.texts[g.ntexts][len] = '\0';
    g.text_len[g.ntexts] = len;
    g.ntexts++;
    return 0;
}

int ws_ping(struct ws_conn *ws)
{
    assert_ptr_equal(ws, &g.ws);
    g.pings++;
    return 0;
}

/* ---- fake front end ---- */

static int fe_head(struct gw_req *r, int status, const nghttp2_nv *nv, size_t n)
{
    struct fe_rec *f = r->fe_data;

    f->heads++;
    f->status = status;
    f->nhdrs = n;
    for (size_t i = 0; i < n && n <= 64; i++) { /* many: counted, not recorded */
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
    f->bodies++;
    memcpy(f->body + f->blen, data, len);
    f->blen += len;
    f->body[f->blen] = '\0';
    return 0;
}

static void fe_end(struct gw_req *r, bool complete)
{
    struct fe_rec *f = r->fe_data;

    assert_null(r->up); /* detached first */
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
    struct fe_rec *f = r->fe_data;

    f->drained++;
}

static const struct gw_fe_ops fe_ops = {
    .head = fe_head,
    .body = fe_body,
    .end = fe_end,
    .error = fe_error,
    .body_drained = fe_body_drained,
};

/* ---- context ---- */

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

static void *h2_real_malloc(size_t n, void *user)
{
    (void)user;
    return __real_malloc(n);
}

static void h2_real_free(void *p, void *user)
{
    (void)user;
    __real_free(p);
}

static void *h2_real_calloc(size_t nmemb, size_t n, void *user)
{
    (void)user;
    return __real_calloc(nmemb, n);
}

static void *h2_real_realloc(void *p, size_t n, void *user)
{
    (void)user;
    return __real_realloc(p, n);
}

static int group_setup(void **state)
{
    char *argv[] = {"tunnel-gateway", "--domain", "example.com", "--max-streams-per-tunnel",
                    "2", NULL};
    char err[512];

    alloc_fail_hook_libevent(); /* before libevent allocates anything */
    unsetenv("TUNNEL_GATEWAY_CONFIG");
    unsetenv("TUNNEL_GATEWAY_DOMAIN");
    unsetenv("TUNNEL_GATEWAY_MAX_STREAMS_PER_TUNNEL");
    if (gw_cfg_load(&g.cfg, 5, argv, err, sizeof(err)) != 0) {
        fprintf(stderr, "gw_cfg_load: %s\n", err);
        return -1;
    }
    if (g.cfg.max_streams_per_tunnel != MAX_STREAMS)
        return -1;
    g.clk = (struct clk){fake_mono, fake_unix, fake_rand, NULL};
    g.ctx.base = event_base_new();
    if (g.ctx.base == NULL)
        return -1;
    g.ctx.cfg = &g.cfg;
    g.ctx.clk = &g.clk;
    /* nghttp2 allocates outside the wrappers, as it did through its own
     * malloc before the sessions took h2mem: the walks count our blocks */
    h2mem_init(&g.ctx.h2mem);
    g.ctx.h2mem.mem = (nghttp2_mem){NULL, h2_real_malloc, h2_real_free, h2_real_calloc,
                                    h2_real_realloc};
    g.c2s = evbuffer_new();
    return g.c2s != NULL ? 0 : -1;
}

static int group_teardown(void **state)
{
    evbuffer_free(g.c2s);
    event_base_free(g.ctx.base);
    gw_cfg_cleanup(&g.cfg);
    return 0;
}

/* Fresh fakes for each test. */
static int test_setup(void **state)
{
    g.kicks = 0;
    g.closes = 0;
    g.close_code = 0;
    g.close_reason[0] = '\0';
    g.msgs = 0;
    g.msg_type = TUN_MSG_NONE;
    g.msg_grace = 0;
    g.writable = true;
    evbuffer_drain(g.c2s, evbuffer_get_length(g.c2s));
    g.bin_msgs = 0;
    g.ntexts = 0;
    g.pings = 0;
    memset(&g.ctx.n, 0, sizeof(g.ctx.n));
    return 0;
}

static void add_hdr(struct gw_req *r, const char *name, const char *value)
{
    assert_int_equal(gw_hdrs_add(&r->hdrs, name, strlen(name), value, strlen(value), 0), 0);
}

/* A routed request for AUTHORITY from CLIENT_IP (not a trusted proxy), with
 * client headers; body: NULL for none (complete), else its bytes (complete). */
static struct gw_req *req_new(struct fe_rec *f, const char *method, const char *path,
                              const char *protocol, const char *body)
{
    struct gw_req *r = gw_req_new(&g.ctx, &fe_ops, f, 9, "https");
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(50000)};

    memset(f, 0, sizeof(*f));
    assert_non_null(r);
    r->method = strdup(method);
    r->path = strdup(path);
    r->authority = strdup(AUTHORITY);
    assert_non_null(r->method);
    assert_non_null(r->path);
    assert_non_null(r->authority);
    if (protocol != NULL) {
        r->protocol = strdup(protocol);
        assert_non_null(r->protocol);
    }
    add_hdr(r, "User-Agent", "unit/1");
    add_hdr(r, "Cookie", "a=1");
    /* a client's forwarding claims are not believed from an untrusted peer */
    add_hdr(r, "X-Forwarded-For", "6.6.6.6");
    assert_int_equal(inet_pton(AF_INET, CLIENT_IP, &sin.sin_addr), 1);
    gw_req_set_peer(r, (const struct sockaddr *)&sin);
    gw_req_route(r);
    assert_int_equal(r->route, GW_ROUTE_AGENT);
    if (body != NULL) {
        r->has_content_length = true;
        r->content_length = strlen(body);
        assert_int_equal(gw_req_body_add(r, body, strlen(body)), 0);
    }
    /* a WebSocket's "body" lasts as long as the connection */
    if (!gw_req_is_websocket(r))
        gw_req_body_eof(r);
    assert_null(r->up);
    return r;
}

static void route_init(struct gw_route *rt, const struct gw_tun_proto *proto, void *sess)
{
    memset(rt, 0, sizeof(*rt));
    assert_int_equal(id_addr_parse(ADDR_STR, strlen(ADDR_STR), rt->addr), 0);
    snprintf(rt->addr_str, sizeof(rt->addr_str), "%s", ADDR_STR);
    rt->up = proto->up;
    rt->owner = sess;
}

static bool has_line(const char *hdrs, const char *line)
{
    size_t n = strlen(line);

    for (const char *p = hdrs; *p != '\0';) {
        const char *nl = strchr(p, '\n');
        size_t len = nl != NULL ? (size_t)(nl - p) : strlen(p);
        if (len == n && memcmp(p, line, n) == 0)
            return true;
        p += len + (nl != NULL ? 1 : 0);
    }
    return false;
}

static size_t count_lines(const char *hdrs)
{
    size_t n = 0;

    for (const char *p = hdrs; *p != '\0'; p++)
        n += *p == '\n';
    return n;
}

static void expect_line(const char *hdrs, const char *line)
{
    if (!has_line(hdrs, line))
        fail_msg("missing \"%s\" in:\n%s", line, hdrs);
}

/* Opens r on rt with allocation n failing in turn until open succeeds. Each
 * failure: err, nothing attached, count unchanged, nothing leaked, no kick and
 * no frame out. Returns how many allocations failed; on return r is open. */
static unsigned long open_walk(const struct gw_tun_proto *proto, void *sess, struct gw_route *rt,
                               struct gw_req *r)
{
    size_t before = proto->streams(sess);
    unsigned long fails = 0;
    enum herr e;

    for (unsigned long n = 1;; n++) {
        int kicks = g.kicks;
        int texts = g.ntexts;
        size_t bin = evbuffer_get_length(g.c2s);

        alloc_fail_arm(n);
        e = rt->up->open(rt, r);
        bool fired = alloc_fail_fired();
        size_t live = alloc_fail_live();
        bool st_live = r->up_data != NULL && alloc_fail_is_live(r->up_data);
        alloc_fail_disarm();
        if (!fired) {
            assert_int_equal(e, HERR_NONE);
            assert_ptr_equal(r->up, proto->up);
            assert_non_null(r->up_data);
            /* the stream is all open keeps: one block */
            assert_true(st_live);
            assert_int_equal(live, 1);
            assert_int_equal(proto->streams(sess), before + 1);
            return fails;
        }
        fails++;
        if (e != HERR_INTERNAL)
            fail_msg("allocation %lu failed: open returned %d, not HERR_INTERNAL", n, (int)e);
        if (r->up != NULL || r->up_data != NULL)
            fail_msg("allocation %lu failed: a stream is attached", n);
        if (live != 0)
            fail_msg("allocation %lu failed: %zu blocks leaked", n, live);
        assert_int_equal(proto->streams(sess), before);
        assert_int_equal(g.kicks, kicks);
        assert_int_equal(g.ntexts, texts);
        assert_int_equal(evbuffer_get_length(g.c2s), bin);
        assert_int_equal(r->err, HERR_NONE); /* the bridge answers, not open */
    }
}

/* As open_walk, with a new request from mk for every attempt (an open that
 * failed may have taken the request's body: the bridge fails the request
 * then, so nobody opens it again). Returns the failures; *out is the
 * request that opened. */
static unsigned long open_walk_fresh(const struct gw_tun_proto *proto, void *sess,
                                     struct gw_route *rt, struct gw_req *(*mk)(struct fe_rec *),
                                     struct fe_rec *f, struct gw_req **out)
{
    size_t before = proto->streams(sess);
    unsigned long fails = 0;

    for (unsigned long n = 1;; n++) {
        struct gw_req *r = mk(f);
        int texts = g.ntexts;

        alloc_fail_arm(n);
        enum herr e = rt->up->open(rt, r);
        bool fired = alloc_fail_fired();
        size_t live = alloc_fail_live();
        alloc_fail_disarm();
        if (!fired) {
            assert_int_equal(e, HERR_NONE);
            assert_ptr_equal(r->up, proto->up);
            assert_int_equal(live, 1);
            assert_int_equal(proto->streams(sess), before + 1);
            *out = r;
            return fails;
        }
        fails++;
        if (e != HERR_INTERNAL)
            fail_msg("allocation %lu failed: open returned %d, not HERR_INTERNAL", n, (int)e);
        if (r->up != NULL || live != 0)
            fail_msg("allocation %lu failed: attached %d, %zu blocks leaked", n, r->up != NULL,
                     live);
        assert_int_equal(proto->streams(sess), before);
        assert_int_equal(g.ntexts, texts);
        assert_int_equal(f->heads + f->ends + f->errors, 0);
        gw_req_free(r);
    }
}

/* ================= native: gateway h2 client <-> nghttp2 server ================= */

#define SRV_MAX 8

struct resp_src {
    const char *p;
    size_t len;
    size_t off;
};

/* The agent's side: a real nghttp2 server session. */
static struct srv {
    nghttp2_session *h2;
    struct evbuffer *out;    /* bytes to the gateway */
    int32_t ids[SRV_MAX];    /* request streams, in arrival order */
    char hdrs[SRV_MAX][2048]; /* "name: value\n" per request header field */
    size_t hlen[SRV_MAX];
    char body[SRV_MAX][1024];
    size_t blen[SRV_MAX];
    bool ended[SRV_MAX];     /* END_STREAM seen from the gateway */
    uint32_t close_code[SRV_MAX];
    bool closed[SRV_MAX];
    int nreq;
    int goaways;
    struct resp_src src[SRV_MAX];
} srv;

static int srv_idx(int32_t id)
{
    for (int i = 0; i < srv.nreq; i++) {
        if (srv.ids[i] == id)
            return i;
    }
    return -1;
}

static ssize_t srv_send(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *u)
{
    assert_int_equal(evbuffer_add(srv.out, data, len), 0);
    return (ssize_t)len;
}

static int srv_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *u)
{
    if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
        assert_true(srv.nreq < SRV_MAX);
        srv.ids[srv.nreq] = f->hd.stream_id;
        srv.hlen[srv.nreq] = 0;
        srv.hdrs[srv.nreq][0] = '\0';
        srv.nreq++;
    }
    return 0;
}

static int srv_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                      size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                      void *u)
{
    int i = srv_idx(f->hd.stream_id);
    size_t room;
    int k;

    assert_true(i >= 0);
    room = sizeof(srv.hdrs[i]) - srv.hlen[i];
    k = snprintf(srv.hdrs[i] + srv.hlen[i], room, "%.*s: %.*s\n", (int)namelen,
                 (const char *)name, (int)valuelen, (const char *)value);
    assert_true(k > 0 && (size_t)k < room);
    srv.hlen[i] += (size_t)k;
    return 0;
}

static int srv_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *u)
{
    int i;

    if (f->hd.type == NGHTTP2_GOAWAY) {
        srv.goaways++;
        return 0;
    }
    i = srv_idx(f->hd.stream_id);
    if (i >= 0 && (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0 &&
        (f->hd.type == NGHTTP2_HEADERS || f->hd.type == NGHTTP2_DATA))
        srv.ended[i] = true;
    return 0;
}

static int srv_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                    size_t len, void *u)
{
    int i = srv_idx(id);

    assert_true(i >= 0);
    assert_true(srv.blen[i] + len < sizeof(srv.body[i]));
    memcpy(srv.body[i] + srv.blen[i], data, len);
    srv.blen[i] += len;
    srv.body[i][srv.blen[i]] = '\0';
    return 0;
}

static int srv_stream_close(nghttp2_session *s, int32_t id, uint32_t code, void *u)
{
    int i = srv_idx(id);

    if (i >= 0) {
        srv.closed[i] = true;
        srv.close_code[i] = code;
    }
    return 0;
}

static void srv_start(void)
{
    nghttp2_session_callbacks *cbs;
    nghttp2_settings_entry iv = {NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL, 1};

    memset(&srv, 0, sizeof(srv));
    srv.out = evbuffer_new();
    assert_non_null(srv.out);
    assert_int_equal(nghttp2_session_callbacks_new(&cbs), 0);
    nghttp2_session_callbacks_set_send_callback(cbs, srv_send);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, srv_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, srv_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, srv_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, srv_data);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, srv_stream_close);
    {
        /* a hostile agent's heads may be as long as it likes on the wire */
        nghttp2_option *opt;
        assert_int_equal(nghttp2_option_new(&opt), 0);
        nghttp2_option_set_max_send_header_block_length(opt, 4u << 20);
        assert_int_equal(nghttp2_session_server_new2(&srv.h2, cbs, NULL, opt), 0);
        nghttp2_option_del(opt);
    }
    nghttp2_session_callbacks_del(cbs);
    /* as the agent does: extended CONNECT (RFC 8441) for WebSockets */
    assert_int_equal(nghttp2_submit_settings(srv.h2, NGHTTP2_FLAG_NONE, &iv, 1), 0);
}

static void srv_stop(void)
{
    nghttp2_session_del(srv.h2);
    evbuffer_free(srv.out);
    srv.h2 = NULL;
    srv.out = NULL;
}

static ssize_t srv_read_body(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                             uint32_t *flags, nghttp2_data_source *source, void *u)
{
    struct resp_src *rs = source->ptr;
    size_t n = rs->len - rs->off;

    if (n > length)
        n = length;
    memcpy(buf, rs->p + rs->off, n);
    rs->off += n;
    if (rs->off == rs->len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1, NGHTTP2_NV_FLAG_NONE}

/* The agent answers request i: status, x-reply: yes, then body. */
static void srv_respond(int i, const char *status, const char *body)
{
    nghttp2_nv nv[] = {
        {(uint8_t *)":status", (uint8_t *)status, 7, strlen(status), NGHTTP2_NV_FLAG_NONE},
        NV("x-reply", "yes"),
        NV("content-type", "text/plain"),
    };
    nghttp2_data_provider prd = {.source.ptr = &srv.src[i], .read_callback = srv_read_body};

    srv.src[i] = (struct resp_src){body, strlen(body), 0};
    assert_int_equal(nghttp2_submit_response(srv.h2, srv.ids[i], nv, 3, &prd), 0);
}

/* The agent answers request i with a head only (the stream stays open). */
static void srv_respond_head(int i, const char *status)
{
    nghttp2_nv nv[] = {
        {(uint8_t *)":status", (uint8_t *)status, 7, strlen(status), NGHTTP2_NV_FLAG_NONE},
    };

    assert_int_equal(nghttp2_submit_headers(srv.h2, NGHTTP2_FLAG_NONE, srv.ids[i], NULL, nv, 1,
                                            NULL),
                     0);
}

/* Moves bytes both ways, as the tunnel's loop would (a kick runs flush; every
 * binary message is followed by a kick), until nothing moves. */
static void pump(void *sess)
{
    for (int round = 0; round < 1000; round++) {
        bool moved = false;
        size_t n;

        if (g.kicks > 0) {
            g.kicks = 0;
            gw_tun_h2_proto.flush(sess);
            moved = true;
        }
        n = evbuffer_get_length(g.c2s);
        if (n > 0) {
            ssize_t rv = nghttp2_session_mem_recv(srv.h2, evbuffer_pullup(g.c2s, -1), n);
            assert_int_equal(rv, (ssize_t)n);
            evbuffer_drain(g.c2s, n);
            moved = true;
        }
        if (nghttp2_session_want_write(srv.h2))
            assert_int_equal(nghttp2_session_send(srv.h2), 0);
        n = evbuffer_get_length(srv.out);
        if (n > 0) {
            assert_int_equal(gw_tun_h2_proto.on_binary(sess, evbuffer_pullup(srv.out, -1), n), 0);
            evbuffer_drain(srv.out, n);
            g.kicks++;
            moved = true;
        }
        if (!moved)
            return;
    }
    fail_msg("the in-memory tunnel did not settle");
}

/* A started native session with the agent's SETTINGS exchanged. */
static void *h2_env_new(void)
{
    void *sess;

    srv_start();
    sess = gw_tun_h2_proto.sess_new(&g.tun, &g.ctx, &g.ws, 42);
    assert_non_null(sess);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    assert_int_equal(gw_tun_h2_proto.start(sess, 0), 0);
    g_close_sess = sess;
    /* start sent the preface and SETTINGS at once */
    assert_true(evbuffer_get_length(g.c2s) >= 24);
    assert_memory_equal(evbuffer_pullup(g.c2s, 24), NGHTTP2_CLIENT_MAGIC, 24);
    pump(sess);
    assert_int_equal(srv.nreq, 0);
    return sess;
}

static void h2_env_free(void *sess)
{
    g_close_sess = NULL;
    gw_tun_h2_proto.sess_free(sess);
    srv_stop();
}

/* The request HEADERS the agent got for request i. */
static void expect_native_head(int i, const char *method, const char *path)
{
    char line[256];

    snprintf(line, sizeof(line), ":method: %s", method);
    expect_line(srv.hdrs[i], line);
    snprintf(line, sizeof(line), ":path: %s", path);
    expect_line(srv.hdrs[i], line);
    expect_line(srv.hdrs[i], ":scheme: https");
    expect_line(srv.hdrs[i], ":authority: " AUTHORITY);
    expect_line(srv.hdrs[i], "user-agent: unit/1");
    expect_line(srv.hdrs[i], "cookie: a=1");
    expect_line(srv.hdrs[i], "x-forwarded-for: " CLIENT_IP);
    expect_line(srv.hdrs[i], "x-forwarded-proto: https");
    expect_line(srv.hdrs[i], "x-forwarded-host: " AUTHORITY);
    expect_line(srv.hdrs[i], "x-agent-address: " ADDR_STR);
    /* the client's own X-Forwarded-For is gone: exactly the fields above */
    assert_false(has_line(srv.hdrs[i], "x-forwarded-for: 6.6.6.6"));
    assert_int_equal(count_lines(srv.hdrs[i]), 10);
}

static void test_h2_open_alloc_fail(void **state)
{
    void *sess = h2_env_new();
    struct gw_route rt;
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "GET", "/a?b=1", NULL, NULL);

    route_init(&rt, &gw_tun_h2_proto, sess);
    /* the stream and its header array; nghttp2 (a shared library) allocates
     * through its own malloc, which the wrappers do not see */
    assert_int_equal(open_walk(&gw_tun_h2_proto, sess, &rt, r), 2);
    assert_int_equal(g.kicks, 1);
    pump(sess);
    assert_int_equal(srv.nreq, 1);
    expect_native_head(0, "GET", "/a?b=1");
    assert_true(srv.ended[0]); /* no body: END_STREAM on HEADERS */

    /* the response reaches the front end */
    srv_respond(0, "200", "hello");
    pump(sess);
    assert_int_equal(f.heads, 1);
    assert_int_equal(f.status, 200);
    expect_line(f.hdrs, "x-reply: yes");
    expect_line(f.hdrs, "content-type: text/plain");
    assert_int_equal(count_lines(f.hdrs), 2);
    assert_int_equal(f.blen, 5);
    assert_string_equal(f.body, "hello");
    assert_int_equal(f.ends, 1);
    assert_true(f.complete);
    assert_int_equal(f.errors, 0);
    assert_null(r->up);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    assert_true(srv.closed[0]);
    assert_int_equal(srv.close_code[0], NGHTTP2_NO_ERROR);
    assert_int_equal(g.ctx.n.bytes_from_agents, 5);
    gw_req_free(r);

    /* a second open on the same session still works, under tracking too */
    r = req_new(&f, "GET", "/again", NULL, NULL);
    assert_int_equal(open_walk(&gw_tun_h2_proto, sess, &rt, r), 2);
    pump(sess);
    assert_int_equal(srv.nreq, 2);
    assert_int_equal(srv.ids[1], 3);
    srv_respond(1, "204", "");
    pump(sess);
    assert_int_equal(f.status, 204);
    assert_int_equal(f.ends, 1);
    assert_int_equal(f.blen, 0);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    gw_req_free(r);
    assert_int_equal(g.closes, 0);
    h2_env_free(sess);
}

/* A request body flows to the agent; the client's forwarding headers are
 * replaced by the gateway's. */
static void test_h2_request_body(void **state)
{
    void *sess = h2_env_new();
    struct gw_route rt;
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "POST", "/upload", NULL, "ping");

    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r), HERR_NONE);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 1);
    pump(sess);
    assert_int_equal(srv.nreq, 1);
    expect_native_head(0, "POST", "/upload");
    assert_string_equal(srv.body[0], "ping");
    assert_true(srv.ended[0]);
    assert_int_equal(f.drained, 1);
    assert_int_equal(r->body_out, 4);
    assert_int_equal(g.ctx.n.bytes_to_agents, 4);

    srv_respond(0, "201", "created!");
    pump(sess);
    assert_int_equal(f.status, 201);
    assert_string_equal(f.body, "created!");
    assert_int_equal(f.ends, 1);
    assert_true(f.complete);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    gw_req_free(r);
    h2_env_free(sess);
}

/* The front end cancels: detached at once, RST_STREAM CANCEL reaches the
 * agent, and the stream leaves the count once the session sent it. */
static void test_h2_cancel(void **state)
{
    void *sess = h2_env_new();
    struct gw_route rt;
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "GET", "/slow", NULL, NULL);

    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r), HERR_NONE);
    pump(sess);
    assert_int_equal(srv.nreq, 1);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 1);

    g.kicks = 0;
    gw_req_cancel(r);
    assert_null(r->up);
    assert_null(r->up_data);
    assert_int_equal(g.kicks, 1);
    /* not yet processed: the RST waits for flush */
    assert_int_equal(gw_tun_h2_proto.streams(sess), 1);
    assert_false(srv.closed[0]);
    pump(sess);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    assert_true(srv.closed[0]);
    assert_int_equal(srv.close_code[0], NGHTTP2_CANCEL);
    /* the front end heard nothing: it cancelled */
    assert_int_equal(f.heads + f.ends + f.errors, 0);
    gw_req_free(r);

    /* the session serves the next request */
    r = req_new(&f, "GET", "/next", NULL, NULL);
    assert_int_equal(rt.up->open(&rt, r), HERR_NONE);
    pump(sess);
    assert_int_equal(srv.nreq, 2);
    srv_respond(1, "200", "ok");
    pump(sess);
    assert_string_equal(f.body, "ok");
    assert_int_equal(f.ends, 1);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    gw_req_free(r);
    assert_int_equal(g.closes, 0);
    h2_env_free(sess);
}

/* An agent that sends a PUSH_PROMISE (push is disabled) makes the session
 * end itself with GOAWAY PROTOCOL_ERROR: the tunnel is closed at once and the
 * request in flight fails now, not at its response-header timeout. */
static void test_h2_session_ended_closes_tunnel(void **state)
{
    void *sess = h2_env_new();
    struct gw_route rt;
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "GET", "/pushy", NULL, NULL);
    /* PUSH_PROMISE on stream 1, END_HEADERS, promising stream 2; header
     * block :method GET, :scheme https, :path / (HPACK static entries) */
    static const uint8_t push[] = {0, 0, 7, 0x05, 0x04, 0, 0, 0, 1,
                                   0, 0, 0, 2, 0x82, 0x87, 0x84};

    (void)state;
    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r), HERR_NONE);
    pump(sess);
    assert_int_equal(srv.nreq, 1);
    (void)gw_tun_h2_proto.on_binary(sess, push, sizeof(push));
    gw_tun_h2_proto.flush(sess);
    assert_int_equal(g.closes, 1);
    assert_int_equal(g.close_code, WS_CLOSE_PROTOCOL_ERROR);
    /* the request failed at once with the tunnel */
    assert_int_equal(f.errors, 1);
    assert_int_equal(f.err, HERR_TUNNEL_CLOSED);
    assert_null(r->up);
    gw_req_free(r);
    h2_env_free(sess);
}

/* max-streams-per-tunnel 2: the third request is refused with host_busy,
 * and admitted once one of the two ended. */
/* The agent answers request i with n copies of one header (HPACK sends
 * each copy after the first as a one-byte reference). */
static void srv_respond_many(int i, size_t n, size_t vlen)
{
    nghttp2_nv *nv = calloc(n + 1, sizeof(*nv));
    char *v = malloc(vlen);

    assert_non_null(nv);
    assert_non_null(v);
    memset(v, 'v', vlen);
    nv[0] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE};
    for (size_t k = 1; k <= n; k++)
        nv[k] = (nghttp2_nv){(uint8_t *)"x-h", (uint8_t *)v, 3, vlen, NGHTTP2_NV_FLAG_NONE};
    assert_int_equal(nghttp2_submit_response(srv.h2, srv.ids[i], nv, n + 1, NULL), 0);
    free(nv);
    free(v);
}

/* A response head is bounded as it is decoded (fields, and bytes counted as
 * RFC 9113 6.5.2 does): past either, 502 bad_host_response and the stream is
 * reset, whatever few bytes it took on the wire; the tunnel carries on. */
static void test_h2_header_limits(void **state)
{
    void *sess = h2_env_new();
    struct gw_route rt;
    struct fe_rec f[2];
    struct gw_req *r0 = req_new(&f[0], "GET", "/0", NULL, NULL);
    struct gw_req *r1 = req_new(&f[1], "GET", "/1", NULL, NULL);

    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r0), HERR_NONE);
    assert_int_equal(rt.up->open(&rt, r1), HERR_NONE);
    pump(sess);
    assert_int_equal(srv.nreq, 2);
    srv_respond_many(0, 1001, 1);    /* 1,001 fields of 36 bytes */
    srv_respond_many(1, 90, 3000);  /* 90 x 3,035 bytes: 273 KB from ~3 KB */
    pump(sess);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(f[i].errors, 1);
        assert_int_equal(f[i].err, HERR_BAD_HOST_RESPONSE);
        assert_int_equal(f[i].heads, 0);
    }
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    assert_int_equal(g.closes, 0);
    gw_req_free(r0);
    gw_req_free(r1);
    /* 1,000 fields, and heads just under the byte bound, pass */
    r0 = req_new(&f[0], "GET", "/2", NULL, NULL);
    r1 = req_new(&f[1], "GET", "/3", NULL, NULL);
    assert_int_equal(rt.up->open(&rt, r0), HERR_NONE);
    assert_int_equal(rt.up->open(&rt, r1), HERR_NONE);
    pump(sess);
    srv_respond_many(2, 999, 1);
    srv_respond_many(3, 80, 3000);
    pump(sess);
    assert_int_equal(f[0].heads, 1);
    assert_int_equal(f[1].heads, 1);
    assert_int_equal(f[0].nhdrs, 999);
    assert_int_equal(f[1].nhdrs, 80);
    assert_int_equal(f[0].errors + f[1].errors, 0);
    gw_req_free(r0);
    gw_req_free(r1);
    gw_tun_h2_proto.sess_free(sess);
}

static void test_h2_host_busy(void **state)
{
    void *sess = h2_env_new();
    struct gw_route rt;
    struct fe_rec f[3];
    struct gw_req *r0 = req_new(&f[0], "GET", "/0", NULL, NULL);
    struct gw_req *r1 = req_new(&f[1], "GET", "/1", NULL, NULL);
    struct gw_req *r2 = req_new(&f[2], "GET", "/2", NULL, NULL);

    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r0), HERR_NONE);
    assert_int_equal(rt.up->open(&rt, r1), HERR_NONE);
    assert_int_equal(gw_tun_h2_proto.streams(sess), MAX_STREAMS);
    alloc_fail_track();
    assert_int_equal(rt.up->open(&rt, r2), HERR_HOST_BUSY);
    assert_int_equal(alloc_fail_seen(), 0); /* refused before allocating */
    alloc_fail_disarm();
    assert_null(r2->up);
    assert_int_equal(gw_tun_h2_proto.streams(sess), MAX_STREAMS);
    pump(sess);
    assert_int_equal(srv.nreq, 2);

    srv_respond(0, "200", "zero");
    pump(sess);
    assert_int_equal(f[0].ends, 1);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 1);
    assert_int_equal(rt.up->open(&rt, r2), HERR_NONE);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 2);
    pump(sess);
    assert_int_equal(srv.nreq, 3);
    expect_native_head(2, "GET", "/2");
    /* r1's client leaves, r2 completes */
    gw_req_cancel(r1);
    srv_respond(2, "200", "two");
    pump(sess);
    assert_string_equal(f[2].body, "two");
    assert_int_equal(f[1].heads + f[1].ends + f[1].errors, 0);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    gw_req_free(r0);
    gw_req_free(r1);
    gw_req_free(r2);
    h2_env_free(sess);
}

/* Drain: `draining` goes out with the grace, GOAWAY reaches the agent, new
 * opens get agent_offline, the stream in flight finishes, then the tunnel
 * closes. */
static void test_h2_drain(void **state)
{
    void *sess = h2_env_new();
    struct gw_route rt;
    struct fe_rec f0, f1;
    struct gw_req *r0 = req_new(&f0, "GET", "/inflight", NULL, NULL);
    struct gw_req *r1;

    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r0), HERR_NONE);
    pump(sess);
    gw_tun_h2_proto.drain(sess);
    assert_int_equal(g.msgs, 1);
    assert_int_equal(g.msg_type, TUN_MSG_DRAINING);
    assert_int_equal(g.msg_grace, 600);
    assert_int_equal(g.closes, 0); /* a stream is in flight */
    pump(sess);
    assert_int_equal(srv.goaways, 1);

    r1 = req_new(&f1, "GET", "/late", NULL, NULL);
    assert_int_equal(rt.up->open(&rt, r1), HERR_AGENT_OFFLINE);
    assert_null(r1->up);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 1);

    srv_respond(0, "200", "done");
    pump(sess);
    assert_string_equal(f0.body, "done");
    assert_int_equal(f0.ends, 1);
    assert_true(f0.complete);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    /* closed once the last stream ended, with the drain's 1012 (as when
     * nothing was in flight) */
    assert_int_equal(g.closes, 1);
    assert_int_equal(g.close_code, WS_CLOSE_RESTART);
    assert_string_equal(g.close_reason, "draining");
    gw_req_free(r0);
    gw_req_free(r1);
    h2_env_free(sess);

    /* with nothing in flight the tunnel closes at once, 1012 */
    test_setup(NULL);
    sess = h2_env_new();
    gw_tun_h2_proto.drain(sess);
    assert_int_equal(g.msgs, 1);
    assert_int_equal(g.closes, 1);
    assert_int_equal(g.close_code, WS_CLOSE_RESTART);
    assert_string_equal(g.close_reason, "draining");
    route_init(&rt, &gw_tun_h2_proto, sess);
    r1 = req_new(&f1, "GET", "/late", NULL, NULL);
    assert_int_equal(rt.up->open(&rt, r1), HERR_AGENT_OFFLINE);
    assert_null(r1->up);
    gw_req_free(r1);
    h2_env_free(sess);
}

/* Before start there is no h2 session; after fail_all the tunnel is going:
 * both refuse with agent_offline. fail_all fails the stream in flight. */
static void test_h2_offline_states(void **state)
{
    void *sess = gw_tun_h2_proto.sess_new(&g.tun, &g.ctx, &g.ws, 44);
    struct gw_route rt;
    struct fe_rec f0, f1;
    struct gw_req *r0 = req_new(&f0, "GET", "/x", NULL, NULL);
    struct gw_req *r1;

    assert_non_null(sess);
    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r0), HERR_AGENT_OFFLINE);
    assert_null(r0->up);
    gw_tun_h2_proto.sess_free(sess);

    sess = h2_env_new();
    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r0), HERR_NONE);
    pump(sess);
    gw_tun_h2_proto.fail_all(sess);
    assert_int_equal(f0.errors, 1);
    assert_int_equal(f0.err, HERR_TUNNEL_CLOSED);
    assert_null(r0->up);
    r1 = req_new(&f1, "GET", "/y", NULL, NULL);
    assert_int_equal(rt.up->open(&rt, r1), HERR_AGENT_OFFLINE);
    assert_null(r1->up);
    gw_req_free(r0);
    gw_req_free(r1);
    h2_env_free(sess);
}

/* ================= Osaurus ================= */

static void *osr_env_new(void)
{
    void *sess = gw_osr_proto.sess_new(&g.tun, &g.ctx, &g.ws, 43);

    assert_non_null(sess);
    assert_int_equal(gw_osr_proto.start(sess, 0), 0);
    assert_int_equal(gw_osr_proto.streams(sess), 0);
    assert_int_equal(g.ntexts, 0);
    return sess;
}

static const struct iov *msg_hdr(const struct tun_msg *m, const char *name)
{
    for (size_t i = 0; i < m->http.n_hdrs; i++) {
        const struct tun_msg_hdr *h = &m->http.hdrs[i];
        if (h->name.len == strlen(name) && memcmp(h->name.base, name, h->name.len) == 0)
            return &h->value;
    }
    return NULL;
}

static void expect_iov(const struct iov *v, const char *want)
{
    assert_non_null(v);
    if (v->len != strlen(want) || memcmp(v->base, want, v->len) != 0)
        fail_msg("\"%.*s\" is not \"%s\"", (int)v->len, v->base, want);
}

/* Decodes text k; its type must be type. The caller clears m. */
static void decode_text(int k, enum tun_msg_type type, struct tun_msg *m)
{
    const char *code = NULL;

    assert_true(k < g.ntexts);
    assert_int_equal(tun_msg_decode(g.texts[k], g.text_len[k], TUN_MODE_OSAURUS, m, &code), 0);
    assert_int_equal(m->type, type);
}

/* Feeds one client frame (JSON) to the session as the tunnel would. */
static void osr_feed(void *sess, const char *json)
{
    struct tun_msg m;
    const char *code = NULL;

    if (tun_msg_decode(json, strlen(json), TUN_MODE_OSAURUS, &m, &code) != 0)
        fail_msg("frame does not decode (%s): %s", code != NULL ? code : "?", json);
    gw_osr_proto.on_data(sess, &m);
    tun_msg_clear(&m);
}

/* The request frame k; copies its id to id. */
static void expect_osr_request(int k, const char *method, const char *path, const char *body,
                               char id[TUN_ID_MAX + 1])
{
    struct tun_msg m;

    decode_text(k, TUN_MSG_REQUEST, &m);
    assert_int_equal(strlen(m.http.id), 36);
    memcpy(id, m.http.id, sizeof(m.http.id));
    expect_iov(&m.http.method, method);
    expect_iov(&m.http.path, path);
    expect_iov(&m.http.body, body);
    expect_iov(msg_hdr(&m, "user-agent"), "unit/1");
    expect_iov(msg_hdr(&m, "cookie"), "a=1");
    expect_iov(msg_hdr(&m, "x-agent-address"), ADDR_STR);
    /* exactly one address: the public client, not the client's claim */
    expect_iov(msg_hdr(&m, "x-forwarded-for"), CLIENT_IP);
    expect_iov(msg_hdr(&m, "x-forwarded-proto"), "https");
    expect_iov(msg_hdr(&m, "x-forwarded-host"), AUTHORITY);
    tun_msg_clear(&m);
}

static struct gw_req *osr_post_new(struct fe_rec *f)
{
    return req_new(f, "POST", "/v1/chat", NULL, "{\"m\":1}");
}

static void test_osr_open_alloc_fail(void **state)
{
    void *sess = osr_env_new();
    struct gw_route rt;
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "GET", "/v1/models?x=1", NULL, NULL);
    char id[TUN_ID_MAX + 1];
    char json[512];
    unsigned long fails;

    route_init(&rt, &gw_osr_proto, sess);
    /* the request, the header frame's two arrays and joined values, and the
     * encoder's output buffer, grown once for this frame (tun_msg's own
     * writer; cJSON allocates in its shared library, unseen); a GET has no
     * body buffer */
    fails = open_walk(&gw_osr_proto, sess, &rt, r);
    assert_int_equal(fails, 6);
    assert_int_equal(g.ntexts, 1);
    expect_osr_request(0, "GET", "/v1/models?x=1", "", id);

    snprintf(json, sizeof(json),
             "{\"type\":\"response\",\"id\":\"%s\",\"status\":201,\"headers\":"
             "{\"Content-Type\":\"text/plain\",\"X-Reply\":\"yes\"},\"body\":\"hello\"}",
             id);
    osr_feed(sess, json);
    assert_int_equal(f.heads, 1);
    assert_int_equal(f.status, 201);
    expect_line(f.hdrs, "content-type: text/plain");
    expect_line(f.hdrs, "x-reply: yes");
    expect_line(f.hdrs, "access-control-allow-origin: *");
    expect_line(f.hdrs, "access-control-expose-headers: *");
    expect_line(f.hdrs, "content-length: 5");
    assert_int_equal(count_lines(f.hdrs), 5);
    assert_string_equal(f.body, "hello");
    assert_int_equal(f.ends, 1);
    assert_true(f.complete);
    assert_int_equal(f.errors, 0);
    assert_null(r->up);
    assert_int_equal(gw_osr_proto.streams(sess), 0);
    assert_int_equal(g.ctx.n.bytes_from_agents, 5);
    /* a late duplicate is ignored */
    osr_feed(sess, json);
    assert_int_equal(f.heads, 1);
    gw_req_free(r);

    /* with a body, under failure again */
    /* one more: the encoder's buffer grows once for this longer frame */
    assert_int_equal(open_walk_fresh(&gw_osr_proto, sess, &rt, osr_post_new, &f, &r), 7);
    assert_int_equal(g.ntexts, 2);
    expect_osr_request(1, "POST", "/v1/chat", "{\"m\":1}", id);
    assert_int_equal(f.drained, 1);
    assert_int_equal(g.ctx.n.bytes_to_agents, 7);
    snprintf(json, sizeof(json), "{\"type\":\"stream_start\",\"id\":\"%s\",\"status\":200,"
             "\"headers\":{}}", id);
    osr_feed(sess, json);
    snprintf(json, sizeof(json), "{\"type\":\"stream_chunk\",\"id\":\"%s\",\"data\":\"ab\"}", id);
    osr_feed(sess, json);
    osr_feed(sess, json);
    assert_int_equal(f.ends, 0);
    assert_int_equal(gw_osr_proto.streams(sess), 1);
    snprintf(json, sizeof(json), "{\"type\":\"stream_end\",\"id\":\"%s\"}", id);
    osr_feed(sess, json);
    assert_int_equal(f.status, 200);
    assert_string_equal(f.body, "abab");
    assert_int_equal(f.ends, 1);
    assert_true(f.complete);
    assert_int_equal(gw_osr_proto.streams(sess), 0);
    gw_req_free(r);
    assert_int_equal(g.closes, 0);
    gw_osr_proto.sess_free(sess);
}

/* Cancel: detached and out of the count at once, `cancel` with the id sent,
 * a later response for the id ignored. */
static void test_osr_cancel(void **state)
{
    void *sess = osr_env_new();
    struct gw_route rt;
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "GET", "/slow", NULL, NULL);
    char id[TUN_ID_MAX + 1];
    char json[512];
    struct tun_msg m;

    route_init(&rt, &gw_osr_proto, sess);
    assert_int_equal(rt.up->open(&rt, r), HERR_NONE);
    assert_int_equal(gw_osr_proto.streams(sess), 1);
    expect_osr_request(0, "GET", "/slow", "", id);
    gw_req_cancel(r);
    assert_null(r->up);
    assert_int_equal(gw_osr_proto.streams(sess), 0);
    assert_int_equal(g.ntexts, 2);
    decode_text(1, TUN_MSG_CANCEL, &m);
    assert_string_equal(m.http.id, id);
    tun_msg_clear(&m);
    snprintf(json, sizeof(json),
             "{\"type\":\"response\",\"id\":\"%s\",\"status\":200,\"headers\":{},\"body\":\"x\"}",
             id);
    osr_feed(sess, json);
    assert_int_equal(f.heads + f.ends + f.errors, 0);
    gw_req_free(r);
    gw_osr_proto.sess_free(sess);
}

static void test_osr_host_busy(void **state)
{
    void *sess = osr_env_new();
    struct gw_route rt;
    struct fe_rec f[3];
    struct gw_req *r0 = req_new(&f[0], "GET", "/0", NULL, NULL);
    struct gw_req *r1 = req_new(&f[1], "GET", "/1", NULL, NULL);
    struct gw_req *r2 = req_new(&f[2], "GET", "/2", NULL, NULL);

    route_init(&rt, &gw_osr_proto, sess);
    assert_int_equal(rt.up->open(&rt, r0), HERR_NONE);
    assert_int_equal(rt.up->open(&rt, r1), HERR_NONE);
    assert_int_equal(g.ntexts, 2);
    alloc_fail_track();
    assert_int_equal(rt.up->open(&rt, r2), HERR_HOST_BUSY);
    assert_int_equal(alloc_fail_seen(), 0);
    alloc_fail_disarm();
    assert_null(r2->up);
    assert_int_equal(g.ntexts, 2);
    assert_int_equal(gw_osr_proto.streams(sess), MAX_STREAMS);
    gw_req_cancel(r0);
    assert_int_equal(gw_osr_proto.streams(sess), 1);
    assert_int_equal(rt.up->open(&rt, r2), HERR_NONE);
    assert_int_equal(gw_osr_proto.streams(sess), 2);
    gw_req_free(r0);
    gw_req_free(r1); /* cancels */
    gw_req_free(r2);
    assert_int_equal(gw_osr_proto.streams(sess), 0);
    gw_osr_proto.sess_free(sess);
}

/* Drain: `error relay_restarting` at once, new opens get agent_offline, the
 * request in flight finishes, then close 1012. */
static void test_osr_drain(void **state)
{
    void *sess = osr_env_new();
    struct gw_route rt;
    struct fe_rec f0, f1;
    struct gw_req *r0 = req_new(&f0, "GET", "/inflight", NULL, NULL);
    struct gw_req *r1 = req_new(&f1, "GET", "/late", NULL, NULL);
    char id[TUN_ID_MAX + 1];
    char json[512];
    struct tun_msg m;

    route_init(&rt, &gw_osr_proto, sess);
    assert_int_equal(rt.up->open(&rt, r0), HERR_NONE);
    expect_osr_request(0, "GET", "/inflight", "", id);
    gw_osr_proto.drain(sess);
    assert_int_equal(g.ntexts, 2);
    decode_text(1, TUN_MSG_ERROR, &m);
    assert_int_equal(m.error.err, TUN_E_RELAY_RESTARTING);
    tun_msg_clear(&m);
    assert_int_equal(g.closes, 0);
    assert_int_equal(rt.up->open(&rt, r1), HERR_AGENT_OFFLINE);
    assert_null(r1->up);
    assert_int_equal(gw_osr_proto.streams(sess), 1);
    assert_int_equal(g.ntexts, 2);

    snprintf(json, sizeof(json),
             "{\"type\":\"response\",\"id\":\"%s\",\"status\":200,\"headers\":{},\"body\":\"ok\"}",
             id);
    osr_feed(sess, json);
    assert_string_equal(f0.body, "ok");
    assert_int_equal(f0.ends, 1);
    assert_int_equal(gw_osr_proto.streams(sess), 0);
    assert_int_equal(g.closes, 1);
    assert_int_equal(g.close_code, WS_CLOSE_RESTART);
    assert_string_equal(g.close_reason, "relay_restarting");
    gw_req_free(r0);
    gw_req_free(r1);
    gw_osr_proto.sess_free(sess);

    /* idle: closes at once */
    test_setup(NULL);
    sess = osr_env_new();
    gw_osr_proto.drain(sess);
    assert_int_equal(g.ntexts, 1);
    assert_int_equal(g.closes, 1);
    assert_int_equal(g.close_code, WS_CLOSE_RESTART);
    gw_osr_proto.sess_free(sess);
}

/* JSON frames cannot carry a WebSocket (501 unsupported_upgrade); a plain
 * CONNECT is refused too; neither allocates nor sends anything. */
static void test_osr_refusals(void **state)
{
    void *sess = osr_env_new();
    struct gw_route rt;
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "CONNECT", "/ws", "websocket", NULL);

    route_init(&rt, &gw_osr_proto, sess);
    assert_true(gw_req_is_websocket(r));
    alloc_fail_track();
    assert_int_equal(rt.up->open(&rt, r), HERR_UNSUPPORTED_UPGRADE);
    assert_int_equal(alloc_fail_seen(), 0);
    alloc_fail_disarm();
    assert_null(r->up);
    assert_int_equal(gw_osr_proto.streams(sess), 0);
    assert_int_equal(g.ntexts, 0);
    gw_req_free(r);

    r = req_new(&f, "CONNECT", "host:443", NULL, NULL);
    assert_int_equal(rt.up->open(&rt, r), HERR_METHOD_NOT_ALLOWED);
    assert_null(r->up);
    gw_req_free(r);

    /* a declared body past the relay's 10 MB */
    r = req_new(&f, "PUT", "/big", NULL, NULL);
    r->has_content_length = true;
    r->content_length = TUN_OSR_MAX_BODY + 1u;
    assert_int_equal(rt.up->open(&rt, r), HERR_BODY_TOO_LARGE);
    assert_null(r->up);
    assert_int_equal(gw_osr_proto.streams(sess), 0);
    assert_int_equal(g.ntexts, 0);
    assert_int_equal(f.heads + f.ends + f.errors, 0);
    gw_req_free(r);
    gw_osr_proto.sess_free(sess);
}

/* An upload held short of complete, declaring n bytes. */
static struct gw_req *held_upload(struct fe_rec *f, uint64_t n)
{
    struct gw_req *r = req_new(f, "PUT", "/up", NULL, NULL);

    r->body_eof = false;
    r->has_content_length = true;
    r->content_length = n;
    return r;
}

/* Bodies being collected are counted by their declared length at open, per
 * tunnel (64 MiB) and per gateway (max-osaurus-body-memory): past either,
 * 503 gateway_busy before anything went to the agent; a request that goes
 * gives its share back. */
static void test_osr_body_memory(void **state)
{
    void *sess = osr_env_new();
    struct gw_route rt;
    struct fe_rec f[8];
    struct gw_req *r[8];
    uint64_t n = 9990000;
    uint64_t max_streams = g.cfg.max_streams_per_tunnel;

    route_init(&rt, &gw_osr_proto, sess);
    g.cfg.max_streams_per_tunnel = 0;
    g.cfg.max_osaurus_body_memory = 25000000;
    for (int i = 0; i < 2; i++) {
        r[i] = held_upload(&f[i], n);
        assert_int_equal(rt.up->open(&rt, r[i]), HERR_NONE);
    }
    assert_int_equal(g.ctx.osr_body_memory, 2 * n);
    r[2] = held_upload(&f[2], n);
    assert_int_equal(rt.up->open(&rt, r[2]), HERR_GATEWAY_BUSY);
    assert_int_equal(g.last_limit, GW_LIMIT_OSAURUS_BODY_MEMORY);
    assert_null(r[2]->up);
    assert_int_equal(g.ctx.osr_body_memory, 2 * n);
    gw_req_cancel(r[0]);
    gw_req_free(r[0]);
    assert_int_equal(g.ctx.osr_body_memory, n);
    assert_int_equal(rt.up->open(&rt, r[2]), HERR_NONE);
    assert_int_equal(g.ctx.osr_body_memory, 2 * n);
    assert_int_equal(g.ntexts, 0); /* nothing was sent for any */
    /* the tunnel's own bound: six fit in 64 MiB, the seventh does not */
    g.cfg.max_osaurus_body_memory = 0;
    for (int i = 3; i < 7; i++) {
        r[i] = held_upload(&f[i], n);
        assert_int_equal(rt.up->open(&rt, r[i]), HERR_NONE);
    }
    r[7] = held_upload(&f[7], n);
    assert_int_equal(rt.up->open(&rt, r[7]), HERR_GATEWAY_BUSY);
    gw_req_free(r[7]);
    for (int i = 1; i < 7; i++) {
        gw_req_cancel(r[i]);
        gw_req_free(r[i]);
    }
    assert_int_equal(g.ctx.osr_body_memory, 0);
    g.cfg.max_osaurus_body_memory = 268435456;
    g.cfg.max_streams_per_tunnel = max_streams;
    gw_osr_proto.sess_free(sess);
}

/* The native session carries a WebSocket as RFC 8441 extended CONNECT. */
static void test_h2_websocket_head(void **state)
{
    void *sess = h2_env_new();
    struct gw_route rt;
    struct fe_rec f;
    struct gw_req *r = req_new(&f, "CONNECT", "/chat", "websocket", NULL);

    add_hdr(r, "Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    route_init(&rt, &gw_tun_h2_proto, sess);
    assert_int_equal(rt.up->open(&rt, r), HERR_NONE);
    pump(sess);
    assert_int_equal(srv.nreq, 1);
    expect_line(srv.hdrs[0], ":method: CONNECT");
    expect_line(srv.hdrs[0], ":protocol: websocket");
    expect_line(srv.hdrs[0], ":path: /chat");
    expect_line(srv.hdrs[0], "x-agent-address: " ADDR_STR);
    /* the HTTP/1.1 key is the gateway's to answer: RFC 8441 streams carry none */
    assert_null(strstr(srv.hdrs[0], "sec-websocket-key"));
    assert_int_equal(count_lines(srv.hdrs[0]), 11);
    assert_false(srv.ended[0]); /* a WebSocket's stream stays open for its bytes */
    assert_int_equal(gw_tun_h2_proto.streams(sess), 1);
    /* a 200 is the local API's accept: the head, and no end */
    srv_respond_head(0, "200");
    pump(sess);
    assert_int_equal(f.heads, 1);
    assert_int_equal(f.status, 200);
    assert_int_equal(f.ends + f.errors, 0);
    assert_ptr_equal(r->up, gw_tun_h2_proto.up);
    gw_req_cancel(r);
    pump(sess);
    assert_int_equal(gw_tun_h2_proto.streams(sess), 0);
    assert_int_equal(srv.close_code[0], NGHTTP2_CANCEL);
    gw_req_free(r);
    pump(sess);
    h2_env_free(sess);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_h2_open_alloc_fail, test_setup),
        cmocka_unit_test_setup(test_h2_request_body, test_setup),
        cmocka_unit_test_setup(test_h2_cancel, test_setup),
        cmocka_unit_test_setup(test_h2_session_ended_closes_tunnel, test_setup),
        cmocka_unit_test_setup(test_h2_host_busy, test_setup),
        cmocka_unit_test_setup(test_h2_drain, test_setup),
        cmocka_unit_test_setup(test_h2_offline_states, test_setup),
        cmocka_unit_test_setup(test_h2_websocket_head, test_setup),
        cmocka_unit_test_setup(test_osr_open_alloc_fail, test_setup),
        cmocka_unit_test_setup(test_osr_cancel, test_setup),
        cmocka_unit_test_setup(test_osr_host_busy, test_setup),
        cmocka_unit_test_setup(test_osr_drain, test_setup),
        cmocka_unit_test_setup(test_osr_refusals, test_setup),
        cmocka_unit_test_setup(test_osr_body_memory, test_setup),
        cmocka_unit_test_setup(test_h2_header_limits, test_setup),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
