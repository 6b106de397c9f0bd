/*
 * sg: MTA-STS (RFC 8461), the pure part: the "_mta-sts" TXT record parser
 * (3.1), the policy parser (3.2), the Content-Type check of the policy
 * fetch (3.2, 3.3) and the MX matcher (4.1).  No I/O, no allocation: the
 * caller provides the result structures; policy mx patterns point into the
 * caller's body, which must outlive the policy structure.
 */

#ifndef _SG_MTA_STS_H_INCLUDED_
#define _SG_MTA_STS_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>

#include "sg_tls_policy.h"      /* sg_sts_mode_e */


#define SG_STS_ID_MAX           32          /* RFC 8461, 3.1: 1*32 */
#define SG_STS_EXT_NAME_MAX     32          /* RFC 8461, 3.1 and 3.2 */
#define SG_STS_POLICY_MAX       65536       /* RFC 8461, 3.3: 64 KiB */
#define SG_STS_MX_MAX           64          /* mx lines kept, then error */
#define SG_STS_MAX_AGE_DIGITS   10          /* RFC 8461, 3.2: 1*10DIGIT */
#define SG_STS_MAX_AGE_MAX      31557600    /* RFC 8461, 3.2; clamped */
#define SG_STS_DOMAIN_MAX       253         /* RFC 1035, 2.3.4, as text */
#define SG_STS_LABEL_MAX        63          /* RFC 1035, 2.3.4 */


typedef enum {
    SG_STS_OK = 0,

    /* the TXT record, RFC 8461, 3.1 */
    SG_STS_TXT_NO_RECORD,       /* no record starts with "v=STSv1" */
    SG_STS_TXT_MULTIPLE,        /* more than one record does */
    SG_STS_TXT_VERSION,         /* "v=STSv1" not followed by ";" or end */
    SG_STS_TXT_FIELD,           /* a field is not name=value */
    SG_STS_TXT_EXT_NAME,        /* bad field name */
    SG_STS_TXT_EXT_VALUE,       /* bad or empty extension value */
    SG_STS_TXT_ID,              /* id empty, too long, not ALPHA/DIGIT */
    SG_STS_TXT_NO_ID,           /* no id field */

    /* the policy, RFC 8461, 3.2 */
    SG_STS_POL_TOO_LARGE,       /* body above SG_STS_POLICY_MAX */
    SG_STS_POL_NO_COLON,        /* a line is not key ":" value */
    SG_STS_POL_KEY,             /* bad key (empty, long, bad char) */
    SG_STS_POL_EXT_VALUE,       /* bad or empty extension value */
    SG_STS_POL_VERSION,         /* version is not "STSv1" */
    SG_STS_POL_MODE,            /* mode not enforce, testing or none */
    SG_STS_POL_MAX_AGE,         /* max_age not 1 to 10 digits */
    SG_STS_POL_MX,              /* mx not ["*."] A-label domain */
    SG_STS_POL_MX_TOO_MANY,     /* more than SG_STS_MX_MAX mx lines */
    SG_STS_POL_NO_VERSION,
    SG_STS_POL_NO_MODE,
    SG_STS_POL_NO_MAX_AGE,
    SG_STS_POL_NO_MX,           /* mode enforce or testing without mx */

    SG_STS_RC_LAST
} sg_sts_rc_e;


/* where a parser stopped: enough for a person to fix the record or policy */
typedef struct {
    sg_sts_rc_e     rc;
    size_t          line;       /* policy: line, from 1; TXT: record,
                                   from 1; 0: about the whole input */
    size_t          offset;     /* byte offset of the bad field or line in
                                   the body or in the joined record */
} sg_sts_err_t;


typedef struct {
    const char     *data;
    size_t          len;
} sg_sts_str_t;


/* one TXT resource record: its character-strings, joined without spaces */
typedef struct {
    const sg_sts_str_t  *strings;
    size_t               nstrings;
} sg_sts_txt_t;


typedef struct {
    char            id[SG_STS_ID_MAX + 1];  /* NUL-terminated */
    size_t          id_len;
    size_t          record;     /* index of the chosen record */
} sg_sts_txt_result_t;


typedef struct {
    sg_sts_mode_e   mode;
    uint32_t        max_age;            /* seconds, clamped */
    unsigned        max_age_clamped:1;  /* the policy said more */
    size_t          nmx;
    sg_sts_str_t    mx[SG_STS_MX_MAX];  /* into the body, as written
                                           ("*." kept), a trailing dot
                                           left out */
} sg_sts_policy_t;


/*
 * RFC 8461, 3.1: of nrecords TXT records, keep those starting "v=STSv1";
 * exactly one must remain and parse.  err may be NULL.
 */
sg_sts_rc_e sg_sts_txt_parse(const sg_sts_txt_t *records, size_t nrecords,
    sg_sts_txt_result_t *res, sg_sts_err_t *err);

/* one record, already known to be the one: the id into res */
sg_sts_rc_e sg_sts_txt_parse_record(const sg_sts_txt_t *record,
    sg_sts_txt_result_t *res, sg_sts_err_t *err);

/* RFC 8461, 3.2: the policy body (len bytes, not NUL-terminated) */
sg_sts_rc_e sg_sts_policy_parse(const char *body, size_t len,
    sg_sts_policy_t *policy, sg_sts_err_t *err);

/* RFC 8461, 4.1: 1 when host (an MX name) matches one pattern */
int sg_sts_mx_match(const char *pattern, size_t plen, const char *host,
    size_t hlen);

/* RFC 8461, 4.1: 1 when host matches any mx of the policy */
int sg_sts_policy_match(const sg_sts_policy_t *policy, const char *host,
    size_t hlen);

/* RFC 8461, 3.2: 1 when a Content-Type value is text/plain (parameters
 * allowed, ignored) */
int sg_sts_content_type_ok(const char *value, size_t len);

/* for people: the log, the API, the TLS report's failure detail */
const char *sg_sts_strerror(sg_sts_rc_e rc);


#endif /* _SG_MTA_STS_H_INCLUDED_ */
