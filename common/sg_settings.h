/*
 * sg: the settings of the reference Encryption page.
 *
 * The pure part (no nginx, no I/O): validation of a PATCH document and
 * conversion of the stored document into a C struct.  The worker part:
 * every worker keeps a copy, reloaded on NOTIFY sg_settings, when the
 * LISTEN connection comes back, and on a slow poll.
 */

#ifndef _SG_SETTINGS_H_INCLUDED_
#define _SG_SETTINGS_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <jansson.h>


#define SG_SETTINGS_MAX_ERRORS    32
#define SG_SETTINGS_MAX_TEXT      255
#define SG_SETTINGS_MAX_COPY_TO   20


typedef struct {
    int64_t      version;
    int64_t      active_certificate_id;     /* 0: none */

    unsigned     tls_enabled:1;
    unsigned     starttls_outbound:1;
    unsigned     tls_failure_fallback:1;
    unsigned     requiretls_enabled:1;
    unsigned     mta_sts_enabled:1;

    struct {
        unsigned  enabled:1;
        unsigned  include_failure_details:1;
        int       send_hour_utc;
        char      organization_name[SG_SETTINGS_MAX_TEXT + 1];
        char      contact_info[SG_SETTINGS_MAX_TEXT + 1];
        char      submitter[SG_SETTINGS_MAX_TEXT + 1];
        char      dkim_selector[64];
    } tls_reporting;
} sg_settings_t;


typedef struct {
    char         field[64];
    char         message[160];
} sg_settings_error_t;


/*
 * Checks a PATCH object: every key known, every value of the right type
 * and range.  Returns the number of errors written to errs (at most max).
 */
size_t sg_settings_validate_patch(json_t *patch, sg_settings_error_t *errs,
    size_t max);

/* fills s from the stored document; -1 if the document is not valid */
int sg_settings_from_json(json_t *doc, sg_settings_t *s);

void sg_settings_defaults(sg_settings_t *s);

/* a copy of the known fields in the documented order (for answers) */
json_t *sg_settings_ordered(json_t *doc);


#ifdef _NGX_CORE_H_INCLUDED_

#include <ngx_config.h>
#include <ngx_core.h>

typedef void (*sg_settings_changed_pt)(sg_settings_t *prev,
    sg_settings_t *cur);

ngx_int_t sg_settings_init_worker(ngx_cycle_t *cycle, ngx_msec_t poll);
void sg_settings_exit_worker(void);
ngx_int_t sg_settings_on_change(sg_settings_changed_pt handler);

#endif


#endif /* _SG_SETTINGS_H_INCLUDED_ */
