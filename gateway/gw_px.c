/* The proxy bridge; see gw_px.h. */
#include "gw_px.h"

#include <string.h>

#include "gw.h"
#include "gw_admin.h"
#include "gw_cfg.h"
#include "gw_node.h"
#include "gw_rds.h"
#include "gw_reg.h"
#include "gw_req.h"
#include "gw_tep.h"
#include "gw_up.h"

static bool path_is(const char *path, const char *want)
{
    size_t n = strlen(want);

    return strncmp(path, want, n) == 0 && (path[n] == '\0' || path[n] == '?');
}

/* Opens r on the route of its agent: a tunnel here, or (shared registry)
 * the node that holds it. */
static void px_open(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    struct gw_route *rt;
    enum herr e;

    rt = gw_reg_get(ctx->reg, r->addr);
    if (rt == NULL) {
        /* a request from another node is never forwarded again */
        e = ctx->rds != NULL && !r->from_node ? gw_rds_route(r) : HERR_AGENT_OFFLINE;
        if (e != HERR_NONE)
            gw_req_fail(r, e);
        return;
    }
    /* an agent may ask for a longer response-header timeout (bounded when
     * it registered); 0 at the gateway means none, which stays */
    if (r->resp_timeout_ms != 0 && rt->resp_timeout_ms > r->resp_timeout_ms)
        r->resp_timeout_ms = rt->resp_timeout_ms;
    e = rt->up->open(rt, r);
    if (e != HERR_NONE) {
        gw_req_fail(r, e);
        return;
    }
    gw_req_arm_wait(r);
}

static void px_to_agent(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;

    ctx->n.requests_total++;
    if (gw_req_is_websocket(r))
        ctx->n.websockets_total++;
    if (ctx->cfg->max_body_bytes != 0 && r->has_content_length &&
        r->content_length > ctx->cfg->max_body_bytes) {
        gw_req_fail(r, HERR_BODY_TOO_LARGE);
        return;
    }
    px_open(r);
}

void gw_px_restart(struct gw_req *r)
{
    px_open(r);
}

void gw_px_start(struct gw_req *r)
{
    enum herr e;

    if (gw_req_set_request_id(r) != 0) {
        gw_req_fail(r, HERR_INTERNAL);
        return;
    }
    e = gw_req_check(r);
    if (e != HERR_NONE) {
        gw_req_fail(r, e);
        return;
    }
    if (r->from_node) {
        /* the proof first: nothing from the node listener is believed (or
         * served) without it */
        e = gw_node_accept(r);
        if (e != HERR_NONE) {
            gw_req_fail(r, e);
            return;
        }
    }
    gw_req_route(r);
    if (r->from_node && r->route == GW_ROUTE_APEX) {
        gw_req_fail(r, HERR_NOT_FOUND); /* agents only: no admin, no tunnels */
        return;
    }
    switch (r->route) {
    case GW_ROUTE_APEX:
        if (path_is(r->path, "/tunnel/connect"))
            gw_tep_handle(r);
        else
            gw_admin_handle(r);
        return;
    case GW_ROUTE_NONE:
    case GW_ROUTE_ERROR:
        gw_req_fail(r, r->route_err);
        return;
    case GW_ROUTE_AGENT:
        px_to_agent(r);
        return;
    }
}
