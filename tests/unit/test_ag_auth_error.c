/* The auth_error "domain" member (PROTOCOL.md 4.6): the gateway names the
 * domain it verifies signatures for, the agent reads it to say which domain
 * was expected. Encode and decode, both ways, and what is refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tun_msg.h"

static void test_domain_round_trip(void **state)
{
    struct tun_msg m, d;
    size_t len = 0;
    char *text;

    (void)state;
    tun_msg_init(&m, TUN_MSG_AUTH_ERROR, TUN_MODE_NATIVE);
    m.error.err = TUN_E_SIGNATURE_VERIFICATION_FAILED;
    strcpy(m.error.domain, "example.com");
    text = tun_msg_encode(&m, &len);
    assert_non_null(text);
    assert_non_null(strstr(text, "\"domain\":\"example.com\""));
    assert_int_equal(tun_msg_decode(text, len, TUN_MODE_NATIVE, &d, NULL), 0);
    assert_int_equal(d.type, TUN_MSG_AUTH_ERROR);
    assert_int_equal(d.error.err, TUN_E_SIGNATURE_VERIFICATION_FAILED);
    assert_string_equal(d.error.domain, "example.com");
    tun_msg_clear(&d);
    free(text);
}

static void test_domain_absent(void **state)
{
    static const char j[] = "{\"type\":\"auth_error\",\"error\":\"signature_verification_failed\"}";
    struct tun_msg m, d;
    size_t len = 0;
    char *text;

    (void)state;
    assert_int_equal(tun_msg_decode(j, strlen(j), TUN_MODE_NATIVE, &d, NULL), 0);
    assert_string_equal(d.error.domain, "");
    tun_msg_clear(&d);
    /* not sent when empty, and never on an error frame */
    tun_msg_init(&m, TUN_MSG_AUTH_ERROR, TUN_MODE_NATIVE);
    m.error.err = TUN_E_INVALID_NONCE;
    text = tun_msg_encode(&m, &len);
    assert_non_null(text);
    assert_null(strstr(text, "domain"));
    free(text);
    tun_msg_init(&m, TUN_MSG_ERROR, TUN_MODE_NATIVE);
    m.error.err = TUN_E_INVALID_NONCE;
    strcpy(m.error.domain, "example.com");
    text = tun_msg_encode(&m, &len);
    assert_non_null(text);
    assert_null(strstr(text, "domain"));
    free(text);
}

static void test_domain_refused(void **state)
{
    static const char *const bad[] = {
        "{\"type\":\"auth_error\",\"error\":\"signature_verification_failed\",\"domain\":7}",
        "{\"type\":\"auth_error\",\"error\":\"signature_verification_failed\",\"domain\":\"\"}",
        "{\"type\":\"auth_error\",\"error\":\"signature_verification_failed\","
        "\"domain\":\"a b\"}",
        "{\"type\":\"auth_error\",\"error\":\"signature_verification_failed\","
        "\"domain\":\"x\\u0000y\"}",
    };
    struct tun_msg m, d;
    size_t len = 0;

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(tun_msg_decode(bad[i], strlen(bad[i]), TUN_MODE_NATIVE, &d, NULL),
                         TUN_E_INVALID_JSON);
        tun_msg_clear(&d);
    }
    /* an encoder never writes a domain it would refuse */
    tun_msg_init(&m, TUN_MSG_AUTH_ERROR, TUN_MODE_NATIVE);
    m.error.err = TUN_E_SIGNATURE_VERIFICATION_FAILED;
    strcpy(m.error.domain, "bad\"domain");
    assert_null(tun_msg_encode(&m, &len));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_domain_round_trip),
        cmocka_unit_test(test_domain_absent),
        cmocka_unit_test(test_domain_refused),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
