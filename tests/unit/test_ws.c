/* Unit tests for common/ws: handshake helpers, and real client/server
 * connections over socketpairs (one through a filter bufferevent) on one base:
 * messages at the length boundaries, 4 MiB binary, ping/pong, close
 * handshakes, protocol failures from a raw peer, freeing from inside
 * callbacks, backpressure. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "util.h"
#include "ws.h"

#define MAX_MSGS 64
#define RUN_MS 5000

struct msg {
    char *data;
    size_t len;
};

/* One side of a test connection: what its callbacks saw, and what they do. */
struct peer {
    struct ws_conn *ws;
    struct msg texts[MAX_MSGS];
    int n_text;
    struct evbuffer *bin; /* every binary byte received */
    int n_bin_calls;
    int n_close;
    int close_code;
    char close_reason[128];
    int n_writable;
    /* behaviours */
    bool free_on_text;
    bool free_on_binary;
    bool free_on_close;
    bool free_on_writable;
    bool close_on_text;
    bool fail_binary;
    bool echo_text;
    bool pause_on_binary;
    bool send_after_free; /* after ws_free in a callback, call ws_* again */
    bool in_api;          /* the test is inside a ws_* call on ws */
    bool reentered;       /* a callback of ws ran during such a call */
};

static struct event_base *g_base; /* per-test, set by setup */

static void loop_once(void)
{
    event_base_loop(g_base, EVLOOP_ONCE);
}

#define RUN_UNTIL(expr)                                                                            \
    do {                                                                                           \
        uint64_t end_ = util_mono_ms() + RUN_MS;                                                   \
        while (!(expr)) {                                                                          \
            assert_true(util_mono_ms() < end_);                                                    \
            loop_once();                                                                           \
        }                                                                                          \
    } while (0)

static void run_for_ms(uint64_t ms)
{
    uint64_t end = util_mono_ms() + ms;

    while (util_mono_ms() < end)
        loop_once();
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
}

static int setup(void **state)
{
    struct timeval tv = {0, 5000};
    struct event *tick;

    g_base = event_base_new();
    assert_non_null(g_base);
    /* Keeps EVLOOP_ONCE from blocking for long. */
    tick = event_new(g_base, -1, EV_PERSIST, on_tick, NULL);
    event_add(tick, &tv);
    *state = tick;
    return 0;
}

static int teardown(void **state)
{
    event_free(*state);
    event_base_free(g_base);
    g_base = NULL;
    return 0;
}

static void peer_init(struct peer *p)
{
    memset(p, 0, sizeof(*p));
    p->bin = evbuffer_new();
    assert_non_null(p->bin);
}

static void peer_cleanup(struct peer *p)
{
    ws_free(p->ws);
    p->ws = NULL;
    for (int i = 0; i < p->n_text && i < MAX_MSGS; i++)
        free(p->texts[i].data);
    evbuffer_free(p->bin);
}

static void cb_text(void *arg, const char *data, size_t len)
{
    struct peer *p = arg;

    if (p->in_api)
        p->reentered = true;
    assert_int_equal(data[len], '\0');
    if (p->n_text < MAX_MSGS) {
        p->texts[p->n_text].data = malloc(len + 1);
        assert_non_null(p->texts[p->n_text].data);
        memcpy(p->texts[p->n_text].data, data, len + 1);
        p->texts[p->n_text].len = len;
    }
    p->n_text++;
    if (p->echo_text) {
        p->in_api = true;
        assert_int_equal(ws_send_text(p->ws, data, len), 0);
        p->in_api = false;
    }
    if (p->close_on_text)
        assert_int_equal(ws_close(p->ws, 4000, "from on_text"), 0);
    if (p->free_on_text) {
        ws_free(p->ws);
        if (p->send_after_free) {
            /* Still allocated until the stack unwinds; calls are refused. */
            assert_int_equal(ws_send_text(p->ws, "x", 1), -1);
            assert_int_equal(ws_close(p->ws, 1000, NULL), -1);
        }
        p->ws = NULL;
    }
}

static int cb_binary(void *arg, const uint8_t *data, size_t len)
{
    struct peer *p = arg;

    if (p->in_api)
        p->reentered = true;
    assert_true(len > 0);
    assert_int_equal(evbuffer_add(p->bin, data, len), 0);
    p->n_bin_calls++;
    if (p->pause_on_binary) {
        p->pause_on_binary = false;
        ws_pause_read(p->ws, true);
    }
    if (p->free_on_binary) {
        ws_free(p->ws);
        p->ws = NULL;
        return 0;
    }
    return p->fail_binary ? -1 : 0;
}

static void cb_close(void *arg, int code, const char *reason)
{
    struct peer *p = arg;

    if (p->in_api)
        p->reentered = true;
    assert_non_null(reason);
    p->n_close++;
    p->close_code = code;
    snprintf(p->close_reason, sizeof(p->close_reason), "%s", reason);
    if (p->free_on_close) {
        ws_free(p->ws);
        p->ws = NULL;
    }
}

static void cb_writable(void *arg)
{
    struct peer *p = arg;

    if (p->in_api)
        p->reentered = true;
    p->n_writable++;
    if (p->free_on_writable) {
        ws_free(p->ws);
        p->ws = NULL;
    }
}

static const struct ws_callbacks peer_cb = {cb_text, cb_binary, cb_close, cb_writable};

static struct bufferevent *sock_bev(int fd)
{
    struct bufferevent *b;

    assert_int_equal(evutil_make_socket_nonblocking(fd), 0);
    b = bufferevent_socket_new(g_base, fd, BEV_OPT_CLOSE_ON_FREE);
    assert_non_null(b);
    return b;
}

/* A server and a client ws_conn joined by a socketpair. */
static void conn_pair(struct peer *srv, struct peer *cli, size_t max_text)
{
    int fds[2];

    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    srv->ws = ws_conn_new(g_base, sock_bev(fds[0]), false, max_text, &peer_cb, srv);
    cli->ws = ws_conn_new(g_base, sock_bev(fds[1]), true, max_text, &peer_cb, cli);
    assert_non_null(srv->ws);
    assert_non_null(cli->ws);
}

/* A ws_conn (server or client role) whose peer is a raw non-blocking fd. */
static int raw_pair(struct peer *p, bool client_role, size_t max_text)
{
    int fds[2];

    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    p->ws = ws_conn_new(g_base, sock_bev(fds[0]), client_role, max_text, &peer_cb, p);
    assert_non_null(p->ws);
    assert_int_equal(evutil_make_socket_nonblocking(fds[1]), 0);
    return fds[1];
}

/* Builds one frame; masked with a fixed key when mask is true. */
static size_t frame(uint8_t *out, bool fin, uint8_t opcode, bool mask, const void *payload,
                    size_t len)
{
    static const uint8_t key[4] = {0x12, 0x34, 0x56, 0x78};
    const uint8_t *pl = payload;
    size_t n = 0;

    out[n++] = (uint8_t)((fin ? 0x80 : 0) | opcode);
    if (len < 126) {
        out[n++] = (uint8_t)((mask ? 0x80 : 0) | len);
    } else if (len < 65536) {
        out[n++] = (uint8_t)((mask ? 0x80 : 0) | 126);
        out[n++] = (uint8_t)(len >> 8);
        out[n++] = (uint8_t)len;
    } else {
        out[n++] = (uint8_t)((mask ? 0x80 : 0) | 127);
        for (int i = 7; i >= 0; i--)
            out[n++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    if (mask) {
        memcpy(out + n, key, 4);
        n += 4;
    }
    for (size_t i = 0; i < len; i++)
        out[n + i] = mask ? pl[i] ^ key[i % 4] : pl[i];
    return n + len;
}

static void raw_write(int fd, const void *data, size_t len)
{
    assert_int_equal(write(fd, data, len), (ssize_t)len);
}

/* Reads exactly want bytes from fd, running the loop meanwhile. */
static void raw_read(int fd, uint8_t *buf, size_t want)
{
    size_t got = 0;
    uint64_t end = util_mono_ms() + RUN_MS;

    while (got < want) {
        ssize_t n = recv(fd, buf + got, want - got, MSG_DONTWAIT);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        assert_true(util_mono_ms() < end);
        loop_once();
    }
}

/* Writes all of data to a non-blocking fd, running the loop while it is full. */
static void raw_write_pump(int fd, const void *data, size_t len)
{
    const uint8_t *d = data;
    uint64_t end = util_mono_ms() + RUN_MS;

    while (len > 0) {
        ssize_t n = send(fd, d, len, MSG_DONTWAIT);
        if (n > 0) {
            d += n;
            len -= (size_t)n;
            continue;
        }
        assert_true(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
        assert_true(util_mono_ms() < end);
        loop_once();
    }
}

static void fill_pattern(uint8_t *buf, size_t len, uint32_t seed)
{
    uint32_t x = seed * 2654435761u + 1;

    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (uint8_t)x;
    }
}

/* ---- handshake helpers ---- */

static void test_accept_key(void **state)
{
    char out[29];

    /* RFC 6455 section 1.3. */
    assert_int_equal(ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", 24, out), 0);
    assert_string_equal(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_int_equal(ws_accept_key("dGhlIHNhbXBsZSBub25jZQ=", 23, out), -1);
    assert_int_equal(ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==x", 25, out), -1);
    assert_int_equal(ws_accept_key("dGhlIHNhbXBsZSBub25jZR==", 24, out), -1); /* not canonical */
    assert_int_equal(ws_accept_key("dGhlIHNhbXBsZSBub25j*Q==", 24, out), -1);
    assert_int_equal(ws_accept_key("dGhlIHNhbXBsZSBub25jZQ=A", 24, out), -1);
    assert_int_equal(ws_accept_key("dGhlIHNhbXBsZSBu\0b25jZQ==", 24, out), -1);
}

static void test_client_key(void **state)
{
    char a[25], b[25], acc[29];

    assert_int_equal(ws_client_key(a), 0);
    assert_int_equal(ws_client_key(b), 0);
    assert_int_equal(strlen(a), 24);
    assert_string_not_equal(a, b);
    assert_int_equal(ws_accept_key(a, 24, acc), 0);
}

static char *buf_str(struct evbuffer *b)
{
    size_t n = evbuffer_get_length(b);
    char *s = malloc(n + 1);

    assert_non_null(s);
    evbuffer_copyout(b, s, n);
    s[n] = '\0';
    return s;
}

static void test_client_request(void **state)
{
    struct evbuffer *b = evbuffer_new();
    char *s;

    assert_int_equal(ws_client_request(b, "gw.example:8443", "/tunnel/connect",
                                       "dGhlIHNhbXBsZSBub25jZQ==", "tunnel.v1",
                                       "User-Agent: t/1\r\nX-A: b c\r\n"),
                     0);
    s = buf_str(b);
    assert_string_equal(s, "GET /tunnel/connect HTTP/1.1\r\n"
                           "Host: gw.example:8443\r\n"
                           "Upgrade: websocket\r\n"
                           "Connection: Upgrade\r\n"
                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                           "Sec-WebSocket-Version: 13\r\n"
                           "Sec-WebSocket-Protocol: tunnel.v1\r\n"
                           "User-Agent: t/1\r\nX-A: b c\r\n"
                           "\r\n");
    free(s);
    evbuffer_drain(b, evbuffer_get_length(b));
    assert_int_equal(ws_client_request(b, "h", "/", "k", NULL, NULL), 0);
    s = buf_str(b);
    assert_null(strstr(s, "Protocol"));
    free(s);
    evbuffer_drain(b, evbuffer_get_length(b));
    /* Injection and malformed input: nothing is appended. */
    assert_int_equal(ws_client_request(b, "h\r\nX: y", "/", "k", NULL, NULL), -1);
    assert_int_equal(ws_client_request(b, "h", "x", "k", NULL, NULL), -1);
    assert_int_equal(ws_client_request(b, "h", "/a b", "k", NULL, NULL), -1);
    assert_int_equal(ws_client_request(b, "h", "/", "k", "p\n", NULL), -1);
    assert_int_equal(ws_client_request(b, "h", "/", "k", NULL, "X: y"), -1);
    assert_int_equal(ws_client_request(b, "h", "/", "k", NULL, "X: y\r\n\r\n"), -1);
    assert_int_equal(ws_client_request(b, "h", "/", "k", NULL, "X y\r\n"), -1);
    assert_int_equal(ws_client_request(b, "h", "/", "k", NULL, "X: y\nZ: w\r\n"), -1);
    assert_int_equal(evbuffer_get_length(b), 0);
    evbuffer_free(b);
}

#define KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

static int parse_str(const char *resp, const char *subproto, int *status, char *err,
                     size_t errlen, size_t *left)
{
    struct evbuffer *b = evbuffer_new();
    int rv;

    evbuffer_add(b, resp, strlen(resp));
    rv = ws_client_parse_response(b, KEY, subproto, status, err, errlen);
    if (left != NULL)
        *left = evbuffer_get_length(b);
    evbuffer_free(b);
    return rv;
}

static void test_parse_response_split(void **state)
{
    static const char resp[] = "HTTP/1.1 101 Switching Protocols\r\n"
                               "upgrade: WebSocket\r\n"
                               "Connection: keep-alive, Upgrade\r\n"
                               "Sec-WebSocket-Accept: " ACCEPT "\r\n"
                               "Sec-WebSocket-Protocol: tunnel.v1\r\n"
                               "\r\n";
    static const uint8_t trailer[] = {0x81, 0x02, 'h', 'i'};
    struct evbuffer *b = evbuffer_new();
    char err[256];
    int status = -1;
    size_t head = sizeof(resp) - 1;

    /* Byte by byte: "need more" until the blank line, then done. */
    for (size_t i = 0; i < head; i++) {
        evbuffer_add(b, resp + i, 1);
        int rv = ws_client_parse_response(b, KEY, "tunnel.v1", &status, err, sizeof(err));
        if (i + 1 < head) {
            assert_int_equal(rv, 1);
            assert_int_equal(status, 0);
            assert_int_equal(evbuffer_get_length(b), i + 1);
        } else {
            assert_int_equal(rv, 0);
            assert_int_equal(status, 101);
            assert_int_equal(evbuffer_get_length(b), 0);
        }
    }
    /* Frame bytes that came with the head stay in the buffer. */
    evbuffer_add(b, resp, head);
    evbuffer_add(b, trailer, sizeof(trailer));
    assert_int_equal(ws_client_parse_response(b, KEY, "tunnel.v1", &status, err, sizeof(err)),
                     0);
    assert_int_equal(evbuffer_get_length(b), sizeof(trailer));
    assert_memory_equal(evbuffer_pullup(b, -1), trailer, sizeof(trailer));
    evbuffer_free(b);
}

static void test_parse_response_bad(void **state)
{
    char err[256];
    int status;
    size_t left;

    assert_int_equal(parse_str("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                               "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kK+C2SxOo0xs0Z=\r\n\r\n",
                               NULL, &status, err, sizeof(err), NULL),
                     -1);
    assert_int_equal(status, 101);
    assert_non_null(strstr(err, "Sec-WebSocket-Accept"));
    /* The same with the right accept is fine (control). */
    assert_int_equal(parse_str("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                               "Sec-WebSocket-Accept: " ACCEPT "\r\n\r\n",
                               NULL, &status, err, sizeof(err), &left),
                     0);
    assert_int_equal(left, 0);
    assert_int_equal(parse_str("HTTP/1.1 101 OK\r\nConnection: upgrade\r\n"
                               "Sec-WebSocket-Accept: " ACCEPT "\r\n\r\n",
                               NULL, &status, err, sizeof(err), NULL),
                     -1);
    assert_non_null(strstr(err, "Upgrade"));
    assert_int_equal(parse_str("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: close\r\n"
                               "Sec-WebSocket-Accept: " ACCEPT "\r\n\r\n",
                               NULL, &status, err, sizeof(err), NULL),
                     -1);
    assert_non_null(strstr(err, "Connection"));
    /* Subprotocol: unrequested, missing, different. */
    assert_int_equal(parse_str("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                               "Sec-WebSocket-Accept: " ACCEPT "\r\n"
                               "Sec-WebSocket-Protocol: x\r\n\r\n",
                               NULL, &status, err, sizeof(err), NULL),
                     -1);
    assert_non_null(strstr(err, "subprotocol"));
    assert_int_equal(parse_str("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                               "Sec-WebSocket-Accept: " ACCEPT "\r\n\r\n",
                               "tunnel.v1", &status, err, sizeof(err), NULL),
                     -1);
    assert_int_equal(parse_str("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                               "Sec-WebSocket-Accept: " ACCEPT "\r\n"
                               "Sec-WebSocket-Protocol: tunnel.v2\r\n\r\n",
                               "tunnel.v1", &status, err, sizeof(err), NULL),
                     -1);
    assert_int_equal(parse_str("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                               "Sec-WebSocket-Accept: " ACCEPT "\r\n"
                               "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
                               NULL, &status, err, sizeof(err), NULL),
                     -1);
    /* Not HTTP at all: refused before a full head arrives. */
    assert_int_equal(parse_str("SSH-2.0-OpenSSH_9.2\r\n", NULL, &status, err, sizeof(err), NULL),
                     -1);
    assert_int_equal(status, 0);
    assert_non_null(strstr(err, "bad HTTP response"));
    /* A tiny err buffer is still NUL-terminated. */
    assert_int_equal(parse_str("SSH-2.0\r\n\r\n", NULL, &status, err, 4, NULL), -1);
    assert_true(strlen(err) <= 3);
}

static void test_parse_response_403(void **state)
{
    static const char head[] = "HTTP/1.1 403 Forbidden\r\n"
                               "Content-Type: application/json\r\n"
                               "Content-Length: 31\r\n\r\n";
    static const char body[] = "{\"error\":\"address_not_allowed\"}";
    struct evbuffer *b = evbuffer_new();
    char err[256];
    int status;

    assert_int_equal(strlen(body), 31);
    evbuffer_add(b, head, strlen(head));
    evbuffer_add(b, body, 10);
    /* Status known, body incomplete: wait for it. */
    assert_int_equal(ws_client_parse_response(b, KEY, NULL, &status, err, sizeof(err)), 1);
    assert_int_equal(status, 403);
    evbuffer_add(b, body + 10, strlen(body) - 10);
    assert_int_equal(ws_client_parse_response(b, KEY, NULL, &status, err, sizeof(err)), -1);
    assert_int_equal(status, 403);
    assert_string_equal(err, "HTTP 403 address_not_allowed");
    assert_int_equal(evbuffer_get_length(b), 0);
    evbuffer_free(b);

    /* Not JSON, and control characters in the error are neutralised. */
    assert_int_equal(parse_str("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5\r\n\r\nhello", NULL,
                               &status, err, sizeof(err), NULL),
                     -1);
    assert_string_equal(err, "HTTP 502");
    assert_int_equal(parse_str("HTTP/1.1 400 Bad\r\nContent-Length: 20\r\n\r\n"
                               "{\"error\":\"a\\u001bb\"}",
                               NULL, &status, err, sizeof(err), NULL),
                     -1);
    assert_string_equal(err, "HTTP 400 a?b");
}

/* ---- connections ---- */

static void check_text(const struct peer *p, int i, const void *data, size_t len)
{
    assert_true(i < p->n_text);
    assert_int_equal(p->texts[i].len, len);
    assert_memory_equal(p->texts[i].data, data, len);
}

static void test_text_and_binary_sizes(void **state)
{
    static const size_t sizes[] = {0, 1, 125, 126, 127, 65535, 65536, 65537};
    size_t n = sizeof(sizes) / sizeof(sizes[0]);
    struct peer srv, cli;
    uint8_t *buf = malloc(65537);
    char *txt = malloc(65537 + 16);

    assert_non_null(buf);
    assert_non_null(txt);
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 1 << 20);
    for (size_t i = 0; i < 65537 + 16; i++)
        txt[i] = (char)('a' + i % 26);
    for (size_t i = 0; i < n; i++) {
        fill_pattern(buf, sizes[i], (uint32_t)i);
        assert_int_equal(ws_send_text(cli.ws, txt + i, sizes[i]), 0);
        assert_int_equal(ws_send_binary(cli.ws, buf, sizes[i]), 0);
        assert_int_equal(ws_send_text(srv.ws, txt + i + 1, sizes[i]), 0);
        assert_int_equal(ws_send_binary(srv.ws, buf, sizes[i]), 0);
    }
    RUN_UNTIL(srv.n_text == (int)n && cli.n_text == (int)n);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        check_text(&srv, (int)i, txt + i, sizes[i]);
        check_text(&cli, (int)i, txt + i + 1, sizes[i]);
        total += sizes[i];
    }
    RUN_UNTIL(evbuffer_get_length(srv.bin) == total && evbuffer_get_length(cli.bin) == total);
    for (size_t i = 0; i < n; i++) {
        uint8_t *got = malloc(sizes[i] + 1);
        fill_pattern(buf, sizes[i], (uint32_t)i);
        assert_int_equal(evbuffer_remove(srv.bin, got, sizes[i]), (int)sizes[i]);
        assert_memory_equal(got, buf, sizes[i]);
        assert_int_equal(evbuffer_remove(cli.bin, got, sizes[i]), (int)sizes[i]);
        assert_memory_equal(got, buf, sizes[i]);
        free(got);
    }
    /* Invalid UTF-8 is refused before anything is queued. */
    assert_int_equal(ws_send_text(cli.ws, "\xc3\x28", 2), -1);
    assert_int_equal(ws_send_text(cli.ws, "\xed\xa0\x80", 3), -1); /* surrogate */
    assert_int_equal(ws_send_text(cli.ws, "\xc0\xaf", 2), -1);     /* overlong */
    assert_int_equal(ws_send_text(cli.ws, "caf\xc3\xa9 \xf0\x9f\x98\x80", 10), 0);
    RUN_UNTIL(srv.n_text == (int)n + 1);
    check_text(&srv, (int)n, "caf\xc3\xa9 \xf0\x9f\x98\x80", 10);
    assert_int_equal(srv.n_close + cli.n_close, 0);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
    free(buf);
    free(txt);
}

static void check_big(struct peer *to, const uint8_t *data, size_t len)
{
    uint8_t *got = malloc(len);

    RUN_UNTIL(evbuffer_get_length(to->bin) == len);
    assert_int_equal(evbuffer_remove(to->bin, got, len), (int)len);
    assert_memory_equal(got, data, len);
    free(got);
}

static void test_binary_4mib(void **state)
{
    const size_t len = 4u << 20;
    uint8_t *data = malloc(len);
    struct peer srv, cli;
    struct evbuffer *src = evbuffer_new();

    fill_pattern(data, len, 99);
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 1024);
    /* One message each way, from memory. */
    assert_int_equal(ws_send_binary(cli.ws, data, len), 0);
    assert_int_equal(ws_send_binary(srv.ws, data, len), 0);
    check_big(&srv, data, len);
    check_big(&cli, data, len);
    assert_true(srv.n_bin_calls > 1); /* streamed, not assembled */
    /* From an evbuffer of many odd chains, leaving a tail behind. */
    for (size_t off = 0; off < len; off += 12345)
        evbuffer_add(src, data + off, len - off < 12345 ? len - off : 12345);
    evbuffer_add(src, "tail", 4);
    assert_int_equal(ws_send_binary_buffer(cli.ws, src, len), 0);
    assert_int_equal(evbuffer_get_length(src), 4);
    for (size_t off = 0; off < len; off += 54321)
        evbuffer_add(src, data + off, len - off < 54321 ? len - off : 54321);
    assert_int_equal(ws_send_binary_buffer(srv.ws, src, len + 4), 0);
    assert_int_equal(evbuffer_get_length(src), 0);
    /* More than src holds is refused. */
    evbuffer_add(src, "ab", 2);
    assert_int_equal(ws_send_binary_buffer(srv.ws, src, 3), -1);
    assert_int_equal(evbuffer_get_length(src), 2);
    check_big(&srv, data, len);
    RUN_UNTIL(evbuffer_get_length(cli.bin) == len + 4);
    assert_memory_equal(evbuffer_pullup(cli.bin, 4), "tail", 4);
    evbuffer_drain(cli.bin, 4);
    check_big(&cli, data, len);
    assert_int_equal(srv.n_close + cli.n_close, 0);
    evbuffer_free(src);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
    free(data);
}

static void test_ping_pong(void **state)
{
    struct peer srv, cli;

    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 1024);
    assert_int_equal(ws_last_pong_ms(cli.ws), 0);
    assert_int_equal(ws_last_pong_ms(srv.ws), 0);
    assert_int_equal(ws_ping(cli.ws), 0);
    RUN_UNTIL(ws_last_pong_ms(cli.ws) != 0);
    assert_int_equal(ws_ping(srv.ws), 0);
    RUN_UNTIL(ws_last_pong_ms(srv.ws) != 0);
    assert_true(ws_last_rx_ms(srv.ws) > 0);
    assert_int_equal(srv.n_text + cli.n_text + srv.n_close + cli.n_close, 0);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

static void test_close_handshake(void **state)
{
    struct peer srv, cli;

    /* Client-initiated, application code. */
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 1024);
    assert_int_equal(ws_send_text(cli.ws, "last", 4), 0);
    assert_int_equal(ws_close(cli.ws, 4001, "bye"), 0);
    assert_int_equal(ws_close(cli.ws, 4002, "again"), 0); /* idempotent */
    assert_false(ws_is_writable(cli.ws));
    assert_int_equal(ws_send_text(cli.ws, "x", 1), -1);
    assert_int_equal(ws_ping(cli.ws), -1);
    RUN_UNTIL(srv.n_close == 1 && cli.n_close == 1);
    assert_int_equal(srv.n_text, 1);
    assert_int_equal(srv.close_code, 4001);
    assert_string_equal(srv.close_reason, "bye");
    assert_int_equal(cli.close_code, 4001);
    assert_string_equal(cli.close_reason, "bye");
    assert_int_equal(ws_close(cli.ws, 1000, NULL), -1); /* already reported */
    run_for_ms(20);
    assert_int_equal(srv.n_close + cli.n_close, 2); /* once each */
    peer_cleanup(&srv);
    peer_cleanup(&cli);

    /* Server-initiated, reason cut at 123 bytes on a character boundary. */
    char reason[200];
    memset(reason, 'r', sizeof(reason));
    memcpy(reason + 120, "\xc3\xa9", 2); /* bytes 120-121: fits */
    memcpy(reason + 122, "\xc3\xa9", 2); /* bytes 122-123 straddle the cut */
    reason[199] = '\0';
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 1024);
    assert_int_equal(ws_close(srv.ws, 1001, reason), 0);
    RUN_UNTIL(srv.n_close == 1 && cli.n_close == 1);
    assert_int_equal(cli.close_code, 1001);
    assert_int_equal(strlen(cli.close_reason), 122);
    assert_memory_equal(cli.close_reason, reason, 122);
    assert_int_equal(srv.close_code, 1001);
    peer_cleanup(&srv);
    peer_cleanup(&cli);

    /* Bad codes are refused. */
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 1024);
    assert_int_equal(ws_close(srv.ws, 1005, NULL), -1);
    assert_int_equal(ws_close(srv.ws, 1006, NULL), -1);
    assert_int_equal(ws_close(srv.ws, 999, NULL), -1);
    assert_int_equal(ws_close(srv.ws, 5000, NULL), -1);
    assert_true(ws_is_writable(srv.ws));
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

static void test_oversized_text(void **state)
{
    struct peer srv, cli;
    char big[101];

    memset(big, 'x', sizeof(big));
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    assert_int_equal(ws_send_text(cli.ws, big, 100), 0); /* exactly max_text: fine */
    assert_int_equal(ws_send_text(cli.ws, big, 101), 0);
    assert_int_equal(ws_send_text(cli.ws, "after", 5), 0);
    RUN_UNTIL(srv.n_close == 1 && cli.n_close == 1);
    assert_int_equal(srv.n_text, 1);
    assert_int_equal(srv.close_code, WS_CLOSE_TOO_BIG);
    assert_int_equal(cli.close_code, WS_CLOSE_TOO_BIG);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

static void test_eof(void **state)
{
    struct peer srv, cli;

    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    ws_free(cli.ws); /* no close frame, just gone */
    cli.ws = NULL;
    RUN_UNTIL(srv.n_close == 1);
    assert_int_equal(srv.close_code, WS_CLOSE_ABNORMAL);
    assert_int_equal(cli.n_close, 0); /* ws_free never calls back */
    peer_cleanup(&srv);
    peer_cleanup(&cli);

    /* EOF in the middle of a frame. */
    struct peer p;
    uint8_t f[64];
    peer_init(&p);
    int fd = raw_pair(&p, false, 100);
    size_t n = frame(f, true, 1, true, "hello", 5);
    raw_write(fd, f, n - 2);
    close(fd);
    RUN_UNTIL(p.n_close == 1);
    assert_int_equal(p.close_code, WS_CLOSE_ABNORMAL);
    assert_int_equal(p.n_text, 0);
    peer_cleanup(&p);
}

/* The server got a frame that breaks the protocol: it closes with code. */
static void expect_server_fails(const uint8_t *in, size_t len, int code)
{
    struct peer p;
    uint8_t resp[4];

    peer_init(&p);
    int fd = raw_pair(&p, false, 100);
    raw_write(fd, in, len);
    raw_read(fd, resp, 4);
    assert_int_equal(resp[0], 0x88); /* FIN + close, unmasked */
    assert_int_equal(resp[1], 2); /* wslay's closes carry no reason */
    assert_int_equal(resp[2] << 8 | resp[3], code);
    RUN_UNTIL(p.n_close == 1);
    assert_int_equal(p.close_code, code);
    assert_int_equal(p.n_text, 0);
    assert_int_equal(evbuffer_get_length(p.bin), 0);
    close(fd);
    peer_cleanup(&p);
}

static void test_protocol_errors(void **state)
{
    uint8_t f[300];
    size_t n;

    n = frame(f, true, 1, false, "hi", 2); /* unmasked from a client */
    expect_server_fails(f, n, WS_CLOSE_PROTOCOL_ERROR);
    n = frame(f, true, 1, true, "hi", 2);
    f[0] |= 0x40; /* RSV1 without an extension */
    expect_server_fails(f, n, WS_CLOSE_PROTOCOL_ERROR);
    n = frame(f, true, 3, true, "hi", 2); /* reserved opcode */
    expect_server_fails(f, n, WS_CLOSE_PROTOCOL_ERROR);
    n = frame(f, true, 0, true, "hi", 2); /* continuation with nothing to continue */
    expect_server_fails(f, n, WS_CLOSE_PROTOCOL_ERROR);
    n = frame(f, true, 1, true, "\xc3\x28", 2); /* invalid UTF-8 */
    expect_server_fails(f, n, WS_CLOSE_INVALID_DATA);
    n = frame(f, false, 1, true, "ab", 2); /* text, then text without continuing */
    n += frame(f + n, true, 1, true, "cd", 2);
    expect_server_fails(f, n, WS_CLOSE_PROTOCOL_ERROR);
    n = frame(f, true, 8, true, "\x03\xed", 2); /* 1005: nobody may send it */
    expect_server_fails(f, n, WS_CLOSE_PROTOCOL_ERROR);
}

static void test_protocol_errors_frame_level(void **state)
{
    /* Control frames over 125 bytes or fragmented: refused on the header
     * (wslay's frame layer would send a close without a code). */
    static const uint8_t bad[][2] = {{0x89, 0x80 | 126}, {0x09, 0x80}};
    for (size_t i = 0; i < 2; i++) {
        struct peer p;
        uint8_t f[200] = {0};
        uint8_t resp[2];
        peer_init(&p);
        int fd = raw_pair(&p, false, 100);
        memcpy(f, bad[i], 2);
        raw_write(fd, f, 2 + 2 + 4 + 130);
        raw_read(fd, resp, 2);
        assert_int_equal(resp[0], 0x88);
        /* refused before wslay sees the frame: the close says 1002 */
        assert_true((resp[1] & 0x7f) >= 2);
        raw_read(fd, resp, 2);
        assert_int_equal(resp[0] << 8 | resp[1], WS_CLOSE_PROTOCOL_ERROR);
        RUN_UNTIL(p.n_close == 1);
        assert_int_equal(p.close_code, WS_CLOSE_PROTOCOL_ERROR);
        close(fd);
        peer_cleanup(&p);
    }
}

/* A text frame declaring more than max_text is refused (1009) on its header,
 * before a byte of payload; nothing is reserved for the declared length. */
static void test_declared_text_refused_at_once(void **state)
{
    static const uint8_t heads[][14] = {
        {0x81, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4},     /* 4 GiB */
        {0x81, 0x80 | 126, 0x01, 0x00, 1, 2, 3, 4},                 /* 256 > 100 */
        {0x01, 0x80 | 50, 1, 2, 3, 4},                              /* 50, then ... */
    };
    static const size_t lens[] = {14, 8, 6};

    for (size_t i = 0; i < 3; i++) {
        struct peer p;
        uint8_t resp[4];
        uint8_t f[128];
        peer_init(&p);
        int fd = raw_pair(&p, false, 100);
        raw_write(fd, heads[i], lens[i]);
        if (i == 2) { /* ... a continuation taking the message past 100 */
            uint8_t pl[50];
            memset(pl, 'a', sizeof(pl));
            raw_write(fd, pl, sizeof(pl)); /* key 01020304 unmasks to something: */
            size_t n = frame(f, true, 0, true, "", 0);
            f[1] = 0x80 | 51;
            raw_write(fd, f, n);
        }
        raw_read(fd, resp, 4);
        assert_int_equal(resp[0], 0x88);
        assert_int_equal(resp[2] << 8 | resp[3], WS_CLOSE_TOO_BIG);
        RUN_UNTIL(p.n_close == 1);
        assert_int_equal(p.n_text, 0);
        close(fd);
        peer_cleanup(&p);
    }
}

/* A frame refused on its header once a close is under way (here: our owner
 * closed on the first message) stops reading: found by fuzz_h1_head, ws_recv
 * used to spin on the same header forever (fuzz/corpus/h1_head/
 * ws_bad_frame_after_close_spin). */
static void test_refused_frame_while_closing(void **state)
{
    static const uint8_t bad[][2] = {{0x09, 0x80}, {0x89, 0x80 | 126}, {0x81, 0x80 | 127}};

    for (size_t i = 0; i < 3; i++) {
        struct peer p;
        uint8_t f[64];
        uint8_t resp[4];
        size_t n;
        peer_init(&p);
        p.close_on_text = true;
        int fd = raw_pair(&p, false, 100);
        n = frame(f, true, 1, true, "x", 1);
        memcpy(f + n, bad[i], 2);
        memset(f + n + 2, 0xff, 12); /* lengths, key: whatever the header needs */
        raw_write(fd, f, n + 14);
        raw_read(fd, resp, 4);
        assert_int_equal(resp[0], 0x88);
        raw_write(fd, (const uint8_t[]){0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8}, 8);
        RUN_UNTIL(p.n_close == 1);
        assert_int_equal(p.n_text, 1);
        close(fd);
        peer_cleanup(&p);
    }
}

/* ws_set_max_text raises the cap (as after authentication); a message is
 * assembled from frames much larger than the first room taken. */
static void test_set_max_text(void **state)
{
    struct peer srv, cli;
    size_t n = 300 * 1024;
    char *big = malloc(n);

    assert_non_null(big);
    memset(big, 'y', n);
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    ws_set_max_text(srv.ws, n);
    assert_int_equal(ws_send_text(cli.ws, big, n), 0);
    assert_int_equal(ws_send_text(cli.ws, "x", 1), 0);
    RUN_UNTIL(srv.n_text == 2);
    assert_int_equal(srv.texts[0].len, n);
    assert_memory_equal(srv.texts[0].data, big, n);
    assert_int_equal(srv.texts[1].len, 1);
    ws_set_max_text(srv.ws, 10);
    assert_int_equal(ws_send_text(cli.ws, "0123456789A", 11), 0);
    RUN_UNTIL(srv.n_close == 1 && cli.n_close == 1);
    assert_int_equal(srv.close_code, WS_CLOSE_TOO_BIG);
    free(big);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

static void test_client_refuses_masked(void **state)
{
    struct peer p;
    uint8_t f[64], resp[8];
    size_t n;

    peer_init(&p);
    int fd = raw_pair(&p, true, 100);
    n = frame(f, true, 1, true, "hi", 2); /* masked from a server */
    raw_write(fd, f, n);
    raw_read(fd, resp, 8); /* the client's close is masked: 2 + 4 + 2 */
    assert_int_equal(resp[0], 0x88);
    assert_int_equal(resp[1], 0x80 | 2);
    assert_int_equal((resp[6] ^ resp[2]) << 8 | (resp[7] ^ resp[3]), WS_CLOSE_PROTOCOL_ERROR);
    RUN_UNTIL(p.n_close == 1);
    assert_int_equal(p.close_code, WS_CLOSE_PROTOCOL_ERROR);
    close(fd);
    peer_cleanup(&p);
}

static void test_client_masks(void **state)
{
    struct peer p;
    uint8_t got[2][10];

    peer_init(&p);
    int fd = raw_pair(&p, true, 100);
    assert_int_equal(ws_send_text(p.ws, "aaaa", 4), 0);
    assert_int_equal(ws_send_binary(p.ws, "aaaa", 4), 0);
    raw_read(fd, got[0], 10);
    raw_read(fd, got[1], 10);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(got[i][0], 0x80 | (i == 0 ? 1 : 2));
        assert_int_equal(got[i][1], 0x80 | 4);
        for (int j = 0; j < 4; j++)
            assert_int_equal(got[i][6 + j] ^ got[i][2 + j], 'a');
    }
    /* A fresh key per frame (RFC 6455 section 5.3). */
    assert_memory_not_equal(got[0] + 2, got[1] + 2, 4);
    close(fd);
    peer_cleanup(&p);
}

/* Messages of two buffers (frames queued before, a payload after), masked
 * straight from both: the peer gets the bytes in order; a fresh key for
 * every frame, past the 16 keys one CSPRNG call gives. */
static void test_binary_buffers(void **state)
{
    struct peer p;
    struct evbuffer *a = evbuffer_new(), *b = evbuffer_new();
    uint8_t keys[40][4];
    static uint8_t data[70000], got[70000 + 14];

    fill_pattern(data, sizeof(data), 7);
    peer_init(&p);
    int fd = raw_pair(&p, true, 100);
    for (int i = 0; i < 40; i++) {
        size_t alen = (size_t)(i * 37) % 200, blen = 1 + (size_t)(i * 7919) % (sizeof(data) - 200);
        size_t hl = alen + blen < 126 ? 2 : alen + blen < 65536 ? 4 : 10;
        evbuffer_add(a, data, alen);
        evbuffer_add(a, "x", 1); /* left behind */
        for (size_t off = 0; off < blen; off += 4099)
            evbuffer_add(b, data + alen + off, blen - off < 4099 ? blen - off : 4099);
        assert_int_equal(ws_send_binary_buffers(p.ws, a, alen, b, blen), 0);
        assert_int_equal(evbuffer_get_length(a), 1);
        assert_int_equal(evbuffer_get_length(b), 0);
        evbuffer_drain(a, 1);
        raw_read(fd, got, hl + 4 + alen + blen);
        assert_int_equal(got[0], 0x82);
        assert_true(got[1] & 0x80);
        memcpy(keys[i], got + hl, 4);
        for (size_t j = 0; j < alen + blen; j++)
            assert_int_equal(got[hl + 4 + j] ^ keys[i][j & 3], data[j]);
        for (int k = 0; k < i; k++)
            assert_memory_not_equal(keys[k], keys[i], 4);
    }
    /* refused, both buffers untouched: too few bytes in either, one buffer twice */
    evbuffer_add(a, "abc", 3);
    evbuffer_add(b, "de", 2);
    assert_int_equal(ws_send_binary_buffers(p.ws, a, 4, b, 2), -1);
    assert_int_equal(ws_send_binary_buffers(p.ws, a, 3, b, 3), -1);
    assert_int_equal(ws_send_binary_buffers(p.ws, a, 1, a, 1), -1);
    assert_int_equal(evbuffer_get_length(a), 3);
    assert_int_equal(evbuffer_get_length(b), 2);
    assert_int_equal(p.n_close, 0);
    evbuffer_free(a);
    evbuffer_free(b);
    close(fd);
    peer_cleanup(&p);
}

static void test_raw_fragments_and_ping(void **state)
{
    struct peer p;
    uint8_t f[512], resp[5];
    size_t n = 0;

    peer_init(&p);
    int fd = raw_pair(&p, false, 100);
    n += frame(f + n, false, 1, true, "he", 2);
    n += frame(f + n, true, 9, true, "abc", 3); /* ping between fragments */
    n += frame(f + n, false, 0, true, "ll", 2);
    n += frame(f + n, true, 0, true, "o", 1);
    n += frame(f + n, false, 2, true, "\x01\x02", 2);
    n += frame(f + n, true, 0, true, "\x03", 1);
    n += frame(f + n, true, 1, true, "", 0); /* empty text message */
    /* Split at every offset would be slow; split in three odd places. */
    raw_write(fd, f, 3);
    run_for_ms(5);
    raw_write(fd, f + 3, 9);
    run_for_ms(5);
    raw_write(fd, f + 12, n - 12);
    raw_read(fd, resp, 5);
    assert_memory_equal(resp, "\x8a\x03" "abc", 5); /* pong, unmasked, same payload */
    RUN_UNTIL(p.n_text == 2 && evbuffer_get_length(p.bin) == 3);
    check_text(&p, 0, "hello", 5);
    check_text(&p, 1, "", 0);
    assert_memory_equal(evbuffer_pullup(p.bin, -1), "\x01\x02\x03", 3);
    assert_int_equal(p.n_close, 0);
    close(fd);
    peer_cleanup(&p);
}

/* An idle connection holds no wslay context: one comes for a frame that is
 * not a whole binary message, a pong or a close, and goes once the message
 * is complete and nothing is queued. */
static void test_idle_holds_no_parser(void **state)
{
    struct peer p;
    uint8_t f[256], resp[16];
    size_t n;

    peer_init(&p);
    int fd = raw_pair(&p, false, 100);
    run_for_ms(5);
    assert_false(ws_parser_live(p.ws));
    /* whole binary messages: the fast path, no parser */
    n = frame(f, true, 2, true, "\x01\x02", 2);
    n += frame(f + n, true, 2, true, "\x03", 1);
    raw_write(fd, f, n);
    RUN_UNTIL(evbuffer_get_length(p.bin) == 3);
    assert_false(ws_parser_live(p.ws));
    /* a fragmented text message: live until its last fragment */
    n = frame(f, false, 1, true, "he", 2);
    raw_write(fd, f, n);
    RUN_UNTIL(ws_parser_live(p.ws));
    run_for_ms(5);
    assert_true(ws_parser_live(p.ws));
    n = frame(f, true, 0, true, "llo", 3);
    raw_write(fd, f, n);
    RUN_UNTIL(p.n_text == 1);
    run_for_ms(5);
    check_text(&p, 0, "hello", 5);
    assert_false(ws_parser_live(p.ws));
    /* a ping: its pong sent, then none again */
    n = frame(f, true, 9, true, "ab", 2);
    raw_write(fd, f, n);
    raw_read(fd, resp, 4);
    assert_memory_equal(resp, "\x8a\x02" "ab", 4);
    run_for_ms(5);
    assert_false(ws_parser_live(p.ws));
    /* our own ping: queued, sent, gone */
    assert_int_equal(ws_ping(p.ws), 0);
    raw_read(fd, resp, 10);
    assert_int_equal(resp[0], 0x89);
    assert_false(ws_parser_live(p.ws));
    /* a close keeps it to the end */
    assert_int_equal(ws_close(p.ws, 1000, "bye"), 0);
    assert_true(ws_parser_live(p.ws));
    assert_int_equal(p.n_close, 0);
    close(fd);
    peer_cleanup(&p);
}

/* Whole binary messages take ws's own path (ws_fast_ok), everything else
 * wslay's. A stream mixing both, written in odd-sized pieces so that headers,
 * masking keys and payloads split at every kind of offset, must come out
 * byte for byte, with the mask's phase carried across pieces. */
static void fast_path_stream(bool client_role, size_t piece)
{
    static const size_t sizes[] = {0, 1, 3, 125, 126, 4097, 65535, 65536, 70001};
    const size_t nsizes = sizeof(sizes) / sizeof(sizes[0]);
    bool mask = !client_role;
    size_t cap = 300000, n = 0, total = 0;
    uint8_t *f = malloc(cap), *expect = malloc(cap), *pl = malloc(80000), pong[5];
    struct peer p;

    assert_non_null(f);
    assert_non_null(expect);
    assert_non_null(pl);
    peer_init(&p);
    int fd = raw_pair(&p, client_role, 100);
    for (size_t i = 0; i < nsizes; i++) {
        fill_pattern(pl, sizes[i], (uint32_t)i + 1);
        n += frame(f + n, true, 2, mask, pl, sizes[i]);
        memcpy(expect + total, pl, sizes[i]);
        total += sizes[i];
        if (i == 2)
            n += frame(f + n, true, 9, mask, "abc", 3); /* ping: wslay's */
        if (i == 4) {
            /* a fragmented binary message: wslay's, a ping inside it */
            n += frame(f + n, false, 2, mask, "\x01\x02", 2);
            n += frame(f + n, true, 9, mask, "xyz", 3);
            n += frame(f + n, true, 0, mask, "\x03", 1);
            memcpy(expect + total, "\x01\x02\x03", 3);
            total += 3;
        }
        if (i == 6)
            n += frame(f + n, true, 1, mask, "text", 4);
    }
    assert_true(n <= cap);
    for (size_t off = 0; off < n; off += piece) {
        size_t k = n - off < piece ? n - off : piece;
        raw_write_pump(fd, f + off, k);
        /* let ws read each piece on its own (tiny ones: now and then) */
        if (piece >= 64 || off % 256 == 0)
            loop_once();
    }
    RUN_UNTIL(evbuffer_get_length(p.bin) == total && p.n_text == 1);
    assert_memory_equal(evbuffer_pullup(p.bin, -1), expect, total);
    check_text(&p, 0, "text", 4);
    assert_int_equal(p.n_close, 0);
    if (!client_role) {
        raw_read(fd, pong, 5);
        assert_memory_equal(pong, "\x8a\x03" "abc", 5);
    }
    close(fd);
    peer_cleanup(&p);
    free(f);
    free(expect);
    free(pl);
}

static void test_fast_path_server(void **state)
{
    static const size_t pieces[] = {1, 7, 13, 4099, 65537, 1u << 20};
    for (size_t i = 0; i < sizeof(pieces) / sizeof(pieces[0]); i++)
        fast_path_stream(false, pieces[i]);
}

static void test_fast_path_client(void **state)
{
    static const size_t pieces[] = {1, 13, 4099, 1u << 20};
    for (size_t i = 0; i < sizeof(pieces) / sizeof(pieces[0]); i++)
        fast_path_stream(true, pieces[i]);
}

/* A binary frame the fast path must not take is still judged by wslay. */
static void test_fast_path_refusals(void **state)
{
    uint8_t f[300];
    size_t n;

    n = frame(f, true, 2, false, "hi", 2); /* unmasked binary from a client */
    expect_server_fails(f, n, WS_CLOSE_PROTOCOL_ERROR);
    n = frame(f, true, 2, true, "hi", 2);
    f[0] |= 0x20; /* RSV2 */
    expect_server_fails(f, n, WS_CLOSE_PROTOCOL_ERROR);
    /* Lengths not minimally encoded (5 in the 16-bit form, 200 in the
     * 64-bit form): wslay's frame layer closes without a code, 1002. */
    static const char *const bad[] = {"\x82\xfe\x00\x05",
                                      "\x82\xff\x00\x00\x00\x00\x00\x00\x00\xc8"};
    static const size_t badlen[] = {4, 10};
    for (size_t i = 0; i < 2; i++) {
        struct peer p;
        uint8_t resp[2];
        peer_init(&p);
        int fd = raw_pair(&p, false, 100);
        memset(f, 'a', sizeof(f));
        memcpy(f, bad[i], badlen[i]);
        raw_write(fd, f, badlen[i] + 4 + 200);
        raw_read(fd, resp, 2);
        assert_int_equal(resp[0], 0x88);
        RUN_UNTIL(p.n_close == 1);
        assert_int_equal(p.close_code, WS_CLOSE_PROTOCOL_ERROR);
        assert_int_equal(evbuffer_get_length(p.bin), 0);
        close(fd);
        peer_cleanup(&p);
    }
}

/* Pausing inside a fast-path frame holds the rest of its payload until the
 * owner resumes, mask phase intact. */
static void test_fast_path_pause_mid_frame(void **state)
{
    static uint8_t pl[50000], f[50100];
    struct peer p;
    size_t n;

    fill_pattern(pl, sizeof(pl), 9);
    peer_init(&p);
    int fd = raw_pair(&p, false, 100);
    n = frame(f, true, 2, true, pl, sizeof(pl));
    p.pause_on_binary = true;
    raw_write(fd, f, n);
    RUN_UNTIL(p.n_bin_calls == 1);
    run_for_ms(30);
    assert_int_equal(p.n_bin_calls, 1);
    assert_true(evbuffer_get_length(p.bin) < sizeof(pl));
    ws_pause_read(p.ws, false);
    RUN_UNTIL(evbuffer_get_length(p.bin) == sizeof(pl));
    assert_memory_equal(evbuffer_pullup(p.bin, -1), pl, sizeof(pl));
    close(fd);
    peer_cleanup(&p);
}

static void test_peer_close_codes(void **state)
{
    struct peer p;
    uint8_t f[64], resp[16];
    size_t n;

    /* 1012 (service restart) is registered but unknown to wslay 1.1.1. */
    peer_init(&p);
    int fd = raw_pair(&p, true, 100);
    n = frame(f, true, 8, false, "\x03\xf4" "restart", 9);
    raw_write(fd, f, n);
    raw_read(fd, resp, 2);
    assert_int_equal(resp[0], 0x88);
    RUN_UNTIL(p.n_close == 1);
    assert_int_equal(p.close_code, 1012);
    assert_string_equal(p.close_reason, "restart");
    close(fd);
    peer_cleanup(&p);

    /* A close without a code: 1005, and an empty close comes back. */
    peer_init(&p);
    fd = raw_pair(&p, false, 100);
    n = frame(f, true, 8, true, "", 0);
    raw_write(fd, f, n);
    raw_read(fd, resp, 2);
    assert_memory_equal(resp, "\x88\x00", 2);
    RUN_UNTIL(p.n_close == 1);
    assert_int_equal(p.close_code, WS_CLOSE_NO_STATUS);
    assert_string_equal(p.close_reason, "");
    close(fd);
    peer_cleanup(&p);
}

static void test_close_timeout(void **state)
{
    struct peer p;
    uint8_t resp[2];
    uint64_t t0;

    peer_init(&p);
    int fd = raw_pair(&p, false, 100);
    ws_set_close_timeout_ms(p.ws, 100);
    t0 = util_mono_ms();
    assert_int_equal(ws_close(p.ws, 1000, "done"), 0);
    raw_read(fd, resp, 2);
    assert_int_equal(resp[0], 0x88);
    /* The raw peer never answers. */
    RUN_UNTIL(p.n_close == 1);
    assert_true(util_mono_ms() - t0 >= 90);
    assert_int_equal(p.close_code, 1000);
    assert_string_equal(p.close_reason, "done");
    close(fd);
    peer_cleanup(&p);

    /* The peer answers with EOF only: reported at once with our code. */
    peer_init(&p);
    fd = raw_pair(&p, false, 100);
    assert_int_equal(ws_close(p.ws, 4005, "x"), 0);
    raw_read(fd, resp, 2);
    close(fd);
    RUN_UNTIL(p.n_close == 1);
    assert_int_equal(p.close_code, 4005);
    peer_cleanup(&p);
}

static void test_bytes_before_new(void **state)
{
    int fds[2];
    struct peer p;
    uint8_t f[64];
    struct bufferevent *b;
    size_t n;

    peer_init(&p);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    b = sock_bev(fds[0]);
    /* As if read past the HTTP upgrade by the caller: in the bufferevent's
     * input, and nothing more will come from the socket. */
    n = frame(f, true, 1, true, "early", 5);
    raw_write(fds[1], f, n);
    bufferevent_enable(b, EV_READ);
    RUN_UNTIL(evbuffer_get_length(bufferevent_get_input(b)) == n);
    bufferevent_disable(b, EV_READ);
    p.ws = ws_conn_new(g_base, b, false, 100, &peer_cb, &p);
    assert_non_null(p.ws);
    assert_int_equal(p.n_text, 0); /* not from inside ws_conn_new */
    RUN_UNTIL(p.n_text == 1);
    check_text(&p, 0, "early", 5);
    close(fds[1]);
    peer_cleanup(&p);
}

static void test_binary_refused(void **state)
{
    struct peer srv, cli;

    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    srv.fail_binary = true;
    assert_int_equal(ws_send_binary(cli.ws, "abc", 3), 0);
    assert_int_equal(ws_send_binary(cli.ws, "def", 3), 0);
    RUN_UNTIL(srv.n_close == 1 && cli.n_close == 1);
    assert_int_equal(srv.n_bin_calls, 1);
    assert_int_equal(srv.close_code, WS_CLOSE_INTERNAL);
    assert_int_equal(cli.close_code, WS_CLOSE_INTERNAL);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

static void test_free_in_callbacks(void **state)
{
    struct peer srv, cli;

    /* Free in on_text with more messages behind it in the same read. */
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    srv.free_on_text = true;
    srv.send_after_free = true;
    assert_int_equal(ws_send_text(cli.ws, "one", 3), 0);
    assert_int_equal(ws_send_text(cli.ws, "two", 3), 0);
    assert_int_equal(ws_send_binary(cli.ws, "bin", 3), 0);
    RUN_UNTIL(srv.n_text == 1 && cli.n_close == 1);
    run_for_ms(20);
    assert_int_equal(srv.n_text, 1);
    assert_int_equal(srv.n_bin_calls, 0);
    assert_int_equal(srv.n_close, 0);
    assert_int_equal(cli.close_code, WS_CLOSE_ABNORMAL);
    peer_cleanup(&srv);
    peer_cleanup(&cli);

    /* Free in on_binary, in the middle of a large message. */
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    srv.free_on_binary = true;
    uint8_t *big = calloc(1, 100000);
    assert_int_equal(ws_send_binary(cli.ws, big, 100000), 0);
    RUN_UNTIL(srv.n_bin_calls == 1 && cli.n_close == 1);
    run_for_ms(20);
    assert_int_equal(srv.n_bin_calls, 1);
    free(big);
    peer_cleanup(&srv);
    peer_cleanup(&cli);

    /* Free in on_close (both sides), after a close handshake. */
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    srv.free_on_close = true;
    cli.free_on_close = true;
    assert_int_equal(ws_close(cli.ws, 1000, "x"), 0);
    RUN_UNTIL(srv.n_close == 1 && cli.n_close == 1);
    assert_null(srv.ws);
    assert_null(cli.ws);
    peer_cleanup(&srv);
    peer_cleanup(&cli);

    /* ws_close from on_text: later messages are not delivered. */
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    srv.close_on_text = true;
    assert_int_equal(ws_send_text(cli.ws, "one", 3), 0);
    assert_int_equal(ws_send_text(cli.ws, "two", 3), 0);
    RUN_UNTIL(srv.n_close == 1 && cli.n_close == 1);
    assert_int_equal(srv.n_text, 1);
    assert_int_equal(srv.close_code, 4000);
    assert_int_equal(cli.close_code, 4000);
    assert_string_equal(cli.close_reason, "from on_text");
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

/* Sends whenever writable until the output stays at the high watermark
 * for 30 loop turns (the paused reader let the socket fill). Returns bytes
 * sent. */
static size_t fill_until_blocked(struct peer *srv, const uint8_t *chunk, size_t chunk_len)
{
    size_t sent = 0;
    int stuck = 0;

    for (int i = 0; i < 20000 && stuck < 30; i++) {
        if (ws_is_writable(srv->ws)) {
            assert_int_equal(ws_send_binary(srv->ws, chunk, chunk_len), 0);
            sent += chunk_len;
            stuck = 0;
        } else {
            stuck++;
        }
        run_for_ms(1);
    }
    assert_int_equal(stuck, 30);
    return sent;
}

static void test_backpressure(void **state)
{
    struct peer srv, cli;
    uint8_t chunk[16384];
    size_t sent;

    fill_pattern(chunk, sizeof(chunk), 7);
    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    ws_set_watermarks(srv.ws, 32768, 65536);
    cli.pause_on_binary = true;
    sent = fill_until_blocked(&srv, chunk, sizeof(chunk));
    /* The reader stopped, the socket filled, the output went above high. */
    assert_false(ws_is_writable(srv.ws));
    assert_true(ws_output_pending(srv.ws) >= 65536);
    int w0 = srv.n_writable;
    run_for_ms(50);
    assert_false(ws_is_writable(srv.ws));
    assert_int_equal(srv.n_writable, w0);
    size_t seen = evbuffer_get_length(cli.bin);
    assert_true(seen < sent);
    run_for_ms(20);
    assert_int_equal(evbuffer_get_length(cli.bin), seen); /* paused means paused */
    ws_pause_read(cli.ws, false);
    RUN_UNTIL(srv.n_writable == w0 + 1);
    assert_true(ws_is_writable(srv.ws));
    assert_true(ws_output_pending(srv.ws) <= 32768);
    RUN_UNTIL(evbuffer_get_length(cli.bin) == sent);
    for (size_t off = 0; off < sent; off += sizeof(chunk)) {
        uint8_t got[sizeof(chunk)];
        assert_int_equal(evbuffer_remove(cli.bin, got, sizeof(got)), (int)sizeof(got));
        assert_memory_equal(got, chunk, sizeof(got));
    }
    assert_int_equal(srv.n_close + cli.n_close, 0);

    /* Free from on_writable. */
    cli.pause_on_binary = true;
    sent = fill_until_blocked(&srv, chunk, sizeof(chunk));
    assert_false(ws_is_writable(srv.ws));
    w0 = srv.n_writable;
    srv.free_on_writable = true;
    ws_pause_read(cli.ws, false);
    RUN_UNTIL(srv.n_writable == w0 + 1);
    assert_null(srv.ws);
    RUN_UNTIL(cli.n_close == 1);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

static void test_pause_holds_buffered(void **state)
{
    struct peer srv, cli;

    peer_init(&srv);
    peer_init(&cli);
    conn_pair(&srv, &cli, 100);
    ws_pause_read(srv.ws, true);
    assert_int_equal(ws_send_text(cli.ws, "held", 4), 0);
    run_for_ms(30);
    assert_int_equal(srv.n_text, 0);
    ws_pause_read(srv.ws, false);
    RUN_UNTIL(srv.n_text == 1);
    check_text(&srv, 0, "held", 4);

    /* EOF while paused: the buffered message is still delivered first. */
    ws_pause_read(srv.ws, true);
    assert_int_equal(ws_send_text(cli.ws, "last", 4), 0);
    run_for_ms(20);
    ws_free(cli.ws);
    cli.ws = NULL;
    run_for_ms(20);
    assert_int_equal(srv.n_close, 0);
    ws_pause_read(srv.ws, false);
    RUN_UNTIL(srv.n_close == 1);
    assert_int_equal(srv.n_text, 2);
    check_text(&srv, 1, "last", 4);
    assert_int_equal(srv.close_code, WS_CLOSE_ABNORMAL);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

/* Pausing inside on_binary leaves the rest in the bufferevent's input; it
 * is not processed until resumed, and resuming processes it even though no
 * more bytes arrive. A bufferevent pair hands over whole buffers (a socket
 * bufferevent in libevent 2.1 reads at most 4096 bytes at a time, which
 * wslay takes at once). */
static void test_pause_resume_buffered(void **state)
{
    struct bufferevent *pair[2];
    struct peer srv, cli;
    uint8_t msg[5000];

    fill_pattern(msg, sizeof(msg), 3);
    peer_init(&srv);
    peer_init(&cli);
    assert_int_equal(bufferevent_pair_new(g_base, BEV_OPT_CLOSE_ON_FREE, pair), 0);
    srv.ws = ws_conn_new(g_base, pair[0], false, 100, &peer_cb, &srv);
    cli.ws = ws_conn_new(g_base, pair[1], true, 100, &peer_cb, &cli);
    cli.pause_on_binary = true;
    for (int i = 0; i < 3; i++)
        assert_int_equal(ws_send_binary(srv.ws, msg, sizeof(msg)), 0);
    RUN_UNTIL(cli.n_bin_calls > 0);
    run_for_ms(30);
    /* Nothing was delivered after the pause. */
    assert_int_equal(cli.n_bin_calls, 1);
    assert_true(evbuffer_get_length(cli.bin) <= sizeof(msg));
    assert_int_equal(ws_output_pending(srv.ws), 0);
    ws_pause_read(cli.ws, false);
    RUN_UNTIL(evbuffer_get_length(cli.bin) == 3 * sizeof(msg));
    for (int i = 0; i < 3; i++) {
        uint8_t got[sizeof(msg)];
        evbuffer_remove(cli.bin, got, sizeof(got));
        assert_memory_equal(got, msg, sizeof(msg));
    }

    /* EOF while paused with input buffered: the input first, then 1006. */
    cli.pause_on_binary = true;
    int calls = cli.n_bin_calls;
    for (int i = 0; i < 3; i++)
        assert_int_equal(ws_send_binary(srv.ws, msg, sizeof(msg)), 0);
    RUN_UNTIL(evbuffer_get_length(cli.bin) > 0);
    assert_int_equal(bufferevent_flush(pair[0], EV_WRITE, BEV_FINISHED), 0);
    run_for_ms(30);
    assert_int_equal(cli.n_close, 0);
    assert_int_equal(cli.n_bin_calls, calls + 1);
    assert_true(evbuffer_get_length(cli.bin) <= sizeof(msg));
    ws_pause_read(cli.ws, false);
    RUN_UNTIL(cli.n_close == 1);
    assert_int_equal(evbuffer_get_length(cli.bin), 3 * sizeof(msg));
    assert_int_equal(cli.close_code, WS_CLOSE_ABNORMAL);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

/* A filtering bufferevent (like the OpenSSL one) runs its write callback
 * synchronously inside evbuffer_add(): a send from on_text must not make ws
 * re-enter wslay or call the owner back inside that send. */
static void test_sync_bufferevent_no_reentry(void **state)
{
    struct peer srv, cli;
    int fds[2];
    char msg[32];
    struct bufferevent *f;

    peer_init(&srv);
    peer_init(&cli);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    f = bufferevent_filter_new(sock_bev(fds[0]), NULL, NULL, BEV_OPT_CLOSE_ON_FREE, NULL, NULL);
    assert_non_null(f);
    srv.ws = ws_conn_new(g_base, f, false, 100, &peer_cb, &srv);
    cli.ws = ws_conn_new(g_base, sock_bev(fds[1]), true, 100, &peer_cb, &cli);
    ws_set_watermarks(srv.ws, 0, 1 << 20); /* write callback at every drain */
    srv.echo_text = true;
    for (int i = 0; i < 20; i++) {
        int n = snprintf(msg, sizeof(msg), "m%d", i);
        assert_int_equal(ws_send_text(cli.ws, msg, (size_t)n), 0);
    }
    RUN_UNTIL(cli.n_text == 20);
    assert_false(srv.reentered);
    assert_false(cli.reentered);
    for (int i = 0; i < 20; i++) {
        int n = snprintf(msg, sizeof(msg), "m%d", i);
        check_text(&srv, i, msg, (size_t)n);
        check_text(&cli, i, msg, (size_t)n);
    }
    srv.in_api = true;
    assert_int_equal(ws_close(srv.ws, 1000, "end"), 0);
    srv.in_api = false;
    RUN_UNTIL(cli.n_close == 1 && srv.n_close == 1);
    assert_false(srv.reentered);
    assert_int_equal(cli.close_code, 1000);
    assert_int_equal(srv.close_code, 1000);
    peer_cleanup(&srv);
    peer_cleanup(&cli);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accept_key),
        cmocka_unit_test(test_client_key),
        cmocka_unit_test(test_client_request),
        cmocka_unit_test(test_parse_response_split),
        cmocka_unit_test(test_parse_response_bad),
        cmocka_unit_test(test_parse_response_403),
        cmocka_unit_test_setup_teardown(test_text_and_binary_sizes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_binary_4mib, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ping_pong, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_handshake, setup, teardown),
        cmocka_unit_test_setup_teardown(test_oversized_text, setup, teardown),
        cmocka_unit_test_setup_teardown(test_eof, setup, teardown),
        cmocka_unit_test_setup_teardown(test_protocol_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_protocol_errors_frame_level, setup, teardown),
        cmocka_unit_test_setup_teardown(test_declared_text_refused_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_max_text, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refused_frame_while_closing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_refuses_masked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_binary_buffers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_masks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_raw_fragments_and_ping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_holds_no_parser, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fast_path_server, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fast_path_client, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fast_path_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fast_path_pause_mid_frame, setup, teardown),
        cmocka_unit_test_setup_teardown(test_peer_close_codes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bytes_before_new, setup, teardown),
        cmocka_unit_test_setup_teardown(test_binary_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_in_callbacks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backpressure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pause_holds_buffered, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pause_resume_buffered, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sync_bufferevent_no_reentry, setup, teardown),
    };
    signal(SIGPIPE, SIG_IGN); /* as both programs do: EPIPE is an I/O error */
    return cmocka_run_group_tests(tests, NULL, NULL);
}
