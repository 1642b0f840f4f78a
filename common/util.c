/* Small helpers shared by both programs; see util.h. */
#include "util.h"

#include <malloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <openssl/rand.h>

int util_parse_u64(const char *s, size_t len, uint64_t *out)
{
    uint64_t v = 0;

    if (s == NULL || len == 0)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

int util_parse_uint(const char *s, uint64_t max, uint64_t *out)
{
    uint64_t v;

    if (s == NULL || util_parse_u64(s, strlen(s), &v) != 0 || v > max)
        return -1;
    *out = v;
    return 0;
}

void util_hex_encode(const uint8_t *in, size_t len, char *out)
{
    static const char digits[] = "0123456789abcdef";

    for (size_t i = 0; i < len; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 0x0f];
    }
    out[2 * len] = '\0';
}

int util_hex_val(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

bool util_is_hex_digit(int c)
{
    return util_hex_val(c) >= 0;
}

int util_hex_decode(const char *in, size_t inlen, uint8_t *out, size_t outlen)
{
    if (inlen != 2 * outlen)
        return -1;
    for (size_t i = 0; i < outlen; i++) {
        int hi = util_hex_val((unsigned char)in[2 * i]);
        int lo = util_hex_val((unsigned char)in[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

int util_rand_bytes(uint8_t *buf, size_t len)
{
    while (len > 0) {
        int n = len > 1 << 20 ? 1 << 20 : (int)len;
        if (RAND_bytes(buf, n) != 1)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

int util_uuid4(char out[37])
{
    uint8_t b[16];
    char hex[33];

    if (util_rand_bytes(b, sizeof(b)) != 0)
        return -1;
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40); /* version 4 */
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    util_hex_encode(b, sizeof(b), hex);
    memcpy(out, hex, 8);
    out[8] = '-';
    memcpy(out + 9, hex + 8, 4);
    out[13] = '-';
    memcpy(out + 14, hex + 12, 4);
    out[18] = '-';
    memcpy(out + 19, hex + 16, 4);
    out[23] = '-';
    memcpy(out + 24, hex + 20, 12);
    out[36] = '\0';
    return 0;
}

uint64_t util_mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t util_unix_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int64_t util_unix_time(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec;
}

static int ascii_lower(int c)
{
    return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c;
}

bool util_iov_ieq(struct iov a, struct iov b)
{
    if (a.len != b.len)
        return false;
    for (size_t i = 0; i < a.len; i++) {
        if (ascii_lower((unsigned char)a.base[i]) != ascii_lower((unsigned char)b.base[i]))
            return false;
    }
    return true;
}

bool util_iov_ieq_str(struct iov a, const char *s)
{
    return util_iov_ieq(a, (struct iov){s, strlen(s)});
}

int util_snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= size)
        return -1;
    return n;
}

void util_malloc_tune(void)
{
    /* Fixed thresholds also turn off glibc's dynamic mmap threshold. */
    (void)mallopt(M_MMAP_THRESHOLD, 1024 * 1024);
    (void)mallopt(M_TRIM_THRESHOLD, 8 * 1024 * 1024);
}

struct event_base *util_event_base_new(void)
{
    struct event_config *cfg = event_config_new();
    struct event_base *base;

    if (cfg == NULL)
        return NULL;
    (void)event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    return base;
}

bool util_list_next(struct iov *list, struct iov *item)
{
    size_t i = 0;

    if (list->len == 0)
        return false;
    while (i < list->len && list->base[i] != ',')
        i++;
    *item = (struct iov){list->base, i};
    while (item->len > 0 && (item->base[0] == ' ' || item->base[0] == '\t')) {
        item->base++;
        item->len--;
    }
    while (item->len > 0 && (item->base[item->len - 1] == ' ' || item->base[item->len - 1] == '\t'))
        item->len--;
    if (i < list->len)
        i++; /* the comma */
    list->base += i;
    list->len -= i;
    return true;
}

int util_utf8_seq(const unsigned char *p, size_t n)
{
    unsigned char c = p[0];
    unsigned char lo = 0x80, hi = 0xbf;
    int need;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        need = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
        need = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else {
        return -1;
    }
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= n || p[i] < lo || p[i] > hi)
            return -i;
        lo = 0x80;
        hi = 0xbf;
    }
    return need;
}

int util_utf8_check(const uint8_t *p, size_t n, size_t *ok_len)
{
    size_t i = 0;

    while (i < n) {
        uint64_t v;
        int k;
        if (n - i >= 8) {
            memcpy(&v, p + i, 8);
            if ((v & 0x8080808080808080ull) == 0) {
                i += 8;
                continue;
            }
        }
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        k = util_utf8_seq(p + i, n - i);
        if (k > 0) {
            i += (size_t)k;
            continue;
        }
        /* cut by the end of the buffer: a lead byte whose followers so far fit */
        if ((size_t)-k == n - i && p[i] >= 0xc2 && p[i] <= 0xf4) {
            if (ok_len != NULL)
                *ok_len = i;
            return 1;
        }
        return -1;
    }
    if (ok_len != NULL)
        *ok_len = n;
    return 0;
}

bool util_utf8_valid(const uint8_t *p, size_t n) { return util_utf8_check(p, n, NULL) == 0; }
