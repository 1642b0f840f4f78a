/* The agent's proxy settings (agent/ag_pxy.c): which variable applies to ws://
 * and wss://, no_proxy matching, URL forms, credentials, and every refusal. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>

#include "ag_pxy.h"

/* A fake environment: NAME=VALUE pairs. */
static const char *const *fake_env;

static const char *fake_getenv(const char *name)
{
    size_t n = strlen(name);

    for (const char *const *e = fake_env; e != NULL && *e != NULL; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
            return *e + n + 1;
    return NULL;
}

static int from(const char *const *env, bool tls, const char *host, struct ag_proxy *px,
                char *err)
{
    struct ag_gateway g;

    memset(&g, 0, sizeof(g));
    g.tls = tls;
    strcpy(g.host, host);
    g.port = tls ? 443 : 80;
    fake_env = env;
    err[0] = '\0';
    return ag_pxy_from_env(&g, fake_getenv, px, err, 256);
}

static void test_variables(void **state)
{
    struct ag_proxy px;
    char err[256];
    const char *const both[] = {"https_proxy=http://s:1", "HTTPS_PROXY=http://S:2",
                                "http_proxy=p:3", "ALL_PROXY=a:4", NULL};
    const char *const upper[] = {"HTTPS_PROXY=http://S:2", NULL};
    const char *const all[] = {"all_proxy=a", NULL};
    const char *const none[] = {"https_proxy=", NULL};

    assert_int_equal(from(both, true, "gw.example.com", &px, err), 0);
    assert_true(px.set);
    assert_string_equal(px.host, "s"); /* lowercase first, as curl */
    assert_int_equal(px.port, 1);
    assert_string_equal(px.var, "https_proxy");
    assert_int_equal(from(both, false, "gw.example.com", &px, err), 0);
    assert_string_equal(px.host, "p"); /* ws:// takes http_proxy */
    assert_int_equal(px.port, 3);
    assert_int_equal(from(upper, true, "gw", &px, err), 0);
    assert_string_equal(px.var, "HTTPS_PROXY");
    assert_int_equal(from(upper, false, "gw", &px, err), 0);
    assert_false(px.set); /* HTTPS_PROXY is not for ws:// */
    assert_int_equal(from(all, false, "gw", &px, err), 0);
    assert_true(px.set);
    assert_int_equal(px.port, 1080);
    assert_string_equal(px.shown, "http://a:1080");
    assert_int_equal(from(none, true, "gw", &px, err), 0);
    assert_false(px.set); /* empty: unset */
}

static void test_no_proxy(void **state)
{
    struct ag_proxy px;
    char err[256];
    const char *const env[] = {"https_proxy=http://p:3128", "NO_PROXY=.example.com", NULL};

    assert_true(ag_pxy_no_proxy("*", "anything"));
    assert_true(ag_pxy_no_proxy("example.com", "gw.example.com"));
    assert_true(ag_pxy_no_proxy(".example.com", "gw.example.com"));
    assert_true(ag_pxy_no_proxy("example.com", "EXAMPLE.com"));
    assert_false(ag_pxy_no_proxy("example.com", "badexample.com"));
    assert_true(ag_pxy_no_proxy(" a.org , example.com:443 ", "gw.example.com"));
    assert_true(ag_pxy_no_proxy("127.0.0.1,[::1]", "::1"));
    assert_true(ag_pxy_no_proxy("127.0.0.1", "127.0.0.1"));
    assert_false(ag_pxy_no_proxy("127.0.0.1", "127.0.0.10"));
    assert_false(ag_pxy_no_proxy("", "gw"));
    assert_false(ag_pxy_no_proxy(NULL, "gw"));
    assert_false(ag_pxy_no_proxy(",,.", "gw"));
    assert_int_equal(from(env, true, "gw.example.com", &px, err), 0);
    assert_false(px.set);
    assert_int_equal(from(env, true, "gw.example.net", &px, err), 0);
    assert_true(px.set);
}

static void test_forms_and_credentials(void **state)
{
    struct ag_proxy px;
    char err[256];
    const char *const cred[] = {"https_proxy=http://me:p%40ss%3Aw@proxy.lan:3128/", NULL};
    const char *const v6[] = {"https_proxy=http://[::1]:8080", NULL};
    const char *const user_only[] = {"https_proxy=HTTP://bob@p", NULL};

    assert_int_equal(from(cred, true, "gw", &px, err), 0);
    assert_string_equal(px.host, "proxy.lan");
    assert_int_equal(px.port, 3128);
    assert_string_equal(px.auth, "Basic bWU6cEBzczp3"); /* base64("me:p@ss:w") */
    assert_string_equal(px.shown, "http://me@proxy.lan:3128"); /* never the password */
    assert_int_equal(from(v6, true, "gw", &px, err), 0);
    assert_string_equal(px.host, "::1");
    assert_string_equal(px.shown, "http://[::1]:8080");
    assert_int_equal(from(user_only, true, "gw", &px, err), 0);
    assert_string_equal(px.auth, "Basic Ym9iOg==");
}

static void test_refusals(void **state)
{
    static const struct {
        const char *value;
        const char *why;
    } bad[] = {
        {"https_proxy=socks5://p:1080", "only http:// proxies"},
        {"https_proxy=https://p:443", "only http:// proxies"},
        {"https_proxy=http://p:0", "port must be 1-65535"},
        {"https_proxy=http://p:65536", "port must be 1-65535"},
        {"https_proxy=http://p:12a", "port must be 1-65535"},
        {"https_proxy=http://p:", "port must be 1-65535"},
        {"https_proxy=http://:3128", "want [http://]"},
        {"https_proxy=http://[::1", "want [http://]"},
        {"https_proxy=http://p q:1", "want [http://]"},
        {"https_proxy=http://u%zz@p:1", "bad user or password"},
        {"https_proxy=http://u%00@p:1", "bad user or password"},
    };
    struct ag_proxy px;
    char err[256];

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *const env[] = {bad[i].value, NULL};
        assert_int_equal(from(env, true, "gw", &px, err), -1);
        if (strstr(err, bad[i].why) == NULL)
            fail_msg("%s: \"%s\" lacks \"%s\"", bad[i].value, err, bad[i].why);
        assert_non_null(strstr(err, "https_proxy"));
        assert_false(px.set);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_variables),
        cmocka_unit_test(test_no_proxy),
        cmocka_unit_test(test_forms_and_credentials),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
