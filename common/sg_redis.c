/*
 * sg: Redis on nginx's event loop.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "sg_redis.h"


typedef struct {
    sg_redis_t             *redis;
    sg_redis_handler_pt     handler;
    void                   *data;
    ngx_event_t             timer;
} sg_redis_req_t;


struct sg_redis_s {
    ngx_log_t              *log;
    redisAsyncContext      *ac;
    ngx_connection_t       *c;
    ngx_uint_t              connected;
    ngx_uint_t              npending;
    ngx_msec_t              timeout;
    ngx_msec_t              backoff;
    ngx_event_t             timer;      /* connect timeout, reconnect */
    ngx_event_t             drop;       /* posted: drop after a timeout */
    char                   *path;       /* unix socket, or NULL */
    char                   *host;
    int                     port;
    char                    last_error[256];
    unsigned                destroyed:1;
};


static void sg_redis_connect(sg_redis_t *r);
static void sg_redis_retry(sg_redis_t *r, const char *why);
static void sg_redis_timer_handler(ngx_event_t *ev);
static void sg_redis_drop_handler(ngx_event_t *ev);
static void sg_redis_connect_cb(const redisAsyncContext *ac, int status);
static void sg_redis_disconnect_cb(const redisAsyncContext *ac, int status);
static void sg_redis_reply_cb(redisAsyncContext *ac, void *reply,
    void *privdata);
static void sg_redis_req_timeout(ngx_event_t *ev);
static sg_redis_req_t *sg_redis_req(sg_redis_t *r,
    sg_redis_handler_pt handler, void *data);
static void sg_redis_set_error(sg_redis_t *r, const char *err);

static void sg_redis_ev_add_read(void *privdata);
static void sg_redis_ev_del_read(void *privdata);
static void sg_redis_ev_add_write(void *privdata);
static void sg_redis_ev_del_write(void *privdata);
static void sg_redis_ev_cleanup(void *privdata);
static void sg_redis_read_handler(ngx_event_t *ev);
static void sg_redis_write_handler(ngx_event_t *ev);


sg_redis_t *
sg_redis_create(ngx_cycle_t *cycle, ngx_str_t *addr, ngx_msec_t timeout)
{
    u_char      *colon;
    ngx_int_t    port;
    sg_redis_t  *r;

    r = ngx_calloc(sizeof(sg_redis_t), cycle->log);
    if (r == NULL) {
        return NULL;
    }

    r->log = cycle->log;
    r->timeout = timeout;
    r->backoff = SG_REDIS_BACKOFF_MIN;

    if (addr->len > 5 && ngx_strncmp(addr->data, "unix:", 5) == 0) {
        r->path = ngx_calloc(addr->len - 4, cycle->log);
        if (r->path == NULL) {
            return NULL;
        }

        ngx_memcpy(r->path, addr->data + 5, addr->len - 5);

    } else {
        colon = ngx_strlchr(addr->data, addr->data + addr->len, ':');
        if (colon == NULL) {
            port = 6379;
            colon = addr->data + addr->len;

        } else {
            port = ngx_atoi(colon + 1, addr->data + addr->len - colon - 1);
            if (port < 1 || port > 65535) {
                ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                              "sg: invalid redis address \"%V\"", addr);
                return NULL;
            }
        }

        r->host = ngx_calloc(colon - addr->data + 1, cycle->log);
        if (r->host == NULL) {
            return NULL;
        }

        ngx_memcpy(r->host, addr->data, colon - addr->data);
        r->port = (int) port;
    }

    r->timer.handler = sg_redis_timer_handler;
    r->timer.data = r;
    r->timer.log = cycle->log;
    r->timer.cancelable = 1;

    r->drop.handler = sg_redis_drop_handler;
    r->drop.data = r;
    r->drop.log = cycle->log;

    sg_redis_connect(r);

    return r;
}


void
sg_redis_destroy(sg_redis_t *r)
{
    redisAsyncContext  *ac;

    if (r == NULL) {
        return;
    }

    r->destroyed = 1;

    if (r->timer.timer_set) {
        ngx_del_timer(&r->timer);
    }

    if (r->drop.posted) {
        ngx_delete_posted_event(&r->drop);
    }

    ac = r->ac;

    if (ac) {
        r->ac = NULL;
        r->connected = 0;
        /* answers every waiting command with "no reply" */
        redisAsyncFree(ac);
    }
}


ngx_int_t
sg_redis_command(sg_redis_t *r, sg_redis_handler_pt handler, void *data,
    const char *fmt, ...)
{
    int              rc;
    va_list          ap;
    sg_redis_req_t  *req;

    req = sg_redis_req(r, handler, data);
    if (req == NULL) {
        return r->connected ? NGX_BUSY : NGX_DECLINED;
    }

    va_start(ap, fmt);
    rc = redisvAsyncCommand(r->ac, sg_redis_reply_cb, req, fmt, ap);
    va_end(ap);

    if (rc != REDIS_OK) {
        ngx_del_timer(&req->timer);
        ngx_free(req);
        r->npending--;
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
sg_redis_command_argv(sg_redis_t *r, sg_redis_handler_pt handler, void *data,
    int argc, const char **argv, const size_t *argvlen)
{
    sg_redis_req_t  *req;

    req = sg_redis_req(r, handler, data);
    if (req == NULL) {
        return r->connected ? NGX_BUSY : NGX_DECLINED;
    }

    if (redisAsyncCommandArgv(r->ac, sg_redis_reply_cb, req, argc, argv,
                              argvlen)
        != REDIS_OK)
    {
        ngx_del_timer(&req->timer);
        ngx_free(req);
        r->npending--;
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_uint_t
sg_redis_up(sg_redis_t *r)
{
    return r && r->connected;
}


const char *
sg_redis_last_error(sg_redis_t *r)
{
    return r ? r->last_error : "not configured";
}


static sg_redis_req_t *
sg_redis_req(sg_redis_t *r, sg_redis_handler_pt handler, void *data)
{
    sg_redis_req_t  *req;

    if (r == NULL || !r->connected || r->ac == NULL
        || r->npending >= SG_REDIS_MAX_PENDING)
    {
        return NULL;
    }

    req = ngx_calloc(sizeof(sg_redis_req_t), r->log);
    if (req == NULL) {
        return NULL;
    }

    req->redis = r;
    req->handler = handler;
    req->data = data;
    req->timer.handler = sg_redis_req_timeout;
    req->timer.data = req;
    req->timer.log = r->log;

    ngx_add_timer(&req->timer, r->timeout);
    r->npending++;

    return req;
}


static void
sg_redis_set_error(sg_redis_t *r, const char *err)
{
    ngx_cpystrn((u_char *) r->last_error, (u_char *) err,
                sizeof(r->last_error));
}


/* connecting */


static void
sg_redis_connect(sg_redis_t *r)
{
    redisAsyncContext  *ac;
    ngx_connection_t   *c;

    if (r->path) {
        ac = redisAsyncConnectUnix(r->path);

    } else {
        ac = redisAsyncConnect(r->host, r->port);
    }

    if (ac == NULL) {
        sg_redis_retry(r, "out of memory");
        return;
    }

    if (ac->err) {
        sg_redis_set_error(r, ac->errstr);
        redisAsyncFree(ac);
        sg_redis_retry(r, r->last_error);
        return;
    }

    c = ngx_get_connection(ac->c.fd, r->log);
    if (c == NULL) {
        redisAsyncFree(ac);
        sg_redis_retry(r, "no free connections");
        return;
    }

    c->data = r;
    c->log = r->log;
    c->read->log = r->log;
    c->write->log = r->log;
    c->read->handler = sg_redis_read_handler;
    c->write->handler = sg_redis_write_handler;

    r->c = c;
    r->ac = ac;
    ac->data = r;

    ac->ev.data = r;
    ac->ev.addRead = sg_redis_ev_add_read;
    ac->ev.delRead = sg_redis_ev_del_read;
    ac->ev.addWrite = sg_redis_ev_add_write;
    ac->ev.delWrite = sg_redis_ev_del_write;
    ac->ev.cleanup = sg_redis_ev_cleanup;

    redisAsyncSetConnectCallback(ac, sg_redis_connect_cb);
    redisAsyncSetDisconnectCallback(ac, sg_redis_disconnect_cb);

    /* hiredis waits for writability to finish the connect */
    sg_redis_ev_add_write(r);

    ngx_add_timer(&r->timer, r->timeout);
}


static void
sg_redis_connect_cb(const redisAsyncContext *ac, int status)
{
    sg_redis_t  *r;

    r = ac->data;

    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback */
        sg_redis_set_error(r, ac->errstr);
        r->ac = NULL;
        sg_redis_retry(r, r->last_error);
        return;
    }

    if (r->timer.timer_set) {
        ngx_del_timer(&r->timer);
    }

    if (r->backoff > SG_REDIS_BACKOFF_MIN) {
        ngx_log_error(NGX_LOG_NOTICE, r->log, 0, "sg: redis is up again");
    }

    r->connected = 1;
    r->backoff = SG_REDIS_BACKOFF_MIN;
    r->last_error[0] = '\0';
}


static void
sg_redis_disconnect_cb(const redisAsyncContext *ac, int status)
{
    sg_redis_t  *r;

    r = ac->data;

    r->ac = NULL;
    r->connected = 0;

    if (r->destroyed) {
        return;
    }

    sg_redis_set_error(r, status == REDIS_OK ? "disconnected"
                                             : (ac->errstr[0] ? ac->errstr
                                                 : "connection lost"));
    sg_redis_retry(r, r->last_error);
}


static void
sg_redis_retry(sg_redis_t *r, const char *why)
{
    r->connected = 0;

    if (r->destroyed || ngx_exiting || ngx_terminate) {
        return;
    }

    sg_redis_set_error(r, why);

    ngx_log_error(NGX_LOG_ERR, r->log, 0,
                  "sg: redis %s%s: %s, retrying in %Mms",
                  r->path ? "unix:" : "", r->path ? r->path : r->host,
                  r->last_error, r->backoff);

    if (r->timer.timer_set) {
        ngx_del_timer(&r->timer);
    }

    ngx_add_timer(&r->timer, r->backoff);

    r->backoff *= 2;
    if (r->backoff > SG_REDIS_BACKOFF_MAX) {
        r->backoff = SG_REDIS_BACKOFF_MAX;
    }
}


static void
sg_redis_timer_handler(ngx_event_t *ev)
{
    sg_redis_t         *r;
    redisAsyncContext  *ac;

    r = ev->data;

    if (r->ac) {
        /* the connect timed out */
        ac = r->ac;
        r->ac = NULL;
        redisAsyncFree(ac);
        sg_redis_retry(r, "connect timed out");
        return;
    }

    if (!r->destroyed && !ngx_exiting && !ngx_terminate) {
        sg_redis_connect(r);
    }
}


static void
sg_redis_drop_handler(ngx_event_t *ev)
{
    sg_redis_t         *r;
    redisAsyncContext  *ac;

    r = ev->data;
    ac = r->ac;

    if (ac == NULL) {
        return;
    }

    /* the disconnect callback schedules the reconnect */
    redisAsyncFree(ac);
}


/* commands */


static void
sg_redis_reply_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    redisReply      *rr;
    sg_redis_req_t  *req;
    sg_redis_t      *r;

    req = privdata;
    rr = reply;
    r = req->redis;

    if (req->timer.timer_set) {
        ngx_del_timer(&req->timer);
    }

    r->npending--;

    if (req->handler) {
        if (rr == NULL) {
            req->handler(req->data, NULL,
                         r->last_error[0] ? r->last_error
                                          : "redis connection closed");

        } else if (rr->type == REDIS_REPLY_ERROR) {
            req->handler(req->data, rr, rr->str);

        } else {
            req->handler(req->data, rr, NULL);
        }
    }

    ngx_free(req);
}


static void
sg_redis_req_timeout(ngx_event_t *ev)
{
    sg_redis_req_t  *req;
    sg_redis_t      *r;

    req = ev->data;
    r = req->redis;

    ngx_log_error(NGX_LOG_ERR, r->log, 0, "sg: redis command timed out");

    sg_redis_set_error(r, "command timed out");

    if (req->handler) {
        req->handler(req->data, NULL, "redis command timed out");
        req->handler = NULL;
    }

    /* the answer is late or lost: start over with a new connection */
    if (!r->drop.posted) {
        ngx_post_event(&r->drop, &ngx_posted_events);
    }
}


/* the nginx event adapter */


static void
sg_redis_ev_add_read(void *privdata)
{
    sg_redis_t  *r = privdata;

    if (r->c && !r->c->read->active) {
        if (ngx_add_event(r->c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ERR, r->log, 0, "sg: redis add read");
        }
    }
}


static void
sg_redis_ev_del_read(void *privdata)
{
    sg_redis_t  *r = privdata;

    if (r->c && r->c->read->active) {
        (void) ngx_del_event(r->c->read, NGX_READ_EVENT, 0);
    }
}


static void
sg_redis_ev_add_write(void *privdata)
{
    sg_redis_t  *r = privdata;

    if (r->c && !r->c->write->active) {
        if (ngx_add_event(r->c->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ERR, r->log, 0, "sg: redis add write");
        }
    }
}


static void
sg_redis_ev_del_write(void *privdata)
{
    sg_redis_t  *r = privdata;

    if (r->c && r->c->write->active) {
        (void) ngx_del_event(r->c->write, NGX_WRITE_EVENT, 0);
    }
}


static void
sg_redis_ev_cleanup(void *privdata)
{
    sg_redis_t        *r = privdata;
    ngx_connection_t  *c;

    c = r->c;

    if (c == NULL) {
        return;
    }

    sg_redis_ev_del_read(r);
    sg_redis_ev_del_write(r);

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    /* hiredis closes the descriptor */
    ngx_free_connection(c);
    c->fd = (ngx_socket_t) -1;

    r->c = NULL;
}


static void
sg_redis_read_handler(ngx_event_t *ev)
{
    ngx_connection_t  *c;
    sg_redis_t        *r;

    c = ev->data;
    r = c->data;

    if (r->ac) {
        redisAsyncHandleRead(r->ac);
    }
}


static void
sg_redis_write_handler(ngx_event_t *ev)
{
    ngx_connection_t  *c;
    sg_redis_t        *r;

    c = ev->data;
    r = c->data;

    if (r->ac) {
        redisAsyncHandleWrite(r->ac);
    }
}
