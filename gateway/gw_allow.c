/* Allow list; see gw_allow.h. A sorted array searched with bsearch. */
#include "gw_allow.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

struct gw_allow {
    uint8_t (*addrs)[ID_ADDR_LEN]; /* owned, sorted, unique */
    size_t n;
};

static int cmp_addr(const void *a, const void *b)
{
    return memcmp(a, b, ID_ADDR_LEN);
}

struct gw_allow *gw_allow_load(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "re");
    struct gw_allow *a;
    char line[512];
    size_t cap = 0;
    unsigned lineno = 0;

    if (f == NULL) {
        util_snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    a = calloc(1, sizeof(*a));
    if (a == NULL)
        goto fail_file;
    while (fgets(line, sizeof(line), f) != NULL) {
        char *s = line;
        size_t len;
        lineno++;
        if (strchr(line, '\n') == NULL && !feof(f)) {
            util_snprintf(err, errlen, "%s:%u: line too long", path, lineno);
            goto fail_a;
        }
        char *hash = strchr(s, '#');
        if (hash != NULL)
            *hash = '\0';
        while (*s == ' ' || *s == '\t')
            s++;
        len = strlen(s);
        while (len > 0 && (s[len - 1] == '\n' || s[len - 1] == '\r' || s[len - 1] == ' ' ||
                           s[len - 1] == '\t'))
            len--;
        if (len == 0)
            continue;
        if (a->n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            void *p = realloc(a->addrs, ncap * ID_ADDR_LEN);
            if (p == NULL) {
                util_snprintf(err, errlen, "%s: out of memory", path);
                goto fail_a;
            }
            a->addrs = p;
            cap = ncap;
        }
        int rv = id_addr_parse(s, len, a->addrs[a->n]);
        if (rv != ID_OK) {
            util_snprintf(err, errlen, "%s:%u: \"%.*s\" is not an address (%s)", path, lineno,
                          (int)(len > 60 ? 60 : len), s, id_strerror(rv));
            goto fail_a;
        }
        a->n++;
    }
    if (ferror(f)) {
        util_snprintf(err, errlen, "%s: read error", path);
        goto fail_a;
    }
    fclose(f);
    if (a->n > 1) {
        size_t w = 1;
        qsort(a->addrs, a->n, ID_ADDR_LEN, cmp_addr);
        for (size_t i = 1; i < a->n; i++) {
            if (memcmp(a->addrs[i], a->addrs[w - 1], ID_ADDR_LEN) != 0)
                memcpy(a->addrs[w++], a->addrs[i], ID_ADDR_LEN);
        }
        a->n = w;
    }
    return a;

fail_a:
    gw_allow_free(a);
fail_file:
    fclose(f);
    return NULL;
}

bool gw_allow_has(const struct gw_allow *a, const uint8_t addr[ID_ADDR_LEN])
{
    return a != NULL && a->n > 0 && bsearch(addr, a->addrs, a->n, ID_ADDR_LEN, cmp_addr) != NULL;
}

size_t gw_allow_count(const struct gw_allow *a)
{
    return a != NULL ? a->n : 0;
}

void gw_allow_free(struct gw_allow *a)
{
    if (a == NULL)
        return;
    free(a->addrs);
    free(a);
}
