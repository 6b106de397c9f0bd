/*
 * sg: the SMTP DATA stream, pure.
 */

#include <string.h>

#include "sg_smtp_data.h"


enum {
    SG_DATA_SOL = 0,        /* start of a line, after a real CRLF */
    SG_DATA_SOL_BARE,       /* start of a line after a bare line end */
    SG_DATA_DOT,            /* "." at the start of a line */
    SG_DATA_DOT_CR,         /* ".<CR>" at the start of a line */
    SG_DATA_TEXT,           /* inside a line */
    SG_DATA_CR              /* <CR> inside a line */
};


enum {
    SG_HDR_SOL = 0,         /* start of a header line */
    SG_HDR_LINE,            /* inside a header line */
    SG_HDR_DONE             /* the body */
};


static void sg_smtp_data_emit(sg_smtp_data_t *d, unsigned char c,
    unsigned char *out, size_t *n);
static void sg_smtp_data_header(sg_smtp_data_t *d, unsigned char c);
static void sg_smtp_data_field_end(sg_smtp_data_t *d);


void
sg_smtp_data_init(sg_smtp_data_t *d, int normalize, size_t max_header_size,
    size_t max_headers, sg_smtp_header_pt handler, void *data)
{
    memset(d, 0, offsetof(sg_smtp_data_t, field));
    d->field_len = 0;
    d->hstate = SG_HDR_SOL;
    d->state = SG_DATA_SOL;
    d->normalize = normalize ? 1 : 0;
    d->max_header_size = max_header_size;
    d->max_headers = max_headers;
    d->header_handler = handler;
    d->header_data = data;
}


size_t
sg_smtp_data_parse(sg_smtp_data_t *d, const unsigned char *in, size_t len,
    unsigned char *out, size_t *out_len)
{
    size_t          i, n;
    unsigned char   c;

    n = 0;

    for (i = 0; i < len && !d->done; i++) {
        c = in[i];

        switch (d->state) {

        case SG_DATA_SOL:
            if (c == '.') {
                d->state = SG_DATA_DOT;
                break;
            }

            goto text;

        case SG_DATA_SOL_BARE:
            /*
             * After a bare line end nothing ends the data: "\n.\n" and
             * "\r\n.\n" are data (or refused), never the end.
             */
            if (c == '.') {
                d->state = SG_DATA_TEXT;
                break;
            }

            goto text;

        case SG_DATA_DOT:
            if (c == '\r') {
                d->state = SG_DATA_DOT_CR;
                break;
            }

            /* RFC 5321, 4.5.2: the first dot of a line is removed */
            goto text;

        case SG_DATA_DOT_CR:
            if (c == '\n') {
                /* RFC 5321, 4.1.1.4: <CRLF>.<CRLF> */
                d->done = 1;
                if (d->hstate != SG_HDR_DONE) {
                    sg_smtp_data_field_end(d);
                    d->hstate = SG_HDR_DONE;
                }
                i++;
                goto end;
            }

            /* ".<CR>x": a bare CR */
            d->bare = 1;
            sg_smtp_data_emit(d, '\r', out, &n);
            sg_smtp_data_emit(d, '\n', out, &n);
            d->state = SG_DATA_SOL_BARE;
            i--;
            break;

        case SG_DATA_CR:
            if (c == '\n') {
                sg_smtp_data_emit(d, '\r', out, &n);
                sg_smtp_data_emit(d, '\n', out, &n);
                d->state = SG_DATA_SOL;
                break;
            }

            /* a bare CR */
            d->bare = 1;
            sg_smtp_data_emit(d, '\r', out, &n);
            sg_smtp_data_emit(d, '\n', out, &n);
            d->state = SG_DATA_SOL_BARE;
            i--;
            break;

        default: /* SG_DATA_TEXT */
        text:
            if (c == '\r') {
                d->state = SG_DATA_CR;
                break;
            }

            if (c == '\n') {
                /* a bare LF */
                d->bare = 1;
                sg_smtp_data_emit(d, '\r', out, &n);
                sg_smtp_data_emit(d, '\n', out, &n);
                d->state = SG_DATA_SOL_BARE;
                break;
            }

            sg_smtp_data_emit(d, c, out, &n);
            d->state = SG_DATA_TEXT;
            break;
        }
    }

end:

    *out_len = n;

    return i;
}


static void
sg_smtp_data_emit(sg_smtp_data_t *d, unsigned char c, unsigned char *out,
    size_t *n)
{
    out[(*n)++] = c;
    d->size++;

    if (d->hstate != SG_HDR_DONE) {
        sg_smtp_data_header(d, c);
    }
}


/* RFC 5322, 2.2 and 2.2.3: fields, folded lines, the empty line */

static void
sg_smtp_data_header(sg_smtp_data_t *d, unsigned char c)
{
    if (++d->header_size > d->max_header_size) {
        d->header_error = 1;
    }

    if (c >= 0x80) {
        d->eightbit_header = 1;
    }

    switch (d->hstate) {

    case SG_HDR_SOL:
        if (c == '\r') {
            return;
        }

        if (c == '\n') {
            /* the empty line: the body follows */
            sg_smtp_data_field_end(d);
            d->hstate = SG_HDR_DONE;
            d->in_body = 1;
            return;
        }

        if (c == ' ' || c == '\t') {
            /* a continuation line: unfold */
            d->hstate = SG_HDR_LINE;
            break;
        }

        sg_smtp_data_field_end(d);

        if (++d->headers > d->max_headers) {
            d->header_error = 1;
        }

        d->hstate = SG_HDR_LINE;
        break;

    default: /* SG_HDR_LINE */
        if (c == '\r') {
            return;
        }

        if (c == '\n') {
            d->hstate = SG_HDR_SOL;
            return;
        }
    }

    if (d->field_len < sizeof(d->field)) {
        d->field[d->field_len++] = (char) c;
    }
}


static void
sg_smtp_data_field_end(sg_smtp_data_t *d)
{
    size_t       i, name_len;
    const char  *value;

    if (d->field_len == 0) {
        return;
    }

    for (i = 0; i < d->field_len && d->field[i] != ':'; i++) {
        /* void */
    }

    if (i < d->field_len && d->header_handler) {
        name_len = i;

        while (name_len && (d->field[name_len - 1] == ' '
                            || d->field[name_len - 1] == '\t'))
        {
            name_len--;
        }

        for (i++; i < d->field_len
                  && (d->field[i] == ' ' || d->field[i] == '\t'); i++)
        {
            /* void */
        }

        value = d->field + i;

        d->header_handler(d->header_data, d->field, name_len, value,
                          d->field_len - i);
    }

    d->field_len = 0;
}
