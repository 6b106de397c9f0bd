/*
 * libFuzzer target for common/sg_mta_sts.c: make -C tests/unit fuzz-run.
 * The input is parsed as a policy body, as TXT records (0xff ends a
 * record, 0xfe a character-string: neither can be part of a valid one),
 * as a Content-Type value, and split at its first 0xfd into an mx pattern
 * and a host for the matcher.  Besides memory errors (ASan, UBSan) it
 * checks the parsers' promises: results point into the input, the limits
 * of RFC 8461, 3.1 and 3.2 hold, and what the policy parser accepts
 * matches what the matcher expects.
 */


#include <stdlib.h>
#include <string.h>

#include "sg_mta_sts.h"


#define FUZZ_RECORDS    8
#define FUZZ_STRINGS    8


static void
check_err(const sg_sts_err_t *err, sg_sts_rc_e rc, size_t lines,
    size_t len)
{
    if (err->rc != rc || rc >= SG_STS_RC_LAST
        || sg_sts_strerror(rc) == NULL)
    {
        abort();
    }

    if (rc == SG_STS_OK && (err->line != 0 || err->offset != 0)) {
        abort();
    }

    if (err->line > lines || err->offset > len) {
        abort();
    }
}


static void
check_policy(const char *body, size_t len)
{
    char             host[SG_STS_DOMAIN_MAX + 3];
    size_t           i, lines;
    sg_sts_rc_e      rc;
    sg_sts_err_t     err;
    sg_sts_policy_t  p;
    const char      *mx;

    rc = sg_sts_policy_parse(body, len, &p, &err);

    lines = 1;

    for (i = 0; i < len; i++) {
        lines += (body[i] == '\n');
    }

    check_err(&err, rc, lines, len > SG_STS_POLICY_MAX ? SG_STS_POLICY_MAX
                                                         : len);

    if (rc != SG_STS_OK) {
        return;
    }

    if (len > SG_STS_POLICY_MAX || p.nmx > SG_STS_MX_MAX
        || p.max_age > SG_STS_MAX_AGE_MAX
        || (p.mode != SG_STS_NONE && p.nmx == 0)
        || (p.mode != SG_STS_NONE && p.mode != SG_STS_TESTING
            && p.mode != SG_STS_ENFORCE))
    {
        abort();
    }

    for (i = 0; i < p.nmx; i++) {
        mx = p.mx[i].data;

        if (mx < body || mx + p.mx[i].len > body + len || p.mx[i].len == 0
            || p.mx[i].len > SG_STS_DOMAIN_MAX + 2)
        {
            abort();
        }

        /* RFC 8461, 4.1: a plain pattern matches itself, "*.d" "x.d" */
        if (p.mx[i].len > 2 && mx[0] == '*' && mx[1] == '.') {
            host[0] = 'x';
            memcpy(host + 1, mx + 1, p.mx[i].len - 1);

            if (!sg_sts_mx_match(mx, p.mx[i].len, host, p.mx[i].len)
                || sg_sts_mx_match(mx, p.mx[i].len, mx + 2,
                                   p.mx[i].len - 2))
            {
                abort();
            }

        } else if (!sg_sts_mx_match(mx, p.mx[i].len, mx, p.mx[i].len)) {
            abort();
        }
    }
}


static void
check_txt(const char *data, size_t len)
{
    size_t               i, j, start, nrec, nstr;
    sg_sts_rc_e          rc, rc1;
    sg_sts_err_t         err;
    sg_sts_str_t         strs[FUZZ_RECORDS][FUZZ_STRINGS];
    sg_sts_txt_t         recs[FUZZ_RECORDS];
    sg_sts_txt_result_t  res, res1;

    nrec = 0;
    nstr = 0;
    start = 0;

    for (i = 0; i <= len && nrec < FUZZ_RECORDS; i++) {

        if (i < len && (unsigned char) data[i] < 0xfe) {
            continue;
        }

        if (nstr < FUZZ_STRINGS) {
            strs[nrec][nstr].data = data + start;
            strs[nrec][nstr].len = i - start;
            nstr++;
        }

        start = i + 1;

        if (i == len || (unsigned char) data[i] == 0xff) {
            recs[nrec].strings = strs[nrec];
            recs[nrec].nstrings = nstr;
            nrec++;
            nstr = 0;
        }
    }

    rc = sg_sts_txt_parse(recs, nrec, &res, &err);
    check_err(&err, rc, nrec, len);

    if (rc != SG_STS_OK) {
        if (res.id_len != 0 || res.id[0] != '\0') {
            abort();
        }

        return;
    }

    if (res.id_len == 0 || res.id_len > SG_STS_ID_MAX
        || res.id[res.id_len] != '\0' || strlen(res.id) != res.id_len
        || res.record >= nrec)
    {
        abort();
    }

    for (j = 0; j < res.id_len; j++) {
        if (!((res.id[j] >= 'a' && res.id[j] <= 'z')
              || (res.id[j] >= 'A' && res.id[j] <= 'Z')
              || (res.id[j] >= '0' && res.id[j] <= '9')))
        {
            abort();
        }
    }

    /* the chosen record alone gives the same id */
    rc1 = sg_sts_txt_parse_record(&recs[res.record], &res1, NULL);

    if (rc1 != SG_STS_OK || strcmp(res.id, res1.id) != 0) {
        abort();
    }
}


int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);


int
LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    const char  *s, *sep;

    s = (const char *) data;

    check_policy(s, size);
    check_txt(s, size);

    (void) sg_sts_content_type_ok(s, size);

    sep = memchr(s, 0xfd, size);

    if (sep != NULL) {
        (void) sg_sts_mx_match(s, sep - s, sep + 1, size - (sep - s) - 1);
    }

    return 0;
}
