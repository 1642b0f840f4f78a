/* Unit tests for common/keccak: known answers (expected digests computed with
 * pycryptodome's Crypto.Hash.keccak, digest_bits=256, and published values
 * for "" "abc" and the fox), every block-boundary length, and incremental
 * updates split at every offset across 136-byte blocks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "keccak.h"
#include "util.h"

/* The test pattern: byte i is (i * 31 + 7) mod 256. */
static void pattern(uint8_t *buf, size_t len)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(i * 31 + 7);
}

static void assert_digest(const uint8_t got[KECCAK256_LEN], const char *want_hex)
{
    char hex[2 * KECCAK256_LEN + 1];

    util_hex_encode(got, KECCAK256_LEN, hex);
    assert_string_equal(hex, want_hex);
}

static void test_published(void **state)
{
    static const char fox[] = "The quick brown fox jumps over the lazy dog";
    uint8_t d[KECCAK256_LEN];

    keccak256("", 0, d);
    assert_digest(d, "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
    /* NULL with length 0 is allowed. */
    keccak256(NULL, 0, d);
    assert_digest(d, "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
    keccak256("abc", 3, d);
    assert_digest(d, "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45");
    keccak256(fox, sizeof(fox) - 1, d);
    assert_digest(d, "4d741b6f1eb29cb2a9b9911c82f56fa8d73b04959d3d9d222895df6c0b28aa15");
}

static const struct {
    size_t len;
    const char *hex;
} pattern_vectors[] = {
    {0, "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"},
    {1, "ee2a4bc7db81da2b7164e56b3649b1e2a09c58c455b15dabddd9146c7582cebc"},
    {2, "11142b44fdf76f1d4ee1c17b439c667139ada3ab64ad505873555fcb29bc1e69"},
    {7, "924099220dce70b94ce3067683548ea0cfd74b7ecd1c2fe3167eb40efe2192fd"},
    {8, "6e97170ea1143bd6c3e98bbbe2c8337f480a0a890e7c75d6c044d42944afcf67"},
    {9, "29fe55d7b6fd96d534132ab2f62fc53827d2af29e14f53953b74412d4a4d7936"},
    {135, "adee8145bb33dc0320ad44945eeeb391e4668f0f7c69ccbbf6550a7cba245e52"},
    {136, "eaccfc5aa7bf6bf1941809ef7cc9ee6a2fa306a7dd1de3f2e8504849b0a5e3c4"},
    {137, "ea0e0b9657469f0b4f53604f1068ab4bd4a5e7b0a458d24a78f1fe2ec7bd4db0"},
    {271, "407871b419dca15e033dd9777154af2116326a7849eacadbc46b1618055ee0a2"},
    {272, "c62d6a60780d4e03408834062e58004a549cff1c7487c0b9a130810621b0fcae"},
    {273, "b47ca693c8d675afa3b0b644da6dc96613f07c6f8971f9a0077ed6b7c994561d"},
    {275, "81e22e9b8be3b2a923374fc87073ab8e3560167f068072c81c4c35d70c940f1a"},
    {413, "5f0eba9977e47ed79c3b46665aa9c29a898fc4a96633f29f35d4f56597d55147"},
    {1000, "c77d9bffcae9f0984e6dff7eea63cc14cad5f367f791e27b08a1953f192f30a5"},
    {1u << 20, "83fbd18d9728845e498651fec13794b23c201f437c9efff4717306cec4305ed7"},
};

static void test_pattern_lengths(void **state)
{
    uint8_t *buf = malloc(1u << 20);
    uint8_t d[KECCAK256_LEN];

    assert_non_null(buf);
    pattern(buf, 1u << 20);
    for (size_t i = 0; i < sizeof(pattern_vectors) / sizeof(pattern_vectors[0]); i++) {
        keccak256(buf, pattern_vectors[i].len, d);
        assert_digest(d, pattern_vectors[i].hex);
    }
    free(buf);
}

static void test_one_mib_a(void **state)
{
    uint8_t *buf = malloc(1u << 20);
    uint8_t d[KECCAK256_LEN];
    struct keccak_ctx c;

    assert_non_null(buf);
    memset(buf, 'a', 1u << 20);
    keccak256(buf, 1u << 20, d);
    assert_digest(d, "f5f3e54ad3d703f8e9edfd7ce79341b1d9286a692fa6c13ff13ee6ea94dbf97d");
    /* The same in odd-sized pieces that straddle every block phase. */
    keccak_init(&c);
    for (size_t off = 0; off < 1u << 20;) {
        size_t n = (1u << 20) - off < 1009 ? (1u << 20) - off : 1009;
        keccak_update(&c, buf + off, n);
        off += n;
    }
    keccak_final(&c, d);
    assert_digest(d, "f5f3e54ad3d703f8e9edfd7ce79341b1d9286a692fa6c13ff13ee6ea94dbf97d");
    free(buf);
}

/* 413 = 3 * 136 + 5 bytes split in two at every offset, plus empty updates. */
static void test_split_two(void **state)
{
    uint8_t buf[413];
    uint8_t d[KECCAK256_LEN];
    struct keccak_ctx c;

    pattern(buf, sizeof(buf));
    for (size_t s = 0; s <= sizeof(buf); s++) {
        keccak_init(&c);
        keccak_update(&c, buf, s);
        keccak_update(&c, NULL, 0);
        keccak_update(&c, buf + s, sizeof(buf) - s);
        keccak_final(&c, d);
        assert_digest(d, "5f0eba9977e47ed79c3b46665aa9c29a898fc4a96633f29f35d4f56597d55147");
    }
}

/* 275 = 2 * 136 + 3 bytes split in three at every pair of offsets. */
static void test_split_three(void **state)
{
    static const char want[] = "81e22e9b8be3b2a923374fc87073ab8e3560167f068072c81c4c35d70c940f1a";
    uint8_t buf[275];
    uint8_t d[KECCAK256_LEN];
    char hex[2 * KECCAK256_LEN + 1];
    struct keccak_ctx c;

    pattern(buf, sizeof(buf));
    for (size_t a = 0; a <= sizeof(buf); a++) {
        for (size_t b = a; b <= sizeof(buf); b++) {
            keccak_init(&c);
            keccak_update(&c, buf, a);
            keccak_update(&c, buf + a, b - a);
            keccak_update(&c, buf + b, sizeof(buf) - b);
            keccak_final(&c, d);
            util_hex_encode(d, sizeof(d), hex);
            /* Checked without cmocka's per-call overhead; fails loudly below. */
            if (strcmp(hex, want) != 0) {
                print_error("split %zu/%zu\n", a, b);
                assert_string_equal(hex, want);
            }
        }
    }
}

static void test_byte_at_a_time(void **state)
{
    uint8_t buf[413];
    uint8_t d[KECCAK256_LEN];
    struct keccak_ctx c;

    pattern(buf, sizeof(buf));
    keccak_init(&c);
    for (size_t i = 0; i < sizeof(buf); i++)
        keccak_update(&c, buf + i, 1);
    keccak_final(&c, d);
    assert_digest(d, "5f0eba9977e47ed79c3b46665aa9c29a898fc4a96633f29f35d4f56597d55147");
}

/* A context is reusable after keccak_init(), and final wipes it. */
static void test_reuse(void **state)
{
    static const uint8_t zero[sizeof(struct keccak_ctx)];
    struct keccak_ctx c;
    uint8_t d[KECCAK256_LEN];

    keccak_init(&c);
    keccak_update(&c, "abc", 3);
    keccak_final(&c, d);
    assert_memory_equal(&c, zero, sizeof(c));
    keccak_init(&c);
    keccak_final(&c, d);
    assert_digest(d, "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_published),   cmocka_unit_test(test_pattern_lengths),
        cmocka_unit_test(test_one_mib_a),   cmocka_unit_test(test_split_two),
        cmocka_unit_test(test_split_three), cmocka_unit_test(test_byte_at_a_time),
        cmocka_unit_test(test_reuse),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
