/*
 * sg: MTA-STS policy lookup for delivery.  See sg_sts.h; the rules are in
 * sg_sts_cache.c (pure), the Redis keys in redis/README.md.
 *
 * Memory: an entry per domain (rbtree by name, LRU queue, at most
 * sg_mta_sts_cache_size) holds a shared, reference-counted policy, the
 * last failed fetch and a cached "no policy".  A job does the I/O of one
 * lookup (Redis, TXT, A/AAAA, HTTPS); lookups of a domain that arrive
 * while its job runs wait on it.  Entries in use by a job are pinned.
 *
 * Redis replies cannot be cancelled: they come back through a small
 * context that outlives the job (the job only clears its pointer).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "sg_core.h"
#include "sg_addr.h"
#include "sg_dns.h"
#include "sg_http.h"
#include "sg_mta_sts.h"
#include "sg_sts_cache.h"
#include "sg_sts.h"


#define SG_STS_POOL_SIZE        4096
#define SG_STS_DNS_TXT          16
#define SG_STS_TXT_RECORDS_MAX  16          /* TXT records read */
#define SG_STS_REFRESH_PER_TICK 32
#define SG_STS_EVICT_SCAN       64
#define SG_STS_LOCK_TTL         "300"       /* s: one refresh per cluster */
#define SG_STS_WELL_KNOWN       "/.well-known/mta-sts.txt"


typedef struct sg_sts_job_s  sg_sts_job_t;


/* a policy: immutable once made, shared by the cache and the answers */
typedef struct {
    ngx_uint_t           refs;
    sg_sts_mode_e        mode;
    ngx_str_t            domain;
    ngx_str_t            id;
    ngx_str_t            text;
    ngx_str_t           *mx;
    ngx_uint_t           nmx;
    time_t               max_age;
    time_t               fetched_at;
    time_t               expires_at;
} sg_sts_pol_t;


typedef struct {
    char                 id[SG_STS_ID_MAX + 1];
    time_t               failed_at;
    const char          *result_type;
    u_char               reason[SG_STS_REASON_MAX];
} sg_sts_fail_t;


typedef struct {
    ngx_str_node_t       sn;            /* sn.str: the domain */
    ngx_queue_t          lru;
    sg_sts_pol_t        *pol;
    sg_sts_fail_t       *fail;
    time_t               checked_at;    /* TXT last confirmed pol */
    time_t               negative_until;
    const char          *negative_why;  /* static */
    ngx_uint_t           hits;          /* lookups since pol came */
    time_t               refresh_next;
    ngx_uint_t           pins;
    sg_sts_job_t        *job;           /* the shared lookup */
} sg_sts_entry_t;


typedef enum {
    SG_STS_JOB_LOOKUP = 0,      /* delivery: the rules decide */
    SG_STS_JOB_REFRESH,         /* the API: fetch now, trace every step */
    SG_STS_JOB_BACKGROUND       /* proactive refresh before expiry */
} sg_sts_job_kind_e;


typedef enum {
    SG_STS_R_READ = 0,          /* MGET for a job */
    SG_STS_R_ADOPT,             /* GET before a proactive refresh */
    SG_STS_R_LOCK               /* SET NX of the refresh lock */
} sg_sts_r_kind_e;


/* a Redis reply's way back: outlives the job that asked */
typedef struct {
    sg_sts_job_t        *job;
    sg_sts_r_kind_e      kind;
    size_t               len;
    u_char               domain[1];
} sg_sts_rctx_t;


struct sg_sts_job_s {
    ngx_queue_t          queue;         /* sg_sts.jobs */
    ngx_pool_t          *pool;
    sg_sts_job_kind_e    kind;
    sg_sts_entry_t      *entry;         /* pinned */
    ngx_str_t            domain;        /* NUL-terminated */
    ngx_queue_t          waiters;       /* sg_sts_req_t */

    sg_dns_req_t        *dns;
    sg_http_req_t       *http;
    sg_sts_rctx_t       *rctx;

    sg_sts_txt_state_e   txt;
    char                 txt_id[SG_STS_ID_MAX + 1];
    const char          *txt_why;
    sg_sts_trace_t      *trace;         /* REFRESH */

    /* the outcome */
    sg_sts_pol_t        *pol;           /* a reference */
    sg_sts_source_e      source;
    const char          *result_type;
    u_char               reason[SG_STS_REASON_MAX];

    unsigned             redis_read:1;
    unsigned             adopted:1;     /* this job took pol from Redis */
    unsigned             txt_done:1;
};


struct sg_sts_req_s {
    ngx_queue_t          queue;         /* job->waiters or sg_sts.ready */
    sg_sts_handler_pt    handler;
    void                *data;
    sg_sts_answer_t     *answer;
    ngx_event_t          ev;
};


typedef struct {
    sg_sts_answer_t      pub;
    sg_sts_pol_t        *pol;
    ngx_pool_t          *pool;          /* the trace's */
    unsigned             stat:1;        /* sg_sts_oom: never freed */
    u_char               reason[SG_STS_REASON_MAX];
} sg_sts_answer_priv_t;


static struct {
    ngx_log_t           *log;
    sg_sts_conf_t       *conf;
    ngx_rbtree_t         tree;
    ngx_rbtree_node_t    sentinel;
    ngx_queue_t          lru;
    ngx_uint_t           nentries;
    ngx_queue_t          jobs;
    ngx_queue_t          ready;
    ngx_event_t          timer;
    unsigned             on:1;
    unsigned             redis_down:1;  /* said so in the log */
} sg_sts;


static sg_sts_answer_priv_t  sg_sts_oom = {
    { SG_STS_NONE, ngx_null_string, ngx_null_string, NULL, 0, 0, 0, 0,
      ngx_null_string, SG_STS_RT_FETCH_ERROR,
      "out of memory while looking the MTA-STS policy up",
      SG_STS_SRC_NONE, NULL },
    NULL, NULL, 1, ""
};


static void *sg_sts_create_conf(ngx_cycle_t *cycle);
static char *sg_sts_init_conf(ngx_cycle_t *cycle, void *conf);
static sg_sts_req_t *sg_sts_start(ngx_str_t *domain, sg_sts_job_kind_e kind,
    sg_sts_handler_pt handler, void *data);
static sg_sts_req_t *sg_sts_req_new(sg_sts_handler_pt handler, void *data);
static void sg_sts_req_answer(sg_sts_req_t *req, sg_sts_answer_t *answer);
static void sg_sts_req_ready(ngx_event_t *ev);
static sg_sts_answer_t *sg_sts_answer_new(ngx_str_t *domain,
    sg_sts_pol_t *pol, sg_sts_source_e source, const char *result_type,
    const char *reason);
static sg_sts_pol_t *sg_sts_pol_create(ngx_str_t *domain, const char *id,
    const char *text, size_t len, time_t fetched_at);
static void sg_sts_pol_unref(sg_sts_pol_t *pol);
static sg_sts_entry_t *sg_sts_entry_find(ngx_str_t *domain);
static sg_sts_entry_t *sg_sts_entry_get(ngx_str_t *domain);
static void sg_sts_entry_clear(sg_sts_entry_t *e);
static void sg_sts_entry_free(sg_sts_entry_t *e);
static void sg_sts_entry_set_pol(sg_sts_entry_t *e, sg_sts_pol_t *pol);
static ngx_uint_t sg_sts_pol_valid(sg_sts_pol_t *pol, time_t now);
static sg_sts_job_t *sg_sts_job_new(sg_sts_entry_t *e,
    sg_sts_job_kind_e kind);
static void sg_sts_job_run(sg_sts_job_t *job);
static ngx_int_t sg_sts_redis_read(sg_sts_job_t *job);
static void sg_sts_redis_got(void *data, redisReply *reply, const char *err);
static void sg_sts_redis_merge(sg_sts_entry_t *e, redisReply *reply,
    ngx_uint_t *adopted);
static void sg_sts_job_txt(sg_sts_job_t *job);
static void sg_sts_txt_done(void *data, sg_dns_answer_t *answer);
static void sg_sts_job_decide(sg_sts_job_t *job);
static void sg_sts_job_fetch(sg_sts_job_t *job);
static void sg_sts_route_done(void *data, sg_dns_route_t *route);
static void sg_sts_fetched(void *data, sg_http_result_t *res);
static void sg_sts_trace_https(sg_sts_job_t *job, sg_http_result_t *res);
static void sg_sts_job_failed(sg_sts_job_t *job, const char *result_type,
    const char *reason);
static void sg_sts_job_cached(sg_sts_job_t *job, const char *why);
static void sg_sts_job_outcome(sg_sts_job_t *job, sg_sts_pol_t *pol,
    sg_sts_source_e source, const char *result_type, const char *fmt, ...);
static void sg_sts_job_finish(sg_sts_job_t *job);
static void sg_sts_job_free(sg_sts_job_t *job);
static void sg_sts_redis_store(sg_sts_pol_t *pol);
static void sg_sts_redis_fail(ngx_str_t *domain, sg_sts_fail_t *fail);
static void sg_sts_redis_negative(ngx_str_t *domain, const char *why);
static void sg_sts_redis_setex(const char *prefix, size_t len,
    ngx_str_t *domain, const char *value, time_t ttl);
static void sg_sts_redis_done(void *data, redisReply *reply,
    const char *err);
static void sg_sts_redis_problem(const char *err);
static void sg_sts_redis_ok(void);
static sg_sts_rctx_t *sg_sts_rctx_new(sg_sts_job_t *job, ngx_str_t *domain,
    sg_sts_r_kind_e kind);
static void sg_sts_timer_handler(ngx_event_t *ev);
static void sg_sts_refresh_start(sg_sts_entry_t *e);
static void sg_sts_background(ngx_str_t *domain);
static void sg_sts_notify(void *data, const char *channel,
    const char *payload);
static ngx_int_t sg_sts_str(ngx_pool_t *pool, ngx_str_t *dst, u_char *src,
    size_t len);


static ngx_command_t  sg_sts_commands[] = {

    { ngx_string("sg_mta_sts_fetch_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_sts_conf_t, fetch_timeout),
      NULL },

    { ngx_string("sg_mta_sts_cache_size"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      0,
      offsetof(sg_sts_conf_t, cache_size),
      NULL },

    { ngx_string("sg_mta_sts_txt_recheck"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      0,
      offsetof(sg_sts_conf_t, txt_recheck),
      NULL },

    { ngx_string("sg_mta_sts_negative_ttl"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      0,
      offsetof(sg_sts_conf_t, negative_ttl),
      NULL },

    { ngx_string("sg_mta_sts_failure_backoff"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      0,
      offsetof(sg_sts_conf_t, failure_backoff),
      NULL },

    { ngx_string("sg_mta_sts_refresh_interval"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      0,
      offsetof(sg_sts_conf_t, refresh_interval),
      NULL },

      ngx_null_command
};


static ngx_core_module_t  sg_sts_module_ctx = {
    ngx_string("sg_sts"),
    sg_sts_create_conf,
    sg_sts_init_conf
};


/* workers are set up from the core module: sg_sts_init_worker() */

ngx_module_t  ngx_sg_sts_module = {
    NGX_MODULE_V1,
    &sg_sts_module_ctx,                    /* module context */
    sg_sts_commands,                       /* module directives */
    NGX_CORE_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static void *
sg_sts_create_conf(ngx_cycle_t *cycle)
{
    sg_sts_conf_t  *conf;

    conf = ngx_pcalloc(cycle->pool, sizeof(sg_sts_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->fetch_timeout = NGX_CONF_UNSET_MSEC;
    conf->cache_size = NGX_CONF_UNSET_UINT;
    conf->txt_recheck = NGX_CONF_UNSET;
    conf->negative_ttl = NGX_CONF_UNSET;
    conf->failure_backoff = NGX_CONF_UNSET;
    conf->refresh_interval = NGX_CONF_UNSET;

    return conf;
}


static char *
sg_sts_init_conf(ngx_cycle_t *cycle, void *conf)
{
    sg_sts_conf_t  *scf = conf;

    ngx_conf_init_msec_value(scf->fetch_timeout, SG_HTTP_TIMEOUT_MAX);
    ngx_conf_init_uint_value(scf->cache_size, 10000);
    ngx_conf_init_value(scf->txt_recheck, 60);
    ngx_conf_init_value(scf->negative_ttl, 300);
    ngx_conf_init_value(scf->failure_backoff,
                        SG_STS_FAILURE_BACKOFF_DEFAULT);
    ngx_conf_init_value(scf->refresh_interval, 60);

    /* RFC 8461, 3.3: "a timeout of at most 60 seconds" */
    if (scf->fetch_timeout < 1 || scf->fetch_timeout > SG_HTTP_TIMEOUT_MAX) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_mta_sts_fetch_timeout\" must be from 1ms to 60s");
        return NGX_CONF_ERROR;
    }

    if (scf->cache_size < 1 || scf->cache_size > 10000000) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_mta_sts_cache_size\" must be from 1 to"
                      " 10000000");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* per worker */


ngx_int_t
sg_sts_init_worker(ngx_cycle_t *cycle)
{
    ngx_memzero(&sg_sts, sizeof(sg_sts));

    sg_sts.log = cycle->log;
    sg_sts.conf = (sg_sts_conf_t *) ngx_get_conf(cycle->conf_ctx,
                                                 ngx_sg_sts_module);
    if (sg_sts.conf == NULL) {
        return NGX_ERROR;
    }

    ngx_rbtree_init(&sg_sts.tree, &sg_sts.sentinel,
                    ngx_str_rbtree_insert_value);
    ngx_queue_init(&sg_sts.lru);
    ngx_queue_init(&sg_sts.jobs);
    ngx_queue_init(&sg_sts.ready);

    if (sg_worker.pg
        && sg_pg_listen(sg_worker.pg, SG_STS_CHANNEL, sg_sts_notify, NULL)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    sg_sts.timer.handler = sg_sts_timer_handler;
    sg_sts.timer.data = &sg_sts;
    sg_sts.timer.log = cycle->log;
    sg_sts.timer.cancelable = 1;

    if (sg_sts.conf->refresh_interval > 0) {
        ngx_add_timer(&sg_sts.timer, sg_sts.conf->refresh_interval * 1000);
    }

    sg_sts.on = 1;

    return NGX_OK;
}


void
sg_sts_exit_worker(void)
{
    ngx_queue_t     *q;
    sg_sts_job_t    *job;
    sg_sts_req_t    *req;
    sg_sts_entry_t  *e;

    if (!sg_sts.on) {
        return;
    }

    sg_sts.on = 0;

    /* handlers are not called: their owners are going away too */

    while (!ngx_queue_empty(&sg_sts.jobs)) {
        q = ngx_queue_head(&sg_sts.jobs);
        job = ngx_queue_data(q, sg_sts_job_t, queue);

        while (!ngx_queue_empty(&job->waiters)) {
            req = ngx_queue_data(ngx_queue_head(&job->waiters),
                                 sg_sts_req_t, queue);
            sg_sts_cancel(req);
        }

        sg_sts_job_free(job);
    }

    while (!ngx_queue_empty(&sg_sts.ready)) {
        req = ngx_queue_data(ngx_queue_head(&sg_sts.ready), sg_sts_req_t,
                             queue);
        sg_sts_cancel(req);
    }

    while (!ngx_queue_empty(&sg_sts.lru)) {
        e = ngx_queue_data(ngx_queue_head(&sg_sts.lru), sg_sts_entry_t, lru);
        e->pins = 0;
        sg_sts_entry_free(e);
    }

    if (sg_sts.timer.timer_set) {
        ngx_del_timer(&sg_sts.timer);
    }

    ngx_memzero(&sg_sts, sizeof(sg_sts));
}


/* the API of sg_sts.h */


sg_sts_req_t *
sg_sts_lookup(ngx_str_t *domain, sg_sts_handler_pt handler, void *data)
{
    return sg_sts_start(domain, SG_STS_JOB_LOOKUP, handler, data);
}


sg_sts_req_t *
sg_sts_refresh(ngx_str_t *domain, sg_sts_handler_pt handler, void *data)
{
    return sg_sts_start(domain, SG_STS_JOB_REFRESH, handler, data);
}


void
sg_sts_cancel(sg_sts_req_t *req)
{
    if (req == NULL) {
        return;
    }

    if (req->ev.posted) {
        ngx_delete_posted_event(&req->ev);
    }

    /* the job goes on without it: its result is cached */
    ngx_queue_remove(&req->queue);

    if (req->answer) {
        sg_sts_release(req->answer);
    }

    ngx_free(req);
}


void
sg_sts_release(sg_sts_answer_t *answer)
{
    sg_sts_answer_priv_t  *a = (sg_sts_answer_priv_t *) answer;

    if (a == NULL || a->stat) {
        return;
    }

    if (a->pol) {
        sg_sts_pol_unref(a->pol);
    }

    if (a->pool) {
        ngx_destroy_pool(a->pool);
    }

    ngx_free(a);
}


ngx_uint_t
sg_sts_match_mx(sg_sts_answer_t *answer, ngx_str_t *host)
{
    ngx_uint_t  i;

    /* RFC 8461, 4.1: any mx pattern of the policy */

    for (i = 0; i < answer->nmx; i++) {
        if (sg_sts_mx_match((const char *) answer->mx[i].data,
                            answer->mx[i].len, (const char *) host->data,
                            host->len))
        {
            return 1;
        }
    }

    return 0;
}


sg_sts_answer_t *
sg_sts_peek(ngx_str_t *domain)
{
    size_t           len;
    time_t           now;
    ngx_str_t        d;
    sg_sts_entry_t  *e;
    u_char           buf[SG_STS_DOMAIN_MAX + 1];

    if (!sg_sts.on
        || sg_sts_domain(domain, buf, sizeof(buf), &len) != NULL)
    {
        return NULL;
    }

    d.data = buf;
    d.len = len;

    e = sg_sts_entry_find(&d);
    now = ngx_time();

    if (e == NULL || !sg_sts_pol_valid(e->pol, now)) {
        return NULL;
    }

    return sg_sts_answer_new(&d, e->pol, SG_STS_SRC_MEMORY, NULL,
                             "cached in this worker's memory");
}


void
sg_sts_forget(ngx_str_t *domain)
{
    size_t           len;
    ngx_str_t        d;
    ngx_queue_t     *q, *next;
    sg_sts_entry_t  *e;
    u_char           buf[SG_STS_DOMAIN_MAX + 1];

    if (!sg_sts.on) {
        return;
    }

    if (domain == NULL) {
        for (q = ngx_queue_head(&sg_sts.lru);
             q != ngx_queue_sentinel(&sg_sts.lru);
             q = next)
        {
            next = ngx_queue_next(q);
            e = ngx_queue_data(q, sg_sts_entry_t, lru);
            sg_sts_entry_clear(e);

            if (e->pins == 0) {
                sg_sts_entry_free(e);
            }
        }

        return;
    }

    if (sg_sts_domain(domain, buf, sizeof(buf), &len) != NULL) {
        return;
    }

    d.data = buf;
    d.len = len;

    e = sg_sts_entry_find(&d);
    if (e == NULL) {
        return;
    }

    sg_sts_entry_clear(e);

    if (e->pins == 0) {
        sg_sts_entry_free(e);
    }
}


ngx_int_t
sg_sts_keys(ngx_str_t *domain, u_char *buf, const char **argv,
    size_t *argvlen)
{
    u_char      *p;
    ngx_uint_t   i;

    static const ngx_str_t  prefix[] = {
        ngx_string(SG_STS_KEY_POLICY),
        ngx_string(SG_STS_KEY_NONE),
        ngx_string(SG_STS_KEY_FAIL)
    };

    if (domain->len > SG_STS_DOMAIN_MAX) {
        return NGX_ERROR;
    }

    p = buf;

    for (i = 0; i < 3; i++) {
        argv[i] = (const char *) p;
        p = ngx_cpymem(p, prefix[i].data, prefix[i].len);
        p = ngx_cpymem(p, domain->data, domain->len);
        argvlen[i] = p - (u_char *) argv[i];
    }

    return NGX_OK;
}


const char *
sg_sts_domain(ngx_str_t *in, u_char *out, size_t size, size_t *len)
{
    const char  *msg;

    if (in->len && (in->data[0] == '[' || ngx_strlchr(in->data,
                                                      in->data + in->len,
                                                      ':')))
    {
        /* RFC 5321, 4.1.3 address literals name no policy domain */
        return "an address literal has no MTA-STS policy";
    }

    msg = sg_addr_host_name((const char *) in->data, in->len, 0,
                            (char *) out, size);
    if (msg) {
        return msg;
    }

    *len = ngx_strlen(out);

    return NULL;
}


const char *
sg_sts_source_name(sg_sts_source_e source)
{
    switch (source) {
    case SG_STS_SRC_MEMORY:
        return "memory";
    case SG_STS_SRC_REDIS:
        return "redis";
    case SG_STS_SRC_FETCHED:
        return "fetched";
    default:
        return "none";
    }
}


/* lookups */


static sg_sts_req_t *
sg_sts_start(ngx_str_t *domain, sg_sts_job_kind_e kind,
    sg_sts_handler_pt handler, void *data)
{
    size_t           len;
    time_t           now;
    ngx_str_t        d;
    const char      *msg;
    sg_sts_req_t    *req;
    sg_sts_job_t    *job;
    sg_sts_entry_t  *e;
    u_char           buf[SG_STS_DOMAIN_MAX + 1];

    if (!sg_sts.on) {
        return NULL;
    }

    req = sg_sts_req_new(handler, data);
    if (req == NULL) {
        return NULL;
    }

    msg = sg_sts_domain(domain, buf, sizeof(buf), &len);

    if (msg) {
        d.data = domain->data;
        d.len = ngx_min(domain->len, SG_STS_DOMAIN_MAX);
        sg_sts_req_answer(req, sg_sts_answer_new(&d, NULL, SG_STS_SRC_NONE,
                                                 NULL, msg));
        return req;
    }

    d.data = buf;
    d.len = len;

    if (kind == SG_STS_JOB_LOOKUP && sg_worker.settings
        && !sg_worker.settings->mta_sts_enabled)
    {
        sg_sts_req_answer(req, sg_sts_answer_new(&d, NULL, SG_STS_SRC_NONE,
                              NULL, "the \"MTA-STS\" setting is off:"
                                    " policies are ignored"));
        return req;
    }

    e = sg_sts_entry_get(&d);
    if (e == NULL) {
        sg_sts_req_answer(req, &sg_sts_oom.pub);
        return req;
    }

    now = ngx_time();

    if (kind == SG_STS_JOB_LOOKUP) {

        if (e->job) {
            ngx_queue_insert_tail(&e->job->waiters, &req->queue);
            return req;
        }

        /* the hot path: this worker's memory, TXT confirmed recently */

        if (sg_sts_pol_valid(e->pol, now)
            && now - e->checked_at < sg_sts.conf->txt_recheck)
        {
            e->hits++;
            sg_sts_req_answer(req, sg_sts_answer_new(&d, e->pol,
                                  SG_STS_SRC_MEMORY, NULL,
                                  "cached in this worker's memory"));
            return req;
        }

        if (!sg_sts_pol_valid(e->pol, now) && e->negative_until > now) {
            sg_sts_req_answer(req, sg_sts_answer_new(&d, NULL,
                                  SG_STS_SRC_NONE, NULL, e->negative_why));
            return req;
        }
    }

    job = sg_sts_job_new(e, kind);
    if (job == NULL) {
        sg_sts_req_answer(req, &sg_sts_oom.pub);
        return req;
    }

    ngx_queue_insert_tail(&job->waiters, &req->queue);

    /* may finish at once: answers are posted, never called from here */
    sg_sts_job_run(job);

    return req;
}


static sg_sts_req_t *
sg_sts_req_new(sg_sts_handler_pt handler, void *data)
{
    sg_sts_req_t  *req;

    req = ngx_calloc(sizeof(sg_sts_req_t), sg_sts.log);
    if (req == NULL) {
        return NULL;
    }

    req->handler = handler;
    req->data = data;
    req->ev.handler = sg_sts_req_ready;
    req->ev.data = req;
    req->ev.log = sg_sts.log;

    ngx_queue_init(&req->queue);

    return req;
}


static void
sg_sts_req_answer(sg_sts_req_t *req, sg_sts_answer_t *answer)
{
    if (answer == NULL) {
        answer = &sg_sts_oom.pub;
    }

    req->answer = answer;

    ngx_queue_remove(&req->queue);
    ngx_queue_insert_tail(&sg_sts.ready, &req->queue);

    ngx_post_event(&req->ev, &ngx_posted_events);
}


static void
sg_sts_req_ready(ngx_event_t *ev)
{
    void               *data;
    sg_sts_req_t       *req;
    sg_sts_answer_t    *answer;
    sg_sts_handler_pt   handler;

    req = ev->data;

    ngx_queue_remove(&req->queue);

    handler = req->handler;
    data = req->data;
    answer = req->answer;

    ngx_free(req);

    handler(data, answer);
}


static sg_sts_answer_t *
sg_sts_answer_new(ngx_str_t *domain, sg_sts_pol_t *pol,
    sg_sts_source_e source, const char *result_type, const char *reason)
{
    u_char                *p;
    sg_sts_answer_t       *a;
    sg_sts_answer_priv_t  *ap;

    ap = ngx_calloc(sizeof(sg_sts_answer_priv_t) + domain->len + 1,
                    sg_sts.log);
    if (ap == NULL) {
        return NULL;
    }

    a = &ap->pub;
    p = (u_char *) ap + sizeof(sg_sts_answer_priv_t);

    a->domain.data = p;
    a->domain.len = domain->len;
    ngx_memcpy(p, domain->data, domain->len);
    p[domain->len] = '\0';

    a->mode = SG_STS_NONE;
    a->source = source;
    a->result_type = result_type;

    if (pol) {
        pol->refs++;
        ap->pol = pol;

        a->mode = pol->mode;
        a->id = pol->id;
        a->mx = pol->mx;
        a->nmx = pol->nmx;
        a->max_age = pol->max_age;
        a->fetched_at = pol->fetched_at;
        a->expires_at = pol->expires_at;
        a->text = pol->text;
    }

    ngx_cpystrn(ap->reason, (u_char *) (reason ? reason : ""),
                SG_STS_REASON_MAX);
    a->reason = (const char *) ap->reason;

    return a;
}


/* policies */


static sg_sts_pol_t *
sg_sts_pol_create(ngx_str_t *domain, const char *id, const char *text,
    size_t len, time_t fetched_at)
{
    u_char           *p;
    size_t            size, idlen;
    ngx_uint_t        i;
    sg_sts_pol_t     *pol;
    sg_sts_policy_t   parsed;

    if (sg_sts_policy_parse(text, len, &parsed, NULL) != SG_STS_OK) {
        return NULL;
    }

    idlen = ngx_strlen(id);

    size = sizeof(sg_sts_pol_t) + parsed.nmx * sizeof(ngx_str_t)
           + domain->len + 1 + idlen + 1 + len + 1;

    pol = ngx_calloc(size, sg_sts.log);
    if (pol == NULL) {
        return NULL;
    }

    pol->refs = 1;
    pol->mode = parsed.mode;
    pol->max_age = parsed.max_age;
    pol->fetched_at = fetched_at;
    pol->expires_at = fetched_at + (time_t) parsed.max_age;
    pol->nmx = parsed.nmx;
    pol->mx = (ngx_str_t *) ((u_char *) pol + sizeof(sg_sts_pol_t));

    p = (u_char *) pol->mx + parsed.nmx * sizeof(ngx_str_t);

    pol->domain.data = p;
    pol->domain.len = domain->len;
    p = ngx_cpymem(p, domain->data, domain->len);
    *p++ = '\0';

    pol->id.data = p;
    pol->id.len = idlen;
    p = ngx_cpymem(p, id, idlen);
    *p++ = '\0';

    pol->text.data = p;
    pol->text.len = len;
    ngx_memcpy(p, text, len);
    p[len] = '\0';

    /* the mx patterns point into the text, as the parser left them */
    for (i = 0; i < parsed.nmx; i++) {
        pol->mx[i].data = pol->text.data + (parsed.mx[i].data - text);
        pol->mx[i].len = parsed.mx[i].len;
    }

    return pol;
}


static void
sg_sts_pol_unref(sg_sts_pol_t *pol)
{
    if (--pol->refs == 0) {
        ngx_free(pol);
    }
}


static ngx_uint_t
sg_sts_pol_valid(sg_sts_pol_t *pol, time_t now)
{
    /* RFC 8461, 5.1: usable while the time since fetch is below max_age */
    return pol != NULL && pol->expires_at > now;
}


/* the in-worker cache */


static sg_sts_entry_t *
sg_sts_entry_find(ngx_str_t *domain)
{
    uint32_t  hash;

    hash = ngx_crc32_short(domain->data, domain->len);

    return (sg_sts_entry_t *) ngx_str_rbtree_lookup(&sg_sts.tree, domain,
                                                    hash);
}


static sg_sts_entry_t *
sg_sts_entry_get(ngx_str_t *domain)
{
    u_char          *p;
    ngx_uint_t       n;
    ngx_queue_t     *q;
    sg_sts_entry_t  *e, *old;

    e = sg_sts_entry_find(domain);

    if (e) {
        ngx_queue_remove(&e->lru);
        ngx_queue_insert_head(&sg_sts.lru, &e->lru);
        return e;
    }

    /* bounded: the least recently used entries that no job uses go */

    if (sg_sts.nentries >= sg_sts.conf->cache_size) {
        q = ngx_queue_last(&sg_sts.lru);

        for (n = 0; n < SG_STS_EVICT_SCAN
                    && q != ngx_queue_sentinel(&sg_sts.lru); n++)
        {
            old = ngx_queue_data(q, sg_sts_entry_t, lru);
            q = ngx_queue_prev(q);

            if (old->pins == 0) {
                sg_sts_entry_free(old);
                break;
            }
        }
    }

    e = ngx_calloc(sizeof(sg_sts_entry_t) + domain->len + 1, sg_sts.log);
    if (e == NULL) {
        return NULL;
    }

    p = (u_char *) e + sizeof(sg_sts_entry_t);
    ngx_memcpy(p, domain->data, domain->len);
    p[domain->len] = '\0';

    e->sn.str.data = p;
    e->sn.str.len = domain->len;
    e->sn.node.key = ngx_crc32_short(p, domain->len);

    ngx_rbtree_insert(&sg_sts.tree, &e->sn.node);
    ngx_queue_insert_head(&sg_sts.lru, &e->lru);
    sg_sts.nentries++;

    return e;
}


static void
sg_sts_entry_clear(sg_sts_entry_t *e)
{
    if (e->pol) {
        sg_sts_pol_unref(e->pol);
        e->pol = NULL;
    }

    if (e->fail) {
        ngx_free(e->fail);
        e->fail = NULL;
    }

    e->checked_at = 0;
    e->negative_until = 0;
    e->hits = 0;
    e->refresh_next = 0;
}


static void
sg_sts_entry_free(sg_sts_entry_t *e)
{
    sg_sts_entry_clear(e);

    ngx_rbtree_delete(&sg_sts.tree, &e->sn.node);
    ngx_queue_remove(&e->lru);
    sg_sts.nentries--;

    ngx_free(e);
}


static void
sg_sts_entry_set_pol(sg_sts_entry_t *e, sg_sts_pol_t *pol)
{
    pol->refs++;

    if (e->pol) {
        sg_sts_pol_unref(e->pol);
    }

    e->pol = pol;
    e->hits = 0;
    e->refresh_next = 0;
    e->negative_until = 0;
}


/* jobs */


static sg_sts_job_t *
sg_sts_job_new(sg_sts_entry_t *e, sg_sts_job_kind_e kind)
{
    ngx_pool_t    *pool;
    sg_sts_job_t  *job;

    pool = ngx_create_pool(SG_STS_POOL_SIZE, sg_sts.log);
    if (pool == NULL) {
        return NULL;
    }

    job = ngx_pcalloc(pool, sizeof(sg_sts_job_t));
    if (job == NULL) {
        ngx_destroy_pool(pool);
        return NULL;
    }

    job->pool = pool;
    job->kind = kind;
    job->entry = e;
    job->txt = SG_STS_TXT_DNS_ERROR;

    if (sg_sts_str(pool, &job->domain, e->sn.str.data, e->sn.str.len)
        != NGX_OK)
    {
        ngx_destroy_pool(pool);
        return NULL;
    }

    if (kind == SG_STS_JOB_REFRESH) {
        job->trace = ngx_pcalloc(pool, sizeof(sg_sts_trace_t));
        if (job->trace == NULL) {
            ngx_destroy_pool(pool);
            return NULL;
        }

        job->trace->txt_rcode = -1;
    }

    ngx_queue_init(&job->waiters);
    ngx_queue_insert_tail(&sg_sts.jobs, &job->queue);

    e->pins++;

    if (kind == SG_STS_JOB_LOOKUP) {
        e->job = job;
    }

    return job;
}


static void
sg_sts_job_run(sg_sts_job_t *job)
{
    sg_sts_entry_t  *e;

    e = job->entry;

    /*
     * Redis first when this worker has no usable policy: another worker
     * or node may have fetched it.
     */

    if (!sg_sts_pol_valid(e->pol, ngx_time())
        && sg_sts_redis_read(job) == NGX_OK)
    {
        return;
    }

    sg_sts_job_txt(job);
}


static ngx_int_t
sg_sts_redis_read(sg_sts_job_t *job)
{
    ngx_int_t       rc;
    const char     *argv[4];
    size_t          argvlen[4];
    sg_sts_rctx_t  *rctx;
    u_char          keys[SG_STS_KEYS_LEN];

    job->redis_read = 1;

    if (sg_worker.redis == NULL) {
        return NGX_DECLINED;
    }

    argv[0] = "MGET";
    argvlen[0] = 4;

    if (sg_sts_keys(&job->domain, keys, &argv[1], &argvlen[1]) != NGX_OK) {
        return NGX_ERROR;
    }

    rctx = sg_sts_rctx_new(job, &job->domain, SG_STS_R_READ);
    if (rctx == NULL) {
        return NGX_ERROR;
    }

    rc = sg_redis_command_argv(sg_worker.redis, sg_sts_redis_got, rctx, 4,
                               argv, argvlen);
    if (rc != NGX_OK) {
        ngx_free(rctx);
        sg_sts_redis_problem(sg_redis_last_error(sg_worker.redis));
        return NGX_DECLINED;
    }

    job->rctx = rctx;

    return NGX_OK;
}


static void
sg_sts_redis_got(void *data, redisReply *reply, const char *err)
{
    sg_sts_rctx_t  *rctx = data;

    time_t           now;
    ngx_str_t        domain;
    ngx_uint_t       adopted;
    sg_sts_job_t    *job;
    sg_sts_entry_t  *e;

    job = rctx->job;
    domain.data = rctx->domain;
    domain.len = rctx->len;

    if (!sg_sts.on) {
        ngx_free(rctx);
        return;
    }

    if (err) {
        sg_sts_redis_problem(err);

    } else {
        sg_sts_redis_ok();
    }

    if (rctx->kind != SG_STS_R_READ) {
        /* a proactive refresh: GET before, SET NX after */

        e = sg_sts_entry_find(&domain);

        if (e == NULL || e->pins || e->pol == NULL) {
            ngx_free(rctx);
            return;
        }

        if (rctx->kind == SG_STS_R_ADOPT) {
            adopted = 0;

            if (err == NULL && reply->type == REDIS_REPLY_ARRAY
                && reply->elements == 3)
            {
                sg_sts_redis_merge(e, reply, &adopted);
            }

            if (adopted) {
                ngx_log_debug1(NGX_LOG_DEBUG_CORE, sg_sts.log, 0,
                               "sg sts: %V: refreshed elsewhere", &domain);
                ngx_free(rctx);
                return;
            }

            if (err) {
                /* Redis is down: every worker refreshes its memory */
                ngx_free(rctx);
                sg_sts_background(&e->sn.str);
                return;
            }

            rctx->kind = SG_STS_R_LOCK;

            {
                u_char      *p;
                const char  *argv[6];
                size_t       argvlen[6];
                u_char       key[sizeof(SG_STS_KEY_LOCK)
                                 + SG_STS_DOMAIN_MAX];

                p = ngx_cpymem(key, SG_STS_KEY_LOCK,
                               sizeof(SG_STS_KEY_LOCK) - 1);
                p = ngx_cpymem(p, domain.data, domain.len);

                argv[0] = "SET";
                argv[1] = (const char *) key;
                argv[2] = "1";
                argv[3] = "NX";
                argv[4] = "EX";
                argv[5] = SG_STS_LOCK_TTL;

                argvlen[0] = 3;
                argvlen[1] = p - key;
                argvlen[2] = 1;
                argvlen[3] = 2;
                argvlen[4] = 2;
                argvlen[5] = sizeof(SG_STS_LOCK_TTL) - 1;

                if (sg_redis_command_argv(sg_worker.redis, sg_sts_redis_got,
                                          rctx, 6, argv, argvlen)
                    != NGX_OK)
                {
                    ngx_free(rctx);
                    sg_sts_background(&e->sn.str);
                }
            }

            return;
        }

        /* SG_STS_R_LOCK: "OK" if ours, nil if another worker has it */

        ngx_free(rctx);

        if (err || reply->type == REDIS_REPLY_STATUS) {
            sg_sts_background(&e->sn.str);
            return;
        }

        /*
         * Another worker is fetching: look for its copy in Redis at the
         * next tick, not after the failure backoff, by which time a
         * short-lived policy may have expired here unrefreshed.
         */
        ngx_log_debug1(NGX_LOG_DEBUG_CORE, sg_sts.log, 0,
                       "sg sts: %V: refresh lock held elsewhere",
                       &e->sn.str);

        e->refresh_next = 0;

        return;
    }

    ngx_free(rctx);

    if (job == NULL) {
        /* the job ended first */
        return;
    }

    job->rctx = NULL;
    e = job->entry;
    now = ngx_time();

    if (err == NULL && reply->type == REDIS_REPLY_ARRAY
        && reply->elements == 3)
    {
        sg_sts_redis_merge(e, reply, &adopted);
        job->adopted = adopted ? 1 : 0;

        if (job->kind == SG_STS_JOB_LOOKUP && !sg_sts_pol_valid(e->pol, now)
            && e->negative_until > now)
        {
            sg_sts_job_outcome(job, NULL, SG_STS_SRC_NONE, NULL, "%s",
                               e->negative_why);
            sg_sts_job_finish(job);
            return;
        }
    }

    if (job->txt_done) {
        sg_sts_job_decide(job);
        return;
    }

    sg_sts_job_txt(job);
}


/*
 * MGET sg:mta-sts:<d> sg:mta-sts-none:<d> sg:mta-sts-fail:<d> into the
 * entry: a newer policy, a "no policy" and a newer failure.
 */

static void
sg_sts_redis_merge(sg_sts_entry_t *e, redisReply *reply,
    ngx_uint_t *adopted)
{
    time_t            now;
    json_t           *doc;
    int64_t           at, failed_at;
    redisReply       *v;
    const char       *why, *id, *rt;
    json_error_t      jerr;
    sg_sts_pol_t     *pol;
    sg_sts_record_t   rec;

    *adopted = 0;
    now = ngx_time();

    /* the policy */

    v = reply->element[0];

    if (v->type == REDIS_REPLY_STRING) {
        doc = json_loadb(v->str, v->len, 0, &jerr);

        if (doc == NULL || sg_sts_record_decode(doc, &rec, &why) != 0
            || ngx_strcmp(rec.domain, e->sn.str.data) != 0)
        {
            ngx_log_error(NGX_LOG_WARN, sg_sts.log, 0,
                          "sg: MTA-STS: %V: the policy cached in Redis is"
                          " ignored: %s", &e->sn.str,
                          doc ? why : "not JSON");

        } else if (rec.expires_at > now
                   && (e->pol == NULL
                       || !sg_sts_pol_valid(e->pol, now)
                       || rec.fetched_at > (int64_t) e->pol->fetched_at))
        {
            pol = sg_sts_pol_create(&e->sn.str, rec.id, rec.text,
                                    rec.text_len, (time_t) rec.fetched_at);
            if (pol) {
                sg_sts_entry_set_pol(e, pol);
                sg_sts_pol_unref(pol);
                e->checked_at = 0;
                *adopted = 1;
            }
        }

        json_decref(doc);
    }

    /* "no policy" */

    v = reply->element[1];

    if (v->type == REDIS_REPLY_STRING && !sg_sts_pol_valid(e->pol, now)) {
        doc = json_loadb(v->str, v->len, 0, &jerr);
        at = json_integer_value(json_object_get(doc, "at"));

        if (at > 0 && at + sg_sts.conf->negative_ttl > now) {
            e->negative_until = at + sg_sts.conf->negative_ttl;
            e->negative_why = "cached: no MTA-STS policy (Redis)";
        }

        json_decref(doc);
    }

    /* the last failure */

    v = reply->element[2];

    if (v->type == REDIS_REPLY_STRING) {
        doc = json_loadb(v->str, v->len, 0, &jerr);

        if (doc && sg_sts_failure_decode(doc, &id, &failed_at, &rt, &why)
                   == 0
            && (e->fail == NULL || failed_at > (int64_t) e->fail->failed_at))
        {
            if (e->fail == NULL) {
                e->fail = ngx_calloc(sizeof(sg_sts_fail_t), sg_sts.log);
            }

            if (e->fail) {
                ngx_cpystrn((u_char *) e->fail->id, (u_char *) id,
                            sizeof(e->fail->id));
                e->fail->failed_at = (time_t) failed_at;
                e->fail->result_type = rt;
                ngx_cpystrn(e->fail->reason, (u_char *) why,
                            SG_STS_REASON_MAX);
            }
        }

        json_decref(doc);
    }
}


/* RFC 8461, 3.1: TXT _mta-sts.<domain>, CNAMEs followed by sg_dns */

static void
sg_sts_job_txt(sg_sts_job_t *job)
{
    u_char     *p;
    ngx_str_t   name;

    name.len = sizeof("_mta-sts.") - 1 + job->domain.len;
    name.data = ngx_pnalloc(job->pool, name.len + 1);

    if (name.data == NULL) {
        job->dns = NULL;

    } else {
        p = ngx_cpymem(name.data, "_mta-sts.", sizeof("_mta-sts.") - 1);
        p = ngx_cpymem(p, job->domain.data, job->domain.len);
        *p = '\0';

        job->dns = sg_dns_query(&name, SG_STS_DNS_TXT, sg_sts_txt_done, job);
    }

    if (job->dns == NULL) {
        job->txt_done = 1;
        job->txt = SG_STS_TXT_DNS_ERROR;
        job->txt_why = "DNS is not available in this worker";

        if (job->trace) {
            job->trace->txt_done = 1;
            job->trace->txt_detail = job->txt_why;
        }

        sg_sts_job_decide(job);
    }
}


static void
sg_sts_txt_done(void *data, sg_dns_answer_t *answer)
{
    sg_sts_job_t  *job = data;

    size_t                i, n, nrec, nstr;
    u_char               *p;
    sg_sts_rc_e           rc;
    sg_sts_err_t          err;
    sg_sts_txt_t          recs[SG_STS_TXT_RECORDS_MAX];
    sg_sts_str_t          strs[SG_STS_TXT_RECORDS_MAX * 8];
    sg_sts_trace_t       *tr;
    sg_sts_txt_result_t   res;

    job->dns = NULL;
    job->txt_done = 1;
    tr = job->trace;

    if (tr) {
        tr->txt_done = 1;
        tr->txt_rcode = answer->rcode;
        (void) sg_sts_str(job->pool, &tr->txt_name, answer->canonname.data,
                          answer->canonname.len);
    }

    if (answer->rcode < 0 || answer->bogus) {
        job->txt = SG_STS_TXT_DNS_ERROR;
        job->txt_why = answer->bogus ? "the TXT answer is DNSSEC-bogus"
                                     : "the TXT lookup got no answer";
        goto done;
    }

    if (answer->rcode == 3) {
        job->txt = SG_STS_TXT_ABSENT;
        job->txt_why = "no TXT record (NXDOMAIN)";
        goto done;
    }

    if (answer->rcode != 0) {
        job->txt = SG_STS_TXT_DNS_ERROR;
        job->txt_why = "the TXT lookup failed (SERVFAIL or refused)";
        goto done;
    }

    if (answer->nrdata == 0) {
        job->txt = SG_STS_TXT_ABSENT;
        job->txt_why = "no TXT record";
        goto done;
    }

    /* RFC 1035, 3.3.14: character-strings, joined (RFC 8461, 3.1) */

    nrec = 0;
    nstr = 0;

    for (i = 0; i < answer->nrdata && nrec < SG_STS_TXT_RECORDS_MAX; i++) {
        if (sg_sts_txt_split(answer->rdata[i].data, answer->rdata[i].len,
                             strs + nstr,
                             sizeof(strs) / sizeof(strs[0]) - nstr, &n)
            != 0)
        {
            continue;
        }

        recs[nrec].strings = strs + nstr;
        recs[nrec].nstrings = n;
        nstr += n;
        nrec++;
    }

    if (tr && nrec) {
        tr->txt_records = ngx_pcalloc(job->pool, nrec * sizeof(ngx_str_t));

        for (i = 0; tr->txt_records && i < nrec; i++) {
            size_t  len = 0;

            for (n = 0; n < recs[i].nstrings; n++) {
                len += recs[i].strings[n].len;
            }

            p = ngx_pnalloc(job->pool, len + 1);
            if (p == NULL) {
                break;
            }

            tr->txt_records[i].data = p;

            for (n = 0; n < recs[i].nstrings; n++) {
                p = ngx_cpymem(p, recs[i].strings[n].data,
                               recs[i].strings[n].len);
            }

            *p = '\0';
            tr->txt_records[i].len = len;
            tr->ntxt_records++;
        }
    }

    rc = sg_sts_txt_parse(recs, nrec, &res, &err);

    if (rc == SG_STS_OK) {
        job->txt = SG_STS_TXT_FOUND;
        ngx_cpystrn((u_char *) job->txt_id, (u_char *) res.id,
                    sizeof(job->txt_id));
        job->txt_why = "one valid \"v=STSv1\" TXT record";

    } else if (rc == SG_STS_TXT_NO_RECORD) {
        job->txt = SG_STS_TXT_ABSENT;
        job->txt_why = sg_sts_strerror(rc);

    } else {
        job->txt = SG_STS_TXT_INVALID;
        job->txt_why = sg_sts_strerror(rc);
    }

done:

    if (tr) {
        tr->txt_ok = (job->txt == SG_STS_TXT_FOUND);
        tr->txt_detail = job->txt_why;

        if (tr->txt_ok) {
            (void) sg_sts_str(job->pool, &tr->txt_id, (u_char *) job->txt_id,
                              ngx_strlen(job->txt_id));
        }
    }

    ngx_destroy_pool(answer->pool);

    sg_sts_job_decide(job);
}


static void
sg_sts_job_decide(sg_sts_job_t *job)
{
    time_t                 now;
    sg_sts_entry_t        *e;
    sg_sts_decision_t      d;
    sg_sts_cache_state_t   view;

    e = job->entry;
    now = ngx_time();

    if (job->kind == SG_STS_JOB_REFRESH) {
        /* fetch whatever TXT said: a person wants to see every step */
        sg_sts_job_fetch(job);
        return;
    }

    if (job->kind == SG_STS_JOB_BACKGROUND) {
        if (job->txt == SG_STS_TXT_FOUND) {
            sg_sts_job_fetch(job);
            return;
        }

        /* no id to fetch for: the cached policy expires as it is */
        ngx_log_error(NGX_LOG_INFO, sg_sts.log, 0,
                      "sg: MTA-STS: %V: no proactive refresh: %s",
                      &job->domain, job->txt_why);
        sg_sts_job_finish(job);
        return;
    }

    ngx_memzero(&view, sizeof(view));

    if (e->pol) {
        view.id = (const char *) e->pol->id.data;
        view.expires_at = e->pol->expires_at;
    }

    if (e->fail) {
        view.failed_id = e->fail->id;
        view.failed_at = e->fail->failed_at;
    }

    sg_sts_decide(job->txt, job->txt_id, &view, now,
                  sg_sts.conf->failure_backoff, &d);

    switch (d.action) {

    case SG_STS_USE_CACHED:
        e->checked_at = now;
        e->hits++;
        sg_sts_job_outcome(job, e->pol, job->adopted ? SG_STS_SRC_REDIS
                                                      : SG_STS_SRC_MEMORY,
                           NULL, "%s", d.why);
        sg_sts_job_finish(job);
        return;

    case SG_STS_NO_POLICY:
        if (d.negative && sg_sts.conf->negative_ttl > 0) {
            e->negative_until = now + sg_sts.conf->negative_ttl;
            e->negative_why = d.why;
            sg_sts_redis_negative(&job->domain, d.why);
        }

        sg_sts_job_outcome(job, NULL, SG_STS_SRC_NONE, NULL, "%s (%s)",
                           d.why, job->txt_why);
        sg_sts_job_finish(job);
        return;

    case SG_STS_FAILED:
        sg_sts_job_outcome(job, NULL, SG_STS_SRC_NONE, e->fail->result_type,
                           "%s (no refetch of id %s before %T s have"
                           " passed)", e->fail->reason, e->fail->id,
                           sg_sts.conf->failure_backoff);
        sg_sts_job_finish(job);
        return;

    default: /* SG_STS_FETCH */

        /* another worker may have fetched this id: Redis first */

        if (!job->redis_read && sg_sts_redis_read(job) == NGX_OK) {
            return;
        }

        sg_sts_job_fetch(job);
        return;
    }
}


/* RFC 8461, 3.3: https://mta-sts.<domain>/.well-known/mta-sts.txt */

static void
sg_sts_job_fetch(sg_sts_job_t *job)
{
    u_char     *p;
    ngx_str_t   host;

    host.len = sizeof("mta-sts.") - 1 + job->domain.len;
    host.data = ngx_pnalloc(job->pool, host.len + 1);

    if (host.data == NULL) {
        sg_sts_job_failed(job, SG_STS_RT_FETCH_ERROR, "out of memory");
        return;
    }

    p = ngx_cpymem(host.data, "mta-sts.", sizeof("mta-sts.") - 1);
    p = ngx_cpymem(p, job->domain.data, job->domain.len);
    *p = '\0';

    if (job->trace) {
        job->trace->dns_host = host;
    }

    /* addresses from sg's own DNS, given to curl (CURLOPT_RESOLVE) */

    job->dns = sg_dns_route(&host, 0, sg_sts_route_done, job);

    if (job->dns == NULL) {
        if (job->trace) {
            job->trace->dns_done = 1;
            job->trace->dns_detail = "DNS is not available in this worker";
        }

        sg_sts_job_failed(job, SG_STS_RT_FETCH_ERROR,
                          "DNS is not available in this worker");
    }
}


static void
sg_sts_route_done(void *data, sg_dns_route_t *route)
{
    sg_sts_job_t  *job = data;

    u_char          *p;
    ngx_uint_t       i;
    sg_dns_host_t   *h;
    sg_http_get_t    get;
    sg_sts_trace_t  *tr;
    u_char           reason[SG_STS_REASON_MAX];

    job->dns = NULL;
    tr = job->trace;

    h = (route->status == SG_DNS_OK && route->nhosts) ? &route->hosts[0]
                                                       : NULL;

    if (tr) {
        tr->dns_done = 1;
        tr->dns_ok = (h && h->naddrs);
        tr->dns_detail = route->reason;

        if (h && h->naddrs) {
            tr->dns_addrs = ngx_pcalloc(job->pool,
                                        h->naddrs * sizeof(ngx_str_t));

            for (i = 0; tr->dns_addrs && i < h->naddrs; i++) {
                if (sg_sts_str(job->pool, &tr->dns_addrs[i],
                               h->addrs[i].name.data, h->addrs[i].name.len)
                    == NGX_OK)
                {
                    tr->ndns_addrs++;
                }
            }
        }

        if (tr->dns_detail) {
            p = ngx_pnalloc(job->pool, ngx_strlen(route->reason) + 1);
            if (p) {
                ngx_cpystrn(p, (u_char *) route->reason,
                            ngx_strlen(route->reason) + 1);
            }

            tr->dns_detail = (const char *) p;
        }
    }

    if (h == NULL || h->naddrs == 0) {
        ngx_snprintf(reason, sizeof(reason) - 1,
                     "mta-sts.%V has no address%s%s%Z", &job->domain,
                     route->reason ? ": " : "",
                     route->reason ? route->reason : "");

        ngx_destroy_pool(route->pool);
        sg_sts_job_failed(job, SG_STS_RT_FETCH_ERROR, (char *) reason);
        return;
    }

    ngx_memzero(&get, sizeof(sg_http_get_t));

    get.url.len = sizeof("https://mta-sts.") - 1 + job->domain.len
                  + sizeof(SG_STS_WELL_KNOWN) - 1;
    get.url.data = ngx_pnalloc(job->pool, get.url.len + 1);

    if (get.url.data == NULL) {
        ngx_destroy_pool(route->pool);
        sg_sts_job_failed(job, SG_STS_RT_FETCH_ERROR, "out of memory");
        return;
    }

    p = ngx_cpymem(get.url.data, "https://mta-sts.",
                   sizeof("https://mta-sts.") - 1);
    p = ngx_cpymem(p, job->domain.data, job->domain.len);
    p = ngx_cpymem(p, SG_STS_WELL_KNOWN, sizeof(SG_STS_WELL_KNOWN) - 1);
    *p = '\0';

    if (tr) {
        tr->https_url = get.url;
    }

    get.addrs = h->addrs;
    get.naddrs = h->naddrs;
    get.timeout = sg_sts.conf->fetch_timeout;
    get.max_body = SG_STS_POLICY_MAX;           /* RFC 8461, 3.3 */
    get.type_ok = sg_sts_content_type_ok;       /* RFC 8461, 3.2 */

    /* the addresses are copied into the request */
    job->http = sg_http_get(&get, sg_sts_fetched, job);

    ngx_destroy_pool(route->pool);

    if (job->http == NULL) {
        if (tr) {
            tr->https_done = 1;
            tr->https_detail = "HTTPS is not available in this worker";
        }

        sg_sts_job_failed(job, SG_STS_RT_FETCH_ERROR,
                          "HTTPS is not available in this worker");
    }
}


static void
sg_sts_fetched(void *data, sg_http_result_t *res)
{
    sg_sts_job_t  *job = data;

    time_t            now;
    ngx_str_t         text;
    ngx_uint_t        i;
    const char       *rt;
    sg_sts_pol_t     *pol;
    sg_sts_err_t      err;
    sg_sts_trace_t   *tr;
    sg_sts_policy_t   parsed;
    u_char            reason[SG_STS_REASON_MAX];

    job->http = NULL;
    tr = job->trace;
    now = ngx_time();

    sg_sts_trace_https(job, res);

    if (res->error != SG_HTTP_OK) {

        /* RFC 8460, 4.3.2.1 */

        switch (res->error) {
        case SG_HTTP_ERR_TLS_VERIFY:
            rt = SG_STS_RT_WEBPKI;
            break;
        case SG_HTTP_ERR_CONTENT_TYPE:
        case SG_HTTP_ERR_TOO_BIG:
            rt = SG_STS_RT_INVALID;
            break;
        default:
            rt = SG_STS_RT_FETCH_ERROR;
        }

        ngx_snprintf(reason, sizeof(reason) - 1,
                     "https://mta-sts.%V" SG_STS_WELL_KNOWN ": %s%Z",
                     &job->domain, res->reason ? res->reason : "failed");

        ngx_destroy_pool(res->pool);
        sg_sts_job_failed(job, rt, (char *) reason);
        return;
    }

    /* RFC 8461, 3.2 */

    if (sg_sts_policy_parse((char *) res->body.data, res->body.len, &parsed,
                            &err)
        != SG_STS_OK)
    {
        if (err.line) {
            ngx_snprintf(reason, sizeof(reason) - 1,
                         "the policy is not valid: line %uz: %s%Z", err.line,
                         sg_sts_strerror(err.rc));

        } else {
            ngx_snprintf(reason, sizeof(reason) - 1,
                         "the policy is not valid: %s%Z",
                         sg_sts_strerror(err.rc));
        }

        if (tr) {
            tr->parse_done = 1;
            if (sg_sts_str(job->pool, &text, reason, ngx_strlen(reason))
                == NGX_OK)
            {
                tr->parse_detail = (const char *) text.data;
            }

            (void) sg_sts_str(job->pool, &tr->parse_text, res->body.data,
                              res->body.len);
        }

        ngx_destroy_pool(res->pool);
        sg_sts_job_failed(job, SG_STS_RT_INVALID, (char *) reason);
        return;
    }

    if (tr) {
        tr->parse_done = 1;
        tr->parse_ok = 1;
        tr->parse_detail = parsed.max_age_clamped
                           ? "valid (max_age above 31557600 clamped)"
                           : "valid";
        tr->parse_mode = parsed.mode;
        tr->parse_max_age = parsed.max_age;
        (void) sg_sts_str(job->pool, &tr->parse_text, res->body.data,
                          res->body.len);

        tr->parse_mx = ngx_pcalloc(job->pool,
                                   (parsed.nmx + 1) * sizeof(ngx_str_t));

        for (i = 0; tr->parse_mx && i < parsed.nmx; i++) {
            if (sg_sts_str(job->pool, &tr->parse_mx[i],
                           (u_char *) parsed.mx[i].data, parsed.mx[i].len)
                == NGX_OK)
            {
                tr->nparse_mx++;
            }
        }
    }

    if (job->txt != SG_STS_TXT_FOUND) {
        /* a person asked (REFRESH): without an id nothing is cached */
        ngx_destroy_pool(res->pool);
        sg_sts_job_cached(job, job->txt_why);
        return;
    }

    pol = sg_sts_pol_create(&job->domain, job->txt_id,
                            (char *) res->body.data, res->body.len, now);

    ngx_destroy_pool(res->pool);

    if (pol == NULL) {
        sg_sts_job_failed(job, SG_STS_RT_FETCH_ERROR, "out of memory");
        return;
    }

    ngx_log_error(NGX_LOG_INFO, sg_sts.log, 0,
                  "sg: MTA-STS: %V: policy id %V fetched: mode %s,"
                  " max_age %T, %ui mx", &job->domain, &pol->id,
                  sg_sts_mode_name(pol->mode), pol->max_age, pol->nmx);

    sg_sts_entry_set_pol(job->entry, pol);
    job->entry->checked_at = now;

    /* a delivery uses it: worth a proactive refresh (a person's is not) */
    job->entry->hits = (job->kind == SG_STS_JOB_LOOKUP);

    if (job->entry->fail) {
        ngx_free(job->entry->fail);
        job->entry->fail = NULL;
    }

    sg_sts_redis_store(pol);

    sg_sts_job_outcome(job, pol, SG_STS_SRC_FETCHED, NULL,
                       "RFC 8461, 3.3: fetched from mta-sts.%V",
                       &job->domain);
    sg_sts_pol_unref(pol);

    sg_sts_job_finish(job);
}


static void
sg_sts_trace_https(sg_sts_job_t *job, sg_http_result_t *res)
{
    sg_sts_trace_t  *tr;
    sg_http_cert_t  *c;

    tr = job->trace;
    if (tr == NULL) {
        return;
    }

    tr->https_done = 1;
    tr->https_ok = (res->error == SG_HTTP_OK);
    tr->https_status = res->status;
    tr->https_error = res->error == SG_HTTP_OK
                      ? NULL : sg_http_error_name(res->error);
    tr->https_elapsed = res->elapsed;
    tr->https_size = res->body.len;

    (void) sg_sts_str(job->pool, &tr->https_content_type,
                      res->content_type.data, res->content_type.len);
    (void) sg_sts_str(job->pool, &tr->https_ip, res->primary_ip.data,
                      res->primary_ip.len);

    if (res->reason) {
        ngx_str_t  t;

        if (sg_sts_str(job->pool, &t, (u_char *) res->reason,
                       ngx_strlen(res->reason))
            == NGX_OK)
        {
            tr->https_detail = (const char *) t.data;
        }
    }

    c = &tr->cert;
    *c = res->cert;

    /* the strings live in res->pool: copies */
    (void) sg_sts_str(job->pool, &c->verify_text, res->cert.verify_text.data,
                      res->cert.verify_text.len);
    (void) sg_sts_str(job->pool, &c->subject, res->cert.subject.data,
                      res->cert.subject.len);
    (void) sg_sts_str(job->pool, &c->issuer, res->cert.issuer.data,
                      res->cert.issuer.len);
    (void) sg_sts_str(job->pool, &c->not_after, res->cert.not_after.data,
                      res->cert.not_after.len);
    (void) sg_sts_str(job->pool, &c->san, res->cert.san.data,
                      res->cert.san.len);
}


/*
 * A fetch failed.  RFC 8461, 3.3 and RFC-NOTES: the failure is remembered
 * per policy id (no refetch of that id before the backoff), and a cached
 * unexpired policy keeps applying.
 */

static void
sg_sts_job_failed(sg_sts_job_t *job, const char *result_type,
    const char *reason)
{
    time_t            now;
    ngx_str_t         text;
    sg_sts_fail_t    *fail;
    sg_sts_entry_t   *e;

    e = job->entry;
    now = ngx_time();

    if (job->trace) {
        job->trace->result_type = result_type;

        if (sg_sts_str(job->pool, &text, (u_char *) reason,
                       ngx_strlen(reason))
            == NGX_OK)
        {
            job->trace->reason = (const char *) text.data;
        }
    }

    ngx_log_error(NGX_LOG_NOTICE, sg_sts.log, 0,
                  "sg: MTA-STS: %V: policy fetch failed (%s): %s",
                  &job->domain, result_type, reason);

    if (job->txt == SG_STS_TXT_FOUND) {
        fail = e->fail;

        if (fail == NULL) {
            fail = ngx_calloc(sizeof(sg_sts_fail_t), sg_sts.log);
            e->fail = fail;
        }

        if (fail) {
            ngx_cpystrn((u_char *) fail->id, (u_char *) job->txt_id,
                        sizeof(fail->id));
            fail->failed_at = now;
            fail->result_type = result_type;
            ngx_cpystrn(fail->reason, (u_char *) reason, SG_STS_REASON_MAX);

            sg_sts_redis_fail(&job->domain, fail);
        }
    }

    if (sg_sts_pol_valid(e->pol, now)) {
        sg_sts_job_outcome(job, e->pol, job->adopted ? SG_STS_SRC_REDIS
                                                      : SG_STS_SRC_MEMORY,
                           NULL, "RFC 8461, 3.3: the refetch failed (%s),"
                           " the cached policy stays until it expires",
                           reason);

    } else {
        sg_sts_job_outcome(job, NULL, SG_STS_SRC_NONE, result_type, "%s",
                           reason);
    }

    sg_sts_job_finish(job);
}


/* the refresh of a person without a TXT id: what applies stays */

static void
sg_sts_job_cached(sg_sts_job_t *job, const char *why)
{
    sg_sts_entry_t  *e;

    e = job->entry;

    if (sg_sts_pol_valid(e->pol, ngx_time())) {
        sg_sts_job_outcome(job, e->pol, job->adopted ? SG_STS_SRC_REDIS
                                                      : SG_STS_SRC_MEMORY,
                           NULL, "RFC 8461, 3.1 and 5.1: %s; the cached"
                           " policy has not expired", why);

    } else {
        sg_sts_job_outcome(job, NULL, SG_STS_SRC_NONE, NULL,
                           "RFC 8461, 3.1: %s: no policy", why);
    }

    sg_sts_job_finish(job);
}


static void
sg_sts_job_outcome(sg_sts_job_t *job, sg_sts_pol_t *pol,
    sg_sts_source_e source, const char *result_type, const char *fmt, ...)
{
    u_char   *p;
    va_list   args;

    if (pol) {
        pol->refs++;
    }

    if (job->pol) {
        sg_sts_pol_unref(job->pol);
    }

    job->pol = pol;
    job->source = source;
    job->result_type = result_type;

    va_start(args, fmt);
    p = ngx_vslprintf(job->reason, job->reason + SG_STS_REASON_MAX - 1, fmt,
                      args);
    va_end(args);

    *p = '\0';
}


static void
sg_sts_job_finish(sg_sts_job_t *job)
{
    sg_sts_req_t          *req;
    sg_sts_answer_t       *a;
    sg_sts_answer_priv_t  *ap;

    ngx_log_debug4(NGX_LOG_DEBUG_CORE, sg_sts.log, 0,
                   "sg sts: %V: %s, %s: %s", &job->domain,
                   job->pol ? sg_sts_mode_name(job->pol->mode) : "no policy",
                   sg_sts_source_name(job->source), job->reason);

    while (!ngx_queue_empty(&job->waiters)) {
        req = ngx_queue_data(ngx_queue_head(&job->waiters), sg_sts_req_t,
                             queue);

        a = sg_sts_answer_new(&job->domain, job->pol, job->source,
                              job->result_type, (const char *) job->reason);

        if (a && job->trace && job->pool) {
            /* the trace lives in the job's pool: the answer takes it */
            ap = (sg_sts_answer_priv_t *) a;
            a->trace = job->trace;
            ap->pool = job->pool;
            job->pool = NULL;
            job->trace = NULL;
        }

        sg_sts_req_answer(req, a);
    }

    sg_sts_job_free(job);
}


static void
sg_sts_job_free(sg_sts_job_t *job)
{
    sg_sts_entry_t  *e;

    if (job->dns) {
        sg_dns_cancel(job->dns);
        job->dns = NULL;
    }

    if (job->http) {
        sg_http_cancel(job->http);
        job->http = NULL;
    }

    if (job->rctx) {
        /* its reply comes later and finds no job */
        job->rctx->job = NULL;
        job->rctx = NULL;
    }

    e = job->entry;

    if (e) {
        if (e->job == job) {
            e->job = NULL;
        }

        e->pins--;
    }

    if (job->pol) {
        sg_sts_pol_unref(job->pol);
        job->pol = NULL;
    }

    ngx_queue_remove(&job->queue);

    if (job->pool) {
        ngx_destroy_pool(job->pool);
    }
}


/* Redis writes: answered by sg_sts_redis_done(), which only looks */


static void
sg_sts_redis_store(sg_sts_pol_t *pol)
{
    char             *json;
    u_char           *p;
    time_t            now;
    ngx_uint_t        i;
    const char       *argv[5];
    size_t            argvlen[5];
    sg_sts_policy_t   parsed;
    u_char            key[sizeof(SG_STS_KEY_FAIL) + SG_STS_DOMAIN_MAX];
    u_char            key2[sizeof(SG_STS_KEY_NONE) + SG_STS_DOMAIN_MAX];
    u_char            key3[sizeof(SG_STS_KEY_POLICY) + SG_STS_DOMAIN_MAX];
    u_char            at[NGX_TIME_T_LEN + 1];

    if (sg_worker.redis == NULL) {
        return;
    }

    now = ngx_time();

    ngx_memzero(&parsed, sizeof(parsed));
    parsed.mode = pol->mode;
    parsed.max_age = (uint32_t) pol->max_age;
    parsed.nmx = ngx_min(pol->nmx, SG_STS_MX_MAX);

    for (i = 0; i < parsed.nmx; i++) {
        parsed.mx[i].data = (const char *) pol->mx[i].data;
        parsed.mx[i].len = pol->mx[i].len;
    }

    /* the failure and "no policy" keys go with a fetched policy */

    argv[0] = "DEL";
    argvlen[0] = 3;
    p = ngx_cpymem(key, SG_STS_KEY_FAIL, sizeof(SG_STS_KEY_FAIL) - 1);
    p = ngx_cpymem(p, pol->domain.data, pol->domain.len);
    argv[1] = (const char *) key;
    argvlen[1] = p - key;
    p = ngx_cpymem(key2, SG_STS_KEY_NONE, sizeof(SG_STS_KEY_NONE) - 1);
    p = ngx_cpymem(p, pol->domain.data, pol->domain.len);
    argv[2] = (const char *) key2;
    argvlen[2] = p - key2;

    if (sg_redis_command_argv(sg_worker.redis, sg_sts_redis_done, NULL, 3,
                              argv, argvlen)
        != NGX_OK)
    {
        sg_sts_redis_problem(sg_redis_last_error(sg_worker.redis));
        return;
    }

    p = ngx_cpymem(key3, SG_STS_KEY_POLICY, sizeof(SG_STS_KEY_POLICY) - 1);
    p = ngx_cpymem(p, pol->domain.data, pol->domain.len);
    argv[1] = (const char *) key3;
    argvlen[1] = p - key3;

    if (pol->expires_at <= now) {
        /* max_age 0: it applied to this lookup only */
        argv[0] = "DEL";
        argvlen[0] = 3;
        (void) sg_redis_command_argv(sg_worker.redis, sg_sts_redis_done,
                                     NULL, 2, argv, argvlen);
        return;
    }

    json = sg_sts_record_encode((const char *) pol->domain.data,
                                (const char *) pol->id.data,
                                (const char *) pol->text.data,
                                pol->text.len, pol->fetched_at, &parsed);
    if (json == NULL) {
        ngx_log_error(NGX_LOG_WARN, sg_sts.log, 0,
                      "sg: MTA-STS: %V: the policy cannot be cached in"
                      " Redis (not UTF-8 or out of memory)", &pol->domain);
        return;
    }

    /* RFC 8461, 3.3: cached until max_age has passed since the fetch */

    argv[0] = "SET";
    argvlen[0] = 3;
    argv[2] = json;
    argvlen[2] = ngx_strlen(json);
    argv[3] = "EXAT";
    argvlen[3] = 4;
    argv[4] = (const char *) at;
    argvlen[4] = ngx_sprintf(at, "%T", pol->expires_at) - at;

    (void) sg_redis_command_argv(sg_worker.redis, sg_sts_redis_done, NULL, 5,
                                 argv, argvlen);

    free(json);
}


static void
sg_sts_redis_fail(ngx_str_t *domain, sg_sts_fail_t *fail)
{
    char  *json;

    if (sg_worker.redis == NULL || sg_sts.conf->failure_backoff <= 0) {
        return;
    }

    json = sg_sts_failure_encode(fail->id, fail->failed_at,
                                 fail->result_type, (char *) fail->reason);
    if (json == NULL) {
        return;
    }

    sg_sts_redis_setex(SG_STS_KEY_FAIL, sizeof(SG_STS_KEY_FAIL) - 1, domain,
                       json, sg_sts.conf->failure_backoff);

    free(json);
}


static void
sg_sts_redis_negative(ngx_str_t *domain, const char *why)
{
    char  *json;

    if (sg_worker.redis == NULL) {
        return;
    }

    json = sg_sts_negative_encode(why, ngx_time());
    if (json == NULL) {
        return;
    }

    sg_sts_redis_setex(SG_STS_KEY_NONE, sizeof(SG_STS_KEY_NONE) - 1, domain,
                       json, sg_sts.conf->negative_ttl);

    free(json);
}


/* SET <prefix><domain> value EX ttl */

static void
sg_sts_redis_setex(const char *prefix, size_t len, ngx_str_t *domain,
    const char *value, time_t ttl)
{
    u_char      *p;
    const char  *argv[5];
    size_t       argvlen[5];
    u_char       key[sizeof(SG_STS_KEY_FAIL) + SG_STS_DOMAIN_MAX];
    u_char       ttlbuf[NGX_TIME_T_LEN + 1];

    if (len + domain->len > sizeof(key)) {
        return;
    }

    p = ngx_cpymem(key, prefix, len);
    p = ngx_cpymem(p, domain->data, domain->len);

    argv[0] = "SET";
    argvlen[0] = 3;
    argv[1] = (const char *) key;
    argvlen[1] = p - key;
    argv[2] = value;
    argvlen[2] = ngx_strlen(value);
    argv[3] = "EX";
    argvlen[3] = 2;
    argv[4] = (const char *) ttlbuf;
    argvlen[4] = ngx_sprintf(ttlbuf, "%T", ttl) - ttlbuf;

    if (sg_redis_command_argv(sg_worker.redis, sg_sts_redis_done, NULL, 5,
                              argv, argvlen)
        != NGX_OK)
    {
        sg_sts_redis_problem(sg_redis_last_error(sg_worker.redis));
    }
}


static void
sg_sts_redis_done(void *data, redisReply *reply, const char *err)
{
    if (!sg_sts.on) {
        return;
    }

    if (err) {
        sg_sts_redis_problem(err);
        return;
    }

    sg_sts_redis_ok();
}


/* DESIGN.md: with Redis down sg keeps working, and says so once */

static void
sg_sts_redis_problem(const char *err)
{
    if (sg_sts.redis_down || sg_worker.redis == NULL) {
        return;
    }

    sg_sts.redis_down = 1;

    ngx_log_error(NGX_LOG_WARN, sg_sts.log, 0,
                  "sg: MTA-STS: Redis is unavailable (%s): policies are"
                  " fetched directly and cached in this worker's memory",
                  err && err[0] ? err : "not connected");
}


static void
sg_sts_redis_ok(void)
{
    if (!sg_sts.redis_down) {
        return;
    }

    sg_sts.redis_down = 0;

    ngx_log_error(NGX_LOG_NOTICE, sg_sts.log, 0,
                  "sg: MTA-STS: Redis is available again: policies are"
                  " shared through it");
}


static sg_sts_rctx_t *
sg_sts_rctx_new(sg_sts_job_t *job, ngx_str_t *domain, sg_sts_r_kind_e kind)
{
    sg_sts_rctx_t  *rctx;

    rctx = ngx_calloc(sizeof(sg_sts_rctx_t) + domain->len, sg_sts.log);
    if (rctx == NULL) {
        return NULL;
    }

    rctx->job = job;
    rctx->kind = kind;
    rctx->len = domain->len;
    ngx_memcpy(rctx->domain, domain->data, domain->len);

    return rctx;
}


/*
 * Proactive refresh (RFC 8461, 5.1), once per cluster: policies used since
 * they were fetched and close to expiry are fetched again by the worker
 * that takes sg:mta-sts-lock:<domain> (SET NX EX 300), after checking
 * that no other worker has done it already.  Without Redis every worker
 * refreshes its own memory.
 */

static void
sg_sts_timer_handler(ngx_event_t *ev)
{
    time_t           now;
    ngx_uint_t       started;
    ngx_queue_t     *q, *next;
    sg_sts_entry_t  *e;

    now = ngx_time();
    started = 0;

    for (q = ngx_queue_head(&sg_sts.lru);
         q != ngx_queue_sentinel(&sg_sts.lru)
         && started < SG_STS_REFRESH_PER_TICK;
         q = next)
    {
        next = ngx_queue_next(q);
        e = ngx_queue_data(q, sg_sts_entry_t, lru);

        if (e->pins || e->hits == 0 || !sg_sts_pol_valid(e->pol, now)
            || now < e->refresh_next
            || now < sg_sts_refresh_due(e->pol->fetched_at,
                                        (uint32_t) e->pol->max_age))
        {
            continue;
        }

        e->refresh_next = now + ngx_max(sg_sts.conf->failure_backoff, 1);
        started++;

        sg_sts_refresh_start(e);
    }

    if (!ngx_exiting && sg_sts.conf->refresh_interval > 0) {
        ngx_add_timer(&sg_sts.timer, sg_sts.conf->refresh_interval * 1000);
    }
}


static void
sg_sts_refresh_start(sg_sts_entry_t *e)
{
    const char     *argv[4];
    size_t          argvlen[4];
    sg_sts_rctx_t  *rctx;
    u_char          keys[SG_STS_KEYS_LEN];

    if (sg_worker.redis == NULL || !sg_redis_up(sg_worker.redis)) {
        sg_sts_background(&e->sn.str);
        return;
    }

    argv[0] = "MGET";
    argvlen[0] = 4;

    if (sg_sts_keys(&e->sn.str, keys, &argv[1], &argvlen[1]) != NGX_OK) {
        return;
    }

    rctx = sg_sts_rctx_new(NULL, &e->sn.str, SG_STS_R_ADOPT);
    if (rctx == NULL) {
        return;
    }

    if (sg_redis_command_argv(sg_worker.redis, sg_sts_redis_got, rctx, 4,
                              argv, argvlen)
        != NGX_OK)
    {
        ngx_free(rctx);
        sg_sts_redis_problem(sg_redis_last_error(sg_worker.redis));
        sg_sts_background(&e->sn.str);
    }
}


static void
sg_sts_background(ngx_str_t *domain)
{
    sg_sts_job_t    *job;
    sg_sts_entry_t  *e;

    e = sg_sts_entry_find(domain);

    if (e == NULL || e->pins) {
        return;
    }

    ngx_log_error(NGX_LOG_INFO, sg_sts.log, 0,
                  "sg: MTA-STS: %V: proactive refresh of policy id %V",
                  domain, e->pol ? &e->pol->id : &e->sn.str);

    job = sg_sts_job_new(e, SG_STS_JOB_BACKGROUND);
    if (job == NULL) {
        return;
    }

    /* a proactive refresh starts with TXT: Redis was read just now */
    job->redis_read = 1;
    sg_sts_job_txt(job);
}


/* NOTIFY sg_mta_sts '<domain>': the admin API evicted it */

static void
sg_sts_notify(void *data, const char *channel, const char *payload)
{
    ngx_str_t  d;

    if (!sg_sts.on) {
        return;
    }

    if (payload == NULL) {
        /* the LISTEN connection is back: evictions may have been missed */
        sg_sts_forget(NULL);
        return;
    }

    d.data = (u_char *) payload;
    d.len = ngx_strlen(payload);

    ngx_log_error(NGX_LOG_INFO, sg_sts.log, 0,
                  "sg: MTA-STS: %V evicted from this worker's memory", &d);

    sg_sts_forget(&d);
}


static ngx_int_t
sg_sts_str(ngx_pool_t *pool, ngx_str_t *dst, u_char *src, size_t len)
{
    dst->data = ngx_pnalloc(pool, len + 1);
    if (dst->data == NULL) {
        dst->len = 0;
        return NGX_ERROR;
    }

    if (len) {
        ngx_memcpy(dst->data, src, len);
    }

    dst->data[len] = '\0';
    dst->len = len;

    return NGX_OK;
}
