/* What `tunnel-agent run` was told, validated: plain data that ag_main fills
 * and the daemon's context keeps a pointer to. On its own so that the
 * modules below the daemon (ag_ctx, ag_tun, ag_probe, ag_fwd) can read the
 * gateway and TLS settings without including ag_daemon.h. */
#ifndef AG_OPTS_H
#define AG_OPTS_H

#include <limits.h>

#include "ag_store.h"
#include "log.h"

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
};

#endif
