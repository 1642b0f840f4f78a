/* PROXY protocol v2 header parser; see gw_pp.h. */
#include "gw_pp.h"

#include <netinet/in.h>
#include <string.h>

static const uint8_t pp_sig[12] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                   0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a};

#define PP_VERSION 0x20
#define PP_CMD_LOCAL 0x00
#define PP_CMD_PROXY 0x01
#define PP_TCP4 0x11
#define PP_TCP6 0x21
#define PP_UNIX_STREAM 0x31
#define PP_UNSPEC 0x00
#define PP_TCP4_LEN 12   /* src, dst addresses (4 each), ports (2 each) */
#define PP_TCP6_LEN 36
#define PP_UNIX_LEN 216

static int fail(const char **why, const char *what)
{
    *why = what;
    return -1;
}

/* The TLVs after the address block must tile the rest exactly (type, a
 * 16-bit length, the value); their contents are not used. */
static int tlvs_ok(const uint8_t *p, size_t n)
{
    while (n > 0) {
        size_t len;

        if (n < 3)
            return 0;
        len = (size_t)p[1] << 8 | p[2];
        if (len > n - 3)
            return 0;
        p += 3 + len;
        n -= 3 + len;
    }
    return 1;
}

int gw_pp_parse(const uint8_t *p, size_t n, size_t *want, struct gw_pp_hdr *out,
                const char **why)
{
    size_t len, total, need = 0;
    uint8_t cmd, fam;

    memset(out, 0, sizeof(*out));
    *why = NULL;
    if (n > 0 && memcmp(p, pp_sig, n < sizeof(pp_sig) ? n : sizeof(pp_sig)) != 0)
        return fail(why, n > 0 && p[0] == 'P' ? "proxy_v1_not_accepted" : "no_proxy_header");
    if (n > 12 && (p[12] & 0xf0) != PP_VERSION)
        return fail(why, "bad_version");
    cmd = n > 12 ? p[12] & 0x0f : 0;
    if (n > 12 && cmd != PP_CMD_LOCAL && cmd != PP_CMD_PROXY)
        return fail(why, "bad_command");
    fam = n > 13 ? p[13] : 0;
    if (n > 13 && cmd == PP_CMD_PROXY) {
        switch (fam) {
        case PP_TCP4: need = PP_TCP4_LEN; break;
        case PP_TCP6: need = PP_TCP6_LEN; break;
        case PP_UNIX_STREAM: need = PP_UNIX_LEN; break;
        case PP_UNSPEC: need = 0; break;
        default: return fail(why, "unsupported_family");
        }
    }
    if (n < GW_PP_HEAD) {
        *want = GW_PP_HEAD;
        return 0;
    }
    len = (size_t)p[14] << 8 | p[15];
    total = GW_PP_HEAD + len;
    if (total > GW_PP_MAX)
        return fail(why, "header_too_long");
    if (len < need)
        return fail(why, "short_address_block");
    *want = total;
    if (n < total)
        return 0;
    if (n > total)
        return fail(why, "bytes_past_header"); /* the caller reads no further */
    if (cmd == PP_CMD_LOCAL)
        return 1; /* the block, whatever it holds, is ignored */
    if (!tlvs_ok(p + GW_PP_HEAD + need, len - need))
        return fail(why, "bad_tlv");
    if (fam == PP_TCP4) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&out->src;

        sin->sin_family = AF_INET;
        memcpy(&sin->sin_addr, p + GW_PP_HEAD, 4);
        memcpy(&sin->sin_port, p + GW_PP_HEAD + 8, 2);
        out->srclen = sizeof(*sin);
    } else if (fam == PP_TCP6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&out->src;

        sin6->sin6_family = AF_INET6;
        memcpy(&sin6->sin6_addr, p + GW_PP_HEAD, 16);
        memcpy(&sin6->sin6_port, p + GW_PP_HEAD + 32, 2);
        out->srclen = sizeof(*sin6);
    }
    return 1;
}
