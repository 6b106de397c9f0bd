/*
 * sg: GET /metrics — Prometheus text exposition format 0.0.4.
 *
 * Counted cluster-wide from the queue tables (sql/006, 008, 011) by one
 * statement, so that every node answers the same: recipients by state,
 * delivery attempts by result and by MTA-STS policy, and REQUIRETLS
 * (RFC 8689) deliveries, bounces and flagged messages.  The counters are
 * counts of rows: removing messages from the queue lowers them, which a
 * Prometheus server reads as a counter reset.
 *
 * Any token may read them (read-only included).  The TLS-failure list
 * lives in Redis and is not counted here (GET /api/v1/tls-failures).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sgadmin.h"


#define NGX_HTTP_SGADMIN_METRICS_TYPE                                        \
    "text/plain; version=0.0.4; charset=utf-8"

#define NGX_HTTP_SGADMIN_METRICS_LABELS  2


typedef struct {
    const char                   *name;
    const char                   *type;        /* gauge, counter */
    const char                   *help;
    const char                   *label[NGX_HTTP_SGADMIN_METRICS_LABELS];
} ngx_http_sgadmin_metric_t;


/* in the order of the statement's first column */

static const ngx_http_sgadmin_metric_t  ngx_http_sgadmin_metrics_list[] = {

    { "sg_queue_recipients", "gauge",
      "Recipients in the queue by delivery state.",
      { "state", NULL } },

    { "sg_delivery_attempts_total", "counter",
      "Delivery attempts (one per message, MX address and try) by result.",
      { "result", NULL } },

    { "sg_requiretls_deliveries_total", "counter",
      "Delivery attempts of REQUIRETLS messages that delivered"
      " (RFC 8689).",
      { NULL, NULL } },

    { "sg_requiretls_bounces_total", "counter",
      "Recipients of REQUIRETLS messages bounced with 5.7.30 (REQUIRETLS"
      " not offered) or 5.7.10 (TLS requirement failed), RFC 8689.",
      { "status", NULL } },

    { "sg_requiretls_messages_total", "counter",
      "Messages flagged for REQUIRETLS by why they were flagged (a message"
      " flagged for several reasons counts under each).",
      { "source", NULL } },

    { "sg_delivery_policy_total", "counter",
      "Delivery attempts by policy type and policy result type"
      " (RFC 8460, 4.3 and 4.4; none: nothing failed).",
      { "policy_type", "result_type" } }
};


/*
 * Rows (metric, label 1, label 2, value), ordered.  Fixed label values
 * always have a row (0 when nothing is counted), so that series do not
 * appear and vanish; policy rows exist for what has been seen.
 * Attempts written before sql/011 have no policy type and are left out of
 * sg_delivery_policy_total.
 */

static const char  ngx_http_sgadmin_metrics_sql[] =
    "WITH rcp AS ("
    "  SELECT r.state,"
    "    CASE WHEN r.state = 'bounced'"
    "      AND r.dsn_status IN ('5.7.10', '5.7.30')"
    "      AND EXISTS (SELECT 1 FROM messages m"
    "                  WHERE m.id = r.message_id AND m.requiretls)"
    "    THEN r.dsn_status END AS requiretls_status,"
    "    count(*) AS n"
    "  FROM recipients r GROUP BY 1, 2"
    "), att AS ("
    "  SELECT result, policy_type,"
    "    coalesce(policy_result_type, 'none') AS policy_result,"
    "    count(*) AS n,"
    "    count(*) FILTER (WHERE result = 'delivered' AND tls_rule = 1)"
    "      AS requiretls"
    "  FROM delivery_attempts GROUP BY 1, 2, 3"
    "), src AS ("
    "  SELECT DISTINCT m.id, split_part(s.source, ':', 1) AS kind"
    "  FROM messages m, unnest(m.requiretls_sources) AS s(source)"
    /* a bounce of a flagged message is stored unflagged, source "dsn" */
    "  WHERE m.requiretls OR 'dsn' = ANY(m.requiretls_sources)"
    ")"
    " SELECT 0, v.k, NULL::text,"
    "   (SELECT coalesce(sum(n), 0) FROM rcp WHERE rcp.state = v.k)::bigint"
    " FROM (VALUES ('queued'), ('delivering'), ('deferred'), ('delivered'),"
    "   ('bounced'), ('deleted')) v(k)"
    " UNION ALL"
    " SELECT 1, v.k, NULL,"
    "   (SELECT coalesce(sum(n), 0) FROM att WHERE att.result = v.k)::bigint"
    " FROM (VALUES ('delivered'), ('deferred'), ('bounced'), ('next_mx'),"
    "   ('retry_clear')) v(k)"
    " UNION ALL"
    " SELECT 2, NULL, NULL,"
    "   (SELECT coalesce(sum(requiretls), 0) FROM att)::bigint"
    " UNION ALL"
    " SELECT 3, v.k, NULL,"
    "   (SELECT coalesce(sum(n), 0) FROM rcp"
    "    WHERE rcp.requiretls_status = v.k)::bigint"
    " FROM (VALUES ('5.7.10'), ('5.7.30')) v(k)"
    " UNION ALL"
    " SELECT 4, v.k, NULL,"
    "   (SELECT count(*) FROM src WHERE src.kind = v.k)"
    " FROM (VALUES ('parameter'), ('rule'), ('address'), ('dsn')) v(k)"
    " UNION ALL"
    " SELECT 5, policy_type, policy_result, sum(n)::bigint FROM att"
    " WHERE policy_type IS NOT NULL GROUP BY 2, 3"
    " ORDER BY 1, 2, 3";


static void ngx_http_sgadmin_metrics_done(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static u_char *ngx_http_sgadmin_metrics_escape(u_char *p, const char *v,
    size_t len);


void
ngx_http_sgadmin_metrics(ngx_http_request_t *r, ngx_http_sgadmin_ctx_t *ctx)
{
    if (sg_pg_query(sg_worker.pg, ngx_http_sgadmin_metrics_sql, 0, NULL,
                    ngx_http_sgadmin_metrics_done, ctx)
        != NGX_OK)
    {
        ngx_http_sgadmin_db_error(r, sg_pg_last_error(sg_worker.pg));
    }
}


static void
ngx_http_sgadmin_metrics_done(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_http_sgadmin_ctx_t           *ctx = data;
    size_t                            size;
    u_char                           *text, *p, *v;
    ngx_int_t                         m;
    ngx_uint_t                        i, row, rows, l, len, nmetrics;
    ngx_http_request_t               *r;
    const ngx_http_sgadmin_metric_t  *metric;

    nmetrics = sizeof(ngx_http_sgadmin_metrics_list)
               / sizeof(ngx_http_sgadmin_metric_t);
    r = ctx->request;

    if (err) {
        ngx_http_sgadmin_db_error(r, err);
        return;
    }

    if (PQnfields(res) != 2 + NGX_HTTP_SGADMIN_METRICS_LABELS) {
        goto invalid;
    }

    rows = PQntuples(res);

    /* an upper bound: every label value octet may become two */

    size = 0;

    for (i = 0; i < nmetrics; i++) {
        metric = &ngx_http_sgadmin_metrics_list[i];
        size += sizeof("# HELP  \n# TYPE  \n") - 1
                + 2 * ngx_strlen(metric->name)
                + ngx_strlen(metric->help) + ngx_strlen(metric->type);
    }

    for (row = 0; row < rows; row++) {
        m = ngx_atoi((u_char *) PQgetvalue(res, row, 0),
                     PQgetlength(res, row, 0));

        if (m == NGX_ERROR || (ngx_uint_t) m >= nmetrics) {
            goto invalid;
        }

        metric = &ngx_http_sgadmin_metrics_list[m];
        size += ngx_strlen(metric->name) + sizeof("{} \n") - 1
                + PQgetlength(res, row, 3);

        for (l = 0; l < NGX_HTTP_SGADMIN_METRICS_LABELS; l++) {
            if (metric->label[l] == NULL) {
                continue;
            }

            if (PQgetisnull(res, row, 1 + l)) {
                goto invalid;
            }

            size += ngx_strlen(metric->label[l]) + sizeof("=\"\",") - 1
                    + 2 * PQgetlength(res, row, 1 + l);
        }

        /* a count: digits only */

        v = (u_char *) PQgetvalue(res, row, 3);
        len = PQgetlength(res, row, 3);

        if (len == 0) {
            goto invalid;
        }

        for (i = 0; i < len; i++) {
            if (v[i] < '0' || v[i] > '9') {
                goto invalid;
            }
        }
    }

    text = ngx_pnalloc(r->pool, size);
    if (text == NULL) {
        ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal", "out of memory", NULL);
        return;
    }

    p = text;
    row = 0;

    for (i = 0; i < nmetrics; i++) {
        metric = &ngx_http_sgadmin_metrics_list[i];

        p = ngx_sprintf(p, "# HELP %s %s\n# TYPE %s %s\n",
                        metric->name, metric->help,
                        metric->name, metric->type);

        /* the rows are ordered by metric and were checked above */

        for ( /* void */ ;
             row < rows
             && (ngx_uint_t) ngx_atoi((u_char *) PQgetvalue(res, row, 0),
                                      PQgetlength(res, row, 0)) == i;
             row++)
        {
            p = ngx_sprintf(p, "%s", metric->name);

            for (l = 0; l < NGX_HTTP_SGADMIN_METRICS_LABELS; l++) {
                if (metric->label[l] == NULL) {
                    break;
                }

                p = ngx_sprintf(p, "%c%s=\"", l == 0 ? '{' : ',',
                                metric->label[l]);
                p = ngx_http_sgadmin_metrics_escape(p,
                                                    PQgetvalue(res, row, 1 + l),
                                                    PQgetlength(res, row,
                                                                1 + l));
                *p++ = '"';
            }

            if (l > 0) {
                *p++ = '}';
            }

            p = ngx_sprintf(p, " %*s\n", (size_t) PQgetlength(res, row, 3),
                            PQgetvalue(res, row, 3));
        }
    }

    if (row != rows) {
        /* not ordered by metric */
        goto invalid;
    }

    ngx_str_set(&r->headers_out.content_type, NGX_HTTP_SGADMIN_METRICS_TYPE);
    r->headers_out.content_type_len = sizeof("text/plain") - 1;

    /* ngx_http_sgadmin_send_text() adds the last line's "\n" */

    ngx_http_sgadmin_send_text(r, NGX_HTTP_OK, (const char *) text,
                               p - text - 1, NULL);
    return;

invalid:

    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "sgadmin: %V: unexpected result of the metrics statement",
                  &r->uri);

    ngx_http_sgadmin_problem(r, NGX_HTTP_INTERNAL_SERVER_ERROR, "internal",
                             "the metrics could not be read", NULL);
}


/* text format 0.0.4: a label value escapes '\', '"' and line feed */

static u_char *
ngx_http_sgadmin_metrics_escape(u_char *p, const char *v, size_t len)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        switch (v[i]) {

        case '\\':
            *p++ = '\\';
            *p++ = '\\';
            break;

        case '"':
            *p++ = '\\';
            *p++ = '"';
            break;

        case '\n':
            *p++ = '\\';
            *p++ = 'n';
            break;

        default:
            *p++ = v[i];
        }
    }

    return p;
}
