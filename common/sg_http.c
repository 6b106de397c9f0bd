/*
 * sg: outbound HTTPS GET through libcurl's multi_socket interface on
 * nginx's event loop.  See sg_http.h.
 *
 * The glue follows libcurl's "multi_socket" contract:
 *
 *   SOCKETFUNCTION  wraps each socket curl names in an nginx connection
 *                   (curl_multi_assign) and adds or deletes level-triggered
 *                   read and write events as curl asks; CURL_POLL_REMOVE
 *                   deletes both events (epoll_ctl DEL) before the
 *                   connection is freed.  curl closes its sockets itself.
 *   TIMERFUNCTION   one nginx timer per worker; 0 posts the timer event
 *                   instead (never calling curl from its own callback).
 *
 * Events call curl_multi_socket_action(); requests curl reports done are
 * taken off the multi handle at once and answered from a posted event of
 * their own, so that a handler may start or cancel requests freely and is
 * never called from inside sg_http_get().
 *
 * Trust: libcurl's default CA bundle and directory (Debian: the system
 * store, /etc/ssl/certs/ca-certificates.crt and /etc/ssl/certs) plus the
 * certificates of sg_trusted_ca, parsed once per worker and added to the
 * X509 store of each connection by the SSL_CTX callback.  Not
 * CURLOPT_CAINFO_BLOB: a blob replaces libcurl's CA bundle (only its CA
 * directory would be left), and with it any system CA that is not in
 * that directory.  curl's shared CA store cache is off
 * (CURLOPT_CA_CACHE_TIMEOUT 0), so that each connection's store is its
 * own, populated by curl and then by the callback.
 *
 * The same callback adds a verify callback that only watches: it records
 * the server's certificate and the first chain error for the answer, and
 * leaves OpenSSL's verdict as it is.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <curl/curl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "sg_core.h"
#include "sg_http.h"


#define SG_HTTP_POOL_SIZE     4096
#define SG_HTTP_CA_MAX        (4 * 1024 * 1024)   /* sg_trusted_ca */
#define SG_HTTP_CONNECT_MAX   20000               /* ms, per attempt */
#define SG_HTTP_TEXT_MAX      1024                /* certificate fields */
#define SG_HTTP_USER_AGENT    "sg (MTA-STS; +RFC 8461)"


struct sg_http_req_s {
    ngx_queue_t          queue;         /* sg_http.requests */
    ngx_pool_t          *pool;
    CURL                *easy;
    struct curl_slist   *resolve;

    sg_http_handler_pt   handler;
    void                *data;
    sg_http_result_t    *res;
    ngx_event_t          done;          /* posted when finished */

    u_char              *body;          /* max_body octets */
    size_t               body_len;
    size_t               max_body;
    sg_http_type_pt      type_ok;
    ngx_msec_t           started;

    CURLcode             code;
    char                 errbuf[CURL_ERROR_SIZE];

    unsigned             added:1;       /* on the multi handle */
    unsigned             too_big:1;
    unsigned             finished:1;
    unsigned             chain_error:1; /* the verify callback saw one */
};


static struct {
    CURLM               *multi;
    ngx_event_t          timer;
    ngx_log_t           *log;
    ngx_queue_t          requests;
    STACK_OF(X509)      *ca;            /* sg_trusted_ca, or NULL */
    int                  ex_index;      /* SSL_CTX ex data: the request */
    ngx_uint_t           running;       /* curl's count */
    unsigned             global:1;      /* curl_global_init() done */
} sg_http;


static int sg_http_socket_cb(CURL *easy, curl_socket_t s, int what,
    void *userp, void *socketp);
static int sg_http_timer_cb(CURLM *multi, long timeout_ms, void *userp);
static void sg_http_close(ngx_connection_t *c);
static void sg_http_read_handler(ngx_event_t *ev);
static void sg_http_write_handler(ngx_event_t *ev);
static void sg_http_timer_handler(ngx_event_t *ev);
static void sg_http_action(curl_socket_t s, int mask);
static void sg_http_check_done(void);
static void sg_http_finish(sg_http_req_t *req, CURLcode code);
static void sg_http_classify(sg_http_req_t *req);
static void sg_http_done_handler(ngx_event_t *ev);
static void sg_http_release(sg_http_req_t *req);
static size_t sg_http_write_cb(char *ptr, size_t size, size_t nmemb,
    void *userdata);
static CURLcode sg_http_ssl_ctx_cb(CURL *easy, void *sslctx, void *userptr);
static int sg_http_verify_cb(int ok, X509_STORE_CTX *x509);
static void sg_http_cert_text(sg_http_req_t *req, X509 *cert);
static ngx_int_t sg_http_bio_str(ngx_pool_t *pool, BIO *bio, ngx_str_t *s);
static ngx_int_t sg_http_copy(ngx_pool_t *pool, ngx_str_t *dst,
    const char *src);
static ngx_int_t sg_http_resolve_line(sg_http_req_t *req, CURLU *u);
static ngx_int_t sg_http_read_ca(ngx_cycle_t *cycle, ngx_str_t *file);
static STACK_OF(X509) *sg_http_parse_ca(ngx_cycle_t *cycle, ngx_str_t *file,
    u_char *buf, size_t len);


static const char  *sg_http_error_names[] = {
    "ok",
    "dns",
    "connect",
    "tls",
    "tls-verify",
    "timeout",
    "too-big",
    "redirect",
    "http-status",
    "content-type",
    "protocol",
    "internal"
};


/* per worker */


ngx_int_t
sg_http_init_worker(ngx_cycle_t *cycle)
{
    sg_core_conf_t  *scf;

    ngx_memzero(&sg_http, sizeof(sg_http));
    ngx_queue_init(&sg_http.requests);
    sg_http.log = cycle->log;
    sg_http.ex_index = -1;

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                      "sg: HTTP: curl_global_init() failed");
        return NGX_ERROR;
    }

    sg_http.global = 1;

    sg_http.ex_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    if (sg_http.ex_index < 0) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                      "sg: HTTP: SSL_CTX_get_ex_new_index() failed");
        return NGX_ERROR;
    }

    scf = sg_core_conf(cycle);

    if (scf && scf->trusted_ca.len
        && sg_http_read_ca(cycle, &scf->trusted_ca) != NGX_OK)
    {
        /* fetches still verify, against the system's store only */
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "sg: HTTP: \"sg_trusted_ca\" \"%V\" is not used by"
                      " this worker", &scf->trusted_ca);
    }

    sg_http.multi = curl_multi_init();
    if (sg_http.multi == NULL) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                      "sg: HTTP: curl_multi_init() failed");
        return NGX_ERROR;
    }

    curl_multi_setopt(sg_http.multi, CURLMOPT_SOCKETFUNCTION,
                      sg_http_socket_cb);
    curl_multi_setopt(sg_http.multi, CURLMOPT_SOCKETDATA, NULL);
    curl_multi_setopt(sg_http.multi, CURLMOPT_TIMERFUNCTION,
                      sg_http_timer_cb);
    curl_multi_setopt(sg_http.multi, CURLMOPT_TIMERDATA, NULL);

    sg_http.timer.handler = sg_http_timer_handler;
    sg_http.timer.data = &sg_http;
    sg_http.timer.log = cycle->log;

    /*
     * Not cancelable: curl's timer is set only while requests run (their
     * timeout), and a worker shutting down waits for them to end, as it
     * waits for its other connections.
     */
    sg_http.timer.cancelable = 0;

    return NGX_OK;
}


void
sg_http_exit_worker(void)
{
    ngx_queue_t    *q;
    sg_http_req_t  *req;

    if (sg_http.log == NULL) {
        return;
    }

    /* the handlers are not called: their owners are going away too */

    while (!ngx_queue_empty(&sg_http.requests)) {
        q = ngx_queue_head(&sg_http.requests);
        req = ngx_queue_data(q, sg_http_req_t, queue);

        sg_http_cancel(req);
    }

    if (sg_http.timer.timer_set) {
        ngx_del_timer(&sg_http.timer);
    }

    if (sg_http.timer.posted) {
        ngx_delete_posted_event(&sg_http.timer);
    }

    if (sg_http.multi) {
        /* every easy handle is gone: no socket is left to remove */
        curl_multi_cleanup(sg_http.multi);
    }

    if (sg_http.ca) {
        sk_X509_pop_free(sg_http.ca, X509_free);
    }

    if (sg_http.global) {
        curl_global_cleanup();
    }

    ngx_memzero(&sg_http, sizeof(sg_http));
}


static ngx_int_t
sg_http_read_ca(ngx_cycle_t *cycle, ngx_str_t *file)
{
    u_char           *buf;
    ssize_t           n;
    ngx_fd_t          fd;
    ngx_file_t        f;
    ngx_file_info_t   fi;

    fd = ngx_open_file(file->data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "sg: HTTP: cannot open \"%V\"", file);
        return NGX_ERROR;
    }

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR
        || ngx_file_size(&fi) <= 0 || ngx_file_size(&fi) > SG_HTTP_CA_MAX)
    {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "sg: HTTP: \"%V\" is empty, unreadable or larger than"
                      " %d octets", file, SG_HTTP_CA_MAX);
        ngx_close_file(fd);
        return NGX_ERROR;
    }

    buf = ngx_alloc(ngx_file_size(&fi), cycle->log);
    if (buf == NULL) {
        ngx_close_file(fd);
        return NGX_ERROR;
    }

    ngx_memzero(&f, sizeof(ngx_file_t));
    f.fd = fd;
    f.name = *file;
    f.log = cycle->log;

    n = ngx_read_file(&f, buf, ngx_file_size(&fi), 0);

    ngx_close_file(fd);

    if (n != ngx_file_size(&fi)) {
        ngx_free(buf);
        return NGX_ERROR;
    }

    sg_http.ca = sg_http_parse_ca(cycle, file, buf, (size_t) n);

    ngx_free(buf);

    return sg_http.ca ? NGX_OK : NGX_ERROR;
}


/* every certificate of a PEM file; NULL when there is none */

static STACK_OF(X509) *
sg_http_parse_ca(ngx_cycle_t *cycle, ngx_str_t *file, u_char *buf,
    size_t len)
{
    BIO             *bio;
    X509            *x;
    unsigned long    err;
    STACK_OF(X509)  *certs;

    bio = BIO_new_mem_buf(buf, (int) len);
    certs = sk_X509_new_null();

    if (bio == NULL || certs == NULL) {
        BIO_free(bio);
        sk_X509_free(certs);
        return NULL;
    }

    ERR_clear_error();

    for ( ;; ) {
        x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        if (x == NULL) {
            break;
        }

        if (sk_X509_push(certs, x) == 0) {
            X509_free(x);
            goto failed;
        }
    }

    /* the end of the file is "no start line"; anything else is an error */

    err = ERR_peek_last_error();

    if (err && !(ERR_GET_LIB(err) == ERR_LIB_PEM
                 && ERR_GET_REASON(err) == PEM_R_NO_START_LINE))
    {
        ngx_ssl_error(NGX_LOG_EMERG, cycle->log, 0,
                      "sg: HTTP: \"%V\" holds an unreadable certificate",
                      file);
        goto failed;
    }

    ERR_clear_error();

    if (sk_X509_num(certs) == 0) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "sg: HTTP: \"%V\" holds no PEM certificate", file);
        goto failed;
    }

    BIO_free(bio);

    return certs;

failed:

    BIO_free(bio);
    sk_X509_pop_free(certs, X509_free);

    return NULL;
}


/* curl's callbacks: nginx events only, never a call back into curl */


static int
sg_http_socket_cb(CURL *easy, curl_socket_t s, int what, void *userp,
    void *socketp)
{
    ngx_connection_t  *c = socketp;

    if (what == CURL_POLL_REMOVE) {
        if (c) {
            sg_http_close(c);
            curl_multi_assign(sg_http.multi, s, NULL);
        }

        return 0;
    }

    if (c == NULL) {
        c = ngx_get_connection(s, sg_http.log);
        if (c == NULL) {
            return -1;
        }

        c->data = &sg_http;
        c->log = sg_http.log;
        c->read->log = sg_http.log;
        c->write->log = sg_http.log;
        c->read->handler = sg_http_read_handler;
        c->write->handler = sg_http_write_handler;

        curl_multi_assign(sg_http.multi, s, c);
    }

    if ((what & CURL_POLL_IN) && !c->read->active) {
        if (ngx_add_event(c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            return -1;
        }

    } else if (!(what & CURL_POLL_IN) && c->read->active) {
        if (ngx_del_event(c->read, NGX_READ_EVENT, 0) != NGX_OK) {
            return -1;
        }
    }

    if ((what & CURL_POLL_OUT) && !c->write->active) {
        if (ngx_add_event(c->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            return -1;
        }

    } else if (!(what & CURL_POLL_OUT) && c->write->active) {
        if (ngx_del_event(c->write, NGX_WRITE_EVENT, 0) != NGX_OK) {
            return -1;
        }
    }

    return 0;
}


/* the socket is curl's: events off, connection back, curl closes it */

static void
sg_http_close(ngx_connection_t *c)
{
    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    if (c->read->active) {
        (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
    }

    if (c->write->active) {
        (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    }

    ngx_free_connection(c);
    c->fd = (ngx_socket_t) -1;
}


static int
sg_http_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    if (timeout_ms < 0) {
        if (sg_http.timer.timer_set) {
            ngx_del_timer(&sg_http.timer);
        }

        return 0;
    }

    if (timeout_ms == 0) {
        if (sg_http.timer.timer_set) {
            ngx_del_timer(&sg_http.timer);
        }

        if (!sg_http.timer.posted) {
            ngx_post_event(&sg_http.timer, &ngx_posted_events);
        }

        return 0;
    }

    ngx_add_timer(&sg_http.timer, (ngx_msec_t) timeout_ms);

    return 0;
}


/* nginx's events */


static void
sg_http_read_handler(ngx_event_t *ev)
{
    ngx_connection_t  *c = ev->data;

    /* c may be freed inside: only its socket is passed on */
    sg_http_action(c->fd, CURL_CSELECT_IN);
}


static void
sg_http_write_handler(ngx_event_t *ev)
{
    ngx_connection_t  *c = ev->data;

    sg_http_action(c->fd, CURL_CSELECT_OUT);
}


static void
sg_http_timer_handler(ngx_event_t *ev)
{
    sg_http_action(CURL_SOCKET_TIMEOUT, 0);
}


static void
sg_http_action(curl_socket_t s, int mask)
{
    int        running;
    CURLMcode  rc;

    if (sg_http.multi == NULL) {
        return;
    }

    rc = curl_multi_socket_action(sg_http.multi, s, mask, &running);

    if (rc != CURLM_OK) {
        ngx_log_error(NGX_LOG_ALERT, sg_http.log, 0,
                      "sg: HTTP: curl_multi_socket_action() failed: %s",
                      curl_multi_strerror(rc));
    }

    sg_http.running = running;

    sg_http_check_done();

    /*
     * curl leaves OpenSSL errors of its connections (a shutdown during a
     * failed handshake ...) in this thread's queue: nginx would report
     * them as stale on its next SSL call.
     */
    ERR_clear_error();
}


static void
sg_http_check_done(void)
{
    int             left;
    char           *priv;
    CURL           *easy;
    CURLcode        code;
    CURLMsg        *msg;
    sg_http_req_t  *req;

    for ( ;; ) {
        msg = curl_multi_info_read(sg_http.multi, &left);
        if (msg == NULL) {
            break;
        }

        if (msg->msg != CURLMSG_DONE) {
            continue;
        }

        /* the message does not survive curl_multi_remove_handle() */
        easy = msg->easy_handle;
        code = msg->data.result;

        priv = NULL;
        (void) curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        req = (sg_http_req_t *) priv;

        if (req == NULL || req->finished) {
            continue;
        }

        sg_http_finish(req, code);
    }
}


/* requests */


sg_http_req_t *
sg_http_get(const sg_http_get_t *get, sg_http_handler_pt handler,
    void *data)
{
    CURL           *easy;
    CURLU          *u;
    CURLMcode       mrc;
    ngx_pool_t     *pool;
    ngx_msec_t      timeout;
    sg_http_req_t  *req;
    char           *url;

    if (sg_http.multi == NULL || get->url.len == 0 || get->naddrs == 0) {
        return NULL;
    }

    pool = ngx_create_pool(SG_HTTP_POOL_SIZE, sg_http.log);
    if (pool == NULL) {
        return NULL;
    }

    req = ngx_pcalloc(pool, sizeof(sg_http_req_t));
    if (req == NULL) {
        ngx_destroy_pool(pool);
        return NULL;
    }

    req->pool = pool;
    req->handler = handler;
    req->data = data;
    req->type_ok = get->type_ok;
    req->max_body = get->max_body ? get->max_body : SG_HTTP_BODY_MAX;
    req->started = ngx_current_msec;

    req->done.handler = sg_http_done_handler;
    req->done.data = req;
    req->done.log = sg_http.log;

    ngx_queue_insert_tail(&sg_http.requests, &req->queue);

    req->res = ngx_pcalloc(pool, sizeof(sg_http_result_t));
    req->body = ngx_pnalloc(pool, req->max_body);
    url = ngx_pnalloc(pool, get->url.len + 1);

    if (req->res == NULL || req->body == NULL || url == NULL) {
        goto failed;
    }

    req->res->pool = pool;
    ngx_memcpy(url, get->url.data, get->url.len);
    url[get->url.len] = '\0';

    /* CURLOPT_RESOLVE: the URL's host and port to the caller's addresses */

    u = curl_url();
    if (u == NULL) {
        goto failed;
    }

    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK
        || sg_http_resolve_line(req, u) != NGX_OK)
    {
        curl_url_cleanup(u);
        goto failed;
    }

    curl_url_cleanup(u);

    {
        u_char       *p, *last;
        size_t        len;
        ngx_uint_t    i, n;
        ngx_addr_t   *a;
        u_char        text[NGX_SOCKADDR_STRLEN];

        len = ngx_strlen(req->resolve->data)
              + get->naddrs * (NGX_SOCKADDR_STRLEN + 3) + 1;

        p = ngx_pnalloc(pool, len);
        if (p == NULL) {
            goto failed;
        }

        last = ngx_cpymem(p, req->resolve->data,
                          ngx_strlen(req->resolve->data));

        for (i = 0, n = 0; i < get->naddrs && n < SG_HTTP_MAX_ADDRS; i++) {
            a = &get->addrs[i];

            len = ngx_sock_ntop(a->sockaddr, a->socklen, text,
                                sizeof(text), 0);
            if (len == 0) {
                continue;
            }

            if (n++) {
                *last++ = ',';
            }

            if (a->sockaddr->sa_family == AF_INET6) {
                *last++ = '[';
                last = ngx_cpymem(last, text, len);
                *last++ = ']';

            } else {
                last = ngx_cpymem(last, text, len);
            }
        }

        *last = '\0';

        curl_slist_free_all(req->resolve);
        req->resolve = curl_slist_append(NULL, (char *) p);

        if (req->resolve == NULL || n == 0) {
            goto failed;
        }
    }

    easy = curl_easy_init();
    if (easy == NULL) {
        goto failed;
    }

    req->easy = easy;

    timeout = get->timeout;
    if (timeout == 0 || timeout > SG_HTTP_TIMEOUT_MAX) {
        timeout = SG_HTTP_TIMEOUT_MAX;
    }

    /* RFC 8461, 3.3 and sg's rules for every outbound fetch */

    if (curl_easy_setopt(easy, CURLOPT_URL, url) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "https")
           != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_REDIR_PROTOCOLS_STR, "https")
           != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_RESOLVE, req->resolve) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_PROXY, "") != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_NOPROXY, "*") != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_SSLVERSION,
                            (long) CURL_SSLVERSION_TLSv1_2) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_SSL_VERIFYPEER, 1L) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_SSL_VERIFYHOST, 2L) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_SSL_CTX_FUNCTION,
                            sg_http_ssl_ctx_cb) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_SSL_CTX_DATA, req) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long) timeout)
           != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS,
                            (long) ngx_min(timeout, SG_HTTP_CONNECT_MAX))
           != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_MAXFILESIZE_LARGE,
                            (curl_off_t) req->max_body) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, sg_http_write_cb)
           != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_WRITEDATA, req) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, req->errbuf)
           != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_PRIVATE, req) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_FORBID_REUSE, 1L) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_FRESH_CONNECT, 1L) != CURLE_OK
        || curl_easy_setopt(easy, CURLOPT_USERAGENT, SG_HTTP_USER_AGENT)
           != CURLE_OK)
    {
        ngx_log_error(NGX_LOG_ALERT, sg_http.log, 0,
                      "sg: HTTP: curl_easy_setopt() failed");
        goto failed;
    }

#if LIBCURL_VERSION_NUM >= 0x075700

    /*
     * 7.87.0: curl may hand every connection one cached, shared store
     * instead of populating the connection's own; sg_http_ssl_ctx_cb()
     * adds sg_trusted_ca to the connection's own store
     */

    if (curl_easy_setopt(easy, CURLOPT_CA_CACHE_TIMEOUT, 0L) != CURLE_OK) {
        ngx_log_error(NGX_LOG_ALERT, sg_http.log, 0,
                      "sg: HTTP: CURLOPT_CA_CACHE_TIMEOUT failed");
        goto failed;
    }

#endif

    /* curl's timer callback asks for 0: the work starts from an event */

    mrc = curl_multi_add_handle(sg_http.multi, easy);
    if (mrc != CURLM_OK) {
        ngx_log_error(NGX_LOG_ALERT, sg_http.log, 0,
                      "sg: HTTP: curl_multi_add_handle() failed: %s",
                      curl_multi_strerror(mrc));
        goto failed;
    }

    req->added = 1;

    ngx_log_debug3(NGX_LOG_DEBUG_CORE, sg_http.log, 0,
                   "sg http: %p GET %s via %s", req, url,
                   req->resolve->data);

    return req;

failed:

    sg_http_release(req);
    ngx_destroy_pool(pool);

    return NULL;
}


/* "host:port:" of the URL into req->resolve; https only */

static ngx_int_t
sg_http_resolve_line(sg_http_req_t *req, CURLU *u)
{
    char        *scheme, *host, *port;
    size_t       len;
    u_char      *p;
    ngx_int_t    rc;

    scheme = host = port = NULL;
    rc = NGX_ERROR;

    if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK
        || curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK
        || curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT)
           != CURLUE_OK)
    {
        goto done;
    }

    if (ngx_strcasecmp((u_char *) scheme, (u_char *) "https") != 0
        || host[0] == '[' || host[0] == '\0')
    {
        goto done;
    }

    len = ngx_strlen(host) + ngx_strlen(port) + 3;

    p = ngx_pnalloc(req->pool, len);
    if (p == NULL) {
        goto done;
    }

    ngx_sprintf(p, "%s:%s:%Z", host, port);

    req->resolve = curl_slist_append(NULL, (char *) p);
    if (req->resolve) {
        rc = NGX_OK;
    }

done:

    curl_free(scheme);
    curl_free(host);
    curl_free(port);

    return rc;
}


void
sg_http_cancel(sg_http_req_t *req)
{
    if (req == NULL) {
        return;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_CORE, sg_http.log, 0,
                   "sg http: %p cancelled", req);

    sg_http_release(req);
    ngx_destroy_pool(req->pool);
}


/* off the multi handle, curl's memory freed; the pool stays */

static void
sg_http_release(sg_http_req_t *req)
{
    if (req->done.posted) {
        ngx_delete_posted_event(&req->done);
    }

    if (req->queue.next) {
        ngx_queue_remove(&req->queue);
        req->queue.next = NULL;
    }

    if (req->easy) {
        if (req->added) {
            /* may call the socket callback with CURL_POLL_REMOVE */
            (void) curl_multi_remove_handle(sg_http.multi, req->easy);
            req->added = 0;
        }

        curl_easy_cleanup(req->easy);
        req->easy = NULL;
    }

    if (req->resolve) {
        curl_slist_free_all(req->resolve);
        req->resolve = NULL;
    }

    ERR_clear_error();
}


static void
sg_http_finish(sg_http_req_t *req, CURLcode code)
{
    req->finished = 1;
    req->code = code;

    sg_http_classify(req);

    if (req->easy && req->added) {
        (void) curl_multi_remove_handle(sg_http.multi, req->easy);
        req->added = 0;
    }

    if (req->easy) {
        curl_easy_cleanup(req->easy);
        req->easy = NULL;
    }

    if (req->resolve) {
        curl_slist_free_all(req->resolve);
        req->resolve = NULL;
    }

    ngx_post_event(&req->done, &ngx_posted_events);
}


/* the answer: what curl says, in sg's classes */

static void
sg_http_classify(sg_http_req_t *req)
{
    long               status;
    char              *s;
    u_char            *p;
    ngx_uint_t         more;
    sg_http_result_t  *res;
    sg_http_error_e    e;

    res = req->res;

    status = 0;
    (void) curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
    res->status = status;

    s = NULL;
    if (curl_easy_getinfo(req->easy, CURLINFO_CONTENT_TYPE, &s) == CURLE_OK
        && s)
    {
        (void) sg_http_copy(req->pool, &res->content_type, s);
    }

    s = NULL;
    if (curl_easy_getinfo(req->easy, CURLINFO_REDIRECT_URL, &s) == CURLE_OK
        && s)
    {
        (void) sg_http_copy(req->pool, &res->location, s);
    }

    s = NULL;
    if (curl_easy_getinfo(req->easy, CURLINFO_PRIMARY_IP, &s) == CURLE_OK
        && s && s[0])
    {
        (void) sg_http_copy(req->pool, &res->primary_ip, s);
    }

    res->body.data = req->body;
    res->body.len = req->body_len;
    res->elapsed = ngx_current_msec - req->started;

    switch (req->code) {

    case CURLE_OK:
        if (status >= 300 && status < 400) {
            e = SG_HTTP_ERR_REDIRECT;

        } else if (status != 200) {
            e = SG_HTTP_ERR_STATUS;

        } else if (req->type_ok
                   && !req->type_ok((char *) res->content_type.data,
                                    res->content_type.len))
        {
            e = SG_HTTP_ERR_CONTENT_TYPE;

        } else {
            e = SG_HTTP_OK;
        }

        break;

    case CURLE_WRITE_ERROR:
    case CURLE_FILESIZE_EXCEEDED:
        e = req->too_big || req->code == CURLE_FILESIZE_EXCEEDED
            ? SG_HTTP_ERR_TOO_BIG : SG_HTTP_ERR_INTERNAL;
        break;

    case CURLE_OPERATION_TIMEDOUT:
        e = SG_HTTP_ERR_TIMEOUT;
        break;

    case CURLE_COULDNT_RESOLVE_HOST:
        e = SG_HTTP_ERR_DNS;
        break;

    case CURLE_COULDNT_CONNECT:
        e = SG_HTTP_ERR_CONNECT;
        break;

    case CURLE_PEER_FAILED_VERIFICATION:
        e = SG_HTTP_ERR_TLS_VERIFY;
        break;

    case CURLE_SSL_CONNECT_ERROR:
        /* OpenSSL may end the handshake on a chain error */
        e = req->chain_error ? SG_HTTP_ERR_TLS_VERIFY : SG_HTTP_ERR_TLS;
        break;

    case CURLE_OUT_OF_MEMORY:
    case CURLE_FAILED_INIT:
    case CURLE_SSL_CACERT_BADFILE:
        e = SG_HTTP_ERR_INTERNAL;
        break;

    default:
        e = SG_HTTP_ERR_PROTOCOL;
    }

    res->error = e;

    res->cert.verified = res->cert.seen && !req->chain_error
                         && e != SG_HTTP_ERR_TLS_VERIFY
                         && e != SG_HTTP_ERR_TLS;

    if (e == SG_HTTP_OK) {
        return;
    }

    p = ngx_pnalloc(req->pool, SG_HTTP_REASON_LEN);
    if (p == NULL) {
        res->reason = sg_http_error_names[e];
        return;
    }

    switch (e) {

    case SG_HTTP_ERR_REDIRECT:
        ngx_snprintf(p, SG_HTTP_REASON_LEN - 1,
                     "HTTP status %l (a redirect%s%V, not followed)%Z",
                     status, res->location.len ? " to " : "",
                     &res->location);
        break;

    case SG_HTTP_ERR_STATUS:
        ngx_snprintf(p, SG_HTTP_REASON_LEN - 1,
                     "HTTP status %l, not 200%Z", status);
        break;

    case SG_HTTP_ERR_CONTENT_TYPE:
        ngx_snprintf(p, SG_HTTP_REASON_LEN - 1,
                     "Content-Type \"%V\" is not text/plain%Z",
                     &res->content_type);
        break;

    case SG_HTTP_ERR_TOO_BIG:
        ngx_snprintf(p, SG_HTTP_REASON_LEN - 1,
                     "the body is larger than %uz octets%Z", req->max_body);
        break;

    default:
        s = req->errbuf[0] ? req->errbuf
                           : (char *) curl_easy_strerror(req->code);

        /* curl names the chain error itself, mostly */
        more = (res->cert.verify_text.len
                && ngx_strstr(s, res->cert.verify_text.data) == NULL);

        ngx_snprintf(p, SG_HTTP_REASON_LEN - 1, "%s%s%s%Z", s,
                     more ? ": " : "",
                     more ? (char *) res->cert.verify_text.data : "");
    }

    res->reason = (const char *) p;
}


static void
sg_http_done_handler(ngx_event_t *ev)
{
    void                *data;
    sg_http_req_t       *req;
    sg_http_result_t    *res;
    sg_http_handler_pt   handler;

    req = ev->data;

    ngx_queue_remove(&req->queue);
    req->queue.next = NULL;

    handler = req->handler;
    data = req->data;
    res = req->res;

    ngx_log_debug4(NGX_LOG_DEBUG_CORE, sg_http.log, 0,
                   "sg http: %p done: %s, status %l, %uz octets", req,
                   sg_http_error_names[res->error], res->status,
                   res->body.len);

    /* the handler owns res->pool, and req in it */
    handler(data, res);
}


static size_t
sg_http_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    sg_http_req_t  *req = userdata;

    size_t  n;

    n = size * nmemb;

    if (n > req->max_body - req->body_len) {
        /* RFC 8461, 3.3: a limit on the body; curl stops here */
        req->too_big = 1;
        return 0;
    }

    ngx_memcpy(req->body + req->body_len, ptr, n);
    req->body_len += n;

    return n;
}


/* TLS: watch OpenSSL's verification, change nothing */


static CURLcode
sg_http_ssl_ctx_cb(CURL *easy, void *sslctx, void *userptr)
{
    int          i;
    SSL_CTX     *ctx = sslctx;
    X509_STORE  *store;

    if (SSL_CTX_set_ex_data(ctx, sg_http.ex_index, userptr) != 1) {
        return CURLE_OUT_OF_MEMORY;
    }

    /*
     * RFC 8461, 3.3: WebPKI against the system's store (curl's CA bundle
     * and directory, loaded into this store by curl) plus sg_trusted_ca
     */

    if (sg_http.ca) {
        store = SSL_CTX_get_cert_store(ctx);
        if (store == NULL) {
            return CURLE_SSL_CACERT_BADFILE;
        }

        for (i = 0; i < sk_X509_num(sg_http.ca); i++) {
            /* OpenSSL 3 takes a duplicate as success */
            if (X509_STORE_add_cert(store, sk_X509_value(sg_http.ca, i))
                != 1)
            {
                ERR_clear_error();
                return CURLE_SSL_CACERT_BADFILE;
            }
        }
    }

    /* curl asked for SSL_VERIFY_PEER already: keep it, add the watcher */
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, sg_http_verify_cb);

    return CURLE_OK;
}


static int
sg_http_verify_cb(int ok, X509_STORE_CTX *x509)
{
    int             err;
    SSL            *ssl;
    X509           *leaf;
    const char     *text;
    sg_http_req_t  *req;

    ssl = X509_STORE_CTX_get_ex_data(x509,
                                     SSL_get_ex_data_X509_STORE_CTX_idx());
    if (ssl == NULL) {
        return ok;
    }

    req = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), sg_http.ex_index);
    if (req == NULL || req->res == NULL) {
        return ok;
    }

    if (!req->res->cert.seen) {
        leaf = X509_STORE_CTX_get0_cert(x509);

        if (leaf) {
            req->res->cert.seen = 1;
            sg_http_cert_text(req, leaf);
        }
    }

    if (!ok && !req->chain_error) {
        err = X509_STORE_CTX_get_error(x509);
        req->chain_error = 1;
        req->res->cert.verify_result = err;

        text = X509_verify_cert_error_string(err);
        (void) sg_http_copy(req->pool, &req->res->cert.verify_text,
                            text ? text : "certificate verify error");
    }

    return ok;
}


static void
sg_http_cert_text(sg_http_req_t *req, X509 *cert)
{
    int                       i, n;
    BIO                      *bio;
    u_char                   *p, *last;
    GENERAL_NAME             *gn;
    sg_http_cert_t           *ci;
    const ASN1_TIME          *t;
    STACK_OF(GENERAL_NAME)   *names;
    struct tm                 tm;

    ci = &req->res->cert;

    bio = BIO_new(BIO_s_mem());
    if (bio == NULL) {
        return;
    }

    if (X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0,
                           XN_FLAG_RFC2253) >= 0)
    {
        (void) sg_http_bio_str(req->pool, bio, &ci->subject);
    }

    (void) BIO_reset(bio);

    if (X509_NAME_print_ex(bio, X509_get_issuer_name(cert), 0,
                           XN_FLAG_RFC2253) >= 0)
    {
        (void) sg_http_bio_str(req->pool, bio, &ci->issuer);
    }

    BIO_free(bio);

    t = X509_get0_notAfter(cert);

    if (t && ASN1_TIME_to_tm(t, &tm) == 1) {
        p = ngx_pnalloc(req->pool, sizeof("2025-01-31T12:00:00Z"));
        if (p) {
            last = ngx_sprintf(p, "%04d-%02d-%02dT%02d:%02d:%02dZ",
                               tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                               tm.tm_hour, tm.tm_min, tm.tm_sec);
            ci->not_after.data = p;
            ci->not_after.len = last - p;
        }
    }

    names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    if (names == NULL) {
        return;
    }

    p = ngx_pnalloc(req->pool, SG_HTTP_TEXT_MAX);
    last = p;
    n = sk_GENERAL_NAME_num(names);

    for (i = 0; p && i < n; i++) {
        gn = sk_GENERAL_NAME_value(names, i);

        if (gn->type != GEN_DNS) {
            continue;
        }

        if ((size_t) (last - p) + ASN1_STRING_length(gn->d.dNSName) + 2
            > SG_HTTP_TEXT_MAX)
        {
            break;
        }

        if (last != p) {
            *last++ = ',';
        }

        last = ngx_cpymem(last, ASN1_STRING_get0_data(gn->d.dNSName),
                          ASN1_STRING_length(gn->d.dNSName));
    }

    if (p) {
        ci->san.data = p;
        ci->san.len = last - p;
    }

    GENERAL_NAMES_free(names);
}


static ngx_int_t
sg_http_bio_str(ngx_pool_t *pool, BIO *bio, ngx_str_t *s)
{
    char    *data;
    long     len;

    len = BIO_get_mem_data(bio, &data);
    if (len <= 0) {
        return NGX_ERROR;
    }

    if (len > SG_HTTP_TEXT_MAX) {
        len = SG_HTTP_TEXT_MAX;
    }

    s->data = ngx_pnalloc(pool, len + 1);
    if (s->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(s->data, data, len);
    s->data[len] = '\0';
    s->len = len;

    return NGX_OK;
}


static ngx_int_t
sg_http_copy(ngx_pool_t *pool, ngx_str_t *dst, const char *src)
{
    size_t  len;

    len = ngx_strlen(src);

    if (len > SG_HTTP_TEXT_MAX) {
        len = SG_HTTP_TEXT_MAX;
    }

    dst->data = ngx_pnalloc(pool, len + 1);
    if (dst->data == NULL) {
        dst->len = 0;
        return NGX_ERROR;
    }

    ngx_memcpy(dst->data, src, len);
    dst->data[len] = '\0';
    dst->len = len;

    return NGX_OK;
}


const char *
sg_http_error_name(sg_http_error_e error)
{
    if ((size_t) error >= sizeof(sg_http_error_names) / sizeof(char *)) {
        return "internal";
    }

    return sg_http_error_names[error];
}
