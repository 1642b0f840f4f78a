/* Listeners; see gw_lsn.h. A connection in its handshake/sniffing phase is a
 * small struct gw_hs owned by its own callbacks; once the protocol is known
 * the bufferevent moves to gw_h1 or gw_h2 and the gw_hs is freed. */
#include "gw_lsn.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <openssl/ssl.h>

#include "gw.h"
#include "gw_cfg.h"
#include "gw_h1.h"
#include "gw_h2.h"
#include "gw_ipt.h"
#include "herr.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define HS_TIMEOUT_S 10 /* TLS handshake / first bytes */
#define GW_IO_MAX (256 * 1024) /* bytes per socket write call */

static const char h2_preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct gw_lsn {
    struct gw_ctx *ctx;
    struct evconnlistener *el;   /* owned */
    bool tls;
    uint16_t port;
};

/* A connection before its protocol is known. */
struct gw_hs {
    struct gw_conn_link link;    /* in ctx->conns; first member */
    struct bufferevent *bev;     /* owned until dispatch */
    struct gw_ctx *ctx;
    uint64_t id;
    bool tls;
    bool refused;                /* over max-conns-per-ip: answer 429 and close */
    struct sockaddr_storage peer;
    socklen_t peerlen;
};

/* Writes the 429 and frees the bufferevent once it is out. */
static void refuse_on_write(struct bufferevent *bev, void *arg)
{
    if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
        bufferevent_free(bev);
}

static void refuse_on_event(struct bufferevent *bev, short what, void *arg)
{
    bufferevent_free(bev);
}

/* An HTTP/1.1 client over the limit; an h2 one is gw_h2_start(refused). */
static void refuse(struct bufferevent *bev)
{
    struct timeval tv = {5, 0};

    bufferevent_setcb(bev, NULL, refuse_on_write, refuse_on_event, NULL);
    bufferevent_set_timeouts(bev, &tv, &tv);
    if (herr_write_h1(bufferevent_get_output(bev), HERR_TOO_MANY_CONNECTIONS, false, true) != 0) {
        bufferevent_free(bev);
        return;
    }
    bufferevent_disable(bev, EV_READ);
    bufferevent_enable(bev, EV_WRITE);
}

static void hs_dispatch(struct gw_hs *hs, struct bufferevent *bev, bool h2)
{
    struct gw_ctx *ctx = hs->ctx;
    const char *scheme = hs->tls ? "https" : "http";

    gw_conn_link_del(ctx, &hs->link);
    bufferevent_setcb(bev, NULL, NULL, NULL, NULL);
    bufferevent_set_timeouts(bev, NULL, NULL);
    if (hs->refused && !h2) {
        refuse(bev);
        free(hs);
        return;
    }
    if (h2)
        gw_h2_start(ctx, bev, (struct sockaddr *)&hs->peer, hs->peerlen, scheme, hs->id,
                    hs->refused);
    else
        gw_h1_start(ctx, bev, (struct sockaddr *)&hs->peer, hs->peerlen, scheme, hs->id);
    free(hs);
}

/* Cleartext: decide h1 or h2 prior knowledge from the first bytes. */
static void hs_on_read(struct bufferevent *bev, void *arg)
{
    struct gw_hs *hs = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t have = evbuffer_get_length(in);
    size_t cmp = have < sizeof(h2_preface) - 1 ? have : sizeof(h2_preface) - 1;
    unsigned char *p = evbuffer_pullup(in, (ev_ssize_t)cmp);

    if (p == NULL || memcmp(p, h2_preface, cmp) != 0) {
        hs_dispatch(hs, bev, false);
        return;
    }
    if (cmp == sizeof(h2_preface) - 1)
        hs_dispatch(hs, bev, true);
    /* else: a prefix of the preface; wait for more */
}

static void hs_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct gw_hs *hs = arg;

    if (what & BEV_EVENT_CONNECTED) {
        SSL *ssl = bufferevent_openssl_get_ssl(bev);
        const unsigned char *alpn = NULL;
        unsigned alen = 0;
        SSL_get0_alpn_selected(ssl, &alpn, &alen);
        hs_dispatch(hs, bev, alen == 2 && memcmp(alpn, "h2", 2) == 0);
        return;
    }
    if (what & BEV_EVENT_ERROR) {
        if (log_enabled(hs->ctx->log, LOG_LVL_DEBUG))
            tls_log_errors(hs->ctx->log, "tls_handshake_failed");
        else
            tls_drain_errors();
    }
    gw_conn_link_del(hs->ctx, &hs->link);
    if (!hs->refused)
        gw_ipt_conn_release(hs->ctx->ipt, (struct sockaddr *)&hs->peer);
    bufferevent_free(bev);
    free(hs);
}

static void hs_free_now(struct gw_conn_link *l)
{
    struct gw_hs *hs = (struct gw_hs *)l;

    gw_conn_link_del(hs->ctx, &hs->link);
    if (!hs->refused)
        gw_ipt_conn_release(hs->ctx->ipt, (struct sockaddr *)&hs->peer);
    bufferevent_free(hs->bev);
    free(hs);
}

static void lsn_on_accept(struct evconnlistener *el, evutil_socket_t fd, struct sockaddr *sa,
                          int salen, void *arg)
{
    struct gw_lsn *l = arg;
    struct gw_ctx *ctx = l->ctx;
    struct bufferevent *bev;
    struct gw_hs *hs;
    struct timeval tv = {HS_TIMEOUT_S, 0};
    int one = 1;

    ctx->n.conns_accepted++;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    hs = calloc(1, sizeof(*hs));
    if (hs == NULL) {
        evutil_closesocket(fd);
        return;
    }
    hs->ctx = ctx;
    hs->id = gw_next_id(ctx);
    hs->tls = l->tls;
    memcpy(&hs->peer, sa, (size_t)salen);
    hs->peerlen = (socklen_t)salen;
    if (!gw_ipt_conn_acquire(ctx->ipt, sa, ctx->cfg->max_conns_per_ip)) {
        hs->refused = true;
        ctx->n.conns_refused++;
        gw_metrics_limit(ctx, GW_LIMIT_CONNS_PER_IP);
        LOG_WARN(ctx->log, "conn_refused", LOG_S("err", "too_many_connections"),
                 LOG_U("limit", ctx->cfg->max_conns_per_ip));
    }
    if (l->tls) {
        SSL *ssl = SSL_new(tls_server_ctx(ctx->tls));
        if (ssl == NULL) {
            tls_drain_errors();
            evutil_closesocket(fd);
            free(hs);
            return;
        }
        /* takes ssl and fd (BEV_OPT_CLOSE_ON_FREE), also on failure */
        bev = bufferevent_openssl_socket_new(ctx->base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                             BEV_OPT_CLOSE_ON_FREE);
        if (bev == NULL) {
            free(hs);
            return;
        }
        bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
        bufferevent_setcb(bev, NULL, NULL, hs_on_event, hs);
    } else {
        bev = bufferevent_socket_new(ctx->base, fd, BEV_OPT_CLOSE_ON_FREE);
        if (bev == NULL) {
            evutil_closesocket(fd);
            free(hs);
            return;
        }
        bufferevent_setcb(bev, hs_on_read, NULL, hs_on_event, hs);
    }
    /* Writes of up to 256 KiB per call: with the default 16 KiB, libevent's
     * OpenSSL bufferevent cuts a small TLS record (and a write(2)) wherever a
     * 16 KiB window ends inside an output chain. */
    bufferevent_set_max_single_write(bev, GW_IO_MAX);
    hs->bev = bev;
    hs->link.free_now = hs_free_now;
    gw_conn_link_add(ctx, &hs->link);
    bufferevent_set_timeouts(bev, &tv, NULL);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

static void lsn_on_error(struct evconnlistener *el, void *arg)
{
    struct gw_lsn *l = arg;
    int e = EVUTIL_SOCKET_ERROR();

    /* EMFILE and friends: log, back off by disabling for a moment would be
     * better; the listener keeps running and retries on the next event */
    LOG_WARN(l->ctx->log, "accept_failed", LOG_S("err", evutil_socket_error_to_string(e)),
             LOG_U("port", l->port));
}

struct gw_lsn *gw_lsn_new(struct gw_ctx *ctx, const struct gw_cfg_addr *addr, bool tls,
                          char *err, size_t errlen)
{
    struct gw_lsn *l = calloc(1, sizeof(*l));
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);

    if (l == NULL) {
        util_snprintf(err, errlen, "out of memory");
        return NULL;
    }
    l->ctx = ctx;
    l->tls = tls;
    l->el = evconnlistener_new_bind(ctx->base, lsn_on_accept, l,
                                    LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE |
                                        LEV_OPT_CLOSE_ON_EXEC,
                                    1024, (const struct sockaddr *)&addr->ss, (int)addr->sslen);
    if (l->el == NULL) {
        util_snprintf(err, errlen, "cannot listen on %s: %s", addr->text, strerror(errno));
        free(l);
        return NULL;
    }
    evconnlistener_set_error_cb(l->el, lsn_on_error);
    if (getsockname(evconnlistener_get_fd(l->el), (struct sockaddr *)&bound, &blen) == 0)
        l->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                     : ((struct sockaddr_in *)&bound)->sin_port);
    return l;
}

uint16_t gw_lsn_port(const struct gw_lsn *l)
{
    return l->port;
}

void gw_lsn_disable(struct gw_lsn *l)
{
    if (l != NULL)
        evconnlistener_disable(l->el);
}

void gw_lsn_free(struct gw_lsn *l)
{
    if (l == NULL)
        return;
    evconnlistener_free(l->el);
    free(l);
}
