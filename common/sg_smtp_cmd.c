
/*
 * sg: SMTP command line parser (server side).
 *
 * References: RFC 5321 (SMTP; sections without an RFC number are from it),
 * RFC 6531 (SMTPUTF8), RFC 3629 (UTF-8), RFC 3461 (DSN, xtext),
 * RFC 3030 (CHUNKING), RFC 3207 (STARTTLS), RFC 4954 (AUTH).
 */


#include <string.h>

#include "sg_smtp_cmd.h"


typedef unsigned char  sg_u_char;


typedef struct {
    const char               *name;
    size_t                    len;
    sg_smtp_verb_e            verb;
    unsigned                  arg;
} sg_smtp_verb_t;


/* how a verb takes its argument */
#define SG_SMTP_ARG_NONE      0    /* an argument is a syntax error */
#define SG_SMTP_ARG_OPTIONAL  1
#define SG_SMTP_ARG_REQUIRED  2


static sg_smtp_rc_e sg_smtp_parse_helo(sg_smtp_cmd_t *cmd,
    const sg_u_char *p, const sg_u_char *end, const char **detail);
static sg_smtp_rc_e sg_smtp_parse_mail_rcpt(sg_smtp_cmd_t *cmd,
    const sg_u_char *p, const sg_u_char *end, const char **detail);
static sg_smtp_rc_e sg_smtp_parse_path(sg_smtp_cmd_t *cmd,
    const sg_u_char **pp, const sg_u_char *end, const char **detail);
static sg_smtp_rc_e sg_smtp_parse_params(sg_smtp_cmd_t *cmd,
    const sg_u_char *p, const sg_u_char *end, const char **detail);
static sg_smtp_rc_e sg_smtp_parse_bdat(sg_smtp_cmd_t *cmd,
    const sg_u_char *p, const sg_u_char *end, const char **detail);
static sg_smtp_rc_e sg_smtp_parse_auth(sg_smtp_cmd_t *cmd,
    const sg_u_char *p, const sg_u_char *end, const char **detail);
static const char *sg_smtp_text_check(sg_smtp_cmd_t *cmd,
    const sg_u_char *p, const sg_u_char *end, int allow_space);
static const char *sg_smtp_domain_check(const sg_u_char *p, size_t len,
    int allow_utf8, unsigned *utf8);
static const char *sg_smtp_literal_check(const sg_u_char *p, size_t len);
static int sg_smtp_ipv4_valid(const sg_u_char *p, const sg_u_char *end);
static int sg_smtp_ipv6_valid(const sg_u_char *p, const sg_u_char *end);
static size_t sg_smtp_utf8_len(const sg_u_char *p, const sg_u_char *end);
static int sg_smtp_caseeq(const sg_u_char *p, const char *s, size_t n);


/* RFC 5321, 4.1.1 and 2.4: verbs are matched case-insensitively */
static const sg_smtp_verb_t  sg_smtp_verbs[] = {
    { "HELO", 4, SG_SMTP_CMD_HELO, SG_SMTP_ARG_REQUIRED },
    { "EHLO", 4, SG_SMTP_CMD_EHLO, SG_SMTP_ARG_REQUIRED },
    { "MAIL", 4, SG_SMTP_CMD_MAIL, SG_SMTP_ARG_REQUIRED },
    { "RCPT", 4, SG_SMTP_CMD_RCPT, SG_SMTP_ARG_REQUIRED },
    /* RFC 5321, 4.1.1.4: "DATA" CRLF */
    { "DATA", 4, SG_SMTP_CMD_DATA, SG_SMTP_ARG_NONE },
    /* RFC 3030, 2: "BDAT" SP chunk-size [ SP end-marker ] */
    { "BDAT", 4, SG_SMTP_CMD_BDAT, SG_SMTP_ARG_REQUIRED },
    /* RFC 5321, 4.1.1.5: "RSET" CRLF */
    { "RSET", 4, SG_SMTP_CMD_RSET, SG_SMTP_ARG_NONE },
    /* RFC 5321, 4.1.1.9: "NOOP" [ SP String ] */
    { "NOOP", 4, SG_SMTP_CMD_NOOP, SG_SMTP_ARG_OPTIONAL },
    /* RFC 5321, 4.1.1.10: "QUIT" CRLF */
    { "QUIT", 4, SG_SMTP_CMD_QUIT, SG_SMTP_ARG_NONE },
    /* RFC 5321, 4.1.1.6: "VRFY" SP String */
    { "VRFY", 4, SG_SMTP_CMD_VRFY, SG_SMTP_ARG_REQUIRED },
    /* RFC 5321, 4.1.1.7: "EXPN" SP String */
    { "EXPN", 4, SG_SMTP_CMD_EXPN, SG_SMTP_ARG_REQUIRED },
    /* RFC 5321, 4.1.1.8: "HELP" [ SP String ] */
    { "HELP", 4, SG_SMTP_CMD_HELP, SG_SMTP_ARG_OPTIONAL },
    /* RFC 3207, 4: "STARTTLS" CRLF */
    { "STARTTLS", 8, SG_SMTP_CMD_STARTTLS, SG_SMTP_ARG_NONE },
    /* RFC 4954, 4: "AUTH" SP sasl-mech [SP initial-response] */
    { "AUTH", 4, SG_SMTP_CMD_AUTH, SG_SMTP_ARG_REQUIRED }
};


#define sg_smtp_nverbs  (sizeof(sg_smtp_verbs) / sizeof(sg_smtp_verbs[0]))

#define sg_smtp_alpha(c)                                                     \
    (((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z'))
#define sg_smtp_digit(c)     ((c) >= '0' && (c) <= '9')
#define sg_smtp_alnum(c)     (sg_smtp_alpha(c) || sg_smtp_digit(c))
#define sg_smtp_lower(c)                                                     \
    (((c) >= 'A' && (c) <= 'Z') ? ((c) | 0x20) : (c))
#define sg_smtp_hex(c)                                                       \
    (sg_smtp_digit(c) || (sg_smtp_lower(c) >= 'a' && sg_smtp_lower(c) <= 'f'))

/* RFC 3461, 4: hexchar digits are upper case */
#define sg_smtp_xtext_hex(c)                                                 \
    (sg_smtp_digit(c) || ((c) >= 'A' && (c) <= 'F'))
#define sg_smtp_xtext_val(c)                                                 \
    ((unsigned) (sg_smtp_digit(c) ? (c) - '0' : (c) - 'A' + 10))

#define sg_smtp_set_str(s, b, e)                                             \
    (s).data = (const char *) (b); (s).len = (size_t) ((e) - (b))


sg_smtp_rc_e
sg_smtp_cmd_parse(const char *line, size_t len, size_t max_len,
    sg_smtp_cmd_t *cmd, const char **err_detail)
{
    size_t                 i, n;
    const char            *detail, *dummy;
    sg_smtp_rc_e           rc;
    const sg_u_char       *p, *end, *verb;
    const sg_smtp_verb_t  *v;

    if (err_detail == NULL) {
        err_detail = &dummy;
    }

    *err_detail = NULL;

    memset(cmd, 0, sizeof(sg_smtp_cmd_t));
    cmd->verb = SG_SMTP_CMD_UNKNOWN;

    if (max_len == 0) {
        max_len = SG_SMTP_MAX_LINE;
    }

    /* RFC 5321, 4.5.3.1.4: the limit counts the CRLF the caller removed */
    if (max_len < 2 || len > max_len - 2) {
        *err_detail = "line too long";
        return SG_SMTP_ERR_TOO_LONG;
    }

    p = (const sg_u_char *) line;
    end = p + len;

    /*
     * RFC 5321, 2.3.8 and 4.1.1: CR and LF appear only as the CRLF line
     * terminator, and the command grammar (4.1.2) has no control
     * characters; a NUL, bare CR or bare LF may be a smuggling attempt
     * (RFC-NOTES, STARTTLS and smuggling)
     */
    for (i = 0; i < len; i++) {
        switch (p[i]) {
        case '\0':
            *err_detail = "NUL in command line";
            return SG_SMTP_ERR_SYNTAX;
        case '\r':
            *err_detail = "bare CR in command line";
            return SG_SMTP_ERR_SYNTAX;
        case '\n':
            *err_detail = "bare LF in command line";
            return SG_SMTP_ERR_SYNTAX;
        default:
            if (p[i] < 0x20 || p[i] == 0x7f) {
                *err_detail = "control character in command line";
                return SG_SMTP_ERR_SYNTAX;
            }
        }
    }

    /* RFC 5321, 4.1.1: the verb is terminated by SP or the end of line */
    verb = p;

    while (p < end && *p != ' ') {
        if (*p >= 0x80) {
            *err_detail = "non-ASCII command";
            return SG_SMTP_ERR_UNKNOWN;
        }

        p++;
    }

    n = (size_t) (p - verb);
    v = NULL;

    for (i = 0; i < sg_smtp_nverbs; i++) {
        if (sg_smtp_verbs[i].len == n
            && sg_smtp_caseeq(verb, sg_smtp_verbs[i].name, n))
        {
            v = &sg_smtp_verbs[i];
            break;
        }
    }

    if (v == NULL) {
        *err_detail = (n == 0) ? "empty command" : "unrecognized command";
        return SG_SMTP_ERR_UNKNOWN;
    }

    cmd->verb = v->verb;

    if (p == end) {
        if (v->arg == SG_SMTP_ARG_REQUIRED) {
            *err_detail = "argument required";
            return SG_SMTP_ERR_SYNTAX;
        }

        return SG_SMTP_OK;
    }

    /* *p == ' ' */

    if (v->arg == SG_SMTP_ARG_NONE) {
        /* RFC 5321, 4.1.1.4, 4.1.1.5, 4.1.1.10; RFC 3207, 4 */
        *err_detail = "command takes no argument";
        return SG_SMTP_ERR_SYNTAX;
    }

    p++;

    /* RFC 5321, 4.1.2: String = Atom / Quoted-string, never empty */
    if (p == end) {
        *err_detail = "empty argument";
        return SG_SMTP_ERR_SYNTAX;
    }

    sg_smtp_set_str(cmd->arg, p, end);

    detail = NULL;

    switch (cmd->verb) {

    case SG_SMTP_CMD_HELO:
    case SG_SMTP_CMD_EHLO:
        rc = sg_smtp_parse_helo(cmd, p, end, &detail);
        break;

    case SG_SMTP_CMD_MAIL:
    case SG_SMTP_CMD_RCPT:
        rc = sg_smtp_parse_mail_rcpt(cmd, p, end, &detail);
        break;

    case SG_SMTP_CMD_BDAT:
        rc = sg_smtp_parse_bdat(cmd, p, end, &detail);
        break;

    case SG_SMTP_CMD_AUTH:
        rc = sg_smtp_parse_auth(cmd, p, end, &detail);
        break;

    default:
        /*
         * RFC 5321, 4.1.1.6-4.1.1.9: VRFY, EXPN, HELP, NOOP take a String;
         * be liberal and take any text, a spoken name included
         */
        detail = sg_smtp_text_check(cmd, p, end, 1);
        rc = (detail == NULL) ? SG_SMTP_OK : SG_SMTP_ERR_SYNTAX;
        break;
    }

    *err_detail = detail;

    return rc;
}


static sg_smtp_rc_e
sg_smtp_parse_helo(sg_smtp_cmd_t *cmd, const sg_u_char *p,
    const sg_u_char *end, const char **detail)
{
    /*
     * RFC 5321, 4.1.1.1: "EHLO" SP ( Domain / address-literal ); be liberal
     * (clients send bare host names, underscores, unbracketed IPs): any
     * non-empty token without spaces or control characters
     */

    *detail = sg_smtp_text_check(cmd, p, end, 0);

    return (*detail == NULL) ? SG_SMTP_OK : SG_SMTP_ERR_SYNTAX;
}


static sg_smtp_rc_e
sg_smtp_parse_mail_rcpt(sg_smtp_cmd_t *cmd, const sg_u_char *p,
    const sg_u_char *end, const char **detail)
{
    sg_smtp_rc_e  rc;

    /*
     * RFC 5321, 4.1.1.2: "MAIL FROM:" Reverse-path [SP Mail-parameters];
     * 4.1.1.3: "RCPT TO:" Forward-path [SP Rcpt-parameters];
     * the keywords are case-insensitive (2.4)
     */

    if (cmd->verb == SG_SMTP_CMD_MAIL) {
        if (end - p < 5 || !sg_smtp_caseeq(p, "FROM:", 5)) {
            *detail = "expected FROM:";
            return SG_SMTP_ERR_SYNTAX;
        }

        p += 5;

    } else {
        if (end - p < 3 || !sg_smtp_caseeq(p, "TO:", 3)) {
            *detail = "expected TO:";
            return SG_SMTP_ERR_SYNTAX;
        }

        p += 3;
    }

    /*
     * RFC 5321, 4.1.2 has no space after the colon; the one liberty this
     * parser takes: a single SP there is accepted, as many clients send
     * "MAIL FROM: <a@b>" (Postfix and Exim accept it too)
     */
    if (p < end && *p == ' ') {
        p++;
    }

    if (p == end || *p != '<') {
        *detail = "missing '<'";
        return SG_SMTP_ERR_SYNTAX;
    }

    rc = sg_smtp_parse_path(cmd, &p, end, detail);
    if (rc != SG_SMTP_OK) {
        return rc;
    }

    if (p == end) {
        return SG_SMTP_OK;
    }

    /* RFC 5321, 4.1.2: Mail-parameters follow after a single SP */
    if (*p != ' ') {
        *detail = "unexpected text after address";
        return SG_SMTP_ERR_SYNTAX;
    }

    return sg_smtp_parse_params(cmd, p + 1, end, detail);
}


static sg_smtp_rc_e
sg_smtp_parse_path(sg_smtp_cmd_t *cmd, const sg_u_char **pp,
    const sg_u_char *end, const char **detail)
{
    unsigned          utf8;
    const sg_u_char  *p, *open, *start, *d;

    p = *pp;
    open = p++;
    utf8 = 0;

    if (p < end && *p == '>') {
        /*
         * RFC 5321, 4.1.1.2 and 4.5.5: "<>" is the null reverse-path;
         * 4.1.1.3: a Forward-path is never empty
         */
        if (cmd->verb == SG_SMTP_CMD_RCPT) {
            *detail = "empty forward-path";
            return SG_SMTP_ERR_PATH;
        }

        cmd->null_path = 1;
        cmd->path.data = (const char *) p;
        cmd->path.len = 0;
        *pp = p + 1;
        return SG_SMTP_OK;
    }

    if (p < end && *p == '@') {

        /*
         * RFC 5321, 4.1.2: Path = "<" [ A-d-l ":" ] Mailbox ">",
         * A-d-l = At-domain *( "," At-domain ), At-domain = "@" Domain;
         * 4.1.1.3 and appendix C: source routes are accepted and ignored,
         * flagged so that relay control can refuse them
         */

        for ( ;; ) {
            d = ++p;

            while (p < end && (sg_smtp_alnum(*p) || *p == '-' || *p == '.'
                               || *p >= 0x80))
            {
                p++;
            }

            *detail = sg_smtp_domain_check(d, (size_t) (p - d), 1, &utf8);
            if (*detail != NULL) {
                return SG_SMTP_ERR_PATH;
            }

            if (p < end && *p == ',' && p + 1 < end && p[1] == '@') {
                p++;
                continue;
            }

            if (p < end && *p == ':') {
                p++;
                break;
            }

            *detail = (p < end && *p == '>') ? "missing local part"
                                             : "invalid source route";
            return SG_SMTP_ERR_PATH;
        }

        cmd->has_source_route = 1;
    }

    /*
     * RFC 5321, 4.1.2: Mailbox = Local-part "@" ( Domain / address-literal )
     */

    start = p;

    if (p < end && *p == '"') {

        /*
         * RFC 5321, 4.1.2: Quoted-string = DQUOTE *QcontentSMTP DQUOTE,
         * qtextSMTP = %d32-33 / %d35-91 / %d93-126,
         * quoted-pairSMTP = %d92 %d32-126;
         * RFC 6531, 3.3: qtextSMTP =/ UTF8-non-ascii
         */

        cmd->quoted_local = 1;
        p++;

        for ( ;; ) {
            if (p == end) {
                *detail = "unterminated quoted local part";
                return SG_SMTP_ERR_PATH;
            }

            if (*p == '"') {
                p++;
                break;
            }

            if (*p == '\\') {
                if (p + 1 == end || p[1] < 32 || p[1] > 126) {
                    *detail = "invalid quoted-pair in local part";
                    return SG_SMTP_ERR_PATH;
                }

                p += 2;
                continue;
            }

            if (*p >= 0x80) {
                /* RFC 6531, 3.3; RFC 3629, 4 */
                d = p;
                p += sg_smtp_utf8_len(p, end);
                if (p == d) {
                    *detail = "invalid UTF-8 in local part";
                    return SG_SMTP_ERR_PATH;
                }

                utf8 = 1;
                continue;
            }

            /* control characters were refused with the line */
            p++;
        }

    } else {

        /*
         * RFC 5321, 4.1.2: Dot-string = Atom *("." Atom), Atom = 1*atext;
         * RFC 5322, 3.2.3: atext = ALPHA / DIGIT / "!#$%&'*+-/=?^_`{|}~";
         * RFC 6531, 3.3: atext =/ UTF8-non-ascii.  "%" and "!" are plain
         * atext: "user%other@local" and "a!b@local" have the local parts
         * "user%other" and "a!b", to be judged by relay control
         */

        for ( ;; ) {
            d = p;

            while (p < end) {
                if (sg_smtp_alnum(*p)) {
                    p++;
                    continue;
                }

                if (*p >= 0x80) {
                    if (sg_smtp_utf8_len(p, end) == 0) {
                        *detail = "invalid UTF-8 in local part";
                        return SG_SMTP_ERR_PATH;
                    }

                    p += sg_smtp_utf8_len(p, end);
                    utf8 = 1;
                    continue;
                }

                switch (*p) {
                case '!': case '#': case '$': case '%': case '&': case '\'':
                case '*': case '+': case '-': case '/': case '=': case '?':
                case '^': case '_': case '`': case '{': case '|': case '}':
                case '~':
                    p++;
                    continue;
                }

                break;
            }

            if (p == d) {
                *detail = (p == start && (p == end || *p != '.'))
                          ? "empty local part" : "empty atom in local part";
                return SG_SMTP_ERR_PATH;
            }

            if (p < end && *p == '.') {
                p++;
                continue;
            }

            break;
        }
    }

    /* RFC 5321, 4.5.3.1.1 */
    if (p - start > SG_SMTP_MAX_LOCAL_PART) {
        *detail = "local part too long";
        return SG_SMTP_ERR_PATH;
    }

    sg_smtp_set_str(cmd->local_part, start, p);

    if (p == end) {
        *detail = "missing '>'";
        return SG_SMTP_ERR_SYNTAX;
    }

    if (*p == '@') {
        d = ++p;

        if (p < end && *p == '[') {

            /* RFC 5321, 4.1.3: address-literal = "[" ( ... ) "]" */

            while (p < end && *p != ']') {
                p++;
            }

            if (p == end) {
                *detail = "unterminated address literal";
                return SG_SMTP_ERR_PATH;
            }

            p++;

            if ((size_t) (p - d) > SG_SMTP_MAX_DOMAIN) {
                *detail = "domain too long";
                return SG_SMTP_ERR_PATH;
            }

            *detail = sg_smtp_literal_check(d, (size_t) (p - d));
            cmd->address_literal = 1;

        } else {
            while (p < end && (sg_smtp_alnum(*p) || *p == '-' || *p == '.'
                               || *p >= 0x80))
            {
                p++;
            }

            /* RFC 5321, 4.1.2 and 4.5.3.1.2; RFC 6531, 3.3 */
            *detail = sg_smtp_domain_check(d, (size_t) (p - d), 1, &utf8);
        }

        if (*detail != NULL) {
            return SG_SMTP_ERR_PATH;
        }

        sg_smtp_set_str(cmd->domain, d, p);

    } else if (*p == '>') {

        /*
         * RFC 5321, 4.1.1.3 and 4.5.1: "RCPT TO:<Postmaster>", without a
         * domain, case-insensitive; not quoted, not source-routed
         */

        if (cmd->verb != SG_SMTP_CMD_RCPT
            || cmd->quoted_local
            || cmd->has_source_route
            || p - start != 10
            || !sg_smtp_caseeq(start, "Postmaster", 10))
        {
            *detail = "address without domain";
            return SG_SMTP_ERR_PATH;
        }

        cmd->postmaster = 1;

    } else {
        *detail = "invalid character in local part";
        return SG_SMTP_ERR_PATH;
    }

    if (p == end) {
        *detail = "missing '>'";
        return SG_SMTP_ERR_SYNTAX;
    }

    if (*p != '>') {
        *detail = "invalid character in domain";
        return SG_SMTP_ERR_PATH;
    }

    p++;

    /* RFC 5321, 4.5.3.1.3: the path with its punctuation */
    if (p - open > SG_SMTP_MAX_PATH) {
        *detail = "path too long";
        return SG_SMTP_ERR_PATH;
    }

    sg_smtp_set_str(cmd->path, start, p - 1);

    if (utf8) {
        cmd->utf8 = 1;
    }

    *pp = p;

    return SG_SMTP_OK;
}


static sg_smtp_rc_e
sg_smtp_parse_params(sg_smtp_cmd_t *cmd, const sg_u_char *p,
    const sg_u_char *end, const char **detail)
{
    size_t            i, n;
    const sg_u_char  *name, *value;
    sg_smtp_param_t  *prm;

    /*
     * RFC 5321, 4.1.2: Mail-parameters = esmtp-param *(SP esmtp-param),
     * esmtp-param = esmtp-keyword ["=" esmtp-value],
     * esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"),
     * esmtp-value = 1*(%d33-60 / %d62-126);
     * RFC 6531, 3.3: esmtp-value =/ UTF8-non-ascii
     */

    for ( ;; ) {
        name = p;

        if (p == end || !sg_smtp_alnum(*p)) {
            *detail = (p == end || *p == ' ') ? "empty parameter"
                                              : "invalid parameter keyword";
            return SG_SMTP_ERR_PARAMS;
        }

        while (p < end && (sg_smtp_alnum(*p) || *p == '-')) {
            p++;
        }

        n = (size_t) (p - name);
        value = NULL;

        if (p < end && *p == '=') {
            value = ++p;

            while (p < end && *p != ' ') {
                if (*p >= 0x80) {
                    if (sg_smtp_utf8_len(p, end) == 0) {
                        *detail = "invalid UTF-8 in parameter value";
                        return SG_SMTP_ERR_PARAMS;
                    }

                    p += sg_smtp_utf8_len(p, end);
                    cmd->utf8 = 1;
                    continue;
                }

                if (*p == '=') {
                    *detail = "invalid character in parameter value";
                    return SG_SMTP_ERR_PARAMS;
                }

                p++;
            }

            if (p == value) {
                *detail = "empty parameter value";
                return SG_SMTP_ERR_PARAMS;
            }
        }

        if (p < end && *p != ' ') {
            *detail = "invalid parameter keyword";
            return SG_SMTP_ERR_PARAMS;
        }

        /* RFC 5321, 4.1.1.11 and 2.4: keywords are case-insensitive */
        for (i = 0; i < cmd->nparams; i++) {
            if (cmd->params[i].name.len == n
                && sg_smtp_caseeq(name, cmd->params[i].name.data, n))
            {
                *detail = "duplicate parameter";
                return SG_SMTP_ERR_PARAMS;
            }
        }

        if (cmd->nparams == SG_SMTP_MAX_PARAMS) {
            *detail = "too many parameters";
            return SG_SMTP_ERR_PARAMS;
        }

        prm = &cmd->params[cmd->nparams++];

        prm->name.data = (const char *) name;
        prm->name.len = n;

        if (value != NULL) {
            sg_smtp_set_str(prm->value, value, p);
        }

        if (p == end) {
            return SG_SMTP_OK;
        }

        p++;
    }
}


static sg_smtp_rc_e
sg_smtp_parse_bdat(sg_smtp_cmd_t *cmd, const sg_u_char *p,
    const sg_u_char *end, const char **detail)
{
    unsigned  d;
    uint64_t  size;

    /* RFC 3030, 2: chunk-size = 1*DIGIT, end-marker = "LAST" */

    if (!sg_smtp_digit(*p)) {
        *detail = "invalid chunk size";
        return SG_SMTP_ERR_SYNTAX;
    }

    size = 0;

    while (p < end && sg_smtp_digit(*p)) {
        d = (unsigned) (*p - '0');

        if (size > (UINT64_MAX - d) / 10) {
            *detail = "chunk size too large";
            return SG_SMTP_ERR_SYNTAX;
        }

        size = size * 10 + d;
        p++;
    }

    cmd->bdat_size = size;

    if (p == end) {
        return SG_SMTP_OK;
    }

    if (end - p == 5 && sg_smtp_caseeq(p, " LAST", 5)) {
        cmd->bdat_last = 1;
        return SG_SMTP_OK;
    }

    *detail = "invalid BDAT argument";

    return SG_SMTP_ERR_SYNTAX;
}


static sg_smtp_rc_e
sg_smtp_parse_auth(sg_smtp_cmd_t *cmd, const sg_u_char *p,
    const sg_u_char *end, const char **detail)
{
    const sg_u_char  *s;

    /*
     * RFC 4954, 4: sasl-mech = 1*20mech-char,
     * mech-char = UPPER-ALPHA / DIGIT / HYPHEN / UNDERSCORE;
     * lower case is accepted, mechanism names being case-insensitive
     * in practice (RFC 4422, 3.1 registers them in upper case)
     */

    s = p;

    while (p < end && (sg_smtp_alnum(*p) || *p == '-' || *p == '_')) {
        p++;
    }

    if (p == s || p - s > SG_SMTP_MAX_SASL_MECH || (p < end && *p != ' ')) {
        *detail = "invalid SASL mechanism";
        return SG_SMTP_ERR_SYNTAX;
    }

    sg_smtp_set_str(cmd->auth_mech, s, p);

    if (p == end) {
        return SG_SMTP_OK;
    }

    /* RFC 4954, 4: initial-response = base64 / "=" */

    s = ++p;

    while (p < end && (sg_smtp_alnum(*p) || *p == '+' || *p == '/'
                       || *p == '='))
    {
        p++;
    }

    if (p == s || p != end) {
        *detail = "invalid initial response";
        return SG_SMTP_ERR_SYNTAX;
    }

    sg_smtp_set_str(cmd->auth_initial, s, p);

    return SG_SMTP_OK;
}


static const char *
sg_smtp_text_check(sg_smtp_cmd_t *cmd, const sg_u_char *p,
    const sg_u_char *end, int allow_space)
{
    size_t  n;

    /* control characters were refused with the line */

    while (p < end) {
        if (*p == ' ' && !allow_space) {
            return "unexpected space in argument";
        }

        if (*p < 0x80) {
            p++;
            continue;
        }

        /* RFC 6531, 3.3; RFC 3629, 4 */
        n = sg_smtp_utf8_len(p, end);
        if (n == 0) {
            return "invalid UTF-8 in argument";
        }

        cmd->utf8 = 1;
        p += n;
    }

    return NULL;
}


static const char *
sg_smtp_domain_check(const sg_u_char *p, size_t len, int allow_utf8,
    unsigned *utf8)
{
    size_t            n;
    unsigned          u;
    const sg_u_char  *end, *label;

    /*
     * RFC 5321, 4.1.2: Domain = sub-domain *("." sub-domain),
     * sub-domain = Let-dig [Ldh-str], Ldh-str = *( ALPHA / DIGIT / "-" )
     * Let-dig; RFC 6531, 3.3: sub-domain =/ U-label
     */

    if (len == 0) {
        return "empty domain";
    }

    /* RFC 5321, 4.5.3.1.2 */
    if (len > SG_SMTP_MAX_DOMAIN) {
        return "domain too long";
    }

    end = p + len;

    for ( ;; ) {
        label = p;
        u = 0;

        while (p < end && *p != '.') {
            if (*p >= 0x80) {
                if (!allow_utf8) {
                    return "non-ASCII domain";
                }

                /* RFC 3629, 4 */
                n = sg_smtp_utf8_len(p, end);
                if (n == 0) {
                    return "invalid UTF-8 in domain";
                }

                p += n;
                u = 1;
                continue;
            }

            if (!sg_smtp_alnum(*p) && *p != '-') {
                return "invalid character in domain";
            }

            p++;
        }

        if (p == label) {
            /* RFC 5321, 4.1.2: no empty label, hence no trailing dot */
            return (p == end) ? "domain ends with a dot"
                              : "empty domain label";
        }

        if (*label == '-' || p[-1] == '-') {
            return "domain label starts or ends with a hyphen";
        }

        /*
         * RFC 1035, 2.3.4: 63 octets; a U-label's limit applies to its
         * A-label (RFC 5890, 2.3.2.1), which is left to IDNA conversion
         */
        if (!u && p - label > SG_SMTP_MAX_LABEL) {
            return "domain label too long";
        }

        if (u) {
            *utf8 = 1;
        }

        if (p == end) {
            return NULL;
        }

        p++;
    }
}


static const char *
sg_smtp_literal_check(const sg_u_char *p, size_t len)
{
    const sg_u_char  *end;

    /* p[0] == '[', p[len - 1] == ']' */

    end = p + len - 1;
    p++;

    /* RFC 5321, 4.1.3: IPv6-address-literal = "IPv6:" IPv6-addr */
    if (end - p > 5 && sg_smtp_caseeq(p, "IPv6:", 5)) {
        return sg_smtp_ipv6_valid(p + 5, end)
               ? NULL : "invalid IPv6 address literal";
    }

    /* RFC 5321, 4.1.3: IPv4-address-literal = Snum 3("."  Snum) */
    if (p < end && sg_smtp_digit(*p)) {
        return sg_smtp_ipv4_valid(p, end)
               ? NULL : "invalid IPv4 address literal";
    }

    /*
     * RFC 5321, 4.1.3: General-address-literal needs a Standardized-tag
     * registered with IANA; none but IPv6 is
     */
    return "invalid address literal";
}


static int
sg_smtp_ipv4_valid(const sg_u_char *p, const sg_u_char *end)
{
    unsigned          i, v;
    const sg_u_char  *s;

    /*
     * RFC 5321, 4.1.3: Snum = 1*3DIGIT representing 0-255; stricter than
     * the grammar, a leading zero is refused: "010" would be octal to
     * inet_aton() and is refused by inet_pton(), and relay control must
     * see the same address as the resolver
     */

    for (i = 0; i < 4; i++) {
        s = p;
        v = 0;

        while (p < end && sg_smtp_digit(*p) && p - s < 3) {
            v = v * 10 + (unsigned) (*p - '0');
            p++;
        }

        if (p == s || v > 255 || (*s == '0' && p - s > 1)) {
            return 0;
        }

        if (i < 3) {
            if (p == end || *p != '.') {
                return 0;
            }

            p++;
        }
    }

    return p == end;
}


static int
sg_smtp_ipv6_valid(const sg_u_char *p, const sg_u_char *end)
{
    unsigned          groups, compressed;
    const sg_u_char  *s;

    /*
     * RFC 5321, 4.1.3: IPv6-full = IPv6-hex 7(":" IPv6-hex);
     * IPv6-comp: "::" with at most 6 groups besides it;
     * IPv6v4-full = IPv6-hex 5(":" IPv6-hex) ":" IPv4-address-literal;
     * IPv6v4-comp: "::" with at most 4 groups besides it and the IPv4 part
     */

    groups = 0;
    compressed = 0;

    if (end - p >= 2 && p[0] == ':' && p[1] == ':') {
        compressed = 1;
        p += 2;

        if (p == end) {
            return 1;
        }
    }

    for ( ;; ) {
        s = p;

        while (p < end && sg_smtp_hex(*p) && p - s < 5) {
            p++;
        }

        if (p < end && *p == '.') {
            /* the IPv4 part counts as two groups, and ends the address */
            if (!sg_smtp_ipv4_valid(s, end)) {
                return 0;
            }

            groups += 2;
            break;
        }

        if (p == s || p - s > 4) {
            return 0;
        }

        groups++;

        if (p == end) {
            break;
        }

        if (*p++ != ':') {
            return 0;
        }

        if (p < end && *p == ':') {
            if (compressed) {
                return 0;
            }

            compressed = 1;
            p++;

            if (p == end) {
                break;
            }

        } else if (p == end) {
            return 0;
        }
    }

    return compressed ? groups <= 6 : groups == 8;
}


static size_t
sg_smtp_utf8_len(const sg_u_char *p, const sg_u_char *end)
{
    size_t     i, n;
    sg_u_char  lo, hi;

    /*
     * RFC 3629, 4: the length of the well-formed UTF-8 sequence at p,
     * 0 if there is none (no overlong forms, surrogates or values
     * above U+10FFFF)
     */

    lo = 0x80;
    hi = 0xbf;

    if (*p >= 0xc2 && *p <= 0xdf) {
        n = 2;

    } else if (*p == 0xe0) {
        n = 3;
        lo = 0xa0;

    } else if (*p == 0xed) {
        n = 3;
        hi = 0x9f;

    } else if (*p >= 0xe1 && *p <= 0xef) {
        n = 3;

    } else if (*p == 0xf0) {
        n = 4;
        lo = 0x90;

    } else if (*p == 0xf4) {
        n = 4;
        hi = 0x8f;

    } else if (*p >= 0xf1 && *p <= 0xf3) {
        n = 4;

    } else {
        return 0;
    }

    if ((size_t) (end - p) < n || p[1] < lo || p[1] > hi) {
        return 0;
    }

    for (i = 2; i < n; i++) {
        if (p[i] < 0x80 || p[i] > 0xbf) {
            return 0;
        }
    }

    return n;
}


static int
sg_smtp_caseeq(const sg_u_char *p, const char *s, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++) {
        if (sg_smtp_lower(p[i]) != sg_smtp_lower((sg_u_char) s[i])) {
            return 0;
        }
    }

    return 1;
}


int
sg_smtp_param_find(const sg_smtp_cmd_t *cmd, const char *name,
    sg_str_t *value)
{
    size_t  i, n;

    n = strlen(name);

    for (i = 0; i < cmd->nparams; i++) {
        if (cmd->params[i].name.len == n
            && sg_smtp_caseeq((const sg_u_char *) cmd->params[i].name.data,
                              name, n))
        {
            if (value != NULL) {
                *value = cmd->params[i].value;
            }

            return 1;
        }
    }

    return 0;
}


sg_smtp_rc_e
sg_smtp_xtext_decode(const sg_str_t *in, char *out, size_t outlen,
    size_t *n)
{
    size_t            k;
    unsigned          c;
    const sg_u_char  *p, *end;

    /*
     * RFC 3461, 4: xtext = *( xchar / hexchar ),
     * xchar = %d33-126 except "+" and "=",
     * hexchar = "+" 2(%x30-39 / %x41-46), upper case only
     */

    *n = 0;
    k = 0;
    p = (const sg_u_char *) in->data;
    end = p + in->len;

    while (p < end) {
        c = *p;

        if (c == '+') {
            if (end - p < 3
                || !sg_smtp_xtext_hex(p[1])
                || !sg_smtp_xtext_hex(p[2]))
            {
                return SG_SMTP_ERR_SYNTAX;
            }

            c = sg_smtp_xtext_val(p[1]) * 16 + sg_smtp_xtext_val(p[2]);
            p += 3;

            /*
             * RFC 3461, 4: hexchar encodes an ASCII character; ORCPT and
             * ENVID are printable text, so controls (NUL, CR, LF above
             * all) are refused rather than passed on
             */
            if (c < 0x20 || c > 0x7e) {
                return SG_SMTP_ERR_SYNTAX;
            }

        } else if (c < 33 || c > 126 || c == '=') {
            return SG_SMTP_ERR_SYNTAX;

        } else {
            p++;
        }

        if (k == outlen) {
            return SG_SMTP_ERR_TOO_LONG;
        }

        out[k++] = (char) c;
    }

    *n = k;

    return SG_SMTP_OK;
}


int
sg_smtp_domain_valid(const char *d, size_t len, int allow_utf8)
{
    unsigned  utf8;

    utf8 = 0;

    return sg_smtp_domain_check((const sg_u_char *) d, len, allow_utf8, &utf8)
           == NULL;
}
