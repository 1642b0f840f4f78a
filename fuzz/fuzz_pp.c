/* libFuzzer target for gateway/gw_pp: the PROXY protocol v2 header parser,
 * driven as gw_lsn drives it. The input is what a connection sends; it is
 * taken as the listener reads it, never more than the parser asks for, and
 * checked: every prefix of the bytes accepted so far is "more" or a refusal,
 * want never shrinks below what was read nor grows past GW_PP_MAX, a done
 * header is exactly the bytes read, and its address is a whole AF_INET or
 * AF_INET6 one (or none). */
#include <assert.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "gw_pp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t have = 0, want = GW_PP_HEAD;
    struct gw_pp_hdr hdr;
    const char *why;
    int rc = 0;

    while (have < size) {
        size_t take = want - have;

        if (take > size - have)
            take = size - have;
        have += take;
        rc = gw_pp_parse(data, have, &want, &hdr, &why);
        if (rc < 0) {
            assert(why != NULL);
            return 0;
        }
        if (rc == 1)
            break;
        assert(want > have && want <= GW_PP_MAX);
    }
    if (rc != 1)
        return 0;
    assert(want == have && have >= GW_PP_HEAD && have <= GW_PP_MAX);
    assert(hdr.srclen == 0 ||
           (hdr.src.ss_family == AF_INET && hdr.srclen == sizeof(struct sockaddr_in)) ||
           (hdr.src.ss_family == AF_INET6 && hdr.srclen == sizeof(struct sockaddr_in6)));
    /* the same bytes at once give the same answer; one more byte is refused */
    {
        struct gw_pp_hdr again;
        size_t w2 = 0;

        assert(gw_pp_parse(data, have, &w2, &again, &why) == 1 && w2 == have);
        assert(again.srclen == hdr.srclen && memcmp(&again.src, &hdr.src, hdr.srclen) == 0);
        if (size > have)
            assert(gw_pp_parse(data, have + 1, &w2, &again, &why) == -1);
    }
    return 0;
}
