/*
 * sg: MTA-STS policy lookup for delivery (RFC 8461): the _mta-sts TXT
 * record through sg_dns, the policy through sg_http, a bounded in-worker
 * cache in front of Redis, proactive refresh once per cluster.
 *
 * One lookup:
 *
 *   1. worker memory: an unexpired policy whose TXT id was confirmed less
 *      than sg_mta_sts_txt_recheck ago, or a cached "no policy", answers
 *      at once (from a posted event);
 *   2. else Redis (sg:mta-sts:<domain>, sg:mta-sts-none:<domain>,
 *      sg:mta-sts-fail:<domain>), then TXT _mta-sts.<domain>;
 *   3. sg_sts_decide() (sg_sts_cache.h): use the cached policy, fetch
 *      https://mta-sts.<domain>/.well-known/mta-sts.txt (addresses from
 *      sg_dns), say "no policy", or repeat a recent failure;
 *   4. a fetched policy goes to memory and Redis (EXAT fetched_at +
 *      max_age); a failed fetch keeps the cached policy and is not
 *      repeated for that id before sg_mta_sts_failure_backoff.
 *
 * Concurrent lookups of one domain in a worker share one job.  With Redis
 * down, policies are fetched directly and kept in worker memory; "Redis
 * down" never means "no policy".  The "MTA-STS" setting off answers "no
 * policy" at once.  NOTIFY sg_mta_sts '<domain>' (the admin API's DELETE)
 * drops the domain from every worker's memory.
 *
 * Every lookup is answered exactly once through its handler, never from
 * inside sg_sts_lookup(), unless it was cancelled first.
 */

#ifndef _SG_STS_H_INCLUDED_
#define _SG_STS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "sg_tls_policy.h"      /* sg_sts_mode_e */
#include "sg_http.h"            /* sg_http_cert_t */


#define SG_STS_KEY_POLICY       "sg:mta-sts:"
#define SG_STS_KEY_NONE         "sg:mta-sts-none:"
#define SG_STS_KEY_FAIL         "sg:mta-sts-fail:"
#define SG_STS_KEY_LOCK         "sg:mta-sts-lock:"
#define SG_STS_CHANNEL          "sg_mta_sts"

/* room for the three keys of a domain: sg_sts_keys() */
#define SG_STS_KEYS_LEN                                                      \
    (sizeof(SG_STS_KEY_POLICY) + sizeof(SG_STS_KEY_NONE)                     \
     + sizeof(SG_STS_KEY_FAIL) + 3 * SG_STS_DOMAIN_MAX)


typedef struct sg_sts_req_s     sg_sts_req_t;


typedef enum {
    SG_STS_SRC_NONE = 0,        /* no policy applies */
    SG_STS_SRC_MEMORY,          /* this worker's memory */
    SG_STS_SRC_REDIS,
    SG_STS_SRC_FETCHED          /* fetched by this lookup */
} sg_sts_source_e;


/* what sg_sts_refresh() did, step by step (the admin API shows it) */
typedef struct {
    /* TXT _mta-sts.<domain> */
    unsigned             txt_done:1;
    unsigned             txt_ok:1;
    ngx_int_t            txt_rcode;     /* -1: no answer */
    ngx_str_t            txt_name;      /* after CNAMEs */
    ngx_str_t           *txt_records;   /* each joined */
    ngx_uint_t           ntxt_records;
    ngx_str_t            txt_id;
    const char          *txt_detail;

    /* A/AAAA mta-sts.<domain> */
    unsigned             dns_done:1;
    unsigned             dns_ok:1;
    ngx_str_t            dns_host;
    ngx_str_t           *dns_addrs;
    ngx_uint_t           ndns_addrs;
    const char          *dns_detail;

    /* GET https://mta-sts.<domain>/.well-known/mta-sts.txt */
    unsigned             https_done:1;
    unsigned             https_ok:1;
    ngx_str_t            https_url;
    long                 https_status;
    ngx_str_t            https_content_type;
    ngx_str_t            https_ip;
    const char          *https_error;   /* sg_http_error_name() */
    const char          *https_detail;
    ngx_msec_t           https_elapsed;
    size_t               https_size;
    sg_http_cert_t       cert;

    /* the body, RFC 8461, 3.2 */
    unsigned             parse_done:1;
    unsigned             parse_ok:1;
    const char          *parse_detail;
    sg_sts_mode_e        parse_mode;
    uint32_t             parse_max_age;
    ngx_str_t           *parse_mx;
    ngx_uint_t           nparse_mx;
    ngx_str_t            parse_text;

    /* the fetch's outcome: NULL, or the RFC 8460 result type */
    const char          *result_type;
    const char          *reason;
} sg_sts_trace_t;


/*
 * The answer of a lookup.  mode NONE and result_type NULL: no policy.
 * mode NONE and result_type set: a policy should be there but could not
 * be had (RFC 8460 result type for the TLS report; delivery goes on as
 * without a policy, RFC 8461, 5.1).  mode TESTING or ENFORCE: a policy
 * applies (id, mx, text ...).  A policy in mode "none" is answered as
 * mode NONE with its id and text.  Valid until sg_sts_release().
 */
typedef struct {
    sg_sts_mode_e        mode;
    ngx_str_t            domain;        /* lower case */
    ngx_str_t            id;            /* "" without a policy */
    ngx_str_t           *mx;            /* as written ("*." kept) */
    ngx_uint_t           nmx;
    time_t               max_age;
    time_t               fetched_at;
    time_t               expires_at;
    ngx_str_t            text;          /* the policy as fetched */
    const char          *result_type;   /* NULL, "sts-policy-fetch-error",
                                           "sts-policy-invalid",
                                           "sts-webpki-invalid" */
    const char          *reason;        /* for people, never NULL */
    sg_sts_source_e      source;
    sg_sts_trace_t      *trace;         /* sg_sts_refresh() only */
} sg_sts_answer_t;


typedef void (*sg_sts_handler_pt)(void *data, sg_sts_answer_t *answer);


/* the directives (ngx_sg_sts_module, main context) */
typedef struct {
    ngx_msec_t           fetch_timeout;     /* sg_mta_sts_fetch_timeout */
    ngx_uint_t           cache_size;        /* sg_mta_sts_cache_size */
    time_t               txt_recheck;       /* sg_mta_sts_txt_recheck */
    time_t               negative_ttl;      /* sg_mta_sts_negative_ttl */
    time_t               failure_backoff;   /* sg_mta_sts_failure_backoff */
    time_t               refresh_interval;  /* sg_mta_sts_refresh_interval */
} sg_sts_conf_t;


extern ngx_module_t  ngx_sg_sts_module;


ngx_int_t sg_sts_init_worker(ngx_cycle_t *cycle);
void sg_sts_exit_worker(void);

/*
 * The policy for mail to domain.  NULL: out of memory, or MTA-STS is not
 * set up in this worker (no sg_postgres); the handler is not called then.
 */
sg_sts_req_t *sg_sts_lookup(ngx_str_t *domain, sg_sts_handler_pt handler,
    void *data);

/*
 * Fetch now, whatever is cached, and say what happened at each step
 * (answer->trace): the admin API's ?refresh=1.  The cache is updated as by
 * a lookup that fetched.
 */
sg_sts_req_t *sg_sts_refresh(ngx_str_t *domain, sg_sts_handler_pt handler,
    void *data);

/* the handler will not be called */
void sg_sts_cancel(sg_sts_req_t *req);

/* the answer is the handler's: give it back */
void sg_sts_release(sg_sts_answer_t *answer);

/* RFC 8461, 4.1: 1 when host (an MX name) matches the answer's policy */
ngx_uint_t sg_sts_match_mx(sg_sts_answer_t *answer, ngx_str_t *host);

/*
 * What this worker's memory holds for domain, without I/O (the admin API
 * when Redis is down): an answer to release, or NULL.
 */
sg_sts_answer_t *sg_sts_peek(ngx_str_t *domain);

/* forget domain in this worker (all domains when domain is NULL) */
void sg_sts_forget(ngx_str_t *domain);

/*
 * The Redis keys of domain, its policy, "no policy" and last failure,
 * as argv[0..2], written in buf (SG_STS_KEYS_LEN bytes); NGX_ERROR: the
 * domain is longer than a domain can be.
 */
ngx_int_t sg_sts_keys(ngx_str_t *domain, u_char *buf, const char **argv,
    size_t *argvlen);

/* "domain" as sg uses it: lower case, LDH, no trailing dot; NULL: ok */
const char *sg_sts_domain(ngx_str_t *in, u_char *out, size_t size,
    size_t *len);

const char *sg_sts_source_name(sg_sts_source_e source);


#endif /* _SG_STS_H_INCLUDED_ */
