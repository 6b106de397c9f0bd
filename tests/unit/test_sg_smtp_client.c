
/*
 * Unit tests for common/sg_smtp_client.c.  Every case names the RFC
 * section it checks (RFC 5321 unless another RFC is named).  The EHLO
 * parser also reads the providers' real replies in the corpus (SG_CORPUS,
 * default ../../../shared/corpus), in place.
 *
 * In a reply or message, "{N:c}" stands for N copies of the character c,
 * so that limits can be tested at and just beyond them.
 */


#include <stdlib.h>
#include <string.h>

#include "sg_test.h"
#include "sg_smtp_client.h"
#include "sg_smtp_data.h"


/* "{N:c}" expansion, into a buffer the caller frees */

static char *
expand(const char *s, size_t len, size_t *out_len)
{
    char        *out, *end;
    size_t       n, i, cap;
    const char  *p, *q;

    cap = len + 1;

    for (p = s; p < s + len; p++) {
        if (*p == '{') {
            cap += strtoul(p + 1, NULL, 10);
        }
    }

    out = malloc(cap);
    if (out == NULL) {
        abort();
    }

    end = out;

    for (p = s; p < s + len; p++) {
        q = (*p == '{') ? memchr(p, '}', (size_t) (s + len - p)) : NULL;

        if (q == NULL || q - p < 4 || p[q - p - 2] != ':') {
            *end++ = *p;
            continue;
        }

        n = strtoul(p + 1, NULL, 10);

        for (i = 0; i < n; i++) {
            *end++ = q[-1];
        }

        p = q;
    }

    *out_len = (size_t) (end - out);

    return out;
}


/* reply parser cases */

typedef struct {
    const char         *name;
    const char         *in;
    size_t              len;
    sg_smtp_reply_rc_e  rc;
    unsigned            code;
    const char         *status;      /* NULL: "" */
    const char         *text;        /* NULL: not checked */
    unsigned            lines;       /* 0: not checked */
    int                 rest;        /* octets left after DONE */
    const char         *error;       /* NULL: not checked */
} reply_case_t;


#define L(s)  .in = (s), .len = sizeof(s) - 1

#define DONE  .rc = SG_SMTP_REPLY_DONE
#define AGAIN .rc = SG_SMTP_REPLY_AGAIN
#define ERR   .rc = SG_SMTP_REPLY_ERROR


static const reply_case_t  reply_cases[] = {

    /* 4.2: Reply-line */

    { "4.2 single line", L("250 OK\r\n"), DONE, 250, .text = "250 OK",
      .lines = 1 },
    { "4.2 greeting", L("220 mx.example.com ESMTP ready\r\n"), DONE, 220,
      .text = "220 mx.example.com ESMTP ready" },
    { "4.2 last line without text", L("250\r\n"), DONE, 250,
      .text = "250" },
    { "4.2 last line with SP only", L("250 \r\n"), DONE, 250,
      .text = "250 " },
    { "4.2 multiline", L("250-mx.example.com\r\n250-PIPELINING\r\n"
                         "250 SIZE 1000\r\n"), DONE, 250,
      .text = "250-mx.example.com / 250-PIPELINING / 250 SIZE 1000",
      .lines = 3 },
    { "4.2 continuation without text", L("250-\r\n250 ok\r\n"), DONE, 250,
      .lines = 2 },
    { "4.2 incomplete line", L("250 OK"), AGAIN },
    { "4.2 multiline, last line missing", L("250-a\r\n250-b\r\n"), AGAIN },
    { "2.3.8 bare LF tolerated", L("250-a\n250 b\n"), DONE, 250,
      .text = "250-a / 250 b" },
    { "RFC 2920, 3.1 pipelined replies: one at a time",
      L("250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n"), DONE, 250,
      "2.1.0", .rest = 22 },

    /* 4.2.1: codes */

    { "4.2.1 421", L("421 4.3.2 shutting down\r\n"), DONE, 421, "4.3.2" },
    { "4.2.1 554", L("554 no\r\n"), DONE, 554 },
    { "4.2.1 599 highest", L("599 x\r\n"), DONE, 599 },
    { "4.2.1 200 lowest", L("200 x\r\n"), DONE, 200 },
    { "4.2.1 1yz refused", L("199 x\r\n"), ERR,
      .error = "reply code out of range" },
    { "4.2.1 6yz refused", L("600 x\r\n"), ERR },
    { "4.2.1 000 refused", L("000 x\r\n"), ERR },
    { "4.2 non-digit code", L("25O OK\r\n"), ERR,
      .error = "malformed reply code" },
    { "4.2 two-digit code", L("25 OK\r\n"), ERR },
    { "4.2 empty line", L("\r\n"), ERR },
    { "4.2 text glued to the code", L("250OK\r\n"), ERR,
      .error = "malformed reply line" },
    { "4.2 tab after the code", L("250\tOK\r\n"), ERR },
    { "4.2 leading space", L(" 250 OK\r\n"), ERR },
    { "4.2.1 code changes within a reply", L("250-a\r\n251 b\r\n"), ERR,
      .error = "reply code changes within a multiline reply" },
    { "4.2.1 class changes within a reply", L("250-a\r\n550 b\r\n"), ERR },

    /* RFC 3463, 2 and RFC 2034, 4: enhanced status codes */

    { "RFC 3463, 2 x.y.z", L("550 5.1.1 no such user\r\n"), DONE, 550,
      "5.1.1", .text = "550 5.1.1 no such user" },
    { "RFC 3463, 2 three-digit parts", L("550 5.123.456 x\r\n"), DONE, 550,
      "5.123.456" },
    { "RFC 3463, 2 status alone", L("250 2.0.0\r\n"), DONE, 250, "2.0.0" },
    { "RFC 8689, 5 5.7.30", L("550 5.7.30 REQUIRETLS needed\r\n"), DONE,
      550, "5.7.30" },
    { "RFC 3463, 2 four-digit part is text", L("550 5.1234.1 x\r\n"), DONE,
      550, NULL },
    { "RFC 3463, 2 two parts is text", L("550 5.1 x\r\n"), DONE, 550,
      NULL },
    { "RFC 3463, 2 four parts is text", L("550 5.1.1.1 x\r\n"), DONE, 550,
      NULL },
    { "RFC 3463, 2 no SP after it is text", L("550 5.1.1x\r\n"), DONE, 550,
      NULL },
    { "RFC 3463, 3.1 class differs from the code", L("550 4.1.1 x\r\n"),
      DONE, 550, NULL },
    { "RFC 3463, 2 class 3 does not exist", L("354 3.0.0 go\r\n"), DONE,
      354, NULL },
    { "RFC 3463, 2 empty part", L("250 2..0 x\r\n"), DONE, 250, NULL },
    { "RFC 2034, 4 status from the first line",
      L("550-5.1.1 first\r\n550 5.1.2 second\r\n"), DONE, 550, "5.1.1",
      .text = "550-5.1.1 first / 550 5.1.2 second" },
    { "RFC 2034, 4 no status without ENHANCEDSTATUSCODES",
      L("250 Ok\r\n"), DONE, 250, NULL },

    /* 4.5.3.1.5 and the parser's limits */

    { "4.5.3.1.5 512-octet line", L("250 {506:x}\r\n"), DONE, 250 },
    { "4.5.3.1.5 lenient: 2048 octets with CRLF", L("250 {2042:x}\r\n"),
      DONE, 250 },
    { "4.5.3.1.5 lenient limit: 2049 octets", L("250 {2043:x}\r\n"), ERR,
      .error = "reply line too long" },
    { "4.5.3.1.5 over the limit without LF", L("250 {3000:x}"), ERR },
    { "4.2 100 lines", L("{99:L}250 end\r\n"), DONE, 250, .lines = 100 },
    { "4.2 101 lines", L("{100:L}250 end\r\n"), ERR,
      .error = "too many reply lines" },

    /* what is kept for people */

    { "control characters kept as '?'", L("550 a\tb\rc\0d\r\n"), DONE, 550,
      .text = "550 a?b?c?d" },
    { "UTF-8 kept (RFC 6531, 3.7.4)", L("550 \xc3\xa4\r\n"), DONE, 550,
      .text = "550 \xc3\xa4" },
};


/* "{N:L}" stands for N lines "250-x\r\n" in the reply cases */

static char *
expand_reply(const char *s, size_t len, size_t *out_len)
{
    char        *out, *p;
    size_t       n, i;
    const char  *q;

    if (len > 4 && s[0] == '{' && (q = strstr(s, ":L}")) != NULL) {
        n = strtoul(s + 1, NULL, 10);
        q += 3;

        out = malloc(n * 7 + len);
        if (out == NULL) {
            abort();
        }

        p = out;

        for (i = 0; i < n; i++) {
            memcpy(p, "250-x\r\n", 7);
            p += 7;
        }

        memcpy(p, q, (size_t) (s + len - q));
        p += s + len - q;
        *out_len = (size_t) (p - out);

        return out;
    }

    return expand(s, len, out_len);
}


typedef struct {
    unsigned            n;
    char                first[64];
} line_log_t;


static void
line_logger(void *data, unsigned index, const char *text, size_t len)
{
    line_log_t  *log = data;

    if (index != log->n) {
        log->n = 1000;
        return;
    }

    if (index == 0) {
        if (len >= sizeof(log->first)) {
            len = sizeof(log->first) - 1;
        }

        memcpy(log->first, text, len);
        log->first[len] = '\0';
    }

    log->n++;
}


static int
run_reply_case(const reply_case_t *c)
{
    int                 ok;
    char               *in;
    size_t              len, used, i, total, step;
    line_log_t          log;
    sg_smtp_reply_t     r, r2;
    sg_smtp_reply_rc_e  rc;

    in = expand_reply(c->in, c->len, &len);

    memset(&log, 0, sizeof(log));
    sg_smtp_reply_init(&r, line_logger, &log);

    rc = sg_smtp_reply_parse(&r, (unsigned char *) in, len, &used);

    ok = (rc == c->rc);

    if (ok && rc == SG_SMTP_REPLY_DONE) {
        ok = r.code == c->code
             && strcmp(r.status, c->status ? c->status : "") == 0
             && (c->text == NULL || strcmp(r.text, c->text) == 0)
             && (c->lines == 0 || r.lines == c->lines)
             && used + (size_t) c->rest == len
             && log.n == r.lines
             && strlen(r.text) == r.text_len;
    }

    if (ok && rc == SG_SMTP_REPLY_AGAIN) {
        ok = (used == len);
    }

    if (ok && rc == SG_SMTP_REPLY_ERROR) {
        ok = r.error != NULL
             && (c->error == NULL || strcmp(r.error, c->error) == 0);
    }

    /* fed in pieces of every size, the result is the same */

    for (step = 1; ok && step <= 7; step++) {
        sg_smtp_reply_init(&r2, NULL, NULL);
        total = 0;
        rc = SG_SMTP_REPLY_AGAIN;

        for (i = 0; i < len && rc == SG_SMTP_REPLY_AGAIN; i += step) {
            rc = sg_smtp_reply_parse(&r2, (unsigned char *) in + i,
                                     (len - i < step) ? len - i : step,
                                     &used);
            total += used;
        }

        ok = (rc == c->rc);

        if (ok && rc == SG_SMTP_REPLY_DONE) {
            ok = r2.code == r.code && strcmp(r2.text, r.text) == 0
                 && strcmp(r2.status, r.status) == 0
                 && total + (size_t) c->rest == len;
        }
    }

    if (!ok) {
        printf("  reply case \"%s\": rc %d code %u status \"%s\" text"
               " \"%.80s\" error %s\n", c->name, (int) rc, r.code,
               r.status, r.text, r.error ? r.error : "-");
    }

    free(in);

    return ok;
}


static void
test_reply_misc(void)
{
    char              *in;
    size_t             len, used;
    sg_smtp_reply_t    r;

    /* the text is cut at SG_SMTP_REPLY_TEXT_MAX, still NUL-terminated */
    in = expand("250-{600:a}\r\n250 {600:b}\r\n", 26, &len);
    sg_smtp_reply_init(&r, NULL, NULL);
    CHECK(sg_smtp_reply_parse(&r, (unsigned char *) in, len, &used)
          == SG_SMTP_REPLY_DONE && r.truncated
          && r.text_len == SG_SMTP_REPLY_TEXT_MAX - 1
          && strlen(r.text) == r.text_len && used == len,
          "4.5.3.1.5 long reply: text truncated, reply complete");
    free(in);

    /* init resets for the next reply */
    sg_smtp_reply_init(&r, NULL, NULL);
    CHECK(sg_smtp_reply_parse(&r, (unsigned char *) "451-a\r\n", 7, &used)
          == SG_SMTP_REPLY_AGAIN, "4.2 first line of two");
    sg_smtp_reply_init(&r, NULL, NULL);
    CHECK(sg_smtp_reply_parse(&r, (unsigned char *) "250 b\r\n", 7, &used)
          == SG_SMTP_REPLY_DONE && r.code == 250 && r.lines == 1
          && strcmp(r.text, "250 b") == 0, "4.2 init starts over");
}


/* EHLO */

typedef struct {
    const char         *name;
    const char         *in;
    size_t              len;
    unsigned            code;
    unsigned            exts;
    uint64_t            size;
} ehlo_case_t;


#define X_STLS   SG_SMTP_EXT_STARTTLS
#define X_PIPE   SG_SMTP_EXT_PIPELINING
#define X_SIZE   SG_SMTP_EXT_SIZE
#define X_8BIT   SG_SMTP_EXT_8BITMIME
#define X_UTF8   SG_SMTP_EXT_SMTPUTF8
#define X_DSN    SG_SMTP_EXT_DSN
#define X_RTLS   SG_SMTP_EXT_REQUIRETLS
#define X_ESC    SG_SMTP_EXT_ENHANCEDSTATUSCODES
#define X_CHUNK  SG_SMTP_EXT_CHUNKING


static const ehlo_case_t  ehlo_cases[] = {
    { "4.1.1.1 greeting only", L("250 mx.example.com\r\n"), 250, 0, 0 },
    { "4.1.1.1 the greeting line is not a keyword",
      L("250-STARTTLS\r\n250 8BITMIME\r\n"), 250, X_8BIT, 0 },
    { "4.1.1.1 every keyword",
      L("250-mx\r\n250-STARTTLS\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
        "250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-REQUIRETLS\r\n"
        "250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"), 250,
      X_STLS | X_PIPE | X_SIZE | X_8BIT | X_UTF8 | X_DSN | X_RTLS | X_ESC
      | X_CHUNK, 1000 },
    { "2.4 keywords are case-insensitive",
      L("250-mx\r\n250-starttls\r\n250-Pipelining\r\n250 size 5\r\n"), 250,
      X_STLS | X_PIPE | X_SIZE, 5 },
    { "4.1.1.1 keyword must match whole",
      L("250-mx\r\n250-STARTTLSX\r\n250-XSIZE 1\r\n250-DSNX\r\n"
        "250 PIPELINING-X\r\n"), 250, 0, 0 },
    { "4.1.1.1 unknown keywords and params ignored",
      L("250-mx\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN\r\n"
        "250-XFORWARD NAME ADDR\r\n250 DSN\r\n"), 250, X_DSN, 0 },
    { "RFC 1870, 4 SIZE without number", L("250-mx\r\n250 SIZE\r\n"), 250,
      X_SIZE, 0 },
    { "RFC 1870, 4 SIZE 0 is no limit", L("250-mx\r\n250 SIZE 0\r\n"), 250,
      X_SIZE, 0 },
    { "RFC 1870, 4 SIZE not a number", L("250-mx\r\n250 SIZE 10M\r\n"), 250,
      X_SIZE, 0 },
    { "RFC 1870, 4 SIZE trailing space", L("250-mx\r\n250 SIZE 42 \r\n"),
      250, X_SIZE, 42 },
    { "RFC 1870, 4 SIZE huge is no limit",
      L("250-mx\r\n250 SIZE 99999999999999999999999\r\n"), 250, X_SIZE,
      0 },
    { "RFC 1870, 4 SIZE 18 digits",
      L("250-mx\r\n250 SIZE 999999999999999999\r\n"), 250, X_SIZE,
      999999999999999999ULL },
    { "RFC 3207, 4 EHLO refused: no capabilities",
      L("502 5.5.2 command not recognized\r\n"), 502, 0, 0 },
    { "4.1.1.1 malformed EHLO reply", L("250-mx\r\n250STARTTLS\r\n"), 0, 0,
      0 },
};


static int
run_ehlo_case(const ehlo_case_t *c)
{
    unsigned        code;
    sg_smtp_ehlo_t  e;

    code = sg_smtp_ehlo_parse(c->in, c->len, &e);

    if (code != c->code || e.exts != c->exts || e.size != c->size) {
        printf("  ehlo case \"%s\": code %u exts 0x%x size %llu\n", c->name,
               code, e.exts, (unsigned long long) e.size);
        return 0;
    }

    return 1;
}


/* the corpus */

static char *
corpus_read(const char *file, size_t *len)
{
    char        path[1024], *buf;
    long        n;
    FILE       *fp;
    const char  *dir;

    dir = getenv("SG_CORPUS");
    if (dir == NULL || dir[0] == '\0') {
        dir = "../../../shared/corpus";
    }

    snprintf(path, sizeof(path), "%s/ehlo/%s", dir, file);

    fp = fopen(path, "rb");
    if (fp == NULL) {
        printf("corpus: cannot open %s (set SG_CORPUS)\n", path);
        return NULL;
    }

    if (fseek(fp, 0, SEEK_END) != 0 || (n = ftell(fp)) < 0
        || fseek(fp, 0, SEEK_SET) != 0)
    {
        fclose(fp);
        return NULL;
    }

    buf = malloc((size_t) n * 2 + 1);
    if (buf == NULL) {
        abort();
    }

    if (fread(buf, 1, (size_t) n, fp) != (size_t) n) {
        fclose(fp);
        free(buf);
        return NULL;
    }

    fclose(fp);

    buf[n] = '\0';
    *len = (size_t) n;

    return buf;
}


/* the same text with CRLF line ends, as it was on the wire */

static char *
crlf(const char *s, size_t len, size_t *out_len)
{
    char    *out;
    size_t   i, o;

    out = malloc(len * 2 + 1);
    if (out == NULL) {
        abort();
    }

    for (i = 0, o = 0; i < len; i++) {
        if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r')) {
            out[o++] = '\r';
        }

        out[o++] = s[i];
    }

    *out_len = o;

    return out;
}


typedef struct {
    const char         *file;
    unsigned            code;
    unsigned            exts;
    uint64_t            size;
} corpus_case_t;


static const corpus_case_t  corpus_cases[] = {
    { "aol-yahoo_mx-aol.mail.gm0.yahoodns.net.ehlo.txt", 250,
      X_PIPE | X_SIZE | X_8BIT | X_STLS, 41943040 },
    { "att_al-ip4-mx-vip1.prodigy.net.ehlo.txt", 250, X_ESC, 0 },
    { "comcast_mx1.mxge.comcast.net.ehlo.txt", 250,
      X_SIZE | X_ESC | X_8BIT | X_STLS, 36700160 },
    { "gmail_gmail-smtp-in.l.google.com.ehlo.txt", 250,
      X_SIZE | X_8BIT | X_STLS | X_ESC | X_PIPE | X_CHUNK | X_UTF8,
      157286400 },
    { "outlook-hotmail_outlook-com.olc.protection.outlook.com.ehlo.txt", 250,
      X_SIZE | X_PIPE | X_DSN | X_ESC | X_STLS | X_8BIT | X_CHUNK | X_UTF8,
      49283072 },
    { "postfix_mx22.example.com-with-auth-xforward.ehlo.txt", 250,
      X_PIPE | X_SIZE | X_STLS | X_ESC | X_8BIT | X_DSN | X_CHUNK,
      33554432 },
    { "aol-yahoo_mx-aol.mail.gm0.yahoodns.net.banner.txt", 220, 0, 0 },
    { "att_al-ip4-mx-vip1.prodigy.net.banner.txt", 220, 0, 0 },
    { "comcast_mx1.mxge.comcast.net.banner.txt", 220, 0, 0 },
    { "gmail_gmail-smtp-in.l.google.com.banner.txt", 220, 0, 0 },
    { "outlook-hotmail_outlook-com.olc.protection.outlook.com.banner.txt",
      220, 0, 0 },
};


static void
test_corpus(void)
{
    char            *buf, *wire, name[256];
    size_t           i, len, wlen;
    unsigned         code;
    sg_smtp_ehlo_t   e;

    for (i = 0; i < sizeof(corpus_cases) / sizeof(corpus_cases[0]); i++) {
        snprintf(name, sizeof(name), "corpus %s", corpus_cases[i].file);

        buf = corpus_read(corpus_cases[i].file, &len);
        CHECK(buf != NULL, name);

        if (buf == NULL) {
            continue;
        }

        /* the files have LF line ends (2.3.8: tolerated) */
        code = sg_smtp_ehlo_parse(buf, len, &e);
        CHECK(code == corpus_cases[i].code && e.exts == corpus_cases[i].exts
              && e.size == corpus_cases[i].size, name);

        /* and as on the wire, with CRLF */
        wire = crlf(buf, len, &wlen);
        code = sg_smtp_ehlo_parse(wire, wlen, &e);
        CHECK(code == corpus_cases[i].code && e.exts == corpus_cases[i].exts
              && e.size == corpus_cases[i].size, name);

        free(wire);
        free(buf);
    }
}


/*
 * The telnet transcript: the replies of five sessions (greeting, EHLO,
 * MAIL), their lines in a row as one pipelined stream (RFC 2920, 3.1:
 * replies come back in order, each one complete).
 */

static void
test_corpus_transcript(void)
{
    char             *buf, *wire, *p, *eol, *end;
    size_t            len, wlen, used, n;
    unsigned          k;
    sg_smtp_ehlo_t    e;
    sg_smtp_reply_t   r;

    static const unsigned    codes[] = {
        220, 250, 250,  220, 250, 553,  220, 250, 250,
        220, 250, 250,  220, 250, 250
    };
    static const char *const statuses[] = {
        "", "", "",  "", "", "5.3.0",  "", "", "2.1.0",
        "", "", "2.1.0",  "", "", "2.1.0"
    };
    static const unsigned    exts[] = {
        X_PIPE | X_SIZE | X_8BIT | X_STLS,
        X_ESC,
        X_SIZE | X_ESC | X_8BIT | X_STLS,
        X_SIZE | X_8BIT | X_STLS | X_ESC | X_PIPE | X_CHUNK | X_UTF8,
        X_SIZE | X_PIPE | X_DSN | X_ESC | X_STLS | X_8BIT | X_CHUNK | X_UTF8
    };

    buf = corpus_read("tchbnl-telcheck-transcript-2025-03-09.txt", &len);
    CHECK(buf != NULL, "corpus transcript");

    if (buf == NULL) {
        return;
    }

    /* keep the server's lines: those that start with a digit */

    wire = malloc(len * 2 + 1);
    if (wire == NULL) {
        abort();
    }

    wlen = 0;
    end = buf + len;

    for (p = buf; p < end; p = eol + 1) {
        eol = memchr(p, '\n', (size_t) (end - p));
        if (eol == NULL) {
            eol = end;
        }

        if (p[0] >= '0' && p[0] <= '9') {
            memcpy(wire + wlen, p, (size_t) (eol - p));
            wlen += eol - p;
            wire[wlen++] = '\r';
            wire[wlen++] = '\n';
        }

        if (eol == end) {
            break;
        }
    }

    p = wire;
    n = wlen;

    for (k = 0; k < sizeof(codes) / sizeof(codes[0]); k++) {
        sg_smtp_ehlo_init(&e);
        sg_smtp_reply_init(&r, (k % 3 == 1) ? sg_smtp_ehlo_line : NULL, &e);

        CHECK(sg_smtp_reply_parse(&r, (unsigned char *) p, n, &used)
              == SG_SMTP_REPLY_DONE, "corpus transcript: a reply");
        CHECK(r.code == codes[k] && strcmp(r.status, statuses[k]) == 0,
              "corpus transcript: code and RFC 3463 status");

        if (k % 3 == 1) {
            CHECK(e.exts == exts[k / 3],
                  "corpus transcript: EHLO capabilities");
        }

        p += used;
        n -= used;
    }

    CHECK(n == 0, "corpus transcript: every reply read");

    free(wire);
    free(buf);
}


/* MAIL and RCPT */

typedef struct {
    const char         *name;
    const char         *sender;      /* NULL: <> */
    uint64_t            size;
    const char         *ret;
    const char         *envid;
    unsigned            eightbit;
    unsigned            smtputf8;
    unsigned            requiretls;
    unsigned            exts;
    size_t              bufsize;     /* 0: SG_SMTP_CMD_OUT_MAX */
    sg_smtp_build_rc_e  rc;
    const char         *out;
} mail_case_t;


#define B_OK    .rc = SG_SMTP_BUILD_OK
#define B_LONG  .rc = SG_SMTP_BUILD_TOO_LONG
#define B_INV   .rc = SG_SMTP_BUILD_INVALID
#define B_UTF8  .rc = SG_SMTP_BUILD_NEED_SMTPUTF8
#define B_RTLS  .rc = SG_SMTP_BUILD_NEED_REQUIRETLS

#define X_ALL   (X_PIPE | X_SIZE | X_8BIT | X_UTF8 | X_DSN | X_RTLS)


static const mail_case_t  mail_cases[] = {
    { "4.1.1.2 MAIL FROM", "a@b.example", B_OK,
      .out = "MAIL FROM:<a@b.example>\r\n" },
    { "4.1.1.2 null reverse-path", NULL, .exts = X_ALL, B_OK,
      .out = "MAIL FROM:<>\r\n" },
    { "RFC 1870, 6 SIZE to a peer with SIZE", "a@b.example", .size = 12345,
      .exts = X_SIZE, B_OK, .out = "MAIL FROM:<a@b.example> SIZE=12345\r\n" },
    { "RFC 1870, 6 no SIZE to a peer without", "a@b.example", .size = 12345,
      B_OK, .out = "MAIL FROM:<a@b.example>\r\n" },
    { "RFC 1870, 6 no SIZE=0", "a@b.example", .exts = X_SIZE, B_OK,
      .out = "MAIL FROM:<a@b.example>\r\n" },
    { "RFC 1870, 6 largest SIZE", "a@b.example",
      .size = 18446744073709551615ULL, .exts = X_SIZE, B_OK,
      .out = "MAIL FROM:<a@b.example> SIZE=18446744073709551615\r\n" },
    { "RFC 6152, 3 BODY=8BITMIME", "a@b.example", .eightbit = 1,
      .exts = X_8BIT, B_OK,
      .out = "MAIL FROM:<a@b.example> BODY=8BITMIME\r\n" },
    { "RFC 6152, 3 no BODY to a peer without 8BITMIME", "a@b.example",
      .eightbit = 1, .exts = X_SIZE, B_OK,
      .out = "MAIL FROM:<a@b.example>\r\n" },
    { "RFC 6531, 3.4 SMTPUTF8", "a@b.example", .smtputf8 = 1,
      .exts = X_UTF8, B_OK, .out = "MAIL FROM:<a@b.example> SMTPUTF8\r\n" },
    { "RFC 6531, 3.2 SMTPUTF8 needed, peer lacks it", "a@b.example",
      .smtputf8 = 1, .exts = X_ALL & ~X_UTF8, B_UTF8 },
    { "RFC 6531, 3.2 UTF-8 sender, peer lacks SMTPUTF8",
      "j\xc3\xb6rg@b.example", .exts = X_8BIT, B_UTF8 },
    { "RFC 6531, 3.4 UTF-8 sender adds SMTPUTF8", "j\xc3\xb6rg@b.example",
      .exts = X_UTF8, B_OK,
      .out = "MAIL FROM:<j\xc3\xb6rg@b.example> SMTPUTF8\r\n" },
    { "RFC 3461, 4.3 RET and 4.4 ENVID to a DSN peer", "a@b.example",
      .ret = "HDRS", .envid = "QQ314159+2Bx", .exts = X_DSN, B_OK,
      .out = "MAIL FROM:<a@b.example> RET=HDRS ENVID=QQ314159+2Bx\r\n" },
    { "RFC 3461, 4 no RET/ENVID to a peer without DSN", "a@b.example",
      .ret = "FULL", .envid = "x", .exts = X_SIZE, B_OK,
      .out = "MAIL FROM:<a@b.example>\r\n" },
    { "RFC 3461, 4.3 RET case-insensitive", "a@b.example", .ret = "full",
      .exts = X_DSN, B_OK, .out = "MAIL FROM:<a@b.example> RET=full\r\n" },
    { "RFC 3461, 4.3 bad RET", "a@b.example", .ret = "BODY", .exts = X_DSN,
      B_INV },
    { "RFC 3461, 4.4 ENVID with SP", "a@b.example", .envid = "a b",
      .exts = X_DSN, B_INV },
    { "RFC 3461, 4 ENVID with raw '='", "a@b.example", .envid = "a=b",
      .exts = X_DSN, B_INV },
    { "RFC 3461, 4 ENVID with short hexchar", "a@b.example", .envid = "ab+2",
      .exts = X_DSN, B_INV },
    { "RFC 3461, 4 ENVID with lower-case hexchar", "a@b.example",
      .envid = "a+2b", .exts = X_DSN, B_INV },
    { "RFC 3461, 4.4 ENVID of 100 characters", "a@b.example",
      .envid = "{100:e}", .exts = X_DSN, B_OK,
      .out = "MAIL FROM:<a@b.example> ENVID={100:e}\r\n" },
    { "RFC 3461, 4.4 ENVID of 101 characters", "a@b.example",
      .envid = "{101:e}", .exts = X_DSN, B_INV },
    { "RFC 8689, 3 REQUIRETLS", "a@b.example", .requiretls = 1,
      .exts = X_RTLS, B_OK, .out = "MAIL FROM:<a@b.example> REQUIRETLS\r\n" },
    { "RFC 8689, 4.1 REQUIRETLS to a peer without it", "a@b.example",
      .requiretls = 1, .exts = X_ALL & ~X_RTLS, B_RTLS },
    { "every parameter, in order", "a@b.example", .size = 9, .ret = "FULL",
      .envid = "id1", .eightbit = 1, .smtputf8 = 1, .requiretls = 1,
      .exts = X_ALL, B_OK,
      .out = "MAIL FROM:<a@b.example> SIZE=9 BODY=8BITMIME SMTPUTF8 RET=FULL"
             " ENVID=id1 REQUIRETLS\r\n" },
    { "RFC-NOTES smuggling: CR in sender", "a\r\nRCPT TO:<x@y>@b.example",
      B_INV },
    { "RFC-NOTES smuggling: LF in sender", "a\n@b.example", B_INV },
    { "RFC-NOTES smuggling: NUL in sender", "a\x01@b.example", B_INV },
    { "4.1.2 quoted local part kept", "\"a b\"@b.example", B_OK,
      .out = "MAIL FROM:<\"a b\"@b.example>\r\n" },
    { "bounds: exactly fits", "a@b.example", .bufsize = 25, B_OK,
      .out = "MAIL FROM:<a@b.example>\r\n" },
    { "bounds: one octet short", "a@b.example", .bufsize = 24, B_LONG },
    { "bounds: parameter does not fit", "a@b.example", .size = 1,
      .exts = X_SIZE, .bufsize = 30, B_LONG },
    { "bounds: huge address", "{3000:a}@b.example", B_LONG },
};


typedef struct {
    const char         *name;
    const char         *address;
    const char         *notify;
    const char         *orcpt;
    unsigned            exts;
    size_t              bufsize;
    sg_smtp_build_rc_e  rc;
    const char         *out;
} rcpt_case_t;


static const rcpt_case_t  rcpt_cases[] = {
    { "4.1.1.3 RCPT TO", "c@d.example", B_OK,
      .out = "RCPT TO:<c@d.example>\r\n" },
    { "4.5.1 RCPT TO:<Postmaster>", "Postmaster", B_OK,
      .out = "RCPT TO:<Postmaster>\r\n" },
    { "4.1.1.3 empty forward-path", "", B_INV },
    { "RFC 3461, 4.1 NOTIFY and 4.2 ORCPT to a DSN peer", "c@d.example",
      "SUCCESS,FAILURE", "rfc822;c+2Bx@d.example", X_DSN, B_OK,
      .out = "RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE"
             " ORCPT=rfc822;c+2Bx@d.example\r\n" },
    { "RFC 3461, 4 no NOTIFY/ORCPT to a peer without DSN", "c@d.example",
      "NEVER", "rfc822;c@d.example", X_ALL & ~X_DSN, B_OK,
      .out = "RCPT TO:<c@d.example>\r\n" },
    { "RFC 3461, 4.1 NOTIFY=NEVER", "c@d.example", "never", NULL, X_DSN,
      B_OK, .out = "RCPT TO:<c@d.example> NOTIFY=never\r\n" },
    { "RFC 3461, 4.1 NOTIFY=DELAY", "c@d.example", "DELAY", NULL, X_DSN,
      B_OK, .out = "RCPT TO:<c@d.example> NOTIFY=DELAY\r\n" },
    { "RFC 3461, 4.1 NEVER combined", "c@d.example", "NEVER,DELAY", NULL,
      X_DSN, B_INV },
    { "RFC 3461, 4.1 empty item", "c@d.example", "SUCCESS,", NULL, X_DSN,
      B_INV },
    { "RFC 3461, 4.1 unknown value", "c@d.example", "ALWAYS", NULL, X_DSN,
      B_INV },
    { "RFC 3461, 4.2 ORCPT without addr-type", "c@d.example", NULL,
      "c@d.example", X_DSN, B_INV },
    { "RFC 3461, 4.2 ORCPT empty address", "c@d.example", NULL, "rfc822;",
      X_DSN, B_INV },
    { "RFC 3461, 4.2 ORCPT with SP", "c@d.example", NULL, "rfc822;c d",
      X_DSN, B_INV },
    { "RFC 3461, 4.2 ORCPT of 500 characters", "c@d.example", NULL,
      "rfc822;{493:o}", X_DSN, B_OK,
      .out = "RCPT TO:<c@d.example> ORCPT=rfc822;{493:o}\r\n" },
    { "RFC 3461, 4.2 ORCPT of 501 characters", "c@d.example", NULL,
      "rfc822;{494:o}", X_DSN, B_INV },
    { "RFC 6531, 3.2 UTF-8 recipient, peer lacks SMTPUTF8",
      "\xc3\xa4@d.example", .exts = X_DSN, B_UTF8 },
    { "RFC 6531, 3.2 UTF-8 recipient to SMTPUTF8 peer", "\xc3\xa4@d.example",
      .exts = X_UTF8, B_OK, .out = "RCPT TO:<\xc3\xa4@d.example>\r\n" },
    { "RFC-NOTES smuggling: CRLF in recipient",
      "c@d.example>\r\nDATA\r\n<x", B_INV },
    { "bounds: one octet short", "c@d.example", .bufsize = 22, B_LONG },
    { "bounds: exactly fits", "c@d.example", .bufsize = 23, B_OK,
      .out = "RCPT TO:<c@d.example>\r\n" },
};


static int
check_built(const char *name, sg_smtp_build_rc_e rc, sg_smtp_build_rc_e want,
    const char *detail, const char *out, size_t n, const char *expect)
{
    int      ok;
    char    *e;
    size_t   elen;

    ok = (rc == want);

    if (ok && rc == SG_SMTP_BUILD_OK) {
        e = expand(expect, strlen(expect), &elen);
        ok = (n == elen && memcmp(out, e, n) == 0 && detail == NULL);
        free(e);

    } else if (ok) {
        ok = (n == 0 && detail != NULL);
    }

    if (!ok) {
        printf("  build case \"%s\": rc %d \"%.*s\" (%s)\n", name, (int) rc,
               (int) (n > 200 ? 200 : n), out, detail ? detail : "-");
    }

    return ok;
}


static int
run_mail_case(const mail_case_t *c)
{
    int                  ok;
    char                 out[SG_SMTP_CMD_OUT_MAX + 8];
    char                *sender, *envid;
    size_t               n, slen, elen;
    const char          *detail;
    sg_smtp_mail_t       m;
    sg_smtp_build_rc_e   rc;

    memset(&m, 0, sizeof(m));

    sender = expand(c->sender ? c->sender : "", c->sender ? strlen(c->sender)
                                                          : 0, &slen);
    envid = expand(c->envid ? c->envid : "", c->envid ? strlen(c->envid) : 0,
                   &elen);

    m.sender = sender;
    m.sender_len = slen;
    m.size = c->size;
    m.ret = c->ret;
    m.ret_len = c->ret ? strlen(c->ret) : 0;
    m.envid = envid;
    m.envid_len = elen;
    m.eightbit = c->eightbit;
    m.smtputf8 = c->smtputf8;
    m.requiretls = c->requiretls;

    rc = sg_smtp_build_mail(&m, c->exts, out,
                            c->bufsize ? c->bufsize : SG_SMTP_CMD_OUT_MAX,
                            &n, &detail);

    ok = check_built(c->name, rc, c->rc, detail, out, n, c->out);

    free(sender);
    free(envid);

    return ok;
}


static int
run_rcpt_case(const rcpt_case_t *c)
{
    int                  ok;
    char                 out[SG_SMTP_CMD_OUT_MAX + 8];
    char                *orcpt;
    size_t               n, olen;
    const char          *detail;
    sg_smtp_rcpt_t       r;
    sg_smtp_build_rc_e   rc;

    memset(&r, 0, sizeof(r));

    orcpt = expand(c->orcpt ? c->orcpt : "", c->orcpt ? strlen(c->orcpt) : 0,
                   &olen);

    r.address = c->address;
    r.address_len = strlen(c->address);
    r.notify = c->notify;
    r.notify_len = c->notify ? strlen(c->notify) : 0;
    r.orcpt = orcpt;
    r.orcpt_len = olen;

    rc = sg_smtp_build_rcpt(&r, c->exts, out,
                            c->bufsize ? c->bufsize : SG_SMTP_CMD_OUT_MAX,
                            &n, &detail);

    ok = check_built(c->name, rc, c->rc, detail, out, n, c->out);

    free(orcpt);

    return ok;
}


/* the DATA encoder */

typedef struct {
    const char         *name;
    const char         *in;
    size_t              len;
    const char         *out;        /* the wire, terminator included */
    size_t              out_len;
} dot_case_t;


#define O(s)  .out = (s), .out_len = sizeof(s) - 1


static const dot_case_t  dot_cases[] = {
    { "4.1.1.4 empty message", L(""), O(".\r\n") },
    { "4.1.1.4 CRLF message", L("a\r\nb\r\n"), O("a\r\nb\r\n.\r\n") },
    { "4.1.1.4 no final CRLF: one is added", L("a\r\nb"),
      O("a\r\nb\r\n.\r\n") },
    { "4.5.2 leading dot doubled", L(".a\r\n"), O("..a\r\n.\r\n") },
    { "4.5.2 a line that is one dot", L("a\r\n.\r\nb\r\n"),
      O("a\r\n..\r\nb\r\n.\r\n") },
    { "4.5.2 dots inside a line kept", L("a.b..c\r\n"),
      O("a.b..c\r\n.\r\n") },
    { "4.5.2 two dots at line start", L("..\r\n"), O("...\r\n.\r\n") },
    { "4.5.2 message that is a dot", L("."), O("..\r\n.\r\n") },
    { "4.5.2 dot at the start of every line", L(".\r\n.\r\n."),
      O("..\r\n..\r\n..\r\n.\r\n") },
    { "2.3.8 bare LF becomes CRLF", L("a\nb\n"), O("a\r\nb\r\n.\r\n") },
    { "2.3.8 bare CR becomes CRLF", L("a\rb\r"), O("a\r\nb\r\n.\r\n") },
    { "2.3.8 CR CR LF", L("a\r\r\nb"), O("a\r\n\r\nb\r\n.\r\n") },
    { "2.3.8 LF CR", L("a\n\rb"), O("a\r\n\r\nb\r\n.\r\n") },
    { "4.5.2 dot after bare LF", L("a\n.b"), O("a\r\n..b\r\n.\r\n") },
    { "4.5.2 dot after bare CR", L("a\r.b"), O("a\r\n..b\r\n.\r\n") },
    { "RFC-NOTES smuggling: LF.LF", L("a\n.\nMAIL FROM:<x@y>\n"),
      O("a\r\n..\r\nMAIL FROM:<x@y>\r\n.\r\n") },
    { "RFC-NOTES smuggling: CR.CR", L("a\r.\rb"),
      O("a\r\n..\r\nb\r\n.\r\n") },
    { "RFC-NOTES smuggling: CRLF.LF", L("a\r\n.\nb"),
      O("a\r\n..\r\nb\r\n.\r\n") },
    { "RFC-NOTES smuggling: LF.CRLF", L("a\n.\r\nb"),
      O("a\r\n..\r\nb\r\n.\r\n") },
    { "NUL and 8-bit kept", L("\0\xff\r\n"), O("\0\xff\r\n.\r\n") },
    { "empty lines kept", L("\r\n\r\n"), O("\r\n\r\n.\r\n") },
    { "4.1.1.4 message ending in CR", L("a\r"), O("a\r\n.\r\n") },
};


/* encode in with input pieces of istep and an output buffer of osize */

static size_t
dot_run(const unsigned char *in, size_t len, size_t istep, size_t osize,
    unsigned char *wire)
{
    size_t          i, n, o, used, w, piece;
    unsigned char   out[64];
    sg_smtp_dot_t   d;

    sg_smtp_dot_init(&d);
    w = 0;

    for (i = 0; i < len; i += piece) {
        piece = (len - i < istep) ? len - i : istep;

        for (n = 0; n < piece; n += used) {
            o = sg_smtp_dot_encode(&d, in + i + n, piece - n, out, osize,
                                   &used);

            if (used == 0 || o > osize) {
                return (size_t) -1;
            }

            memcpy(wire + w, out, o);
            w += o;
        }
    }

    o = sg_smtp_dot_finish(&d, out, osize);
    memcpy(wire + w, out, o);

    return w + o;
}


static int
run_dot_case(const dot_case_t *c)
{
    int            ok;
    size_t         n, istep, osize;
    unsigned char  wire[512];

    ok = 1;

    for (istep = 1; ok && istep <= c->len + 1; istep++) {
        for (osize = SG_SMTP_DOT_FINISH_MAX; ok && osize <= 64; osize += 7) {
            n = dot_run((const unsigned char *) c->in, c->len, istep, osize,
                        wire);

            ok = (n == c->out_len && memcmp(wire, c->out, n) == 0);

            if (!ok) {
                printf("  dot case \"%s\": input pieces %zu, output %zu:"
                       " %zu octets\n", c->name, istep, osize, n);
            }
        }
    }

    return ok;
}


/*
 * Round trip through the receiving side's decoder (sg_smtp_data.c): any
 * octets, any chunking, the wire is free of bare CR and LF, ends exactly
 * at the terminator, and decodes to the message with CRLF line ends.
 */

static uint32_t  rng_state = 2463534242u;


static uint32_t
rng(void)
{
    /* xorshift32: the same sequence on every run */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;

    return rng_state;
}


static void
test_dot_roundtrip(void)
{
    int              ok, bare;
    size_t           len, i, w, n, o, used, piece, nlen, got, k;
    unsigned char    in[1024], norm[2048], wire[4200], out[16], dec[9000];
    unsigned char    c;
    sg_smtp_dot_t    d;
    sg_smtp_data_t  *dd;

    static const unsigned char  alphabet[] = "\r\n.a\r\n.\0";

    dd = malloc(sizeof(sg_smtp_data_t));
    if (dd == NULL) {
        abort();
    }

    ok = 1;

    for (k = 0; ok && k < 2000; k++) {
        len = rng() % sizeof(in);

        for (i = 0; i < len; i++) {
            in[i] = (rng() & 3) ? alphabet[rng() % 8] : (unsigned char) rng();
        }

        /* the message as it should arrive: every line end a CRLF */
        nlen = 0;

        for (i = 0; i < len; i++) {
            c = in[i];

            if (c == '\r') {
                if (i + 1 < len && in[i + 1] == '\n') {
                    i++;
                }

                norm[nlen++] = '\r';
                norm[nlen++] = '\n';

            } else if (c == '\n') {
                norm[nlen++] = '\r';
                norm[nlen++] = '\n';

            } else {
                norm[nlen++] = c;
            }
        }

        if (nlen >= 2 && !(norm[nlen - 2] == '\r' && norm[nlen - 1] == '\n'))
        {
            norm[nlen++] = '\r';
            norm[nlen++] = '\n';

        } else if (nlen == 1) {
            norm[nlen++] = '\r';
            norm[nlen++] = '\n';
        }

        /* encode in random pieces into a small buffer */
        sg_smtp_dot_init(&d);
        w = 0;

        for (i = 0; i < len; i += piece) {
            piece = 1 + rng() % 100;
            if (piece > len - i) {
                piece = len - i;
            }

            for (n = 0; n < piece; n += used) {
                o = sg_smtp_dot_encode(&d, in + i + n, piece - n, out,
                                       SG_SMTP_DOT_STEP_MAX + rng() % 12,
                                       &used);
                memcpy(wire + w, out, o);
                w += o;
            }
        }

        w += sg_smtp_dot_finish(&d, wire + w, SG_SMTP_DOT_FINISH_MAX);

        /* no bare CR or LF on the wire */
        bare = 0;

        for (i = 0; i < w; i++) {
            if ((wire[i] == '\r' && (i + 1 == w || wire[i + 1] != '\n'))
                || (wire[i] == '\n' && (i == 0 || wire[i - 1] != '\r')))
            {
                bare = 1;
            }
        }

        sg_smtp_data_init(dd, 0, 1 << 20, 100000, NULL, NULL);
        got = sg_smtp_data_parse(dd, wire, w, dec, &n);

        ok = !bare && dd->done && !dd->bare && got == w && n == nlen
             && memcmp(dec, norm, n) == 0;

        if (!ok) {
            printf("  round trip %zu: len %zu wire %zu bare %d done %d"
                   " consumed %zu decoded %zu want %zu\n", k, len, w, bare,
                   (int) dd->done, got, n, nlen);
        }
    }

    CHECK(ok, "4.5.2 and 2.3.8: encoder and the receiver's decoder agree"
              " on 2000 random messages in random pieces");

    free(dd);
}


static void
test_dot_misc(void)
{
    size_t          used, n;
    unsigned char   out[8];
    sg_smtp_dot_t   d;

    sg_smtp_dot_init(&d);

    n = sg_smtp_dot_encode(&d, (const unsigned char *) "abc", 3, out,
                           SG_SMTP_DOT_STEP_MAX - 1, &used);
    CHECK(n == 0 && used == 0, "dot_encode: no room, nothing consumed");

    n = sg_smtp_dot_encode(&d, (const unsigned char *) "abc", 3, out,
                           SG_SMTP_DOT_STEP_MAX, &used);
    CHECK(n == 1 && used == 1 && out[0] == 'a',
          "dot_encode: one octet per SG_SMTP_DOT_STEP_MAX of room");

    n = sg_smtp_dot_finish(&d, out, SG_SMTP_DOT_FINISH_MAX - 1);
    CHECK(n == 0, "dot_finish: no room, nothing written");

    n = sg_smtp_dot_finish(&d, out, SG_SMTP_DOT_FINISH_MAX);
    CHECK(n == 5 && memcmp(out, "\r\n.\r\n", 5) == 0,
          "4.1.1.4 dot_finish after a partial line");

    /* the worst case: CR then "." needs CRLF and ".." */
    sg_smtp_dot_init(&d);
    n = sg_smtp_dot_encode(&d, (const unsigned char *) "\r", 1, out,
                           SG_SMTP_DOT_STEP_MAX, &used);
    CHECK(n == 0 && used == 1, "dot_encode: a CR waits for the next octet");
    n = sg_smtp_dot_encode(&d, (const unsigned char *) ".", 1, out,
                           SG_SMTP_DOT_STEP_MAX, &used);
    CHECK(n == 4 && used == 1 && memcmp(out, "\r\n..", 4) == 0,
          "2.3.8 and 4.5.2 bare CR then dot: four octets");
}


/* RFC 8460, 4.3.1 result types */

typedef struct {
    const char         *name;
    sg_smtp_tls_facts_t facts;
    const char         *type;        /* NULL: no failure */
} tls_case_t;


#define F_OFFERED   .starttls_offered = 1
#define F_REFUSED   .starttls_refused = 1
#define F_TRIED     .tls_attempted = 1
#define F_HS        .handshake_ok = 1
#define F_MATCH     .host_match = 1


static const tls_case_t  tls_cases[] = {
    { "RFC 8460, 4.3.1 starttls-not-supported",
      { .cert = SG_SMTP_CERT_OK }, "starttls-not-supported" },
    { "RFC 8460, 4.3.1 STARTTLS refused: starttls-not-supported",
      { F_OFFERED, F_REFUSED }, "starttls-not-supported" },
    { "RFC 8460, 4.3.1 offered, not tried (level none): nothing",
      { F_OFFERED }, NULL },
    { "RFC 8460, 4.3.1 handshake failed: validation-failure",
      { F_OFFERED, F_TRIED }, "validation-failure" },
    { "RFC 8460, 4.3.1 valid and matching: success",
      { F_OFFERED, F_TRIED, F_HS, F_MATCH, .cert = SG_SMTP_CERT_OK }, NULL },
    { "RFC 8460, 4.3.1 certificate-host-mismatch",
      { F_OFFERED, F_TRIED, F_HS, .cert = SG_SMTP_CERT_OK },
      "certificate-host-mismatch" },
    { "RFC 8460, 4.3.1 certificate-expired",
      { F_OFFERED, F_TRIED, F_HS, F_MATCH, .cert = SG_SMTP_CERT_EXPIRED },
      "certificate-expired" },
    { "RFC 8460, 4.3.1 certificate-not-trusted",
      { F_OFFERED, F_TRIED, F_HS, F_MATCH, .cert = SG_SMTP_CERT_UNTRUSTED },
      "certificate-not-trusted" },
    { "RFC 8460, 4.3.1 untrusted and mismatched: the chain first",
      { F_OFFERED, F_TRIED, F_HS, .cert = SG_SMTP_CERT_UNTRUSTED },
      "certificate-not-trusted" },
    { "RFC 8460, 4.3.1 expired and mismatched: the chain first",
      { F_OFFERED, F_TRIED, F_HS, .cert = SG_SMTP_CERT_EXPIRED },
      "certificate-expired" },
    { "RFC 8460, 4.3.1 other verify error: validation-failure",
      { F_OFFERED, F_TRIED, F_HS, F_MATCH, .cert = SG_SMTP_CERT_INVALID },
      "validation-failure" },
    { "RFC 8460, 4.3.1 no certificate: validation-failure",
      { F_OFFERED, F_TRIED, F_HS, .cert = SG_SMTP_CERT_NONE },
      "validation-failure" },
};


static int
run_tls_case(const tls_case_t *c)
{
    const char  *t;

    t = sg_smtp_tls_result_type(&c->facts);

    if ((t == NULL) != (c->type == NULL)
        || (t != NULL && strcmp(t, c->type) != 0))
    {
        printf("  tls case \"%s\": %s\n", c->name, t ? t : "(none)");
        return 0;
    }

    return 1;
}


int
main(void)
{
    size_t  i;

    for (i = 0; i < sizeof(reply_cases) / sizeof(reply_cases[0]); i++) {
        CHECK(run_reply_case(&reply_cases[i]), reply_cases[i].name);
    }

    test_reply_misc();

    for (i = 0; i < sizeof(ehlo_cases) / sizeof(ehlo_cases[0]); i++) {
        CHECK(run_ehlo_case(&ehlo_cases[i]), ehlo_cases[i].name);
    }

    test_corpus();
    test_corpus_transcript();

    for (i = 0; i < sizeof(mail_cases) / sizeof(mail_cases[0]); i++) {
        CHECK(run_mail_case(&mail_cases[i]), mail_cases[i].name);
    }

    for (i = 0; i < sizeof(rcpt_cases) / sizeof(rcpt_cases[0]); i++) {
        CHECK(run_rcpt_case(&rcpt_cases[i]), rcpt_cases[i].name);
    }

    for (i = 0; i < sizeof(dot_cases) / sizeof(dot_cases[0]); i++) {
        CHECK(run_dot_case(&dot_cases[i]), dot_cases[i].name);
    }

    test_dot_misc();
    test_dot_roundtrip();

    for (i = 0; i < sizeof(tls_cases) / sizeof(tls_cases[0]); i++) {
        CHECK(run_tls_case(&tls_cases[i]), tls_cases[i].name);
    }

    return SG_TEST_DONE();
}
