/*
 * sg: validation and canonical forms of the addresses an admin types in:
 * IP addresses, CIDR networks, host names, host:port, TLS-RPT rua= URIs.
 *
 * Pure C (no nginx types, no I/O): unit-tested in tests/unit/test_sg_addr.c.
 *
 * Every function takes the text as (s, len), not NUL-terminated, writes
 * the canonical NUL-terminated form to out (size >= SG_ADDR_TEXT_MAX is
 * always enough) and returns NULL; or returns a message for a person, which
 * may be stored in out itself (then out holds no canonical form).
 */

#ifndef _SG_ADDR_H_INCLUDED_
#define _SG_ADDR_H_INCLUDED_


#include <stddef.h>


#define SG_ADDR_NAME_MAX      253     /* RFC 1035 2.3.4, without the dot */
#define SG_ADDR_LABEL_MAX     63
#define SG_ADDR_TEXT_MAX      320     /* name, ":65535", messages */
#define SG_ADDR_RUA_MAX       2048

/* sg_addr_host_name() flags */
#define SG_ADDR_WILDCARD      0x01    /* a leading "*." is allowed */


typedef enum {
    SG_ADDR_INVALID = 0,
    SG_ADDR_IP,
    SG_ADDR_CIDR,
    SG_ADDR_NAME
} sg_addr_kind_t;


/* an IPv4 or IPv6 address; IPv6 is written in RFC 5952 form */
const char *sg_addr_ip(const char *s, size_t len, char *out, size_t size);

/*
 * "address/prefix" with no host bits set; a bare address becomes a /32 or
 * /128.  With host bits set, the message names the network meant.
 */
const char *sg_addr_network(const char *s, size_t len, char *out,
    size_t size);

/*
 * A host or domain name of LDH labels (RFC 1123 2.1), lower-cased, without
 * the trailing dot, at most 253 characters; a single label is allowed
 * ("localhost"), an all-numeric last label is not (RFC 3696 2: it would be
 * read as an IPv4 address).
 */
const char *sg_addr_host_name(const char *s, size_t len, unsigned flags,
    char *out, size_t size);

/*
 * The STARTTLS whitelist: an IP address, a CIDR network or a host name.
 * *kind is set on success.
 */
const char *sg_addr_peer(const char *s, size_t len, sg_addr_kind_t *kind,
    char *out, size_t size);

/* host:port, host a name, an IPv4 address or [IPv6]; port 1..65535 */
const char *sg_addr_host_port(const char *s, size_t len, char *out,
    size_t size);

/*
 * RFC 8460 3, the rua= of a TLS-RPT record: "" or mailto: and https: URIs
 * separated by commas (blanks around them allowed).  Nothing is written.
 */
const char *sg_addr_tlsrpt_rua(const char *s, size_t len);


#endif /* _SG_ADDR_H_INCLUDED_ */
