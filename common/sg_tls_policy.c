/*
 * sg: the outbound TLS decision, pure.  Strongest rule first; conflicts
 * go to the more secure rule (DESIGN.md).
 */

#include <string.h>

#include "sg_tls_policy.h"


void
sg_tls_decide(const sg_tls_facts_t *f, sg_tls_decision_t *d)
{
    int  relaxed;

    memset(d, 0, sizeof(sg_tls_decision_t));

    /* 1. RFC 8689, 4.1 and 5: REQUIRETLS; no whitelist, no fallback */

    if (f->requiretls && f->requiretls_enabled) {
        d->rule = 1;
        d->bounce = 1;

        /*
         * The MX must not come from a spoofable answer: DNSSEC, or an
         * MTA-STS policy in enforce mode naming it.  A host the admin
         * configured (a route, a local domain's server) is looked up by
         * no MX: its name is authentic, and the certificate is verified
         * against it (RFC-NOTES, our decision).
         */
        if (!(f->dane || f->mx_dnssec || f->configured_host
              || (f->mta_sts_enabled && f->sts_mode == SG_STS_ENFORCE
                  && f->sts_mx_match)))
        {
            d->skip = 1;
            d->level = SG_TLS_VERIFY;
            d->reason = "REQUIRETLS: the MX host is validated neither by an"
                        " MTA-STS policy in enforce mode nor by DNSSEC"
                        " (RFC 8689, 4.1)";
            return;
        }

        d->level = f->dane ? SG_TLS_DANE : SG_TLS_VERIFY;
        d->send_requiretls = 1;
        d->need_requiretls = !f->internal_trusted;
        d->reason = f->internal_trusted
                    ? "REQUIRETLS: verified TLS; the internal server is"
                      " trusted without the REQUIRETLS keyword"
                    : "REQUIRETLS: verified TLS and REQUIRETLS at the next"
                      " hop (RFC 8689, 4.1)";
        return;
    }

    /*
     * RFC 8689, 5: "TLS-Required: No" — deliver even when DANE, MTA-STS
     * or certificate checks fail, still trying STARTTLS.
     */

    relaxed = f->tls_required_no
              && (f->dane || (f->mta_sts_enabled
                              && f->sts_mode != SG_STS_NONE));

    /*
     * the admin's required list and whitelist still hold: the header
     * relaxes the recipient's policies, not the sender side's lists
     */
    if (relaxed && !f->on_required_list && !f->on_whitelist) {
        d->rule = f->dane ? 2 : 3;
        d->level = SG_TLS_MAY;
        /* a failed handshake retries in clear, as for unflagged mail */
        d->fallback = f->tls_failure_fallback;
        d->report_sts = (f->mta_sts_enabled && f->sts_mode != SG_STS_NONE);
        d->reason = "TLS-Required: No: STARTTLS when offered, policy"
                    " failures do not stop delivery (RFC 8689, 5)";
        return;
    }

    /* 2. RFC 7672, 2.2: usable TLSA records; no downgrade */

    if (f->dane && !relaxed) {
        d->rule = 2;
        d->level = SG_TLS_DANE;
        d->reason = "DANE: TLSA records, DNSSEC-valid (RFC 7672, 2.2)";
        return;
    }

    /* 3. RFC 8461, 4.1 and 5: MTA-STS enforce */

    if (f->mta_sts_enabled && f->sts_mode == SG_STS_ENFORCE && !relaxed) {
        d->rule = 3;
        d->level = SG_TLS_VERIFY;

        if (!f->sts_mx_match) {
            d->skip = 1;
            d->reason = "MTA-STS enforce: the MX host does not match the"
                        " policy (RFC 8461, 4.1)";
            return;
        }

        d->reason = "MTA-STS enforce: STARTTLS with a valid certificate"
                    " (RFC 8461, 5)";
        return;
    }

    /* RFC 8461, 5: testing changes nothing but what is reported */

    d->report_sts = (f->mta_sts_enabled
                     && (f->sts_mode == SG_STS_TESTING
                         || (relaxed && f->sts_mode == SG_STS_ENFORCE)));

    /* 4. the STARTTLS required list: more secure than the whitelist */

    if (f->on_required_list) {
        d->rule = 4;
        d->level = SG_TLS_ENCRYPT;
        d->reason = "STARTTLS required list: STARTTLS must succeed";
        return;
    }

    /* 5. the STARTTLS whitelist */

    if (f->on_whitelist) {
        d->rule = 5;
        d->level = SG_TLS_NONE;
        d->reason = "STARTTLS whitelist: never STARTTLS";
        return;
    }

    /* 6. "Send messages with STARTTLS whenever possible" */

    if (f->starttls_outbound) {
        d->rule = 6;

        if (f->tls_failure_fallback && f->on_failure_list) {
            d->level = SG_TLS_NONE;
            d->reason = "TLS failed with this host within the hour: sent"
                        " without STARTTLS until the list is reset";
            return;
        }

        d->level = SG_TLS_MAY;
        d->fallback = f->tls_failure_fallback;
        /* RFC 8689, 5: the bounce of a flagged message is not discarded */
        d->retry_clear = f->requiretls_dsn && f->requiretls_enabled;
        d->reason = "STARTTLS whenever possible";
        return;
    }

    /*
     * 7.  RFC 8689, 5: the DSN of a flagged message is sent with
     * REQUIRETLS when the next hop supports it, which only a post-TLS
     * EHLO tells: STARTTLS is tried for it, unverified, never required;
     * a failed handshake retries it in clear
     */

    if (f->requiretls_dsn && f->requiretls_enabled) {
        d->rule = 7;
        d->level = SG_TLS_MAY;
        d->retry_clear = 1;         /* not discarded when TLS fails */
        d->reason = "the bounce of a REQUIRETLS message: STARTTLS when"
                    " offered, to send it with REQUIRETLS (RFC 8689, 5)";
        return;
    }

    d->rule = 7;
    d->level = SG_TLS_NONE;
    d->reason = "STARTTLS for outbound mail is off in the settings";
}


const char *
sg_tls_level_name(sg_tls_level_e level)
{
    static const char  *names[] = { "none", "may", "encrypt", "dane",
                                    "verify" };

    if ((unsigned) level >= sizeof(names) / sizeof(names[0])) {
        return "unknown";
    }

    return names[level];
}
