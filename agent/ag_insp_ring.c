/* The inspector's capture ring (ag_insp_ring.h). Entries sit on one list in
 * the order they began; a finished entry past max_entries is freed from the
 * front (the oldest begun). Memory is accounted per entry as it grows, so
 * ag_insp_ring_mem() is what the captures hold. Bodies grow by doubling up
 * to body_bytes; what comes after is only counted. */
#include "ag_insp_ring.h"

#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>

#include "util.h"

struct ag_insp_ring {
    struct list ents;   /* struct ag_insp_ent, oldest first; owned */
    size_t count;       /* entries on ents */
    size_t finished;    /* of them, not active */
    size_t max_entries; /* finished entries kept */
    size_t body_bytes;  /* bytes kept per body */
    size_t mem;         /* sum of the entries' mem */
    uint64_t next_id;
    ag_insp_ring_evict_cb evict_cb; /* told of trim's and clear's frees, or NULL */
    void *evict_arg;
};

#define ENT_OF(node) LIST_ENTRY(node, struct ag_insp_ent, link)

struct ag_insp_ring *ag_insp_ring_new(size_t max_entries, size_t body_bytes)
{
    struct ag_insp_ring *r = calloc(1, sizeof(*r));

    if (r == NULL)
        return NULL;
    list_init(&r->ents);
    r->max_entries = max_entries > 0 ? max_entries : 1;
    r->body_bytes = body_bytes;
    r->next_id = 1;
    return r;
}

static void kvs_cleanup(struct ag_insp_kvs *k)
{
    for (size_t i = 0; i < k->n; i++)
        free(k->v[i].name);
    free(k->v);
    memset(k, 0, sizeof(*k));
}

static void ent_free(struct ag_insp_ring *r, struct ag_insp_ent *e)
{
    list_unlink(&e->link);
    r->count--;
    if (!e->active)
        r->finished--;
    r->mem -= e->mem;
    kvs_cleanup(&e->req_hdrs);
    kvs_cleanup(&e->resp_hdrs);
    free(e->req_body.data);
    free(e->resp_body.data);
    free(e->path);
    free(e->authority);
    free(e);
}

void ag_insp_ring_free(struct ag_insp_ring *r)
{
    struct list *n, *tmp;

    if (r == NULL)
        return;
    LIST_FOREACH_SAFE(n, tmp, &r->ents)
    {
        ent_free(r, ENT_OF(n));
    }
    free(r);
}

static void ent_account(struct ag_insp_ring *r, struct ag_insp_ent *e, size_t n)
{
    e->mem += n;
    r->mem += n;
}

/* Appends one field, unless the list's byte budget is spent. */
static int kvs_add(struct ag_insp_ring *r, struct ag_insp_ent *e, struct ag_insp_kvs *k,
                   const char *name, size_t nlen, const char *value, size_t vlen)
{
    char *block;

    if (nlen > AG_INSP_HDR_BYTES || vlen > AG_INSP_HDR_BYTES - nlen ||
        k->bytes + nlen + vlen > AG_INSP_HDR_BYTES) {
        k->truncated = true;
        return 0;
    }
    if (k->n == k->cap) {
        size_t cap = k->cap != 0 ? k->cap * 2 : 16;
        struct ag_insp_kv *v = realloc(k->v, cap * sizeof(*v));
        if (v == NULL)
            return -1;
        ent_account(r, e, (cap - k->cap) * sizeof(*v));
        k->v = v;
        k->cap = cap;
    }
    block = malloc(nlen + vlen + 2);
    if (block == NULL)
        return -1;
    memcpy(block, name, nlen);
    block[nlen] = '\0';
    memcpy(block + nlen + 1, value, vlen);
    block[nlen + 1 + vlen] = '\0';
    k->v[k->n] = (struct ag_insp_kv){block, block + nlen + 1, nlen, vlen};
    k->n++;
    k->bytes += nlen + vlen;
    ent_account(r, e, nlen + vlen + 2);
    return 0;
}

static char *dup_mem(const char *p, size_t len)
{
    char *s = malloc(len + 1);

    if (s == NULL)
        return NULL;
    memcpy(s, p, len);
    s[len] = '\0';
    return s;
}

/* The first address of an x-forwarded-for value. */
static void set_client(struct ag_insp_ent *e, struct iov v)
{
    size_t n = 0;

    while (n < v.len && v.base[n] != ',')
        n++;
    while (n > 0 && (v.base[n - 1] == ' ' || v.base[n - 1] == '\t'))
        n--;
    if (n >= sizeof(e->client))
        n = sizeof(e->client) - 1;
    memcpy(e->client, v.base, n);
    e->client[n] = '\0';
}

struct ag_insp_ent *ag_insp_ring_begin(struct ag_insp_ring *r, const struct ag_fwd_request *rq,
                                       const struct ag_insp_origin *o, int64_t now_ms,
                                       uint64_t mono_ms)
{
    struct ag_insp_ent *e = calloc(1, sizeof(*e));
    size_t mlen = rq->method.len < sizeof(e->method) ? rq->method.len : sizeof(e->method) - 1;
    size_t plen = rq->path.len < AG_INSP_HDR_BYTES ? rq->path.len : AG_INSP_HDR_BYTES;

    if (e == NULL)
        return NULL;
    e->path = dup_mem(rq->path.base != NULL ? rq->path.base : "", plen);
    e->authority = dup_mem(rq->authority.base != NULL ? rq->authority.base : "",
                           rq->authority.len < 256 ? rq->authority.len : 256);
    if (e->path == NULL || e->authority == NULL)
        goto fail_e;
    e->id = r->next_id++;
    e->replay_of = o->replay_of;
    e->time_ms = now_ms;
    e->start_mono_ms = mono_ms;
    (void)util_snprintf(e->agent_name, sizeof(e->agent_name), "%s", o->agent_name);
    (void)util_snprintf(e->agent_id, sizeof(e->agent_id), "%s", o->agent_id);
    (void)util_snprintf(e->address, sizeof(e->address), "%s", o->address);
    memcpy(e->method, rq->websocket ? "GET" : rq->method.base, rq->websocket ? 3 : mlen);
    e->has_body = rq->has_body;
    e->websocket = rq->websocket;
    e->active = true;
    list_init(&e->link);
    list_insert_tail(&r->ents, &e->link);
    r->count++;
    ent_account(r, e, sizeof(*e) + plen + 1 + strlen(e->authority) + 1);
    for (size_t i = 0; i < rq->nhdrs; i++) {
        const struct ag_fwd_hdr *h = &rq->hdrs[i];
        if (util_iov_ieq_str(h->name, "x-forwarded-for") && e->client[0] == '\0')
            set_client(e, h->value);
        if (util_iov_ieq_str(h->name, "x-request-id") && e->request_id[0] == '\0')
            (void)util_snprintf(e->request_id, sizeof(e->request_id), "%.*s",
                                (int)(h->value.len < 64 ? h->value.len : 64), h->value.base);
        if (kvs_add(r, e, &e->req_hdrs, h->name.base, h->name.len, h->value.base, h->value.len) !=
            0) {
            ent_free(r, e);
            return NULL;
        }
    }
    return e;

fail_e:
    free(e->path);
    free(e->authority);
    free(e);
    return NULL;
}

static void body_add(struct ag_insp_ring *r, struct ag_insp_ent *e, struct ag_insp_body *b,
                     const uint8_t *data, size_t len)
{
    size_t room = r->body_bytes - b->len;
    size_t take = len < room ? len : room;

    b->total += len;
    if (take < len)
        b->truncated = true;
    if (take == 0)
        return;
    if (b->len + take > b->cap) {
        size_t cap = b->cap != 0 ? b->cap : 4096;
        uint8_t *d;
        while (cap < b->len + take)
            cap *= 2;
        if (cap > r->body_bytes)
            cap = r->body_bytes;
        d = realloc(b->data, cap);
        if (d == NULL) {
            b->truncated = true; /* out of memory: keep what we have */
            return;
        }
        ent_account(r, e, cap - b->cap);
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, take);
    b->len += take;
}

void ag_insp_ring_ws_feed(struct ag_insp_wsc *w, const uint8_t *p, size_t n)
{
    while (n > 0) {
        size_t need;
        uint8_t l7;
        uint64_t len;

        if (w->left > 0) {
            size_t k = n < w->left ? n : (size_t)w->left;
            w->left -= k;
            p += k;
            n -= k;
            continue;
        }
        w->hdr[w->hlen++] = *p++;
        n--;
        if (w->hlen < 2)
            continue;
        l7 = w->hdr[1] & 0x7f;
        need = 2u + (l7 == 126 ? 2u : l7 == 127 ? 8u : 0u) + ((w->hdr[1] & 0x80) ? 4u : 0u);
        if (w->hlen < need)
            continue;
        len = l7;
        if (l7 == 126) {
            len = (uint64_t)w->hdr[2] << 8 | w->hdr[3];
        } else if (l7 == 127) {
            len = 0;
            for (size_t i = 2; i < 10; i++)
                len = len << 8 | w->hdr[i];
        }
        w->frames++;
        if ((w->hdr[0] & 0x80) && (w->hdr[0] & 0x0f) < 8)
            w->messages++;
        w->left = len;
        w->hlen = 0;
    }
}

void ag_insp_ring_req_body(struct ag_insp_ring *r, struct ag_insp_ent *e, const uint8_t *data,
                           size_t len)
{
    if (e->websocket)
        ag_insp_ring_ws_feed(&e->ws_in, data, len);
    body_add(r, e, &e->req_body, data, len);
}

void ag_insp_ring_resp_body(struct ag_insp_ring *r, struct ag_insp_ent *e, const uint8_t *data,
                            size_t len)
{
    if (e->websocket)
        ag_insp_ring_ws_feed(&e->ws_out, data, len);
    body_add(r, e, &e->resp_body, data, len);
}

void ag_insp_ring_resp_head(struct ag_insp_ring *r, struct ag_insp_ent *e, int status,
                            const nghttp2_nv *nv, size_t nnv, uint64_t mono_ms)
{
    e->status = status;
    e->head_ms = mono_ms - e->start_mono_ms;
    for (size_t i = 0; i < nnv; i++)
        if (kvs_add(r, e, &e->resp_hdrs, (const char *)nv[i].name, nv[i].namelen,
                    (const char *)nv[i].value, nv[i].valuelen) != 0)
            e->resp_hdrs.truncated = true;
}

void ag_insp_ring_trim(struct ag_insp_ring *r)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &r->ents)
    {
        if (r->finished <= r->max_entries)
            break;
        if (!ENT_OF(n)->active) {
            if (r->evict_cb != NULL)
                r->evict_cb(r->evict_arg, ENT_OF(n)->id);
            ent_free(r, ENT_OF(n));
        }
    }
}

void ag_insp_ring_end(struct ag_insp_ring *r, struct ag_insp_ent *e, const char *err,
                      uint64_t mono_ms)
{
    if (!e->active)
        return;
    e->active = false;
    r->finished++;
    e->total_ms = mono_ms - e->start_mono_ms;
    if (err != NULL)
        (void)util_snprintf(e->err, sizeof(e->err), "%s", err);
}

struct ag_insp_ent *ag_insp_ring_find(struct ag_insp_ring *r, uint64_t id)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &r->ents)
    {
        if (ENT_OF(n)->id == id)
            return ENT_OF(n);
    }
    return NULL;
}

void ag_insp_ring_clear(struct ag_insp_ring *r)
{
    struct list *n, *tmp;

    LIST_FOREACH_SAFE(n, tmp, &r->ents)
    {
        if (!ENT_OF(n)->active) {
            if (r->evict_cb != NULL)
                r->evict_cb(r->evict_arg, ENT_OF(n)->id);
            ent_free(r, ENT_OF(n));
        }
    }
}

void ag_insp_ring_set_evict_cb(struct ag_insp_ring *r, ag_insp_ring_evict_cb cb, void *arg)
{
    r->evict_cb = cb;
    r->evict_arg = arg;
}

size_t ag_insp_ring_count(const struct ag_insp_ring *r) { return r->count; }
size_t ag_insp_ring_mem(const struct ag_insp_ring *r) { return r->mem; }
size_t ag_insp_ring_body_bytes(const struct ag_insp_ring *r) { return r->body_bytes; }

size_t ag_insp_ring_mem_limit(const struct ag_insp_ring *r)
{
    /* per entry: the struct, path/authority and both header lists (each
     * within AG_INSP_HDR_BYTES plus its index, at most 2x the fields), two
     * bodies */
    size_t per = sizeof(struct ag_insp_ent) + 2 * AG_INSP_HDR_BYTES + 257 +
                 2 * (AG_INSP_HDR_BYTES + AG_INSP_HDR_BYTES / 2 * 2 * sizeof(struct ag_insp_kv)) +
                 2 * r->body_bytes;
    return r->max_entries * per;
}

bool ag_insp_ring_is_secret(const char *name, size_t len)
{
    static const char *const secret[] = {"authorization", "proxy-authorization", "cookie",
                                         "set-cookie"};
    struct iov n = {name, len};

    for (size_t i = 0; i < sizeof(secret) / sizeof(secret[0]); i++)
        if (util_iov_ieq_str(n, secret[i]))
            return true;
    return false;
}

/* ---- JSON ------------------------------------------------------------------ */

static cJSON *add_str(cJSON *o, const char *k, const char *v)
{
    return cJSON_AddStringToObject(o, k, v);
}

cJSON *ag_insp_ring_summary_json(const struct ag_insp_ent *e)
{
    cJSON *o = cJSON_CreateObject();

    if (o == NULL)
        return NULL;
    if (cJSON_AddNumberToObject(o, "id", (double)e->id) == NULL ||
        cJSON_AddNumberToObject(o, "time_ms", (double)e->time_ms) == NULL ||
        add_str(o, "agent", e->agent_name) == NULL || add_str(o, "agent_id", e->agent_id) == NULL ||
        add_str(o, "address", e->address) == NULL || add_str(o, "method", e->method) == NULL ||
        add_str(o, "path", e->path) == NULL || add_str(o, "host", e->authority) == NULL ||
        add_str(o, "client", e->client) == NULL || add_str(o, "request_id", e->request_id) == NULL ||
        cJSON_AddNumberToObject(o, "status", e->status) == NULL ||
        (e->err[0] != '\0' ? add_str(o, "error", e->err) : cJSON_AddNullToObject(o, "error")) ==
            NULL ||
        cJSON_AddBoolToObject(o, "active", e->active) == NULL ||
        cJSON_AddBoolToObject(o, "websocket", e->websocket) == NULL ||
        (e->replay_of != 0 ? cJSON_AddNumberToObject(o, "replay_of", (double)e->replay_of)
                           : cJSON_AddNullToObject(o, "replay_of")) == NULL ||
        cJSON_AddNumberToObject(o, "head_ms", (double)e->head_ms) == NULL ||
        cJSON_AddNumberToObject(o, "total_ms", (double)e->total_ms) == NULL ||
        cJSON_AddNumberToObject(o, "req_bytes", (double)e->req_body.total) == NULL ||
        cJSON_AddNumberToObject(o, "resp_bytes", (double)e->resp_body.total) == NULL ||
        cJSON_AddNumberToObject(o, "ws_messages_in", (double)e->ws_in.messages) == NULL ||
        cJSON_AddNumberToObject(o, "ws_messages_out", (double)e->ws_out.messages) == NULL) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static cJSON *kvs_json(const struct ag_insp_kvs *k, bool reveal)
{
    cJSON *arr = cJSON_CreateArray();

    if (arr == NULL)
        return NULL;
    for (size_t i = 0; i < k->n; i++) {
        const struct ag_insp_kv *kv = &k->v[i];
        bool mask = !reveal && ag_insp_ring_is_secret(kv->name, kv->name_len);
        cJSON *h = cJSON_CreateObject();
        if (h == NULL || !cJSON_AddItemToArray(arr, h) || add_str(h, "name", kv->name) == NULL ||
            add_str(h, "value", mask ? "********" : kv->value) == NULL ||
            cJSON_AddBoolToObject(h, "masked", mask) == NULL) {
            cJSON_Delete(arr);
            return NULL;
        }
    }
    return arr;
}

static cJSON *body_json(const struct ag_insp_body *b)
{
    cJSON *o = cJSON_CreateObject();
    size_t enc_len = 4 * ((b->len + 2) / 3) + 1;
    unsigned char *enc = malloc(enc_len);

    if (o == NULL || enc == NULL)
        goto fail;
    (void)EVP_EncodeBlock(enc, b->data != NULL ? b->data : (const unsigned char *)"", (int)b->len);
    if (add_str(o, "b64", (const char *)enc) == NULL ||
        cJSON_AddNumberToObject(o, "len", (double)b->len) == NULL ||
        cJSON_AddNumberToObject(o, "total", (double)b->total) == NULL ||
        cJSON_AddBoolToObject(o, "truncated", b->truncated) == NULL)
        goto fail;
    free(enc);
    return o;

fail:
    free(enc);
    cJSON_Delete(o);
    return NULL;
}

static bool add_item(cJSON *o, const char *k, cJSON *item)
{
    if (item == NULL)
        return false;
    if (!cJSON_AddItemToObject(o, k, item)) {
        cJSON_Delete(item);
        return false;
    }
    return true;
}

cJSON *ag_insp_ring_detail_json(const struct ag_insp_ent *e, bool reveal)
{
    cJSON *o = ag_insp_ring_summary_json(e);
    cJSON *rq = o != NULL ? cJSON_AddObjectToObject(o, "request") : NULL;
    cJSON *rs = o != NULL ? cJSON_AddObjectToObject(o, "response") : NULL;

    if (rq == NULL || rs == NULL || !add_item(rq, "headers", kvs_json(&e->req_hdrs, reveal)) ||
        cJSON_AddBoolToObject(rq, "headers_truncated", e->req_hdrs.truncated) == NULL ||
        cJSON_AddBoolToObject(rq, "has_body", e->has_body) == NULL ||
        !add_item(rq, "body", body_json(&e->req_body)) ||
        !add_item(rs, "headers", kvs_json(&e->resp_hdrs, reveal)) ||
        cJSON_AddBoolToObject(rs, "headers_truncated", e->resp_hdrs.truncated) == NULL ||
        !add_item(rs, "body", body_json(&e->resp_body))) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

cJSON *ag_insp_ring_stats_json(const struct ag_insp_ring *r)
{
    cJSON *o = cJSON_CreateObject();

    if (o == NULL || cJSON_AddNumberToObject(o, "entries", (double)r->count) == NULL ||
        cJSON_AddNumberToObject(o, "max_entries", (double)r->max_entries) == NULL ||
        cJSON_AddNumberToObject(o, "body_bytes", (double)r->body_bytes) == NULL ||
        cJSON_AddNumberToObject(o, "memory_bytes", (double)r->mem) == NULL ||
        cJSON_AddNumberToObject(o, "memory_limit_bytes", (double)ag_insp_ring_mem_limit(r)) ==
            NULL ||
        cJSON_AddNumberToObject(o, "last_id", (double)(r->next_id - 1)) == NULL) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

cJSON *ag_insp_ring_list_json(const struct ag_insp_ring *r, uint64_t after, size_t limit)
{
    cJSON *arr = cJSON_CreateArray();
    const struct list *n;
    size_t skip = 0, total = 0;

    if (arr == NULL)
        return NULL;
    for (n = r->ents.next; n != &r->ents; n = n->next)
        total += ENT_OF(n)->id > after;
    if (total > limit)
        skip = total - limit;
    for (n = r->ents.next; n != &r->ents; n = n->next) {
        const struct ag_insp_ent *e = ENT_OF(n);
        cJSON *s;
        if (e->id <= after)
            continue;
        if (skip > 0) {
            skip--;
            continue;
        }
        s = ag_insp_ring_summary_json(e);
        if (s == NULL || !cJSON_AddItemToArray(arr, s)) {
            cJSON_Delete(s);
            cJSON_Delete(arr);
            return NULL;
        }
    }
    return arr;
}

/* ---- saved entries ------------------------------------------------------------ */

cJSON *ag_insp_ring_save_json(const struct ag_insp_ent *e)
{
    cJSON *o = ag_insp_ring_detail_json(e, true);
    const char *side[] = {"request", "response"};

    if (o == NULL)
        return NULL;
    for (size_t i = 0; i < 2; i++)
        cJSON_DeleteItemFromObjectCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(o, side[i]), "body"),
            "b64");
    return o;
}

/* A number field in [0, max], as an integer. */
static int j_uint(const cJSON *o, const char *k, uint64_t max, uint64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > (double)max ||
        v->valuedouble != (double)(uint64_t)v->valuedouble)
        return -1;
    *out = (uint64_t)v->valuedouble;
    return 0;
}

/* A string field copied into out (it must fit). */
static int j_str(const cJSON *o, const char *k, char *out, size_t outlen)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

    if (!cJSON_IsString(v) || strlen(v->valuestring) >= outlen)
        return -1;
    memcpy(out, v->valuestring, strlen(v->valuestring) + 1);
    return 0;
}

static int j_bool(const cJSON *o, const char *k, bool *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

    if (!cJSON_IsBool(v))
        return -1;
    *out = cJSON_IsTrue(v);
    return 0;
}

static int restore_hdrs(struct ag_insp_ring *r, struct ag_insp_ent *e, struct ag_insp_kvs *k,
                        const cJSON *side)
{
    const cJSON *hs = cJSON_GetObjectItemCaseSensitive(side, "headers");
    const cJSON *h;
    bool trunc = false;

    if (!cJSON_IsArray(hs) || j_bool(side, "headers_truncated", &trunc) != 0)
        return -1;
    cJSON_ArrayForEach(h, hs)
    {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(h, "name");
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, "value");
        if (!cJSON_IsString(n) || !cJSON_IsString(v))
            return -1;
        if (kvs_add(r, e, k, n->valuestring, strlen(n->valuestring), v->valuestring,
                    strlen(v->valuestring)) != 0)
            return -1;
    }
    k->truncated = k->truncated || trunc;
    return 0;
}

static int restore_body(struct ag_insp_ring *r, struct ag_insp_ent *e, struct ag_insp_body *b,
                        const cJSON *side, const uint8_t *data, size_t len)
{
    const cJSON *bo = cJSON_GetObjectItemCaseSensitive(side, "body");
    uint64_t total;
    bool trunc;

    if (j_uint(bo, "total", UINT64_C(1) << 53, &total) != 0 || j_bool(bo, "truncated", &trunc) != 0 ||
        total < len)
        return -1;
    body_add(r, e, b, data, len);
    b->total = total;
    b->truncated = trunc || b->len < total;
    return 0;
}

int ag_insp_ring_restore(struct ag_insp_ring *r, const char *text, size_t len,
                         const uint8_t *req, size_t req_len, const uint8_t *resp, size_t resp_len)
{
    cJSON *o = cJSON_ParseWithLength(text, len);
    const cJSON *rq = cJSON_GetObjectItemCaseSensitive(o, "request");
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(o, "response");
    const cJSON *path = cJSON_GetObjectItemCaseSensitive(o, "path");
    const cJSON *host = cJSON_GetObjectItemCaseSensitive(o, "host");
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(o, "error");
    const cJSON *rof = cJSON_GetObjectItemCaseSensitive(o, "replay_of");
    struct ag_insp_ent *e = calloc(1, sizeof(*e));
    uint64_t id, t, st, v = 0;

    if (e == NULL || !cJSON_IsObject(rq) || !cJSON_IsObject(rs) || !cJSON_IsString(path) ||
        !cJSON_IsString(host) || strlen(path->valuestring) > AG_INSP_HDR_BYTES ||
        strlen(host->valuestring) > 256 || j_uint(o, "id", UINT64_C(1) << 53, &id) != 0 ||
        id < r->next_id || id == 0 || j_uint(o, "time_ms", UINT64_C(1) << 53, &t) != 0 ||
        j_uint(o, "status", 999, &st) != 0 || j_str(o, "agent", e->agent_name, sizeof(e->agent_name)) != 0 ||
        j_str(o, "agent_id", e->agent_id, sizeof(e->agent_id)) != 0 ||
        j_str(o, "address", e->address, sizeof(e->address)) != 0 ||
        j_str(o, "method", e->method, sizeof(e->method)) != 0 ||
        j_str(o, "client", e->client, sizeof(e->client)) != 0 ||
        j_str(o, "request_id", e->request_id, sizeof(e->request_id)) != 0 ||
        j_bool(o, "websocket", &e->websocket) != 0 || j_bool(rq, "has_body", &e->has_body) != 0 ||
        j_uint(o, "head_ms", UINT64_C(1) << 53, &e->head_ms) != 0 ||
        j_uint(o, "total_ms", UINT64_C(1) << 53, &e->total_ms) != 0 ||
        j_uint(o, "ws_messages_in", UINT64_C(1) << 53, &e->ws_in.messages) != 0 ||
        j_uint(o, "ws_messages_out", UINT64_C(1) << 53, &e->ws_out.messages) != 0 ||
        !(cJSON_IsNull(err) || (cJSON_IsString(err) && strlen(err->valuestring) < AG_INSP_ERR_MAX)) ||
        !(cJSON_IsNull(rof) || (j_uint(o, "replay_of", id - 1, &v) == 0 && v > 0)))
        goto fail_e;
    e->path = dup_mem(path->valuestring, strlen(path->valuestring));
    e->authority = dup_mem(host->valuestring, strlen(host->valuestring));
    if (e->path == NULL || e->authority == NULL)
        goto fail_e;
    e->id = id;
    e->time_ms = (int64_t)t;
    e->status = (int)st;
    e->replay_of = cJSON_IsNull(rof) ? 0 : v;
    if (cJSON_IsString(err))
        memcpy(e->err, err->valuestring, strlen(err->valuestring) + 1);
    list_init(&e->link);
    list_insert_tail(&r->ents, &e->link);
    r->count++;
    r->finished++;
    ent_account(r, e, sizeof(*e) + strlen(e->path) + 1 + strlen(e->authority) + 1);
    if (restore_hdrs(r, e, &e->req_hdrs, rq) != 0 || restore_hdrs(r, e, &e->resp_hdrs, rs) != 0 ||
        restore_body(r, e, &e->req_body, rq, req, req_len) != 0 ||
        restore_body(r, e, &e->resp_body, rs, resp, resp_len) != 0) {
        ent_free(r, e);
        cJSON_Delete(o);
        return -1;
    }
    r->next_id = id + 1;
    cJSON_Delete(o);
    return 0;

fail_e:
    if (e != NULL) {
        free(e->path);
        free(e->authority);
    }
    free(e);
    cJSON_Delete(o);
    return -1;
}
