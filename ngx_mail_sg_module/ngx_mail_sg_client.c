
/*
 * sg: one outbound SMTP connection on nginx's event loop (the delivery
 * engine's client; the interface is in ngx_mail_sg_client.h).
 *
 * One handler per protocol step: connect, greeting, EHLO (HELO), STARTTLS
 * and the handshake, EHLO again; then transactions (RSET, MAIL, RCPT and
 * DATA, pipelined when offered), the message, the final reply; QUIT.
 * The protocol text is built and parsed by the pure sg_smtp_client.c.
 *
 * Every connection has its own pool, holding the sg_client_t, its
 * buffers and the SSL connection; it is destroyed with the connection.
 * The caller's handlers always run from a posted event (sc->report),
 * never from inside the call that started the work, and the sg_client_t
 * outlives a handler call: a failed connection is freed after its
 * handler returned, and sg_client_close() inside a handler is deferred.
 *
 * Timeouts (RFC 5321, 4.5.3.2) come from sg_client_conf_t: the greeting
 * (4.5.3.2.1), MAIL (4.5.3.2.2) and RCPT (4.5.3.2.3) replies and every
 * other command reply use command_timeout; DATA's reply (4.5.3.2.4)
 * data_init_timeout; each write of the message (4.5.3.2.5)
 * data_block_timeout; the reply after "." (4.5.3.2.6) data_done_timeout.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_event_connect.h>

#include "sg_smtp_client.h"
#include "ngx_mail_sg_client.h"


#if (SG_SMTP_REPLY_TEXT_MAX != SG_CLIENT_REPLY_MAX)
#error "sg_smtp_client.h and ngx_mail_sg_client.h disagree on reply text"
#endif


#define SG_CLIENT_POOL_SIZE     4096
#define SG_CLIENT_IN_SIZE       4096
#define SG_CLIENT_OUT_SIZE      16384    /* commands, message blocks */
#define SG_CLIENT_QUIT_TIMEOUT  5000     /* QUIT's reply, ms */
#define SG_CLIENT_VERIFY_DEPTH  10       /* certificate chain */
#define SG_CLIENT_REASON_MAX    256


/* what the connection is doing */
typedef enum {
    SG_CS_CONNECT = 0,        /* TCP connect in progress */
    SG_CS_GREETING,           /* waiting for the 220 */
    SG_CS_EHLO,
    SG_CS_HELO,
    SG_CS_STARTTLS,           /* STARTTLS sent */
    SG_CS_HANDSHAKE,          /* the TLS handshake runs */
    SG_CS_READY,              /* idle, between transactions */
    SG_CS_TXN,                /* RSET, MAIL, RCPT, DATA and replies */
    SG_CS_BODY,               /* the message after 354 */
    SG_CS_DOT,                /* the reply after "." */
    SG_CS_QUIT,               /* QUIT sent, closing */
    SG_CS_REPORT,             /* the handler's event is posted */
    SG_CS_DEAD                /* no connection left */
} sg_client_state_e;


/*
 * The commands of a transaction are slots in this order: RSET (when the
 * last transaction failed), MAIL, one RCPT per recipient, DATA.
 */
#define SG_SLOT_RSET   0
#define SG_SLOT_MAIL   1
#define SG_SLOT_RCPT   2      /* + recipient index */
#define sg_slot_data(sc)  (SG_SLOT_RCPT + (sc)->txn->nrcpts)
#define sg_slot_end(sc)   (SG_SLOT_RCPT + (sc)->txn->nrcpts + 1)


struct sg_client_s {
    ngx_queue_t              link;         /* sg_clients */
    ngx_pool_t              *pool;
    sg_client_conf_t        *conf;
    ngx_log_t                log;
    ngx_peer_connection_t    peer;
    ngx_connection_t        *conn;         /* NULL once closed */

    ngx_str_t                host;         /* NUL-terminated, no final dot */
    ngx_str_t                ip;           /* the host as an IP literal,
                                              NUL-terminated, or empty */
    ngx_str_t                addr_text;
    sg_tls_decision_t        decision;

    sg_client_info_t         info;
    sg_smtp_tls_facts_t      facts;
    sg_smtp_ehlo_t           caps;         /* the EHLO being parsed */
    unsigned                 exts;         /* the peer's SG_SMTP_EXT_* */
    sg_smtp_reply_t          reply;

    sg_client_state_e        state;
    ngx_buf_t               *in;
    ngx_buf_t               *out;
    ngx_msec_t               write_timeout;

    sg_client_open_pt        open_handler;
    void                    *open_data;

    sg_client_txn_t         *txn;          /* the running transaction */
    sg_client_send_pt        send_handler;
    void                    *send_data;
    ngx_uint_t               gen;          /* next slot to write */
    ngx_uint_t               got;          /* next slot to get a reply */
    ngx_uint_t               accepted;     /* RCPTs accepted */
    size_t                   body_off;
    sg_smtp_dot_t            dot;

    ngx_event_t              report;       /* posted: call the handler */

    u_char                   reason[SG_CLIENT_REASON_MAX];

    unsigned                 ehlo_done:1;  /* EHLO or HELO accepted */
    unsigned                 helo:1;       /* HELO fallback sent */
    unsigned                 tls_done:1;   /* TLS is up: no 2nd STARTTLS */
    unsigned                 rset:1;       /* the last transaction failed */
    unsigned                 mail_ok:1;
    unsigned                 dot_only:1;   /* "." alone (RFC 2920, 3.1) */
    unsigned                 body_done:1;  /* the terminator is queued */
    unsigned                 in_handler:1;
    unsigned                 closing:1;    /* sg_client_close() deferred */
    unsigned                 quitting:1;   /* counted in conf->closing */
};


static void sg_client_connected(sg_client_t *sc);
static ngx_int_t sg_client_test_connect(sg_client_t *sc);
static void sg_client_read_handler(ngx_event_t *rev);
static void sg_client_write_handler(ngx_event_t *wev);
static void sg_client_timeout(sg_client_t *sc, ngx_event_t *ev);
static void sg_client_read(sg_client_t *sc);
static ngx_int_t sg_client_process(sg_client_t *sc);
static ngx_int_t sg_client_dispatch(sg_client_t *sc);
static void sg_client_expect(sg_client_t *sc, ngx_msec_t timeout);
static ngx_int_t sg_client_command(sg_client_t *sc, sg_client_state_e state,
    const char *verb, ngx_str_t *arg);
static ngx_int_t sg_client_flush(sg_client_t *sc);

static ngx_int_t sg_client_greeting(sg_client_t *sc);
static ngx_int_t sg_client_ehlo(sg_client_t *sc);
static ngx_int_t sg_client_helo(sg_client_t *sc);
static ngx_int_t sg_client_greeted(sg_client_t *sc);
static ngx_int_t sg_client_starttls_reply(sg_client_t *sc);
static void sg_client_handshake(sg_client_t *sc);
static void sg_client_handshake_done(ngx_connection_t *c);
static ngx_int_t sg_client_tls_facts(sg_client_t *sc, ngx_connection_t *c);
static sg_smtp_cert_e sg_client_cert_kind(long rc);
static ngx_int_t sg_client_opened(sg_client_t *sc);

static void sg_client_txn_start(sg_client_t *sc);
static ngx_uint_t sg_client_slot_next(sg_client_t *sc, ngx_uint_t slot);
static ngx_msec_t sg_client_slot_timeout(sg_client_t *sc, ngx_uint_t slot);
static void sg_client_txn_build(sg_client_t *sc, sg_smtp_mail_t *m);
static ngx_int_t sg_client_txn_write(sg_client_t *sc);
static ngx_int_t sg_client_txn_reply(sg_client_t *sc);
static ngx_int_t sg_client_txn_next(sg_client_t *sc);
static ngx_int_t sg_client_body_write(sg_client_t *sc);
static ngx_int_t sg_client_dot_reply(sg_client_t *sc);
static ngx_int_t sg_client_txn_done(sg_client_t *sc);

static void sg_client_fail(sg_client_t *sc, sg_client_step_e step,
    const char *reason);
static void sg_client_lost(sg_client_t *sc, const char *reason);
static void sg_client_post_report(sg_client_t *sc);
static void sg_client_report_handler(ngx_event_t *ev);
static void sg_client_quit(sg_client_t *sc);
static void sg_client_count_closing(sg_client_t *sc);
static void sg_client_finalize(sg_client_t *sc);
static void sg_client_shutdown_handler(ngx_connection_t *c);
static void sg_client_close_connection(sg_client_t *sc);
static void sg_client_free(sg_client_t *sc);

static void sg_client_reply_copy(sg_client_reply_t *dst,
    sg_smtp_reply_t *src);
static void sg_client_reply_set(sg_client_reply_t *r, ngx_uint_t code,
    const char *status, const char *text, const char *detail);
static const char *sg_client_why(sg_client_t *sc, const char *what,
    sg_smtp_reply_t *r);
static ngx_str_t *sg_client_helo_name(sg_client_t *sc);
static ngx_int_t sg_client_ip_literal(sg_client_t *sc);
static u_char *sg_client_log_error(ngx_log_t *log, u_char *buf, size_t len);


#define sg_client_2xx(code)  ((code) >= 200 && (code) < 300)


static ngx_queue_t  sg_clients;            /* every client not yet freed */


/* the public interface */

sg_client_t *
sg_client_open(sg_client_conf_t *conf, ngx_str_t *host, ngx_addr_t *addr,
    sg_tls_decision_t *decision, sg_client_open_pt handler, void *data)
{
    u_char            *p;
    size_t             len;
    ngx_err_t          err;
    ngx_int_t          rc;
    ngx_pool_t        *pool;
    sg_client_t       *sc;
    ngx_connection_t  *c;

    pool = ngx_create_pool(SG_CLIENT_POOL_SIZE, conf->log);
    if (pool == NULL) {
        return NULL;
    }

    sc = ngx_pcalloc(pool, sizeof(sg_client_t));
    if (sc == NULL) {
        goto failed;
    }

    sc->pool = pool;
    sc->conf = conf;
    sc->decision = *decision;
    sc->open_handler = handler;
    sc->open_data = data;

    /* the host as given, without a final dot, NUL-terminated (SNI) */

    len = host->len;

    if (len && host->data[len - 1] == '.') {
        len--;
    }

    sc->host.data = ngx_pnalloc(pool, len + 1);
    if (sc->host.data == NULL) {
        goto failed;
    }

    ngx_memcpy(sc->host.data, host->data, len);
    sc->host.data[len] = '\0';
    sc->host.len = len;

    if (sg_client_ip_literal(sc) != NGX_OK) {
        goto failed;
    }

    /* the address: the caller's may go away before the connection */

    sc->peer.sockaddr = ngx_palloc(pool, addr->socklen);
    if (sc->peer.sockaddr == NULL) {
        goto failed;
    }

    ngx_memcpy(sc->peer.sockaddr, addr->sockaddr, addr->socklen);
    sc->peer.socklen = addr->socklen;

    p = ngx_pnalloc(pool, NGX_SOCKADDR_STRLEN);
    if (p == NULL) {
        goto failed;
    }

    sc->addr_text.data = p;
    sc->addr_text.len = ngx_sock_ntop(addr->sockaddr, addr->socklen, p,
                                      NGX_SOCKADDR_STRLEN, 1);
    sc->peer.name = &sc->addr_text;

    sc->in = ngx_create_temp_buf(pool, SG_CLIENT_IN_SIZE);
    sc->out = ngx_create_temp_buf(pool, SG_CLIENT_OUT_SIZE);

    if (sc->in == NULL || sc->out == NULL) {
        goto failed;
    }

    sc->log = *conf->log;
    sc->log.handler = sg_client_log_error;
    sc->log.data = sc;
    sc->log.action = "connecting to the next hop";

    sc->report.handler = sg_client_report_handler;
    sc->report.data = sc;
    sc->report.log = &sc->log;

    sc->info.step = SG_CLIENT_OK;
    sc->state = SG_CS_CONNECT;

    if (sg_clients.next == NULL) {
        ngx_queue_init(&sg_clients);
    }

    ngx_queue_insert_tail(&sg_clients, &sc->link);

    sc->peer.get = ngx_event_get_peer;
    sc->peer.log = &sc->log;
    sc->peer.log_error = NGX_ERROR_ERR;

    rc = ngx_event_connect_peer(&sc->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        err = ngx_socket_errno;

        p = ngx_cpymem(sc->reason, "connect() failed: ",
                       sizeof("connect() failed: ") - 1);
        p = ngx_strerror(err, p, SG_CLIENT_REASON_MAX - 1
                                 - (p - sc->reason));
        *p = '\0';

        sc->peer.connection = NULL;
        sg_client_fail(sc, SG_CLIENT_CONNECT, (char *) sc->reason);
        return sc;
    }

    c = sc->peer.connection;
    sc->conn = c;

    c->data = sc;
    c->pool = pool;
    c->read->handler = sg_client_read_handler;
    c->write->handler = sg_client_write_handler;

    if (rc == NGX_AGAIN) {
        ngx_add_timer(c->write, conf->connect_timeout);
        return sc;
    }

    /* NGX_OK: connected at once; the greeting comes as a read event */

    sg_client_connected(sc);

    return sc;

failed:

    ngx_destroy_pool(pool);

    return NULL;
}


void
sg_client_send(sg_client_t *sc, sg_client_txn_t *txn,
    sg_client_send_pt handler, void *data)
{
    ngx_uint_t  i;

    txn->step = SG_CLIENT_OK;
    txn->delivered = 0;
    txn->data_sent = 0;
    ngx_memzero(&txn->mail_reply, sizeof(sg_client_reply_t));
    ngx_memzero(&txn->data_reply, sizeof(sg_client_reply_t));

    for (i = 0; i < txn->nrcpts; i++) {
        txn->rcpts[i].reply.code = 0;
        txn->rcpts[i].reply.status[0] = '\0';
        txn->rcpts[i].reply.text[0] = '\0';
        txn->rcpts[i].accepted = 0;
    }

    if (sc->state != SG_CS_READY && sc->state != SG_CS_DEAD) {
        ngx_log_error(NGX_LOG_ALERT, &sc->log, 0,
                      "sg client: send on a busy connection");
        return;
    }

    sc->txn = txn;
    sc->send_handler = handler;
    sc->send_data = data;

    if (sc->state == SG_CS_DEAD) {
        /* the server closed the idle connection */
        txn->step = SG_CLIENT_CLOSED;

        if (sc->info.reason == NULL) {
            sc->info.reason = "the connection was closed";
        }

        sg_client_post_report(sc);
        return;
    }

    sg_client_txn_start(sc);
}


void
sg_client_close(sg_client_t *sc)
{
    if (sc == NULL) {
        return;
    }

    if (sc->in_handler) {
        /*
         * after the handler returns (sg_client_report_handler); the
         * caller no longer has it, so it counts as closing from now on
         */
        sc->closing = 1;
        sg_client_count_closing(sc);
        return;
    }

    if (sc->state == SG_CS_READY && sc->conn) {
        sg_client_quit(sc);
        return;
    }

    if (sc->state == SG_CS_QUIT) {
        return;
    }

    /* in the middle of something, or already closed: no QUIT */
    sg_client_free(sc);
}


void
sg_client_abort_all(void)
{
    ngx_queue_t  *q;

    if (sg_clients.next == NULL) {
        return;
    }

    while (!ngx_queue_empty(&sg_clients)) {
        q = ngx_queue_head(&sg_clients);
        sg_client_free(ngx_queue_data(q, sg_client_t, link));
    }
}


sg_client_info_t *
sg_client_info(sg_client_t *sc)
{
    return &sc->info;
}


ngx_ssl_t *
sg_client_ssl_create(ngx_cycle_t *cycle, ngx_str_t *trusted_ca)
{
    ngx_str_t    ca;
    ngx_ssl_t   *ssl;
    ngx_conf_t   cf;

    ssl = ngx_pcalloc(cycle->pool, sizeof(ngx_ssl_t));
    if (ssl == NULL) {
        return NULL;
    }

    ssl->log = cycle->log;

    /*
     * DESIGN.md: outbound TLS 1.2 and 1.3 only.  The caller owns the
     * context and frees it with ngx_ssl_cleanup_ctx() (exit_process).
     */
    if (ngx_ssl_create(ssl, NGX_SSL_TLSv1_2|NGX_SSL_TLSv1_3, NULL)
        != NGX_OK)
    {
        return NULL;
    }

    /*
     * NGINX-NOTES, "Outbound TLS client": nginx never loads the system
     * CA store; public MX hosts are verified against it (without it,
     * only sg_trusted_ca is trusted)
     */
    if (SSL_CTX_set_default_verify_paths(ssl->ctx) != 1) {
        ngx_ssl_error(NGX_LOG_WARN, cycle->log, 0,
                      "sg client: SSL_CTX_set_default_verify_paths() failed");
    }

    /*
     * SSL_VERIFY_PEER with ngx_ssl_verify_callback (installed by
     * ngx_ssl_trusted_certificate()), which accepts every certificate:
     * the handshake completes, SSL_get_verify_result() records the
     * verdict and the TLS decision acts on it (sg_client_tls_facts())
     */
    SSL_CTX_set_verify(ssl->ctx, SSL_VERIFY_PEER, NULL);

    ca.len = 0;
    ca.data = NULL;

    if (trusted_ca && trusted_ca->len) {
        ca.data = ngx_pnalloc(cycle->pool, trusted_ca->len + 1);
        if (ca.data == NULL) {
            goto failed;
        }

        ngx_memcpy(ca.data, trusted_ca->data, trusted_ca->len);
        ca.data[trusted_ca->len] = '\0';
        ca.len = trusted_ca->len;
    }

    ngx_memzero(&cf, sizeof(ngx_conf_t));
    cf.cycle = cycle;
    cf.pool = cycle->pool;
    cf.temp_pool = cycle->pool;
    cf.log = cycle->log;

    if (ngx_ssl_trusted_certificate(&cf, ssl, &ca, SG_CLIENT_VERIFY_DEPTH)
        != NGX_OK)
    {
        goto failed;
    }

    return ssl;

failed:

    ngx_ssl_cleanup_ctx(ssl);

    return NULL;
}


/* connecting */

static void
sg_client_connected(sg_client_t *sc)
{
    ngx_connection_t  *c;

    c = sc->conn;

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    /* RFC 5321, 3.1 and 4.5.3.2.1: wait for the 220 greeting */
    sc->state = SG_CS_GREETING;
    sc->log.action = "waiting for the greeting";

    sg_client_expect(sc, sc->conf->command_timeout);
}


static ngx_int_t
sg_client_test_connect(sg_client_t *sc)
{
    int                err;
    u_char            *p;
    socklen_t          len;
    ngx_connection_t  *c;

    c = sc->conn;

#if (NGX_HAVE_KQUEUE)

    if (ngx_event_flags & NGX_USE_KQUEUE_EVENT) {
        err = c->write->kq_errno ? c->write->kq_errno : c->read->kq_errno;

        if (c->write->pending_eof || c->read->pending_eof) {
            goto failed;
        }

        return NGX_OK;
    }

#endif

    err = 0;
    len = sizeof(int);

    /*
     * BSDs and Linux return 0 and set a pending error in err,
     * Solaris returns -1 and sets errno
     */

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1)
    {
        err = ngx_socket_errno;
    }

    if (err == 0) {
        return NGX_OK;
    }

#if (NGX_HAVE_KQUEUE)
failed:
#endif

    (void) ngx_connection_error(c, err, "connect() failed");

    p = ngx_cpymem(sc->reason, "connect() failed: ",
                   sizeof("connect() failed: ") - 1);
    p = ngx_strerror(err, p, SG_CLIENT_REASON_MAX - 1 - (p - sc->reason));
    *p = '\0';

    sg_client_fail(sc, SG_CLIENT_CONNECT, (char *) sc->reason);

    return NGX_ERROR;
}


/* events */

static void
sg_client_read_handler(ngx_event_t *rev)
{
    sg_client_t       *sc;
    ngx_connection_t  *c;

    c = rev->data;
    sc = c->data;

    if (rev->timedout) {
        rev->timedout = 0;
        sg_client_timeout(sc, rev);
        return;
    }

    if (sc->state == SG_CS_CONNECT) {
        if (sg_client_test_connect(sc) != NGX_OK) {
            return;
        }

        sg_client_connected(sc);
    }

    sg_client_read(sc);
}


static void
sg_client_write_handler(ngx_event_t *wev)
{
    ngx_int_t          rc;
    sg_client_t       *sc;
    ngx_connection_t  *c;

    c = wev->data;
    sc = c->data;

    if (wev->timedout) {
        wev->timedout = 0;
        sg_client_timeout(sc, wev);
        return;
    }

    if (sc->state == SG_CS_CONNECT) {
        if (sg_client_test_connect(sc) != NGX_OK) {
            return;
        }

        sg_client_connected(sc);
        return;
    }

    if (sc->out->pos == sc->out->last) {
        /* nothing to write */
        if (ngx_handle_write_event(wev, 0) != NGX_OK) {
            sg_client_lost(sc, "event error");
        }

        return;
    }

    rc = sg_client_flush(sc);

    if (rc != NGX_OK) {
        return;
    }

    switch (sc->state) {

    case SG_CS_TXN:
        (void) sg_client_txn_write(sc);
        break;

    case SG_CS_BODY:
        (void) sg_client_body_write(sc);
        break;

    default:
        break;
    }
}


static void
sg_client_timeout(sg_client_t *sc, ngx_event_t *ev)
{
    switch (sc->state) {

    case SG_CS_CONNECT:
        sg_client_fail(sc, SG_CLIENT_CONNECT, "connection timed out");
        break;

    case SG_CS_QUIT:
        sg_client_finalize(sc);
        break;

    case SG_CS_BODY:
        /* RFC 5321, 4.5.3.2.5 */
        sg_client_fail(sc, SG_CLIENT_TIMEOUT,
                       "timed out while sending the message");
        break;

    case SG_CS_DOT:
        /* RFC 5321, 4.5.3.2.6 */
        sg_client_fail(sc, SG_CLIENT_TIMEOUT,
                       "no reply to the end of data in time");
        break;

    default:
        if (ev->write) {
            sg_client_fail(sc, SG_CLIENT_TIMEOUT,
                           "timed out while sending a command");

        } else {
            sg_client_fail(sc, SG_CLIENT_TIMEOUT, "no reply in time");
        }
    }
}


/* reading replies */

static void
sg_client_read(sg_client_t *sc)
{
    ssize_t            n;
    ngx_buf_t         *b;
    ngx_connection_t  *c;

    c = sc->conn;
    b = sc->in;

    for ( ;; ) {

        switch (sc->state) {

        case SG_CS_GREETING:
        case SG_CS_EHLO:
        case SG_CS_HELO:
        case SG_CS_STARTTLS:
        case SG_CS_READY:
        case SG_CS_TXN:
        case SG_CS_DOT:
        case SG_CS_QUIT:
            break;

        default:
            /*
             * not now: the event stays ready and is posted again when
             * a reply is expected (sg_client_expect())
             */
            return;
        }

        b->pos = b->start;
        b->last = b->start;

        n = c->recv(c, b->last, b->end - b->last);

        if (n == NGX_AGAIN) {
            if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
                sg_client_lost(sc, "event error");
            }

            return;
        }

        if (n == NGX_ERROR || n == 0) {
            sg_client_lost(sc, "the connection was closed");
            return;
        }

        b->last += n;

        if (sg_client_process(sc) != NGX_OK) {
            return;
        }
    }
}


/* replies in the input buffer; NGX_OK: read on */

static ngx_int_t
sg_client_process(sg_client_t *sc)
{
    size_t              used;
    ngx_buf_t          *b;
    sg_smtp_reply_rc_e  rc;

    b = sc->in;

    while (b->pos < b->last) {

        if (sc->state == SG_CS_READY) {
            /* e.g. "421 idle timeout": the connection is unusable */
            sg_client_lost(sc, "the server sent data while idle");
            return NGX_ERROR;
        }

        if (sc->state == SG_CS_TXN && sc->got >= sc->gen) {
            sg_client_fail(sc, SG_CLIENT_PROTOCOL,
                           "a reply to no command");
            return NGX_ERROR;
        }

        rc = sg_smtp_reply_parse(&sc->reply, b->pos, b->last - b->pos,
                                 &used);
        b->pos += used;

        if (rc == SG_SMTP_REPLY_AGAIN) {
            continue;
        }

        if (rc == SG_SMTP_REPLY_ERROR) {
            ngx_snprintf(sc->reason, SG_CLIENT_REASON_MAX - 1,
                         "malformed reply: %s%Z", sc->reply.error);
            sg_client_fail(sc, SG_CLIENT_PROTOCOL, (char *) sc->reason);
            return NGX_ERROR;
        }

        ngx_log_debug2(NGX_LOG_DEBUG_MAIL, &sc->log, 0,
                       "sg client reply: %ui \"%s\"",
                       (ngx_uint_t) sc->reply.code, sc->reply.text);

        if (sg_client_dispatch(sc) != NGX_OK) {
            return NGX_ERROR;
        }

        switch (sc->state) {

        case SG_CS_EHLO:
        case SG_CS_HELO:
        case SG_CS_STARTTLS:
        case SG_CS_TXN:
        case SG_CS_DOT:
        case SG_CS_QUIT:
            /* more replies may be in the buffer */
            break;

        default:
            /* leftovers are checked where they matter */
            return NGX_OK;
        }
    }

    return NGX_OK;
}


/*
 * A complete reply, to the step that waits for it.  NGX_ERROR: the
 * connection failed (sc may be gone); NGX_OK: sc->state says what next.
 */

static ngx_int_t
sg_client_dispatch(sg_client_t *sc)
{
    switch (sc->state) {

    case SG_CS_GREETING:
        return sg_client_greeting(sc);

    case SG_CS_EHLO:
        return sg_client_ehlo(sc);

    case SG_CS_HELO:
        return sg_client_helo(sc);

    case SG_CS_STARTTLS:
        return sg_client_starttls_reply(sc);

    case SG_CS_TXN:
        return sg_client_txn_reply(sc);

    case SG_CS_DOT:
        return sg_client_dot_reply(sc);

    case SG_CS_QUIT:
        sg_client_finalize(sc);
        return NGX_ERROR;

    default:
        sg_client_fail(sc, SG_CLIENT_PROTOCOL, "unexpected reply");
        return NGX_ERROR;
    }
}


/* the next reply starts: a fresh parser and its timer */

static void
sg_client_expect(sg_client_t *sc, ngx_msec_t timeout)
{
    ngx_connection_t  *c;

    c = sc->conn;

    if (sc->state == SG_CS_EHLO) {
        sg_smtp_ehlo_init(&sc->caps);
        sg_smtp_reply_init(&sc->reply, sg_smtp_ehlo_line, &sc->caps);

    } else {
        sg_smtp_reply_init(&sc->reply, NULL, NULL);
    }

    ngx_add_timer(c->read, timeout);

    /* a read event that came while nothing was expected */
    if (c->read->ready && !c->read->posted) {
        ngx_post_event(c->read, &ngx_posted_events);
    }
}


/*
 * Queues "VERB[ SP arg]" CRLF, expects its reply in the given state and
 * writes.  NGX_ERROR: the connection failed (and may be gone).
 */

static ngx_int_t
sg_client_command(sg_client_t *sc, sg_client_state_e state,
    const char *verb, ngx_str_t *arg)
{
    size_t      len;
    ngx_buf_t  *b;

    b = sc->out;
    len = ngx_strlen(verb) + (arg ? 1 + arg->len : 0) + 2;

    if ((size_t) (b->end - b->last) < len) {
        sg_client_fail(sc, SG_CLIENT_PROTOCOL, "command too long");
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->last, verb, ngx_strlen(verb));

    if (arg) {
        *b->last++ = ' ';
        b->last = ngx_cpymem(b->last, arg->data, arg->len);
    }

    *b->last++ = CR;
    *b->last++ = LF;

    sc->state = state;
    sc->write_timeout = sc->conf->command_timeout;

    sg_client_expect(sc, (state == SG_CS_QUIT)
                         ? ngx_min(sc->conf->command_timeout,
                                   SG_CLIENT_QUIT_TIMEOUT)
                         : sc->conf->command_timeout);

    return (sg_client_flush(sc) == NGX_ERROR) ? NGX_ERROR : NGX_OK;
}


/*
 * Writes the output buffer.  NGX_OK: all written; NGX_AGAIN: the rest
 * waits for a write event (with write_timeout); NGX_ERROR: the
 * connection failed.
 */

static ngx_int_t
sg_client_flush(sg_client_t *sc)
{
    ssize_t            n;
    ngx_buf_t         *b;
    ngx_connection_t  *c;

    c = sc->conn;
    b = sc->out;

    while (b->pos < b->last) {
        n = c->send(c, b->pos, b->last - b->pos);

        if (n == NGX_ERROR) {
            sg_client_lost(sc, "the connection was closed while writing");
            return NGX_ERROR;
        }

        if (n == NGX_AGAIN) {
            /* RFC 5321, 4.5.3.2.5: a timer per write */
            ngx_add_timer(c->write, sc->write_timeout);

            if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                sg_client_lost(sc, "event error");
                return NGX_ERROR;
            }

            return NGX_AGAIN;
        }

        b->pos += n;
    }

    b->pos = b->start;
    b->last = b->start;

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    return NGX_OK;
}


/* opening: greeting, EHLO, STARTTLS */

static ngx_int_t
sg_client_greeting(sg_client_t *sc)
{
    /* RFC 5321, 4.2 and 3.1: 220 opens the session, 554 (or else) not */
    if (sc->reply.code != 220) {
        sg_client_reply_copy(&sc->info.reply, &sc->reply);
        sg_client_fail(sc, SG_CLIENT_GREETING,
                       sg_client_why(sc, "greeting", &sc->reply));
        return NGX_ERROR;
    }

    sc->log.action = "sending EHLO";

    /* RFC 5321, 4.1.1.1 and 3.2: EHLO first */
    return sg_client_command(sc, SG_CS_EHLO, "EHLO", sg_client_helo_name(sc));
}


static ngx_int_t
sg_client_ehlo(sg_client_t *sc)
{
    if (sc->reply.code == 250) {
        sc->exts = sc->caps.exts;
        sc->info.esmtp = 1;
        sc->info.size_limit = (sc->exts & SG_SMTP_EXT_SIZE)
                              ? (off_t) sc->caps.size : 0;

        return sg_client_greeted(sc);
    }

    /*
     * RFC 5321, 3.2 and 4.1.4: a server that refuses EHLO (5yz, "command
     * not recognized") is greeted with HELO; 4yz and 421 are failures
     */
    if (sc->reply.code >= 500 && !sc->helo) {
        sc->helo = 1;
        sc->log.action = "sending HELO";

        return sg_client_command(sc, SG_CS_HELO, "HELO",
                                 sg_client_helo_name(sc));
    }

    sg_client_reply_copy(&sc->info.reply, &sc->reply);
    sg_client_fail(sc, SG_CLIENT_EHLO, sg_client_why(sc, "EHLO", &sc->reply));

    return NGX_ERROR;
}


static ngx_int_t
sg_client_helo(sg_client_t *sc)
{
    if (sc->reply.code != 250) {
        sg_client_reply_copy(&sc->info.reply, &sc->reply);
        sg_client_fail(sc, SG_CLIENT_EHLO,
                       sg_client_why(sc, "HELO", &sc->reply));
        return NGX_ERROR;
    }

    /* RFC 5321, 4.1.1.1: HELO: no service extensions */
    sc->exts = 0;
    sc->info.esmtp = 0;
    sc->info.size_limit = 0;

    return sg_client_greeted(sc);
}


/* the server answered EHLO or HELO: STARTTLS, or ready */

static ngx_int_t
sg_client_greeted(sg_client_t *sc)
{
    sg_client_info_t  *info;

    info = &sc->info;

    sc->ehlo_done = 1;

    if (!sc->tls_done) {
        /* RFC 8689, 2: REQUIRETLS counts only when listed after TLS */
        sc->exts &= ~SG_SMTP_EXT_REQUIRETLS;

        info->starttls_offered = (sc->exts & SG_SMTP_EXT_STARTTLS) ? 1 : 0;
        sc->facts.starttls_offered = info->starttls_offered;

    } else {
        /* RFC 3207, 4.2: no second STARTTLS */
        sc->exts &= ~SG_SMTP_EXT_STARTTLS;
    }

    info->pipelining = (sc->exts & SG_SMTP_EXT_PIPELINING) ? 1 : 0;
    info->eightbitmime = (sc->exts & SG_SMTP_EXT_8BITMIME) ? 1 : 0;
    info->smtputf8 = (sc->exts & SG_SMTP_EXT_SMTPUTF8) ? 1 : 0;
    info->dsn = (sc->exts & SG_SMTP_EXT_DSN) ? 1 : 0;
    info->requiretls = (sc->exts & SG_SMTP_EXT_REQUIRETLS) ? 1 : 0;

    if (!sc->tls_done && sc->decision.level != SG_TLS_NONE) {

        if (sc->exts & SG_SMTP_EXT_STARTTLS) {
            /* RFC 3207, 4: "STARTTLS" CRLF */
            sc->log.action = "sending STARTTLS";
            return sg_client_command(sc, SG_CS_STARTTLS, "STARTTLS", NULL);
        }

        if (sc->decision.level != SG_TLS_MAY) {
            /* encrypt, verify, dane: TLS or nothing */
            sg_client_fail(sc, SG_CLIENT_NO_STARTTLS,
                           "STARTTLS is required but not offered");
            return NGX_ERROR;
        }
    }

    return sg_client_opened(sc);
}


static ngx_int_t
sg_client_starttls_reply(sg_client_t *sc)
{
    if (sc->reply.code == 220) {

        /*
         * RFC 3207, 4.2 and NGINX-NOTES: bytes after the 220 and before
         * the handshake were not sent by a TLS server: an injection
         * (CVE-2011-0411 style); they must never be read as TLS-protected
         */
        if (sc->in->pos != sc->in->last) {
            sg_client_fail(sc, SG_CLIENT_PROTOCOL,
                           "data after the 220 reply to STARTTLS:"
                           " possible command injection");
            return NGX_ERROR;
        }

        sg_client_handshake(sc);
        return NGX_OK;
    }

    /* RFC 3207, 4: 454 (or else): TLS not available */
    sc->facts.starttls_refused = 1;
    sg_client_reply_copy(&sc->info.reply, &sc->reply);

    if (sc->decision.level == SG_TLS_MAY && sc->reply.code != 421) {
        /*
         * RFC 3207, 4: the client decides whether to go on; at level
         * "may" the session continues in clear, with what EHLO said
         */
        sc->exts &= ~SG_SMTP_EXT_STARTTLS;
        return sg_client_opened(sc);
    }

    sg_client_fail(sc, SG_CLIENT_STARTTLS,
                   sg_client_why(sc, "STARTTLS", &sc->reply));

    return NGX_ERROR;
}


static void
sg_client_handshake(sg_client_t *sc)
{
    ngx_int_t          rc;
    ngx_connection_t  *c;

    c = sc->conn;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    sc->state = SG_CS_HANDSHAKE;
    sc->log.action = "TLS handshaking";
    sc->facts.tls_attempted = 1;

    if (ngx_ssl_create_connection(sc->conf->ssl, c, NGX_SSL_CLIENT)
        != NGX_OK)
    {
        sg_client_fail(sc, SG_CLIENT_HANDSHAKE,
                       "the TLS connection could not be created");
        return;
    }

    /* SNI (RFC 6066, 3) with the host name, never an IP literal */
    if (sc->ip.len == 0 && sc->host.len
        && SSL_set_tlsext_host_name(c->ssl->connection,
                                    (char *) sc->host.data)
           != 1)
    {
        ngx_ssl_error(NGX_LOG_ERR, &sc->log, 0,
                      "SSL_set_tlsext_host_name(\"%V\") failed", &sc->host);
        sg_client_fail(sc, SG_CLIENT_HANDSHAKE, "SNI could not be set");
        return;
    }

    rc = ngx_ssl_handshake(c);

    if (rc == NGX_AGAIN) {
        ngx_add_timer(c->write, sc->conf->command_timeout);
        c->ssl->handler = sg_client_handshake_done;
        return;
    }

    sg_client_handshake_done(c);
}


static void
sg_client_handshake_done(ngx_connection_t *c)
{
    sg_client_t  *sc;

    sc = c->data;

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    c->read->handler = sg_client_read_handler;
    c->write->handler = sg_client_write_handler;

    if (!c->ssl->handshaked) {
        /*
         * ngx_ssl_handshake() sets read->error only for a TLS failure (an
         * alert, a protocol or version mismatch), not when the peer
         * closed or reset the connection (nginx 1.22, ngx_event_openssl.c)
         */
        sc->info.transient = c->read->timedout || c->write->timedout
                             || !c->read->error;
        sg_client_fail(sc, SG_CLIENT_HANDSHAKE,
                       (c->read->timedout || c->write->timedout)
                       ? "the TLS handshake timed out"
                       : (c->read->error
                          ? "the TLS handshake failed"
                          : "the connection was closed in the TLS"
                            " handshake"));
        return;
    }

    sc->tls_done = 1;
    sc->info.tls = 1;
    sc->facts.handshake_ok = 1;

    if (sg_client_tls_facts(sc, c) != NGX_OK) {
        return;
    }

    /* RFC 3207, 4.2: forget what was learned in clear, EHLO again */
    sc->exts = 0;
    sc->log.action = "sending EHLO after STARTTLS";

    (void) sg_client_command(sc, SG_CS_EHLO, "EHLO",
                             sg_client_helo_name(sc));
}


/*
 * What the handshake gave: protocol, cipher, the verification verdict,
 * the host match; at level verify (and dane, as verify for now) a
 * failure ends the connection.
 */

static ngx_int_t
sg_client_tls_facts(sg_client_t *sc, ngx_connection_t *c)
{
    long               rc;
    X509              *cert;
    const char        *s;
    sg_client_info_t  *info;

    info = &sc->info;

    s = SSL_get_version(c->ssl->connection);
    ngx_cpystrn(info->tls_protocol, (u_char *) (s ? s : ""),
                sizeof(info->tls_protocol));

    s = SSL_get_cipher_name(c->ssl->connection);
    ngx_cpystrn(info->tls_cipher, (u_char *) (s ? s : ""),
                sizeof(info->tls_cipher));

    cert = SSL_get_peer_certificate(c->ssl->connection);
    rc = SSL_get_verify_result(c->ssl->connection);

    info->verify_result = rc;

    if (cert == NULL) {
        sc->facts.cert = SG_SMTP_CERT_NONE;
        info->host_match = 0;
        ngx_cpystrn(info->tls_verify, (u_char *) "no certificate",
                    sizeof(info->tls_verify));

    } else {
        sc->facts.cert = sg_client_cert_kind(rc);

        ngx_cpystrn(info->tls_verify,
                    (u_char *) ((rc == X509_V_OK)
                                ? "ok" : X509_verify_cert_error_string(rc)),
                    sizeof(info->tls_verify));

        if (sc->ip.len) {
            /* RFC 6125, 6.2: an IP literal against iPAddress entries */
            info->host_match = (X509_check_ip_asc(cert,
                                                  (char *) sc->ip.data, 0)
                                == 1);

        } else {
            info->host_match = (sc->host.len
                                && ngx_ssl_check_host(c, &sc->host)
                                   == NGX_OK);
        }

        X509_free(cert);
    }

    sc->facts.host_match = info->host_match;

    ngx_log_debug4(NGX_LOG_DEBUG_MAIL, &sc->log, 0,
                   "sg client TLS: %s %s verify \"%s\" host match %d",
                   info->tls_protocol, info->tls_cipher, info->tls_verify,
                   (int) info->host_match);

    if (sc->decision.level != SG_TLS_VERIFY
        && sc->decision.level != SG_TLS_DANE)
    {
        return NGX_OK;
    }

    /* verify (and dane until DANE lands): a trusted chain naming H */

    if (sc->facts.cert != SG_SMTP_CERT_OK) {
        ngx_snprintf(sc->reason, SG_CLIENT_REASON_MAX - 1,
                     "certificate verification failed: %s%Z",
                     info->tls_verify);
        sg_client_fail(sc, SG_CLIENT_VERIFY, (char *) sc->reason);
        return NGX_ERROR;
    }

    if (!info->host_match) {
        ngx_snprintf(sc->reason, SG_CLIENT_REASON_MAX - 1,
                     "the certificate does not name %V%Z", &sc->host);
        sg_client_fail(sc, SG_CLIENT_VERIFY, (char *) sc->reason);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* X509_V_ERR_* onto the RFC 8460 categories (sg_smtp_tls_result_type) */

static sg_smtp_cert_e
sg_client_cert_kind(long rc)
{
    switch (rc) {

    case X509_V_OK:
        return SG_SMTP_CERT_OK;

    case X509_V_ERR_CERT_HAS_EXPIRED:
    case X509_V_ERR_ERROR_IN_CERT_NOT_AFTER_FIELD:
        return SG_SMTP_CERT_EXPIRED;

    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_CERT_UNTRUSTED:
    case X509_V_ERR_CERT_REJECTED:
    case X509_V_ERR_INVALID_CA:
    case X509_V_ERR_CERT_CHAIN_TOO_LONG:
    case X509_V_ERR_PATH_LENGTH_EXCEEDED:
        return SG_SMTP_CERT_UNTRUSTED;

    default:
        return SG_SMTP_CERT_INVALID;
    }
}


/* the open step ended well: the handler gets a ready connection */

static ngx_int_t
sg_client_opened(sg_client_t *sc)
{
    /* RFC 8689, 4.1: a REQUIRETLS message needs TLS and REQUIRETLS */
    if (sc->decision.need_requiretls) {

        if (!sc->info.tls) {
            sg_client_fail(sc, SG_CLIENT_NO_STARTTLS,
                           "REQUIRETLS needs TLS, which was not set up");
            return NGX_ERROR;
        }

        if (!(sc->exts & SG_SMTP_EXT_REQUIRETLS)) {
            sg_client_fail(sc, SG_CLIENT_NO_REQUIRETLS,
                           "REQUIRETLS is required but not offered"
                           " after STARTTLS");
            return NGX_ERROR;
        }
    }

    /* RFC 2920, 3.1: a reply for every command, nothing more */
    if (sc->in->pos != sc->in->last) {
        sg_client_fail(sc, SG_CLIENT_PROTOCOL,
                       "data after the last reply");
        return NGX_ERROR;
    }

    sc->info.step = SG_CLIENT_OK;
    sc->log.action = "idle";

    sg_client_post_report(sc);

    return NGX_OK;
}


/* a transaction */

static void
sg_client_txn_start(sg_client_t *sc)
{
    size_t              n;
    ngx_uint_t          i, left;
    const char         *detail;
    sg_smtp_mail_t      m;
    sg_smtp_rcpt_t      r;
    sg_client_txn_t    *txn;
    sg_smtp_build_rc_e  rc;

    txn = sc->txn;

    sc->accepted = 0;
    sc->body_off = 0;
    sc->mail_ok = 0;
    sc->dot_only = 0;
    sc->body_done = 0;
    sc->log.action = "sending the envelope";

    sg_client_txn_build(sc, &m);

    /* every command is checked before anything is sent */

    rc = sg_smtp_build_mail(&m, sc->exts, (char *) sc->out->start,
                            SG_SMTP_CMD_OUT_MAX, &n, &detail);

    if (rc == SG_SMTP_BUILD_NEED_SMTPUTF8) {
        /*
         * RFC 6531, 3.2: no internationalized address or header to a
         * server without SMTPUTF8; every recipient fails, nothing is sent
         */
        for (i = 0; i < txn->nrcpts; i++) {
            sg_client_reply_set(&txn->rcpts[i].reply, 553, "5.6.7",
                                "the next hop does not support SMTPUTF8"
                                " (RFC 6531)", NULL);
        }

        sg_client_post_report(sc);
        return;
    }

    if (rc == SG_SMTP_BUILD_NEED_REQUIRETLS) {
        /* RFC 8689, 4.1: never without REQUIRETLS at the next hop */
        for (i = 0; i < txn->nrcpts; i++) {
            sg_client_reply_set(&txn->rcpts[i].reply, 550, "5.7.30",
                                "the next hop does not support REQUIRETLS"
                                " (RFC 8689)", NULL);
        }

        sg_client_post_report(sc);
        return;
    }

    if (rc != SG_SMTP_BUILD_OK) {
        sg_client_reply_set(&txn->mail_reply, 501, "5.5.4", detail,
                            "not sent");
        sg_client_post_report(sc);
        return;
    }

    left = 0;

    for (i = 0; i < txn->nrcpts; i++) {
        ngx_memzero(&r, sizeof(sg_smtp_rcpt_t));
        r.address = (char *) txn->rcpts[i].address.data;
        r.address_len = txn->rcpts[i].address.len;
        r.notify = (char *) txn->rcpts[i].notify.data;
        r.notify_len = txn->rcpts[i].notify.len;
        r.orcpt = (char *) txn->rcpts[i].orcpt.data;
        r.orcpt_len = txn->rcpts[i].orcpt.len;

        rc = sg_smtp_build_rcpt(&r, sc->exts, (char *) sc->out->start,
                                SG_SMTP_CMD_OUT_MAX, &n, &detail);

        if (rc != SG_SMTP_BUILD_OK) {
            /* a reply code set now marks the recipient "not sent" */
            sg_client_reply_set(&txn->rcpts[i].reply, 501, "5.1.3", detail,
                                "not sent");
            continue;
        }

        left++;
    }

    if (left == 0) {
        sg_client_post_report(sc);
        return;
    }

    sc->state = SG_CS_TXN;
    sc->write_timeout = sc->conf->command_timeout;

    /* RFC 5321, 4.1.1.5: RSET first when the last transaction failed */
    sc->gen = sc->rset ? SG_SLOT_RSET : SG_SLOT_MAIL;
    sc->got = sc->gen;

    sg_client_expect(sc, sg_client_slot_timeout(sc, sc->got));

    (void) sg_client_txn_write(sc);
}


static void
sg_client_txn_build(sg_client_t *sc, sg_smtp_mail_t *m)
{
    ngx_uint_t        i;
    sg_client_txn_t  *txn;

    txn = sc->txn;

    ngx_memzero(m, sizeof(sg_smtp_mail_t));

    m->sender = (char *) txn->sender.data;
    m->sender_len = txn->sender.len;
    m->size = (txn->size > 0) ? (uint64_t) txn->size
                              : (uint64_t) txn->body_len;
    m->ret = (char *) txn->ret.data;
    m->ret_len = txn->ret.len;
    m->envid = (char *) txn->envid.data;
    m->envid_len = txn->envid.len;
    m->eightbit = txn->eightbit;
    m->requiretls = txn->requiretls;

    /* RFC 6531, 3.4: SMTPUTF8 for the message or any address */
    m->smtputf8 = txn->smtputf8;

    for (i = 0; i < txn->nrcpts && !m->smtputf8; i++) {
        m->smtputf8 = sg_smtp_addr_utf8((char *) txn->rcpts[i].address.data,
                                        txn->rcpts[i].address.len);
    }
}


/*
 * The slot after this one, skipping recipients that are not sent: a
 * recipient whose reply is set before its RCPT was written (replies
 * come in order, so a later slot has none otherwise).
 */

static ngx_uint_t
sg_client_slot_next(sg_client_t *sc, ngx_uint_t slot)
{
    for (slot++; slot >= SG_SLOT_RCPT && slot < sg_slot_data(sc); slot++) {
        if (sc->txn->rcpts[slot - SG_SLOT_RCPT].reply.code == 0) {
            break;
        }
    }

    return slot;
}


static ngx_msec_t
sg_client_slot_timeout(sg_client_t *sc, ngx_uint_t slot)
{
    /* RFC 5321, 4.5.3.2.4: DATA initiation; 4.5.3.2.2/3: MAIL, RCPT */
    return (slot == sg_slot_data(sc)) ? sc->conf->data_init_timeout
                                      : sc->conf->command_timeout;
}


/*
 * Writes the transaction's commands: all of them at once with
 * PIPELINING (RFC 2920, 3.1: RSET, MAIL and RCPT anywhere in a group,
 * DATA last), else one at a time, each after the previous reply.
 * The output buffer is refilled as it drains, so that any number of
 * recipients fits; replies are read meanwhile (RFC 2920, 3.1 warns of
 * the deadlock of a client that only writes).
 */

static ngx_int_t
sg_client_txn_write(sg_client_t *sc)
{
    size_t               n;
    ngx_int_t            rc;
    ngx_buf_t           *b;
    ngx_uint_t           pipelining, i;
    const char          *detail;
    sg_smtp_mail_t       m;
    sg_smtp_rcpt_t       r;
    sg_client_txn_t     *txn;
    sg_smtp_build_rc_e   brc;

    txn = sc->txn;
    b = sc->out;
    pipelining = (sc->exts & SG_SMTP_EXT_PIPELINING) ? 1 : 0;

    for ( ;; ) {

        while (sc->gen < sg_slot_end(sc)
               && (pipelining || sc->gen == sc->got)
               && (size_t) (b->end - b->last) >= SG_SMTP_CMD_OUT_MAX)
        {
            if (sc->gen == SG_SLOT_RSET) {
                b->last = ngx_cpymem(b->last, "RSET" CRLF, 6);

            } else if (sc->gen == SG_SLOT_MAIL) {
                sg_client_txn_build(sc, &m);

                brc = sg_smtp_build_mail(&m, sc->exts, (char *) b->last,
                                         SG_SMTP_CMD_OUT_MAX, &n, &detail);
                if (brc != SG_SMTP_BUILD_OK) {
                    sg_client_fail(sc, SG_CLIENT_PROTOCOL, detail);
                    return NGX_ERROR;
                }

                b->last += n;

            } else if (sc->gen < sg_slot_data(sc)) {
                i = sc->gen - SG_SLOT_RCPT;

                ngx_memzero(&r, sizeof(sg_smtp_rcpt_t));
                r.address = (char *) txn->rcpts[i].address.data;
                r.address_len = txn->rcpts[i].address.len;
                r.notify = (char *) txn->rcpts[i].notify.data;
                r.notify_len = txn->rcpts[i].notify.len;
                r.orcpt = (char *) txn->rcpts[i].orcpt.data;
                r.orcpt_len = txn->rcpts[i].orcpt.len;

                brc = sg_smtp_build_rcpt(&r, sc->exts, (char *) b->last,
                                         SG_SMTP_CMD_OUT_MAX, &n, &detail);
                if (brc != SG_SMTP_BUILD_OK) {
                    sg_client_fail(sc, SG_CLIENT_PROTOCOL, detail);
                    return NGX_ERROR;
                }

                b->last += n;

            } else {
                /* RFC 5321, 4.1.1.4: "DATA" CRLF */
                b->last = ngx_cpymem(b->last, "DATA" CRLF, 6);
            }

            sc->gen = sg_client_slot_next(sc, sc->gen);
        }

        if (b->pos == b->last) {
            return NGX_OK;
        }

        rc = sg_client_flush(sc);

        if (rc != NGX_OK) {
            return rc;
        }
    }
}


/* a reply to the transaction's next slot */

static ngx_int_t
sg_client_txn_reply(sg_client_t *sc)
{
    ngx_uint_t        slot, code, i;
    sg_client_txn_t  *txn;

    txn = sc->txn;
    slot = sc->got;
    code = sc->reply.code;

    if (slot == SG_SLOT_RSET) {
        /* RFC 5321, 4.1.1.5: RSET gets 250 */
        if (!sg_client_2xx(code)) {
            sg_client_fail(sc, (code == 421) ? SG_CLIENT_CLOSED
                                             : SG_CLIENT_PROTOCOL,
                           sg_client_why(sc, "RSET", &sc->reply));
            return NGX_ERROR;
        }

        sc->rset = 0;

    } else if (slot == SG_SLOT_MAIL) {
        sg_client_reply_copy(&txn->mail_reply, &sc->reply);
        sc->mail_ok = sg_client_2xx(code);

    } else if (slot < sg_slot_data(sc)) {
        i = slot - SG_SLOT_RCPT;

        sg_client_reply_copy(&txn->rcpts[i].reply, &sc->reply);

        /* RFC 5321, 4.1.1.3: 250 or 251 accept the recipient */
        if (sc->mail_ok && sg_client_2xx(code)) {
            txn->rcpts[i].accepted = 1;
            sc->accepted++;
        }

    } else {
        return sg_client_txn_next(sc);
    }

    /* RFC 5321, 3.8 and 4.2.1: 421, the server is closing */
    if (code == 421) {
        sc->rset = 1;
        sg_client_fail(sc, SG_CLIENT_CLOSED,
                       "the server is closing the connection (421)");
        return NGX_ERROR;
    }

    sc->got = sg_client_slot_next(sc, slot);

    if (!(sc->exts & SG_SMTP_EXT_PIPELINING)) {

        /*
         * one at a time: no RCPT after a failed MAIL, no DATA without
         * an accepted RCPT (RFC 5321, 3.3)
         */

        if ((slot == SG_SLOT_MAIL && !sc->mail_ok)
            || (sc->got == sg_slot_data(sc) && sc->accepted == 0))
        {
            sc->rset = 1;
            return sg_client_txn_done(sc);
        }
    }

    sg_client_expect(sc, sg_client_slot_timeout(sc, sc->got));

    if (sg_client_txn_write(sc) == NGX_ERROR) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* the reply to DATA */

static ngx_int_t
sg_client_txn_next(sg_client_t *sc)
{
    ngx_uint_t        i, code;
    sg_client_txn_t  *txn;

    txn = sc->txn;
    code = sc->reply.code;

    if (code >= 300 && code < 400) {

        if (sc->accepted && sc->mail_ok) {
            /* RFC 5321, 4.1.1.4: 354, the message follows */
            sc->state = SG_CS_BODY;
            sc->log.action = "sending the message";
            sc->write_timeout = sc->conf->data_block_timeout;

            sg_smtp_dot_init(&sc->dot);

            if (sc->conn->read->timer_set) {
                ngx_del_timer(sc->conn->read);
            }

            return (sg_client_body_write(sc) == NGX_ERROR) ? NGX_ERROR
                                                           : NGX_OK;
        }

        /*
         * RFC 2920, 3.1: DATA was pipelined and accepted although no
         * recipient was: "the client SMTP should send a single dot"
         */
        sc->dot_only = 1;
        sc->state = SG_CS_DOT;
        sc->log.action = "ending an empty DATA";
        sc->write_timeout = sc->conf->data_block_timeout;

        sc->out->last = ngx_cpymem(sc->out->last, "." CRLF, 3);

        sg_client_expect(sc, sc->conf->data_done_timeout);

        return (sg_client_flush(sc) == NGX_ERROR) ? NGX_ERROR : NGX_OK;
    }

    /* DATA refused: the accepted recipients get its reply */

    if (sc->accepted) {
        sg_client_reply_copy(&txn->data_reply, &sc->reply);

        for (i = 0; i < txn->nrcpts; i++) {
            if (txn->rcpts[i].accepted) {
                txn->rcpts[i].reply = txn->data_reply;
            }
        }
    }

    sc->rset = 1;

    if (code == 421) {
        sg_client_fail(sc, SG_CLIENT_CLOSED,
                       "the server is closing the connection (421)");
        return NGX_ERROR;
    }

    return sg_client_txn_done(sc);
}


/*
 * The message, streamed from txn->body through the encoder (RFC 5321,
 * 4.5.2 dot-stuffing, CRLF only) one buffer at a time, then the
 * terminator; each write has data_block_timeout (RFC 5321, 4.5.3.2.5).
 */

static ngx_int_t
sg_client_body_write(sg_client_t *sc)
{
    size_t            used;
    ngx_int_t         rc;
    ngx_buf_t        *b;
    sg_client_txn_t  *txn;

    txn = sc->txn;
    b = sc->out;

    for ( ;; ) {

        while (sc->body_off < txn->body_len
               && (size_t) (b->end - b->last) >= SG_SMTP_DOT_STEP_MAX)
        {
            b->last += sg_smtp_dot_encode(&sc->dot,
                                          txn->body + sc->body_off,
                                          txn->body_len - sc->body_off,
                                          b->last, b->end - b->last, &used);
            sc->body_off += used;
        }

        if (sc->body_off == txn->body_len && !sc->body_done
            && (size_t) (b->end - b->last) >= SG_SMTP_DOT_FINISH_MAX)
        {
            /* RFC 5321, 4.1.1.4: CRLF "." CRLF */
            b->last += sg_smtp_dot_finish(&sc->dot, b->last,
                                          b->end - b->last);
            sc->body_done = 1;
        }

        rc = sg_client_flush(sc);

        if (rc != NGX_OK) {
            return rc;
        }

        if (sc->body_done) {
            break;
        }
    }

    /* RFC 1047: from now on a lost reply may mean a delivered message */
    txn->data_sent = 1;

    sc->state = SG_CS_DOT;
    sc->log.action = "waiting for the reply to the message";

    sg_client_expect(sc, sc->conf->data_done_timeout);

    return NGX_OK;
}


/* the reply after "." */

static ngx_int_t
sg_client_dot_reply(sg_client_t *sc)
{
    ngx_uint_t        i;
    sg_client_txn_t  *txn;

    txn = sc->txn;

    if (sc->dot_only) {
        /* RFC 2920, 3.1: its reply means nothing for any recipient */
        sc->rset = 1;

    } else {
        /* RFC 5321, 4.1.1.4 and 3.3: one reply for every recipient */
        sg_client_reply_copy(&txn->data_reply, &sc->reply);

        for (i = 0; i < txn->nrcpts; i++) {
            if (txn->rcpts[i].accepted) {
                txn->rcpts[i].reply = txn->data_reply;
            }
        }

        if (sg_client_2xx(sc->reply.code)) {
            txn->delivered = sc->accepted;
            sc->rset = 0;

        } else {
            sc->rset = 1;
        }
    }

    if (sc->reply.code == 421) {
        sg_client_fail(sc, SG_CLIENT_CLOSED,
                       "the server is closing the connection (421)");
        return NGX_ERROR;
    }

    return sg_client_txn_done(sc);
}


/* the transaction ended with a reply: report, the connection stays */

static ngx_int_t
sg_client_txn_done(sg_client_t *sc)
{
    /*
     * RFC 2920, 3.1: a reply for every command, nothing more.  Extra
     * bytes make the connection unusable, but the replies already read
     * stand: a 250 to the final "." is a delivery, never a retry.  The
     * owner sees info.step and closes the connection instead of reusing
     * it.
     */
    if (sc->in->pos != sc->in->last) {
        sc->rset = 1;
        sc->in->pos = sc->in->last;
        sc->info.step = SG_CLIENT_PROTOCOL;
        sc->info.reason = "data after the last reply";
        ngx_log_error(NGX_LOG_INFO, &sc->log, 0,
                      "sg client: data after the last reply");
    }

    sc->out->pos = sc->out->start;
    sc->out->last = sc->out->start;

    sc->txn->step = SG_CLIENT_OK;
    sc->log.action = "idle";

    sg_client_post_report(sc);

    return NGX_OK;
}


/* failures and reports */

/*
 * The connection failed at this step: it is closed now, and the handler
 * of the open or send that runs learns it (after this call returns).
 */

static void
sg_client_fail(sg_client_t *sc, sg_client_step_e step, const char *reason)
{
    ngx_log_error(NGX_LOG_INFO, &sc->log, 0, "sg client: %s", reason);

    switch (sc->state) {

    case SG_CS_QUIT:
        sg_client_finalize(sc);
        return;

    case SG_CS_REPORT:
    case SG_CS_DEAD:
        return;

    case SG_CS_READY:
        /*
         * nobody waits: sg_client_info() shows it, and the next
         * sg_client_send() reports it
         */
        sc->info.step = step;
        sc->info.reason = reason;
        sg_client_close_connection(sc);
        sc->state = SG_CS_DEAD;
        return;

    default:
        break;
    }

    sc->info.reason = reason;

    if (sc->txn) {
        sc->txn->step = step;

    } else {
        sc->info.step = step;
    }

    sg_client_close_connection(sc);
    sg_client_post_report(sc);
}


/* the connection broke (closed, reset, an event error) */

static void
sg_client_lost(sg_client_t *sc, const char *reason)
{
    switch (sc->state) {

    case SG_CS_GREETING:
        /* RFC 5321, 3.1: no greeting at all */
        sg_client_fail(sc, SG_CLIENT_GREETING,
                       "the connection was closed before the greeting");
        break;

    case SG_CS_HANDSHAKE:
        sc->info.transient = 1;
        sg_client_fail(sc, SG_CLIENT_HANDSHAKE, reason);
        break;

    default:
        sg_client_fail(sc, SG_CLIENT_CLOSED, reason);
    }
}


static void
sg_client_post_report(sg_client_t *sc)
{
    ngx_connection_t  *c;

    c = sc->conn;

    if (c) {
        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        if (c->write->timer_set) {
            ngx_del_timer(c->write);
        }
    }

    if (!sc->txn && sc->ehlo_done && sc->decision.level != SG_TLS_NONE) {
        /* RFC 8460, 4.3.1: what the TLS facts mean, for the report */
        sc->info.result_type = sg_smtp_tls_result_type(&sc->facts);
    }

    sc->state = (c == NULL) ? SG_CS_DEAD : SG_CS_REPORT;

    ngx_post_event(&sc->report, &ngx_posted_events);
}


static void
sg_client_report_handler(ngx_event_t *ev)
{
    sg_client_t  *sc = ev->data;

    ngx_uint_t        ok;
    sg_client_txn_t  *txn;

    ok = (sc->conn != NULL);

    if (ok) {
        /* ready for the next sg_client_send() (possibly in the handler) */
        sc->state = SG_CS_READY;
    }

    sc->in_handler = 1;

    if (sc->txn) {
        txn = sc->txn;
        sc->txn = NULL;

        sc->send_handler(sc->send_data, sc, txn);

    } else {
        sc->open_handler(sc->open_data, sc, &sc->info);
    }

    sc->in_handler = 0;

    if (!ok) {
        /* the handler was told: the connection is gone */
        sg_client_free(sc);
        return;
    }

    if (sc->closing) {
        sc->closing = 0;
        sg_client_close(sc);
        return;
    }

    if (sc->state == SG_CS_READY && sc->conn->read->ready
        && !sc->conn->read->posted)
    {
        /* something came while the handler was posted: look at it */
        ngx_post_event(sc->conn->read, &ngx_posted_events);
    }
}


/* closing */

static void
sg_client_quit(sg_client_t *sc)
{
    sc->log.action = "closing";

    /* the connection stays open a little: the caller counts it */
    sg_client_count_closing(sc);

    /* RFC 5321, 4.1.1.10: "QUIT" CRLF, then the server closes */
    (void) sg_client_command(sc, SG_CS_QUIT, "QUIT", NULL);
}


/* counted in conf->closing until sg_client_free(), once */

static void
sg_client_count_closing(sg_client_t *sc)
{
    if (!sc->quitting) {
        sc->quitting = 1;
        sc->conf->closing++;
    }
}


/* QUIT answered (or failed): close TLS politely, then everything */

static void
sg_client_finalize(sg_client_t *sc)
{
    ngx_connection_t  *c;

    c = sc->conn;

    if (c && c->ssl) {
        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        if (c->write->timer_set) {
            ngx_del_timer(c->write);
        }

        /* send close_notify, do not wait for the peer's */
        c->ssl->no_wait_shutdown = 1;

        if (ngx_ssl_shutdown(c) == NGX_AGAIN) {
            c->ssl->handler = sg_client_shutdown_handler;
            sc->state = SG_CS_DEAD;
            return;
        }
    }

    sg_client_free(sc);
}


static void
sg_client_shutdown_handler(ngx_connection_t *c)
{
    sg_client_free(c->data);
}


static void
sg_client_close_connection(sg_client_t *sc)
{
    ngx_connection_t  *c;

    c = sc->conn;

    if (c == NULL) {
        return;
    }

    sc->conn = NULL;

    if (c->ssl) {
        /* a failure: no close_notify, no waiting (frees the SSL) */
        c->ssl->no_wait_shutdown = 1;
        c->ssl->no_send_shutdown = 1;
        (void) ngx_ssl_shutdown(c);
    }

    ngx_close_connection(c);
}


static void
sg_client_free(sg_client_t *sc)
{
    ngx_queue_remove(&sc->link);

    if (sc->report.posted) {
        ngx_delete_posted_event(&sc->report);
    }

    sg_client_close_connection(sc);

    if (sc->quitting) {
        sc->conf->closing--;

        if (sc->conf->closed) {
            sc->conf->closed();
        }
    }

    ngx_destroy_pool(sc->pool);
}


/* helpers */

static void
sg_client_reply_copy(sg_client_reply_t *dst, sg_smtp_reply_t *src)
{
    dst->code = src->code;
    ngx_cpystrn(dst->status, (u_char *) src->status, sizeof(dst->status));
    ngx_cpystrn(dst->text, (u_char *) src->text, sizeof(dst->text));
}


/* a reply sg made up: "553 5.6.7 text[: detail]" */

static void
sg_client_reply_set(sg_client_reply_t *r, ngx_uint_t code,
    const char *status, const char *text, const char *detail)
{
    r->code = code;
    ngx_cpystrn(r->status, (u_char *) status, sizeof(r->status));

    if (detail) {
        ngx_snprintf(r->text, sizeof(r->text) - 1, "%ui %s %s: %s%Z",
                     code, status, text, detail);

    } else {
        ngx_snprintf(r->text, sizeof(r->text) - 1, "%ui %s %s%Z",
                     code, status, text);
    }
}


static const char *
sg_client_why(sg_client_t *sc, const char *what, sg_smtp_reply_t *r)
{
    ngx_snprintf(sc->reason, SG_CLIENT_REASON_MAX - 1, "%s refused: %s%Z",
                 what, r->text);

    return (char *) sc->reason;
}


/* RFC 5321, 4.1.1.1: our name in EHLO and HELO */

static ngx_str_t *
sg_client_helo_name(sg_client_t *sc)
{
    return sc->conf->helo_name.len ? &sc->conf->helo_name
                                   : &((ngx_cycle_t *) ngx_cycle)->hostname;
}


/*
 * The host as an address literal (RFC 5321, 4.1.3: "[192.0.2.1]",
 * "[IPv6:2001:db8::1]", or a bare address as a route may give it): no
 * SNI (RFC 6066, 3), and the certificate is checked for the address.
 */

static ngx_int_t
sg_client_ip_literal(sg_client_t *sc)
{
    u_char  *p;
    size_t   len;
#if (NGX_HAVE_INET6)
    u_char   addr6[16];
#endif

    p = sc->host.data;
    len = sc->host.len;

    if (len >= 2 && p[0] == '[' && p[len - 1] == ']') {
        p++;
        len -= 2;

        if (len > 5 && ngx_strncasecmp(p, (u_char *) "IPv6:", 5) == 0) {
            p += 5;
            len -= 5;
        }
    }

    if (len == 0) {
        return NGX_OK;
    }

    if (ngx_inet_addr(p, len) == INADDR_NONE
#if (NGX_HAVE_INET6)
        && ngx_inet6_addr(p, len, addr6) != NGX_OK
#endif
        )
    {
        return NGX_OK;
    }

    sc->ip.data = ngx_pnalloc(sc->pool, len + 1);
    if (sc->ip.data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(sc->ip.data, p, len);
    sc->ip.data[len] = '\0';
    sc->ip.len = len;

    return NGX_OK;
}


static u_char *
sg_client_log_error(ngx_log_t *log, u_char *buf, size_t len)
{
    u_char       *p;
    sg_client_t  *sc;

    p = buf;

    if (log->action) {
        p = ngx_snprintf(buf, len, " while %s", log->action);
        len -= p - buf;
        buf = p;
    }

    sc = log->data;

    p = ngx_snprintf(buf, len, ", next hop: %V[%V]", &sc->host,
                     &sc->addr_text);

    return p;
}
