/* Unit tests for common/log: text and JSON lines, escaping, levels. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "log.h"

/* Runs one log call into a pipe and returns the line read back. */
static void capture(enum log_format fmt, enum log_level min, char *out, size_t outlen,
                    void (*fn)(struct log_sink *))
{
    int p[2];
    assert_int_equal(pipe(p), 0);
    struct log_sink *log = log_new("test", min, fmt, p[1]);
    assert_non_null(log);
    fn(log);
    log_free(log);
    close(p[1]);
    ssize_t n = read(p[0], out, outlen - 1);
    close(p[0]);
    out[n < 0 ? 0 : n] = '\0';
}

static void emit_tricky(struct log_sink *log)
{
    LOG_INFO(log, "tunnel_up", LOG_U("tun", 17), LOG_S("peer", "203.0.113.5"),
             LOG_S("msg", "a \"quoted\" = value\n"), LOG_I("delta", -3), LOG_B("ok", 1),
             LOG_S("nil", NULL));
}

static void emit_debug(struct log_sink *log)
{
    LOG_DEBUG(log, "frame", LOG_U("len", 1));
}

static void test_text(void **state)
{
    char line[1024];

    capture(LOG_FMT_TEXT, LOG_LVL_INFO, line, sizeof(line), emit_tricky);
    assert_non_null(strstr(line, " level=info event=tunnel_up tun=17 peer=203.0.113.5 "));
    assert_non_null(strstr(line, "msg=\"a \\\"quoted\\\" = value\\n\""));
    assert_non_null(strstr(line, "delta=-3 ok=true nil=-\n"));
    assert_int_equal(strncmp(line, "ts=", 3), 0);
}

static void test_json(void **state)
{
    char line[1024];

    capture(LOG_FMT_JSON, LOG_LVL_INFO, line, sizeof(line), emit_tricky);
    cJSON *j = cJSON_Parse(line);
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "event")->valuestring, "tunnel_up");
    assert_string_equal(cJSON_GetObjectItem(j, "level")->valuestring, "info");
    assert_int_equal(cJSON_GetObjectItem(j, "tun")->valueint, 17);
    assert_string_equal(cJSON_GetObjectItem(j, "msg")->valuestring, "a \"quoted\" = value\n");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(j, "ok")));
    cJSON_Delete(j);
}

static void test_level_filter(void **state)
{
    char line[256];
    enum log_level l;

    capture(LOG_FMT_TEXT, LOG_LVL_INFO, line, sizeof(line), emit_debug);
    assert_string_equal(line, "");
    capture(LOG_FMT_TEXT, LOG_LVL_DEBUG, line, sizeof(line), emit_debug);
    assert_non_null(strstr(line, "event=frame len=1"));
    assert_int_equal(log_parse_level("warn", &l), 0);
    assert_int_equal(l, LOG_LVL_WARN);
    assert_int_equal(log_parse_level("loud", &l), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_level_filter),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
