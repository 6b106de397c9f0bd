/*
 * sg: the lists in every worker.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <jansson.h>

#include "sg_core.h"
#include "sg_lists.h"


#define SG_LISTS_SQL                                                         \
    "SELECT json_build_object("                                              \
    " 'domains', (SELECT coalesce(json_agg(json_build_object("               \
    "   'name', name, 'server', internal_server,"                            \
    "   'trusted', requiretls_trusted)), '[]') FROM domains),"               \
    " 'relay', (SELECT coalesce(json_agg(value::text), '[]')"                \
    "   FROM relay_networks),"                                               \
    " 'whitelist', (SELECT coalesce(json_agg(json_build_object("             \
    "   'value', value, 'kind', kind)), '[]') FROM starttls_whitelist),"     \
    " 'rules', (SELECT coalesce(json_agg(json_build_object("                 \
    "   'id', id, 'action', action, 'conditions', conditions)"               \
    "   ORDER BY position, id), '[]')"                                       \
    "   FROM content_filter_rules WHERE enabled))::text"


static void sg_lists_reload(void);
static void sg_lists_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static sg_lists_t *sg_lists_build(json_t *doc, ngx_log_t *log);
static ngx_int_t sg_lists_str(ngx_pool_t *pool, json_t *v, ngx_str_t *s,
    ngx_uint_t lower);
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


/*
 * The STARTTLS whitelist: the address in an ip/cidr entry, or the client's
 * host name equal to a name entry or below it.
 */

ngx_uint_t
sg_lists_whitelisted(sg_lists_t *l, struct sockaddr *sa, ngx_str_t *host)
{
    size_t       len;
    ngx_str_t   *n;
    ngx_uint_t   i;

    if (sa && l->wl_cidrs.nelts
        && ngx_cidr_match(sa, &l->wl_cidrs) == NGX_OK)
    {
        return 1;
    }

    if (host == NULL || host->len == 0) {
        return 0;
    }

    len = host->len;

    if (host->data[len - 1] == '.') {
        len--;
    }

    n = l->wl_names.elts;

    for (i = 0; i < l->wl_names.nelts; i++) {

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
    }

    json_array_foreach(json_object_get(doc, "relay"), i, v) {
        cidr = ngx_array_push(&l->relay);
        if (cidr == NULL || sg_lists_str(pool, v, &text, 0) != NGX_OK
            || ngx_ptocidr(&text, cidr) == NGX_ERROR)
        {
            goto failed;
        }
    }

    json_array_foreach(json_object_get(doc, "whitelist"), i, v) {
        if (sg_lists_str(pool, json_object_get(v, "value"), &text, 1)
            != NGX_OK)
        {
            goto failed;
        }

        if (ngx_strcmp(json_string_value(json_object_get(v, "kind")), "name")
            == 0)
        {
            if (ngx_array_push(&l->wl_names) == NULL) {
                goto failed;
            }

            ((ngx_str_t *) l->wl_names.elts)[l->wl_names.nelts - 1] = text;
            continue;
        }

        cidr = ngx_array_push(&l->wl_cidrs);
        if (cidr == NULL || ngx_ptocidr(&text, cidr) == NGX_ERROR) {
            goto failed;
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
