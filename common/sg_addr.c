/*
 * sg: validation and canonical forms of addresses typed by admins.
 * Pure C: see sg_addr.h.
 */

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "sg_addr.h"


#define SG_ADDR_IP_MAX        64      /* longer text is no address */


static int sg_addr_parse_ip(const char *s, size_t len, int *family,
    unsigned char *bin);
static size_t sg_addr_digits(const char *s, size_t len, unsigned long max,
    unsigned long *value);
static int sg_addr_all_numeric_tld(const char *s, size_t len);
static const char *sg_addr_mailto(const char *s, size_t len);
static const char *sg_addr_https(const char *s, size_t len);


/* family AF_INET or AF_INET6, bin 16 bytes; 0 on success */

static int
sg_addr_parse_ip(const char *s, size_t len, int *family, unsigned char *bin)
{
    char  buf[SG_ADDR_IP_MAX];

    if (len == 0 || len >= sizeof(buf) || memchr(s, '\0', len) != NULL) {
        return -1;
    }

    memcpy(buf, s, len);
    buf[len] = '\0';

    /* glibc's inet_pton refuses octets with leading zeros and zone ids */

    if (inet_pton(AF_INET, buf, bin) == 1) {
        *family = AF_INET;
        return 0;
    }

    if (inet_pton(AF_INET6, buf, bin) == 1) {
        *family = AF_INET6;
        return 0;
    }

    return -1;
}


/* decimal digits, no leading zero, value <= max; the digits used or 0 */

static size_t
sg_addr_digits(const char *s, size_t len, unsigned long max,
    unsigned long *value)
{
    size_t  i;

    *value = 0;

    for (i = 0; i < len && s[i] >= '0' && s[i] <= '9'; i++) {

        if (i > 0 && s[0] == '0') {
            return 0;
        }

        *value = *value * 10 + (s[i] - '0');

        if (*value > max) {
            return 0;
        }
    }

    return i;
}


const char *
sg_addr_ip(const char *s, size_t len, char *out, size_t size)
{
    int            family;
    unsigned char  bin[16];

    if (sg_addr_parse_ip(s, len, &family, bin) != 0) {
        return "is not an IPv4 or IPv6 address";
    }

    if (inet_ntop(family, bin, out, size) == NULL) {
        return "is too long";
    }

    return NULL;
}


const char *
sg_addr_network(const char *s, size_t len, char *out, size_t size)
{
    int             family;
    size_t          alen, n, i, bits;
    const char     *slash;
    unsigned long   prefix, max;
    unsigned char   bin[16], net[16];
    char            text[INET6_ADDRSTRLEN];

    slash = memchr(s, '/', len);
    alen = slash ? (size_t) (slash - s) : len;

    if (sg_addr_parse_ip(s, alen, &family, bin) != 0) {
        return slash ? "is not a network: the address before \"/\" is not"
                       " an IPv4 or IPv6 address"
                     : "is not an IPv4 or IPv6 address or network";
    }

    max = (family == AF_INET) ? 32 : 128;

    if (slash == NULL) {
        prefix = max;

    } else {
        n = sg_addr_digits(slash + 1, len - alen - 1, max, &prefix);

        if (n == 0 || n != len - alen - 1) {
            snprintf(out, size, "is not a network: the prefix length after"
                     " \"/\" must be a number from 0 to %lu", max);
            return out;
        }
    }

    /* RFC 4632 3.1: the bits after the prefix are zero */

    bits = prefix;
    memcpy(net, bin, sizeof(net));

    for (i = 0; i < max / 8; i++) {
        if (bits >= 8) {
            bits -= 8;
            continue;
        }

        net[i] &= (unsigned char) (0xff << (8 - bits));
        bits = 0;
    }

    if (inet_ntop(family, net, text, sizeof(text)) == NULL) {
        return "is not a network";
    }

    if (memcmp(net, bin, max / 8) != 0) {
        snprintf(out, size, "has host bits set after the /%lu prefix:"
                 " the network is %s/%lu", prefix, text, prefix);
        return out;
    }

    if ((size_t) snprintf(out, size, "%s/%lu", text, prefix) >= size) {
        return "is too long";
    }

    return NULL;
}


static int
sg_addr_all_numeric_tld(const char *s, size_t len)
{
    size_t  i;

    for (i = len; i > 0 && s[i - 1] != '.'; i--) {
        if (s[i - 1] < '0' || s[i - 1] > '9') {
            return 0;
        }
    }

    return 1;
}


const char *
sg_addr_host_name(const char *s, size_t len, unsigned flags, char *out,
    size_t size)
{
    char    c;
    size_t  i, label, n;

    n = 0;

    if (len >= 2 && s[0] == '*' && s[1] == '.') {
        if (!(flags & SG_ADDR_WILDCARD)) {
            return "is not a host name: a wildcard \"*.\" is not allowed here";
        }

        if (size < 3) {
            return "is too long";
        }

        out[n++] = '*';
        out[n++] = '.';
        s += 2;
        len -= 2;
    }

    if (len && s[len - 1] == '.') {
        len--;
    }

    if (len == 0) {
        return n ? "is not a host name: a name must follow \"*.\""
                 : "is empty";
    }

    if (len + n > SG_ADDR_NAME_MAX) {
        return "is not a host name: longer than 253 characters";
    }

    if (len + n + 1 > size) {
        return "is too long";
    }

    label = 0;

    for (i = 0; i < len; i++) {
        c = s[i];

        if (c == '.') {
            if (label == 0) {
                return "is not a host name: it has an empty label";
            }

            if (s[i - 1] == '-') {
                return "is not a host name: a label ends with \"-\"";
            }

            label = 0;
            out[n++] = c;
            continue;
        }

        if (c >= 'A' && c <= 'Z') {
            c = (char) (c - 'A' + 'a');

        } else if (c == '-') {
            if (label == 0) {
                return "is not a host name: a label starts with \"-\"";
            }

        } else if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))) {

            if ((unsigned char) c >= 0x80) {
                return "is not a host name: write internationalized names"
                       " as A-labels (xn--...)";
            }

            return "is not a host name: only letters, digits, \"-\" and"
                   " \".\" are allowed";
        }

        if (++label > SG_ADDR_LABEL_MAX) {
            return "is not a host name: a label is longer than 63"
                   " characters";
        }

        out[n++] = c;
    }

    if (label == 0) {
        return "is not a host name: it has an empty label";
    }

    if (s[len - 1] == '-') {
        return "is not a host name: a label ends with \"-\"";
    }

    if (sg_addr_all_numeric_tld(s, len)) {
        return "is not a valid IP address or host name (the last label"
               " of a name cannot be all digits)";
    }

    out[n] = '\0';

    return NULL;
}


const char *
sg_addr_peer(const char *s, size_t len, sg_addr_kind_t *kind, char *out,
    size_t size)
{
    const char  *err;

    *kind = SG_ADDR_INVALID;

    if (memchr(s, '/', len) != NULL) {
        err = sg_addr_network(s, len, out, size);
        if (err) {
            return err;
        }

        *kind = SG_ADDR_CIDR;
        return NULL;
    }

    if (sg_addr_ip(s, len, out, size) == NULL) {
        *kind = SG_ADDR_IP;
        return NULL;
    }

    if (memchr(s, ':', len) != NULL) {
        return "is not a valid IPv6 address";
    }

    err = sg_addr_host_name(s, len, 0, out, size);
    if (err) {
        return err;
    }

    *kind = SG_ADDR_NAME;
    return NULL;
}


const char *
sg_addr_host_port(const char *s, size_t len, char *out, size_t size)
{
    int             family;
    size_t          hlen, plen;
    const char     *colon, *close, *err;
    unsigned long   port;
    unsigned char   bin[16];
    char            host[SG_ADDR_TEXT_MAX];

    if (len == 0) {
        return "is empty: host:port is required";
    }

    if (s[0] == '[') {
        close = memchr(s, ']', len);

        if (close == NULL) {
            return "is not host:port: \"]\" is missing after the IPv6"
                   " address";
        }

        if (sg_addr_parse_ip(s + 1, close - s - 1, &family, bin) != 0
            || family != AF_INET6)
        {
            return "is not host:port: the address in brackets is not an"
                   " IPv6 address";
        }

        colon = close + 1;

        if (colon == s + len || *colon != ':') {
            return "is not host:port: the port is missing, e.g."
                   " [2001:db8::1]:25";
        }

        if (inet_ntop(AF_INET6, bin, host, sizeof(host)) == NULL) {
            return "is too long";
        }

    } else {
        colon = memchr(s, ':', len);

        if (colon == NULL) {
            return "is not host:port: the port is missing, e.g."
                   " mail.example.com:25";
        }

        if (memchr(colon + 1, ':', s + len - colon - 1) != NULL) {
            return "is not host:port: write an IPv6 address in brackets,"
                   " e.g. [2001:db8::1]:25";
        }

        hlen = colon - s;

        if (hlen == 0) {
            return "is not host:port: the host is missing";
        }

        if (sg_addr_parse_ip(s, hlen, &family, bin) == 0) {
            if (inet_ntop(AF_INET, bin, host, sizeof(host)) == NULL) {
                return "is too long";
            }

        } else {
            err = sg_addr_host_name(s, hlen, 0, host, sizeof(host));
            if (err) {
                return err;
            }
        }
    }

    plen = s + len - colon - 1;

    if (plen == 0 || sg_addr_digits(colon + 1, plen, 65535, &port) != plen
        || port == 0)
    {
        return "is not host:port: the port must be a number from 1 to 65535";
    }

    if ((size_t) snprintf(out, size, s[0] == '[' ? "[%s]:%lu" : "%s:%lu",
                          host, port)
        >= size)
    {
        return "is too long";
    }

    return NULL;
}


/* RFC 6068 2, kept simple: mailto:local@domain, no hfields */

static const char *
sg_addr_mailto(const char *s, size_t len)
{
    size_t       i;
    const char  *at;
    char         name[SG_ADDR_TEXT_MAX];

    at = memchr(s, '@', len);

    if (at == NULL || at == s) {
        return "has a mailto: URI without an address (mailto:local@domain)";
    }

    for (i = 0; i < (size_t) (at - s); i++) {
        if ((unsigned char) s[i] <= ' ' || (unsigned char) s[i] >= 0x7f
            || strchr("\"(),:;<>@[\\]!?", s[i]))
        {
            return "has a mailto: URI with a character not allowed in the"
                   " local part";
        }
    }

    if (sg_addr_host_name(at + 1, s + len - at - 1, 0, name, sizeof(name))
        != NULL || s[len - 1] == '.')
    {
        return "has a mailto: URI whose domain is not a domain name";
    }

    return NULL;
}


/* RFC 9110 4.2.2: https://host[:port][/path], no userinfo, no fragment */

static const char *
sg_addr_https(const char *s, size_t len)
{
    size_t       i, hlen;
    const char  *end;
    char         out[SG_ADDR_TEXT_MAX];

    end = s;

    while (end < s + len && *end != '/' && *end != '?') {
        end++;
    }

    hlen = end - s;

    if (hlen == 0) {
        return "has an https: URI without a host";
    }

    if (memchr(s, ':', hlen) || s[0] == '[') {
        if (sg_addr_host_port(s, hlen, out, sizeof(out)) != NULL) {
            return "has an https: URI whose host:port is not valid";
        }

    } else if (sg_addr_host_name(s, hlen, 0, out, sizeof(out)) != NULL
               && sg_addr_ip(s, hlen, out, sizeof(out)) != NULL)
    {
        return "has an https: URI whose host is not a host name";
    }

    for (i = hlen; i < len; i++) {
        if ((unsigned char) s[i] <= ' ' || (unsigned char) s[i] >= 0x7f
            || strchr("\"<>\\^`{|}#", s[i]))
        {
            return "has an https: URI with a character that must be"
                   " percent-encoded";
        }
    }

    return NULL;
}


const char *
sg_addr_tlsrpt_rua(const char *s, size_t len)
{
    size_t       n;
    const char  *p, *end, *uri, *err;

    if (len > SG_ADDR_RUA_MAX) {
        return "is longer than 2048 characters";
    }

    end = s + len;
    p = s;

    while (p < end && (*p == ' ' || *p == '\t')) {
        p++;
    }

    if (p == end) {
        return len ? "has no URI (use \"\" for none)" : NULL;
    }

    for ( ;; ) {
        uri = p;

        /* RFC 8460 3: a "," or "!" in a URI is percent-encoded */

        while (p < end && *p != ',' && *p != ' ' && *p != '\t') {
            if (*p == ';' || *p == '!' || (unsigned char) *p < ' '
                || (unsigned char) *p >= 0x7f)
            {
                return "has a character that must be percent-encoded"
                       " (\";\", \"!\", control or non-ASCII)";
            }

            p++;
        }

        n = p - uri;

        if (n == 0) {
            return "has an empty URI between commas";
        }

        if (n > 7 && strncasecmp(uri, "mailto:", 7) == 0) {
            err = sg_addr_mailto(uri + 7, n - 7);

        } else if (n > 8 && strncasecmp(uri, "https://", 8) == 0) {
            err = sg_addr_https(uri + 8, n - 8);

        } else {
            err = "has a URI that is neither mailto: nor https://";
        }

        if (err) {
            return err;
        }

        while (p < end && (*p == ' ' || *p == '\t')) {
            p++;
        }

        if (p == end) {
            return NULL;
        }

        if (*p != ',') {
            return "has URIs that are not separated by \",\"";
        }

        p++;

        while (p < end && (*p == ' ' || *p == '\t')) {
            p++;
        }

        if (p == end) {
            return "ends with \",\"";
        }
    }
}
