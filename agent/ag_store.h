/* tunnel-agent's persistent settings: <home>/agents.json (the agents, the
 * remembered gateway) and the key files under <home>/keys/. Every write is
 * atomic (temp file + fsync + rename + directory fsync); read-modify-write runs
 * under an flock on <home>/.lock so the CLI and the daemon never race. A file
 * that does not parse is reported, never replaced. Driven by ag_main (the CLI)
 * and the daemon. */
#ifndef AG_STORE_H
#define AG_STORE_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "id.h"

#define AG_STORE_VERSION 1
#define AG_NAME_MAX 64      /* [A-Za-z0-9._-]{1,64} */
#define AG_TARGET_MAX 1024  /* bytes of a target URL */
#define AG_ID_HEADER_MAX 64 /* bytes of a header name */
#define AG_KEY_FILE_MAX 128 /* bytes of a key file name under keys/ */
#define AG_GATEWAY_MAX 1024 /* bytes of a gateway URL */
#define AG_HOST_MAX 255     /* bytes of a host name or IP literal */
#define AG_MAX_INFLIGHT_MAX 100000
#define AG_RESPONSE_TIMEOUT_MAX 86400 /* seconds */
#define AG_STORE_ERR_LEN 512          /* a comfortable size for err buffers */

#define AG_DEFAULT_MAX_INFLIGHT 64
#define AG_DEFAULT_ID_HEADER "X-Agent-Id"
#define AG_OSAURUS_ID_HEADER "X-Osaurus-Agent-Id"
#define AG_OSAURUS_ORIGIN_HEADER "X-Osaurus-Relay-Origin" /* --preset osaurus stamps "1" */

/* What a local API needs beyond the generic headers (new|set --preset). */
enum ag_preset {
    AG_PRESET_NONE = 0,
    AG_PRESET_OSAURUS, /* an Osaurus server: X-Osaurus-Agent-Id, X-Osaurus-Relay-Origin: 1 */
};
#define AG_TUNNEL_PATH "/tunnel/connect"

/* One agent as agents.json holds it. Plain data: callers may change the
 * settings fields of an agent found in a store opened AG_STORE_WRITE and then
 * call ag_store_save(), which validates every field again. name, id, address,
 * key_file and created are set by ag_store_new_agent() and never change. */
struct ag_agent {
    char name[AG_NAME_MAX + 1];           /* unique in the store */
    char id[37];                          /* RFC 4122 v4 UUID, lowercase */
    char address[ID_ADDR_STR_LEN + 1];    /* "0x" + 40 lowercase hex */
    char target[AG_TARGET_MAX + 1];       /* http://host[:port][/base] (https recorded) */
    bool enabled;                         /* the daemon keeps a tunnel for it */
    bool preserve_host;                   /* forward the public Host instead of the target's */
    uint32_t max_inflight;                /* requests in flight, 1..AG_MAX_INFLIGHT_MAX */
    char id_header[AG_ID_HEADER_MAX + 1]; /* request header carrying the agent's id */
    uint32_t response_timeout_s;          /* 0 = the gateway's default */
    char key_file[AG_KEY_FILE_MAX + 1];   /* file name under <home>/keys/ */
    int64_t created;                      /* unix seconds */
    bool superseded;                      /* set by the daemon: another instance took the key */
    enum ag_preset preset;                /* "preset" in agents.json; absent = none */
};

/* A parsed local target URL. */
struct ag_target {
    bool tls;                     /* https:// (recorded; see ag_store_target_parse) */
    char host[AG_HOST_MAX + 1];   /* name or IP, IPv6 without brackets */
    uint16_t port;                /* explicit, or 80 / 443 */
    char base[AG_TARGET_MAX + 1]; /* path prefix without a trailing '/', "" for none */
};

/* A parsed gateway URL (ws:// or wss://HOST[:PORT]); the tunnel path is fixed. */
struct ag_gateway {
    bool tls;                          /* wss:// */
    char host[AG_HOST_MAX + 1];        /* name or IP, IPv6 without brackets; also the domain */
    uint16_t port;                     /* explicit, or 80 / 443 */
    char path[sizeof(AG_TUNNEL_PATH)]; /* always AG_TUNNEL_PATH */
};

enum ag_protocol {
    AG_PROTO_NATIVE = 0,
    AG_PROTO_OSAURUS,
};

enum ag_store_mode {
    AG_STORE_READ = 0, /* no lock, no directory created; ag_store_save() refused */
    AG_STORE_WRITE,    /* creates home, holds the exclusive lock until ag_store_free() */
};

struct ag_store;

/* Resolves the home directory, first match wins: opt (--home), env_home
 * ($TUNNEL_AGENT_HOME), xdg ($XDG_CONFIG_HOME) + "/tunnel-agent", user_home
 * ($HOME) + "/.config/tunnel-agent". Empty strings count as unset. The caller
 * reads the environment; this function never does. Returns 0, or -1 with err
 * set (no candidate, or too long). */
int ag_store_home_resolve(const char *opt, const char *env_home, const char *xdg,
                          const char *user_home, char *out, size_t outlen, char *err,
                          size_t errlen);

/* Opens the store at home. AG_STORE_WRITE creates home (and missing parents)
 * 0700, takes the lock (waits up to 10 s for another tunnel-agent), and keeps
 * it until ag_store_free(). A missing agents.json is an empty store. A file
 * that does not parse or holds invalid values gives NULL and err naming the
 * file and the fault; the file is left untouched. Returns NULL on any error. */
struct ag_store *ag_store_open(const char *home, enum ag_store_mode mode, char *err, size_t errlen);

/* Releases the lock (if held) and frees the store and its agents. Takes NULL. */
void ag_store_free(struct ag_store *s);

/* Validates every agent and writes agents.json atomically (0600).
 * Returns 0, or -1 with err set; agents.json is then unchanged. */
int ag_store_save(struct ag_store *s, char *err, size_t errlen);

const char *ag_store_home(const struct ag_store *s);
size_t ag_store_count(const struct ag_store *s);

/* The i-th agent in file order (i < count), or NULL. Pointers stay valid until
 * the next ag_store_new_agent(), ag_store_remove_agent() or ag_store_free(). */
struct ag_agent *ag_store_agent(struct ag_store *s, size_t i);
struct ag_agent *ag_store_find(struct ag_store *s, const char *name);

/* Remembered run options; NULL when never set. */
const char *ag_store_gateway(const struct ag_store *s);
const char *ag_store_ca_file(const struct ag_store *s);
enum ag_protocol ag_store_protocol(const struct ag_store *s);

/* Set the remembered run options (NULL clears gateway / ca_file); persisted by
 * the next ag_store_save(). The gateway must parse with ag_store_gateway_parse.
 * Return 0, or -1 with err set (bad value, out of memory). */
int ag_store_set_gateway(struct ag_store *s, const char *url, char *err, size_t errlen);
int ag_store_set_ca_file(struct ag_store *s, const char *path, char *err, size_t errlen);
void ag_store_set_protocol(struct ag_store *s, enum ag_protocol p);

/* Creates an agent: validates name and target, generates a key from the
 * CSPRNG or reads import_key (hex key file, refused when group/others can
 * read it), refuses a duplicate name or address, writes the key to
 * keys/<name>.key (keys/<id>.key if that file exists; never overwritten),
 * appends the agent (disabled, defaults) and saves agents.json. On failure
 * nothing is left behind. Needs AG_STORE_WRITE. On success *out (if not NULL)
 * points at the new agent. Returns 0 or -1 with err set. */
int ag_store_new_agent(struct ag_store *s, const char *name, const char *target,
                       const char *import_key, struct ag_agent **out, char *err, size_t errlen);

/* Removes the named agent from agents.json (saved), then moves its key file to
 * <home>/removed/<name>-<unix time>.key (0600, never overwriting), or deletes
 * it when purge is set. moved_to (if not NULL) gets the new key path ("" when
 * purged). Needs AG_STORE_WRITE. Returns 0, or -1 with err set: the agent is
 * then still present, unless err says the key stayed at its old path. */
int ag_store_remove_agent(struct ag_store *s, const char *name, bool purge, char *moved_to,
                          size_t moved_len, char *err, size_t errlen);

/* Reads the agent's key file and checks that it yields the recorded address.
 * Returns 0, or -1 with err naming the file and the fix; k is then wiped. */
int ag_store_load_key(const struct ag_store *s, const struct ag_agent *a, struct id_key *k,
                      char *err, size_t errlen);

/* Path of the agent's key file into out. Returns 0 or -1 (too long). */
int ag_store_key_path(const struct ag_store *s, const struct ag_agent *a, char *out, size_t outlen);

/* Agent names: [A-Za-z0-9._-]{1,64}. */
bool ag_store_name_is_valid(const char *name);
bool ag_store_header_is_valid(const char *name); /* RFC 9110 token, 1..64 bytes */

/* Parses http://host[:port][/base] or https://...; refuses user info, query,
 * fragment, spaces and control bytes. https targets are accepted and recorded
 * with tls set; whether they are forwarded is the daemon's business (the
 * first forwarder speaks cleartext HTTP/1.1 only). Returns 0 or -1. */
int ag_store_target_parse(const char *url, struct ag_target *out, char *err, size_t errlen);

/* Parses ws://HOST[:PORT] or wss://HOST[:PORT], optionally followed by "/" or
 * AG_TUNNEL_PATH. Returns 0 or -1. */
int ag_store_gateway_parse(const char *url, struct ag_gateway *out, char *err, size_t errlen);

/* The agent's public URL behind gw: https://<address>.<host>[:port] for wss,
 * http:// for ws (port shown unless default). gw NULL, or a gateway dialled by
 * IP address, gives "<your gateway domain>" in place of the host.
 * Returns 0 or -1 (too long). */
int ag_store_public_url(const struct ag_gateway *gw, const char *address, char *out, size_t outlen);

/* "none" / "osaurus", and back. Parse returns 0 or -1. */
const char *ag_store_preset_name(enum ag_preset p);
int ag_store_preset_parse(const char *s, enum ag_preset *out);

/* "native" / "osaurus", and back. Parse returns 0 or -1. */
const char *ag_store_protocol_name(enum ag_protocol p);
int ag_store_protocol_parse(const char *s, enum ag_protocol *out);

#endif
