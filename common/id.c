/* Agent identities: secp256k1 keys (libsecp256k1 0.2.0), Ethereum addresses
 * with EIP-55, EIP-191 personal_sign and recovery, owner-only key files; see
 * id.h. No state of its own: verification uses the library's constant
 * secp256k1_context_static; each operation on a private key creates,
 * randomizes and destroys its own context. */
#include "id.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <secp256k1.h>
#include <secp256k1_recovery.h>

#include "keccak.h"
#include "util.h"

#define ID_KEY_FILE_MAX 256 /* bytes; a key file is 65 ("hex\n") */
#define ID_KEYGEN_TRIES 16  /* a random 32-byte string is a valid key with p > 1 - 2^-127 */

/* The secp256k1 group order n and floor(n / 2), big-endian (SEC 2, 2.4.1). */
static const uint8_t secp_n[32] = {
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
};
static const uint8_t secp_half_n[32] = {
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
};
static const uint8_t zero32[32];

/* EIP-191 version 0x45 prefix; the decimal message length follows. */
static const char eip191_prefix[] = "\x19"
                                    "Ethereum Signed Message:\n";

static const char *const id_err_str[] = {
    [0] = "ok",
    [-ID_E_LENGTH] = "wrong length",
    [-ID_E_HEX] = "not hex or missing 0x",
    [-ID_E_HIGH_S] = "signature s is high (malleable)",
    [-ID_E_RANGE] = "signature r or s out of range",
    [-ID_E_V] = "signature v not 0, 1, 27 or 28",
    [-ID_E_RECOVER] = "no public key recovers from the signature",
    [-ID_E_MISMATCH] = "signature is not from this address",
    [-ID_E_CHECKSUM] = "bad EIP-55 address checksum",
    [-ID_E_KEY] = "invalid private key",
    [-ID_E_RAND] = "random number generator failed",
    [-ID_E_IO] = "key file I/O error",
    [-ID_E_PERM] = "key file permissions too open or not a regular file",
};

const char *id_strerror(int err)
{
    if (err > 0 || err <= -(int)(sizeof(id_err_str) / sizeof(id_err_str[0])))
        return "unknown error";
    return id_err_str[-err];
}

/* A context for operations on a private key, blinded with fresh randomness as
 * libsecp256k1 recommends. Returns NULL if the CSPRNG fails. The library
 * aborts (its error callback) if it cannot allocate. */
static secp256k1_context *secret_ctx_new(void)
{
    uint8_t seed[32];
    secp256k1_context *ctx;

    if (util_rand_bytes(seed, sizeof(seed)) != 0)
        return NULL;
    ctx = secp256k1_context_create(SECP256K1_CONTEXT_NONE);
    if (secp256k1_context_randomize(ctx, seed) != 1) {
        secp256k1_context_destroy(ctx);
        ctx = NULL;
    }
    OPENSSL_cleanse(seed, sizeof(seed));
    return ctx;
}

/* Address of an uncompressed public key: keccak256(X || Y)[12..32]. */
static void addr_from_pub(const uint8_t pub[65], uint8_t addr[ID_ADDR_LEN])
{
    uint8_t h[KECCAK256_LEN];

    keccak256(pub + 1, 64, h);
    memcpy(addr, h + KECCAK256_LEN - ID_ADDR_LEN, ID_ADDR_LEN);
}

int id_key_from_priv(struct id_key *k, const uint8_t priv[32])
{
    struct id_key tmp;
    secp256k1_context *ctx;
    secp256k1_pubkey pk;
    size_t publen = sizeof(tmp.pub);
    int rv = ID_E_KEY;

    /* Copied first: priv may point into k. */
    memcpy(tmp.priv, priv, sizeof(tmp.priv));
    if (secp256k1_ec_seckey_verify(secp256k1_context_static, tmp.priv) != 1)
        goto out_tmp;
    ctx = secret_ctx_new();
    if (ctx == NULL) {
        rv = ID_E_RAND;
        goto out_tmp;
    }
    if (secp256k1_ec_pubkey_create(ctx, &pk, tmp.priv) != 1)
        goto out_ctx;
    secp256k1_ec_pubkey_serialize(ctx, tmp.pub, &publen, &pk, SECP256K1_EC_UNCOMPRESSED);
    addr_from_pub(tmp.pub, tmp.addr);
    *k = tmp;
    rv = ID_OK;

out_ctx:
    secp256k1_context_destroy(ctx);
out_tmp:
    OPENSSL_cleanse(&tmp, sizeof(tmp));
    return rv;
}

int id_key_generate(struct id_key *k)
{
    uint8_t priv[32];
    int rv = ID_E_RAND;

    for (int i = 0; i < ID_KEYGEN_TRIES; i++) {
        if (util_rand_bytes(priv, sizeof(priv)) != 0)
            break;
        rv = id_key_from_priv(k, priv);
        if (rv != ID_E_KEY)
            break;      /* ID_OK, or ID_E_RAND from blinding */
        rv = ID_E_RAND; /* zero or >= n: draw again */
    }
    OPENSSL_cleanse(priv, sizeof(priv));
    return rv;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static bool all_hex(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (!util_is_hex_digit((unsigned char)s[i]))
            return false;
    }
    return true;
}

int id_key_parse_hex(struct id_key *k, const char *s, size_t len)
{
    uint8_t priv[32];
    int rv;

    while (len > 0 && is_space(s[0])) {
        s++;
        len--;
    }
    while (len > 0 && is_space(s[len - 1]))
        len--;
    if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        len -= 2;
    }
    if (!all_hex(s, len))
        return ID_E_HEX;
    if (len != 2 * sizeof(priv))
        return ID_E_LENGTH;
    if (util_hex_decode(s, len, priv, sizeof(priv)) != 0)
        return ID_E_HEX; /* not reached: checked above */
    rv = id_key_from_priv(k, priv);
    OPENSSL_cleanse(priv, sizeof(priv));
    return rv;
}

void id_key_clear(struct id_key *k)
{
    OPENSSL_cleanse(k, sizeof(*k));
}

void id_addr_to_str(const uint8_t addr[ID_ADDR_LEN], char out[ID_ADDR_STR_LEN + 1])
{
    out[0] = '0';
    out[1] = 'x';
    util_hex_encode(addr, ID_ADDR_LEN, out + 2);
}

void id_addr_to_checksum(const uint8_t addr[ID_ADDR_LEN], char out[ID_ADDR_STR_LEN + 1])
{
    uint8_t h[KECCAK256_LEN];

    id_addr_to_str(addr, out);
    /* EIP-55: hash the 40 lowercase hex characters; a letter is uppercased
     * when the matching nibble of the hash is 8 or more. */
    keccak256(out + 2, 2 * ID_ADDR_LEN, h);
    for (size_t i = 0; i < 2 * ID_ADDR_LEN; i++) {
        char *c = &out[2 + i];
        unsigned nibble = i % 2 == 0 ? h[i / 2] >> 4 : h[i / 2] & 0x0f;
        if (*c >= 'a' && *c <= 'f' && nibble >= 8)
            *c = (char)(*c - 'a' + 'A');
    }
}

int id_addr_parse(const char *s, size_t len, uint8_t addr[ID_ADDR_LEN])
{
    uint8_t a[ID_ADDR_LEN];
    char want[ID_ADDR_STR_LEN + 1];
    bool lower = false;
    bool upper = false;

    if (len < 2 || s[0] != '0' || s[1] != 'x')
        return ID_E_HEX; /* the prefix is checked first, whatever the length */
    if (!all_hex(s + 2, len - 2))
        return ID_E_HEX;
    if (len != ID_ADDR_STR_LEN)
        return ID_E_LENGTH;
    for (size_t i = 2; i < len; i++) {
        lower |= s[i] >= 'a' && s[i] <= 'f';
        upper |= s[i] >= 'A' && s[i] <= 'F';
    }
    if (util_hex_decode(s + 2, len - 2, a, sizeof(a)) != 0)
        return ID_E_HEX; /* not reached: checked above */
    if (lower && upper) {
        id_addr_to_checksum(a, want);
        if (memcmp(want, s, ID_ADDR_STR_LEN) != 0)
            return ID_E_CHECKSUM;
    }
    memcpy(addr, a, sizeof(a));
    return ID_OK;
}

void id_eip191_hash(const void *msg, size_t len, uint8_t out[32])
{
    struct keccak_ctx c;
    char dec[24]; /* SIZE_MAX has 20 digits */
    int n = util_snprintf(dec, sizeof(dec), "%zu", len);

    assert(n > 0);
    keccak_init(&c);
    keccak_update(&c, eip191_prefix, sizeof(eip191_prefix) - 1);
    keccak_update(&c, dec, (size_t)n);
    keccak_update(&c, msg, len);
    keccak_final(&c, out);
}

int id_sign(const struct id_key *k, const void *msg, size_t len, uint8_t sig[ID_SIG_LEN])
{
    secp256k1_ecdsa_recoverable_signature rs;
    secp256k1_context *ctx;
    uint8_t h[32];
    int recid = 0;
    int rv = ID_E_KEY;

    if (secp256k1_ec_seckey_verify(secp256k1_context_static, k->priv) != 1)
        return ID_E_KEY;
    ctx = secret_ctx_new();
    if (ctx == NULL)
        return ID_E_RAND;
    id_eip191_hash(msg, len, h);
    /* NULL nonce function: RFC 6979 HMAC-SHA256 without extra data, so the
     * signature is deterministic. The library always returns low s. */
    if (secp256k1_ecdsa_sign_recoverable(ctx, &rs, h, k->priv, NULL, NULL) != 1)
        goto out_ctx;
    secp256k1_ecdsa_recoverable_signature_serialize_compact(ctx, sig, &recid, &rs);
    /* recid 2 or 3 means R.x >= n (p ~ 2^-127); Ethereum's v cannot say it. */
    if (recid > 1) {
        rv = ID_E_RANGE;
        goto out_ctx;
    }
    sig[64] = (uint8_t)(27 + recid);
    rv = ID_OK;

out_ctx:
    secp256k1_context_destroy(ctx);
    OPENSSL_cleanse(&rs, sizeof(rs));
    return rv;
}

void id_sig_to_str(const uint8_t sig[ID_SIG_LEN], char out[ID_SIG_STR_LEN + 1])
{
    out[0] = '0';
    out[1] = 'x';
    util_hex_encode(sig, ID_SIG_LEN, out + 2);
}

int id_sig_parse(const char *s, size_t len, uint8_t sig[ID_SIG_LEN])
{
    if (len < 2 || s[0] != '0' || s[1] != 'x')
        return ID_E_HEX;
    if (!all_hex(s + 2, len - 2))
        return ID_E_HEX;
    if (len != ID_SIG_STR_LEN)
        return ID_E_LENGTH;
    if (util_hex_decode(s + 2, len - 2, sig, ID_SIG_LEN) != 0)
        return ID_E_HEX; /* not reached: checked above */
    return ID_OK;
}

/* 0 < x < n, big-endian; memcmp orders big-endian numbers of equal width. */
static bool in_range(const uint8_t x[32])
{
    return memcmp(x, zero32, 32) != 0 && memcmp(x, secp_n, 32) < 0;
}

int id_recover(const void *msg, size_t len, const uint8_t sig[ID_SIG_LEN],
               uint8_t addr[ID_ADDR_LEN])
{
    secp256k1_ecdsa_recoverable_signature rs;
    secp256k1_pubkey pk;
    uint8_t h[32];
    uint8_t pub[65];
    size_t publen = sizeof(pub);
    int recid;

    secp256k1_selftest(); /* recommended before secp256k1_context_static; cheap */
    /* Checked here, in this order, so each defect has its own code: the
     * library's parser would refuse r, s >= n without saying which. */
    if (sig[64] == 0 || sig[64] == 1)
        recid = sig[64];
    else if (sig[64] == 27 || sig[64] == 28)
        recid = sig[64] - 27;
    else
        return ID_E_V;
    if (!in_range(sig) || !in_range(sig + 32))
        return ID_E_RANGE;
    if (memcmp(sig + 32, secp_half_n, 32) > 0)
        return ID_E_HIGH_S; /* EIP-2: only s <= n/2, else (r, n-s) also verifies */
    if (secp256k1_ecdsa_recoverable_signature_parse_compact(secp256k1_context_static, &rs, sig,
                                                            recid) != 1)
        return ID_E_RANGE; /* not reached: ranges checked above */
    id_eip191_hash(msg, len, h);
    if (secp256k1_ecdsa_recover(secp256k1_context_static, &pk, &rs, h) != 1)
        return ID_E_RECOVER;
    secp256k1_ec_pubkey_serialize(secp256k1_context_static, pub, &publen, &pk,
                                  SECP256K1_EC_UNCOMPRESSED);
    addr_from_pub(pub, addr);
    return ID_OK;
}

int id_verify(const void *msg, size_t len, const char *sig_str, size_t sig_len,
              const uint8_t addr[ID_ADDR_LEN])
{
    uint8_t sig[ID_SIG_LEN];
    uint8_t got[ID_ADDR_LEN];
    int rv;

    rv = id_sig_parse(sig_str, sig_len, sig);
    if (rv != ID_OK)
        return rv;
    rv = id_recover(msg, len, sig, got);
    if (rv != ID_OK)
        return rv;
    if (CRYPTO_memcmp(got, addr, ID_ADDR_LEN) != 0)
        return ID_E_MISMATCH;
    return ID_OK;
}

/* write() all of buf, retrying on EINTR and short writes. Returns 0 or -1. */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n == -1) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* fsync()s the directory holding path so that a rename in it is durable. */
static int fsync_parent_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir;
    int fd;
    int rv = -1;
    int saved;

    if (slash == NULL)
        dir = strdup(".");
    else if (slash == path)
        dir = strdup("/");
    else
        dir = strndup(path, (size_t)(slash - path));
    if (dir == NULL)
        return -1;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd == -1)
        goto out_dir;
    rv = fsync(fd);
    saved = errno;
    close(fd);
    errno = saved;
out_dir:
    saved = errno;
    free(dir);
    errno = saved;
    return rv;
}

int id_key_write(const char *path, const struct id_key *k)
{
    static const char suffix[] = ".tmp-XXXXXX";
    char hex[2 * sizeof(k->priv) + 2];
    size_t plen = strlen(path);
    char *tmp;
    int fd;
    int saved;

    tmp = malloc(plen + sizeof(suffix));
    if (tmp == NULL)
        return ID_E_IO; /* errno is ENOMEM */
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, suffix, sizeof(suffix));
    /* mkstemp: O_CREAT | O_EXCL, mode 0600, in path's own directory so the
     * rename below is atomic. */
    fd = mkstemp(tmp);
    if (fd == -1)
        goto fail_tmp;
    util_hex_encode(k->priv, sizeof(k->priv), hex);
    hex[2 * sizeof(k->priv)] = '\n';
    if (write_all(fd, hex, sizeof(hex) - 1) != 0)
        goto fail_fd;
    if (fsync(fd) != 0)
        goto fail_fd;
    if (close(fd) != 0) {
        fd = -1;
        goto fail_unlink;
    }
    fd = -1;
    if (rename(tmp, path) != 0)
        goto fail_unlink;
    OPENSSL_cleanse(hex, sizeof(hex));
    free(tmp);
    if (fsync_parent_dir(path) != 0)
        return ID_E_IO;
    return ID_OK;

fail_fd:
    saved = errno;
    close(fd);
    errno = saved;
fail_unlink:
    saved = errno;
    unlink(tmp);
    errno = saved;
fail_tmp:
    saved = errno;
    OPENSSL_cleanse(hex, sizeof(hex));
    free(tmp);
    errno = saved;
    return ID_E_IO;
}

/* Formats a one-line error into err if the caller gave room for one. */
__attribute__((format(printf, 3, 4))) static void set_err(char *err, size_t errlen, const char *fmt,
                                                          ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    /* A truncated message is still a NUL-terminated, useful line. */
    (void)vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

int id_key_read(const char *path, struct id_key *k, char *err, size_t errlen)
{
    char buf[ID_KEY_FILE_MAX + 1];
    struct stat st;
    size_t len = 0;
    int fd;
    int rv;
    int saved = 0; /* errno of an ID_E_IO failure, restored after close() */

    /* O_NONBLOCK: opening a FIFO must not hang; it is refused below. The mode
     * is checked on the open descriptor, so the file cannot change between
     * the check and the read. */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd == -1) {
        saved = errno;
        set_err(err, errlen, "cannot open key file '%s': %s", path, strerror(saved));
        errno = saved;
        return ID_E_IO;
    }
    if (fstat(fd, &st) != 0) {
        saved = errno;
        set_err(err, errlen, "cannot stat key file '%s': %s", path, strerror(saved));
        rv = ID_E_IO;
        goto out_fd;
    }
    if (!S_ISREG(st.st_mode)) {
        set_err(err, errlen, "key file '%s' is not a regular file", path);
        rv = ID_E_PERM;
        goto out_fd;
    }
    /* Like ssh: any group or other bit is too open, a key is for its owner. */
    if ((st.st_mode & 077) != 0) {
        set_err(err, errlen, "permissions %04o for '%s' are too open; run: chmod 600 %s",
                (unsigned)(st.st_mode & 07777), path, path);
        rv = ID_E_PERM;
        goto out_fd;
    }
    for (;;) {
        ssize_t n = read(fd, buf + len, sizeof(buf) - len);
        if (n == -1 && errno == EINTR)
            continue;
        if (n == -1) {
            saved = errno;
            set_err(err, errlen, "cannot read key file '%s': %s", path, strerror(saved));
            rv = ID_E_IO;
            goto out_buf;
        }
        len += (size_t)n;
        if (n == 0 || len == sizeof(buf))
            break;
    }
    if (len > ID_KEY_FILE_MAX) {
        set_err(err, errlen, "key file '%s' is too long to hold a private key", path);
        rv = ID_E_LENGTH;
        goto out_buf;
    }
    rv = id_key_parse_hex(k, buf, len);
    if (rv != ID_OK)
        set_err(err, errlen, "key file '%s' does not hold a private key (64 hex digits): %s", path,
                id_strerror(rv));

out_buf:
    OPENSSL_cleanse(buf, sizeof(buf));
out_fd:
    close(fd);
    if (rv == ID_E_IO)
        errno = saved;
    return rv;
}
