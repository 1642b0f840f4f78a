/* The agent's end-to-end probe (ag_probe.h): one short-lived HTTP/1.1
 * connection per probe, "Connection: close", the answer parsed with
 * http-parser. Every outcome goes through probe_done(), called only from the
 * probe's own events (dial, bufferevent, timeout): it marks the probe dead,
 * quiets its connection and reports; the struct and its connection are freed
 * by the owner from the loop (ag_probe_free), never under these frames. */
#include "ag_probe.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <http_parser.h>
#include <openssl/ssl.h>

#include "ag_agt.h"
#include "ag_ctx.h"
#include "ag_net.h"
#include "ag_pxy.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define PROBE_TIMEOUT_S 10
#define PROBE_BODY_MAX 512

struct ag_probe {
    struct ag_agt *agt; /* borrowed: the agent owns the probe */
    const struct ag_probe_cbs *cb;
    void *arg;
    bool done; /* on_done reported: dead, waiting for ag_probe_free() */
    struct ag_pxy_dial *dial;
    struct bufferevent *bev;
    struct event *timeout_ev;
    http_parser parser;
    char host_port[AG_URL_MAX]; /* Host header: the public name[:port] */
    char host[AG_URL_MAX];      /* SNI / verified name */
    uint64_t start_ms;
    bool field_is_probe; /* the header being parsed is x-tunnel-probe */
    bool in_value;
    char field[32];
    size_t field_len;
    char echo[40];
    size_t echo_len;
    char body[PROBE_BODY_MAX + 1];
    size_t body_len;
    bool complete;
};

bool ag_probe_is_done(const struct ag_probe *p) { return p->done; }

void ag_probe_free(struct ag_probe *p)
{
    if (p == NULL)
        return;
    ag_pxy_dial_cancel(p->dial);
    if (p->bev != NULL)
        bufferevent_free(p->bev);
    if (p->timeout_ev != NULL)
        event_free(p->timeout_ev);
    if (!p->done)
        p->agt->probe_nonce[0] = '\0'; /* a done probe cleared it; a newer one may own it */
    free(p);
}

/* The one way out: marks p dead, stops its I/O, reports. Nothing is freed
 * here (we are inside one of p's callbacks); the owner frees p later. */
static void probe_done(struct ag_probe *p, bool ok, const char *err)
{
    uint64_t rtt = clk_mono_ms(p->agt->ctx->clk) - p->start_ms;
    char e[200];

    if (p->done)
        return;
    p->done = true;
    (void)util_snprintf(e, sizeof(e), "%s", err != NULL ? err : "");
    ag_pxy_dial_cancel(p->dial); /* not the dial's own callback: that clears p->dial first */
    p->dial = NULL;
    if (p->bev != NULL) {
        bufferevent_disable(p->bev, EV_READ | EV_WRITE);
        bufferevent_setcb(p->bev, NULL, NULL, NULL, NULL);
    }
    event_del(p->timeout_ev);
    p->agt->probe_nonce[0] = '\0'; /* an echo of it is no longer ours */
    p->cb->on_done(p->arg, ok, rtt, e);
}

static int pr_on_field(http_parser *hp, const char *at, size_t len)
{
    struct ag_probe *p = hp->data;

    if (p->in_value) {
        p->in_value = false;
        p->field_len = 0;
    }
    if (p->field_len + len < sizeof(p->field)) {
        memcpy(p->field + p->field_len, at, len);
        p->field_len += len;
    } else {
        p->field_len = sizeof(p->field); /* too long to be ours */
    }
    return 0;
}

static int pr_on_value(http_parser *hp, const char *at, size_t len)
{
    struct ag_probe *p = hp->data;

    if (!p->in_value) {
        p->in_value = true;
        p->field_is_probe =
            p->field_len < sizeof(p->field) &&
            util_iov_ieq_str((struct iov){p->field, p->field_len}, "x-tunnel-probe");
        if (p->field_is_probe)
            p->echo_len = 0;
    }
    if (p->field_is_probe && p->echo_len + len < sizeof(p->echo)) {
        memcpy(p->echo + p->echo_len, at, len);
        p->echo_len += len;
    }
    return 0;
}

static int pr_on_body(http_parser *hp, const char *at, size_t len)
{
    struct ag_probe *p = hp->data;
    size_t n = PROBE_BODY_MAX - p->body_len;

    if (len < n)
        n = len;
    memcpy(p->body + p->body_len, at, n);
    p->body_len += n;
    return 0;
}

static int pr_on_complete(http_parser *hp)
{
    struct ag_probe *p = hp->data;

    p->complete = true;
    http_parser_pause(hp, 1);
    return 0;
}

static const http_parser_settings probe_settings = {
    .on_header_field = pr_on_field,
    .on_header_value = pr_on_value,
    .on_body = pr_on_body,
    .on_message_complete = pr_on_complete,
};

static void probe_judge(struct ag_probe *p)
{
    char err[200];
    const char *nonce = p->agt->probe_nonce;
    int status = p->parser.status_code;

    if (status == 200 && p->echo_len == strlen(nonce) && p->echo_len > 0 &&
        memcmp(p->echo, nonce, p->echo_len) == 0) {
        probe_done(p, true, NULL);
        return;
    }
    if (status == 200) {
        (void)util_snprintf(err, sizeof(err), "probe: answered by something else than this agent");
    } else {
        cJSON *j;
        p->body[p->body_len] = '\0';
        j = cJSON_Parse(p->body);
        (void)util_snprintf(err, sizeof(err), "probe: HTTP %d%s%s", status,
                            cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j, "error")) ? " " : "",
                            cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j, "error"))
                                ? cJSON_GetObjectItemCaseSensitive(j, "error")->valuestring
                                : "");
        cJSON_Delete(j);
    }
    probe_done(p, false, err);
}

static void pr_on_read(struct bufferevent *bev, void *arg)
{
    struct ag_probe *p = arg;
    struct evbuffer *in = bufferevent_get_input(bev);

    while (evbuffer_get_length(in) > 0 && !p->complete) {
        struct evbuffer_iovec v;
        size_t n;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        n = http_parser_execute(&p->parser, &probe_settings, v.iov_base, v.iov_len);
        evbuffer_drain(in, n);
        if (!p->complete && HTTP_PARSER_ERRNO(&p->parser) != HPE_OK) {
            probe_done(p, false, "probe: invalid HTTP response");
            return;
        }
    }
    if (p->complete)
        probe_judge(p);
}

static void pr_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct ag_probe *p = arg;
    char err[200];

    if (what & BEV_EVENT_CONNECTED)
        return;
    if (what & BEV_EVENT_EOF) {
        http_parser_execute(&p->parser, &probe_settings, NULL, 0);
        if (p->complete) {
            probe_judge(p);
            return;
        }
    }
    if (p->agt->ctx->ssl_ctx != NULL) {
        SSL *ssl = bufferevent_openssl_get_ssl(bev);
        long vr = ssl != NULL ? SSL_get_verify_result(ssl) : X509_V_OK;
        tls_drain_errors();
        if (vr != X509_V_OK) {
            (void)util_snprintf(err, sizeof(err), "probe: TLS verification failed for %s: %s",
                                p->host, X509_verify_cert_error_string(vr));
            probe_done(p, false, err);
            return;
        }
    }
    probe_done(p, false,
               (what & BEV_EVENT_EOF) ? "probe: connection closed" : "probe: connection error");
}

static void pr_on_timeout(evutil_socket_t fd, short what, void *arg)
{
    probe_done(arg, false, "probe: timed out");
}

static void pr_on_dialled(void *arg, evutil_socket_t fd, const char *err)
{
    struct ag_probe *p = arg;
    struct ag_ctx *ctx = p->agt->ctx;
    char e[200];

    p->dial = NULL;
    if (fd < 0) {
        (void)util_snprintf(e, sizeof(e), "probe: %s", err);
        probe_done(p, false, e);
        return;
    }
    if (ctx->ssl_ctx != NULL) {
        SSL *ssl = SSL_new(ctx->ssl_ctx);
        if (ssl == NULL || tls_client_prepare(ssl, p->host) != 0) {
            SSL_free(ssl);
            evutil_closesocket(fd);
            probe_done(p, false, "probe: TLS setup failed");
            return;
        }
        p->bev = bufferevent_openssl_socket_new(ctx->base, fd, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
        if (p->bev != NULL)
            bufferevent_openssl_set_allow_dirty_shutdown(p->bev, 1);
    } else {
        p->bev =
            bufferevent_socket_new(ctx->base, fd, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
    }
    if (p->bev == NULL) {
        evutil_closesocket(fd);
        probe_done(p, false, "probe: out of memory");
        return;
    }
    bufferevent_setcb(p->bev, pr_on_read, NULL, pr_on_event, p);
    if (evbuffer_add_printf(bufferevent_get_output(p->bev),
                            "GET / HTTP/1.1\r\nHost: %s\r\nX-Tunnel-Probe: %s\r\n"
                            "User-Agent: tunnel-agent-probe\r\nConnection: close\r\n\r\n",
                            p->host_port, p->agt->probe_nonce) < 0) {
        probe_done(p, false, "probe: out of memory");
        return;
    }
    bufferevent_enable(p->bev, EV_READ | EV_WRITE);
}

/* Splits the public URL into Host (name[:port]) and the bare name. */
static int parse_url(const char *url, char *host_port, char *host, size_t len)
{
    const char *s = strstr(url, "://");
    const char *end;
    size_t n;

    if (s == NULL)
        return -1;
    s += 3;
    end = s + strcspn(s, "/?#");
    n = (size_t)(end - s);
    if (n == 0 || n >= len)
        return -1;
    memcpy(host_port, s, n);
    host_port[n] = '\0';
    if (host_port[0] == '[') {
        const char *rb = strchr(host_port, ']');
        if (rb == NULL)
            return -1;
        n = (size_t)(rb - host_port - 1);
        memcpy(host, host_port + 1, n);
    } else {
        n = strcspn(host_port, ":");
        memcpy(host, host_port, n);
    }
    host[n] = '\0';
    return 0;
}

struct ag_probe *ag_probe_start(struct ag_agt *a, const struct ag_probe_cbs *cb, void *arg)
{
    struct ag_ctx *ctx = a->ctx;
    struct ag_probe *p = calloc(1, sizeof(*p));
    struct timeval tv = {PROBE_TIMEOUT_S, 0};
    uint8_t raw[16];

    if (p == NULL)
        return NULL;
    p->agt = a;
    p->cb = cb;
    p->arg = arg;
    p->start_ms = clk_mono_ms(ctx->clk);
    http_parser_init(&p->parser, HTTP_RESPONSE);
    p->parser.data = p;
    if (parse_url(a->url, p->host_port, p->host, sizeof(p->host)) != 0 ||
        clk_rand(ctx->clk, raw, sizeof(raw)) != 0)
        goto fail_p;
    p->timeout_ev = evtimer_new(ctx->base, pr_on_timeout, p);
    if (p->timeout_ev == NULL)
        goto fail_p;
    util_hex_encode(raw, sizeof(raw), a->probe_nonce);
    evtimer_add(p->timeout_ev, &tv);
    p->dial = ag_pxy_dial_start(ctx->base, ctx->dns, &ctx->opts->proxy, ctx->opts->gateway.host,
                                ctx->opts->gateway.port, PROBE_TIMEOUT_S * 1000u, pr_on_dialled, p);
    if (p->dial == NULL)
        goto fail_nonce;
    return p;

fail_nonce:
    a->probe_nonce[0] = '\0';
    event_free(p->timeout_ev);
fail_p:
    free(p);
    return NULL;
}
