/*
 * The outbound TLS decision (common/sg_tls_policy.c): one row per rule of
 * DESIGN.md's table and per conflict between rules, each naming the RFC
 * section or the reference page's option it follows.
 */

#include <string.h>

#include "sg_tls_policy.h"
#include "sg_test.h"


/* facts, as bits, to keep the table readable */
#define RT      0x0001      /* message flagged REQUIRETLS */
#define RT_ON   0x0002      /* setting: REQUIRETLS enabled */
#define STS_ON  0x0004      /* setting: MTA-STS enabled */
#define OUT     0x0008      /* setting: STARTTLS whenever possible */
#define FB      0x0010      /* setting: retry without TLS for an hour */
#define DANE    0x0020
#define DNSSEC  0x0040      /* the MX answer was DNSSEC-secure */
#define MATCH   0x0080      /* H matches the MTA-STS policy */
#define REQ     0x0100      /* on the STARTTLS required list */
#define WL      0x0200      /* on the STARTTLS whitelist */
#define FAILED  0x0400      /* on the hourly TLS failure list */
#define TRUST   0x0800      /* internal server trusted for REQUIRETLS */
#define TRN     0x1000      /* "TLS-Required: No" */
#define CONF    0x2000      /* H is a configured relay or internal server */
#define DSN     0x4000      /* a DSN of a flagged message */


typedef struct {
    const char      *name;
    unsigned         facts;
    sg_sts_mode_e    sts;
    sg_tls_level_e   level;
    int              rule;
    int              skip;
    int              send_requiretls;
    int              fallback;
} sg_tls_case_t;


static const sg_tls_case_t  cases[] = {
    /* 7 and 6: the reference page's STARTTLS options */
    { "defaults: no outbound STARTTLS", FB | STS_ON | RT_ON, SG_STS_NONE,
      SG_TLS_NONE, 7, 0, 0, 0 },
    { "ref: STARTTLS whenever possible", OUT | FB, SG_STS_NONE,
      SG_TLS_MAY, 6, 0, 0, 1 },
    { "ref: whenever possible, fallback off", OUT, SG_STS_NONE,
      SG_TLS_MAY, 6, 0, 0, 0 },
    { "ref: host failed within the hour", OUT | FB | FAILED, SG_STS_NONE,
      SG_TLS_NONE, 6, 0, 0, 0 },
    { "ref: failure list ignored with fallback off", OUT | FAILED,
      SG_STS_NONE, SG_TLS_MAY, 6, 0, 0, 0 },

    /* 5: the whitelist */
    { "ref: whitelist: never STARTTLS", OUT | FB | WL, SG_STS_NONE,
      SG_TLS_NONE, 5, 0, 0, 0 },

    /* 4: the required list, and its conflict with the whitelist */
    { "ref: required list", REQ, SG_STS_NONE, SG_TLS_ENCRYPT, 4, 0, 0, 0 },
    { "required list beats whitelist (security wins)", REQ | WL | OUT,
      SG_STS_NONE, SG_TLS_ENCRYPT, 4, 0, 0, 0 },
    { "required list: no fallback, even on the failure list",
      REQ | OUT | FB | FAILED, SG_STS_NONE, SG_TLS_ENCRYPT, 4, 0, 0, 0 },

    /* 3: MTA-STS (RFC 8461) */
    { "RFC 8461 4.1: enforce, matching MX", STS_ON | MATCH, SG_STS_ENFORCE,
      SG_TLS_VERIFY, 3, 0, 0, 0 },
    { "RFC 8461 4.1: enforce, MX not in policy: skip", STS_ON,
      SG_STS_ENFORCE, SG_TLS_VERIFY, 3, 1, 0, 0 },
    { "RFC 8461 5: enforce beats whitelist", STS_ON | MATCH | WL,
      SG_STS_ENFORCE, SG_TLS_VERIFY, 3, 0, 0, 0 },
    { "RFC 8461 5: enforce: never the fallback list",
      STS_ON | MATCH | OUT | FB | FAILED, SG_STS_ENFORCE, SG_TLS_VERIFY, 3,
      0, 0, 0 },
    { "RFC 8461 5: testing changes nothing", STS_ON | OUT | FB,
      SG_STS_TESTING, SG_TLS_MAY, 6, 0, 0, 1 },
    { "ref: MTA-STS off ignores an enforce policy", OUT | FB,
      SG_STS_ENFORCE, SG_TLS_MAY, 6, 0, 0, 1 },

    /* 2: DANE (RFC 7672) */
    { "RFC 7672 2.2: DANE", DANE, SG_STS_NONE, SG_TLS_DANE, 2, 0, 0, 0 },
    { "RFC 8461 2: DANE is never overridden by MTA-STS",
      DANE | STS_ON | MATCH, SG_STS_ENFORCE, SG_TLS_DANE, 2, 0, 0, 0 },
    { "RFC 7672 2.2: DANE beats whitelist and fallback",
      DANE | WL | OUT | FB | FAILED, SG_STS_NONE, SG_TLS_DANE, 2, 0, 0, 0 },

    /* 1: REQUIRETLS (RFC 8689) */
    { "RFC 8689 4.1: flagged, MTA-STS enforce match",
      RT | RT_ON | STS_ON | MATCH, SG_STS_ENFORCE, SG_TLS_VERIFY, 1, 0, 1,
      0 },
    { "RFC 8689 4.1: flagged, DANE", RT | RT_ON | DANE, SG_STS_NONE,
      SG_TLS_DANE, 1, 0, 1, 0 },
    { "RFC 8689 4.1: flagged, DNSSEC-signed MX", RT | RT_ON | DNSSEC,
      SG_STS_NONE, SG_TLS_VERIFY, 1, 0, 1, 0 },
    { "RFC-NOTES: flagged, testing is not enough",
      RT | RT_ON | STS_ON | MATCH, SG_STS_TESTING, SG_TLS_VERIFY, 1, 1, 0,
      0 },
    { "RFC 8689 4.1: flagged, no policy: skip", RT | RT_ON | OUT,
      SG_STS_NONE, SG_TLS_VERIFY, 1, 1, 0, 0 },
    { "RFC 8689 4.1: flagged, enforce but MX mismatch: skip",
      RT | RT_ON | STS_ON, SG_STS_ENFORCE, SG_TLS_VERIFY, 1, 1, 0, 0 },
    { "RFC 8689: flagged ignores whitelist and failure list",
      RT | RT_ON | STS_ON | MATCH | WL | OUT | FB | FAILED, SG_STS_ENFORCE,
      SG_TLS_VERIFY, 1, 0, 1, 0 },
    { "ref: REQUIRETLS disabled: as if not flagged", RT | OUT | FB,
      SG_STS_NONE, SG_TLS_MAY, 6, 0, 0, 1 },
    { "RFC 8689 5: TLS-Required ignored on a flagged message",
      RT | RT_ON | TRN | STS_ON | MATCH, SG_STS_ENFORCE, SG_TLS_VERIFY, 1,
      0, 1, 0 },

    { "RFC 8689 4.1: flagged, configured relay host: no MX to validate",
      RT | RT_ON | CONF, SG_STS_NONE, SG_TLS_VERIFY, 1, 0, 1, 0 },
    { "RFC 8689 4.1: flagged, configured host ignores whitelist",
      RT | RT_ON | CONF | WL | OUT | FB | FAILED, SG_STS_NONE,
      SG_TLS_VERIFY, 1, 0, 1, 0 },
    { "RFC 8689 4.1: flagged, trusted internal server: verified TLS",
      RT | RT_ON | CONF | TRUST, SG_STS_NONE, SG_TLS_VERIFY, 1, 0, 1, 0 },
    { "configured host alone changes nothing unflagged", CONF | OUT | FB,
      SG_STS_NONE, SG_TLS_MAY, 6, 0, 0, 1 },

    /* RFC 8689 5: TLS-Required: No */
    { "RFC 8689 5: TLS-Required: No relaxes enforce", TRN | STS_ON,
      SG_STS_ENFORCE, SG_TLS_MAY, 3, 0, 0, 0 },
    { "RFC 8689 5: TLS-Required: No relaxes DANE", TRN | DANE, SG_STS_NONE,
      SG_TLS_MAY, 2, 0, 0, 0 },
    { "TLS-Required: No without policies changes nothing", TRN | OUT | FB,
      SG_STS_NONE, SG_TLS_MAY, 6, 0, 0, 1 },
    { "TLS-Required: No keeps the required list", TRN | REQ, SG_STS_NONE,
      SG_TLS_ENCRYPT, 4, 0, 0, 0 },
    { "TLS-Required: No with a policy keeps the required list",
      TRN | REQ | STS_ON, SG_STS_ENFORCE, SG_TLS_ENCRYPT, 4, 0, 0, 0 },
    { "TLS-Required: No with a policy keeps the whitelist",
      TRN | WL | OUT | STS_ON, SG_STS_ENFORCE, SG_TLS_NONE, 5, 0, 0, 0 },
    { "TLS-Required: No with DANE keeps the required list",
      TRN | REQ | DANE, SG_STS_NONE, SG_TLS_ENCRYPT, 4, 0, 0, 0 },
    { "RFC 8689 5: TLS-Required: No, handshake failure retries in clear",
      TRN | STS_ON | FB, SG_STS_ENFORCE, SG_TLS_MAY, 3, 0, 0, 1 },

    /* RFC 8689 5: the DSN of a flagged message */
    { "RFC 8689 5: DSN of a flagged message tries STARTTLS",
      DSN | RT_ON | FB, SG_STS_NONE, SG_TLS_MAY, 7, 0, 0, 0 },
    { "RFC 8689 5: DSN of a flagged message, REQUIRETLS disabled",
      DSN | FB, SG_STS_NONE, SG_TLS_NONE, 7, 0, 0, 0 },
    { "RFC 8689 5: DSN of a flagged message keeps the whitelist",
      DSN | RT_ON | WL, SG_STS_NONE, SG_TLS_NONE, 5, 0, 0, 0 },
    { "RFC 8689 5: DSN of a flagged message, STARTTLS whenever possible",
      DSN | RT_ON | OUT | FB, SG_STS_NONE, SG_TLS_MAY, 6, 0, 0, 1 },
};


static void
facts(unsigned bits, sg_sts_mode_e sts, sg_tls_facts_t *f)
{
    memset(f, 0, sizeof(sg_tls_facts_t));

    f->requiretls = !!(bits & RT);
    f->requiretls_enabled = !!(bits & RT_ON);
    f->mta_sts_enabled = !!(bits & STS_ON);
    f->starttls_outbound = !!(bits & OUT);
    f->tls_failure_fallback = !!(bits & FB);
    f->dane = !!(bits & DANE);
    f->mx_dnssec = !!(bits & DNSSEC);
    f->sts_mx_match = !!(bits & MATCH);
    f->on_required_list = !!(bits & REQ);
    f->on_whitelist = !!(bits & WL);
    f->on_failure_list = !!(bits & FAILED);
    f->internal_trusted = !!(bits & TRUST);
    f->tls_required_no = !!(bits & TRN);
    f->configured_host = !!(bits & CONF);
    f->requiretls_dsn = !!(bits & DSN);
    f->sts_mode = sts;
}


int
main(void)
{
    size_t              i;
    sg_tls_facts_t      f;
    sg_tls_decision_t   d;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        facts(cases[i].facts, cases[i].sts, &f);
        sg_tls_decide(&f, &d);

        CHECK(d.level == cases[i].level, cases[i].name);
        CHECK(d.rule == cases[i].rule, cases[i].name);
        CHECK(d.skip == cases[i].skip, cases[i].name);
        CHECK(d.send_requiretls == cases[i].send_requiretls, cases[i].name);
        CHECK(d.fallback == cases[i].fallback, cases[i].name);
        CHECK(d.reason != NULL && d.reason[0] != '\0', cases[i].name);

        /* a flagged message never falls back to clear text */
        if (cases[i].rule == 1) {
            CHECK(d.bounce && !d.fallback && d.level >= SG_TLS_DANE,
                  cases[i].name);
        }
    }

    /* RFC 8689 4.1: REQUIRETLS keyword required unless trusted internal */
    facts(RT | RT_ON | DNSSEC, SG_STS_NONE, &f);
    sg_tls_decide(&f, &d);
    CHECK(d.need_requiretls, "next hop must list REQUIRETLS");

    facts(RT | RT_ON | DNSSEC | TRUST, SG_STS_NONE, &f);
    sg_tls_decide(&f, &d);
    CHECK(!d.need_requiretls && d.send_requiretls,
          "trusted internal server: keyword not required");

    /* RFC 8689 5: the bounce of a flagged message is never discarded */
    facts(DSN | RT_ON, SG_STS_NONE, &f);
    sg_tls_decide(&f, &d);
    CHECK(d.retry_clear && !d.fallback,
          "DSN of a flagged message: a failed handshake retries in clear");

    facts(DSN | RT_ON | OUT, SG_STS_NONE, &f);
    sg_tls_decide(&f, &d);
    CHECK(d.retry_clear && d.rule == 6,
          "DSN of a flagged message, whenever possible: retries in clear");

    facts(OUT | FB, SG_STS_NONE, &f);
    sg_tls_decide(&f, &d);
    CHECK(!d.retry_clear, "ordinary mail: only the fallback setting");

    /* RFC 8461 5: testing is reported */
    facts(STS_ON | OUT, SG_STS_TESTING, &f);
    sg_tls_decide(&f, &d);
    CHECK(d.report_sts, "testing failures are reported");

    CHECK(strcmp(sg_tls_level_name(SG_TLS_VERIFY), "verify") == 0,
          "level names");
    CHECK(strcmp(sg_tls_level_name((sg_tls_level_e) 42), "unknown") == 0,
          "unknown level name");

    return SG_TEST_DONE();
}
