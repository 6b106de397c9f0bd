/*
 * sg: the outbound TLS decision (DESIGN.md, "The outbound TLS decision"),
 * pure: one function, the facts about a message and an MX host in, a
 * named level and a reason out.  Postfix's vocabulary names the levels.
 */

#ifndef _SG_TLS_POLICY_H_INCLUDED_
#define _SG_TLS_POLICY_H_INCLUDED_


typedef enum {
    SG_TLS_NONE = 0,        /* clear text, STARTTLS is not attempted */
    SG_TLS_MAY,             /* STARTTLS when offered, any certificate */
    SG_TLS_ENCRYPT,         /* STARTTLS must succeed, any certificate */
    SG_TLS_DANE,            /* STARTTLS, certificate authenticated by TLSA */
    SG_TLS_VERIFY           /* STARTTLS, WebPKI certificate matching H */
} sg_tls_level_e;


typedef enum {
    SG_STS_NONE = 0,        /* no policy (or mode none) */
    SG_STS_TESTING,
    SG_STS_ENFORCE
} sg_sts_mode_e;


typedef struct {
    /* the message */
    unsigned        requiretls:1;          /* flagged (any source) */
    unsigned        tls_required_no:1;     /* "TLS-Required: No" */
    unsigned        requiretls_dsn:1;      /* a DSN of a flagged message */

    /* the settings */
    unsigned        requiretls_enabled:1;
    unsigned        mta_sts_enabled:1;
    unsigned        starttls_outbound:1;   /* "whenever possible" */
    unsigned        tls_failure_fallback:1;

    /* what DNS, policies and lists say about host H (address A) */
    unsigned        dane:1;                /* usable DNSSEC-valid TLSA */
    unsigned        mx_dnssec:1;           /* the MX answer was secure */
    unsigned        configured_host:1;     /* H is a route's relay host or
                                              a local domain's server, set
                                              by the admin, not from MX */
    sg_sts_mode_e   sts_mode;
    unsigned        sts_mx_match:1;        /* H matches the policy's mx */
    unsigned        on_required_list:1;    /* H or A */
    unsigned        on_whitelist:1;        /* H, A or the domain */
    unsigned        on_failure_list:1;     /* the hourly list */
    unsigned        internal_trusted:1;    /* local domain's server, trusted
                                              for REQUIRETLS */
} sg_tls_facts_t;


typedef struct {
    sg_tls_level_e  level;
    int             rule;                  /* row of the table, 1..7 */
    const char     *reason;                /* for people: log, queue, DSN */

    unsigned        skip:1;                /* do not use this MX at all */
    unsigned        send_requiretls:1;     /* MAIL FROM ... REQUIRETLS */
    unsigned        need_requiretls:1;     /* EHLO must list REQUIRETLS */
    unsigned        bounce:1;              /* failure bounces (5.7.x) */
    unsigned        fallback:1;            /* a failed handshake may retry
                                              in clear and list the host */
    unsigned        retry_clear:1;         /* a failed handshake retries
                                              in clear, the host unlisted */
    unsigned        report_sts:1;          /* testing: record failures */
} sg_tls_decision_t;


void sg_tls_decide(const sg_tls_facts_t *f, sg_tls_decision_t *d);

const char *sg_tls_level_name(sg_tls_level_e level);


#endif /* _SG_TLS_POLICY_H_INCLUDED_ */
