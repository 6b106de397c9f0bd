/*
 * sg: GET /api/v1/queue and GET /api/v1/queue/{id}.
 *
 * PostgreSQL builds the JSON: one statement per answer, no rows held here.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"


#define NGX_HTTP_SGADMIN_QUEUE_MAX_LIMIT  500

#define NGX_HTTP_SGADMIN_MESSAGE_JSON                                        \
    "json_build_object("                                                     \
    " 'id', m.id, 'received_at', m.received_at, 'sender', m.sender,"         \
    " 'size', m.size, 'body_type', m.body_type, 'smtputf8', m.smtputf8,"     \
    " 'dsn', json_build_object('ret', m.dsn_ret, 'envid', m.dsn_envid),"     \
    " 'requiretls', json_build_object('flagged', m.requiretls,"              \
    "   'sources', m.requiretls_sources),"                                   \
    " 'content_filter_rule_id', m.content_filter_rule_id,"                   \
    " 'tls_required_no', m.tls_required_no,"                                 \
    " 'client', json_build_object('ip', host(m.client_ip),"                  \
    "   'port', m.client_port, 'name', m.client_name, 'helo', m.helo,"       \
    "   'esmtp', m.esmtp, 'listener', m.listener),"                          \
    " 'tls', CASE WHEN m.tls_protocol IS NULL THEN NULL"                     \
    "   ELSE json_build_object('protocol', m.tls_protocol,"                  \
    "   'cipher', m.tls_cipher) END,"                                        \
    " 'recipients', (SELECT coalesce(json_agg(json_build_object("            \
    "   'id', r.id, 'address', r.address,"                                   \
    "   'original_address', r.original_address, 'domain', r.domain,"         \
    "   'local_domain', r.local_domain, 'state', r.state,"                   \
    "   'notify', r.dsn_notify, 'orcpt', r.dsn_orcpt,"                       \
    "   'next_attempt_at', r.next_attempt_at, 'attempts', r.attempts,"       \
    "   'last_reply', r.last_reply) ORDER BY r.id), '[]')"                   \
    "   FROM recipients r WHERE r.message_id = m.id))"

#define NGX_HTTP_SGADMIN_QUEUE_LIST                                          \
    "WITH page AS ("                                                         \
    " SELECT m.* FROM messages m"                                            \
    " WHERE ($1::text IS NULL OR EXISTS (SELECT 1 FROM recipients r"         \
    "        WHERE r.message_id = m.id AND r.state = $1))"                   \
    "   AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM recipients r"         \
    "        WHERE r.message_id = m.id AND r.domain = lower($2)))"           \
    "   AND ($3::text IS NULL OR lower(m.sender) = lower($3))"               \
    "   AND ($4::timestamptz IS NULL"                                        \
    "        OR (m.received_at, m.id) < ($4::timestamptz, $5::text))"        \
    " ORDER BY m.received_at DESC, m.id DESC LIMIT $6::int + 1"              \
    "), items AS ("                                                          \
    " SELECT * FROM page ORDER BY received_at DESC, id DESC LIMIT $6::int"   \
    ")"                                                                      \
    " SELECT json_build_object('items', coalesce((SELECT json_agg("          \
    NGX_HTTP_SGADMIN_MESSAGE_JSON                                            \
    "   ORDER BY m.received_at DESC, m.id DESC) FROM items m), '[]'),"       \
    " 'next_cursor', CASE WHEN (SELECT count(*) FROM page) > $6::int"        \
    "   THEN (SELECT to_char(received_at AT TIME ZONE 'UTC',"                \
    "     'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') || '_' || id FROM items"      \
    "     ORDER BY received_at, id LIMIT 1) END)::text"

#define NGX_HTTP_SGADMIN_QUEUE_ONE                                           \
    "SELECT " NGX_HTTP_SGADMIN_MESSAGE_JSON "::text"                         \
    " FROM messages m WHERE m.id = upper($1)"


static ngx_int_t ngx_http_sgadmin_queue_arg(ngx_http_request_t *r,
    const char *name, ngx_str_t *value);
static void ngx_http_sgadmin_queue_done(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static void ngx_http_sgadmin_queue_invalid(ngx_http_request_t *r,
    const char *field, const char *message);


void
ngx_http_sgadmin_queue_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    u_char      *p, *sep;
    ngx_int_t    limit;
    ngx_str_t    state, domain, sender, cursor, lim;
    ngx_uint_t   i;
    const char  *params[6];
    u_char       limit_text[NGX_INT_T_LEN + 1];

    static const char  *states[] = { "queued", "delivering", "deferred",
                                     "delivered", "bounced", "deleted",
                                     NULL };

    if (ngx_http_sgadmin_queue_arg(r, "state", &state) != NGX_OK
        || ngx_http_sgadmin_queue_arg(r, "domain", &domain) != NGX_OK
        || ngx_http_sgadmin_queue_arg(r, "sender", &sender) != NGX_OK
        || ngx_http_sgadmin_queue_arg(r, "cursor", &cursor) != NGX_OK
        || ngx_http_sgadmin_queue_arg(r, "limit", &lim) != NGX_OK)
    {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    ngx_memzero(params, sizeof(params));

    if (state.data) {
        for (i = 0; states[i]; i++) {
            if (ngx_strcmp(state.data, states[i]) == 0) {
                break;
            }
        }

        if (states[i] == NULL) {
            ngx_http_sgadmin_queue_invalid(r, "state",
                "must be queued, delivering, deferred, delivered, bounced"
                " or deleted");
            return;
        }

        params[0] = (const char *) state.data;
    }

    if (domain.data) {
        if (domain.len > 255) {
            ngx_http_sgadmin_queue_invalid(r, "domain", "is too long");
            return;
        }

        params[1] = (const char *) domain.data;
    }

    if (sender.data) {
        if (sender.len > 512) {
            ngx_http_sgadmin_queue_invalid(r, "sender", "is too long");
            return;
        }

        params[2] = (const char *) sender.data;
    }

    if (cursor.data) {
        /* "<received_at>_<id>", as given in next_cursor */
        sep = (u_char *) ngx_strchr(cursor.data, '_');

        if (sep == NULL || sep - cursor.data > 40
            || ngx_strlen(sep + 1) != 16)
        {
            ngx_http_sgadmin_queue_invalid(r, "cursor", "is not a cursor"
                                           " this API gave");
            return;
        }

        for (p = cursor.data; p < sep; p++) {
            if (ngx_strchr("0123456789-:.TZ", *p) == NULL) {
                ngx_http_sgadmin_queue_invalid(r, "cursor", "is not a"
                                               " cursor this API gave");
                return;
            }
        }

        for (p = sep + 1; *p; p++) {
            if (ngx_strchr("0123456789ABCDEF", *p) == NULL) {
                ngx_http_sgadmin_queue_invalid(r, "cursor", "is not a"
                                               " cursor this API gave");
                return;
            }
        }

        *sep = '\0';
        params[3] = (const char *) cursor.data;
        params[4] = (const char *) sep + 1;
    }

    limit = 100;

    if (lim.data) {
        limit = ngx_atoi(lim.data, lim.len);

        if (limit < 1 || limit > NGX_HTTP_SGADMIN_QUEUE_MAX_LIMIT) {
            ngx_http_sgadmin_queue_invalid(r, "limit",
                                           "must be an integer from 1"
                                           " to 500");
            return;
        }
    }

    *ngx_sprintf(limit_text, "%i", limit) = '\0';
    params[5] = (const char *) limit_text;

    if (sg_pg_query(sg_worker.pg, NGX_HTTP_SGADMIN_QUEUE_LIST, 6, params,
                    ngx_http_sgadmin_queue_done, ctx)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


void
ngx_http_sgadmin_queue_get(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx)
{
    u_char      *p;
    const char  *params[1];
    u_char       id[17];

    if (ctx->param.len != 16) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no message has this id", NULL);
        return;
    }

    for (p = ctx->param.data; p < ctx->param.data + 16; p++) {
        if (!((*p >= '0' && *p <= '9') || (*p >= 'A' && *p <= 'F')
              || (*p >= 'a' && *p <= 'f')))
        {
            ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                     "no message has this id", NULL);
            return;
        }
    }

    ngx_memcpy(id, ctx->param.data, 16);
    id[16] = '\0';
    params[0] = (const char *) id;

    if (sg_pg_query(sg_worker.pg, NGX_HTTP_SGADMIN_QUEUE_ONE, 1, params,
                    ngx_http_sgadmin_queue_done, ctx)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


static void
ngx_http_sgadmin_queue_done(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_ctx_t  *ctx = data;
    ngx_http_request_t      *r;

    r = ctx->request;

    if (err) {
        ngx_http_sgadmin_db_error(r, err);
        return;
    }

    if (PQntuples(res) != 1) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no message has this id", NULL);
        return;
    }

    ngx_http_sgadmin_send_text(r, NGX_HTTP_OK, PQgetvalue(res, 0, 0),
                               PQgetlength(res, 0, 0), NULL);
}


/* a query argument, unescaped and NUL-terminated; data NULL if absent */

static ngx_int_t
ngx_http_sgadmin_queue_arg(ngx_http_request_t *r, const char *name,
    ngx_str_t *value)
{
    u_char     *dst, *src;
    ngx_str_t   raw;

    ngx_str_null(value);

    if (ngx_http_arg(r, (u_char *) name, ngx_strlen(name), &raw) != NGX_OK) {
        return NGX_OK;
    }

    value->data = ngx_pnalloc(r->pool, raw.len + 1);
    if (value->data == NULL) {
        return NGX_ERROR;
    }

    dst = value->data;
    src = raw.data;

    ngx_unescape_uri(&dst, &src, raw.len, NGX_UNESCAPE_URI);

    value->len = dst - value->data;
    *dst = '\0';

    if (ngx_strlen(value->data) != value->len) {
        /* an escaped NUL */
        value->len = ngx_strlen(value->data);
    }

    return NGX_OK;
}


static void
ngx_http_sgadmin_queue_invalid(ngx_http_request_t *r, const char *field,
    const char *message)
{
    json_t  *errors;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "sgadmin: %V: \"%s\" %s", &r->uri, field, message);

    errors = json_pack("[{s:s,s:s}]", "field", field, "message", message);

    ngx_http_sgadmin_problem(r, 422, "validation",
                             "the query parameters are not valid", errors);
    json_decref(errors);
}
