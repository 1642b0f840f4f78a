/* RFC 6455 WebSocket on a bufferevent; see ws.h.
 *
 * Receiving: wslay (no_buffering) parses frames, checks masking, reserved
 * bits, opcodes, control-frame sizes and UTF-8, answers pings and closes.
 * Its frame callbacks hand binary payload to the owner as it arrives and
 * append text to ws->text. Sending: data frames are written here, straight
 * into the bufferevent's output (one copy, or none for the server role with
 * ws_send_binary_buffer()); wslay only sends control frames. Its send
 * callback never refuses bytes, so its queue is empty whenever ws returns and
 * no wslay frame is ever half-written: our frames cannot split one.
 *
 * Lifecycle. Every way in (bufferevent read/write/event callbacks, the kick
 * event, the close timer, and every public call) brackets its work with
 * ws_enter()/ws_leave(). ws_free() with depth > 0 only marks the connection
 * dead; the outermost ws_leave() frees it. A bufferevent callback that
 * arrives while depth > 0 (libevent runs them synchronously for OpenSSL and
 * pair bufferevents) is turned into the kick event, so owner callbacks only
 * run from the loop. The close is reported (on_close) by ws_check_done():
 * 1. the peer's close frame, once our reply has left the output;
 * 2. a failure we detected, once our close frame has left the output;
 * 3. our ws_close(), when the peer's close arrives (case 1), or EOF;
 * 4. EOF or an I/O error at any time;
 * 5. the close timer in cases 1-3. */
#include "ws.h"

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <http_parser.h>
#include <openssl/evp.h>
#include <wslay/wslay.h>

#include "tls.h"
#include "util.h"

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define WS_MAX_REASON 123            /* control payload 125 minus the code */
#define WS_MASK_CHUNK (64u * 1024u)  /* client role: bytes masked per reservation */
#define WS_TEXT_KEEP (64u * 1024u)   /* text buffer kept between messages */
#define WS_MAX_RESP_HEAD (16u * 1024u)
#define WS_MAX_ERR_BODY 4096u
#define WS_MAX_ERR_TEXT 200u

struct ws_conn {
    struct event_base *base;
    struct bufferevent *bev;       /* owned; BEV_OPT_CLOSE_ON_FREE closes the socket */
    wslay_event_context_ptr wslay; /* owned; NULL while idle (ws_wslay, ws_wslay_park) */
    struct event *kick_ev;         /* owned; runs ws_run() from the loop */
    struct event *close_ev;        /* owned; bounds the closing handshake */
    struct ws_callbacks cb;
    void *arg;                     /* passed to every callback */
    bool client;                   /* masks what it sends */
    size_t max_text;               /* cap of an assembled text message, bytes */
    size_t low;                    /* output low watermark, bytes */
    size_t high;                   /* output high watermark, bytes */
    uint64_t close_timeout_ms;     /* closing handshake bound */
    uint64_t last_rx_ms;           /* util_mono_ms() of the last read */
    uint64_t last_pong_ms;         /* util_mono_ms() of the last pong, 0 = none */

    /* Receive state, driven by wslay's frame callbacks. */
    uint8_t rx_opcode;  /* data message in progress: 0, text or binary */
    bool rx_ctrl;       /* the current frame is a control frame */
    bool rx_fin;        /* the current data frame ends its message */
    bool rx_in_frame;   /* wslay is inside a frame (start seen, end not yet) */
    bool rx_off;        /* reading stopped (ws_fail), even without a wslay context */
    uint8_t ctrl_opcode;            /* opcode of the current control frame */
    uint8_t ctrl_buf[125];          /* its payload (close: code + reason) */
    size_t ctrl_len;                /* bytes in ctrl_buf */
    char *text;         /* owned; text message being assembled, NUL room */
    size_t text_len;    /* bytes in text */
    size_t text_cap;    /* allocated bytes of text */

    /* Flow and close state. */
    unsigned depth;        /* ws frames on the stack (enter/leave) */
    short pending_events;  /* BEV_EVENT_* seen while depth > 0 */
    bool paused;           /* owner paused reading (ws_pause_read) */
    bool out_blocked;      /* output reached high; on_writable at low */
    bool closing;          /* one of local_close/failed/peer_close */
    bool local_close;      /* ws_close() sent a close frame */
    bool failed;           /* we failed the connection and sent a close */
    bool peer_close;       /* the peer's close frame arrived */
    bool peer_close_seen;  /* a close frame was parsed (maybe refused by wslay) */
    bool lost;             /* EOF, I/O error or out of memory on output */
    bool timed_out;        /* the close timer fired */
    bool reported;         /* on_close was called */
    bool dead;             /* ws_free() was called inside a ws frame */

    /* Receive routing (ws_recv): wslay is given one frame at a time, so that
     * between frames the next header can be looked at here first. */
    uint64_t wslay_left;   /* bytes of the frame wslay reads still to give it */
    uint64_t fast_left;    /* payload bytes left of a fast-path frame */
    uint64_t fast_off;     /* payload offset in it (the mask's phase) */
    uint8_t fast_key[4];   /* its masking key, if fast_masked */
    uint8_t keys[64];      /* client role: masking keys not yet used */
    uint8_t keys_left;     /* how many of them (4 bytes each, from the end) */
    bool fast_masked;
    int sent_code;         /* close code we sent (local_close/failed) */
    int peer_code;         /* close code the peer sent, 1005 if none */
    char sent_reason[WS_MAX_REASON + 1];
    char peer_reason[WS_MAX_REASON + 1];
};

/* ---- small helpers ---- */

/* XORs len bytes with key, the payload starting at offset off of the frame
 * (RFC 6455 section 5.3). Eight bytes at a time; 8 is a multiple of 4, so
 * one 64-bit pattern serves every step. */
static void ws_mask(uint8_t *dst, const uint8_t *src, size_t len, const uint8_t key[4], size_t off)
{
    uint8_t k8[8];
    uint64_t k64;
    size_t i = 0;

    for (size_t j = 0; j < 8; j++)
        k8[j] = key[(off + j) & 3];
    memcpy(&k64, k8, 8);
    for (; len - i >= 8; i += 8) {
        uint64_t v;
        memcpy(&v, src + i, 8);
        v ^= k64;
        memcpy(dst + i, &v, 8);
    }
    for (; i < len; i++)
        dst[i] = src[i] ^ key[(off + i) & 3];
}

/* Frame header for a single-frame message; returns its length (2-14). */
static size_t ws_frame_header(uint8_t h[14], uint8_t opcode, uint64_t len, const uint8_t *key)
{
    size_t n = 2;

    h[0] = (uint8_t)(0x80u | opcode); /* FIN */
    if (len < 126) {
        h[1] = (uint8_t)len;
    } else if (len <= 0xffff) {
        h[1] = 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
        n = 4;
    } else {
        h[1] = 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (uint8_t)(len >> (56 - 8 * i));
        n = 10;
    }
    if (key != NULL) {
        h[1] |= 0x80u;
        memcpy(h + n, key, 4);
        n += 4;
    }
    return n;
}

/* Copies a close reason, cut to WS_MAX_REASON bytes at a UTF-8 character
 * boundary; invalid UTF-8 becomes "". Returns its length. */
static size_t ws_copy_reason(char dst[WS_MAX_REASON + 1], const char *src, size_t len)
{
    if (src == NULL)
        len = 0;
    if (len > WS_MAX_REASON) {
        len = WS_MAX_REASON;
        while (len > 0 && ((uint8_t)src[len] & 0xc0) == 0x80)
            len--;
    }
    if (len > 0 && !util_utf8_valid((const uint8_t *)src, len))
        len = 0;
    if (len > 0)
        memcpy(dst, src, len);
    dst[len] = '\0';
    return len;
}

static bool ws_close_code_ok(int code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
           (code >= 3000 && code <= 4999);
}

static const char *ws_code_reason(int code)
{
    switch (code) {
    case WS_CLOSE_PROTOCOL_ERROR:
        return "protocol error";
    case WS_CLOSE_INVALID_DATA:
        return "invalid UTF-8";
    case WS_CLOSE_TOO_BIG:
        return "message too big";
    case WS_CLOSE_INTERNAL:
        return "internal error";
    default:
        return "";
    }
}

/* ---- lifecycle ---- */

static void ws_destroy(struct ws_conn *ws)
{
    event_free(ws->close_ev);
    event_free(ws->kick_ev);
    wslay_event_context_free(ws->wslay);
    bufferevent_free(ws->bev);
    free(ws->text);
    free(ws);
}

/* wslay's context (two 4 KiB buffers and its state) exists only while a
 * frame it parses, a message it queued or a close is under way: an idle
 * tunnel's WebSocket, whose data frames all take the fast path, holds none.
 * These wrap what the rest of this file asks it. */
static const struct wslay_event_callbacks ws_wslay_cbs;

static int ws_wslay(struct ws_conn *ws)
{
    int rv;

    if (ws->wslay != NULL)
        return 0;
    rv = ws->client ? wslay_event_context_client_init(&ws->wslay, &ws_wslay_cbs, ws)
                    : wslay_event_context_server_init(&ws->wslay, &ws_wslay_cbs, ws);
    if (rv != 0) {
        ws->wslay = NULL;
        return -1;
    }
    /* Binary payload goes to the owner as it arrives (STYLE 5). */
    wslay_event_config_set_no_buffering(ws->wslay, 1);
    return 0;
}

/* Frees the context if it holds nothing: between messages, nothing queued,
 * no close begun. Never from inside one of its callbacks. */
static void ws_wslay_park(struct ws_conn *ws)
{
    if (ws->wslay == NULL || ws->closing || ws->rx_off || ws->rx_in_frame ||
        ws->rx_opcode != 0 || ws->wslay_left != 0 ||
        wslay_event_get_queued_msg_count(ws->wslay) != 0 || wslay_event_want_write(ws->wslay) ||
        !wslay_event_get_read_enabled(ws->wslay) || !wslay_event_get_write_enabled(ws->wslay))
        return;
    wslay_event_context_free(ws->wslay);
    ws->wslay = NULL;
}

static bool ws_read_enabled(const struct ws_conn *ws)
{
    return !ws->rx_off && (ws->wslay == NULL || wslay_event_get_read_enabled(ws->wslay));
}

static bool ws_write_enabled(const struct ws_conn *ws)
{
    return ws->wslay == NULL || wslay_event_get_write_enabled(ws->wslay);
}

static void ws_enter(struct ws_conn *ws)
{
    ws->depth++;
}

/* Returns true if ws was freed: the caller must not touch it again. */
static bool ws_leave(struct ws_conn *ws)
{
    assert(ws->depth > 0);
    ws->depth--;
    if (ws->depth == 0 && ws->dead) {
        ws_destroy(ws);
        return true;
    }
    return false;
}

static void ws_kick(struct ws_conn *ws)
{
    if (!ws->dead && !ws->reported)
        event_active(ws->kick_ev, EV_TIMEOUT, 0);
}

static size_t ws_pending(const struct ws_conn *ws)
{
    return evbuffer_get_length(bufferevent_get_output(ws->bev));
}

/* Called after anything was added to the output. */
static void ws_note_output(struct ws_conn *ws)
{
    if (ws_pending(ws) >= ws->high)
        ws->out_blocked = true;
    tls_bev_kick_write(ws->bev);
}

/* Output failed (out of memory): nothing more can be sent or trusted. */
static void ws_lose(struct ws_conn *ws)
{
    ws->lost = true;
    ws_kick(ws);
}

/* Sends whatever wslay queued (pongs, close frames). */
static void ws_flush(struct ws_conn *ws)
{
    if (ws->lost || ws->reported)
        return;
    if (ws->wslay != NULL && wslay_event_send(ws->wslay) != 0)
        ws_lose(ws);
    ws_note_output(ws);
}

static void ws_start_closing(struct ws_conn *ws)
{
    struct timeval tv;

    if (ws->closing)
        return;
    ws->closing = true;
    /* Read on: the peer's close or its EOF ends the handshake. */
    ws->paused = false;
    bufferevent_enable(ws->bev, EV_READ);
    /* Write callback at empty output: that is when our close has left. */
    bufferevent_setwatermark(ws->bev, EV_WRITE, 0, 0);
    tv.tv_sec = (time_t)(ws->close_timeout_ms / 1000);
    tv.tv_usec = (int)(ws->close_timeout_ms % 1000 * 1000);
    evtimer_add(ws->close_ev, &tv);
}

/* Fails the connection (RFC 6455 section 7.1.7): stop reading messages, send
 * a close with code. Safe inside wslay's callbacks. */
static void ws_fail(struct ws_conn *ws, int code, const char *reason)
{
    size_t len;

    /* reading stops in any case: a refused frame found while a close is
     * under way must not be looked at again (ws_recv would spin on it) */
    ws->rx_off = true;
    if (ws->wslay != NULL)
        wslay_event_shutdown_read(ws->wslay);
    if (ws->closing)
        return;
    ws->failed = true;
    ws->sent_code = code;
    len = ws_copy_reason(ws->sent_reason, reason, strlen(reason));
    if (ws_wslay(ws) != 0) {
        ws_lose(ws); /* no close frame without memory: EOF ends it */
    } else {
        wslay_event_shutdown_read(ws->wslay);
        /* NO_MORE_MSG: wslay queued a close itself; NOMEM: EOF or the timer. */
        (void)wslay_event_queue_close(ws->wslay, (uint16_t)code,
                                      (const uint8_t *)ws->sent_reason, len);
    }
    ws_start_closing(ws);
}

/* Messages are delivered only while nothing ended. */
static bool ws_rx_muted(const struct ws_conn *ws)
{
    return ws->dead || ws->closing || ws->reported;
}

static void ws_report(struct ws_conn *ws, int code, const char *reason)
{
    ws->reported = true;
    evtimer_del(ws->close_ev);
    bufferevent_disable(ws->bev, EV_READ | EV_WRITE);
    if (ws->cb.on_close != NULL)
        ws->cb.on_close(ws->arg, code, reason);
}

static void ws_check_done(struct ws_conn *ws)
{
    bool drained = ws_pending(ws) == 0;

    if (ws->reported || ws->dead)
        return;
    if (ws->lost) {
        /* A paused owner still gets what was buffered before the EOF. */
        if (ws->paused && !ws->closing &&
            evbuffer_get_length(bufferevent_get_input(ws->bev)) > 0)
            return;
        if (ws->peer_close)
            ws_report(ws, ws->peer_code, ws->peer_reason);
        else if (ws->closing)
            ws_report(ws, ws->sent_code, ws->sent_reason);
        else
            ws_report(ws, WS_CLOSE_ABNORMAL, "connection lost");
    } else if (ws->peer_close) {
        if (drained || ws->timed_out)
            ws_report(ws, ws->peer_code, ws->peer_reason);
    } else if (ws->failed) {
        if (drained || ws->timed_out)
            ws_report(ws, ws->sent_code, ws->sent_reason);
    } else if (ws->local_close) {
        if (ws->timed_out)
            ws_report(ws, ws->sent_code, ws->sent_reason);
    }
}

/* ---- wslay callbacks (run inside wslay_event_recv/send) ---- */

static ssize_t ws_wslay_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                             void *user)
{
    struct ws_conn *ws = user;
    int n;

    if (ws->paused || ws->dead) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (len > ws->wslay_left)
        len = (size_t)ws->wslay_left; /* the end of its frame (ws_recv) */
    n = len > 0 ? evbuffer_remove(bufferevent_get_input(ws->bev), buf, len) : 0;
    if (n <= 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (ws->wslay_left != UINT64_MAX)
        ws->wslay_left -= (uint64_t)n;
    return n;
}

static ssize_t ws_wslay_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len,
                             int flags, void *user)
{
    struct ws_conn *ws = user;

    if (evbuffer_add(bufferevent_get_output(ws->bev), data, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static int ws_wslay_genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *user)
{
    return util_rand_bytes(buf, len);
}

static void ws_on_frame_start(wslay_event_context_ptr ctx,
                              const struct wslay_event_on_frame_recv_start_arg *a, void *user)
{
    struct ws_conn *ws = user;

    ws->rx_in_frame = true;
    ws->rx_ctrl = wslay_is_ctrl_frame(a->opcode);
    if (ws->rx_ctrl) {
        ws->ctrl_opcode = a->opcode;
        ws->ctrl_len = 0;
        return;
    }
    /* wslay has checked the order: a continuation follows a text/binary. */
    if (a->opcode != WSLAY_CONTINUATION_FRAME)
        ws->rx_opcode = a->opcode;
    ws->rx_fin = a->fin != 0;
    if (ws_rx_muted(ws) || ws->rx_opcode != WSLAY_TEXT_FRAME)
        return;
    /* Refused on the declared length, before any payload is read; room is
     * taken as the bytes arrive (ws_on_frame_chunk), never reserved for a
     * length a peer merely declared. */
    if (a->payload_length > ws->max_text - ws->text_len)
        ws_fail(ws, WS_CLOSE_TOO_BIG, "text message too big");
}

/* Room for n more text bytes and the NUL: doubles, bounded by max_text. */
static int ws_text_grow(struct ws_conn *ws, size_t n)
{
    size_t need = ws->text_len + n + 1;
    size_t cap = ws->text_cap > 0 ? ws->text_cap : 256;
    char *p;

    if (need <= ws->text_cap)
        return 0;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    if (cap > ws->max_text + 1)
        cap = need > ws->max_text + 1 ? need : ws->max_text + 1;
    p = realloc(ws->text, cap);
    if (p == NULL)
        return -1;
    ws->text = p;
    ws->text_cap = cap;
    return 0;
}

static void ws_on_frame_chunk(wslay_event_context_ptr ctx,
                              const struct wslay_event_on_frame_recv_chunk_arg *a, void *user)
{
    struct ws_conn *ws = user;

    if (ws->rx_ctrl) {
        /* wslay refuses control frames over 125 bytes before this. */
        size_t n = a->data_length;
        if (n > sizeof(ws->ctrl_buf) - ws->ctrl_len)
            n = sizeof(ws->ctrl_buf) - ws->ctrl_len;
        memcpy(ws->ctrl_buf + ws->ctrl_len, a->data, n);
        ws->ctrl_len += n;
        return;
    }
    if (ws_rx_muted(ws) || a->data_length == 0)
        return;
    if (ws->rx_opcode == WSLAY_TEXT_FRAME) {
        if (ws_text_grow(ws, a->data_length) != 0) {
            ws_fail(ws, WS_CLOSE_INTERNAL, "out of memory");
            return;
        }
        memcpy(ws->text + ws->text_len, a->data, a->data_length);
        ws->text_len += a->data_length;
    } else if (ws->cb.on_binary != NULL) {
        int rv = ws->cb.on_binary(ws->arg, a->data, a->data_length);
        if (rv != 0 && !ws->dead)
            ws_fail(ws, WS_CLOSE_INTERNAL, "binary message refused");
    }
}

static void ws_on_ctrl_end(struct ws_conn *ws)
{
    if (ws->ctrl_opcode == WSLAY_PONG) {
        ws->last_pong_ms = util_mono_ms();
    } else if (ws->ctrl_opcode == WSLAY_CONNECTION_CLOSE && !ws->peer_close_seen) {
        /* Recorded here, before wslay checks the code, so that a code wslay
         * 1.1.1 does not know (1012-1014) still reaches the owner. */
        ws->peer_close_seen = true;
        if (ws->ctrl_len >= 2) {
            ws->peer_code = ws->ctrl_buf[0] << 8 | ws->ctrl_buf[1];
            ws_copy_reason(ws->peer_reason, (const char *)ws->ctrl_buf + 2, ws->ctrl_len - 2);
        } else {
            ws->peer_code = WS_CLOSE_NO_STATUS;
            ws->peer_reason[0] = '\0';
        }
    }
}

static void ws_on_frame_end(wslay_event_context_ptr ctx, void *user)
{
    struct ws_conn *ws = user;
    size_t len;

    ws->rx_in_frame = false;
    if (ws->rx_ctrl) {
        ws_on_ctrl_end(ws);
        return;
    }
    if (!ws->rx_fin)
        return;
    if (ws->rx_opcode != WSLAY_TEXT_FRAME || ws_rx_muted(ws)) {
        ws->rx_opcode = 0;
        ws->text_len = 0;
        return;
    }
    ws->rx_opcode = 0;
    len = ws->text_len;
    ws->text_len = 0;
    if (ws_text_grow(ws, 0) != 0) { /* an empty message has no room yet */
        ws_fail(ws, WS_CLOSE_INTERNAL, "out of memory");
        return;
    }
    ws->text[len] = '\0';
    if (ws->cb.on_text != NULL)
        ws->cb.on_text(ws->arg, ws->text, len);
    if (!ws->dead && ws->text_cap > WS_TEXT_KEEP) {
        free(ws->text);
        ws->text = NULL;
        ws->text_cap = 0;
    }
}

static const struct wslay_event_callbacks ws_wslay_cbs = {
    .recv_callback = ws_wslay_recv,
    .send_callback = ws_wslay_send,
    .genmask_callback = ws_wslay_genmask,
    .on_frame_recv_start_callback = ws_on_frame_start,
    .on_frame_recv_chunk_callback = ws_on_frame_chunk,
    .on_frame_recv_end_callback = ws_on_frame_end,
    .on_msg_recv_callback = NULL,
};

/* ---- the engine ---- */

/* After wslay stopped reading: decide whether that was the peer's close or a
 * failure wslay detected (it queued a close with the code). */
static void ws_after_recv(struct ws_conn *ws, int rv)
{
    bool registered = ws->peer_code >= 1012 && ws->peer_code <= 1014;

    if (!ws->peer_close &&
        (wslay_event_get_close_received(ws->wslay) || (ws->peer_close_seen && registered))) {
        ws->peer_close = true;
        ws_start_closing(ws);
        return;
    }
    if (ws->closing)
        return;
    if (rv == WSLAY_ERR_NOMEM) {
        ws_fail(ws, WS_CLOSE_INTERNAL, "out of memory");
    } else if (rv != 0) {
        /* A frame-level error (control frame > 125 bytes or fragmented, bad
         * length encoding): wslay queued a close without a code. */
        ws_fail(ws, WS_CLOSE_PROTOCOL_ERROR, "protocol error");
    } else if (!wslay_event_get_read_enabled(ws->wslay)) {
        int code;
        ws_flush(ws);
        code = wslay_event_get_status_code_sent(ws->wslay);
        if (!ws_close_code_ok(code))
            code = WS_CLOSE_PROTOCOL_ERROR;
        ws_fail(ws, code, ws_code_reason(code));
    }
}

int ws_peek_header(struct evbuffer *in, uint8_t b[14], uint64_t *payload)
{
    size_t have = evbuffer_get_length(in);
    size_t hlen;
    uint8_t len7;

    if (have < 2 || evbuffer_copyout(in, b, have < 14 ? have : 14) < 2)
        return 0;
    len7 = b[1] & 0x7fu;
    hlen = 2u + (len7 == 126 ? 2u : len7 == 127 ? 8u : 0u) + ((b[1] & 0x80u) ? 4u : 0u);
    if (have < hlen)
        return 0;
    if (len7 < 126) {
        *payload = len7;
    } else if (len7 == 126) {
        *payload = (uint64_t)b[2] << 8 | b[3];
        if (*payload < 126)
            return -1;
    } else {
        *payload = 0;
        for (int i = 0; i < 8; i++)
            *payload = *payload << 8 | b[2 + i];
        if (*payload <= 0xffff || (*payload >> 63) != 0)
            return -1;
    }
    return (int)hlen;
}

/* The fast path: a whole binary message in one frame (FIN, no RSV bits),
 * masked exactly when the peer is a client, outside a fragmented message,
 * while messages are delivered. That is every data frame of the tunnel;
 * anything else, valid or not, is wslay's to parse and judge. wslay unmasks
 * a byte at a time, which was a fifth of the gateway's CPU on downloads. */
static bool ws_fast_ok(const struct ws_conn *ws, const uint8_t b[14])
{
    return b[0] == (0x80u | WSLAY_BINARY_FRAME) && ((b[1] & 0x80u) != 0) == !ws->client &&
           ws->rx_opcode == 0 && ws->cb.on_binary != NULL && !ws_rx_muted(ws);
}

/* Delivers payload of the fast-path frame from in, unmasked in place (the
 * input's chains are plain memory the bufferevent read into). */
static void ws_fast_read(struct ws_conn *ws, struct evbuffer *in)
{
    while (ws->fast_left > 0 && !ws->paused && !ws->dead) {
        struct evbuffer_iovec v;
        uint8_t *p;
        size_t n;
        int rv;

        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            return;
        n = v.iov_len < ws->fast_left ? v.iov_len : (size_t)ws->fast_left;
        p = v.iov_base;
        ws->fast_left -= n;
        if (ws_rx_muted(ws) || n == 0) {
            ws->fast_off += n;
            evbuffer_drain(in, n);
            continue;
        }
        if (ws->fast_masked)
            ws_mask(p, p, n, ws->fast_key, (size_t)(ws->fast_off & 3));
        ws->fast_off += n;
        /* handed out of the input's own chain: drained after the call (the
         * bufferevent outlives a ws_free() in it) */
        rv = ws->cb.on_binary(ws->arg, p, n);
        evbuffer_drain(in, n);
        if (rv != 0 && !ws->dead)
            ws_fail(ws, WS_CLOSE_INTERNAL, "binary message refused");
    }
}

static void ws_recv(struct ws_conn *ws)
{
    struct evbuffer *in = bufferevent_get_input(ws->bev);

    while (evbuffer_get_length(in) > 0 && !ws->dead) {
        uint8_t b[14];
        uint64_t payload = 0;
        int hlen, rv;

        if (!ws_read_enabled(ws)) {
            /* After a close or a failure: discard, but keep reading for EOF. */
            evbuffer_drain(in, evbuffer_get_length(in));
            return;
        }
        if (ws->paused)
            return;
        if (ws->fast_left > 0) {
            ws_fast_read(ws, in);
            continue;
        }
        if (ws->wslay_left == 0) {
            hlen = ws_peek_header(in, b, &payload);
            if (hlen == 0)
                return; /* the rest of the header is still on its way */
            /* a length not in its shortest form (RFC 6455 5.2), a fragmented
             * or oversized control frame (5.5): wslay would answer with a
             * close without a code; 1002 says why */
            if (hlen < 0 || ((b[0] & 0x08u) != 0 && ((b[0] & 0x80u) == 0 || payload > 125))) {
                ws_fail(ws, WS_CLOSE_PROTOCOL_ERROR, hlen < 0 ? "bad frame length" : "bad control frame");
                continue;
            }
            /* a text message past max_text is refused on its declared length,
             * before any payload: wslay would wait for the first byte */
            if (hlen > 0 && !ws_rx_muted(ws) &&
                ((b[0] & 0x0fu) == WSLAY_TEXT_FRAME ||
                 ((b[0] & 0x0fu) == WSLAY_CONTINUATION_FRAME && ws->rx_opcode == WSLAY_TEXT_FRAME)) &&
                payload > ws->max_text - ws->text_len) {
                ws_fail(ws, WS_CLOSE_TOO_BIG, "text message too big");
                continue;
            }
            if (hlen > 0 && ws_fast_ok(ws, b)) {
                ws->fast_masked = (b[1] & 0x80u) != 0;
                if (ws->fast_masked)
                    memcpy(ws->fast_key, b + hlen - 4, 4);
                ws->fast_left = payload;
                ws->fast_off = 0;
                evbuffer_drain(in, (size_t)hlen);
                continue;
            }
            if (ws_wslay(ws) != 0) {
                ws_fail(ws, WS_CLOSE_INTERNAL, "out of memory");
                continue;
            }
            ws->wslay_left = hlen < 0 ? UINT64_MAX : (uint64_t)hlen + payload;
        }
        rv = wslay_event_recv(ws->wslay);
        if (ws->dead)
            return;
        ws_after_recv(ws, rv);
        if (rv != 0 || ws->wslay_left > 0)
            break; /* failed, paused, or the frame's end has not arrived */
    }
    if (!ws->dead && !ws_read_enabled(ws))
        evbuffer_drain(in, evbuffer_get_length(in));
}

/* Everything that can make progress, from an entry point. */
static void ws_run(struct ws_conn *ws)
{
    if (ws->reported || ws->dead)
        return;
    if (ws->pending_events & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT))
        ws->lost = true;
    ws_recv(ws); /* also after EOF: what arrived before it */
    if (ws->dead || ws->reported)
        return;
    ws_flush(ws);
    if (ws->out_blocked && !ws->closing && !ws->lost && ws_pending(ws) <= ws->low) {
        ws->out_blocked = false;
        if (ws->cb.on_writable != NULL)
            ws->cb.on_writable(ws->arg);
        if (ws->dead || ws->reported)
            return;
    }
    ws_check_done(ws);
    if (!ws->dead && !ws->reported)
        ws_wslay_park(ws);
}

static void ws_on_read(struct bufferevent *bev, void *arg)
{
    struct ws_conn *ws = arg;

    ws->last_rx_ms = util_mono_ms();
    if (ws->depth > 0) {
        ws_kick(ws);
        return;
    }
    ws_enter(ws);
    ws_run(ws);
    if (!ws->dead && !ws->reported)
        tls_bev_kick_read(ws->bev); /* records read ahead (tls_bev_read_ahead) */
    ws_leave(ws);
}

static void ws_on_write(struct bufferevent *bev, void *arg)
{
    struct ws_conn *ws = arg;

    if (ws->depth > 0) {
        ws_kick(ws);
        return;
    }
    ws_enter(ws);
    ws_run(ws);
    ws_leave(ws);
}

static void ws_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct ws_conn *ws = arg;

    ws->pending_events |= what;
    if (ws->depth > 0) {
        ws_kick(ws);
        return;
    }
    ws_enter(ws);
    ws_run(ws);
    ws_leave(ws);
}

static void ws_on_kick(evutil_socket_t fd, short what, void *arg)
{
    struct ws_conn *ws = arg;

    ws_enter(ws);
    ws_run(ws);
    if (!ws->dead && !ws->reported)
        tls_bev_kick_read(ws->bev);
    ws_leave(ws);
}

static void ws_on_close_timer(evutil_socket_t fd, short what, void *arg)
{
    struct ws_conn *ws = arg;

    ws->timed_out = true;
    ws_enter(ws);
    ws_run(ws);
    ws_leave(ws);
}

/* ---- public API ---- */

struct ws_conn *ws_conn_new(struct event_base *base, struct bufferevent *bev, bool client_role,
                            size_t max_text, const struct ws_callbacks *cb, void *arg)
{
    struct ws_conn *ws = calloc(1, sizeof(*ws));

    if (ws == NULL)
        goto fail_bev;
    ws->kick_ev = event_new(base, -1, 0, ws_on_kick, ws);
    if (ws->kick_ev == NULL)
        goto fail_ws;
    ws->close_ev = evtimer_new(base, ws_on_close_timer, ws);
    if (ws->close_ev == NULL)
        goto fail_kick;
    ws->base = base;
    ws->bev = bev;
    ws->cb = *cb;
    ws->arg = arg;
    ws->client = client_role;
    ws->max_text = max_text;
    ws->low = WS_DEFAULT_LOW_BYTES;
    ws->high = WS_DEFAULT_HIGH_BYTES;
    ws->close_timeout_ms = WS_DEFAULT_CLOSE_TIMEOUT_MS;
    ws->last_rx_ms = util_mono_ms();
    bufferevent_setcb(bev, ws_on_read, ws_on_write, ws_on_event, ws);
    tls_bev_read_ahead(bev); /* kicked after every read (ws_on_read) */
    bufferevent_setwatermark(bev, EV_READ, 0, 0);
    bufferevent_setwatermark(bev, EV_WRITE, ws->low, 0);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    if (evbuffer_get_length(bufferevent_get_input(bev)) > 0)
        ws_kick(ws);
    return ws;

fail_kick:
    event_free(ws->kick_ev);
fail_ws:
    free(ws);
fail_bev:
    bufferevent_free(bev);
    return NULL;
}

void ws_free(struct ws_conn *ws)
{
    if (ws == NULL)
        return;
    if (ws->depth == 0) {
        ws_destroy(ws);
        return;
    }
    /* Inside a ws frame: silence everything; the outermost leave frees. */
    ws->dead = true;
    bufferevent_setcb(ws->bev, NULL, NULL, NULL, NULL);
    bufferevent_disable(ws->bev, EV_READ | EV_WRITE);
    evtimer_del(ws->close_ev);
    event_del(ws->kick_ev);
}

static bool ws_can_send(const struct ws_conn *ws)
{
    return !ws->dead && !ws->reported && !ws->closing && !ws->lost;
}

/* One part of a frame's payload: bytes, or moved from an evbuffer. */
struct ws_part {
    const uint8_t *data;
    struct evbuffer *src; /* when not NULL: len bytes are moved from it */
    size_t len;
};

/* A fresh masking key (RFC 6455 5.3: from a strong source, for every
 * frame), taken from a small pool filled from the CSPRNG 16 keys at a time:
 * the tunnel sends a message per HTTP/2 DATA frame. */
static int ws_next_key(struct ws_conn *ws, uint8_t key[4])
{
    if (ws->keys_left == 0) {
        if (util_rand_bytes(ws->keys, sizeof(ws->keys)) != 0)
            return -1;
        ws->keys_left = (uint8_t)(sizeof(ws->keys) / 4);
    }
    ws->keys_left--;
    memcpy(key, ws->keys + 4u * ws->keys_left, 4);
    memset(ws->keys + 4u * ws->keys_left, 0, 4);
    return 0;
}

/* Masks len bytes of one part into out, the payload's offset being off,
 * into the space tls_out_add() would use. */
static int ws_mask_part(struct evbuffer *out, const struct ws_part *p, const uint8_t key[4],
                        size_t off)
{
    size_t done = 0;

    while (done < p->len) {
        struct evbuffer_iovec dst[2];
        const uint8_t *from;
        size_t n = p->len - done < WS_MASK_CHUNK ? p->len - done : WS_MASK_CHUNK;
        size_t put = 0;
        int nd, used = 0;
        if (p->src == NULL) {
            from = p->data + done;
        } else {
            struct evbuffer_iovec v;
            if (evbuffer_peek(p->src, -1, NULL, &v, 1) < 1)
                return -1;
            from = v.iov_base;
            if (v.iov_len < n)
                n = v.iov_len;
        }
        nd = tls_out_reserve(out, n, dst);
        if (nd < 1)
            return -1;
        for (; used < nd && put < n; used++) {
            size_t k = dst[used].iov_len < n - put ? dst[used].iov_len : n - put;
            ws_mask(dst[used].iov_base, from + put, k, key, off + done + put);
            dst[used].iov_len = k;
            put += k;
        }
        if (put != n || evbuffer_commit_space(out, dst, used) != 0)
            return -1;
        if (p->src != NULL)
            evbuffer_drain(p->src, n);
        done += n;
    }
    return 0;
}

/* Writes one whole frame whose payload is the parts, in order. */
static int ws_write_frame(struct ws_conn *ws, uint8_t opcode, const struct ws_part *parts,
                          size_t nparts)
{
    struct evbuffer *out = bufferevent_get_output(ws->bev);
    uint8_t hdr[14];
    uint8_t key[4];
    size_t hlen;
    size_t len = 0;
    size_t off = 0;

    for (size_t i = 0; i < nparts; i++)
        len += parts[i].len;
    /* Control frames wslay queued go first, so its queue is empty and no
     * wslay frame is in progress (its send callback takes every byte). */
    ws_flush(ws);
    if (!ws_can_send(ws) || !ws_write_enabled(ws))
        return -1;
    assert(ws->wslay == NULL || wslay_event_get_queued_msg_count(ws->wslay) == 0);
    if (ws->client && ws_next_key(ws, key) != 0)
        return -1;
    hlen = ws_frame_header(hdr, opcode, len, ws->client ? key : NULL);
    if (tls_out_add(out, hdr, hlen) != 0)
        return -1;
    for (size_t i = 0; i < nparts; i++) {
        const struct ws_part *p = &parts[i];
        int rv;
        if (ws->client)
            rv = ws_mask_part(out, p, key, off);
        else
            rv = p->src != NULL ? tls_out_add_buffer(out, p->src, p->len)
                                : tls_out_add(out, p->data, p->len);
        if (rv != 0)
            goto fail_lost;
        off += p->len;
    }
    ws_note_output(ws);
    return 0;

fail_lost:
    /* The header is out and the payload is not: the stream is broken. */
    ws_lose(ws);
    return -1;
}

static int ws_send(struct ws_conn *ws, uint8_t opcode, const struct ws_part *parts, size_t nparts)
{
    int rv;

    if (!ws_can_send(ws))
        return -1;
    ws_enter(ws);
    rv = ws_write_frame(ws, opcode, parts, nparts);
    ws_leave(ws);
    return rv;
}

int ws_send_text(struct ws_conn *ws, const char *data, size_t len)
{
    if (!util_utf8_valid((const uint8_t *)data, len))
        return -1;
    struct ws_part p = {(const uint8_t *)data, NULL, len};

    return ws_send(ws, WSLAY_TEXT_FRAME, &p, 1);
}

int ws_send_binary(struct ws_conn *ws, const void *data, size_t len)
{
    struct ws_part p = {data, NULL, len};

    return ws_send(ws, WSLAY_BINARY_FRAME, &p, 1);
}

int ws_send_binary_buffer(struct ws_conn *ws, struct evbuffer *src, size_t len)
{
    struct ws_part p = {NULL, src, len};

    if (evbuffer_get_length(src) < len || len > INT32_MAX)
        return -1;
    return ws_send(ws, WSLAY_BINARY_FRAME, &p, 1);
}

int ws_send_binary_buffers(struct ws_conn *ws, struct evbuffer *a, size_t alen, struct evbuffer *b,
                           size_t blen)
{
    struct ws_part p[2] = {{NULL, a, alen}, {NULL, b, blen}};

    if (evbuffer_get_length(a) < alen || evbuffer_get_length(b) < blen || a == b ||
        alen > INT32_MAX || blen > INT32_MAX - alen)
        return -1;
    return ws_send(ws, WSLAY_BINARY_FRAME, p, 2);
}

size_t ws_output_pending(const struct ws_conn *ws)
{
    return ws_pending(ws) + (ws->wslay != NULL ? wslay_event_get_queued_msg_length(ws->wslay) : 0);
}

void ws_set_max_text(struct ws_conn *ws, size_t max_text)
{
    assert(max_text > 0);
    ws->max_text = max_text;
}

void ws_set_watermarks(struct ws_conn *ws, size_t low, size_t high)
{
    ws->high = high;
    ws->low = low > high ? high : low;
    if (!ws->closing && !ws->reported && !ws->dead)
        bufferevent_setwatermark(ws->bev, EV_WRITE, ws->low, 0);
}

bool ws_is_writable(const struct ws_conn *ws)
{
    return ws_can_send(ws) && ws_output_pending(ws) < ws->high;
}

void ws_pause_read(struct ws_conn *ws, bool paused)
{
    if (ws->dead || ws->reported || paused == ws->paused)
        return;
    if (paused) {
        if (ws->closing)
            return;
        ws->paused = true;
        bufferevent_disable(ws->bev, EV_READ);
        return;
    }
    ws->paused = false;
    bufferevent_enable(ws->bev, EV_READ);
    tls_bev_kick_read(ws->bev); /* records OpenSSL read before the pause */
    ws_kick(ws); /* buffered input, or an EOF seen while paused */
}

int ws_close(struct ws_conn *ws, int code, const char *reason)
{
    size_t len;
    int rv;

    if (ws->dead || ws->reported || !ws_close_code_ok(code))
        return -1;
    if (ws->closing || ws->lost)
        return 0;
    ws_enter(ws);
    len = ws_copy_reason(ws->sent_reason, reason, reason != NULL ? strlen(reason) : 0);
    rv = ws_wslay(ws) != 0 ? WSLAY_ERR_NOMEM
                           : wslay_event_queue_close(ws->wslay, (uint16_t)code,
                                                     (const uint8_t *)ws->sent_reason, len);
    if (rv != 0 && rv != WSLAY_ERR_NO_MORE_MSG) {
        ws_leave(ws);
        return -1;
    }
    ws->local_close = true;
    ws->sent_code = code;
    ws_start_closing(ws);
    ws_flush(ws);
    ws_kick(ws);
    ws_leave(ws);
    return 0;
}

void ws_set_close_timeout_ms(struct ws_conn *ws, uint64_t ms)
{
    ws->close_timeout_ms = ms;
}

int ws_ping(struct ws_conn *ws)
{
    uint8_t payload[8];
    uint64_t now = util_mono_ms();
    struct wslay_event_msg msg = {WSLAY_PING, payload, sizeof(payload)};
    int rv;

    if (!ws_can_send(ws))
        return -1;
    for (int i = 0; i < 8; i++)
        payload[i] = (uint8_t)(now >> (56 - 8 * i));
    ws_enter(ws);
    rv = ws_wslay(ws) != 0 ? WSLAY_ERR_NOMEM : wslay_event_queue_msg(ws->wslay, &msg);
    if (rv == 0) {
        ws_flush(ws);
        ws_wslay_park(ws);
    }
    ws_leave(ws);
    return rv == 0 ? 0 : -1;
}

uint64_t ws_last_rx_ms(const struct ws_conn *ws)
{
    return ws->last_rx_ms;
}

uint64_t ws_last_pong_ms(const struct ws_conn *ws)
{
    return ws->last_pong_ms;
}

bool ws_parser_live(const struct ws_conn *ws)
{
    return ws->wslay != NULL;
}

/* ---- handshake helpers ---- */

static const char ws_b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int ws_accept_key(const char *client_key, size_t len, char out[29])
{
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    char buf[24 + sizeof(WS_GUID)];

    /* RFC 6455 section 4.2.1: base64 of 16 bytes is 22 characters, the last
     * carrying 2 significant bits (one of AQgw), and "==". */
    if (client_key == NULL || len != 24 || client_key[22] != '=' || client_key[23] != '=')
        return -1;
    for (size_t i = 0; i < 22; i++) {
        if (client_key[i] == '\0' || strchr(ws_b64, client_key[i]) == NULL)
            return -1;
    }
    if (strchr("AQgw", client_key[21]) == NULL)
        return -1;
    memcpy(buf, client_key, 24);
    memcpy(buf + 24, WS_GUID, sizeof(WS_GUID) - 1);
    if (EVP_Digest(buf, 24 + sizeof(WS_GUID) - 1, md, &mdlen, EVP_sha1(), NULL) != 1 ||
        mdlen != 20)
        return -1;
    if (EVP_EncodeBlock((unsigned char *)out, md, 20) != 28)
        return -1;
    return 0;
}

int ws_client_key(char out[25])
{
    uint8_t raw[16];

    if (util_rand_bytes(raw, sizeof(raw)) != 0)
        return -1;
    if (EVP_EncodeBlock((unsigned char *)out, raw, sizeof(raw)) != 24)
        return -1;
    return 0;
}

/* A header value or request-target: no control characters (CR, LF, NUL). */
static bool ws_text_ok(const char *s, bool allow_space)
{
    if (s == NULL || *s == '\0')
        return false;
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == 0x7f || (c < 0x20 && c != '\t') || (!allow_space && (c == ' ' || c == '\t')))
            return false;
    }
    return true;
}

/* Complete "Name: value\r\n" lines, nothing else. */
static bool ws_extra_headers_ok(const char *s)
{
    while (*s != '\0') {
        const char *eol = strstr(s, "\r\n");
        const char *colon;
        if (eol == NULL || eol == s)
            return false;
        colon = memchr(s, ':', (size_t)(eol - s));
        if (colon == NULL || colon == s)
            return false;
        for (const char *p = s; p < eol; p++) {
            unsigned char c = (unsigned char)*p;
            if (c == 0x7f || (c < 0x20 && c != '\t'))
                return false;
            if (p < colon && (c <= ' ' || c == 0x7f))
                return false;
        }
        s = eol + 2;
    }
    return true;
}

int ws_client_request(struct evbuffer *out, const char *host_port, const char *path,
                      const char *key, const char *subprotocol, const char *extra_headers)
{
    struct evbuffer *tmp;
    int rv = -1;

    if (!ws_text_ok(host_port, false) || !ws_text_ok(path, false) || path[0] != '/' ||
        !ws_text_ok(key, false) || (subprotocol != NULL && !ws_text_ok(subprotocol, true)) ||
        (extra_headers != NULL && !ws_extra_headers_ok(extra_headers)))
        return -1;
    tmp = evbuffer_new();
    if (tmp == NULL)
        return -1;
    if (evbuffer_add_printf(tmp,
                            "GET %s HTTP/1.1\r\n"
                            "Host: %s\r\n"
                            "Upgrade: websocket\r\n"
                            "Connection: Upgrade\r\n"
                            "Sec-WebSocket-Key: %s\r\n"
                            "Sec-WebSocket-Version: 13\r\n",
                            path, host_port, key) < 0)
        goto out;
    if (subprotocol != NULL &&
        evbuffer_add_printf(tmp, "Sec-WebSocket-Protocol: %s\r\n", subprotocol) < 0)
        goto out;
    if (extra_headers != NULL && evbuffer_add(tmp, extra_headers, strlen(extra_headers)) != 0)
        goto out;
    if (evbuffer_add(tmp, "\r\n", 2) != 0)
        goto out;
    if (evbuffer_add_buffer(out, tmp) != 0)
        goto out;
    rv = 0;
out:
    evbuffer_free(tmp);
    return rv;
}

/* What the response head says, collected by the http-parser callbacks. */
struct ws_resp {
    const char *accept;      /* expected Sec-WebSocket-Accept */
    const char *subprotocol; /* requested, or NULL */
    char name[32];           /* current header name, truncated */
    size_t name_len;         /* bytes of it seen (may exceed sizeof(name)) */
    char value[256];         /* current header value, truncated */
    size_t value_len;        /* bytes of it seen (may exceed sizeof(value)) */
    bool in_value;           /* the last callback was a value */
    bool done;               /* headers complete */
    bool too_long;           /* a header we check was longer than value */
    int n_upgrade;           /* Upgrade headers */
    bool upgrade_ok;         /* the last one was "websocket" */
    bool conn_upgrade;       /* Connection listed "upgrade" */
    int n_accept;            /* Sec-WebSocket-Accept headers */
    bool accept_ok;          /* the last one matched */
    int n_proto;             /* Sec-WebSocket-Protocol headers */
    bool proto_ok;           /* the last one equalled subprotocol */
    bool extensions;         /* Sec-WebSocket-Extensions present */
    bool has_cl;             /* Content-Length present and valid */
    uint64_t cl;             /* its value */
};

static void ws_append(char *dst, size_t cap, size_t *len, const char *at, size_t n)
{
    if (*len < cap) {
        size_t k = n < cap - *len ? n : cap - *len;
        memcpy(dst + *len, at, k);
    }
    *len = *len + n < *len ? SIZE_MAX : *len + n;
}

static struct iov ws_trim(const char *s, size_t len)
{
    while (len > 0 && (s[0] == ' ' || s[0] == '\t')) {
        s++;
        len--;
    }
    while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t'))
        len--;
    return (struct iov){s, len};
}

static bool ws_has_token(struct iov list, const char *token)
{
    size_t i = 0;

    while (i <= list.len) {
        size_t j = i;
        while (j < list.len && list.base[j] != ',')
            j++;
        if (util_iov_ieq_str(ws_trim(list.base + i, j - i), token))
            return true;
        i = j + 1;
    }
    return false;
}

static void ws_resp_header_done(struct ws_resp *r)
{
    struct iov name = {r->name, r->name_len};
    struct iov v;
    bool long_value = r->value_len > sizeof(r->value);

    r->in_value = false;
    v = ws_trim(r->value, long_value ? sizeof(r->value) : r->value_len);
    if (r->name_len > sizeof(r->name)) {
        /* Longer than any name we check. */
    } else if (util_iov_ieq_str(name, "upgrade")) {
        r->n_upgrade++;
        r->upgrade_ok = !long_value && util_iov_ieq_str(v, "websocket");
    } else if (util_iov_ieq_str(name, "connection")) {
        if (long_value)
            r->too_long = true;
        else if (ws_has_token(v, "upgrade"))
            r->conn_upgrade = true;
    } else if (util_iov_ieq_str(name, "sec-websocket-accept")) {
        r->n_accept++;
        r->accept_ok = !long_value && v.len == strlen(r->accept) &&
                       memcmp(v.base, r->accept, v.len) == 0;
    } else if (util_iov_ieq_str(name, "sec-websocket-protocol")) {
        r->n_proto++;
        r->proto_ok = !long_value && r->subprotocol != NULL && v.len == strlen(r->subprotocol) &&
                      memcmp(v.base, r->subprotocol, v.len) == 0;
    } else if (util_iov_ieq_str(name, "sec-websocket-extensions")) {
        r->extensions = true;
    } else if (util_iov_ieq_str(name, "content-length")) {
        r->has_cl = !long_value && util_parse_u64(v.base, v.len, &r->cl) == 0;
    }
    r->name_len = 0;
    r->value_len = 0;
}

static int ws_resp_on_field(http_parser *p, const char *at, size_t len)
{
    struct ws_resp *r = p->data;

    if (r->in_value)
        ws_resp_header_done(r);
    ws_append(r->name, sizeof(r->name), &r->name_len, at, len);
    return 0;
}

static int ws_resp_on_value(http_parser *p, const char *at, size_t len)
{
    struct ws_resp *r = p->data;

    r->in_value = true;
    ws_append(r->value, sizeof(r->value), &r->value_len, at, len);
    return 0;
}

static int ws_resp_on_headers_complete(http_parser *p)
{
    struct ws_resp *r = p->data;

    if (r->in_value)
        ws_resp_header_done(r);
    r->done = true;
    return 1; /* no body: we read it ourselves */
}

/* Runs a fresh http-parser over the first len bytes of in. Returns the
 * parser's errno. */
static enum http_errno ws_resp_parse(struct evbuffer *in, size_t len, http_parser *p,
                                     struct ws_resp *r)
{
    http_parser_settings s;
    struct evbuffer_iovec v[16];
    int n;

    http_parser_settings_init(&s);
    s.on_header_field = ws_resp_on_field;
    s.on_header_value = ws_resp_on_value;
    s.on_headers_complete = ws_resp_on_headers_complete;
    http_parser_init(p, HTTP_RESPONSE);
    p->data = r;
    n = evbuffer_peek(in, (ev_ssize_t)len, NULL, v, 16);
    if (n > 16) { /* rare: a head spread over many chains */
        if (evbuffer_pullup(in, (ev_ssize_t)len) == NULL)
            return HPE_UNKNOWN;
        n = evbuffer_peek(in, (ev_ssize_t)len, NULL, v, 16);
    }
    for (int i = 0; i < n && len > 0; i++) {
        size_t k = v[i].iov_len < len ? v[i].iov_len : len;
        size_t used = http_parser_execute(p, &s, v[i].iov_base, k);
        if (HTTP_PARSER_ERRNO(p) != HPE_OK)
            return HTTP_PARSER_ERRNO(p);
        if (used != k)
            return HPE_UNKNOWN;
        len -= k;
    }
    return HPE_OK;
}

static void ws_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void ws_set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* The JSON body's "error" string, printable ASCII only, into out. */
static void ws_body_error(const char *body, size_t len, char out[WS_MAX_ERR_TEXT + 1])
{
    cJSON *j = cJSON_ParseWithLength(body, len);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    size_t n = 0;

    out[0] = '\0';
    if (cJSON_IsString(e) && e->valuestring != NULL) {
        for (const char *s = e->valuestring; *s != '\0' && n < WS_MAX_ERR_TEXT; s++) {
            unsigned char c = (unsigned char)*s;
            out[n++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
        }
        out[n] = '\0';
    }
    cJSON_Delete(j);
}

static int ws_resp_refused(struct evbuffer *in, size_t head_len, const struct ws_resp *r,
                           int status, char *err, size_t errlen)
{
    size_t avail = evbuffer_get_length(in) - head_len;
    size_t want = avail;
    char body[WS_MAX_ERR_BODY];
    char msg[WS_MAX_ERR_TEXT + 1];

    if (r->has_cl) {
        want = r->cl < WS_MAX_ERR_BODY ? (size_t)r->cl : WS_MAX_ERR_BODY;
        if (avail < want)
            return 1;
    }
    if (want > WS_MAX_ERR_BODY)
        want = WS_MAX_ERR_BODY;
    msg[0] = '\0';
    if (want > 0) {
        struct evbuffer_ptr pos;
        evbuffer_ptr_set(in, &pos, head_len, EVBUFFER_PTR_SET);
        if (evbuffer_copyout_from(in, &pos, body, want) == (ev_ssize_t)want)
            ws_body_error(body, want, msg);
    }
    if (msg[0] != '\0')
        ws_set_err(err, errlen, "HTTP %d %s", status, msg);
    else
        ws_set_err(err, errlen, "HTTP %d", status);
    evbuffer_drain(in, head_len + want);
    return -1;
}

int ws_client_parse_response(struct evbuffer *in, const char *key, const char *subprotocol,
                             int *status, char *err, size_t errlen)
{
    struct ws_resp r = {.subprotocol = subprotocol};
    char accept[29];
    http_parser p;
    struct evbuffer_ptr end;
    size_t len = evbuffer_get_length(in);
    size_t head_len;
    enum http_errno he;

    *status = 0;
    ws_set_err(err, errlen, "%s", "");
    if (ws_accept_key(key, strlen(key), accept) != 0) {
        ws_set_err(err, errlen, "bad Sec-WebSocket-Key");
        return -1;
    }
    r.accept = accept;
    end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
    if (end.pos < 0 || (size_t)end.pos + 4 > WS_MAX_RESP_HEAD) {
        if (len >= WS_MAX_RESP_HEAD || end.pos >= 0) {
            ws_set_err(err, errlen, "response head too large");
            return -1;
        }
        /* Incomplete: still refuse early what is not HTTP at all (from the
         * first bytes only, so a server trickling bytes costs little). */
        he = ws_resp_parse(in, len < 256 ? len : 256, &p, &r);
        if (he != HPE_OK) {
            ws_set_err(err, errlen, "bad HTTP response: %s", http_errno_description(he));
            return -1;
        }
        return 1;
    }
    head_len = (size_t)end.pos + 4;
    he = ws_resp_parse(in, head_len, &p, &r);
    if (he != HPE_OK || !r.done) {
        ws_set_err(err, errlen, "bad HTTP response: %s",
                   he != HPE_OK ? http_errno_description(he) : "incomplete head");
        return -1;
    }
    *status = (int)p.status_code;
    if (p.status_code != 101)
        return ws_resp_refused(in, head_len, &r, *status, err, errlen);
    if (p.http_major != 1 || p.http_minor < 1) {
        ws_set_err(err, errlen, "101 answer is not HTTP/1.1");
        return -1;
    }
    if (r.too_long) {
        ws_set_err(err, errlen, "header value too long");
        return -1;
    }
    if (r.n_upgrade != 1 || !r.upgrade_ok) {
        ws_set_err(err, errlen, "missing or bad Upgrade header");
        return -1;
    }
    if (!r.conn_upgrade) {
        ws_set_err(err, errlen, "missing Connection: upgrade");
        return -1;
    }
    if (r.n_accept != 1 || !r.accept_ok) {
        ws_set_err(err, errlen, "bad Sec-WebSocket-Accept");
        return -1;
    }
    if (subprotocol == NULL ? r.n_proto != 0 : r.n_proto != 1 || !r.proto_ok) {
        ws_set_err(err, errlen, "subprotocol mismatch");
        return -1;
    }
    if (r.extensions) {
        ws_set_err(err, errlen, "unexpected Sec-WebSocket-Extensions");
        return -1;
    }
    evbuffer_drain(in, head_len);
    return 0;
}
