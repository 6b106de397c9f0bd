/*
 * sg: what the admin API says about delivery — /api/v1/routes (mail for
 * a domain goes to a relay host instead of its MX) and
 * /api/v1/tls-failures (the hourly TLS-failure list in Redis).
 *
 * Routes are rows of PostgreSQL like the other lists: validated and
 * normalized here, written with their audit row by one statement, and
 * NOTIFY sg_lists brings them to every worker.
 *
 * The TLS-failure list lives in Redis (redis/README.md): the delivery
 * engine sets sg:tls-failure:<host> when a STARTTLS handshake with <host>
 * fails, expiring at the next full hour.  Removing a host also sends
 * NOTIFY sg_tls_failures <host>, so that every worker forgets the copy it
 * keeps in memory for when Redis is down.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"
#include "sg_addr.h"


#define NGX_HTTP_SGADMIN_SMTP_PORT       ":25"

#define NGX_HTTP_SGADMIN_TLSF_PREFIX     "sg:tls-failure:"
#define NGX_HTTP_SGADMIN_TLSF_HOST_MAX   255

/* what sg does while Redis is down */
#define NGX_HTTP_SGADMIN_TLSF_FALLBACK                                       \
    "the TLS-failure list is kept by each worker in its memory until Redis"  \
    " is back"


#define NGX_HTTP_SGADMIN_ROUTE_ITEM(t)                                       \
    "json_build_object('id', " t ".id, 'domain', " t ".domain,"              \
    " 'relay', " t ".relay, 'comment', " t ".comment,"                       \
    " 'created_at', " t ".created_at, 'updated_at', " t ".updated_at)"

#define NGX_HTTP_SGADMIN_ROUTE_AUDIT(action, old, new, from)                 \
    ", aud AS ("                                                             \
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"   \
    "                         new, client)"                                  \
    "  SELECT $1, $2::bigint, 'routes." action "', 'route:' || x.id,"        \
    "    " old ", " new ", $3"                                               \
    "  FROM " from                                                           \
    ")"


/* $1 cursor (id), $2 limit */

static const char  ngx_http_sgadmin_routes_list_sql[] =
    "WITH page AS ("
    "  SELECT * FROM routes WHERE id > $1::bigint"
    "  ORDER BY id LIMIT $2::int + 1"
    "), items AS ("
    "  SELECT * FROM page ORDER BY id LIMIT $2::int"
    ")"
    " SELECT json_build_object("
    "  'items', coalesce((SELECT json_agg("
           NGX_HTTP_SGADMIN_ROUTE_ITEM("i") " ORDER BY i.id)"
    "                     FROM items i), '[]'::json),"
    "  'next_cursor', CASE WHEN (SELECT count(*) FROM page) > $2::int"
    "    THEN (SELECT max(id) FROM items)::text END)::text";

static const char  ngx_http_sgadmin_routes_get_sql[] =
    "SELECT " NGX_HTTP_SGADMIN_ROUTE_ITEM("r") "::text FROM routes r"
    " WHERE r.id = $1::bigint";

/* $4 the normalized body */

static const char  ngx_http_sgadmin_routes_create_sql[] =
    "WITH body AS (SELECT $4::jsonb AS b"
    "), ins AS ("
    "  INSERT INTO routes (domain, relay, comment)"
    "  SELECT b->>'domain', b->>'relay', coalesce(b->>'comment', '')"
    "  FROM body RETURNING *"
    ")"
    NGX_HTTP_SGADMIN_ROUTE_AUDIT("create", "NULL",
                                 NGX_HTTP_SGADMIN_ROUTE_ITEM("x") "::jsonb",
                                 "ins x")
    " SELECT " NGX_HTTP_SGADMIN_ROUTE_ITEM("i") "::text FROM ins i";

/* $4 id, $5 the normalized body: absent fields keep their value */

static const char  ngx_http_sgadmin_routes_update_sql[] =
    "WITH body AS (SELECT $5::jsonb AS b"
    "), old AS ("
    "  SELECT * FROM routes WHERE id = $4::bigint FOR UPDATE"
    "), upd AS ("
    "  UPDATE routes r SET"
    "    domain = coalesce(b->>'domain', o.domain),"
    "    relay = coalesce(b->>'relay', o.relay),"
    "    comment = coalesce(b->>'comment', o.comment),"
    "    updated_at = now()"
    "  FROM old o, body"
    "  WHERE r.id = o.id"
    "  RETURNING r.*"
    ")"
    NGX_HTTP_SGADMIN_ROUTE_AUDIT("update",
                                 NGX_HTTP_SGADMIN_ROUTE_ITEM("o") "::jsonb",
                                 NGX_HTTP_SGADMIN_ROUTE_ITEM("x") "::jsonb",
                                 "old o, upd x")
    " SELECT " NGX_HTTP_SGADMIN_ROUTE_ITEM("u") "::text FROM upd u";

static const char  ngx_http_sgadmin_routes_delete_sql[] =
    "WITH del AS ("
    "  DELETE FROM routes WHERE id = $4::bigint RETURNING *"
    ")"
    NGX_HTTP_SGADMIN_ROUTE_AUDIT("delete",
                                 NGX_HTTP_SGADMIN_ROUTE_ITEM("x") "::jsonb",
                                 "NULL", "del x")
    " SELECT '' FROM del";

/*
 * $4 host, $5 the Redis value (JSON) or NULL, $6 audit it: every worker
 * drops host from its in-memory list when the transaction commits.
 */

static const char  ngx_http_sgadmin_tlsf_delete_sql[] =
    "WITH aud AS ("
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"
    "                         new, client)"
    "  SELECT $1, $2::bigint, 'tls_failures.delete', 'tls_failure:' || $4,"
    "    $5::jsonb, NULL, $3"
    "  WHERE $6::boolean"
    ")"
    " SELECT pg_notify('sg_tls_failures', $4)::text";


static const char *const  ngx_http_sgadmin_route_fields[] = {
    "domain", "relay", "comment", NULL
};


typedef struct {
    ngx_http_sgadmin_ctx_t       *ctx;

    /* DELETE */
    ngx_str_t                     host;        /* lower case, NUL-ended */
    char                         *old;         /* the value, JSON, or NULL */
    const char                   *redis_err;   /* Redis failed: 503 */
    ngx_uint_t                    deleted;
} ngx_http_sgadmin_tlsf_t;


static json_t *ngx_http_sgadmin_route_body(ngx_http_request_t *r,
    json_t *body, ngx_uint_t create);
static const char *ngx_http_sgadmin_relay_value(const char *s, size_t len,
    char *out, size_t size);
static ngx_int_t ngx_http_sgadmin_route_id(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, u_char *id);

static ngx_http_sgadmin_tlsf_t *ngx_http_sgadmin_tlsf_create(
    ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx);
static json_t *ngx_http_sgadmin_tlsf_item(ngx_str_t *key, redisReply *v);
static ngx_int_t ngx_http_sgadmin_tlsf_host(ngx_http_request_t *r,
    ngx_str_t *param, ngx_str_t *host);
static void ngx_http_sgadmin_tlsf_deleted(void *data, redisReply *reply,
    const char *err);
static void ngx_http_sgadmin_tlsf_error(ngx_http_sgadmin_tlsf_t *tf,
    const char *err);
static void ngx_http_sgadmin_tlsf_notify(ngx_http_sgadmin_tlsf_t *tf);
static void ngx_http_sgadmin_tlsf_notified(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static void ngx_http_sgadmin_redis_listed(void *data, ngx_int_t rc,
    ngx_str_t *keys, ngx_uint_t n, redisReply *values, const char *err);


/* routes */


void
ngx_http_sgadmin_routes_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_id_list(r, ctx, ngx_http_sgadmin_routes_list_sql);
}


void
ngx_http_sgadmin_routes_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    const char  *params[1];
    u_char       id[NGX_HTTP_SGADMIN_ID_MAX + 1];

    if (ngx_http_sgadmin_route_id(r, ctx, id) != NGX_OK) {
        return;
    }

    params[0] = (const char *) id;

    ngx_http_sgadmin_op(r, ctx, ngx_http_sgadmin_routes_get_sql, 1, params,
                        NGX_HTTP_OK, NULL);
}


void
ngx_http_sgadmin_routes_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    json_t      *norm;
    const char  *params[4];
    u_char       token[NGX_INT64_LEN + 1];

    norm = ngx_http_sgadmin_route_body(r, ctx->body, 1);
    if (norm == NULL) {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);

    ngx_http_sgadmin_op_json(r, ctx, ngx_http_sgadmin_routes_create_sql, 4,
                             params, norm, NGX_HTTP_CREATED,
                             "this domain already has a route");
}


void
ngx_http_sgadmin_routes_update(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    json_t      *norm;
    const char  *params[5];
    u_char       token[NGX_INT64_LEN + 1], id[NGX_HTTP_SGADMIN_ID_MAX + 1];

    if (ngx_http_sgadmin_route_id(r, ctx, id) != NGX_OK) {
        return;
    }

    norm = ngx_http_sgadmin_route_body(r, ctx->body, 0);
    if (norm == NULL) {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);
    params[3] = (const char *) id;

    ngx_http_sgadmin_op_json(r, ctx, ngx_http_sgadmin_routes_update_sql, 5,
                             params, norm, NGX_HTTP_OK,
                             "this domain already has a route");
}


void
ngx_http_sgadmin_routes_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    const char  *params[4];
    u_char       token[NGX_INT64_LEN + 1], id[NGX_HTTP_SGADMIN_ID_MAX + 1];

    if (ngx_http_sgadmin_route_id(r, ctx, id) != NGX_OK) {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);
    params[3] = (const char *) id;

    ngx_http_sgadmin_op(r, ctx, ngx_http_sgadmin_routes_delete_sql, 4,
                        params, NGX_HTTP_NO_CONTENT, NULL);
}


static ngx_int_t
ngx_http_sgadmin_route_id(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    u_char *id)
{
    if (ngx_http_sgadmin_parse_id(&ctx->param, id) != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such entry", NULL);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * A copy of the body with every value checked and in canonical form; NULL
 * when it was refused (the answer is sent).
 */

static json_t *
ngx_http_sgadmin_route_body(ngx_http_request_t *r, json_t *body,
    ngx_uint_t create)
{
    json_t      *errors, *norm, *v;
    const char  *err;
    char         out[SG_ADDR_TEXT_MAX];

    errors = json_array();
    norm = json_object();

    if (norm == NULL) {
        json_decref(errors);
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NULL;
    }

    ngx_http_sgadmin_known_fields(body, "", ngx_http_sgadmin_route_fields,
                                  errors);

    v = json_object_get(body, "domain");

    if (v == NULL) {
        if (create) {
            ngx_http_sgadmin_error(errors, "domain", "is required");
        }

    } else if (!json_is_string(v)) {
        ngx_http_sgadmin_error(errors, "domain", "must be a string");

    } else if (ngx_strcmp(json_string_value(v), "*") == 0) {
        /* the default route: every domain without a route of its own */
        json_object_set(norm, "domain", v);

    } else {
        err = sg_addr_host_name(json_string_value(v), json_string_length(v),
                                0, out, sizeof(out));
        if (err) {
            ngx_http_sgadmin_error(errors, "domain", err);

        } else {
            json_object_set_new(norm, "domain", json_string(out));
        }
    }

    v = json_object_get(body, "relay");

    if (v == NULL) {
        if (create) {
            ngx_http_sgadmin_error(errors, "relay", "is required");
        }

    } else if (!json_is_string(v)) {
        ngx_http_sgadmin_error(errors, "relay", "must be a string");

    } else {
        err = ngx_http_sgadmin_relay_value(json_string_value(v),
                                           json_string_length(v), out,
                                           sizeof(out));
        if (err) {
            ngx_http_sgadmin_error(errors, "relay", err);

        } else {
            json_object_set_new(norm, "relay", json_string(out));
        }
    }

    v = json_object_get(body, "comment");

    if (v) {
        err = ngx_http_sgadmin_text(v, NGX_HTTP_SGADMIN_COMMENT_MAX);

        if (err) {
            ngx_http_sgadmin_error(errors, "comment", err);

        } else {
            json_object_set(norm, "comment", v);
        }
    }

    if (ngx_http_sgadmin_refuse(r, errors, "the route is not valid")
        != NGX_OK)
    {
        json_decref(norm);
        return NULL;
    }

    return norm;
}


/*
 * host:port as sg_addr_host_port() takes it (a name, an IPv4 address or
 * [IPv6]); without ":port" the SMTP port, 25.  The canonical form always
 * has the port.
 */

static const char *
ngx_http_sgadmin_relay_value(const char *s, size_t len, char *out,
    size_t size)
{
    const char  *close, *colon;
    char         buf[SG_ADDR_TEXT_MAX];

    if (len == 0) {
        return "is empty: host or host:port is required";
    }

    if (s[0] == '[') {
        close = (const char *) ngx_strlchr((u_char *) s, (u_char *) s + len,
                                           ']');
        colon = (close && close + 1 < s + len) ? close + 1 : NULL;

        if (close == NULL) {
            /* sg_addr_host_port() names what is missing */
            colon = s;
        }

    } else {
        colon = (const char *) ngx_strlchr((u_char *) s, (u_char *) s + len,
                                           ':');
    }

    if (colon) {
        return sg_addr_host_port(s, len, out, size);
    }

    if (len + sizeof(NGX_HTTP_SGADMIN_SMTP_PORT) > sizeof(buf)) {
        return "is not host:port: the host is too long";
    }

    ngx_memcpy(buf, s, len);
    ngx_memcpy(buf + len, NGX_HTTP_SGADMIN_SMTP_PORT,
               sizeof(NGX_HTTP_SGADMIN_SMTP_PORT) - 1);

    return sg_addr_host_port(buf, len + sizeof(NGX_HTTP_SGADMIN_SMTP_PORT) - 1,
                             out, size);
}


/* the TLS-failure list: GET answers every key, read with SCAN and MGET */


void
ngx_http_sgadmin_tls_failures_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_redis_list(r, NGX_HTTP_SGADMIN_TLSF_PREFIX,
                                ngx_http_sgadmin_tlsf_item,
                                NGX_HTTP_SGADMIN_TLSF_FALLBACK);
}


static ngx_http_sgadmin_tlsf_t *
ngx_http_sgadmin_tlsf_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_tlsf_t  *tf;

    tf = ngx_pcalloc(r->pool, sizeof(ngx_http_sgadmin_tlsf_t));
    if (tf == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NULL;
    }

    tf->ctx = ctx;

    return tf;
}


/*
 * {"id", "host", "ip", "reason", "failed_at", "expires_at"}: id is the
 * host of the key, the rest comes from the value the delivery engine wrote
 * (null where it lacks a field).
 */

static json_t *
ngx_http_sgadmin_tlsf_item(ngx_str_t *key, redisReply *v)
{
    json_t       *item, *value, *f;
    ngx_uint_t    i;
    json_error_t  jerr;

    static const char  *fields[] = { "ip", "reason", "failed_at",
                                     "expires_at", NULL };

    item = json_object();
    if (item == NULL) {
        return NULL;
    }

    json_object_set_new(item, "id",
        json_stringn((const char *) key->data
                     + sizeof(NGX_HTTP_SGADMIN_TLSF_PREFIX) - 1,
                     key->len - (sizeof(NGX_HTTP_SGADMIN_TLSF_PREFIX) - 1)));

    value = json_loadb(v->str, v->len, 0, &jerr);

    f = json_object_get(value, "host");
    json_object_set(item, "host",
                    json_is_string(f) ? f : json_object_get(item, "id"));

    for (i = 0; fields[i]; i++) {
        f = json_object_get(value, fields[i]);
        json_object_set_new(item, fields[i],
                            json_is_string(f) ? json_incref(f)
                                              : json_null());
    }

    json_decref(value);

    return item;
}



/*
 * DELETE /api/v1/tls-failures/{host}: GETDEL the key, then NOTIFY every
 * worker (and audit) in PostgreSQL.  With Redis down the workers are told
 * all the same (their memory is the list then) and the answer is 503.
 */

void
ngx_http_sgadmin_tls_failures_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    u_char                   *p;
    ngx_int_t                 rc;
    const char               *argv[2];
    size_t                    argvlen[2];
    ngx_http_sgadmin_tlsf_t  *tf;

    tf = ngx_http_sgadmin_tlsf_create(r, ctx);
    if (tf == NULL) {
        return;
    }

    if (ngx_http_sgadmin_tlsf_host(r, &ctx->param, &tf->host) != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such host on the TLS-failure list",
                                 NULL);
        return;
    }

    p = ngx_pnalloc(r->pool, sizeof(NGX_HTTP_SGADMIN_TLSF_PREFIX) - 1
                             + tf->host.len);
    if (p == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    argv[0] = "GETDEL";
    argvlen[0] = sizeof("GETDEL") - 1;
    argv[1] = (const char *) p;
    argvlen[1] = ngx_cpymem(ngx_cpymem(p, NGX_HTTP_SGADMIN_TLSF_PREFIX,
                                       sizeof(NGX_HTTP_SGADMIN_TLSF_PREFIX)
                                       - 1),
                            tf->host.data, tf->host.len)
                 - p;

    rc = sg_worker.redis
         ? sg_redis_command_argv(sg_worker.redis,
                                 ngx_http_sgadmin_tlsf_deleted, tf, 2, argv,
                                 argvlen)
         : NGX_DECLINED;

    if (rc != NGX_OK) {
        ngx_http_sgadmin_tlsf_error(tf, sg_redis_last_error(sg_worker.redis));
        ngx_http_sgadmin_tlsf_notify(tf);
    }
}


/*
 * The host of the path as the engine writes it in the key: lower case,
 * a name or an IP address; a trailing dot is dropped.
 */

static ngx_int_t
ngx_http_sgadmin_tlsf_host(ngx_http_request_t *r, ngx_str_t *param,
    ngx_str_t *host)
{
    u_char  c;
    size_t  i, len;

    len = param->len;

    if (len > 1 && param->data[len - 1] == '.') {
        len--;
    }

    if (len == 0 || len > NGX_HTTP_SGADMIN_TLSF_HOST_MAX) {
        return NGX_ERROR;
    }

    host->data = ngx_pnalloc(r->pool, len + 1);
    if (host->data == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < len; i++) {
        c = ngx_tolower(param->data[i]);

        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
              || c == '.' || c == '-' || c == ':' || c == '_'))
        {
            return NGX_ERROR;
        }

        host->data[i] = c;
    }

    host->data[len] = '\0';
    host->len = len;

    return NGX_OK;
}


static void
ngx_http_sgadmin_tlsf_deleted(void *data, redisReply *reply, const char *err)
{
    ngx_http_sgadmin_tlsf_t  *tf = data;

    json_t              *v;
    json_error_t         jerr;
    ngx_http_request_t  *r;

    r = tf->ctx->request;

    if (err) {
        ngx_http_sgadmin_tlsf_error(tf, err);

    } else if (reply->type == REDIS_REPLY_STRING) {
        tf->deleted = 1;

        /* the old value for the audit row, if it is JSON */
        v = json_loadb(reply->str, reply->len, 0, &jerr);

        if (v) {
            tf->old = ngx_pnalloc(r->pool, reply->len + 1);
            if (tf->old) {
                ngx_memcpy(tf->old, reply->str, reply->len);
                tf->old[reply->len] = '\0';
            }

            json_decref(v);
        }
    }

    ngx_http_sgadmin_tlsf_notify(tf);
}


/* Redis failed: the answer will be 503, with this text */

static void
ngx_http_sgadmin_tlsf_error(ngx_http_sgadmin_tlsf_t *tf, const char *err)
{
    size_t  len;
    char   *p;

    if (err == NULL || err[0] == '\0') {
        err = "not connected";
    }

    len = ngx_strlen(err);

    p = ngx_pnalloc(tf->ctx->request->pool, len + 1);
    if (p) {
        ngx_memcpy(p, err, len + 1);
    }

    tf->redis_err = p ? p : "unavailable";
}


static void
ngx_http_sgadmin_tlsf_notify(ngx_http_sgadmin_tlsf_t *tf)
{
    const char              *params[6];
    ngx_http_request_t      *r;
    ngx_http_sgadmin_ctx_t  *ctx;
    u_char                   token[NGX_INT64_LEN + 1];

    ctx = tf->ctx;
    r = ctx->request;

    ngx_http_sgadmin_audit_params(ctx, params, token);
    params[3] = (const char *) tf->host.data;
    params[4] = tf->old;
    params[5] = (tf->deleted || tf->redis_err) ? "true" : "false";

    if (sg_pg_query(sg_worker.pg, ngx_http_sgadmin_tlsf_delete_sql, 6,
                    params, ngx_http_sgadmin_tlsf_notified, tf)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


static void
ngx_http_sgadmin_tlsf_notified(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_tlsf_t  *tf = data;

    ngx_http_request_t  *r;

    r = tf->ctx->request;

    if (err) {
        ngx_http_sgadmin_db_error(r, err);
        return;
    }

    if (tf->redis_err) {
        ngx_http_sgadmin_redis_down(r, tf->redis_err,
                                    NGX_HTTP_SGADMIN_TLSF_FALLBACK,
                                    "; every worker was told to drop the"
                                    " host from the list it keeps in memory");
        return;
    }

    if (!tf->deleted) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such host on the TLS-failure list",
                                 NULL);
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                  "sgadmin: %V %V by %s", &r->method_name, &r->uri,
                  tf->ctx->actor);

    ngx_http_sgadmin_no_content(r, tf->ctx);
}


/*
 * The lists the admin API keeps in Redis (the TLS-failure list here, the
 * MTA-STS policies in ngx_http_sgadmin_sts.c): every key of a prefix and
 * its value, read with sg_redis_scan_get() and answered as
 * {"items": [...], "next_cursor": null}.
 */

typedef struct {
    ngx_http_request_t           *request;
    ngx_http_sgadmin_item_pt      item;
    const char                   *fallback;
} ngx_http_sgadmin_redis_list_t;


void
ngx_http_sgadmin_redis_list(ngx_http_request_t *r, const char *prefix,
    ngx_http_sgadmin_item_pt item, const char *fallback)
{
    ngx_http_sgadmin_redis_list_t  *rl;

    rl = ngx_palloc(r->pool, sizeof(ngx_http_sgadmin_redis_list_t));
    if (rl == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    rl->request = r;
    rl->item = item;
    rl->fallback = fallback;

    sg_redis_scan_get(sg_worker.redis, r->pool, r->connection->log, prefix,
                      ngx_http_sgadmin_redis_listed, rl);
}


static void
ngx_http_sgadmin_redis_listed(void *data, ngx_int_t rc, ngx_str_t *keys,
    ngx_uint_t n, redisReply *values, const char *err)
{
    ngx_http_sgadmin_redis_list_t  *rl = data;

    json_t              *doc, *items, *item;
    ngx_uint_t           i;
    ngx_http_request_t  *r;

    r = rl->request;

    if (rc == NGX_DECLINED) {
        ngx_http_sgadmin_redis_down(r, err, rl->fallback, NULL);
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", err, NULL);
        return;
    }

    items = json_array();
    doc = json_pack("{s:o,s:n}", "items", items, "next_cursor");

    if (doc == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    for (i = 0; i < n; i++) {

        /* expired between SCAN and MGET */
        if (values->element[i]->type != REDIS_REPLY_STRING) {
            continue;
        }

        item = rl->item(&keys[i], values->element[i]);
        if (item) {
            json_array_append_new(items, item);
        }
    }

    ngx_http_sgadmin_send_json(r, NGX_HTTP_OK, doc);
    json_decref(doc);
}


void
ngx_http_sgadmin_redis_down(ngx_http_request_t *r, const char *err,
    const char *fallback, const char *more)
{
    char  detail[512];

    if (err == NULL || err[0] == '\0') {
        err = "not connected";
    }

    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "sgadmin: %V: redis unavailable: %s", &r->uri, err);

    ngx_snprintf((u_char *) detail, sizeof(detail) - 1,
                 "Redis is unavailable (%s): %s%s%Z",
                 err, fallback, more ? more : "");

    ngx_http_sgadmin_problem(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                             "redis-unavailable", detail, NULL);
}
