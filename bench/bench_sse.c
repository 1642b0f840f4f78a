/* tunnel-bench-sse: the SSE load client of bench/run. Opens N concurrent
 * HTTP/1.1 streams (TLS when the URL is https) to GET PATH?n=EVENTS&interval_ms=MS
 * on tunnel-bench-origin, through whatever proxy the URL names, and measures
 * per stream the time to the first response byte and per event the delay
 * between the origin's send timestamp (ts_us, CLOCK_REALTIME) and its arrival.
 * Prints one JSON object on stdout. One struct sse_ctx holds all state;
 * written in C so that the client's own scheduling adds little to latency. */
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

#include "util.h"

#define SSE_MAX_STREAMS 10000u
#define SSE_MAX_EVENTS 100000u
#define SSE_LINE_MAX 4096u /* one event's bytes; longer ones are skipped */
#define SSE_HOST_MAX 256u
#define SSE_PATH_MAX 1024u
#define SSE_ERRORS_KEPT 5u
#define SSE_ERROR_LEN 160u

struct sse_cfg {
    char host[SSE_HOST_MAX]; /* URL host: SNI, Host header, certificate name */
    uint16_t port;           /* URL port */
    char path[SSE_PATH_MAX]; /* URL path, e.g. /sse */
    bool tls;                /* https */
    struct sockaddr_in dial; /* where to connect (URL host or --connect) */
    const char *cacert;      /* CA file; NULL: no verification */
    uint64_t streams;
    uint64_t events; /* per stream */
    uint64_t interval_ms;
    uint64_t timeout_s;
};

struct sse_stream;

struct sse_ctx {
    const struct sse_cfg *cfg;                   /* borrowed; immutable */
    struct event_base *base;                     /* owned */
    SSL_CTX *ssl_ctx;                            /* owned; NULL for http */
    struct event *timeout_ev;                    /* owned */
    http_parser_settings settings;               /* callbacks shared by every stream */
    struct sse_stream *streams;                  /* owned; cfg->streams entries */
    double *lat_ms;                              /* owned; one per event received */
    size_t nlat;                                 /* entries in lat_ms */
    double *ttfb_ms;                             /* owned; one per stream that answered */
    size_t nttfb;                                /* entries in ttfb_ms */
    uint64_t received;                           /* events, all streams */
    uint64_t finished;                           /* streams done, well or not */
    char errors[SSE_ERRORS_KEPT][SSE_ERROR_LEN]; /* first errors, for the report */
    size_t nerrors;                              /* errors seen (only the first few kept) */
};

/* One SSE stream; owned by the ctx's array. */
struct sse_stream {
    struct sse_ctx *ctx;     /* borrowed back-pointer */
    struct bufferevent *bev; /* owned; NULL before start and after finish */
    struct event *start_ev;  /* owned; staggered start */
    http_parser parser;      /* response parser (decodes chunked) */
    uint64_t t_req_us;       /* request written (CLOCK_REALTIME us) */
    uint64_t now_us;         /* arrival time of the bytes being parsed */
    bool got_first_byte;     /* ttfb recorded */
    bool finished;           /* counted in ctx->finished; bev freed */
    uint64_t received;       /* events on this stream */
    char line[SSE_LINE_MAX]; /* event being assembled */
    size_t line_len;         /* bytes in line */
    bool line_overflow;      /* event longer than line: skipped */
};

static uint64_t now_realtime_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void ctx_error(struct sse_ctx *ctx, const char *what)
{
    if (ctx->nerrors < SSE_ERRORS_KEPT)
        util_snprintf(ctx->errors[ctx->nerrors], SSE_ERROR_LEN, "%s", what);
    ctx->nerrors++;
}

/* Ends a stream (also on error); the last one ends the loop. */
static void stream_finish(struct sse_stream *s, const char *error)
{
    if (s->finished)
        return;
    s->finished = true;
    if (error != NULL && s->received < s->ctx->cfg->events)
        ctx_error(s->ctx, error);
    if (s->bev != NULL) {
        bufferevent_free(s->bev);
        s->bev = NULL;
    }
    s->ctx->finished++;
    if (s->ctx->finished == s->ctx->cfg->streams)
        event_base_loopbreak(s->ctx->base);
}

/* One complete event (without its blank line): find ts_us and count it. */
static void stream_on_event(struct sse_stream *s, const char *ev, size_t len)
{
    static const char key[] = "\"ts_us\":";
    const size_t klen = sizeof(key) - 1;
    const char *end = ev + len;
    const char *p = NULL;
    for (const char *q = ev; q + klen <= end; q++) {
        if (memcmp(q, key, klen) == 0) {
            p = q + klen;
            break;
        }
    }
    if (p == NULL)
        return;
    uint64_t ts = 0;
    size_t digits = 0;
    while (p < end && *p >= '0' && *p <= '9' && digits < 19) {
        ts = ts * 10 + (uint64_t)(*p - '0');
        p++;
        digits++;
    }
    if (digits == 0)
        return;
    struct sse_ctx *ctx = s->ctx;
    s->received++;
    ctx->received++;
    if (ctx->nlat < ctx->cfg->streams * ctx->cfg->events)
        ctx->lat_ms[ctx->nlat++] = ((double)s->now_us - (double)ts) / 1000.0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    struct sse_stream *s = p->data;
    for (size_t i = 0; i < len; i++) {
        char c = at[i];
        if (s->line_len < SSE_LINE_MAX)
            s->line[s->line_len++] = c;
        else
            s->line_overflow = true;
        /* An event ends with a blank line (WHATWG SSE: "\n\n"). */
        if (c == '\n' && s->line_len >= 2 && s->line[s->line_len - 2] == '\n') {
            if (!s->line_overflow)
                stream_on_event(s, s->line, s->line_len);
            s->line_len = 0;
            s->line_overflow = false;
        }
    }
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    struct sse_stream *s = p->data;
    if (p->status_code != 200) {
        char msg[64];
        util_snprintf(msg, sizeof(msg), "status %u", p->status_code);
        ctx_error(s->ctx, msg);
        return -1;
    }
    return 0;
}

static int on_message_complete(http_parser *p)
{
    http_parser_pause(p, 1); /* on_read sees HPE_PAUSED and ends the stream */
    return 0;
}

static void on_read(struct bufferevent *bev, void *arg)
{
    struct sse_stream *s = arg;
    struct sse_ctx *ctx = s->ctx;
    struct evbuffer *in = bufferevent_get_input(bev);
    s->now_us = now_realtime_us();
    if (!s->got_first_byte) {
        s->got_first_byte = true;
        ctx->ttfb_ms[ctx->nttfb++] = ((double)s->now_us - (double)s->t_req_us) / 1000.0;
    }
    struct evbuffer_iovec v;
    while (evbuffer_peek(in, -1, NULL, &v, 1) == 1) {
        size_t n = http_parser_execute(&s->parser, &ctx->settings, v.iov_base, v.iov_len);
        evbuffer_drain(in, n);
        enum http_errno err = HTTP_PARSER_ERRNO(&s->parser);
        if (err == HPE_PAUSED) {
            stream_finish(s, NULL); /* message complete */
            return;
        }
        if (err != HPE_OK) {
            /* A refused status was reported by on_headers_complete already. */
            stream_finish(s, err == HPE_CB_headers_complete ? NULL : http_errno_description(err));
            return;
        }
    }
}

static void on_event(struct bufferevent *bev, short what, void *arg)
{
    struct sse_stream *s = arg;
    char msg[SSE_ERROR_LEN];
    if (what & BEV_EVENT_CONNECTED) {
        int one = 1;
        setsockopt(bufferevent_getfd(bev), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        /* After the TLS handshake for https: TTFB covers request to answer. */
        s->t_req_us = now_realtime_us();
        return;
    }
    if (what & BEV_EVENT_ERROR) {
        unsigned long e = bufferevent_get_openssl_error(bev);
        if (e != 0) {
            char buf[120];
            ERR_error_string_n(e, buf, sizeof(buf));
            util_snprintf(msg, sizeof(msg), "tls: %s", buf);
        } else {
            int err = EVUTIL_SOCKET_ERROR();
            util_snprintf(msg, sizeof(msg), "socket: %s", evutil_socket_error_to_string(err));
        }
        while (bufferevent_get_openssl_error(bev) != 0)
            ;
        stream_finish(s, msg);
        return;
    }
    if (what & BEV_EVENT_EOF) {
        /* http-parser ends a body without length at EOF. */
        http_parser_execute(&s->parser, &s->ctx->settings, NULL, 0);
        stream_finish(s, "connection closed early");
    }
}

static void on_start(evutil_socket_t fd, short what, void *arg)
{
    struct sse_stream *s = arg;
    struct sse_ctx *ctx = s->ctx;
    const struct sse_cfg *cfg = ctx->cfg;
    if (cfg->tls) {
        SSL *ssl = SSL_new(ctx->ssl_ctx);
        if (ssl == NULL || SSL_set_tlsext_host_name(ssl, cfg->host) != 1 ||
            (cfg->cacert != NULL && SSL_set1_host(ssl, cfg->host) != 1)) {
            SSL_free(ssl);
            stream_finish(s, "SSL_new failed");
            return;
        }
        /* Takes ownership of ssl, also on failure. */
        s->bev = bufferevent_openssl_socket_new(ctx->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                BEV_OPT_CLOSE_ON_FREE);
        if (s->bev != NULL)
            bufferevent_openssl_set_allow_dirty_shutdown(s->bev, 1);
    } else {
        s->bev = bufferevent_socket_new(ctx->base, -1, BEV_OPT_CLOSE_ON_FREE);
    }
    if (s->bev == NULL) {
        stream_finish(s, "bufferevent_new failed");
        return;
    }
    bufferevent_setcb(s->bev, on_read, NULL, on_event, s);
    if (bufferevent_enable(s->bev, EV_READ | EV_WRITE) != 0 ||
        bufferevent_socket_connect(s->bev, (const struct sockaddr *)&cfg->dial,
                                   sizeof(cfg->dial)) != 0) {
        stream_finish(s, "connect failed");
        return;
    }
    /* Queued now, written once connected (and after the TLS handshake). */
    if (evbuffer_add_printf(bufferevent_get_output(s->bev),
                            "GET %s?n=%" PRIu64 "&interval_ms=%" PRIu64 " HTTP/1.1\r\n"
                            "Host: %s:%u\r\nAccept: text/event-stream\r\n"
                            "Connection: close\r\n\r\n",
                            cfg->path, cfg->events, cfg->interval_ms, cfg->host,
                            (unsigned)cfg->port) < 0)
        stream_finish(s, "out of memory");
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct sse_ctx *ctx = arg;
    char msg[64];
    util_snprintf(msg, sizeof(msg), "%" PRIu64 " streams timed out",
                  ctx->cfg->streams - ctx->finished);
    ctx_error(ctx, msg);
    event_base_loopbreak(ctx->base);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a;
    double y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array; prints null when empty. */
static void print_pcts(const char *name, double *v, size_t n, bool last)
{
    if (n == 0) {
        printf("\"%s\":{\"p50\":null,\"p99\":null,\"max\":null}%s", name, last ? "" : ",");
        return;
    }
    qsort(v, n, sizeof(*v), cmp_double);
    size_t i50 = (size_t)(0.50 * (double)(n - 1) + 0.5);
    size_t i99 = (size_t)(0.99 * (double)(n - 1) + 0.5);
    printf("\"%s\":{\"p50\":%.4f,\"p99\":%.4f,\"max\":%.4f}%s", name, v[i50], v[i99], v[n - 1],
           last ? "" : ",");
}

static void print_json_string(const char *s)
{
    putchar('"');
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void print_result(struct sse_ctx *ctx)
{
    const struct sse_cfg *cfg = ctx->cfg;
    uint64_t expected = cfg->streams * cfg->events;
    printf("{\"streams\":%" PRIu64 ",\"events_expected\":%" PRIu64 ",\"events_received\":%" PRIu64
           ",\"lost\":%" PRIu64 ",\"errors_total\":%zu,"
           "\"errors\":[",
           cfg->streams, expected, ctx->received,
           expected > ctx->received ? expected - ctx->received : 0, ctx->nerrors);
    size_t kept = ctx->nerrors < SSE_ERRORS_KEPT ? ctx->nerrors : SSE_ERRORS_KEPT;
    for (size_t i = 0; i < kept; i++) {
        if (i > 0)
            putchar(',');
        print_json_string(ctx->errors[i]);
    }
    printf("],");
    print_pcts("ttfb_ms", ctx->ttfb_ms, ctx->nttfb, false);
    print_pcts("latency_ms", ctx->lat_ms, ctx->nlat, true);
    printf("}\n");
}

/* Parses http[s]://HOST[:PORT]/PATH into cfg. Returns 0 or -1. */
static int parse_url(const char *url, struct sse_cfg *cfg)
{
    struct http_parser_url u;
    http_parser_url_init(&u);
    if (http_parser_parse_url(url, strlen(url), 0, &u) != 0)
        return -1;
    if (!(u.field_set & (1 << UF_SCHEMA)) || !(u.field_set & (1 << UF_HOST)))
        return -1;
    struct iov schema = {url + u.field_data[UF_SCHEMA].off, u.field_data[UF_SCHEMA].len};
    if (util_iov_ieq_str(schema, "https"))
        cfg->tls = true;
    else if (!util_iov_ieq_str(schema, "http"))
        return -1;
    size_t hlen = u.field_data[UF_HOST].len;
    if (hlen >= sizeof(cfg->host))
        return -1;
    memcpy(cfg->host, url + u.field_data[UF_HOST].off, hlen);
    cfg->host[hlen] = '\0';
    cfg->port = (u.field_set & (1 << UF_PORT)) ? u.port : (cfg->tls ? 443 : 80);
    if (u.field_set & (1 << UF_PATH)) {
        size_t plen = u.field_data[UF_PATH].len;
        if (plen >= sizeof(cfg->path))
            return -1;
        memcpy(cfg->path, url + u.field_data[UF_PATH].off, plen);
        cfg->path[plen] = '\0';
    } else {
        memcpy(cfg->path, "/sse", sizeof("/sse"));
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
    fprintf(f, "usage: tunnel-bench-sse --url http[s]://HOST:PORT/sse [--connect IPV4:PORT]\n"
               "         [--cacert FILE] [--streams N] [--events N] [--interval-ms MS]\n"
               "         [--timeout S]\n"
               "  SSE load client for bench/run; prints one JSON object. Without --cacert,\n"
               "  TLS is not verified. Defaults: 100 streams x 50 events every 20 ms, 60 s.\n");
}

static int parse_args(int argc, char **argv, struct sse_cfg *cfg)
{
    const char *url = NULL;
    const char *dial = NULL;
    cfg->streams = 100;
    cfg->events = 50;
    cfg->interval_ms = 20;
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
        } else if (strcmp(a, "--streams") == 0) {
            rc = util_parse_uint(v, SSE_MAX_STREAMS, &cfg->streams);
        } else if (strcmp(a, "--events") == 0) {
            rc = util_parse_uint(v, SSE_MAX_EVENTS, &cfg->events);
        } else if (strcmp(a, "--interval-ms") == 0) {
            rc = util_parse_uint(v, 60000, &cfg->interval_ms);
        } else if (strcmp(a, "--timeout") == 0) {
            rc = util_parse_uint(v, 3600, &cfg->timeout_s);
        } else {
            rc = -1;
        }
        if (rc != 0) {
            fprintf(stderr, "tunnel-bench-sse: bad option or value: %s\n", a);
            return -1;
        }
        i++;
    }
    if (url == NULL || parse_url(url, cfg) != 0) {
        fprintf(stderr, "tunnel-bench-sse: need --url http[s]://HOST[:PORT]/PATH\n");
        return -1;
    }
    if (cfg->streams == 0 || cfg->events == 0 || cfg->streams * cfg->events > 10000000u) {
        fprintf(stderr, "tunnel-bench-sse: want --streams, --events > 0, product <= 1e7\n");
        return -1;
    }
    char defdial[SSE_HOST_MAX + 8];
    if (dial == NULL) {
        util_snprintf(defdial, sizeof(defdial), "%s:%u",
                      strcmp(cfg->host, "localhost") == 0 ? "127.0.0.1" : cfg->host,
                      (unsigned)cfg->port);
        dial = defdial;
    }
    if (parse_dial(dial, &cfg->dial) != 0) {
        fprintf(stderr, "tunnel-bench-sse: cannot dial %s (want IPv4:PORT, or --connect)\n", dial);
        return -1;
    }
    return 0;
}

static SSL_CTX *make_ssl_ctx(const struct sse_cfg *cfg)
{
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
            fprintf(stderr, "tunnel-bench-sse: cannot load %s\n", cfg->cacert);
            goto fail;
        }
        SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_PEER, NULL);
    }
    return ssl_ctx;

fail:
    SSL_CTX_free(ssl_ctx);
    return NULL;
}

static void ctx_cleanup(struct sse_ctx *ctx)
{
    if (ctx->streams != NULL) {
        for (uint64_t i = 0; i < ctx->cfg->streams; i++) {
            struct sse_stream *s = &ctx->streams[i];
            if (s->start_ev != NULL)
                event_free(s->start_ev);
            if (s->bev != NULL)
                bufferevent_free(s->bev);
        }
    }
    free(ctx->streams);
    free(ctx->lat_ms);
    free(ctx->ttfb_ms);
    if (ctx->timeout_ev != NULL)
        event_free(ctx->timeout_ev);
    if (ctx->base != NULL)
        event_base_free(ctx->base);
    SSL_CTX_free(ctx->ssl_ctx);
}

static int ctx_init(struct sse_ctx *ctx, const struct sse_cfg *cfg)
{
    ctx->cfg = cfg;
    ctx->base = event_base_new();
    ctx->streams = calloc(cfg->streams, sizeof(*ctx->streams));
    ctx->lat_ms = calloc(cfg->streams * cfg->events, sizeof(*ctx->lat_ms));
    ctx->ttfb_ms = calloc(cfg->streams, sizeof(*ctx->ttfb_ms));
    ctx->timeout_ev = ctx->base != NULL ? evtimer_new(ctx->base, on_timeout, ctx) : NULL;
    if (ctx->base == NULL || ctx->streams == NULL || ctx->lat_ms == NULL || ctx->ttfb_ms == NULL ||
        ctx->timeout_ev == NULL)
        return -1;
    if (cfg->tls) {
        ctx->ssl_ctx = make_ssl_ctx(cfg);
        if (ctx->ssl_ctx == NULL)
            return -1;
    }
    ctx->settings.on_headers_complete = on_headers_complete;
    ctx->settings.on_body = on_body;
    ctx->settings.on_message_complete = on_message_complete;

    struct timeval tv = {.tv_sec = (time_t)cfg->timeout_s};
    if (event_add(ctx->timeout_ev, &tv) != 0)
        return -1;
    /* Starts are staggered over one interval, so that the origin's timers
     * (and so the events) are spread evenly rather than in bursts. */
    uint64_t step_us = cfg->interval_ms * 1000u / cfg->streams;
    for (uint64_t i = 0; i < cfg->streams; i++) {
        struct sse_stream *s = &ctx->streams[i];
        s->ctx = ctx;
        http_parser_init(&s->parser, HTTP_RESPONSE);
        s->parser.data = s;
        s->start_ev = evtimer_new(ctx->base, on_start, s);
        uint64_t at_us = i * step_us;
        struct timeval st = {.tv_sec = (time_t)(at_us / 1000000u),
                             .tv_usec = (suseconds_t)(at_us % 1000000u)};
        if (s->start_ev == NULL || event_add(s->start_ev, &st) != 0)
            return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct sse_cfg cfg = {0};
    if (parse_args(argc, argv, &cfg) != 0) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sse_ctx ctx = {0};
    int rc = 1;
    if (ctx_init(&ctx, &cfg) != 0) {
        fprintf(stderr, "tunnel-bench-sse: setup failed (out of memory or TLS)\n");
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
