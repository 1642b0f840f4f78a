/* Small helpers shared by both programs: byte views, strict number parsing,
 * hex, monotonic and wall clocks, and the CSPRNG. No state of its own. */
#ifndef UTIL_H
#define UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A borrowed byte range; never owns its memory. */
struct iov {
    const char *base;
    size_t len;
};

#define IOV_LIT(s) ((struct iov){(s), sizeof(s) - 1})

/* Parses a whole decimal string into a uint64_t. Rejects empty input, signs,
 * spaces, trailing garbage and overflow. Returns 0 or -1. */
int util_parse_u64(const char *s, size_t len, uint64_t *out);

/* Like util_parse_u64 for a NUL-terminated string, bounded by max. */
int util_parse_uint(const char *s, uint64_t max, uint64_t *out);

/* Lowercase hex of len bytes into out (2*len+1 bytes, NUL-terminated). */
void util_hex_encode(const uint8_t *in, size_t len, char *out);

/* Decodes exactly 2*outlen hex digits (either case) into out.
 * Returns 0, or -1 on a wrong length or a non-hex digit. */
int util_hex_decode(const char *in, size_t inlen, uint8_t *out, size_t outlen);

/* True if c is [0-9a-fA-F]. */
bool util_is_hex_digit(int c);
/* The value of a hex digit (either case), or -1. */
int util_hex_val(int c);

/* Fills buf from the OS CSPRNG (OpenSSL RAND_bytes). Returns 0 or -1. */
int util_rand_bytes(uint8_t *buf, size_t len);

/* A random RFC 4122 version-4 UUID as 36 lowercase characters + NUL.
 * Returns 0 or -1. */
int util_uuid4(char out[37]);

/* Milliseconds from CLOCK_MONOTONIC. */
uint64_t util_mono_ms(void);

/* Wall clock in milliseconds (claim times shared between nodes, gw_rds). */
uint64_t util_unix_ms(void);

/* Seconds since the Unix epoch (CLOCK_REALTIME). */
int64_t util_unix_time(void);

/* Case-insensitive compare of two byte ranges (ASCII). */
bool util_iov_ieq(struct iov a, struct iov b);

/* Case-insensitive compare of a byte range and a C string (ASCII). */
bool util_iov_ieq_str(struct iov a, const char *s);

/* The next element of a comma-separated field value (RFC 9110 5.6.1) into
 * item, without surrounding spaces and tabs, and list moved past it; empty
 * elements are returned too (item->len 0). False once list is used up. */
bool util_list_next(struct iov *list, struct iov *item);

/* UTF-8 as RFC 3629 has it (no overlong forms, surrogates or code points past
 * U+10FFFF). util_utf8_seq: the length of the well-formed sequence at p
 * (1..4), or, if it is ill-formed, minus the length of its maximal subpart
 * (Unicode 15 section 3.9, as the WHATWG decoder replaces each with one
 * U+FFFD); n >= 1. util_utf8_check: 0 if all of p[0..n) is UTF-8, 1 if it is
 * up to an incomplete sequence at the very end (*ok_len: the bytes before it;
 * ok_len may be NULL), -1 if not. util_utf8_valid: the whole of it is. */
int util_utf8_seq(const unsigned char *p, size_t n);
int util_utf8_check(const uint8_t *p, size_t n, size_t *ok_len);
bool util_utf8_valid(const uint8_t *p, size_t n);

/* snprintf that returns -1 on error or truncation, else the length. */
int util_snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Tunes glibc malloc for a long-lived streaming server; call once at the start
 * of main. Body bytes pass through short-lived 16-256 KiB buffers; with the
 * defaults, glibc hands such blocks back to the kernel (mmap, or trimming the
 * heap top) and the next one page-faults its memory in again. This keeps
 * freed memory up to a few MiB for reuse (RSS stays within that bound). */
void util_malloc_tune(void);

struct event_base;

/* A new event base for a server loop: epoll's change list on, so a write
 * event added and deleted within one loop iteration (a connection that keeps
 * data flowing) costs no epoll_ctl(2). Safe because no socket of ours is ever
 * dup()ed. NULL on failure. */
struct event_base *util_event_base_new(void);

#endif
