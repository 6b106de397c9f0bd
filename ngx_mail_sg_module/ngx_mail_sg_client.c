/*
 * sg: one outbound SMTP connection on nginx events (see
 * ngx_mail_sg_client.h).  One handler per protocol step; the protocol
 * core (replies, EHLO keywords, MAIL/RCPT, dot-stuffing, RFC 8460 result
 * types) is pure: common/sg_smtp_client.c.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_event_connect.h>

#include "sg_smtp_client.h"
#include "ngx_mail_sg_client.h"


#define SG_CLIENT_IN_SIZE     4096
#define SG_CLIENT_BODY_CHUNK  65536
#define SG_CLIENT_QUIT_WAIT   2000


typedef enum {
    SG_CS_CONNECT = 0,
    SG_CS_GREETING,
    SG_CS_EHLO,
    SG_CS_HELO,
    SG_CS_STARTTLS,
    SG_CS_HANDSHAKE,
    SG_CS_EHLO_TLS,
    SG_CS_READY,
    SG_CS_RSET,
    SG_CS_MAIL,
    SG_CS_RCPT,
    SG_CS_DATA,
    SG_CS_BODY,
    SG_CS_DOT,
    SG_CS_QUIT,
    SG_CS_CLOSED
} sg_client_state_e;


typedef enum {
    SG_CLIENT_CB_NONE = 0,
    SG_CLIENT_CB_OPEN,
    SG_CLIENT_CB_SEND
} sg_client_cb_e;


struct sg_client_s {
    ngx_queue_t               link;          /* sg_clients */
    sg_client_conf_t         *conf;
    ngx_pool_t               *pool;
    ngx_peer_connection_t     peer;
    ngx_connection_t         *c;
    ngx_connection_t          dummy;          /* ev->data when c is gone */
    ngx_log_t                *log;

    ngx_str_t                 host;           /* NUL-terminated */
    sg_tls_decision_t         decision;
    sg_client_info_t          info;
    sg_smtp_ehlo_t            ehlo;
    sg_smtp_reply_t           reply;
    sg_smtp_tls_facts_t       facts;

    sg_client_state_e         state;
    ngx_buf_t                *in;
    ngx_buf_t                *out;           /* what is being written */
    ngx_msec_t                timeout;       /* of the reply awaited */

    /* the transaction */
    sg_client_txn_t          *txn;
    ngx_uint_t                rcpt_sent;     /* RCPTs written */
    ngx_uint_t                rcpt_replied;  /* RCPT replies read */
    ngx_uint_t                accepted;
    ngx_uint_t                pipelined;     /* replies still due */
    size_t                    body_pos;
    sg_smtp_dot_t             dot;

    sg_client_open_pt         open_handler;
    sg_client_send_pt         send_handler;
    void                     *data;
    sg_client_cb_e            cb;
    ngx_event_t               post;

    unsigned                  need_rset:1;
    unsigned                  dot_done:1;
    unsigned                  corked:1;      /* append, flush later */
    unsigned                  in_handler:1;
    unsigned                  close_asked:1;
    unsigned                  dead:1;        /* socket closed */
    unsigned                  freed:1;
};


static void sg_client_connect_handler(ngx_event_t *wev);
static void sg_client_read_handler(ngx_event_t *rev);
static void sg_client_write_handler(ngx_event_t *wev);
static int sg_client_verify_callback(int ok, X509_STORE_CTX *x509_store);
static void sg_client_reply(sg_client_t *cl);
static void sg_client_greeting(sg_client_t *cl);
static void sg_client_ehlo_reply(sg_client_t *cl);
static void sg_client_after_ehlo(sg_client_t *cl);
static void sg_client_starttls_reply(sg_client_t *cl);
static void sg_client_handshake(sg_client_t *cl);
static void sg_client_handshake_done(ngx_connection_t *c);
static void sg_client_tls_facts(sg_client_t *cl);
static void sg_client_ready(sg_client_t *cl);
static void sg_client_begin(sg_client_t *cl);
static void sg_client_mail(sg_client_t *cl);
static ngx_int_t sg_client_add_rcpt(sg_client_t *cl, ngx_uint_t i);
static void sg_client_txn_reply(sg_client_t *cl);
static void sg_client_data_reply(sg_client_t *cl);
static void sg_client_body(sg_client_t *cl);
static void sg_client_dot_reply(sg_client_t *cl);
static void sg_client_txn_done(sg_client_t *cl, sg_client_step_e step);
static ngx_int_t sg_client_write(sg_client_t *cl, const char *data,
    size_t len);
static ngx_int_t sg_client_flush(sg_client_t *cl);
static void sg_client_expect(sg_client_t *cl, sg_client_state_e state,
    ngx_msec_t timeout);
static void sg_client_fail(sg_client_t *cl, sg_client_step_e step,
    const char *reason);
static void sg_client_copy_reply(sg_client_t *cl, sg_client_reply_t *r);
static void sg_client_post(sg_client_t *cl, sg_client_cb_e cb);
static void sg_client_post_handler(ngx_event_t *ev);
static void sg_client_shutdown(sg_client_t *cl);
static void sg_client_quit_handler(ngx_event_t *ev);
static void sg_client_free(sg_client_t *cl);


static ngx_queue_t  sg_clients;     /* every client not yet freed */


sg_client_t *
sg_client_open(sg_client_conf_t *conf, ngx_str_t *host, ngx_addr_t *addr,
    sg_tls_decision_t *decision, sg_client_open_pt handler, void *data)
{
    ngx_int_t     rc;
    ngx_pool_t   *pool;
    sg_client_t  *cl;

    pool = ngx_create_pool(2048, conf->log);
    if (pool == NULL) {
        return NULL;
    }

    cl = ngx_pcalloc(pool, sizeof(sg_client_t));
    if (cl == NULL) {
        ngx_destroy_pool(pool);
        return NULL;
    }

    cl->pool = pool;
    cl->conf = conf;

    if (sg_clients.next == NULL) {
        ngx_queue_init(&sg_clients);
    }

    ngx_queue_insert_tail(&sg_clients, &cl->link);
    cl->log = conf->log;
    cl->decision = *decision;
    cl->open_handler = handler;
    cl->data = data;
    cl->dummy.fd = (ngx_socket_t) -1;

    cl->host.data = ngx_pnalloc(pool, host->len + 1);
    cl->in = ngx_create_temp_buf(pool, SG_CLIENT_IN_SIZE);

    if (cl->host.data == NULL || cl->in == NULL) {
        ngx_destroy_pool(pool);
        return NULL;
    }

    ngx_memcpy(cl->host.data, host->data, host->len);
    cl->host.data[host->len] = '\0';
    cl->host.len = host->len;

    cl->peer.sockaddr = ngx_pcalloc(pool, addr->socklen);
    if (cl->peer.sockaddr == NULL) {
        ngx_destroy_pool(pool);
        return NULL;
    }

    ngx_memcpy(cl->peer.sockaddr, addr->sockaddr, addr->socklen);
    cl->peer.socklen = addr->socklen;
    cl->peer.name = &cl->host;
    cl->peer.get = ngx_event_get_peer;
    cl->peer.log = cl->log;
    cl->peer.log_error = NGX_ERROR_ERR;

    sg_smtp_ehlo_init(&cl->ehlo);

    cl->post.handler = sg_client_post_handler;
    cl->post.data = &cl->dummy;
    cl->post.log = cl->log;
    cl->dummy.data = cl;

    cl->state = SG_CS_CONNECT;

    rc = ngx_event_connect_peer(&cl->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        if (cl->peer.connection) {
            ngx_close_connection(cl->peer.connection);
            cl->peer.connection = NULL;
        }

        cl->dead = 1;
        sg_client_fail(cl, SG_CLIENT_CONNECT, "cannot connect");
        return cl;
    }

    cl->c = cl->peer.connection;
    cl->c->data = cl;
    cl->c->pool = pool;
    cl->c->log = cl->log;
    cl->c->read->log = cl->log;
    cl->c->write->log = cl->log;
    cl->c->read->handler = sg_client_read_handler;
    cl->c->write->handler = sg_client_connect_handler;

    ngx_add_timer(cl->c->write, conf->connect_timeout);

    if (rc == NGX_OK) {
        /* connected at once (loopback) */
        sg_client_connect_handler(cl->c->write);
    }

    return cl;
}


static void
sg_client_connect_handler(ngx_event_t *wev)
{
    int                err;
    socklen_t          len;
    ngx_connection_t  *c;
    sg_client_t       *cl;

    c = wev->data;
    cl = c->data;

    if (wev->timedout) {
        sg_client_fail(cl, SG_CLIENT_CONNECT, "connection timed out");
        return;
    }

    if (wev->timer_set) {
        ngx_del_timer(wev);
    }

    err = 0;
    len = sizeof(int);

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1) {
        err = ngx_socket_errno;
    }

    if (err) {
        (void) ngx_connection_error(c, err, "connect() failed");
        sg_client_fail(cl, SG_CLIENT_CONNECT,
                       err == NGX_ECONNREFUSED ? "connection refused"
                                               : "cannot connect");
        return;
    }

    c->write->handler = sg_client_write_handler;

    sg_client_expect(cl, SG_CS_GREETING, cl->conf->command_timeout);

    if (c->read->ready) {
        sg_client_read_handler(c->read);
    }
}


/* wait for a reply in state */

static void
sg_client_expect(sg_client_t *cl, sg_client_state_e state,
    ngx_msec_t timeout)
{
    cl->state = state;
    cl->timeout = timeout;

    sg_smtp_reply_init(&cl->reply, NULL, NULL);

    if (state == SG_CS_EHLO || state == SG_CS_EHLO_TLS) {
        sg_smtp_ehlo_init(&cl->ehlo);
        sg_smtp_reply_init(&cl->reply, sg_smtp_ehlo_line, &cl->ehlo);
    }

    ngx_add_timer(cl->c->read, timeout);

    if (ngx_handle_read_event(cl->c->read, 0) != NGX_OK) {
        sg_client_fail(cl, SG_CLIENT_CLOSED, "cannot wait for a reply");
    }
}


static void
sg_client_read_handler(ngx_event_t *rev)
{
    size_t              used;
    ssize_t             n;
    ngx_connection_t   *c;
    sg_client_t        *cl;
    sg_smtp_reply_rc_e  rc;

    c = rev->data;
    cl = c->data;

    if (cl->state == SG_CS_QUIT) {
        sg_client_quit_handler(rev);
        return;
    }

    if (rev->timedout) {
        sg_client_fail(cl, SG_CLIENT_TIMEOUT, "no reply in time");
        return;
    }

    for ( ;; ) {

        /* replies already in the buffer first */

        while (cl->in->pos < cl->in->last) {

            if (cl->state == SG_CS_READY || cl->state == SG_CS_BODY
                || cl->state == SG_CS_CONNECT || cl->state == SG_CS_HANDSHAKE)
            {
                /* nothing is awaited: the peer talks out of turn */
                sg_client_fail(cl, SG_CLIENT_PROTOCOL,
                               "the server sent data nobody asked for");
                return;
            }

            rc = sg_smtp_reply_parse(&cl->reply, cl->in->pos,
                                     cl->in->last - cl->in->pos, &used);
            cl->in->pos += used;

            if (rc == SG_SMTP_REPLY_ERROR) {
                sg_client_fail(cl, SG_CLIENT_PROTOCOL,
                               cl->reply.error ? cl->reply.error
                                               : "malformed reply");
                return;
            }

            if (rc == SG_SMTP_REPLY_AGAIN) {
                break;
            }

            if (rev->timer_set) {
                ngx_del_timer(rev);
            }

            sg_client_reply(cl);

            if (cl->dead || cl->c == NULL || cl->state == SG_CS_QUIT) {
                return;
            }
        }

        if (cl->in->pos == cl->in->last) {
            cl->in->pos = cl->in->start;
            cl->in->last = cl->in->start;
        }

        if (cl->state == SG_CS_READY || cl->state == SG_CS_BODY
            || cl->state == SG_CS_HANDSHAKE)
        {
            /* nothing awaited now: the next read is the peer's */
            if (!rev->ready) {
                (void) ngx_handle_read_event(rev, 0);
                return;
            }
        }

        if (!rev->ready) {
            break;
        }

        n = c->recv(c, cl->in->last, cl->in->end - cl->in->last);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            sg_client_fail(cl, SG_CLIENT_CLOSED,
                           "the server closed the connection");
            return;
        }

        cl->in->last += n;
    }

    if (!rev->timer_set && cl->state != SG_CS_READY
        && cl->state != SG_CS_BODY)
    {
        ngx_add_timer(rev, cl->timeout);
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        sg_client_fail(cl, SG_CLIENT_CLOSED, "cannot read");
    }
}


/* one complete reply, by state */

static void
sg_client_reply(sg_client_t *cl)
{
    ngx_log_debug3(NGX_LOG_DEBUG_MAIL, cl->log, 0,
                   "sg client %V: state %d reply \"%s\"", &cl->host,
                   (int) cl->state, cl->reply.text);

    switch (cl->state) {

    case SG_CS_GREETING:
        sg_client_greeting(cl);
        break;

    case SG_CS_EHLO:
    case SG_CS_HELO:
    case SG_CS_EHLO_TLS:
        sg_client_ehlo_reply(cl);
        break;

    case SG_CS_STARTTLS:
        sg_client_starttls_reply(cl);
        break;

    case SG_CS_RSET:
        if (cl->reply.code / 100 != 2) {
            sg_client_txn_done(cl, SG_CLIENT_PROTOCOL);
            return;
        }

        cl->need_rset = 0;
        sg_client_mail(cl);
        break;

    case SG_CS_MAIL:
    case SG_CS_RCPT:
    case SG_CS_DATA:
        sg_client_txn_reply(cl);
        break;

    case SG_CS_DOT:
        sg_client_dot_reply(cl);
        break;

    default:
        sg_client_fail(cl, SG_CLIENT_PROTOCOL, "unexpected reply");
    }
}


static void
sg_client_greeting(sg_client_t *cl)
{
    u_char  line[300];
    size_t  n;

    if (cl->reply.code != 220) {
        sg_client_copy_reply(cl, &cl->info.reply);
        sg_client_fail(cl, SG_CLIENT_GREETING, "the greeting refuses mail");
        return;
    }

    n = ngx_snprintf(line, sizeof(line), "EHLO %V\r\n",
                     &cl->conf->helo_name) - line;

    if (sg_client_write(cl, (char *) line, n) != NGX_OK) {
        return;
    }

    sg_client_expect(cl, SG_CS_EHLO, cl->conf->command_timeout);
}


static void
sg_client_ehlo_reply(sg_client_t *cl)
{
    u_char  line[300];
    size_t  n;

    if (cl->reply.code == 250) {
        if (cl->state != SG_CS_HELO) {
            cl->info.esmtp = 1;
        }

        sg_client_after_ehlo(cl);
        return;
    }

    if (cl->state == SG_CS_EHLO && cl->reply.code / 100 == 5) {
        /* RFC 5321, 4.1.1.1 and 3.2: an old server: HELO */
        n = ngx_snprintf(line, sizeof(line), "HELO %V\r\n",
                         &cl->conf->helo_name) - line;

        if (sg_client_write(cl, (char *) line, n) != NGX_OK) {
            return;
        }

        sg_smtp_ehlo_init(&cl->ehlo);
        sg_client_expect(cl, SG_CS_HELO, cl->conf->command_timeout);
        sg_smtp_reply_init(&cl->reply, NULL, NULL);
        return;
    }

    sg_client_copy_reply(cl, &cl->info.reply);
    sg_client_fail(cl, SG_CLIENT_EHLO, "EHLO and HELO refused");
}


static void
sg_client_after_ehlo(sg_client_t *cl)
{
    unsigned  exts;

    exts = cl->info.esmtp ? cl->ehlo.exts : 0;

    cl->info.pipelining = (exts & SG_SMTP_EXT_PIPELINING) != 0;
    cl->info.eightbitmime = (exts & SG_SMTP_EXT_8BITMIME) != 0;
    cl->info.smtputf8 = (exts & SG_SMTP_EXT_SMTPUTF8) != 0;
    cl->info.dsn = (exts & SG_SMTP_EXT_DSN) != 0;
    cl->info.size_limit = (exts & SG_SMTP_EXT_SIZE) ? (off_t) cl->ehlo.size
                                                    : 0;

    if (cl->state == SG_CS_EHLO_TLS) {
        /* RFC 8689, 4.1: REQUIRETLS is listed after STARTTLS only */
        cl->info.requiretls = (exts & SG_SMTP_EXT_REQUIRETLS) != 0;

        if (cl->decision.need_requiretls && !cl->info.requiretls) {
            sg_client_fail(cl, SG_CLIENT_NO_REQUIRETLS,
                           "the server does not offer REQUIRETLS after"
                           " STARTTLS (RFC 8689, 4.1)");
            return;
        }

        sg_client_ready(cl);
        return;
    }

    cl->info.starttls_offered = (exts & SG_SMTP_EXT_STARTTLS) != 0;
    cl->facts.starttls_offered = cl->info.starttls_offered;

    if (cl->decision.level == SG_TLS_NONE) {
        sg_client_ready(cl);
        return;
    }

    if (!cl->info.starttls_offered) {
        if (cl->decision.level == SG_TLS_MAY) {
            sg_client_ready(cl);
            return;
        }

        cl->info.result_type = sg_smtp_tls_result_type(&cl->facts);
        sg_client_fail(cl, SG_CLIENT_NO_STARTTLS,
                       "STARTTLS is required but the server does not offer"
                       " it");
        return;
    }

    if (sg_client_write(cl, "STARTTLS\r\n", sizeof("STARTTLS\r\n") - 1)
        != NGX_OK)
    {
        return;
    }

    sg_client_expect(cl, SG_CS_STARTTLS, cl->conf->command_timeout);
}


static void
sg_client_starttls_reply(sg_client_t *cl)
{
    if (cl->reply.code != 220) {
        cl->facts.starttls_refused = 1;
        sg_client_copy_reply(cl, &cl->info.reply);

        cl->info.result_type = sg_smtp_tls_result_type(&cl->facts);

        if (cl->decision.level == SG_TLS_MAY) {
            /* opportunistic: the session goes on in clear */
            sg_client_ready(cl);
            return;
        }

        cl->info.result_type = sg_smtp_tls_result_type(&cl->facts);
        sg_client_fail(cl, SG_CLIENT_STARTTLS, "STARTTLS refused");
        return;
    }

    /*
     * NGINX-NOTES, RFC 3207, 4.2 and 6: bytes after the 220 and before
     * the handshake are an injection attempt
     */

    if (cl->in->pos < cl->in->last || cl->c->read->ready) {
        if (cl->in->pos == cl->in->last) {
            /* peek: is anything there already? */
            u_char   b;
            ssize_t  n;

            n = recv(cl->c->fd, &b, 1, MSG_PEEK);

            if (n <= 0) {
                goto handshake;
            }
        }

        sg_client_fail(cl, SG_CLIENT_PROTOCOL,
                       "the server sent data after its 220 to STARTTLS"
                       " (a STARTTLS injection)");
        return;
    }

handshake:

    sg_client_handshake(cl);
}


static void
sg_client_handshake(sg_client_t *cl)
{
    ngx_int_t          rc;
    ngx_connection_t  *c;
    struct in6_addr    a6;
    struct in_addr     a4;

    c = cl->c;
    cl->state = SG_CS_HANDSHAKE;
    cl->facts.tls_attempted = 1;

    if (ngx_ssl_create_connection(cl->conf->ssl, c,
                                  NGX_SSL_BUFFER|NGX_SSL_CLIENT)
        != NGX_OK)
    {
        sg_client_fail(cl, SG_CLIENT_HANDSHAKE, "cannot start TLS");
        return;
    }

    /* SNI, not for an IP literal (RFC 6066, 3) */

    if (inet_pton(AF_INET, (char *) cl->host.data, &a4) != 1
        && inet_pton(AF_INET6, (char *) cl->host.data, &a6) != 1)
    {
        if (SSL_set_tlsext_host_name(c->ssl->connection,
                                     (char *) cl->host.data)
            == 0)
        {
            sg_client_fail(cl, SG_CLIENT_HANDSHAKE, "cannot set SNI");
            return;
        }
    }

    c->log->action = "SSL handshaking to the next hop";

    ngx_add_timer(c->read, cl->conf->command_timeout);

    rc = ngx_ssl_handshake(c);

    if (rc == NGX_AGAIN) {
        c->ssl->handler = sg_client_handshake_done;
        return;
    }

    sg_client_handshake_done(c);
}


static void
sg_client_handshake_done(ngx_connection_t *c)
{
    sg_client_t  *cl;

    cl = c->data;

    c->log->action = NULL;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    c->read->handler = sg_client_read_handler;
    c->write->handler = sg_client_write_handler;

    if (c->ssl == NULL || !c->ssl->handshaked) {
        cl->info.result_type = sg_smtp_tls_result_type(&cl->facts);
        sg_client_fail(cl, SG_CLIENT_HANDSHAKE,
                       c->read->timedout || c->write->timedout
                       ? "the TLS handshake timed out"
                       : "the TLS handshake failed");
        return;
    }

    cl->facts.handshake_ok = 1;
    cl->info.tls = 1;

    sg_client_tls_facts(cl);

    if ((cl->decision.level == SG_TLS_VERIFY
         || cl->decision.level == SG_TLS_DANE)
        && (cl->info.verify_result != X509_V_OK || !cl->info.host_match))
    {
        sg_client_fail(cl, SG_CLIENT_VERIFY,
                       cl->info.verify_result != X509_V_OK
                       ? (char *) cl->info.tls_verify
                       : "the certificate does not name the host");
        return;
    }

    /* RFC 3207, 4.2: the EHLO after TLS; what was learned is forgotten */

    {
        u_char  line[300];
        size_t  n;

        n = ngx_snprintf(line, sizeof(line), "%s %V\r\n",
                         cl->info.esmtp ? "EHLO" : "HELO",
                         &cl->conf->helo_name) - line;

        if (sg_client_write(cl, (char *) line, n) != NGX_OK) {
            return;
        }
    }

    sg_client_expect(cl, SG_CS_EHLO_TLS, cl->conf->command_timeout);
}


static void
sg_client_tls_facts(sg_client_t *cl)
{
    long               v;
    X509              *cert;
    ngx_connection_t  *c;
    const char        *s;

    c = cl->c;

    s = SSL_get_version(c->ssl->connection);
    ngx_cpystrn(cl->info.tls_protocol, (u_char *) (s ? s : ""),
                sizeof(cl->info.tls_protocol));

    s = SSL_get_cipher_name(c->ssl->connection);
    ngx_cpystrn(cl->info.tls_cipher, (u_char *) (s ? s : ""),
                sizeof(cl->info.tls_cipher));

    cert = SSL_get_peer_certificate(c->ssl->connection);

    if (cert == NULL) {
        cl->info.verify_result = X509_V_ERR_UNSPECIFIED;
        cl->facts.cert = SG_SMTP_CERT_NONE;
        ngx_cpystrn(cl->info.tls_verify, (u_char *) "no certificate",
                    sizeof(cl->info.tls_verify));
        cl->info.result_type = sg_smtp_tls_result_type(&cl->facts);
        return;
    }

    X509_free(cert);

    v = SSL_get_verify_result(c->ssl->connection);
    cl->info.verify_result = v;

    ngx_cpystrn(cl->info.tls_verify,
                (u_char *) (v == X509_V_OK ? "ok"
                                           : X509_verify_cert_error_string(v)),
                sizeof(cl->info.tls_verify));

    cl->info.host_match = (ngx_ssl_check_host(c, &cl->host) == NGX_OK);
    cl->facts.host_match = cl->info.host_match;

    switch (v) {

    case X509_V_OK:
        cl->facts.cert = SG_SMTP_CERT_OK;
        break;

    case X509_V_ERR_CERT_HAS_EXPIRED:
    case X509_V_ERR_CERT_NOT_YET_VALID:
        cl->facts.cert = SG_SMTP_CERT_EXPIRED;
        break;

    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_CERT_UNTRUSTED:
        cl->facts.cert = SG_SMTP_CERT_UNTRUSTED;
        break;

    default:
        cl->facts.cert = SG_SMTP_CERT_INVALID;
    }

    cl->info.result_type = sg_smtp_tls_result_type(&cl->facts);
}


static void
sg_client_ready(sg_client_t *cl)
{
    cl->state = SG_CS_READY;
    cl->info.step = SG_CLIENT_OK;

    (void) ngx_handle_read_event(cl->c->read, 0);

    sg_client_post(cl, SG_CLIENT_CB_OPEN);
}


void
sg_client_send(sg_client_t *c, sg_client_txn_t *txn,
    sg_client_send_pt handler, void *data)
{
    sg_client_t  *cl = c;

    cl->txn = txn;
    cl->send_handler = handler;
    cl->data = data;
    cl->rcpt_sent = 0;
    cl->rcpt_replied = 0;
    cl->accepted = 0;
    cl->pipelined = 0;
    cl->body_pos = 0;

    txn->step = SG_CLIENT_OK;
    txn->delivered = 0;
    txn->data_sent = 0;
    ngx_memzero(&txn->mail_reply, sizeof(sg_client_reply_t));
    ngx_memzero(&txn->data_reply, sizeof(sg_client_reply_t));

    if (cl->dead || cl->state != SG_CS_READY) {
        txn->step = SG_CLIENT_CLOSED;
        sg_client_post(cl, SG_CLIENT_CB_SEND);
        return;
    }

    sg_client_begin(cl);
}


static void
sg_client_begin(sg_client_t *cl)
{
    if (cl->need_rset) {
        if (sg_client_write(cl, "RSET\r\n", sizeof("RSET\r\n") - 1)
            != NGX_OK)
        {
            return;
        }

        sg_client_expect(cl, SG_CS_RSET, cl->conf->command_timeout);
        return;
    }

    sg_client_mail(cl);
}


static void
sg_client_mail(sg_client_t *cl)
{
    char                 line[SG_SMTP_CMD_OUT_MAX];
    size_t               n;
    unsigned             exts;
    ngx_uint_t           i;
    const char          *detail;
    sg_smtp_mail_t       m;
    sg_client_txn_t     *txn;
    sg_smtp_build_rc_e   rc;

    txn = cl->txn;
    exts = cl->info.esmtp ? cl->ehlo.exts : 0;

    /* a REQUIRETLS session: the keyword as decided, the EHLO checked */
    if (cl->info.requiretls) {
        exts |= SG_SMTP_EXT_REQUIRETLS;
    }

    ngx_memzero(&m, sizeof(sg_smtp_mail_t));
    m.sender = (char *) txn->sender.data;
    m.sender_len = txn->sender.len;
    m.size = (uint64_t) txn->size;
    m.ret = (char *) txn->ret.data;
    m.ret_len = txn->ret.len;
    m.envid = (char *) txn->envid.data;
    m.envid_len = txn->envid.len;
    m.eightbit = txn->eightbit;
    m.requiretls = txn->requiretls;
    m.smtputf8 = txn->smtputf8
                 || sg_smtp_addr_utf8(m.sender, m.sender_len);

    for (i = 0; i < txn->nrcpts; i++) {
        m.smtputf8 |= sg_smtp_addr_utf8((char *) txn->rcpts[i].address.data,
                                        txn->rcpts[i].address.len);
    }

    detail = NULL;
    rc = sg_smtp_build_mail(&m, exts, line, sizeof(line), &n, &detail);

    if (rc != SG_SMTP_BUILD_OK) {
        /* nothing is sent: every recipient gets sg's own reply */
        ngx_memzero(&cl->txn->mail_reply, sizeof(sg_client_reply_t));

        if (rc == SG_SMTP_BUILD_NEED_SMTPUTF8) {
            /* RFC 6531, 3.2 */
            txn->mail_reply.code = 553;
            ngx_cpystrn(txn->mail_reply.status, (u_char *) "5.6.7", 16);
            ngx_cpystrn(txn->mail_reply.text, (u_char *)
                        "553 5.6.7 the next hop does not support SMTPUTF8",
                        SG_CLIENT_REPLY_MAX);

        } else if (rc == SG_SMTP_BUILD_NEED_REQUIRETLS) {
            txn->mail_reply.code = 550;
            ngx_cpystrn(txn->mail_reply.status, (u_char *) "5.7.30", 16);
            ngx_cpystrn(txn->mail_reply.text, (u_char *)
                        "550 5.7.30 REQUIRETLS is not supported by the next"
                        " hop (RFC 8689, 4.1)", SG_CLIENT_REPLY_MAX);

        } else {
            txn->mail_reply.code = 550;
            ngx_cpystrn(txn->mail_reply.status, (u_char *) "5.5.2", 16);
            ngx_snprintf(txn->mail_reply.text, SG_CLIENT_REPLY_MAX - 1,
                         "550 5.5.2 cannot send MAIL FROM: %s%Z",
                         detail ? detail : "invalid");
        }

        cl->state = SG_CS_READY;
        sg_client_post(cl, SG_CLIENT_CB_SEND);
        return;
    }

    cl->need_rset = 1;

    if (!cl->info.pipelining) {
        if (sg_client_write(cl, line, n) != NGX_OK) {
            return;
        }

        sg_client_expect(cl, SG_CS_MAIL, cl->conf->command_timeout);
        return;
    }

    /* RFC 2920, 3.1: MAIL, every RCPT and DATA in one group, one write */

    cl->corked = 1;

    if (sg_client_write(cl, line, n) != NGX_OK) {
        return;
    }

    for (i = 0; i < txn->nrcpts; i++) {
        if (sg_client_add_rcpt(cl, i) != NGX_OK) {
            return;
        }
    }

    if (sg_client_write(cl, "DATA\r\n", sizeof("DATA\r\n") - 1) != NGX_OK) {
        return;
    }

    cl->corked = 0;

    if (sg_client_flush(cl) == NGX_ERROR) {
        return;
    }

    cl->pipelined = 1;

    sg_client_expect(cl, SG_CS_MAIL, cl->conf->command_timeout);
}


static ngx_int_t
sg_client_add_rcpt(sg_client_t *cl, ngx_uint_t i)
{
    char                 line[SG_SMTP_CMD_OUT_MAX];
    size_t               n;
    unsigned             exts;
    const char          *detail;
    sg_smtp_rcpt_t       r;
    sg_client_rcpt_t    *rc;

    rc = &cl->txn->rcpts[i];
    exts = cl->info.esmtp ? cl->ehlo.exts : 0;

    ngx_memzero(&r, sizeof(sg_smtp_rcpt_t));
    r.address = (char *) rc->address.data;
    r.address_len = rc->address.len;
    r.notify = (char *) rc->notify.data;
    r.notify_len = rc->notify.len;
    r.orcpt = (char *) rc->orcpt.data;
    r.orcpt_len = rc->orcpt.len;

    detail = NULL;

    if (sg_smtp_build_rcpt(&r, exts, line, sizeof(line), &n, &detail)
        != SG_SMTP_BUILD_OK)
    {
        /* an address that cannot be written: a harmless RCPT it is not */
        n = ngx_snprintf((u_char *) line, sizeof(line), "RCPT TO:<>\r\n")
            - (u_char *) line;
    }

    cl->rcpt_sent++;

    return sg_client_write(cl, line, n);
}


/* replies to MAIL, RCPT and DATA, pipelined or not */

static void
sg_client_txn_reply(sg_client_t *cl)
{
    sg_client_txn_t   *txn;
    sg_client_rcpt_t  *r;

    txn = cl->txn;

    if (cl->state == SG_CS_MAIL) {
        sg_client_copy_reply(cl, &txn->mail_reply);

        if (cl->pipelined) {
            sg_client_expect(cl, txn->nrcpts ? SG_CS_RCPT : SG_CS_DATA,
                             cl->conf->command_timeout);
            return;
        }

        if (cl->reply.code / 100 != 2) {
            sg_client_txn_done(cl, SG_CLIENT_OK);
            return;
        }

        if (txn->nrcpts == 0) {
            sg_client_txn_done(cl, SG_CLIENT_OK);
            return;
        }

        if (sg_client_add_rcpt(cl, 0) != NGX_OK) {
            return;
        }

        sg_client_expect(cl, SG_CS_RCPT, cl->conf->command_timeout);
        return;
    }

    if (cl->state == SG_CS_RCPT) {
        r = &txn->rcpts[cl->rcpt_replied++];
        sg_client_copy_reply(cl, &r->reply);

        r->accepted = (cl->reply.code / 100 == 2
                       && txn->mail_reply.code / 100 == 2);
        cl->accepted += r->accepted;

        if (cl->rcpt_replied < txn->nrcpts) {
            if (!cl->pipelined
                && sg_client_add_rcpt(cl, cl->rcpt_replied) != NGX_OK)
            {
                return;
            }

            sg_client_expect(cl, SG_CS_RCPT, cl->conf->command_timeout);
            return;
        }

        if (cl->pipelined) {
            sg_client_expect(cl, SG_CS_DATA, cl->conf->data_init_timeout);
            return;
        }

        if (cl->accepted == 0) {
            sg_client_txn_done(cl, SG_CLIENT_OK);
            return;
        }

        if (sg_client_write(cl, "DATA\r\n", sizeof("DATA\r\n") - 1)
            != NGX_OK)
        {
            return;
        }

        sg_client_expect(cl, SG_CS_DATA, cl->conf->data_init_timeout);
        return;
    }

    sg_client_data_reply(cl);
}


static void
sg_client_data_reply(sg_client_t *cl)
{
    sg_client_txn_t  *txn;

    txn = cl->txn;

    if (cl->reply.code != 354) {
        sg_client_copy_reply(cl, &txn->data_reply);
        sg_client_txn_done(cl, SG_CLIENT_OK);
        return;
    }

    if (cl->accepted == 0) {
        /*
         * RFC 2920, 3.1: DATA was accepted although no recipient was:
         * end the (empty) message and ignore the result
         */
        if (sg_client_write(cl, ".\r\n", 3) != NGX_OK) {
            return;
        }

        txn->data_reply.code = 0;
        cl->txn->step = SG_CLIENT_OK;
        cl->accepted = 0;
        sg_client_expect(cl, SG_CS_DOT, cl->conf->data_done_timeout);
        return;
    }

    sg_smtp_dot_init(&cl->dot);
    cl->body_pos = 0;
    cl->dot_done = 0;
    cl->state = SG_CS_BODY;

    if (cl->out == NULL) {
        cl->out = ngx_create_temp_buf(cl->pool, SG_CLIENT_BODY_CHUNK);
        if (cl->out == NULL) {
            sg_client_fail(cl, SG_CLIENT_CLOSED, "out of memory");
            return;
        }
    }

    sg_client_body(cl);
}


/* the message, chunk by chunk, dot-stuffed, then the final "." */

static void
sg_client_body(sg_client_t *cl)
{
    size_t            used;
    sg_client_txn_t  *txn;

    txn = cl->txn;

    for ( ;; ) {

        if (cl->out->pos < cl->out->last) {
            if (sg_client_flush(cl) != NGX_OK) {
                /* NGX_AGAIN: the write handler comes back here */
                return;
            }
        }

        cl->out->pos = cl->out->start;
        cl->out->last = cl->out->start;

        if (cl->body_pos < txn->body_len) {
            cl->out->last += sg_smtp_dot_encode(&cl->dot,
                                                txn->body + cl->body_pos,
                                                txn->body_len - cl->body_pos,
                                                cl->out->last,
                                                cl->out->end - cl->out->last,
                                                &used);
            cl->body_pos += used;
            continue;
        }

        if (!cl->dot_done) {
            cl->out->last += sg_smtp_dot_finish(&cl->dot, cl->out->last,
                                                cl->out->end - cl->out->last);
            cl->dot_done = 1;
            continue;
        }

        /* the message and its "." are written */
        txn->data_sent = 1;
        sg_client_expect(cl, SG_CS_DOT, cl->conf->data_done_timeout);
        return;
    }
}


static void
sg_client_dot_reply(sg_client_t *cl)
{
    ngx_uint_t        i;
    sg_client_txn_t  *txn;

    txn = cl->txn;

    if (cl->accepted == 0) {
        /* the end of an empty message (RFC 2920, 3.1): not a result */
        sg_client_txn_done(cl, SG_CLIENT_OK);
        return;
    }

    sg_client_copy_reply(cl, &txn->data_reply);

    for (i = 0; i < txn->nrcpts; i++) {
        if (txn->rcpts[i].accepted) {
            txn->rcpts[i].reply = txn->data_reply;

            if (cl->reply.code / 100 == 2) {
                txn->delivered++;
            }
        }
    }

    if (cl->reply.code / 100 == 2) {
        /* the transaction is over: no RSET needed before the next one */
        cl->need_rset = 0;
    }

    sg_client_txn_done(cl, SG_CLIENT_OK);
}


static void
sg_client_txn_done(sg_client_t *cl, sg_client_step_e step)
{
    cl->txn->step = step;

    if (step != SG_CLIENT_OK) {
        sg_client_fail(cl, step, "the transaction failed");
        return;
    }

    cl->state = SG_CS_READY;
    (void) ngx_handle_read_event(cl->c->read, 0);

    sg_client_post(cl, SG_CLIENT_CB_SEND);
}


/* append to the output and write what can be written now */

static ngx_int_t
sg_client_write(sg_client_t *cl, const char *data, size_t len)
{
    size_t      size;
    ngx_buf_t  *b;

    b = cl->out;

    if (b == NULL || (size_t) (b->end - b->last) < len) {
        size = ngx_max(SG_CLIENT_BODY_CHUNK, (b ? b->last - b->pos : 0) + len);

        b = ngx_create_temp_buf(cl->pool, size);
        if (b == NULL) {
            sg_client_fail(cl, SG_CLIENT_CLOSED, "out of memory");
            return NGX_ERROR;
        }

        if (cl->out) {
            b->last = ngx_cpymem(b->last, cl->out->pos,
                                 cl->out->last - cl->out->pos);
        }

        cl->out = b;
    }

    if (b->pos == b->last) {
        b->pos = b->start;
        b->last = b->start;
    }

    b->last = ngx_cpymem(b->last, data, len);

    if (cl->corked) {
        return NGX_OK;
    }

    return sg_client_flush(cl) == NGX_ERROR ? NGX_ERROR : NGX_OK;
}


static ngx_int_t
sg_client_flush(sg_client_t *cl)
{
    ssize_t            n;
    ngx_buf_t         *b;
    ngx_connection_t  *c;

    c = cl->c;
    b = cl->out;

    while (b->pos < b->last) {
        n = c->send(c, b->pos, b->last - b->pos);

        if (n == NGX_ERROR) {
            sg_client_fail(cl, SG_CLIENT_CLOSED,
                           "the connection failed while sending");
            return NGX_ERROR;
        }

        if (n == NGX_AGAIN || n == 0) {
            if (!c->write->timer_set) {
                ngx_add_timer(c->write, cl->state == SG_CS_BODY
                                        ? cl->conf->data_block_timeout
                                        : cl->conf->command_timeout);
            }

            if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                sg_client_fail(cl, SG_CLIENT_CLOSED, "cannot write");
                return NGX_ERROR;
            }

            return NGX_AGAIN;
        }

        b->pos += n;
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    return NGX_OK;
}


static void
sg_client_write_handler(ngx_event_t *wev)
{
    ngx_connection_t  *c;
    sg_client_t       *cl;

    c = wev->data;
    cl = c->data;

    if (cl->state == SG_CS_QUIT) {
        sg_client_quit_handler(wev);
        return;
    }

    if (wev->timedout) {
        sg_client_fail(cl, SG_CLIENT_TIMEOUT, "the server does not read");
        return;
    }

    if (cl->out == NULL || cl->out->pos == cl->out->last) {
        (void) ngx_handle_write_event(wev, 0);
        return;
    }

    if (sg_client_flush(cl) != NGX_OK) {
        return;
    }

    if (cl->state == SG_CS_BODY) {
        sg_client_body(cl);
    }
}


/* the connection is unusable: close it, tell the owner */

static void
sg_client_fail(sg_client_t *cl, sg_client_step_e step, const char *reason)
{
    if (cl->dead && cl->cb != SG_CLIENT_CB_NONE) {
        return;
    }

    ngx_log_debug3(NGX_LOG_DEBUG_MAIL, cl->log, 0,
                   "sg client %V: failed at step %d: %s", &cl->host,
                   (int) step, reason);

    if (cl->info.reason == NULL || cl->info.step == SG_CLIENT_OK) {
        cl->info.reason = reason;
    }

    if (cl->c) {
        if (cl->c->ssl) {
            cl->c->ssl->no_wait_shutdown = 1;
            cl->c->ssl->no_send_shutdown = 1;
            (void) ngx_ssl_shutdown(cl->c);
        }

        ngx_close_connection(cl->c);
        cl->c = NULL;
    }

    cl->dead = 1;

    if (cl->txn && cl->state >= SG_CS_RSET && cl->state <= SG_CS_DOT) {
        cl->txn->step = step;
        cl->info.step = step;
        cl->state = SG_CS_CLOSED;
        sg_client_post(cl, SG_CLIENT_CB_SEND);
        return;
    }

    if (cl->state < SG_CS_READY) {
        cl->info.step = step;
        cl->state = SG_CS_CLOSED;
        sg_client_post(cl, SG_CLIENT_CB_OPEN);
        return;
    }

    /* idle (READY) or closing: nobody waits; the owner learns on send */
    cl->info.step = step;
    cl->state = SG_CS_CLOSED;

    if (cl->close_asked && !cl->in_handler) {
        sg_client_free(cl);
    }
}


static void
sg_client_copy_reply(sg_client_t *cl, sg_client_reply_t *r)
{
    r->code = cl->reply.code;
    ngx_cpystrn(r->status, (u_char *) cl->reply.status, sizeof(r->status));
    ngx_cpystrn(r->text, (u_char *) cl->reply.text, sizeof(r->text));
}


static void
sg_client_post(sg_client_t *cl, sg_client_cb_e cb)
{
    cl->cb = cb;
    ngx_post_event(&cl->post, &ngx_posted_events);
}


static void
sg_client_post_handler(ngx_event_t *ev)
{
    sg_client_t     *cl;
    sg_client_cb_e   cb;

    cl = ((ngx_connection_t *) ev->data)->data;

    cb = cl->cb;
    cl->cb = SG_CLIENT_CB_NONE;

    cl->in_handler = 1;

    if (cb == SG_CLIENT_CB_OPEN) {
        cl->open_handler(cl->data, cl, &cl->info);

    } else if (cb == SG_CLIENT_CB_SEND) {
        cl->send_handler(cl->data, cl, cl->txn);
    }

    cl->in_handler = 0;

    if (cl->close_asked) {
        if (cl->cb != SG_CLIENT_CB_NONE) {
            ngx_delete_posted_event(&cl->post);
            cl->cb = SG_CLIENT_CB_NONE;
        }

        if (!cl->dead) {
            sg_client_shutdown(cl);
            return;
        }

        sg_client_free(cl);
        return;
    }

    if (cl->dead && cl->cb == SG_CLIENT_CB_NONE) {
        /* a failed connection belongs to nobody after its handler */
        sg_client_free(cl);
    }
}


void
sg_client_close(sg_client_t *c)
{
    sg_client_t  *cl = c;

    if (cl == NULL || cl->close_asked) {
        return;
    }

    cl->close_asked = 1;

    if (cl->in_handler) {
        /* after the handler returns (sg_client_post_handler) */
        return;
    }

    if (cl->cb != SG_CLIENT_CB_NONE) {
        /* a callback is posted: never call it */
        ngx_delete_posted_event(&cl->post);
        cl->cb = SG_CLIENT_CB_NONE;
    }

    if (cl->dead) {
        sg_client_free(cl);
        return;
    }

    sg_client_shutdown(cl);
}


/* QUIT when the connection is idle, then close; never calls back */

static void
sg_client_shutdown(sg_client_t *cl)
{
    ngx_connection_t  *c;

    c = cl->c;

    if (c == NULL || cl->state != SG_CS_READY) {
        if (c) {
            if (c->ssl) {
                c->ssl->no_wait_shutdown = 1;
                c->ssl->no_send_shutdown = 1;
                (void) ngx_ssl_shutdown(c);
            }

            ngx_close_connection(c);
            cl->c = NULL;
        }

        cl->dead = 1;
        sg_client_free(cl);
        return;
    }

    cl->state = SG_CS_QUIT;

    if (cl->out) {
        cl->out->pos = cl->out->start;
        cl->out->last = cl->out->start;
    }

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    c->read->cancelable = 1;
    ngx_add_timer(c->read, SG_CLIENT_QUIT_WAIT);

    if (c->send(c, (u_char *) "QUIT\r\n", 6) != 6) {
        sg_client_quit_handler(c->read);
        return;
    }

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        sg_client_quit_handler(c->read);
    }
}


static void
sg_client_quit_handler(ngx_event_t *ev)
{
    u_char             buf[512];
    ngx_connection_t  *c;
    sg_client_t       *cl;

    c = ev->data;
    cl = c->data;

    if (!ev->timedout && ev == c->read && c->read->ready) {
        /* the 221, or anything: read it and close */
        (void) c->recv(c, buf, sizeof(buf));
    }

    if (c->ssl) {
        c->ssl->no_wait_shutdown = 1;
        c->ssl->no_send_shutdown = 1;
        (void) ngx_ssl_shutdown(c);
    }

    ngx_close_connection(c);
    cl->c = NULL;
    cl->dead = 1;

    sg_client_free(cl);
}


static void
sg_client_free(sg_client_t *cl)
{
    if (cl->freed) {
        return;
    }

    cl->freed = 1;
    ngx_queue_remove(&cl->link);

    if (cl->post.posted) {
        ngx_delete_posted_event(&cl->post);
    }

    if (cl->c) {
        if (cl->c->ssl) {
            cl->c->ssl->no_wait_shutdown = 1;
            cl->c->ssl->no_send_shutdown = 1;
            (void) ngx_ssl_shutdown(cl->c);
        }

        ngx_close_connection(cl->c);
        cl->c = NULL;
    }

    ngx_destroy_pool(cl->pool);
}


void
sg_client_abort_all(void)
{
    ngx_queue_t  *q;
    sg_client_t  *cl;

    if (sg_clients.next == NULL) {
        return;
    }

    while (!ngx_queue_empty(&sg_clients)) {
        q = ngx_queue_head(&sg_clients);
        cl = ngx_queue_data(q, sg_client_t, link);
        sg_client_free(cl);
    }
}


sg_client_info_t *
sg_client_info(sg_client_t *c)
{
    return &c->info;
}


ngx_ssl_t *
sg_client_ssl_create(ngx_cycle_t *cycle, ngx_str_t *trusted_ca)
{
    ngx_ssl_t  *ssl;

    ssl = ngx_pcalloc(cycle->pool, sizeof(ngx_ssl_t));
    if (ssl == NULL) {
        return NULL;
    }

    ssl->log = cycle->log;

    if (ngx_ssl_create(ssl, NGX_SSL_TLSv1_2|NGX_SSL_TLSv1_3, NULL)
        != NGX_OK)
    {
        return NULL;
    }

    /* NGINX-NOTES: nginx never loads the system store; public MX need it */
    if (SSL_CTX_set_default_verify_paths(ssl->ctx) != 1) {
        ngx_ssl_error(NGX_LOG_WARN, cycle->log, 0,
                      "sg: cannot load the system CA store");
    }

    if (trusted_ca && trusted_ca->len) {
        if (SSL_CTX_load_verify_locations(ssl->ctx,
                                          (char *) trusted_ca->data, NULL)
            != 1)
        {
            ngx_ssl_error(NGX_LOG_EMERG, cycle->log, 0,
                          "sg: cannot load \"sg_trusted_ca\" \"%V\"",
                          trusted_ca);
            return NULL;
        }
    }

    /* the result is read after the handshake and decided by policy */
    SSL_CTX_set_verify(ssl->ctx, SSL_VERIFY_PEER, sg_client_verify_callback);
    SSL_CTX_set_verify_depth(ssl->ctx, 10);

    return ssl;
}


/* verification never stops a handshake: the decision reads the result */

static int
sg_client_verify_callback(int ok, X509_STORE_CTX *x509_store)
{
    return 1;
}
