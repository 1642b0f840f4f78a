/* Unit tests for common/cfg (the option engine and its file syntax) and
 * gateway/gw_cfg (the gateway's option table, value types and cross-option
 * rules), through their public headers. Environment variables are set with
 * setenv(); every test starts from a clean environment (reset_env). */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cmocka.h>

#include "cfg.h"
#include "gw_cfg.h"

#define MAX_ARGS 32

/* Scratch directory for config files and HOME, made once per run. */
static char tmp_dir[64];

static int group_setup(void **state)
{
    snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/test_cfg.XXXXXX");
    return mkdtemp(tmp_dir) == NULL ? -1 : 0;
}

static int group_teardown(void **state)
{
    char cmd[128];

    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* Unsets every variable the gateway reads and points HOME at the scratch dir. */
static void reset_env(void)
{
    const struct cfg_spec *spec = gw_cfg_spec();
    char name[256];

    for (size_t i = 0; i < spec->nopts; i++) {
        assert_int_equal(cfg_env_name(spec, &spec->opts[i], name, sizeof(name)), 0);
        unsetenv(name);
        if (spec->opts[i].env != NULL)
            unsetenv(spec->opts[i].env);
    }
    unsetenv("XDG_STATE_HOME");
    setenv("HOME", tmp_dir, 1);
}

/* Writes content to <tmp_dir>/name; returns the path (static buffer). */
static const char *write_file(const char *name, const char *content, size_t len)
{
    static char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", tmp_dir, name);
    f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(content, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    return path;
}

#define WRITE(name, s) write_file((name), (s), sizeof(s) - 1)

/* gw_cfg_load with argv = {"tunnel-gateway", args..., NULL}. */
static int load_v(struct gw_cfg *cfg, char *err, size_t errlen, ...)
{
    char *argv[MAX_ARGS];
    int argc = 0;
    va_list ap;
    const char *a;

    argv[argc++] = "tunnel-gateway";
    va_start(ap, errlen);
    while ((a = va_arg(ap, const char *)) != NULL) {
        assert_true(argc < MAX_ARGS - 1);
        argv[argc++] = (char *)a;
    }
    va_end(ap);
    argv[argc] = NULL;
    err[0] = '\0';
    return gw_cfg_load(cfg, argc, argv, err, errlen);
}

#define LOAD(cfg, err, ...) load_v((cfg), (err), sizeof(err), __VA_ARGS__, (const char *)NULL)
#define LOAD0(cfg, err) load_v((cfg), (err), sizeof(err), (const char *)NULL)

/* Loads, expects failure, and checks err contains want. */
#define EXPECT_ERR(want, ...)                                                   \
    do {                                                                        \
        struct gw_cfg c_;                                                       \
        char e_[512];                                                           \
        assert_int_equal(LOAD(&c_, e_, __VA_ARGS__), -1);                       \
        if (strstr(e_, (want)) == NULL)                                         \
            fail_msg("error \"%s\" lacks \"%s\"", e_, (want));                  \
        gw_cfg_cleanup(&c_);                                                    \
    } while (0)

static void assert_contains(const char *hay, const char *needle)
{
    if (hay == NULL || strstr(hay, needle) == NULL)
        fail_msg("\"%s\" lacks \"%s\"", hay != NULL ? hay : "(null)", needle);
}

static void test_defaults(void **state)
{
    struct gw_cfg c;
    char err[512];
    char want[256];
    const struct sockaddr_in *sin = (const struct sockaddr_in *)&c.listen.ss;

    reset_env();
    assert_int_equal(LOAD0(&c, err), 0);
    assert_string_equal(c.domain, "localhost");
    assert_string_equal(c.listen.text, "127.0.0.1:8443");
    assert_int_equal(c.listen.port, 8443);
    assert_int_equal(sin->sin_family, AF_INET);
    assert_int_equal(ntohs(sin->sin_port), 8443);
    assert_int_equal(ntohl(sin->sin_addr.s_addr), 0x7f000001);
    assert_int_equal(c.listen.sslen, sizeof(struct sockaddr_in));
    assert_null(c.plain_listen.text);
    assert_null(c.cert_path);
    assert_null(c.config_path);
    assert_false(c.open);
    assert_true(c.open_effective);
    assert_false(c.no_tls);
    assert_int_equal(c.trust_proxy.n, 0);
    assert_null(c.public_url.text);
    assert_null(c.redis.text);
    snprintf(want, sizeof(want), "%s/.local/state/tunnel-gateway", tmp_dir);
    assert_string_equal(c.state_dir, want);
    assert_string_equal(c.region, "local");
    assert_int_equal(c.drain_timeout_s, 600);
    assert_int_equal(c.ping_interval_s, 20);
    assert_int_equal(c.summary_interval_s, 60);
    assert_int_equal(c.max_header_bytes, 65536);
    assert_int_equal(c.max_body_bytes, 0);
    assert_int_equal(c.resp_header_timeout_s, 300);
    assert_int_equal(c.max_resp_header_timeout_s, 3600);
    assert_int_equal(c.stream_idle_timeout_s, 300);
    assert_int_equal(c.max_conns_per_ip, 512);
    assert_int_equal(c.tunnel_connects_per_ip_per_min, 60);
    assert_int_equal(c.max_tunnels_per_ip, 64);
    assert_int_equal(c.max_agents_per_tunnel, 50);
    assert_int_equal(c.max_streams_per_tunnel, 1024);
    assert_int_equal(c.agent_requests_per_min, 0);
    assert_int_equal(c.log_level, LOG_LVL_INFO);
    assert_int_equal(c.log_format, LOG_FMT_TEXT);
    assert_null(c.log_dir);
    assert_int_equal(c.n_warnings, 0);
    assert_false(c.show_help);
    gw_cfg_cleanup(&c);
    assert_null(c.domain);
    gw_cfg_cleanup(&c); /* twice is safe */
}

static void test_precedence(void **state)
{
    struct gw_cfg c;
    char err[512];
    const char *path;
    char conf[256];

    reset_env();
    path = WRITE("prec.toml", "max-header-bytes = 100\nregion = \"file\"\ndomain = file.test\n");
    snprintf(conf, sizeof(conf), "%s", path);

    /* default */
    assert_int_equal(LOAD0(&c, err), 0);
    assert_int_equal(c.max_header_bytes, 65536);
    gw_cfg_cleanup(&c);

    /* default < file */
    assert_int_equal(LOAD(&c, err, "--config", conf), 0);
    assert_int_equal(c.max_header_bytes, 100);
    assert_string_equal(c.region, "file");
    assert_string_equal(c.config_path, conf);
    gw_cfg_cleanup(&c);

    /* file < env */
    setenv("TUNNEL_GATEWAY_MAX_HEADER_BYTES", "200", 1);
    setenv("TUNNEL_GATEWAY_REGION", "env", 1);
    assert_int_equal(LOAD(&c, err, "--config", conf), 0);
    assert_int_equal(c.max_header_bytes, 200);
    assert_string_equal(c.region, "env");
    assert_string_equal(c.domain, "file.test"); /* untouched by env */
    gw_cfg_cleanup(&c);

    /* env < CLI, in both --k v and --k=v forms */
    assert_int_equal(LOAD(&c, err, "--config", conf, "--max-header-bytes", "300",
                          "--region=cli"), 0);
    assert_int_equal(c.max_header_bytes, 300);
    assert_string_equal(c.region, "cli");
    assert_string_equal(c.domain, "file.test");
    gw_cfg_cleanup(&c);

    /* the config file named by the environment; a CLI --config wins over it */
    setenv("TUNNEL_GATEWAY_CONFIG", conf, 1);
    unsetenv("TUNNEL_GATEWAY_MAX_HEADER_BYTES");
    assert_int_equal(LOAD0(&c, err), 0);
    assert_int_equal(c.max_header_bytes, 100);
    gw_cfg_cleanup(&c);
    path = WRITE("prec2.toml", "max_header_bytes = 7\n");
    assert_int_equal(LOAD(&c, err, "--config", path), 0);
    assert_int_equal(c.max_header_bytes, 7);
    gw_cfg_cleanup(&c);

    /* a repeated flag: the last wins */
    assert_int_equal(LOAD(&c, err, "--domain", "a.test", "--domain", "b.test"), 0);
    assert_string_equal(c.domain, "b.test");
    gw_cfg_cleanup(&c);

    /* empty environment variables count as unset */
    reset_env();
    setenv("TUNNEL_GATEWAY_DOMAIN", "", 1);
    assert_int_equal(LOAD0(&c, err), 0);
    assert_string_equal(c.domain, "localhost");
    gw_cfg_cleanup(&c);
}

static void test_number_errors(void **state)
{
    struct gw_cfg c;
    char err[512];
    const char *path;

    reset_env();
    assert_int_equal(LOAD(&c, err, "--max-header-bytes", "12k"), -1);
    assert_string_equal(err, "--max-header-bytes: \"12k\" is not a whole number");
    gw_cfg_cleanup(&c);
    EXPECT_ERR("--max-header-bytes: \"-1\" is negative", "--max-header-bytes", "-1");
    EXPECT_ERR("--max-body-bytes: \"+5\" is not a whole number", "--max-body-bytes", "+5");
    EXPECT_ERR("--max-body-bytes: \" 5\" is not a whole number", "--max-body-bytes", " 5");
    EXPECT_ERR("--max-body-bytes: \"\" is not a whole number", "--max-body-bytes=");
    EXPECT_ERR("--max-body-bytes: \"1.5\" is not a whole number", "--max-body-bytes=1.5");
    EXPECT_ERR("--max-body-bytes: \"18446744073709551616\" is too large",
               "--max-body-bytes", "18446744073709551616");
    EXPECT_ERR("--max-header-bytes: \"4294967296\" is too large (at most 4294967295)",
               "--max-header-bytes", "4294967296");
    EXPECT_ERR("--drain-timeout: \"10s\" is not a whole number", "--drain-timeout", "10s");
    assert_int_equal(LOAD(&c, err, "--max-body-bytes", "18446744073709551615"), 0);
    assert_true(c.max_body_bytes == UINT64_MAX);
    gw_cfg_cleanup(&c);

    /* the environment variable is named */
    setenv("TUNNEL_GATEWAY_MAX_CONNS_PER_IP", "lots", 1);
    EXPECT_ERR("TUNNEL_GATEWAY_MAX_CONNS_PER_IP: \"lots\" is not a whole number", "--open");
    reset_env();

    /* the file line is named, with the key as written */
    path = WRITE("num.toml", "# limits\n\nmax_streams_per_tunnel = -3\n");
    assert_int_equal(LOAD(&c, err, "--config", path), -1);
    assert_contains(err, "num.toml:3: max_streams_per_tunnel: \"-3\" is negative");
    gw_cfg_cleanup(&c);

    /* odd bytes in a value are escaped in the message */
    EXPECT_ERR("--max-body-bytes: \"1\\x01\\\"\" is not a whole number",
               "--max-body-bytes", "1\x01\"");
    /* response-header-timeout may not exceed its maximum */
    EXPECT_ERR("--response-header-timeout 4000 exceeds --max-response-header-timeout 3600",
               "--response-header-timeout", "4000");
    assert_int_equal(LOAD(&c, err, "--response-header-timeout", "4000",
                          "--max-response-header-timeout", "0"), 0);
    gw_cfg_cleanup(&c);
}

static void test_bool_enum(void **state)
{
    struct gw_cfg c;
    char err[512];
    const char *path;

    reset_env();
    assert_int_equal(LOAD(&c, err, "--open", "--no-tls"), 0);
    assert_true(c.open);
    assert_true(c.no_tls);
    gw_cfg_cleanup(&c);
    path = WRITE("bool.toml", "open = true\nno_tls = yes\n");
    assert_int_equal(LOAD(&c, err, "--config", path, "--open=false"), 0);
    assert_false(c.open);
    assert_true(c.no_tls);
    gw_cfg_cleanup(&c);
    setenv("TUNNEL_GATEWAY_OPEN", "1", 1);
    assert_int_equal(LOAD0(&c, err), 0);
    assert_true(c.open);
    gw_cfg_cleanup(&c);
    setenv("TUNNEL_GATEWAY_OPEN", "No", 1);
    assert_int_equal(LOAD0(&c, err), 0);
    assert_false(c.open);
    gw_cfg_cleanup(&c);
    reset_env();
    EXPECT_ERR("--open: \"maybe\" is not a boolean", "--open=maybe");

    assert_int_equal(LOAD(&c, err, "--log-level", "DEBUG", "--log-format", "json"), 0);
    assert_int_equal(c.log_level, LOG_LVL_DEBUG);
    assert_int_equal(c.log_format, LOG_FMT_JSON);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--log-level=warning"), 0);
    assert_int_equal(c.log_level, LOG_LVL_WARN);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--log-level=error"), 0);
    assert_int_equal(c.log_level, LOG_LVL_ERROR);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--log-level", "verbose"), -1);
    assert_string_equal(err, "--log-level: \"verbose\" is not one of: debug, info, warn, error");
    gw_cfg_cleanup(&c);
    EXPECT_ERR("--log-format: \"xml\" is not one of: text, json", "--log-format", "xml");
}

static void test_cli_errors(void **state)
{
    reset_env();
    EXPECT_ERR("--domain: missing value (DOMAIN)", "--domain");
    EXPECT_ERR("--max-header-bytes: missing value (N)", "--open", "--max-header-bytes");
    EXPECT_ERR("--log-dir: missing value (DIR); \"--open\" is an option", "--log-dir", "--open");
    EXPECT_ERR("unknown option \"--bogus\"", "--bogus");
    EXPECT_ERR("unknown option \"--bogus=1\"", "--bogus=1");
    EXPECT_ERR("unknown option \"-h\"", "-h");
    EXPECT_ERR("unexpected argument \"serve\"", "serve");
    EXPECT_ERR("unexpected argument \"--\"", "--");
    /* options that are not on the command line as flags with values */
    EXPECT_ERR("--config: cannot open", "--config", "/nonexistent/tg.toml");
}

static void test_help_version_flags(void **state)
{
    struct gw_cfg c;
    char err[512];

    reset_env();
    /* --help wins over anything else wrong on the line */
    setenv("TUNNEL_GATEWAY_MAX_BODY_BYTES", "junk", 1);
    assert_int_equal(LOAD(&c, err, "--max-header-bytes=junk", "--help", "--bogus"), 0);
    assert_true(c.show_help);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--version"), 0);
    assert_true(c.show_version);
    assert_false(c.show_help);
    gw_cfg_cleanup(&c);
    reset_env();
    /* --help is command-line only: neither a file key nor an env name */
    setenv("TUNNEL_GATEWAY_HELP", "1", 1);
    assert_int_equal(LOAD0(&c, err), 0);
    assert_false(c.show_help);
    gw_cfg_cleanup(&c);
    reset_env();
}

static void test_file_syntax(void **state)
{
    struct gw_cfg c;
    char err[512];
    const char *path;

    reset_env();
    path = WRITE("syn.toml",
                 "# a whole-line comment\n"
                 "   \n"
                 "domain = \"Example.COM\"   # trailing comment\n"
                 "region = 'lit\\eral # not a comment'\n"
                 "log_dir = \"/var/log/a\\\"b\\\\c#d\"\n"
                 "[limits]   # a section\n"
                 "max_body_bytes = 1048576\n"
                 "max-conns-per-ip=7\n"
                 "\t max_tunnels_per_ip\t=\t9 \t\n"
                 "[ proxy ]\n"
                 "trust_proxy = [ \"10.0.0.0/8\", '192.168.0.0/16', fd00::/8, ]\n");
    assert_int_equal(LOAD(&c, err, "--config", path), 0);
    assert_string_equal(c.domain, "example.com");
    assert_string_equal(c.region, "lit\\eral # not a comment");
    assert_string_equal(c.log_dir, "/var/log/a\"b\\c#d");
    assert_int_equal(c.max_body_bytes, 1048576);
    assert_int_equal(c.max_conns_per_ip, 7);
    assert_int_equal(c.max_tunnels_per_ip, 9);
    assert_int_equal(c.trust_proxy.n, 3);
    assert_int_equal(c.trust_proxy.v[2].family, AF_INET6);
    gw_cfg_cleanup(&c);

    /* escapes, CRLF line ends and a UTF-8 BOM */
    path = WRITE("esc.toml", "\xef\xbb\xbfregion = \"a\\\"b\\\\c\"\r\nmax_header_bytes = 5\r\n");
    assert_int_equal(LOAD(&c, err, "--config", path), 0);
    assert_string_equal(c.region, "a\"b\\c");
    assert_int_equal(c.max_header_bytes, 5);
    gw_cfg_cleanup(&c);
    /* \n \t \r decode to control characters, which a region may not hold
     * (agents refuse them in auth_ok) */
    path = WRITE("esc2.toml", "region = \"a\\nb\\tc\\rd\"\n");
    assert_int_equal(LOAD(&c, err, "--config", path), -1);
    assert_non_null(strstr(err, "--region: use 1 to 64 printable ASCII characters"));
    gw_cfg_cleanup(&c);

    /* no final newline; an empty string unsets an optional value */
    path = WRITE("nonl.toml", "log_dir = \"\"\nregion = x");
    assert_int_equal(LOAD(&c, err, "--config", path, "--log-dir", "/x"), 0);
    assert_string_equal(c.region, "x");
    assert_string_equal(c.log_dir, "/x");
    gw_cfg_cleanup(&c);
}

/* Writes one bad file and checks the error names file:line and the reason. */
static void expect_file_err(const char *content, size_t len, const char *want)
{
    struct gw_cfg c;
    char err[512];
    const char *path = write_file("bad.toml", content, len);

    assert_int_equal(LOAD(&c, err, "--config", path), -1);
    if (strstr(err, want) == NULL)
        fail_msg("error \"%s\" lacks \"%s\" for file \"%s\"", err, want, content);
    assert_non_null(strstr(err, "bad.toml:"));
    gw_cfg_cleanup(&c);
}

#define FILE_ERR(content, want) expect_file_err((content), sizeof(content) - 1, (want))

static void test_file_errors(void **state)
{
    reset_env();
    FILE_ERR("region = \"abc\n", "bad.toml:1: unterminated string");
    FILE_ERR("region = 'abc\n", "bad.toml:1: unterminated string");
    FILE_ERR("\nregion = \"a\\qb\"\n", "bad.toml:2: unsupported escape \\q");
    FILE_ERR("region = \"a\\", "bad.toml:1: unterminated string");
    FILE_ERR("region =\n", "bad.toml:1: missing value");
    FILE_ERR("region = # nothing\n", "bad.toml:1: missing value");
    FILE_ERR("region = \"a\" b\n", "bad.toml:1: unexpected text after the value");
    FILE_ERR("region = a b\n", "bad.toml:1: unexpected text after the value");
    FILE_ERR("region = a\"b\n", "bad.toml:1: unexpected '\"' in a bare value");
    FILE_ERR("[[servers]]\n", "bad.toml:1: arrays of tables");
    FILE_ERR("[logging\n", "bad.toml:1: malformed [section] header");
    FILE_ERR("[] \n", "bad.toml:1: malformed [section] header");
    FILE_ERR("[a] x\n", "bad.toml:1: unexpected text after [section]");
    FILE_ERR("logging.log_dir = \"/x\"\n", "bad.toml:1: dotted keys are not supported");
    FILE_ERR("\"region\" = \"x\"\n", "bad.toml:1: quoted keys are not supported");
    FILE_ERR("region\n", "bad.toml:1: expected '=' after key \"region\"");
    FILE_ERR("= 5\n", "bad.toml:1: expected key = value");
    FILE_ERR("region = \"\"\"x\"\"\"\n", "bad.toml:1: multi-line strings are not supported");
    FILE_ERR("region = { a = 1 }\n", "bad.toml:1: inline tables are not supported");
    FILE_ERR("trust_proxy = [\"10.0.0.0/8\"\n", "bad.toml:1: unterminated array");
    FILE_ERR("trust_proxy = [[\"a\"]]\n", "bad.toml:1: nested arrays");
    FILE_ERR("trust_proxy = [\"a\" \"b\"]\n", "bad.toml:1: expected ',' or ']'");
    FILE_ERR("region = \"a\x01\"\n", "bad.toml:1: control character");
    FILE_ERR("region = x\n\0 = 1\n", "bad.toml:2: NUL byte");
    /* duplicates: an error naming both lines, also through an alias */
    FILE_ERR("region = a\n\nregion = b\n",
             "bad.toml:3: \"region\" sets region again (first set at line 1");
    FILE_ERR("cert = \"a.pem\"\ncertfile = \"b.pem\"\n",
             "bad.toml:2: \"certfile\" sets cert again (first set at line 1");
    /* keys that do not belong in a file */
    FILE_ERR("config = \"other.toml\"\n", "bad.toml:1: \"config\" cannot be set in a config file");
    FILE_ERR("help = true\n", "bad.toml:1: \"help\" cannot be set in a config file");
    /* unknown keys, with the section when there is one */
    FILE_ERR("# x\nregion = r\nbogus = 1\n", "bad.toml:3: unknown key \"bogus\"");
    FILE_ERR("[auth]\nmethod = \"globus\"\n", "bad.toml:2: unknown key \"method\" in [auth]");
    /* value errors carry the line too */
    FILE_ERR("\n\nlisten = \"nowhere\"\n", "bad.toml:3: listen: \"nowhere\" is not ADDR:PORT");
}

/* The ProxyStore relay documentation's config file, as its users write it. */
static void test_proxystore_file(void **state)
{
    struct gw_cfg c;
    char err[512];
    char want[256];
    const char *path;

    reset_env();
    path = WRITE("relay.toml",
                 "port = 8700\n"
                 "certfile = \"cert.pem\"\n"
                 "keyfile = \"privkey.pem\"\n"
                 "\n"
                 "[logging]\n"
                 "log_dir = \"/path/to/log/dir\"\n"
                 "default_log_level = \"INFO\"\n"
                 "websockets_log_level = \"WARNING\"\n"
                 "current_client_interval = 60\n"
                 "current_client_limit = 32\n");
    assert_int_equal(LOAD(&c, err, "--config", path), 0);
    assert_string_equal(c.listen.text, "127.0.0.1:8700");
    assert_int_equal(ntohs(((struct sockaddr_in *)&c.listen.ss)->sin_port), 8700);
    /* relative paths in a file are relative to the file */
    snprintf(want, sizeof(want), "%s/cert.pem", tmp_dir);
    assert_string_equal(c.cert_path, want);
    snprintf(want, sizeof(want), "%s/privkey.pem", tmp_dir);
    assert_string_equal(c.key_path, want);
    assert_string_equal(c.log_dir, "/path/to/log/dir");
    assert_int_equal(c.log_level, LOG_LVL_INFO);
    assert_int_equal(c.n_warnings, 3);
    assert_contains(c.warnings[0], "relay.toml:8: ignoring \"websockets_log_level\"");
    assert_contains(c.warnings[1], "relay.toml:9: ignoring \"current_client_interval\"");
    assert_contains(c.warnings[2], "relay.toml:10: ignoring \"current_client_limit\"");
    gw_cfg_cleanup(&c);
    assert_null(c.warnings);

    /* DEBUG in any case, and the CLI overrides the file */
    path = WRITE("relay2.toml", "port = 8700\n[logging]\ndefault_log_level = \"Debug\"\n");
    assert_int_equal(LOAD(&c, err, "--config", path, "--log-level", "warn"), 0);
    assert_int_equal(c.log_level, LOG_LVL_WARN);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--config", path), 0);
    assert_int_equal(c.log_level, LOG_LVL_DEBUG);
    gw_cfg_cleanup(&c);
}

static void test_port_host(void **state)
{
    struct gw_cfg c;
    char err[512];
    const char *path;
    const struct sockaddr_in6 *s6;

    reset_env();
    setenv("PORT", "9000", 1);
    assert_int_equal(LOAD0(&c, err), 0);
    assert_string_equal(c.listen.text, "127.0.0.1:9000");
    assert_int_equal(ntohs(((struct sockaddr_in *)&c.listen.ss)->sin_port), 9000);
    gw_cfg_cleanup(&c);

    setenv("HOST", "0.0.0.0", 1);
    assert_int_equal(LOAD(&c, err, "--open"), 0);
    assert_string_equal(c.listen.text, "0.0.0.0:9000");
    gw_cfg_cleanup(&c);

    /* PORT edits the file's --listen, whatever the order in the file */
    unsetenv("HOST");
    setenv("PORT", "7001", 1);
    path = WRITE("ph.toml", "port = 1\nlisten = \"[::1]:7000\"\n");
    assert_int_equal(LOAD(&c, err, "--config", path), 0);
    assert_string_equal(c.listen.text, "[::1]:7001");
    s6 = (const struct sockaddr_in6 *)&c.listen.ss;
    assert_int_equal(s6->sin6_family, AF_INET6);
    assert_int_equal(ntohs(s6->sin6_port), 7001);
    assert_int_equal(c.listen.sslen, sizeof(struct sockaddr_in6));
    gw_cfg_cleanup(&c);
    /* ... and the file's own port key edits its listen */
    unsetenv("PORT");
    assert_int_equal(LOAD(&c, err, "--config", path), 0);
    assert_string_equal(c.listen.text, "[::1]:1");
    gw_cfg_cleanup(&c);

    /* a CLI --listen beats PORT and HOST */
    setenv("PORT", "7001", 1);
    setenv("HOST", "::", 1);
    assert_int_equal(LOAD(&c, err, "--listen", "127.0.0.1:5000"), 0);
    assert_string_equal(c.listen.text, "127.0.0.1:5000");
    gw_cfg_cleanup(&c);
    /* HOST "::" and "[::]" alike; not loopback, so it needs --open */
    assert_int_equal(LOAD(&c, err, "--open"), 0);
    assert_string_equal(c.listen.text, "[::]:7001");
    gw_cfg_cleanup(&c);
    setenv("HOST", "[::]", 1);
    assert_int_equal(LOAD(&c, err, "--open"), 0);
    assert_string_equal(c.listen.text, "[::]:7001");
    gw_cfg_cleanup(&c);
    /* the program's own variable wins over the platform's */
    reset_env();
    setenv("PORT", "7001", 1);
    setenv("TUNNEL_GATEWAY_PORT", "7002", 1);
    assert_int_equal(LOAD0(&c, err), 0);
    assert_int_equal(c.listen.port, 7002);
    gw_cfg_cleanup(&c);
    reset_env();
    setenv("PORT", "http", 1);
    EXPECT_ERR("PORT: \"http\" is not a port number", "--open");
    setenv("PORT", "65536", 1);
    EXPECT_ERR("PORT: \"65536\" is not a port number", "--open");
    reset_env();
    setenv("HOST", "example.com", 1);
    EXPECT_ERR("HOST: \"example.com\" has an address that is not numeric", "--open");
    reset_env();

    /* listen syntax */
    assert_int_equal(LOAD(&c, err, "--listen", "LOCALHOST:0"), 0);
    assert_string_equal(c.listen.text, "localhost:0");
    assert_int_equal(c.listen.port, 0);
    assert_int_equal(ntohl(((struct sockaddr_in *)&c.listen.ss)->sin_addr.s_addr), 0x7f000001);
    gw_cfg_cleanup(&c);
    EXPECT_ERR("--listen: \"::1:8443\" has an IPv6 address without brackets", "--listen", "::1:8443");
    EXPECT_ERR("--listen: \"127.0.0.1\" is not ADDR:PORT", "--listen", "127.0.0.1");
    EXPECT_ERR("--listen: \"127.0.0.1:65536\" has a port", "--listen", "127.0.0.1:65536");
    EXPECT_ERR("--listen: \"127.0.0.1:\" has a port", "--listen", "127.0.0.1:");
    EXPECT_ERR("--listen: \"[::1]8443\" is not [IPv6]:PORT", "--listen", "[::1]8443");
    EXPECT_ERR("--listen: \":8443\" has no address", "--listen", ":8443");
    EXPECT_ERR("--listen: \"gw.example.com:443\" has an address that is not numeric", "--listen",
               "gw.example.com:443");
    EXPECT_ERR("--plain-listen: \"x\" is not ADDR:PORT", "--plain-listen", "x");
    assert_int_equal(LOAD(&c, err, "--plain-listen", "127.0.0.1:8080"), 0);
    assert_string_equal(c.plain_listen.text, "127.0.0.1:8080");
    assert_int_equal(c.plain_listen.port, 8080);
    gw_cfg_cleanup(&c);
}

static void test_open_rule(void **state)
{
    struct gw_cfg c;
    char err[512];
    const char *allow;

    reset_env();
    allow = WRITE("allow.txt", "0x0000000000000000000000000000000000000001\n");
    assert_int_equal(LOAD(&c, err, "--listen", "0.0.0.0:8443"), -1);
    assert_string_equal(err, "--listen 0.0.0.0:8443 is not a loopback address, and neither "
                             "--allow nor --open is given: an open gateway lets anyone publish "
                             "pages under your domain; pass --allow FILE or --open");
    gw_cfg_cleanup(&c);
    EXPECT_ERR("an open gateway lets anyone publish pages under your domain",
               "--listen", "[::]:8443");
    EXPECT_ERR("--listen 192.168.1.10:8443 is not a loopback address", "--listen",
               "192.168.1.10:8443");
    EXPECT_ERR("--plain-listen 0.0.0.0:8080 is not a loopback address", "--plain-listen",
               "0.0.0.0:8080");

    assert_int_equal(LOAD(&c, err, "--listen", "0.0.0.0:8443", "--open"), 0);
    assert_true(c.open);
    assert_true(c.open_effective);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--listen", "0.0.0.0:8443", "--allow", allow), 0);
    assert_false(c.open_effective);
    assert_string_equal(c.allow_path, allow);
    gw_cfg_cleanup(&c);
    /* loopback addresses: open by default, unless an allow list is given */
    const char *loop[] = {"127.0.0.1:1", "127.5.6.7:1", "[::1]:1", "localhost:1",
                          "[::ffff:127.0.0.1]:1"};
    for (size_t i = 0; i < sizeof(loop) / sizeof(loop[0]); i++) {
        assert_int_equal(LOAD(&c, err, "--listen", loop[i]), 0);
        assert_true(c.open_effective);
        assert_true(gw_cfg_addr_is_loopback((const struct sockaddr *)&c.listen.ss));
        gw_cfg_cleanup(&c);
    }
    assert_int_equal(LOAD(&c, err, "--allow", allow), 0);
    assert_false(c.open_effective);
    gw_cfg_cleanup(&c);
    EXPECT_ERR("--allow and --open exclude each other", "--allow", allow, "--open");
    /* an empty value on a later layer clears a lower one */
    setenv("TUNNEL_GATEWAY_ALLOW", allow, 1);
    assert_int_equal(LOAD(&c, err, "--allow=", "--open"), 0);
    assert_null(c.allow_path);
    gw_cfg_cleanup(&c);
    reset_env();
}

static void test_cert_key(void **state)
{
    struct gw_cfg c;
    char err[512];

    reset_env();
    EXPECT_ERR("--cert and --key go together: --cert is set but --key is not", "--cert", "c.pem");
    EXPECT_ERR("--cert and --key go together: --key is set but --cert is not", "--key", "k.pem");
    assert_int_equal(LOAD(&c, err, "--cert", "c.pem", "--key", "k.pem"), 0);
    assert_string_equal(c.cert_path, "c.pem"); /* CLI paths stay as given */
    assert_string_equal(c.key_path, "k.pem");
    assert_int_equal(c.n_warnings, 0);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--cert", "c.pem", "--key", "k.pem", "--no-tls"), 0);
    assert_int_equal(c.n_warnings, 1);
    assert_contains(c.warnings[0], "--no-tls");
    gw_cfg_cleanup(&c);
}

static void test_state_dir(void **state)
{
    struct gw_cfg c;
    char err[512];
    char want[256];
    const char *path;

    reset_env();
    setenv("XDG_STATE_HOME", "/xdg/state", 1);
    assert_int_equal(LOAD0(&c, err), 0);
    assert_string_equal(c.state_dir, "/xdg/state/tunnel-gateway");
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--state-dir", "~/st"), 0);
    snprintf(want, sizeof(want), "%s/st", tmp_dir);
    assert_string_equal(c.state_dir, want);
    gw_cfg_cleanup(&c);
    path = WRITE("sd.toml", "state_dir = \"st2\"\n");
    assert_int_equal(LOAD(&c, err, "--config", path), 0);
    snprintf(want, sizeof(want), "%s/st2", tmp_dir);
    assert_string_equal(c.state_dir, want);
    gw_cfg_cleanup(&c);
    /* neither XDG_STATE_HOME nor HOME: needed without --cert, optional with it */
    unsetenv("XDG_STATE_HOME");
    unsetenv("HOME");
    assert_int_equal(LOAD0(&c, err), -1);
    assert_contains(err, "--state-dir: no default");
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--cert", "c.pem", "--key", "k.pem"), 0);
    assert_null(c.state_dir);
    gw_cfg_cleanup(&c);
    EXPECT_ERR("--state-dir: \"~/x\" starts with ~ but HOME is not set", "--state-dir", "~/x");
    reset_env();
}

static void test_domain(void **state)
{
    struct gw_cfg c;
    char err[512];
    char longname[256];

    reset_env();
    assert_int_equal(LOAD(&c, err, "--domain", "Tunnel.Example.COM"), 0);
    assert_string_equal(c.domain, "tunnel.example.com");
    gw_cfg_cleanup(&c);
    EXPECT_ERR("--domain: \"\" is empty", "--domain=");
    EXPECT_ERR("--domain: \"-bad.test\" is not a valid host name", "--domain", "-bad.test");
    EXPECT_ERR("--domain: \"bad-.test\" is not a valid host name", "--domain", "bad-.test");
    EXPECT_ERR("--domain: \"a..test\" is not a valid host name", "--domain", "a..test");
    EXPECT_ERR("--domain: \"a.test.\" is not a valid host name", "--domain", "a.test.");
    EXPECT_ERR("--domain: \"under_score.test\" is not a valid host name", "--domain",
               "under_score.test");
    EXPECT_ERR("--domain: \"10.0.0.1\" is not a host name (it ends in a number)", "--domain",
               "10.0.0.1");
    memset(longname, 'a', 64);
    memcpy(longname + 64, ".test", 6);
    EXPECT_ERR("is not a valid host name", "--domain", longname);
    /* 210 characters fit (with "<address>." in front: 253), 211 do not */
    for (size_t i = 0; i < 210; i++)
        longname[i] = (i % 50 == 49) ? '.' : 'a';
    longname[210] = '\0';
    assert_int_equal(LOAD(&c, err, "--domain", longname), 0);
    gw_cfg_cleanup(&c);
    longname[210] = 'a';
    longname[211] = '\0';
    EXPECT_ERR("is longer than 210 characters", "--domain", longname);
}

static void test_trust_proxy(void **state)
{
    struct gw_cfg c;
    char err[512];
    struct sockaddr_in s4 = {.sin_family = AF_INET};
    struct sockaddr_in6 s6 = {.sin6_family = AF_INET6};
    const struct sockaddr *p4 = (const struct sockaddr *)&s4;
    const struct sockaddr *p6 = (const struct sockaddr *)&s6;

    reset_env();
    assert_int_equal(LOAD(&c, err, "--trust-proxy", " 10.128.0.0/9 , 192.0.2.7,2001:db8::/32,"
                                                    "2001:db8:ffff::1/128"), 0);
    assert_int_equal(c.trust_proxy.n, 4);
    assert_int_equal(c.trust_proxy.v[0].family, AF_INET);
    assert_int_equal(c.trust_proxy.v[0].prefix, 9);
    assert_int_equal(c.trust_proxy.v[1].prefix, 32);
    assert_int_equal(c.trust_proxy.v[2].family, AF_INET6);
    assert_int_equal(c.trust_proxy.v[2].prefix, 32);
    assert_int_equal(c.trust_proxy.v[3].prefix, 128);
    /* /9: the ninth bit decides */
    inet_pton(AF_INET, "10.200.1.1", &s4.sin_addr);
    assert_true(gw_cfg_addr_trusted(&c, p4));
    inet_pton(AF_INET, "10.127.255.255", &s4.sin_addr);
    assert_false(gw_cfg_addr_trusted(&c, p4));
    /* /32: that host only */
    inet_pton(AF_INET, "192.0.2.7", &s4.sin_addr);
    assert_true(gw_cfg_addr_trusted(&c, p4));
    inet_pton(AF_INET, "192.0.2.6", &s4.sin_addr);
    assert_false(gw_cfg_addr_trusted(&c, p4));
    /* an IPv4-mapped IPv6 peer is its IPv4 address */
    inet_pton(AF_INET6, "::ffff:192.0.2.7", &s6.sin6_addr);
    assert_true(gw_cfg_addr_trusted(&c, p6));
    inet_pton(AF_INET6, "::ffff:192.0.2.8", &s6.sin6_addr);
    assert_false(gw_cfg_addr_trusted(&c, p6));
    /* IPv6 /32 and /128 */
    inet_pton(AF_INET6, "2001:db8:1234::5", &s6.sin6_addr);
    assert_true(gw_cfg_addr_trusted(&c, p6));
    inet_pton(AF_INET6, "2001:db9::5", &s6.sin6_addr);
    assert_false(gw_cfg_addr_trusted(&c, p6));
    inet_pton(AF_INET6, "2001:db8:ffff::1", &s6.sin6_addr);
    assert_true(gw_cfg_addr_trusted(&c, p6));
    gw_cfg_cleanup(&c);

    assert_int_equal(LOAD(&c, err, "--trust-proxy", "2001:db8:ffff::1/128"), 0);
    inet_pton(AF_INET6, "2001:db8:ffff::2", &s6.sin6_addr);
    assert_false(gw_cfg_addr_trusted(&c, p6));
    inet_pton(AF_INET6, "2001:db8:ffff::1", &s6.sin6_addr);
    assert_true(gw_cfg_addr_trusted(&c, p6));
    gw_cfg_cleanup(&c);

    /* /0 of one family matches all of that family, none of the other */
    assert_int_equal(LOAD(&c, err, "--trust-proxy", "0.0.0.0/0"), 0);
    inet_pton(AF_INET, "203.0.113.9", &s4.sin_addr);
    assert_true(gw_cfg_addr_trusted(&c, p4));
    inet_pton(AF_INET6, "2001:db8::1", &s6.sin6_addr);
    assert_false(gw_cfg_addr_trusted(&c, p6));
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--trust-proxy", "::/0"), 0);
    assert_true(gw_cfg_addr_trusted(&c, p6));
    assert_false(gw_cfg_addr_trusted(&c, p4));
    gw_cfg_cleanup(&c);

    /* nothing configured: nobody is trusted */
    assert_int_equal(LOAD0(&c, err), 0);
    assert_false(gw_cfg_addr_trusted(&c, p4));
    assert_false(gw_cfg_addr_trusted(&c, NULL));
    gw_cfg_cleanup(&c);

    EXPECT_ERR("--trust-proxy: \"10.0.0.0/33\" has a bad entry \"10.0.0.0/33\": it has a prefix "
               "length above 32", "--trust-proxy", "10.0.0.0/33");
    EXPECT_ERR("\"::/129\": it has a prefix length above 128", "--trust-proxy", "::/129");
    EXPECT_ERR("\"10.0.0.1/8\": it has bits set after the /8 prefix", "--trust-proxy",
               "10.0.0.1/8");
    EXPECT_ERR("\"10.0.0.0/\": it has a prefix length that is not a whole number",
               "--trust-proxy", "10.0.0.0/");
    EXPECT_ERR("\"10.0.0.0/-1\": it has a prefix length that is not", "--trust-proxy",
               "10.0.0.0/-1");
    EXPECT_ERR("\"10.0.0.0/8x\": it has a prefix length that is not", "--trust-proxy",
               "10.0.0.0/8x");
    EXPECT_ERR("\"proxy.internal\": it is not an IPv4 or IPv6 address", "--trust-proxy",
               "proxy.internal");
    EXPECT_ERR("\"10.0.0/8\": it is not an IPv4 or IPv6 address", "--trust-proxy", "10.0.0/8");
    EXPECT_ERR("has an empty entry", "--trust-proxy", "10.0.0.0/8,,fd00::/8");
    EXPECT_ERR("has an empty entry", "--trust-proxy", "10.0.0.0/8,");
}

static void test_urls(void **state)
{
    struct gw_cfg c;
    char err[512];

    reset_env();
    assert_int_equal(LOAD(&c, err, "--public-url-base", "HTTPS://Tunnel.Example.com:8443/"), 0);
    assert_true(c.public_url.https);
    assert_string_equal(c.public_url.host, "tunnel.example.com");
    assert_int_equal(c.public_url.port, 8443);
    assert_string_equal(c.public_url.text, "HTTPS://Tunnel.Example.com:8443");
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--public-url-base", "http://localhost"), 0);
    assert_false(c.public_url.https);
    assert_string_equal(c.public_url.host, "localhost");
    assert_int_equal(c.public_url.port, 0);
    gw_cfg_cleanup(&c);
    EXPECT_ERR("--public-url-base: \"ftp://x.test\" must start with https:// or http://",
               "--public-url-base", "ftp://x.test");
    EXPECT_ERR("must be only a scheme, host and port", "--public-url-base", "https://x.test/a");
    EXPECT_ERR("must be only a scheme, host and port", "--public-url-base", "https://u@x.test");
    EXPECT_ERR("must be only a scheme, host and port", "--public-url-base", "https://x.test?q");
    EXPECT_ERR("has a port that is not a number from 1 to 65535", "--public-url-base",
               "https://x.test:0");
    EXPECT_ERR("has a port that is not a number from 1 to 65535", "--public-url-base",
               "https://x.test:99999");
    EXPECT_ERR("has a host that is empty", "--public-url-base", "https://");
    EXPECT_ERR("has a host that is not a host name", "--public-url-base", "https://10.0.0.1");

    /* --redis needs the node listener and the cluster secret (an owner-only file). */
    char secret[] = "/tmp/test_cfg_secret_XXXXXX";
    int sfd = mkstemp(secret);
    assert_true(sfd >= 0);
    assert_int_equal(write(sfd, "0123456789abcdef0123456789abcdef!", 33), 33);
    close(sfd);
#define NODE "--node-listen", "127.0.0.1:9000", "--cluster-secret-file", secret
    assert_int_equal(LOAD(&c, err, "--redis", "redis://cache.internal", NODE), 0);
    assert_string_equal(c.redis.host, "cache.internal");
    assert_int_equal(c.redis.port, 6379);
    assert_int_equal(c.redis.db, 0);
    assert_null(c.redis.password);
    assert_string_equal(c.redis.text, "redis://cache.internal");
    assert_int_equal(c.cluster_secret_len, 33);
    assert_memory_equal(c.cluster_secret, "0123456789abcdef0123456789abcdef!", 33);
    assert_int_equal(c.redis_timeout_ms, 500);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--redis", "redis://10.0.0.5:6380/2", NODE), 0);
    assert_string_equal(c.redis.host, "10.0.0.5");
    assert_int_equal(c.redis.port, 6380);
    assert_int_equal(c.redis.db, 2);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--redis", "redis://[::1]:7000/0", NODE), 0);
    assert_string_equal(c.redis.host, "::1");
    assert_int_equal(c.redis.port, 7000);
    gw_cfg_cleanup(&c);
    assert_int_equal(LOAD(&c, err, "--redis", "redis://user:s3cr@t@x:1", NODE), 0);
    assert_string_equal(c.redis.password, "s3cr@t");
    assert_string_equal(c.redis.host, "x");
    gw_cfg_cleanup(&c);
    setenv("REDIS_URL", "redis://:pw@envhost", 1);
    assert_int_equal(LOAD(&c, err, NODE), 0);
    assert_string_equal(c.redis.host, "envhost");
    assert_string_equal(c.redis.password, "pw");
    gw_cfg_cleanup(&c);
    unsetenv("REDIS_URL");
    EXPECT_ERR("--redis: \"rediss://x:1\" uses TLS", "--redis", "rediss://x:1", NODE);
    EXPECT_ERR("must start with redis://", "--redis", "http://x:1", NODE);
    EXPECT_ERR("has credentials without a password", "--redis", "redis://user@x:1", NODE);
    EXPECT_ERR("has credentials without a password", "--redis", "redis://:@x:1", NODE);
    EXPECT_ERR("has a port that is not", "--redis", "redis://x:port", NODE);
    EXPECT_ERR("has a port that is not", "--redis", "redis://x:0", NODE);
    EXPECT_ERR("has a database that is not a whole number", "--redis", "redis://x/db1", NODE);
    EXPECT_ERR("has no host", "--redis", "redis://", NODE);
    EXPECT_ERR("not an IPv6 address", "--redis", "redis://[zz]:1", NODE);
    EXPECT_ERR("--redis: \"redis://x?a\" is not redis://HOST[:PORT][/DB]", "--redis",
               "redis://x?a", NODE);

    /* what a shared registry needs, and what needs one */
    EXPECT_ERR("(both unset)", "--redis", "redis://x");
    EXPECT_ERR("(--cluster-secret-file unset)", "--redis", "redis://x", "--node-listen",
               "127.0.0.1:9000");
    EXPECT_ERR("(--node-listen unset)", "--redis", "redis://x", "--cluster-secret-file", secret);
    EXPECT_ERR("--node-listen is for a node that shares routes: it needs --redis",
               "--node-listen", "127.0.0.1:9000");
    EXPECT_ERR("other nodes cannot dial", "--redis", "redis://x", "--node-listen", "0.0.0.0:9000",
               "--cluster-secret-file", secret);
    assert_int_equal(LOAD(&c, err, "--redis", "redis://x", "--node-listen", "0.0.0.0:9000",
                          "--node-advertise", "10.1.2.3:9000", "--cluster-secret-file", secret),
                     0);
    gw_cfg_cleanup(&c);
    EXPECT_ERR("is a wildcard address", "--redis", "redis://x", NODE, "--node-advertise",
               "0.0.0.0:9000");
    EXPECT_ERR("needs a port other nodes can dial", "--redis", "redis://x", NODE,
               "--node-advertise", "10.1.2.3:0");

    /* the secret file: owner-only, 32 bytes or more */
    assert_int_equal(chmod(secret, 0644), 0);
    EXPECT_ERR("must be owned by this user and not", "--redis", "redis://x", NODE);
    assert_int_equal(chmod(secret, 0600), 0);
    sfd = open(secret, O_WRONLY | O_TRUNC);
    assert_true(sfd >= 0);
    assert_int_equal(write(sfd, "short", 5), 5);
    close(sfd);
    EXPECT_ERR("the secret has 5 bytes", "--redis", "redis://x", NODE);
    unlink(secret);
    EXPECT_ERR("--cluster-secret-file", "--redis", "redis://x", NODE);
#undef NODE
}

/* Copy of s with every run of spaces and newlines made one space (undoes wrapping). */
static char *unwrap(const char *s)
{
    char *d = malloc(strlen(s) + 1);
    size_t o = 0;

    assert_non_null(d);
    for (size_t i = 0; s[i] != '\0'; i++) {
        bool ws = s[i] == ' ' || s[i] == '\n';
        if (!ws || o == 0 || d[o - 1] != ' ')
            d[o++] = ws ? ' ' : s[i];
    }
    d[o] = '\0';
    return d;
}

/* --help walks the table: every option, its env name, default and aliases. */
static void test_help(void **state)
{
    const struct cfg_spec *spec = gw_cfg_spec();
    char *text = NULL;
    char *flat;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    char buf[512];

    assert_non_null(f);
    gw_cfg_print_help(f);
    assert_int_equal(fclose(f), 0);
    flat = unwrap(text);
    assert_contains(text, "Usage: tunnel-gateway [OPTIONS]");
    /* wrapped for a terminal */
    for (const char *l = text; *l != '\0';) {
        size_t n = strcspn(l, "\n");
        if (n > 79)
            fail_msg("help line longer than 79 columns: %.*s", (int)n, l);
        l += n + (l[n] == '\n');
    }
    for (size_t i = 0; spec->ignored_keys[i] != NULL; i++)
        assert_contains(flat, spec->ignored_keys[i]);
    for (size_t i = 0; i < spec->nopts; i++) {
        const struct cfg_opt *o = &spec->opts[i];
        snprintf(buf, sizeof(buf), "\n  --%s%s", o->name, o->type == CFG_T_BOOL ? "\n" : " ");
        assert_contains(text, buf);
        assert_contains(flat, o->help);
        if (!(o->flags & CFG_F_CLI_ONLY)) {
            assert_int_equal(cfg_env_name(spec, o, buf, sizeof(buf)), 0);
            assert_contains(text, buf);
        }
        if (o->env != NULL)
            assert_contains(text, o->env);
        if (o->def != NULL) {
            snprintf(buf, sizeof(buf), "default: %s\n", o->def);
            assert_contains(text, buf);
        }
        for (size_t j = 0; o->file_aliases != NULL && o->file_aliases[j] != NULL; j++)
            assert_contains(text, o->file_aliases[j]);
        for (size_t j = 0; o->choices != NULL && o->choices[j].name != NULL; j++) {
            if (!o->choices[j].hidden)
                assert_contains(text, o->choices[j].name);
        }
    }
    /* the contract's names */
    assert_contains(text, "--max-response-header-timeout S");
    assert_contains(text, "default: ${XDG_STATE_HOME:-~/.local/state}/tunnel-gateway");
    assert_contains(text, "TUNNEL_GATEWAY_MAX_HEADER_BYTES");
    assert_contains(text, "env: TUNNEL_GATEWAY_PORT (wins over PORT)");
    assert_contains(flat, "(--config FILE, or TUNNEL_GATEWAY_CONFIG)");
    free(flat);
    free(text);
}

/* The engine's parser on its own: sections and decoded values reach the callback. */
struct rec {
    char seen[1024];
};

static int rec_kv(void *arg, const char *section, const char *key, const char *value,
                  unsigned line, char *err, size_t errlen)
{
    struct rec *r = arg;
    size_t used = strlen(r->seen);

    snprintf(r->seen + used, sizeof(r->seen) - used, "%u:[%s]%s=%s;", line, section, key, value);
    if (strcmp(key, "stop") == 0) {
        snprintf(err, errlen, "stopped at %u", line);
        return -1;
    }
    return 0;
}

static void test_parse_text(void **state)
{
    static const char text[] = "a = 1\n[logging]\nlog_dir = '/x'\n[ auth.x ]\nk = [1, \"2\"]\n"
                               "e = []\n";
    struct rec r = {{0}};
    char err[256];

    assert_int_equal(cfg_parse_text(text, sizeof(text) - 1, "t", rec_kv, &r, err, sizeof(err)),
                     0);
    assert_string_equal(r.seen, "1:[]a=1;3:[logging]log_dir=/x;5:[auth.x]k=1,2;6:[auth.x]e=;");
    memset(&r, 0, sizeof(r));
    assert_int_equal(cfg_parse_text("x = 1\nstop = 2\ny = 3\n", 18, "t", rec_kv, &r, err,
                                    sizeof(err)), -1);
    assert_string_equal(err, "stopped at 2");
    assert_string_equal(r.seen, "1:[]x=1;2:[]stop=2;");
    /* a length that cuts the text short is honoured */
    memset(&r, 0, sizeof(r));
    assert_int_equal(cfg_parse_text("a = \"xy\"", 6, "t", rec_kv, &r, err, sizeof(err)), -1);
    assert_string_equal(err, "t:1: unterminated string");
}

/* A file that is too large or not a regular file is refused. */
static void test_file_limits(void **state)
{
    struct gw_cfg c;
    char err[512];
    char *big = malloc(CFG_MAX_FILE_BYTES + 2);
    const char *path;

    reset_env();
    assert_non_null(big);
    memset(big, '#', CFG_MAX_FILE_BYTES + 1);
    path = write_file("big.toml", big, CFG_MAX_FILE_BYTES + 1);
    free(big);
    assert_int_equal(LOAD(&c, err, "--config", path), -1);
    assert_contains(err, "is larger than");
    gw_cfg_cleanup(&c);
    EXPECT_ERR("is not a regular file", "--config", tmp_dir);
    setenv("TUNNEL_GATEWAY_CONFIG", "/nonexistent.toml", 1);
    EXPECT_ERR("TUNNEL_GATEWAY_CONFIG: cannot open \"/nonexistent.toml\"", "--open");
    reset_env();
}

/* --- reload, sources, effective values (appended) ----------------------- */

struct change {
    char key[64];
    char old_value[128];
    char new_value[128];
    bool live;
};

struct changes {
    struct change v[16];
    size_t n;
};

static void record_change(void *arg, const char *key, const char *old_value,
                          const char *new_value, bool live)
{
    struct changes *c = arg;

    assert_true(c->n < 16);
    snprintf(c->v[c->n].key, sizeof(c->v[c->n].key), "%s", key);
    snprintf(c->v[c->n].old_value, sizeof(c->v[c->n].old_value), "%s", old_value);
    snprintf(c->v[c->n].new_value, sizeof(c->v[c->n].new_value), "%s", new_value);
    c->v[c->n].live = live;
    c->n++;
}

static const struct change *find_change(const struct changes *c, const char *key)
{
    for (size_t i = 0; i < c->n; i++) {
        if (strcmp(c->v[i].key, key) == 0)
            return &c->v[i];
    }
    return NULL;
}

static void test_reload_live_and_restart(void **state)
{
    struct gw_cfg cur;
    struct gw_cfg nw;
    struct changes ch = {0};
    char err[512];
    const char *path;
    char *domain_ptr;

    reset_env();
    path = WRITE("reload.toml", "max-header-bytes = 8192\ndomain = \"a.test\"\n"
                                "trust-proxy = \"10.0.0.0/8\"\nregion = \"eu\"\n");
    assert_int_equal(LOAD(&cur, err, "--config", path, "--max-body-bytes", "5"), 0);
    domain_ptr = cur.domain;
    WRITE("reload.toml", "max-header-bytes = 2000\ndomain = \"b.test\"\n"
                         "trust-proxy = \"192.168.0.0/16, ::1\"\nregion = \"eu\"\n"
                         "max-body-bytes = 9\nlisten = \"127.0.0.1:1\"\n");
    assert_int_equal(gw_cfg_reload(&cur, &nw, record_change, &ch, err, sizeof(err)), 0);
    /* live keys: the new value is in force */
    assert_int_equal(nw.max_header_bytes, 2000);
    assert_int_equal(nw.trust_proxy.n, 2);
    /* the command line still wins over the file */
    assert_int_equal(nw.max_body_bytes, 5);
    assert_null(find_change(&ch, "max-body-bytes"));
    /* restart-only keys keep the running value and its very string */
    assert_ptr_equal(nw.domain, domain_ptr);
    assert_string_equal(nw.domain, "a.test");
    assert_string_equal(nw.listen.text, "127.0.0.1:8443");
    assert_int_equal(ch.n, 5); /* port too: it shows the port of listen */
    const struct change *c = find_change(&ch, "max-header-bytes");
    assert_non_null(c);
    assert_true(c->live);
    assert_string_equal(c->old_value, "8192");
    assert_string_equal(c->new_value, "2000");
    c = find_change(&ch, "trust-proxy");
    assert_non_null(c);
    assert_true(c->live);
    assert_string_equal(c->old_value, "10.0.0.0/8");
    assert_string_equal(c->new_value, "192.168.0.0/16,::1/128");
    c = find_change(&ch, "domain");
    assert_non_null(c);
    assert_false(c->live);
    assert_string_equal(c->new_value, "b.test");
    c = find_change(&ch, "listen");
    assert_non_null(c);
    assert_false(c->live);
    assert_null(find_change(&ch, "region"));
    gw_cfg_cleanup(&cur);

    /* a second reload compares with what runs: domain differs again, the rest not */
    memset(&ch, 0, sizeof(ch));
    assert_int_equal(gw_cfg_reload(&nw, &cur, record_change, &ch, err, sizeof(err)), 0);
    assert_int_equal(ch.n, 3);
    assert_non_null(find_change(&ch, "port"));
    assert_non_null(find_change(&ch, "domain"));
    assert_non_null(find_change(&ch, "listen"));
    assert_ptr_equal(cur.domain, domain_ptr);
    gw_cfg_cleanup(&nw);
    gw_cfg_cleanup(&cur);
    reset_env();
}

static void test_reload_refused(void **state)
{
    struct gw_cfg cur;
    struct gw_cfg nw;
    struct changes ch = {0};
    char err[512];
    const char *path;

    reset_env();
    path = WRITE("refuse.toml", "max-header-bytes = 8192\n");
    assert_int_equal(LOAD(&cur, err, "--config", path), 0);
    WRITE("refuse.toml", "max-header-bytes = 2000\nmax-body-bytes = x\n");
    assert_int_equal(gw_cfg_reload(&cur, &nw, record_change, &ch, err, sizeof(err)), -1);
    assert_contains(err, "refuse.toml:2: max-body-bytes: \"x\" is not a whole number");
    assert_int_equal(ch.n, 0);
    assert_int_equal(cur.max_header_bytes, 8192);
    WRITE("refuse.toml", "response-header-timeout = 9\nmax-response-header-timeout = 3\n");
    assert_int_equal(gw_cfg_reload(&cur, &nw, record_change, &ch, err, sizeof(err)), -1);
    assert_contains(err, "exceeds --max-response-header-timeout 3");
    unlink(path);
    assert_int_equal(gw_cfg_reload(&cur, &nw, record_change, &ch, err, sizeof(err)), -1);
    assert_contains(err, "cannot open");
    assert_int_equal(ch.n, 0);
    /* cur is intact and still reloads once the file is good */
    WRITE("refuse.toml", "max-header-bytes = 100\n");
    assert_int_equal(gw_cfg_reload(&cur, &nw, NULL, NULL, err, sizeof(err)), 0);
    assert_int_equal(nw.max_header_bytes, 100);
    gw_cfg_cleanup(&nw);
    gw_cfg_cleanup(&cur);
    reset_env();
}

static void test_sources_and_effective(void **state)
{
    struct gw_cfg c;
    char err[512];
    char *out = NULL;
    size_t len = 0;
    FILE *f;
    const char *path;
    char want[512];

    reset_env();
    path = WRITE("src.toml", "\n# x\nregion = \"eu\"\n");
    setenv("TUNNEL_GATEWAY_PING_INTERVAL", "7", 1);
    setenv("PORT", "9443", 1);
    assert_int_equal(LOAD(&c, err, "--config", path, "--drain-timeout", "3"), 0);
    f = open_memstream(&out, &len);
    assert_non_null(f);
    gw_cfg_print_effective(&c, f);
    assert_int_equal(fclose(f), 0);
    snprintf(want, sizeof(want), "region = \"eu\"%*s# file %s:3\n", 44 - 13, "", path);
    assert_contains(out, want);
    assert_contains(out, "\ndrain-timeout = 3");
    assert_contains(out, "# command line\n");
    assert_contains(out, "# env TUNNEL_GATEWAY_PING_INTERVAL\n");
    assert_contains(out, "\nport = \"9443\"");
    assert_contains(out, "# env PORT\n");
    assert_contains(out, "\nlisten = \"127.0.0.1:9443\"");
    assert_contains(out, "\nmax-header-bytes = 65536");
    assert_contains(out, "\nlog-level = \"info\"");
    assert_null(strstr(out, "\nhelp ="));
    free(out);
    gw_cfg_cleanup(&c);
    reset_env();
}

static void test_show_and_swap(void **state)
{
    const struct cfg_spec *spec = gw_cfg_spec();
    struct gw_cfg a;
    struct gw_cfg b;
    char err[512];
    char buf[64];
    const struct cfg_opt *region = NULL;
    const struct cfg_opt *level = NULL;

    reset_env();
    for (size_t i = 0; i < spec->nopts; i++) {
        if (strcmp(spec->opts[i].name, "region") == 0)
            region = &spec->opts[i];
        if (strcmp(spec->opts[i].name, "log-level") == 0)
            level = &spec->opts[i];
    }
    assert_non_null(region);
    assert_non_null(level);
    assert_true(level->flags & CFG_F_LIVE);
    assert_false(region->flags & CFG_F_LIVE);
    assert_int_equal(LOAD(&a, err, "--region", "r1", "--log-level", "WARNING"), 0);
    assert_int_equal(LOAD(&b, err, "--region", "r2"), 0);
    assert_int_equal(cfg_show_value(level, &a, NULL, buf, sizeof(buf)), 0);
    assert_string_equal(buf, "warn");
    assert_int_equal(cfg_show_value(region, &a, NULL, buf, 2), -1);
    assert_int_equal(cfg_swap_field(region, &a, &b), 0);
    assert_string_equal(a.region, "r2");
    assert_string_equal(b.region, "r1");
    gw_cfg_cleanup(&a);
    gw_cfg_cleanup(&b);
    /* every limit is live */
    for (size_t i = 0; i < spec->nopts; i++) {
        if (strncmp(spec->opts[i].group, "Limits", 6) == 0 &&
            (strncmp(spec->opts[i].name, "max-", 4) == 0 ||
             strstr(spec->opts[i].name, "timeout") != NULL ||
             strstr(spec->opts[i].name, "per-") != NULL))
            assert_true(spec->opts[i].flags & CFG_F_LIVE);
    }
    reset_env();
}

static void test_generated_docs(void **state)
{
    const struct cfg_spec *spec = gw_cfg_spec();
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    char want[128];

    assert_non_null(f);
    cfg_print_example(spec, f);
    assert_int_equal(fclose(f), 0);
    for (size_t i = 0; i < spec->nopts; i++) {
        const struct cfg_opt *o = &spec->opts[i];
        if (o->flags & (CFG_F_CLI_ONLY | CFG_F_CONFIG))
            continue;
        snprintf(want, sizeof(want), "\n# %s = ", o->name);
        assert_contains(out, want);
    }
    assert_contains(out, "# max-header-bytes = 65536\n");
    assert_contains(out, "# domain = \"localhost\"\n");
    free(out);

    out = NULL;
    f = open_memstream(&out, &len);
    assert_non_null(f);
    cfg_print_man(spec, "1.2.3", ".SH X\n", f);
    assert_int_equal(fclose(f), 0);
    assert_contains(out, ".TH TUNNEL\\-GATEWAY 1 \"\" \"tunnel\\-gateway 1.2.3\"");
    assert_contains(out, "\n.B \\-\\-max\\-header\\-bytes \\fIN\\fR\n");
    assert_contains(out, "\n.SH X\n");
    free(out);

    out = NULL;
    f = open_memstream(&out, &len);
    assert_non_null(f);
    cfg_print_completion(spec, f);
    assert_int_equal(fclose(f), 0);
    assert_contains(out, "complete -F _tunnel_gateway tunnel-gateway\n");
    assert_contains(out, " --check-config");
    free(out);
}

/* --check-config output is itself a config file: strings round-trip as TOML. */
static void test_toml_string_escapes(void **state)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    (void)state;
    assert_non_null(f);
    cfg_print_toml_string(f, "a\"b\\c\nd\te\x7f");
    fclose(f);
    assert_string_equal(buf, "\"a\\\"b\\\\c\\u000ad\\u0009e\\u007f\"");
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_precedence),
        cmocka_unit_test(test_number_errors),
        cmocka_unit_test(test_bool_enum),
        cmocka_unit_test(test_cli_errors),
        cmocka_unit_test(test_help_version_flags),
        cmocka_unit_test(test_file_syntax),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_proxystore_file),
        cmocka_unit_test(test_port_host),
        cmocka_unit_test(test_open_rule),
        cmocka_unit_test(test_cert_key),
        cmocka_unit_test(test_state_dir),
        cmocka_unit_test(test_domain),
        cmocka_unit_test(test_trust_proxy),
        cmocka_unit_test(test_urls),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_parse_text),
        cmocka_unit_test(test_file_limits),
        cmocka_unit_test(test_reload_live_and_restart),
        cmocka_unit_test(test_reload_refused),
        cmocka_unit_test(test_sources_and_effective),
        cmocka_unit_test(test_show_and_swap),
        cmocka_unit_test(test_generated_docs),
        cmocka_unit_test(test_toml_string_escapes),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
