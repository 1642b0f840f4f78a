/* Listeners; see gw_lsn.h. A connection in its handshake/sniffing phase is a
 * small struct gw_hs owned by its own callbacks; once the protocol is known
 * the bufferevent moves to gw_h1 or gw_h2 and the gw_hs is freed. */
#include "gw_lsn.h"

#include <arpa/inet.h>
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

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_h1.h"
#include "gw_h2.h"
#include "gw_ipt.h"
#include "gw_pp.h"
#include "herr.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define HS_TIMEOUT_S 10 /* TLS handshake / first bytes */
#define ACCEPT_PAUSE_MS 100 /* out of descriptors: stop accepting this long */
/* Descriptors kept for tunnels' and the gateway's own needs (log reopen,
 * reload, the CA): a public connection that would use one is closed at once. */
#define FD_RESERVE 32
#define GW_IO_MAX (256 * 1024) /* bytes per socket write call */

static const char h2_preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct gw_lsn {
    struct gw_ctx *ctx;
    struct evconnlistener *el;   /* owned */
    struct event *resume;        /* owned; ends an accept pause */
    bool tls;
    bool proxy;                  /* --proxy-protocol: a PROXY v2 header comes first */
    bool node;                   /* --node-listen: other nodes' HTTP/2 only (gw_node) */
    bool disabled;               /* gw_lsn_disable: never resumed */
    bool paused;                 /* out of descriptors: an episode is on */
    uint64_t episode_failures;   /* accept failures in it */
    uint64_t episode_shed;       /* connections closed at once for the reserve */
    uint64_t pp_window_ms;       /* start of the current second of proxy_header_refused lines */
    uint32_t pp_lines;           /* lines in it */
    uint64_t pp_unlogged;        /* refusals not logged since the last line */
    uint16_t port;
};

/* A connection before its protocol is known. */
struct gw_hs {
    struct gw_conn_link link;    /* in ctx->conns; first member */
    struct bufferevent *bev;     /* owned until dispatch */
    struct gw_ctx *ctx;
    struct gw_lsn *lsn;          /* accepted it; outlives it (gw_ctx_free frees conns first) */
    uint64_t id;
    bool tls;
    bool refused;                /* over max-conns-per-ip: answer 429 and close */
    bool counted;                /* holds a max-conns-per-ip slot of peer */
    struct sockaddr_storage peer;/* the client: the socket's peer, or the PROXY source */
    socklen_t peerlen;
    /* Reading the PROXY header (--proxy-protocol), before any bufferevent:
     * exactly the header's bytes are read off the socket, nothing past it. */
    evutil_socket_t fd;
    struct event *pp_read;       /* owned; NULL once the header is in */
    struct event *pp_timer;      /* owned; the header's deadline */
    uint8_t *pp_buf;             /* owned; pp_have of pp_cap bytes */
    size_t pp_have, pp_cap;
};

static void hs_free(struct gw_hs *hs);

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
    if ((hs->refused || hs->lsn->node) && !h2) {
        if (hs->lsn->node) /* another node speaks HTTP/2 prior knowledge, nothing else */
            bufferevent_free(bev);
        else
            refuse(bev);
        free(hs->pp_buf);
        free(hs);
        return;
    }
    if (h2)
        gw_h2_start(ctx, bev, (struct sockaddr *)&hs->peer, hs->peerlen, scheme, hs->id,
                    hs->refused, hs->lsn->node);
    else
        gw_h1_start(ctx, bev, (struct sockaddr *)&hs->peer, hs->peerlen, scheme, hs->id);
    free(hs->pp_buf);
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
    hs->bev = NULL;
    bufferevent_free(bev);
    hs_free(hs);
}

/* Frees a connection still in the handshake (or PROXY header) phase: its
 * bufferevent, or its socket if none was made yet, and its slot. */
static void hs_free(struct gw_hs *hs)
{
    gw_conn_link_del(hs->ctx, &hs->link);
    if (hs->counted)
        gw_ipt_conn_release(hs->ctx->ipt, (struct sockaddr *)&hs->peer);
    if (hs->bev != NULL)
        bufferevent_free(hs->bev);
    else if (hs->fd >= 0)
        evutil_closesocket(hs->fd);
    if (hs->pp_read != NULL)
        event_free(hs->pp_read);
    if (hs->pp_timer != NULL)
        event_free(hs->pp_timer);
    free(hs->pp_buf);
    free(hs);
}

static void hs_free_now(struct gw_conn_link *l)
{
    hs_free((struct gw_hs *)l);
}

/* The connection's protocol phase: a slot under max-conns-per-ip for its
 * client, then the TLS handshake or the cleartext sniffing. */
static void hs_begin(struct gw_hs *hs)
{
    struct gw_ctx *ctx = hs->ctx;
    struct bufferevent *bev;
    struct timeval tv = {HS_TIMEOUT_S, 0};
    evutil_socket_t fd = hs->fd;

    if (gw_ipt_conn_acquire(ctx->ipt, (struct sockaddr *)&hs->peer, ctx->cfg->max_conns_per_ip)) {
        hs->counted = true;
    } else {
        hs->refused = true;
        ctx->n.conns_refused++;
        gw_metrics_limit(ctx, GW_LIMIT_CONNS_PER_IP);
        LOG_WARN(ctx->log, "conn_refused", LOG_S("err", "too_many_connections"),
                 LOG_U("limit", ctx->cfg->max_conns_per_ip));
    }
    if (hs->tls) {
        SSL *ssl = SSL_new(tls_server_ctx(ctx->tls));
        if (ssl == NULL) {
            tls_drain_errors();
            hs_free(hs);
            return;
        }
        /* takes ssl and fd (BEV_OPT_CLOSE_ON_FREE), also on failure */
        hs->fd = -1;
        bev = bufferevent_openssl_socket_new(ctx->base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                             BEV_OPT_CLOSE_ON_FREE);
        if (bev == NULL) {
            hs_free(hs);
            return;
        }
        bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
        bufferevent_setcb(bev, NULL, NULL, hs_on_event, hs);
    } else {
        bev = bufferevent_socket_new(ctx->base, fd, BEV_OPT_CLOSE_ON_FREE);
        if (bev == NULL) {
            hs_free(hs);
            return;
        }
        hs->fd = -1;
        bufferevent_setcb(bev, hs_on_read, NULL, hs_on_event, hs);
    }
    /* Writes of up to 256 KiB per call: with the default 16 KiB, libevent's
     * OpenSSL bufferevent cuts a small TLS record (and a write(2)) wherever a
     * 16 KiB window ends inside an output chain. */
    bufferevent_set_max_single_write(bev, GW_IO_MAX);
    hs->bev = bev;
    bufferevent_set_timeouts(bev, &tv, NULL);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

#define PP_LOG_WINDOW_MS 1000
#define PP_LOG_LINES 5 /* per window and listener */

/* A connection closed for its PROXY header, at warning level (only the load
 * balancer should reach such a listener, so a bad header is a
 * misconfiguration or someone going around it): PP_LOG_LINES lines a second
 * at most per listener, the next one saying how many went unlogged
 * (unlogged=N), so that a flood of bad connections cannot flood the log. */
static void pp_refuse(struct gw_hs *hs, const char *why)
{
    struct gw_lsn *l = hs->lsn;
    uint64_t now = clk_mono_ms(hs->ctx->clk);

    char addr[INET6_ADDRSTRLEN];
    const struct sockaddr *sa = (const struct sockaddr *)&hs->peer;
    const void *ip = sa->sa_family == AF_INET6
                         ? (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr
                         : (const void *)&((const struct sockaddr_in *)sa)->sin_addr;

    gw_metrics_limit(hs->ctx, GW_LIMIT_PROXY_HEADER);
    if (l->pp_lines == 0 || now - l->pp_window_ms >= PP_LOG_WINDOW_MS) {
        l->pp_window_ms = now;
        l->pp_lines = 0;
    }
    if (l->pp_lines >= PP_LOG_LINES) {
        l->pp_unlogged++;
        hs_free(hs);
        return;
    }
    l->pp_lines++;
    if (inet_ntop(sa->sa_family, ip, addr, sizeof(addr)) == NULL)
        util_snprintf(addr, sizeof(addr), "unknown");
    LOG_WARN(hs->ctx->log, "proxy_header_refused", LOG_S("err", why), LOG_S("peer", addr),
             LOG_U("bytes", hs->pp_have), LOG_U("port", l->port), LOG_U("unlogged", l->pp_unlogged));
    l->pp_unlogged = 0;
    hs_free(hs);
}

static void pp_on_timeout(evutil_socket_t fd, short what, void *arg)
{
    pp_refuse(arg, "timeout");
}

/* Reads the PROXY header: at most the bytes the parser still needs, so the
 * first byte after it stays in the socket for TLS or HTTP. */
static void pp_on_read(evutil_socket_t fd, short what, void *arg)
{
    struct gw_hs *hs = arg;
    struct gw_pp_hdr hdr;
    const char *why = NULL;
    size_t want = GW_PP_HEAD;
    ssize_t r;
    int rc;

    rc = gw_pp_parse(hs->pp_buf, hs->pp_have, &want, &hdr, &why);
    if (rc == 0 && want > hs->pp_cap) {
        uint8_t *nb = realloc(hs->pp_buf, want);
        if (nb == NULL) {
            pp_refuse(hs, "out_of_memory");
            return;
        }
        hs->pp_buf = nb;
        hs->pp_cap = want;
    }
    r = recv(fd, hs->pp_buf + hs->pp_have, want - hs->pp_have, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        pp_refuse(hs, "read_failed");
        return;
    }
    if (r == 0) {
        pp_refuse(hs, hs->pp_have == 0 ? "closed_before_header" : "closed_in_header");
        return;
    }
    hs->pp_have += (size_t)r;
    rc = gw_pp_parse(hs->pp_buf, hs->pp_have, &want, &hdr, &why);
    if (rc < 0) {
        pp_refuse(hs, why);
        return;
    }
    if (rc == 0)
        return;
    if (hdr.srclen > 0) {
        memcpy(&hs->peer, &hdr.src, hdr.srclen);
        hs->peerlen = hdr.srclen;
    }
    event_free(hs->pp_read);
    event_free(hs->pp_timer);
    hs->pp_read = hs->pp_timer = NULL;
    free(hs->pp_buf);
    hs->pp_buf = NULL;
    hs->pp_have = hs->pp_cap = 0;
    hs_begin(hs);
}

static void pp_begin(struct gw_hs *hs)
{
    struct timeval tv = {HS_TIMEOUT_S, 0};

    hs->pp_cap = GW_PP_HEAD;
    hs->pp_buf = malloc(hs->pp_cap);
    hs->pp_read = event_new(hs->ctx->base, hs->fd, EV_READ | EV_PERSIST, pp_on_read, hs);
    hs->pp_timer = evtimer_new(hs->ctx->base, pp_on_timeout, hs);
    if (hs->pp_buf == NULL || hs->pp_read == NULL || hs->pp_timer == NULL ||
        event_add(hs->pp_read, NULL) != 0 || evtimer_add(hs->pp_timer, &tv) != 0)
        hs_free(hs);
}

static void lsn_on_accept(struct evconnlistener *el, evutil_socket_t fd, struct sockaddr *sa,
                          int salen, void *arg)
{
    struct gw_lsn *l = arg;
    struct gw_ctx *ctx = l->ctx;
    struct gw_hs *hs;
    int one = 1;

    if (l->paused) {
        LOG_INFO(ctx->log, "accept_resumed", LOG_U("port", l->port),
                 LOG_U("failures", l->episode_failures), LOG_U("shed", l->episode_shed));
        l->paused = false;
        l->episode_failures = 0;
        l->episode_shed = 0;
    }

    ctx->n.conns_accepted++;
    /* descriptors are handed out lowest first: a high one means few are left */
    if (ctx->fd_limit > FD_RESERVE && (uint64_t)fd >= ctx->fd_limit - FD_RESERVE) {
        evutil_closesocket(fd);
        gw_metrics_limit(ctx, GW_LIMIT_DESCRIPTORS);
        if (l->episode_shed++ == 0 && !l->paused)
            LOG_WARN(ctx->log, "fd_reserve", LOG_U("port", l->port), LOG_U("limit", ctx->fd_limit),
                     LOG_U("reserve", FD_RESERVE));
        return;
    }
    if (l->episode_shed > 0 && !l->paused) {
        LOG_INFO(ctx->log, "fd_reserve_end", LOG_U("port", l->port), LOG_U("shed", l->episode_shed));
        l->episode_shed = 0;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    hs = calloc(1, sizeof(*hs));
    if (hs == NULL) {
        evutil_closesocket(fd);
        return;
    }
    hs->ctx = ctx;
    hs->lsn = l;
    hs->id = gw_next_id(ctx);
    hs->tls = l->tls;
    hs->fd = fd;
    memcpy(&hs->peer, sa, (size_t)salen);
    hs->peerlen = (socklen_t)salen;
    hs->link.free_now = hs_free_now;
    gw_conn_link_add(ctx, &hs->link);
    if (l->proxy)
        pp_begin(hs);
    else
        hs_begin(hs);
}

static void lsn_on_resume(evutil_socket_t fd, short what, void *arg)
{
    struct gw_lsn *l = arg;

    if (!l->disabled && l->el != NULL)
        evconnlistener_enable(l->el);
}

/* accept(2) failed. Out of descriptors (or kernel memory), the listening
 * socket stays readable and would spin: stop accepting for a moment, and say
 * so once per episode (it ends with the next accepted connection). */
static void lsn_on_error(struct evconnlistener *el, void *arg)
{
    struct gw_lsn *l = arg;
    int e = EVUTIL_SOCKET_ERROR();
    struct timeval tv = {0, ACCEPT_PAUSE_MS * 1000};

    if (e != EMFILE && e != ENFILE && e != ENOBUFS && e != ENOMEM) {
        LOG_WARN(l->ctx->log, "accept_failed", LOG_S("err", evutil_socket_error_to_string(e)),
                 LOG_U("port", l->port));
        return;
    }
    gw_metrics_limit(l->ctx, GW_LIMIT_DESCRIPTORS);
    if (l->episode_failures++ == 0)
        LOG_WARN(l->ctx->log, "accept_paused", LOG_S("err", evutil_socket_error_to_string(e)),
                 LOG_U("port", l->port), LOG_U("pause_ms", ACCEPT_PAUSE_MS));
    l->paused = true;
    evconnlistener_disable(l->el);
    evtimer_add(l->resume, &tv);
}

static struct gw_lsn *lsn_new(struct gw_ctx *ctx, const struct gw_cfg_addr *addr, bool tls,
                              bool node, char *err, size_t errlen)
{
    struct gw_lsn *l = calloc(1, sizeof(*l));
    /* --reuse-port: several gateway processes share the public port (the
     * kernel spreads connections); never the node listener, which is each
     * node's own */
    unsigned flags = LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC |
                     (ctx->cfg->reuse_port && !node ? LEV_OPT_REUSEABLE_PORT : 0);
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);

    if (l == NULL) {
        util_snprintf(err, errlen, "out of memory");
        return NULL;
    }
    l->ctx = ctx;
    l->tls = tls;
    l->proxy = ctx->cfg->proxy_protocol;
    l->resume = evtimer_new(ctx->base, lsn_on_resume, l);
    if (l->resume == NULL) {
        util_snprintf(err, errlen, "out of memory");
        free(l);
        return NULL;
    }
    l->el = evconnlistener_new_bind(ctx->base, lsn_on_accept, l, flags, 1024,
                                    (const struct sockaddr *)&addr->ss, (int)addr->sslen);
    if (l->el == NULL) {
        util_snprintf(err, errlen, "cannot listen on %s: %s", addr->text, strerror(errno));
        event_free(l->resume);
        free(l);
        return NULL;
    }
    evconnlistener_set_error_cb(l->el, lsn_on_error);
    if (getsockname(evconnlistener_get_fd(l->el), (struct sockaddr *)&bound, &blen) == 0)
        l->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                     : ((struct sockaddr_in *)&bound)->sin_port);
    return l;
}

struct gw_lsn *gw_lsn_new_node(struct gw_ctx *ctx, const struct gw_cfg_addr *addr, char *err,
                               size_t errlen)
{
    struct gw_lsn *l = lsn_new(ctx, addr, false, true, err, errlen);

    if (l != NULL) {
        l->node = true;
        l->proxy = false; /* nodes dial each other directly */
    }
    return l;
}

struct gw_lsn *gw_lsn_new(struct gw_ctx *ctx, const struct gw_cfg_addr *addr, bool tls,
                          char *err, size_t errlen)
{
    return lsn_new(ctx, addr, tls, false, err, errlen);
}

uint16_t gw_lsn_port(const struct gw_lsn *l)
{
    return l->port;
}

void gw_lsn_disable(struct gw_lsn *l)
{
    if (l != NULL && l->el != NULL) {
        l->disabled = true;
        evtimer_del(l->resume);
        /* closed, not only paused: a connect is refused at once (a balancer
         * retries another node) instead of waiting in the backlog for a
         * process that is about to exit */
        evconnlistener_free(l->el);
        l->el = NULL;
    }
}

void gw_lsn_free(struct gw_lsn *l)
{
    if (l == NULL)
        return;
    if (l->el != NULL)
        evconnlistener_free(l->el);
    event_free(l->resume);
    free(l);
}
