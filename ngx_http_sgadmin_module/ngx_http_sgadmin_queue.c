/*
 * sg: /api/v1/queue — the list, one message with its recipients and
 * delivery attempts, retry now, delete (with or without a bounce).
 *
 * PostgreSQL builds the JSON: one statement per answer, no rows held here.
 * A write changes the recipients, writes its audit row and NOTIFYs
 * sg_queue (the delivery engine wakes) in one statement.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"


#define NGX_HTTP_SGADMIN_QUEUE_MAX_LIMIT  500

/* extra: more members of the object, each after a comma */

#define NGX_HTTP_SGADMIN_MESSAGE_JSON(extra)                                 \
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
    " 'dsn_of', m.dsn_of, 'last_attempt_at', m.last_attempt_at,"             \
    " 'recipients', (SELECT coalesce(json_agg(json_build_object("            \
    "   'id', r.id, 'address', r.address,"                                   \
    "   'original_address', r.original_address, 'domain', r.domain,"         \
    "   'local_domain', r.local_domain, 'state', r.state,"                   \
    "   'notify', r.dsn_notify, 'orcpt', r.dsn_orcpt,"                       \
    "   'next_attempt_at', r.next_attempt_at, 'attempts', r.attempts,"       \
    "   'last_reply', r.last_reply, 'final_at', r.final_at,"                 \
    "   'dsn_status', r.dsn_status, 'dsn_action', r.dsn_action,"             \
    "   'dsn_remote_mta', r.dsn_remote_mta) ORDER BY r.id), '[]')"           \
    "   FROM recipients r WHERE r.message_id = m.id)"                        \
    extra ")"

/* every delivery attempt of the message m, oldest first */

#define NGX_HTTP_SGADMIN_ATTEMPTS_JSON                                       \
    ", 'attempts', (SELECT coalesce(json_agg(json_build_object("             \
    "   'id', a.id, 'message_id', a.message_id,"                             \
    "   'recipients', to_json(a.recipients), 'started_at', a.started_at,"    \
    "   'ended_at', a.ended_at, 'destination', a.destination,"               \
    "   'mx_host', a.mx_host, 'ip', host(a.ip), 'port', a.port,"             \
    "   'tls_level', a.tls_level, 'tls_rule', a.tls_rule,"                   \
    "   'tls_reason', a.tls_reason, 'starttls', a.starttls,"                 \
    "   'tls_protocol', a.tls_protocol, 'tls_cipher', a.tls_cipher,"         \
    "   'tls_verify', a.tls_verify, 'tls_host_match', a.tls_host_match,"     \
    "   'tls_result_type', a.tls_result_type, 'result', a.result,"           \
    "   'reply', a.reply, 'worker', a.worker,"                               \
    "   'policy', json_build_object('type', a.policy_type,"                  \
    "     'domain', a.policy_domain, 'id', a.policy_id,"                     \
    "     'mode', a.policy_mode, 'text', a.policy_text,"                     \
    "     'result_type', a.policy_result_type,"                              \
    "     'reason', a.policy_reason),"                                       \
    "   'requirements', a.requirements)"                                     \
    "   ORDER BY a.started_at, a.id), '[]')"                                 \
    "   FROM delivery_attempts a WHERE a.message_id = m.id)"

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
    NGX_HTTP_SGADMIN_MESSAGE_JSON("")                                        \
    "   ORDER BY m.received_at DESC, m.id DESC) FROM items m), '[]'),"       \
    " 'next_cursor', CASE WHEN (SELECT count(*) FROM page) > $6::int"        \
    "   THEN (SELECT to_char(received_at AT TIME ZONE 'UTC',"                \
    "     'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') || '_' || id FROM items"      \
    "     ORDER BY received_at, id LIMIT 1) END)::text"

#define NGX_HTTP_SGADMIN_QUEUE_ONE                                           \
    "SELECT " NGX_HTTP_SGADMIN_MESSAGE_JSON(NGX_HTTP_SGADMIN_ATTEMPTS_JSON)  \
    "::text FROM messages m WHERE m.id = upper($1)"

#define NGX_HTTP_SGADMIN_QUEUE_AUDIT(action, recipients)                     \
    " aud AS ("                                                              \
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"   \
    "                         new, client)"                                  \
    "  SELECT $1, $2::bigint, 'queue." action "', 'message:' || m.id, NULL," \
    "    jsonb_build_object(" recipients "), $3"                             \
    "  FROM m WHERE EXISTS (SELECT 1 FROM chg)"                              \
    ")"

/* the delivery engine wakes when the transaction commits */

#define NGX_HTTP_SGADMIN_QUEUE_NOTIFY                                        \
    " ntf AS (SELECT pg_notify('sg_queue', 'api')"                              \
    "  FROM (SELECT 1 FROM chg LIMIT 1) x)"

/*
 * $1 actor, $2 token id, $3 client, $4 id.  The answer: the JSON, the
 * recipients changed, the NOTIFYs sent; no row: no such message.
 */

#define NGX_HTTP_SGADMIN_QUEUE_RETRY                                         \
    "WITH m AS (SELECT id FROM messages WHERE id = upper($4)),"              \
    " chg AS (UPDATE recipients r SET next_attempt_at = now()"               \
    "  FROM m WHERE r.message_id = m.id"                                     \
    "  AND r.state IN ('queued', 'deferred') RETURNING r.id, r.address),"    \
    NGX_HTTP_SGADMIN_QUEUE_NOTIFY ","                                        \
    NGX_HTTP_SGADMIN_QUEUE_AUDIT("retry",                                    \
        "'recipients_due', (SELECT jsonb_agg(c.address ORDER BY c.id)"       \
        " FROM chg c)")                                                      \
    " SELECT json_build_object('id', m.id,"                                  \
    "   'recipients_due', (SELECT count(*) FROM chg))::text,"                \
    "  (SELECT count(*) FROM chg), (SELECT count(*) FROM ntf) FROM m"

/*
 * $5 bounce: recipients not yet final end as bounced (a DSN is due for
 * those that asked for one, RFC 3461 4.1) or deleted.  One being delivered
 * now loses its claim: the engine's result for it is not recorded.
 */

#define NGX_HTTP_SGADMIN_QUEUE_DELETE                                        \
    "WITH m AS (SELECT id, sender FROM messages WHERE id = upper($4)),"      \
    " chg AS (UPDATE recipients r SET"                                       \
    "  state = CASE WHEN $5::boolean THEN 'bounced' ELSE 'deleted' END,"     \
    "  final_at = now(), last_reply = 'deleted by an administrator',"        \
    "  dsn_status = '5.0.0', dsn_action = 'failed',"                         \
    "  dsn_due = $5::boolean AND m.sender <> ''"                             \
    "   AND (r.dsn_notify IS NULL OR r.dsn_notify LIKE '%FAILURE%'),"        \
    "  claimed_by = NULL, lease_until = NULL"                                \
    "  FROM m WHERE r.message_id = m.id"                                     \
    "  AND r.state IN ('queued', 'deferred', 'delivering')"                  \
    "  RETURNING r.id, r.address),"                                          \
    NGX_HTTP_SGADMIN_QUEUE_NOTIFY ","                                        \
    NGX_HTTP_SGADMIN_QUEUE_AUDIT("delete",                                   \
        "'bounce', $5::boolean, 'recipients', (SELECT jsonb_agg(c.address"   \
        " ORDER BY c.id) FROM chg c)")                                       \
    " SELECT m.id, (SELECT count(*) FROM chg), (SELECT count(*) FROM ntf)"   \
    " FROM m"


typedef struct {
    ngx_http_sgadmin_ctx_t       *ctx;
    ngx_uint_t                    retry;       /* else delete */
    u_char                        id[17];
} ngx_http_sgadmin_queue_op_t;


static ngx_int_t ngx_http_sgadmin_queue_id(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, u_char *id);
static ngx_http_sgadmin_queue_op_t *ngx_http_sgadmin_queue_op(
    ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx, ngx_uint_t retry);
static void ngx_http_sgadmin_queue_op_done(void *data, PGresult *res,
    const char *err, const char *sqlstate);
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
    const char  *params[1];
    u_char       id[17];

    if (ngx_http_sgadmin_queue_id(r, ctx, id) != NGX_OK) {
        return;
    }

    params[0] = (const char *) id;

    if (sg_pg_query(sg_worker.pg, NGX_HTTP_SGADMIN_QUEUE_ONE, 1, params,
                    ngx_http_sgadmin_queue_done, ctx)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


/* POST /api/v1/queue/{id}/retry: what waits is due now */

void
ngx_http_sgadmin_queue_retry(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    json_t                       *errors;
    const char                   *params[4];
    u_char                        token[NGX_INT64_LEN + 1];
    ngx_http_sgadmin_queue_op_t  *op;

    static const char *const  none[] = { NULL };

    /* no parameters: an empty body, or {} */

    errors = json_array();
    ngx_http_sgadmin_known_fields(ctx->body, "", none, errors);

    if (ngx_http_sgadmin_refuse(r, errors, "retry takes no parameters")
        != NGX_OK)
    {
        return;
    }

    op = ngx_http_sgadmin_queue_op(r, ctx, 1);
    if (op == NULL) {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);
    params[3] = (const char *) op->id;

    if (sg_pg_query(sg_worker.pg, NGX_HTTP_SGADMIN_QUEUE_RETRY, 4, params,
                    ngx_http_sgadmin_queue_op_done, op)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


/* DELETE /api/v1/queue/{id}?bounce=true|false */

void
ngx_http_sgadmin_queue_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_str_t                     bounce;
    const char                   *params[5];
    u_char                        token[NGX_INT64_LEN + 1];
    ngx_http_sgadmin_queue_op_t  *op;

    if (ngx_http_sgadmin_queue_arg(r, "bounce", &bounce) != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    if (bounce.data && ngx_strcmp(bounce.data, "true") != 0
        && ngx_strcmp(bounce.data, "false") != 0)
    {
        ngx_http_sgadmin_queue_invalid(r, "bounce", "must be true or false");
        return;
    }

    op = ngx_http_sgadmin_queue_op(r, ctx, 0);
    if (op == NULL) {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);
    params[3] = (const char *) op->id;
    params[4] = bounce.data ? (const char *) bounce.data : "false";

    if (sg_pg_query(sg_worker.pg, NGX_HTTP_SGADMIN_QUEUE_DELETE, 5, params,
                    ngx_http_sgadmin_queue_op_done, op)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


/* the queue id of the path (16 hex digits, any case), or 404 */

static ngx_int_t
ngx_http_sgadmin_queue_id(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    u_char *id)
{
    u_char  *p;

    if (ctx->param.len != 16) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no message has this id", NULL);
        return NGX_ERROR;
    }

    for (p = ctx->param.data; p < ctx->param.data + 16; p++) {
        if (!((*p >= '0' && *p <= '9') || (*p >= 'A' && *p <= 'F')
              || (*p >= 'a' && *p <= 'f')))
        {
            ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                     "no message has this id", NULL);
            return NGX_ERROR;
        }
    }

    ngx_memcpy(id, ctx->param.data, 16);
    id[16] = '\0';

    return NGX_OK;
}


static ngx_http_sgadmin_queue_op_t *
ngx_http_sgadmin_queue_op(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    ngx_uint_t retry)
{
    ngx_http_sgadmin_queue_op_t  *op;

    op = ngx_palloc(r->pool, sizeof(ngx_http_sgadmin_queue_op_t));
    if (op == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NULL;
    }

    op->ctx = ctx;
    op->retry = retry;

    if (ngx_http_sgadmin_queue_id(r, ctx, op->id) != NGX_OK) {
        return NULL;
    }

    return op;
}


/*
 * Retry answers its JSON, or 409 when nothing was waiting; delete answers
 * the message as it is now (a second query: the statement's own changes
 * are not visible to it).
 */

static void
ngx_http_sgadmin_queue_op_done(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_queue_op_t  *op = data;

    const char              *params[1];
    ngx_http_request_t      *r;
    ngx_http_sgadmin_ctx_t  *ctx;

    ctx = op->ctx;
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

    if (op->retry && ngx_strcmp(PQgetvalue(res, 0, 1), "0") == 0) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_CONFLICT, "nothing-pending",
                                 "no recipient of this message is queued or"
                                 " deferred: there is nothing to retry",
                                 NULL);
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                  "sgadmin: %V %V by %s: %s recipients", &r->method_name,
                  &r->uri, ctx->actor, PQgetvalue(res, 0, 1));

    if (op->retry) {
        ngx_http_sgadmin_send_text(r, NGX_HTTP_OK, PQgetvalue(res, 0, 0),
                                   PQgetlength(res, 0, 0), NULL);
        return;
    }

    params[0] = (const char *) op->id;

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
