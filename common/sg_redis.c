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


typedef struct {
    sg_redis_t                *redis;
    ngx_pool_t                *pool;
    ngx_log_t                 *log;
    ngx_str_t                  match;      /* <prefix>* */
    ngx_array_t                keys;       /* ngx_str_t */
    ngx_uint_t                 scans;
    sg_redis_scan_handler_pt   handler;
    void                      *data;
    u_char                     cursor[NGX_INT64_LEN + 1];
} sg_redis_scan_t;


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

static void sg_redis_scan(sg_redis_scan_t *sc);
static void sg_redis_scanned(void *data, redisReply *reply, const char *err);
static void sg_redis_mget(sg_redis_scan_t *sc);
static void sg_redis_got(void *data, redisReply *reply, const char *err);
static int ngx_libc_cdecl sg_redis_key_cmp(const void *a, const void *b);

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


/* SCAN MATCH <prefix>*, then MGET */


void
sg_redis_scan_get(sg_redis_t *r, ngx_pool_t *pool, ngx_log_t *log,
    const char *prefix, sg_redis_scan_handler_pt handler, void *data)
{
    size_t            len;
    sg_redis_scan_t  *sc;

    sc = ngx_pcalloc(pool, sizeof(sg_redis_scan_t));
    if (sc == NULL) {
        handler(data, NGX_ERROR, NULL, 0, NULL, "out of memory");
        return;
    }

    len = ngx_strlen(prefix);

    sc->match.data = ngx_pnalloc(pool, len + 1);

    if (sc->match.data == NULL
        || ngx_array_init(&sc->keys, pool, 16, sizeof(ngx_str_t)) != NGX_OK)
    {
        handler(data, NGX_ERROR, NULL, 0, NULL, "out of memory");
        return;
    }

    ngx_memcpy(sc->match.data, prefix, len);
    sc->match.data[len] = '*';
    sc->match.len = len + 1;

    sc->redis = r;
    sc->pool = pool;
    sc->log = log;
    sc->handler = handler;
    sc->data = data;
    sc->cursor[0] = '0';

    sg_redis_scan(sc);
}


static void
sg_redis_scan(sg_redis_scan_t *sc)
{
    ngx_int_t    rc;
    const char  *argv[6];
    size_t       argvlen[6];

    argv[0] = "SCAN";
    argv[1] = (const char *) sc->cursor;
    argv[2] = "MATCH";
    argv[3] = (const char *) sc->match.data;
    argv[4] = "COUNT";
    argv[5] = SG_REDIS_SCAN_COUNT;

    argvlen[0] = sizeof("SCAN") - 1;
    argvlen[1] = ngx_strlen(sc->cursor);
    argvlen[2] = sizeof("MATCH") - 1;
    argvlen[3] = sc->match.len;
    argvlen[4] = sizeof("COUNT") - 1;
    argvlen[5] = sizeof(SG_REDIS_SCAN_COUNT) - 1;

    /* sg_redis_command_argv() must not be given a NULL adapter */
    rc = sc->redis ? sg_redis_command_argv(sc->redis, sg_redis_scanned, sc,
                                           6, argv, argvlen)
                   : NGX_DECLINED;

    if (rc != NGX_OK) {
        sc->handler(sc->data, NGX_DECLINED, NULL, 0, NULL,
                    sg_redis_last_error(sc->redis));
    }
}


/* a SCAN reply: [cursor, [key, ...]]; cursor "0" ends the iteration */

static void
sg_redis_scanned(void *data, redisReply *reply, const char *err)
{
    sg_redis_scan_t  *sc = data;

    size_t       i;
    ngx_str_t   *key;
    redisReply  *keys, *k;

    if (err) {
        sc->handler(sc->data, NGX_DECLINED, NULL, 0, NULL, err);
        return;
    }

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_STRING
        || reply->element[0]->len > NGX_INT64_LEN
        || reply->element[1]->type != REDIS_REPLY_ARRAY)
    {
        ngx_log_error(NGX_LOG_ERR, sc->log, 0,
                      "sg: redis: unexpected reply to SCAN MATCH %V",
                      &sc->match);
        sc->handler(sc->data, NGX_ERROR, NULL, 0, NULL,
                    "Redis gave an unexpected reply");
        return;
    }

    keys = reply->element[1];

    for (i = 0; i < keys->elements; i++) {
        k = keys->element[i];

        if (k->type != REDIS_REPLY_STRING || k->len <= sc->match.len - 1) {
            continue;
        }

        if (sc->keys.nelts >= SG_REDIS_SCAN_KEYS_MAX) {
            break;
        }

        key = ngx_array_push(&sc->keys);
        if (key == NULL) {
            sc->handler(sc->data, NGX_ERROR, NULL, 0, NULL, "out of memory");
            return;
        }

        key->len = k->len;
        key->data = ngx_pnalloc(sc->pool, k->len);
        if (key->data == NULL) {
            sc->handler(sc->data, NGX_ERROR, NULL, 0, NULL, "out of memory");
            return;
        }

        ngx_memcpy(key->data, k->str, k->len);
    }

    ngx_memcpy(sc->cursor, reply->element[0]->str, reply->element[0]->len);
    sc->cursor[reply->element[0]->len] = '\0';

    if (ngx_strcmp(sc->cursor, "0") == 0) {
        sg_redis_mget(sc);
        return;
    }

    if (++sc->scans >= SG_REDIS_SCAN_CALLS_MAX
        || sc->keys.nelts >= SG_REDIS_SCAN_KEYS_MAX)
    {
        ngx_log_error(NGX_LOG_WARN, sc->log, 0,
                      "sg: redis: SCAN MATCH %V answered incomplete:"
                      " %ui keys after %ui calls", &sc->match,
                      sc->keys.nelts, sc->scans);
        sg_redis_mget(sc);
        return;
    }

    sg_redis_scan(sc);
}


/* the keys in order, once each (SCAN may repeat one), and MGET */

static void
sg_redis_mget(sg_redis_scan_t *sc)
{
    size_t       *argvlen;
    ngx_int_t     rc;
    ngx_str_t    *keys;
    ngx_uint_t    i, n;
    const char  **argv;

    keys = sc->keys.elts;

    if (sc->keys.nelts == 0) {
        sc->handler(sc->data, NGX_OK, keys, 0, NULL, NULL);
        return;
    }

    ngx_qsort(keys, sc->keys.nelts, sizeof(ngx_str_t), sg_redis_key_cmp);

    for (i = 1, n = 1; i < sc->keys.nelts; i++) {
        if (sg_redis_key_cmp(&keys[n - 1], &keys[i]) != 0) {
            keys[n++] = keys[i];
        }
    }

    sc->keys.nelts = n;

    argv = ngx_palloc(sc->pool, (n + 1) * sizeof(char *));
    argvlen = ngx_palloc(sc->pool, (n + 1) * sizeof(size_t));

    if (argv == NULL || argvlen == NULL) {
        sc->handler(sc->data, NGX_ERROR, NULL, 0, NULL, "out of memory");
        return;
    }

    argv[0] = "MGET";
    argvlen[0] = sizeof("MGET") - 1;

    for (i = 0; i < n; i++) {
        argv[i + 1] = (const char *) keys[i].data;
        argvlen[i + 1] = keys[i].len;
    }

    rc = sg_redis_command_argv(sc->redis, sg_redis_got, sc, (int) n + 1,
                               argv, argvlen);
    if (rc != NGX_OK) {
        sc->handler(sc->data, NGX_DECLINED, NULL, 0, NULL,
                    sg_redis_last_error(sc->redis));
    }
}


static void
sg_redis_got(void *data, redisReply *reply, const char *err)
{
    sg_redis_scan_t  *sc = data;

    if (err) {
        sc->handler(sc->data, NGX_DECLINED, NULL, 0, NULL, err);
        return;
    }

    if (reply->type != REDIS_REPLY_ARRAY
        || reply->elements != sc->keys.nelts)
    {
        ngx_log_error(NGX_LOG_ERR, sc->log, 0,
                      "sg: redis: unexpected reply to MGET of %V",
                      &sc->match);
        sc->handler(sc->data, NGX_ERROR, NULL, 0, NULL,
                    "Redis gave an unexpected reply");
        return;
    }

    sc->handler(sc->data, NGX_OK, sc->keys.elts, sc->keys.nelts, reply,
                NULL);
}


static int ngx_libc_cdecl
sg_redis_key_cmp(const void *a, const void *b)
{
    const ngx_str_t  *x = a, *y = b;

    ngx_int_t  rc;

    rc = ngx_memn2cmp(x->data, y->data, x->len, y->len);

    return rc < 0 ? -1 : rc > 0;
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
