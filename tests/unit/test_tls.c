/* Unit tests for common/tls: the local CA on disk (modes, reuse, refusal),
 * per-name leaves (verification, SAN, cache, eviction), in-memory handshakes
 * over BIO pairs (SNI, ALPN, hostname verification), reload with configured
 * files, and draining the OpenSSL error queue. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "log.h"
#include "tls.h"

#define ADDR_A "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"
#define ADDR_B "0xfb6916095ca1df60bb79ce92ce3ea74c37c5d359"
#define HOST_A ADDR_A ".localhost"
#define HOST_B ADDR_B ".localhost"

/* Per-test scratch: a temp directory and a log sink writing to a file. */
struct fx {
    char dir[64];       /* mkdtemp() result */
    char state[128];    /* <dir>/a/b/state, not created beforehand */
    char ca_pem[160];   /* <state>/local-ca.pem */
    char ca_key[160];   /* <state>/local-ca.key */
    char log_path[160]; /* <dir>/log */
    int log_fd;
    struct log_sink *log;
};

static void rm_rf(const char *path)
{
    struct stat st;
    if (lstat(path, &st) == -1)
        return;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        assert_non_null(d);
        while ((e = readdir(d)) != NULL) {
            char sub[512];
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(sub, sizeof(sub), "%s/%s", path, e->d_name);
            rm_rf(sub);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

static int fx_setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_tls.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->state, sizeof(f->state), "%s/a/b/state", f->dir);
    snprintf(f->ca_pem, sizeof(f->ca_pem), "%s/local-ca.pem", f->state);
    snprintf(f->ca_key, sizeof(f->ca_key), "%s/local-ca.key", f->state);
    snprintf(f->log_path, sizeof(f->log_path), "%s/log", f->dir);
    f->log_fd = open(f->log_path, O_RDWR | O_CREAT | O_TRUNC | O_APPEND, 0600);
    assert_true(f->log_fd >= 0);
    f->log = log_new("test", LOG_LVL_DEBUG, LOG_FMT_TEXT, f->log_fd);
    assert_non_null(f->log);
    umask(022);
    *state = f;
    return 0;
}

static int fx_teardown(void **state)
{
    struct fx *f = *state;
    log_free(f->log);
    close(f->log_fd);
    rm_rf(f->dir);
    free(f);
    /* No test may leave errors behind for the next one. */
    assert_int_equal(ERR_peek_error(), 0);
    return 0;
}

/* Everything logged so far (NUL-terminated, static buffer). */
static const char *fx_log(struct fx *f)
{
    static char buf[65536];
    ssize_t n = pread(f->log_fd, buf, sizeof(buf) - 1, 0);
    buf[n < 0 ? 0 : n] = '\0';
    return buf;
}

static void fx_log_clear(struct fx *f)
{
    assert_int_equal(ftruncate(f->log_fd, 0), 0);
}

static struct tls_server *new_local(struct fx *f, const char *alpn, size_t cache_max, char *err,
                                    size_t errlen)
{
    struct tls_server_opts o = {
        .state_dir = f->state,
        .domain = "localhost",
        .alpn = alpn,
        .cache_max_names = cache_max,
        .log = f->log,
    };
    return tls_server_new(&o, err, errlen);
}

static size_t read_file(const char *path, char *buf, size_t cap)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    size_t n = fread(buf, 1, cap, fp);
    fclose(fp);
    assert_true(n > 0 && n < cap);
    return n;
}

static void write_file(const char *path, const char *data, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
}

static X509 *load_pem_cert(const char *path)
{
    BIO *b = BIO_new_file(path, "r");
    assert_non_null(b);
    X509 *x = PEM_read_bio_X509(b, NULL, NULL, NULL);
    BIO_free(b);
    assert_non_null(x);
    return x;
}

static int validity_days(const X509 *x)
{
    int days = 0;
    int secs = 0;
    assert_int_equal(ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(x), X509_get0_notAfter(x)),
                     1);
    return days;
}

static bool is_p256(const X509 *x)
{
    EVP_PKEY *pk = X509_get0_pubkey(x);
    char group[64];
    size_t len = 0;
    return pk != NULL && EVP_PKEY_is_a(pk, "EC") &&
           EVP_PKEY_get_group_name(pk, group, sizeof(group), &len) == 1 &&
           strcmp(group, "prime256v1") == 0;
}

/* Verifies x against the CA in ca_path as a TLS server certificate. */
static int verify_against(X509 *x, const char *ca_path)
{
    X509_STORE *store = X509_STORE_new();
    X509_STORE_CTX *vctx = X509_STORE_CTX_new();
    X509 *ca = load_pem_cert(ca_path);
    int rv;

    assert_non_null(store);
    assert_non_null(vctx);
    assert_int_equal(X509_STORE_add_cert(store, ca), 1);
    assert_int_equal(X509_STORE_CTX_init(vctx, store, x, NULL), 1);
    assert_int_equal(X509_STORE_CTX_set_purpose(vctx, X509_PURPOSE_SSL_SERVER), 1);
    rv = X509_verify_cert(vctx);
    if (rv != 1)
        print_message("verify: %s\n",
                      X509_verify_cert_error_string(X509_STORE_CTX_get_error(vctx)));
    X509_STORE_CTX_free(vctx);
    X509_STORE_free(store);
    X509_free(ca);
    ERR_clear_error();
    return rv;
}

/* Runs a handshake between two fresh SSLs over a BIO pair, then sends one
 * message each way. Returns 0 or -1; the SSLs stay for inspection. */
static int handshake(SSL *c, SSL *s)
{
    BIO *bc = NULL;
    BIO *bs = NULL;
    bool c_done = false;
    bool s_done = false;
    char buf[16];

    assert_int_equal(BIO_new_bio_pair(&bc, 0, &bs, 0), 1);
    SSL_set_bio(c, bc, bc);
    SSL_set_bio(s, bs, bs);
    SSL_set_connect_state(c);
    SSL_set_accept_state(s);
    for (int i = 0; i < 100 && !(c_done && s_done); i++) {
        int rc = SSL_do_handshake(c);
        int rs = SSL_do_handshake(s);
        int ec = SSL_get_error(c, rc);
        int es = SSL_get_error(s, rs);
        c_done = rc == 1;
        s_done = rs == 1;
        if ((!c_done && ec != SSL_ERROR_WANT_READ && ec != SSL_ERROR_WANT_WRITE) ||
            (!s_done && es != SSL_ERROR_WANT_READ && es != SSL_ERROR_WANT_WRITE)) {
            ERR_clear_error();
            return -1;
        }
    }
    if (!(c_done && s_done))
        return -1;
    assert_int_equal(SSL_write(c, "ping", 4), 4);
    assert_int_equal(SSL_read(s, buf, sizeof(buf)), 4);
    assert_memory_equal(buf, "ping", 4);
    assert_int_equal(SSL_write(s, "pong", 4), 4);
    assert_int_equal(SSL_read(c, buf, sizeof(buf)), 4);
    assert_memory_equal(buf, "pong", 4);
    return 0;
}

/* Client with its own context; host NULL = leave SNI/verification to the caller. */
static SSL *client_ssl(const char *ca, const char *alpn, const char *host)
{
    char err[256];
    SSL_CTX *cctx = tls_client_ctx_new(ca, alpn, err, sizeof(err));
    assert_non_null(cctx);
    SSL *c = SSL_new(cctx);
    SSL_CTX_free(cctx); /* the SSL keeps a reference */
    assert_non_null(c);
    if (host != NULL)
        assert_int_equal(tls_client_prepare(c, host), 0);
    return c;
}

static void assert_alpn(SSL *ssl, const char *want)
{
    const unsigned char *p = NULL;
    unsigned int len = 0;
    SSL_get0_alpn_selected(ssl, &p, &len);
    assert_int_equal(len, strlen(want));
    if (len > 0)
        assert_memory_equal(p, want, len);
}

/* ------------------------------------------------------------------------ */

static void test_local_ca_create_and_reuse(void **state)
{
    struct fx *f = *state;
    char err[512];
    char pem1[8192];
    char pem2[8192];
    struct stat st;

    struct tls_server *s = new_local(f, "h2,http/1.1", 0, err, sizeof(err));
    assert_non_null(s);
    assert_true(tls_server_is_local_ca(s));
    assert_string_equal(tls_server_ca_path(s), f->ca_pem);
    assert_non_null(strstr(fx_log(f), "event=tls_local_ca_created"));

    assert_int_equal(stat(f->state, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0700);
    assert_int_equal(stat(f->ca_key, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0600);
    assert_int_equal(stat(f->ca_pem, &st), 0);
    assert_int_equal(st.st_mode & 077, 044); /* public: clients need it */

    /* Only the two files: no temp file left behind. */
    DIR *d = opendir(f->state);
    struct dirent *e;
    int entries = 0;
    assert_non_null(d);
    while ((e = readdir(d)) != NULL)
        entries += e->d_name[0] != '.';
    closedir(d);
    assert_int_equal(entries, 2);

    /* The CA itself: self-signed CA, EC P-256, keyCertSign, ~10 years. */
    X509 *ca = load_pem_cert(f->ca_pem);
    char subject[256];
    X509_NAME_oneline(X509_get_subject_name(ca), subject, sizeof(subject));
    assert_non_null(strstr(subject, "CN=tunnel-gateway local CA "));
    assert_true(strlen(strstr(subject, "CA ")) > 3); /* random suffix */
    assert_true(X509_check_ca(ca) >= 1);
    assert_true((X509_get_key_usage(ca) & KU_KEY_CERT_SIGN) != 0);
    assert_true((X509_get_extension_flags(ca) & EXFLAG_SS) != 0);
    assert_true(is_p256(ca));
    assert_true(validity_days(ca) >= 3650 && validity_days(ca) <= 3653);
    X509_free(ca);

    size_t n1 = read_file(f->ca_pem, pem1, sizeof(pem1));
    tls_server_free(s);

    fx_log_clear(f);
    s = new_local(f, "h2,http/1.1", 0, err, sizeof(err));
    assert_non_null(s);
    assert_non_null(strstr(fx_log(f), "event=tls_local_ca_loaded"));
    assert_null(strstr(fx_log(f), "event=tls_local_ca_created"));
    size_t n2 = read_file(f->ca_pem, pem2, sizeof(pem2));
    assert_int_equal(n1, n2);
    assert_memory_equal(pem1, pem2, n1);
    /* Leaves from the second run chain to the first run's CA. */
    assert_int_equal(verify_against(tls_server_cert_for(s, HOST_A), f->ca_pem), 1);
    tls_server_free(s);
}

static void test_local_ca_key_mode_refused(void **state)
{
    struct fx *f = *state;
    char err[512];

    struct tls_server *s = new_local(f, NULL, 0, err, sizeof(err));
    assert_non_null(s);
    tls_server_free(s);

    static const mode_t bad[] = {0644, 0640, 0604, 0660};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(chmod(f->ca_key, bad[i]), 0);
        err[0] = '\0';
        s = new_local(f, NULL, 0, err, sizeof(err));
        assert_null(s);
        assert_non_null(strstr(err, f->ca_key));   /* names the file */
        assert_non_null(strstr(err, "chmod 600")); /* and the fix */
    }
    assert_int_equal(chmod(f->ca_key, 0600), 0);
    s = new_local(f, NULL, 0, err, sizeof(err));
    assert_non_null(s);
    tls_server_free(s);
}

static void test_local_ca_half_state(void **state)
{
    struct fx *f = *state;
    char err[512];
    char pem1[8192];
    char pem2[8192];

    struct tls_server *s = new_local(f, NULL, 0, err, sizeof(err));
    assert_non_null(s);
    tls_server_free(s);
    size_t n1 = read_file(f->ca_pem, pem1, sizeof(pem1));

    /* Key gone, certificate still there (maybe trusted somewhere): refuse. */
    char saved_key[8192];
    size_t kn = read_file(f->ca_key, saved_key, sizeof(saved_key));
    assert_int_equal(unlink(f->ca_key), 0);
    s = new_local(f, NULL, 0, err, sizeof(err));
    assert_null(s);
    assert_non_null(strstr(err, f->ca_key));
    assert_non_null(strstr(err, "missing"));

    /* Certificate gone (key or not): a new CA, which was never trusted. */
    write_file(f->ca_key, saved_key, kn);
    assert_int_equal(chmod(f->ca_key, 0600), 0);
    assert_int_equal(unlink(f->ca_pem), 0);
    s = new_local(f, NULL, 0, err, sizeof(err));
    assert_non_null(s);
    tls_server_free(s);
    size_t n2 = read_file(f->ca_pem, pem2, sizeof(pem2));
    assert_false(n1 == n2 && memcmp(pem1, pem2, n1) == 0);
    /* Key not matching the certificate: refuse. */
    write_file(f->ca_pem, pem1, n1); /* old cert, new key */
    s = new_local(f, NULL, 0, err, sizeof(err));
    assert_null(s);
    assert_non_null(strstr(err, "does not match"));

    /* Garbage key file. */
    write_file(f->ca_key, "not a key\n", 10);
    s = new_local(f, NULL, 0, err, sizeof(err));
    assert_null(s);
    assert_non_null(strstr(err, f->ca_key));
}

static void test_leaf_issue_and_cache(void **state)
{
    struct fx *f = *state;
    char err[512];

    struct tls_server *s = new_local(f, NULL, 0, err, sizeof(err));
    assert_non_null(s);
    assert_int_equal(tls_server_cache_count(s), 0);

    X509 *x = tls_server_cert_for(s, HOST_A);
    assert_non_null(x);
    assert_int_equal(verify_against(x, f->ca_pem), 1);
    assert_int_equal(X509_check_host(x, HOST_A, 0, 0, NULL), 1);
    assert_int_not_equal(X509_check_host(x, HOST_B, 0, 0, NULL), 1);
    assert_int_not_equal(X509_check_host(x, "localhost", 0, 0, NULL), 1);

    /* Exactly one SAN, DNS:<name>. */
    GENERAL_NAMES *sans = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    assert_non_null(sans);
    assert_int_equal(sk_GENERAL_NAME_num(sans), 1);
    GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, 0);
    assert_int_equal(gn->type, GEN_DNS);
    assert_int_equal(ASN1_STRING_length(gn->d.dNSName), strlen(HOST_A));
    assert_memory_equal(ASN1_STRING_get0_data(gn->d.dNSName), HOST_A, strlen(HOST_A));
    GENERAL_NAMES_free(sans);

    /* serverAuth only (without the extension the call reports every usage). */
    assert_true(X509_get_ext_by_NID(x, NID_ext_key_usage, -1) >= 0);
    assert_int_equal(X509_get_extended_key_usage(x), XKU_SSL_SERVER);
    assert_int_equal(X509_check_ca(x), 0);
    assert_true(is_p256(x));
    assert_true(validity_days(x) <= 825);
    assert_true(validity_days(x) >= 800);
    assert_true(X509_cmp_current_time(X509_get0_notBefore(x)) < 0);

    /* Cached: same object, also for a differently-cased SNI. */
    assert_ptr_equal(tls_server_cert_for(s, HOST_A), x);
    assert_ptr_equal(tls_server_cert_for(s, "0X5AAEB6053F3E94C9B9A09F33669435E7EF1BEAED.LocalHost"),
                     x);
    assert_int_equal(tls_server_cache_count(s), 1);

    /* Apex, no SNI and names outside <label>.<domain> get the apex cert. */
    X509 *apex = tls_server_cert_for(s, "localhost");
    assert_non_null(apex);
    assert_ptr_not_equal(apex, x);
    assert_int_equal(X509_check_host(apex, "localhost", 0, 0, NULL), 1);
    assert_int_equal(X509_check_ip_asc(apex, "127.0.0.1", 0), 1);
    assert_int_not_equal(X509_check_ip_asc(x, "127.0.0.1", 0), 1);
    assert_int_equal(verify_against(apex, f->ca_pem), 1);
    static const char *const outside[] = {
        "foo.example.com", "a.b.localhost",         "-bad.localhost",
        "bad-.localhost",  "under_score.localhost", ".localhost",
        "xlocalhost",      "localhost.evil",        "",
    };
    for (size_t i = 0; i < sizeof(outside) / sizeof(outside[0]); i++)
        assert_ptr_equal(tls_server_cert_for(s, outside[i]), apex);
    assert_ptr_equal(tls_server_cert_for(s, NULL), apex);
    assert_int_equal(tls_server_cache_count(s), 1);

    X509 *y = tls_server_cert_for(s, HOST_B);
    assert_non_null(y);
    assert_ptr_not_equal(y, x);
    assert_int_equal(X509_check_host(y, HOST_B, 0, 0, NULL), 1);
    assert_int_equal(tls_server_cache_count(s), 2);
    tls_server_free(s);
}

static void test_leaf_cache_eviction(void **state)
{
    struct fx *f = *state;
    char err[512];

    struct tls_server *s = new_local(f, NULL, 2, err, sizeof(err));
    assert_non_null(s);
    X509 *a = tls_server_cert_for(s, "a.localhost");
    X509 *b = tls_server_cert_for(s, "b.localhost");
    assert_non_null(a);
    assert_non_null(b);
    /* Held as live connections would: an evicted entry cannot reappear at
     * the same address, so pointer equality means "still cached". */
    assert_int_equal(X509_up_ref(a), 1);
    assert_int_equal(X509_up_ref(b), 1);
    assert_ptr_equal(tls_server_cert_for(s, "a.localhost"), a); /* a is now most recent */
    X509 *c = tls_server_cert_for(s, "c.localhost");
    assert_non_null(c);
    assert_int_equal(tls_server_cache_count(s), 2);
    assert_ptr_equal(tls_server_cert_for(s, "a.localhost"), a); /* kept */
    X509 *b2 = tls_server_cert_for(s, "b.localhost");           /* evicted: new one */
    assert_non_null(b2);
    assert_int_not_equal(X509_cmp(b, b2), 0);
    assert_int_equal(X509_check_host(b, "b.localhost", 0, 0, NULL), 1); /* still usable */
    assert_int_equal(tls_server_cache_count(s), 2);
    X509_free(a);
    X509_free(b);
    tls_server_free(s);
}

static void test_handshake_local_ca(void **state)
{
    struct fx *f = *state;
    char err[512];

    struct tls_server *s = new_local(f, "h2,http/1.1", 0, err, sizeof(err));
    assert_non_null(s);

    /* A subdomain leaf, h2 by server preference. */
    SSL *c = client_ssl(f->ca_pem, "http/1.1,h2", HOST_A);
    SSL *sv = SSL_new(tls_server_ctx(s));
    assert_non_null(sv);
    assert_int_equal(handshake(c, sv), 0);
    assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
    assert_alpn(c, "h2");
    assert_alpn(sv, "h2");
    X509 *peer = SSL_get1_peer_certificate(c);
    assert_non_null(peer);
    assert_int_equal(X509_check_host(peer, HOST_A, 0, 0, NULL), 1);
    assert_int_equal(X509_cmp(peer, tls_server_cert_for(s, HOST_A)), 0);
    X509_free(peer);
    /* The client vanishes without close_notify: a clean EOF for the server
     * (SSL_OP_IGNORE_UNEXPECTED_EOF), not a protocol error. */
    char buf[8];
    assert_int_equal(BIO_shutdown_wr(SSL_get_wbio(c)), 1);
    int n = SSL_read(sv, buf, sizeof(buf));
    assert_int_equal(n, 0);
    assert_int_equal(SSL_get_error(sv, n), SSL_ERROR_ZERO_RETURN);
    ERR_clear_error();
    SSL_free(c);
    SSL_free(sv);

    /* The apex. */
    c = client_ssl(f->ca_pem, "h2,http/1.1", "localhost");
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
    SSL_free(c);
    SSL_free(sv);

    /* TLS 1.2 too. */
    c = client_ssl(f->ca_pem, "h2,http/1.1", HOST_B);
    assert_int_equal(SSL_set_max_proto_version(c, TLS1_2_VERSION), 1);
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    assert_int_equal(SSL_version(c), TLS1_2_VERSION);
    assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
    assert_alpn(c, "h2");
    SSL_free(c);
    SSL_free(sv);

    /* SNI for A but expecting B: the leaf for A must not satisfy it. */
    c = client_ssl(f->ca_pem, "h2", HOST_B);
    assert_int_equal(SSL_set_tlsext_host_name(c, HOST_A), 1);
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), -1);
    assert_int_equal(SSL_get_verify_result(c), X509_V_ERR_HOSTNAME_MISMATCH);
    SSL_free(c);
    SSL_free(sv);

    /* A name outside the domain gets the apex certificate, which fails. */
    c = client_ssl(f->ca_pem, "h2", "a.b.localhost");
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), -1);
    assert_int_equal(SSL_get_verify_result(c), X509_V_ERR_HOSTNAME_MISMATCH);
    SSL_free(c);
    SSL_free(sv);

    /* The system store does not know the local CA: verification is on. */
    c = client_ssl(NULL, "h2", HOST_A);
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), -1);
    assert_int_not_equal(SSL_get_verify_result(c), X509_V_OK);
    SSL_free(c);
    SSL_free(sv);

    /* An IP literal: no SNI, the iPAddress SAN is checked. The localhost
     * apex carries 127.0.0.1 and ::1, nothing else. */
    static const char *const ips[] = {"127.0.0.1", "::1", "10.0.0.1"};
    for (size_t i = 0; i < sizeof(ips) / sizeof(ips[0]); i++) {
        c = client_ssl(f->ca_pem, "h2", ips[i]);
        assert_null(SSL_get_servername(c, TLSEXT_NAMETYPE_host_name));
        sv = SSL_new(tls_server_ctx(s));
        if (i < 2) {
            assert_int_equal(handshake(c, sv), 0);
            assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
        } else {
            assert_int_equal(handshake(c, sv), -1);
            assert_int_equal(SSL_get_verify_result(c), X509_V_ERR_IP_ADDRESS_MISMATCH);
        }
        SSL_free(c);
        SSL_free(sv);
    }

    /* TLS 1.1 is refused by the server even if the client allows it. */
    c = client_ssl(f->ca_pem, NULL, HOST_A);
    SSL_set_security_level(c, 0);
    assert_int_equal(SSL_set_min_proto_version(c, TLS1_VERSION), 1);
    assert_int_equal(SSL_set_max_proto_version(c, TLS1_1_VERSION), 1);
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), -1);
    SSL_free(c);
    SSL_free(sv);

    tls_server_free(s);
}

static void assert_server_options(SSL_CTX *ctx)
{
    uint64_t want = SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                    SSL_OP_CIPHER_SERVER_PREFERENCE;
    assert_true((SSL_CTX_get_options(ctx) & want) == want);
    assert_int_equal(SSL_CTX_get_min_proto_version(ctx), TLS1_2_VERSION);
}

static void test_server_ctx_settings(void **state)
{
    struct fx *f = *state;
    char err[512];

    struct tls_server *s = new_local(f, "h2,http/1.1", 0, err, sizeof(err));
    assert_non_null(s);
    assert_server_options(tls_server_ctx(s));
    assert_int_equal(tls_server_reload(s, err, sizeof(err)), 0);
    assert_server_options(tls_server_ctx(s));

    /* Tickets issued before a reload still resume after it. */
    SSL *c = client_ssl(f->ca_pem, "h2", HOST_A);
    SSL *sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    assert_false(SSL_session_reused(c));
    SSL_SESSION *sess = SSL_get1_session(c);
    assert_non_null(sess);
    assert_true(SSL_SESSION_is_resumable(sess));
    SSL_shutdown(c); /* else SSL_free() marks the session not resumable */
    SSL_free(c);
    SSL_free(sv);
    assert_int_equal(tls_server_reload(s, err, sizeof(err)), 0);
    c = client_ssl(f->ca_pem, "h2", HOST_A);
    assert_int_equal(SSL_set_session(c, sess), 1);
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    assert_true(SSL_session_reused(c));
    assert_alpn(c, "h2");
    SSL_free(c);
    SSL_free(sv);
    SSL_SESSION_free(sess);
    tls_server_free(s);
}

static void test_alpn_variants(void **state)
{
    struct fx *f = *state;
    char err[512];

    /* Server speaks only HTTP/1.1. */
    struct tls_server *s = new_local(f, "http/1.1", 0, err, sizeof(err));
    assert_non_null(s);
    SSL *c = client_ssl(f->ca_pem, "h2,http/1.1", HOST_A);
    SSL *sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    assert_alpn(c, "http/1.1");
    SSL_free(c);
    SSL_free(sv);

    /* No overlap: no ALPN, the handshake still succeeds. */
    c = client_ssl(f->ca_pem, "h2", HOST_A);
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    assert_alpn(c, "");
    SSL_free(c);
    SSL_free(sv);
    tls_server_free(s);

    /* No ALPN configured. */
    s = new_local(f, NULL, 0, err, sizeof(err));
    assert_non_null(s);
    c = client_ssl(f->ca_pem, "h2,http/1.1", HOST_A);
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    assert_alpn(c, "");
    SSL_free(c);
    SSL_free(sv);
    tls_server_free(s);
}

static void test_reload_local_ca(void **state)
{
    struct fx *f = *state;
    char err[512];

    struct tls_server *s = new_local(f, "h2,http/1.1", 0, err, sizeof(err));
    assert_non_null(s);
    X509 *leaf = tls_server_cert_for(s, HOST_A);
    SSL_CTX *old = tls_server_ctx(s);
    SSL *sv_old = SSL_new(old);
    assert_int_equal(tls_server_reload(s, err, sizeof(err)), 0);
    assert_ptr_not_equal(tls_server_ctx(s), old);
    assert_ptr_equal(tls_server_cert_for(s, HOST_A), leaf); /* cache survives */

    SSL *c = client_ssl(f->ca_pem, "h2", HOST_A);
    SSL *sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    assert_alpn(c, "h2");
    SSL_free(c);
    SSL_free(sv);
    /* A connection accepted before the reload still completes. */
    c = client_ssl(f->ca_pem, "h2", HOST_B);
    assert_int_equal(handshake(c, sv_old), 0);
    assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
    assert_ptr_equal(SSL_get_SSL_CTX(sv_old), old);
    SSL_free(c);
    SSL_free(sv_old);
    tls_server_free(s);
}

/* A self-signed certificate for the given SANs, written with its key. */
static void gen_cert_files(const char *cert_path, const char *key_path, const char *san,
                           EVP_PKEY *key)
{
    X509 *x = X509_new();
    X509V3_CTX v3;
    assert_non_null(x);
    assert_int_equal(X509_set_version(x, X509_VERSION_3), 1);
    assert_int_equal(ASN1_INTEGER_set(X509_get_serialNumber(x), (long)(random() & 0xffffff) + 1),
                     1);
    assert_non_null(X509_gmtime_adj(X509_getm_notBefore(x), -3600));
    assert_non_null(X509_gmtime_adj(X509_getm_notAfter(x), 86400L * 30));
    X509_NAME *name = X509_get_subject_name(x);
    assert_int_equal(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                                (const unsigned char *)"test", -1, -1, 0),
                     1);
    assert_int_equal(X509_set_issuer_name(x, name), 1);
    assert_int_equal(X509_set_pubkey(x, key), 1);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, &v3, NID_subject_alt_name, san);
    assert_non_null(ext);
    assert_int_equal(X509_add_ext(x, ext, -1), 1);
    X509_EXTENSION_free(ext);
    assert_true(X509_sign(x, key, EVP_sha256()) > 0);

    BIO *b = BIO_new_file(cert_path, "w");
    assert_non_null(b);
    assert_int_equal(PEM_write_bio_X509(b, x), 1);
    BIO_free(b);
    if (key_path != NULL) {
        b = BIO_new_file(key_path, "w");
        assert_non_null(b);
        assert_int_equal(PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL), 1);
        BIO_free(b);
    }
    X509_free(x);
}

static void test_reload_files(void **state)
{
    struct fx *f = *state;
    char err[512];
    char cert[160];
    char key[160];
    char trust1[160];
    char trust2[160];
    const char *san = "DNS:example.com,DNS:*.example.com";

    snprintf(cert, sizeof(cert), "%s/cert.pem", f->dir);
    snprintf(key, sizeof(key), "%s/key.pem", f->dir);
    snprintf(trust1, sizeof(trust1), "%s/trust1.pem", f->dir);
    snprintf(trust2, sizeof(trust2), "%s/trust2.pem", f->dir);
    EVP_PKEY *k1 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    EVP_PKEY *k2 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    assert_non_null(k1);
    assert_non_null(k2);
    gen_cert_files(cert, key, san, k1);
    assert_int_equal(rename(cert, trust1), 0);
    assert_int_equal(link(trust1, cert), 0);

    struct tls_server_opts o = {
        .cert_file = cert,
        .key_file = key,
        .domain = "Example.COM",
        .alpn = "h2,http/1.1",
        .log = f->log,
    };
    struct tls_server *s = tls_server_new(&o, err, sizeof(err));
    assert_non_null(s);
    assert_false(tls_server_is_local_ca(s));
    assert_null(tls_server_ca_path(s));
    assert_null(strstr(fx_log(f), "tls_cert_name_mismatch")); /* covers apex + wildcard */
    SSL_CTX *ctx1 = tls_server_ctx(s);

    SSL *c = client_ssl(trust1, "h2,http/1.1", "0xabc.example.com");
    SSL *sv = SSL_new(ctx1);
    assert_int_equal(handshake(c, sv), 0);
    assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
    assert_alpn(c, "h2");
    SSL_free(c);
    SSL_free(sv);

    /* An SSL accepted before the reload (handshake not even started). */
    SSL *sv_old = SSL_new(ctx1);
    assert_non_null(sv_old);

    /* New pair on disk, then SIGHUP. */
    assert_int_equal(unlink(cert), 0);
    gen_cert_files(cert, key, san, k2);
    assert_int_equal(link(cert, trust2), 0);
    assert_int_equal(tls_server_reload(s, err, sizeof(err)), 0);
    SSL_CTX *ctx2 = tls_server_ctx(s);
    assert_ptr_not_equal(ctx2, ctx1);

    c = client_ssl(trust2, "h2", "example.com");
    sv = SSL_new(ctx2);
    assert_int_equal(handshake(c, sv), 0);
    assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
    SSL_free(c);
    SSL_free(sv);
    c = client_ssl(trust1, "h2", "example.com"); /* the old cert is gone */
    sv = SSL_new(ctx2);
    assert_int_equal(handshake(c, sv), -1);
    SSL_free(c);
    SSL_free(sv);
    c = client_ssl(trust1, "h2", "example.com"); /* but the old SSL still serves it */
    assert_int_equal(handshake(c, sv_old), 0);
    assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
    SSL_free(c);
    SSL_free(sv_old);

    /* Broken certificate file: -1, message names the file, old ctx stays. */
    assert_int_equal(unlink(cert), 0); /* cert and trust2 share an inode */
    write_file(cert, "-----BEGIN CERTIFICATE-----\ngarbage\n", 37);
    err[0] = '\0';
    assert_int_equal(tls_server_reload(s, err, sizeof(err)), -1);
    assert_non_null(strstr(err, cert));
    assert_ptr_equal(tls_server_ctx(s), ctx2);
    c = client_ssl(trust2, "h2", "a.example.com");
    sv = SSL_new(tls_server_ctx(s));
    assert_int_equal(handshake(c, sv), 0);
    SSL_free(c);
    SSL_free(sv);

    /* Key that does not match the certificate: -1, old ctx stays. */
    assert_int_equal(unlink(cert), 0);
    EVP_PKEY *k3 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    assert_non_null(k3);
    gen_cert_files(cert, NULL, san, k3);
    err[0] = '\0';
    assert_int_equal(tls_server_reload(s, err, sizeof(err)), -1);
    assert_non_null(strstr(err, key));
    assert_ptr_equal(tls_server_ctx(s), ctx2);

    /* Missing key file. */
    assert_int_equal(unlink(key), 0);
    assert_int_equal(tls_server_reload(s, err, sizeof(err)), -1);
    assert_non_null(strstr(err, key));
    assert_ptr_equal(tls_server_ctx(s), ctx2);
    tls_server_free(s);

    /* A certificate that does not cover the domain: loaded with a warning. */
    fx_log_clear(f);
    gen_cert_files(cert, key, "DNS:example.com", k3); /* apex only */
    s = tls_server_new(&o, err, sizeof(err));
    assert_non_null(s);
    const char *lg = fx_log(f);
    assert_non_null(strstr(lg, "level=warn event=tls_cert_name_mismatch"));
    assert_non_null(strstr(lg, "covers_apex=true covers_wildcard=false"));
    tls_server_free(s);

    EVP_PKEY_free(k1);
    EVP_PKEY_free(k2);
    EVP_PKEY_free(k3);
}

static void test_server_opts_refused(void **state)
{
    struct fx *f = *state;
    char err[512];
    struct tls_server_opts o = {.domain = "localhost", .log = f->log};

    assert_null(tls_server_new(&o, err, sizeof(err))); /* no state dir */
    assert_true(strlen(err) > 0);
    o.state_dir = f->state;
    o.domain = "bad domain";
    assert_null(tls_server_new(&o, err, sizeof(err)));
    assert_non_null(strstr(err, "domain"));
    o.domain = "localhost";
    o.alpn = "h2,,http/1.1";
    assert_null(tls_server_new(&o, err, sizeof(err)));
    assert_non_null(strstr(err, "ALPN"));
    o.alpn = NULL;
    o.cert_file = "/nonexistent/cert.pem";
    assert_null(tls_server_new(&o, err, sizeof(err))); /* cert without key */
    o.key_file = "/nonexistent/key.pem";
    assert_null(tls_server_new(&o, err, sizeof(err)));
    assert_non_null(strstr(err, "/nonexistent/cert.pem"));
}

static void test_client_refusals(void **state)
{
    char err[512];

    assert_null(tls_client_ctx_new("/nonexistent/ca.pem", NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "/nonexistent/ca.pem"));
    assert_null(tls_client_ctx_new(NULL, ",h2", err, sizeof(err)));

    SSL_CTX *cctx = tls_client_ctx_new(NULL, "h2", err, sizeof(err));
    assert_non_null(cctx);
    assert_int_equal(SSL_CTX_get_verify_mode(cctx) & SSL_VERIFY_PEER, SSL_VERIFY_PEER);
    assert_int_equal(SSL_CTX_get_min_proto_version(cctx), TLS1_2_VERSION);
    SSL *c = SSL_new(cctx);
    assert_non_null(c);
    assert_int_equal(tls_client_prepare(c, NULL), -1);
    assert_int_equal(tls_client_prepare(c, ""), -1);
    SSL_set_verify(c, SSL_VERIFY_NONE, NULL);
    assert_int_equal(tls_client_prepare(c, "gw.example.com"), 0);
    assert_int_equal(SSL_get_verify_mode(c) & SSL_VERIFY_PEER, SSL_VERIFY_PEER);
    assert_string_equal(SSL_get_servername(c, TLSEXT_NAMETYPE_host_name), "gw.example.com");
    assert_string_equal(X509_VERIFY_PARAM_get0_host(SSL_get0_param(c), 0), "gw.example.com");
    SSL_free(c);
    SSL_CTX_free(cctx);
}

/* Chains tls_out_add() leaves: libevent 2.1 writes each with one SSL_write,
 * so their lengths are the TLS records' (and write(2)s') granularity. */
static int out_chains(struct evbuffer *b, size_t *len, int max)
{
    struct evbuffer_iovec v[64];
    int n = evbuffer_peek(b, -1, NULL, v, 64);

    assert_true(n <= max && n <= 64);
    for (int i = 0; i < n; i++)
        len[i] = v[i].iov_len;
    return n;
}

static void test_out_add_fills_chains(void **state)
{
    (void)state;
    static uint8_t data[200000];
    struct evbuffer *b = evbuffer_new();
    size_t len[64], total = 0;
    int n;

    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (uint8_t)(i * 7);
    /* a WebSocket header and a frame header, then 16 KiB of body, four
     * times: one large chain, not a small one per header */
    for (int k = 0; k < 4; k++) {
        assert_int_equal(tls_out_add(b, data, 4), 0);
        assert_int_equal(tls_out_add(b, data, 9), 0);
        assert_int_equal(tls_out_add(b, data, 16384), 0);
    }
    n = out_chains(b, len, 2);
    assert_true(len[0] >= 4 * (4 + 9 + 16384) - 8192); /* the first holds nearly all */
    for (int i = 0; i < n; i++)
        total += len[i];
    assert_int_equal(total, 4 * (4 + 9 + 16384));
    evbuffer_free(b);

    /* appends fill the last chain before starting one: every chain but the
     * last is full (above 60 KiB), whatever the pieces' sizes */
    b = evbuffer_new();
    size_t sizes[] = {13, 16397, 1, 40000, 16397, 9, 65536, 3000, 16384, 16397, 7};
    size_t off = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        assert_int_equal(tls_out_add(b, data + off, sizes[i]), 0);
        off += sizes[i];
    }
    n = out_chains(b, len, 8);
    total = 0;
    for (int i = 0; i < n; i++) {
        if (i < n - 1)
            assert_true(len[i] > 60000);
        total += len[i];
    }
    assert_int_equal(total, off);
    /* and the bytes are the ones added, in order */
    uint8_t *flat = evbuffer_pullup(b, -1);
    assert_non_null(flat);
    assert_memory_equal(flat, data, off);
    assert_int_equal(tls_out_add(b, data, 0), 0);
    assert_int_equal(evbuffer_get_length(b), off);
    evbuffer_free(b);
}

/* tls_out_add_buffer() moves bytes from another evbuffer the same way. */
/* Space made in place (tls_out_reserve, used for masking): the last chain
 * is filled before a new one, and a new one is never small, so no chain but
 * the last, and no TLS record, is cut short. */
static void test_out_reserve(void **state)
{
    (void)state;
    static uint8_t data[400000];
    struct evbuffer *b = evbuffer_new();
    size_t sizes[] = {23, 16407, 65559, 1, 9, 40000, 16407, 65559, 3, 32768, 65559, 7};
    size_t len[64], off = 0, total = 0;
    int n;

    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (uint8_t)(i * 13);
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        struct evbuffer_iovec v[2];
        size_t left = sizes[i];
        int nv = tls_out_reserve(b, sizes[i], v), used = 0;
        assert_true(nv >= 1 && nv <= 2);
        for (; used < nv && left > 0; used++) {
            size_t k = v[used].iov_len < left ? v[used].iov_len : left;
            memcpy(v[used].iov_base, data + off, k);
            v[used].iov_len = k;
            off += k;
            left -= k;
        }
        assert_int_equal(left, 0);
        assert_int_equal(evbuffer_commit_space(b, v, used), 0);
    }
    n = out_chains(b, len, 64);
    /* the first was sized for the first piece alone (an empty output:
     * no 32 KiB allocation for a small message), then filled */
    assert_true(len[0] >= sizes[0] && len[0] < 4096);
    for (int i = 0; i < n; i++) {
        if (i > 0 && i < n - 1)
            assert_true(len[i] > 32768);
        total += len[i];
    }
    assert_int_equal(total, off);
    assert_memory_equal(evbuffer_pullup(b, -1), data, off);
    evbuffer_free(b);
}

static void test_out_add_buffer(void **state)
{
    (void)state;
    struct evbuffer *src = evbuffer_new(), *b = evbuffer_new();
    uint8_t piece[5000];
    size_t len[64], total = 0;
    int n;

    for (size_t i = 0; i < sizeof(piece); i++)
        piece[i] = (uint8_t)i;
    for (int k = 0; k < 20; k++)
        evbuffer_add(src, piece, sizeof(piece)); /* small chains */
    assert_int_equal(tls_out_add_buffer(b, src, 200000), -1); /* more than src holds */
    assert_int_equal(evbuffer_get_length(src), 100000);
    assert_int_equal(tls_out_add_buffer(b, src, 90000), 0);
    assert_int_equal(evbuffer_get_length(src), 10000);
    n = out_chains(b, len, 3);
    for (int i = 0; i < n; i++) {
        if (i < n - 1)
            assert_true(len[i] > 60000);
        total += len[i];
    }
    assert_int_equal(total, 90000);
    evbuffer_free(src);
    evbuffer_free(b);
}

static void test_log_errors(void **state)
{
    struct fx *f = *state;

    /* One real error from a failed open. */
    BIO *b = BIO_new_file("/nonexistent/file.pem", "r");
    assert_null(b);
    assert_int_not_equal(ERR_peek_error(), 0);
    tls_log_errors(f->log, "tls_test_failure");
    assert_int_equal(ERR_peek_error(), 0);
    const char *lg = fx_log(f);
    assert_non_null(strstr(lg, "level=warn event=tls_test_failure err="));

    /* A full queue: at most 8 lines, the rest counted. */
    fx_log_clear(f);
    for (int i = 0; i < 20; i++)
        ERR_raise(ERR_LIB_SSL, SSL_R_BAD_LENGTH);
    tls_log_errors(f->log, "tls_test_many");
    assert_int_equal(ERR_peek_error(), 0);
    lg = fx_log(f);
    int lines = 0;
    for (const char *p = lg; (p = strstr(p, "event=tls_test_many")) != NULL; p++)
        lines++;
    assert_int_equal(lines, 9);
    assert_non_null(strstr(lg, "dropped="));

    /* NULL sink, and the silent variant, still drain. */
    ERR_raise(ERR_LIB_SSL, SSL_R_BAD_LENGTH);
    tls_log_errors(NULL, "x");
    assert_int_equal(ERR_peek_error(), 0);
    ERR_raise(ERR_LIB_SSL, SSL_R_BAD_LENGTH);
    tls_drain_errors();
    assert_int_equal(ERR_peek_error(), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_local_ca_create_and_reuse, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_local_ca_key_mode_refused, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_local_ca_half_state, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_leaf_issue_and_cache, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_leaf_cache_eviction, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_handshake_local_ca, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_alpn_variants, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_server_ctx_settings, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_reload_local_ca, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_reload_files, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_server_opts_refused, fx_setup, fx_teardown),
        cmocka_unit_test(test_client_refusals),
        cmocka_unit_test_setup_teardown(test_log_errors, fx_setup, fx_teardown),
        cmocka_unit_test(test_out_add_fills_chains),
        cmocka_unit_test(test_out_reserve),
        cmocka_unit_test(test_out_add_buffer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
