/* Tunnel control messages (proto/PROTOCOL.md): decode with cJSON after a strict pre-scan,
 * encode with a small direct writer. The writer, not cJSON_Print, produces output so that
 * "type" comes first, invalid UTF-8 in bodies becomes U+FFFD instead of invalid JSON, and
 * a 10 MB Osaurus body is escaped once into one buffer instead of copied into a tree.
 *
 * cJSON strings are NUL-terminated and lose their length at an escaped NUL ("\u0000").
 * The pre-scan guarantees valid UTF-8 and no raw control bytes in strings; a text holding
 * "\u0000" escapes is rewritten with each escape as the byte 0xFF (never valid UTF-8)
 * before parsing, and bodies turn 0xFF back into NUL after their length is taken. Every
 * other field refuses 0xFF through its character rules. */
#include "tun_msg.h"

#include <assert.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "id.h"
#include "util.h"

#define JS_MAX_SAFE_INT 9007199254740991LL /* 2^53 - 1 */
#define NUL_MARK 0xFFu                     /* stands for an escaped NUL inside strings */

/* ------------------------------------------------------------------------------------ */
/* Error table                                                                          */

struct tun_err_info {
    const char *code;
    int close_code;
    const char *message;
};

/* Indexed by -e. */
static const struct tun_err_info tun_err_table[TUN_E_COUNT] = {
    [0] = {"ok", 0, "No error."},
    [-TUN_E_INVALID_JSON] = {"invalid_json", 4000,
                             "The message is not a JSON object of a known shape."},
    [-TUN_E_EXPECTED_AUTH_FRAME] = {"expected_auth_frame", 4000,
                                    "The first message must be a well-formed auth message."},
    [-TUN_E_INVALID_NONCE] = {"invalid_nonce", 4000,
                              "The nonce is malformed, unknown, expired or already used."},
    [-TUN_E_NO_AGENTS] = {"no_agents", 4000, "The auth message lists no agents."},
    [-TUN_E_TOO_MANY_AGENTS] = {"too_many_agents", 4000,
                                "The auth message lists more agents than allowed."},
    [-TUN_E_INVALID_ADDRESS] = {"invalid_address", 4000,
                                "An address is not 0x + 40 hex digits with a valid checksum."},
    [-TUN_E_TIMESTAMP_OUT_OF_RANGE] = {"timestamp_out_of_range", 4000,
                                       "The timestamp is more than 30 s from the gateway's "
                                       "clock."},
    [-TUN_E_PROTOCOL_ERROR] = {"protocol_error", 4000, "The peer broke the tunnel protocol."},
    [-TUN_E_SIGNATURE_VERIFICATION_FAILED] = {"signature_verification_failed", 4001,
                                              "The signature does not prove the address."},
    [-TUN_E_AUTH_TIMEOUT] = {"auth_timeout", 4001, "No valid auth message arrived within 10 s."},
    [-TUN_E_ADDRESS_NOT_ALLOWED] = {"address_not_allowed", 4003,
                                    "This gateway does not allow the address to register."},
    [-TUN_E_RATE_LIMITED] = {"rate_limited", 4029, "Too many control messages; slow down."},
    [-TUN_E_UNKNOWN_TYPE] = {"unknown_type", 0, "The message type is not known."},
    [-TUN_E_UNEXPECTED_MESSAGE] = {"unexpected_message", 0,
                                   "The message is not valid in this direction or state."},
    [-TUN_E_MAX_AGENTS_REACHED] = {"max_agents_reached", 0,
                                   "The tunnel already carries the maximum number of agents."},
    [-TUN_E_INVALID_SIGNATURE] = {"invalid_signature", 0,
                                  "The agent's signature, address or timestamp was refused."},
    [-TUN_E_RELAY_RESTARTING] = {"relay_restarting", 1012,
                                 "The gateway is restarting; reconnect now."},
    [-TUN_E_BAD_HOST_RESPONSE] = {"bad_host_response", 0,
                                  "The agent sent an invalid response frame."},
    [-TUN_E_MESSAGE_TOO_LARGE] = {"message_too_large", 1009, "The message exceeds the size limit."},
    [-TUN_E_KEEPALIVE_TIMEOUT] = {"keepalive_timeout", 1011,
                                  "Nothing was received for three ping intervals."},
    [-TUN_E_SHUTTING_DOWN] = {"shutting_down", 1001, "The gateway's drain grace period is over."},
    [-TUN_E_INTERNAL_ERROR] = {"internal_error", 1011, "The gateway failed internally."},
    [-TUN_E_OTHER] = {"unknown_error", 0, "An error this program does not know."},
};

static const struct tun_err_info *err_info(enum tun_err e)
{
    int i = -(int)e;

    if (i < 0 || i >= TUN_E_COUNT)
        i = -TUN_E_INTERNAL_ERROR;
    return &tun_err_table[i];
}

const char *tun_err_code(enum tun_err e) { return err_info(e)->code; }

const char *tun_err_message(enum tun_err e) { return err_info(e)->message; }

int tun_err_close_code(enum tun_err e) { return err_info(e)->close_code; }

enum tun_err tun_err_from_code(const char *s, size_t len)
{
    for (int i = 1; i < TUN_E_COUNT; i++) {
        if (i == -TUN_E_OTHER)
            continue;
        const char *c = tun_err_table[i].code;
        if (strlen(c) == len && memcmp(c, s, len) == 0)
            return (enum tun_err)(-i);
    }
    return TUN_E_OTHER;
}

enum tun_err tun_err_for_mode(enum tun_err e, enum tun_mode mode, enum tun_msg_type in_reply_to)
{
    if (mode == TUN_MODE_NATIVE || e == TUN_E_NONE)
        return e;
    switch (in_reply_to) {
    case TUN_MSG_AUTH:
        /* The relay reports a malformed address as a malformed frame and a stale
         * timestamp as a failed verification (PROTOCOL.md 4.4). */
        if (e == TUN_E_INVALID_ADDRESS)
            return TUN_E_EXPECTED_AUTH_FRAME;
        if (e == TUN_E_TIMESTAMP_OUT_OF_RANGE)
            return TUN_E_SIGNATURE_VERIFICATION_FAILED;
        return e;
    case TUN_MSG_ADD_AGENT:
        if (e == TUN_E_INVALID_ADDRESS || e == TUN_E_TIMESTAMP_OUT_OF_RANGE ||
            e == TUN_E_SIGNATURE_VERIFICATION_FAILED)
            return TUN_E_INVALID_SIGNATURE;
        if (e == TUN_E_INVALID_JSON)
            return TUN_E_NONE;
        return e;
    default:
        /* The relay drops what it cannot use without a word. */
        if (e == TUN_E_INVALID_JSON || e == TUN_E_UNKNOWN_TYPE || e == TUN_E_UNEXPECTED_MESSAGE ||
            e == TUN_E_INVALID_ADDRESS)
            return TUN_E_NONE;
        return e;
    }
}

/* ------------------------------------------------------------------------------------ */
/* Types                                                                                */

static const char *const type_names[TUN_MSG_TYPE_COUNT] = {
    [TUN_MSG_NONE] = NULL,
    [TUN_MSG_CHALLENGE] = "challenge",
    [TUN_MSG_AUTH] = "auth",
    [TUN_MSG_AUTH_OK] = "auth_ok",
    [TUN_MSG_AUTH_ERROR] = "auth_error",
    [TUN_MSG_REQUEST_CHALLENGE] = "request_challenge",
    [TUN_MSG_ADD_AGENT] = "add_agent",
    [TUN_MSG_AGENT_ADDED] = "agent_added",
    [TUN_MSG_REMOVE_AGENT] = "remove_agent",
    [TUN_MSG_AGENT_REMOVED] = "agent_removed",
    [TUN_MSG_ERROR] = "error",
    [TUN_MSG_DRAINING] = "draining",
    [TUN_MSG_PING] = "ping",
    [TUN_MSG_PONG] = "pong",
    [TUN_MSG_REQUEST] = "request",
    [TUN_MSG_RESPONSE] = "response",
    [TUN_MSG_STREAM_START] = "stream_start",
    [TUN_MSG_STREAM_CHUNK] = "stream_chunk",
    [TUN_MSG_STREAM_END] = "stream_end",
    [TUN_MSG_CANCEL] = "cancel",
};

static const char *const reason_names[] = {
    [TUN_REASON_NONE] = NULL,
    [TUN_REASON_REMOVED] = "removed",
    [TUN_REASON_REPLACED] = "replaced",
    [TUN_REASON_SUPERSEDED] = "superseded",
    [TUN_REASON_NOT_ALLOWED] = "not_allowed",
    [TUN_REASON_OTHER] = NULL,
};

const char *tun_msg_type_name(enum tun_msg_type t)
{
    if ((unsigned)t >= TUN_MSG_TYPE_COUNT)
        return NULL;
    return type_names[t];
}

/* True if type t exists in mode (PROTOCOL.md 3.1). */
static bool type_in_mode(enum tun_msg_type t, enum tun_mode mode)
{
    if (t == TUN_MSG_NONE)
        return false;
    if (t == TUN_MSG_DRAINING)
        return mode == TUN_MODE_NATIVE;
    if (t >= TUN_MSG_PING)
        return mode == TUN_MODE_OSAURUS;
    return true;
}

void tun_msg_init(struct tun_msg *m, enum tun_msg_type type, enum tun_mode mode)
{
    memset(m, 0, sizeof(*m));
    m->type = type;
    m->mode = mode;
}

void tun_msg_clear(struct tun_msg *m)
{
    if (m == NULL)
        return;
    cJSON_Delete(m->priv_tree);
    free(m->priv_hdrs);
    memset(m, 0, sizeof(*m));
}

/* ------------------------------------------------------------------------------------ */
/* Character rules                                                                      */

static bool is_lower_hex(int c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

bool tun_msg_nonce_is_valid(const char *s, size_t len)
{
    if (len != TUN_NONCE_HEX_LEN)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (!is_lower_hex((unsigned char)s[i]))
            return false;
    }
    return true;
}

bool tun_msg_instance_is_valid(const char *s, size_t len)
{
    if (len < TUN_INSTANCE_MIN || len > TUN_INSTANCE_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              c == '-'))
            return false;
    }
    return true;
}

/* "0x" + 130 hex digits, either case. */
static bool sig_shape_ok(const char *s, size_t len)
{
    if (len != ID_SIG_STR_LEN || s[0] != '0' || s[1] != 'x')
        return false;
    for (size_t i = 2; i < len; i++) {
        if (!util_is_hex_digit((unsigned char)s[i]))
            return false;
    }
    return true;
}

/* RFC 9110 tchar. */
static bool is_tchar(unsigned char c)
{
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return true;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static bool is_token(const char *s, size_t len, size_t max)
{
    if (len == 0 || len > max)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (!is_tchar((unsigned char)s[i]))
            return false;
    }
    return true;
}

/* Error codes and reasons: 1..TUN_CODE_MAX of [A-Za-z0-9_.-]. */
/* An auth_error "domain": 1-253 of [A-Za-z0-9.-] (a DNS name, or an IPv4
 * literal the agent may have dialled). */
static bool domain_ok(const char *s, size_t len)
{
    if (len == 0 || len > TUN_DOMAIN_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              c == '.' || c == '-'))
            return false;
    }
    return true;
}

static bool code_ok(const char *s, size_t len)
{
    if (len == 0 || len > TUN_CODE_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              c == '_' || c == '.' || c == '-'))
            return false;
    }
    return true;
}

/* Printable ASCII, space included when spaces is set. */
static bool printable_ok(const char *s, size_t len, bool spaces)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e || (c == ' ' && !spaces))
            return false;
    }
    return true;
}

/* No C0 control, DEL or NUL_MARK; UTF-8 is already known valid. */
static bool no_ctl(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f || c == NUL_MARK)
            return false;
    }
    return true;
}

static bool url_ok(const char *s, size_t len)
{
    if (len > TUN_URL_MAX || !printable_ok(s, len, false))
        return false;
    return (len > 8 && memcmp(s, "https://", 8) == 0) || (len > 7 && memcmp(s, "http://", 7) == 0);
}

/* ------------------------------------------------------------------------------------ */
/* UTF-8                                                                                */


/* UTF-16 code units of a valid UTF-8 string (NUL_MARK counts as one unit). */
static size_t utf16_units(const char *s, size_t len)
{
    size_t n = 0;

    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c & 0xc0) == 0x80)
            continue;
        n += (c >= 0xf0 && c <= 0xf4) ? 2 : 1;
    }
    return n;
}

/* Truncates a valid UTF-8 string to at most max bytes on a character boundary. */
static size_t utf8_trim(const char *s, size_t len, size_t max)
{
    if (len <= max)
        return len;
    while (max > 0 && ((unsigned char)s[max] & 0xc0) == 0x80)
        max--;
    return max;
}

/* ------------------------------------------------------------------------------------ */
/* Base64 (RFC 4648 section 4)                                                          */

static const char b64_alpha[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int b64_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Decodes s[0..len) in place (the output never overtakes the input). Padding is
 * optional; when present it must be complete. Returns the decoded length or -1. */
static long b64_decode_inplace(char *s, size_t len)
{
    size_t out = 0;
    uint32_t acc = 0;
    int nbits = 0;

    if (len > 0 && s[len - 1] == '=') {
        if (len % 4 != 0)
            return -1;
        len--;
        if (s[len - 1] == '=')
            len--;
    }
    if (len % 4 == 1)
        return -1;
    for (size_t i = 0; i < len; i++) {
        int v = b64_val((unsigned char)s[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        nbits += 6;
        if (nbits >= 8) {
            nbits -= 8;
            s[out++] = (char)((acc >> nbits) & 0xff);
        }
    }
    return (long)out;
}

/* ------------------------------------------------------------------------------------ */
/* Pre-scan and parse                                                                   */

/* Validates what cJSON does not: UTF-8, no raw control byte inside strings, nesting at
 * most TUN_MAX_DEPTH. Sets *nul_esc if a "\u0000" escape occurs. Returns 0 or -1. */
static int prescan(const unsigned char *p, size_t len, bool *nul_esc)
{
    size_t depth = 0;
    bool in_str = false;
    size_t i = 0;

    *nul_esc = false;
    while (i < len) {
        unsigned char c = p[i];
        if (c >= 0x80) {
            int n = util_utf8_seq(p + i, len - i);
            if (n < 0)
                return -1;
            i += (size_t)n;
            continue;
        }
        if (in_str) {
            if (c == '"') {
                in_str = false;
            } else if (c == '\\') {
                if (i + 1 >= len)
                    return -1;
                if (p[i + 1] == 'u' && len - i >= 6 && memcmp(p + i + 2, "0000", 4) == 0)
                    *nul_esc = true;
                if (p[i + 1] < 0x80)
                    i++; /* a non-ASCII byte after '\' is invalid JSON; cJSON says so */
            } else if (c < 0x20) {
                return -1;
            }
        } else if (c == '"') {
            in_str = true;
        } else if (c == '{' || c == '[') {
            if (++depth > TUN_MAX_DEPTH)
                return -1;
        } else if ((c == '}' || c == ']') && depth > 0) {
            depth--;
        }
        i++;
    }
    return 0;
}

/* Copy of a pre-scanned text with every "\u0000" escape replaced by NUL_MARK.
 * Returns a malloc'd buffer (length in *out_len) or NULL if out of memory. */
static char *subst_nul(const char *p, size_t len, size_t *out_len)
{
    char *q = malloc(len + 1);
    size_t o = 0;
    bool in_str = false;

    if (q == NULL)
        return NULL;
    for (size_t i = 0; i < len; i++) {
        char c = p[i];
        if (in_str && c == '\\' && i + 1 < len) {
            if (p[i + 1] == 'u' && len - i >= 6 && memcmp(p + i + 2, "0000", 4) == 0) {
                q[o++] = (char)NUL_MARK;
                i += 5;
                continue;
            }
            q[o++] = c;
            q[o++] = p[++i];
            continue;
        }
        if (c == '"')
            in_str = !in_str;
        q[o++] = c;
    }
    q[o] = '\0';
    *out_len = o;
    return q;
}

static bool is_json_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* True if obj has two members of the same name; sets *oom (and returns true) if the
 * check could not allocate. Sorting keeps a 100 000-member object from costing n^2. */
static bool has_dup_names(const cJSON *obj, bool *oom)
{
    const cJSON *it;
    size_t n = 0;
    bool dup = false;

    cJSON_ArrayForEach(it, obj) { n++; }
    if (n < 2)
        return false;
    const char **names = malloc(n * sizeof(*names));
    if (names == NULL) {
        *oom = true;
        return true;
    }
    n = 0;
    cJSON_ArrayForEach(it, obj) { names[n++] = it->string != NULL ? it->string : ""; }
    qsort(names, n, sizeof(*names), cmp_str_ptr);
    for (size_t i = 1; i < n && !dup; i++)
        dup = strcmp(names[i - 1], names[i]) == 0;
    free(names);
    return dup;
}

/* ------------------------------------------------------------------------------------ */
/* Member access                                                                        */

/* Result of reading one member. */
enum fst {
    F_OK = 0,
    F_ABSENT, /* no such member */
    F_TYPE,   /* present with the wrong JSON type or out of range */
};

/* One decode call. */
struct dec {
    enum tun_mode mode;
    bool pre_auth; /* tun_msg_decode_auth(): everything but auth is expected_auth_frame */
    bool nul_mark; /* the text had "\u0000" escapes, now NUL_MARK bytes */
    bool oom;
    struct tun_msg *out;
};

static const cJSON *member(const cJSON *obj, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(obj, name);
}

static enum fst get_str(const cJSON *obj, const char *name, const char **s, size_t *len)
{
    const cJSON *it = member(obj, name);

    if (it == NULL)
        return F_ABSENT;
    if (!cJSON_IsString(it) || it->valuestring == NULL)
        return F_TYPE;
    *s = it->valuestring;
    *len = strlen(it->valuestring);
    return F_OK;
}

/* An integer-valued JSON number in [min, max] (max at most 2^53 - 1). */
static enum fst get_int(const cJSON *obj, const char *name, int64_t min, int64_t max, int64_t *v)
{
    const cJSON *it = member(obj, name);

    if (it == NULL)
        return F_ABSENT;
    if (!cJSON_IsNumber(it))
        return F_TYPE;
    double d = it->valuedouble;
    if (!(d >= (double)min && d <= (double)max)) /* also refuses NaN */
        return F_TYPE;
    int64_t x = (int64_t)d;
    if ((double)x != d)
        return F_TYPE;
    *v = x;
    return F_OK;
}

static enum fst get_u32(const cJSON *obj, const char *name, uint32_t min, uint32_t *v)
{
    int64_t x = 0;
    enum fst st = get_int(obj, name, min, UINT32_MAX, &x);

    if (st == F_OK)
        *v = (uint32_t)x;
    return st;
}

/* Copies len bytes (len < size) and terminates. */
static void copy_str(char *dst, size_t size, const char *s, size_t len)
{
    assert(len < size);
    memcpy(dst, s, len);
    dst[len] = '\0';
}

/* Copies human text, truncated on a character boundary; escaped NULs become '?'. */
static void copy_text(char *dst, size_t size, const char *s, size_t len)
{
    len = utf8_trim(s, len, size - 1);
    copy_str(dst, size, s, len);
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)dst[i] == NUL_MARK)
            dst[i] = '?';
    }
}

/* Reads an address member: F_OK with addr (and the text as sent in as_sent, if not
 * NULL), F_ABSENT, F_TYPE (not a string); *valid says whether it parsed. */
static enum fst get_addr(const cJSON *obj, const char *name, uint8_t addr[ID_ADDR_LEN],
                         char as_sent[ID_ADDR_STR_LEN + 1], bool *valid)
{
    const char *s;
    size_t len;
    enum fst st = get_str(obj, name, &s, &len);

    *valid = false;
    if (st != F_OK)
        return st;
    if (len != ID_ADDR_STR_LEN || id_addr_parse(s, len, addr) != ID_OK)
        return F_OK;
    *valid = true;
    if (as_sent != NULL)
        copy_str(as_sent, ID_ADDR_STR_LEN + 1, s, len);
    return F_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Decoders, one per type. Each returns 0 or a negative enum tun_err.                   */

static int dec_challenge(struct dec *d, const cJSON *o)
{
    struct tun_msg_challenge *c = &d->out->challenge;
    const char *s;
    size_t len;
    enum fst st = get_str(o, "nonce", &s, &len);

    if (st != F_OK)
        return TUN_E_INVALID_JSON;
    if (!tun_msg_nonce_is_valid(s, len))
        return TUN_E_INVALID_NONCE;
    copy_str(c->nonce, sizeof(c->nonce), s, len);
    st = get_u32(o, "expires_in", 1, &c->expires_in_s);
    if (st == F_TYPE || (st == F_ABSENT && d->mode == TUN_MODE_NATIVE))
        return TUN_E_INVALID_JSON;
    return 0;
}

/* Shape of one agent entry of auth or of add_agent. Returns the field status of the
 * first problem (F_TYPE / F_ABSENT) or F_OK. response_timeout counts only in native
 * mode (Osaurus mode ignores a malformed one). */
static enum fst agent_entry_shape(const struct dec *d, const cJSON *e)
{
    const char *s;
    size_t len;
    uint32_t rt;
    enum fst st;

    st = get_str(e, "address", &s, &len);
    if (st != F_OK)
        return st;
    st = get_str(e, "signature", &s, &len);
    if (st != F_OK)
        return st;
    st = get_u32(e, "response_timeout", 1, &rt);
    if (st == F_TYPE && d->mode == TUN_MODE_NATIVE)
        return F_TYPE;
    return F_OK;
}

/* Fills a from an entry that passed agent_entry_shape(). Returns 0, or
 * TUN_E_INVALID_ADDRESS / TUN_E_SIGNATURE_VERIFICATION_FAILED for a bad value. */
static int agent_entry_fill(const cJSON *e, struct tun_msg_agent_auth *a)
{
    const char *s = NULL;
    size_t len = 0;
    bool valid;

    get_addr(e, "address", a->addr, a->addr_str, &valid);
    if (!valid)
        return TUN_E_INVALID_ADDRESS;
    get_str(e, "signature", &s, &len);
    if (!sig_shape_ok(s, len))
        return TUN_E_SIGNATURE_VERIFICATION_FAILED;
    copy_str(a->sig, sizeof(a->sig), s, len);
    if (get_u32(e, "response_timeout", 1, &a->response_timeout_s) != F_OK)
        a->response_timeout_s = 0;
    return 0;
}

/* features: array of at most TUN_FEATURES_MAX strings of at most TUN_FEATURE_NAME_MAX
 * bytes. Returns 0 with the known bits in *bits, or -1 for a bad shape. */
static int features_parse(const cJSON *o, uint32_t *bits)
{
    const cJSON *f = member(o, "features");
    const cJSON *it;
    size_t n = 0;

    *bits = 0;
    if (f == NULL)
        return 0;
    if (!cJSON_IsArray(f))
        return -1;
    cJSON_ArrayForEach(it, f)
    {
        if (++n > TUN_FEATURES_MAX || !cJSON_IsString(it) || it->valuestring == NULL)
            return -1;
        size_t len = strlen(it->valuestring);
        if (len > TUN_FEATURE_NAME_MAX)
            return -1;
        if (len == 6 && memcmp(it->valuestring, "base64", 6) == 0)
            *bits |= TUN_FEAT_BASE64;
    }
    return 0;
}

/* PROTOCOL.md 4.4 steps 2-6. */
static int dec_auth(struct dec *d, const cJSON *o)
{
    struct tun_msg_auth *a = &d->out->auth;
    const bool native = d->mode == TUN_MODE_NATIVE;
    const char *nonce = NULL, *inst = NULL;
    size_t nonce_len = 0, inst_len = 0, n = 0;
    const cJSON *agents, *e;
    int rv;

    /* Step 2: shape. */
    if (get_str(o, "nonce", &nonce, &nonce_len) != F_OK)
        return TUN_E_EXPECTED_AUTH_FRAME;
    if (get_int(o, "timestamp", 0, JS_MAX_SAFE_INT, &a->timestamp) != F_OK)
        return TUN_E_EXPECTED_AUTH_FRAME;
    agents = member(o, "agents");
    if (agents == NULL || !cJSON_IsArray(agents))
        return TUN_E_EXPECTED_AUTH_FRAME;
    enum fst st = get_str(o, "instance", &inst, &inst_len);
    if (st == F_OK && tun_msg_instance_is_valid(inst, inst_len))
        copy_str(a->instance, sizeof(a->instance), inst, inst_len);
    else if (native)
        return TUN_E_EXPECTED_AUTH_FRAME;
    if (features_parse(o, &a->features) != 0) {
        if (native)
            return TUN_E_EXPECTED_AUTH_FRAME;
        a->features = 0;
    }
    cJSON_ArrayForEach(e, agents)
    {
        if (!cJSON_IsObject(e) || agent_entry_shape(d, e) != F_OK)
            return TUN_E_EXPECTED_AUTH_FRAME;
        if (has_dup_names(e, &d->oom))
            return d->oom ? TUN_E_INTERNAL_ERROR : TUN_E_INVALID_JSON;
        n++;
    }
    /* Step 3: counts. */
    if (n == 0)
        return TUN_E_NO_AGENTS;
    if (n > TUN_MAX_AGENTS)
        return TUN_E_TOO_MANY_AGENTS;
    /* Step 4: nonce. */
    if (!tun_msg_nonce_is_valid(nonce, nonce_len))
        return TUN_E_INVALID_NONCE;
    copy_str(a->nonce, sizeof(a->nonce), nonce, nonce_len);
    /* Steps 5 and 6: every address, then every signature. */
    n = 0;
    cJSON_ArrayForEach(e, agents)
    {
        bool valid;
        get_addr(e, "address", a->agents[n].addr, a->agents[n].addr_str, &valid);
        if (!valid)
            return tun_err_for_mode(TUN_E_INVALID_ADDRESS, d->mode, TUN_MSG_AUTH);
        n++;
    }
    n = 0;
    cJSON_ArrayForEach(e, agents)
    {
        rv = agent_entry_fill(e, &a->agents[n]);
        if (rv != 0)
            return rv;
        n++;
    }
    a->n_agents = n;
    return 0;
}

/* auth_ok.agents / auth_ok.rejected entries. */
static int dec_auth_ok(struct dec *d, const cJSON *o)
{
    struct tun_msg_auth_ok *k = &d->out->auth_ok;
    const bool native = d->mode == TUN_MODE_NATIVE;
    const cJSON *arr, *e;
    const char *s;
    size_t len;
    bool valid;
    enum fst st;

    arr = member(o, "agents");
    if (arr == NULL || !cJSON_IsArray(arr))
        return TUN_E_INVALID_JSON;
    cJSON_ArrayForEach(e, arr)
    {
        if (k->n_agents >= TUN_MAX_AGENTS || !cJSON_IsObject(e))
            return TUN_E_INVALID_JSON;
        struct tun_msg_agent_url *u = &k->agents[k->n_agents];
        if (get_addr(e, "address", u->addr, NULL, &valid) != F_OK || !valid)
            return TUN_E_INVALID_JSON;
        if (get_str(e, "url", &s, &len) != F_OK || !url_ok(s, len))
            return TUN_E_INVALID_JSON;
        copy_str(u->url, sizeof(u->url), s, len);
        if (has_dup_names(e, &d->oom))
            return d->oom ? TUN_E_INTERNAL_ERROR : TUN_E_INVALID_JSON;
        k->n_agents++;
    }
    if (native && k->n_agents == 0)
        return TUN_E_INVALID_JSON;

    arr = member(o, "rejected");
    if (arr == NULL && native)
        return TUN_E_INVALID_JSON;
    if (arr != NULL && !cJSON_IsArray(arr))
        return TUN_E_INVALID_JSON;
    cJSON_ArrayForEach(e, arr)
    {
        if (k->n_rejected >= TUN_MAX_AGENTS || !cJSON_IsObject(e))
            return TUN_E_INVALID_JSON;
        struct tun_msg_rejected *r = &k->rejected[k->n_rejected];
        if (get_addr(e, "address", r->addr, NULL, &valid) != F_OK || !valid)
            return TUN_E_INVALID_JSON;
        st = get_str(e, "error", &s, &len);
        if (st == F_ABSENT && !native)
            st = get_str(e, "reason", &s, &len); /* older relays */
        if (st != F_OK || !code_ok(s, len))
            return TUN_E_INVALID_JSON;
        copy_str(r->error, sizeof(r->error), s, len);
        r->err = tun_err_from_code(s, len);
        if (has_dup_names(e, &d->oom))
            return d->oom ? TUN_E_INTERNAL_ERROR : TUN_E_INVALID_JSON;
        k->n_rejected++;
    }

    st = get_str(o, "region", &s, &len);
    if (st == F_TYPE || (st == F_ABSENT && native))
        return TUN_E_INVALID_JSON;
    if (st == F_OK) {
        if (len > TUN_REGION_MAX || !printable_ok(s, len, true))
            return TUN_E_INVALID_JSON;
        copy_str(k->region, sizeof(k->region), s, len);
    }
    if (native && get_u32(o, "ping_interval", 1, &k->ping_interval_s) != F_OK)
        return TUN_E_INVALID_JSON;
    /* Osaurus mode: an unreadable list means nothing is promised */
    if (!native && features_parse(o, &k->features) != 0)
        k->features = 0;
    return 0;
}

/* auth_error and error. */
static int dec_error(struct dec *d, const cJSON *o)
{
    struct tun_msg_error *r = &d->out->error;
    const char *s;
    size_t len;
    bool valid;
    enum fst st;

    if (get_str(o, "error", &s, &len) != F_OK || !code_ok(s, len))
        return TUN_E_INVALID_JSON;
    copy_str(r->code, sizeof(r->code), s, len);
    r->err = tun_err_from_code(s, len);
    st = get_str(o, "message", &s, &len);
    if (st == F_TYPE)
        return TUN_E_INVALID_JSON;
    if (st == F_OK)
        copy_text(r->message, sizeof(r->message), s, len);
    st = get_addr(o, "address", r->addr, NULL, &valid);
    if (st == F_TYPE || (st == F_OK && !valid))
        return TUN_E_INVALID_JSON;
    r->has_addr = st == F_OK;
    if (d->out->type == TUN_MSG_AUTH_ERROR) {
        st = get_str(o, "domain", &s, &len);
        if (st == F_TYPE || (st == F_OK && !domain_ok(s, len)))
            return TUN_E_INVALID_JSON;
        if (st == F_OK)
            copy_str(r->domain, sizeof(r->domain), s, len);
    }
    return 0;
}

static int dec_add_agent(struct dec *d, const cJSON *o)
{
    struct tun_msg_add_agent *a = &d->out->add_agent;
    const char *nonce = NULL;
    size_t nonce_len = 0;
    bool valid;
    int rv;

    if (agent_entry_shape(d, o) != F_OK)
        return TUN_E_INVALID_JSON;
    if (get_str(o, "nonce", &nonce, &nonce_len) != F_OK)
        return TUN_E_INVALID_JSON;
    if (get_int(o, "timestamp", 0, JS_MAX_SAFE_INT, &a->timestamp) != F_OK)
        return TUN_E_INVALID_JSON;
    get_addr(o, "address", a->agent.addr, NULL, &valid);
    if (!valid)
        return tun_err_for_mode(TUN_E_INVALID_ADDRESS, d->mode, TUN_MSG_ADD_AGENT);
    if (!tun_msg_nonce_is_valid(nonce, nonce_len))
        return TUN_E_INVALID_NONCE;
    copy_str(a->nonce, sizeof(a->nonce), nonce, nonce_len);
    rv = agent_entry_fill(o, &a->agent);
    if (rv != 0)
        return tun_err_for_mode(rv, d->mode, TUN_MSG_ADD_AGENT);
    return 0;
}

static int dec_agent_added(struct dec *d, const cJSON *o)
{
    struct tun_msg_agent_added *a = &d->out->agent_added;
    const char *s;
    size_t len;
    bool valid;
    enum fst st;

    if (get_addr(o, "address", a->addr, NULL, &valid) != F_OK || !valid)
        return TUN_E_INVALID_JSON;
    if (get_str(o, "url", &s, &len) != F_OK || !url_ok(s, len))
        return TUN_E_INVALID_JSON;
    copy_str(a->url, sizeof(a->url), s, len);
    st = get_str(o, "region", &s, &len);
    if (st == F_TYPE || (st == F_ABSENT && d->mode == TUN_MODE_NATIVE))
        return TUN_E_INVALID_JSON;
    if (st == F_OK) {
        if (len > TUN_REGION_MAX || !printable_ok(s, len, true))
            return TUN_E_INVALID_JSON;
        copy_str(a->region, sizeof(a->region), s, len);
    }
    return 0;
}

static int dec_remove_agent(struct dec *d, const cJSON *o)
{
    bool valid;

    if (get_addr(o, "address", d->out->remove_agent.addr, NULL, &valid) != F_OK)
        return TUN_E_INVALID_JSON;
    return valid ? 0 : TUN_E_INVALID_ADDRESS;
}

static int dec_agent_removed(struct dec *d, const cJSON *o)
{
    struct tun_msg_agent_removed *r = &d->out->agent_removed;
    const char *s;
    size_t len;
    bool valid;
    enum fst st;

    if (get_addr(o, "address", r->addr, NULL, &valid) != F_OK || !valid)
        return TUN_E_INVALID_JSON;
    st = get_str(o, "reason", &s, &len);
    if (st == F_TYPE || (st == F_OK && !code_ok(s, len)))
        return TUN_E_INVALID_JSON;
    r->reason = TUN_REASON_NONE;
    if (st != F_OK)
        return 0;
    copy_str(r->reason_str, sizeof(r->reason_str), s, len);
    r->reason = TUN_REASON_OTHER;
    for (int i = TUN_REASON_REMOVED; i < TUN_REASON_OTHER; i++) {
        if (strcmp(reason_names[i], r->reason_str) == 0)
            r->reason = (enum tun_reason)i;
    }
    return 0;
}

static int dec_draining(struct dec *d, const cJSON *o)
{
    if (get_u32(o, "grace", 0, &d->out->draining.grace_s) != F_OK)
        return TUN_E_INVALID_JSON;
    return 0;
}

/* ping and pong: ts is optional and only kept if it is an integer (the relay's schema
 * takes any number; a pong is never refused for its ts). */
static int dec_ping(struct dec *d, const cJSON *o)
{
    struct tun_msg_ping *p = &d->out->ping;

    p->has_ts = get_int(o, "ts", 0, JS_MAX_SAFE_INT, &p->ts) == F_OK;
    if (!p->has_ts)
        p->ts = 0;
    return 0;
}

/* Headers object of an Osaurus request or response frame. */
static int dec_headers(struct dec *d, const cJSON *o, bool response, int bad)
{
    struct tun_msg_http *h = &d->out->http;
    const cJSON *hs = member(o, "headers");
    const cJSON *it;
    size_t n = 0;
    const size_t max_n = response ? TUN_OSR_MAX_RESP_HEADERS : TUN_OSR_MAX_REQ_HEADERS;

    if (hs == NULL || !cJSON_IsObject(hs))
        return bad;
    cJSON_ArrayForEach(it, hs)
    {
        if (++n > max_n)
            return bad;
        if (it->string == NULL || !cJSON_IsString(it) || it->valuestring == NULL)
            return bad;
        size_t nlen = strlen(it->string);
        size_t vlen = strlen(it->valuestring);
        if (!is_token(it->string, nlen, TUN_OSR_MAX_HEADER_NAME))
            return bad;
        /* Field values: no CR, LF or NUL (escaped NULs are NUL_MARK here). */
        for (size_t i = 0; i < vlen; i++) {
            unsigned char c = (unsigned char)it->valuestring[i];
            if (c == '\r' || c == '\n' || c == NUL_MARK)
                return bad;
        }
        if (response ? utf16_units(it->valuestring, vlen) > TUN_OSR_MAX_HEADER_VALUE
                     : vlen > TUN_OSR_MAX_REQ_HEADER_VALUE)
            return bad;
    }
    if (has_dup_names(hs, &d->oom))
        return d->oom ? TUN_E_INTERNAL_ERROR : bad;
    if (n == 0)
        return 0;
    d->out->priv_hdrs = calloc(n, sizeof(*d->out->priv_hdrs));
    if (d->out->priv_hdrs == NULL)
        return TUN_E_INTERNAL_ERROR;
    n = 0;
    cJSON_ArrayForEach(it, hs)
    {
        struct tun_msg_hdr *x = &d->out->priv_hdrs[n++];
        x->name = (struct iov){it->string, strlen(it->string)};
        x->value = (struct iov){it->valuestring, strlen(it->valuestring)};
    }
    h->hdrs = d->out->priv_hdrs;
    h->n_hdrs = n;
    return 0;
}

/* Body-like member (body or data), decoded in place inside the tree. absent_ok: a
 * missing member is an empty body. max: UTF-16 units of text, or decoded bytes. */
static int dec_body(struct dec *d, const cJSON *o, const char *name, bool absent_ok, size_t max,
                    int bad)
{
    struct tun_msg_http *h = &d->out->http;
    cJSON *it = cJSON_GetObjectItemCaseSensitive(o, name);
    const char *enc;
    size_t enc_len, len;
    enum fst st;

    st = get_str(o, "bodyEncoding", &enc, &enc_len);
    if (st == F_TYPE || (st == F_OK && !(enc_len == 6 && memcmp(enc, "base64", 6) == 0)))
        return bad;
    h->base64 = st == F_OK;
    if (it == NULL) {
        h->body = (struct iov){"", 0};
        return absent_ok ? 0 : bad;
    }
    if (!cJSON_IsString(it) || it->valuestring == NULL)
        return bad;
    len = strlen(it->valuestring);
    if (h->base64) {
        long n = b64_decode_inplace(it->valuestring, len);
        if (n < 0 || (size_t)n > max)
            return bad;
        len = (size_t)n;
    } else {
        if (utf16_units(it->valuestring, len) > max)
            return bad;
        if (d->nul_mark) {
            for (size_t i = 0; i < len; i++) {
                if ((unsigned char)it->valuestring[i] == NUL_MARK)
                    it->valuestring[i] = '\0';
            }
        }
    }
    h->body = (struct iov){it->valuestring, len};
    return 0;
}

/* The Osaurus data frames. On a violation http.id is kept if it was read. */
static int dec_http(struct dec *d, const cJSON *o)
{
    struct tun_msg_http *h = &d->out->http;
    const enum tun_msg_type t = d->out->type;
    const bool from_client = t == TUN_MSG_RESPONSE || t == TUN_MSG_STREAM_START ||
                             t == TUN_MSG_STREAM_CHUNK || t == TUN_MSG_STREAM_END;
    const int bad = from_client ? TUN_E_BAD_HOST_RESPONSE : TUN_E_INVALID_JSON;
    const char *s;
    size_t len;
    int64_t status;
    int rv;

    if (get_str(o, "id", &s, &len) != F_OK || len == 0 || len > TUN_ID_MAX || !no_ctl(s, len))
        return bad;
    copy_str(h->id, sizeof(h->id), s, len);

    switch (t) {
    case TUN_MSG_REQUEST:
        if (get_str(o, "method", &s, &len) != F_OK || !is_token(s, len, TUN_OSR_MAX_METHOD))
            return bad;
        h->method = (struct iov){s, len};
        if (get_str(o, "path", &s, &len) != F_OK || len == 0 || len > TUN_OSR_MAX_PATH ||
            !no_ctl(s, len) || !(s[0] == '/' || (len == 1 && s[0] == '*')))
            return bad;
        h->path = (struct iov){s, len};
        rv = dec_headers(d, o, false, bad);
        if (rv != 0)
            return rv;
        return dec_body(d, o, "body", false, TUN_OSR_MAX_BODY, bad);
    case TUN_MSG_RESPONSE:
    case TUN_MSG_STREAM_START:
        if (get_int(o, "status", 200, 599, &status) != F_OK)
            return bad;
        h->status = (int)status;
        rv = dec_headers(d, o, true, bad);
        if (rv != 0 || t == TUN_MSG_STREAM_START)
            return rv;
        rv = dec_body(d, o, "body", true, TUN_OSR_MAX_BODY, bad);
        if (rv == 0 && (status == 204 || status == 205 || status == 304))
            h->body.len = 0; /* discarded, as the relay does */
        return rv;
    case TUN_MSG_STREAM_CHUNK:
        return dec_body(d, o, "data", false, TUN_OSR_MAX_CHUNK, bad);
    default: /* stream_end, cancel */
        return 0;
    }
}

static enum tun_msg_type type_from_name(const char *s, size_t len)
{
    for (int t = 1; t < TUN_MSG_TYPE_COUNT; t++) {
        if (strlen(type_names[t]) == len && memcmp(type_names[t], s, len) == 0)
            return (enum tun_msg_type)t;
    }
    return TUN_MSG_NONE;
}

static int dispatch(struct dec *d, const cJSON *o)
{
    switch (d->out->type) {
    case TUN_MSG_CHALLENGE:
        return dec_challenge(d, o);
    case TUN_MSG_AUTH:
        return dec_auth(d, o);
    case TUN_MSG_AUTH_OK:
        return dec_auth_ok(d, o);
    case TUN_MSG_AUTH_ERROR:
    case TUN_MSG_ERROR:
        return dec_error(d, o);
    case TUN_MSG_REQUEST_CHALLENGE:
        return 0;
    case TUN_MSG_ADD_AGENT:
        return dec_add_agent(d, o);
    case TUN_MSG_AGENT_ADDED:
        return dec_agent_added(d, o);
    case TUN_MSG_REMOVE_AGENT:
        return dec_remove_agent(d, o);
    case TUN_MSG_AGENT_REMOVED:
        return dec_agent_removed(d, o);
    case TUN_MSG_DRAINING:
        return dec_draining(d, o);
    case TUN_MSG_PING:
    case TUN_MSG_PONG:
        return dec_ping(d, o);
    case TUN_MSG_REQUEST:
    case TUN_MSG_RESPONSE:
    case TUN_MSG_STREAM_START:
    case TUN_MSG_STREAM_CHUNK:
    case TUN_MSG_STREAM_END:
    case TUN_MSG_CANCEL:
        return dec_http(d, o);
    default:
        return TUN_E_UNKNOWN_TYPE;
    }
}

/* Parses json into *root. Returns 0 or a negative enum tun_err. */
static int parse(struct dec *d, const char *json, size_t len, cJSON **root)
{
    const size_t max =
        (d->mode == TUN_MODE_OSAURUS && !d->pre_auth) ? TUN_OSR_MAX_FRAME_BYTES : TUN_CTL_MAX_BYTES;
    char *copy = NULL;
    const char *text = json;
    const char *end = NULL;

    *root = NULL;
    if (len > max)
        return TUN_E_MESSAGE_TOO_LARGE;
    if (prescan((const unsigned char *)json, len, &d->nul_mark) != 0)
        return TUN_E_INVALID_JSON;
    if (d->nul_mark) {
        copy = subst_nul(json, len, &len);
        if (copy == NULL)
            return TUN_E_INTERNAL_ERROR;
        text = copy;
    }
    *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (*root != NULL) {
        /* cJSON stops after the value; only whitespace may follow. */
        for (const char *p = end; p < text + len; p++) {
            if (!is_json_ws(*p)) {
                cJSON_Delete(*root);
                *root = NULL;
                break;
            }
        }
    }
    free(copy);
    return *root != NULL ? 0 : TUN_E_INVALID_JSON;
}

static int decode(const char *json, size_t len, enum tun_mode mode, bool pre_auth,
                  struct tun_msg *out, const char **err_code)
{
    struct dec d = {.mode = mode, .pre_auth = pre_auth, .out = out};
    cJSON *root = NULL;
    const char *ts;
    size_t ts_len;
    int rv;

    memset(out, 0, sizeof(*out));
    out->mode = mode;
    rv = parse(&d, json, len, &root);
    if (rv != 0)
        goto done;
    if (!cJSON_IsObject(root)) {
        rv = pre_auth ? TUN_E_EXPECTED_AUTH_FRAME : TUN_E_INVALID_JSON;
        goto done;
    }
    if (has_dup_names(root, &d.oom)) {
        rv = d.oom ? TUN_E_INTERNAL_ERROR : TUN_E_INVALID_JSON;
        goto done;
    }
    if (get_str(root, "type", &ts, &ts_len) == F_OK)
        out->type = type_from_name(ts, ts_len);
    if (!type_in_mode(out->type, mode))
        out->type = TUN_MSG_NONE;
    if (pre_auth && out->type != TUN_MSG_AUTH) {
        rv = TUN_E_EXPECTED_AUTH_FRAME;
        goto done;
    }
    rv = dispatch(&d, root);
    if (rv == 0 && out->priv_hdrs != NULL)
        out->priv_tree = root; /* the header and body iovs point into it */
    else if (rv == 0 && out->type >= TUN_MSG_REQUEST && out->type <= TUN_MSG_STREAM_CHUNK)
        out->priv_tree = root; /* body, method, path */
    else
        cJSON_Delete(root);
    root = NULL;

done:
    cJSON_Delete(root);
    if (rv != 0) {
        /* Keep only what a caller may use after a failure: type and http.id. */
        char id[TUN_ID_MAX + 1];
        enum tun_msg_type t = out->type;
        bool http = t >= TUN_MSG_REQUEST;
        if (http)
            memcpy(id, out->http.id, sizeof(id));
        free(out->priv_hdrs);
        memset(out, 0, sizeof(*out));
        out->type = t;
        out->mode = mode;
        if (http)
            memcpy(out->http.id, id, sizeof(id));
    }
    if (err_code != NULL)
        *err_code = rv != 0 ? tun_err_code(rv) : NULL;
    return rv;
}

int tun_msg_decode(const char *json, size_t len, enum tun_mode mode, struct tun_msg *out,
                   const char **err_code)
{
    return decode(json, len, mode, false, out, err_code);
}

int tun_msg_decode_auth(const char *json, size_t len, enum tun_mode mode, struct tun_msg *out,
                        const char **err_code)
{
    return decode(json, len, mode, true, out, err_code);
}

/* ------------------------------------------------------------------------------------ */
/* Encoder                                                                              */

/* A growing output buffer; any failure sticks in fail. */
struct jw {
    char *buf;
    size_t len;
    size_t cap;
    bool fail;
};

static void jw_reserve(struct jw *w, size_t extra)
{
    if (w->fail)
        return;
    if (extra > SIZE_MAX / 2 - w->len) {
        w->fail = true;
        return;
    }
    size_t need = w->len + extra + 1;
    if (need <= w->cap)
        return;
    size_t cap = w->cap != 0 ? w->cap : 256;
    while (cap < need)
        cap *= 2;
    char *nb = realloc(w->buf, cap);
    if (nb == NULL) {
        w->fail = true;
        return;
    }
    w->buf = nb;
    w->cap = cap;
}

static void jw_raw(struct jw *w, const char *s, size_t n)
{
    jw_reserve(w, n);
    if (w->fail)
        return;
    memcpy(w->buf + w->len, s, n);
    w->len += n;
}

static void jw_lit(struct jw *w, const char *s) { jw_raw(w, s, strlen(s)); }

/* A JSON string: escaped, invalid UTF-8 replaced by U+FFFD per maximal subpart. */
static void jw_str(struct jw *w, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, run = 0;

    jw_reserve(w, n + 2);
    jw_raw(w, "\"", 1);
    while (i < n) {
        unsigned char c = p[i];
        char esc[6];
        size_t esc_len = 0;
        int k = 1;

        if (c >= 0x80) {
            k = util_utf8_seq(p + i, n - i);
            if (k > 0) {
                i += (size_t)k;
                continue;
            }
        } else if (c >= 0x20 && c != '"' && c != '\\') {
            i++;
            continue;
        }
        jw_raw(w, s + run, i - run);
        if (k < 0) {
            jw_raw(w, "\xef\xbf\xbd", 3);
            i += (size_t)-k;
        } else {
            esc[0] = '\\';
            esc_len = 2;
            switch (c) {
            case '"':
                esc[1] = '"';
                break;
            case '\\':
                esc[1] = '\\';
                break;
            case '\n':
                esc[1] = 'n';
                break;
            case '\r':
                esc[1] = 'r';
                break;
            case '\t':
                esc[1] = 't';
                break;
            case '\b':
                esc[1] = 'b';
                break;
            case '\f':
                esc[1] = 'f';
                break;
            default:
                memcpy(esc + 1, "u00", 3);
                esc[4] = hex[c >> 4];
                esc[5] = hex[c & 0xf];
                esc_len = 6;
                break;
            }
            jw_raw(w, esc, esc_len);
            i++;
        }
        run = i;
    }
    jw_raw(w, s + run, n - run);
    jw_raw(w, "\"", 1);
}

static void jw_cstr(struct jw *w, const char *s) { jw_str(w, s, strlen(s)); }

static void jw_i64(struct jw *w, int64_t v)
{
    char b[24];
    int n = snprintf(b, sizeof(b), "%" PRId64, v);

    jw_raw(w, b, (size_t)n);
}

/* ,"key": then the value is written by the caller. */
static void jw_key(struct jw *w, const char *key)
{
    jw_raw(w, ",\"", 2);
    jw_lit(w, key);
    jw_raw(w, "\":", 2);
}

static void jw_kstr(struct jw *w, const char *key, const char *s)
{
    jw_key(w, key);
    jw_cstr(w, s);
}

static void jw_kint(struct jw *w, const char *key, int64_t v)
{
    jw_key(w, key);
    jw_i64(w, v);
}

static void jw_addr(struct jw *w, const char *key, const uint8_t addr[ID_ADDR_LEN])
{
    char s[ID_ADDR_STR_LEN + 1];

    id_addr_to_str(addr, s);
    jw_kstr(w, key, s);
}

static void jw_base64(struct jw *w, const uint8_t *p, size_t n)
{
    jw_reserve(w, (n + 2) / 3 * 4 + 2);
    if (w->fail)
        return;
    char *o = w->buf + w->len;
    *o++ = '"';
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        *o++ = b64_alpha[v >> 18];
        *o++ = b64_alpha[(v >> 12) & 63];
        *o++ = b64_alpha[(v >> 6) & 63];
        *o++ = b64_alpha[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0);
        *o++ = b64_alpha[v >> 18];
        *o++ = b64_alpha[(v >> 12) & 63];
        *o++ = i + 1 < n ? b64_alpha[(v >> 6) & 63] : '=';
        *o++ = '=';
    }
    *o++ = '"';
    w->len = (size_t)(o - w->buf);
}

/* The members of one agent: "address", "signature", ["response_timeout"]; first says
 * whether "address" opens an object (no comma before it). */
static void enc_agent_auth(struct jw *w, const struct tun_msg_agent_auth *a, bool first)
{
    char s[ID_ADDR_STR_LEN + 1];

    if (a->addr_str[0] == '\0')
        id_addr_to_str(a->addr, s);
    jw_lit(w, first ? "\"address\":" : ",\"address\":");
    jw_cstr(w, a->addr_str[0] != '\0' ? a->addr_str : s);
    jw_kstr(w, "signature", a->sig);
    if (a->response_timeout_s != 0)
        jw_kint(w, "response_timeout", a->response_timeout_s);
}

/* Returns -1 if a is not encodable. */
static int enc_auth(struct jw *w, const struct tun_msg_auth *a)
{
    if (a->n_agents == 0 || a->n_agents > TUN_MAX_AGENTS)
        return -1;
    jw_kstr(w, "nonce", a->nonce);
    jw_kint(w, "timestamp", a->timestamp);
    if (a->instance[0] != '\0')
        jw_kstr(w, "instance", a->instance);
    jw_key(w, "agents");
    jw_raw(w, "[", 1);
    for (size_t i = 0; i < a->n_agents; i++) {
        jw_lit(w, i == 0 ? "{" : ",{");
        enc_agent_auth(w, &a->agents[i], true);
        jw_raw(w, "}", 1);
    }
    jw_raw(w, "]", 1);
    if (a->features & TUN_FEAT_BASE64) {
        jw_key(w, "features");
        jw_lit(w, "[\"base64\"]");
    }
    return 0;
}

static int enc_auth_ok(struct jw *w, const struct tun_msg_auth_ok *k, enum tun_mode mode)
{
    const bool native = mode == TUN_MODE_NATIVE;

    if (k->n_agents > TUN_MAX_AGENTS || k->n_rejected > TUN_MAX_AGENTS)
        return -1;
    if (native && (k->n_agents == 0 || k->ping_interval_s == 0))
        return -1;
    jw_key(w, "agents");
    jw_raw(w, "[", 1);
    for (size_t i = 0; i < k->n_agents; i++) {
        char s[ID_ADDR_STR_LEN + 1];
        id_addr_to_str(k->agents[i].addr, s);
        jw_lit(w, i == 0 ? "{\"address\":" : ",{\"address\":");
        jw_cstr(w, s);
        jw_kstr(w, "url", k->agents[i].url);
        jw_raw(w, "}", 1);
    }
    jw_raw(w, "]", 1);
    if (native) {
        jw_key(w, "rejected");
        jw_raw(w, "[", 1);
        for (size_t i = 0; i < k->n_rejected; i++) {
            const struct tun_msg_rejected *r = &k->rejected[i];
            char s[ID_ADDR_STR_LEN + 1];
            id_addr_to_str(r->addr, s);
            jw_lit(w, i == 0 ? "{\"address\":" : ",{\"address\":");
            jw_cstr(w, s);
            jw_kstr(w, "error", r->error[0] != '\0' ? r->error : tun_err_code(r->err));
            jw_raw(w, "}", 1);
        }
        jw_raw(w, "]", 1);
    }
    if (native || k->region[0] != '\0')
        jw_kstr(w, "region", k->region);
    if (native)
        jw_kint(w, "ping_interval", k->ping_interval_s);
    if (!native && (k->features & TUN_FEAT_BASE64)) {
        jw_key(w, "features");
        jw_lit(w, "[\"base64\"]");
    }
    return 0;
}

static int enc_error(struct jw *w, const struct tun_msg *m)
{
    const struct tun_msg_error *r = &m->error;

    if (r->code[0] == '\0' && r->err == TUN_E_NONE)
        return -1;
    jw_kstr(w, "error", r->code[0] != '\0' ? r->code : tun_err_code(r->err));
    jw_kstr(w, "message", r->message[0] != '\0' ? r->message : tun_err_message(r->err));
    if (r->has_addr && m->type == TUN_MSG_ERROR)
        jw_addr(w, "address", r->addr);
    if (r->domain[0] != '\0' && m->type == TUN_MSG_AUTH_ERROR) {
        if (!domain_ok(r->domain, strlen(r->domain)))
            return -1;
        jw_kstr(w, "domain", r->domain);
    }
    return 0;
}

static int enc_headers(struct jw *w, const struct tun_msg_http *h)
{
    if (h->n_hdrs > 0 && h->hdrs == NULL)
        return -1;
    jw_key(w, "headers");
    jw_raw(w, "{", 1);
    for (size_t i = 0; i < h->n_hdrs; i++) {
        if (i > 0)
            jw_raw(w, ",", 1);
        jw_str(w, h->hdrs[i].name.base, h->hdrs[i].name.len);
        jw_raw(w, ":", 1);
        jw_str(w, h->hdrs[i].value.base, h->hdrs[i].value.len);
    }
    jw_raw(w, "}", 1);
    return 0;
}

static void enc_body(struct jw *w, const char *key, const struct tun_msg_http *h)
{
    jw_key(w, key);
    if (h->base64)
        jw_base64(w, (const uint8_t *)h->body.base, h->body.len);
    else
        jw_str(w, h->body.base != NULL ? h->body.base : "", h->body.len);
    if (h->base64)
        jw_kstr(w, "bodyEncoding", "base64");
}

static int enc_http(struct jw *w, const struct tun_msg *m)
{
    const struct tun_msg_http *h = &m->http;

    jw_kstr(w, "id", h->id);
    switch (m->type) {
    case TUN_MSG_REQUEST:
        jw_key(w, "method");
        jw_str(w, h->method.base != NULL ? h->method.base : "", h->method.len);
        jw_key(w, "path");
        jw_str(w, h->path.base != NULL ? h->path.base : "", h->path.len);
        if (enc_headers(w, h) != 0)
            return -1;
        enc_body(w, "body", h);
        return 0;
    case TUN_MSG_RESPONSE:
    case TUN_MSG_STREAM_START:
        jw_kint(w, "status", h->status);
        if (enc_headers(w, h) != 0)
            return -1;
        if (m->type == TUN_MSG_RESPONSE)
            enc_body(w, "body", h);
        return 0;
    case TUN_MSG_STREAM_CHUNK:
        enc_body(w, "data", h);
        return 0;
    default:
        return 0;
    }
}

static int enc_members(struct jw *w, const struct tun_msg *m)
{
    switch (m->type) {
    case TUN_MSG_CHALLENGE:
        jw_kstr(w, "nonce", m->challenge.nonce);
        if (m->challenge.expires_in_s != 0)
            jw_kint(w, "expires_in", m->challenge.expires_in_s);
        return 0;
    case TUN_MSG_AUTH:
        return enc_auth(w, &m->auth);
    case TUN_MSG_AUTH_OK:
        return enc_auth_ok(w, &m->auth_ok, m->mode);
    case TUN_MSG_AUTH_ERROR:
    case TUN_MSG_ERROR:
        return enc_error(w, m);
    case TUN_MSG_REQUEST_CHALLENGE:
        return 0;
    case TUN_MSG_ADD_AGENT:
        enc_agent_auth(w, &m->add_agent.agent, false);
        jw_kstr(w, "nonce", m->add_agent.nonce);
        jw_kint(w, "timestamp", m->add_agent.timestamp);
        return 0;
    case TUN_MSG_AGENT_ADDED:
        jw_addr(w, "address", m->agent_added.addr);
        jw_kstr(w, "url", m->agent_added.url);
        if (m->mode == TUN_MODE_NATIVE || m->agent_added.region[0] != '\0')
            jw_kstr(w, "region", m->agent_added.region);
        return 0;
    case TUN_MSG_REMOVE_AGENT:
        jw_addr(w, "address", m->remove_agent.addr);
        return 0;
    case TUN_MSG_AGENT_REMOVED: {
        const struct tun_msg_agent_removed *r = &m->agent_removed;
        jw_addr(w, "address", r->addr);
        if (r->reason == TUN_REASON_OTHER && r->reason_str[0] != '\0')
            jw_kstr(w, "reason", r->reason_str);
        else if (r->reason > TUN_REASON_NONE && r->reason < TUN_REASON_OTHER)
            jw_kstr(w, "reason", reason_names[r->reason]);
        return 0;
    }
    case TUN_MSG_DRAINING:
        jw_kint(w, "grace", m->draining.grace_s);
        return 0;
    case TUN_MSG_PING:
    case TUN_MSG_PONG:
        if (m->ping.has_ts)
            jw_kint(w, "ts", m->ping.ts);
        return 0;
    case TUN_MSG_REQUEST:
    case TUN_MSG_RESPONSE:
    case TUN_MSG_STREAM_START:
    case TUN_MSG_STREAM_CHUNK:
    case TUN_MSG_STREAM_END:
    case TUN_MSG_CANCEL:
        return enc_http(w, m);
    default:
        return -1;
    }
}

char *tun_msg_encode(const struct tun_msg *m, size_t *len)
{
    struct jw w = {0};
    const char *name = tun_msg_type_name(m->type);

    if (name == NULL)
        return NULL;
    jw_lit(&w, "{\"type\":");
    jw_cstr(&w, name);
    if (enc_members(&w, m) != 0)
        w.fail = true;
    jw_raw(&w, "}", 1);
    if (w.fail) {
        free(w.buf);
        return NULL;
    }
    w.buf[w.len] = '\0';
    if (len != NULL)
        *len = w.len;
    return w.buf;
}

/* ------------------------------------------------------------------------------------ */
/* Signed texts                                                                         */

int tun_msg_native_signed_text(char *buf, size_t len, const char *domain,
                               const uint8_t addr[ID_ADDR_LEN], const char *nonce, int64_t ts)
{
    char dom[254];
    char a[ID_ADDR_STR_LEN + 1];
    size_t n = strlen(domain);

    if (n == 0 || n >= sizeof(dom) || ts < 0 || !tun_msg_nonce_is_valid(nonce, strlen(nonce)))
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)domain[i];
        if (c <= 0x20 || c >= 0x7f || c == ':' || c == '/')
            return -1;
        dom[i] = (char)((c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c);
    }
    dom[n] = '\0';
    id_addr_to_str(addr, a);
    return util_snprintf(buf, len, "tunnel-gateway:v1:%s:%s:%s:%" PRId64, dom, a, nonce, ts);
}

int tun_msg_osaurus_signed_text(char *buf, size_t len, const char *addr_as_sent, const char *nonce,
                                int64_t ts)
{
    size_t n = strlen(addr_as_sent);

    if (n != ID_ADDR_STR_LEN || addr_as_sent[0] != '0' || addr_as_sent[1] != 'x' || ts < 0 ||
        !tun_msg_nonce_is_valid(nonce, strlen(nonce)))
        return -1;
    for (size_t i = 2; i < n; i++) {
        if (!util_is_hex_digit((unsigned char)addr_as_sent[i]))
            return -1;
    }
    return util_snprintf(buf, len, "osaurus-tunnel:%s:%s:%" PRId64, addr_as_sent, nonce, ts);
}

int tun_msg_nonce_new(char out[TUN_NONCE_HEX_LEN + 1])
{
    uint8_t raw[TUN_NONCE_HEX_LEN / 2];

    if (util_rand_bytes(raw, sizeof(raw)) != 0)
        return -1;
    util_hex_encode(raw, sizeof(raw), out);
    return 0;
}
