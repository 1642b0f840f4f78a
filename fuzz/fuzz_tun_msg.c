/* libFuzzer target for common/tun_msg: arbitrary bytes go to tun_msg_decode() and
 * tun_msg_decode_auth() in both modes. A failure must name its code and leave nothing
 * allocated; a success must re-encode, the encoding must decode to the same type, and
 * encoding that again must give the same bytes (the codec is a fixed point after one
 * trip). Decoded auth frames must also yield their signed texts. ASan checks leaks. */
#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tun_msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef int (*decode_fn)(const char *json, size_t len, enum tun_mode mode, struct tun_msg *out,
                         const char **err_code);

static struct tun_msg m1, m2; /* large: kept off the stack */

static void check_signed_texts(const struct tun_msg *m)
{
    char buf[TUN_SIGNED_TEXT_MAX];

    for (size_t i = 0; i < m->auth.n_agents; i++) {
        const struct tun_msg_agent_auth *a = &m->auth.agents[i];
        assert(tun_msg_native_signed_text(buf, sizeof(buf), "LocalHost", a->addr, m->auth.nonce,
                                          m->auth.timestamp) > 0);
        assert(tun_msg_osaurus_signed_text(buf, sizeof(buf), a->addr_str, m->auth.nonce,
                                           m->auth.timestamp) > 0);
    }
}

static void one(const char *json, size_t len, enum tun_mode mode, decode_fn decode)
{
    const char *code = NULL;
    size_t len1 = 0, len2 = 0;
    char *enc1, *enc2;
    int rv = decode(json, len, mode, &m1, &code);

    if (rv != 0) {
        assert(rv < 0 && code != NULL && strcmp(code, tun_err_code(rv)) == 0);
        assert(m1.priv_tree == NULL && m1.priv_hdrs == NULL);
        (void)tun_err_close_code(rv);
        (void)tun_err_for_mode(rv, mode, m1.type);
        tun_msg_clear(&m1);
        return;
    }
    assert(code == NULL && m1.type != TUN_MSG_NONE && m1.mode == mode);
    if (m1.type == TUN_MSG_AUTH)
        check_signed_texts(&m1);
    enc1 = tun_msg_encode(&m1, &len1);
    assert(enc1 != NULL && strlen(enc1) == len1);

    rv = decode(enc1, len1, mode, &m2, &code);
    assert(rv == 0);
    assert(m2.type == m1.type);
    enc2 = tun_msg_encode(&m2, &len2);
    assert(enc2 != NULL && len2 == len1 && memcmp(enc1, enc2, len1) == 0);

    free(enc2);
    free(enc1);
    tun_msg_clear(&m2);
    tun_msg_clear(&m1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *json = (const char *)data;

    one(json, size, TUN_MODE_NATIVE, tun_msg_decode);
    one(json, size, TUN_MODE_OSAURUS, tun_msg_decode);
    one(json, size, TUN_MODE_NATIVE, tun_msg_decode_auth);
    one(json, size, TUN_MODE_OSAURUS, tun_msg_decode_auth);
    return 0;
}
