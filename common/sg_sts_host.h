/*
 * sg: hosting the MTA-STS policies of local domains, the pure part: the
 * policy document sg serves at https://mta-sts.<domain>/.well-known/
 * mta-sts.txt (RFC 8461, 3.2), the DNS records an operator publishes for
 * it (RFC 8461, 3.1; RFC 8460, 3), and the comparison of each with what
 * live DNS says.  No I/O, no allocation.
 *
 * Pure C (no nginx types): unit-tested in tests/unit/test_sg_sts_host.c,
 * where every policy written is read back by sg's own parser.
 */

#ifndef _SG_STS_HOST_H_INCLUDED_
#define _SG_STS_HOST_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>

#include "sg_mta_sts.h"         /* sg_sts_str_t, sg_sts_mode_e */


/* 32 mx of at most "*." and 253 octets, and the other lines */
#define SG_STS_HOST_POLICY_MAX  (64 + 32 * (4 + 2 + 253 + 2))


typedef enum {
    SG_STS_HOST_OK = 0,         /* live DNS says what sg publishes */
    SG_STS_HOST_MISSING,        /* no such record */
    SG_STS_HOST_DIFFERENT       /* a record, but not the expected one */
} sg_sts_host_status_e;


/* "none", "testing", "enforce"; NULL for anything else */
const char *sg_sts_host_mode_name(sg_sts_mode_e mode);

/* "none", "testing", "enforce" (len octets) to *mode; 0, or -1 */
int sg_sts_host_mode(const char *s, size_t len, sg_sts_mode_e *mode);

/*
 * RFC 8461, 3.2: "version: STSv1", "mode: M", one "mx: P" per pattern in
 * order, "max_age: N" (clamped to 31557600), each line ending in CRLF.
 * Returns the length of the document; it is written, NUL-terminated, only
 * when size is larger than that.  0: a mode that has no name.
 */
size_t sg_sts_host_policy(char *buf, size_t size, sg_sts_mode_e mode,
    const sg_sts_str_t *mx, size_t nmx, uint32_t max_age);

/* RFC 8461, 3.1: "v=STSv1; id=ID"; the length, written as above */
size_t sg_sts_host_txt(char *buf, size_t size, const char *id, size_t len);

/* RFC 8460, 3: "v=TLSRPTv1; rua=RUA"; the length, written as above */
size_t sg_sts_host_tlsrpt(char *buf, size_t size, const char *rua,
    size_t len);

/*
 * Live TXT records at _mta-sts.<domain> (each one's strings joined), as a
 * sender reads them (RFC 8461, 3.1): none starting "v=STSv1" is MISSING;
 * exactly one, valid, with this id is OK; anything else (another id, two
 * records, a record that does not parse) is DIFFERENT.
 */
sg_sts_host_status_e sg_sts_host_txt_check(const sg_sts_str_t *records,
    size_t n, const char *id, size_t len);

/*
 * Live TXT records at _smtp._tls.<domain> (RFC 8460, 3): those not
 * starting "v=TLSRPTv1" are discarded; none left is MISSING; exactly one
 * whose rua= lists the URIs of rua in the same order (blanks around the
 * commas ignored) is OK; anything else is DIFFERENT.
 */
sg_sts_host_status_e sg_sts_host_tlsrpt_check(const sg_sts_str_t *records,
    size_t n, const char *rua, size_t len);

/*
 * Live MX exchanges of the domain (lower case or not, a trailing dot or
 * not): none is MISSING; one of them equal to host is OK; else DIFFERENT.
 */
sg_sts_host_status_e sg_sts_host_mx_check(const sg_sts_str_t *mx, size_t n,
    const char *host, size_t len);

/* "ok", "missing", "different" */
const char *sg_sts_host_status_name(sg_sts_host_status_e status);


#endif /* _SG_STS_HOST_H_INCLUDED_ */
