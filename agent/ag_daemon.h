/* tunnel-agent's daemon (`tunnel-agent run`): keeps a tunnel to the gateway for
 * every enabled agent and forwards its requests. ag_main parses and validates
 * the options (struct ag_run_opts, ag_opts.h), remembers gateway / CA file /
 * protocol in agents.json, and hands over here. */
#ifndef AG_DAEMON_H
#define AG_DAEMON_H

#include "ag_opts.h"

/* Runs the daemon in the foreground until SIGINT/SIGTERM. home is the resolved
 * home directory (it exists; agents.json may not). Returns the process exit
 * status: 0 after a clean shutdown, 1 on a runtime failure (already reported
 * on stderr or in the log). */
int ag_daemon_run(const char *home, const struct ag_run_opts *opts);

#endif
