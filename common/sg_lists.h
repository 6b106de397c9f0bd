/*
 * sg: the lists every worker keeps in memory — local domains, relay
 * networks, the STARTTLS whitelist and required list, routes and content
 * filter rules — reloaded when PostgreSQL says they changed (NOTIFY
 * sg_lists).
 */

#ifndef _SG_LISTS_H_INCLUDED_
#define _SG_LISTS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


#define SG_RULE_SENDER       1
#define SG_RULE_RECIPIENT    2
#define SG_RULE_HEADER       3


typedef struct {
    ngx_str_t            name;              /* lower case */
    ngx_str_t            internal_server;   /* host:port, as stored */
    ngx_str_t            server_host;       /* name or IP, no [] */
    in_port_t            server_port;       /* 25 when not given */
    unsigned             requiretls_trusted:1;

    /* the MTA-STS policy sg hosts for it (RFC 8461) */
    ngx_str_t            mta_sts_id;        /* id= of its _mta-sts TXT */
    ngx_str_t            mta_sts_policy;    /* the document served at
                                               https://mta-sts.<name>/
                                               .well-known/mta-sts.txt;
                                               empty: none to serve */
} sg_domain_t;


typedef struct {
    ngx_uint_t           field;             /* SG_RULE_* */
    ngx_str_t            header;            /* SG_RULE_HEADER */
    ngx_str_t            value;
    ngx_regex_t         *regex;             /* match "regex", else contains */
} sg_rule_cond_t;


typedef struct {
    int64_t              id;
    ngx_str_t            action;
    sg_rule_cond_t      *conds;
    ngx_uint_t           nconds;
} sg_rule_t;


/* mail for domain (or, for "*", every domain without a route) goes here */

typedef struct {
    ngx_str_t            domain;            /* lower case, or "*" */
    ngx_str_t            relay;             /* host:port, as stored */
    ngx_str_t            host;              /* name or IP, no [] */
    in_port_t            port;
} sg_route_t;


typedef struct {
    ngx_pool_t          *pool;              /* this generation's memory */
    ngx_array_t          domains;           /* sg_domain_t */
    ngx_array_t          relay;             /* ngx_cidr_t */
    ngx_array_t          wl_cidrs;          /* ngx_cidr_t */
    ngx_array_t          wl_names;          /* ngx_str_t, lower case */
    ngx_array_t          req_cidrs;         /* ngx_cidr_t */
    ngx_array_t          req_names;         /* ngx_str_t, lower case */
    ngx_array_t          routes;            /* sg_route_t */
    sg_route_t          *default_route;     /* the "*" route, or NULL */
    ngx_array_t          rules;             /* sg_rule_t, in order */
} sg_lists_t;


ngx_int_t sg_lists_init_worker(ngx_cycle_t *cycle, ngx_msec_t poll);
void sg_lists_exit_worker(void);

/* NULL until the lists were loaded once */
sg_lists_t *sg_lists_current(void);

sg_domain_t *sg_lists_domain(sg_lists_t *l, u_char *name, size_t len);
ngx_uint_t sg_lists_relay_allowed(sg_lists_t *l, struct sockaddr *sa);

/*
 * The STARTTLS whitelist and required list: sa (may be NULL) in an ip or
 * cidr entry, or host (may be NULL; a trailing dot is ignored) equal to a
 * name entry or below it.
 */
ngx_uint_t sg_lists_whitelisted(sg_lists_t *l, struct sockaddr *sa,
    ngx_str_t *host);
ngx_uint_t sg_lists_required(sg_lists_t *l, struct sockaddr *sa,
    ngx_str_t *host);

/* the route of domain (case-insensitive), else the "*" route, else NULL */
sg_route_t *sg_lists_route(sg_lists_t *l, ngx_str_t *domain);


#endif /* _SG_LISTS_H_INCLUDED_ */
