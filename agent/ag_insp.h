/* The agent's local inspector (`tunnel-agent run --inspect`): captures every
 * exchange the daemon forwards into a bounded ring (ag_insp_ring), serves a
 * page and a JSON API over HTTP/1.1 (libevent's evhttp, in the daemon's
 * loop) and replays captured requests to the local API only. The daemon
 * creates it (ctx->insp, owned by the context); ag_fwd calls the capture
 * hooks below as bytes pass, which copy at most body_bytes and never delay
 * or change the forwarding. See docs/INSPECTOR.md. */
#ifndef AG_INSP_H
#define AG_INSP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

#include "ag_fwd.h"
#include "ag_opts.h"

struct ag_agt;
struct ag_ctx;
struct ag_insp;
struct ag_insp_ent;

#define AG_INSP_DEFAULT_PORT 4040
#define AG_INSP_DEFAULT_MAX 200
#define AG_INSP_DEFAULT_BODY_BYTES (1024u * 1024u)

/* Fills o from run's options: inspect is the --inspect value ("" for the
 * default 127.0.0.1:4040, NULL when not given: o->enabled false), max and
 * body the --inspect-max / --inspect-body-bytes values (NULL: defaults),
 * token_file --inspect-token-file (NULL: none; an owner-only file whose first
 * line, 16-256 printable characters, is the token). A non-loopback address
 * needs allow_remote, and allow_remote needs a token. Returns 0, or -1 with
 * why in err. */
int ag_insp_parse_opts(const char *inspect, const char *max, const char *body, bool allow_remote,
                       const char *token_file, const char *save_dir, struct ag_insp_opts *o,
                       char *err, size_t errlen);

/* Binds ctx->opts->inspect's address and starts serving in ctx's loop; logs
 * inspector_listening with the bound port. Returns NULL with why in err. */
struct ag_insp *ag_insp_new(struct ag_ctx *ctx, char *err, size_t errlen);

/* Ends every replay (no report), closes the listener and its connections and
 * frees the captures. Call it after the tunnels are freed (their fwds end
 * their captures) and before the agents. Takes NULL. */
void ag_insp_free(struct ag_insp *ins);

/* The control socket's {"cmd":"replay","id":N} (`tunnel-agent replay ID`):
 * replays entry id (a JSON number, borrowed) as it was. Returns a malloc'd
 * JSON answer, {"ok":true,"id":NEW} or {"ok":false,"error":CODE,
 * "message":TEXT}; NULL if out of memory. ins NULL: the inspector is off. */
struct cJSON;
char *ag_insp_ctl_replay(struct ag_insp *ins, const struct cJSON *id);

/* ---- capture hooks (ag_fwd) ---------------------------------------------------
 * All take ins == NULL (no inspector) and e == NULL (not captured) as no-ops.
 * e stays valid until ag_insp_cap_end(), after which the caller forgets it. */

/* A request is being forwarded for agent a. Returns its entry, or NULL. */
struct ag_insp_ent *ag_insp_cap_begin(struct ag_insp *ins, const struct ag_agt *a,
                                      const struct ag_fwd_request *rq);
void ag_insp_cap_req_body(struct ag_insp *ins, struct ag_insp_ent *e, const uint8_t *data,
                          size_t len);
/* The final response head as the public side gets it. */
void ag_insp_cap_resp_head(struct ag_insp *ins, struct ag_insp_ent *e, int status,
                           const nghttp2_nv *nv, size_t nnv);
void ag_insp_cap_resp_body(struct ag_insp *ins, struct ag_insp_ent *e, const uint8_t *data,
                           size_t len);
/* The exchange ended; err is its error code ("local_unreachable", ...) or NULL. */
void ag_insp_cap_end(struct ag_insp *ins, struct ag_insp_ent *e, const char *err);

#endif
