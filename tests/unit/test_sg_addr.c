/*
 * Unit tests of the address validators (common/sg_addr.c): what the admin
 * API accepts for the STARTTLS whitelist, relay networks and domains, and
 * the canonical form it stores.
 */

#include <string.h>

#include "sg_addr.h"
#include "sg_test.h"


typedef struct {
    const char      *in;
    const char      *out;       /* canonical form, NULL: refused */
    const char      *msg;       /* a part of the message when refused */
} sg_addr_case_t;


typedef struct {
    const char      *in;
    sg_addr_kind_t   kind;      /* SG_ADDR_INVALID: refused */
    const char      *out;
} sg_addr_peer_case_t;


static const sg_addr_case_t  ip_cases[] = {
    { "192.0.2.1", "192.0.2.1", NULL },
    { "0.0.0.0", "0.0.0.0", NULL },
    { "2001:DB8:0:0:0:0:0:1", "2001:db8::1", NULL },     /* RFC 5952 */
    { "::1", "::1", NULL },
    { "::ffff:192.0.2.1", "::ffff:192.0.2.1", NULL },
    { "192.0.2.256", NULL, "not an IPv4" },
    { "192.0.2", NULL, "not an IPv4" },
    { "192.0.2.01", NULL, "not an IPv4" },               /* leading zero */
    { "fe80::1%eth0", NULL, "not an IPv4" },              /* zone id */
    { "", NULL, "not an IPv4" },
    { " 192.0.2.1", NULL, "not an IPv4" },
};


static const sg_addr_case_t  network_cases[] = {
    { "10.0.0.0/8", "10.0.0.0/8", NULL },
    { "192.0.2.1", "192.0.2.1/32", NULL },
    { "192.0.2.1/32", "192.0.2.1/32", NULL },
    { "0.0.0.0/0", "0.0.0.0/0", NULL },
    { "2001:DB8::/32", "2001:db8::/32", NULL },
    { "2001:db8::1", "2001:db8::1/128", NULL },
    { "::/0", "::/0", NULL },
    { "10.1.2.3/8", NULL, "the network is 10.0.0.0/8" },
    { "192.168.1.129/25", NULL, "the network is 192.168.1.128/25" },
    { "2001:db8::1/64", NULL, "the network is 2001:db8::/64" },
    { "10.0.0.0/33", NULL, "from 0 to 32" },
    { "2001:db8::/129", NULL, "from 0 to 128" },
    { "10.0.0.0/", NULL, "prefix length" },
    { "10.0.0.0/08", NULL, "prefix length" },
    { "10.0.0.0/8x", NULL, "prefix length" },
    { "10.0.0.0/-1", NULL, "prefix length" },
    { "mail.example.com/8", NULL, "before \"/\"" },
    { "mail.example.com", NULL, "not an IPv4" },
};


static const sg_addr_case_t  name_cases[] = {
    { "Mail.Example.COM", "mail.example.com", NULL },
    { "example.com.", "example.com", NULL },             /* trailing dot */
    { "localhost", "localhost", NULL },                  /* one label */
    { "xn--bcher-kva.example", "xn--bcher-kva.example", NULL },
    { "a-b.c1", "a-b.c1", NULL },
    { "", NULL, "empty" },
    { ".", NULL, "empty" },
    { "a..b", NULL, "empty label" },
    { ".a", NULL, "empty label" },
    { "-a.com", NULL, "starts with" },
    { "a-.com", NULL, "ends with" },
    { "a.com-", NULL, "ends with" },
    { "a_b.com", NULL, "only letters" },
    { "a b.com", NULL, "only letters" },
    { "b\xc3\xbc" "cher.example", NULL, "A-labels" },
    { "1.2.3.4", NULL, "all digits" },
    { "1.2.3.999", NULL, "all digits" },
    { "*.example.com", NULL, "wildcard" },
    { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.com",
      NULL, "longer than 63" },
};


static const sg_addr_case_t  wildcard_cases[] = {
    { "*.Example.com", "*.example.com", NULL },
    { "mx.example.com", "mx.example.com", NULL },
    { "*.", NULL, "must follow" },
    { "a.*.example.com", NULL, "only letters" },
    { "**.example.com", NULL, "only letters" },
};


static const sg_addr_peer_case_t  peer_cases[] = {
    { "192.0.2.7", SG_ADDR_IP, "192.0.2.7" },
    { "2001:DB8::7", SG_ADDR_IP, "2001:db8::7" },
    { "192.0.2.0/24", SG_ADDR_CIDR, "192.0.2.0/24" },
    { "2001:db8::/48", SG_ADDR_CIDR, "2001:db8::/48" },
    { "MX.Example.com.", SG_ADDR_NAME, "mx.example.com" },
    { "localhost", SG_ADDR_NAME, "localhost" },
    { "192.0.2.1/24", SG_ADDR_INVALID, NULL },
    { "192.0.2.300", SG_ADDR_INVALID, NULL },
    { "2001:db8::zz", SG_ADDR_INVALID, NULL },
    { "*.example.com", SG_ADDR_INVALID, NULL },
    { "exa mple.com", SG_ADDR_INVALID, NULL },
    { "", SG_ADDR_INVALID, NULL },
};


static const sg_addr_case_t  host_port_cases[] = {
    { "mail.internal:25", "mail.internal:25", NULL },
    { "Mail.Example.com:2525", "mail.example.com:2525", NULL },
    { "192.0.2.10:25", "192.0.2.10:25", NULL },
    { "[2001:DB8::10]:25", "[2001:db8::10]:25", NULL },
    { "exchange:65535", "exchange:65535", NULL },
    { "mail.internal", NULL, "port is missing" },
    { "mail.internal:", NULL, "from 1 to 65535" },
    { "mail.internal:0", NULL, "from 1 to 65535" },
    { "mail.internal:65536", NULL, "from 1 to 65535" },
    { "mail.internal:025", NULL, "from 1 to 65535" },
    { "mail.internal:25x", NULL, "from 1 to 65535" },
    { "2001:db8::10:25", NULL, "brackets" },
    { "[2001:db8::10]", NULL, "port is missing" },
    { "[2001:db8::10:25", NULL, "\"]\" is missing" },
    { "[192.0.2.1]:25", NULL, "not an IPv6" },
    { ":25", NULL, "host is missing" },
    { "", NULL, "empty" },
    { "bad_host:25", NULL, "only letters" },
    { "192.0.2.300:25", NULL, "all digits" },
};


static const sg_addr_case_t  rua_cases[] = {
    { "", "", NULL },
    { "mailto:tlsrpt@example.com", "", NULL },
    { "MAILTO:tlsrpt@example.com", "", NULL },
    { "https://reports.example.com/v1/tlsrpt", "", NULL },
    { "https://reports.example.com:8443", "", NULL },
    { "mailto:a@example.com,https://r.example.com/x?y=1", "", NULL },
    { "mailto:a@example.com , mailto:b+tls@example.org", "", NULL },
    { "  ", NULL, "no URI" },
    { "http://reports.example.com/", NULL, "neither" },
    { "tlsrpt@example.com", NULL, "neither" },
    { "mailto:", NULL, "neither" },
    { "mailto:@example.com", NULL, "without an address" },
    { "mailto:a@b_c.com", NULL, "domain" },
    { "mailto:a@example.com,", NULL, "ends with" },
    { "mailto:a@example.com,,mailto:b@example.com", NULL, "empty URI" },
    { "mailto:a@example.com mailto:b@example.com", NULL, "separated" },
    { "mailto:a@example.com;mailto:b@example.com", NULL, "percent" },
    { "https://", NULL, "neither" },
    { "https:///path", NULL, "without a host" },
    { "https://bad host/", NULL, "separated" },
    { "https://r.example.com/a|b", NULL, "percent-encoded" },
    { "https://r.example.com:0/", NULL, "host:port" },
};


#define N(a)  (sizeof(a) / sizeof((a)[0]))


static void
check_case(const char *what, const sg_addr_case_t *c, const char *err,
    const char *out)
{
    char  name[512];

    snprintf(name, sizeof(name), "%s \"%s\" -> %s", what, c->in,
             err ? err : out);

    if (c->out) {
        CHECK(err == NULL, name);
        CHECK(err != NULL || strcmp(out, c->out) == 0, name);

    } else {
        CHECK(err != NULL, name);
        CHECK(err == NULL || strstr(err, c->msg) != NULL, name);
    }
}


int
main(void)
{
    size_t           i;
    const char      *err;
    sg_addr_kind_t   kind;
    char             out[SG_ADDR_TEXT_MAX], big[300], name[400];

    for (i = 0; i < N(ip_cases); i++) {
        err = sg_addr_ip(ip_cases[i].in, strlen(ip_cases[i].in), out,
                         sizeof(out));
        check_case("ip", &ip_cases[i], err, out);
    }

    for (i = 0; i < N(network_cases); i++) {
        err = sg_addr_network(network_cases[i].in,
                              strlen(network_cases[i].in), out, sizeof(out));
        check_case("network", &network_cases[i], err, out);
    }

    for (i = 0; i < N(name_cases); i++) {
        err = sg_addr_host_name(name_cases[i].in, strlen(name_cases[i].in),
                                0, out, sizeof(out));
        check_case("name", &name_cases[i], err, out);
    }

    for (i = 0; i < N(wildcard_cases); i++) {
        err = sg_addr_host_name(wildcard_cases[i].in,
                                strlen(wildcard_cases[i].in),
                                SG_ADDR_WILDCARD, out, sizeof(out));
        check_case("mx pattern", &wildcard_cases[i], err, out);
    }

    for (i = 0; i < N(peer_cases); i++) {
        err = sg_addr_peer(peer_cases[i].in, strlen(peer_cases[i].in), &kind,
                           out, sizeof(out));
        snprintf(name, sizeof(name), "peer \"%s\"", peer_cases[i].in);
        CHECK(kind == peer_cases[i].kind, name);
        CHECK((err == NULL) == (peer_cases[i].kind != SG_ADDR_INVALID), name);
        CHECK(err || strcmp(out, peer_cases[i].out) == 0, name);
    }

    for (i = 0; i < N(host_port_cases); i++) {
        err = sg_addr_host_port(host_port_cases[i].in,
                                strlen(host_port_cases[i].in), out,
                                sizeof(out));
        check_case("host:port", &host_port_cases[i], err, out);
    }

    for (i = 0; i < N(rua_cases); i++) {
        out[0] = '\0';
        err = sg_addr_tlsrpt_rua(rua_cases[i].in, strlen(rua_cases[i].in));
        check_case("rua", &rua_cases[i], err, out);
    }

    /* RFC 1035 2.3.4: 253 characters is the longest name */

    for (i = 0; i < 253; i++) {
        big[i] = (i % 2) ? '.' : 'a';
    }

    big[252] = 'a';
    CHECK(sg_addr_host_name(big, 253, 0, out, sizeof(out)) == NULL,
          "name of 253 characters");
    CHECK(strlen(out) == 253, "name of 253 characters kept whole");

    big[253] = '.';
    CHECK(sg_addr_host_name(big, 254, 0, out, sizeof(out)) == NULL,
          "name of 253 characters and the root dot");

    big[253] = 'a';
    CHECK(sg_addr_host_name(big, 254, 0, out, sizeof(out)) != NULL,
          "name of 254 characters");

    /* a small output buffer is refused, not overrun */

    CHECK(sg_addr_host_name("example.com", 11, 0, out, 8) != NULL,
          "small buffer");

    /* text is not NUL-terminated: only len counts */

    CHECK(sg_addr_ip("192.0.2.1XYZ", 9, out, sizeof(out)) == NULL
          && strcmp(out, "192.0.2.1") == 0, "ip length bound");
    CHECK(sg_addr_ip("192.0.2.1\0", 10, out, sizeof(out)) != NULL,
          "ip with NUL");

    return SG_TEST_DONE();
}
