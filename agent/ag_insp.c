/* The agent's local inspector (ag_insp.h): an evhttp server in the daemon's
 * loop over the capture ring. Every request passes one gate (insp_admit):
 * 1. the peer is loopback, or --inspect-allow-remote and it shows the token;
 * 2. the Host is this listener's own (127.0.0.1 / localhost / [::1] :PORT),
 *    so a DNS-rebound name cannot reach the API (token holders excepted);
 * 3. an Origin, if sent, is http:// + that Host, and Sec-Fetch-Site, if
 *    sent, is same-origin or none: no other page can read or replay (no
 *    CORS header is ever sent, so preflights fail too).
 * Live updates go to server-sent-event clients (struct insp_sse). Their
 * requests stay open; evhttp detaches one whose client left and reports the
 * close (insp_sse_on_close), and reap_ev finishes it from the loop.
 * Replays (struct insp_replay) are plain ag_fwd requests with no stream
 * behind them; their capture is an entry marked replay_of. */
#include "ag_insp.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "ag_agt.h"
#include "ag_ctx.h"
#include "ag_insp_page.h"
#include "ag_insp_ring.h"
#include "list.h"
#include "log.h"
#include "util.h"

#define INSP_HTTP_TIMEOUT_S 3600 /* idle connections (SSE ones included) */
#define INSP_SSE_MAX 32          /* live-update clients at once */
#define INSP_SSE_OUT_MAX (1u << 20) /* a client this far behind is dropped */
#define INSP_REPLAY_MAX 32       /* replays in flight at once */
#define INSP_MAX_HDRS 256
#define INSP_PATH_MAX 8192
#define INSP_LIST_LIMIT 1000
#define INSP_COOKIE "tg_inspect"

/* One live-update client: GET /api/events. Owned by ins->sse. */
struct insp_sse {
    struct list link;
    struct ag_insp *ins;
    struct evhttp_request *req;    /* open reply; finished by reap */
    struct evhttp_connection *con; /* NULL once evhttp reported the close */
    bool closed;                   /* to be finished by reap */
};

/* One replay in flight. Owned by ins->replays. */
struct insp_replay {
    struct list link;
    struct ag_insp *ins;
    struct ag_agt *agt; /* a reference */
    struct ag_fwd *fwd; /* NULL once it reported its end */
    bool done;
};

struct ag_insp {
    struct ag_ctx *ctx; /* back-pointer */
    const struct ag_insp_opts *opts;
    struct evhttp *http;
    uint16_t port;            /* bound */
    char hosts[3][80];        /* accepted Host values */
    struct ag_insp_ring *ring;
    struct list sse;          /* struct insp_sse */
    size_t nsse;
    struct list replays;      /* struct insp_replay */
    size_t nreplays;
    struct event *reap_ev;    /* finishes closed SSE clients and ended replays */
    uint64_t replay_of;       /* set around our own ag_fwd_start(): marks its capture */
    uint64_t last_begun;      /* id of the entry begun last */
    int64_t base_unix_ms;     /* wall clock at start, for entry times in ms */
    uint64_t base_mono_ms;    /* the monotonic clock then */
};

/* ---- options -------------------------------------------------------------------- */

static bool host_is_loopback_literal(const char *h)
{
    struct in_addr a4;
    struct in6_addr a6;

    if (inet_pton(AF_INET, h, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, h, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6);
    return false;
}

static int read_token(const char *path, char *out, size_t outlen, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    char buf[300];
    ssize_t n;
    size_t len = 0;

    if (fd == -1) {
        (void)util_snprintf(err, errlen, "--inspect-token-file %s: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) == -1 || (st.st_mode & 077) != 0) {
        (void)util_snprintf(err, errlen,
                            "--inspect-token-file %s: must not be readable by group or others "
                            "(chmod 600)",
                            path);
        close(fd);
        return -1;
    }
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n < 0)
        n = 0;
    while (len < (size_t)n && buf[len] != '\n' && buf[len] != '\r')
        len++;
    for (size_t i = 0; i < len; i++)
        if (buf[i] <= ' ' || buf[i] > '~')
            len = 0;
    if (len < 16 || len >= outlen || len > 256) {
        (void)util_snprintf(err, errlen,
                            "--inspect-token-file %s: the first line must be 16-256 printable "
                            "characters without spaces",
                            path);
        OPENSSL_cleanse(buf, sizeof(buf));
        return -1;
    }
    memcpy(out, buf, len);
    out[len] = '\0';
    OPENSSL_cleanse(buf, sizeof(buf));
    return 0;
}

int ag_insp_parse_opts(const char *inspect, const char *max, const char *body, bool allow_remote,
                       const char *token_file, const char *save_dir, struct ag_insp_opts *o,
                       char *err, size_t errlen)
{
    uint64_t v;

    memset(o, 0, sizeof(*o));
    o->max_entries = AG_INSP_DEFAULT_MAX;
    o->body_bytes = AG_INSP_DEFAULT_BODY_BYTES;
    o->allow_remote = allow_remote;
    if (inspect == NULL) {
        if (max != NULL || body != NULL || allow_remote || token_file != NULL ||
            save_dir != NULL) {
            (void)util_snprintf(err, errlen, "--inspect-* options need --inspect");
            return -1;
        }
        return 0;
    }
    o->enabled = true;
    (void)util_snprintf(o->host, sizeof(o->host), "127.0.0.1");
    o->port = AG_INSP_DEFAULT_PORT;
    if (inspect[0] != '\0') {
        const char *colon = strrchr(inspect, ':');
        const char *port = colon != NULL ? colon + 1 : inspect;
        if (colon != NULL) {
            const char *h = inspect;
            size_t hl = (size_t)(colon - inspect);
            if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
                h++;
                hl -= 2;
            }
            if (hl == 0 || hl >= sizeof(o->host)) {
                (void)util_snprintf(err, errlen, "--inspect \"%s\": want [ADDR:]PORT", inspect);
                return -1;
            }
            memcpy(o->host, h, hl);
            o->host[hl] = '\0';
        }
        if (util_parse_uint(port, 65535, &v) != 0) {
            (void)util_snprintf(err, errlen, "--inspect \"%s\": want [ADDR:]PORT (PORT 0-65535)",
                                inspect);
            return -1;
        }
        o->port = (uint16_t)v;
    }
    {
        struct in_addr a4;
        struct in6_addr a6;
        if (inet_pton(AF_INET, o->host, &a4) != 1 && inet_pton(AF_INET6, o->host, &a6) != 1) {
            (void)util_snprintf(err, errlen, "--inspect: \"%s\" is not a numeric IP address",
                                o->host);
            return -1;
        }
    }
    if (!host_is_loopback_literal(o->host) && !allow_remote) {
        (void)util_snprintf(err, errlen,
                            "--inspect %s: not a loopback address; the inspector shows every "
                            "request and can replay them, so this needs --inspect-allow-remote "
                            "and --inspect-token-file",
                            inspect);
        return -1;
    }
    if (max != NULL) {
        if (util_parse_uint(max, 100000, &v) != 0 || v == 0) {
            (void)util_snprintf(err, errlen, "--inspect-max \"%s\": want 1-100000", max);
            return -1;
        }
        o->max_entries = (size_t)v;
    }
    if (body != NULL) {
        if (util_parse_uint(body, 64u * 1024u * 1024u, &v) != 0) {
            (void)util_snprintf(err, errlen, "--inspect-body-bytes \"%s\": want 0-67108864", body);
            return -1;
        }
        o->body_bytes = (size_t)v;
    }
    if (token_file != NULL && read_token(token_file, o->token, sizeof(o->token), err, errlen) != 0)
        return -1;
    if (save_dir != NULL && (save_dir[0] == '\0' ||
                             util_snprintf(o->save_dir, sizeof(o->save_dir), "%s", save_dir) < 0)) {
        (void)util_snprintf(err, errlen, "--inspect-save: want a directory");
        return -1;
    }
    if (allow_remote && o->token[0] == '\0') {
        (void)util_snprintf(err, errlen, "--inspect-allow-remote needs --inspect-token-file");
        return -1;
    }
    return 0;
}

/* ---- live updates ---------------------------------------------------------------- */

static void insp_reap_soon(struct ag_insp *ins) { event_active(ins->reap_ev, 0, 0); }

static void sse_on_close(struct evhttp_connection *con, void *arg)
{
    struct insp_sse *s = arg;

    /* evhttp detached our unfinished request from con and frees con next */
    s->con = NULL;
    s->closed = true;
    insp_reap_soon(s->ins);
}

/* Frees s and its request: with the connection if that is still there,
 * else (evhttp detached the unfinished request) by finishing the reply. */
static void sse_free(struct insp_sse *s)
{
    list_unlink(&s->link);
    s->ins->nsse--;
    if (s->con != NULL) {
        evhttp_connection_set_closecb(s->con, NULL, NULL);
        evhttp_connection_free(s->con);
    } else {
        evhttp_send_reply_end(s->req);
    }
    free(s);
}

static void sse_send(struct insp_sse *s, const char *event, const char *data)
{
    struct evbuffer *b;
    struct bufferevent *bev;

    if (s->closed || s->con == NULL)
        return;
    bev = evhttp_connection_get_bufferevent(s->con);
    if (bev != NULL && evbuffer_get_length(bufferevent_get_output(bev)) > INSP_SSE_OUT_MAX) {
        s->closed = true; /* too far behind: it reconnects and catches up */
        insp_reap_soon(s->ins);
        return;
    }
    b = evbuffer_new();
    if (b == NULL)
        return;
    if (evbuffer_add_printf(b, "event: %s\ndata: %s\n\n", event, data) >= 0)
        evhttp_send_reply_chunk(s->req, b);
    evbuffer_free(b);
}

static void insp_broadcast(struct ag_insp *ins, const char *event, cJSON *data)
{
    char *text;
    struct list *n, *tmp;

    if (data == NULL)
        return;
    text = ins->nsse > 0 ? cJSON_PrintUnformatted(data) : NULL;
    cJSON_Delete(data);
    if (text == NULL)
        return;
    LIST_FOREACH_SAFE(n, tmp, &ins->sse)
    {
        sse_send(LIST_ENTRY(n, struct insp_sse, link), event, text);
    }
    free(text);
}

static void insp_notify(struct ag_insp *ins, const struct ag_insp_ent *e)
{
    if (ins->nsse > 0)
        insp_broadcast(ins, "entry", ag_insp_ring_summary_json(e));
}

/* ---- --inspect-save ---------------------------------------------------------------
 * DIR/<id>.json (the entry, ag_insp_ring_save_json) with DIR/<id>.req and
 * DIR/<id>.resp (the kept body bytes), each 0600, written to a temporary
 * name and renamed; the .json goes last, so a crash leaves no half entry.
 * Loaded at start in id order; an evicted or cleared entry's files go. */

#define INSP_SAVE_JSON_MAX (4u << 20)

static int save_path(const struct ag_insp *ins, char *out, size_t len, uint64_t id,
                     const char *ext)
{
    return util_snprintf(out, len, "%s/%llu.%s", ins->opts->save_dir, (unsigned long long)id,
                         ext);
}

/* Writes len bytes to path via path.tmp. Returns 0, or -1 with errno. */
static int write_file(const char *path, const void *data, size_t len)
{
    char tmp[PATH_MAX + 8];
    const char *p = data;
    int fd;

    if (util_snprintf(tmp, sizeof(tmp), "%s.tmp", path) < 0) {
        errno = ENAMETOOLONG;
        return -1;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd == -1)
        return -1;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n == -1 && errno == EINTR)
            continue;
        if (n <= 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            errno = e;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    if (close(fd) == -1 || rename(tmp, path) == -1) {
        int e = errno;
        unlink(tmp);
        errno = e;
        return -1;
    }
    return 0;
}

/* Reads at most max bytes of path into a new buffer. Returns 0, 1 (no such
 * file: *out NULL, *len 0) or -1. */
static int read_file(const char *path, size_t max, uint8_t **out, size_t *len)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    uint8_t *buf;
    size_t got = 0;

    *out = NULL;
    *len = 0;
    if (fd == -1)
        return errno == ENOENT ? 1 : -1;
    buf = malloc(max + 1);
    if (buf == NULL) {
        close(fd);
        return -1;
    }
    while (got < max) {
        ssize_t n = read(fd, buf + got, max - got);
        if (n == -1 && errno == EINTR)
            continue;
        if (n == -1) {
            free(buf);
            close(fd);
            return -1;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    *out = buf;
    *len = got;
    return 0;
}

static void insp_save(struct ag_insp *ins, const struct ag_insp_ent *e)
{
    char path[PATH_MAX];
    cJSON *o;
    char *text = NULL;

    if (ins->opts->save_dir[0] == '\0')
        return;
    o = ag_insp_ring_save_json(e);
    text = o != NULL ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (text == NULL || save_path(ins, path, sizeof(path), e->id, "req") < 0 ||
        write_file(path, e->req_body.data, e->req_body.len) != 0 ||
        save_path(ins, path, sizeof(path), e->id, "resp") < 0 ||
        write_file(path, e->resp_body.data, e->resp_body.len) != 0 ||
        save_path(ins, path, sizeof(path), e->id, "json") < 0 ||
        write_file(path, text, strlen(text)) != 0)
        LOG_WARN(ins->ctx->log, "inspect_save_failed", LOG_U("entry", e->id),
                 LOG_S("dir", ins->opts->save_dir), LOG_S("err", strerror(errno)));
    free(text);
}

static void insp_on_evict(void *arg, uint64_t id)
{
    struct ag_insp *ins = arg;
    static const char *const ext[] = {"json", "req", "resp"};
    char path[PATH_MAX];

    for (size_t i = 0; i < sizeof(ext) / sizeof(ext[0]); i++)
        if (save_path(ins, path, sizeof(path), id, ext[i]) >= 0)
            (void)unlink(path);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* The ids of DIR/<digits>.json, ascending, in a new array. Returns -1 if the
 * directory cannot be read. */
static int list_saved(const char *dir, uint64_t **ids, size_t *n)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    size_t cap = 0;

    *ids = NULL;
    *n = 0;
    if (d == NULL)
        return -1;
    while ((de = readdir(d)) != NULL) {
        const char *dot = strchr(de->d_name, '.');
        uint64_t id;
        if (dot == NULL || strcmp(dot, ".json") != 0 ||
            util_parse_u64(de->d_name, (size_t)(dot - de->d_name), &id) != 0 || id == 0)
            continue;
        if (*n == cap) {
            size_t nc = cap != 0 ? cap * 2 : 64;
            uint64_t *ni = realloc(*ids, nc * sizeof(*ni));
            if (ni == NULL)
                break;
            *ids = ni;
            cap = nc;
        }
        (*ids)[(*n)++] = id;
    }
    closedir(d);
    if (*n > 0)
        qsort(*ids, *n, sizeof(**ids), cmp_u64);
    return 0;
}

static void insp_load(struct ag_insp *ins)
{
    uint64_t *ids;
    size_t n, loaded = 0;

    if (list_saved(ins->opts->save_dir, &ids, &n) != 0) {
        LOG_WARN(ins->ctx->log, "inspect_load_failed", LOG_S("dir", ins->opts->save_dir),
                 LOG_S("err", strerror(errno)));
        return;
    }
    for (size_t i = 0; i < n; i++) {
        char path[PATH_MAX];
        uint8_t *json = NULL, *req = NULL, *resp = NULL;
        size_t jl = 0, ql = 0, sl = 0;
        bool ok = save_path(ins, path, sizeof(path), ids[i], "json") >= 0 &&
                  read_file(path, INSP_SAVE_JSON_MAX, &json, &jl) == 0 &&
                  save_path(ins, path, sizeof(path), ids[i], "req") >= 0 &&
                  read_file(path, ins->opts->body_bytes, &req, &ql) >= 0 &&
                  save_path(ins, path, sizeof(path), ids[i], "resp") >= 0 &&
                  read_file(path, ins->opts->body_bytes, &resp, &sl) >= 0 &&
                  ag_insp_ring_restore(ins->ring, (const char *)json, jl, req, ql, resp, sl) == 0;
        if (ok)
            loaded++;
        else
            LOG_WARN(ins->ctx->log, "inspect_load_skipped", LOG_U("entry", ids[i]),
                     LOG_S("dir", ins->opts->save_dir));
        free(json);
        free(req);
        free(resp);
    }
    free(ids);
    ag_insp_ring_trim(ins->ring); /* more than --inspect-max saved: the oldest go */
    LOG_INFO(ins->ctx->log, "inspect_loaded", LOG_U("entries", ag_insp_ring_count(ins->ring)),
             LOG_U("files", n), LOG_U("restored", loaded), LOG_S("dir", ins->opts->save_dir));
}

/* Creates DIR 0700 if missing; refuses one others can enter. */
static int save_dir_check(const char *dir, char *err, size_t errlen)
{
    struct stat st;

    if (mkdir(dir, 0700) == -1 && errno != EEXIST) {
        (void)util_snprintf(err, errlen, "--inspect-save %s: %s", dir, strerror(errno));
        return -1;
    }
    if (stat(dir, &st) == -1 || !S_ISDIR(st.st_mode)) {
        (void)util_snprintf(err, errlen, "--inspect-save %s: not a directory", dir);
        return -1;
    }
    if ((st.st_mode & 077) != 0) {
        (void)util_snprintf(err, errlen,
                            "--inspect-save %s: captures hold tokens and bodies; the directory "
                            "must not be accessible by group or others (chmod 700)",
                            dir);
        return -1;
    }
    return 0;
}

/* ---- capture hooks ---------------------------------------------------------------- */

struct ag_insp_ent *ag_insp_cap_begin(struct ag_insp *ins, const struct ag_agt *a,
                                      const struct ag_fwd_request *rq)
{
    struct ag_insp_origin o;
    struct ag_insp_ent *e;

    if (ins == NULL)
        return NULL;
    o.agent_name = a->cfg.name;
    o.agent_id = a->cfg.id;
    o.address = a->cfg.address;
    o.replay_of = ins->replay_of;
    e = ag_insp_ring_begin(ins->ring, rq, &o,
                           ins->base_unix_ms +
                               (int64_t)(clk_mono_ms(ins->ctx->clk) - ins->base_mono_ms),
                           clk_mono_ms(ins->ctx->clk));
    if (e == NULL)
        return NULL;
    ins->last_begun = e->id;
    insp_notify(ins, e);
    return e;
}

void ag_insp_cap_req_body(struct ag_insp *ins, struct ag_insp_ent *e, const uint8_t *data,
                          size_t len)
{
    if (ins != NULL && e != NULL)
        ag_insp_ring_req_body(ins->ring, e, data, len);
}

void ag_insp_cap_resp_head(struct ag_insp *ins, struct ag_insp_ent *e, int status,
                           const nghttp2_nv *nv, size_t nnv)
{
    if (ins == NULL || e == NULL)
        return;
    ag_insp_ring_resp_head(ins->ring, e, status, nv, nnv, clk_mono_ms(ins->ctx->clk));
    insp_notify(ins, e);
}

void ag_insp_cap_resp_body(struct ag_insp *ins, struct ag_insp_ent *e, const uint8_t *data,
                           size_t len)
{
    if (ins != NULL && e != NULL)
        ag_insp_ring_resp_body(ins->ring, e, data, len);
}

void ag_insp_cap_end(struct ag_insp *ins, struct ag_insp_ent *e, const char *err)
{
    cJSON *sum;

    if (ins == NULL || e == NULL)
        return;
    ag_insp_ring_end(ins->ring, e, err, clk_mono_ms(ins->ctx->clk));
    insp_save(ins, e);
    sum = ins->nsse > 0 ? ag_insp_ring_summary_json(e) : NULL;
    ag_insp_ring_trim(ins->ring); /* may free e */
    insp_broadcast(ins, "entry", sum);
}

/* ---- replays ------------------------------------------------------------------------ */

static void replay_finish(struct insp_replay *rp)
{
    rp->fwd = NULL;
    rp->done = true;
    insp_reap_soon(rp->ins);
}

static void replay_on_head(void *arg, int status, const nghttp2_nv *nv, size_t nnv, bool no_body)
{
}

static void replay_on_body(void *arg, const uint8_t *data, size_t len) {}

static void replay_on_end(void *arg) { replay_finish(arg); }

static void replay_on_error(void *arg, enum ag_fwd_err err, const char *detail)
{
    replay_finish(arg);
}

static void replay_on_body_sent(void *arg, size_t n) {}

static const struct ag_fwd_cbs replay_cbs = {
    .on_head = replay_on_head,
    .on_body = replay_on_body,
    .on_end = replay_on_end,
    .on_error = replay_on_error,
    .on_body_sent = replay_on_body_sent,
};

static void replay_free(struct insp_replay *rp)
{
    list_unlink(&rp->link);
    rp->ins->nreplays--;
    ag_fwd_free(rp->fwd); /* ends its capture as cancelled */
    ag_agt_unref(rp->agt);
    free(rp);
}

static void insp_on_reap(evutil_socket_t fd, short what, void *arg)
{
    struct ag_insp *ins = arg;
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &ins->sse)
    {
        struct insp_sse *s = LIST_ENTRY(n, struct insp_sse, link);
        if (s->closed)
            sse_free(s);
    }
    LIST_FOREACH_SAFE(n, tmp, &ins->replays)
    {
        struct insp_replay *rp = LIST_ENTRY(n, struct insp_replay, link);
        if (rp->done)
            replay_free(rp);
    }
}

/* A replay request: the captured one, or with the edits of the JSON body. */
struct replay_rq {
    char method[32];
    char *path;
    struct ag_fwd_hdr hdrs[INSP_MAX_HDRS + 1];
    size_t nhdrs;
    char cl[24];    /* content-length value we set */
    uint8_t *body;  /* owned (decoded edit), or borrowed from the entry */
    size_t body_len;
    bool body_owned;
    bool has_body;
};

static bool is_tchar(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static bool token_ok(const char *s, size_t max)
{
    size_t n = strlen(s);

    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!is_tchar((unsigned char)s[i]))
            return false;
    return true;
}

static bool value_ok(const char *s)
{
    for (; *s != '\0'; s++)
        if ((unsigned char)*s < 0x20 && *s != '\t')
            return false;
    return true;
}

static bool path_ok(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > INSP_PATH_MAX || (s[0] != '/' && strcmp(s, "*") != 0))
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= ' ' || s[i] == 0x7f)
            return false;
    return true;
}

/* Base64 (RFC 4648, padded) into a new buffer. Returns 0 or -1. */
static int b64_decode(const char *in, uint8_t **out, size_t *outlen)
{
    size_t n = strlen(in);
    uint8_t *buf;
    int got;
    size_t pad = 0;

    *out = NULL;
    *outlen = 0;
    if (n == 0)
        return 0;
    if (n % 4 != 0 || n > (size_t)INT32_MAX)
        return -1;
    buf = malloc(n / 4 * 3 + 1);
    if (buf == NULL)
        return -1;
    got = EVP_DecodeBlock(buf, (const unsigned char *)in, (int)n);
    if (got < 0) {
        free(buf);
        return -1;
    }
    pad = (in[n - 1] == '=') + (in[n - 2] == '=');
    *out = buf;
    *outlen = (size_t)got - pad;
    return 0;
}

/* Builds rr from e and the edits (NULL: none). Returns NULL on success, or
 * the error code and fills msg. rr borrows from e and edits. */
static const char *replay_build(const struct ag_insp_ent *e, const cJSON *edits,
                                struct replay_rq *rr, char *msg, size_t msglen)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(edits, "method");
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(edits, "path");
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(edits, "headers");
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(edits, "body_b64");
    bool had_cl = false;

    memset(rr, 0, sizeof(*rr));
    if (e->websocket || e->active) {
        (void)util_snprintf(msg, msglen, "%s",
                            e->websocket ? "WebSocket exchanges cannot be replayed"
                                         : "the exchange is still in progress");
        return "not_replayable";
    }
    (void)util_snprintf(rr->method, sizeof(rr->method), "%s", e->method);
    rr->path = e->path;
    if (m != NULL) {
        if (!cJSON_IsString(m) || !token_ok(m->valuestring, sizeof(rr->method) - 1)) {
            (void)util_snprintf(msg, msglen, "method: want an HTTP token");
            return "bad_request";
        }
        (void)util_snprintf(rr->method, sizeof(rr->method), "%s", m->valuestring);
    }
    if (p != NULL) {
        if (!cJSON_IsString(p) || !path_ok(p->valuestring)) {
            (void)util_snprintf(msg, msglen, "path: want /... without spaces or controls");
            return "bad_request";
        }
        rr->path = p->valuestring;
    }
    if (h != NULL) {
        const cJSON *it;
        if (!cJSON_IsArray(h) || cJSON_GetArraySize(h) > INSP_MAX_HDRS) {
            (void)util_snprintf(msg, msglen, "headers: want at most %d {name, value}",
                                INSP_MAX_HDRS);
            return "bad_request";
        }
        cJSON_ArrayForEach(it, h)
        {
            const cJSON *hn = cJSON_GetObjectItemCaseSensitive(it, "name");
            const cJSON *hv = cJSON_GetObjectItemCaseSensitive(it, "value");
            if (!cJSON_IsString(hn) || !cJSON_IsString(hv) || !token_ok(hn->valuestring, 256) ||
                !value_ok(hv->valuestring) || strlen(hv->valuestring) > AG_INSP_HDR_BYTES) {
                (void)util_snprintf(msg, msglen, "headers: a name is an HTTP token, a value has "
                                                 "no control characters");
                return "bad_request";
            }
            for (char *c = hn->valuestring; *c != '\0'; c++)
                if (*c >= 'A' && *c <= 'Z')
                    *c = (char)(*c - 'A' + 'a'); /* HTTP/2 rules, as from the tunnel */
            if (strcmp(hn->valuestring, "content-length") == 0) {
                had_cl = true;
                continue;
            }
            rr->hdrs[rr->nhdrs].name = (struct iov){hn->valuestring, strlen(hn->valuestring)};
            rr->hdrs[rr->nhdrs].value = (struct iov){hv->valuestring, strlen(hv->valuestring)};
            rr->nhdrs++;
        }
    } else {
        for (size_t i = 0; i < e->req_hdrs.n && rr->nhdrs < INSP_MAX_HDRS; i++) {
            const struct ag_insp_kv *kv = &e->req_hdrs.v[i];
            if (strcmp(kv->name, "content-length") == 0) {
                had_cl = true;
                continue;
            }
            rr->hdrs[rr->nhdrs].name = (struct iov){kv->name, kv->name_len};
            rr->hdrs[rr->nhdrs].value = (struct iov){kv->value, kv->value_len};
            rr->nhdrs++;
        }
        if (e->req_hdrs.truncated) {
            (void)util_snprintf(msg, msglen, "the captured headers were truncated");
            return "not_replayable";
        }
    }
    if (b != NULL) {
        if (!cJSON_IsString(b) || b64_decode(b->valuestring, &rr->body, &rr->body_len) != 0) {
            (void)util_snprintf(msg, msglen, "body_b64: want padded base64");
            return "bad_request";
        }
        rr->body_owned = true;
        rr->has_body = rr->body_len > 0 || e->has_body;
        had_cl = rr->has_body; /* an edited body gets its own length */
    } else {
        if (e->req_body.truncated) {
            (void)util_snprintf(msg, msglen,
                                "the captured body was truncated at %zu of %llu bytes; send "
                                "body_b64 to replay another",
                                e->req_body.len, (unsigned long long)e->req_body.total);
            return "body_truncated";
        }
        rr->body = e->req_body.data;
        rr->body_len = e->req_body.len;
        rr->has_body = e->has_body;
    }
    if (had_cl && rr->has_body) {
        (void)util_snprintf(rr->cl, sizeof(rr->cl), "%zu", rr->body_len);
        rr->hdrs[rr->nhdrs].name = IOV_LIT("content-length");
        rr->hdrs[rr->nhdrs].value = (struct iov){rr->cl, strlen(rr->cl)};
        rr->nhdrs++;
    }
    return NULL;
}

/* Starts replaying e. Returns the new entry's id, or 0 with code and msg. */
static uint64_t insp_replay(struct ag_insp *ins, const struct ag_insp_ent *e, const cJSON *edits,
                            const char **code, char *msg, size_t msglen)
{
    struct replay_rq *rr = calloc(1, sizeof(*rr));
    struct insp_replay *rp = NULL;
    struct ag_fwd_request rq;
    struct ag_agt *a;
    uint64_t id = 0, of;

    if (rr == NULL) {
        *code = "internal_error";
        return 0;
    }
    *code = replay_build(e, edits, rr, msg, msglen);
    if (*code != NULL)
        goto out;
    a = ag_agt_find_id(ins->ctx, e->agent_id);
    if (a == NULL) {
        *code = "agent_gone";
        (void)util_snprintf(msg, msglen, "agent %s is no longer configured", e->agent_name);
        goto out;
    }
    if (ins->nreplays >= INSP_REPLAY_MAX) {
        *code = "replay_busy";
        (void)util_snprintf(msg, msglen, "%d replays in flight", INSP_REPLAY_MAX);
        goto out;
    }
    rp = calloc(1, sizeof(*rp));
    if (rp == NULL) {
        *code = "internal_error";
        goto out;
    }
    memset(&rq, 0, sizeof(rq));
    rq.method = (struct iov){rr->method, strlen(rr->method)};
    rq.path = (struct iov){rr->path, strlen(rr->path)};
    rq.authority = (struct iov){e->authority, strlen(e->authority)};
    rq.hdrs = rr->hdrs;
    rq.nhdrs = rr->nhdrs;
    rq.has_body = rr->has_body;
    rp->ins = ins;
    rp->agt = a;
    ag_agt_ref(a);
    ins->last_begun = 0;
    of = e->id;
    ins->replay_of = e->id; /* read by ag_insp_cap_begin() inside ag_fwd_start() */
    rp->fwd = ag_fwd_start(a, &rq, &replay_cbs, rp);
    ins->replay_of = 0;
    if (rp->fwd == NULL) {
        ag_agt_unref(a);
        free(rp);
        *code = "internal_error";
        goto out;
    }
    /* e may be gone now (the new entry's capture can evict it): not used below */
    id = ins->last_begun;
    list_insert_tail(&ins->replays, &rp->link);
    ins->nreplays++;
    if (rr->body_len > 0)
        (void)ag_fwd_write_body(rp->fwd, rr->body, rr->body_len);
    if (rr->has_body)
        ag_fwd_end_body(rp->fwd);
    LOG_INFO(ins->ctx->log, "inspect_replay", LOG_U("of", of),
             LOG_U("entry", id), LOG_S("addr", a->cfg.address));
out:
    if (rr->body_owned)
        free(rr->body);
    free(rr);
    return id;
}

char *ag_insp_ctl_replay(struct ag_insp *ins, const cJSON *jid)
{
    cJSON *o = cJSON_CreateObject();
    const char *code = NULL;
    char msg[200] = "";
    struct ag_insp_ent *e;
    uint64_t id = 0;
    char *text;

    if (o == NULL)
        return NULL;
    if (ins == NULL) {
        code = "inspector_off";
        (void)util_snprintf(msg, sizeof(msg), "the daemon runs without --inspect");
    } else if (!cJSON_IsNumber(jid) || jid->valuedouble < 1 || jid->valuedouble > 9e15 ||
               jid->valuedouble != (double)(uint64_t)jid->valuedouble) {
        code = "bad_request";
        (void)util_snprintf(msg, sizeof(msg), "the id is a positive integer");
    } else if ((e = ag_insp_ring_find(ins->ring, (uint64_t)jid->valuedouble)) == NULL) {
        code = "not_found";
        (void)util_snprintf(msg, sizeof(msg), "no entry %llu (evicted or cleared?)",
                            (unsigned long long)jid->valuedouble);
    } else {
        id = insp_replay(ins, e, NULL, &code, msg, sizeof(msg));
    }
    if (cJSON_AddBoolToObject(o, "ok", code == NULL) == NULL ||
        (code == NULL ? cJSON_AddNumberToObject(o, "id", (double)id)
                      : cJSON_AddStringToObject(o, "error", code)) == NULL ||
        (code != NULL && cJSON_AddStringToObject(o, "message", msg[0] != '\0' ? msg : code) ==
                             NULL)) {
        cJSON_Delete(o);
        return NULL;
    }
    text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return text;
}

/* ---- HTTP ---------------------------------------------------------------------------- */

static void reply_common(struct evhttp_request *req)
{
    struct evkeyvalq *out = evhttp_request_get_output_headers(req);

    evhttp_add_header(out, "Cache-Control", "no-store");
    evhttp_add_header(out, "X-Content-Type-Options", "nosniff");
    evhttp_add_header(out, "X-Frame-Options", "DENY");
    evhttp_add_header(out, "Referrer-Policy", "no-referrer");
}

static void reply_json(struct evhttp_request *req, int status, const char *reason, cJSON *o)
{
    char *text = o != NULL ? cJSON_PrintUnformatted(o) : NULL;
    struct evbuffer *b = evbuffer_new();

    cJSON_Delete(o);
    reply_common(req);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      "application/json");
    if (text == NULL || b == NULL) {
        evbuffer_free(b);
        free(text);
        evhttp_send_error(req, 500, "Internal Server Error");
        return;
    }
    evbuffer_add(b, text, strlen(text));
    evbuffer_add(b, "\n", 1);
    free(text);
    evhttp_send_reply(req, status, reason, b);
    evbuffer_free(b);
}

static void reply_err(struct evhttp_request *req, int status, const char *code, const char *msg)
{
    cJSON *o = cJSON_CreateObject();

    if (o != NULL) {
        cJSON_AddStringToObject(o, "error", code);
        cJSON_AddStringToObject(o, "message", msg);
    }
    reply_json(req, status, status == 403 ? "Forbidden" : "Error", o);
}

static bool peer_is_loopback(struct evhttp_request *req)
{
    struct evhttp_connection *con = evhttp_request_get_connection(req);
    const struct sockaddr *sa = con != NULL ? evhttp_connection_get_addr(con) : NULL;

    if (sa == NULL)
        return false;
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)(const void *)sa)->sin_addr.s_addr) >> 24) ==
               127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a))
            return true;
        return IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127;
    }
    return false;
}

static bool tok_eq(const char *token, const char *s, size_t len)
{
    size_t tl = strlen(token);

    return len == tl && CRYPTO_memcmp(token, s, tl) == 0;
}

/* The token from Authorization: Bearer, the tg_inspect cookie or ?token=. */
static bool req_has_token(const struct ag_insp *ins, struct evhttp_request *req,
                          const struct evkeyvalq *q)
{
    const struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    const char *auth = evhttp_find_header(in, "Authorization");
    const char *cookie = evhttp_find_header(in, "Cookie");
    const char *qt = evhttp_find_header(q, "token");

    if (ins->opts->token[0] == '\0')
        return false;
    if (auth != NULL && strncmp(auth, "Bearer ", 7) == 0 &&
        tok_eq(ins->opts->token, auth + 7, strlen(auth + 7)))
        return true;
    if (qt != NULL && tok_eq(ins->opts->token, qt, strlen(qt)))
        return true;
    for (const char *c = cookie; c != NULL && *c != '\0';) {
        const char *end = strchr(c, ';');
        size_t len = end != NULL ? (size_t)(end - c) : strlen(c);
        while (len > 0 && *c == ' ') {
            c++;
            len--;
        }
        if (len > sizeof(INSP_COOKIE) && strncmp(c, INSP_COOKIE "=", sizeof(INSP_COOKIE)) == 0 &&
            tok_eq(ins->opts->token, c + sizeof(INSP_COOKIE), len - sizeof(INSP_COOKIE)))
            return true;
        c = end != NULL ? end + 1 : NULL;
    }
    return false;
}

static bool host_allowed(const struct ag_insp *ins, const char *host)
{
    if (host == NULL)
        return false;
    for (size_t i = 0; i < sizeof(ins->hosts) / sizeof(ins->hosts[0]); i++)
        if (strcasecmp(host, ins->hosts[i]) == 0)
            return true;
    return false;
}

/* The gate (file header). Returns true if req may go on; else answered. */
static bool insp_admit(struct ag_insp *ins, struct evhttp_request *req, const struct evkeyvalq *q,
                       bool api, bool *set_cookie)
{
    const struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    const char *host = evhttp_find_header(in, "Host");
    const char *origin = evhttp_find_header(in, "Origin");
    const char *site = evhttp_find_header(in, "Sec-Fetch-Site");
    bool token = req_has_token(ins, req, q);
    char want[96];

    *set_cookie = token && evhttp_find_header(q, "token") != NULL;
    if (!peer_is_loopback(req) && !token) {
        if (!ins->opts->allow_remote) {
            reply_err(req, 403, "inspect_remote_refused",
                      "the inspector answers loopback clients only");
            return false;
        }
        evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate", "Bearer");
        reply_err(req, 401, "inspect_token_required",
                  "a client from another machine needs the inspector's token");
        return false;
    }
    if (!token && !host_allowed(ins, host)) {
        reply_err(req, 403, "inspect_bad_host",
                  "Host must be this inspector's own address (127.0.0.1, localhost or [::1] "
                  "with its port)");
        return false;
    }
    if (origin != NULL &&
        (host == NULL || util_snprintf(want, sizeof(want), "http://%s", host) < 0 ||
         strcasecmp(origin, want) != 0)) {
        reply_err(req, 403, "inspect_cross_origin", "requests from another origin are refused");
        return false;
    }
    if (api && site != NULL && strcmp(site, "same-origin") != 0 && strcmp(site, "none") != 0) {
        reply_err(req, 403, "inspect_cross_origin", "requests from another site are refused");
        return false;
    }
    return true;
}

static void serve_page(struct ag_insp *ins, struct evhttp_request *req, bool set_cookie)
{
    struct evkeyvalq *out = evhttp_request_get_output_headers(req);
    struct evbuffer *b = evbuffer_new();
    char cookie[sizeof(INSP_COOKIE) + 300];

    if (b == NULL || evbuffer_add_reference(b, ag_insp_page, ag_insp_page_len, NULL, NULL) != 0) {
        evbuffer_free(b);
        evhttp_send_error(req, 500, "Internal Server Error");
        return;
    }
    reply_common(req);
    evhttp_add_header(out, "Content-Type", "text/html; charset=utf-8");
    evhttp_add_header(out, "Content-Security-Policy",
                      "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                      "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                      "frame-ancestors 'none'");
    if (set_cookie &&
        util_snprintf(cookie, sizeof(cookie), INSP_COOKIE "=%s; Path=/; HttpOnly; SameSite=Strict",
                      ins->opts->token) >= 0)
        evhttp_add_header(out, "Set-Cookie", cookie);
    evhttp_send_reply(req, 200, "OK", b);
    evbuffer_free(b);
}

static void serve_events(struct ag_insp *ins, struct evhttp_request *req)
{
    struct evkeyvalq *out = evhttp_request_get_output_headers(req);
    struct insp_sse *s;
    cJSON *st;

    if (ins->nsse >= INSP_SSE_MAX) {
        reply_err(req, 503, "inspect_busy", "too many live-update clients");
        return;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        reply_err(req, 500, "internal_error", "out of memory");
        return;
    }
    s->ins = ins;
    s->req = req;
    s->con = evhttp_request_get_connection(req);
    list_insert_tail(&ins->sse, &s->link);
    ins->nsse++;
    reply_common(req);
    evhttp_add_header(out, "Content-Type", "text/event-stream");
    evhttp_send_reply_start(req, 200, "OK");
    evhttp_connection_set_closecb(s->con, sse_on_close, s);
    st = ag_insp_ring_stats_json(ins->ring);
    if (st != NULL) {
        char *text = cJSON_PrintUnformatted(st);
        cJSON_Delete(st);
        if (text != NULL)
            sse_send(s, "hello", text);
        free(text);
    }
}

static bool parse_id(const char *s, size_t len, uint64_t *id)
{
    return util_parse_u64(s, len, id) == 0 && *id > 0;
}

static void serve_list(struct ag_insp *ins, struct evhttp_request *req, const struct evkeyvalq *q)
{
    const char *after = evhttp_find_header(q, "after");
    const char *limit = evhttp_find_header(q, "limit");
    uint64_t a = 0, l = INSP_LIST_LIMIT;
    cJSON *o = cJSON_CreateObject();

    if ((after != NULL && util_parse_u64(after, strlen(after), &a) != 0) ||
        (limit != NULL && util_parse_uint(limit, INSP_LIST_LIMIT, &l) != 0)) {
        cJSON_Delete(o);
        reply_err(req, 400, "bad_request", "after and limit are decimal numbers");
        return;
    }
    if (o == NULL ||
        !cJSON_AddItemToObject(o, "entries", ag_insp_ring_list_json(ins->ring, a, (size_t)l)) ||
        !cJSON_AddItemToObject(o, "stats", ag_insp_ring_stats_json(ins->ring))) {
        cJSON_Delete(o);
        reply_err(req, 500, "internal_error", "out of memory");
        return;
    }
    reply_json(req, 200, "OK", o);
}

static int code_status(const char *code)
{
    if (strcmp(code, "bad_request") == 0)
        return 400;
    if (strcmp(code, "replay_busy") == 0)
        return 503;
    if (strcmp(code, "internal_error") == 0)
        return 500;
    return 409; /* not_replayable, body_truncated, agent_gone */
}

static void serve_replay(struct ag_insp *ins, struct evhttp_request *req, struct ag_insp_ent *e)
{
    const char *ct =
        evhttp_find_header(evhttp_request_get_input_headers(req), "Content-Type");
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    cJSON *edits = NULL;
    const char *code = NULL;
    char msg[200] = "";
    uint64_t id;
    cJSON *o;

    /* application/json only: a cross-site form cannot send it without a preflight */
    if (ct == NULL || strncasecmp(ct, "application/json", 16) != 0) {
        reply_err(req, 415, "bad_request", "send Content-Type: application/json");
        return;
    }
    if (len > 0) {
        const char *text = (const char *)evbuffer_pullup(in, -1);
        edits = text != NULL ? cJSON_ParseWithLength(text, len) : NULL;
        if (edits == NULL || !cJSON_IsObject(edits)) {
            cJSON_Delete(edits);
            reply_err(req, 400, "bad_request", "the body is a JSON object of edits");
            return;
        }
    }
    id = insp_replay(ins, e, edits, &code, msg, sizeof(msg));
    cJSON_Delete(edits);
    if (code != NULL) {
        reply_err(req, code_status(code), code, msg[0] != '\0' ? msg : code);
        return;
    }
    o = cJSON_CreateObject();
    if (o != NULL && cJSON_AddNumberToObject(o, "id", (double)id) == NULL) {
        cJSON_Delete(o);
        o = NULL;
    }
    reply_json(req, 202, "Accepted", o);
}

static void insp_on_request(struct evhttp_request *req, void *arg)
{
    struct ag_insp *ins = arg;
    const char *uri = evhttp_request_get_uri(req);
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(req);
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    const char *path = u != NULL ? evhttp_uri_get_path(u) : NULL;
    const char *query = u != NULL ? evhttp_uri_get_query(u) : NULL;
    struct evkeyvalq q;
    bool api, set_cookie = false;
    const char *rest;
    uint64_t id;

    if (uri == NULL || path == NULL) {
        /* evhttp calls again with no URI when a reply in progress fails (an
         * SSE client that went away): finish it from the loop */
        struct list *n, *tmp;
        LIST_FOREACH_SAFE(n, tmp, &ins->sse)
        {
            struct insp_sse *s = LIST_ENTRY(n, struct insp_sse, link);
            if (s->req == req) {
                s->closed = true;
                insp_reap_soon(ins);
                return;
            }
        }
        evhttp_send_error(req, 400, "Bad Request");
        return;
    }
    q.tqh_first = NULL; /* TAILQ_INIT: <sys/queue.h> clashes with list.h */
    q.tqh_last = &q.tqh_first;
    if (query != NULL && evhttp_parse_query_str(query, &q) != 0) {
        reply_err(req, 400, "bad_request", "malformed query string");
        return;
    }
    api = strncmp(path, "/api/", 5) == 0;
    if (!insp_admit(ins, req, &q, api, &set_cookie))
        goto out;
    LOG_DEBUG(ins->ctx->log, "inspect_request", LOG_S("method", cmd == EVHTTP_REQ_GET ? "GET"
                                                               : cmd == EVHTTP_REQ_POST ? "POST"
                                                                                        : "other"),
              LOG_S("path", path));
    if (strcmp(path, "/") == 0 || strcmp(path, "/index.html") == 0) {
        if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD)
            goto method;
        serve_page(ins, req, set_cookie);
    } else if (strcmp(path, "/api/events") == 0) {
        if (cmd != EVHTTP_REQ_GET)
            goto method;
        serve_events(ins, req);
    } else if (strcmp(path, "/api/stats") == 0) {
        if (cmd != EVHTTP_REQ_GET)
            goto method;
        reply_json(req, 200, "OK", ag_insp_ring_stats_json(ins->ring));
    } else if (strcmp(path, "/api/requests") == 0) {
        if (cmd == EVHTTP_REQ_GET) {
            serve_list(ins, req, &q);
        } else if (cmd == EVHTTP_REQ_DELETE) {
            ag_insp_ring_clear(ins->ring);
            insp_broadcast(ins, "clear", ag_insp_ring_stats_json(ins->ring));
            reply_json(req, 200, "OK", ag_insp_ring_stats_json(ins->ring));
        } else {
            goto method;
        }
    } else if (strncmp(path, "/api/requests/", 14) == 0) {
        const char *reveal = evhttp_find_header(&q, "reveal");
        struct ag_insp_ent *e;
        rest = path + 14;
        {
            const char *slash = strchr(rest, '/');
            size_t idlen = slash != NULL ? (size_t)(slash - rest) : strlen(rest);
            if (!parse_id(rest, idlen, &id)) {
                reply_err(req, 404, "not_found", "no such entry");
                goto out;
            }
            rest += idlen;
        }
        e = ag_insp_ring_find(ins->ring, id);
        if (e == NULL) {
            reply_err(req, 404, "not_found", "no such entry (evicted or cleared?)");
        } else if (rest[0] == '\0') {
            if (cmd != EVHTTP_REQ_GET)
                goto method;
            reply_json(req, 200, "OK",
                       ag_insp_ring_detail_json(e, reveal != NULL && strcmp(reveal, "1") == 0));
        } else if (strcmp(rest, "/replay") == 0) {
            if (cmd != EVHTTP_REQ_POST)
                goto method;
            serve_replay(ins, req, e);
        } else {
            reply_err(req, 404, "not_found", "unknown path");
        }
    } else {
        reply_err(req, 404, "not_found", "unknown path");
    }
    goto out;
method:
    reply_err(req, 405, "method_not_allowed", "method not allowed here");
out:
    evhttp_clear_headers(&q);
}

/* ---- lifecycle -------------------------------------------------------------------------- */

struct ag_insp *ag_insp_new(struct ag_ctx *ctx, char *err, size_t errlen)
{
    const struct ag_insp_opts *o = &ctx->opts->inspect;
    struct ag_insp *ins = calloc(1, sizeof(*ins));
    struct evhttp_bound_socket *bs;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);

    err[0] = '\0';
    if (ins == NULL)
        goto fail_oom;
    ins->ctx = ctx;
    ins->base_unix_ms = clk_unix_s(ctx->clk) * 1000;
    ins->base_mono_ms = clk_mono_ms(ctx->clk);
    ins->opts = o;
    list_init(&ins->sse);
    list_init(&ins->replays);
    ins->ring = ag_insp_ring_new(o->max_entries, o->body_bytes);
    ins->reap_ev = event_new(ctx->base, -1, 0, insp_on_reap, ins);
    ins->http = evhttp_new(ctx->base);
    if (ins->ring == NULL || ins->reap_ev == NULL || ins->http == NULL)
        goto fail_ins;
    if (o->save_dir[0] != '\0') {
        if (save_dir_check(o->save_dir, err, errlen) != 0)
            goto fail_ins;
        insp_load(ins);
        ag_insp_ring_set_evict_cb(ins->ring, insp_on_evict, ins);
    }
    evhttp_set_allowed_methods(ins->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_POST |
                                              EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS);
    evhttp_set_max_headers_size(ins->http, 64 * 1024);
    /* a replay edit carries the body in base64 */
    evhttp_set_max_body_size(ins->http, (ev_ssize_t)(o->body_bytes / 3 * 4 + 256 * 1024));
    evhttp_set_timeout(ins->http, INSP_HTTP_TIMEOUT_S);
    evhttp_set_gencb(ins->http, insp_on_request, ins);
    bs = evhttp_bind_socket_with_handle(ins->http, o->host, o->port);
    if (bs == NULL) {
        (void)util_snprintf(err, errlen, "--inspect %s:%u: cannot listen: %s", o->host,
                            (unsigned)o->port, strerror(errno));
        goto fail_ins;
    }
    if (getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&ss, &sl) == -1) {
        (void)util_snprintf(err, errlen, "--inspect: getsockname: %s", strerror(errno));
        goto fail_ins;
    }
    ins->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                               : ((struct sockaddr_in *)&ss)->sin_port);
    (void)util_snprintf(ins->hosts[0], sizeof(ins->hosts[0]), "127.0.0.1:%u", (unsigned)ins->port);
    (void)util_snprintf(ins->hosts[1], sizeof(ins->hosts[1]), "localhost:%u", (unsigned)ins->port);
    (void)util_snprintf(ins->hosts[2], sizeof(ins->hosts[2]), "[::1]:%u", (unsigned)ins->port);
    LOG_INFO(ctx->log, "inspector_listening", LOG_S("addr", o->host), LOG_U("port", ins->port),
             LOG_U("max", o->max_entries), LOG_U("body_bytes", o->body_bytes),
             LOG_B("remote", o->allow_remote),
             LOG_U("memory_limit_bytes", ag_insp_ring_mem_limit(ins->ring)));
    return ins;

fail_oom:
    (void)util_snprintf(err, errlen, "out of memory");
    return NULL;
fail_ins:
    if (err[0] == '\0')
        (void)util_snprintf(err, errlen, "out of memory");
    if (ins->http != NULL)
        evhttp_free(ins->http);
    if (ins->reap_ev != NULL)
        event_free(ins->reap_ev);
    ag_insp_ring_free(ins->ring);
    free(ins);
    return NULL;
}

void ag_insp_free(struct ag_insp *ins)
{
    struct list *n, *tmp;

    if (ins == NULL)
        return;
    LIST_FOREACH_SAFE(n, tmp, &ins->replays)
    {
        replay_free(LIST_ENTRY(n, struct insp_replay, link));
    }
    /* finish the open replies before evhttp_free() frees their connections */
    LIST_FOREACH_SAFE(n, tmp, &ins->sse)
    {
        sse_free(LIST_ENTRY(n, struct insp_sse, link));
    }
    evhttp_free(ins->http);
    event_free(ins->reap_ev);
    ag_insp_ring_free(ins->ring);
    free(ins);
}
