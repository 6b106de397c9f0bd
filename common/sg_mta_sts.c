/*
 * sg: MTA-STS (RFC 8461), the pure part.  See sg_mta_sts.h.
 *
 * Both parsers follow the ABNF of RFC 8461, 3.1 and 3.2; where sg decides
 * something the RFC leaves open, the comment says "decision" and the unit
 * test of the same name covers it (../shared/RFC-NOTES.md, MTA-STS).
 */


#include <string.h>

#include "sg_mta_sts.h"


#define sg_sts_wsp(c)     ((c) == ' ' || (c) == '\t')
#define sg_sts_alpha(c)   (((c) >= 'a' && (c) <= 'z')                        \
                           || ((c) >= 'A' && (c) <= 'Z'))
#define sg_sts_digit(c)   ((c) >= '0' && (c) <= '9')
#define sg_sts_alnum(c)   (sg_sts_alpha(c) || sg_sts_digit(c))
#define sg_sts_lower(c)   (((c) >= 'A' && (c) <= 'Z') ? ((c) | 0x20) : (c))


/* a cursor over the character-strings of one TXT record, joined */
typedef struct {
    const sg_sts_txt_t  *rec;
    size_t               si;        /* string */
    size_t               off;       /* in that string */
    size_t               pos;       /* in the joined record */
} sg_sts_cur_t;


static sg_sts_rc_e sg_sts_error(sg_sts_err_t *err, sg_sts_rc_e rc,
    size_t line, size_t offset);
static int sg_sts_cur_peek(sg_sts_cur_t *c);
static void sg_sts_cur_next(sg_sts_cur_t *c);
static int sg_sts_txt_is_sts(const sg_sts_txt_t *record, sg_sts_cur_t *c);
static sg_sts_rc_e sg_sts_txt_field(sg_sts_cur_t *c, sg_sts_txt_result_t *res,
    int *have_id);
static int sg_sts_ext_name_valid(const char *p, size_t len);
static int sg_sts_ext_value_valid(const char *p, size_t len);
static size_t sg_sts_utf8_len(const unsigned char *p, size_t len);
static size_t sg_sts_skip_wsp(const char *p, size_t i, size_t end);
static int sg_sts_mx_valid(const char *p, size_t len);
static int sg_sts_label_valid(const char *p, size_t len);
static int sg_sts_equal(const char *a, size_t alen, const char *b);
static int sg_sts_iequal(const char *a, const char *b, size_t len);


static const char  sg_sts_version[] = "v=STSv1";


static const char  *sg_sts_errors[SG_STS_RC_LAST] = {
    "ok",

    "no TXT record starts with \"v=STSv1\"",
    "more than one TXT record starts with \"v=STSv1\"",
    "\"v=STSv1\" is not followed by \";\"",
    "TXT record field is not name=value",
    "TXT record field name is invalid",
    "TXT record extension value is empty or invalid",
    "TXT record id is not 1 to 32 letters or digits",
    "TXT record has no id",

    "policy is larger than 64 KiB",
    "policy line is not \"key: value\"",
    "policy key is invalid",
    "policy extension value is empty or invalid",
    "policy version is not \"STSv1\"",
    "policy mode is not enforce, testing or none",
    "policy max_age is not 1 to 10 digits",
    "policy mx is not a host name or \"*.\" and a host name in A-labels",
    "policy has more than 64 mx lines",
    "policy has no version",
    "policy has no mode",
    "policy has no max_age",
    "policy in mode enforce or testing has no mx"
};


static sg_sts_rc_e
sg_sts_error(sg_sts_err_t *err, sg_sts_rc_e rc, size_t line, size_t offset)
{
    if (err != NULL) {
        err->rc = rc;
        err->line = line;
        err->offset = offset;
    }

    return rc;
}


static int
sg_sts_cur_peek(sg_sts_cur_t *c)
{
    while (c->si < c->rec->nstrings) {

        if (c->off < c->rec->strings[c->si].len) {
            return (unsigned char) c->rec->strings[c->si].data[c->off];
        }

        c->si++;
        c->off = 0;
    }

    return -1;
}


static void
sg_sts_cur_next(sg_sts_cur_t *c)
{
    if (sg_sts_cur_peek(c) != -1) {
        c->off++;
        c->pos++;
    }
}


/*
 * RFC 8461, 3.1: "records that do not begin with "v=STSv1;" are
 * discarded"; sg keeps every record beginning "v=STSv1" (case-sensitive)
 * and lets the parser reject "v=STSv10", so that such a record next to a
 * good one still counts as a second record (RFC-NOTES).
 */

static int
sg_sts_txt_is_sts(const sg_sts_txt_t *record, sg_sts_cur_t *c)
{
    size_t  i;

    c->rec = record;
    c->si = 0;
    c->off = 0;
    c->pos = 0;

    for (i = 0; i < sizeof(sg_sts_version) - 1; i++) {
        if (sg_sts_cur_peek(c) != (unsigned char) sg_sts_version[i]) {
            return 0;
        }

        sg_sts_cur_next(c);
    }

    return 1;
}


sg_sts_rc_e
sg_sts_txt_parse(const sg_sts_txt_t *records, size_t nrecords,
    sg_sts_txt_result_t *res, sg_sts_err_t *err)
{
    size_t        i, found, count;
    sg_sts_rc_e   rc;
    sg_sts_cur_t  c;

    memset(res, 0, sizeof(sg_sts_txt_result_t));

    found = 0;
    count = 0;

    for (i = 0; i < nrecords; i++) {

        if (!sg_sts_txt_is_sts(&records[i], &c)) {
            continue;
        }

        /* RFC 8461, 3.1: "If the number of resulting records is not one" */
        if (count++ > 0) {
            return sg_sts_error(err, SG_STS_TXT_MULTIPLE, i + 1, 0);
        }

        found = i;
    }

    if (count == 0) {
        return sg_sts_error(err, SG_STS_TXT_NO_RECORD, 0, 0);
    }

    rc = sg_sts_txt_parse_record(&records[found], res, err);

    res->record = found;

    if (rc != SG_STS_OK && err != NULL) {
        err->line = found + 1;
    }

    return rc;
}


sg_sts_rc_e
sg_sts_txt_parse_record(const sg_sts_txt_t *record, sg_sts_txt_result_t *res,
    sg_sts_err_t *err)
{
    int           ch, have_id;
    size_t        start;
    sg_sts_rc_e   rc;
    sg_sts_cur_t  c;

    memset(res, 0, sizeof(sg_sts_txt_result_t));

    if (!sg_sts_txt_is_sts(record, &c)) {
        return sg_sts_error(err, SG_STS_TXT_NO_RECORD, 1, 0);
    }

    /*
     * RFC 8461, 3.1: sts-text-record = sts-version
     * 1*(sts-field-delim sts-field) [sts-field-delim],
     * sts-field-delim = *WSP ";" *WSP
     */

    while (sg_sts_wsp(sg_sts_cur_peek(&c))) {
        sg_sts_cur_next(&c);
    }

    ch = sg_sts_cur_peek(&c);

    if (ch == -1) {
        return sg_sts_error(err, SG_STS_TXT_NO_ID, 1, c.pos);
    }

    if (ch != ';') {
        /* "v=STSv10", "v=STSv1 id=..." */
        return sg_sts_error(err, SG_STS_TXT_VERSION, 1, 0);
    }

    have_id = 0;

    while (sg_sts_cur_peek(&c) == ';') {
        sg_sts_cur_next(&c);

        while (sg_sts_wsp(sg_sts_cur_peek(&c))) {
            sg_sts_cur_next(&c);
        }

        ch = sg_sts_cur_peek(&c);

        if (ch == -1 || ch == ';') {
            /*
             * decision (RFC-NOTES): empty fields are tolerated, "id=a;;"
             * and a trailing ";" with whitespace after it
             */
            continue;
        }

        start = c.pos;

        rc = sg_sts_txt_field(&c, res, &have_id);
        if (rc != SG_STS_OK) {
            memset(res, 0, sizeof(sg_sts_txt_result_t));
            return sg_sts_error(err, rc, 1, start);
        }
    }

    if (!have_id) {
        /* RFC 8461, 3.1: "id" is required */
        return sg_sts_error(err, SG_STS_TXT_NO_ID, 1, c.pos);
    }

    return sg_sts_error(err, SG_STS_OK, 0, 0);
}


/*
 * One field, the cursor on its first character; it ends on ";" or at the
 * end of the record.  The whitespace before ";" belongs to the delimiter.
 */

static sg_sts_rc_e
sg_sts_txt_field(sg_sts_cur_t *c, sg_sts_txt_result_t *res, int *have_id)
{
    int     ch, bad, is_id;
    char    name[SG_STS_EXT_NAME_MAX], id[SG_STS_ID_MAX];
    size_t  nlen, vlen, wsp;

    nlen = 0;
    bad = 0;

    for ( ;; ) {
        ch = sg_sts_cur_peek(c);

        if (ch == -1 || ch == ';') {
            return SG_STS_TXT_FIELD;
        }

        if (ch == '=') {
            break;
        }

        if (nlen < SG_STS_EXT_NAME_MAX) {
            name[nlen] = (char) ch;

        } else {
            bad = 1;
        }

        nlen++;
        sg_sts_cur_next(c);
    }

    sg_sts_cur_next(c);

    /* RFC 8461, 3.1: sts-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT /
     * "_" / "-" / ".") */
    if (bad || !sg_sts_ext_name_valid(name, nlen)) {
        return SG_STS_TXT_EXT_NAME;
    }

    is_id = (nlen == 2 && name[0] == 'i' && name[1] == 'd');

    vlen = 0;
    wsp = 0;

    for ( ;; ) {
        ch = sg_sts_cur_peek(c);

        if (ch == -1 || ch == ';') {
            break;
        }

        sg_sts_cur_next(c);

        if (sg_sts_wsp(ch)) {
            wsp++;
            continue;
        }

        if (wsp) {
            /* whitespace inside a value, or between "=" and the value */
            bad = 1;
        }

        if (is_id) {
            /* RFC 8461, 3.1: sts-id = %s"id=" 1*32(ALPHA / DIGIT) */
            if (!sg_sts_alnum(ch)) {
                bad = 1;

            } else if (vlen < SG_STS_ID_MAX) {
                id[vlen] = (char) ch;
            }

        } else if (ch < 0x21 || ch > 0x7e || ch == '=') {
            /* RFC 8461, 3.1: sts-ext-value = 1*(%x21-3A / %x3C / %x3E-7E) */
            bad = 1;
        }

        vlen++;
    }

    if (!is_id) {
        return (bad || vlen == 0) ? SG_STS_TXT_EXT_VALUE : SG_STS_OK;
    }

    if (bad || vlen == 0 || vlen > SG_STS_ID_MAX) {
        return SG_STS_TXT_ID;
    }

    /* decision (as RFC 8461, 3.2 says for policies): the first id wins */
    if (!*have_id) {
        memcpy(res->id, id, vlen);
        res->id[vlen] = '\0';
        res->id_len = vlen;
        *have_id = 1;
    }

    return SG_STS_OK;
}


/* RFC 8461, 3.1 and 3.2: the extension name, both the same */

static int
sg_sts_ext_name_valid(const char *p, size_t len)
{
    size_t  i;

    if (len == 0 || len > SG_STS_EXT_NAME_MAX || !sg_sts_alnum(p[0])) {
        return 0;
    }

    for (i = 1; i < len; i++) {
        if (!sg_sts_alnum(p[i]) && p[i] != '_' && p[i] != '-'
            && p[i] != '.')
        {
            return 0;
        }
    }

    return 1;
}


/*
 * RFC 8461, 3.2: sts-policy-ext-value = sts-policy-vchar
 * [*(%x20 / sts-policy-vchar) sts-policy-vchar], sts-policy-vchar =
 * %x21-7E / UTF8-2 / UTF8-3 / UTF8-4; p is already without the
 * surrounding whitespace, so only a TAB inside is left to reject.
 */

static int
sg_sts_ext_value_valid(const char *p, size_t len)
{
    size_t                n;
    const unsigned char  *u, *end;

    if (len == 0) {
        return 0;
    }

    u = (const unsigned char *) p;
    end = u + len;

    while (u < end) {

        if (*u >= 0x20 && *u <= 0x7e) {
            u++;
            continue;
        }

        n = sg_sts_utf8_len(u, end - u);
        if (n < 2) {
            return 0;
        }

        u += n;
    }

    return 1;
}


/* RFC 3629, 4: the length of one well-formed UTF-8 sequence, or 0 */

static size_t
sg_sts_utf8_len(const unsigned char *p, size_t len)
{
    size_t         n, i;
    unsigned char  lo, hi;

    lo = 0x80;
    hi = 0xbf;

    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        n = 2;

    } else if (p[0] >= 0xe0 && p[0] <= 0xef) {
        n = 3;

        if (p[0] == 0xe0) {
            lo = 0xa0;                          /* no overlong form */

        } else if (p[0] == 0xed) {
            hi = 0x9f;                          /* no surrogates */
        }

    } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        n = 4;

        if (p[0] == 0xf0) {
            lo = 0x90;

        } else if (p[0] == 0xf4) {
            hi = 0x8f;                          /* up to U+10FFFF */
        }

    } else {
        return 0;
    }

    if (len < n || p[1] < lo || p[1] > hi) {
        return 0;
    }

    for (i = 2; i < n; i++) {
        if (p[i] < 0x80 || p[i] > 0xbf) {
            return 0;
        }
    }

    return n;
}


sg_sts_rc_e
sg_sts_policy_parse(const char *body, size_t len, sg_sts_policy_t *policy,
    sg_sts_err_t *err)
{
    int          have_version, have_mode, have_max_age;
    size_t       line, i, klen, vlen, ls, le, vs;
    uint64_t     age;
    const char  *p, *end, *key, *val, *nl;

    memset(policy, 0, sizeof(sg_sts_policy_t));
    policy->mode = SG_STS_NONE;

    /* RFC 8461, 3.3: a body size limit; sg's is 64 KiB (RFC-NOTES) */
    if (len > SG_STS_POLICY_MAX) {
        return sg_sts_error(err, SG_STS_POL_TOO_LARGE, 0, SG_STS_POLICY_MAX);
    }

    have_version = 0;
    have_mode = 0;
    have_max_age = 0;

    p = body;
    end = body + len;
    line = 0;

    while (p < end) {
        line++;

        /* RFC 8461, 3.2: sts-policy-term = LF / CRLF */
        nl = memchr(p, '\n', end - p);
        le = (nl != NULL) ? (size_t) (nl - body) : len;
        ls = p - body;
        p = (nl != NULL) ? nl + 1 : end;

        if (le > ls && body[le - 1] == '\r') {
            le--;
        }

        /* trailing *WSP after a field (RFC 8461, 3.2) */
        while (le > ls && sg_sts_wsp(body[le - 1])) {
            le--;
        }

        if (le == ls) {
            /*
             * decision: an empty (or whitespace-only) line is skipped; a
             * blank line after the last field is a common publishing
             * slip and costs nothing to accept
             */
            continue;
        }

        key = body + ls;
        nl = memchr(key, ':', le - ls);

        if (nl == NULL) {
            return sg_sts_error(err, SG_STS_POL_NO_COLON, line, ls);
        }

        klen = nl - key;
        /* sts-policy-field-delim = ":" *WSP */
        vs = sg_sts_skip_wsp(body, ls + klen + 1, le);

        val = body + vs;
        vlen = le - vs;

        /* RFC 8461, 3.2: field names are case-sensitive (%s"...") */

        if (sg_sts_equal(key, klen, "version")) {

            if (!sg_sts_equal(val, vlen, "STSv1")) {
                return sg_sts_error(err, SG_STS_POL_VERSION, line,
                                    val - body);
            }

            have_version = 1;

        } else if (sg_sts_equal(key, klen, "mode")) {

            /*
             * RFC 8461, 3.2: "If any field is not syntactically valid,
             * the entire policy SHOULD be ignored", a repeated one too
             */

            if (sg_sts_equal(val, vlen, "enforce")) {
                i = SG_STS_ENFORCE;

            } else if (sg_sts_equal(val, vlen, "testing")) {
                i = SG_STS_TESTING;

            } else if (sg_sts_equal(val, vlen, "none")) {
                i = SG_STS_NONE;

            } else {
                return sg_sts_error(err, SG_STS_POL_MODE, line, val - body);
            }

            /* RFC 8461, 3.2: a repeated field other than mx: the first */
            if (!have_mode) {
                policy->mode = (sg_sts_mode_e) i;
                have_mode = 1;
            }

        } else if (sg_sts_equal(key, klen, "max_age")) {

            /* RFC 8461, 3.2: sts-policy-max-age-value = 1*10(DIGIT) */

            if (vlen == 0 || vlen > SG_STS_MAX_AGE_DIGITS) {
                return sg_sts_error(err, SG_STS_POL_MAX_AGE, line,
                                    val - body);
            }

            age = 0;

            for (i = 0; i < vlen; i++) {
                if (!sg_sts_digit(val[i])) {
                    return sg_sts_error(err, SG_STS_POL_MAX_AGE, line,
                                        val - body);
                }

                age = age * 10 + (val[i] - '0');
            }

            if (!have_max_age) {
                /* decision (RFC-NOTES): above 31557600, clamped */
                if (age > SG_STS_MAX_AGE_MAX) {
                    age = SG_STS_MAX_AGE_MAX;
                    policy->max_age_clamped = 1;
                }

                policy->max_age = (uint32_t) age;
                have_max_age = 1;
            }

        } else if (sg_sts_equal(key, klen, "mx")) {

            /* decision: one trailing dot of an mx pattern is ignored */
            if (vlen > 1 && val[vlen - 1] == '.') {
                vlen--;
            }

            if (!sg_sts_mx_valid(val, vlen)) {
                return sg_sts_error(err, SG_STS_POL_MX, line, val - body);
            }

            if (policy->nmx == SG_STS_MX_MAX) {
                return sg_sts_error(err, SG_STS_POL_MX_TOO_MANY, line,
                                    val - body);
            }

            policy->mx[policy->nmx].data = val;
            policy->mx[policy->nmx].len = vlen;
            policy->nmx++;

        } else {

            /* RFC 8461, 3.2: unknown fields are ignored, but must parse */

            if (!sg_sts_ext_name_valid(key, klen)) {
                return sg_sts_error(err, SG_STS_POL_KEY, line, ls);
            }

            if (!sg_sts_ext_value_valid(val, vlen)) {
                return sg_sts_error(err, SG_STS_POL_EXT_VALUE, line,
                                    val - body);
            }
        }
    }

    if (!have_version) {
        return sg_sts_error(err, SG_STS_POL_NO_VERSION, 0, 0);
    }

    if (!have_mode) {
        return sg_sts_error(err, SG_STS_POL_NO_MODE, 0, 0);
    }

    if (!have_max_age) {
        return sg_sts_error(err, SG_STS_POL_NO_MAX_AGE, 0, 0);
    }

    /* RFC 8461, 3.2: mx is required unless the mode is "none" */
    if (policy->mode != SG_STS_NONE && policy->nmx == 0) {
        return sg_sts_error(err, SG_STS_POL_NO_MX, 0, 0);
    }

    return sg_sts_error(err, SG_STS_OK, 0, 0);
}


static size_t
sg_sts_skip_wsp(const char *p, size_t i, size_t end)
{
    while (i < end && sg_sts_wsp(p[i])) {
        i++;
    }

    return i;
}


/*
 * RFC 8461, 3.2: sts-policy-mx-value = ["*."] Domain, Domain of RFC 5321,
 * 4.1.2 in A-labels only ("U-labels are not allowed", 3.2); label and name
 * lengths of RFC 1035, 2.3.4.
 */

static int
sg_sts_mx_valid(const char *p, size_t len)
{
    size_t  i, start;

    if (len >= 2 && p[0] == '*' && p[1] == '.') {
        p += 2;
        len -= 2;
    }

    if (len == 0 || len > SG_STS_DOMAIN_MAX) {
        return 0;
    }

    start = 0;

    for (i = 0; i <= len; i++) {
        if (i == len || p[i] == '.') {
            if (!sg_sts_label_valid(p + start, i - start)) {
                return 0;
            }

            start = i + 1;
        }
    }

    return 1;
}


/* RFC 5321, 4.1.2: sub-domain = Let-dig [Ldh-str] */

static int
sg_sts_label_valid(const char *p, size_t len)
{
    size_t  i;

    if (len == 0 || len > SG_STS_LABEL_MAX
        || p[0] == '-' || p[len - 1] == '-')
    {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (!sg_sts_alnum(p[i]) && p[i] != '-') {
            return 0;
        }
    }

    return 1;
}


/*
 * RFC 8461, 4.1: the MX host matches a pattern case-insensitively; a
 * "*." pattern matches exactly one extra left-most label, never the
 * parent domain and never two labels.
 */

int
sg_sts_mx_match(const char *pattern, size_t plen, const char *host,
    size_t hlen)
{
    size_t  slen, llen;

    /* a trailing dot (a fully qualified MX name) is not significant */
    if (hlen > 1 && host[hlen - 1] == '.') {
        hlen--;
    }

    if (plen > 1 && pattern[plen - 1] == '.') {
        plen--;
    }

    if (plen == 0 || hlen == 0) {
        return 0;
    }

    if (plen < 2 || pattern[0] != '*' || pattern[1] != '.') {
        return hlen == plen && sg_sts_iequal(pattern, host, hlen);
    }

    /* the suffix, with its leading dot: ".example.com" */
    pattern++;
    slen = plen - 1;

    if (slen < 2 || hlen <= slen) {
        return 0;
    }

    llen = hlen - slen;

    /* the one label the wildcard stands for: LDH, no dot */
    return sg_sts_label_valid(host, llen)
           && sg_sts_iequal(host + llen, pattern, slen);
}


int
sg_sts_policy_match(const sg_sts_policy_t *policy, const char *host,
    size_t hlen)
{
    size_t  i;

    for (i = 0; i < policy->nmx; i++) {
        if (sg_sts_mx_match(policy->mx[i].data, policy->mx[i].len, host,
                            hlen))
        {
            return 1;
        }
    }

    return 0;
}


/*
 * RFC 8461, 3.2: the media type "MUST be text/plain"; "Additional
 * Content-Type parameters are ignored" (a charset, typically).  Type and
 * subtype are case-insensitive (RFC 7231, 3.1.1.1); OWS around the value
 * and before ";" is allowed.
 */

int
sg_sts_content_type_ok(const char *value, size_t len)
{
    size_t  i;

    static const char  tp[] = "text/plain";

    i = 0;

    while (i < len && sg_sts_wsp(value[i])) {
        i++;
    }

    if (len - i < sizeof(tp) - 1
        || !sg_sts_iequal(value + i, tp, sizeof(tp) - 1))
    {
        return 0;
    }

    i += sizeof(tp) - 1;

    while (i < len && sg_sts_wsp(value[i])) {
        i++;
    }

    return i == len || value[i] == ';';
}


const char *
sg_sts_strerror(sg_sts_rc_e rc)
{
    if ((unsigned) rc >= SG_STS_RC_LAST) {
        return "unknown error";
    }

    return sg_sts_errors[rc];
}


static int
sg_sts_equal(const char *a, size_t alen, const char *b)
{
    size_t  blen;

    blen = strlen(b);

    return alen == blen && memcmp(a, b, alen) == 0;
}


static int
sg_sts_iequal(const char *a, const char *b, size_t len)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        if (sg_sts_lower((unsigned char) a[i])
            != sg_sts_lower((unsigned char) b[i]))
        {
            return 0;
        }
    }

    return 1;
}
