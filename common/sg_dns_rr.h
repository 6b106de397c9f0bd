/*
 * sg: the pure part of DNS for delivery: MX records read from the wire
 * form libunbound hands over, the RFC 7505 null MX, the RFC 5321, 5.1
 * order of MX hosts, and IP literals given where a host name is expected.
 *
 * Pure C (no nginx types, no I/O): unit-tested in tests/unit/test_sg_dns_rr.c.
 */

#ifndef _SG_DNS_RR_H_INCLUDED_
#define _SG_DNS_RR_H_INCLUDED_


#include <stddef.h>


#define SG_DNS_RR_NAME_MAX    253     /* RFC 1035 2.3.4, text, no dot */
#define SG_DNS_RR_WIRE_MAX    255     /* RFC 1035 3.1, wire form */
#define SG_DNS_RR_LABEL_MAX   63
#define SG_DNS_RR_IP_TEXT     46      /* INET6_ADDRSTRLEN */


/* one MX record */
typedef struct {
    unsigned int     pref;
    size_t           len;                   /* 0: the root, "." */
    char             name[SG_DNS_RR_NAME_MAX + 1];  /* lower case, no dot */
} sg_dns_rr_mx_t;


/* an address: family 4 or 6, addr in network order (4 or 16 bytes) */
typedef struct {
    int              family;
    unsigned char    addr[16];
} sg_dns_rr_ip_t;


/* a random number from 0 to n - 1 (n > 0); tests pass their own */
typedef unsigned long (*sg_dns_rr_random_pt)(void *data, unsigned long n);


/*
 * A domain name in wire form (RFC 1035 3.1) to text: lower case, labels
 * joined by dots, no trailing dot, "" for the root.  Host names only:
 * letters, digits, '-' and '_' (RFC 1123 2.1; '_' for service names);
 * a label with any other octet, a compression pointer (libunbound hands
 * over uncompressed rdata), or a name running past len is refused.
 * *used is set to the wire octets read.  0 on success, -1 if refused.
 */
int sg_dns_rr_name(const unsigned char *p, size_t len, size_t *used,
    char *out, size_t size);

/* MX rdata (RFC 1035 3.3.9): preference, then exchange; 0 or -1 */
int sg_dns_rr_mx(const unsigned char *rdata, size_t len,
    sg_dns_rr_mx_t *mx);

/*
 * RFC 7505, 3: a null MX is the only MX record of the domain, with
 * preference 0 and the root as exchange.  1 if mx[0..n) is one.
 */
int sg_dns_rr_null_mx(const sg_dns_rr_mx_t *mx, size_t n);

/*
 * RFC 5321, 5.1: lowest preference first, records of equal preference in
 * random order ("to spread the load"), with rnd (NULL: the order found).
 * Records that are no host (the root, ".") and repeated names (the best
 * preference is kept) are removed: a null MX beside other MX records
 * (which RFC 7505, 3 forbids) leaves the others.  Returns the records
 * left.
 */
size_t sg_dns_rr_mx_order(sg_dns_rr_mx_t *mx, size_t n,
    sg_dns_rr_random_pt rnd, void *data);

/*
 * RFC 5321, 5.1: "If [the SMTP client finds] its own name [...] all
 * records at that preference level and higher-numbered ones MUST be
 * discarded".  mx must be ordered; self is lower case, no trailing dot.
 * Returns the records left (0: the message MUST be returned).
 */
size_t sg_dns_rr_mx_drop_self(sg_dns_rr_mx_t *mx, size_t n,
    const char *self, size_t self_len);

/*
 * An IP address where a host is expected: "192.0.2.1", "2001:db8::1",
 * or an RFC 5321, 4.1.3 address literal "[192.0.2.1]",
 * "[IPv6:2001:db8::1]" (also "[2001:db8::1]").  0 and *ip set, or -1.
 */
int sg_dns_rr_ip_literal(const char *s, size_t len, sg_dns_rr_ip_t *ip);

/* an address of an A (4 octets) or AAAA (16 octets) rdata; 0 or -1 */
int sg_dns_rr_ip(const unsigned char *rdata, size_t len, int family,
    sg_dns_rr_ip_t *ip);

/* an address as text, NUL-terminated (size >= SG_DNS_RR_IP_TEXT) */
int sg_dns_rr_ip_text(const sg_dns_rr_ip_t *ip, char *out, size_t size);

/* "NOERROR", "SERVFAIL", ...; "rcode N" in buf for others */
const char *sg_dns_rr_rcode(int rcode, char *buf, size_t size);


#endif /* _SG_DNS_RR_H_INCLUDED_ */
