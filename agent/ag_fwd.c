/* HTTP/1.1 forwarding to the local API (ag_fwd.h). A request (struct ag_fwd)
 * borrows one connection (struct ag_fwd_conn) from its agent's pool or dials
 * a new one, writes the head and the body (chunked when the length is not
 * known), parses the response with http-parser and reports it. A connection
 * goes back to the pool only after a complete, keep-alive response to a
 * complete request; anything else closes it. Lifecycle of a request:
 * 1. ag_fwd_start(): head built, connection taken or dial started;
 * 2. body written as ag_fwd_write_body() is called, acknowledged below the
 *    output high water mark (5.3 of PROTOCOL.md: window follows the bytes);
 * 3. one terminal report, on_end or on_error, after which the fwd is freed;
 *    or ag_fwd_free() by the stream (cancel), after which nothing is reported. */
#include "ag_fwd.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <http_parser.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ag_agt.h"
#include "ag_ctx.h"
#include "ag_insp.h"
#include "ag_net.h"
#include "list.h"
#include "log.h"
#include "ws.h"

#define FWD_OUT_HIGH (256u * 1024u) /* request bytes queued before acknowledging stops */
#define FWD_OUT_LOW (64u * 1024u)   /* write callback: acknowledge the rest */
#define FWD_DIAL_TIMEOUT_MS 10000u
#define FWD_IDLE_TIMEOUT_S 10 /* a pooled connection unused this long is closed */
/* Idle connections kept per agent: as many as a burst of concurrent requests
 * used, so that the next burst dials none (32 churned ~70 connects per round
 * of 100 concurrent h2 streams). Each costs a socket and ~1 KiB, and closes
 * after FWD_IDLE_TIMEOUT_S unused. */
#define FWD_POOL_MAX 256
#define FWD_RESP_HEAD_MAX (256u * 1024u)
#define FWD_MAX_HDRS 256
#define FWD_READ_MAX (256u * 1024u) /* bytes per read / write call */

/* One TCP connection to the local API. Owned by the request using it
 * (conn->fwd) or, while idle, by the pool. Plain events rather than a
 * bufferevent: libevent 2.1's evbuffer_read() reads at most 4 KiB per call
 * (EVBUFFER_MAX_READ), one call per loop iteration, which caps a download
 * far below the loopback's speed; here one readv() takes up to 256 KiB. */
struct ag_fwd_conn {
    struct ag_fwd_pool *pool;
    struct list link; /* pool->idle while idle, else unlinked */
    evutil_socket_t fd;
    struct event *rev; /* EV_READ | EV_PERSIST; idle timeout while pooled */
    struct event *wev; /* EV_WRITE | EV_PERSIST, added while out is not empty */
    struct evbuffer *in;
    struct evbuffer *out;
    uint64_t gen;       /* agent's target_gen when dialled */
    struct ag_fwd *fwd; /* the request using it, NULL while idle */
    uint64_t written;   /* bytes written to the socket, for debug logs */
};

struct ag_fwd_pool {
    struct ag_agt *agt; /* owner (back-pointer) */
    struct list idle;   /* struct ag_fwd_conn, most recently used first */
    size_t nidle;
};

struct fwd_hdr_off {
    size_t name_off, name_len, value_off, value_len;
};

/* One forwarded request. Owned by the stream until a terminal report. */
struct ag_fwd {
    struct ag_agt *agt; /* borrowed; the stream holds a reference */
    const struct ag_fwd_cbs *cb;
    void *arg;
    struct ag_fwd_conn *conn; /* NULL while dialling */
    struct ag_net_dial *dial;
    char *head; /* request head, kept for one retry */
    size_t head_len;
    struct evbuffer *pend;    /* framed body bytes before the connection is up */
    struct event *timeout_ev; /* response-head deadline, NULL if none */
    http_parser parser;
    bool has_body;     /* a body follows the head */
    bool chunked;      /* we frame it with Transfer-Encoding: chunked */
    bool body_started; /* body bytes were written (no retry then) */
    bool body_done;    /* end of body written */
    bool head_method;  /* HEAD: the response has no body */
    bool websocket;    /* upgrade requested (extended CONNECT) */
    bool raw;          /* upgraded: bytes pass through untouched */
    bool shut_wr;      /* shutdown(SHUT_WR) done */
    char ws_key[25];   /* our Sec-WebSocket-Key */
    bool reused;       /* conn came from the pool */
    bool retried;      /* one retry on a fresh connection done */
    bool got_bytes;    /* any response byte seen on this conn */
    bool head_done;    /* final head reported */
    bool interim;      /* parsing a 1xx response */
    bool resp_done;    /* final response complete */
    bool paused;       /* stream asked to stop reading */
    bool failed;       /* parser callback detected an error */
    uint64_t body_left; /* Content-Length body bytes still to come, past the parser */
    size_t unacked;    /* body bytes given but not yet acknowledged */
    uint64_t body_in;  /* body bytes given by the stream */
    /* response header accumulation */
    char *hbuf;
    size_t hlen, hcap;
    struct fwd_hdr_off hdrs[FWD_MAX_HDRS];
    size_t nhdrs;
    bool in_value; /* last callback was a value */
    struct ag_insp_ent *cap; /* run --inspect: this exchange's capture (ag_insp), or NULL */
};

static void conn_free(struct ag_fwd_conn *c);
static void fwd_fail(struct ag_fwd *f, enum ag_fwd_err err, const char *detail);
static void conn_on_read(evutil_socket_t fd, short what, void *arg);
static void conn_on_write(evutil_socket_t fd, short what, void *arg);

/* ---- pool ---------------------------------------------------------------- */

struct ag_fwd_pool *ag_fwd_pool_new(struct ag_agt *a)
{
    struct ag_fwd_pool *p = calloc(1, sizeof(*p));

    if (p == NULL)
        return NULL;
    p->agt = a;
    list_init(&p->idle);
    return p;
}

static void pool_unlink(struct ag_fwd_conn *c)
{
    list_unlink(&c->link);
    c->pool->nidle--;
}

#define CONN_OF(node) LIST_ENTRY(node, struct ag_fwd_conn, link)

void ag_fwd_pool_flush(struct ag_fwd_pool *p)
{
    struct list *n, *tmp;

    if (p == NULL)
        return;
    LIST_FOREACH_SAFE(n, tmp, &p->idle)
    {
        pool_unlink(CONN_OF(n));
        conn_free(CONN_OF(n));
    }
}

size_t ag_fwd_pool_idle(const struct ag_fwd_pool *p) { return p != NULL ? p->nidle : 0; }

void ag_fwd_pool_free(struct ag_fwd_pool *p)
{
    if (p == NULL)
        return;
    ag_fwd_pool_flush(p);
    free(p);
}

/* Closes the socket at once (the local API sees the close). */
static void conn_free(struct ag_fwd_conn *c)
{
    if (c == NULL)
        return;
    if (c->rev != NULL)
        event_free(c->rev);
    if (c->wev != NULL)
        event_free(c->wev);
    if (c->in != NULL)
        evbuffer_free(c->in);
    if (c->out != NULL)
        evbuffer_free(c->out);
    if (c->fd >= 0) {
        if (c->pool != NULL)
            LOG_DEBUG(c->pool->agt->ctx->log, "local_close", LOG_I("fd", c->fd),
                      LOG_U("written", c->written));
        evutil_closesocket(c->fd);
    }
    free(c);
}

/* Takes ownership of fd, also on failure. */
static struct ag_fwd_conn *conn_new(struct event_base *base, struct ag_fwd_pool *pool,
                                    evutil_socket_t fd, uint64_t gen)
{
    struct ag_fwd_conn *c = calloc(1, sizeof(*c));

    if (c == NULL) {
        evutil_closesocket(fd);
        return NULL;
    }
    c->fd = fd;
    c->pool = pool;
    list_init(&c->link);
    LOG_DEBUG(pool->agt->ctx->log, "local_open", LOG_I("fd", fd));
    c->gen = gen;
    c->rev = event_new(base, fd, EV_READ | EV_PERSIST, conn_on_read, c);
    c->wev = event_new(base, fd, EV_WRITE | EV_PERSIST, conn_on_write, c);
    c->in = evbuffer_new();
    c->out = evbuffer_new();
    if (c->rev == NULL || c->wev == NULL || c->in == NULL || c->out == NULL) {
        conn_free(c);
        return NULL;
    }
    return c;
}

/* Output queued: write from the loop. */
static void conn_kick(struct ag_fwd_conn *c)
{
    if (evbuffer_get_length(c->out) > 0 && !event_pending(c->wev, EV_WRITE, NULL))
        event_add(c->wev, NULL);
}

/* Reads what the socket has (up to FWD_READ_MAX) into c->in.
 * Returns bytes read, 0 at EOF, -1 on error (errno set; EAGAIN: nothing). */
static ssize_t conn_read(struct ag_fwd_conn *c)
{
    struct evbuffer_iovec v[2];
    struct iovec iov[2];
    int nv = evbuffer_reserve_space(c->in, FWD_READ_MAX, v, 2);
    ssize_t n;
    size_t left;

    if (nv < 1) {
        errno = ENOMEM;
        return -1;
    }
    left = FWD_READ_MAX; /* reserve_space may hand out more than asked */
    for (int i = 0; i < nv; i++) {
        iov[i].iov_base = v[i].iov_base;
        iov[i].iov_len = v[i].iov_len < left ? v[i].iov_len : left;
        left -= iov[i].iov_len;
    }
    n = readv(c->fd, iov, nv);
    if (n <= 0) {
        evbuffer_commit_space(c->in, v, 0);
        return n;
    }
    left = (size_t)n;
    for (int i = 0; i < nv; i++) {
        if (v[i].iov_len > left)
            v[i].iov_len = left;
        left -= v[i].iov_len;
    }
    evbuffer_commit_space(c->in, v, nv);
    return n;
}

static void idle_on_read(struct ag_fwd_conn *c, short what)
{
    /* EOF, bytes, error or idle timeout on an idle connection: drop it */
    pool_unlink(c);
    conn_free(c);
}

/* Returns c to the pool, or closes it. */
static void pool_put(struct ag_fwd_pool *p, struct ag_fwd_conn *c)
{
    struct timeval tv = {FWD_IDLE_TIMEOUT_S, 0};

    c->fwd = NULL;
    if (p->agt->gone || c->gen != p->agt->target_gen || p->nidle >= FWD_POOL_MAX ||
        evbuffer_get_length(c->in) > 0 || evbuffer_get_length(c->out) > 0) {
        conn_free(c);
        return;
    }
    event_del(c->wev);
    event_add(c->rev, &tv);
    list_insert_head(&p->idle, &c->link);
    p->nidle++;
}

static struct ag_fwd_conn *pool_take(struct ag_fwd_pool *p)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &p->idle)
    {
        struct ag_fwd_conn *c = CONN_OF(n);
        pool_unlink(c);
        if (c->gen == p->agt->target_gen)
            return c;
        conn_free(c);
    }
    return NULL;
}

/* ---- request head ---------------------------------------------------------- */

static bool name_is(struct iov n, const char *s) { return util_iov_ieq_str(n, s); }

/* Request headers not forwarded to the local API (PROTOCOL.md 5.4.3). */
static bool req_hdr_dropped(struct iov n, const char *id_header, enum ag_preset preset)
{
    static const char *const drop[] = {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "trailer",
        "x-tunnel-origin",
        "x-tunnel-probe",
        "cookie",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-accept",
    };

    for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
        if (name_is(n, drop[i]))
            return true;
    /* ours to set: a client's copy would make the request look local */
    if (preset == AG_PRESET_OSAURUS && name_is(n, AG_OSAURUS_ORIGIN_HEADER))
        return true;
    return name_is(n, id_header);
}

static int add_hdr_line(struct evbuffer *b, struct iov n, struct iov v)
{
    if (evbuffer_add(b, n.base, n.len) != 0 || evbuffer_add(b, ": ", 2) != 0 ||
        evbuffer_add(b, v.base, v.len) != 0 || evbuffer_add(b, "\r\n", 2) != 0)
        return -1;
    return 0;
}

/* Builds the HTTP/1.1 request head into f->head. Returns 0 or -1. */
static int build_head(struct ag_fwd *f, const struct ag_fwd_request *rq)
{
    const struct ag_agt *a = f->agt;
    struct evbuffer *b = evbuffer_new();
    bool has_cl = false;
    bool first_cookie = true;
    size_t len;
    int rc = -1;

    if (b == NULL)
        return -1;
    for (size_t i = 0; i < rq->nhdrs; i++)
        if (name_is(rq->hdrs[i].name, "content-length"))
            has_cl = true;
    f->websocket = rq->websocket;
    f->chunked = rq->has_body && !has_cl && !rq->websocket;
    f->head_method = name_is(rq->method, "HEAD");
    if (f->websocket && ws_client_key(f->ws_key) != 0)
        goto out;

    /* request line: base path + :path ("*" stays as it is); an extended
     * CONNECT becomes the HTTP/1.1 upgrade GET (RFC 8441 section 5) */
    if (f->websocket) {
        if (evbuffer_add(b, "GET ", 4) != 0)
            goto out;
    } else if (evbuffer_add(b, rq->method.base, rq->method.len) != 0 ||
               evbuffer_add(b, " ", 1) != 0) {
        goto out;
    }
    if (!(rq->path.len == 1 && rq->path.base[0] == '*') &&
        evbuffer_add(b, a->target.base, strlen(a->target.base)) != 0)
        goto out;
    if (evbuffer_add(b, rq->path.base, rq->path.len) != 0 ||
        evbuffer_add(b, " HTTP/1.1\r\n", 11) != 0)
        goto out;

    /* Host: the target's, or the public one */
    if (a->cfg.preserve_host) {
        if (add_hdr_line(b, IOV_LIT("Host"), rq->authority) != 0)
            goto out;
    } else {
        bool v6 = strchr(a->target.host, ':') != NULL;
        bool dflt = a->target.port == (a->target.tls ? 443 : 80);
        if (evbuffer_add_printf(b, "Host: %s%s%s", v6 ? "[" : "", a->target.host, v6 ? "]" : "") <
            0)
            goto out;
        if (!dflt && evbuffer_add_printf(b, ":%u", (unsigned)a->target.port) < 0)
            goto out;
        if (evbuffer_add(b, "\r\n", 2) != 0)
            goto out;
    }
    for (size_t i = 0; i < rq->nhdrs; i++) {
        const struct ag_fwd_hdr *h = &rq->hdrs[i];
        if (req_hdr_dropped(h->name, a->cfg.id_header, a->cfg.preset))
            continue;
        if (add_hdr_line(b, h->name, h->value) != 0)
            goto out;
    }
    /* several cookie fields become one (RFC 9113 8.2.3) */
    for (size_t i = 0; i < rq->nhdrs; i++) {
        const struct ag_fwd_hdr *h = &rq->hdrs[i];
        if (!name_is(h->name, "cookie"))
            continue;
        if (evbuffer_add(b, first_cookie ? "cookie: " : "; ", 2 + (first_cookie ? 6 : 0)) != 0 ||
            evbuffer_add(b, h->value.base, h->value.len) != 0)
            goto out;
        first_cookie = false;
    }
    if (!first_cookie && evbuffer_add(b, "\r\n", 2) != 0)
        goto out;
    if (f->chunked && evbuffer_add(b, "Transfer-Encoding: chunked\r\n", 28) != 0)
        goto out;
    if (f->websocket &&
        evbuffer_add_printf(b,
                            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n",
                            f->ws_key) < 0)
        goto out;
    /* stamped last, after every client field (an Osaurus server then treats
     * the request as remote, as it does the Osaurus app's relayed ones) */
    if (evbuffer_add_printf(b, "%s: %s\r\nX-Tunnel-Origin: public\r\n%s\r\n", a->cfg.id_header,
                            a->cfg.id,
                            a->cfg.preset == AG_PRESET_OSAURUS
                                ? AG_OSAURUS_ORIGIN_HEADER ": 1\r\n"
                                : "") < 0)
        goto out;
    len = evbuffer_get_length(b);
    f->head = malloc(len);
    if (f->head == NULL)
        goto out;
    evbuffer_remove(b, f->head, len);
    f->head_len = len;
    rc = 0;
out:
    evbuffer_free(b);
    return rc;
}

/* ---- response parsing ------------------------------------------------------ */

static int hbuf_append(struct ag_fwd *f, const char *at, size_t len)
{
    if (f->hlen + len > FWD_RESP_HEAD_MAX)
        return -1;
    if (f->hlen + len > f->hcap) {
        size_t cap = f->hcap != 0 ? f->hcap : 1024;
        char *n;
        while (cap < f->hlen + len)
            cap *= 2;
        n = realloc(f->hbuf, cap);
        if (n == NULL)
            return -1;
        f->hbuf = n;
        f->hcap = cap;
    }
    memcpy(f->hbuf + f->hlen, at, len);
    f->hlen += len;
    return 0;
}

static int on_hdr_field(http_parser *p, const char *at, size_t len)
{
    struct ag_fwd *f = p->data;

    if (f->head_done)
        return 0; /* trailers: not forwarded */
    if (f->in_value || f->nhdrs == 0) {
        if (f->nhdrs == FWD_MAX_HDRS) {
            f->failed = true;
            return -1;
        }
        f->hdrs[f->nhdrs].name_off = f->hlen;
        f->hdrs[f->nhdrs].name_len = 0;
        f->hdrs[f->nhdrs].value_off = f->hlen;
        f->hdrs[f->nhdrs].value_len = 0;
        f->nhdrs++;
        f->in_value = false;
    }
    if (hbuf_append(f, at, len) != 0) {
        f->failed = true;
        return -1;
    }
    f->hdrs[f->nhdrs - 1].name_len += len;
    f->hdrs[f->nhdrs - 1].value_off = f->hlen;
    return 0;
}

static int on_hdr_value(http_parser *p, const char *at, size_t len)
{
    struct ag_fwd *f = p->data;

    if (f->head_done || f->nhdrs == 0)
        return 0;
    f->in_value = true;
    if (hbuf_append(f, at, len) != 0) {
        f->failed = true;
        return -1;
    }
    f->hdrs[f->nhdrs - 1].value_len += len;
    return 0;
}

/* A local 101: checks Sec-WebSocket-Accept (RFC 6455 4.1) and reports 200
 * with the negotiated subprotocol and extensions (PROTOCOL.md 6). */
static int ws_upgraded(struct ag_fwd *f)
{
    char want[29];
    nghttp2_nv nv[2];
    size_t n = 0;
    bool accept_ok = false, upgrade_ok = false;

    if (ws_accept_key(f->ws_key, strlen(f->ws_key), want) != 0) {
        f->failed = true;
        return -1;
    }
    for (size_t i = 0; i < f->nhdrs; i++) {
        struct fwd_hdr_off *h = &f->hdrs[i];
        struct iov name = {f->hbuf + h->name_off, h->name_len};
        struct iov value = {f->hbuf + h->value_off, h->value_len};
        while (value.len > 0 &&
               (value.base[value.len - 1] == ' ' || value.base[value.len - 1] == '\t'))
            value.len--;
        if (name_is(name, "sec-websocket-accept")) {
            accept_ok = value.len == 28 && memcmp(value.base, want, 28) == 0;
        } else if (name_is(name, "upgrade")) {
            upgrade_ok = util_iov_ieq_str(value, "websocket");
        } else if (n < 2 && (name_is(name, "sec-websocket-protocol") ||
                             name_is(name, "sec-websocket-extensions"))) {
            nv[n].name =
                (uint8_t *)(name_is(name, "sec-websocket-protocol") ? "sec-websocket-protocol"
                                                                    : "sec-websocket-extensions");
            nv[n].namelen = strlen((const char *)nv[n].name);
            nv[n].value = (uint8_t *)value.base;
            nv[n].valuelen = value.len;
            nv[n].flags = NGHTTP2_NV_FLAG_NONE;
            n++;
        }
    }
    if (!accept_ok || !upgrade_ok) {
        f->failed = true; /* not a WebSocket server: 502 */
        return -1;
    }
    if (f->timeout_ev != NULL)
        event_del(f->timeout_ev);
    f->raw = true;
    f->head_done = true;
    ag_insp_cap_resp_head(f->agt->ctx->insp, f->cap, 101, nv, n);
    f->cb->on_head(f->arg, 200, nv, n, false);
    return 0;
}

/* Connection-specific response fields (RFC 9113 8.2.2), plus te / trailer. */
static bool resp_hdr_dropped(struct iov n)
{
    static const char *const drop[] = {
        "connection", "keep-alive", "proxy-connection", "transfer-encoding",
        "upgrade",    "te",         "trailer"};

    for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
        if (name_is(n, drop[i]))
            return true;
    return false;
}

static int on_headers_complete(http_parser *p)
{
    struct ag_fwd *f = p->data;
    nghttp2_nv nv[FWD_MAX_HDRS];
    size_t n = 0;
    int status = p->status_code;
    bool no_body;

    if (status == 101 && f->websocket)
        return ws_upgraded(f);
    /* a 2xx to the upgrade is not an accepted WebSocket, and a 2xx to an
     * extended CONNECT would be one to the client (RFC 8441 5): 502; any
     * other status passes through as the refusal it is */
    if (f->websocket && status >= 200 && status < 300) {
        f->failed = true;
        return -1;
    }
    if (status >= 100 && status < 200) {
        if (status == 101) {
            f->failed = true; /* we never asked for an upgrade */
            return -1;
        }
        f->interim = true; /* 1xx: dropped, the final response follows */
        f->nhdrs = 0;
        f->hlen = 0;
        f->in_value = false;
        return 0;
    }
    if (f->timeout_ev != NULL)
        event_del(f->timeout_ev);
    for (size_t i = 0; i < f->nhdrs; i++) {
        struct fwd_hdr_off *h = &f->hdrs[i];
        struct iov name = {f->hbuf + h->name_off, h->name_len};
        if (h->name_len == 0 || resp_hdr_dropped(name))
            continue;
        for (size_t j = 0; j < h->name_len; j++) {
            char c = f->hbuf[h->name_off + j];
            if (c >= 'A' && c <= 'Z')
                f->hbuf[h->name_off + j] = (char)(c - 'A' + 'a');
        }
        /* RFC 9110 5.5: surrounding whitespace is not part of the value */
        while (h->value_len > 0 && (f->hbuf[h->value_off + h->value_len - 1] == ' ' ||
                                    f->hbuf[h->value_off + h->value_len - 1] == '\t'))
            h->value_len--;
        nv[n].name = (uint8_t *)f->hbuf + h->name_off;
        nv[n].namelen = h->name_len;
        nv[n].value = (uint8_t *)f->hbuf + h->value_off;
        nv[n].valuelen = h->value_len;
        nv[n].flags = NGHTTP2_NV_FLAG_NONE;
        n++;
    }
    no_body = f->head_method || status == 204 || status == 304;
    f->head_done = true;
    ag_insp_cap_resp_head(f->agt->ctx->insp, f->cap, status, nv, n);
    f->cb->on_head(f->arg, status, nv, n, no_body);
    if (no_body)
        return f->head_method ? 1 : 0; /* 1: no body follows (http-parser's skip-body) */
    /* A Content-Length body is counted, not parsed: fwd_parse() hands it on
     * as it is (whole input chains moved, not copied) while the parser,
     * told there is no body, waits paused at the message's end. */
    if (!(p->flags & F_CHUNKED) && !p->uses_transfer_encoding && p->content_length > 0 &&
        p->content_length != ULLONG_MAX) {
        f->body_left = p->content_length;
        return 1;
    }
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    struct ag_fwd *f = p->data;

    if (f->head_done && len > 0) {
        ag_insp_cap_resp_body(f->agt->ctx->insp, f->cap, (const uint8_t *)at, len);
        f->cb->on_body(f->arg, (const uint8_t *)at, len);
    }
    return 0;
}

static int on_message_complete(http_parser *p)
{
    struct ag_fwd *f = p->data;

    if (f->interim) {
        f->interim = false;
        return 0;
    }
    if (f->raw)
        return 0; /* http-parser ends the upgrade's head as a message */
    if (f->body_left > 0) {
        http_parser_pause(p, 1); /* the body follows, past the parser */
        return 0;
    }
    f->resp_done = true;
    http_parser_pause(p, 1); /* anything after the response is not ours */
    return 0;
}

static const http_parser_settings fwd_parser_settings = {
    .on_header_field = on_hdr_field,
    .on_header_value = on_hdr_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- request lifecycle ------------------------------------------------------ */

static void fwd_release(struct ag_fwd *f)
{
    ag_net_dial_cancel(f->dial);
    if (f->conn != NULL)
        conn_free(f->conn);
    if (f->timeout_ev != NULL)
        event_free(f->timeout_ev);
    evbuffer_free(f->pend);
    free(f->head);
    free(f->hbuf);
    free(f);
}

void ag_fwd_free(struct ag_fwd *f)
{
    if (f == NULL)
        return;
    LOG_DEBUG(f->agt->ctx->log, "local_cancel", LOG_S("addr", f->agt->cfg.address),
              LOG_I("fd", f->conn != NULL ? f->conn->fd : -1), LOG_B("dialling", f->dial != NULL),
              LOG_U("body_in", f->body_in),
              LOG_U("written", f->conn != NULL ? f->conn->written : 0),
              LOG_U("out", f->conn != NULL ? evbuffer_get_length(f->conn->out) : 0),
              LOG_U("pend", evbuffer_get_length(f->pend)), LOG_B("body_done", f->body_done),
              LOG_B("wev", f->conn != NULL && event_pending(f->conn->wev, EV_WRITE, NULL)),
              LOG_B("rev", f->conn != NULL && event_pending(f->conn->rev, EV_READ, NULL)),
              LOG_B("got_bytes", f->got_bytes), LOG_B("head_done", f->head_done));
    ag_insp_cap_end(f->agt->ctx->insp, f->cap, "cancelled");
    fwd_release(f);
}

/* Response complete: pool or close the connection, free f, report. */
static void fwd_finish(struct ag_fwd *f)
{
    const struct ag_fwd_cbs *cb = f->cb;
    void *arg = f->arg;
    struct ag_fwd_conn *c = f->conn;

    f->conn = NULL;
    if (c != NULL) {
        bool keep = f->body_done && !f->raw && http_should_keep_alive(&f->parser) &&
                    HTTP_PARSER_ERRNO(&f->parser) == HPE_PAUSED;
        LOG_DEBUG(f->agt->ctx->log, "local_done", LOG_S("addr", f->agt->cfg.address),
                  LOG_I("fd", c->fd), LOG_B("keep", keep),
                  LOG_U("out", evbuffer_get_length(c->out)),
                  LOG_U("in", evbuffer_get_length(c->in)));
        if (keep)
            pool_put(c->pool, c);
        else
            conn_free(c);
    }
    ag_insp_cap_end(f->agt->ctx->insp, f->cap, NULL);
    fwd_release(f);
    cb->on_end(arg);
}

static int fwd_attach(struct ag_fwd *f, struct ag_fwd_conn *c);
static void fwd_on_dialled(void *arg, evutil_socket_t fd, const char *err);

static int fwd_dial(struct ag_fwd *f)
{
    struct ag_ctx *ctx = f->agt->ctx;

    f->dial = ag_net_dial_start(ctx->base, ctx->dns, f->agt->target.host, f->agt->target.port,
                                FWD_DIAL_TIMEOUT_MS, fwd_on_dialled, f);
    return f->dial != NULL ? 0 : -1;
}

/* Tries once more on a fresh connection: a pooled connection the local API
 * had closed just before we used it (keep-alive race). Only for a request
 * without body, before any response byte. Returns 0 if the retry started. */
static int fwd_retry(struct ag_fwd *f)
{
    if (!f->reused || f->retried || f->has_body || f->got_bytes)
        return -1;
    f->retried = true;
    f->reused = false;
    conn_free(f->conn);
    f->conn = NULL;
    http_parser_init(&f->parser, HTTP_RESPONSE);
    f->parser.data = f;
    return fwd_dial(f);
}

static void fwd_fail(struct ag_fwd *f, enum ag_fwd_err err, const char *detail)
{
    const struct ag_fwd_cbs *cb = f->cb;
    void *arg = f->arg;
    char d[160];

    if (err == AG_FWD_E_UNREACHABLE && fwd_retry(f) == 0)
        return;
    if (f->head_done && err == AG_FWD_E_UNREACHABLE)
        err = AG_FWD_E_ABORTED;
    (void)util_snprintf(d, sizeof(d), "%s", detail != NULL ? detail : "");
    LOG_DEBUG(f->agt->ctx->log, "local_failed", LOG_S("addr", f->agt->cfg.address),
              LOG_I("fd", f->conn != NULL ? f->conn->fd : -1), LOG_S("detail", d));
    ag_insp_cap_end(f->agt->ctx->insp, f->cap,
                    err == AG_FWD_E_TIMEOUT   ? "gateway_timeout"
                    : err == AG_FWD_E_ABORTED ? "local_aborted"
                                              : "local_unreachable");
    fwd_release(f);
    cb->on_error(arg, err, d);
}

static void fwd_on_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct ag_fwd *f = arg;

    if (f->head_done)
        return;
    fwd_fail(f, AG_FWD_E_TIMEOUT, "no response head within the response timeout");
}

/* Hands on the first k bytes of in as body: moved (on_body_move) when they
 * are at least half a read (FWD_READ_MAX) worth, so a moved chain is at
 * least half full and a stream that holds its body while the tunnel is slow
 * holds at most twice its bytes; smaller pieces are copied through on_body,
 * and a small response costs no large allocation kept past its send. The
 * inspector's capture sees the bytes either way. */
static void fwd_body_move(struct ag_fwd *f, struct evbuffer *in, size_t k)
{
    bool move = f->cb->on_body_move != NULL && k >= FWD_READ_MAX / 2;

    if (f->cap != NULL || !move) {
        struct evbuffer_iovec v[8];
        size_t seen = 0;
        while (seen < k) {
            struct evbuffer_ptr at;
            int nv;
            evbuffer_ptr_set(in, &at, seen, EVBUFFER_PTR_SET);
            nv = evbuffer_peek(in, (ev_ssize_t)(k - seen), &at, v, 8);
            if (nv < 1)
                break;
            for (int i = 0; i < nv && i < 8 && seen < k; i++) {
                size_t m = v[i].iov_len < k - seen ? v[i].iov_len : k - seen;
                ag_insp_cap_resp_body(f->agt->ctx->insp, f->cap, v[i].iov_base, m);
                if (!move)
                    f->cb->on_body(f->arg, v[i].iov_base, m);
                seen += m;
            }
        }
    }
    if (move)
        f->cb->on_body_move(f->arg, in, k);
    else
        evbuffer_drain(in, k);
}

/* Feeds buffered input to the parser. Returns 0, or -1 after a terminal report. */
static int fwd_parse(struct ag_fwd *f, struct evbuffer *in)
{
    while (evbuffer_get_length(in) > 0 && !f->resp_done) {
        struct evbuffer_iovec v;
        size_t n;

        if (f->body_left > 0) {
            /* a Content-Length body, past the parser */
            size_t k = evbuffer_get_length(in);
            if (k > f->body_left)
                k = (size_t)f->body_left;
            f->body_left -= k;
            fwd_body_move(f, in, k);
            if (f->body_left == 0)
                f->resp_done = true;
            continue;
        }
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        f->got_bytes = true;
        if (f->raw) {
            /* upgraded: the bytes are the WebSocket's, untouched */
            fwd_body_move(f, in, evbuffer_get_length(in));
            continue;
        }
        n = http_parser_execute(&f->parser, &fwd_parser_settings, v.iov_base, v.iov_len);
        evbuffer_drain(in, n);
        if (f->resp_done)
            break;
        if (f->body_left > 0 && !f->failed)
            continue; /* the head is done; the body follows (fwd_body_move) */
        if (f->raw && !f->failed)
            continue; /* what follows the 101 head is raw */
        if (f->failed || HTTP_PARSER_ERRNO(&f->parser) != HPE_OK) {
            fwd_fail(f, AG_FWD_E_UNREACHABLE,
                     http_errno_description(HTTP_PARSER_ERRNO(&f->parser)));
            return -1;
        }
    }
    if (f->resp_done) {
        fwd_finish(f);
        return -1;
    }
    return 0;
}

/* EOF from the local API: complete an EOF-delimited response, or fail. */
static void fwd_on_eof(struct ag_fwd *f)
{
    if (f->body_left > 0) {
        fwd_fail(f, AG_FWD_E_UNREACHABLE, "local API closed the connection");
        return;
    }
    if (f->raw) {
        f->body_done = false; /* never pooled */
        fwd_finish(f);
        return;
    }
    if (f->head_done || f->got_bytes) {
        http_parser_execute(&f->parser, &fwd_parser_settings, NULL, 0);
        if (f->resp_done) {
            f->body_done = false; /* EOF-delimited: never pooled */
            fwd_finish(f);
            return;
        }
    }
    fwd_fail(f, AG_FWD_E_UNREACHABLE, "local API closed the connection");
}

static void conn_on_read(evutil_socket_t fd, short what, void *arg)
{
    struct ag_fwd_conn *c = arg;
    struct ag_fwd *f = c->fwd;
    char detail[128];
    ssize_t n;

    if (f == NULL) {
        idle_on_read(c, what);
        return;
    }
    n = conn_read(c);
    if (n == -1 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n == -1) {
        (void)util_snprintf(detail, sizeof(detail), "local connection: %s", strerror(errno));
        fwd_fail(f, AG_FWD_E_UNREACHABLE, detail);
        return;
    }
    if (fwd_parse(f, c->in) != 0)
        return;
    if (n == 0)
        fwd_on_eof(f);
}

static void fwd_ack(struct ag_fwd *f)
{
    size_t n = f->unacked;

    if (n == 0)
        return;
    f->unacked = 0;
    f->cb->on_body_sent(f->arg, n);
}

/* WebSocket: the client half-closed; pass it on once our output is out. */
static void fwd_maybe_shut(struct ag_fwd *f)
{
    if (f->raw && f->body_done && !f->shut_wr && f->conn != NULL &&
        evbuffer_get_length(f->conn->out) == 0) {
        f->shut_wr = true;
        (void)shutdown(f->conn->fd, SHUT_WR);
    }
}

static void conn_on_write(evutil_socket_t fd, short what, void *arg)
{
    struct ag_fwd_conn *c = arg;
    struct ag_fwd *f = c->fwd;
    char detail[128];
    int n = evbuffer_write_atmost(c->out, fd, FWD_READ_MAX);

    if (n > 0)
        c->written += (uint64_t)n;
    if (n == -1 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        event_del(c->wev);
        if (f == NULL)
            return;
        /* the local API may have answered and closed: read that first */
        (void)util_snprintf(detail, sizeof(detail), "local connection: %s", strerror(errno));
        if (f->head_done || f->got_bytes) {
            evbuffer_drain(c->out, evbuffer_get_length(c->out));
            return; /* the read side ends it */
        }
        fwd_fail(f, AG_FWD_E_UNREACHABLE, detail);
        return;
    }
    if (evbuffer_get_length(c->out) == 0) {
        event_del(c->wev);
        if (f != NULL)
            fwd_maybe_shut(f);
    }
    if (f != NULL && evbuffer_get_length(c->out) <= FWD_OUT_LOW)
        fwd_ack(f);
}

/* Puts f on c and sends what is queued. Returns 0 or -1 (out of memory). */
static int fwd_attach(struct ag_fwd *f, struct ag_fwd_conn *c)
{
    struct evbuffer *out = c->out;

    f->conn = c;
    c->fwd = f;
    if (evbuffer_add(out, f->head, f->head_len) != 0)
        return -1;
    if (evbuffer_get_length(f->pend) > 0 && evbuffer_add_buffer(out, f->pend) != 0)
        return -1;
    event_del(c->rev); /* drops the idle timeout */
    if (!f->paused)
        event_add(c->rev, NULL);
    conn_kick(c);
    return 0;
}

static void fwd_on_dialled(void *arg, evutil_socket_t fd, const char *err)
{
    struct ag_fwd *f = arg;
    struct ag_ctx *ctx = f->agt->ctx;
    struct ag_fwd_conn *c;

    f->dial = NULL;
    if (fd < 0) {
        char d[200];
        (void)util_snprintf(d, sizeof(d), "%s:%u: %s", f->agt->target.host,
                            (unsigned)f->agt->target.port, err);
        fwd_fail(f, AG_FWD_E_UNREACHABLE, d);
        return;
    }
    c = conn_new(ctx->base, f->agt->pool, fd, f->agt->target_gen);
    if (c == NULL) {
        fwd_fail(f, AG_FWD_E_UNREACHABLE, "out of memory");
        return;
    }
    if (fwd_attach(f, c) != 0) {
        fwd_fail(f, AG_FWD_E_UNREACHABLE, "out of memory");
        return;
    }
    /* body that arrived while dialling: acknowledge what fits */
    if (evbuffer_get_length(c->out) <= FWD_OUT_HIGH)
        fwd_ack(f);
}

struct ag_fwd *ag_fwd_start(struct ag_agt *a, const struct ag_fwd_request *rq,
                            const struct ag_fwd_cbs *cb, void *arg)
{
    struct ag_fwd *f = calloc(1, sizeof(*f));
    struct ag_fwd_conn *c;

    if (f == NULL)
        return NULL;
    f->agt = a;
    f->cb = cb;
    f->arg = arg;
    f->has_body = rq->has_body;
    f->body_done = !rq->has_body;
    http_parser_init(&f->parser, HTTP_RESPONSE);
    f->parser.data = f;
    f->pend = evbuffer_new();
    if (f->pend == NULL || build_head(f, rq) != 0)
        goto fail_f;
    f->cap = ag_insp_cap_begin(a->ctx->insp, a, rq);
    if (a->cfg.response_timeout_s > 0) {
        struct timeval tv = {(time_t)a->cfg.response_timeout_s, 0};
        f->timeout_ev = evtimer_new(a->ctx->base, fwd_on_timeout, f);
        if (f->timeout_ev == NULL)
            goto fail_f;
        evtimer_add(f->timeout_ev, &tv);
    }
    c = pool_take(a->pool);
    LOG_DEBUG(a->ctx->log, "local_start", LOG_S("addr", a->cfg.address),
              LOG_I("fd", c != NULL ? c->fd : -1), LOG_B("body", rq->has_body));
    if (c != NULL) {
        f->reused = true;
        if (fwd_attach(f, c) != 0) {
            f->conn = c; /* freed with f */
            goto fail_f;
        }
        return f;
    }
    if (fwd_dial(f) != 0)
        goto fail_f;
    return f;

fail_f:
    ag_insp_cap_end(a->ctx->insp, f->cap, "internal_error");
    fwd_release(f);
    return NULL;
}

size_t ag_fwd_write_body(struct ag_fwd *f, const uint8_t *data, size_t len)
{
    struct evbuffer *out = f->conn != NULL ? f->conn->out : f->pend;

    if (len == 0 || f->body_done)
        return len;
    ag_insp_cap_req_body(f->agt->ctx->insp, f->cap, data, len);
    f->body_started = true;
    f->body_in += len;
    if (f->chunked && evbuffer_add_printf(out, "%zx\r\n", len) < 0)
        goto fail;
    if (evbuffer_add(out, data, len) != 0)
        goto fail;
    if (f->chunked && evbuffer_add(out, "\r\n", 2) != 0)
        goto fail;
    if (f->conn != NULL)
        conn_kick(f->conn);
    if (f->conn != NULL && evbuffer_get_length(out) <= FWD_OUT_HIGH)
        return len;
    f->unacked += len;
    return 0;

fail:
    /* Out of memory: acknowledge so the window does not leak; the request
     * will fail on its own as the body is incomplete. */
    return len;
}

void ag_fwd_end_body(struct ag_fwd *f)
{
    struct evbuffer *out = f->conn != NULL ? f->conn->out : f->pend;

    if (f->body_done)
        return;
    f->body_done = true;
    if (f->chunked)
        evbuffer_add(out, "0\r\n\r\n", 5);
    if (f->conn != NULL) {
        conn_kick(f->conn);
        fwd_maybe_shut(f);
    }
}

void ag_fwd_pause_read(struct ag_fwd *f, bool paused)
{
    if (f->paused == paused)
        return;
    f->paused = paused;
    if (f->conn == NULL)
        return;
    if (paused)
        event_del(f->conn->rev);
    else
        event_add(f->conn->rev, NULL);
}
