/*
 * sg: DNS for delivery, through libunbound on nginx's event loop.
 *
 * One libunbound context per worker in thread mode (ub_ctx_async(ctx, 1)),
 * its ub_fd() wrapped in an nginx connection; answers are processed when
 * it is readable.  The server is sg_resolver (ip[:port]) or the system's
 * resolv.conf; DNSSEC is validated with sg_dnssec_trust_anchor when set.
 *
 * DNSSEC validation is on with sg_dnssec_trust_anchor (whatever the
 * resolver), or without it when the system's resolvers are used and
 * Debian's /usr/share/dns/root.key is readable.  With sg_resolver and no
 * sg_dnssec_trust_anchor it is off: that server may not pass DNSSEC
 * records on (dnsmasq, test servers), and every answer would be bogus.
 * "secure" is only ever set for answers libunbound validated against a
 * trust anchor; with validation off every answer is insecure.  A bogus
 * answer is a temporary failure (route) or bogus (raw answer).
 *
 * With sg_resolver, names under "test." (RFC 6761) go to that server
 * (libunbound would answer NXDOMAIN itself).  The machine's host name
 * (ngx_cycle->hostname) is the own name of RFC 5321, 5.1: an MX list
 * holding it is cut there, and NOT_FOUND if nothing is left.
 *
 * Every request is answered exactly once through its handler, never from
 * inside the call that started it, unless it was cancelled first.
 */

#ifndef _SG_DNS_H_INCLUDED_
#define _SG_DNS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>


#define SG_DNS_TIMEOUT        30000     /* ms, per request */
#define SG_DNS_MAX_HOSTS      16        /* MX hosts kept per domain */
#define SG_DNS_MAX_ADDRS      16        /* addresses kept per host */


typedef struct sg_dns_req_s  sg_dns_req_t;


typedef enum {
    SG_DNS_OK = 0,            /* hosts[] holds at least one address */
    SG_DNS_NULL_MX,           /* RFC 7505: the domain accepts no mail */
    SG_DNS_NOT_FOUND,         /* NXDOMAIN, or no MX and no address */
    SG_DNS_TEMPFAIL           /* SERVFAIL, timeout, bogus, refused ... */
} sg_dns_status_e;


typedef struct {
    ngx_str_t            name;          /* lower case, no trailing dot */
    ngx_uint_t           pref;          /* MX preference; 0 implicit */
    ngx_addr_t          *addrs;         /* port 0; IPv4 first, then IPv6 */
    ngx_uint_t           naddrs;
    unsigned             secure:1;      /* every address answer was secure */
    unsigned             tempfail:1;    /* an address lookup failed
                                           temporarily (others may be
                                           there) */
} sg_dns_host_t;


typedef struct {
    sg_dns_status_e      status;
    const char          *reason;        /* for people: logs, queue, DSN;
                                           NULL when OK and no host lost
                                           anything */
    sg_dns_host_t       *hosts;         /* MX order: preference, random
                                           among equals */
    ngx_uint_t           nhosts;
    unsigned             mx_secure:1;   /* the MX answer was DNSSEC-secure */
    unsigned             implicit:1;    /* no MX: the domain itself
                                           (RFC 5321, 5.1) */
    ngx_pool_t          *pool;          /* all of the above; the handler
                                           owns it: ngx_destroy_pool() */
    ngx_uint_t           refs;          /* the handler's: 0 from here */
} sg_dns_route_t;


/* a raw answer (TXT for MTA-STS, TLSA for DANE) */
typedef struct {
    ngx_int_t            rcode;         /* 0 NOERROR, 3 NXDOMAIN ...;
                                           -1: no answer (timeout, error) */
    ngx_uint_t           havedata;
    unsigned             secure:1;
    unsigned             bogus:1;
    const char          *why_bogus;
    ngx_str_t           *rdata;         /* one per record */
    ngx_uint_t           nrdata;
    ngx_str_t            canonname;     /* after CNAMEs (the name asked
                                           if none); lower case, no
                                           trailing dot */
    ngx_pool_t          *pool;          /* the handler owns it */
} sg_dns_answer_t;


typedef void (*sg_dns_route_pt)(void *data, sg_dns_route_t *route);
typedef void (*sg_dns_answer_pt)(void *data, sg_dns_answer_t *answer);


ngx_int_t sg_dns_init_worker(ngx_cycle_t *cycle);
void sg_dns_exit_worker(void);

/*
 * mx = 1: the MX hosts of a domain and their A/AAAA addresses, with the
 * RFC 5321, 5.1 fallback to the domain's own addresses and RFC 7505 null
 * MX.  mx = 0: only the addresses of one host (a relay host, an internal
 * server); an IP literal ("192.0.2.1", "2001:db8::1", "[2001:db8::1]") is
 * answered without DNS.  NULL: out of memory or DNS is not set up.
 */
sg_dns_req_t *sg_dns_route(ngx_str_t *name, ngx_uint_t mx,
    sg_dns_route_pt handler, void *data);

/*
 * sg_dns_route() with a shorter timeout (1 .. SG_DNS_TIMEOUT ms; 0: the
 * default): the admin API's resolve endpoint, tests.  On a timeout while
 * addresses are looked up, the hosts found so far are kept.
 */
sg_dns_req_t *sg_dns_route_within(ngx_str_t *name, ngx_uint_t mx,
    ngx_msec_t timeout, sg_dns_route_pt handler, void *data);

/*
 * One query of type rrtype (16 TXT, 52 TLSA ...).  A name that cannot be
 * asked (not LDH or '_' labels) is answered NXDOMAIN without DNS.
 */
sg_dns_req_t *sg_dns_query(ngx_str_t *name, ngx_uint_t rrtype,
    sg_dns_answer_pt handler, void *data);

/* the handler will not be called */
void sg_dns_cancel(sg_dns_req_t *req);

/* 1 if answers are DNSSEC-validated in this worker (see above) */
ngx_uint_t sg_dns_validating(void);


#endif /* _SG_DNS_H_INCLUDED_ */
