
/*
 * sg: the SMTP client's protocol core, pure.
 *
 * Pure C99: no nginx types, no I/O, no allocation.  Five pieces the
 * outbound client (ngx_mail_sg_client.c) puts on the wire:
 *
 *   a reply parser, incremental over received bytes (RFC 5321, 4.2);
 *   an EHLO capability parser (RFC 5321, 4.1.1.1, and the extensions);
 *   MAIL FROM and RCPT TO builders with the ESMTP parameters the peer
 *   supports (RFC 1870, 6152, 6531, 3461, 8689);
 *   a streaming DATA encoder: dot-stuffing and CRLF line ends only
 *   (RFC 5321, 4.5.2 and 2.3.8), and the end-of-data terminator;
 *   the RFC 8460 (4.3.1) result type of a session's TLS facts.
 *
 * Every rule cites the RFC section it implements (RFC 5321 unless stated
 * otherwise).
 */


#ifndef _SG_SMTP_CLIENT_H_INCLUDED_
#define _SG_SMTP_CLIENT_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/*
 * RFC 5321, 4.5.3.1.5: a reply line is at most 512 octets with its CRLF;
 * be lenient with peers that send longer ones, up to this
 */
#define SG_SMTP_REPLY_LINE_MAX    2048
#define SG_SMTP_REPLY_LINES_MAX   100     /* lines of one reply */
#define SG_SMTP_REPLY_TEXT_MAX    512     /* reply text kept, NUL included */
#define SG_SMTP_STATUS_MAX        16      /* "5.7.30" and a NUL */

/* the longest MAIL or RCPT line the builders write, CRLF included */
#define SG_SMTP_CMD_OUT_MAX       2048

/* room sg_smtp_dot_encode() needs per input octet, and the terminator */
#define SG_SMTP_DOT_STEP_MAX      4
#define SG_SMTP_DOT_FINISH_MAX    5


/* the reply parser */

typedef enum {
    SG_SMTP_REPLY_AGAIN = 0,      /* more input needed */
    SG_SMTP_REPLY_DONE,           /* a complete reply */
    SG_SMTP_REPLY_ERROR           /* malformed: r->error says why */
} sg_smtp_reply_rc_e;


/*
 * Called for each line of a reply, in order: index 0 is the first line;
 * text is the line after the code and its separator, without the CRLF
 * (not NUL-terminated, valid only during the call).
 */
typedef void (*sg_smtp_reply_line_pt)(void *data, unsigned index,
    const char *text, size_t len);


typedef struct {
    /* the result, once DONE */
    unsigned                  code;        /* 200..599 */
    unsigned                  lines;
    char                      status[SG_SMTP_STATUS_MAX];  /* RFC 3463
                                              "x.y.z" of the first line,
                                              or "" */
    char                      text[SG_SMTP_REPLY_TEXT_MAX];  /* the lines
                                              as received, joined with
                                              " / ", control characters
                                              as "?", NUL-terminated */
    size_t                    text_len;
    unsigned                  truncated:1; /* text was cut */
    const char               *error;       /* static, when ERROR */

    sg_smtp_reply_line_pt     line_handler;
    void                     *line_data;

    /* state */
    size_t                    line_len;
    char                      line[SG_SMTP_REPLY_LINE_MAX];
} sg_smtp_reply_t;


void sg_smtp_reply_init(sg_smtp_reply_t *r, sg_smtp_reply_line_pt handler,
    void *data);

/*
 * Consumes input up to the end of one reply.  *consumed receives the
 * octets used: all of len unless DONE, when the rest (if any) belongs to
 * the next reply.  After DONE or ERROR, call sg_smtp_reply_init() before
 * parsing the next reply.  A line ends with LF; a CR before it is
 * removed (bare LF accepted, RFC 5321, 4.1.1.4 asks servers for CRLF).
 */
sg_smtp_reply_rc_e sg_smtp_reply_parse(sg_smtp_reply_t *r,
    const unsigned char *in, size_t len, size_t *consumed);


/* EHLO capabilities (RFC 5321, 4.1.1.1; keywords case-insensitive, 2.4) */

#define SG_SMTP_EXT_STARTTLS      0x0001   /* RFC 3207 */
#define SG_SMTP_EXT_PIPELINING    0x0002   /* RFC 2920 */
#define SG_SMTP_EXT_SIZE          0x0004   /* RFC 1870 */
#define SG_SMTP_EXT_8BITMIME      0x0008   /* RFC 6152 */
#define SG_SMTP_EXT_SMTPUTF8      0x0010   /* RFC 6531 */
#define SG_SMTP_EXT_DSN           0x0020   /* RFC 3461 */
#define SG_SMTP_EXT_REQUIRETLS    0x0040   /* RFC 8689 */
#define SG_SMTP_EXT_ENHANCEDSTATUSCODES  0x0080   /* RFC 2034 */
#define SG_SMTP_EXT_CHUNKING      0x0100   /* RFC 3030 */


typedef struct {
    unsigned                  exts;        /* SG_SMTP_EXT_* */
    uint64_t                  size;        /* SIZE n (RFC 1870, 4); 0: no
                                              number, or no fixed limit */
} sg_smtp_ehlo_t;


void sg_smtp_ehlo_init(sg_smtp_ehlo_t *e);

/*
 * One line of a 250 reply to EHLO, as sg_smtp_reply_line_pt (data is the
 * sg_smtp_ehlo_t): line 0 is the greeting and is skipped.
 */
void sg_smtp_ehlo_line(void *data, unsigned index, const char *text,
    size_t len);

/*
 * A whole EHLO reply in a buffer (for tests and tools): returns the reply
 * code, 0 when the buffer does not hold one well-formed reply.  The
 * capabilities are set only for a 250 reply.
 */
unsigned sg_smtp_ehlo_parse(const char *reply, size_t len,
    sg_smtp_ehlo_t *e);


/* MAIL FROM and RCPT TO */

typedef enum {
    SG_SMTP_BUILD_OK = 0,
    SG_SMTP_BUILD_TOO_LONG,       /* does not fit the buffer */
    SG_SMTP_BUILD_INVALID,        /* a value that must not be sent */
    SG_SMTP_BUILD_NEED_SMTPUTF8,  /* RFC 6531, 3.2: the peer lacks it */
    SG_SMTP_BUILD_NEED_REQUIRETLS /* RFC 8689, 4.1: the peer lacks it */
} sg_smtp_build_rc_e;


typedef struct {
    const char               *sender;      /* without "<>"; len 0: <> */
    size_t                    sender_len;
    uint64_t                  size;        /* 0: no SIZE= */
    const char               *ret;         /* "FULL", "HDRS"; len 0: none */
    size_t                    ret_len;
    const char               *envid;       /* xtext; len 0: none */
    size_t                    envid_len;
    unsigned                  eightbit:1;  /* BODY=8BITMIME */
    unsigned                  smtputf8:1;  /* SMTPUTF8 needed (message or
                                              any recipient) */
    unsigned                  requiretls:1;
} sg_smtp_mail_t;


typedef struct {
    const char               *address;     /* without "<>" */
    size_t                    address_len;
    const char               *notify;      /* len 0: none */
    size_t                    notify_len;
    const char               *orcpt;       /* addr-type;xtext, len 0: none */
    size_t                    orcpt_len;
} sg_smtp_rcpt_t;


/*
 * Write "MAIL FROM:<s> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8] [RET=x]
 * [ENVID=x] [REQUIRETLS]" CRLF into out (size octets at most); *n
 * receives its length.  exts are the peer's SG_SMTP_EXT_* bits: SIZE,
 * BODY and the DSN parameters are left out when the peer lacks their
 * extension; SMTPUTF8 and REQUIRETLS are errors then.  *detail (when not
 * NULL) receives a static reason on an error.
 */
sg_smtp_build_rc_e sg_smtp_build_mail(const sg_smtp_mail_t *m,
    unsigned exts, char *out, size_t size, size_t *n, const char **detail);

/* "RCPT TO:<a> [NOTIFY=x] [ORCPT=x]" CRLF, the same way */
sg_smtp_build_rc_e sg_smtp_build_rcpt(const sg_smtp_rcpt_t *r,
    unsigned exts, char *out, size_t size, size_t *n, const char **detail);

/* 1 if an address has octets above 127 (it needs SMTPUTF8) */
int sg_smtp_addr_utf8(const char *addr, size_t len);


/* the DATA encoder */

typedef struct {
    int                       state;
} sg_smtp_dot_t;


void sg_smtp_dot_init(sg_smtp_dot_t *d);

/*
 * Encodes message octets for the wire: a "." starting a line is doubled
 * (RFC 5321, 4.5.2); CRLF stays, and a bare CR or bare LF becomes CRLF
 * (RFC 5321, 2.3.8: never a bare CR or LF on the wire).  Any chunking
 * of the input gives the same output.  Consumes input while out has
 * SG_SMTP_DOT_STEP_MAX octets free; returns the octets written and sets
 * *consumed.
 */
size_t sg_smtp_dot_encode(sg_smtp_dot_t *d, const unsigned char *in,
    size_t len, unsigned char *out, size_t size, size_t *consumed);

/*
 * The end of data (RFC 5321, 4.1.1.4): a CRLF when the message did not
 * end with one, then ".\r\n".  Returns the octets written, 0 when size
 * is less than SG_SMTP_DOT_FINISH_MAX.
 */
size_t sg_smtp_dot_finish(sg_smtp_dot_t *d, unsigned char *out,
    size_t size);


/* TLS facts to RFC 8460 result types */

/*
 * The certificate verification as OpenSSL reported it, in OpenSSL-free
 * terms; the nginx side maps X509_V_ERR_* onto these.
 */
typedef enum {
    SG_SMTP_CERT_OK = 0,          /* X509_V_OK */
    SG_SMTP_CERT_NONE,            /* no certificate was presented */
    SG_SMTP_CERT_EXPIRED,         /* X509_V_ERR_CERT_HAS_EXPIRED */
    SG_SMTP_CERT_UNTRUSTED,       /* self-signed, unknown issuer, ... */
    SG_SMTP_CERT_INVALID          /* any other verification error */
} sg_smtp_cert_e;


typedef struct {
    unsigned                  starttls_offered:1;  /* in the EHLO reply */
    unsigned                  starttls_refused:1;  /* non-220 to STARTTLS */
    unsigned                  tls_attempted:1;     /* handshake started */
    unsigned                  handshake_ok:1;
    unsigned                  host_match:1;        /* certificate names
                                                      the host */
    sg_smtp_cert_e            cert;
} sg_smtp_tls_facts_t;


/*
 * The RFC 8460, 4.3.1 result type of a session, NULL when there is no
 * failure to report (TLS succeeded and validated, or was not tried
 * although offered).
 */
const char *sg_smtp_tls_result_type(const sg_smtp_tls_facts_t *f);


#endif /* _SG_SMTP_CLIENT_H_INCLUDED_ */
