/*
 * sg: GET and PATCH /api/v1/settings.
 *
 * The PATCH is merged into the stored document by PostgreSQL in the same
 * statement that writes the audit row: two concurrent PATCHes never lose
 * each other's fields, and no change goes unaudited.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"


#define NGX_HTTP_SGADMIN_SETTINGS_GET                                        \
    "SELECT (doc || jsonb_build_object('active_certificate_id',"             \
    " active_certificate_id))::text, version FROM settings WHERE id = 1"

#define NGX_HTTP_SGADMIN_SETTINGS_PATCH                                      \
    "WITH old AS ("                                                          \
    "  SELECT doc, active_certificate_id FROM settings WHERE id = 1"         \
    "  FOR UPDATE"                                                           \
    "), upd AS ("                                                            \
    "  UPDATE settings s SET"                                                \
    "    doc = (old.doc || ($1::jsonb - 'tls_reporting'"                     \
    "                                  - 'active_certificate_id'))"         \
    "          || jsonb_build_object('tls_reporting',"                       \
    "               coalesce(old.doc->'tls_reporting', '{}'::jsonb)"         \
    "               || coalesce($1::jsonb->'tls_reporting', '{}'::jsonb)),"  \
    "    active_certificate_id = CASE WHEN $1::jsonb ? 'active_certificate_id'"\
    "      THEN ($1::jsonb->>'active_certificate_id')::bigint"               \
    "      ELSE old.active_certificate_id END,"                              \
    "    updated_by = $2"                                                    \
    "  FROM old WHERE s.id = 1"                                              \
    "  RETURNING s.doc, s.active_certificate_id, s.version"                  \
    "), aud AS ("                                                            \
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"   \
    "                         new, client)"                                  \
    "  SELECT $2, $3::bigint, 'settings.update', 'settings',"                \
    "    old.doc || jsonb_build_object('active_certificate_id',"             \
    "                                  old.active_certificate_id),"          \
    "    upd.doc || jsonb_build_object('active_certificate_id',"             \
    "                                  upd.active_certificate_id),"          \
    "    $4"                                                                 \
    "  FROM old, upd"                                                        \
    ")"                                                                      \
    " SELECT (doc || jsonb_build_object('active_certificate_id',"            \
    " active_certificate_id))::text, version FROM upd"


static void ngx_http_sgadmin_settings_done(void *data, PGresult *res,
    const char *err, const char *sqlstate);


void
ngx_http_sgadmin_settings_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    if (sg_pg_query(sg_worker.pg, NGX_HTTP_SGADMIN_SETTINGS_GET, 0, NULL,
                    ngx_http_sgadmin_settings_done, ctx)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


void
ngx_http_sgadmin_settings_patch(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    char                 *patch;
    size_t                i, n;
    json_t               *errors, *e;
    u_char                id[NGX_INT64_LEN + 1];
    const char           *params[4];
    sg_settings_error_t   errs[NGX_HTTP_SGADMIN_MAX_ERRORS];

    n = sg_settings_validate_patch(ctx->body, errs,
                                   NGX_HTTP_SGADMIN_MAX_ERRORS);

    if (n) {
        errors = json_array();

        for (i = 0; i < n; i++) {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "sgadmin: PATCH %V refused: \"%s\" %s", &r->uri,
                          errs[i].field, errs[i].message);

            e = json_object();
            json_object_set_new(e, "field", json_string(errs[i].field));
            json_object_set_new(e, "message", json_string(errs[i].message));
            json_array_append_new(errors, e);
        }

        ngx_http_sgadmin_problem(r, 422, "validation",
                                 "the settings are not valid", errors);
        json_decref(errors);
        return;
    }

    patch = json_dumps(ctx->body, JSON_COMPACT);
    if (patch == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    *ngx_sprintf(id, "%L", ctx->token_id) = '\0';

    params[0] = patch;
    params[1] = (const char *) ctx->actor;
    params[2] = (const char *) id;
    params[3] = (const char *) ctx->client;

    if (sg_pg_query(sg_worker.pg, NGX_HTTP_SGADMIN_SETTINGS_PATCH, 4, params,
                    ngx_http_sgadmin_settings_done, ctx)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }

    free(patch);
}


static void
ngx_http_sgadmin_settings_done(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_ctx_t  *ctx = data;
    ngx_http_request_t      *r;
    char                    *text;
    ngx_str_t                etag;
    json_t                  *errors, *e, *doc, *ordered;

    r = ctx->request;

    if (err && ngx_strcmp(sqlstate, "23503") == 0) {
        /* the certificate named does not exist */
        errors = json_array();
        e = json_object();
        json_object_set_new(e, "field", json_string("active_certificate_id"));
        json_object_set_new(e, "message",
                            json_string("no certificate has this id"));
        json_array_append_new(errors, e);

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "sgadmin: PATCH %V refused: unknown certificate",
                      &r->uri);

        ngx_http_sgadmin_problem(r, 422, "validation",
                                 "the settings are not valid", errors);
        json_decref(errors);
        return;
    }

    if (err) {
        ngx_http_sgadmin_db_error(r, err);
        return;
    }

    if (PQntuples(res) != 1) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "the settings row is missing",
                                 NULL);
        return;
    }

    if (r->method == NGX_HTTP_PATCH) {
        ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                      "sgadmin: settings version %s saved by %s",
                      PQgetvalue(res, 0, 1), ctx->actor);
    }

    etag.len = PQgetlength(res, 0, 1) + 2;
    etag.data = ngx_pnalloc(r->pool, etag.len);

    if (etag.data) {
        ngx_sprintf(etag.data, "\"%s\"", PQgetvalue(res, 0, 1));
    }

    doc = json_loads(PQgetvalue(res, 0, 0), 0, NULL);
    ordered = doc ? sg_settings_ordered(doc) : NULL;
    text = ordered ? json_dumps(ordered, JSON_PRESERVE_ORDER) : NULL;

    json_decref(doc);
    json_decref(ordered);

    if (text == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "cannot encode the settings",
                                 NULL);
        return;
    }

    ngx_http_sgadmin_send_text(r, NGX_HTTP_OK, text, ngx_strlen(text),
                               etag.data ? &etag : NULL);
    free(text);
}
