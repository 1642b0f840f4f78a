/* The daemon's local control socket, <home>/agent.sock (owner-only, in the
 * 0700 home): line-based JSON, one request and one answer per connection
 * ({"cmd":"status"} -> the status object, {"cmd":"reload"} -> {"ok":true}).
 * The CLI's side asks a running daemon for live state and tells it to reload
 * agents.json; with no daemon running every call falls back to the saved
 * settings, so the CLI works the same without one. The daemon's side is
 * ag_ctl_server_*. */
#ifndef AG_CTL_H
#define AG_CTL_H

#include <stdbool.h>
#include <stddef.h>

#include "ag_store.h"

#define AG_CTL_SOCK_NAME "agent.sock"
#define AG_CTL_LOCK_NAME "daemon.lock"
#define AG_CTL_STATE_MAX 16
#define AG_CTL_ERROR_MAX 256

/* One agent's live state as a running daemon reports it. */
struct ag_ctl_state {
    char name[AG_NAME_MAX + 1];
    char state[AG_CTL_STATE_MAX]; /* connected | connecting | disconnected | error */
    char error[AG_CTL_ERROR_MAX]; /* last error, "" for none */
};

/* Prints `status` for home on stdout: live state from the running daemon, or
 * the saved settings with state "disconnected" when none runs. json selects
 * {"agents":[{"name","id","address","target","enabled","state","url","error",
 * ...}],"daemon":BOOL}. Returns 0, or -1 after printing an error on stderr. */
int ag_ctl_status(const char *home, bool json);

/* `status --watch`: redraws a compact live view every second on a terminal
 * (names, states, URLs, requests/s, errors; q or Ctrl-C quits), or, when
 * stdout is not a terminal, prints one line per agent whenever that line
 * changes (and one when the daemon comes or goes) until SIGINT/SIGTERM.
 * Returns 0, or -1 after printing an error on stderr. */
int ag_ctl_watch(const char *home);

/* Asks the running daemon for every agent's state. Returns 1 with *out (array
 * of *n entries, caller frees) when a daemon answered, 0 with *out NULL and *n
 * 0 when none runs, -1 on error. */
int ag_ctl_states(const char *home, struct ag_ctl_state **out, size_t *n);

/* Tells a running daemon that agents.json changed (after new, set, enable,
 * disable, remove). Best effort: does nothing when no daemon runs. */
void ag_ctl_notify(const char *home);

/* Sends one request line (a JSON object) to the running daemon and returns
 * its answer line in *answer (caller frees). Returns 1 (answered), 0 (no
 * daemon runs), -1 (error). */
int ag_ctl_call(const char *home, const char *req, char **answer);

/* ---- daemon side ---- */

struct event_base;
struct ag_ctl_server;

/* Answers one request line (a JSON object, NUL-terminated) with a malloc'd
 * JSON text (no newline), or NULL (the client then gets an error object). */
typedef char *(*ag_ctl_handler_cb)(void *arg, const char *line);

/* Takes <home>/daemon.lock (flock, held until free) and listens on
 * <home>/agent.sock, 0600. A socket file left by a killed daemon (nobody
 * accepts on it) is replaced. Returns NULL with err set; *busy is true when
 * another daemon runs for this home. */
struct ag_ctl_server *ag_ctl_server_new(struct event_base *base, const char *home,
                                        ag_ctl_handler_cb cb, void *arg, bool *busy, char *err,
                                        size_t errlen);

/* Stops listening, removes the socket file, releases the lock. Takes NULL. */
void ag_ctl_server_free(struct ag_ctl_server *s);

#endif
