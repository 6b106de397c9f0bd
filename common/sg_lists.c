/*
 * sg: the lists in every worker.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <jansson.h>

#include "sg_core.h"
#include "sg_lists.h"
#include "sg_sts_host.h"


#define SG_LISTS_SQL                                                         \
    "SELECT json_build_object("                                              \
    " 'domains', (SELECT coalesce(json_agg(json_build_object("               \
    "   'name', name, 'server', internal_server,"                            \
    "   'trusted', requiretls_trusted, 'sts_mode', mta_sts_mode,"            \
    "   'sts_mx', to_json(mta_sts_mx), 'sts_max_age', mta_sts_max_age,"      \
    "   'sts_id', mta_sts_id)), '[]') FROM domains),"                        \
    " 'relay', (SELECT coalesce(json_agg(value::text), '[]')"                \
    "   FROM relay_networks),"                                               \
    " 'whitelist', (SELECT coalesce(json_agg(json_build_object("             \
    "   'value', value, 'kind', kind)), '[]') FROM starttls_whitelist),"     \
    " 'required', (SELECT coalesce(json_agg(json_build_object("              \
    "   'value', value, 'kind', kind)), '[]') FROM starttls_required),"      \
    " 'routes', (SELECT coalesce(json_agg(json_build_object("                \
    "   'domain', domain, 'relay', relay)), '[]') FROM routes),"             \
    " 'rules', (SELECT coalesce(json_agg(json_build_object("                 \
    "   'id', id, 'action', action, 'conditions', conditions)"               \
    "   ORDER BY position, id), '[]')"                                       \
    "   FROM content_filter_rules WHERE enabled))::text"


static void sg_lists_reload(void);
static void sg_lists_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static sg_lists_t *sg_lists_build(json_t *doc, ngx_log_t *log);
static ngx_int_t sg_lists_peers(ngx_pool_t *pool, json_t *list,
    ngx_array_t *cidrs, ngx_array_t *names);
static ngx_uint_t sg_lists_peer_match(ngx_array_t *cidrs, ngx_array_t *names,
    struct sockaddr *sa, ngx_str_t *host);
static ngx_int_t sg_lists_host_port(ngx_pool_t *pool, ngx_str_t *text,
    ngx_str_t *host, in_port_t *port);
static ngx_int_t sg_lists_str(ngx_pool_t *pool, json_t *v, ngx_str_t *s,
    ngx_uint_t lower);
static ngx_int_t sg_lists_sts_policy(ngx_pool_t *pool, json_t *v,
    sg_domain_t *d, ngx_log_t *log);
static void sg_lists_notify(void *data, const char *channel,
    const char *payload);
static void sg_lists_poll_handler(ngx_event_t *ev);


static sg_lists_t   *sg_lists;
static ngx_uint_t    sg_lists_inflight;
static ngx_uint_t    sg_lists_again;
static ngx_event_t   sg_lists_poll;
static ngx_msec_t    sg_lists_poll_interval;
static ngx_log_t    *sg_lists_log;
static ngx_connection_t  sg_lists_dummy;     /* timers log ev->data as one */


ngx_int_t
sg_lists_init_worker(ngx_cycle_t *cycle, ngx_msec_t poll)
{
    sg_lists_log = cycle->log;
    sg_lists_poll_interval = poll;

    if (sg_pg_listen(sg_worker.pg, "sg_lists", sg_lists_notify, NULL)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    sg_lists_poll.handler = sg_lists_poll_handler;
    sg_lists_poll.data = &sg_lists_dummy;
    sg_lists_poll.log = cycle->log;
    sg_lists_poll.cancelable = 1;

    ngx_add_timer(&sg_lists_poll, 200);

    return NGX_OK;
}


void
sg_lists_exit_worker(void)
{
    if (sg_lists_poll.timer_set) {
        ngx_del_timer(&sg_lists_poll);
    }

    if (sg_lists) {
        ngx_destroy_pool(sg_lists->pool);
        sg_lists = NULL;
    }
}


sg_lists_t *
sg_lists_current(void)
{
    return sg_lists;
}


sg_domain_t *
sg_lists_domain(sg_lists_t *l, u_char *name, size_t len)
{
    ngx_uint_t    i;
    sg_domain_t  *d;

    d = l->domains.elts;

    for (i = 0; i < l->domains.nelts; i++) {
        if (d[i].name.len == len
            && ngx_strncasecmp(d[i].name.data, name, len) == 0)
        {
            return &d[i];
        }
    }

    return NULL;
}


ngx_uint_t
sg_lists_relay_allowed(sg_lists_t *l, struct sockaddr *sa)
{
    if (l->relay.nelts == 0) {
        return 0;
    }

    return ngx_cidr_match(sa, &l->relay) == NGX_OK;
}


ngx_uint_t
sg_lists_whitelisted(sg_lists_t *l, struct sockaddr *sa, ngx_str_t *host)
{
    return sg_lists_peer_match(&l->wl_cidrs, &l->wl_names, sa, host);
}


ngx_uint_t
sg_lists_required(sg_lists_t *l, struct sockaddr *sa, ngx_str_t *host)
{
    return sg_lists_peer_match(&l->req_cidrs, &l->req_names, sa, host);
}


sg_route_t *
sg_lists_route(sg_lists_t *l, ngx_str_t *domain)
{
    size_t       len;
    ngx_uint_t   i;
    sg_route_t  *rt;

    len = domain->len;

    if (len && domain->data[len - 1] == '.') {
        len--;
    }

    rt = l->routes.elts;

    for (i = 0; i < l->routes.nelts; i++) {
        if (rt[i].domain.len == len
            && ngx_strncasecmp(rt[i].domain.data, domain->data, len) == 0)
        {
            return &rt[i];
        }
    }

    return l->default_route;
}


/*
 * A peer list (the STARTTLS whitelist or required list): the address in
 * an ip/cidr entry, or the host name equal to a name entry or below it.
 */

static ngx_uint_t
sg_lists_peer_match(ngx_array_t *cidrs, ngx_array_t *names,
    struct sockaddr *sa, ngx_str_t *host)
{
    size_t       len;
    ngx_str_t   *n;
    ngx_uint_t   i;

    if (sa && cidrs->nelts && ngx_cidr_match(sa, cidrs) == NGX_OK) {
        return 1;
    }

    if (host == NULL || host->len == 0) {
        return 0;
    }

    len = host->len;

    if (host->data[len - 1] == '.') {
        len--;
    }

    n = names->elts;

    for (i = 0; i < names->nelts; i++) {

        if (n[i].len > len) {
            continue;
        }

        if (ngx_strncasecmp(host->data + len - n[i].len, n[i].data,
                            n[i].len) != 0)
        {
            continue;
        }

        if (n[i].len == len || host->data[len - n[i].len - 1] == '.') {
            return 1;
        }
    }

    return 0;
}


static void
sg_lists_reload(void)
{
    if (sg_lists_inflight) {
        sg_lists_again = 1;
        return;
    }

    if (sg_pg_query(sg_worker.pg, SG_LISTS_SQL, 0, NULL, sg_lists_loaded,
                    NULL)
        == NGX_OK)
    {
        sg_lists_inflight = 1;
        sg_lists_again = 0;

        ngx_log_debug0(NGX_LOG_DEBUG_CORE, sg_lists_log, 0,
                       "sg: lists query sent");
    }
}


static void
sg_lists_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    json_t        *doc;
    sg_lists_t    *l;
    json_error_t   jerr;

    sg_lists_inflight = 0;

    if (err) {
        ngx_log_error(NGX_LOG_ERR, sg_lists_log, 0,
                      "sg: cannot load lists: %s", err);
        goto done;
    }

    doc = json_loads(PQgetvalue(res, 0, 0), 0, &jerr);
    if (doc == NULL) {
        goto done;
    }

    l = sg_lists_build(doc, sg_lists_log);
    json_decref(doc);

    if (l == NULL) {
        ngx_log_error(NGX_LOG_ERR, sg_lists_log, 0,
                      "sg: cannot build lists, keeping the previous ones");
        goto done;
    }

    if (sg_lists) {
        ngx_destroy_pool(sg_lists->pool);

        ngx_log_debug0(NGX_LOG_DEBUG_CORE, sg_lists_log, 0,
                       "sg: lists reloaded");

    } else {
        ngx_log_error(NGX_LOG_INFO, sg_lists_log, 0, "sg: lists loaded");
    }

    sg_lists = l;

done:

    if (sg_lists_again) {
        sg_lists_again = 0;
        sg_lists_reload();
    }
}


static sg_lists_t *
sg_lists_build(json_t *doc, ngx_log_t *log)
{
    size_t               i, j;
    json_t              *v, *c, *conds;
    ngx_str_t            text;
    ngx_pool_t          *pool;
    ngx_cidr_t          *cidr;
    sg_rule_t           *rule;
    sg_lists_t          *l;
    sg_route_t          *rt;
    sg_domain_t         *d;
    const char          *field, *match;
    sg_rule_cond_t      *cond;
    ngx_regex_compile_t  rc;
    u_char               errstr[NGX_MAX_CONF_ERRSTR];

    pool = ngx_create_pool(4096, log);
    if (pool == NULL) {
        return NULL;
    }

    l = ngx_pcalloc(pool, sizeof(sg_lists_t));
    if (l == NULL
        || ngx_array_init(&l->domains, pool, 8, sizeof(sg_domain_t))
           != NGX_OK
        || ngx_array_init(&l->relay, pool, 8, sizeof(ngx_cidr_t)) != NGX_OK
        || ngx_array_init(&l->wl_cidrs, pool, 8, sizeof(ngx_cidr_t))
           != NGX_OK
        || ngx_array_init(&l->wl_names, pool, 8, sizeof(ngx_str_t))
           != NGX_OK
        || ngx_array_init(&l->req_cidrs, pool, 8, sizeof(ngx_cidr_t))
           != NGX_OK
        || ngx_array_init(&l->req_names, pool, 8, sizeof(ngx_str_t))
           != NGX_OK
        || ngx_array_init(&l->routes, pool, 8, sizeof(sg_route_t)) != NGX_OK
        || ngx_array_init(&l->rules, pool, 8, sizeof(sg_rule_t)) != NGX_OK)
    {
        goto failed;
    }

    l->pool = pool;

    json_array_foreach(json_object_get(doc, "domains"), i, v) {
        d = ngx_array_push(&l->domains);
        if (d == NULL
            || sg_lists_str(pool, json_object_get(v, "name"), &d->name, 1)
               != NGX_OK
            || sg_lists_str(pool, json_object_get(v, "server"),
                            &d->internal_server, 0)
               != NGX_OK)
        {
            goto failed;
        }

        d->requiretls_trusted = json_is_true(json_object_get(v, "trusted"));

        if (sg_lists_host_port(pool, &d->internal_server, &d->server_host,
                               &d->server_port)
            != NGX_OK)
        {
            /* the API validates it: only a hand-written row gets here */
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "sg: local domain \"%V\": internal server \"%V\""
                          " is not host:port, its mail cannot be delivered",
                          &d->name, &d->internal_server);
            ngx_str_null(&d->server_host);
            d->server_port = 0;
        }

        if (sg_lists_sts_policy(pool, v, d, log) != NGX_OK) {
            goto failed;
        }
    }

    json_array_foreach(json_object_get(doc, "relay"), i, v) {
        cidr = ngx_array_push(&l->relay);
        if (cidr == NULL || sg_lists_str(pool, v, &text, 0) != NGX_OK
            || ngx_ptocidr(&text, cidr) == NGX_ERROR)
        {
            goto failed;
        }
    }

    if (sg_lists_peers(pool, json_object_get(doc, "whitelist"), &l->wl_cidrs,
                       &l->wl_names)
        != NGX_OK
        || sg_lists_peers(pool, json_object_get(doc, "required"),
                          &l->req_cidrs, &l->req_names)
           != NGX_OK)
    {
        goto failed;
    }

    json_array_foreach(json_object_get(doc, "routes"), i, v) {
        rt = ngx_array_push(&l->routes);
        if (rt == NULL
            || sg_lists_str(pool, json_object_get(v, "domain"), &rt->domain,
                            1)
               != NGX_OK
            || sg_lists_str(pool, json_object_get(v, "relay"), &rt->relay, 0)
               != NGX_OK)
        {
            goto failed;
        }

        if (sg_lists_host_port(pool, &rt->relay, &rt->host, &rt->port)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "sg: route for \"%V\" is skipped: relay \"%V\" is"
                          " not host:port", &rt->domain, &rt->relay);
            l->routes.nelts--;
            continue;
        }

        if (rt->domain.len == 1 && rt->domain.data[0] == '*') {
            /* "*" is no domain: it stays out of the exact matches */
            l->default_route = ngx_palloc(pool, sizeof(sg_route_t));
            if (l->default_route == NULL) {
                goto failed;
            }

            *l->default_route = *rt;
            l->routes.nelts--;
        }
    }

    json_array_foreach(json_object_get(doc, "rules"), i, v) {
        rule = ngx_array_push(&l->rules);
        if (rule == NULL) {
            goto failed;
        }

        ngx_memzero(rule, sizeof(sg_rule_t));
        rule->id = json_integer_value(json_object_get(v, "id"));

        if (sg_lists_str(pool, json_object_get(v, "action"), &rule->action,
                         0)
            != NGX_OK)
        {
            goto failed;
        }

        conds = json_object_get(v, "conditions");
        rule->nconds = json_array_size(conds);
        rule->conds = ngx_pcalloc(pool,
                                  rule->nconds * sizeof(sg_rule_cond_t) + 1);
        if (rule->conds == NULL) {
            goto failed;
        }

        json_array_foreach(conds, j, c) {
            cond = &rule->conds[j];

            field = json_string_value(json_object_get(c, "field"));
            match = json_string_value(json_object_get(c, "match"));

            if (field == NULL || match == NULL) {
                goto failed;
            }

            cond->field = ngx_strcmp(field, "sender") == 0 ? SG_RULE_SENDER
                          : ngx_strcmp(field, "recipient") == 0
                            ? SG_RULE_RECIPIENT : SG_RULE_HEADER;

            if (sg_lists_str(pool, json_object_get(c, "value"), &cond->value,
                             0)
                != NGX_OK)
            {
                goto failed;
            }

            if (cond->field == SG_RULE_HEADER
                && sg_lists_str(pool, json_object_get(c, "header"),
                                &cond->header, 0)
                   != NGX_OK)
            {
                goto failed;
            }

            if (ngx_strcmp(match, "regex") != 0) {
                continue;
            }

            ngx_memzero(&rc, sizeof(ngx_regex_compile_t));
            rc.pattern = cond->value;
            rc.pool = pool;
            rc.err.len = NGX_MAX_CONF_ERRSTR;
            rc.err.data = errstr;

            if (ngx_regex_compile(&rc) != NGX_OK) {
                /* one bad rule must not freeze every other list */
                ngx_log_error(NGX_LOG_ERR, log, 0,
                              "sg: content filter rule %L is skipped: its"
                              " regular expression \"%V\" is invalid: %V",
                              rule->id, &cond->value, &rc.err);
                l->rules.nelts--;
                break;
            }

            cond->regex = rc.regex;
        }
    }

    return l;

failed:

    ngx_destroy_pool(pool);

    return NULL;
}


/*
 * The MTA-STS policy document of a domain, written once per load and read
 * back by sg's own parser (RFC 8461, 3.2) before it is served: a row the
 * API did not write (by hand) cannot make sg serve a broken policy.
 * NGX_ERROR only when out of memory.
 */

static ngx_int_t
sg_lists_sts_policy(ngx_pool_t *pool, json_t *v, sg_domain_t *d,
    ngx_log_t *log)
{
    size_t            i, n, len;
    json_t           *mx, *m;
    u_char           *p;
    const char       *mode_text;
    sg_sts_err_t      err;
    sg_sts_str_t     *pats;
    sg_sts_mode_e     mode;
    json_int_t        max_age;
    sg_sts_policy_t   check;

    ngx_str_null(&d->mta_sts_id);
    ngx_str_null(&d->mta_sts_policy);

    if (sg_lists_str(pool, json_object_get(v, "sts_id"), &d->mta_sts_id, 0)
        != NGX_OK)
    {
        ngx_str_null(&d->mta_sts_id);
    }

    mode_text = json_string_value(json_object_get(v, "sts_mode"));
    mx = json_object_get(v, "sts_mx");
    max_age = json_integer_value(json_object_get(v, "sts_max_age"));
    n = json_array_size(mx);

    if (d->mta_sts_id.len == 0 || mode_text == NULL
        || sg_sts_host_mode(mode_text, ngx_strlen(mode_text), &mode) != 0
        || max_age < 0 || max_age > SG_STS_MAX_AGE_MAX
        || n > SG_STS_MX_MAX)
    {
        goto invalid;
    }

    pats = ngx_palloc(pool, (n ? n : 1) * sizeof(sg_sts_str_t));
    if (pats == NULL) {
        return NGX_ERROR;
    }

    json_array_foreach(mx, i, m) {
        pats[i].data = json_string_value(m);
        pats[i].len = json_string_length(m);

        if (pats[i].data == NULL) {
            goto invalid;
        }
    }

    len = sg_sts_host_policy(NULL, 0, mode, pats, n, (uint32_t) max_age);

    p = ngx_pnalloc(pool, len + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (len == 0
        || sg_sts_host_policy((char *) p, len + 1, mode, pats, n,
                              (uint32_t) max_age)
           != len
        || sg_sts_policy_parse((char *) p, len, &check, &err) != SG_STS_OK)
    {
        goto invalid;
    }

    d->mta_sts_policy.data = p;
    d->mta_sts_policy.len = len;

    return NGX_OK;

invalid:

    ngx_log_error(NGX_LOG_ERR, log, 0,
                  "sg: local domain \"%V\": its MTA-STS policy is not valid,"
                  " none is served for it", &d->name);

    return NGX_OK;
}


/* [{"value", "kind"}] into cidrs (ip, cidr) and names */

static ngx_int_t
sg_lists_peers(ngx_pool_t *pool, json_t *list, ngx_array_t *cidrs,
    ngx_array_t *names)
{
    size_t        i;
    json_t       *v;
    ngx_str_t     text, *name;
    ngx_cidr_t   *cidr;
    const char   *kind;

    json_array_foreach(list, i, v) {
        if (sg_lists_str(pool, json_object_get(v, "value"), &text, 1)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        kind = json_string_value(json_object_get(v, "kind"));

        if (kind && ngx_strcmp(kind, "name") == 0) {
            name = ngx_array_push(names);
            if (name == NULL) {
                return NGX_ERROR;
            }

            *name = text;
            continue;
        }

        cidr = ngx_array_push(cidrs);
        if (cidr == NULL || ngx_ptocidr(&text, cidr) == NGX_ERROR) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * "host:port" or "[IPv6]:port"; without ":port", port 25 (SMTP).  host
 * is copied lower-cased and NUL-terminated, without brackets.
 */

static ngx_int_t
sg_lists_host_port(ngx_pool_t *pool, ngx_str_t *text, ngx_str_t *host,
    in_port_t *port)
{
    u_char     *p, *last, *close, *colon;
    ngx_int_t   n;
    ngx_str_t   h;

    p = text->data;
    last = p + text->len;

    if (p < last && *p == '[') {
        close = ngx_strlchr(p, last, ']');
        if (close == NULL) {
            return NGX_ERROR;
        }

        h.data = p + 1;
        h.len = close - p - 1;
        colon = (close + 1 < last) ? close + 1 : NULL;

        if (colon && *colon != ':') {
            return NGX_ERROR;
        }

    } else {
        colon = ngx_strlchr(p, last, ':');
        h.data = p;
        h.len = (colon ? colon : last) - p;
    }

    if (h.len == 0) {
        return NGX_ERROR;
    }

    *port = 25;

    if (colon) {
        n = ngx_atoi(colon + 1, last - colon - 1);
        if (n < 1 || n > 65535) {
            return NGX_ERROR;
        }

        *port = (in_port_t) n;
    }

    host->len = h.len;
    host->data = ngx_pnalloc(pool, h.len + 1);
    if (host->data == NULL) {
        return NGX_ERROR;
    }

    ngx_strlow(host->data, h.data, h.len);
    host->data[h.len] = '\0';

    return NGX_OK;
}


static ngx_int_t
sg_lists_str(ngx_pool_t *pool, json_t *v, ngx_str_t *s, ngx_uint_t lower)
{
    const char  *text;

    text = json_string_value(v);
    if (text == NULL) {
        return NGX_ERROR;
    }

    s->len = json_string_length(v);
    s->data = ngx_pnalloc(pool, s->len + 1);
    if (s->data == NULL) {
        return NGX_ERROR;
    }

    if (lower) {
        ngx_strlow(s->data, (u_char *) text, s->len);

    } else {
        ngx_memcpy(s->data, text, s->len);
    }

    s->data[s->len] = '\0';

    return NGX_OK;
}


static void
sg_lists_notify(void *data, const char *channel, const char *payload)
{
    sg_lists_reload();
}


static void
sg_lists_poll_handler(ngx_event_t *ev)
{
    sg_lists_reload();

    if (!ngx_exiting && !ngx_terminate) {
        ngx_add_timer(ev, sg_lists ? sg_lists_poll_interval : 1000);
    }
}
