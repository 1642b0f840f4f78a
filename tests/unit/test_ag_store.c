/* Unit tests for agent/ag_store: home resolution, round trip (unknown keys
 * kept), atomic writes, corrupt files reported and left alone, names, URLs,
 * key files and their modes, remove/purge. Each test works in its own
 * mkdtemp() directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ag_store.h"
#include "id.h"

/* A fixed, valid private key (any 1 <= d < n will do). */
#define TEST_PRIV_HEX "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"

static int rm_rf(const char *path)
{
    struct stat st;
    char sub[PATH_MAX];

    if (lstat(path, &st) == -1)
        return 0;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        if (d == NULL)
            return -1;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(sub, sizeof(sub), "%s/%s", path, e->d_name);
            rm_rf(sub);
        }
        closedir(d);
        return rmdir(path);
    }
    return unlink(path);
}

static int setup_dir(void **state)
{
    char *dir = strdup("/tmp/test_ag_store.XXXXXX");

    if (dir == NULL || mkdtemp(dir) == NULL)
        return -1;
    *state = dir;
    return 0;
}

static int teardown_dir(void **state)
{
    rm_rf(*state);
    free(*state);
    return 0;
}

static void path_in(char *out, size_t len, const char *dir, const char *name)
{
    assert_true(snprintf(out, len, "%s/%s", dir, name) < (int)len);
}

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;

    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void write_all(const char *path, const char *data, size_t len, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    assert_int_equal(fchmod(fd, mode), 0);
    close(fd);
}

static mode_t mode_of(const char *path)
{
    struct stat st;

    assert_int_equal(stat(path, &st), 0);
    return st.st_mode & 07777;
}

static struct ag_store *open_w(const char *home)
{
    char err[AG_STORE_ERR_LEN] = "";
    struct ag_store *s = ag_store_open(home, AG_STORE_WRITE, err, sizeof(err));

    if (s == NULL)
        fail_msg("open %s: %s", home, err);
    return s;
}

static void test_home_resolve(void **state)
{
    char out[PATH_MAX];
    char err[256];

    assert_int_equal(
        ag_store_home_resolve("/opt/h/", "/e", "/x", "/u", out, sizeof(out), err, sizeof(err)), 0);
    assert_string_equal(out, "/opt/h");
    assert_int_equal(
        ag_store_home_resolve(NULL, "/e", "/x", "/u", out, sizeof(out), err, sizeof(err)), 0);
    assert_string_equal(out, "/e");
    assert_int_equal(ag_store_home_resolve("", "", "/x", "/u", out, sizeof(out), err, sizeof(err)),
                     0);
    assert_string_equal(out, "/x/tunnel-agent");
    assert_int_equal(
        ag_store_home_resolve(NULL, NULL, NULL, "/u", out, sizeof(out), err, sizeof(err)), 0);
    assert_string_equal(out, "/u/.config/tunnel-agent");
    assert_int_equal(
        ag_store_home_resolve(NULL, NULL, NULL, NULL, out, sizeof(out), err, sizeof(err)), -1);
    assert_non_null(strstr(err, "--home"));
    assert_int_equal(
        ag_store_home_resolve("/a/very/long/path", NULL, NULL, NULL, out, 8, err, sizeof(err)), -1);
}

static void assert_agent_equal(const struct ag_agent *x, const struct ag_agent *y)
{
    assert_string_equal(x->name, y->name);
    assert_string_equal(x->id, y->id);
    assert_string_equal(x->address, y->address);
    assert_string_equal(x->target, y->target);
    assert_int_equal(x->enabled, y->enabled);
    assert_int_equal(x->preserve_host, y->preserve_host);
    assert_int_equal(x->max_inflight, y->max_inflight);
    assert_string_equal(x->id_header, y->id_header);
    assert_int_equal(x->response_timeout_s, y->response_timeout_s);
    assert_string_equal(x->key_file, y->key_file);
    assert_int_equal(x->created, y->created);
    assert_int_equal(x->superseded, y->superseded);
}

static void test_round_trip(void **state)
{
    const char *dir = *state;
    char home[PATH_MAX];
    char err[AG_STORE_ERR_LEN] = "";
    struct ag_agent *a;
    struct ag_agent copy_a, copy_b;
    struct ag_store *s;

    path_in(home, sizeof(home), dir, "deep/er/home"); /* parents are created */
    s = open_w(home);
    assert_int_equal(mode_of(home), 0700);
    assert_int_equal(ag_store_count(s), 0);
    assert_null(ag_store_gateway(s));
    assert_int_equal(
        ag_store_new_agent(s, "alpha", "http://127.0.0.1:8080", NULL, &a, err, sizeof(err)), 0);
    assert_false(a->enabled);
    assert_int_equal(a->max_inflight, AG_DEFAULT_MAX_INFLIGHT);
    assert_string_equal(a->id_header, "X-Agent-Id");
    assert_int_equal(a->response_timeout_s, 0);
    assert_false(a->preserve_host);
    assert_string_equal(a->key_file, "alpha.key");
    assert_int_equal(strlen(a->address), ID_ADDR_STR_LEN);
    assert_int_equal(strlen(a->id), 36);
    assert_int_equal(
        ag_store_new_agent(s, "beta", "http://[::1]:9000/api/", NULL, &a, err, sizeof(err)), 0);
    a->enabled = true;
    a->preserve_host = true;
    a->max_inflight = 7;
    snprintf(a->id_header, sizeof(a->id_header), "X-Who");
    a->response_timeout_s = 30;
    a->superseded = true;
    assert_int_equal(ag_store_set_gateway(s, "wss://gw.example.com:8443", err, sizeof(err)), 0);
    assert_int_equal(ag_store_set_ca_file(s, "/etc/ca.pem", err, sizeof(err)), 0);
    ag_store_set_protocol(s, AG_PROTO_OSAURUS);
    assert_int_equal(ag_store_save(s, err, sizeof(err)), 0);
    copy_a = *ag_store_find(s, "alpha");
    copy_b = *ag_store_find(s, "beta");
    ag_store_free(s);

    s = ag_store_open(home, AG_STORE_READ, err, sizeof(err));
    assert_non_null(s);
    assert_int_equal(ag_store_count(s), 2);
    assert_string_equal(ag_store_agent(s, 0)->name, "alpha"); /* file order kept */
    assert_agent_equal(ag_store_find(s, "alpha"), &copy_a);
    assert_agent_equal(ag_store_find(s, "beta"), &copy_b);
    assert_true(copy_b.enabled && copy_b.preserve_host && copy_b.superseded);
    assert_int_equal(copy_b.max_inflight, 7);
    assert_int_equal(copy_b.response_timeout_s, 30);
    assert_string_equal(copy_b.id_header, "X-Who");
    assert_string_equal(copy_b.target, "http://[::1]:9000/api/");
    assert_true(copy_a.created > 0);
    assert_null(ag_store_find(s, "gamma"));
    assert_string_equal(ag_store_gateway(s), "wss://gw.example.com:8443");
    assert_string_equal(ag_store_ca_file(s), "/etc/ca.pem");
    assert_int_equal(ag_store_protocol(s), AG_PROTO_OSAURUS);
    /* A read-only store refuses to save. */
    assert_int_equal(ag_store_save(s, err, sizeof(err)), -1);
    ag_store_free(s);
}

static void test_unknown_keys_kept(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    char err[AG_STORE_ERR_LEN] = "";
    struct ag_store *s;
    struct ag_agent *a;
    size_t len;
    char *text;

    s = open_w(dir);
    assert_int_equal(ag_store_new_agent(s, "a", "http://localhost:1", NULL, &a, err, sizeof(err)),
                     0);
    ag_store_free(s);
    /* Add fields a newer version might write, at both levels. */
    path_in(path, sizeof(path), dir, "agents.json");
    text = read_all(path, &len);
    char *agents = strstr(text, "\"agents\"");
    char *name = strstr(text, "\"name\"");
    assert_non_null(agents);
    assert_non_null(name);
    size_t cap = len + 200;
    char *edited = malloc(cap);
    assert_non_null(edited);
    snprintf(edited, cap, "%.*s\"future_top\": {\"x\": [1, 2]},\n%.*s\"future_agent\": \"v\", %s",
             (int)(agents - text), text, (int)(name - agents), agents, name);
    write_all(path, edited, strlen(edited), 0600);
    free(edited);
    free(text);

    s = open_w(dir);
    a = ag_store_find(s, "a");
    assert_non_null(a);
    a->enabled = true;
    assert_int_equal(ag_store_save(s, err, sizeof(err)), 0);
    ag_store_free(s);
    text = read_all(path, &len);
    assert_non_null(strstr(text, "\"future_top\""));
    assert_non_null(strstr(text, "\"future_agent\":\t\"v\""));
    assert_non_null(strstr(text, "\"enabled\":\ttrue"));
    free(text);
}

/* Lists dir's entries that are neither wanted nor "." / "..". */
static int count_unexpected(const char *dir, const char *const *wanted, size_t n)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int extra = 0;

    assert_non_null(d);
    while ((e = readdir(d)) != NULL) {
        bool ok = strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
        for (size_t i = 0; i < n && !ok; i++)
            ok = strcmp(e->d_name, wanted[i]) == 0;
        if (!ok) {
            print_message("unexpected file: %s/%s\n", dir, e->d_name);
            extra++;
        }
    }
    closedir(d);
    return extra;
}

static void test_atomic_no_temp_files(void **state)
{
    const char *dir = *state;
    static const char *const top[] = {"agents.json", ".lock", "keys"};
    static const char *const keys[] = {"k0.key", "k1.key", "k2.key"};
    char err[AG_STORE_ERR_LEN] = "";
    char path[PATH_MAX];
    char name[8];
    struct ag_store *s = open_w(dir);

    for (int i = 0; i < 3; i++) {
        snprintf(name, sizeof(name), "k%d", i);
        assert_int_equal(
            ag_store_new_agent(s, name, "http://127.0.0.1:80", NULL, NULL, err, sizeof(err)), 0);
    }
    /* Each save replaces the file by rename (a new inode), never rewrites it
     * in place: a reader holding the old one keeps a whole document. */
    path_in(path, sizeof(path), dir, "agents.json");
    for (int i = 0; i < 5; i++) {
        struct stat before, after;
        size_t len_before, len_old;
        char *text_before = read_all(path, &len_before);
        int old_fd = open(path, O_RDONLY);
        assert_true(old_fd >= 0);
        assert_int_equal(fstat(old_fd, &before), 0);
        ag_store_agent(s, 0)->enabled = (i % 2) == 0;
        assert_int_equal(ag_store_save(s, err, sizeof(err)), 0);
        assert_int_equal(stat(path, &after), 0);
        assert_true(before.st_ino != after.st_ino);
        char *old_text = malloc(len_before + 1);
        assert_non_null(old_text);
        len_old = (size_t)read(old_fd, old_text, len_before + 1);
        assert_int_equal(len_old, len_before);
        assert_memory_equal(old_text, text_before, len_before);
        free(old_text);
        free(text_before);
        close(old_fd);
    }
    ag_store_free(s);
    assert_int_equal(count_unexpected(dir, top, 3), 0);
    path_in(path, sizeof(path), dir, "keys");
    assert_int_equal(count_unexpected(path, keys, 3), 0);
    path_in(path, sizeof(path), dir, "agents.json");
    assert_int_equal(mode_of(path), 0600);
}

static void test_truncated_file(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    char err[AG_STORE_ERR_LEN] = "";
    struct ag_store *s = open_w(dir);
    size_t len, len2;
    char *good;
    char *after;

    assert_int_equal(
        ag_store_new_agent(s, "a", "http://127.0.0.1:80", NULL, NULL, err, sizeof(err)), 0);
    ag_store_free(s);
    path_in(path, sizeof(path), dir, "agents.json");
    good = read_all(path, &len);
    write_all(path, good, len / 2, 0600); /* cut in the middle */

    for (int mode = AG_STORE_READ; mode <= AG_STORE_WRITE; mode++) {
        err[0] = '\0';
        s = ag_store_open(dir, (enum ag_store_mode)mode, err, sizeof(err));
        assert_null(s);
        assert_non_null(strstr(err, path));
        assert_non_null(strstr(err, "invalid JSON near byte"));
        assert_non_null(strstr(err, "fix or move it away"));
    }
    after = read_all(path, &len2);
    assert_int_equal(len2, len / 2);
    assert_memory_equal(after, good, len2);
    free(after);

    /* Empty, trailing garbage, wrong version, bad field: each named. */
    write_all(path, "", 0, 0600);
    assert_null(ag_store_open(dir, AG_STORE_WRITE, err, sizeof(err)));
    assert_non_null(strstr(err, "empty file"));
    write_all(path, "{\"version\":1} x", 15, 0600);
    assert_null(ag_store_open(dir, AG_STORE_READ, err, sizeof(err)));
    assert_non_null(strstr(err, "near byte 14"));
    write_all(path, "{\"version\":2}", 13, 0600);
    assert_null(ag_store_open(dir, AG_STORE_READ, err, sizeof(err)));
    assert_non_null(strstr(err, "version 2"));
    write_all(path, "[]", 2, 0600);
    assert_null(ag_store_open(dir, AG_STORE_READ, err, sizeof(err)));
    assert_non_null(strstr(err, "not a JSON object"));

    char *bad = strdup(good);
    assert_non_null(bad);
    char *mi = strstr(bad, "\"max_inflight\":\t64");
    assert_non_null(mi);
    memcpy(mi + strlen("\"max_inflight\":\t"), "-1", 2); /* out of range */
    write_all(path, bad, strlen(bad), 0600);
    assert_null(ag_store_open(dir, AG_STORE_READ, err, sizeof(err)));
    assert_non_null(strstr(err, "agents[0]"));
    assert_non_null(strstr(err, "max_inflight"));
    free(bad);
    free(good);
}

static void test_duplicates(void **state)
{
    const char *dir = *state;
    char err[AG_STORE_ERR_LEN] = "";
    char keypath[PATH_MAX];
    char path[PATH_MAX];
    struct ag_store *s = open_w(dir);
    struct ag_agent *a;
    size_t len;
    char *text;

    assert_int_equal(
        ag_store_new_agent(s, "dup", "http://127.0.0.1:80", NULL, NULL, err, sizeof(err)), 0);
    assert_int_equal(
        ag_store_new_agent(s, "dup", "http://127.0.0.1:81", NULL, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "already exists"));
    assert_int_equal(ag_store_count(s), 1);

    /* The same key imported twice: the second is refused, nothing left. */
    path_in(keypath, sizeof(keypath), dir, "import.hex");
    write_all(keypath, TEST_PRIV_HEX "\n", 65, 0600);
    assert_int_equal(
        ag_store_new_agent(s, "imp1", "http://127.0.0.1:80", keypath, &a, err, sizeof(err)), 0);
    assert_int_equal(
        ag_store_new_agent(s, "imp2", "http://127.0.0.1:80", keypath, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "already belongs to agent \"imp1\""));
    assert_int_equal(ag_store_count(s), 2);
    path_in(path, sizeof(path), dir, "keys/imp2.key");
    assert_int_equal(access(path, F_OK), -1);
    ag_store_free(s);

    /* Two agents with one name in the file: refused on load. */
    path_in(path, sizeof(path), dir, "agents.json");
    text = read_all(path, &len);
    char *p = strstr(text, "\"imp1\"");
    assert_non_null(p);
    memcpy(p, "\"dup\" ", 6);
    write_all(path, text, len, 0600);
    assert_null(ag_store_open(dir, AG_STORE_READ, err, sizeof(err)));
    assert_non_null(strstr(err, "appears twice"));
    free(text);
}

static void test_names(void **state)
{
    static const char *const good[] = {"a", "A-b_c.9", "x.y", "-", "0123456789"};
    static const char *const bad[] = {"", "a b", "a/b", "é", "a:b", "a\n", "..\\x"};
    char n65[66];

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        assert_true(ag_store_name_is_valid(good[i]));
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_false(ag_store_name_is_valid(bad[i]));
    memset(n65, 'a', 65);
    n65[65] = '\0';
    assert_false(ag_store_name_is_valid(n65));
    n65[64] = '\0';
    assert_true(ag_store_name_is_valid(n65));

    assert_true(ag_store_header_is_valid("X-Agent-Id"));
    assert_true(ag_store_header_is_valid("x!#$%&'*+-.^_`|~"));
    assert_false(ag_store_header_is_valid(""));
    assert_false(ag_store_header_is_valid("X Agent"));
    assert_false(ag_store_header_is_valid("X:A"));
    assert_false(ag_store_header_is_valid("X(A)"));
}

static void test_new_agent_refusals(void **state)
{
    const char *dir = *state;
    char err[AG_STORE_ERR_LEN] = "";
    struct ag_store *s = open_w(dir);
    struct ag_store *r;

    assert_int_equal(
        ag_store_new_agent(s, "bad name", "http://127.0.0.1:80", NULL, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "invalid agent name"));
    assert_int_equal(ag_store_new_agent(s, "ok", "ftp://x:1", NULL, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "ftp://x:1"));
    assert_int_equal(ag_store_count(s), 0);
    ag_store_free(s);

    r = ag_store_open(dir, AG_STORE_READ, err, sizeof(err));
    assert_non_null(r);
    assert_int_equal(
        ag_store_new_agent(r, "ok", "http://127.0.0.1:80", NULL, NULL, err, sizeof(err)), -1);
    ag_store_free(r);
}

static void test_urls(void **state)
{
    struct ag_target t;
    struct ag_gateway g;
    char err[AG_STORE_ERR_LEN];
    char url[256];
    static const char *const bad_targets[] = {
        "",
        "127.0.0.1:80",
        "ftp://h:1",
        "http://",
        "http://:80",
        "http://h:0",
        "http://h:65536",
        "http://h:x",
        "http://h:",
        "http://u@h:80",
        "http://h:80/a?b",
        "http://h:80/#f",
        "http://h a:80",
        "http://[::1:80",
        "http://[zz]:80",
        "http://h:80/a b",
    };

    assert_int_equal(ag_store_target_parse("http://127.0.0.1:8080", &t, err, sizeof(err)), 0);
    assert_false(t.tls);
    assert_string_equal(t.host, "127.0.0.1");
    assert_int_equal(t.port, 8080);
    assert_string_equal(t.base, "");
    assert_int_equal(ag_store_target_parse("http://Local-Host/v1//", &t, err, sizeof(err)), 0);
    assert_int_equal(t.port, 80);
    assert_string_equal(t.base, "/v1");
    assert_int_equal(ag_store_target_parse("https://[::1]:8443/x", &t, err, sizeof(err)), 0);
    assert_true(t.tls);
    assert_string_equal(t.host, "::1");
    assert_int_equal(t.port, 8443);
    for (size_t i = 0; i < sizeof(bad_targets) / sizeof(bad_targets[0]); i++) {
        err[0] = '\0';
        if (ag_store_target_parse(bad_targets[i], &t, err, sizeof(err)) != -1)
            fail_msg("accepted target \"%s\"", bad_targets[i]);
        assert_true(err[0] != '\0');
    }

    assert_int_equal(ag_store_gateway_parse("wss://gw.example.com", &g, err, sizeof(err)), 0);
    assert_true(g.tls);
    assert_int_equal(g.port, 443);
    assert_string_equal(g.host, "gw.example.com");
    assert_string_equal(g.path, "/tunnel/connect");
    assert_int_equal(
        ag_store_gateway_parse("ws://localhost:8080/tunnel/connect", &g, err, sizeof(err)), 0);
    assert_false(g.tls);
    assert_int_equal(g.port, 8080);
    assert_int_equal(ag_store_gateway_parse("https://gw", &g, err, sizeof(err)), -1);
    assert_int_equal(ag_store_gateway_parse("wss://gw/other", &g, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "/tunnel/connect is implied"));

    assert_int_equal(ag_store_gateway_parse("wss://gw.example.com", &g, err, sizeof(err)), 0);
    assert_int_equal(ag_store_public_url(&g, "0xab", url, sizeof(url)), 0);
    assert_string_equal(url, "https://0xab.gw.example.com");
    assert_int_equal(ag_store_gateway_parse("ws://localhost:8080", &g, err, sizeof(err)), 0);
    assert_int_equal(ag_store_public_url(&g, "0xab", url, sizeof(url)), 0);
    assert_string_equal(url, "http://0xab.localhost:8080");
    assert_int_equal(ag_store_public_url(NULL, "0xab", url, sizeof(url)), 0);
    assert_string_equal(url, "https://0xab.<your gateway domain>");
    assert_int_equal(ag_store_public_url(NULL, "0xab", url, 10), -1);
}

static void test_key_files(void **state)
{
    const char *dir = *state;
    char err[AG_STORE_ERR_LEN] = "";
    char path[PATH_MAX];
    char keypath[PATH_MAX];
    char addr[ID_ADDR_STR_LEN + 1];
    struct id_key ref, k;
    struct ag_agent *a;
    struct ag_store *s = open_w(dir);

    assert_int_equal(id_key_parse_hex(&ref, TEST_PRIV_HEX, strlen(TEST_PRIV_HEX)), ID_OK);
    id_addr_to_str(ref.addr, addr);

    /* A group-readable import is refused with the fix named; nothing left. */
    path_in(keypath, sizeof(keypath), dir, "import.hex");
    write_all(keypath, TEST_PRIV_HEX "\n", 65, 0644);
    assert_int_equal(
        ag_store_new_agent(s, "imp", "http://127.0.0.1:80", keypath, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, keypath));
    assert_non_null(strstr(err, "chmod"));
    assert_int_equal(ag_store_count(s), 0);

    /* Owner-only import: same address, stored 0600 in a 0700 keys/. */
    assert_int_equal(chmod(keypath, 0600), 0);
    assert_int_equal(
        ag_store_new_agent(s, "imp", "http://127.0.0.1:80", keypath, &a, err, sizeof(err)), 0);
    assert_string_equal(a->address, addr);
    assert_int_equal(ag_store_key_path(s, a, path, sizeof(path)), 0);
    assert_int_equal(mode_of(path), 0600);
    path_in(path, sizeof(path), dir, "keys");
    assert_int_equal(mode_of(path), 0700);
    assert_int_equal(ag_store_load_key(s, a, &k, err, sizeof(err)), 0);
    assert_memory_equal(k.priv, ref.priv, 32);

    /* A key file that went group-readable is refused on load. */
    assert_int_equal(ag_store_key_path(s, a, path, sizeof(path)), 0);
    assert_int_equal(chmod(path, 0640), 0);
    assert_int_equal(ag_store_load_key(s, a, &k, err, sizeof(err)), -1);
    assert_non_null(strstr(err, path));
    assert_int_equal(chmod(path, 0600), 0);

    /* A key file swapped for another key is caught by the address check. */
    struct id_key other;
    assert_int_equal(id_key_generate(&other), ID_OK);
    assert_int_equal(id_key_write(path, &other), ID_OK);
    assert_int_equal(ag_store_load_key(s, a, &k, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "holds the key of"));

    /* A stray keys/<name>.key is never overwritten: the new agent uses its id. */
    path_in(path, sizeof(path), dir, "keys/stray.key");
    write_all(path, "precious\n", 9, 0600);
    assert_int_equal(
        ag_store_new_agent(s, "stray", "http://127.0.0.1:80", NULL, &a, err, sizeof(err)), 0);
    char want[64];
    snprintf(want, sizeof(want), "%s.key", a->id);
    assert_string_equal(a->key_file, want);
    size_t len;
    char *kept = read_all(path, &len);
    assert_string_equal(kept, "precious\n");
    free(kept);
    ag_store_free(s);
}

static void test_remove(void **state)
{
    const char *dir = *state;
    char err[AG_STORE_ERR_LEN] = "";
    char path[PATH_MAX];
    char moved[PATH_MAX];
    char removed_dir[PATH_MAX];
    struct ag_agent *a;
    struct ag_store *s = open_w(dir);
    size_t len1, len2;

    assert_int_equal(
        ag_store_new_agent(s, "keep", "http://127.0.0.1:80", NULL, &a, err, sizeof(err)), 0);
    assert_int_equal(ag_store_key_path(s, a, path, sizeof(path)), 0);
    char *key_before = read_all(path, &len1);
    assert_int_equal(
        ag_store_new_agent(s, "gone", "http://127.0.0.1:80", NULL, NULL, err, sizeof(err)), 0);
    assert_int_equal(
        ag_store_new_agent(s, "other", "http://127.0.0.1:80", NULL, NULL, err, sizeof(err)), 0);

    assert_int_equal(
        ag_store_remove_agent(s, "nope", false, moved, sizeof(moved), err, sizeof(err)), -1);
    assert_non_null(strstr(err, "no agent named"));

    assert_int_equal(
        ag_store_remove_agent(s, "keep", false, moved, sizeof(moved), err, sizeof(err)), 0);
    path_in(removed_dir, sizeof(removed_dir), dir, "removed/keep-");
    assert_memory_equal(moved, removed_dir, strlen(removed_dir));
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(mode_of(moved), 0600);
    char *key_after = read_all(moved, &len2);
    assert_int_equal(len1, len2);
    assert_memory_equal(key_before, key_after, len1);
    free(key_before);
    free(key_after);

    a = ag_store_find(s, "gone");
    assert_non_null(a);
    assert_int_equal(ag_store_key_path(s, a, path, sizeof(path)), 0);
    assert_int_equal(ag_store_remove_agent(s, "gone", true, moved, sizeof(moved), err, sizeof(err)),
                     0);
    assert_string_equal(moved, "");
    assert_int_equal(access(path, F_OK), -1);
    ag_store_free(s);

    s = ag_store_open(dir, AG_STORE_READ, err, sizeof(err));
    assert_non_null(s);
    assert_int_equal(ag_store_count(s), 1);
    assert_string_equal(ag_store_agent(s, 0)->name, "other");
    ag_store_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_home_resolve),
        cmocka_unit_test_setup_teardown(test_round_trip, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_unknown_keys_kept, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_atomic_no_temp_files, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_truncated_file, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_duplicates, setup_dir, teardown_dir),
        cmocka_unit_test(test_names),
        cmocka_unit_test_setup_teardown(test_new_agent_refusals, setup_dir, teardown_dir),
        cmocka_unit_test(test_urls),
        cmocka_unit_test_setup_teardown(test_key_files, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_remove, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
