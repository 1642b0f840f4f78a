/* Every JSON control message of the tunnel protocol (proto/PROTOCOL.md), native and
 * Osaurus mode, as one tagged struct; strict decoding (cJSON plus the protocol's shape
 * rules), encoding, the signed texts, and the protocol's error-code table (wire string,
 * WebSocket close code, human message). Stateless; gw_tun, gw_osr, gw_reg and ag_tun
 * call it on every text message. */
#ifndef TUN_MSG_H
#define TUN_MSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "id.h"
#include "util.h"

#define TUN_SUBPROTOCOL "tunnel-h2.v1" /* Sec-WebSocket-Protocol of native mode */
#define TUN_CONNECT_PATH "/tunnel/connect"

/* Protocol constants (PROTOCOL.md section 10). */
#define TUN_MAX_AGENTS 50          /* per auth / auth_ok frame */
#define TUN_NONCE_HEX_LEN 64       /* 32 CSPRNG bytes as lowercase hex */
#define TUN_NONCE_TTL_S 30         /* challenge.expires_in */
#define TUN_AUTH_TIMEOUT_S 10      /* from the upgrade to a valid auth */
#define TUN_TS_WINDOW_S 30         /* |now - timestamp| allowed */
#define TUN_PING_INTERVAL_S 20     /* native h2 PING default */
#define TUN_OSR_PING_INTERVAL_S 30 /* Osaurus JSON ping */
#define TUN_DEAD_AFTER_PINGS 3     /* silent intervals before a peer is dead */
#define TUN_CTL_RATE_NATIVE 60     /* control messages per minute after auth */
#define TUN_CTL_RATE_OSAURUS 10
#define TUN_CTL_MAX_BYTES 65536u                    /* one control message; larger: close 1009 */
#define TUN_OSR_MAX_FRAME_BYTES (64u * 1024 * 1024) /* Osaurus text message after auth */
#define TUN_MAX_DEPTH 16                            /* JSON nesting */

/* Field bounds of the decoded struct. */
#define TUN_INSTANCE_MIN 8
#define TUN_INSTANCE_MAX 64
#define TUN_CODE_MAX 64     /* error code / removal reason */
#define TUN_MESSAGE_MAX 255 /* human text kept (longer text is truncated) */
#define TUN_REGION_MAX 64
#define TUN_URL_MAX 320
#define TUN_DOMAIN_MAX 253 /* auth_error "domain": a DNS name (PROTOCOL.md 4.6) */
#define TUN_ID_MAX 64 /* Osaurus request id */
#define TUN_FEATURES_MAX 32
#define TUN_FEATURE_NAME_MAX 64

/* Osaurus data frames (PROTOCOL.md 9.4-9.6). Text sizes count UTF-16 code units, as
 * the relay's JavaScript checks do; base64 sizes count decoded bytes. */
#define TUN_OSR_MAX_BODY 10485760u
#define TUN_OSR_MAX_CHUNK 1048576u
#define TUN_OSR_MAX_RESP_HEADERS 128u
#define TUN_OSR_MAX_REQ_HEADERS 1024u
#define TUN_OSR_MAX_HEADER_VALUE 16384u     /* response header value */
#define TUN_OSR_MAX_REQ_HEADER_VALUE 65536u /* request header value, bytes */
#define TUN_OSR_MAX_HEADER_NAME 256u
#define TUN_OSR_MAX_METHOD 32u
#define TUN_OSR_MAX_PATH 65536u

/* auth.features bits. */
#define TUN_FEAT_BASE64 0x1u /* "base64": Osaurus bodies as base64 */

/* Big enough for either signed text with a 253-byte domain. */
#define TUN_SIGNED_TEXT_MAX 512

enum tun_mode {
    TUN_MODE_NATIVE = 0, /* subprotocol tunnel-h2.v1 */
    TUN_MODE_OSAURUS,    /* no subprotocol: the Osaurus relay protocol */
};

/* Every code of PROTOCOL.md section 11.1. Negative, so decoders return them. */
enum tun_err {
    TUN_E_NONE = 0,
    TUN_E_INVALID_JSON = -1,
    TUN_E_EXPECTED_AUTH_FRAME = -2,
    TUN_E_INVALID_NONCE = -3,
    TUN_E_NO_AGENTS = -4,
    TUN_E_TOO_MANY_AGENTS = -5,
    TUN_E_INVALID_ADDRESS = -6,
    TUN_E_TIMESTAMP_OUT_OF_RANGE = -7,
    TUN_E_PROTOCOL_ERROR = -8,
    TUN_E_SIGNATURE_VERIFICATION_FAILED = -9,
    TUN_E_AUTH_TIMEOUT = -10,
    TUN_E_ADDRESS_NOT_ALLOWED = -11,
    TUN_E_RATE_LIMITED = -12,
    TUN_E_UNKNOWN_TYPE = -13,
    TUN_E_UNEXPECTED_MESSAGE = -14,
    TUN_E_MAX_AGENTS_REACHED = -15,
    TUN_E_INVALID_SIGNATURE = -16, /* Osaurus add_agent */
    TUN_E_RELAY_RESTARTING = -17,
    TUN_E_BAD_HOST_RESPONSE = -18,
    TUN_E_MESSAGE_TOO_LARGE = -19,
    TUN_E_KEEPALIVE_TIMEOUT = -20,
    TUN_E_SHUTTING_DOWN = -21,
    TUN_E_INTERNAL_ERROR = -22, /* also: out of memory in the codec */
    TUN_E_OTHER = -23,          /* a peer's code this build does not know */
};
#define TUN_E_COUNT 24 /* number of codes, TUN_E_NONE included */

enum tun_msg_type {
    TUN_MSG_NONE = 0, /* unknown or unreadable type */
    TUN_MSG_CHALLENGE,
    TUN_MSG_AUTH,
    TUN_MSG_AUTH_OK,
    TUN_MSG_AUTH_ERROR,
    TUN_MSG_REQUEST_CHALLENGE,
    TUN_MSG_ADD_AGENT,
    TUN_MSG_AGENT_ADDED,
    TUN_MSG_REMOVE_AGENT,
    TUN_MSG_AGENT_REMOVED,
    TUN_MSG_ERROR,
    TUN_MSG_DRAINING, /* native only */
    TUN_MSG_PING,     /* Osaurus only, from here to the end */
    TUN_MSG_PONG,
    TUN_MSG_REQUEST,
    TUN_MSG_RESPONSE,
    TUN_MSG_STREAM_START,
    TUN_MSG_STREAM_CHUNK,
    TUN_MSG_STREAM_END,
    TUN_MSG_CANCEL,
};
#define TUN_MSG_TYPE_COUNT 20

/* agent_removed.reason */
enum tun_reason {
    TUN_REASON_NONE = 0, /* absent: means "removed" */
    TUN_REASON_REMOVED,
    TUN_REASON_REPLACED,
    TUN_REASON_SUPERSEDED,
    TUN_REASON_NOT_ALLOWED,
    TUN_REASON_OTHER, /* unknown string, kept in reason_str; treat as superseded */
};

/* One entry of auth.agents, or the agent of add_agent. */
struct tun_msg_agent_auth {
    uint8_t addr[ID_ADDR_LEN];
    char addr_str[ID_ADDR_STR_LEN + 1]; /* exactly as sent (Osaurus signs this form);
                                           encode: "" sends the lowercase form of addr */
    char sig[ID_SIG_STR_LEN + 1];       /* "0x" + 130 hex, as sent */
    uint32_t response_timeout_s;        /* 0 = not given */
};

/* One entry of auth_ok.agents. */
struct tun_msg_agent_url {
    uint8_t addr[ID_ADDR_LEN];
    char url[TUN_URL_MAX + 1];
};

/* One entry of auth_ok.rejected. */
struct tun_msg_rejected {
    uint8_t addr[ID_ADDR_LEN];
    enum tun_err err;             /* TUN_E_OTHER if the code is unknown */
    char error[TUN_CODE_MAX + 1]; /* wire code; encode: "" sends tun_err_code(err) */
};

struct tun_msg_challenge {
    char nonce[TUN_NONCE_HEX_LEN + 1];
    uint32_t expires_in_s; /* 0 = absent (Osaurus relay) */
};

struct tun_msg_auth {
    char nonce[TUN_NONCE_HEX_LEN + 1];
    int64_t timestamp;                   /* Unix seconds, 0 .. 2^53-1 */
    char instance[TUN_INSTANCE_MAX + 1]; /* "" = absent (Osaurus clients) */
    uint32_t features;                   /* TUN_FEAT_* */
    size_t n_agents;                     /* 1 .. TUN_MAX_AGENTS */
    struct tun_msg_agent_auth agents[TUN_MAX_AGENTS];
};

struct tun_msg_auth_ok {
    size_t n_agents;
    struct tun_msg_agent_url agents[TUN_MAX_AGENTS];
    size_t n_rejected;
    struct tun_msg_rejected rejected[TUN_MAX_AGENTS];
    char region[TUN_REGION_MAX + 1];
    uint32_t ping_interval_s; /* native; 0 in Osaurus mode */
    uint32_t features;        /* Osaurus mode: TUN_FEAT_* the gateway accepts from this
                               * client ("features", PROTOCOL.md 9.2); the relay sends none */
};

/* auth_error and error. */
struct tun_msg_error {
    enum tun_err err;                  /* TUN_E_OTHER if the code is unknown */
    char code[TUN_CODE_MAX + 1];       /* wire code; encode: "" sends tun_err_code(err) */
    char message[TUN_MESSAGE_MAX + 1]; /* "" = absent; encode: "" sends tun_err_message(err) */
    bool has_addr;                     /* error only */
    uint8_t addr[ID_ADDR_LEN];
    char domain[TUN_DOMAIN_MAX + 1]; /* auth_error only: the domain the gateway verifies
                                      * signatures for; "" = absent */
};

struct tun_msg_add_agent {
    struct tun_msg_agent_auth agent;
    char nonce[TUN_NONCE_HEX_LEN + 1];
    int64_t timestamp;
};

struct tun_msg_agent_added {
    uint8_t addr[ID_ADDR_LEN];
    char url[TUN_URL_MAX + 1];
    char region[TUN_REGION_MAX + 1]; /* "" = absent (older relays) */
};

struct tun_msg_remove_agent {
    uint8_t addr[ID_ADDR_LEN];
};

struct tun_msg_agent_removed {
    uint8_t addr[ID_ADDR_LEN];
    enum tun_reason reason;
    char reason_str[TUN_CODE_MAX + 1]; /* decode: as sent; encode: ignored unless OTHER */
};

struct tun_msg_draining {
    uint32_t grace_s;
};

/* ping and pong (Osaurus). */
struct tun_msg_ping {
    bool has_ts;
    int64_t ts; /* Unix seconds, echoed by pong */
};

/* One header of an Osaurus request/response; bytes are not NUL-terminated. */
struct tun_msg_hdr {
    struct iov name;
    struct iov value;
};

/* The Osaurus data frames: request, response, stream_start, stream_chunk, stream_end,
 * cancel. After decode every iov points into memory owned by the tun_msg (freed by
 * tun_msg_clear()); for encode the caller points them at its own memory. */
struct tun_msg_http {
    char id[TUN_ID_MAX + 1];
    struct iov method;              /* request */
    struct iov path;                /* request: path + query */
    int status;                     /* response, stream_start: 200 .. 599 */
    const struct tun_msg_hdr *hdrs; /* request, response, stream_start */
    size_t n_hdrs;
    struct iov body; /* request, response: body; stream_chunk: data. Decoded bytes
                        (base64 already decoded, \u0000 as a NUL byte). */
    bool base64;     /* "bodyEncoding":"base64" on the wire */
};

/* A control message. Plain data except the two private pointers, which only
 * tun_msg_decode() sets and only tun_msg_clear() frees. */
struct tun_msg {
    enum tun_msg_type type;
    enum tun_mode mode; /* decode: the mode given; encode: selects mode-specific members */
    union {
        struct tun_msg_challenge challenge;         /* challenge */
        struct tun_msg_auth auth;                   /* auth */
        struct tun_msg_auth_ok auth_ok;             /* auth_ok */
        struct tun_msg_error error;                 /* auth_error, error */
        struct tun_msg_add_agent add_agent;         /* add_agent */
        struct tun_msg_agent_added agent_added;     /* agent_added */
        struct tun_msg_remove_agent remove_agent;   /* remove_agent */
        struct tun_msg_agent_removed agent_removed; /* agent_removed */
        struct tun_msg_draining draining;           /* draining */
        struct tun_msg_ping ping;                   /* ping, pong */
        struct tun_msg_http http;                   /* request .. cancel */
    };
    void *priv_tree;               /* cJSON tree the iovs point into */
    struct tun_msg_hdr *priv_hdrs; /* header array of http */
};

/* ---- error table ---- */

/* Wire code ("invalid_nonce"); "ok" for TUN_E_NONE, "internal_error" if out of range. */
const char *tun_err_code(enum tun_err e);

/* One-sentence English message for humans. */
const char *tun_err_message(enum tun_err e);

/* WebSocket close code that follows this error (4000, 4001, 4003, 4029, 1009, 1011,
 * 1012, 1001), or 0 if the error does not close the tunnel by itself. */
int tun_err_close_code(enum tun_err e);

/* The code for a wire string, or TUN_E_OTHER if unknown (TUN_E_NONE is never
 * returned). */
enum tun_err tun_err_from_code(const char *s, size_t len);

/* The code to send in mode for an error found while handling a message of type
 * in_reply_to (TUN_MSG_AUTH: an auth_error; TUN_MSG_ADD_AGENT: the error answering
 * it; anything else: an error frame). Native: e unchanged. Osaurus mode: the relay's
 * code (PROTOCOL.md 4.4, 7.2), or TUN_E_NONE when that mode sends nothing (the
 * message is dropped silently). Idempotent. */
enum tun_err tun_err_for_mode(enum tun_err e, enum tun_mode mode, enum tun_msg_type in_reply_to);

/* ---- messages ---- */

/* Wire name of a type ("auth_ok"), or NULL for TUN_MSG_NONE / out of range. */
const char *tun_msg_type_name(enum tun_msg_type t);

/* Zeroes m and sets its type and mode: the start of every message to encode. */
void tun_msg_init(struct tun_msg *m, enum tun_msg_type type, enum tun_mode mode);

/* Frees what tun_msg_decode() attached (the iovs of http become invalid) and zeroes
 * m. Takes NULL; safe on an initialised or decoded message, also after a failed
 * decode. */
void tun_msg_clear(struct tun_msg *m);

/* Decodes one text message received in mode. out need not be initialised; anything
 * it held is overwritten, not freed. Accepts the types of PROTOCOL.md 3.1 for mode,
 * in either direction.
 * Returns 0, or a negative enum tun_err; *err_code (if err_code is not NULL) is set to
 * NULL on success, else to the wire code, a static string:
 *   TUN_E_MESSAGE_TOO_LARGE   len above TUN_CTL_MAX_BYTES (Osaurus mode:
 *                             TUN_OSR_MAX_FRAME_BYTES); the caller closes with 1009
 *   TUN_E_INVALID_JSON        syntax, invalid UTF-8, raw control character in a string,
 *                             depth > TUN_MAX_DEPTH, trailing garbage, not an object,
 *                             duplicate member, missing or ill-typed member (any type
 *                             below without a more specific code)
 *   TUN_E_UNKNOWN_TYPE        "type" missing, not a string, or not a type of mode
 *   auth                      as tun_msg_decode_auth()
 *   add_agent                 TUN_E_INVALID_ADDRESS (Osaurus: TUN_E_INVALID_SIGNATURE),
 *                             TUN_E_INVALID_NONCE, TUN_E_SIGNATURE_VERIFICATION_FAILED
 *                             (Osaurus: TUN_E_INVALID_SIGNATURE) for bad shapes
 *   remove_agent              TUN_E_INVALID_ADDRESS
 *   challenge                 TUN_E_INVALID_NONCE
 *   response, stream_start, stream_chunk, stream_end
 *                             TUN_E_BAD_HOST_RESPONSE for every violation (status,
 *                             header count/name/value, body and chunk sizes, base64)
 *   out of memory             TUN_E_INTERNAL_ERROR
 * The code is already the one to send in mode; tun_err_for_mode() says whether to send
 * it at all. On failure out->type is the type read (TUN_MSG_NONE if none) and, for the
 * Osaurus data frames, out->http.id the id if it was readable ("" otherwise), so that a
 * waiting request can be failed; out needs no tun_msg_clear() after a failure, but it
 * is harmless. On success the caller must call tun_msg_clear(). */
int tun_msg_decode(const char *json, size_t len, enum tun_mode mode, struct tun_msg *out,
                   const char **err_code);

/* Decodes the first text message of a tunnel, which must be auth (PROTOCOL.md 4.4
 * steps 1-6), in at most TUN_CTL_MAX_BYTES in both modes (else TUN_E_MESSAGE_TOO_LARGE):
 * TUN_E_INVALID_JSON for a text that is not JSON at all (syntax, UTF-8, depth, trailing
 * garbage) or has a duplicate member; TUN_E_EXPECTED_AUTH_FRAME for anything else that
 * is not a well-formed auth (a non-object, another type, a missing or ill-typed
 * member, native instance/features/response_timeout of a bad shape);
 * TUN_E_NO_AGENTS, TUN_E_TOO_MANY_AGENTS (more than TUN_MAX_AGENTS);
 * TUN_E_INVALID_NONCE; TUN_E_INVALID_ADDRESS (Osaurus: TUN_E_EXPECTED_AUTH_FRAME);
 * TUN_E_SIGNATURE_VERIFICATION_FAILED for a signature not "0x" + 130 hex.
 * Osaurus mode ignores a malformed instance, features or response_timeout.
 * Otherwise as tun_msg_decode(). */
int tun_msg_decode_auth(const char *json, size_t len, enum tun_mode mode, struct tun_msg *out,
                        const char **err_code);

/* Encodes m as one JSON object ("type" first), NUL-terminated, in a malloc'd buffer the
 * caller frees; *len (if len is not NULL) gets its length without the NUL.
 * Strings are escaped; invalid UTF-8 in text becomes U+FFFD (as the relay's
 * TextDecoder), so the output is always valid JSON. Mode-specific members follow
 * m->mode (native auth_ok carries rejected and ping_interval; Osaurus auth_ok does not).
 * Osaurus bodies go out as base64 when m->http.base64 is set.
 * Returns NULL if out of memory, or if m is not encodable: unknown type, a count above
 * its bound, an auth without agents, an http frame with n_hdrs > 0 and hdrs NULL. */
char *tun_msg_encode(const struct tun_msg *m, size_t *len);

/* ---- signed texts (PROTOCOL.md 4.3) ---- */

/* "tunnel-gateway:v1:<domain>:<lowercase address>:<nonce>:<ts>" into buf (NUL-terminated).
 * domain is lowercased here and must be 1..253 bytes without ':' '/' or whitespace
 * (the caller strips the port); nonce must be 64 lowercase hex; ts >= 0.
 * Returns the length, or -1 on a bad argument or if buf is too small. */
int tun_msg_native_signed_text(char *buf, size_t len, const char *domain,
                               const uint8_t addr[ID_ADDR_LEN], const char *nonce, int64_t ts);

/* "osaurus-tunnel:<address as sent>:<nonce>:<ts>". addr_as_sent must be "0x" + 40 hex
 * (any case, not checked further); nonce 64 lowercase hex; ts >= 0.
 * Returns the length, or -1 on a bad argument or if buf is too small. */
int tun_msg_osaurus_signed_text(char *buf, size_t len, const char *addr_as_sent, const char *nonce,
                                int64_t ts);

/* A fresh nonce: 32 bytes from the CSPRNG as 64 lowercase hex + NUL. Returns 0 or -1. */
int tun_msg_nonce_new(char out[TUN_NONCE_HEX_LEN + 1]);

/* True if s is 64 lowercase hex digits (the only nonce form). */
bool tun_msg_nonce_is_valid(const char *s, size_t len);

/* True if s is a valid instance id: 8..64 of [A-Za-z0-9-]. */
bool tun_msg_instance_is_valid(const char *s, size_t len);

#endif
