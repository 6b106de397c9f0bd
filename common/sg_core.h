/*
 * sg: the core module.  Main-context directives for the infrastructure both
 * protocol modules share (PostgreSQL, Redis), and the per-worker state built
 * on them in init_process.
 */

#ifndef _SG_CORE_H_INCLUDED_
#define _SG_CORE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>

#include "sg_pg.h"
#include "sg_redis.h"
#include "sg_settings.h"


typedef struct {
    ngx_str_t            pg_conninfo;
    ngx_uint_t           pg_pool_size;
    ngx_msec_t           pg_timeout;
    ngx_msec_t           pg_connect_timeout;

    ngx_str_t            redis_addr;
    ngx_msec_t           redis_timeout;

    ngx_msec_t           settings_poll;

    /* outbound (delivery, MTA-STS fetches): kept here for every module */
    ngx_str_t            resolver;          /* ip[:port], or "" */
    ngx_str_t            trusted_ca;        /* extra CAs, PEM file */
    ngx_str_t            dnssec_trust_anchor;
} sg_core_conf_t;


/* Everything one worker owns, created in init_process. */
typedef struct {
    sg_pg_pool_t        *pg;
    sg_redis_t          *redis;
    sg_settings_t       *settings;      /* current, never NULL once loaded */
    ngx_uint_t           settings_loaded;
} sg_worker_t;


extern ngx_module_t  ngx_sg_module;
extern sg_worker_t   sg_worker;


sg_core_conf_t *sg_core_conf(ngx_cycle_t *cycle);


#endif /* _SG_CORE_H_INCLUDED_ */
