/* Gateway observability; see gw_metrics.h. Counters are plain fields of
 * ctx->m, bumped where the event happens; /metrics renders them with the
 * gauges read at scrape time (registry, tunnels, /proc/self, certificate). */
#include "gw_metrics.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <openssl/asn1.h>
#include <openssl/x509.h>

#include "clk.h"
#include "gw.h"
#include "gw_admin.h"
#include "gw_cfg.h"
#include "gw_node.h"
#include "gw_rds.h"
#include "gw_reg.h"
#include "gw_req.h"
#include "gw_tun.h"
#include "gw_up.h"
#include "id.h"
#include "log.h"
#include "tg_config.h"
#include "tls.h"
#include "util.h"

#define FD_COUNT_MAX 1000000 /* bound on the /proc/self/fd walk */

/* Upper bounds of the histogram buckets, milliseconds (5 ms .. 300 s). */
static const uint64_t hist_le_ms[GW_HIST_BUCKETS] = {
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 180000, 300000,
};

static const char *const auth_names[GW_AUTH_COUNT_] = {
    [GW_AUTH_OK] = "ok",
    [GW_AUTH_SIGNATURE] = "signature",
    [GW_AUTH_NONCE] = "nonce",
    [GW_AUTH_TIMESTAMP] = "timestamp",
    [GW_AUTH_NOT_ALLOWED] = "not_allowed",
    [GW_AUTH_TIMEOUT] = "timeout",
    [GW_AUTH_TOO_MANY_AGENTS] = "too_many_agents",
    [GW_AUTH_MALFORMED] = "malformed",
};

static const char *const limit_names[GW_LIMIT_COUNT_] = {
    [GW_LIMIT_CONNS_PER_IP] = "conns_per_ip",
    [GW_LIMIT_TUNNEL_CONNECTS] = "tunnel_connects",
    [GW_LIMIT_TUNNELS_PER_IP] = "tunnels_per_ip",
    [GW_LIMIT_CONTROL_MESSAGES] = "control_messages",
    [GW_LIMIT_PENDING_TUNNELS] = "pending_tunnels",
    [GW_LIMIT_PENDING_TUNNELS_PER_IP] = "pending_tunnels_per_ip",
    [GW_LIMIT_HEADER_TIMEOUT] = "header_timeout",
    [GW_LIMIT_DESCRIPTORS] = "descriptors",
    [GW_LIMIT_OSAURUS_BODY_MEMORY] = "osaurus_body_memory",
    [GW_LIMIT_PROXY_HEADER] = "proxy_header",
    [GW_LIMIT_PRESENCE] = "presence",
};

const char *gw_auth_outcome_name(enum gw_auth_outcome o)
{
    return (unsigned)o < GW_AUTH_COUNT_ ? auth_names[o] : "malformed";
}

const char *gw_limit_kind_name(enum gw_limit_kind k)
{
    return (unsigned)k < GW_LIMIT_COUNT_ ? limit_names[k] : "unknown";
}

void gw_metrics_auth(struct gw_ctx *ctx, enum gw_auth_outcome o)
{
    if ((unsigned)o < GW_AUTH_COUNT_)
        ctx->m.auth[o]++;
}

void gw_metrics_limit(struct gw_ctx *ctx, enum gw_limit_kind k)
{
    if ((unsigned)k < GW_LIMIT_COUNT_)
        ctx->m.limit[k]++;
}

/* ---- access log ---- */

static bool access_to_file(const struct gw_cfg *cfg)
{
    return cfg->access_log != NULL && strcmp(cfg->access_log, "off") != 0;
}

static bool access_off(const struct gw_cfg *cfg)
{
    return cfg->access_log != NULL && strcmp(cfg->access_log, "off") == 0;
}

/* A sink on a freshly opened --access-log FILE; fd in *fdp. NULL on error. */
static struct log_sink *access_open(const struct gw_ctx *ctx, int *fdp, char *err, size_t errlen)
{
    const struct gw_cfg *cfg = ctx->cfg;
    struct log_sink *s;
    int fd = open(cfg->access_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);

    if (fd == -1) {
        util_snprintf(err, errlen, "--access-log %s: %s", cfg->access_log, strerror(errno));
        return NULL;
    }
    s = log_new("tunnel-gateway", LOG_LVL_INFO, cfg->log_format, fd);
    if (s == NULL) {
        close(fd);
        util_snprintf(err, errlen, "out of memory");
        return NULL;
    }
    *fdp = fd;
    return s;
}

int gw_metrics_start(struct gw_ctx *ctx, char *err, size_t errlen)
{
    ctx->m.access_fd = -1;
    ctx->m.on_request = gw_metrics_request;
    if (!access_to_file(ctx->cfg))
        return 0;
    ctx->m.access = access_open(ctx, &ctx->m.access_fd, err, errlen);
    return ctx->m.access != NULL ? 0 : -1;
}

int gw_access_log_reopen(struct gw_ctx *ctx)
{
    char err[512];
    int fd = -1;
    struct log_sink *s;

    if (!access_to_file(ctx->cfg) || ctx->m.access == NULL)
        return 0;
    s = access_open(ctx, &fd, err, sizeof(err));
    if (s == NULL) {
        LOG_ERROR(ctx->log, "reload_failed", LOG_S("what", "access_log"), LOG_S("err", err));
        return -1;
    }
    log_free(ctx->m.access);
    close(ctx->m.access_fd);
    ctx->m.access = s;
    ctx->m.access_fd = fd;
    LOG_INFO(ctx->log, "reloaded", LOG_S("what", "access_log"));
    return 0;
}

void gw_metrics_cleanup(struct gw_ctx *ctx)
{
    if (ctx->m.access != NULL) {
        log_free(ctx->m.access);
        ctx->m.access = NULL;
    }
    if (ctx->m.access_fd > 0) {
        close(ctx->m.access_fd);
        ctx->m.access_fd = -1;
    }
    gw_admin_cleanup(ctx);
}

/* ---- one finished request ---- */

static void hist_add(struct gw_hist *h, uint64_t ms)
{
    for (size_t i = 0; i < GW_HIST_BUCKETS; i++) {
        if (ms <= hist_le_ms[i]) {
            h->le[i]++;
            break;
        }
    }
    h->count++;
    h->sum_ms += ms;
}

/* The status the client saw: the head's, or the error's. */
static int status_seen(const struct gw_req *r)
{
    if (r->status != 0)
        return r->status;
    if (r->err != HERR_NONE)
        return herr_status(r->err);
    return 0;
}

static void count_request(struct gw_req *r, uint64_t now)
{
    struct gw_metrics *m = &r->ctx->m;
    int status = status_seen(r);
    uint64_t head = r->head_ms != 0 ? r->head_ms : now;

    if (r->route == GW_ROUTE_APEX)
        return; /* the gateway's own endpoints (scrapes, probes, tunnels) */
    if (status >= 100 && status < 600)
        m->status_class[status / 100]++;
    if (r->err != HERR_NONE && (unsigned)r->err < HERR_COUNT_)
        m->by_err[r->err]++;
    hist_add(&m->ttfb, head - r->start_ms);
    hist_add(&m->dur, now - r->start_ms);
    if (r->forwarded)
        hist_add(&m->fwd_ttfb, head - r->start_ms);
    if (r->from_node)
        hist_add(&m->from_node_ttfb, head - r->start_ms);
    m->req_body_bytes += r->body_in;
    m->resp_body_bytes += r->resp_bytes;
    if (r->route == GW_ROUTE_AGENT) {
        /* the route serving the address now (it may have changed hands) */
        struct gw_route *rt = gw_reg_get(r->ctx->reg, r->addr);
        if (rt != NULL) {
            rt->n_requests++;
            rt->n_bytes_in += r->body_in;
            rt->n_bytes_out += r->resp_bytes;
            if (r->err != HERR_NONE)
                rt->n_errors++;
        }
    }
}

void gw_metrics_request(struct gw_req *r, const char *outcome)
{
    struct gw_ctx *ctx = r->ctx;
    struct log_sink *sink = ctx->m.access != NULL ? ctx->m.access : ctx->log;
    uint64_t now = clk_mono_ms(ctx->clk);
    char addr[ID_ADDR_STR_LEN + 1];
    size_t plen;

    count_request(r, now);
    if (access_off(ctx->cfg) || !log_enabled(sink, LOG_LVL_INFO))
        return;
    if (r->route == GW_ROUTE_AGENT)
        id_addr_to_str(r->addr, addr);
    else
        util_snprintf(addr, sizeof(addr), "-");
    /* the query string often carries tokens: kept only at --log-level debug */
    plen = r->path != NULL ? strlen(r->path) : 0;
    if (r->path != NULL && !log_enabled(ctx->log, LOG_LVL_DEBUG)) {
        const char *q = strchr(r->path, '?');
        if (q != NULL)
            plen = (size_t)(q - r->path);
    }
    LOG_INFO(sink, "request", LOG_S("rid", r->rid), LOG_U("conn", r->conn_id),
             LOG_U("req", r->id), LOG_S("client", r->client_ip), LOG_S("addr", addr),
             LOG_S("method", r->method), LOG_M("path", r->path != NULL ? r->path : "-",
                                               r->path != NULL ? plen : 1),
             LOG_I("status", status_seen(r)), LOG_U("bytes_in", r->body_in),
             LOG_U("bytes_out", r->resp_bytes),
             LOG_U("ttfb_ms", (r->head_ms != 0 ? r->head_ms : now) - r->start_ms),
             LOG_U("dur_ms", now - r->start_ms), LOG_S("outcome", outcome),
             LOG_S("err", r->err != HERR_NONE ? herr_code(r->err) : NULL));
}

/* ---- /metrics ---- */

#define P(...)                                                                                     \
    do {                                                                                           \
        if (evbuffer_add_printf(out, __VA_ARGS__) < 0)                                             \
            return -1;                                                                             \
    } while (0)

static int head(struct evbuffer *out, const char *name, const char *type, const char *help)
{
    P("# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
    return 0;
}

static int gauge_u(struct evbuffer *out, const char *name, const char *help, uint64_t v)
{
    if (head(out, name, "gauge", help) != 0)
        return -1;
    P("%s %" PRIu64 "\n", name, v);
    return 0;
}

static int counter_u(struct evbuffer *out, const char *name, const char *help, uint64_t v)
{
    if (head(out, name, "counter", help) != 0)
        return -1;
    P("%s %" PRIu64 "\n", name, v);
    return 0;
}

static int hist(struct evbuffer *out, const char *name, const char *help, const struct gw_hist *h)
{
    uint64_t cum = 0;

    if (head(out, name, "histogram", help) != 0)
        return -1;
    for (size_t i = 0; i < GW_HIST_BUCKETS; i++) {
        cum += h->le[i];
        P("%s_bucket{le=\"%" PRIu64 ".%03" PRIu64 "\"} %" PRIu64 "\n", name,
          hist_le_ms[i] / 1000u, hist_le_ms[i] % 1000u, cum);
    }
    P("%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, h->count);
    P("%s_sum %" PRIu64 ".%03" PRIu64 "\n", name, h->sum_ms / 1000u, h->sum_ms % 1000u);
    P("%s_count %" PRIu64 "\n", name, h->count);
    return 0;
}

/* ---- process figures from /proc/self ---- */

static int proc_cpu(double *secs)
{
    char buf[1024];
    FILE *f = fopen("/proc/self/stat", "re");
    size_t n;
    const char *p;
    unsigned long long ut = 0;
    unsigned long long st = 0;
    long tck = sysconf(_SC_CLK_TCK);

    if (f == NULL)
        return -1;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* the command name may hold spaces and ')': fields follow the last ')' */
    p = strrchr(buf, ')');
    if (p == NULL || tck <= 0)
        return -1;
    /* after ")": state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt
     * majflt cmajflt utime(14) stime(15) */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    *secs = (double)(ut + st) / (double)tck;
    return 0;
}

static int proc_rss(uint64_t *bytes)
{
    FILE *f = fopen("/proc/self/statm", "re");
    unsigned long long size = 0;
    unsigned long long res = 0;
    long page = sysconf(_SC_PAGESIZE);
    int rv;

    if (f == NULL)
        return -1;
    rv = fscanf(f, "%llu %llu", &size, &res);
    fclose(f);
    if (rv != 2 || page <= 0)
        return -1;
    *bytes = (uint64_t)res * (uint64_t)page;
    return 0;
}

static int proc_fds(uint64_t *count)
{
    DIR *d = opendir("/proc/self/fd");
    const struct dirent *e;
    uint64_t n = 0;

    if (d == NULL)
        return -1;
    while (n < FD_COUNT_MAX && (e = readdir(d)) != NULL) {
        if (e->d_name[0] != '.')
            n++;
    }
    closedir(d);
    *count = n > 0 ? n - 1 : 0; /* the directory's own fd */
    return 0;
}

/* Seconds until notAfter of the certificate served for the apex. */
static bool cert_expiry(struct gw_ctx *ctx, int64_t *secs)
{
    X509 *x;
    int days = 0;
    int sec = 0;

    if (ctx->tls == NULL)
        return false;
    x = tls_server_cert_for(ctx->tls, ctx->cfg->domain);
    if (x == NULL)
        return false;
    if (ASN1_TIME_diff(&days, &sec, NULL, X509_get0_notAfter(x)) != 1)
        return false;
    *secs = (int64_t)days * 86400 + sec;
    return true;
}

/* ---- per-agent series: the top N routes by requests ---- */

struct top {
    struct gw_route **v; /* the n best, most requests first */
    size_t n;
    size_t cap;          /* --metrics-agents */
};

static void top_offer(struct gw_route *rt, void *arg)
{
    struct top *t = arg;
    size_t i;

    if (t->n < t->cap)
        t->n++;
    else if (rt->n_requests <= t->v[t->n - 1]->n_requests)
        return;
    /* insertion into the sorted window: the last slot is free or loses */
    for (i = t->n - 1; i > 0 && t->v[i - 1]->n_requests < rt->n_requests; i--)
        t->v[i] = t->v[i - 1];
    t->v[i] = rt;
}

static int render_agents(struct gw_ctx *ctx, struct evbuffer *out)
{
    static const struct {
        const char *name;
        const char *help;
    } series[] = {
        {"tunnel_gateway_agent_requests_total", "Requests per agent (top --metrics-agents)."},
        {"tunnel_gateway_agent_request_bytes_total", "Request body bytes per agent."},
        {"tunnel_gateway_agent_response_bytes_total", "Response body bytes per agent."},
        {"tunnel_gateway_agent_errors_total", "Requests answered with a gateway error, per agent."},
    };
    struct top t = {NULL, 0, (size_t)ctx->cfg->metrics_agents};

    if (t.cap == 0)
        return 0;
    t.v = calloc(t.cap, sizeof(*t.v));
    if (t.v == NULL)
        return -1;
    gw_tun_each_route(ctx, top_offer, &t);
    for (size_t s = 0; s < sizeof(series) / sizeof(series[0]); s++) {
        if (head(out, series[s].name, "counter", series[s].help) != 0)
            goto fail;
        for (size_t i = 0; i < t.n; i++) {
            const struct gw_route *rt = t.v[i];
            uint64_t v = s == 0   ? rt->n_requests
                         : s == 1 ? rt->n_bytes_in
                         : s == 2 ? rt->n_bytes_out
                                  : rt->n_errors;
            if (evbuffer_add_printf(out, "%s{agent=\"%s\"} %" PRIu64 "\n", series[s].name,
                                    rt->addr_str, v) < 0)
                goto fail;
        }
    }
    free(t.v);
    return 0;

fail:
    free(t.v);
    return -1;
}

static int render_legacy(struct gw_ctx *ctx, struct evbuffer *out)
{
    uint64_t uptime_s = (clk_mono_ms(ctx->clk) - ctx->start_ms) / 1000u;

    if (gauge_u(out, "tunnel_gateway_up", "1 while the gateway runs.", 1) != 0 ||
        gauge_u(out, "tunnel_gateway_uptime_seconds", "Seconds since start.", uptime_s) != 0 ||
        gauge_u(out, "tunnel_gateway_tunnels", "Authenticated tunnels connected.",
                ctx->tunnels_live) != 0 ||
        gauge_u(out, "tunnel_gateway_agents", "Agent addresses routed.",
                gw_reg_count(ctx->reg)) != 0 ||
        gauge_u(out, "tunnel_gateway_draining", "1 while draining after SIGTERM.",
                ctx->draining ? 1 : 0) != 0 ||
        counter_u(out, "tunnel_gateway_requests_total", "Public requests routed to agents.",
                  ctx->n.requests_total) != 0 ||
        counter_u(out, "tunnel_gateway_requests_failed_total",
                  "Requests answered with a gateway error.", ctx->n.requests_failed) != 0 ||
        counter_u(out, "tunnel_gateway_tunnel_connections_total", "Tunnel upgrades accepted.",
                  ctx->n.tunnel_connections) != 0 ||
        counter_u(out, "tunnel_gateway_auth_failures_total", "Tunnels refused at authentication.",
                  ctx->n.auth_failures) != 0 ||
        counter_u(out, "tunnel_gateway_connections_total", "Public connections accepted.",
                  ctx->n.conns_accepted) != 0 ||
        counter_u(out, "tunnel_gateway_bytes_to_agents_total", "Request body bytes forwarded.",
                  ctx->n.bytes_to_agents) != 0 ||
        counter_u(out, "tunnel_gateway_bytes_from_agents_total", "Response body bytes forwarded.",
                  ctx->n.bytes_from_agents) != 0)
        return -1;
    return 0;
}

/* --redis: the shared registry and the forwarding between nodes. */
static int render_cluster(struct gw_ctx *ctx, struct evbuffer *out)
{
    const struct gw_metrics *m = &ctx->m;

    if (ctx->rds == NULL)
        return 0;
    if (gauge_u(out, "tunnel_gateway_redis_up",
                "1 while both Redis connections are up, 0 while degraded.",
                gw_rds_ok(ctx->rds) ? 1 : 0) != 0 ||
        counter_u(out, "tunnel_gateway_redis_errors_total",
                  "Redis failures: connections lost or refused, error replies, timeouts.",
                  gw_rds_errors(ctx->rds)) != 0 ||
        gauge_u(out, "tunnel_gateway_redis_cached_routes",
                "Routes to other nodes in the lookup cache.", gw_rds_cached(ctx->rds)) != 0 ||
        counter_u(out, "tunnel_gateway_forwarded_out_total",
                  "Requests forwarded to the node holding the agent's tunnel.",
                  ctx->n.node_out) != 0 ||
        counter_u(out, "tunnel_gateway_forwarded_in_total",
                  "Requests other nodes forwarded here, proof valid.", ctx->n.node_in) != 0 ||
        counter_u(out, "tunnel_gateway_forwarded_refused_total",
                  "Requests on the node listener refused (no or wrong proof).",
                  ctx->n.node_refused) != 0 ||
        gauge_u(out, "tunnel_gateway_node_peers", "Connections open to other nodes.",
                gw_node_peers(ctx->node)) != 0 ||
        gauge_u(out, "tunnel_gateway_forwarded_streams", "Forwarded requests in flight.",
                gw_node_streams(ctx->node)) != 0 ||
        hist(out, "tunnel_gateway_forwarded_time_to_headers_seconds",
             "Forwarded requests: time from the request head to the response head, the hop "
             "to the other node included.",
             &m->fwd_ttfb) != 0 ||
        hist(out, "tunnel_gateway_from_node_time_to_headers_seconds",
             "Requests other nodes forwarded here: time from their head to the response head.",
             &m->from_node_ttfb) != 0)
        return -1;
    return 0;
}

int gw_metrics_render(struct gw_ctx *ctx, struct evbuffer *out)
{
    const struct gw_metrics *m = &ctx->m;
    double cpu;
    uint64_t v;
    int64_t exp;

    if (render_legacy(ctx, out) != 0)
        return -1;
    if (head(out, "tunnel_gateway_build_info", "gauge", "Build information; always 1.") != 0)
        return -1;
    P("tunnel_gateway_build_info{version=\"%s\",node=\"%s\"} 1\n", TG_VERSION, ctx->node_id);

    if (head(out, "tunnel_gateway_http_responses_total", "counter",
             "Requests to agent hosts by response status class.") != 0)
        return -1;
    for (int c = 1; c <= 5; c++)
        P("tunnel_gateway_http_responses_total{code=\"%dxx\"} %" PRIu64 "\n", c,
          m->status_class[c]);
    if (head(out, "tunnel_gateway_http_errors_total", "counter",
             "Requests to agent hosts answered with a gateway error, by error code.") != 0)
        return -1;
    for (int e = HERR_NONE + 1; e < HERR_COUNT_; e++)
        P("tunnel_gateway_http_errors_total{error=\"%s\"} %" PRIu64 "\n",
          herr_code((enum herr)e), m->by_err[e]);
    if (hist(out, "tunnel_gateway_http_time_to_headers_seconds",
             "Time from the request head to the response head (agent hosts).", &m->ttfb) != 0 ||
        hist(out, "tunnel_gateway_http_request_duration_seconds",
             "Time from the request head to the end of the response (agent hosts).",
             &m->dur) != 0 ||
        counter_u(out, "tunnel_gateway_http_request_body_bytes_total",
                  "Request body bytes received from clients (agent hosts).",
                  m->req_body_bytes) != 0 ||
        counter_u(out, "tunnel_gateway_http_response_body_bytes_total",
                  "Response body bytes sent to clients (agent hosts).", m->resp_body_bytes) != 0 ||
        gauge_u(out, "tunnel_gateway_active_streams", "Requests in flight over all tunnels.",
                gw_tun_streams_total(ctx)) != 0 ||
        gauge_u(out, "tunnel_gateway_active_websockets", "Upgraded (WebSocket) requests open.",
                m->websockets_active) != 0)
        return -1;

    if (head(out, "tunnel_gateway_tunnel_auth_total", "counter",
             "Tunnel authentications by outcome.") != 0)
        return -1;
    for (int o = 0; o < GW_AUTH_COUNT_; o++)
        P("tunnel_gateway_tunnel_auth_total{outcome=\"%s\"} %" PRIu64 "\n",
          gw_auth_outcome_name((enum gw_auth_outcome)o), m->auth[o]);
    if (head(out, "tunnel_gateway_rate_limited_total", "counter",
             "Refusals by rate limit or quota.") != 0)
        return -1;
    for (int k = 0; k < GW_LIMIT_COUNT_; k++)
        P("tunnel_gateway_rate_limited_total{kind=\"%s\"} %" PRIu64 "\n",
          gw_limit_kind_name((enum gw_limit_kind)k), m->limit[k]);

    if (cert_expiry(ctx, &exp)) {
        if (head(out, "tunnel_gateway_certificate_expiry_seconds", "gauge",
                 "Seconds until notAfter of the certificate served for the apex domain.") != 0)
            return -1;
        P("tunnel_gateway_certificate_expiry_seconds %" PRId64 "\n", exp);
    }
    if (proc_cpu(&cpu) == 0) {
        if (head(out, "process_cpu_seconds_total", "counter",
                 "User and system CPU time spent, seconds.") != 0)
            return -1;
        P("process_cpu_seconds_total %.2f\n", cpu);
    }
    if (proc_rss(&v) == 0 &&
        gauge_u(out, "process_resident_memory_bytes", "Resident memory size, bytes.", v) != 0)
        return -1;
    if (proc_fds(&v) == 0 &&
        gauge_u(out, "process_open_fds", "Open file descriptors.", v) != 0)
        return -1;
    if (render_cluster(ctx, out) != 0)
        return -1;
    return render_agents(ctx, out);
}
