/*
 * sg: Redis on nginx's event loop (hiredis async, nginx-event adapter).
 *
 * One connection per worker, reconnected with backoff.  hiredis 0.14 has
 * no timeouts: every command has an nginx timer, and a timeout drops the
 * connection (its late answer can no longer be matched safely).
 */

#ifndef _SG_REDIS_H_INCLUDED_
#define _SG_REDIS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>


#define SG_REDIS_BACKOFF_MIN  100
#define SG_REDIS_BACKOFF_MAX  5000
#define SG_REDIS_MAX_PENDING  4096


typedef struct sg_redis_s  sg_redis_t;

/* reply is NULL when err is set; a Redis error reply also sets err */
typedef void (*sg_redis_handler_pt)(void *data, redisReply *reply,
    const char *err);


/* addr: "unix:/path" or "ip:port" */
sg_redis_t *sg_redis_create(ngx_cycle_t *cycle, ngx_str_t *addr,
    ngx_msec_t timeout);
void sg_redis_destroy(sg_redis_t *r);

/*
 * NGX_OK: the handler will be called exactly once.  NGX_DECLINED: Redis is
 * not connected now; NGX_BUSY: too many commands waiting; NGX_ERROR.
 */
ngx_int_t sg_redis_command(sg_redis_t *r, sg_redis_handler_pt handler,
    void *data, const char *fmt, ...);
ngx_int_t sg_redis_command_argv(sg_redis_t *r, sg_redis_handler_pt handler,
    void *data, int argc, const char **argv, const size_t *argvlen);

ngx_uint_t sg_redis_up(sg_redis_t *r);
const char *sg_redis_last_error(sg_redis_t *r);


#endif /* _SG_REDIS_H_INCLUDED_ */
