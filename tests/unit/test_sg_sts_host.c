/*
 * Hosting MTA-STS policies, the pure part (common/sg_sts_host.c): the
 * policy document (RFC 8461, 3.2), read back by sg's own parser
 * (common/sg_mta_sts.c) as a sender would; the records to publish (RFC
 * 8461, 3.1; RFC 8460, 3) and their comparison with live DNS.  Each case
 * names its section.
 */

#include <stdio.h>
#include <string.h>

#include "sg_mta_sts.h"
#include "sg_sts_host.h"
#include "sg_test.h"


#define S(s)        { s, sizeof(s) - 1 }
#define OK          SG_STS_HOST_OK
#define MISSING     SG_STS_HOST_MISSING
#define DIFFERENT   SG_STS_HOST_DIFFERENT


typedef struct {
    const char            *name;
    const char            *records[4];
    const char            *expected;
    sg_sts_host_status_e   status;
} check_case_t;


static const check_case_t  txt_cases[] = {
    { "RFC 8461 3.1: no record", { NULL }, "20260101T000000Z1", MISSING },
    { "RFC 8461 3.1: records of other kinds only are no policy",
      { "v=spf1 -all", "google-site-verification=x", NULL },
      "20260101T000000Z1", MISSING },
    { "RFC 8461 3.1: the one record, this id",
      { "v=STSv1; id=20260101T000000Z1", NULL }, "20260101T000000Z1", OK },
    { "RFC 8461 3.1: beside records of other kinds",
      { "v=spf1 -all", "v=STSv1; id=20260101T000000Z1", NULL },
      "20260101T000000Z1", OK },
    { "RFC 8461 3.1: extension fields and no blank after ';'",
      { "v=STSv1;id=20260101T000000Z1;ext=1", NULL },
      "20260101T000000Z1", OK },
    { "RFC 8461 3.1: another id (the policy changed since)",
      { "v=STSv1; id=20250101T000000Z1", NULL }, "20260101T000000Z1",
      DIFFERENT },
    { "RFC 8461 3.1: ids are compared case-sensitively",
      { "v=STSv1; id=abc", NULL }, "ABC", DIFFERENT },
    { "RFC 8461 3.1: two v=STSv1 records are no policy for a sender",
      { "v=STSv1; id=abc", "v=STSv1; id=abc", NULL }, "abc", DIFFERENT },
    { "RFC 8461 3.1: an id that is not 1*32 ALPHA/DIGIT",
      { "v=STSv1; id=abc-1", NULL }, "abc", DIFFERENT },
    { "RFC 8461 3.1: no id field", { "v=STSv1;", NULL }, "abc", DIFFERENT },
    { "RFC 8461 3.1: v=STSv1 is case-sensitive",
      { "V=stsv1; id=abc", NULL }, "abc", MISSING },
};


static const check_case_t  tlsrpt_cases[] = {
    { "RFC 8460 3: no record", { NULL }, "mailto:t@a.example", MISSING },
    { "RFC 8460 3: records of other kinds are discarded",
      { "v=spf1 -all", NULL }, "mailto:t@a.example", MISSING },
    { "RFC 8460 3: v=TLSRPTv10 is not v=TLSRPTv1",
      { "v=TLSRPTv10; rua=mailto:t@a.example", NULL }, "mailto:t@a.example",
      MISSING },
    { "RFC 8460 3: the record sg publishes",
      { "v=TLSRPTv1; rua=mailto:t@a.example", NULL }, "mailto:t@a.example",
      OK },
    { "RFC 8460 3: blanks around ';' and ','",
      { "v=TLSRPTv1 ;rua=mailto:t@a.example , https://r.a.example/v1 ;",
        NULL }, "mailto:t@a.example,https://r.a.example/v1", OK },
    { "RFC 8460 3: the stored rua may have blanks too",
      { "v=TLSRPTv1;rua=mailto:t@a.example,https://r.a.example/v1", NULL },
      "mailto:t@a.example, https://r.a.example/v1", OK },
    { "RFC 8460 3: another address",
      { "v=TLSRPTv1; rua=mailto:other@a.example", NULL },
      "mailto:t@a.example", DIFFERENT },
    { "RFC 8460 3: one URI fewer",
      { "v=TLSRPTv1; rua=mailto:t@a.example", NULL },
      "mailto:t@a.example,https://r.a.example/v1", DIFFERENT },
    { "RFC 8460 3: the URIs in another order",
      { "v=TLSRPTv1; rua=https://r.a.example/v1,mailto:t@a.example", NULL },
      "mailto:t@a.example,https://r.a.example/v1", DIFFERENT },
    { "RFC 8460 3: no rua field",
      { "v=TLSRPTv1; ext=1", NULL }, "mailto:t@a.example", DIFFERENT },
    { "RFC 8460 3: not exactly one record is no TLSRPT for a sender",
      { "v=TLSRPTv1; rua=mailto:t@a.example",
        "v=TLSRPTv1; rua=mailto:t@a.example", NULL }, "mailto:t@a.example",
      DIFFERENT },
};


static const check_case_t  mx_cases[] = {
    { "RFC 5321 5.1: no MX", { NULL }, "sg.a.example", MISSING },
    { "RFC 5321 5.1: the MX is sg", { "sg.a.example", NULL },
      "sg.a.example", OK },
    { "RFC 1035 2.3.3: names compare case-insensitively, the root dot"
      " aside", { "backup.example.", "SG.A.example.", NULL },
      "sg.a.example", OK },
    { "RFC 5321 5.1: the MX is another host", { "mx.other.example", NULL },
      "sg.a.example", DIFFERENT },
    { "RFC 7505: a null MX is not sg", { ".", NULL }, "sg.a.example",
      DIFFERENT },
};


static size_t
records_of(const check_case_t *c, sg_sts_str_t *rec)
{
    size_t  n;

    for (n = 0; c->records[n]; n++) {
        rec[n].data = c->records[n];
        rec[n].len = strlen(c->records[n]);
    }

    return n;
}


/* RFC 8461 3.2: every line "key: value" CRLF, version first */

static int
lines_ok(const char *p, size_t len)
{
    size_t       i;
    const char  *colon, *crlf, *end;

    end = p + len;

    if (len < 16 || memcmp(p, "version: STSv1\r\n", 16) != 0) {
        return 0;
    }

    while (p < end) {
        crlf = NULL;

        for (i = 0; p + i + 1 < end; i++) {
            if (p[i] == '\r' && p[i + 1] == '\n') {
                crlf = p + i;
                break;
            }
        }

        if (crlf == NULL) {
            return 0;
        }

        colon = memchr(p, ':', crlf - p);

        if (colon == NULL || colon == p || colon + 2 > crlf
            || colon[1] != ' ' || colon + 2 == crlf
            || memchr(p, '\n', crlf - p) || memchr(p, '\r', crlf - p))
        {
            return 0;
        }

        p = crlf + 2;
    }

    return 1;
}


static void
test_policy(void)
{
    size_t           n, i;
    char             buf[SG_STS_HOST_POLICY_MAX + 1], small[8];
    char             longmx[32][260];
    sg_sts_str_t     mx[32];
    sg_sts_err_t     err;
    sg_sts_policy_t  pol;

    static const sg_sts_str_t  two[] = {
        S("mx1.a.example"), S("*.mail.a.example")
    };

    static const char  expect[] =
        "version: STSv1\r\nmode: enforce\r\nmx: mx1.a.example\r\n"
        "mx: *.mail.a.example\r\nmax_age: 604800\r\n";

    n = sg_sts_host_policy(buf, sizeof(buf), SG_STS_ENFORCE, two, 2, 604800);
    CHECK(n == sizeof(expect) - 1 && memcmp(buf, expect, n) == 0
          && buf[n] == '\0', "RFC 8461 3.2: the document, CRLF lines");
    CHECK(lines_ok(buf, n), "RFC 8461 3.2: key: value lines");

    CHECK(sg_sts_policy_parse(buf, n, &pol, &err) == SG_STS_OK
          && pol.mode == SG_STS_ENFORCE && pol.max_age == 604800
          && pol.nmx == 2
          && pol.mx[0].len == 13 && memcmp(pol.mx[0].data, "mx1.a.example",
                                           13) == 0
          && pol.mx[1].len == 16 && memcmp(pol.mx[1].data,
                                           "*.mail.a.example", 16) == 0,
          "RFC 8461 3.2: sg's parser reads the enforce policy back");
    CHECK(sg_sts_policy_match(&pol, "x.mail.a.example", 16)
          && sg_sts_policy_match(&pol, "MX1.a.example.", 14)
          && !sg_sts_policy_match(&pol, "mail.a.example", 14),
          "RFC 8461 4.1: the written patterns match as written");

    n = sg_sts_host_policy(buf, sizeof(buf), SG_STS_TESTING, two, 1, 86400);
    CHECK(sg_sts_policy_parse(buf, n, &pol, &err) == SG_STS_OK
          && pol.mode == SG_STS_TESTING && pol.nmx == 1,
          "RFC 8461 3.2: testing");

    /* RFC 8461 8.3: "none" lets senders drop a policy they cached */
    n = sg_sts_host_policy(buf, sizeof(buf), SG_STS_NONE, NULL, 0, 86400);
    CHECK(n == 44 && strcmp(buf, "version: STSv1\r\nmode: none\r\n"
                                 "max_age: 86400\r\n") == 0,
          "RFC 8461 8.3: mode none without mx");
    CHECK(sg_sts_policy_parse(buf, n, &pol, &err) == SG_STS_OK
          && pol.mode == SG_STS_NONE && pol.nmx == 0,
          "RFC 8461 3.2: mx is not required in mode none");

    n = sg_sts_host_policy(buf, sizeof(buf), SG_STS_NONE, two, 2, 86400);
    CHECK(sg_sts_policy_parse(buf, n, &pol, &err) == SG_STS_OK
          && pol.mode == SG_STS_NONE && pol.nmx == 2,
          "RFC 8461 3.2: mode none keeps its mx lines");

    n = sg_sts_host_policy(buf, sizeof(buf), SG_STS_ENFORCE, two, 2, 0);
    CHECK(sg_sts_policy_parse(buf, n, &pol, &err) == SG_STS_OK
          && pol.max_age == 0 && strstr(buf, "\r\nmax_age: 0\r\n"),
          "RFC 8461 3.2: max_age 0 (1*10DIGIT)");

    n = sg_sts_host_policy(buf, sizeof(buf), SG_STS_ENFORCE, two, 2,
                           4294967295u);
    CHECK(sg_sts_policy_parse(buf, n, &pol, &err) == SG_STS_OK
          && pol.max_age == 31557600 && !pol.max_age_clamped,
          "RFC 8461 3.2: max_age above 31557600 is written clamped");

    /* the largest policy the API allows: 32 mx of 2 + 253 octets */

    for (i = 0; i < 32; i++) {
        memset(longmx[i], 'a', 255);
        memcpy(longmx[i], "*.", 2);
        longmx[i][2] = (char) ('a' + i % 26);
        longmx[i][3] = (char) ('a' + i / 26);

        /* labels of 63 octets at most */
        longmx[i][65] = '.';
        longmx[i][129] = '.';
        longmx[i][193] = '.';
        longmx[i][255] = '\0';
        mx[i].data = longmx[i];
        mx[i].len = 255;
    }

    n = sg_sts_host_policy(buf, sizeof(buf), SG_STS_ENFORCE, mx, 32,
                           31557600);
    CHECK(n < sizeof(buf) && buf[n] == '\0',
          "SG_STS_HOST_POLICY_MAX holds 32 mx of 255 octets");
    CHECK(sg_sts_policy_parse(buf, n, &pol, &err) == SG_STS_OK
          && pol.nmx == 32 && lines_ok(buf, n),
          "RFC 8461 3.2: 32 long mx read back");

    /* too small: the length, nothing promised in buf */

    n = sg_sts_host_policy(small, sizeof(small), SG_STS_ENFORCE, two, 2, 1);
    CHECK(n == sizeof(expect) - 1 - 6 + 1, "the length when it does not fit");

    n = sg_sts_host_policy(buf, n + 1, SG_STS_ENFORCE, two, 2, 1);
    CHECK(buf[n] == '\0' && lines_ok(buf, n), "exactly large enough");

    CHECK(sg_sts_host_policy(buf, sizeof(buf), (sg_sts_mode_e) 7, two, 2, 1)
          == 0, "a mode without a name writes nothing");
}


static void
test_records(void)
{
    size_t               n;
    char                 buf[128];
    sg_sts_str_t         s;
    sg_sts_txt_t         rec;
    sg_sts_mode_e        mode;
    sg_sts_txt_result_t  res;

    n = sg_sts_host_txt(buf, sizeof(buf), "20261128T153000Z42", 18);
    CHECK(n == 30 && strcmp(buf, "v=STSv1; id=20261128T153000Z42") == 0,
          "RFC 8461 3.1: the TXT record");

    s.data = buf;
    s.len = n;
    rec.strings = &s;
    rec.nstrings = 1;

    CHECK(sg_sts_txt_parse(&rec, 1, &res, NULL) == SG_STS_OK
          && res.id_len == 18 && strcmp(res.id, "20261128T153000Z42") == 0,
          "RFC 8461 3.1: sg's parser reads the TXT record back");

    n = sg_sts_host_tlsrpt(buf, sizeof(buf), "mailto:t@a.example", 18);
    CHECK(n == 34 && strcmp(buf, "v=TLSRPTv1; rua=mailto:t@a.example") == 0,
          "RFC 8460 3: the TXT record");

    s.len = n;
    CHECK(sg_sts_host_tlsrpt_check(&s, 1, "mailto:t@a.example", 18) == OK,
          "RFC 8460 3: the record written is the record checked");

    CHECK(sg_sts_host_txt(buf, 4, "abc", 3) == 15, "TXT: the length");

    CHECK(sg_sts_host_mode("enforce", 7, &mode) == 0
          && mode == SG_STS_ENFORCE
          && sg_sts_host_mode("none", 4, &mode) == 0 && mode == SG_STS_NONE
          && sg_sts_host_mode("testing", 7, &mode) == 0
          && mode == SG_STS_TESTING
          && sg_sts_host_mode("Enforce", 7, &mode) == -1
          && sg_sts_host_mode("enforc", 6, &mode) == -1,
          "RFC 8461 3.2: the modes, case-sensitive");

    CHECK(strcmp(sg_sts_host_status_name(OK), "ok") == 0
          && strcmp(sg_sts_host_status_name(MISSING), "missing") == 0
          && strcmp(sg_sts_host_status_name(DIFFERENT), "different") == 0,
          "status names");
}


static void
run_checks(const char *what, const check_case_t *cases, size_t n,
    sg_sts_host_status_e (*check)(const sg_sts_str_t *, size_t,
                                  const char *, size_t))
{
    size_t        i, nrec;
    sg_sts_str_t  rec[4];

    for (i = 0; i < n; i++) {
        nrec = records_of(&cases[i], rec);

        CHECK(check(rec, nrec, cases[i].expected, strlen(cases[i].expected))
              == cases[i].status, cases[i].name);
    }

    (void) what;
}


int
main(void)
{
    test_policy();
    test_records();

    run_checks("txt", txt_cases, sizeof(txt_cases) / sizeof(txt_cases[0]),
               sg_sts_host_txt_check);
    run_checks("tlsrpt", tlsrpt_cases,
               sizeof(tlsrpt_cases) / sizeof(tlsrpt_cases[0]),
               sg_sts_host_tlsrpt_check);
    run_checks("mx", mx_cases, sizeof(mx_cases) / sizeof(mx_cases[0]),
               sg_sts_host_mx_check);

    return SG_TEST_DONE();
}
