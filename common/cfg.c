/* Option engine: applies defaults, a config file, the environment and the
 * command line onto a program's config struct through its option table, and
 * prints --help from the same table. Owns nothing between calls; the strings
 * it stores belong to the program's struct (cfg_free_strings releases them).
 *
 * The file parser is our own line parser, not libinih: inih (as built by
 * Debian) treats ';' as an inline comment even inside quotes, has no quoting
 * or escapes, joins indented lines onto the previous value (INI_ALLOW_MULTILINE)
 * and truncates lines at 200 bytes (INI_MAX_LINE), while the TOML subset relay
 * configs use needs quoted strings, '#' trailing comments and exact errors.
 * Fixing that around inih would mean re-parsing every value it hands us. */
#include "cfg.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

/* Longest value shown inside an error message before it is cut with "...". */
#define CFG_SHOW_MAX 80

/* One layer's value for one option, before it is applied. */
struct cfg_slot {
    char *value;   /* owned, decoded */
    char *where;   /* owned: "--listen", "PORT", "relay.toml:3: port" */
    unsigned line; /* file layer: line of the key, for duplicate messages */
    bool set;
};

/* State of the file layer while cfg_parse_text() calls back. */
struct file_ctx {
    const struct cfg_spec *spec;
    const char *fname;
    struct cfg_slot *slots;
    struct cfg_warnings *warn;
};

static const char *env_get(const char *name)
{
    const char *v = getenv(name);

    return (v != NULL && v[0] != '\0') ? v : NULL;
}

static char *str_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static char *str_printf(const char *fmt, ...)
{
    va_list ap;
    int n;
    char *s;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return NULL;
    s = malloc((size_t)n + 1);
    if (s == NULL)
        return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

static char *str_ndup(const char *s, size_t len)
{
    char *d = malloc(len + 1);

    if (d == NULL)
        return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

/* Error text is best effort: a truncated message is still a message. */
static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Renders v for a message: printable ASCII as is (\" and \\ escaped), the
 * rest as \xNN, cut after CFG_SHOW_MAX bytes. out holds 4*CFG_SHOW_MAX+4. */
static void show_value(const char *v, char *out, size_t outlen)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    size_t i;

    for (i = 0; v[i] != '\0' && i < CFG_SHOW_MAX && o + 5 < outlen; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c >= 0x20 && c < 0x7f) {
            out[o++] = (char)c;
        } else {
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 0x0f];
        }
    }
    if (v[i] != '\0' && o + 4 <= outlen) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
}

static void add_warning(struct cfg_warnings *warn, char *msg)
{
    char **v;

    if (warn == NULL || msg == NULL) {
        free(msg);
        return;
    }
    v = realloc(warn->v, (warn->n + 1) * sizeof(*v));
    if (v == NULL) {
        free(msg); /* a lost warning is not worth failing the load */
        return;
    }
    warn->v = v;
    warn->v[warn->n++] = msg;
}

void cfg_warnings_free(struct cfg_warnings *w)
{
    if (w == NULL)
        return;
    for (size_t i = 0; i < w->n; i++)
        free(w->v[i]);
    free(w->v);
    w->v = NULL;
    w->n = 0;
}

/* --- names ------------------------------------------------------------- */

/* name uses '-'; key may use '-' or '_' in the same places. */
static bool key_matches(const char *name, const char *key)
{
    size_t i;

    for (i = 0; name[i] != '\0' && key[i] != '\0'; i++) {
        char a = name[i] == '_' ? '-' : name[i];
        char b = key[i] == '_' ? '-' : key[i];
        if (a != b)
            return false;
    }
    return name[i] == '\0' && key[i] == '\0';
}

static const struct cfg_opt *find_file_key(const struct cfg_spec *spec, const char *key)
{
    for (size_t i = 0; i < spec->nopts; i++) {
        const struct cfg_opt *o = &spec->opts[i];
        if (key_matches(o->name, key))
            return o;
        for (size_t j = 0; o->file_aliases != NULL && o->file_aliases[j] != NULL; j++) {
            if (key_matches(o->file_aliases[j], key))
                return o;
        }
    }
    return NULL;
}

static const struct cfg_opt *find_flag(const struct cfg_spec *spec, const char *name, size_t len)
{
    for (size_t i = 0; i < spec->nopts; i++) {
        const char *n = spec->opts[i].name;
        if (strlen(n) == len && memcmp(n, name, len) == 0)
            return &spec->opts[i];
    }
    return NULL;
}

static bool opt_in_file(const struct cfg_opt *o)
{
    return (o->flags & (CFG_F_CONFIG | CFG_F_CLI_ONLY)) == 0;
}

int cfg_env_name(const struct cfg_spec *spec, const struct cfg_opt *opt, char *buf,
                 size_t buflen)
{
    size_t plen = strlen(spec->env_prefix);
    size_t nlen = strlen(opt->name);

    if (plen + 1 + nlen + 1 > buflen)
        return -1;
    memcpy(buf, spec->env_prefix, plen);
    buf[plen] = '_';
    for (size_t i = 0; i < nlen; i++) {
        char c = opt->name[i];
        if (c == '-')
            c = '_';
        else if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        buf[plen + 1 + i] = c;
    }
    buf[plen + 1 + nlen] = '\0';
    return 0;
}

/* --- values ------------------------------------------------------------ */

static bool ieq(const char *a, const char *b)
{
    return util_iov_ieq_str((struct iov){a, strlen(a)}, b);
}

static int parse_bool(const char *v, bool *out)
{
    static const char *const yes[] = {"true", "yes", "1"};
    static const char *const no[] = {"false", "no", "0"};

    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (ieq(v, yes[i])) {
            *out = true;
            return 0;
        }
        if (ieq(v, no[i])) {
            *out = false;
            return 0;
        }
    }
    return -1;
}

static int parse_number(const struct cfg_opt *o, const char *v, uint64_t *out, char *why,
                        size_t whylen)
{
    uint64_t n;
    size_t len = strlen(v);

    if (util_parse_u64(v, len, &n) != 0) {
        bool digits = len > 1 && v[0] == '-';
        for (size_t i = 1; digits && i < len; i++)
            digits = v[i] >= '0' && v[i] <= '9';
        if (digits)
            set_err(why, whylen, "is negative (expected a whole number from 0 to %llu)",
                    (unsigned long long)o->max);
        else if (len > 0 && strspn(v, "0123456789") == len)
            set_err(why, whylen, "is too large (at most %llu)", (unsigned long long)o->max);
        else
            set_err(why, whylen, "is not a whole number");
        return -1;
    }
    if (n > o->max) {
        set_err(why, whylen, "is too large (at most %llu)", (unsigned long long)o->max);
        return -1;
    }
    *out = n;
    return 0;
}

static int parse_enum(const struct cfg_opt *o, const char *v, int *out, char *why, size_t whylen)
{
    size_t used = 0;

    for (size_t i = 0; o->choices[i].name != NULL; i++) {
        if (ieq(v, o->choices[i].name)) {
            *out = o->choices[i].value;
            return 0;
        }
    }
    bool first = true;
    used = (size_t)snprintf(why, whylen, "is not one of:");
    for (size_t i = 0; o->choices[i].name != NULL && used < whylen; i++) {
        if (o->choices[i].hidden)
            continue;
        int n = snprintf(why + used, whylen - used, "%s %s", first ? "" : ",",
                         o->choices[i].name);
        if (n < 0)
            break;
        used += (size_t)n;
        first = false;
    }
    return -1;
}

/* Expands "~", "~/..." and, in defaults only, a leading ${VAR:-fallback};
 * then anchors a relative path from a file at the file's directory (dir,
 * "" when the file name has none). Returns an owned string, or NULL with why
 * set (why[0] == '\0' means out of memory). */
static char *expand_path(const char *v, bool is_default, const char *dir, char *why,
                         size_t whylen)
{
    char *work = NULL;
    char *res;
    const char *home;

    why[0] = '\0';
    if (is_default && strncmp(v, "${", 2) == 0) {
        const char *end = strchr(v, '}');
        const char *sep = strstr(v, ":-");
        if (end == NULL || sep == NULL || sep > end) {
            set_err(why, whylen, "has a malformed ${VAR:-fallback}");
            return NULL;
        }
        char name[128];
        size_t nlen = (size_t)(sep - (v + 2));
        if (nlen == 0 || nlen >= sizeof(name)) {
            set_err(why, whylen, "has a malformed ${VAR:-fallback}");
            return NULL;
        }
        memcpy(name, v + 2, nlen);
        name[nlen] = '\0';
        const char *ev = env_get(name);
        if (ev != NULL)
            work = str_printf("%s%s", ev, end + 1);
        else
            work = str_printf("%.*s%s", (int)(end - (sep + 2)), sep + 2, end + 1);
        if (work == NULL)
            return NULL;
        v = work;
    }
    if (v[0] == '~' && (v[1] == '\0' || v[1] == '/')) {
        home = env_get("HOME");
        if (home == NULL) {
            set_err(why, whylen, "starts with ~ but HOME is not set");
            free(work);
            return NULL;
        }
        res = str_printf("%s%s", home, v + 1);
    } else if (v[0] != '/' && dir != NULL && dir[0] != '\0') {
        res = str_printf("%s/%s", dir, v);
    } else {
        res = strdup(v);
    }
    free(work);
    return res;
}

/* Stores one value into its field. where names the source for messages;
 * dir anchors relative paths from a file (NULL otherwise). */
static int apply_value(const struct cfg_opt *o, void *base, const char *value, const char *where,
                       const char *dir, bool is_default, char *err, size_t errlen)
{
    void *field = (char *)base + o->offset;
    char why[512];
    char shown[4 * CFG_SHOW_MAX + 8];

    why[0] = '\0';
    switch (o->type) {
    case CFG_T_STRING:
    case CFG_T_PATH: {
        char **p = field;
        char *s = NULL;
        if (value[0] != '\0') {
            if (o->type == CFG_T_PATH)
                s = expand_path(value, is_default, dir, why, sizeof(why));
            else
                s = strdup(value);
            if (s == NULL && why[0] == '\0')
                set_err(why, sizeof(why), "could not be stored: out of memory");
            if (s == NULL && is_default)
                return 0; /* an unexpandable default leaves the option unset */
            if (s == NULL)
                goto fail;
        }
        free(*p);
        *p = s;
        return 0;
    }
    case CFG_T_UINT:
    case CFG_T_SECONDS: {
        uint64_t n;
        if (parse_number(o, value, &n, why, sizeof(why)) != 0)
            goto fail;
        memcpy(field, &n, sizeof(n));
        return 0;
    }
    case CFG_T_BOOL: {
        bool b;
        if (parse_bool(value, &b) != 0) {
            set_err(why, sizeof(why), "is not a boolean (true/false, yes/no, 1/0)");
            goto fail;
        }
        memcpy(field, &b, sizeof(b));
        return 0;
    }
    case CFG_T_ENUM: {
        int e;
        if (parse_enum(o, value, &e, why, sizeof(why)) != 0)
            goto fail;
        memcpy(field, &e, sizeof(e));
        return 0;
    }
    case CFG_T_CUSTOM:
        if (o->parse(o, value, field, why, sizeof(why)) != 0)
            goto fail;
        return 0;
    }
    set_err(why, sizeof(why), "has an option type this build does not know");

fail:
    show_value(value, shown, sizeof(shown));
    set_err(err, errlen, "%s: \"%s\" %s", where, shown, why);
    return -1;
}

static void slots_free(struct cfg_slot *slots, size_t n)
{
    if (slots == NULL)
        return;
    for (size_t i = 0; i < n; i++) {
        free(slots[i].value);
        free(slots[i].where);
    }
    free(slots);
}

/* Takes ownership of value and where (also on failure). */
static int slot_set(struct cfg_slot *s, char *value, char *where, unsigned line, char *err,
                    size_t errlen)
{
    if (value == NULL || where == NULL) {
        free(value);
        free(where);
        set_err(err, errlen, "out of memory");
        return -1;
    }
    free(s->value);
    free(s->where);
    s->value = value;
    s->where = where;
    s->line = line;
    s->set = true;
    return 0;
}

/* The layer a slot came from, for struct cfg_source. */
enum layer {
    LAYER_FILE = 0,
    LAYER_ENV,
    LAYER_CLI,
};

/* Replaces src's strings (takes ownership of where and text, also on failure). */
static int source_set(struct cfg_source *src, char *where, const char *text, char *err,
                      size_t errlen)
{
    char *t = text != NULL ? strdup(text) : NULL;

    if (where == NULL || (text != NULL && t == NULL)) {
        free(where);
        free(t);
        set_err(err, errlen, "out of memory");
        return -1;
    }
    free(src->where);
    free(src->text);
    src->where = where;
    src->text = t;
    return 0;
}

/* Applies every set slot of one layer; records each in src (may be NULL).
 * fname names the file for LAYER_FILE. */
static int apply_slots(const struct cfg_spec *spec, void *base, const struct cfg_slot *slots,
                       const char *dir, enum layer layer, const char *fname,
                       struct cfg_source *src, char *err, size_t errlen)
{
    for (size_t i = 0; i < spec->nopts; i++) {
        char *where;

        if (!slots[i].set)
            continue;
        if (apply_value(&spec->opts[i], base, slots[i].value, slots[i].where, dir, false, err,
                        errlen) != 0)
            return -1;
        if (src == NULL)
            continue;
        if (layer == LAYER_FILE)
            where = str_printf("file %s:%u", fname, slots[i].line);
        else if (layer == LAYER_ENV)
            where = str_printf("env %s", slots[i].where);
        else
            where = strdup("command line");
        if (source_set(&src[i], where, slots[i].value, err, errlen) != 0)
            return -1;
    }
    return 0;
}

void cfg_sources_free(struct cfg_source *src, size_t n)
{
    if (src == NULL)
        return;
    for (size_t i = 0; i < n; i++) {
        free(src[i].where);
        free(src[i].text);
        src[i].where = NULL;
        src[i].text = NULL;
    }
}

/* --- file syntax ------------------------------------------------------- */

static bool is_key_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '-';
}

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    return p;
}

/* Decodes one quoted string starting at *pp (on the quote) into out (room
 * for the rest of the line). Advances *pp past the closing quote. */
static int parse_quoted(const char **pp, const char *end, char *out, size_t *outlen,
                        char *why, size_t whylen)
{
    const char *p = *pp;
    char q = *p++;
    size_t o = 0;

    if (end - p >= 2 && p[0] == q && p[1] == q) {
        set_err(why, whylen, "multi-line strings are not supported");
        return -1;
    }
    while (p < end && *p != q) {
        unsigned char c = (unsigned char)*p;
        if ((c < 0x20 && c != '\t') || c == 0x7f) {
            set_err(why, whylen, "control character in a string");
            return -1;
        }
        if (q == '"' && c == '\\') {
            if (p + 1 >= end) {
                set_err(why, whylen, "unterminated string");
                return -1;
            }
            switch (p[1]) {
            case '"':
                out[o++] = '"';
                break;
            case '\\':
                out[o++] = '\\';
                break;
            case 'n':
                out[o++] = '\n';
                break;
            case 't':
                out[o++] = '\t';
                break;
            case 'r':
                out[o++] = '\r';
                break;
            default:
                set_err(why, whylen, "unsupported escape \\%c in a string (use \\\" \\\\ \\n \\t \\r)",
                        p[1] >= 0x20 && p[1] < 0x7f ? p[1] : '?');
                return -1;
            }
            p += 2;
            continue;
        }
        out[o++] = (char)c;
        p++;
    }
    if (p >= end) {
        set_err(why, whylen, "unterminated string");
        return -1;
    }
    *pp = p + 1;
    *outlen = o;
    return 0;
}

/* A bare value or array item: up to whitespace, '#', or (in an array) ',' / ']'. */
static int parse_bare(const char **pp, const char *end, bool in_array, char *out, size_t *outlen,
                      char *why, size_t whylen)
{
    const char *p = *pp;
    size_t o = 0;

    while (p < end && *p != ' ' && *p != '\t' && *p != '#' &&
           !(in_array && (*p == ',' || *p == ']'))) {
        unsigned char c = (unsigned char)*p;
        if (c < 0x20 || c == 0x7f) {
            set_err(why, whylen, "control character in a value");
            return -1;
        }
        if (c == '"' || c == '\'' || c == '[' || c == '{' || (!in_array && c == ']')) {
            set_err(why, whylen, "unexpected '%c' in a bare value (quote the value)", c);
            return -1;
        }
        out[o++] = (char)c;
        p++;
    }
    if (o == 0) {
        set_err(why, whylen, "missing value");
        return -1;
    }
    *pp = p;
    *outlen = o;
    return 0;
}

/* The value part of "key = value", from p to the line's end. */
static int parse_value(const char *p, const char *end, char *out, char *why, size_t whylen)
{
    size_t o = 0;
    size_t n;

    if (p >= end || *p == '#') {
        set_err(why, whylen, "missing value");
        return -1;
    }
    if (*p == '{') {
        set_err(why, whylen, "inline tables are not supported");
        return -1;
    }
    if (*p == '[') {
        bool first = true;
        p = skip_ws(p + 1, end);
        while (p < end && *p != ']') {
            if (!first)
                out[o++] = ',';
            first = false;
            if (*p == '[' || *p == '{') {
                set_err(why, whylen, "nested arrays and tables are not supported");
                return -1;
            }
            if (*p == '"' || *p == '\'') {
                if (parse_quoted(&p, end, out + o, &n, why, whylen) != 0)
                    return -1;
            } else if (parse_bare(&p, end, true, out + o, &n, why, whylen) != 0) {
                return -1;
            }
            o += n;
            p = skip_ws(p, end);
            if (p < end && *p == ',')
                p = skip_ws(p + 1, end);
            else if (p < end && *p != ']') {
                set_err(why, whylen, "expected ',' or ']' in an array (arrays fit on one line)");
                return -1;
            }
        }
        if (p >= end) {
            set_err(why, whylen, "unterminated array (arrays fit on one line)");
            return -1;
        }
        p++;
    } else if (*p == '"' || *p == '\'') {
        if (parse_quoted(&p, end, out, &o, why, whylen) != 0)
            return -1;
    } else {
        if (parse_bare(&p, end, false, out, &o, why, whylen) != 0)
            return -1;
    }
    out[o] = '\0';
    p = skip_ws(p, end);
    if (p < end && *p != '#') {
        set_err(why, whylen, "unexpected text after the value (quote values with spaces)");
        return -1;
    }
    return 0;
}

/* One line, without its newline. section is the current [section], updated
 * in place (it has room for the line). */
static int parse_line(const char *p, const char *end, char *section, char *buf,
                      const char **key_out, const char **val_out, char *why, size_t whylen)
{
    const char *k;
    size_t klen;

    *key_out = NULL;
    p = skip_ws(p, end);
    if (p >= end || *p == '#')
        return 0;
    if (*p == '[') {
        if (p + 1 < end && p[1] == '[') {
            set_err(why, whylen, "arrays of tables ([[...]]) are not supported");
            return -1;
        }
        p = skip_ws(p + 1, end);
        k = p;
        while (p < end && (is_key_char(*p) || *p == '.'))
            p++;
        klen = (size_t)(p - k);
        p = skip_ws(p, end);
        if (klen == 0 || p >= end || *p != ']') {
            set_err(why, whylen, "malformed [section] header");
            return -1;
        }
        p = skip_ws(p + 1, end);
        if (p < end && *p != '#') {
            set_err(why, whylen, "unexpected text after [section]");
            return -1;
        }
        memcpy(section, k, klen);
        section[klen] = '\0';
        return 0;
    }
    k = p;
    while (p < end && is_key_char(*p))
        p++;
    klen = (size_t)(p - k);
    if (klen == 0) {
        if (*p == '"' || *p == '\'')
            set_err(why, whylen, "quoted keys are not supported");
        else
            set_err(why, whylen, "expected key = value");
        return -1;
    }
    p = skip_ws(p, end);
    if (p < end && *p == '.') {
        set_err(why, whylen, "dotted keys are not supported (use a [section])");
        return -1;
    }
    if (p >= end || *p != '=') {
        set_err(why, whylen, "expected '=' after key \"%.*s\"", (int)(klen > 64 ? 64 : klen), k);
        return -1;
    }
    p = skip_ws(p + 1, end);
    /* buf: key, NUL, value (decoded is never longer than raw), NUL */
    memcpy(buf, k, klen);
    buf[klen] = '\0';
    if (parse_value(p, end, buf + klen + 1, why, whylen) != 0)
        return -1;
    *key_out = buf;
    *val_out = buf + klen + 1;
    return 0;
}

int cfg_parse_text(const char *text, size_t len, const char *fname, cfg_kv_cb cb, void *arg,
                   char *err, size_t errlen)
{
    const char *p = text;
    const char *end = text + len;
    unsigned line = 0;
    char *section = NULL;
    size_t section_cap = 0;
    char *buf = NULL;
    char why[256];
    int rc = -1;

    if (len >= 3 && memcmp(p, "\xef\xbb\xbf", 3) == 0)
        p += 3;
    section = calloc(1, 1);
    if (section == NULL) {
        set_err(err, errlen, "%s: out of memory", fname);
        return -1;
    }
    section_cap = 1;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl != NULL ? nl : end;
        const char *key;
        const char *val;
        size_t llen;

        line++;
        if (le > p && le[-1] == '\r')
            le--;
        llen = (size_t)(le - p);
        if (memchr(p, '\0', llen) != NULL) {
            set_err(err, errlen, "%s:%u: NUL byte in the line", fname, line);
            goto out;
        }
        if (llen + 1 > section_cap) {
            char *ns = realloc(section, llen + 1);
            if (ns == NULL)
                goto oom;
            section = ns;
            section_cap = llen + 1;
        }
        free(buf);
        buf = malloc(llen + 2);
        if (buf == NULL)
            goto oom;
        if (parse_line(p, le, section, buf, &key, &val, why, sizeof(why)) != 0) {
            set_err(err, errlen, "%s:%u: %s", fname, line, why);
            goto out;
        }
        if (key != NULL && cb(arg, section, key, val, line, err, errlen) != 0)
            goto out;
        p = nl != NULL ? nl + 1 : end;
    }
    rc = 0;
    goto out;

oom:
    set_err(err, errlen, "%s:%u: out of memory", fname, line);
out:
    free(buf);
    free(section);
    return rc;
}

/* --- layers ------------------------------------------------------------ */

static int file_on_kv(void *arg, const char *section, const char *key, const char *value,
                      unsigned line, char *err, size_t errlen)
{
    struct file_ctx *fc = arg;
    const struct cfg_opt *o = find_file_key(fc->spec, key);
    char shown[4 * CFG_SHOW_MAX + 8];

    show_value(key, shown, sizeof(shown));
    if (o != NULL && !opt_in_file(o)) {
        set_err(err, errlen, "%s:%u: \"%s\" cannot be set in a config file (command line%s)",
                fc->fname, line, shown, (o->flags & CFG_F_CONFIG) ? " or environment" : " only");
        return -1;
    }
    if (o == NULL) {
        for (size_t i = 0; fc->spec->ignored_keys != NULL && fc->spec->ignored_keys[i] != NULL;
             i++) {
            if (key_matches(fc->spec->ignored_keys[i], key)) {
                add_warning(fc->warn, str_printf("%s:%u: ignoring \"%s\": %s does not use it",
                                                 fc->fname, line, shown, fc->spec->prog));
                return 0;
            }
        }
        set_err(err, errlen, "%s:%u: unknown key \"%s\"%s%s%s (see %s --help)", fc->fname, line,
                shown, section[0] != '\0' ? " in [" : "", section, section[0] != '\0' ? "]" : "",
                fc->spec->prog);
        return -1;
    }
    struct cfg_slot *s = &fc->slots[o - fc->spec->opts];
    if (s->set) {
        set_err(err, errlen, "%s:%u: \"%s\" sets %s again (first set at line %u; a key may "
                "appear once)", fc->fname, line, shown, o->name, s->line);
        return -1;
    }
    return slot_set(s, strdup(value), str_printf("%s:%u: %s", fc->fname, line, shown), line, err,
                    errlen);
}

/* The directory part of fname: "" when none, "/" for "/x". Owned. */
static char *dir_of(const char *fname)
{
    const char *slash = strrchr(fname, '/');

    if (slash == NULL)
        return strdup("");
    if (slash == fname)
        return strdup("/");
    return str_ndup(fname, (size_t)(slash - fname));
}

static int file_apply(const struct cfg_spec *spec, void *base, const char *text, size_t len,
                      const char *fname, struct cfg_warnings *warn, struct cfg_source *src,
                      char *err, size_t errlen)
{
    struct file_ctx fc = {spec, fname, NULL, warn};
    char *dir = NULL;
    int rc = -1;

    fc.slots = calloc(spec->nopts, sizeof(*fc.slots));
    dir = dir_of(fname);
    if (fc.slots == NULL || dir == NULL) {
        set_err(err, errlen, "%s: out of memory", fname);
        goto out;
    }
    if (cfg_parse_text(text, len, fname, file_on_kv, &fc, err, errlen) != 0)
        goto out;
    rc = apply_slots(spec, base, fc.slots, dir, LAYER_FILE, fname, src, err, errlen);
out:
    free(dir);
    slots_free(fc.slots, spec->nopts);
    return rc;
}

int cfg_apply_text(const struct cfg_spec *spec, void *base, const char *text, size_t len,
                   const char *fname, struct cfg_warnings *warn, char *err, size_t errlen)
{
    return file_apply(spec, base, text, len, fname, warn, NULL, err, errlen);
}

/* Reads path whole, refusing more than CFG_MAX_FILE_BYTES. where names the
 * option or variable that named the file. */
static char *read_file(const char *path, const char *where, size_t *lenp, char *err,
                       size_t errlen)
{
    char shown[4 * CFG_SHOW_MAX + 8];
    struct stat st;
    char *buf = NULL;
    size_t len = 0;
    int fd;

    show_value(path, shown, sizeof(shown));
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd == -1) {
        set_err(err, errlen, "%s: cannot open \"%s\": %s", where, shown, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) == -1 || !S_ISREG(st.st_mode)) {
        set_err(err, errlen, "%s: \"%s\" is not a regular file", where, shown);
        goto fail_fd;
    }
    buf = malloc(CFG_MAX_FILE_BYTES + 1);
    if (buf == NULL) {
        set_err(err, errlen, "%s: out of memory", where);
        goto fail_fd;
    }
    for (;;) {
        ssize_t n = read(fd, buf + len, CFG_MAX_FILE_BYTES + 1 - len);
        if (n == -1 && errno == EINTR)
            continue;
        if (n == -1) {
            set_err(err, errlen, "%s: cannot read \"%s\": %s", where, shown, strerror(errno));
            goto fail_buf;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len > CFG_MAX_FILE_BYTES) {
            set_err(err, errlen, "%s: \"%s\" is larger than %d bytes", where, shown,
                    CFG_MAX_FILE_BYTES);
            goto fail_buf;
        }
    }
    close(fd);
    *lenp = len;
    return buf;

fail_buf:
    free(buf);
fail_fd:
    close(fd);
    return NULL;
}

static int env_collect(const struct cfg_spec *spec, struct cfg_slot *slots, char *err,
                       size_t errlen)
{
    char name[256];

    for (size_t i = 0; i < spec->nopts; i++) {
        const struct cfg_opt *o = &spec->opts[i];
        const char *v;

        if (o->flags & CFG_F_CLI_ONLY)
            continue;
        /* The alias first, so the program's own name wins when both are set. */
        if (o->env != NULL) {
            v = env_get(o->env);
            if (v != NULL && slot_set(&slots[i], strdup(v), strdup(o->env), 0, err, errlen) != 0)
                return -1;
        }
        if (cfg_env_name(spec, o, name, sizeof(name)) != 0) {
            set_err(err, errlen, "option name too long: %s", o->name);
            return -1;
        }
        v = env_get(name);
        if (v != NULL && slot_set(&slots[i], strdup(v), strdup(name), 0, err, errlen) != 0)
            return -1;
    }
    return 0;
}

static bool arg_is_exit_flag(const struct cfg_spec *spec, const char *arg)
{
    if (strncmp(arg, "--", 2) != 0)
        return false;
    const struct cfg_opt *o = find_flag(spec, arg + 2, strlen(arg + 2));
    return o != NULL && (o->flags & CFG_F_EXIT) && o->type == CFG_T_BOOL;
}

static int cli_collect(const struct cfg_spec *spec, int argc, char *const *argv,
                       struct cfg_slot *slots, char *err, size_t errlen)
{
    char shown[4 * CFG_SHOW_MAX + 8];

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *eq;
        const struct cfg_opt *o;
        const char *v;

        if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
            show_value(a, shown, sizeof(shown));
            if (a[0] == '-' && a[1] != '\0' && strcmp(a, "--") != 0)
                set_err(err, errlen, "unknown option \"%s\" (see --help)", shown);
            else
                set_err(err, errlen, "unexpected argument \"%s\" (see --help)", shown);
            return -1;
        }
        eq = strchr(a, '=');
        o = find_flag(spec, a + 2, eq != NULL ? (size_t)(eq - a - 2) : strlen(a + 2));
        if (o == NULL) {
            show_value(a, shown, sizeof(shown));
            set_err(err, errlen, "unknown option \"%s\" (see --help)", shown);
            return -1;
        }
        if (eq != NULL) {
            v = eq + 1;
        } else if (o->type == CFG_T_BOOL) {
            v = "true";
        } else if (i + 1 >= argc) {
            set_err(err, errlen, "--%s: missing value (%s)", o->name,
                    o->metavar != NULL ? o->metavar : "VALUE");
            return -1;
        } else if (strncmp(argv[i + 1], "--", 2) == 0) {
            show_value(argv[i + 1], shown, sizeof(shown));
            set_err(err, errlen, "--%s: missing value (%s); \"%s\" is an option "
                    "(write --%s=VALUE if you mean it)", o->name,
                    o->metavar != NULL ? o->metavar : "VALUE", shown, o->name);
            return -1;
        } else {
            v = argv[++i];
        }
        if (slot_set(&slots[o - spec->opts], strdup(v), str_printf("--%s", o->name), 0, err,
                     errlen) != 0)
            return -1;
    }
    return 0;
}

static int apply_defaults(const struct cfg_spec *spec, void *base, struct cfg_source *src,
                          char *err, size_t errlen)
{
    char where[160];

    for (size_t i = 0; i < spec->nopts; i++) {
        const struct cfg_opt *o = &spec->opts[i];
        if (src != NULL && source_set(&src[i], strdup("default"), o->def, err, errlen) != 0)
            return -1;
        if (o->def == NULL)
            continue;
        snprintf(where, sizeof(where), "default of --%s", o->name);
        if (apply_value(o, base, o->def, where, NULL, true, err, errlen) != 0)
            return -1;
    }
    return 0;
}

int cfg_load(const struct cfg_spec *spec, void *base, int argc, char *const *argv,
             struct cfg_warnings *warn, char *err, size_t errlen)
{
    return cfg_load_src(spec, base, argc, argv, warn, NULL, err, errlen);
}

int cfg_load_src(const struct cfg_spec *spec, void *base, int argc, char *const *argv,
                 struct cfg_warnings *warn, struct cfg_source *src, char *err, size_t errlen)
{
    struct cfg_slot *env = NULL;
    struct cfg_slot *cli = NULL;
    struct cfg_warnings w = {NULL, 0};
    const struct cfg_slot *conf = NULL;
    char *text = NULL;
    char *path = NULL;
    int rc = -1;

    for (int i = 1; i < argc; i++) {
        if (arg_is_exit_flag(spec, argv[i])) {
            const struct cfg_opt *o = find_flag(spec, argv[i] + 2, strlen(argv[i] + 2));
            bool t = true;
            memcpy((char *)base + o->offset, &t, sizeof(t));
            return 0;
        }
    }
    env = calloc(spec->nopts, sizeof(*env));
    cli = calloc(spec->nopts, sizeof(*cli));
    if (env == NULL || cli == NULL) {
        set_err(err, errlen, "out of memory");
        goto out;
    }
    if (cli_collect(spec, argc, argv, cli, err, errlen) != 0)
        goto out;
    if (env_collect(spec, env, err, errlen) != 0)
        goto out;
    if (apply_defaults(spec, base, src, err, errlen) != 0)
        goto out;

    for (size_t i = 0; i < spec->nopts; i++) {
        if (spec->opts[i].flags & CFG_F_CONFIG) {
            conf = cli[i].set ? &cli[i] : env[i].set ? &env[i] : NULL;
            break;
        }
    }
    if (conf != NULL) {
        char why[256];
        char shown[4 * CFG_SHOW_MAX + 8];
        size_t len = 0;

        path = expand_path(conf->value, false, NULL, why, sizeof(why));
        if (path == NULL) {
            show_value(conf->value, shown, sizeof(shown));
            set_err(err, errlen, "%s: \"%s\" %s", conf->where, shown,
                    why[0] != '\0' ? why : "could not be stored: out of memory");
            goto out;
        }
        text = read_file(path, conf->where, &len, err, errlen);
        if (text == NULL)
            goto out;
        if (file_apply(spec, base, text, len, path, &w, src, err, errlen) != 0)
            goto out;
    }
    if (apply_slots(spec, base, env, NULL, LAYER_ENV, NULL, src, err, errlen) != 0)
        goto out;
    if (apply_slots(spec, base, cli, NULL, LAYER_CLI, NULL, src, err, errlen) != 0)
        goto out;

    for (size_t i = 0; i < w.n; i++) {
        add_warning(warn, w.v[i]);
        w.v[i] = NULL;
    }
    rc = 0;
out:
    if (rc != 0) {
        cfg_free_strings(spec, base);
        cfg_sources_free(src, spec->nopts);
    }
    cfg_warnings_free(&w);
    free(text);
    free(path);
    slots_free(cli, spec->nopts);
    slots_free(env, spec->nopts);
    return rc;
}

void cfg_free_strings(const struct cfg_spec *spec, void *base)
{
    for (size_t i = 0; i < spec->nopts; i++) {
        const struct cfg_opt *o = &spec->opts[i];
        void *field = (char *)base + o->offset;

        if (o->type == CFG_T_STRING || o->type == CFG_T_PATH) {
            char **p = field;
            free(*p);
            *p = NULL;
        } else if (o->type == CFG_T_CUSTOM && o->release != NULL) {
            o->release(field);
        }
    }
}

/* --- help -------------------------------------------------------------- */

/* Help lines wrap before this column. */
#define CFG_HELP_WIDTH 79

/* Prints text word-wrapped at CFG_HELP_WIDTH, every line indented. A word
 * longer than a line gets a line of its own. */
static void print_wrapped(FILE *out, size_t indent, const char *text)
{
    const char *p = text;

    while (*p != '\0') {
        size_t room = CFG_HELP_WIDTH - indent;
        size_t len = strlen(p);
        size_t cut = len;

        if (len > room) {
            cut = room;
            while (cut > 0 && p[cut] != ' ')
                cut--;
            if (cut == 0)
                cut = strcspn(p, " ");
        }
        fprintf(out, "%*s%.*s\n", (int)indent, "", (int)cut, p);
        p += cut;
        while (*p == ' ')
            p++;
    }
}

static void help_option(const struct cfg_spec *spec, const struct cfg_opt *o, FILE *out)
{
    char env[256];
    char line[1024];
    size_t used = 0;

    if (o->type == CFG_T_BOOL)
        fprintf(out, "  --%s\n", o->name);
    else
        fprintf(out, "  --%s %s\n", o->name, o->metavar != NULL ? o->metavar : "VALUE");
    print_wrapped(out, 6, o->help);
    if (o->type == CFG_T_ENUM) {
        used = (size_t)snprintf(line, sizeof(line), "one of:");
        for (size_t i = 0; o->choices[i].name != NULL && used < sizeof(line); i++) {
            if (!o->choices[i].hidden)
                used += (size_t)snprintf(line + used, sizeof(line) - used, " %s",
                                         o->choices[i].name);
        }
        print_wrapped(out, 6, line);
    }
    if (o->def != NULL)
        fprintf(out, "      default: %s\n", o->def);
    if ((o->type == CFG_T_UINT || o->type == CFG_T_SECONDS) && o->max != UINT64_MAX)
        fprintf(out, "      at most: %llu\n", (unsigned long long)o->max);
    if (o->flags & CFG_F_CLI_ONLY) {
        fprintf(out, "      command line only\n");
        return;
    }
    if (cfg_env_name(spec, o, env, sizeof(env)) == 0) {
        if (o->env != NULL)
            fprintf(out, "      env: %s (wins over %s)\n", env, o->env);
        else
            fprintf(out, "      env: %s\n", env);
    }
    if (o->flags & CFG_F_CONFIG) {
        fprintf(out, "      not a config file key\n");
        return;
    }
    if (o->file_aliases != NULL && o->file_aliases[0] != NULL) {
        used = (size_t)snprintf(line, sizeof(line), "file key also:");
        for (size_t i = 0; o->file_aliases[i] != NULL && used < sizeof(line); i++)
            used += (size_t)snprintf(line + used, sizeof(line) - used, " %s",
                                     o->file_aliases[i]);
        print_wrapped(out, 6, line);
    }
}

/* The three paragraphs --help and the man page open with (0..2). Owned;
 * NULL if out of memory. */
static char *help_intro(const struct cfg_spec *spec, int which)
{
    char example[256] = "";
    char conf[512] = "";
    char ignored[512] = "";
    size_t used = 0;

    for (size_t i = 0; i < spec->nopts; i++) {
        char env[200];
        if ((spec->opts[i].flags & CFG_F_CONFIG) &&
            cfg_env_name(spec, &spec->opts[i], env, sizeof(env)) == 0)
            snprintf(conf, sizeof(conf), " (--%s FILE, or %s)", spec->opts[i].name, env);
        if (example[0] == '\0' && spec->opts[i].type == CFG_T_UINT &&
            cfg_env_name(spec, &spec->opts[i], env, sizeof(env)) == 0)
            snprintf(example, sizeof(example), ", e.g. %s", env);
    }
    for (size_t i = 0; spec->ignored_keys != NULL && spec->ignored_keys[i] != NULL &&
                       used < sizeof(ignored); i++) {
        int n = snprintf(ignored + used, sizeof(ignored) - used, "%s%s",
                         i == 0 ? " These keys of related relay configs are ignored with a "
                                  "warning: " : ", ",
                         spec->ignored_keys[i]);
        if (n < 0)
            break;
        used += (size_t)n;
    }
    if (which == 0)
        return str_printf(
            "Each option is read, lowest precedence first, from its default, the config "
            "file%s, the environment (%s_<OPTION>%s; empty counts as unset) and the command "
            "line (--option VALUE or --option=VALUE; the last of a repeated flag wins).",
            conf, spec->env_prefix, example);
    if (which == 1)
        return str_printf(
            "The file is a TOML subset: \"key = value\" lines, keys being the option names "
            "(with '-' or '_'; each at most once) in any [section]; values \"quoted\" (escapes "
            "\\\" \\\\ \\n \\t \\r), 'literal', [\"a\", \"b\"] (read as a,b) or bare; # comments. "
            "Relative paths in the file are relative to its directory.%s",
            ignored);
    return strdup("Numbers are plain whole numbers (no unit suffixes); (s) marks seconds. "
                  "Switches such as --open also take =true/false, yes/no or 1/0, as they do "
                  "in the file and the environment.");
}

void cfg_print_help(const struct cfg_spec *spec, FILE *out)
{
    fprintf(out, "Usage: %s [OPTIONS]\n", spec->prog);
    print_wrapped(out, 0, spec->summary);
    for (int p = 0; p < 3; p++) {
        char *intro = help_intro(spec, p);
        fprintf(out, "\n");
        if (intro != NULL)
            print_wrapped(out, 0, intro);
        free(intro);
    }
    for (size_t g = 0; g < spec->nopts; g++) {
        const char *group = spec->opts[g].group;
        bool seen = false;

        for (size_t j = 0; j < g && !seen; j++)
            seen = strcmp(spec->opts[j].group, group) == 0;
        if (seen)
            continue;
        fprintf(out, "\n%s:\n", group);
        for (size_t i = g; i < spec->nopts; i++) {
            if (strcmp(spec->opts[i].group, group) == 0)
                help_option(spec, &spec->opts[i], out);
        }
    }
}

/* --- effective values -------------------------------------------------- */

int cfg_show_value(const struct cfg_opt *o, const void *base, const char *fallback, char *buf,
                   size_t buflen)
{
    const void *field = (const char *)base + o->offset;
    int n = -1;

    switch (o->type) {
    case CFG_T_STRING:
    case CFG_T_PATH: {
        const char *const *p = field;
        n = snprintf(buf, buflen, "%s", *p != NULL ? *p : "");
        break;
    }
    case CFG_T_UINT:
    case CFG_T_SECONDS: {
        uint64_t v;
        memcpy(&v, field, sizeof(v));
        n = snprintf(buf, buflen, "%llu", (unsigned long long)v);
        break;
    }
    case CFG_T_BOOL: {
        bool b;
        memcpy(&b, field, sizeof(b));
        n = snprintf(buf, buflen, "%s", b ? "true" : "false");
        break;
    }
    case CFG_T_ENUM: {
        int e;
        const char *name = "?";
        memcpy(&e, field, sizeof(e));
        for (size_t i = 0; o->choices[i].name != NULL; i++) {
            if (o->choices[i].value == e) {
                name = o->choices[i].name;
                break;
            }
        }
        n = snprintf(buf, buflen, "%s", name);
        break;
    }
    case CFG_T_CUSTOM:
        if (o->show != NULL)
            return o->show(o, field, buf, buflen);
        n = snprintf(buf, buflen, "%s", fallback != NULL ? fallback : "");
        break;
    }
    return n >= 0 && (size_t)n < buflen ? 0 : -1;
}

int cfg_swap_field(const struct cfg_opt *o, void *a, void *b)
{
    char tmp[sizeof(uint64_t)];
    size_t size;

    switch (o->type) {
    case CFG_T_STRING:
    case CFG_T_PATH:
        size = sizeof(char *);
        break;
    case CFG_T_UINT:
    case CFG_T_SECONDS:
        size = sizeof(uint64_t);
        break;
    case CFG_T_BOOL:
        size = sizeof(bool);
        break;
    case CFG_T_ENUM:
        size = sizeof(int);
        break;
    default:
        return -1;
    }
    static_assert(sizeof(char *) <= sizeof(tmp), "pointer larger than 8 bytes");
    memcpy(tmp, (char *)a + o->offset, size);
    memcpy((char *)a + o->offset, (char *)b + o->offset, size);
    memcpy((char *)b + o->offset, tmp, size);
    return 0;
}

/* --- generated documents ----------------------------------------------- */

static bool opt_is_number(const struct cfg_opt *o)
{
    return o->type == CFG_T_UINT || o->type == CFG_T_SECONDS || o->type == CFG_T_BOOL;
}

void cfg_print_toml_string(FILE *out, const char *v)
{
    fputc('"', out);
    for (; *v != '\0'; v++) {
        unsigned char c = (unsigned char)*v;
        if (c == '"' || c == '\\')
            fprintf(out, "\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            fprintf(out, "\\u%04x", c); /* control characters are escaped in TOML */
        else
            fputc(c, out);
    }
    fputc('"', out);
}

/* Prints text wrapped at CFG_HELP_WIDTH as "# " comment lines. */
static void print_comment(FILE *out, const char *text)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&buf, &len);

    if (mem == NULL)
        return;
    print_wrapped(mem, 2, text);
    fclose(mem);
    for (char *line = buf; line != NULL && *line != '\0';) {
        char *nl = strchr(line, '\n');
        size_t n = nl != NULL ? (size_t)(nl - line) : strlen(line);
        /* print_wrapped indented by 2; the comment marker takes those columns */
        fprintf(out, "#%.*s\n", (int)(n > 0 ? n - 1 : 0), n > 0 ? line + 1 : line);
        line = nl != NULL ? nl + 1 : NULL;
    }
    free(buf);
}

void cfg_print_example(const struct cfg_spec *spec, FILE *out)
{
    char *intro = help_intro(spec, 1);

    fprintf(out, "# %s configuration file: every key, commented out at its default.\n",
            spec->prog);
    fprintf(out, "# Generated from the option table (%s --help says the same); uncomment\n"
                 "# and edit what you need.\n#\n",
            spec->prog);
    if (intro != NULL)
        print_comment(out, intro);
    free(intro);
    for (size_t g = 0; g < spec->nopts; g++) {
        const char *group = spec->opts[g].group;
        bool seen = false;
        bool any = false;

        for (size_t j = 0; j < g && !seen; j++)
            seen = strcmp(spec->opts[j].group, group) == 0;
        for (size_t i = g; i < spec->nopts && !seen && !any; i++)
            any = strcmp(spec->opts[i].group, group) == 0 && opt_in_file(&spec->opts[i]);
        if (seen || !any)
            continue;
        fprintf(out, "\n# --- %s ---\n", group);
        for (size_t i = g; i < spec->nopts; i++) {
            const struct cfg_opt *o = &spec->opts[i];
            char env[256];

            if (strcmp(o->group, group) != 0 || !opt_in_file(o))
                continue;
            fprintf(out, "\n");
            print_comment(out, o->help);
            if (o->type == CFG_T_ENUM) {
                fprintf(out, "# one of:");
                for (size_t c = 0; o->choices[c].name != NULL; c++) {
                    if (!o->choices[c].hidden)
                        fprintf(out, " %s", o->choices[c].name);
                }
                fprintf(out, "\n");
            }
            if (cfg_env_name(spec, o, env, sizeof(env)) == 0)
                fprintf(out, "# env: %s%s%s\n", env, o->env != NULL ? ", " : "",
                        o->env != NULL ? o->env : "");
            if (o->def != NULL && strncmp(o->def, "${", 2) == 0) {
                /* the file does not expand ${VAR}: show the rule, not a literal */
                fprintf(out, "# default: %s\n# %s = ", o->def, o->name);
                cfg_print_toml_string(out, o->metavar != NULL ? o->metavar : "VALUE");
                fprintf(out, "\n");
            } else if (o->def != NULL) {
                fprintf(out, "# %s = ", o->name);
                if (opt_is_number(o))
                    fprintf(out, "%s", o->def);
                else
                    cfg_print_toml_string(out, o->def);
                fprintf(out, "\n");
            } else if (o->type == CFG_T_BOOL) {
                fprintf(out, "# %s = false\n", o->name);
            } else {
                fprintf(out, "# unset by default\n# %s = ", o->name);
                cfg_print_toml_string(out, o->metavar != NULL ? o->metavar : "VALUE");
                fprintf(out, "\n");
            }
        }
    }
}

/* Writes text for roff: backslashes escaped, '-' as \-, a leading '.' or '\''
 * guarded. */
static void print_roff(FILE *out, const char *text)
{
    bool bol = true;

    for (const char *p = text; *p != '\0'; p++) {
        if (bol && (*p == '.' || *p == '\''))
            fputs("\\&", out);
        bol = *p == '\n';
        if (*p == '\\')
            fputs("\\e", out);
        else if (*p == '-')
            fputs("\\-", out);
        else
            fputc(*p, out);
    }
}

static void print_roff_upper(FILE *out, const char *text)
{
    for (const char *p = text; *p != '\0'; p++) {
        if (*p == '-')
            fputs("\\-", out);
        else
            fputc(*p >= 'a' && *p <= 'z' ? *p - 'a' + 'A' : *p, out);
    }
}

static void man_option(const struct cfg_spec *spec, const struct cfg_opt *o, FILE *out)
{
    char env[256];

    fprintf(out, ".TP\n.B \\-\\-");
    print_roff(out, o->name);
    if (o->type != CFG_T_BOOL) {
        fprintf(out, " \\fI");
        print_roff(out, o->metavar != NULL ? o->metavar : "VALUE");
        fprintf(out, "\\fR");
    }
    fprintf(out, "\n");
    print_roff(out, o->help);
    fprintf(out, "\n");
    if (o->type == CFG_T_ENUM) {
        fprintf(out, ".br\nOne of:");
        for (size_t i = 0; o->choices[i].name != NULL; i++) {
            if (!o->choices[i].hidden) {
                fprintf(out, " ");
                print_roff(out, o->choices[i].name);
            }
        }
        fprintf(out, ".\n");
    }
    if (o->def != NULL) {
        fprintf(out, ".br\nDefault: ");
        print_roff(out, o->def);
        fprintf(out, "\n");
    }
    if ((o->type == CFG_T_UINT || o->type == CFG_T_SECONDS) && o->max != UINT64_MAX)
        fprintf(out, ".br\nAt most: %llu\n", (unsigned long long)o->max);
    if (o->flags & CFG_F_CLI_ONLY) {
        fprintf(out, ".br\nCommand line only.\n");
        return;
    }
    if (cfg_env_name(spec, o, env, sizeof(env)) == 0) {
        fprintf(out, ".br\nEnvironment: ");
        print_roff(out, env);
        if (o->env != NULL) {
            fprintf(out, " (wins over ");
            print_roff(out, o->env);
            fprintf(out, ")");
        }
        fprintf(out, "\n");
    }
    if (o->flags & CFG_F_CONFIG) {
        fprintf(out, ".br\nNot a config file key.\n");
        return;
    }
    fprintf(out, ".br\nFile key: ");
    print_roff(out, o->name);
    for (size_t i = 0; o->file_aliases != NULL && o->file_aliases[i] != NULL; i++) {
        fprintf(out, ", ");
        print_roff(out, o->file_aliases[i]);
    }
    fprintf(out, "%s\n", (o->flags & CFG_F_LIVE) ? " (applied on SIGHUP)" : "");
}

void cfg_print_man(const struct cfg_spec *spec, const char *version, const char *extra_roff,
                   FILE *out)
{
    fprintf(out, ".\\\" Generated from the option table; do not edit.\n.TH ");
    print_roff_upper(out, spec->prog);
    fprintf(out, " 1 \"\" \"");
    print_roff(out, spec->prog);
    fprintf(out, " ");
    print_roff(out, version);
    fprintf(out, "\" \"User Commands\"\n.SH NAME\n");
    print_roff(out, spec->prog);
    fprintf(out, " \\- ");
    print_roff(out, spec->summary);
    fprintf(out, "\n.SH SYNOPSIS\n.B ");
    print_roff(out, spec->prog);
    fprintf(out, "\n[\\fIOPTIONS\\fR]\n.SH DESCRIPTION\n");
    print_roff(out, spec->summary);
    fprintf(out, "\n");
    for (int p = 0; p < 3; p++) {
        char *intro = help_intro(spec, p);
        if (intro == NULL)
            continue;
        fprintf(out, ".PP\n");
        print_roff(out, intro);
        fprintf(out, "\n");
        free(intro);
    }
    fprintf(out, ".SH OPTIONS\n");
    for (size_t g = 0; g < spec->nopts; g++) {
        const char *group = spec->opts[g].group;
        bool seen = false;

        for (size_t j = 0; j < g && !seen; j++)
            seen = strcmp(spec->opts[j].group, group) == 0;
        if (seen)
            continue;
        fprintf(out, ".SS ");
        print_roff(out, group);
        fprintf(out, "\n");
        for (size_t i = g; i < spec->nopts; i++) {
            if (strcmp(spec->opts[i].group, group) == 0)
                man_option(spec, &spec->opts[i], out);
        }
    }
    if (extra_roff != NULL)
        fputs(extra_roff, out);
}

/* A bash identifier from prog: "tunnel-gateway" -> "tunnel_gateway". */
static void print_ident(FILE *out, const char *prog)
{
    for (const char *p = prog; *p != '\0'; p++)
        fputc((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9')
                  ? *p
                  : '_',
              out);
}

void cfg_print_completion(const struct cfg_spec *spec, FILE *out)
{
    fprintf(out, "# bash completion for %s; generated from its option table.\n", spec->prog);
    fprintf(out, "# shellcheck shell=bash\n_");
    print_ident(out, spec->prog);
    fprintf(out, "()\n{\n    local cur prev\n    cur=${COMP_WORDS[COMP_CWORD]}\n"
                 "    prev=\"\"\n    [[ $COMP_CWORD -gt 0 ]] && prev=${COMP_WORDS[COMP_CWORD-1]}\n"
                 "    case $prev in\n");
    for (size_t i = 0; i < spec->nopts; i++) {
        const struct cfg_opt *o = &spec->opts[i];
        const char *mv = o->metavar != NULL ? o->metavar : "";

        if (o->type == CFG_T_BOOL)
            continue;
        fprintf(out, "        --%s)\n", o->name);
        if (o->type == CFG_T_ENUM) {
            fprintf(out, "            COMPREPLY=($(compgen -W \"");
            for (size_t c = 0; o->choices[c].name != NULL; c++) {
                if (!o->choices[c].hidden)
                    fprintf(out, "%s%s", c == 0 ? "" : " ", o->choices[c].name);
            }
            fprintf(out, "\" -- \"$cur\"))\n");
        } else if (o->type == CFG_T_PATH && strcmp(mv, "DIR") == 0) {
            fprintf(out, "            COMPREPLY=($(compgen -d -- \"$cur\"))\n");
        } else if (o->type == CFG_T_PATH || strcmp(mv, "FILE") == 0) {
            fprintf(out, "            COMPREPLY=($(compgen -f -- \"$cur\"))\n");
        } else {
            fprintf(out, "            COMPREPLY=()\n");
        }
        fprintf(out, "            return 0\n            ;;\n");
    }
    fprintf(out, "    esac\n    COMPREPLY=($(compgen -W \"");
    for (size_t i = 0; i < spec->nopts; i++)
        fprintf(out, "%s--%s", i == 0 ? "" : " ", spec->opts[i].name);
    fprintf(out, "\" -- \"$cur\"))\n    return 0\n}\ncomplete -F _");
    print_ident(out, spec->prog);
    fprintf(out, " %s\n", spec->prog);
}
