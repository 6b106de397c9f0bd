/*
 * sg: MTA-STS policy cache, the pure part.  See sg_sts_cache.h.
 *
 * Each rule of sg_sts_decide() names its section of RFC 8461 (or the
 * decision of RFC-NOTES); tests/unit/test_sg_sts_cache.c has a case for
 * each, with the same words.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sg_sts_cache.h"


void
sg_sts_decide(sg_sts_txt_state_e txt, const char *txt_id,
    const sg_sts_cache_state_t *cache, int64_t now, int64_t backoff,
    sg_sts_decision_t *d)
{
    int  valid, failed_recently;

    memset(d, 0, sizeof(sg_sts_decision_t));

    /* RFC 8461, 5.1: a policy is usable while time since fetch < max_age */
    valid = (cache->id != NULL && cache->expires_at > now);
    d->have_cached = valid ? 1 : 0;

    switch (txt) {

    case SG_STS_TXT_FOUND:

        if (valid && txt_id != NULL && strcmp(cache->id, txt_id) == 0) {
            d->action = SG_STS_USE_CACHED;
            d->why = "RFC 8461, 3.1: the cached policy has the id of the"
                     " TXT record";
            return;
        }

        /* RFC-NOTES: at most one refetch per policy id every 5 minutes */

        failed_recently = (cache->failed_id != NULL && txt_id != NULL
                           && strcmp(cache->failed_id, txt_id) == 0
                           && now >= cache->failed_at
                           && now - cache->failed_at < backoff);

        if (failed_recently) {
            if (valid) {
                d->action = SG_STS_USE_CACHED;
                d->why = "RFC 8461, 3.3: a fetch of this policy id failed"
                         " recently; the cached policy stays until it"
                         " expires";
                return;
            }

            d->action = SG_STS_FAILED;
            d->why = "a fetch of this policy id failed recently: no"
                     " refetch before the backoff is over";
            return;
        }

        d->action = SG_STS_FETCH;
        d->why = valid ? "RFC 8461, 3.1: the TXT record's id differs from"
                         " the cached policy's: fetch it"
                       : "RFC 8461, 3.3: no cached policy: fetch it";
        return;

    case SG_STS_TXT_ABSENT:
    case SG_STS_TXT_INVALID:

        if (valid) {
            d->action = SG_STS_USE_CACHED;
            d->why = "RFC 8461, 3.1 and 5.1: no usable TXT record, but the"
                     " cached policy has not expired";
            return;
        }

        d->action = SG_STS_NO_POLICY;
        d->negative = 1;
        d->why = (txt == SG_STS_TXT_ABSENT)
                 ? "RFC 8461, 3.1: no \"v=STSv1\" TXT record"
                 : "RFC 8461, 3.1: the TXT record is not exactly one valid"
                   " \"v=STSv1\" record";
        return;

    default: /* SG_STS_TXT_DNS_ERROR */

        if (valid) {
            d->action = SG_STS_USE_CACHED;
            d->why = "RFC 8461, 5.1: the TXT lookup failed, the cached"
                     " policy has not expired";
            return;
        }

        d->action = SG_STS_NO_POLICY;
        d->why = "the TXT lookup failed and no policy is cached";
        return;
    }
}


int
sg_sts_txt_split(const unsigned char *rdata, size_t len,
    sg_sts_str_t *strings, size_t max, size_t *n)
{
    size_t  i, slen;

    *n = 0;
    i = 0;

    while (i < len) {
        slen = rdata[i];

        if (slen > len - i - 1 || *n >= max) {
            return -1;
        }

        strings[*n].data = (const char *) rdata + i + 1;
        strings[*n].len = slen;
        (*n)++;

        i += 1 + slen;
    }

    return 0;
}


const char *
sg_sts_mode_name(sg_sts_mode_e mode)
{
    switch (mode) {
    case SG_STS_ENFORCE:
        return "enforce";
    case SG_STS_TESTING:
        return "testing";
    default:
        return "none";
    }
}


void
sg_sts_time_text(int64_t t, char *buf, size_t size)
{
    time_t     tt;
    struct tm  tm;

    tt = (time_t) t;

    if (size == 0) {
        return;
    }

    if (gmtime_r(&tt, &tm) == NULL
        || strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
    {
        buf[0] = '\0';
    }
}


int64_t
sg_sts_refresh_due(int64_t fetched_at, uint32_t max_age)
{
    int64_t  ahead;

    ahead = max_age / 4;

    if (ahead > SG_STS_REFRESH_AHEAD_MAX) {
        ahead = SG_STS_REFRESH_AHEAD_MAX;
    }

    return fetched_at + (int64_t) max_age - ahead;
}


static int
sg_sts_id_valid(const char *id, size_t len)
{
    size_t  i;

    if (len == 0 || len > SG_STS_ID_MAX) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (!((id[i] >= 'a' && id[i] <= 'z') || (id[i] >= 'A' && id[i] <= 'Z')
              || (id[i] >= '0' && id[i] <= '9')))
        {
            return 0;
        }
    }

    return 1;
}


/* doc as Redis keeps it, compact JSON, and doc released; NULL: no memory */

static char *
sg_sts_dump(json_t *doc)
{
    char  *out;

    if (doc == NULL) {
        return NULL;
    }

    out = json_dumps(doc, JSON_COMPACT|JSON_PRESERVE_ORDER);
    json_decref(doc);

    return out;
}


char *
sg_sts_record_encode(const char *domain, const char *id, const char *text,
    size_t text_len, int64_t fetched_at, const sg_sts_policy_t *policy)
{
    json_t   *doc, *mx, *s;
    size_t    i;

    mx = json_array();
    if (mx == NULL) {
        return NULL;
    }

    for (i = 0; i < policy->nmx; i++) {
        s = json_stringn(policy->mx[i].data, policy->mx[i].len);
        if (s == NULL || json_array_append_new(mx, s) != 0) {
            json_decref(mx);
            return NULL;
        }
    }

    s = json_stringn(text, text_len);       /* NULL: not UTF-8 */
    if (s == NULL) {
        json_decref(mx);
        return NULL;
    }

    doc = json_pack("{s:s,s:s,s:s,s:o,s:I,s:I,s:I,s:o}",
                    "domain", domain,
                    "id", id,
                    "mode", sg_sts_mode_name(policy->mode),
                    "mx", mx,
                    "max_age", (json_int_t) policy->max_age,
                    "fetched_at", (json_int_t) fetched_at,
                    "expires_at", (json_int_t) (fetched_at + policy->max_age),
                    "text", s);

    return sg_sts_dump(doc);
}


int
sg_sts_record_decode(json_t *doc, sg_sts_record_t *r, const char **reason)
{
    json_t  *domain, *id, *text, *fetched;

    memset(r, 0, sizeof(sg_sts_record_t));

    domain = json_object_get(doc, "domain");
    id = json_object_get(doc, "id");
    text = json_object_get(doc, "text");
    fetched = json_object_get(doc, "fetched_at");

    if (!json_is_string(domain) || !json_is_string(id)
        || !json_is_string(text) || !json_is_integer(fetched))
    {
        *reason = "the cached record lacks domain, id, text or fetched_at";
        return -1;
    }

    if (!sg_sts_id_valid(json_string_value(id), json_string_length(id))) {
        *reason = "the cached record's id is not 1 to 32 letters or digits";
        return -1;
    }

    if (json_integer_value(fetched) < 0) {
        *reason = "the cached record's fetched_at is negative";
        return -1;
    }

    r->domain = json_string_value(domain);
    r->id = json_string_value(id);
    r->text = json_string_value(text);
    r->text_len = json_string_length(text);
    r->fetched_at = json_integer_value(fetched);

    /* the text decides: mode, mx and max_age as the policy host said */

    if (sg_sts_policy_parse(r->text, r->text_len, &r->policy, NULL)
        != SG_STS_OK)
    {
        *reason = "the cached policy text does not parse";
        return -1;
    }

    r->expires_at = r->fetched_at + r->policy.max_age;

    return 0;
}


char *
sg_sts_failure_encode(const char *id, int64_t failed_at,
    const char *result_type, const char *reason)
{
    json_t  *doc;

    doc = json_pack("{s:s,s:I,s:s,s:s}",
                    "id", id,
                    "failed_at", (json_int_t) failed_at,
                    "result_type", result_type,
                    "reason", reason ? reason : "");

    return sg_sts_dump(doc);
}


int
sg_sts_failure_decode(json_t *doc, const char **id, int64_t *failed_at,
    const char **result_type, const char **reason)
{
    json_t      *v, *t, *rt, *why;
    const char  *s;

    v = json_object_get(doc, "id");
    t = json_object_get(doc, "failed_at");
    rt = json_object_get(doc, "result_type");
    why = json_object_get(doc, "reason");

    if (!json_is_string(v) || !json_is_integer(t) || !json_is_string(rt)
        || !sg_sts_id_valid(json_string_value(v), json_string_length(v)))
    {
        return -1;
    }

    s = json_string_value(rt);

    if (strcmp(s, SG_STS_RT_FETCH_ERROR) == 0) {
        *result_type = SG_STS_RT_FETCH_ERROR;

    } else if (strcmp(s, SG_STS_RT_INVALID) == 0) {
        *result_type = SG_STS_RT_INVALID;

    } else if (strcmp(s, SG_STS_RT_WEBPKI) == 0) {
        *result_type = SG_STS_RT_WEBPKI;

    } else {
        return -1;
    }

    *id = json_string_value(v);
    *failed_at = json_integer_value(t);
    *reason = json_is_string(why) ? json_string_value(why) : "";

    return 0;
}


char *
sg_sts_negative_encode(const char *reason, int64_t at)
{
    json_t  *doc;

    doc = json_pack("{s:s,s:I}", "reason", reason ? reason : "",
                    "at", (json_int_t) at);

    return sg_sts_dump(doc);
}
