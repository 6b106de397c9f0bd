"""GET/PATCH /api/v1/settings: shape, defaults, validation, size limits,
audit (issue 2, item 5; DESIGN.md "API shapes")."""

import copy
import datetime
import json

import pytest
import requests

from sgtest import DEFAULT_SETTINGS, api, reset_settings

URL = "/api/v1/settings"

DEFAULTS = copy.deepcopy(DEFAULT_SETTINGS)
DEFAULTS["active_certificate_id"] = None


@pytest.fixture
def inst(sg_module):
    """The module's instance with settings back to its start state."""
    sg_module.reset_settings()
    yield sg_module
    sg_module.reset_settings()


def get(inst):
    r = api(inst, "GET", URL)
    assert r.status_code == 200, r.text
    return r.json()


def patch(inst, body=None, data=None, headers=None):
    return api(inst, "PATCH", URL, json=body, data=data, headers=headers)


def assert_problem(r, status, type_suffix=None):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["status"] == status
    assert doc["type"].startswith("urn:sg:problem:")
    assert isinstance(doc["title"], str)
    if type_suffix:
        assert doc["type"] == "urn:sg:problem:" + type_suffix
    return doc


def audit_rows(pg):
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT id, actor, action, object, old, new FROM audit_log"
                    " ORDER BY id")
        return cur.fetchall()


def audit_at(pg, audit_id):
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT at FROM audit_log WHERE id = %s", (audit_id,))
        return cur.fetchone()[0]


def test_defaults_on_fresh_settings(sg_module, pg):
    reset_settings(pg)        # as sql/001 left it: TLS off, no certificate
    try:
        r = api(sg_module, "GET", URL)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.json() == DEFAULTS
        assert r.headers["ETag"].startswith('"')
    finally:
        sg_module.reset_settings()


def test_get_after_start_has_certificate(inst):
    doc = get(inst)
    assert set(doc) == set(DEFAULTS)
    assert set(doc["tls_reporting"]) == set(DEFAULTS["tls_reporting"])
    assert doc["tls_enabled"] is True
    assert doc["active_certificate_id"] == inst.certificate_id


def test_etag_is_version_and_changes(inst):
    r1 = api(inst, "GET", URL)
    v1 = int(r1.headers["ETag"].strip('"'))
    r2 = patch(inst, {"starttls_outbound": True})
    assert r2.status_code == 200
    v2 = int(r2.headers["ETag"].strip('"'))
    assert v2 > v1
    assert api(inst, "GET", URL).headers["ETag"] == r2.headers["ETag"]


@pytest.mark.parametrize("body", [
    {"tls_enabled": False},
    {"starttls_outbound": True},
    {"tls_failure_fallback": False},
    {"requiretls_enabled": False},
    {"mta_sts_enabled": False},
    {"starttls_outbound": True, "mta_sts_enabled": False,
     "requiretls_enabled": False},
    {"tls_reporting": {"enabled": True}},
    {"tls_reporting": {"send_hour_utc": 0}},
    {"tls_reporting": {"send_hour_utc": 23}},
    {"tls_reporting": {"copy_to": ["tlsrpt@example.com", "ops@example.org"]}},
    {"tls_reporting": {"copy_to": []}},
    {"tls_reporting": {"copy_to": None}},
    {"tls_reporting": {"organization_name": "Example Inc.",
                       "contact_info": "mailto:tls@example.com",
                       "submitter": "mx.example.com",
                       "include_failure_details": False,
                       "dkim_selector": "sel-2025"}},
    {"tls_reporting": {"organization_name": "x" * 255}},
    {},
])
def test_patch_subset(inst, body):
    before = get(inst)
    r = patch(inst, body)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    expected = copy.deepcopy(before)
    for k, v in body.items():
        if k == "tls_reporting":
            expected[k].update(v)
        else:
            expected[k] = v
    assert r.json() == expected
    assert get(inst) == expected


def test_nested_patch_keeps_other_fields(inst):
    r = patch(inst, {"tls_reporting": {"organization_name": "Org",
                                       "send_hour_utc": 5}})
    assert r.status_code == 200
    r = patch(inst, {"tls_reporting": {"enabled": True}})
    assert r.status_code == 200
    tr = r.json()["tls_reporting"]
    assert tr["enabled"] is True
    assert tr["organization_name"] == "Org"
    assert tr["send_hour_utc"] == 5
    assert tr["include_failure_details"] is True
    assert get(inst)["tls_reporting"] == tr


def test_active_certificate_null_accepted(inst):
    r = patch(inst, {"active_certificate_id": None})
    assert r.status_code == 200, r.text
    assert r.json()["active_certificate_id"] is None
    assert get(inst)["active_certificate_id"] is None


INVALID = [
    ({"tls_enabled": "true"}, "tls_enabled"),
    ({"tls_enabled": 1}, "tls_enabled"),
    ({"tls_enabled": None}, "tls_enabled"),
    ({"starttls_outbound": "yes"}, "starttls_outbound"),
    ({"mta_sts_enabled": 0}, "mta_sts_enabled"),
    ({"requiretls_enabled": []}, "requiretls_enabled"),
    ({"tls_failure_fallback": {}}, "tls_failure_fallback"),
    ({"tls_reporting": {"send_hour_utc": 25}}, "tls_reporting.send_hour_utc"),
    ({"tls_reporting": {"send_hour_utc": 24}}, "tls_reporting.send_hour_utc"),
    ({"tls_reporting": {"send_hour_utc": -1}}, "tls_reporting.send_hour_utc"),
    ({"tls_reporting": {"send_hour_utc": "1"}}, "tls_reporting.send_hour_utc"),
    ({"tls_reporting": {"send_hour_utc": 1.5}}, "tls_reporting.send_hour_utc"),
    ({"tls_reporting": {"enabled": "true"}}, "tls_reporting.enabled"),
    ({"tls_reporting": {"copy_to": "a@example.com"}}, "tls_reporting.copy_to"),
    ({"tls_reporting": {"copy_to": ["not an address"]}}, "tls_reporting.copy_to"),
    ({"tls_reporting": {"copy_to": [1]}}, "tls_reporting.copy_to"),
    ({"tls_reporting": {"organization_name": "x" * 256}},
     "tls_reporting.organization_name"),
    ({"tls_reporting": {"organization_name": 5}},
     "tls_reporting.organization_name"),
    ({"tls_reporting": {"dkim_selector": "bad selector"}},
     "tls_reporting.dkim_selector"),
    ({"bogus": True}, "bogus"),
    ({"tls_reporting": {"bogus": 1}}, "tls_reporting.bogus"),
    ({"tls_reporting": True}, "tls_reporting"),
    ({"tls_reporting": "x"}, "tls_reporting"),
    ({"active_certificate_id": 999999}, "active_certificate_id"),
    ({"active_certificate_id": "1"}, "active_certificate_id"),
    ({"active_certificate_id": -1}, "active_certificate_id"),
]


@pytest.mark.parametrize("body,field", INVALID,
                         ids=[json.dumps(b)[:60] for b, _ in INVALID])
def test_validation_422(inst, pg, body, field):
    before = get(inst)
    n_audit = len(audit_rows(pg))
    r = patch(inst, body)
    doc = assert_problem(r, 422)
    assert isinstance(doc["errors"], list) and doc["errors"]
    for e in doc["errors"]:
        assert isinstance(e["field"], str) and isinstance(e["message"], str)
        assert e["message"]
    assert field in [e["field"] for e in doc["errors"]], doc
    assert get(inst) == before
    assert len(audit_rows(pg)) == n_audit


def test_validation_one_bad_field_rejects_whole_patch(inst):
    before = get(inst)
    r = patch(inst, {"starttls_outbound": not before["starttls_outbound"],
                     "tls_enabled": "no"})
    assert_problem(r, 422)
    assert get(inst) == before


def test_validation_reports_every_bad_field(inst):
    r = patch(inst, {"tls_enabled": "x", "mta_sts_enabled": 3})
    doc = assert_problem(r, 422)
    fields = {e["field"] for e in doc["errors"]}
    assert {"tls_enabled", "mta_sts_enabled"} <= fields


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"x"', b"", b"null", b"42",
                                 b'{"tls_enabled":true,"tls_enabled":false}',
                                 b'{"tls_enabled": tru}', b"\xff\xfe{}"])
def test_invalid_json_400(inst, raw):
    before = get(inst)
    r = patch(inst, data=raw, headers={"Content-Type": "application/json"})
    assert_problem(r, 400)
    assert get(inst) == before


def test_oversized_body_413(inst):
    before = get(inst)
    body = ('{"tls_reporting": {"organization_name": "%s"}}'
            % ("x" * 70000)).encode()
    r = patch(inst, data=body, headers={"Content-Type": "application/json"})
    assert_problem(r, 413)
    assert get(inst) == before


def test_chunked_body_411(inst):
    """Bodies are bounded before they are read: a body without a
    Content-Length (chunked) gets 411 problem+json, nothing is read."""
    before = get(inst)
    chunk = b" " * 8192

    def gen():
        yield b'{"tls_enabled": false'
        for _ in range(10):
            yield chunk
        yield b"}"

    r = patch(inst, data=gen(), headers={"Content-Type": "application/json"})
    assert_problem(r, 411)
    assert get(inst) == before


def test_body_beyond_nginx_limit_is_problem_json_413(inst):
    """Above nginx's own client_max_body_size (1m) the answer is still
    sg's problem+json, not nginx's HTML page."""
    before = get(inst)
    body = b'{"x": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    r = patch(inst, data=body, headers={"Content-Type": "application/json"})
    assert_problem(r, 413)
    assert get(inst) == before


def test_non_json_content_type_415(inst):
    before = get(inst)
    r = patch(inst, data=b'{"tls_enabled": false}',
              headers={"Content-Type": "text/plain"})
    assert_problem(r, 415)
    assert get(inst) == before


def test_successful_patch_is_audited(inst, pg):
    t0 = datetime.datetime.now(datetime.timezone.utc)
    before = get(inst)
    n = len(audit_rows(pg))
    r = patch(inst, {"mta_sts_enabled": False,
                     "tls_reporting": {"organization_name": "Audit Org"}})
    t1 = datetime.datetime.now(datetime.timezone.utc)
    assert r.status_code == 200
    after = r.json()
    rows = audit_rows(pg)
    assert len(rows) == n + 1
    audit_id, actor, action, obj, old, new = rows[-1]
    # when: during this test (PostgreSQL runs on this machine's clock)
    at = audit_at(pg, audit_id)
    assert at.tzinfo is not None
    assert t0 <= at <= t1, (t0, at, t1)
    assert actor == "token:test-admin"
    assert action == "settings.update"
    assert obj == "settings"
    assert old == before
    assert new == after


def test_second_patch_audited_again(inst, pg):
    n = len(audit_rows(pg))
    assert patch(inst, {"starttls_outbound": True}).status_code == 200
    assert patch(inst, {"starttls_outbound": False}).status_code == 200
    rows = audit_rows(pg)
    assert len(rows) == n + 2
    assert rows[-2][5]["starttls_outbound"] is True
    assert rows[-1][4]["starttls_outbound"] is True
    assert rows[-1][5]["starttls_outbound"] is False


def test_unknown_path_404(inst):
    assert_problem(api(inst, "GET", "/api/v1/nope"), 404)


def test_delete_settings_405(inst):
    before = get(inst)
    assert_problem(api(inst, "DELETE", URL), 405)
    assert get(inst) == before


def test_plain_http_requires_https(inst):
    r = requests.get(inst.http_url + URL, timeout=10,
                     headers={"Authorization": "Bearer " + inst.token})
    assert_problem(r, 403, "https-required")
    r = requests.patch(inst.http_url + URL, timeout=10, json={"tls_enabled": False},
                       headers={"Authorization": "Bearer " + inst.token})
    assert_problem(r, 403, "https-required")
    assert get(inst)["tls_enabled"] is True
