/* Unit tests for common/util: strict number parsing, hex, UUIDs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "util.h"

static void test_parse_u64(void **state)
{
    uint64_t v = 7;

    assert_int_equal(util_parse_u64("0", 1, &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(util_parse_u64("18446744073709551615", 20, &v), 0);
    assert_true(v == UINT64_MAX);
    assert_int_equal(util_parse_u64("18446744073709551616", 20, &v), -1);
    assert_int_equal(util_parse_u64("", 0, &v), -1);
    assert_int_equal(util_parse_u64("-1", 2, &v), -1);
    assert_int_equal(util_parse_u64("+1", 2, &v), -1);
    assert_int_equal(util_parse_u64(" 1", 2, &v), -1);
    assert_int_equal(util_parse_u64("1 ", 2, &v), -1);
    assert_int_equal(util_parse_u64("12x", 3, &v), -1);
    assert_int_equal(util_parse_uint("65536", 65536, &v), 0);
    assert_int_equal(v, 65536);
    assert_int_equal(util_parse_uint("65537", 65536, &v), -1);
}

static void test_hex(void **state)
{
    const uint8_t in[] = {0x00, 0x01, 0xab, 0xff};
    uint8_t out[4];
    char s[9];

    util_hex_encode(in, sizeof(in), s);
    assert_string_equal(s, "0001abff");
    assert_int_equal(util_hex_decode("0001ABff", 8, out, 4), 0);
    assert_memory_equal(in, out, 4);
    assert_int_equal(util_hex_decode("0001abf", 7, out, 4), -1);
    assert_int_equal(util_hex_decode("0001abfg", 8, out, 4), -1);
    assert_int_equal(util_hex_decode("0001abff00", 10, out, 4), -1);
}

static void test_uuid(void **state)
{
    char a[37], b[37];

    assert_int_equal(util_uuid4(a), 0);
    assert_int_equal(util_uuid4(b), 0);
    assert_int_equal(strlen(a), 36);
    assert_true(a[8] == '-' && a[13] == '-' && a[18] == '-' && a[23] == '-');
    assert_true(a[14] == '4');
    assert_true(strchr("89ab", a[19]) != NULL);
    assert_string_not_equal(a, b);
}

static void test_ieq(void **state)
{
    assert_true(util_iov_ieq_str(IOV_LIT("Content-Length"), "content-length"));
    assert_false(util_iov_ieq_str(IOV_LIT("Content-Length"), "content-lengt"));
    assert_false(util_iov_ieq_str(IOV_LIT("a"), "b"));
}

static void test_list_next(void **state)
{
    struct iov list = IOV_LIT(" a ,b,\t, c\t,");
    struct iov item;
    const char *want[] = {"a", "b", "", "c"};
    size_t n = 0;

    while (util_list_next(&list, &item)) {
        assert_true(n < 4);
        assert_int_equal(item.len, strlen(want[n]));
        assert_memory_equal(item.base, want[n], item.len);
        n++;
    }
    assert_int_equal(n, 4);
    list = (struct iov){"", 0};
    assert_false(util_list_next(&list, &item));
    assert_int_equal(util_hex_val('F'), 15);
    assert_int_equal(util_hex_val('g'), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_u64),
        cmocka_unit_test(test_hex),
        cmocka_unit_test(test_uuid),
        cmocka_unit_test(test_ieq),
        cmocka_unit_test(test_list_next),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
