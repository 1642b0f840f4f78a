/* Structured log lines; see log.h. A line is assembled in a fixed buffer and
 * written with one write(), so lines from one process never interleave. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LOG_LINE_MAX 8192

struct log_sink {
    char prog[32];         /* program name, for the JSON "prog" key */
    enum log_level level;  /* lines below this are dropped */
    enum log_format fmt;
    int fd;                /* where lines go */
    bool own_fd;           /* fd was opened by log_open_dir() */
    char *path;            /* owned: the file log_open_dir() opened, for log_reopen() */
};

/* A line under construction; overflow truncates and marks the line. */
struct line {
    char buf[LOG_LINE_MAX];
    size_t len;
    bool truncated;
};

static const char *const level_names[] = {"debug", "info", "warn", "error"};

struct log_sink *log_new(const char *prog, enum log_level level, enum log_format fmt, int fd)
{
    struct log_sink *log = calloc(1, sizeof(*log));

    if (log == NULL)
        return NULL;
    snprintf(log->prog, sizeof(log->prog), "%s", prog);
    log->level = level;
    log->fmt = fmt;
    log->fd = fd;
    return log;
}

/* mkdir -p with mode for every directory it creates. Returns 0 or -1 (errno). */
static int mkdir_parents(const char *dir, mode_t mode)
{
    char buf[4096];
    size_t len = strlen(dir);
    struct stat st;

    if (len == 0 || len >= sizeof(buf)) {
        errno = len == 0 ? ENOENT : ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, dir, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        buf[i] = '\0';
        if (mkdir(buf, mode) == -1 && errno != EEXIST)
            return -1;
        buf[i] = i < len ? '/' : '\0';
    }
    if (stat(dir, &st) == -1)
        return -1;
    if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

int log_open_dir(struct log_sink *log, const char *dir)
{
    char path[4096];
    char *keep;
    int fd;

    if (snprintf(path, sizeof(path), "%s/%s.log", dir, log->prog) >= (int)sizeof(path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    if (mkdir_parents(dir, 0700) != 0)
        return LOG_E_MKDIR;
    keep = strdup(path);
    if (keep == NULL)
        return -1;
    fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd == -1) {
        int e = errno;
        free(keep);
        errno = e;
        return -1;
    }
    if (log->own_fd)
        close(log->fd);
    free(log->path);
    log->path = keep;
    log->fd = fd;
    log->own_fd = true;
    return 0;
}

int log_reopen(struct log_sink *log)
{
    int fd;

    if (!log->own_fd || log->path == NULL)
        return 0;
    fd = open(log->path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd == -1)
        return -1;
    close(log->fd);
    log->fd = fd;
    return 0;
}

void log_free(struct log_sink *log)
{
    if (log == NULL)
        return;
    if (log->own_fd)
        close(log->fd);
    free(log->path);
    free(log);
}

void log_set_level(struct log_sink *log, enum log_level level)
{
    log->level = level;
}

bool log_enabled(const struct log_sink *log, enum log_level level)
{
    return log != NULL && level >= log->level;
}

const char *log_level_name(enum log_level level)
{
    return level <= LOG_LVL_ERROR ? level_names[level] : "?";
}

int log_parse_level(const char *s, enum log_level *out)
{
    for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    if (strcmp(s, "warning") == 0) {
        *out = LOG_LVL_WARN;
        return 0;
    }
    return -1;
}

int log_parse_format(const char *s, enum log_format *out)
{
    if (strcmp(s, "text") == 0)
        *out = LOG_FMT_TEXT;
    else if (strcmp(s, "json") == 0)
        *out = LOG_FMT_JSON;
    else
        return -1;
    return 0;
}

static void put(struct line *l, const char *s, size_t n)
{
    /* keep room for the final newline */
    if (n > sizeof(l->buf) - 1 - l->len) {
        n = sizeof(l->buf) - 1 - l->len;
        l->truncated = true;
    }
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static void puts_(struct line *l, const char *s)
{
    put(l, s, strlen(s));
}

static void putf(struct line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void putf(struct line *l, const char *fmt, ...)
{
    char tmp[64];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0)
        put(l, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

static bool text_needs_quotes(const char *s, size_t n)
{
    if (n == 0)
        return true;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= ' ' || c == '"' || c == '=' || c == '\\' || c >= 0x7f)
            return true;
    }
    return false;
}

/* Escapes for both formats: JSON string rules, which text mode reuses inside
 * its quotes. Bytes >= 0x80 pass through in JSON only if they were valid
 * UTF-8 is not checked here; they are escaped as \u00XX to stay valid JSON. */
static void put_escaped(struct line *l, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"':
            puts_(l, "\\\"");
            break;
        case '\\':
            puts_(l, "\\\\");
            break;
        case '\n':
            puts_(l, "\\n");
            break;
        case '\r':
            puts_(l, "\\r");
            break;
        case '\t':
            puts_(l, "\\t");
            break;
        default:
            if (c < 0x20 || c >= 0x7f)
                putf(l, "\\u%04x", c);
            else
                put(l, (const char *)&c, 1);
        }
    }
}

static void put_value(struct line *l, enum log_format fmt, const struct log_field *f)
{
    const char *s;
    size_t n;

    switch (f->type) {
    case LOG_T_U64:
        putf(l, "%" PRIu64, f->u);
        return;
    case LOG_T_I64:
        putf(l, "%" PRId64, f->i);
        return;
    case LOG_T_BOOL:
        puts_(l, f->u ? "true" : "false");
        return;
    case LOG_T_MEM:
        s = f->s != NULL ? f->s : "";
        n = f->s != NULL ? f->len : 0;
        break;
    case LOG_T_STR:
    default:
        s = f->s != NULL ? f->s : "-";
        n = strlen(s);
        break;
    }
    if (fmt == LOG_FMT_JSON || text_needs_quotes(s, n)) {
        puts_(l, "\"");
        put_escaped(l, s, n);
        puts_(l, "\"");
    } else {
        put(l, s, n);
    }
}

void log_emit(struct log_sink *log, enum log_level level, const char *event,
              const struct log_field *fields, size_t nfields)
{
    struct line l = {.len = 0};
    struct timespec ts;
    struct tm tm;
    char tsbuf[96]; /* room for any int, so the compiler can prove no truncation */

    if (!log_enabled(log, level))
        return;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(tsbuf, sizeof(tsbuf), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             ts.tv_nsec / 1000000L);
    if (log->fmt == LOG_FMT_JSON) {
        puts_(&l, "{\"ts\":\"");
        puts_(&l, tsbuf);
        puts_(&l, "\",\"level\":\"");
        puts_(&l, log_level_name(level));
        puts_(&l, "\",\"prog\":\"");
        put_escaped(&l, log->prog, strlen(log->prog));
        puts_(&l, "\",\"event\":\"");
        put_escaped(&l, event, strlen(event));
        puts_(&l, "\"");
        for (size_t i = 0; i < nfields; i++) {
            puts_(&l, ",\"");
            put_escaped(&l, fields[i].key, strlen(fields[i].key));
            puts_(&l, "\":");
            put_value(&l, LOG_FMT_JSON, &fields[i]);
        }
        if (l.truncated) {
            /* make the cut line still parse: drop to a marker object */
            l.len = 0;
            l.truncated = false;
            puts_(&l, "{\"ts\":\"");
            puts_(&l, tsbuf);
            puts_(&l, "\",\"level\":\"");
            puts_(&l, log_level_name(level));
            puts_(&l, "\",\"event\":\"");
            put_escaped(&l, event, strlen(event));
            puts_(&l, "\",\"truncated\":true");
        }
        puts_(&l, "}");
    } else {
        puts_(&l, "ts=");
        puts_(&l, tsbuf);
        puts_(&l, " level=");
        puts_(&l, log_level_name(level));
        puts_(&l, " event=");
        puts_(&l, event);
        for (size_t i = 0; i < nfields; i++) {
            puts_(&l, " ");
            puts_(&l, fields[i].key);
            puts_(&l, "=");
            put_value(&l, LOG_FMT_TEXT, &fields[i]);
        }
        if (l.truncated) {
            l.len = sizeof(l.buf) - 1 - 14;
            puts_(&l, " truncated=1");
        }
    }
    l.buf[l.len++] = '\n';
    for (size_t off = 0; off < l.len;) {
        ssize_t w = write(log->fd, l.buf + off, l.len - off);
        if (w == -1) {
            if (errno == EINTR)
                continue;
            return;
        }
        off += (size_t)w;
    }
}
