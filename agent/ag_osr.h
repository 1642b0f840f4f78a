/* The Osaurus relay protocol's data path on the agent's side (proto/PROTOCOL.md
 * section 9, docs/OSAURUS.md): one session per authenticated Osaurus-mode
 * tunnel. It takes the relay's `request`, `cancel` and `ping` frames, forwards
 * each request to its agent's local API with ag_fwd, and answers with one
 * `response` frame, or `stream_start`, `stream_chunk`s and `stream_end`:
 * - text/event-stream and application/x-ndjson stream at once, flushed at each
 *   newline or 16 KiB, never splitting a UTF-8 sequence;
 * - other bodies are held up to 1 MiB: a body that ends there goes out whole
 *   (one `response` frame up to 256 KiB, chunks above), a longer one streams;
 * - a body that is not UTF-8 goes out base64 where the gateway said it takes
 *   it (auth_ok "features"), otherwise the caller gets 502
 *   binary_body_unsupported: never mangled bytes;
 * - output only while the WebSocket is below its high watermark; a request
 *   whose unsent bytes pass 1 MiB stops reading its local API.
 * Owned by its tunnel (ag_tun), which hands it the WebSocket once auth_ok came
 * and frees it before the WebSocket. Everything it does runs from the
 * tunnel's WebSocket callbacks, the local connections' callbacks and its own
 * deferred event, never under an ag_osr_* call's caller's objects. */
#ifndef AG_OSR_H
#define AG_OSR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ag_ctx;
struct ag_osr;
struct tun_msg;
struct ws_conn;

struct ag_osr_cbs {
    /* True if addr (lowercase) is registered on the tunnel now. */
    bool (*serves)(void *arg, const char *addr);
    /* The last request in flight finished (a draining tunnel may close). Called
     * from the session's own event. */
    void (*on_idle)(void *arg);
};

/* A session on ws (borrowed; the tunnel frees the session first). features:
 * TUN_FEAT_* of auth_ok. tun_id numbers log lines. Returns NULL if out of
 * memory. */
struct ag_osr *ag_osr_new(struct ag_ctx *ctx, uint64_t tun_id, struct ws_conn *ws,
                          uint32_t features, const struct ag_osr_cbs *cb, void *arg);

/* Closes every local request at once (no frame is sent) and frees the
 * session. Takes NULL. */
void ag_osr_free(struct ag_osr *o);

/* A decoded `request`, `cancel` or `ping` frame (other types are ignored). */
void ag_osr_on_msg(struct ag_osr *o, const struct tun_msg *m);

/* A `request` frame that failed to decode (code: tun_msg's wire code); id is its
 * id if one was readable, else "". Answered 400 invalid_request when it can be. */
void ag_osr_on_bad_request(struct ag_osr *o, const char *id, const char *code);

/* The WebSocket fell below its low watermark: produce again. */
void ag_osr_on_writable(struct ag_osr *o);

/* From now on new requests are answered 503 shutting_down; those in flight
 * finish. */
void ag_osr_drain(struct ag_osr *o);

/* Requests in flight (answer not complete). */
size_t ag_osr_requests(const struct ag_osr *o);

#endif
