/* tunnel-agent's command line: global options, one table of subcommands and
 * their options (which also writes --help, so help and parser cannot drift),
 * and each subcommand over ag_store. `status` and `run` hand over to ag_ctl
 * and ag_daemon. Exit status: 0 success, 1 runtime failure, 2 usage error or
 * refused confirmation. */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "ag_ctl.h"
#include "ag_daemon.h"
#include "ag_insp.h"
#include "ag_store.h"
#include "id.h"
#include "log.h"
#include "tg_config.h"
#include "tg_version.h"
#include "util.h"

#define EXIT_OK 0
#define EXIT_FAIL 1
#define EXIT_USAGE 2

#define MAX_POS 3
#define MAX_OPTS 16

/* Said wherever https targets come up; one string so help and warning agree. */
#define HTTPS_TARGET_NOTE                                                                          \
    "https:// targets are accepted and recorded, but not forwarded yet: this version's "           \
    "forwarder speaks cleartext HTTP/1.1 to the local API, so use http://."

struct cli;

/* One option of a subcommand. arg NULL: a flag. */
struct cmd_opt {
    const char *name; /* without the leading "--" */
    const char *arg;  /* metavariable shown in help, or NULL for a flag */
    const char *help;
};

struct cmd {
    const char *name;
    const char *synopsis; /* after "tunnel-agent [--home DIR] " */
    const char *summary;  /* one line for the global help */
    const char *details;  /* paragraph for the command's help */
    size_t min_pos;       /* positional arguments */
    size_t max_pos;
    const struct cmd_opt *opts; /* terminated by a NULL name */
    int (*run)(struct cli *c);
};

/* The parsed command line of one invocation. */
struct cli {
    const char *home_opt; /* --home, or NULL */
    char home[PATH_MAX];  /* resolved home directory */
    const struct cmd *cmd;
    const char *pos[MAX_POS]; /* positional arguments */
    size_t npos;
    const char *val[MAX_OPTS]; /* option values by index in cmd->opts; flags: "" */
};

static int cmd_new(struct cli *c);
static int cmd_set(struct cli *c);
static int cmd_list(struct cli *c);
static int cmd_enable(struct cli *c);
static int cmd_disable(struct cli *c);
static int cmd_remove(struct cli *c);
static int cmd_status(struct cli *c);
static int cmd_sign(struct cli *c);
static int cmd_run(struct cli *c);
static int cmd_http(struct cli *c);
static int cmd_verify(struct cli *c);
static int cmd_replay(struct cli *c);

#define PRESET_HELP                                                                           \
    "settings for a kind of local API. osaurus: an Osaurus server; its agent id goes in "      \
    "X-Osaurus-Agent-Id (unless --id-header says otherwise) and every request carries "      \
    "X-Osaurus-Relay-Origin: 1, set last after removing any copy a client sent, so the server " \
    "treats tunnelled requests as remote as the Osaurus app's own relay does. none: back to "  \
    "the generic headers"

static const struct cmd_opt new_opts[] = {
    {"target", "URL", "the agent's local API, http://HOST:PORT[/BASE] (required)"},
    {"key-file", "FILE",
     "import this secp256k1 private key (64 hex digits, optional 0x) instead of "
     "generating one; FILE must not be readable by group or others (chmod 600 FILE)"},
    {"preset", "osaurus|none", PRESET_HELP},
    {NULL, NULL, NULL},
};

static const struct cmd_opt set_opts[] = {
    {"target", "URL", "new local API URL, http://HOST:PORT[/BASE]"},
    {"preserve-host", NULL, "forward the public Host header to the local API"},
    {"rewrite-host", NULL, "send the target's HOST:PORT as Host (the default)"},
    {"max-inflight", "N",
     "requests in flight to the local API at once, 1-100000 (default 64); more get 503 "
     "host_busy"},
    {"id-header", "NAME",
     "name of the request header that carries the agent's id (UUID) to the local API "
     "(default X-Agent-Id; an Osaurus server reads X-Osaurus-Agent-Id)"},
    {"response-timeout", "S",
     "response timeout for this agent's requests, 0-86400 seconds; 0 = the gateway's "
     "default"},
    {"preset", "osaurus|none", PRESET_HELP},
    {NULL, NULL, NULL},
};

static const struct cmd_opt no_opts[] = {
    {NULL, NULL, NULL},
};

static const struct cmd_opt yes_opts[] = {
    {"yes", NULL, "confirm without asking (for scripts)"},
    {NULL, NULL, NULL},
};

static const struct cmd_opt remove_opts[] = {
    {"purge", NULL, "delete the key instead of keeping it under <home>/removed/"},
    {"yes", NULL, "with --purge: delete without asking (for scripts)"},
    {NULL, NULL, NULL},
};

static const struct cmd_opt status_opts[] = {
    {"json", NULL,
     "print {\"agents\":[{\"name\",\"id\",\"address\",\"target\",\"enabled\",\"state\","
     "\"url\",\"error\",...}],\"daemon\":BOOL}; a running daemon adds per agent "
     "\"requests\" (public requests, probes not counted), \"probes\", \"last_probe_ms\", "
     "\"probe_rtt_ms\", \"bytes_in\", \"bytes_out\", \"local_result\" (none, ok, refused, "
     "timeout), \"local_result_ms\" (unix ms) and \"local_error\""},
    {"watch", NULL,
     "keep showing the live state, refreshed every second: on a terminal a full-screen view "
     "(quit with q or Ctrl-C), otherwise one line per agent whenever its line changes"},
    {NULL, NULL, NULL},
};

static const struct cmd_opt run_opts[] = {
    {"gateway", "URL",
     "wss://HOST[:PORT] (ws:// for a cleartext gateway); /tunnel/connect is implied. "
     "Remembered: later runs without it use the last one"},
    {"ca-file", "FILE",
     "PEM file of CA certificates to verify the gateway with, instead of the system's "
     "(remembered)"},
    {"protocol", "native|osaurus",
     "tunnel protocol: native (default), or the Osaurus relay protocol (remembered)"},
    {"log-level", "debug|info|warn|error", "log verbosity (default info)"},
    {"log-format", "text|json", "log line format on stderr (default text)"},
    {"domain", "DOMAIN",
     "sign for DOMAIN (the gateway's --domain) instead of the gateway's host name: for "
     "dialling the gateway by IP address or another name (not remembered)"},
    /* "[...]": the value is optional (--inspect alone, --inspect=V, or --inspect V) */
    {"inspect", "[[ADDR:]PORT]",
     "serve the local inspector (a page and a JSON API: every request and response through "
     "the tunnel, with replay to the local API) on ADDR:PORT, default 127.0.0.1:4040; "
     "loopback only. Nothing is captured without it. See docs/INSPECTOR.md"},
    {"inspect-max", "N", "exchanges the inspector keeps, 1-100000 (default 200)"},
    {"inspect-body-bytes", "N",
     "bytes of each request and response body the inspector keeps, 0-67108864 (default "
     "1048576); the rest is counted and the body marked truncated"},
    {"inspect-allow-remote", NULL,
     "let clients from other machines use the inspector (a non-loopback --inspect address) "
     "if they present the token of --inspect-token-file"},
    {"inspect-token-file", "FILE",
     "owner-only file whose first line (16-256 printable characters) is the inspector's "
     "token: Authorization: Bearer TOKEN, or open the page once as /?token=TOKEN"},
    {"inspect-save", "DIR",
     "also write each exchange to DIR as it completes (created 0700; one JSON per exchange, "
     "bodies alongside, files 0600) and load them at start, so captures survive a restart"},
    {NULL, NULL, NULL},
};

static const struct cmd_opt http_opts[] = {
    {"name", "NAME",
     "the agent to use or create (default: the agent whose target is this one, else a new "
     "agent named http-PORT)"},
    {"gateway", "URL", "wss://HOST[:PORT] as for run (remembered; default the last one)"},
    {"ca-file", "FILE", "PEM file of CA certificates to verify the gateway with (remembered)"},
    {"yes", NULL, "confirm making the agent public without asking (for scripts)"},
    {NULL, NULL, NULL},
};

static const struct cmd cmds[] = {
    {"new", "new NAME --target URL [--key-file FILE] [--preset osaurus|none]",
     "create an agent: key, address, id; print its address and URL",
     "Creates agent NAME (1-64 of A-Z a-z 0-9 . _ -) with a new secp256k1 key from the "
     "system's CSPRNG, or the key imported with --key-file, stored owner-only (0600) under "
     "<home>/keys/. Prints the agent's address (0x + 40 hex) and the public URL it gets, "
     "https://<address>.<gateway domain>. New agents start disabled: see 'enable'. "
     "Names and addresses are unique. " HTTPS_TARGET_NOTE,
     1, 1, new_opts, cmd_new},
    {"set",
     "set NAME [--target URL] [--preserve-host|--rewrite-host] [--max-inflight N] "
     "[--id-header NAME] [--response-timeout S] [--preset osaurus|none]",
     "change an agent's settings (the key and address stay)",
     "Changes the given settings of agent NAME; the key and address never change. A "
     "running daemon applies them. " HTTPS_TARGET_NOTE,
     1, 1, set_opts, cmd_set},
    {"list", "list", "show the agents: name, address, target, enabled",
     "Prints a table of the agents: NAME, ADDRESS, TARGET, ENABLED (and STATE when a "
     "daemon runs).",
     0, 0, no_opts, cmd_list},
    {"enable", "enable NAME [--yes]", "make an agent publicly reachable (asks first)",
     "Enables agent NAME: while 'tunnel-agent run' is connected, its local API at TARGET is "
     "reachable by anyone on the internet at its URL. Asks 'Continue? [y/N]' on the terminal "
     "and proceeds only on y or yes. Without a terminal it refuses (exit 2) unless --yes is "
     "given.",
     1, 1, yes_opts, cmd_enable},
    {"disable", "disable NAME", "stop publishing an agent",
     "Disables agent NAME: a running daemon closes its tunnel at once.", 1, 1, no_opts,
     cmd_disable},
    {"remove", "remove [--purge [--yes]] NAME", "remove an agent (its key is kept)",
     "Disables and removes agent NAME. Its key file is moved to "
     "<home>/removed/<name>-<unix time>.key (0600), because an address cannot be recovered "
     "once its key is gone: re-import it later with 'new NAME --target URL --key-file FILE'. "
     "--purge deletes the key instead, after a confirmation on the terminal or --yes "
     "(without either it refuses, exit 2).",
     1, 1, remove_opts, cmd_remove},
    {"status", "status [--json] [--watch]", "live state of each agent from the running daemon",
     "Shows each agent's enabled flag, state (connected, connecting, disconnected, error), "
     "public URL and last error, as the running daemon reports them, with its requests "
     "(the daemon's own probes are counted apart), the last probe and its round trip, "
     "bytes in and out, and the last result of reaching the local API (ok, refused, "
     "timeout, with its time). While the local API fails the agent stays connected (the "
     "tunnel works; the public gets 502 local_unreachable or 504) and its error says "
     "local_unreachable (or local_timeout) until a request succeeds again. With no daemon "
     "running, the saved settings with state disconnected.",
     0, 0, status_opts, cmd_status},
    {"sign", "sign NAME MESSAGE", "print the agent's EIP-191 signature of MESSAGE",
     "Prints the EIP-191 personal_sign signature of MESSAGE (its bytes as given) with agent "
     "NAME's key: 0x + 130 hex digits (r, s, v). Anyone can check it against the agent's "
     "address. Put -- before a MESSAGE that starts with '-'.",
     2, 2, no_opts, cmd_sign},
    {"run",
     "run [--gateway URL] [--ca-file FILE] [--protocol native|osaurus] [--domain DOMAIN] "
     "[--log-level LEVEL] [--log-format text|json] [--inspect [[ADDR:]PORT] [--inspect-max N] "
     "[--inspect-body-bytes N] [--inspect-allow-remote --inspect-token-file FILE]]",
     "the daemon, in the foreground: tunnels for the enabled agents",
     "Runs the daemon in the foreground: keeps a tunnel to the gateway for every enabled "
     "agent and forwards its requests to the agent's target. --gateway, --ca-file and "
     "--protocol are remembered in <home>/agents.json; a run without --gateway uses the "
     "last one. --domain signs for another domain than the gateway's host name (when "
     "dialling it by IP address or an alias); without it, a gateway that expects another "
     "domain says which, and the agent's error shows both. --protocol osaurus speaks the "
     "Osaurus relay protocol (e.g. --gateway wss://agent.osaurus.ai; see docs/OSAURUS.md). "
     "The gateway is dialled through an HTTP CONNECT proxy when the environment names one: "
     "https_proxy or HTTPS_PROXY for wss://, http_proxy or HTTP_PROXY for ws://, else "
     "all_proxy or ALL_PROXY, as http://[USER[:PASSWORD]@]HOST[:PORT] (port 1080 by "
     "default); no_proxy or NO_PROXY lists exempt hosts (names, domain suffixes, *). The "
     "local API is always dialled directly.",
     0, 0, run_opts, cmd_run},
    {"http", "http PORT|URL [--name NAME] [--gateway URL] [--ca-file FILE] [--yes]",
     "publish a local port at once: create or reuse an agent, enable it, run",
     "Publishes the local API at PORT (http://127.0.0.1:PORT), HOST:PORT or an http:// URL: "
     "uses the agent with that target (or --name NAME), else creates one (named NAME, or "
     "http-PORT), enables it with the same confirmation as 'enable' (without a terminal it "
     "refuses, exit 2, unless --yes), then runs the daemon in the foreground like 'run' and "
     "prints the public URL on standard output as soon as the probe through the gateway "
     "passes. If a daemon already runs for this home, it is told to publish the agent "
     "instead.",
     1, 1, http_opts, cmd_http},
    {"replay", "replay ID",
     "resend a request the running daemon's inspector captured, to the local API",
     "Asks the running daemon (started with run --inspect) to replay inspector entry ID "
     "(the id the inspector page and its API show) to the agent's local API, as it was "
     "captured; never out through the gateway. Prints the new entry's id. With "
     "--inspect-save, entries from before a restart can be replayed too. Exit status 1 "
     "when no daemon runs, its inspector is off or the entry cannot be replayed.",
     1, 1, no_opts, cmd_replay},
    {"verify", "verify ADDRESS MESSAGE SIGNATURE",
     "check an EIP-191 signature of MESSAGE against ADDRESS",
     "Checks that SIGNATURE (0x + 130 hex digits, as 'sign' prints) is ADDRESS's EIP-191 "
     "personal_sign signature of MESSAGE (its bytes as given), with the gateway's own "
     "checks (low s only, v 27/28 or 0/1). Exit status 0 and \"valid\" when it is; 1 and "
     "the reason when it is not; 2 when ADDRESS or SIGNATURE is malformed. Put -- before a "
     "MESSAGE that starts with '-'.",
     3, 3, no_opts, cmd_verify},
};

#define NCMDS (sizeof(cmds) / sizeof(cmds[0]))

static void errmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void errmsg(const char *fmt, ...)
{
    va_list ap;

    fputs("tunnel-agent: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* ---- help -------------------------------------------------------------- */

/* Prints text wrapped at 78 columns, each line indented by indent spaces. */
static void print_wrapped(FILE *f, const char *text, int indent)
{
    const int width = 78;
    const char *p = text;

    while (*p != '\0') {
        int col = indent;
        fprintf(f, "%*s", indent, "");
        bool first = true;
        for (;;) {
            while (*p == ' ')
                p++;
            size_t w = strcspn(p, " ");
            if (w == 0)
                break;
            if (!first && col + 1 + (int)w > width)
                break;
            fprintf(f, "%s%.*s", first ? "" : " ", (int)w, p);
            col += (first ? 0 : 1) + (int)w;
            first = false;
            p += w;
        }
        fputc('\n', f);
    }
}

/* Prints "lead synopsis", breaking before a '[' past 78 columns, continuation
 * lines aligned under the first word of the synopsis after the command. */
static void print_synopsis(FILE *f, const char *lead, const char *synopsis)
{
    const int width = 78;
    int indent = (int)strlen(lead) + (int)strcspn(synopsis, " ") + 1;
    int col = fprintf(f, "%s", lead);
    const char *p = synopsis;

    while (*p != '\0') {
        /* One chunk: up to the next " [" (an optional group starts there). */
        const char *next = strstr(p + 1, " [");
        size_t len = next != NULL ? (size_t)(next - p) : strlen(p);
        if (p != synopsis && col + (int)len > width) {
            fprintf(f, "\n%*s", indent, "");
            col = indent;
            if (*p == ' ') {
                p++;
                len--;
            }
        }
        col += fprintf(f, "%.*s", (int)len, p);
        p += len;
    }
    fputc('\n', f);
}

static void print_usage(FILE *f)
{
    fprintf(f, "Usage: tunnel-agent [--home DIR] COMMAND [OPTIONS] [ARGS]\n"
               "       tunnel-agent help [COMMAND] | --help | --version\n\n"
               "Publishes local APIs at https://<address>.<gateway domain> through "
               "tunnel-gateway.\n\nCommands:\n");
    for (size_t i = 0; i < NCMDS; i++)
        fprintf(f, "  %-9s %s\n", cmds[i].name, cmds[i].summary);
    fprintf(f, "  %-9s %s\n", "help", "help on a command: tunnel-agent help COMMAND");
    fprintf(f, "\nSynopsis:\n");
    for (size_t i = 0; i < NCMDS; i++)
        print_synopsis(f, "  tunnel-agent [--home DIR] ", cmds[i].synopsis);
    fprintf(f, "\nGlobal options:\n"
               "  --home DIR   settings directory (agents.json, keys/, removed/); default\n"
               "               $TUNNEL_AGENT_HOME, else $XDG_CONFIG_HOME/tunnel-agent, else\n"
               "               ~/.config/tunnel-agent (created 0700)\n"
               "  --help       this help; 'COMMAND --help' for a command's\n"
               "  --version    print the version\n\n");
    print_wrapped(f, "Targets: http://HOST:PORT[/BASE]. " HTTPS_TARGET_NOTE, 0);
    fputc('\n', f);
    fprintf(f, "Exit status: 0 success, 1 runtime failure, 2 usage error or refused "
               "confirmation.\n");
}

static void print_cmd_help(FILE *f, const struct cmd *cmd)
{
    print_synopsis(f, "Usage: tunnel-agent [--home DIR] ", cmd->synopsis);
    fputc('\n', f);
    print_wrapped(f, cmd->details, 0);
    if (cmd->opts[0].name != NULL)
        fprintf(f, "\nOptions:\n");
    for (const struct cmd_opt *o = cmd->opts; o->name != NULL; o++) {
        char head[64];
        snprintf(head, sizeof(head), "--%s%s%s", o->name, o->arg != NULL ? " " : "",
                 o->arg != NULL ? o->arg : "");
        fprintf(f, "  %s\n", head);
        print_wrapped(f, o->help, 6);
    }
    fprintf(f, "\nGlobal options: --home DIR (see tunnel-agent --help), --help.\n"
               "Exit status: 0 success, 1 runtime failure, 2 usage error or refused "
               "confirmation.\n");
}

static const struct cmd *find_cmd(const char *name)
{
    for (size_t i = 0; i < NCMDS; i++)
        if (strcmp(cmds[i].name, name) == 0)
            return &cmds[i];
    return NULL;
}

/* ---- parsing ----------------------------------------------------------- */

static int opt_index(const struct cmd *cmd, const char *name, size_t len)
{
    for (int i = 0; cmd->opts[i].name != NULL; i++)
        if (strlen(cmd->opts[i].name) == len && strncmp(cmd->opts[i].name, name, len) == 0)
            return i;
    return -1;
}

static const char *opt_val(const struct cli *c, const char *name)
{
    int i = opt_index(c->cmd, name, strlen(name));

    assert(i >= 0 && i < MAX_OPTS); /* a typo in this file, not user input */
    return c->val[i];
}

static bool opt_set(const struct cli *c, const char *name)
{
    return opt_val(c, name) != NULL;
}

/* Parses the arguments after the command name. Returns EXIT_OK to go on, -1
 * after printing help (exit 0), or EXIT_USAGE after an error message. */
static int parse_cmd_args(struct cli *c, int argc, char **argv)
{
    const struct cmd *cmd = c->cmd;
    bool only_pos = false;

    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (only_pos || a[0] != '-' || strcmp(a, "-") == 0) {
            if (c->npos == cmd->max_pos) {
                errmsg("%s: unexpected argument \"%s\" (see tunnel-agent %s --help)", cmd->name, a,
                       cmd->name);
                return EXIT_USAGE;
            }
            c->pos[c->npos++] = a;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_pos = true;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            print_cmd_help(stdout, cmd);
            return -1;
        }
        if (strncmp(a, "--", 2) != 0) {
            errmsg("%s: unknown option %s (see tunnel-agent %s --help)", cmd->name, a, cmd->name);
            return EXIT_USAGE;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq != NULL ? (size_t)(eq - name) : strlen(name);
        const char *val = eq != NULL ? eq + 1 : NULL;
        if (nlen == 4 && strncmp(name, "home", 4) == 0) {
            if (val == NULL && i + 1 < argc)
                val = argv[++i];
            if (val == NULL || val[0] == '\0') {
                errmsg("%s: --home needs a directory", cmd->name);
                return EXIT_USAGE;
            }
            c->home_opt = val;
            continue;
        }
        int oi = opt_index(cmd, name, nlen);
        if (oi < 0) {
            errmsg("%s: unknown option --%.*s (see tunnel-agent %s --help)", cmd->name, (int)nlen,
                   name, cmd->name);
            return EXIT_USAGE;
        }
        assert(oi < MAX_OPTS);
        const struct cmd_opt *o = &cmd->opts[oi];
        if (o->arg == NULL) {
            if (val != NULL) {
                errmsg("%s: option --%s takes no value", cmd->name, o->name);
                return EXIT_USAGE;
            }
            c->val[oi] = "";
            continue;
        }
        if (val == NULL && o->arg[0] == '[') {
            /* optional value: the next argument unless it is an option */
            val = i + 1 < argc && argv[i + 1][0] != '-' && c->npos == cmd->max_pos ? argv[++i]
                                                                                   : "";
        }
        if (val == NULL) {
            if (i + 1 >= argc) {
                errmsg("%s: option --%s needs a value (%s)", cmd->name, o->name, o->arg);
                return EXIT_USAGE;
            }
            val = argv[++i];
        }
        c->val[oi] = val;
    }
    if (c->npos < cmd->min_pos) {
        errmsg("%s: missing argument; usage: tunnel-agent %s", cmd->name, cmd->synopsis);
        return EXIT_USAGE;
    }
    return EXIT_OK;
}

/* ---- shared helpers ---------------------------------------------------- */

/* Reads one answer line from fd (at most a few bytes matter). */
static bool read_yes(int fd)
{
    char buf[32];
    size_t n = 0;
    char ch;

    for (;;) {
        ssize_t r = read(fd, &ch, 1);
        if (r == -1 && errno == EINTR)
            continue;
        if (r <= 0 || ch == '\n' || ch == '\r')
            break;
        if (n < sizeof(buf) - 1)
            buf[n++] = ch;
    }
    buf[n] = '\0';
    char *s = buf;
    while (*s == ' ' || *s == '\t')
        s++;
    size_t len = strlen(s);
    while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t'))
        s[--len] = '\0';
    return strcasecmp(s, "y") == 0 || strcasecmp(s, "yes") == 0;
}

/* Shows notice and asks "Continue? [y/N]" on the terminal: /dev/tty, else
 * stdin/stderr when stdin is one. Piped input never counts as an answer.
 * Returns 1 (yes), 0 (anything else), -1 (no terminal). */
static int confirm(const char *notice)
{
    static const char q[] = "Continue? [y/N] ";
    int fd = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
    bool yes;

    if (fd != -1) {
        dprintf(fd, "%s\n%s", notice, q);
        yes = read_yes(fd);
        close(fd);
        return yes ? 1 : 0;
    }
    if (!isatty(STDIN_FILENO))
        return -1;
    fprintf(stderr, "%s\n%s", notice, q);
    fflush(stderr);
    return read_yes(STDIN_FILENO) ? 1 : 0;
}

static struct ag_store *open_store(const struct cli *c, enum ag_store_mode mode)
{
    char err[AG_STORE_ERR_LEN];
    struct ag_store *st = ag_store_open(c->home, mode, err, sizeof(err));

    if (st == NULL)
        errmsg("%s", err);
    return st;
}

/* Finds NAME, or says there is none. */
static struct ag_agent *find_agent(struct ag_store *st, const char *name)
{
    struct ag_agent *a = ag_store_find(st, name);

    if (a == NULL)
        errmsg("no agent named \"%s\" in %s/agents.json (see tunnel-agent list)", name,
               ag_store_home(st));
    return a;
}

static void public_url(struct ag_store *st, const char *address, char *out, size_t outlen)
{
    struct ag_gateway gw;
    char err[AG_STORE_ERR_LEN];
    const char *g = ag_store_gateway(st);
    bool have = g != NULL && ag_store_gateway_parse(g, &gw, err, sizeof(err)) == 0;

    if (ag_store_public_url(have ? &gw : NULL, address, out, outlen) != 0)
        snprintf(out, outlen, "https://%s.<your gateway domain>", address);
}

static int save_store(struct ag_store *st)
{
    char err[AG_STORE_ERR_LEN];

    if (ag_store_save(st, err, sizeof(err)) != 0) {
        errmsg("%s", err);
        return -1;
    }
    return 0;
}

static int check_target(const char *cmd, const char *url)
{
    struct ag_target t;
    char err[AG_STORE_ERR_LEN];

    if (ag_store_target_parse(url, &t, err, sizeof(err)) != 0) {
        errmsg("%s: --target: %s", cmd, err);
        return -1;
    }
    if (t.tls)
        errmsg("warning: target %s: %s", url, HTTPS_TARGET_NOTE);
    return 0;
}

/* run --domain: 1-253 of [A-Za-z0-9.-], not starting or ending with '.'. */
static bool domain_is_valid(const char *d)
{
    size_t len = strlen(d);

    if (len == 0 || len > 253 || d[0] == '.' || d[0] == '-' || d[len - 1] == '.')
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)d[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              ch == '.' || ch == '-'))
            return false;
    }
    return true;
}

/* --preset: the marker, and the id header that goes with it (none puts the
 * preset's header back to the default, and leaves a custom one alone). */
static void preset_apply(struct ag_agent *a, enum ag_preset p)
{
    a->preset = p;
    if (p == AG_PRESET_OSAURUS)
        memcpy(a->id_header, AG_OSAURUS_ID_HEADER, sizeof(AG_OSAURUS_ID_HEADER));
    else if (strcasecmp(a->id_header, AG_OSAURUS_ID_HEADER) == 0)
        memcpy(a->id_header, AG_DEFAULT_ID_HEADER, sizeof(AG_DEFAULT_ID_HEADER));
}

static int check_name(const char *cmd, const char *name)
{
    if (!ag_store_name_is_valid(name)) {
        errmsg("%s: invalid agent name \"%s\": use 1-%d of A-Z a-z 0-9 . _ -", cmd, name,
               AG_NAME_MAX);
        return -1;
    }
    return 0;
}

/* ---- commands ---------------------------------------------------------- */

static int cmd_new(struct cli *c)
{
    const char *name = c->pos[0];
    const char *target = opt_val(c, "target");
    char err[AG_STORE_ERR_LEN];
    char url[512];
    char key_path[PATH_MAX];
    enum ag_preset preset = AG_PRESET_NONE;
    struct ag_agent *a;
    struct ag_store *st;

    if (check_name("new", name) != 0)
        return EXIT_USAGE;
    if (target == NULL) {
        errmsg("new: --target URL is required (the agent's local API, e.g. "
               "http://127.0.0.1:8080)");
        return EXIT_USAGE;
    }
    if (check_target("new", target) != 0)
        return EXIT_USAGE;
    if (opt_val(c, "preset") != NULL && ag_store_preset_parse(opt_val(c, "preset"), &preset) != 0) {
        errmsg("new: --preset \"%s\": want osaurus or none", opt_val(c, "preset"));
        return EXIT_USAGE;
    }
    st = open_store(c, AG_STORE_WRITE);
    if (st == NULL)
        return EXIT_FAIL;
    if (ag_store_new_agent(st, name, target, opt_val(c, "key-file"), &a, err, sizeof(err)) != 0) {
        errmsg("new: %s", err);
        ag_store_free(st);
        return EXIT_FAIL;
    }
    if (preset != AG_PRESET_NONE) {
        preset_apply(a, preset);
        if (save_store(st) != 0) {
            ag_store_free(st);
            return EXIT_FAIL;
        }
    }
    public_url(st, a->address, url, sizeof(url));
    if (ag_store_key_path(st, a, key_path, sizeof(key_path)) != 0)
        key_path[0] = '\0';
    printf("Created agent %s (disabled).\n"
           "  address: %s\n"
           "  url:     %s\n"
           "  target:  %s\n"
           "  key:     %s\n"
           "%s%s%s"
           "Back up the key file: the address cannot be recovered without it.\n"
           "Publish it with: tunnel-agent enable %s\n",
           a->name, a->address, url, a->target, key_path,
           a->preset != AG_PRESET_NONE ? "  preset:  " : "",
           a->preset != AG_PRESET_NONE ? ag_store_preset_name(a->preset) : "",
           a->preset != AG_PRESET_NONE ? "\n" : "", a->name);
    ag_store_free(st);
    ag_ctl_notify(c->home);
    return EXIT_OK;
}

static int cmd_set(struct cli *c)
{
    const char *name = c->pos[0];
    const char *target = opt_val(c, "target");
    const char *hdr = opt_val(c, "id-header");
    const char *mi = opt_val(c, "max-inflight");
    const char *rt = opt_val(c, "response-timeout");
    bool preserve = opt_set(c, "preserve-host");
    bool rewrite = opt_set(c, "rewrite-host");
    const char *pre = opt_val(c, "preset");
    enum ag_preset preset = AG_PRESET_NONE;
    uint64_t max_inflight = 0;
    uint64_t timeout_s = 0;
    struct ag_agent *a;
    struct ag_store *st;

    if (check_name("set", name) != 0)
        return EXIT_USAGE;
    if (target == NULL && hdr == NULL && mi == NULL && rt == NULL && !preserve && !rewrite &&
        pre == NULL) {
        errmsg("set: nothing to change; usage: tunnel-agent %s", c->cmd->synopsis);
        return EXIT_USAGE;
    }
    if (preserve && rewrite) {
        errmsg("set: --preserve-host and --rewrite-host exclude each other");
        return EXIT_USAGE;
    }
    if (pre != NULL && ag_store_preset_parse(pre, &preset) != 0) {
        errmsg("set: --preset \"%s\": want osaurus or none", pre);
        return EXIT_USAGE;
    }
    if (target != NULL && check_target("set", target) != 0)
        return EXIT_USAGE;
    if (mi != NULL &&
        (util_parse_uint(mi, AG_MAX_INFLIGHT_MAX, &max_inflight) != 0 || max_inflight == 0)) {
        errmsg("set: --max-inflight \"%s\": want a whole number 1-%d", mi, AG_MAX_INFLIGHT_MAX);
        return EXIT_USAGE;
    }
    if (rt != NULL && util_parse_uint(rt, AG_RESPONSE_TIMEOUT_MAX, &timeout_s) != 0) {
        errmsg("set: --response-timeout \"%s\": want whole seconds 0-%d (0 = the gateway's "
               "default)",
               rt, AG_RESPONSE_TIMEOUT_MAX);
        return EXIT_USAGE;
    }
    if (hdr != NULL && !ag_store_header_is_valid(hdr)) {
        errmsg("set: --id-header \"%s\": not an HTTP header name (1-%d of A-Z a-z 0-9 "
               "!#$%%&'*+-.^_`|~)",
               hdr, AG_ID_HEADER_MAX);
        return EXIT_USAGE;
    }

    st = open_store(c, AG_STORE_WRITE);
    if (st == NULL)
        return EXIT_FAIL;
    a = find_agent(st, name);
    if (a == NULL)
        goto fail_store;
    if (target != NULL)
        memcpy(a->target, target, strlen(target) + 1); /* length checked by check_target */
    if (preserve || rewrite)
        a->preserve_host = preserve;
    if (mi != NULL)
        a->max_inflight = (uint32_t)max_inflight;
    if (pre != NULL)
        preset_apply(a, preset); /* before --id-header, which wins */
    if (hdr != NULL)
        memcpy(a->id_header, hdr, strlen(hdr) + 1);
    if (rt != NULL)
        a->response_timeout_s = (uint32_t)timeout_s;
    if (save_store(st) != 0)
        goto fail_store;
    printf("Updated agent %s:\n"
           "  target:           %s\n"
           "  host header:      %s\n"
           "  max-inflight:     %u\n"
           "  id-header:        %s\n"
           "  preset:           %s\n",
           a->name, a->target, a->preserve_host ? "preserved (public Host)" : "rewritten to target",
           (unsigned)a->max_inflight, a->id_header, ag_store_preset_name(a->preset));
    if (a->response_timeout_s == 0)
        printf("  response-timeout: gateway default\n");
    else
        printf("  response-timeout: %u s\n", (unsigned)a->response_timeout_s);
    ag_store_free(st);
    ag_ctl_notify(c->home);
    return EXIT_OK;

fail_store:
    ag_store_free(st);
    return EXIT_FAIL;
}

static int cmd_list(struct cli *c)
{
    struct ag_ctl_state *states = NULL;
    size_t nstates = 0;
    struct ag_store *st = open_store(c, AG_STORE_READ);
    int wname = 4;
    int wtarget = 6;
    bool presets = false;
    bool live;

    if (st == NULL)
        return EXIT_FAIL;
    /* Hook for a running daemon: its live state becomes a STATE column. */
    live = ag_ctl_states(c->home, &states, &nstates) == 1;
    for (size_t i = 0; i < ag_store_count(st); i++) {
        const struct ag_agent *a = ag_store_agent(st, i);
        if ((int)strlen(a->name) > wname)
            wname = (int)strlen(a->name);
        if ((int)strlen(a->target) > wtarget)
            wtarget = (int)strlen(a->target);
        presets |= a->preset != AG_PRESET_NONE;
    }
    /* a PRESET column only when some agent has one */
    printf("%-*s  %-42s  %-*s  %s%s%s\n", wname, "NAME", "ADDRESS", wtarget, "TARGET",
           presets ? "ENABLED  " : "ENABLED", presets ? "PRESET " : "", live ? "  STATE" : "");
    for (size_t i = 0; i < ag_store_count(st); i++) {
        const struct ag_agent *a = ag_store_agent(st, i);
        const char *state = "-";
        for (size_t j = 0; live && j < nstates; j++)
            if (strcmp(states[j].name, a->name) == 0)
                state = states[j].state;
        printf("%-*s  %-42s  %-*s  %-7s%s%-*s%s%s\n", wname, a->name, a->address, wtarget,
               a->target, a->enabled ? "yes" : "no", presets ? "  " : "", presets ? 7 : 0,
               !presets ? "" : a->preset != AG_PRESET_NONE ? ag_store_preset_name(a->preset) : "-",
               live ? "  " : "", live ? state : "");
    }
    if (ag_store_count(st) == 0)
        fprintf(stderr, "tunnel-agent: no agents yet; create one with: tunnel-agent new NAME "
                        "--target http://127.0.0.1:PORT\n");
    free(states);
    ag_store_free(st);
    return EXIT_OK;
}

/* True if a running daemon reports agent name in state error (why: its error). */
static bool agent_in_error(const char *home, const char *name, char *why, size_t whylen)
{
    struct ag_ctl_state *states = NULL;
    size_t n = 0;
    bool err = false;

    why[0] = '\0';
    if (ag_ctl_states(home, &states, &n) == 1)
        for (size_t i = 0; i < n; i++)
            if (strcmp(states[i].name, name) == 0 && strcmp(states[i].state, "error") == 0) {
                err = true;
                snprintf(why, whylen, "%s", states[i].error);
            }
    free(states);
    return err;
}

static int cmd_enable(struct cli *c)
{
    const char *name = c->pos[0];
    char why[AG_CTL_ERROR_MAX];
    bool retry = false;
    char notice[2048];
    char url[512];
    struct ag_agent *a;
    struct ag_store *st;

    if (check_name("enable", name) != 0)
        return EXIT_USAGE;
    /* Ask without holding the lock: a person may take a while to answer. */
    st = open_store(c, AG_STORE_READ);
    if (st == NULL)
        return EXIT_FAIL;
    a = find_agent(st, name);
    if (a == NULL)
        goto fail_store;
    if (a->enabled && !a->superseded) {
        /* refused by the gateway (allow list, signature): the owner asks
         * again, so the running daemon retries it at once */
        if (!agent_in_error(c->home, name, why, sizeof(why))) {
            printf("Agent %s is already enabled.\n", name);
            ag_store_free(st);
            return EXIT_OK;
        }
        retry = true;
    }
    public_url(st, a->address, url, sizeof(url));
    snprintf(notice, sizeof(notice),
             "Enabling agent %s makes its API at %s reachable from the public internet at\n"
             "  %s\nby anyone who knows or guesses the URL, while tunnel-agent run is connected.",
             name, a->target, url);
    ag_store_free(st);
    if (!opt_set(c, "yes")) {
        int r = confirm(notice);
        if (r < 0) {
            errmsg("enable %s: no terminal to confirm on; pass --yes to confirm that %s "
                   "becomes reachable from the public internet at %s",
                   name, name, url);
            return EXIT_USAGE;
        }
        if (r == 0) {
            errmsg("enable %s: not confirmed; the agent stays disabled", name);
            return EXIT_USAGE;
        }
    }

    st = open_store(c, AG_STORE_WRITE);
    if (st == NULL)
        return EXIT_FAIL;
    a = find_agent(st, name);
    if (a == NULL)
        goto fail_store;
    a->enabled = true;
    a->superseded = false; /* the owner asked for it again */
    if (!retry && save_store(st) != 0)
        goto fail_store;
    if (retry)
        printf("Agent %s was in error (%s); the running daemon retries it now (see "
               "tunnel-agent status).\n",
               name, why[0] != '\0' ? why : "no detail");
    else
        printf("Enabled agent %s: %s is reachable from the public internet at %s while "
               "tunnel-agent run is connected.\n",
               name, a->target, url);
    ag_store_free(st);
    ag_ctl_notify(c->home);
    return EXIT_OK;

fail_store:
    ag_store_free(st);
    return EXIT_FAIL;
}

static int cmd_disable(struct cli *c)
{
    const char *name = c->pos[0];
    struct ag_agent *a;
    struct ag_store *st;
    bool was;

    if (check_name("disable", name) != 0)
        return EXIT_USAGE;
    st = open_store(c, AG_STORE_WRITE);
    if (st == NULL)
        return EXIT_FAIL;
    a = find_agent(st, name);
    if (a == NULL)
        goto fail_store;
    was = a->enabled;
    a->enabled = false;
    if (was && save_store(st) != 0)
        goto fail_store;
    printf(was ? "Disabled agent %s.\n" : "Agent %s is already disabled.\n", name);
    ag_store_free(st);
    ag_ctl_notify(c->home);
    return EXIT_OK;

fail_store:
    ag_store_free(st);
    return EXIT_FAIL;
}

static int cmd_remove(struct cli *c)
{
    const char *name = c->pos[0];
    bool purge = opt_set(c, "purge");
    char err[AG_STORE_ERR_LEN];
    char moved[PATH_MAX];
    char key_path[PATH_MAX];
    char notice[1024];
    struct ag_agent *a;
    struct ag_store *st;

    if (check_name("remove", name) != 0)
        return EXIT_USAGE;
    if (purge && !opt_set(c, "yes")) {
        st = open_store(c, AG_STORE_READ);
        if (st == NULL)
            return EXIT_FAIL;
        a = find_agent(st, name);
        if (a == NULL)
            goto fail_store;
        snprintf(notice, sizeof(notice),
                 "Removing agent %s and deleting its key for good: address %s can never be "
                 "used again.",
                 name, a->address);
        ag_store_free(st);
        int r = confirm(notice);
        if (r < 0) {
            errmsg("remove --purge %s: no terminal to confirm on; pass --yes to delete the "
                   "key for good, or leave out --purge to keep it under removed/",
                   name);
            return EXIT_USAGE;
        }
        if (r == 0) {
            errmsg("remove --purge %s: not confirmed; nothing removed", name);
            return EXIT_USAGE;
        }
    }

    st = open_store(c, AG_STORE_WRITE);
    if (st == NULL)
        return EXIT_FAIL;
    a = find_agent(st, name);
    if (a == NULL)
        goto fail_store;
    if (ag_store_key_path(st, a, key_path, sizeof(key_path)) != 0)
        key_path[0] = '\0';
    if (ag_store_remove_agent(st, name, purge, moved, sizeof(moved), err, sizeof(err)) != 0) {
        errmsg("remove: %s", err);
        goto fail_store;
    }
    if (purge)
        printf("Removed agent %s and deleted its key.\n", name);
    else if (moved[0] != '\0')
        printf("Removed agent %s. Its key was moved to %s\n"
               "(re-import with: tunnel-agent new %s --target URL --key-file %s)\n",
               name, moved, name, moved);
    else
        printf("Removed agent %s (its key file %s was already missing).\n", name, key_path);
    ag_store_free(st);
    ag_ctl_notify(c->home);
    return EXIT_OK;

fail_store:
    ag_store_free(st);
    return EXIT_FAIL;
}

static int cmd_status(struct cli *c)
{
    if (opt_set(c, "watch")) {
        if (opt_set(c, "json")) {
            errmsg("status: --watch and --json exclude each other (poll status --json instead)");
            return EXIT_USAGE;
        }
        return ag_ctl_watch(c->home) == 0 ? EXIT_OK : EXIT_FAIL;
    }
    return ag_ctl_status(c->home, opt_set(c, "json")) == 0 ? EXIT_OK : EXIT_FAIL;
}

static int cmd_verify(struct cli *c)
{
    const char *addr_s = c->pos[0];
    const char *msg = c->pos[1];
    const char *sig_s = c->pos[2];
    uint8_t addr[ID_ADDR_LEN];
    uint8_t sig[ID_SIG_LEN];
    uint8_t got[ID_ADDR_LEN];
    char got_s[ID_ADDR_STR_LEN + 1];
    int rc;

    rc = id_addr_parse(addr_s, strlen(addr_s), addr);
    if (rc != ID_OK) {
        errmsg("verify: ADDRESS \"%s\": %s (want 0x + 40 hex digits)", addr_s, id_strerror(rc));
        return EXIT_USAGE;
    }
    rc = id_sig_parse(sig_s, strlen(sig_s), sig);
    if (rc != ID_OK) {
        errmsg("verify: SIGNATURE: %s (want 0x + 130 hex digits, as tunnel-agent sign prints)",
               id_strerror(rc));
        return EXIT_USAGE;
    }
    /* the gateway's check (id_verify), then recover to say whose it is */
    rc = id_verify(msg, strlen(msg), sig_s, strlen(sig_s), addr);
    if (rc == ID_OK) {
        printf("valid: signed by %s\n", addr_s);
        return EXIT_OK;
    }
    if (rc == ID_E_MISMATCH && id_recover(msg, strlen(msg), sig, got) == ID_OK) {
        id_addr_to_str(got, got_s);
        printf("invalid: %s (this message and signature recover %s)\n", id_strerror(rc), got_s);
    } else {
        printf("invalid: %s\n", id_strerror(rc));
    }
    return EXIT_FAIL;
}

static int cmd_sign(struct cli *c)
{
    const char *name = c->pos[0];
    const char *msg = c->pos[1];
    char err[AG_STORE_ERR_LEN];
    char out[ID_SIG_STR_LEN + 1];
    uint8_t sig[ID_SIG_LEN];
    struct id_key k;
    struct ag_agent *a;
    struct ag_store *st;
    int rc = EXIT_FAIL;

    if (check_name("sign", name) != 0)
        return EXIT_USAGE;
    st = open_store(c, AG_STORE_READ);
    if (st == NULL)
        return EXIT_FAIL;
    a = find_agent(st, name);
    if (a == NULL)
        goto out_store;
    if (ag_store_load_key(st, a, &k, err, sizeof(err)) != 0) {
        errmsg("sign: %s", err);
        goto out_store;
    }
    if (id_sign(&k, msg, strlen(msg), sig) != ID_OK) {
        errmsg("sign: agent \"%s\": its key cannot sign", name);
        goto out_key;
    }
    id_sig_to_str(sig, out);
    printf("%s\n", out);
    rc = EXIT_OK;

out_key:
    id_key_clear(&k);
out_store:
    ag_store_free(st);
    return rc;
}

/* Validates --gateway and --ca-file (either may be NULL) into ro. Returns
 * EXIT_OK, or EXIT_USAGE after a message. */
static int run_check(const char *cmd, const char *gw, const char *ca, struct ag_run_opts *ro)
{
    char err[AG_STORE_ERR_LEN];

    if (gw != NULL && ag_store_gateway_parse(gw, &ro->gateway, err, sizeof(err)) != 0) {
        errmsg("%s: --gateway: %s", cmd, err);
        return EXIT_USAGE;
    }
    if (ca != NULL) {
        /* Remembered for later runs, maybe from another directory. */
        if (ca[0] == '\0' || realpath(ca, ro->ca_file) == NULL) {
            errmsg("%s: --ca-file %s: %s", cmd, ca, ca[0] == '\0' ? "empty" : strerror(errno));
            return EXIT_USAGE;
        }
        if (access(ro->ca_file, R_OK) != 0) {
            errmsg("%s: --ca-file %s: cannot read: %s", cmd, ca, strerror(errno));
            return EXIT_USAGE;
        }
    }
    return EXIT_OK;
}

static const char *env_get(const char *name) { return getenv(name); }

/* The proxy for the gateway from HTTPS_PROXY & co. (ag_pxy.h). */
static int run_proxy(const char *cmd, struct ag_run_opts *ro)
{
    char err[AG_STORE_ERR_LEN];

    if (ag_pxy_from_env(&ro->gateway, env_get, &ro->proxy, err, sizeof(err)) != 0) {
        errmsg("%s: %s", cmd, err);
        return EXIT_USAGE;
    }
    return EXIT_OK;
}

/* Completes ro from the store (remembered gateway, CA file, protocol) and
 * remembers what was given. proto NULL: the remembered one. Returns EXIT_OK,
 * or an exit status after a message. */
static int run_settle(struct cli *c, const char *cmd, const char *gw, const char *ca,
                      const char *proto, struct ag_run_opts *ro)
{
    char err[AG_STORE_ERR_LEN];
    struct ag_store *st;
    bool changed = false;

    st = open_store(c, AG_STORE_WRITE);
    if (st == NULL)
        return EXIT_FAIL;
    if (gw != NULL) {
        const char *old = ag_store_gateway(st);
        if (old == NULL || strcmp(old, gw) != 0) {
            if (ag_store_set_gateway(st, gw, err, sizeof(err)) != 0)
                goto fail_err;
            changed = true;
        }
    } else if (ag_store_gateway(st) == NULL) {
        errmsg("%s: no gateway: pass --gateway wss://HOST[:PORT] (it is remembered for later "
               "runs)",
               cmd);
        ag_store_free(st);
        return EXIT_USAGE;
    } else {
        gw = ag_store_gateway(st);
        if (ag_store_gateway_parse(gw, &ro->gateway, err, sizeof(err)) != 0)
            goto fail_err;
    }
    if (util_snprintf(ro->gateway_url, sizeof(ro->gateway_url), "%s", gw) < 0) {
        snprintf(err, sizeof(err), "gateway URL too long");
        goto fail_err;
    }
    if (ca != NULL) {
        const char *old = ag_store_ca_file(st);
        if (old == NULL || strcmp(old, ro->ca_file) != 0) {
            if (ag_store_set_ca_file(st, ro->ca_file, err, sizeof(err)) != 0)
                goto fail_err;
            changed = true;
        }
    } else if (ag_store_ca_file(st) != NULL &&
               util_snprintf(ro->ca_file, sizeof(ro->ca_file), "%s", ag_store_ca_file(st)) < 0) {
        snprintf(err, sizeof(err), "remembered CA file path too long");
        goto fail_err;
    }
    if (proto != NULL) {
        if (ag_store_protocol(st) != ro->protocol) {
            ag_store_set_protocol(st, ro->protocol);
            changed = true;
        }
    } else {
        ro->protocol = ag_store_protocol(st);
    }
    if (changed && save_store(st) != 0) {
        ag_store_free(st);
        return EXIT_FAIL;
    }
    ag_store_free(st); /* the daemon takes the lock only when it writes */
    return EXIT_OK;

fail_err:
    errmsg("%s: %s", cmd, err);
    ag_store_free(st);
    return EXIT_FAIL;
}

static int cmd_run(struct cli *c)
{
    struct ag_run_opts ro;
    const char *gw = opt_val(c, "gateway");
    const char *ca = opt_val(c, "ca-file");
    const char *proto = opt_val(c, "protocol");
    const char *lvl = opt_val(c, "log-level");
    const char *fmt = opt_val(c, "log-format");
    const char *dom = opt_val(c, "domain");
    char ierr[512];
    int rc;

    memset(&ro, 0, sizeof(ro));
    if (ag_insp_parse_opts(opt_val(c, "inspect"), opt_val(c, "inspect-max"),
                           opt_val(c, "inspect-body-bytes"), opt_set(c, "inspect-allow-remote"),
                           opt_val(c, "inspect-token-file"), opt_val(c, "inspect-save"),
                           &ro.inspect, ierr, sizeof(ierr)) != 0) {
        errmsg("run: %s", ierr);
        return EXIT_USAGE;
    }
    ro.log_level = LOG_LVL_INFO;
    ro.log_format = LOG_FMT_TEXT;
    if (proto != NULL && ag_store_protocol_parse(proto, &ro.protocol) != 0) {
        errmsg("run: --protocol \"%s\": want native or osaurus", proto);
        return EXIT_USAGE;
    }
    if (lvl != NULL && log_parse_level(lvl, &ro.log_level) != 0) {
        errmsg("run: --log-level \"%s\": want debug, info, warn or error", lvl);
        return EXIT_USAGE;
    }
    if (fmt != NULL && log_parse_format(fmt, &ro.log_format) != 0) {
        errmsg("run: --log-format \"%s\": want text or json", fmt);
        return EXIT_USAGE;
    }
    if (dom != NULL) {
        if (!domain_is_valid(dom)) {
            errmsg("run: --domain \"%s\": want a DNS name such as example.com (1-253 of "
                   "A-Z a-z 0-9 . -)",
                   dom);
            return EXIT_USAGE;
        }
        memcpy(ro.domain, dom, strlen(dom) + 1);
    }
    rc = run_check("run", gw, ca, &ro);
    if (rc != EXIT_OK)
        return rc;
    rc = run_settle(c, "run", gw, ca, proto, &ro);
    if (rc != EXIT_OK)
        return rc;
    rc = run_proxy("run", &ro);
    if (rc != EXIT_OK)
        return rc;
    return ag_daemon_run(c->home, &ro);
}

static int cmd_replay(struct cli *c)
{
    uint64_t id;
    char req[96];
    char *answer = NULL;
    cJSON *a;
    const cJSON *ok, *nid, *msg;
    int rc;

    if (util_parse_uint(c->pos[0], UINT64_C(9000000000000000), &id) != 0 || id == 0) {
        errmsg("replay: ID \"%s\": want the entry's number (see the inspector)", c->pos[0]);
        return EXIT_USAGE;
    }
    (void)util_snprintf(req, sizeof(req), "{\"cmd\":\"replay\",\"id\":%llu}",
                        (unsigned long long)id);
    rc = ag_ctl_call(c->home, req, &answer);
    if (rc == 0) {
        errmsg("replay: no daemon runs for %s (start one with: tunnel-agent run --inspect)",
               c->home);
        return EXIT_FAIL;
    }
    a = rc > 0 ? cJSON_Parse(answer) : NULL;
    free(answer);
    ok = cJSON_GetObjectItemCaseSensitive(a, "ok");
    nid = cJSON_GetObjectItemCaseSensitive(a, "id");
    msg = cJSON_GetObjectItemCaseSensitive(a, "message");
    if (cJSON_IsTrue(ok) && cJSON_IsNumber(nid)) {
        printf("replayed %llu as %.0f\n", (unsigned long long)id, nid->valuedouble);
        cJSON_Delete(a);
        return EXIT_OK;
    }
    errmsg("replay: %s", cJSON_IsString(msg) ? msg->valuestring : "the daemon did not answer");
    cJSON_Delete(a);
    return EXIT_FAIL;
}

/* Turns PORT, HOST:PORT or a URL into a target URL. Returns 0 or -1. */
static int http_target(const char *arg, char *out, size_t outlen)
{
    uint64_t port;

    if (strncmp(arg, "http://", 7) == 0 || strncmp(arg, "https://", 8) == 0)
        return util_snprintf(out, outlen, "%s", arg) < 0 ? -1 : 0;
    if (strstr(arg, "://") != NULL)
        return -1;
    if (util_parse_uint(arg, 65535, &port) == 0)
        return port == 0 ? -1 : (util_snprintf(out, outlen, "http://127.0.0.1:%u",
                                               (unsigned)port) < 0 ? -1 : 0);
    return util_snprintf(out, outlen, "http://%s", arg) < 0 ? -1 : 0;
}

static int cmd_http(struct cli *c)
{
    const char *arg = c->pos[0];
    const char *name = opt_val(c, "name");
    const char *gw = opt_val(c, "gateway");
    const char *ca = opt_val(c, "ca-file");
    char target[AG_TARGET_MAX + 1];
    char agent_name[AG_NAME_MAX + 1];
    char err[AG_STORE_ERR_LEN];
    char notice[2048];
    char url[512];
    struct ag_target t;
    struct ag_run_opts ro;
    struct ag_agent *a = NULL;
    struct ag_store *st;
    bool need_enable;
    int rc;

    if (http_target(arg, target, sizeof(target)) != 0 ||
        ag_store_target_parse(target, &t, err, sizeof(err)) != 0) {
        errmsg("http: \"%s\": want a port (3000), HOST:PORT (localhost:3000) or an http:// URL",
               arg);
        return EXIT_USAGE;
    }
    if (t.tls)
        errmsg("warning: target %s: %s", target, HTTPS_TARGET_NOTE);
    if (name != NULL && check_name("http", name) != 0)
        return EXIT_USAGE;
    memset(&ro, 0, sizeof(ro));
    ro.log_level = LOG_LVL_INFO;
    ro.log_format = LOG_FMT_TEXT;
    rc = run_check("http", gw, ca, &ro);
    if (rc != EXIT_OK)
        return rc;

    /* reuse by name, else by target, else create (disabled) */
    st = open_store(c, AG_STORE_WRITE);
    if (st == NULL)
        return EXIT_FAIL;
    if (name != NULL) {
        a = ag_store_find(st, name);
    } else {
        for (size_t i = 0; i < ag_store_count(st) && a == NULL; i++)
            if (strcmp(ag_store_agent(st, i)->target, target) == 0)
                a = ag_store_agent(st, i);
    }
    if (a != NULL && strcmp(a->target, target) != 0) {
        errmsg("http: agent %s has target %s, not %s (change it with: tunnel-agent set %s "
               "--target %s)",
               a->name, a->target, target, a->name, target);
        ag_store_free(st);
        return EXIT_USAGE;
    }
    if (a == NULL) {
        if (name != NULL) {
            (void)util_snprintf(agent_name, sizeof(agent_name), "%s", name);
        } else {
            (void)util_snprintf(agent_name, sizeof(agent_name), "http-%u", (unsigned)t.port);
            for (unsigned k = 2; k < 100 && ag_store_find(st, agent_name) != NULL; k++)
                (void)util_snprintf(agent_name, sizeof(agent_name), "http-%u-%u",
                                    (unsigned)t.port, k);
        }
        if (ag_store_new_agent(st, agent_name, target, NULL, &a, err, sizeof(err)) != 0) {
            errmsg("http: %s", err);
            ag_store_free(st);
            return EXIT_FAIL;
        }
        printf("Created agent %s (address %s) for %s.\n", a->name, a->address, target);
    }
    (void)util_snprintf(agent_name, sizeof(agent_name), "%s", a->name);
    need_enable = !a->enabled || a->superseded;
    if (gw != NULL) {
        struct ag_gateway g;
        if (ag_store_gateway_parse(gw, &g, err, sizeof(err)) != 0 ||
            ag_store_public_url(&g, a->address, url, sizeof(url)) != 0)
            snprintf(url, sizeof(url), "https://%s.<your gateway domain>", a->address);
    } else {
        public_url(st, a->address, url, sizeof(url));
    }
    snprintf(notice, sizeof(notice),
             "Enabling agent %s makes its API at %s reachable from the public internet at\n"
             "  %s\nby anyone who knows or guesses the URL, while tunnel-agent runs.",
             agent_name, target, url);
    ag_store_free(st);
    ag_ctl_notify(c->home);

    if (need_enable && !opt_set(c, "yes")) {
        int r = confirm(notice);
        if (r < 0) {
            errmsg("http %s: no terminal to confirm on; pass --yes to confirm that %s "
                   "becomes reachable from the public internet at %s",
                   arg, target, url);
            return EXIT_USAGE;
        }
        if (r == 0) {
            errmsg("http %s: not confirmed; agent %s stays disabled", arg, agent_name);
            return EXIT_USAGE;
        }
    }
    if (need_enable) {
        st = open_store(c, AG_STORE_WRITE);
        if (st == NULL)
            return EXIT_FAIL;
        a = find_agent(st, agent_name);
        if (a == NULL) {
            ag_store_free(st);
            return EXIT_FAIL;
        }
        a->enabled = true;
        a->superseded = false;
        if (save_store(st) != 0) {
            ag_store_free(st);
            return EXIT_FAIL;
        }
        (void)util_snprintf(ro.announce_id, sizeof(ro.announce_id), "%s", a->id);
        ag_store_free(st);
    } else {
        st = open_store(c, AG_STORE_READ);
        if (st == NULL)
            return EXIT_FAIL;
        a = find_agent(st, agent_name);
        if (a != NULL)
            (void)util_snprintf(ro.announce_id, sizeof(ro.announce_id), "%s", a->id);
        ag_store_free(st);
        if (a == NULL)
            return EXIT_FAIL;
    }
    rc = run_settle(c, "http", gw, ca, NULL, &ro);
    if (rc != EXIT_OK)
        return rc;
    rc = run_proxy("http", &ro);
    if (rc != EXIT_OK)
        return rc;
    {
        struct ag_ctl_state *states = NULL;
        size_t n = 0;
        if (ag_ctl_states(c->home, &states, &n) == 1) {
            free(states);
            ag_ctl_notify(c->home);
            printf("A daemon already runs for %s: it publishes agent %s at %s (see "
                   "tunnel-agent status).\n",
                   c->home, agent_name, url);
            return EXIT_OK;
        }
    }
    printf("Agent %s: connecting %s to %s ...\n", agent_name, target, ro.gateway_url);
    fflush(stdout);
    return ag_daemon_run(c->home, &ro);
}

/* ---- main -------------------------------------------------------------- */

int main(int argc, char **argv)
{
    struct cli c;
    char err[AG_STORE_ERR_LEN];
    int i = 1;
    int rc;

    util_malloc_tune();
    memset(&c, 0, sizeof(c));
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            print_usage(stdout);
            return EXIT_OK;
        }
        if (strcmp(a, "--version") == 0 || strcmp(a, "-V") == 0) {
            if (strcmp(TG_REVISION, TG_VERSION) == 0)
                printf("tunnel-agent %s\n", TG_VERSION);
            else
                printf("tunnel-agent %s (git %s)\n", TG_VERSION, TG_REVISION);
            return EXIT_OK;
        }
        if (strcmp(a, "--home") == 0 && i + 1 < argc && argv[i + 1][0] != '\0') {
            c.home_opt = argv[++i];
        } else if (strncmp(a, "--home=", 7) == 0 && a[7] != '\0') {
            c.home_opt = a + 7;
        } else if (strncmp(a, "--home", 6) == 0) {
            errmsg("--home needs a directory");
            return EXIT_USAGE;
        } else {
            errmsg("unknown option %s (see tunnel-agent --help)", a);
            return EXIT_USAGE;
        }
    }
    if (i == argc) {
        fputs("tunnel-agent: no command given; one of:", stderr);
        for (size_t k = 0; k < NCMDS; k++)
            fprintf(stderr, " %s", cmds[k].name);
        fputs(" (see tunnel-agent --help)\n", stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[i], "help") == 0) {
        if (i + 1 == argc) {
            print_usage(stdout);
            return EXIT_OK;
        }
        const struct cmd *h = find_cmd(argv[i + 1]);
        if (h == NULL || i + 2 < argc) {
            errmsg("help: no command \"%s\" (see tunnel-agent --help)", argv[i + 1]);
            return EXIT_USAGE;
        }
        print_cmd_help(stdout, h);
        return EXIT_OK;
    }
    c.cmd = find_cmd(argv[i]);
    if (c.cmd == NULL) {
        errmsg("unknown command \"%s\" (see tunnel-agent --help)", argv[i]);
        return EXIT_USAGE;
    }
    rc = parse_cmd_args(&c, argc - i - 1, argv + i + 1);
    if (rc < 0)
        return EXIT_OK; /* printed help */
    if (rc != EXIT_OK)
        return rc;
    if (ag_store_home_resolve(c.home_opt, getenv("TUNNEL_AGENT_HOME"), getenv("XDG_CONFIG_HOME"),
                              getenv("HOME"), c.home, sizeof(c.home), err, sizeof(err)) != 0) {
        errmsg("%s", err);
        return EXIT_USAGE;
    }
    rc = c.cmd->run(&c);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        errmsg("cannot write to standard output: %s", strerror(errno));
        return EXIT_FAIL;
    }
    return rc;
}
