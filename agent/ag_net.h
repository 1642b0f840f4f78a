/* Outgoing TCP connections for the daemon: resolve a host name without
 * blocking (evdns, /etc/hosts included), then try each address in turn until
 * one connects ("localhost" may give ::1 first while the server listens on
 * 127.0.0.1 only). Used for the tunnel, the probes and the local API. */
#ifndef AG_NET_H
#define AG_NET_H

#include <stdint.h>

#include <event2/util.h>

struct event_base;
struct evdns_base;

/* A dial in progress; owned by the caller until its callback ran. */
struct ag_net_dial;

/* Result: fd >= 0 is a connected, non-blocking socket with TCP_NODELAY that
 * the callback now owns; fd < 0 means failure and err says why. Always
 * called from the event loop, never inside ag_net_dial_start(); the dial is
 * freed right after the callback returns. */
typedef void (*ag_net_dial_cb)(void *arg, evutil_socket_t fd, const char *err);

/* Starts resolving and connecting to host:port (name, IPv4 or IPv6 literal
 * without brackets). timeout_ms bounds the whole dial. Returns NULL if out of
 * memory (no callback follows). */
struct ag_net_dial *ag_net_dial_start(struct event_base *base, struct evdns_base *dns,
                                      const char *host, uint16_t port, uint64_t timeout_ms,
                                      ag_net_dial_cb cb, void *arg);

/* Abandons a dial: no callback follows. Takes NULL. */
void ag_net_dial_cancel(struct ag_net_dial *d);

#endif
