/* The gateway fuzz harness; see fz_gw.h. */
#include "fz_gw.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_h1.h"
#include "gw_ipt.h"
#include "gw_metrics.h"
#include "gw_tun.h"
#include "id.h"
#include "ws.h"

#define FZ_NOW_MS 5000000000u
#define FZ_NOW_UNIX 1700000000
#define FZ_PUMP_MAX 64

/* The harness's one agent key and its signature cache: with the fake random
 * source every tunnel gets the same nonce, so one signature serves all runs. */
static struct {
    bool ready;
    struct id_key key;
    char addr[ID_ADDR_STR_LEN + 1];
    char nonce[TUN_NONCE_HEX_LEN + 1];
    enum tun_mode mode;
    char sig[ID_SIG_STR_LEN + 1];
} fz_id;

static void fz_die(const char *what)
{
    fprintf(stderr, "fz_gw: %s\n", what);
    abort();
}

static void fz_id_init(void)
{
    uint8_t priv[32];

    if (fz_id.ready)
        return;
    for (size_t i = 0; i < sizeof(priv); i++)
        priv[i] = (uint8_t)(i + 1);
    if (id_key_from_priv(&fz_id.key, priv) != 0)
        fz_die("key");
    id_addr_to_str(fz_id.key.addr, fz_id.addr);
    fz_id.ready = true;
}

const char *fz_gw_agent_addr(void)
{
    fz_id_init();
    return fz_id.addr;
}

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
    struct fz_gw *f = arg;

    for (size_t i = 0; i < n; i++) {
        uint64_t z = (f->rnd += 0x9e3779b97f4a7c15u);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
        buf[i] = (uint8_t)(z ^ (z >> 31));
    }
    return 0;
}

static struct clk fz_clk;

void fz_gw_new(struct fz_gw *f, const char *const *extra)
{
    const char *base_argv[] = {"tunnel-gateway", "--domain", "example.com", "--no-tls",
                               "--open", "--log-level", "error", "--access-log", "off",
                               "--listen", "127.0.0.1:0"};
    char *argv[64];
    int argc = 0;
    char err[512];
    struct gw_cfg *cfg;

    fz_id_init();
    signal(SIGPIPE, SIG_IGN); /* as gw_main does: a closed peer is an error, not a death */
    memset(f, 0, sizeof(*f));
    for (size_t i = 0; i < sizeof(base_argv) / sizeof(base_argv[0]); i++)
        argv[argc++] = (char *)base_argv[i];
    for (size_t i = 0; extra != NULL && extra[i] != NULL && argc < 63; i++)
        argv[argc++] = (char *)extra[i];
    argv[argc] = NULL;
    cfg = calloc(1, sizeof(*cfg));
    if (cfg == NULL)
        fz_die("oom");
    if (gw_cfg_load(cfg, argc, argv, err, sizeof(err)) != 0) {
        fprintf(stderr, "fz_gw: gw_cfg_load: %s\n", err);
        abort();
    }
    fz_clk = (struct clk){fz_mono, fz_unix, fz_rand, f};
    f->rnd = 42;
    f->ctx = gw_ctx_new(cfg, &fz_clk, err, sizeof(err));
    if (f->ctx == NULL) {
        fprintf(stderr, "fz_gw: gw_ctx_new: %s\n", err);
        abort();
    }
    if (gw_metrics_start(f->ctx, err, sizeof(err)) != 0) {
        fprintf(stderr, "fz_gw: gw_metrics_start: %s\n", err);
        abort();
    }
    f->agent.fd = -1;
}

void fz_gw_free(struct fz_gw *f)
{
    struct fz_agent *a = &f->agent;

    /* the agent's WebSocket runs on the gateway's loop: it goes first */
    ws_free(a->ws);
    a->ws = NULL;
    gw_ctx_free(f->ctx);
    f->ctx = NULL;
    for (int i = 0; i < f->ncli; i++) {
        if (f->cli[i].fd >= 0)
            close(f->cli[i].fd);
        free(f->cli[i].pending);
    }
    if (a->fd >= 0)
        close(a->fd);
    for (int i = 0; i < a->ntexts; i++)
        free(a->texts[i]);
    if (a->bin != NULL)
        evbuffer_free(a->bin);
}

static void fz_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl == -1 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) == -1)
        fz_die("fcntl");
}

static void fz_pair(int sv[2])
{
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        fz_die("socketpair");
    fz_nonblock(sv[0]);
    fz_nonblock(sv[1]);
}

/* ---- public clients ---- */

int fz_gw_client(struct fz_gw *f, const void *data, size_t len)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(40000)};
    struct fz_client *c;
    struct bufferevent *bev;
    int sv[2];

    if (f->ncli >= FZ_MAX_CLIENTS)
        fz_die("too many clients");
    inet_pton(AF_INET, "198.51.100.3", &sin.sin_addr);
    fz_pair(sv);
    c = &f->cli[f->ncli];
    memset(c, 0, sizeof(*c));
    c->fd = sv[0];
    bev = bufferevent_socket_new(f->ctx->base, sv[1], BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL)
        fz_die("bufferevent");
    if (!gw_ipt_conn_acquire(f->ctx->ipt, (struct sockaddr *)&sin, 0))
        fz_die("ipt");
    if (gw_h1_start(f->ctx, bev, (struct sockaddr *)&sin, sizeof(sin), "http",
                    gw_next_id(f->ctx)) != 0)
        fz_die("gw_h1_start");
    fz_gw_client_send(f, f->ncli, data, len);
    return f->ncli++;
}

static void fz_client_flush(struct fz_gw *f, struct fz_client *c)
{
    while (c->fd >= 0 && c->pending_len > 0) {
        ssize_t n = write(c->fd, c->pending, c->pending_len);
        if (n <= 0)
            return; /* full (EAGAIN) or the gateway closed: try later / drop */
        memmove(c->pending, c->pending + n, c->pending_len - (size_t)n);
        c->pending_len -= (size_t)n;
        f->moved += (uint64_t)n;
    }
}

void fz_gw_client_send(struct fz_gw *f, int i, const void *data, size_t len)
{
    struct fz_client *c = &f->cli[i];
    uint8_t *p;

    if (len == 0 || c->fd < 0)
        return;
    p = realloc(c->pending, c->pending_len + len);
    if (p == NULL)
        fz_die("oom");
    memcpy(p + c->pending_len, data, len);
    c->pending = p;
    c->pending_len += len;
    fz_client_flush(f, c);
}

void fz_gw_client_close(struct fz_gw *f, int i)
{
    struct fz_client *c = &f->cli[i];

    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->pending_len = 0;
}

/* Reads and drops what the gateway sent the client. */
static void fz_client_read(struct fz_gw *f, struct fz_client *c)
{
    char buf[16384];

    while (c->fd >= 0) {
        ssize_t n = read(c->fd, buf, sizeof(buf));
        if (n <= 0)
            return;
        c->bytes_in += (uint64_t)n;
        f->moved += (uint64_t)n;
        if (getenv("FZ_VERBOSE") != NULL)
            fprintf(stderr, "[client %d] %.*s\n", (int)(c - f->cli), (int)n, buf);
    }
}

/* ---- the agent side of a tunnel ---- */

static void fz_agent_send_auth(struct fz_agent *a, const char *nonce)
{
    static struct tun_msg m; /* ~20 KiB */
    char text[TUN_SIGNED_TEXT_MAX];
    uint8_t sig[ID_SIG_LEN];
    char *json;
    size_t len;
    int n;

    if (!fz_id.ready || strcmp(fz_id.nonce, nonce) != 0 || fz_id.mode != a->mode ||
        fz_id.sig[0] == '\0') {
        if (a->mode == TUN_MODE_NATIVE)
            n = tun_msg_native_signed_text(text, sizeof(text), "example.com", fz_id.key.addr,
                                           nonce, FZ_NOW_UNIX);
        else
            n = tun_msg_osaurus_signed_text(text, sizeof(text), fz_id.addr, nonce, FZ_NOW_UNIX);
        if (n < 0 || id_sign(&fz_id.key, text, (size_t)n, sig) != 0)
            fz_die("sign");
        id_sig_to_str(sig, fz_id.sig);
        snprintf(fz_id.nonce, sizeof(fz_id.nonce), "%s", nonce);
        fz_id.mode = a->mode;
    }
    tun_msg_init(&m, TUN_MSG_AUTH, a->mode);
    snprintf(m.auth.nonce, sizeof(m.auth.nonce), "%s", nonce);
    m.auth.timestamp = FZ_NOW_UNIX;
    m.auth.features = a->features;
    if (a->mode == TUN_MODE_NATIVE)
        snprintf(m.auth.instance, sizeof(m.auth.instance), "%s",
                 "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9");
    m.auth.n_agents = 1;
    memcpy(m.auth.agents[0].addr, fz_id.key.addr, ID_ADDR_LEN);
    snprintf(m.auth.agents[0].addr_str, sizeof(m.auth.agents[0].addr_str), "%s", fz_id.addr);
    snprintf(m.auth.agents[0].sig, sizeof(m.auth.agents[0].sig), "%s", fz_id.sig);
    json = tun_msg_encode(&m, &len);
    if (json == NULL)
        fz_die("encode auth");
    ws_send_text(a->ws, json, len);
    free(json);
}

static void fz_agent_on_text(void *arg, const char *data, size_t len)
{
    static struct tun_msg m;
    struct fz_agent *a = arg;

    a->f->moved += len + 1;
    if (getenv("FZ_VERBOSE") != NULL)
        fprintf(stderr, "[agent text] %.*s\n", (int)len, data);
    if (tun_msg_decode(data, len, a->mode, &m, NULL) != 0) {
        tun_msg_clear(&m);
        return;
    }
    if (m.type == TUN_MSG_CHALLENGE && !a->live)
        fz_agent_send_auth(a, m.challenge.nonce);
    else if (m.type == TUN_MSG_AUTH_OK)
        a->live = true;
    else if (a->live && a->ntexts < FZ_MAX_TEXTS) {
        a->texts[a->ntexts] = strndup(data, len);
        if (a->texts[a->ntexts] != NULL)
            a->ntexts++;
    }
    if (m.type == TUN_MSG_REQUEST && a->nreq_ids < 4)
        snprintf(a->req_ids[a->nreq_ids++], sizeof(a->req_ids[0]), "%s", m.http.id);
    tun_msg_clear(&m);
}

static int fz_agent_on_binary(void *arg, const uint8_t *data, size_t len)
{
    struct fz_agent *a = arg;

    a->bytes_in += len;
    a->f->moved += len;
    if (a->bin != NULL)
        evbuffer_add(a->bin, data, len);
    return 0;
}

static void fz_agent_on_close(void *arg, int code, const char *reason)
{
    struct fz_agent *a = arg;

    a->closed = true;
    a->f->moved++;
}

static void fz_agent_on_writable(void *arg)
{
}

static const struct ws_callbacks fz_agent_cbs = {
    .on_text = fz_agent_on_text,
    .on_binary = fz_agent_on_binary,
    .on_close = fz_agent_on_close,
    .on_writable = fz_agent_on_writable,
};

/* Waits for the 101 head on the raw socket, then hands the socket to a
 * client-role WebSocket (the rest of the input stays in its buffer). */
static void fz_agent_upgrade(struct fz_gw *f)
{
    struct fz_agent *a = &f->agent;
    struct bufferevent *bev;
    char buf[4096];
    ssize_t n;
    char *end;

    if (a->fd < 0 || a->ws != NULL)
        return;
    n = recv(a->fd, buf, sizeof(buf) - 1, MSG_PEEK);
    if (n <= 0)
        return;
    buf[n] = '\0';
    end = strstr(buf, "\r\n\r\n");
    if (end == NULL)
        return;
    if (read(a->fd, buf, (size_t)(end + 4 - buf)) != end + 4 - buf)
        fz_die("read 101");
    bev = bufferevent_socket_new(f->ctx->base, a->fd, BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL)
        fz_die("bufferevent");
    a->fd = -1;
    a->ws = ws_conn_new(f->ctx->base, bev, true, TUN_OSR_MAX_FRAME_BYTES, &fz_agent_cbs, a);
    if (a->ws == NULL)
        fz_die("ws_conn_new");
    f->moved++;
}

bool fz_gw_tunnel(struct fz_gw *f, const struct gw_tun_proto *proto)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(50000)};
    struct fz_agent *a = &f->agent;
    struct bufferevent *bev;
    int sv[2];

    inet_pton(AF_INET, "192.0.2.7", &sin.sin_addr);
    a->f = f;
    a->mode = proto->mode;
    if (getenv("FZ_DUMP") != NULL)
        a->bin = evbuffer_new();
    fz_pair(sv);
    a->fd = sv[0];
    bev = bufferevent_socket_new(f->ctx->base, sv[1], BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL)
        fz_die("bufferevent");
    if (gw_ipt_tunnel_acquire(f->ctx->ipt, (struct sockaddr *)&sin, 0, 0, FZ_NOW_MS) != GW_IPT_OK)
        fz_die("ipt");
    if (gw_tun_accept(f->ctx, bev, (struct sockaddr *)&sin, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
                      proto, gw_next_id(f->ctx), "192.0.2.7") != 0)
        fz_die("gw_tun_accept");
    f->has_agent = true;
    fz_gw_pump(f);
    return a->live;
}

void fz_gw_agent_binary(struct fz_gw *f, const void *data, size_t len)
{
    if (f->agent.ws != NULL && !f->agent.closed && len > 0)
        ws_send_binary(f->agent.ws, data, len);
}

void fz_gw_agent_text(struct fz_gw *f, const char *data, size_t len)
{
    if (f->agent.ws != NULL && !f->agent.closed)
        ws_send_text(f->agent.ws, data, len);
}

void fz_gw_agent_close(struct fz_gw *f, int code)
{
    struct fz_agent *a = &f->agent;

    if (a->ws == NULL || a->closed)
        return;
    if (code != 0) {
        ws_close(a->ws, code, "fuzz");
        return;
    }
    ws_free(a->ws);
    a->ws = NULL;
    a->closed = true;
}

/* ---- the pump ---- */

void fz_gw_pump(struct fz_gw *f)
{
    int quiet = 0;

    for (int i = 0; i < FZ_PUMP_MAX && quiet < 3; i++) {
        uint64_t before = f->moved;
        bool busy;

        event_base_loop(f->ctx->base, EVLOOP_NONBLOCK);
        for (int k = 0; k < f->ncli; k++) {
            fz_client_flush(f, &f->cli[k]);
            fz_client_read(f, &f->cli[k]);
        }
        if (f->has_agent)
            fz_agent_upgrade(f);
        busy = f->moved != before ||
               event_base_get_num_events(f->ctx->base, EVENT_BASE_COUNT_ACTIVE) > 0;
        for (int k = 0; k < f->ncli && !busy; k++)
            busy = f->cli[k].pending_len > 0;
        quiet = busy ? 0 : quiet + 1;
    }
}
