/* libFuzzer target for the inspector's WebSocket frame counter
 * (ag_insp_ring_ws_feed, agent/ag_insp_ring.c): arbitrary bytes as one
 * direction of an upgraded connection, fed at once and again in pieces whose
 * sizes the first byte chooses (1-16, or random-ish from the data); both
 * feeds must agree. Then the same bytes go through a ring entry as a
 * WebSocket request and response body with a small body cap, and the entry
 * is freed: the accounting must come back to 0. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ag_insp_ring.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ag_insp_wsc one, pieces;
    static const struct ag_insp_origin o = {"a", "id", "0x0", 0};
    struct ag_fwd_request rq = {.method = IOV_LIT("GET"), .path = IOV_LIT("/ws"), .websocket = true};
    struct ag_insp_ring *r;
    struct ag_insp_ent *e;
    size_t step, i = 0;

    if (size == 0)
        return 0;
    step = (size_t)(data[0] & 0x0f) + 1;
    data++;
    size--;
    memset(&one, 0, sizeof(one));
    memset(&pieces, 0, sizeof(pieces));
    ag_insp_ring_ws_feed(&one, data, size);
    while (i < size) {
        size_t n = size - i < step ? size - i : step;
        ag_insp_ring_ws_feed(&pieces, data + i, n);
        i += n;
    }
    assert(one.frames == pieces.frames && one.messages == pieces.messages &&
           one.left == pieces.left && one.hlen == pieces.hlen);
    assert(one.messages <= one.frames && one.hlen < sizeof(one.hdr));

    r = ag_insp_ring_new(1, 64);
    if (r == NULL)
        return 0;
    e = ag_insp_ring_begin(r, &rq, &o, 0, 0);
    if (e != NULL) {
        ag_insp_ring_req_body(r, e, data, size);
        ag_insp_ring_resp_body(r, e, data, size / 2);
        assert(e->ws_in.frames == one.frames && e->req_body.len <= 64);
        ag_insp_ring_end(r, e, NULL, 1);
        ag_insp_ring_trim(r);
        ag_insp_ring_clear(r);
        assert(ag_insp_ring_mem(r) == 0);
    }
    ag_insp_ring_free(r);
    return 0;
}
