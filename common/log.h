/* Structured log lines (text key=value or JSON), one write() per line, through
 * a sink owned by the program's context. Values are escaped here, so callers
 * pass raw strings. Never log keys, cookies, Authorization or bodies. */
#ifndef LOG_H
#define LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum log_level {
    LOG_LVL_DEBUG = 0,
    LOG_LVL_INFO,
    LOG_LVL_WARN,
    LOG_LVL_ERROR,
};

enum log_format {
    LOG_FMT_TEXT = 0,
    LOG_FMT_JSON,
};

enum log_ftype {
    LOG_T_STR = 0,
    LOG_T_MEM,
    LOG_T_U64,
    LOG_T_I64,
    LOG_T_BOOL,
};

/* One key/value of a line; built by the LOG_* field macros below. */
struct log_field {
    const char *key;
    enum log_ftype type;
    const char *s;  /* LOG_T_STR (NULL prints as -), LOG_T_MEM */
    size_t len;     /* LOG_T_MEM */
    uint64_t u;     /* LOG_T_U64, LOG_T_BOOL */
    int64_t i;      /* LOG_T_I64 */
};

#define LOG_S(k, v) {.key = (k), .type = LOG_T_STR, .s = (v)}
#define LOG_M(k, p, n) {.key = (k), .type = LOG_T_MEM, .s = (const char *)(p), .len = (n)}
#define LOG_U(k, v) {.key = (k), .type = LOG_T_U64, .u = (uint64_t)(v)}
#define LOG_I(k, v) {.key = (k), .type = LOG_T_I64, .i = (int64_t)(v)}
#define LOG_B(k, v) {.key = (k), .type = LOG_T_BOOL, .u = (v) ? 1u : 0u}

struct log_sink;

/* A sink writing to fd (not owned unless log_open_dir() opened it).
 * prog names the program in JSON lines. Returns NULL if out of memory. */
struct log_sink *log_new(const char *prog, enum log_level level, enum log_format fmt, int fd);

/* log_open_dir() could not create the directory (errno set). */
#define LOG_E_MKDIR (-2)

/* Redirects the sink to <dir>/<prog>.log (created 0640, appended), creating
 * dir and its missing parents (0700) first. Returns 0, LOG_E_MKDIR, or -1 if
 * the file cannot be opened; errno set. */
int log_open_dir(struct log_sink *log, const char *dir);

/* Opens the sink's log file again by its path (after a rotation moved it
 * away, a new file appears at the old path) and writes there from now on.
 * A sink writing to a descriptor it was given does nothing. Returns 0, or -1
 * with errno set; the old file is then kept. */
int log_reopen(struct log_sink *log);

void log_free(struct log_sink *log);

void log_set_level(struct log_sink *log, enum log_level level);

bool log_enabled(const struct log_sink *log, enum log_level level);

/* Writes one line: ts, level, event, then the fields in order. */
void log_emit(struct log_sink *log, enum log_level level, const char *event,
              const struct log_field *fields, size_t nfields);

/* Parses "debug|info|warn|error" / "text|json". Return 0 or -1. */
int log_parse_level(const char *s, enum log_level *out);
int log_parse_format(const char *s, enum log_format *out);
const char *log_level_name(enum log_level level);

/* At least one field is required after the event name. */
#define LOG_AT(log, lvl, ev, ...)                                                       \
    do {                                                                                \
        if (log_enabled((log), (lvl))) {                                                \
            const struct log_field log_f_[] = {__VA_ARGS__};                            \
            log_emit((log), (lvl), (ev), log_f_, sizeof(log_f_) / sizeof(log_f_[0]));   \
        }                                                                               \
    } while (0)

#define LOG_DEBUG(log, ev, ...) LOG_AT(log, LOG_LVL_DEBUG, ev, __VA_ARGS__)
#define LOG_INFO(log, ev, ...) LOG_AT(log, LOG_LVL_INFO, ev, __VA_ARGS__)
#define LOG_WARN(log, ev, ...) LOG_AT(log, LOG_LVL_WARN, ev, __VA_ARGS__)
#define LOG_ERROR(log, ev, ...) LOG_AT(log, LOG_LVL_ERROR, ev, __VA_ARGS__)

#endif
