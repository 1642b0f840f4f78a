/* Protocol-neutral public request: header list, routing by host name,
 * forwarding-header trust, the request body between front end and upstream,
 * the response calls, and the request's timers. See gw_req.h for the
 * lifecycle; dispatch is gw_px's. */
#include "gw_req.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "clk.h"
#include "gw.h"
#include "gw_node.h"
#include "gw_cfg.h"
#include "log.h"

static void req_on_timer(evutil_socket_t fd, short what, void *arg);

struct gw_req *gw_req_new(struct gw_ctx *ctx, const struct gw_fe_ops *fe, void *fe_data,
                          uint64_t conn_id, const char *scheme)
{
    struct gw_req *r = calloc(1, sizeof(*r));

    if (r == NULL)
        return NULL;
    r->body = evbuffer_new();
    if (r->body == NULL)
        goto fail_req;
    r->timer = evtimer_new(ctx->base, req_on_timer, r);
    if (r->timer == NULL)
        goto fail_body;
    r->ctx = ctx;
    r->id = gw_next_id(ctx);
    r->conn_id = conn_id;
    r->fe = fe;
    r->fe_data = fe_data;
    r->scheme = scheme;
    r->start_ms = clk_mono_ms(ctx->clk);
    r->resp_timeout_ms = ctx->cfg->resp_header_timeout_s * 1000u;
    r->err = HERR_NONE;
    return r;

fail_body:
    evbuffer_free(r->body);
fail_req:
    free(r);
    return NULL;
}

void gw_req_free(struct gw_req *r)
{
    if (r == NULL)
        return;
    gw_req_cancel(r);
    if (r->ws_counted)
        r->ctx->m.websockets_active--;
    event_free(r->timer);
    evbuffer_free(r->body);
    gw_hdrs_cleanup(&r->hdrs);
    free(r->method);
    free(r->path);
    free(r->authority);
    free(r->protocol);
    free(r->fwd_host);
    if (r->node_in != NULL) {
        for (size_t i = 0; i < GW_NODE_FWD_FIELDS; i++)
            free(r->node_in->v[i]);
        free(r->node_in);
    }
    free(r);
}

/* ---- headers ---- */

static const char *const hop_by_hop[] = {
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
    "te", "host", "http2-settings", "proxy-authenticate", "trailer",
};

/* Names the gateway sets, and those the Osaurus relay trusts between its own
 * machines (a local API behind both must never see a client's copy): a
 * client's values for them are dropped. */
static const char *const gateway_set[] = {
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-real-ip", "forwarded", "x-agent-address", "x-agent-id", "x-tunnel-origin",
    "x-relay-internal-hop", "x-relay-client-ip",
};

static bool in_list(const char *const *list, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++) {
        if (util_iov_ieq((struct iov){name, len}, (struct iov){list[i], strlen(list[i])}))
            return true;
    }
    return false;
}

bool gw_hdr_is_hop_by_hop(const char *name, size_t len)
{
    return in_list(hop_by_hop, sizeof(hop_by_hop) / sizeof(hop_by_hop[0]), name, len);
}

bool gw_hdr_is_gateway_set(const char *name, size_t len)
{
    /* x-tg-*: the forwarding fields between nodes (gw_node), believed only
     * on the node listener, which takes them before this list applies */
    if (len >= 5 && util_iov_ieq((struct iov){name, 5}, (struct iov){"x-tg-", 5}))
        return true;
    return in_list(gateway_set, sizeof(gateway_set) / sizeof(gateway_set[0]), name, len);
}

void gw_hdrs_remove(struct gw_hdrs *h, const char *name, size_t len)
{
    size_t j = 0;

    for (size_t i = 0; i < h->n; i++) {
        nghttp2_nv *nv = &h->nv[i];
        if (util_iov_ieq((struct iov){(const char *)nv->name, nv->namelen}, (struct iov){name, len})) {
            h->bytes -= nv->namelen + nv->valuelen;
            free(nv->name);
            free(nv->value);
            continue;
        }
        h->nv[j++] = *nv;
    }
    h->n = j;
}

int gw_hdrs_add(struct gw_hdrs *h, const char *name, size_t nlen, const char *value,
                size_t vlen, size_t max_bytes)
{
    char *n;
    char *v;

    /* no sum before the checks: lengths near SIZE_MAX must not wrap */
    if (max_bytes != 0 && (nlen > max_bytes || vlen > max_bytes - nlen ||
                           h->bytes > max_bytes - nlen - vlen))
        return -2;
    if (nlen == SIZE_MAX || vlen == SIZE_MAX)
        return -1;
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 16;
        nghttp2_nv *nv = realloc(h->nv, cap * sizeof(*nv));
        if (nv == NULL)
            return -1;
        h->nv = nv;
        h->cap = cap;
    }
    n = malloc(nlen + 1);
    v = malloc(vlen + 1);
    if (n == NULL || v == NULL) {
        free(n);
        free(v);
        return -1;
    }
    for (size_t i = 0; i < nlen; i++)
        n[i] = (name[i] >= 'A' && name[i] <= 'Z') ? (char)(name[i] + 32) : name[i];
    n[nlen] = '\0';
    memcpy(v, value, vlen);
    v[vlen] = '\0';
    h->nv[h->n++] = (nghttp2_nv){(uint8_t *)n, (uint8_t *)v, nlen, vlen, NGHTTP2_NV_FLAG_NONE};
    h->bytes += nlen + vlen;
    return 0;
}

void gw_hdrs_cleanup(struct gw_hdrs *h)
{
    for (size_t i = 0; i < h->n; i++) {
        free(h->nv[i].name);
        free(h->nv[i].value);
    }
    free(h->nv);
    memset(h, 0, sizeof(*h));
}

const nghttp2_nv *gw_hdrs_get(const struct gw_hdrs *h, const char *name)
{
    size_t len = strlen(name);

    for (size_t i = 0; i < h->n; i++) {
        if (h->nv[i].namelen == len && memcmp(h->nv[i].name, name, len) == 0)
            return &h->nv[i];
    }
    return NULL;
}

/* ---- routing ---- */

/* Host without port, lowercased into out. Returns 0 or -1 (malformed). */
static int host_only(const char *authority, char *out, size_t size)
{
    size_t len = strlen(authority);
    size_t end = len;

    if (len == 0)
        return -1;
    if (authority[0] == '[') {
        const char *rb = strchr(authority, ']');
        if (rb == NULL)
            return -1;
        end = (size_t)(rb - authority) + 1;
    } else {
        const char *colon = strchr(authority, ':');
        if (colon != NULL)
            end = (size_t)(colon - authority);
    }
    if (end == 0 || end >= size)
        return -1;
    /* after the host: nothing, or ':' and a port (RFC 3986 3.2.3: digits,
     * maybe none) */
    if (end < len) {
        const char *port = authority + end + 1;
        size_t plen = len - end - 1;
        uint64_t v = 0;
        if (authority[end] != ':' || plen > 5)
            return -1;
        for (size_t i = 0; i < plen; i++) {
            if (port[i] < '0' || port[i] > '9')
                return -1;
            v = v * 10 + (uint64_t)(port[i] - '0');
        }
        if (v > 65535)
            return -1;
    }
    for (size_t i = 0; i < end; i++) {
        char c = authority[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    out[end] = '\0';
    /* a trailing dot names the same host */
    if (end > 1 && out[end - 1] == '.')
        out[end - 1] = '\0';
    return 0;
}

/* A dot segment ("." or "..", any of its dots maybe "%2e") in the path part
 * of an origin-form target. */
static bool has_dot_segment(const char *path)
{
    const char *p = path;

    while (*p == '/') {
        size_t dots = 0;
        bool other = false;
        p++;
        while (*p != '\0' && *p != '/' && *p != '?' && *p != '#') {
            if (*p == '.') {
                dots++;
                p++;
            } else if (p[0] == '%' && p[1] == '2' && (p[2] == 'e' || p[2] == 'E')) {
                dots++;
                p += 3;
            } else {
                other = true;
                p++;
            }
        }
        if (!other && (dots == 1 || dots == 2))
            return true;
        if (*p != '/')
            break;
    }
    return false;
}

enum herr gw_req_check(const struct gw_req *r)
{
    const char *path = r->path;
    size_t plen;

    if (r->method == NULL || path == NULL ||
        nghttp2_check_method((const uint8_t *)r->method, strlen(r->method)) == 0)
        return HERR_BAD_REQUEST;
    plen = strlen(path);
    /* origin-form only: '*' (OPTIONS) and absolute paths elsewhere are not
     * something an agent's API serves */
    if (plen == 0 || path[0] != '/' || nghttp2_check_path((const uint8_t *)path, plen) == 0 ||
        has_dot_segment(path))
        return HERR_BAD_REQUEST;
    for (size_t i = 0; i < plen; i++) /* nor DEL, which the agent's HTTP/1.1 would write */
        if ((unsigned char)path[i] <= 0x20 || (unsigned char)path[i] == 0x7f)
            return HERR_BAD_REQUEST;
    if (r->authority != NULL &&
        nghttp2_check_authority((const uint8_t *)r->authority, strlen(r->authority)) == 0)
        return HERR_BAD_REQUEST;
    if (r->protocol != NULL &&
        nghttp2_check_header_value_rfc9113((const uint8_t *)r->protocol, strlen(r->protocol)) == 0)
        return HERR_BAD_REQUEST;
    for (size_t i = 0; i < r->hdrs.n; i++) {
        const nghttp2_nv *h = &r->hdrs.nv[i];
        if (nghttp2_check_header_name(h->name, h->namelen) == 0 ||
            nghttp2_check_header_value_rfc9113(h->value, h->valuelen) == 0)
            return HERR_BAD_REQUEST;
    }
    return HERR_NONE;
}

void gw_req_route(struct gw_req *r)
{
    const char *domain = r->ctx->cfg->domain;
    size_t dlen = strlen(domain);
    char host[256];
    size_t hlen;

    r->route = GW_ROUTE_ERROR;
    r->route_err = HERR_UNKNOWN_HOST;
    if (r->authority == NULL || host_only(r->authority, host, sizeof(host)) != 0) {
        r->route_err = HERR_BAD_REQUEST;
        return;
    }
    hlen = strlen(host);
    if (strcmp(host, domain) == 0) {
        r->route = GW_ROUTE_APEX;
        return;
    }
    if (hlen > dlen + 1 && host[hlen - dlen - 1] == '.' && strcmp(host + hlen - dlen, domain) == 0) {
        size_t llen = hlen - dlen - 1;
        if (llen != ID_ADDR_STR_LEN || host[0] != '0' || host[1] != 'x' ||
            util_hex_decode(host + 2, 40, r->addr, ID_ADDR_LEN) != 0) {
            r->route_err = HERR_INVALID_SUBDOMAIN;
            return;
        }
        r->route = GW_ROUTE_AGENT;
        return;
    }
    /* IP literals and bare names outside the domain reach the gateway's own
     * endpoints (health probes address pods by IP); nothing else is served. */
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a6) == 1 ||
        (host[0] == '[' && hlen > 2 && (host[hlen - 1] = '\0', inet_pton(AF_INET6, host + 1, &a6) == 1)))
        r->route = GW_ROUTE_APEX;
}

/* ---- forwarding headers ---- */

static void trim(const char **s, size_t *len)
{
    while (*len > 0 && (**s == ' ' || **s == '\t')) {
        (*s)++;
        (*len)--;
    }
    while (*len > 0 && ((*s)[*len - 1] == ' ' || (*s)[*len - 1] == '\t'))
        (*len)--;
}

static bool parse_ip(const char *s, size_t len, struct sockaddr_storage *ss)
{
    char buf[INET6_ADDRSTRLEN + 2];

    if (len == 0 || len >= sizeof(buf))
        return false;
    memcpy(buf, s, len);
    buf[len] = '\0';
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, buf, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        return true;
    }
    if (inet_pton(AF_INET6, buf, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        return true;
    }
    return false;
}

static void sa_to_ip(const struct sockaddr *sa, char *out, size_t size)
{
    const void *src = sa->sa_family == AF_INET6
                          ? (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr
                          : (const void *)&((const struct sockaddr_in *)sa)->sin_addr;
    if (inet_ntop(sa->sa_family, src, out, (socklen_t)size) == NULL)
        util_snprintf(out, size, "unknown");
}

/* The right-most comma item of the last line of name, trimmed. */
static struct iov last_item(const struct gw_hdrs *h, const char *name)
{
    size_t nlen = strlen(name);

    for (size_t i = h->n; i-- > 0;) {
        const nghttp2_nv *nv = &h->nv[i];
        if (nv->namelen != nlen || memcmp(nv->name, name, nlen) != 0)
            continue;
        const char *v = (const char *)nv->value;
        size_t start = nv->valuelen;
        while (start > 0 && v[start - 1] != ',')
            start--;
        const char *item = v + start;
        size_t ilen = nv->valuelen - start;
        trim(&item, &ilen);
        return (struct iov){item, ilen};
    }
    return (struct iov){"", 0};
}

/* Keeps what stood left of the client's entry as the chain: the lines
 * before `line` and the first `upto` bytes of it, joined with ", ". A chain
 * longer than r->xff_chain keeps its right-most entries (the nearest hops),
 * never a cut one. */
static void xff_keep_chain(struct gw_req *r, size_t line, size_t upto)
{
    size_t total = 0;
    size_t len = 0;
    char *buf;

    for (size_t i = 0; i <= line; i++)
        total += r->hdrs.nv[i].valuelen + 2;
    buf = malloc(total + 1);
    if (buf == NULL)
        return; /* no chain, the client's address stays right */
    for (size_t i = 0; i <= line; i++) {
        const nghttp2_nv *nv = &r->hdrs.nv[i];
        if (nv->namelen != 15 || memcmp(nv->name, "x-forwarded-for", 15) != 0)
            continue;
        const char *v = (const char *)nv->value;
        size_t vlen = i == line ? upto : nv->valuelen;
        trim(&v, &vlen);
        if (vlen == 0)
            continue;
        if (len > 0) {
            memcpy(buf + len, ", ", 2);
            len += 2;
        }
        memcpy(buf + len, v, vlen);
        len += vlen;
    }
    const char *c = buf;
    while (len >= sizeof(r->xff_chain)) {
        const char *comma = memchr(c, ',', len); /* drop the left-most entry */
        if (comma == NULL) {
            len = 0;
            break;
        }
        len -= (size_t)(comma + 1 - c);
        c = comma + 1;
        trim(&c, &len);
    }
    util_snprintf(r->xff_chain, sizeof(r->xff_chain), "%.*s", (int)len, c);
    free(buf);
}

/* X-Forwarded-For from a trusted peer, every line, right to left. */
static void xff_walk(struct gw_req *r)
{
    const struct gw_cfg *cfg = r->ctx->cfg;

    for (size_t i = r->hdrs.n; i-- > 0;) {
        const nghttp2_nv *nv = &r->hdrs.nv[i];
        if (nv->namelen != 15 || memcmp(nv->name, "x-forwarded-for", 15) != 0)
            continue;
        const char *v = (const char *)nv->value;
        size_t end = nv->valuelen;
        while (end > 0) {
            size_t start = end;
            while (start > 0 && v[start - 1] != ',')
                start--;
            const char *item = v + start;
            size_t ilen = end - start;
            trim(&item, &ilen);
            struct sockaddr_storage ss;
            if (!parse_ip(item, ilen, &ss))
                return; /* garbage: believe nothing further left */
            util_snprintf(r->client_ip, sizeof(r->client_ip), "%.*s", (int)ilen, item);
            if (!gw_cfg_addr_trusted(cfg, (struct sockaddr *)&ss)) {
                xff_keep_chain(r, i, start > 0 ? start - 1 : 0);
                return;
            }
            end = start > 0 ? start - 1 : 0;
        }
    }
}

void gw_req_set_peer(struct gw_req *r, const struct sockaddr *peer)
{
    const struct gw_cfg *cfg = r->ctx->cfg;

    memcpy(&r->peer, peer,
           peer->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    sa_to_ip(peer, r->client_ip, sizeof(r->client_ip));
    util_snprintf(r->fwd_proto, sizeof(r->fwd_proto), "%s", r->scheme);
    r->xff_chain[0] = '\0';
    if (!gw_cfg_addr_trusted(cfg, peer))
        return;
    /* The peer is a trusted proxy: walk X-Forwarded-For from the right and
     * take the first address that is not itself trusted, as nginx's
     * real_ip_recursive does. Several header lines are one list, in order
     * (RFC 9110 5.3): a client's own line comes before the proxy's. */
    xff_walk(r);
    /* the proxy's own value is the last one it sent */
    struct iov proto = last_item(&r->hdrs, "x-forwarded-proto");
    if ((proto.len == 5 && memcmp(proto.base, "https", 5) == 0) ||
        (proto.len == 4 && memcmp(proto.base, "http", 4) == 0))
        util_snprintf(r->fwd_proto, sizeof(r->fwd_proto), "%.*s", (int)proto.len, proto.base);
    struct iov fh = last_item(&r->hdrs, "x-forwarded-host");
    if (fh.len > 0 && fh.len < 256) {
        free(r->fwd_host);
        r->fwd_host = strndup(fh.base, fh.len);
    }
}

/* ---- request body ---- */

bool gw_req_is_websocket(const struct gw_req *r)
{
    return r->protocol != NULL && r->method != NULL && strcmp(r->method, "CONNECT") == 0 &&
           strcasecmp(r->protocol, "websocket") == 0;
}

/* While the body is arriving, the body-idle clock runs and restarts with every
 * byte; once it is complete, the response-header clock runs. A WebSocket's
 * "body" is its bytes after the head, so only the response-header clock runs
 * before the head, and no clock after it: a quiet WebSocket lives as long as
 * both ends do. Both stop when the response head arrives. */
void gw_req_arm_wait(struct gw_req *r)
{
    uint64_t idle = r->ctx->cfg->stream_idle_timeout_s * 1000u;

    if (r->status != 0 || r->up == NULL)
        return;
    if (!r->body_eof && !gw_req_is_websocket(r))
        gw_req_arm_timer(r, idle);
    else
        gw_req_arm_timer(r, r->resp_timeout_ms);
}

/* Answered already (an error, or a response that ended before the body did):
 * the client's remaining body goes nowhere. */
static bool body_unwanted(const struct gw_req *r)
{
    return r->err != HERR_NONE || (r->status != 0 && r->up == NULL);
}

static void body_notify(struct gw_req *r)
{
    const struct gw_cfg *cfg = r->ctx->cfg;

    if (!gw_req_is_websocket(r) && cfg->max_body_bytes != 0 && r->body_in > cfg->max_body_bytes) {
        gw_req_cancel(r);
        if (r->status == 0)
            gw_req_fail(r, HERR_BODY_TOO_LARGE);
        else
            gw_req_end(r, false);
        return;
    }
    if (!gw_req_is_websocket(r))
        gw_req_arm_wait(r);
    if (r->up != NULL)
        r->up->body_more(r->up_data);
}

int gw_req_body_add(struct gw_req *r, const void *data, size_t len)
{
    if (body_unwanted(r))
        return 1;
    if (len == 0)
        return 0;
    if (evbuffer_add(r->body, data, len) != 0)
        return -1;
    r->body_in += len;
    body_notify(r);
    return 0;
}

void gw_req_body_eof(struct gw_req *r)
{
    if (r->body_eof)
        return;
    r->body_eof = true;
    if (!body_unwanted(r))
        body_notify(r);
}

size_t gw_req_body_avail(const struct gw_req *r)
{
    return evbuffer_get_length(r->body);
}

int gw_req_body_take(struct gw_req *r, struct evbuffer *dst, size_t n)
{
    if (dst != NULL) {
        if (evbuffer_remove_buffer(r->body, dst, n) != (int)n)
            return -1;
    } else if (evbuffer_drain(r->body, n) != 0) {
        return -1;
    }
    r->body_out += n;
    r->fe->body_drained(r);
    return 0;
}

int gw_req_body_copy(struct gw_req *r, void *dst, size_t n)
{
    if (evbuffer_remove(r->body, dst, n) != (int)n)
        return -1;
    r->body_out += n;
    r->fe->body_drained(r);
    return 0;
}

void gw_req_consumed(struct gw_req *r, size_t n)
{
    if (r->up != NULL && n > 0)
        r->up->consumed(r->up_data, n);
}

void gw_req_cancel(struct gw_req *r)
{
    if (r->up != NULL) {
        const struct gw_up_ops *up = r->up;
        void *data = r->up_data;
        up->cancel(data); /* detaches */
        r->up = NULL;
        r->up_data = NULL;
    }
}

void gw_req_attach(struct gw_req *r, const struct gw_up_ops *up, void *up_data)
{
    r->up = up;
    r->up_data = up_data;
}

void gw_req_detach(struct gw_req *r)
{
    r->up = NULL;
    r->up_data = NULL;
}

void gw_req_fail(struct gw_req *r, enum herr e)
{
    gw_req_detach(r);
    evtimer_del(r->timer);
    if (r->route == GW_ROUTE_AGENT)
        r->ctx->n.requests_failed++;
    r->err = e;
    r->head_ms = clk_mono_ms(r->ctx->clk);
    r->fe->error(r, e);
}

int gw_req_head(struct gw_req *r, int status, const nghttp2_nv *nv, size_t n)
{
    evtimer_del(r->timer);
    r->status = status;
    r->head_ms = clk_mono_ms(r->ctx->clk);
    if (status >= 200 && status < 300 && gw_req_is_websocket(r) && !r->ws_counted) {
        r->ws_counted = true;
        r->ctx->m.websockets_active++;
    }
    return r->fe->head(r, status, nv, n);
}

int gw_req_body(struct gw_req *r, const uint8_t *data, size_t len)
{
    r->resp_bytes += len;
    return r->fe->body(r, data, len);
}

void gw_req_end(struct gw_req *r, bool complete)
{
    gw_req_detach(r);
    evtimer_del(r->timer);
    r->fe->end(r, complete);
}

void gw_req_arm_timer(struct gw_req *r, uint64_t ms)
{
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};

    if (ms == 0)
        evtimer_del(r->timer);
    else
        evtimer_add(r->timer, &tv);
}

static void req_on_timer(evutil_socket_t fd, short what, void *arg)
{
    struct gw_req *r = arg;

    if (r->status != 0)
        return;
    gw_req_cancel(r);
    gw_req_fail(r, r->body_eof ? HERR_GATEWAY_TIMEOUT : HERR_REQUEST_TIMEOUT);
}

void gw_req_log(struct gw_req *r, const char *outcome)
{
    if (r->logged)
        return;
    r->logged = true;
    if (r->ctx->m.on_request != NULL)
        r->ctx->m.on_request(r, outcome);
}

static bool request_id_valid(const char *s, size_t len)
{
    if (len == 0 || len > GW_REQ_ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

int gw_req_set_request_id(struct gw_req *r)
{
    nghttp2_nv *h = (nghttp2_nv *)gw_hdrs_get(&r->hdrs, "x-request-id");
    uint8_t raw[16];
    char *v;

    if (h != NULL && request_id_valid((const char *)h->value, h->valuelen)) {
        memcpy(r->rid, h->value, h->valuelen);
        r->rid[h->valuelen] = '\0';
        return 0;
    }
    if (clk_rand(r->ctx->clk, raw, sizeof(raw)) != 0)
        memset(raw, 0, sizeof(raw)); /* still unique enough for a log: req= differs */
    util_hex_encode(raw, sizeof(raw), r->rid);
    if (h == NULL)
        return gw_hdrs_add(&r->hdrs, "x-request-id", 12, r->rid, strlen(r->rid), 0) == 0 ? 0
                                                                                       : -1;
    /* an invalid one: our id takes its place */
    v = strdup(r->rid);
    if (v == NULL)
        return -1;
    r->hdrs.bytes = r->hdrs.bytes - h->valuelen + strlen(v);
    free(h->value);
    h->value = (uint8_t *)v;
    h->valuelen = strlen(v);
    return 0;
}
