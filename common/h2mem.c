/* The HTTP/2 session allocator; see h2mem.h.
 *
 * Two kinds of block, told apart by the address nghttp2 hands back:
 * 1. A mapped block is one anonymous private mapping and starts at its first
 *    byte, so the address is page-aligned and no byte of it is written here:
 *    a zeroed block nobody writes to (nghttp2's stream map while no stream
 *    is open) stays out of memory entirely. Its length lives in m->maps, an
 *    open-addressing table keyed by address.
 * 2. A heap block comes from malloc with a 16-byte header in front (size and
 *    the offset back to malloc's pointer), placed so that the address nghttp2
 *    gets is never page-aligned; the header keeps malloc's 16-byte alignment. */
#include "h2mem.h"

#include <assert.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define H2MEM_HDR 16u
#define H2MEM_MAGIC 0x68326d65u /* "h2me" */
#define H2MEM_MAPS_MIN 64u      /* first size of the table of mappings */

struct h2mem_hdr {
    size_t size;    /* bytes requested */
    uint32_t off;   /* from malloc's pointer to the block: 16 or 32 */
    uint32_t magic; /* H2MEM_MAGIC */
};

/* One mapping in m->maps; addr 0 is an empty slot. */
struct h2mem_map {
    uintptr_t addr;
    size_t size; /* bytes requested */
};

_Static_assert(sizeof(struct h2mem_hdr) == H2MEM_HDR, "h2mem header is 16 bytes");

static size_t page_size(void)
{
    long n = sysconf(_SC_PAGESIZE);

    return n > 0 ? (size_t)n : 4096;
}

static size_t map_len(const struct h2mem *m, size_t size)
{
    return (size + m->page - 1) / m->page * m->page;
}

static size_t slot_of(const struct h2mem *m, uintptr_t addr)
{
    /* Fibonacci hashing of the page number: mappings sit pages apart */
    uint64_t h = (uint64_t)(addr / m->page) * 0x9e3779b97f4a7c15ull;

    return (size_t)(h >> 32) & (m->maps_cap - 1);
}

/* Doubles m->maps (or makes it). Returns 0 or -1. */
static int maps_grow(struct h2mem *m)
{
    size_t cap = m->maps_cap > 0 ? m->maps_cap * 2 : H2MEM_MAPS_MIN;
    struct h2mem_map *old = m->maps;
    size_t old_cap = m->maps_cap;
    struct h2mem_map *t = calloc(cap, sizeof(*t));

    if (t == NULL)
        return -1;
    m->maps = t;
    m->maps_cap = cap;
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].addr == 0)
            continue;
        size_t j = slot_of(m, old[i].addr);
        while (t[j].addr != 0)
            j = (j + 1) & (cap - 1);
        t[j] = old[i];
    }
    free(old);
    return 0;
}

static int maps_add(struct h2mem *m, uintptr_t addr, size_t size)
{
    size_t j;

    if ((m->mapped_blocks + 1) * 2 > m->maps_cap && maps_grow(m) != 0)
        return -1;
    j = slot_of(m, addr);
    while (m->maps[j].addr != 0)
        j = (j + 1) & (m->maps_cap - 1);
    m->maps[j].addr = addr;
    m->maps[j].size = size;
    return 0;
}

/* The slot of addr; addr must be there. */
static size_t maps_find(const struct h2mem *m, uintptr_t addr)
{
    size_t j = slot_of(m, addr);

    while (m->maps[j].addr != addr) {
        assert(m->maps[j].addr != 0); /* a page-aligned block we never mapped */
        j = (j + 1) & (m->maps_cap - 1);
    }
    return j;
}

/* Empties slot j and moves later entries of its run back (linear probing
 * without tombstones). */
static void maps_del(struct h2mem *m, size_t j)
{
    size_t mask = m->maps_cap - 1;
    size_t i = j;

    m->maps[j].addr = 0;
    for (;;) {
        i = (i + 1) & mask;
        if (m->maps[i].addr == 0)
            return;
        size_t home = slot_of(m, m->maps[i].addr);
        /* entry i may move to j if j lies cyclically in [home, i) */
        if (((i - home) & mask) >= ((i - j) & mask)) {
            m->maps[j] = m->maps[i];
            m->maps[i].addr = 0;
            j = i;
        }
    }
}

static void *heap_alloc(struct h2mem *m, size_t size, int zero)
{
    size_t off = H2MEM_HDR;
    char *raw = zero ? calloc(1, H2MEM_HDR + size) : malloc(H2MEM_HDR + size);
    struct h2mem_hdr *h;

    if (raw == NULL)
        return NULL;
    if ((uintptr_t)(raw + off) % m->page == 0) {
        /* would look like a mapping (one block in 256): 16 more bytes, and
         * of raw + 16 and raw + 32 one is not page-aligned */
        char *wide = zero ? calloc(1, 2 * H2MEM_HDR + size) : malloc(2 * H2MEM_HDR + size);
        free(raw);
        if (wide == NULL)
            return NULL;
        raw = wide;
        if ((uintptr_t)(raw + off) % m->page == 0)
            off = 2 * H2MEM_HDR;
    }
    h = (struct h2mem_hdr *)(void *)(raw + off - H2MEM_HDR);
    h->size = size;
    h->off = (uint32_t)off;
    h->magic = H2MEM_MAGIC;
    m->live_bytes += size;
    return raw + off;
}

/* A block of size bytes (zeroed if zero is set; mappings always are). */
static void *h2mem_alloc(struct h2mem *m, size_t size, int zero)
{
    void *a;

    if (size > SIZE_MAX - 2 * H2MEM_HDR - m->page)
        return NULL;
    if (size < H2MEM_MAP_MIN)
        return heap_alloc(m, size, zero);
    a = mmap(NULL, map_len(m, size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED)
        return NULL;
    if (maps_add(m, (uintptr_t)a, size) != 0) {
        munmap(a, map_len(m, size));
        return NULL;
    }
    m->live_bytes += size;
    m->mapped_bytes += size;
    m->mapped_blocks++;
    return a;
}

static bool is_mapped(const struct h2mem *m, const void *p)
{
    return (uintptr_t)p % m->page == 0;
}

static struct h2mem_hdr *hdr_of(void *p)
{
    struct h2mem_hdr *h = (struct h2mem_hdr *)(void *)((char *)p - H2MEM_HDR);

    assert(h->magic == H2MEM_MAGIC);
    return h;
}

/* The requested size of a live block. */
static size_t size_of(const struct h2mem *m, void *p)
{
    return is_mapped(m, p) ? m->maps[maps_find(m, (uintptr_t)p)].size : hdr_of(p)->size;
}

static void h2mem_release(struct h2mem *m, void *p)
{
    if (p == NULL)
        return;
    if (is_mapped(m, p)) {
        size_t j = maps_find(m, (uintptr_t)p);
        size_t size = m->maps[j].size;
        maps_del(m, j);
        m->live_bytes -= size;
        m->mapped_bytes -= size;
        m->mapped_blocks--;
        munmap(p, map_len(m, size));
        return;
    }
    struct h2mem_hdr *h = hdr_of(p);
    m->live_bytes -= h->size;
    free((char *)p - h->off);
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
    size_t old;
    void *q;

    if (p == NULL)
        return h2mem_alloc(m, size, 0);
    old = size_of(m, p);
    q = h2mem_alloc(m, size, 0);
    if (q == NULL)
        return NULL;
    memcpy(q, p, old < size ? old : size);
    h2mem_release(m, p);
    return q;
}

void h2mem_init(struct h2mem *m)
{
    memset(m, 0, sizeof(*m));
    m->page = page_size();
    m->mem.mem_user_data = m;
    m->mem.malloc = on_malloc;
    m->mem.free = on_free;
    m->mem.calloc = on_calloc;
    m->mem.realloc = on_realloc;
}

void h2mem_cleanup(struct h2mem *m)
{
    free(m->maps);
    m->maps = NULL;
    m->maps_cap = 0;
}

nghttp2_mem *h2mem_get(struct h2mem *m)
{
    return &m->mem;
}

size_t h2mem_resident_pages(const struct h2mem *m)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    uint64_t ent[64];
    size_t n = 0;

    if (fd == -1)
        return 0;
    for (size_t i = 0; i < m->maps_cap; i++) {
        const struct h2mem_map *e = &m->maps[i];
        size_t pages = map_len(m, e->size) / m->page;
        if (e->addr == 0)
            continue;
        for (size_t done = 0; done < pages;) {
            size_t k = pages - done < 64 ? pages - done : 64;
            off_t at = (off_t)((e->addr / m->page + done) * sizeof(ent[0]));
            if (pread(fd, ent, k * sizeof(ent[0]), at) != (ssize_t)(k * sizeof(ent[0])))
                break;
            /* present (bit 63) and exclusively mapped (bit 56): a page of
             * our own; a page only read maps the shared zero page */
            for (size_t q = 0; q < k; q++)
                n += (ent[q] >> 63 & 1) && (ent[q] >> 56 & 1);
            done += k;
        }
    }
    close(fd);
    return n;
}

void h2mem_discard(struct h2mem *m, const void *p, size_t len)
{
    uintptr_t lo;
    uintptr_t hi;

    if (len < m->page)
        return;
    lo = ((uintptr_t)p + m->page - 1) / m->page * m->page;
    hi = ((uintptr_t)p + len) / m->page * m->page;
    if (hi <= lo)
        return;
    /* MADV_DONTNEED, not MADV_FREE: the pages leave RSS now, and read back
     * as zeros if touched (MADV_FREE would keep them counted until the
     * kernel needs them). Failure only keeps them resident. */
    if (madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0)
        m->discarded_pages += (hi - lo) / m->page;
}
