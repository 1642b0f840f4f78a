/* libFuzzer target for the agent's side of the native tunnel (agent/ag_tun.c:
 * the HTTP/2 server session in the WebSocket's binary messages, and
 * agent/ag_fwd.c forwarding its streams to the local API): a real agent
 * context (ag_ctx_new, one enabled agent with a fixed key in a scratch home),
 * a tunnel (ag_tun_new) whose dial this file answers with a socketpair, a
 * fake gateway here (101, challenge, auth_ok) and then the input as the
 * gateway's HTTP/2 bytes (client preface, SETTINGS, HEADERS/CONTINUATION
 * with HPACK, DATA, RST_STREAM, WINDOW_UPDATE, GOAWAY, ...).
 *
 * ag_net.c is not linked: ag_net_dial_start / ag_net_dial_cancel are defined
 * here, so nothing leaves the process. The gateway's host gets the tunnel's
 * socketpair; the local API (the agent's target 127.0.0.1:9) is refused, or
 * a socketpair whose far end answers every request head with one canned
 * response; everything else (the probe of the public URL) is refused.
 *
 * The first byte chooses: bits 0-3 the message size ((n * 13) bytes, 0: the
 * whole input in one message), bits 4-5 the local API (0: refused, 1: 200
 * with Content-Length, 2: 200 chunked then close, 3: 101 WebSocket accept),
 * bit 6 the gateway closes the WebSocket at the end, bit 7 the tunnel is
 * drained (ag_tun_drain) halfway.
 *
 * FZ_DUMP=file writes what the agent sent in the tunnel (its SETTINGS and
 * responses): seeds for fuzz_tun_h2_gw.
 *
 * Built with -DFZ_OSAURUS=1 it is fuzz_osr_agent: the agent in Osaurus mode
 * (agent/ag_osr.c). The fake gateway speaks the relay's handshake (no
 * subprotocol; auth_ok grants "base64" when bit 0 of the first byte is set)
 * and the input, split at each newline, is the relay's text frames (request,
 * cancel, ping, anything); bits 4-5 choose the local API as above. */
#define _XOPEN_SOURCE 700 /* nftw, for the scratch home */
#include <ctype.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "ag_agt.h"
#include "ag_ctx.h"
#include "ag_net.h"
#include "ag_opts.h"
#include "ag_store.h"
#include "ag_tun.h"
#include "clk.h"
#include "id.h"
#include "list.h"
#include "tun_msg.h"
#include "ws.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#ifndef FZ_OSAURUS
#define FZ_OSAURUS 0
#endif
#define FZ_NAME (FZ_OSAURUS ? "fuzz_osr_agent" : "fuzz_tun_h2_agent")
#define FZ_MODE (FZ_OSAURUS ? TUN_MODE_OSAURUS : TUN_MODE_NATIVE)
#define FZ_NOW_MS 5000000000u
#define FZ_NOW_UNIX 1700000000
#define FZ_GW_HOST "gw.example.com"
#define FZ_PUMP_MAX 64
#define FZ_MAX_LOCAL 8

enum fz_local {
    FZ_LOCAL_REFUSED = 0,
    FZ_LOCAL_LENGTH,
    FZ_LOCAL_CHUNKED,
    FZ_LOCAL_WS,
};

/* One local API connection: our end of its socketpair. */
struct fz_lconn {
    int fd;
    char head[4096];  /* request bytes until the first blank line */
    size_t head_len;
    bool answered;
};

static struct fz {
    /* once per process */
    bool ready;
    char home[64];
    struct ag_store *st;
    struct ag_run_opts opts;
    /* per input */
    struct ag_ctx *ctx;
    uint64_t rnd;
    uint64_t moved;
    enum fz_local local;
    int gw_fd;                /* the gateway's end before the 101 */
    struct ws_conn *ws;       /* the gateway's WebSocket (server role) */
    bool authed;
    bool closed;
    bool base64; /* Osaurus: auth_ok grants base64 */
    struct evbuffer *bin;     /* what the agent sent in the tunnel (FZ_DUMP) */
    struct fz_lconn lc[FZ_MAX_LOCAL];
    int nlc;
} fz;

/* ---- fake clock ---- */

static uint64_t fz_mono(void *arg)
{
    return FZ_NOW_MS;
}

static int64_t fz_unix(void *arg)
{
    return FZ_NOW_UNIX;
}

static int fz_rand(void *arg, uint8_t *buf, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t z = (fz.rnd += 0x9e3779b97f4a7c15u);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
        buf[i] = (uint8_t)(z ^ (z >> 31));
    }
    return 0;
}

static const struct clk fz_clk = {fz_mono, fz_unix, fz_rand, NULL};

static void fz_die(const char *what)
{
    fprintf(stderr, "%s: %s\n", FZ_NAME, what);
    abort();
}

static void fz_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl == -1 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) == -1)
        fz_die("fcntl");
}

/* ---- ag_net, replaced: dials answered from the loop ---- */

struct ag_net_dial {
    struct event *ev;
    ag_net_dial_cb cb;
    void *arg;
    int fd;          /* handed to cb, or -1: refused */
};

static void fz_dial_on_ev(evutil_socket_t unused, short what, void *arg)
{
    struct ag_net_dial *d = arg;
    ag_net_dial_cb cb = d->cb;
    void *cb_arg = d->arg;
    int fd = d->fd;

    event_free(d->ev);
    free(d);
    fz.moved++;
    cb(cb_arg, fd, fd >= 0 ? NULL : "connection refused");
}

struct ag_net_dial *ag_net_dial_start(struct event_base *base, struct evdns_base *dns,
                                      const char *host, uint16_t port, uint64_t timeout_ms,
                                      ag_net_dial_cb cb, void *arg)
{
    struct ag_net_dial *d = calloc(1, sizeof(*d));
    int sv[2];

    if (d == NULL)
        return NULL;
    d->ev = event_new(base, -1, 0, fz_dial_on_ev, d);
    if (d->ev == NULL) {
        free(d);
        return NULL;
    }
    d->cb = cb;
    d->arg = arg;
    d->fd = -1;
    if (strcmp(host, FZ_GW_HOST) == 0 && fz.gw_fd < 0 && fz.ws == NULL) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
            fz_die("socketpair");
        fz_nonblock(sv[0]);
        fz_nonblock(sv[1]);
        fz.gw_fd = sv[0];
        d->fd = sv[1];
    } else if (strcmp(host, "127.0.0.1") == 0 && port == 9 && fz.local != FZ_LOCAL_REFUSED &&
               fz.nlc < FZ_MAX_LOCAL) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
            fz_die("socketpair");
        fz_nonblock(sv[0]);
        fz_nonblock(sv[1]);
        memset(&fz.lc[fz.nlc], 0, sizeof(fz.lc[0]));
        fz.lc[fz.nlc++].fd = sv[0];
        d->fd = sv[1];
    }
    event_active(d->ev, EV_TIMEOUT, 0);
    return d;
}

void ag_net_dial_cancel(struct ag_net_dial *d)
{
    if (d == NULL)
        return;
    if (d->fd >= 0)
        close(d->fd);
    event_free(d->ev);
    free(d);
}

/* ---- the tunnel's owner (what ag_daemon does, minus policy) ---- */

static void fz_on_up(void *arg, struct ag_tun *t)
{
}

static void fz_on_agent_online(void *arg, struct ag_tun *t, struct ag_agt *a, const char *url)
{
    ag_agt_set_online(a, url);
}

static void fz_on_agent_refused(void *arg, struct ag_tun *t, struct ag_agt *a, const char *code,
                                const char *message)
{
    ag_agt_stop(a, code);
}

static void fz_on_agent_removed(void *arg, struct ag_tun *t, struct ag_agt *a, const char *reason)
{
    ag_agt_set_offline(a);
    ag_agt_update_state(a);
}

static void fz_on_draining(void *arg, struct ag_tun *t)
{
    struct ag_ctx *ctx = fz.ctx;

    if (t != ctx->tun)
        return;
    list_insert_tail(&ctx->old, ag_tun_link(t));
    ctx->tun = NULL;
}

static void fz_on_down(void *arg, struct ag_tun *t, const char *reason, const char *auth_code)
{
    struct ag_ctx *ctx = fz.ctx;

    struct list *n, *tmp;

    if (t == ctx->tun) {
        ctx->tun = NULL;
        LIST_FOREACH_SAFE(n, tmp, &ctx->agents)
        {
            ag_agt_set_offline(AG_AGT_OF(n));
            ag_agt_update_state(AG_AGT_OF(n));
        }
    }
    ag_ctx_bury_tun(ctx, t); /* off ctx->old too */
}

static const struct ag_tun_cbs fz_tun_cbs = {
    .on_up = fz_on_up,
    .on_agent_online = fz_on_agent_online,
    .on_agent_refused = fz_on_agent_refused,
    .on_agent_removed = fz_on_agent_removed,
    .on_draining = fz_on_draining,
    .on_down = fz_on_down,
};

/* ---- the fake gateway ---- */

static void fz_gw_send(const struct tun_msg *m)
{
    size_t len;
    char *s = tun_msg_encode(m, &len);

    if (s == NULL)
        fz_die("encode");
    ws_send_text(fz.ws, s, len);
    free(s);
}

static void fz_gw_on_text(void *arg, const char *data, size_t len)
{
    static struct tun_msg m;
    static struct tun_msg ok;

    fz.moved += len + 1;
    if (tun_msg_decode(data, len, FZ_MODE, &m, NULL) != 0) {
        tun_msg_clear(&m);
        return;
    }
    if (m.type == TUN_MSG_AUTH && !fz.authed) {
        tun_msg_init(&ok, TUN_MSG_AUTH_OK, FZ_MODE);
        for (size_t i = 0; i < m.auth.n_agents && i < TUN_MAX_AGENTS; i++) {
            char lower[ID_ADDR_STR_LEN + 1];
            id_addr_to_str(m.auth.agents[i].addr, lower);
            memcpy(ok.auth_ok.agents[i].addr, m.auth.agents[i].addr, ID_ADDR_LEN);
            snprintf(ok.auth_ok.agents[i].url, sizeof(ok.auth_ok.agents[i].url),
                     "https://%s.example.com", lower);
            ok.auth_ok.n_agents++;
        }
        snprintf(ok.auth_ok.region, sizeof(ok.auth_ok.region), "fuzz");
        ok.auth_ok.ping_interval_s = 20;
        ok.auth_ok.features = fz.base64 ? TUN_FEAT_BASE64 : 0;
        fz_gw_send(&ok);
        fz.authed = true;
    }
    tun_msg_clear(&m);
}

static int fz_gw_on_binary(void *arg, const uint8_t *data, size_t len)
{
    fz.moved += len;
    if (fz.bin != NULL)
        evbuffer_add(fz.bin, data, len);
    return 0;
}

static void fz_gw_on_close(void *arg, int code, const char *reason)
{
    fz.closed = true;
    fz.moved++;
}

static void fz_gw_on_writable(void *arg)
{
}

static const struct ws_callbacks fz_gw_cbs = {
    .on_text = fz_gw_on_text,
    .on_binary = fz_gw_on_binary,
    .on_close = fz_gw_on_close,
    .on_writable = fz_gw_on_writable,
};

/* The agent's upgrade request on the raw socket: answer 101, then run a
 * server-role WebSocket and send the challenge. */
static void fz_gw_upgrade(void)
{
    static const char hdr[] = "sec-websocket-key:";
    char buf[4096];
    char low[4096];
    char accept[29];
    char resp[512];
    struct tun_msg m;
    struct bufferevent *bev;
    const char *k;
    const char *end;
    ssize_t n;
    int rn;

    if (fz.gw_fd < 0 || fz.ws != NULL)
        return;
    n = recv(fz.gw_fd, buf, sizeof(buf) - 1, MSG_PEEK);
    if (n <= 0)
        return;
    buf[n] = '\0';
    end = strstr(buf, "\r\n\r\n");
    if (end == NULL)
        return;
    if (read(fz.gw_fd, buf, (size_t)(end + 4 - buf)) != end + 4 - buf)
        fz_die("read upgrade");
    /* the name is matched in a lowercase copy; the value (base64) is read as sent */
    for (size_t i = 0; i <= (size_t)(end + 4 - buf); i++)
        low[i] = (char)tolower((unsigned char)buf[i]);
    k = strstr(low, hdr);
    if (k == NULL)
        fz_die("no key");
    k = buf + (k - low);
    k += sizeof(hdr) - 1;
    while (*k == ' ')
        k++;
    if (ws_accept_key(k, strcspn(k, "\r"), accept) != 0)
        fz_die("accept");
    rn = snprintf(resp, sizeof(resp),
                  "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n",
                  accept, FZ_OSAURUS ? "" : "Sec-WebSocket-Protocol: " AG_TUN_SUBPROTOCOL "\r\n");
    if (write(fz.gw_fd, resp, (size_t)rn) != rn)
        fz_die("write 101");
    bev = bufferevent_socket_new(fz.ctx->base, fz.gw_fd, BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL)
        fz_die("bufferevent");
    fz.gw_fd = -1;
    fz.ws = ws_conn_new(fz.ctx->base, bev, false,
                        FZ_OSAURUS ? TUN_OSR_MAX_FRAME_BYTES : TUN_CTL_MAX_BYTES, &fz_gw_cbs,
                        NULL);
    if (fz.ws == NULL)
        fz_die("ws_conn_new");
    tun_msg_init(&m, TUN_MSG_CHALLENGE, FZ_MODE);
    memset(m.challenge.nonce, 'a', TUN_NONCE_HEX_LEN);
    m.challenge.expires_in_s = 30;
    fz_gw_send(&m);
    fz.moved++;
}

/* ---- the fake local API ---- */

static void fz_local_serve(struct fz_lconn *c)
{
    static const char *const answers[] = {
        "",
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
        "Connection: keep-alive\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi",
    };
    char buf[8192];
    ssize_t n;

    if (c->fd < 0)
        return;
    n = read(c->fd, buf, sizeof(buf));
    if (n == 0) {
        close(c->fd);
        c->fd = -1;
        fz.moved++;
        return;
    }
    if (n < 0)
        return;
    fz.moved += (uint64_t)n;
    if (c->answered && fz.local == FZ_LOCAL_LENGTH) {
        c->answered = false; /* keep-alive: the next request */
        c->head_len = 0;
    }
    if (c->answered)
        return;
    for (ssize_t i = 0; i < n && c->head_len < sizeof(c->head) - 1; i++)
        c->head[c->head_len++] = buf[i];
    c->head[c->head_len] = '\0';
    if (strstr(c->head, "\r\n\r\n") == NULL)
        return;
    c->answered = true;
    if (write(c->fd, answers[fz.local], strlen(answers[fz.local])) < 0)
        return;
    if (fz.local == FZ_LOCAL_CHUNKED) {
        close(c->fd);
        c->fd = -1;
    }
}

/* ---- per input ---- */

static void fz_pump(void)
{
    int quiet = 0;

    for (int i = 0; i < FZ_PUMP_MAX && quiet < 3; i++) {
        uint64_t before = fz.moved;

        event_base_loop(fz.ctx->base, EVLOOP_NONBLOCK);
        fz_gw_upgrade();
        for (int k = 0; k < fz.nlc; k++)
            fz_local_serve(&fz.lc[k]);
        if (fz.moved != before ||
            event_base_get_num_events(fz.ctx->base, EVENT_BASE_COUNT_ACTIVE) > 0)
            quiet = 0;
        else
            quiet++;
    }
}

static int fz_rm(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

/* The scratch home goes with the process. */
static void fz_cleanup(void)
{
    ag_store_free(fz.st);
    fz.st = NULL;
    nftw(fz.home, fz_rm, 8, FTW_DEPTH | FTW_PHYS);
}

static void fz_init(void)
{
    static const char key_hex[] =
        "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20\n";
    char err[AG_STORE_ERR_LEN];
    char key_path[128];
    struct ag_agent *a;
    FILE *fp;
    int fd;

    if (fz.ready)
        return;
    signal(SIGPIPE, SIG_IGN); /* as ag_daemon does */
    snprintf(fz.home, sizeof(fz.home), "/tmp/%s.XXXXXX", FZ_NAME);
    if (mkdtemp(fz.home) == NULL)
        fz_die("mkdtemp");
    snprintf(key_path, sizeof(key_path), "%s.key", fz.home);
    fd = open(key_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    fp = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (fp == NULL || fputs(key_hex, fp) < 0 || fclose(fp) != 0)
        fz_die("key file");
    fz.st = ag_store_open(fz.home, AG_STORE_WRITE, err, sizeof(err));
    if (fz.st == NULL || ag_store_new_agent(fz.st, "fz", "http://127.0.0.1:9/base", key_path, &a,
                                            err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: store: %s\n", FZ_NAME, err);
        abort();
    }
    unlink(key_path);
    atexit(fz_cleanup);
    a->enabled = true;
    if (ag_store_save(fz.st, err, sizeof(err)) != 0)
        fz_die(err);
    snprintf(fz.opts.gateway_url, sizeof(fz.opts.gateway_url), "ws://" FZ_GW_HOST ":80");
    if (ag_store_gateway_parse(fz.opts.gateway_url, &fz.opts.gateway, err, sizeof(err)) != 0)
        fz_die(err);
    fz.opts.protocol = FZ_OSAURUS ? AG_PROTO_OSAURUS : AG_PROTO_NATIVE;
    fz.opts.log_level = LOG_LVL_ERROR;
    fz.opts.log_format = LOG_FMT_TEXT;
    fz.ready = true;
}

static void fz_dump(void)
{
    const char *path = getenv("FZ_DUMP");
    FILE *fp;

    if (path == NULL || fz.bin == NULL)
        return;
    fp = fopen(path, "wb");
    if (fp == NULL)
        return;
    fwrite(evbuffer_pullup(fz.bin, -1), 1, evbuffer_get_length(fz.bin), fp);
    fclose(fp);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t cfg;
    size_t piece;
    size_t half;

    if (size < 1)
        return 0;
    fz_init();
    cfg = data[0];
    data++;
    size--;
    piece = (cfg & 15) != 0 ? (size_t)(cfg & 15) * 13 : size;
    half = size / 2;
    fz.rnd = 7;
    fz.moved = 0;
    fz.local = (enum fz_local)((cfg >> 4) & 3);
    fz.gw_fd = -1;
    fz.ws = NULL;
    fz.authed = false;
    fz.closed = false;
    fz.base64 = (cfg & 1) != 0;
    fz.nlc = 0;
    fz.bin = getenv("FZ_DUMP") != NULL ? evbuffer_new() : NULL;
    fz.ctx = ag_ctx_new(fz.home, &fz.opts, &fz_clk);
    if (fz.ctx == NULL)
        fz_die("ag_ctx_new");
    if (ag_agt_add(fz.ctx, fz.st, ag_store_agent(fz.st, 0)) == NULL)
        fz_die("ag_agt_add");
    fz.ctx->tun = ag_tun_new(fz.ctx, &fz_tun_cbs, NULL);
    if (fz.ctx->tun == NULL)
        fz_die("ag_tun_new");
    fz_pump();
    if (!fz.authed)
        fz_die("the agent did not authenticate");
    if (FZ_OSAURUS) {
        /* one text frame per line; invalid UTF-8 is refused by ws_send_text */
        const uint8_t *p = data;
        const uint8_t *end = data + size;
        bool drained = false;
        while (p < end) {
            const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
            size_t n = nl != NULL ? (size_t)(nl - p) : (size_t)(end - p);
            if (fz.ws != NULL && !fz.closed)
                ws_send_text(fz.ws, (const char *)p, n);
            fz_pump();
            p += n + (nl != NULL);
            if (!drained && (size_t)(p - data) > half && (cfg & 0x80) && fz.ctx->tun != NULL) {
                ag_tun_drain(fz.ctx->tun);
                drained = true;
            }
        }
        size = 0; /* the binary loop below has nothing to do */
    }
    for (size_t off = 0; off < size; off += piece) {
        size_t n = size - off < piece ? size - off : piece;
        bool crossed = off <= half && off + n > half;
        if (fz.ws != NULL && !fz.closed)
            ws_send_binary(fz.ws, data + off, n);
        fz_pump();
        if (crossed && (cfg & 0x80) && fz.ctx->tun != NULL)
            ag_tun_drain(fz.ctx->tun);
    }
    if ((cfg & 0x40) && fz.ws != NULL && !fz.closed)
        ws_close(fz.ws, 1001, "fuzz");
    fz_pump();
    fz_dump();

    ws_free(fz.ws); /* on the agent's loop: before the context */
    fz.ws = NULL;
    ag_ctx_free(fz.ctx);
    fz.ctx = NULL;
    if (fz.gw_fd >= 0)
        close(fz.gw_fd);
    for (int k = 0; k < fz.nlc; k++) {
        if (fz.lc[k].fd >= 0)
            close(fz.lc[k].fd);
    }
    if (fz.bin != NULL)
        evbuffer_free(fz.bin);
    fz.bin = NULL;
    return 0;
}
