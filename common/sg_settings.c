/*
 * sg: the settings in every worker.
 *
 * A change made through the API on any node is committed in PostgreSQL,
 * whose trigger sends NOTIFY sg_settings; every worker LISTENs and reloads.
 * A reconnected LISTEN and a slow poll cover notifications that were lost.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "sg_core.h"


#define SG_SETTINGS_MAX_HANDLERS  8

#define SG_SETTINGS_SQL                                                      \
    "SELECT (doc || jsonb_build_object('active_certificate_id',"             \
    " active_certificate_id))::text, version FROM settings WHERE id = 1"


static void sg_settings_reload(void);
static void sg_settings_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static void sg_settings_notify(void *data, const char *channel,
    const char *payload);
static void sg_settings_poll_handler(ngx_event_t *ev);


static sg_settings_changed_pt  sg_settings_handlers[SG_SETTINGS_MAX_HANDLERS];
static ngx_uint_t              sg_settings_nhandlers;
static ngx_uint_t              sg_settings_inflight;
static ngx_uint_t              sg_settings_again;
static ngx_event_t             sg_settings_poll;
static ngx_msec_t              sg_settings_poll_interval;
static ngx_log_t              *sg_settings_log;
static ngx_connection_t        sg_settings_dummy;  /* timers log ev->data */


ngx_int_t
sg_settings_init_worker(ngx_cycle_t *cycle, ngx_msec_t poll)
{
    sg_settings_t  *s;

    s = ngx_alloc(sizeof(sg_settings_t), cycle->log);
    if (s == NULL) {
        return NGX_ERROR;
    }

    sg_settings_defaults(s);
    s->version = 0;

    sg_worker.settings = s;
    sg_worker.settings_loaded = 0;
    sg_settings_log = cycle->log;
    sg_settings_poll_interval = poll;

    if (sg_pg_listen(sg_worker.pg, "sg_settings", sg_settings_notify, NULL)
        != NGX_OK)
    {
        return NGX_ERROR;
    }


    sg_settings_poll.handler = sg_settings_poll_handler;
    sg_settings_poll.data = &sg_settings_dummy;
    sg_settings_poll.log = cycle->log;
    sg_settings_poll.cancelable = 1;

    /* the first load waits for a connection: poll soon */
    ngx_add_timer(&sg_settings_poll, 200);

    return NGX_OK;
}


void
sg_settings_exit_worker(void)
{
    if (sg_settings_poll.timer_set) {
        ngx_del_timer(&sg_settings_poll);
    }
}


ngx_int_t
sg_settings_on_change(sg_settings_changed_pt handler)
{
    if (sg_settings_nhandlers == SG_SETTINGS_MAX_HANDLERS) {
        return NGX_ERROR;
    }

    sg_settings_handlers[sg_settings_nhandlers++] = handler;

    return NGX_OK;
}


static void
sg_settings_reload(void)
{
    ngx_int_t  rc;

    if (sg_settings_inflight) {
        sg_settings_again = 1;
        return;
    }

    rc = sg_pg_query(sg_worker.pg, SG_SETTINGS_SQL, 0, NULL,
                     sg_settings_loaded, NULL);

    if (rc == NGX_OK) {
        sg_settings_inflight = 1;
        sg_settings_again = 0;
    }

    /* otherwise PostgreSQL is down: the poll or LISTEN brings it back */
}


static void
sg_settings_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    json_t         *doc;
    ngx_uint_t      i;
    json_error_t    jerr;
    sg_settings_t  *s, *prev;

    sg_settings_inflight = 0;

    if (err) {
        ngx_log_error(NGX_LOG_ERR, sg_settings_log, 0,
                      "sg: cannot load settings: %s", err);
        goto done;
    }

    if (PQntuples(res) != 1) {
        ngx_log_error(NGX_LOG_ERR, sg_settings_log, 0,
                      "sg: cannot load settings: the settings row is missing"
                      " (run the migrations)");
        goto done;
    }

    s = ngx_alloc(sizeof(sg_settings_t), sg_settings_log);
    if (s == NULL) {
        goto done;
    }

    doc = json_loads(PQgetvalue(res, 0, 0), 0, &jerr);

    if (doc == NULL || sg_settings_from_json(doc, s) != 0) {
        ngx_log_error(NGX_LOG_ERR, sg_settings_log, 0,
                      "sg: the stored settings are not valid, keeping the"
                      " previous ones: %s", PQgetvalue(res, 0, 0));
        json_decref(doc);
        ngx_free(s);
        goto done;
    }

    json_decref(doc);

    s->version = ngx_atoof((u_char *) PQgetvalue(res, 0, 1),
                           PQgetlength(res, 0, 1));

    prev = sg_worker.settings;

    if (sg_worker.settings_loaded && prev->version == s->version) {
        ngx_free(s);
        goto done;
    }

    ngx_log_error(NGX_LOG_INFO, sg_settings_log, 0,
                  "sg: settings version %L loaded", s->version);

    sg_worker.settings = s;
    sg_worker.settings_loaded = 1;

    for (i = 0; i < sg_settings_nhandlers; i++) {
        sg_settings_handlers[i](prev, s);
    }

    ngx_free(prev);

done:

    if (sg_settings_again) {
        sg_settings_again = 0;
        sg_settings_reload();
    }
}


static void
sg_settings_notify(void *data, const char *channel, const char *payload)
{
    sg_settings_reload();
}


static void
sg_settings_poll_handler(ngx_event_t *ev)
{
    sg_settings_reload();

    if (!ngx_exiting && !ngx_terminate) {
        ngx_add_timer(ev, sg_worker.settings_loaded
                          ? sg_settings_poll_interval : 1000);
    }
}
