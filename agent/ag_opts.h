/* What `tunnel-agent run` was told, validated: plain data that ag_main fills
 * and the daemon's context keeps a pointer to. On its own so that the
 * modules below the daemon (ag_ctx, ag_tun, ag_probe, ag_fwd) can read the
 * gateway and TLS settings without including ag_daemon.h. */
#ifndef AG_OPTS_H
#define AG_OPTS_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ag_pxy.h"
#include "ag_store.h"
#include "log.h"

/* run --inspect*: the local inspector (ag_insp). Off unless enabled. */
struct ag_insp_opts {
    bool enabled;          /* --inspect given */
    char host[64];         /* address to bind, numeric ("127.0.0.1") */
    uint16_t port;         /* 0: any (the bound port is logged) */
    size_t max_entries;    /* --inspect-max, default 200 */
    size_t body_bytes;     /* --inspect-body-bytes, default 1 MiB */
    bool allow_remote;     /* --inspect-allow-remote: non-loopback clients with the token */
    char token[257];       /* from --inspect-token-file, "" = none */
    char save_dir[PATH_MAX]; /* --inspect-save DIR, "" = none */
};

struct ag_run_opts {
    char gateway_url[AG_GATEWAY_MAX + 1]; /* as given (or remembered) */
    struct ag_gateway gateway;            /* gateway_url parsed: ws/wss, host, port, path */
    char ca_file[PATH_MAX];               /* absolute path of a PEM bundle; "" = system store */
    char domain[AG_HOST_MAX + 1];         /* run --domain: the domain to sign for; "" = host */
    char announce_id[40];                 /* http: print this agent's URL on stdout once it is
                                           * connected; "" = none */
    enum ag_protocol protocol;            /* native or osaurus */
    enum log_level log_level;             /* default info */
    enum log_format log_format;           /* default text */
    struct ag_insp_opts inspect;          /* --inspect and friends */
    struct ag_proxy proxy;                /* HTTPS_PROXY & co. for the gateway, from the
                                           * environment at start */
};

#endif
