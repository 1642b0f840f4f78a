/* Listening sockets: accept, optional TLS handshake, then hand the
 * connection to the HTTP/1.1 or HTTP/2 front end by ALPN (TLS) or by the
 * client's first bytes (cleartext: HTTP/2 prior knowledge). */
#ifndef GW_LSN_H
#define GW_LSN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct gw_ctx;
struct gw_cfg_addr;
struct gw_lsn;

/* Binds addr; tls selects TLS (ctx->tls must exist). Returns NULL with a
 * message in err. */
struct gw_lsn *gw_lsn_new(struct gw_ctx *ctx, const struct gw_cfg_addr *addr, bool tls,
                          char *err, size_t errlen);

/* --node-listen: cleartext HTTP/2 from other nodes (no PROXY header, no
 * HTTP/1.1); its requests must carry a valid cluster proof (gw_node). */
struct gw_lsn *gw_lsn_new_node(struct gw_ctx *ctx, const struct gw_cfg_addr *addr, char *err,
                               size_t errlen);

/* The bound port (useful with port 0). */
uint16_t gw_lsn_port(const struct gw_lsn *l);

/* Stops accepting for good (the end of a drain): the listening socket is
 * closed, so connects are refused; live connections stay. The object stays
 * until gw_lsn_free (accepted connections point at it). Takes NULL. */
void gw_lsn_disable(struct gw_lsn *l);

void gw_lsn_free(struct gw_lsn *l);

#endif
