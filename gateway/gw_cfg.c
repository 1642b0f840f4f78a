/* tunnel-gateway configuration: the option table (names, defaults and help
 * are the command-line contract of PRODUCT.md), parsers for the gateway's own
 * value types (listen addresses, CIDR lists, URLs), checks that span options,
 * and the address predicates the listener uses. common/cfg does the loading. */
#include "gw_cfg.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "cfg.h"
#include "tun_msg.h"
#include "util.h"

/* The engine stores enum options as int. */
static_assert(sizeof(enum log_level) == sizeof(int), "enum log_level is not int-sized");
static_assert(sizeof(enum log_format) == sizeof(int), "enum log_format is not int-sized");

/* "0x" + 40 hex + "." is prepended to the domain; names stay within 253. */
#define GW_CFG_ADDR_LABEL_LEN 43
#define GW_CFG_DOMAIN_MAX (253 - GW_CFG_ADDR_LABEL_LEN)
#define GW_CFG_REDIS_PORT 6379
#define GW_CFG_LISTEN_HOST "127.0.0.1"
#define GW_CFG_LISTEN_PORT 8443

static void set_why(char *why, size_t whylen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_why(char *why, size_t whylen, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
}

static char *dup_n(const char *s, size_t len)
{
    char *d = malloc(len + 1);

    if (d == NULL)
        return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

static char lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

static int parse_port(const char *s, size_t len, uint16_t *out)
{
    uint64_t v;

    if (util_parse_u64(s, len, &v) != 0 || v > 65535)
        return -1;
    *out = (uint16_t)v;
    return 0;
}

/* A DNS name that can carry "<address>." in front: LDH labels of 1..63
 * characters, no leading or trailing '-', a last label that is not all digits
 * (so not an IPv4 address), at most GW_CFG_DOMAIN_MAX in all. Lowercases out
 * (len + 1 bytes). */
static int hostname_check(const char *s, size_t len, char *out, char *why, size_t whylen)
{
    size_t label = 0;
    bool all_digits = true;

    if (len == 0) {
        set_why(why, whylen, "is empty");
        return -1;
    }
    if (len > GW_CFG_DOMAIN_MAX) {
        set_why(why, whylen, "is longer than %d characters (agent names must stay within 253)",
                GW_CFG_DOMAIN_MAX);
        return -1;
    }
    for (size_t i = 0; i <= len; i++) {
        char c = i < len ? lower(s[i]) : '.';
        if (c == '.') {
            if (label == 0 || label > 63 || out[i - 1] == '-' || out[i - label] == '-') {
                set_why(why, whylen, "is not a valid host name (labels of 1-63 letters, "
                        "digits or '-', not starting or ending with '-')");
                return -1;
            }
            if (i == len && all_digits) {
                set_why(why, whylen, "is not a host name (it ends in a number)");
                return -1;
            }
            label = 0;
            all_digits = true;
            if (i < len)
                out[i] = '.';
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) {
            set_why(why, whylen, "is not a valid host name (only letters, digits, '-' and '.')");
            return -1;
        }
        if (c < '0' || c > '9')
            all_digits = false;
        out[i] = c;
        label++;
    }
    out[len] = '\0';
    return 0;
}

/* --- strings ----------------------------------------------------------- */

static void release_str(void *field)
{
    char **p = field;

    free(*p);
    *p = NULL;
}

static int parse_domain(const struct cfg_opt *opt, const char *value, void *field, char *why,
                        size_t whylen)
{
    char **p = field;
    size_t len = strlen(value);
    char *d = malloc(len + 1);

    if (d == NULL) {
        set_why(why, whylen, "could not be stored: out of memory");
        return -1;
    }
    if (hostname_check(value, len, d, why, whylen) != 0) {
        free(d);
        return -1;
    }
    free(*p);
    *p = d;
    return 0;
}

/* --- listen addresses -------------------------------------------------- */

static void release_addr(void *field)
{
    struct gw_cfg_addr *a = field;

    free(a->text);
    free(a->host);
    memset(a, 0, sizeof(*a));
}

/* Resolves host (no brackets) numerically and replaces *a on success. */
static int addr_set(struct gw_cfg_addr *a, const char *host, size_t hostlen, uint16_t port,
                    char *why, size_t whylen)
{
    struct addrinfo hints = {0};
    struct addrinfo *res = NULL;
    char *h;
    char *text;
    bool v6 = memchr(host, ':', hostlen) != NULL;
    int rc;

    if (hostlen == 0) {
        set_why(why, whylen, "has no address (ADDR:PORT, e.g. 127.0.0.1:8443 or [::1]:8443)");
        return -1;
    }
    h = dup_n(host, hostlen);
    if (h == NULL) {
        set_why(why, whylen, "could not be stored: out of memory");
        return -1;
    }
    for (size_t i = 0; i < hostlen && h[i] != '%'; i++)
        h[i] = lower(h[i]);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_PASSIVE;
    rc = getaddrinfo(strcmp(h, "localhost") == 0 ? GW_CFG_LISTEN_HOST : h, NULL, &hints, &res);
    if (rc != 0 || res == NULL || res->ai_addrlen > sizeof(a->ss) ||
        (res->ai_family != AF_INET && res->ai_family != AF_INET6)) {
        if (res != NULL)
            freeaddrinfo(res);
        free(h);
        set_why(why, whylen, "has an address that is not numeric (use an IPv4 address, "
                "[IPv6] or localhost)");
        return -1;
    }
    text = malloc(hostlen + 10);
    if (text == NULL) {
        freeaddrinfo(res);
        free(h);
        set_why(why, whylen, "could not be stored: out of memory");
        return -1;
    }
    snprintf(text, hostlen + 10, v6 ? "[%s]:%u" : "%s:%u", h, (unsigned)port);
    free(a->text);
    free(a->host);
    a->text = text;
    a->host = h;
    a->port = port;
    memset(&a->ss, 0, sizeof(a->ss));
    memcpy(&a->ss, res->ai_addr, res->ai_addrlen);
    a->sslen = (socklen_t)res->ai_addrlen;
    if (res->ai_family == AF_INET)
        ((struct sockaddr_in *)&a->ss)->sin_port = htons(port);
    else
        ((struct sockaddr_in6 *)&a->ss)->sin6_port = htons(port);
    freeaddrinfo(res);
    return 0;
}

/* "ADDR:PORT" or "[V6]:PORT"; "" unsets (for the optional --plain-listen). */
static int parse_listen(const struct cfg_opt *opt, const char *value, void *field, char *why,
                        size_t whylen)
{
    struct gw_cfg_addr *a = field;
    const char *host = value;
    size_t hostlen;
    const char *colon;
    uint16_t port;

    if (value[0] == '\0') {
        release_addr(a);
        return 0;
    }
    if (value[0] == '[') {
        const char *rb = strchr(value, ']');
        if (rb == NULL || rb[1] != ':') {
            set_why(why, whylen, "is not [IPv6]:PORT (e.g. [::1]:8443)");
            return -1;
        }
        host = value + 1;
        hostlen = (size_t)(rb - host);
        colon = rb + 1;
    } else {
        colon = strrchr(value, ':');
        if (colon == NULL) {
            set_why(why, whylen, "is not ADDR:PORT (e.g. 127.0.0.1:8443 or [::1]:8443)");
            return -1;
        }
        if (memchr(value, ':', (size_t)(colon - value)) != NULL) {
            set_why(why, whylen, "has an IPv6 address without brackets (write [::1]:8443)");
            return -1;
        }
        hostlen = (size_t)(colon - value);
    }
    if (parse_port(colon + 1, strlen(colon + 1), &port) != 0) {
        set_why(why, whylen, "has a port that is not a number from 0 to 65535");
        return -1;
    }
    return addr_set(a, host, hostlen, port, why, whylen);
}

/* 0.0.0.0 or :: (bound to every address: not one a peer can dial). */
static bool addr_is_any(const struct gw_cfg_addr *a)
{
    if (a->ss.ss_family == AF_INET)
        return ((const struct sockaddr_in *)&a->ss)->sin_addr.s_addr == htonl(INADDR_ANY);
    if (a->ss.ss_family == AF_INET6)
        return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)&a->ss)->sin6_addr);
    return false;
}

/* --node-advertise: a numeric ADDR:PORT (as --listen spells it) with a
 * port, not a wildcard: what the other nodes dial. Stored normalised. */
static int parse_advertise(const struct cfg_opt *opt, const char *value, void *field, char *why,
                           size_t whylen)
{
    char **p = field;
    struct gw_cfg_addr a = {0};
    char *t;

    if (value[0] == '\0') {
        release_str(p);
        return 0;
    }
    if (parse_listen(opt, value, &a, why, whylen) != 0)
        return -1;
    if (a.port == 0 || addr_is_any(&a)) {
        set_why(why, whylen, a.port == 0 ? "needs a port other nodes can dial (not 0)"
                                         : "is a wildcard address; give one other nodes can dial");
        release_addr(&a);
        return -1;
    }
    t = a.text;
    a.text = NULL;
    release_addr(&a);
    free(*p);
    *p = t;
    return 0;
}

/* PORT / port: replaces the port of --listen. */
static int parse_listen_port(const struct cfg_opt *opt, const char *value, void *field, char *why,
                             size_t whylen)
{
    struct gw_cfg_addr *a = field;
    const char *host = a->host != NULL ? a->host : GW_CFG_LISTEN_HOST;
    uint16_t port;

    if (parse_port(value, strlen(value), &port) != 0) {
        set_why(why, whylen, "is not a port number from 0 to 65535");
        return -1;
    }
    return addr_set(a, host, strlen(host), port, why, whylen);
}

/* HOST / host: replaces the address of --listen ("[::]" or "::" alike). */
static int parse_listen_host(const struct cfg_opt *opt, const char *value, void *field, char *why,
                             size_t whylen)
{
    struct gw_cfg_addr *a = field;
    size_t len = strlen(value);
    uint16_t port = a->text != NULL ? a->port : GW_CFG_LISTEN_PORT;

    if (len >= 2 && value[0] == '[' && value[len - 1] == ']') {
        value++;
        len -= 2;
    }
    return addr_set(a, value, len, port, why, whylen);
}

/* --- trusted proxies --------------------------------------------------- */

static void release_cidrs(void *field)
{
    struct gw_cidr_list *l = field;

    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* One "ADDR[/PREFIX]" entry (no spaces). A bare address is a single host. */
static int parse_cidr(const char *s, size_t len, struct gw_cidr *c, char *why, size_t whylen)
{
    char buf[INET6_ADDRSTRLEN + 8];
    const char *slash = memchr(s, '/', len);
    size_t alen = slash != NULL ? (size_t)(slash - s) : len;
    unsigned max;
    uint64_t prefix;

    if (alen >= sizeof(buf)) {
        set_why(why, whylen, "is not an IPv4 or IPv6 address");
        return -1;
    }
    memcpy(buf, s, alen);
    buf[alen] = '\0';
    memset(c, 0, sizeof(*c));
    if (inet_pton(AF_INET, buf, c->addr) == 1) {
        c->family = AF_INET;
        max = 32;
    } else if (inet_pton(AF_INET6, buf, c->addr) == 1) {
        c->family = AF_INET6;
        max = 128;
    } else {
        set_why(why, whylen, "is not an IPv4 or IPv6 address");
        return -1;
    }
    prefix = max;
    if (slash != NULL && util_parse_u64(slash + 1, len - alen - 1, &prefix) != 0) {
        set_why(why, whylen, "has a prefix length that is not a whole number");
        return -1;
    }
    if (prefix > max) {
        set_why(why, whylen, "has a prefix length above %u", max);
        return -1;
    }
    c->prefix = (unsigned)prefix;
    for (unsigned bit = c->prefix; bit < max; bit++) {
        if (c->addr[bit / 8] & (0x80u >> (bit % 8))) {
            set_why(why, whylen, "has bits set after the /%u prefix", c->prefix);
            return -1;
        }
    }
    return 0;
}

/* "CIDR[,CIDR...]", spaces around entries allowed; "" means none. */
static int parse_trust_proxy(const struct cfg_opt *opt, const char *value, void *field, char *why,
                             size_t whylen)
{
    struct gw_cidr_list *l = field;
    struct gw_cidr *v = NULL;
    size_t count = 1;
    size_t n = 0;
    const char *p = value;

    for (const char *q = value; *q != '\0'; q++)
        count += *q == ',';
    if (strspn(value, " \t") == strlen(value)) {
        release_cidrs(l);
        return 0;
    }
    v = calloc(count, sizeof(*v));
    if (v == NULL) {
        set_why(why, whylen, "could not be stored: out of memory");
        return -1;
    }
    for (;;) {
        const char *comma = strchr(p, ',');
        const char *e = comma != NULL ? comma : p + strlen(p);
        char inner[256];
        while (p < e && (*p == ' ' || *p == '\t'))
            p++;
        while (e > p && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        if (p == e) {
            set_why(why, whylen, "has an empty entry (CIDR[,CIDR...])");
            goto fail;
        }
        if (parse_cidr(p, (size_t)(e - p), &v[n], inner, sizeof(inner)) != 0) {
            set_why(why, whylen, "has a bad entry \"%.*s\": it %s",
                    (int)((size_t)(e - p) > 64 ? 64 : (size_t)(e - p)), p, inner);
            goto fail;
        }
        n++;
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    release_cidrs(l);
    l->v = v;
    l->n = n;
    return 0;

fail:
    free(v);
    return -1;
}

static bool cidr_match(const struct gw_cidr *c, const uint8_t *addr)
{
    unsigned full = c->prefix / 8;
    unsigned rest = c->prefix % 8;

    if (memcmp(c->addr, addr, full) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xffu << (8 - rest));
    return (c->addr[full] & mask) == (addr[full] & mask);
}

static bool is_v4_mapped(const struct in6_addr *a)
{
    static const uint8_t pfx[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

    return memcmp(a->s6_addr, pfx, sizeof(pfx)) == 0;
}

bool gw_cfg_addr_trusted(const struct gw_cfg *cfg, const struct sockaddr *sa)
{
    const uint8_t *v4 = NULL;
    const uint8_t *v6 = NULL;

    if (sa == NULL)
        return false;
    if (sa->sa_family == AF_INET) {
        v4 = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr;
    } else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        v6 = a6->s6_addr;
        if (is_v4_mapped(a6))
            v4 = a6->s6_addr + 12;
    } else {
        return false;
    }
    for (size_t i = 0; i < cfg->trust_proxy.n; i++) {
        const struct gw_cidr *c = &cfg->trust_proxy.v[i];
        if (c->family == AF_INET && v4 != NULL && cidr_match(c, v4))
            return true;
        if (c->family == AF_INET6 && v6 != NULL && cidr_match(c, v6))
            return true;
    }
    return false;
}

bool gw_cfg_addr_is_loopback(const struct sockaddr *sa)
{
    if (sa == NULL)
        return false;
    if (sa->sa_family == AF_INET)
        return ((const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr)[0] == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a6))
            return true;
        return is_v4_mapped(a6) && a6->s6_addr[12] == 127;
    }
    return false;
}

/* --- URLs -------------------------------------------------------------- */

static void release_url(void *field)
{
    struct gw_cfg_url *u = field;

    free(u->text);
    free(u->host);
    memset(u, 0, sizeof(*u));
}

static bool has_prefix_ci(const char *s, const char *prefix)
{
    size_t n = strlen(prefix);

    return strlen(s) >= n && util_iov_ieq_str((struct iov){s, n}, prefix);
}

/* https://DOMAIN[:PORT] or http://DOMAIN[:PORT], an optional final '/'. */
static int parse_url(const struct cfg_opt *opt, const char *value, void *field, char *why,
                     size_t whylen)
{
    struct gw_cfg_url *u = field;
    struct gw_cfg_url nu = {0};
    const char *h;
    size_t hlen;
    const char *end;

    if (value[0] == '\0') {
        release_url(u);
        return 0;
    }
    if (has_prefix_ci(value, "https://")) {
        nu.https = true;
        h = value + 8;
    } else if (has_prefix_ci(value, "http://")) {
        h = value + 7;
    } else {
        set_why(why, whylen, "must start with https:// or http://");
        return -1;
    }
    hlen = strcspn(h, ":/?#@");
    end = h + hlen;
    if (*end == ':') {
        size_t plen = strcspn(end + 1, "/?#");
        if (parse_port(end + 1, plen, &nu.port) != 0 || nu.port == 0) {
            set_why(why, whylen, "has a port that is not a number from 1 to 65535");
            return -1;
        }
        end += 1 + plen;
    }
    if (*end == '/')
        end++;
    if (*end != '\0') {
        set_why(why, whylen, "must be only a scheme, host and port "
                "(https://DOMAIN[:PORT]; no user, path, query or fragment)");
        return -1;
    }
    nu.host = malloc(hlen + 1);
    if (nu.host == NULL) {
        set_why(why, whylen, "could not be stored: out of memory");
        return -1;
    }
    if (hostname_check(h, hlen, nu.host, why, whylen) != 0) {
        char inner[200];
        snprintf(inner, sizeof(inner), "%s", why);
        set_why(why, whylen, "has a host that %s", inner);
        free(nu.host);
        return -1;
    }
    size_t tlen = strlen(value);
    if (value[tlen - 1] == '/')
        tlen--;
    nu.text = dup_n(value, tlen);
    if (nu.text == NULL) {
        free(nu.host);
        set_why(why, whylen, "could not be stored: out of memory");
        return -1;
    }
    release_url(u);
    *u = nu;
    return 0;
}

static void release_redis(void *field)
{
    struct gw_cfg_redis *r = field;

    free(r->text);
    free(r->host);
    if (r->password != NULL) {
        OPENSSL_cleanse(r->password, strlen(r->password));
        free(r->password);
    }
    memset(r, 0, sizeof(*r));
}

/* redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], HOST a name, IPv4 or [IPv6];
 * the user name, if any, is ignored (Redis before 6 has none; ACL users are
 * not supported). */
static int parse_redis(const struct cfg_opt *opt, const char *value, void *field, char *why,
                       size_t whylen)
{
    static const char host_chars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                     "0123456789.-_";
    struct gw_cfg_redis *r = field;
    struct gw_cfg_redis nr = {0};
    const char *h;
    size_t hlen;
    const char *p;

    if (value[0] == '\0') {
        release_redis(r);
        return 0;
    }
    if (has_prefix_ci(value, "rediss://")) {
        set_why(why, whylen, "uses TLS (rediss://), which is not supported");
        return -1;
    }
    if (!has_prefix_ci(value, "redis://")) {
        set_why(why, whylen, "must start with redis:// (redis://HOST[:PORT][/DB])");
        return -1;
    }
    h = value + 8;
    {
        const char *at = strrchr(h, '@');
        if (at != NULL) {
            const char *colon = memchr(h, ':', (size_t)(at - h));
            if (colon == NULL || at == colon + 1) {
                set_why(why, whylen, "has credentials without a password "
                        "(redis://:PASSWORD@HOST[:PORT][/DB])");
                return -1;
            }
            nr.password = dup_n(colon + 1, (size_t)(at - colon - 1));
            if (nr.password == NULL) {
                set_why(why, whylen, "could not be stored: out of memory");
                return -1;
            }
            h = at + 1;
        }
    }
    if (*h == '[') {
        const char *rb = strchr(h, ']');
        if (rb == NULL) {
            release_redis(&nr);
            set_why(why, whylen, "has an unclosed [ in the host");
            return -1;
        }
        h++;
        hlen = (size_t)(rb - h);
        p = rb + 1;
        char tmp[INET6_ADDRSTRLEN];
        struct in6_addr a6;
        bool ok = hlen < sizeof(tmp);
        if (ok) {
            memcpy(tmp, h, hlen);
            tmp[hlen] = '\0';
            ok = inet_pton(AF_INET6, tmp, &a6) == 1;
        }
        if (!ok) {
            release_redis(&nr);
            set_why(why, whylen, "has a bracketed host that is not an IPv6 address");
            return -1;
        }
    } else {
        hlen = strspn(h, host_chars);
        p = h + hlen;
    }
    if (hlen == 0) {
        release_redis(&nr);
        set_why(why, whylen, "has no host (redis://HOST[:PORT][/DB])");
        return -1;
    }
    nr.port = GW_CFG_REDIS_PORT;
    if (*p == ':') {
        size_t plen = strcspn(p + 1, "/");
        if (parse_port(p + 1, plen, &nr.port) != 0 || nr.port == 0) {
            release_redis(&nr);
            set_why(why, whylen, "has a port that is not a number from 1 to 65535");
            return -1;
        }
        p += 1 + plen;
    }
    if (*p == '/') {
        uint64_t db = 0;
        size_t dlen = strlen(p + 1);
        if (dlen > 0 && (util_parse_u64(p + 1, dlen, &db) != 0 || db > INT32_MAX)) {
            release_redis(&nr);
            set_why(why, whylen, "has a database that is not a whole number");
            return -1;
        }
        nr.db = (uint32_t)db;
        p += 1 + dlen;
    }
    if (*p != '\0') {
        release_redis(&nr);
        set_why(why, whylen, "is not redis://HOST[:PORT][/DB]");
        return -1;
    }
    nr.host = dup_n(h, hlen);
    nr.text = strdup(value);
    if (nr.host == NULL || nr.text == NULL) {
        release_redis(&nr);
        set_why(why, whylen, "could not be stored: out of memory");
        return -1;
    }
    release_redis(r);
    *r = nr;
    return 0;
}

/* --- effective values (--check-config, reload diffs) -------------------- */

static int show_text(char *buf, size_t buflen, const char *v)
{
    int n = snprintf(buf, buflen, "%s", v != NULL ? v : "");

    return n >= 0 && (size_t)n < buflen ? 0 : -1;
}

static int show_str(const struct cfg_opt *opt, const void *field, char *buf, size_t buflen)
{
    return show_text(buf, buflen, *(char *const *)field);
}

static int show_addr(const struct cfg_opt *opt, const void *field, char *buf, size_t buflen)
{
    return show_text(buf, buflen, ((const struct gw_cfg_addr *)field)->text);
}

/* port and host show the part of --listen they set. */
static int show_listen_port(const struct cfg_opt *opt, const void *field, char *buf,
                            size_t buflen)
{
    const struct gw_cfg_addr *a = field;
    int n = snprintf(buf, buflen, "%u", (unsigned)a->port);

    return n >= 0 && (size_t)n < buflen ? 0 : -1;
}

static int show_listen_host(const struct cfg_opt *opt, const void *field, char *buf,
                            size_t buflen)
{
    return show_text(buf, buflen, ((const struct gw_cfg_addr *)field)->host);
}

static int show_url(const struct cfg_opt *opt, const void *field, char *buf, size_t buflen)
{
    return show_text(buf, buflen, ((const struct gw_cfg_url *)field)->text);
}

static int show_redis(const struct cfg_opt *opt, const void *field, char *buf, size_t buflen)
{
    const struct gw_cfg_redis *r = field;
    int n;

    if (r->password == NULL)
        return show_text(buf, buflen, r->text);
    /* never print the password (--check-config, reload lines) */
    if (strchr(r->host, ':') != NULL)
        n = snprintf(buf, buflen, "redis://:***@[%s]:%u/%u", r->host, r->port, r->db);
    else
        n = snprintf(buf, buflen, "redis://:***@%s:%u/%u", r->host, r->port, r->db);
    return n >= 0 && (size_t)n < buflen ? 0 : -1;
}

/* The ranges normalised: "10.0.0.0/8,::1/128". */
static int show_cidrs(const struct cfg_opt *opt, const void *field, char *buf, size_t buflen)
{
    const struct gw_cidr_list *l = field;
    size_t used = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < l->n; i++) {
        char a[INET6_ADDRSTRLEN];
        int n;

        if (inet_ntop(l->v[i].family, l->v[i].addr, a, sizeof(a)) == NULL)
            return -1;
        n = snprintf(buf + used, buflen - used, "%s%s/%u", i == 0 ? "" : ",", a,
                     l->v[i].prefix);
        if (n < 0 || (size_t)n >= buflen - used)
            return -1;
        used += (size_t)n;
    }
    return 0;
}

/* --- the table --------------------------------------------------------- */

#define OFF(f) offsetof(struct gw_cfg, f)

static const struct cfg_choice level_choices[] = {
    {"debug", LOG_LVL_DEBUG, false},
    {"info", LOG_LVL_INFO, false},
    {"warn", LOG_LVL_WARN, false},
    {"error", LOG_LVL_ERROR, false},
    {"warning", LOG_LVL_WARN, true}, /* ProxyStore / Python spelling */
    {NULL, 0, false},
};

static const struct cfg_choice format_choices[] = {
    {"text", LOG_FMT_TEXT, false},
    {"json", LOG_FMT_JSON, false},
    {NULL, 0, false},
};

static const char *const cert_aliases[] = {"certfile", NULL};
static const char *const key_aliases[] = {"keyfile", NULL};
static const char *const level_aliases[] = {"default_log_level", NULL};

/* ProxyStore relay keys with no meaning here: warned about, not refused. */
static const char *const ignored_keys[] = {
    "websockets_log_level",
    "current_client_limit",
    "current_client_interval",
    NULL,
};

#define G_GEN "General"
#define G_CLU "Several nodes (Redis)"
#define G_LSN "Listeners and TLS"
#define G_ACC "Who may register, who is believed"
#define G_LIM "Limits (0 = no limit)"
#define G_LOG "Logging"
#define U32 UINT32_MAX

static const struct cfg_opt gw_opts[] = {
    {.name = "config", .type = CFG_T_PATH, .flags = CFG_F_CONFIG, .offset = OFF(config_path),
     .metavar = "FILE", .group = G_GEN, .help = "Read options from FILE (format above)."},
    {.name = "domain", .type = CFG_T_CUSTOM, .offset = OFF(domain), .def = "localhost",
     .metavar = "DOMAIN", .group = G_GEN, .parse = parse_domain, .release = release_str,
     .show = show_str,
     .help = "Apex domain; each agent is served at <address>.DOMAIN."},
    {.name = "public-url-base", .type = CFG_T_CUSTOM, .offset = OFF(public_url), .metavar = "URL",
     .group = G_GEN, .parse = parse_url, .release = release_url, .show = show_url,
     .help = "https://DOMAIN[:PORT] (or http://) that clients use, for the URLs handed out "
             "when the gateway listens on an internal port; unset: from --domain and --listen."},
    {.name = "state-dir", .type = CFG_T_PATH, .offset = OFF(state_dir),
     .def = "${XDG_STATE_HOME:-~/.local/state}/tunnel-gateway", .metavar = "DIR", .group = G_GEN,
     .help = "State directory; without --cert the local CA (local-ca.pem) lives here."},
    {.name = "region", .type = CFG_T_STRING, .offset = OFF(region), .def = "local",
     .metavar = "NAME", .group = G_GEN,
     .help = "Name of this node's region, told to agents in auth_ok and shown in /health: 1 "
             "to 64 printable ASCII characters."},
    {.name = "node-id", .type = CFG_T_STRING, .offset = OFF(node_id), .metavar = "NAME",
     .group = G_GEN,
     .help = "This node's name in /health (\"machine\"), /stats, /metrics, /admin/agents and "
             "the logs: 1 to 64 of A-Z a-z 0-9 . _ : -; unset: the host name and the main "
             "listener's port (HOST:PORT)."},
    {.name = "redis", .env = "REDIS_URL", .type = CFG_T_CUSTOM, .offset = OFF(redis),
     .metavar = "URL", .group = G_CLU, .parse = parse_redis, .release = release_redis,
     .show = show_redis,
     .help = "Share the route registry with the other nodes at "
             "redis://[:PASSWORD@]HOST[:PORT][/DB] (default port 6379, db 0; also REDIS_URL); "
             "needs --node-listen and --cluster-secret-file. Unset: one node, the registry in "
             "memory."},
    {.name = "redis-timeout", .type = CFG_T_UINT, .flags = CFG_F_LIVE,
     .offset = OFF(redis_timeout_ms), .def = "500", .metavar = "MS", .group = G_CLU,
     .max = 60000,
     .help = "Longest a request waits for Redis to say which node holds its agent (ms; 1 to "
             "60000); past it the request is answered 502 agent_offline."},
    {.name = "node-listen", .type = CFG_T_CUSTOM, .offset = OFF(node_listen),
     .metavar = "ADDR:PORT", .group = G_CLU, .parse = parse_listen, .release = release_addr,
     .show = show_addr,
     .help = "Accept requests forwarded by the other nodes here: cleartext HTTP/2, each "
             "request proven with the cluster secret; for a private network only."},
    {.name = "node-advertise", .type = CFG_T_CUSTOM, .offset = OFF(node_advertise),
     .metavar = "HOST:PORT", .group = G_CLU, .parse = parse_advertise, .release = release_str,
     .show = show_str,
     .help = "The address the other nodes dial to reach --node-listen (a numeric IP and "
             "port); unset: --node-listen's, which must then not be a wildcard."},
    {.name = "cluster-secret-file", .type = CFG_T_PATH, .offset = OFF(cluster_secret_path),
     .metavar = "FILE", .group = G_CLU,
     .help = "The secret every node shares (32 or more bytes, owner-only file): it proves "
             "each forwarded request (HMAC-SHA256)."},
    {.name = "drain-timeout", .type = CFG_T_SECONDS, .flags = CFG_F_LIVE,
     .offset = OFF(drain_timeout_s), .def = "600", .metavar = "S", .group = G_GEN, .max = U32,
     .help = "On SIGTERM, time in-flight streams get to finish (s)."},
    {.name = "ping-interval", .type = CFG_T_SECONDS, .flags = CFG_F_LIVE,
     .offset = OFF(ping_interval_s), .def = "20", .metavar = "S", .group = G_GEN, .max = U32,
     .help = "Tunnel keepalive PING interval; a peer silent for 3 intervals is dropped "
             "(s; 0 = off)."},
    {.name = "summary-interval", .type = CFG_T_SECONDS, .flags = CFG_F_LIVE,
     .offset = OFF(summary_interval_s),
     .def = "60", .metavar = "S", .group = G_GEN, .max = U32,
     .help = "Log a summary of connected tunnels this often (s; 0 = off)."},
    {.name = "help", .type = CFG_T_BOOL, .flags = CFG_F_CLI_ONLY | CFG_F_EXIT,
     .offset = OFF(show_help), .group = G_GEN, .help = "Print this help and exit."},
    {.name = "version", .type = CFG_T_BOOL, .flags = CFG_F_CLI_ONLY | CFG_F_EXIT,
     .offset = OFF(show_version), .group = G_GEN, .help = "Print the version and exit."},
    {.name = "check-config", .type = CFG_T_BOOL, .flags = CFG_F_CLI_ONLY,
     .offset = OFF(check_config), .group = G_GEN,
     .help = "Print every option's effective value and where it came from (default, file "
             "PATH:LINE, env NAME, command line), then exit: 0 if the configuration is good, "
             "2 (with the error) if not."},

    {.name = "listen", .type = CFG_T_CUSTOM, .offset = OFF(listen), .def = "127.0.0.1:8443",
     .metavar = "ADDR:PORT", .group = G_LSN, .parse = parse_listen, .release = release_addr,
     .show = show_addr, .help = "Main listener (TLS unless --no-tls): IPv4, [IPv6] or localhost, and a port "
             "(0 = any free port)."},
    {.name = "port", .env = "PORT", .type = CFG_T_CUSTOM, .offset = OFF(listen),
     .metavar = "PORT", .group = G_LSN, .parse = parse_listen_port, .show = show_listen_port,
     .help = "Set only the port of --listen. It edits a --listen from the same source or a "
             "lower one; a --listen from a higher-precedence source replaces it."},
    {.name = "host", .env = "HOST", .type = CFG_T_CUSTOM, .offset = OFF(listen),
     .metavar = "ADDR", .group = G_LSN, .parse = parse_listen_host, .show = show_listen_host,
     .help = "Set only the address of --listen (\"::\" or \"[::]\" for IPv6), like --port."},
    {.name = "plain-listen", .type = CFG_T_CUSTOM, .offset = OFF(plain_listen),
     .metavar = "ADDR:PORT", .group = G_LSN, .parse = parse_listen, .release = release_addr,
     .show = show_addr, .help = "Also serve cleartext HTTP here, for a TLS-terminating load balancer in front."},
    {.name = "no-tls", .type = CFG_T_BOOL, .offset = OFF(no_tls), .group = G_LSN,
     .help = "Serve cleartext HTTP on --listen (platforms that terminate TLS: Cloud Run, Fly)."},
    {.name = "proxy-protocol", .type = CFG_T_BOOL, .offset = OFF(proxy_protocol), .group = G_LSN,
     .help = "Every connection to --listen and --plain-listen starts with a PROXY protocol v2 "
             "header (HAProxy's send-proxy-v2): its source address is the client's for limits, "
             "logs and X-Forwarded-For. A connection without a valid one is closed. Only for "
             "listeners that nothing but the load balancer can reach."},
    {.name = "reuse-port", .type = CFG_T_BOOL, .offset = OFF(reuse_port), .group = G_LSN,
     .help = "Bind --listen and --plain-listen with SO_REUSEPORT, so that several gateway "
             "processes on this host (each with its own --node-id and --node-listen, sharing "
             "routes with --redis) take connections on the same ports and use more cores."},
    {.name = "cert", .type = CFG_T_PATH, .offset = OFF(cert_path), .metavar = "FILE",
     .group = G_LSN, .file_aliases = cert_aliases,
     .help = "Certificate chain (PEM) for DOMAIN and *.DOMAIN, with --key; unset: "
             "certificates from a local CA in --state-dir."},
    {.name = "key", .type = CFG_T_PATH, .offset = OFF(key_path), .metavar = "FILE",
     .group = G_LSN, .file_aliases = key_aliases, .help = "Private key (PEM) for --cert."},

    {.name = "allow", .type = CFG_T_PATH, .offset = OFF(allow_path), .metavar = "FILE",
     .group = G_ACC,
     .help = "Only the addresses in FILE (one per line; reloaded on SIGHUP) may register."},
    {.name = "open", .type = CFG_T_BOOL, .offset = OFF(open), .group = G_ACC,
     .help = "Any valid signature may register. A listener beyond loopback needs --allow or "
             "--open; on loopback, open is the default."},
    {.name = "trust-proxy", .type = CFG_T_CUSTOM, .flags = CFG_F_LIVE, .offset = OFF(trust_proxy),
     .metavar = "CIDR[,CIDR...]", .group = G_ACC, .parse = parse_trust_proxy,
     .release = release_cidrs, .show = show_cidrs,
     .help = "Believe X-Forwarded-For/-Proto/-Host from peers in these ranges "
             "(e.g. 10.0.0.0/8,fd00::/8; a bare address is one host)."},

    {.name = "max-header-bytes", .type = CFG_T_UINT, .flags = CFG_F_LIVE, .offset = OFF(max_header_bytes),
     .def = "65536", .metavar = "N", .group = G_LIM, .max = U32,
     .help = "Largest request head (request line and headers) in bytes; beyond it 431."},
    {.name = "max-header-count", .type = CFG_T_UINT, .flags = CFG_F_LIVE, .offset = OFF(max_header_count),
     .def = "100", .metavar = "N", .group = G_LIM, .max = 10000,
     .help = "Most header fields in a request head; beyond them 431."},
    {.name = "header-timeout", .type = CFG_T_SECONDS, .flags = CFG_F_LIVE, .offset = OFF(header_timeout_s),
     .def = "20", .metavar = "S", .group = G_LIM, .max = U32,
     .help = "Time a client has to send a whole request head, from its first byte (s); "
             "beyond it 408 and the connection closes (HTTP/2: the stream is reset)."},
    {.name = "keepalive-timeout", .type = CFG_T_SECONDS, .flags = CFG_F_LIVE, .offset = OFF(keepalive_timeout_s),
     .def = "75", .metavar = "S", .group = G_LIM, .max = U32,
     .help = "An HTTP/1.1 connection between requests, or an HTTP/2 connection with no "
             "stream open, is closed after this long (s)."},
    {.name = "max-body-bytes", .type = CFG_T_UINT, .flags = CFG_F_LIVE, .offset = OFF(max_body_bytes), .def = "0",
     .metavar = "N", .group = G_LIM, .max = UINT64_MAX,
     .help = "Largest request body in bytes; beyond it 413."},
    {.name = "response-header-timeout", .type = CFG_T_SECONDS, .flags = CFG_F_LIVE,
     .offset = OFF(resp_header_timeout_s), .def = "300", .metavar = "S", .group = G_LIM,
     .max = U32, .help = "Time the agent has to start its response (s); beyond it 504."},
    {.name = "max-response-header-timeout", .type = CFG_T_SECONDS, .flags = CFG_F_LIVE,
     .offset = OFF(max_resp_header_timeout_s), .def = "3600", .metavar = "S", .group = G_LIM,
     .max = U32, .help = "Longest response-header timeout an agent may ask for (s)."},
    {.name = "stream-idle-timeout", .type = CFG_T_SECONDS, .flags = CFG_F_LIVE, .offset = OFF(stream_idle_timeout_s),
     .def = "300", .metavar = "S", .group = G_LIM, .max = U32,
     .help = "A request body that sends no byte for this long is ended (s)."},
    {.name = "max-conns-per-ip", .type = CFG_T_UINT, .flags = CFG_F_LIVE, .offset = OFF(max_conns_per_ip),
     .def = "512", .metavar = "N", .group = G_LIM, .max = U32,
     .help = "Public connections open at once per client IP."},
    {.name = "tunnel-connects-per-ip-per-min", .type = CFG_T_UINT, .flags = CFG_F_LIVE,
     .offset = OFF(tunnel_connects_per_ip_per_min), .def = "60", .metavar = "N", .group = G_LIM,
     .max = U32, .help = "Tunnel connection attempts per IP per minute."},
    {.name = "presence-per-ip-per-min", .type = CFG_T_UINT, .flags = CFG_F_LIVE,
     .offset = OFF(presence_per_ip_per_min), .def = "120", .metavar = "N", .group = G_LIM,
     .max = U32, .help = "/presence calls per client IP per minute; beyond them 429 (0 = no limit)."},
    {.name = "max-tunnels-per-ip", .type = CFG_T_UINT, .flags = CFG_F_LIVE, .offset = OFF(max_tunnels_per_ip),
     .def = "64", .metavar = "N", .group = G_LIM, .max = U32,
     .help = "Tunnels open at once per IP."},
    {.name = "max-pending-tunnels-per-ip", .type = CFG_T_UINT, .flags = CFG_F_LIVE,
     .offset = OFF(max_pending_tunnels_per_ip), .def = "8", .metavar = "N", .group = G_LIM,
     .max = U32, .help = "Tunnels per IP that have not authenticated yet; beyond them 429."},
    {.name = "max-pending-tunnels", .type = CFG_T_UINT, .flags = CFG_F_LIVE,
     .offset = OFF(max_pending_tunnels), .def = "1024", .metavar = "N", .group = G_LIM,
     .max = U32, .help = "Tunnels in all that have not authenticated yet; beyond them 503."},
    {.name = "max-osaurus-body-memory", .type = CFG_T_UINT, .flags = CFG_F_LIVE,
     .offset = OFF(max_osaurus_body_memory), .def = "268435456", .metavar = "N", .group = G_LIM,
     .max = UINT64_MAX,
     .help = "Bytes of request bodies held in all while Osaurus-mode requests are collected "
             "(each tunnel holds at most 64 MiB); beyond them 503 gateway_busy."},
    {.name = "max-agents-per-tunnel", .type = CFG_T_UINT, .flags = CFG_F_LIVE, .offset = OFF(max_agents_per_tunnel),
     .def = "50", .metavar = "N", .group = G_LIM, .max = U32,
     .help = "Agents registered on one tunnel."},
    {.name = "max-streams-per-tunnel", .type = CFG_T_UINT, .flags = CFG_F_LIVE, .offset = OFF(max_streams_per_tunnel),
     .def = "1024", .metavar = "N", .group = G_LIM, .max = U32,
     .help = "Requests in flight on one tunnel; beyond it 503 host_busy at once."},
    {.name = "agent-requests-per-min", .type = CFG_T_UINT, .flags = CFG_F_LIVE, .offset = OFF(agent_requests_per_min),
     .def = "0", .metavar = "N", .group = G_LIM, .max = U32,
     .help = "Public requests per agent per minute; beyond it 429."},

    {.name = "log-level", .type = CFG_T_ENUM, .flags = CFG_F_LIVE, .offset = OFF(log_level), .def = "info",
     .metavar = "LEVEL", .group = G_LOG, .choices = level_choices, .file_aliases = level_aliases,
     .help = "Least severe level logged (any case)."},
    {.name = "log-dir", .type = CFG_T_PATH, .offset = OFF(log_dir), .metavar = "DIR",
     .group = G_LOG,
     .help = "Append logs to DIR/tunnel-gateway.log (DIR is created, mode 0700, if missing; "
             "SIGHUP reopens the file, for log rotation); unset: stderr."},
    {.name = "log-format", .type = CFG_T_ENUM, .offset = OFF(log_format), .def = "text",
     .metavar = "FORMAT", .group = G_LOG, .choices = format_choices,
     .help = "Log line format."},
    {.name = "access-log", .type = CFG_T_PATH, .offset = OFF(access_log), .metavar = "off|FILE",
     .group = G_LOG,
     .help = "One line per request (event=request, in --log-format): unset: the main log; "
             "off: none; FILE: appended (created owner-only), reopened on SIGHUP. The "
             "path's query string is dropped unless --log-level is debug."},
    {.name = "metrics-agents", .type = CFG_T_UINT, .offset = OFF(metrics_agents), .def = "0",
     .metavar = "N", .group = G_LOG, .max = 10000,
     .help = "/metrics shows per-agent series (requests, bytes, errors) for the N agents "
             "with the most requests (0 = none)."},
    {.name = "admin-token-file", .type = CFG_T_PATH, .offset = OFF(admin_token_path),
     .metavar = "FILE", .group = G_ACC,
     .help = "Enable /admin/... on the apex for \"Authorization: Bearer <token>\", the token "
             "(32 or more characters) read from FILE, which must be owner-only; unset: "
             "/admin answers 404."},
    {.name = "presence-token-file", .type = CFG_T_PATH, .offset = OFF(presence_token_path),
     .metavar = "FILE", .group = G_ACC,
     .help = "Enable GET /presence?addresses=A,B,... on the apex (which of up to 100 agents are "
             "online, as the Osaurus relay answers it) for \"Authorization: Bearer <token>\", "
             "the token (32 or more characters) read from FILE, which must be owner-only; "
             "unset: /presence answers 404."},
};

static const struct cfg_spec gw_spec = {
    .prog = "tunnel-gateway",
    .summary = "Public HTTPS for local agents at <address>.DOMAIN, through WebSocket tunnels.",
    .env_prefix = "TUNNEL_GATEWAY",
    .opts = gw_opts,
    .nopts = sizeof(gw_opts) / sizeof(gw_opts[0]),
    .ignored_keys = ignored_keys,
};

const struct cfg_spec *gw_cfg_spec(void)
{
    return &gw_spec;
}

void gw_cfg_print_help(FILE *out)
{
    cfg_print_help(&gw_spec, out);
}

/* --- load -------------------------------------------------------------- */

static bool listener_is_loopback(const struct gw_cfg_addr *a)
{
    return a->text == NULL || gw_cfg_addr_is_loopback((const struct sockaddr *)&a->ss);
}

static int add_warning(struct gw_cfg *cfg, const char *msg)
{
    char **v = realloc(cfg->warnings, (cfg->n_warnings + 1) * sizeof(*v));
    char *s = strdup(msg);

    if (v == NULL || s == NULL) {
        if (v != NULL)
            cfg->warnings = v;
        free(s);
        return -1;
    }
    cfg->warnings = v;
    cfg->warnings[cfg->n_warnings++] = s;
    return 0;
}

#define ADMIN_TOKEN_MIN 32
#define ADMIN_TOKEN_MAX 4096

/* Reads a token file (--admin-token-file, --presence-token-file, named by
 * flag): a regular file not readable or writable by group or others, one
 * token of ADMIN_TOKEN_MIN.. printable characters (a final newline is
 * ignored), into *out. */
static int load_token(const char *flag, const char *path, char **out, char *err, size_t errlen)
{
    char buf[ADMIN_TOKEN_MAX + 2];
    struct stat st;
    ssize_t n;
    size_t len;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);

    if (fd == -1) {
        snprintf(err, errlen, "%s %s: %s", flag, path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s %s: not a regular file", flag, path);
        goto fail_fd;
    }
    if ((st.st_mode & 077) != 0 || st.st_uid != geteuid()) {
        snprintf(err, errlen, "%s %s: must be owned by this user and not "
                 "accessible to group or others (mode %03o; chmod 600 it)",
                 flag, path, (unsigned)(st.st_mode & 0777));
        goto fail_fd;
    }
    n = read(fd, buf, sizeof(buf) - 1);
    if (n < 0) {
        snprintf(err, errlen, "%s %s: %s", flag, path, strerror(errno));
        goto fail_fd;
    }
    close(fd);
    len = (size_t)n;
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
        len--;
    buf[len] = '\0';
    for (size_t i = 0; i < len; i++) {
        if (buf[i] <= ' ' || buf[i] > '~') {
            snprintf(err, errlen, "%s %s: the token must be one line of "
                     "printable characters without spaces", flag, path);
            goto fail_clean;
        }
    }
    if (len < ADMIN_TOKEN_MIN || len > ADMIN_TOKEN_MAX) {
        snprintf(err, errlen, "%s %s: the token has %zu characters; it needs "
                 "%d to %d", flag, path, len, ADMIN_TOKEN_MIN, ADMIN_TOKEN_MAX);
        goto fail_clean;
    }
    *out = strdup(buf);
    OPENSSL_cleanse(buf, sizeof(buf));
    if (*out == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;

fail_fd:
    close(fd);
    return -1;
fail_clean:
    OPENSSL_cleanse(buf, sizeof(buf));
    return -1;
}

/* What an agent takes as auth_ok's region (common/tun_msg.c). */
static bool region_ok(const char *s)
{
    size_t len = strlen(s);

    if (len == 0 || len > TUN_REGION_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return false;
    }
    return true;
}

#define CLUSTER_SECRET_MIN 32
#define CLUSTER_SECRET_MAX 4096

/* --cluster-secret-file: an owner-only regular file of 32 to 4096 bytes (a
 * final newline is not part of it), kept as bytes. */
static int load_secret(struct gw_cfg *cfg, char *err, size_t errlen)
{
    const char *path = cfg->cluster_secret_path;
    uint8_t buf[CLUSTER_SECRET_MAX + 2];
    struct stat st;
    ssize_t n;
    size_t len;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);

    if (fd == -1) {
        snprintf(err, errlen, "--cluster-secret-file %s: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "--cluster-secret-file %s: not a regular file", path);
        close(fd);
        return -1;
    }
    if ((st.st_mode & 077) != 0 || st.st_uid != geteuid()) {
        snprintf(err, errlen, "--cluster-secret-file %s: must be owned by this user and not "
                 "accessible to group or others (mode %03o; chmod 600 it)",
                 path, (unsigned)(st.st_mode & 0777));
        close(fd);
        return -1;
    }
    n = read(fd, buf, sizeof(buf));
    close(fd);
    if (n < 0) {
        snprintf(err, errlen, "--cluster-secret-file %s: %s", path, strerror(errno));
        return -1;
    }
    len = (size_t)n;
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
        len--;
    if (len < CLUSTER_SECRET_MIN || len > CLUSTER_SECRET_MAX) {
        OPENSSL_cleanse(buf, sizeof(buf));
        snprintf(err, errlen, "--cluster-secret-file %s: the secret has %zu bytes; it needs "
                 "%d to %d (e.g. head -c 48 /dev/urandom | base64 > FILE)",
                 path, len, CLUSTER_SECRET_MIN, CLUSTER_SECRET_MAX);
        return -1;
    }
    cfg->cluster_secret = malloc(len);
    if (cfg->cluster_secret == NULL) {
        OPENSSL_cleanse(buf, sizeof(buf));
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    memcpy(cfg->cluster_secret, buf, len);
    cfg->cluster_secret_len = len;
    OPENSSL_cleanse(buf, sizeof(buf));
    return 0;
}

bool gw_cfg_node_id_ok(const char *s, size_t len)
{
    if (len == 0 || len > GW_NODE_ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == ':' || c == '-'))
            return false;
    }
    return true;
}

/* Rules that span options (every value is already well-formed). */
static int validate(struct gw_cfg *cfg, char *err, size_t errlen)
{
    const struct gw_cfg_addr *outside = NULL;

    if ((cfg->cert_path != NULL) != (cfg->key_path != NULL)) {
        snprintf(err, errlen, "--cert and --key go together: %s is set but %s is not",
                 cfg->cert_path != NULL ? "--cert" : "--key",
                 cfg->cert_path != NULL ? "--key" : "--cert");
        return -1;
    }
    if (cfg->allow_path != NULL && cfg->open) {
        snprintf(err, errlen, "--allow and --open exclude each other: pass one of them");
        return -1;
    }
    if (!listener_is_loopback(&cfg->listen))
        outside = &cfg->listen;
    else if (!listener_is_loopback(&cfg->plain_listen))
        outside = &cfg->plain_listen;
    if (outside == NULL && cfg->proxy_protocol && cfg->allow_path == NULL && !cfg->open) {
        /* a balancer in front passes the world's clients in, loopback or not */
        snprintf(err, errlen, "--proxy-protocol puts a load balancer's clients on this "
                 "gateway, and neither --allow nor --open is given: an open gateway lets "
                 "anyone publish pages under your domain; pass --allow FILE or --open");
        return -1;
    }
    if (outside != NULL && cfg->allow_path == NULL && !cfg->open) {
        snprintf(err, errlen, "--%s %s is not a loopback address, and neither --allow nor "
                 "--open is given: an open gateway lets anyone publish pages under your "
                 "domain; pass --allow FILE or --open",
                 outside == &cfg->listen ? "listen" : "plain-listen", outside->text);
        return -1;
    }
    cfg->open_effective = cfg->open || cfg->allow_path == NULL;
    if (cfg->resp_header_timeout_s != 0 && cfg->max_resp_header_timeout_s != 0 &&
        cfg->resp_header_timeout_s > cfg->max_resp_header_timeout_s) {
        snprintf(err, errlen, "--response-header-timeout %llu exceeds "
                 "--max-response-header-timeout %llu",
                 (unsigned long long)cfg->resp_header_timeout_s,
                 (unsigned long long)cfg->max_resp_header_timeout_s);
        return -1;
    }
    if (cfg->state_dir == NULL && cfg->cert_path == NULL) {
        snprintf(err, errlen, "--state-dir: no default, as neither XDG_STATE_HOME nor HOME is "
                 "set; pass --state-dir DIR (or --cert and --key)");
        return -1;
    }
    if (cfg->region != NULL && !region_ok(cfg->region)) {
        snprintf(err, errlen, "--region: use 1 to %d printable ASCII characters (agents are "
                 "told it in auth_ok, and refuse anything else)", TUN_REGION_MAX);
        return -1;
    }
    if (cfg->node_id != NULL && !gw_cfg_node_id_ok(cfg->node_id, strlen(cfg->node_id))) {
        snprintf(err, errlen, "--node-id \"%s\": use 1 to %d of A-Z a-z 0-9 . _ : -",
                 cfg->node_id, GW_NODE_ID_MAX);
        return -1;
    }
    if (cfg->admin_token_path != NULL &&
        load_token("--admin-token-file", cfg->admin_token_path, &cfg->admin_token, err,
                   errlen) != 0)
        return -1;
    if (cfg->presence_token_path != NULL &&
        load_token("--presence-token-file", cfg->presence_token_path, &cfg->presence_token, err,
                   errlen) != 0)
        return -1;
    if (cfg->redis.text != NULL &&
        (cfg->node_listen.text == NULL || cfg->cluster_secret_path == NULL)) {
        snprintf(err, errlen, "--redis shares routes with other nodes, which forward requests "
                 "to this one: it needs --node-listen ADDR:PORT and --cluster-secret-file FILE%s",
                 cfg->node_listen.text == NULL && cfg->cluster_secret_path == NULL ? " (both unset)"
                 : cfg->node_listen.text == NULL ? " (--node-listen unset)"
                                                 : " (--cluster-secret-file unset)");
        return -1;
    }
    if (cfg->redis.text == NULL &&
        (cfg->node_listen.text != NULL || cfg->node_advertise != NULL)) {
        snprintf(err, errlen, "--%s is for a node that shares routes: it needs --redis URL",
                 cfg->node_listen.text != NULL ? "node-listen" : "node-advertise");
        return -1;
    }
    if (cfg->node_listen.text != NULL && cfg->node_advertise == NULL &&
        (cfg->node_listen.port == 0 || addr_is_any(&cfg->node_listen))) {
        snprintf(err, errlen, "--node-listen %s: other nodes cannot dial %s; pass "
                 "--node-advertise HOST:PORT", cfg->node_listen.text,
                 cfg->node_listen.port == 0 ? "port 0" : "a wildcard address");
        return -1;
    }
    if (cfg->redis.text != NULL && cfg->redis_timeout_ms == 0) {
        snprintf(err, errlen, "--redis-timeout: 1 to 60000 ms");
        return -1;
    }
    if (cfg->cluster_secret_path != NULL && load_secret(cfg, err, errlen) != 0)
        return -1;
    if (cfg->no_tls && cfg->cert_path != NULL &&
        add_warning(cfg, "--cert and --key are unused: --no-tls makes --listen cleartext") != 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

static int copy_argv(struct gw_cfg *cfg, int argc, char **argv)
{
    cfg->argv = calloc((size_t)argc + 1, sizeof(*cfg->argv));
    if (cfg->argv == NULL)
        return -1;
    cfg->argc = argc;
    for (int i = 0; i < argc; i++) {
        cfg->argv[i] = strdup(argv[i]);
        if (cfg->argv[i] == NULL)
            return -1;
    }
    return 0;
}

int gw_cfg_load(struct gw_cfg *cfg, int argc, char **argv, char *err, size_t errlen)
{
    struct cfg_warnings w = {NULL, 0};
    struct cfg_source *src = calloc(gw_spec.nopts, sizeof(*src));

    memset(cfg, 0, sizeof(*cfg));
    if (src == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (cfg_load_src(&gw_spec, cfg, argc, argv, &w, src, err, errlen) != 0) {
        cfg_warnings_free(&w);
        free(src);
        return -1;
    }
    cfg->sources = src;
    cfg->warnings = w.v;
    cfg->n_warnings = w.n;
    if (cfg->show_help || cfg->show_version)
        return 0;
    if (copy_argv(cfg, argc, argv) != 0) {
        snprintf(err, errlen, "out of memory");
        gw_cfg_cleanup(cfg);
        return -1;
    }
    if (validate(cfg, err, errlen) != 0) {
        gw_cfg_cleanup(cfg);
        return -1;
    }
    return 0;
}

/* Longest value shown by --check-config or in a config_changed line. */
#define GW_CFG_SHOW_MAX 4096

static bool opt_is_setting(const struct cfg_opt *o)
{
    return (o->flags & (CFG_F_CLI_ONLY | CFG_F_CONFIG)) == 0;
}

static void show_opt(const struct gw_cfg *cfg, size_t i, char *buf, size_t buflen)
{
    const char *text = cfg->sources != NULL ? cfg->sources[i].text : NULL;

    if (cfg_show_value(&gw_opts[i], cfg, text, buf, buflen) != 0 && buflen > 4)
        memcpy(buf + buflen - 4, "...", 4);
}

/* Moves cur's value of every restart-only key into out (and out's into cur,
 * to be freed with it). Options sharing a field (listen, port, host) move it
 * once. A custom field this function does not know stays as loaded. */
static void keep_restart_only(struct gw_cfg *cur, struct gw_cfg *out)
{
    bool moved[sizeof(gw_opts) / sizeof(gw_opts[0])] = {false};

    for (size_t i = 0; i < gw_spec.nopts; i++) {
        const struct cfg_opt *o = &gw_opts[i];
        struct cfg_source t;

        if (!opt_is_setting(o) || (o->flags & CFG_F_LIVE))
            continue;
        t = cur->sources[i];
        cur->sources[i] = out->sources[i];
        out->sources[i] = t;
        for (size_t j = 0; j < i; j++)
            moved[i] = moved[i] || (moved[j] && gw_opts[j].offset == o->offset);
        if (moved[i])
            continue;
        moved[i] = true;
        if (cfg_swap_field(o, cur, out) == 0)
            continue;
        if (o->offset == OFF(listen) || o->offset == OFF(plain_listen) ||
            o->offset == OFF(node_listen)) {
            struct gw_cfg_addr *a = (struct gw_cfg_addr *)((char *)cur + o->offset);
            struct gw_cfg_addr *b = (struct gw_cfg_addr *)((char *)out + o->offset);
            struct gw_cfg_addr ta = *a;
            *a = *b;
            *b = ta;
        } else if (o->offset == OFF(node_advertise)) {
            char *tn = cur->node_advertise;
            cur->node_advertise = out->node_advertise;
            out->node_advertise = tn;
        } else if (o->offset == OFF(domain)) {
            char *td = cur->domain;
            cur->domain = out->domain;
            out->domain = td;
        } else if (o->offset == OFF(public_url)) {
            struct gw_cfg_url tu = cur->public_url;
            cur->public_url = out->public_url;
            out->public_url = tu;
        } else if (o->offset == OFF(redis)) {
            struct gw_cfg_redis tr = cur->redis;
            cur->redis = out->redis;
            out->redis = tr;
        }
    }
    /* derived from allow and open, both restart-only */
    out->open_effective = cur->open_effective;
    /* read from --cluster-secret-file, restart-only: the bytes stay too */
    {
        uint8_t *ts = cur->cluster_secret;
        size_t tl = cur->cluster_secret_len;
        cur->cluster_secret = out->cluster_secret;
        cur->cluster_secret_len = out->cluster_secret_len;
        out->cluster_secret = ts;
        out->cluster_secret_len = tl;
    }
}

int gw_cfg_reload(struct gw_cfg *cur, struct gw_cfg *out, gw_cfg_change_cb cb, void *arg,
                  char *err, size_t errlen)
{
    char *a = malloc(GW_CFG_SHOW_MAX);
    char *b = malloc(GW_CFG_SHOW_MAX);

    if (a == NULL || b == NULL) {
        free(a);
        free(b);
        memset(out, 0, sizeof(*out));
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (gw_cfg_load(out, cur->argc, cur->argv, err, errlen) != 0) {
        free(a);
        free(b);
        return -1;
    }
    for (size_t i = 0; i < gw_spec.nopts; i++) {
        const struct cfg_opt *o = &gw_opts[i];

        if (!opt_is_setting(o))
            continue;
        show_opt(cur, i, a, GW_CFG_SHOW_MAX);
        show_opt(out, i, b, GW_CFG_SHOW_MAX);
        if (strcmp(a, b) != 0 && cb != NULL)
            cb(arg, o->name, a, b, (o->flags & CFG_F_LIVE) != 0);
    }
    free(a);
    free(b);
    keep_restart_only(cur, out);
    return 0;
}

/* Sources start in this column. */
#define GW_CFG_SOURCE_COL 44

void gw_cfg_print_effective(const struct gw_cfg *cfg, FILE *out)
{
    char *v = malloc(GW_CFG_SHOW_MAX);

    if (v == NULL)
        return;
    fprintf(out, "# tunnel-gateway effective configuration: key = value  # source\n");
    for (size_t i = 0; i < gw_spec.nopts; i++) {
        const struct cfg_opt *o = &gw_opts[i];
        const char *where = cfg->sources != NULL && cfg->sources[i].where != NULL
                                ? cfg->sources[i].where
                                : "default";
        char *line = NULL;
        size_t len = 0;
        FILE *mem;

        if (o->flags & CFG_F_CLI_ONLY)
            continue;
        show_opt(cfg, i, v, GW_CFG_SHOW_MAX);
        mem = open_memstream(&line, &len);
        if (mem == NULL)
            break;
        if (o->flags & CFG_F_CONFIG)
            fprintf(mem, "# "); /* not a file key */
        fprintf(mem, "%s = ", o->name);
        if (o->type == CFG_T_UINT || o->type == CFG_T_SECONDS || o->type == CFG_T_BOOL)
            fputs(v, mem);
        else
            cfg_print_toml_string(mem, v);
        if (fclose(mem) != 0) {
            free(line);
            break;
        }
        fprintf(out, "%s%*s# %s\n", line,
                len < GW_CFG_SOURCE_COL ? (int)(GW_CFG_SOURCE_COL - len) : 1, "", where);
        free(line);
    }
    free(v);
}

void gw_cfg_cleanup(struct gw_cfg *cfg)
{
    if (cfg->admin_token != NULL) {
        OPENSSL_cleanse(cfg->admin_token, strlen(cfg->admin_token));
        free(cfg->admin_token);
        cfg->admin_token = NULL;
    }
    if (cfg->cluster_secret != NULL) {
        OPENSSL_cleanse(cfg->cluster_secret, cfg->cluster_secret_len);
        free(cfg->cluster_secret);
        cfg->cluster_secret = NULL;
        cfg->cluster_secret_len = 0;
    }
    if (cfg->presence_token != NULL) {
        OPENSSL_cleanse(cfg->presence_token, strlen(cfg->presence_token));
        free(cfg->presence_token);
        cfg->presence_token = NULL;
    }
    cfg_free_strings(&gw_spec, cfg);
    for (size_t i = 0; i < cfg->n_warnings; i++)
        free(cfg->warnings[i]);
    free(cfg->warnings);
    cfg_sources_free(cfg->sources, gw_spec.nopts);
    free(cfg->sources);
    for (int i = 0; cfg->argv != NULL && i < cfg->argc; i++)
        free(cfg->argv[i]);
    free(cfg->argv);
    memset(cfg, 0, sizeof(*cfg));
}
