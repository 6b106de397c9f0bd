/*
 * sg: MX records, null MX, MX order and IP literals.
 * Pure C: see sg_dns_rr.h.
 */

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "sg_dns_rr.h"


#define SG_DNS_RR_LITERAL_MAX  64      /* longer text is no address */


static int sg_dns_rr_host_char(unsigned char c);


static int
sg_dns_rr_host_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
           || (c >= '0' && c <= '9') || c == '-' || c == '_';
}


int
sg_dns_rr_name(const unsigned char *p, size_t len, size_t *used,
    char *out, size_t size)
{
    size_t  i, n, o, wire;

    i = 0;
    o = 0;

    for ( ;; ) {

        if (i >= len) {
            return -1;
        }

        n = p[i++];

        if (n == 0) {
            break;
        }

        if (n > SG_DNS_RR_LABEL_MAX) {
            /* 0xc0: a compression pointer; 0x40, 0x80: reserved */
            return -1;
        }

        if (n > len - i) {
            return -1;
        }

        wire = i + n + 1;       /* with the root label still to come */

        if (wire > SG_DNS_RR_WIRE_MAX) {
            return -1;
        }

        if (o + (o ? 1 : 0) + n + 1 > size || o + (o ? 1 : 0) + n
                                              > SG_DNS_RR_NAME_MAX)
        {
            return -1;
        }

        if (o) {
            out[o++] = '.';
        }

        for ( /* void */ ; n; n--, i++) {
            if (!sg_dns_rr_host_char(p[i])) {
                return -1;
            }

            out[o++] = (p[i] >= 'A' && p[i] <= 'Z') ? p[i] | 0x20 : p[i];
        }
    }

    if (size == 0) {
        return -1;
    }

    out[o] = '\0';
    *used = i;

    return 0;
}


int
sg_dns_rr_mx(const unsigned char *rdata, size_t len, sg_dns_rr_mx_t *mx)
{
    size_t  used;

    /* RFC 1035 3.3.9: PREFERENCE (16 bits), EXCHANGE (a domain name) */

    if (len < 3) {
        return -1;
    }

    mx->pref = (rdata[0] << 8) | rdata[1];

    if (sg_dns_rr_name(rdata + 2, len - 2, &used, mx->name, sizeof(mx->name))
        != 0)
    {
        return -1;
    }

    if (used != len - 2) {
        /* octets after the name */
        return -1;
    }

    mx->len = strlen(mx->name);

    return 0;
}


int
sg_dns_rr_null_mx(const sg_dns_rr_mx_t *mx, size_t n)
{
    /*
     * RFC 7505, 3: "The null MX RR is an ordinary MX record with an RDATA
     * section consisting of preference number 0 and a zero-length label,
     * written in master files as ".", as the exchange domain [...]  A
     * domain that advertises a null MX MUST NOT advertise any other MX RR."
     */

    return n == 1 && mx[0].pref == 0 && mx[0].len == 0;
}


size_t
sg_dns_rr_mx_order(sg_dns_rr_mx_t *mx, size_t n, sg_dns_rr_random_pt rnd,
    void *data)
{
    size_t          i, j, k, run;
    sg_dns_rr_mx_t  t;

    /* the root is no host: a (misplaced) null MX among others */

    for (i = 0, j = 0; i < n; i++) {
        if (mx[i].len == 0) {
            continue;
        }

        if (i != j) {
            mx[j] = mx[i];
        }

        j++;
    }

    n = j;

    /*
     * RFC 5321, 5.1: "The records are first ordered by preference, with
     * the lowest-numbered records being most preferred."  An insertion
     * sort: stable, and answers hold a handful of records.
     */

    for (i = 1; i < n; i++) {
        if (mx[i].pref >= mx[i - 1].pref) {
            continue;
        }

        t = mx[i];

        for (j = i; j > 0 && mx[j - 1].pref > t.pref; j--) {
            mx[j] = mx[j - 1];
        }

        mx[j] = t;
    }

    /* a name listed twice is tried once, at its best preference */

    for (i = 0, j = 0; i < n; i++) {

        for (k = 0; k < j; k++) {
            if (mx[k].len == mx[i].len
                && memcmp(mx[k].name, mx[i].name, mx[i].len) == 0)
            {
                break;
            }
        }

        if (k < j) {
            continue;
        }

        if (i != j) {
            mx[j] = mx[i];
        }

        j++;
    }

    n = j;

    /*
     * RFC 5321, 5.1: "If there are multiple destinations with the same
     * preference and there is no clear reason to favor one [...], then the
     * sender-SMTP MUST randomize them to spread the load across multiple
     * mail exchangers for a specific organization."  Fisher-Yates within
     * each run of equal preference.
     */

    if (rnd == NULL) {
        return n;
    }

    for (i = 0; i < n; i = j) {

        for (j = i + 1; j < n && mx[j].pref == mx[i].pref; j++) {
            /* void */
        }

        for (run = j - i; run > 1; run--) {
            k = i + rnd(data, run);

            if (k >= i + run) {
                /* a bad random function: keep the order */
                continue;
            }

            t = mx[i + run - 1];
            mx[i + run - 1] = mx[k];
            mx[k] = t;
        }
    }

    return n;
}


size_t
sg_dns_rr_mx_drop_self(sg_dns_rr_mx_t *mx, size_t n, const char *self,
    size_t self_len)
{
    size_t  i;

    if (self_len == 0) {
        return n;
    }

    /*
     * RFC 5321, 5.1: "The relay host MUST then inspect the list for any of
     * the names or addresses by which it might be known in mail
     * transactions.  If a matching record is found, all records at that
     * preference level and higher-numbered ones MUST be discarded from
     * consideration."
     */

    for (i = 0; i < n; i++) {
        if (mx[i].len == self_len
            && strncasecmp(mx[i].name, self, self_len) == 0)
        {
            break;
        }
    }

    if (i == n) {
        return n;
    }

    while (i > 0 && mx[i - 1].pref == mx[i].pref) {
        i--;
    }

    return i;
}


int
sg_dns_rr_ip_literal(const char *s, size_t len, sg_dns_rr_ip_t *ip)
{
    int   v6only;
    char  buf[SG_DNS_RR_LITERAL_MAX];

    v6only = 0;

    if (len >= 2 && s[0] == '[' && s[len - 1] == ']') {
        s++;
        len -= 2;

        /* RFC 5321, 4.1.3: IPv6-address-literal = "IPv6:" IPv6-addr */

        if (len > 5 && strncasecmp(s, "IPv6:", 5) == 0) {
            s += 5;
            len -= 5;
            v6only = 1;
        }
    }

    if (len == 0 || len >= sizeof(buf) || memchr(s, '\0', len) != NULL) {
        return -1;
    }

    memcpy(buf, s, len);
    buf[len] = '\0';

    /* glibc's inet_pton refuses octets with leading zeros and zone ids */

    if (!v6only && inet_pton(AF_INET, buf, ip->addr) == 1) {
        ip->family = 4;
        return 0;
    }

    if (inet_pton(AF_INET6, buf, ip->addr) == 1) {
        ip->family = 6;
        return 0;
    }

    return -1;
}


int
sg_dns_rr_ip(const unsigned char *rdata, size_t len, int family,
    sg_dns_rr_ip_t *ip)
{
    /* RFC 1035 3.4.1: A is 32 bits; RFC 3596 2.2: AAAA is 128 bits */

    if ((family == 4 && len != 4) || (family == 6 && len != 16)
        || (family != 4 && family != 6))
    {
        return -1;
    }

    memset(ip->addr, 0, sizeof(ip->addr));
    memcpy(ip->addr, rdata, len);
    ip->family = family;

    return 0;
}


int
sg_dns_rr_ip_text(const sg_dns_rr_ip_t *ip, char *out, size_t size)
{
    if (inet_ntop(ip->family == 4 ? AF_INET : AF_INET6, ip->addr, out,
                  (socklen_t) size)
        == NULL)
    {
        return -1;
    }

    return 0;
}


const char *
sg_dns_rr_rcode(int rcode, char *buf, size_t size)
{
    /* RFC 1035 4.1.1 and RFC 2136 2.2 */

    static const char  *names[] = {
        "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
        "YXDOMAIN", "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE"
    };

    if (rcode >= 0 && (size_t) rcode < sizeof(names) / sizeof(names[0])) {
        return names[rcode];
    }

    snprintf(buf, size, "rcode %d", rcode);

    return buf;
}
