/* tunnel-agent's settings store: agents.json and keys/, see ag_store.h.
 * The parsed file lives in plain structs; keys this version does not know
 * (top level and per agent) are kept as cJSON and written back unchanged, so a
 * newer daemon's fields survive an older CLI. */
#include "ag_store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "util.h"

#define STORE_FILE "agents.json"
#define STORE_LOCK ".lock"
#define STORE_KEYS_DIR "keys"
#define STORE_REMOVED_DIR "removed"
#define STORE_MAX_BYTES (16u << 20) /* refuse to read a bigger agents.json */
#define STORE_LOCK_WAIT_MS 10000    /* how long to wait for another tunnel-agent */
#define STORE_LOCK_POLL_MS 50

/* One agent plus the keys of its JSON object this version does not know. */
struct store_entry {
    struct ag_agent a;
    cJSON *extra; /* owned; object of unknown keys, or NULL */
};

struct ag_store {
    char home[PATH_MAX]; /* the home directory, as resolved */
    enum ag_store_mode mode;
    int lock_fd;   /* <home>/.lock with LOCK_EX held, or -1 */
    char *gateway; /* owned; remembered --gateway, or NULL */
    char *ca_file; /* owned; remembered --ca-file, or NULL */
    enum ag_protocol protocol;
    struct store_entry *v; /* owned array of n entries, cap allocated */
    size_t n;
    size_t cap;
    cJSON *extra; /* owned; unknown top-level keys, or NULL */
};

/* Keys written by this version; anything else is kept in `extra`. */
static const char *const top_keys[] = {"version", "gateway", "ca_file", "protocol", "agents"};
static const char *const agent_keys[] = {
    "name",         "id",        "address",          "target",   "enabled", "preserve_host",
    "max_inflight", "id_header", "response_timeout", "key_file", "created", "superseded",
    "preset",
};

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap); /* a truncated message is still useful */
    va_end(ap);
}

static int path_join(char *out, size_t outlen, const char *dir, const char *name)
{
    return util_snprintf(out, outlen, "%s/%s", dir, name) < 0 ? -1 : 0;
}

/* ---- home directory ---------------------------------------------------- */

static bool is_set(const char *s)
{
    return s != NULL && s[0] != '\0';
}

int ag_store_home_resolve(const char *opt, const char *env_home, const char *xdg,
                          const char *user_home, char *out, size_t outlen, char *err, size_t errlen)
{
    int rc;

    if (is_set(opt))
        rc = util_snprintf(out, outlen, "%s", opt);
    else if (is_set(env_home))
        rc = util_snprintf(out, outlen, "%s", env_home);
    else if (is_set(xdg))
        rc = util_snprintf(out, outlen, "%s/tunnel-agent", xdg);
    else if (is_set(user_home))
        rc = util_snprintf(out, outlen, "%s/.config/tunnel-agent", user_home);
    else {
        seterr(err, errlen,
               "no home directory: pass --home DIR or set TUNNEL_AGENT_HOME, "
               "XDG_CONFIG_HOME or HOME");
        return -1;
    }
    if (rc < 0) {
        seterr(err, errlen, "home directory path is too long (limit %zu bytes)", outlen - 1);
        return -1;
    }
    /* Trailing slashes would double up in every path built from home. */
    for (size_t len = strlen(out); len > 1 && out[len - 1] == '/'; len--)
        out[len - 1] = '\0';
    return 0;
}

/* mkdir -p with mode 0700 for every directory it creates. */
static int mkdir_p(const char *path, char *err, size_t errlen)
{
    char buf[PATH_MAX];
    struct stat st;

    if (util_snprintf(buf, sizeof(buf), "%s", path) < 0) {
        seterr(err, errlen, "%s: path too long", path);
        return -1;
    }
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        if (mkdir(buf, 0700) == -1 && errno != EEXIST) {
            seterr(err, errlen, "%s: cannot create directory: %s", buf, strerror(errno));
            return -1;
        }
        *p = saved;
        if (saved == '\0')
            break;
    }
    if (stat(path, &st) == -1 || !S_ISDIR(st.st_mode)) {
        seterr(err, errlen, "%s: not a directory", path);
        return -1;
    }
    return 0;
}

static int fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd == -1)
        return -1;
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* Writes data to dir/name atomically: a temp file in dir, fsync, rename over
 * the target, fsync dir. The temp file is removed on failure. */
static int atomic_write(const char *dir, const char *name, const char *data, size_t len, char *err,
                        size_t errlen)
{
    char tmp[PATH_MAX];
    char dst[PATH_MAX];
    size_t off = 0;
    int fd;

    if (util_snprintf(tmp, sizeof(tmp), "%s/.%s.XXXXXX", dir, name) < 0 ||
        path_join(dst, sizeof(dst), dir, name) != 0) {
        seterr(err, errlen, "%s: path too long", dir);
        return -1;
    }
    fd = mkstemp(tmp); /* O_EXCL, mode 0600 */
    if (fd == -1) {
        seterr(err, errlen, "%s: cannot create a temporary file: %s", dir, strerror(errno));
        return -1;
    }
    while (off < len) {
        ssize_t w = write(fd, data + off, len - off);
        if (w == -1 && errno == EINTR)
            continue;
        if (w == -1) {
            seterr(err, errlen, "%s: write failed: %s", tmp, strerror(errno));
            goto fail_tmp;
        }
        off += (size_t)w;
    }
    if (fsync(fd) == -1) {
        seterr(err, errlen, "%s: fsync failed: %s", tmp, strerror(errno));
        goto fail_tmp;
    }
    if (close(fd) == -1) {
        fd = -1;
        seterr(err, errlen, "%s: close failed: %s", tmp, strerror(errno));
        goto fail_tmp;
    }
    fd = -1;
    if (rename(tmp, dst) == -1) {
        seterr(err, errlen, "%s: cannot replace: %s", dst, strerror(errno));
        goto fail_tmp;
    }
    /* The new file is in place. A failed directory fsync leaves only its
     * durability in doubt; reporting failure now would make callers undo
     * work (delete a fresh key) that agents.json already records. */
    fsync_dir(dir);
    return 0;

fail_tmp:
    if (fd != -1)
        close(fd);
    unlink(tmp);
    return -1;
}

/* ---- validation -------------------------------------------------------- */

bool ag_store_name_is_valid(const char *name)
{
    size_t len = strlen(name);

    if (len == 0 || len > AG_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

bool ag_store_header_is_valid(const char *name)
{
    size_t len = strlen(name);

    /* RFC 9110 5.1: field-name = token; 5.6.2: tchar. */
    if (len == 0 || len > AG_ID_HEADER_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              strchr("!#$%&'*+-.^_`|~", c) != NULL))
            return false;
    }
    return true;
}

static bool key_file_is_valid(const char *name)
{
    size_t len = strlen(name);

    /* A plain file name under keys/: no directories, no hidden files. */
    if (len == 0 || len > AG_KEY_FILE_MAX || name[0] == '.')
        return false;
    return strchr(name, '/') == NULL;
}

static bool uuid_is_valid(const char *s)
{
    if (strlen(s) != 36)
        return false;
    for (size_t i = 0; i < 36; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;
        if (dash ? s[i] != '-' : !util_is_hex_digit((unsigned char)s[i]))
            return false;
    }
    return true;
}

/* URL bytes: printable ASCII except space; no query or fragment. */
static int check_url_bytes(const char *what, const char *url, char *err, size_t errlen)
{
    for (const char *p = url; *p != '\0'; p++) {
        unsigned char c = (unsigned char)*p;
        if (c <= 0x20 || c >= 0x7f) {
            seterr(err, errlen, "%s \"%s\": contains a space, control or non-ASCII byte", what,
                   url);
            return -1;
        }
        if (c == '?' || c == '#') {
            seterr(err, errlen, "%s \"%s\": a query or fragment is not allowed", what, url);
            return -1;
        }
    }
    return 0;
}

/* Parses "host[:port]" of len bytes. IPv6 literals in brackets. */
static int parse_authority(const char *what, const char *url, const char *a, size_t len,
                           uint16_t default_port, char host[AG_HOST_MAX + 1], uint16_t *port,
                           char *err, size_t errlen)
{
    const char *h = a;
    size_t hlen;
    const char *rest;
    size_t rlen;

    if (memchr(a, '@', len) != NULL) {
        seterr(err, errlen, "%s \"%s\": user info (user@) is not allowed", what, url);
        return -1;
    }
    if (len > 0 && a[0] == '[') {
        const char *close = memchr(a, ']', len);
        char lit[INET6_ADDRSTRLEN + 1];
        struct in6_addr in6;
        if (close == NULL) {
            seterr(err, errlen, "%s \"%s\": unterminated [IPv6] literal", what, url);
            return -1;
        }
        h = a + 1;
        hlen = (size_t)(close - h);
        if (hlen == 0 || hlen >= sizeof(lit)) {
            seterr(err, errlen, "%s \"%s\": bad IPv6 literal", what, url);
            return -1;
        }
        memcpy(lit, h, hlen);
        lit[hlen] = '\0';
        if (inet_pton(AF_INET6, lit, &in6) != 1) {
            seterr(err, errlen, "%s \"%s\": bad IPv6 literal \"%s\"", what, url, lit);
            return -1;
        }
        rest = close + 1;
    } else {
        const char *colon = memchr(a, ':', len);
        hlen = colon != NULL ? (size_t)(colon - a) : len;
        for (size_t i = 0; i < hlen; i++) {
            char c = a[i];
            if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '-' || c == '_')) {
                seterr(err, errlen, "%s \"%s\": bad character '%c' in host name", what, url, c);
                return -1;
            }
        }
        rest = a + hlen;
    }
    if (hlen == 0) {
        seterr(err, errlen, "%s \"%s\": missing host", what, url);
        return -1;
    }
    if (hlen > AG_HOST_MAX) {
        seterr(err, errlen, "%s \"%s\": host name too long", what, url);
        return -1;
    }
    memcpy(host, h, hlen);
    host[hlen] = '\0';

    rlen = len - (size_t)(rest - a);
    if (rlen == 0) {
        *port = default_port;
        return 0;
    }
    uint64_t p;
    if (rest[0] != ':' || util_parse_u64(rest + 1, rlen - 1, &p) != 0 || p == 0 || p > 65535) {
        seterr(err, errlen, "%s \"%s\": bad port (want 1-65535)", what, url);
        return -1;
    }
    *port = (uint16_t)p;
    return 0;
}

/* Splits "scheme://rest" against the two accepted schemes. */
static int parse_scheme(const char *url, const char *plain, const char *secure, bool *tls,
                        const char **rest)
{
    size_t lp = strlen(plain);
    size_t ls = strlen(secure);

    if (strncasecmp(url, plain, lp) == 0 && strncmp(url + lp, "://", 3) == 0) {
        *tls = false;
        *rest = url + lp + 3;
        return 0;
    }
    if (strncasecmp(url, secure, ls) == 0 && strncmp(url + ls, "://", 3) == 0) {
        *tls = true;
        *rest = url + ls + 3;
        return 0;
    }
    return -1;
}

int ag_store_target_parse(const char *url, struct ag_target *out, char *err, size_t errlen)
{
    const char *a;
    const char *slash;
    size_t alen;
    size_t blen;

    memset(out, 0, sizeof(*out));
    if (strlen(url) > AG_TARGET_MAX) {
        seterr(err, errlen, "target URL too long (limit %d bytes)", AG_TARGET_MAX);
        return -1;
    }
    if (parse_scheme(url, "http", "https", &out->tls, &a) != 0) {
        seterr(err, errlen, "target URL \"%s\": want http://HOST:PORT[/BASE]", url);
        return -1;
    }
    if (check_url_bytes("target URL", url, err, errlen) != 0)
        return -1;
    slash = strchr(a, '/');
    alen = slash != NULL ? (size_t)(slash - a) : strlen(a);
    if (parse_authority("target URL", url, a, alen, out->tls ? 443 : 80, out->host, &out->port, err,
                        errlen) != 0)
        return -1;
    if (slash == NULL)
        return 0;
    blen = strlen(slash);
    while (blen > 0 && slash[blen - 1] == '/')
        blen--;
    memcpy(out->base, slash, blen);
    out->base[blen] = '\0';
    return 0;
}

int ag_store_gateway_parse(const char *url, struct ag_gateway *out, char *err, size_t errlen)
{
    const char *a;
    const char *slash;
    size_t alen;

    memset(out, 0, sizeof(*out));
    if (strlen(url) > AG_GATEWAY_MAX) {
        seterr(err, errlen, "gateway URL too long (limit %d bytes)", AG_GATEWAY_MAX);
        return -1;
    }
    if (parse_scheme(url, "ws", "wss", &out->tls, &a) != 0) {
        seterr(err, errlen,
               "gateway URL \"%s\": want wss://HOST[:PORT] (or ws:// for a "
               "cleartext gateway)",
               url);
        return -1;
    }
    if (check_url_bytes("gateway URL", url, err, errlen) != 0)
        return -1;
    slash = strchr(a, '/');
    alen = slash != NULL ? (size_t)(slash - a) : strlen(a);
    if (parse_authority("gateway URL", url, a, alen, out->tls ? 443 : 80, out->host, &out->port,
                        err, errlen) != 0)
        return -1;
    if (slash != NULL && strcmp(slash, "/") != 0 && strcmp(slash, AG_TUNNEL_PATH) != 0) {
        seterr(err, errlen, "gateway URL \"%s\": no path expected (%s is implied)", url,
               AG_TUNNEL_PATH);
        return -1;
    }
    memcpy(out->path, AG_TUNNEL_PATH, sizeof(AG_TUNNEL_PATH));
    return 0;
}

static bool host_is_ip(const char *host)
{
    struct in_addr in4;
    struct in6_addr in6;

    return inet_pton(AF_INET, host, &in4) == 1 || inet_pton(AF_INET6, host, &in6) == 1;
}

int ag_store_public_url(const struct ag_gateway *gw, const char *address, char *out, size_t outlen)
{
    char port[8] = "";
    const char *host = "<your gateway domain>";
    bool tls = true;

    if (gw != NULL) {
        tls = gw->tls;
        if (gw->port != (tls ? 443 : 80))
            snprintf(port, sizeof(port), ":%u", (unsigned)gw->port);
        if (!host_is_ip(gw->host))
            host = gw->host;
    }
    return util_snprintf(out, outlen, "%s://%s.%s%s", tls ? "https" : "http", address, host, port) <
                   0
               ? -1
               : 0;
}

const char *ag_store_protocol_name(enum ag_protocol p)
{
    return p == AG_PROTO_OSAURUS ? "osaurus" : "native";
}

const char *ag_store_preset_name(enum ag_preset p)
{
    return p == AG_PRESET_OSAURUS ? "osaurus" : "none";
}

int ag_store_preset_parse(const char *s, enum ag_preset *out)
{
    if (strcmp(s, "none") == 0)
        *out = AG_PRESET_NONE;
    else if (strcmp(s, "osaurus") == 0)
        *out = AG_PRESET_OSAURUS;
    else
        return -1;
    return 0;
}

int ag_store_protocol_parse(const char *s, enum ag_protocol *out)
{
    if (strcmp(s, "native") == 0)
        *out = AG_PROTO_NATIVE;
    else if (strcmp(s, "osaurus") == 0)
        *out = AG_PROTO_OSAURUS;
    else
        return -1;
    return 0;
}

/* Checks the fields of one agent (before saving, and after loading). */
static int agent_check(const struct ag_agent *a, char *err, size_t errlen)
{
    struct ag_target t;
    uint8_t addr[ID_ADDR_LEN];
    char terr[AG_STORE_ERR_LEN];

    if (!ag_store_name_is_valid(a->name)) {
        seterr(err, errlen, "name \"%s\": use 1-%d of A-Z a-z 0-9 . _ -", a->name, AG_NAME_MAX);
        return -1;
    }
    if (!uuid_is_valid(a->id)) {
        seterr(err, errlen, "id \"%s\": not a UUID", a->id);
        return -1;
    }
    if (id_addr_parse(a->address, strlen(a->address), addr) != ID_OK) {
        seterr(err, errlen, "address \"%s\": not 0x + 40 hex digits", a->address);
        return -1;
    }
    if (ag_store_target_parse(a->target, &t, terr, sizeof(terr)) != 0) {
        seterr(err, errlen, "%s", terr);
        return -1;
    }
    if (a->max_inflight < 1 || a->max_inflight > AG_MAX_INFLIGHT_MAX) {
        seterr(err, errlen, "max_inflight %u: want 1-%d", (unsigned)a->max_inflight,
               AG_MAX_INFLIGHT_MAX);
        return -1;
    }
    if (!ag_store_header_is_valid(a->id_header)) {
        seterr(err, errlen, "id_header \"%s\": not an HTTP header name", a->id_header);
        return -1;
    }
    if (a->response_timeout_s > AG_RESPONSE_TIMEOUT_MAX) {
        seterr(err, errlen, "response_timeout %u: want 0-%d seconds",
               (unsigned)a->response_timeout_s, AG_RESPONSE_TIMEOUT_MAX);
        return -1;
    }
    if (!key_file_is_valid(a->key_file)) {
        seterr(err, errlen, "key_file \"%s\": want a file name under keys/", a->key_file);
        return -1;
    }
    return 0;
}

/* ---- loading ----------------------------------------------------------- */

static bool in_list(const char *key, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(key, list[i]) == 0)
            return true;
    return false;
}

/* Detaches into a new object every member of obj not named in list.
 * Returns 0 (with *out NULL when none) or -1 if out of memory. */
static int take_extra(cJSON *obj, const char *const *list, size_t n, cJSON **out)
{
    cJSON *it = obj->child;

    *out = NULL;
    while (it != NULL) {
        cJSON *next = it->next;
        if (it->string != NULL && !in_list(it->string, list, n)) {
            if (*out == NULL) {
                *out = cJSON_CreateObject();
                if (*out == NULL)
                    return -1;
            }
            cJSON_DetachItemViaPointer(obj, it);
            cJSON_AddItemToObject(*out, it->string, it);
        }
        it = next;
    }
    return 0;
}

/* Copies string member key of obj into out (outlen bytes). Missing: def or
 * error when def is NULL. */
static int get_str(const cJSON *obj, const char *key, const char *def, char *out, size_t outlen,
                   const char **why)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);

    if (it == NULL || cJSON_IsNull(it)) {
        if (def == NULL) {
            *why = "missing";
            return -1;
        }
        it = NULL;
    } else if (!cJSON_IsString(it)) {
        *why = "not a string";
        return -1;
    }
    if (util_snprintf(out, outlen, "%s", it != NULL ? it->valuestring : def) < 0) {
        *why = "too long";
        return -1;
    }
    return 0;
}

static int get_bool(const cJSON *obj, const char *key, bool def, bool *out, const char **why)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);

    if (it == NULL || cJSON_IsNull(it)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(it)) {
        *why = "not true or false";
        return -1;
    }
    *out = cJSON_IsTrue(it);
    return 0;
}

static int get_preset(const cJSON *obj, enum ag_preset *out, const char **why)
{
    char s[16];

    if (get_str(obj, "preset", "none", s, sizeof(s), why) != 0)
        return -1;
    if (ag_store_preset_parse(s, out) != 0) {
        *why = "want \"none\" or \"osaurus\"";
        return -1;
    }
    return 0;
}

static int get_int(const cJSON *obj, const char *key, int64_t def, int64_t min, int64_t max,
                   int64_t *out, const char **why)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);

    if (it == NULL || cJSON_IsNull(it)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(it) || floor(it->valuedouble) != it->valuedouble) {
        *why = "not a whole number";
        return -1;
    }
    if (it->valuedouble < (double)min || it->valuedouble > (double)max) {
        *why = "out of range";
        return -1;
    }
    *out = (int64_t)it->valuedouble;
    return 0;
}

/* Fills e from one element of "agents". On failure err names the field. */
static int load_agent(cJSON *obj, struct store_entry *e, char *err, size_t errlen)
{
    struct ag_agent *a = &e->a;
    const char *why = NULL;
    const char *field;
    int64_t v;
    char cerr[AG_STORE_ERR_LEN];

    if (!cJSON_IsObject(obj)) {
        seterr(err, errlen, "not an object");
        return -1;
    }
    memset(a, 0, sizeof(*a));
#define FIELD(name, expr)                                                                          \
    do {                                                                                           \
        field = (name);                                                                            \
        if ((expr) != 0)                                                                           \
            goto fail_field;                                                                       \
    } while (0)
    FIELD("name", get_str(obj, "name", NULL, a->name, sizeof(a->name), &why));
    FIELD("id", get_str(obj, "id", NULL, a->id, sizeof(a->id), &why));
    FIELD("address", get_str(obj, "address", NULL, a->address, sizeof(a->address), &why));
    FIELD("target", get_str(obj, "target", NULL, a->target, sizeof(a->target), &why));
    FIELD("enabled", get_bool(obj, "enabled", false, &a->enabled, &why));
    FIELD("preserve_host", get_bool(obj, "preserve_host", false, &a->preserve_host, &why));
    FIELD("max_inflight",
          get_int(obj, "max_inflight", AG_DEFAULT_MAX_INFLIGHT, 1, AG_MAX_INFLIGHT_MAX, &v, &why));
    a->max_inflight = (uint32_t)v;
    FIELD("id_header", get_str(obj, "id_header", AG_DEFAULT_ID_HEADER, a->id_header,
                               sizeof(a->id_header), &why));
    FIELD("response_timeout",
          get_int(obj, "response_timeout", 0, 0, AG_RESPONSE_TIMEOUT_MAX, &v, &why));
    a->response_timeout_s = (uint32_t)v;
    FIELD("key_file", get_str(obj, "key_file", NULL, a->key_file, sizeof(a->key_file), &why));
    FIELD("created", get_int(obj, "created", 0, 0, INT64_C(1) << 52, &v, &why));
    a->created = v;
    FIELD("superseded", get_bool(obj, "superseded", false, &a->superseded, &why));
    FIELD("preset", get_preset(obj, &a->preset, &why));
#undef FIELD
    /* Addresses are compared as strings everywhere: keep them lowercase. */
    for (char *p = a->address; *p != '\0'; p++)
        if (*p >= 'A' && *p <= 'F')
            *p = (char)(*p - 'A' + 'a');
    if (agent_check(a, cerr, sizeof(cerr)) != 0) {
        seterr(err, errlen, "%s", cerr);
        return -1;
    }
    if (take_extra(obj, agent_keys, sizeof(agent_keys) / sizeof(agent_keys[0]), &e->extra) != 0) {
        seterr(err, errlen, "out of memory");
        return -1;
    }
    return 0;

fail_field:
    seterr(err, errlen, "field \"%s\": %s", field, why);
    return -1;
}

static int store_grow(struct ag_store *s)
{
    if (s->n < s->cap)
        return 0;
    size_t cap = s->cap == 0 ? 8 : s->cap * 2;
    struct store_entry *v = realloc(s->v, cap * sizeof(*v));
    if (v == NULL)
        return -1;
    s->v = v;
    s->cap = cap;
    return 0;
}

/* Reads the whole file into a NUL-terminated buffer. *buf NULL and 0 when the
 * file does not exist. */
static int read_file(const char *path, char **buf, size_t *len, char *err, size_t errlen)
{
    struct stat st;
    size_t off = 0;
    char *b;
    int fd;

    *buf = NULL;
    *len = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd == -1 && errno == ENOENT)
        return 0;
    if (fd == -1) {
        seterr(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) == -1 || !S_ISREG(st.st_mode)) {
        seterr(err, errlen, "%s: not a regular file", path);
        goto fail_fd;
    }
    if ((uint64_t)st.st_size > STORE_MAX_BYTES) {
        seterr(err, errlen, "%s: too large (%lld bytes, limit %u); fix or move it away", path,
               (long long)st.st_size, STORE_MAX_BYTES);
        goto fail_fd;
    }
    b = malloc((size_t)st.st_size + 1);
    if (b == NULL) {
        seterr(err, errlen, "%s: out of memory", path);
        goto fail_fd;
    }
    for (;;) {
        if (off == (size_t)st.st_size)
            break; /* the file may grow under us; it is replaced by rename, not edited */
        ssize_t r = read(fd, b + off, (size_t)st.st_size - off);
        if (r == -1 && errno == EINTR)
            continue;
        if (r == -1) {
            seterr(err, errlen, "%s: read failed: %s", path, strerror(errno));
            goto fail_buf;
        }
        if (r == 0)
            break;
        off += (size_t)r;
    }
    b[off] = '\0';
    close(fd);
    *buf = b;
    *len = off;
    return 0;

fail_buf:
    free(b);
fail_fd:
    close(fd);
    return -1;
}

static int load(struct ag_store *s, const char *path, char *err, size_t errlen)
{
    char *buf;
    size_t len;
    const char *end = NULL;
    cJSON *root;
    cJSON *it;
    const char *why = NULL;
    char aerr[AG_STORE_ERR_LEN];
    int64_t version;

    if (read_file(path, &buf, &len, err, errlen) != 0)
        return -1;
    if (buf == NULL)
        return 0; /* no file yet: an empty store */
    if (len == 0) {
        seterr(err, errlen, "%s: empty file (expected JSON); fix or move it away", path);
        goto fail_buf;
    }
    root = cJSON_ParseWithLengthOpts(buf, len, &end, false);
    if (root == NULL) {
        size_t at = end != NULL && end >= buf && end <= buf + len ? (size_t)(end - buf) : 0;
        seterr(err, errlen, "%s: invalid JSON near byte %zu; fix or move it away", path, at);
        goto fail_buf;
    }
    /* Trailing bytes after the document are corruption too. */
    for (const char *p = end; p != NULL && p < buf + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            seterr(err, errlen,
                   "%s: invalid JSON near byte %zu (data after the end); fix or "
                   "move it away",
                   path, (size_t)(p - buf));
            goto fail_root;
        }
    }
    if (!cJSON_IsObject(root)) {
        seterr(err, errlen, "%s: top level is not a JSON object; fix or move it away", path);
        goto fail_root;
    }
    if (get_int(root, "version", -1, 0, INT32_MAX, &version, &why) != 0 || version == -1) {
        seterr(err, errlen, "%s: \"version\": %s; fix or move it away", path,
               why != NULL ? why : "missing");
        goto fail_root;
    }
    if (version != AG_STORE_VERSION) {
        seterr(err, errlen,
               "%s: version %lld is not supported (this tunnel-agent reads "
               "version %d)",
               path, (long long)version, AG_STORE_VERSION);
        goto fail_root;
    }

    it = cJSON_GetObjectItemCaseSensitive(root, "gateway");
    if (it != NULL && !cJSON_IsNull(it)) {
        struct ag_gateway gw;
        if (!cJSON_IsString(it) ||
            ag_store_gateway_parse(it->valuestring, &gw, aerr, sizeof(aerr)) != 0) {
            seterr(err, errlen, "%s: \"gateway\": %s; fix or move it away", path,
                   cJSON_IsString(it) ? aerr : "not a string");
            goto fail_root;
        }
        s->gateway = strdup(it->valuestring);
        if (s->gateway == NULL)
            goto fail_oom;
    }
    it = cJSON_GetObjectItemCaseSensitive(root, "ca_file");
    if (it != NULL && !cJSON_IsNull(it)) {
        if (!cJSON_IsString(it) || it->valuestring[0] == '\0') {
            seterr(err, errlen, "%s: \"ca_file\": not a file name; fix or move it away", path);
            goto fail_root;
        }
        s->ca_file = strdup(it->valuestring);
        if (s->ca_file == NULL)
            goto fail_oom;
    }
    it = cJSON_GetObjectItemCaseSensitive(root, "protocol");
    if (it != NULL && !cJSON_IsNull(it) &&
        (!cJSON_IsString(it) || ag_store_protocol_parse(it->valuestring, &s->protocol) != 0)) {
        seterr(err, errlen,
               "%s: \"protocol\": want \"native\" or \"osaurus\"; fix or move it "
               "away",
               path);
        goto fail_root;
    }

    it = cJSON_GetObjectItemCaseSensitive(root, "agents");
    if (it != NULL && !cJSON_IsNull(it) && !cJSON_IsArray(it)) {
        seterr(err, errlen, "%s: \"agents\": not an array; fix or move it away", path);
        goto fail_root;
    }
    for (cJSON *ao = it != NULL ? it->child : NULL; ao != NULL; ao = ao->next) {
        struct store_entry *e;
        if (store_grow(s) != 0)
            goto fail_oom;
        e = &s->v[s->n];
        e->extra = NULL;
        if (load_agent(ao, e, aerr, sizeof(aerr)) != 0) {
            cJSON_Delete(e->extra);
            seterr(err, errlen, "%s: agents[%zu]: %s; fix or move it away", path, s->n, aerr);
            goto fail_root;
        }
        s->n++;
        for (size_t j = 0; j + 1 < s->n; j++) {
            if (strcmp(s->v[j].a.name, e->a.name) == 0) {
                seterr(err, errlen,
                       "%s: agents[%zu]: name \"%s\" appears twice; fix or move "
                       "it away",
                       path, s->n - 1, e->a.name);
                goto fail_root;
            }
        }
    }
    if (take_extra(root, top_keys, sizeof(top_keys) / sizeof(top_keys[0]), &s->extra) != 0)
        goto fail_oom;
    cJSON_Delete(root);
    free(buf);
    return 0;

fail_oom:
    seterr(err, errlen, "%s: out of memory", path);
fail_root:
    cJSON_Delete(root);
fail_buf:
    free(buf);
    return -1;
}

/* ---- open / free / save ------------------------------------------------ */

static int lock_home(struct ag_store *s, char *err, size_t errlen)
{
    char path[PATH_MAX];
    int waited_ms = 0;

    if (path_join(path, sizeof(path), s->home, STORE_LOCK) != 0) {
        seterr(err, errlen, "%s: path too long", s->home);
        return -1;
    }
    s->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (s->lock_fd == -1) {
        seterr(err, errlen, "%s: cannot open lock file: %s", path, strerror(errno));
        return -1;
    }
    while (flock(s->lock_fd, LOCK_EX | LOCK_NB) == -1) {
        if (errno == EINTR)
            continue;
        if (errno != EWOULDBLOCK || waited_ms >= STORE_LOCK_WAIT_MS) {
            seterr(err, errlen, "%s: %s", path,
                   errno == EWOULDBLOCK ? "still locked by another tunnel-agent after 10 s"
                                        : strerror(errno));
            close(s->lock_fd);
            s->lock_fd = -1;
            return -1;
        }
        struct timespec ts = {0, STORE_LOCK_POLL_MS * 1000000L};
        nanosleep(&ts, NULL);
        waited_ms += STORE_LOCK_POLL_MS;
    }
    return 0;
}

struct ag_store *ag_store_open(const char *home, enum ag_store_mode mode, char *err, size_t errlen)
{
    char path[PATH_MAX];
    struct ag_store *s = calloc(1, sizeof(*s));

    if (s == NULL) {
        seterr(err, errlen, "out of memory");
        return NULL;
    }
    s->lock_fd = -1;
    s->mode = mode;
    s->protocol = AG_PROTO_NATIVE;
    if (util_snprintf(s->home, sizeof(s->home), "%s", home) < 0 ||
        path_join(path, sizeof(path), home, STORE_FILE) != 0) {
        seterr(err, errlen, "%s: path too long", home);
        goto fail_store;
    }
    if (mode == AG_STORE_WRITE) {
        if (mkdir_p(home, err, errlen) != 0 || lock_home(s, err, errlen) != 0)
            goto fail_store;
    }
    if (load(s, path, err, errlen) != 0)
        goto fail_store;
    return s;

fail_store:
    ag_store_free(s);
    return NULL;
}

void ag_store_free(struct ag_store *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->n; i++)
        cJSON_Delete(s->v[i].extra);
    free(s->v);
    cJSON_Delete(s->extra);
    free(s->gateway);
    free(s->ca_file);
    if (s->lock_fd != -1)
        close(s->lock_fd); /* releases the flock */
    free(s);
}

/* Adds every member of extra (duplicated) to obj. */
static int add_extra(cJSON *obj, const cJSON *extra)
{
    for (const cJSON *it = extra != NULL ? extra->child : NULL; it != NULL; it = it->next) {
        cJSON *dup = cJSON_Duplicate(it, true);
        if (dup == NULL || !cJSON_AddItemToObject(obj, it->string, dup)) {
            cJSON_Delete(dup);
            return -1;
        }
    }
    return 0;
}

static cJSON *agent_to_json(const struct store_entry *e)
{
    const struct ag_agent *a = &e->a;
    cJSON *o = cJSON_CreateObject();

    if (o == NULL)
        return NULL;
    if (cJSON_AddStringToObject(o, "name", a->name) == NULL ||
        cJSON_AddStringToObject(o, "id", a->id) == NULL ||
        cJSON_AddStringToObject(o, "address", a->address) == NULL ||
        cJSON_AddStringToObject(o, "target", a->target) == NULL ||
        cJSON_AddBoolToObject(o, "enabled", a->enabled) == NULL ||
        cJSON_AddBoolToObject(o, "preserve_host", a->preserve_host) == NULL ||
        cJSON_AddNumberToObject(o, "max_inflight", a->max_inflight) == NULL ||
        cJSON_AddStringToObject(o, "id_header", a->id_header) == NULL ||
        cJSON_AddNumberToObject(o, "response_timeout", a->response_timeout_s) == NULL ||
        cJSON_AddStringToObject(o, "key_file", a->key_file) == NULL ||
        cJSON_AddNumberToObject(o, "created", (double)a->created) == NULL ||
        cJSON_AddBoolToObject(o, "superseded", a->superseded) == NULL ||
        cJSON_AddStringToObject(o, "preset", ag_store_preset_name(a->preset)) == NULL ||
        add_extra(o, e->extra) != 0) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static cJSON *store_to_json(const struct ag_store *s)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *arr;

    if (root == NULL)
        return NULL;
    if (cJSON_AddNumberToObject(root, "version", AG_STORE_VERSION) == NULL ||
        (s->gateway != NULL ? cJSON_AddStringToObject(root, "gateway", s->gateway)
                            : cJSON_AddNullToObject(root, "gateway")) == NULL ||
        (s->ca_file != NULL ? cJSON_AddStringToObject(root, "ca_file", s->ca_file)
                            : cJSON_AddNullToObject(root, "ca_file")) == NULL ||
        cJSON_AddStringToObject(root, "protocol", ag_store_protocol_name(s->protocol)) == NULL)
        goto fail_root;
    arr = cJSON_AddArrayToObject(root, "agents");
    if (arr == NULL)
        goto fail_root;
    for (size_t i = 0; i < s->n; i++) {
        cJSON *o = agent_to_json(&s->v[i]);
        if (o == NULL || !cJSON_AddItemToArray(arr, o)) {
            cJSON_Delete(o);
            goto fail_root;
        }
    }
    if (add_extra(root, s->extra) != 0)
        goto fail_root;
    return root;

fail_root:
    cJSON_Delete(root);
    return NULL;
}

int ag_store_save(struct ag_store *s, char *err, size_t errlen)
{
    char aerr[AG_STORE_ERR_LEN];
    cJSON *root;
    char *text;
    size_t len;
    int rc;

    if (s->mode != AG_STORE_WRITE || s->lock_fd == -1) {
        seterr(err, errlen, "%s: store opened read-only", s->home);
        return -1;
    }
    for (size_t i = 0; i < s->n; i++) {
        if (agent_check(&s->v[i].a, aerr, sizeof(aerr)) != 0) {
            seterr(err, errlen, "agent \"%s\": %s", s->v[i].a.name, aerr);
            return -1;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(s->v[i].a.name, s->v[j].a.name) == 0) {
                seterr(err, errlen, "agent name \"%s\" appears twice", s->v[i].a.name);
                return -1;
            }
        }
    }
    root = store_to_json(s);
    if (root == NULL) {
        seterr(err, errlen, "out of memory");
        return -1;
    }
    text = cJSON_Print(root);
    cJSON_Delete(root);
    if (text == NULL) {
        seterr(err, errlen, "out of memory");
        return -1;
    }
    len = strlen(text);
    /* cJSON_Print has no trailing newline; files read better with one. */
    char *withnl = realloc(text, len + 2);
    if (withnl == NULL) {
        free(text);
        seterr(err, errlen, "out of memory");
        return -1;
    }
    withnl[len] = '\n';
    withnl[len + 1] = '\0';
    rc = atomic_write(s->home, STORE_FILE, withnl, len + 1, err, errlen);
    free(withnl);
    return rc;
}

/* ---- accessors --------------------------------------------------------- */

const char *ag_store_home(const struct ag_store *s)
{
    return s->home;
}

size_t ag_store_count(const struct ag_store *s)
{
    return s->n;
}

struct ag_agent *ag_store_agent(struct ag_store *s, size_t i)
{
    return i < s->n ? &s->v[i].a : NULL;
}

struct ag_agent *ag_store_find(struct ag_store *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->v[i].a.name, name) == 0)
            return &s->v[i].a;
    return NULL;
}

const char *ag_store_gateway(const struct ag_store *s)
{
    return s->gateway;
}

const char *ag_store_ca_file(const struct ag_store *s)
{
    return s->ca_file;
}

enum ag_protocol ag_store_protocol(const struct ag_store *s)
{
    return s->protocol;
}

static int replace_str(char **slot, const char *v, char *err, size_t errlen)
{
    char *copy = NULL;

    if (v != NULL) {
        copy = strdup(v);
        if (copy == NULL) {
            seterr(err, errlen, "out of memory");
            return -1;
        }
    }
    free(*slot);
    *slot = copy;
    return 0;
}

int ag_store_set_gateway(struct ag_store *s, const char *url, char *err, size_t errlen)
{
    struct ag_gateway gw;

    if (url != NULL && ag_store_gateway_parse(url, &gw, err, errlen) != 0)
        return -1;
    return replace_str(&s->gateway, url, err, errlen);
}

int ag_store_set_ca_file(struct ag_store *s, const char *path, char *err, size_t errlen)
{
    if (path != NULL && path[0] == '\0') {
        seterr(err, errlen, "empty CA file name");
        return -1;
    }
    return replace_str(&s->ca_file, path, err, errlen);
}

void ag_store_set_protocol(struct ag_store *s, enum ag_protocol p)
{
    s->protocol = p;
}

int ag_store_key_path(const struct ag_store *s, const struct ag_agent *a, char *out, size_t outlen)
{
    return util_snprintf(out, outlen, "%s/" STORE_KEYS_DIR "/%s", s->home, a->key_file) < 0 ? -1
                                                                                            : 0;
}

/* ---- agents and keys --------------------------------------------------- */

static bool path_exists(const char *path)
{
    struct stat st;

    return lstat(path, &st) == 0 || errno != ENOENT;
}

int ag_store_new_agent(struct ag_store *s, const char *name, const char *target,
                       const char *import_key, struct ag_agent **out, char *err, size_t errlen)
{
    struct ag_target t;
    struct id_key k = {0};
    struct store_entry *e;
    char keys_dir[PATH_MAX];
    char key_path[PATH_MAX];
    char kerr[AG_STORE_ERR_LEN];
    int rc;

    if (s->mode != AG_STORE_WRITE) {
        seterr(err, errlen, "%s: store opened read-only", s->home);
        return -1;
    }
    if (!ag_store_name_is_valid(name)) {
        seterr(err, errlen, "invalid agent name \"%s\": use 1-%d of A-Z a-z 0-9 . _ -", name,
               AG_NAME_MAX);
        return -1;
    }
    if (ag_store_find(s, name) != NULL) {
        seterr(err, errlen, "an agent named \"%s\" already exists", name);
        return -1;
    }
    if (ag_store_target_parse(target, &t, err, errlen) != 0)
        return -1;
    if (store_grow(s) != 0) {
        seterr(err, errlen, "out of memory");
        return -1;
    }

    if (import_key != NULL) {
        rc = id_key_read(import_key, &k, kerr, sizeof(kerr));
        if (rc != ID_OK) {
            if (kerr[0] != '\0')
                seterr(err, errlen, "%s", kerr);
            else
                seterr(err, errlen, "%s: %s", import_key, id_strerror(rc));
            goto fail_key;
        }
    } else if (id_key_generate(&k) != ID_OK) {
        seterr(err, errlen, "cannot generate a key: the system's random source failed");
        goto fail_key;
    }

    e = &s->v[s->n];
    memset(e, 0, sizeof(*e));
    struct ag_agent *a = &e->a;
    memcpy(a->name, name, strlen(name) + 1);
    memcpy(a->target, target, strlen(target) + 1);
    id_addr_to_str(k.addr, a->address);
    a->max_inflight = AG_DEFAULT_MAX_INFLIGHT;
    memcpy(a->id_header, AG_DEFAULT_ID_HEADER, sizeof(AG_DEFAULT_ID_HEADER));
    a->created = util_unix_time();
    for (size_t i = 0; i < s->n; i++) {
        if (strcmp(s->v[i].a.address, a->address) == 0) {
            seterr(err, errlen, "address %s already belongs to agent \"%s\"", a->address,
                   s->v[i].a.name);
            goto fail_key;
        }
    }
    if (util_uuid4(a->id) != 0) {
        seterr(err, errlen, "cannot generate an id: the system's random source failed");
        goto fail_key;
    }

    if (path_join(keys_dir, sizeof(keys_dir), s->home, STORE_KEYS_DIR) != 0 ||
        mkdir_p(keys_dir, err, errlen) != 0)
        goto fail_key;
    /* Never overwrite a key: a leftover keys/<name>.key (say, from a copy by
     * hand) may be the only copy of some address. */
    snprintf(a->key_file, sizeof(a->key_file), "%s.key", name);
    if (ag_store_key_path(s, a, key_path, sizeof(key_path)) != 0)
        goto fail_path;
    if (path_exists(key_path)) {
        snprintf(a->key_file, sizeof(a->key_file), "%s.key", a->id);
        if (ag_store_key_path(s, a, key_path, sizeof(key_path)) != 0)
            goto fail_path;
        if (path_exists(key_path)) {
            seterr(err, errlen, "%s: already exists", key_path);
            goto fail_key;
        }
    }
    if (id_key_write(key_path, &k) != ID_OK) {
        seterr(err, errlen, "%s: cannot write key: %s", key_path, strerror(errno));
        goto fail_key;
    }
    s->n++;
    if (ag_store_save(s, err, errlen) != 0)
        goto fail_added;
    id_key_clear(&k);
    if (out != NULL)
        *out = a;
    return 0;

fail_added:
    s->n--;
    unlink(key_path);
    fsync_dir(keys_dir);
    goto fail_key;
fail_path:
    seterr(err, errlen, "%s: path too long", s->home);
fail_key:
    id_key_clear(&k);
    return -1;
}

/* Moves src to a fresh name under <home>/removed/ without overwriting. */
static int move_to_removed(const struct ag_store *s, const char *name, const char *src, char *dst,
                           size_t dstlen, char *err, size_t errlen)
{
    char dir[PATH_MAX];
    int64_t now = util_unix_time();

    if (path_join(dir, sizeof(dir), s->home, STORE_REMOVED_DIR) != 0) {
        seterr(err, errlen, "%s: path too long", s->home);
        return -1;
    }
    if (mkdir_p(dir, err, errlen) != 0)
        return -1;
    for (int n = 0; n < 100; n++) {
        int rc =
            n == 0 ? util_snprintf(dst, dstlen, "%s/%s-%lld.key", dir, name, (long long)now)
                   : util_snprintf(dst, dstlen, "%s/%s-%lld-%d.key", dir, name, (long long)now, n);
        if (rc < 0) {
            seterr(err, errlen, "%s: path too long", dir);
            return -1;
        }
        /* link() refuses to overwrite; then drop the old name. */
        if (link(src, dst) == 0) {
            if (unlink(src) == -1) {
                seterr(err, errlen, "%s: cannot remove after copying to %s: %s", src, dst,
                       strerror(errno));
                return -1;
            }
        } else if (errno == EEXIST) {
            continue;
        } else if (errno == EPERM || errno == EOPNOTSUPP || errno == EXDEV) {
            /* No hard links here: rename under our lock, having checked. */
            if (path_exists(dst))
                continue;
            if (rename(src, dst) == -1) {
                seterr(err, errlen, "%s: cannot move to %s: %s", src, dst, strerror(errno));
                return -1;
            }
        } else {
            seterr(err, errlen, "%s: cannot move to %s: %s", src, dst, strerror(errno));
            return -1;
        }
        if (chmod(dst, 0600) == -1) {
            seterr(err, errlen, "%s: chmod 600 failed: %s", dst, strerror(errno));
            return -1;
        }
        fsync_dir(dir);
        return 0;
    }
    seterr(err, errlen, "%s: no free file name for %s", dir, name);
    return -1;
}

int ag_store_remove_agent(struct ag_store *s, const char *name, bool purge, char *moved_to,
                          size_t moved_len, char *err, size_t errlen)
{
    struct store_entry saved;
    char key_path[PATH_MAX];
    char keys_dir[PATH_MAX];
    char dst[PATH_MAX];
    char merr[AG_STORE_ERR_LEN];
    size_t i;

    if (moved_to != NULL && moved_len > 0)
        moved_to[0] = '\0';
    if (s->mode != AG_STORE_WRITE) {
        seterr(err, errlen, "%s: store opened read-only", s->home);
        return -1;
    }
    for (i = 0; i < s->n; i++)
        if (strcmp(s->v[i].a.name, name) == 0)
            break;
    if (i == s->n) {
        seterr(err, errlen, "no agent named \"%s\"", name);
        return -1;
    }
    if (ag_store_key_path(s, &s->v[i].a, key_path, sizeof(key_path)) != 0 ||
        path_join(keys_dir, sizeof(keys_dir), s->home, STORE_KEYS_DIR) != 0) {
        seterr(err, errlen, "%s: path too long", s->home);
        return -1;
    }

    /* agents.json first: if the key cannot be moved afterwards it stays where
     * it was, still on disk, and the error says where. */
    saved = s->v[i];
    memmove(&s->v[i], &s->v[i + 1], (s->n - i - 1) * sizeof(s->v[0]));
    s->n--;
    if (ag_store_save(s, err, errlen) != 0) {
        memmove(&s->v[i + 1], &s->v[i], (s->n - i) * sizeof(s->v[0]));
        s->v[i] = saved;
        s->n++;
        return -1;
    }
    cJSON_Delete(saved.extra);

    if (!path_exists(key_path))
        return 0; /* nothing to keep or purge; moved_to stays "" */
    if (purge) {
        if (unlink(key_path) == -1) {
            seterr(err, errlen, "agent \"%s\" removed, but its key %s could not be deleted: %s",
                   name, key_path, strerror(errno));
            return -1;
        }
        fsync_dir(keys_dir);
        return 0;
    }
    if (move_to_removed(s, name, key_path, dst, sizeof(dst), merr, sizeof(merr)) != 0) {
        seterr(err, errlen, "agent \"%s\" removed, but its key stays at %s: %s", name, key_path,
               merr);
        return -1;
    }
    fsync_dir(keys_dir);
    if (moved_to != NULL && util_snprintf(moved_to, moved_len, "%s", dst) < 0)
        moved_to[0] = '\0';
    return 0;
}

int ag_store_load_key(const struct ag_store *s, const struct ag_agent *a, struct id_key *k,
                      char *err, size_t errlen)
{
    char path[PATH_MAX];
    char kerr[AG_STORE_ERR_LEN] = "";
    char addr[ID_ADDR_STR_LEN + 1];
    int rc;

    if (ag_store_key_path(s, a, path, sizeof(path)) != 0) {
        seterr(err, errlen, "%s: path too long", s->home);
        return -1;
    }
    rc = id_key_read(path, k, kerr, sizeof(kerr));
    if (rc != ID_OK) {
        if (kerr[0] != '\0')
            seterr(err, errlen, "%s", kerr);
        else
            seterr(err, errlen, "%s: %s", path, id_strerror(rc));
        id_key_clear(k);
        return -1;
    }
    id_addr_to_str(k->addr, addr);
    if (strcmp(addr, a->address) != 0) {
        seterr(err, errlen, "%s: holds the key of %s, but agent \"%s\" has address %s", path, addr,
               a->name, a->address);
        id_key_clear(k);
        return -1;
    }
    return 0;
}
