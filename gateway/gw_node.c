/* Node-to-node forwarding; see gw_node.h.
 *
 * Ownership: struct gw_node is the context's; it owns the peers (list), each
 * peer owns its bufferevent and its HTTP/2 session (gw_tun_h2). The session
 * calls back here for I/O and to close; a close only marks the peer, and the
 * peer's kick event (its own callback, never under the session's frame)
 * fails what is left and frees it. */
#include "gw_node.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/util.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_rds.h"
#include "gw_req.h"
#include "gw_tun_h2.h"
#include "gw_up.h"
#include "list.h"
#include "log.h"
#include "util.h"

#define PEER_OUT_MAX (1024 * 1024) /* bytes queued on a peer's socket before it stops taking */
#define PEER_CONNECT_TIMEOUT_S 3   /* a node that does not accept in this long is gone */
#define PEER_IDLE_S 60             /* an unused peer connection closes (before the other
                                    * node's keepalive-timeout, 75 s by default) */

/* The forwarding fields, in signing order (gw_node_in.v follows it). */
enum {
    F_TS = 0,   /* unix seconds when signed */
    F_FROM,     /* the forwarding node's id */
    F_HOP,      /* always "1": a forwarded request is never forwarded again */
    F_SCHEME,   /* the client's scheme at the first node */
    F_CLIENT,   /* the client's address as the first node saw it */
    F_XFF,      /* the trusted X-Forwarded-For chain before it, or "" */
    F_PROTO,    /* X-Forwarded-Proto the agent will see */
    F_HOST,     /* a trusted X-Forwarded-Host, or "" */
    F_PROOF,    /* hex HMAC-SHA256 over the rest and the request head */
};

static const char *const fwd_names[GW_NODE_FWD_FIELDS] = {
    "x-tg-ts",    "x-tg-from", "x-tg-hop",  "x-tg-scheme", "x-tg-client-ip",
    "x-tg-xff",   "x-tg-proto", "x-tg-host", "x-tg-proof",
};

struct gw_node_peer {
    struct gw_node *node;               /* owner */
    struct list link;                   /* in gw_node.peers */
    char addr[GW_NODE_ADDR_MAX + 1];    /* the advertise address dialled */
    uint64_t id;
    struct bufferevent *bev;            /* owned */
    struct gw_tun_h2 *h2;               /* owned */
    struct event *kick;                 /* owned: flush / close from the loop */
    bool connected;
    bool closing;                       /* close asked: freed from kick */
    uint64_t last_used_ms;
    char reason[64];
};

struct gw_node {
    struct gw_ctx *ctx;
    struct list peers;                  /* struct gw_node_peer */
    struct event *sweep;                /* owned: closes idle peers */
};

static void peer_free(struct gw_node_peer *p);

/* ---- the proof ---- */

/* HMAC-SHA256 over the fields (but the proof) and the head, as hex. */
static int proof_hex(const struct gw_cfg *cfg, const char *const v[GW_NODE_FWD_FIELDS - 1],
                     const struct gw_req *r, char out[65])
{
    static const char hexd[] = "0123456789abcdef";
    const char *head[] = {r->method, r->authority, r->path,
                          r->protocol != NULL ? r->protocol : ""};
    uint8_t mac[EVP_MAX_MD_SIZE];
    EVP_MAC *m = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *c = m != NULL ? EVP_MAC_CTX_new(m) : NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    size_t outl = 0;
    int rv = -1;

    if (c == NULL || cfg->cluster_secret == NULL ||
        EVP_MAC_init(c, cfg->cluster_secret, cfg->cluster_secret_len, params) != 1)
        goto out;
    if (EVP_MAC_update(c, (const uint8_t *)"tg-node-v1\n", 11) != 1)
        goto out;
    for (size_t i = 0; i < GW_NODE_FWD_FIELDS - 1; i++) {
        if (EVP_MAC_update(c, (const uint8_t *)v[i], strlen(v[i])) != 1 ||
            EVP_MAC_update(c, (const uint8_t *)"\n", 1) != 1)
            goto out;
    }
    for (size_t i = 0; i < sizeof(head) / sizeof(head[0]); i++) {
        if (EVP_MAC_update(c, (const uint8_t *)head[i], strlen(head[i])) != 1 ||
            EVP_MAC_update(c, (const uint8_t *)"\n", 1) != 1)
            goto out;
    }
    if (EVP_MAC_final(c, mac, &outl, sizeof(mac)) != 1 || outl != 32)
        goto out;
    for (size_t i = 0; i < outl; i++) {
        out[2 * i] = hexd[mac[i] >> 4];
        out[2 * i + 1] = hexd[mac[i] & 15];
    }
    out[64] = '\0';
    rv = 0;
out:
    OPENSSL_cleanse(mac, sizeof(mac));
    EVP_MAC_CTX_free(c);
    EVP_MAC_free(m);
    return rv;
}

int gw_node_fwd_fields(struct gw_ctx *ctx, const struct gw_req *r, struct gw_node_fwd *out)
{
    const char *v[GW_NODE_FWD_FIELDS - 1];

    util_snprintf(out->ts, sizeof(out->ts), "%lld", (long long)clk_unix_s(ctx->clk));
    v[F_TS] = out->ts;
    v[F_FROM] = ctx->node_id;
    v[F_HOP] = "1";
    v[F_SCHEME] = r->scheme;
    v[F_CLIENT] = r->client_ip;
    v[F_XFF] = r->xff_chain;
    v[F_PROTO] = r->fwd_proto;
    v[F_HOST] = r->fwd_host != NULL ? r->fwd_host : "";
    if (proof_hex(ctx->cfg, v, r, out->proof) != 0)
        return -1;
    out->n = 0;
    for (size_t i = 0; i < GW_NODE_FWD_FIELDS - 1; i++) {
        out->name[out->n] = fwd_names[i];
        out->value[out->n++] = v[i];
    }
    out->name[out->n] = fwd_names[F_PROOF];
    out->value[out->n++] = out->proof;
    return 0;
}

int gw_node_in_header(struct gw_req *r, const char *name, size_t nlen, const char *value,
                      size_t vlen)
{
    for (size_t i = 0; i < GW_NODE_FWD_FIELDS; i++) {
        if (strlen(fwd_names[i]) != nlen || memcmp(fwd_names[i], name, nlen) != 0)
            continue;
        if (r->node_in == NULL && (r->node_in = calloc(1, sizeof(*r->node_in))) == NULL)
            return -1;
        if (r->node_in->v[i] != NULL)
            return 1; /* a repeated field: the first stays, the proof decides */
        r->node_in->v[i] = strndup(value, vlen);
        return r->node_in->v[i] != NULL ? 1 : -1;
    }
    return 0;
}

static void refuse_log(struct gw_req *r, const char *why)
{
    r->ctx->n.node_refused++;
    LOG_WARN(r->ctx->log, "node_request_refused", LOG_U("conn", r->conn_id),
             LOG_S("peer", r->client_ip), LOG_S("why", why));
}

enum herr gw_node_accept(struct gw_req *r)
{
    const struct gw_node_in *in = r->node_in;
    const char *v[GW_NODE_FWD_FIELDS - 1];
    char want[65];
    uint64_t ts;
    int64_t now = clk_unix_s(r->ctx->clk);

    if (in == NULL) {
        refuse_log(r, "no forwarding fields");
        return HERR_NODE_FORBIDDEN;
    }
    for (size_t i = 0; i < GW_NODE_FWD_FIELDS; i++) {
        if (in->v[i] == NULL) {
            refuse_log(r, "a forwarding field is missing");
            return HERR_NODE_FORBIDDEN;
        }
        if (i < GW_NODE_FWD_FIELDS - 1)
            v[i] = in->v[i];
    }
    if (strlen(in->v[F_PROOF]) != 64 || proof_hex(r->ctx->cfg, v, r, want) != 0 ||
        CRYPTO_memcmp(want, in->v[F_PROOF], 64) != 0) {
        refuse_log(r, "wrong proof");
        return HERR_NODE_FORBIDDEN;
    }
    if (util_parse_u64(v[F_TS], strlen(v[F_TS]), &ts) != 0 ||
        (int64_t)ts < now - GW_NODE_PROOF_SKEW_S || (int64_t)ts > now + GW_NODE_PROOF_SKEW_S) {
        refuse_log(r, "proof out of time (clocks apart, or a replay)");
        return HERR_NODE_FORBIDDEN;
    }
    if (strcmp(v[F_HOP], "1") != 0)
        return HERR_LOOP_DETECTED;
    /* believed from here: what the first node saw */
    util_snprintf(r->client_ip, sizeof(r->client_ip), "%s", v[F_CLIENT]);
    util_snprintf(r->xff_chain, sizeof(r->xff_chain), "%s", v[F_XFF]);
    util_snprintf(r->fwd_proto, sizeof(r->fwd_proto), "%s", v[F_PROTO]);
    r->scheme = strcmp(v[F_SCHEME], "https") == 0 ? "https" : "http";
    free(r->fwd_host);
    r->fwd_host = v[F_HOST][0] != '\0' ? strdup(v[F_HOST]) : NULL;
    if (v[F_HOST][0] != '\0' && r->fwd_host == NULL)
        return HERR_INTERNAL;
    r->ctx->n.node_in++;
    return HERR_NONE;
}

/* ---- peers ---- */

bool gw_node_peer_writable(const struct gw_node_peer *p)
{
    return p->bev != NULL && !p->closing &&
           evbuffer_get_length(bufferevent_get_output(p->bev)) < PEER_OUT_MAX;
}

int gw_node_peer_send(struct gw_node_peer *p, struct evbuffer *buf)
{
    if (p->bev == NULL || p->closing) {
        evbuffer_drain(buf, evbuffer_get_length(buf));
        return -1;
    }
    return evbuffer_add_buffer(bufferevent_get_output(p->bev), buf);
}

void gw_node_peer_kick(struct gw_node_peer *p)
{
    event_active(p->kick, EV_TIMEOUT, 0);
}

void gw_node_peer_close(struct gw_node_peer *p, const char *reason)
{
    if (p->closing)
        return;
    p->closing = true;
    util_snprintf(p->reason, sizeof(p->reason), "%s", reason);
    event_active(p->kick, EV_TIMEOUT, 0);
}

static void peer_on_kick(evutil_socket_t fd, short what, void *arg)
{
    struct gw_node_peer *p = arg;

    if (p->closing) {
        LOG_INFO(p->node->ctx->log, "node_peer_closed", LOG_U("peer", p->id),
                 LOG_S("addr", p->addr), LOG_S("reason", p->reason));
        gw_rds_peer_gone(p->node->ctx->rds, p->addr, !p->connected);
        peer_free(p);
        return;
    }
    gw_tun_h2_peer_flush(p->h2);
}

static void peer_on_read(struct bufferevent *bev, void *arg)
{
    struct gw_node_peer *p = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t len;

    while (!p->closing && (len = evbuffer_get_contiguous_space(in)) > 0) {
        unsigned char *d = evbuffer_pullup(in, (ev_ssize_t)len);
        if (d == NULL || gw_tun_h2_peer_recv(p->h2, d, len) != 0) {
            gw_node_peer_close(p, "protocol error");
            return;
        }
        evbuffer_drain(in, len);
    }
    gw_tun_h2_peer_flush(p->h2);
}

static void peer_on_write(struct bufferevent *bev, void *arg)
{
    struct gw_node_peer *p = arg;

    if (!p->closing)
        gw_tun_h2_peer_flush(p->h2);
}

static void peer_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct gw_node_peer *p = arg;

    if (what & BEV_EVENT_CONNECTED) {
        p->connected = true;
        bufferevent_set_timeouts(bev, NULL, NULL);
        gw_tun_h2_peer_flush(p->h2);
        return;
    }
    gw_node_peer_close(p, (what & BEV_EVENT_TIMEOUT) ? "connect timeout"
                          : (what & BEV_EVENT_EOF) ? "closed by the other node"
                          : p->connected          ? "connection error"
                                                  : "connect failed");
}

static void peer_free(struct gw_node_peer *p)
{
    list_unlink(&p->link);
    /* requests still on it fail now (agent_offline before a head) */
    gw_tun_h2_peer_fail_all(p->h2);
    gw_tun_h2_peer_free(p->h2);
    if (p->bev != NULL)
        bufferevent_free(p->bev);
    event_free(p->kick);
    free(p);
}

static struct gw_node_peer *peer_new(struct gw_node *n, const char *addr)
{
    struct gw_ctx *ctx = n->ctx;
    struct gw_node_peer *p = calloc(1, sizeof(*p));
    struct sockaddr_storage ss;
    int sslen = sizeof(ss);
    struct timeval tv = {PEER_CONNECT_TIMEOUT_S, 0};

    if (p == NULL)
        return NULL;
    p->node = n;
    p->id = gw_next_id(ctx);
    util_snprintf(p->addr, sizeof(p->addr), "%s", addr);
    list_init(&p->link);
    p->kick = event_new(ctx->base, -1, 0, peer_on_kick, p);
    p->bev = bufferevent_socket_new(ctx->base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (p->kick == NULL || p->bev == NULL ||
        evutil_parse_sockaddr_port(addr, (struct sockaddr *)&ss, &sslen) != 0)
        goto fail;
    p->h2 = gw_tun_h2_peer_new(ctx, p, p->id);
    if (p->h2 == NULL)
        goto fail;
    bufferevent_setcb(p->bev, peer_on_read, peer_on_write, peer_on_event, p);
    bufferevent_setwatermark(p->bev, EV_WRITE, PEER_OUT_MAX / 2, 0);
    bufferevent_set_timeouts(p->bev, NULL, &tv);
    bufferevent_enable(p->bev, EV_READ | EV_WRITE);
    if (bufferevent_socket_connect(p->bev, (struct sockaddr *)&ss, sslen) != 0) {
        gw_tun_h2_peer_free(p->h2);
        goto fail;
    }
    {
        int one = 1;
        setsockopt(bufferevent_getfd(p->bev), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    list_insert_tail(&n->peers, &p->link);
    LOG_INFO(ctx->log, "node_peer_dial", LOG_U("peer", p->id), LOG_S("addr", addr));
    return p;
fail:
    if (p->bev != NULL)
        bufferevent_free(p->bev);
    if (p->kick != NULL)
        event_free(p->kick);
    free(p);
    return NULL;
}

/* The peer to open a stream on for addr: the newest usable one, or a new one. */
static struct gw_node_peer *peer_for(struct gw_node *n, const char *addr)
{
    struct list *it;

    for (it = n->peers.prev; it != &n->peers; it = it->prev) {
        struct gw_node_peer *p = LIST_ENTRY(it, struct gw_node_peer, link);
        if (!p->closing && strcmp(p->addr, addr) == 0 && gw_tun_h2_peer_usable(p->h2))
            return p;
    }
    return peer_new(n, addr);
}

/* ---- the upstream ---- */

static enum herr node_open(struct gw_route *rt, struct gw_req *r)
{
    struct gw_ctx *ctx = r->ctx;
    const char *addr = rt->owner;
    struct gw_node_peer *p;
    enum herr e;

    if (ctx->node == NULL)
        return HERR_AGENT_OFFLINE;
    p = peer_for(ctx->node, addr);
    if (p == NULL)
        return HERR_AGENT_OFFLINE;
    p->last_used_ms = clk_mono_ms(ctx->clk);
    /* the node that holds the agent answers the real response-header
     * timeout (the agent may have asked for a longer one than ours) */
    if (r->resp_timeout_ms != 0) {
        uint64_t max = ctx->cfg->max_resp_header_timeout_s;
        r->resp_timeout_ms = max != 0 ? max * 1000u + 5000u : 0;
    }
    e = gw_tun_h2_peer_open(p->h2, r);
    if (e == HERR_NONE) {
        r->forwarded = true;
        ctx->n.node_out++;
    }
    return e;
}

/* Only open is used: the stream attaches the tunnel session's own ops. */
const struct gw_up_ops gw_node_up_ops = {
    .name = "node",
    .open = node_open,
};

/* ---- the pool ---- */

static void on_sweep(evutil_socket_t fd, short what, void *arg)
{
    struct gw_node *n = arg;
    uint64_t now = clk_mono_ms(n->ctx->clk);
    struct list *it;

    for (it = n->peers.next; it != &n->peers; it = it->next) {
        struct gw_node_peer *p = LIST_ENTRY(it, struct gw_node_peer, link);
        if (!p->closing && gw_tun_h2_peer_streams(p->h2) == 0 &&
            now - p->last_used_ms > PEER_IDLE_S * 1000u)
            gw_node_peer_close(p, "idle");
    }
}

struct gw_node *gw_node_new(struct gw_ctx *ctx)
{
    struct gw_node *n = calloc(1, sizeof(*n));
    struct timeval tv = {PEER_IDLE_S / 4, 0};

    if (n == NULL)
        return NULL;
    n->ctx = ctx;
    list_init(&n->peers);
    n->sweep = event_new(ctx->base, -1, EV_PERSIST, on_sweep, n);
    if (n->sweep == NULL || event_add(n->sweep, &tv) != 0) {
        if (n->sweep != NULL)
            event_free(n->sweep);
        free(n);
        return NULL;
    }
    return n;
}

void gw_node_free(struct gw_node *n)
{
    if (n == NULL)
        return;
    while (!list_is_empty(&n->peers))
        peer_free(LIST_ENTRY(n->peers.next, struct gw_node_peer, link));
    event_free(n->sweep);
    free(n);
}

size_t gw_node_streams(const struct gw_node *n)
{
    size_t total = 0;

    if (n == NULL)
        return 0;
    for (const struct list *it = n->peers.next; it != &n->peers; it = it->next)
        total += gw_tun_h2_peer_streams(LIST_ENTRY(it, const struct gw_node_peer, link)->h2);
    return total;
}

size_t gw_node_peers(const struct gw_node *n)
{
    size_t total = 0;

    if (n == NULL)
        return 0;
    for (const struct list *it = n->peers.next; it != &n->peers; it = it->next)
        total++;
    return total;
}
