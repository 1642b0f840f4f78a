/* tunnel-bench-swarm: the swarm client of bench/run's idle_tunnels and
 * reconnect_storm scenarios. Opens N native tunnels (proto/PROTOCOL.md) to a
 * tunnel-gateway as N separate tunnel-agent processes would: each its own key
 * (derived from a seed) and instance id, WebSocket upgrade (tunnel-h2.v1),
 * challenge -> EIP-191 auth -> auth_ok, then an HTTP/2 server session in the
 * binary messages that answers every request with a small 200. Reconnects
 * with tunnel-agent's backoff (agent/ag_daemon.c) and reports JSON lines on
 * stdout. One struct sw_ctx per run holds everything; one event loop. */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "id.h"
#include "keccak.h"
#include "log.h"
#include "tls.h"
#include "tun_msg.h"
#include "util.h"
#include "ws.h"

/* Timers and sizes as tunnel-agent has them (agent/ag_tun.c, ag_daemon.c). */
#define SW_DIAL_TIMEOUT_MS 10000u
#define SW_AUTH_TIMEOUT_MS 20000u /* dial to auth_ok */
#define SW_BACKOFF_MIN_MS 1000u
#define SW_BACKOFF_MAX_MS 60000u
#define SW_HEALTHY_RESET_MS 60000u /* up this long: the backoff starts again at 1 s */
#define SW_DEFAULT_PING_S 20u
#define SW_MSG_CHUNK (64u * 1024u) /* binary message size */
#define SW_MAX_STREAMS 1024
#define SW_STREAM_WINDOW (1u << 20)
#define SW_CONN_WINDOW (64u << 20)
#define SW_DRAIN_MAX_MS 30000u /* a draining connection is dropped after this */

#define SW_MAX_COUNT 100000u
#define SW_FD_SPARE 64u /* descriptors beyond one per tunnel */
#define SW_HOST_MAX 256u
#define SW_ERR_MAX 160u
#define SW_BODY_MAX 128u

/* Why a connection attempt failed (before auth_ok). */
enum sw_fail {
    SW_F_REFUSED = 0, /* TCP connect refused: nothing listens */
    SW_F_CONNECT,     /* other TCP connect errors (EMFILE, EADDRNOTAVAIL, ...) */
    SW_F_TIMEOUT,     /* no auth_ok within SW_AUTH_TIMEOUT_MS */
    SW_F_TLS,         /* TLS handshake failed or the peer closed during it */
    SW_F_WS,          /* upgrade refused (e.g. 503 while draining) or closed before auth_ok */
    SW_F_AUTH_ERROR,  /* auth_error, or the address listed in auth_ok.rejected */
    SW_F_COUNT,
};

static const char *const sw_fail_names[SW_F_COUNT] = {
    [SW_F_REFUSED] = "refused", [SW_F_CONNECT] = "connect", [SW_F_TIMEOUT] = "timeout",
    [SW_F_TLS] = "tls",         [SW_F_WS] = "ws",           [SW_F_AUTH_ERROR] = "auth_error",
};

enum sw_tun_state {
    SW_T_IDLE = 0,   /* not started yet (initial ramp) */
    SW_T_WAIT,       /* backoff timer pending */
    SW_T_CONNECTING, /* t->conn is dialling .. authenticating */
    SW_T_UP,         /* registered: auth_ok accepted the address */
    SW_T_STOPPED,    /* permanent refusal (PROTOCOL.md 4.7) or superseded: never retried */
};

enum sw_conn_state {
    SW_C_DIAL = 0, /* TCP connect in progress */
    SW_C_TLS,      /* TLS handshake (wss://) */
    SW_C_UPGRADE,  /* upgrade request sent, waiting for the 101 */
    SW_C_AUTH,     /* WebSocket up: challenge, auth, auth_ok */
    SW_C_UP,       /* HTTP/2 server session running */
    SW_C_DRAINING, /* GOAWAY or draining received: closes when its streams end */
    SW_C_CLOSING,  /* close frame sent, waiting for on_close */
    SW_C_DEAD,     /* detached, on the reap list */
};

struct sw_cfg {
    char host[SW_HOST_MAX];  /* URL host: SNI, Host header, signed domain */
    uint16_t port;           /* URL port */
    bool tls;                /* wss:// */
    struct sockaddr_in dial; /* where to connect */
    const char *ca_file;     /* PEM trust anchors; NULL = system store */
    const char *seed;        /* key derivation seed */
    uint64_t count;          /* tunnels */
    uint64_t first;          /* key index of the first tunnel */
    uint64_t rate;           /* initial connects per second, 0 = unlimited */
    uint64_t max_handshakes; /* initial ramp: handshakes in flight at most */
    uint64_t duration_s;     /* exit after this long */
    uint64_t status_ms;      /* status line period, 0 = none */
    bool print_addresses;
    enum log_level log_level;
};

/* Counters of the whole run; a cycle keeps a copy of them at its start. */
struct sw_counts {
    uint64_t fail[SW_F_COUNT]; /* failed connection attempts by kind */
    uint64_t registrations;    /* tunnels that reached auth_ok */
    uint64_t drops;            /* registered tunnels lost (closed, drained, keepalive) */
    uint64_t removed;          /* agent_removed other than replaced/removed */
};

/* One drop -> all-registered-again cycle (the reconnect storm). */
struct sw_cycle {
    bool active;
    uint64_t drop_ms;     /* mono ms of the first drop */
    uint64_t listener_ms; /* first TCP connect after the last refusal, 0 = none yet */
    uint64_t dropped;     /* tunnels that left the registered state in this cycle */
    struct sw_counts at_start;
};

struct sw_ctx;
struct sw_conn;

/* One simulated agent process: a key, an instance id, a backoff. */
struct sw_tun {
    struct sw_ctx *ctx;
    uint64_t idx; /* key index (cfg->first + position) */
    struct id_key key;
    char addr[ID_ADDR_STR_LEN + 1]; /* lowercase */
    enum sw_tun_state state;
    struct sw_conn *conn;   /* owned: being made, or registered */
    struct sw_conn *old;    /* owned: draining, finishing its streams */
    struct event *retry_ev; /* owned: backoff timer */
    uint64_t backoff_ms;    /* base of the next delay, doubles to SW_BACKOFF_MAX_MS */
    uint64_t up_ms;         /* mono ms of the last auth_ok */
};

/* One WebSocket connection of a tunnel. Owned by its sw_tun (conn or old)
 * until conn_kill() moves it to the ctx's reap list. */
struct sw_conn {
    struct sw_ctx *ctx;
    struct sw_tun *t; /* NULL once dead */
    struct sw_conn *next_dead;
    enum sw_conn_state st;
    bool handshaking; /* counted in ctx->handshaking */
    bool auth_sent;
    evutil_socket_t fd;      /* while dialling; then the bufferevent owns it */
    int dial_errno;          /* a connect() failure known before the loop ran */
    struct event *dial_ev;   /* owned: connect completion */
    struct bufferevent *bev; /* owned until the WebSocket takes it */
    struct ws_conn *ws;      /* owned */
    nghttp2_session *h2;     /* owned */
    struct evbuffer *out;    /* owned: h2 bytes for the next binary message */
    char ws_key[25];
    uint64_t start_ms; /* mono ms of the dial */
    uint64_t drain_ms; /* mono ms draining started */
    uint32_t ping_s;   /* from auth_ok */
    uint64_t next_ping_ms;
    struct sw_stream *streams; /* owned: open request streams */
    size_t nstreams;
};

/* One request stream's response body (nghttp2 stream user data). */
struct sw_stream {
    struct sw_conn *c;
    struct sw_stream *next, *prev; /* c->streams */
    size_t off;
    size_t len;
    char body[SW_BODY_MAX];
};

struct sw_ctx {
    const struct sw_cfg *cfg; /* borrowed; immutable */
    struct event_base *base;  /* owned */
    SSL_CTX *ssl_ctx;         /* owned; NULL for ws:// */
    struct log_sink *log;     /* owned; stderr */
    struct sw_tun *tuns;      /* owned; cfg->count */
    size_t n;
    char run_id[9]; /* random, part of every instance id */
    char host_port[SW_HOST_MAX + 8];
    struct event *tick_ev;     /* owned: 1 s keepalive, pings, deadlines */
    struct event *status_ev;   /* owned */
    struct event *ramp_ev;     /* owned: starts the initial connections */
    struct event *reap_ev;     /* owned: frees dead connections from the loop */
    struct event *duration_ev; /* owned */
    struct event *sigint_ev;   /* owned */
    struct event *sigterm_ev;  /* owned */
    struct sw_conn *dead;      /* reap list */
    uint64_t start_ms;
    size_t next_start;  /* initial ramp: next tunnel to start */
    size_t handshaking; /* connections between dial and auth_ok */
    size_t up;          /* tunnels registered */
    size_t waiting;     /* tunnels in backoff */
    size_t stopped;     /* tunnels stopped for good */
    size_t draining;    /* old connections finishing */
    bool all_up_seen;
    struct sw_counts total;
    struct sw_cycle cyc;
    char last_err[SW_ERR_MAX]; /* the most recent failure, for status lines */
    int exit_code;
};

static void conn_kill(struct sw_conn *c);
static void conn_flush(struct sw_conn *c);
static void tun_connect(struct sw_tun *t);

/* ---- output ------------------------------------------------------------- */

static void print_json_str(const char *s)
{
    putchar('"');
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

/* ,"failures":{...} of cur - base (base may be NULL). */
static void print_failures(const struct sw_counts *cur, const struct sw_counts *base)
{
    printf(",\"failures\":{");
    for (int k = 0; k < SW_F_COUNT; k++)
        printf("%s\"%s\":%" PRIu64, k > 0 ? "," : "", sw_fail_names[k],
               cur->fail[k] - (base != NULL ? base->fail[k] : 0));
    printf("}");
}

static void print_status(struct sw_ctx *ctx, const char *event)
{
    uint64_t now = util_mono_ms();

    printf("{\"event\":\"%s\",\"t_ms\":%" PRIu64 ",\"elapsed_ms\":%" PRIu64 ",\"count\":%zu"
           ",\"up\":%zu,\"connecting\":%zu,\"waiting\":%zu,\"stopped\":%zu,\"draining\":%zu"
           ",\"registrations\":%" PRIu64 ",\"drops\":%" PRIu64 ",\"removed\":%" PRIu64,
           event, now, now - ctx->start_ms, ctx->n, ctx->up, ctx->handshaking, ctx->waiting,
           ctx->stopped, ctx->draining, ctx->total.registrations, ctx->total.drops,
           ctx->total.removed);
    print_failures(&ctx->total, NULL);
    printf(",\"last_error\":");
    print_json_str(ctx->last_err);
    printf("}\n");
    fflush(stdout);
}

/* ---- counting ------------------------------------------------------------- */

static void ctx_on_up(struct sw_ctx *ctx)
{
    uint64_t now = util_mono_ms();

    ctx->up++;
    ctx->total.registrations++;
    if (ctx->up < ctx->n)
        return;
    if (!ctx->all_up_seen) {
        ctx->all_up_seen = true;
        printf("{\"event\":\"all_up\",\"t_ms\":%" PRIu64 ",\"count\":%zu,\"elapsed_ms\":%" PRIu64,
               now, ctx->n, now - ctx->start_ms);
        print_failures(&ctx->total, NULL);
        printf("}\n");
        fflush(stdout);
        return;
    }
    if (ctx->cyc.active) {
        const struct sw_cycle *y = &ctx->cyc;
        uint64_t listener = y->listener_ms != 0 ? y->listener_ms : y->drop_ms;
        uint64_t from_listener = now - listener;
        uint64_t regs = ctx->total.registrations - y->at_start.registrations;

        printf("{\"event\":\"recovered\",\"t_ms\":%" PRIu64 ",\"count\":%zu,\"dropped\":%" PRIu64
               ",\"drop_t_ms\":%" PRIu64 ",\"listener_t_ms\":%" PRIu64 ",\"from_drop_ms\":%" PRIu64
               ",\"from_listener_ms\":%" PRIu64 ",\"registrations\":%" PRIu64
               ",\"regs_per_s\":%.1f,\"removed\":%" PRIu64,
               now, ctx->n, y->dropped, y->drop_ms, listener, now - y->drop_ms, from_listener, regs,
               (double)regs * 1000.0 / (double)(from_listener > 0 ? from_listener : 1),
               ctx->total.removed - y->at_start.removed);
        print_failures(&ctx->total, &y->at_start);
        printf("}\n");
        fflush(stdout);
        ctx->cyc.active = false;
    }
}

static void ctx_on_down(struct sw_ctx *ctx)
{
    ctx->up--;
    ctx->total.drops++;
    if (ctx->all_up_seen && !ctx->cyc.active) {
        ctx->cyc.active = true;
        ctx->cyc.drop_ms = util_mono_ms();
        ctx->cyc.listener_ms = 0;
        ctx->cyc.dropped = 0;
        ctx->cyc.at_start = ctx->total;
        printf("{\"event\":\"drop\",\"t_ms\":%" PRIu64 ",\"up\":%zu}\n", ctx->cyc.drop_ms, ctx->up);
        fflush(stdout);
    }
    if (ctx->cyc.active)
        ctx->cyc.dropped++;
}

static void ramp_kick(struct sw_ctx *ctx)
{
    if (ctx->next_start < ctx->n && !evtimer_pending(ctx->ramp_ev, NULL))
        event_active(ctx->ramp_ev, 0, 0);
}

static void conn_handshake_done(struct sw_conn *c)
{
    if (!c->handshaking)
        return;
    c->handshaking = false;
    c->ctx->handshaking--;
    ramp_kick(c->ctx);
}

/* ---- tunnels: backoff as tunnel-agent ------------------------------------- */

/* The next delay with +-20 % jitter; doubles the base (ag_daemon.c backoff_next). */
static uint64_t tun_backoff_next(struct sw_tun *t)
{
    uint32_t r = 0;
    uint64_t base = t->backoff_ms;
    uint64_t d;

    if (util_rand_bytes((uint8_t *)&r, sizeof(r)) != 0)
        r = (uint32_t)util_mono_ms();
    d = base * 8 / 10 + (base * 4 / 10) * (r % 1000u) / 1000u;
    t->backoff_ms = base * 2 > SW_BACKOFF_MAX_MS ? SW_BACKOFF_MAX_MS : base * 2;
    return d;
}

static void tun_set_state(struct sw_tun *t, enum sw_tun_state st)
{
    struct sw_ctx *ctx = t->ctx;

    if (t->state == st)
        return;
    if (t->state == SW_T_WAIT)
        ctx->waiting--;
    if (st == SW_T_WAIT)
        ctx->waiting++;
    if (st == SW_T_STOPPED)
        ctx->stopped++;
    t->state = st;
}

static void tun_retry(struct sw_tun *t)
{
    uint64_t d = tun_backoff_next(t);
    struct timeval tv = {(time_t)(d / 1000u), (suseconds_t)((d % 1000u) * 1000u)};

    tun_set_state(t, SW_T_WAIT);
    evtimer_add(t->retry_ev, &tv);
}

static void tun_on_retry(evutil_socket_t fd, short what, void *arg)
{
    struct sw_tun *t = arg;

    if (t->state == SW_T_WAIT)
        tun_connect(t);
}

/* A registered tunnel is no longer registered (drop, drain, removal). */
static void tun_left_up(struct sw_tun *t)
{
    if (t->state != SW_T_UP)
        return;
    if (util_mono_ms() - t->up_ms >= SW_HEALTHY_RESET_MS)
        t->backoff_ms = SW_BACKOFF_MIN_MS;
    tun_set_state(t, SW_T_CONNECTING); /* the caller sets the real next state */
    ctx_on_down(t->ctx);
}

/* PROTOCOL.md 4.7: these codes stop the agent instead of retrying. */
static bool code_is_permanent(const char *code)
{
    static const char *const perm[] = {
        "signature_verification_failed", "address_not_allowed", "invalid_address", "invalid_json",
        "expected_auth_frame",           "no_agents",           "too_many_agents",
    };

    for (size_t i = 0; i < sizeof(perm) / sizeof(perm[0]); i++)
        if (strcmp(code, perm[i]) == 0)
            return true;
    return false;
}

/* ---- connection failures and teardown ------------------------------------- */

/* Detaches c from its tunnel and queues it for the reap event; closes the
 * socket at once (ws_free and bufferevent_free are safe inside their own
 * callbacks; the nghttp2 session is freed from the loop). */
static void conn_kill(struct sw_conn *c)
{
    struct sw_ctx *ctx = c->ctx;

    if (c->st == SW_C_DEAD)
        return;
    conn_handshake_done(c);
    if (c->t != NULL) {
        if (c->t->conn == c)
            c->t->conn = NULL;
        if (c->t->old == c) {
            c->t->old = NULL;
            ctx->draining--;
        }
        c->t = NULL;
    }
    c->st = SW_C_DEAD;
    ws_free(c->ws);
    c->ws = NULL;
    if (c->bev != NULL)
        bufferevent_free(c->bev);
    c->bev = NULL;
    if (c->dial_ev != NULL)
        event_free(c->dial_ev);
    c->dial_ev = NULL;
    if (c->fd >= 0)
        evutil_closesocket(c->fd);
    c->fd = -1;
    c->next_dead = ctx->dead;
    ctx->dead = c;
    event_active(ctx->reap_ev, 0, 0);
}

static void conn_free(struct sw_conn *c)
{
    if (c->h2 != NULL)
        nghttp2_session_del(c->h2); /* reports no stream closes */
    c->h2 = NULL;
    while (c->streams != NULL) {
        struct sw_stream *s = c->streams;
        c->streams = s->next;
        free(s);
    }
    if (c->out != NULL)
        evbuffer_free(c->out);
    free(c);
}

static void on_reap(evutil_socket_t fd, short what, void *arg)
{
    struct sw_ctx *ctx = arg;

    while (ctx->dead != NULL) {
        struct sw_conn *c = ctx->dead;
        ctx->dead = c->next_dead;
        conn_free(c);
    }
}

/* A connection attempt failed before auth_ok. */
static void conn_fail(struct sw_conn *c, enum sw_fail kind, const char *why, bool permanent)
{
    struct sw_ctx *ctx = c->ctx;
    struct sw_tun *t = c->t;

    if (c->st == SW_C_DEAD || t == NULL || t->conn != c)
        return;
    ctx->total.fail[kind]++;
    (void)util_snprintf(ctx->last_err, sizeof(ctx->last_err), "%s: %s", sw_fail_names[kind], why);
    if (ctx->cyc.active && kind == SW_F_REFUSED)
        ctx->cyc.listener_ms = 0; /* the gateway is not back yet */
    if (kind == SW_F_AUTH_ERROR)
        LOG_WARN(ctx->log, "auth_failed", LOG_S("addr", t->addr), LOG_S("err", why),
                 LOG_B("permanent", permanent));
    else
        LOG_DEBUG(ctx->log, "connect_failed", LOG_S("addr", t->addr),
                  LOG_S("kind", sw_fail_names[kind]), LOG_S("err", why));
    conn_kill(c);
    if (permanent)
        tun_set_state(t, SW_T_STOPPED);
    else
        tun_retry(t);
}

/* A registered connection went away (closed, keepalive); t reconnects with backoff. */
static void conn_lost(struct sw_conn *c, const char *why)
{
    struct sw_tun *t = c->t;

    if (c->st == SW_C_DEAD || t == NULL)
        return;
    if (t->old == c) { /* a draining connection ended: its successor counts */
        conn_kill(c);
        return;
    }
    LOG_DEBUG(c->ctx->log, "tunnel_lost", LOG_S("addr", t->addr), LOG_S("reason", why));
    conn_kill(c);
    tun_left_up(t);
    tun_retry(t);
}

/* GOAWAY or draining (PROTOCOL.md 8.4): the connection finishes its streams
 * while a new one is opened at once, without backoff. */
static void conn_drain(struct sw_conn *c, const char *why)
{
    struct sw_ctx *ctx = c->ctx;
    struct sw_tun *t = c->t;

    if (c->st != SW_C_UP || t == NULL || t->conn != c)
        return;
    LOG_DEBUG(ctx->log, "tunnel_draining", LOG_S("addr", t->addr), LOG_S("reason", why));
    c->st = SW_C_DRAINING;
    c->drain_ms = util_mono_ms();
    if (t->old != NULL)
        conn_kill(t->old);
    t->old = c;
    t->conn = NULL;
    ctx->draining++;
    tun_left_up(t);
    tun_connect(t);
}

/* ---- HTTP/2 server session ------------------------------------------------- */

static ssize_t h2_on_send(nghttp2_session *h2, const uint8_t *data, size_t len, int flags,
                          void *user)
{
    struct sw_conn *c = user;

    if (c->ws == NULL || !ws_is_writable(c->ws))
        return NGHTTP2_ERR_WOULDBLOCK;
    if (evbuffer_add(c->out, data, len) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    while (evbuffer_get_length(c->out) >= SW_MSG_CHUNK)
        if (ws_send_binary_buffer(c->ws, c->out, SW_MSG_CHUNK) != 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
    return (ssize_t)len;
}

static ssize_t h2_on_read_body(nghttp2_session *h2, int32_t id, uint8_t *buf, size_t length,
                               uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct sw_stream *s = src->ptr;
    size_t n = s->len - s->off;

    if (n > length)
        n = length;
    memcpy(buf, s->body + s->off, n);
    s->off += n;
    if (s->off == s->len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* Every request gets 200 with "tunnel-bench-swarm <index> <address>\n". */
static void h2_respond(struct sw_conn *c, int32_t id)
{
    struct sw_stream *s = calloc(1, sizeof(*s));
    nghttp2_data_provider prd = {.read_callback = h2_on_read_body};
    char clen[24];
    int n;

    if (s == NULL || c->t == NULL) {
        free(s);
        nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, id, NGHTTP2_INTERNAL_ERROR);
        return;
    }
    n = util_snprintf(s->body, sizeof(s->body), "tunnel-bench-swarm %" PRIu64 " %s\n", c->t->idx,
                      c->t->addr);
    s->c = c;
    s->len = n > 0 ? (size_t)n : 0;
    (void)util_snprintf(clen, sizeof(clen), "%zu", s->len);
    nghttp2_nv nv[] = {
        {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)"text/plain", 12, 10, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-length", (uint8_t *)clen, 14, strlen(clen), NGHTTP2_NV_FLAG_NONE},
    };
    prd.source.ptr = s;
    if (nghttp2_session_set_stream_user_data(c->h2, id, s) != 0) {
        free(s);
        return;
    }
    s->next = c->streams;
    if (c->streams != NULL)
        c->streams->prev = s;
    c->streams = s;
    c->nstreams++;
    if (nghttp2_submit_response(c->h2, id, nv, sizeof(nv) / sizeof(nv[0]), &prd) != 0)
        nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, id, NGHTTP2_INTERNAL_ERROR);
}

static int h2_on_frame_recv(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct sw_conn *c = user;

    switch (frame->hd.type) {
    case NGHTTP2_HEADERS:
        if (frame->headers.cat == NGHTTP2_HCAT_REQUEST &&
            nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id) == NULL)
            h2_respond(c, frame->hd.stream_id);
        break;
    case NGHTTP2_GOAWAY:
        conn_drain(c, "goaway");
        break;
    default:
        break;
    }
    return 0;
}

static int h2_on_frame_send(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    int32_t id = frame->hd.stream_id;

    if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
        !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    /* response complete while the request body still comes: RFC 9113 8.1 */
    if (nghttp2_session_get_stream_remote_close(h2, id) == 0)
        nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, id, NGHTTP2_NO_ERROR);
    return 0;
}

static int h2_on_stream_close(nghttp2_session *h2, int32_t id, uint32_t error_code, void *user)
{
    struct sw_conn *c = user;
    struct sw_stream *s = nghttp2_session_get_stream_user_data(h2, id);

    if (s == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(h2, id, NULL);
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        c->streams = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    free(s);
    c->nstreams--;
    return 0;
}

/* Server preface: the settings tunnel-agent sends (PROTOCOL.md 5.2). */
static int h2_start(struct sw_conn *c)
{
    nghttp2_session_callbacks *cbs;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, SW_MAX_STREAMS},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, SW_STREAM_WINDOW},
        {NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL, 1},
    };
    int rv;

    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return -1;
    nghttp2_session_callbacks_set_send_callback(cbs, h2_on_send);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, h2_on_frame_recv);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, h2_on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, h2_on_stream_close);
    rv = nghttp2_session_server_new(&c->h2, cbs, c);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0)
        return -1;
    if (nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0])) != 0 ||
        nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, SW_CONN_WINDOW) != 0)
        return -1;
    return 0;
}

/* Runs nghttp2's output into binary messages; closes a drained connection.
 * Never called from inside an nghttp2 callback. */
static void conn_flush(struct sw_conn *c)
{
    int rv;

    if (c->h2 == NULL || c->ws == NULL || (c->st != SW_C_UP && c->st != SW_C_DRAINING))
        return;
    rv = nghttp2_session_send(c->h2);
    if (evbuffer_get_length(c->out) > 0)
        (void)ws_send_binary_buffer(c->ws, c->out, evbuffer_get_length(c->out));
    if (rv != 0) {
        ws_close(c->ws, 4000, "protocol_error");
        conn_lost(c, nghttp2_strerror(rv));
        return;
    }
    if (c->st == SW_C_DRAINING && c->nstreams == 0 && !nghttp2_session_want_write(c->h2)) {
        ws_close(c->ws, WS_CLOSE_NORMAL, "drained");
        c->st = SW_C_CLOSING;
    }
}

/* ---- control messages ------------------------------------------------------ */

static int send_msg(struct sw_conn *c, const struct tun_msg *m)
{
    size_t len = 0;
    char *text = tun_msg_encode(m, &len);
    int rc = -1;

    if (text == NULL)
        return -1;
    if (c->ws != NULL)
        rc = ws_send_text(c->ws, text, len);
    free(text);
    return rc;
}

static void send_auth(struct sw_conn *c, const char *nonce)
{
    struct sw_ctx *ctx = c->ctx;
    struct sw_tun *t = c->t;
    struct tun_msg *m = calloc(1, sizeof(*m)); /* ~25 KiB: not on the stack */
    struct tun_msg_agent_auth *e;
    char text[TUN_SIGNED_TEXT_MAX];
    uint8_t sig[ID_SIG_LEN];
    int64_t ts = util_unix_time();
    int n;

    if (m == NULL) {
        conn_fail(c, SW_F_WS, "out of memory", false);
        return;
    }
    tun_msg_init(m, TUN_MSG_AUTH, TUN_MODE_NATIVE);
    memcpy(m->auth.nonce, nonce, sizeof(m->auth.nonce));
    m->auth.timestamp = ts;
    (void)util_snprintf(m->auth.instance, sizeof(m->auth.instance), "sw%s-%" PRIu64, ctx->run_id,
                        t->idx);
    e = &m->auth.agents[0];
    memcpy(e->addr, t->key.addr, ID_ADDR_LEN);
    n = tun_msg_native_signed_text(text, sizeof(text), ctx->cfg->host, e->addr, nonce, ts);
    if (n < 0 || id_sign(&t->key, text, (size_t)n, sig) != ID_OK) {
        free(m);
        conn_fail(c, SW_F_AUTH_ERROR, "cannot sign (domain not usable?)", true);
        return;
    }
    id_sig_to_str(sig, e->sig);
    m->auth.n_agents = 1;
    if (send_msg(c, m) != 0) {
        free(m);
        conn_fail(c, SW_F_WS, "cannot send auth", false);
        return;
    }
    free(m);
    c->auth_sent = true;
}

static void on_auth_ok(struct sw_conn *c, const struct tun_msg_auth_ok *ok)
{
    struct sw_tun *t = c->t;
    bool mine = false;
    uint64_t now = util_mono_ms();

    for (size_t i = 0; i < ok->n_agents; i++)
        if (memcmp(ok->agents[i].addr, t->key.addr, ID_ADDR_LEN) == 0)
            mine = true;
    if (!mine) {
        const char *code = ok->n_rejected > 0 ? ok->rejected[0].error : "not_accepted";
        char why[SW_ERR_MAX];
        (void)util_snprintf(why, sizeof(why), "rejected: %s", code);
        conn_fail(c, SW_F_AUTH_ERROR, why, code_is_permanent(code));
        return;
    }
    c->ping_s = ok->ping_interval_s >= 1 && ok->ping_interval_s <= 3600 ? ok->ping_interval_s
                                                                        : SW_DEFAULT_PING_S;
    c->next_ping_ms = now + (uint64_t)c->ping_s * 1000u;
    if (h2_start(c) != 0) {
        conn_fail(c, SW_F_WS, "cannot start HTTP/2", false);
        return;
    }
    c->st = SW_C_UP;
    conn_handshake_done(c);
    t->up_ms = now;
    tun_set_state(t, SW_T_UP);
    ctx_on_up(c->ctx);
    conn_flush(c);
}

static void on_agent_removed(struct sw_conn *c, const struct tun_msg_agent_removed *r)
{
    struct sw_tun *t = c->t;

    /* replaced: our own newer connection took the address (PROTOCOL.md 7.4) */
    if (r->reason == TUN_REASON_REPLACED || r->reason == TUN_REASON_REMOVED ||
        r->reason == TUN_REASON_NONE || c->st != SW_C_UP || t == NULL || t->conn != c)
        return;
    c->ctx->total.removed++;
    LOG_WARN(c->ctx->log, "agent_removed", LOG_S("addr", t->addr),
             LOG_S("reason", r->reason_str[0] != '\0' ? r->reason_str : "superseded"));
    /* superseded / not_allowed: tunnel-agent stops the agent */
    conn_kill(c);
    tun_left_up(t);
    tun_set_state(t, SW_T_STOPPED);
}

static void ws_on_text(void *arg, const char *data, size_t len)
{
    struct sw_conn *c = arg;
    struct tun_msg *m;
    const char *code = NULL;

    if (c->st == SW_C_DEAD)
        return;
    m = malloc(sizeof(*m)); /* ~25 KiB: not on the stack */
    if (m == NULL)
        return;
    if (tun_msg_decode(data, len, TUN_MODE_NATIVE, m, &code) != 0) {
        LOG_DEBUG(c->ctx->log, "bad_message", LOG_S("err", code), LOG_U("bytes", len));
        free(m);
        return;
    }
    switch (m->type) {
    case TUN_MSG_CHALLENGE:
        if (c->st == SW_C_AUTH && !c->auth_sent)
            send_auth(c, m->challenge.nonce);
        break;
    case TUN_MSG_AUTH_OK:
        if (c->st == SW_C_AUTH && c->auth_sent)
            on_auth_ok(c, &m->auth_ok);
        break;
    case TUN_MSG_AUTH_ERROR:
        if (c->st == SW_C_AUTH)
            conn_fail(c, SW_F_AUTH_ERROR, m->error.code, code_is_permanent(m->error.code));
        break;
    case TUN_MSG_AGENT_REMOVED:
        on_agent_removed(c, &m->agent_removed);
        break;
    case TUN_MSG_DRAINING:
        conn_drain(c, "draining");
        conn_flush(c);
        break;
    case TUN_MSG_ERROR:
        LOG_WARN(c->ctx->log, "gateway_error", LOG_S("err", m->error.code));
        break;
    default:
        break;
    }
    tun_msg_clear(m);
    free(m);
}

/* ---- WebSocket ------------------------------------------------------------- */

static int ws_on_binary(void *arg, const uint8_t *data, size_t len)
{
    struct sw_conn *c = arg;
    ssize_t rv;

    if (c->st == SW_C_DEAD || c->st == SW_C_CLOSING)
        return 0;
    if (c->h2 == NULL) {
        ws_close(c->ws, 4000, "protocol_error");
        conn_fail(c, SW_F_WS, "binary data before auth_ok", false);
        return 0;
    }
    rv = nghttp2_session_mem_recv(c->h2, data, len);
    if (rv < 0) {
        ws_close(c->ws, 4000, "protocol_error");
        conn_lost(c, nghttp2_strerror((int)rv));
        return 0;
    }
    conn_flush(c);
    return 0;
}

static void ws_on_close(void *arg, int code, const char *reason)
{
    struct sw_conn *c = arg;
    char why[SW_ERR_MAX];

    (void)util_snprintf(why, sizeof(why), "websocket closed %d %s", code, reason);
    if (c->st == SW_C_AUTH)
        conn_fail(c, SW_F_WS, why, false);
    else
        conn_lost(c, why);
}

static void ws_on_writable(void *arg)
{
    struct sw_conn *c = arg;

    if (c->st != SW_C_DEAD)
        conn_flush(c);
}

static const struct ws_callbacks sw_ws_cbs = {
    .on_text = ws_on_text,
    .on_binary = ws_on_binary,
    .on_close = ws_on_close,
    .on_writable = ws_on_writable,
};

/* ---- dial, TLS, upgrade ------------------------------------------------------ */

static void up_on_read(struct bufferevent *bev, void *arg)
{
    struct sw_conn *c = arg;
    char err[256];
    int status = 0;
    int rc;

    if (c->st == SW_C_TLS)
        c->st = SW_C_UPGRADE; /* bytes after the handshake: it is done */
    rc = ws_client_parse_response(bufferevent_get_input(bev), c->ws_key, TUN_SUBPROTOCOL, &status,
                                  err, sizeof(err));
    if (rc == 1)
        return;
    if (rc != 0) {
        conn_fail(c, SW_F_WS, err, false);
        return;
    }
    c->ws = ws_conn_new(c->ctx->base, bev, true, TUN_CTL_MAX_BYTES, &sw_ws_cbs, c);
    c->bev = NULL; /* the WebSocket owns it now, also on failure */
    if (c->ws == NULL) {
        conn_fail(c, SW_F_WS, "out of memory", false);
        return;
    }
    c->st = SW_C_AUTH;
}

static void up_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct sw_conn *c = arg;
    char why[SW_ERR_MAX];

    if (what & BEV_EVENT_CONNECTED) {
        if (c->st == SW_C_TLS)
            c->st = SW_C_UPGRADE;
        return;
    }
    if (c->st == SW_C_TLS) {
        SSL *ssl = bufferevent_openssl_get_ssl(bev);
        long vr = ssl != NULL ? SSL_get_verify_result(ssl) : X509_V_OK;
        unsigned long e = bufferevent_get_openssl_error(bev);
        if (vr != X509_V_OK) {
            (void)util_snprintf(why, sizeof(why), "certificate verification failed: %s",
                                X509_verify_cert_error_string(vr));
        } else if (e != 0) {
            char buf[120];
            ERR_error_string_n(e, buf, sizeof(buf));
            (void)util_snprintf(why, sizeof(why), "%s", buf);
        } else {
            (void)util_snprintf(why, sizeof(why), "%s during the handshake",
                                (what & BEV_EVENT_EOF) ? "connection closed" : "connection error");
        }
        tls_drain_errors();
        conn_fail(c, SW_F_TLS, why, false);
        return;
    }
    tls_drain_errors();
    (void)util_snprintf(why, sizeof(why), "%s before the 101",
                        (what & BEV_EVENT_EOF) ? "connection closed" : "connection error");
    conn_fail(c, SW_F_WS, why, false);
}

/* TCP is up: TLS (wss://) and the upgrade request. */
static void conn_connected(struct sw_conn *c)
{
    struct sw_ctx *ctx = c->ctx;
    evutil_socket_t fd = c->fd;
    int one = 1;

    if (ctx->cyc.active && ctx->cyc.listener_ms == 0)
        ctx->cyc.listener_ms = util_mono_ms();
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->fd = -1; /* the bufferevent owns it from here, also on failure */
    if (ctx->ssl_ctx != NULL) {
        SSL *ssl = SSL_new(ctx->ssl_ctx);
        if (ssl == NULL || tls_client_prepare(ssl, ctx->cfg->host) != 0) {
            SSL_free(ssl);
            evutil_closesocket(fd);
            tls_drain_errors();
            conn_fail(c, SW_F_TLS, "TLS setup failed", false);
            return;
        }
        c->bev = bufferevent_openssl_socket_new(ctx->base, fd, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
        if (c->bev != NULL)
            bufferevent_openssl_set_allow_dirty_shutdown(c->bev, 1);
        c->st = SW_C_TLS;
    } else {
        c->bev =
            bufferevent_socket_new(ctx->base, fd, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
        c->st = SW_C_UPGRADE;
    }
    if (c->bev == NULL) {
        evutil_closesocket(fd);
        conn_fail(c, SW_F_CONNECT, "out of memory", false);
        return;
    }
    bufferevent_setcb(c->bev, up_on_read, NULL, up_on_event, c);
    if (ws_client_key(c->ws_key) != 0 ||
        ws_client_request(bufferevent_get_output(c->bev), ctx->host_port, TUN_CONNECT_PATH,
                          c->ws_key, TUN_SUBPROTOCOL, NULL) != 0) {
        conn_fail(c, SW_F_WS, "cannot build the upgrade request", false);
        return;
    }
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
}

static void on_dial(evutil_socket_t fd, short what, void *arg)
{
    struct sw_conn *c = arg;
    int err = c->dial_errno;
    socklen_t len = sizeof(err);
    char why[SW_ERR_MAX];

    event_free(c->dial_ev);
    c->dial_ev = NULL;
    if (err == 0 && (what & EV_TIMEOUT))
        err = ETIMEDOUT;
    if (err == 0 && getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        err = errno;
    if (err == 0) {
        conn_connected(c);
        return;
    }
    (void)util_snprintf(why, sizeof(why), "connect: %s", strerror(err));
    conn_fail(c,
              err == ECONNREFUSED ? SW_F_REFUSED
              : err == ETIMEDOUT  ? SW_F_TIMEOUT
                                  : SW_F_CONNECT,
              why, false);
}

/* Starts one connection attempt of t. Failures are reported from the loop. */
static void tun_connect(struct sw_tun *t)
{
    struct sw_ctx *ctx = t->ctx;
    struct sw_conn *c = calloc(1, sizeof(*c));
    struct timeval tv = {SW_DIAL_TIMEOUT_MS / 1000u, 0};

    tun_set_state(t, SW_T_CONNECTING);
    if (c == NULL)
        goto fail;
    c->ctx = ctx;
    c->t = t;
    c->fd = -1;
    c->st = SW_C_DIAL;
    c->start_ms = util_mono_ms();
    c->out = evbuffer_new();
    if (c->out == NULL)
        goto fail_conn;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        c->dial_errno = errno;
    else if (connect(c->fd, (const struct sockaddr *)&ctx->cfg->dial, sizeof(ctx->cfg->dial)) !=
                 0 &&
             errno != EINPROGRESS)
        c->dial_errno = errno;
    c->dial_ev = event_new(ctx->base, c->fd, EV_WRITE, on_dial, c);
    if (c->dial_ev == NULL)
        goto fail_conn;
    t->conn = c;
    c->handshaking = true;
    ctx->handshaking++;
    if (c->dial_errno != 0)
        event_active(c->dial_ev, EV_WRITE, 0);
    else
        event_add(c->dial_ev, &tv);
    return;

fail_conn:
    if (c->fd >= 0)
        evutil_closesocket(c->fd);
    if (c->out != NULL)
        evbuffer_free(c->out);
    free(c);
fail:
    ctx->total.fail[SW_F_CONNECT]++;
    (void)util_snprintf(ctx->last_err, sizeof(ctx->last_err), "connect: out of memory");
    tun_retry(t);
}

/* ---- timers ---------------------------------------------------------------- */

static void on_ramp(evutil_socket_t fd, short what, void *arg)
{
    struct sw_ctx *ctx = arg;
    const struct sw_cfg *cfg = ctx->cfg;

    while (ctx->next_start < ctx->n) {
        if (ctx->handshaking >= cfg->max_handshakes)
            return; /* conn_handshake_done() kicks again */
        if (cfg->rate > 0) {
            uint64_t elapsed = util_mono_ms() - ctx->start_ms;
            uint64_t due_ms = (uint64_t)ctx->next_start * 1000u / cfg->rate;
            if (due_ms > elapsed) {
                uint64_t d = due_ms - elapsed;
                struct timeval tv = {(time_t)(d / 1000u), (suseconds_t)((d % 1000u) * 1000u)};
                evtimer_add(ctx->ramp_ev, &tv);
                return;
            }
        }
        tun_connect(&ctx->tuns[ctx->next_start++]);
    }
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct sw_ctx *ctx = arg;
    uint64_t now = util_mono_ms();

    for (size_t i = 0; i < ctx->n; i++) {
        struct sw_tun *t = &ctx->tuns[i];
        struct sw_conn *c = t->conn;

        if (t->old != NULL && now - t->old->drain_ms > SW_DRAIN_MAX_MS)
            conn_kill(t->old);
        if (c == NULL)
            continue;
        if (c->handshaking) {
            if (now - c->start_ms > SW_AUTH_TIMEOUT_MS)
                conn_fail(c, SW_F_TIMEOUT, "no auth_ok within 20 s", false);
            continue;
        }
        if (c->st != SW_C_UP)
            continue;
        /* PROTOCOL.md 5.9: silent for 3 ping intervals is dead */
        if (now - ws_last_rx_ms(c->ws) > 3u * 1000u * (uint64_t)c->ping_s) {
            ws_close(c->ws, WS_CLOSE_INTERNAL, "keepalive_timeout");
            conn_lost(c, "keepalive_timeout");
            continue;
        }
        if (now >= c->next_ping_ms) {
            uint8_t opaque[8];
            for (size_t k = 0; k < 8; k++)
                opaque[k] = (uint8_t)(now >> (56 - 8 * k));
            c->next_ping_ms = now + (uint64_t)c->ping_s * 1000u;
            nghttp2_submit_ping(c->h2, NGHTTP2_FLAG_NONE, opaque);
            conn_flush(c);
        }
    }
}

static void on_status(evutil_socket_t fd, short what, void *arg) { print_status(arg, "status"); }

static void ctx_stop(struct sw_ctx *ctx, const char *reason)
{
    if (ctx->status_ev != NULL)
        event_del(ctx->status_ev);
    print_status(ctx, "exit");
    LOG_INFO(ctx->log, "exit", LOG_S("reason", reason), LOG_U("up", ctx->up));
    event_base_loopexit(ctx->base, NULL);
}

static void on_duration(evutil_socket_t fd, short what, void *arg) { ctx_stop(arg, "duration"); }

static void on_signal(evutil_socket_t sig, short what, void *arg) { ctx_stop(arg, "signal"); }

/* ---- keys ------------------------------------------------------------------ */

/* priv = keccak256(seed || uint32_be(idx)), re-hashed in the (2^-128) case of
 * an invalid scalar. Returns 0 or -1. */
static int key_derive(struct id_key *k, const char *seed, uint64_t idx)
{
    struct keccak_ctx kc;
    uint8_t be[4] = {(uint8_t)(idx >> 24), (uint8_t)(idx >> 16), (uint8_t)(idx >> 8), (uint8_t)idx};
    uint8_t priv[KECCAK256_LEN];
    int rc = -1;

    keccak_init(&kc);
    keccak_update(&kc, seed, strlen(seed));
    keccak_update(&kc, be, sizeof(be));
    keccak_final(&kc, priv);
    for (int tries = 0; tries < 4; tries++) {
        if (id_key_from_priv(k, priv) == ID_OK) {
            rc = 0;
            break;
        }
        keccak256(priv, sizeof(priv), priv);
    }
    OPENSSL_cleanse(priv, sizeof(priv));
    return rc;
}

/* ---- setup and teardown ----------------------------------------------------- */

static void ctx_cleanup(struct sw_ctx *ctx)
{
    if (ctx->tuns != NULL) {
        for (size_t i = 0; i < ctx->n; i++) {
            struct sw_tun *t = &ctx->tuns[i];
            if (t->conn != NULL)
                conn_kill(t->conn);
            if (t->old != NULL)
                conn_kill(t->old);
            if (t->retry_ev != NULL)
                event_free(t->retry_ev);
            id_key_clear(&t->key);
        }
    }
    on_reap(-1, 0, ctx);
    free(ctx->tuns);
    ctx->tuns = NULL;
    struct event **evs[] = {&ctx->tick_ev,     &ctx->status_ev, &ctx->ramp_ev,   &ctx->reap_ev,
                            &ctx->duration_ev, &ctx->sigint_ev, &ctx->sigterm_ev};
    for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++) {
        if (*evs[i] != NULL)
            event_free(*evs[i]);
        *evs[i] = NULL;
    }
    SSL_CTX_free(ctx->ssl_ctx);
    ctx->ssl_ctx = NULL;
    if (ctx->base != NULL)
        event_base_free(ctx->base);
    ctx->base = NULL;
    log_free(ctx->log);
    ctx->log = NULL;
}

/* Soft RLIMIT_NOFILE up to the hard limit; enough for one socket per tunnel?
 * Returns 0 or -1 with a message on stderr. */
static int raise_nofile(uint64_t count)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        perror("tunnel-bench-swarm: getrlimit");
        return -1;
    }
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
        (void)getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur != RLIM_INFINITY && count + SW_FD_SPARE > (uint64_t)rl.rlim_cur) {
        fprintf(stderr,
                "tunnel-bench-swarm: %" PRIu64 " tunnels need %" PRIu64
                " descriptors; RLIMIT_NOFILE allows %" PRIu64 " (hard limit)\n",
                count, count + SW_FD_SPARE, (uint64_t)rl.rlim_cur);
        return -1;
    }
    return 0;
}

static int ctx_init(struct sw_ctx *ctx, const struct sw_cfg *cfg)
{
    struct timeval sec = {1, 0};
    uint8_t rid[4];
    char err[256];

    memset(ctx, 0, sizeof(*ctx));
    ctx->cfg = cfg;
    ctx->n = (size_t)cfg->count;
    ctx->log = log_new("tunnel-bench-swarm", cfg->log_level, LOG_FMT_TEXT, 2);
    if (ctx->log == NULL || util_rand_bytes(rid, sizeof(rid)) != 0)
        return -1;
    util_hex_encode(rid, sizeof(rid), ctx->run_id);
    if ((cfg->tls && cfg->port == 443) || (!cfg->tls && cfg->port == 80))
        (void)util_snprintf(ctx->host_port, sizeof(ctx->host_port), "%s", cfg->host);
    else
        (void)util_snprintf(ctx->host_port, sizeof(ctx->host_port), "%s:%u", cfg->host,
                            (unsigned)cfg->port);
    if (cfg->tls) {
        ctx->ssl_ctx = tls_client_ctx_new(cfg->ca_file, "http/1.1", err, sizeof(err));
        if (ctx->ssl_ctx == NULL) {
            fprintf(stderr, "tunnel-bench-swarm: %s\n", err);
            return -1;
        }
    }
    ctx->base = event_base_new();
    if (ctx->base == NULL)
        return -1;
    ctx->tuns = calloc(ctx->n, sizeof(*ctx->tuns));
    if (ctx->tuns == NULL)
        return -1;
    for (size_t i = 0; i < ctx->n; i++) {
        struct sw_tun *t = &ctx->tuns[i];
        t->ctx = ctx;
        t->idx = cfg->first + i;
        t->backoff_ms = SW_BACKOFF_MIN_MS;
        t->retry_ev = evtimer_new(ctx->base, tun_on_retry, t);
        if (t->retry_ev == NULL || key_derive(&t->key, cfg->seed, t->idx) != 0)
            return -1;
        id_addr_to_str(t->key.addr, t->addr);
    }
    ctx->tick_ev = event_new(ctx->base, -1, EV_PERSIST, on_tick, ctx);
    ctx->ramp_ev = evtimer_new(ctx->base, on_ramp, ctx);
    ctx->reap_ev = event_new(ctx->base, -1, 0, on_reap, ctx);
    ctx->duration_ev = evtimer_new(ctx->base, on_duration, ctx);
    ctx->sigint_ev = evsignal_new(ctx->base, SIGINT, on_signal, ctx);
    ctx->sigterm_ev = evsignal_new(ctx->base, SIGTERM, on_signal, ctx);
    if (ctx->tick_ev == NULL || ctx->ramp_ev == NULL || ctx->reap_ev == NULL ||
        ctx->duration_ev == NULL || ctx->sigint_ev == NULL || ctx->sigterm_ev == NULL)
        return -1;
    if (cfg->status_ms > 0) {
        struct timeval st = {(time_t)(cfg->status_ms / 1000u),
                             (suseconds_t)((cfg->status_ms % 1000u) * 1000u)};
        ctx->status_ev = event_new(ctx->base, -1, EV_PERSIST, on_status, ctx);
        if (ctx->status_ev == NULL)
            return -1;
        event_add(ctx->status_ev, &st);
    }
    struct timeval dur = {(time_t)cfg->duration_s, 0};
    event_add(ctx->tick_ev, &sec);
    event_add(ctx->duration_ev, &dur);
    event_add(ctx->sigint_ev, NULL);
    event_add(ctx->sigterm_ev, NULL);
    return 0;
}

/* ---- command line ------------------------------------------------------------ */

static void usage(FILE *f)
{
    fprintf(f, "usage: tunnel-bench-swarm --gateway ws[s]://HOST[:PORT] [--connect-host IPV4]\n"
               "         [--ca FILE] [--count N] [--first I] [--seed S] [--rate R]\n"
               "         [--max-handshakes K] [--duration S] [--status-ms MS]\n"
               "         [--log-level debug|info|warn|error]\n"
               "       tunnel-bench-swarm --print-addresses [--count N] [--first I] [--seed S]\n"
               "\n"
               "Swarm client of bench/run: opens N native tunnels (tunnel-h2.v1) to a\n"
               "tunnel-gateway, each as its own agent (own key and instance id), and keeps\n"
               "them registered; every request routed to one gets 200\n"
               "\"tunnel-bench-swarm <index> <address>\\n\". Reconnects as tunnel-agent does:\n"
               "backoff 1 s doubling to 60 s with +-20 %% jitter, reset after 60 s up; at once\n"
               "on a gateway drain (GOAWAY / draining); never after a permanent auth error.\n"
               "\n"
               "  --gateway URL        ws:// or wss:// URL; its host is the Host header, the\n"
               "                       TLS name (SNI, verified) and the signed domain\n"
               "  --connect-host IPV4  dial this address (default: the URL host, which must\n"
               "                       then be an IPv4 address, or localhost = 127.0.0.1)\n"
               "  --ca FILE            trust anchors for wss:// (default: the system store)\n"
               "  --count N            tunnels (default 1)\n"
               "  --first I            key index of the first tunnel (default 0)\n"
               "  --seed S             key seed (default tunnel-bench-swarm); the key of index\n"
               "                       i is keccak256(S || uint32_be(i))\n"
               "  --rate R             initial connects per second (default 0 = no cap)\n"
               "  --max-handshakes K   initial ramp: at most K connections between dial and\n"
               "                       auth_ok (default 200); reconnects are not capped\n"
               "  --duration S         exit after S seconds (default 600)\n"
               "  --status-ms MS       status line period (default 1000; 0 = none)\n"
               "  --print-addresses    print the N addresses (lowercase, one a line), exit\n"
               "\n"
               "Prints one JSON object per line on stdout, each with \"event\" and \"t_ms\"\n"
               "(CLOCK_MONOTONIC ms): all_up (count, elapsed_ms since start), status (up,\n"
               "connecting, waiting, stopped, draining, registrations, drops, failures by\n"
               "kind, last_error), drop (the first registered tunnel lost after all_up),\n"
               "recovered (all registered again: from_drop_ms, from_listener_ms = from the\n"
               "first TCP connect that succeeded after the last refused one, registrations,\n"
               "regs_per_s, failures by kind during the cycle) and exit (as status).\n"
               "Failure kinds: refused, connect, timeout, tls, ws (upgrade refused or closed\n"
               "before auth_ok), auth_error. Exits 0 on SIGTERM/SIGINT or after --duration,\n"
               "1 if it cannot start, 2 on a usage error.\n"
               "Raises its soft RLIMIT_NOFILE to the hard limit.\n");
}

/* Parses ws[s]://HOST[:PORT][/] into cfg. Returns 0 or -1. */
static int parse_gateway(const char *url, struct sw_cfg *cfg)
{
    const char *p;
    const char *end;
    const char *colon;
    size_t hlen;
    uint64_t port;

    if (strncmp(url, "wss://", 6) == 0) {
        cfg->tls = true;
        p = url + 6;
    } else if (strncmp(url, "ws://", 5) == 0) {
        cfg->tls = false;
        p = url + 5;
    } else {
        return -1;
    }
    end = p + strcspn(p, "/");
    if (*end != '\0' && strcmp(end, "/") != 0)
        return -1;
    colon = memchr(p, ':', (size_t)(end - p));
    hlen = (size_t)((colon != NULL ? colon : end) - p);
    if (hlen == 0 || hlen >= sizeof(cfg->host))
        return -1;
    memcpy(cfg->host, p, hlen);
    cfg->host[hlen] = '\0';
    for (size_t i = 0; i < hlen; i++)
        if (cfg->host[i] >= 'A' && cfg->host[i] <= 'Z')
            cfg->host[i] = (char)(cfg->host[i] - 'A' + 'a');
    if (colon != NULL) {
        if (util_parse_u64(colon + 1, (size_t)(end - colon - 1), &port) != 0 || port == 0 ||
            port > 65535)
            return -1;
    } else {
        port = cfg->tls ? 443 : 80;
    }
    cfg->port = (uint16_t)port;
    return 0;
}

static int parse_args(int argc, char **argv, struct sw_cfg *cfg)
{
    const char *gateway = NULL;
    const char *connect_host = NULL;

    cfg->seed = "tunnel-bench-swarm";
    cfg->count = 1;
    cfg->max_handshakes = 200;
    cfg->duration_s = 600;
    cfg->status_ms = 1000;
    cfg->log_level = LOG_LVL_WARN;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = 0;
        if (strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        } else if (strcmp(a, "--print-addresses") == 0) {
            cfg->print_addresses = true;
            continue;
        } else if (v == NULL) {
            rc = -1;
        } else if (strcmp(a, "--gateway") == 0) {
            gateway = v;
        } else if (strcmp(a, "--connect-host") == 0) {
            connect_host = v;
        } else if (strcmp(a, "--ca") == 0) {
            cfg->ca_file = v;
        } else if (strcmp(a, "--seed") == 0) {
            cfg->seed = v;
        } else if (strcmp(a, "--count") == 0) {
            rc = util_parse_uint(v, SW_MAX_COUNT, &cfg->count);
        } else if (strcmp(a, "--first") == 0) {
            rc = util_parse_uint(v, UINT32_MAX, &cfg->first);
        } else if (strcmp(a, "--rate") == 0) {
            rc = util_parse_uint(v, 1000000, &cfg->rate);
        } else if (strcmp(a, "--max-handshakes") == 0) {
            rc = util_parse_uint(v, SW_MAX_COUNT, &cfg->max_handshakes);
        } else if (strcmp(a, "--duration") == 0) {
            rc = util_parse_uint(v, 86400, &cfg->duration_s);
        } else if (strcmp(a, "--status-ms") == 0) {
            rc = util_parse_uint(v, 3600000, &cfg->status_ms);
        } else if (strcmp(a, "--log-level") == 0) {
            rc = log_parse_level(v, &cfg->log_level);
        } else {
            rc = -1;
        }
        if (rc != 0) {
            fprintf(stderr, "tunnel-bench-swarm: bad option or value: %s\n", a);
            return -1;
        }
        i++;
    }
    if (cfg->count == 0 || cfg->first + cfg->count - 1 > UINT32_MAX) {
        fprintf(stderr, "tunnel-bench-swarm: want --count >= 1 and first + count <= 2^32\n");
        return -1;
    }
    if (cfg->print_addresses)
        return 0;
    if (gateway == NULL || parse_gateway(gateway, cfg) != 0) {
        fprintf(stderr, "tunnel-bench-swarm: need --gateway ws[s]://HOST[:PORT]\n");
        return -1;
    }
    if (cfg->max_handshakes == 0 || cfg->duration_s == 0) {
        fprintf(stderr, "tunnel-bench-swarm: --max-handshakes and --duration must be >= 1\n");
        return -1;
    }
    if (connect_host == NULL)
        connect_host = strcmp(cfg->host, "localhost") == 0 ? "127.0.0.1" : cfg->host;
    memset(&cfg->dial, 0, sizeof(cfg->dial));
    cfg->dial.sin_family = AF_INET;
    cfg->dial.sin_port = htons(cfg->port);
    if (inet_pton(AF_INET, connect_host, &cfg->dial.sin_addr) != 1) {
        fprintf(stderr, "tunnel-bench-swarm: --connect-host wants an IPv4 address: %s\n",
                connect_host);
        return -1;
    }
    return 0;
}

static int print_addresses(const struct sw_cfg *cfg)
{
    struct id_key k;
    char addr[ID_ADDR_STR_LEN + 1];

    for (uint64_t i = 0; i < cfg->count; i++) {
        if (key_derive(&k, cfg->seed, cfg->first + i) != 0) {
            fprintf(stderr, "tunnel-bench-swarm: key derivation failed at %" PRIu64 "\n", i);
            return 1;
        }
        id_addr_to_str(k.addr, addr);
        printf("%s\n", addr);
    }
    id_key_clear(&k);
    return 0;
}

int main(int argc, char **argv)
{
    struct sw_cfg cfg;
    struct sw_ctx ctx;
    int rc = 1;

    memset(&cfg, 0, sizeof(cfg));
    if (parse_args(argc, argv, &cfg) != 0) {
        usage(stderr);
        return 2;
    }
    if (cfg.print_addresses)
        return print_addresses(&cfg);
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (raise_nofile(cfg.count) != 0)
        return 1;
    if (ctx_init(&ctx, &cfg) != 0) {
        fprintf(stderr, "tunnel-bench-swarm: setup failed (out of memory or key derivation)\n");
        goto out;
    }
    LOG_INFO(ctx.log, "start", LOG_U("count", ctx.n), LOG_S("host", cfg.host),
             LOG_U("port", cfg.port));
    ctx.start_ms = util_mono_ms();
    event_active(ctx.ramp_ev, 0, 0);
    if (event_base_dispatch(ctx.base) == 0)
        rc = 0;
out:
    ctx_cleanup(&ctx);
    return rc;
}
