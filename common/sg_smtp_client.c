
/*
 * sg: the SMTP client's protocol core, pure.
 *
 * References: RFC 5321 (SMTP; sections without an RFC number are from it),
 * RFC 3463 and RFC 2034 (enhanced status codes), RFC 1870 (SIZE),
 * RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8), RFC 3461 (DSN), RFC 8689
 * (REQUIRETLS), RFC 2920 (PIPELINING), RFC 3207 (STARTTLS), RFC 8460
 * (TLS reporting).
 */


#include <string.h>

#include "sg_smtp_client.h"


typedef unsigned char  sg_u_char;


/* sg_smtp_dot_t states */
#define SG_SMTP_DOT_BOL   0       /* at the start of a line */
#define SG_SMTP_DOT_MID   1       /* inside a line */
#define SG_SMTP_DOT_CR    2       /* a CR was seen, not yet written */


#define sg_smtp_c_digit(c)     ((c) >= '0' && (c) <= '9')
#define sg_smtp_c_alpha(c)                                                   \
    (((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z'))
#define sg_smtp_c_lower(c)                                                   \
    (((c) >= 'A' && (c) <= 'Z') ? ((c) | 0x20) : (c))

/* RFC 3461, 4: hexchar digits are upper case */
#define sg_smtp_c_xhex(c)                                                    \
    (sg_smtp_c_digit(c) || ((c) >= 'A' && (c) <= 'F'))


static sg_smtp_reply_rc_e sg_smtp_reply_line(sg_smtp_reply_t *r);
static void sg_smtp_reply_status(sg_smtp_reply_t *r, const sg_u_char *p,
    size_t len);
static void sg_smtp_reply_text(sg_smtp_reply_t *r, const sg_u_char *p,
    size_t len);
static int sg_smtp_caseeq(const char *p, size_t len, const char *s);
static int sg_smtp_addr_check(const char *p, size_t len, int *utf8);
static int sg_smtp_xtext_check(const char *p, size_t len);
static int sg_smtp_notify_check(const char *p, size_t len);
static int sg_smtp_orcpt_check(const char *p, size_t len);
static char *sg_smtp_put(char *p, const char *end, const char *s,
    size_t len);
static char *sg_smtp_put_u64(char *p, const char *end, uint64_t v);


typedef struct {
    const char               *name;
    unsigned                  ext;
} sg_smtp_keyword_t;


/* RFC 5321, 4.1.1.1: the EHLO keywords the client acts on */
static const sg_smtp_keyword_t  sg_smtp_keywords[] = {
    { "STARTTLS", SG_SMTP_EXT_STARTTLS },
    { "PIPELINING", SG_SMTP_EXT_PIPELINING },
    { "SIZE", SG_SMTP_EXT_SIZE },
    { "8BITMIME", SG_SMTP_EXT_8BITMIME },
    { "SMTPUTF8", SG_SMTP_EXT_SMTPUTF8 },
    { "DSN", SG_SMTP_EXT_DSN },
    { "REQUIRETLS", SG_SMTP_EXT_REQUIRETLS },
    { "ENHANCEDSTATUSCODES", SG_SMTP_EXT_ENHANCEDSTATUSCODES },
    { "CHUNKING", SG_SMTP_EXT_CHUNKING }
};

#define sg_smtp_nkeywords                                                    \
    (sizeof(sg_smtp_keywords) / sizeof(sg_smtp_keywords[0]))


/* the reply parser */

void
sg_smtp_reply_init(sg_smtp_reply_t *r, sg_smtp_reply_line_pt handler,
    void *data)
{
    r->code = 0;
    r->lines = 0;
    r->status[0] = '\0';
    r->text[0] = '\0';
    r->text_len = 0;
    r->truncated = 0;
    r->error = NULL;
    r->line_handler = handler;
    r->line_data = data;
    r->line_len = 0;
}


sg_smtp_reply_rc_e
sg_smtp_reply_parse(sg_smtp_reply_t *r, const unsigned char *in, size_t len,
    size_t *consumed)
{
    size_t              i;
    sg_smtp_reply_rc_e  rc;

    for (i = 0; i < len; i++) {

        if (in[i] != '\n') {

            /*
             * RFC 5321, 4.5.3.1.5: 512 octets; leniently up to
             * SG_SMTP_REPLY_LINE_MAX with the line's CRLF
             */
            if (r->line_len >= SG_SMTP_REPLY_LINE_MAX - 1) {
                *consumed = i + 1;
                r->error = "reply line too long";
                return SG_SMTP_REPLY_ERROR;
            }

            r->line[r->line_len++] = (char) in[i];
            continue;
        }

        /* RFC 5321, 2.3.8: lines end with CRLF; a bare LF is tolerated */
        if (r->line_len > 0 && r->line[r->line_len - 1] == '\r') {
            r->line_len--;
        }

        rc = sg_smtp_reply_line(r);
        r->line_len = 0;

        if (rc != SG_SMTP_REPLY_AGAIN) {
            *consumed = i + 1;
            return rc;
        }
    }

    *consumed = len;

    return SG_SMTP_REPLY_AGAIN;
}


static sg_smtp_reply_rc_e
sg_smtp_reply_line(sg_smtp_reply_t *r)
{
    int               last;
    size_t            len, skip;
    unsigned          code;
    const sg_u_char  *p;

    p = (const sg_u_char *) r->line;
    len = r->line_len;

    /* RFC 5321, 4.2: Reply-code [ ( SP / "-" ) textstring ] CRLF */

    if (len < 3
        || !sg_smtp_c_digit(p[0]) || !sg_smtp_c_digit(p[1])
        || !sg_smtp_c_digit(p[2]))
    {
        r->error = "malformed reply code";
        return SG_SMTP_REPLY_ERROR;
    }

    code = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');

    /* RFC 5321, 4.2.1: replies a client acts on are 2yz to 5yz */
    if (code < 200 || code > 599) {
        r->error = "reply code out of range";
        return SG_SMTP_REPLY_ERROR;
    }

    if (len == 3) {
        /* RFC 5321, 4.2: the text of the last line is optional */
        last = 1;
        skip = 3;

    } else if (p[3] == ' ') {
        last = 1;
        skip = 4;

    } else if (p[3] == '-') {
        last = 0;
        skip = 4;

    } else {
        r->error = "malformed reply line";
        return SG_SMTP_REPLY_ERROR;
    }

    if (r->lines == 0) {
        r->code = code;
        sg_smtp_reply_status(r, p + skip, len - skip);

    } else if (code != r->code) {
        /* RFC 5321, 4.2.1: every line of a reply has the same code */
        r->error = "reply code changes within a multiline reply";
        return SG_SMTP_REPLY_ERROR;
    }

    if (r->lines == SG_SMTP_REPLY_LINES_MAX) {
        r->error = "too many reply lines";
        return SG_SMTP_REPLY_ERROR;
    }

    if (r->line_handler) {
        r->line_handler(r->line_data, r->lines, (const char *) p + skip,
                        len - skip);
    }

    r->lines++;

    sg_smtp_reply_text(r, p, len);

    return last ? SG_SMTP_REPLY_DONE : SG_SMTP_REPLY_AGAIN;
}


/*
 * RFC 3463, 2: status-code = class "." subject "." detail, class "2", "4"
 * or "5", subject and detail 1*3digit; RFC 2034, 4: it starts the text,
 * followed by SP.  RFC 3463, 3.1: its class agrees with the reply code's
 * first digit, otherwise it is not taken for a status code.
 */

static void
sg_smtp_reply_status(sg_smtp_reply_t *r, const sg_u_char *p, size_t len)
{
    size_t  i, part, digits;

    if (len < 5 || r->code / 100 == 3
        || p[0] != (sg_u_char) ('0' + r->code / 100) || p[1] != '.')
    {
        return;
    }

    part = 0;
    digits = 0;

    for (i = 2; i < len; i++) {

        if (sg_smtp_c_digit(p[i])) {
            if (++digits > 3) {
                return;
            }

            continue;
        }

        if (digits == 0) {
            return;
        }

        if (p[i] == '.' && part == 0) {
            part = 1;
            digits = 0;
            continue;
        }

        break;
    }

    if (part != 1 || digits == 0 || (i < len && p[i] != ' ')) {
        return;
    }

    /* at most "5.999.999": 9 octets, SG_SMTP_STATUS_MAX holds them */
    memcpy(r->status, p, i);
    r->status[i] = '\0';
}


static void
sg_smtp_reply_text(sg_smtp_reply_t *r, const sg_u_char *p, size_t len)
{
    size_t  i, room;

    room = SG_SMTP_REPLY_TEXT_MAX - 1 - r->text_len;

    if (r->lines > 1) {
        if (room < 3) {
            r->truncated = 1;
            return;
        }

        memcpy(r->text + r->text_len, " / ", 3);
        r->text_len += 3;
        room -= 3;
    }

    if (len > room) {
        len = room;
        r->truncated = 1;
    }

    for (i = 0; i < len; i++) {
        /* logs and reports get no control characters */
        r->text[r->text_len++] = (p[i] < 0x20 || p[i] == 0x7f) ? '?'
                                                               : (char) p[i];
    }

    r->text[r->text_len] = '\0';
}


/* EHLO capabilities */

void
sg_smtp_ehlo_init(sg_smtp_ehlo_t *e)
{
    e->exts = 0;
    e->size = 0;
}


void
sg_smtp_ehlo_line(void *data, unsigned index, const char *text, size_t len)
{
    sg_smtp_ehlo_t *e = data;

    size_t       n, i, k;
    uint64_t     v;
    const char  *param;

    /* RFC 5321, 4.1.1.1: the first line is the server's name, greeting */
    if (index == 0) {
        return;
    }

    /* ehlo-line = ehlo-keyword *( SP ehlo-param ); keyword ends at SP */
    for (n = 0; n < len && text[n] != ' '; n++) {
        /* void */
    }

    for (k = 0; k < sg_smtp_nkeywords; k++) {
        if (sg_smtp_caseeq(text, n, sg_smtp_keywords[k].name)) {
            break;
        }
    }

    if (k == sg_smtp_nkeywords) {
        return;
    }

    e->exts |= sg_smtp_keywords[k].ext;

    if (sg_smtp_keywords[k].ext != SG_SMTP_EXT_SIZE) {
        return;
    }

    /*
     * RFC 1870, 4: size-param = [1*DIGIT], 0 means no fixed limit; a
     * value that is not a number, or too big to matter, is no limit
     */
    e->size = 0;

    while (n < len && text[n] == ' ') {
        n++;
    }

    param = text + n;
    len -= n;

    while (len > 0 && param[len - 1] == ' ') {
        len--;
    }

    if (len == 0 || len > 18) {
        return;
    }

    v = 0;

    for (i = 0; i < len; i++) {
        if (!sg_smtp_c_digit(param[i])) {
            return;
        }

        v = v * 10 + (uint64_t) (param[i] - '0');
    }

    e->size = v;
}


unsigned
sg_smtp_ehlo_parse(const char *reply, size_t len, sg_smtp_ehlo_t *e)
{
    size_t              used;
    sg_smtp_ehlo_t      caps;
    sg_smtp_reply_t     r;
    sg_smtp_reply_rc_e  rc;

    sg_smtp_ehlo_init(e);
    sg_smtp_ehlo_init(&caps);
    sg_smtp_reply_init(&r, sg_smtp_ehlo_line, &caps);

    rc = sg_smtp_reply_parse(&r, (const unsigned char *) reply, len, &used);

    if (rc != SG_SMTP_REPLY_DONE || used != len) {
        return 0;
    }

    if (r.code == 250) {
        *e = caps;
    }

    return r.code;
}


/* MAIL FROM and RCPT TO */

sg_smtp_build_rc_e
sg_smtp_build_mail(const sg_smtp_mail_t *m, unsigned exts, char *out,
    size_t size, size_t *n, const char **detail)
{
    int          utf8;
    char        *p, *end;
    const char  *dummy;

    if (detail == NULL) {
        detail = &dummy;
    }

    *detail = NULL;
    *n = 0;

    if (!sg_smtp_addr_check(m->sender, m->sender_len, &utf8)) {
        *detail = "invalid sender address";
        return SG_SMTP_BUILD_INVALID;
    }

    /* RFC 6531, 3.2: no SMTPUTF8 at the peer, no UTF-8 to it */
    if ((m->smtputf8 || utf8) && !(exts & SG_SMTP_EXT_SMTPUTF8)) {
        *detail = "the next hop does not support SMTPUTF8";
        return SG_SMTP_BUILD_NEED_SMTPUTF8;
    }

    /* RFC 8689, 4.1: REQUIRETLS only to a peer that lists it */
    if (m->requiretls && !(exts & SG_SMTP_EXT_REQUIRETLS)) {
        *detail = "the next hop does not support REQUIRETLS";
        return SG_SMTP_BUILD_NEED_REQUIRETLS;
    }

    if (exts & SG_SMTP_EXT_DSN) {

        /* RFC 3461, 4.3: ret-value = "FULL" / "HDRS" */
        if (m->ret_len
            && !sg_smtp_caseeq(m->ret, m->ret_len, "FULL")
            && !sg_smtp_caseeq(m->ret, m->ret_len, "HDRS"))
        {
            *detail = "invalid RET value";
            return SG_SMTP_BUILD_INVALID;
        }

        /* RFC 3461, 4.4: envid-value = xtext of at most 100 characters */
        if (m->envid_len
            && (m->envid_len > 100
                || !sg_smtp_xtext_check(m->envid, m->envid_len)))
        {
            *detail = "invalid ENVID value";
            return SG_SMTP_BUILD_INVALID;
        }
    }

    p = out;
    end = out + size;

    /* RFC 5321, 4.1.1.2: "MAIL FROM:" Reverse-path [SP Mail-parameters] */
    p = sg_smtp_put(p, end, "MAIL FROM:<", 11);
    p = sg_smtp_put(p, end, m->sender, m->sender_len);
    p = sg_smtp_put(p, end, ">", 1);

    /* RFC 1870, 6: SIZE=n, the message size in octets */
    if ((exts & SG_SMTP_EXT_SIZE) && m->size > 0) {
        p = sg_smtp_put(p, end, " SIZE=", 6);
        p = sg_smtp_put_u64(p, end, m->size);
    }

    /* RFC 6152, 3: BODY=8BITMIME */
    if ((exts & SG_SMTP_EXT_8BITMIME) && m->eightbit) {
        p = sg_smtp_put(p, end, " BODY=8BITMIME", 14);
    }

    /* RFC 6531, 3.4: the SMTPUTF8 parameter */
    if (m->smtputf8 || utf8) {
        p = sg_smtp_put(p, end, " SMTPUTF8", 9);
    }

    /* RFC 3461, 4.3 and 4.4: only to a peer that offers DSN */
    if (exts & SG_SMTP_EXT_DSN) {
        if (m->ret_len) {
            p = sg_smtp_put(p, end, " RET=", 5);
            p = sg_smtp_put(p, end, m->ret, m->ret_len);
        }

        if (m->envid_len) {
            p = sg_smtp_put(p, end, " ENVID=", 7);
            p = sg_smtp_put(p, end, m->envid, m->envid_len);
        }
    }

    /* RFC 8689, 3: the REQUIRETLS MAIL parameter, no value */
    if (m->requiretls) {
        p = sg_smtp_put(p, end, " REQUIRETLS", 11);
    }

    p = sg_smtp_put(p, end, "\r\n", 2);

    if (p == NULL) {
        *detail = "MAIL command too long";
        return SG_SMTP_BUILD_TOO_LONG;
    }

    *n = (size_t) (p - out);

    return SG_SMTP_BUILD_OK;
}


sg_smtp_build_rc_e
sg_smtp_build_rcpt(const sg_smtp_rcpt_t *r, unsigned exts, char *out,
    size_t size, size_t *n, const char **detail)
{
    int          utf8;
    char        *p, *end;
    const char  *dummy;

    if (detail == NULL) {
        detail = &dummy;
    }

    *detail = NULL;
    *n = 0;

    /* RFC 5321, 4.1.1.3: Forward-path is never empty */
    if (r->address_len == 0
        || !sg_smtp_addr_check(r->address, r->address_len, &utf8))
    {
        *detail = "invalid recipient address";
        return SG_SMTP_BUILD_INVALID;
    }

    if (utf8 && !(exts & SG_SMTP_EXT_SMTPUTF8)) {
        *detail = "the next hop does not support SMTPUTF8";
        return SG_SMTP_BUILD_NEED_SMTPUTF8;
    }

    if (exts & SG_SMTP_EXT_DSN) {

        if (r->notify_len && !sg_smtp_notify_check(r->notify, r->notify_len))
        {
            *detail = "invalid NOTIFY value";
            return SG_SMTP_BUILD_INVALID;
        }

        /* RFC 3461, 4.2: ORCPT at most 500 characters */
        if (r->orcpt_len
            && (r->orcpt_len > 500
                || !sg_smtp_orcpt_check(r->orcpt, r->orcpt_len)))
        {
            *detail = "invalid ORCPT value";
            return SG_SMTP_BUILD_INVALID;
        }
    }

    p = out;
    end = out + size;

    /* RFC 5321, 4.1.1.3: "RCPT TO:" Forward-path [SP Rcpt-parameters] */
    p = sg_smtp_put(p, end, "RCPT TO:<", 9);
    p = sg_smtp_put(p, end, r->address, r->address_len);
    p = sg_smtp_put(p, end, ">", 1);

    /* RFC 3461, 4.1 and 4.2: only to a peer that offers DSN */
    if (exts & SG_SMTP_EXT_DSN) {
        if (r->notify_len) {
            p = sg_smtp_put(p, end, " NOTIFY=", 8);
            p = sg_smtp_put(p, end, r->notify, r->notify_len);
        }

        if (r->orcpt_len) {
            p = sg_smtp_put(p, end, " ORCPT=", 7);
            p = sg_smtp_put(p, end, r->orcpt, r->orcpt_len);
        }
    }

    p = sg_smtp_put(p, end, "\r\n", 2);

    if (p == NULL) {
        *detail = "RCPT command too long";
        return SG_SMTP_BUILD_TOO_LONG;
    }

    *n = (size_t) (p - out);

    return SG_SMTP_BUILD_OK;
}


int
sg_smtp_addr_utf8(const char *addr, size_t len)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        if ((sg_u_char) addr[i] >= 0x80) {
            return 1;
        }
    }

    return 0;
}


/*
 * An address goes between "<" and ">" as it was received and stored; it
 * must not carry what would end or split the command line (RFC 5321,
 * 4.1.2: no control characters in a Path; RFC-NOTES, smuggling)
 */

static int
sg_smtp_addr_check(const char *p, size_t len, int *utf8)
{
    size_t     i;
    sg_u_char  c;

    *utf8 = 0;

    for (i = 0; i < len; i++) {
        c = (sg_u_char) p[i];

        if (c < 0x20 || c == 0x7f) {
            return 0;
        }

        if (c >= 0x80) {
            *utf8 = 1;
        }
    }

    return 1;
}


/* RFC 3461, 4: xtext = *( xchar / hexchar ), no SP, "+" or "=" as such */

static int
sg_smtp_xtext_check(const char *p, size_t len)
{
    size_t     i;
    sg_u_char  c;

    for (i = 0; i < len; i++) {
        c = (sg_u_char) p[i];

        if (c == '+') {
            if (len - i < 3) {
                return 0;
            }

            if (!sg_smtp_c_xhex((sg_u_char) p[i + 1])
                || !sg_smtp_c_xhex((sg_u_char) p[i + 2]))
            {
                return 0;
            }

            i += 2;
            continue;
        }

        if (c < 0x21 || c > 0x7e || c == '=') {
            return 0;
        }
    }

    return 1;
}


/* RFC 3461, 4.1: "NEVER" / 1#( "SUCCESS" / "FAILURE" / "DELAY" ) */

static int
sg_smtp_notify_check(const char *p, size_t len)
{
    size_t  i, start;

    if (sg_smtp_caseeq(p, len, "NEVER")) {
        return 1;
    }

    start = 0;

    for (i = 0; i <= len; i++) {
        if (i < len && p[i] != ',') {
            continue;
        }

        if (!sg_smtp_caseeq(p + start, i - start, "SUCCESS")
            && !sg_smtp_caseeq(p + start, i - start, "FAILURE")
            && !sg_smtp_caseeq(p + start, i - start, "DELAY"))
        {
            return 0;
        }

        start = i + 1;
    }

    return 1;
}


/*
 * RFC 3461, 4.2: original-recipient-address = addr-type ";" xtext, with
 * addr-type an atom; RFC 6533, 3: "utf-8" addresses use the same xtext
 * escapes for what is not printable ASCII
 */

static int
sg_smtp_orcpt_check(const char *p, size_t len)
{
    size_t     i;
    sg_u_char  c;

    for (i = 0; i < len && p[i] != ';'; i++) {
        c = (sg_u_char) p[i];

        if (!sg_smtp_c_alpha(c) && !sg_smtp_c_digit(c) && c != '-') {
            return 0;
        }
    }

    if (i == 0 || i == len || i + 1 == len) {
        return 0;
    }

    return sg_smtp_xtext_check(p + i + 1, len - i - 1);
}


static int
sg_smtp_caseeq(const char *p, size_t len, const char *s)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        if (s[i] == '\0'
            || sg_smtp_c_lower((sg_u_char) p[i])
               != sg_smtp_c_lower((sg_u_char) s[i]))
        {
            return 0;
        }
    }

    return s[len] == '\0';
}


/* appends, or returns NULL (and keeps returning it) when out of room */

static char *
sg_smtp_put(char *p, const char *end, const char *s, size_t len)
{
    if (p == NULL || (size_t) (end - p) < len) {
        return NULL;
    }

    if (len) {
        memcpy(p, s, len);
    }

    return p + len;
}


static char *
sg_smtp_put_u64(char *p, const char *end, uint64_t v)
{
    char    buf[20];
    size_t  n;

    n = sizeof(buf);

    do {
        buf[--n] = (char) ('0' + v % 10);
        v /= 10;
    } while (v);

    return sg_smtp_put(p, end, buf + n, sizeof(buf) - n);
}


/* the DATA encoder */

void
sg_smtp_dot_init(sg_smtp_dot_t *d)
{
    d->state = SG_SMTP_DOT_BOL;
}


size_t
sg_smtp_dot_encode(sg_smtp_dot_t *d, const unsigned char *in, size_t len,
    unsigned char *out, size_t size, size_t *consumed)
{
    size_t     i, o;
    sg_u_char  c;

    o = 0;

    for (i = 0; i < len && size - o >= SG_SMTP_DOT_STEP_MAX; i++) {
        c = in[i];

        if (d->state == SG_SMTP_DOT_CR) {
            /* RFC 5321, 2.3.8: CR only in CRLF; a bare CR ends a line */
            out[o++] = '\r';
            out[o++] = '\n';
            d->state = SG_SMTP_DOT_BOL;

            if (c == '\n') {
                continue;
            }
        }

        switch (c) {

        case '\r':
            d->state = SG_SMTP_DOT_CR;
            break;

        case '\n':
            /* RFC 5321, 2.3.8: a bare LF becomes CRLF */
            out[o++] = '\r';
            out[o++] = '\n';
            d->state = SG_SMTP_DOT_BOL;
            break;

        case '.':
            /* RFC 5321, 4.5.2: a line starting with "." gets another */
            if (d->state == SG_SMTP_DOT_BOL) {
                out[o++] = '.';
            }

            out[o++] = '.';
            d->state = SG_SMTP_DOT_MID;
            break;

        default:
            out[o++] = c;
            d->state = SG_SMTP_DOT_MID;
        }
    }

    *consumed = i;

    return o;
}


size_t
sg_smtp_dot_finish(sg_smtp_dot_t *d, unsigned char *out, size_t size)
{
    size_t  o;

    if (size < SG_SMTP_DOT_FINISH_MAX) {
        return 0;
    }

    o = 0;

    /* RFC 5321, 4.1.1.4: the data ends with CRLF "." CRLF */
    if (d->state != SG_SMTP_DOT_BOL) {
        out[o++] = '\r';
        out[o++] = '\n';
    }

    out[o++] = '.';
    out[o++] = '\r';
    out[o++] = '\n';

    d->state = SG_SMTP_DOT_BOL;

    return o;
}


/* TLS facts to RFC 8460 result types */

const char *
sg_smtp_tls_result_type(const sg_smtp_tls_facts_t *f)
{
    /* RFC 8460, 4.3.1: "the recipient MX did not support STARTTLS" */
    if (!f->starttls_offered) {
        return "starttls-not-supported";
    }

    /* decision: a STARTTLS that is offered but refused is not supported */
    if (f->starttls_refused) {
        return "starttls-not-supported";
    }

    if (!f->tls_attempted) {
        return NULL;
    }

    /*
     * RFC 8460, 4.3.1: "validation-failure", a general failure for a
     * reason not matched by a category: here a failed handshake
     */
    if (!f->handshake_ok) {
        return "validation-failure";
    }

    /* the chain is judged before the name, as a verifier builds it */

    switch (f->cert) {

    case SG_SMTP_CERT_OK:
        break;

    case SG_SMTP_CERT_EXPIRED:
        /* RFC 8460, 4.3.1: "the certificate has expired" */
        return "certificate-expired";

    case SG_SMTP_CERT_UNTRUSTED:
        /* RFC 8460, 4.3.1: "a chain of trust ... could not be established" */
        return "certificate-not-trusted";

    default: /* SG_SMTP_CERT_NONE, SG_SMTP_CERT_INVALID */
        return "validation-failure";
    }

    /* RFC 8460, 4.3.1: the MX host name does not match the certificate */
    if (!f->host_match) {
        return "certificate-host-mismatch";
    }

    return NULL;
}
