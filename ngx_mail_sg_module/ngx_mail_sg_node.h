/*
 * sg: the delivery connections of a whole node (one nginx, all its
 * workers), counted in the shared memory zone "sg_delivery", so that
 * sg_delivery_concurrency and sg_delivery_destination_concurrency hold
 * for the node, as Postfix's limits hold for its queue manager.
 *
 * A worker asks before it opens a session to a destination
 * (sg_node_acquire) and gives the session back when it ends
 * (sg_node_release); between the two, it tells the zone how many
 * connections it has (sessions, and connections saying QUIT:
 * sg_node_connections).  The counts of a worker that died without giving
 * back are dropped by the first worker that notices (sg_node_sweep).
 */

#ifndef _NGX_MAIL_SG_NODE_H_INCLUDED_
#define _NGX_MAIL_SG_NODE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


#define SG_NODE_SLOTS           256      /* processes counted at once */


ngx_shm_zone_t *sg_node_zone_add(ngx_cycle_t *cycle, ngx_uint_t concurrency);
void sg_node_init_process(ngx_shm_zone_t *zone, ngx_log_t *log);
void sg_node_exit_process(void);

/*
 * NGX_OK: counted, open the session; NGX_DONE: open it, not counted (the
 * worker counts alone, or the zone is full: do not release it);
 * NGX_BUSY: the destination has no room on the node; NGX_DECLINED: the
 * node has none.  connections: the caller's own, before this session.
 */
ngx_int_t sg_node_acquire(ngx_str_t *name, ngx_uint_t dest_limit,
    ngx_uint_t limit, ngx_uint_t connections);
ngx_uint_t sg_node_yield(ngx_str_t *name, ngx_uint_t dest_limit,
    ngx_uint_t limit, ngx_uint_t next);
void sg_node_release(ngx_str_t *name, ngx_uint_t connections);
ngx_uint_t sg_node_serve_own(void);
void sg_node_connections(ngx_uint_t connections);
void sg_node_sweep(void);


#endif /* _NGX_MAIL_SG_NODE_H_INCLUDED_ */
