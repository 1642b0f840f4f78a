/* The tunnel endpoint; see gw_tep.h. The per-IP tunnel slot is taken here
 * and handed to the tunnel with the connection; if the front end's
 * connection ends before the hand-over, on_conn gets NULL and releases it.
 * The same holds for the pending slot (not yet authenticated: per IP and in
 * total), which the tunnel gives back once it authenticates. */
#include "gw_tep.h"

#include <string.h>

#include <event2/bufferevent.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_ipt.h"
#include "gw_osr.h"
#include "gw_req.h"
#include "gw_tun.h"
#include "gw_tun_h2.h"
#include "log.h"
#include "tun_msg.h"
#include "util.h"
#include "ws.h"

/* Sec-WebSocket-Protocol: a comma list; picks the tunnel protocol (none
 * offered: Osaurus, which has no subprotocol). NULL if none is known. */
static const struct gw_tun_proto *pick_proto(const nghttp2_nv *nv)
{
    struct iov list;
    struct iov item;

    if (nv == NULL)
        return &gw_osr_proto;
    list = (struct iov){(const char *)nv->value, nv->valuelen};
    while (util_list_next(&list, &item))
        if (item.len == strlen(TUN_SUBPROTOCOL) && memcmp(item.base, TUN_SUBPROTOCOL, item.len) == 0)
            return &gw_tun_h2_proto;
    return NULL;
}

static void release_slots(struct gw_ctx *ctx, const struct sockaddr *peer)
{
    gw_ipt_pending_release(ctx->ipt, peer);
    ctx->tunnels_pending--;
    gw_ipt_tunnel_release(ctx->ipt, peer);
}

/* Takes a pending slot for peer, which holds a tunnel slot: HERR_NONE, or
 * the refusal (the tunnel slot is then given back). */
static enum herr acquire_pending(struct gw_ctx *ctx, struct gw_req *r)
{
    const struct gw_cfg *cfg = ctx->cfg;
    const struct sockaddr *peer = (struct sockaddr *)&r->peer;
    enum herr e = HERR_NONE;

    if (cfg->max_pending_tunnels != 0 && ctx->tunnels_pending >= cfg->max_pending_tunnels)
        e = HERR_GATEWAY_BUSY;
    else if (!gw_ipt_pending_acquire(ctx->ipt, peer, cfg->max_pending_tunnels_per_ip))
        e = HERR_TOO_MANY_CONNECTIONS;
    if (e != HERR_NONE) {
        gw_ipt_tunnel_release(ctx->ipt, peer);
        gw_metrics_limit(ctx, e == HERR_GATEWAY_BUSY ? GW_LIMIT_PENDING_TUNNELS
                                                     : GW_LIMIT_PENDING_TUNNELS_PER_IP);
        LOG_WARN(ctx->log, "tunnel_refused", LOG_U("conn", r->conn_id), LOG_S("peer", r->client_ip),
                 LOG_S("err", e == HERR_GATEWAY_BUSY ? "max_pending_tunnels"
                                                     : "max_pending_tunnels_per_ip"));
        return e;
    }
    ctx->tunnels_pending++;
    return HERR_NONE;
}

/* The front end handed the connection over (or it ended first). */
static void on_conn(struct gw_req *r, struct bufferevent *bev, const void *arg)
{
    const struct gw_tun_proto *proto = arg;
    const nghttp2_nv *key = gw_hdrs_get(&r->hdrs, "sec-websocket-key");
    char accept[29];

    if (bev == NULL || key == NULL ||
        ws_accept_key((const char *)key->value, key->valuelen, accept) != 0) {
        release_slots(r->ctx, (struct sockaddr *)&r->peer);
        if (bev != NULL)
            bufferevent_free(bev);
        return;
    }
    gw_tun_accept(r->ctx, bev, (struct sockaddr *)&r->peer, accept, proto, r->conn_id,
                  r->client_ip);
}

void gw_tep_handle(struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    const struct gw_cfg *cfg = ctx->cfg;
    const nghttp2_nv *key = gw_hdrs_get(&r->hdrs, "sec-websocket-key");
    const nghttp2_nv *ver = gw_hdrs_get(&r->hdrs, "sec-websocket-version");
    const struct gw_tun_proto *proto;
    char accept[29];
    enum gw_ipt_verdict v;
    enum herr e;

    /* tunnels are HTTP/1.1 upgrades: an h2 extended CONNECT would share its
     * connection, and the tunnel needs one of its own */
    if (!r->h1_upgrade || !gw_req_is_websocket(r) || key == NULL || ver == NULL ||
        strcmp((const char *)ver->value, "13") != 0 ||
        ws_accept_key((const char *)key->value, key->valuelen, accept) != 0 ||
        !(r->has_content_length && r->content_length == 0) || r->fe->take_conn == NULL) {
        gw_req_fail(r, HERR_WEBSOCKET_REQUIRED);
        return;
    }
    proto = pick_proto(gw_hdrs_get(&r->hdrs, "sec-websocket-protocol"));
    if (proto == NULL) {
        gw_req_fail(r, HERR_UNSUPPORTED_PROTOCOL);
        return;
    }
    if (ctx->draining) {
        gw_req_fail(r, HERR_SHUTTING_DOWN);
        return;
    }
    v = gw_ipt_tunnel_acquire(ctx->ipt, (struct sockaddr *)&r->peer, cfg->max_tunnels_per_ip,
                              cfg->tunnel_connects_per_ip_per_min, clk_mono_ms(ctx->clk));
    if (v != GW_IPT_OK) {
        gw_metrics_limit(ctx, v == GW_IPT_RATE ? GW_LIMIT_TUNNEL_CONNECTS : GW_LIMIT_TUNNELS_PER_IP);
        LOG_WARN(ctx->log, "tunnel_refused", LOG_U("conn", r->conn_id), LOG_S("peer", r->client_ip),
                 LOG_S("err", v == GW_IPT_RATE ? "rate_limited" : "too_many_connections"));
        gw_req_fail(r, v == GW_IPT_RATE ? HERR_RATE_LIMITED : HERR_TOO_MANY_CONNECTIONS);
        return;
    }
    e = acquire_pending(ctx, r);
    if (e != HERR_NONE) {
        gw_req_fail(r, e);
        return;
    }
    if (r->fe->take_conn(r, on_conn, proto) != 0) {
        release_slots(ctx, (struct sockaddr *)&r->peer);
        gw_req_fail(r, HERR_WEBSOCKET_REQUIRED);
    }
}
