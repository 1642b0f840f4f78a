/* Non-blocking dial (ag_net.h): evdns_getaddrinfo, then one connect() per
 * address, in the resolver's order, until one succeeds or the deadline
 * passes. The struct lives until its callback returned, or, when cancelled
 * while resolving, until the resolver reports the cancellation. */
#include "ag_net.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>

#include "util.h"

struct ag_net_dial {
    struct event_base *base;
    ag_net_dial_cb cb;
    void *arg;
    struct evdns_getaddrinfo_request *req; /* while resolving */
    bool resolving;
    bool cancelled;                  /* cancelled while resolving: freed by on_resolved */
    struct evutil_addrinfo *ai_list; /* owned */
    struct evutil_addrinfo *ai_next; /* next address to try */
    evutil_socket_t fd;              /* connect in progress, or -1 */
    struct event *conn_ev;           /* EV_WRITE on fd */
    struct event *done_ev;           /* reports from the loop */
    uint64_t deadline_ms;            /* util_mono_ms() bound */
    evutil_socket_t result_fd;
    char err[160];
};

static void dial_free(struct ag_net_dial *d)
{
    if (d->fd >= 0)
        evutil_closesocket(d->fd);
    if (d->result_fd >= 0)
        evutil_closesocket(d->result_fd);
    if (d->ai_list != NULL)
        evutil_freeaddrinfo(d->ai_list);
    if (d->conn_ev != NULL)
        event_free(d->conn_ev);
    if (d->done_ev != NULL)
        event_free(d->done_ev);
    free(d);
}

/* Schedules the callback (from the loop). */
static void dial_finish(struct ag_net_dial *d, evutil_socket_t fd, const char *err)
{
    d->result_fd = fd;
    if (err != NULL)
        (void)util_snprintf(d->err, sizeof(d->err), "%s", err);
    event_active(d->done_ev, 0, 0);
}

static void on_done(evutil_socket_t unused, short what, void *arg)
{
    struct ag_net_dial *d = arg;
    evutil_socket_t fd = d->result_fd;
    char err[sizeof(d->err)];

    memcpy(err, d->err, sizeof(err));
    d->result_fd = -1;
    d->cb(d->arg, fd, fd >= 0 ? NULL : err);
    dial_free(d);
}

static void try_next(struct ag_net_dial *d);

static void on_connect(evutil_socket_t fd, short what, void *arg)
{
    struct ag_net_dial *d = arg;
    int soerr = 0;
    socklen_t len = sizeof(soerr);
    int one = 1;

    if (what & EV_TIMEOUT) {
        (void)util_snprintf(d->err, sizeof(d->err), "connect timed out");
        evutil_closesocket(d->fd);
        d->fd = -1;
        dial_finish(d, -1, NULL);
        return;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == -1)
        soerr = errno;
    if (soerr != 0) {
        (void)util_snprintf(d->err, sizeof(d->err), "connect: %s", strerror(soerr));
        evutil_closesocket(d->fd);
        d->fd = -1;
        try_next(d);
        return;
    }
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    d->fd = -1;
    dial_finish(d, fd, NULL);
}

/* Starts connect() on the next address; reports failure when none is left. */
static void try_next(struct ag_net_dial *d)
{
    uint64_t now = util_mono_ms();

    while (d->ai_next != NULL) {
        struct evutil_addrinfo *ai = d->ai_next;
        evutil_socket_t fd;
        struct timeval tv;
        uint64_t left;

        d->ai_next = ai->ai_next;
        if (now >= d->deadline_ms)
            break;
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd == -1) {
            (void)util_snprintf(d->err, sizeof(d->err), "socket: %s", strerror(errno));
            continue;
        }
        if (connect(fd, ai->ai_addr, (socklen_t)ai->ai_addrlen) == -1 && errno != EINPROGRESS) {
            (void)util_snprintf(d->err, sizeof(d->err), "connect: %s", strerror(errno));
            evutil_closesocket(fd);
            continue;
        }
        if (d->conn_ev != NULL)
            event_free(d->conn_ev);
        d->conn_ev = event_new(d->base, fd, EV_WRITE, on_connect, d);
        if (d->conn_ev == NULL) {
            evutil_closesocket(fd);
            (void)util_snprintf(d->err, sizeof(d->err), "out of memory");
            break;
        }
        d->fd = fd;
        left = d->deadline_ms - now;
        tv.tv_sec = (time_t)(left / 1000);
        tv.tv_usec = (suseconds_t)((left % 1000) * 1000);
        event_add(d->conn_ev, &tv);
        return;
    }
    if (d->err[0] == '\0')
        (void)util_snprintf(d->err, sizeof(d->err),
                            now >= d->deadline_ms ? "connect timed out"
                                                  : "no address to connect to");
    dial_finish(d, -1, NULL);
}

static void on_resolved(int result, struct evutil_addrinfo *res, void *arg)
{
    struct ag_net_dial *d = arg;

    d->resolving = false;
    d->req = NULL;
    if (d->cancelled) {
        if (res != NULL)
            evutil_freeaddrinfo(res);
        dial_free(d);
        return;
    }
    if (result != 0 || res == NULL) {
        (void)util_snprintf(d->err, sizeof(d->err), "cannot resolve: %s",
                            evutil_gai_strerror(result));
        if (res != NULL)
            evutil_freeaddrinfo(res);
        dial_finish(d, -1, NULL);
        return;
    }
    d->ai_list = res;
    d->ai_next = res;
    try_next(d);
}

struct ag_net_dial *ag_net_dial_start(struct event_base *base, struct evdns_base *dns,
                                      const char *host, uint16_t port, uint64_t timeout_ms,
                                      ag_net_dial_cb cb, void *arg)
{
    struct ag_net_dial *d = calloc(1, sizeof(*d));
    struct evutil_addrinfo hints;
    struct evdns_getaddrinfo_request *req;
    char service[8];

    if (d == NULL)
        return NULL;
    d->base = base;
    d->cb = cb;
    d->arg = arg;
    d->fd = -1;
    d->result_fd = -1;
    d->deadline_ms = util_mono_ms() + timeout_ms;
    d->done_ev = event_new(base, -1, 0, on_done, d);
    if (d->done_ev == NULL)
        goto fail_d;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    (void)util_snprintf(service, sizeof(service), "%u", (unsigned)port);
    d->resolving = true;
    /* May call on_resolved before returning (literals, /etc/hosts). */
    req = evdns_getaddrinfo(dns, host, service, &hints, on_resolved, d);
    if (d->resolving)
        d->req = req;
    return d;

fail_d:
    free(d);
    return NULL;
}

void ag_net_dial_cancel(struct ag_net_dial *d)
{
    if (d == NULL)
        return;
    if (d->resolving && d->req != NULL) {
        d->cancelled = true;
        evdns_getaddrinfo_cancel(d->req); /* on_resolved frees d later */
        return;
    }
    dial_free(d);
}
