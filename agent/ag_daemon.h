/* tunnel-agent's daemon (`tunnel-agent run`): keeps a tunnel to the gateway for
 * every enabled agent and forwards its requests. ag_main parses and validates
 * the options, remembers gateway / CA file / protocol in agents.json, and
 * hands over here. */
#ifndef AG_DAEMON_H
#define AG_DAEMON_H

#include <limits.h>

#include "ag_store.h"
#include "log.h"

/* What `run` was told, validated. Plain data, filled by ag_main. */
struct ag_run_opts {
    char gateway_url[AG_GATEWAY_MAX + 1]; /* as given (or remembered) */
    struct ag_gateway gateway;            /* gateway_url parsed: ws/wss, host, port, path */
    char ca_file[PATH_MAX];               /* absolute path of a PEM bundle; "" = system store */
    enum ag_protocol protocol;            /* native or osaurus */
    enum log_level log_level;             /* default info */
    enum log_format log_format;           /* default text */
};

/* Runs the daemon in the foreground until SIGINT/SIGTERM. home is the resolved
 * home directory (it exists; agents.json may not). Returns the process exit
 * status: 0 after a clean shutdown, 1 on a runtime failure (already reported
 * on stderr or in the log). */
int ag_daemon_run(const char *home, const struct ag_run_opts *opts);

#endif
