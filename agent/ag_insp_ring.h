/* The inspector's capture ring: the last N request/response exchanges the
 * agent forwarded (or replayed), as plain data, with their JSON views. No
 * I/O and no event loop: ag_insp drives it from the capture hooks in ag_fwd
 * and serves it over HTTP; tests/unit/test_ag_insp_ring.c drives it alone.
 * Bounds: at most max_entries finished entries are kept (in-flight ones are
 * never evicted, and are themselves bounded by the agents' in-flight caps);
 * each body keeps at most body_bytes (the rest is counted, and the body
 * marked truncated); each header list keeps at most AG_INSP_HDR_BYTES. */
#ifndef AG_INSP_RING_H
#define AG_INSP_RING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

#include "ag_fwd.h"
#include "list.h"

struct cJSON;

#define AG_INSP_HDR_BYTES (64u * 1024u) /* header bytes kept per direction */
#define AG_INSP_ERR_MAX 32

/* One header field as captured: name and value in one allocation. */
struct ag_insp_kv {
    char *name; /* NUL-terminated; value follows it in the same block */
    char *value;
    size_t name_len;
    size_t value_len;
};

struct ag_insp_kvs {
    struct ag_insp_kv *v;
    size_t n;
    size_t cap;
    size_t bytes;   /* name + value bytes kept */
    bool truncated; /* fields dropped past AG_INSP_HDR_BYTES */
};

struct ag_insp_body {
    uint8_t *data;  /* the first len bytes of the body */
    size_t len;     /* bytes kept (<= the ring's body_bytes) */
    size_t cap;     /* allocated */
    uint64_t total; /* bytes seen, kept or not */
    bool truncated; /* total > len */
};

/* Counts RFC 6455 frames in one direction of a raw WebSocket byte stream:
 * headers are parsed (section 5.2), payloads skipped, nothing validated (the
 * endpoints do that). Fed in pieces of any size. */
struct ag_insp_wsc {
    uint8_t hdr[14];   /* the frame header gathered so far */
    uint8_t hlen;      /* its bytes */
    uint64_t left;     /* payload bytes of the current frame still to skip */
    uint64_t frames;   /* frames seen */
    uint64_t messages; /* data messages completed (FIN on a non-control frame) */
};

/* Who a captured request belongs to, copied into the entry. */
struct ag_insp_origin {
    const char *agent_name;
    const char *agent_id;
    const char *address;
    uint64_t replay_of; /* id of the entry this one replays, 0 for a tunnel request */
};

/* One exchange. Owned by the ring (ring->ents); the forwarder that fills it
 * borrows it while it is active (never evicted then). */
struct ag_insp_ent {
    struct list link; /* the ring's list, oldest first */
    uint64_t id;      /* 1, 2, ... per ring */
    uint64_t replay_of;
    int64_t time_ms;        /* unix ms when the request head arrived */
    uint64_t start_mono_ms; /* monotonic ms, for the timings */
    uint64_t head_ms;       /* ms from start to the response head, 0 before */
    uint64_t total_ms;      /* ms from start to the end, 0 while active */
    char agent_name[65];
    char agent_id[37];
    char address[43];
    char method[32];
    char *path;      /* path and query as received, NUL-terminated */
    char *authority; /* public host */
    char client[64]; /* the first x-forwarded-for address, "" if none */
    char request_id[65]; /* x-request-id (the gateway's), "" if none */
    struct ag_insp_kvs req_hdrs;
    struct ag_insp_body req_body;
    bool has_body;  /* the request had a body (even an empty one) */
    bool websocket; /* extended CONNECT: bodies are the raw bytes each way */
    int status;     /* response status, 0 before the head (WebSocket: 101) */
    struct ag_insp_kvs resp_hdrs;
    struct ag_insp_body resp_body;
    struct ag_insp_wsc ws_in;   /* WebSocket: client -> local API frames */
    struct ag_insp_wsc ws_out;  /* WebSocket: local API -> client frames */
    bool active;                /* still being forwarded */
    char err[AG_INSP_ERR_MAX];  /* error code, "" if none */
    size_t mem;                 /* bytes accounted to this entry */
};

struct ag_insp_ring;

/* A ring keeping max_entries finished entries (>= 1) and body_bytes per
 * body. Returns NULL if out of memory. */
struct ag_insp_ring *ag_insp_ring_new(size_t max_entries, size_t body_bytes);

/* Frees every entry, active ones too (their users must be gone). Takes NULL. */
void ag_insp_ring_free(struct ag_insp_ring *r);

/* Records a new active entry for rq (borrowed for the call). Returns it, or
 * NULL if out of memory (the request is then not captured). */
struct ag_insp_ent *ag_insp_ring_begin(struct ag_insp_ring *r, const struct ag_fwd_request *rq,
                                       const struct ag_insp_origin *o, int64_t now_ms,
                                       uint64_t mono_ms);

/* Appends body bytes, up to the ring's body_bytes; the rest is counted. */
void ag_insp_ring_req_body(struct ag_insp_ring *r, struct ag_insp_ent *e, const uint8_t *data,
                           size_t len);
void ag_insp_ring_resp_body(struct ag_insp_ring *r, struct ag_insp_ent *e, const uint8_t *data,
                            size_t len);

/* The response head (names as given, values as given). */
void ag_insp_ring_resp_head(struct ag_insp_ring *r, struct ag_insp_ent *e, int status,
                            const nghttp2_nv *nv, size_t nnv, uint64_t mono_ms);

/* The exchange is over (err: its error code, or NULL): e is finished, and
 * may be evicted by the next ag_insp_ring_trim(). */
void ag_insp_ring_end(struct ag_insp_ring *r, struct ag_insp_ent *e, const char *err,
                      uint64_t mono_ms);

/* Frees the oldest-begun finished entries beyond max_entries. That may
 * include one just ended (a long stream begun before max_entries newer,
 * finished ones): call it once done with the entry. */
void ag_insp_ring_trim(struct ag_insp_ring *r);

/* Feeds n bytes of one direction to w. */
void ag_insp_ring_ws_feed(struct ag_insp_wsc *w, const uint8_t *p, size_t n);

/* The entry with this id, or NULL. */
struct ag_insp_ent *ag_insp_ring_find(struct ag_insp_ring *r, uint64_t id);

/* Frees every finished entry (active ones stay). */
void ag_insp_ring_clear(struct ag_insp_ring *r);

/* Called with the id of every entry that trim or clear frees (ag_insp
 * deletes its saved files). */
typedef void (*ag_insp_ring_evict_cb)(void *arg, uint64_t id);
void ag_insp_ring_set_evict_cb(struct ag_insp_ring *r, ag_insp_ring_evict_cb cb, void *arg);

/* --inspect-save: the entry as saved (the detail with secrets revealed and
 * the bodies' bytes left out: they are saved alongside), NULL if out of
 * memory. */
struct cJSON *ag_insp_ring_save_json(const struct ag_insp_ent *e);

/* Adds a finished entry from its saved JSON (text of len bytes, untrusted:
 * every field is checked) and its bodies (kept up to body_bytes). Its id
 * must be above every id the ring has given out; the next new entry comes
 * after it. Returns 0, or -1 (malformed, or out of memory) with nothing
 * changed. */
int ag_insp_ring_restore(struct ag_insp_ring *r, const char *text, size_t len,
                         const uint8_t *req, size_t req_len, const uint8_t *resp, size_t resp_len);

size_t ag_insp_ring_count(const struct ag_insp_ring *r);
/* Bytes held by all entries now. */
size_t ag_insp_ring_mem(const struct ag_insp_ring *r);
/* The most the finished entries can hold: max_entries * (2 body_bytes +
 * 2 AG_INSP_HDR_BYTES + overhead). */
size_t ag_insp_ring_mem_limit(const struct ag_insp_ring *r);
size_t ag_insp_ring_body_bytes(const struct ag_insp_ring *r);

/* True for the fields whose values the page masks: authorization,
 * proxy-authorization, cookie, set-cookie (any case). */
bool ag_insp_ring_is_secret(const char *name, size_t len);

/* JSON views (NULL if out of memory; the caller deletes them):
 * summary: id, time_ms, agent, address, method, path, status, error, ...;
 * detail: the summary plus headers (secret values masked unless reveal) and
 * bodies (base64); list: the entries with id > after, oldest first, at most
 * limit (the newest ones) of them; stats: counts and memory. */
struct cJSON *ag_insp_ring_summary_json(const struct ag_insp_ent *e);
struct cJSON *ag_insp_ring_detail_json(const struct ag_insp_ent *e, bool reveal);
struct cJSON *ag_insp_ring_list_json(const struct ag_insp_ring *r, uint64_t after, size_t limit);
struct cJSON *ag_insp_ring_stats_json(const struct ag_insp_ring *r);

#endif
