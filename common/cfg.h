/* Option engine: one table of struct cfg_opt drives defaults, config-file
 * keys, environment variables, command-line flags and --help, so they cannot
 * drift. Precedence, lowest first: default < config file < environment <
 * command line. The program owns its config struct; the table holds offsets
 * into it. Only cfg_load() (and what it calls here) reads the environment. */
#ifndef CFG_H
#define CFG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum cfg_type {
    CFG_T_STRING = 0, /* char *, owned; "" stores NULL */
    CFG_T_PATH,       /* char *, owned; "" stores NULL; "~" or "~/..." expands to $HOME;
                       * a relative path from the config file is taken relative to
                       * the file's directory; a default may start with
                       * ${VAR:-fallback} (unexpandable default: field left NULL) */
    CFG_T_UINT,       /* uint64_t, plain decimal 0..max (no sign, no suffix) */
    CFG_T_SECONDS,    /* uint64_t seconds, plain decimal 0..max */
    CFG_T_BOOL,       /* bool; CLI: --name alone (or --name=BOOL); file and env:
                       * true/false, yes/no, 1/0 (any case) */
    CFG_T_ENUM,       /* int-sized enum set from choices (names match in any case) */
    CFG_T_CUSTOM,     /* parse() stores into the field, release() frees it */
};

enum cfg_flag {
    CFG_F_CONFIG = 1u << 0,   /* this option names the config file: CLI and env only */
    CFG_F_CLI_ONLY = 1u << 1, /* no file key, no environment variable */
    CFG_F_EXIT = 1u << 2,     /* CFG_T_BOOL like --help: if present in argv, cfg_load()
                               * sets it and loads nothing else */
    CFG_F_LIVE = 1u << 3,     /* a reload (SIGHUP) applies a new value to the running
                               * program; without it a change needs a restart */
};

struct cfg_opt;

/* Parses value into *field for CFG_T_CUSTOM. field holds the current value
 * (zeroed, a default, or a lower layer's value); on success parse replaces it,
 * releasing what it held; on failure it leaves it alone and writes into why
 * a reason that reads after the quoted value ("is not ADDR:PORT").
 * Returns 0 or -1. */
typedef int (*cfg_parse_cb)(const struct cfg_opt *opt, const char *value, void *field,
                            char *why, size_t whylen);

/* Frees what a cfg_parse_cb stored in *field and zeroes it. */
typedef void (*cfg_release_cb)(void *field);

/* Writes the effective value of a CFG_T_CUSTOM field as text ("" when unset),
 * for --check-config and reload diffs. Returns 0, or -1 if it does not fit. */
typedef int (*cfg_show_cb)(const struct cfg_opt *opt, const void *field, char *buf,
                           size_t buflen);

/* One enum choice. Hidden choices are accepted but not listed in --help
 * (e.g. "warning" for warn, as Python log configs write it). */
struct cfg_choice {
    const char *name;
    int value;
    bool hidden;
};

struct cfg_opt {
    const char *name;      /* "max-header-bytes": --max-header-bytes[=V]; file key with
                            * '-' or '_'; env <PREFIX>_MAX_HEADER_BYTES */
    const char *env;       /* extra environment name ("PORT"), or NULL */
    enum cfg_type type;
    unsigned flags;        /* enum cfg_flag bits */
    size_t offset;         /* offsetof(program config struct, field) */
    const char *def;       /* default as text, parsed like any value; NULL = zero */
    const char *metavar;   /* "N", "FILE" in --help; ignored for CFG_T_BOOL */
    const char *group;     /* --help heading; groups print in order of first use */
    const char *help;      /* one sentence */
    uint64_t max;          /* CFG_T_UINT / CFG_T_SECONDS upper bound */
    const struct cfg_choice *choices; /* CFG_T_ENUM, ended by {NULL} */
    cfg_parse_cb parse;    /* CFG_T_CUSTOM */
    cfg_release_cb release;/* CFG_T_CUSTOM; NULL if parse stores nothing owned (or
                            * another option's release frees the same field) */
    const char *const *file_aliases; /* extra file keys ("certfile"), ended by NULL */
    cfg_show_cb show;      /* CFG_T_CUSTOM; NULL: cfg_show_value() falls back to the
                            * text the winning layer gave */
};

struct cfg_spec {
    const char *prog;        /* "tunnel-gateway" for the usage line */
    const char *summary;     /* one line under the usage line */
    const char *env_prefix;  /* "TUNNEL_GATEWAY" */
    const struct cfg_opt *opts;
    size_t nopts;
    /* File keys of related formats (the ProxyStore relay's) that this program
     * does not use: accepted with a warning instead of an error. NULL-ended. */
    const char *const *ignored_keys;
};

/* Messages that do not stop loading (ignored keys), for the caller to log. */
struct cfg_warnings {
    char **v; /* owned strings */
    size_t n;
};

/* Where one option's value came from (cfg_load_src). */
struct cfg_source {
    char *where; /* owned: "default", "file PATH:LINE", "env NAME" or "command line" */
    char *text;  /* owned: the winning layer's text (the default's for "default");
                  * NULL when the option has no default and no layer set it */
};

/* Largest config file cfg_load() reads. */
#define CFG_MAX_FILE_BYTES (1024 * 1024)

/* Fills base (a zeroed program config struct) from the defaults, the config
 * file (from the CFG_F_CONFIG option: command line, else environment), the
 * environment and argv[1..argc-1], in that order. Within one layer options
 * apply in table order (so an option that edits another's field, like PORT on
 * --listen, runs after it); a flag repeated on the command line keeps its last
 * value; a key repeated in the file is an error. Empty environment variables
 * count as unset. Positional arguments are refused.
 * Warnings are appended to warn (may be NULL: then dropped).
 * Returns 0, or -1 with a message in err naming the source ("--flag",
 * "ENV_NAME" or "file:line: key") and the offending value; on -1 base has
 * been released (cfg_free_strings) and warn is left as it was. */
int cfg_load(const struct cfg_spec *spec, void *base, int argc, char *const *argv,
             struct cfg_warnings *warn, char *err, size_t errlen);

/* cfg_load(), also recording in src (spec->nopts entries, zeroed by the
 * caller; may be NULL) where each option's value came from. On -1, src holds
 * nothing (cfg_sources_free is still safe). */
int cfg_load_src(const struct cfg_spec *spec, void *base, int argc, char *const *argv,
                 struct cfg_warnings *warn, struct cfg_source *src, char *err, size_t errlen);

/* Frees the n entries' strings (not the array) and zeroes them. Takes NULL. */
void cfg_sources_free(struct cfg_source *src, size_t n);

/* Writes o's effective value in base as text into buf: strings and paths as
 * stored ("" when unset), numbers in decimal, booleans true/false, enums by
 * their first listed name, custom types through o->show, or fallback (the
 * layer's text; may be NULL for "") when o->show is NULL. Returns 0, or -1 if
 * it does not fit (buf then holds a cut value). */
int cfg_show_value(const struct cfg_opt *o, const void *base, const char *fallback, char *buf,
                   size_t buflen);

/* Exchanges the field of o between a and b (whole field, so a string changes
 * owner with it). CFG_T_CUSTOM fields are left alone (their size is the
 * program's business); returns -1 for them, else 0. */
int cfg_swap_field(const struct cfg_opt *o, void *a, void *b);

/* Applies a config file's text (one layer, as cfg_load() does for the file)
 * onto base. fname names the file in messages and anchors relative paths.
 * For tests and fuzzing. Returns 0 or -1 with err set; base keeps whatever
 * earlier layers and this one stored (release it with cfg_free_strings). */
int cfg_apply_text(const struct cfg_spec *spec, void *base, const char *text, size_t len,
                   const char *fname, struct cfg_warnings *warn, char *err, size_t errlen);

/* Called once per "key = value" line by cfg_parse_text(); section is "" before
 * any [section] header, value is decoded (quotes and escapes removed; a
 * one-line array ["a", "b"] arrives joined as "a,b"). Return 0 to go on, or
 * -1 with err set to stop. */
typedef int (*cfg_kv_cb)(void *arg, const char *section, const char *key, const char *value,
                         unsigned line, char *err, size_t errlen);

/* The file syntax alone: a TOML subset. Lines are blank, "# comment",
 * "[section]", or "key = value" with a bare key ([A-Za-z0-9_-]) and a value
 * that is "basic" (escapes \" \\ \n \t \r), 'literal', a one-line array of
 * those, or bare (up to whitespace or #). Trailing # comments are allowed
 * outside quotes. CRLF and a UTF-8 BOM are accepted. Multi-line strings,
 * dotted or quoted keys, inline tables and [[arrays]] are refused.
 * Returns 0, or -1 with "fname:line: reason" (or the callback's err). */
int cfg_parse_text(const char *text, size_t len, const char *fname, cfg_kv_cb cb, void *arg,
                   char *err, size_t errlen);

/* Frees every string and custom value the table owns in base, setting them
 * to NULL/zero. Safe on a zeroed or already-freed struct. */
void cfg_free_strings(const struct cfg_spec *spec, void *base);

/* Frees the messages and zeroes w. */
void cfg_warnings_free(struct cfg_warnings *w);

/* Writes <PREFIX>_<NAME_UPPER_UNDERSCORED> into buf. Returns 0, or -1 if it
 * does not fit. */
int cfg_env_name(const struct cfg_spec *spec, const struct cfg_opt *opt, char *buf,
                 size_t buflen);

/* Prints the usage line, the precedence rules, then every option by group
 * with its metavar, help, default, environment names and file aliases. */
void cfg_print_help(const struct cfg_spec *spec, FILE *out);

/* Prints a config file with every file key commented out at its default,
 * each under its help text, grouped as in --help. */
void cfg_print_example(const struct cfg_spec *spec, FILE *out);

/* Prints a man page (roff, man macros) for section 1: NAME, SYNOPSIS,
 * DESCRIPTION (the --help introduction), OPTIONS from the table, then
 * extra_roff (more sections, already roff; may be NULL). version goes in the
 * footer. */
void cfg_print_man(const struct cfg_spec *spec, const char *version, const char *extra_roff,
                   FILE *out);

/* Prints a bash completion script for spec->prog: every flag, file names
 * after FILE and PATH options, directories after DIR ones, enum choices. */
void cfg_print_completion(const struct cfg_spec *spec, FILE *out);

/* Writes v as a TOML basic string (quotes, backslashes and control
 * characters escaped). */
void cfg_print_toml_string(FILE *out, const char *v);

#endif
