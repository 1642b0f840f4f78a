/* libFuzzer target for common/cfg's config-file reader: arbitrary bytes go to
 * cfg_parse_text() (checking what reaches the callback: keys and sections in
 * their alphabets, lines increasing) and to cfg_apply_text() over a table with
 * one option of every type, which must leave values within their bounds,
 * always explain a failure, and free everything (ASan's leak check). */
#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cfg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct fz_cfg {
    char *conf;
    char *str;
    char *path;
    uint64_t num;
    uint64_t secs;
    bool flag;
    int choice;
    char *custom;
};

static int fz_parse_custom(const struct cfg_opt *opt, const char *value, void *field, char *why,
                           size_t whylen)
{
    char **p = field;
    char *s;

    if (strchr(value, '!') != NULL) {
        snprintf(why, whylen, "has a '!'");
        return -1;
    }
    s = strdup(value);
    if (s == NULL) {
        snprintf(why, whylen, "could not be stored: out of memory");
        return -1;
    }
    free(*p);
    *p = s;
    return 0;
}

static void fz_release_custom(void *field)
{
    char **p = field;

    free(*p);
    *p = NULL;
}

static const struct cfg_choice fz_choices[] = {
    {"one", 1, false},
    {"two", 2, false},
    {"deux", 2, true},
    {NULL, 0, false},
};

static const char *const fz_aliases[] = {"alias", "other_alias", NULL};
static const char *const fz_ignored[] = {"ignored_key", NULL};

#define OFF(f) offsetof(struct fz_cfg, f)

static const struct cfg_opt fz_opts[] = {
    {.name = "config", .type = CFG_T_PATH, .flags = CFG_F_CONFIG, .offset = OFF(conf),
     .group = "g", .help = "h"},
    {.name = "str", .type = CFG_T_STRING, .offset = OFF(str), .def = "d", .group = "g",
     .help = "h", .file_aliases = fz_aliases},
    {.name = "path", .type = CFG_T_PATH, .offset = OFF(path), .group = "g", .help = "h"},
    {.name = "num", .type = CFG_T_UINT, .offset = OFF(num), .def = "5", .max = 1000,
     .group = "g", .help = "h"},
    {.name = "secs", .type = CFG_T_SECONDS, .offset = OFF(secs), .max = UINT64_MAX,
     .group = "g", .help = "h"},
    {.name = "flag", .type = CFG_T_BOOL, .offset = OFF(flag), .group = "g", .help = "h"},
    {.name = "help", .type = CFG_T_BOOL, .flags = CFG_F_CLI_ONLY | CFG_F_EXIT,
     .offset = OFF(flag), .group = "g", .help = "h"},
    {.name = "choice", .type = CFG_T_ENUM, .offset = OFF(choice), .def = "one",
     .choices = fz_choices, .group = "g", .help = "h"},
    {.name = "custom", .type = CFG_T_CUSTOM, .offset = OFF(custom), .parse = fz_parse_custom,
     .release = fz_release_custom, .group = "g", .help = "h"},
};

static const struct cfg_spec fz_spec = {
    .prog = "fuzz",
    .summary = "s",
    .env_prefix = "FUZZ_CFG",
    .opts = fz_opts,
    .nopts = sizeof(fz_opts) / sizeof(fz_opts[0]),
    .ignored_keys = fz_ignored,
};

struct fz_seen {
    unsigned last_line;
    size_t size;
};

static bool all_in(const char *s, const char *alphabet)
{
    return strspn(s, alphabet) == strlen(s);
}

static int fz_on_kv(void *arg, const char *section, const char *key, const char *value,
                    unsigned line, char *err, size_t errlen)
{
    static const char key_chars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                    "0123456789_-";
    static const char section_chars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                        "0123456789_-.";
    struct fz_seen *seen = arg;

    assert(key[0] != '\0' && all_in(key, key_chars));
    assert(all_in(section, section_chars));
    assert(strlen(value) <= seen->size);
    assert(line > seen->last_line);
    seen->last_line = line;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_seen seen = {0, size};
    struct fz_cfg c = {0};
    struct cfg_warnings warn = {NULL, 0};
    char err[512];

    err[0] = '\0';
    if (cfg_parse_text((const char *)data, size, "fuzz.toml", fz_on_kv, &seen, err,
                       sizeof(err)) != 0)
        assert(strncmp(err, "fuzz.toml:", 10) == 0);

    err[0] = '\0';
    if (cfg_apply_text(&fz_spec, &c, (const char *)data, size, "/fz/fuzz.toml", &warn, err,
                       sizeof(err)) == 0) {
        assert(c.num <= 1000);
        assert(c.choice == 0 || c.choice == 1 || c.choice == 2);
        assert(c.custom == NULL || strchr(c.custom, '!') == NULL);
        assert(c.str == NULL || c.str[0] != '\0');
    } else {
        assert(err[0] != '\0');
    }
    for (size_t i = 0; i < warn.n; i++)
        assert(strstr(warn.v[i], "ignoring") != NULL);
    cfg_free_strings(&fz_spec, &c);
    assert(c.conf == NULL && c.str == NULL && c.path == NULL && c.custom == NULL);
    cfg_warnings_free(&warn);
    return 0;
}
