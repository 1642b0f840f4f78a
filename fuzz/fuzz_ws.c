/* libFuzzer target for common/ws: arbitrary bytes as the peer's side of a
 * connection, delivered in one piece or in small pieces with the event loop
 * run in between; or as the server's answer to ws_client_parse_response().
 * The first byte chooses: bit 0 split, bits 1-4 piece size - 1, bit 5 client
 * role, bit 6 handshake response mode, bit 7 pause/resume reading around
 * each piece. The owner echoes text, refuses binary chunks starting with
 * 0xEE, and frees the connection from on_close. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "ws.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct fz {
    struct ws_conn *ws; /* NULL once freed from on_close */
};

static void fz_text(void *arg, const char *data, size_t len)
{
    struct fz *f = arg;

    ws_send_text(f->ws, data, len);
}

static int fz_binary(void *arg, const uint8_t *data, size_t len)
{
    return data[0] == 0xee ? -1 : 0;
}

static void fz_close(void *arg, int code, const char *reason)
{
    struct fz *f = arg;

    ws_free(f->ws);
    f->ws = NULL;
}

static void fz_writable(void *arg)
{
}

static void fz_loop(struct event_base *base)
{
    for (int i = 0; i < 8; i++)
        event_base_loop(base, EVLOOP_NONBLOCK);
}

static void fz_response(const uint8_t *data, size_t size, size_t piece)
{
    static const char key[] = "dGhlIHNhbXBsZSBub25jZQ==";
    struct evbuffer *in = evbuffer_new();
    char err[256];
    int status;

    if (in == NULL)
        return;
    for (size_t off = 0; off < size; off += piece) {
        size_t n = size - off < piece ? size - off : piece;
        evbuffer_add(in, data + off, n);
        if (ws_client_parse_response(in, key, (data[0] & 1) ? "tunnel.v1" : NULL, &status,
                                     err, sizeof(err)) != 1)
            break;
    }
    evbuffer_free(in);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const struct ws_callbacks cb = {fz_text, fz_binary, fz_close, fz_writable};
    struct bufferevent *pair[2];
    struct event_base *base;
    struct fz f = {NULL};
    uint8_t cfg;
    size_t piece;

    if (size < 1)
        return 0;
    cfg = data[0];
    data++;
    size--;
    piece = (cfg & 1) ? (size_t)((cfg >> 1) & 0x0f) + 1 : size + 1;
    if (cfg & 0x40) {
        fz_response(data, size, piece);
        return 0;
    }
    base = event_base_new();
    if (base == NULL)
        return 0;
    if (bufferevent_pair_new(base, BEV_OPT_CLOSE_ON_FREE, pair) != 0)
        goto out_base;
    f.ws = ws_conn_new(base, pair[0], (cfg & 0x20) != 0, 1024, &cb, &f);
    if (f.ws == NULL)
        goto out_pair;
    ws_set_watermarks(f.ws, 256, 1024);
    for (size_t off = 0; off < size && f.ws != NULL; off += piece) {
        size_t n = size - off < piece ? size - off : piece;
        if ((cfg & 0x80) && f.ws != NULL)
            ws_pause_read(f.ws, true);
        bufferevent_write(pair[1], data + off, n);
        fz_loop(base);
        if ((cfg & 0x80) && f.ws != NULL)
            ws_pause_read(f.ws, false);
        fz_loop(base);
        /* Drain what ws wrote back, so the pair never stalls. */
        evbuffer_drain(bufferevent_get_input(pair[1]),
                       evbuffer_get_length(bufferevent_get_input(pair[1])));
    }
    /* The peer goes away. */
    bufferevent_flush(pair[1], EV_WRITE, BEV_FINISHED);
    fz_loop(base);
    ws_free(f.ws);
out_pair:
    bufferevent_free(pair[1]);
out_base:
    event_base_free(base);
    return 0;
}
