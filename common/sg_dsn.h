/*
 * sg: delivery status notifications (RFC 3464, RFC 3461), pure.
 *
 * Builds the one DSN message that reports on one original message: the
 * header section, a text/plain part for people, a message/delivery-status
 * part for programs, and the original message (message/rfc822) or its
 * header section (text/rfc822-headers).  No nginx types, no I/O, no
 * allocation: the caller measures, allocates and builds (see
 * sg_dsn_build()).  Unit-tested in tests/unit/test_sg_dsn.c.
 *
 * The DSN itself is sent "MAIL FROM:<>" to dsn->sender (RFC 3461, 6.1;
 * RFC 5321, 6.1), with BODY=8BITMIME when res->eightbit is set and with
 * REQUIRETLS when res->requiretls is set (RFC 8689, 5).
 */

#ifndef _SG_DSN_H_INCLUDED_
#define _SG_DSN_H_INCLUDED_


#include <stddef.h>
#include <time.h>


#define SG_DSN_LINE_MAX       998     /* RFC 5322, 2.1.1, without CRLF */
#define SG_DSN_FOLD_WIDTH     78      /* RFC 5322, 2.1.1 SHOULD */
#define SG_DSN_TEXT_WIDTH     76      /* the text/plain part */
#define SG_DSN_ADDR_MAX       254     /* RFC 5321, 4.5.3.1.3, no "<>" */
#define SG_DSN_HOST_MAX       255     /* RFC 5321, 4.5.3.1.2 */
#define SG_DSN_BOUNDARY_MAX   70      /* RFC 2046, 5.1.1 */
#define SG_DSN_TOKEN_MAX      128     /* the Message-ID left part */
#define SG_DSN_ENVID_MAX      100     /* RFC 3461, 4.4 (decoded) */
#define SG_DSN_ORCPT_MAX      500     /* RFC 3461, 4.2 */
#define SG_DSN_RCPTS_MAX      1000    /* recipients in one DSN */


/* RFC 3461, 4.1: NOTIFY; 0 means the parameter was not given */
#define SG_DSN_NOTIFY_NEVER    0x01
#define SG_DSN_NOTIFY_SUCCESS  0x02
#define SG_DSN_NOTIFY_FAILURE  0x04
#define SG_DSN_NOTIFY_DELAY    0x08


/* RFC 3464, 2.3.3 */
typedef enum {
    SG_DSN_FAILED = 0,
    SG_DSN_DELAYED,
    SG_DSN_DELIVERED,
    SG_DSN_RELAYED
} sg_dsn_action_e;


/* RFC 3461, 4.3 */
typedef enum {
    SG_DSN_RET_UNSET = 0,     /* not given: sg returns the full message */
    SG_DSN_RET_FULL,
    SG_DSN_RET_HDRS
} sg_dsn_ret_e;


/* why only the header section of the original is returned */
typedef enum {
    SG_DSN_RETURN_FULL = 0,   /* message/rfc822 */
    SG_DSN_RETURN_RET_HDRS,   /* RET=HDRS (RFC 3461, 4.3) */
    SG_DSN_RETURN_REQUIRETLS, /* RFC 8689, 5: headers only, whatever RET */
    SG_DSN_RETURN_TOO_BIG,    /* the body exceeds max_return */
    SG_DSN_RETURN_LONG_LINE,  /* a body line exceeds 998 octets */
    SG_DSN_RETURN_NOT_FAILED  /* no failed recipient: delay/success DSN */
} sg_dsn_return_e;


typedef enum {
    SG_DSN_OK = 0,
    SG_DSN_NONE,              /* no DSN is due: null sender, or NOTIFY */
    SG_DSN_ERR_SPACE,         /* the buffer is too small: see res->len */
    SG_DSN_ERR_INVALID,       /* an input is missing or malformed */
    SG_DSN_ERR_BOUNDARY       /* the boundary occurs in the content */
} sg_dsn_rc_e;


/*
 * One recipient.  Strings are NUL-terminated; NULL (or "") means absent.
 * address, orcpt and envid are plain text (decoded from xtext: see
 * sg_smtp_xtext_decode()); the generator encodes what must be encoded.
 */
typedef struct {
    const char        *address;         /* RCPT TO, without "<>" */
    const char        *orcpt_type;      /* ORCPT addr-type; NULL: rfc822 */
    const char        *orcpt;           /* ORCPT address, decoded */
    unsigned           notify;          /* SG_DSN_NOTIFY_* or 0 */
    sg_dsn_action_e    action;
    const char        *status;          /* "5.1.1" (RFC 3463) */
    const char        *remote_mta;      /* host name, when known */
    const char        *diagnostic_type; /* NULL: "smtp" (RFC 3464, 2.3.6) */
    const char        *diagnostic;      /* the reply or the reason */
    time_t             last_attempt;    /* 0: unknown */
    time_t             retry_until;     /* delayed only; 0: unknown */
} sg_dsn_rcpt_t;


typedef struct {
    const char        *reporting_host;  /* this MTA, a host name */
    const char        *sender;          /* MAIL FROM; "" or NULL: <> */
    const char        *envid;           /* ENVID, decoded; may be NULL */
    sg_dsn_ret_e       ret;
    unsigned           requiretls:1;    /* the message is RFC 8689-flagged */
    time_t             arrival;
    time_t             now;             /* the Date of the DSN */
    const char        *message_id;      /* a unique token: <token@host> */
    const char        *boundary;        /* a unique token, bchars only */

    /* the original message: header section, CRLF CRLF, body */
    const unsigned char  *message;
    size_t             message_len;
    /*
     * message may be only the first message_len octets of the original
     * (a DSN returns at most its header section and max_return octets of
     * body): message_total is the original's full length (0: message_len)
     */
    size_t             message_total;
    size_t             max_return;      /* body octets; 0: no limit */

    const sg_dsn_rcpt_t  *rcpts;
    size_t             nrcpts;
} sg_dsn_t;


typedef struct {
    size_t             len;             /* octets written, or needed */
    size_t             reported;        /* recipients in the DSN */
    sg_dsn_return_e    returned;        /* what of the original is in it */
    unsigned           eightbit:1;      /* 8-bit octets: BODY=8BITMIME */
    unsigned           requiretls:1;    /* send the DSN with REQUIRETLS */
    const char        *err;             /* a reason for a person */
} sg_dsn_result_t;


/*
 * RFC 3461, 4.1 and RFC 5321, 6.1: whether a recipient with this NOTIFY
 * and this outcome is reported to this sender.  Never to a null sender,
 * never with NOTIFY=NEVER.  Without NOTIFY, sg reports failures only
 * (RFC 3461, 4.1 allows FAILURE or FAILURE,DELAY: sg sends a delay notice
 * only when DELAY was asked for).  delivered/relayed only with SUCCESS.
 */
int sg_dsn_wanted(const char *sender, unsigned notify,
    sg_dsn_action_e action);

/*
 * Builds the DSN into buf (size octets; buf may be NULL when size is 0).
 * Only the recipients sg_dsn_wanted() accepts are reported.
 *
 * SG_DSN_OK: res->len octets written.  SG_DSN_ERR_SPACE: nothing usable
 * in buf, res->len is the exact size needed (call with NULL, 0 to
 * measure, then again with a buffer that large).  SG_DSN_NONE: no DSN is
 * due.  SG_DSN_ERR_INVALID and SG_DSN_ERR_BOUNDARY: res->err says why.
 *
 * Every line of the output ends with CRLF and is at most 998 octets long,
 * whatever the inputs hold.  Octets >= 0x80 in the returned original are
 * kept as they are and set res->eightbit; in generated text they become
 * '?'.
 */
sg_dsn_rc_e sg_dsn_build(const sg_dsn_t *dsn, unsigned char *buf,
    size_t size, sg_dsn_result_t *res);

/*
 * RFC 3461, 4: xtext-encodes len octets of in ('+', '=', controls,
 * space and octets >= 0x80 become "+XX").  Writes at most size - 1
 * octets and a NUL; returns the length of the full encoding (as
 * snprintf does).
 */
size_t sg_dsn_xtext_encode(const unsigned char *in, size_t len, char *out,
    size_t size);

/* writes an RFC 5322, 3.3 date-time in UTC; size >= 32 */
size_t sg_dsn_date(time_t t, char *out, size_t size);


#endif /* _SG_DSN_H_INCLUDED_ */
