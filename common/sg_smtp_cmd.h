
/*
 * sg: SMTP command line parser (server side).
 *
 * Pure C99: no nginx types, no I/O, no allocation.  The parser fills a
 * caller-provided sg_smtp_cmd_t whose strings point into the input line;
 * the line must outlive the result.  Every rule cites the RFC section it
 * implements (RFC 5321 unless stated otherwise).
 */


#ifndef _SG_SMTP_CMD_H_INCLUDED_
#define _SG_SMTP_CMD_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/* RFC 5321, 4.5.3.1.4: a command line is at most 512 octets with CRLF */
#define SG_SMTP_MAX_LINE          512

/* RFC 5321, 4.5.3.1.1: local-part */
#define SG_SMTP_MAX_LOCAL_PART    64
/* RFC 5321, 4.5.3.1.2: domain; RFC 1035, 2.3.4: label */
#define SG_SMTP_MAX_DOMAIN        255
#define SG_SMTP_MAX_LABEL         63
/* RFC 5321, 4.5.3.1.3: path, "<" and ">" included */
#define SG_SMTP_MAX_PATH          256

/* RFC 4954, 4: sasl-mech = 1*20mech-char */
#define SG_SMTP_MAX_SASL_MECH     20

#define SG_SMTP_MAX_PARAMS        16


typedef enum {
    SG_SMTP_CMD_UNKNOWN = 0,
    SG_SMTP_CMD_HELO,
    SG_SMTP_CMD_EHLO,
    SG_SMTP_CMD_MAIL,
    SG_SMTP_CMD_RCPT,
    SG_SMTP_CMD_DATA,
    SG_SMTP_CMD_BDAT,
    SG_SMTP_CMD_RSET,
    SG_SMTP_CMD_NOOP,
    SG_SMTP_CMD_QUIT,
    SG_SMTP_CMD_VRFY,
    SG_SMTP_CMD_EXPN,
    SG_SMTP_CMD_HELP,
    SG_SMTP_CMD_STARTTLS,
    SG_SMTP_CMD_AUTH
} sg_smtp_verb_e;


typedef enum {
    SG_SMTP_OK = 0,
    SG_SMTP_ERR_SYNTAX,       /* 501 5.5.4 (arguments) / 501 5.5.2 */
    SG_SMTP_ERR_UNKNOWN,      /* 500 5.5.1 */
    SG_SMTP_ERR_TOO_LONG,     /* 500 5.5.2 */
    SG_SMTP_ERR_PATH,         /* 553 5.1.3 bad address syntax */
    SG_SMTP_ERR_PARAMS        /* 555 5.5.4 too many / malformed params */
} sg_smtp_rc_e;


/* a string that is not NUL-terminated; data points into the input line */
typedef struct {
    const char               *data;
    size_t                    len;
} sg_str_t;


typedef struct {
    sg_str_t                  name;
    sg_str_t                  value;     /* value.data is NULL without "=" */
} sg_smtp_param_t;


typedef struct {
    sg_smtp_verb_e            verb;

    /* the raw text after "VERB SP", for every command that has one */
    sg_str_t                  arg;

    /*
     * MAIL/RCPT: the address between "<" and ">" without the source route,
     * that is exactly local_part "@" domain; empty for "<>".  local_part
     * is raw: a quoted local part keeps its quotes and backslashes.
     * domain may be an address literal, brackets included.
     */
    sg_str_t                  path;
    sg_str_t                  local_part;
    sg_str_t                  domain;

    /* AUTH: mechanism, and the initial response (empty when absent) */
    sg_str_t                  auth_mech;
    sg_str_t                  auth_initial;

    /* BDAT: chunk size, and whether "LAST" was given (RFC 3030, 2) */
    uint64_t                  bdat_size;

    unsigned                  null_path:1;         /* MAIL FROM:<> */
    unsigned                  postmaster:1;        /* RCPT TO:<Postmaster> */
    unsigned                  utf8:1;              /* non-ASCII seen */
    unsigned                  has_source_route:1;  /* <@a,@b:u@c> */
    unsigned                  quoted_local:1;      /* "..."@domain */
    unsigned                  address_literal:1;   /* u@[...] */
    unsigned                  bdat_last:1;

    sg_smtp_param_t           params[SG_SMTP_MAX_PARAMS];
    size_t                    nparams;
} sg_smtp_cmd_t;


/*
 * Parses one command line; line excludes the CRLF.  max_len is the longest
 * command line allowed, CRLF included (RFC 5321, 4.5.3.1.4); 0 means
 * SG_SMTP_MAX_LINE.  A caller that advertised extensions raising the limit
 * passes a larger value (e.g. RFC 1870, 3; RFC 3461, 4).
 *
 * cmd is always cleared; on an error cmd->verb is still set when the verb
 * was recognised.  *err_detail (when err_detail is not NULL) receives a
 * static string describing the error, NULL on success.
 *
 * cmd->utf8 is set when a valid UTF-8 non-ASCII byte sequence appears in
 * the arguments (address, parameter values or text); the caller refuses
 * the command unless SMTPUTF8 applies (RFC 6531, 3.2).
 */
sg_smtp_rc_e sg_smtp_cmd_parse(const char *line, size_t len, size_t max_len,
    sg_smtp_cmd_t *cmd, const char **err_detail);

/*
 * Finds an esmtp-param by keyword, case-insensitively (RFC 5321, 2.4).
 * Returns 1 and sets *value (when value is not NULL) if found, 0 otherwise.
 */
int sg_smtp_param_find(const sg_smtp_cmd_t *cmd, const char *name,
    sg_str_t *value);

/*
 * Decodes xtext (RFC 3461, 4) into out, which is not NUL-terminated;
 * *n receives the decoded length.  Returns SG_SMTP_ERR_SYNTAX on malformed
 * input or a decoded control or non-ASCII character, SG_SMTP_ERR_TOO_LONG
 * when out is too small.
 */
sg_smtp_rc_e sg_smtp_xtext_decode(const sg_str_t *in, char *out,
    size_t outlen, size_t *n);

/*
 * Returns 1 if d is a syntactically valid Domain (RFC 5321, 4.1.2), not an
 * address literal: LDH labels, no trailing dot, labels of at most 63 and a
 * name of at most 255 octets.  With allow_utf8, labels may be U-labels
 * (RFC 6531, 3.3) of valid UTF-8.
 */
int sg_smtp_domain_valid(const char *d, size_t len, int allow_utf8);


#endif /* _SG_SMTP_CMD_H_INCLUDED_ */
