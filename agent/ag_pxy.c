/* HTTP CONNECT proxies for the gateway's connections (ag_pxy.h). The dial is
 * ag_net's to the proxy, then one non-blocking request/answer exchange on the
 * socket with an event of its own; the answer is read up to its blank line
 * and nothing past it (a proxy sends nothing more before the gateway speaks,
 * and the gateway waits for us). */
#include "ag_pxy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include <event2/event.h>
#include <openssl/evp.h>

#include "util.h"

#define PXY_DEFAULT_PORT 1080
#define PXY_ANSWER_MAX 8192

/* ---- configuration ------------------------------------------------------------ */

static int hexval(int c)
{
    return util_is_hex_digit(c) ? util_hex_val(c) : -1;
}

/* Percent-decodes s[0..n) into out (NUL-terminated). Returns 0 or -1. */
static int pct_decode(const char *s, size_t n, char *out, size_t outlen)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            int h, l;
            if (i + 2 >= n)
                return -1;
            h = hexval(s[i + 1]);
            l = hexval(s[i + 2]);
            if (h < 0 || l < 0)
                return -1;
            c = h * 16 + l;
            i += 2;
        }
        if (c == 0 || o + 1 >= outlen)
            return -1;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return 0;
}

static const char *env_first(const char *(*getenv_fn)(const char *), const char *a, const char *b,
                             const char **which)
{
    const char *v = getenv_fn(a);

    *which = a;
    if (v == NULL || v[0] == '\0') {
        v = getenv_fn(b);
        *which = b;
    }
    return v != NULL && v[0] != '\0' ? v : NULL;
}

static bool host_eq_suffix(const char *host, const char *pat, size_t plen)
{
    size_t hlen = strlen(host);

    if (plen > 0 && pat[0] == '.') {
        pat++;
        plen--;
    }
    if (plen == 0)
        return false;
    if (hlen == plen)
        return strncasecmp(host, pat, plen) == 0;
    /* a domain suffix: "example.com" matches "gw.example.com" */
    return hlen > plen && host[hlen - plen - 1] == '.' &&
           strncasecmp(host + hlen - plen, pat, plen) == 0;
}

bool ag_pxy_no_proxy(const char *list, const char *host)
{
    const char *p = list;

    if (list == NULL)
        return false;
    while (*p != '\0') {
        const char *e = p + strcspn(p, ",");
        const char *s = p;
        size_t n;
        while (s < e && (*s == ' ' || *s == '\t'))
            s++;
        n = (size_t)(e - s);
        while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
            n--;
        if (n == 1 && s[0] == '*')
            return true;
        /* "host:port" entries: the port is not compared (the host decides) */
        if (n > 0 && s[0] != '[') {
            const char *colon = memchr(s, ':', n);
            if (colon != NULL && memchr(colon + 1, ':', (size_t)(s + n - colon - 1)) == NULL)
                n = (size_t)(colon - s);
        } else if (n > 2 && s[0] == '[') {
            const char *rb = memchr(s, ']', n);
            if (rb != NULL) {
                s++;
                n = (size_t)(rb - s);
            }
        }
        if (host_eq_suffix(host, s, n))
            return true;
        p = *e == ',' ? e + 1 : e;
    }
    return false;
}

int ag_pxy_from_env(const struct ag_gateway *gw, const char *(*getenv_fn)(const char *),
                    struct ag_proxy *out, char *err, size_t errlen)
{
    const char *which = NULL;
    const char *v;
    const char *no;
    const char *h, *at, *end;
    char user[128] = "", pass[128] = "";
    char cred[260];
    size_t hl;

    memset(out, 0, sizeof(*out));
    v = gw->tls ? env_first(getenv_fn, "https_proxy", "HTTPS_PROXY", &which)
                : env_first(getenv_fn, "http_proxy", "HTTP_PROXY", &which);
    if (v == NULL)
        v = env_first(getenv_fn, "all_proxy", "ALL_PROXY", &which);
    if (v == NULL)
        return 0;
    no = getenv_fn("no_proxy");
    if (no == NULL || no[0] == '\0')
        no = getenv_fn("NO_PROXY");
    if (ag_pxy_no_proxy(no, gw->host))
        return 0;
    (void)util_snprintf(out->var, sizeof(out->var), "%s", which);

    h = strstr(v, "://");
    if (h != NULL) {
        if ((size_t)(h - v) != 4 || strncasecmp(v, "http", 4) != 0) {
            (void)util_snprintf(err, errlen,
                                "%s=%s: only http:// proxies are supported (CONNECT); "
                                "unset it or give an http:// one",
                                which, v);
            return -1;
        }
        h += 3;
    } else {
        h = v;
    }
    end = h + strcspn(h, "/?#");
    at = NULL;
    for (const char *q = h; q < end; q++)
        if (*q == '@')
            at = q;
    if (at != NULL) {
        const char *colon = memchr(h, ':', (size_t)(at - h));
        size_t ul = colon != NULL ? (size_t)(colon - h) : (size_t)(at - h);
        if (pct_decode(h, ul, user, sizeof(user)) != 0 ||
            (colon != NULL &&
             pct_decode(colon + 1, (size_t)(at - colon - 1), pass, sizeof(pass)) != 0)) {
            (void)util_snprintf(err, errlen, "%s: bad user or password encoding", which);
            return -1;
        }
        h = at + 1;
    }
    hl = (size_t)(end - h);
    out->port = PXY_DEFAULT_PORT;
    if (hl > 0 && h[0] == '[') {
        const char *rb = memchr(h, ']', hl);
        if (rb == NULL || (size_t)(rb - h - 1) > AG_HOST_MAX)
            goto bad_host;
        memcpy(out->host, h + 1, (size_t)(rb - h - 1));
        out->host[rb - h - 1] = '\0';
        h = rb + 1;
    } else {
        size_t n = strcspn(h, ":/?#");
        if (n > (size_t)(end - h))
            n = (size_t)(end - h);
        if (n == 0 || n > AG_HOST_MAX)
            goto bad_host;
        memcpy(out->host, h, n);
        out->host[n] = '\0';
        h += n;
    }
    for (const char *q = out->host; *q != '\0'; q++)
        if ((unsigned char)*q <= ' ' || *q == '@' || *q == '%')
            goto bad_host;
    if (out->host[0] == '\0')
        goto bad_host;
    if (h < end && *h == ':') {
        uint64_t port;
        char ps[8];
        size_t n = (size_t)(end - h - 1);
        if (n == 0 || n >= sizeof(ps))
            goto bad_port;
        memcpy(ps, h + 1, n);
        ps[n] = '\0';
        if (util_parse_uint(ps, 65535, &port) != 0 || port == 0)
            goto bad_port;
        out->port = (uint16_t)port;
    } else if (h != end) {
        goto bad_host;
    }
    if (user[0] != '\0') {
        unsigned char b64[sizeof(out->auth)];
        int n = util_snprintf(cred, sizeof(cred), "%s:%s", user, pass);
        if (n < 0 || (size_t)n * 4 / 3 + 16 > sizeof(b64)) {
            (void)util_snprintf(err, errlen, "%s: user and password too long", which);
            return -1;
        }
        EVP_EncodeBlock(b64, (const unsigned char *)cred, n);
        (void)util_snprintf(out->auth, sizeof(out->auth), "Basic %s", (const char *)b64);
        OPENSSL_cleanse(cred, sizeof(cred));
        OPENSSL_cleanse(pass, sizeof(pass));
    }
    {
        bool v6 = strchr(out->host, ':') != NULL;
        (void)util_snprintf(out->shown, sizeof(out->shown), "http://%s%s%s%s%s:%u", user,
                            user[0] != '\0' ? "@" : "", v6 ? "[" : "", out->host, v6 ? "]" : "",
                            (unsigned)out->port);
    }
    out->set = true;
    return 0;

bad_host:
    (void)util_snprintf(err, errlen, "%s=%s: want [http://][user[:password]@]host[:port]", which,
                        v);
    return -1;
bad_port:
    (void)util_snprintf(err, errlen, "%s=%s: the port must be 1-65535", which, v);
    return -1;
}

/* ---- the dial --------------------------------------------------------------------- */

struct ag_pxy_dial {
    struct event_base *base;
    const struct ag_proxy *px;
    ag_net_dial_cb cb;
    void *arg;
    struct ag_net_dial *nd; /* to the proxy (or straight to the target) */
    evutil_socket_t fd;     /* connected to the proxy, exchange under way */
    struct event *io_ev;
    uint64_t deadline_ms;
    char req[AG_HOST_MAX * 2 + 512];
    size_t req_len, req_off;
    char ans[PXY_ANSWER_MAX + 1];
    size_t ans_len;
};

static void pd_free(struct ag_pxy_dial *d)
{
    ag_net_dial_cancel(d->nd);
    if (d->io_ev != NULL)
        event_free(d->io_ev);
    if (d->fd >= 0)
        evutil_closesocket(d->fd);
    free(d);
}

/* Reports and frees; called from the loop only. */
static void pd_finish(struct ag_pxy_dial *d, evutil_socket_t fd, const char *err)
{
    ag_net_dial_cb cb = d->cb;
    void *arg = d->arg;

    if (fd >= 0 && fd == d->fd)
        d->fd = -1; /* handed over */
    pd_free(d);
    cb(arg, fd, err);
}

/* Fails with "proxy URL (VAR): what[: detail]". */
static void pd_fail(struct ag_pxy_dial *d, const char *what, const char *detail)
{
    char why[320];

    (void)util_snprintf(why, sizeof(why), "proxy %s (%s): %s%s%s", d->px->shown, d->px->var, what,
                        detail != NULL ? ": " : "", detail != NULL ? detail : "");
    pd_finish(d, -1, why);
}

/* The answer's head is complete at ans[0..len): 2xx or why not. */
static void pd_judge(struct ag_pxy_dial *d, size_t head_len)
{
    char line[160];
    size_t n = strcspn(d->ans, "\r\n");
    int status = 0;

    if (head_len != d->ans_len) {
        pd_fail(d, "it sent data after its answer to CONNECT", NULL);
        return;
    }
    if (n >= sizeof(line))
        n = sizeof(line) - 1;
    memcpy(line, d->ans, n);
    line[n] = '\0';
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)line[i] < ' ' || (unsigned char)line[i] > '~')
            line[i] = '?';
    if (sscanf(line, "HTTP/1.%*1[01] %3d", &status) != 1 || status < 100) {
        pd_fail(d, "not an HTTP answer to CONNECT", line);
        return;
    }
    if (status < 200 || status > 299) {
        pd_fail(d, "CONNECT refused", line + 9);
        return;
    }
    pd_finish(d, d->fd, NULL);
}

static void pd_on_io(evutil_socket_t fd, short what, void *arg);

/* Waits for what (EV_WRITE, then EV_READ) on the proxy socket until the
 * dial's deadline. Returns 0, or -1 after failing the dial. */
static int pd_wait(struct ag_pxy_dial *d, short what)
{
    uint64_t now = util_mono_ms();
    uint64_t left = d->deadline_ms > now ? d->deadline_ms - now : 1;
    struct timeval tv = {(time_t)(left / 1000), (suseconds_t)((left % 1000) * 1000)};

    if (d->io_ev != NULL)
        event_free(d->io_ev);
    d->io_ev = event_new(d->base, d->fd, what | EV_PERSIST, pd_on_io, d);
    if (d->io_ev == NULL) {
        pd_fail(d, "out of memory", NULL);
        return -1;
    }
    event_add(d->io_ev, &tv);
    return 0;
}

static void pd_on_io(evutil_socket_t fd, short what, void *arg)
{
    struct ag_pxy_dial *d = arg;
    ssize_t n;
    char *end;

    if (what & EV_TIMEOUT) {
        pd_fail(d, "no answer to CONNECT in time", NULL);
        return;
    }
    if (d->req_off < d->req_len) {
        n = send(fd, d->req + d->req_off, d->req_len - d->req_off, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n < 0) {
            pd_fail(d, "send", strerror(errno));
            return;
        }
        d->req_off += (size_t)n;
        if (d->req_off == d->req_len)
            (void)pd_wait(d, EV_READ);
        return;
    }
    n = recv(fd, d->ans + d->ans_len, PXY_ANSWER_MAX - d->ans_len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        pd_fail(d, n == 0 ? "it closed the connection during CONNECT" : "recv",
                n == 0 ? NULL : strerror(errno));
        return;
    }
    d->ans_len += (size_t)n;
    d->ans[d->ans_len] = '\0';
    end = strstr(d->ans, "\r\n\r\n");
    if (end != NULL) {
        pd_judge(d, (size_t)(end - d->ans) + 4);
        return;
    }
    if (d->ans_len == PXY_ANSWER_MAX)
        pd_fail(d, "its answer to CONNECT is too long", NULL);
}

static void pd_on_dialled(void *arg, evutil_socket_t fd, const char *err)
{
    struct ag_pxy_dial *d = arg;

    d->nd = NULL; /* ag_net frees it after this returns */
    if (!d->px->set) {
        pd_finish(d, fd, err);
        return;
    }
    if (fd < 0) {
        pd_fail(d, "unreachable", err);
        return;
    }
    d->fd = fd;
    (void)pd_wait(d, EV_WRITE);
}

struct ag_pxy_dial *ag_pxy_dial_start(struct event_base *base, struct evdns_base *dns,
                                      const struct ag_proxy *px, const char *host, uint16_t port,
                                      uint64_t timeout_ms, ag_net_dial_cb cb, void *arg)
{
    struct ag_pxy_dial *d = calloc(1, sizeof(*d));

    if (d == NULL)
        return NULL;
    d->base = base;
    d->px = px;
    d->cb = cb;
    d->arg = arg;
    d->fd = -1;
    d->deadline_ms = util_mono_ms() + timeout_ms;
    if (px->set) {
        bool v6 = strchr(host, ':') != NULL;
        int n = util_snprintf(d->req, sizeof(d->req),
                              "CONNECT %s%s%s:%u HTTP/1.1\r\nHost: %s%s%s:%u\r\n%s%s%s"
                              "User-Agent: tunnel-agent\r\n\r\n",
                              v6 ? "[" : "", host, v6 ? "]" : "", (unsigned)port, v6 ? "[" : "",
                              host, v6 ? "]" : "", (unsigned)port,
                              px->auth[0] != '\0' ? "Proxy-Authorization: " : "", px->auth,
                              px->auth[0] != '\0' ? "\r\n" : "");
        if (n < 0) {
            free(d);
            return NULL;
        }
        d->req_len = (size_t)n;
    }
    d->nd = px->set ? ag_net_dial_start(base, dns, px->host, px->port, timeout_ms, pd_on_dialled, d)
                    : ag_net_dial_start(base, dns, host, port, timeout_ms, pd_on_dialled, d);
    if (d->nd == NULL) {
        free(d);
        return NULL;
    }
    return d;
}

void ag_pxy_dial_cancel(struct ag_pxy_dial *d)
{
    if (d != NULL)
        pd_free(d);
}
