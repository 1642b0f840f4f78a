/* Dialling the gateway through an HTTP proxy (HTTPS_PROXY, HTTP_PROXY,
 * ALL_PROXY and NO_PROXY, as curl reads them): a TCP connection to the proxy,
 * then `CONNECT host:port HTTP/1.1` and its 2xx answer; what follows is the
 * caller's (TLS and the WebSocket for the tunnel, the probe's request). Both
 * tunnel protocols and the probe dial through here; the local API never does.
 * Without a proxy it is ag_net_dial_start() itself. */
#ifndef AG_PXY_H
#define AG_PXY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ag_net.h"
#include "ag_store.h"

/* A proxy chosen for the gateway at start. */
struct ag_proxy {
    bool set;                    /* false: dial directly */
    char host[AG_HOST_MAX + 1];  /* name or IP, IPv6 without brackets */
    uint16_t port;               /* explicit, or 1080 (curl's default) */
    char auth[400];              /* "Basic <base64 user:password>", "" = none */
    char shown[AG_HOST_MAX + 40]; /* http://[user@]host:port, for logs (no password) */
    char var[16];                /* the variable it came from ("HTTPS_PROXY") */
};

/* Looks up the proxy for gw in the environment: wss:// takes https_proxy or
 * HTTPS_PROXY, ws:// http_proxy or HTTP_PROXY (the lowercase one first), then
 * all_proxy / ALL_PROXY; no_proxy / NO_PROXY (comma-separated names, domain
 * suffixes with or without a leading dot, IP literals, or "*") exempts the
 * gateway's host. Values: [http://][user[:password]@]host[:port][/], user and
 * password percent-decoded. Returns 0 (out->set false when none applies), or
 * -1 with a message in err for a value it cannot use (another scheme, a bad
 * port, a host that does not parse). getenv_fn is getenv, or a test's. */
int ag_pxy_from_env(const struct ag_gateway *gw, const char *(*getenv_fn)(const char *),
                    struct ag_proxy *out, char *err, size_t errlen);

/* True if host is exempted by a NO_PROXY list. */
bool ag_pxy_no_proxy(const char *list, const char *host);

struct ag_pxy_dial;

/* Dials host:port, through px when px->set: the callback gets a connected
 * socket positioned after the proxy's answer (or fd < 0 and why: "proxy
 * http://p:3128: HTTP 407 Proxy Authentication Required", ...). Same rules as
 * ag_net_dial_start(): from the loop, never inside this call; timeout_ms bounds
 * the whole exchange. px is borrowed until the callback. NULL if out of memory. */
struct ag_pxy_dial *ag_pxy_dial_start(struct event_base *base, struct evdns_base *dns,
                                      const struct ag_proxy *px, const char *host, uint16_t port,
                                      uint64_t timeout_ms, ag_net_dial_cb cb, void *arg);

/* Abandons a dial: no callback follows. Takes NULL. */
void ag_pxy_dial_cancel(struct ag_pxy_dial *d);

#endif
