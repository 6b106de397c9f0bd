/*
 * sg: PostgreSQL on nginx's event loop (libpq non-blocking, PQsocket
 * wrapped in an nginx connection, level-triggered events).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "sg_pg.h"


typedef enum {
    SG_PG_DOWN = 0,
    SG_PG_CONNECTING,
    SG_PG_IDLE,
    SG_PG_BUSY
} sg_pg_state_e;


typedef struct sg_pg_query_s  sg_pg_query_t;
typedef struct sg_pg_conn_s   sg_pg_conn_t;


struct sg_pg_query_s {
    ngx_queue_t          queue;
    sg_pg_pool_t        *pool;
    sg_pg_conn_t        *conn;          /* running on, or NULL if waiting */
    sg_pg_handler_pt     handler;
    void                *data;
    ngx_event_t          timer;
    char                *sql;          /* NULL for a prepared statement */
    sg_pg_stmt_t        *stmt;
    ngx_uint_t           stmt_index;    /* in pool->stmts */
    ngx_uint_t           nparams;
    char                *params[SG_PG_MAX_PARAMS];
    int                  lengths[SG_PG_MAX_PARAMS];
    int                  formats[SG_PG_MAX_PARAMS];
    unsigned             internal:1;
    unsigned             borrowed:1;    /* params are the caller's */
    unsigned             binary:1;      /* results in binary format */
};


struct sg_pg_conn_s {
    sg_pg_pool_t        *pool;
    PGconn              *conn;
    ngx_connection_t    *c;
    sg_pg_state_e        state;
    sg_pg_query_t       *query;
    PGresult            *result;
    PGresult            *error;
    ngx_event_t          timer;         /* connect timeout, reconnect */
    ngx_msec_t           backoff;
    ngx_uint_t           index;
    uint32_t             prepared;      /* bit i: pool->stmts[i] */
    unsigned             listener:1;
    unsigned             preparing:1;   /* PQsendPrepare is running */
    unsigned             stale:1;       /* drop it once the query is done */
};


typedef struct {
    char                 name[64];
    sg_pg_notify_pt      handler;
    void                *data;
} sg_pg_channel_t;


struct sg_pg_pool_s {
    ngx_log_t           *log;
    char                *conninfo;
    char                 options[64];
    ngx_msec_t           timeout;
    ngx_msec_t           connect_timeout;
    ngx_uint_t           size;
    sg_pg_conn_t        *conns;         /* size + 1: the last one LISTENs */
    ngx_queue_t          pending;
    ngx_uint_t           npending;
    sg_pg_channel_t      channels[SG_PG_MAX_CHANNELS];
    ngx_uint_t           nchannels;
    sg_pg_stmt_t        *stmts[SG_PG_MAX_STMTS];
    ngx_uint_t           nstmts;
    char                 last_error[256];
    ngx_event_t          dispatch;      /* posted: handlers never run
                                           inside sg_pg_query() */
    unsigned             destroyed:1;
};


static void sg_pg_connect(sg_pg_conn_t *pc);
static void sg_pg_reconnect_handler(ngx_event_t *ev);
static void sg_pg_connect_poll_handler(ngx_event_t *ev);
static void sg_pg_connected(sg_pg_conn_t *pc);
static void sg_pg_io_handler(ngx_event_t *ev);
static void sg_pg_close(sg_pg_conn_t *pc, const char *why);
static ngx_int_t sg_pg_wrap(sg_pg_conn_t *pc);
static void sg_pg_unwrap(sg_pg_conn_t *pc);
static ngx_int_t sg_pg_want(sg_pg_conn_t *pc, ngx_uint_t read,
    ngx_uint_t write);
static void sg_pg_dispatch(sg_pg_pool_t *pool);
static ngx_int_t sg_pg_query_copied(sg_pg_pool_t *pool, const char *sql,
    sg_pg_stmt_t *stmt, ngx_uint_t nparams, const char *const *params,
    sg_pg_handler_pt handler, void *data);
static ngx_int_t sg_pg_query_borrowed(sg_pg_pool_t *pool, const char *sql,
    sg_pg_stmt_t *stmt, ngx_uint_t nparams, const sg_pg_param_t *params,
    ngx_uint_t binary, sg_pg_handler_pt handler, void *data);
static ngx_int_t sg_pg_query_create(sg_pg_pool_t *pool, const char *sql,
    sg_pg_stmt_t *stmt, ngx_uint_t nparams, sg_pg_query_t **qp);
static ngx_int_t sg_pg_stmt_index(sg_pg_pool_t *pool, sg_pg_stmt_t *stmt,
    ngx_uint_t *index);
static void sg_pg_complete(sg_pg_conn_t *pc);
static void sg_pg_enqueue(sg_pg_pool_t *pool, sg_pg_query_t *q);
static void sg_pg_dispatch_handler(ngx_event_t *ev);
static ngx_int_t sg_pg_send(sg_pg_conn_t *pc, sg_pg_query_t *q);
static void sg_pg_finish(sg_pg_query_t *q, PGresult *res, const char *err,
    const char *sqlstate);
static void sg_pg_query_timeout(ngx_event_t *ev);
static void sg_pg_notifies(sg_pg_conn_t *pc);
static void sg_pg_listen_send(sg_pg_conn_t *pc);
static void sg_pg_fail_pending(sg_pg_pool_t *pool, const char *err);
static ngx_uint_t sg_pg_connecting(sg_pg_pool_t *pool);
static void sg_pg_set_error(sg_pg_pool_t *pool, const char *err);


sg_pg_pool_t *
sg_pg_pool_create(ngx_cycle_t *cycle, ngx_str_t *conninfo, ngx_uint_t size,
    ngx_msec_t timeout, ngx_msec_t connect_timeout)
{
    ngx_uint_t     i;
    sg_pg_pool_t  *pool;
    sg_pg_conn_t  *pc;

    pool = ngx_calloc(sizeof(sg_pg_pool_t), cycle->log);
    if (pool == NULL) {
        return NULL;
    }

    pool->conninfo = ngx_calloc(conninfo->len + 1, cycle->log);
    pool->conns = ngx_calloc((size + 1) * sizeof(sg_pg_conn_t), cycle->log);
    if (pool->conninfo == NULL || pool->conns == NULL) {
        return NULL;
    }

    ngx_memcpy(pool->conninfo, conninfo->data, conninfo->len);

    /* the server stops a runaway statement itself: PQcancel would block */
    ngx_snprintf((u_char *) pool->options, sizeof(pool->options) - 1,
                 "-c statement_timeout=%M%Z", timeout);

    pool->log = cycle->log;
    pool->dispatch.handler = sg_pg_dispatch_handler;
    pool->dispatch.data = pool;
    pool->dispatch.log = cycle->log;
    pool->size = size;
    pool->timeout = timeout;
    pool->connect_timeout = connect_timeout;
    ngx_queue_init(&pool->pending);

    for (i = 0; i <= size; i++) {
        pc = &pool->conns[i];
        pc->pool = pool;
        pc->index = i;
        pc->listener = (i == size);
        pc->backoff = SG_PG_BACKOFF_MIN;
        pc->timer.handler = sg_pg_reconnect_handler;
        pc->timer.data = pc;
        pc->timer.log = cycle->log;
        pc->timer.cancelable = 1;

        sg_pg_connect(pc);
    }

    return pool;
}


void
sg_pg_pool_destroy(sg_pg_pool_t *pool)
{
    ngx_uint_t  i;

    if (pool == NULL) {
        return;
    }

    pool->destroyed = 1;

    if (pool->dispatch.posted) {
        ngx_delete_posted_event(&pool->dispatch);
    }

    sg_pg_fail_pending(pool, "worker is exiting");

    for (i = 0; i <= pool->size; i++) {
        sg_pg_close(&pool->conns[i], NULL);

        if (pool->conns[i].timer.timer_set) {
            ngx_del_timer(&pool->conns[i].timer);
        }
    }
}


ngx_int_t
sg_pg_query(sg_pg_pool_t *pool, const char *sql, ngx_uint_t nparams,
    const char *const *params, sg_pg_handler_pt handler, void *data)
{
    return sg_pg_query_copied(pool, sql, NULL, nparams, params, handler,
                              data);
}


ngx_int_t
sg_pg_exec(sg_pg_pool_t *pool, sg_pg_stmt_t *stmt, ngx_uint_t nparams,
    const char *const *params, sg_pg_handler_pt handler, void *data)
{
    return sg_pg_query_copied(pool, NULL, stmt, nparams, params, handler,
                              data);
}


static ngx_int_t
sg_pg_query_copied(sg_pg_pool_t *pool, const char *sql, sg_pg_stmt_t *stmt,
    ngx_uint_t nparams, const char *const *params, sg_pg_handler_pt handler,
    void *data)
{
    size_t          len;
    ngx_int_t       rc;
    ngx_uint_t      i;
    sg_pg_query_t  *q;

    rc = sg_pg_query_create(pool, sql, stmt, nparams, &q);
    if (rc != NGX_OK) {
        return rc;
    }

    for (i = 0; i < nparams; i++) {
        if (params[i] == NULL) {
            continue;
        }

        len = ngx_strlen(params[i]) + 1;
        q->params[i] = ngx_alloc(len, pool->log);
        if (q->params[i] == NULL) {
            q->nparams = i;
            sg_pg_finish(q, NULL, NULL, NULL);
            return NGX_ERROR;
        }

        ngx_memcpy(q->params[i], params[i], len);
    }

    q->nparams = nparams;
    q->handler = handler;
    q->data = data;

    sg_pg_enqueue(pool, q);

    return NGX_OK;
}


ngx_int_t
sg_pg_query_params(sg_pg_pool_t *pool, const char *sql, ngx_uint_t nparams,
    const sg_pg_param_t *params, sg_pg_handler_pt handler, void *data)
{
    return sg_pg_query_borrowed(pool, sql, NULL, nparams, params, 0,
                                handler, data);
}


ngx_int_t
sg_pg_query_binary(sg_pg_pool_t *pool, const char *sql, ngx_uint_t nparams,
    const sg_pg_param_t *params, sg_pg_handler_pt handler, void *data)
{
    return sg_pg_query_borrowed(pool, sql, NULL, nparams, params, 1,
                                handler, data);
}


ngx_int_t
sg_pg_exec_params(sg_pg_pool_t *pool, sg_pg_stmt_t *stmt, ngx_uint_t nparams,
    const sg_pg_param_t *params, sg_pg_handler_pt handler, void *data)
{
    return sg_pg_query_borrowed(pool, NULL, stmt, nparams, params, 0,
                                handler, data);
}


ngx_int_t
sg_pg_exec_binary(sg_pg_pool_t *pool, sg_pg_stmt_t *stmt, ngx_uint_t nparams,
    const sg_pg_param_t *params, sg_pg_handler_pt handler, void *data)
{
    return sg_pg_query_borrowed(pool, NULL, stmt, nparams, params, 1,
                                handler, data);
}


static ngx_int_t
sg_pg_query_borrowed(sg_pg_pool_t *pool, const char *sql, sg_pg_stmt_t *stmt,
    ngx_uint_t nparams, const sg_pg_param_t *params, ngx_uint_t binary,
    sg_pg_handler_pt handler, void *data)
{
    ngx_int_t       rc;
    ngx_uint_t      i;
    sg_pg_query_t  *q;

    rc = sg_pg_query_create(pool, sql, stmt, nparams, &q);
    if (rc != NGX_OK) {
        return rc;
    }

    q->borrowed = 1;
    q->binary = binary;

    for (i = 0; i < nparams; i++) {
        q->params[i] = (char *) params[i].data;
        q->lengths[i] = (int) params[i].len;
        q->formats[i] = params[i].binary;
    }

    q->nparams = nparams;
    q->handler = handler;
    q->data = data;

    sg_pg_enqueue(pool, q);

    return NGX_OK;
}


/*
 * the checks every entry point makes, and the query with its SQL copied
 * (or, for a prepared statement, its place in the pool's list)
 */

static ngx_int_t
sg_pg_query_create(sg_pg_pool_t *pool, const char *sql, sg_pg_stmt_t *stmt,
    ngx_uint_t nparams, sg_pg_query_t **qp)
{
    size_t          len;
    ngx_uint_t      index;
    sg_pg_query_t  *q;

    if (pool == NULL || pool->destroyed) {
        return NGX_DECLINED;
    }

    if (sg_pg_up(pool) == 0 && sg_pg_connecting(pool) == 0) {
        return NGX_DECLINED;
    }

    if (pool->npending >= SG_PG_MAX_PENDING || nparams > SG_PG_MAX_PARAMS) {
        return NGX_BUSY;
    }

    index = 0;

    if (stmt && sg_pg_stmt_index(pool, stmt, &index) != NGX_OK) {
        return NGX_ERROR;
    }

    q = ngx_calloc(sizeof(sg_pg_query_t), pool->log);
    if (q == NULL) {
        return NGX_ERROR;
    }

    if (stmt) {
        q->stmt = stmt;
        q->stmt_index = index;
        *qp = q;
        return NGX_OK;
    }

    len = ngx_strlen(sql) + 1;
    q->sql = ngx_alloc(len, pool->log);
    if (q->sql == NULL) {
        ngx_free(q);
        return NGX_ERROR;
    }

    ngx_memcpy(q->sql, sql, len);

    *qp = q;

    return NGX_OK;
}


/* the statement's place in the pool's list, added at its first use */

static ngx_int_t
sg_pg_stmt_index(sg_pg_pool_t *pool, sg_pg_stmt_t *stmt, ngx_uint_t *index)
{
    ngx_uint_t  i;

    for (i = 0; i < pool->nstmts; i++) {
        if (pool->stmts[i] == stmt) {
            *index = i;
            return NGX_OK;
        }
    }

    if (pool->nstmts == SG_PG_MAX_STMTS) {
        ngx_log_error(NGX_LOG_ALERT, pool->log, 0,
                      "sg: more than %d prepared statements, \"%s\" is not"
                      " run", SG_PG_MAX_STMTS, stmt->name);
        return NGX_ERROR;
    }

    pool->stmts[pool->nstmts] = stmt;
    *index = pool->nstmts++;

    return NGX_OK;
}


static void
sg_pg_enqueue(sg_pg_pool_t *pool, sg_pg_query_t *q)
{
    q->pool = pool;
    q->timer.handler = sg_pg_query_timeout;
    q->timer.data = q;
    q->timer.log = pool->log;

    /* connect time counts too: the caller waits at most one timeout */
    ngx_add_timer(&q->timer, pool->timeout + pool->connect_timeout);

    ngx_queue_insert_tail(&pool->pending, &q->queue);
    pool->npending++;

    if (!pool->dispatch.posted) {
        ngx_post_event(&pool->dispatch, &ngx_posted_events);
    }
}


static void
sg_pg_dispatch_handler(ngx_event_t *ev)
{
    sg_pg_dispatch(ev->data);
}


ngx_int_t
sg_pg_listen(sg_pg_pool_t *pool, const char *channel, sg_pg_notify_pt handler,
    void *data)
{
    size_t            len;
    sg_pg_conn_t     *pc;
    sg_pg_channel_t  *ch;

    len = ngx_strlen(channel);

    if (pool->nchannels == SG_PG_MAX_CHANNELS || len >= sizeof(ch->name)) {
        return NGX_ERROR;
    }

    ch = &pool->channels[pool->nchannels++];
    ngx_memcpy(ch->name, channel, len + 1);
    ch->handler = handler;
    ch->data = data;

    pc = &pool->conns[pool->size];

    if (pc->state == SG_PG_IDLE) {
        sg_pg_listen_send(pc);
    }

    return NGX_OK;
}


ngx_uint_t
sg_pg_up(sg_pg_pool_t *pool)
{
    ngx_uint_t  i, n;

    if (pool == NULL) {
        return 0;
    }

    n = 0;

    for (i = 0; i < pool->size; i++) {
        if (pool->conns[i].state >= SG_PG_IDLE) {
            n++;
        }
    }

    return n;
}


const char *
sg_pg_last_error(sg_pg_pool_t *pool)
{
    return pool ? pool->last_error : "not configured";
}


ngx_uint_t
sg_pg_refused(const char *err, const char *sqlstate)
{
    return err && sqlstate && sqlstate[0]
           && ngx_strncmp(sqlstate, "08", 2) != 0
           && ngx_strncmp(sqlstate, "53", 2) != 0
           && ngx_strncmp(sqlstate, "57", 2) != 0
           && ngx_strncmp(sqlstate, "58", 2) != 0;
}


static ngx_uint_t
sg_pg_connecting(sg_pg_pool_t *pool)
{
    ngx_uint_t  i, n;

    n = 0;

    for (i = 0; i < pool->size; i++) {
        if (pool->conns[i].state == SG_PG_CONNECTING) {
            n++;
        }
    }

    return n;
}


static void
sg_pg_set_error(sg_pg_pool_t *pool, const char *err)
{
    size_t  i, len;

    len = ngx_strlen(err);

    if (len >= sizeof(pool->last_error)) {
        len = sizeof(pool->last_error) - 1;
    }

    ngx_memmove(pool->last_error, err, len);
    pool->last_error[len] = '\0';

    /* libpq messages end with a newline and may span lines: one line */
    while (len && (pool->last_error[len - 1] == '\n')) {
        pool->last_error[--len] = '\0';
    }

    for (i = 0; i < len; i++) {
        if ((u_char) pool->last_error[i] < 0x20) {
            pool->last_error[i] = ' ';
        }
    }
}


/* connecting */


static void
sg_pg_connect(sg_pg_conn_t *pc)
{
    sg_pg_pool_t        *pool;
    const char          *keys[4], *values[4];
    PostgresPollingStatusType  st;

    pool = pc->pool;

    keys[0] = "dbname";
    values[0] = pool->conninfo;
    keys[1] = "options";
    values[1] = pool->options;
    keys[2] = "application_name";
    values[2] = pc->listener ? "sg-listen" : "sg";
    keys[3] = NULL;
    values[3] = NULL;

    /* a new session: nothing is prepared on it */
    pc->prepared = 0;
    pc->preparing = 0;
    pc->stale = 0;

    pc->conn = PQconnectStartParams(keys, values, 1);

    if (pc->conn == NULL) {
        sg_pg_close(pc, "out of memory");
        return;
    }

    if (PQstatus(pc->conn) == CONNECTION_BAD
        || PQsetnonblocking(pc->conn, 1) != 0
        || PQsocket(pc->conn) == -1)
    {
        sg_pg_close(pc, PQerrorMessage(pc->conn));
        return;
    }

    pc->state = SG_PG_CONNECTING;

    if (sg_pg_wrap(pc) != NGX_OK) {
        sg_pg_close(pc, "cannot wrap the socket");
        return;
    }

    pc->timer.handler = sg_pg_reconnect_handler;
    ngx_add_timer(&pc->timer, pool->connect_timeout);

    /* PQconnectStart behaves as if the last poll said WRITING */
    st = PGRES_POLLING_WRITING;

    if (sg_pg_want(pc, 0, st == PGRES_POLLING_WRITING) != NGX_OK) {
        sg_pg_close(pc, "cannot add events");
    }
}


static void
sg_pg_connect_poll_handler(ngx_event_t *ev)
{
    ngx_connection_t              *c;
    sg_pg_conn_t                  *pc;
    PostgresPollingStatusType      st;

    c = ev->data;
    pc = c->data;

    st = PQconnectPoll(pc->conn);

    if (st != PGRES_POLLING_FAILED && PQsocket(pc->conn) != pc->c->fd) {

        /* libpq moved to another address: the old socket is closed */

        pc->c->read->active = 0;
        pc->c->write->active = 0;
        sg_pg_unwrap(pc);

        if (sg_pg_wrap(pc) != NGX_OK) {
            sg_pg_close(pc, "cannot wrap the socket");
            return;
        }
    }

    switch (st) {

    case PGRES_POLLING_READING:
        if (sg_pg_want(pc, 1, 0) != NGX_OK) {
            sg_pg_close(pc, "cannot add events");
        }
        return;

    case PGRES_POLLING_WRITING:
        if (sg_pg_want(pc, 0, 1) != NGX_OK) {
            sg_pg_close(pc, "cannot add events");
        }
        return;

    case PGRES_POLLING_OK:
        sg_pg_connected(pc);
        return;

    default:
        sg_pg_close(pc, PQerrorMessage(pc->conn));
        return;
    }
}


static void
sg_pg_connected(sg_pg_conn_t *pc)
{
    sg_pg_pool_t  *pool;

    pool = pc->pool;

    if (pc->timer.timer_set) {
        ngx_del_timer(&pc->timer);
    }

    pc->c->read->handler = sg_pg_io_handler;
    pc->c->write->handler = sg_pg_io_handler;

    if (sg_pg_want(pc, 1, 0) != NGX_OK) {
        sg_pg_close(pc, "cannot add events");
        return;
    }

    if (pc->backoff > SG_PG_BACKOFF_MIN || pc->index == 0) {
        ngx_log_error(NGX_LOG_NOTICE, pool->log, 0,
                      "sg: postgresql connection %ui is up", pc->index);
    }

    pc->backoff = SG_PG_BACKOFF_MIN;
    pc->state = SG_PG_IDLE;

    if (pc->listener) {
        sg_pg_listen_send(pc);
        return;
    }

    sg_pg_dispatch(pool);
}


static void
sg_pg_reconnect_handler(ngx_event_t *ev)
{
    sg_pg_conn_t  *pc;

    pc = ev->data;

    if (pc->state == SG_PG_CONNECTING) {
        /* the connect timer fired */
        sg_pg_close(pc, "connect timed out");
        return;
    }

    if (pc->state == SG_PG_DOWN && !ngx_exiting && !ngx_terminate
        && !pc->pool->destroyed)
    {
        sg_pg_connect(pc);
    }
}


/*
 * Drop a connection.  With a reason, fail what ran on it and schedule a
 * reconnect with backoff.
 */

static void
sg_pg_close(sg_pg_conn_t *pc, const char *why)
{
    sg_pg_pool_t   *pool;
    sg_pg_query_t  *q;
    ngx_uint_t      was_up;

    pool = pc->pool;
    was_up = (pc->state >= SG_PG_IDLE);

    /* why may be PQerrorMessage(): keep it before PQfinish() frees it */
    if (why) {
        sg_pg_set_error(pool, why);
        why = pool->last_error;
    }

    if (pc->c) {
        sg_pg_unwrap(pc);
    }

    if (pc->result) {
        PQclear(pc->result);
        pc->result = NULL;
    }

    if (pc->error) {
        PQclear(pc->error);
        pc->error = NULL;
    }

    if (pc->conn) {
        PQfinish(pc->conn);
        pc->conn = NULL;
    }

    pc->state = SG_PG_DOWN;

    q = pc->query;
    pc->query = NULL;

    if (pc->timer.timer_set) {
        ngx_del_timer(&pc->timer);
    }

    if (why == NULL) {
        if (q) {
            sg_pg_finish(q, NULL, "postgresql connection closed", "");
        }
        return;
    }

    ngx_log_error(NGX_LOG_ERR, pool->log, 0,
                  "sg: postgresql connection %ui %s: %s, retrying in %Mms",
                  pc->index, was_up ? "lost" : "failed", pool->last_error,
                  pc->backoff);

    if (q) {
        sg_pg_finish(q, NULL, pool->last_error, "");
    }

    if (!pc->listener && sg_pg_up(pool) == 0 && sg_pg_connecting(pool) == 0) {
        sg_pg_fail_pending(pool, pool->last_error);
    }

    if (pool->destroyed || ngx_exiting || ngx_terminate) {
        return;
    }

    pc->timer.handler = sg_pg_reconnect_handler;
    ngx_add_timer(&pc->timer, pc->backoff);

    pc->backoff *= 2;
    if (pc->backoff > SG_PG_BACKOFF_MAX) {
        pc->backoff = SG_PG_BACKOFF_MAX;
    }
}


static ngx_int_t
sg_pg_wrap(sg_pg_conn_t *pc)
{
    ngx_connection_t  *c;

    c = ngx_get_connection(PQsocket(pc->conn), pc->pool->log);
    if (c == NULL) {
        return NGX_ERROR;
    }

    c->data = pc;
    c->log = pc->pool->log;
    c->read->log = c->log;
    c->write->log = c->log;
    c->read->handler = sg_pg_connect_poll_handler;
    c->write->handler = sg_pg_connect_poll_handler;

    pc->c = c;

    return NGX_OK;
}


static void
sg_pg_unwrap(sg_pg_conn_t *pc)
{
    ngx_uint_t         flags;
    ngx_connection_t  *c;

    c = pc->c;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    /*
     * When libpq has dropped the connection its socket is already closed,
     * and the kernel has removed it from epoll: only forget the events.
     */

    flags = (pc->conn == NULL || PQsocket(pc->conn) != c->fd)
            ? NGX_CLOSE_EVENT : 0;

    if (c->read->active) {
        ngx_del_event(c->read, NGX_READ_EVENT, flags);
    }

    if (c->write->active) {
        ngx_del_event(c->write, NGX_WRITE_EVENT, flags);
    }

    /* libpq owns the descriptor and closes it */
    ngx_free_connection(c);
    c->fd = (ngx_socket_t) -1;

    pc->c = NULL;
}


static ngx_int_t
sg_pg_want(sg_pg_conn_t *pc, ngx_uint_t read, ngx_uint_t write)
{
    ngx_connection_t  *c;

    c = pc->c;

    if (read && !c->read->active) {
        if (ngx_add_event(c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

    } else if (!read && c->read->active) {
        if (ngx_del_event(c->read, NGX_READ_EVENT, 0) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (write && !c->write->active) {
        if (ngx_add_event(c->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

    } else if (!write && c->write->active) {
        if (ngx_del_event(c->write, NGX_WRITE_EVENT, 0) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* queries */


static void
sg_pg_dispatch(sg_pg_pool_t *pool)
{
    ngx_uint_t      i;
    ngx_queue_t    *qq;
    sg_pg_conn_t   *pc;
    sg_pg_query_t  *q;

    for (i = 0; i < pool->size && !ngx_queue_empty(&pool->pending); i++) {

        pc = &pool->conns[i];

        if (pc->state != SG_PG_IDLE) {
            continue;
        }

        qq = ngx_queue_head(&pool->pending);
        ngx_queue_remove(qq);
        pool->npending--;

        q = ngx_queue_data(qq, sg_pg_query_t, queue);

        if (sg_pg_send(pc, q) != NGX_OK) {
            /* sg_pg_send closed the connection and answered the query */
            continue;
        }
    }
}


static ngx_int_t
sg_pg_send(sg_pg_conn_t *pc, sg_pg_query_t *q)
{
    int  rc;

    pc->query = q;
    q->conn = pc;
    pc->state = SG_PG_BUSY;

    if (q->stmt && !(pc->prepared & ((uint32_t) 1 << q->stmt_index))) {
        /* first on this connection: prepare, then run (sg_pg_complete) */
        pc->preparing = 1;
        rc = PQsendPrepare(pc->conn, q->stmt->name, q->stmt->sql,
                           (int) q->nparams, NULL);

    } else if (q->stmt) {
        rc = PQsendQueryPrepared(pc->conn, q->stmt->name, (int) q->nparams,
                                 (const char *const *) q->params, q->lengths,
                                 q->formats, q->binary);

    } else if (q->nparams == 0) {
        rc = PQsendQuery(pc->conn, q->sql);

    } else {
        rc = PQsendQueryParams(pc->conn, q->sql, (int) q->nparams, NULL,
                               (const char *const *) q->params, q->lengths,
                               q->formats, q->binary);
    }

    if (rc == 0) {
        sg_pg_close(pc, PQerrorMessage(pc->conn));
        return NGX_ERROR;
    }

    rc = PQflush(pc->conn);

    if (rc == -1) {
        sg_pg_close(pc, PQerrorMessage(pc->conn));
        return NGX_ERROR;
    }

    if (sg_pg_want(pc, 1, rc == 1) != NGX_OK) {
        sg_pg_close(pc, "cannot add events");
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
sg_pg_io_handler(ngx_event_t *ev)
{
    int                rc;
    PGresult          *res;
    ngx_connection_t  *c;
    sg_pg_conn_t      *pc;

    c = ev->data;
    pc = c->data;

    if (ev->write) {
        rc = PQflush(pc->conn);

        if (rc == -1) {
            sg_pg_close(pc, PQerrorMessage(pc->conn));
            return;
        }

        if (sg_pg_want(pc, 1, rc == 1) != NGX_OK) {
            sg_pg_close(pc, "cannot add events");
        }

        return;
    }

    if (PQconsumeInput(pc->conn) == 0 || PQstatus(pc->conn) == CONNECTION_BAD)
    {
        sg_pg_close(pc, PQerrorMessage(pc->conn));
        return;
    }

    sg_pg_notifies(pc);

    if (pc->c == NULL) {
        /* a notify handler destroyed the pool */
        return;
    }

    if (pc->state != SG_PG_BUSY) {
        return;
    }

    while (!PQisBusy(pc->conn)) {

        res = PQgetResult(pc->conn);

        if (res != NULL) {

            switch (PQresultStatus(res)) {

            case PGRES_TUPLES_OK:
            case PGRES_COMMAND_OK:
            case PGRES_EMPTY_QUERY:
                if (pc->result) {
                    PQclear(pc->result);
                }
                pc->result = res;
                break;

            default:
                /* keep the first error of a multi-statement query */
                if (pc->error == NULL) {
                    pc->error = res;

                } else {
                    PQclear(res);
                }
            }

            continue;
        }

        sg_pg_complete(pc);
        return;
    }
}


/* a command is complete: a statement prepared, or a query answered */

static void
sg_pg_complete(sg_pg_conn_t *pc)
{
    PGresult       *res;
    sg_pg_query_t  *q;
    const char     *state;

    q = pc->query;

    if (pc->preparing) {
        pc->preparing = 0;

        if (pc->error == NULL) {
            if (pc->result) {
                PQclear(pc->result);
                pc->result = NULL;
            }

            pc->prepared |= (uint32_t) 1 << q->stmt_index;

            /* now run it; on failure sg_pg_send answered the query */
            (void) sg_pg_send(pc, q);
            return;
        }

        /* the statement does not prepare: that is the query's answer */
    }

    pc->query = NULL;
    pc->state = SG_PG_IDLE;

    res = pc->result;
    pc->result = NULL;

    if (pc->error) {
        state = PQresultErrorField(pc->error, PG_DIAG_SQLSTATE);
        state = state ? state : "";

        /*
         * a prepared statement the server no longer has (26000), or whose
         * result type changed under it (0A000, "cached plan must not
         * change result type", after a migration): start this connection
         * afresh, it prepares everything again
         */
        if (q->stmt && (ngx_strcmp(state, "26000") == 0
                        || ngx_strcmp(state, "0A000") == 0))
        {
            pc->stale = 1;
        }

        sg_pg_finish(q, NULL, PQresultErrorMessage(pc->error), state);
        PQclear(pc->error);
        pc->error = NULL;

        if (res) {
            PQclear(res);
        }

    } else {
        sg_pg_finish(q, res, NULL, NULL);

        if (res) {
            PQclear(res);
        }
    }

    if (pc->listener) {
        return;
    }

    if (pc->stale) {
        sg_pg_close(pc, "a prepared statement is stale, reconnecting");
        return;
    }

    sg_pg_dispatch(pc->pool);
}


static void
sg_pg_finish(sg_pg_query_t *q, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_uint_t  i;

    if (q->timer.timer_set) {
        ngx_del_timer(&q->timer);
    }

    if (q->conn) {
        q->conn->query = NULL;
    }

    if (q->handler) {
        if (res == NULL && err == NULL) {
            err = "no result";
        }

        q->handler(q->data, res, err, sqlstate ? sqlstate : "");
    }

    for (i = 0; !q->borrowed && i < q->nparams; i++) {
        if (q->params[i]) {
            ngx_free(q->params[i]);
        }
    }

    if (q->sql) {
        ngx_free(q->sql);
    }

    ngx_free(q);
}


static void
sg_pg_query_timeout(ngx_event_t *ev)
{
    sg_pg_query_t  *q;
    sg_pg_conn_t   *pc;

    q = ev->data;
    pc = q->conn;

    ngx_log_error(NGX_LOG_ERR, q->pool->log, 0,
                  "sg: postgresql query timed out: \"%s\"",
                  q->stmt ? q->stmt->name : q->sql);

    if (pc == NULL) {
        ngx_queue_remove(&q->queue);
        q->pool->npending--;
        sg_pg_finish(q, NULL, "timed out waiting for a connection", "");
        return;
    }

    /* the answer may never come: drop the connection (PQcancel blocks) */

    pc->query = NULL;
    q->conn = NULL;
    sg_pg_finish(q, NULL, "query timed out", "");
    sg_pg_close(pc, "query timed out");
}


static void
sg_pg_fail_pending(sg_pg_pool_t *pool, const char *err)
{
    ngx_queue_t    *qq;
    sg_pg_query_t  *q;

    while (!ngx_queue_empty(&pool->pending)) {
        qq = ngx_queue_head(&pool->pending);
        ngx_queue_remove(qq);
        pool->npending--;

        q = ngx_queue_data(qq, sg_pg_query_t, queue);
        sg_pg_finish(q, NULL, err, "");
    }
}


/* LISTEN/NOTIFY */


static void
sg_pg_listen_send(sg_pg_conn_t *pc)
{
    u_char          *p;
    ngx_uint_t       i;

    sg_pg_pool_t    *pool;
    sg_pg_query_t   *q;
    u_char           sql[SG_PG_MAX_CHANNELS * 80 + 1];

    pool = pc->pool;

    if (pool->nchannels == 0) {
        return;
    }

    p = sql;

    for (i = 0; i < pool->nchannels; i++) {
        p = ngx_sprintf(p, "LISTEN \"%s\";", pool->channels[i].name);
    }

    *p = '\0';

    q = ngx_calloc(sizeof(sg_pg_query_t), pool->log);
    if (q == NULL) {
        sg_pg_close(pc, "out of memory");
        return;
    }

    q->sql = ngx_alloc(p - sql + 1, pool->log);
    if (q->sql == NULL) {
        ngx_free(q);
        sg_pg_close(pc, "out of memory");
        return;
    }

    ngx_memcpy(q->sql, sql, p - sql + 1);
    q->pool = pool;
    q->internal = 1;
    q->timer.handler = sg_pg_query_timeout;
    q->timer.data = q;
    q->timer.log = pool->log;
    ngx_add_timer(&q->timer, pool->timeout);

    if (sg_pg_send(pc, q) != NGX_OK) {
        return;
    }

    /* notifications sent while we were away are lost: let owners reload */

    for (i = 0; i < pool->nchannels; i++) {
        pool->channels[i].handler(pool->channels[i].data,
                                  pool->channels[i].name, NULL);
    }
}


static void
sg_pg_notifies(sg_pg_conn_t *pc)
{
    ngx_uint_t        i;
    PGnotify         *n;
    sg_pg_pool_t     *pool;

    pool = pc->pool;

    while ((n = PQnotifies(pc->conn)) != NULL) {

        for (i = 0; i < pool->nchannels; i++) {
            if (ngx_strcmp(n->relname, pool->channels[i].name) == 0) {
                pool->channels[i].handler(pool->channels[i].data,
                                          n->relname, n->extra);
            }
        }

        PQfreemem(n);
    }
}
