/*
 * sg: hosting the MTA-STS policies of local domains (RFC 8461).
 *
 *   GET /.well-known/mta-sts.txt       with "Host: mta-sts.<local domain>":
 *                                      that domain's policy (RFC 8461,
 *                                      3.2, 3.3), text/plain, no token
 *   GET /api/v1/domains/{id}/dns       the DNS records an operator
 *                                      publishes for a local domain, each
 *                                      compared with what live DNS says
 *
 * The policy comes from the worker's lists (common/sg_lists.c): written
 * once per change, read back by sg's own parser, reloaded on NOTIFY within
 * moments of a change through /api/v1/domains, and served while PostgreSQL
 * is down.  The certificate is the one every TLS server of the admin module
 * serves: the active one (common/sg_tls.c), installed in
 * ngx_http_sgadmin_postconfiguration().
 *
 * The records: MX (to sg's own host name: the active certificate's host
 * name, else the machine's), mta-sts.<domain> (a CNAME to that name, or
 * its addresses), _mta-sts.<domain> TXT "v=STSv1; id=<id>" and, when the
 * domain has a TLS-RPT address, _smtp._tls.<domain> TXT "v=TLSRPTv1;
 * rua=<rua>".  Live DNS is asked through sg's resolver (common/sg_dns.c).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"
#include "sg_dns.h"
#include "sg_dns_rr.h"
#include "sg_lists.h"
#include "sg_mta_sts.h"
#include "sg_sts_host.h"


#define NGX_HTTP_SGADMIN_STS_HOST_PREFIX  "mta-sts."
#define NGX_HTTP_SGADMIN_STS_TIMEOUT      10000     /* ms, address lookups */
#define NGX_HTTP_SGADMIN_STS_LIVE_MAX     16        /* records shown */

/* the lookups of the dns endpoint, in the order of its records */
#define NGX_HTTP_SGADMIN_STS_MX           0         /* MX <domain> */
#define NGX_HTTP_SGADMIN_STS_POLICY_HOST  1         /* mta-sts.<domain> */
#define NGX_HTTP_SGADMIN_STS_TXT          2         /* _mta-sts.<domain> */
#define NGX_HTTP_SGADMIN_STS_TLSRPT       3         /* _smtp._tls.<domain> */
#define NGX_HTTP_SGADMIN_STS_SELF         4         /* sg's host name */
#define NGX_HTTP_SGADMIN_STS_LOOKUPS      5


typedef struct ngx_http_sgadmin_dns_s  ngx_http_sgadmin_dns_t;


typedef struct {
    ngx_http_sgadmin_dns_t  *dns;
    sg_dns_req_t            *req;           /* while asked */
    ngx_str_t                name;
    ngx_uint_t               rrtype;        /* 0: addresses (route) */
    json_t                  *live;          /* what DNS said, as text */
    const char              *error;         /* no answer: why */
} ngx_http_sgadmin_lookup_t;


struct ngx_http_sgadmin_dns_s {
    ngx_http_request_t         *request;
    json_t                     *row;        /* the domain, from PostgreSQL */
    ngx_str_t                   name;       /* the domain */
    ngx_str_t                   self;       /* sg's host name */
    const char                 *self_from;  /* "certificate", "hostname" */
    ngx_uint_t                  waiting;
    ngx_http_sgadmin_lookup_t   lookups[NGX_HTTP_SGADMIN_STS_LOOKUPS];
};


static void ngx_http_sgadmin_sts_send(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx, ngx_str_t *policy);
static void ngx_http_sgadmin_dns_row(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static ngx_int_t ngx_http_sgadmin_dns_ask(ngx_http_sgadmin_dns_t *dns,
    ngx_uint_t index, const char *prefix, ngx_str_t *name,
    ngx_uint_t rrtype);
static void ngx_http_sgadmin_dns_answer(void *data, sg_dns_answer_t *answer);
static void ngx_http_sgadmin_dns_route(void *data, sg_dns_route_t *route);
static const char *ngx_http_sgadmin_dns_rcode(ngx_http_sgadmin_lookup_t *lk,
    ngx_int_t rcode);
static void ngx_http_sgadmin_dns_done(ngx_http_sgadmin_dns_t *dns);
static json_t *ngx_http_sgadmin_dns_json(ngx_http_sgadmin_dns_t *dns);
static json_t *ngx_http_sgadmin_dns_policy(ngx_http_sgadmin_dns_t *dns,
    sg_sts_mode_e mode, const char *mode_text, const char *id);
static json_t *ngx_http_sgadmin_dns_certificate(ngx_http_sgadmin_dns_t *dns,
    json_t *warnings);
static json_t *ngx_http_sgadmin_dns_mx(ngx_http_sgadmin_dns_t *dns,
    sg_sts_mode_e mode, json_t *warnings);
static json_t *ngx_http_sgadmin_dns_policy_host(ngx_http_sgadmin_dns_t *dns,
    sg_sts_mode_e mode);
static json_t *ngx_http_sgadmin_dns_sts_txt(ngx_http_sgadmin_dns_t *dns,
    sg_sts_mode_e mode, const char *id);
static json_t *ngx_http_sgadmin_dns_tlsrpt(ngx_http_sgadmin_dns_t *dns,
    const char *rua);
static json_t *ngx_http_sgadmin_dns_record(ngx_http_sgadmin_lookup_t *lk,
    const char *type, const char *value, ngx_uint_t required);
static void ngx_http_sgadmin_dns_status(json_t *rec,
    sg_sts_host_status_e status);
static size_t ngx_http_sgadmin_dns_strs(json_t *list, sg_sts_str_t *out,
    size_t max, ngx_uint_t mx_names);
static ngx_uint_t ngx_http_sgadmin_dns_match(json_t *row, const char *host,
    size_t len);
static ngx_uint_t ngx_http_sgadmin_dns_covers(json_t *row, const char *host,
    size_t len);
static void ngx_http_sgadmin_dns_cleanup(void *data);


/* $1 id or $2 name */

static const char  ngx_http_sgadmin_dns_sql[] =
    "SELECT json_build_object('name', d.name, 'mode', d.mta_sts_mode,"
    " 'mx', to_json(d.mta_sts_mx), 'max_age', d.mta_sts_max_age,"
    " 'id', d.mta_sts_id, 'tlsrpt_rua', d.tlsrpt_rua,"
    " 'certificate_id', c.id, 'certificate_host', c.host_name,"
    " 'certificate_names', to_json(c.alternative_host_names))::text"
    " FROM domains d"
    " LEFT JOIN settings s ON s.id = 1"
    " LEFT JOIN certificates c ON c.id = s.active_certificate_id"
    " WHERE d.id = $1::bigint OR d.name = $2";


/*
 * RFC 8461, 3.3: "https://mta-sts.<domain>/.well-known/mta-sts.txt".
 * NGX_DECLINED for any other path; else the request is answered.
 */

ngx_int_t
ngx_http_sgadmin_sts_policy(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    size_t                        plen;
    u_char                       *host;
    ngx_str_t                    *server;
    sg_lists_t                   *l;
    sg_domain_t                  *d;
    ngx_http_sgadmin_loc_conf_t  *alcf;

    if (r->uri.len != sizeof(NGX_HTTP_SGADMIN_STS_URI) - 1
        || ngx_strncmp(r->uri.data, NGX_HTTP_SGADMIN_STS_URI,
                       sizeof(NGX_HTTP_SGADMIN_STS_URI) - 1)
           != 0)
    {
        return NGX_DECLINED;
    }

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_ALLOWED,
                                 "method-not-allowed",
                                 "the policy is fetched with GET", NULL);
        return NGX_DONE;
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_sgadmin_module);

    if (alcf->require_https
#if (NGX_HTTP_SSL)
        && r->connection->ssl == NULL
#endif
       )
    {
        /* RFC 8461, 3.3: senders fetch it over HTTPS only */
        ngx_http_sgadmin_problem(r, NGX_HTTP_FORBIDDEN, "https-required",
                                 "MTA-STS policies are only served over"
                                 " HTTPS", NULL);
        return NGX_DONE;
    }

    /* the Host without its port, lower case, no trailing dot (nginx) */

    server = &r->headers_in.server;
    plen = sizeof(NGX_HTTP_SGADMIN_STS_HOST_PREFIX) - 1;
    host = server->data;

    l = sg_lists_current();
    d = NULL;

    if (l == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "lists-unavailable",
                                 "the local domains are not loaded yet",
                                 NULL);
        return NGX_DONE;
    }

    if (server->len > plen
        && ngx_strncasecmp(host, (u_char *) NGX_HTTP_SGADMIN_STS_HOST_PREFIX,
                           plen)
           == 0)
    {
        d = sg_lists_domain(l, host + plen, server->len - plen);
    }

    if (d == NULL || d->mta_sts_policy.len == 0) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "sgadmin: no MTA-STS policy for host \"%V\"", server);
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no MTA-STS policy is hosted for this host",
                                 NULL);
        return NGX_DONE;
    }

    ngx_http_sgadmin_sts_send(r, ctx, &d->mta_sts_policy);

    return NGX_DONE;
}


/* RFC 8461, 3.2: "the media type of the policy MUST be text/plain" */

static void
ngx_http_sgadmin_sts_send(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx,
    ngx_str_t *policy)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    ctx->finished = 1;

    /*
     * a copy: the lists (and the policy with them) may be reloaded while
     * a slow client still reads
     */

    b = ngx_create_temp_buf(r->pool, policy->len);
    if (b == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    b->last = ngx_cpymem(b->last, policy->data, policy->len);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = policy->len;
    ngx_str_set(&r->headers_out.content_type, "text/plain");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        ngx_http_finalize_request(r, rc);
        return;
    }

    out.buf = b;
    out.next = NULL;

    ngx_http_finalize_request(r, ngx_http_output_filter(r, &out));
}


/* GET /api/v1/domains/{id}/dns */

void
ngx_http_sgadmin_domains_dns(ngx_http_request_t *r,
    ngx_http_sgadmin_ctx_t *ctx)
{
    const char              *params[2];
    ngx_pool_cleanup_t      *cln;
    ngx_http_sgadmin_dns_t  *dns;

    if (ngx_http_sgadmin_domain_param(r, ctx, &params[0], &params[1])
        != NGX_OK)
    {
        return;
    }

    dns = ngx_pcalloc(r->pool, sizeof(ngx_http_sgadmin_dns_t));
    cln = ngx_pool_cleanup_add(r->pool, 0);

    if (dns == NULL || cln == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    dns->request = r;

    /* the request may end first (a lost client): the lookups go with it */
    cln->handler = ngx_http_sgadmin_dns_cleanup;
    cln->data = dns;

    if (sg_pg_query(sg_worker.pg, ngx_http_sgadmin_dns_sql, 2, params,
                    ngx_http_sgadmin_dns_row, dns)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


static void
ngx_http_sgadmin_dns_row(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_dns_t  *dns = data;

    const char          *s;
    json_error_t         jerr;
    ngx_http_request_t  *r;

    r = dns->request;

    if (err) {
        ngx_http_sgadmin_db_error(r, err);
        return;
    }

    if (PQntuples(res) != 1) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_NOT_FOUND, "not-found",
                                 "no such entry", NULL);
        return;
    }

    dns->row = json_loads(PQgetvalue(res, 0, 0), 0, &jerr);
    s = json_string_value(json_object_get(dns->row, "name"));

    if (s == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "cannot read the domain", NULL);
        return;
    }

    dns->name.data = (u_char *) s;
    dns->name.len = ngx_strlen(s);

    /*
     * sg's own host name, where the MX and mta-sts.<domain> point: sg has
     * no setting for it; the active certificate names it (senders check
     * the MX's certificate against it), else the machine's name.
     */

    s = json_string_value(json_object_get(dns->row, "certificate_host"));

    if (s && s[0] != '\0') {
        dns->self.data = (u_char *) s;
        dns->self.len = ngx_strlen(s);
        dns->self_from = "certificate";

    } else {
        dns->self = ngx_cycle->hostname;
        dns->self_from = "hostname";
    }

    s = json_string_value(json_object_get(dns->row, "tlsrpt_rua"));

    if (ngx_http_sgadmin_dns_ask(dns, NGX_HTTP_SGADMIN_STS_MX, "",
                                 &dns->name, 15)
           != NGX_OK
        || ngx_http_sgadmin_dns_ask(dns, NGX_HTTP_SGADMIN_STS_POLICY_HOST,
                                    NGX_HTTP_SGADMIN_STS_HOST_PREFIX,
                                    &dns->name, 0)
           != NGX_OK
        || ngx_http_sgadmin_dns_ask(dns, NGX_HTTP_SGADMIN_STS_TXT,
                                    "_mta-sts.", &dns->name, 16)
           != NGX_OK
        || (s && s[0] != '\0'
            && ngx_http_sgadmin_dns_ask(dns, NGX_HTTP_SGADMIN_STS_TLSRPT,
                                        "_smtp._tls.", &dns->name, 16)
               != NGX_OK)
        || ngx_http_sgadmin_dns_ask(dns, NGX_HTTP_SGADMIN_STS_SELF, "",
                                    &dns->self, 0)
           != NGX_OK)
    {
        ngx_http_sgadmin_dns_cleanup(dns);
        ngx_http_sgadmin_problem(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "dns-unavailable",
                                 "DNS is not available in this worker"
                                 " (see the error log)", NULL);
    }
}


static ngx_int_t
ngx_http_sgadmin_dns_ask(ngx_http_sgadmin_dns_t *dns, ngx_uint_t index,
    const char *prefix, ngx_str_t *name, ngx_uint_t rrtype)
{
    size_t                      plen;
    ngx_http_sgadmin_lookup_t  *lk;

    lk = &dns->lookups[index];
    plen = ngx_strlen(prefix);

    lk->dns = dns;
    lk->rrtype = rrtype;
    lk->live = json_array();

    lk->name.len = plen + name->len;
    lk->name.data = ngx_pnalloc(dns->request->pool, lk->name.len + 1);

    if (lk->live == NULL || lk->name.data == NULL) {
        return NGX_ERROR;
    }

    *ngx_cpymem(ngx_cpymem(lk->name.data, prefix, plen), name->data,
                name->len) = '\0';

    if (rrtype) {
        lk->req = sg_dns_query(&lk->name, rrtype,
                               ngx_http_sgadmin_dns_answer, lk);

    } else {
        lk->req = sg_dns_route_within(&lk->name, 0,
                                      NGX_HTTP_SGADMIN_STS_TIMEOUT,
                                      ngx_http_sgadmin_dns_route, lk);
    }

    if (lk->req == NULL) {
        return NGX_ERROR;
    }

    dns->waiting++;

    return NGX_OK;
}



/* MX and TXT: each record as text ("10 mx.example.com.", joined strings) */

static void
ngx_http_sgadmin_dns_answer(void *data, sg_dns_answer_t *answer)
{
    ngx_http_sgadmin_lookup_t  *lk = data;

    u_char          *p, *last, *text;
    size_t           n;
    ngx_uint_t       i;
    sg_dns_rr_mx_t   mx;
    u_char           line[SG_DNS_RR_NAME_MAX + 16];

    lk->req = NULL;

    if (answer->bogus) {
        lk->error = "the answer is DNSSEC-bogus";
        goto done;
    }

    /* NXDOMAIN and NODATA: no record; anything else: no answer */

    if (answer->rcode != 0 && answer->rcode != 3) {
        lk->error = ngx_http_sgadmin_dns_rcode(lk, answer->rcode);
        goto done;
    }

    for (i = 0; i < answer->nrdata && i < NGX_HTTP_SGADMIN_STS_LIVE_MAX; i++)
    {
        p = answer->rdata[i].data;
        last = p + answer->rdata[i].len;

        if (lk->rrtype == 15) {
            if (sg_dns_rr_mx(p, last - p, &mx) != 0) {
                continue;
            }

            /* RFC 7505: a null MX is "0 ." */
            n = ngx_snprintf(line, sizeof(line), "%ud %s.", mx.pref,
                             mx.len ? mx.name : "")
                - line;

            json_array_append_new(lk->live, json_stringn((char *) line, n));
            continue;
        }

        /* character-strings, joined (RFC 8461, 3.1; RFC 8460, 3) */

        text = ngx_pnalloc(answer->pool, answer->rdata[i].len + 1);
        if (text == NULL) {
            lk->error = "out of memory";
            goto done;
        }

        n = 0;

        while (p < last) {
            if ((size_t) (last - p - 1) < *p) {
                break;
            }

            ngx_memcpy(text + n, p + 1, *p);
            n += *p;
            p += 1 + *p;
        }

        json_array_append_new(lk->live, json_stringn((char *) text, n));
    }

done:

    ngx_destroy_pool(answer->pool);

    ngx_http_sgadmin_dns_done(lk->dns);
}


/* mta-sts.<domain> and sg's host name: their addresses */

static void
ngx_http_sgadmin_dns_route(void *data, sg_dns_route_t *route)
{
    ngx_http_sgadmin_lookup_t  *lk = data;

    ngx_uint_t      i, j;
    sg_dns_host_t  *h;

    lk->req = NULL;

    if (route->status == SG_DNS_TEMPFAIL) {
        lk->error = "no answer from DNS";

    } else if (route->status == SG_DNS_OK) {

        for (i = 0; i < route->nhosts; i++) {
            h = &route->hosts[i];

            for (j = 0; j < h->naddrs; j++) {
                json_array_append_new(lk->live,
                    json_stringn((char *) h->addrs[j].name.data,
                                 h->addrs[j].name.len));
            }
        }
    }

    ngx_destroy_pool(route->pool);

    ngx_http_sgadmin_dns_done(lk->dns);
}


static const char *
ngx_http_sgadmin_dns_rcode(ngx_http_sgadmin_lookup_t *lk, ngx_int_t rcode)
{
    u_char      *p;
    const char  *s;
    char         buf[32];

    if (rcode < 0) {
        return "no answer from DNS";
    }

    s = sg_dns_rr_rcode((int) rcode, buf, sizeof(buf));

    p = ngx_pnalloc(lk->dns->request->pool, ngx_strlen(s) + 1);
    if (p == NULL) {
        return "DNS error";
    }

    ngx_memcpy(p, s, ngx_strlen(s) + 1);

    return (const char *) p;
}


static void
ngx_http_sgadmin_dns_done(ngx_http_sgadmin_dns_t *dns)
{
    json_t              *body;
    ngx_http_request_t  *r;

    if (--dns->waiting) {
        return;
    }

    r = dns->request;

    body = ngx_http_sgadmin_dns_json(dns);

    if (body == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "sgadmin: dns records of %V: %s", &dns->name,
                  json_is_true(json_object_get(body, "ok"))
                  ? "all published" : "not all published");

    ngx_http_sgadmin_send_json(r, NGX_HTTP_OK, body);
    json_decref(body);
}


/*
 * { "domain", "host_name", "host_name_from", "mta_sts": {mode, id,
 *   policy_url, policy}, "certificate": {...}, "records": [{name, type,
 *   value, required, status, live, error?, note?}], "warnings": [...],
 *   "ok" }
 */

static json_t *
ngx_http_sgadmin_dns_json(ngx_http_sgadmin_dns_t *dns)
{
    json_t         *body, *records, *warnings, *rec;
    size_t          i;
    ngx_uint_t      ok;
    const char     *mode_text, *id, *rua, *status;
    sg_sts_mode_e   mode;

    mode_text = json_string_value(json_object_get(dns->row, "mode"));
    id = json_string_value(json_object_get(dns->row, "id"));
    rua = json_string_value(json_object_get(dns->row, "tlsrpt_rua"));

    if (mode_text == NULL || id == NULL || rua == NULL
        || sg_sts_host_mode(mode_text, ngx_strlen(mode_text), &mode) != 0)
    {
        return NULL;
    }

    body = json_object();
    records = json_array();
    warnings = json_array();

    if (body == NULL || records == NULL || warnings == NULL) {
        json_decref(body);
        json_decref(records);
        json_decref(warnings);
        return NULL;
    }

    json_object_set_new(body, "domain", json_string((char *) dns->name.data));
    json_object_set_new(body, "host_name",
                        json_stringn((char *) dns->self.data, dns->self.len));
    json_object_set_new(body, "host_name_from", json_string(dns->self_from));
    json_object_set_new(body, "mta_sts",
                        ngx_http_sgadmin_dns_policy(dns, mode, mode_text, id));
    json_object_set_new(body, "certificate",
                        ngx_http_sgadmin_dns_certificate(dns, warnings));

    json_array_append_new(records,
                          ngx_http_sgadmin_dns_mx(dns, mode, warnings));
    json_array_append_new(records,
                          ngx_http_sgadmin_dns_policy_host(dns, mode));
    json_array_append_new(records,
                          ngx_http_sgadmin_dns_sts_txt(dns, mode, id));

    if (rua[0] != '\0') {
        json_array_append_new(records,
                              ngx_http_sgadmin_dns_tlsrpt(dns, rua));
    }

    /* ok: every record needed now is published as shown */

    ok = 1;

    json_array_foreach(records, i, rec) {
        status = json_string_value(json_object_get(rec, "status"));

        if (json_is_true(json_object_get(rec, "required"))
            && (status == NULL || ngx_strcmp(status, "ok") != 0))
        {
            ok = 0;
        }
    }

    json_object_set_new(body, "ok", json_boolean(ok));
    json_object_set_new(body, "records", records);
    json_object_set_new(body, "warnings", warnings);

    return body;
}


/* the policy sg serves for the domain (RFC 8461, 3.2), from the row */

static json_t *
ngx_http_sgadmin_dns_policy(ngx_http_sgadmin_dns_t *dns, sg_sts_mode_e mode,
    const char *mode_text, const char *id)
{
    size_t         n, len;
    char          *policy;
    json_t        *sts;
    uint32_t       max_age;
    sg_sts_str_t   mx[SG_STS_MX_MAX];
    u_char         url[SG_DNS_RR_NAME_MAX + 64];

    n = ngx_http_sgadmin_dns_strs(json_object_get(dns->row, "mx"), mx,
                                  SG_STS_MX_MAX, 0);
    max_age = (uint32_t) json_integer_value(json_object_get(dns->row,
                                                            "max_age"));

    len = sg_sts_host_policy(NULL, 0, mode, mx, n, max_age);

    policy = ngx_pnalloc(dns->request->pool, len + 1);
    if (policy == NULL) {
        return NULL;
    }

    (void) sg_sts_host_policy(policy, len + 1, mode, mx, n, max_age);

    /* RFC 8461, 3.3 */
    *ngx_snprintf(url, sizeof(url) - 1,
                  "https://" NGX_HTTP_SGADMIN_STS_HOST_PREFIX "%V"
                  NGX_HTTP_SGADMIN_STS_URI, &dns->name)
        = '\0';

    sts = json_pack("{s:s,s:s,s:s,s:s%}",
                    "mode", mode_text,
                    "id", id,
                    "policy_url", (char *) url,
                    "policy", policy, len);

    return sts;
}


/*
 * The certificate senders see at mta-sts.<domain> (RFC 8461, 3.3: "the
 * HTTPS server MUST present a valid certificate" for that name): the
 * active one, if TLS is enabled in the settings.
 */

static json_t *
ngx_http_sgadmin_dns_certificate(ngx_http_sgadmin_dns_t *dns,
    json_t *warnings)
{
    json_t      *cert, *host;
    ngx_uint_t   covers, tls;
    u_char       name[SG_DNS_RR_NAME_MAX + 16];
    u_char       msg[SG_DNS_RR_NAME_MAX + 160];

    *ngx_snprintf(name, sizeof(name) - 1,
                  NGX_HTTP_SGADMIN_STS_HOST_PREFIX "%V", &dns->name)
        = '\0';

    covers = ngx_http_sgadmin_dns_covers(dns->row, (char *) name,
                                         ngx_strlen(name));
    tls = sg_worker.settings && sg_worker.settings->tls_enabled;

    host = json_object_get(dns->row, "certificate_host");

    cert = json_pack("{s:O,s:O,s:b,s:b}",
                     "id", json_object_get(dns->row, "certificate_id"),
                     "host_name", host,
                     "covers_policy_host", (int) covers,
                     "tls_enabled", (int) tls);

    if (json_is_null(host) || host == NULL) {
        json_array_append_new(warnings,
            json_string("no certificate is active: the HTTPS listener"
                        " serves the certificate of nginx.conf"));

    } else if (!covers) {
        *ngx_snprintf(msg, sizeof(msg) - 1,
                      "the active certificate does not name %s: senders"
                      " cannot fetch the policy (RFC 8461, 3.3)", name)
            = '\0';
        json_array_append_new(warnings, json_string((char *) msg));
    }

    if (!tls) {
        json_array_append_new(warnings,
            json_string("TLS is disabled in the settings: the HTTPS listener"
                        " serves the certificate of nginx.conf, not the"
                        " active one"));
    }

    return cert;
}


/*
 * MX <domain>: sg's host name (RFC 5321, 5.1).  With a policy in force,
 * every MX must match its mx (RFC 8461, 4.1), sg's name included.
 */

static json_t *
ngx_http_sgadmin_dns_mx(ngx_http_sgadmin_dns_t *dns, sg_sts_mode_e mode,
    json_t *warnings)
{
    size_t                      i, n;
    json_t                     *rec;
    sg_sts_str_t                live[NGX_HTTP_SGADMIN_STS_LIVE_MAX];
    ngx_http_sgadmin_lookup_t  *lk;
    u_char                      value[SG_DNS_RR_NAME_MAX + 16];
    u_char                      msg[SG_DNS_RR_NAME_MAX + 160];

    lk = &dns->lookups[NGX_HTTP_SGADMIN_STS_MX];

    *ngx_snprintf(value, sizeof(value) - 1, "10 %V.", &dns->self) = '\0';

    rec = ngx_http_sgadmin_dns_record(lk, "MX", (char *) value, 1);
    n = ngx_http_sgadmin_dns_strs(lk->live, live,
                                  NGX_HTTP_SGADMIN_STS_LIVE_MAX, 1);

    ngx_http_sgadmin_dns_status(rec,
        sg_sts_host_mx_check(live, n, (char *) dns->self.data,
                             dns->self.len));

    if (mode == SG_STS_NONE) {
        return rec;
    }

    for (i = 0; i < n; i++) {
        if (ngx_http_sgadmin_dns_match(dns->row, live[i].data, live[i].len))
        {
            continue;
        }

        *ngx_snprintf(msg, sizeof(msg) - 1,
                      "MX %*s does not match the policy's mx: senders that"
                      " apply the policy will not deliver there"
                      " (RFC 8461, 4.1)", live[i].len, live[i].data)
            = '\0';
        json_array_append_new(warnings, json_string((char *) msg));
    }

    if (!ngx_http_sgadmin_dns_match(dns->row, (char *) dns->self.data,
                                    dns->self.len))
    {
        *ngx_snprintf(msg, sizeof(msg) - 1,
                      "%V does not match the policy's mx (RFC 8461, 4.1)",
                      &dns->self)
            = '\0';
        json_array_append_new(warnings, json_string((char *) msg));
    }

    return rec;
}


/*
 * mta-sts.<domain>: a CNAME to sg's host name or its addresses; compared
 * by address, whichever way it is published.
 */

static json_t *
ngx_http_sgadmin_dns_policy_host(ngx_http_sgadmin_dns_t *dns,
    sg_sts_mode_e mode)
{
    size_t                      i, j;
    json_t                     *rec, *a, *b;
    ngx_http_sgadmin_lookup_t  *lk, *self;
    u_char                      value[SG_DNS_RR_NAME_MAX + 16];
    u_char                      msg[SG_DNS_RR_NAME_MAX + 160];

    lk = &dns->lookups[NGX_HTTP_SGADMIN_STS_POLICY_HOST];
    self = &dns->lookups[NGX_HTTP_SGADMIN_STS_SELF];

    *ngx_snprintf(value, sizeof(value) - 1, "%V.", &dns->self) = '\0';

    rec = ngx_http_sgadmin_dns_record(lk, "CNAME", (char *) value,
                                      mode != SG_STS_NONE);
    if (rec == NULL || lk->error) {
        return rec;
    }

    json_object_set_new(rec, "note",
                        json_string("or A/AAAA records with the addresses"
                                    " of the host name: compared by"
                                    " address"));

    if (json_array_size(lk->live) == 0) {
        ngx_http_sgadmin_dns_status(rec, SG_STS_HOST_MISSING);
        return rec;
    }

    if (self->error || json_array_size(self->live) == 0) {
        *ngx_snprintf(msg, sizeof(msg) - 1,
                      "%V has no address to compare with", &dns->self)
            = '\0';
        json_object_set_new(rec, "status", json_string("unknown"));
        json_object_set_new(rec, "error", json_string((char *) msg));
        return rec;
    }

    json_array_foreach(lk->live, i, a) {
        json_array_foreach(self->live, j, b) {
            if (json_equal(a, b)) {
                ngx_http_sgadmin_dns_status(rec, SG_STS_HOST_OK);
                return rec;
            }
        }
    }

    ngx_http_sgadmin_dns_status(rec, SG_STS_HOST_DIFFERENT);

    return rec;
}


/*
 * _mta-sts.<domain> TXT (RFC 8461, 3.1).  In mode none it is needed only
 * while senders may still hold the old policy (RFC 8461, 8.3).
 */

static json_t *
ngx_http_sgadmin_dns_sts_txt(ngx_http_sgadmin_dns_t *dns, sg_sts_mode_e mode,
    const char *id)
{
    size_t                      n;
    json_t                     *rec;
    sg_sts_str_t                live[NGX_HTTP_SGADMIN_STS_LIVE_MAX];
    ngx_http_sgadmin_lookup_t  *lk;
    char                        value[SG_STS_ID_MAX + 16];

    lk = &dns->lookups[NGX_HTTP_SGADMIN_STS_TXT];

    (void) sg_sts_host_txt(value, sizeof(value), id, ngx_strlen(id));

    rec = ngx_http_sgadmin_dns_record(lk, "TXT", value, mode != SG_STS_NONE);
    n = ngx_http_sgadmin_dns_strs(lk->live, live,
                                  NGX_HTTP_SGADMIN_STS_LIVE_MAX, 0);

    ngx_http_sgadmin_dns_status(rec,
        sg_sts_host_txt_check(live, n, id, ngx_strlen(id)));

    if (rec && mode == SG_STS_NONE) {
        json_object_set_new(rec, "note",
                            json_string("mode none (RFC 8461, 8.3): publish"
                                        " this id, keep the record and the"
                                        " policy for the old max_age, then"
                                        " remove both"));
    }

    return rec;
}


/* _smtp._tls.<domain> TXT (RFC 8460, 3) */

static json_t *
ngx_http_sgadmin_dns_tlsrpt(ngx_http_sgadmin_dns_t *dns, const char *rua)
{
    size_t                      n, len;
    char                       *value;
    json_t                     *rec;
    sg_sts_str_t                live[NGX_HTTP_SGADMIN_STS_LIVE_MAX];
    ngx_http_sgadmin_lookup_t  *lk;

    lk = &dns->lookups[NGX_HTTP_SGADMIN_STS_TLSRPT];

    len = sg_sts_host_tlsrpt(NULL, 0, rua, ngx_strlen(rua));

    value = ngx_pnalloc(dns->request->pool, len + 1);
    if (value == NULL) {
        return NULL;
    }

    (void) sg_sts_host_tlsrpt(value, len + 1, rua, ngx_strlen(rua));

    rec = ngx_http_sgadmin_dns_record(lk, "TXT", value, 1);
    n = ngx_http_sgadmin_dns_strs(lk->live, live,
                                  NGX_HTTP_SGADMIN_STS_LIVE_MAX, 0);

    ngx_http_sgadmin_dns_status(rec,
        sg_sts_host_tlsrpt_check(live, n, rua, ngx_strlen(rua)));

    return rec;
}


/* {name, type, value, required, status, live[, error]} */

static json_t *
ngx_http_sgadmin_dns_record(ngx_http_sgadmin_lookup_t *lk, const char *type,
    const char *value, ngx_uint_t required)
{
    json_t  *rec;

    rec = json_pack("{s:s%,s:s,s:s,s:b,s:s,s:O}",
                    "name", (char *) lk->name.data, lk->name.len,
                    "type", type,
                    "value", value,
                    "required", (int) required,
                    "status", lk->error ? "error" : "missing",
                    "live", lk->live);

    if (rec && lk->error) {
        json_object_set_new(rec, "error", json_string(lk->error));
    }

    return rec;
}


/* the status of a record DNS answered for */

static void
ngx_http_sgadmin_dns_status(json_t *rec, sg_sts_host_status_e status)
{
    if (rec == NULL || json_object_get(rec, "error")) {
        return;
    }

    json_object_set_new(rec, "status",
                        json_string(sg_sts_host_status_name(status)));
}


/*
 * The strings of a JSON array (at most max); mx_names: "10 mx.example."
 * gives "mx.example." (the exchange of an MX as shown).
 */

static size_t
ngx_http_sgadmin_dns_strs(json_t *list, sg_sts_str_t *out, size_t max,
    ngx_uint_t mx_names)
{
    size_t       i, n;
    json_t      *v;
    const char  *s, *sp;

    n = 0;

    json_array_foreach(list, i, v) {
        s = json_string_value(v);

        if (s == NULL || n == max) {
            continue;
        }

        out[n].data = s;
        out[n].len = json_string_length(v);

        if (mx_names) {
            sp = strchr(s, ' ');

            if (sp == NULL) {
                continue;
            }

            out[n].data = sp + 1;
            out[n].len -= sp + 1 - s;
        }

        n++;
    }

    return n;
}


/* RFC 8461, 4.1: host matches one of the policy's mx */

static ngx_uint_t
ngx_http_sgadmin_dns_match(json_t *row, const char *host, size_t len)
{
    size_t   i;
    json_t  *v;

    json_array_foreach(json_object_get(row, "mx"), i, v) {
        if (json_is_string(v)
            && sg_sts_mx_match(json_string_value(v), json_string_length(v),
                               host, len))
        {
            return 1;
        }
    }

    return 0;
}


/*
 * The active certificate names host: its host name or an alternative name
 * equal to it, or "*." and the rest of it (RFC 6125, 6.4.3: one label,
 * the left-most; the same rule as RFC 8461, 4.1's).
 */

static ngx_uint_t
ngx_http_sgadmin_dns_covers(json_t *row, const char *host, size_t len)
{
    size_t   i;
    json_t  *v;

    v = json_object_get(row, "certificate_host");

    if (json_is_string(v)
        && sg_sts_mx_match(json_string_value(v), json_string_length(v), host,
                           len))
    {
        return 1;
    }

    json_array_foreach(json_object_get(row, "certificate_names"), i, v) {
        if (json_is_string(v)
            && sg_sts_mx_match(json_string_value(v), json_string_length(v),
                               host, len))
        {
            return 1;
        }
    }

    return 0;
}


static void
ngx_http_sgadmin_dns_cleanup(void *data)
{
    ngx_http_sgadmin_dns_t  *dns = data;

    ngx_uint_t                  i;
    ngx_http_sgadmin_lookup_t  *lk;

    for (i = 0; i < NGX_HTTP_SGADMIN_STS_LOOKUPS; i++) {
        lk = &dns->lookups[i];

        if (lk->req) {
            sg_dns_cancel(lk->req);
            lk->req = NULL;
        }

        if (lk->live) {
            json_decref(lk->live);
            lk->live = NULL;
        }
    }

    if (dns->row) {
        json_decref(dns->row);
        dns->row = NULL;
    }
}
