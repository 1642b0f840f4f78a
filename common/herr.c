/* Public HTTP error table; see herr.h. */
#include "herr.h"

#include <event2/buffer.h>

#include "util.h"

struct herr_info {
    int status;
    const char *code;
    const char *message;
};

static const struct herr_info herr_table[HERR_COUNT_] = {
    [HERR_NONE] = {200, "none", "No error."},
    [HERR_BAD_REQUEST] = {400, "bad_request", "The request is not valid HTTP."},
    [HERR_INVALID_SUBDOMAIN] = {400, "invalid_subdomain",
                                "The host name is not an agent address under this domain."},
    [HERR_WEBSOCKET_REQUIRED] = {400, "websocket_required",
                                 "This endpoint only accepts WebSocket upgrades."},
    [HERR_UNSUPPORTED_PROTOCOL] = {400, "unsupported_protocol",
                                   "None of the offered tunnel subprotocols is supported."},
    [HERR_UNSUPPORTED_UPGRADE] = {501, "unsupported_upgrade",
                                  "Only WebSocket upgrades can be carried to an agent."},
    [HERR_NOT_FOUND] = {404, "not_found", "No such gateway endpoint."},
    [HERR_UNKNOWN_HOST] = {404, "unknown_host", "This gateway does not serve that host name."},
    [HERR_METHOD_NOT_ALLOWED] = {405, "method_not_allowed",
                                 "The method is not allowed on this endpoint."},
    [HERR_UNAUTHORIZED] = {401, "unauthorized",
                           "A valid Authorization: Bearer token is required."},
    [HERR_BODY_TOO_LARGE] = {413, "body_too_large", "The request body exceeds the gateway's limit."},
    [HERR_RATE_LIMITED] = {429, "rate_limited", "Too many requests; slow down."},
    [HERR_TOO_MANY_CONNECTIONS] = {429, "too_many_connections",
                                   "Too many connections from this address."},
    [HERR_HEADER_TOO_LARGE] = {431, "header_too_large",
                               "The request header exceeds the gateway's limit."},
    [HERR_AGENT_OFFLINE] = {502, "agent_offline", "No tunnel is connected for this agent."},
    [HERR_LOCAL_UNREACHABLE] = {502, "local_unreachable",
                                "The agent could not reach its local API."},
    [HERR_BAD_HOST_RESPONSE] = {502, "bad_host_response",
                                "The agent sent an invalid response."},
    [HERR_TUNNEL_CLOSED] = {502, "tunnel_closed",
                            "The tunnel closed before the response was complete."},
    [HERR_HOST_BUSY] = {503, "host_busy", "The agent has too many requests in flight."},
    [HERR_SHUTTING_DOWN] = {503, "relay_restarting", "The gateway is shutting down."},
    [HERR_GATEWAY_TIMEOUT] = {504, "gateway_timeout",
                              "The agent did not answer in time."},
    [HERR_REQUEST_TIMEOUT] = {408, "request_timeout",
                              "The request body stopped arriving."},
    [HERR_INTERNAL] = {500, "internal_error", "The gateway failed to handle the request."},
    [HERR_VERSION_NOT_SUPPORTED] = {505, "http_version_not_supported",
                                    "Only HTTP/1.0, HTTP/1.1 and HTTP/2 are served."},
    [HERR_GATEWAY_BUSY] = {503, "gateway_busy",
                           "The gateway is at a capacity limit; retry shortly."},
    [HERR_NODE_FORBIDDEN] = {403, "node_proof_invalid",
                             "A node-to-node request without a valid cluster proof."},
    [HERR_LOOP_DETECTED] = {508, "loop_detected",
                            "The request was already forwarded once between nodes."},
    [HERR_INVALID_REQUEST] = {400, "invalid_request",
                              "The relay's request frame could not be used."},
    [HERR_BINARY_BODY] = {502, "binary_body_unsupported",
                          "The local API answered with a body that is not UTF-8 text, which "
                          "this relay cannot carry."},
};

static const struct herr_info *info(enum herr e)
{
    return (unsigned)e < HERR_COUNT_ && e != HERR_NONE ? &herr_table[e] : &herr_table[HERR_INTERNAL];
}

int herr_status(enum herr e)
{
    return info(e)->status;
}

const char *herr_code(enum herr e)
{
    return info(e)->code;
}

const char *herr_message(enum herr e)
{
    return info(e)->message;
}

int herr_json(enum herr e, char *buf, size_t size)
{
    return util_snprintf(buf, size, "{\"error\":\"%s\",\"message\":\"%s\"}\n", info(e)->code,
                         info(e)->message);
}

const char *herr_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 422: return "Unprocessable Content";
    case 426: return "Upgrade Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Status";
    }
}

int herr_write_h1(struct evbuffer *out, enum herr e, bool head_only, bool close)
{
    char body[256];
    int blen = herr_json(e, body, sizeof(body));
    int status = herr_status(e);

    if (blen < 0)
        return -1;
    if (evbuffer_add_printf(out,
                            "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                            "content-length: %d\r\ncache-control: no-store\r\n%s\r\n",
                            status, herr_reason(status), blen,
                            close ? "connection: close\r\n" : "") < 0)
        return -1;
    if (!head_only && evbuffer_add(out, body, (size_t)blen) != 0)
        return -1;
    return 0;
}
