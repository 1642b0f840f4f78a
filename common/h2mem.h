/* An nghttp2_mem that keeps idle HTTP/2 sessions small and counts their
 * bytes. nghttp2 1.52 gives every session a 16 KiB outbound frame buffer
 * (aob.framebufs) and a 4 KiB zeroed stream table from the moment it is
 * created; a tunnel or keep-alive connection that is idle writes only the
 * first bytes of the one (SETTINGS, PING and WINDOW_UPDATE frames; DATA goes
 * through the send_data callback) and nothing of the other. So blocks of
 * H2MEM_MAP_MIN bytes or more get an anonymous mapping of their own, with
 * nothing of ours written in it: its pages cost memory only once nghttp2
 * writes them. One per event loop; no state outside the struct. */
#ifndef H2MEM_H
#define H2MEM_H

#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

/* Requests of at least this many bytes are mapped (the frame buffer is
 * 16,394 bytes, the stream table 4,096); smaller ones come from malloc. */
#define H2MEM_MAP_MIN 4096u

struct h2mem_map;

struct h2mem {
    nghttp2_mem mem;          /* for nghttp2_session_*_new3(); mem_user_data = this */
    uint64_t live_bytes;      /* bytes requested and not yet freed, both kinds */
    uint64_t mapped_bytes;    /* of those, in mappings of their own */
    uint64_t mapped_blocks;   /* mappings live */
    uint64_t discarded_pages; /* pages given back by h2mem_discard */
    size_t page;              /* the page size, bytes */
    struct h2mem_map *maps;   /* owned: address -> length of every mapping (h2mem.c) */
    size_t maps_cap;          /* slots in maps, a power of two, at most half used */
};

/* Sets up m (counters zero, mem pointing at this file's functions). */
void h2mem_init(struct h2mem *m);

/* Frees m's own table, once every session using it is gone. */
void h2mem_cleanup(struct h2mem *m);

/* Pages of all live mappings that are in memory and ours alone
 * (/proc/self/pagemap: present and exclusively mapped, so a page nghttp2
 * only read, which maps the kernel's shared zero page, does not count):
 * what the sessions' large blocks really cost. For tests and diagnostics:
 * one system call per mapping. */
size_t h2mem_resident_pages(const struct h2mem *m);

/* The allocator to pass nghttp2 (valid as long as m). */
nghttp2_mem *h2mem_get(struct h2mem *m);

/* Gives the kernel back the pages wholly inside [p, p + len), bytes that a
 * send callback has just copied out of nghttp2's frame buffer and that
 * nothing reads again (nghttp2 packs the next frame from the start of the
 * buffer). Pages reached only by large header blocks are thus resident only
 * while one is sent. Does nothing for len under a page, so the common small
 * frame costs a compare. Safe on any memory whose bytes in that range are
 * dead: the pages read back as zeros. */
void h2mem_discard(struct h2mem *m, const void *p, size_t len);

#endif
