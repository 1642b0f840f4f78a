/* Keccak-256 as Ethereum uses it: the original Keccak submission's padding
 * (0x01 ... 0x80), not FIPS 202 SHA3-256's (0x06). OpenSSL 3.0 has no Keccak.
 * One-shot keccak256() plus an incremental context; no state of its own. */
#ifndef KECCAK_H
#define KECCAK_H

#include <stddef.h>
#include <stdint.h>

#define KECCAK256_LEN 32
#define KECCAK256_RATE 136 /* bytes absorbed per permutation: 1600 - 2 * 256 bits */

/* An incremental Keccak-256 hash. Plain data on the caller's stack. */
struct keccak_ctx {
    uint64_t st[25]; /* the 5x5 lane state, lane i = st[x + 5 * y] */
    size_t pos;      /* bytes absorbed into the current block, < KECCAK256_RATE */
};

/* Starts a Keccak-256 hash. */
void keccak_init(struct keccak_ctx *c);

/* Absorbs len bytes (len 0 allowed, in may then be NULL). */
void keccak_update(struct keccak_ctx *c, const void *in, size_t len);

/* Pads, writes the 32-byte digest to out and wipes the context; call
 * keccak_init() again before reusing it. */
void keccak_final(struct keccak_ctx *c, uint8_t out[KECCAK256_LEN]);

/* keccak256 of len bytes at in, in one call. */
void keccak256(const void *in, size_t len, uint8_t out[KECCAK256_LEN]);

#endif
