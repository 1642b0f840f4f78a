/* TLS contexts for both programs. The gateway's struct tls_server owns the
 * public SSL_CTX (configured certificate, or a local CA that issues a leaf per
 * SNI name at the handshake) and swaps it on SIGHUP; the agent builds a
 * verifying client SSL_CTX. No global state: everything hangs off the objects
 * here, owned by the program's context. One event loop (thread) per object. */
#ifndef TLS_H
#define TLS_H

#include <stdbool.h>
#include <stddef.h>

#include <event2/buffer.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

struct log_sink;

#define TLS_CACHE_MAX_DEFAULT 4096 /* leaf certificates kept in memory (local CA mode) */
#define TLS_LOCAL_CA_CERT "local-ca.pem"
#define TLS_LOCAL_CA_KEY "local-ca.key"

/* Options of tls_server_new(); copied, so they need not outlive the call. */
struct tls_server_opts {
    const char *cert_file;  /* PEM chain, leaf first; NULL with key_file NULL = local CA */
    const char *key_file;   /* PEM private key for cert_file */
    const char *state_dir;  /* local CA mode: holds local-ca.pem / local-ca.key */
    const char *domain;     /* apex, e.g. "localhost" or "example.com" (case-insensitive) */
    const char *alpn;       /* comma-separated, server preference first: "h2,http/1.1";
                             * NULL = no ALPN (clients speak HTTP/1.1) */
    size_t cache_max_names; /* leaf cache bound; 0 = TLS_CACHE_MAX_DEFAULT */
    struct log_sink *log;   /* borrowed; must outlive the tls_server; may be NULL */
};

struct tls_server;

/* Builds the public TLS state: TLS 1.2 minimum, ECDHE AEAD ciphers,
 * SSL_OP_IGNORE_UNEXPECTED_EOF, no compression, no renegotiation, session
 * tickets, ALPN by server preference.
 * - cert_file + key_file: loads the chain and key, refuses a key that does not
 *   match; logs a warning (tls_cert_name_mismatch) if the certificate does not
 *   cover both <domain> and *.<domain>, and one if it has expired.
 * - neither: local CA mode. Creates <state_dir> (0700, with parents) and, once,
 *   local-ca.pem + local-ca.key (0600, written atomically); later runs reuse
 *   them and refuse a key readable by group or others. Certificates for
 *   <domain> and <label>.<domain> are issued at the handshake from SNI
 *   (EC P-256, SAN DNS:<name>, serverAuth, 824 days); with the domain
 *   "localhost" the apex also carries IP 127.0.0.1 and ::1.
 * Returns NULL with a message in err (naming the file and the fix) on error. */
struct tls_server *tls_server_new(const struct tls_server_opts *o, char *err, size_t errlen);

/* The current SSL_CTX (borrowed). Create each connection's SSL with
 * SSL_new(tls_server_ctx(s)); the SSL holds its own reference, so it stays
 * valid across tls_server_reload(). */
SSL_CTX *tls_server_ctx(struct tls_server *s);

/* SIGHUP: re-reads cert_file/key_file (local CA mode: reuses the CA already
 * loaded) into a NEW SSL_CTX and swaps it in only if everything loaded.
 * Session-ticket keys carry over, so tickets survive the reload. Live
 * connections keep the old SSL_CTX. Returns 0, or -1 with a message in err,
 * keeping the old SSL_CTX. Logs nothing itself (the caller logs the outcome),
 * except tls_cert_name_mismatch / tls_cert_expired warnings. */
int tls_server_reload(struct tls_server *s, char *err, size_t errlen);

/* True in local CA mode (no certificate configured). */
bool tls_server_is_local_ca(const struct tls_server *s);

/* Path of local-ca.pem in local CA mode, else NULL. Borrowed. */
const char *tls_server_ca_path(const struct tls_server *s);

/* Local CA mode: the certificate a handshake with SNI `name` gets, issuing
 * and caching it if needed. Names other than <domain> and <label>.<domain>
 * (and NULL: no SNI) get the apex certificate. Borrowed: valid until the
 * entry is evicted or the server freed (X509_up_ref() to keep it). Configured
 * mode: the configured leaf. NULL only if out of memory. */
X509 *tls_server_cert_for(struct tls_server *s, const char *name);

/* Leaf certificates currently cached (local CA mode; the apex is not counted). */
size_t tls_server_cache_count(const struct tls_server *s);

/* Frees the object and its reference to the current SSL_CTX. Takes NULL.
 * Every SSL made from any of its SSL_CTXs must be freed first: their
 * handshake callbacks point here. */
void tls_server_free(struct tls_server *s);

/* Client SSL_CTX for the agent: TLS 1.2 minimum, SSL_VERIFY_PEER, trust
 * anchors from ca_file (PEM) or, if NULL, the system store; alpn as for the
 * server ("h2" or "h2,http/1.1"), NULL for none. Returns NULL with a message
 * in err. The caller owns the result (SSL_CTX_free). */
SSL_CTX *tls_client_ctx_new(const char *ca_file, const char *alpn, char *err, size_t errlen);

/* Sets what a client SSL verifies: SNI and the expected DNS name, or, for an
 * IPv4/IPv6 literal (no brackets), the expected IP address and no SNI. Also
 * (re)asserts SSL_VERIFY_PEER. Refuses NULL or empty host: verification is
 * never skipped. Returns 0 or -1. */
int tls_client_prepare(SSL *ssl, const char *host);

/* Drains this thread's OpenSSL error queue, one warn line per error (event,
 * err=<OpenSSL string>), at most 8 lines plus dropped=N. Call at every TLS
 * failure, or the next SSL_get_error() on this thread lies. log may be NULL. */
void tls_log_errors(struct log_sink *log, const char *event);

/* Drains the OpenSSL error queue without logging. */
void tls_drain_errors(void);

struct bufferevent;

/* Resumes reading on a bufferevent after a pause (bufferevent_enable, or a
 * read watermark that was reached and then drained). libevent 2.1's socket
 * OpenSSL bufferevent only re-arms the socket event there: records OpenSSL
 * has already taken off the socket (SSL_has_pending) are not read until the
 * socket becomes readable again, which at the end of an upload is never.
 * If bev is an OpenSSL bufferevent holding such data, this activates its read
 * event so libevent drains it. No effect on other bufferevents. */
void tls_bev_kick_read(struct bufferevent *bev);

/* Lets OpenSSL read ahead on bev's connection: one read(2) takes up to 64 KiB
 * (several records) instead of two per record (header, then body). Records it
 * holds beyond the one being read are invisible to libevent 2.1, so the owner
 * MUST call tls_bev_kick_read() at the end of every read callback (and after
 * a pause, as always). No effect on other bufferevents. */
void tls_bev_read_ahead(struct bufferevent *bev);

/* Writes bev's output in this loop iteration instead of the next one: runs
 * its write callback as soon as the current callback returns. libevent only
 * arms the write event when output appears, so every burst of response data
 * would otherwise cost an epoll_wait(2) round and, without epoll's change
 * list, an epoll_ctl(2) to add the event and one to delete it. Works for
 * socket and socket OpenSSL bufferevents; no effect while writing is
 * disabled or there is nothing to write. */
void tls_bev_kick_write(struct bufferevent *bev);

struct evbuffer;

/* Appends len bytes to out, the output of a TLS bufferevent, so that they lie
 * in large chains. libevent 2.1's OpenSSL bufferevent calls SSL_write once
 * per output chain, and evbuffer_add() makes chains of at most 8 KiB: body
 * data arriving in 4 KiB pieces would leave as 1-4 KiB TLS records, each its
 * own write(2), which costs more than the encryption. Returns 0 or -1. */
int tls_out_add(struct evbuffer *out, const void *data, size_t len);

/* Space for len bytes at the end of out, for data made in place (masked,
 * say): up to two vectors, the rest of out's last chain and then, behind
 * other output, a new chain of more than 32 KiB, so that no chain, and no
 * TLS record, is cut short; into an empty output, a chain for len alone
 * (evbuffer_reserve_space(); fill them in order, commit what was used).
 * v has room for two. Returns the number of vectors, or -1. */
int tls_out_reserve(struct evbuffer *out, size_t len, struct evbuffer_iovec *v);

/* tls_out_add() of the first len bytes of src, which are drained. Returns 0,
 * or -1 (src holds fewer than len bytes, or out of memory). */
int tls_out_add_buffer(struct evbuffer *out, struct evbuffer *src, size_t len);

#endif
