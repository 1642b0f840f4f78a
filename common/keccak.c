/* Keccak-256 (original padding) for addresses and EIP-191 hashes; see keccak.h.
 * Lanes are loaded and stored little-endian byte by byte, so the code does
 * not depend on the host's byte order. */
#include "keccak.h"

#include <string.h>

#include <openssl/crypto.h>

#define KECCAK_ROUNDS 24

/* Keccak reference, "The Keccak reference" 3.0, section 1.2: iota's round
 * constants, rho's rotation offsets and pi's lane order (walked from lane 1). */
static const uint64_t keccak_rc[KECCAK_ROUNDS] = {
    0x0000000000000001ULL, 0x0000000000008082ULL, 0x800000000000808aULL, 0x8000000080008000ULL,
    0x000000000000808bULL, 0x0000000080000001ULL, 0x8000000080008081ULL, 0x8000000000008009ULL,
    0x000000000000008aULL, 0x0000000000000088ULL, 0x0000000080008009ULL, 0x000000008000000aULL,
    0x000000008000808bULL, 0x800000000000008bULL, 0x8000000000008089ULL, 0x8000000000008003ULL,
    0x8000000000008002ULL, 0x8000000000000080ULL, 0x000000000000800aULL, 0x800000008000000aULL,
    0x8000000080008081ULL, 0x8000000000008080ULL, 0x0000000080000001ULL, 0x8000000080008008ULL,
};

static const unsigned keccak_rotc[24] = {
    1, 3, 6, 10, 15, 21, 28, 36, 45, 55, 2, 14, 27, 41, 56, 8, 25, 43, 62, 18, 39, 61, 20, 44,
};

static const unsigned keccak_piln[24] = {
    10, 7, 11, 17, 18, 3, 5, 16, 8, 21, 24, 4, 15, 23, 19, 13, 12, 2, 20, 14, 22, 9, 6, 1,
};

static uint64_t rotl64(uint64_t v, unsigned n)
{
    return (v << n) | (v >> (64 - n)); /* n is 1..63 here */
}

/* Keccak-f[1600]. */
static void keccak_f(uint64_t st[25])
{
    uint64_t bc[5];
    uint64_t t;

    for (int round = 0; round < KECCAK_ROUNDS; round++) {
        /* theta */
        for (int i = 0; i < 5; i++)
            bc[i] = st[i] ^ st[i + 5] ^ st[i + 10] ^ st[i + 15] ^ st[i + 20];
        for (int i = 0; i < 5; i++) {
            t = bc[(i + 4) % 5] ^ rotl64(bc[(i + 1) % 5], 1);
            for (int j = 0; j < 25; j += 5)
                st[j + i] ^= t;
        }
        /* rho and pi */
        t = st[1];
        for (int i = 0; i < 24; i++) {
            unsigned j = keccak_piln[i];
            uint64_t next = st[j];
            st[j] = rotl64(t, keccak_rotc[i]);
            t = next;
        }
        /* chi */
        for (int j = 0; j < 25; j += 5) {
            for (int i = 0; i < 5; i++)
                bc[i] = st[j + i];
            for (int i = 0; i < 5; i++)
                st[j + i] ^= ~bc[(i + 1) % 5] & bc[(i + 2) % 5];
        }
        /* iota */
        st[0] ^= keccak_rc[round];
    }
}

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;

    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

void keccak_init(struct keccak_ctx *c)
{
    memset(c, 0, sizeof(*c));
}

void keccak_update(struct keccak_ctx *c, const void *in, size_t len)
{
    const uint8_t *p = in;

    /* Finish a partial block byte by byte. */
    while (len > 0 && c->pos != 0) {
        c->st[c->pos / 8] ^= (uint64_t)*p << (8 * (c->pos % 8));
        p++;
        len--;
        c->pos++;
        if (c->pos == KECCAK256_RATE) {
            keccak_f(c->st);
            c->pos = 0;
        }
    }
    /* Whole blocks a lane at a time. */
    while (len >= KECCAK256_RATE) {
        for (size_t i = 0; i < KECCAK256_RATE / 8; i++)
            c->st[i] ^= load_le64(p + 8 * i);
        keccak_f(c->st);
        p += KECCAK256_RATE;
        len -= KECCAK256_RATE;
    }
    /* The tail starts a new partial block (pos is 0 here if len > 0). */
    for (; len > 0; p++, len--) {
        c->st[c->pos / 8] ^= (uint64_t)*p << (8 * (c->pos % 8));
        c->pos++;
    }
}

void keccak_final(struct keccak_ctx *c, uint8_t out[KECCAK256_LEN])
{
    /* pad10*1 with Keccak's domain byte 0x01 (SHA3 would use 0x06). When
     * pos == RATE - 1 both bits land in the same byte: 0x81. */
    c->st[c->pos / 8] ^= (uint64_t)0x01 << (8 * (c->pos % 8));
    c->st[(KECCAK256_RATE - 1) / 8] ^= (uint64_t)0x80 << (8 * ((KECCAK256_RATE - 1) % 8));
    keccak_f(c->st);
    for (size_t i = 0; i < KECCAK256_LEN; i++)
        out[i] = (uint8_t)(c->st[i / 8] >> (8 * (i % 8)));
    /* The state can hold secrets hashed by a caller (key material). */
    OPENSSL_cleanse(c, sizeof(*c));
}

void keccak256(const void *in, size_t len, uint8_t out[KECCAK256_LEN])
{
    struct keccak_ctx c;

    keccak_init(&c);
    keccak_update(&c, in, len);
    keccak_final(&c, out);
}
