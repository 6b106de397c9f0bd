/*
 * sg: MTA-STS policy cache, the pure part (no nginx, no I/O): what to do
 * with a lookup given the TXT record and what is cached (RFC 8461, 3.1,
 * 3.3, 5.1 and the decisions of RFC-NOTES), the JSON kept in Redis
 * (redis/README.md), the TXT wire format, and when a proactive refresh is
 * due.  common/sg_sts.c is the nginx side.
 */

#ifndef _SG_STS_CACHE_H_INCLUDED_
#define _SG_STS_CACHE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#include "sg_mta_sts.h"


/*
 * RFC-NOTES (MTA-STS): after a failed fetch, at most one refetch per
 * policy id every 5 minutes: the default of sg_mta_sts_failure_backoff
 */
#define SG_STS_FAILURE_BACKOFF_DEFAULT  300


#define SG_STS_TXT_STRINGS_MAX   64         /* strings kept per record */
#define SG_STS_REFRESH_AHEAD_MAX 86400      /* s: refresh at most a day
                                               before expiry */
#define SG_STS_REASON_MAX        400


/* RFC 8460, 4.3.2.1: the result types of a policy that could not be had */
#define SG_STS_RT_FETCH_ERROR    "sts-policy-fetch-error"
#define SG_STS_RT_INVALID        "sts-policy-invalid"
#define SG_STS_RT_WEBPKI         "sts-webpki-invalid"


/* what DNS said about _mta-sts.<domain> */
typedef enum {
    SG_STS_TXT_FOUND = 0,       /* exactly one valid v=STSv1 record: id */
    SG_STS_TXT_ABSENT,          /* NXDOMAIN, no TXT, no v=STSv1 record */
    SG_STS_TXT_INVALID,         /* several v=STSv1 records, or a bad one */
    SG_STS_TXT_DNS_ERROR        /* no answer: SERVFAIL, timeout, bogus */
} sg_sts_txt_state_e;


/* what the caches hold for the domain (memory or Redis, the newer) */
typedef struct {
    const char     *id;             /* the cached policy's id; NULL: none */
    int64_t         expires_at;     /* fetched_at + max_age */
    const char     *failed_id;      /* the last failed fetch; NULL: none */
    int64_t         failed_at;
} sg_sts_cache_state_t;


typedef enum {
    SG_STS_USE_CACHED = 0,      /* the cached policy applies */
    SG_STS_FETCH,               /* fetch; if that fails, the cached policy
                                   (when unexpired) applies */
    SG_STS_NO_POLICY,           /* no policy applies */
    SG_STS_FAILED               /* the recent failure stands: no refetch
                                   yet, and no cached policy */
} sg_sts_action_e;


typedef struct {
    sg_sts_action_e  action;
    unsigned         negative:1;    /* NO_POLICY worth caching ("no
                                       record", not a DNS failure) */
    unsigned         have_cached:1; /* an unexpired policy is cached */
    const char      *why;           /* for people: the rule applied */
} sg_sts_decision_t;


/*
 * One lookup: txt (and txt_id when FOUND), the cache, the time now (unix
 * seconds) and the refetch backoff after a failure (s; RFC-NOTES: 300).
 */
void sg_sts_decide(sg_sts_txt_state_e txt, const char *txt_id,
    const sg_sts_cache_state_t *cache, int64_t now, int64_t backoff,
    sg_sts_decision_t *d);

/*
 * RFC 1035, 3.3.14: the character-strings of one TXT rdata (wire format:
 * length octet, then that many octets).  Returns 0, or -1 when the rdata
 * is truncated or has more than max strings.
 */
int sg_sts_txt_split(const unsigned char *rdata, size_t len,
    sg_sts_str_t *strings, size_t max, size_t *n);


/* a policy as cached: the JSON of sg:mta-sts:<domain> */
typedef struct {
    const char      *domain;        /* pointers into the JSON document */
    const char      *id;
    const char      *text;          /* the policy as fetched */
    size_t           text_len;
    int64_t          fetched_at;
    int64_t          expires_at;    /* fetched_at + policy.max_age */
    sg_sts_policy_t  policy;        /* text parsed again: mx into text */
} sg_sts_record_t;


/*
 * The Redis value: {"domain", "id", "mode", "mx": [...], "max_age",
 * "fetched_at", "expires_at", "text"}; mode, mx, max_age and expires_at
 * are there for people and the API, decode() derives them from text.
 * NULL: out of memory; else free() it.
 */
char *sg_sts_record_encode(const char *domain, const char *id,
    const char *text, size_t text_len, int64_t fetched_at,
    const sg_sts_policy_t *policy);

/* 0, or -1 (reason set) when doc is not a usable record */
int sg_sts_record_decode(json_t *doc, sg_sts_record_t *r,
    const char **reason);

/* sg:mta-sts-fail:<domain>: {"id", "failed_at", "result_type", "reason"} */
char *sg_sts_failure_encode(const char *id, int64_t failed_at,
    const char *result_type, const char *reason);

/* result_type is one of the SG_STS_RT_* strings (static) */
int sg_sts_failure_decode(json_t *doc, const char **id, int64_t *failed_at,
    const char **result_type, const char **reason);

/* sg:mta-sts-none:<domain>: {"reason", "at"} */
char *sg_sts_negative_encode(const char *reason, int64_t at);

/* "enforce", "testing", "none" */
const char *sg_sts_mode_name(sg_sts_mode_e mode);

/*
 * When a proactive refresh is due (RFC 8461, 5.1: refresh before expiry):
 * a quarter of max_age before expiry, at most SG_STS_REFRESH_AHEAD_MAX.
 */
int64_t sg_sts_refresh_due(int64_t fetched_at, uint32_t max_age);

/* RFC 3339 UTC: "2024-05-01T10:17:03Z"; buf of at least 21 octets */
void sg_sts_time_text(int64_t t, char *buf, size_t size);


#endif /* _SG_STS_CACHE_H_INCLUDED_ */
