/* The HTTP/2 session allocator; see h2mem.h.
 *
 * Every block starts with a 16-byte header (its size and kind), so free and
 * realloc know how it was made; the header keeps malloc's 16-byte alignment.
 * A mapped block is one anonymous private mapping, header first: its first
 * page is touched at once (header, frame header, small frames), the rest
 * only by what nghttp2 writes there. */
#include "h2mem.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define H2MEM_HDR 16u
#define H2MEM_KIND_HEAP 0x68656170u /* "heap" */
#define H2MEM_KIND_MAP 0x6d617020u  /* "map " */

struct h2mem_hdr {
    size_t size;   /* bytes requested */
    uint32_t kind; /* H2MEM_KIND_* */
    uint32_t pad;
};

_Static_assert(sizeof(struct h2mem_hdr) == H2MEM_HDR, "h2mem header is 16 bytes");

static size_t page_size(void)
{
    long n = sysconf(_SC_PAGESIZE);

    return n > 0 ? (size_t)n : 4096;
}

static struct h2mem_hdr *hdr_of(void *p)
{
    return (struct h2mem_hdr *)(void *)((char *)p - H2MEM_HDR);
}

static size_t map_len(size_t size)
{
    size_t pg = page_size();

    return (size + H2MEM_HDR + pg - 1) / pg * pg;
}

/* A block of size bytes (zeroed if zero is set; mappings always are). */
static void *h2mem_alloc(struct h2mem *m, size_t size, int zero)
{
    struct h2mem_hdr *h;

    if (size > SIZE_MAX - H2MEM_HDR - page_size())
        return NULL;
    if (size >= H2MEM_MAP_MIN) {
        void *a =
            mmap(NULL, map_len(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (a == MAP_FAILED)
            return NULL;
        h = a;
        h->kind = H2MEM_KIND_MAP;
        m->mapped_bytes += size;
        m->mapped_blocks++;
    } else {
        h = zero ? calloc(1, H2MEM_HDR + size) : malloc(H2MEM_HDR + size);
        if (h == NULL)
            return NULL;
        h->kind = H2MEM_KIND_HEAP;
    }
    h->size = size;
    m->live_bytes += size;
    return (char *)h + H2MEM_HDR;
}

static void h2mem_release(struct h2mem *m, void *p)
{
    struct h2mem_hdr *h;

    if (p == NULL)
        return;
    h = hdr_of(p);
    m->live_bytes -= h->size;
    if (h->kind == H2MEM_KIND_MAP) {
        m->mapped_bytes -= h->size;
        m->mapped_blocks--;
        munmap(h, map_len(h->size));
        return;
    }
    free(h);
}

static void *on_malloc(size_t size, void *user)
{
    return h2mem_alloc(user, size, 0);
}

static void on_free(void *p, void *user)
{
    h2mem_release(user, p);
}

static void *on_calloc(size_t nmemb, size_t size, void *user)
{
    if (size != 0 && nmemb > SIZE_MAX / size)
        return NULL;
    return h2mem_alloc(user, nmemb * size, 1);
}

static void *on_realloc(void *p, size_t size, void *user)
{
    struct h2mem *m = user;
    struct h2mem_hdr *h;
    void *q;

    if (p == NULL)
        return h2mem_alloc(m, size, 0);
    h = hdr_of(p);
    /* heap to heap stays with realloc; anything involving a mapping moves */
    if (h->kind == H2MEM_KIND_HEAP && size < H2MEM_MAP_MIN) {
        size_t old = h->size;
        struct h2mem_hdr *n = realloc(h, H2MEM_HDR + size);
        if (n == NULL)
            return NULL;
        n->size = size;
        m->live_bytes = m->live_bytes - old + size;
        return (char *)n + H2MEM_HDR;
    }
    q = h2mem_alloc(m, size, 0);
    if (q == NULL)
        return NULL;
    memcpy(q, p, h->size < size ? h->size : size);
    h2mem_release(m, p);
    return q;
}

void h2mem_init(struct h2mem *m)
{
    memset(m, 0, sizeof(*m));
    m->mem.mem_user_data = m;
    m->mem.malloc = on_malloc;
    m->mem.free = on_free;
    m->mem.calloc = on_calloc;
    m->mem.realloc = on_realloc;
}

nghttp2_mem *h2mem_get(struct h2mem *m)
{
    return &m->mem;
}

void h2mem_discard(struct h2mem *m, const void *p, size_t len)
{
    size_t pg = page_size();
    uintptr_t lo;
    uintptr_t hi;

    if (len < pg)
        return;
    lo = ((uintptr_t)p + pg - 1) / pg * pg;
    hi = ((uintptr_t)p + len) / pg * pg;
    if (hi <= lo)
        return;
    /* MADV_DONTNEED, not MADV_FREE: the pages leave RSS now, and read back
     * as zeros if touched (MADV_FREE would keep them counted until the
     * kernel needs them). Failure only keeps them resident. */
    if (madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0)
        m->discarded_pages += (hi - lo) / pg;
}
