/* RFC 6455 WebSocket over a libevent bufferevent, for both roles: the gateway
 * (server) and the agent (client). wslay parses incoming frames without
 * assembling messages; ws assembles text messages (capped), streams binary
 * payload to the owner as it arrives, and writes data frames straight into the
 * bufferevent's output. Also the handshake helpers (accept key, client
 * request, client-side response check). Driven by the bufferevent's callbacks. */
#ifndef WS_H
#define WS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bufferevent;
struct event_base;
struct evbuffer;

/* Close codes (RFC 6455 section 7.4.1; 1012-1014 from the IANA registry). */
#define WS_CLOSE_NORMAL 1000
#define WS_CLOSE_GOING_AWAY 1001
#define WS_CLOSE_PROTOCOL_ERROR 1002
#define WS_CLOSE_NO_STATUS 1005 /* reported only: peer's close carried no code */
#define WS_CLOSE_ABNORMAL 1006  /* reported only: no close frame, connection lost */
#define WS_CLOSE_INVALID_DATA 1007
#define WS_CLOSE_POLICY 1008
#define WS_CLOSE_TOO_BIG 1009
#define WS_CLOSE_INTERNAL 1011
#define WS_CLOSE_RESTART 1012

/* Defaults; see ws_set_watermarks() and ws_set_close_timeout_ms(). */
#define WS_DEFAULT_LOW_BYTES (64u * 1024u)
#define WS_DEFAULT_HIGH_BYTES (512u * 1024u)
#define WS_DEFAULT_CLOSE_TIMEOUT_MS 2000u

/* One WebSocket connection; owns its bufferevent. Owned by whoever created it
 * (gw_tun, gw_osr, ag_tun). */
struct ws_conn;

/* Callbacks. Guarantees:
 * 1. They are only ever invoked from the event loop (ws's bufferevent, timer
 *    or deferred callbacks), never from inside a ws_* call; a bufferevent
 *    callback that libevent runs synchronously inside one (OpenSSL and
 *    filter bufferevents do, unless BEV_OPT_DEFER_CALLBACKS) is deferred to
 *    the loop.
 * 2. Inside any of them the owner may call every ws_* function on any
 *    connection, including ws_close() and ws_free() on this one: ws_free()
 *    then only marks the connection, and it is freed when the stack unwinds;
 *    no callback follows.
 * 3. on_close is called exactly once unless ws_free() came first; nothing
 *    follows it. */
struct ws_callbacks {
    /* A whole TEXT message, valid UTF-8 (checked by wslay), at most max_text
     * bytes, NUL-terminated for convenience (data[len] == '\0'). Larger
     * messages fail the connection with 1009. NULL: text is dropped. */
    void (*on_text)(void *arg, const char *data, size_t len);
    /* The next chunk (len > 0, at most 4 KiB) of a BINARY message's payload,
     * in order, as it arrives; message boundaries are not reported. Return 0,
     * or -1 to fail the connection (close 1011, then on_close). NULL: binary
     * is dropped. */
    int (*on_binary)(void *arg, const uint8_t *data, size_t len);
    /* The connection ended; code and reason (never NULL, possibly "") are:
     * - the peer sent a close frame: its code (1005 if it had none), its reason;
     * - ws failed the connection: the code it sent (1002 protocol error, 1007
     *   invalid UTF-8, 1009 text too big, 1011 on_binary refused or out of
     *   memory) and a short local reason;
     * - ws_close() went unanswered (EOF or timeout): the code and reason sent;
     * - EOF, I/O error or timeout with no close frame: 1006.
     * The owner then frees the connection (ws_free() here is allowed). */
    void (*on_close)(void *arg, int code, const char *reason);
    /* The output fell to the low watermark after a send had taken it to the
     * high watermark (ws_is_writable() turned false): produce again. */
    void (*on_writable)(void *arg);
};

/* Wraps an upgraded connection. client_role masks outgoing frames and expects
 * unmasked ones (RFC 6455 section 5.3). max_text caps an assembled text
 * message (bytes, > 0). cb is copied. Takes ownership of bev (which should be
 * BEV_OPT_CLOSE_ON_FREE), also on failure; replaces its callbacks and
 * watermarks (a bufferevent timeout, if the owner sets one, ends the
 * connection with 1006; use ws_last_rx_ms() instead). Bytes already in bev's
 * input (read past the HTTP upgrade) are processed from the loop, as is
 * everything else. Returns NULL if out of memory. */
struct ws_conn *ws_conn_new(struct event_base *base, struct bufferevent *bev, bool client_role,
                            size_t max_text, const struct ws_callbacks *cb, void *arg);

/* Frees the connection and its bufferevent (unsent output is dropped) without
 * calling any callback. Takes NULL. Safe inside a callback (see above). */
void ws_free(struct ws_conn *ws);

/* Send one complete message as a single frame. Text must be valid UTF-8.
 * Never blocks: the bytes are queued in the output; the owner watches
 * ws_is_writable(). Return 0, or -1 if closing/closed or invalid UTF-8
 * (nothing was queued), or out of memory (the frame may be cut: the
 * connection is then lost and on_close follows). */
int ws_send_text(struct ws_conn *ws, const char *data, size_t len);
int ws_send_binary(struct ws_conn *ws, const void *data, size_t len);

/* Moves len bytes from src into one binary message: zero-copy for the server
 * role, one masked copy for the client role. Returns 0, or -1 (src left
 * untouched) if src holds fewer than len bytes or as ws_send_binary(). */
int ws_send_binary_buffer(struct ws_conn *ws, struct evbuffer *src, size_t len);

/* The same for one message made of alen bytes of a, then blen bytes of b
 * (two buffers, say frames queued before and the payload that follows,
 * with no copy between them first). -1 (both untouched) if either holds too
 * few bytes, if a == b, or as ws_send_binary(). */
int ws_send_binary_buffers(struct ws_conn *ws, struct evbuffer *a, size_t alen, struct evbuffer *b,
                           size_t blen);

/* Bytes queued but not yet written to the socket (or to TLS). */
size_t ws_output_pending(const struct ws_conn *ws);

/* Changes the cap of an assembled text message (> 0), e.g. raised once the
 * peer has authenticated. A message in progress is held to the new cap. */
void ws_set_max_text(struct ws_conn *ws, size_t max_text);

/* Output watermarks in bytes; low <= high (low is clamped to high). */
void ws_set_watermarks(struct ws_conn *ws, size_t low, size_t high);

/* True while open (no close started) and ws_output_pending() < high. */
bool ws_is_writable(const struct ws_conn *ws);

/* Backpressure: paused stops reading the socket and processing input already
 * buffered; resuming processes it from the loop. Up to one wslay read buffer
 * (4 KiB) taken from the input before the pause may still be delivered in
 * the callback frame that paused. While paused, pongs and closes are not seen
 * either. ws_close() and failures resume reading. */
void ws_pause_read(struct ws_conn *ws, bool paused);

/* Starts the closing handshake: sends a close frame with code (1000-1003,
 * 1007-1014, 3000-4999) and reason (UTF-8, cut to 123 bytes at a character
 * boundary; NULL = ""), stops delivering messages, and waits for the peer's
 * close, EOF or the close timeout, then reports on_close from the loop.
 * Returns 0 (also if closing had already started), or -1 on a bad code or if
 * on_close was already reported. */
int ws_close(struct ws_conn *ws, int code, const char *reason);

/* How long the close handshake may take before on_close is reported anyway. */
void ws_set_close_timeout_ms(struct ws_conn *ws, uint64_t ms);

/* Sends a ping whose payload is the 8-byte big-endian util_mono_ms(); pings
 * from the peer are answered automatically. Returns 0 or -1 if closing. */
int ws_ping(struct ws_conn *ws);

/* util_mono_ms() of the last byte read from the socket, or of ws_conn_new(). */
uint64_t ws_last_rx_ms(const struct ws_conn *ws);

/* util_mono_ms() of the last pong received, 0 if none. */
uint64_t ws_last_pong_ms(const struct ws_conn *ws);

/* Whether the connection holds a wslay context now. It exists only while a
 * frame that is not a whole binary message is being read, a control frame
 * it queued is unsent, or a close is under way; an idle connection holds
 * none (about 8.5 KiB less per idle tunnel). For tests. */
bool ws_parser_live(const struct ws_conn *ws);

/* Handshake helpers. HTTP parsing on the server side is the caller's (gw_h1). */

/* base64(SHA-1(key + RFC 6455 GUID)) into out (28 characters + NUL). Refuses
 * (returns -1) a key that is not the canonical base64 of 16 bytes. */
int ws_accept_key(const char *client_key, size_t len, char out[29]);

/* A fresh Sec-WebSocket-Key: base64 of 16 CSPRNG bytes (24 characters + NUL).
 * Returns 0 or -1. */
int ws_client_key(char out[25]);

/* Appends the client's upgrade request: GET path HTTP/1.1, Host,
 * Upgrade: websocket, Connection: Upgrade, Sec-WebSocket-Key, -Version: 13,
 * Sec-WebSocket-Protocol if subprotocol is not NULL, then extra_headers
 * (NULL, or complete "Name: value\r\n" lines). Returns 0, or -1 if a value
 * holds CR, LF or other control characters, path does not start with '/',
 * extra_headers is malformed, or out of memory. */
int ws_client_request(struct evbuffer *out, const char *host_port, const char *path,
                      const char *key, const char *subprotocol, const char *extra_headers);

/* Checks the server's answer to ws_client_request() at the head of in.
 * Returns 1 while more bytes are needed (nothing drained; also while the
 * Content-Length body of a non-101 answer, up to 4 KiB, is incomplete: at EOF
 * the caller reports *status itself if it is not 0); 0 when it is a
 * valid 101 (Upgrade: websocket, Connection: upgrade, Sec-WebSocket-Accept
 * matching key, Sec-WebSocket-Protocol equal to subprotocol, or absent when
 * subprotocol is NULL, no extensions): exactly the response head is drained
 * and any frame bytes after it stay in in. Returns -1 otherwise, with a
 * printable message in err: for a non-101 answer "HTTP <status>" plus, when
 * the body is JSON {"error":"..."}, " " and that string (up to 200 bytes),
 * e.g. "HTTP 403 address_not_allowed"; the head and the body read are
 * drained. *status is the answer's status code, or 0 before the head is
 * complete. */
int ws_client_parse_response(struct evbuffer *in, const char *key, const char *subprotocol,
                             int *status, char *err, size_t errlen);

/* The RFC 6455 frame header at the start of in, copied into b (up to 14
 * bytes) with its payload length. Returns the header's length, 0 if in does
 * not hold all of it yet, or -1 if the length field is not minimally encoded
 * or too large. For a fast path in front of wslay (ws_recv; the benchmark's
 * origin). */
int ws_peek_header(struct evbuffer *in, uint8_t b[14], uint64_t *payload);

#endif
