/*
 * Unit tests of the DSN generator (common/sg_dsn.c): RFC 3464 (the
 * message/delivery-status fields), RFC 3461 (NOTIFY, RET, ENVID, ORCPT,
 * xtext), RFC 6522 (multipart/report), RFC 5322 (lines, dates), RFC 3834
 * (Auto-Submitted), RFC 8689 (REQUIRETLS bounces), and the shape of real
 * DSNs from the corpus (SG_CORPUS, default ../../../shared/corpus).
 */

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sg_dsn.h"
#include "sg_smtp_cmd.h"
#include "sg_test.h"


#define T_BOUNDARY  "sg-dsn.1700000000/mta.example.net"
#define T_ORIGINAL                                                           \
    "Return-Path: <alice@example.org>\r\n"                                   \
    "From: Alice <alice@example.org>\r\n"                                    \
    "To: bob@example.com\r\n"                                                \
    "Subject: lunch\r\n"                                                     \
    "\r\n"                                                                   \
    "SECRET-BODY-LINE\r\n"


typedef struct {
    char    *data;
    size_t   len;
} t_buf_t;


static sg_dsn_rcpt_t  t_rcpt;


static void
t_init(sg_dsn_t *d, sg_dsn_rcpt_t *r, size_t n)
{
    memset(d, 0, sizeof(sg_dsn_t));
    d->reporting_host = "mta.example.net";
    d->sender = "alice@example.org";
    d->arrival = 1700000000;
    d->now = 1700003600;
    d->message_id = "dsn.1700003600.42";
    d->boundary = T_BOUNDARY;
    d->message = (const unsigned char *) T_ORIGINAL;
    d->message_len = sizeof(T_ORIGINAL) - 1;
    d->rcpts = r;
    d->nrcpts = n;

    memset(r, 0, sizeof(sg_dsn_rcpt_t));
    r->address = "bob@example.com";
    r->action = SG_DSN_FAILED;
    r->status = "5.1.1";
    r->remote_mta = "mx.example.com";
    r->diagnostic = "550 5.1.1 <bob@example.com>... User unknown";
    r->last_attempt = 1700003500;
}


/* measures, allocates and builds; the result is NUL-terminated */

static sg_dsn_rc_e
t_build(const sg_dsn_t *d, t_buf_t *out, sg_dsn_result_t *res)
{
    sg_dsn_rc_e  rc;

    out->data = NULL;
    out->len = 0;

    rc = sg_dsn_build(d, NULL, 0, res);
    if (rc != SG_DSN_ERR_SPACE) {
        return rc;
    }

    out->data = malloc(res->len + 1);
    if (out->data == NULL) {
        return SG_DSN_ERR_INVALID;
    }

    rc = sg_dsn_build(d, (unsigned char *) out->data, res->len, res);
    out->len = res->len;
    out->data[rc == SG_DSN_OK ? res->len : 0] = '\0';

    return rc;
}


/* every line ends with CRLF, no bare CR or LF, no NUL */

static int
t_crlf_only(const t_buf_t *b)
{
    size_t  i;

    if (b->len < 2 || memcmp(b->data + b->len - 2, "\r\n", 2) != 0) {
        return 0;
    }

    for (i = 0; i < b->len; i++) {
        if (b->data[i] == '\r'
            && (i + 1 == b->len || b->data[i + 1] != '\n'))
        {
            return 0;
        }

        if (b->data[i] == '\n' && (i == 0 || b->data[i - 1] != '\r')) {
            return 0;
        }

        if (b->data[i] == '\0') {
            return 0;
        }
    }

    return 1;
}


static size_t
t_longest_line(const t_buf_t *b)
{
    size_t  i, n, max;

    n = 0;
    max = 0;

    for (i = 0; i < b->len; i++) {
        if (b->data[i] == '\r' || b->data[i] == '\n') {
            n = 0;
            continue;
        }

        if (++n > max) {
            max = n;
        }
    }

    return max;
}


/* the line "s" at the start of a line within [p, p + len) */

static const char *
t_line(const char *p, size_t len, const char *s)
{
    size_t       n;
    const char  *q, *end;

    n = strlen(s);
    end = p + len;

    for (q = p; q + n <= end; q++) {
        if ((q == p || q[-1] == '\n') && memcmp(q, s, n) == 0) {
            return q;
        }
    }

    return NULL;
}


static int
t_count(const char *p, const char *s)
{
    int  n;

    n = 0;

    while ((p = strstr(p, s)) != NULL) {
        n++;
        p++;
    }

    return n;
}


/*
 * The i-th body part (0-based): its header section and its content,
 * pointers into b; 0 when there is no such part.
 */

static int
t_part(const t_buf_t *b, int i, t_buf_t *hdr, t_buf_t *body)
{
    const char  *p, *h, *e;

    p = b->data;

    while (i-- >= 0) {
        p = strstr(p, "\r\n--" T_BOUNDARY "\r\n");
        if (p == NULL) {
            return 0;
        }

        p += sizeof("\r\n--" T_BOUNDARY "\r\n") - 1;
    }

    h = strstr(p, "\r\n\r\n");
    e = strstr(p, "\r\n--" T_BOUNDARY);

    if (h == NULL || e == NULL || h > e) {
        return 0;
    }

    hdr->data = (char *) p;
    hdr->len = (size_t) (h + 2 - p);
    body->data = (char *) h + 4;
    body->len = (size_t) (e - (h + 4)) + 2;

    return 1;
}


/* the value of field "name" in [p, p + len), unfolded, in out */

static int
t_field(const t_buf_t *b, const char *name, char *out, size_t size)
{
    size_t       n, o;
    const char  *p, *end;
    char         key[64];

    snprintf(key, sizeof(key), "%s:", name);

    p = t_line(b->data, b->len, key);
    if (p == NULL) {
        return 0;
    }

    end = b->data + b->len;
    p += strlen(key);

    while (p < end && *p == ' ') {
        p++;
    }

    o = 0;

    for ( ;; ) {
        n = 0;

        while (p + n < end && p[n] != '\r' && p[n] != '\n') {
            n++;
        }

        if (o + n >= size) {
            n = size - o - 1;
        }

        memcpy(out + o, p, n);
        o += n;
        p += n;

        while (p < end && (*p == '\r' || *p == '\n')) {
            p++;
        }

        if (p >= end || (*p != ' ' && *p != '\t')) {
            break;
        }
    }

    out[o] = '\0';

    return 1;
}


static int
t_date_shape(const char *s)
{
    /* RFC 5322, 3.3: "Ddd, D[D] Mon YYYY HH:MM:SS zone" */
    return strlen(s) >= 26 && s[3] == ',' && s[4] == ' '
           && strchr(s + 5, ':') != NULL
           && (strstr(s, " +") != NULL || strstr(s, " -") != NULL);
}


static int
t_status_shape(const char *s)
{
    int  a, b, c, n;

    n = 0;

    return sscanf(s, "%d.%d.%d%n", &a, &b, &c, &n) == 3
           && (size_t) n == strlen(s) && (a == 2 || a == 4 || a == 5);
}


static void
test_notify(void)
{
    /* RFC 5321, 6.1; RFC 3461, 6.1: never to the null reverse-path */
    CHECK(!sg_dsn_wanted("", SG_DSN_NOTIFY_FAILURE, SG_DSN_FAILED),
          "RFC 3461 6.1 null sender gets no DSN");
    CHECK(!sg_dsn_wanted(NULL, 0, SG_DSN_FAILED),
          "RFC 5321 6.1 null sender gets no DSN (default NOTIFY)");

    /* RFC 3461, 4.1 */
    CHECK(!sg_dsn_wanted("a@b.c", SG_DSN_NOTIFY_NEVER, SG_DSN_FAILED),
          "RFC 3461 4.1 NEVER: no failure DSN");
    CHECK(sg_dsn_wanted("a@b.c", 0, SG_DSN_FAILED),
          "RFC 3461 4.1 default: failure DSN");
    CHECK(!sg_dsn_wanted("a@b.c", 0, SG_DSN_DELAYED),
          "RFC 3461 4.1 default: no delay DSN (sg policy)");
    CHECK(!sg_dsn_wanted("a@b.c", 0, SG_DSN_DELIVERED),
          "RFC 3461 4.1 default: no success DSN");
    CHECK(sg_dsn_wanted("a@b.c", SG_DSN_NOTIFY_DELAY, SG_DSN_DELAYED),
          "RFC 3461 4.1 DELAY: delay DSN");
    CHECK(!sg_dsn_wanted("a@b.c", SG_DSN_NOTIFY_DELAY, SG_DSN_FAILED),
          "RFC 3461 4.1 DELAY alone: no failure DSN");
    CHECK(sg_dsn_wanted("a@b.c", SG_DSN_NOTIFY_SUCCESS, SG_DSN_RELAYED),
          "RFC 3461 4.1 SUCCESS: relayed DSN");
    CHECK(sg_dsn_wanted("a@b.c", SG_DSN_NOTIFY_SUCCESS
                        | SG_DSN_NOTIFY_FAILURE, SG_DSN_DELIVERED),
          "RFC 3461 4.1 SUCCESS,FAILURE: delivered DSN");
    CHECK(!sg_dsn_wanted("a@b.c", SG_DSN_NOTIFY_FAILURE, SG_DSN_RELAYED),
          "RFC 3461 4.1 FAILURE: no relayed DSN");
}


static void
test_basic(void)
{
    char             v[2048];
    t_buf_t          b, h, p;
    sg_dsn_t         d;
    sg_dsn_rc_e      rc;
    unsigned char    small[64];
    sg_dsn_result_t  res;

    t_init(&d, &t_rcpt, 1);

    rc = sg_dsn_build(&d, small, sizeof(small), &res);
    CHECK(rc == SG_DSN_ERR_SPACE && res.len > sizeof(small),
          "bounded output: a short buffer is refused with the size needed");

    rc = t_build(&d, &b, &res);
    CHECK(rc == SG_DSN_OK && res.reported == 1, "RFC 3464 2 DSN built");

    if (rc != SG_DSN_OK) {
        free(b.data);
        return;
    }

    CHECK(t_crlf_only(&b), "RFC 5322 2.1 CRLF only");
    CHECK(t_longest_line(&b) <= SG_DSN_LINE_MAX, "RFC 5322 2.1.1 998");

    h.data = b.data;
    h.len = (size_t) (strstr(b.data, "\r\n\r\n") + 2 - b.data);

    CHECK(t_field(&h, "From", v, sizeof(v))
          && strstr(v, "<MAILER-DAEMON@mta.example.net>") != NULL,
          "RFC 3464 2 From: MAILER-DAEMON@reporting host");
    CHECK(t_field(&h, "To", v, sizeof(v))
          && strcmp(v, "<alice@example.org>") == 0,
          "RFC 3461 6.1 To: the envelope sender");
    CHECK(t_field(&h, "Subject", v, sizeof(v))
          && strstr(v, "Undelivered") != NULL,
          "RFC 5322 3.6.5 Subject of a failure DSN");
    CHECK(t_field(&h, "Date", v, sizeof(v))
          && strcmp(v, "Tue, 14 Nov 2023 23:13:20 +0000") == 0,
          "RFC 5322 3.3 Date from the caller's time");
    CHECK(t_field(&h, "Message-ID", v, sizeof(v))
          && strcmp(v, "<dsn.1700003600.42@mta.example.net>") == 0,
          "RFC 5322 3.6.4 Message-ID from the caller's token");
    CHECK(t_field(&h, "MIME-Version", v, sizeof(v))
          && strcmp(v, "1.0") == 0, "RFC 2045 4 MIME-Version");
    CHECK(t_field(&h, "Auto-Submitted", v, sizeof(v))
          && strcmp(v, "auto-replied") == 0,
          "RFC 3834 5 Auto-Submitted: auto-replied");
    CHECK(t_field(&h, "Content-Type", v, sizeof(v))
          && strncmp(v, "multipart/report; report-type=delivery-status;",
                     46) == 0
          && strstr(v, "boundary=\"" T_BOUNDARY "\"") != NULL,
          "RFC 6522 3 multipart/report; report-type=delivery-status");
    CHECK(t_line(h.data, h.len, "Content-Transfer-Encoding") == NULL
          && !res.eightbit, "RFC 2045 6 7bit: no CTE");

    /* RFC 6522, 3: text, delivery-status, original; close delimiter */
    CHECK(t_count(b.data, "\r\n--" T_BOUNDARY "\r\n") == 3
          && t_count(b.data, "\r\n--" T_BOUNDARY "--\r\n") == 1
          && strstr(b.data, "--" T_BOUNDARY "--\r\n") + sizeof("--"
             T_BOUNDARY "--\r\n") - 1 == b.data + b.len,
          "RFC 2046 5.1.1 three parts and the close delimiter last");

    CHECK(t_part(&b, 0, &h, &p)
          && t_line(h.data, h.len,
                    "Content-Type: text/plain; charset=us-ascii") != NULL
          && strstr(p.data, "<bob@example.com>: failed, status 5.1.1")
             != NULL
          && strstr(p.data, "User unknown") != NULL,
          "RFC 6522 3 first part: text/plain naming the recipient");

    CHECK(t_part(&b, 1, &h, &p)
          && t_line(h.data, h.len, "Content-Type: message/delivery-status")
             != NULL, "RFC 3464 2.1 second part: message/delivery-status");

    CHECK(t_field(&p, "Reporting-MTA", v, sizeof(v))
          && strcmp(v, "dns; mta.example.net") == 0,
          "RFC 3464 2.2.2 Reporting-MTA: dns; host");
    CHECK(t_field(&p, "Arrival-Date", v, sizeof(v))
          && strcmp(v, "Tue, 14 Nov 2023 22:13:20 +0000") == 0,
          "RFC 3464 2.2.5 Arrival-Date");
    CHECK(strstr(p.data, "+0000\r\n\r\nFinal-Recipient: ") != NULL,
          "RFC 3464 2.1 an empty line before the per-recipient fields");
    CHECK(t_field(&p, "Final-Recipient", v, sizeof(v))
          && strcmp(v, "rfc822; bob@example.com") == 0,
          "RFC 3464 2.3.2 Final-Recipient: rfc822; addr");
    CHECK(t_field(&p, "Action", v, sizeof(v)) && strcmp(v, "failed") == 0,
          "RFC 3464 2.3.3 Action: failed");
    CHECK(t_field(&p, "Status", v, sizeof(v)) && strcmp(v, "5.1.1") == 0,
          "RFC 3464 2.3.4 Status");
    CHECK(t_field(&p, "Remote-MTA", v, sizeof(v))
          && strcmp(v, "dns; mx.example.com") == 0,
          "RFC 3464 2.3.5 Remote-MTA: dns; host");
    CHECK(t_field(&p, "Diagnostic-Code", v, sizeof(v))
          && strcmp(v, "smtp; 550 5.1.1 <bob@example.com>... User unknown")
             == 0, "RFC 3464 2.3.6 Diagnostic-Code: smtp; reply");
    CHECK(t_field(&p, "Last-Attempt-Date", v, sizeof(v)) && t_date_shape(v),
          "RFC 3464 2.3.7 Last-Attempt-Date");
    CHECK(t_line(p.data, p.len, "Will-Retry-Until:") == NULL
          && t_line(p.data, p.len, "Original-Envelope-Id:") == NULL
          && t_line(p.data, p.len, "Original-Recipient:") == NULL,
          "RFC 3464 2.3.9/2.2.1/2.3.1 absent fields are not made up");

    CHECK(res.returned == SG_DSN_RETURN_FULL && t_part(&b, 2, &h, &p)
          && t_line(h.data, h.len, "Content-Type: message/rfc822") != NULL
          && strstr(p.data, "SECRET-BODY-LINE\r\n") != NULL,
          "RFC 3461 4.3 RET unset: the whole message as message/rfc822");

    free(b.data);

    d.sender = "";
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_NONE,
          "RFC 3461 6.1 no DSN is built for MAIL FROM:<>");

    d.sender = "alice@example.org";
    t_rcpt.notify = SG_DSN_NOTIFY_NEVER;
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_NONE,
          "RFC 3461 4.1 no DSN is built when every NOTIFY says NEVER");
}


static void
test_xtext(void)
{
    char             v[2048], dec[600];
    size_t           n;
    t_buf_t          b, h, p;
    sg_str_t         s;
    sg_dsn_t         d;
    sg_dsn_result_t  res;

    static const char  envid[] = "QQ+12=id 7\x01";
    static const char  orcpt[] = "B\xc3\xb6" "b+tag@example.com";

    n = sg_dsn_xtext_encode((const unsigned char *) envid,
                            sizeof(envid) - 1, v, sizeof(v));
    CHECK(n == strlen(v) && strcmp(v, "QQ+2B12+3Did+207+01") == 0,
          "RFC 3461 4 xtext: + = SP and controls are hexchars");

    n = sg_dsn_xtext_encode((const unsigned char *) envid,
                            sizeof(envid) - 1, v, 5);
    CHECK(n == 19 && strcmp(v, "QQ") == 0,
          "RFC 3461 4 xtext: truncation never leaves half a hexchar");

    t_init(&d, &t_rcpt, 1);
    d.envid = "QQ+12=id 7";
    t_rcpt.orcpt = orcpt;

    if (t_build(&d, &b, &res) != SG_DSN_OK) {
        CHECK(0, "RFC 3461 4.4 DSN with ENVID and ORCPT");
        free(b.data);
        return;
    }

    CHECK(t_part(&b, 1, &h, &p)
          && t_field(&p, "Original-Envelope-Id", v, sizeof(v))
          && strcmp(v, "QQ+2B12+3Did+207") == 0,
          "RFC 3461 4.4 Original-Envelope-Id in xtext");

    s.data = v;
    s.len = strlen(v);
    CHECK(sg_smtp_xtext_decode(&s, dec, sizeof(dec), &n) == SG_SMTP_OK
          && n == strlen(d.envid) && memcmp(dec, d.envid, n) == 0,
          "RFC 3461 4.4 ENVID xtext round trip");

    CHECK(t_field(&p, "Original-Recipient", v, sizeof(v))
          && strcmp(v, "rfc822;B+C3+B6b+2Btag@example.com") == 0,
          "RFC 3461 4.2 Original-Recipient: rfc822;xtext");

    CHECK(strstr(p.data, "\r\n\r\nOriginal-Recipient: rfc822;B+C3+B6b"
                 "+2Btag@example.com\r\nFinal-Recipient:") != NULL,
          "RFC 3464 2.3 Original-Recipient first in its group");

    /* the decoder refuses non-ASCII: decode by hand for the round trip */
    s.data = v + 7;
    s.len = strlen(v + 7);
    n = 0;

    while (s.len > 0 && n < sizeof(dec)) {
        if (s.data[0] == '+' && s.len >= 3) {
            dec[n++] = (char) strtol((char []) { s.data[1], s.data[2], 0 },
                                     NULL, 16);
            s.data += 3;
            s.len -= 3;

        } else {
            dec[n++] = *s.data++;
            s.len--;
        }
    }

    CHECK(n == strlen(orcpt) && memcmp(dec, orcpt, n) == 0,
          "RFC 3461 4.2 ORCPT xtext round trip (8-bit octets too)");

    CHECK(t_crlf_only(&b) && !res.eightbit,
          "RFC 3461 4 xtext keeps the report 7bit");

    free(b.data);
}


static void
test_headers_only(void)
{
    t_buf_t          b, h, p;
    sg_dsn_t         d;
    sg_dsn_result_t  res;

    /* RFC 3461, 4.3: RET=HDRS */
    t_init(&d, &t_rcpt, 1);
    d.ret = SG_DSN_RET_HDRS;

    CHECK(t_build(&d, &b, &res) == SG_DSN_OK
          && res.returned == SG_DSN_RETURN_RET_HDRS
          && t_part(&b, 2, &h, &p)
          && t_line(h.data, h.len, "Content-Type: text/rfc822-headers")
             != NULL
          && t_line(p.data, p.len, "Subject: lunch") != NULL
          && strstr(b.data, "SECRET-BODY-LINE") == NULL,
          "RFC 3461 4.3 RET=HDRS: text/rfc822-headers, no body");
    free(b.data);

    /* RFC 8689, 5: headers only whatever RET said */
    t_init(&d, &t_rcpt, 1);
    d.ret = SG_DSN_RET_FULL;
    d.requiretls = 1;
    t_rcpt.status = "5.7.30";

    CHECK(t_build(&d, &b, &res) == SG_DSN_OK
          && res.returned == SG_DSN_RETURN_REQUIRETLS && res.requiretls
          && t_part(&b, 2, &h, &p)
          && t_line(h.data, h.len, "Content-Type: text/rfc822-headers")
             != NULL
          && strstr(b.data, "SECRET-BODY-LINE") == NULL
          && strstr(b.data, "Status: 5.7.30\r\n") != NULL,
          "RFC 8689 5 REQUIRETLS + RET=FULL: headers only, sent flagged");
    free(b.data);

    /* a body over the caller's limit */
    t_init(&d, &t_rcpt, 1);
    d.max_return = 5;

    CHECK(t_build(&d, &b, &res) == SG_DSN_OK
          && res.returned == SG_DSN_RETURN_TOO_BIG
          && strstr(b.data, "text/rfc822-headers") != NULL
          && strstr(b.data, "SECRET-BODY-LINE") == NULL,
          "RFC 3461 4.3 a body over the limit: headers only");
    free(b.data);

    d.max_return = 18;            /* "SECRET-BODY-LINE\r\n" */
    CHECK(t_build(&d, &b, &res) == SG_DSN_OK
          && res.returned == SG_DSN_RETURN_FULL,
          "RFC 3461 4.3 a body at the limit is returned");
    free(b.data);

    /* only the first octets of the original are given */
    d.max_return = 1000;
    d.message_len = strstr(T_ORIGINAL, "SECRET") - T_ORIGINAL + 3;
    d.message_total = sizeof(T_ORIGINAL) - 1;

    CHECK(t_build(&d, &b, &res) == SG_DSN_OK
          && res.returned == SG_DSN_RETURN_TOO_BIG
          && t_part(&b, 2, &h, &p)
          && t_line(p.data, p.len, "Subject: lunch") != NULL
          && strstr(b.data, "SEC") == NULL,
          "a prefix of the original: its header section only");
    free(b.data);

    d.max_return = 5;
    d.message_total = d.message_len + 1000;

    CHECK(t_build(&d, &b, &res) == SG_DSN_OK
          && res.returned == SG_DSN_RETURN_TOO_BIG,
          "a prefix: the body's size is the original's, not the prefix's");
    free(b.data);

    /* a header section longer than the prefix: whole lines of it */
    d.message_len = strstr(T_ORIGINAL, "Subject: lunch") - T_ORIGINAL + 4;

    CHECK(t_build(&d, &b, &res) == SG_DSN_OK
          && res.returned == SG_DSN_RETURN_TOO_BIG
          && t_part(&b, 2, &h, &p)
          && strstr(p.data, "Subj") == NULL,
          "a prefix inside the header section: its complete lines only");
    free(b.data);

    d.message_total = d.message_len - 1;
    CHECK(t_build(&d, &b, &res) == SG_DSN_ERR_INVALID,
          "a stated length shorter than the message is refused");
}


static void
test_delayed(void)
{
    char             v[256];
    t_buf_t          b, h, p;
    sg_dsn_t         d;
    static sg_dsn_rcpt_t  r[3];
    sg_dsn_result_t  res;

    t_init(&d, &r[0], 3);
    r[0].action = SG_DSN_DELAYED;
    r[0].notify = SG_DSN_NOTIFY_DELAY | SG_DSN_NOTIFY_FAILURE;
    r[0].status = "4.4.1";
    r[0].diagnostic_type = "X-sg";
    r[0].diagnostic = "connection to mx.example.com timed out";
    r[0].retry_until = 1700432000;

    r[1] = r[0];
    r[1].address = "carol@example.com";
    r[1].notify = 0;                        /* default: no delay notice */

    r[2] = r[0];
    r[2].address = "dave@example.com";
    r[2].action = SG_DSN_RELAYED;
    r[2].notify = SG_DSN_NOTIFY_SUCCESS;
    r[2].status = "2.0.0";
    r[2].diagnostic_type = NULL;
    r[2].diagnostic = "250 2.0.0 Ok: queued as 4711";

    if (t_build(&d, &b, &res) != SG_DSN_OK) {
        CHECK(0, "RFC 3464 2.3.3 delay DSN built");
        free(b.data);
        return;
    }

    CHECK(res.reported == 2 && strstr(b.data, "carol@") == NULL,
          "RFC 3461 4.1 only the recipients whose NOTIFY asks");
    CHECK(strstr(b.data, "\r\nSubject: Delayed Mail") != NULL,
          "RFC 3464 2.3.3 a delay DSN says so");
    CHECK(t_part(&b, 1, &h, &p)
          && t_count(p.data, "\r\nAction: ") == 2
          && strstr(p.data, "Action: delayed\r\nStatus: 4.4.1\r\n") != NULL
          && strstr(p.data, "Action: relayed\r\nStatus: 2.0.0\r\n") != NULL,
          "RFC 3464 2.3.3 Action: delayed and relayed");
    CHECK(t_field(&p, "Will-Retry-Until", v, sizeof(v))
          && strcmp(v, "Sun, 19 Nov 2023 22:13:20 +0000") == 0
          && t_count(p.data, "Will-Retry-Until:") == 1,
          "RFC 3464 2.3.9 Will-Retry-Until for delayed only");
    CHECK(strstr(p.data, "Diagnostic-Code: X-sg; connection to") != NULL,
          "RFC 3464 2.3.6 a local diagnostic-type");
    CHECK(res.returned == SG_DSN_RETURN_NOT_FAILED && t_part(&b, 2, &h, &p)
          && t_line(h.data, h.len, "Content-Type: text/rfc822-headers")
             != NULL && strstr(b.data, "SECRET-BODY-LINE") == NULL,
          "RFC 3461 4.3 RET is for failures: a delay DSN returns headers");

    free(b.data);
}


static void
test_hostile(void)
{
    size_t           i;
    char            *diag, *orig, *q;
    t_buf_t          b, h, p;
    sg_dsn_t         d;
    sg_dsn_rc_e      rc;
    sg_dsn_result_t  res;

    static const char  eight[] =
        "Subject: caf\xc3\xa9\r\n"
        "X-Bare: a\nb\rc\r\n"
        "\r\n"
        "body\nline\r\n";

    /* a long reason with a CR LF injection and a 3000-octet word */
    diag = malloc(12000);
    orig = malloc(8000);

    if (diag == NULL || orig == NULL) {
        CHECK(0, "malloc");
        free(diag);
        free(orig);
        return;
    }

    q = diag;
    q += sprintf(q, "550 5.7.1 rejected\r\nBcc: victim@example.com\r\n ");

    for (i = 0; i < 400; i++) {
        q += sprintf(q, "word%zu ", i);
    }

    memset(q, 'x', 3000);
    q[3000] = '\0';
    strcat(q, " caf\xc3\xa9 end");

    t_init(&d, &t_rcpt, 1);
    t_rcpt.diagnostic = diag;

    rc = t_build(&d, &b, &res);
    CHECK(rc == SG_DSN_OK && t_crlf_only(&b)
          && t_longest_line(&b) <= SG_DSN_LINE_MAX,
          "RFC 5322 2.1.1 a long reason is wrapped under 998 octets");
    CHECK(rc == SG_DSN_OK && t_line(b.data, b.len, "Bcc:") == NULL,
          "RFC 5322 2.2 no header injection through a reply");
    CHECK(rc == SG_DSN_OK && t_part(&b, 0, &h, &p)
          && strstr(p.data, "caf?? end") != NULL && !res.eightbit,
          "RFC 6522 3 8-bit in a reason becomes '?' in us-ascii text");
    free(b.data);

    /* RFC 6532, 3.2 and RFC 6152: 8-bit headers kept, bare CR/LF fixed */
    t_init(&d, &t_rcpt, 1);
    d.message = (const unsigned char *) eight;
    d.message_len = sizeof(eight) - 1;

    rc = t_build(&d, &b, &res);
    CHECK(rc == SG_DSN_OK && res.eightbit
          && strstr(b.data, "Subject: caf\xc3\xa9\r\n") != NULL
          && t_count(b.data, "Content-Transfer-Encoding: 8bit\r\n") == 2,
          "RFC 6532 3.2 8-bit header octets kept, labelled 8bit");
    CHECK(rc == SG_DSN_OK && t_crlf_only(&b)
          && strstr(b.data, "X-Bare: a\r\nb\r\nc\r\n") != NULL
          && strstr(b.data, "body\r\nline\r\n") != NULL,
          "RFC 5321 2.3.8 bare CR and LF of the original become CRLF");
    free(b.data);

    /* a 2000-octet header line: folded; a 2000-octet body line: headers */
    memcpy(orig, "X-Long: ", 8);
    memset(orig + 8, 'y', 2000);
    memcpy(orig + 2008, "\r\n\r\n", 4);
    memset(orig + 2012, 'z', 2000);
    memcpy(orig + 4012, "\r\n", 2);

    t_init(&d, &t_rcpt, 1);
    d.message = (const unsigned char *) orig;
    d.message_len = 4014;

    rc = t_build(&d, &b, &res);
    CHECK(rc == SG_DSN_OK && res.returned == SG_DSN_RETURN_LONG_LINE
          && t_crlf_only(&b) && t_longest_line(&b) <= SG_DSN_LINE_MAX
          && strstr(b.data, "yyy\r\n yyy") != NULL
          && strstr(b.data, "zzz") == NULL,
          "RFC 5322 2.1.1 long original lines: folded header, no body");
    free(b.data);

    /* RFC 2046, 5.1.1: the boundary must not occur in the content */
    t_init(&d, &t_rcpt, 1);
    snprintf(orig, 8000, "Subject: x\r\n\r\n--%s\r\n", T_BOUNDARY);
    d.message = (const unsigned char *) orig;
    d.message_len = strlen(orig);
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_ERR_BOUNDARY,
          "RFC 2046 5.1.1 a boundary found in the original is refused");

    free(diag);
    free(orig);
}


static void
test_utf8_address(void)
{
    t_buf_t          b;
    sg_dsn_t         d;
    sg_dsn_rc_e      rc;
    sg_dsn_result_t  res;

    t_init(&d, &t_rcpt, 1);
    t_rcpt.address = "j\xc3\xb6rg+x=\xe4\xb8\xad@example.com";

    rc = t_build(&d, &b, &res);
    CHECK(rc == SG_DSN_OK && res.reported == 1,
          "RFC 6533 3 a DSN for an SMTPUTF8 recipient is built");

    if (rc != SG_DSN_OK) {
        free(b.data);
        return;
    }

    CHECK(strstr(b.data, "Final-Recipient: utf-8; "
                 "j\\x{F6}rg\\x{2B}x\\x{3D}\\x{4E2D}@example.com\r\n")
          != NULL,
          "RFC 6533 3 Final-Recipient of type utf-8 in utf-8-addr-xtext");
    CHECK(strstr(b.data, "<j\\x{F6}rg\\x{2B}x\\x{3D}\\x{4E2D}@example.com>")
          != NULL,
          "RFC 6533 3 the text part names the recipient in 7 bits");
    CHECK(strstr(b.data, "j\xc3\xb6rg") == NULL,
          "RFC 3464 2 no 8-bit address in a us-ascii part");

    free(b.data);
}


static void
test_invalid(void)
{
    sg_dsn_t         d;
    sg_dsn_result_t  res;

    t_init(&d, &t_rcpt, 1);
    t_rcpt.status = "5.1";
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_ERR_INVALID
          && res.err != NULL, "RFC 3463 2 status is class.subject.detail");

    t_init(&d, &t_rcpt, 1);
    t_rcpt.action = SG_DSN_DELAYED;
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_ERR_INVALID,
          "RFC 3464 2.3.4 a delayed recipient has a 4.x.x status");

    t_init(&d, &t_rcpt, 1);
    t_rcpt.address = "b\xc3\xb6" "b\xff@example.com";
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_ERR_INVALID,
          "RFC 3629 an address that is not UTF-8 is refused, not mangled");

    t_init(&d, &t_rcpt, 1);
    t_rcpt.address = "b\xc2\x85" "b@example.com";
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_ERR_INVALID,
          "RFC 6531 3.3 a C1 control in an address is refused");

    t_init(&d, &t_rcpt, 1);
    d.boundary = "has space";
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_ERR_INVALID,
          "RFC 2046 5.1.1 boundary of bchars");

    t_init(&d, &t_rcpt, 1);
    d.reporting_host = "mta.example.net\r\nX: y";
    CHECK(sg_dsn_build(&d, NULL, 0, &res) == SG_DSN_ERR_INVALID,
          "RFC 3464 2.2.2 reporting host is a host name");
}


static void
test_date(void)
{
    char  s[40];

    CHECK(sg_dsn_date(0, s, sizeof(s)) == 31
          && strcmp(s, "Thu, 01 Jan 1970 00:00:00 +0000") == 0,
          "RFC 5322 3.3 date of the epoch");
    sg_dsn_date(1403375716, s, sizeof(s));
    CHECK(strcmp(s, "Sat, 21 Jun 2014 18:35:16 +0000") == 0,
          "RFC 5322 3.3 date of the Postfix sample");
    sg_dsn_date(951782400, s, sizeof(s));
    CHECK(strcmp(s, "Tue, 29 Feb 2000 00:00:00 +0000") == 0,
          "RFC 5322 3.3 date on a leap day");
}


/*
 * The message/delivery-status part of a corpus sample: field names and
 * values of its lines (LF or CRLF), unfolded no further.
 */

#define T_FIELDS  64

typedef struct {
    char    name[T_FIELDS][40];
    char    value[T_FIELDS][256];
    size_t  n;
} t_fields_t;


static int
t_corpus_fields(const char *file, t_fields_t *f)
{
    int          in, c;
    char         path[1024], line[1024];
    FILE        *fp;
    size_t       n;
    const char  *dir;
    char        *colon;

    dir = getenv("SG_CORPUS");
    if (dir == NULL || dir[0] == '\0') {
        dir = "../../../shared/corpus";
    }

    f->n = 0;
    snprintf(path, sizeof(path), "%s/dsn/%s", dir, file);

    fp = fopen(path, "r");
    if (fp == NULL) {
        printf("corpus: cannot open %s (set SG_CORPUS)\n", path);
        return 0;
    }

    f->n = 0;
    in = 0;

    while (fgets(line, sizeof(line), fp) != NULL) {
        n = strcspn(line, "\r\n");
        line[n] = '\0';

        if (!in) {
            if (strncasecmp(line, "Content-Type: message/delivery-status",
                            37) == 0)
            {
                in = 1;

                /* skip the rest of the part's header section */
                while (fgets(line, sizeof(line), fp) != NULL
                       && line[0] != '\r' && line[0] != '\n')
                {
                    /* void */
                }
            }

            continue;
        }

        if (strncmp(line, "--", 2) == 0) {
            break;
        }

        c = (unsigned char) line[0];
        colon = strchr(line, ':');

        if (c == ' ' || c == '\t' || colon == NULL || f->n == T_FIELDS) {
            continue;
        }

        *colon = '\0';
        snprintf(f->name[f->n], 40, "%.39s", line);
        snprintf(f->value[f->n], 256, "%.255s",
                 colon + 1 + (colon[1] == ' '));
        f->n++;
    }

    fclose(fp);

    return f->n > 0;
}


/* the fields of our delivery-status part, split the same way */

static void
t_own_fields(const t_buf_t *p, t_fields_t *f)
{
    char        *s, *e, *c;
    const char  *end;

    f->n = 0;
    end = p->data + p->len;

    for (s = p->data; s < end && f->n < T_FIELDS; s = e + 2) {
        e = strstr(s, "\r\n");
        if (e == NULL || e >= end) {
            break;
        }

        *e = '\0';
        c = strchr(s, ':');

        if (c != NULL && s[0] != ' ' && s[0] != '\t') {
            *c = '\0';
            snprintf(f->name[f->n], 40, "%.39s", s);
            snprintf(f->value[f->n], 256, "%.255s",
                     c + 1 + (c[1] == ' '));
            f->n++;
        }
    }
}


static const char *
t_fields_get(const t_fields_t *f, const char *name, size_t *at)
{
    size_t  i;

    for (i = 0; i < f->n; i++) {
        if (strcasecmp(f->name[i], name) == 0) {
            if (at) {
                *at = i;
            }

            return f->value[i];
        }
    }

    return NULL;
}


static void
t_same_shape(const t_fields_t *ours, const t_fields_t *real,
    const char *sample)
{
    int          ok;
    size_t       i, at, prev;
    const char  *a, *b;
    char         name[160];

    static const char  *order[] = {
        "Reporting-MTA", "Arrival-Date", "Final-Recipient", "Action",
        "Status", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date",
        "Will-Retry-Until"
    };

    /* RFC 3464, 2.2 and 2.3: same fields, same value shapes, same order */
    ok = 1;
    prev = 0;

    for (i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
        b = t_fields_get(real, order[i], NULL);
        if (b == NULL) {
            continue;
        }

        a = t_fields_get(ours, order[i], &at);

        if (a == NULL || at < prev) {
            printf("corpus %s: %s missing or out of order\n", sample,
                   order[i]);
            ok = 0;
            continue;
        }

        prev = at;

        if (strstr(order[i], "MTA") != NULL) {
            ok &= strncasecmp(a, "dns; ", 5) == 0
                  && strncasecmp(b, "dns; ", 5) == 0;

        } else if (strstr(order[i], "Date") || strstr(order[i], "Until")) {
            ok &= t_date_shape(a) && t_date_shape(b);

        } else if (strcmp(order[i], "Final-Recipient") == 0) {
            ok &= strncasecmp(a, "rfc822;", 7) == 0
                  && strncasecmp(b, "rfc822;", 7) == 0;

        } else if (strcmp(order[i], "Action") == 0) {
            ok &= strcasecmp(a, b) == 0;

        } else if (strcmp(order[i], "Status") == 0) {
            ok &= t_status_shape(a) && t_status_shape(b) && a[0] == b[0];

        } else {
            ok &= strncasecmp(a, "smtp;", 5) == 0
                  && strncasecmp(b, "smtp;", 5) == 0;
        }
    }

    snprintf(name, sizeof(name), "RFC 3464 2.2/2.3 fields shaped like %s",
             sample);
    CHECK(ok, name);
}


static void
test_corpus(void)
{
    t_buf_t          b, h, p;
    sg_dsn_t         d;
    t_fields_t       ours, real;
    sg_dsn_result_t  res;

    b.data = NULL;

    /* a failure: Postfix's 550 5.2.1 */
    t_init(&d, &t_rcpt, 1);
    t_rcpt.orcpt = "bob@example.com";

    CHECK(t_corpus_fields("postfix-550-5.2.1-user-unknown.eml", &real),
          "RFC 3464 2.1 corpus sample read (postfix)");

    if (real.n > 0 && t_build(&d, &b, &res) == SG_DSN_OK
        && t_part(&b, 1, &h, &p))
    {
        t_own_fields(&p, &ours);
        t_same_shape(&ours, &real, "postfix-550-5.2.1-user-unknown.eml");

    } else {
        CHECK(0, "RFC 3464 2.2/2.3 postfix sample compared");
    }

    free(b.data);
    b.data = NULL;

    /* a delay: Google Workspace's 4.4.1 */
    t_init(&d, &t_rcpt, 1);
    t_rcpt.action = SG_DSN_DELAYED;
    t_rcpt.notify = SG_DSN_NOTIFY_DELAY;
    t_rcpt.status = "4.4.1";
    t_rcpt.remote_mta = NULL;
    t_rcpt.diagnostic = "connection timed out";
    t_rcpt.retry_until = 1700432000;

    CHECK(t_corpus_fields("google-workspace-delayed-4.4.1-connect-failure"
                          ".eml", &real),
          "RFC 3464 2.1 corpus sample read (google delayed)");

    if (real.n > 0 && t_build(&d, &b, &res) == SG_DSN_OK
        && t_part(&b, 1, &h, &p))
    {
        t_own_fields(&p, &ours);
        t_same_shape(&ours, &real,
                     "google-workspace-delayed-4.4.1-connect-failure.eml");

    } else {
        CHECK(0, "RFC 3464 2.2/2.3 google sample compared");
    }

    free(b.data);
}


int
main(void)
{
    test_notify();
    test_basic();
    test_xtext();
    test_headers_only();
    test_delayed();
    test_hostile();
    test_utf8_address();
    test_invalid();
    test_date();
    test_corpus();

    return SG_TEST_DONE();
}
