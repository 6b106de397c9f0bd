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

/* sg_redis_scan_get(): SCAN ... COUNT, and where it stops */
#define SG_REDIS_SCAN_COUNT      "1000"
#define SG_REDIS_SCAN_CALLS_MAX  1000
#define SG_REDIS_SCAN_KEYS_MAX   10000


typedef struct sg_redis_s  sg_redis_t;

/* reply is NULL when err is set; a Redis error reply also sets err */
typedef void (*sg_redis_handler_pt)(void *data, redisReply *reply,
    const char *err);

/*
 * rc NGX_OK: keys[n], in order and once each, and values, the MGET reply
 * (n elements, in the order of keys; one that is not a string expired
 * meanwhile), NULL when n is 0.  NGX_DECLINED: Redis is unavailable or
 * failed, err says why (it may be empty).  NGX_ERROR: Redis gave an
 * unexpected reply, or memory ran out; err says which.
 */
typedef void (*sg_redis_scan_handler_pt)(void *data, ngx_int_t rc,
    ngx_str_t *keys, ngx_uint_t n, redisReply *values, const char *err);


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

/*
 * Every key longer than prefix that starts with it, and its value: SCAN
 * MATCH <prefix>* until the cursor is 0 (at most SG_REDIS_SCAN_CALLS_MAX
 * calls and SG_REDIS_SCAN_KEYS_MAX keys: a list cut there is logged), then
 * MGET.  prefix holds no glob character; r may be NULL.  handler is called
 * exactly once, perhaps before this returns; keys live in pool.
 */
void sg_redis_scan_get(sg_redis_t *r, ngx_pool_t *pool, ngx_log_t *log,
    const char *prefix, sg_redis_scan_handler_pt handler, void *data);

ngx_uint_t sg_redis_up(sg_redis_t *r);
const char *sg_redis_last_error(sg_redis_t *r);


#endif /* _SG_REDIS_H_INCLUDED_ */
