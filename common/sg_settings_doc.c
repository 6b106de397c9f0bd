/*
 * sg: settings documents, pure (jansson only).
 *
 * The field table is the one description of the settings object: the
 * PATCH validator and the loader both read it.
 */

#include <stdio.h>
#include <string.h>
#include <ctype.h>

#include "sg_settings.h"


typedef enum {
    SG_SET_BOOL,
    SG_SET_TEXT,            /* string, at most SG_SETTINGS_MAX_TEXT octets */
    SG_SET_SELECTOR,        /* DKIM selector: [A-Za-z0-9._-], 1..63 */
    SG_SET_HOUR,            /* integer 0..23 */
    SG_SET_ID_OR_NULL,      /* positive integer or null */
    SG_SET_ADDRS_OR_NULL,   /* null or array of mailbox strings */
    SG_SET_OBJECT
} sg_set_type_e;


typedef struct sg_set_field_s  sg_set_field_t;

struct sg_set_field_s {
    const char              *name;
    sg_set_type_e            type;
    const sg_set_field_t    *fields;    /* SG_SET_OBJECT */
};


static const sg_set_field_t  sg_set_tls_reporting[] = {
    { "enabled", SG_SET_BOOL, NULL },
    { "organization_name", SG_SET_TEXT, NULL },
    { "contact_info", SG_SET_TEXT, NULL },
    { "submitter", SG_SET_TEXT, NULL },
    { "include_failure_details", SG_SET_BOOL, NULL },
    { "copy_to", SG_SET_ADDRS_OR_NULL, NULL },
    { "send_hour_utc", SG_SET_HOUR, NULL },
    { "dkim_selector", SG_SET_SELECTOR, NULL },
    { NULL, SG_SET_BOOL, NULL }
};


static const sg_set_field_t  sg_set_root[] = {
    { "tls_enabled", SG_SET_BOOL, NULL },
    { "starttls_outbound", SG_SET_BOOL, NULL },
    { "tls_failure_fallback", SG_SET_BOOL, NULL },
    { "requiretls_enabled", SG_SET_BOOL, NULL },
    { "mta_sts_enabled", SG_SET_BOOL, NULL },
    { "tls_reporting", SG_SET_OBJECT, sg_set_tls_reporting },
    { "active_certificate_id", SG_SET_ID_OR_NULL, NULL },
    { NULL, SG_SET_BOOL, NULL }
};


static size_t sg_set_validate_object(json_t *obj, const sg_set_field_t *fields,
    const char *prefix, sg_settings_error_t *errs, size_t n, size_t max);
static const char *sg_set_check(json_t *v, const sg_set_field_t *f);
static int sg_set_mailbox_valid(const char *s, size_t len);
static size_t sg_set_error(sg_settings_error_t *errs, size_t n, size_t max,
    const char *prefix, const char *field, const char *message);


size_t
sg_settings_validate_patch(json_t *patch, sg_settings_error_t *errs,
    size_t max)
{
    if (!json_is_object(patch)) {
        return sg_set_error(errs, 0, max, "", "", "must be a JSON object");
    }

    return sg_set_validate_object(patch, sg_set_root, "", errs, 0, max);
}


static size_t
sg_set_validate_object(json_t *obj, const sg_set_field_t *fields,
    const char *prefix, sg_settings_error_t *errs, size_t n, size_t max)
{
    json_t                *v;
    const char            *key, *msg;
    const sg_set_field_t  *f;
    char                   sub[64];

    json_object_foreach(obj, key, v) {

        for (f = fields; f->name; f++) {
            if (strcmp(f->name, key) == 0) {
                break;
            }
        }

        if (f->name == NULL) {
            n = sg_set_error(errs, n, max, prefix, key, "unknown field");
            continue;
        }

        if (f->type == SG_SET_OBJECT) {
            if (!json_is_object(v)) {
                n = sg_set_error(errs, n, max, prefix, key,
                                 "must be an object");
                continue;
            }

            snprintf(sub, sizeof(sub), "%s%s.", prefix, key);
            n = sg_set_validate_object(v, f->fields, sub, errs, n, max);
            continue;
        }

        msg = sg_set_check(v, f);

        if (msg) {
            n = sg_set_error(errs, n, max, prefix, key, msg);
        }
    }

    return n;
}


static const char *
sg_set_check(json_t *v, const sg_set_field_t *f)
{
    size_t       i, len;
    json_int_t   num;
    json_t      *item;
    const char  *s;

    switch (f->type) {

    case SG_SET_BOOL:
        return json_is_boolean(v) ? NULL : "must be true or false";

    case SG_SET_TEXT:
        if (!json_is_string(v)) {
            return "must be a string";
        }

        s = json_string_value(v);
        len = json_string_length(v);

        if (len > SG_SETTINGS_MAX_TEXT) {
            return "must be at most 255 octets";
        }

        for (i = 0; i < len; i++) {
            if ((unsigned char) s[i] < 0x20 || s[i] == 0x7f) {
                return "must not contain control characters";
            }
        }

        return NULL;

    case SG_SET_SELECTOR:
        if (!json_is_string(v)) {
            return "must be a string";
        }

        s = json_string_value(v);
        len = json_string_length(v);

        if (len > 63) {
            return "must be at most 63 characters";
        }

        for (i = 0; i < len; i++) {
            if (!isalnum((unsigned char) s[i]) && s[i] != '-' && s[i] != '_'
                && s[i] != '.')
            {
                return "must hold only letters, digits, '-', '_' and '.'";
            }
        }

        return NULL;

    case SG_SET_HOUR:
        if (!json_is_integer(v)) {
            return "must be an integer from 0 to 23";
        }

        num = json_integer_value(v);

        return (num < 0 || num > 23) ? "must be an integer from 0 to 23"
                                     : NULL;

    case SG_SET_ID_OR_NULL:
        if (json_is_null(v)) {
            return NULL;
        }

        if (!json_is_integer(v) || json_integer_value(v) < 1) {
            return "must be a certificate id (a positive integer) or null";
        }

        return NULL;

    case SG_SET_ADDRS_OR_NULL:
        if (json_is_null(v)) {
            return NULL;
        }

        if (!json_is_array(v)) {
            return "must be null or an array of e-mail addresses";
        }

        if (json_array_size(v) > SG_SETTINGS_MAX_COPY_TO) {
            return "must hold at most 20 addresses";
        }

        json_array_foreach(v, i, item) {
            if (!json_is_string(item)
                || !sg_set_mailbox_valid(json_string_value(item),
                                         json_string_length(item)))
            {
                return "must hold e-mail addresses (local@domain)";
            }
        }

        return NULL;

    default:
        return "unsupported";
    }
}


/* enough for a configured address: local@domain, printable, bounded */

static int
sg_set_mailbox_valid(const char *s, size_t len)
{
    size_t       i;
    const char  *at;

    if (len < 3 || len > 254) {
        return 0;
    }

    at = memchr(s, '@', len);

    if (at == NULL || at == s || at == s + len - 1
        || memchr(at + 1, '@', s + len - at - 1) != NULL)
    {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if ((unsigned char) s[i] <= 0x20 || s[i] == 0x7f || s[i] == '<'
            || s[i] == '>' || s[i] == ',' || s[i] == ';')
        {
            return 0;
        }
    }

    return 1;
}


static size_t
sg_set_error(sg_settings_error_t *errs, size_t n, size_t max,
    const char *prefix, const char *field, const char *message)
{
    if (n >= max) {
        return n;
    }

    snprintf(errs[n].field, sizeof(errs[n].field), "%s%s", prefix, field);
    snprintf(errs[n].message, sizeof(errs[n].message), "%s", message);

    return n + 1;
}


void
sg_settings_defaults(sg_settings_t *s)
{
    memset(s, 0, sizeof(sg_settings_t));

    /* the reference page's defaults (DESIGN.md, "Settings") */
    s->tls_failure_fallback = 1;
    s->requiretls_enabled = 1;
    s->mta_sts_enabled = 1;
    s->tls_reporting.include_failure_details = 1;
    s->tls_reporting.send_hour_utc = 1;
}


static void
sg_set_copy_text(char *dst, size_t size, json_t *v)
{
    const char  *s;

    s = json_string_value(v);

    if (s == NULL) {
        s = "";
    }

    snprintf(dst, size, "%s", s);
}


int
sg_settings_from_json(json_t *doc, sg_settings_t *s)
{
    json_t               *tr;
    sg_settings_error_t   err;

    sg_settings_defaults(s);

    if (sg_settings_validate_patch(doc, &err, 1) != 0) {
        return -1;
    }

#define sg_set_bool(obj, name, dst)                                          \
    if (json_is_boolean(json_object_get(obj, name))) {                        \
        dst = json_is_true(json_object_get(obj, name));                       \
    }

    sg_set_bool(doc, "tls_enabled", s->tls_enabled);
    sg_set_bool(doc, "starttls_outbound", s->starttls_outbound);
    sg_set_bool(doc, "tls_failure_fallback", s->tls_failure_fallback);
    sg_set_bool(doc, "requiretls_enabled", s->requiretls_enabled);
    sg_set_bool(doc, "mta_sts_enabled", s->mta_sts_enabled);

    if (json_is_integer(json_object_get(doc, "active_certificate_id"))) {
        s->active_certificate_id =
            json_integer_value(json_object_get(doc, "active_certificate_id"));
    }

    tr = json_object_get(doc, "tls_reporting");

    if (tr) {
        sg_set_bool(tr, "enabled", s->tls_reporting.enabled);
        sg_set_bool(tr, "include_failure_details",
                    s->tls_reporting.include_failure_details);

        if (json_is_integer(json_object_get(tr, "send_hour_utc"))) {
            s->tls_reporting.send_hour_utc =
                (int) json_integer_value(json_object_get(tr, "send_hour_utc"));
        }

        sg_set_copy_text(s->tls_reporting.organization_name,
                         sizeof(s->tls_reporting.organization_name),
                         json_object_get(tr, "organization_name"));
        sg_set_copy_text(s->tls_reporting.contact_info,
                         sizeof(s->tls_reporting.contact_info),
                         json_object_get(tr, "contact_info"));
        sg_set_copy_text(s->tls_reporting.submitter,
                         sizeof(s->tls_reporting.submitter),
                         json_object_get(tr, "submitter"));
        sg_set_copy_text(s->tls_reporting.dkim_selector,
                         sizeof(s->tls_reporting.dkim_selector),
                         json_object_get(tr, "dkim_selector"));
    }

#undef sg_set_bool

    return 0;
}


static json_t *
sg_set_ordered(json_t *obj, const sg_set_field_t *fields)
{
    json_t                *out, *v;
    const sg_set_field_t  *f;

    out = json_object();
    if (out == NULL) {
        return NULL;
    }

    for (f = fields; f->name; f++) {
        v = json_object_get(obj, f->name);

        if (v == NULL) {
            continue;
        }

        if (f->type == SG_SET_OBJECT && json_is_object(v)) {
            json_object_set_new(out, f->name, sg_set_ordered(v, f->fields));

        } else {
            json_object_set(out, f->name, v);
        }
    }

    return out;
}


json_t *
sg_settings_ordered(json_t *doc)
{
    return sg_set_ordered(doc, sg_set_root);
}
