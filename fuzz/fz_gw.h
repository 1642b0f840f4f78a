/* Shared harness of the gateway's fuzz targets (fuzz_h1_head, fuzz_tun_h2_gw,
 * fuzz_osr): a real gateway context (gw_ctx_new, plain HTTP, a fake clock and
 * a deterministic random source), public clients on socketpairs served by
 * the real HTTP/1.1 front end (gw_h1_start), an agent side that opens a real
 * tunnel (gw_tun_accept) and authenticates with a fixed key over a client-role
 * WebSocket (common/ws), and a pump that runs the loop without blocking
 * until nothing moves. Everything is freed by fz_gw_free (gw_ctx_free), so
 * ASan's leak check covers the whole path. No network: only socketpairs. */
#ifndef FZ_GW_H
#define FZ_GW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tun_msg.h"

struct gw_ctx;
struct gw_tun_proto;

#define FZ_MAX_CLIENTS 8
#define FZ_MAX_TEXTS 16 /* text messages from the gateway kept for the target */

struct fz_client {
    int fd;               /* our end; -1 once closed */
    uint8_t *pending;     /* bytes not yet written (owned) */
    size_t pending_len;
    uint64_t bytes_in;    /* response bytes read and dropped */
};

/* The agent side of one tunnel. */
struct fz_agent {
    struct fz_gw *f;
    int fd;                          /* socketpair end before the WebSocket takes it */
    struct ws_conn *ws;              /* client role, once the 101 was read */
    enum tun_mode mode;
    unsigned features;               /* TUN_FEAT_* for the auth message (set before
                                      * fz_gw_tunnel) */
    bool live;                       /* auth_ok seen */
    bool closed;                     /* on_close seen */
    uint64_t bytes_in;               /* binary bytes from the gateway */
    struct evbuffer *bin;            /* binary bytes kept (FZ_DUMP), or NULL */
    int ntexts;
    char *texts[FZ_MAX_TEXTS];       /* owned; the gateway's text messages after auth */
    char req_ids[4][TUN_ID_MAX + 1]; /* Osaurus: ids of the first "request" frames */
    int nreq_ids;
};

struct fz_gw {
    struct gw_ctx *ctx;
    uint64_t rnd;                    /* splitmix64 state of the fake random source */
    uint64_t moved;                  /* progress counter the pump watches */
    struct fz_client cli[FZ_MAX_CLIENTS];
    int ncli;
    struct fz_agent agent;
    bool has_agent;
};

/* The agent's address (lowercase 0x + 40 hex) of the harness's fixed key. */
const char *fz_gw_agent_addr(void);

/* A fresh gateway: --domain example.com --no-tls --open plus extra (argv
 * style, NULL-terminated, may be NULL). Aborts on failure (a harness bug). */
void fz_gw_new(struct fz_gw *f, const char *const *extra);

/* Frees the context and everything in it, then closes our socket ends. */
void fz_gw_free(struct fz_gw *f);

/* A public HTTP/1.1 connection from 198.51.100.3 with data queued to send;
 * returns its index. */
int fz_gw_client(struct fz_gw *f, const void *data, size_t len);

/* More bytes for client i. */
void fz_gw_client_send(struct fz_gw *f, int i, const void *data, size_t len);

/* Client i goes away (close). */
void fz_gw_client_close(struct fz_gw *f, int i);

/* A tunnel in proto's mode from 192.0.2.7, authenticated as fz_gw_agent_addr()
 * (returns true once auth_ok arrived). */
bool fz_gw_tunnel(struct fz_gw *f, const struct gw_tun_proto *proto);

/* Runs the loop without blocking until nothing moves (bounded). */
void fz_gw_pump(struct fz_gw *f);

/* The agent sends one binary / text message. */
void fz_gw_agent_binary(struct fz_gw *f, const void *data, size_t len);
void fz_gw_agent_text(struct fz_gw *f, const char *data, size_t len);

/* The agent goes away: close frame (code) or, with code 0, the socket. */
void fz_gw_agent_close(struct fz_gw *f, int code);

#endif
