
/*
 * libFuzzer target for the SMTP client's reply parser (and the EHLO
 * capability parser it feeds, and the DATA encoder): make -C tests/unit
 * fuzz-run.  Besides memory errors (ASan, UBSan) it checks the parser's
 * promises: a reply has a code of 200..599, 1..100 lines, a NUL-terminated
 * text of the length it reports, a status that is "" or "x.y.z" of the
 * code's class; feeding the input in pieces gives the same replies as
 * feeding it whole; the encoder never puts a bare CR or LF on the wire.
 */


#include <stdlib.h>
#include <string.h>

#include "sg_smtp_client.h"


int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);


static void
check_reply(const sg_smtp_reply_t *r)
{
    size_t  i, dots;

    if (r->code < 200 || r->code > 599 || r->lines == 0
        || r->lines > SG_SMTP_REPLY_LINES_MAX
        || r->text_len >= SG_SMTP_REPLY_TEXT_MAX
        || strlen(r->text) != r->text_len)
    {
        abort();
    }

    for (i = 0; i < r->text_len; i++) {
        if ((unsigned char) r->text[i] < 0x20 || r->text[i] == 0x7f) {
            abort();
        }
    }

    if (r->status[0] == '\0') {
        return;
    }

    if (r->status[0] != (char) ('0' + r->code / 100) || r->code / 100 == 3
        || strlen(r->status) > 9)
    {
        abort();
    }

    dots = 0;

    for (i = 1; r->status[i]; i++) {
        if (r->status[i] == '.') {
            dots++;

        } else if (r->status[i] < '0' || r->status[i] > '9') {
            abort();
        }
    }

    if (dots != 2) {
        abort();
    }
}


int
LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    size_t              off, used, off2, used2, step, n, o, i;
    unsigned char       out[64], prev;
    sg_smtp_dot_t       d;
    sg_smtp_ehlo_t      e;
    sg_smtp_reply_t    *r, *r2;
    sg_smtp_reply_rc_e  rc, rc2;

    r = malloc(sizeof(sg_smtp_reply_t));
    r2 = malloc(sizeof(sg_smtp_reply_t));
    if (r == NULL || r2 == NULL) {
        abort();
    }

    /* the first byte picks the piece size for the second parse */
    step = (size > 0) ? (size_t) (data[0] % 16) + 1 : 1;

    off = 0;
    off2 = 0;

    /* replies one after the other, as pipelined replies come */

    while (off < size) {
        sg_smtp_ehlo_init(&e);
        sg_smtp_reply_init(r, sg_smtp_ehlo_line, &e);

        rc = sg_smtp_reply_parse(r, data + off, size - off, &used);

        if (used == 0 || used > size - off) {
            abort();
        }

        /* the same bytes in pieces */

        sg_smtp_reply_init(r2, NULL, NULL);
        rc2 = SG_SMTP_REPLY_AGAIN;

        while (rc2 == SG_SMTP_REPLY_AGAIN && off2 < size) {
            n = (size - off2 < step) ? size - off2 : step;
            rc2 = sg_smtp_reply_parse(r2, data + off2, n, &used2);

            if (used2 > n) {
                abort();
            }

            off2 += used2;
        }

        off += used;

        if (rc != rc2 || off != off2) {
            abort();
        }

        if (rc != SG_SMTP_REPLY_DONE) {
            if (rc == SG_SMTP_REPLY_ERROR && r->error == NULL) {
                abort();
            }

            break;
        }

        check_reply(r);

        if (r->code != r2->code || strcmp(r->text, r2->text) != 0
            || strcmp(r->status, r2->status) != 0)
        {
            abort();
        }

        if (!(e.exts & SG_SMTP_EXT_SIZE) && e.size != 0) {
            abort();
        }
    }

    /* the input as a message: no bare CR or LF on the wire */

    sg_smtp_dot_init(&d);
    prev = '\n';

    for (off = 0; off <= size; off += used) {
        if (off < size) {
            o = sg_smtp_dot_encode(&d, data + off, size - off, out,
                                   sizeof(out), &used);
            if (used == 0) {
                abort();
            }

        } else {
            o = sg_smtp_dot_finish(&d, out, sizeof(out));
            used = 1;

            if (o < 3 || memcmp(out + o - 3, ".\r\n", 3) != 0) {
                abort();
            }
        }

        for (i = 0; i < o; i++) {
            if ((out[i] == '\n') != (prev == '\r')) {
                abort();
            }

            prev = out[i];
        }
    }

    free(r);
    free(r2);

    return 0;
}
