/*
 * sg: GET /api/v1/delivery/resolve/{domain}: where mail for a domain
 * would go, as the delivery engine sees it (common/sg_dns.c): the MX hosts
 * in the order they are tried, their addresses, null MX, implicit MX, and
 * why a lookup failed.
 *
 *   ?mx=0          the addresses of one host (a relay host), not its MX
 *   ?timeout=MS    answer within MS milliseconds (1 .. 30000)
 *   ?type=T        one raw query instead (sg_dns_query): T is txt, tlsa,
 *                  mx, a, aaaa or a number; the answer's records in hex
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"
#include "sg_addr.h"
#include "sg_dns.h"
#include "sg_dns_rr.h"


typedef struct {
    ngx_http_request_t  *request;
    sg_dns_req_t        *dns;
    ngx_str_t            domain;
    ngx_uint_t           rrtype;
} ngx_http_sgadmin_resolve_t;


typedef struct {
    const char          *name;
    ngx_uint_t           rrtype;
} ngx_http_sgadmin_rrtype_t;


static ngx_int_t ngx_http_sgadmin_resolve_type(ngx_str_t *arg,
    ngx_uint_t *rrtype);
static void ngx_http_sgadmin_resolve_done(void *data, sg_dns_route_t *route);
static void ngx_http_sgadmin_resolve_answer(void *data,
    sg_dns_answer_t *answer);
static json_t *ngx_http_sgadmin_resolve_json(ngx_http_sgadmin_resolve_t *rs,
    sg_dns_route_t *route);
static void ngx_http_sgadmin_resolve_cleanup(void *data);
static void ngx_http_sgadmin_resolve_invalid(ngx_http_request_t *r,
    const char *field, const char *message);


static const char  *ngx_http_sgadmin_resolve_status[] = {
    "ok", "null_mx", "not_found", "tempfail"
};


static const ngx_http_sgadmin_rrtype_t  ngx_http_sgadmin_rrtypes[] = {
    { "a", 1 },
    { "mx", 15 },
    { "txt", 16 },
    { "aaaa", 28 },
    { "tlsa", 52 },
    { NULL, 0 }
};


void
ngx_http_sgadmin_resolve(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx)
{
    ngx_str_t                    arg, domain;
    ngx_int_t                    n;
    ngx_uint_t                   mx, rrtype;
    ngx_msec_t                   timeout;
    const char                  *msg;
    sg_dns_rr_ip_t               ip;
    ngx_pool_cleanup_t          *cln;
    ngx_http_sgadmin_resolve_t  *rs;
    char                         canon[SG_ADDR_TEXT_MAX];

    mx = 1;
    rrtype = 0;
    timeout = SG_DNS_TIMEOUT;

    if (ngx_http_arg(r, (u_char *) "mx", 2, &arg) == NGX_OK) {
        if (arg.len != 1 || (arg.data[0] != '0' && arg.data[0] != '1')) {
            ngx_http_sgadmin_resolve_invalid(r, "mx", "must be 0 or 1");
            return;
        }

        mx = arg.data[0] - '0';
    }

    if (ngx_http_arg(r, (u_char *) "timeout", 7, &arg) == NGX_OK) {
        n = ngx_atoi(arg.data, arg.len);

        if (n < 1 || n > SG_DNS_TIMEOUT) {
            ngx_http_sgadmin_resolve_invalid(r, "timeout",
                                             "must be a number of"
                                             " milliseconds from 1 to 30000");
            return;
        }

        timeout = (ngx_msec_t) n;
    }

    if (ngx_http_arg(r, (u_char *) "type", 4, &arg) == NGX_OK
        && ngx_http_sgadmin_resolve_type(&arg, &rrtype) != NGX_OK)
    {
        ngx_http_sgadmin_resolve_invalid(r, "type",
                                         "must be txt, tlsa, mx, a, aaaa"
                                         " or a number from 1 to 65535");
        return;
    }

    /* the path is decoded already: "example.com", "[2001:db8::1]" */

    domain = ctx->param;

    /* raw queries take service labels too: "_mta-sts", "_25._tcp" */

    if (rrtype == 0
        && sg_dns_rr_ip_literal((char *) domain.data, domain.len, &ip) != 0)
    {
        msg = sg_addr_host_name((char *) domain.data, domain.len, 0, canon,
                                sizeof(canon));
        if (msg) {
            ngx_http_sgadmin_resolve_invalid(r, "domain", msg);
            return;
        }

        domain.len = ngx_strlen(canon);
        domain.data = ngx_pnalloc(r->pool, domain.len);
        if (domain.data == NULL) {
            ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                     "internal", "out of memory", NULL);
            return;
        }

        ngx_memcpy(domain.data, canon, domain.len);
    }

    rs = ngx_pcalloc(r->pool, sizeof(ngx_http_sgadmin_resolve_t));
    cln = ngx_pool_cleanup_add(r->pool, 0);

    if (rs == NULL || cln == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    rs->request = r;
    rs->domain = domain;
    rs->rrtype = rrtype;

    /* the request may end first (a lost client): the lookup goes with it */
    cln->handler = ngx_http_sgadmin_resolve_cleanup;
    cln->data = rs;

    if (rrtype) {
        rs->dns = sg_dns_query(&domain, rrtype,
                               ngx_http_sgadmin_resolve_answer, rs);

    } else {
        rs->dns = sg_dns_route_within(&domain, mx, timeout,
                                      ngx_http_sgadmin_resolve_done, rs);
    }

    if (rs->dns == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "dns-unavailable",
                                 "DNS is not available in this worker"
                                 " (see the error log)", NULL);
    }
}


static ngx_int_t
ngx_http_sgadmin_resolve_type(ngx_str_t *arg, ngx_uint_t *rrtype)
{
    ngx_int_t                         n;
    const ngx_http_sgadmin_rrtype_t  *t;

    for (t = ngx_http_sgadmin_rrtypes; t->name; t++) {
        if (arg->len == ngx_strlen(t->name)
            && ngx_strncasecmp(arg->data, (u_char *) t->name, arg->len) == 0)
        {
            *rrtype = t->rrtype;
            return NGX_OK;
        }
    }

    n = ngx_atoi(arg->data, arg->len);

    if (n < 1 || n > 65535) {
        return NGX_ERROR;
    }

    *rrtype = (ngx_uint_t) n;

    return NGX_OK;
}


static void
ngx_http_sgadmin_resolve_done(void *data, sg_dns_route_t *route)
{
    ngx_http_sgadmin_resolve_t  *rs = data;

    json_t              *body;
    ngx_http_request_t  *r;

    rs->dns = NULL;
    r = rs->request;

    body = ngx_http_sgadmin_resolve_json(rs, route);

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "sgadmin: resolve %V: %s%s%s", &rs->domain,
                  ngx_http_sgadmin_resolve_status[route->status],
                  route->reason ? ": " : "",
                  route->reason ? route->reason : "");

    ngx_destroy_pool(route->pool);

    if (body == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    ngx_http_sgadmin_send_json(r, NGX_HTTP_OK, body);
    json_decref(body);
}


/* a raw answer: its records in hex, TXT also as text (RFC 1035 3.3.14) */

static void
ngx_http_sgadmin_resolve_answer(void *data, sg_dns_answer_t *answer)
{
    ngx_http_sgadmin_resolve_t  *rs = data;

    u_char              *p, *last, *hex;
    size_t               n;
    json_t              *body, *rdata, *txt;
    ngx_uint_t           i;
    ngx_http_request_t  *r;

    rs->dns = NULL;
    r = rs->request;

    rdata = json_array();
    txt = json_array();
    body = NULL;

    if (rdata == NULL || txt == NULL) {
        goto done;
    }

    for (i = 0; i < answer->nrdata; i++) {
        hex = ngx_pnalloc(answer->pool, answer->rdata[i].len * 2);
        if (hex == NULL) {
            goto done;
        }

        last = ngx_hex_dump(hex, answer->rdata[i].data, answer->rdata[i].len);
        json_array_append_new(rdata, json_stringn((char *) hex, last - hex));

        if (rs->rrtype != 16) {
            continue;
        }

        /* character-strings, joined (RFC 7208 3.3, RFC 8461 3.1) */

        p = answer->rdata[i].data;
        last = p + answer->rdata[i].len;

        hex = ngx_pnalloc(answer->pool, answer->rdata[i].len + 1);
        if (hex == NULL) {
            goto done;
        }

        n = 0;

        while (p < last) {
            if ((size_t) (last - p - 1) < *p) {
                break;
            }

            ngx_memcpy(hex + n, p + 1, *p);
            n += *p;
            p += 1 + *p;
        }

        json_array_append_new(txt, json_stringn((char *) hex, n));
    }

    body = json_pack("{s:s%,s:I,s:i,s:b,s:b,s:b,s:o,s:s%,s:o}",
                     "domain", (char *) rs->domain.data, rs->domain.len,
                     "type", (json_int_t) rs->rrtype,
                     "rcode", (int) answer->rcode,
                     "havedata", (int) answer->havedata,
                     "secure", (int) answer->secure,
                     "bogus", (int) answer->bogus,
                     "why_bogus", answer->why_bogus
                                  ? json_string(answer->why_bogus)
                                  : json_null(),
                     "canonname", answer->canonname.data
                                  ? (char *) answer->canonname.data : "",
                     answer->canonname.len,
                     "rdata", rdata);
    rdata = NULL;

    if (body && rs->rrtype == 16) {
        json_object_set(body, "txt", txt);
    }

done:

    json_decref(rdata);
    json_decref(txt);

    ngx_destroy_pool(answer->pool);

    if (body == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    ngx_http_sgadmin_send_json(r, NGX_HTTP_OK, body);
    json_decref(body);
}


static json_t *
ngx_http_sgadmin_resolve_json(ngx_http_sgadmin_resolve_t *rs,
    sg_dns_route_t *route)
{
    json_t         *body, *hosts, *host, *addrs;
    ngx_uint_t      i, j;
    sg_dns_host_t  *h;

    hosts = json_array();
    if (hosts == NULL) {
        return NULL;
    }

    for (i = 0; i < route->nhosts; i++) {
        h = &route->hosts[i];

        addrs = json_array();
        if (addrs == NULL) {
            json_decref(hosts);
            return NULL;
        }

        for (j = 0; j < h->naddrs; j++) {
            json_array_append_new(addrs,
                                  json_stringn((char *) h->addrs[j].name.data,
                                               h->addrs[j].name.len));
        }

        host = json_pack("{s:s%,s:I,s:o,s:b,s:b}",
                         "name", (char *) h->name.data, h->name.len,
                         "pref", (json_int_t) h->pref,
                         "addresses", addrs,
                         "secure", (int) h->secure,
                         "tempfail", (int) h->tempfail);

        if (host == NULL) {
            json_decref(hosts);
            return NULL;
        }

        json_array_append_new(hosts, host);
    }

    body = json_pack("{s:s%,s:s,s:o,s:b,s:b,s:b,s:o}",
                     "domain", (char *) rs->domain.data, rs->domain.len,
                     "status", ngx_http_sgadmin_resolve_status[route->status],
                     "reason", route->reason ? json_string(route->reason)
                                             : json_null(),
                     "mx_secure", (int) route->mx_secure,
                     "implicit", (int) route->implicit,
                     "dnssec_validation", (int) sg_dns_validating(),
                     "hosts", hosts);

    return body;
}


static void
ngx_http_sgadmin_resolve_cleanup(void *data)
{
    ngx_http_sgadmin_resolve_t  *rs = data;

    if (rs->dns) {
        sg_dns_cancel(rs->dns);
        rs->dns = NULL;
    }
}


static void
ngx_http_sgadmin_resolve_invalid(ngx_http_request_t *r, const char *field,
    const char *message)
{
    json_t  *errors;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "sgadmin: %V: \"%s\" %s", &r->uri, field, message);

    errors = json_pack("[{s:s,s:s}]", "field", field, "message", message);

    ngx_http_sgadmin_problem(r, 422, "validation",
                             "the domain or the query is not valid", errors);
    json_decref(errors);
}
