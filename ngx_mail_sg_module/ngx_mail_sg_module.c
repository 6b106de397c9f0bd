/*
 * sg: the SMTP receiving protocol ("protocol sg_smtp;" in a mail server).
 *
 * accept -> (reverse DNS) -> greeting -> read a command line -> parse it
 * (common/sg_smtp_cmd) -> handle it -> collect the reply; the replies of
 * all pipelined commands go out in one write.  DATA streams through
 * common/sg_smtp_data into memory (64 KiB at most) and then a temporary
 * file; the message and its recipients are committed to PostgreSQL before
 * the 250 (ngx_mail_sg_queue.c).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_sg.h"


static void ngx_mail_sg_init_session(ngx_mail_session_t *s,
    ngx_connection_t *c);
static void ngx_mail_sg_resolved(ngx_resolver_ctx_t *rctx);
static void ngx_mail_sg_confirmed(ngx_resolver_ctx_t *rctx);
static ngx_uint_t ngx_mail_sg_host_valid(ngx_str_t *name);
static void ngx_mail_sg_greet(ngx_mail_session_t *s, ngx_connection_t *c);
static void ngx_mail_sg_greeting_delay(ngx_event_t *rev);
static void ngx_mail_sg_block_reading(ngx_event_t *rev);
static void ngx_mail_sg_init_protocol(ngx_event_t *rev);
static ngx_int_t ngx_mail_sg_parse_command(ngx_mail_session_t *s);
static void ngx_mail_sg_command(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    u_char *line, size_t len);
static void ngx_mail_sg_ehlo(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd);
static void ngx_mail_sg_mail(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd);
static void ngx_mail_sg_rcpt(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd);
static void ngx_mail_sg_data(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx);
static void ngx_mail_sg_starttls(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
static ngx_uint_t ngx_mail_sg_starttls_offered(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
static ngx_int_t ngx_mail_sg_begin(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
static void ngx_mail_sg_cleanup(void *data);
static ngx_int_t ngx_mail_sg_copy(ngx_pool_t *pool, ngx_str_t *dst,
    const sg_str_t *src);
static void *ngx_mail_sg_create_srv_conf(ngx_conf_t *cf);
static char *ngx_mail_sg_merge_srv_conf(ngx_conf_t *cf, void *parent,
    void *child);


static ngx_mail_protocol_t  ngx_mail_sg_protocol = {
    ngx_string("sg_smtp"),
    ngx_string("\x04smtp"),
    { 0, 0, 0, 0 },
    NGX_MAIL_SMTP_PROTOCOL,

    ngx_mail_sg_init_session,
    ngx_mail_sg_init_protocol,
    ngx_mail_sg_parse_command,
    ngx_mail_sg_read_handler,

    ngx_string("451 4.3.0 Internal server error" CRLF),
    ngx_string("421 4.7.1 SSL certificate error" CRLF),
    ngx_string("421 4.7.1 No required SSL certificate" CRLF)
};


static ngx_conf_enum_t  ngx_mail_sg_bare_line_ends[] = {
    { ngx_string("reject"), 0 },
    { ngx_string("normalize"), 1 },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_mail_sg_commands[] = {

    { ngx_string("sg_smtp_max_line_length"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, max_line),
      NULL },

    { ngx_string("sg_smtp_max_message_size"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_off_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, max_message_size),
      NULL },

    { ngx_string("sg_smtp_max_recipients"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, max_recipients),
      NULL },

    { ngx_string("sg_smtp_max_header_size"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, max_header_size),
      NULL },

    { ngx_string("sg_smtp_max_headers"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, max_headers),
      NULL },

    { ngx_string("sg_smtp_command_timeout"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, command_timeout),
      NULL },

    { ngx_string("sg_smtp_data_timeout"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, data_timeout),
      NULL },

    { ngx_string("sg_smtp_greeting_delay"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, greeting_delay),
      NULL },

    { ngx_string("sg_smtp_bare_line_ends"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, normalize),
      &ngx_mail_sg_bare_line_ends },

    { ngx_string("sg_smtp_temp_path"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1234,
      ngx_conf_set_path_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, temp_path),
      NULL },

      ngx_null_command
};


static ngx_mail_module_t  ngx_mail_sg_module_ctx = {
    &ngx_mail_sg_protocol,                 /* protocol */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    ngx_mail_sg_create_srv_conf,           /* create server configuration */
    ngx_mail_sg_merge_srv_conf             /* merge server configuration */
};


ngx_module_t  ngx_mail_sg_module = {
    NGX_MODULE_V1,
    &ngx_mail_sg_module_ctx,               /* module context */
    ngx_mail_sg_commands,                  /* module directives */
    NGX_MAIL_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_path_init_t  ngx_mail_sg_temp_path = {
    ngx_string("sg_smtp_temp"), { 1, 2, 0 }
};


/* accept: reverse DNS when a resolver is configured, then the greeting */

static void
ngx_mail_sg_init_session(ngx_mail_session_t *s, ngx_connection_t *c)
{
    ngx_resolver_ctx_t        *rctx;
    ngx_pool_cleanup_t        *cln;
    ngx_mail_sg_ctx_t         *ctx;
    ngx_mail_core_srv_conf_t  *cscf;

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    ctx = ngx_pcalloc(c->pool, sizeof(ngx_mail_sg_ctx_t));
    if (ctx == NULL) {
        ngx_mail_close_connection(c);
        return;
    }

    ctx->out = ngx_create_temp_buf(c->pool, NGX_MAIL_SG_OUT_SIZE);
    if (ctx->out == NULL) {
        ngx_mail_close_connection(c);
        return;
    }

    cln = ngx_pool_cleanup_add(c->pool, 0);
    if (cln == NULL) {
        ngx_mail_close_connection(c);
        return;
    }

    cln->handler = ngx_mail_sg_cleanup;
    cln->data = ctx;

    ctx->session = s;
    ngx_mail_set_ctx(s, ctx, ngx_mail_sg_module);

    if (cscf->resolver == NULL
#if (NGX_HAVE_UNIX_DOMAIN)
        || c->sockaddr->sa_family == AF_UNIX
#endif
       )
    {
        ngx_mail_sg_greet(s, c);
        return;
    }

    c->log->action = "in resolving client address";

    rctx = ngx_resolve_start(cscf->resolver, NULL);
    if (rctx == NULL) {
        ngx_mail_close_connection(c);
        return;
    }

    rctx->addr.sockaddr = c->sockaddr;
    rctx->addr.socklen = c->socklen;
    rctx->handler = ngx_mail_sg_resolved;
    rctx->data = s;
    rctx->timeout = cscf->resolver_timeout;

    s->resolver_ctx = rctx;
    c->read->handler = ngx_mail_sg_block_reading;

    if (ngx_resolve_addr(rctx) != NGX_OK) {
        ngx_mail_close_connection(c);
    }
}


static void
ngx_mail_sg_resolved(ngx_resolver_ctx_t *rctx)
{
    ngx_connection_t          *c;
    ngx_mail_session_t        *s;
    ngx_mail_core_srv_conf_t  *cscf;

    s = rctx->data;
    c = s->connection;

    if (rctx->state) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "%V has no host name (%i: %s)", &c->addr_text,
                      rctx->state, ngx_resolver_strerror(rctx->state));
        goto greet;
    }

    if (!ngx_mail_sg_host_valid(&rctx->name)) {
        /* the name goes into Received: and the log: LDH only */
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "%V has an invalid host name", &c->addr_text);
        goto greet;
    }

    s->host.data = ngx_pstrdup(c->pool, &rctx->name);
    if (s->host.data == NULL) {
        goto greet;
    }

    s->host.len = rctx->name.len;

    ngx_resolve_addr_done(rctx);
    s->resolver_ctx = NULL;

    /* forward-confirm the name before trusting it (the whitelist) */

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    rctx = ngx_resolve_start(cscf->resolver, NULL);
    if (rctx == NULL || rctx == NGX_NO_RESOLVER) {
        ngx_str_null(&s->host);
        ngx_mail_sg_greet(s, c);
        return;
    }

    rctx->name = s->host;
    rctx->handler = ngx_mail_sg_confirmed;
    rctx->data = s;
    rctx->timeout = cscf->resolver_timeout;

    s->resolver_ctx = rctx;

    if (ngx_resolve_name(rctx) != NGX_OK) {
        s->resolver_ctx = NULL;
        ngx_str_null(&s->host);
        ngx_mail_sg_greet(s, c);
    }

    return;

greet:

    ngx_resolve_addr_done(rctx);
    s->resolver_ctx = NULL;

    ngx_mail_sg_greet(s, c);
}


static void
ngx_mail_sg_confirmed(ngx_resolver_ctx_t *rctx)
{
    ngx_uint_t           i, ok;
    ngx_connection_t    *c;
    ngx_mail_session_t  *s;

    s = rctx->data;
    c = s->connection;
    ok = 0;

    if (rctx->state == 0) {
        for (i = 0; i < rctx->naddrs; i++) {
            if (ngx_cmp_sockaddr(rctx->addrs[i].sockaddr,
                                 rctx->addrs[i].socklen, c->sockaddr,
                                 c->socklen, 0)
                == NGX_OK)
            {
                ok = 1;
                break;
            }
        }
    }

    if (!ok) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "host name \"%V\" of %V does not resolve back to it"
                      " (%i: %s, %ui addresses)", &s->host, &c->addr_text,
                      rctx->state, ngx_resolver_strerror(rctx->state),
                      rctx->naddrs);
        ngx_str_null(&s->host);
    }

    ngx_resolve_name_done(rctx);
    s->resolver_ctx = NULL;

    ngx_mail_sg_greet(s, c);
}


static ngx_uint_t
ngx_mail_sg_host_valid(ngx_str_t *name)
{
    u_char  *p, *last;

    if (name->len == 0 || name->len > 253) {
        return 0;
    }

    last = name->data + name->len;

    for (p = name->data; p < last; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
              || (*p >= '0' && *p <= '9') || *p == '-' || *p == '.'))
        {
            return 0;
        }
    }

    return 1;
}


static void
ngx_mail_sg_block_reading(ngx_event_t *rev)
{
    ngx_connection_t    *c;
    ngx_mail_session_t  *s;

    c = rev->data;
    s = c->data;

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        if (s->resolver_ctx) {
            /* the reverse lookup, or the forward one confirming it */
            if (s->resolver_ctx->handler == ngx_mail_sg_resolved) {
                ngx_resolve_addr_done(s->resolver_ctx);

            } else {
                ngx_resolve_name_done(s->resolver_ctx);
            }

            s->resolver_ctx = NULL;
        }

        ngx_mail_close_connection(c);
    }
}


static void
ngx_mail_sg_greet(ngx_mail_session_t *s, ngx_connection_t *c)
{
    u_char                   peek;
    ngx_mail_sg_srv_conf_t  *sscf;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

    c->log->action = "sending greeting";

    if (sscf->greeting_delay) {
        /* early talkers: whoever speaks before the greeting is refused */
        c->read->handler = ngx_mail_sg_greeting_delay;
        ngx_add_timer(c->read, sscf->greeting_delay);

        if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
            ngx_mail_close_connection(c);
        }

        return;
    }

    /* RFC 5321, 4.3.1: a client that talked first is an early talker */

    if (recv(c->fd, &peek, 1, MSG_PEEK) == 1) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "client sent data before the greeting");
        ngx_str_set(&s->out, "554 5.5.1 Error: SMTP protocol"
                             " synchronization" CRLF);
        s->quit = 1;
        c->write->handler = ngx_mail_send;
        ngx_mail_send(c->write);
        return;
    }

    s->out = sscf->greeting;

    c->read->handler = ngx_mail_sg_init_protocol;
    c->write->handler = ngx_mail_send;

    ngx_add_timer(c->read, sscf->command_timeout);

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_mail_close_connection(c);
        return;
    }

    if (c->read->ready) {
        ngx_post_event(c->read, &ngx_posted_events);
    }

    ngx_mail_send(c->write);
}


static void
ngx_mail_sg_greeting_delay(ngx_event_t *rev)
{
    ngx_connection_t         *c;
    ngx_mail_session_t       *s;
    ngx_mail_sg_srv_conf_t   *sscf;

    c = rev->data;
    s = c->data;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

    if (rev->timedout) {
        rev->timedout = 0;

        s->out = sscf->greeting;
        c->read->handler = ngx_mail_sg_init_protocol;
        c->write->handler = ngx_mail_send;

        ngx_add_timer(c->read, sscf->command_timeout);
        ngx_mail_send(c->write);
        return;
    }

    /* RFC 5321, 4.3.1: the client must wait for the greeting */

    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                  "client sent data before the greeting");

    ngx_str_set(&s->out, "554 5.5.1 Error: SMTP protocol synchronization"
                         CRLF);
    s->quit = 1;
    c->write->handler = ngx_mail_send;
    ngx_mail_send(c->write);
}


/* after the greeting, and again after STARTTLS: everything starts over */

static void
ngx_mail_sg_init_protocol(ngx_event_t *rev)
{
    ngx_connection_t          *c;
    ngx_mail_session_t        *s;
    ngx_mail_sg_ctx_t         *ctx;
    ngx_mail_sg_srv_conf_t    *sscf;
    ngx_mail_core_srv_conf_t  *cscf;

    c = rev->data;
    s = c->data;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_sg_module);

    if (rev->timedout) {
        /* RFC 5321, 4.5.3.2.7: silent after the greeting */
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT, "client timed out");
        c->timedout = 1;
        cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
        ctx->out->pos = ctx->out->start;
        ctx->out->last = ctx->out->start;
        ngx_mail_sg_reply(s, ctx, "421 4.4.2 %V Error: timeout exceeded",
                          &cscf->server_name);
        s->quit = 1;
        ngx_mail_sg_flush(s, ctx);
        return;
    }

    if (s->buffer == NULL) {
        s->buffer = ngx_create_temp_buf(c->pool, sscf->max_line);
        if (s->buffer == NULL) {
            ngx_mail_close_connection(c);
            return;
        }
    }

    /* RFC 3207, 4.2: nothing sent before the handshake is kept */
    s->buffer->pos = s->buffer->start;
    s->buffer->last = s->buffer->start;

    ngx_mail_sg_reset(ctx);
    ctx->greeted = 0;
    ctx->skip = 0;
    ctx->starttls = 0;
    s->esmtp = 0;

#if (NGX_MAIL_SSL)
    if (c->ssl) {
        ctx->tls_protocol.data = (u_char *) SSL_get_version(
                                                     c->ssl->connection);
        ctx->tls_protocol.len = ngx_strlen(ctx->tls_protocol.data);
        ctx->tls_cipher.data = (u_char *) SSL_get_cipher_name(
                                                     c->ssl->connection);
        ctx->tls_cipher.len = ngx_strlen(ctx->tls_cipher.data);
    }
#endif

    c->log->action = "in SMTP session";
    c->read->handler = ngx_mail_sg_read_handler;

    ngx_mail_sg_read_handler(rev);
}


static ngx_int_t
ngx_mail_sg_parse_command(ngx_mail_session_t *s)
{
    /* not used: this module reads its own lines */
    return NGX_MAIL_PARSE_INVALID_COMMAND;
}


void
ngx_mail_sg_read_handler(ngx_event_t *rev)
{
    u_char                    *lf, *line;
    size_t                     len;
    ssize_t                    n;
    ngx_buf_t                 *b;
    ngx_connection_t          *c;
    ngx_mail_session_t        *s;
    ngx_mail_sg_ctx_t         *ctx;
    ngx_mail_sg_srv_conf_t    *sscf;
    ngx_mail_core_srv_conf_t  *cscf;

    c = rev->data;
    s = c->data;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_sg_module);
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);
    b = s->buffer;

    if (ctx->waiting) {
        /* the queue commit answers first */
        return;
    }

    if (rev->timedout) {
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT, "client timed out");
        c->timedout = 1;
        ctx->out->pos = ctx->out->start;
        ctx->out->last = ctx->out->start;
        ngx_mail_sg_reply(s, ctx, "421 4.4.2 %V Error: timeout exceeded",
                          &cscf->server_name);
        s->quit = 1;
        ngx_mail_sg_flush(s, ctx);
        return;
    }

    if (s->out.len) {
        /* replies still going out: read on when they are sent */
        s->blocked = 1;
        return;
    }

    s->blocked = 0;
    ctx->out->pos = ctx->out->start;
    ctx->out->last = ctx->out->start;

    if (rev->timer_set) {
        ngx_del_timer(rev);
    }

    for ( ;; ) {

        if (b->pos > b->start) {
            len = b->last - b->pos;
            ngx_memmove(b->start, b->pos, len);
            b->pos = b->start;
            b->last = b->start + len;
        }

        if (b->last < b->end) {
            n = c->recv(c, b->last, b->end - b->last);

            if (n == NGX_ERROR || n == 0) {
                if (ctx->in_data) {
                    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                                  "client closed the connection in DATA,"
                                  " nothing queued");
                }

                ngx_mail_close_connection(c);
                return;
            }

            if (n > 0) {
                b->last += n;
            }
        }

        if (b->pos == b->last) {
            break;
        }

        if (ctx->in_data) {
            if (ngx_mail_sg_data_read(s, ctx) != NGX_OK) {
                return;
            }

            if (ctx->in_data) {
                continue;
            }

            if (ctx->waiting) {
                /* the commit will answer and flush */
                return;
            }

            continue;
        }

        lf = ngx_strlchr(b->pos, b->last, LF);

        if (lf == NULL) {

            if (b->last < b->end) {
                break;
            }

            /* RFC 5321, 4.5.3.1.4: a command line longer than allowed */

            if (!ctx->skip) {
                ngx_log_error(NGX_LOG_INFO, c->log, 0,
                              "client sent too long command line");
                ngx_mail_sg_error(s, ctx,
                                  "500 5.5.2 Error: line too long");
            }

            ctx->skip = 1;
            b->pos = b->last;

            if (s->quit) {
                break;
            }

            continue;
        }

        line = b->pos;
        len = lf - line;
        b->pos = lf + 1;

        if (ctx->skip) {
            ctx->skip = 0;
            continue;
        }

        if (len == 0 || line[len - 1] != CR) {
            ngx_log_error(NGX_LOG_INFO, c->log, 0,
                          "client sent a line ending in a bare LF");
            ngx_mail_sg_error(s, ctx,
                              "500 5.5.2 Error: bare LF received,"
                              " lines must end with CRLF");

        } else {
            ngx_mail_sg_command(s, ctx, line, len - 1);
        }

        if (s->quit || ctx->starttls) {
            break;
        }

        if ((size_t) (ctx->out->end - ctx->out->last) < 1024) {
            /* enough replies for one write: go on when they are sent */
            break;
        }
    }

    if (ctx->out->last > ctx->out->pos) {
        ngx_mail_sg_flush(s, ctx);
        return;
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_mail_close_connection(c);
        return;
    }

    ngx_add_timer(rev, ctx->in_data ? sscf->data_timeout
                                    : sscf->command_timeout);
}


static void
ngx_mail_sg_command(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    u_char *line, size_t len)
{
    sg_smtp_rc_e               rc;
    sg_smtp_cmd_t              cmd;
    const char                *detail;
    ngx_str_t                  l;
    ngx_mail_sg_srv_conf_t    *sscf;
    ngx_mail_core_srv_conf_t  *cscf;

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

    l.data = line;
    l.len = len;

    ngx_log_debug1(NGX_LOG_DEBUG_MAIL, s->connection->log, 0,
                   "sg smtp command: \"%V\"", &l);

    rc = sg_smtp_cmd_parse((const char *) line, len, sscf->max_line, &cmd,
                           &detail);

    if (detail == NULL) {
        detail = "";
    }

    switch (rc) {

    case SG_SMTP_OK:
        break;

    case SG_SMTP_ERR_UNKNOWN:
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent unknown command \"%V\"", &l);
        ngx_mail_sg_error(s, ctx, "500 5.5.1 Error: command not recognized");
        return;

    case SG_SMTP_ERR_TOO_LONG:
        ngx_mail_sg_error(s, ctx, "500 5.5.2 Error: line too long");
        return;

    case SG_SMTP_ERR_PATH:
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent bad address in \"%V\": %s", &l, detail);
        ngx_mail_sg_reply(s, ctx, "553 5.1.3 Error: %s", detail);
        ngx_mail_sg_count_error(s, ctx);
        return;

    case SG_SMTP_ERR_PARAMS:
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent bad parameters in \"%V\": %s", &l,
                      detail);
        ngx_mail_sg_reply(s, ctx, "555 5.5.4 Error: %s", detail);
        ngx_mail_sg_count_error(s, ctx);
        return;

    default:
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent bad syntax \"%V\": %s", &l, detail);
        ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: %s", detail);
        ngx_mail_sg_count_error(s, ctx);
        return;
    }

    switch (cmd.verb) {

    case SG_SMTP_CMD_EHLO:
    case SG_SMTP_CMD_HELO:
        ngx_mail_sg_ehlo(s, ctx, &cmd);
        return;

    case SG_SMTP_CMD_MAIL:
        ngx_mail_sg_mail(s, ctx, &cmd);
        return;

    case SG_SMTP_CMD_RCPT:
        ngx_mail_sg_rcpt(s, ctx, &cmd);
        return;

    case SG_SMTP_CMD_DATA:
        ngx_mail_sg_data(s, ctx);
        return;

    case SG_SMTP_CMD_NOOP:
        ngx_mail_sg_reply(s, ctx, "250 2.0.0 Ok");
        return;

    case SG_SMTP_CMD_RSET:
        ngx_mail_sg_reset(ctx);
        ngx_mail_sg_reply(s, ctx, "250 2.0.0 Ok");
        return;

    case SG_SMTP_CMD_QUIT:
        ngx_mail_sg_reply(s, ctx, "221 2.0.0 %V closing connection",
                          &cscf->server_name);
        s->quit = 1;
        return;

    case SG_SMTP_CMD_VRFY:
        /* RFC 5321, 3.5.3: neither confirm nor deny */
        ngx_mail_sg_reply(s, ctx, "252 2.5.0 Cannot VRFY user, but will"
                          " accept message and attempt delivery");
        return;

    case SG_SMTP_CMD_HELP:
        ngx_mail_sg_reply(s, ctx, "214 2.0.0 Commands: EHLO HELO MAIL RCPT"
                          " DATA RSET NOOP QUIT VRFY HELP STARTTLS");
        return;

    case SG_SMTP_CMD_STARTTLS:
        ngx_mail_sg_starttls(s, ctx);
        return;

    default:
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent unsupported command \"%V\"", &l);
        ngx_mail_sg_error(s, ctx, "502 5.5.1 Error: command not"
                          " implemented");
        return;
    }
}


static void
ngx_mail_sg_ehlo(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd)
{
    u_char                    *p;
    ngx_uint_t                 requiretls;
    ngx_mail_sg_srv_conf_t    *sscf;
    ngx_mail_core_srv_conf_t  *cscf;

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

    /* RFC 5321, 4.1.4: EHLO/HELO also reset the transaction */
    ngx_mail_sg_reset(ctx);

    if (cmd->arg.len > sizeof(ctx->helo_buf)) {
        ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: too long");
        return;
    }

    ngx_memcpy(ctx->helo_buf, cmd->arg.data, cmd->arg.len);
    ctx->helo.data = ctx->helo_buf;
    ctx->helo.len = cmd->arg.len;

    ctx->greeted = 1;
    s->esmtp = (cmd->verb == SG_SMTP_CMD_EHLO);

    if (!s->esmtp) {
        ngx_mail_sg_reply(s, ctx, "250 %V", &cscf->server_name);
        return;
    }

    ctx->starttls_offered = ngx_mail_sg_starttls_offered(s, ctx);

    /* RFC 8689, 4: REQUIRETLS only on a TLS session */
    requiretls = s->connection->ssl != NULL
                 && sg_worker.settings
                 && sg_worker.settings->requiretls_enabled;

    /* the fixed capabilities are built once, in the merge */

    if (ctx->out->end - ctx->out->last
        < (ssize_t) (sscf->ehlo_caps.len + cscf->server_name.len + 64))
    {
        return;
    }

    p = ngx_sprintf(ctx->out->last, "250-%V%V", &cscf->server_name,
                    &sscf->ehlo_caps);

    if (ctx->starttls_offered) {
        p = ngx_cpymem(p, CRLF "250-STARTTLS", sizeof(CRLF "250-STARTTLS")
                                               - 1);
    }

    if (requiretls) {
        p = ngx_cpymem(p, CRLF "250-REQUIRETLS",
                       sizeof(CRLF "250-REQUIRETLS") - 1);
    }

    p = ngx_cpymem(p, CRLF "250 SMTPUTF8" CRLF,
                   sizeof(CRLF "250 SMTPUTF8" CRLF) - 1);

    ctx->out->last = p;
}


/* the STARTTLS whitelist and the setting decide (DESIGN.md, Inbound) */

static ngx_uint_t
ngx_mail_sg_starttls_offered(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
#if (NGX_MAIL_SSL)
    sg_lists_t           *lists;
    ngx_connection_t     *c;
    ngx_mail_ssl_conf_t  *sslcf;

    c = s->connection;

    if (c->ssl) {
        return 0;
    }

    sslcf = ngx_mail_get_module_srv_conf(s, ngx_mail_ssl_module);

    if (sslcf->ssl.ctx == NULL || sslcf->starttls == NGX_MAIL_STARTTLS_OFF) {
        return 0;
    }

    /*
     * TLS enabled in the settings; without an active certificate the one
     * from nginx.conf is served (issue 3: it is the fallback)
     */
    if (sg_worker.settings == NULL || !sg_worker.settings->tls_enabled) {
        return 0;
    }

    lists = sg_lists_current();

    if (lists && sg_lists_whitelisted(lists, c->sockaddr, &s->host)) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "STARTTLS not offered: client on the STARTTLS"
                      " whitelist");
        return 0;
    }

    return 1;
#else
    return 0;
#endif
}


static void
ngx_mail_sg_starttls(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
#if (NGX_MAIL_SSL)
    ngx_connection_t  *c;

    c = s->connection;

    if (c->ssl) {
        /* RFC 3207, 4.2: no second STARTTLS */
        ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: TLS already active");
        return;
    }

    if (!ctx->greeted || !s->esmtp) {
        ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: send EHLO first");
        return;
    }

    if (!ctx->starttls_offered) {
        ngx_mail_sg_error(s, ctx, "502 5.5.1 Error: STARTTLS not available");
        return;
    }

    ngx_mail_sg_reset(ctx);

    ngx_mail_sg_reply(s, ctx, "220 2.0.0 Ready to start TLS");

    /* the reply goes out, then the handshake; pipelined input is dropped */
    ctx->starttls = 1;
    s->buffer->pos = s->buffer->start;
    s->buffer->last = s->buffer->start;
    c->read->handler = ngx_mail_starttls_handler;
#else
    ngx_mail_sg_error(s, ctx, "502 5.5.1 Error: STARTTLS not available");
#endif
}


/* MAIL FROM (RFC 5321, 4.1.1.2) with its extensions */

static void
ngx_mail_sg_mail(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd)
{
    off_t                     size;
    u_char                   *mark;
    size_t                    i, n;
    sg_str_t                  v;
    ngx_connection_t         *c;
    sg_smtp_param_t          *p;
    ngx_mail_sg_srv_conf_t   *sscf;
    u_char                    envid[128];

    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

    if (!ctx->greeted) {
        ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: send HELO/EHLO first");
        return;
    }

    if (ctx->in_mail) {
        ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: nested MAIL command");
        return;
    }

    if (sg_pg_up(sg_worker.pg) == 0) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "sg: MAIL refused: the queue database is unavailable:"
                      " %s", sg_pg_last_error(sg_worker.pg));
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: queue unavailable,"
                          " try again later");
        return;
    }

    if (ngx_mail_sg_begin(s, ctx) != NGX_OK) {
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: out of memory");
        return;
    }

    mark = ctx->out->last;

    for (i = 0; i < cmd->nparams; i++) {
        p = &cmd->params[i];

        if (!s->esmtp) {
            goto unsupported;
        }

#define sg_param_is(kw)                                                      \
        (p->name.len == sizeof(kw) - 1                                       \
         && ngx_strncasecmp((u_char *) p->name.data, (u_char *) kw,           \
                            sizeof(kw) - 1) == 0)

        if (sg_param_is("SIZE")) {
            /* RFC 1870, 6 */
            size = p->value.data ? ngx_atoof((u_char *) p->value.data,
                                             p->value.len)
                                 : NGX_ERROR;
            if (size == NGX_ERROR) {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: SIZE");
                goto failed;
            }

            if (size > sscf->max_message_size) {
                ngx_mail_sg_reply(s, ctx, "552 5.3.4 Error: message size"
                                  " exceeds fixed maximum message size");
                goto failed;
            }

        } else if (sg_param_is("BODY")) {
            /* RFC 6152, 2 */
            if (p->value.len == 4
                && ngx_strncasecmp((u_char *) p->value.data,
                                   (u_char *) "7BIT", 4) == 0)
            {
                ctx->body_8bit = 0;

            } else if (p->value.len == 8
                       && ngx_strncasecmp((u_char *) p->value.data,
                                          (u_char *) "8BITMIME", 8) == 0)
            {
                ctx->body_8bit = 1;

            } else {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: BODY"
                                  " must be 7BIT or 8BITMIME");
                goto failed;
            }

        } else if (sg_param_is("SMTPUTF8")) {
            /* RFC 6531, 3.4 */
            if (p->value.data) {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error:"
                                  " SMTPUTF8 takes no value");
                goto failed;
            }

            ctx->smtputf8 = 1;

        } else if (sg_param_is("RET")) {
            /* RFC 3461, 4.3 */
            if (p->value.len == 4
                && ngx_strncasecmp((u_char *) p->value.data,
                                   (u_char *) "FULL", 4) == 0)
            {
                ngx_str_set(&ctx->ret, "FULL");

            } else if (p->value.len == 4
                       && ngx_strncasecmp((u_char *) p->value.data,
                                          (u_char *) "HDRS", 4) == 0)
            {
                ngx_str_set(&ctx->ret, "HDRS");

            } else {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: RET"
                                  " must be FULL or HDRS");
                goto failed;
            }

        } else if (sg_param_is("ENVID")) {
            /* RFC 3461, 4.4: xtext, at most 100 characters */
            if (p->value.data == NULL || p->value.len > 100
                || sg_smtp_xtext_decode(&p->value, (char *) envid,
                                        sizeof(envid), &n)
                   != SG_SMTP_OK)
            {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: ENVID");
                goto failed;
            }

            ctx->envid.data = ngx_pnalloc(ctx->tpool, n);
            if (ctx->envid.data == NULL) {
                goto failed;
            }

            ngx_memcpy(ctx->envid.data, envid, n);
            ctx->envid.len = n;

        } else if (sg_param_is("REQUIRETLS")) {
            /* RFC 8689, 4.1 */
            if (sg_worker.settings == NULL
                || !sg_worker.settings->requiretls_enabled)
            {
                goto unsupported;
            }

            if (p->value.data) {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error:"
                                  " REQUIRETLS takes no value");
                goto failed;
            }

            if (c->ssl == NULL) {
                /* RFC-NOTES decision: 530 5.7.10 without TLS */
                ngx_mail_sg_reply(s, ctx, "530 5.7.10 REQUIRETLS needs a"
                                  " TLS session: STARTTLS first");
                goto failed;
            }

            ctx->requiretls_param = 1;

        } else {
            goto unsupported;
        }

#undef sg_param_is
    }

    if (cmd->utf8 && !ctx->smtputf8) {
        /* RFC 6531, 3.4 */
        ngx_mail_sg_reply(s, ctx, "553 5.6.7 Error: non-ASCII address"
                          " without SMTPUTF8");
        goto failed;
    }

    v = cmd->path;

    if (ngx_mail_sg_copy(ctx->tpool, &ctx->sender, &v) != NGX_OK) {
        goto failed;
    }

    ctx->in_mail = 1;

    ngx_mail_sg_reply(s, ctx, "250 2.1.0 Ok");
    return;

unsupported:

    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                  "client sent unsupported MAIL parameter \"%*s\"",
                  cmd->params[i].name.len, cmd->params[i].name.data);
    ngx_mail_sg_reply(s, ctx, "555 5.5.4 Error: unsupported parameter"
                      " %*s", cmd->params[i].name.len,
                      cmd->params[i].name.data);

failed:

    if (ctx->out->last == mark) {
        /* every command gets its reply, even out of memory */
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: temporary failure");
    }

    ngx_mail_sg_reset(ctx);
}


/* RCPT TO (RFC 5321, 4.1.1.3) and relay control */

static void
ngx_mail_sg_rcpt(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd)
{
    u_char                   *tag, *mark;
    size_t                    i, n;
    ngx_uint_t                relay;
    sg_str_t                  local, v;
    sg_lists_t               *lists;
    sg_domain_t              *domain;
    sg_smtp_param_t          *p;
    ngx_connection_t         *c;
    ngx_mail_sg_rcpt_t       *r;
    ngx_mail_sg_srv_conf_t   *sscf;
    char                      orcpt[512];

    static const char  suffix[] = "+requiretls";

    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

    if (!ctx->in_mail) {
        ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: need MAIL command");
        return;
    }

    if (ctx->rcpts->nelts >= sscf->max_recipients) {
        /* RFC 5321, 4.5.3.1.10 */
        ngx_mail_sg_reply(s, ctx, "452 4.5.3 Error: too many recipients");
        return;
    }

    if (cmd->utf8 && !ctx->smtputf8) {
        ngx_mail_sg_reply(s, ctx, "553 5.6.7 Error: non-ASCII address"
                          " without SMTPUTF8");
        return;
    }

    lists = sg_lists_current();

    if (lists == NULL) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "sg: RCPT deferred: lists not loaded yet");
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: temporary failure,"
                          " try again later");
        return;
    }

    relay = sg_lists_relay_allowed(lists, c->sockaddr);
    domain = NULL;

    if (cmd->postmaster) {
        /* RFC 5321, 4.5.1: <Postmaster> is always accepted */

    } else {
        if (!cmd->address_literal) {
            domain = sg_lists_domain(lists, (u_char *) cmd->domain.data,
                                     cmd->domain.len);
        }

        /*
         * Never an open relay: only local domains without routing tricks,
         * or a client from a relay network.
         */

        if (!relay
            && (domain == NULL || cmd->has_source_route || cmd->quoted_local
                || ngx_strlchr((u_char *) cmd->local_part.data,
                               (u_char *) cmd->local_part.data
                               + cmd->local_part.len, '%')
                || ngx_strlchr((u_char *) cmd->local_part.data,
                               (u_char *) cmd->local_part.data
                               + cmd->local_part.len, '!')))
        {
            ngx_log_error(NGX_LOG_NOTICE, c->log, 0,
                          "sg: relay denied: client %V, recipient <%*s>",
                          &c->addr_text, cmd->path.len, cmd->path.data);
            ngx_mail_sg_reply(s, ctx, "554 5.7.1 <%*s>: Relay access"
                              " denied", cmd->path.len, cmd->path.data);
            ctx->refused++;

            /* probing for an open relay costs errors too */
            ngx_mail_sg_count_error(s, ctx);
            return;
        }
    }

    r = ngx_array_push(ctx->rcpts);
    if (r == NULL) {
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: out of memory");
        return;
    }

    ngx_memzero(r, sizeof(ngx_mail_sg_rcpt_t));
    r->local = (domain != NULL);
    mark = ctx->out->last;

    for (i = 0; i < cmd->nparams; i++) {
        p = &cmd->params[i];

        if (!s->esmtp) {
            goto unsupported;
        }

        if (p->name.len == 6
            && ngx_strncasecmp((u_char *) p->name.data, (u_char *) "NOTIFY",
                               6) == 0)
        {
            /* RFC 3461, 4.1 */
            if (ngx_mail_sg_notify_valid(&p->value) != NGX_OK) {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: NOTIFY");
                goto failed;
            }

            if (ngx_mail_sg_copy(ctx->tpool, &r->notify, &p->value)
                != NGX_OK)
            {
                goto failed;
            }

        } else if (p->name.len == 5
                   && ngx_strncasecmp((u_char *) p->name.data,
                                      (u_char *) "ORCPT", 5) == 0)
        {
            /* RFC 3461, 4.2: addr-type ";" xtext */
            tag = p->value.data
                  ? ngx_strlchr((u_char *) p->value.data,
                                (u_char *) p->value.data + p->value.len, ';')
                  : NULL;

            if (tag == NULL || tag == (u_char *) p->value.data
                || p->value.len > 500)
            {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: ORCPT");
                goto failed;
            }

            v.data = (const char *) tag + 1;
            v.len = p->value.len - (tag + 1 - (u_char *) p->value.data);

            if (sg_smtp_xtext_decode(&v, orcpt, sizeof(orcpt), &n)
                != SG_SMTP_OK)
            {
                ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: ORCPT");
                goto failed;
            }

            if (ngx_mail_sg_copy(ctx->tpool, &r->orcpt, &p->value)
                != NGX_OK)
            {
                goto failed;
            }

        } else {
            goto unsupported;
        }
    }

    if (ngx_mail_sg_copy(ctx->tpool, &r->original, &cmd->path) != NGX_OK
        || ngx_mail_sg_copy(ctx->tpool, &r->domain, &cmd->domain) != NGX_OK)
    {
        goto failed;
    }

    ngx_strlow(r->domain.data, r->domain.data, r->domain.len);

    r->address = r->original;

    /* the reference page's "<local-part>+requiretls@domain" */

    local = cmd->local_part;

    if (!cmd->quoted_local && local.len > sizeof(suffix) - 1
        && ngx_strncasecmp((u_char *) local.data + local.len
                           - (sizeof(suffix) - 1),
                           (u_char *) suffix, sizeof(suffix) - 1) == 0)
    {
        r->address.len = r->original.len - (sizeof(suffix) - 1);
        r->address.data = ngx_pnalloc(ctx->tpool, r->address.len);
        if (r->address.data == NULL) {
            goto failed;
        }

        n = local.len - (sizeof(suffix) - 1);
        ngx_memcpy(ngx_cpymem(r->address.data, local.data, n),
                   r->original.data + local.len,
                   r->original.len - local.len);

        r->requiretls = 1;
    }

    ngx_mail_sg_reply(s, ctx, "250 2.1.5 Ok");
    return;

unsupported:

    ngx_mail_sg_reply(s, ctx, "555 5.5.4 Error: unsupported parameter %*s",
                      cmd->params[i].name.len, cmd->params[i].name.data);

failed:

    if (ctx->out->last == mark) {
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: temporary failure");
    }

    ctx->rcpts->nelts--;
}


static void
ngx_mail_sg_data(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    if (!ctx->in_mail) {
        ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: need MAIL command");
        return;
    }

    if (ctx->rcpts->nelts == 0) {
        /* RFC 5321, 3.3 and RFC 2920, 3.1 */
        if (ctx->refused) {
            ngx_mail_sg_reply(s, ctx, "554 5.5.1 Error: no valid"
                              " recipients");

        } else {
            ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: need RCPT"
                              " command");
        }

        return;
    }

    if (ngx_mail_sg_data_start(s, ctx) != NGX_OK) {
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: cannot receive data");
        ngx_mail_sg_reset(ctx);
        return;
    }

    ngx_mail_sg_reply(s, ctx, "354 End data with <CR><LF>.<CR><LF>");
}


/* the transaction's memory lives in its own pool */

static ngx_int_t
ngx_mail_sg_begin(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    ngx_mail_sg_reset(ctx);

    ctx->tpool = ngx_create_pool(4096, s->connection->log);
    if (ctx->tpool == NULL) {
        return NGX_ERROR;
    }

    ctx->rcpts = ngx_array_create(ctx->tpool, 4, sizeof(ngx_mail_sg_rcpt_t));
    if (ctx->rcpts == NULL) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


void
ngx_mail_sg_reset(ngx_mail_sg_ctx_t *ctx)
{
    /* a transaction that ended before its data still gets its line */
    if (ctx->tpool && ctx->in_mail && !ctx->logged && ctx->rcpts) {
        ngx_mail_sg_log(ctx->session, ctx, "no message: ended before the"
                        " end of data");
    }

    ctx->logged = 0;
    ctx->queue_id[0] = '\0';
    ctx->body_size = 0;

    if (ctx->tpool) {
        ngx_destroy_pool(ctx->tpool);
    }

    ctx->tpool = NULL;
    ctx->rcpts = NULL;
    ctx->data = NULL;
    ngx_str_null(&ctx->sender);
    ngx_str_null(&ctx->ret);
    ngx_str_null(&ctx->envid);

    ctx->in_mail = 0;
    ctx->in_data = 0;
    ctx->smtputf8 = 0;
    ctx->body_8bit = 0;
    ctx->requiretls_param = 0;
    ctx->requiretls = 0;
    ctx->refused = 0;
    ngx_str_null(&ctx->received);
}


static void
ngx_mail_sg_cleanup(void *data)
{
    ngx_mail_sg_ctx_t  *ctx = data;

    ngx_mail_sg_reset(ctx);
}


/* replies */


void
ngx_mail_sg_reply(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *fmt, ...)
{
    u_char   *p, *last;
    va_list   args;

    /* keep room for CRLF */
    last = ctx->out->end - 2;

    if (ctx->out->last >= last) {
        return;
    }

    va_start(args, fmt);
    p = ngx_vslprintf(ctx->out->last, last, fmt, args);
    va_end(args);

    *p++ = CR;
    *p++ = LF;

    ctx->out->last = p;
}


/* RFC 5321, 4.2.4 and nginx's max_errors: then 421 and close */

void
ngx_mail_sg_count_error(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    ngx_mail_core_srv_conf_t  *cscf;

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    if (++s->errors >= cscf->max_errors && !s->quit) {
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent too many invalid commands");
        ngx_mail_sg_reply(s, ctx, "421 4.7.0 %V Error: too many errors",
                          &cscf->server_name);
        s->quit = 1;
    }
}


void
ngx_mail_sg_error(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *reply)
{
    ngx_mail_sg_reply(s, ctx, "%s", reply);
    ngx_mail_sg_count_error(s, ctx);
}


void
ngx_mail_sg_flush(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    s->out.data = ctx->out->pos;
    s->out.len = ctx->out->last - ctx->out->pos;

    /* ngx_mail_send calls the read handler again when s->blocked */
    s->blocked = 1;

    ngx_mail_send(s->connection->write);
}


static ngx_int_t
ngx_mail_sg_copy(ngx_pool_t *pool, ngx_str_t *dst, const sg_str_t *src)
{
    dst->len = src->len;
    dst->data = ngx_pnalloc(pool, src->len + 1);

    if (dst->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(dst->data, src->data, src->len);
    dst->data[src->len] = '\0';

    return NGX_OK;
}


/* RFC 3461, 4.1: "NEVER" or a list of SUCCESS, FAILURE, DELAY */

ngx_int_t
ngx_mail_sg_notify_valid(sg_str_t *v)
{
    const char  *p, *end, *w;
    size_t       n;

    if (v->data == NULL || v->len == 0) {
        return NGX_ERROR;
    }

    if (v->len == 5 && ngx_strncasecmp((u_char *) v->data,
                                       (u_char *) "NEVER", 5) == 0)
    {
        return NGX_OK;
    }

    p = v->data;
    end = p + v->len;

    while (p < end) {
        w = p;

        while (p < end && *p != ',') {
            p++;
        }

        n = p - w;

        if (!((n == 7 && ngx_strncasecmp((u_char *) w,
                                         (u_char *) "SUCCESS", 7) == 0)
              || (n == 7 && ngx_strncasecmp((u_char *) w,
                                            (u_char *) "FAILURE", 7) == 0)
              || (n == 5 && ngx_strncasecmp((u_char *) w,
                                            (u_char *) "DELAY", 5) == 0)))
        {
            return NGX_ERROR;
        }

        if (p < end) {
            p++;

            if (p == end) {
                return NGX_ERROR;
            }
        }
    }

    return NGX_OK;
}


/* configuration */


static void *
ngx_mail_sg_create_srv_conf(ngx_conf_t *cf)
{
    ngx_mail_sg_srv_conf_t  *sscf;

    sscf = ngx_pcalloc(cf->pool, sizeof(ngx_mail_sg_srv_conf_t));
    if (sscf == NULL) {
        return NULL;
    }

    sscf->max_line = NGX_CONF_UNSET_SIZE;
    sscf->max_message_size = NGX_CONF_UNSET;
    sscf->max_recipients = NGX_CONF_UNSET_UINT;
    sscf->max_header_size = NGX_CONF_UNSET_SIZE;
    sscf->max_headers = NGX_CONF_UNSET_UINT;
    sscf->command_timeout = NGX_CONF_UNSET_MSEC;
    sscf->data_timeout = NGX_CONF_UNSET_MSEC;
    sscf->greeting_delay = NGX_CONF_UNSET_MSEC;
    sscf->normalize = NGX_CONF_UNSET_UINT;

    return sscf;
}


static char *
ngx_mail_sg_merge_srv_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_mail_sg_srv_conf_t *prev = parent;
    ngx_mail_sg_srv_conf_t *conf = child;

    u_char                    *p;
    ngx_mail_core_srv_conf_t  *cscf;
#if (NGX_MAIL_SSL)
    ngx_mail_ssl_conf_t       *sslcf;
#endif

    ngx_conf_merge_size_value(conf->max_line, prev->max_line, 2048);
    ngx_conf_merge_off_value(conf->max_message_size, prev->max_message_size,
                             25 * 1024 * 1024);
    ngx_conf_merge_uint_value(conf->max_recipients, prev->max_recipients,
                              100);
    ngx_conf_merge_size_value(conf->max_header_size, prev->max_header_size,
                              64 * 1024);
    ngx_conf_merge_uint_value(conf->max_headers, prev->max_headers, 1000);
    ngx_conf_merge_msec_value(conf->command_timeout, prev->command_timeout,
                              300000);
    ngx_conf_merge_msec_value(conf->data_timeout, prev->data_timeout,
                              180000);
    ngx_conf_merge_msec_value(conf->greeting_delay, prev->greeting_delay, 0);
    ngx_conf_merge_uint_value(conf->normalize, prev->normalize, 0);

    if (ngx_conf_merge_path_value(cf, &conf->temp_path, prev->temp_path,
                                  &ngx_mail_sg_temp_path)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (conf->max_line < SG_SMTP_MAX_LINE || conf->max_line > 65536) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sg_smtp_max_line_length\" must be from %d to"
                           " 65536", SG_SMTP_MAX_LINE);
        return NGX_CONF_ERROR;
    }

    if (conf->max_recipients < 1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sg_smtp_max_recipients\" must be at least 1");
        return NGX_CONF_ERROR;
    }

    cscf = ngx_mail_conf_get_module_srv_conf(cf, ngx_mail_core_module);

    /* built once here, chosen per session (the way ngx_mail_smtp does) */

    conf->greeting.len = sizeof("220  ESMTP sg" CRLF) - 1
                         + cscf->server_name.len;
    conf->greeting.data = ngx_pnalloc(cf->pool, conf->greeting.len);
    if (conf->greeting.data == NULL) {
        return NGX_CONF_ERROR;
    }

    p = ngx_sprintf(conf->greeting.data, "220 %V ESMTP sg" CRLF,
                    &cscf->server_name);
    conf->greeting.len = p - conf->greeting.data;

    conf->ehlo_caps.len = 256;
    conf->ehlo_caps.data = ngx_pnalloc(cf->pool, conf->ehlo_caps.len);
    if (conf->ehlo_caps.data == NULL) {
        return NGX_CONF_ERROR;
    }

    p = ngx_sprintf(conf->ehlo_caps.data,
                    CRLF "250-PIPELINING"
                    CRLF "250-SIZE %O"
                    CRLF "250-8BITMIME"
                    CRLF "250-ENHANCEDSTATUSCODES"
                    CRLF "250-DSN",
                    conf->max_message_size);
    conf->ehlo_caps.len = p - conf->ehlo_caps.data;

#if (NGX_MAIL_SSL)
    /* the active certificate from PostgreSQL; TLS 1.2 and 1.3 only */

    sslcf = ngx_mail_conf_get_module_srv_conf(cf, ngx_mail_ssl_module);

    if (sslcf->ssl.ctx) {
        SSL_CTX_set_min_proto_version(sslcf->ssl.ctx, TLS1_2_VERSION);
        SSL_CTX_clear_options(sslcf->ssl.ctx, SSL_OP_NO_TLSv1_3);

        if (sg_tls_install(cf, &sslcf->ssl) != NGX_OK) {
            return NGX_CONF_ERROR;
        }
    }
#endif

    return NGX_CONF_OK;
}
