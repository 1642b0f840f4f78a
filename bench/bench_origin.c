/* tunnel-bench-origin: the benchmark's local API. An HTTP/1.1 keep-alive
 * server (libevent + http-parser) whose responses are generated, never read
 * from disk: /small, /1m, /1g, /bytes?n=, /sse?n=&interval_ms=, /sink
 * (POST/PUT body counted, answered after its last byte), and /ws, an RFC 6455
 * echo: a single-frame binary message is unmasked and streamed back as it
 * arrives; anything else goes to wslay, which assembles each message (echoed
 * whole) and answers pings and closes. bench/run drives it; one struct
 * origin_ctx per process holds all state. */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <http_parser.h>
#include <wslay/wslay.h>

#include "log.h"
#include "util.h"
#include "ws.h"

#define ORIGIN_PATTERN_BYTES (64u * 1024u)    /* one shared body segment */
#define ORIGIN_OUT_HIGH_BYTES (1024u * 1024u) /* stop generating above this */
#define ORIGIN_OUT_LOW_BYTES (256u * 1024u)   /* write callback refills below this */
#define ORIGIN_IN_HIGH_BYTES (256u * 1024u)   /* stop reading a pipelining client */
#define ORIGIN_IO_CHUNK_BYTES (256u * 1024u)  /* per read()/write() (libevent: 16 KiB) */
#define ORIGIN_URL_MAX 2048u
#define ORIGIN_HDR_NAME_MAX 32u
#define ORIGIN_HDR_VALUE_MAX 64u
#define ORIGIN_SMALL_BYTES 1024u
#define ORIGIN_SSE_MAX_EVENTS 1000000u
#define ORIGIN_SSE_MAX_INTERVAL_MS 60000u
#define ORIGIN_BYTES_MAX (UINT64_C(1) << 40)
#define ORIGIN_WS_MAX_MSG_BYTES (16u * 1024u * 1024u) /* larger: close 1009 */
#define ORIGIN_WS_QUEUE_HIGH_BYTES (1024u * 1024u)    /* echoes queued: stop reading */

enum origin_route {
    ORIGIN_R_BYTES = 0, /* generated body of body_left bytes */
    ORIGIN_R_SSE,
    ORIGIN_R_SINK,
    ORIGIN_R_WS, /* GET /ws: WebSocket echo */
    ORIGIN_R_NOT_FOUND,
    ORIGIN_R_BAD_METHOD,
    ORIGIN_R_BAD_QUERY,
};

struct origin_conn;

struct origin_ctx {
    struct event_base *base;       /* owned */
    struct evconnlistener *lsn;    /* owned */
    struct event *sigint_ev;       /* owned */
    struct event *sigterm_ev;      /* owned */
    struct log_sink *log;          /* owned */
    char *pattern;                 /* owned; ORIGIN_PATTERN_BYTES printable bytes */
    http_parser_settings settings; /* callbacks shared by every connection */
    struct origin_conn *conns;     /* live connections, for teardown */
    uint64_t next_id;              /* numbers connections for logs */
    uint64_t requests;             /* requests answered */
    uint64_t ws_messages;          /* WebSocket messages echoed */
};

/* One client connection; owned by the ctx's conns list. */
struct origin_conn {
    struct origin_ctx *ctx;                   /* borrowed back-pointer */
    struct origin_conn *prev;                 /* ctx->conns list */
    struct origin_conn *next;                 /* ctx->conns list */
    struct bufferevent *bev;                  /* owned */
    struct event *sse_ev;                     /* owned; persistent timer while streaming SSE */
    http_parser parser;                       /* request parser; paused while answering */
    uint64_t id;                              /* connection number, for logs */
    char url[ORIGIN_URL_MAX + 1];             /* request target, NUL-terminated */
    size_t url_len;                           /* bytes in url */
    bool url_too_long;                        /* answer 414 */
    char hdr_name[ORIGIN_HDR_NAME_MAX + 1];   /* header name so far (truncated) */
    size_t hdr_name_len;                      /* bytes in hdr_name */
    char hdr_value[ORIGIN_HDR_VALUE_MAX + 1]; /* header value so far (truncated) */
    size_t hdr_value_len;                     /* bytes in hdr_value */
    bool in_value;                            /* last header callback was a value */
    bool expect_continue;                     /* client sent Expect: 100-continue */
    bool h_upgrade_ws;                        /* Upgrade: websocket */
    bool h_connection_upgrade;                /* Connection lists "upgrade" */
    bool h_ws_version_13;                     /* Sec-WebSocket-Version: 13 */
    char ws_key[ORIGIN_HDR_VALUE_MAX + 1];    /* Sec-WebSocket-Key (truncated) */
    size_t ws_key_len;                        /* bytes in ws_key */
    wslay_event_context_ptr ws;               /* owned; set once upgraded to /ws */
    uint64_t ws_wslay_left;                   /* bytes of the frame wslay reads still owed it */
    uint64_t ws_fast_left;                    /* payload of the fast-path frame still to echo */
    uint64_t ws_fast_off;                     /* its payload bytes echoed so far */
    uint8_t ws_fast_key[4];                   /* its masking key */
    bool ws_frag_open;                        /* wslay is inside a fragmented message */
    bool keep_alive;                          /* answer allows another request */
    bool busy;           /* a streamed response is in progress; parser paused */
    bool closing;        /* free once the output has drained */
    uint64_t body_left;  /* generated bytes still to queue */
    uint64_t sink_bytes; /* request body bytes counted */
    uint64_t sse_left;   /* events still to send */
    uint64_t sse_seq;    /* next event number */
};

static void conn_free(struct origin_conn *c)
{
    if (c == NULL)
        return;
    struct origin_ctx *ctx = c->ctx;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        ctx->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    if (c->sse_ev != NULL)
        event_free(c->sse_ev);
    if (c->ws != NULL)
        wslay_event_context_free(c->ws);
    bufferevent_free(c->bev);
    free(c);
}

static uint64_t now_realtime_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Looks up key in a query string "a=1&b=2"; returns 0 and the value, 1 if
 * absent, -1 if present but not a decimal number <= max. */
static int query_u64(const char *q, const char *key, uint64_t max, uint64_t *out)
{
    size_t klen = strlen(key);
    const char *p = q;
    while (p != NULL && *p != '\0') {
        const char *end = strchr(p, '&');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        if (len > klen && memcmp(p, key, klen) == 0 && p[klen] == '=') {
            uint64_t v;
            if (util_parse_u64(p + klen + 1, len - klen - 1, &v) != 0 || v > max)
                return -1;
            *out = v;
            return 0;
        }
        p = end != NULL ? end + 1 : NULL;
    }
    return 1;
}

static int conn_add_printf(struct origin_conn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int conn_add_printf(struct origin_conn *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rv = evbuffer_add_vprintf(bufferevent_get_output(c->bev), fmt, ap);
    va_end(ap);
    return rv < 0 ? -1 : 0;
}

/* Queues generated body bytes as references to the shared pattern until the
 * output holds ORIGIN_OUT_HIGH_BYTES; the write callback calls it again. */
static int conn_fill(struct origin_conn *c)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    while (c->body_left > 0 && evbuffer_get_length(out) < ORIGIN_OUT_HIGH_BYTES) {
        size_t n =
            c->body_left < ORIGIN_PATTERN_BYTES ? (size_t)c->body_left : ORIGIN_PATTERN_BYTES;
        if (evbuffer_add_reference(out, c->ctx->pattern, n, NULL, NULL) != 0)
            return -1;
        c->body_left -= n;
    }
    return 0;
}

static const char *conn_connection_hdr(const struct origin_conn *c)
{
    return c->keep_alive ? "keep-alive" : "close";
}

static int conn_simple(struct origin_conn *c, int status, const char *reason, const char *body)
{
    return conn_add_printf(c,
                           "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                           "Content-Length: %zu\r\nConnection: %s\r\n\r\n%s",
                           status, reason, strlen(body), conn_connection_hdr(c), body);
}

/* Sends one SSE event as an HTTP/1.1 chunk; the last one also ends the body. */
static int conn_sse_send(struct origin_conn *c)
{
    char ev[128];
    int len = util_snprintf(ev, sizeof(ev), "id: %llu\ndata: {\"seq\":%llu,\"ts_us\":%llu}\n\n",
                            (unsigned long long)c->sse_seq, (unsigned long long)c->sse_seq,
                            (unsigned long long)now_realtime_us());
    if (len < 0)
        return -1;
    c->sse_seq++;
    c->sse_left--;
    return conn_add_printf(c, "%x\r\n%s\r\n%s", (unsigned)len, ev,
                           c->sse_left == 0 ? "0\r\n\r\n" : "");
}

static void conn_process_input(struct origin_conn *c);

/* The streamed response has been queued whole: take the next request. */
static void conn_response_done(struct origin_conn *c)
{
    c->busy = false;
    if (c->sse_ev != NULL) {
        event_free(c->sse_ev);
        c->sse_ev = NULL;
    }
    if (!c->keep_alive) {
        c->closing = true;
        bufferevent_disable(c->bev, EV_READ);
        return;
    }
    http_parser_pause(&c->parser, 0);
    conn_process_input(c);
}

static void on_sse_timer(evutil_socket_t fd, short what, void *arg)
{
    struct origin_conn *c = arg;
    if (conn_sse_send(c) != 0) {
        conn_free(c);
        return;
    }
    if (c->sse_left == 0)
        conn_response_done(c);
    if (c->closing && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
        conn_free(c);
}

/* Starts the SSE response: headers and the first event now, the others
 * every interval_ms. Returns 0 or -1. */
static int conn_start_sse(struct origin_conn *c, uint64_t n, uint64_t interval_ms)
{
    if (conn_add_printf(c,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"
                        "Transfer-Encoding: chunked\r\nConnection: %s\r\n\r\n",
                        conn_connection_hdr(c)) != 0)
        return -1;
    c->sse_left = n;
    c->sse_seq = 0;
    if (n == 0)
        return conn_add_printf(c, "0\r\n\r\n");
    if (conn_sse_send(c) != 0)
        return -1;
    if (c->sse_left == 0)
        return 0;
    c->sse_ev = event_new(c->ctx->base, -1, EV_PERSIST, on_sse_timer, c);
    if (c->sse_ev == NULL)
        return -1;
    struct timeval tv = {.tv_sec = (time_t)(interval_ms / 1000),
                         .tv_usec = (suseconds_t)((interval_ms % 1000) * 1000)};
    if (event_add(c->sse_ev, &tv) != 0)
        return -1;
    c->busy = true;
    return 0;
}

/* True if the comma-separated header value list holds token (ASCII case
 * insensitive, optional whitespace around elements; RFC 9110 5.6.1). */
static bool has_token(const char *list, const char *token)
{
    size_t tlen = strlen(token);
    const char *p = list;
    while (*p != '\0') {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        const char *start = p;
        while (*p != '\0' && *p != ',')
            p++;
        const char *end = p;
        while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        if ((size_t)(end - start) == tlen && strncasecmp(start, token, tlen) == 0)
            return true;
    }
    return false;
}

/* ---- /ws: WebSocket echo ---------------------------------------------------
 * After the 101 the connection belongs to wslay: conn_ws_run() feeds it the
 * input and lets it write its queue into the output. Backpressure: above
 * ORIGIN_OUT_HIGH_BYTES of output, or ORIGIN_WS_QUEUE_HIGH_BYTES of echoes
 * queued inside wslay, the recv callback reports WOULDBLOCK and input waits
 * in the bufferevent (whose read high watermark then stops the socket); the
 * write callback, at the low watermark, runs it again. */

static ssize_t ws_on_recv(wslay_event_context_ptr ws, uint8_t *buf, size_t len, int flags,
                          void *arg)
{
    struct origin_conn *c = arg;
    struct evbuffer *in = bufferevent_get_input(c->bev);
    if (evbuffer_get_length(bufferevent_get_output(c->bev)) >= ORIGIN_OUT_HIGH_BYTES ||
        wslay_event_get_queued_msg_length(ws) >= ORIGIN_WS_QUEUE_HIGH_BYTES) {
        wslay_event_set_error(ws, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (len > c->ws_wslay_left)
        len = (size_t)c->ws_wslay_left; /* never past its frame: the next may be ours */
    int n = len > 0 ? evbuffer_remove(in, buf, len) : 0;
    if (n <= 0) {
        wslay_event_set_error(ws, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (c->ws_wslay_left != UINT64_MAX)
        c->ws_wslay_left -= (uint64_t)n;
    return n;
}

static ssize_t ws_on_send(wslay_event_context_ptr ws, const uint8_t *data, size_t len, int flags,
                          void *arg)
{
    struct origin_conn *c = arg;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (evbuffer_get_length(out) >= ORIGIN_OUT_HIGH_BYTES) {
        wslay_event_set_error(ws, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (evbuffer_add(out, data, len) != 0) {
        wslay_event_set_error(ws, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

/* A whole message: data goes back as one frame of the same opcode. wslay
 * answers pings and closes itself. */
static void ws_on_msg(wslay_event_context_ptr ws, const struct wslay_event_on_msg_recv_arg *a,
                      void *arg)
{
    struct origin_conn *c = arg;
    if (wslay_is_ctrl_frame(a->opcode))
        return;
    struct wslay_event_msg m = {.opcode = a->opcode, .msg = a->msg, .msg_length = a->msg_length};
    if (wslay_event_queue_msg(ws, &m) != 0) {
        /* Out of memory, or a close is already under way: say so, then stop. */
        (void)wslay_event_queue_close(ws, WSLAY_CODE_INTERNAL_SERVER_ERROR, NULL, 0);
        return;
    }
    c->ctx->ws_messages++;
}

static const struct wslay_event_callbacks origin_ws_cbs = {
    .recv_callback = ws_on_recv,
    .send_callback = ws_on_send,
    .on_msg_recv_callback = ws_on_msg,
};

/* XORs len bytes with key, the payload starting at offset off of its frame
 * (RFC 6455 5.3), eight bytes at a time (8 is a multiple of 4, so one 64-bit
 * pattern serves every step). wslay unmasks a byte at a time, which was a
 * third of the origin's CPU with 64 KiB messages. */
static void ws_unmask(uint8_t *dst, const uint8_t *src, size_t len, const uint8_t key[4],
                      uint64_t off)
{
    uint8_t k8[8];
    uint64_t k64;
    size_t i = 0;
    for (size_t j = 0; j < 8; j++)
        k8[j] = key[(off + j) & 3];
    memcpy(&k64, k8, sizeof(k64));
    for (; len - i >= 8; i += 8) {
        uint64_t v;
        memcpy(&v, src + i, sizeof(v));
        v ^= k64;
        memcpy(dst + i, &v, sizeof(v));
    }
    for (; i < len; i++)
        dst[i] = src[i] ^ key[(off + i) & 3];
}

/* At a frame boundary: either the fast path takes the frame (a masked,
 * unfragmented binary message while wslay has nothing half done or queued:
 * its echo header goes out now, the payload in conn_ws_fast_echo), or wslay
 * gets exactly this frame. Returns false while the header is incomplete. */
static bool conn_ws_next_frame(struct origin_conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    uint8_t b[14];
    uint64_t payload = 0;
    int hlen = ws_peek_header(in, b, &payload);
    if (hlen == 0)
        return false;
    if (hlen > 0 && b[0] == (0x80u | WSLAY_BINARY_FRAME) && (b[1] & 0x80u) != 0 &&
        payload <= ORIGIN_WS_MAX_MSG_BYTES && !c->ws_frag_open && !wslay_event_want_write(c->ws)) {
        uint8_t h[10];
        size_t n = 2;
        h[0] = b[0];
        if (payload < 126) {
            h[1] = (uint8_t)payload;
        } else if (payload <= 0xffff) {
            h[1] = 126;
            h[2] = (uint8_t)(payload >> 8);
            h[3] = (uint8_t)payload;
            n = 4;
        } else {
            h[1] = 127;
            for (int i = 0; i < 8; i++)
                h[2 + i] = (uint8_t)(payload >> (56 - 8 * i));
            n = 10;
        }
        if (evbuffer_add(bufferevent_get_output(c->bev), h, n) != 0) {
            c->closing = true;
            return false;
        }
        memcpy(c->ws_fast_key, b + hlen - 4, 4);
        c->ws_fast_left = payload;
        c->ws_fast_off = 0;
        evbuffer_drain(in, (size_t)hlen);
        c->ctx->ws_messages++;
        return true;
    }
    uint8_t opcode = b[0] & 0x0fu;
    bool fin = (b[0] & 0x80u) != 0;
    if ((opcode == WSLAY_TEXT_FRAME || opcode == WSLAY_BINARY_FRAME) && !fin)
        c->ws_frag_open = true;
    else if (opcode == WSLAY_CONTINUATION_FRAME && fin)
        c->ws_frag_open = false;
    c->ws_wslay_left = hlen < 0 ? UINT64_MAX : (uint64_t)hlen + payload;
    return true;
}

/* Streams the fast-path frame's payload, unmasked, from input to output. */
static void conn_ws_fast_echo(struct origin_conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer *out = bufferevent_get_output(c->bev);
    while (c->ws_fast_left > 0 && evbuffer_get_length(out) < ORIGIN_OUT_HIGH_BYTES) {
        struct evbuffer_iovec src;
        struct evbuffer_iovec dst;
        if (evbuffer_peek(in, -1, NULL, &src, 1) < 1)
            return;
        size_t n = src.iov_len < c->ws_fast_left ? src.iov_len : (size_t)c->ws_fast_left;
        if (n > ORIGIN_PATTERN_BYTES)
            n = ORIGIN_PATTERN_BYTES;
        if (evbuffer_reserve_space(out, (ev_ssize_t)n, &dst, 1) < 1) {
            c->closing = true;
            return;
        }
        ws_unmask(dst.iov_base, src.iov_base, n, c->ws_fast_key, c->ws_fast_off);
        dst.iov_len = n;
        if (evbuffer_commit_space(out, &dst, 1) != 0) {
            c->closing = true;
            return;
        }
        evbuffer_drain(in, n);
        c->ws_fast_left -= n;
        c->ws_fast_off += n;
    }
}

/* Moves input through wslay and its answers to the output until neither
 * makes progress. Never frees c: a finished or failed WebSocket sets
 * c->closing and the bufferevent callbacks free c once the output is out. */
static void conn_ws_run(struct origin_conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer *out = bufferevent_get_output(c->bev);
    while (!c->closing) {
        size_t in0 = evbuffer_get_length(in);
        size_t out0 = evbuffer_get_length(out);
        if (c->ws_fast_left > 0)
            conn_ws_fast_echo(c);
        else if (c->ws_wslay_left == 0 && wslay_event_want_read(c->ws) && in0 > 0)
            (void)conn_ws_next_frame(c);
        if (c->closing)
            break;
        int rv = 0;
        if (c->ws_wslay_left > 0 && wslay_event_want_read(c->ws))
            rv = wslay_event_recv(c->ws);
        if (rv != 0) {
            /* A frame-level error (bad length encoding, oversized or fragmented
             * control frame): say 1002 if wslay has not queued a close. */
            if (rv != WSLAY_ERR_NOMEM) {
                (void)wslay_event_queue_close(c->ws, WSLAY_CODE_PROTOCOL_ERROR, NULL, 0);
                (void)wslay_event_send(c->ws);
            }
            c->closing = true;
            break;
        }
        /* Never inside a fast-path frame: wslay's frames go between. */
        if (c->ws_fast_left == 0 && wslay_event_want_write(c->ws) && wslay_event_send(c->ws) != 0) {
            c->closing = true;
            break;
        }
        /* RFC 6455 7.1.1: after the closing handshake the server closes TCP. */
        if (!wslay_event_want_read(c->ws) && !wslay_event_want_write(c->ws)) {
            c->closing = true;
            break;
        }
        size_t in1 = evbuffer_get_length(in);
        size_t out1 = evbuffer_get_length(out);
        if (in1 == 0 || out1 >= ORIGIN_OUT_HIGH_BYTES || (in1 == in0 && out1 == out0))
            break;
    }
    if (c->closing) {
        bufferevent_disable(c->bev, EV_READ);
        evbuffer_drain(in, evbuffer_get_length(in));
    }
}

/* GET /ws: the RFC 6455 4.2 handshake, then the connection is an echo.
 * Returns 0 (also for a refused upgrade, answered with 426 or 400) or -1. */
static int conn_start_ws(struct origin_conn *c)
{
    char accept[29];
    if (!c->h_upgrade_ws || !c->h_connection_upgrade || !c->h_ws_version_13) {
        static const char body[] = "{\"error\":\"websocket_upgrade_required\"}\n";
        return conn_add_printf(c,
                               "HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\n"
                               "Sec-WebSocket-Version: 13\r\nContent-Type: application/json\r\n"
                               "Content-Length: %zu\r\nConnection: %s\r\n\r\n%s",
                               sizeof(body) - 1, conn_connection_hdr(c), body);
    }
    if (ws_accept_key(c->ws_key, c->ws_key_len, accept) != 0)
        return conn_simple(c, 400, "Bad Request", "{\"error\":\"bad_websocket_key\"}\n");
    if (wslay_event_context_server_init(&c->ws, &origin_ws_cbs, c) != 0) {
        c->ws = NULL;
        return -1;
    }
    wslay_event_config_set_max_recv_msg_length(c->ws, ORIGIN_WS_MAX_MSG_BYTES);
    if (conn_add_printf(c,
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                        accept) != 0)
        return -1;
    c->busy = true; /* the parser is done with this connection */
    return 0;
}

/* Splits the URL into path and query (in place) and picks the route. */
static enum origin_route conn_route(struct origin_conn *c, uint64_t *a, uint64_t *b)
{
    char *q = strchr(c->url, '?');
    if (q != NULL)
        *q++ = '\0';
    const char *query = q != NULL ? q : "";
    const char *path = c->url;
    enum http_method m = (enum http_method)c->parser.method;

    if (strcmp(path, "/sink") == 0)
        return m == HTTP_POST || m == HTTP_PUT ? ORIGIN_R_SINK : ORIGIN_R_BAD_METHOD;
    bool is_get = m == HTTP_GET;
    if (strcmp(path, "/ws") == 0)
        return is_get ? ORIGIN_R_WS : ORIGIN_R_BAD_METHOD;
    if (strcmp(path, "/small") == 0) {
        *a = ORIGIN_SMALL_BYTES;
    } else if (strcmp(path, "/1m") == 0) {
        *a = UINT64_C(1) << 20;
    } else if (strcmp(path, "/1g") == 0) {
        *a = UINT64_C(1) << 30;
    } else if (strcmp(path, "/bytes") == 0) {
        *a = 0;
        if (query_u64(query, "n", ORIGIN_BYTES_MAX, a) != 0)
            return ORIGIN_R_BAD_QUERY;
    } else if (strcmp(path, "/sse") == 0) {
        *a = 10;
        *b = 100;
        if (query_u64(query, "n", ORIGIN_SSE_MAX_EVENTS, a) < 0 ||
            query_u64(query, "interval_ms", ORIGIN_SSE_MAX_INTERVAL_MS, b) < 0)
            return ORIGIN_R_BAD_QUERY;
        return is_get ? ORIGIN_R_SSE : ORIGIN_R_BAD_METHOD;
    } else {
        return ORIGIN_R_NOT_FOUND;
    }
    return is_get ? ORIGIN_R_BYTES : ORIGIN_R_BAD_METHOD;
}

/* Answers the request just completed. Returns 0 or -1 (close at once). */
static int conn_respond(struct origin_conn *c)
{
    uint64_t a = 0;
    uint64_t b = 0;
    c->ctx->requests++;
    if (c->url_too_long) {
        c->keep_alive = false;
        return conn_simple(c, 414, "URI Too Long", "{\"error\":\"uri_too_long\"}\n");
    }
    switch (conn_route(c, &a, &b)) {
    case ORIGIN_R_BYTES:
        if (conn_add_printf(c,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                            "Content-Length: %llu\r\nConnection: %s\r\n\r\n",
                            (unsigned long long)a, conn_connection_hdr(c)) != 0)
            return -1;
        c->body_left = a;
        if (conn_fill(c) != 0)
            return -1;
        c->busy = c->body_left > 0;
        return 0;
    case ORIGIN_R_SSE:
        return conn_start_sse(c, a, b);
    case ORIGIN_R_WS:
        return conn_start_ws(c);
    case ORIGIN_R_SINK: {
        char body[64];
        int len = util_snprintf(body, sizeof(body), "{\"bytes\":%llu}\n",
                                (unsigned long long)c->sink_bytes);
        if (len < 0)
            return -1;
        return conn_add_printf(c,
                               "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               "Content-Length: %d\r\nConnection: %s\r\n\r\n%s",
                               len, conn_connection_hdr(c), body);
    }
    case ORIGIN_R_BAD_METHOD:
        return conn_simple(c, 405, "Method Not Allowed", "{\"error\":\"method_not_allowed\"}\n");
    case ORIGIN_R_BAD_QUERY:
        return conn_simple(c, 400, "Bad Request", "{\"error\":\"bad_query\"}\n");
    case ORIGIN_R_NOT_FOUND:
        break;
    }
    return conn_simple(c, 404, "Not Found", "{\"error\":\"not_found\"}\n");
}

static int on_message_begin(http_parser *p)
{
    struct origin_conn *c = p->data;
    c->url_len = 0;
    c->url[0] = '\0';
    c->url_too_long = false;
    c->hdr_name_len = 0;
    c->hdr_value_len = 0;
    c->in_value = false;
    c->expect_continue = false;
    c->h_upgrade_ws = false;
    c->h_connection_upgrade = false;
    c->h_ws_version_13 = false;
    c->ws_key_len = 0;
    c->ws_key[0] = '\0';
    c->sink_bytes = 0;
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len)
{
    struct origin_conn *c = p->data;
    if (len > ORIGIN_URL_MAX - c->url_len) {
        c->url_too_long = true;
        return 0;
    }
    memcpy(c->url + c->url_len, at, len);
    c->url_len += len;
    c->url[c->url_len] = '\0';
    return 0;
}

/* Only Expect and the WebSocket upgrade headers matter here; names and
 * values may arrive in pieces. */
static void conn_header_end(struct origin_conn *c)
{
    c->hdr_name[c->hdr_name_len] = '\0';
    c->hdr_value[c->hdr_value_len] = '\0';
    if (strcasecmp(c->hdr_name, "expect") == 0 && strcasecmp(c->hdr_value, "100-continue") == 0)
        c->expect_continue = true;
    else if (strcasecmp(c->hdr_name, "upgrade") == 0 && has_token(c->hdr_value, "websocket"))
        c->h_upgrade_ws = true;
    else if (strcasecmp(c->hdr_name, "connection") == 0 && has_token(c->hdr_value, "upgrade"))
        c->h_connection_upgrade = true;
    else if (strcasecmp(c->hdr_name, "sec-websocket-version") == 0 &&
             strcmp(c->hdr_value, "13") == 0)
        c->h_ws_version_13 = true;
    else if (strcasecmp(c->hdr_name, "sec-websocket-key") == 0) {
        memcpy(c->ws_key, c->hdr_value, c->hdr_value_len + 1);
        c->ws_key_len = c->hdr_value_len;
    }
    c->hdr_name_len = 0;
    c->hdr_value_len = 0;
}

static void append_capped(char *dst, size_t *dlen, size_t cap, const char *at, size_t len)
{
    size_t n = len < cap - *dlen ? len : cap - *dlen;
    memcpy(dst + *dlen, at, n);
    *dlen += n;
}

static int on_header_field(http_parser *p, const char *at, size_t len)
{
    struct origin_conn *c = p->data;
    if (c->in_value) {
        conn_header_end(c);
        c->in_value = false;
    }
    append_capped(c->hdr_name, &c->hdr_name_len, ORIGIN_HDR_NAME_MAX, at, len);
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    struct origin_conn *c = p->data;
    c->in_value = true;
    append_capped(c->hdr_value, &c->hdr_value_len, ORIGIN_HDR_VALUE_MAX, at, len);
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    struct origin_conn *c = p->data;
    if (c->in_value) {
        conn_header_end(c);
        c->in_value = false;
    }
    c->keep_alive = http_should_keep_alive(p) != 0;
    /* RFC 9110 10.1.1: a client waiting for 100 gets it before the body. */
    if (c->expect_continue && conn_add_printf(c, "HTTP/1.1 100 Continue\r\n\r\n") != 0)
        return -1;
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    struct origin_conn *c = p->data;
    c->sink_bytes += len;
    return 0;
}

static int on_message_complete(http_parser *p)
{
    struct origin_conn *c = p->data;
    if (conn_respond(c) != 0)
        return -1;
    /* One request at a time: the caller resumes once this answer is queued. */
    http_parser_pause(p, 1);
    return 0;
}

/* Feeds buffered input to the parser, one request at a time. */
static void conn_process_input(struct origin_conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    while (!c->busy && !c->closing) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        size_t n = http_parser_execute(&c->parser, &c->ctx->settings, v.iov_base, v.iov_len);
        evbuffer_drain(in, n);
        enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
        if (err == HPE_PAUSED) {
            if (!c->busy && c->keep_alive)
                http_parser_pause(&c->parser, 0);
            else if (!c->busy)
                c->closing = true;
            continue;
        }
        if (err != HPE_OK) {
            LOG_WARN(c->ctx->log, "bad_request", LOG_U("conn", c->id),
                     LOG_S("err", http_errno_name(err)));
            c->keep_alive = false;
            conn_simple(c, 400, "Bad Request", "{\"error\":\"bad_request\"}\n");
            c->closing = true;
        }
    }
    if (c->ws != NULL && !c->closing)
        conn_ws_run(c);
    if (c->closing)
        bufferevent_disable(c->bev, EV_READ);
}

static void on_read(struct bufferevent *bev, void *arg)
{
    struct origin_conn *c = arg;
    conn_process_input(c);
    if (c->closing && evbuffer_get_length(bufferevent_get_output(bev)) == 0)
        conn_free(c);
}

static void on_write(struct bufferevent *bev, void *arg)
{
    struct origin_conn *c = arg;
    if (c->ws != NULL && !c->closing)
        conn_ws_run(c);
    if (c->body_left > 0) {
        if (conn_fill(c) != 0) {
            conn_free(c);
            return;
        }
        if (c->body_left == 0)
            conn_response_done(c);
    }
    if (c->closing && evbuffer_get_length(bufferevent_get_output(bev)) == 0)
        conn_free(c);
}

static void on_event(struct bufferevent *bev, short what, void *arg)
{
    struct origin_conn *c = arg;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
        conn_free(c);
}

static void on_accept(struct evconnlistener *lsn, evutil_socket_t fd, struct sockaddr *sa,
                      int salen, void *arg)
{
    struct origin_ctx *ctx = arg;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct origin_conn *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        evutil_closesocket(fd);
        return;
    }
    c->bev = bufferevent_socket_new(ctx->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (c->bev == NULL) {
        evutil_closesocket(fd);
        free(c);
        return;
    }
    c->ctx = ctx;
    c->id = ++ctx->next_id;
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->next = ctx->conns;
    if (ctx->conns != NULL)
        ctx->conns->prev = c;
    ctx->conns = c;
    bufferevent_setcb(c->bev, on_read, on_write, on_event, c);
    bufferevent_setwatermark(c->bev, EV_READ, 0, ORIGIN_IN_HIGH_BYTES);
    bufferevent_setwatermark(c->bev, EV_WRITE, ORIGIN_OUT_LOW_BYTES, 0);
    bufferevent_set_max_single_read(c->bev, ORIGIN_IO_CHUNK_BYTES);
    bufferevent_set_max_single_write(c->bev, ORIGIN_IO_CHUNK_BYTES);
    if (bufferevent_enable(c->bev, EV_READ | EV_WRITE) != 0)
        conn_free(c);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    struct origin_ctx *ctx = arg;
    event_base_loopbreak(ctx->base);
}

static void ctx_cleanup(struct origin_ctx *ctx)
{
    while (ctx->conns != NULL)
        conn_free(ctx->conns);
    if (ctx->sigterm_ev != NULL)
        event_free(ctx->sigterm_ev);
    if (ctx->sigint_ev != NULL)
        event_free(ctx->sigint_ev);
    if (ctx->lsn != NULL)
        evconnlistener_free(ctx->lsn);
    if (ctx->base != NULL)
        event_base_free(ctx->base);
    free(ctx->pattern);
    log_free(ctx->log);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: tunnel-bench-origin [--listen ADDR:PORT]\n"
               "  HTTP/1.1 origin for bench/run (default 127.0.0.1:0). Prints\n"
               "  'listening ADDR:PORT' on stdout once ready. Routes: GET /small /1m /1g\n"
               "  /bytes?n=N /sse?n=N&interval_ms=MS /ws (WebSocket echo); POST|PUT /sink.\n");
}

/* Parses "ADDR:PORT" (IPv4) into sin. Returns 0 or -1. */
static int parse_listen(const char *s, struct sockaddr_in *sin)
{
    const char *colon = strrchr(s, ':');
    char host[64];
    uint64_t port;
    if (colon == NULL || (size_t)(colon - s) >= sizeof(host))
        return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    if (util_parse_uint(colon + 1, 65535, &port) != 0)
        return -1;
    memset(sin, 0, sizeof(*sin));
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, host, &sin->sin_addr) == 1 ? 0 : -1;
}

static int ctx_init(struct origin_ctx *ctx, const struct sockaddr_in *sin)
{
    ctx->log = log_new("tunnel-bench-origin", LOG_LVL_INFO, LOG_FMT_TEXT, 2);
    ctx->pattern = malloc(ORIGIN_PATTERN_BYTES);
    ctx->base = event_base_new();
    if (ctx->log == NULL || ctx->pattern == NULL || ctx->base == NULL)
        return -1;
    for (size_t i = 0; i < ORIGIN_PATTERN_BYTES; i++)
        ctx->pattern[i] = (i % 64 == 63) ? '\n' : (char)('a' + i % 26);

    ctx->settings.on_message_begin = on_message_begin;
    ctx->settings.on_url = on_url;
    ctx->settings.on_header_field = on_header_field;
    ctx->settings.on_header_value = on_header_value;
    ctx->settings.on_headers_complete = on_headers_complete;
    ctx->settings.on_body = on_body;
    ctx->settings.on_message_complete = on_message_complete;

    ctx->lsn = evconnlistener_new_bind(ctx->base, on_accept, ctx,
                                       LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE, 1024,
                                       (const struct sockaddr *)sin, sizeof(*sin));
    if (ctx->lsn == NULL) {
        int err = errno;
        LOG_ERROR(ctx->log, "listen_failed", LOG_S("err", strerror(err)));
        return -1;
    }
    ctx->sigint_ev = evsignal_new(ctx->base, SIGINT, on_signal, ctx);
    ctx->sigterm_ev = evsignal_new(ctx->base, SIGTERM, on_signal, ctx);
    if (ctx->sigint_ev == NULL || ctx->sigterm_ev == NULL || event_add(ctx->sigint_ev, NULL) != 0 ||
        event_add(ctx->sigterm_ev, NULL) != 0)
        return -1;
    return 0;
}

int main(int argc, char **argv)
{
    const char *listen = "127.0.0.1:0";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
            listen = argv[++i];
        } else if (strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    struct sockaddr_in sin;
    if (parse_listen(listen, &sin) != 0) {
        fprintf(stderr, "tunnel-bench-origin: bad --listen value: %s\n", listen);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    struct origin_ctx ctx = {0};
    int rc = 1;
    if (ctx_init(&ctx, &sin) != 0)
        goto out;
    struct sockaddr_in bound;
    socklen_t blen = sizeof(bound);
    if (getsockname(evconnlistener_get_fd(ctx.lsn), (struct sockaddr *)&bound, &blen) != 0)
        goto out;
    char addr[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &bound.sin_addr, addr, sizeof(addr));
    printf("listening %s:%u\n", addr, (unsigned)ntohs(bound.sin_port));
    fflush(stdout);
    if (event_base_dispatch(ctx.base) == -1)
        goto out;
    LOG_INFO(ctx.log, "origin_stop", LOG_U("requests", ctx.requests),
             LOG_U("ws_messages", ctx.ws_messages));
    rc = 0;
out:
    ctx_cleanup(&ctx);
    return rc;
}
