/*
 * MTA-STS policy cache, the pure part (common/sg_sts_cache.c): the lookup
 * rules of sg_sts_decide() (RFC 8461, 3.1, 3.3, 5.1 and the decisions of
 * RFC-NOTES), one case per rule naming its section; the TXT wire format
 * (RFC 1035, 3.3.14); the Redis records (redis/README.md); when a
 * proactive refresh is due.
 */

#include <stdlib.h>
#include <string.h>

#include "sg_sts_cache.h"
#include "sg_test.h"


#define NOW       1700000000
/* the directive's default, RFC-NOTES: 5 minutes */
#define BACKOFF   SG_STS_FAILURE_BACKOFF_DEFAULT

#define FOUND     SG_STS_TXT_FOUND
#define ABSENT    SG_STS_TXT_ABSENT
#define INVALID   SG_STS_TXT_INVALID
#define DNSERR    SG_STS_TXT_DNS_ERROR

#define USE       SG_STS_USE_CACHED
#define FETCH     SG_STS_FETCH
#define NONE      SG_STS_NO_POLICY
#define FAILED    SG_STS_FAILED


typedef struct {
    const char          *name;
    sg_sts_txt_state_e   txt;
    const char          *txt_id;
    const char          *cached_id;     /* NULL: nothing cached */
    int64_t              expires_in;    /* from NOW */
    const char          *failed_id;
    int64_t              failed_ago;
    sg_sts_action_e      action;
    int                  negative;
} decide_case_t;


static const decide_case_t  decide_cases[] = {
    { "RFC 8461, 3.1: same id, unexpired: the cached policy", FOUND, "a1",
      "a1", 3600, NULL, 0, USE, 0 },
    { "RFC 8461, 3.1: another id: fetch", FOUND, "a2", "a1", 3600, NULL, 0,
      FETCH, 0 },
    { "RFC 8461, 3.3: nothing cached: fetch", FOUND, "a1", NULL, 0, NULL, 0,
      FETCH, 0 },
    { "RFC 8461, 5.1: same id but expired: fetch", FOUND, "a1", "a1", 0,
      NULL, 0, FETCH, 0 },
    { "RFC 8461, 5.1: expired a second ago: fetch", FOUND, "a1", "a1", -1,
      NULL, 0, FETCH, 0 },
    { "RFC 8461, 3.1: ids compare case-sensitively", FOUND, "A1", "a1",
      3600, NULL, 0, FETCH, 0 },
    { "RFC 8461, 3.3 (RFC-NOTES): new id failed 1 s ago, cached stays",
      FOUND, "a2", "a1", 3600, "a2", 1, USE, 0 },
    { "RFC 8461, 3.3 (RFC-NOTES): failed 299 s ago: no refetch yet", FOUND,
      "a2", NULL, 0, "a2", 299, FAILED, 0 },
    { "RFC 8461, 3.3 (RFC-NOTES): failed 300 s ago: refetch", FOUND, "a2",
      NULL, 0, "a2", 300, FETCH, 0 },
    { "RFC 8461, 3.3 (RFC-NOTES): the backoff is per id", FOUND, "a3",
      "a1", 3600, "a2", 1, FETCH, 0 },
    { "RFC 8461, 3.3 (RFC-NOTES): a failure in the future is ignored",
      FOUND, "a2", NULL, 0, "a2", -10, FETCH, 0 },
    { "RFC 8461, 3.3: failed recently, cached expired: the failure",
      FOUND, "a1", "a1", -5, "a1", 10, FAILED, 0 },
    { "RFC 8461, 3.1 and 5.1: no record, cached: the cached policy", ABSENT,
      NULL, "a1", 3600, NULL, 0, USE, 0 },
    { "RFC 8461, 3.1: no record, nothing cached: no policy, cached briefly",
      ABSENT, NULL, NULL, 0, NULL, 0, NONE, 1 },
    { "RFC 8461, 3.1: no record, cached expired: no policy", ABSENT, NULL,
      "a1", 0, NULL, 0, NONE, 1 },
    { "RFC 8461, 3.1: several records, cached: the cached policy", INVALID,
      NULL, "a1", 10, NULL, 0, USE, 0 },
    { "RFC 8461, 3.1: several records, nothing cached: no policy", INVALID,
      NULL, NULL, 0, NULL, 0, NONE, 1 },
    { "RFC 8461, 5.1: DNS failure, cached: the cached policy", DNSERR, NULL,
      "a1", 10, NULL, 0, USE, 0 },
    { "RFC 8461, 5.1: DNS failure, nothing cached: no policy, not cached",
      DNSERR, NULL, NULL, 0, NULL, 0, NONE, 0 },
    { "RFC 8461, 3.3: a failure does not stop the cached policy without"
      " TXT", ABSENT, NULL, "a1", 10, "a2", 1, USE, 0 },
};


static void
test_decide(void)
{
    size_t                 i;
    sg_sts_decision_t      d;
    sg_sts_cache_state_t   c;
    const decide_case_t   *t;

    for (i = 0; i < sizeof(decide_cases) / sizeof(decide_cases[0]); i++) {
        t = &decide_cases[i];

        memset(&c, 0, sizeof(c));
        c.id = t->cached_id;
        c.expires_at = NOW + t->expires_in;
        c.failed_id = t->failed_id;
        c.failed_at = NOW - t->failed_ago;

        sg_sts_decide(t->txt, t->txt_id, &c, NOW, BACKOFF, &d);

        CHECK(d.action == t->action, t->name);
        CHECK(d.negative == (unsigned) t->negative, t->name);
        CHECK(d.why != NULL && d.why[0] != '\0', t->name);
    }
}


static void
test_txt_split(void)
{
    size_t        n;
    sg_sts_str_t  s[4];

    static const unsigned char  one[] = "\007v=STSv1";
    static const unsigned char  two[] = "\003v=S\004TSv1";
    static const unsigned char  empty_string[] = "\000\002ab";
    static const unsigned char  truncated[] = "\011v=STSv1";

    CHECK(sg_sts_txt_split(one, 8, s, 4, &n) == 0 && n == 1
          && s[0].len == 7 && memcmp(s[0].data, "v=STSv1", 7) == 0,
          "RFC 1035, 3.3.14: one character-string");
    CHECK(sg_sts_txt_split(two, 9, s, 4, &n) == 0 && n == 2
          && s[0].len == 3 && s[1].len == 4,
          "RFC 1035, 3.3.14: two character-strings");
    CHECK(sg_sts_txt_split(empty_string, 4, s, 4, &n) == 0 && n == 2
          && s[0].len == 0 && s[1].len == 2,
          "RFC 1035, 3.3.14: an empty character-string");
    CHECK(sg_sts_txt_split(truncated, 8, s, 4, &n) == -1,
          "RFC 1035, 3.3.14: a length beyond the rdata");
    CHECK(sg_sts_txt_split(two, 9, s, 1, &n) == -1,
          "more strings than room: refused");
    CHECK(sg_sts_txt_split(one, 0, s, 4, &n) == 0 && n == 0,
          "RFC 1035, 3.3.14: empty rdata, no strings");
}


static void
test_records(void)
{
    char             *json;
    json_t           *doc;
    const char       *why, *id, *rt, *reason;
    int64_t           at;
    json_error_t      jerr;
    sg_sts_policy_t   p;
    sg_sts_record_t   r;

    static const char  text[] = "version: STSv1\nmode: testing\n"
                                "mx: mx1.example.com\nmx: *.example.net\n"
                                "max_age: 600\n";

    CHECK(sg_sts_policy_parse(text, sizeof(text) - 1, &p, NULL) == SG_STS_OK,
          "the policy parses");

    json = sg_sts_record_encode("example.com", "abc123", text,
                                sizeof(text) - 1, NOW, &p);
    CHECK(json != NULL, "redis/README.md: a record is encoded");

    doc = json ? json_loads(json, 0, &jerr) : NULL;
    CHECK(doc != NULL, "the record is JSON");
    CHECK(json_integer_value(json_object_get(doc, "expires_at"))
          == NOW + 600, "redis/README.md: expires_at is fetched_at + max_age");
    CHECK(strcmp(json_string_value(json_object_get(doc, "mode")), "testing")
          == 0, "redis/README.md: mode for people");
    CHECK(json_array_size(json_object_get(doc, "mx")) == 2,
          "redis/README.md: mx for people");

    CHECK(sg_sts_record_decode(doc, &r, &why) == 0, "decoded");
    CHECK(strcmp(r.domain, "example.com") == 0 && strcmp(r.id, "abc123") == 0
          && r.fetched_at == NOW && r.expires_at == NOW + 600
          && r.policy.mode == SG_STS_TESTING && r.policy.nmx == 2,
          "decoded: the fields, mode and mx from the text");

    /* the text decides, not the fields for people */
    json_object_set_new(doc, "mode", json_string("enforce"));
    CHECK(sg_sts_record_decode(doc, &r, &why) == 0
          && r.policy.mode == SG_STS_TESTING,
          "the cached text decides the mode");

    json_object_set_new(doc, "id", json_string("bad-id"));
    CHECK(sg_sts_record_decode(doc, &r, &why) == -1,
          "RFC 8461, 3.1: a cached id is still 1*32 ALPHA/DIGIT");
    json_object_set_new(doc, "id", json_string("abc123"));

    json_object_set_new(doc, "text", json_string("version: STSv1\n"));
    CHECK(sg_sts_record_decode(doc, &r, &why) == -1,
          "RFC 8461, 3.2: a cached text that does not parse is ignored");

    json_object_del(doc, "fetched_at");
    CHECK(sg_sts_record_decode(doc, &r, &why) == -1, "fetched_at required");

    json_decref(doc);
    free(json);

    CHECK(sg_sts_record_encode("example.com", "a", "\xff", 1, NOW, &p)
          == NULL, "a text that is not UTF-8 is not put into JSON");

    /* failures */

    json = sg_sts_failure_encode("abc", NOW, SG_STS_RT_WEBPKI, "expired");
    doc = json ? json_loads(json, 0, &jerr) : NULL;
    CHECK(doc && sg_sts_failure_decode(doc, &id, &at, &rt, &reason) == 0
          && strcmp(id, "abc") == 0 && at == NOW
          && strcmp(rt, SG_STS_RT_WEBPKI) == 0
          && strcmp(reason, "expired") == 0,
          "RFC 8460, 4.3.2.1: a failure with its result type");
    json_object_set_new(doc, "result_type", json_string("made-up"));
    CHECK(sg_sts_failure_decode(doc, &id, &at, &rt, &reason) == -1,
          "RFC 8460, 4.3.2.1: only the three policy result types");
    json_decref(doc);
    free(json);

    json = sg_sts_negative_encode("no record", NOW);
    doc = json ? json_loads(json, 0, &jerr) : NULL;
    CHECK(doc && json_integer_value(json_object_get(doc, "at")) == NOW,
          "a cached \"no policy\" says when");
    json_decref(doc);
    free(json);
}


static void
test_refresh_due(void)
{
    char  buf[32];

    CHECK(sg_sts_refresh_due(NOW, 8) == NOW + 6,
          "RFC 8461, 5.1: refresh a quarter of max_age before expiry");
    CHECK(sg_sts_refresh_due(NOW, 604800) == NOW + 604800 - 86400,
          "RFC 8461, 5.1: at most a day before expiry");
    CHECK(sg_sts_refresh_due(NOW, 0) == NOW,
          "RFC 8461, 3.2: max_age 0 is due at once");
    CHECK(sg_sts_refresh_due(NOW, 31557600) == NOW + 31557600 - 86400,
          "RFC 8461, 3.2: the largest max_age");

    sg_sts_time_text(0, buf, sizeof(buf));
    CHECK(strcmp(buf, "1970-01-01T00:00:00Z") == 0, "RFC 3339 time, UTC");
    sg_sts_time_text(NOW, buf, sizeof(buf));
    CHECK(strcmp(buf, "2023-11-14T22:13:20Z") == 0, "RFC 3339 time");

    CHECK(strcmp(sg_sts_mode_name(SG_STS_ENFORCE), "enforce") == 0
          && strcmp(sg_sts_mode_name(SG_STS_TESTING), "testing") == 0
          && strcmp(sg_sts_mode_name(SG_STS_NONE), "none") == 0,
          "RFC 8461, 3.2: mode names");
}


int
main(void)
{
    /* RFC-NOTES: one refetch per policy id every 5 minutes, by default */
    CHECK(SG_STS_FAILURE_BACKOFF_DEFAULT == 300,
          "sg_mta_sts_failure_backoff defaults to 5 minutes");

    test_decide();
    test_txt_split();
    test_records();
    test_refresh_due();

    printf("sts cache: %zu decision cases\n",
           sizeof(decide_cases) / sizeof(decide_cases[0]));

    return SG_TEST_DONE();
}
