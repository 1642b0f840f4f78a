/* The CLI's side of the daemon's local control socket (owner-only, under the
 * home directory): ask a running daemon for live state, tell it to reload
 * agents.json. With no daemon running every call falls back to the saved
 * settings, so the CLI works the same without one. */
#ifndef AG_CTL_H
#define AG_CTL_H

#include <stdbool.h>
#include <stddef.h>

#include "ag_store.h"

#define AG_CTL_STATE_MAX 16
#define AG_CTL_ERROR_MAX 256

/* One agent's live state as a running daemon reports it. */
struct ag_ctl_state {
    char name[AG_NAME_MAX + 1];
    char state[AG_CTL_STATE_MAX];  /* connected | connecting | disconnected | error */
    char error[AG_CTL_ERROR_MAX];  /* last error, "" for none */
};

/* Prints `status` for home on stdout: live state from the running daemon, or
 * the saved settings with state "disconnected" when none runs. json selects
 * {"agents":[{"name","id","address","target","enabled","state","url","error",
 * ...}],"daemon":BOOL}. Returns 0, or -1 after printing an error on stderr. */
int ag_ctl_status(const char *home, bool json);

/* Asks the running daemon for every agent's state. Returns 1 with *out (array
 * of *n entries, caller frees) when a daemon answered, 0 with *out NULL and *n
 * 0 when none runs, -1 on error. */
int ag_ctl_states(const char *home, struct ag_ctl_state **out, size_t *n);

/* Tells a running daemon that agents.json changed (after new, set, enable,
 * disable, remove). Best effort: does nothing when no daemon runs. */
void ag_ctl_notify(const char *home);

#endif
