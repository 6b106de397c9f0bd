/*
 * sg: hosting MTA-STS policies, the pure part.  See sg_sts_host.h.
 */


#include <string.h>

#include "sg_sts_host.h"


#define sg_sts_host_wsp(c)    ((c) == ' ' || (c) == '\t')
#define sg_sts_host_lower(c)  (((c) >= 'A' && (c) <= 'Z') ? ((c) | 0x20) : (c))


/* a writer that counts everything and writes what fits */
typedef struct {
    char        *buf;
    size_t       size;
    size_t       len;
} sg_sts_host_out_t;


static void sg_sts_host_put(sg_sts_host_out_t *o, const char *s, size_t len);
static void sg_sts_host_puts(sg_sts_host_out_t *o, const char *s);
static void sg_sts_host_putn(sg_sts_host_out_t *o, uint32_t n);
static size_t sg_sts_host_end(sg_sts_host_out_t *o);
static size_t sg_sts_host_trim(const char *s, size_t len, size_t *start);
static int sg_sts_host_iequal(const char *a, size_t alen, const char *b,
    size_t blen);
static int sg_sts_host_is_tlsrpt(const char *rec, size_t len);
static int sg_sts_host_tlsrpt_rua(const char *rec, size_t len,
    const char **rua, size_t *rua_len);
static int sg_sts_host_uris_equal(const char *a, size_t alen, const char *b,
    size_t blen);
static size_t sg_sts_host_next_uri(const char *s, size_t len, size_t *pos,
    const char **uri);


static const char  *sg_sts_host_modes[] = { "none", "testing", "enforce" };

static const char  *sg_sts_host_statuses[] = { "ok", "missing", "different" };


const char *
sg_sts_host_mode_name(sg_sts_mode_e mode)
{
    if ((unsigned) mode > SG_STS_ENFORCE) {
        return NULL;
    }

    return sg_sts_host_modes[mode];
}


int
sg_sts_host_mode(const char *s, size_t len, sg_sts_mode_e *mode)
{
    unsigned  i;

    for (i = 0; i <= SG_STS_ENFORCE; i++) {
        if (strlen(sg_sts_host_modes[i]) == len
            && memcmp(sg_sts_host_modes[i], s, len) == 0)
        {
            *mode = (sg_sts_mode_e) i;
            return 0;
        }
    }

    return -1;
}


const char *
sg_sts_host_status_name(sg_sts_host_status_e status)
{
    if ((unsigned) status > SG_STS_HOST_DIFFERENT) {
        return "different";
    }

    return sg_sts_host_statuses[status];
}


/*
 * RFC 8461, 3.2: 'sts-policy-record = sts-policy-field *WSP
 * *(sts-policy-term sts-policy-field *WSP) [sts-policy-term]' with CRLF
 * terms; "version" first (it "MUST be the first field").
 */

size_t
sg_sts_host_policy(char *buf, size_t size, sg_sts_mode_e mode,
    const sg_sts_str_t *mx, size_t nmx, uint32_t max_age)
{
    size_t              i;
    const char         *name;
    sg_sts_host_out_t   o;

    name = sg_sts_host_mode_name(mode);
    if (name == NULL) {
        return 0;
    }

    if (max_age > SG_STS_MAX_AGE_MAX) {
        max_age = SG_STS_MAX_AGE_MAX;
    }

    o.buf = buf;
    o.size = size;
    o.len = 0;

    sg_sts_host_puts(&o, "version: STSv1\r\nmode: ");
    sg_sts_host_puts(&o, name);
    sg_sts_host_puts(&o, "\r\n");

    for (i = 0; i < nmx; i++) {
        sg_sts_host_puts(&o, "mx: ");
        sg_sts_host_put(&o, mx[i].data, mx[i].len);
        sg_sts_host_puts(&o, "\r\n");
    }

    sg_sts_host_puts(&o, "max_age: ");
    sg_sts_host_putn(&o, max_age);
    sg_sts_host_puts(&o, "\r\n");

    return sg_sts_host_end(&o);
}


/* RFC 8461, 3.1: 'sts-text-record = sts-version 1*(sts-field-delim ...)' */

size_t
sg_sts_host_txt(char *buf, size_t size, const char *id, size_t len)
{
    sg_sts_host_out_t  o;

    o.buf = buf;
    o.size = size;
    o.len = 0;

    sg_sts_host_puts(&o, "v=STSv1; id=");
    sg_sts_host_put(&o, id, len);

    return sg_sts_host_end(&o);
}


/* RFC 8460, 3: 'tlsrpt-record = tlsrpt-version 1*(field-delim ...)' */

size_t
sg_sts_host_tlsrpt(char *buf, size_t size, const char *rua, size_t len)
{
    sg_sts_host_out_t  o;

    o.buf = buf;
    o.size = size;
    o.len = 0;

    sg_sts_host_puts(&o, "v=TLSRPTv1; rua=");
    sg_sts_host_put(&o, rua, len);

    return sg_sts_host_end(&o);
}


sg_sts_host_status_e
sg_sts_host_txt_check(const sg_sts_str_t *records, size_t n, const char *id,
    size_t len)
{
    size_t               i;
    sg_sts_rc_e          rc;
    sg_sts_txt_t         recs[16];
    sg_sts_txt_result_t  res;

    /* more records than a sender would sort through: not what sg says */
    if (n > sizeof(recs) / sizeof(recs[0])) {
        n = sizeof(recs) / sizeof(recs[0]);
    }

    for (i = 0; i < n; i++) {
        recs[i].strings = &records[i];
        recs[i].nstrings = 1;
    }

    rc = sg_sts_txt_parse(recs, n, &res, NULL);

    if (rc == SG_STS_TXT_NO_RECORD) {
        return SG_STS_HOST_MISSING;
    }

    if (rc != SG_STS_OK || res.id_len != len
        || memcmp(res.id, id, len) != 0)
    {
        /* RFC 8461, 3.1: the id is compared as is, case-sensitive */
        return SG_STS_HOST_DIFFERENT;
    }

    return SG_STS_HOST_OK;
}


sg_sts_host_status_e
sg_sts_host_tlsrpt_check(const sg_sts_str_t *records, size_t n,
    const char *rua, size_t len)
{
    size_t       i, found, live_len;
    const char  *live;

    found = 0;
    live = NULL;
    live_len = 0;

    for (i = 0; i < n; i++) {

        /* RFC 8460, 3: 'tlsrpt-version = %s"v=TLSRPTv1"', then a delim */

        if (!sg_sts_host_is_tlsrpt(records[i].data, records[i].len)) {
            continue;
        }

        if (found++ == 0) {
            if (sg_sts_host_tlsrpt_rua(records[i].data, records[i].len,
                                       &live, &live_len)
                != 0)
            {
                live = NULL;
            }
        }
    }

    if (found == 0) {
        return SG_STS_HOST_MISSING;
    }

    /* RFC 8460, 3: "If the number of resulting records is not one" ... */

    if (found > 1 || live == NULL
        || !sg_sts_host_uris_equal(live, live_len, rua, len))
    {
        return SG_STS_HOST_DIFFERENT;
    }

    return SG_STS_HOST_OK;
}


sg_sts_host_status_e
sg_sts_host_mx_check(const sg_sts_str_t *mx, size_t n, const char *host,
    size_t len)
{
    size_t  i, l;

    if (n == 0) {
        return SG_STS_HOST_MISSING;
    }

    if (len > 1 && host[len - 1] == '.') {
        len--;
    }

    for (i = 0; i < n; i++) {
        l = mx[i].len;

        if (l > 1 && mx[i].data[l - 1] == '.') {
            l--;
        }

        if (sg_sts_host_iequal(mx[i].data, l, host, len)) {
            return SG_STS_HOST_OK;
        }
    }

    return SG_STS_HOST_DIFFERENT;
}


/*
 * RFC 8460, 3: "v=TLSRPTv1" and then the end or a field delimiter
 * ('field-delim = *WSP ";" *WSP'): "v=TLSRPTv10; ..." is another version.
 * 1 or 0.
 */

static int
sg_sts_host_is_tlsrpt(const char *rec, size_t len)
{
    size_t  i;

    if (len < 10 || memcmp(rec, "v=TLSRPTv1", 10) != 0) {
        return 0;
    }

    for (i = 10; i < len && sg_sts_host_wsp(rec[i]); i++) { /* void */ }

    return i == len || rec[i] == ';';
}


/*
 * The rua= value of a record sg_sts_host_is_tlsrpt() took: fields are
 * separated by ";" with blanks around it; the first rua= counts.  0, or
 * -1 when there is none.
 */

static int
sg_sts_host_tlsrpt_rua(const char *rec, size_t len, const char **rua,
    size_t *rua_len)
{
    size_t  i, start, end, fs, fl;

    for (i = 10; i < len && rec[i] != ';'; i++) { /* void */ }

    while (i < len) {
        /* rec[i] is ';' */
        start = ++i;

        while (i < len && rec[i] != ';') {
            i++;
        }

        end = i;
        fl = sg_sts_host_trim(rec + start, end - start, &fs);

        if (fl >= 4 && memcmp(rec + start + fs, "rua=", 4) == 0) {
            *rua = rec + start + fs + 4;
            *rua_len = fl - 4;
            return 0;
        }
    }

    return -1;
}


/* the same URIs in the same order; blanks around the commas ignored */

static int
sg_sts_host_uris_equal(const char *a, size_t alen, const char *b,
    size_t blen)
{
    size_t       ap, bp, al, bl;
    const char  *au, *bu;

    ap = 0;
    bp = 0;

    for ( ;; ) {
        al = sg_sts_host_next_uri(a, alen, &ap, &au);
        bl = sg_sts_host_next_uri(b, blen, &bp, &bu);

        if (au == NULL || bu == NULL) {
            return au == bu;
        }

        if (al != bl || memcmp(au, bu, al) != 0) {
            return 0;
        }
    }
}


/* the next comma-separated URI from *pos, trimmed; *uri NULL at the end */

static size_t
sg_sts_host_next_uri(const char *s, size_t len, size_t *pos,
    const char **uri)
{
    size_t  start, end, off, l;

    if (*pos > len) {
        *uri = NULL;
        return 0;
    }

    start = *pos;
    end = start;

    while (end < len && s[end] != ',') {
        end++;
    }

    *pos = end + 1;

    l = sg_sts_host_trim(s + start, end - start, &off);

    if (l == 0 && end == len && start == 0) {
        /* an empty list */
        *uri = NULL;
        return 0;
    }

    *uri = s + start + off;

    return l;
}


static size_t
sg_sts_host_trim(const char *s, size_t len, size_t *start)
{
    size_t  b, e;

    b = 0;
    e = len;

    while (b < e && sg_sts_host_wsp(s[b])) {
        b++;
    }

    while (e > b && sg_sts_host_wsp(s[e - 1])) {
        e--;
    }

    *start = b;

    return e - b;
}


static int
sg_sts_host_iequal(const char *a, size_t alen, const char *b, size_t blen)
{
    size_t  i;

    if (alen != blen) {
        return 0;
    }

    for (i = 0; i < alen; i++) {
        if (sg_sts_host_lower((unsigned char) a[i])
            != sg_sts_host_lower((unsigned char) b[i]))
        {
            return 0;
        }
    }

    return 1;
}


static void
sg_sts_host_put(sg_sts_host_out_t *o, const char *s, size_t len)
{
    if (o->len < o->size && o->size - o->len > len) {
        memcpy(o->buf + o->len, s, len);
    }

    o->len += len;
}


static void
sg_sts_host_puts(sg_sts_host_out_t *o, const char *s)
{
    sg_sts_host_put(o, s, strlen(s));
}


static void
sg_sts_host_putn(sg_sts_host_out_t *o, uint32_t n)
{
    char    digits[10];
    size_t  i;

    i = sizeof(digits);

    do {
        digits[--i] = (char) ('0' + n % 10);
        n /= 10;
    } while (n && i);

    sg_sts_host_put(o, digits + i, sizeof(digits) - i);
}


/* NUL-terminate when everything fitted; the length either way */

static size_t
sg_sts_host_end(sg_sts_host_out_t *o)
{
    if (o->len < o->size) {
        o->buf[o->len] = '\0';
    }

    return o->len;
}
