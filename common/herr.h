/* The JSON errors a public HTTP client can receive, from the gateway or from
 * the agent: one enum, one table to status, wire code and human message.
 * docs/ERRORS.md lists the same codes; a new one is added there first. */
#ifndef HERR_H
#define HERR_H

#include <stddef.h>

enum herr {
    HERR_BAD_REQUEST = 0,
    HERR_INVALID_SUBDOMAIN,
    HERR_WEBSOCKET_REQUIRED,
    HERR_UNSUPPORTED_PROTOCOL,
    HERR_NOT_FOUND,
    HERR_UNKNOWN_HOST,
    HERR_METHOD_NOT_ALLOWED,
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
    HERR_COUNT_ /* not an error */
};

int herr_status(enum herr e);
const char *herr_code(enum herr e);
const char *herr_message(enum herr e);

/* Writes {"error":"<code>","message":"<message>"}\n into buf.
 * Returns the length, or -1 if buf is too small. */
int herr_json(enum herr e, char *buf, size_t size);

#endif
