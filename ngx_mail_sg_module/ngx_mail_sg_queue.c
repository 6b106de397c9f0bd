/*
 * sg: DATA and the durable queue.
 *
 * The message streams through the pure DATA parser into memory (64 KiB at
 * most) and then an unlinked temporary file; content filter rules run on
 * the envelope and the header fields; the message and all its recipients
 * are inserted by one statement, and only its success is answered 250.
 *
 * Group commit: while a worker's receive commit runs, the messages that
 * become ready meanwhile wait and then go together, in one statement and
 * one transaction (one WAL flush for all of them).  Each client is still
 * answered 250 only after that commit; if the batch fails with an error
 * of the server (one bad message), each message is tried again alone, so
 * that only the bad one gets its 451; if the connection is lost or the
 * statement times out, each gets 451, as a single commit would.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>
#include <sys/mman.h>

#include "ngx_mail_sg.h"


#define NGX_MAIL_SG_COMMIT_SQL                                               \
    "WITH m AS ("                                                            \
    " INSERT INTO messages (id, sender, size, body, body_type, smtputf8,"    \
    "  dsn_ret, dsn_envid, requiretls, requiretls_sources,"                 \
    "  content_filter_rule_id, tls_required_no, client_ip, client_port,"    \
    "  client_name, helo, esmtp, tls_protocol, tls_cipher, listener)"       \
    " VALUES ($1, $2, $3::bigint, $4::bytea || $5::bytea, $6,"               \
    "  $7::boolean, $8, $9, $10::boolean,"                                   \
    "  ARRAY(SELECT json_array_elements_text($11::json)),"                  \
    "  $12::bigint, $13::boolean, $14::inet, $15::integer, $16, $17,"       \
    "  $18::boolean, $19, $20, $21)"                                         \
    " RETURNING id)"                                                         \
    " INSERT INTO recipients (message_id, address, original_address,"       \
    "  domain, local_domain, dsn_notify, dsn_orcpt)"                         \
    " SELECT m.id, r.address, r.original, r.domain, r.local, r.notify,"     \
    "  r.orcpt FROM m, json_to_recordset($22::json) AS r(address text,"     \
    "  original text, domain text, local boolean, notify text, orcpt text)" \
    " RETURNING message_id"


/*
 * The same for several messages: $1 a JSON array with one array per
 * message, the parameters of NGX_MAIL_SG_COMMIT_SQL (null in place of the
 * body's two); $2 the bodies (Received: field and message), bytea[] in
 * binary format, in the same order.
 */
#define NGX_MAIL_SG_COMMIT_BATCH_SQL                                         \
    "WITH e AS (SELECT v, n FROM json_array_elements($1::json)"              \
    "  WITH ORDINALITY AS e(v, n)),"                                         \
    " b AS (SELECT body, n FROM unnest($2::bytea[])"                         \
    "  WITH ORDINALITY AS b(body, n)),"                                      \
    " m AS ("                                                                \
    " INSERT INTO messages (id, sender, size, body, body_type, smtputf8,"    \
    "  dsn_ret, dsn_envid, requiretls, requiretls_sources,"                 \
    "  content_filter_rule_id, tls_required_no, client_ip, client_port,"    \
    "  client_name, helo, esmtp, tls_protocol, tls_cipher, listener)"       \
    " SELECT v->>0, v->>1, (v->>2)::bigint, b.body, v->>5,"                  \
    "  (v->>6)::boolean, v->>7, v->>8, (v->>9)::boolean,"                    \
    "  ARRAY(SELECT json_array_elements_text((v->>10)::json)),"             \
    "  (v->>11)::bigint, (v->>12)::boolean, (v->>13)::inet,"                 \
    "  (v->>14)::integer, v->>15, v->>16, (v->>17)::boolean, v->>18,"        \
    "  v->>19, v->>20"                                                       \
    " FROM e JOIN b ON b.n = e.n"                                            \
    " RETURNING id)"                                                         \
    " INSERT INTO recipients (message_id, address, original_address,"       \
    "  domain, local_domain, dsn_notify, dsn_orcpt)"                         \
    " SELECT m.id, r.address, r.original, r.domain, r.local, r.notify,"     \
    "  r.orcpt FROM m JOIN e ON e.v->>0 = m.id,"                             \
    "  json_to_recordset((e.v->>21)::json) AS r(address text,"              \
    "  original text, domain text, local boolean, notify text, orcpt text)" \
    " RETURNING message_id"

#define NGX_MAIL_SG_COMMIT_PARAMS   22

/*
 * Receive commits running per worker: the messages that are ready while
 * they run wait and go together.  One leaves the pool's other
 * connections to delivery.
 */
#define NGX_MAIL_SG_COMMITS_RUNNING  1

/* messages per batch; a body in a temporary file (> 64 KiB) goes alone */
#define NGX_MAIL_SG_BATCH_MAX        64


typedef struct {
    ngx_uint_t           n;
    ngx_mail_sg_ctx_t   *ctx[NGX_MAIL_SG_BATCH_MAX];
    char                *json;          /* from json_dumps() */
    u_char              *bodies;
} ngx_mail_sg_batch_t;


typedef struct {
    ngx_queue_t          waiting;       /* ngx_mail_sg_ctx_t */
    ngx_uint_t           running;
    unsigned             init:1;
} ngx_mail_sg_commits_t;


static sg_pg_stmt_t  ngx_mail_sg_commit_stmt =
    SG_PG_STMT("sg_commit", NGX_MAIL_SG_COMMIT_SQL);
static sg_pg_stmt_t  ngx_mail_sg_commit_batch_stmt =
    SG_PG_STMT("sg_commit_batch", NGX_MAIL_SG_COMMIT_BATCH_SQL);

static ngx_mail_sg_commits_t  ngx_mail_sg_commits;


static void ngx_mail_sg_header(void *data, const char *name,
    size_t name_len, const char *value, size_t value_len);
static ngx_int_t ngx_mail_sg_body_write(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx, u_char *p, size_t n);
static ngx_int_t ngx_mail_sg_body_flush(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
static void ngx_mail_sg_data_done(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
static void ngx_mail_sg_content_filter(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
static ngx_uint_t ngx_mail_sg_cond_match(sg_rule_cond_t *cond,
    ngx_str_t *text);
static ngx_int_t ngx_mail_sg_received(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
static ngx_int_t ngx_mail_sg_commit(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
static ngx_int_t ngx_mail_sg_commit_submit(ngx_mail_sg_ctx_t *ctx);
static ngx_int_t ngx_mail_sg_commit_one(ngx_mail_sg_ctx_t *ctx);
static void ngx_mail_sg_commit_next(void);
static ngx_int_t ngx_mail_sg_commit_batch(ngx_mail_sg_batch_t *batch);
static void ngx_mail_sg_committed(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static void ngx_mail_sg_batch_committed(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static void ngx_mail_sg_batch_free(ngx_mail_sg_batch_t *batch);
static void ngx_mail_sg_commit_answer(ngx_mail_sg_ctx_t *ctx,
    ngx_uint_t rows, const char *err);
static void ngx_mail_sg_unmap(void *data);
static char *ngx_mail_sg_cstr(ngx_pool_t *pool, ngx_str_t *s);
static char *ngx_mail_sg_json(ngx_pool_t *pool, json_t *j);


ngx_int_t
ngx_mail_sg_data_start(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    ngx_uint_t               i;
    u_char                   rnd[8];
    ngx_mail_sg_srv_conf_t  *sscf;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

    ctx->data = ngx_palloc(ctx->tpool, sizeof(sg_smtp_data_t));
    ctx->scratch_size = 2 * (s->buffer->end - s->buffer->start) + 2;
    ctx->scratch = ngx_pnalloc(ctx->tpool, ctx->scratch_size);
    ctx->mem = ngx_create_temp_buf(ctx->tpool, NGX_MAIL_SG_MEM_BODY);
    ctx->headers = ngx_array_create(ctx->tpool, 16,
                                    sizeof(ngx_mail_sg_header_t));

    if (ctx->data == NULL || ctx->scratch == NULL || ctx->mem == NULL
        || ctx->headers == NULL)
    {
        return NGX_ERROR;
    }

    sg_smtp_data_init(ctx->data, (int) sscf->normalize,
                      sscf->max_header_size, sscf->max_headers,
                      ngx_mail_sg_header, ctx);

    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        return NGX_ERROR;
    }

    for (i = 0; i < sizeof(rnd); i++) {
        ngx_sprintf(ctx->queue_id + 2 * i, "%02Xd", rnd[i]);
    }

    ctx->queue_id[16] = '\0';

    ctx->tf = NULL;
    ctx->map = NULL;
    ctx->body_size = 0;
    ctx->rule_id = 0;
    ctx->too_big = 0;
    ctx->write_error = 0;
    ctx->tls_required_no = 0;
    ctx->in_data = 1;

    return NGX_OK;
}


/* consumes what the session buffer holds of the message */

ngx_int_t
ngx_mail_sg_data_read(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    size_t                   n, used, chunk;
    ngx_buf_t               *b;
    sg_smtp_data_t          *d;
    ngx_mail_sg_srv_conf_t  *sscf;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);
    b = s->buffer;
    d = ctx->data;

    while (b->pos < b->last && !d->done) {

        chunk = b->last - b->pos;

        if (chunk > (ctx->scratch_size - 2) / 2) {
            chunk = (ctx->scratch_size - 2) / 2;
        }

        used = sg_smtp_data_parse(d, b->pos, chunk, ctx->scratch, &n);
        b->pos += used;

        if ((d->bare && !sscf->normalize) || ctx->too_big
            || ctx->write_error || d->header_error)
        {
            /* refused: read on to the end of data, keep nothing */
            continue;
        }

        if (ctx->body_size + (off_t) n > sscf->max_message_size) {
            ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                          "client sent a message larger than %O octets",
                          sscf->max_message_size);
            ctx->too_big = 1;
            continue;
        }

        if (n && ngx_mail_sg_body_write(s, ctx, ctx->scratch, n) != NGX_OK) {
            ctx->write_error = 1;
        }
    }

    if (d->done) {
        ctx->in_data = 0;
        ngx_mail_sg_data_done(s, ctx);
    }

    return NGX_OK;
}


static void
ngx_mail_sg_header(void *data, const char *name, size_t name_len,
    const char *value, size_t value_len)
{
    ngx_mail_sg_ctx_t     *ctx = data;
    ngx_mail_sg_header_t  *h;

    /* RFC 8689, 5: "TLS-Required: No" */
    if (name_len == sizeof("TLS-Required") - 1
        && ngx_strncasecmp((u_char *) name, (u_char *) "TLS-Required",
                           name_len) == 0)
    {
        while (value_len && (value[value_len - 1] == ' '
                             || value[value_len - 1] == '\t'))
        {
            value_len--;
        }

        if (value_len == 2
            && ngx_strncasecmp((u_char *) value, (u_char *) "No", 2) == 0)
        {
            ctx->tls_required_no = 1;
        }
    }

    /* bounded by sg_smtp_max_headers and sg_smtp_max_header_size */

    h = ngx_array_push(ctx->headers);
    if (h == NULL) {
        return;
    }

    h->name.len = name_len;
    h->name.data = ngx_pnalloc(ctx->tpool, name_len);
    h->value.len = value_len;
    h->value.data = ngx_pnalloc(ctx->tpool, value_len + 1);

    if (h->name.data == NULL || h->value.data == NULL) {
        ctx->headers->nelts--;
        return;
    }

    ngx_memcpy(h->name.data, name, name_len);
    ngx_memcpy(h->value.data, value, value_len);
    h->value.data[value_len] = '\0';
}


/* at most 64 KiB in memory; the rest goes to an unlinked temporary file */

static ngx_int_t
ngx_mail_sg_body_write(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    u_char *p, size_t n)
{
    size_t  k;

    while (n) {
        k = ctx->mem->end - ctx->mem->last;

        if (k == 0) {
            if (ngx_mail_sg_body_flush(s, ctx) != NGX_OK) {
                return NGX_ERROR;
            }

            continue;
        }

        if (k > n) {
            k = n;
        }

        ctx->mem->last = ngx_cpymem(ctx->mem->last, p, k);
        ctx->body_size += k;
        p += k;
        n -= k;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_mail_sg_body_flush(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    ssize_t                  n;
    ngx_chain_t              cl;
    ngx_temp_file_t         *tf;
    ngx_mail_sg_srv_conf_t  *sscf;

    if (ctx->mem->last == ctx->mem->pos) {
        return NGX_OK;
    }

    if (ctx->tf == NULL) {
        sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);

        tf = ngx_pcalloc(ctx->tpool, sizeof(ngx_temp_file_t));
        if (tf == NULL) {
            return NGX_ERROR;
        }

        tf->file.fd = NGX_INVALID_FILE;
        tf->file.log = s->connection->log;
        tf->path = sscf->temp_path;
        tf->pool = ctx->tpool;
        tf->log_level = NGX_LOG_INFO;
        tf->warn = "a message is buffered to a temporary file";
        tf->persistent = 0;
        tf->clean = 1;

        ctx->tf = tf;
    }

    cl.buf = ctx->mem;
    cl.next = NULL;

    n = ngx_write_chain_to_temp_file(ctx->tf, &cl);

    if (n == NGX_ERROR || n != ctx->mem->last - ctx->mem->pos) {
        ngx_log_error(NGX_LOG_CRIT, s->connection->log, 0,
                      "sg: cannot write the message to a temporary file");
        return NGX_ERROR;
    }

    /* the caller keeps the offset (as ngx_http_request_body.c does) */
    ctx->tf->offset += n;

    ctx->mem->pos = ctx->mem->start;
    ctx->mem->last = ctx->mem->start;

    return NGX_OK;
}


static void
ngx_mail_sg_data_done(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    sg_smtp_data_t          *d;
    ngx_mail_sg_srv_conf_t  *sscf;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_sg_module);
    d = ctx->data;

    if (d->bare && !sscf->normalize) {
        /* RFC-NOTES: refused, and never two messages */
        ngx_log_error(NGX_LOG_NOTICE, s->connection->log, 0,
                      "sg: message refused: bare CR or LF in the data"
                      " (possible SMTP smuggling)");
        ngx_mail_sg_reply(s, ctx, "500 5.5.2 Error: bare CR or LF in"
                          " message data");
        ngx_mail_sg_log(s, ctx, "500 bare CR or LF");
        ngx_mail_sg_reset(ctx);
        return;
    }

    if (ctx->too_big) {
        /* RFC 1870, 6.2 */
        ngx_mail_sg_reply(s, ctx, "552 5.3.4 Error: message exceeds fixed"
                          " maximum message size");
        ngx_mail_sg_log(s, ctx, "552 too big");
        ngx_mail_sg_reset(ctx);
        return;
    }

    if (d->header_error) {
        ngx_mail_sg_reply(s, ctx, "552 5.3.4 Error: header section too"
                          " large or too many header fields");
        ngx_mail_sg_log(s, ctx, "552 header limits");
        ngx_mail_sg_reset(ctx);
        return;
    }

    if (ctx->write_error) {
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: cannot store the"
                          " message, try again later");
        ngx_mail_sg_log(s, ctx, "451 temporary file");
        ngx_mail_sg_reset(ctx);
        return;
    }

    ngx_mail_sg_content_filter(s, ctx);

    ctx->waiting = 1;

    if (ngx_mail_sg_received(s, ctx) != NGX_OK
        || ngx_mail_sg_commit(s, ctx) != NGX_OK)
    {
        ctx->waiting = 0;
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: queue unavailable,"
                          " message not accepted, try again later");
        ngx_mail_sg_log(s, ctx, "451 queue unavailable");
        ngx_mail_sg_reset(ctx);
        return;
    }
}


/* content filter rules: the first enabled rule whose conditions all match */

static void
ngx_mail_sg_content_filter(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    ngx_uint_t             i, j, k, ok, any;
    sg_rule_t             *rules;
    sg_lists_t            *lists;
    sg_rule_cond_t        *cond;
    ngx_mail_sg_rcpt_t    *r;
    ngx_mail_sg_header_t  *h;

    lists = sg_lists_current();
    if (lists == NULL) {
        return;
    }

    rules = lists->rules.elts;
    r = ctx->rcpts->elts;
    h = ctx->headers->elts;

    for (i = 0; i < lists->rules.nelts; i++) {

        ok = 1;

        for (j = 0; ok && j < rules[i].nconds; j++) {
            cond = &rules[i].conds[j];

            switch (cond->field) {

            case SG_RULE_SENDER:
                ok = ngx_mail_sg_cond_match(cond, &ctx->sender);
                break;

            case SG_RULE_RECIPIENT:
                any = 0;

                for (k = 0; !any && k < ctx->rcpts->nelts; k++) {
                    any = ngx_mail_sg_cond_match(cond, &r[k].original);
                }

                ok = any;
                break;

            default: /* SG_RULE_HEADER */
                any = 0;

                for (k = 0; !any && k < ctx->headers->nelts; k++) {
                    any = h[k].name.len == cond->header.len
                          && ngx_strncasecmp(h[k].name.data,
                                             cond->header.data,
                                             cond->header.len) == 0
                          && ngx_mail_sg_cond_match(cond, &h[k].value);
                }

                ok = any;
            }
        }

        if (!ok) {
            continue;
        }

        ctx->rule_id = rules[i].id;

        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "sg: content filter rule %L matched, action %V",
                      rules[i].id, &rules[i].action);
        return;
    }
}


static ngx_uint_t
ngx_mail_sg_cond_match(sg_rule_cond_t *cond, ngx_str_t *text)
{
    if (cond->regex) {
        return ngx_regex_exec(cond->regex, text, NULL, 0) >= 0;
    }

    if (cond->value.len == 0) {
        return 1;
    }

    return ngx_strlcasestrn(text->data, text->data + text->len,
                            cond->value.data, cond->value.len - 1)
           != NULL;
}


/* RFC 5321, 4.4, with RFC 3848's and RFC 6531's protocol names */

static ngx_int_t
ngx_mail_sg_received(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    u_char                    *p;
    size_t                     len;
    ngx_tm_t                   tm;
    const char                *proto;
    ngx_connection_t          *c;
    ngx_mail_sg_rcpt_t        *r;
    ngx_mail_core_srv_conf_t  *cscf;

    static const char  *week[] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri",
                                   "Sat" };
    static const char  *months[] = { "Jan", "Feb", "Mar", "Apr", "May",
                                     "Jun", "Jul", "Aug", "Sep", "Oct",
                                     "Nov", "Dec" };

    c = s->connection;
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    r = ctx->rcpts->elts;

    if (ctx->smtputf8) {
        proto = c->ssl ? "UTF8SMTPS" : "UTF8SMTP";

    } else if (s->esmtp) {
        proto = c->ssl ? "ESMTPS" : "ESMTP";

    } else {
        proto = "SMTP";
    }

    len = sizeof("Received: from  ( [])" CRLF "\tby  (sg) with "
                 CRLF "\t(using  with cipher )" CRLF "\tid " CRLF
                 "\tfor <>; Sun, 01 Jan 2026 00:00:00 +0000" CRLF)
          + ctx->helo.len + s->host.len + sizeof("unknown")
          + c->addr_text.len + cscf->server_name.len + 16
          + ctx->tls_protocol.len + ctx->tls_cipher.len + 16
          + r[0].original.len;

    ctx->received.data = ngx_pnalloc(ctx->tpool, len);
    if (ctx->received.data == NULL) {
        return NGX_ERROR;
    }

    ngx_gmtime(ngx_time(), &tm);

    p = ngx_sprintf(ctx->received.data, "Received: from %V (%V [%V])" CRLF
                    "\tby %V (sg) with %s" CRLF,
                    &ctx->helo,
                    s->host.len ? &s->host : &((ngx_str_t)
                                              ngx_string("unknown")),
                    &c->addr_text, &cscf->server_name, proto);

    if (c->ssl) {
        p = ngx_sprintf(p, "\t(using %V with cipher %V)" CRLF,
                        &ctx->tls_protocol, &ctx->tls_cipher);
    }

    p = ngx_sprintf(p, "\tid %s", ctx->queue_id);

    if (ctx->rcpts->nelts == 1) {
        p = ngx_sprintf(p, CRLF "\tfor <%V>", &r[0].original);
    }

    p = ngx_sprintf(p, "; %s, %02d %s %4d %02d:%02d:%02d +0000" CRLF,
                    week[tm.ngx_tm_wday], tm.ngx_tm_mday,
                    months[tm.ngx_tm_mon - 1], tm.ngx_tm_year,
                    tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec);

    ctx->received.len = p - ctx->received.data;

    return NGX_OK;
}


static ngx_int_t
ngx_mail_sg_commit(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx)
{
    char                 *rcpts, *sources;
    u_char               *body;
    size_t                body_len;
    ngx_str_t             listener;
    ngx_uint_t            i, requiretls;
    json_t               *ja, *js;
    ngx_connection_t     *c;
    ngx_pool_cleanup_t   *cln;
    ngx_mail_sg_rcpt_t   *r;
    u_char               *size, *rule, *port, *tmp;
    sg_pg_param_t        *p;
    u_char                src[600];

    c = s->connection;
    r = ctx->rcpts->elts;

    /* the body: in memory, or the temporary file mapped */

    if (ctx->tf) {
        if (ngx_mail_sg_body_flush(s, ctx) != NGX_OK) {
            return NGX_ERROR;
        }

        body_len = (size_t) ctx->body_size;
        body = NULL;

        if (body_len) {
            body = mmap(NULL, body_len, PROT_READ, MAP_SHARED,
                        ctx->tf->file.fd, 0);

            if (body == MAP_FAILED) {
                ngx_log_error(NGX_LOG_CRIT, c->log, ngx_errno,
                              "sg: mmap() of the message failed");
                return NGX_ERROR;
            }

            ctx->map = body;
            ctx->map_size = body_len;

            cln = ngx_pool_cleanup_add(ctx->tpool, 0);
            if (cln == NULL) {
                return NGX_ERROR;
            }

            cln->handler = ngx_mail_sg_unmap;
            cln->data = ctx;
        }

    } else {
        body = ctx->mem->pos;
        body_len = ctx->mem->last - ctx->mem->pos;
    }

    /* the envelope */

    ja = json_array();
    js = json_array();

    if (ja == NULL || js == NULL) {
        json_decref(ja);
        json_decref(js);
        return NGX_ERROR;
    }

    requiretls = ctx->requiretls_param;

    if (ctx->requiretls_param) {
        json_array_append_new(js, json_string("parameter"));
    }

    if (ctx->rule_id) {
        ngx_sprintf(src, "rule:%L%Z", ctx->rule_id);
        json_array_append_new(js, json_string((char *) src));
        requiretls = 1;
    }

    for (i = 0; i < ctx->rcpts->nelts; i++) {
        json_array_append_new(ja, json_pack("{s:s%,s:s%,s:s%,s:b,s:s?,s:s?}",
            "address", r[i].address.data, r[i].address.len,
            "original", r[i].original.data, r[i].original.len,
            "domain", r[i].domain.data, r[i].domain.len,
            "local", (int) r[i].local,
            "notify", r[i].notify.len ? (char *) r[i].notify.data : NULL,
            "orcpt", r[i].orcpt.len ? (char *) r[i].orcpt.data : NULL));

        if (r[i].requiretls) {
            ngx_snprintf(src, sizeof(src) - 1, "address:%V%Z",
                         &r[i].original);
            json_array_append_new(js, json_string((char *) src));
            requiretls = 1;
        }
    }

    ctx->requiretls = requiretls;

    rcpts = ngx_mail_sg_json(ctx->tpool, ja);
    sources = ngx_mail_sg_json(ctx->tpool, js);

    if (rcpts == NULL || sources == NULL) {
        return NGX_ERROR;
    }

    /*
     * The parameters are not copied by sg_pg_query_params(): everything
     * they point to lives in tpool (or ctx) until the answer comes.
     */

    p = ngx_pcalloc(ctx->tpool, 22 * sizeof(sg_pg_param_t));
    size = ngx_pnalloc(ctx->tpool, NGX_OFF_T_LEN + 1);
    rule = ngx_pnalloc(ctx->tpool, NGX_INT64_LEN + 1);
    port = ngx_pnalloc(ctx->tpool, NGX_INT_T_LEN + 1);
    tmp = ngx_pnalloc(ctx->tpool, NGX_SOCKADDR_STRLEN + 1);

    if (p == NULL || size == NULL || rule == NULL || port == NULL
        || tmp == NULL)
    {
        return NGX_ERROR;
    }

    *ngx_sprintf(size, "%O", (off_t) (ctx->received.len + body_len)) = '\0';
    *ngx_sprintf(rule, "%L", ctx->rule_id) = '\0';
    *ngx_sprintf(port, "%ui", (ngx_uint_t) ngx_inet_get_port(c->sockaddr))
        = '\0';

    listener.data = tmp;
    listener.len = NGX_SOCKADDR_STRLEN;

    if (ngx_connection_local_sockaddr(c, &listener, 1) != NGX_OK) {
        listener.len = 0;
    }

    tmp[listener.len] = '\0';

#define sg_p(i, s)  p[i].data = (const char *) (s);  p[i].len = 0

    sg_p(0, ctx->queue_id);
    sg_p(1, ctx->sender.data ? ctx->sender.data : (u_char *) "");
    sg_p(2, size);
    p[3].data = (const char *) ctx->received.data;
    p[3].len = ctx->received.len;
    p[3].binary = 1;
    p[4].data = body ? (const char *) body : "";
    p[4].len = body_len;
    p[4].binary = 1;
    sg_p(5, ctx->body_8bit ? "8BITMIME" : "7BIT");
    sg_p(6, ctx->smtputf8 ? "t" : "f");
    sg_p(7, ctx->ret.len ? (char *) ctx->ret.data : NULL);
    sg_p(8, ctx->envid.len ? ngx_mail_sg_cstr(ctx->tpool, &ctx->envid)
                           : NULL);
    sg_p(9, requiretls ? "t" : "f");
    sg_p(10, sources);
    sg_p(11, ctx->rule_id ? (char *) rule : NULL);
    /* RFC 8689, 5: ignored when the message requires TLS */
    sg_p(12, ctx->tls_required_no && !requiretls ? "t" : "f");
    sg_p(13, c->sockaddr->sa_family == AF_UNIX
             ? NULL : ngx_mail_sg_cstr(ctx->tpool, &c->addr_text));
    sg_p(14, port);
    sg_p(15, s->host.len ? ngx_mail_sg_cstr(ctx->tpool, &s->host) : NULL);
    sg_p(16, ngx_mail_sg_cstr(ctx->tpool, &ctx->helo));
    sg_p(17, s->esmtp ? "t" : "f");
    sg_p(18, ctx->tls_protocol.len
             ? ngx_mail_sg_cstr(ctx->tpool, &ctx->tls_protocol) : NULL);
    sg_p(19, ctx->tls_cipher.len
             ? ngx_mail_sg_cstr(ctx->tpool, &ctx->tls_cipher) : NULL);
    sg_p(20, tmp);
    sg_p(21, rcpts);

#undef sg_p

    ctx->commit_params = p;

    return ngx_mail_sg_commit_submit(ctx);
}


/*
 * NGX_OK: the commit's handler will answer the client (now or after the
 * commits running); NGX_ERROR: not queued, the caller answers 451.
 */

static ngx_int_t
ngx_mail_sg_commit_submit(ngx_mail_sg_ctx_t *ctx)
{
    ngx_mail_sg_commits_t  *cm;

    cm = &ngx_mail_sg_commits;

    if (!cm->init) {
        ngx_queue_init(&cm->waiting);
        cm->init = 1;
    }

    if (cm->running < NGX_MAIL_SG_COMMITS_RUNNING || ctx->tf) {
        return ngx_mail_sg_commit_one(ctx);
    }

    /* a commit runs (so a handler will come and send these) */

    if (sg_pg_up(sg_worker.pg) == 0) {
        return NGX_ERROR;
    }

    ngx_queue_insert_tail(&cm->waiting, &ctx->commit_queue);

    return NGX_OK;
}


static ngx_int_t
ngx_mail_sg_commit_one(ngx_mail_sg_ctx_t *ctx)
{
    ngx_int_t  rc;

    rc = sg_pg_exec_params(sg_worker.pg, &ngx_mail_sg_commit_stmt,
                           NGX_MAIL_SG_COMMIT_PARAMS, ctx->commit_params,
                           ngx_mail_sg_committed, ctx);

    if (rc != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, ctx->session->connection->log, 0,
                      "sg: cannot queue the message: postgresql: %s",
                      sg_pg_last_error(sg_worker.pg));
        return NGX_ERROR;
    }

    ngx_mail_sg_commits.running++;

    return NGX_OK;
}


/* after a commit: the messages that waited for it go, together */

static void
ngx_mail_sg_commit_next(void)
{
    ngx_uint_t              i;
    ngx_queue_t            *q;
    ngx_mail_sg_ctx_t      *ctx;
    ngx_mail_sg_batch_t    *batch;
    ngx_mail_sg_commits_t  *cm;

    cm = &ngx_mail_sg_commits;

    while (cm->running < NGX_MAIL_SG_COMMITS_RUNNING
           && !ngx_queue_empty(&cm->waiting))
    {
        batch = ngx_calloc(sizeof(ngx_mail_sg_batch_t), ngx_cycle->log);

        while (!ngx_queue_empty(&cm->waiting)
               && (batch == NULL || batch->n < NGX_MAIL_SG_BATCH_MAX))
        {
            q = ngx_queue_head(&cm->waiting);
            ngx_queue_remove(q);
            ctx = ngx_queue_data(q, ngx_mail_sg_ctx_t, commit_queue);

            if (batch == NULL) {
                /* out of memory: this one gets its 451 */
                ngx_mail_sg_commit_answer(ctx, 0, "out of memory");
                continue;
            }

            batch->ctx[batch->n++] = ctx;
        }

        if (batch == NULL) {
            return;
        }

        if (batch->n == 1) {
            ctx = batch->ctx[0];
            ngx_free(batch);

            if (ngx_mail_sg_commit_one(ctx) != NGX_OK) {
                ngx_mail_sg_commit_answer(ctx, 0, "postgresql unavailable");
            }

            continue;
        }

        if (ngx_mail_sg_commit_batch(batch) != NGX_OK) {
            ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                          "sg: cannot queue %ui messages: postgresql: %s",
                          batch->n, sg_pg_last_error(sg_worker.pg));

            for (i = 0; i < batch->n; i++) {
                ngx_mail_sg_commit_answer(batch->ctx[i], 0,
                                          "postgresql unavailable");
            }

            ngx_mail_sg_batch_free(batch);
        }
    }
}


/* the parameters of each message as one JSON array, the bodies as bytea[] */

static ngx_int_t
ngx_mail_sg_commit_batch(ngx_mail_sg_batch_t *batch)
{
    u_char             *b;
    size_t              len, n;
    uint32_t            v;
    json_t             *all, *one;
    ngx_int_t           rc;
    ngx_uint_t          i, k;
    sg_pg_param_t      *p, params[2];

    all = json_array();
    if (all == NULL) {
        return NGX_ERROR;
    }

    len = 5 * 4;

    for (i = 0; i < batch->n; i++) {
        p = batch->ctx[i]->commit_params;
        len += 4 + p[3].len + p[4].len;

        one = json_array();
        if (one == NULL || json_array_append_new(all, one) != 0) {
            json_decref(all);
            return NGX_ERROR;
        }

        for (k = 0; k < NGX_MAIL_SG_COMMIT_PARAMS; k++) {
            if (k == 3 || k == 4 || p[k].data == NULL) {
                rc = json_array_append_new(one, json_null());

            } else {
                rc = json_array_append_new(one,
                         json_stringn_nocheck(p[k].data,
                                              ngx_strlen(p[k].data)));
            }

            if (rc != 0) {
                json_decref(all);
                return NGX_ERROR;
            }
        }
    }

    batch->json = json_dumps(all, JSON_COMPACT);
    json_decref(all);

    batch->bodies = ngx_alloc(len, ngx_cycle->log);

    if (batch->json == NULL || batch->bodies == NULL) {
        return NGX_ERROR;
    }

    /* array_recv(): ndim, has nulls, element type, size, lower bound */

    b = batch->bodies;

#define sg_put32(x)  v = htonl((uint32_t) (x)); b = ngx_cpymem(b, &v, 4)

    sg_put32(1);
    sg_put32(0);
    sg_put32(17);                                    /* BYTEAOID */
    sg_put32(batch->n);
    sg_put32(1);

    for (i = 0; i < batch->n; i++) {
        p = batch->ctx[i]->commit_params;
        n = p[3].len + p[4].len;

        sg_put32(n);
        b = ngx_cpymem(b, p[3].data, p[3].len);
        b = ngx_cpymem(b, p[4].data, p[4].len);
    }

#undef sg_put32

    ngx_memzero(params, sizeof(params));
    params[0].data = batch->json;
    params[1].data = (const char *) batch->bodies;
    params[1].len = len;
    params[1].binary = 1;

    rc = sg_pg_exec_params(sg_worker.pg, &ngx_mail_sg_commit_batch_stmt, 2,
                           params, ngx_mail_sg_batch_committed, batch);

    if (rc != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_mail_sg_commits.running++;

    return NGX_OK;
}


static void
ngx_mail_sg_batch_committed(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_mail_sg_batch_t  *batch = data;

    int                 j, nrows;
    ngx_uint_t          i, rows, alone;
    ngx_mail_sg_ctx_t  *ctx;

    ngx_mail_sg_commits.running--;
    ngx_mail_sg_commit_next();

    /*
     * An error of the server rolled the whole batch back: one bad message
     * must not cost the others their 250, each goes again alone.  Not
     * after a lost connection or a timeout (the batch may have committed),
     * nor when the server is short of resources or shutting down.
     */

    alone = sg_pg_refused(err, sqlstate);

    if (err) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "sg: cannot queue %ui messages together: %s%s",
                      batch->n, err, alone ? ", trying each alone" : "");
    }

    nrows = res ? PQntuples(res) : 0;

    for (i = 0; i < batch->n; i++) {
        ctx = batch->ctx[i];

        if (alone) {
            if (ngx_mail_sg_commit_one(ctx) != NGX_OK) {
                ngx_mail_sg_commit_answer(ctx, 0, "postgresql unavailable");
            }

            continue;
        }

        rows = 0;

        for (j = 0; !err && j < nrows; j++) {
            if (ngx_strcmp(PQgetvalue(res, j, 0), ctx->queue_id) == 0) {
                rows++;
            }
        }

        ngx_mail_sg_commit_answer(ctx, rows, err);
    }

    ngx_mail_sg_batch_free(batch);
}


static void
ngx_mail_sg_batch_free(ngx_mail_sg_batch_t *batch)
{
    free(batch->json);

    if (batch->bodies) {
        ngx_free(batch->bodies);
    }

    ngx_free(batch);
}


static void
ngx_mail_sg_committed(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_mail_sg_ctx_t  *ctx = data;

    ngx_mail_sg_commits.running--;
    ngx_mail_sg_commit_next();

    ngx_mail_sg_commit_answer(ctx, err ? 0 : (ngx_uint_t) PQntuples(res),
                              err);
}


static void
ngx_mail_sg_commit_answer(ngx_mail_sg_ctx_t *ctx, ngx_uint_t rows,
    const char *err)
{
    ngx_mail_session_t  *s;

    s = ctx->session;
    ctx->waiting = 0;

    /*
     * The buffer still holds the unsent replies of commands pipelined with
     * the message (a 354 among them): the answer goes after them.
     */

    if (err || rows != ctx->rcpts->nelts) {
        ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                      "sg: cannot queue message %s: %s", ctx->queue_id,
                      err ? err : "recipients missing");
        ngx_mail_sg_reply(s, ctx, "451 4.3.0 Error: queue unavailable,"
                          " message not accepted, try again later");
        ngx_mail_sg_log(s, ctx, "451 queue unavailable");

    } else {
        ngx_mail_sg_reply(s, ctx, "250 2.0.0 Ok: queued as %s",
                          ctx->queue_id);
        ngx_mail_sg_log(s, ctx, "250 queued");
    }

    ngx_mail_sg_reset(ctx);
    ngx_mail_sg_flush(s, ctx);
}


static void
ngx_mail_sg_unmap(void *data)
{
    ngx_mail_sg_ctx_t  *ctx = data;

    if (ctx->map) {
        munmap(ctx->map, ctx->map_size);
        ctx->map = NULL;
    }
}


/* one line per transaction */

void
ngx_mail_sg_log(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *result)
{
    u_char              *p, *last;
    ngx_uint_t           i;
    ngx_mail_sg_rcpt_t  *r;
    u_char               to[1024];

    r = ctx->rcpts->elts;
    p = to;
    last = to + sizeof(to) - 4;

    for (i = 0; i < ctx->rcpts->nelts && p < last; i++) {
        p = ngx_slprintf(p, last, "%s<%V>", i ? "," : "", &r[i].original);
    }

    if (i < ctx->rcpts->nelts) {
        p = ngx_cpymem(p, "...", 3);
    }

    ctx->logged = 1;

    ngx_log_error(NGX_LOG_NOTICE, s->connection->log, 0,
                  "sg: id=%s client=%V tls=%V%s%V from=<%V> to=%*s"
                  " size=%O requiretls=%s rule=%L result=\"%s\"",
                  ctx->queue_id, &s->connection->addr_text,
                  ctx->tls_protocol.len ? &ctx->tls_protocol
                                        : &((ngx_str_t) ngx_string("none")),
                  ctx->tls_cipher.len ? "/" : "", &ctx->tls_cipher,
                  &ctx->sender, p - to, to,
                  (off_t) (ctx->body_size + ctx->received.len),
                  (ctx->requiretls || ctx->requiretls_param) ? "yes" : "no",
                  ctx->rule_id, result);
}


static char *
ngx_mail_sg_cstr(ngx_pool_t *pool, ngx_str_t *s)
{
    u_char  *p;

    p = ngx_pnalloc(pool, s->len + 1);
    if (p == NULL) {
        return "";
    }

    ngx_memcpy(p, s->data, s->len);
    p[s->len] = '\0';

    return (char *) p;
}


/* a copy in the pool; the JSON value is released */

static char *
ngx_mail_sg_json(ngx_pool_t *pool, json_t *j)
{
    char       *text;
    ngx_str_t   t;

    text = json_dumps(j, JSON_COMPACT);
    json_decref(j);

    if (text == NULL) {
        return NULL;
    }

    t.data = (u_char *) text;
    t.len = ngx_strlen(text);

    text = ngx_mail_sg_cstr(pool, &t);
    free(t.data);

    return text[0] ? text : NULL;
}
