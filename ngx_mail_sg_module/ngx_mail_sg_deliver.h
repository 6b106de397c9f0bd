/*
 * sg: the delivery engine.  Every worker claims due recipients from the
 * PostgreSQL queue, groups them by message and destination, resolves the
 * destination, decides the TLS level per host and sends with the SMTP
 * client (ngx_mail_sg_client.h); results, attempts and DSNs go back to
 * PostgreSQL.  Its directives are in the main context (ngx_sg_deliver_module).
 */

#ifndef _NGX_MAIL_SG_DELIVER_H_INCLUDED_
#define _NGX_MAIL_SG_DELIVER_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


#define SG_DLV_MAX_SCHEDULE     32       /* steps of the retry schedule */
#define SG_DLV_ROUTE_TTL        60       /* s a DNS answer is reused */
#define SG_DLV_MAX_RCPTS        1000     /* recipients in one transaction */
#define SG_DLV_REPLY_MAX        1024
#define SG_DLV_MAX_CONCURRENCY  65535    /* connections on one node */


typedef struct {
    ngx_flag_t           enable;
    ngx_str_t            hostname;
    ngx_uint_t           concurrency;        /* connections on the node */
    ngx_uint_t           dest_concurrency;   /* per destination, node */
    ngx_uint_t           mx_address_limit;   /* addresses tried per job */
    ngx_uint_t           mx_session_limit;   /* sessions that got an answer */
    size_t               memory;             /* message bodies held */
    ngx_uint_t           batch;              /* recipients claimed at once */
    ngx_msec_t           lease;
    ngx_msec_t           poll;
    time_t               schedule[SG_DLV_MAX_SCHEDULE];
    ngx_uint_t           nschedule;
    time_t               max_lifetime;
    time_t               delay_notice;
    ngx_msec_t           connect_timeout;
    ngx_msec_t           command_timeout;
    ngx_msec_t           data_init_timeout;
    ngx_msec_t           data_block_timeout;
    ngx_msec_t           data_done_timeout;
    ngx_msec_t           idle_timeout;
    time_t               tls_failure_period;
    ngx_uint_t           port;               /* MX port, 25 */
    ngx_shm_zone_t      *node_zone;          /* "sg_delivery" */
} sg_dlv_conf_t;


extern ngx_module_t  ngx_sg_deliver_module;


#endif /* _NGX_MAIL_SG_DELIVER_H_INCLUDED_ */
