/* The JSON errors a public HTTP client can receive, from the gateway or from
 * the agent: one enum, one table to status, wire code and human message.
 * docs/ERRORS.md lists the same codes; a new one is added there first. */
#ifndef HERR_H
#define HERR_H

#include <stdbool.h>
#include <stddef.h>

struct evbuffer;

enum herr {
    HERR_NONE = 0, /* no error */
    HERR_BAD_REQUEST,
    HERR_INVALID_SUBDOMAIN,
    HERR_WEBSOCKET_REQUIRED,
    HERR_UNSUPPORTED_PROTOCOL,
    HERR_UNSUPPORTED_UPGRADE,
    HERR_NOT_FOUND,
    HERR_UNKNOWN_HOST,
    HERR_METHOD_NOT_ALLOWED,
    HERR_UNAUTHORIZED,
    HERR_BODY_TOO_LARGE,
    HERR_RATE_LIMITED,
    HERR_TOO_MANY_CONNECTIONS,
    HERR_HEADER_TOO_LARGE,
    HERR_AGENT_OFFLINE,
    HERR_LOCAL_UNREACHABLE,
    HERR_BAD_HOST_RESPONSE,
    HERR_TUNNEL_CLOSED,
    HERR_HOST_BUSY,
    HERR_SHUTTING_DOWN,
    HERR_GATEWAY_TIMEOUT,
    HERR_REQUEST_TIMEOUT,
    HERR_INTERNAL,
    HERR_VERSION_NOT_SUPPORTED,
    HERR_GATEWAY_BUSY,
    HERR_NODE_FORBIDDEN,
    HERR_LOOP_DETECTED,
    HERR_INVALID_REQUEST,   /* tunnel-agent, Osaurus mode: unusable request frame */
    HERR_BINARY_BODY,       /* tunnel-agent, Osaurus mode: a body the relay cannot carry */
    HERR_COUNT_ /* number of entries, not a code */
};

int herr_status(enum herr e);
const char *herr_code(enum herr e);
const char *herr_message(enum herr e);

/* Writes {"error":"<code>","message":"<message>"}\n into buf.
 * Returns the length, or -1 if buf is too small. */
int herr_json(enum herr e, char *buf, size_t size);

/* The reason phrase of an HTTP status ("Status" for one it does not know). */
const char *herr_reason(int status);

/* Appends a whole HTTP/1.1 error response for e to out: status line,
 * content-type application/json, content-length, cache-control no-store,
 * "connection: close" when close is set, and the JSON body unless head_only
 * (a HEAD request). The one writer of HTTP/1.1 errors (listener, front end,
 * agent). Returns 0 or -1 (out of memory). */
int herr_write_h1(struct evbuffer *out, enum herr e, bool head_only, bool close);

#endif
