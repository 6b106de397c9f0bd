/*
 * Unit tests of the settings validator and loader (common/sg_settings_doc.c).
 * The defaults are the reference Encryption page's (DESIGN.md "Settings").
 */

#include <string.h>

#include "sg_settings.h"
#include "sg_test.h"


typedef struct {
    const char  *name;
    const char  *patch;
    size_t       nerrors;
    const char  *field;         /* the first error's field */
} sg_settings_case_t;


static const sg_settings_case_t  cases[] = {
    { "empty patch", "{}", 0, NULL },
    { "all booleans", "{\"tls_enabled\": true, \"starttls_outbound\": true,"
      " \"tls_failure_fallback\": false, \"requiretls_enabled\": false,"
      " \"mta_sts_enabled\": false}", 0, NULL },
    { "string for bool", "{\"tls_enabled\": \"yes\"}", 1, "tls_enabled" },
    { "number for bool", "{\"mta_sts_enabled\": 1}", 1, "mta_sts_enabled" },
    { "null for bool", "{\"starttls_outbound\": null}", 1,
      "starttls_outbound" },
    { "unknown field", "{\"tls\": true}", 1, "tls" },
    { "unknown nested field", "{\"tls_reporting\": {\"bogus\": 1}}", 1,
      "tls_reporting.bogus" },
    { "tls_reporting not an object", "{\"tls_reporting\": true}", 1,
      "tls_reporting" },
    { "hour 0", "{\"tls_reporting\": {\"send_hour_utc\": 0}}", 0, NULL },
    { "hour 23", "{\"tls_reporting\": {\"send_hour_utc\": 23}}", 0, NULL },
    { "hour 24", "{\"tls_reporting\": {\"send_hour_utc\": 24}}", 1,
      "tls_reporting.send_hour_utc" },
    { "hour -1", "{\"tls_reporting\": {\"send_hour_utc\": -1}}", 1,
      "tls_reporting.send_hour_utc" },
    { "hour as string", "{\"tls_reporting\": {\"send_hour_utc\": \"1\"}}", 1,
      "tls_reporting.send_hour_utc" },
    { "hour as real", "{\"tls_reporting\": {\"send_hour_utc\": 1.5}}", 1,
      "tls_reporting.send_hour_utc" },
    { "copy_to null", "{\"tls_reporting\": {\"copy_to\": null}}", 0, NULL },
    { "copy_to list", "{\"tls_reporting\": {\"copy_to\":"
      " [\"a@example.com\", \"b@example.org\"]}}", 0, NULL },
    { "copy_to string", "{\"tls_reporting\": {\"copy_to\": \"a@b.c\"}}", 1,
      "tls_reporting.copy_to" },
    { "copy_to bad address", "{\"tls_reporting\": {\"copy_to\": [\"ab\"]}}",
      1, "tls_reporting.copy_to" },
    { "copy_to two @", "{\"tls_reporting\": {\"copy_to\": [\"a@b@c\"]}}", 1,
      "tls_reporting.copy_to" },
    { "copy_to with comma", "{\"tls_reporting\": {\"copy_to\":"
      " [\"a@b.c,d@e.f\"]}}", 1, "tls_reporting.copy_to" },
    { "text with control", "{\"tls_reporting\": {\"submitter\": \"a\\nb\"}}",
      1, "tls_reporting.submitter" },
    { "selector ok", "{\"tls_reporting\": {\"dkim_selector\": \"sg-2026\"}}",
      0, NULL },
    { "selector with space", "{\"tls_reporting\": {\"dkim_selector\":"
      " \"a b\"}}", 1, "tls_reporting.dkim_selector" },
    { "certificate id", "{\"active_certificate_id\": 7}", 0, NULL },
    { "certificate null", "{\"active_certificate_id\": null}", 0, NULL },
    { "certificate zero", "{\"active_certificate_id\": 0}", 1,
      "active_certificate_id" },
    { "certificate string", "{\"active_certificate_id\": \"7\"}", 1,
      "active_certificate_id" },
    { "three errors", "{\"a\": 1, \"b\": 2, \"tls_enabled\": 3}", 3, NULL },
    { "array", "[]", 1, "" },
};


int
main(void)
{
    size_t                n, i;
    json_t               *j, *ordered;
    char                 *text;
    sg_settings_t         s;
    sg_settings_error_t   errs[SG_SETTINGS_MAX_ERRORS];
    char                  long_text[600];

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        j = json_loads(cases[i].patch, 0, NULL);
        CHECK(j != NULL, cases[i].name);

        if (j == NULL) {
            continue;
        }

        n = sg_settings_validate_patch(j, errs, SG_SETTINGS_MAX_ERRORS);
        CHECK(n == cases[i].nerrors, cases[i].name);

        if (cases[i].field && n > 0) {
            CHECK(strcmp(errs[0].field, cases[i].field) == 0, cases[i].name);
        }

        json_decref(j);
    }

    /* 255 octets is the limit of a text field */
    memset(long_text, 'a', sizeof(long_text));
    long_text[256] = '\0';
    j = json_pack("{s:{s:s}}", "tls_reporting", "organization_name",
                  long_text);
    CHECK(sg_settings_validate_patch(j, errs, 4) == 1, "256-octet text");
    json_decref(j);

    long_text[255] = '\0';
    j = json_pack("{s:{s:s}}", "tls_reporting", "organization_name",
                  long_text);
    CHECK(sg_settings_validate_patch(j, errs, 4) == 0, "255-octet text");
    json_decref(j);

    /* errors are bounded by the caller's array */
    j = json_loads("{\"a\":1,\"b\":1,\"c\":1,\"d\":1}", 0, NULL);
    CHECK(sg_settings_validate_patch(j, errs, 2) == 2, "bounded errors");
    json_decref(j);

    /* the reference page's defaults */
    sg_settings_defaults(&s);
    CHECK(!s.tls_enabled, "default: SSL and STARTTLS off");
    CHECK(!s.starttls_outbound, "default: STARTTLS whenever possible off");
    CHECK(s.tls_failure_fallback, "default: retry without SSL on");
    CHECK(s.requiretls_enabled, "default: REQUIRETLS on");
    CHECK(s.mta_sts_enabled, "default: MTA-STS on");
    CHECK(!s.tls_reporting.enabled, "default: TLS reporting off");
    CHECK(s.tls_reporting.send_hour_utc == 1, "default: report hour");

    /* loading a stored document */
    j = json_loads("{\"tls_enabled\": true, \"mta_sts_enabled\": false,"
                   " \"active_certificate_id\": 3, \"tls_reporting\":"
                   " {\"enabled\": true, \"send_hour_utc\": 4,"
                   " \"organization_name\": \"Example\"}}", 0, NULL);
    CHECK(sg_settings_from_json(j, &s) == 0, "load");
    CHECK(s.tls_enabled && !s.mta_sts_enabled, "load booleans");
    CHECK(s.requiretls_enabled, "load keeps defaults of absent keys");
    CHECK(s.active_certificate_id == 3, "load certificate id");
    CHECK(s.tls_reporting.enabled && s.tls_reporting.send_hour_utc == 4,
          "load tls_reporting");
    CHECK(strcmp(s.tls_reporting.organization_name, "Example") == 0,
          "load text");

    /* answers list the fields in the documented order */
    ordered = sg_settings_ordered(j);
    text = json_dumps(ordered, JSON_PRESERVE_ORDER | JSON_COMPACT);
#define SG_ORDERED  "{\"tls_enabled\":true,\"mta_sts_enabled\":false,"     \
                    "\"tls_reporting\":{\"enabled\":true,"
    CHECK(text != NULL
          && strncmp(text, SG_ORDERED, sizeof(SG_ORDERED) - 1) == 0,
          "ordered output");
    free(text);
    json_decref(ordered);
    json_decref(j);

    j = json_loads("{\"tls_enabled\": \"x\"}", 0, NULL);
    CHECK(sg_settings_from_json(j, &s) == -1, "invalid stored document");
    json_decref(j);

    return SG_TEST_DONE();
}
