/* Gateway endpoints; see gw_admin.h. */
#include "gw_admin.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_ipt.h"
#include "gw_metrics.h"
#include "gw_rds.h"
#include "gw_reg.h"
#include "gw_req.h"
#include "gw_tun.h"
#include "gw_up.h"
#include "herr.h"
#include "id.h"
#include "log.h"
#include "util.h"

#define ADMIN_BODY_MAX 4096
#define PRESENCE_MAX 100        /* addresses per /presence call */
/* 100 addresses of 42 characters and 99 commas, with room for %2C: a longer
 * value is refused before it is decoded or split. */
#define PRESENCE_PARAM_MAX 4800
#define ADMIN_PREFIX "/admin/"

/* Answers status with body and, when extra is set, one more header. */
static void respond_with(struct gw_req *r, int status, const char *ctype, const char *body,
                         size_t len, const char *extra_name, const char *extra_value)
{
    char clen[24];
    nghttp2_nv nv[4] = {
        {(uint8_t *)"content-type", (uint8_t *)ctype, 12, strlen(ctype), NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-length", (uint8_t *)clen, 14, 0, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"cache-control", (uint8_t *)"no-store", 13, 8, NGHTTP2_NV_FLAG_NONE},
        {NULL, NULL, 0, 0, NGHTTP2_NV_FLAG_NONE},
    };
    size_t n = 3;

    nv[1].valuelen = (size_t)snprintf(clen, sizeof(clen), "%zu", len);
    if (extra_name != NULL) {
        nv[3] = (nghttp2_nv){(uint8_t *)extra_name, (uint8_t *)extra_value, strlen(extra_name),
                             strlen(extra_value), NGHTTP2_NV_FLAG_NONE};
        n = 4;
    }
    if (gw_req_head(r, status, nv, n) != 0)
        return;
    if (!r->is_head && len > 0 && gw_req_body(r, (const uint8_t *)body, len) != 0)
        return;
    gw_req_end(r, true);
}

static void respond(struct gw_req *r, int status, const char *ctype, const char *body, size_t len)
{
    respond_with(r, status, ctype, body, len, NULL, NULL);
}

/* Answers the whole of buf (consumed). */
static void respond_buf(struct gw_req *r, int status, const char *ctype, struct evbuffer *buf)
{
    size_t len = evbuffer_get_length(buf);
    const unsigned char *p = len > 0 ? evbuffer_pullup(buf, -1) : (const unsigned char *)"";

    if (p == NULL) {
        gw_req_fail(r, HERR_INTERNAL);
        return;
    }
    respond(r, status, ctype, (const char *)p, len);
}

/* --region as the inside of a JSON string (the option takes any text):
 * quotes, backslashes and control characters escaped, cut to fit buf. */
static const char *region_json(const struct gw_ctx *ctx, char *buf, size_t size)
{
    const char *s = ctx->cfg->region != NULL ? ctx->cfg->region : "local";
    size_t o = 0;

    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        size_t n;

        if (c == '"' || c == '\\')
            n = (size_t)util_snprintf(esc, sizeof(esc), "\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            n = (size_t)util_snprintf(esc, sizeof(esc), "\\u%04x", c);
        else
            n = (size_t)util_snprintf(esc, sizeof(esc), "%c", c);
        if (o + n >= size)
            break;
        memcpy(buf + o, esc, n);
        o += n;
    }
    buf[o] = '\0';
    return buf;
}

static bool path_is(const char *path, const char *want)
{
    size_t n = strlen(want);

    return strncmp(path, want, n) == 0 && (path[n] == '\0' || path[n] == '?');
}

/* ---- /admin ---- */

bool gw_admin_denied(const struct gw_ctx *ctx, const uint8_t *addr)
{
    for (size_t i = 0; i < ctx->deny.n; i++) {
        if (memcmp(ctx->deny.addrs[i], addr, ID_ADDR_LEN) == 0)
            return true;
    }
    return false;
}

void gw_admin_cleanup(struct gw_ctx *ctx)
{
    free(ctx->deny.addrs);
    memset(&ctx->deny, 0, sizeof(ctx->deny));
}

static int deny_add(struct gw_ctx *ctx, const uint8_t *addr)
{
    struct gw_deny *d = &ctx->deny;

    if (gw_admin_denied(ctx, addr))
        return 0;
    if (d->n == d->cap) {
        size_t cap = d->cap != 0 ? d->cap * 2 : 16;
        uint8_t (*v)[ID_ADDR_LEN] = realloc(d->addrs, cap * sizeof(*v));
        if (v == NULL)
            return -1;
        d->addrs = v;
        d->cap = cap;
    }
    memcpy(d->addrs[d->n++], addr, ID_ADDR_LEN);
    return 0;
}

/* Returns true if addr was on the list. */
static bool deny_del(struct gw_ctx *ctx, const uint8_t *addr)
{
    struct gw_deny *d = &ctx->deny;

    for (size_t i = 0; i < d->n; i++) {
        if (memcmp(d->addrs[i], addr, ID_ADDR_LEN) == 0) {
            memcpy(d->addrs[i], d->addrs[d->n - 1], ID_ADDR_LEN);
            d->n--;
            return true;
        }
    }
    return false;
}

/* "Authorization: Bearer <token>" matching want (--admin-token-file,
 * --presence-token-file). Both sides are hashed first, so the comparison
 * takes the same time whatever the length or the first differing byte. */
static bool bearer_ok(const struct gw_req *r, const char *want)
{
    const nghttp2_nv *h = gw_hdrs_get(&r->hdrs, "authorization");
    uint8_t a[SHA256_DIGEST_LENGTH];
    uint8_t b[SHA256_DIGEST_LENGTH];
    const char *v;
    size_t vlen;

    if (h == NULL || h->valuelen < 7 || strncasecmp((const char *)h->value, "Bearer ", 7) != 0)
        return false;
    v = (const char *)h->value + 7;
    vlen = h->valuelen - 7;
    while (vlen > 0 && *v == ' ') {
        v++;
        vlen--;
    }
    SHA256((const unsigned char *)v, vlen, a);
    SHA256((const unsigned char *)want, strlen(want), b);
    return CRYPTO_memcmp(a, b, sizeof(a)) == 0;
}

static void respond_json(struct gw_req *r, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void respond_json(struct gw_req *r, int status, const char *fmt, ...)
{
    char body[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(body, sizeof(body), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(body)) {
        gw_req_fail(r, HERR_INTERNAL);
        return;
    }
    respond(r, status, "application/json", body, (size_t)n);
}

static void unauthorized(struct gw_req *r, const char *realm)
{
    char body[256];
    int n = herr_json(HERR_UNAUTHORIZED, body, sizeof(body));

    r->err = HERR_UNAUTHORIZED;
    respond_with(r, 401, "application/json", body, n > 0 ? (size_t)n : 0, "www-authenticate",
                 realm);
}

/* ---- /presence ---- */

/* The value of query parameter name in path ("/presence?a=1&name=v"), percent-
 * decoded into out (NUL-terminated). Returns its length, -1 if absent, -2 if
 * longer than outsize - 1, badly encoded, or if it decodes to a control
 * character (%00 would otherwise end the string early and hide the rest). */
static int query_param(const char *path, const char *name, char *out, size_t outsize)
{
    const char *q = strchr(path, '?');
    size_t nlen = strlen(name);

    while (q != NULL) {
        const char *p = q + 1, *end = strchr(p, '&');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);

        if (len > nlen && strncmp(p, name, nlen) == 0 && p[nlen] == '=') {
            size_t o = 0;
            for (size_t i = nlen + 1; i < len; i++) {
                int c = (unsigned char)p[i];
                if (c == '%') {
                    int hi = i + 2 < len ? util_hex_val(p[i + 1]) : -1;
                    int lo = hi >= 0 ? util_hex_val(p[i + 2]) : -1;
                    if (lo < 0)
                        return -2;
                    c = hi << 4 | lo;
                    i += 2;
                } else if (c == '+') {
                    c = ' ';
                }
                if (c < 0x20 || c == 0x7f || o + 1 >= outsize)
                    return -2;
                out[o++] = (char)c;
            }
            out[o] = '\0';
            return (int)o;
        }
        q = end;
    }
    return -1;
}

static void presence_bad(struct gw_req *r, const char *why)
{
    r->err = HERR_BAD_REQUEST;
    respond_json(r, 400, "{\"error\":\"bad_request\",\"message\":\"%s\"}\n", why);
}

/* GET /presence?addresses=A,B,... (Authorization: Bearer <presence token>):
 * {"presence":{"<addr>":{"online":true,"last_seen":<unix ms>}, ...}}, each
 * address lowercase, once. An agent is online when a tunnel here carries it;
 * an offline one's last_seen is null. Checked in the relay's order: token,
 * method, the list (1 to 100 addresses, 0x and 40 hex digits each, any case),
 * then the per-IP rate. */
static void presence_handle(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    char list[PRESENCE_PARAM_MAX + 1];
    uint8_t addrs[PRESENCE_MAX][ID_ADDR_LEN];
    size_t n = 0;
    struct evbuffer *out;
    uint64_t now_ms;
    bool oom;
    char *save = NULL;
    int len;

    if (ctx->cfg->presence_token == NULL) {
        gw_req_fail(r, HERR_NOT_FOUND);
        return;
    }
    if (!bearer_ok(r, ctx->cfg->presence_token)) {
        LOG_WARN(ctx->log, "presence_unauthorized", LOG_U("req", r->id),
                 LOG_S("client", r->client_ip));
        unauthorized(r, "Bearer realm=\"tunnel-gateway presence\"");
        return;
    }
    if (strcmp(r->method, "GET") != 0 && strcmp(r->method, "HEAD") != 0) {
        gw_req_fail(r, HERR_METHOD_NOT_ALLOWED);
        return;
    }
    len = query_param(r->path, "addresses", list, sizeof(list));
    if (len == -2) {
        presence_bad(r, "addresses: too long or badly encoded");
        return;
    }
    for (char *tok = len > 0 ? strtok_r(list, ",", &save) : NULL; tok != NULL;
         tok = strtok_r(NULL, ",", &save)) {
        size_t tl;
        uint8_t a[ID_ADDR_LEN];
        bool dup = false;

        while (*tok == ' ' || *tok == '\t')
            tok++;
        tl = strlen(tok);
        while (tl > 0 && (tok[tl - 1] == ' ' || tok[tl - 1] == '\t'))
            tl--;
        if (tl == 0)
            continue;
        for (size_t i = 0; i < tl; i++)
            tok[i] = (char)tolower((unsigned char)tok[i]);
        if (tl != ID_ADDR_STR_LEN || id_addr_parse(tok, tl, a) != ID_OK) {
            presence_bad(r, "addresses: each must be 0x and 40 hex digits");
            return;
        }
        for (size_t i = 0; i < n && !dup; i++)
            dup = memcmp(addrs[i], a, ID_ADDR_LEN) == 0;
        if (dup)
            continue;
        if (n == PRESENCE_MAX) {
            presence_bad(r, "addresses must contain 1-100 entries");
            return;
        }
        memcpy(addrs[n++], a, ID_ADDR_LEN);
    }
    if (n == 0) {
        presence_bad(r, "addresses must contain 1-100 entries");
        return;
    }
    if (!gw_ipt_presence_hit(ctx->ipt, (const struct sockaddr *)&r->peer,
                             ctx->cfg->presence_per_ip_per_min, clk_mono_ms(ctx->clk))) {
        gw_metrics_limit(ctx, GW_LIMIT_PRESENCE);
        gw_req_fail(r, HERR_RATE_LIMITED);
        return;
    }
    out = evbuffer_new();
    if (out == NULL) {
        gw_req_fail(r, HERR_INTERNAL);
        return;
    }
    now_ms = (uint64_t)clk_unix_s(ctx->clk) * 1000u;
    oom = evbuffer_add_printf(out, "{\"presence\":{") < 0;
    for (size_t i = 0; i < n && !oom; i++) {
        char s[ID_ADDR_STR_LEN + 1];
        bool online = gw_reg_get(ctx->reg, addrs[i]) != NULL;

        id_addr_to_str(addrs[i], s);
        if (online)
            oom = evbuffer_add_printf(out, "%s\"%s\":{\"online\":true,\"last_seen\":%" PRIu64 "}",
                                      i == 0 ? "" : ",", s, now_ms) < 0;
        else
            oom = evbuffer_add_printf(out, "%s\"%s\":{\"online\":false,\"last_seen\":null}",
                                      i == 0 ? "" : ",", s) < 0;
    }
    if (oom || evbuffer_add_printf(out, "}}\n") < 0)
        gw_req_fail(r, HERR_INTERNAL);
    else
        respond_buf(r, 200, "application/json", out);
    evbuffer_free(out);
}

struct list_ctx {
    struct evbuffer *out;
    const char *node;
    bool first;
    bool oom;
};

static void list_one(struct gw_route *rt, void *arg)
{
    struct list_ctx *l = arg;

    if (evbuffer_add_printf(l->out,
                            "%s\n{\"address\":\"%s\",\"node\":\"%s\",\"since\":%" PRIu64
                            ",\"requests\":%" PRIu64 ",\"bytes_in\":%" PRIu64
                            ",\"bytes_out\":%" PRIu64 ",\"errors\":%" PRIu64
                            ",\"client_ip\":\"%s\"}",
                            l->first ? "" : ",", rt->addr_str, l->node, rt->since_unix_ms,
                            rt->n_requests, rt->n_bytes_in, rt->n_bytes_out, rt->n_errors,
                            rt->peer_ip) < 0)
        l->oom = true;
    l->first = false;
}

static void admin_list_agents(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    struct list_ctx l = {evbuffer_new(), ctx->node_id, true, false};

    if (l.out == NULL) {
        gw_req_fail(r, HERR_INTERNAL);
        return;
    }
    l.oom = evbuffer_add_printf(l.out, "{\"agents\":[") < 0;
    gw_tun_each_route(ctx, list_one, &l);
    if (l.oom || evbuffer_add_printf(l.out, "\n]}\n") < 0)
        gw_req_fail(r, HERR_INTERNAL);
    else
        respond_buf(r, 200, "application/json", l.out);
    evbuffer_free(l.out);
}

static void admin_list_deny(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    struct evbuffer *out = evbuffer_new();
    bool oom;

    if (out == NULL) {
        gw_req_fail(r, HERR_INTERNAL);
        return;
    }
    oom = evbuffer_add_printf(out, "{\"deny\":[") < 0;
    for (size_t i = 0; i < ctx->deny.n && !oom; i++) {
        char s[ID_ADDR_STR_LEN + 1];
        id_addr_to_str(ctx->deny.addrs[i], s);
        oom = evbuffer_add_printf(out, "%s\"%s\"", i == 0 ? "" : ",", s) < 0;
    }
    if (oom || evbuffer_add_printf(out, "]}\n") < 0)
        gw_req_fail(r, HERR_INTERNAL);
    else
        respond_buf(r, 200, "application/json", out);
    evbuffer_free(out);
}

/* Parses the address in seg[0..len). */
static bool parse_addr(const char *seg, size_t len, uint8_t addr[ID_ADDR_LEN])
{
    return id_addr_parse(seg, len, addr) == ID_OK;
}

static void admin_handle(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    const char *p = r->path + strlen(ADMIN_PREFIX);
    size_t plen = strcspn(p, "?");
    const char *m = r->method;
    uint8_t addr[ID_ADDR_LEN];
    char s[ID_ADDR_STR_LEN + 1];

    if (ctx->cfg->admin_token == NULL) {
        gw_req_fail(r, HERR_NOT_FOUND);
        return;
    }
    if (!bearer_ok(r, ctx->cfg->admin_token)) {
        LOG_WARN(ctx->log, "admin_unauthorized", LOG_U("req", r->id), LOG_S("client", r->client_ip));
        unauthorized(r, "Bearer realm=\"tunnel-gateway admin\"");
        return;
    }
    if (plen == 6 && strncmp(p, "agents", 6) == 0) {
        if (strcmp(m, "GET") != 0 && strcmp(m, "HEAD") != 0) {
            gw_req_fail(r, HERR_METHOD_NOT_ALLOWED);
            return;
        }
        admin_list_agents(r);
        return;
    }
    if (plen == 4 && strncmp(p, "deny", 4) == 0) {
        if (strcmp(m, "GET") != 0 && strcmp(m, "HEAD") != 0) {
            gw_req_fail(r, HERR_METHOD_NOT_ALLOWED);
            return;
        }
        admin_list_deny(r);
        return;
    }
    /* agents/<address>/disconnect */
    if (plen == 7 + ID_ADDR_STR_LEN + 11 && strncmp(p, "agents/", 7) == 0 &&
        strncmp(p + 7 + ID_ADDR_STR_LEN, "/disconnect", 11) == 0) {
        if (strcmp(m, "POST") != 0) {
            gw_req_fail(r, HERR_METHOD_NOT_ALLOWED);
            return;
        }
        if (!parse_addr(p + 7, ID_ADDR_STR_LEN, addr)) {
            gw_req_fail(r, HERR_BAD_REQUEST);
            return;
        }
        id_addr_to_str(addr, s);
        if (gw_tun_remove_route(ctx, addr) != 0) {
            gw_req_fail(r, HERR_AGENT_OFFLINE);
            return;
        }
        LOG_INFO(ctx->log, "admin_disconnect", LOG_S("addr", s), LOG_S("client", r->client_ip));
        respond_json(r, 200, "{\"address\":\"%s\",\"disconnected\":true}\n", s);
        return;
    }
    /* deny/<address> */
    if (plen == 5 + ID_ADDR_STR_LEN && strncmp(p, "deny/", 5) == 0) {
        bool add = strcmp(m, "POST") == 0 || strcmp(m, "PUT") == 0;
        bool was;
        if (!add && strcmp(m, "DELETE") != 0) {
            gw_req_fail(r, HERR_METHOD_NOT_ALLOWED);
            return;
        }
        if (!parse_addr(p + 5, ID_ADDR_STR_LEN, addr)) {
            gw_req_fail(r, HERR_BAD_REQUEST);
            return;
        }
        id_addr_to_str(addr, s);
        if (add) {
            if (deny_add(ctx, addr) != 0) {
                gw_req_fail(r, HERR_INTERNAL);
                return;
            }
            LOG_INFO(ctx->log, "admin_deny", LOG_S("addr", s), LOG_S("client", r->client_ip));
            gw_tun_apply_allow(ctx); /* removes it from live tunnels (not_allowed) */
            respond_json(r, 200, "{\"address\":\"%s\",\"denied\":true}\n", s);
            return;
        }
        was = deny_del(ctx, addr);
        LOG_INFO(ctx->log, "admin_undeny", LOG_S("addr", s), LOG_S("client", r->client_ip));
        respond_json(r, 200, "{\"address\":\"%s\",\"denied\":false,\"was_denied\":%s}\n", s,
                     was ? "true" : "false");
        return;
    }
    gw_req_fail(r, HERR_NOT_FOUND);
}

void gw_admin_handle(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    char body[ADMIN_BODY_MAX];
    char region[256];
    int n;
    uint64_t uptime_s = (clk_mono_ms(ctx->clk) - ctx->start_ms) / 1000u;
    size_t agents = gw_reg_count(ctx->reg);

    if (strncmp(r->path, ADMIN_PREFIX, strlen(ADMIN_PREFIX)) == 0) {
        admin_handle(r);
        return;
    }
    if (path_is(r->path, "/presence")) {
        presence_handle(r);
        return;
    }
    if (!path_is(r->path, "/health") && !path_is(r->path, "/stats") &&
        !path_is(r->path, "/metrics")) {
        gw_req_fail(r, HERR_NOT_FOUND);
        return;
    }
    if (strcmp(r->method, "GET") != 0 && strcmp(r->method, "HEAD") != 0) {
        gw_req_fail(r, HERR_METHOD_NOT_ALLOWED);
        return;
    }
    if (path_is(r->path, "/health")) {
        n = util_snprintf(body, sizeof(body),
                          "{\"status\":\"%s\",\"tunnels\":%zu,\"agents\":%zu,"
                          "\"region\":\"%s\",\"machine\":\"%s\"%s}\n",
                          ctx->draining ? "shutting_down" : "ok", ctx->tunnels_live, agents,
                          region_json(ctx, region, sizeof(region)), ctx->node_id,
                          ctx->rds == NULL         ? ""
                          : gw_rds_ok(ctx->rds) ? ",\"redis\":\"ok\""
                                                   : ",\"redis\":\"degraded\"");
        respond(r, ctx->draining ? 503 : 200, "application/json", body, n > 0 ? (size_t)n : 0);
        return;
    }
    if (path_is(r->path, "/stats")) {
        n = util_snprintf(
            body, sizeof(body),
            "{\"uptime_seconds\":%" PRIu64 ",\"active_tunnels\":%zu,\"active_agents\":%zu,"
            "\"total_requests_relayed\":%" PRIu64 ",\"total_requests_failed\":%" PRIu64
            ",\"total_tunnel_connections\":%" PRIu64 ",\"auth_failures\":%" PRIu64
            ",\"connections_accepted\":%" PRIu64 ",\"connections_refused\":%" PRIu64
            ",\"bytes_to_agents\":%" PRIu64 ",\"bytes_from_agents\":%" PRIu64
            ",\"total_takeovers\":%" PRIu64 ",\"total_invalid_frames\":%" PRIu64
            ",\"total_bad_host_responses\":%" PRIu64
            ",\"total_slow_consumer_aborts\":%" PRIu64
            ",\"total_forwarded_out\":%" PRIu64 ",\"total_forwarded_in\":%" PRIu64
            ",\"region\":\"%s\",\"machine\":\"%s\",\"draining\":%s%s}\n",
            uptime_s, ctx->tunnels_live, agents, ctx->n.requests_total, ctx->n.requests_failed,
            ctx->n.tunnel_connections, ctx->n.auth_failures, ctx->n.conns_accepted,
            ctx->n.conns_refused, ctx->n.bytes_to_agents, ctx->n.bytes_from_agents,
            ctx->n.takeovers, ctx->n.invalid_frames, ctx->n.bad_host_responses,
            ctx->n.slow_consumer_aborts, ctx->n.node_out, ctx->n.node_in,
            region_json(ctx, region, sizeof(region)), ctx->node_id,
            ctx->draining ? "true" : "false",
            ctx->rds == NULL         ? ""
            : gw_rds_ok(ctx->rds) ? ",\"redis\":\"ok\""
                                     : ",\"redis\":\"degraded\"");
        respond(r, 200, "application/json", body, n > 0 ? (size_t)n : 0);
        return;
    }
    struct evbuffer *buf = evbuffer_new();
    if (buf == NULL || gw_metrics_render(ctx, buf) != 0) {
        if (buf != NULL)
            evbuffer_free(buf);
        gw_req_fail(r, HERR_INTERNAL);
        return;
    }
    respond_buf(r, 200, "text/plain; version=0.0.4", buf);
    evbuffer_free(buf);
}
