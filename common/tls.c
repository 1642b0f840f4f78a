/* OpenSSL contexts for both programs; see tls.h. Ownership:
 * 1. struct tls_server (owned by the gateway context) holds ONE reference to
 *    the current SSL_CTX. Each SSL_new() takes its own, so tls_server_reload()
 *    drops ours on the old SSL_CTX and live connections keep it alive until
 *    their SSL_free(). Every SSL_CTX built here points back to the tls_server
 *    (cert and ALPN callback args), hence: free all SSLs before the server.
 * 2. Local CA mode: the CA cert/key, one in-memory leaf key and the apex
 *    certificate belong to the tls_server; leaves live in a bounded LRU cache
 *    keyed by lowercase host name. SSL_use_cert_and_key() up-refs the leaf, so
 *    evicting an entry never pulls a certificate from under a connection. */
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/bufferevent_struct.h>
#include <event2/event.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "log.h"
#include "util.h"

/* TLS 1.2 suites: forward-secret AEAD only (Mozilla "intermediate" minus
 * DHE, which would need parameters). TLS 1.3 keeps OpenSSL's defaults. */
static const char tls_ciphers_12[] = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                                     "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                                     "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";
static const char tls_groups[] = "X25519:P-256:P-384";
static const unsigned char tls_sid_ctx[] = "tunnel-gateway";

#define TLS_DAY_SECS 86400
#define TLS_CA_DAYS 3652                  /* ten years */
#define TLS_LEAF_DAYS 824                 /* + 1 h backdating: under Apple's 825-day limit */
#define TLS_BACKDATE_SECS 3600            /* tolerate clients whose clock is a bit behind */
#define TLS_RENEW_SECS (2 * TLS_DAY_SECS) /* reissue a cached leaf this close to expiry */
#define TLS_LOG_ERRORS_MAX 8
#define TLS_ALPN_MAX 255
#define TLS_CACHE_MAX_LIMIT (1u << 20)
#define TLS_TICKET_KEYS_LEN 80 /* OpenSSL 3.0: name 16 + HMAC 32 + AES 32 */

/* One cached leaf certificate; owned by the tls_server's cache. */
struct tls_leaf {
    struct tls_leaf *hnext; /* hash chain */
    struct tls_leaf *prev;  /* LRU list: towards the most recently used */
    struct tls_leaf *next;  /* LRU list: towards the least recently used */
    X509 *cert;             /* owned reference */
    int64_t not_after;      /* cert expiry, Unix seconds */
    char name[];            /* lowercase host name, NUL-terminated */
};

/* Owned by the gateway context. */
struct tls_server {
    SSL_CTX *ctx;               /* current SSL_CTX; one owned reference */
    struct log_sink *log;       /* borrowed */
    char *cert_file;            /* configured mode: owned copy, else NULL */
    char *key_file;             /* configured mode: owned copy, else NULL */
    char *domain;               /* apex, lowercase, validated */
    char *ca_path;              /* local CA mode: <state_dir>/local-ca.pem */
    uint8_t alpn[TLS_ALPN_MAX]; /* server preference, wire format */
    size_t alpn_len;            /* 0 = no ALPN */

    /* local CA mode only */
    X509 *ca_cert;             /* owned */
    EVP_PKEY *ca_key;          /* owned */
    int64_t ca_not_after;      /* Unix seconds; leaves never outlive the CA */
    EVP_PKEY *leaf_key;        /* owned; shared by every issued leaf, memory only */
    X509 *apex;                /* owned; certificate for <domain>, and the fallback */
    int64_t apex_not_after;    /* Unix seconds */
    struct tls_leaf **buckets; /* hash table of nbuckets chains */
    size_t nbuckets;           /* power of two */
    uint64_t hash_seed;        /* random, so peers cannot aim names at one chain */
    struct tls_leaf *lru_head; /* most recently used */
    struct tls_leaf *lru_tail; /* evicted first */
    size_t count;              /* leaves cached */
    size_t max;                /* bound on count */
};

enum tls_name_kind {
    TLS_NAME_OTHER = 0, /* no SNI, or outside the domain: apex certificate */
    TLS_NAME_APEX,      /* equal to the domain */
    TLS_NAME_LABEL,     /* exactly one LDH label under the domain */
};

/* Writes a message to err, followed by the reason of the earliest OpenSSL
 * error (the root cause: "No such file or directory", "bad base64 decode";
 * later entries only say which layer gave up), and drains the queue
 * (STYLE.md section 4). */
static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    unsigned long e = ERR_peek_error();
    va_list ap;

    if (err != NULL && errlen > 0) {
        va_start(ap, fmt);
        int n = vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
        if (e != 0 && n >= 0 && (size_t)n + 3 < errlen) {
            const char *reason =
                ERR_SYSTEM_ERROR(e) ? strerror(ERR_GET_REASON(e)) : ERR_reason_error_string(e);
            char ebuf[256];
            if (reason == NULL) {
                ERR_error_string_n(e, ebuf, sizeof(ebuf));
                reason = ebuf;
            }
            snprintf(err + n, errlen - (size_t)n, ": %s", reason);
        }
    }
    ERR_clear_error();
}

void tls_drain_errors(void)
{
    ERR_clear_error();
}

void tls_log_errors(struct log_sink *log, const char *event)
{
    size_t logged = 0;
    size_t dropped = 0;

    /* The queue holds at most ERR_NUM_ERRORS entries, so this ends. */
    for (;;) {
        const char *data = NULL;
        int flags = 0;
        char buf[256];
        unsigned long e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags);
        if (e == 0)
            break;
        if (logged >= TLS_LOG_ERRORS_MAX || !log_enabled(log, LOG_LVL_WARN)) {
            dropped++;
            continue;
        }
        ERR_error_string_n(e, buf, sizeof(buf));
        if ((flags & ERR_TXT_STRING) != 0 && data != NULL && data[0] != '\0')
            LOG_WARN(log, event, LOG_S("err", buf), LOG_S("detail", data));
        else
            LOG_WARN(log, event, LOG_S("err", buf));
        logged++;
    }
    if (dropped > 0 && logged > 0)
        LOG_WARN(log, event, LOG_U("dropped", dropped));
}

/* "h2,http/1.1" -> "\x02h2\x08http/1.1". Returns 0 or -1 (empty entry, too long). */
static int alpn_encode(const char *list, uint8_t *out, size_t cap, size_t *outlen)
{
    size_t len = 0;
    const char *p = list;

    for (;;) {
        const char *comma = strchr(p, ',');
        size_t n = comma != NULL ? (size_t)(comma - p) : strlen(p);
        if (n == 0 || n > 255 || len + 1 + n > cap)
            return -1;
        out[len] = (uint8_t)n;
        memcpy(out + len + 1, p, n);
        len += 1 + n;
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    *outlen = len;
    return 0;
}

static bool is_ldh_label(const char *s, size_t len)
{
    if (len == 0 || len > 63 || s[0] == '-' || s[len - 1] == '-')
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'))
            return false;
    }
    return true;
}

/* Lowercase copy of name into out (cap bytes). Returns the length, or -1 if
 * it does not fit or is empty. */
static int lower_copy(const char *name, char *out, size_t cap)
{
    size_t n = strlen(name);
    if (n == 0 || n >= cap)
        return -1;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
    }
    out[n] = '\0';
    return (int)n;
}

/* A DNS name of LDH labels, at most 253 characters. Lowercase input. */
static bool is_dns_name(const char *s, size_t len)
{
    size_t start = 0;

    if (len == 0 || len > 253)
        return false;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || s[i] == '.') {
            if (!is_ldh_label(s + start, i - start))
                return false;
            start = i + 1;
        }
    }
    return true;
}

/* Classifies a lowercase SNI name against the domain. */
static enum tls_name_kind classify(const struct tls_server *s, const char *name, size_t len)
{
    size_t dlen = strlen(s->domain);

    if (len == dlen && memcmp(name, s->domain, len) == 0)
        return TLS_NAME_APEX;
    if (len < dlen + 2 || name[len - dlen - 1] != '.' ||
        memcmp(name + len - dlen, s->domain, dlen) != 0)
        return TLS_NAME_OTHER;
    return is_ldh_label(name, len - dlen - 1) ? TLS_NAME_LABEL : TLS_NAME_OTHER;
}

/* Refuses encrypted keys instead of prompting on the terminal. */
static int no_password_cb(char *buf, int size, int rwflag, void *u)
{
    return -1;
}

static int asn1_to_unix(const ASN1_TIME *t, int64_t *out)
{
    struct tm tm;
    if (ASN1_TIME_to_tm(t, &tm) != 1)
        return -1;
    *out = (int64_t)timegm(&tm);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Files */

/* mkdir -p with mode 0700 for every directory it creates. */
static int mkdir_p(const char *dir, char *err, size_t errlen)
{
    char path[PATH_MAX];
    struct stat st;

    if (util_snprintf(path, sizeof(path), "%s", dir) < 0) {
        set_err(err, errlen, "state directory path too long: %s", dir);
        return -1;
    }
    for (char *p = path + 1;; p++) {
        bool end = *p == '\0';
        if (!end && *p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0700) == -1 && errno != EEXIST) {
            int e = errno;
            set_err(err, errlen, "cannot create directory %s: %s", path, strerror(e));
            return -1;
        }
        if (end)
            break;
        *p = '/';
    }
    if (stat(path, &st) == -1 || !S_ISDIR(st.st_mode)) {
        set_err(err, errlen, "%s is not a directory", path);
        return -1;
    }
    return 0;
}

/* Writes path atomically (temp file in the same directory, fsync, rename)
 * with the given mode, whatever the umask. */
static int write_file_atomic(const char *dir, const char *path, const char *data, size_t len,
                             mode_t mode, char *err, size_t errlen)
{
    char tmp[PATH_MAX];
    int fd;
    int e;

    if (util_snprintf(tmp, sizeof(tmp), "%s.tmp.XXXXXX", path) < 0) {
        set_err(err, errlen, "path too long: %s", path);
        return -1;
    }
    fd = mkstemp(tmp); /* created 0600 */
    if (fd == -1) {
        e = errno;
        set_err(err, errlen, "cannot create %s: %s", tmp, strerror(e));
        return -1;
    }
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) == -1 || fchmod(fd, mode) == -1)
        goto fail_fd;
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n == -1 && errno == EINTR)
            continue;
        if (n == 0)
            errno = EIO;
        if (n <= 0)
            goto fail_fd;
        data += n;
        len -= (size_t)n;
    }
    if (fsync(fd) == -1)
        goto fail_fd;
    if (close(fd) == -1) {
        e = errno;
        goto fail_tmp;
    }
    if (rename(tmp, path) == -1) {
        e = errno;
        goto fail_tmp;
    }
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd != -1) {
        (void)fsync(fd); /* best effort: the rename is durable on most filesystems anyway */
        close(fd);
    }
    return 0;

fail_fd:
    e = errno;
    close(fd);
fail_tmp:
    unlink(tmp);
    set_err(err, errlen, "cannot write %s: %s", path, strerror(e));
    return -1;
}

/* Reads a PEM private key that must be a regular file with no group/other
 * permission bits. */
static EVP_PKEY *read_owner_only_key(const char *path, char *err, size_t errlen)
{
    struct stat st;
    EVP_PKEY *key;
    BIO *bio;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd == -1) {
        int e = errno;
        set_err(err, errlen, "cannot open %s: %s", path, strerror(e));
        return NULL;
    }
    if (fstat(fd, &st) == -1 || !S_ISREG(st.st_mode)) {
        set_err(err, errlen, "%s is not a regular file", path);
        goto fail_fd;
    }
    if ((st.st_mode & 0077) != 0) {
        set_err(err, errlen,
                "%s is accessible by group or others (mode %04o); "
                "run: chmod 600 %s",
                path, (unsigned)(st.st_mode & 07777), path);
        goto fail_fd;
    }
    bio = BIO_new_fd(fd, BIO_CLOSE);
    if (bio == NULL) {
        set_err(err, errlen, "out of memory reading %s", path);
        goto fail_fd;
    }
    key = PEM_read_bio_PrivateKey(bio, NULL, no_password_cb, NULL);
    BIO_free(bio);
    if (key == NULL)
        set_err(err, errlen, "cannot read a private key from %s", path);
    return key;

fail_fd:
    close(fd);
    return NULL;
}

static X509 *read_cert(const char *path, char *err, size_t errlen)
{
    BIO *bio = BIO_new_file(path, "r");
    X509 *x;

    if (bio == NULL) {
        set_err(err, errlen, "cannot open %s", path);
        return NULL;
    }
    x = PEM_read_bio_X509(bio, NULL, no_password_cb, NULL);
    BIO_free(bio);
    if (x == NULL)
        set_err(err, errlen, "cannot read a certificate from %s", path);
    return x;
}

/* ------------------------------------------------------------------------ */
/* Certificates */

static int add_ext(X509 *issuer, X509 *subject, int nid, const char *value)
{
    X509V3_CTX v3;
    X509_EXTENSION *ext;
    int rv;

    X509V3_set_ctx(&v3, issuer, subject, NULL, NULL, 0);
    ext = X509V3_EXT_nconf_nid(NULL, &v3, nid, value);
    if (ext == NULL)
        return -1;
    rv = X509_add_ext(subject, ext, -1) == 1 ? 0 : -1;
    X509_EXTENSION_free(ext);
    return rv;
}

/* A positive random 128-bit serial (RFC 5280 4.1.2.2: at most 20 octets). */
static int set_random_serial(X509 *x)
{
    uint8_t b[16];
    BIGNUM *bn;
    int rv = -1;

    if (util_rand_bytes(b, sizeof(b)) != 0)
        return -1;
    b[0] = (uint8_t)((b[0] & 0x7f) | 0x40);
    bn = BN_bin2bn(b, (int)sizeof(b), NULL);
    if (bn != NULL && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL)
        rv = 0;
    BN_free(bn);
    return rv;
}

/* Builds and signs a certificate. issuer NULL = self-signed by key.
 * ca: CA:TRUE keyCertSign; else a serverAuth leaf for DNS name cn, plus
 * san_extra (",IP:..." or "") in its subjectAltName. */
static X509 *make_cert(X509 *issuer, EVP_PKEY *issuer_key, EVP_PKEY *key, const char *cn,
                       const char *san_extra, bool ca, int64_t not_before, int64_t not_after)
{
    X509 *x = X509_new();
    X509_NAME *name;
    char san[300];
    bool cn_fits = strlen(cn) <= 64; /* ub-common-name; the SAN carries the name anyway */

    if (x == NULL)
        return NULL;
    if (X509_set_version(x, X509_VERSION_3) != 1 || set_random_serial(x) != 0)
        goto fail;
    if (ASN1_TIME_set(X509_getm_notBefore(x), (time_t)not_before) == NULL ||
        ASN1_TIME_set(X509_getm_notAfter(x), (time_t)not_after) == NULL)
        goto fail;
    name = X509_get_subject_name(x);
    if (cn_fits && X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn,
                                              -1, -1, 0) != 1)
        goto fail;
    if (X509_set_issuer_name(x, issuer != NULL ? X509_get_subject_name(issuer) : name) != 1)
        goto fail;
    if (X509_set_pubkey(x, key) != 1)
        goto fail;
    if (issuer == NULL)
        issuer = x;
    if (ca) {
        if (add_ext(issuer, x, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") != 0 ||
            add_ext(issuer, x, NID_key_usage, "critical,keyCertSign,cRLSign,digitalSignature") != 0)
            goto fail;
    } else {
        /* An empty subject needs a critical SAN (RFC 5280 4.2.1.6). */
        if (util_snprintf(san, sizeof(san), "%sDNS:%s%s", cn_fits ? "" : "critical,", cn,
                          san_extra) < 0)
            goto fail;
        if (add_ext(issuer, x, NID_basic_constraints, "critical,CA:FALSE") != 0 ||
            add_ext(issuer, x, NID_key_usage, "critical,digitalSignature") != 0 ||
            add_ext(issuer, x, NID_ext_key_usage, "serverAuth") != 0 ||
            add_ext(issuer, x, NID_subject_alt_name, san) != 0)
            goto fail;
    }
    if (add_ext(issuer, x, NID_subject_key_identifier, "hash") != 0 ||
        add_ext(issuer, x, NID_authority_key_identifier, "keyid:always") != 0)
        goto fail;
    if (X509_sign(x, issuer_key, EVP_sha256()) <= 0)
        goto fail;
    return x;

fail:
    X509_free(x);
    return NULL;
}

/* A leaf for a validated lowercase name, signed by the local CA. */
static X509 *issue_leaf(struct tls_server *s, const char *name, int64_t *not_after)
{
    /* Clients that dial 127.0.0.1 / ::1 send no SNI and get the apex: with
     * the domain "localhost", let them verify too. */
    const char *extra = strcmp(name, "localhost") == 0 ? ",IP:127.0.0.1,IP:::1" : "";
    int64_t now = util_unix_time();
    int64_t end = now + (int64_t)TLS_LEAF_DAYS * TLS_DAY_SECS;
    X509 *x;

    if (end > s->ca_not_after)
        end = s->ca_not_after;
    x = make_cert(s->ca_cert, s->ca_key, s->leaf_key, name, extra, false, now - TLS_BACKDATE_SECS,
                  end);
    if (x == NULL) {
        tls_log_errors(s->log, "tls_leaf_failed");
        return NULL;
    }
    *not_after = end;
    LOG_DEBUG(s->log, "tls_leaf_issued", LOG_S("name", name));
    return x;
}

/* ------------------------------------------------------------------------ */
/* Leaf cache */

static size_t leaf_hash(const struct tls_server *s, const char *name)
{
    uint64_t h = s->hash_seed ^ 14695981039346656037ull; /* FNV-1a, seeded */
    for (const char *p = name; *p != '\0'; p++) {
        h ^= (uint8_t)*p;
        h *= 1099511628211ull;
    }
    return (size_t)(h ^ (h >> 29)) & (s->nbuckets - 1);
}

static void lru_unlink(struct tls_server *s, struct tls_leaf *l)
{
    if (l->prev != NULL)
        l->prev->next = l->next;
    else
        s->lru_head = l->next;
    if (l->next != NULL)
        l->next->prev = l->prev;
    else
        s->lru_tail = l->prev;
    l->prev = NULL;
    l->next = NULL;
}

static void lru_push_head(struct tls_server *s, struct tls_leaf *l)
{
    l->prev = NULL;
    l->next = s->lru_head;
    if (s->lru_head != NULL)
        s->lru_head->prev = l;
    s->lru_head = l;
    if (s->lru_tail == NULL)
        s->lru_tail = l;
}

static void cache_remove(struct tls_server *s, struct tls_leaf *l)
{
    struct tls_leaf **pp = &s->buckets[leaf_hash(s, l->name)];

    while (*pp != l)
        pp = &(*pp)->hnext;
    *pp = l->hnext;
    lru_unlink(s, l);
    X509_free(l->cert);
    free(l);
    s->count--;
}

static X509 *cache_get(struct tls_server *s, const char *name, size_t len)
{
    size_t b = leaf_hash(s, name);
    struct tls_leaf *l;
    int64_t not_after;
    X509 *x;

    for (l = s->buckets[b]; l != NULL; l = l->hnext) {
        if (strcmp(l->name, name) == 0)
            break;
    }
    if (l != NULL && l->not_after - util_unix_time() > TLS_RENEW_SECS) {
        lru_unlink(s, l);
        lru_push_head(s, l);
        return l->cert;
    }
    x = issue_leaf(s, name, &not_after);
    if (x == NULL)
        return l != NULL ? l->cert : NULL; /* near expiry beats nothing */
    if (l != NULL) {
        X509_free(l->cert);
        l->cert = x;
        l->not_after = not_after;
        lru_unlink(s, l);
        lru_push_head(s, l);
        return x;
    }
    l = calloc(1, sizeof(*l) + len + 1);
    if (l == NULL) {
        X509_free(x);
        return NULL;
    }
    memcpy(l->name, name, len + 1);
    l->cert = x;
    l->not_after = not_after;
    l->hnext = s->buckets[b];
    s->buckets[b] = l;
    lru_push_head(s, l);
    s->count++;
    if (s->count > s->max)
        cache_remove(s, s->lru_tail);
    return x;
}

static X509 *apex_get(struct tls_server *s)
{
    int64_t not_after;
    X509 *x;

    if (s->apex_not_after - util_unix_time() > TLS_RENEW_SECS)
        return s->apex;
    x = issue_leaf(s, s->domain, &not_after);
    if (x == NULL)
        return s->apex; /* may be NULL at start */
    X509_free(s->apex);
    s->apex = x;
    s->apex_not_after = not_after;
    return x;
}

X509 *tls_server_cert_for(struct tls_server *s, const char *name)
{
    char lname[256];
    int len;

    if (s->ca_cert == NULL)
        return SSL_CTX_get0_certificate(s->ctx);
    if (name == NULL)
        return apex_get(s);
    len = lower_copy(name, lname, sizeof(lname));
    if (len < 0 || classify(s, lname, (size_t)len) != TLS_NAME_LABEL)
        return apex_get(s);
    return cache_get(s, lname, (size_t)len);
}

size_t tls_server_cache_count(const struct tls_server *s)
{
    return s->count;
}

/* ------------------------------------------------------------------------ */
/* Server */

/* Local CA mode, during the handshake once the ClientHello (SNI included)
 * has been processed: puts the certificate for the SNI name on this SSL.
 * Runs inside SSL_do_handshake(), i.e. inside bufferevent_openssl. */
static int on_cert(SSL *ssl, void *arg)
{
    struct tls_server *s = arg;
    const char *sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    X509 *x = tls_server_cert_for(s, sni);

    if (x == NULL)
        return 0; /* handshake fails with an internal_error alert */
    if (SSL_use_cert_and_key(ssl, x, s->leaf_key, NULL, 1) != 1) {
        tls_log_errors(s->log, "tls_cert_select_failed");
        return 0;
    }
    return 1;
}

/* RFC 7301 3.2: our order wins. No overlap: no ALPN, the client falls back
 * to HTTP/1.1. */
static int on_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg)
{
    const struct tls_server *s = arg;

    for (size_t i = 0; i < s->alpn_len; i += 1 + (size_t)s->alpn[i]) {
        const uint8_t *proto = s->alpn + i + 1;
        size_t plen = s->alpn[i];
        for (size_t j = 0; j < inlen; j += 1 + (size_t)in[j]) {
            size_t clen = in[j];
            if (j + 1 + clen > inlen)
                break;
            if (clen == plen && memcmp(in + j + 1, proto, plen) == 0) {
                *out = in + j + 1;
                *outlen = (unsigned char)clen;
                return SSL_TLSEXT_ERR_OK;
            }
        }
    }
    return SSL_TLSEXT_ERR_NOACK;
}

/* Configured certificate: warn if it does not serve <domain> and *.<domain>. */
static void check_cert_names(struct tls_server *s, X509 *leaf)
{
    char sample[300];
    const unsigned int fl = X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS;
    bool apex = X509_check_host(leaf, s->domain, 0, fl, NULL) == 1;
    bool sub = false;

    if (util_snprintf(sample, sizeof(sample), "tunnel-gateway-check.%s", s->domain) >= 0)
        sub = X509_check_host(leaf, sample, 0, fl, NULL) == 1;
    ERR_clear_error();
    if (!apex || !sub)
        LOG_WARN(s->log, "tls_cert_name_mismatch", LOG_S("file", s->cert_file),
                 LOG_S("domain", s->domain), LOG_B("covers_apex", apex),
                 LOG_B("covers_wildcard", sub));
    if (X509_cmp_current_time(X509_get0_notAfter(leaf)) <= 0)
        LOG_WARN(s->log, "tls_cert_expired", LOG_S("file", s->cert_file));
}

static int load_configured(struct tls_server *s, SSL_CTX *ctx, char *err, size_t errlen)
{
    SSL_CTX_set_default_passwd_cb(ctx, no_password_cb);
    if (SSL_CTX_use_certificate_chain_file(ctx, s->cert_file) != 1) {
        set_err(err, errlen, "cannot load certificate chain %s", s->cert_file);
        return -1;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, s->key_file, SSL_FILETYPE_PEM) != 1) {
        set_err(err, errlen, "cannot load private key %s", s->key_file);
        return -1;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        set_err(err, errlen, "private key %s does not match certificate %s", s->key_file,
                s->cert_file);
        return -1;
    }
    check_cert_names(s, SSL_CTX_get0_certificate(ctx));
    return 0;
}

/* A fresh SSL_CTX from the server's current settings and files. */
static SSL_CTX *build_ctx(struct tls_server *s, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

    if (ctx == NULL) {
        set_err(err, errlen, "SSL_CTX_new failed");
        return NULL;
    }
    /* Public clients often skip close_notify; libevent 2.1.12 would turn
     * OpenSSL 3's unexpected-EOF error into a failed connection. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS); /* idle keep-alive costs ~no buffer */
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_cipher_list(ctx, tls_ciphers_12) != 1 ||
        SSL_CTX_set1_groups_list(ctx, tls_groups) != 1 ||
        SSL_CTX_set_session_id_context(ctx, tls_sid_ctx, sizeof(tls_sid_ctx) - 1) != 1) {
        set_err(err, errlen, "cannot configure the TLS context");
        goto fail_ctx;
    }
    if (s->alpn_len > 0)
        SSL_CTX_set_alpn_select_cb(ctx, on_alpn_select, s);
    if (s->ca_cert == NULL) {
        if (load_configured(s, ctx, err, errlen) != 0)
            goto fail_ctx;
        return ctx;
    }
    /* Local CA: the apex is the default; on_cert picks per SNI. */
    if (apex_get(s) == NULL || SSL_CTX_use_cert_and_key(ctx, s->apex, s->leaf_key, NULL, 1) != 1) {
        set_err(err, errlen, "cannot issue the certificate for %s", s->domain);
        goto fail_ctx;
    }
    SSL_CTX_set_cert_cb(ctx, on_cert, s);
    return ctx;

fail_ctx:
    SSL_CTX_free(ctx);
    return NULL;
}

/* Creates <state_dir>/local-ca.{key,pem}. The key goes first: a key without
 * a certificate was never trusted by anyone and is simply replaced. */
static int local_ca_create(struct tls_server *s, const char *dir, const char *key_path, char *err,
                           size_t errlen)
{
    int64_t now = util_unix_time();
    uint8_t rnd[4];
    char suffix[9];
    char cn[64];
    BIO *kb = NULL;
    BIO *cb = NULL;
    char *data;
    long n;
    int rv = -1;

    s->ca_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (s->ca_key == NULL || util_rand_bytes(rnd, sizeof(rnd)) != 0) {
        set_err(err, errlen, "cannot generate the local CA key");
        return -1;
    }
    util_hex_encode(rnd, sizeof(rnd), suffix);
    if (util_snprintf(cn, sizeof(cn), "tunnel-gateway local CA %s", suffix) < 0) {
        set_err(err, errlen, "local CA name too long");
        return -1;
    }
    s->ca_cert = make_cert(NULL, s->ca_key, s->ca_key, cn, "", true, now - TLS_BACKDATE_SECS,
                           now + (int64_t)TLS_CA_DAYS * TLS_DAY_SECS);
    if (s->ca_cert == NULL) {
        set_err(err, errlen, "cannot create the local CA certificate");
        return -1;
    }
    kb = BIO_new(BIO_s_secmem()); /* wiped on free */
    cb = BIO_new(BIO_s_mem());
    if (kb == NULL || cb == NULL ||
        PEM_write_bio_PrivateKey(kb, s->ca_key, NULL, NULL, 0, NULL, NULL) != 1 ||
        PEM_write_bio_X509(cb, s->ca_cert) != 1) {
        set_err(err, errlen, "cannot encode the local CA");
        goto out;
    }
    n = BIO_get_mem_data(kb, &data);
    if (n <= 0 || write_file_atomic(dir, key_path, data, (size_t)n, 0600, err, errlen) != 0)
        goto out;
    n = BIO_get_mem_data(cb, &data);
    if (n <= 0 || write_file_atomic(dir, s->ca_path, data, (size_t)n, 0644, err, errlen) != 0)
        goto out;
    LOG_INFO(s->log, "tls_local_ca_created", LOG_S("ca", s->ca_path), LOG_S("subject", cn));
    rv = 0;
out:
    BIO_free(cb);
    BIO_free(kb);
    return rv;
}

static int local_ca_load(struct tls_server *s, const char *key_path, char *err, size_t errlen)
{
    s->ca_key = read_owner_only_key(key_path, err, errlen);
    if (s->ca_key == NULL)
        return -1;
    s->ca_cert = read_cert(s->ca_path, err, errlen);
    if (s->ca_cert == NULL)
        return -1;
    if (X509_check_private_key(s->ca_cert, s->ca_key) != 1) {
        set_err(err, errlen, "%s does not match %s; remove both to create a new local CA", key_path,
                s->ca_path);
        return -1;
    }
    if (X509_check_ca(s->ca_cert) < 1) {
        set_err(err, errlen, "%s is not a CA certificate; remove it and %s to create a new one",
                s->ca_path, key_path);
        return -1;
    }
    LOG_INFO(s->log, "tls_local_ca_loaded", LOG_S("ca", s->ca_path));
    return 0;
}

/* Loads the local CA, creating it on first run. */
static int local_ca_init(struct tls_server *s, const char *dir, char *err, size_t errlen)
{
    char key_path[PATH_MAX];
    char path[PATH_MAX];
    struct stat st;
    bool have_cert;
    bool have_key;
    int rv;

    if (util_snprintf(path, sizeof(path), "%s/%s", dir, TLS_LOCAL_CA_CERT) < 0 ||
        util_snprintf(key_path, sizeof(key_path), "%s/%s", dir, TLS_LOCAL_CA_KEY) < 0) {
        set_err(err, errlen, "state directory path too long: %s", dir);
        return -1;
    }
    s->ca_path = strdup(path);
    if (s->ca_path == NULL) {
        set_err(err, errlen, "out of memory");
        return -1;
    }
    if (mkdir_p(dir, err, errlen) != 0)
        return -1;
    /* Anything but "does not exist" counts as present, so that an
     * unreadable file is reported rather than replaced. */
    have_cert = stat(path, &st) == 0 || errno != ENOENT;
    have_key = stat(key_path, &st) == 0 || errno != ENOENT;
    if (have_cert && !have_key) {
        set_err(err, errlen,
                "%s exists but %s is missing; remove %s to create a new local CA "
                "(clients trusting the old one must then trust the new one)",
                path, key_path, path);
        return -1;
    }
    if (have_cert)
        rv = local_ca_load(s, key_path, err, errlen);
    else
        rv = local_ca_create(s, dir, key_path, err, errlen);
    if (rv != 0)
        return -1;
    if (asn1_to_unix(X509_get0_notAfter(s->ca_cert), &s->ca_not_after) != 0 ||
        s->ca_not_after - util_unix_time() <= TLS_RENEW_SECS) {
        set_err(err, errlen,
                "local CA %s has expired or is about to; remove it and %s to create a "
                "new one",
                path, key_path);
        return -1;
    }
    s->leaf_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (s->leaf_key == NULL) {
        set_err(err, errlen, "cannot generate the leaf key");
        return -1;
    }
    return 0;
}

static int cache_init(struct tls_server *s, size_t max, char *err, size_t errlen)
{
    uint8_t seed[8];

    s->max = max == 0 ? TLS_CACHE_MAX_DEFAULT : max;
    if (s->max > TLS_CACHE_MAX_LIMIT)
        s->max = TLS_CACHE_MAX_LIMIT;
    s->nbuckets = 16;
    while (s->nbuckets < s->max * 2)
        s->nbuckets *= 2;
    s->buckets = calloc(s->nbuckets, sizeof(*s->buckets));
    if (s->buckets == NULL || util_rand_bytes(seed, sizeof(seed)) != 0) {
        set_err(err, errlen, "out of memory");
        return -1;
    }
    memcpy(&s->hash_seed, seed, sizeof(seed));
    return 0;
}

struct tls_server *tls_server_new(const struct tls_server_opts *o, char *err, size_t errlen)
{
    struct tls_server *s;
    char dom[256];
    int dlen;

    if (err != NULL && errlen > 0)
        err[0] = '\0';
    ERR_clear_error(); /* so that err names our failure, not a stale one */
    if ((o->cert_file == NULL) != (o->key_file == NULL)) {
        set_err(err, errlen, "a certificate file needs a key file and vice versa");
        return NULL;
    }
    if (o->cert_file == NULL && (o->state_dir == NULL || o->state_dir[0] == '\0')) {
        set_err(err, errlen, "no certificate configured and no state directory for a local CA");
        return NULL;
    }
    dlen = o->domain != NULL ? lower_copy(o->domain, dom, sizeof(dom)) : -1;
    if (dlen < 0 || !is_dns_name(dom, (size_t)dlen)) {
        set_err(err, errlen, "invalid domain: %s", o->domain != NULL ? o->domain : "(none)");
        return NULL;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    s->log = o->log;
    s->domain = strdup(dom);
    if (s->domain == NULL) {
        set_err(err, errlen, "out of memory");
        goto fail_s;
    }
    if (o->alpn != NULL && alpn_encode(o->alpn, s->alpn, sizeof(s->alpn), &s->alpn_len) != 0) {
        set_err(err, errlen, "invalid ALPN list: %s", o->alpn);
        goto fail_s;
    }
    if (o->cert_file != NULL) {
        s->cert_file = strdup(o->cert_file);
        s->key_file = strdup(o->key_file);
        if (s->cert_file == NULL || s->key_file == NULL) {
            set_err(err, errlen, "out of memory");
            goto fail_s;
        }
    } else if (cache_init(s, o->cache_max_names, err, errlen) != 0 ||
               local_ca_init(s, o->state_dir, err, errlen) != 0) {
        goto fail_s;
    }
    s->ctx = build_ctx(s, err, errlen);
    if (s->ctx == NULL)
        goto fail_s;
    LOG_INFO(s->log, "tls_ready", LOG_S("mode", s->ca_cert != NULL ? "local_ca" : "file"),
             LOG_S("domain", s->domain), LOG_S("cert", s->cert_file));
    return s;

fail_s:
    tls_server_free(s);
    return NULL;
}

SSL_CTX *tls_server_ctx(struct tls_server *s)
{
    return s->ctx;
}

bool tls_server_is_local_ca(const struct tls_server *s)
{
    return s->ca_cert != NULL;
}

const char *tls_server_ca_path(const struct tls_server *s)
{
    return s->ca_cert != NULL ? s->ca_path : NULL;
}

int tls_server_reload(struct tls_server *s, char *err, size_t errlen)
{
    unsigned char keys[TLS_TICKET_KEYS_LEN];
    SSL_CTX *ctx;

    if (err != NULL && errlen > 0)
        err[0] = '\0';
    ERR_clear_error(); /* so that err names our failure, not a stale one */
    ctx = build_ctx(s, err, errlen);
    if (ctx == NULL)
        return -1;
    /* Same ticket keys: tickets issued before the reload still resume. */
    if (SSL_CTX_get_tlsext_ticket_keys(s->ctx, keys, sizeof(keys)) == 1)
        (void)SSL_CTX_set_tlsext_ticket_keys(ctx, keys, sizeof(keys));
    OPENSSL_cleanse(keys, sizeof(keys));
    ERR_clear_error();
    SSL_CTX_free(s->ctx); /* live SSLs keep their own reference */
    s->ctx = ctx;
    return 0;
}

void tls_server_free(struct tls_server *s)
{
    if (s == NULL)
        return;
    SSL_CTX_free(s->ctx);
    while (s->lru_head != NULL)
        cache_remove(s, s->lru_head);
    free(s->buckets);
    X509_free(s->apex);
    EVP_PKEY_free(s->leaf_key);
    EVP_PKEY_free(s->ca_key);
    X509_free(s->ca_cert);
    free(s->ca_path);
    free(s->key_file);
    free(s->cert_file);
    free(s->domain);
    free(s);
}

/* ------------------------------------------------------------------------ */
/* Client */

SSL_CTX *tls_client_ctx_new(const char *ca_file, const char *alpn, char *err, size_t errlen)
{
    uint8_t wire[TLS_ALPN_MAX];
    size_t wire_len = 0;
    SSL_CTX *ctx;

    if (err != NULL && errlen > 0)
        err[0] = '\0';
    ERR_clear_error(); /* so that err names our failure, not a stale one */
    if (alpn != NULL && alpn_encode(alpn, wire, sizeof(wire), &wire_len) != 0) {
        set_err(err, errlen, "invalid ALPN list: %s", alpn);
        return NULL;
    }
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        set_err(err, errlen, "SSL_CTX_new failed");
        return NULL;
    }
    /* The tunnel's own framing (WebSocket, HTTP/2) detects truncation; see
     * build_ctx() for why unexpected EOF must not be an error here. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_cipher_list(ctx, tls_ciphers_12) != 1) {
        set_err(err, errlen, "cannot configure the TLS client context");
        goto fail_ctx;
    }
    if (ca_file != NULL) {
        if (SSL_CTX_load_verify_file(ctx, ca_file) != 1) {
            set_err(err, errlen, "cannot load CA certificates from %s", ca_file);
            goto fail_ctx;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        set_err(err, errlen, "cannot load the system CA store");
        goto fail_ctx;
    }
    if (wire_len > 0 && SSL_CTX_set_alpn_protos(ctx, wire, (unsigned int)wire_len) != 0) {
        set_err(err, errlen, "cannot set ALPN");
        goto fail_ctx;
    }
    return ctx;

fail_ctx:
    SSL_CTX_free(ctx);
    return NULL;
}

int tls_client_prepare(SSL *ssl, const char *host)
{
    struct in6_addr a6;
    struct in_addr a4;

    if (host == NULL || host[0] == '\0')
        return -1;
    SSL_set_verify(ssl, SSL_VERIFY_PEER, NULL);
    if (inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1) {
        /* RFC 6066 3: no IP literals in SNI; verify the iPAddress SAN. */
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host) != 1)
            goto fail;
        return 0;
    }
    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (SSL_set_tlsext_host_name(ssl, host) != 1 || SSL_set1_host(ssl, host) != 1)
        goto fail;
    return 0;

fail:
    ERR_clear_error();
    return -1;
}

void tls_bev_kick_read(struct bufferevent *bev)
{
    SSL *ssl = bufferevent_openssl_get_ssl(bev);

    /* bufferevent_struct.h exposes ev_read for exactly this kind of work
     * around; the read event callback runs OpenSSL's read loop */
    if (ssl != NULL && SSL_has_pending(ssl) && (bufferevent_get_enabled(bev) & EV_READ))
        event_active(&bev->ev_read, EV_READ, 1);
}

#define TLS_READ_AHEAD_BYTES (64u * 1024u)

void tls_bev_read_ahead(struct bufferevent *bev)
{
    SSL *ssl = bufferevent_openssl_get_ssl(bev);

    if (ssl == NULL)
        return;
    SSL_set_default_read_buffer_len(ssl, TLS_READ_AHEAD_BYTES);
    SSL_set_read_ahead(ssl, 1);
}

void tls_bev_kick_write(struct bufferevent *bev)
{
    /* ev_write's callback is the bufferevent's own write loop */
    if ((bufferevent_get_enabled(bev) & EV_WRITE) &&
        evbuffer_get_length(bufferevent_get_output(bev)) > 0)
        event_active(&bev->ev_write, EV_WRITE, 1);
}

/* Room a chain gets when tls_out_add() starts one: two full TLS records. */
#define TLS_OUT_CHAIN (32u * 1024u)

int tls_out_reserve(struct evbuffer *out, size_t len, struct evbuffer_iovec *v)
{
    /* Behind other output, asking for more than len makes the new chain,
     * when one is needed, larger than 32 KiB whatever the last chain lacked:
     * a small chain there would be a short record of its own. A chain
     * reserved and not filled is freed with the output's last drain, or
     * filled by the next append. Into an empty output, len alone: a small
     * message must not cost a 64 KiB allocation (and, with glibc, a brk(2)
     * each way) per send. */
    size_t want = len + (evbuffer_get_length(out) > 0 ? TLS_OUT_CHAIN : 0);

    return evbuffer_reserve_space(out, (ev_ssize_t)want, v, 2);
}

int tls_out_add(struct evbuffer *out, const void *data, size_t len)
{
    struct evbuffer_iovec v;

    /* Reserving one byte allocates nothing when the last chain has room;
     * when it lacks room for len, start a large chain instead of letting
     * evbuffer_add() start a small one. */
    if (len > 0 && len < TLS_OUT_CHAIN &&
        (evbuffer_reserve_space(out, 1, &v, 1) != 1 || v.iov_len < len) &&
        evbuffer_expand(out, TLS_OUT_CHAIN) != 0)
        return -1;
    return evbuffer_add(out, data, len);
}

int tls_out_add_buffer(struct evbuffer *out, struct evbuffer *src, size_t len)
{
    struct evbuffer_iovec v[8];

    if (evbuffer_get_length(src) < len)
        return -1;
    while (len > 0) {
        int n = evbuffer_peek(src, (ev_ssize_t)len, NULL, v, 8);
        size_t moved = 0;

        if (n < 1)
            return -1;
        for (int i = 0; i < n && i < 8 && moved < len; i++) {
            size_t k = v[i].iov_len < len - moved ? v[i].iov_len : len - moved;
            if (tls_out_add(out, v[i].iov_base, k) != 0)
                return -1;
            moved += k;
        }
        evbuffer_drain(src, moved);
        len -= moved;
    }
    return 0;
}
