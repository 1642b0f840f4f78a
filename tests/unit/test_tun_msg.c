/* Unit tests for common/tun_msg: every message round trip in its modes, every malformed
 * variant (missing member, wrong type, oversized, bad hex, bad address/checksum, unknown
 * type, not an object, trailing garbage, depth bomb, duplicates, UTF-8), the Osaurus
 * response limits, the error table and the signed texts (checked against the worked
 * example of proto/PROTOCOL.md with id_verify()). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "id.h"
#include "tun_msg.h"
#include "util.h"

/* The worked example of PROTOCOL.md section 13. */
#define ADDR_L "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23"
#define ADDR_C "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"      /* EIP-55 */
#define ADDR_BADSUM "0x2c7536e3605D9C16a7a3D7b1898e529396a65c23" /* one letter off */
#define ADDR_U "0x2C7536E3605D9C16A7A3D7B1898E529396A65C23"
#define ADDR2 "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf" /* private key 1 */
#define NONCE "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
#define TS 1767225600
#define SIG_NATIVE                                                                                 \
    "0xda2773d296baf42e00321949b65a7c1817f1f52a4435845a5158a289e74f90c71752c3829484db11eb08dc"     \
    "2fc0ff9b9168cb1d7a41244013fec639e7fc1a0f601c"
#define SIG_OSR                                                                                    \
    "0xb1fbdc97a5fb4194db6e5a560154c85aaecbd9ff2bd8370922dcc71b1c4a702a62b7cfbddfc85e0a6cbefc"     \
    "d1c36c4cf55253043925ffee984e300945aaebaf751b"
#define INST "4d6f3a0e-5b1c-4e2a-9d7f-0c1b2a3d4e5f"
#define AGENT(addr, sig) "{\"address\":\"" addr "\",\"signature\":\"" sig "\"}"
#define AUTH_HEAD "{\"type\":\"auth\",\"nonce\":\"" NONCE "\",\"timestamp\":1767225600,"

static struct tun_msg *ma, *mb; /* big structs: on the heap */

static int setup(void **state)
{
    ma = calloc(1, sizeof(*ma));
    mb = calloc(1, sizeof(*mb));
    return ma != NULL && mb != NULL ? 0 : -1;
}

static int teardown(void **state)
{
    tun_msg_clear(ma);
    tun_msg_clear(mb);
    free(ma);
    free(mb);
    return 0;
}

/* ---- helpers ---- */

static int dec(const char *json, enum tun_mode mode, const char **code)
{
    tun_msg_clear(ma);
    return tun_msg_decode(json, strlen(json), mode, ma, code);
}

static void expect_ok(const char *json, enum tun_mode mode, enum tun_msg_type t)
{
    const char *code = "unset";
    int rv = dec(json, mode, &code);

    if (rv != 0)
        print_error("unexpected %s for %s\n", code, json);
    assert_int_equal(rv, 0);
    assert_null(code);
    assert_int_equal(ma->type, t);
}

static void expect_err(const char *json, enum tun_mode mode, enum tun_err want)
{
    const char *code = NULL;
    int rv = dec(json, mode, &code);

    if (rv != (int)want)
        print_error("got %d (%s), want %s, for %.200s\n", rv, code ? code : "-", tun_err_code(want),
                    json);
    assert_int_equal(rv, want);
    assert_non_null(code);
    assert_string_equal(code, tun_err_code(want));
    tun_msg_clear(ma);
}

static void expect_auth_err(const char *json, enum tun_mode mode, enum tun_err want)
{
    const char *code = NULL;
    int rv;

    tun_msg_clear(ma);
    rv = tun_msg_decode_auth(json, strlen(json), mode, ma, &code);
    if (rv != (int)want)
        print_error("got %d (%s), want %s, for %.200s\n", rv, code ? code : "-", tun_err_code(want),
                    json);
    assert_int_equal(rv, want);
    assert_string_equal(code, tun_err_code(want));
    tun_msg_clear(ma);
}

/* Encodes in, decodes it into mb, re-encodes mb and checks both encodings are equal.
 * Returns the first encoding (caller frees). */
static char *roundtrip(const struct tun_msg *in)
{
    size_t len = 0, len2 = 0;
    const char *code = NULL;
    char *s = tun_msg_encode(in, &len);
    char *s2;

    assert_non_null(s);
    assert_int_equal(strlen(s), len);
    tun_msg_clear(mb);
    if (tun_msg_decode(s, len, in->mode, mb, &code) != 0)
        print_error("re-decode failed with %s: %s\n", code, s);
    assert_null(code);
    assert_int_equal(mb->type, in->type);
    s2 = tun_msg_encode(mb, &len2);
    assert_non_null(s2);
    assert_int_equal(len, len2);
    assert_string_equal(s, s2);
    free(s2);
    return s;
}

/* A growing string for big inputs. */
struct sb {
    char *p;
    size_t len, cap;
};

static void sb_add(struct sb *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_cat(struct sb *b, const char *s) { sb_add(b, s, strlen(s)); }

static void sb_rep(struct sb *b, const char *s, size_t times)
{
    for (size_t i = 0; i < times; i++)
        sb_cat(b, s);
}

static void parse_addr(const char *s, uint8_t out[ID_ADDR_LEN])
{
    assert_int_equal(id_addr_parse(s, strlen(s), out), ID_OK);
}

/* ---- error table ---- */

static void test_err_table(void **state)
{
    for (int i = 0; i < TUN_E_COUNT; i++) {
        enum tun_err e = (enum tun_err)(-i);
        const char *c = tun_err_code(e);
        assert_non_null(c);
        assert_non_null(tun_err_message(e));
        assert_true(strlen(tun_err_message(e)) > 5);
        if (e != TUN_E_NONE && e != TUN_E_OTHER)
            assert_int_equal(tun_err_from_code(c, strlen(c)), e);
        for (int j = 0; j < i; j++)
            assert_string_not_equal(c, tun_err_code((enum tun_err)(-j)));
    }
    assert_int_equal(tun_err_close_code(TUN_E_INVALID_JSON), 4000);
    assert_int_equal(tun_err_close_code(TUN_E_EXPECTED_AUTH_FRAME), 4000);
    assert_int_equal(tun_err_close_code(TUN_E_INVALID_NONCE), 4000);
    assert_int_equal(tun_err_close_code(TUN_E_NO_AGENTS), 4000);
    assert_int_equal(tun_err_close_code(TUN_E_TOO_MANY_AGENTS), 4000);
    assert_int_equal(tun_err_close_code(TUN_E_INVALID_ADDRESS), 4000);
    assert_int_equal(tun_err_close_code(TUN_E_TIMESTAMP_OUT_OF_RANGE), 4000);
    assert_int_equal(tun_err_close_code(TUN_E_SIGNATURE_VERIFICATION_FAILED), 4001);
    assert_int_equal(tun_err_close_code(TUN_E_AUTH_TIMEOUT), 4001);
    assert_int_equal(tun_err_close_code(TUN_E_ADDRESS_NOT_ALLOWED), 4003);
    assert_int_equal(tun_err_close_code(TUN_E_RATE_LIMITED), 4029);
    assert_int_equal(tun_err_close_code(TUN_E_MESSAGE_TOO_LARGE), 1009);
    assert_int_equal(tun_err_close_code(TUN_E_RELAY_RESTARTING), 1012);
    assert_int_equal(tun_err_close_code(TUN_E_UNKNOWN_TYPE), 0);
    assert_string_equal(tun_err_code(TUN_E_SIGNATURE_VERIFICATION_FAILED),
                        "signature_verification_failed");
    assert_string_equal(tun_err_code(TUN_E_TIMESTAMP_OUT_OF_RANGE), "timestamp_out_of_range");
    assert_int_equal(tun_err_from_code("already_registered", 18), TUN_E_OTHER);
    assert_int_equal(tun_err_from_code("invalid_json", 11), TUN_E_OTHER); /* prefix only */
    assert_string_equal(tun_err_code((enum tun_err) - 99), "internal_error");
    assert_string_equal(tun_err_code((enum tun_err)5), "internal_error");
}

static void test_err_for_mode(void **state)
{
    const enum tun_mode N = TUN_MODE_NATIVE, O = TUN_MODE_OSAURUS;

    for (int i = 0; i < TUN_E_COUNT; i++) {
        enum tun_err e = (enum tun_err)(-i);
        assert_int_equal(tun_err_for_mode(e, N, TUN_MSG_AUTH), e);
        assert_int_equal(tun_err_for_mode(e, N, TUN_MSG_NONE), e);
        /* idempotent */
        for (int t = 0; t < TUN_MSG_TYPE_COUNT; t++) {
            enum tun_err o = tun_err_for_mode(e, O, (enum tun_msg_type)t);
            assert_int_equal(tun_err_for_mode(o, O, (enum tun_msg_type)t), o);
        }
    }
    assert_int_equal(tun_err_for_mode(TUN_E_INVALID_ADDRESS, O, TUN_MSG_AUTH),
                     TUN_E_EXPECTED_AUTH_FRAME);
    assert_int_equal(tun_err_for_mode(TUN_E_TIMESTAMP_OUT_OF_RANGE, O, TUN_MSG_AUTH),
                     TUN_E_SIGNATURE_VERIFICATION_FAILED);
    assert_int_equal(tun_err_for_mode(TUN_E_ADDRESS_NOT_ALLOWED, O, TUN_MSG_AUTH),
                     TUN_E_ADDRESS_NOT_ALLOWED);
    assert_int_equal(tun_err_for_mode(TUN_E_NO_AGENTS, O, TUN_MSG_AUTH), TUN_E_NO_AGENTS);
    assert_int_equal(tun_err_for_mode(TUN_E_SIGNATURE_VERIFICATION_FAILED, O, TUN_MSG_ADD_AGENT),
                     TUN_E_INVALID_SIGNATURE);
    assert_int_equal(tun_err_for_mode(TUN_E_TIMESTAMP_OUT_OF_RANGE, O, TUN_MSG_ADD_AGENT),
                     TUN_E_INVALID_SIGNATURE);
    assert_int_equal(tun_err_for_mode(TUN_E_INVALID_ADDRESS, O, TUN_MSG_ADD_AGENT),
                     TUN_E_INVALID_SIGNATURE);
    assert_int_equal(tun_err_for_mode(TUN_E_INVALID_NONCE, O, TUN_MSG_ADD_AGENT),
                     TUN_E_INVALID_NONCE);
    assert_int_equal(tun_err_for_mode(TUN_E_MAX_AGENTS_REACHED, O, TUN_MSG_ADD_AGENT),
                     TUN_E_MAX_AGENTS_REACHED);
    assert_int_equal(tun_err_for_mode(TUN_E_INVALID_JSON, O, TUN_MSG_ADD_AGENT), TUN_E_NONE);
    assert_int_equal(tun_err_for_mode(TUN_E_UNKNOWN_TYPE, O, TUN_MSG_NONE), TUN_E_NONE);
    assert_int_equal(tun_err_for_mode(TUN_E_UNEXPECTED_MESSAGE, O, TUN_MSG_AUTH_OK), TUN_E_NONE);
    assert_int_equal(tun_err_for_mode(TUN_E_INVALID_ADDRESS, O, TUN_MSG_REMOVE_AGENT), TUN_E_NONE);
    assert_int_equal(tun_err_for_mode(TUN_E_RATE_LIMITED, O, TUN_MSG_REQUEST_CHALLENGE),
                     TUN_E_RATE_LIMITED);
    assert_int_equal(tun_err_for_mode(TUN_E_RELAY_RESTARTING, O, TUN_MSG_NONE),
                     TUN_E_RELAY_RESTARTING);
}

static void test_type_names(void **state)
{
    assert_null(tun_msg_type_name(TUN_MSG_NONE));
    assert_null(tun_msg_type_name((enum tun_msg_type)TUN_MSG_TYPE_COUNT));
    assert_string_equal(tun_msg_type_name(TUN_MSG_AUTH_OK), "auth_ok");
    assert_string_equal(tun_msg_type_name(TUN_MSG_STREAM_CHUNK), "stream_chunk");
    for (int t = 1; t < TUN_MSG_TYPE_COUNT; t++)
        assert_non_null(tun_msg_type_name((enum tun_msg_type)t));
}

/* ---- round trips ---- */

static void test_rt_challenge(void **state)
{
    struct tun_msg m;
    char *s;

    tun_msg_init(&m, TUN_MSG_CHALLENGE, TUN_MODE_NATIVE);
    memcpy(m.challenge.nonce, NONCE, sizeof(NONCE));
    m.challenge.expires_in_s = 30;
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"challenge\",\"nonce\":\"" NONCE "\",\"expires_in\":30}");
    assert_string_equal(mb->challenge.nonce, NONCE);
    assert_int_equal(mb->challenge.expires_in_s, 30);
    free(s);

    /* Osaurus relay form: no expires_in. */
    expect_ok("{\"type\":\"challenge\",\"nonce\":\"" NONCE "\"}", TUN_MODE_OSAURUS,
              TUN_MSG_CHALLENGE);
    assert_int_equal(ma->challenge.expires_in_s, 0);
    expect_err("{\"type\":\"challenge\",\"nonce\":\"" NONCE "\"}", TUN_MODE_NATIVE,
               TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"challenge\",\"nonce\":\"ABC\",\"expires_in\":30}", TUN_MODE_NATIVE,
               TUN_E_INVALID_NONCE);
    expect_err("{\"type\":\"challenge\",\"expires_in\":30}", TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"challenge\",\"nonce\":\"" NONCE "\",\"expires_in\":0}", TUN_MODE_NATIVE,
               TUN_E_INVALID_JSON);
    /* Integer-valued numbers in other notations are accepted. */
    expect_ok("{\"type\":\"challenge\",\"nonce\":\"" NONCE "\",\"expires_in\":3e1}",
              TUN_MODE_NATIVE, TUN_MSG_CHALLENGE);
    assert_int_equal(ma->challenge.expires_in_s, 30);
    expect_err("{\"type\":\"challenge\",\"nonce\":\"" NONCE "\",\"expires_in\":30.5}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
}

static void test_rt_auth_native(void **state)
{
    struct tun_msg *m = calloc(1, sizeof(*m));
    char *s;

    tun_msg_init(m, TUN_MSG_AUTH, TUN_MODE_NATIVE);
    memcpy(m->auth.nonce, NONCE, sizeof(NONCE));
    m->auth.timestamp = TS;
    memcpy(m->auth.instance, INST, sizeof(INST));
    m->auth.n_agents = 2;
    parse_addr(ADDR_L, m->auth.agents[0].addr);
    memcpy(m->auth.agents[0].sig, SIG_NATIVE, sizeof(SIG_NATIVE));
    m->auth.agents[0].response_timeout_s = 300;
    parse_addr(ADDR2, m->auth.agents[1].addr);
    memcpy(m->auth.agents[1].sig, SIG_OSR, sizeof(SIG_OSR));
    s = roundtrip(m);
    assert_string_equal(s, AUTH_HEAD "\"instance\":\"" INST "\",\"agents\":["
                                     "{\"address\":\"" ADDR_L "\",\"signature\":\"" SIG_NATIVE
                                     "\",\"response_timeout\":300},"
                                     "{\"address\":\"" ADDR2 "\",\"signature\":\"" SIG_OSR "\"}]}");
    assert_int_equal(mb->auth.n_agents, 2);
    assert_memory_equal(mb->auth.agents[0].addr, m->auth.agents[0].addr, ID_ADDR_LEN);
    assert_string_equal(mb->auth.agents[0].addr_str, ADDR_L);
    assert_string_equal(mb->auth.agents[0].sig, SIG_NATIVE);
    assert_int_equal(mb->auth.agents[0].response_timeout_s, 300);
    assert_int_equal(mb->auth.agents[1].response_timeout_s, 0);
    assert_string_equal(mb->auth.instance, INST);
    assert_int_equal(mb->auth.timestamp, TS);
    assert_int_equal(mb->auth.features, 0);
    free(s);

    /* The pre-auth decoder accepts the same text. */
    s = tun_msg_encode(m, NULL);
    tun_msg_clear(ma);
    assert_int_equal(tun_msg_decode_auth(s, strlen(s), TUN_MODE_NATIVE, ma, NULL), 0);
    assert_int_equal(ma->type, TUN_MSG_AUTH);
    free(s);
    free(m);
}

static void test_rt_auth_osaurus(void **state)
{
    /* The address is kept exactly as sent: Osaurus signs that form. */
    expect_ok(AUTH_HEAD "\"agents\":[" AGENT(ADDR_C, SIG_OSR) "],\"features\":[\"base64\","
                                                              "\"zstd\"]}",
              TUN_MODE_OSAURUS, TUN_MSG_AUTH);
    assert_string_equal(ma->auth.agents[0].addr_str, ADDR_C);
    assert_string_equal(ma->auth.instance, "");
    assert_int_equal(ma->auth.features, TUN_FEAT_BASE64);
    char *s = roundtrip(ma);
    assert_non_null(strstr(s, "\"address\":\"" ADDR_C "\""));
    assert_non_null(strstr(s, "\"features\":[\"base64\"]"));
    assert_null(strstr(s, "instance"));
    free(s);

    /* Osaurus mode ignores malformed optional extensions; native refuses them. */
    const char *odd =
        AUTH_HEAD "\"instance\":7,\"features\":\"base64\",\"agents\":[{\"address\":\"" ADDR_C
                  "\",\"signature\":\"" SIG_OSR "\",\"response_timeout\":-1}]}";
    expect_ok(odd, TUN_MODE_OSAURUS, TUN_MSG_AUTH);
    assert_string_equal(ma->auth.instance, "");
    assert_int_equal(ma->auth.features, 0);
    assert_int_equal(ma->auth.agents[0].response_timeout_s, 0);
    expect_auth_err(odd, TUN_MODE_NATIVE, TUN_E_EXPECTED_AUTH_FRAME);
}

static void test_rt_auth_ok(void **state)
{
    struct tun_msg *m = calloc(1, sizeof(*m));
    char *s;

    tun_msg_init(m, TUN_MSG_AUTH_OK, TUN_MODE_NATIVE);
    m->auth_ok.n_agents = 1;
    parse_addr(ADDR_C, m->auth_ok.agents[0].addr);
    strcpy(m->auth_ok.agents[0].url, "https://" ADDR_L ".localhost:8443");
    m->auth_ok.n_rejected = 1;
    parse_addr(ADDR2, m->auth_ok.rejected[0].addr);
    m->auth_ok.rejected[0].err = TUN_E_ADDRESS_NOT_ALLOWED;
    strcpy(m->auth_ok.region, "local");
    m->auth_ok.ping_interval_s = 20;
    s = roundtrip(m);
    assert_string_equal(s, "{\"type\":\"auth_ok\",\"agents\":[{\"address\":\"" ADDR_L
                           "\",\"url\":\"https://" ADDR_L ".localhost:8443\"}],"
                           "\"rejected\":[{\"address\":\"" ADDR2
                           "\",\"error\":\"address_not_allowed\"}],"
                           "\"region\":\"local\",\"ping_interval\":20}");
    assert_int_equal(mb->auth_ok.n_rejected, 1);
    assert_int_equal(mb->auth_ok.rejected[0].err, TUN_E_ADDRESS_NOT_ALLOWED);
    assert_string_equal(mb->auth_ok.rejected[0].error, "address_not_allowed");
    assert_int_equal(mb->auth_ok.ping_interval_s, 20);
    assert_string_equal(mb->auth_ok.agents[0].url, "https://" ADDR_L ".localhost:8443");
    free(s);

    /* Osaurus: neither rejected nor ping_interval on the wire. */
    m->mode = TUN_MODE_OSAURUS;
    s = roundtrip(m);
    assert_null(strstr(s, "rejected"));
    assert_null(strstr(s, "ping_interval"));
    assert_non_null(strstr(s, "\"region\":\"local\""));
    free(s);

    /* An older relay's rejected list with "reason", and no region. */
    expect_ok("{\"type\":\"auth_ok\",\"agents\":[],\"rejected\":[{\"address\":\"" ADDR_L
              "\",\"reason\":\"already_registered\"}]}",
              TUN_MODE_OSAURUS, TUN_MSG_AUTH_OK);
    assert_int_equal(ma->auth_ok.n_rejected, 1);
    assert_int_equal(ma->auth_ok.rejected[0].err, TUN_E_OTHER);
    assert_string_equal(ma->auth_ok.rejected[0].error, "already_registered");

    /* Native requires rejected, region, ping_interval and at least one agent. */
    expect_err("{\"type\":\"auth_ok\",\"agents\":[{\"address\":\"" ADDR_L
               "\",\"url\":\"https://x.localhost\"}],\"region\":\"r\",\"ping_interval\":20}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[{\"address\":\"" ADDR_L
               "\",\"url\":\"https://x.localhost\"}],\"rejected\":[],\"ping_interval\":20}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[{\"address\":\"" ADDR_L
               "\",\"url\":\"https://x.localhost\"}],\"rejected\":[],\"region\":\"r\"}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[],\"rejected\":[],\"region\":\"r\","
               "\"ping_interval\":20}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[\"" ADDR_L "\"]}", TUN_MODE_OSAURUS,
               TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[{\"address\":\"" ADDR_L
               "\",\"url\":\"https://a\",\"url\":\"https://b\"}]}",
               TUN_MODE_OSAURUS, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[],\"rejected\":[{\"address\":\"" ADDR_L
               "\",\"error\":\"x\",\"error\":\"y\"}]}",
               TUN_MODE_OSAURUS, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[],\"rejected\":[{\"address\":\"" ADDR_L "\"}]}",
               TUN_MODE_OSAURUS, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[],\"rejected\":{}}", TUN_MODE_OSAURUS,
               TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"auth_ok\",\"agents\":[{\"address\":\"" ADDR_L
               "\",\"url\":\"ftp://x.localhost\"}],\"rejected\":[],\"region\":\"r\","
               "\"ping_interval\":20}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    free(m);
}

static void test_rt_errors(void **state)
{
    struct tun_msg m;
    char *s;

    tun_msg_init(&m, TUN_MSG_AUTH_ERROR, TUN_MODE_OSAURUS);
    m.error.err = TUN_E_SIGNATURE_VERIFICATION_FAILED;
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"auth_error\",\"error\":\"signature_verification_failed\","
                           "\"message\":\"The signature does not prove the address.\"}");
    assert_int_equal(mb->error.err, TUN_E_SIGNATURE_VERIFICATION_FAILED);
    free(s);

    tun_msg_init(&m, TUN_MSG_ERROR, TUN_MODE_NATIVE);
    m.error.err = TUN_E_ADDRESS_NOT_ALLOWED;
    strcpy(m.error.message, "not on the list");
    m.error.has_addr = true;
    parse_addr(ADDR2, m.error.addr);
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"error\",\"error\":\"address_not_allowed\",\"message\":"
                           "\"not on the list\",\"address\":\"" ADDR2 "\"}");
    assert_true(mb->error.has_addr);
    assert_memory_equal(mb->error.addr, m.error.addr, ID_ADDR_LEN);
    free(s);

    /* The relay's bare form; unknown codes are kept. */
    expect_ok("{\"type\":\"error\",\"error\":\"relay_restarting\"}", TUN_MODE_OSAURUS,
              TUN_MSG_ERROR);
    assert_int_equal(ma->error.err, TUN_E_RELAY_RESTARTING);
    assert_string_equal(ma->error.message, "");
    assert_false(ma->error.has_addr);
    expect_ok("{\"type\":\"auth_error\",\"error\":\"brand_new_code\"}", TUN_MODE_NATIVE,
              TUN_MSG_AUTH_ERROR);
    assert_int_equal(ma->error.err, TUN_E_OTHER);
    assert_string_equal(ma->error.code, "brand_new_code");

    expect_err("{\"type\":\"error\"}", TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"error\",\"error\":5}", TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"error\",\"error\":\"has space\"}", TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"error\",\"error\":\"x\",\"message\":1}", TUN_MODE_NATIVE,
               TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"error\",\"error\":\"x\",\"address\":\"0x12\"}", TUN_MODE_NATIVE,
               TUN_E_INVALID_JSON);
    /* Codes are at most 64 bytes. */
    char big[200];
    snprintf(big, sizeof(big), "{\"type\":\"error\",\"error\":\"%065d\"}", 0);
    expect_err(big, TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    snprintf(big, sizeof(big), "{\"type\":\"error\",\"error\":\"%064d\"}", 0);
    expect_ok(big, TUN_MODE_NATIVE, TUN_MSG_ERROR);

    /* Encoding needs a code. */
    tun_msg_init(&m, TUN_MSG_ERROR, TUN_MODE_NATIVE);
    assert_null(tun_msg_encode(&m, NULL));
}

static void test_message_truncated(void **state)
{
    struct sb b = {0};

    /* 300 bytes of text whose 255th byte is inside a 2-byte character. */
    sb_cat(&b, "{\"type\":\"error\",\"error\":\"x\",\"message\":\"");
    sb_rep(&b, "a", 254);
    sb_rep(&b, "\xc3\xa9", 23);
    sb_cat(&b, "\\u0000\"}");
    expect_ok(b.p, TUN_MODE_NATIVE, TUN_MSG_ERROR);
    assert_int_equal(strlen(ma->error.message), 254);
    free(b.p);

    expect_ok("{\"type\":\"error\",\"error\":\"x\",\"message\":\"a\\u0000b\"}", TUN_MODE_NATIVE,
              TUN_MSG_ERROR);
    assert_string_equal(ma->error.message, "a?b");
}

static void test_rt_control(void **state)
{
    struct tun_msg m;
    char *s;

    tun_msg_init(&m, TUN_MSG_REQUEST_CHALLENGE, TUN_MODE_NATIVE);
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"request_challenge\"}");
    free(s);

    tun_msg_init(&m, TUN_MSG_ADD_AGENT, TUN_MODE_NATIVE);
    parse_addr(ADDR_L, m.add_agent.agent.addr);
    memcpy(m.add_agent.agent.sig, SIG_NATIVE, sizeof(SIG_NATIVE));
    m.add_agent.agent.response_timeout_s = 900;
    memcpy(m.add_agent.nonce, NONCE, sizeof(NONCE));
    m.add_agent.timestamp = TS + 30;
    s = roundtrip(&m);
    assert_string_equal(
        s, "{\"type\":\"add_agent\",\"address\":\"" ADDR_L "\",\"signature\":\"" SIG_NATIVE
           "\",\"response_timeout\":900,\"nonce\":\"" NONCE "\",\"timestamp\":1767225630}");
    assert_int_equal(mb->add_agent.timestamp, TS + 30);
    assert_int_equal(mb->add_agent.agent.response_timeout_s, 900);
    assert_string_equal(mb->add_agent.agent.addr_str, ADDR_L);
    free(s);

    tun_msg_init(&m, TUN_MSG_AGENT_ADDED, TUN_MODE_NATIVE);
    parse_addr(ADDR_L, m.agent_added.addr);
    strcpy(m.agent_added.url, "http://" ADDR_L ".localhost:8080");
    strcpy(m.agent_added.region, "fra 1");
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"agent_added\",\"address\":\"" ADDR_L
                           "\",\"url\":\"http://" ADDR_L ".localhost:8080\",\"region\":\"fra 1\"}");
    free(s);
    expect_ok("{\"type\":\"agent_added\",\"address\":\"" ADDR_L "\",\"url\":\"https://a.b\"}",
              TUN_MODE_OSAURUS, TUN_MSG_AGENT_ADDED);
    expect_err("{\"type\":\"agent_added\",\"address\":\"" ADDR_L "\",\"url\":\"https://a.b\"}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);

    tun_msg_init(&m, TUN_MSG_REMOVE_AGENT, TUN_MODE_OSAURUS);
    parse_addr(ADDR_C, m.remove_agent.addr);
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"remove_agent\",\"address\":\"" ADDR_L "\"}");
    free(s);

    static const char *const reasons[] = {"removed", "replaced", "superseded", "not_allowed"};
    for (int r = TUN_REASON_REMOVED; r <= TUN_REASON_NOT_ALLOWED; r++) {
        tun_msg_init(&m, TUN_MSG_AGENT_REMOVED, TUN_MODE_NATIVE);
        parse_addr(ADDR_L, m.agent_removed.addr);
        m.agent_removed.reason = (enum tun_reason)r;
        s = roundtrip(&m);
        assert_int_equal(mb->agent_removed.reason, r);
        assert_string_equal(mb->agent_removed.reason_str, reasons[r - 1]);
        assert_non_null(strstr(s, reasons[r - 1]));
        free(s);
    }
    expect_ok("{\"type\":\"agent_removed\",\"address\":\"" ADDR_L "\"}", TUN_MODE_OSAURUS,
              TUN_MSG_AGENT_REMOVED);
    assert_int_equal(ma->agent_removed.reason, TUN_REASON_NONE);
    expect_ok("{\"type\":\"agent_removed\",\"address\":\"" ADDR_L "\",\"reason\":\"evicted\"}",
              TUN_MODE_NATIVE, TUN_MSG_AGENT_REMOVED);
    assert_int_equal(ma->agent_removed.reason, TUN_REASON_OTHER);
    assert_string_equal(ma->agent_removed.reason_str, "evicted");
    s = roundtrip(ma);
    assert_non_null(strstr(s, "\"reason\":\"evicted\""));
    free(s);
    expect_err("{\"type\":\"agent_removed\",\"address\":\"" ADDR_L "\",\"reason\":3}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"agent_removed\"}", TUN_MODE_NATIVE, TUN_E_INVALID_JSON);

    tun_msg_init(&m, TUN_MSG_DRAINING, TUN_MODE_NATIVE);
    m.draining.grace_s = 600;
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"draining\",\"grace\":600}");
    free(s);
    expect_ok("{\"type\":\"draining\",\"grace\":0}", TUN_MODE_NATIVE, TUN_MSG_DRAINING);
    expect_err("{\"type\":\"draining\"}", TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"draining\",\"grace\":-1}", TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"draining\",\"grace\":4294967296}", TUN_MODE_NATIVE, TUN_E_INVALID_JSON);

    tun_msg_init(&m, TUN_MSG_PING, TUN_MODE_OSAURUS);
    m.ping.has_ts = true;
    m.ping.ts = TS;
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"ping\",\"ts\":1767225600}");
    free(s);
    m.type = TUN_MSG_PONG;
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"pong\",\"ts\":1767225600}");
    assert_true(mb->ping.has_ts);
    assert_int_equal(mb->ping.ts, TS);
    free(s);
    expect_ok("{\"type\":\"pong\"}", TUN_MODE_OSAURUS, TUN_MSG_PONG);
    assert_false(ma->ping.has_ts);
    expect_ok("{\"type\":\"pong\",\"ts\":1.5}", TUN_MODE_OSAURUS, TUN_MSG_PONG);
    assert_false(ma->ping.has_ts);
}

static void test_add_remove_malformed(void **state)
{
    const enum tun_mode N = TUN_MODE_NATIVE, O = TUN_MODE_OSAURUS;
#define ADD(addr, sig, nonce, extra)                                                               \
    "{\"type\":\"add_agent\",\"address\":\"" addr "\",\"signature\":\"" sig                        \
    "\",\"nonce\":\"" nonce "\"" extra "}"

    expect_ok(ADD(ADDR_C, SIG_OSR, NONCE, ",\"timestamp\":1767225600"), O, TUN_MSG_ADD_AGENT);
    assert_string_equal(ma->add_agent.agent.addr_str, ADDR_C);
    expect_err(ADD(ADDR_C, SIG_OSR, NONCE, ""), N, TUN_E_INVALID_JSON);
    expect_err(ADD(ADDR_C, SIG_OSR, NONCE, ",\"timestamp\":\"1767225600\""), N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"add_agent\",\"signature\":\"" SIG_OSR "\",\"nonce\":\"" NONCE
               "\",\"timestamp\":1}",
               N, TUN_E_INVALID_JSON);
    expect_err(ADD(ADDR_BADSUM, SIG_OSR, NONCE, ",\"timestamp\":1"), N, TUN_E_INVALID_ADDRESS);
    expect_err(ADD(ADDR_BADSUM, SIG_OSR, NONCE, ",\"timestamp\":1"), O, TUN_E_INVALID_SIGNATURE);
    expect_err(ADD(ADDR_L, SIG_OSR, "0123", ",\"timestamp\":1"), N, TUN_E_INVALID_NONCE);
    expect_err(ADD(ADDR_L, SIG_OSR, "0123", ",\"timestamp\":1"), O, TUN_E_INVALID_NONCE);
    expect_err(ADD(ADDR_L, "0x1234", NONCE, ",\"timestamp\":1"), N,
               TUN_E_SIGNATURE_VERIFICATION_FAILED);
    expect_err(ADD(ADDR_L, "0x1234", NONCE, ",\"timestamp\":1"), O, TUN_E_INVALID_SIGNATURE);
    expect_err(ADD(ADDR_L, SIG_OSR, NONCE, ",\"timestamp\":1,\"response_timeout\":0"), N,
               TUN_E_INVALID_JSON);
    expect_ok(ADD(ADDR_L, SIG_OSR, NONCE, ",\"timestamp\":1,\"response_timeout\":0"), O,
              TUN_MSG_ADD_AGENT);
#undef ADD
    expect_err("{\"type\":\"remove_agent\"}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"remove_agent\",\"address\":[]}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"remove_agent\",\"address\":\"0xzz\"}", N, TUN_E_INVALID_ADDRESS);
    expect_ok("{\"type\":\"remove_agent\",\"address\":\"" ADDR_U "\"}", O, TUN_MSG_REMOVE_AGENT);
}

/* ---- auth malformed variants ---- */

static void test_auth_malformed(void **state)
{
    const enum tun_mode N = TUN_MODE_NATIVE, O = TUN_MODE_OSAURUS;
    const char *ok =
        AUTH_HEAD "\"instance\":\"" INST "\",\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}";
    char buf[1024];

    expect_ok(ok, N, TUN_MSG_AUTH);
    /* Syntax is invalid_json; anything else not an auth is expected_auth_frame. */
    expect_auth_err("{\"type\":\"auth\",", N, TUN_E_INVALID_JSON);
    expect_auth_err("", N, TUN_E_INVALID_JSON);
    expect_auth_err("[]", N, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err("\"auth\"", O, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err("{\"type\":\"pong\"}", O, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err("{\"type\":\"hello\"}", N, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err("{\"nonce\":\"" NONCE "\"}", N, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err("{\"type\":\"add_agent\"}", N, TUN_E_EXPECTED_AUTH_FRAME);
    /* Missing members and wrong types. */
    expect_auth_err("{\"type\":\"auth\",\"timestamp\":1,\"instance\":\"" INST
                    "\",\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}",
                    N, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err("{\"type\":\"auth\",\"nonce\":\"" NONCE "\",\"instance\":\"" INST
                    "\",\"agents\":[]}",
                    N, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err("{\"type\":\"auth\",\"nonce\":\"" NONCE
                    "\",\"timestamp\":1,\"instance\":\"" INST "\"}",
                    N, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err(AUTH_HEAD "\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}", N,
                    TUN_E_EXPECTED_AUTH_FRAME); /* native needs instance */
    expect_auth_err(AUTH_HEAD "\"instance\":\"short\",\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}",
                    N, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err(AUTH_HEAD
                    "\"instance\":\"has_underscore\",\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}",
                    N, TUN_E_EXPECTED_AUTH_FRAME);
    snprintf(buf, sizeof(buf),
             AUTH_HEAD "\"instance\":\"%065d\",\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}", 0);
    expect_auth_err(buf, N, TUN_E_EXPECTED_AUTH_FRAME);
    snprintf(buf, sizeof(buf),
             AUTH_HEAD "\"instance\":\"%064d\",\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}", 0);
    expect_ok(buf, N, TUN_MSG_AUTH);
    const char *ts_bad[] = {"\"1767225600\"", "-1",   "1.5", "9007199254740992",
                            "1e300",          "null", "true"};
    for (size_t i = 0; i < sizeof(ts_bad) / sizeof(ts_bad[0]); i++) {
        snprintf(buf, sizeof(buf),
                 "{\"type\":\"auth\",\"nonce\":\"" NONCE "\",\"timestamp\":%s,\"instance\":\"" INST
                 "\",\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}",
                 ts_bad[i]);
        expect_auth_err(buf, N, TUN_E_EXPECTED_AUTH_FRAME);
        expect_auth_err(buf, O, TUN_E_EXPECTED_AUTH_FRAME);
    }
    snprintf(buf, sizeof(buf),
             "{\"type\":\"auth\",\"nonce\":\"" NONCE "\",\"timestamp\":9007199254740991,"
             "\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}");
    expect_ok(buf, O, TUN_MSG_AUTH);
    assert_int_equal(ma->auth.timestamp, 9007199254740991LL);
    expect_auth_err(AUTH_HEAD "\"instance\":\"" INST "\",\"agents\":{}}", N,
                    TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err(AUTH_HEAD "\"instance\":\"" INST "\",\"agents\":[\"" ADDR_L "\"]}", N,
                    TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err(AUTH_HEAD "\"agents\":[{\"address\":\"" ADDR_L "\"}]}", O,
                    TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err(AUTH_HEAD "\"agents\":[{\"address\":\"" ADDR_L "\",\"signature\":7}]}", O,
                    TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err(AUTH_HEAD "\"instance\":\"" INST
                              "\",\"features\":[1],\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}",
                    N, TUN_E_EXPECTED_AUTH_FRAME);
    /* Counts. */
    expect_auth_err(AUTH_HEAD "\"instance\":\"" INST "\",\"agents\":[]}", N, TUN_E_NO_AGENTS);
    expect_auth_err(AUTH_HEAD "\"agents\":[]}", O, TUN_E_NO_AGENTS);
    /* Nonce shape: uppercase, short, non-hex, number. */
    expect_auth_err("{\"type\":\"auth\",\"nonce\":"
                    "\"9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\","
                    "\"timestamp\":1,\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}",
                    O, TUN_E_INVALID_NONCE);
    expect_auth_err("{\"type\":\"auth\",\"nonce\":\"9f86\",\"timestamp\":1,\"agents\":[" AGENT(
                        ADDR_L, SIG_NATIVE) "]}",
                    O, TUN_E_INVALID_NONCE);
    expect_auth_err("{\"type\":\"auth\",\"nonce\":"
                    "\"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0g\","
                    "\"timestamp\":1,\"agents\":[" AGENT(ADDR_L, SIG_NATIVE) "]}",
                    O, TUN_E_INVALID_NONCE);
    expect_auth_err("{\"type\":\"auth\",\"nonce\":5,\"timestamp\":1,\"agents\":[" AGENT(
                        ADDR_L, SIG_NATIVE) "]}",
                    O, TUN_E_EXPECTED_AUTH_FRAME);
    /* Addresses: bad checksum, length, hex, prefix. Native invalid_address, Osaurus
     * expected_auth_frame. */
    const char *bad_addr[] = {ADDR_BADSUM,
                              "0x2c7536e3605d9c16a7a3d7b1898e529396a65c2",
                              "0x2c7536e3605d9c16a7a3d7b1898e529396a65c233",
                              "0x2c7536e3605d9c16a7a3d7b1898e529396a65cZZ",
                              "002c7536e3605d9c16a7a3d7b1898e529396a65c23",
                              "0X2c7536e3605d9c16a7a3d7b1898e529396a65c23",
                              ""};
    for (size_t i = 0; i < sizeof(bad_addr) / sizeof(bad_addr[0]); i++) {
        snprintf(buf, sizeof(buf),
                 AUTH_HEAD "\"instance\":\"" INST "\",\"agents\":[" AGENT(
                     ADDR2, SIG_NATIVE) ","
                                        "{\"address\":\"%s\",\"signature\":\"" SIG_NATIVE "\"}]}",
                 bad_addr[i]);
        expect_auth_err(buf, N, TUN_E_INVALID_ADDRESS);
        expect_auth_err(buf, O, TUN_E_EXPECTED_AUTH_FRAME);
    }
    /* Accepted address forms: lowercase, EIP-55, all uppercase. */
    expect_ok(AUTH_HEAD "\"agents\":[" AGENT(ADDR_U, SIG_OSR) "]}", O, TUN_MSG_AUTH);
    assert_string_equal(ma->auth.agents[0].addr_str, ADDR_U);
    expect_ok(AUTH_HEAD "\"agents\":[" AGENT(ADDR_C, SIG_OSR) "]}", O, TUN_MSG_AUTH);
    /* Signature shapes. */
    const char *bad_sig[] = {
        "0x1234",
        "da2773d296baf42e00321949b65a7c1817f1f52a4435845a5158a289e74f90c71752c3829484db11eb08dc2fc"
        "0ff9b9168cb1d7a41244013fec639e7fc1a0f601c00",
        "0xda2773d296baf42e00321949b65a7c1817f1f52a4435845a5158a289e74f90c71752c3829484db11eb08dc"
        "2fc0ff9b9168cb1d7a41244013fec639e7fc1a0f601",
        "0xga2773d296baf42e00321949b65a7c1817f1f52a4435845a5158a289e74f90c71752c3829484db11eb08dc"
        "2fc0ff9b9168cb1d7a41244013fec639e7fc1a0f601c",
        "0xda2773d296baf42e00321949b65a7c1817f1f52a4435845a5158a289e74f90c71752c3829484db11eb08dc"
        "2fc0ff9b9168cb1d7a41244013fec639e7fc1a0f601c0"};
    for (size_t i = 0; i < sizeof(bad_sig) / sizeof(bad_sig[0]); i++) {
        snprintf(buf, sizeof(buf),
                 AUTH_HEAD "\"instance\":\"" INST "\",\"agents\":[{\"address\":\"" ADDR_L
                           "\",\"signature\":\"%s\"}]}",
                 bad_sig[i]);
        expect_auth_err(buf, N, TUN_E_SIGNATURE_VERIFICATION_FAILED);
        expect_auth_err(buf, O, TUN_E_SIGNATURE_VERIFICATION_FAILED);
    }
    /* Upper-case hex signatures are a valid shape. */
    expect_ok(AUTH_HEAD "\"agents\":[" AGENT(
                  ADDR_L, "0xDA2773D296BAF42E00321949B65A7C1817F1F52A4435845A5158A289E74F90C71752C3"
                          "829484DB11EB08DC2FC0FF9B9168CB1D7A41244013FEC639E7FC1A0F601C") "]}",
              O, TUN_MSG_AUTH);
    /* Order of checks: address errors come before signature errors, even later in the
     * list; a bad nonce before both. */
    expect_auth_err(AUTH_HEAD "\"agents\":[" AGENT(ADDR_L, "0x12") "," AGENT("0x12", SIG_OSR) "]}",
                    O, TUN_E_EXPECTED_AUTH_FRAME);
    expect_auth_err(AUTH_HEAD
                    "\"instance\":\"" INST
                    "\",\"agents\":[" AGENT(ADDR_L, "0x12") "," AGENT("0x12", SIG_OSR) "]}",
                    N, TUN_E_INVALID_ADDRESS);
    expect_auth_err("{\"type\":\"auth\",\"nonce\":\"x\",\"timestamp\":1,\"agents\":[" AGENT(
                        "0x12", SIG_OSR) "]}",
                    O, TUN_E_INVALID_NONCE);
}

static void test_auth_agent_counts(void **state)
{
    struct sb b = {0};

    /* 50 agents decode; 51 are too_many_agents (checked before the nonce). */
    sb_cat(&b, "{\"type\":\"auth\",\"nonce\":\"bad\",\"timestamp\":1,\"agents\":[");
    for (int i = 0; i < 51; i++)
        sb_cat(&b, i == 0 ? AGENT(ADDR_L, SIG_OSR) : "," AGENT(ADDR_L, SIG_OSR));
    sb_cat(&b, "]}");
    expect_auth_err(b.p, TUN_MODE_OSAURUS, TUN_E_TOO_MANY_AGENTS);
    expect_err(b.p, TUN_MODE_OSAURUS, TUN_E_TOO_MANY_AGENTS);
    b.len = 0;
    sb_cat(&b, AUTH_HEAD "\"agents\":[");
    for (int i = 0; i < 50; i++)
        sb_cat(&b, i == 0 ? AGENT(ADDR_L, SIG_OSR) : "," AGENT(ADDR_C, SIG_OSR));
    sb_cat(&b, "]}");
    expect_ok(b.p, TUN_MODE_OSAURUS, TUN_MSG_AUTH);
    assert_int_equal(ma->auth.n_agents, 50);
    assert_string_equal(ma->auth.agents[49].addr_str, ADDR_C);
    char *s = roundtrip(ma);
    free(s);
    /* Encoding refuses what decoding refuses. */
    ma->auth.n_agents = 51;
    assert_null(tun_msg_encode(ma, NULL));
    ma->auth.n_agents = 0;
    assert_null(tun_msg_encode(ma, NULL));
    free(b.p);
}

/* ---- generic JSON malformations ---- */

static void test_json_malformed(void **state)
{
    const enum tun_mode N = TUN_MODE_NATIVE, O = TUN_MODE_OSAURUS;
    const char *rc = "{\"type\":\"request_challenge\"}";

    expect_ok(rc, N, TUN_MSG_REQUEST_CHALLENGE);
    /* Not an object. */
    expect_err("[]", N, TUN_E_INVALID_JSON);
    expect_err("\"request_challenge\"", N, TUN_E_INVALID_JSON);
    expect_err("1", N, TUN_E_INVALID_JSON);
    expect_err("null", O, TUN_E_INVALID_JSON);
    /* Syntax. */
    expect_err("", N, TUN_E_INVALID_JSON);
    expect_err("   ", N, TUN_E_INVALID_JSON);
    expect_err("{", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":}", N, TUN_E_INVALID_JSON);
    expect_err("{'type':'request_challenge'}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\",}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\"", N, TUN_E_INVALID_JSON);
    /* Trailing garbage; trailing whitespace is fine. */
    expect_err("{\"type\":\"request_challenge\"} x", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\"}{\"type\":\"request_challenge\"}", N,
               TUN_E_INVALID_JSON);
    expect_ok(" \t\r\n{\"type\":\"request_challenge\"} \t\r\n", N, TUN_MSG_REQUEST_CHALLENGE);
    /* An embedded NUL after the object: length-delimited, so it is garbage. */
    {
        const char t[] = "{\"type\":\"request_challenge\"}\0";
        tun_msg_clear(ma);
        assert_int_equal(tun_msg_decode(t, sizeof(t) - 1, N, ma, NULL), TUN_E_INVALID_JSON);
    }
    /* Not length-terminated input: only len bytes are read. */
    {
        const char t[] = "{\"type\":\"request_challenge\"}GARBAGE";
        tun_msg_clear(ma);
        assert_int_equal(tun_msg_decode(t, strlen(rc), N, ma, NULL), 0);
        assert_int_equal(tun_msg_decode(t, strlen(rc) - 1, N, ma, NULL), TUN_E_INVALID_JSON);
    }
    /* Duplicate members. */
    expect_err("{\"type\":\"request_challenge\",\"type\":\"request_challenge\"}", N,
               TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\",\"x\":1,\"x\":2}", N, TUN_E_INVALID_JSON);
    expect_auth_err(AUTH_HEAD "\"agents\":[{\"address\":\"" ADDR_L "\",\"address\":\"" ADDR2
                              "\",\"signature\":\"" SIG_OSR "\"}]}",
                    O, TUN_E_INVALID_JSON);
    /* Unknown members are ignored, nested or not. */
    expect_ok("{\"type\":\"request_challenge\",\"future\":{\"a\":[1,2,{\"b\":null}]}}", N,
              TUN_MSG_REQUEST_CHALLENGE);
    /* Unknown and misplaced types. */
    expect_err("{\"type\":\"hello\"}", N, TUN_E_UNKNOWN_TYPE);
    expect_err("{\"type\":5}", N, TUN_E_UNKNOWN_TYPE);
    expect_err("{\"kind\":\"auth\"}", N, TUN_E_UNKNOWN_TYPE);
    expect_err("{\"type\":\"Request_challenge\"}", N, TUN_E_UNKNOWN_TYPE);
    expect_err("{\"type\":\"draining\",\"grace\":1}", O, TUN_E_UNKNOWN_TYPE);
    expect_err("{\"type\":\"pong\",\"ts\":1}", N, TUN_E_UNKNOWN_TYPE);
    expect_err("{\"type\":\"response\",\"id\":\"a\",\"status\":200,\"headers\":{}}", N,
               TUN_E_UNKNOWN_TYPE);
    assert_int_equal(ma->type, TUN_MSG_NONE);
    /* UTF-8: raw invalid bytes, overlong, encoded surrogate, lone surrogate escape, raw
     * control character. Valid multibyte text and escaped pairs are fine. */
    expect_err("{\"type\":\"request_challenge\",\"x\":\"\xff\"}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\",\"x\":\"\xc0\xaf\"}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\",\"x\":\"\xed\xa0\x80\"}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\",\"x\":\"\xe2\x82\"}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\",\"x\":\"\\ud800\"}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\",\"x\":\"a\tb\"}", N, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request_challenge\",\"x\":\"a\nb\"}", N, TUN_E_INVALID_JSON);
    expect_ok("{\"type\":\"request_challenge\",\"x\":\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"
              "\\ud83d\\ude00\\u00e9\"}",
              N, TUN_MSG_REQUEST_CHALLENGE);
}

static void test_depth_bomb(void **state)
{
    struct sb b = {0};

    /* 16 levels in all (the object itself + 15) pass; 17 fail. */
    sb_cat(&b, "{\"type\":\"request_challenge\",\"x\":");
    sb_rep(&b, "[", 15);
    sb_rep(&b, "]", 15);
    sb_cat(&b, "}");
    expect_ok(b.p, TUN_MODE_NATIVE, TUN_MSG_REQUEST_CHALLENGE);
    b.len = 0;
    sb_cat(&b, "{\"type\":\"request_challenge\",\"x\":");
    sb_rep(&b, "[", 16);
    sb_rep(&b, "]", 16);
    sb_cat(&b, "}");
    expect_err(b.p, TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    /* A deep bomb, unbalanced, of objects: refused before cJSON recurses. */
    b.len = 0;
    sb_cat(&b, "{\"type\":\"request_challenge\",\"x\":");
    sb_rep(&b, "{\"a\":", 12000); /* 60 KB: under the size limit */
    expect_err(b.p, TUN_MODE_OSAURUS, TUN_E_INVALID_JSON);
    expect_auth_err(b.p, TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    /* Brackets inside strings do not count. */
    b.len = 0;
    sb_cat(&b, "{\"type\":\"request_challenge\",\"x\":\"");
    sb_rep(&b, "[{", 100);
    sb_cat(&b, "\\\"]\"}");
    expect_ok(b.p, TUN_MODE_NATIVE, TUN_MSG_REQUEST_CHALLENGE);
    free(b.p);
}

static void test_size_limits(void **state)
{
    struct sb b = {0};

    /* A native control message is at most 64 KiB. */
    sb_cat(&b, "{\"type\":\"request_challenge\",\"pad\":\"");
    sb_rep(&b, "x", TUN_CTL_MAX_BYTES - b.len - 2);
    sb_cat(&b, "\"}");
    assert_int_equal(b.len, TUN_CTL_MAX_BYTES);
    expect_ok(b.p, TUN_MODE_NATIVE, TUN_MSG_REQUEST_CHALLENGE);
    b.len -= 2;
    sb_cat(&b, "x\"}");
    expect_err(b.p, TUN_MODE_NATIVE, TUN_E_MESSAGE_TOO_LARGE);
    /* Osaurus frames after auth may be larger, the auth frame may not. */
    expect_ok(b.p, TUN_MODE_OSAURUS, TUN_MSG_REQUEST_CHALLENGE);
    expect_auth_err(b.p, TUN_MODE_OSAURUS, TUN_E_MESSAGE_TOO_LARGE);
    /* The codec refuses oversized text before looking at it. */
    tun_msg_clear(ma);
    assert_int_equal(
        tun_msg_decode("{}", (size_t)TUN_OSR_MAX_FRAME_BYTES + 1, TUN_MODE_OSAURUS, ma, NULL),
        TUN_E_MESSAGE_TOO_LARGE);
    free(b.p);

    /* Fixed-size fields: region 64, url 320. */
    char buf[1024];
    snprintf(buf, sizeof(buf),
             "{\"type\":\"agent_added\",\"address\":\"" ADDR_L "\",\"url\":\"https://a\","
             "\"region\":\"%065d\"}",
             0);
    expect_err(buf, TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    snprintf(buf, sizeof(buf),
             "{\"type\":\"agent_added\",\"address\":\"" ADDR_L "\",\"url\":\"https://a\","
             "\"region\":\"%064d\"}",
             0);
    expect_ok(buf, TUN_MODE_NATIVE, TUN_MSG_AGENT_ADDED);
    snprintf(buf, sizeof(buf),
             "{\"type\":\"agent_added\",\"address\":\"" ADDR_L "\",\"url\":\"https://%0312d\","
             "\"region\":\"r\"}",
             0);
    expect_ok(buf, TUN_MODE_NATIVE, TUN_MSG_AGENT_ADDED);
    assert_int_equal(strlen(ma->agent_added.url), TUN_URL_MAX);
    snprintf(buf, sizeof(buf),
             "{\"type\":\"agent_added\",\"address\":\"" ADDR_L "\",\"url\":\"https://%0313d\","
             "\"region\":\"r\"}",
             0);
    expect_err(buf, TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"agent_added\",\"address\":\"" ADDR_L "\",\"url\":\"https://a b\","
               "\"region\":\"r\"}",
               TUN_MODE_NATIVE, TUN_E_INVALID_JSON);
}

/* ---- Osaurus data frames ---- */

static void test_rt_request(void **state)
{
    const struct tun_msg_hdr h[] = {
        {IOV_LIT("content-type"), IOV_LIT("application/json")},
        {IOV_LIT("x-agent-address"), IOV_LIT(ADDR_L)},
        {IOV_LIT("x-quote"), IOV_LIT("a \"b\" \\ c")},
    };
    struct tun_msg m;
    char *s;

    tun_msg_init(&m, TUN_MSG_REQUEST, TUN_MODE_OSAURUS);
    strcpy(m.http.id, "6f1c0e4e-1f0a-4b7e-9a44-6d7c1f0a9b21");
    m.http.method = IOV_LIT("POST");
    m.http.path = IOV_LIT("/v1/chat?stream=true");
    m.http.hdrs = h;
    m.http.n_hdrs = 3;
    /* A text body with a NUL, a newline, an emoji and invalid UTF-8 (which becomes
     * U+FFFD, per maximal subpart, as the relay's TextDecoder does). */
    static const char body[] = "{\"m\":1}\n\0x\xf0\x9f\x98\x80|\xc0\xaf|\xe2\x82|\xf0\x9f\x98|";
    m.http.body = (struct iov){body, sizeof(body) - 1};
    s = roundtrip(&m);
    assert_string_equal(
        s, "{\"type\":\"request\",\"id\":\"6f1c0e4e-1f0a-4b7e-9a44-6d7c1f0a9b21\",\"method\":"
           "\"POST\",\"path\":\"/v1/chat?stream=true\",\"headers\":{\"content-type\":"
           "\"application/json\",\"x-agent-address\":\"" ADDR_L "\",\"x-quote\":"
           "\"a \\\"b\\\" \\\\ c\"},\"body\":\"{\\\"m\\\":1}\\n\\u0000x\xf0\x9f\x98\x80|"
           "\xef\xbf\xbd\xef\xbf\xbd|\xef\xbf\xbd|\xef\xbf\xbd|\"}");
    static const char want[] = "{\"m\":1}\n\0x\xf0\x9f\x98\x80|\xef\xbf\xbd\xef\xbf\xbd|"
                               "\xef\xbf\xbd|\xef\xbf\xbd|";
    assert_int_equal(mb->http.body.len, sizeof(want) - 1);
    assert_memory_equal(mb->http.body.base, want, sizeof(want) - 1);
    assert_int_equal(mb->http.n_hdrs, 3);
    assert_int_equal(mb->http.hdrs[2].value.len, strlen("a \"b\" \\ c"));
    assert_memory_equal(mb->http.hdrs[2].value.base, "a \"b\" \\ c", mb->http.hdrs[2].value.len);
    assert_memory_equal(mb->http.method.base, "POST", 4);
    assert_int_equal(mb->http.path.len, strlen("/v1/chat?stream=true"));
    assert_false(mb->http.base64);
    free(s);

    /* base64: every byte value survives exactly. */
    uint8_t bin[256];
    for (int i = 0; i < 256; i++)
        bin[i] = (uint8_t)i;
    for (size_t n = 0; n <= 4; n++) {
        m.http.body = (struct iov){(const char *)bin, n == 4 ? sizeof(bin) : n};
        m.http.base64 = true;
        s = roundtrip(&m);
        assert_non_null(strstr(s, "\"bodyEncoding\":\"base64\""));
        assert_true(mb->http.base64);
        assert_int_equal(mb->http.body.len, m.http.body.len);
        if (m.http.body.len > 0)
            assert_memory_equal(mb->http.body.base, bin, m.http.body.len);
        free(s);
    }
    m.http.body = (struct iov){(const char *)bin, 5};
    s = roundtrip(&m);
    assert_non_null(strstr(s, "\"body\":\"AAECAwQ=\""));
    free(s);

    /* Malformed requests are invalid_json (the agent answers 400). */
    expect_err("{\"type\":\"request\",\"id\":\"a\",\"method\":\"GET X\",\"path\":\"/\","
               "\"headers\":{},\"body\":\"\"}",
               TUN_MODE_OSAURUS, TUN_E_INVALID_JSON);
    assert_int_equal(ma->type, TUN_MSG_NONE); /* cleared by expect_err */
    expect_err("{\"type\":\"request\",\"id\":\"a\",\"method\":\"GET\",\"path\":\"x\","
               "\"headers\":{},\"body\":\"\"}",
               TUN_MODE_OSAURUS, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request\",\"id\":\"a\",\"method\":\"GET\",\"path\":\"/\","
               "\"headers\":{}}",
               TUN_MODE_OSAURUS, TUN_E_INVALID_JSON);
    expect_err("{\"type\":\"request\",\"id\":\"a\",\"method\":\"GET\",\"path\":\"/\","
               "\"headers\":{\"a\":\"b\\r\\nc: d\"},\"body\":\"\"}",
               TUN_MODE_OSAURUS, TUN_E_INVALID_JSON);
    expect_ok("{\"type\":\"request\",\"id\":\"a\",\"method\":\"OPTIONS\",\"path\":\"*\","
              "\"headers\":{},\"body\":\"\"}",
              TUN_MODE_OSAURUS, TUN_MSG_REQUEST);
    assert_int_equal(ma->http.n_hdrs, 0);
    assert_int_equal(ma->http.body.len, 0);
}

static void test_rt_response_frames(void **state)
{
    const struct tun_msg_hdr h[] = {
        {IOV_LIT("Content-Type"), IOV_LIT("text/event-stream")},
        {IOV_LIT("set-cookie"), IOV_LIT("a=b; Path=/")},
    };
    struct tun_msg m;
    char *s;

    tun_msg_init(&m, TUN_MSG_RESPONSE, TUN_MODE_OSAURUS);
    strcpy(m.http.id, "req_abc123");
    m.http.status = 201;
    m.http.hdrs = h;
    m.http.n_hdrs = 2;
    m.http.body = IOV_LIT("{\"reply\":\"hi\"}");
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"response\",\"id\":\"req_abc123\",\"status\":201,"
                           "\"headers\":{\"Content-Type\":\"text/event-stream\",\"set-cookie\":"
                           "\"a=b; Path=/\"},\"body\":\"{\\\"reply\\\":\\\"hi\\\"}\"}");
    assert_int_equal(mb->http.status, 201);
    assert_string_equal(mb->http.id, "req_abc123");
    assert_int_equal(mb->http.body.len, 14);
    free(s);

    m.type = TUN_MSG_STREAM_START;
    s = roundtrip(&m);
    assert_null(strstr(s, "body"));
    free(s);

    m.type = TUN_MSG_STREAM_CHUNK;
    m.http.body = IOV_LIT("data: x\n\n");
    s = roundtrip(&m);
    assert_string_equal(
        s, "{\"type\":\"stream_chunk\",\"id\":\"req_abc123\",\"data\":\"data: x\\n\\n\"}");
    assert_int_equal(mb->http.body.len, 9);
    free(s);
    m.http.base64 = true;
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"stream_chunk\",\"id\":\"req_abc123\",\"data\":"
                           "\"ZGF0YTogeAoK\",\"bodyEncoding\":\"base64\"}");
    assert_memory_equal(mb->http.body.base, "data: x\n\n", 9);
    free(s);

    m.type = TUN_MSG_STREAM_END;
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"stream_end\",\"id\":\"req_abc123\"}");
    free(s);
    m.type = TUN_MSG_CANCEL;
    s = roundtrip(&m);
    assert_string_equal(s, "{\"type\":\"cancel\",\"id\":\"req_abc123\"}");
    free(s);

    /* response.body is optional; 204/205/304 bodies are discarded. */
    expect_ok("{\"type\":\"response\",\"id\":\"a\",\"status\":200,\"headers\":{}}",
              TUN_MODE_OSAURUS, TUN_MSG_RESPONSE);
    assert_int_equal(ma->http.body.len, 0);
    expect_ok("{\"type\":\"response\",\"id\":\"a\",\"status\":204,\"headers\":{},\"body\":\"x\"}",
              TUN_MODE_OSAURUS, TUN_MSG_RESPONSE);
    assert_int_equal(ma->http.body.len, 0);
    expect_ok("{\"type\":\"response\",\"id\":\"a\",\"status\":304,\"headers\":{},\"body\":\"x\"}",
              TUN_MODE_OSAURUS, TUN_MSG_RESPONSE);
    assert_int_equal(ma->http.body.len, 0);
    /* Padding is optional on input. */
    expect_ok("{\"type\":\"stream_chunk\",\"id\":\"a\",\"data\":\"AAECAwQ\",\"bodyEncoding\":"
              "\"base64\"}",
              TUN_MODE_OSAURUS, TUN_MSG_STREAM_CHUNK);
    assert_int_equal(ma->http.body.len, 5);
    assert_memory_equal(ma->http.body.base, "\0\1\2\3\4", 5);
    /* \u0000 in a text chunk is a NUL byte of the data. */
    expect_ok("{\"type\":\"stream_chunk\",\"id\":\"a\",\"data\":\"a\\u0000b\\u0000\"}",
              TUN_MODE_OSAURUS, TUN_MSG_STREAM_CHUNK);
    assert_int_equal(ma->http.body.len, 4);
    assert_memory_equal(ma->http.body.base, "a\0b\0", 4);
}

static void test_response_violations(void **state)
{
    const enum tun_mode O = TUN_MODE_OSAURUS;
    const enum tun_err B = TUN_E_BAD_HOST_RESPONSE;
    const char *code = NULL;
#define RESP(status, headers)                                                                      \
    "{\"type\":\"response\",\"id\":\"r1\",\"status\":" status ",\"headers\":" headers              \
    ",\"body\":\"\"}"

    expect_ok(RESP("599", "{}"), O, TUN_MSG_RESPONSE);
    expect_ok(RESP("200", "{}"), O, TUN_MSG_RESPONSE);
    expect_err(RESP("199", "{}"), O, B);
    expect_err(RESP("600", "{}"), O, B);
    expect_err(RESP("0", "{}"), O, B);
    expect_err(RESP("101", "{}"), O, B);
    expect_err(RESP("\"200\"", "{}"), O, B);
    expect_err(RESP("200.5", "{}"), O, B);
    expect_err(RESP("null", "{}"), O, B);
    expect_err(RESP("200", "[]"), O, B);
    expect_err(RESP("200", "{\"a\":1}"), O, B);
    expect_err(RESP("200", "{\"\":\"x\"}"), O, B);
    expect_err(RESP("200", "{\"a b\":\"x\"}"), O, B);
    expect_err(RESP("200", "{\"a:\":\"x\"}"), O, B);
    expect_err(RESP("200", "{\"a\":\"x\\r\"}"), O, B);
    expect_err(RESP("200", "{\"a\":\"x\\ny\"}"), O, B);
    expect_err(RESP("200", "{\"a\":\"x\\u0000\"}"), O, B);
    expect_err(RESP("200", "{\"a\\u0000\":\"x\"}"), O, B);
    expect_err(RESP("200", "{\"a\":\"x\",\"a\":\"y\"}"), O, B);
    expect_ok(RESP("200", "{\"a\":\"x\\ty\",\"A\":\"z\"}"), O, TUN_MSG_RESPONSE);
    expect_err("{\"type\":\"response\",\"id\":\"r1\",\"status\":200,\"body\":\"\"}", O, B);
    expect_err("{\"type\":\"stream_start\",\"id\":\"r1\",\"status\":200}", O, B);
    expect_err("{\"type\":\"response\",\"id\":\"r1\",\"status\":200,\"headers\":{},\"body\":5}", O,
               B);
    expect_err("{\"type\":\"response\",\"id\":\"r1\",\"status\":200,\"headers\":{},\"body\":\"x\","
               "\"bodyEncoding\":\"gzip\"}",
               O, B);
    expect_err("{\"type\":\"response\",\"id\":\"r1\",\"status\":200,\"headers\":{},\"body\":\"x\","
               "\"bodyEncoding\":true}",
               O, B);
    expect_err("{\"type\":\"response\",\"id\":\"r1\",\"status\":200,\"headers\":{},\"body\":\"A\","
               "\"bodyEncoding\":\"base64\"}",
               O, B);
    expect_err(
        "{\"type\":\"response\",\"id\":\"r1\",\"status\":200,\"headers\":{},\"body\":\"A=B=\","
        "\"bodyEncoding\":\"base64\"}",
        O, B);
    expect_err(
        "{\"type\":\"response\",\"id\":\"r1\",\"status\":200,\"headers\":{},\"body\":\"AB*=\","
        "\"bodyEncoding\":\"base64\"}",
        O, B);
    expect_err("{\"type\":\"stream_chunk\",\"id\":\"r1\"}", O, B);
    expect_err("{\"type\":\"stream_end\"}", O, B);
    expect_err("{\"type\":\"stream_end\",\"id\":\"\"}", O, B);
    expect_err("{\"type\":\"stream_end\",\"id\":\"a\\nb\"}", O, B);
    expect_err("{\"type\":\"cancel\"}", O, TUN_E_INVALID_JSON);

    /* The id is kept on a failure so that the waiting caller can be failed. */
    assert_int_equal(dec(RESP("700", "{}"), O, &code), B);
    assert_int_equal(ma->type, TUN_MSG_RESPONSE);
    assert_string_equal(ma->http.id, "r1");
    assert_string_equal(code, "bad_host_response");
    assert_null(ma->priv_tree);
    assert_null(ma->priv_hdrs);
    tun_msg_clear(ma);

    char buf[512];
    snprintf(buf, sizeof(buf), "{\"type\":\"stream_end\",\"id\":\"%064d\"}", 0);
    expect_ok(buf, O, TUN_MSG_STREAM_END);
    snprintf(buf, sizeof(buf), "{\"type\":\"stream_end\",\"id\":\"%065d\"}", 0);
    expect_err(buf, O, B);
    assert_int_equal(dec(buf, O, &code), B);
    assert_string_equal(ma->http.id, "");
    tun_msg_clear(ma);

    /* Header names: 256 bytes at most. */
    snprintf(buf, sizeof(buf), RESP("200", "{\"%0256d\":\"x\"}"), 0);
    expect_ok(buf, O, TUN_MSG_RESPONSE);
    snprintf(buf, sizeof(buf), RESP("200", "{\"%0257d\":\"x\"}"), 0);
    expect_err(buf, O, B);
#undef RESP
}

static void test_response_limits(void **state)
{
    const enum tun_mode O = TUN_MODE_OSAURUS;
    const enum tun_err B = TUN_E_BAD_HOST_RESPONSE;
    struct sb b = {0};
    char name[32];

    /* 128 headers pass, 129 fail. */
    for (int n = 128; n <= 129; n++) {
        b.len = 0;
        sb_cat(&b, "{\"type\":\"stream_start\",\"id\":\"a\",\"status\":200,\"headers\":{");
        for (int i = 0; i < n; i++) {
            snprintf(name, sizeof(name), "%s\"h%d\":\"v\"", i ? "," : "", i);
            sb_cat(&b, name);
        }
        sb_cat(&b, "}}");
        if (n == 128) {
            expect_ok(b.p, O, TUN_MSG_STREAM_START);
            assert_int_equal(ma->http.n_hdrs, 128);
        } else {
            expect_err(b.p, O, B);
        }
    }
    /* Header value: 16384 UTF-16 units; a 4-byte character counts 2. */
    b.len = 0;
    sb_cat(&b, "{\"type\":\"stream_start\",\"id\":\"a\",\"status\":200,\"headers\":{\"v\":\"");
    sb_rep(&b, "\xf0\x9f\x98\x80", 8191);
    sb_cat(&b, "xx\"}}");
    expect_ok(b.p, O, TUN_MSG_STREAM_START);
    b.len -= 3;
    sb_cat(&b, "x\"}}");
    expect_err(b.p, O, B);
    /* stream_chunk data: 1 MiB of UTF-16 units (text) or decoded bytes (base64). */
    b.len = 0;
    sb_cat(&b, "{\"type\":\"stream_chunk\",\"id\":\"a\",\"data\":\"");
    sb_rep(&b, "\xe2\x82\xac", TUN_OSR_MAX_CHUNK); /* 3 bytes, 1 unit each */
    sb_cat(&b, "\"}");
    expect_ok(b.p, O, TUN_MSG_STREAM_CHUNK);
    assert_int_equal(ma->http.body.len, 3 * TUN_OSR_MAX_CHUNK);
    b.len -= 2;
    sb_cat(&b, "a\"}");
    expect_err(b.p, O, B);
    b.len = 0;
    sb_cat(&b, "{\"type\":\"stream_chunk\",\"id\":\"a\",\"bodyEncoding\":\"base64\",\"data\":\"");
    sb_rep(&b, "AAAA", TUN_OSR_MAX_CHUNK / 3); /* 1048575 bytes */
    sb_cat(&b, "AA==\"}");                     /* + 1 */
    expect_ok(b.p, O, TUN_MSG_STREAM_CHUNK);
    assert_int_equal(ma->http.body.len, TUN_OSR_MAX_CHUNK);
    b.len -= 6;
    sb_cat(&b, "AAA=\"}"); /* + 2 */
    expect_err(b.p, O, B);
    /* response.body: 10 MiB. */
    b.len = 0;
    sb_cat(&b, "{\"type\":\"response\",\"id\":\"a\",\"status\":200,\"headers\":{},\"body\":\"");
    sb_rep(&b, "0123456789abcdef", TUN_OSR_MAX_BODY / 16);
    sb_cat(&b, "\"}");
    expect_ok(b.p, O, TUN_MSG_RESPONSE);
    assert_int_equal(ma->http.body.len, TUN_OSR_MAX_BODY);
    char *s = roundtrip(ma);
    free(s);
    b.len -= 2;
    sb_cat(&b, "!\"}");
    expect_err(b.p, O, B);
    free(b.p);
}

/* The relay's frame schema at and past each edge (ANCHORS.md "Relay behaviour"):
 * id 1-64, header names up to 256 bytes, response.body optional, and the same
 * id rule for request frames (what tunnel-agent decodes) and cancel. */
static void test_osaurus_schema_edges(void **state)
{
    const enum tun_mode O = TUN_MODE_OSAURUS;
    const enum tun_err B = TUN_E_BAD_HOST_RESPONSE;
    struct sb b = {0};

    /* id: 64 characters pass, 65 and 0 fail, in a response and in a request */
    for (int n = 0; n <= 65; n += (n == 0 ? 64 : 1)) {
        for (int req = 0; req <= 1; req++) {
            b.len = 0;
            sb_cat(&b, req ? "{\"type\":\"request\",\"method\":\"GET\",\"path\":\"/\","
                             "\"headers\":{},\"body\":\"\",\"id\":\""
                           : "{\"type\":\"response\",\"status\":200,\"headers\":{},\"id\":\"");
            sb_rep(&b, "i", (size_t)n);
            sb_cat(&b, "\"}");
            if (n == 64) {
                expect_ok(b.p, O, req ? TUN_MSG_REQUEST : TUN_MSG_RESPONSE);
                assert_int_equal(strlen(ma->http.id), 64);
            } else {
                expect_err(b.p, O, req ? TUN_E_INVALID_JSON : B);
            }
        }
    }
    b.len = 0;
    sb_cat(&b, "{\"type\":\"cancel\",\"id\":\"");
    sb_rep(&b, "c", 65);
    sb_cat(&b, "\"}");
    expect_err(b.p, O, TUN_E_INVALID_JSON);
    /* header names: 256 bytes pass, 257 fail; an empty name fails */
    for (int n = 256; n <= 257; n++) {
        b.len = 0;
        sb_cat(&b, "{\"type\":\"response\",\"id\":\"a\",\"status\":200,\"headers\":{\"");
        sb_rep(&b, "h", (size_t)n);
        sb_cat(&b, "\":\"v\"}}");
        if (n == 256)
            expect_ok(b.p, O, TUN_MSG_RESPONSE);
        else
            expect_err(b.p, O, B);
    }
    expect_err("{\"type\":\"response\",\"id\":\"a\",\"status\":200,\"headers\":{\"\":\"v\"}}", O, B);
    /* response.body is optional: absent is empty */
    expect_ok("{\"type\":\"response\",\"id\":\"a\",\"status\":204,\"headers\":{}}", O,
              TUN_MSG_RESPONSE);
    assert_int_equal(ma->http.body.len, 0);
    /* status 200-599 */
    expect_err("{\"type\":\"response\",\"id\":\"a\",\"status\":199,\"headers\":{}}", O, B);
    expect_ok("{\"type\":\"response\",\"id\":\"a\",\"status\":599,\"headers\":{}}", O,
              TUN_MSG_RESPONSE);
    expect_err("{\"type\":\"response\",\"id\":\"a\",\"status\":600,\"headers\":{}}", O, B);
    /* auth_ok features (Osaurus mode): base64 read, junk ignored */
    expect_ok("{\"type\":\"auth_ok\",\"agents\":[],\"features\":[\"base64\"]}", O,
              TUN_MSG_AUTH_OK);
    assert_int_equal(ma->auth_ok.features, TUN_FEAT_BASE64);
    expect_ok("{\"type\":\"auth_ok\",\"agents\":[],\"features\":7}", O, TUN_MSG_AUTH_OK);
    assert_int_equal(ma->auth_ok.features, 0);
    free(b.p);
}

static void test_encode_refusals(void **state)
{
    struct tun_msg m;
    size_t len = 77;

    tun_msg_init(&m, TUN_MSG_NONE, TUN_MODE_NATIVE);
    assert_null(tun_msg_encode(&m, &len));
    assert_int_equal(len, 77);
    m.type = (enum tun_msg_type)99;
    assert_null(tun_msg_encode(&m, &len));
    tun_msg_init(&m, TUN_MSG_RESPONSE, TUN_MODE_OSAURUS);
    m.http.n_hdrs = 1;
    assert_null(tun_msg_encode(&m, &len));
    struct tun_msg *k = calloc(1, sizeof(*k));
    tun_msg_init(k, TUN_MSG_AUTH_OK, TUN_MODE_NATIVE);
    k->auth_ok.n_agents = 1;
    assert_null(tun_msg_encode(k, &len)); /* native needs ping_interval */
    k->auth_ok.ping_interval_s = 20;
    char *s = tun_msg_encode(k, &len);
    assert_non_null(s);
    free(s);
    k->auth_ok.n_rejected = TUN_MAX_AGENTS + 1;
    assert_null(tun_msg_encode(k, &len));
    free(k);
    /* Control characters and quotes are escaped; output is always decodable. */
    tun_msg_init(&m, TUN_MSG_ERROR, TUN_MODE_NATIVE);
    strcpy(m.error.code, "x");
    strcpy(m.error.message, "\x01\x1f\"\\\b\f\x7f");
    s = tun_msg_encode(&m, &len);
    assert_string_equal(s, "{\"type\":\"error\",\"error\":\"x\",\"message\":"
                           "\"\\u0001\\u001f\\\"\\\\\\b\\f\x7f\"}");
    free(s);
    /* \r \t escapes; U+10FFFF (F4 8F BF BF) is kept, F4 90 is not UTF-8. */
    strcpy(m.error.message, "\r\t\xf4\x8f\xbf\xbf\xf4\x90\x80\x80");
    s = tun_msg_encode(&m, &len);
    assert_string_equal(
        s, "{\"type\":\"error\",\"error\":\"x\",\"message\":"
           "\"\\r\\t\xf4\x8f\xbf\xbf\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"}");
    free(s);
}

/* ---- signed texts ---- */

static void test_signed_texts(void **state)
{
    char buf[TUN_SIGNED_TEXT_MAX];
    uint8_t addr[ID_ADDR_LEN];
    const char *native = "tunnel-gateway:v1:localhost:" ADDR_L ":" NONCE ":1767225600";
    const char *osr = "osaurus-tunnel:" ADDR_C ":" NONCE ":1767225600";

    parse_addr(ADDR_C, addr);
    assert_int_equal(tun_msg_native_signed_text(buf, sizeof(buf), "LocalHost", addr, NONCE, TS),
                     (int)strlen(native));
    assert_string_equal(buf, native);
    assert_int_equal(strlen(native), 146);
    assert_int_equal(tun_msg_osaurus_signed_text(buf, sizeof(buf), ADDR_C, NONCE, TS),
                     (int)strlen(osr));
    assert_string_equal(buf, osr);
    /* The worked example's signatures verify (PROTOCOL.md section 13). */
    assert_int_equal(id_verify(native, strlen(native), SIG_NATIVE, strlen(SIG_NATIVE), addr),
                     ID_OK);
    assert_int_equal(id_verify(osr, strlen(osr), SIG_OSR, strlen(SIG_OSR), addr), ID_OK);
    assert_int_not_equal(id_verify(osr, strlen(osr), SIG_NATIVE, strlen(SIG_NATIVE), addr), ID_OK);

    assert_int_equal(tun_msg_native_signed_text(buf, sizeof(buf), "localhost", addr, NONCE, 0),
                     (int)strlen("tunnel-gateway:v1:localhost:" ADDR_L ":" NONCE ":0"));
    assert_int_equal(
        tun_msg_native_signed_text(buf, sizeof(buf), "localhost:8443", addr, NONCE, TS), -1);
    assert_int_equal(tun_msg_native_signed_text(buf, sizeof(buf), "", addr, NONCE, TS), -1);
    assert_int_equal(tun_msg_native_signed_text(buf, sizeof(buf), "a b", addr, NONCE, TS), -1);
    assert_int_equal(tun_msg_native_signed_text(buf, sizeof(buf), "localhost", addr, "ABC", TS),
                     -1);
    assert_int_equal(tun_msg_native_signed_text(buf, sizeof(buf), "localhost", addr, NONCE, -1),
                     -1);
    assert_int_equal(tun_msg_native_signed_text(buf, 146, "localhost", addr, NONCE, TS), -1);
    assert_int_equal(tun_msg_native_signed_text(buf, 147, "localhost", addr, NONCE, TS), 146);
    assert_int_equal(tun_msg_osaurus_signed_text(buf, sizeof(buf), "0x12", NONCE, TS), -1);
    assert_int_equal(tun_msg_osaurus_signed_text(buf, sizeof(buf), ADDR_C, NONCE "0", TS), -1);
    assert_int_equal(tun_msg_osaurus_signed_text(buf, 10, ADDR_C, NONCE, TS), -1);
}

static void test_nonce_instance(void **state)
{
    char a[TUN_NONCE_HEX_LEN + 1], b[TUN_NONCE_HEX_LEN + 1];

    assert_int_equal(tun_msg_nonce_new(a), 0);
    assert_int_equal(tun_msg_nonce_new(b), 0);
    assert_true(tun_msg_nonce_is_valid(a, strlen(a)));
    assert_string_not_equal(a, b);
    assert_false(tun_msg_nonce_is_valid(NONCE, 63));
    assert_false(tun_msg_instance_is_valid("abc", 3));
    assert_true(tun_msg_instance_is_valid(INST, strlen(INST)));
    assert_true(tun_msg_instance_is_valid("ABCdef-1", 8));
    assert_false(tun_msg_instance_is_valid("ABCdef_1", 8));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_err_table),
        cmocka_unit_test(test_err_for_mode),
        cmocka_unit_test(test_type_names),
        cmocka_unit_test(test_rt_challenge),
        cmocka_unit_test(test_rt_auth_native),
        cmocka_unit_test(test_rt_auth_osaurus),
        cmocka_unit_test(test_rt_auth_ok),
        cmocka_unit_test(test_rt_errors),
        cmocka_unit_test(test_message_truncated),
        cmocka_unit_test(test_rt_control),
        cmocka_unit_test(test_add_remove_malformed),
        cmocka_unit_test(test_auth_malformed),
        cmocka_unit_test(test_auth_agent_counts),
        cmocka_unit_test(test_json_malformed),
        cmocka_unit_test(test_depth_bomb),
        cmocka_unit_test(test_size_limits),
        cmocka_unit_test(test_rt_request),
        cmocka_unit_test(test_rt_response_frames),
        cmocka_unit_test(test_response_violations),
        cmocka_unit_test(test_response_limits),
        cmocka_unit_test(test_osaurus_schema_edges),
        cmocka_unit_test(test_encode_refusals),
        cmocka_unit_test(test_signed_texts),
        cmocka_unit_test(test_nonce_instance),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
