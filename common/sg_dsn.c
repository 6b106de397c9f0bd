/*
 * sg: delivery status notifications (RFC 3464, RFC 3461), pure.
 */

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "sg_dsn.h"


/* an output that counts what it cannot hold */
typedef struct {
    unsigned char       *buf;
    size_t               size;
    size_t               len;
    size_t               col;           /* octets in the current line */
    unsigned             overflow:1;    /* len would exceed SIZE_MAX */
} sg_dsn_w_t;


/* what the checks found out about the original message */
typedef struct {
    size_t               hdr_len;       /* the header section */
    size_t               body_off;      /* after the empty line */
    size_t               body_len;
    size_t               return_len;    /* octets of the original returned */
    sg_dsn_return_e      returned;
    unsigned             any_failed:1;
    unsigned             any_delayed:1;
    unsigned             eightbit:1;
} sg_dsn_plan_t;


static const char *sg_dsn_check(const sg_dsn_t *dsn, sg_dsn_plan_t *plan,
    size_t *reported);
static const char *sg_dsn_check_rcpt(const sg_dsn_rcpt_t *r);
static void sg_dsn_plan_original(const sg_dsn_t *dsn, sg_dsn_plan_t *plan);
static int sg_dsn_contains(const unsigned char *p, size_t len,
    const char *boundary);
static void sg_dsn_headers(sg_dsn_w_t *w, const sg_dsn_t *dsn,
    const sg_dsn_plan_t *plan);
static void sg_dsn_text_part(sg_dsn_w_t *w, const sg_dsn_t *dsn,
    const sg_dsn_plan_t *plan);
static void sg_dsn_status_part(sg_dsn_w_t *w, const sg_dsn_t *dsn);
static void sg_dsn_original_part(sg_dsn_w_t *w, const sg_dsn_t *dsn,
    const sg_dsn_plan_t *plan);
static void sg_dsn_copy(sg_dsn_w_t *w, const unsigned char *p, size_t len);
static void sg_dsn_wrap(sg_dsn_w_t *w, const char *s, size_t len,
    const char *indent, size_t width);
static void sg_dsn_field_date(sg_dsn_w_t *w, const char *name, time_t t);
static void sg_dsn_field_xtext(sg_dsn_w_t *w, const char *name,
    const char *prefix, const char *value);
static void sg_dsn_put(sg_dsn_w_t *w, const void *p, size_t n);
static void sg_dsn_puts(sg_dsn_w_t *w, const char *s);
static void sg_dsn_crlf(sg_dsn_w_t *w);
static size_t sg_dsn_eol(const unsigned char *p, const unsigned char *end);
static int sg_dsn_is_host(const char *s, int literal);
static int sg_dsn_is_addr(const char *s);
static int sg_dsn_is_utf8_addr(const char *s);
static void sg_dsn_put_addr(sg_dsn_w_t *w, const char *addr);
static int sg_dsn_is_set(const char *s, const char *allowed, size_t max);
static int sg_dsn_is_status(const char *s, sg_dsn_action_e action);
static unsigned char sg_dsn_text_char(unsigned char c);


#define sg_dsn_empty(s)  ((s) == NULL || (s)[0] == '\0')

#define SG_DSN_ALPHA     "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#define SG_DSN_DIGIT     "0123456789"

/* RFC 2046, 5.1.1: bchars, without the space (it may not end a boundary) */
#define SG_DSN_BCHARS    SG_DSN_ALPHA SG_DSN_DIGIT "'()+_,-./:=?"
/* RFC 5322, 3.2.3: atext and "." (dot-atom-text), for the Message-ID */
#define SG_DSN_ATEXT     SG_DSN_ALPHA SG_DSN_DIGIT "!#$%&'*+-/=?^_`{|}~."
/* RFC 3464, 2.1.2 address-type, 2.1.3 diagnostic-type: atoms */
#define SG_DSN_TYPE      SG_DSN_ALPHA SG_DSN_DIGIT "-_"
#define SG_DSN_TYPE_MAX  32


static const char  *sg_dsn_wday[] = {
    "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"
};

static const char  *sg_dsn_month[] = {
    "Jan", "Feb", "Mar", "Apr", "May", "Jun",
    "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
};

static const char  *sg_dsn_action_name[] = {
    "failed", "delayed", "delivered", "relayed"
};


int
sg_dsn_wanted(const char *sender, unsigned notify, sg_dsn_action_e action)
{
    /* RFC 5321, 6.1 and RFC 3461, 6.1: never to a null reverse-path */
    if (sg_dsn_empty(sender)) {
        return 0;
    }

    /* RFC 3461, 4.1: NEVER asks that no DSN be returned at all */
    if (notify & SG_DSN_NOTIFY_NEVER) {
        return 0;
    }

    if (notify == 0) {
        /*
         * RFC 3461, 4.1: without NOTIFY, FAILURE or FAILURE,DELAY; sg's
         * policy is FAILURE only, delay notices only when asked for.
         */
        notify = SG_DSN_NOTIFY_FAILURE;
    }

    switch (action) {

    case SG_DSN_FAILED:
        return (notify & SG_DSN_NOTIFY_FAILURE) ? 1 : 0;

    case SG_DSN_DELAYED:
        return (notify & SG_DSN_NOTIFY_DELAY) ? 1 : 0;

    case SG_DSN_DELIVERED:
    case SG_DSN_RELAYED:
        /*
         * RFC 3461, 4.1 and 6.2.2: SUCCESS; "relayed" when the next hop
         * does not take the DSN request on.
         */
        return (notify & SG_DSN_NOTIFY_SUCCESS) ? 1 : 0;
    }

    return 0;
}


sg_dsn_rc_e
sg_dsn_build(const sg_dsn_t *dsn, unsigned char *buf, size_t size,
    sg_dsn_result_t *res)
{
    size_t          reported;
    const char     *err;
    sg_dsn_w_t      w;
    sg_dsn_plan_t   plan;

    memset(res, 0, sizeof(sg_dsn_result_t));

    if (sg_dsn_empty(dsn->sender)) {
        /* RFC 3461, 6.1; RFC 5321, 6.1 */
        res->err = "null sender: no DSN";
        return SG_DSN_NONE;
    }

    memset(&plan, 0, sizeof(sg_dsn_plan_t));

    err = sg_dsn_check(dsn, &plan, &reported);
    if (err != NULL) {
        res->err = err;
        return SG_DSN_ERR_INVALID;
    }

    if (reported == 0) {
        res->err = "no recipient asked for this DSN (NOTIFY)";
        return SG_DSN_NONE;
    }

    sg_dsn_plan_original(dsn, &plan);

    /* RFC 2046, 5.1.1: the boundary must not occur in the content */
    if (sg_dsn_contains(dsn->message, plan.return_len, dsn->boundary)) {
        res->err = "the boundary occurs in the returned message";
        return SG_DSN_ERR_BOUNDARY;
    }

    memset(&w, 0, sizeof(sg_dsn_w_t));
    w.buf = buf;
    w.size = buf ? size : 0;

    sg_dsn_headers(&w, dsn, &plan);
    sg_dsn_text_part(&w, dsn, &plan);
    sg_dsn_status_part(&w, dsn);
    sg_dsn_original_part(&w, dsn, &plan);

    res->reported = reported;
    res->returned = plan.returned;
    res->eightbit = plan.eightbit;
    res->requiretls = dsn->requiretls;

    if (w.overflow) {
        res->len = SIZE_MAX;
        res->err = "the DSN would be too large";
        return SG_DSN_ERR_INVALID;
    }

    res->len = w.len;

    if (w.len > w.size) {
        res->err = "the buffer is too small";
        return SG_DSN_ERR_SPACE;
    }

    return SG_DSN_OK;
}


size_t
sg_dsn_xtext_encode(const unsigned char *in, size_t len, char *out,
    size_t size)
{
    size_t                i, n;
    unsigned char         c;
    static const char     hex[] = "0123456789ABCDEF";

    n = 0;

    for (i = 0; i < len; i++) {
        c = in[i];

        /* RFC 3461, 4: xchar is "!" to "~" except "+" and "=" */
        if (c >= '!' && c <= '~' && c != '+' && c != '=') {
            if (n + 1 < size) {
                out[n] = (char) c;
            }

            n++;
            continue;
        }

        if (n + 3 < size) {
            out[n] = '+';
            out[n + 1] = hex[c >> 4];
            out[n + 2] = hex[c & 0x0f];

        } else if (n < size) {
            /* never leave half an hexchar */
            size = n + 1;
        }

        n += 3;
    }

    if (size > 0) {
        out[n < size ? n : size - 1] = '\0';
    }

    return n;
}


size_t
sg_dsn_date(time_t t, char *out, size_t size)
{
    int         i, y, mon, d, wday;
    char        tmp[40], *p;
    int64_t     days, secs, era, doe, yoe, doy, mp;

    /* civil from days (proleptic Gregorian), independent of TZ and locale */
    days = (int64_t) t / 86400;
    secs = (int64_t) t % 86400;

    if (secs < 0) {
        secs += 86400;
        days--;
    }

    wday = (int) ((days % 7 + 11) % 7);      /* 1970-01-01 was a Thursday */

    days += 719468;
    era = (days >= 0 ? days : days - 146096) / 146097;
    doe = days - era * 146097;
    yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    mp = (5 * doy + 2) / 153;
    d = (int) (doy - (153 * mp + 2) / 5 + 1);
    mon = (int) (mp < 10 ? mp + 3 : mp - 9);
    y = (int) (yoe + era * 400 + (mon <= 2));

    if (y < 1900 || y > 9999) {
        y = y < 1900 ? 1900 : 9999;
    }

    /* RFC 5322, 3.3: "Sat, 21 Jun 2014 18:35:16 +0000" */
    p = tmp;
    memcpy(p, sg_dsn_wday[wday], 3);
    p += 3;
    *p++ = ',';
    *p++ = ' ';
    *p++ = (char) ('0' + d / 10);
    *p++ = (char) ('0' + d % 10);
    *p++ = ' ';
    memcpy(p, sg_dsn_month[mon - 1], 3);
    p += 3;
    *p++ = ' ';

    for (i = 1000; i > 0; i /= 10) {
        *p++ = (char) ('0' + (y / i) % 10);
    }

    *p++ = ' ';
    *p++ = (char) ('0' + secs / 36000);
    *p++ = (char) ('0' + secs / 3600 % 10);
    *p++ = ':';
    *p++ = (char) ('0' + secs % 3600 / 600);
    *p++ = (char) ('0' + secs % 3600 / 60 % 10);
    *p++ = ':';
    *p++ = (char) ('0' + secs % 60 / 10);
    *p++ = (char) ('0' + secs % 10);
    memcpy(p, " +0000", 6);
    p += 6;

    i = (int) (p - tmp);

    if (size == 0) {
        return (size_t) i;
    }

    if ((size_t) i >= size) {
        out[0] = '\0';
        return (size_t) i;
    }

    memcpy(out, tmp, i);
    out[i] = '\0';

    return (size_t) i;
}


static const char *
sg_dsn_check(const sg_dsn_t *dsn, sg_dsn_plan_t *plan, size_t *reported)
{
    size_t                i;
    const char           *err;
    const sg_dsn_rcpt_t  *r;

    *reported = 0;

    if (!sg_dsn_is_host(dsn->reporting_host, 0)) {
        return "the reporting host is not a host name";
    }

    if (!sg_dsn_is_addr(dsn->sender)) {
        return "the sender is not a printable ASCII address (RFC 6533 "
               "DSNs are not implemented)";
    }

    if (!sg_dsn_is_set(dsn->message_id, SG_DSN_ATEXT, SG_DSN_TOKEN_MAX)) {
        return "the Message-ID token is empty or not dot-atom-text";
    }

    if (!sg_dsn_is_set(dsn->boundary, SG_DSN_BCHARS, SG_DSN_BOUNDARY_MAX)) {
        return "the boundary is empty, too long or not bchars (RFC 2046)";
    }

    if (!sg_dsn_empty(dsn->envid)
        && sg_dsn_xtext_encode((const unsigned char *) dsn->envid,
                               strlen(dsn->envid), NULL, 0)
           > SG_DSN_ENVID_MAX)
    {
        return "the ENVID is longer than 100 characters in xtext "
               "(RFC 3461, 4.4)";
    }

    if (dsn->ret > SG_DSN_RET_HDRS) {
        return "RET is not FULL or HDRS";
    }

    if (dsn->message == NULL && dsn->message_len != 0) {
        return "the original message is missing";
    }

    if (dsn->message_total != 0 && dsn->message_total < dsn->message_len) {
        return "the original message is longer than its stated length";
    }

    if (dsn->nrcpts > SG_DSN_RCPTS_MAX) {
        return "too many recipients for one DSN";
    }

    if (dsn->rcpts == NULL && dsn->nrcpts != 0) {
        return "the recipients are missing";
    }

    for (i = 0; i < dsn->nrcpts; i++) {
        r = &dsn->rcpts[i];

        err = sg_dsn_check_rcpt(r);
        if (err != NULL) {
            return err;
        }

        if (!sg_dsn_wanted(dsn->sender, r->notify, r->action)) {
            continue;
        }

        (*reported)++;

        if (r->action == SG_DSN_FAILED) {
            plan->any_failed = 1;

        } else if (r->action == SG_DSN_DELAYED) {
            plan->any_delayed = 1;
        }
    }

    return NULL;
}


static const char *
sg_dsn_check_rcpt(const sg_dsn_rcpt_t *r)
{
    size_t  n;

    if ((unsigned) r->action > SG_DSN_RELAYED) {
        return "a recipient's action is unknown (RFC 3464, 2.3.3)";
    }

    if (!sg_dsn_is_addr(r->address) && !sg_dsn_is_utf8_addr(r->address)) {
        return "a recipient is not a printable address";
    }

    if (!sg_dsn_is_status(r->status, r->action)) {
        return "a recipient's status is not x.y.z of its action's class "
               "(RFC 3463, 2; RFC 3464, 2.3.4)";
    }

    if (!sg_dsn_empty(r->orcpt)) {
        if (r->orcpt_type != NULL
            && !sg_dsn_is_set(r->orcpt_type, SG_DSN_TYPE, SG_DSN_TYPE_MAX))
        {
            return "an ORCPT address type is not an atom (RFC 3461, 4.2)";
        }

        n = strlen(r->orcpt_type ? r->orcpt_type : "rfc822") + 1
            + sg_dsn_xtext_encode((const unsigned char *) r->orcpt,
                                  strlen(r->orcpt), NULL, 0);

        if (n > SG_DSN_ORCPT_MAX) {
            return "an ORCPT is longer than 500 characters in xtext "
                   "(RFC 3461, 4.2)";
        }
    }

    if (!sg_dsn_empty(r->remote_mta) && !sg_dsn_is_host(r->remote_mta, 1)) {
        return "a remote MTA is not a host name or address literal";
    }

    if (r->diagnostic_type != NULL
        && !sg_dsn_is_set(r->diagnostic_type, SG_DSN_TYPE, SG_DSN_TYPE_MAX))
    {
        return "a diagnostic type is not an atom (RFC 3464, 2.3.6)";
    }

    return NULL;
}


static void
sg_dsn_plan_original(const sg_dsn_t *dsn, sg_dsn_plan_t *plan)
{
    size_t                n, line, total;
    const unsigned char  *p, *end, *body, *last;

    p = dsn->message;
    end = p + dsn->message_len;
    total = dsn->message_total ? dsn->message_total : dsn->message_len;

    /* RFC 5322, 2.1: the header section ends at the first empty line */
    body = NULL;
    last = p;                           /* after the last complete line */

    while (p < end) {
        n = sg_dsn_eol(p, end);

        if (n) {
            body = p + n;
            break;
        }

        while (p < end && sg_dsn_eol(p, end) == 0) {
            p++;
        }

        n = sg_dsn_eol(p, end);
        p += n;

        if (n) {
            last = p;
        }
    }

    if (body == NULL && total > dsn->message_len) {
        /* only part of a long header section is here: whole lines of it */
        p = last;
    }

    plan->hdr_len = (size_t) (p - dsn->message);

    if (body != NULL) {
        plan->body_off = (size_t) (body - dsn->message);
        plan->body_len = total - plan->body_off;
    }

    if (!plan->any_failed) {
        /*
         * RFC 3461, 4.3: RET is about failed DSNs; delay and success
         * notices return the header section only.
         */
        plan->returned = SG_DSN_RETURN_NOT_FAILED;

    } else if (dsn->requiretls) {
        /* RFC 8689, 5: headers only, whatever RET said */
        plan->returned = SG_DSN_RETURN_REQUIRETLS;

    } else if (dsn->ret == SG_DSN_RET_HDRS) {
        plan->returned = SG_DSN_RETURN_RET_HDRS;

    } else if ((dsn->max_return != 0 && plan->body_len > dsn->max_return)
               || total > dsn->message_len)
    {
        /* a body too large, or a header section longer than was given */
        plan->returned = SG_DSN_RETURN_TOO_BIG;

    } else {
        plan->returned = SG_DSN_RETURN_FULL;

        /* RFC 5322, 2.1.1: a body line over 998 octets is not returned */
        line = 0;
        p = body ? body : end;

        while (p < end) {
            n = sg_dsn_eol(p, end);

            if (n) {
                line = 0;
                p += n;
                continue;
            }

            if (++line > SG_DSN_LINE_MAX) {
                plan->returned = SG_DSN_RETURN_LONG_LINE;
                break;
            }

            p++;
        }
    }

    plan->return_len = (plan->returned == SG_DSN_RETURN_FULL)
                       ? dsn->message_len : plan->hdr_len;

    for (n = 0; n < plan->return_len; n++) {
        if (dsn->message[n] >= 0x80) {
            /* RFC 6532, RFC 6152: kept as they are, sent as 8BITMIME */
            plan->eightbit = 1;
            break;
        }
    }
}


static int
sg_dsn_contains(const unsigned char *p, size_t len, const char *boundary)
{
    size_t  i, n;

    /* "--" boundary anywhere: stricter than at the start of a line */
    n = strlen(boundary);

    if (len < n + 2) {
        return 0;
    }

    for (i = 0; i + n + 2 <= len; i++) {
        if (p[i] == '-' && p[i + 1] == '-'
            && memcmp(p + i + 2, boundary, n) == 0)
        {
            return 1;
        }
    }

    return 0;
}


static void
sg_dsn_headers(sg_dsn_w_t *w, const sg_dsn_t *dsn, const sg_dsn_plan_t *plan)
{
    sg_dsn_puts(w, "From: Mail Delivery System <MAILER-DAEMON@");
    sg_dsn_puts(w, dsn->reporting_host);
    sg_dsn_puts(w, ">");
    sg_dsn_crlf(w);

    sg_dsn_puts(w, "To: <");
    sg_dsn_puts(w, dsn->sender);
    sg_dsn_puts(w, ">");
    sg_dsn_crlf(w);

    sg_dsn_puts(w, "Subject: ");

    if (plan->any_failed) {
        sg_dsn_puts(w, "Undelivered Mail Returned to Sender");

    } else if (plan->any_delayed) {
        sg_dsn_puts(w, "Delayed Mail (still being retried)");

    } else {
        sg_dsn_puts(w, "Successful Mail Delivery Report");
    }

    sg_dsn_crlf(w);

    sg_dsn_field_date(w, "Date", dsn->now);

    sg_dsn_puts(w, "Message-ID: <");
    sg_dsn_puts(w, dsn->message_id);
    sg_dsn_puts(w, "@");
    sg_dsn_puts(w, dsn->reporting_host);
    sg_dsn_puts(w, ">");
    sg_dsn_crlf(w);

    sg_dsn_puts(w, "MIME-Version: 1.0");
    sg_dsn_crlf(w);

    /* RFC 3834, 5: a DSN is an automatic response */
    sg_dsn_puts(w, "Auto-Submitted: auto-replied");
    sg_dsn_crlf(w);

    /* RFC 6522, 3; RFC 3464, 2 */
    sg_dsn_puts(w, "Content-Type: multipart/report; "
                   "report-type=delivery-status;");
    sg_dsn_crlf(w);
    sg_dsn_puts(w, "\tboundary=\"");
    sg_dsn_puts(w, dsn->boundary);
    sg_dsn_puts(w, "\"");
    sg_dsn_crlf(w);

    if (plan->eightbit) {
        /* RFC 2045, 6.4: a multipart with an 8bit part is 8bit itself */
        sg_dsn_puts(w, "Content-Transfer-Encoding: 8bit");
        sg_dsn_crlf(w);
    }

    sg_dsn_crlf(w);

    sg_dsn_puts(w, "This is a MIME-encapsulated message.");
    sg_dsn_crlf(w);
}


static void
sg_dsn_text_part(sg_dsn_w_t *w, const sg_dsn_t *dsn,
    const sg_dsn_plan_t *plan)
{
    size_t                i;
    const char           *s;
    const sg_dsn_rcpt_t  *r;

    sg_dsn_crlf(w);
    sg_dsn_puts(w, "--");
    sg_dsn_puts(w, dsn->boundary);
    sg_dsn_crlf(w);
    sg_dsn_puts(w, "Content-Description: Notification");
    sg_dsn_crlf(w);
    sg_dsn_puts(w, "Content-Type: text/plain; charset=us-ascii");
    sg_dsn_crlf(w);
    sg_dsn_crlf(w);

    sg_dsn_puts(w, "This is the mail system at host ");
    sg_dsn_puts(w, dsn->reporting_host);
    sg_dsn_puts(w, ".");
    sg_dsn_crlf(w);
    sg_dsn_crlf(w);

    if (plan->any_failed) {
        s = "Your message could not be delivered to one or more "
            "recipients. The details follow.";

    } else if (plan->any_delayed) {
        s = "Your message has not yet been delivered to one or more "
            "recipients. Delivery is being retried; you do not need to "
            "send it again. The details follow.";

    } else {
        s = "Your message was delivered, or relayed to a system that "
            "does not report delivery, as you asked to be told.";
    }

    sg_dsn_wrap(w, s, strlen(s), "", SG_DSN_TEXT_WIDTH);
    sg_dsn_crlf(w);

    for (i = 0; i < dsn->nrcpts; i++) {
        r = &dsn->rcpts[i];

        if (!sg_dsn_wanted(dsn->sender, r->notify, r->action)) {
            continue;
        }

        sg_dsn_crlf(w);
        sg_dsn_puts(w, "<");
        sg_dsn_put_addr(w, r->address);
        sg_dsn_puts(w, ">: ");
        sg_dsn_puts(w, sg_dsn_action_name[r->action]);
        sg_dsn_puts(w, ", status ");
        sg_dsn_puts(w, r->status);

        if (!sg_dsn_empty(r->remote_mta)) {
            sg_dsn_puts(w, ",");
            sg_dsn_wrap(w, "host", 4, "    ", SG_DSN_TEXT_WIDTH);
            sg_dsn_wrap(w, r->remote_mta, strlen(r->remote_mta), "    ",
                        SG_DSN_TEXT_WIDTH);

            /* a reply of that host, or sg's own reason about it */
            if (r->diagnostic_type == NULL
                || strcmp(r->diagnostic_type, "smtp") == 0)
            {
                sg_dsn_puts(w, " said:");

            } else {
                sg_dsn_puts(w, ":");
            }

        } else if (!sg_dsn_empty(r->diagnostic)) {
            sg_dsn_puts(w, ":");
        }

        if (!sg_dsn_empty(r->diagnostic)) {
            sg_dsn_wrap(w, r->diagnostic, strlen(r->diagnostic), "    ",
                        SG_DSN_TEXT_WIDTH);
        }

        if (r->action == SG_DSN_DELAYED && r->retry_until != 0) {
            sg_dsn_wrap(w, "(retried until", 14, "    ",
                        SG_DSN_TEXT_WIDTH);
            sg_dsn_field_date(w, NULL, r->retry_until);
        }

        sg_dsn_crlf(w);
    }

    switch (plan->returned) {

    case SG_DSN_RETURN_FULL:
        s = "Your message is attached.";
        break;

    case SG_DSN_RETURN_RET_HDRS:
        s = "As you asked (RET=HDRS), only the header section of your "
            "message is attached.";
        break;

    case SG_DSN_RETURN_REQUIRETLS:
        s = "Your message required TLS (REQUIRETLS, RFC 8689), so only "
            "its header section is attached.";
        break;

    case SG_DSN_RETURN_TOO_BIG:
        s = "Your message is too large to be returned; only its header "
            "section is attached.";
        break;

    case SG_DSN_RETURN_LONG_LINE:
        s = "Your message has lines too long to be returned; only its "
            "header section is attached.";
        break;

    default: /* SG_DSN_RETURN_NOT_FAILED */
        s = "The header section of your message is attached.";
        break;
    }

    sg_dsn_crlf(w);
    sg_dsn_wrap(w, s, strlen(s), "", SG_DSN_TEXT_WIDTH);
    sg_dsn_crlf(w);
}


static void
sg_dsn_status_part(sg_dsn_w_t *w, const sg_dsn_t *dsn)
{
    size_t                i;
    const char           *type;
    const sg_dsn_rcpt_t  *r;

    sg_dsn_crlf(w);
    sg_dsn_puts(w, "--");
    sg_dsn_puts(w, dsn->boundary);
    sg_dsn_crlf(w);
    sg_dsn_puts(w, "Content-Description: Delivery report");
    sg_dsn_crlf(w);
    sg_dsn_puts(w, "Content-Type: message/delivery-status");
    sg_dsn_crlf(w);
    sg_dsn_crlf(w);

    /* RFC 3464, 2.2: per-message fields */

    /* RFC 3464, 2.2.2 */
    sg_dsn_puts(w, "Reporting-MTA: dns; ");
    sg_dsn_puts(w, dsn->reporting_host);
    sg_dsn_crlf(w);

    /* RFC 3464, 2.2.1; RFC 3461, 4.4 */
    if (!sg_dsn_empty(dsn->envid)) {
        sg_dsn_field_xtext(w, "Original-Envelope-Id", NULL, dsn->envid);
    }

    /* RFC 3464, 2.2.5 */
    sg_dsn_field_date(w, "Arrival-Date", dsn->arrival);

    for (i = 0; i < dsn->nrcpts; i++) {
        r = &dsn->rcpts[i];

        if (!sg_dsn_wanted(dsn->sender, r->notify, r->action)) {
            continue;
        }

        /* RFC 3464, 2.3: per-recipient fields, after an empty line */
        sg_dsn_crlf(w);

        /* RFC 3464, 2.3.1; RFC 3461, 4.2: ORCPT as given, in xtext */
        if (!sg_dsn_empty(r->orcpt)) {
            type = r->orcpt_type ? r->orcpt_type : "rfc822";
            sg_dsn_field_xtext(w, "Original-Recipient", type, r->orcpt);
        }

        /*
         * RFC 3464, 2.3.2; an SMTPUTF8 address (RFC 6531) has RFC 6533's
         * address type "utf-8", in its 7-bit form (utf-8-addr-xtext, 3)
         */
        sg_dsn_puts(w, sg_dsn_is_addr(r->address)
                       ? "Final-Recipient: rfc822; "
                       : "Final-Recipient: utf-8; ");
        sg_dsn_put_addr(w, r->address);
        sg_dsn_crlf(w);

        /* RFC 3464, 2.3.3 */
        sg_dsn_puts(w, "Action: ");
        sg_dsn_puts(w, sg_dsn_action_name[r->action]);
        sg_dsn_crlf(w);

        /* RFC 3464, 2.3.4 */
        sg_dsn_puts(w, "Status: ");
        sg_dsn_puts(w, r->status);
        sg_dsn_crlf(w);

        /* RFC 3464, 2.3.5 */
        if (!sg_dsn_empty(r->remote_mta)) {
            sg_dsn_puts(w, "Remote-MTA: dns; ");
            sg_dsn_puts(w, r->remote_mta);
            sg_dsn_crlf(w);
        }

        /* RFC 3464, 2.3.6: folded like any header field */
        if (!sg_dsn_empty(r->diagnostic)) {
            type = r->diagnostic_type ? r->diagnostic_type : "smtp";
            sg_dsn_puts(w, "Diagnostic-Code: ");
            sg_dsn_puts(w, type);
            sg_dsn_puts(w, ";");
            sg_dsn_wrap(w, r->diagnostic, strlen(r->diagnostic), " ",
                        SG_DSN_FOLD_WIDTH);
            sg_dsn_crlf(w);
        }

        /* RFC 3464, 2.3.7 */
        if (r->last_attempt != 0) {
            sg_dsn_field_date(w, "Last-Attempt-Date", r->last_attempt);
        }

        /* RFC 3464, 2.3.9: only for "delayed" */
        if (r->action == SG_DSN_DELAYED && r->retry_until != 0) {
            sg_dsn_field_date(w, "Will-Retry-Until", r->retry_until);
        }
    }
}


static void
sg_dsn_original_part(sg_dsn_w_t *w, const sg_dsn_t *dsn,
    const sg_dsn_plan_t *plan)
{
    sg_dsn_crlf(w);
    sg_dsn_puts(w, "--");
    sg_dsn_puts(w, dsn->boundary);
    sg_dsn_crlf(w);

    if (plan->returned == SG_DSN_RETURN_FULL) {
        /* RFC 3464, 2; RFC 2046, 5.2.1 */
        sg_dsn_puts(w, "Content-Description: Undelivered Message");
        sg_dsn_crlf(w);
        sg_dsn_puts(w, "Content-Type: message/rfc822");

    } else {
        /* RFC 6522, 4; RFC 3462 */
        sg_dsn_puts(w, "Content-Description: Message Headers");
        sg_dsn_crlf(w);
        sg_dsn_puts(w, "Content-Type: text/rfc822-headers");
    }

    sg_dsn_crlf(w);

    if (plan->eightbit) {
        /* RFC 2046, 5.2.1: 7bit, 8bit or binary only */
        sg_dsn_puts(w, "Content-Transfer-Encoding: 8bit");
        sg_dsn_crlf(w);
    }

    sg_dsn_crlf(w);

    sg_dsn_copy(w, dsn->message, plan->return_len);

    /* the CRLF before the close delimiter belongs to it (RFC 2046, 5.1.1) */
    sg_dsn_crlf(w);
    sg_dsn_puts(w, "--");
    sg_dsn_puts(w, dsn->boundary);
    sg_dsn_puts(w, "--");
    sg_dsn_crlf(w);
}


/*
 * Copies the original with every line end made CRLF (a bare CR or LF
 * becomes CRLF: never a bare one on the wire) and lines cut at 998
 * octets with CRLF SP (a fold: only header lines can be that long, the
 * plan returns no body with such a line).  The copy ends with CRLF.
 */

static void
sg_dsn_copy(sg_dsn_w_t *w, const unsigned char *p, size_t len)
{
    size_t                n, room;
    const unsigned char  *end, *q;

    end = p + len;

    while (p < end) {
        n = sg_dsn_eol(p, end);

        if (n) {
            sg_dsn_crlf(w);
            p += n;
            continue;
        }

        for (q = p; q < end && *q != '\r' && *q != '\n'; q++) {
            /* void */
        }

        while (p < q) {
            if (w->col >= SG_DSN_LINE_MAX) {
                sg_dsn_crlf(w);
                sg_dsn_put(w, " ", 1);
            }

            room = SG_DSN_LINE_MAX - w->col;
            n = (size_t) (q - p) < room ? (size_t) (q - p) : room;

            sg_dsn_put(w, p, n);
            p += n;
        }
    }

    if (w->col != 0) {
        sg_dsn_crlf(w);
    }
}


/*
 * Writes text from the current column on: words separated by one space,
 * a line folded before width with CRLF and indent, a word longer than
 * a line cut at 998 octets.  Controls (CR and LF too) separate words,
 * octets >= 0x80 become '?'.
 */

static void
sg_dsn_wrap(sg_dsn_w_t *w, const char *s, size_t len, const char *indent,
    size_t width)
{
    size_t                i, n, ilen, room;
    unsigned char         c;
    const unsigned char  *p, *word;

    p = (const unsigned char *) s;
    ilen = strlen(indent);
    i = 0;

    while (i < len) {
        if (sg_dsn_text_char(p[i]) == ' ') {
            i++;
            continue;
        }

        word = p + i;
        n = 0;

        while (i < len && sg_dsn_text_char(p[i]) != ' ') {
            i++;
            n++;
        }

        if (w->col > ilen && w->col + 1 + n > width) {
            sg_dsn_crlf(w);
            sg_dsn_puts(w, indent);

        } else if (w->col > ilen) {
            sg_dsn_put(w, " ", 1);

        } else if (w->col == 0) {
            sg_dsn_puts(w, indent);
        }

        while (n > 0) {
            if (w->col >= SG_DSN_LINE_MAX) {
                sg_dsn_crlf(w);
                sg_dsn_puts(w, indent);
            }

            room = SG_DSN_LINE_MAX - w->col;

            while (n > 0 && room > 0) {
                c = sg_dsn_text_char(*word++);
                sg_dsn_put(w, &c, 1);
                n--;
                room--;
            }
        }
    }
}


static void
sg_dsn_field_date(sg_dsn_w_t *w, const char *name, time_t t)
{
    char  date[40];

    (void) sg_dsn_date(t, date, sizeof(date));

    if (name == NULL) {
        /* inside text: " <date>)" */
        sg_dsn_put(w, " ", 1);
        sg_dsn_puts(w, date);
        sg_dsn_puts(w, ")");
        return;
    }

    sg_dsn_puts(w, name);
    sg_dsn_puts(w, ": ");
    sg_dsn_puts(w, date);
    sg_dsn_crlf(w);
}


static void
sg_dsn_field_xtext(sg_dsn_w_t *w, const char *name, const char *prefix,
    const char *value)
{
    size_t  n;
    char    enc[SG_DSN_ORCPT_MAX + 1];

    /* checked: the encoding is at most SG_DSN_ORCPT_MAX octets */
    n = sg_dsn_xtext_encode((const unsigned char *) value, strlen(value),
                            enc, sizeof(enc));

    sg_dsn_puts(w, name);
    sg_dsn_puts(w, ": ");

    if (prefix != NULL) {
        sg_dsn_puts(w, prefix);
        sg_dsn_puts(w, ";");
    }

    /* xtext has no spaces, and at most 500 octets fit on the line */
    sg_dsn_put(w, enc, n < sizeof(enc) ? n : sizeof(enc) - 1);
    sg_dsn_crlf(w);
}


static void
sg_dsn_put(sg_dsn_w_t *w, const void *p, size_t n)
{
    if (n > SIZE_MAX - w->len) {
        w->overflow = 1;
        return;
    }

    if (w->len + n <= w->size) {
        memcpy(w->buf + w->len, p, n);
    }

    w->len += n;
    w->col += n;
}


static void
sg_dsn_puts(sg_dsn_w_t *w, const char *s)
{
    sg_dsn_put(w, s, strlen(s));
}


static void
sg_dsn_crlf(sg_dsn_w_t *w)
{
    sg_dsn_put(w, "\r\n", 2);
    w->col = 0;
}


/* the length of the line end at p: CRLF 2, a bare CR or LF 1, else 0 */

static size_t
sg_dsn_eol(const unsigned char *p, const unsigned char *end)
{
    if (p >= end) {
        return 0;
    }

    if (*p == '\r') {
        return (p + 1 < end && p[1] == '\n') ? 2 : 1;
    }

    return (*p == '\n') ? 1 : 0;
}


/* RFC 1123, 2.1 LDH labels; with literal, "[...]" of an IP address */

static int
sg_dsn_is_host(const char *s, int literal)
{
    if (sg_dsn_empty(s) || strlen(s) > SG_DSN_HOST_MAX) {
        return 0;
    }

    if (literal && s[0] == '[') {
        return s[strlen(s) - 1] == ']'
               && sg_dsn_is_set(s + 1, SG_DSN_DIGIT "abcdefABCDEF.:]IPv",
                                SG_DSN_HOST_MAX);
    }

    return sg_dsn_is_set(s, SG_DSN_ALPHA SG_DSN_DIGIT "-.", SG_DSN_HOST_MAX)
           && s[0] != '.' && s[0] != '-';
}


/* printable ASCII, no "<" ">" outside of what RFC 5321, 4.1.2 allows */

static int
sg_dsn_is_addr(const char *s)
{
    size_t  i;

    if (sg_dsn_empty(s)) {
        return 0;
    }

    for (i = 0; s[i] != '\0'; i++) {
        if ((unsigned char) s[i] < 0x20 || (unsigned char) s[i] > 0x7e
            || s[i] == '<' || s[i] == '>')
        {
            return 0;
        }
    }

    return i <= SG_DSN_ADDR_MAX;
}


/* UTF-8 (RFC 3629), no controls, no "<" ">", some octet not ASCII */

static int
sg_dsn_is_utf8_addr(const char *s)
{
    size_t          i, n, k;
    unsigned char   c;
    uint32_t        cp;
    int             wide;

    if (sg_dsn_empty(s)) {
        return 0;
    }

    wide = 0;

    for (i = 0; s[i] != '\0'; i += n) {
        c = (unsigned char) s[i];

        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f || c == '<' || c == '>') {
                return 0;
            }

            n = 1;
            continue;
        }

        if (c >= 0xc2 && c <= 0xdf) {
            n = 2;
            cp = c & 0x1f;

        } else if (c >= 0xe0 && c <= 0xef) {
            n = 3;
            cp = c & 0x0f;

        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 4;
            cp = c & 0x07;

        } else {
            return 0;
        }

        for (k = 1; k < n; k++) {
            c = (unsigned char) s[i + k];

            if ((c & 0xc0) != 0x80) {
                return 0;
            }

            cp = (cp << 6) | (c & 0x3f);
        }

        /* overlong, surrogates, beyond U+10FFFF; C1 controls */
        if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000)
            || (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff
            || cp < 0xa0)
        {
            return 0;
        }

        wide = 1;
    }

    return wide && i <= SG_DSN_ADDR_MAX;
}


/*
 * An address as is when it is printable ASCII; otherwise RFC 6533, 3's
 * utf-8-addr-xtext: QCHAR as is, anything else as "\x{HEXPOINT}"
 * (upper-case hex, at least two digits)
 */

static void
sg_dsn_put_addr(sg_dsn_w_t *w, const char *addr)
{
    size_t          i, n, k;
    char            hex[16];
    uint32_t        cp;
    unsigned char   c;

    if (sg_dsn_is_addr(addr)) {
        sg_dsn_puts(w, addr);
        return;
    }

    for (i = 0; addr[i] != '\0'; i += n) {
        c = (unsigned char) addr[i];

        if (c < 0x80) {
            n = 1;
            cp = c;

            if (c > 0x20 && c < 0x7f && c != '+' && c != '=' && c != '\\') {
                sg_dsn_put(w, &addr[i], 1);
                continue;
            }

        } else {
            /* checked by sg_dsn_is_utf8_addr() */
            n = (c >= 0xf0) ? 4 : (c >= 0xe0) ? 3 : 2;
            cp = c & (0x7f >> n);

            for (k = 1; k < n; k++) {
                cp = (cp << 6) | ((unsigned char) addr[i + k] & 0x3f);
            }
        }

        (void) snprintf(hex, sizeof(hex), "\\x{%02X}", (unsigned) cp);
        sg_dsn_puts(w, hex);
    }
}


static int
sg_dsn_is_set(const char *s, const char *allowed, size_t max)
{
    size_t  n;

    if (sg_dsn_empty(s)) {
        return 0;
    }

    n = strspn(s, allowed);

    return n <= max && s[n] == '\0';
}


/*
 * RFC 3463, 2: class "." subject "." detail, subject and detail 1 to 3
 * digits.  RFC 3464, 2.3.4: the class matches the action; a failed
 * recipient may carry a 4.x.x status (retries given up on).
 */

static int
sg_dsn_is_status(const char *s, sg_dsn_action_e action)
{
    size_t  i, part, digits;

    if (sg_dsn_empty(s)) {
        return 0;
    }

    switch (action) {

    case SG_DSN_FAILED:
        if (s[0] != '5' && s[0] != '4') {
            return 0;
        }
        break;

    case SG_DSN_DELAYED:
        if (s[0] != '4') {
            return 0;
        }
        break;

    default:
        if (s[0] != '2') {
            return 0;
        }
        break;
    }

    if (s[1] != '.') {
        return 0;
    }

    part = 1;
    digits = 0;

    for (i = 2; s[i] != '\0'; i++) {
        if (s[i] >= '0' && s[i] <= '9') {
            if (++digits > 3) {
                return 0;
            }

            continue;
        }

        if (s[i] != '.' || digits == 0 || part == 2) {
            return 0;
        }

        part++;
        digits = 0;
    }

    return part == 2 && digits > 0;
}


static unsigned char
sg_dsn_text_char(unsigned char c)
{
    if (c < 0x20 || c == 0x7f) {
        return ' ';
    }

    return c >= 0x80 ? '?' : c;
}
