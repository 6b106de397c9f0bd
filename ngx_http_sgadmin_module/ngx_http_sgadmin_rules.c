/*
 * sg: /api/v1/content-filter/rules — ordered rules evaluated after DATA;
 * the first enabled rule whose conditions all match flags the message for
 * REQUIRETLS.
 *
 * Regular expressions are compiled here with ngx_regex (PCRE2), the
 * library the mail module matches with, so a rule that is saved compiles.
 * The list is ordered by (position, id); its cursor is "position_id".
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"


#define NGX_HTTP_SGADMIN_CONDS_MAX       16
#define NGX_HTTP_SGADMIN_VALUE_MAX       1024
#define NGX_HTTP_SGADMIN_HEADER_MAX      128
#define NGX_HTTP_SGADMIN_POSITION_MAX    2000000000
#define NGX_HTTP_SGADMIN_POSITION_STEP   "10"


#define NGX_HTTP_SGADMIN_RULE_ITEM(t)                                        \
    "json_build_object('id', " t ".id, 'position', " t ".position,"          \
    " 'name', " t ".name, 'enabled', " t ".enabled,"                         \
    " 'conditions', " t ".conditions, 'action', " t ".action,"               \
    " 'created_at', " t ".created_at, 'updated_at', " t ".updated_at)"

#define NGX_HTTP_SGADMIN_RULE_AUDIT(action, old, new, from)                  \
    ", aud AS ("                                                             \
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"   \
    "                         new, client)"                                  \
    "  SELECT $1, $2::bigint, 'content_filter_rules." action "',"            \
    "    'content_filter_rule:' || x.id, " old ", " new ", $3"               \
    "  FROM " from                                                           \
    ")"


/* $1 position and $2 id of the cursor, $3 limit */

static const char  ngx_http_sgadmin_rules_list_sql[] =
    "WITH page AS ("
    "  SELECT * FROM content_filter_rules"
    "  WHERE (position, id) > ($1::int, $2::bigint)"
    "  ORDER BY position, id LIMIT $3::int + 1"
    "), items AS ("
    "  SELECT * FROM page ORDER BY position, id LIMIT $3::int"
    ")"
    " SELECT json_build_object("
    "  'items', coalesce((SELECT json_agg("
           NGX_HTTP_SGADMIN_RULE_ITEM("i") " ORDER BY i.position, i.id)"
    "                     FROM items i), '[]'::json),"
    "  'next_cursor', CASE WHEN (SELECT count(*) FROM page) > $3::int"
    "    THEN (SELECT position || '_' || id FROM items"
    "          ORDER BY position DESC, id DESC LIMIT 1) END)::text";

static const char  ngx_http_sgadmin_rules_get_sql[] =
    "SELECT " NGX_HTTP_SGADMIN_RULE_ITEM("r") "::text"
    " FROM content_filter_rules r WHERE r.id = $1::bigint";

/* $4 the normalized body; by default a new rule goes last */

static const char  ngx_http_sgadmin_rules_create_sql[] =
    "WITH body AS (SELECT $4::jsonb AS b"
    "), ins AS ("
    "  INSERT INTO content_filter_rules (position, name, enabled,"
    "                                    conditions, action)"
    "  SELECT coalesce((b->>'position')::integer,"
    "      (SELECT least(coalesce(max(position), 0)::bigint + "
           NGX_HTTP_SGADMIN_POSITION_STEP ", 2147483647)::integer"
    "       FROM content_filter_rules)),"
    "    coalesce(b->>'name', ''), coalesce((b->>'enabled')::boolean, true),"
    "    b->'conditions', b->>'action'"
    "  FROM body RETURNING *"
    ")"
    NGX_HTTP_SGADMIN_RULE_AUDIT("create", "NULL",
                                NGX_HTTP_SGADMIN_RULE_ITEM("x") "::jsonb",
                                "ins x")
    " SELECT " NGX_HTTP_SGADMIN_RULE_ITEM("i") "::text FROM ins i";

/* $4 id, $5 the normalized body */

static const char  ngx_http_sgadmin_rules_update_sql[] =
    "WITH body AS (SELECT $5::jsonb AS b"
    "), old AS ("
    "  SELECT * FROM content_filter_rules WHERE id = $4::bigint FOR UPDATE"
    "), upd AS ("
    "  UPDATE content_filter_rules r SET"
    "    position = coalesce((b->>'position')::integer, o.position),"
    "    name = coalesce(b->>'name', o.name),"
    "    enabled = coalesce((b->>'enabled')::boolean, o.enabled),"
    "    conditions = coalesce(b->'conditions', o.conditions),"
    "    action = coalesce(b->>'action', o.action),"
    "    updated_at = now()"
    "  FROM old o, body"
    "  WHERE r.id = o.id"
    "  RETURNING r.*"
    ")"
    NGX_HTTP_SGADMIN_RULE_AUDIT("update",
                                NGX_HTTP_SGADMIN_RULE_ITEM("o") "::jsonb",
                                NGX_HTTP_SGADMIN_RULE_ITEM("x") "::jsonb",
                                "old o, upd x")
    " SELECT " NGX_HTTP_SGADMIN_RULE_ITEM("u") "::text FROM upd u";

static const char  ngx_http_sgadmin_rules_delete_sql[] =
    "WITH del AS ("
    "  DELETE FROM content_filter_rules WHERE id = $4::bigint RETURNING *"
    ")"
    NGX_HTTP_SGADMIN_RULE_AUDIT("delete",
                                NGX_HTTP_SGADMIN_RULE_ITEM("x") "::jsonb",
                                "NULL", "del x")
    " SELECT '' FROM del";


static const char *const  ngx_http_sgadmin_rule_fields[] = {
    "position", "name", "enabled", "conditions", "action", NULL
};

static const char *const  ngx_http_sgadmin_cond_fields[] = {
    "field", "header", "match", "value", NULL
};


static json_t *ngx_http_sgadmin_rule_body(ngx_http_request_t *r,
    json_t *body, ngx_uint_t create);
static json_t *ngx_http_sgadmin_rule_conditions(ngx_http_request_t *r,
    json_t *v, json_t *errors);
static const char *ngx_http_sgadmin_header_name(json_t *v);
static void ngx_http_sgadmin_rule_write(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, ngx_uint_t create);


void
ngx_http_sgadmin_rules_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    u_char      *u;
    json_t      *errors;
    ngx_str_t    cursor, pos, id;
    const char  *params[3];
    u_char       limit[NGX_INT_T_LEN + 1], p[NGX_HTTP_SGADMIN_ID_MAX + 1],
                 i[NGX_HTTP_SGADMIN_ID_MAX + 1];

    errors = json_array();

    if (ngx_http_sgadmin_page_args(r, errors, limit, &cursor) == NGX_OK) {

        if (cursor.len == 0) {
            ngx_cpystrn(p, (u_char *) "-1", sizeof(p));
            ngx_cpystrn(i, (u_char *) "0", sizeof(i));

        } else {
            u = ngx_strlchr(cursor.data, cursor.data + cursor.len, '_');

            pos.data = cursor.data;
            pos.len = u ? (size_t) (u - cursor.data) : 0;
            id.data = u ? u + 1 : cursor.data;
            id.len = u ? (size_t) (cursor.data + cursor.len - u - 1) : 0;

            /* a position may be 0, which parse_id refuses */

            if (pos.len == 1 && pos.data[0] == '0') {
                ngx_cpystrn(p, (u_char *) "0", sizeof(p));

            } else if (pos.len > 10
                       || ngx_http_sgadmin_parse_id(&pos, p) != NGX_OK)
            {
                u = NULL;
            }

            if (u == NULL || ngx_http_sgadmin_parse_id(&id, i) != NGX_OK) {
                ngx_http_sgadmin_error(errors, "cursor",
                                       "is not a cursor of this list");
            }
        }
    }

    if (ngx_http_sgadmin_refuse(r, errors, "the query is not valid")
        != NGX_OK)
    {
        return;
    }

    params[0] = (const char *) p;
    params[1] = (const char *) i;
    params[2] = (const char *) limit;

    ngx_http_sgadmin_op(r, ctx, ngx_http_sgadmin_rules_list_sql, 3, params,
                        NGX_HTTP_OK, NULL);
}


void
ngx_http_sgadmin_rules_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    const char  *params[1];
    u_char       id[NGX_HTTP_SGADMIN_ID_MAX + 1];

    if (ngx_http_sgadmin_parse_id(&ctx->param, id) != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such entry", NULL);
        return;
    }

    params[0] = (const char *) id;

    ngx_http_sgadmin_op(r, ctx, ngx_http_sgadmin_rules_get_sql, 1, params,
                        NGX_HTTP_OK, NULL);
}


void
ngx_http_sgadmin_rules_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_rule_write(r, ctx, 1);
}


void
ngx_http_sgadmin_rules_update(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_rule_write(r, ctx, 0);
}


void
ngx_http_sgadmin_rules_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
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

    ngx_http_sgadmin_op(r, ctx, ngx_http_sgadmin_rules_delete_sql, 4, params,
                        NGX_HTTP_NO_CONTENT, NULL);
}


static void
ngx_http_sgadmin_rule_write(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, ngx_uint_t create)
{
    json_t      *norm;
    const char  *params[5];
    u_char       token[NGX_INT64_LEN + 1], id[NGX_HTTP_SGADMIN_ID_MAX + 1];

    if (!create && ngx_http_sgadmin_parse_id(&ctx->param, id) != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such entry", NULL);
        return;
    }

    norm = ngx_http_sgadmin_rule_body(r, ctx->body, create);
    if (norm == NULL) {
        return;
    }

    ngx_http_sgadmin_audit_params(ctx, params, token);

    if (create) {
        ngx_http_sgadmin_op_json(r, ctx, ngx_http_sgadmin_rules_create_sql,
                                 4, params, norm, NGX_HTTP_CREATED, NULL);
        return;
    }

    params[3] = (const char *) id;
    ngx_http_sgadmin_op_json(r, ctx, ngx_http_sgadmin_rules_update_sql, 5,
                             params, norm, NGX_HTTP_OK, NULL);
}


static json_t *
ngx_http_sgadmin_rule_body(ngx_http_request_t *r, json_t *body,
    ngx_uint_t create)
{
    json_t      *errors, *norm, *v, *conds;
    const char  *err;

    errors = json_array();
    norm = json_object();

    if (norm == NULL) {
        json_decref(errors);
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NULL;
    }

    ngx_http_sgadmin_known_fields(body, "", ngx_http_sgadmin_rule_fields,
                                  errors);

    v = json_object_get(body, "position");

    if (v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0
            || json_integer_value(v) > NGX_HTTP_SGADMIN_POSITION_MAX)
        {
            ngx_http_sgadmin_error(errors, "position",
                                   "must be a whole number from 0 to"
                                   " 2000000000");

        } else {
            json_object_set(norm, "position", v);
        }
    }

    v = json_object_get(body, "name");

    if (v) {
        err = ngx_http_sgadmin_text(v, NGX_HTTP_SGADMIN_COMMENT_MAX);

        if (err) {
            ngx_http_sgadmin_error(errors, "name", err);

        } else {
            json_object_set(norm, "name", v);
        }
    }

    v = json_object_get(body, "enabled");

    if (v) {
        if (json_is_boolean(v)) {
            json_object_set(norm, "enabled", v);

        } else {
            ngx_http_sgadmin_error(errors, "enabled",
                                   "must be true or false");
        }
    }

    v = json_object_get(body, "conditions");

    if (v == NULL) {
        if (create) {
            ngx_http_sgadmin_error(errors, "conditions", "is required");
        }

    } else {
        conds = ngx_http_sgadmin_rule_conditions(r, v, errors);
        if (conds) {
            json_object_set_new(norm, "conditions", conds);
        }
    }

    v = json_object_get(body, "action");

    if (v == NULL) {
        if (create) {
            ngx_http_sgadmin_error(errors, "action", "is required");
        }

    } else if (!json_is_string(v)
               || ngx_strcmp(json_string_value(v), "flag_requiretls") != 0)
    {
        ngx_http_sgadmin_error(errors, "action", "must be flag_requiretls");

    } else {
        json_object_set(norm, "action", v);
    }

    if (ngx_http_sgadmin_refuse(r, errors, "the rule is not valid")
        != NGX_OK)
    {
        json_decref(norm);
        return NULL;
    }

    return norm;
}


/* the conditions in canonical form: field, header, match, value */

static json_t *
ngx_http_sgadmin_rule_conditions(ngx_http_request_t *r, json_t *v,
    json_t *errors)
{
    size_t                i, n, j, chars;
    json_t               *conds, *c, *f, *h, *m, *val, *out;
    u_char               *p;
    const char           *field, *match, *err;
    ngx_regex_compile_t   rc;
    u_char                errstr[NGX_MAX_CONF_ERRSTR];
    char                  name[64], msg[NGX_MAX_CONF_ERRSTR + 64];

    if (!json_is_array(v) || json_array_size(v) == 0
        || json_array_size(v) > NGX_HTTP_SGADMIN_CONDS_MAX)
    {
        ngx_http_sgadmin_error(errors, "conditions",
                               "must be an array of 1 to 16 conditions");
        return NULL;
    }

    conds = json_array();
    if (conds == NULL) {
        return NULL;
    }

    n = json_array_size(v);

    for (i = 0; i < n; i++) {
        c = json_array_get(v, i);

        if (!json_is_object(c)) {
            ngx_snprintf((u_char *) name, sizeof(name) - 1,
                         "conditions[%uz]%Z", i);
            ngx_http_sgadmin_error(errors, name, "must be an object");
            continue;
        }

        ngx_snprintf((u_char *) name, sizeof(name) - 1, "conditions[%uz].%Z",
                     i);
        ngx_http_sgadmin_known_fields(c, name, ngx_http_sgadmin_cond_fields,
                                      errors);

        out = json_object();
        if (out == NULL) {
            json_decref(conds);
            return NULL;
        }

        json_array_append_new(conds, out);

        f = json_object_get(c, "field");
        field = json_string_value(f);

        if (field == NULL
            || (ngx_strcmp(field, "sender") != 0
                && ngx_strcmp(field, "recipient") != 0
                && ngx_strcmp(field, "header") != 0))
        {
            ngx_snprintf((u_char *) name, sizeof(name) - 1,
                         "conditions[%uz].field%Z", i);
            ngx_http_sgadmin_error(errors, name,
                                   f ? "must be sender, recipient or header"
                                     : "is required");
            field = NULL;

        } else {
            json_object_set(out, "field", f);
        }

        h = json_object_get(c, "header");
        ngx_snprintf((u_char *) name, sizeof(name) - 1,
                     "conditions[%uz].header%Z", i);

        if (field && ngx_strcmp(field, "header") == 0) {
            err = h ? ngx_http_sgadmin_header_name(h)
                    : "is required when field is header";

            if (err) {
                ngx_http_sgadmin_error(errors, name, err);

            } else {
                json_object_set(out, "header", h);
            }

        } else if (h && field) {
            ngx_http_sgadmin_error(errors, name,
                                   "is only allowed when field is header");
        }

        m = json_object_get(c, "match");
        match = json_string_value(m);

        if (match == NULL
            || (ngx_strcmp(match, "contains") != 0
                && ngx_strcmp(match, "regex") != 0))
        {
            ngx_snprintf((u_char *) name, sizeof(name) - 1,
                         "conditions[%uz].match%Z", i);
            ngx_http_sgadmin_error(errors, name,
                                   m ? "must be contains or regex"
                                     : "is required");
            match = NULL;

        } else {
            json_object_set(out, "match", m);
        }

        val = json_object_get(c, "value");
        ngx_snprintf((u_char *) name, sizeof(name) - 1,
                     "conditions[%uz].value%Z", i);

        if (val == NULL) {
            ngx_http_sgadmin_error(errors, name, "is required");
            continue;
        }

        if (!json_is_string(val)) {
            ngx_http_sgadmin_error(errors, name, "must be a string");
            continue;
        }

        p = (u_char *) json_string_value(val);
        chars = 0;
        err = NULL;

        for (j = 0; j < json_string_length(val); j++) {
            if ((p[j] < 0x20 && p[j] != '\t') || p[j] == 0x7f) {
                err = "must not contain control characters";
                break;
            }

            if ((p[j] & 0xc0) != 0x80) {
                chars++;
            }
        }

        if (err == NULL && (chars == 0 || chars > NGX_HTTP_SGADMIN_VALUE_MAX))
        {
            err = "must be 1 to 1024 characters";
        }

        if (err) {
            ngx_http_sgadmin_error(errors, name, err);
            continue;
        }

        if (match && ngx_strcmp(match, "regex") == 0) {
            ngx_memzero(&rc, sizeof(ngx_regex_compile_t));
            rc.pattern.data = p;
            rc.pattern.len = json_string_length(val);
            rc.pool = r->pool;
            rc.err.len = NGX_MAX_CONF_ERRSTR;
            rc.err.data = errstr;

            if (ngx_regex_compile(&rc) != NGX_OK) {
                ngx_snprintf((u_char *) msg, sizeof(msg) - 1,
                             "is not a valid regular expression: %V%Z",
                             &rc.err);
                ngx_http_sgadmin_error(errors, name, msg);
                continue;
            }
        }

        json_object_set(out, "value", val);
    }

    return conds;
}


/* RFC 5322 2.2: field-name = 1*ftext, ftext = %d33-57 / %d59-126 */

static const char *
ngx_http_sgadmin_header_name(json_t *v)
{
    size_t   i, len;
    u_char  *p;

    if (!json_is_string(v)) {
        return "must be a string";
    }

    p = (u_char *) json_string_value(v);
    len = json_string_length(v);

    if (len == 0 || len > NGX_HTTP_SGADMIN_HEADER_MAX) {
        return "must be a header field name of 1 to 128 characters";
    }

    for (i = 0; i < len; i++) {
        if (p[i] < 33 || p[i] > 126 || p[i] == ':') {
            return "is not a header field name: printable ASCII without"
                   " \":\" or spaces (RFC 5322 2.2)";
        }
    }

    return NULL;
}
