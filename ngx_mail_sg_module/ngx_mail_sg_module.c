/*
 * sg: the SMTP receiving protocol ("protocol sg_smtp;" in a mail server).
 *
 * accept -> greeting -> read a command line -> parse (common/sg_smtp_cmd)
 * -> handle it -> collect the reply -> send the replies of all pipelined
 * commands in one write.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "sg_core.h"
#include "sg_smtp_cmd.h"


#define NGX_MAIL_SG_OUT_SIZE      4096


typedef struct {
    size_t                    max_line;
    ngx_str_t                 greeting;
    ngx_str_t                 ehlo_caps;     /* after the first line */
} ngx_mail_sg_srv_conf_t;


typedef struct {
    ngx_buf_t                *out;
    ngx_str_t                 helo;
    unsigned                  greeted:1;     /* HELO or EHLO seen */
    unsigned                  skip:1;        /* inside an over-long line */
} ngx_mail_sg_ctx_t;


static void ngx_mail_sg_init_session(ngx_mail_session_t *s,
    ngx_connection_t *c);
static void ngx_mail_sg_init_protocol(ngx_event_t *rev);
static void ngx_mail_sg_read_handler(ngx_event_t *rev);
static ngx_int_t ngx_mail_sg_parse_command(ngx_mail_session_t *s);
static void ngx_mail_sg_command(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    u_char *line, size_t len);
static void ngx_mail_sg_ehlo(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd);
static void ngx_mail_sg_mail(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd);
static void ngx_mail_sg_reply(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *fmt, ...);
static void ngx_mail_sg_error(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *reply);
static void ngx_mail_sg_flush(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx);
static void ngx_mail_sg_reset(ngx_mail_sg_ctx_t *ctx);
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


static ngx_command_t  ngx_mail_sg_commands[] = {

    { ngx_string("sg_smtp_max_line_length"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_sg_srv_conf_t, max_line),
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


static void
ngx_mail_sg_init_session(ngx_mail_session_t *s, ngx_connection_t *c)
{
    ngx_mail_sg_ctx_t         *ctx;
    ngx_mail_sg_srv_conf_t    *sscf;
    ngx_mail_core_srv_conf_t  *cscf;

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

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

    ngx_mail_set_ctx(s, ctx, ngx_mail_sg_module);

    c->log->action = "sending greeting";

    s->out = sscf->greeting;

    c->read->handler = ngx_mail_sg_init_protocol;
    c->write->handler = ngx_mail_send;

    ngx_add_timer(c->read, cscf->timeout);

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_mail_close_connection(c);
        return;
    }

    ngx_mail_send(c->write);
}


/* also called again after STARTTLS: everything starts over */

static void
ngx_mail_sg_init_protocol(ngx_event_t *rev)
{
    ngx_connection_t        *c;
    ngx_mail_session_t      *s;
    ngx_mail_sg_ctx_t       *ctx;
    ngx_mail_sg_srv_conf_t  *sscf;

    c = rev->data;
    s = c->data;

    if (rev->timedout) {
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT, "client timed out");
        c->timedout = 1;
        ngx_mail_close_connection(c);
        return;
    }

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_sg_module);

    if (s->buffer == NULL) {
        s->buffer = ngx_create_temp_buf(c->pool, sscf->max_line);
        if (s->buffer == NULL) {
            ngx_mail_close_connection(c);
            return;
        }
    }

    s->buffer->pos = s->buffer->start;
    s->buffer->last = s->buffer->start;

    ngx_mail_sg_reset(ctx);
    ctx->greeted = 0;
    ctx->skip = 0;

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


static void
ngx_mail_sg_read_handler(ngx_event_t *rev)
{
    u_char                    *lf, *line;
    size_t                     len;
    ssize_t                    n;
    ngx_buf_t                 *b;
    ngx_connection_t          *c;
    ngx_mail_session_t        *s;
    ngx_mail_sg_ctx_t         *ctx;
    ngx_mail_core_srv_conf_t  *cscf;

    c = rev->data;
    s = c->data;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_sg_module);
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    b = s->buffer;

    if (rev->timedout) {
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT, "client timed out");
        c->timedout = 1;
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
                ngx_mail_close_connection(c);
                return;
            }

            if (n > 0) {
                b->last += n;
            }
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

        if (s->quit) {
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

    ngx_add_timer(rev, cscf->timeout);
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
                      "client sent bad address in \"%V\": %s", &l,
                      detail ? detail : "");
        ngx_mail_sg_reply(s, ctx, "553 5.1.3 Error: %s",
                          detail ? detail : "bad address syntax");
        s->errors++;
        return;

    case SG_SMTP_ERR_PARAMS:
        ngx_mail_sg_reply(s, ctx, "555 5.5.4 Error: %s",
                          detail ? detail : "bad parameters");
        s->errors++;
        return;

    default:
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent bad syntax \"%V\": %s", &l,
                      detail ? detail : "");
        ngx_mail_sg_reply(s, ctx, "501 5.5.4 Syntax error: %s",
                          detail ? detail : "bad arguments");
        s->errors++;
        return;
    }

    switch (cmd.verb) {

    case SG_SMTP_CMD_EHLO:
    case SG_SMTP_CMD_HELO:
        ngx_mail_sg_ehlo(s, ctx, &cmd);
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
                          " DATA RSET NOOP QUIT VRFY HELP");
        return;

    case SG_SMTP_CMD_MAIL:
        ngx_mail_sg_mail(s, ctx, &cmd);
        return;

    case SG_SMTP_CMD_RCPT:
    case SG_SMTP_CMD_DATA:
        ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: need MAIL command");
        return;

    default:
        ngx_mail_sg_error(s, ctx, "502 5.5.1 Error: command not"
                          " implemented");
        return;
    }
}


static void
ngx_mail_sg_ehlo(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd)
{
    ngx_str_t                  arg;
    ngx_mail_sg_srv_conf_t    *sscf;
    ngx_mail_core_srv_conf_t  *cscf;

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

    /* RFC 5321, 4.1.4: EHLO/HELO also reset the transaction */
    ngx_mail_sg_reset(ctx);

    arg.len = cmd->arg.len;
    arg.data = ngx_pnalloc(s->connection->pool, arg.len);
    if (arg.data == NULL) {
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: out of memory");
        return;
    }

    ngx_memcpy(arg.data, cmd->arg.data, arg.len);

    ctx->helo = arg;
    ctx->greeted = 1;
    s->esmtp = (cmd->verb == SG_SMTP_CMD_EHLO);

    if (!s->esmtp) {
        ngx_mail_sg_reply(s, ctx, "250 %V", &cscf->server_name);
        return;
    }

    ngx_mail_sg_reply(s, ctx, "250-%V%V", &cscf->server_name,
                      &sscf->ehlo_caps);
}


static void
ngx_mail_sg_mail(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    sg_smtp_cmd_t *cmd)
{
    if (!ctx->greeted) {
        ngx_mail_sg_error(s, ctx, "503 5.5.1 Error: send HELO/EHLO first");
        return;
    }

    if (sg_pg_up(sg_worker.pg) == 0) {
        ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                      "sg: MAIL refused: the queue database is unavailable:"
                      " %s", sg_pg_last_error(sg_worker.pg));
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: queue unavailable,"
                          " try again later");
        return;
    }

    ngx_mail_sg_reply(s, ctx, "502 5.5.1 Error: receiving mail is not"
                      " implemented yet");
}


static void
ngx_mail_sg_reset(ngx_mail_sg_ctx_t *ctx)
{
    /* the mail transaction state goes here */
}


/* replies */


static void
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


/* an error reply that counts towards max_errors (RFC 5321, 4.2.4) */

static void
ngx_mail_sg_error(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *reply)
{
    ngx_mail_core_srv_conf_t  *cscf;

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    ngx_mail_sg_reply(s, ctx, "%s", reply);

    if (++s->errors >= cscf->max_errors) {
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent too many invalid commands");
        ngx_mail_sg_reply(s, ctx, "421 4.7.0 %V Error: too many errors",
                          &cscf->server_name);
        s->quit = 1;
    }
}


static void
ngx_mail_sg_flush(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    s->out.data = ctx->out->pos;
    s->out.len = ctx->out->last - ctx->out->pos;

    /* ngx_mail_send calls the read handler again when s->blocked */
    s->blocked = 1;

    ngx_mail_send(s->connection->write);
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

    return sscf;
}


static char *
ngx_mail_sg_merge_srv_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_mail_sg_srv_conf_t *prev = parent;
    ngx_mail_sg_srv_conf_t *conf = child;

    u_char                    *p;
    ngx_mail_core_srv_conf_t  *cscf;

    static const char  caps[] =
        CRLF "250-PIPELINING"
        CRLF "250 ENHANCEDSTATUSCODES";

    ngx_conf_merge_size_value(conf->max_line, prev->max_line, 2048);

    if (conf->max_line < SG_SMTP_MAX_LINE || conf->max_line > 65536) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sg_smtp_max_line_length\" must be from %d to"
                           " 65536", SG_SMTP_MAX_LINE);
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

    conf->ehlo_caps.data = (u_char *) caps;
    conf->ehlo_caps.len = sizeof(caps) - 1;

    return NGX_CONF_OK;
}
