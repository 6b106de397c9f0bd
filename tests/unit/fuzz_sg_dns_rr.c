
/*
 * libFuzzer target for the DNS wire parsers (common/sg_dns_rr.c):
 * make -C tests/unit fuzz-run.  Input is MX rdata as a server could send
 * it; besides memory errors it checks the parser's promises: names are
 * lower-case host names of at most 253 characters, within the input, and
 * ordering keeps preferences sorted.
 */


#include <stdlib.h>
#include <string.h>

#include "sg_dns_rr.h"


int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);


static unsigned long
rnd(void *data, unsigned long n)
{
    unsigned long  *state = data;

    *state = *state * 6364136223846793005UL + 1442695040888963407UL;

    return (*state >> 33) % n;
}


int
LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    size_t           i, n, used, off, len;
    unsigned long    state;
    sg_dns_rr_mx_t   mx[8];
    sg_dns_rr_ip_t   ip;
    char             name[SG_DNS_RR_NAME_MAX + 1];

    if (sg_dns_rr_name(data, size, &used, name, sizeof(name)) == 0) {
        if (used > size || strlen(name) > SG_DNS_RR_NAME_MAX) {
            abort();
        }

        for (i = 0; name[i]; i++) {
            if (name[i] >= 'A' && name[i] <= 'Z') {
                abort();
            }
        }
    }

    /* the input as up to 8 rdata, each prefixed by a length octet */

    n = 0;

    for (off = 0; off < size && n < 8; off += len) {
        len = data[off++];

        if (len > size - off) {
            len = size - off;
        }

        if (sg_dns_rr_mx(data + off, len, &mx[n]) == 0) {
            if (mx[n].len != strlen(mx[n].name)) {
                abort();
            }

            n++;
        }
    }

    (void) sg_dns_rr_null_mx(mx, n);

    state = size;
    n = sg_dns_rr_mx_order(mx, n, rnd, &state);

    for (i = 1; i < n; i++) {
        if (mx[i].pref < mx[i - 1].pref || mx[i].len == 0) {
            abort();
        }
    }

    if (n && sg_dns_rr_mx_drop_self(mx, n, mx[n - 1].name, mx[n - 1].len)
             >= n)
    {
        abort();
    }

    (void) sg_dns_rr_ip_literal((const char *) data, size, &ip);

    return 0;
}
