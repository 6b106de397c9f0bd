"""Admin API: STARTTLS whitelist, relay networks, domains, content filter
rules (/api/v1/starttls/whitelist, /relay-networks, /domains,
/content-filter/rules).

Each write must leave one audit_log row written by the same statement and
NOTIFY sg_lists with the table's name.
"""

import re
import select
import time

import pytest

from sgtest import api, create_token

TABLES = ("starttls_whitelist", "relay_networks", "domains",
          "content_filter_rules")

WL = "/api/v1/starttls/whitelist"
RELAY = "/api/v1/relay-networks"
DOMAINS = "/api/v1/domains"
RULES = "/api/v1/content-filter/rules"


@pytest.fixture
def inst(sg_module, pg):
    """The module's instance, with the four tables empty."""
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            for t in TABLES:
                cur.execute("DELETE FROM " + t)
    finally:
        conn.close()
    return sg_module


def problem(resp, status, type_):
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = resp.json()
    assert body["type"] == "urn:sg:problem:" + type_
    assert body["status"] == status
    return body


def invalid(resp, field, text=None):
    """A 422 naming field (and text in its message)."""
    body = problem(resp, 422, "validation")
    fields = {e["field"]: e["message"] for e in body["errors"]}
    assert field in fields, body
    if text:
        assert text in fields[field], body
    return fields


def audit_rows(pg, action):
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT actor, actor_token_id, object, old, new, client"
                        " FROM audit_log WHERE action = %s ORDER BY id",
                        (action,))
            return cur.fetchall()
    finally:
        conn.close()


def walk(inst, path, limit):
    """Every item of a list, following next_cursor."""
    items, cursor, pages = [], None, 0
    while True:
        q = "%s?limit=%d" % (path, limit)
        if cursor:
            q += "&cursor=" + cursor
        r = api(inst, "GET", q)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) <= limit
        items += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages
        assert isinstance(cursor, str)


# STARTTLS whitelist

def test_whitelist_create_list_delete(inst):
    r = api(inst, "POST", WL, json={"value": "192.0.2.7", "comment": "old MX"})
    assert r.status_code == 201, r.text
    ip = r.json()
    assert ip["value"] == "192.0.2.7" and ip["kind"] == "ip"
    assert ip["comment"] == "old MX"
    assert isinstance(ip["id"], int) and ip["created_at"]
    assert list(ip) == ["id", "value", "kind", "comment", "created_at"]

    cases = [("2001:DB8:0::1", "2001:db8::1", "ip"),
             ("198.51.100.0/24", "198.51.100.0/24", "cidr"),
             ("2001:DB8::/32", "2001:db8::/32", "cidr"),
             ("MX.Example.COM.", "mx.example.com", "name"),
             ("localhost", "localhost", "name")]
    for value, canon, kind in cases:
        r = api(inst, "POST", WL, json={"value": value})
        assert r.status_code == 201, (value, r.text)
        assert r.json()["value"] == canon and r.json()["kind"] == kind
        assert r.json()["comment"] == ""

    r = api(inst, "GET", WL)
    assert r.status_code == 200
    body = r.json()
    assert body["next_cursor"] is None
    assert [i["value"] for i in body["items"]] == \
        ["192.0.2.7"] + [c[1] for c in cases]

    r = api(inst, "DELETE", "%s/%d" % (WL, ip["id"]))
    assert r.status_code == 204 and r.content == b""
    r = api(inst, "DELETE", "%s/%d" % (WL, ip["id"]))
    problem(r, 404, "not-found")
    assert len(api(inst, "GET", WL).json()["items"]) == len(cases)


def test_whitelist_duplicate_is_409(inst):
    assert api(inst, "POST", WL, json={"value": "mx.example.com"}) \
        .status_code == 201
    # the same name once normalized
    r = api(inst, "POST", WL, json={"value": "MX.example.com."})
    problem(r, 409, "conflict")
    assert api(inst, "POST", WL, json={"value": "2001:db8::1"}) \
        .status_code == 201
    problem(api(inst, "POST", WL, json={"value": "2001:DB8:0:0::1"}), 409,
            "conflict")


@pytest.mark.parametrize("body,field,text", [
    ({}, "value", "required"),
    ({"value": 12}, "value", "string"),
    ({"value": ""}, "value", "empty"),
    ({"value": "192.0.2.1/24"}, "value", "192.0.2.0/24"),
    ({"value": "10.0.0.0/33"}, "value", "0 to 32"),
    ({"value": "192.0.2.300"}, "value", "all digits"),
    ({"value": "2001:db8::zz"}, "value", "IPv6"),
    ({"value": "bad_name.example"}, "value", "letters"),
    ({"value": "*.example.com"}, "value", "wildcard"),
    ({"value": "a..example"}, "value", "empty label"),
    ({"value": "x" * 64 + ".example"}, "value", "63"),
    ({"value": "mx.example.com", "comment": "x" * 256}, "comment", "255"),
    ({"value": "mx.example.com", "comment": "a\nb"}, "comment", "control"),
    ({"value": "mx.example.com", "comment": None}, "comment", "string"),
    ({"value": "mx.example.com", "kind": "name"}, "kind", "not a known"),
    ({"value": "mx.example.com", "id": 3}, "id", "read-only"),
])
def test_whitelist_validation(inst, body, field, text):
    invalid(api(inst, "POST", WL, json=body), field, text)
    assert api(inst, "GET", WL).json()["items"] == []


def test_whitelist_comment_of_255_characters(inst):
    r = api(inst, "POST", WL, json={"value": "a.example",
                                    "comment": "\u00e9" * 255})
    assert r.status_code == 201, r.text
    assert r.json()["comment"] == "\u00e9" * 255


@pytest.mark.parametrize("id_", ["abc", "0", "-1", "1.5", "99999999",
                                 "1" * 19])
def test_whitelist_delete_unknown_is_404(inst, id_):
    problem(api(inst, "DELETE", "%s/%s" % (WL, id_)), 404, "not-found")


def test_bad_json_is_400(inst):
    r = api(inst, "POST", WL, data="{nope",
            headers={"Content-Type": "application/json"})
    problem(r, 400, "invalid-json")


# relay networks

def test_relay_create_list_delete(inst):
    cases = [("10.0.0.1", "10.0.0.1/32"), ("192.168.0.0/16", "192.168.0.0/16"),
             ("2001:DB8::1", "2001:db8::1/128"), ("fd00::/8", "fd00::/8")]
    ids = []
    for value, canon in cases:
        r = api(inst, "POST", RELAY, json={"value": value, "comment": "lan"})
        assert r.status_code == 201, (value, r.text)
        item = r.json()
        assert item["value"] == canon and item["comment"] == "lan"
        assert list(item) == ["id", "value", "comment", "created_at"]
        ids.append(item["id"])

    body = api(inst, "GET", RELAY).json()
    assert [i["value"] for i in body["items"]] == [c[1] for c in cases]

    # the same network written another way
    problem(api(inst, "POST", RELAY, json={"value": "10.0.0.1/32"}), 409,
            "conflict")

    assert api(inst, "DELETE", "%s/%d" % (RELAY, ids[0])).status_code == 204
    problem(api(inst, "DELETE", "%s/%d" % (RELAY, ids[0])), 404, "not-found")
    problem(api(inst, "DELETE", RELAY + "/ten"), 404, "not-found")


@pytest.mark.parametrize("value,text", [
    ("mx.example.com", "IPv4"),
    ("10.1.0.0/8", "10.0.0.0/8"),
    ("2001:db8::1/64", "2001:db8::/64"),
    ("10.0.0.0/40", "0 to 32"),
    ("10.0.0.0/", "prefix"),
    ("", "IPv4"),
])
def test_relay_validation(inst, value, text):
    invalid(api(inst, "POST", RELAY, json={"value": value}), "value", text)


# pagination, for both simple lists

@pytest.mark.parametrize("path,values", [
    (WL, ["a%d.example" % i for i in range(5)]),
    (RELAY, ["10.0.%d.0/24" % i for i in range(5)]),
])
def test_pagination_walks_every_item_once(inst, path, values):
    for v in values:
        assert api(inst, "POST", path, json={"value": v}).status_code == 201

    items, pages = walk(inst, path, 2)
    assert pages == 3
    assert [i["value"] for i in items] == values
    assert len({i["id"] for i in items}) == 5

    items, pages = walk(inst, path, 5)
    assert pages == 1 and len(items) == 5

    body = api(inst, "GET", path + "?limit=1").json()
    assert len(body["items"]) == 1 and body["next_cursor"] == \
        str(body["items"][0]["id"])


@pytest.mark.parametrize("query,field", [
    ("limit=0", "limit"), ("limit=501", "limit"), ("limit=abc", "limit"),
    ("limit=", "limit"), ("limit=-1", "limit"), ("limit=1000", "limit"),
    ("cursor=abc", "cursor"), ("cursor=", "cursor"), ("cursor=-5", "cursor"),
])
def test_bad_page_arguments(inst, query, field):
    for path in (WL, RELAY, DOMAINS, RULES):
        invalid(api(inst, "GET", path + "?" + query), field)


def test_limit_500_is_allowed(inst):
    assert api(inst, "GET", WL + "?limit=500").status_code == 200


# audit and NOTIFY

def test_audit_rows(inst, pg):
    item = api(inst, "POST", WL, json={"value": "audit.example",
                                        "comment": "c"}).json()
    assert api(inst, "DELETE", "%s/%d" % (WL, item["id"])).status_code == 204

    rows = audit_rows(pg, "starttls_whitelist.create")
    actor, token_id, obj, old, new, client = rows[-1]
    assert actor == "token:test-admin" and token_id is not None
    assert obj == "starttls_whitelist:%d" % item["id"]
    assert old is None and new["value"] == "audit.example"
    assert new["kind"] == "name" and new["comment"] == "c"
    assert client == "127.0.0.1"

    rows = audit_rows(pg, "starttls_whitelist.delete")
    assert rows[-1][2] == "starttls_whitelist:%d" % item["id"]
    assert rows[-1][3]["value"] == "audit.example" and rows[-1][4] is None

    relay = api(inst, "POST", RELAY, json={"value": "10.9.0.0/16"}).json()
    rows = audit_rows(pg, "relay_networks.create")
    assert rows[-1][2] == "relay_network:%d" % relay["id"]
    assert rows[-1][4]["value"] == "10.9.0.0/16"


def test_refused_write_leaves_no_audit_row(inst, pg):
    before = len(audit_rows(pg, "starttls_whitelist.create"))
    api(inst, "POST", WL, json={"value": "dup.example"})
    problem(api(inst, "POST", WL, json={"value": "dup.example"}), 409,
            "conflict")
    invalid(api(inst, "POST", WL, json={"value": "bad value"}), "value")
    assert len(audit_rows(pg, "starttls_whitelist.create")) == before + 1


def _notifications(conn, timeout=5):
    got = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        if select.select([conn], [], [], 0.2) != ([], [], []):
            conn.poll()
            while conn.notifies:
                got.append(conn.notifies.pop(0).payload)
            if got:
                return got
    return got


@pytest.mark.parametrize("path,body,table", [
    (WL, {"value": "notify.example"}, "starttls_whitelist"),
    (RELAY, {"value": "10.77.0.0/16"}, "relay_networks"),
    (DOMAINS, {"name": "notify.example", "internal_server": "mx:25"},
     "domains"),
    (RULES, {"conditions": [{"field": "sender", "match": "contains",
                             "value": "x"}], "action": "flag_requiretls"},
     "content_filter_rules"),
])
def test_notify_sg_lists(inst, pg, path, body, table):
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("LISTEN sg_lists")
        r = api(inst, "POST", path, json=body)
        assert r.status_code == 201, r.text
        assert table in _notifications(conn)
    finally:
        conn.close()


# authorization

def test_read_only_token(inst, pg):
    ro = create_token(pg.conninfo, "lists-reader", role="read-only")
    for path in (WL, RELAY, DOMAINS, RULES):
        assert api(inst, "GET", path, token=ro).status_code == 200
        problem(api(inst, "GET", path, token=None), 401, "unauthorized")
    problem(api(inst, "POST", WL, json={"value": "x.example"}, token=ro),
            403, "forbidden")
    problem(api(inst, "POST", RELAY, json={"value": "10.0.0.0/8"}, token=ro),
            403, "forbidden")
    problem(api(inst, "POST", DOMAINS, json={"name": "a.example",
                                             "internal_server": "mx:25"},
                token=ro), 403, "forbidden")
    problem(api(inst, "POST", RULES, json={}, token=ro), 403, "forbidden")
    problem(api(inst, "DELETE", WL + "/1", token=ro), 403, "forbidden")
    problem(api(inst, "PUT", DOMAINS + "/1", json={}, token=ro), 403,
            "forbidden")
    problem(api(inst, "DELETE", RULES + "/1", token=ro), 403, "forbidden")
    assert api(inst, "GET", WL).json()["items"] == []


def test_method_not_allowed(inst):
    problem(api(inst, "PUT", WL, json={}), 405, "method-not-allowed")
    problem(api(inst, "PATCH", DOMAINS + "/1", json={}), 405,
            "method-not-allowed")


# domains

def test_domain_create_defaults(inst):
    r = api(inst, "POST", DOMAINS, json={"name": "Example.COM.",
                                         "internal_server":
                                             "Exchange.Internal:25"})
    assert r.status_code == 201, r.text
    d = r.json()
    assert list(d) == ["id", "name", "internal_server", "requiretls_trusted",
                       "mta_sts", "tlsrpt_rua", "comment", "created_at",
                       "updated_at"]
    assert d["name"] == "example.com"
    assert d["internal_server"] == "exchange.internal:25"
    assert d["requiretls_trusted"] is False
    assert d["mta_sts"] == {"mode": "none", "mx": [], "max_age": 604800,
                            "id": d["mta_sts"]["id"]}
    assert re.match(r"^[A-Za-z0-9]{1,32}$", d["mta_sts"]["id"])  # RFC 8461
    assert d["tlsrpt_rua"] == "" and d["comment"] == ""

    assert api(inst, "GET", "%s/%d" % (DOMAINS, d["id"])).json() == d
    assert api(inst, "GET", DOMAINS + "/example.com").json() == d
    assert api(inst, "GET", DOMAINS + "/EXAMPLE.com.").json() == d
    body = api(inst, "GET", DOMAINS).json()
    assert body == {"items": [d], "next_cursor": None}


def test_domain_create_full(inst):
    full = {"name": "example.org", "internal_server": "[2001:DB8::25]:2525",
            "requiretls_trusted": True,
            "mta_sts": {"mode": "enforce",
                        "mx": ["MX1.example.org", "*.mail.example.org"],
                        "max_age": 86400},
            "tlsrpt_rua": "mailto:tlsrpt@example.org,"
                          "https://reports.example.org/v1",
            "comment": "head office"}
    r = api(inst, "POST", DOMAINS, json=full)
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["internal_server"] == "[2001:db8::25]:2525"
    assert d["requiretls_trusted"] is True
    assert d["mta_sts"] == {"mode": "enforce",
                            "mx": ["mx1.example.org", "*.mail.example.org"],
                            "max_age": 86400, "id": d["mta_sts"]["id"]}
    assert d["tlsrpt_rua"] == full["tlsrpt_rua"]
    assert d["comment"] == "head office"

    api(inst, "POST", DOMAINS, json={"name": "ip.example",
                                     "internal_server": "192.0.2.25:25"})
    problem(api(inst, "POST", DOMAINS, json={"name": "EXAMPLE.org",
                                             "internal_server": "b:25"}),
            409, "conflict")


@pytest.mark.parametrize("body,field,text", [
    ({"internal_server": "mx:25"}, "name", "required"),
    ({"name": "example.com"}, "internal_server", "required"),
    ({"name": "exa mple.com", "internal_server": "mx:25"}, "name", None),
    ({"name": "192.0.2.1", "internal_server": "mx:25"}, "name", "digits"),
    ({"name": 5, "internal_server": "mx:25"}, "name", "string"),
    ({"name": "a.example", "internal_server": "mx"}, "internal_server",
     "port"),
    ({"name": "a.example", "internal_server": "mx:0"}, "internal_server",
     "65535"),
    ({"name": "a.example", "internal_server": "mx:65536"}, "internal_server",
     "65535"),
    ({"name": "a.example", "internal_server": "2001:db8::1:25"},
     "internal_server", "brackets"),
    ({"name": "a.example", "internal_server": "[2001:db8::1]"},
     "internal_server", "port"),
    ({"name": "a.example", "internal_server": "m_x:25"}, "internal_server",
     None),
    ({"name": "a.example", "internal_server": "mx:25",
      "requiretls_trusted": "yes"}, "requiretls_trusted", "true or false"),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": "enforce"}, "mta_sts", "object"),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"mode": "strict"}}, "mta_sts.mode", "none, testing"),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"mode": "enforce"}}, "mta_sts.mx", "RFC 8461"),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"mode": "testing", "mx": []}}, "mta_sts.mx", "RFC 8461"),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"mx": "mx.a.example"}}, "mta_sts.mx", "array"),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"mx": ["ok.example", "bad host"]}}, "mta_sts.mx[1]", None),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"mx": ["a.*.example"]}}, "mta_sts.mx[0]", None),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"mx": ["mx%d.example" % i for i in range(33)]}},
     "mta_sts.mx", "32"),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"max_age": 31557601}}, "mta_sts.max_age", "31557600"),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"max_age": -1}}, "mta_sts.max_age", None),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"max_age": "86400"}}, "mta_sts.max_age", None),
    ({"name": "a.example", "internal_server": "mx:25",
      "mta_sts": {"policy": 1}}, "mta_sts.policy", "not a known"),
    ({"name": "a.example", "internal_server": "mx:25",
      "tlsrpt_rua": "tlsrpt@a.example"}, "tlsrpt_rua", "mailto"),
    ({"name": "a.example", "internal_server": "mx:25",
      "tlsrpt_rua": "http://a.example/r"}, "tlsrpt_rua", "https"),
    ({"name": "a.example", "internal_server": "mx:25",
      "tlsrpt_rua": "mailto:a@a.example,"}, "tlsrpt_rua", None),
    ({"name": "a.example", "internal_server": "mx:25",
      "comment": "x" * 256}, "comment", "255"),
    ({"name": "a.example", "internal_server": "mx:25",
      "created_at": "now"}, "created_at", "read-only"),
    ({"name": "a.example", "internal_server": "mx:25", "mx": []}, "mx",
     "not a known"),
])
def test_domain_validation(inst, body, field, text):
    invalid(api(inst, "POST", DOMAINS, json=body), field, text)
    assert api(inst, "GET", DOMAINS).json()["items"] == []


def test_domain_max_age_bounds(inst):
    for i, age in enumerate((0, 31557600)):
        r = api(inst, "POST", DOMAINS, json={
            "name": "age%d.example" % i, "internal_server": "mx:25",
            "mta_sts": {"max_age": age, "mode": "testing",
                        "mx": ["mx.example"]}})
        assert r.status_code == 201, r.text
        assert r.json()["mta_sts"]["max_age"] == age


def test_domain_update(inst, pg):
    d = api(inst, "POST", DOMAINS, json={"name": "upd.example",
                                         "internal_server": "mx:25",
                                         "comment": "first"}).json()

    r = api(inst, "PUT", "%s/%d" % (DOMAINS, d["id"]),
            json={"internal_server": "mx2:2525", "requiretls_trusted": True})
    assert r.status_code == 200, r.text
    u = r.json()
    assert u["internal_server"] == "mx2:2525" and u["requiretls_trusted"]
    assert u["comment"] == "first" and u["name"] == "upd.example"
    assert u["created_at"] == d["created_at"]
    assert u["updated_at"] >= d["updated_at"]

    # RFC 8461 3.2: the merged row needs an mx for testing/enforce
    r = api(inst, "PUT", DOMAINS + "/upd.example",
            json={"mta_sts": {"mode": "enforce"}})
    invalid(r, "mta_sts.mx", "RFC 8461")
    r = api(inst, "PUT", DOMAINS + "/upd.example",
            json={"mta_sts": {"mx": ["mx.upd.example"]}})
    assert r.status_code == 200, r.text
    assert r.json()["mta_sts"] == {"mode": "none", "mx": ["mx.upd.example"],
                                   "max_age": 604800,
                                   "id": r.json()["mta_sts"]["id"]}
    r = api(inst, "PUT", DOMAINS + "/upd.example",
            json={"mta_sts": {"mode": "enforce"}})
    assert r.status_code == 200, r.text
    assert r.json()["mta_sts"]["mode"] == "enforce"
    invalid(api(inst, "PUT", DOMAINS + "/upd.example",
                json={"mta_sts": {"mx": []}}), "mta_sts.mx", "RFC 8461")
    invalid(api(inst, "PUT", DOMAINS + "/upd.example",
                json={"mta_sts": {"mode": "testing", "mx": []}}),
            "mta_sts.mx", "RFC 8461")

    # rename, then the old name is gone
    r = api(inst, "PUT", DOMAINS + "/upd.example", json={"name": "New.Example"})
    assert r.status_code == 200 and r.json()["name"] == "new.example"
    problem(api(inst, "GET", DOMAINS + "/upd.example"), 404, "not-found")

    # validation applies to PUT too, and name is not required there
    invalid(api(inst, "PUT", DOMAINS + "/new.example",
                json={"internal_server": "mx"}), "internal_server")
    invalid(api(inst, "PUT", DOMAINS + "/new.example", json={"id": 7}), "id",
            "read-only")

    # renaming onto another domain's name
    api(inst, "POST", DOMAINS, json={"name": "other.example",
                                     "internal_server": "mx:25"})
    problem(api(inst, "PUT", DOMAINS + "/new.example",
                json={"name": "other.example"}), 409, "conflict")

    rows = audit_rows(pg, "domains.update")
    actor, _, obj, old, new, _ = rows[-1]
    assert obj == "domain:%d" % d["id"]
    assert old["name"] == "upd.example" and new["name"] == "new.example"
    assert new["mta_sts"]["mode"] == "enforce"
    assert len(rows) == 4       # the refused ones left no row


def test_domain_not_found_and_delete(inst, pg):
    for m in ("GET", "DELETE"):
        problem(api(inst, m, DOMAINS + "/404.example"), 404, "not-found")
        problem(api(inst, m, DOMAINS + "/999999"), 404, "not-found")
        problem(api(inst, m, DOMAINS + "/bad_name"), 404, "not-found")
    problem(api(inst, "PUT", DOMAINS + "/404.example", json={}), 404,
            "not-found")

    d = api(inst, "POST", DOMAINS, json={"name": "del.example",
                                         "internal_server": "mx:25"}).json()
    assert api(inst, "DELETE", DOMAINS + "/DEL.example").status_code == 204
    problem(api(inst, "GET", "%s/%d" % (DOMAINS, d["id"])), 404, "not-found")
    rows = audit_rows(pg, "domains.delete")
    assert rows[-1][2] == "domain:%d" % d["id"] and rows[-1][4] is None
    assert rows[-1][3]["name"] == "del.example"

    d = api(inst, "POST", DOMAINS, json={"name": "del2.example",
                                         "internal_server": "mx:25"}).json()
    assert api(inst, "DELETE", "%s/%d" % (DOMAINS, d["id"])).status_code \
        == 204


def test_domain_pagination(inst):
    names = ["p%d.example" % i for i in range(5)]
    for n in names:
        api(inst, "POST", DOMAINS, json={"name": n, "internal_server": "m:25"})
    items, pages = walk(inst, DOMAINS, 2)
    assert [i["name"] for i in items] == names and pages == 3


# content filter rules

def cond(field="sender", match="contains", value="example.com", **kw):
    c = {"field": field, "match": match, "value": value}
    c.update(kw)
    return c


def rule(**kw):
    body = {"conditions": [cond()], "action": "flag_requiretls"}
    body.update(kw)
    return body


def test_rule_create_defaults_and_order(inst):
    r = api(inst, "POST", RULES, json=rule())
    assert r.status_code == 201, r.text
    a = r.json()
    assert list(a) == ["id", "position", "name", "enabled", "conditions",
                       "action", "created_at", "updated_at"]
    assert a["position"] == 10 and a["name"] == "" and a["enabled"] is True
    assert a["conditions"] == [cond()] and a["action"] == "flag_requiretls"

    b = api(inst, "POST", RULES, json=rule(name="second")).json()
    assert b["position"] == 20
    c = api(inst, "POST", RULES, json=rule(
        position=5, name="first", enabled=False,
        conditions=[cond("header", "regex", r"(?i)^\[secure\]",
                         header="Subject"),
                    cond("recipient", "contains", "@partner.example")])
    ).json()
    assert c["position"] == 5 and c["enabled"] is False
    assert c["conditions"][0] == {"field": "header", "header": "Subject",
                                  "match": "regex",
                                  "value": r"(?i)^\[secure\]"}
    d = api(inst, "POST", RULES, json=rule(position=20)).json()

    body = api(inst, "GET", RULES).json()
    assert [i["id"] for i in body["items"]] == \
        [c["id"], a["id"], b["id"], d["id"]]
    assert body["next_cursor"] is None
    assert api(inst, "GET", "%s/%d" % (RULES, c["id"])).json() == c

    items, pages = walk(inst, RULES, 1)
    assert [i["id"] for i in items] == [c["id"], a["id"], b["id"], d["id"]]
    assert pages == 4
    items, pages = walk(inst, RULES, 3)
    assert len(items) == 4 and pages == 2

    # after the last, a new rule goes after the highest position
    assert api(inst, "POST", RULES, json=rule()).json()["position"] == 30


def test_rule_invalid_regex_names_the_condition(inst):
    r = api(inst, "POST", RULES, json=rule(conditions=[
        cond(), cond("recipient", "regex", "(unclosed")]))
    fields = invalid(r, "conditions[1].value", "regular expression")
    assert "missing" in fields["conditions[1].value"] \
        or "parenthes" in fields["conditions[1].value"]
    r = api(inst, "POST", RULES, json=rule(conditions=[
        cond(match="regex", value="a{2,1}")]))
    invalid(r, "conditions[0].value", "regular expression")
    # the same text is fine as a "contains"
    assert api(inst, "POST", RULES, json=rule(conditions=[
        cond(value="(unclosed")])).status_code == 201


@pytest.mark.parametrize("body,field,text", [
    ({"action": "flag_requiretls"}, "conditions", "required"),
    ({"conditions": [cond()]}, "action", "required"),
    (rule(action="reject"), "action", "flag_requiretls"),
    (rule(conditions=[]), "conditions", "1 to 16"),
    (rule(conditions=[cond()] * 17), "conditions", "1 to 16"),
    (rule(conditions={"field": "sender"}), "conditions", "1 to 16"),
    (rule(conditions=["sender"]), "conditions[0]", "object"),
    (rule(conditions=[cond(field="body")]), "conditions[0].field", None),
    (rule(conditions=[{"match": "contains", "value": "x"}]),
     "conditions[0].field", "required"),
    (rule(conditions=[cond(field="header")]), "conditions[0].header",
     "required"),
    (rule(conditions=[cond(header="Subject")]), "conditions[0].header",
     "only allowed"),
    (rule(conditions=[cond(field="header", header="X Bad")]),
     "conditions[0].header", "5322"),
    (rule(conditions=[cond(field="header", header="Subject:")]),
     "conditions[0].header", "5322"),
    (rule(conditions=[cond(field="header", header="")]),
     "conditions[0].header", None),
    (rule(conditions=[cond(match="equals")]), "conditions[0].match", None),
    (rule(conditions=[cond(value="")]), "conditions[0].value", "1 to 1024"),
    (rule(conditions=[cond(value="x" * 1025)]), "conditions[0].value",
     "1 to 1024"),
    (rule(conditions=[cond(value=5)]), "conditions[0].value", "string"),
    (rule(conditions=[cond(value="a\nb")]), "conditions[0].value",
     "control"),
    (rule(conditions=[cond(extra=1)]), "conditions[0].extra", "not a known"),
    (rule(position=-1), "position", None),
    (rule(position=1.5), "position", None),
    (rule(position="1"), "position", None),
    (rule(enabled="yes"), "enabled", None),
    (rule(name="x" * 256), "name", "255"),
    (rule(priority=1), "priority", "not a known"),
])
def test_rule_validation(inst, body, field, text):
    invalid(api(inst, "POST", RULES, json=body), field, text)
    assert api(inst, "GET", RULES).json()["items"] == []


def test_rule_value_of_1024_characters(inst):
    r = api(inst, "POST", RULES, json=rule(conditions=[
        cond(value="\u00fc" * 1024)]))
    assert r.status_code == 201, r.text


def test_rule_update_and_delete(inst, pg):
    a = api(inst, "POST", RULES, json=rule(name="a")).json()

    r = api(inst, "PUT", "%s/%d" % (RULES, a["id"]),
            json={"enabled": False, "position": 100})
    assert r.status_code == 200, r.text
    u = r.json()
    assert u["enabled"] is False and u["position"] == 100
    assert u["name"] == "a" and u["conditions"] == a["conditions"]

    new_conds = [cond("header", "contains", "secret", header="X-Class")]
    u = api(inst, "PUT", "%s/%d" % (RULES, a["id"]),
            json={"conditions": new_conds}).json()
    assert u["conditions"] == new_conds and u["position"] == 100

    invalid(api(inst, "PUT", "%s/%d" % (RULES, a["id"]),
                json={"conditions": [cond(match="regex", value="[")]}),
            "conditions[0].value", "regular expression")
    invalid(api(inst, "PUT", "%s/%d" % (RULES, a["id"]),
                json={"action": "drop"}), "action")

    problem(api(inst, "PUT", RULES + "/999999", json={"enabled": True}), 404,
            "not-found")
    problem(api(inst, "PUT", RULES + "/x", json={"enabled": True}), 404,
            "not-found")
    problem(api(inst, "GET", RULES + "/999999"), 404, "not-found")
    problem(api(inst, "GET", RULES + "/abc"), 404, "not-found")

    assert api(inst, "DELETE", "%s/%d" % (RULES, a["id"])).status_code == 204
    problem(api(inst, "DELETE", "%s/%d" % (RULES, a["id"])), 404,
            "not-found")

    rows = audit_rows(pg, "content_filter_rules.update")
    assert len(rows) == 2
    assert rows[0][3]["enabled"] is True and rows[0][4]["enabled"] is False
    assert rows[0][2] == "content_filter_rule:%d" % a["id"]
    rows = audit_rows(pg, "content_filter_rules.delete")
    assert rows[-1][3]["conditions"] == new_conds
    rows = audit_rows(pg, "content_filter_rules.create")
    assert rows[-1][4]["name"] == "a" and rows[-1][3] is None


def test_rule_bad_cursor(inst):
    for c in ("5", "a_b", "5_", "_5", "-1_2", "5_0"):
        invalid(api(inst, "GET", RULES + "?cursor=" + c), "cursor")
    assert api(inst, "GET", RULES + "?cursor=0_1").status_code == 200
