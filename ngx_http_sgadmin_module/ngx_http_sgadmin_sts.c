/*
 * sg: /api/v1/mta-sts/policies — the MTA-STS policy cache (common/sg_sts.c,
 * redis/README.md).
 *
 *   GET    /mta-sts/policies            the policies cached in Redis
 *   GET    /mta-sts/policies/{domain}   one of them (404 if none); with
 *                                       Redis down, this worker's memory
 *          ?lookup=1                    the lookup delivery makes
 *                                       (sg_sts_lookup: memory, Redis,
 *                                       TXT, fetch as the rules say)
 *          ?refresh=1                   fetch now and say what happened at
 *                                       each step (sg_sts_refresh)
 *          ?bench=N[&from=redis][&mx=H] N lookups in a row, one at a time,
 *                                       each checking MX H: the cost of a
 *                                       cached decision (admin role;
 *                                       bench/sts_bench.py)
 *   DELETE /mta-sts/policies/{domain}   evict: the Redis keys, then
 *                                       NOTIFY sg_mta_sts '<domain>' (every
 *                                       worker's memory), audited
 *
 * The GETs are open to read-only tokens: ?lookup=1 and ?refresh=1 cache
 * only what a delivery would cache.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"
#include "sg_mta_sts.h"
#include "sg_sts_cache.h"
#include "sg_sts.h"


#define NGX_HTTP_SGADMIN_STS_BENCH_MAX  1000000

/* what sg does while Redis is down */
#define NGX_HTTP_SGADMIN_STS_FALLBACK                                        \
    "MTA-STS policies are fetched directly and kept by each worker in its"   \
    " memory until Redis is back"


/* GET the policy, DEL the three keys of a domain; {old value, count} */

static const char  ngx_http_sgadmin_sts_evict_lua[] =
    "local v = redis.call('GET', KEYS[1]) "
    "local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) "
    "return {v, n}";

/* $4 domain, $5 the Redis value (JSON) or NULL, $6 audit it */

static const char  ngx_http_sgadmin_sts_delete_sql[] =
    "WITH aud AS ("
    "  INSERT INTO audit_log (actor, actor_token_id, action, object, old,"
    "                         new, client)"
    "  SELECT $1, $2::bigint, 'mta_sts.delete', 'mta_sts:' || $4,"
    "    $5::jsonb, NULL, $3"
    "  WHERE $6::boolean"
    ")"
    " SELECT pg_notify('" SG_STS_CHANNEL "', $4)::text";


typedef struct {
    ngx_http_sgadmin_ctx_t       *ctx;
    ngx_str_t                     domain;      /* NUL-terminated */
    sg_sts_req_t                 *sts;

    /* ?bench=N */
    ngx_uint_t                    bench_n;
    ngx_uint_t                    bench_done;
    ngx_uint_t                    bench_sources[4];   /* sg_sts_source_e */
    ngx_uint_t                    bench_matched;
    ngx_str_t                     bench_mx;
    struct timespec               bench_start;
    unsigned                      bench_redis:1;

    /* DELETE */
    char                         *old;
    const char                   *redis_err;
    unsigned                      deleted:1;
} ngx_http_sgadmin_sts_t;


static ngx_http_sgadmin_sts_t *ngx_http_sgadmin_sts_create(
    ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx);
static void ngx_http_sgadmin_sts_cleanup(void *data);
static json_t *ngx_http_sgadmin_sts_item(ngx_str_t *key, redisReply *v);
static json_t *ngx_http_sgadmin_sts_record(const char *data, size_t len,
    ngx_uint_t full);
static void ngx_http_sgadmin_sts_got(void *data, redisReply *reply,
    const char *err);
static void ngx_http_sgadmin_sts_memory(ngx_http_sgadmin_sts_t *st,
    const char *err);
static void ngx_http_sgadmin_sts_answered(void *data,
    sg_sts_answer_t *answer);
static void ngx_http_sgadmin_sts_bench(ngx_http_sgadmin_sts_t *st);
static void ngx_http_sgadmin_sts_bench_answered(void *data,
    sg_sts_answer_t *answer);
static json_t *ngx_http_sgadmin_sts_answer_json(sg_sts_answer_t *a);
static json_t *ngx_http_sgadmin_sts_trace_json(sg_sts_trace_t *t);
static json_t *ngx_http_sgadmin_sts_strs(ngx_str_t *s, ngx_uint_t n);
static json_t *ngx_http_sgadmin_sts_str(ngx_str_t *s);
static json_t *ngx_http_sgadmin_sts_time(int64_t t);
static void ngx_http_sgadmin_sts_evicted(void *data, redisReply *reply,
    const char *err);
static void ngx_http_sgadmin_sts_notify(ngx_http_sgadmin_sts_t *st);
static void ngx_http_sgadmin_sts_notified(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static void ngx_http_sgadmin_sts_invalid(ngx_http_request_t *r,
    const char *field, const char *message);


/* GET /api/v1/mta-sts/policies */

void
ngx_http_sgadmin_sts_list(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_http_sgadmin_redis_list(r, SG_STS_KEY_POLICY,
                                ngx_http_sgadmin_sts_item,
                                NGX_HTTP_SGADMIN_STS_FALLBACK);
}


static ngx_http_sgadmin_sts_t *
ngx_http_sgadmin_sts_create(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    size_t                   len;
    const char              *msg;
    ngx_pool_cleanup_t      *cln;
    ngx_http_sgadmin_sts_t  *st;
    u_char                   buf[SG_STS_DOMAIN_MAX + 1];

    st = ngx_pcalloc(r->pool, sizeof(ngx_http_sgadmin_sts_t));
    cln = ngx_pool_cleanup_add(r->pool, 0);

    if (st == NULL || cln == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NULL;
    }

    st->ctx = ctx;

    /* a lookup still running when the request ends goes with it */
    cln->handler = ngx_http_sgadmin_sts_cleanup;
    cln->data = st;

    msg = sg_sts_domain(&ctx->param, buf, sizeof(buf), &len);
    if (msg) {
        ngx_http_sgadmin_sts_invalid(r, "domain", msg);
        return NULL;
    }

    st->domain.data = ngx_pnalloc(r->pool, len + 1);
    if (st->domain.data == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return NULL;
    }

    ngx_memcpy(st->domain.data, buf, len + 1);
    st->domain.len = len;

    return st;
}


static void
ngx_http_sgadmin_sts_cleanup(void *data)
{
    ngx_http_sgadmin_sts_t  *st = data;

    if (st->sts) {
        sg_sts_cancel(st->sts);
        st->sts = NULL;
    }
}


static json_t *
ngx_http_sgadmin_sts_item(ngx_str_t *key, redisReply *v)
{
    return ngx_http_sgadmin_sts_record(v->str, v->len, 0);
}


/*
 * A Redis value as an item: {"id", "domain", "policy_id", "mode", "mx",
 * "max_age", "fetched_at", "expires_at"} (+ "text" when full).  What the
 * value says is checked as when sg reads it for delivery.
 */

static json_t *
ngx_http_sgadmin_sts_record(const char *data, size_t len, ngx_uint_t full)
{
    json_t           *doc, *item, *mx;
    size_t            i;
    const char       *why;
    json_error_t      jerr;
    sg_sts_record_t   rec;

    doc = json_loadb(data, len, 0, &jerr);
    if (doc == NULL) {
        return NULL;
    }

    if (sg_sts_record_decode(doc, &rec, &why) != 0) {
        json_decref(doc);
        return NULL;
    }

    mx = json_array();
    for (i = 0; mx && i < rec.policy.nmx; i++) {
        json_array_append_new(mx, json_stringn(rec.policy.mx[i].data,
                                               rec.policy.mx[i].len));
    }

    item = json_pack("{s:s,s:s,s:s,s:s,s:o,s:I,s:o,s:o}",
                     "id", rec.domain,
                     "domain", rec.domain,
                     "policy_id", rec.id,
                     "mode", sg_sts_mode_name(rec.policy.mode),
                     "mx", mx ? mx : json_array(),
                     "max_age", (json_int_t) rec.policy.max_age,
                     "fetched_at", ngx_http_sgadmin_sts_time(rec.fetched_at),
                     "expires_at", ngx_http_sgadmin_sts_time(rec.expires_at));

    if (item && full) {
        json_object_set_new(item, "text",
                            json_stringn(rec.text, rec.text_len));
    }

    json_decref(doc);

    return item;
}


/* GET /api/v1/mta-sts/policies/{domain} */

void
ngx_http_sgadmin_sts_get(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_int_t                rc;
    ngx_str_t                arg;
    ngx_int_t                n;
    ngx_uint_t               refresh, lookup, bench, from_redis;
    const char              *argv[4];
    size_t                   argvlen[4];
    ngx_http_sgadmin_sts_t  *st;
    u_char                   keys[SG_STS_KEYS_LEN];

    refresh = 0;
    lookup = 0;
    bench = 0;
    from_redis = 0;

    if (ngx_http_arg(r, (u_char *) "refresh", 7, &arg) == NGX_OK) {
        if (arg.len != 1 || (arg.data[0] != '0' && arg.data[0] != '1')) {
            ngx_http_sgadmin_sts_invalid(r, "refresh", "must be 0 or 1");
            return;
        }

        refresh = arg.data[0] - '0';
    }

    if (ngx_http_arg(r, (u_char *) "lookup", 6, &arg) == NGX_OK) {
        if (arg.len != 1 || (arg.data[0] != '0' && arg.data[0] != '1')) {
            ngx_http_sgadmin_sts_invalid(r, "lookup", "must be 0 or 1");
            return;
        }

        lookup = arg.data[0] - '0';
    }

    if (ngx_http_arg(r, (u_char *) "bench", 5, &arg) == NGX_OK) {
        n = ngx_atoi(arg.data, arg.len);

        if (n < 1 || n > NGX_HTTP_SGADMIN_STS_BENCH_MAX) {
            ngx_http_sgadmin_sts_invalid(r, "bench",
                                         "must be from 1 to 1000000");
            return;
        }

        /* it holds a worker busy: admins only */
        if (ctx->role != NGX_HTTP_SGADMIN_ROLE_ADMIN) {
            ngx_http_sgadmin_problem(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                     "?bench needs the admin role", NULL);
            return;
        }

        bench = (ngx_uint_t) n;

        if (ngx_http_arg(r, (u_char *) "from", 4, &arg) == NGX_OK) {
            if (arg.len == 5 && ngx_strncmp(arg.data, "redis", 5) == 0) {
                from_redis = 1;

            } else if (arg.len != 6
                       || ngx_strncmp(arg.data, "memory", 6) != 0)
            {
                ngx_http_sgadmin_sts_invalid(r, "from",
                                             "must be memory or redis");
                return;
            }
        }
    }

    st = ngx_http_sgadmin_sts_create(r, ctx);
    if (st == NULL) {
        return;
    }

    if (bench) {
        st->bench_n = bench;
        st->bench_redis = from_redis;

        if (ngx_http_arg(r, (u_char *) "mx", 2, &arg) == NGX_OK) {
            st->bench_mx = arg;
        }

        (void) clock_gettime(CLOCK_MONOTONIC, &st->bench_start);
        ngx_http_sgadmin_sts_bench(st);
        return;
    }

    if (refresh || lookup) {
        st->sts = refresh
                  ? sg_sts_refresh(&st->domain,
                                   ngx_http_sgadmin_sts_answered, st)
                  : sg_sts_lookup(&st->domain,
                                  ngx_http_sgadmin_sts_answered, st);

        if (st->sts == NULL) {
            ngx_http_sgadmin_problem(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                     "mta-sts-unavailable",
                                     "MTA-STS lookups are not available in"
                                     " this worker (see the error log)",
                                     NULL);
        }

        return;
    }

    /* the cache: Redis, or this worker's memory when Redis is down */

    argv[0] = "MGET";
    argvlen[0] = 4;

    if (sg_sts_keys(&st->domain, keys, &argv[1], &argvlen[1]) != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "the domain is too long", NULL);
        return;
    }

    rc = sg_worker.redis
         ? sg_redis_command_argv(sg_worker.redis, ngx_http_sgadmin_sts_got,
                                 st, 4, argv, argvlen)
         : NGX_DECLINED;

    if (rc != NGX_OK) {
        ngx_http_sgadmin_sts_memory(st, sg_redis_last_error(sg_worker.redis));
    }
}


static void
ngx_http_sgadmin_sts_got(void *data, redisReply *reply, const char *err)
{
    ngx_http_sgadmin_sts_t  *st = data;

    json_t              *item, *doc, *fail;
    int64_t              failed_at;
    const char          *id, *rt, *why;
    json_error_t         jerr;
    ngx_http_request_t  *r;

    r = st->ctx->request;

    if (err) {
        ngx_http_sgadmin_sts_memory(st, err);
        return;
    }

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 3) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "Redis gave an unexpected reply",
                                 NULL);
        return;
    }

    /* the last failed fetch, if Redis still remembers it */

    fail = json_null();

    if (reply->element[2]->type == REDIS_REPLY_STRING) {
        doc = json_loadb(reply->element[2]->str, reply->element[2]->len, 0,
                         &jerr);

        if (doc && sg_sts_failure_decode(doc, &id, &failed_at, &rt, &why)
                   == 0)
        {
            fail = json_pack("{s:s,s:o,s:s,s:s}", "policy_id", id,
                             "failed_at",
                             ngx_http_sgadmin_sts_time(failed_at),
                             "result_type", rt, "reason", why);
        }

        json_decref(doc);
    }

    item = NULL;

    if (reply->element[0]->type == REDIS_REPLY_STRING) {
        item = ngx_http_sgadmin_sts_record(reply->element[0]->str,
                                           reply->element[0]->len, 1);
    }

    if (item == NULL) {
        json_decref(fail);

        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 reply->element[1]->type
                                 == REDIS_REPLY_STRING
                                 ? "no MTA-STS policy is cached: \"no"
                                   " policy\" is (the domain publishes"
                                   " none)"
                                 : "no MTA-STS policy is cached for this"
                                   " domain", NULL);
        return;
    }

    json_object_set_new(item, "source", json_string("redis"));
    json_object_set_new(item, "last_failure", fail ? fail : json_null());

    ngx_http_sgadmin_send_json(r, NGX_HTTP_OK, item);
    json_decref(item);
}


/* Redis is down: what this worker keeps in memory */

static void
ngx_http_sgadmin_sts_memory(ngx_http_sgadmin_sts_t *st, const char *err)
{
    json_t              *body;
    sg_sts_answer_t     *a;
    ngx_http_request_t  *r;

    r = st->ctx->request;

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "sgadmin: %V: redis unavailable (%s): answering from this"
                  " worker's memory", &r->uri,
                  err && err[0] ? err : "not connected");

    a = sg_sts_peek(&st->domain);

    if (a == NULL) {
        ngx_http_sgadmin_redis_down(r, err, NGX_HTTP_SGADMIN_STS_FALLBACK,
                                    "; this worker has no policy for the"
                                    " domain in memory");
        return;
    }

    body = ngx_http_sgadmin_sts_answer_json(a);
    sg_sts_release(a);

    if (body == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    json_object_set_new(body, "last_failure", json_null());

    ngx_http_sgadmin_send_json(r, NGX_HTTP_OK, body);
    json_decref(body);
}


/* ?lookup=1 and ?refresh=1 */

static void
ngx_http_sgadmin_sts_answered(void *data, sg_sts_answer_t *answer)
{
    ngx_http_sgadmin_sts_t  *st = data;

    json_t              *body, *policy;
    ngx_http_request_t  *r;

    st->sts = NULL;
    r = st->ctx->request;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "sgadmin: MTA-STS %V: %s%s%s: %s", &answer->domain,
                  sg_sts_mode_name(answer->mode),
                  answer->result_type ? ", " : "",
                  answer->result_type ? answer->result_type : "",
                  answer->reason);

    policy = (answer->id.len || answer->mode != SG_STS_NONE)
             ? ngx_http_sgadmin_sts_answer_json(answer) : json_null();

    if (answer->trace) {
        body = json_pack("{s:s%,s:o,s:o,s:o,s:s}",
                         "domain", (char *) answer->domain.data,
                         answer->domain.len,
                         "steps",
                         ngx_http_sgadmin_sts_trace_json(answer->trace),
                         "policy", policy,
                         "result_type",
                         answer->trace->result_type
                         ? json_string(answer->trace->result_type)
                         : json_null(),
                         "reason", answer->reason);

    } else {
        body = json_pack("{s:s%,s:s,s:o,s:o,s:s,s:s}",
                         "domain", (char *) answer->domain.data,
                         answer->domain.len,
                         "mode", sg_sts_mode_name(answer->mode),
                         "policy", policy,
                         "result_type",
                         answer->result_type
                         ? json_string(answer->result_type) : json_null(),
                         "source", sg_sts_source_name(answer->source),
                         "reason", answer->reason);
    }

    sg_sts_release(answer);

    if (body == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    ngx_http_sgadmin_send_json(r, NGX_HTTP_OK, body);
    json_decref(body);
}


/*
 * ?bench=N: N lookups one after another, each started when the previous
 * one is answered, as delivery asks them; from=redis makes this worker
 * forget the domain before each, so that each one reads Redis (and, as
 * any lookup that takes a policy from Redis, confirms the TXT id).
 */

static void
ngx_http_sgadmin_sts_bench(ngx_http_sgadmin_sts_t *st)
{
    if (st->bench_redis) {
        sg_sts_forget(&st->domain);
    }

    st->sts = sg_sts_lookup(&st->domain, ngx_http_sgadmin_sts_bench_answered,
                            st);

    if (st->sts == NULL) {
        ngx_http_sgadmin_problem(st->ctx->request,
                                 NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "mta-sts-unavailable",
                                 "MTA-STS lookups are not available in"
                                 " this worker (see the error log)", NULL);
    }
}


static void
ngx_http_sgadmin_sts_bench_answered(void *data, sg_sts_answer_t *answer)
{
    ngx_http_sgadmin_sts_t  *st = data;

    json_t           *body;
    int64_t           ns;
    struct timespec   end;

    st->sts = NULL;

    if (answer->source < 4) {
        st->bench_sources[answer->source]++;
    }

    /* RFC 8461, 4.1: the decision delivery makes for one MX host */
    if (st->bench_mx.len && answer->mode != SG_STS_NONE
        && sg_sts_match_mx(answer, &st->bench_mx))
    {
        st->bench_matched++;
    }

    sg_sts_release(answer);

    if (++st->bench_done < st->bench_n) {
        ngx_http_sgadmin_sts_bench(st);
        return;
    }

    (void) clock_gettime(CLOCK_MONOTONIC, &end);

    ns = (int64_t) (end.tv_sec - st->bench_start.tv_sec) * 1000000000
         + (end.tv_nsec - st->bench_start.tv_nsec);

    body = json_pack("{s:s%,s:I,s:s,s:I,s:f,s:I,s:{s:I,s:I,s:I,s:I}}",
                     "domain", (char *) st->domain.data, st->domain.len,
                     "lookups", (json_int_t) st->bench_n,
                     "from", st->bench_redis ? "redis" : "memory",
                     "elapsed_ns", (json_int_t) ns,
                     "ns_per_lookup", (double) ns / (double) st->bench_n,
                     "mx_matched", (json_int_t) st->bench_matched,
                     "sources",
                     "none", (json_int_t) st->bench_sources[SG_STS_SRC_NONE],
                     "memory",
                     (json_int_t) st->bench_sources[SG_STS_SRC_MEMORY],
                     "redis", (json_int_t) st->bench_sources[SG_STS_SRC_REDIS],
                     "fetched",
                     (json_int_t) st->bench_sources[SG_STS_SRC_FETCHED]);

    if (body == NULL) {
        ngx_http_sgadmin_problem(st->ctx->request,
                                 NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    ngx_http_sgadmin_send_json(st->ctx->request, NGX_HTTP_OK, body);
    json_decref(body);
}


static json_t *
ngx_http_sgadmin_sts_answer_json(sg_sts_answer_t *a)
{
    return json_pack("{s:s%,s:s%,s:s%,s:s,s:o,s:I,s:o,s:o,s:s%,s:s}",
                     "id", (char *) a->domain.data, a->domain.len,
                     "domain", (char *) a->domain.data, a->domain.len,
                     "policy_id", a->id.data ? (char *) a->id.data : "",
                     a->id.len,
                     "mode", sg_sts_mode_name(a->mode),
                     "mx", ngx_http_sgadmin_sts_strs(a->mx, a->nmx),
                     "max_age", (json_int_t) a->max_age,
                     "fetched_at", ngx_http_sgadmin_sts_time(a->fetched_at),
                     "expires_at", ngx_http_sgadmin_sts_time(a->expires_at),
                     "text", a->text.data ? (char *) a->text.data : "",
                     a->text.len,
                     "source", sg_sts_source_name(a->source));
}


static json_t *
ngx_http_sgadmin_sts_trace_json(sg_sts_trace_t *t)
{
    json_t  *steps, *s, *cert;

    steps = json_array();
    if (steps == NULL) {
        return NULL;
    }

    if (t->txt_done) {
        s = json_pack("{s:s,s:b,s:o,s:I,s:o,s:o,s:s}",
                      "step", "txt",
                      "ok", (int) t->txt_ok,
                      "name", ngx_http_sgadmin_sts_str(&t->txt_name),
                      "rcode", (json_int_t) t->txt_rcode,
                      "records", ngx_http_sgadmin_sts_strs(t->txt_records,
                                                         t->ntxt_records),
                      "id", t->txt_id.len
                            ? ngx_http_sgadmin_sts_str(&t->txt_id)
                            : json_null(),
                      "detail", t->txt_detail ? t->txt_detail : "");
        json_array_append_new(steps, s);
    }

    if (t->dns_done) {
        s = json_pack("{s:s,s:b,s:o,s:o,s:o}",
                      "step", "dns",
                      "ok", (int) t->dns_ok,
                      "host", ngx_http_sgadmin_sts_str(&t->dns_host),
                      "addresses", ngx_http_sgadmin_sts_strs(t->dns_addrs,
                                                           t->ndns_addrs),
                      "detail", t->dns_detail ? json_string(t->dns_detail)
                                              : json_null());
        json_array_append_new(steps, s);
    }

    if (t->https_done) {
        cert = json_null();

        if (t->cert.seen) {
            cert = json_pack("{s:b,s:I,s:o,s:o,s:o,s:o,s:o}",
                             "verified", (int) t->cert.verified,
                             "verify_result",
                             (json_int_t) t->cert.verify_result,
                             "verify_text",
                             t->cert.verify_text.len
                             ? ngx_http_sgadmin_sts_str(&t->cert.verify_text)
                             : json_string("ok"),
                             "subject",
                             ngx_http_sgadmin_sts_str(&t->cert.subject),
                             "issuer",
                             ngx_http_sgadmin_sts_str(&t->cert.issuer),
                             "not_after",
                             ngx_http_sgadmin_sts_str(&t->cert.not_after),
                             "dns_names",
                             ngx_http_sgadmin_sts_str(&t->cert.san));
        }

        s = json_pack("{s:s,s:b,s:o,s:I,s:o,s:o,s:I,s:I,s:o,s:o,s:o}",
                      "step", "https",
                      "ok", (int) t->https_ok,
                      "url", ngx_http_sgadmin_sts_str(&t->https_url),
                      "status", (json_int_t) t->https_status,
                      "content_type",
                      t->https_content_type.len
                      ? ngx_http_sgadmin_sts_str(&t->https_content_type)
                      : json_null(),
                      "address",
                      t->https_ip.len ? ngx_http_sgadmin_sts_str(&t->https_ip)
                                      : json_null(),
                      "elapsed_ms", (json_int_t) t->https_elapsed,
                      "size", (json_int_t) t->https_size,
                      "error", t->https_error ? json_string(t->https_error)
                                              : json_null(),
                      "certificate", cert,
                      "detail", t->https_detail
                                ? json_string(t->https_detail)
                                : json_null());
        json_array_append_new(steps, s);
    }

    if (t->parse_done) {
        s = json_pack("{s:s,s:b,s:s,s:o}",
                      "step", "parse",
                      "ok", (int) t->parse_ok,
                      "detail", t->parse_detail ? t->parse_detail : "",
                      "policy",
                      t->parse_ok
                      ? json_pack("{s:s,s:I,s:o,s:o}",
                                  "mode", sg_sts_mode_name(t->parse_mode),
                                  "max_age", (json_int_t) t->parse_max_age,
                                  "mx",
                                  ngx_http_sgadmin_sts_strs(t->parse_mx,
                                                            t->nparse_mx),
                                  "text",
                                  ngx_http_sgadmin_sts_str(&t->parse_text))
                      : json_null());
        json_array_append_new(steps, s);
    }

    return steps;
}


static json_t *
ngx_http_sgadmin_sts_strs(ngx_str_t *s, ngx_uint_t n)
{
    json_t      *a;
    ngx_uint_t   i;

    a = json_array();

    for (i = 0; a && i < n; i++) {
        json_array_append_new(a, ngx_http_sgadmin_sts_str(&s[i]));
    }

    return a;
}


/* a JSON string of any octets: not UTF-8 becomes "?" */

static json_t *
ngx_http_sgadmin_sts_str(ngx_str_t *s)
{
    json_t  *v;
    u_char  *p, *q;

    if (s->data == NULL) {
        return json_string("");
    }

    v = json_stringn((const char *) s->data, s->len);
    if (v) {
        return v;
    }

    p = ngx_alloc(s->len + 1, ngx_cycle->log);
    if (p == NULL) {
        return json_string("");
    }

    for (q = p; q < p + s->len; q++) {
        *q = s->data[q - p] < 0x80 ? s->data[q - p] : '?';
    }

    v = json_stringn((const char *) p, s->len);
    ngx_free(p);

    return v ? v : json_string("");
}


static json_t *
ngx_http_sgadmin_sts_time(int64_t t)
{
    char  buf[32];

    if (t <= 0) {
        return json_null();
    }

    sg_sts_time_text(t, buf, sizeof(buf));

    return json_string(buf);
}


/* DELETE /api/v1/mta-sts/policies/{domain} */

void
ngx_http_sgadmin_sts_delete(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_int_t                rc;
    const char              *argv[6];
    size_t                   argvlen[6];
    ngx_http_sgadmin_sts_t  *st;
    u_char                   keys[SG_STS_KEYS_LEN];

    st = ngx_http_sgadmin_sts_create(r, ctx);
    if (st == NULL) {
        return;
    }

    argv[0] = "EVAL";
    argvlen[0] = 4;
    argv[1] = ngx_http_sgadmin_sts_evict_lua;
    argvlen[1] = sizeof(ngx_http_sgadmin_sts_evict_lua) - 1;
    argv[2] = "3";
    argvlen[2] = 1;

    if (sg_sts_keys(&st->domain, keys, &argv[3], &argvlen[3]) != NGX_OK) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "the domain is too long", NULL);
        return;
    }

    rc = sg_worker.redis
         ? sg_redis_command_argv(sg_worker.redis,
                                 ngx_http_sgadmin_sts_evicted, st, 6, argv,
                                 argvlen)
         : NGX_DECLINED;

    if (rc != NGX_OK) {
        st->redis_err = sg_redis_last_error(sg_worker.redis);
        if (st->redis_err == NULL || st->redis_err[0] == '\0') {
            st->redis_err = "not connected";
        }

        ngx_http_sgadmin_sts_notify(st);
    }
}


static void
ngx_http_sgadmin_sts_evicted(void *data, redisReply *reply, const char *err)
{
    ngx_http_sgadmin_sts_t  *st = data;

    size_t               len;
    json_t              *v;
    json_error_t         jerr;
    redisReply          *old;
    ngx_http_request_t  *r;

    r = st->ctx->request;

    if (err) {
        len = ngx_strlen(err);
        st->old = NULL;
        st->redis_err = "unavailable";

        if (len) {
            st->redis_err = ngx_pnalloc(r->pool, len + 1);
            if (st->redis_err) {
                ngx_memcpy((char *) st->redis_err, err, len + 1);

            } else {
                st->redis_err = "unavailable";
            }
        }

    } else if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2) {
        old = reply->element[0];

        st->deleted = (reply->element[1]->type == REDIS_REPLY_INTEGER
                       && reply->element[1]->integer > 0);

        if (old->type == REDIS_REPLY_STRING) {
            /* the old value for the audit row, if it is JSON */
            v = json_loadb(old->str, old->len, 0, &jerr);

            if (v) {
                st->old = ngx_pnalloc(r->pool, old->len + 1);
                if (st->old) {
                    ngx_memcpy(st->old, old->str, old->len);
                    st->old[old->len] = '\0';
                }

                json_decref(v);
            }
        }
    }

    ngx_http_sgadmin_sts_notify(st);
}


static void
ngx_http_sgadmin_sts_notify(ngx_http_sgadmin_sts_t *st)
{
    const char              *params[6];
    ngx_http_request_t      *r;
    ngx_http_sgadmin_ctx_t  *ctx;
    u_char                   token[NGX_INT64_LEN + 1];

    ctx = st->ctx;
    r = ctx->request;

    ngx_http_sgadmin_audit_params(ctx, params, token);
    params[3] = (const char *) st->domain.data;
    params[4] = st->old;
    params[5] = (st->deleted || st->redis_err) ? "true" : "false";

    if (sg_pg_query(sg_worker.pg, ngx_http_sgadmin_sts_delete_sql, 6, params,
                    ngx_http_sgadmin_sts_notified, st)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


static void
ngx_http_sgadmin_sts_notified(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_sts_t  *st = data;

    ngx_http_request_t  *r;

    r = st->ctx->request;

    if (err) {
        ngx_http_sgadmin_db_error(r, err);
        return;
    }

    if (st->redis_err) {
        ngx_http_sgadmin_redis_down(r, st->redis_err,
                                    NGX_HTTP_SGADMIN_STS_FALLBACK,
                                    "; every worker was told to drop the"
                                    " domain from its memory");
        return;
    }

    if (!st->deleted) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no MTA-STS policy is cached for this"
                                 " domain", NULL);
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                  "sgadmin: %V %V by %s", &r->method_name, &r->uri,
                  st->ctx->actor);

    ngx_http_sgadmin_no_content(r, st->ctx);
}


static void
ngx_http_sgadmin_sts_invalid(ngx_http_request_t *r, const char *field,
    const char *message)
{
    json_t  *errors;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "sgadmin: %V: \"%s\" %s", &r->uri, field, message);

    errors = json_pack("[{s:s,s:s}]", "field", field, "message", message);

    ngx_http_sgadmin_problem(r, 422, "validation",
                             "the domain or the query is not valid", errors);
    json_decref(errors);
}
