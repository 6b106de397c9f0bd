/*
 * sg: the active certificate from PostgreSQL.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "sg_core.h"
#include "sg_tls.h"


typedef struct {
    int64_t            id;
    X509              *cert;
    STACK_OF(X509)    *chain;
    EVP_PKEY          *key;
} sg_tls_cert_t;


static int sg_tls_cert_cb(SSL *ssl, void *arg);
static void sg_tls_settings_changed(sg_settings_t *prev, sg_settings_t *cur);
static void sg_tls_load(int64_t id);
static void sg_tls_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static ngx_int_t sg_tls_parse(const char *cert_pem, const char *key_pem,
    sg_tls_cert_t *out, ngx_log_t *log);
static void sg_tls_free(sg_tls_cert_t *tc);


static sg_tls_cert_t   sg_tls_active;
static int64_t         sg_tls_loading;
static ngx_log_t      *sg_tls_log;


ngx_int_t
sg_tls_install(ngx_conf_t *cf, ngx_ssl_t *ssl)
{
    if (ssl == NULL || ssl->ctx == NULL) {
        return NGX_OK;
    }

    SSL_CTX_set_cert_cb(ssl->ctx, sg_tls_cert_cb, NULL);

    return NGX_OK;
}


ngx_int_t
sg_tls_init_worker(ngx_cycle_t *cycle)
{
    sg_tls_log = cycle->log;

    return sg_settings_on_change(sg_tls_settings_changed);
}


void
sg_tls_exit_worker(void)
{
    sg_tls_free(&sg_tls_active);
}


int64_t
sg_tls_active_id(void)
{
    return sg_tls_active.id;
}


static int
sg_tls_cert_cb(SSL *ssl, void *arg)
{
    if (sg_worker.settings == NULL || !sg_worker.settings->tls_enabled
        || sg_tls_active.cert == NULL)
    {
        /* the certificate from nginx.conf */
        return 1;
    }

    if (SSL_use_certificate(ssl, sg_tls_active.cert) != 1
        || SSL_use_PrivateKey(ssl, sg_tls_active.key) != 1
        || SSL_set1_chain(ssl, sg_tls_active.chain) != 1)
    {
        ngx_ssl_error(NGX_LOG_ERR, sg_tls_log, 0,
                      "sg: cannot use certificate %L", sg_tls_active.id);
        return 0;
    }

    return 1;
}


static void
sg_tls_settings_changed(sg_settings_t *prev, sg_settings_t *cur)
{
    if (cur->active_certificate_id == sg_tls_active.id) {
        return;
    }

    if (cur->active_certificate_id == 0) {
        ngx_log_error(NGX_LOG_NOTICE, sg_tls_log, 0,
                      "sg: no active certificate, serving nginx.conf's");
        sg_tls_free(&sg_tls_active);
        return;
    }

    sg_tls_load(cur->active_certificate_id);
}


static void
sg_tls_load(int64_t id)
{
    u_char       buf[NGX_INT64_LEN + 1];
    const char  *params[1];

    *ngx_sprintf(buf, "%L", id) = '\0';
    params[0] = (const char *) buf;

    sg_tls_loading = id;

    if (sg_pg_query(sg_worker.pg,
                    "SELECT id, certificate_pem, private_key_pem"
                    " FROM certificates WHERE id = $1",
                    1, params, sg_tls_loaded, NULL)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, sg_tls_log, 0,
                      "sg: cannot load certificate %L now", id);
    }
}


static void
sg_tls_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    int64_t        id;
    sg_tls_cert_t  tc;

    if (err) {
        ngx_log_error(NGX_LOG_ERR, sg_tls_log, 0,
                      "sg: cannot load certificate %L: %s",
                      sg_tls_loading, err);
        return;
    }

    if (PQntuples(res) != 1) {
        ngx_log_error(NGX_LOG_ERR, sg_tls_log, 0,
                      "sg: active certificate %L does not exist",
                      sg_tls_loading);
        return;
    }

    id = ngx_atoof((u_char *) PQgetvalue(res, 0, 0), PQgetlength(res, 0, 0));

    if (sg_worker.settings->active_certificate_id != id) {
        /* another change came meanwhile; its own load follows */
        return;
    }

    ngx_memzero(&tc, sizeof(sg_tls_cert_t));

    if (sg_tls_parse(PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 2), &tc,
                     sg_tls_log)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, sg_tls_log, 0,
                      "sg: certificate %L is not usable, keeping the"
                      " current one", id);
        return;
    }

    tc.id = id;

    sg_tls_free(&sg_tls_active);
    sg_tls_active = tc;

    ngx_log_error(NGX_LOG_INFO, sg_tls_log, 0,
                  "sg: serving certificate %L", id);
}


static ngx_int_t
sg_tls_parse(const char *cert_pem, const char *key_pem, sg_tls_cert_t *out,
    ngx_log_t *log)
{
    BIO   *bio;
    X509  *x;

    bio = BIO_new_mem_buf(cert_pem, -1);
    if (bio == NULL) {
        return NGX_ERROR;
    }

    out->cert = PEM_read_bio_X509_AUX(bio, NULL, NULL, NULL);
    out->chain = sk_X509_new_null();

    if (out->cert == NULL || out->chain == NULL) {
        BIO_free(bio);
        goto failed;
    }

    for ( ;; ) {
        x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        if (x == NULL) {
            ERR_clear_error();
            break;
        }

        if (sk_X509_push(out->chain, x) == 0) {
            X509_free(x);
            BIO_free(bio);
            goto failed;
        }
    }

    BIO_free(bio);

    bio = BIO_new_mem_buf(key_pem, -1);
    if (bio == NULL) {
        goto failed;
    }

    out->key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
    BIO_free(bio);

    if (out->key == NULL || X509_check_private_key(out->cert, out->key) != 1) {
        goto failed;
    }

    return NGX_OK;

failed:

    ngx_ssl_error(NGX_LOG_ERR, log, 0, "sg: cannot parse certificate");
    sg_tls_free(out);

    return NGX_ERROR;
}


static void
sg_tls_free(sg_tls_cert_t *tc)
{
    if (tc->cert) {
        X509_free(tc->cert);
    }

    if (tc->chain) {
        sk_X509_pop_free(tc->chain, X509_free);
    }

    if (tc->key) {
        EVP_PKEY_free(tc->key);
    }

    ngx_memzero(tc, sizeof(sg_tls_cert_t));
}
