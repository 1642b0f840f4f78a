/* Agent identities: secp256k1 keys, Ethereum-style addresses (with EIP-55),
 * EIP-191 personal_sign signing and verification by public-key recovery, and
 * owner-only key files. Stateless: every function is safe to call from any
 * event loop. Verification never trusts a claimed public key. */
#ifndef ID_H
#define ID_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ID_ADDR_LEN 20
#define ID_ADDR_STR_LEN 42 /* "0x" + 40 hex, without the NUL */
#define ID_SIG_LEN 65      /* r || s || v */
#define ID_SIG_STR_LEN 132 /* "0x" + 130 hex, without the NUL */

/* Errors; id_strerror() gives a stable short message for each. */
enum id_err {
    ID_OK = 0,
    ID_E_LENGTH = -1,   /* wrong length (signature, address, key) */
    ID_E_HEX = -2,      /* not hex, or missing 0x where required */
    ID_E_HIGH_S = -3,   /* s > n/2 (malleable form) */
    ID_E_RANGE = -4,    /* r or s zero or >= n */
    ID_E_V = -5,        /* v not in {0, 1, 27, 28} */
    ID_E_RECOVER = -6,  /* no public key recovers from the signature */
    ID_E_MISMATCH = -7, /* recovered address differs from the expected one */
    ID_E_CHECKSUM = -8, /* mixed-case address with a wrong EIP-55 checksum */
    ID_E_KEY = -9,      /* private key zero or >= n */
    ID_E_RAND = -10,    /* CSPRNG failure */
    ID_E_IO = -11,      /* key file could not be read or written (errno kept) */
    ID_E_PERM = -12,    /* key file readable by group or others */
};

/* A key pair with its address. Plain data; id_key_clear() wipes it. */
struct id_key {
    uint8_t priv[32];
    uint8_t pub[65]; /* uncompressed, 0x04 || X || Y */
    uint8_t addr[ID_ADDR_LEN];
};

const char *id_strerror(int err);

/* New key from the OS CSPRNG. Returns ID_OK, ID_E_RAND. */
int id_key_generate(struct id_key *k);

/* Key from 32 raw bytes. Returns ID_OK, ID_E_KEY, or ID_E_RAND if the CSPRNG
 * fails to seed libsecp256k1's side-channel blinding. */
int id_key_from_priv(struct id_key *k, const uint8_t priv[32]);

/* Key from 64 hex digits, optional 0x, surrounding whitespace ignored.
 * Returns ID_OK, ID_E_HEX, ID_E_LENGTH, ID_E_KEY (or ID_E_RAND, as above). */
int id_key_parse_hex(struct id_key *k, const char *s, size_t len);

/* OPENSSL_cleanse() the whole struct. */
void id_key_clear(struct id_key *k);

/* "0x" + 40 lowercase hex + NUL into out. */
void id_addr_to_str(const uint8_t addr[ID_ADDR_LEN], char out[ID_ADDR_STR_LEN + 1]);

/* EIP-55 mixed-case form + NUL into out. */
void id_addr_to_checksum(const uint8_t addr[ID_ADDR_LEN], char out[ID_ADDR_STR_LEN + 1]);

/* Parses "0x" + 40 hex. All-lowercase and all-uppercase are accepted as
 * they are; mixed case must be a valid EIP-55 checksum. Checked in this
 * order: a missing "0x" (lowercase x) is ID_E_HEX whatever the length, then
 * a non-hex digit ID_E_HEX, then a wrong length ID_E_LENGTH.
 * Returns ID_OK, ID_E_LENGTH, ID_E_HEX, ID_E_CHECKSUM. */
int id_addr_parse(const char *s, size_t len, uint8_t addr[ID_ADDR_LEN]);

/* keccak256("\x19Ethereum Signed Message:\n" + decimal len + msg). */
void id_eip191_hash(const void *msg, size_t len, uint8_t out[32]);

/* EIP-191 personal_sign: deterministic (RFC 6979), low-s, v = 27 or 28.
 * Returns ID_OK, ID_E_KEY, ID_E_RAND (blinding seed, as above), or ID_E_RANGE
 * if R.x >= n, which v cannot express (probability about 2^-127). */
int id_sign(const struct id_key *k, const void *msg, size_t len, uint8_t sig[ID_SIG_LEN]);

/* "0x" + 130 lowercase hex + NUL into out. */
void id_sig_to_str(const uint8_t sig[ID_SIG_LEN], char out[ID_SIG_STR_LEN + 1]);

/* Parses "0x" + 130 hex (either case), same order of checks as
 * id_addr_parse(). Returns ID_OK, ID_E_LENGTH, ID_E_HEX. */
int id_sig_parse(const char *s, size_t len, uint8_t sig[ID_SIG_LEN]);

/* Recovers the signer's address of an EIP-191 signature over msg.
 * Checks v, then r and s ranges, then rejects s > n/2, in that order.
 * Returns ID_OK, ID_E_V, ID_E_RANGE, ID_E_HIGH_S, ID_E_RECOVER. */
int id_recover(const void *msg, size_t len, const uint8_t sig[ID_SIG_LEN],
               uint8_t addr[ID_ADDR_LEN]);

/* Parses sig_str and verifies that it is addr's signature over msg.
 * Returns ID_OK, any id_sig_parse() or id_recover() error, ID_E_MISMATCH. */
int id_verify(const void *msg, size_t len, const char *sig_str, size_t sig_len,
              const uint8_t addr[ID_ADDR_LEN]);

/* Writes the private key as 64 hex + "\n" to path: created 0600 in the same
 * directory as a temp file, fsync'd, renamed over path, directory fsync'd.
 * Returns ID_OK or ID_E_IO (errno kept). */
int id_key_write(const char *path, const struct id_key *k);

/* Reads a key file written by id_key_write() (or any file holding 64 hex
 * digits, optional 0x). Refuses, with ID_E_PERM, a file that group or others
 * can read or write (like ssh, any group/other mode bit), and a file that is
 * not a regular file (symbolic links are followed). On failure err
 * gets one line naming the file and the fix (e.g. "chmod 600 FILE").
 * Returns ID_OK, ID_E_IO, ID_E_PERM, or a parse error. */
int id_key_read(const char *path, struct id_key *k, char *err, size_t errlen);

#endif
