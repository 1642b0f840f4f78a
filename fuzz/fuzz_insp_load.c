/* libFuzzer target for the inspector's saved-entry loader
 * (ag_insp_ring_restore, agent/ag_insp_ring.c: --inspect-save files are read
 * back at start). The input is the entry's JSON; its first byte chooses the
 * lengths of the request and response bodies that come "alongside" (cut
 * from a fixed pattern). An entry that loads must save and load again into
 * a fresh ring, to the same detail; a refused one must leave the ring as it
 * was. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "ag_insp_ring.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char *detail_text(struct ag_insp_ring *r, uint64_t id)
{
    cJSON *d = ag_insp_ring_detail_json(ag_insp_ring_find(r, id), true);
    char *t = d != NULL ? cJSON_PrintUnformatted(d) : NULL;

    cJSON_Delete(d);
    return t;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t pattern[256];
    struct ag_insp_ring *r, *r2;
    size_t qlen, slen;

    if (size == 0)
        return 0;
    for (size_t i = 0; i < sizeof(pattern); i++)
        pattern[i] = (uint8_t)(i * 7);
    qlen = (size_t)(data[0] & 0x0f) * 16;
    slen = (size_t)(data[0] >> 4) * 16;
    data++;
    size--;
    r = ag_insp_ring_new(4, 100);
    r2 = ag_insp_ring_new(4, 100);
    if (r == NULL || r2 == NULL)
        goto out;
    if (ag_insp_ring_restore(r, (const char *)data, size, pattern, qlen, pattern, slen) != 0) {
        assert(ag_insp_ring_count(r) == 0 && ag_insp_ring_mem(r) == 0);
        goto out;
    }
    assert(ag_insp_ring_count(r) == 1);
    {
        cJSON *l = ag_insp_ring_list_json(r, 0, 10);
        const cJSON *first = cJSON_GetObjectItem(cJSON_GetArrayItem(l, 0), "id");
        const struct ag_insp_ent *e =
            first != NULL ? ag_insp_ring_find(r, (uint64_t)first->valuedouble) : NULL;
        cJSON *s = e != NULL ? ag_insp_ring_save_json(e) : NULL;
        char *text = s != NULL ? cJSON_PrintUnformatted(s) : NULL;

        cJSON_Delete(l);
        cJSON_Delete(s);
        if (e != NULL) {
            assert(e->req_body.len <= 100 && e->resp_body.len <= 100);
        }
        if (text != NULL) {
            char *t1, *t2;
            int rc = ag_insp_ring_restore(r2, text, strlen(text), e->req_body.data,
                                          e->req_body.len, e->resp_body.data, e->resp_body.len);
            assert(rc == 0);
            t1 = detail_text(r, e->id);
            t2 = detail_text(r2, e->id);
            assert(t1 == NULL || t2 == NULL || strcmp(t1, t2) == 0);
            free(t1);
            free(t2);
        }
        free(text);
    }
out:
    ag_insp_ring_free(r);
    ag_insp_ring_free(r2);
    return 0;
}
