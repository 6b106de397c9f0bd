/*
 * sg: /api/v1/domains — local domains, where their mail goes, and the
 * MTA-STS policy and TLS-RPT record sg publishes for them.
 *
 * A domain is named in the path by its id or by its name.  The body is
 * validated and normalized here; PostgreSQL merges a PUT into the row in
 * the statement that writes the audit row.  mta_sts.id is read-only: a
 * trigger gives the policy a new one whenever mode, mx or max_age change
 * (sql/009_mta_sts_hosting.sql); the policy itself is served by
 * ngx_http_sgadmin_sts_host.c.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"
#include "sg_addr.h"


#define NGX_HTTP_SGADMIN_MX_MAX         32
#define NGX_HTTP_SGADMIN_MAX_AGE_MAX    31557600    /* RFC 8461 3.2 */


#define NGX_HTTP_SGADMIN_DOMAIN_ITEM(t)                                      \
    "json_build_object('id', " t ".id, 'name', " t ".name,"                  \
    " 'internal_server', " t ".internal_server,"                             \
    " 'requiretls_trusted', " t ".requiretls_trusted,"                       \
    " 'mta_sts', json_build_object('mode', " t ".mta_sts_mode,"              \
    "   'mx', to_json(" t ".mta_sts_mx),"                                    \
    "   'max_age', " t ".mta_sts_max_age, 'id', " t ".mta_sts_id),"          \
    " 'tlsrpt_rua', " t ".tlsrpt_rua, 'comment', " t ".comment,"             \
    " 'created_at', " t ".created_at, 'updated_at', " t ".updated_at)"

/* the mx array of the body b, in order */
#define NGX_HTTP_SGADMIN_DOMAIN_MX                                           \
    "ARRAY(SELECT x FROM jsonb_array_elements_text("                         \
    "  coalesce(b->'mta_sts'->'mx', '[]'::jsonb)) WITH ORDINALITY AS e(x, n)"\
    "  ORDER BY n)"

/* the domain of the path: $4 id or $5 name */
#define NGX_HTTP_SGADMIN_DOMAIN_WHERE                                        \
    " WHERE id = $4::bigint OR name = $5"

#define NGX_HTTP_SGADMIN_DOMAIN_AUDIT(action, old, new, from)                \
    ", aud AS ("                                                             \
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"   \
    "                         new, client)"                                  \
    "  SELECT $1, $2::bigint, 'domains." action "', 'domain:' || x.id,"      \
    "    " old ", " new ", $3"                                               \
    "  FROM " from                                                           \
    ")"


static const char  ngx_http_sgadmin_domains_list_sql[] =
    "WITH page AS ("
    "  SELECT * FROM domains WHERE id > $1::bigint"
    "  ORDER BY id LIMIT $2::int + 1"
    "), items AS ("
    "  SELECT * FROM page ORDER BY id LIMIT $2::int"
    ")"
    " SELECT json_build_object("
    "  'items', coalesce((SELECT json_agg("
           NGX_HTTP_SGADMIN_DOMAIN_ITEM("i") " ORDER BY i.id)"
    "                     FROM items i), '[]'::json),"
    "  'next_cursor', CASE WHEN (SELECT count(*) FROM page) > $2::int"
    "    THEN (SELECT max(id) FROM items)::text END)::text";

static const char  ngx_http_sgadmin_domains_get_sql[] =
    "SELECT " NGX_HTTP_SGADMIN_DOMAIN_ITEM("d") "::text FROM domains d"
    " WHERE d.id = $1::bigint OR d.name = $2";

/* $4 the normalized body */

static const char  ngx_http_sgadmin_domains_create_sql[] =
    "WITH body AS (SELECT $4::jsonb AS b"
    "), ins AS ("
    "  INSERT INTO domains (name, internal_server, requiretls_trusted,"
    "    mta_sts_mode, mta_sts_mx, mta_sts_max_age, tlsrpt_rua, comment)"
    "  SELECT b->>'name', b->>'internal_server',"
    "    coalesce((b->>'requiretls_trusted')::boolean, false),"
    "    coalesce(b->'mta_sts'->>'mode', 'none'),"
    "    " NGX_HTTP_SGADMIN_DOMAIN_MX ","
    "    coalesce((b->'mta_sts'->>'max_age')::integer, 604800),"
    "    coalesce(b->>'tlsrpt_rua', ''), coalesce(b->>'comment', '')"
    "  FROM body RETURNING *"
    ")"
    NGX_HTTP_SGADMIN_DOMAIN_AUDIT("create", "NULL",
                                  NGX_HTTP_SGADMIN_DOMAIN_ITEM("x")
                                  "::jsonb", "ins x")
    " SELECT " NGX_HTTP_SGADMIN_DOMAIN_ITEM("i") "::text FROM ins i";

/*
 * $4 id, $5 name, $6 the normalized body.  RFC 8461 3.2: a policy in mode
 * testing or enforce has at least one mx; the merged row is checked here
 * because the body may change only one of them.
 */

static const char  ngx_http_sgadmin_domains_update_sql[] =
    "WITH body AS (SELECT $6::jsonb AS b"
    "), old AS ("
    "  SELECT * FROM domains" NGX_HTTP_SGADMIN_DOMAIN_WHERE " FOR UPDATE"
    "), new AS ("
    "  SELECT o.id,"
    "    coalesce(b->>'name', o.name) AS name,"
    "    coalesce(b->>'internal_server', o.internal_server)"
    "      AS internal_server,"
    "    coalesce((b->>'requiretls_trusted')::boolean, o.requiretls_trusted)"
    "      AS requiretls_trusted,"
    "    coalesce(b->'mta_sts'->>'mode', o.mta_sts_mode) AS mta_sts_mode,"
    "    CASE WHEN b->'mta_sts' ? 'mx' THEN " NGX_HTTP_SGADMIN_DOMAIN_MX
    "      ELSE o.mta_sts_mx END AS mta_sts_mx,"
    "    coalesce((b->'mta_sts'->>'max_age')::integer, o.mta_sts_max_age)"
    "      AS mta_sts_max_age,"
    "    coalesce(b->>'tlsrpt_rua', o.tlsrpt_rua) AS tlsrpt_rua,"
    "    coalesce(b->>'comment', o.comment) AS comment"
    "  FROM old o, body"
    "), upd AS ("
    "  UPDATE domains d SET name = n.name,"
    "    internal_server = n.internal_server,"
    "    requiretls_trusted = n.requiretls_trusted,"
    "    mta_sts_mode = n.mta_sts_mode, mta_sts_mx = n.mta_sts_mx,"
    "    mta_sts_max_age = n.mta_sts_max_age, tlsrpt_rua = n.tlsrpt_rua,"
    "    comment = n.comment, updated_at = now()"
    "  FROM new n"
    "  WHERE d.id = n.id"
    "    AND (n.mta_sts_mode = 'none' OR cardinality(n.mta_sts_mx) > 0)"
    "  RETURNING d.*"
    ")"
    NGX_HTTP_SGADMIN_DOMAIN_AUDIT("update",
                                  NGX_HTTP_SGADMIN_DOMAIN_ITEM("o")
                                  "::jsonb",
                                  NGX_HTTP_SGADMIN_DOMAIN_ITEM("x")
                                  "::jsonb", "old o, upd x")
    " SELECT (SELECT " NGX_HTTP_SGADMIN_DOMAIN_ITEM("u") "::text"
    "         FROM upd u),"
    "   CASE WHEN EXISTS (SELECT 1 FROM old) THEN 'mx' END";

static const char  ngx_http_sgadmin_domains_delete_sql[] =
    "WITH del AS ("
    "  DELETE FROM domains" NGX_HTTP_SGADMIN_DOMAIN_WHERE " RETURNING *"
    ")"
    NGX_HTTP_SGADMIN_DOMAIN_AUDIT("delete",
                                  NGX_HTTP_SGADMIN_DOMAIN_ITEM("x")
                                  "::jsonb", "NULL", "del x")
    " SELECT '' FROM del";


static const char *const  ngx_http_sgadmin_domain_fields[] = {
    "name", "internal_server", "requiretls_trusted", "mta_sts",
    "tlsrpt_rua", "comment", NULL
};

static const char *const  ngx_http_sgadmin_mta_sts_fields[] = {
    "mode", "mx", "max_age", NULL
};


static json_t *ngx_http_sgadmin_domain_body(ngx_http_request_t *r,
    json_t *body, ngx_uint_t create);
static void ngx_http_sgadmin_domain_mta_sts(json_t *v, json_t *norm,
    json_t *errors, ngx_uint_t create);


void
ngx_http_sgadmin_domains_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_id_list(r, ctx, ngx_http_sgadmin_domains_list_sql);
}


void
ngx_http_sgadmin_domains_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    const char  *params[2];

    if (ngx_http_sgadmin_domain_param(r, ctx, &params[0], &params[1])
        != NGX_OK)
    {
        return;
    }

    ngx_http_sgadmin_op(r, ctx, ngx_http_sgadmin_domains_get_sql, 2, params,
                        NGX_HTTP_OK, NULL);
}


void
ngx_http_sgadmin_domains_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    json_t      *norm;
    const char  *params[4];
    u_char       token[NGX_INT64_LEN + 1];

    norm = ngx_http_sgadmin_domain_body(r, ctx->body, 1);
    if (norm == NULL) {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);

    ngx_http_sgadmin_op_json(r, ctx, ngx_http_sgadmin_domains_create_sql, 4,
                             params, norm, NGX_HTTP_CREATED,
                             "a domain with this name exists");
}


void
ngx_http_sgadmin_domains_update(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    json_t      *norm;
    const char  *params[6];
    u_char       token[NGX_INT64_LEN + 1];

    if (ngx_http_sgadmin_domain_param(r, ctx, &params[3], &params[4])
        != NGX_OK)
    {
        return;
    }

    norm = ngx_http_sgadmin_domain_body(r, ctx->body, 0);
    if (norm == NULL) {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);

    ngx_http_sgadmin_op_json(r, ctx, ngx_http_sgadmin_domains_update_sql, 6,
                             params, norm, NGX_HTTP_OK,
                             "a domain with this name exists");
}


void
ngx_http_sgadmin_domains_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    const char  *params[5];
    u_char       token[NGX_INT64_LEN + 1];

    if (ngx_http_sgadmin_domain_param(r, ctx, &params[3], &params[4])
        != NGX_OK)
    {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);

    ngx_http_sgadmin_op(r, ctx, ngx_http_sgadmin_domains_delete_sql, 5,
                        params, NGX_HTTP_NO_CONTENT, NULL);
}


/*
 * The {id} of the path: digits are an id, anything else a name (no name
 * is all digits: its last label would be).  One of the two is NULL.
 */

ngx_int_t
ngx_http_sgadmin_domain_param(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, const char **id, const char **name)
{
    u_char  *p;

    p = ngx_pnalloc(r->pool, SG_ADDR_TEXT_MAX);
    if (p == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NGX_ERROR;
    }

    *id = NULL;
    *name = NULL;

    if (ngx_http_sgadmin_parse_id(&ctx->param, p) == NGX_OK) {
        *id = (const char *) p;
        return NGX_OK;
    }

    if (sg_addr_host_name((const char *) ctx->param.data, ctx->param.len, 0,
                          (char *) p, SG_ADDR_TEXT_MAX)
        == NULL)
    {
        *name = (const char *) p;
        return NGX_OK;
    }

    ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                             "no such entry", NULL);
    return NGX_ERROR;
}


/*
 * A copy of the body with every value checked and in canonical form; NULL
 * when it was refused (the answer is sent).
 */

static json_t *
ngx_http_sgadmin_domain_body(ngx_http_request_t *r, json_t *body,
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

    ngx_http_sgadmin_known_fields(body, "", ngx_http_sgadmin_domain_fields,
                                  errors);

    v = json_object_get(body, "name");

    if (v == NULL) {
        if (create) {
            ngx_http_sgadmin_error(errors, "name", "is required");
        }

    } else if (!json_is_string(v)) {
        ngx_http_sgadmin_error(errors, "name", "must be a string");

    } else {
        err = sg_addr_host_name(json_string_value(v), json_string_length(v),
                                0, out, sizeof(out));
        if (err) {
            ngx_http_sgadmin_error(errors, "name", err);

        } else {
            json_object_set_new(norm, "name", json_string(out));
        }
    }

    v = json_object_get(body, "internal_server");

    if (v == NULL) {
        if (create) {
            ngx_http_sgadmin_error(errors, "internal_server", "is required");
        }

    } else if (!json_is_string(v)) {
        ngx_http_sgadmin_error(errors, "internal_server", "must be a string");

    } else {
        err = sg_addr_host_port(json_string_value(v), json_string_length(v),
                                out, sizeof(out));
        if (err) {
            ngx_http_sgadmin_error(errors, "internal_server", err);

        } else {
            json_object_set_new(norm, "internal_server", json_string(out));
        }
    }

    v = json_object_get(body, "requiretls_trusted");

    if (v) {
        if (json_is_boolean(v)) {
            json_object_set(norm, "requiretls_trusted", v);

        } else {
            ngx_http_sgadmin_error(errors, "requiretls_trusted",
                                   "must be true or false");
        }
    }

    v = json_object_get(body, "mta_sts");

    if (v) {
        ngx_http_sgadmin_domain_mta_sts(v, norm, errors, create);

    } else if (create) {
        json_object_set_new(norm, "mta_sts", json_object());
    }

    v = json_object_get(body, "tlsrpt_rua");

    if (v) {
        err = json_is_string(v)
              ? sg_addr_tlsrpt_rua(json_string_value(v),
                                   json_string_length(v))
              : "must be a string";

        if (err) {
            ngx_http_sgadmin_error(errors, "tlsrpt_rua", err);

        } else {
            json_object_set(norm, "tlsrpt_rua", v);
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

    if (ngx_http_sgadmin_refuse(r, errors, "the domain is not valid")
        != NGX_OK)
    {
        json_decref(norm);
        return NULL;
    }

    return norm;
}


static void
ngx_http_sgadmin_domain_mta_sts(json_t *v, json_t *norm, json_t *errors,
    ngx_uint_t create)
{
    size_t       i;
    json_t      *m, *mode, *mx, *age, *list;
    const char  *err, *s;
    char         out[SG_ADDR_TEXT_MAX], field[64];

    if (!json_is_object(v)) {
        ngx_http_sgadmin_error(errors, "mta_sts", "must be an object");
        return;
    }

    ngx_http_sgadmin_known_fields(v, "mta_sts.",
                                  ngx_http_sgadmin_mta_sts_fields, errors);

    m = json_object();
    if (m == NULL) {
        return;
    }

    json_object_set_new(norm, "mta_sts", m);

    mode = json_object_get(v, "mode");

    if (mode) {
        s = json_string_value(mode);

        if (s == NULL
            || (ngx_strcmp(s, "none") != 0 && ngx_strcmp(s, "testing") != 0
                && ngx_strcmp(s, "enforce") != 0))
        {
            ngx_http_sgadmin_error(errors, "mta_sts.mode",
                                   "must be none, testing or enforce");
            mode = NULL;

        } else {
            json_object_set(m, "mode", mode);
        }
    }

    mx = json_object_get(v, "mx");

    if (mx) {
        if (!json_is_array(mx)) {
            ngx_http_sgadmin_error(errors, "mta_sts.mx",
                                   "must be an array of host names");
            mx = NULL;

        } else if (json_array_size(mx) > NGX_HTTP_SGADMIN_MX_MAX) {
            ngx_http_sgadmin_error(errors, "mta_sts.mx",
                                   "must have at most 32 host names");
            mx = NULL;

        } else {
            list = json_array();
            json_object_set_new(m, "mx", list);

            for (i = 0; i < json_array_size(mx); i++) {
                ngx_snprintf((u_char *) field, sizeof(field) - 1,
                             "mta_sts.mx[%uz]%Z", i);

                s = json_string_value(json_array_get(mx, i));

                if (s == NULL) {
                    ngx_http_sgadmin_error(errors, field, "must be a string");
                    continue;
                }

                /* RFC 8461 3.2: a name, or "*." and a name */
                err = sg_addr_host_name(s,
                                        json_string_length(
                                            json_array_get(mx, i)),
                                        SG_ADDR_WILDCARD, out, sizeof(out));
                if (err) {
                    ngx_http_sgadmin_error(errors, field, err);
                    continue;
                }

                json_array_append_new(list, json_string(out));
            }
        }
    }

    age = json_object_get(v, "max_age");

    if (age) {
        if (!json_is_integer(age) || json_integer_value(age) < 0
            || json_integer_value(age) > NGX_HTTP_SGADMIN_MAX_AGE_MAX)
        {
            ngx_http_sgadmin_error(errors, "mta_sts.max_age",
                                   "must be a whole number of seconds from"
                                   " 0 to 31557600");

        } else {
            json_object_set(m, "max_age", age);
        }
    }

    /*
     * RFC 8461 3.2: testing and enforce need an mx.  When a PUT changes
     * only one of mode and mx, the statement checks the merged row.
     */

    s = json_string_value(mode);

    if (s && ngx_strcmp(s, "none") != 0 && (mx || create)
        && (mx == NULL || json_array_size(mx) == 0))
    {
        ngx_http_sgadmin_error(errors, "mta_sts.mx",
                               "is required when mode is testing or enforce"
                               " (RFC 8461 3.2)");
    }
}
