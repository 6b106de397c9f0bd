/*
 * sg: the SMTP DATA stream, pure.
 *
 * Turns the bytes a client sends after "354" into the message: removes
 * dot-stuffing (RFC 5321, 4.5.2), finds the end of data — only
 * <CRLF>.<CRLF> (RFC 5321, 4.1.1.4) — and watches for a bare CR or bare LF
 * (the smuggling vectors; RFC-NOTES "STARTTLS and smuggling"), which are
 * refused, or normalized to CRLF when the listener is told to.
 *
 * It also follows the header section: counts fields, bounds its size, and
 * hands each complete (unfolded) field to a callback.
 */

#ifndef _SG_SMTP_DATA_H_INCLUDED_
#define _SG_SMTP_DATA_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


#define SG_SMTP_DATA_MAX_FIELD  8192    /* one unfolded header field */


typedef void (*sg_smtp_header_pt)(void *data, const char *name,
    size_t name_len, const char *value, size_t value_len);


typedef struct {
    int                  state;
    unsigned             normalize:1;   /* bare CR/LF become CRLF */
    unsigned             bare:1;        /* a bare CR or LF was seen */
    unsigned             done:1;        /* the end of data was seen */
    unsigned             in_body:1;     /* past the header section */
    unsigned             header_error:1;
    unsigned             eightbit_header:1;

    uint64_t             size;          /* octets of the message */

    /* header section */
    size_t               max_header_size;
    size_t               max_headers;
    size_t               header_size;
    size_t               headers;
    sg_smtp_header_pt    header_handler;
    void                *header_data;
    char                 field[SG_SMTP_DATA_MAX_FIELD];
    size_t               field_len;
    int                  hstate;
} sg_smtp_data_t;


void sg_smtp_data_init(sg_smtp_data_t *d, int normalize,
    size_t max_header_size, size_t max_headers, sg_smtp_header_pt handler,
    void *data);

/*
 * Consumes input until it is used up or the end of data is found; writes
 * the message octets to out, which must hold 2 * len + 2 octets.  Returns
 * the number of input octets consumed (less than len only when done).
 */
size_t sg_smtp_data_parse(sg_smtp_data_t *d, const unsigned char *in,
    size_t len, unsigned char *out, size_t *out_len);


#endif /* _SG_SMTP_DATA_H_INCLUDED_ */
