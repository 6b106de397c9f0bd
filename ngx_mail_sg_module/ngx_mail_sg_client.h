/*
 * sg: one outbound SMTP connection (the delivery engine's client).
 *
 * sg_client_open() connects to one address, reads the greeting, says EHLO
 * (HELO when EHLO is refused), does STARTTLS as the TLS decision says and
 * EHLO again; sg_client_send() runs one mail transaction on a ready
 * connection (any number of them, one after the other);
 * sg_client_close() says QUIT (when the connection is usable) and frees
 * everything.  Each handler is called exactly once per call, never from
 * inside the call that started it.  The engine decides what to do with
 * the outcome (next MX, defer, bounce, retry in clear); the client only
 * reports facts.
 */

#ifndef _NGX_MAIL_SG_CLIENT_H_INCLUDED_
#define _NGX_MAIL_SG_CLIENT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "sg_tls_policy.h"


#define SG_CLIENT_REPLY_MAX   512       /* reply text kept, octets */


typedef struct sg_client_s  sg_client_t;


/* the worker's outbound settings, shared by every connection */
typedef struct {
    ngx_str_t            helo_name;
    ngx_ssl_t           *ssl;              /* client context: TLS 1.2+,
                                              system CAs + sg_trusted_ca */
    ngx_msec_t           connect_timeout;
    ngx_msec_t           command_timeout;  /* greeting, EHLO, MAIL, RCPT,
                                              STARTTLS, RSET, QUIT: 5m */
    ngx_msec_t           data_init_timeout;    /* DATA -> 354: 2m */
    ngx_uint_t           closing;          /* connections saying QUIT:
                                              still open, no longer the
                                              caller's */
    void               (*closed)(void);    /* one of them is closed */
    ngx_msec_t           data_block_timeout;   /* each write: 3m */
    ngx_msec_t           data_done_timeout;    /* "." -> reply: 10m */
    ngx_log_t           *log;
} sg_client_conf_t;


/* how far a connection got; the failure is at that step */
typedef enum {
    SG_CLIENT_OK = 0,
    SG_CLIENT_CONNECT,         /* refused, unreachable, timeout */
    SG_CLIENT_GREETING,        /* 4xx/5xx greeting, or none */
    SG_CLIENT_EHLO,            /* EHLO and HELO refused */
    SG_CLIENT_NO_STARTTLS,     /* the decision needs TLS, not offered */
    SG_CLIENT_STARTTLS,        /* STARTTLS refused (4xx/5xx) */
    SG_CLIENT_HANDSHAKE,       /* the TLS handshake failed */
    SG_CLIENT_VERIFY,          /* the certificate failed the decision's
                                  verification (level verify) */
    SG_CLIENT_NO_REQUIRETLS,   /* decision.need_requiretls, not offered */
    SG_CLIENT_PROTOCOL,        /* a malformed reply, bytes injected
                                  before the handshake ... */
    SG_CLIENT_TIMEOUT,         /* no reply in time */
    SG_CLIENT_CLOSED           /* the peer closed the connection */
} sg_client_step_e;


/* an SMTP reply as received: "451 4.3.0 text" */
typedef struct {
    ngx_uint_t           code;             /* 0: none (connection failed) */
    u_char               status[16];       /* "4.3.0" or "" */
    u_char               text[SG_CLIENT_REPLY_MAX];  /* the whole reply,
                                              lines joined with " / ",
                                              NUL-terminated */
} sg_client_reply_t;


/* what sg_client_open() learned: for the queue, logs and TLS reports */
typedef struct {
    sg_client_step_e     step;             /* SG_CLIENT_OK: ready */
    sg_client_reply_t    reply;            /* the failing reply, if any */
    const char          *reason;           /* for people */

    unsigned             esmtp:1;          /* EHLO accepted */
    unsigned             starttls_offered:1;
    unsigned             tls:1;            /* the session is encrypted */
    unsigned             pipelining:1;
    unsigned             eightbitmime:1;
    unsigned             smtputf8:1;
    unsigned             dsn:1;
    unsigned             requiretls:1;     /* listed after STARTTLS */
    unsigned             host_match:1;     /* certificate names the host */
    unsigned             transient:1;      /* SG_CLIENT_HANDSHAKE: timed
                                              out, or the peer closed or
                                              reset the connection; not a
                                              TLS protocol failure */
    off_t                size_limit;       /* SIZE n; 0: none given */

    u_char               tls_protocol[16]; /* "TLSv1.3" */
    u_char               tls_cipher[64];
    u_char               tls_verify[128];  /* "ok" or OpenSSL's reason */
    long                 verify_result;    /* X509_V_OK ... */
    const char          *result_type;      /* RFC 8460, 4.3; NULL: no
                                              TLS failure */
} sg_client_info_t;


typedef struct {
    ngx_str_t            address;          /* RCPT TO */
    ngx_str_t            notify;           /* NOTIFY= value, "" absent */
    ngx_str_t            orcpt;            /* ORCPT= value as received
                                              (addr-type;xtext), "" absent */
    sg_client_reply_t    reply;            /* RCPT reply, or the DATA reply
                                              for accepted recipients */
    unsigned             accepted:1;       /* 250 to RCPT */
} sg_client_rcpt_t;


typedef struct {
    ngx_str_t            sender;           /* "" for <> */
    off_t                size;
    unsigned             eightbit:1;       /* BODY=8BITMIME */
    unsigned             smtputf8:1;       /* needs SMTPUTF8 */
    unsigned             requiretls:1;     /* MAIL ... REQUIRETLS */
    ngx_str_t            ret;              /* "FULL", "HDRS" or "" */
    ngx_str_t            envid;            /* xtext as received, or "" */

    sg_client_rcpt_t    *rcpts;
    ngx_uint_t           nrcpts;

    u_char              *body;             /* the stored message, CRLF */
    size_t               body_len;

    /* the outcome, set before the handler runs */
    sg_client_step_e     step;             /* SG_CLIENT_OK: the transaction
                                              ended with a reply; else the
                                              connection failed in it */
    sg_client_reply_t    mail_reply;       /* MAIL FROM's reply */
    sg_client_reply_t    data_reply;       /* DATA or final "." reply */
    ngx_uint_t           delivered;        /* recipients the final reply
                                              accepted */
    unsigned             data_sent:1;      /* the final "." was sent: a
                                              lost reply may mean it was
                                              delivered (RFC 1047) */
} sg_client_txn_t;


typedef void (*sg_client_open_pt)(void *data, sg_client_t *c,
    sg_client_info_t *info);
typedef void (*sg_client_send_pt)(void *data, sg_client_t *c,
    sg_client_txn_t *txn);


/*
 * host: the name to greet with SNI and to verify the certificate against
 * (an IP literal: no SNI); addr: where to connect, port included.  The
 * decision's level says what TLS is needed:
 *   none     no STARTTLS;
 *   may      STARTTLS when offered, any certificate; a failed handshake
 *            is reported (SG_CLIENT_HANDSHAKE) for the engine to decide;
 *   encrypt  STARTTLS must succeed, any certificate;
 *   verify   STARTTLS must succeed and the certificate chain to a trusted
 *            CA and name the host;
 *   dane     as verify until DANE lands.
 * With decision->need_requiretls the post-TLS EHLO must list REQUIRETLS.
 *
 * NULL: out of memory.  Otherwise handler runs once with the result:
 * with info->step == SG_CLIENT_OK, c is ready for sg_client_send();
 * otherwise c is already closed and must not be used.
 */
sg_client_t *sg_client_open(sg_client_conf_t *conf, ngx_str_t *host,
    ngx_addr_t *addr, sg_tls_decision_t *decision,
    sg_client_open_pt handler, void *data);

/*
 * One transaction: MAIL FROM (SIZE, BODY, SMTPUTF8, RET, ENVID, REQUIRETLS
 * as the peer supports them), RCPT TO (NOTIFY, ORCPT when it supports
 * DSN), DATA with dot-stuffing and CRLF line ends (never a bare CR or LF),
 * pipelined when offered.  RSET first when the previous one failed.
 * When txn->step != SG_CLIENT_OK the connection is closed: do not use c.
 */
void sg_client_send(sg_client_t *c, sg_client_txn_t *txn,
    sg_client_send_pt handler, void *data);

/* QUIT (when usable) and free, now or soon; never calls back */
void sg_client_close(sg_client_t *c);

/*
 * The worker exits: close every connection now, free everything, call
 * nothing back (exit_process).
 */
void sg_client_abort_all(void);

/* the info of an open connection (for attempts recorded later) */
sg_client_info_t *sg_client_info(sg_client_t *c);


/* an SSL client context for sg_client_conf_t.ssl (init_process) */
ngx_ssl_t *sg_client_ssl_create(ngx_cycle_t *cycle, ngx_str_t *trusted_ca);


#endif /* _NGX_MAIL_SG_CLIENT_H_INCLUDED_ */
