/*
 * Unit tests of the pure DNS part (common/sg_dns_rr.c): MX records in wire
 * form, RFC 7505 null MX, the RFC 5321, 5.1 order of MX hosts (and its
 * "own name" rule), IP literals (RFC 5321, 4.1.3).
 */

#include <stdlib.h>
#include <string.h>

#include "sg_dns_rr.h"
#include "sg_test.h"


#define MAX_MX  8


/* wire form as a C string literal: its length is given, NULs included */

typedef struct {
    const char      *name;
    const char      *wire;
    size_t           len;
    const char      *text;          /* NULL: refused */
    size_t           used;
} name_case_t;


typedef struct {
    const char      *name;
    const char      *rdata;
    size_t           len;
    int              ok;
    unsigned         pref;
    const char      *exchange;
} mx_case_t;


typedef struct {
    unsigned         pref;
    const char      *name;
} mx_in_t;


typedef struct {
    const char      *name;
    mx_in_t          in[MAX_MX];
    size_t           n;
    int              null_mx;
} null_case_t;


typedef struct {
    const char      *name;
    mx_in_t          in[MAX_MX];
    size_t           n;
    const unsigned  *rnd;           /* answers of the random function */
    const char      *out[MAX_MX];   /* names, in order */
    size_t           nout;
} order_case_t;


typedef struct {
    const char      *name;
    mx_in_t          in[MAX_MX];
    size_t           n;
    const char      *self;
    size_t           left;
} self_case_t;


typedef struct {
    const char      *in;
    int              family;        /* 0: refused */
    const char      *text;
} ip_case_t;


static const name_case_t  name_cases[] = {
    { "root", "\0", 1, "", 1 },
    { "two labels", "\4mail\7example\0", 14, "mail.example", 14 },
    { "lower-cased", "\2MX\7ExAmPlE\3COM\0", 16, "mx.example.com", 16 },
    { "digits, hyphen, underscore", "\5a-1_b\3com\0", 11, "a-1_b.com", 11 },
    { "stops at the root", "\1a\0junk", 7, "a", 3 },
    { "no root label", "\4mail", 5, NULL, 0 },
    { "label past the end", "\7exa", 4, NULL, 0 },
    { "empty input", "", 0, NULL, 0 },
    { "compression pointer", "\300\14", 2, NULL, 0 },
    { "reserved label type", "\100a\0", 3, NULL, 0 },
    { "dot inside a label", "\3a.b\0", 5, NULL, 0 },
    { "space inside a label", "\3a b\0", 5, NULL, 0 },
    { "NUL inside a label", "\3a\0b\0", 5, NULL, 0 },
    { "8-bit octet", "\3b\374r\0", 5, NULL, 0 },
};


static const mx_case_t  mx_cases[] = {
    /* RFC 1035 3.3.9 */
    { "MX 10 mx1.example", "\0\12\3mx1\7example\0", 15, 1, 10,
      "mx1.example" },
    { "MX 65535", "\377\377\1a\0", 5, 1, 65535, "a" },
    /* RFC 7505, 3: "MX 0 ." */
    { "null MX", "\0\0\0", 3, 1, 0, "" },
    { "no exchange at all", "\0\0", 2, 0, 0, NULL },
    { "too short", "\0", 1, 0, 0, NULL },
    { "octets after the name", "\0\1\1a\0\0", 6, 0, 0, NULL },
    { "exchange cut short", "\0\1\3mx", 5, 0, 0, NULL },
    { "compressed exchange", "\0\1\300\14", 4, 0, 0, NULL },
};


static const null_case_t  null_cases[] = {
    { "RFC 7505, 3: MX 0 . alone", { { 0, "" } }, 1, 1 },
    { "RFC 7505, 3: MX 10 . is no null MX", { { 10, "" } }, 1, 0 },
    { "RFC 7505, 3: null MX beside another MX",
      { { 0, "" }, { 10, "mx.example" } }, 2, 0 },
    { "an ordinary MX", { { 0, "mx.example" } }, 1, 0 },
    { "no MX", { { 0, NULL } }, 0, 0 },
};


static const unsigned  rnd_zero[] = { 0, 0, 0, 0, 0, 0, 0, 0 };
static const unsigned  rnd_keep[] = { 99, 99, 99, 99, 99, 99, 99, 99 };
static const unsigned  rnd_one[] = { 1, 1, 1, 1, 1, 1, 1, 1 };


static const order_case_t  order_cases[] = {
    { "RFC 5321, 5.1: lowest preference first",
      { { 30, "c" }, { 10, "a" }, { 20, "b" } }, 3, NULL,
      { "a", "b", "c" }, 3 },
    { "RFC 5321, 5.1: sort is stable without a random function",
      { { 20, "x" }, { 10, "a" }, { 20, "y" }, { 10, "b" } }, 4, NULL,
      { "a", "b", "x", "y" }, 4 },
    { "RFC 5321, 5.1: equal preferences shuffled (rnd 0)",
      { { 10, "a" }, { 10, "b" }, { 10, "c" }, { 20, "d" } }, 4, rnd_zero,
      /* Fisher-Yates: swap [2]<->[0] (c b a), then [1]<->[0] (b c a) */
      { "b", "c", "a", "d" }, 4 },
    { "RFC 5321, 5.1: shuffle within a run only (rnd 1)",
      { { 5, "p" }, { 10, "a" }, { 10, "b" }, { 20, "d" }, { 20, "e" } }, 5,
      rnd_one,
      /* run a,b: swap [1]<->[1]; run d,e: the same */
      { "p", "a", "b", "d", "e" }, 5 },
    { "a bad random function changes nothing",
      { { 10, "a" }, { 10, "b" } }, 2, rnd_keep, { "a", "b" }, 2 },
    { "RFC 7505, 3: a null MX beside other MX is no host",
      { { 0, "" }, { 10, "mx.example" } }, 2, NULL, { "mx.example" }, 1 },
    { "the root alone leaves nothing", { { 10, "" } }, 1, NULL, { NULL }, 0 },
    { "a name twice: its best preference kept",
      { { 20, "a" }, { 10, "b" }, { 5, "a" } }, 3, NULL, { "a", "b" }, 2 },
    { "nothing", { { 0, NULL } }, 0, NULL, { NULL }, 0 },
};


static const self_case_t  self_cases[] = {
    { "RFC 5321, 5.1: own name drops its level and higher",
      { { 10, "a" }, { 20, "self" }, { 20, "b" }, { 30, "c" } }, 4,
      "self", 1 },
    { "RFC 5321, 5.1: own name first: nothing left (bounce)",
      { { 10, "self" }, { 20, "b" } }, 2, "self", 0 },
    { "RFC 5321, 5.1: equals before own name dropped too",
      { { 10, "a" }, { 20, "b" }, { 20, "self" } }, 3, "self", 1 },
    { "own name compared without case",
      { { 10, "a" }, { 20, "SELF" } }, 2, "self", 1 },
    { "own name absent", { { 10, "a" }, { 20, "b" } }, 2, "self", 2 },
    { "no own name", { { 10, "a" } }, 1, "", 1 },
    { "a longer name is another name", { { 10, "selfish" } }, 1, "self", 1 },
};


static const ip_case_t  ip_cases[] = {
    { "192.0.2.1", 4, "192.0.2.1" },
    { "2001:db8::1", 6, "2001:db8::1" },
    { "::1", 6, "::1" },
    /* RFC 5321, 4.1.3: address literals */
    { "[192.0.2.1]", 4, "192.0.2.1" },
    { "[IPv6:2001:DB8::1]", 6, "2001:db8::1" },
    { "[ipv6:::1]", 6, "::1" },
    { "[::1]", 6, "::1" },
    { "[IPv6:192.0.2.1]", 0, NULL },
    { "[192.0.2.1", 0, NULL },
    { "[]", 0, NULL },
    { "192.0.2.01", 0, NULL },
    { "192.0.2", 0, NULL },
    { "fe80::1%eth0", 0, NULL },
    { "mail.example", 0, NULL },
    { "", 0, NULL },
    { "1.2.3.4.example", 0, NULL },
};


/* the random function of the tests: answers from a list, in turn */

typedef struct {
    const unsigned  *answers;
    size_t           next;
} rnd_state_t;


static unsigned long
rnd_list(void *data, unsigned long n)
{
    rnd_state_t  *st = data;

    return st->answers[st->next++ % MAX_MX];
}


static unsigned long
rnd_libc(void *data, unsigned long n)
{
    return (unsigned long) rand() % n;
}


static size_t
fill(sg_dns_rr_mx_t *mx, const mx_in_t *in, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++) {
        mx[i].pref = in[i].pref;
        strcpy(mx[i].name, in[i].name);
        mx[i].len = strlen(in[i].name);
    }

    return n;
}


static void
test_names(void)
{
    int          rc;
    size_t       i, used;
    char         out[SG_DNS_RR_NAME_MAX + 1];
    const name_case_t  *c;

    for (i = 0; i < sizeof(name_cases) / sizeof(name_cases[0]); i++) {
        c = &name_cases[i];
        used = 0;

        rc = sg_dns_rr_name((const unsigned char *) c->wire, c->len, &used,
                            out, sizeof(out));

        if (c->text == NULL) {
            CHECK(rc == -1, c->name);
            continue;
        }

        CHECK(rc == 0, c->name);
        CHECK(rc == 0 && strcmp(out, c->text) == 0, c->name);
        CHECK(used == c->used, c->name);
    }
}


static void
test_name_limits(void)
{
    size_t          i, o, used;
    unsigned char   wire[300];
    char            out[SG_DNS_RR_NAME_MAX + 1];

    /* RFC 1035 2.3.4: labels of 63 octets or less */

    wire[0] = 63;
    memset(wire + 1, 'a', 63);
    wire[64] = 0;
    CHECK(sg_dns_rr_name(wire, 65, &used, out, sizeof(out)) == 0
          && strlen(out) == 63, "a label of 63 octets");

    /* RFC 1035 2.3.4: names of 255 octets or less (wire form) */

    for (o = 0, i = 0; i < 4; i++) {
        wire[o++] = i < 3 ? 63 : 61;
        memset(wire + o, 'a', i < 3 ? 63 : 61);
        o += i < 3 ? 63 : 61;
    }

    wire[o++] = 0;
    CHECK(o == 255, "the test name is 255 octets");
    CHECK(sg_dns_rr_name(wire, o, &used, out, sizeof(out)) == 0
          && strlen(out) == 253, "a name of 255 octets (253 as text)");

    wire[3 * 64] = 62;
    memset(wire + 3 * 64 + 1, 'a', 62);
    wire[3 * 64 + 63] = 0;
    CHECK(sg_dns_rr_name(wire, 3 * 64 + 64, &used, out, sizeof(out)) == -1,
          "a name of 256 octets is refused");

    wire[0] = 63;
    memset(wire + 1, 'a', 63);
    wire[64] = 0;
    CHECK(sg_dns_rr_name(wire, 65, &used, out, 10) == -1,
          "a name longer than the buffer is refused");
}


static void
test_mx(void)
{
    int              rc;
    size_t           i;
    sg_dns_rr_mx_t   mx;
    const mx_case_t *c;

    for (i = 0; i < sizeof(mx_cases) / sizeof(mx_cases[0]); i++) {
        c = &mx_cases[i];

        rc = sg_dns_rr_mx((const unsigned char *) c->rdata, c->len, &mx);

        CHECK((rc == 0) == c->ok, c->name);

        if (rc == 0 && c->ok) {
            CHECK(mx.pref == c->pref, c->name);
            CHECK(strcmp(mx.name, c->exchange) == 0, c->name);
            CHECK(mx.len == strlen(c->exchange), c->name);
        }
    }
}


static void
test_null_mx(void)
{
    size_t             i, n;
    sg_dns_rr_mx_t     mx[MAX_MX];
    const null_case_t *c;

    for (i = 0; i < sizeof(null_cases) / sizeof(null_cases[0]); i++) {
        c = &null_cases[i];
        n = fill(mx, c->in, c->n);

        CHECK(sg_dns_rr_null_mx(mx, n) == c->null_mx, c->name);
    }
}


static void
test_order(void)
{
    size_t              i, j, n;
    rnd_state_t         st;
    sg_dns_rr_mx_t      mx[MAX_MX];
    const order_case_t *c;

    for (i = 0; i < sizeof(order_cases) / sizeof(order_cases[0]); i++) {
        c = &order_cases[i];
        n = fill(mx, c->in, c->n);

        st.answers = c->rnd;
        st.next = 0;

        n = sg_dns_rr_mx_order(mx, n, c->rnd ? rnd_list : NULL, &st);

        CHECK(n == c->nout, c->name);

        for (j = 0; j < n && j < c->nout; j++) {
            CHECK(strcmp(mx[j].name, c->out[j]) == 0, c->name);
        }
    }
}


static void
test_order_random(void)
{
    int             i, first_a, first_b;
    size_t          n;
    static const mx_in_t  in[] = {
        { 10, "a" }, { 10, "b" }, { 5, "best" }, { 20, "last" }
    };
    sg_dns_rr_mx_t  mx[MAX_MX];

    /* RFC 5321, 5.1: both orders of an equal pair appear, best stays */

    srand(7);
    first_a = 0;
    first_b = 0;

    for (i = 0; i < 200; i++) {
        n = fill(mx, in, 4);
        n = sg_dns_rr_mx_order(mx, n, rnd_libc, NULL);

        CHECK(n == 4 && strcmp(mx[0].name, "best") == 0
              && strcmp(mx[3].name, "last") == 0,
              "RFC 5321, 5.1: preferences kept while shuffling");

        if (strcmp(mx[1].name, "a") == 0) {
            first_a++;

        } else {
            first_b++;
        }
    }

    CHECK(first_a > 50 && first_b > 50,
          "RFC 5321, 5.1: equal preferences in random order");
}


static void
test_drop_self(void)
{
    size_t             i, n;
    sg_dns_rr_mx_t     mx[MAX_MX];
    const self_case_t *c;

    for (i = 0; i < sizeof(self_cases) / sizeof(self_cases[0]); i++) {
        c = &self_cases[i];
        n = fill(mx, c->in, c->n);

        CHECK(sg_dns_rr_mx_drop_self(mx, n, c->self, strlen(c->self))
              == c->left, c->name);
    }
}


static void
test_ip(void)
{
    int              rc;
    size_t           i;
    sg_dns_rr_ip_t   ip;
    char             text[SG_DNS_RR_IP_TEXT];
    const ip_case_t *c;

    for (i = 0; i < sizeof(ip_cases) / sizeof(ip_cases[0]); i++) {
        c = &ip_cases[i];

        rc = sg_dns_rr_ip_literal(c->in, strlen(c->in), &ip);

        if (c->family == 0) {
            CHECK(rc == -1, c->in);
            continue;
        }

        CHECK(rc == 0 && ip.family == c->family, c->in);
        CHECK(rc == 0 && sg_dns_rr_ip_text(&ip, text, sizeof(text)) == 0
              && strcmp(text, c->text) == 0, c->in);
    }

    /* not NUL-terminated: only len octets are read */
    CHECK(sg_dns_rr_ip_literal("192.0.2.1junk", 9, &ip) == 0
          && ip.family == 4, "length bounds the text");

    /* RFC 1035 3.4.1 and RFC 3596 2.2: rdata sizes */
    CHECK(sg_dns_rr_ip((const unsigned char *) "\177\0\0\1", 4, 4, &ip) == 0
          && sg_dns_rr_ip_text(&ip, text, sizeof(text)) == 0
          && strcmp(text, "127.0.0.1") == 0, "A rdata");
    CHECK(sg_dns_rr_ip((const unsigned char *) "\0\0\0\0\0\0\0\0"
                       "\0\0\0\0\0\0\0\1", 16, 6, &ip) == 0
          && sg_dns_rr_ip_text(&ip, text, sizeof(text)) == 0
          && strcmp(text, "::1") == 0, "AAAA rdata");
    CHECK(sg_dns_rr_ip((const unsigned char *) "\177\0\0", 3, 4, &ip) == -1,
          "A rdata of 3 octets");
    CHECK(sg_dns_rr_ip((const unsigned char *) "\177\0\0\1", 4, 6, &ip) == -1,
          "AAAA rdata of 4 octets");
}


static void
test_rcode(void)
{
    char  buf[32];

    CHECK(strcmp(sg_dns_rr_rcode(2, buf, sizeof(buf)), "SERVFAIL") == 0,
          "SERVFAIL");
    CHECK(strcmp(sg_dns_rr_rcode(3, buf, sizeof(buf)), "NXDOMAIN") == 0,
          "NXDOMAIN");
    CHECK(strcmp(sg_dns_rr_rcode(5, buf, sizeof(buf)), "REFUSED") == 0,
          "REFUSED");
    CHECK(strcmp(sg_dns_rr_rcode(23, buf, sizeof(buf)), "rcode 23") == 0,
          "unknown rcode");
    CHECK(strcmp(sg_dns_rr_rcode(-1, buf, sizeof(buf)), "rcode -1") == 0,
          "negative rcode");
}


int
main(void)
{
    test_names();
    test_name_limits();
    test_mx();
    test_null_mx();
    test_order();
    test_order_random();
    test_drop_self();
    test_ip();
    test_rcode();

    return SG_TEST_DONE();
}
