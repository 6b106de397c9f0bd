/*
 * Unit tests of the DATA stream (common/sg_smtp_data.c): RFC 5321 4.1.1.4
 * (end of data), 4.5.2 (transparency), the smuggling variants of
 * RFC-NOTES, and the header section (RFC 5322 2.2).
 */

#include <stdlib.h>
#include <string.h>

#include "sg_smtp_data.h"
#include "sg_test.h"


typedef struct {
    const char  *name;
    const char  *in;
    int          normalize;
    const char  *out;          /* the message */
    int          done;
    int          bare;
    size_t       rest;         /* input octets left after the end */
} sg_data_case_t;


static const sg_data_case_t  cases[] = {
    { "4.1.1.4 end of data", "hello\r\n.\r\n", 0, "hello\r\n", 1, 0, 0 },
    { "4.1.1.4 empty message", ".\r\n", 0, "", 1, 0, 0 },
    { "4.1.1.4 commands after the end are not data",
      "x\r\n.\r\nQUIT\r\n", 0, "x\r\n", 1, 0, 6 },
    { "4.5.2 leading dot removed", "..x\r\n.\r\n", 0, ".x\r\n", 1, 0, 0 },
    { "4.5.2 lone stuffed dot", "a\r\n..\r\n.\r\n", 0, "a\r\n.\r\n", 1, 0,
      0 },
    { "4.5.2 dot inside a line kept", "a.b\r\n.\r\n", 0, "a.b\r\n", 1, 0,
      0 },
    { "not finished", "abc\r\n", 0, "abc\r\n", 0, 0, 0 },
    { "pending CR is not output", "abc\r", 0, "abc", 0, 0, 0 },
    { "smuggling \\n.\\n is not an end", "a\n.\nb\r\n.\r\n", 0,
      "a\r\n\r\nb\r\n", 1, 1, 0 },
    { "smuggling \\r\\n.\\n is not an end", "a\r\n.\nMAIL\r\n.\r\n", 0,
      "a\r\n\r\nMAIL\r\n", 1, 1, 0 },
    { "smuggling \\n.\\r\\n is not an end", "a\n.\r\nRCPT\r\n.\r\n", 0,
      "a\r\n\r\nRCPT\r\n", 1, 1, 0 },
    { "smuggling \\r.\\r is not an end", "a\r.\rDATA\r\n.\r\n", 0,
      "a\r\n\r\nDATA\r\n", 1, 1, 0 },
    { "bare LF", "a\nb\r\n.\r\n", 0, "a\r\nb\r\n", 1, 1, 0 },
    { "bare CR", "a\rb\r\n.\r\n", 0, "a\r\nb\r\n", 1, 1, 0 },
    { "normalize: bare LF becomes CRLF", "a\nb\r\n.\r\n", 1, "a\r\nb\r\n",
      1, 1, 0 },
    { "\\r\\r\\n: a bare CR then CRLF", "a\r\r\n.\r\n", 0, "a\r\n\r\n", 1,
      1, 0 },
    { "8-bit data kept", "\xc3\xa9\r\n.\r\n", 0, "\xc3\xa9\r\n", 1, 0, 0 },
    { "NUL kept in data", "a\0b\r\n.\r\n", 0, NULL, 1, 0, 0 },
};


typedef struct {
    char    names[8][32];
    char    values[8][64];
    size_t  n;
} sg_headers_t;


static void
collect(void *data, const char *name, size_t nlen, const char *value,
    size_t vlen)
{
    sg_headers_t  *h = data;

    if (h->n < 8) {
        snprintf(h->names[h->n], 32, "%.*s", (int) nlen, name);
        snprintf(h->values[h->n], 64, "%.*s", (int) vlen, value);
        h->n++;
    }
}


static void
run(const char *in, size_t len, size_t chunk, int normalize,
    sg_smtp_data_t *d, unsigned char *msg, size_t *msg_len, size_t *used,
    sg_headers_t *h)
{
    size_t          off, k, n;
    unsigned char   out[4096];

    sg_smtp_data_init(d, normalize, 1024, 4, collect, h);

    *msg_len = 0;
    off = 0;

    while (off < len && !d->done) {
        k = len - off < chunk ? len - off : chunk;
        off += sg_smtp_data_parse(d, (const unsigned char *) in + off, k,
                                  out, &n);
        memcpy(msg + *msg_len, out, n);
        *msg_len += n;
    }

    *used = off;
}


int
main(void)
{
    size_t           i, len, chunk, msg_len, used;
    sg_headers_t     h;
    sg_smtp_data_t  *d;
    unsigned char    msg[4096];
    char             big[2048];

    d = malloc(sizeof(sg_smtp_data_t));

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        len = strlen(cases[i].in);

        if (cases[i].out == NULL) {
            len = 8;       /* "a\0b\r\n.\r\n" holds a NUL */
        }

        /* the same result whatever the reads are cut into */
        for (chunk = 1; chunk <= len; chunk++) {
            memset(&h, 0, sizeof(h));
            run(cases[i].in, len, chunk, cases[i].normalize, d, msg,
                &msg_len, &used, &h);

            CHECK(d->done == cases[i].done, cases[i].name);
            CHECK(d->bare == cases[i].bare, cases[i].name);
            CHECK(len - used == cases[i].rest, cases[i].name);

            if (cases[i].out) {
                CHECK(msg_len == strlen(cases[i].out)
                      && memcmp(msg, cases[i].out, msg_len) == 0,
                      cases[i].name);
                CHECK(d->size == msg_len, cases[i].name);

            } else {
                CHECK(msg_len == 5 && memcmp(msg, "a\0b\r\n", 5) == 0,
                      cases[i].name);
            }
        }
    }

    /* RFC 5322 2.2.3: unfolding; 2.2: name ":" value */
    memset(&h, 0, sizeof(h));
    {
        const char *m = "Subject: hi there\r\nX-Long: a\r\n\tb\r\n"
                        "TLS-Required: No\r\n\r\nbody: not a header\r\n"
                        ".\r\n";

        run(m, strlen(m), 3, 0, d, msg, &msg_len, &used, &h);
        CHECK(h.n == 3, "5322 2.2 three fields");
        CHECK(strcmp(h.names[0], "Subject") == 0
              && strcmp(h.values[0], "hi there") == 0, "5322 2.2 field");
        CHECK(strcmp(h.values[1], "a\tb") == 0, "5322 2.2.3 unfolded");
        CHECK(strcmp(h.names[2], "TLS-Required") == 0
              && strcmp(h.values[2], "No") == 0, "RFC 8689 5 header seen");
        CHECK(d->in_body && !d->header_error, "5322 2.1 body follows");
    }

    /* a message without body: the end of data ends the header section */
    memset(&h, 0, sizeof(h));
    run("A: 1\r\n.\r\n", 9, 9, 0, d, msg, &msg_len, &used, &h);
    CHECK(h.n == 1 && strcmp(h.values[0], "1") == 0, "header-only message");

    /* limits: 4 fields, 1024 octets (set in run) */
    memset(&h, 0, sizeof(h));
    run("A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n.\r\n", 34, 34, 0, d,
        msg, &msg_len, &used, &h);
    CHECK(d->header_error, "too many header fields");

    memset(big, 'x', sizeof(big));
    memcpy(big, "X: ", 3);
    memcpy(big + 1500, "\r\n\r\n.\r\n", 7);
    memset(&h, 0, sizeof(h));
    run(big, 1507, 100, 0, d, msg, &msg_len, &used, &h);
    CHECK(d->header_error && d->done, "header section too large");

    memset(&h, 0, sizeof(h));
    run("S: \xc3\xa9\r\n\r\n.\r\n", 12, 12, 0, d, msg, &msg_len, &used, &h);
    CHECK(d->eightbit_header, "8-bit header seen");

    free(d);

    return SG_TEST_DONE();
}
