/*
 * sg: the HTTPS admin module.  Shared declarations of its files.
 */

#ifndef _NGX_HTTP_SGADMIN_H_INCLUDED_
#define _NGX_HTTP_SGADMIN_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <jansson.h>

#include "sg_core.h"


#define NGX_HTTP_SGADMIN_ROLE_NONE       0
#define NGX_HTTP_SGADMIN_ROLE_READ       1
#define NGX_HTTP_SGADMIN_ROLE_ADMIN      2

#define NGX_HTTP_SGADMIN_MAX_TOKEN       256
#define NGX_HTTP_SGADMIN_MAX_ERRORS      32


typedef struct ngx_http_sgadmin_ctx_s  ngx_http_sgadmin_ctx_t;

typedef void (*ngx_http_sgadmin_handler_pt)(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);


typedef struct {
    ngx_uint_t                    method;      /* NGX_HTTP_GET ... */
    ngx_str_t                     path;        /* after /api/v1 */
    ngx_uint_t                    role;        /* who may call it */
    ngx_http_sgadmin_handler_pt   handler;
} ngx_http_sgadmin_route_t;


struct ngx_http_sgadmin_ctx_s {
    ngx_http_request_t           *request;
    const ngx_http_sgadmin_route_t  *route;
    ngx_str_t                     param;       /* the {...} of the path */

    json_t                       *body;        /* parsed JSON, or NULL */

    int64_t                       token_id;
    ngx_uint_t                    role;
    u_char                        actor[80];   /* "token:NAME" */
    u_char                        client[NGX_SOCKADDR_STRLEN + 1];

    /* health */
    ngx_uint_t                    waiting;
    double                        started_pg;
    double                        started_redis;
    json_t                        *result;

    unsigned                      finished:1;
};


typedef struct {
    ngx_flag_t                    enable;
    ngx_flag_t                    require_https;
    size_t                        max_body_size;
} ngx_http_sgadmin_loc_conf_t;


extern ngx_module_t  ngx_http_sgadmin_module;


/* answers and finalizes the request */
void ngx_http_sgadmin_send_json(ngx_http_request_t *r, ngx_uint_t status,
    json_t *body);
void ngx_http_sgadmin_send_text(ngx_http_request_t *r, ngx_uint_t status,
    const char *json, size_t len, ngx_str_t *etag);
void ngx_http_sgadmin_problem(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *detail, json_t *errors);
void ngx_http_sgadmin_db_error(ngx_http_request_t *r, const char *err);
void ngx_http_sgadmin_no_content(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
double ngx_http_sgadmin_now_ms(void);

void ngx_http_sgadmin_settings_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_settings_patch(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);

/*
 * lists, domains, rules and delivery (ngx_http_sgadmin_lists.c, _domains.c,
 * _rules.c, _delivery.c)
 */

#define NGX_HTTP_SGADMIN_LIMIT_DEFAULT   100
#define NGX_HTTP_SGADMIN_LIMIT_MAX       500
#define NGX_HTTP_SGADMIN_COMMENT_MAX     255
#define NGX_HTTP_SGADMIN_ID_MAX          18      /* digits: fits a bigint */

/* the three first parameters of every write: actor, token id, client */
#define NGX_HTTP_SGADMIN_AUDIT_PARAMS    3

void ngx_http_sgadmin_op(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    const char *sql, ngx_uint_t nparams, const char **params,
    ngx_uint_t status, const char *conflict);
void ngx_http_sgadmin_op_json(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, const char *sql, ngx_uint_t nparams,
    const char **params, json_t *body, ngx_uint_t status,
    const char *conflict);
void ngx_http_sgadmin_id_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, const char *sql);
void ngx_http_sgadmin_audit_params(ngx_http_sgadmin_ctx_t *ctx,
    const char **params, u_char *id);
void ngx_http_sgadmin_error(json_t *errors, const char *field,
    const char *message);
ngx_int_t ngx_http_sgadmin_refuse(ngx_http_request_t *r, json_t *errors,
    const char *detail);
void ngx_http_sgadmin_known_fields(json_t *obj, const char *prefix,
    const char *const *names, json_t *errors);
const char *ngx_http_sgadmin_text(json_t *v, size_t max);
ngx_int_t ngx_http_sgadmin_page_args(ngx_http_request_t *r, json_t *errors,
    u_char *limit, ngx_str_t *cursor);
ngx_int_t ngx_http_sgadmin_parse_id(ngx_str_t *s, u_char *id);

void ngx_http_sgadmin_whitelist_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_whitelist_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_whitelist_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_required_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_required_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_required_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_relay_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_relay_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_relay_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);

void ngx_http_sgadmin_domains_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_domains_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_domains_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_domains_update(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_domains_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
ngx_int_t ngx_http_sgadmin_domain_param(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, const char **id, const char **name);

void ngx_http_sgadmin_rules_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_rules_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_rules_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_rules_update(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_rules_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);

void ngx_http_sgadmin_routes_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_routes_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_routes_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_routes_update(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_routes_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);

void ngx_http_sgadmin_tls_failures_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_tls_failures_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);

/*
 * Lists kept in Redis (ngx_http_sgadmin_delivery.c): every key that starts
 * with prefix, an item for each value (item() may return NULL: left out),
 * answered as {"items": [...], "next_cursor": null}.  Redis down: 503,
 * its detail says fallback (what sg does meanwhile) and more.
 */
typedef json_t *(*ngx_http_sgadmin_item_pt)(ngx_str_t *key, redisReply *v);

void ngx_http_sgadmin_redis_list(ngx_http_request_t *r, const char *prefix,
    ngx_http_sgadmin_item_pt item, const char *fallback);
void ngx_http_sgadmin_redis_down(ngx_http_request_t *r, const char *err,
    const char *fallback, const char *more);

void ngx_http_sgadmin_queue_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_queue_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_queue_retry(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_queue_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);


/* ngx_http_sgadmin_resolve.c */
void ngx_http_sgadmin_resolve(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);

/* ngx_http_sgadmin_sts_host.c: MTA-STS policies of local domains */
#define NGX_HTTP_SGADMIN_STS_URI  "/.well-known/mta-sts.txt"

/* NGX_DECLINED: not the policy's path; else answered */
ngx_int_t ngx_http_sgadmin_sts_policy(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_domains_dns(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);

/* ngx_http_sgadmin_sts.c */
void ngx_http_sgadmin_sts_list(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_sts_get(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);
void ngx_http_sgadmin_sts_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);

/* ngx_http_sgadmin_metrics.c: GET /metrics, Prometheus text format */
void ngx_http_sgadmin_metrics(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx);


#endif /* _NGX_HTTP_SGADMIN_H_INCLUDED_ */
