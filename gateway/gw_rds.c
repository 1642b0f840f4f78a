/* The shared route registry; see gw_rds.h.
 *
 * Two hiredis async connections on the context's loop (its libevent
 * adapter): one for commands, one subscribed to the claims channel. hiredis
 * owns each redisAsyncContext until its disconnect callback, after which we
 * only drop the pointer; every command's privdata is ours and is freed in
 * its reply callback, which hiredis calls exactly once (with NULL when the
 * connection goes).
 *
 * Ownership: struct gw_rds is the context's. It owns the cache entries (each
 * embeds the struct gw_route its cache table borrows) and the lookups
 * (struct lookup), which a waiting request borrows as its upstream until the
 * answer or its cancel; a lookup whose request is gone lives on until its
 * reply callback. */
#include "gw_rds.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "gw_node.h"
#include "gw_px.h"
#include "gw_reg.h"
#include "gw_req.h"
#include "gw_tun.h"
#include "gw_up.h"
#include "id.h"
#include "list.h"
#include "tun_msg.h"
#include "log.h"
#include "util.h"

#define CHANNEL "tg:claims"
#define KEY_PREFIX "agent:"
#define RECONNECT_MS 1000
#define VALUE_MAX 192
#define REFRESH_DEFAULT_MS 20000 /* with --ping-interval 0 */

/* Claims addr unless a newer claim (time, then node id) holds it; returns
 * nil when ours, else the newer claim. Publishes a change. */
static const char claim_lua[] =
    "local cur = redis.call('GET', KEYS[1])\n"
    "if cur and cur ~= ARGV[1] then\n"
    "  local s, n = string.match(cur, '^v1|(%d+)|([^|]*)|')\n"
    "  if s then\n"
    "    local cs, ms = tonumber(s), tonumber(ARGV[2])\n"
    "    if cs > ms or (cs == ms and n > ARGV[3]) then return cur end\n"
    "  end\n"
    "end\n"
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])\n"
    "if cur ~= ARGV[1] then redis.call('PUBLISH', ARGV[5], KEYS[1] .. ' ' .. ARGV[1]) end\n"
    "return false\n";

/* Deletes the key if it still holds ARGV[1]; publishes the release. */
static const char release_lua[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then\n"
    "  redis.call('DEL', KEYS[1])\n"
    "  redis.call('PUBLISH', ARGV[2], KEYS[1] .. ' -')\n"
    "  return 1\n"
    "end\n"
    "return 0\n";

enum conn_state { C_DOWN = 0, C_CONNECTING, C_UP };

struct conn {
    struct gw_rds *rds;
    redisAsyncContext *ac;       /* hiredis's; NULL when down */
    enum conn_state state;
    bool sub;                    /* the subscription connection */
};

/* A remote route: where requests for one address go now. */
struct centry {
    struct gw_route rt;          /* borrowed by rds->cache; rt.owner = adv */
    char adv[GW_NODE_ADDR_MAX + 1];
    char node[GW_NODE_ID_MAX + 1];
    char value[VALUE_MAX];       /* the claim it came from */
    uint64_t expires_ms;
    struct list link;            /* in rds->entries */
};

struct lookup {
    struct gw_rds *rds;          /* NULL once rds is freed */
    struct gw_req *r;            /* borrowed; NULL once answered or cancelled */
    struct event *timer;         /* owned; --redis-timeout */
    uint8_t addr[ID_ADDR_LEN];
    struct list link;            /* in rds->lookups */
};

/* A claim or release in flight: what it was for. */
struct cmd {
    struct gw_rds *rds;          /* NULL once rds is freed */
    uint8_t addr[ID_ADDR_LEN];
    char value[VALUE_MAX];
    bool claim;
    struct list link;            /* in rds->cmds */
};

struct gw_rds {
    struct gw_ctx *ctx;
    struct conn cmd;
    struct conn sub;
    bool ok;                     /* last state logged: both up */
    bool logged_once;
    struct event *retry;         /* owned: reconnects */
    struct event *refresh;       /* owned: re-claims every interval */
    struct gw_reg *cache;        /* address -> struct centry's route */
    struct list entries;         /* struct centry */
    struct list lookups;         /* struct lookup, waiting or orphaned */
    struct list cmds;            /* struct cmd in flight */
    size_t nlookups;
    size_t nentries;
    uint64_t errors;
};

static void conn_start(struct conn *c);

static uint64_t refresh_ms(const struct gw_ctx *ctx)
{
    uint64_t p = ctx->cfg->ping_interval_s;

    return p == 0 ? REFRESH_DEFAULT_MS : p * 1000u;
}

static void key_of(const uint8_t *addr, char out[sizeof(KEY_PREFIX) + ID_ADDR_STR_LEN])
{
    memcpy(out, KEY_PREFIX, sizeof(KEY_PREFIX) - 1);
    id_addr_to_str(addr, out + sizeof(KEY_PREFIX) - 1);
}

int gw_rds_claim_parse(const char *v, size_t len, struct gw_rds_claim *c)
{
    char buf[VALUE_MAX];
    char *f[5];
    char *p;
    size_t nf = 0;

    if (len >= sizeof(buf) || memchr(v, '\0', len) != NULL)
        return -1;
    memcpy(buf, v, len);
    buf[len] = '\0';
    for (p = buf; nf < 5; nf++) {
        f[nf] = p;
        p = strchr(p, '|');
        if (p == NULL) {
            nf++;
            break;
        }
        *p++ = '\0';
    }
    if (nf != 5 || p != NULL || strcmp(f[0], "v1") != 0 ||
        util_parse_u64(f[1], strlen(f[1]), &c->ms) != 0 ||
        !gw_cfg_node_id_ok(f[2], strlen(f[2])) || strlen(f[3]) > GW_NODE_ADDR_MAX ||
        f[3][0] == '\0' || strlen(f[4]) > TUN_INSTANCE_MAX)
        return -1;
    memcpy(c->node, f[2], strlen(f[2]) + 1);
    memcpy(c->adv, f[3], strlen(f[3]) + 1);
    memcpy(c->inst, f[4], strlen(f[4]) + 1);
    return 0;
}

int gw_rds_msg_parse(const char *msg, size_t len, uint8_t addr[ID_ADDR_LEN],
                     struct gw_rds_claim *c, const char **value)
{
    const char *sp = memchr(msg, ' ', len);
    size_t vlen;

    if (sp == NULL || (size_t)(sp - msg) != sizeof(KEY_PREFIX) - 1 + ID_ADDR_STR_LEN ||
        memcmp(msg, KEY_PREFIX, sizeof(KEY_PREFIX) - 1) != 0 ||
        id_addr_parse(msg + sizeof(KEY_PREFIX) - 1, ID_ADDR_STR_LEN, addr) != 0)
        return -1;
    sp++;
    vlen = len - (size_t)(sp - msg);
    *value = sp;
    if (vlen == 1 && sp[0] == '-')
        return 1;
    return gw_rds_claim_parse(sp, vlen, c) == 0 ? 0 : -1;
}

static const char *advertise(const struct gw_ctx *ctx)
{
    return ctx->cfg->node_advertise != NULL ? ctx->cfg->node_advertise
                                            : ctx->cfg->node_listen.text;
}

static void claim_value(const struct gw_ctx *ctx, const struct gw_route *rt, char *out,
                        size_t size)
{
    util_snprintf(out, size, "v1|%llu|%s|%s|%s", (unsigned long long)rt->claim_ms, ctx->node_id,
                  advertise(ctx), rt->instance != NULL ? rt->instance : "");
}

/* A claim newer than ours (ms, then node id) takes an address. */
static bool claim_newer(const struct gw_rds_claim *c, uint64_t ours_ms, const char *our_node)
{
    return c->ms > ours_ms || (c->ms == ours_ms && strcmp(c->node, our_node) > 0);
}

/* ---- state ---- */

static void note_state(struct gw_rds *rds)
{
    bool ok = rds->cmd.state == C_UP && rds->sub.state == C_UP;

    if (rds->logged_once ? ok == rds->ok
                         : !ok && (rds->cmd.state == C_CONNECTING ||
                                   rds->sub.state == C_CONNECTING))
        return; /* once per change; not "degraded" while first connecting */
    rds->logged_once = true;
    rds->ok = ok;
    if (ok)
        LOG_INFO(rds->ctx->log, "redis_up", LOG_S("url", rds->ctx->cfg->redis.host),
                 LOG_U("port", rds->ctx->cfg->redis.port));
    else
        LOG_WARN(rds->ctx->log, "redis_degraded", LOG_S("url", rds->ctx->cfg->redis.host),
                 LOG_U("port", rds->ctx->cfg->redis.port),
                 LOG_S("meaning", "serving local tunnels only"));
}

bool gw_rds_ok(const struct gw_rds *rds)
{
    return rds != NULL && rds->cmd.state == C_UP && rds->sub.state == C_UP;
}

uint64_t gw_rds_errors(const struct gw_rds *rds)
{
    return rds != NULL ? rds->errors : 0;
}

size_t gw_rds_cached(const struct gw_rds *rds)
{
    return rds != NULL ? rds->nentries : 0;
}

/* ---- the cache ---- */

static void centry_free(struct gw_rds *rds, struct centry *e)
{
    gw_reg_remove(rds->cache, e->rt.addr, &e->rt);
    list_unlink(&e->link);
    rds->nentries--;
    free(e);
}

static struct centry *cache_get(struct gw_rds *rds, const uint8_t *addr)
{
    struct gw_route *rt = gw_reg_get(rds->cache, addr);
    struct centry *e;

    if (rt == NULL)
        return NULL;
    e = LIST_ENTRY(rt, struct centry, rt);
    if (clk_mono_ms(rds->ctx->clk) >= e->expires_ms) {
        centry_free(rds, e);
        return NULL;
    }
    return e;
}

static void cache_forget(struct gw_rds *rds, const uint8_t *addr)
{
    struct gw_route *rt = gw_reg_get(rds->cache, addr);

    if (rt != NULL)
        centry_free(rds, LIST_ENTRY(rt, struct centry, rt));
}

static struct centry *cache_put(struct gw_rds *rds, const uint8_t *addr,
                                const struct gw_rds_claim *c, const char *value)
{
    struct centry *e;
    int oom;

    cache_forget(rds, addr);
    e = calloc(1, sizeof(*e));
    if (e == NULL)
        return NULL;
    memcpy(e->rt.addr, addr, ID_ADDR_LEN);
    id_addr_to_str(addr, e->rt.addr_str);
    e->rt.up = &gw_node_up_ops;
    e->rt.owner = e->adv;
    memcpy(e->adv, c->adv, sizeof(e->adv));
    memcpy(e->node, c->node, sizeof(e->node));
    util_snprintf(e->value, sizeof(e->value), "%s", value);
    e->expires_ms = clk_mono_ms(rds->ctx->clk) + GW_RDS_CACHE_MS;
    if (gw_reg_set(rds->cache, addr, &e->rt, &oom) != NULL || oom) {
        free(e);
        return NULL;
    }
    list_insert_tail(&rds->entries, &e->link);
    rds->nentries++;
    return e;
}

/* ---- commands ---- */

static void on_cmd_reply(redisAsyncContext *ac, void *reply, void *priv);

static void send_script(struct gw_rds *rds, const uint8_t *addr, const char *value, bool claim,
                        uint64_t claim_ms)
{
    char key[sizeof(KEY_PREFIX) + ID_ADDR_STR_LEN];
    struct cmd *c;
    int rv;

    if (rds->cmd.state != C_UP)
        return; /* claimed again when the connection is back */
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return;
    c->rds = rds;
    c->claim = claim;
    memcpy(c->addr, addr, ID_ADDR_LEN);
    util_snprintf(c->value, sizeof(c->value), "%s", value);
    key_of(addr, key);
    if (claim) {
        char ms[24], ttl[24];
        util_snprintf(ms, sizeof(ms), "%llu", (unsigned long long)claim_ms);
        util_snprintf(ttl, sizeof(ttl), "%llu", (unsigned long long)(3 * refresh_ms(rds->ctx)));
        rv = redisAsyncCommand(rds->cmd.ac, on_cmd_reply, c, "EVAL %s 1 %s %s %s %s %s %s",
                               claim_lua, key, value, ms, rds->ctx->node_id, ttl, CHANNEL);
    } else {
        rv = redisAsyncCommand(rds->cmd.ac, on_cmd_reply, c, "EVAL %s 1 %s %s %s", release_lua,
                               key, value, CHANNEL);
    }
    if (rv != REDIS_OK) {
        rds->errors++;
        free(c);
        return;
    }
    list_insert_tail(&rds->cmds, &c->link);
}

/* Another node's newer claim holds addr: our tunnel's registration ends
 * there (agent_removed superseded, or replaced for the same instance). */
static void superseded(struct gw_rds *rds, const uint8_t *addr, const struct gw_rds_claim *c)
{
    struct gw_route *rt = gw_reg_get(rds->ctx->reg, addr);
    bool same;

    if (rt == NULL || !claim_newer(c, rt->claim_ms, rds->ctx->node_id))
        return;
    same = rt->instance != NULL && rt->instance[0] != '\0' && strcmp(rt->instance, c->inst) == 0;
    LOG_INFO(rds->ctx->log, same ? "agent_moved" : "agent_superseded_remote",
             LOG_S("addr", rt->addr_str), LOG_S("node", c->node));
    gw_tun_supersede(rds->ctx, addr, same);
}

static void on_cmd_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    struct cmd *c = priv;
    redisReply *rep = reply;
    struct gw_rds *rds = c->rds;

    if (rds == NULL) { /* rds went first */
        free(c);
        return;
    }
    list_unlink(&c->link);
    if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
        rds->errors++;
        if (rep != NULL)
            LOG_WARN(rds->ctx->log, "redis_error", LOG_S("op", c->claim ? "claim" : "release"),
                     LOG_S("err", rep->str));
    } else if (c->claim && rep->type == REDIS_REPLY_STRING) {
        struct gw_rds_claim cl;
        if (gw_rds_claim_parse(rep->str, rep->len, &cl) == 0)
            superseded(rds, c->addr, &cl);
    }
    free(c);
}

void gw_rds_claim(struct gw_rds *rds, struct gw_route *rt)
{
    char v[VALUE_MAX];

    if (rds == NULL)
        return;
    cache_forget(rds, rt->addr);
    claim_value(rds->ctx, rt, v, sizeof(v));
    send_script(rds, rt->addr, v, true, rt->claim_ms);
}

void gw_rds_release(struct gw_rds *rds, const struct gw_route *rt)
{
    char v[VALUE_MAX];

    if (rds == NULL)
        return;
    claim_value(rds->ctx, rt, v, sizeof(v));
    send_script(rds, rt->addr, v, false, 0);
}

static void release_cb(struct gw_route *rt, void *arg)
{
    gw_rds_release(arg, rt);
}

void gw_rds_release_all(struct gw_rds *rds)
{
    if (rds != NULL)
        gw_tun_each_route(rds->ctx, release_cb, rds);
}

static void claim_cb(struct gw_route *rt, void *arg)
{
    gw_rds_claim(arg, rt);
}

static void on_refresh(evutil_socket_t fd, short what, void *arg)
{
    struct gw_rds *rds = arg;
    struct timeval tv = {(time_t)(refresh_ms(rds->ctx) / 1000), 0};
    uint64_t now = clk_mono_ms(rds->ctx->clk);
    struct list *n, *tmp;

    evtimer_add(rds->refresh, &tv);
    LIST_FOREACH_SAFE(n, tmp, &rds->entries)
    {
        struct centry *e = LIST_ENTRY(n, struct centry, link);
        if (now >= e->expires_ms)
            centry_free(rds, e);
    }
    if (rds->cmd.state == C_UP)
        gw_tun_each_route(rds->ctx, claim_cb, rds);
}

/* ---- lookups ---- */

static void lookup_detach(struct lookup *lk)
{
    struct gw_req *r = lk->r;

    lk->r = NULL;
    evtimer_del(lk->timer);
    if (r != NULL)
        gw_req_detach(r);
}

static void lookup_free(struct lookup *lk)
{
    if (lk->rds != NULL) {
        list_unlink(&lk->link);
        lk->rds->nlookups--;
    }
    event_free(lk->timer);
    free(lk);
}

static void lk_cancel(void *arg)
{
    struct lookup *lk = arg;

    lk->r = NULL; /* the front end detached; the reply frees lk */
    evtimer_del(lk->timer);
}

static void lk_nothing(void *arg)
{
    (void)arg;
}

static void lk_consumed(void *arg, size_t n)
{
    (void)arg;
    (void)n;
}

static const struct gw_up_ops lookup_ops = {
    .name = "redis",
    .body_more = lk_nothing,
    .consumed = lk_consumed,
    .cancel = lk_cancel,
};

/* Opens r on the remote route e, or answers it. */
static void open_remote(struct gw_req *r, struct centry *e)
{
    enum herr err = e->rt.up->open(&e->rt, r);

    if (err != HERR_NONE) {
        gw_req_fail(r, err);
        return;
    }
    gw_req_arm_wait(r);
}

static void on_lookup_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct lookup *lk = arg;
    struct gw_req *r = lk->r;

    if (r == NULL)
        return;
    lk->rds->errors++;
    lookup_detach(lk);
    gw_req_fail(r, HERR_AGENT_OFFLINE);
}

static void on_lookup_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    struct lookup *lk = priv;
    redisReply *rep = reply;
    struct gw_req *r = lk->r;
    struct gw_rds *rds = lk->rds;
    struct gw_rds_claim c;
    struct centry *e;

    if (r == NULL || rds == NULL) {
        lookup_free(lk);
        return;
    }
    lookup_detach(lk);
    if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
        rds->errors++;
        lookup_free(lk);
        gw_req_fail(r, HERR_AGENT_OFFLINE);
        return;
    }
    /* a tunnel may have registered here while we waited */
    if (gw_reg_get(rds->ctx->reg, lk->addr) != NULL) {
        lookup_free(lk);
        gw_px_restart(r);
        return;
    }
    if (rep->type != REDIS_REPLY_STRING || gw_rds_claim_parse(rep->str, rep->len, &c) != 0) {
        if (rep->type == REDIS_REPLY_STRING)
            rds->errors++; /* not ours to read: no route */
        lookup_free(lk);
        gw_req_fail(r, HERR_AGENT_OFFLINE);
        return;
    }
    if (strcmp(c.node, rds->ctx->node_id) == 0) {
        /* our own claim but no tunnel here: left from before a restart
         * (or in flight away); delete it and answer as offline */
        char v[VALUE_MAX];
        util_snprintf(v, sizeof(v), "%.*s", (int)rep->len, rep->str);
        send_script(rds, lk->addr, v, false, 0);
        lookup_free(lk);
        gw_req_fail(r, HERR_AGENT_OFFLINE);
        return;
    }
    e = cache_put(rds, lk->addr, &c, rep->str);
    lookup_free(lk);
    if (e == NULL) {
        gw_req_fail(r, HERR_INTERNAL);
        return;
    }
    open_remote(r, e);
}

enum herr gw_rds_route(struct gw_req *r)
{
    struct gw_rds *rds = r->ctx->rds;
    char key[sizeof(KEY_PREFIX) + ID_ADDR_STR_LEN];
    struct centry *e = cache_get(rds, r->addr);
    struct lookup *lk;
    struct timeval tv;
    uint64_t ms = r->ctx->cfg->redis_timeout_ms;

    if (e != NULL) {
        enum herr err = e->rt.up->open(&e->rt, r);
        if (err == HERR_NONE)
            gw_req_arm_wait(r);
        return err;
    }
    if (rds->cmd.state != C_UP)
        return HERR_AGENT_OFFLINE; /* degraded: only local tunnels */
    if (rds->nlookups >= GW_RDS_MAX_LOOKUPS)
        return HERR_GATEWAY_BUSY;
    lk = calloc(1, sizeof(*lk));
    if (lk == NULL)
        return HERR_INTERNAL;
    lk->timer = evtimer_new(r->ctx->base, on_lookup_timeout, lk);
    if (lk->timer == NULL) {
        free(lk);
        return HERR_INTERNAL;
    }
    key_of(r->addr, key);
    if (redisAsyncCommand(rds->cmd.ac, on_lookup_reply, lk, "GET %s", key) != REDIS_OK) {
        rds->errors++;
        event_free(lk->timer);
        free(lk);
        return HERR_AGENT_OFFLINE;
    }
    lk->rds = rds;
    lk->r = r;
    memcpy(lk->addr, r->addr, ID_ADDR_LEN);
    list_insert_tail(&rds->lookups, &lk->link);
    rds->nlookups++;
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
    evtimer_add(lk->timer, &tv);
    gw_req_attach(r, &lookup_ops, lk);
    return HERR_NONE;
}

void gw_rds_peer_gone(struct gw_rds *rds, const char *addr, bool dead)
{
    struct list *n, *tmp;

    if (rds == NULL)
        return;
    LIST_FOREACH_SAFE(n, tmp, &rds->entries)
    {
        struct centry *e = LIST_ENTRY(n, struct centry, link);
        if (strcmp(e->adv, addr) != 0)
            continue;
        if (dead)
            send_script(rds, e->rt.addr, e->value, false, 0);
        centry_free(rds, e);
    }
}

/* ---- the subscription ---- */

static void on_message(redisAsyncContext *ac, void *reply, void *priv)
{
    struct gw_rds *rds = ac->data != NULL ? ((struct conn *)ac->data)->rds : NULL;
    redisReply *rep = reply;
    const redisReply *payload;
    const char *value;
    uint8_t addr[ID_ADDR_LEN];
    struct gw_rds_claim c;
    int kind;

    (void)priv;
    if (rds == NULL || rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->elements != 3 ||
        rep->element[0]->type != REDIS_REPLY_STRING ||
        strcmp(rep->element[0]->str, "message") != 0 ||
        rep->element[2]->type != REDIS_REPLY_STRING)
        return; /* the subscribe confirmation, or a disconnect */
    payload = rep->element[2];
    kind = gw_rds_msg_parse(payload->str, payload->len, addr, &c, &value);
    if (kind < 0)
        return;
    if (kind == 1 || strcmp(c.node, rds->ctx->node_id) == 0) {
        cache_forget(rds, addr);
        return;
    }
    superseded(rds, addr, &c);
    if (gw_reg_get(rds->ctx->reg, addr) == NULL)
        cache_put(rds, addr, &c, value);
}

/* ---- connections ---- */

static void schedule_retry(struct gw_rds *rds)
{
    struct timeval tv = {0, RECONNECT_MS * 1000};

    if (!evtimer_pending(rds->retry, NULL))
        evtimer_add(rds->retry, &tv);
}

static void on_ready(redisAsyncContext *ac, void *reply, void *priv)
{
    struct conn *c = priv;
    redisReply *rep = reply;

    if (c->ac != ac)
        return;
    if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
        c->rds->errors++;
        LOG_WARN(c->rds->ctx->log, "redis_refused",
                 LOG_S("err", rep != NULL ? rep->str : "connection lost"));
        redisAsyncDisconnect(ac);
        return;
    }
    if (c->state == C_UP)
        return;
    c->state = C_UP;
    note_state(c->rds);
    /* back (or first): every local address claimed again */
    if (!c->sub)
        gw_tun_each_route(c->rds->ctx, claim_cb, c->rds);
}

static void on_connect(const redisAsyncContext *cac, int status)
{
    struct conn *c = cac->data;
    redisAsyncContext *ac;
    const struct gw_cfg_redis *cfg;

    if (c == NULL)
        return;
    ac = c->ac;
    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback */
        c->rds->errors++;
        c->ac = NULL;
        c->state = C_DOWN;
        note_state(c->rds);
        schedule_retry(c->rds);
        return;
    }
    cfg = &c->rds->ctx->cfg->redis;
    if (cfg->password != NULL)
        redisAsyncCommand(ac, on_ready, c, "AUTH %s", cfg->password);
    if (c->sub) {
        redisAsyncCommand(ac, on_message, NULL, "SUBSCRIBE %s", CHANNEL);
        /* the subscription is up once the confirmation comes: a PING is
         * not allowed in this mode with RESP2 before Redis 6, so trust it */
        c->state = C_UP;
        note_state(c->rds);
    } else {
        redisAsyncCommand(ac, on_ready, c, "SELECT %u", cfg->db);
    }
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
    struct conn *c = cac->data;

    if (c == NULL)
        return;
    if (status != REDIS_OK)
        c->rds->errors++; /* lost, not closed by us */
    c->ac = NULL;
    c->state = C_DOWN;
    note_state(c->rds);
    schedule_retry(c->rds);
}

static void conn_start(struct conn *c)
{
    const struct gw_cfg_redis *cfg = &c->rds->ctx->cfg->redis;
    redisAsyncContext *ac;

    if (c->state != C_DOWN)
        return;
    ac = redisAsyncConnect(cfg->host, cfg->port);
    if (ac == NULL || ac->err) {
        c->rds->errors++;
        if (ac != NULL)
            redisAsyncFree(ac);
        schedule_retry(c->rds);
        return;
    }
    ac->data = c;
    if (redisLibeventAttach(ac, c->rds->ctx->base) != REDIS_OK) {
        redisAsyncFree(ac);
        schedule_retry(c->rds);
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
    c->state = C_CONNECTING;
}

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
    struct gw_rds *rds = arg;

    conn_start(&rds->cmd);
    conn_start(&rds->sub);
}

struct gw_rds *gw_rds_new(struct gw_ctx *ctx)
{
    struct gw_rds *rds = calloc(1, sizeof(*rds));
    struct timeval tv;

    if (rds == NULL)
        return NULL;
    rds->ctx = ctx;
    rds->cmd.rds = rds;
    rds->sub.rds = rds;
    rds->sub.sub = true;
    list_init(&rds->entries);
    list_init(&rds->lookups);
    list_init(&rds->cmds);
    rds->cache = gw_reg_new();
    rds->retry = evtimer_new(ctx->base, on_retry, rds);
    rds->refresh = evtimer_new(ctx->base, on_refresh, rds);
    if (rds->cache == NULL || rds->retry == NULL || rds->refresh == NULL) {
        gw_rds_free(rds);
        return NULL;
    }
    tv.tv_sec = (time_t)(refresh_ms(ctx) / 1000);
    tv.tv_usec = 0;
    evtimer_add(rds->refresh, &tv);
    conn_start(&rds->cmd);
    conn_start(&rds->sub);
    return rds;
}

static void conn_stop(struct conn *c)
{
    redisAsyncContext *ac = c->ac;

    if (ac == NULL)
        return;
    /* no callback of ours may run on a half-freed rds: detach first;
     * pending replies still arrive (NULL) and free their privdata */
    ac->data = NULL;
    c->ac = NULL;
    c->state = C_DOWN;
    redisAsyncFree(ac);
}

void gw_rds_free(struct gw_rds *rds)
{
    struct list *n, *tmp;

    if (rds == NULL)
        return;
    /* orphan what is in flight: the reply callbacks free it */
    LIST_FOREACH_SAFE(n, tmp, &rds->cmds)
    {
        struct cmd *c = LIST_ENTRY(n, struct cmd, link);
        list_unlink(&c->link);
        c->rds = NULL;
    }
    LIST_FOREACH_SAFE(n, tmp, &rds->lookups)
    {
        struct lookup *lk = LIST_ENTRY(n, struct lookup, link);
        struct gw_req *r = lk->r;
        lookup_detach(lk);
        list_unlink(&lk->link);
        lk->rds = NULL;
        if (r != NULL)
            gw_req_fail(r, HERR_AGENT_OFFLINE);
    }
    rds->nlookups = 0;
    conn_stop(&rds->cmd);
    conn_stop(&rds->sub);
    while (!list_is_empty(&rds->entries))
        centry_free(rds, LIST_ENTRY(rds->entries.next, struct centry, link));
    if (rds->retry != NULL)
        event_free(rds->retry);
    if (rds->refresh != NULL)
        event_free(rds->refresh);
    gw_reg_free(rds->cache);
    free(rds);
}
