/*
 * libFuzzer target: the TXT wire format and the Redis records of the
 * MTA-STS cache (common/sg_sts_cache.c).  A value in Redis is input like
 * any other: another node, another version, or anyone who can write there.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sg_sts_cache.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t            n;
    json_t           *doc;
    int64_t           at;
    const char       *why, *id, *rt, *reason;
    json_error_t      jerr;
    sg_sts_str_t      s[SG_STS_TXT_STRINGS_MAX];
    sg_sts_record_t   r;

    (void) sg_sts_txt_split(data, size, s, SG_STS_TXT_STRINGS_MAX, &n);

    doc = json_loadb((const char *) data, size, 0, &jerr);
    if (doc == NULL) {
        return 0;
    }

    if (sg_sts_record_decode(doc, &r, &why) == 0) {
        /* what decode accepts, encode writes back */
        char  *json = sg_sts_record_encode(r.domain, r.id, r.text,
                                           r.text_len, r.fetched_at,
                                           &r.policy);
        free(json);
    }

    (void) sg_sts_failure_decode(doc, &id, &at, &rt, &reason);

    json_decref(doc);

    return 0;
}
