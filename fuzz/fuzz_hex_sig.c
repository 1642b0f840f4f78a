/* libFuzzer target for common/id's text and signature parsers: arbitrary
 * bytes go to id_sig_parse(), id_addr_parse() and id_key_parse_hex() as text,
 * and to id_recover() as signature (first 65 bytes) + message (the rest).
 * Beyond memory safety it checks round trips and that whatever recovers also
 * verifies. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "id.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_sig_text(const char *s, size_t len)
{
    uint8_t sig[ID_SIG_LEN], again[ID_SIG_LEN];
    char out[ID_SIG_STR_LEN + 1];

    if (id_sig_parse(s, len, sig) != ID_OK)
        return;
    assert(len == ID_SIG_STR_LEN);
    id_sig_to_str(sig, out);
    assert(util_iov_ieq((struct iov){s, len}, (struct iov){out, ID_SIG_STR_LEN}));
    assert(id_sig_parse(out, ID_SIG_STR_LEN, again) == ID_OK);
    assert(memcmp(sig, again, ID_SIG_LEN) == 0);
}

static void check_addr_text(const char *s, size_t len)
{
    uint8_t addr[ID_ADDR_LEN], again[ID_ADDR_LEN];
    char out[ID_ADDR_STR_LEN + 1];
    int rv = id_addr_parse(s, len, addr);

    assert(rv == ID_OK || rv == ID_E_LENGTH || rv == ID_E_HEX || rv == ID_E_CHECKSUM);
    if (rv != ID_OK)
        return;
    id_addr_to_checksum(addr, out);
    assert(id_addr_parse(out, ID_ADDR_STR_LEN, again) == ID_OK);
    assert(memcmp(addr, again, ID_ADDR_LEN) == 0);
    id_addr_to_str(addr, out);
    assert(id_addr_parse(out, ID_ADDR_STR_LEN, again) == ID_OK);
    assert(memcmp(addr, again, ID_ADDR_LEN) == 0);
}

static void check_key_text(const char *s, size_t len)
{
    struct id_key k;
    uint8_t sig[ID_SIG_LEN], addr[ID_ADDR_LEN];
    int rv = id_key_parse_hex(&k, s, len);

    assert(rv == ID_OK || rv == ID_E_LENGTH || rv == ID_E_HEX || rv == ID_E_KEY);
    if (rv != ID_OK)
        return;
    /* A key that parses signs, and its signature recovers to its address. */
    assert(id_sign(&k, s, len, sig) == ID_OK);
    assert(id_recover(s, len, sig, addr) == ID_OK);
    assert(memcmp(addr, k.addr, ID_ADDR_LEN) == 0);
    id_key_clear(&k);
}

static void check_recover(const uint8_t *data, size_t size)
{
    uint8_t addr[ID_ADDR_LEN];
    char s[ID_SIG_STR_LEN + 1];
    int rv;

    if (size < ID_SIG_LEN)
        return;
    rv = id_recover(data + ID_SIG_LEN, size - ID_SIG_LEN, data, addr);
    assert(rv == ID_OK || rv == ID_E_V || rv == ID_E_RANGE || rv == ID_E_HIGH_S ||
           rv == ID_E_RECOVER);
    id_sig_to_str(data, s);
    if (rv == ID_OK) {
        assert(id_verify(data + ID_SIG_LEN, size - ID_SIG_LEN, s, ID_SIG_STR_LEN, addr) == ID_OK);
        addr[0] ^= 1;
        assert(id_verify(data + ID_SIG_LEN, size - ID_SIG_LEN, s, ID_SIG_STR_LEN, addr) ==
               ID_E_MISMATCH);
    } else {
        assert(id_verify(data + ID_SIG_LEN, size - ID_SIG_LEN, s, ID_SIG_STR_LEN, addr) == rv);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;

    check_sig_text(s, size);
    check_addr_text(s, size);
    check_key_text(s, size);
    check_recover(data, size);
    return 0;
}
