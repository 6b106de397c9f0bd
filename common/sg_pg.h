/*
 * sg: PostgreSQL on nginx's event loop.
 *
 * A small pool of non-blocking libpq connections per worker plus one
 * connection that only LISTENs.  Every query is answered exactly once
 * through its handler: with a result, with an error, or with a timeout.
 * Connections that fail are dropped and reconnected with backoff.
 */

#ifndef _SG_PG_H_INCLUDED_
#define _SG_PG_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <libpq-fe.h>


#define SG_PG_MAX_PARAMS      24
#define SG_PG_MAX_PENDING     4096
#define SG_PG_MAX_CHANNELS    8
#define SG_PG_MAX_STMTS       32
#define SG_PG_BACKOFF_MIN     100
#define SG_PG_BACKOFF_MAX     5000


typedef struct sg_pg_pool_s  sg_pg_pool_t;


/*
 * A named statement, prepared on each connection the first time it runs
 * there (PQsendPrepare, then PQsendQueryPrepared), and again after a
 * reconnect: the server parses and plans it once per connection instead
 * of once per query.  Define it static, with a name unique in the
 * process: SG_PG_STMT("sg_dlv_claim", SQL).  One statement only (no
 * multi-statement text).  A pool knows at most SG_PG_MAX_STMTS of them.
 */
typedef struct {
    const char          *name;
    const char          *sql;
} sg_pg_stmt_t;

#define SG_PG_STMT(name, sql)  { name, sql }

/*
 * res is a PGRES_TUPLES_OK or PGRES_COMMAND_OK result (freed after the
 * handler returns) and err is NULL; or res is NULL and err says why.
 * sqlstate is set for server errors ("23503" ...), else "".
 */
typedef void (*sg_pg_handler_pt)(void *data, PGresult *res, const char *err,
    const char *sqlstate);

/*
 * payload is NULL when the LISTEN connection has just been (re)established:
 * notifications may have been missed, reload.
 */
typedef void (*sg_pg_notify_pt)(void *data, const char *channel,
    const char *payload);


/* a parameter that is not copied: it must live until the handler runs */
typedef struct {
    const char          *data;      /* NULL: SQL NULL */
    size_t               len;
    unsigned             binary:1;
} sg_pg_param_t;


sg_pg_pool_t *sg_pg_pool_create(ngx_cycle_t *cycle, ngx_str_t *conninfo,
    ngx_uint_t size, ngx_msec_t timeout, ngx_msec_t connect_timeout);
void sg_pg_pool_destroy(sg_pg_pool_t *pool);

/*
 * NGX_OK: the handler will be called later.  NGX_DECLINED: PostgreSQL is
 * unavailable now (no connection up or connecting); NGX_BUSY: too many
 * queries waiting; NGX_ERROR: out of memory.  The handler is not called
 * for any of these.  Parameters are copied.  With nparams == 0 the text
 * may hold several statements (one implicit transaction).
 */
ngx_int_t sg_pg_query(sg_pg_pool_t *pool, const char *sql,
    ngx_uint_t nparams, const char *const *params, sg_pg_handler_pt handler,
    void *data);

/*
 * Like sg_pg_query, but the parameters are the caller's (not copied, may be
 * binary): big values (message bodies) are not duplicated while queries
 * wait for a connection.
 */
ngx_int_t sg_pg_query_params(sg_pg_pool_t *pool, const char *sql,
    ngx_uint_t nparams, const sg_pg_param_t *params,
    sg_pg_handler_pt handler, void *data);

/* like sg_pg_query_params, with every result column in binary format */
ngx_int_t sg_pg_query_binary(sg_pg_pool_t *pool, const char *sql,
    ngx_uint_t nparams, const sg_pg_param_t *params,
    sg_pg_handler_pt handler, void *data);

/*
 * sg_pg_query, sg_pg_query_params and sg_pg_query_binary for a prepared
 * statement: same answers, same parameter rules.
 */
ngx_int_t sg_pg_exec(sg_pg_pool_t *pool, sg_pg_stmt_t *stmt,
    ngx_uint_t nparams, const char *const *params, sg_pg_handler_pt handler,
    void *data);
ngx_int_t sg_pg_exec_params(sg_pg_pool_t *pool, sg_pg_stmt_t *stmt,
    ngx_uint_t nparams, const sg_pg_param_t *params,
    sg_pg_handler_pt handler, void *data);
ngx_int_t sg_pg_exec_binary(sg_pg_pool_t *pool, sg_pg_stmt_t *stmt,
    ngx_uint_t nparams, const sg_pg_param_t *params,
    sg_pg_handler_pt handler, void *data);

ngx_int_t sg_pg_listen(sg_pg_pool_t *pool, const char *channel,
    sg_pg_notify_pt handler, void *data);

/* connections currently up (idle or busy), not counting the listener */
ngx_uint_t sg_pg_up(sg_pg_pool_t *pool);
const char *sg_pg_last_error(sg_pg_pool_t *pool);

/*
 * The server refused the statement itself (nothing of it was committed):
 * an error with an SQLSTATE outside the classes of a lost connection (08),
 * of resources (53), of an operator or shutdown (57) and of the system
 * (58), after which the statement may or may not have committed.
 */
ngx_uint_t sg_pg_refused(const char *err, const char *sqlstate);


#endif /* _SG_PG_H_INCLUDED_ */
