/* Gateway endpoints; see gw_admin.h. */
#include "gw_admin.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "clk.h"
#include "gw.h"
#include "gw_reg.h"
#include "gw_req.h"
#include "util.h"

#define ADMIN_BODY_MAX 4096

static void respond(struct gw_req *r, int status, const char *ctype, const char *body, size_t len)
{
    char clen[24];
    nghttp2_nv nv[3] = {
        {(uint8_t *)"content-type", (uint8_t *)ctype, 12, strlen(ctype), NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-length", (uint8_t *)clen, 14, 0, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"cache-control", (uint8_t *)"no-store", 13, 8, NGHTTP2_NV_FLAG_NONE},
    };

    nv[1].valuelen = (size_t)snprintf(clen, sizeof(clen), "%zu", len);
    if (gw_req_head(r, status, nv, 3) != 0)
        return;
    if (!r->is_head && len > 0 && gw_req_body(r, (const uint8_t *)body, len) != 0)
        return;
    gw_req_end(r, true);
}

static bool path_is(const char *path, const char *want)
{
    size_t n = strlen(want);

    return strncmp(path, want, n) == 0 && (path[n] == '\0' || path[n] == '?');
}

void gw_admin_handle(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    char body[ADMIN_BODY_MAX];
    int n;
    uint64_t uptime_s = (clk_mono_ms(ctx->clk) - ctx->start_ms) / 1000u;
    size_t agents = gw_reg_count(ctx->reg);

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
                          "{\"status\":\"%s\",\"tunnels\":%zu,\"agents\":%zu}\n",
                          ctx->draining ? "shutting_down" : "ok", ctx->tunnels_live, agents);
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
            ",\"draining\":%s}\n",
            uptime_s, ctx->tunnels_live, agents, ctx->n.requests_total, ctx->n.requests_failed,
            ctx->n.tunnel_connections, ctx->n.auth_failures, ctx->n.conns_accepted,
            ctx->n.conns_refused, ctx->n.bytes_to_agents, ctx->n.bytes_from_agents,
            ctx->draining ? "true" : "false");
        respond(r, 200, "application/json", body, n > 0 ? (size_t)n : 0);
        return;
    }
    n = util_snprintf(
        body, sizeof(body),
        "# HELP tunnel_gateway_up 1 while the gateway runs.\n"
        "# TYPE tunnel_gateway_up gauge\ntunnel_gateway_up 1\n"
        "# HELP tunnel_gateway_uptime_seconds Seconds since start.\n"
        "# TYPE tunnel_gateway_uptime_seconds gauge\ntunnel_gateway_uptime_seconds %" PRIu64 "\n"
        "# HELP tunnel_gateway_tunnels Authenticated tunnels connected.\n"
        "# TYPE tunnel_gateway_tunnels gauge\ntunnel_gateway_tunnels %zu\n"
        "# HELP tunnel_gateway_agents Agent addresses routed.\n"
        "# TYPE tunnel_gateway_agents gauge\ntunnel_gateway_agents %zu\n"
        "# HELP tunnel_gateway_draining 1 while draining after SIGTERM.\n"
        "# TYPE tunnel_gateway_draining gauge\ntunnel_gateway_draining %d\n"
        "# HELP tunnel_gateway_requests_total Public requests routed to agents.\n"
        "# TYPE tunnel_gateway_requests_total counter\ntunnel_gateway_requests_total %" PRIu64 "\n"
        "# HELP tunnel_gateway_requests_failed_total Requests answered with a gateway error.\n"
        "# TYPE tunnel_gateway_requests_failed_total counter\n"
        "tunnel_gateway_requests_failed_total %" PRIu64 "\n"
        "# HELP tunnel_gateway_tunnel_connections_total Tunnel upgrades accepted.\n"
        "# TYPE tunnel_gateway_tunnel_connections_total counter\n"
        "tunnel_gateway_tunnel_connections_total %" PRIu64 "\n"
        "# HELP tunnel_gateway_auth_failures_total Tunnels refused at authentication.\n"
        "# TYPE tunnel_gateway_auth_failures_total counter\n"
        "tunnel_gateway_auth_failures_total %" PRIu64 "\n"
        "# HELP tunnel_gateway_connections_total Public connections accepted.\n"
        "# TYPE tunnel_gateway_connections_total counter\n"
        "tunnel_gateway_connections_total %" PRIu64 "\n"
        "# HELP tunnel_gateway_bytes_to_agents_total Request body bytes forwarded.\n"
        "# TYPE tunnel_gateway_bytes_to_agents_total counter\n"
        "tunnel_gateway_bytes_to_agents_total %" PRIu64 "\n"
        "# HELP tunnel_gateway_bytes_from_agents_total Response body bytes forwarded.\n"
        "# TYPE tunnel_gateway_bytes_from_agents_total counter\n"
        "tunnel_gateway_bytes_from_agents_total %" PRIu64 "\n",
        uptime_s, ctx->tunnels_live, agents, ctx->draining ? 1 : 0, ctx->n.requests_total,
        ctx->n.requests_failed, ctx->n.tunnel_connections, ctx->n.auth_failures,
        ctx->n.conns_accepted, ctx->n.bytes_to_agents, ctx->n.bytes_from_agents);
    respond(r, 200, "text/plain; version=0.0.4", body, n > 0 ? (size_t)n : 0);
}
