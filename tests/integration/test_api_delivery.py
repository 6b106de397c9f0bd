"""Admin API for delivery: the STARTTLS required list
(/api/v1/starttls/required), routes (/api/v1/routes), the hourly TLS-failure
list in Redis (/api/v1/tls-failures), and the queue's delivery side
(GET /api/v1/queue/{id} attempts and recipient outcomes, POST .../retry,
DELETE /api/v1/queue/{id}).

Writes must leave their audit_log row; list writes NOTIFY sg_lists, queue
writes NOTIFY sg_queue and TLS-failure removals NOTIFY sg_tls_failures
<host>. Messages are queued over SMTP to a local domain whose internal
server is a closed loopback port: they stay pending (queued, or deferred
once the delivery engine has tried).
"""

import datetime
import json
import re
import select
import time

import pytest
import psycopg2.extras

from sgtest import api, create_token, free_port, smtp_dialog

REQ = "/api/v1/starttls/required"
WL = "/api/v1/starttls/whitelist"
ROUTES = "/api/v1/routes"
TLSF = "/api/v1/tls-failures"
QUEUE = "/api/v1/queue"

DOMAIN = "dlv.test"
PENDING = ("queued", "deferred", "delivering")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as ([0-9A-F]{16})$")
WAIT = 20
SENT = []      # queue ids of this module's messages, removed at its end


# ------------------------------------------------------------------ helpers

def problem(resp, status, type_):
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = resp.json()
    assert body["type"] == "urn:sg:problem:" + type_
    assert body["status"] == status
    return body


def invalid(resp, field, text=None):
    body = problem(resp, 422, "validation")
    fields = {e["field"]: e["message"] for e in body["errors"]}
    assert field in fields, body
    if text:
        assert text in fields[field], body
    return fields


def sql(pg, query, *args):
    conn = pg.connect()
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def audit_rows(pg, action, obj=None):
    q = ("SELECT actor, actor_token_id, object, old, new, client FROM audit_log"
         " WHERE action = %s")
    args = [action]
    if obj:
        q += " AND object = %s"
        args.append(obj)
    return sql(pg, q + " ORDER BY id", *args)


def reader(pg):
    return create_token(pg.conninfo, "dlv-ro-%d" % time.monotonic_ns(),
                        "read-only")


def rfc3339(s):
    """An RFC 3339 date-time with an explicit offset; returns it parsed."""
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?"
                    r"(Z|[+-]\d\d:\d\d)$", s), s
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


class Listener:
    """A LISTEN connection; got() returns the payloads that arrived."""

    def __init__(self, pg, channel):
        self.conn = pg.connect()
        with self.conn.cursor() as cur:
            cur.execute("LISTEN " + channel)

    def got(self, want=None, timeout=5):
        payloads = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            if select.select([self.conn], [], [], 0.2) != ([], [], []):
                self.conn.poll()
                while self.conn.notifies:
                    payloads.append(self.conn.notifies.pop(0).payload)
            if payloads and (want is None or want in payloads):
                break
        return payloads

    def close(self):
        self.conn.close()


@pytest.fixture(scope="module", autouse=True)
def leave_no_routes(pg):
    """A route left behind ("*" above all) would send other modules' mail
    elsewhere: the tables are emptied when this module ends, and the
    messages it queued are removed."""
    yield
    if not pg.is_running():
        pg.start()
    sql(pg, "DELETE FROM starttls_required")
    sql(pg, "DELETE FROM routes")
    sql(pg, "DELETE FROM messages WHERE id = ANY(%s) OR dsn_of = ANY(%s)",
        SENT, SENT)


@pytest.fixture
def inst(sg_module, pg):
    """The module's instance with the required list and routes empty."""
    if not pg.is_running():
        pg.start()
    sql(pg, "DELETE FROM starttls_required")
    sql(pg, "DELETE FROM routes")
    return sg_module


# ------------------------------------------------------- STARTTLS required

def test_required_create_list_delete(inst, pg):
    r = api(inst, "POST", REQ, json={"value": "192.0.2.9",
                                     "comment": "partner"})
    assert r.status_code == 201, r.text
    ip = r.json()
    assert list(ip) == ["id", "value", "kind", "comment", "created_at"]
    assert ip["value"] == "192.0.2.9" and ip["kind"] == "ip"
    assert ip["comment"] == "partner"
    rfc3339(ip["created_at"])

    cases = [("2001:DB8:0::9", "2001:db8::9", "ip"),
             ("198.51.100.0/24", "198.51.100.0/24", "cidr"),
             ("MX.Partner.EXAMPLE.", "mx.partner.example", "name")]
    for value, canon, kind in cases:
        r = api(inst, "POST", REQ, json={"value": value})
        assert r.status_code == 201, (value, r.text)
        assert (r.json()["value"], r.json()["kind"]) == (canon, kind)
        assert r.json()["comment"] == ""

    body = api(inst, "GET", REQ).json()
    assert body["next_cursor"] is None
    assert [i["value"] for i in body["items"]] == \
        ["192.0.2.9"] + [c[1] for c in cases]

    # a separate list from the whitelist
    assert "192.0.2.9" not in [i["value"]
                               for i in api(inst, "GET", WL).json()["items"]]

    assert audit_rows(pg, "starttls_required.create",
                      "starttls_required:%d" % ip["id"])[0]["new"]["value"] \
        == "192.0.2.9"

    r = api(inst, "DELETE", "%s/%d" % (REQ, ip["id"]))
    assert r.status_code == 204 and r.content == b""
    problem(api(inst, "DELETE", "%s/%d" % (REQ, ip["id"])), 404, "not-found")
    rows = audit_rows(pg, "starttls_required.delete",
                      "starttls_required:%d" % ip["id"])
    assert len(rows) == 1 and rows[0]["old"]["value"] == "192.0.2.9"
    assert rows[0]["new"] is None and rows[0]["actor"] == "token:test-admin"
    assert len(api(inst, "GET", REQ).json()["items"]) == len(cases)


def test_required_paging(inst):
    for i in range(5):
        assert api(inst, "POST", REQ, json={"value": "10.9.0.%d" % i}) \
            .status_code == 201
    r = api(inst, "GET", REQ + "?limit=2")
    body = r.json()
    assert len(body["items"]) == 2 and body["next_cursor"]
    r = api(inst, "GET", REQ + "?limit=10&cursor=" + body["next_cursor"])
    assert [i["value"] for i in r.json()["items"]] == \
        ["10.9.0.%d" % i for i in range(2, 5)]
    invalid(api(inst, "GET", REQ + "?limit=0"), "limit")
    invalid(api(inst, "GET", REQ + "?cursor=x"), "cursor")


def test_required_duplicate_is_409(inst):
    assert api(inst, "POST", REQ, json={"value": "mx.partner.example"}) \
        .status_code == 201
    body = problem(api(inst, "POST", REQ, json={"value": "MX.partner.example."}),
                   409, "conflict")
    assert "required" in body["detail"]
    # the same value may be on the whitelist too: another table
    r = api(inst, "POST", WL, json={"value": "mx.partner.example"})
    assert r.status_code in (201, 409), r.text
    if r.status_code == 201:
        api(inst, "DELETE", "%s/%d" % (WL, r.json()["id"]))


@pytest.mark.parametrize("body,field,text", [
    ({}, "value", "required"),
    ({"value": 7}, "value", "string"),
    ({"value": ""}, "value", "empty"),
    ({"value": "192.0.2.1/24"}, "value", "192.0.2.0/24"),
    ({"value": "2001:db8::zz"}, "value", "IPv6"),
    ({"value": "bad_name.example"}, "value", "letters"),
    ({"value": "*.example.com"}, "value", "wildcard"),
    ({"value": "mx.example", "comment": "x" * 256}, "comment", "255"),
    ({"value": "mx.example", "kind": "name"}, "kind", "not a known"),
    ({"value": "mx.example", "id": 1}, "id", "read-only"),
])
def test_required_validation(inst, body, field, text):
    invalid(api(inst, "POST", REQ, json=body), field, text)
    assert api(inst, "GET", REQ).json()["items"] == []


def test_required_authorization(inst, pg):
    ro = reader(pg)
    assert api(inst, "GET", REQ, token=ro).status_code == 200
    problem(api(inst, "GET", REQ, token=None), 401, "unauthorized")
    problem(api(inst, "POST", REQ, json={"value": "a.example"}, token=ro),
            403, "forbidden")
    problem(api(inst, "POST", REQ, json={"value": "a.example"}, token=None),
            401, "unauthorized")
    item = api(inst, "POST", REQ, json={"value": "a.example"}).json()
    problem(api(inst, "DELETE", "%s/%d" % (REQ, item["id"]), token=ro), 403,
            "forbidden")
    assert len(api(inst, "GET", REQ).json()["items"]) == 1


@pytest.mark.parametrize("id_", ["abc", "0", "-1", "99999999", "1" * 19])
def test_required_delete_unknown_is_404(inst, id_):
    problem(api(inst, "DELETE", "%s/%s" % (REQ, id_)), 404, "not-found")


@pytest.mark.parametrize("path,body,table", [
    (REQ, {"value": "notify.example"}, "starttls_required"),
    (ROUTES, {"domain": "notify.example", "relay": "relay.example"}, "routes"),
])
def test_notify_sg_lists(inst, pg, path, body, table):
    lst = Listener(pg, "sg_lists")
    try:
        r = api(inst, "POST", path, json=body)
        assert r.status_code == 201, r.text
        assert table in lst.got(table)
    finally:
        lst.close()


# ------------------------------------------------------------------ routes

def test_routes_create_get_list(inst, pg):
    cases = [
        ({"domain": "Example.COM.", "relay": "Relay.Example.net"},
         "example.com", "relay.example.net:25"),
        ({"domain": "two.example", "relay": "192.0.2.25:2525",
          "comment": "partner"}, "two.example", "192.0.2.25:2525"),
        ({"domain": "six.example", "relay": "[2001:DB8::25]"},
         "six.example", "[2001:db8::25]:25"),
        ({"domain": "seven.example", "relay": "[2001:db8::25]:587"},
         "seven.example", "[2001:db8::25]:587"),
        ({"domain": "*", "relay": "smarthost.example:25"},
         "*", "smarthost.example:25"),
    ]
    ids = []
    for body, domain, relay in cases:
        r = api(inst, "POST", ROUTES, json=body)
        assert r.status_code == 201, (body, r.text)
        item = r.json()
        assert list(item) == ["id", "domain", "relay", "comment",
                              "created_at", "updated_at"]
        assert item["domain"] == domain and item["relay"] == relay
        assert item["comment"] == body.get("comment", "")
        rfc3339(item["created_at"])
        ids.append(item["id"])
        rows = audit_rows(pg, "routes.create", "route:%d" % item["id"])
        assert len(rows) == 1 and rows[0]["old"] is None
        assert rows[0]["new"]["relay"] == relay

    body = api(inst, "GET", ROUTES).json()
    assert body["next_cursor"] is None
    assert [i["domain"] for i in body["items"]] == [c[1] for c in cases]
    assert [i["id"] for i in body["items"]] == ids

    page = api(inst, "GET", ROUTES + "?limit=2").json()
    assert [i["id"] for i in page["items"]] == ids[:2]
    assert page["next_cursor"] == str(ids[1])

    r = api(inst, "GET", "%s/%d" % (ROUTES, ids[1]))
    assert r.status_code == 200 and r.json() == body["items"][1]

    stored = sql(pg, "SELECT domain, relay FROM routes ORDER BY id")
    assert [(s["domain"], s["relay"]) for s in stored] == \
        [(c[1], c[2]) for c in cases]


def test_routes_duplicate_domain_is_409(inst, pg):
    a = api(inst, "POST", ROUTES, json={"domain": "dup.example",
                                        "relay": "r1.example"}).json()
    body = problem(api(inst, "POST", ROUTES,
                       json={"domain": "DUP.example.", "relay": "r2.example"}),
                   409, "conflict")
    assert "route" in body["detail"]
    assert api(inst, "POST", ROUTES, json={"domain": "*", "relay": "r.example"}) \
        .status_code == 201
    problem(api(inst, "POST", ROUTES, json={"domain": "*",
                                            "relay": "s.example"}),
            409, "conflict")
    b = api(inst, "POST", ROUTES, json={"domain": "other.example",
                                        "relay": "r1.example"}).json()
    # renamed onto another route's domain
    problem(api(inst, "PATCH", "%s/%d" % (ROUTES, b["id"]),
                json={"domain": "dup.example"}), 409, "conflict")
    assert api(inst, "GET", "%s/%d" % (ROUTES, a["id"])).json()["relay"] == \
        "r1.example:25"


def test_routes_patch(inst, pg):
    item = api(inst, "POST", ROUTES, json={"domain": "patch.example",
                                           "relay": "old.example:25",
                                           "comment": "c1"}).json()
    path = "%s/%d" % (ROUTES, item["id"])
    time.sleep(0.01)

    r = api(inst, "PATCH", path, json={"relay": "[2001:db8::7]"})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["relay"] == "[2001:db8::7]:25"
    assert new["domain"] == "patch.example" and new["comment"] == "c1"
    assert new["created_at"] == item["created_at"]
    assert rfc3339(new["updated_at"]) > rfc3339(item["updated_at"])

    r = api(inst, "PATCH", path, json={"comment": "", "domain": "*"})
    assert r.status_code == 200, r.text
    assert (r.json()["domain"], r.json()["relay"], r.json()["comment"]) == \
        ("*", "[2001:db8::7]:25", "")

    r = api(inst, "PATCH", path, json={})
    assert r.status_code == 200 and r.json()["domain"] == "*"

    rows = audit_rows(pg, "routes.update", "route:%d" % item["id"])
    assert len(rows) == 3
    assert rows[0]["old"]["relay"] == "old.example:25"
    assert rows[0]["new"]["relay"] == "[2001:db8::7]:25"
    assert rows[1]["new"]["domain"] == "*"

    invalid(api(inst, "PATCH", path, json={"relay": "x:0"}), "relay", "65535")
    invalid(api(inst, "PATCH", path, json={"id": 5}), "id", "read-only")
    problem(api(inst, "PATCH", "%s/99999999" % ROUTES,
                json={"relay": "a.example"}), 404, "not-found")
    problem(api(inst, "PATCH", "%s/abc" % ROUTES, json={"relay": "a.example"}),
            404, "not-found")
    assert api(inst, "GET", path).json()["relay"] == "[2001:db8::7]:25"


def test_routes_delete(inst, pg):
    item = api(inst, "POST", ROUTES, json={"domain": "gone.example",
                                           "relay": "r.example"}).json()
    path = "%s/%d" % (ROUTES, item["id"])
    r = api(inst, "DELETE", path)
    assert r.status_code == 204 and r.content == b""
    problem(api(inst, "DELETE", path), 404, "not-found")
    problem(api(inst, "GET", path), 404, "not-found")
    rows = audit_rows(pg, "routes.delete", "route:%d" % item["id"])
    assert len(rows) == 1 and rows[0]["new"] is None
    assert rows[0]["old"]["domain"] == "gone.example"
    for bad in ("abc", "0", "1" * 19):
        problem(api(inst, "GET", "%s/%s" % (ROUTES, bad)), 404, "not-found")
        problem(api(inst, "DELETE", "%s/%s" % (ROUTES, bad)), 404, "not-found")


@pytest.mark.parametrize("body,field,text", [
    ({"relay": "r.example"}, "domain", "required"),
    ({"domain": "a.example"}, "relay", "required"),
    ({"domain": 5, "relay": "r.example"}, "domain", "string"),
    ({"domain": "", "relay": "r.example"}, "domain", "empty"),
    ({"domain": "*.example.com", "relay": "r.example"}, "domain", "wildcard"),
    ({"domain": "**", "relay": "r.example"}, "domain", "host name"),
    ({"domain": "a_b.example", "relay": "r.example"}, "domain", "letters"),
    ({"domain": "192.0.2.1", "relay": "r.example"}, "domain", "digits"),
    ({"domain": "a.example", "relay": ""}, "relay", "empty"),
    ({"domain": "a.example", "relay": 25}, "relay", "string"),
    ({"domain": "a.example", "relay": "r.example:0"}, "relay", "65535"),
    ({"domain": "a.example", "relay": "r.example:65536"}, "relay", "65535"),
    ({"domain": "a.example", "relay": "r.example:"}, "relay", "65535"),
    ({"domain": "a.example", "relay": "r.example:x"}, "relay", "65535"),
    ({"domain": "a.example", "relay": "2001:db8::1"}, "relay", "brackets"),
    ({"domain": "a.example", "relay": "[2001:db8::1"}, "relay", "]"),
    ({"domain": "a.example", "relay": "[192.0.2.1]:25"}, "relay", "IPv6"),
    ({"domain": "a.example", "relay": ":25"}, "relay", "host is missing"),
    ({"domain": "a.example", "relay": "bad host:25"}, "relay", "letters"),
    ({"domain": "a.example", "relay": "r.example", "comment": "a\nb"},
     "comment", "control"),
    ({"domain": "a.example", "relay": "r.example", "host": "x"}, "host",
     "not a known"),
    ({"domain": "a.example", "relay": "r.example", "created_at": "x"},
     "created_at", "read-only"),
])
def test_routes_validation(inst, body, field, text):
    invalid(api(inst, "POST", ROUTES, json=body), field, text)
    assert api(inst, "GET", ROUTES).json()["items"] == []


def test_routes_authorization(inst, pg):
    ro = reader(pg)
    item = api(inst, "POST", ROUTES, json={"domain": "auth.example",
                                           "relay": "r.example"}).json()
    path = "%s/%d" % (ROUTES, item["id"])
    assert api(inst, "GET", ROUTES, token=ro).status_code == 200
    assert api(inst, "GET", path, token=ro).status_code == 200
    problem(api(inst, "GET", ROUTES, token=None), 401, "unauthorized")
    problem(api(inst, "GET", path, token="nope"), 401, "unauthorized")
    problem(api(inst, "POST", ROUTES, json={"domain": "x.example",
                                            "relay": "r.example"}, token=ro),
            403, "forbidden")
    problem(api(inst, "PATCH", path, json={"relay": "s.example"}, token=ro),
            403, "forbidden")
    problem(api(inst, "DELETE", path, token=ro), 403, "forbidden")
    problem(api(inst, "DELETE", path, token=None), 401, "unauthorized")
    assert api(inst, "GET", path).json()["relay"] == "r.example:25"
    problem(api(inst, "PUT", path, json={"relay": "s.example"}), 405,
            "method-not-allowed")


# ------------------------------------------------------- TLS-failure list

def _next_hour(now):
    return (now.replace(minute=0, second=0, microsecond=0)
            + datetime.timedelta(hours=1))


def _stamp(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def rds(redis_srv):
    """The Redis of the instance, without TLS-failure keys."""
    if not redis_srv.is_running():
        redis_srv.start()
    c = redis_srv.client()
    for k in c.scan_iter(match="sg:tls-failure:*", count=1000):
        c.delete(k)
    yield c
    for k in c.scan_iter(match="sg:tls-failure:*", count=1000):
        c.delete(k)


def add_failure(rds, host, ip="192.0.2.1", reason="handshake failed"):
    """A key as the delivery engine writes it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    exp = _next_hour(now)
    value = {"host": host, "ip": ip, "reason": reason,
             "failed_at": _stamp(now), "expires_at": _stamp(exp)}
    rds.set("sg:tls-failure:" + host.lower(), json.dumps(value))
    rds.expireat("sg:tls-failure:" + host.lower(), int(exp.timestamp()))
    return value


def wait_redis(inst, timeout=WAIT):
    """Until the worker's Redis adapter is connected again (health 200)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if api(inst, "GET", "/api/v1/health", token=None) \
                    .status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.2)
    pytest.fail("the instance never reconnected to Redis")


def test_tls_failures_list(inst, rds):
    assert api(inst, "GET", TLSF).json() == {"items": [], "next_cursor": None}

    b = add_failure(rds, "mx2.example.net", "2001:db8::25",
                    "certificate verify failed")
    a = add_failure(rds, "MX1.Example.NET", "192.0.2.10", "no shared cipher")
    rds.set("sg:tls-failure:192.0.2.99", "not json")
    rds.set("sg:unrelated", "x")

    r = api(inst, "GET", TLSF)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["next_cursor"] is None
    assert [i["id"] for i in body["items"]] == \
        ["192.0.2.99", "mx1.example.net", "mx2.example.net"]
    bad, one, two = body["items"]
    assert list(one) == ["id", "host", "ip", "reason", "failed_at",
                         "expires_at"]
    assert one["host"] == "MX1.Example.NET" and one["ip"] == "192.0.2.10"
    assert one["reason"] == a["reason"]
    assert one["failed_at"] == a["failed_at"]
    assert one["expires_at"] == a["expires_at"]
    assert rfc3339(one["expires_at"]).minute == 0
    assert two["ip"] == b["ip"] and two["reason"] == b["reason"]
    assert bad == {"id": "192.0.2.99", "host": "192.0.2.99", "ip": None,
                   "reason": None, "failed_at": None, "expires_at": None}

    assert api(inst, "GET", TLSF, token=reader(inst.pg)).status_code == 200
    problem(api(inst, "GET", TLSF, token=None), 401, "unauthorized")


def test_tls_failures_many_keys(inst, rds):
    """SCAN walks to the end over several calls; every key once."""
    pipe = rds.pipeline()
    for i in range(2500):
        pipe.set("sg:tls-failure:mx%04d.example" % i,
                 json.dumps({"host": "mx%04d.example" % i}), ex=3600)
    pipe.execute()
    items = api(inst, "GET", TLSF, timeout=30).json()["items"]
    assert [i["id"] for i in items] == ["mx%04d.example" % i
                                        for i in range(2500)]


def test_tls_failures_delete(inst, pg, rds):
    value = add_failure(rds, "mx.gone.example")
    add_failure(rds, "mx.stays.example")
    lst = Listener(pg, "sg_tls_failures")
    try:
        r = api(inst, "DELETE", TLSF + "/MX.Gone.Example.")
        assert r.status_code == 204 and r.content == b""
        assert "mx.gone.example" in lst.got("mx.gone.example")
    finally:
        lst.close()
    assert rds.get("sg:tls-failure:mx.gone.example") is None
    assert rds.get("sg:tls-failure:mx.stays.example") is not None
    assert [i["id"] for i in api(inst, "GET", TLSF).json()["items"]] == \
        ["mx.stays.example"]
    rows = audit_rows(pg, "tls_failures.delete", "tls_failure:mx.gone.example")
    assert len(rows) == 1 and rows[0]["old"] == value
    assert rows[0]["new"] is None and rows[0]["actor"] == "token:test-admin"

    # absent: 404, but every worker is still told to forget it
    lst = Listener(pg, "sg_tls_failures")
    try:
        problem(api(inst, "DELETE", TLSF + "/mx.gone.example"), 404,
                "not-found")
        assert "mx.gone.example" in lst.got("mx.gone.example")
    finally:
        lst.close()
    assert len(audit_rows(pg, "tls_failures.delete",
                          "tls_failure:mx.gone.example")) == 1

    add_failure(rds, "2001:db8::5")
    assert api(inst, "DELETE", TLSF + "/2001:DB8::5").status_code == 204
    assert rds.get("sg:tls-failure:2001:db8::5") is None

    for bad in ("a*b", "a%20b", "x" * 256, "%2e"):
        problem(api(inst, "DELETE", TLSF + "/" + bad), 404, "not-found")


def test_tls_failures_authorization(inst, pg, rds):
    add_failure(rds, "mx.auth.example")
    ro = reader(pg)
    problem(api(inst, "DELETE", TLSF + "/mx.auth.example", token=ro), 403,
            "forbidden")
    problem(api(inst, "DELETE", TLSF + "/mx.auth.example", token=None), 401,
            "unauthorized")
    assert rds.get("sg:tls-failure:mx.auth.example") is not None


def test_tls_failures_redis_down_is_503(inst, pg, redis_srv, rds):
    add_failure(rds, "mx.down.example")
    redis_srv.stop()
    try:
        deadline = time.monotonic() + WAIT
        while True:
            r = api(inst, "GET", TLSF)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        body = problem(r, 503, "redis-unavailable")
        assert "Redis is unavailable" in body["detail"]
        assert "memory" in body["detail"]

        # the workers are told all the same: their memory is the list now
        lst = Listener(pg, "sg_tls_failures")
        try:
            body = problem(api(inst, "DELETE", TLSF + "/mx.down.example"),
                           503, "redis-unavailable")
            assert "drop" in body["detail"]
            assert "mx.down.example" in lst.got("mx.down.example")
        finally:
            lst.close()

        # a read-only token is still refused first
        problem(api(inst, "DELETE", TLSF + "/mx.down.example",
                    token=reader(pg)), 403, "forbidden")
    finally:
        redis_srv.start()
        wait_redis(inst)
    # the key survived in Redis (saved on shutdown): the list works again
    r = api(inst, "GET", TLSF)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------- queue

@pytest.fixture(scope="module")
def local_domain(pg):
    """DOMAIN, delivered to a loopback port nobody listens on."""
    port = free_port()          # never handed to a server later
    conn = pg.connect()
    with conn.cursor() as cur:
        cur.execute("DELETE FROM domains WHERE name = %s", (DOMAIN,))
        cur.execute("INSERT INTO domains (name, internal_server) "
                    "VALUES (%s, %s) RETURNING id",
                    (DOMAIN, "127.0.0.1:%d" % port))
        row = cur.fetchone()
    conn.close()
    yield DOMAIN
    if not pg.is_running():
        pg.start()
    sql(pg, "DELETE FROM domains WHERE id = %s", row[0])


@pytest.fixture
def srv(sg_module, local_domain, pg):
    """The module's instance, accepting mail for DOMAIN."""
    if not pg.is_running():
        pg.start()
    deadline = time.monotonic() + WAIT
    r = None
    while time.monotonic() < deadline:
        try:
            r = smtp_dialog(sg_module.smtp_port, [
                "EHLO ready.example", "MAIL FROM:<probe@ready.example>",
                "RCPT TO:<probe@%s>" % DOMAIN, "QUIT"])
            if r[3][0] == 250:
                return sg_module
        except (OSError, ConnectionError, IndexError):
            pass
        time.sleep(0.2)
    pytest.fail("RCPT to %s never accepted: %r" % (DOMAIN, r))


def send(inst, rcpts, sender=None):
    """Queue one message over SMTP; rcpts are 'addr' or 'addr PARAMS'.
    Returns its queue id."""
    if sender is None:
        sender = "s%d@sender.example" % time.monotonic_ns()
    lines = ["EHLO client.example", "MAIL FROM:<%s>" % sender]
    for rcpt in rcpts:
        addr, _, params = rcpt.partition(" ")
        lines.append("RCPT TO:<%s>%s" % (addr, " " + params if params else ""))
    lines += ["DATA", b"Subject: delivery api\r\n\r\nHello.\r\n.\r\n", "QUIT"]
    replies = smtp_dialog(inst.smtp_port, lines)
    for code, text in replies[2:2 + len(rcpts)]:
        assert code == 250, replies
    m = QUEUED.match(replies[-2][1][-1])
    assert m, replies
    SENT.append(m.group(1))
    return m.group(1)


def park(pg, qid):
    """Every recipient of qid deferred for a day (and no longer claimed)."""
    sql(pg, "UPDATE recipients SET state = 'deferred', claimed_by = NULL,"
            " lease_until = NULL, next_attempt_at = now() + interval '1 day'"
            " WHERE message_id = %s", qid)


def test_queue_get_has_attempts_and_outcomes(srv, pg):
    qid = send(srv, ["a@%s" % DOMAIN, "b@%s NOTIFY=NEVER" % DOMAIN])
    r = api(srv, "GET", "%s/%s" % (QUEUE, qid))
    assert r.status_code == 200, r.text
    doc = r.json()
    # the fields it had keep their place and meaning
    for k in ("id", "received_at", "sender", "size", "body_type", "smtputf8",
              "dsn", "requiretls", "content_filter_rule_id",
              "tls_required_no", "client", "tls", "recipients"):
        assert k in doc, k
    assert "dsn_of" in doc and doc["dsn_of"] is None
    assert "last_attempt_at" in doc
    assert isinstance(doc["attempts"], list)
    rcpts = doc["recipients"]
    assert [x["address"] for x in rcpts] == ["a@" + DOMAIN, "b@" + DOMAIN]
    for x in rcpts:
        assert x["state"] in PENDING
        for k in ("id", "address", "original_address", "domain",
                  "local_domain", "state", "notify", "orcpt",
                  "next_attempt_at", "attempts", "last_reply", "final_at",
                  "dsn_status", "dsn_action", "dsn_remote_mta"):
            assert k in x, k
        rfc3339(x["next_attempt_at"])
        assert x["final_at"] is None
    assert rcpts[1]["notify"] == "NEVER"

    # attempts as the delivery engine writes them, oldest first
    sql(pg, "INSERT INTO delivery_attempts (message_id, recipients,"
            " started_at, ended_at, destination, mx_host, ip, port,"
            " tls_level, tls_rule, tls_reason, starttls, tls_protocol,"
            " tls_cipher, tls_verify, tls_host_match, tls_result_type,"
            " result, reply, worker) VALUES"
            " (%s, ARRAY['a@dlv.test'], now() - interval '1 minute', now(),"
            "  'local:127.0.0.1:25', 'mx.dlv.test', '2001:db8::25', 25,"
            "  'may', 6, 'opportunistic', true, 'TLSv1.3',"
            "  'TLS_AES_256_GCM_SHA384', 'ok', true, NULL, 'deferred',"
            "  '451 4.3.0 try later', 'host:1:2'),"
            " (%s, ARRAY['a@dlv.test', 'b@dlv.test'],"
            "  now() - interval '1 hour', now() - interval '59 minutes',"
            "  'dlv.test', NULL, '192.0.2.25', 25, 'none', 7, 'clear', false,"
            "  NULL, NULL, NULL, NULL, 'starttls-not-supported', 'next_mx',"
            "  NULL, 'host:1:2')", qid, qid)
    doc = api(srv, "GET", "%s/%s" % (QUEUE, qid.lower())).json()
    att = [a for a in doc["attempts"] if a["worker"] == "host:1:2"]
    assert len(att) == 2
    old, new = att
    assert list(old) == ["id", "message_id", "recipients", "started_at",
                         "ended_at", "destination", "mx_host", "ip", "port",
                         "tls_level", "tls_rule", "tls_reason", "starttls",
                         "tls_protocol", "tls_cipher", "tls_verify",
                         "tls_host_match", "tls_result_type", "result",
                         "reply", "worker", "policy", "requirements"]
    assert list(old["policy"]) == ["type", "domain", "id", "mode", "text",
                                   "result_type", "reason"]
    assert old["requirements"] is None      # not a REQUIRETLS message
    assert rfc3339(old["started_at"]) < rfc3339(new["started_at"])
    assert old["recipients"] == ["a@dlv.test", "b@dlv.test"]
    assert old["ip"] == "192.0.2.25" and old["mx_host"] is None
    assert old["result"] == "next_mx" and old["starttls"] is False
    assert old["tls_result_type"] == "starttls-not-supported"
    assert new["ip"] == "2001:db8::25" and new["port"] == 25
    assert new["message_id"] == qid and new["tls_rule"] == 6
    assert new["tls_host_match"] is True
    assert new["reply"] == "451 4.3.0 try later"
    rfc3339(new["ended_at"])

    # the list answers the same message without its attempts
    items = api(srv, "GET", QUEUE, params={"sender": doc["sender"]}) \
        .json()["items"]
    assert [i["id"] for i in items] == [qid]
    assert "attempts" not in items[0] and "dsn_of" in items[0]


def test_queue_retry(srv, pg):
    qid = send(srv, ["r1@%s" % DOMAIN, "r2@%s" % DOMAIN])
    park(pg, qid)
    lst = Listener(pg, "sg_queue")
    try:
        r = api(srv, "POST", "%s/%s/retry" % (QUEUE, qid.lower()))
        assert r.status_code == 200, r.text
        assert r.json() == {"id": qid, "recipients_due": 2}
        assert lst.got() != []
    finally:
        lst.close()
    due = sql(pg, "SELECT count(*) AS n FROM recipients WHERE message_id = %s"
                  " AND next_attempt_at <= now()", qid)[0]["n"]
    assert due == 2
    rows = audit_rows(pg, "queue.retry", "message:" + qid)
    assert len(rows) == 1 and rows[0]["actor"] == "token:test-admin"
    assert rows[0]["new"] == {"recipients_due": ["r1@dlv.test",
                                                 "r2@dlv.test"]}

    # {} is the same as no body; a delivered recipient is not retried
    park(pg, qid)
    sql(pg, "UPDATE recipients SET state = 'delivered', final_at = now()"
            " WHERE message_id = %s AND address = 'r2@dlv.test'", qid)
    r = api(srv, "POST", "%s/%s/retry" % (QUEUE, qid), json={})
    assert r.status_code == 200, r.text
    assert r.json()["recipients_due"] == 1

    invalid(api(srv, "POST", "%s/%s/retry" % (QUEUE, qid), json={"now": 1}),
            "now", "not a known")

    # nothing pending: 409, no audit row
    sql(pg, "UPDATE recipients SET state = 'delivered', final_at = now(),"
            " claimed_by = NULL WHERE message_id = %s", qid)
    body = problem(api(srv, "POST", "%s/%s/retry" % (QUEUE, qid)), 409,
                   "nothing-pending")
    assert "nothing to retry" in body["detail"]
    assert len(audit_rows(pg, "queue.retry", "message:" + qid)) == 2

    problem(api(srv, "POST", "%s/0123456789ABCDEF/retry" % QUEUE), 404,
            "not-found")
    problem(api(srv, "POST", "%s/XYZ/retry" % QUEUE), 404, "not-found")


def test_queue_delete_without_bounce(srv, pg):
    qid = send(srv, ["d1@%s" % DOMAIN, "d2@%s" % DOMAIN])
    park(pg, qid)
    sql(pg, "UPDATE recipients SET state = 'delivered', final_at = now(),"
            " last_reply = '250 ok' WHERE message_id = %s"
            " AND address = 'd2@dlv.test'", qid)
    lst = Listener(pg, "sg_queue")
    try:
        r = api(srv, "DELETE", "%s/%s" % (QUEUE, qid))
        assert r.status_code == 200, r.text
        assert lst.got() != []
    finally:
        lst.close()
    doc = r.json()
    assert doc["id"] == qid and "attempts" in doc
    d1, d2 = doc["recipients"]
    assert d1["state"] == "deleted"
    assert d1["last_reply"] == "deleted by an administrator"
    assert d1["dsn_status"] == "5.0.0" and d1["dsn_action"] == "failed"
    rfc3339(d1["final_at"])
    assert d2["state"] == "delivered" and d2["last_reply"] == "250 ok"
    db = sql(pg, "SELECT address, dsn_due, claimed_by FROM recipients"
                 " WHERE message_id = %s ORDER BY id", qid)
    assert [x["dsn_due"] for x in db] == [False, False]
    assert db[0]["claimed_by"] is None
    rows = audit_rows(pg, "queue.delete", "message:" + qid)
    assert len(rows) == 1
    assert rows[0]["new"] == {"bounce": False, "recipients": ["d1@dlv.test"]}

    # again: nothing left to change, the same document, no new audit row
    r = api(srv, "DELETE", "%s/%s?bounce=false" % (QUEUE, qid))
    assert r.status_code == 200 and r.json()["recipients"] == doc["recipients"]
    assert len(audit_rows(pg, "queue.delete", "message:" + qid)) == 1


def _dsn_due_or_queued(pg, qid):
    """dsn_due per recipient; once the delivery engine has queued the DSN
    (and cleared dsn_due) the recipients it reported count as due."""
    rows = sql(pg, "SELECT address, dsn_due FROM recipients"
                   " WHERE message_id = %s ORDER BY id", qid)
    dsn = sql(pg, "SELECT count(*) AS n FROM messages WHERE dsn_of = %s",
              qid)[0]["n"]
    return [x["dsn_due"] for x in rows], dsn


def test_queue_delete_with_bounce(srv, pg):
    qid = send(srv, ["b1@%s" % DOMAIN,
                     "b2@%s NOTIFY=NEVER" % DOMAIN,
                     "b3@%s NOTIFY=SUCCESS,FAILURE" % DOMAIN,
                     "b4@%s NOTIFY=DELAY" % DOMAIN])
    # one of them is being delivered right now by some worker
    sql(pg, "UPDATE recipients SET state = 'delivering', claimed_by = 'w:1:2',"
            " lease_until = now() + interval '1 hour'"
            " WHERE message_id = %s AND address = 'b1@dlv.test'", qid)
    r = api(srv, "DELETE", "%s/%s?bounce=true" % (QUEUE, qid))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [x["state"] for x in doc["recipients"]] == ["bounced"] * 4
    for x in doc["recipients"]:
        assert x["dsn_status"] == "5.0.0" and x["dsn_action"] == "failed"
        assert x["last_reply"] == "deleted by an administrator"
        assert x["final_at"]
    due, dsn = _dsn_due_or_queued(pg, qid)
    assert due == [True, False, True, False] or dsn == 1, (due, dsn)
    claim = sql(pg, "SELECT claimed_by, lease_until FROM recipients"
                    " WHERE message_id = %s AND address = 'b1@dlv.test'", qid)
    assert claim[0]["claimed_by"] is None and claim[0]["lease_until"] is None
    rows = audit_rows(pg, "queue.delete", "message:" + qid)
    assert rows[0]["new"]["bounce"] is True
    assert sorted(rows[0]["new"]["recipients"]) == \
        ["b%d@dlv.test" % i for i in range(1, 5)]


def test_queue_delete_null_sender_never_bounces(srv, pg):
    qid = send(srv, ["n1@%s" % DOMAIN], sender="")
    r = api(srv, "DELETE", "%s/%s?bounce=true" % (QUEUE, qid))
    assert r.status_code == 200, r.text
    assert r.json()["recipients"][0]["state"] == "bounced"
    due, dsn = _dsn_due_or_queued(pg, qid)
    assert due == [False] and dsn == 0


def test_queue_delete_errors(srv, pg):
    qid = send(srv, ["e1@%s" % DOMAIN])
    for bad in ("yes", "1", "TRUE", ""):
        invalid(api(srv, "DELETE", "%s/%s?bounce=%s" % (QUEUE, qid, bad)),
                "bounce", "true or false")
    problem(api(srv, "DELETE", "%s/0123456789ABCDEF" % QUEUE), 404,
            "not-found")
    problem(api(srv, "DELETE", "%s/0123456789abcdeg" % QUEUE), 404,
            "not-found")
    ro = reader(pg)
    problem(api(srv, "DELETE", "%s/%s" % (QUEUE, qid), token=ro), 403,
            "forbidden")
    problem(api(srv, "POST", "%s/%s/retry" % (QUEUE, qid), token=ro), 403,
            "forbidden")
    problem(api(srv, "DELETE", "%s/%s" % (QUEUE, qid), token=None), 401,
            "unauthorized")
    problem(api(srv, "POST", "%s/%s/retry" % (QUEUE, qid), token=None), 401,
            "unauthorized")
    assert api(srv, "GET", "%s/%s" % (QUEUE, qid), token=ro).status_code == 200
    state = sql(pg, "SELECT state FROM recipients WHERE message_id = %s",
                qid)[0]["state"]
    assert state in PENDING


def test_workers_load_routes_and_required(srv, pg):
    """The workers' lists (common/sg_lists.c) load with routes, a default
    route, a hand-written bad route (skipped, logged) and the required
    list: a local domain added afterwards is accepted, so the reload that
    carried them all succeeded."""
    for body in ({"domain": "r1.example", "relay": "relay.example"},
                 {"domain": "*", "relay": "[2001:db8::1]:2525"},
                 {"domain": "r2.example", "relay": "192.0.2.1:587"}):
        assert api(srv, "POST", ROUTES, json=body).status_code == 201
    for value in ("mx.required.example", "192.0.2.0/24", "2001:db8::7"):
        assert api(srv, "POST", REQ, json={"value": value}).status_code == 201
    sql(pg, "INSERT INTO routes (domain, relay) VALUES ('bad.example', 'x:')")
    sql(pg, "INSERT INTO domains (name, internal_server)"
            " VALUES ('late.dlv.test', '[2001:db8::25]')")
    try:
        deadline = time.monotonic() + WAIT
        while True:
            r = smtp_dialog(srv.smtp_port, [
                "EHLO ready.example", "MAIL FROM:<probe@ready.example>",
                "RCPT TO:<probe@late.dlv.test>", "QUIT"])
            if r[3][0] == 250:
                break
            assert time.monotonic() < deadline, r
            time.sleep(0.2)
        with open(srv.error_log) as f:
            log = f.read()
        assert "cannot build lists" not in log
        assert "cannot load lists" not in log
        assert 'route for "bad.example" is skipped' in log
    finally:
        sql(pg, "DELETE FROM domains WHERE name = 'late.dlv.test'")
        sql(pg, "DELETE FROM routes")
        sql(pg, "DELETE FROM starttls_required")
