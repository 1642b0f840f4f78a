/* Placeholder for the daemon (ag_daemon.h); replaced by the real one. */
#include "ag_daemon.h"

#include <stdio.h>

int ag_daemon_run(const char *home, const struct ag_run_opts *opts)
{
    fprintf(stderr, "tunnel-agent: daemon not implemented yet\n");
    return 1;
}
