/* The PROXY protocol, version 2 (HAProxy's proxy-protocol.txt, section 2.2):
 * the binary header a load balancer sends before a connection's first byte,
 * naming the client it accepted the connection from. Only the parser lives
 * here; gw_lsn reads the header off a --proxy-protocol listener's sockets.
 *
 * Version 1 (the text form "PROXY TCP4 ...") is not accepted: a listener
 * configured for the header expects HAProxy's send-proxy-v2 (or an
 * equivalent) and refuses anything else. */
#ifndef GW_PP_H
#define GW_PP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define GW_PP_HEAD 16   /* signature, version and command, family, length */
/* The longest header accepted: the address block (216 bytes at most, for
 * AF_UNIX) and TLVs such as ALPN, authority, a unique id or TLS details. A
 * longer one is refused rather than buffered. */
#define GW_PP_MAX 4096

struct gw_pp_hdr {
    /* The client's address and port: AF_INET or AF_INET6. srclen 0: the
     * header names none (command LOCAL, as a balancer's own health check
     * sends, or family UNSPEC or AF_UNIX): use the connection's own peer. */
    struct sockaddr_storage src;
    socklen_t srclen;
};

/* Looks at the first n bytes a connection sent. Returns:
 *  1  a whole valid header is in p[0..*want) (*want == n, its length; the
 *     connection's own bytes start after it), *out filled;
 *  0  valid so far; *want (> n) is how many bytes in all are needed to know
 *     more: read at most *want - n more (never past the header);
 * -1  not a valid header (*why says what is wrong).
 * Never looks past p[n - 1]; any prefix of a valid header gives 0. */
int gw_pp_parse(const uint8_t *p, size_t n, size_t *want, struct gw_pp_hdr *out,
                const char **why);

#endif
