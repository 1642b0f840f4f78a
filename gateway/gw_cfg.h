/* tunnel-gateway configuration: struct gw_cfg (plain data, units in field
 * names, immutable after load), the option table that drives defaults, config
 * file keys, environment, command line and --help (common/cfg does the work),
 * validation across options, and the address helpers the listener needs. */
#ifndef GW_CFG_H
#define GW_CFG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

#include "log.h"

struct cfg_spec;
struct cfg_source;

/* A listen address: "ADDR:PORT" with ADDR numeric IPv4, [IPv6] or localhost. */
struct gw_cfg_addr {
    char *text;                  /* normalised "127.0.0.1:8443" / "[::1]:8443"; NULL = unset */
    char *host;                  /* address part without brackets, as given (lowercased) */
    uint16_t port;               /* 0 = ephemeral (read back after bind) */
    struct sockaddr_storage ss;  /* resolved numerically ("localhost" -> 127.0.0.1) */
    socklen_t sslen;             /* 0 when text is NULL */
};

/* One --trust-proxy range. */
struct gw_cidr {
    int family;        /* AF_INET or AF_INET6 */
    uint8_t addr[16];  /* network address, network byte order (4 bytes used for AF_INET) */
    unsigned prefix;   /* prefix length in bits: 0..32 (AF_INET) or 0..128 (AF_INET6) */
};

struct gw_cidr_list {
    struct gw_cidr *v; /* owned; NULL when n == 0 */
    size_t n;
};

/* --public-url-base https://DOMAIN[:PORT] or http://DOMAIN[:PORT]. */
struct gw_cfg_url {
    char *text;   /* as given, without a trailing '/'; NULL = unset */
    bool https;   /* scheme is https (else http) */
    char *host;   /* lowercase host name */
    uint16_t port;/* explicit port, 0 = scheme default (omit it from URLs) */
};

/* --redis redis://HOST[:PORT][/DB]. */
struct gw_cfg_redis {
    char *text;    /* as given; NULL = embedded registry, no Redis */
    char *host;    /* host name or numeric address, without brackets */
    uint16_t port; /* default 6379 */
    uint32_t db;   /* default 0 */
    char *password;/* owned, or NULL: AUTH before anything else (redis://:PASSWORD@HOST) */
};

/* The whole gateway configuration. Filled by gw_cfg_load(), released by
 * gw_cfg_cleanup(); strings and arrays are owned by the struct. Treat it as
 * const after load (SIGHUP builds a new one). 0 in a limit means no limit. */
struct gw_cfg {
    char *config_path;              /* --config, or TUNNEL_GATEWAY_CONFIG; NULL = none */
    char *domain;                   /* lowercase apex domain, default "localhost" */
    struct gw_cfg_addr listen;      /* main listener, default 127.0.0.1:8443 */
    struct gw_cfg_addr plain_listen;/* optional cleartext listener (text NULL = none) */
    char *cert_path;                /* PEM certificate chain; NULL = local CA */
    char *key_path;                 /* PEM private key; set iff cert_path is */
    char *allow_path;               /* --allow FILE: one address per line; NULL = none */
    bool open;                      /* --open was given */
    bool open_effective;            /* any valid signature may register: --open, or
                                     * no --allow while every listener is loopback */
    struct gw_cidr_list trust_proxy;/* peers whose X-Forwarded-* are believed */
    bool no_tls;                    /* main listener speaks cleartext HTTP */
    bool proxy_protocol;            /* listeners expect a PROXY v2 header first */
    bool reuse_port;                /* SO_REUSEPORT on --listen and --plain-listen */
    struct gw_cfg_url public_url;   /* base for handed-out URLs; text NULL = derive */
    struct gw_cfg_redis redis;      /* shared registry; text NULL = embedded */
    char *state_dir;                /* expanded path (local CA lives here); NULL only with
                                     * --cert when neither XDG_STATE_HOME nor HOME is set */
    char *region;                   /* node region name, default "local" */
    char *node_id;                  /* --node-id; NULL = host name and main port */
    uint64_t redis_timeout_ms;      /* --redis-timeout: longest wait for a Redis reply (500) */
    struct gw_cfg_addr node_listen; /* --node-listen: forwarded requests from other nodes
                                     * (text NULL = none) */
    char *node_advertise;           /* --node-advertise HOST:PORT; NULL = node_listen's */
    char *cluster_secret_path;      /* --cluster-secret-file */
    uint8_t *cluster_secret;        /* owned: its bytes, NULL = none */
    size_t cluster_secret_len;
    uint64_t drain_timeout_s;       /* SIGTERM grace for in-flight streams (600) */
    uint64_t ping_interval_s;       /* tunnel keepalive PING interval (20; 0 = off) */
    uint64_t summary_interval_s;    /* periodic tunnel summary log line (60; 0 = off) */

    /* Limits (PRODUCT.md "Public side"), 0 = no limit. */
    uint64_t max_header_bytes;            /* 65536; never above UINT32_MAX */
    uint64_t max_header_count;            /* 100 header lines per request */
    uint64_t header_timeout_s;            /* 20: a whole request head, from its first byte */
    uint64_t keepalive_timeout_s;         /* 75: an idle h1 or h2 connection */
    uint64_t max_body_bytes;              /* 0 */
    uint64_t resp_header_timeout_s;       /* --response-header-timeout, 300 */
    uint64_t max_resp_header_timeout_s;   /* --max-response-header-timeout, 3600 */
    uint64_t stream_idle_timeout_s;       /* 300 */
    uint64_t max_conns_per_ip;            /* 512 */
    uint64_t tunnel_connects_per_ip_per_min; /* 60 */
    uint64_t presence_per_ip_per_min;       /* 120; 0 = no limit */
    uint64_t max_tunnels_per_ip;          /* 64 */
    uint64_t max_pending_tunnels_per_ip;  /* 8 not yet authenticated */
    uint64_t max_pending_tunnels;         /* 1024 not yet authenticated */
    uint64_t max_osaurus_body_memory;     /* 256 MiB of Osaurus request bodies collected */
    uint64_t max_agents_per_tunnel;       /* 50 */
    uint64_t max_streams_per_tunnel;      /* 1024 */
    uint64_t agent_requests_per_min;      /* 0 */

    enum log_level log_level;       /* default LOG_LVL_INFO */
    char *log_dir;                  /* NULL = stderr */
    enum log_format log_format;     /* default LOG_FMT_TEXT */
    char *access_log;               /* --access-log: NULL = the main log, "off", or a file */
    uint64_t metrics_agents;        /* --metrics-agents: per-agent series for the top N */
    char *admin_token_path;         /* --admin-token-file; NULL = no /admin */
    char *admin_token;              /* owned: the token read from it, NULL = no /admin */
    char *presence_token_path;      /* --presence-token-file; NULL = no /presence */
    char *presence_token;           /* owned: the token read from it, NULL = no /presence */

    bool show_help;                 /* --help: print gw_cfg_print_help(), exit 0 */
    bool show_version;              /* --version: print the version, exit 0 */
    bool check_config;              /* --check-config: print gw_cfg_print_effective(),
                                     * exit 0 (a bad configuration exits 2 as always) */

    int argc;                       /* copy of the command line gw_cfg_load() got, */
    char **argv;                    /* owned (argv[argc] NULL): a reload re-reads the
                                     * file under the same command line */
    struct cfg_source *sources;     /* owned, one per table option: where each value
                                     * came from (NULL after --help / --version) */

    char **warnings;                /* owned; messages for the caller to log once it
                                     * has a sink (e.g. ignored ProxyStore keys) */
    size_t n_warnings;
};

/* Loads defaults < config file < environment < command line into cfg (which
 * need not be initialised) and validates across options. argv is not kept.
 * Returns 0, or -1 with a message in err naming the source (flag, env var or
 * file:line) and the value; cfg then holds nothing to free (cleanup is still
 * safe). With --help or --version, returns 0 at once with show_help /
 * show_version set and nothing else loaded (the caller prints and exits 0).
 * On -1 the caller should exit 2 (usage error). */
int gw_cfg_load(struct gw_cfg *cfg, int argc, char **argv, char *err, size_t errlen);

/* Called by gw_cfg_reload() once per key whose value differs (old and new
 * as text, "" for unset). live: the new value is in force; else it needs a
 * restart and the old one stays. */
typedef void (*gw_cfg_change_cb)(void *arg, const char *key, const char *old_value,
                                 const char *new_value, bool live);

/* Builds the configuration a SIGHUP asks for into out (need not be
 * initialised): the same command line (cur->argv) and environment (a
 * process's environment does not change under it) over the config file as it
 * is now. Calls cb for every changed key. Then out takes cur's values of every
 * key without CFG_F_LIVE, so a restart-only change never half-applies and
 * pointers into those strings (the domain, paths) stay valid. On 0, cur has
 * been emptied of those values and is only fit for gw_cfg_cleanup(). On -1
 * (parse error, invalid value, out of memory) err says why, out holds nothing,
 * cur is untouched and cb was not called. */
int gw_cfg_reload(struct gw_cfg *cur, struct gw_cfg *out, gw_cfg_change_cb cb, void *arg,
                  char *err, size_t errlen);

/* --check-config: every option with its effective value and its source
 * ("default", "file PATH:LINE", "env NAME", "command line"), one per line as
 * config-file syntax ('key = value  # source'). */
void gw_cfg_print_effective(const struct gw_cfg *cfg, FILE *out);

/* Frees everything gw_cfg_load() allocated and zeroes cfg. Takes a zeroed or
 * loaded cfg; safe to call twice. */
void gw_cfg_cleanup(struct gw_cfg *cfg);

/* --help text, generated from the option table. */
void gw_cfg_print_help(FILE *out);


/* The option table (for tests that walk it). */
const struct cfg_spec *gw_cfg_spec(void);

/* True if sa (AF_INET or AF_INET6; IPv4-mapped IPv6 counts as IPv4) lies in
 * one of the --trust-proxy ranges. */
bool gw_cfg_addr_trusted(const struct gw_cfg *cfg, const struct sockaddr *sa);

/* True if sa is a loopback address (127.0.0.0/8, ::1, IPv4-mapped 127/8). */
bool gw_cfg_addr_is_loopback(const struct sockaddr *sa);

#define GW_NODE_ID_MAX 64

/* A --node-id: 1 to GW_NODE_ID_MAX of A-Z a-z 0-9 . _ : - (it goes into JSON,
 * log lines and metric labels unescaped). */
bool gw_cfg_node_id_ok(const char *s, size_t len);

#endif
