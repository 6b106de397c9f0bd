/*
 * sg: the simple lists of the admin API — the STARTTLS whitelist, the
 * STARTTLS required list and the relay networks — and the helpers shared
 * with domains, rules, routes and the queue: one query per request
 * answered by a generic handler, validation errors, pagination.
 *
 * Every write is one statement that also writes its audit_log row (a CTE),
 * so no change goes unaudited; the tables' triggers NOTIFY sg_lists.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"
#include "sg_addr.h"


/* items; t is the alias of the row */

#define NGX_HTTP_SGADMIN_WL_ITEM(t)                                          \
    "json_build_object('id', " t ".id, 'value', " t ".value,"                \
    " 'kind', " t ".kind, 'comment', " t ".comment,"                         \
    " 'created_at', " t ".created_at)"

#define NGX_HTTP_SGADMIN_RELAY_ITEM(t)                                       \
    "json_build_object('id', " t ".id, 'value', " t ".value::text,"          \
    " 'comment', " t ".comment, 'created_at', " t ".created_at)"


/* $1 cursor (id), $2 limit: one more row than asked says there are more */

#define NGX_HTTP_SGADMIN_LIST(table, item)                                   \
    "WITH page AS ("                                                         \
    "  SELECT * FROM " table " WHERE id > $1::bigint"                        \
    "  ORDER BY id LIMIT $2::int + 1"                                        \
    "), items AS ("                                                          \
    "  SELECT * FROM page ORDER BY id LIMIT $2::int"                         \
    ")"                                                                      \
    " SELECT json_build_object("                                             \
    "  'items', coalesce((SELECT json_agg(" item("i") " ORDER BY i.id)"      \
    "                     FROM items i), '[]'::json),"                       \
    "  'next_cursor', CASE WHEN (SELECT count(*) FROM page) > $2::int"       \
    "    THEN (SELECT max(id) FROM items)::text END)::text"

/* $1 actor, $2 token id, $3 client, $4 id */

#define NGX_HTTP_SGADMIN_DELETE(table, object, item)                         \
    "WITH del AS ("                                                          \
    "  DELETE FROM " table " WHERE id = $4::bigint RETURNING *"              \
    "), aud AS ("                                                            \
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"   \
    "                         new, client)"                                  \
    "  SELECT $1, $2::bigint, '" table ".delete', '" object ":' || d.id,"    \
    "    " item("d") "::jsonb, NULL, $3"                                     \
    "  FROM del d"                                                           \
    ")"                                                                      \
    " SELECT '' FROM del"


/* $4 value, $5 kind, $6 comment: the whitelist and the required list */

#define NGX_HTTP_SGADMIN_PEER_CREATE(table)                                  \
    "WITH ins AS ("                                                          \
    "  INSERT INTO " table " (value, kind, comment)"                         \
    "  VALUES ($4, $5, $6) RETURNING *"                                      \
    "), aud AS ("                                                            \
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"   \
    "                         new, client)"                                  \
    "  SELECT $1, $2::bigint, '" table ".create',"                           \
    "    '" table ":' || i.id, NULL,"                                        \
    "    " NGX_HTTP_SGADMIN_WL_ITEM("i") "::jsonb, $3"                       \
    "  FROM ins i"                                                           \
    ")"                                                                      \
    " SELECT " NGX_HTTP_SGADMIN_WL_ITEM("i") "::text FROM ins i"


static const char  ngx_http_sgadmin_wl_list[] =
    NGX_HTTP_SGADMIN_LIST("starttls_whitelist", NGX_HTTP_SGADMIN_WL_ITEM);

static const char  ngx_http_sgadmin_wl_delete[] =
    NGX_HTTP_SGADMIN_DELETE("starttls_whitelist", "starttls_whitelist",
                            NGX_HTTP_SGADMIN_WL_ITEM);

static const char  ngx_http_sgadmin_wl_create[] =
    NGX_HTTP_SGADMIN_PEER_CREATE("starttls_whitelist");

static const char  ngx_http_sgadmin_req_list[] =
    NGX_HTTP_SGADMIN_LIST("starttls_required", NGX_HTTP_SGADMIN_WL_ITEM);

static const char  ngx_http_sgadmin_req_delete[] =
    NGX_HTTP_SGADMIN_DELETE("starttls_required", "starttls_required",
                            NGX_HTTP_SGADMIN_WL_ITEM);

static const char  ngx_http_sgadmin_req_create[] =
    NGX_HTTP_SGADMIN_PEER_CREATE("starttls_required");

static const char  ngx_http_sgadmin_relay_list_sql[] =
    NGX_HTTP_SGADMIN_LIST("relay_networks", NGX_HTTP_SGADMIN_RELAY_ITEM);

static const char  ngx_http_sgadmin_relay_delete_sql[] =
    NGX_HTTP_SGADMIN_DELETE("relay_networks", "relay_network",
                            NGX_HTTP_SGADMIN_RELAY_ITEM);

/* $4 value, $5 comment */

static const char  ngx_http_sgadmin_relay_create_sql[] =
    "WITH ins AS ("
    "  INSERT INTO relay_networks (value, comment)"
    "  VALUES ($4::cidr, $5) RETURNING *"
    "), aud AS ("
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"
    "                         new, client)"
    "  SELECT $1, $2::bigint, 'relay_networks.create',"
    "    'relay_network:' || i.id, NULL,"
    "    " NGX_HTTP_SGADMIN_RELAY_ITEM("i") "::jsonb, $3"
    "  FROM ins i"
    ")"
    " SELECT " NGX_HTTP_SGADMIN_RELAY_ITEM("i") "::text FROM ins i";


typedef struct {
    ngx_http_sgadmin_ctx_t       *ctx;
    ngx_uint_t                    status;      /* 200, 201 or 204 */
    const char                   *conflict;    /* detail of a 409 */
} ngx_http_sgadmin_op_t;


/* a simple list: what differs between them */

typedef struct {
    const char                   *create;      /* SQL */
    ngx_uint_t                    relay;       /* a network, no kind */
    const char                   *invalid;     /* detail of a 422 */
    const char                   *conflict;    /* detail of a 409 */
} ngx_http_sgadmin_list_t;


static const ngx_http_sgadmin_list_t  ngx_http_sgadmin_whitelist = {
    ngx_http_sgadmin_wl_create, 0,
    "the whitelist entry is not valid",
    "this value is already in the STARTTLS whitelist"
};

static const ngx_http_sgadmin_list_t  ngx_http_sgadmin_required = {
    ngx_http_sgadmin_req_create, 0,
    "the STARTTLS required entry is not valid",
    "this value is already in the STARTTLS required list"
};

static const ngx_http_sgadmin_list_t  ngx_http_sgadmin_relay = {
    ngx_http_sgadmin_relay_create_sql, 1,
    "the relay network is not valid",
    "this network is already a relay network"
};


static void ngx_http_sgadmin_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, const ngx_http_sgadmin_list_t *list);
static void ngx_http_sgadmin_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, const char *sql);
static void ngx_http_sgadmin_op_done(void *data, PGresult *res,
    const char *err, const char *sqlstate);


static const char *const  ngx_http_sgadmin_list_fields[] = {
    "value", "comment", NULL
};


void
ngx_http_sgadmin_whitelist_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_id_list(r, ctx, ngx_http_sgadmin_wl_list);
}


void
ngx_http_sgadmin_whitelist_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_create(r, ctx, &ngx_http_sgadmin_whitelist);
}


void
ngx_http_sgadmin_whitelist_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_delete(r, ctx, ngx_http_sgadmin_wl_delete);
}


void
ngx_http_sgadmin_required_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_id_list(r, ctx, ngx_http_sgadmin_req_list);
}


void
ngx_http_sgadmin_required_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_create(r, ctx, &ngx_http_sgadmin_required);
}


void
ngx_http_sgadmin_required_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_delete(r, ctx, ngx_http_sgadmin_req_delete);
}


void
ngx_http_sgadmin_relay_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_id_list(r, ctx, ngx_http_sgadmin_relay_list_sql);
}


void
ngx_http_sgadmin_relay_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_create(r, ctx, &ngx_http_sgadmin_relay);
}


void
ngx_http_sgadmin_relay_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_delete(r, ctx, ngx_http_sgadmin_relay_delete_sql);
}


/* a list paged by id: ?limit= and ?cursor=<last id> */

void
ngx_http_sgadmin_id_list(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    const char *sql)
{
    json_t      *errors;
    ngx_str_t    cursor;
    const char  *params[2];
    u_char       limit[NGX_INT_T_LEN + 1], id[NGX_HTTP_SGADMIN_ID_MAX + 1];

    errors = json_array();

    if (ngx_http_sgadmin_page_args(r, errors, limit, &cursor) == NGX_OK) {

        if (cursor.len == 0) {
            ngx_cpystrn(id, (u_char *) "0", sizeof(id));

        } else if (ngx_http_sgadmin_parse_id(&cursor, id) != NGX_OK) {
            ngx_http_sgadmin_error(errors, "cursor",
                                   "is not a cursor of this list");
        }
    }

    if (ngx_http_sgadmin_refuse(r, errors, "the query is not valid")
        != NGX_OK)
    {
        return;
    }

    params[0] = (const char *) id;
    params[1] = (const char *) limit;

    ngx_http_sgadmin_op(r, ctx, sql, 2, params, NGX_HTTP_OK, NULL);
}


static void
ngx_http_sgadmin_create(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    const ngx_http_sgadmin_list_t *list)
{
    json_t          *errors, *v;
    const char      *err, *comment, *kind, *params[6];
    sg_addr_kind_t   k;
    u_char           id[NGX_INT64_LEN + 1];
    char             value[SG_ADDR_TEXT_MAX];

    errors = json_array();
    kind = NULL;
    comment = "";

    ngx_http_sgadmin_known_fields(ctx->body, "",
                                  ngx_http_sgadmin_list_fields, errors);

    v = json_object_get(ctx->body, "value");

    if (v == NULL) {
        ngx_http_sgadmin_error(errors, "value", "is required");

    } else if (!json_is_string(v)) {
        ngx_http_sgadmin_error(errors, "value", "must be a string");

    } else if (list->relay) {
        err = sg_addr_network(json_string_value(v), json_string_length(v),
                              value, sizeof(value));
        if (err) {
            ngx_http_sgadmin_error(errors, "value", err);
        }

    } else {
        err = sg_addr_peer(json_string_value(v), json_string_length(v), &k,
                           value, sizeof(value));
        if (err) {
            ngx_http_sgadmin_error(errors, "value", err);
        }

        kind = (k == SG_ADDR_IP) ? "ip" : (k == SG_ADDR_CIDR) ? "cidr"
                                                              : "name";
    }

    v = json_object_get(ctx->body, "comment");

    if (v) {
        err = ngx_http_sgadmin_text(v, NGX_HTTP_SGADMIN_COMMENT_MAX);
        if (err) {
            ngx_http_sgadmin_error(errors, "comment", err);

        } else {
            comment = json_string_value(v);
        }
    }

    if (ngx_http_sgadmin_refuse(r, errors, list->invalid) != NGX_OK)
    {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, id);

    params[3] = value;

    if (list->relay) {
        params[4] = comment;

        ngx_http_sgadmin_op(r, ctx, list->create, 5, params,
                            NGX_HTTP_CREATED, list->conflict);
        return;
    }

    params[4] = kind;
    params[5] = comment;

    ngx_http_sgadmin_op(r, ctx, list->create, 6, params, NGX_HTTP_CREATED,
                        list->conflict);
}


static void
ngx_http_sgadmin_delete(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    const char *sql)
{
    const char  *params[4];
    u_char       token[NGX_INT64_LEN + 1], id[NGX_HTTP_SGADMIN_ID_MAX + 1];

    if (ngx_http_sgadmin_parse_id(&ctx->param, id) != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such entry", NULL);
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);
    params[3] = (const char *) id;

    ngx_http_sgadmin_op(r, ctx, sql, 4, params, NGX_HTTP_NO_CONTENT, NULL);
}


/* helpers shared with domains and rules */


void
ngx_http_sgadmin_audit_params(ngx_http_sgadmin_ctx_t *ctx,
    const char **params, u_char *id)
{
    *ngx_sprintf(id, "%L", ctx->token_id) = '\0';

    params[0] = (const char *) ctx->actor;
    params[1] = (const char *) id;
    params[2] = (const char *) ctx->client;
}


/*
 * One query whose first row holds the answer in its first column (JSON
 * text).  No row, or NULL with no second column: 404.  A second column
 * "mx" says why the first is NULL: mta_sts.mx is required (domains).
 */

void
ngx_http_sgadmin_op(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    const char *sql, ngx_uint_t nparams, const char **params,
    ngx_uint_t status, const char *conflict)
{
    ngx_http_sgadmin_op_t  *op;

    op = ngx_palloc(r->pool, sizeof(ngx_http_sgadmin_op_t));
    if (op == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    op->ctx = ctx;
    op->status = status;
    op->conflict = conflict;

    if (sg_pg_query(sg_worker.pg, sql, nparams, params,
                    ngx_http_sgadmin_op_done, op)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


/*
 * The same, with a normalized JSON body (released here) as the last of
 * nparams parameters.
 */

void
ngx_http_sgadmin_op_json(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    const char *sql, ngx_uint_t nparams, const char **params, json_t *body,
    ngx_uint_t status, const char *conflict)
{
    char  *text;

    text = json_dumps(body, JSON_COMPACT|JSON_PRESERVE_ORDER);
    json_decref(body);

    if (text == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    params[nparams - 1] = text;

    /* sg_pg_query() copies the parameters */
    ngx_http_sgadmin_op(r, ctx, sql, nparams, params, status, conflict);

    free(text);
}


static void
ngx_http_sgadmin_op_done(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_op_t  *op = data;

    json_t                  *errors;
    ngx_http_request_t      *r;
    ngx_http_sgadmin_ctx_t  *ctx;

    ctx = op->ctx;
    r = ctx->request;

    if (err && ngx_strcmp(sqlstate, "23505") == 0) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "sgadmin: %V refused: duplicate", &r->uri);
        ngx_http_sgadmin_problem(r, NGX_HTTP_CONFLICT, "conflict",
                                 op->conflict ? op->conflict
                                              : "this entry already exists",
                                 NULL);
        return;
    }

    if (err && (ngx_strncmp(sqlstate, "22", 2) == 0
                || ngx_strcmp(sqlstate, "23514") == 0))
    {
        /* the validation above should have caught it */
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "sgadmin: %V refused by the database: %s", &r->uri,
                      err);
        ngx_http_sgadmin_problem(r, 422, "validation", err, NULL);
        return;
    }

    if (err) {
        ngx_http_sgadmin_db_error(r, err);
        return;
    }

    if (PQntuples(res) == 0 || PQgetisnull(res, 0, 0)) {

        if (PQntuples(res) && PQnfields(res) > 1 && !PQgetisnull(res, 0, 1)
            && ngx_strcmp(PQgetvalue(res, 0, 1), "mx") == 0)
        {
            errors = json_array();
            ngx_http_sgadmin_error(errors, "mta_sts.mx",
                                   "is required when mode is testing or"
                                   " enforce (RFC 8461 3.2)");
            (void) ngx_http_sgadmin_refuse(r, errors,
                                           "the domain is not valid");
            return;
        }

        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such entry", NULL);
        return;
    }

    if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
        ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                      "sgadmin: %V %V by %s", &r->method_name, &r->uri,
                      ctx->actor);
    }

    if (op->status == NGX_HTTP_NO_CONTENT) {
        ngx_http_sgadmin_no_content(r, ctx);
        return;
    }

    ngx_http_sgadmin_send_text(r, op->status, PQgetvalue(res, 0, 0),
                               PQgetlength(res, 0, 0), NULL);
}


void
ngx_http_sgadmin_no_content(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_int_t  rc;

    if (ctx->finished) {
        return;
    }

    ctx->finished = 1;

    /* the header filter drops the body of a 204 (header_only) */
    r->headers_out.status = NGX_HTTP_NO_CONTENT;
    r->headers_out.content_length_n = 0;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        ngx_http_finalize_request(r, rc);
        return;
    }

    ngx_http_finalize_request(r, ngx_http_send_special(r, NGX_HTTP_LAST));
}


void
ngx_http_sgadmin_error(json_t *errors, const char *field,
    const char *message)
{
    json_t  *e;

    if (errors == NULL
        || json_array_size(errors) >= NGX_HTTP_SGADMIN_MAX_ERRORS)
    {
        return;
    }

    e = json_object();
    if (e == NULL) {
        return;
    }

    json_object_set_new(e, "field", json_string(field));
    json_object_set_new(e, "message", json_string(message));
    json_array_append_new(errors, e);
}


/*
 * NGX_OK when errors is empty; else answers 422 with them.  errors is
 * released either way.
 */

ngx_int_t
ngx_http_sgadmin_refuse(ngx_http_request_t *r, json_t *errors,
    const char *detail)
{
    json_t  *e;

    if (errors == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NGX_ERROR;
    }

    if (json_array_size(errors) == 0) {
        json_decref(errors);
        return NGX_OK;
    }

    e = json_array_get(errors, 0);

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "sgadmin: %V %V refused: \"%s\" %s", &r->method_name,
                  &r->uri, json_string_value(json_object_get(e, "field")),
                  json_string_value(json_object_get(e, "message")));

    ngx_http_sgadmin_problem(r, 422, "validation", detail, errors);
    json_decref(errors);

    return NGX_DECLINED;
}


void
ngx_http_sgadmin_known_fields(json_t *obj, const char *prefix,
    const char *const *names, json_t *errors)
{
    void               *it;
    const char         *key;
    const char *const  *n;
    char                field[128];

    for (it = json_object_iter(obj); it; it = json_object_iter_next(obj, it))
    {
        key = json_object_iter_key(it);

        for (n = names; *n; n++) {
            if (ngx_strcmp(*n, key) == 0) {
                break;
            }
        }

        if (*n) {
            continue;
        }

        ngx_snprintf((u_char *) field, sizeof(field) - 1, "%s%s%Z", prefix,
                     key);

        ngx_http_sgadmin_error(errors, field,
                               (ngx_strcmp(key, "id") == 0
                                || ngx_strcmp(key, "created_at") == 0
                                || ngx_strcmp(key, "updated_at") == 0)
                               ? "is read-only" : "is not a known field");
    }
}


/* a string of at most max characters without control characters */

const char *
ngx_http_sgadmin_text(json_t *v, size_t max)
{
    size_t   i, len, chars;
    u_char  *p;

    if (!json_is_string(v)) {
        return "must be a string";
    }

    p = (u_char *) json_string_value(v);
    len = json_string_length(v);
    chars = 0;

    for (i = 0; i < len; i++) {
        if (p[i] < 0x20 || p[i] == 0x7f) {
            return "must not contain control characters";
        }

        /* jansson strings are UTF-8: count what does not continue one */
        if ((p[i] & 0xc0) != 0x80) {
            chars++;
        }
    }

    if (chars > max) {
        return max == NGX_HTTP_SGADMIN_COMMENT_MAX
               ? "must be at most 255 characters"
               : "is too long";
    }

    return NULL;
}


/* ?limit= (1..500, default 100) and ?cursor= (checked by the caller) */

ngx_int_t
ngx_http_sgadmin_page_args(ngx_http_request_t *r, json_t *errors,
    u_char *limit, ngx_str_t *cursor)
{
    ngx_int_t  n;
    ngx_str_t  v;

    n = NGX_HTTP_SGADMIN_LIMIT_DEFAULT;

    if (ngx_http_arg(r, (u_char *) "limit", 5, &v) == NGX_OK) {
        n = (v.len == 0 || v.len > 3) ? NGX_ERROR : ngx_atoi(v.data, v.len);

        if (n < 1 || n > NGX_HTTP_SGADMIN_LIMIT_MAX) {
            ngx_http_sgadmin_error(errors, "limit",
                                   "must be a number from 1 to 500");
            n = NGX_HTTP_SGADMIN_LIMIT_DEFAULT;
        }
    }

    *ngx_sprintf(limit, "%i", n) = '\0';

    if (ngx_http_arg(r, (u_char *) "cursor", 6, cursor) != NGX_OK) {
        cursor->len = 0;

    } else if (cursor->len == 0) {
        ngx_http_sgadmin_error(errors, "cursor", "is empty");
    }

    return (errors == NULL || json_array_size(errors)) ? NGX_ERROR : NGX_OK;
}


/* a positive decimal id of at most 18 digits, copied NUL-terminated */

ngx_int_t
ngx_http_sgadmin_parse_id(ngx_str_t *s, u_char *id)
{
    size_t  i;

    if (s->len == 0 || s->len > NGX_HTTP_SGADMIN_ID_MAX || s->data[0] == '0')
    {
        return NGX_ERROR;
    }

    for (i = 0; i < s->len; i++) {
        if (s->data[i] < '0' || s->data[i] > '9') {
            return NGX_ERROR;
        }

        id[i] = s->data[i];
    }

    id[i] = '\0';

    return NGX_OK;
}
