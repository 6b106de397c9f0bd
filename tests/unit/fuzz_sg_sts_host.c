
/*
 * libFuzzer target for hosting MTA-STS policies (common/sg_sts_host.c):
 * make -C tests/unit fuzz-run.  Input: TXT records as live DNS could hold
 * them (one per line, the first line the expected value), checked as
 * _mta-sts, _smtp._tls and MX records; the lines are also written as the
 * mx of a policy.  Besides memory errors it checks the writer's promise:
 * whatever it is given, when every mx is a valid pattern the document
 * parses (RFC 8461, 3.2) with the same mode, max_age and mx.
 */


#include <stdlib.h>
#include <string.h>

#include "sg_mta_sts.h"
#include "sg_sts_host.h"


#define FUZZ_RECORDS  8


int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);


/* the characters of a pattern: the API lets nothing else through */
static int
ldh(const sg_sts_str_t *s)
{
    size_t  i;
    char    c;

    for (i = 0; i < s->len; i++) {
        c = s->data[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '*'))
        {
            return 0;
        }
    }

    return 1;
}


int
LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    size_t           i, n, len, start;
    uint32_t         max_age;
    sg_sts_err_t     err;
    sg_sts_str_t     rec[FUZZ_RECORDS + 1];
    sg_sts_mode_e    mode;
    sg_sts_policy_t  pol;
    static char      buf[SG_STS_HOST_POLICY_MAX + 64 * 300];
    const char      *p;

    p = (const char *) data;
    n = 0;
    start = 0;

    for (i = 0; i <= size && n <= FUZZ_RECORDS; i++) {
        if (i == size || p[i] == '\n') {
            rec[n].data = p + start;
            rec[n].len = i - start;
            n++;
            start = i + 1;
        }
    }

    if (n == 0) {
        return 0;
    }

    /* rec[0] is the expected value, the others what DNS says */

    (void) sg_sts_host_txt_check(rec + 1, n - 1, rec[0].data, rec[0].len);
    (void) sg_sts_host_tlsrpt_check(rec + 1, n - 1, rec[0].data,
                                    rec[0].len);
    (void) sg_sts_host_mx_check(rec + 1, n - 1, rec[0].data, rec[0].len);

    mode = (sg_sts_mode_e) (size % 3);
    max_age = (uint32_t) (size * 2654435761u);

    len = sg_sts_host_policy(buf, sizeof(buf), mode, rec + 1, n - 1,
                             max_age);

    if (len == 0 || len >= sizeof(buf) || buf[len] != '\0') {
        abort();
    }

    for (i = 1; i < n; i++) {
        if (!ldh(&rec[i])) {
            return 0;
        }
    }

    if (sg_sts_policy_parse(buf, len, &pol, &err) != SG_STS_OK) {
        /* only an mx that is no pattern, or none in testing/enforce */
        return 0;
    }

    if (pol.mode != mode || pol.nmx != n - 1
        || pol.max_age != (max_age > SG_STS_MAX_AGE_MAX
                           ? SG_STS_MAX_AGE_MAX : max_age))
    {
        abort();
    }

    for (i = 0; i < pol.nmx; i++) {
        if (pol.mx[i].len != rec[i + 1].len
            && !(pol.mx[i].len + 1 == rec[i + 1].len
                 && rec[i + 1].data[rec[i + 1].len - 1] == '.'))
        {
            abort();
        }
    }

    return 0;
}
