/* tunnel-bench-ws: the WebSocket load client of bench/run. Opens N
 * connections (TLS for wss://) to a WebSocket echo endpoint (GET /ws on
 * tunnel-bench-origin) through whatever proxy the URL names, keeps K binary
 * messages of S bytes in flight on each, and measures over a fixed window,
 * after a warm-up, the echoes per second, the payload MB/s and each message's
 * round trip; the window ends at a duration or a message count, whichever
 * comes first. Every echo is checked byte for byte. Prints one JSON object on
 * stdout. One struct wsb_ctx holds all state; common/ws does the framing. */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <http_parser.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "tls.h"
#include "util.h"
#include "ws.h"

#define WSB_MAX_CONNS 10000u
#define WSB_MAX_INFLIGHT 1024u
#define WSB_MIN_SIZE 8u                    /* the sequence number */
#define WSB_MAX_SIZE (16u * 1024u * 1024u) /* tunnel-bench-origin's cap */
#define WSB_MAX_MESSAGES 100000000u
#define WSB_LAT_MAX_SAMPLES 20000000u /* 80 MB of uint32 */
#define WSB_CONNECT_TIMEOUT_MS 10000u /* all connections up, or start with those that are */
#define WSB_DRAIN_TIMEOUT_MS 5000u    /* echoes still missing then are lost */
#define WSB_MAX_TEXT 1024u            /* the echo never sends text; a stray one is an error */
#define WSB_HOST_MAX 256u
#define WSB_PATH_MAX 1024u
#define WSB_ERRORS_KEPT 5u
#define WSB_ERROR_LEN 200u

struct wsb_cfg {
    char host[WSB_HOST_MAX];          /* URL host: SNI, Host header, certificate name */
    uint16_t port;                    /* URL port */
    char host_port[WSB_HOST_MAX + 8]; /* Host header value */
    char path[WSB_PATH_MAX];          /* URL path and query, e.g. /ws */
    bool tls;                         /* wss:// */
    struct sockaddr_in dial;          /* where to connect (URL host or --connect) */
    const char *cacert;               /* CA file; NULL: no verification */
    uint64_t conns;                   /* connections */
    uint64_t size;                    /* bytes per message */
    uint64_t inflight;                /* messages in flight per connection */
    uint64_t warmup_ms;               /* sending, not counted, before the window */
    uint64_t duration_ms;             /* the measured window */
    uint64_t max_messages;            /* the window ends early after this many echoes */
    uint64_t timeout_s;               /* the whole run */
};

enum wsb_phase {
    WSB_P_CONNECT = 0, /* dialling, TLS, upgrade */
    WSB_P_WARMUP,      /* sending; echoes not counted */
    WSB_P_MEASURE,     /* sending; echoes counted */
    WSB_P_DRAIN,       /* no new messages; waiting for the echoes in flight */
    WSB_P_CLOSE,       /* closing handshakes */
};

static const char *const wsb_phase_names[] = {
    [WSB_P_CONNECT] = "connect", [WSB_P_WARMUP] = "warmup", [WSB_P_MEASURE] = "measure",
    [WSB_P_DRAIN] = "drain",     [WSB_P_CLOSE] = "close",
};

enum wsb_conn_state {
    WSB_C_CONNECTING = 0, /* bev: TCP, TLS, upgrade request and response */
    WSB_C_OPEN,           /* ws: echoing */
    WSB_C_CLOSING,        /* ws: our close frame sent */
    WSB_C_DONE,           /* closed or failed; bev and ws freed */
};

struct wsb_conn;

struct wsb_ctx {
    const struct wsb_cfg *cfg;                   /* borrowed; immutable */
    struct event_base *base;                     /* owned */
    SSL_CTX *ssl_ctx;                            /* owned; NULL for ws:// */
    struct event *timeout_ev;                    /* owned; the whole run */
    struct event *phase_ev;                      /* owned; ends the current phase */
    struct wsb_conn *conns;                      /* owned; cfg->conns entries */
    uint8_t *payload;                            /* owned; cfg->size bytes, seq in 0..7 */
    enum wsb_phase phase;                        /* where the run is */
    uint64_t settled;                            /* connections up or failed (connect phase) */
    uint64_t up;                                 /* connections that got their 101 */
    uint64_t live;                               /* connections not WSB_C_DONE */
    uint64_t inflight;                           /* messages sent, echo pending, all conns */
    uint64_t t_start_us;                         /* window start, CLOCK_MONOTONIC us */
    uint64_t t_end_us;                           /* window end */
    uint64_t messages;                           /* echoes completed in the window */
    uint64_t messages_total;                     /* echoes completed, warm-up and drain too */
    uint64_t lost;                               /* echoes never completed */
    uint32_t *lat_us;                            /* owned; round trips in the window */
    size_t nlat;                                 /* entries in lat_us */
    size_t lat_cap;                              /* allocated entries */
    char errors[WSB_ERRORS_KEPT][WSB_ERROR_LEN]; /* first errors, for the report */
    size_t nerrors;                              /* errors seen (only the first few kept) */
};

/* One WebSocket connection; owned by the ctx's array. */
struct wsb_conn {
    struct wsb_ctx *ctx;     /* borrowed back-pointer */
    size_t idx;              /* index in ctx->conns, for errors */
    struct bufferevent *bev; /* owned until the upgrade, then ws owns it */
    struct ws_conn *ws;      /* owned after the upgrade */
    enum wsb_conn_state st;  /* see enum */
    bool failed;             /* an error was reported: on_close adds none */
    int status;              /* HTTP status of the upgrade answer, 0 before */
    char key[25];            /* Sec-WebSocket-Key */
    uint64_t sent;           /* messages sent; the next one's sequence number */
    uint64_t echoed;         /* messages echoed back whole */
    uint64_t rx_off;         /* bytes of the echo under way received */
    uint8_t rx_seq[8];       /* its first 8 bytes: the sequence number */
    uint64_t *sent_us;       /* owned; cfg->inflight send times, by seq % inflight */
};

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)(v & 0xffu);
        v >>= 8;
    }
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static void ctx_error(struct wsb_ctx *ctx, const char *what)
{
    if (ctx->nerrors < WSB_ERRORS_KEPT)
        (void)util_snprintf(ctx->errors[ctx->nerrors], WSB_ERROR_LEN, "%s", what);
    ctx->nerrors++;
}

static void set_timer(struct event *ev, uint64_t ms)
{
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000u),
                         .tv_usec = (suseconds_t)(ms % 1000u) * 1000};
    (void)event_add(ev, &tv);
}

static void ctx_start_load(struct wsb_ctx *ctx);
static void ctx_end_window(struct wsb_ctx *ctx);
static void ctx_begin_close(struct wsb_ctx *ctx);

/* Frees what the connection holds and takes it out of the counts; the echoes
 * it still owed are lost. Safe inside its own callbacks (ws_free defers). */
static void conn_done(struct wsb_conn *c)
{
    struct wsb_ctx *ctx = c->ctx;
    if (c->st == WSB_C_DONE)
        return;
    bool was_connecting = c->st == WSB_C_CONNECTING;
    c->st = WSB_C_DONE;
    ws_free(c->ws);
    c->ws = NULL;
    if (c->bev != NULL) {
        bufferevent_free(c->bev);
        c->bev = NULL;
    }
    uint64_t owed = c->sent - c->echoed;
    ctx->inflight -= owed;
    ctx->lost += owed;
    ctx->live--;
    if (was_connecting && ctx->phase == WSB_P_CONNECT) {
        ctx->settled++;
        if (ctx->settled == ctx->cfg->conns)
            ctx_start_load(ctx);
        return;
    }
    if (ctx->live > 0)
        return;
    if (ctx->phase == WSB_P_WARMUP || ctx->phase == WSB_P_MEASURE)
        ctx_end_window(ctx);
    event_base_loopbreak(ctx->base);
}

static void conn_fail(struct wsb_conn *c, const char *why)
{
    char msg[WSB_ERROR_LEN];
    if (!c->failed) {
        c->failed = true;
        (void)util_snprintf(msg, sizeof(msg), "conn %zu: %.160s", c->idx, why);
        ctx_error(c->ctx, msg);
    }
    conn_done(c);
}

/* Keeps cfg->inflight messages on the way while the run sends. */
static void conn_pump(struct wsb_conn *c)
{
    struct wsb_ctx *ctx = c->ctx;
    const struct wsb_cfg *cfg = ctx->cfg;
    uint64_t t = 0;
    while (c->st == WSB_C_OPEN && (ctx->phase == WSB_P_WARMUP || ctx->phase == WSB_P_MEASURE) &&
           c->sent - c->echoed < cfg->inflight && ws_is_writable(c->ws)) {
        if (t == 0)
            t = now_us();
        put_be64(ctx->payload, c->sent);
        if (ws_send_binary(c->ws, ctx->payload, (size_t)cfg->size) != 0) {
            conn_fail(c, "send failed");
            return;
        }
        c->sent_us[c->sent % cfg->inflight] = t;
        c->sent++;
        ctx->inflight++;
    }
}

static void ctx_record_latency(struct wsb_ctx *ctx, uint64_t us)
{
    if (ctx->nlat == ctx->lat_cap) {
        size_t cap = ctx->lat_cap == 0 ? 65536u : ctx->lat_cap * 2u;
        if (cap > WSB_LAT_MAX_SAMPLES)
            cap = WSB_LAT_MAX_SAMPLES;
        if (cap <= ctx->lat_cap)
            return; /* enough samples for percentiles */
        uint32_t *p = realloc(ctx->lat_us, cap * sizeof(*p));
        if (p == NULL)
            return;
        ctx->lat_us = p;
        ctx->lat_cap = cap;
    }
    ctx->lat_us[ctx->nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

/* One whole echo: its sequence number must be the next one owed. Returns 0
 * or -1 (reported). */
static int conn_on_echo(struct wsb_conn *c)
{
    struct wsb_ctx *ctx = c->ctx;
    const struct wsb_cfg *cfg = ctx->cfg;
    uint64_t seq = get_be64(c->rx_seq);
    char msg[WSB_ERROR_LEN];
    if (c->echoed >= c->sent || seq != c->echoed) {
        (void)util_snprintf(msg, sizeof(msg), "echo of message %" PRIu64 " where %" PRIu64
                            " was due (%" PRIu64 " sent)", seq, c->echoed, c->sent);
        conn_fail(c, msg);
        return -1;
    }
    uint64_t t = now_us();
    uint64_t sent_at = c->sent_us[seq % cfg->inflight];
    c->echoed++;
    ctx->inflight--;
    ctx->messages_total++;
    if (ctx->phase == WSB_P_MEASURE) {
        ctx->messages++;
        ctx_record_latency(ctx, t - sent_at);
        if (cfg->max_messages != 0 && ctx->messages >= cfg->max_messages)
            ctx_end_window(ctx);
    } else if (ctx->phase == WSB_P_DRAIN && ctx->inflight == 0) {
        ctx_begin_close(ctx);
    }
    return 0;
}

static int ws_on_binary(void *arg, const uint8_t *data, size_t len)
{
    struct wsb_conn *c = arg;
    struct wsb_ctx *ctx = c->ctx;
    const uint64_t size = ctx->cfg->size;
    if (c->st != WSB_C_OPEN && c->st != WSB_C_CLOSING)
        return 0;
    while (len > 0) {
        size_t n = size - c->rx_off < len ? (size_t)(size - c->rx_off) : len;
        size_t head = 0;
        if (c->rx_off < 8) {
            head = 8u - (size_t)c->rx_off < n ? 8u - (size_t)c->rx_off : n;
            memcpy(c->rx_seq + c->rx_off, data, head);
        }
        if (n > head && memcmp(data + head, ctx->payload + c->rx_off + head, n - head) != 0) {
            conn_fail(c, "echo differs from the message sent");
            return -1;
        }
        c->rx_off += n;
        data += n;
        len -= n;
        if (c->rx_off == size) {
            c->rx_off = 0;
            if (conn_on_echo(c) != 0)
                return -1;
        }
    }
    conn_pump(c);
    return 0;
}

static void ws_on_text(void *arg, const char *data, size_t len)
{
    struct wsb_conn *c = arg;
    if (c->st == WSB_C_OPEN || c->st == WSB_C_CLOSING)
        conn_fail(c, "unexpected text message");
}

static void ws_on_close(void *arg, int code, const char *reason)
{
    struct wsb_conn *c = arg;
    char msg[WSB_ERROR_LEN];
    if (c->st == WSB_C_CLOSING && c->sent == c->echoed) {
        conn_done(c);
        return;
    }
    (void)util_snprintf(msg, sizeof(msg), "closed with %d%s%.100s in %s, %" PRIu64
                        " echoes owed", code, reason[0] != '\0' ? " " : "", reason,
                        wsb_phase_names[c->ctx->phase], c->sent - c->echoed);
    conn_fail(c, msg);
}

static void ws_on_writable(void *arg)
{
    conn_pump(arg);
}

static const struct ws_callbacks wsb_ws_cbs = {
    .on_text = ws_on_text,
    .on_binary = ws_on_binary,
    .on_close = ws_on_close,
    .on_writable = ws_on_writable,
};

/* ---- dial, TLS, upgrade ------------------------------------------------------ */

static void up_on_read(struct bufferevent *bev, void *arg)
{
    struct wsb_conn *c = arg;
    struct wsb_ctx *ctx = c->ctx;
    char err[256];
    int rc = ws_client_parse_response(bufferevent_get_input(bev), c->key, NULL, &c->status, err,
                                      sizeof(err));
    if (rc == 1)
        return;
    if (rc != 0) {
        conn_fail(c, err);
        return;
    }
    c->ws = ws_conn_new(ctx->base, bev, true, WSB_MAX_TEXT, &wsb_ws_cbs, c);
    c->bev = NULL; /* the WebSocket owns it now, also on failure */
    if (c->ws == NULL) {
        conn_fail(c, "out of memory");
        return;
    }
    c->st = WSB_C_OPEN;
    ctx->up++;
    ctx->settled++;
    if (ctx->phase == WSB_P_CONNECT && ctx->settled == ctx->cfg->conns)
        ctx_start_load(ctx);
    else if (ctx->phase == WSB_P_WARMUP || ctx->phase == WSB_P_MEASURE)
        conn_pump(c); /* came up after the connect deadline */
}

static void up_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct wsb_conn *c = arg;
    char why[WSB_ERROR_LEN];
    if (what & BEV_EVENT_CONNECTED)
        return;
    SSL *ssl = bufferevent_openssl_get_ssl(bev);
    long vr = ssl != NULL ? SSL_get_verify_result(ssl) : X509_V_OK;
    unsigned long e = bufferevent_get_openssl_error(bev);
    if (vr != X509_V_OK) {
        (void)util_snprintf(why, sizeof(why), "tls: certificate verification failed: %s",
                            X509_verify_cert_error_string(vr));
    } else if (e != 0) {
        char buf[120];
        ERR_error_string_n(e, buf, sizeof(buf));
        (void)util_snprintf(why, sizeof(why), "tls: %s", buf);
    } else if (what & BEV_EVENT_EOF) {
        (void)util_snprintf(why, sizeof(why), "connection closed before the 101%s",
                            c->status != 0 ? " (answer incomplete)" : "");
    } else {
        int err = EVUTIL_SOCKET_ERROR();
        (void)util_snprintf(why, sizeof(why), "socket: %s", evutil_socket_error_to_string(err));
    }
    tls_drain_errors();
    conn_fail(c, why);
}

/* Starts connection c: TCP (and TLS) with the upgrade request queued. */
static void conn_start(struct wsb_conn *c)
{
    struct wsb_ctx *ctx = c->ctx;
    const struct wsb_cfg *cfg = ctx->cfg;
    c->st = WSB_C_CONNECTING;
    ctx->live++;
    if (cfg->tls) {
        SSL *ssl = SSL_new(ctx->ssl_ctx);
        struct in_addr ip;
        bool literal = inet_pton(AF_INET, cfg->host, &ip) == 1;
        if (ssl == NULL || (!literal && SSL_set_tlsext_host_name(ssl, cfg->host) != 1) ||
            (cfg->cacert != NULL && SSL_set1_host(ssl, cfg->host) != 1)) {
            SSL_free(ssl);
            tls_drain_errors();
            conn_fail(c, "TLS setup failed");
            return;
        }
        /* Takes ownership of ssl, also on failure. */
        c->bev = bufferevent_openssl_socket_new(ctx->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
        if (c->bev != NULL)
            bufferevent_openssl_set_allow_dirty_shutdown(c->bev, 1);
    } else {
        c->bev = bufferevent_socket_new(ctx->base, -1,
                                        BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
    }
    if (c->bev == NULL) {
        conn_fail(c, "out of memory");
        return;
    }
    bufferevent_setcb(c->bev, up_on_read, NULL, up_on_event, c);
    if (ws_client_key(c->key) != 0 ||
        ws_client_request(bufferevent_get_output(c->bev), cfg->host_port, cfg->path, c->key, NULL,
                          NULL) != 0) {
        conn_fail(c, "cannot build the upgrade request");
        return;
    }
    if (bufferevent_enable(c->bev, EV_READ | EV_WRITE) != 0 ||
        bufferevent_socket_connect(c->bev, (const struct sockaddr *)&cfg->dial,
                                   sizeof(cfg->dial)) != 0) {
        conn_fail(c, "connect failed");
        return;
    }
    int one = 1;
    (void)setsockopt(bufferevent_getfd(c->bev), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* ---- phases -------------------------------------------------------------------- */

static void ctx_start_load(struct wsb_ctx *ctx)
{
    const struct wsb_cfg *cfg = ctx->cfg;
    if (ctx->phase != WSB_P_CONNECT)
        return;
    if (ctx->up == 0) {
        event_base_loopbreak(ctx->base);
        return;
    }
    if (cfg->warmup_ms > 0) {
        ctx->phase = WSB_P_WARMUP;
        set_timer(ctx->phase_ev, cfg->warmup_ms);
    } else {
        ctx->phase = WSB_P_MEASURE;
        ctx->t_start_us = now_us();
        set_timer(ctx->phase_ev, cfg->duration_ms);
    }
    for (uint64_t i = 0; i < cfg->conns; i++)
        conn_pump(&ctx->conns[i]);
}

/* The window is over: no new messages; the echoes in flight may come in. */
static void ctx_end_window(struct wsb_ctx *ctx)
{
    if (ctx->phase != WSB_P_WARMUP && ctx->phase != WSB_P_MEASURE)
        return;
    if (ctx->phase == WSB_P_MEASURE)
        ctx->t_end_us = now_us();
    ctx->phase = WSB_P_DRAIN;
    if (ctx->inflight == 0) {
        ctx_begin_close(ctx);
        return;
    }
    set_timer(ctx->phase_ev, WSB_DRAIN_TIMEOUT_MS);
}

static void ctx_begin_close(struct wsb_ctx *ctx)
{
    if (ctx->phase == WSB_P_CLOSE)
        return;
    ctx->phase = WSB_P_CLOSE;
    event_del(ctx->phase_ev);
    for (uint64_t i = 0; i < ctx->cfg->conns; i++) {
        struct wsb_conn *c = &ctx->conns[i];
        if (c->st == WSB_C_OPEN) {
            c->st = WSB_C_CLOSING;
            if (ws_close(c->ws, WS_CLOSE_NORMAL, "done") != 0)
                conn_done(c);
        } else if (c->st == WSB_C_CONNECTING) {
            conn_fail(c, "not up by the end of the run");
        }
    }
    if (ctx->live == 0)
        event_base_loopbreak(ctx->base);
}

static void on_phase_timer(evutil_socket_t fd, short what, void *arg)
{
    struct wsb_ctx *ctx = arg;
    char msg[WSB_ERROR_LEN];
    switch (ctx->phase) {
    case WSB_P_CONNECT:
        (void)util_snprintf(msg, sizeof(msg), "%" PRIu64 " of %" PRIu64
                            " connections not up within %u ms", ctx->cfg->conns - ctx->settled,
                            ctx->cfg->conns, WSB_CONNECT_TIMEOUT_MS);
        ctx_error(ctx, msg);
        ctx_start_load(ctx);
        break;
    case WSB_P_WARMUP:
        ctx->phase = WSB_P_MEASURE;
        ctx->t_start_us = now_us();
        set_timer(ctx->phase_ev, ctx->cfg->duration_ms);
        break;
    case WSB_P_MEASURE:
        ctx_end_window(ctx);
        break;
    case WSB_P_DRAIN:
        (void)util_snprintf(msg, sizeof(msg), "%" PRIu64 " echoes missing %u ms after the window",
                            ctx->inflight, WSB_DRAIN_TIMEOUT_MS);
        ctx_error(ctx, msg);
        ctx_begin_close(ctx);
        break;
    case WSB_P_CLOSE:
        break;
    }
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct wsb_ctx *ctx = arg;
    char msg[WSB_ERROR_LEN];
    (void)util_snprintf(msg, sizeof(msg), "run timed out in phase %s (%" PRIu64 " s)",
                        wsb_phase_names[ctx->phase], ctx->cfg->timeout_s);
    ctx_error(ctx, msg);
    if (ctx->phase == WSB_P_MEASURE)
        ctx->t_end_us = now_us();
    event_base_loopbreak(ctx->base);
}

/* ---- report ---------------------------------------------------------------------- */

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a;
    uint32_t y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void print_json_string(const char *s)
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

static void print_result(struct wsb_ctx *ctx)
{
    const struct wsb_cfg *cfg = ctx->cfg;
    double window_s = 0.0;
    if (ctx->t_start_us != 0 && ctx->t_end_us > ctx->t_start_us)
        window_s = (double)(ctx->t_end_us - ctx->t_start_us) / 1e6;
    double bytes = (double)ctx->messages * (double)cfg->size;
    printf("{\"conns\":%" PRIu64 ",\"conns_up\":%" PRIu64 ",\"size\":%" PRIu64
           ",\"inflight\":%" PRIu64 ",\"window_s\":%.4f,\"messages\":%" PRIu64
           ",\"messages_total\":%" PRIu64 ",\"bytes\":%.0f,",
           cfg->conns, ctx->up, cfg->size, cfg->inflight, window_s, ctx->messages,
           ctx->messages_total, bytes);
    if (window_s > 0.0)
        printf("\"msgs_per_s\":%.2f,\"mb_s\":%.4f,", (double)ctx->messages / window_s,
               bytes / 1e6 / window_s);
    else
        printf("\"msgs_per_s\":null,\"mb_s\":null,");
    if (ctx->nlat > 0) {
        size_t n = ctx->nlat;
        qsort(ctx->lat_us, n, sizeof(*ctx->lat_us), cmp_u32);
        size_t i50 = (size_t)(0.50 * (double)(n - 1) + 0.5);
        size_t i99 = (size_t)(0.99 * (double)(n - 1) + 0.5);
        printf("\"latency_ms\":{\"p50\":%.4f,\"p99\":%.4f,\"max\":%.4f},",
               ctx->lat_us[i50] / 1000.0, ctx->lat_us[i99] / 1000.0, ctx->lat_us[n - 1] / 1000.0);
    } else {
        printf("\"latency_ms\":{\"p50\":null,\"p99\":null,\"max\":null},");
    }
    printf("\"lost\":%" PRIu64 ",\"errors_total\":%zu,\"errors\":[", ctx->lost, ctx->nerrors);
    size_t kept = ctx->nerrors < WSB_ERRORS_KEPT ? ctx->nerrors : WSB_ERRORS_KEPT;
    for (size_t i = 0; i < kept; i++) {
        if (i > 0)
            putchar(',');
        print_json_string(ctx->errors[i]);
    }
    printf("]}\n");
}

/* ---- setup ------------------------------------------------------------------------ */

/* Parses ws[s]://HOST[:PORT][/PATH[?QUERY]] into cfg. Returns 0 or -1. */
static int parse_url(const char *url, struct wsb_cfg *cfg)
{
    struct http_parser_url u;
    http_parser_url_init(&u);
    if (http_parser_parse_url(url, strlen(url), 0, &u) != 0)
        return -1;
    if (!(u.field_set & (1 << UF_SCHEMA)) || !(u.field_set & (1 << UF_HOST)))
        return -1;
    struct iov schema = {url + u.field_data[UF_SCHEMA].off, u.field_data[UF_SCHEMA].len};
    if (util_iov_ieq_str(schema, "wss") || util_iov_ieq_str(schema, "https"))
        cfg->tls = true;
    else if (!util_iov_ieq_str(schema, "ws") && !util_iov_ieq_str(schema, "http"))
        return -1;
    size_t hlen = u.field_data[UF_HOST].len;
    if (hlen >= sizeof(cfg->host))
        return -1;
    memcpy(cfg->host, url + u.field_data[UF_HOST].off, hlen);
    cfg->host[hlen] = '\0';
    cfg->port = (u.field_set & (1 << UF_PORT)) ? u.port : (cfg->tls ? 443 : 80);
    if (util_snprintf(cfg->host_port, sizeof(cfg->host_port), "%s:%u", cfg->host,
                      (unsigned)cfg->port) < 0)
        return -1;
    if (u.field_set & (1 << UF_PATH)) {
        /* path and query: from the path's start to the end of the query or path */
        size_t off = u.field_data[UF_PATH].off;
        size_t end = off + u.field_data[UF_PATH].len;
        if (u.field_set & (1 << UF_QUERY))
            end = u.field_data[UF_QUERY].off + u.field_data[UF_QUERY].len;
        if (end - off >= sizeof(cfg->path))
            return -1;
        memcpy(cfg->path, url + off, end - off);
        cfg->path[end - off] = '\0';
    } else {
        memcpy(cfg->path, "/ws", sizeof("/ws"));
    }
    return 0;
}

/* Parses "IPv4:PORT". Returns 0 or -1. */
static int parse_dial(const char *s, struct sockaddr_in *sin)
{
    const char *colon = strrchr(s, ':');
    char host[64];
    uint64_t port;
    if (colon == NULL || (size_t)(colon - s) >= sizeof(host))
        return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    if (util_parse_uint(colon + 1, 65535, &port) != 0 || port == 0)
        return -1;
    memset(sin, 0, sizeof(*sin));
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, host, &sin->sin_addr) == 1 ? 0 : -1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tunnel-bench-ws --url ws[s]://HOST:PORT/ws [--connect IPV4:PORT]\n"
            "         [--cacert FILE] [--conns N] [--size BYTES] [--inflight K]\n"
            "         [--warmup-ms MS] [--duration-ms MS] [--messages N] [--timeout S]\n"
            "  WebSocket echo load client for bench/run; prints one JSON object:\n"
            "  conns, conns_up, size, inflight, window_s, messages (echoes in the window),\n"
            "  messages_total (also warm-up and drain), bytes (the window's payload, one\n"
            "  way), msgs_per_s, mb_s, latency_ms {p50,p99,max}\n"
            "  (send to whole echo), lost (echoes never completed), errors_total, errors.\n"
            "  Without --cacert, TLS is not verified. Defaults: 10 conns x 1 message of\n"
            "  128 bytes, 1000 ms warm-up, 5000 ms window, no message cap, 60 s timeout.\n"
            "  Exit 0 once the JSON is printed (errors included), 2 on bad usage.\n");
}

static int parse_args(int argc, char **argv, struct wsb_cfg *cfg)
{
    const char *url = NULL;
    const char *dial = NULL;
    cfg->conns = 10;
    cfg->size = 128;
    cfg->inflight = 1;
    cfg->warmup_ms = 1000;
    cfg->duration_ms = 5000;
    cfg->max_messages = 0;
    cfg->timeout_s = 60;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = 0;
        if (strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        } else if (v == NULL) {
            rc = -1;
        } else if (strcmp(a, "--url") == 0) {
            url = v;
        } else if (strcmp(a, "--connect") == 0) {
            dial = v;
        } else if (strcmp(a, "--cacert") == 0) {
            cfg->cacert = v;
        } else if (strcmp(a, "--conns") == 0) {
            rc = util_parse_uint(v, WSB_MAX_CONNS, &cfg->conns);
        } else if (strcmp(a, "--size") == 0) {
            rc = util_parse_uint(v, WSB_MAX_SIZE, &cfg->size);
        } else if (strcmp(a, "--inflight") == 0) {
            rc = util_parse_uint(v, WSB_MAX_INFLIGHT, &cfg->inflight);
        } else if (strcmp(a, "--warmup-ms") == 0) {
            rc = util_parse_uint(v, 600000, &cfg->warmup_ms);
        } else if (strcmp(a, "--duration-ms") == 0) {
            rc = util_parse_uint(v, 3600000, &cfg->duration_ms);
        } else if (strcmp(a, "--messages") == 0) {
            rc = util_parse_uint(v, WSB_MAX_MESSAGES, &cfg->max_messages);
        } else if (strcmp(a, "--timeout") == 0) {
            rc = util_parse_uint(v, 7200, &cfg->timeout_s);
        } else {
            rc = -1;
        }
        if (rc != 0) {
            fprintf(stderr, "tunnel-bench-ws: bad option or value: %s\n", a);
            return -1;
        }
        i++;
    }
    if (url == NULL || parse_url(url, cfg) != 0) {
        fprintf(stderr, "tunnel-bench-ws: need --url ws[s]://HOST[:PORT]/PATH\n");
        return -1;
    }
    if (cfg->conns == 0 || cfg->inflight == 0 || cfg->size < WSB_MIN_SIZE ||
        cfg->duration_ms == 0 || cfg->timeout_s == 0) {
        fprintf(stderr, "tunnel-bench-ws: want --conns, --inflight, --duration-ms, --timeout > 0"
                        " and --size >= %u\n",
                WSB_MIN_SIZE);
        return -1;
    }
    char defdial[WSB_HOST_MAX + 8];
    if (dial == NULL) {
        (void)util_snprintf(defdial, sizeof(defdial), "%s:%u",
                            strcmp(cfg->host, "localhost") == 0 ? "127.0.0.1" : cfg->host,
                            (unsigned)cfg->port);
        dial = defdial;
    }
    if (parse_dial(dial, &cfg->dial) != 0) {
        fprintf(stderr, "tunnel-bench-ws: cannot dial %s (want IPv4:PORT, or --connect)\n", dial);
        return -1;
    }
    return 0;
}

static SSL_CTX *make_ssl_ctx(const struct wsb_cfg *cfg)
{
    /* The upgrade is HTTP/1.1 (RFC 6455); h2 would need RFC 8441. */
    static const unsigned char alpn[] = "\x08http/1.1";
    SSL_CTX *ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (ssl_ctx == NULL)
        return NULL;
    SSL_CTX_set_min_proto_version(ssl_ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ssl_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (SSL_CTX_set_alpn_protos(ssl_ctx, alpn, sizeof(alpn) - 1) != 0)
        goto fail;
    if (cfg->cacert != NULL) {
        if (SSL_CTX_load_verify_locations(ssl_ctx, cfg->cacert, NULL) != 1) {
            fprintf(stderr, "tunnel-bench-ws: cannot load %s\n", cfg->cacert);
            goto fail;
        }
        SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_PEER, NULL);
    }
    return ssl_ctx;

fail:
    SSL_CTX_free(ssl_ctx);
    tls_drain_errors();
    return NULL;
}

static void ctx_cleanup(struct wsb_ctx *ctx)
{
    if (ctx->conns != NULL) {
        for (uint64_t i = 0; i < ctx->cfg->conns; i++) {
            struct wsb_conn *c = &ctx->conns[i];
            ws_free(c->ws);
            if (c->bev != NULL)
                bufferevent_free(c->bev);
            free(c->sent_us);
        }
    }
    free(ctx->conns);
    free(ctx->payload);
    free(ctx->lat_us);
    if (ctx->phase_ev != NULL)
        event_free(ctx->phase_ev);
    if (ctx->timeout_ev != NULL)
        event_free(ctx->timeout_ev);
    if (ctx->base != NULL)
        event_base_free(ctx->base);
    SSL_CTX_free(ctx->ssl_ctx);
}

static int ctx_init(struct wsb_ctx *ctx, const struct wsb_cfg *cfg)
{
    ctx->cfg = cfg;
    ctx->base = event_base_new();
    ctx->conns = calloc(cfg->conns, sizeof(*ctx->conns));
    ctx->payload = malloc(cfg->size);
    if (ctx->base == NULL || ctx->conns == NULL || ctx->payload == NULL)
        return -1;
    ctx->timeout_ev = evtimer_new(ctx->base, on_timeout, ctx);
    ctx->phase_ev = evtimer_new(ctx->base, on_phase_timer, ctx);
    if (ctx->timeout_ev == NULL || ctx->phase_ev == NULL)
        return -1;
    for (size_t i = 0; i < cfg->size; i++)
        ctx->payload[i] = (uint8_t)('a' + i % 26);
    for (uint64_t i = 0; i < cfg->conns; i++) {
        ctx->conns[i].ctx = ctx;
        ctx->conns[i].idx = (size_t)i;
        ctx->conns[i].sent_us = calloc(cfg->inflight, sizeof(uint64_t));
        if (ctx->conns[i].sent_us == NULL)
            return -1;
    }
    if (cfg->tls) {
        ctx->ssl_ctx = make_ssl_ctx(cfg);
        if (ctx->ssl_ctx == NULL)
            return -1;
    }
    set_timer(ctx->timeout_ev, cfg->timeout_s * 1000u);
    set_timer(ctx->phase_ev, WSB_CONNECT_TIMEOUT_MS);
    /* conn_start may fail a connection at once; ctx_start_load then waits for
     * the last one to settle, which happens within this loop or later. */
    for (uint64_t i = 0; i < cfg->conns; i++)
        conn_start(&ctx->conns[i]);
    return 0;
}

int main(int argc, char **argv)
{
    struct wsb_cfg cfg = {0};
    if (parse_args(argc, argv, &cfg) != 0) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct wsb_ctx ctx = {0};
    int rc = 1;
    if (ctx_init(&ctx, &cfg) != 0) {
        fprintf(stderr, "tunnel-bench-ws: setup failed (out of memory or TLS)\n");
        goto out;
    }
    if (ctx.phase == WSB_P_CONNECT && ctx.settled == cfg.conns && ctx.up == 0) {
        print_result(&ctx); /* every connection failed at once */
        rc = 0;
        goto out;
    }
    if (event_base_dispatch(ctx.base) == -1)
        goto out;
    print_result(&ctx);
    rc = 0;
out:
    ctx_cleanup(&ctx);
    return rc;
}
