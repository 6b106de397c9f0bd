/*
 * sg: the HTTPS admin module.  Routing, authentication, request bodies,
 * RFC 9457 problems and the health endpoint.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <time.h>

#include "ngx_http_sgadmin.h"
#include "sg_tls.h"


#define NGX_HTTP_SGADMIN_PREFIX  "/api/v1"


static ngx_int_t ngx_http_sgadmin_handler(ngx_http_request_t *r);
static const ngx_http_sgadmin_route_t *ngx_http_sgadmin_route(
    ngx_http_request_t *r, const ngx_http_sgadmin_route_t *routes,
    ngx_str_t *path, ngx_str_t *param, ngx_uint_t *path_found);
static ngx_uint_t ngx_http_sgadmin_match(const ngx_str_t *pattern,
    ngx_str_t *path, ngx_str_t *param);
static void ngx_http_sgadmin_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sgadmin_json_type(ngx_http_request_t *r);
static ngx_int_t ngx_http_sgadmin_read_json(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
static void ngx_http_sgadmin_authenticate(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
static void ngx_http_sgadmin_auth_done(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static void ngx_http_sgadmin_dispatch(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
static void ngx_http_sgadmin_health(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
static void ngx_http_sgadmin_health_pg(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static void ngx_http_sgadmin_health_redis(void *data, redisReply *reply,
    const char *err);
static void ngx_http_sgadmin_health_done(ngx_http_sgadmin_ctx_t *ctx);
static void ngx_http_sgadmin_cleanup(void *data);
static ngx_int_t ngx_http_sgadmin_postconfiguration(ngx_conf_t *cf);
static void *ngx_http_sgadmin_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_sgadmin_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_sgadmin(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);


static const ngx_http_sgadmin_route_t  ngx_http_sgadmin_routes[] = {

    { NGX_HTTP_GET, ngx_string("/health"), NGX_HTTP_SGADMIN_ROLE_NONE,
      ngx_http_sgadmin_health },

    { NGX_HTTP_GET, ngx_string("/settings"), NGX_HTTP_SGADMIN_ROLE_READ,
      ngx_http_sgadmin_settings_get },

    { NGX_HTTP_PATCH, ngx_string("/settings"), NGX_HTTP_SGADMIN_ROLE_ADMIN,
      ngx_http_sgadmin_settings_patch },

    { NGX_HTTP_GET, ngx_string("/starttls/whitelist"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_whitelist_list },

    { NGX_HTTP_POST, ngx_string("/starttls/whitelist"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_whitelist_create },

    { NGX_HTTP_DELETE, ngx_string("/starttls/whitelist/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_whitelist_delete },

    { NGX_HTTP_GET, ngx_string("/starttls/required"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_required_list },

    { NGX_HTTP_POST, ngx_string("/starttls/required"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_required_create },

    { NGX_HTTP_DELETE, ngx_string("/starttls/required/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_required_delete },

    { NGX_HTTP_GET, ngx_string("/relay-networks"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_relay_list },

    { NGX_HTTP_POST, ngx_string("/relay-networks"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_relay_create },

    { NGX_HTTP_DELETE, ngx_string("/relay-networks/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_relay_delete },

    { NGX_HTTP_GET, ngx_string("/domains"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_domains_list },

    { NGX_HTTP_POST, ngx_string("/domains"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_domains_create },

    { NGX_HTTP_GET, ngx_string("/domains/{id}"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_domains_get },

    { NGX_HTTP_PUT, ngx_string("/domains/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_domains_update },

    { NGX_HTTP_DELETE, ngx_string("/domains/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_domains_delete },

    { NGX_HTTP_GET, ngx_string("/domains/{id}/dns"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_domains_dns },

    { NGX_HTTP_GET, ngx_string("/content-filter/rules"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_rules_list },

    { NGX_HTTP_POST, ngx_string("/content-filter/rules"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_rules_create },

    { NGX_HTTP_GET, ngx_string("/content-filter/rules/{id}"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_rules_get },

    { NGX_HTTP_PUT, ngx_string("/content-filter/rules/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_rules_update },

    { NGX_HTTP_DELETE, ngx_string("/content-filter/rules/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_rules_delete },

    { NGX_HTTP_GET, ngx_string("/routes"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_routes_list },

    { NGX_HTTP_POST, ngx_string("/routes"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_routes_create },

    { NGX_HTTP_GET, ngx_string("/routes/{id}"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_routes_get },

    { NGX_HTTP_PATCH, ngx_string("/routes/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_routes_update },

    { NGX_HTTP_DELETE, ngx_string("/routes/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_routes_delete },

    { NGX_HTTP_GET, ngx_string("/tls-failures"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_tls_failures_list },

    { NGX_HTTP_DELETE, ngx_string("/tls-failures/{host}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_tls_failures_delete },

    { NGX_HTTP_GET, ngx_string("/queue"), NGX_HTTP_SGADMIN_ROLE_READ,
      ngx_http_sgadmin_queue_list },

    { NGX_HTTP_GET, ngx_string("/queue/{id}"), NGX_HTTP_SGADMIN_ROLE_READ,
      ngx_http_sgadmin_queue_get },

    { NGX_HTTP_DELETE, ngx_string("/queue/{id}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_queue_delete },

    { NGX_HTTP_POST, ngx_string("/queue/{id}/retry"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_queue_retry },
    { NGX_HTTP_GET, ngx_string("/delivery/resolve/{domain}"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_resolve },

    { NGX_HTTP_GET, ngx_string("/mta-sts/policies"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_sts_list },

    { NGX_HTTP_GET, ngx_string("/mta-sts/policies/{domain}"),
      NGX_HTTP_SGADMIN_ROLE_READ, ngx_http_sgadmin_sts_get },

    { NGX_HTTP_DELETE, ngx_string("/mta-sts/policies/{domain}"),
      NGX_HTTP_SGADMIN_ROLE_ADMIN, ngx_http_sgadmin_sts_delete },

    { 0, ngx_null_string, 0, NULL }
};


/* outside /api/v1: the path is the whole URI */

static const ngx_http_sgadmin_route_t  ngx_http_sgadmin_root_routes[] = {

    { NGX_HTTP_GET, ngx_string("/metrics"), NGX_HTTP_SGADMIN_ROLE_READ,
      ngx_http_sgadmin_metrics },

    { 0, ngx_null_string, 0, NULL }
};


static ngx_command_t  ngx_http_sgadmin_commands[] = {

    { ngx_string("sgadmin"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_sgadmin,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sgadmin_require_https"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sgadmin_loc_conf_t, require_https),
      NULL },

    { ngx_string("sgadmin_max_body_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sgadmin_loc_conf_t, max_body_size),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_sgadmin_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_sgadmin_postconfiguration,    /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_sgadmin_create_loc_conf,      /* create location configuration */
    ngx_http_sgadmin_merge_loc_conf        /* merge location configuration */
};


ngx_module_t  ngx_http_sgadmin_module = {
    NGX_MODULE_V1,
    &ngx_http_sgadmin_module_ctx,          /* module context */
    ngx_http_sgadmin_commands,             /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_int_t
ngx_http_sgadmin_handler(ngx_http_request_t *r)
{
    ngx_str_t                          path;
    ngx_uint_t                         path_found;
    ngx_http_cleanup_t                *cln;
    ngx_http_sgadmin_ctx_t            *ctx;
    ngx_http_sgadmin_loc_conf_t       *alcf;
    const ngx_http_sgadmin_route_t    *route;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_sgadmin_module);

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_sgadmin_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_sgadmin_cleanup;
    cln->data = ctx;

    ctx->request = r;
    ngx_http_set_ctx(r, ctx, ngx_http_sgadmin_module);

    if (r->connection->addr_text.len <= NGX_SOCKADDR_STRLEN) {
        ngx_memcpy(ctx->client, r->connection->addr_text.data,
                   r->connection->addr_text.len);
    }

    /* one path from here on: every answer finalizes the request once */
    r->main->count++;

    /* RFC 8461, 3.3: a local domain's MTA-STS policy, for anyone */
    if (ngx_http_sgadmin_sts_policy(r, ctx) != NGX_DECLINED) {
        return NGX_DONE;
    }

    path_found = 0;

    route = ngx_http_sgadmin_route(r, ngx_http_sgadmin_root_routes, &r->uri,
                                   &ctx->param, &path_found);

    if (route == NULL
        && r->uri.len >= sizeof(NGX_HTTP_SGADMIN_PREFIX) - 1
        && ngx_strncmp(r->uri.data, NGX_HTTP_SGADMIN_PREFIX,
                       sizeof(NGX_HTTP_SGADMIN_PREFIX) - 1) == 0)
    {
        path.data = r->uri.data + sizeof(NGX_HTTP_SGADMIN_PREFIX) - 1;
        path.len = r->uri.len - (sizeof(NGX_HTTP_SGADMIN_PREFIX) - 1);

        route = ngx_http_sgadmin_route(r, ngx_http_sgadmin_routes, &path,
                                       &ctx->param, &path_found);
    }

    if (route == NULL) {

        if (ngx_http_discard_request_body(r) != NGX_OK) {
            r->keepalive = 0;
        }

        if (path_found) {
            ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_ALLOWED,
                                     "method-not-allowed",
                                     "this method is not allowed here",
                                     NULL);
            return NGX_DONE;
        }

        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such resource", NULL);
        return NGX_DONE;
    }

    ctx->route = route;

    if (route->role != NGX_HTTP_SGADMIN_ROLE_NONE && alcf->require_https
#if (NGX_HTTP_SSL)
        && r->connection->ssl == NULL
#endif
       )
    {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            r->keepalive = 0;
        }

        ngx_http_sgadmin_problem(r, NGX_HTTP_FORBIDDEN, "https-required",
                                 "the admin API is only served over HTTPS",
                                 NULL);
        return NGX_DONE;
    }

    if (r->method & (NGX_HTTP_POST|NGX_HTTP_PUT|NGX_HTTP_PATCH)) {

        if (ngx_http_sgadmin_json_type(r) != NGX_OK) {
            r->keepalive = 0;
            ngx_http_sgadmin_problem(r, NGX_HTTP_UNSUPPORTED_MEDIA_TYPE,
                                     "unsupported-media-type",
                                     "the body must be application/json",
                                     NULL);
            return NGX_DONE;
        }

        if (r->headers_in.content_length_n < 0) {
            /* bodies are bounded before they are read: no chunked bodies */
            r->keepalive = 0;
            ngx_http_sgadmin_problem(r, NGX_HTTP_LENGTH_REQUIRED,
                                     "length-required",
                                     "a Content-Length is required", NULL);
            return NGX_DONE;
        }

        if (r->headers_in.content_length_n > (off_t) alcf->max_body_size) {
            r->keepalive = 0;
            ngx_http_sgadmin_problem(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                     "body-too-large",
                                     "the request body is too large", NULL);
            return NGX_DONE;
        }

        r->request_body_in_single_buf = 1;

        /* the body handler takes over the reference counted above */
        r->main->count--;

        if (ngx_http_read_client_request_body(r,
                                              ngx_http_sgadmin_body_handler)
            >= NGX_HTTP_SPECIAL_RESPONSE)
        {
            r->main->count++;
            r->keepalive = 0;
            ngx_http_sgadmin_problem(r, NGX_HTTP_BAD_REQUEST, "bad-body",
                                     "the request body could not be read",
                                     NULL);
            return NGX_DONE;
        }

        return NGX_DONE;
    }

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    ngx_http_sgadmin_authenticate(r, ctx);

    return NGX_DONE;
}


/*
 * The route of the path and the request's method (HEAD as GET), or NULL;
 * path_found is set when some route has the path.
 */

static const ngx_http_sgadmin_route_t *
ngx_http_sgadmin_route(ngx_http_request_t *r,
    const ngx_http_sgadmin_route_t *routes, ngx_str_t *path, ngx_str_t *param,
    ngx_uint_t *path_found)
{
    const ngx_http_sgadmin_route_t  *route;

    for (route = routes; route->handler; route++) {
        if (ngx_http_sgadmin_match(&route->path, path, param)) {
            *path_found = 1;

            if (route->method == r->method
                || (route->method == NGX_HTTP_GET
                    && r->method == NGX_HTTP_HEAD))
            {
                return route;
            }
        }
    }

    return NULL;
}


/*
 * "/a/{id}/b" matches "/a/17/b" and sets param to "17": one "{...}"
 * segment per pattern, holding no '/'.
 */

static ngx_uint_t
ngx_http_sgadmin_match(const ngx_str_t *pattern, ngx_str_t *path,
    ngx_str_t *param)
{
    u_char  *p, *pe, *u, *ue, *seg;

    p = pattern->data;
    pe = p + pattern->len;
    u = path->data;
    ue = u + path->len;

    while (p < pe && u < ue) {

        if (*p == '{') {
            while (p < pe && *p != '}') {
                p++;
            }

            if (p == pe) {
                return 0;
            }

            p++;
            seg = u;

            while (u < ue && *u != '/') {
                u++;
            }

            if (u == seg) {
                return 0;
            }

            param->data = seg;
            param->len = u - seg;
            continue;
        }

        if (*p++ != *u++) {
            return 0;
        }
    }

    return p == pe && u == ue;
}


/*
 * No Content-Type, application/json, or any "+json" type (RFC 6839); also
 * curl's default for -d, application/x-www-form-urlencoded: the body is
 * parsed as JSON all the same.
 */

static ngx_int_t
ngx_http_sgadmin_json_type(ngx_http_request_t *r)
{
    u_char     *p, *last, *semi;
    ngx_str_t  *ct;

    if (r->headers_in.content_type == NULL) {
        return NGX_OK;
    }

    ct = &r->headers_in.content_type->value;
    p = ct->data;
    last = p + ct->len;

    semi = ngx_strlchr(p, last, ';');
    if (semi) {
        last = semi;
    }

    while (last > p && (last[-1] == ' ' || last[-1] == '\t')) {
        last--;
    }

    if ((size_t) (last - p) == sizeof("application/json") - 1
        && ngx_strncasecmp(p, (u_char *) "application/json",
                           sizeof("application/json") - 1) == 0)
    {
        return NGX_OK;
    }

    if ((size_t) (last - p) == sizeof("application/x-www-form-urlencoded") - 1
        && ngx_strncasecmp(p, (u_char *) "application/x-www-form-urlencoded",
                           sizeof("application/x-www-form-urlencoded") - 1)
           == 0)
    {
        return NGX_OK;
    }

    if (last - p > 5 && ngx_strncasecmp(last - 5, (u_char *) "+json", 5) == 0
        && ngx_strncasecmp(p, (u_char *) "application/", 12) == 0)
    {
        return NGX_OK;
    }

    return NGX_DECLINED;
}


static void
ngx_http_sgadmin_body_handler(ngx_http_request_t *r)
{
    ngx_http_sgadmin_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_sgadmin_module);

    if (ngx_http_sgadmin_read_json(r, ctx) != NGX_OK) {
        return;
    }

    ngx_http_sgadmin_authenticate(r, ctx);
}


static ngx_int_t
ngx_http_sgadmin_read_json(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx)
{
    u_char                       *p, *data;
    size_t                        len;
    ssize_t                       n;
    ngx_buf_t                    *b;
    ngx_chain_t                  *cl;
    json_error_t                  jerr;
    ngx_http_sgadmin_loc_conf_t  *alcf;
    char                          detail[256];

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_sgadmin_module);

    len = 0;

    if (r->request_body) {
        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            b = cl->buf;
            len += b->in_file ? (size_t) (b->file_last - b->file_pos)
                              : (size_t) (b->last - b->pos);
        }
    }

    if (len > alcf->max_body_size) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "sgadmin: %V: body of %uz octets refused", &r->uri,
                      len);
        ngx_http_sgadmin_problem(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                 "body-too-large",
                                 "the request body is too large", NULL);
        return NGX_ERROR;
    }

    /* an action without parameters may come without a body */
    if (len == 0 && ctx->route->handler == ngx_http_sgadmin_queue_retry) {
        return NGX_OK;
    }

    if (len == 0) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_BAD_REQUEST, "invalid-json",
                                 "a JSON object is required", NULL);
        return NGX_ERROR;
    }

    data = ngx_pnalloc(r->pool, len);
    if (data == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NGX_ERROR;
    }

    p = data;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file) {
            n = ngx_read_file(b->file, p, b->file_last - b->file_pos,
                              b->file_pos);
            if (n != b->file_last - b->file_pos) {
                ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                         "internal",
                                         "cannot read the request body",
                                         NULL);
                return NGX_ERROR;
            }

            p += n;

        } else {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
        }
    }

    ctx->body = json_loadb((const char *) data, len, JSON_REJECT_DUPLICATES,
                           &jerr);

    if (ctx->body == NULL) {
        ngx_snprintf((u_char *) detail, sizeof(detail) - 1,
                     "invalid JSON at line %d, column %d: %s%Z",
                     jerr.line, jerr.column, jerr.text);

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "sgadmin: %V: %s", &r->uri, detail);

        ngx_http_sgadmin_problem(r, NGX_HTTP_BAD_REQUEST, "invalid-json",
                                 detail, NULL);
        return NGX_ERROR;
    }

    if (!json_is_object(ctx->body)) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_BAD_REQUEST, "invalid-json",
                                 "the body must be a JSON object", NULL);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* authentication: "Authorization: Bearer <token>", sha256 looked up */


static void
ngx_http_sgadmin_authenticate(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    u_char           *p, *last;
    ngx_str_t         token;
    ngx_uint_t        i;
    ngx_int_t         rc;
    unsigned int      mdlen;
    u_char            md[EVP_MAX_MD_SIZE];
    u_char            hex[EVP_MAX_MD_SIZE * 2 + 1];
    const char       *params[1];

    if (ctx->route->role == NGX_HTTP_SGADMIN_ROLE_NONE) {
        ngx_http_sgadmin_dispatch(r, ctx);
        return;
    }

    if (r->headers_in.authorization == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                 "an \"Authorization: Bearer\" token is"
                                 " required", NULL);
        return;
    }

    p = r->headers_in.authorization->value.data;
    last = p + r->headers_in.authorization->value.len;

    if (last - p < 7 || ngx_strncasecmp(p, (u_char *) "Bearer ", 7) != 0) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                 "only Bearer tokens are accepted", NULL);
        return;
    }

    for (p += 7; p < last && *p == ' '; p++) { /* void */ }

    token.data = p;
    token.len = last - p;

    if (token.len == 0 || token.len > NGX_HTTP_SGADMIN_MAX_TOKEN) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                 "the token is not valid", NULL);
        return;
    }

    if (EVP_Digest(token.data, token.len, md, &mdlen, EVP_sha256(), NULL)
        != 1)
    {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "cannot hash the token", NULL);
        return;
    }

    for (i = 0; i < mdlen; i++) {
        ngx_sprintf(hex + 2 * i, "%02xd", md[i]);
    }

    hex[2 * mdlen] = '\0';
    params[0] = (const char *) hex;

    rc = sg_pg_query(sg_worker.pg,
                     "UPDATE api_tokens SET last_used_at = now()"
                     " WHERE token_sha256 = $1 AND revoked_at IS NULL"
                     " RETURNING id, name, role",
                     1, params, ngx_http_sgadmin_auth_done, ctx);

    if (rc != NGX_OK) {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


static void
ngx_http_sgadmin_auth_done(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_ctx_t  *ctx = data;
    ngx_http_request_t      *r;
    const char              *role;

    r = ctx->request;

    if (err) {
        ngx_http_sgadmin_db_error(r, err);
        return;
    }

    if (PQntuples(res) != 1) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "sgadmin: %V: unknown or revoked token", &r->uri);
        ngx_http_sgadmin_problem(r, NGX_HTTP_UNAUTHORIZED, "unauthorized",
                                 "the token is not valid", NULL);
        return;
    }

    ctx->token_id = ngx_atoof((u_char *) PQgetvalue(res, 0, 0),
                              PQgetlength(res, 0, 0));

    ngx_snprintf(ctx->actor, sizeof(ctx->actor) - 1, "token:%s%Z",
                 PQgetvalue(res, 0, 1));

    role = PQgetvalue(res, 0, 2);
    ctx->role = ngx_strcmp(role, "admin") == 0 ? NGX_HTTP_SGADMIN_ROLE_ADMIN
                                               : NGX_HTTP_SGADMIN_ROLE_READ;

    if (ctx->role < ctx->route->role) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                 "this token is read-only", NULL);
        return;
    }

    ngx_http_sgadmin_dispatch(r, ctx);
}


static void
ngx_http_sgadmin_dispatch(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx)
{
    ctx->route->handler(r, ctx);
}


/* GET /api/v1/health: reachability and latency, through the adapters */


double
ngx_http_sgadmin_now_ms(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);

    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1000000.0;
}


static json_t *
ngx_http_sgadmin_health_item(ngx_uint_t ok, double latency, const char *err)
{
    json_t  *o;

    o = json_object();
    if (o == NULL) {
        return NULL;
    }

    json_object_set_new(o, "ok", json_boolean(ok));
    json_object_set_new(o, "latency_ms",
                        ok ? json_real(latency) : json_null());
    json_object_set_new(o, "error", err ? json_string(err) : json_null());

    return o;
}


static void
ngx_http_sgadmin_health(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx)
{
    json_t  *worker;

    ctx->result = json_object();
    worker = json_object();

    if (ctx->result == NULL || worker == NULL) {
        json_decref(worker);
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    json_object_set_new(worker, "pid", json_integer(ngx_pid));
    json_object_set_new(worker, "settings_loaded",
                        json_boolean(sg_worker.settings_loaded));
    json_object_set_new(worker, "settings_version",
                        json_integer(sg_worker.settings
                                     ? sg_worker.settings->version : 0));
    json_object_set_new(worker, "certificate_id",
                        sg_tls_active_id() ? json_integer(sg_tls_active_id())
                                           : json_null());
    json_object_set_new(ctx->result, "worker", worker);

    ctx->waiting = 2;

    ctx->started_pg = ngx_http_sgadmin_now_ms();

    if (sg_pg_query(sg_worker.pg, "SELECT 1", 0, NULL,
                    ngx_http_sgadmin_health_pg, ctx)
        != NGX_OK)
    {
        ngx_http_sgadmin_health_pg(ctx, NULL,
                                   sg_worker.pg
                                   ? sg_pg_last_error(sg_worker.pg)
                                   : "sg_postgres is not configured", "");
    }

    ctx->started_redis = ngx_http_sgadmin_now_ms();

    if (sg_redis_command(sg_worker.redis, ngx_http_sgadmin_health_redis, ctx,
                         "PING")
        != NGX_OK)
    {
        ngx_http_sgadmin_health_redis(ctx, NULL,
                                      sg_worker.redis
                                      ? sg_redis_last_error(sg_worker.redis)
                                      : "sg_redis is not configured");
    }
}


static void
ngx_http_sgadmin_health_pg(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_ctx_t  *ctx = data;

    if (err && err[0] == '\0') {
        err = "unavailable";
    }

    json_object_set_new(ctx->result, "postgres",
                        ngx_http_sgadmin_health_item(err == NULL,
                            ngx_http_sgadmin_now_ms() - ctx->started_pg,
                            err));

    ngx_http_sgadmin_health_done(ctx);
}


static void
ngx_http_sgadmin_health_redis(void *data, redisReply *reply, const char *err)
{
    ngx_http_sgadmin_ctx_t  *ctx = data;

    if (err && err[0] == '\0') {
        err = "unavailable";
    }

    json_object_set_new(ctx->result, "redis",
                        ngx_http_sgadmin_health_item(err == NULL,
                            ngx_http_sgadmin_now_ms() - ctx->started_redis,
                            err));

    ngx_http_sgadmin_health_done(ctx);
}


static void
ngx_http_sgadmin_health_done(ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_uint_t   ok;
    json_t      *result;

    if (--ctx->waiting) {
        return;
    }

    ok = json_is_true(json_object_get(json_object_get(ctx->result,
                                                      "postgres"), "ok"))
         && json_is_true(json_object_get(json_object_get(ctx->result,
                                                         "redis"), "ok"));

    json_object_set_new(ctx->result, "status",
                        json_string(ok ? "ok" : "degraded"));

    result = ctx->result;
    ctx->result = NULL;

    ngx_http_sgadmin_send_json(ctx->request,
                               ok ? NGX_HTTP_OK
                                  : NGX_HTTP_SERVICE_UNAVAILABLE,
                               result);
    json_decref(result);
}


/* answers */


void
ngx_http_sgadmin_send_text(ngx_http_request_t *r, ngx_uint_t status,
    const char *json, size_t len, ngx_str_t *etag)
{
    ngx_int_t                rc;
    ngx_buf_t               *b;
    ngx_chain_t              out;
    ngx_table_elt_t         *h;
    ngx_http_sgadmin_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_sgadmin_module);

    if (ctx->finished) {
        return;
    }

    ctx->finished = 1;

    r->headers_out.status = status;
    r->headers_out.content_length_n = len + 1;

    if (r->headers_out.content_type.len == 0) {
        ngx_str_set(&r->headers_out.content_type, "application/json");
        r->headers_out.content_type_len = r->headers_out.content_type.len;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h) {
        h->hash = 1;
        ngx_str_set(&h->key, "Cache-Control");
        ngx_str_set(&h->value, "no-store");
    }

    if (etag) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h) {
            h->hash = 1;
            ngx_str_set(&h->key, "ETag");
            h->value = *etag;
            r->headers_out.etag = h;
        }
    }

    if (status == NGX_HTTP_UNAUTHORIZED) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h) {
            h->hash = 1;
            ngx_str_set(&h->key, "WWW-Authenticate");
            ngx_str_set(&h->value, "Bearer realm=\"sg\"");
            r->headers_out.www_authenticate = h;
        }
    }

    if (status == NGX_HTTP_NOT_ALLOWED) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h) {
            h->hash = 1;
            ngx_str_set(&h->key, "Allow");
            ngx_str_set(&h->value, "GET, HEAD, POST, PUT, PATCH, DELETE");
        }
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        ngx_http_finalize_request(r, rc);
        return;
    }

    b = ngx_create_temp_buf(r->pool, len + 1);
    if (b == NULL) {
        ngx_http_finalize_request(r, NGX_ERROR);
        return;
    }

    b->last = ngx_cpymem(b->last, json, len);
    *b->last++ = '\n';
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    ngx_http_finalize_request(r, ngx_http_output_filter(r, &out));
}


void
ngx_http_sgadmin_send_json(ngx_http_request_t *r, ngx_uint_t status,
    json_t *body)
{
    char  *text;

    text = json_dumps(body, JSON_COMPACT|JSON_PRESERVE_ORDER
                           |JSON_REAL_PRECISION(6));

    if (text == NULL) {
        ngx_http_sgadmin_send_text(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                   "{}", 2, NULL);
        return;
    }

    ngx_http_sgadmin_send_text(r, status, text, ngx_strlen(text), NULL);

    free(text);
}


/*
 * RFC 9457: type, title, status, detail, and errors[] for validation.
 * The type is a URN of ours: a stable name a client can switch on.
 */

void
ngx_http_sgadmin_problem(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *detail, json_t *errors)
{
    json_t      *p;
    const char  *title;
    char         urn[96];

    switch (status) {
    case NGX_HTTP_BAD_REQUEST:
        title = "Bad Request";
        break;
    case NGX_HTTP_UNAUTHORIZED:
        title = "Unauthorized";
        break;
    case NGX_HTTP_FORBIDDEN:
        title = "Forbidden";
        break;
    case NGX_HTTP_NOT_FOUND:
        title = "Not Found";
        break;
    case NGX_HTTP_NOT_ALLOWED:
        title = "Method Not Allowed";
        break;
    case NGX_HTTP_CONFLICT:
        title = "Conflict";
        break;
    case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
        title = "Content Too Large";
        break;
    case NGX_HTTP_LENGTH_REQUIRED:
        title = "Length Required";
        break;
    case NGX_HTTP_UNSUPPORTED_MEDIA_TYPE:
        title = "Unsupported Media Type";
        break;
    case 422:
        title = "Unprocessable Content";
        break;
    case NGX_HTTP_SERVICE_UNAVAILABLE:
        title = "Service Unavailable";
        break;
    default:
        title = "Internal Server Error";
    }

    ngx_snprintf((u_char *) urn, sizeof(urn) - 1, "urn:sg:problem:%s%Z",
                 type);

    p = json_object();
    if (p == NULL) {
        ngx_http_sgadmin_send_text(r, status, "{}", 2, NULL);
        return;
    }

    json_object_set_new(p, "type", json_string(urn));
    json_object_set_new(p, "title", json_string(title));
    json_object_set_new(p, "status", json_integer(status));
    json_object_set_new(p, "detail", json_string(detail));

    if (errors) {
        json_object_set(p, "errors", errors);
    }

    ngx_str_set(&r->headers_out.content_type, "application/problem+json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

    ngx_http_sgadmin_send_json(r, status, p);

    json_decref(p);
}


void
ngx_http_sgadmin_db_error(ngx_http_request_t *r, const char *err)
{
    char  detail[320];

    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "sgadmin: %V: postgresql unavailable: %s", &r->uri, err);

    ngx_snprintf((u_char *) detail, sizeof(detail) - 1,
                 "the database is unavailable: %s%Z", err);

    ngx_http_sgadmin_problem(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                             "database-unavailable", detail, NULL);
}


static void
ngx_http_sgadmin_cleanup(void *data)
{
    ngx_http_sgadmin_ctx_t  *ctx = data;

    if (ctx->body) {
        json_decref(ctx->body);
        ctx->body = NULL;
    }

    if (ctx->result) {
        json_decref(ctx->result);
        ctx->result = NULL;
    }
}


/* configuration */


static ngx_int_t
ngx_http_sgadmin_postconfiguration(ngx_conf_t *cf)
{
#if (NGX_HTTP_SSL)
    ngx_uint_t                   s;
    ngx_http_ssl_srv_conf_t     *sscf;
    ngx_http_core_srv_conf_t   **cscfp;
    ngx_http_core_main_conf_t   *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
    cscfp = cmcf->servers.elts;

    /* every TLS server serves the active certificate from PostgreSQL */

    for (s = 0; s < cmcf->servers.nelts; s++) {
        sscf = cscfp[s]->ctx->srv_conf[ngx_http_ssl_module.ctx_index];

        if (sscf && sscf->ssl.ctx) {
            if (sg_tls_install(cf, &sscf->ssl) != NGX_OK) {
                return NGX_ERROR;
            }
        }
    }
#endif

    return NGX_OK;
}


static void *
ngx_http_sgadmin_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_sgadmin_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sgadmin_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->enable = NGX_CONF_UNSET;
    conf->require_https = NGX_CONF_UNSET;
    conf->max_body_size = NGX_CONF_UNSET_SIZE;

    return conf;
}


static char *
ngx_http_sgadmin_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_sgadmin_loc_conf_t  *prev = parent;
    ngx_http_sgadmin_loc_conf_t  *conf = child;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_value(conf->require_https, prev->require_https, 1);
    ngx_conf_merge_size_value(conf->max_body_size, prev->max_body_size,
                              64 * 1024);

    return NGX_CONF_OK;
}


static char *
ngx_http_sgadmin(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sgadmin_loc_conf_t  *alcf = conf;
    ngx_http_core_loc_conf_t     *clcf;

    if (alcf->enable != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    alcf->enable = 1;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_sgadmin_handler;

    /*
     * sgadmin_max_body_size decides, with a problem+json answer; nginx's
     * own limit would answer an HTML 413 first.  Bodies need a
     * Content-Length here, so nothing unbounded is read.
     */
    if (clcf->client_max_body_size == NGX_CONF_UNSET) {
        clcf->client_max_body_size = 0;
    }

    return NGX_CONF_OK;
}
