/*
 * sg: the core module.  It holds the infrastructure directives (main
 * context of nginx.conf) and opens, in each worker, the connections both
 * protocol modules share.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "sg_core.h"
#include "sg_tls.h"
#include "sg_lists.h"
#include "sg_dns.h"
#include "sg_http.h"
#include "sg_sts.h"


static void *sg_core_create_conf(ngx_cycle_t *cycle);
static char *sg_core_init_conf(ngx_cycle_t *cycle, void *conf);
static ngx_int_t sg_core_init_process(ngx_cycle_t *cycle);
static char *sg_core_resolver(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *sg_core_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static void sg_core_exit_process(ngx_cycle_t *cycle);


sg_worker_t  sg_worker;


static ngx_command_t  sg_core_commands[] = {

    { ngx_string("sg_postgres"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      0,
      offsetof(sg_core_conf_t, pg_conninfo),
      NULL },

    { ngx_string("sg_postgres_pool"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      0,
      offsetof(sg_core_conf_t, pg_pool_size),
      NULL },

    { ngx_string("sg_postgres_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_core_conf_t, pg_timeout),
      NULL },

    { ngx_string("sg_postgres_connect_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_core_conf_t, pg_connect_timeout),
      NULL },

    { ngx_string("sg_redis"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      0,
      offsetof(sg_core_conf_t, redis_addr),
      NULL },

    { ngx_string("sg_redis_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_core_conf_t, redis_timeout),
      NULL },

    { ngx_string("sg_settings_poll"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_core_conf_t, settings_poll),
      NULL },

    { ngx_string("sg_resolver"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      sg_core_resolver,
      0,
      offsetof(sg_core_conf_t, resolver),
      NULL },

    { ngx_string("sg_trusted_ca"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      sg_core_file,
      0,
      offsetof(sg_core_conf_t, trusted_ca),
      NULL },

    { ngx_string("sg_dnssec_trust_anchor"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      sg_core_file,
      0,
      offsetof(sg_core_conf_t, dnssec_trust_anchor),
      NULL },

      ngx_null_command
};


static ngx_core_module_t  sg_core_module_ctx = {
    ngx_string("sg"),
    sg_core_create_conf,
    sg_core_init_conf
};


ngx_module_t  ngx_sg_module = {
    NGX_MODULE_V1,
    &sg_core_module_ctx,                   /* module context */
    sg_core_commands,                      /* module directives */
    NGX_CORE_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    sg_core_init_process,                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    sg_core_exit_process,                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


sg_core_conf_t *
sg_core_conf(ngx_cycle_t *cycle)
{
    return (sg_core_conf_t *) ngx_get_conf(cycle->conf_ctx,
                                           ngx_sg_module);
}


static void *
sg_core_create_conf(ngx_cycle_t *cycle)
{
    sg_core_conf_t  *conf;

    conf = ngx_pcalloc(cycle->pool, sizeof(sg_core_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->pg_pool_size = NGX_CONF_UNSET_UINT;
    conf->pg_timeout = NGX_CONF_UNSET_MSEC;
    conf->pg_connect_timeout = NGX_CONF_UNSET_MSEC;
    conf->redis_timeout = NGX_CONF_UNSET_MSEC;
    conf->settings_poll = NGX_CONF_UNSET_MSEC;

    return conf;
}


static char *
sg_core_init_conf(ngx_cycle_t *cycle, void *conf)
{
    sg_core_conf_t  *scf = conf;

    ngx_conf_init_uint_value(scf->pg_pool_size, 2);
    ngx_conf_init_msec_value(scf->pg_timeout, 10000);
    ngx_conf_init_msec_value(scf->pg_connect_timeout, 5000);
    ngx_conf_init_msec_value(scf->redis_timeout, 2000);
    ngx_conf_init_msec_value(scf->settings_poll, 30000);

    if (scf->pg_pool_size < 1 || scf->pg_pool_size > 64) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_postgres_pool\" must be from 1 to 64");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* "ip" or "ip:port", IPv6 as "[::1]:53": checked here, used by delivery */

static char *
sg_core_resolver(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_str_t  *value, *field;
    ngx_url_t   u;

    field = (ngx_str_t *) ((u_char *) conf + cmd->offset);

    if (field->data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    ngx_memzero(&u, sizeof(ngx_url_t));
    u.url = value[1];
    u.default_port = 53;
    u.no_resolve = 1;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.naddrs != 1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid resolver \"%V\": an IP address with an"
                           " optional port is required", &value[1]);
        return NGX_CONF_ERROR;
    }

    *field = value[1];

    return NGX_CONF_OK;
}


static char *
sg_core_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_str_t        *value, *field;
    ngx_file_info_t   fi;

    field = (ngx_str_t *) ((u_char *) conf + cmd->offset);

    if (field->data) {
        return "is duplicate";
    }

    value = cf->args->elts;
    *field = value[1];

    if (ngx_conf_full_name(cf->cycle, field, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_file_info(field->data, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "cannot read \"%V\"", field);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
sg_core_init_process(ngx_cycle_t *cycle)
{
    sg_core_conf_t  *scf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    ngx_memzero(&sg_worker, sizeof(sg_worker_t));

    scf = sg_core_conf(cycle);

    if (scf == NULL || scf->pg_conninfo.len == 0) {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "sg: no \"sg_postgres\" in nginx.conf, sg is idle");
        return NGX_OK;
    }

    sg_worker.pg = sg_pg_pool_create(cycle, &scf->pg_conninfo,
                                     scf->pg_pool_size, scf->pg_timeout,
                                     scf->pg_connect_timeout);
    if (sg_worker.pg == NULL) {
        return NGX_ERROR;
    }

    if (scf->redis_addr.len) {
        sg_worker.redis = sg_redis_create(cycle, &scf->redis_addr,
                                          scf->redis_timeout);
        if (sg_worker.redis == NULL) {
            return NGX_ERROR;
        }
    }

    if (sg_settings_init_worker(cycle, scf->settings_poll) != NGX_OK) {
        return NGX_ERROR;
    }

    if (sg_tls_init_worker(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (sg_lists_init_worker(cycle, scf->settings_poll) != NGX_OK) {
        return NGX_ERROR;
    }

    if (sg_dns_init_worker(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (sg_http_init_worker(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (sg_sts_init_worker(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
sg_core_exit_process(ngx_cycle_t *cycle)
{
    sg_settings_exit_worker();
    sg_lists_exit_worker();
    sg_tls_exit_worker();
    sg_sts_exit_worker();
    sg_http_exit_worker();
    sg_dns_exit_worker();

    sg_redis_destroy(sg_worker.redis);
    sg_worker.redis = NULL;

    sg_pg_pool_destroy(sg_worker.pg);
    sg_worker.pg = NULL;
}
