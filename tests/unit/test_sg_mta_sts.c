/*
 * MTA-STS, the pure part (common/sg_mta_sts.c): the TXT record parser
 * (RFC 8461, 3.1), the policy parser (3.2), the Content-Type check (3.2)
 * and the MX matcher (4.1), each case naming its section; then every file
 * of the shared corpus (corpus/mta-sts/index.tsv), read in place.
 *
 * The corpus directory (the one holding mta-sts/) is argv[1], else
 * $SG_CORPUS, else ../../../shared/corpus (make runs this from tests/unit:
 * shared/ is the clone's sibling) or ../shared/corpus (from the clone).
 */

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sg_mta_sts.h"
#include "sg_test.h"


#define OK          SG_STS_OK
#define ENF         SG_STS_ENFORCE
#define TST         SG_STS_TESTING
#define NON         SG_STS_NONE
#define ANY         ((size_t) -1)

#define V1          "version: STSv1\n"
#define V1E         "version: STSv1\nmode: enforce\nmax_age: 86400\n"
#define V1N         "version: STSv1\nmode: none\nmax_age: 86400\n"

#define CORPUS_FILE_MAX  (256 * 1024)


typedef struct {
    const char     *name;
    const char     *body;
    size_t          len;        /* 0: strlen(body) */
    sg_sts_rc_e     rc;
    size_t          line;       /* of the error; ANY: not checked */
    sg_sts_mode_e   mode;
    uint32_t        max_age;
    size_t          nmx;
    const char     *mx0;        /* the first mx, as kept; NULL: unchecked */
} policy_case_t;


static const policy_case_t  policy_cases[] = {

    /* the line structure */
    { "RFC 8461 3.2: the RFC's example policy",
      "version: STSv1\nmode: testing\nmx: mx1.example.com\n"
      "mx: mx2.example.com\nmx: mx.backup-example.com\nmax_age: 1296000\n",
      0, OK, 0, TST, 1296000, 3, "mx1.example.com" },
    { "RFC 8461 3.2: CRLF line terminators",
      "version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\n"
      "max_age: 86400\r\n", 0, OK, 0, ENF, 86400, 1, "mx.example.com" },
    { "RFC 8461 3.2: LF and CRLF mixed",
      "version: STSv1\r\nmode: enforce\nmx: mx.example.com\r\n"
      "max_age: 86400\n", 0, OK, 0, ENF, 86400, 1, "mx.example.com" },
    { "RFC 8461 3.2: no terminator after the last field",
      V1 "mode: none\nmax_age: 5", 0, OK, 0, NON, 5, 0, NULL },
    { "RFC 8461 3.2: no space after the colon", "version:STSv1\n"
      "mode:enforce\nmx:mx.example.com\nmax_age:1\n", 0, OK, 0, ENF, 1, 1,
      "mx.example.com" },
    { "RFC 8461 3.2: tabs and spaces after the colon",
      "version: \t STSv1\nmode:\tenforce\nmx:\t\t mx.example.com\n"
      "max_age:  1\n", 0, OK, 0, ENF, 1, 1, "mx.example.com" },
    { "RFC 8461 3.2: trailing whitespace after values",
      "version: STSv1 \nmode: enforce\t\nmx: mx.example.com \t\r\n"
      "max_age: 1 \n", 0, OK, 0, ENF, 1, 1, "mx.example.com" },
    { "RFC 8461 3.2 (decision): blank lines are skipped",
      "\n" V1 "\r\nmode: none\n \t\nmax_age: 1\n\n\n", 0, OK, 0, NON, 1, 0,
      NULL },
    { "RFC 8461 3.2: a line without a colon names its line",
      V1 "mode: none\nmax_age 1\n", 0, SG_STS_POL_NO_COLON, 3, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2: leading whitespace before a key",
      V1 " mode: none\nmax_age: 1\n", 0, SG_STS_POL_KEY, 2, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2: whitespace before the colon",
      "version : STSv1\nmode: none\nmax_age: 1\n", 0, SG_STS_POL_KEY, 1,
      NON, 0, 0, NULL },
    { "RFC 8461 3.2: a bare CR is not a terminator",
      V1 "mode: none\rmax_age: 1\n", 0, SG_STS_POL_MODE, 2, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2: two CRs before LF",
      V1 "mode: none\r\r\nmax_age: 1\n", 0, SG_STS_POL_MODE, 2, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2: a NUL byte is not a valid character",
      V1 "mode: none\nmax_age: 1\nx: a\0b\n",
      sizeof(V1 "mode: none\nmax_age: 1\nx: a\0b\n") - 1,
      SG_STS_POL_EXT_VALUE, 4,
      NON, 0, 0, NULL },
    { "RFC 8461 3.2: empty body: no version", "", 0,
      SG_STS_POL_NO_VERSION, 0, NON, 0, 0, NULL },

    /* version */
    { "RFC 8461 3.2: version missing", "mode: none\nmax_age: 1\n", 0,
      SG_STS_POL_NO_VERSION, 0, NON, 0, 0, NULL },
    { "RFC 8461 3.2: version STSv2", "version: STSv2\nmode: none\n"
      "max_age: 1\n", 0, SG_STS_POL_VERSION, 1, NON, 0, 0, NULL },
    { "RFC 8461 3.2: version value is case-sensitive (stsv1)",
      "version: stsv1\nmode: none\nmax_age: 1\n", 0, SG_STS_POL_VERSION, 1,
      NON, 0, 0, NULL },
    { "RFC 8461 3.2: version STSv10", "version: STSv10\nmode: none\n"
      "max_age: 1\n", 0, SG_STS_POL_VERSION, 1, NON, 0, 0, NULL },
    { "RFC 8461 3.2: keys are case-sensitive: Version is an extension",
      "Version: STSv1\nmode: none\nmax_age: 1\n", 0, SG_STS_POL_NO_VERSION,
      0, NON, 0, 0, NULL },
    { "RFC 8461 3.2: version need not be the first line",
      "mode: none\nmax_age: 1\nversion: STSv1\n", 0, OK, 0, NON, 1, 0,
      NULL },

    /* mode */
    { "RFC 8461 3.2: mode none needs no mx", V1N, 0, OK, 0, NON, 86400, 0,
      NULL },
    { "RFC 8461 3.2: mode missing", V1 "max_age: 1\nmx: a.example\n", 0,
      SG_STS_POL_NO_MODE, 0, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mode value is case-sensitive (Enforce)",
      V1 "mode: Enforce\nmx: a.example\nmax_age: 1\n", 0, SG_STS_POL_MODE, 2,
      NON, 0, 0, NULL },
    { "RFC 8461 3.2: mode empty", V1 "mode:\nmax_age: 1\n", 0,
      SG_STS_POL_MODE, 2, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mode enforcement (a longer word)",
      V1 "mode: enforcement\nmx: a.example\nmax_age: 1\n", 0,
      SG_STS_POL_MODE, 2, NON, 0, 0, NULL },
    { "RFC 8461 3.2: repeated mode: the first wins",
      V1 "mode: testing\nmode: enforce\nmx: a.example\nmax_age: 1\n", 0, OK,
      0, TST, 1, 1, "a.example" },
    { "RFC 8461 3.2: a repeated field must still be valid",
      V1 "mode: testing\nmode: bogus\nmx: a.example\nmax_age: 1\n", 0,
      SG_STS_POL_MODE, 3, NON, 0, 0, NULL },

    /* max_age */
    { "RFC 8461 3.2: max_age missing", V1 "mode: none\n", 0,
      SG_STS_POL_NO_MAX_AGE, 0, NON, 0, 0, NULL },
    { "RFC 8461 3.2: max_age 0", V1 "mode: none\nmax_age: 0\n", 0, OK, 0,
      NON, 0, 0, NULL },
    { "RFC 8461 3.2: max_age 31557600 is kept",
      V1 "mode: none\nmax_age: 31557600\n", 0, OK, 0, NON, 31557600, 0,
      NULL },
    { "RFC 8461 3.2 (decision): max_age 31557601 is clamped",
      V1 "mode: none\nmax_age: 31557601\n", 0, OK, 0, NON, 31557600, 0,
      NULL },
    { "RFC 8461 3.2 (decision): max_age of 10 digits is clamped",
      V1 "mode: none\nmax_age: 9999999999\n", 0, OK, 0, NON, 31557600, 0,
      NULL },
    { "RFC 8461 3.2: max_age with leading zeros, 10 digits",
      V1 "mode: none\nmax_age: 0000000042\n", 0, OK, 0, NON, 42, 0, NULL },
    { "RFC 8461 3.2: max_age of 11 digits",
      V1 "mode: none\nmax_age: 00000000042\n", 0, SG_STS_POL_MAX_AGE, 3, NON,
      0, 0, NULL },
    { "RFC 8461 3.2: max_age negative", V1 "mode: none\nmax_age: -1\n", 0,
      SG_STS_POL_MAX_AGE, 3, NON, 0, 0, NULL },
    { "RFC 8461 3.2: max_age with a plus sign",
      V1 "mode: none\nmax_age: +1\n", 0, SG_STS_POL_MAX_AGE, 3, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2: max_age empty", V1 "mode: none\nmax_age:\n", 0,
      SG_STS_POL_MAX_AGE, 3, NON, 0, 0, NULL },
    { "RFC 8461 3.2: max_age with a space inside",
      V1 "mode: none\nmax_age: 86 400\n", 0, SG_STS_POL_MAX_AGE, 3, NON, 0,
      0, NULL },
    { "RFC 8461 3.2: max_age with a unit", V1 "mode: none\nmax_age: 1d\n",
      0, SG_STS_POL_MAX_AGE, 3, NON, 0, 0, NULL },
    { "RFC 8461 3.2: repeated max_age: the first wins",
      V1 "mode: none\nmax_age: 7\nmax_age: 9\n", 0, OK, 0, NON, 7, 0, NULL },

    /* mx */
    { "RFC 8461 3.2: mx required in mode enforce", V1E, 0, SG_STS_POL_NO_MX,
      0, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx required in mode testing",
      V1 "mode: testing\nmax_age: 1\n", 0, SG_STS_POL_NO_MX, 0, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2: mx allowed in mode none", V1N "mx: mx.example.com\n",
      0, OK, 0, NON, 86400, 1, "mx.example.com" },
    { "RFC 8461 3.2: mx repeated: every one kept, in order",
      V1E "mx: a.example\nmx: *.b.example\nmx: c.example\n", 0, OK, 0, ENF,
      86400, 3, "a.example" },
    { "RFC 8461 3.2: mx *.example.com", V1E "mx: *.example.com\n", 0, OK, 0,
      ENF, 86400, 1, "*.example.com" },
    { "RFC 8461 3.2: mx *.*.example.com", V1E "mx: *.*.example.com\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx **.example.com", V1E "mx: **.example.com\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx wildcard not left-most", V1E "mx: a.*.example\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx * alone", V1E "mx: *\n", 0, SG_STS_POL_MX, 4, NON,
      0, 0, NULL },
    { "RFC 8461 3.2: mx *. alone", V1E "mx: *.\n", 0, SG_STS_POL_MX, 4, NON,
      0, 0, NULL },
    { "RFC 8461 3.2: mx partial wildcard label", V1E "mx: mx*.example\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx U-label (UTF-8) is invalid",
      V1E "mx: m\xc3\xb8x.example\n", 0, SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx A-label is valid", V1E "mx: xn--mx-lka.example\n",
      0, OK, 0, ENF, 86400, 1, "xn--mx-lka.example" },
    { "RFC 8461 3.2: mx upper case is kept as written",
      V1E "mx: MX.Example.COM\n", 0, OK, 0, ENF, 86400, 1,
      "MX.Example.COM" },
    { "RFC 8461 3.2: mx label with a leading hyphen",
      V1E "mx: -mx.example\n", 0, SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx label with a trailing hyphen",
      V1E "mx: test.example-\n", 0, SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx empty label", V1E "mx: a..example\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx leading dot", V1E "mx: .example\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx with an underscore", V1E "mx: mx_1.example\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx address literal", V1E "mx: [192.0.2.1]\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx with a port", V1E "mx: mx.example:25\n", 0,
      SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx two names on one line",
      V1E "mx: a.example b.example\n", 0, SG_STS_POL_MX, 4, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2: mx empty", V1E "mx:\n", 0, SG_STS_POL_MX, 4, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2 (decision): mx trailing dot ignored",
      V1E "mx: mx.example.com.\n", 0, OK, 0, ENF, 86400, 1,
      "mx.example.com" },
    { "RFC 8461 3.2: mx label of 63 octets",
      V1E "mx: a23456789012345678901234567890123456789012345678901234567890123"
      ".example\n", 0, OK, 0, ENF, 86400, 1, NULL },
    { "RFC 8461 3.2: mx label of 64 octets",
      V1E "mx: a234567890123456789012345678901234567890123456789012345678901234"
      ".example\n", 0, SG_STS_POL_MX, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: mx invalid even in mode none",
      V1N "mx: bad_host.example\n", 0, SG_STS_POL_MX, 4, NON, 0, 0, NULL },

    /* extensions */
    { "RFC 8461 3.2: unknown key ignored", V1N "foo: bar\n", 0, OK, 0, NON,
      86400, 0, NULL },
    { "RFC 8461 3.2: extension value with spaces inside",
      V1N "more: ext e  ns ion\n", 0, OK, 0, NON, 86400, 0, NULL },
    { "RFC 8461 3.2: extension value in UTF-8",
      V1N "note: caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x93\xa7\n", 0, OK, 0, NON,
      86400, 0, NULL },
    { "RFC 8461 3.2: extension value, invalid UTF-8 byte",
      V1N "note: caf\xff\n", 0, SG_STS_POL_EXT_VALUE, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension value, overlong UTF-8",
      V1N "note: \xc0\xaf\n", 0, SG_STS_POL_EXT_VALUE, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension value, UTF-8 surrogate",
      V1N "note: \xed\xa0\x80\n", 0, SG_STS_POL_EXT_VALUE, 4, NON, 0, 0,
      NULL },
    { "RFC 8461 3.2: extension value, truncated UTF-8",
      V1N "note: \xe2\x82\n", 0, SG_STS_POL_EXT_VALUE, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension value with a TAB inside",
      V1N "more: a\tb\n", 0, SG_STS_POL_EXT_VALUE, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension value with a control character",
      V1N "more: a\001b\n", 0, SG_STS_POL_EXT_VALUE, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension value with DEL", V1N "more: a\177\n", 0,
      SG_STS_POL_EXT_VALUE, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension value empty", V1N "ext:\n", 0,
      SG_STS_POL_EXT_VALUE, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension value of whitespace only", V1N "ext: \t \n",
      0, SG_STS_POL_EXT_VALUE, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension value with a colon", V1N "url: https://a/\n",
      0, OK, 0, NON, 86400, 0, NULL },
    { "RFC 8461 3.2: extension name of 32 characters",
      V1N "a1234567890123456789012345678901: x\n", 0, OK, 0, NON, 86400, 0,
      NULL },
    { "RFC 8461 3.2: extension name of 33 characters",
      V1N "a12345678901234567890123456789012: x\n", 0, SG_STS_POL_KEY, 4, NON,
      0, 0, NULL },
    { "RFC 8461 3.2: extension name starting with an underscore",
      V1N "_bad: x\n", 0, SG_STS_POL_KEY, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension name starting with a hyphen",
      V1N "-bad: x\n", 0, SG_STS_POL_KEY, 4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension name with _ - . inside",
      V1N "a_b-c.d: x\n", 0, OK, 0, NON, 86400, 0, NULL },
    { "RFC 8461 3.2: extension name empty", V1N ": x\n", 0, SG_STS_POL_KEY,
      4, NON, 0, 0, NULL },
    { "RFC 8461 3.2: extension name with a space", V1N "my key: x\n", 0,
      SG_STS_POL_KEY, 4, NON, 0, 0, NULL },
};


typedef struct {
    const char     *name;
    const char     *rec[4][4];      /* records of NULL-ended strings */
    sg_sts_rc_e     rc;
    const char     *id;             /* OK: the id */
    size_t          line;           /* the record of the error */
} txt_case_t;


static const txt_case_t  txt_cases[] = {
    { "RFC 8461 3.1: the RFC's example record",
      { { "v=STSv1; id=20160831085700Z;" } }, OK, "20160831085700Z", 0 },
    { "RFC 8461 3.1: no whitespace at all",
      { { "v=STSv1;id=20180907T090909;" } }, OK, "20180907T090909", 0 },
    { "RFC 8461 3.1: WSP on both sides of ;",
      { { "v=STSv1 \t; \t id=abc \t;" } }, OK, "abc", 0 },
    { "RFC 8461 3.1: no trailing ;", { { "v=STSv1; id=a" } }, OK, "a", 0 },
    { "RFC 8461 3.1: strings of a record joined without spaces",
      { { "v=STSv1; id=2016", "0831" } }, OK, "20160831", 0 },
    { "RFC 8461 3.1: a string boundary inside v=STSv1",
      { { "v=ST", "Sv1;i", "d=x" } }, OK, "x", 0 },
    { "RFC 8461 3.1: empty strings in a record",
      { { "", "v=STSv1;", "", "id=y" } }, OK, "y", 0 },
    { "RFC 8461 3.1: joined, a space at a boundary stays",
      { { "v=STSv1; id=a", " b" } }, SG_STS_TXT_ID, NULL, 1 },
    { "RFC 8461 3.1: v=STSv1 is case-sensitive (v=stsv1)",
      { { "v=stsv1; id=a" } }, SG_STS_TXT_NO_RECORD, NULL, 0 },
    { "RFC 8461 3.1: V=STSv1 is not a record", { { "V=STSv1; id=a" } },
      SG_STS_TXT_NO_RECORD, NULL, 0 },
    { "RFC 8461 3.1: leading whitespace: not a record",
      { { " v=STSv1; id=a" } }, SG_STS_TXT_NO_RECORD, NULL, 0 },
    { "RFC 8461 3.1: other TXT records are discarded",
      { { "v=spf1 -all" }, { "v=STSv1; id=b" }, { "google-site=x" } }, OK,
      "b", 0 },
    { "RFC 8461 3.1: two STS records: no policy",
      { { "v=STSv1; id=a" }, { "v=spf1 -all" }, { "v=STSv1; id=b" } },
      SG_STS_TXT_MULTIPLE, NULL, 3 },
    { "RFC 8461 3.1: two identical STS records: no policy",
      { { "v=STSv1; id=a" }, { "v=STSv1; id=a" } }, SG_STS_TXT_MULTIPLE,
      NULL, 2 },
    { "RFC 8461 3.1: v=STSv10 next to a good record still counts",
      { { "v=STSv10; id=a" }, { "v=STSv1; id=b" } }, SG_STS_TXT_MULTIPLE,
      NULL, 2 },
    { "RFC 8461 3.1: no TXT record at all", { { NULL } },
      SG_STS_TXT_NO_RECORD, NULL, 0 },
    { "RFC 8461 3.1: the only record is not STS",
      { { "v=TLSRPTv1; rua=mailto:a@example.com" } }, SG_STS_TXT_NO_RECORD,
      NULL, 0 },
    { "RFC 8461 3.1: v=STSv10", { { "v=STSv10; id=a" } },
      SG_STS_TXT_VERSION, NULL, 1 },
    { "RFC 8461 3.1: no delimiter after the version",
      { { "v=STSv1 id=a" } }, SG_STS_TXT_VERSION, NULL, 1 },
    { "RFC 8461 3.1: the error names the record",
      { { "v=spf1 -all" }, { "v=STSv1; id=-" } }, SG_STS_TXT_ID, NULL, 2 },
    { "RFC 8461 3.1: id missing", { { "v=STSv1" } }, SG_STS_TXT_NO_ID, NULL,
      1 },
    { "RFC 8461 3.1: id missing after ;", { { "v=STSv1;" } },
      SG_STS_TXT_NO_ID, NULL, 1 },
    { "RFC 8461 3.1: id missing, an extension only",
      { { "v=STSv1; ext=1" } }, SG_STS_TXT_NO_ID, NULL, 1 },
    { "RFC 8461 3.1: id empty", { { "v=STSv1; id=" } }, SG_STS_TXT_ID, NULL,
      1 },
    { "RFC 8461 3.1: id of 32 characters",
      { { "v=STSv1; id=01234567890123456789012345678901" } }, OK,
      "01234567890123456789012345678901", 0 },
    { "RFC 8461 3.1: id of 33 characters",
      { { "v=STSv1; id=012345678901234567890123456789012" } }, SG_STS_TXT_ID,
      NULL, 1 },
    { "RFC 8461 3.1: id with a hyphen", { { "v=STSv1; id=test-123" } },
      SG_STS_TXT_ID, NULL, 1 },
    { "RFC 8461 3.1: id with a space inside", { { "v=STSv1; id=a b" } },
      SG_STS_TXT_ID, NULL, 1 },
    { "RFC 8461 3.1: id with a space after =", { { "v=STSv1; id= a" } },
      SG_STS_TXT_ID, NULL, 1 },
    { "RFC 8461 3.1: id with a dot", { { "v=STSv1; id=2024.01" } },
      SG_STS_TXT_ID, NULL, 1 },
    { "RFC 8461 3.1: ID= is an extension, not the id",
      { { "v=STSv1; ID=a" } }, SG_STS_TXT_NO_ID, NULL, 1 },
    { "RFC 8461 3.1 (decision): a repeated id: the first wins",
      { { "v=STSv1; id=a; id=b" } }, OK, "a", 0 },
    { "RFC 8461 3.1: a repeated id must still be valid",
      { { "v=STSv1; id=a; id=b-c" } }, SG_STS_TXT_ID, NULL, 1 },
    { "RFC 8461 3.1: unknown fields ignored",
      { { "v=STSv1; id=a; more=a; ext=2" } }, OK, "a", 0 },
    { "RFC 8461 3.1: extension before the id",
      { { "v=STSv1; ext=2; id=c" } }, OK, "c", 0 },
    { "RFC 8461 3.1: extension value empty", { { "v=STSv1; id=a; more=" } },
      SG_STS_TXT_EXT_VALUE, NULL, 1 },
    { "RFC 8461 3.1: extension value with =", { { "v=STSv1; id=a; test==" } },
      SG_STS_TXT_EXT_VALUE, NULL, 1 },
    { "RFC 8461 3.1: extension value with a space",
      { { "v=STSv1; id=a; x=a b" } }, SG_STS_TXT_EXT_VALUE, NULL, 1 },
    { "RFC 8461 3.1: extension value with an 8-bit byte",
      { { "v=STSv1; id=a; x=\xc3\xa9" } }, SG_STS_TXT_EXT_VALUE, NULL, 1 },
    { "RFC 8461 3.1: extension name of 33 characters",
      { { "v=STSv1; id=a; a12345678901234567890123456789012=1" } },
      SG_STS_TXT_EXT_NAME, NULL, 1 },
    { "RFC 8461 3.1: extension name of 32 characters",
      { { "v=STSv1; id=a; a1234567890123456789012345678901=1" } }, OK, "a",
      0 },
    { "RFC 8461 3.1: extension name with %", { { "v=STSv1; id=a; 1%=a" } },
      SG_STS_TXT_EXT_NAME, NULL, 1 },
    { "RFC 8461 3.1: extension name starting with _",
      { { "v=STSv1; id=a; _x=a" } }, SG_STS_TXT_EXT_NAME, NULL, 1 },
    { "RFC 8461 3.1: a field without =", { { "v=STSv1; id=a; junk" } },
      SG_STS_TXT_FIELD, NULL, 1 },
    { "RFC 8461 3.1 (decision): empty field after the id",
      { { "v=STSv1; id=a;;" } }, OK, "a", 0 },
    { "RFC 8461 3.1 (decision): empty field before the id",
      { { "v=STSv1;; ;id=a" } }, OK, "a", 0 },
    { "RFC 8461 3.1 (decision): trailing ; and whitespace",
      { { "v=STSv1; id=a; \t" } }, OK, "a", 0 },
    { "RFC 8461 3.1 (decision): trailing whitespace without ;",
      { { "v=STSv1; id=a \t" } }, OK, "a", 0 },
};


typedef struct {
    const char     *name;
    const char     *pattern;
    const char     *host;
    int             match;
} mx_case_t;


static const mx_case_t  mx_cases[] = {
    { "RFC 8461 4.1: the same name", "mx1.example.com", "mx1.example.com",
      1 },
    { "RFC 8461 4.1: case-insensitive", "mx1.example.com", "MX1.Example.COM",
      1 },
    { "RFC 8461 4.1: case-insensitive pattern", "MX1.EXAMPLE.com",
      "mx1.example.com", 1 },
    { "RFC 8461 4.1: a trailing dot on the MX name ignored",
      "mx1.example.com", "mx1.example.com.", 1 },
    { "RFC 8461 4.1: two trailing dots are not one", "mx1.example.com",
      "mx1.example.com..", 0 },
    { "RFC 8461 4.1: another name", "mx1.example.com", "mx2.example.com",
      0 },
    { "RFC 8461 4.1: a longer name ending the same", "mx1.example.com",
      "xmx1.example.com", 0 },
    { "RFC 8461 4.1: a subdomain of a plain pattern", "mx1.example.com",
      "a.mx1.example.com", 0 },
    { "RFC 8461 4.1: a prefix of the pattern", "mx1.example.com",
      "mx1.example", 0 },
    { "RFC 8461 4.1: wildcard, one extra label", "*.example.com",
      "a.example.com", 1 },
    { "RFC 8461 4.1: wildcard, not the parent", "*.example.com",
      "example.com", 0 },
    { "RFC 8461 4.1: wildcard, not the parent with a dot", "*.example.com",
      "example.com.", 0 },
    { "RFC 8461 4.1: wildcard, not two labels", "*.example.com",
      "a.b.example.com", 0 },
    { "RFC 8461 4.1: wildcard, case-insensitive", "*.Example.com",
      "MX.EXAMPLE.COM", 1 },
    { "RFC 8461 4.1: wildcard, trailing dot on the MX name",
      "*.example.com", "mx.example.com.", 1 },
    { "RFC 8461 4.1: wildcard, an empty label", "*.example.com",
      ".example.com", 0 },
    { "RFC 8461 4.1: wildcard, a label boundary", "*.example.com",
      "aexample.com", 0 },
    { "RFC 8461 4.1: wildcard, a longer last-but-one label",
      "*.example.com", "a.xexample.com", 0 },
    { "RFC 8461 4.1: wildcard, a literal * label is no host",
      "*.example.com", "*.example.com", 0 },
    { "RFC 8461 4.1: wildcard, long labels", "*.l.google.com",
      "alt4.l.google.com", 1 },
    { "RFC 8461 4.1: address literal never matches", "192.0.2.1",
      "[192.0.2.1]", 0 },
    { "RFC 8461 4.1: empty MX name", "mx.example.com", "", 0 },
    { "RFC 8461 4.1: a lone dot", "mx.example.com", ".", 0 },
    { "RFC 8461 4.1: wildcard, a label with a hyphen", "*.example.com",
      "mx-1.example.com", 1 },
    { "RFC 8461 4.1: wildcard, an all-digit label", "*.example.com",
      "123.example.com", 1 },
    { "RFC 8461 4.1: wildcard, a 63-octet label",
      "*.example.com",
      "abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabc"
      ".example.com", 1 },
    { "RFC 8461 4.1: wildcard, an empty label before the suffix",
      "*.example.com", "a..example.com", 0 },
    { "RFC 8461 4.1: wildcard, something after the suffix",
      "*.example.com", "a.example.com.x", 0 },
    { "RFC 8461 4.1: wildcard, the suffix twice", "*.example.com",
      "example.example.com", 1 },
    { "RFC 8461 4.1: wildcard, suffix inside a longer name",
      "*.example.com", "example.com.example.com", 0 },
    { "RFC 8461 4.1: wildcard one level down, not the level above",
      "*.mx.example.com", "mx.example.com", 0 },
    { "RFC 8461 4.1: wildcard one level down, one label", "*.mx.example.com",
      "a.mx.example.com", 1 },
    { "RFC 8461 4.1: a plain pattern is not a wildcard for its subdomain",
      "a.example.com", "b.a.example.com", 0 },
    { "RFC 8461 4.1: the name shortened by one character",
      "mx.example.com", "mx.example.co", 0 },
    { "RFC 8461 4.1: the name lengthened by one character",
      "mx.example.com", "mx.example.comm", 0 },
    { "RFC 8461 4.1: leading space is not ignored", "mx.example.com",
      " mx.example.com", 0 },
    { "RFC 8461 3.2 and 4.1: A-labels compare case-insensitively",
      "xn--bcher-kva.example", "XN--BCHER-KVA.example", 1 },
    { "RFC 8461 3.2 and 4.1: a U-label never matches an A-label pattern",
      "xn--bcher-kva.example", "b\303\274cher.example", 0 },
    { "RFC 8461 4.1: an IPv6 address literal never matches",
      "2001:db8::1", "[IPv6:2001:db8::1]", 0 },
    { "RFC 8461 4.1: an empty pattern matches nothing", "", "a.example", 0 },
    { "RFC 8461 4.1: a wildcard pattern never matches the bare suffix"
      " with a trailing dot and case", "*.Example.COM", "EXAMPLE.com.", 0 },
};


typedef struct {
    const char     *name;
    const char     *value;
    int             ok;
} ct_case_t;


static const ct_case_t  ct_cases[] = {
    { "RFC 8461 3.2: text/plain", "text/plain", 1 },
    { "RFC 8461 3.2: charset parameter", "text/plain; charset=utf-8", 1 },
    { "RFC 8461 3.2: case-insensitive", "TEXT/Plain", 1 },
    { "RFC 8461 3.2: case-insensitive with a parameter",
      "Text/Plain;Charset=UTF-8", 1 },
    { "RFC 8461 3.2: whitespace around the value", " \ttext/plain \t", 1 },
    { "RFC 8461 3.2: whitespace before ;", "text/plain ; charset=us-ascii",
      1 },
    { "RFC 8461 3.2: other parameters ignored", "text/plain; format=flowed",
      1 },
    { "RFC 8461 3.2: text/html refused", "text/html", 0 },
    { "RFC 8461 3.2: text/plainx refused", "text/plainx", 0 },
    { "RFC 8461 3.2: text/plain2 refused", "text/plain2", 0 },
    { "RFC 8461 3.2: empty refused", "", 0 },
    { "RFC 8461 3.2: text/ refused", "text/", 0 },
    { "RFC 8461 3.2: spaces around / refused", "text / plain", 0 },
    { "RFC 8461 3.2: application/octet-stream refused",
      "application/octet-stream", 0 },
    { "RFC 8461 3.2: a list refused", "text/plain, text/html", 0 },
    { "RFC 8461 3.2: a quoted charset", "text/plain; charset=\"utf-8\"", 1 },
    { "RFC 8461 3.2: charset without a space",
      "text/plain;charset=iso-8859-1", 1 },
    { "RFC 8461 3.2: a tab before ;", "text/plain\t;x=y", 1 },
    { "RFC 8461 3.2: several parameters",
      "text/plain; charset=utf-8; format=fixed", 1 },
    { "RFC 8461 3.2: text/plain/extra refused", "text/plain/extra", 0 },
    { "RFC 8461 3.2: textplain refused", "textplain", 0 },
    { "RFC 8461 3.2: text refused", "text", 0 },
    { "RFC 8461 3.2: plain/text refused", "plain/text", 0 },
    { "RFC 8461 3.2: text/x-plain refused", "text/x-plain", 0 },
    { "RFC 8461 3.2: application/json refused", "application/json", 0 },
    { "RFC 8461 3.2: only whitespace refused", " \t ", 0 },
};


/*
 * The corpus verdicts sg does not share, each with its reason; "valid"
 * here means the pure parser accepts the body (or record).
 */

typedef struct {
    const char     *file;
    sg_sts_rc_e     rc;
    const char     *why;
} corpus_override_t;


static const corpus_override_t  overrides[] = {
    { "records/mox-bad-double-semicolon.txt", OK,
      "decision (RFC-NOTES): empty fields are tolerated" },
    { "snawoot-bad-policy6-max-age-over-31557600.txt", OK,
      "decision (RFC-NOTES): max_age above 31557600 is clamped" },
    { "snawoot-bad-policy3-body-ok-but-content-type-text-html.txt", OK,
      "invalid at the HTTP layer: the body is valid, text/html is refused "
      "by sg_sts_content_type_ok()" },
    { "snawoot-bad-policy4-body-ok-but-http-404.txt", OK,
      "invalid at the HTTP layer: the body is valid, status 404 is the "
      "fetch's to refuse (RFC 8461, 3.3)" },
    { "mox-fuzzseed-max-age-trailing-space.txt", OK,
      "unspecified: RFC 8461, 3.2 allows *WSP after a field" },
    { "mox-fuzzseed-extension-trailing-space.txt", OK,
      "unspecified: RFC 8461, 3.2 allows *WSP after a field" },
    { "mox-fuzzseed-extension-value-tab.txt", OK,
      "unspecified: the TAB is trailing *WSP, not part of the value" },
    { "snawoot-overlength-131193-bytes.txt", SG_STS_POL_TOO_LARGE,
      "RFC 8461, 3.3: above 64 KiB" },
};


static char     corpus_buf[CORPUS_FILE_MAX];
static char     name_buf[512];
static char     index_names[128][128];
static size_t   nindex;


static const char *
case_name(const char *what, const char *name)
{
    snprintf(name_buf, sizeof(name_buf), "%s: %s", what, name);
    return name_buf;
}


static void
test_policies(void)
{
    size_t               i, len;
    sg_sts_err_t         err;
    sg_sts_policy_t      p;
    const policy_case_t *c;

    for (i = 0; i < sizeof(policy_cases) / sizeof(policy_cases[0]); i++) {
        c = &policy_cases[i];
        len = c->len ? c->len : strlen(c->body);

        CHECK(sg_sts_policy_parse(c->body, len, &p, &err) == c->rc, c->name);
        CHECK(err.rc == c->rc, c->name);

        if (c->rc != OK) {
            CHECK(c->line == ANY || err.line == c->line, c->name);
            CHECK(err.offset <= len, c->name);
            continue;
        }

        CHECK(err.line == 0, c->name);
        CHECK(p.mode == c->mode, c->name);
        CHECK(p.max_age == c->max_age, c->name);
        CHECK(p.max_age_clamped == (c->max_age == SG_STS_MAX_AGE_MAX
                                    && strstr(c->body, "31557600") == NULL),
              c->name);
        CHECK(p.nmx == c->nmx, c->name);

        if (c->mx0 != NULL) {
            CHECK(p.nmx > 0 && p.mx[0].len == strlen(c->mx0)
                  && memcmp(p.mx[0].data, c->mx0, p.mx[0].len) == 0,
                  c->name);
        }

        /* the patterns point into the body */
        if (p.nmx > 0) {
            CHECK(p.mx[0].data >= c->body
                  && p.mx[p.nmx - 1].data + p.mx[p.nmx - 1].len
                     <= c->body + len, c->name);
        }
    }
}


/* 64 mx lines, and 65; a body of exactly 64 KiB, and one byte more */

static void
test_policy_limits(void)
{
    size_t           i, n;
    sg_sts_err_t     err;
    sg_sts_policy_t  p;

    static char      body[SG_STS_POLICY_MAX + 2];

    n = snprintf(body, sizeof(body), "%s", V1E);

    for (i = 0; i < SG_STS_MX_MAX; i++) {
        n += snprintf(body + n, sizeof(body) - n, "mx: mx%zu.example.com\n",
                      i);
    }

    CHECK(sg_sts_policy_parse(body, n, &p, &err) == OK,
          "RFC 8461 3.2: 64 mx lines");
    CHECK(p.nmx == SG_STS_MX_MAX && sg_sts_policy_match(&p,
          "mx63.example.com", 16), "RFC 8461 3.2: 64 mx lines kept");

    n += snprintf(body + n, sizeof(body) - n, "mx: mx64.example.com\n");

    CHECK(sg_sts_policy_parse(body, n, &p, &err) == SG_STS_POL_MX_TOO_MANY
          && err.line == 4 + SG_STS_MX_MAX,
          "RFC 8461 3.2: 65 mx lines: an error naming the 65th");

    n = snprintf(body, sizeof(body), "%s", V1N);

    /* lines of 1000 bytes, then one line up to exactly 64 KiB */
    while (SG_STS_POLICY_MAX - n > 2000) {
        n += snprintf(body + n, sizeof(body) - n, "x: %0996d\n", 0);
    }

    i = SG_STS_POLICY_MAX - n;
    memcpy(body + n, "x: ", 3);
    memset(body + n + 3, 'a', i - 4);
    body[n + i - 1] = '\n';
    n += i;

    CHECK(n == SG_STS_POLICY_MAX
          && sg_sts_policy_parse(body, n, &p, &err) == OK,
          "RFC 8461 3.3: a body of 64 KiB is accepted");

    body[n++] = '\n';

    CHECK(sg_sts_policy_parse(body, n, &p, &err) == SG_STS_POL_TOO_LARGE,
          "RFC 8461 3.3: a body above 64 KiB is refused");

    CHECK(sg_sts_policy_parse(V1N, strlen(V1N), &p, NULL) == OK,
          "err may be NULL");
}


static void
test_txt(void)
{
    size_t               i, j, k, nrec, nstr[4];
    sg_sts_err_t         err;
    sg_sts_str_t         strs[4][4];
    sg_sts_txt_t         recs[4];
    sg_sts_txt_result_t  res;
    const txt_case_t    *c;

    for (i = 0; i < sizeof(txt_cases) / sizeof(txt_cases[0]); i++) {
        c = &txt_cases[i];
        nrec = 0;

        for (j = 0; j < 4 && c->rec[j][0] != NULL; j++) {
            for (k = 0; k < 4 && c->rec[j][k] != NULL; k++) {
                strs[j][k].data = c->rec[j][k];
                strs[j][k].len = strlen(c->rec[j][k]);
            }

            nstr[j] = k;
            recs[j].strings = strs[j];
            recs[j].nstrings = nstr[j];
            nrec++;
        }

        CHECK(sg_sts_txt_parse(recs, nrec, &res, &err) == c->rc, c->name);
        CHECK(err.rc == c->rc, c->name);

        if (c->rc != OK) {
            CHECK(err.line == c->line, c->name);
            CHECK(res.id_len == 0 && res.id[0] == '\0', c->name);
            continue;
        }

        CHECK(err.line == 0, c->name);
        CHECK(res.id_len == strlen(c->id) && strcmp(res.id, c->id) == 0,
              c->name);
        CHECK(res.record < nrec, c->name);
    }
}


static void
test_mx(void)
{
    size_t           i;
    sg_sts_err_t     err;
    sg_sts_policy_t  p;
    const mx_case_t *c;

    static const char  gmail[] =
        "version: STSv1\nmode: enforce\nmx: gmail-smtp-in.l.google.com\n"
        "mx: *.gmail-smtp-in.l.google.com\nmax_age: 86400\n";

    for (i = 0; i < sizeof(mx_cases) / sizeof(mx_cases[0]); i++) {
        c = &mx_cases[i];
        CHECK(sg_sts_mx_match(c->pattern, strlen(c->pattern), c->host,
                              strlen(c->host)) == c->match, c->name);
    }

    CHECK(sg_sts_policy_parse(gmail, sizeof(gmail) - 1, &p, &err) == OK,
          "RFC 8461 4.1: the gmail.com policy");
    CHECK(sg_sts_policy_match(&p, "gmail-smtp-in.l.google.com.", 27),
          "RFC 8461 4.1: policy: the plain pattern");
    CHECK(sg_sts_policy_match(&p, "alt1.gmail-smtp-in.l.google.com", 31),
          "RFC 8461 4.1: policy: the wildcard pattern");
    CHECK(!sg_sts_policy_match(&p, "l.google.com", 12),
          "RFC 8461 4.1: policy: never the parent");
    CHECK(!sg_sts_policy_match(&p, "a.alt1.gmail-smtp-in.l.google.com", 33),
          "RFC 8461 4.1: policy: never two labels");

    p.nmx = 0;
    CHECK(!sg_sts_policy_match(&p, "gmail-smtp-in.l.google.com", 26),
          "RFC 8461 4.1: no mx, no match");
}


static void
test_content_type(void)
{
    size_t  i;

    for (i = 0; i < sizeof(ct_cases) / sizeof(ct_cases[0]); i++) {
        CHECK(sg_sts_content_type_ok(ct_cases[i].value,
                                     strlen(ct_cases[i].value))
              == ct_cases[i].ok, ct_cases[i].name);
    }
}


static void
test_strerror(void)
{
    int  rc;

    for (rc = 0; rc < SG_STS_RC_LAST; rc++) {
        CHECK(sg_sts_strerror((sg_sts_rc_e) rc) != NULL
              && sg_sts_strerror((sg_sts_rc_e) rc)[0] != '\0',
              "every error has a message");
    }

    CHECK(strcmp(sg_sts_strerror(SG_STS_RC_LAST), "unknown error") == 0,
          "unknown error code");
}


static size_t
read_file(const char *dir, const char *file)
{
    FILE    *f;
    char     path[1024];
    size_t   n;

    snprintf(path, sizeof(path), "%s/mta-sts/%s", dir, file);

    f = fopen(path, "rb");
    if (f == NULL) {
        printf("corpus: cannot open %s\n", path);
        return (size_t) -1;
    }

    n = fread(corpus_buf, 1, sizeof(corpus_buf), f);
    fclose(f);

    return n;
}


static const corpus_override_t *
find_override(const char *file)
{
    size_t  i;

    for (i = 0; i < sizeof(overrides) / sizeof(overrides[0]); i++) {
        if (strcmp(overrides[i].file, file) == 0) {
            return &overrides[i];
        }
    }

    return NULL;
}


static void
test_corpus_file(const char *dir, const char *file, const char *kind,
    const char *expected)
{
    int                       want_ok;
    size_t                    n;
    sg_sts_rc_e               rc;
    sg_sts_err_t              err;
    sg_sts_str_t              s;
    sg_sts_txt_t              rec;
    sg_sts_policy_t           p;
    sg_sts_txt_result_t       res;
    const corpus_override_t  *o;

    n = read_file(dir, file);
    CHECK(n != (size_t) -1 && n < sizeof(corpus_buf),
          case_name("corpus: readable", file));

    if (n == (size_t) -1 || n >= sizeof(corpus_buf)) {
        return;
    }

    want_ok = (strncmp(expected, "valid", 5) == 0);
    o = find_override(file);

    CHECK(want_ok || strncmp(expected, "invalid", 7) == 0
          || (strcmp(expected, "unspecified") == 0 && o != NULL),
          case_name("corpus: known verdict", file));

    if (strcmp(kind, "policy") == 0) {
        rc = sg_sts_policy_parse(corpus_buf, n, &p, &err);

        if (o != NULL) {
            CHECK(rc == o->rc, case_name(o->why, file));

        } else if (want_ok) {
            CHECK(rc == OK, case_name("corpus: RFC 8461 3.2: valid", file));

        } else {
            CHECK(rc != OK, case_name("corpus: RFC 8461 3.2: invalid", file));
        }

        if (rc == OK && strstr(expected, "mode none") != NULL) {
            CHECK(p.mode == NON, case_name("corpus: mode none", file));
        }

        if (rc == OK && strstr(expected, "mode testing") != NULL) {
            CHECK(p.mode == TST, case_name("corpus: mode testing", file));
        }

        if (strstr(file, "content-type-text-html") != NULL) {
            CHECK(!sg_sts_content_type_ok("text/html", 9),
                  case_name("corpus: RFC 8461 3.2: text/html", file));
        }

        return;
    }

    /* one record per file; a final newline is the file's, not DNS's */
    if (n > 0 && corpus_buf[n - 1] == '\n') {
        n--;
    }

    if (n > 0 && corpus_buf[n - 1] == '\r') {
        n--;
    }

    s.data = corpus_buf;
    s.len = n;
    rec.strings = &s;
    rec.nstrings = 1;

    rc = sg_sts_txt_parse(&rec, 1, &res, &err);

    if (strcmp(kind, "tlsrpt-record") == 0) {
        /* its verdict is the TLSRPT parser's: not an MTA-STS record */
        CHECK(rc == SG_STS_TXT_NO_RECORD,
              case_name("corpus: RFC 8461 3.1: not an STS record", file));
        return;
    }

    CHECK(strcmp(kind, "sts-record") == 0,
          case_name("corpus: known kind", file));

    if (o != NULL) {
        CHECK(rc == o->rc, case_name(o->why, file));

    } else if (want_ok) {
        CHECK(rc == OK, case_name("corpus: RFC 8461 3.1: valid", file));

    } else {
        CHECK(rc != OK, case_name("corpus: RFC 8461 3.1: invalid", file));
    }

    if (strstr(file, "gmail.com") != NULL) {
        CHECK(strcmp(res.id, "20190429T010101") == 0,
              case_name("corpus: RFC 8461 3.1: id", file));
    }
}


static int
in_index(const char *file)
{
    size_t  i;

    for (i = 0; i < nindex; i++) {
        if (strcmp(index_names[i], file) == 0) {
            return 1;
        }
    }

    return 0;
}


/* every .txt file of the corpus is in index.tsv */

static void
test_corpus_listed(const char *dir, const char *sub)
{
    DIR            *d;
    char            path[1024], file[300];
    size_t          len;
    struct dirent  *e;

    snprintf(path, sizeof(path), "%s/mta-sts%s%s", dir, *sub ? "/" : "",
             sub);

    d = opendir(path);
    CHECK(d != NULL, case_name("corpus: directory", path));

    if (d == NULL) {
        return;
    }

    while ((e = readdir(d)) != NULL) {
        len = strlen(e->d_name);

        if (len < 4 || strcmp(e->d_name + len - 4, ".txt") != 0) {
            continue;
        }

        snprintf(file, sizeof(file), "%s%s%s", sub, *sub ? "/" : "",
                 e->d_name);
        CHECK(in_index(file), case_name("corpus: listed in index.tsv", file));
    }

    closedir(d);
}


static void
test_corpus(const char *dir)
{
    char    *line, *next, *col[4], *t;
    size_t   n, i, files;
    char     index[64 * 1024];

    n = read_file(dir, "index.tsv");
    CHECK(n != (size_t) -1 && n < sizeof(index),
          "corpus: mta-sts/index.tsv readable");

    if (n == (size_t) -1 || n >= sizeof(index)) {
        return;
    }

    memcpy(index, corpus_buf, n);
    index[n] = '\0';

    files = 0;

    for (line = index; line != NULL && *line != '\0'; line = next) {
        next = strchr(line, '\n');

        if (next != NULL) {
            *next++ = '\0';
        }

        if (line == index) {
            /* file, kind, expected, verdict_as_stated_in_source, ... */
            CHECK(strncmp(line, "file\tkind\texpected\t", 19) == 0,
                  "corpus: index.tsv columns");
            continue;
        }

        t = line;

        for (i = 0; i < 4; i++) {
            col[i] = t;
            t = (t != NULL) ? strchr(t, '\t') : NULL;

            if (t != NULL) {
                *t++ = '\0';
            }
        }

        if (col[2] == NULL || col[3] == NULL) {
            CHECK(0, case_name("corpus: index.tsv line", line));
            continue;
        }

        if (nindex < sizeof(index_names) / sizeof(index_names[0])) {
            snprintf(index_names[nindex++], sizeof(index_names[0]), "%s",
                     col[0]);
        }

        test_corpus_file(dir, col[0], col[1], col[2]);
        files++;
    }

    CHECK(files >= 70, "corpus: index.tsv lists the corpus");

    test_corpus_listed(dir, "");
    test_corpus_listed(dir, "records");

    printf("corpus: %zu files of %s/mta-sts\n", files, dir);
}


static const char *
corpus_dir(int argc, char **argv)
{
    FILE         *f;
    char          path[1024];
    size_t        i;
    const char   *env;

    static const char  *tries[] = {
        "../../../shared/corpus",       /* from tests/unit, as make runs */
        "../shared/corpus",             /* from the clone's top */
        "../../shared/corpus"           /* from tests/ */
    };

    if (argc > 1) {
        return argv[1];
    }

    env = getenv("SG_CORPUS");
    if (env != NULL && env[0] != '\0') {
        return env;
    }

    for (i = 0; i < sizeof(tries) / sizeof(tries[0]); i++) {
        snprintf(path, sizeof(path), "%s/mta-sts/index.tsv", tries[i]);

        f = fopen(path, "rb");
        if (f != NULL) {
            fclose(f);
            return tries[i];
        }
    }

    return tries[0];
}


int
main(int argc, char **argv)
{
    test_policies();
    test_policy_limits();
    test_txt();
    test_mx();
    test_content_type();
    test_strerror();

    printf("mta-sts: %zu policy, %zu TXT, %zu MX, %zu Content-Type cases\n",
           sizeof(policy_cases) / sizeof(policy_cases[0]),
           sizeof(txt_cases) / sizeof(txt_cases[0]),
           sizeof(mx_cases) / sizeof(mx_cases[0]),
           sizeof(ct_cases) / sizeof(ct_cases[0]));

    test_corpus(corpus_dir(argc, argv));

    return SG_TEST_DONE();
}
