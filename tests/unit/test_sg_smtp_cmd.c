
/*
 * Unit tests for common/sg_smtp_cmd.c.  Every case names the RFC section
 * it checks (RFC 5321 unless another RFC is named).
 *
 * In a case's line, "{N:c}" stands for N copies of the character c, so
 * that length limits can be tested at and just beyond the limit.
 */


#include <stdlib.h>
#include <string.h>

#include "sg_test.h"
#include "sg_smtp_cmd.h"


/* expected flags */
#define F_NULL     0x01
#define F_PM       0x02
#define F_UTF8     0x04
#define F_SR       0x08
#define F_QUOTED   0x10
#define F_LIT      0x20
#define F_LAST     0x40


typedef struct {
    const char         *name;
    const char         *line;
    size_t              len;
    size_t              max_len;   /* 0: SG_SMTP_MAX_LINE */
    sg_smtp_rc_e        rc;
    sg_smtp_verb_e      verb;

    /* checked only when rc is SG_SMTP_OK */
    const char         *arg;       /* NULL: not checked */
    const char         *path;      /* NULL: empty */
    const char         *local;     /* NULL: empty */
    const char         *domain;    /* NULL: empty */
    unsigned            flags;
    const char         *params;    /* "K=V K2"; NULL: none */
    uint64_t            bdat_size;
    const char         *auth_mech;
    const char         *auth_initial;

    /* checked only when set and rc is not SG_SMTP_OK */
    const char         *detail;
} sg_test_case_t;


#define L(s)  .line = (s), .len = sizeof(s) - 1

#define OK    .rc = SG_SMTP_OK
#define SYN   .rc = SG_SMTP_ERR_SYNTAX
#define UNK   .rc = SG_SMTP_ERR_UNKNOWN
#define LONG  .rc = SG_SMTP_ERR_TOO_LONG
#define PATH  .rc = SG_SMTP_ERR_PATH
#define PRM   .rc = SG_SMTP_ERR_PARAMS

#define HELO  .verb = SG_SMTP_CMD_HELO
#define EHLO  .verb = SG_SMTP_CMD_EHLO
#define MAIL  .verb = SG_SMTP_CMD_MAIL
#define RCPT  .verb = SG_SMTP_CMD_RCPT
#define DATA  .verb = SG_SMTP_CMD_DATA
#define BDAT  .verb = SG_SMTP_CMD_BDAT
#define RSET  .verb = SG_SMTP_CMD_RSET
#define NOOP  .verb = SG_SMTP_CMD_NOOP
#define QUIT  .verb = SG_SMTP_CMD_QUIT
#define VRFY  .verb = SG_SMTP_CMD_VRFY
#define EXPN  .verb = SG_SMTP_CMD_EXPN
#define HELP  .verb = SG_SMTP_CMD_HELP
#define STLS  .verb = SG_SMTP_CMD_STARTTLS
#define AUTH  .verb = SG_SMTP_CMD_AUTH
#define NONE  .verb = SG_SMTP_CMD_UNKNOWN


static const sg_test_case_t  cases[] = {

    /* verbs, 2.4 and 4.1.1 */

    { "4.1.1.1 HELO domain", L("HELO mail.example.com"), OK, HELO,
      .arg = "mail.example.com" },
    { "2.4 verbs are case-insensitive: ehlo", L("ehlo mail.example.com"),
      OK, EHLO, .arg = "mail.example.com" },
    { "2.4 mixed case EhLo with address literal", L("EhLo [192.0.2.1]"),
      OK, EHLO, .arg = "[192.0.2.1]" },
    { "4.1.1.1 EHLO liberal: underscore host", L("EHLO host_1.example"),
      OK, EHLO, .arg = "host_1.example" },
    { "4.1.1.1 EHLO without argument", L("EHLO"), SYN, EHLO },
    { "4.1.1.1 EHLO with empty argument", L("EHLO "), SYN, EHLO },
    { "4.1.1.1 HELO with two tokens", L("HELO a.example b"), SYN, HELO },
    { "4.1.2 EHLO with a control character", L("EHLO a\tb"), SYN, NONE },
    { "4.1.1 unknown verb", L("XYZZY"), UNK, NONE },
    { "4.1.1 empty line", L(""), UNK, NONE },
    { "4.1.1 leading space", L(" NOOP"), UNK, NONE },
    { "4.1.1 non-ASCII verb", L("M\xc3\xa4IL FROM:<a@b.example>"),
      UNK, NONE },
    { "4.1.1.2 MAIL FROM without SP after verb", L("MAILFROM:<a@b.example>"),
      UNK, NONE },
    { "4.1.1.4 DATA", L("DATA"), OK, DATA },
    { "2.4 data in lower case", L("data"), OK, DATA },
    { "4.1.1.4 DATA with argument", L("DATA x"), SYN, DATA },
    { "4.1.1.4 DATA with trailing space", L("DATA "), SYN, DATA },
    { "4.1.1.5 RSET", L("RSET"), OK, RSET },
    { "4.1.1.5 RSET with argument", L("RSET all"), SYN, RSET },
    { "4.1.1.10 QUIT", L("Quit"), OK, QUIT },
    { "4.1.1.10 QUIT with argument", L("QUIT now"), SYN, QUIT },
    { "RFC 3207, 4 STARTTLS", L("STARTTLS"), OK, STLS },
    { "RFC 3207, 4 STARTTLS with argument", L("STARTTLS x"), SYN, STLS },
    { "4.1.1.9 NOOP", L("NOOP"), OK, NOOP },
    { "4.1.1.9 NOOP with string", L("NOOP hello there"), OK, NOOP,
      .arg = "hello there" },
    { "4.1.1.9 NOOP with empty string", L("NOOP "), SYN, NOOP },
    { "4.1.1.8 HELP", L("HELP"), OK, HELP },
    { "4.1.1.8 HELP topic", L("help MAIL"), OK, HELP, .arg = "MAIL" },
    { "4.1.1.6 VRFY needs a string", L("VRFY"), SYN, VRFY },
    { "4.1.1.6 VRFY user", L("VRFY postmaster"), OK, VRFY,
      .arg = "postmaster" },
    { "4.1.1.6 VRFY name with space (liberal)", L("VRFY John Smith"), OK,
      VRFY, .arg = "John Smith" },
    { "RFC 6531, 3.3 VRFY UTF-8 sets utf8", L("VRFY j\xc3\xb6rg"), OK, VRFY,
      .flags = F_UTF8 },
    { "RFC 3629, 4 VRFY invalid UTF-8", L("VRFY j\xc3rg"), SYN, VRFY },
    { "4.1.1.7 EXPN needs a string", L("EXPN"), SYN, EXPN },
    { "4.1.1.7 EXPN list", L("EXPN staff"), OK, EXPN, .arg = "staff" },

    /* RFC 3030, 2: BDAT */

    { "RFC 3030, 2 BDAT size", L("BDAT 1000"), OK, BDAT, .bdat_size = 1000 },
    { "RFC 3030, 2 BDAT 0 LAST", L("BDAT 0 LAST"), OK, BDAT,
      .flags = F_LAST },
    { "RFC 3030, 2 BDAT last in lower case", L("bdat 42 last"), OK, BDAT,
      .bdat_size = 42, .flags = F_LAST },
    { "RFC 3030, 2 BDAT without size", L("BDAT"), SYN, BDAT },
    { "RFC 3030, 2 BDAT bad size", L("BDAT -1"), SYN, BDAT },
    { "RFC 3030, 2 BDAT bad end-marker", L("BDAT 10 MORE"), SYN, BDAT },
    { "RFC 3030, 2 BDAT end-marker with two spaces", L("BDAT 10  LAST"), SYN,
      BDAT },
    { "RFC 3030, 2 BDAT size overflow", L("BDAT 18446744073709551616"), SYN,
      BDAT },
    { "RFC 3030, 2 BDAT largest size", L("BDAT 18446744073709551615"), OK,
      BDAT, .bdat_size = UINT64_MAX },

    /* RFC 4954, 4: AUTH */

    { "RFC 4954, 4 AUTH mechanism", L("AUTH LOGIN"), OK, AUTH,
      .auth_mech = "LOGIN" },
    { "RFC 4954, 4 AUTH initial response",
      L("AUTH PLAIN AHVzZXIAcGFzcw=="), OK, AUTH, .auth_mech = "PLAIN",
      .auth_initial = "AHVzZXIAcGFzcw==" },
    { "RFC 4954, 4 AUTH empty initial response", L("AUTH PLAIN ="), OK,
      AUTH, .auth_mech = "PLAIN", .auth_initial = "=" },
    { "RFC 4954, 4 AUTH without mechanism", L("AUTH"), SYN, AUTH },
    { "RFC 4954, 4 AUTH mechanism over 20 chars",
      L("AUTH ABCDEFGHIJKLMNOPQRSTU"), SYN, AUTH },
    { "RFC 4954, 4 AUTH extra token", L("AUTH PLAIN abc def"), SYN, AUTH },
    { "RFC 4954, 4 AUTH bad base64", L("AUTH PLAIN ab*c"), SYN, AUTH },

    /* RFC-NOTES smuggling; 2.3.8: CR and LF only as CRLF */

    { "2.3.8 NUL in line", L("NOOP a\0b"), SYN, NONE,
      .detail = "NUL in command line" },
    { "2.3.8 NUL in verb", L("MA\0IL FROM:<a@b.example>"), SYN, NONE },
    { "2.3.8 bare CR", L("MAIL FROM:<a@b.example>\rRCPT TO:<c@d.example>"),
      SYN, NONE, .detail = "bare CR in command line" },
    { "2.3.8 bare LF", L("QUIT\nDATA"), SYN, NONE,
      .detail = "bare LF in command line" },
    { "2.3.8 trailing bare LF", L("RCPT TO:<a@b.example>\n"), SYN, NONE },

    /* 4.5.3.1.4: 512 octets with CRLF */

    { "4.5.3.1.4 510 octets + CRLF", L("NOOP {505:x}"), OK, NOOP },
    { "4.5.3.1.4 511 octets + CRLF", L("NOOP {506:x}"), LONG, NONE },
    { "4.5.3.1.4 caller raised the limit", L("NOOP {506:x}"),
      .max_len = 1024, OK, NOOP },
    { "4.5.3.1.4 long unknown command", L("{600:X}"), LONG, NONE },

    /* 4.1.1.2, 4.1.2: MAIL */

    { "4.1.1.2 MAIL FROM", L("MAIL FROM:<user@example.com>"), OK, MAIL,
      .arg = "FROM:<user@example.com>", .path = "user@example.com",
      .local = "user", .domain = "example.com" },
    { "2.4 mixed case keyword, address kept",
      L("mail from:<User@Example.COM>"), OK, MAIL,
      .path = "User@Example.COM", .local = "User", .domain = "Example.COM" },
    { "4.1.1.2 null reverse-path", L("MAIL FROM:<>"), OK, MAIL,
      .flags = F_NULL },
    { "4.1.1.2 null reverse-path with params",
      L("MAIL FROM:<> BODY=8BITMIME"), OK, MAIL, .flags = F_NULL,
      .params = "BODY=8BITMIME" },
    { "4.1.2 liberal: one SP after colon",
      L("MAIL FROM: <user@example.com>"), OK, MAIL,
      .path = "user@example.com", .local = "user", .domain = "example.com" },
    { "4.1.2 two SP after colon", L("MAIL FROM:  <user@example.com>"), SYN,
      MAIL },
    { "4.1.2 missing brackets", L("MAIL FROM:user@example.com"), SYN, MAIL },
    { "4.1.2 missing '>'", L("MAIL FROM:<user@example.com"), SYN, MAIL },
    { "4.1.2 missing '>' after local part", L("MAIL FROM:<user"), SYN,
      MAIL },
    { "4.1.1.2 MAIL TO:", L("MAIL TO:<a@b.example>"), SYN, MAIL },
    { "4.1.1.2 MAIL FROM without colon", L("MAIL FROM <a@b.example>"), SYN,
      MAIL },
    { "4.1.1.2 MAIL without argument", L("MAIL"), SYN, MAIL },
    { "4.1.2 text after path", L("MAIL FROM:<a@b.example>x"), SYN, MAIL },
    { "4.1.2 params without SP", L("MAIL FROM:<a@b.example>SIZE=1"), SYN,
      MAIL },

    /* 4.1.1.3, 4.5.1: RCPT */

    { "4.1.1.3 RCPT TO", L("RCPT TO:<user@example.com>"), OK, RCPT,
      .path = "user@example.com", .local = "user", .domain = "example.com" },
    { "4.1.1.3 empty forward-path", L("RCPT TO:<>"), PATH, RCPT },
    { "4.5.1 RCPT TO:<Postmaster>", L("RCPT TO:<Postmaster>"), OK, RCPT,
      .path = "Postmaster", .local = "Postmaster", .flags = F_PM },
    { "4.5.1 Postmaster is case-insensitive", L("RcPt tO:<postMASTER>"), OK,
      RCPT, .path = "postMASTER", .local = "postMASTER", .flags = F_PM },
    { "4.5.1 Postmaster@domain is a plain mailbox",
      L("RCPT TO:<Postmaster@example.com>"), OK, RCPT,
      .path = "Postmaster@example.com", .local = "Postmaster",
      .domain = "example.com" },
    { "4.1.1.2 MAIL FROM:<Postmaster> has no domain",
      L("MAIL FROM:<Postmaster>"), PATH, MAIL },
    { "4.1.2 mailbox without domain", L("RCPT TO:<user>"), PATH, RCPT },
    { "4.5.1 quoted Postmaster is not Postmaster",
      L("RCPT TO:<\"Postmaster\">"), PATH, RCPT },
    { "4.5.1 source-routed Postmaster",
      L("RCPT TO:<@a.example:Postmaster>"), PATH, RCPT },

    /* relay tricks: parsed, left to relay control (4.1.2, 3.6.1, C) */

    { "4.1.2 percent hack: % is atext",
      L("RCPT TO:<user%other.example@local.example>"), OK, RCPT,
      .path = "user%other.example@local.example",
      .local = "user%other.example", .domain = "local.example" },
    { "4.1.2 bang path: ! is atext", L("RCPT TO:<a!b@local.example>"), OK,
      RCPT, .path = "a!b@local.example", .local = "a!b",
      .domain = "local.example" },
    { "4.1.2 quoted local part with @",
      L("RCPT TO:<\"a@b\"@local.example>"), OK, RCPT,
      .path = "\"a@b\"@local.example", .local = "\"a@b\"",
      .domain = "local.example", .flags = F_QUOTED },
    { "4.1.2 quoted-pair and SP in quoted local part",
      L("RCPT TO:<\"a\\\" b\"@x.example>"), OK, RCPT,
      .local = "\"a\\\" b\"", .path = "\"a\\\" b\"@x.example",
      .domain = "x.example", .flags = F_QUOTED },
    { "4.1.2 '>' inside a quoted local part",
      L("RCPT TO:<\"a>b\"@x.example> NOTIFY=NEVER"), OK, RCPT,
      .local = "\"a>b\"", .path = "\"a>b\"@x.example", .domain = "x.example",
      .flags = F_QUOTED, .params = "NOTIFY=NEVER" },
    { "4.1.2 empty quoted local part", L("RCPT TO:<\"\"@x.example>"), OK,
      RCPT, .local = "\"\"", .path = "\"\"@x.example", .domain = "x.example",
      .flags = F_QUOTED },
    { "4.1.2 unterminated quoted local part",
      L("RCPT TO:<\"abc@x.example>"), PATH, RCPT },
    { "4.1.2 quoted-pair of a non-printable", L("RCPT TO:<\"a\\\xc3\xa4\"@x>"),
      PATH, RCPT },
    { "4.1.1.3, C source route accepted and flagged",
      L("RCPT TO:<@relay1.example,@relay2.example:user@final.example>"), OK,
      RCPT, .path = "user@final.example", .local = "user",
      .domain = "final.example", .flags = F_SR },
    { "4.1.1.2, C source route in MAIL",
      L("MAIL FROM:<@a.example:u@b.example>"), OK, MAIL,
      .path = "u@b.example", .local = "u", .domain = "b.example",
      .flags = F_SR },
    { "4.1.2 source route without ':'",
      L("RCPT TO:<@relay.example user@x.example>"), PATH, RCPT },
    { "4.1.2 source route with ',' and no '@'",
      L("RCPT TO:<@relay.example,user@x.example>"), PATH, RCPT },
    { "4.1.2 source route with empty domain", L("RCPT TO:<@:user@x.example>"),
      PATH, RCPT },
    { "4.1.2 source route with bad domain",
      L("RCPT TO:<@relay.example.:user@x.example>"), PATH, RCPT },

    /* 4.1.2: Domain */

    { "4.1.2 trailing dot domain", L("RCPT TO:<user@example.com.>"), PATH,
      RCPT, .detail = "domain ends with a dot" },
    { "4.1.2 leading dot domain", L("RCPT TO:<user@.example.com>"), PATH,
      RCPT },
    { "4.1.2 empty label", L("RCPT TO:<user@a..example>"), PATH, RCPT },
    { "4.1.2 label starts with hyphen", L("RCPT TO:<user@-a.example>"), PATH,
      RCPT },
    { "4.1.2 label ends with hyphen", L("RCPT TO:<user@a-.example>"), PATH,
      RCPT },
    { "4.1.2 inner hyphen, digits", L("RCPT TO:<user@a-1.0example>"), OK,
      RCPT, .path = "user@a-1.0example", .local = "user",
      .domain = "a-1.0example" },
    { "4.1.2 underscore in domain", L("RCPT TO:<user@a_b.example>"), PATH,
      RCPT },
    { "4.1.2 empty domain", L("RCPT TO:<user@>"), PATH, RCPT },
    { "4.1.2 missing local part", L("RCPT TO:<@x.example>"), PATH, RCPT },
    { "4.1.2 SP inside the path", L("RCPT TO:<us er@x.example>"), PATH,
      RCPT },
    { "4.1.2 SP after the domain", L("RCPT TO:<user@x.example >"), PATH,
      RCPT },
    { "RFC 1035, 2.3.4 label of 63 octets", L("RCPT TO:<u@{63:a}.example>"),
      OK, RCPT, .local = "u", .path = "u@{63:a}.example",
      .domain = "{63:a}.example" },
    { "RFC 1035, 2.3.4 label of 64 octets", L("RCPT TO:<u@{64:a}.example>"),
      PATH, RCPT, .detail = "domain label too long" },

    /* 4.1.2: Local-part */

    { "4.1.2 dot-string", L("RCPT TO:<first.last+tag@x.example>"), OK, RCPT,
      .path = "first.last+tag@x.example", .local = "first.last+tag",
      .domain = "x.example" },
    { "4.1.2 all atext specials",
      L("RCPT TO:<!#$%&'*+-/=?^_`{|}~@x.example>"), OK, RCPT,
      .path = "!#$%&'*+-/=?^_`{|}~@x.example",
      .local = "!#$%&'*+-/=?^_`{|}~", .domain = "x.example" },
    { "4.1.2 leading dot in local part", L("RCPT TO:<.user@x.example>"),
      PATH, RCPT },
    { "4.1.2 trailing dot in local part", L("RCPT TO:<user.@x.example>"),
      PATH, RCPT },
    { "4.1.2 double dot in local part", L("RCPT TO:<us..er@x.example>"),
      PATH, RCPT },
    { "4.1.2 '(' is not atext", L("RCPT TO:<us(er@x.example>"), PATH, RCPT },
    { "4.1.2 two @", L("RCPT TO:<a@b@x.example>"), PATH, RCPT },

    /* 4.5.3.1.1-3: lengths */

    { "4.5.3.1.1 local part of 64", L("RCPT TO:<{64:l}@x.example>"), OK,
      RCPT, .local = "{64:l}", .path = "{64:l}@x.example",
      .domain = "x.example" },
    { "4.5.3.1.1 local part of 65", L("RCPT TO:<{65:l}@x.example>"), PATH,
      RCPT, .detail = "local part too long" },
    { "4.5.3.1.3 path of 256 with <>",
      L("RCPT TO:<{64:l}@{63:a}.{63:b}.{61:c}>"), OK, RCPT,
      .local = "{64:l}", .path = "{64:l}@{63:a}.{63:b}.{61:c}",
      .domain = "{63:a}.{63:b}.{61:c}" },
    { "4.5.3.1.3 path of 257 with <>",
      L("RCPT TO:<{64:l}@{63:a}.{63:b}.{62:c}>"), PATH, RCPT,
      .detail = "path too long" },
    { "4.5.3.1.2 domain of 256", .max_len = 1024,
      L("RCPT TO:<u@{63:a}.{63:b}.{63:c}.{62:d}.e>"), PATH, RCPT,
      .detail = "domain too long" },

    /* 4.1.3: address literals */

    { "4.1.3 IPv4 literal", L("RCPT TO:<u@[192.0.2.1]>"), OK, RCPT,
      .path = "u@[192.0.2.1]", .local = "u", .domain = "[192.0.2.1]",
      .flags = F_LIT },
    { "4.1.3 IPv4 octet over 255", L("RCPT TO:<u@[256.0.2.1]>"), PATH,
      RCPT },
    { "4.1.3 IPv4 with three octets", L("RCPT TO:<u@[192.0.2]>"), PATH,
      RCPT },
    { "4.1.3 IPv4 with five octets", L("RCPT TO:<u@[192.0.2.1.5]>"), PATH,
      RCPT },
    { "4.1.3 IPv4 leading zero (octal trap) refused",
      L("RCPT TO:<u@[010.0.2.1]>"), PATH, RCPT },
    { "4.1.3 IPv4 zero octets", L("RCPT TO:<u@[0.0.0.0]>"), OK, RCPT,
      .path = "u@[0.0.0.0]", .local = "u", .domain = "[0.0.0.0]",
      .flags = F_LIT },
    { "4.1.3 IPv6 compressed", L("RCPT TO:<u@[IPv6:2001:db8::1]>"), OK,
      RCPT, .path = "u@[IPv6:2001:db8::1]", .local = "u",
      .domain = "[IPv6:2001:db8::1]", .flags = F_LIT },
    { "4.1.3 IPv6 full, tag case-insensitive",
      L("RCPT TO:<u@[ipv6:2001:DB8:0:0:0:0:0:1]>"), OK, RCPT,
      .path = "u@[ipv6:2001:DB8:0:0:0:0:0:1]", .local = "u",
      .domain = "[ipv6:2001:DB8:0:0:0:0:0:1]", .flags = F_LIT },
    { "4.1.3 IPv6 ::1", L("RCPT TO:<u@[IPv6:::1]>"), OK, RCPT,
      .path = "u@[IPv6:::1]", .local = "u", .domain = "[IPv6:::1]",
      .flags = F_LIT },
    { "4.1.3 IPv6v4-comp", L("RCPT TO:<u@[IPv6:::ffff:192.0.2.1]>"), OK,
      RCPT, .path = "u@[IPv6:::ffff:192.0.2.1]", .local = "u",
      .domain = "[IPv6:::ffff:192.0.2.1]", .flags = F_LIT },
    { "4.1.3 IPv6v4-full", L("RCPT TO:<u@[IPv6:1:2:3:4:5:6:192.0.2.1]>"),
      OK, RCPT, .path = "u@[IPv6:1:2:3:4:5:6:192.0.2.1]", .local = "u",
      .domain = "[IPv6:1:2:3:4:5:6:192.0.2.1]", .flags = F_LIT },
    { "4.1.3 IPv6 two '::'", L("RCPT TO:<u@[IPv6:2001::db8::1]>"), PATH,
      RCPT },
    { "4.1.3 IPv6 group of 5 digits", L("RCPT TO:<u@[IPv6:12345::1]>"), PATH,
      RCPT },
    { "4.1.3 IPv6 seven groups without '::'",
      L("RCPT TO:<u@[IPv6:1:2:3:4:5:6:7]>"), PATH, RCPT },
    { "4.1.3 IPv6 '::' with seven groups",
      L("RCPT TO:<u@[IPv6:1:2:3:4:5:6:7::]>"), PATH, RCPT },
    { "4.1.3 IPv6 non-hex", L("RCPT TO:<u@[IPv6:g::1]>"), PATH, RCPT },
    { "4.1.3 IPv6 without tag", L("RCPT TO:<u@[2001:db8::1]>"), PATH, RCPT },
    { "4.1.3 general literal with unregistered tag",
      L("RCPT TO:<u@[X-foo:bar]>"), PATH, RCPT },
    { "4.1.3 unterminated literal", L("RCPT TO:<u@[192.0.2.1>"), PATH,
      RCPT },

    /* RFC 6531, 3.3: SMTPUTF8 */

    { "RFC 6531, 3.3 UTF-8 local part and U-label",
      L("RCPT TO:<j\xc3\xb6rg@b\xc3\xbc" "cher.example>"), OK, RCPT,
      .path = "j\xc3\xb6rg@b\xc3\xbc" "cher.example", .local = "j\xc3\xb6rg",
      .domain = "b\xc3\xbc" "cher.example", .flags = F_UTF8 },
    { "RFC 6531, 3.3 UTF-8 in a quoted local part",
      L("MAIL FROM:<\"\xe4\xbe\x8b \xe3\x81\x88\"@x.example>"), OK, MAIL,
      .path = "\"\xe4\xbe\x8b \xe3\x81\x88\"@x.example",
      .local = "\"\xe4\xbe\x8b \xe3\x81\x88\"", .domain = "x.example",
      .flags = F_UTF8 | F_QUOTED },
    { "RFC 3629, 4 truncated UTF-8", L("RCPT TO:<\xc3@x.example>"), PATH,
      RCPT },
    { "RFC 3629, 4 overlong UTF-8", L("RCPT TO:<\xc0\xaf@x.example>"), PATH,
      RCPT },
    { "RFC 3629, 4 UTF-8 surrogate", L("RCPT TO:<\xed\xa0\x80@x.example>"),
      PATH, RCPT },
    { "RFC 3629, 4 UTF-8 above U+10FFFF",
      L("RCPT TO:<u@\xf4\x90\x80\x80.example>"), PATH, RCPT },

    /* 4.1.2: esmtp-param */

    { "4.1.2 MAIL parameters",
      L("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME"), OK, MAIL,
      .path = "a@b.example", .local = "a", .domain = "b.example",
      .params = "SIZE=1000 BODY=8BITMIME" },
    { "RFC 3461, 4.1 RCPT NOTIFY and ORCPT",
      L("RCPT TO:<a@b.example> NOTIFY=SUCCESS,FAILURE "
        "ORCPT=rfc822;a+40b.example"), OK, RCPT,
      .path = "a@b.example", .local = "a", .domain = "b.example",
      .params = "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40b.example" },
    { "RFC 6531, 3.4 keyword without value",
      L("MAIL FROM:<a@b.example> SMTPUTF8"), OK, MAIL,
      .path = "a@b.example", .local = "a", .domain = "b.example",
      .params = "SMTPUTF8" },
    { "4.1.2 duplicate keyword, case-insensitive (2.4)",
      L("MAIL FROM:<a@b.example> SIZE=1 size=2"), PRM, MAIL },
    { "4.1.2 sixteen parameters",
      L("MAIL FROM:<a@b.example> P0 P1 P2 P3 P4 P5 P6 P7 P8 P9 PA PB PC PD "
        "PE PF"), OK, MAIL, .path = "a@b.example", .local = "a",
      .domain = "b.example",
      .params = "P0 P1 P2 P3 P4 P5 P6 P7 P8 P9 PA PB PC PD PE PF" },
    { "4.1.2 seventeen parameters",
      L("MAIL FROM:<a@b.example> P0 P1 P2 P3 P4 P5 P6 P7 P8 P9 PA PB PC PD "
        "PE PF PG"), PRM, MAIL },
    { "4.1.2 empty esmtp-value", L("MAIL FROM:<a@b.example> SIZE="), PRM,
      MAIL },
    { "4.1.2 '=' in esmtp-value", L("MAIL FROM:<a@b.example> X=1=2"), PRM,
      MAIL },
    { "4.1.2 two SP between params",
      L("MAIL FROM:<a@b.example> SIZE=1  BODY=7BIT"), PRM, MAIL },
    { "4.1.2 trailing SP after path", L("MAIL FROM:<a@b.example> "), PRM,
      MAIL },
    { "4.1.2 keyword starting with '-'", L("MAIL FROM:<a@b.example> -X=1"),
      PRM, MAIL },
    { "4.1.2 '_' in keyword", L("RCPT TO:<a@b.example> X_Y=1"), PRM, RCPT },
    { "RFC 6531, 3.3 UTF-8 in esmtp-value",
      L("MAIL FROM:<a@b.example> X=\xc3\xa9t\xc3\xa9"), OK, MAIL,
      .path = "a@b.example", .local = "a", .domain = "b.example",
      .params = "X=\xc3\xa9t\xc3\xa9", .flags = F_UTF8 },
    { "RFC 3629, 4 invalid UTF-8 in esmtp-value",
      L("MAIL FROM:<a@b.example> X=\xff"), PRM, MAIL },
};


static char *
expand(const char *s, size_t len, size_t *outlen)
{
    char        *out;
    size_t       i, k, n, j;
    static char  buf[2][2048];
    static int   slot;

    out = buf[slot++ & 1];
    k = 0;

    for (i = 0; i < len; i++) {
        if (s[i] == '{' && i + 1 < len && s[i + 1] >= '0' && s[i + 1] <= '9') {
            n = 0;
            j = i + 1;

            while (j < len && s[j] >= '0' && s[j] <= '9') {
                n = n * 10 + (size_t) (s[j++] - '0');
            }

            if (j + 2 < len && s[j] == ':' && s[j + 2] == '}') {
                while (n-- && k < sizeof(buf[0]) - 1) {
                    out[k++] = s[j + 1];
                }

                i = j + 2;
                continue;
            }
        }

        if (k < sizeof(buf[0]) - 1) {
            out[k++] = s[i];
        }
    }

    out[k] = '\0';
    *outlen = k;

    return out;
}


static int
str_is(const char *name, const char *what, sg_str_t s, const char *expect)
{
    size_t      n;
    const char  *e;

    if (expect == NULL) {
        expect = "";
    }

    e = expand(expect, strlen(expect), &n);

    if (s.len == n && (n == 0 || memcmp(s.data, e, n) == 0)) {
        return 1;
    }

    printf("  %s: %s is \"%.*s\", expected \"%s\"\n", name, what,
           (int) s.len, s.data != NULL ? s.data : "", e);

    return 0;
}


static int
run_case(const sg_test_case_t *tc)
{
    int             ok;
    char           *line, params[1024];
    static char     copy[2048];
    size_t          len, i, k;
    unsigned        flags;
    const char     *detail;
    sg_smtp_rc_e    rc;
    sg_smtp_cmd_t   cmd;

    /* the result points into the line: keep it away from expand() */
    line = expand(tc->line, tc->len, &len);
    memcpy(copy, line, len);
    line = copy;

    rc = sg_smtp_cmd_parse(line, len, tc->max_len, &cmd, &detail);

    if (rc != tc->rc || cmd.verb != tc->verb) {
        printf("  %s: rc %d verb %d (%s), expected rc %d verb %d\n",
               tc->name, (int) rc, (int) cmd.verb,
               detail ? detail : "no detail", (int) tc->rc, (int) tc->verb);
        return 0;
    }

    if (rc != SG_SMTP_OK) {
        if (detail == NULL) {
            printf("  %s: error without detail\n", tc->name);
            return 0;
        }

        if (tc->detail != NULL && strcmp(detail, tc->detail) != 0) {
            printf("  %s: detail \"%s\", expected \"%s\"\n", tc->name,
                   detail, tc->detail);
            return 0;
        }

        return 1;
    }

    ok = detail == NULL;

    if (tc->arg != NULL) {
        ok &= str_is(tc->name, "arg", cmd.arg, tc->arg);
    }

    ok &= str_is(tc->name, "path", cmd.path, tc->path);
    ok &= str_is(tc->name, "local_part", cmd.local_part, tc->local);
    ok &= str_is(tc->name, "domain", cmd.domain, tc->domain);
    ok &= str_is(tc->name, "auth_mech", cmd.auth_mech, tc->auth_mech);
    ok &= str_is(tc->name, "auth_initial", cmd.auth_initial,
                 tc->auth_initial);

    flags = (cmd.null_path ? F_NULL : 0)
            | (cmd.postmaster ? F_PM : 0)
            | (cmd.utf8 ? F_UTF8 : 0)
            | (cmd.has_source_route ? F_SR : 0)
            | (cmd.quoted_local ? F_QUOTED : 0)
            | (cmd.address_literal ? F_LIT : 0)
            | (cmd.bdat_last ? F_LAST : 0);

    if (flags != tc->flags) {
        printf("  %s: flags 0x%02x, expected 0x%02x\n", tc->name, flags,
               tc->flags);
        ok = 0;
    }

    if (cmd.bdat_size != tc->bdat_size) {
        printf("  %s: bdat_size %llu\n", tc->name,
               (unsigned long long) cmd.bdat_size);
        ok = 0;
    }

    k = 0;

    for (i = 0; i < cmd.nparams; i++) {
        k += (size_t) snprintf(params + k, sizeof(params) - k, "%s%.*s",
                               i ? " " : "", (int) cmd.params[i].name.len,
                               cmd.params[i].name.data);

        if (cmd.params[i].value.data != NULL) {
            k += (size_t) snprintf(params + k, sizeof(params) - k, "=%.*s",
                                   (int) cmd.params[i].value.len,
                                   cmd.params[i].value.data);
        }
    }

    params[k] = '\0';

    if (strcmp(params, tc->params ? tc->params : "") != 0) {
        printf("  %s: params \"%s\"\n", tc->name, params);
        ok = 0;
    }

    return ok;
}


static void
test_helpers(void)
{
    char           out[16];
    size_t         n;
    sg_str_t       v, in;
    sg_smtp_cmd_t  cmd;
    const char    *line;
    char           dom[300];

    /* RFC 3461, 4: parameters are found by keyword, case-insensitively */
    line = "RCPT TO:<a@b.example> NOTIFY=NEVER ORCPT=rfc822;a+2Bb@x XYZ";
    CHECK(sg_smtp_cmd_parse(line, strlen(line), 0, &cmd, NULL) == SG_SMTP_OK,
          "RFC 3461, 4.1 parse for param_find");
    CHECK(sg_smtp_param_find(&cmd, "orcpt", &v) && v.len == 14
          && memcmp(v.data, "rfc822;a+2Bb@x", 14) == 0,
          "2.4 param_find is case-insensitive");
    CHECK(sg_smtp_param_find(&cmd, "XYZ", &v) && v.data == NULL,
          "4.1.2 param_find keyword without value");
    CHECK(!sg_smtp_param_find(&cmd, "NOTIF", NULL),
          "4.1.2 param_find does not match a prefix");
    CHECK(!sg_smtp_param_find(&cmd, "ENVID", &v),
          "4.1.2 param_find missing keyword");

    /* RFC 3461, 4: xtext */
    in.data = "rfc822;a+2Bb+3Dc@x";
    in.len = strlen(in.data);
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n) == SG_SMTP_OK
          && n == 14 && memcmp(out, "rfc822;a+b=c@x", 14) == 0,
          "RFC 3461, 4 xtext decodes +2B and +3D");
    in.data = "a+2b";
    in.len = 4;
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n)
          == SG_SMTP_ERR_SYNTAX,
          "RFC 3461, 4 xtext hexchar is upper case only");
    in.data = "a+2";
    in.len = 3;
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n)
          == SG_SMTP_ERR_SYNTAX, "RFC 3461, 4 xtext truncated hexchar");
    in.data = "a+0Db";
    in.len = 5;
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n)
          == SG_SMTP_ERR_SYNTAX, "RFC 3461, 4 xtext encoded CR refused");
    in.data = "a+00";
    in.len = 4;
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n)
          == SG_SMTP_ERR_SYNTAX, "RFC 3461, 4 xtext encoded NUL refused");
    in.data = "a=b";
    in.len = 3;
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n)
          == SG_SMTP_ERR_SYNTAX, "RFC 3461, 4 xtext raw '=' refused");
    in.data = "a+20b";
    in.len = 5;
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n) == SG_SMTP_OK
          && n == 3 && memcmp(out, "a b", 3) == 0,
          "RFC 3461, 4 xtext encoded SP");
    in.data = "0123456789abcdefg";
    in.len = 17;
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n)
          == SG_SMTP_ERR_TOO_LONG, "RFC 3461, 4 xtext output too small");
    in.data = "";
    in.len = 0;
    CHECK(sg_smtp_xtext_decode(&in, out, sizeof(out), &n) == SG_SMTP_OK
          && n == 0, "RFC 3461, 4 xtext empty");

    /* RFC 5321, 4.1.2 and 4.5.3.1.2: sg_smtp_domain_valid */
    CHECK(sg_smtp_domain_valid("mx1.example.com", 15, 0),
          "4.1.2 domain_valid plain");
    CHECK(!sg_smtp_domain_valid("example.com.", 12, 0),
          "4.1.2 domain_valid trailing dot");
    CHECK(!sg_smtp_domain_valid("", 0, 0), "4.1.2 domain_valid empty");
    CHECK(!sg_smtp_domain_valid("[192.0.2.1]", 11, 0),
          "4.1.2 domain_valid: an address literal is not a Domain");
    CHECK(!sg_smtp_domain_valid("b\xc3\xbc" "cher.example", 13, 0),
          "RFC 6531, 3.3 domain_valid U-label without allow_utf8");
    CHECK(sg_smtp_domain_valid("b\xc3\xbc" "cher.example", 13, 1),
          "RFC 6531, 3.3 domain_valid U-label with allow_utf8");

    memset(dom, 'a', sizeof(dom));
    dom[63] = dom[127] = dom[191] = '.';
    CHECK(sg_smtp_domain_valid(dom, 255, 0),
          "4.5.3.1.2 domain_valid 255 octets");
    CHECK(!sg_smtp_domain_valid(dom, 256, 0),
          "4.5.3.1.2 domain_valid 256 octets");

    /* an error still reports the verb and clears the result */
    line = "RCPT TO:<a@b.example.>";
    CHECK(sg_smtp_cmd_parse(line, strlen(line), 0, &cmd, NULL)
          == SG_SMTP_ERR_PATH && cmd.verb == SG_SMTP_CMD_RCPT
          && cmd.nparams == 0,
          "4.1.2 error keeps the verb; err_detail may be NULL");
}


int
main(void)
{
    size_t  i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        CHECK(run_case(&cases[i]), cases[i].name);
    }

    test_helpers();

    return SG_TEST_DONE();
}
