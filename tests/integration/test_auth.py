"""Bearer token authentication of the admin API (issue 2, item 5)."""

import pytest

from sgtest import api, create_token


def assert_problem(r, status, type_suffix=None):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["status"] == status
    assert doc["type"].startswith("urn:sg:problem:")
    assert isinstance(doc["title"], str) and doc["title"]
    if type_suffix:
        assert doc["type"] == "urn:sg:problem:" + type_suffix
    return doc


def test_no_authorization_header(sg_module):
    r = api(sg_module, "GET", "/api/v1/settings", token=None)
    assert_problem(r, 401)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("value", ["Bearer wrong", "Basic dXNlcjpwYXNz",
                                   "Bearer", "Bearer ", "bearer",
                                   "Bearer sg_" + "A" * 43])
def test_bad_authorization(sg_module, value):
    r = api(sg_module, "GET", "/api/v1/settings", token=None,
            headers={"Authorization": value})
    assert_problem(r, 401)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_good_token(sg_module):
    r = api(sg_module, "GET", "/api/v1/settings")
    assert r.status_code == 200
    assert "tls_enabled" in r.json()


def test_bad_token_on_patch_changes_nothing(sg_module):
    before = api(sg_module, "GET", "/api/v1/settings").json()
    r = api(sg_module, "PATCH", "/api/v1/settings", token="wrong",
            json={"mta_sts_enabled": not before["mta_sts_enabled"]})
    assert_problem(r, 401)
    assert api(sg_module, "GET", "/api/v1/settings").json() == before


def test_read_only_token(sg_module, pg):
    tok = create_token(pg.conninfo, "test-reader", role="read-only")
    r = api(sg_module, "GET", "/api/v1/settings", token=tok)
    assert r.status_code == 200
    before = r.json()
    r = api(sg_module, "PATCH", "/api/v1/settings", token=tok,
            json={"mta_sts_enabled": not before["mta_sts_enabled"]})
    assert_problem(r, 403)
    assert api(sg_module, "GET", "/api/v1/settings").json() == before


def test_revoked_token(sg_module, pg):
    tok = create_token(pg.conninfo, "test-revoked", role="admin")
    assert api(sg_module, "GET", "/api/v1/settings", token=tok).status_code == 200
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute("UPDATE api_tokens SET revoked_at = now()"
                    " WHERE name = 'test-revoked'")
    r = api(sg_module, "GET", "/api/v1/settings", token=tok)
    assert_problem(r, 401)
