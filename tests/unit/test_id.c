/* Unit tests for common/id: keys, addresses and EIP-55, EIP-191 signing and
 * recovery, each rejection with its own error code, and key files.
 * Cross-checked against $VECTORS_DIR/eip191.json, written by an independent
 * implementation (tests/vectors/gen_eip191.py: python3-ecdsa + pycryptodome). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "id.h"
#include "util.h"

/* The well-known documentation key and its address (web3.js, ethers). */
#define WELL_KNOWN_PRIV "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
#define WELL_KNOWN_ADDR "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
/* web3.js docs: web3.eth.accounts.sign('Some data', WELL_KNOWN_PRIV). */
#define SOME_DATA_SIG                                                                              \
    "0xb91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd6007e74cd82e037b800186422f" \
    "c2da167c747ef045e5d18a5f5d4300f8e1a0291c"

static const uint8_t secp_n[32] = {
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
};
static const uint8_t secp_half_n[32] = {
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
};

/* x = a - b for 32-byte big-endian numbers, a >= b. */
static void sub256(const uint8_t a[32], const uint8_t b[32], uint8_t x[32])
{
    int borrow = 0;

    for (int i = 31; i >= 0; i--) {
        int d = a[i] - b[i] - borrow;
        borrow = d < 0;
        x[i] = (uint8_t)(d + (borrow ? 256 : 0));
    }
}

/* x += 1, 32-byte big-endian. */
static void inc256(uint8_t x[32])
{
    for (int i = 31; i >= 0; i--) {
        if (++x[i] != 0)
            break;
    }
}

static int verify_bytes(const void *msg, size_t len, const uint8_t sig[ID_SIG_LEN],
                        const uint8_t addr[ID_ADDR_LEN])
{
    char s[ID_SIG_STR_LEN + 1];

    id_sig_to_str(sig, s);
    return id_verify(msg, len, s, ID_SIG_STR_LEN, addr);
}

/* ---- vectors from the independent implementation ---- */

static cJSON *load_vectors(void)
{
    const char *dir = getenv("VECTORS_DIR");
    char path[PATH_MAX];
    FILE *f;
    long size;
    char *buf;
    cJSON *doc;

    assert_non_null(dir); /* set by tests/unit/meson.build */
    assert_true(util_snprintf(path, sizeof(path), "%s/eip191.json", dir) > 0);
    f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    size = ftell(f);
    assert_true(size > 0);
    rewind(f);
    buf = malloc((size_t)size + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)size, f), (size_t)size);
    buf[size] = '\0';
    fclose(f);
    doc = cJSON_Parse(buf);
    free(buf);
    assert_non_null(doc);
    return doc;
}

static const char *str_field(const cJSON *o, const char *name)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, name);

    assert_true(cJSON_IsString(it));
    return it->valuestring;
}

/* Decodes a vector's message_hex; the caller frees. */
static uint8_t *vector_message(const cJSON *v, size_t *len)
{
    const char *hex = str_field(v, "message_hex");
    size_t hlen = strlen(hex);
    uint8_t *msg = malloc(hlen / 2 + 1);
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(v, "message");

    assert_non_null(msg);
    assert_int_equal(hlen % 2, 0);
    assert_int_equal(util_hex_decode(hex, hlen, msg, hlen / 2), 0);
    *len = hlen / 2;
    /* The readable form, when given, is the same bytes (C strings stop at a
     * NUL, so only up to the first one). */
    if (cJSON_IsString(text)) {
        const uint8_t *nul = memchr(msg, 0, *len);
        size_t upto = nul != NULL ? (size_t)(nul - msg) : *len;
        assert_int_equal(strlen(text->valuestring), upto);
        assert_memory_equal(text->valuestring, msg, upto);
    } else {
        assert_true(cJSON_IsNull(text));
    }
    return msg;
}

static int setup_vectors(void **state)
{
    *state = load_vectors();
    return 0;
}

static int teardown_vectors(void **state)
{
    cJSON_Delete(*state);
    return 0;
}

static void check_vector(const cJSON *v)
{
    struct id_key k;
    size_t len;
    uint8_t *msg = vector_message(v, &len);
    const char *priv = str_field(v, "privkey");
    const char *their_sig = str_field(v, "signature");
    uint8_t sig[ID_SIG_LEN], their[ID_SIG_LEN], h[32], addr[ID_ADDR_LEN];
    char s[ID_SIG_STR_LEN + 1], a[ID_ADDR_STR_LEN + 1], hs[65];

    assert_int_equal(id_key_parse_hex(&k, priv, strlen(priv)), ID_OK);
    /* Our address equals theirs, in both forms. */
    id_addr_to_str(k.addr, a);
    assert_string_equal(a, str_field(v, "address"));
    id_addr_to_checksum(k.addr, a);
    assert_string_equal(a, str_field(v, "address_checksum"));
    /* Same EIP-191 hash. */
    id_eip191_hash(msg, len, h);
    util_hex_encode(h, sizeof(h), hs);
    assert_string_equal(hs, str_field(v, "hash") + 2);
    /* Our signature equals theirs byte for byte (RFC 6979, low s, v 27/28). */
    assert_int_equal(id_sign(&k, msg, len, sig), ID_OK);
    id_sig_to_str(sig, s);
    assert_string_equal(s, their_sig);
    /* Their signature verifies in ours, against either address form. */
    assert_int_equal(id_verify(msg, len, their_sig, strlen(their_sig), k.addr), ID_OK);
    assert_int_equal(id_addr_parse(str_field(v, "address_checksum"), ID_ADDR_STR_LEN, addr), ID_OK);
    assert_memory_equal(addr, k.addr, ID_ADDR_LEN);
    assert_int_equal(id_addr_parse(str_field(v, "address"), ID_ADDR_STR_LEN, addr), ID_OK);
    assert_memory_equal(addr, k.addr, ID_ADDR_LEN);
    assert_int_equal(id_sig_parse(their_sig, strlen(their_sig), their), ID_OK);
    assert_int_equal(id_recover(msg, len, their, addr), ID_OK);
    assert_memory_equal(addr, k.addr, ID_ADDR_LEN);

    /* Altering any signature byte makes verification fail. */
    for (size_t i = 0; i < ID_SIG_LEN; i++) {
        for (unsigned bit = 0; bit < 8; bit += 3) {
            uint8_t m[ID_SIG_LEN];
            memcpy(m, their, sizeof(m));
            m[i] ^= (uint8_t)(1u << bit);
            assert_int_not_equal(verify_bytes(msg, len, m, k.addr), ID_OK);
        }
    }
    /* Altering a message byte (up to 64 spread positions), dropping the last
     * byte or appending one makes it fail. */
    for (size_t n = 0; n < 64 && n < len; n++) {
        size_t i = len <= 64 ? n : n * (len - 1) / 63;
        msg[i] ^= 0x20;
        assert_int_not_equal(verify_bytes(msg, len, their, k.addr), ID_OK);
        msg[i] ^= 0x20;
    }
    if (len > 0)
        assert_int_not_equal(verify_bytes(msg, len - 1, their, k.addr), ID_OK);
    {
        uint8_t *longer = malloc(len + 1);
        assert_non_null(longer);
        memcpy(longer, msg, len);
        longer[len] = 0;
        assert_int_not_equal(verify_bytes(longer, len + 1, their, k.addr), ID_OK);
        free(longer);
    }
    /* Altering any address byte makes it fail with ID_E_MISMATCH. */
    for (size_t i = 0; i < ID_ADDR_LEN; i++) {
        memcpy(addr, k.addr, ID_ADDR_LEN);
        addr[i] ^= 0x01;
        assert_int_equal(verify_bytes(msg, len, their, addr), ID_E_MISMATCH);
    }
    /* Altering a private key byte changes address and signature. */
    {
        struct id_key k2;
        uint8_t p2[32];
        memcpy(p2, k.priv, 32);
        p2[31] ^= 0x01;
        if (id_key_from_priv(&k2, p2) == ID_OK) {
            assert_memory_not_equal(k2.addr, k.addr, ID_ADDR_LEN);
            assert_int_equal(id_sign(&k2, msg, len, sig), ID_OK);
            assert_memory_not_equal(sig, their, ID_SIG_LEN);
            assert_int_equal(verify_bytes(msg, len, sig, k.addr), ID_E_MISMATCH);
        }
        id_key_clear(&k2);
    }
    id_key_clear(&k);
    free(msg);
}

static void test_vectors(void **state)
{
    const cJSON *vs = cJSON_GetObjectItemCaseSensitive(*state, "vectors");
    const cJSON *v;
    int n = 0;
    bool v27 = false, v28 = false;

    assert_true(cJSON_IsArray(vs));
    cJSON_ArrayForEach(v, vs)
    {
        const char *sig = str_field(v, "signature");
        v27 |= strcmp(sig + ID_SIG_STR_LEN - 2, "1b") == 0;
        v28 |= strcmp(sig + ID_SIG_STR_LEN - 2, "1c") == 0;
        check_vector(v);
        n++;
    }
    assert_true(n >= 24);
    assert_true(v27 && v28);
}

/* The checker above really fails on a wrong vector: corrupt one copy. */
static void test_vectors_detect_corruption(void **state)
{
    const cJSON *v0 = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(*state, "vectors"), 1);
    cJSON *v = cJSON_Duplicate(v0, true);
    char sig[ID_SIG_STR_LEN + 1];
    struct id_key k;
    size_t len;
    uint8_t *msg;

    assert_non_null(v);
    assert_string_equal(str_field(v, "signature"), SOME_DATA_SIG);
    /* One hex digit of s changed: our fresh signature no longer matches it and
     * it no longer verifies. */
    memcpy(sig, SOME_DATA_SIG, sizeof(sig));
    sig[70] = sig[70] == '0' ? '1' : '0';
    msg = vector_message(v, &len);
    assert_int_equal(id_key_parse_hex(&k, WELL_KNOWN_PRIV, strlen(WELL_KNOWN_PRIV)), ID_OK);
    assert_int_not_equal(id_verify(msg, len, sig, ID_SIG_STR_LEN, k.addr), ID_OK);
    assert_int_equal(id_verify(msg, len, SOME_DATA_SIG, ID_SIG_STR_LEN, k.addr), ID_OK);
    free(msg);
    cJSON_Delete(v);
}

static void test_eip55_spec(void **state)
{
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(*state, "eip55");
    const cJSON *c;
    int n = 0;

    assert_true(cJSON_IsArray(cases));
    cJSON_ArrayForEach(c, cases)
    {
        const char *s = c->valuestring;
        uint8_t addr[ID_ADDR_LEN], again[ID_ADDR_LEN];
        char out[ID_ADDR_STR_LEN + 1], bad[ID_ADDR_STR_LEN + 1];
        int flips = 0;

        assert_int_equal(id_addr_parse(s, strlen(s), addr), ID_OK);
        id_addr_to_checksum(addr, out);
        assert_string_equal(out, s);
        /* Flipping the case of any one letter breaks the checksum. */
        for (size_t i = 2; i < ID_ADDR_STR_LEN; i++) {
            if (!((s[i] >= 'a' && s[i] <= 'f') || (s[i] >= 'A' && s[i] <= 'F')))
                continue;
            memcpy(bad, s, sizeof(bad));
            bad[i] ^= 0x20;
            assert_int_equal(id_addr_parse(bad, ID_ADDR_STR_LEN, again), ID_E_CHECKSUM);
            flips++;
        }
        assert_true(flips > 0);
        n++;
    }
    assert_int_equal(n, 8);
}

/* ---- addresses ---- */

static void test_addr_parse(void **state)
{
    static const char mixed[] = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
    static const char lower[] = "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed";
    static const char upper[] = "0x5AAEB6053F3E94C9B9A09F33669435E7EF1BEAED";
    uint8_t a[ID_ADDR_LEN], b[ID_ADDR_LEN];
    char s[ID_ADDR_STR_LEN + 1];

    assert_int_equal(id_addr_parse(mixed, sizeof(mixed) - 1, a), ID_OK);
    id_addr_to_str(a, s);
    assert_string_equal(s, lower);
    id_addr_to_checksum(a, s);
    assert_string_equal(s, mixed);
    assert_int_equal(id_addr_parse(lower, sizeof(lower) - 1, b), ID_OK);
    assert_memory_equal(a, b, ID_ADDR_LEN);
    assert_int_equal(id_addr_parse(upper, sizeof(upper) - 1, b), ID_OK);
    assert_memory_equal(a, b, ID_ADDR_LEN);
    /* One flipped letter case. */
    memcpy(s, mixed, sizeof(mixed));
    s[3] = 'A'; /* 0x5a... -> 0x5A... */
    assert_int_equal(id_addr_parse(s, ID_ADDR_STR_LEN, b), ID_E_CHECKSUM);
    /* A missing 0x is ID_E_HEX whatever the length; so is 0X. */
    assert_int_equal(id_addr_parse(lower + 2, ID_ADDR_STR_LEN - 2, b), ID_E_HEX);
    assert_int_equal(id_addr_parse("005aaeb6053f3e94c9b9a09f33669435e7ef1beaed", 42, b), ID_E_HEX);
    assert_int_equal(id_addr_parse("0X5aaeb6053f3e94c9b9a09f33669435e7ef1beaed", 42, b), ID_E_HEX);
    assert_int_equal(id_addr_parse("", 0, b), ID_E_HEX);
    assert_int_equal(id_addr_parse("0", 1, b), ID_E_HEX);
    /* Wrong length after a good prefix. */
    assert_int_equal(id_addr_parse("0x", 2, b), ID_E_LENGTH);
    assert_int_equal(id_addr_parse(lower, ID_ADDR_STR_LEN - 1, b), ID_E_LENGTH);
    assert_int_equal(id_addr_parse("0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed0", 43, b),
                     ID_E_LENGTH);
    /* Non-hex digit. */
    assert_int_equal(id_addr_parse("0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaeg", 42, b), ID_E_HEX);
    assert_int_equal(id_addr_parse("0x5aaeb6053f3e94c9b9a09f33669435e7ef1bea d", 42, b), ID_E_HEX);
    /* Documented order: a non-hex digit is ID_E_HEX even at a wrong length. */
    assert_int_equal(id_addr_parse("0xg", 3, b), ID_E_HEX);
    /* A failed parse leaves the output alone. */
    memset(b, 0xee, sizeof(b));
    assert_int_equal(id_addr_parse(s, ID_ADDR_STR_LEN, b), ID_E_CHECKSUM);
    for (size_t i = 0; i < ID_ADDR_LEN; i++)
        assert_int_equal(b[i], 0xee);
}

/* ---- signatures ---- */

struct sig_fixture {
    struct id_key k;
    uint8_t sig[ID_SIG_LEN]; /* "Some data" signed by the well-known key */
};

static void sig_fixture_init(struct sig_fixture *f)
{
    assert_int_equal(id_key_parse_hex(&f->k, WELL_KNOWN_PRIV, strlen(WELL_KNOWN_PRIV)), ID_OK);
    assert_int_equal(id_sig_parse(SOME_DATA_SIG, ID_SIG_STR_LEN, f->sig), ID_OK);
    assert_int_equal(f->sig[64], 28);
}

static void test_sig_v(void **state)
{
    struct sig_fixture f;
    uint8_t m[ID_SIG_LEN], addr[ID_ADDR_LEN];
    static const uint8_t bad_v[] = {2, 3, 26, 29, 30, 0x80, 0xff};

    sig_fixture_init(&f);
    /* v = 0/1 is accepted like 27/28. */
    memcpy(m, f.sig, sizeof(m));
    m[64] = 1;
    assert_int_equal(verify_bytes("Some data", 9, m, f.k.addr), ID_OK);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_OK);
    assert_memory_equal(addr, f.k.addr, ID_ADDR_LEN);
    /* The other recovery id recovers some other key. */
    m[64] = 0;
    assert_int_equal(verify_bytes("Some data", 9, m, f.k.addr), ID_E_MISMATCH);
    m[64] = 27;
    assert_int_equal(verify_bytes("Some data", 9, m, f.k.addr), ID_E_MISMATCH);
    for (size_t i = 0; i < sizeof(bad_v); i++) {
        m[64] = bad_v[i];
        assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_V);
        assert_int_equal(verify_bytes("Some data", 9, m, f.k.addr), ID_E_V);
    }
    /* v is checked before r and s. */
    memset(m, 0, 64);
    m[64] = 29;
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_V);
}

static void test_sig_low_v01(void **state)
{
    struct id_key k;
    uint8_t sig[ID_SIG_LEN];

    /* Our own v is 27/28; the same signature with v - 27 verifies. */
    assert_int_equal(id_key_generate(&k), ID_OK);
    for (int i = 0; i < 8; i++) {
        char msg[16];
        assert_true(util_snprintf(msg, sizeof(msg), "msg %d", i) > 0);
        assert_int_equal(id_sign(&k, msg, strlen(msg), sig), ID_OK);
        assert_true(sig[64] == 27 || sig[64] == 28);
        sig[64] -= 27;
        assert_int_equal(verify_bytes(msg, strlen(msg), sig, k.addr), ID_OK);
    }
    id_key_clear(&k);
}

static void test_sig_high_s(void **state)
{
    struct sig_fixture f;
    uint8_t m[ID_SIG_LEN], addr[ID_ADDR_LEN];

    sig_fixture_init(&f);
    /* (r, n - s) with v flipped is the same signature in malleable form. */
    memcpy(m, f.sig, sizeof(m));
    sub256(secp_n, f.sig + 32, m + 32);
    m[64] = f.sig[64] == 27 ? 28 : 27;
    assert_true(memcmp(m + 32, secp_half_n, 32) > 0);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_HIGH_S);
    assert_int_equal(verify_bytes("Some data", 9, m, f.k.addr), ID_E_HIGH_S);
    /* s = floor(n/2) is low (recovers something), floor(n/2) + 1 is high. */
    memcpy(m + 32, secp_half_n, 32);
    assert_int_not_equal(id_recover("Some data", 9, m, addr), ID_E_HIGH_S);
    inc256(m + 32);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_HIGH_S);
}

static void test_sig_range(void **state)
{
    struct sig_fixture f;
    uint8_t m[ID_SIG_LEN], addr[ID_ADDR_LEN];

    sig_fixture_init(&f);
    /* r = 0 */
    memcpy(m, f.sig, sizeof(m));
    memset(m, 0, 32);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_RANGE);
    assert_int_equal(verify_bytes("Some data", 9, m, f.k.addr), ID_E_RANGE);
    /* r = n, r = 2^256 - 1 */
    memcpy(m, secp_n, 32);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_RANGE);
    memset(m, 0xff, 32);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_RANGE);
    /* s = 0 */
    memcpy(m, f.sig, sizeof(m));
    memset(m + 32, 0, 32);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_RANGE);
    /* s = n, n + 1, 2^256 - 1: out of range, not merely high */
    memcpy(m + 32, secp_n, 32);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_RANGE);
    inc256(m + 32);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_RANGE);
    memset(m + 32, 0xff, 32);
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_RANGE);
    /* s = n - 1 is in range but high */
    memcpy(m + 32, secp_n, 32);
    m[63] -= 1;
    assert_int_equal(id_recover("Some data", 9, m, addr), ID_E_HIGH_S);
    /* r = n - 1, s = 1: in range; the x coordinate is not on the curve or
     * recovers another key, never ours. */
    memcpy(m, secp_n, 32);
    m[31] -= 1;
    memset(m + 32, 0, 32);
    m[63] = 1;
    assert_int_not_equal(verify_bytes("Some data", 9, m, f.k.addr), ID_OK);
}

static void test_sig_parse(void **state)
{
    struct sig_fixture f;
    uint8_t sig[ID_SIG_LEN];
    char s[ID_SIG_STR_LEN + 3];

    sig_fixture_init(&f);
    /* 64-byte signature (no v) and 66 bytes: ID_E_LENGTH. */
    assert_int_equal(id_sig_parse(SOME_DATA_SIG, ID_SIG_STR_LEN - 2, sig), ID_E_LENGTH);
    assert_int_equal(id_verify("Some data", 9, SOME_DATA_SIG, ID_SIG_STR_LEN - 2, f.k.addr),
                     ID_E_LENGTH);
    memcpy(s, SOME_DATA_SIG, ID_SIG_STR_LEN);
    memcpy(s + ID_SIG_STR_LEN, "00", 3);
    assert_int_equal(id_sig_parse(s, ID_SIG_STR_LEN + 2, sig), ID_E_LENGTH);
    assert_int_equal(id_sig_parse(s, ID_SIG_STR_LEN - 1, sig), ID_E_LENGTH);
    assert_int_equal(id_sig_parse("0x", 2, sig), ID_E_LENGTH);
    /* 'zz' in the hex, a space, a missing or capital 0X prefix: ID_E_HEX. */
    memcpy(s, SOME_DATA_SIG, ID_SIG_STR_LEN + 1);
    s[10] = 'z';
    s[11] = 'z';
    assert_int_equal(id_sig_parse(s, ID_SIG_STR_LEN, sig), ID_E_HEX);
    assert_int_equal(id_verify("Some data", 9, s, ID_SIG_STR_LEN, f.k.addr), ID_E_HEX);
    s[10] = ' ';
    assert_int_equal(id_sig_parse(s, ID_SIG_STR_LEN, sig), ID_E_HEX);
    assert_int_equal(id_sig_parse(SOME_DATA_SIG + 2, ID_SIG_STR_LEN - 2, sig), ID_E_HEX);
    memcpy(s, SOME_DATA_SIG, ID_SIG_STR_LEN + 1);
    s[1] = 'X';
    assert_int_equal(id_sig_parse(s, ID_SIG_STR_LEN, sig), ID_E_HEX);
    assert_int_equal(id_sig_parse("", 0, sig), ID_E_HEX);
    /* Documented order: a non-hex digit is ID_E_HEX even at a wrong length. */
    assert_int_equal(id_sig_parse("0xzz", 4, sig), ID_E_HEX);
    /* Uppercase hex digits are fine. */
    memcpy(s, SOME_DATA_SIG, ID_SIG_STR_LEN + 1);
    for (size_t i = 2; i < ID_SIG_STR_LEN; i++) {
        if (s[i] >= 'a' && s[i] <= 'f')
            s[i] = (char)(s[i] - 'a' + 'A');
    }
    assert_int_equal(id_sig_parse(s, ID_SIG_STR_LEN, sig), ID_OK);
    assert_memory_equal(sig, f.sig, ID_SIG_LEN);
    assert_int_equal(id_verify("Some data", 9, s, ID_SIG_STR_LEN, f.k.addr), ID_OK);
    /* Round trip. */
    id_sig_to_str(f.sig, s);
    assert_string_equal(s, SOME_DATA_SIG);
}

static void test_sign_deterministic_low_s(void **state)
{
    struct id_key k;
    uint8_t a[ID_SIG_LEN], b[ID_SIG_LEN], big[4096];

    memset(big, 'q', sizeof(big));
    assert_int_equal(id_key_generate(&k), ID_OK);
    for (size_t len = 0; len < 200; len++) {
        assert_int_equal(id_sign(&k, big, len, a), ID_OK);
        assert_int_equal(id_sign(&k, big, len, b), ID_OK);
        assert_memory_equal(a, b, ID_SIG_LEN);
        assert_true(memcmp(a + 32, secp_half_n, 32) <= 0);
        assert_true(a[64] == 27 || a[64] == 28);
        assert_int_equal(verify_bytes(big, len, a, k.addr), ID_OK);
    }
    /* NULL with length 0 is the empty message. */
    assert_int_equal(id_sign(&k, NULL, 0, b), ID_OK);
    assert_int_equal(id_sign(&k, big, 0, a), ID_OK);
    assert_memory_equal(a, b, ID_SIG_LEN);
    assert_int_equal(verify_bytes(NULL, 0, a, k.addr), ID_OK);
    id_key_clear(&k);
}

/* ---- keys ---- */

static void test_key_parse(void **state)
{
    struct id_key k, k2;
    char addr[ID_ADDR_STR_LEN + 1];
    static const char zero[] = "0000000000000000000000000000000000000000000000000000000000000000";
    static const char n[] = "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141";
    static const char n1[] = "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364140";
    static const char spaced[] =
        " \t\n4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318\r\n ";

    assert_int_equal(id_key_parse_hex(&k, WELL_KNOWN_PRIV, strlen(WELL_KNOWN_PRIV)), ID_OK);
    id_addr_to_checksum(k.addr, addr);
    assert_string_equal(addr, WELL_KNOWN_ADDR);
    assert_int_equal(k.pub[0], 0x04);
    assert_int_equal(id_key_parse_hex(&k2, spaced, strlen(spaced)), ID_OK);
    assert_memory_equal(&k, &k2, sizeof(k));
    assert_int_equal(id_key_parse_hex(&k2, WELL_KNOWN_PRIV + 2, 64), ID_OK);
    assert_memory_equal(&k, &k2, sizeof(k));
    /* Private key 1 has a famous address. */
    assert_int_equal(
        id_key_parse_hex(&k2, "0x0000000000000000000000000000000000000000000000000000000000000001",
                         66),
        ID_OK);
    id_addr_to_str(k2.addr, addr);
    assert_string_equal(addr, "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf");
    /* Range: 0 and n refused, n - 1 accepted. */
    assert_int_equal(id_key_parse_hex(&k2, zero, 64), ID_E_KEY);
    assert_int_equal(id_key_parse_hex(&k2, n, 64), ID_E_KEY);
    assert_int_equal(id_key_parse_hex(&k2, n1, 64), ID_OK);
    /* Lengths and digits. */
    assert_int_equal(id_key_parse_hex(&k2, n1, 63), ID_E_LENGTH);
    assert_int_equal(id_key_parse_hex(&k2, "0x", 2), ID_E_LENGTH);
    assert_int_equal(id_key_parse_hex(&k2, "", 0), ID_E_LENGTH);
    assert_int_equal(id_key_parse_hex(&k2, spaced, strlen(spaced) - 4), ID_E_LENGTH);
    assert_int_equal(
        id_key_parse_hex(&k2, "zz0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318",
                         64),
        ID_E_HEX);
    assert_int_equal(
        id_key_parse_hex(&k2, "4c08 3a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318",
                         64),
        ID_E_HEX);
    /* A refused key leaves the output untouched. */
    memcpy(&k2, &k, sizeof(k));
    assert_int_equal(id_key_parse_hex(&k2, zero, 64), ID_E_KEY);
    assert_memory_equal(&k, &k2, sizeof(k));
    id_key_clear(&k);
    id_key_clear(&k2);
}

static void test_key_generate(void **state)
{
    static const struct id_key zero;
    struct id_key a, b, c;

    assert_int_equal(id_key_generate(&a), ID_OK);
    assert_int_equal(id_key_generate(&b), ID_OK);
    assert_memory_not_equal(a.priv, b.priv, 32);
    assert_memory_not_equal(a.addr, b.addr, ID_ADDR_LEN);
    /* The derived fields match a re-derivation from priv, even in place. */
    assert_int_equal(id_key_from_priv(&c, a.priv), ID_OK);
    assert_memory_equal(&a, &c, sizeof(a));
    assert_int_equal(id_key_from_priv(&c, c.priv), ID_OK);
    assert_memory_equal(&a, &c, sizeof(a));
    id_key_clear(&a);
    assert_memory_equal(&a, &zero, sizeof(a));
    id_key_clear(&b);
    id_key_clear(&c);
}

static void test_strerror(void **state)
{
    static const int codes[] = {ID_OK,     ID_E_LENGTH,  ID_E_HEX,      ID_E_HIGH_S,   ID_E_RANGE,
                                ID_E_V,    ID_E_RECOVER, ID_E_MISMATCH, ID_E_CHECKSUM, ID_E_KEY,
                                ID_E_RAND, ID_E_IO,      ID_E_PERM};
    size_t n = sizeof(codes) / sizeof(codes[0]);

    for (size_t i = 0; i < n; i++) {
        assert_non_null(id_strerror(codes[i]));
        assert_string_not_equal(id_strerror(codes[i]), "unknown error");
        for (size_t j = 0; j < i; j++)
            assert_string_not_equal(id_strerror(codes[i]), id_strerror(codes[j]));
    }
    assert_string_equal(id_strerror(1), "unknown error");
    assert_string_equal(id_strerror(-13), "unknown error");
    assert_string_equal(id_strerror(INT_MIN), "unknown error");
}

/* ---- key files ---- */

struct tmpdir {
    char dir[PATH_MAX];
    char file[PATH_MAX];
};

static int setup_tmpdir(void **state)
{
    struct tmpdir *t = calloc(1, sizeof(*t));
    const char *base = getenv("TMPDIR");

    if (t == NULL)
        return -1;
    if (util_snprintf(t->dir, sizeof(t->dir), "%s/test_id.XXXXXX",
                      base != NULL && base[0] != '\0' ? base : "/tmp") < 0 ||
        mkdtemp(t->dir) == NULL ||
        util_snprintf(t->file, sizeof(t->file), "%s/agent.key", t->dir) < 0) {
        free(t);
        return -1;
    }
    *state = t;
    return 0;
}

static int teardown_tmpdir(void **state)
{
    struct tmpdir *t = *state;
    DIR *d = opendir(t->dir);
    struct dirent *e;
    char p[PATH_MAX];

    if (d != NULL) {
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            if (util_snprintf(p, sizeof(p), "%s/%s", t->dir, e->d_name) > 0 && unlink(p) != 0)
                rmdir(p);
        }
        closedir(d);
    }
    rmdir(t->dir);
    free(t);
    return 0;
}

static size_t count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    size_t n = 0;

    assert_non_null(d);
    while ((e = readdir(d)) != NULL)
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

static void write_file(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(chmod(path, mode), 0);
}

static void test_keyfile_roundtrip(void **state)
{
    struct tmpdir *t = *state;
    struct id_key k, r, k2;
    struct stat st;
    char err[512] = "";
    char buf[128];
    FILE *f;

    assert_int_equal(id_key_generate(&k), ID_OK);
    assert_int_equal(id_key_write(t->file, &k), ID_OK);
    assert_int_equal(stat(t->file, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0600);
    assert_int_equal(count_entries(t->dir), 1); /* no temp file left behind */
    /* Contents: 64 lowercase hex + newline. */
    f = fopen(t->file, "r");
    assert_non_null(f);
    assert_non_null(fgets(buf, sizeof(buf), f));
    fclose(f);
    assert_int_equal(strlen(buf), 65);
    assert_int_equal(buf[64], '\n');
    assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_OK);
    assert_memory_equal(&k, &r, sizeof(k));
    /* Overwriting replaces the key atomically, mode stays 0600. */
    assert_int_equal(id_key_generate(&k2), ID_OK);
    assert_int_equal(id_key_write(t->file, &k2), ID_OK);
    assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_OK);
    assert_memory_equal(&k2, &r, sizeof(k2));
    assert_int_equal(count_entries(t->dir), 1);
    /* 0400 is fine too. */
    assert_int_equal(chmod(t->file, 0400), 0);
    assert_int_equal(id_key_read(t->file, &r, NULL, 0), ID_OK);
    /* A relative path in the current directory works (dir fsync on "."). */
    {
        char cwd[PATH_MAX];
        assert_non_null(getcwd(cwd, sizeof(cwd)));
        assert_int_equal(chdir(t->dir), 0);
        assert_int_equal(id_key_write("rel.key", &k), ID_OK);
        assert_int_equal(id_key_read("rel.key", &r, err, sizeof(err)), ID_OK);
        assert_memory_equal(&k, &r, sizeof(k));
        assert_int_equal(unlink("rel.key"), 0);
        assert_int_equal(chdir(cwd), 0);
    }
    id_key_clear(&k);
    id_key_clear(&k2);
    id_key_clear(&r);
}

static void test_keyfile_perms(void **state)
{
    static const mode_t bad[] = {0644, 0640, 0604, 0660, 0606, 0610, 0601, 0666, 0777};
    struct tmpdir *t = *state;
    struct id_key k, r;
    char err[512];
    char want[PATH_MAX + 64];

    assert_int_equal(id_key_generate(&k), ID_OK);
    assert_int_equal(id_key_write(t->file, &k), ID_OK);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(chmod(t->file, bad[i]), 0);
        err[0] = '\0';
        assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_E_PERM);
        assert_non_null(strstr(err, t->file));
        assert_true(util_snprintf(want, sizeof(want), "chmod 600 %s", t->file) > 0);
        assert_non_null(strstr(err, want));
    }
    /* The ssh-like message, exactly. */
    assert_int_equal(chmod(t->file, 0644), 0);
    assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_E_PERM);
    assert_true(util_snprintf(want, sizeof(want),
                              "permissions 0644 for '%s' are too open; run: chmod 600 %s", t->file,
                              t->file) > 0);
    assert_string_equal(err, want);
    /* A short error buffer is truncated, still terminated. */
    assert_int_equal(id_key_read(t->file, &r, err, 8), ID_E_PERM);
    assert_int_equal(strlen(err), 7);
    assert_int_equal(chmod(t->file, 0600), 0);
    assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_OK);
    assert_memory_equal(&k, &r, sizeof(k));
    id_key_clear(&k);
    id_key_clear(&r);
}

static void test_keyfile_refused(void **state)
{
    struct tmpdir *t = *state;
    struct id_key r;
    char err[512];
    char p[PATH_MAX];

    /* A directory (even 0700) is not a key file. */
    assert_true(util_snprintf(p, sizeof(p), "%s/adir", t->dir) > 0);
    assert_int_equal(mkdir(p, 0700), 0);
    err[0] = '\0';
    assert_int_equal(id_key_read(p, &r, err, sizeof(err)), ID_E_PERM);
    assert_non_null(strstr(err, p));
    assert_non_null(strstr(err, "not a regular file"));
    assert_int_equal(rmdir(p), 0);
    /* A FIFO is refused without blocking. */
    assert_true(util_snprintf(p, sizeof(p), "%s/fifo", t->dir) > 0);
    assert_int_equal(mkfifo(p, 0600), 0);
    assert_int_equal(id_key_read(p, &r, err, sizeof(err)), ID_E_PERM);
    assert_int_equal(unlink(p), 0);
    /* Missing file: ID_E_IO with errno kept. */
    assert_true(util_snprintf(p, sizeof(p), "%s/missing.key", t->dir) > 0);
    errno = 0;
    assert_int_equal(id_key_read(p, &r, err, sizeof(err)), ID_E_IO);
    assert_int_equal(errno, ENOENT);
    assert_non_null(strstr(err, p));
    /* Contents that are not a key. */
    write_file(t->file, "not a key\n", 0600);
    assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_E_HEX);
    assert_non_null(strstr(err, t->file));
    write_file(t->file, "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f36231\n", 0600);
    assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_E_LENGTH);
    write_file(t->file, "", 0600);
    assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_E_LENGTH);
    {
        char big[1024];
        memset(big, ' ', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        /* A valid key followed by more whitespace than a key file may hold. */
        memcpy(big, WELL_KNOWN_PRIV, strlen(WELL_KNOWN_PRIV));
        write_file(t->file, big, 0600);
        assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_E_LENGTH);
    }
    /* Any file with 64 hex digits, optional 0x, is a key. */
    write_file(t->file, WELL_KNOWN_PRIV "\n", 0600);
    assert_int_equal(id_key_read(t->file, &r, err, sizeof(err)), ID_OK);
    {
        char addr[ID_ADDR_STR_LEN + 1];
        id_addr_to_checksum(r.addr, addr);
        assert_string_equal(addr, WELL_KNOWN_ADDR);
    }
    /* Writing into a missing directory fails with ID_E_IO and errno. */
    assert_true(util_snprintf(p, sizeof(p), "%s/nodir/agent.key", t->dir) > 0);
    errno = 0;
    assert_int_equal(id_key_write(p, &r), ID_E_IO);
    assert_int_equal(errno, ENOENT);
    id_key_clear(&r);
}

int main(void)
{
    const struct CMUnitTest vector_tests[] = {
        cmocka_unit_test(test_vectors),
        cmocka_unit_test(test_vectors_detect_corruption),
        cmocka_unit_test(test_eip55_spec),
    };
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_addr_parse),
        cmocka_unit_test(test_sig_v),
        cmocka_unit_test(test_sig_low_v01),
        cmocka_unit_test(test_sig_high_s),
        cmocka_unit_test(test_sig_range),
        cmocka_unit_test(test_sig_parse),
        cmocka_unit_test(test_sign_deterministic_low_s),
        cmocka_unit_test(test_key_parse),
        cmocka_unit_test(test_key_generate),
        cmocka_unit_test(test_strerror),
        cmocka_unit_test_setup_teardown(test_keyfile_roundtrip, setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_keyfile_perms, setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_keyfile_refused, setup_tmpdir, teardown_tmpdir),
    };
    int failed = 0;

    failed += cmocka_run_group_tests_name("vectors", vector_tests, setup_vectors, teardown_vectors);
    failed += cmocka_run_group_tests_name("id", tests, NULL, NULL);
    return failed;
}
