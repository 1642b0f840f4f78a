/* Writes the documents generated from tunnel-gateway's option table, so that
 * they cannot drift from --help: the man page, the example config file
 * (deploy/tunnel-gateway.conf.example) and the bash completion
 * (deploy/bash-completion/tunnel-gateway). Run by the build (man page) and by
 * tests/e2e/test_reload.py (the two checked-in files must match).
 *   gw_docgen man VERSION | conf | completion */
#include <stdio.h>
#include <string.h>

#include "cfg.h"
#include "gw_cfg.h"

/* The man page's sections after OPTIONS (roff). */
static const char man_tail[] =
    ".SH SIGNALS\n"
    ".TP\n.B SIGHUP\n"
    "Reopens the \\-\\-log\\-dir file (after a rotation moved it away, logging goes on in a "
    "new file at the same path), reloads the certificates and the \\-\\-allow list, and "
    "re\\-reads the config file under the same command line and environment. Keys applied "
    "live: every limit, \\-\\-trust\\-proxy, \\-\\-log\\-level, \\-\\-drain\\-timeout, "
    "\\-\\-ping\\-interval and \\-\\-summary\\-interval; each change is logged "
    "(config_changed key=... old=... new=...). A change of any other key is logged as "
    "config_needs_restart and its old value stays. A config that does not load (syntax "
    "error, invalid value) is refused whole, with the reason logged "
    "(config_reload_refused), and the running configuration stays.\n"
    ".TP\n.BR SIGTERM \", \" SIGINT\n"
    "Drain: tunnels are told to reconnect elsewhere, in\\-flight requests get "
    "\\-\\-drain\\-timeout to finish. A second signal exits at once.\n"
    ".SH EXIT STATUS\n"
    ".TP\n.B 0\nSuccess (also \\-\\-help, \\-\\-version and a good \\-\\-check\\-config).\n"
    ".TP\n.B 1\nRuntime failure (cannot listen, TLS or log files unusable).\n"
    ".TP\n.B 2\nBad configuration (the error names the option and its source).\n"
    ".SH FILES\n"
    ".TP\n.I <state\\-dir>/local\\-ca.pem\n"
    "The local certificate authority used without \\-\\-cert; clients verify with it.\n"
    ".TP\n.I <log\\-dir>/tunnel\\-gateway.log\n"
    "The log with \\-\\-log\\-dir (the directory is created 0700 when missing).\n"
    ".SH EXAMPLES\n"
    "Check a configuration and see where each value comes from:\n"
    ".PP\n.nf\n.RS\n"
    "tunnel\\-gateway \\-\\-config /etc/tunnel\\-gateway.conf \\-\\-check\\-config\n"
    ".RE\n.fi\n"
    ".SH SEE ALSO\n"
    ".BR tunnel\\-agent (1)\n";

int main(int argc, char **argv)
{
    const struct cfg_spec *spec = gw_cfg_spec();

    if (argc == 3 && strcmp(argv[1], "man") == 0) {
        cfg_print_man(spec, argv[2], man_tail, stdout);
    } else if (argc == 2 && strcmp(argv[1], "conf") == 0) {
        cfg_print_example(spec, stdout);
    } else if (argc == 2 && strcmp(argv[1], "completion") == 0) {
        cfg_print_completion(spec, stdout);
    } else {
        fprintf(stderr, "usage: gw_docgen man VERSION | conf | completion\n");
        return 2;
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
