"""Hosting our own MTA-STS policies (RFC 8461): the policy of a local domain
at https://mta-sts.<domain>/.well-known/mta-sts.txt on the admin HTTPS
listener with the active certificate, its id changing with every policy
change (sql/009_mta_sts_hosting.sql), and GET /api/v1/domains/{id}/dns:
the records to publish compared with live DNS (dnsmasq, dnsserver.py).
"""

import http.client
import re
import socket
import ssl
import time

import pytest

import dnsserver
import sgtest
from sgtest import api, create_token

DOMAINS = "/api/v1/domains"
POLICY_PATH = "/.well-known/mta-sts.txt"
SELF = "sg.mail.test"                   # the instance's certificate name

# RFC 8461, 3.1: sts-id = 1*32(ALPHA / DIGIT)
ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")

# RFC 8461, 3.2, the ABNF of the policy as sg writes it: CRLF after every
# field, "version" first, keys of 1*32(ALPHA / DIGIT / "_" / "-" / "."),
# values without CR/LF; mx values are "*."-or-not A-label domains
POLICY_LINE_RE = re.compile(r"^([A-Za-z0-9_.-]{1,32}):[ \t]*([^\r\n]*)$")
LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
MX_RE = re.compile(r"^(?:\*\.)?%s(?:\.%s)*$" % (LABEL, LABEL))


def parse_policy(body):
    """RFC 8461, 3.2: the policy as a sender reads it; fails on anything
    sg's own writer must never produce."""
    assert body.endswith("\r\n"), repr(body)
    lines = body[:-2].split("\r\n")
    fields = []
    for line in lines:
        m = POLICY_LINE_RE.match(line)
        assert m, "not key: value: %r" % line
        fields.append((m.group(1), m.group(2).rstrip(" \t")))
    assert fields[0] == ("version", "STSv1"), fields    # 3.2: first
    keys = [k for k, _ in fields]
    for k in ("mode", "max_age"):
        assert keys.count(k) == 1, fields
    policy = {k: v for k, v in fields if k != "mx"}
    policy["mx"] = [v for k, v in fields if k == "mx"]
    assert policy["mode"] in ("none", "testing", "enforce")
    assert re.match(r"^[0-9]{1,10}$", policy["max_age"])
    assert int(policy["max_age"]) <= 31557600
    for mx in policy["mx"]:
        assert MX_RE.match(mx), mx
    if policy["mode"] != "none":
        assert policy["mx"], "RFC 8461 3.2: testing/enforce need an mx"
    return policy


def fetch(inst, host, method="GET", port=None, url=None):
    """The policy URL on the instance's HTTPS listener, Host given, the
    certificate not verified."""
    return api(url or inst, method, POLICY_PATH, token=None,
               headers={"Host": host}, allow_redirects=False)


class _SniConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port as if to host: SNI and Host are host."""

    def __init__(self, host, port, context):
        super().__init__(host, port, context=context, timeout=10)

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port),
                                        self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_verified(inst, host, cafile):
    """GET the policy the way a sender does (RFC 8461, 3.3): SNI, the
    certificate checked against cafile for host."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    conn = _SniConnection(host, inst.admin_port, ctx)
    try:
        conn.request("GET", POLICY_PATH)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read().decode()
    finally:
        conn.close()


def wait_for(fn, what, timeout=20.0):
    """fn() until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail("%s: not within %.0f s" % (what, timeout))
        time.sleep(0.05)


def served(inst, host, expect=None):
    """The policy text once it is served (and equal to expect, if given):
    workers reload their lists on NOTIFY."""
    def probe():
        r = fetch(inst, host)
        if r.status_code == 200 and (expect is None or r.text == expect):
            return r.text
        return None
    return wait_for(probe, "policy of %s" % host)


def gone(inst, host):
    wait_for(lambda: fetch(inst, host).status_code == 404,
             "404 for %s" % host)


def policy_text(mode, mx, max_age):
    return ("version: STSv1\r\nmode: %s\r\n" % mode
            + "".join("mx: %s\r\n" % m for m in mx)
            + "max_age: %d\r\n" % max_age)


@pytest.fixture(scope="module")
def dns():
    d = dnsserver.DnsServer().start({"zones": ["test"]})
    yield d
    d.stop()


@pytest.fixture(scope="module")
def sgm(dns, pg, redis_srv, module_so):
    # settings and lists polled hourly: only NOTIFY brings a change within
    # wait_for's window
    inst = sgtest.start_sg(pg, redis_srv, resolver=dns.address,
                           hostname=SELF,
                           extra_main="sg_settings_poll 1h;\n")
    yield inst
    sgtest.finish_sg(inst)


@pytest.fixture(scope="module", autouse=True)
def own_audit_rows(pg):
    """The domains.* audit rows of this module go with it: other modules
    count theirs in the same database."""
    def query(sql, *args):
        conn = pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchone() if cur.description else None
        finally:
            conn.close()
    start = query("SELECT coalesce(max(id), 0) FROM audit_log")[0]
    yield
    query("DELETE FROM audit_log WHERE id > %s AND action LIKE 'domains.%%'",
          start)


@pytest.fixture
def inst(sgm, pg):
    """The module's instance: no domains, its own certificate active."""
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM domains")
    finally:
        conn.close()
    sgm.reset_settings()
    return sgm


def create(inst, name, **kw):
    body = {"name": name, "internal_server": "mx.internal:25"}
    body.update(kw)
    r = api(inst, "POST", DOMAINS, json=body)
    assert r.status_code == 201, r.text
    return r.json()


# the policy document


def test_policy_served(inst):
    d = create(inst, "sts.test", mta_sts={
        "mode": "enforce", "mx": [SELF, "*.mx.sts.test"], "max_age": 86400})
    assert ID_RE.match(d["mta_sts"]["id"])

    expect = policy_text("enforce", [SELF, "*.mx.sts.test"], 86400)
    body = served(inst, "mta-sts.sts.test")
    assert body == expect

    r = fetch(inst, "mta-sts.sts.test")
    assert r.status_code == 200
    # RFC 8461, 3.2: "the media type of the policy MUST be text/plain"
    assert r.headers["Content-Type"] == "text/plain"
    assert r.headers["Content-Length"] == str(len(expect))
    assert parse_policy(r.text) == {
        "version": "STSv1", "mode": "enforce", "max_age": "86400",
        "mx": [SELF, "*.mx.sts.test"]}

    # no token needed; the Host is matched without port, case or final dot
    for host in ("MTA-STS.Sts.Test", "mta-sts.sts.test.",
                 "mta-sts.sts.test:%d" % inst.admin_port):
        r = fetch(inst, host)
        assert r.status_code == 200 and r.text == expect, host

    r = fetch(inst, "mta-sts.sts.test", method="HEAD")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Content-Length"] == str(len(expect))


def test_policy_other_hosts_and_methods(inst):
    create(inst, "sts.test", mta_sts={"mode": "testing", "mx": [SELF]})
    served(inst, "mta-sts.sts.test")

    for host in ("mta-sts.other.test", "sts.test", "127.0.0.1",
                 "www.sts.test", "mta-sts.mta-sts.sts.test", "mta-sts."):
        r = fetch(inst, host)
        assert r.status_code == 404, host
        assert r.json()["type"] == "urn:sg:problem:not-found"

    r = api(inst, "GET", "/.well-known/mta-sts.txt.bak", token=None,
            headers={"Host": "mta-sts.sts.test"})
    assert r.status_code == 404

    r = api(inst, "POST", POLICY_PATH, token=None, json={},
            headers={"Host": "mta-sts.sts.test"})
    assert r.status_code == 405


def test_policy_needs_https(inst):
    """RFC 8461, 3.3: policies are fetched over HTTPS only."""
    create(inst, "sts.test", mta_sts={"mode": "testing", "mx": [SELF]})
    served(inst, "mta-sts.sts.test")
    r = fetch(inst, "mta-sts.sts.test", url=inst.http_url)
    assert r.status_code == 403
    assert r.json()["type"] == "urn:sg:problem:https-required"


def test_policy_id_changes_with_the_policy(inst, pg):
    d = create(inst, "sts.test", mta_sts={"mode": "testing", "mx": [SELF],
                                          "max_age": 3600})
    path = "%s/%d" % (DOMAINS, d["id"])
    ids = [d["mta_sts"]["id"]]

    def put(body):
        r = api(inst, "PUT", path, json=body)
        assert r.status_code == 200, r.text
        assert ID_RE.match(r.json()["mta_sts"]["id"])
        return r.json()

    # a change elsewhere keeps the id (senders need not refetch)
    u = put({"comment": "head office", "internal_server": "mx2:25",
             "tlsrpt_rua": "mailto:tlsrpt@sts.test"})
    assert u["mta_sts"]["id"] == ids[-1]
    # the same policy written again: no change, same id
    u = put({"mta_sts": {"mode": "testing", "mx": [SELF], "max_age": 3600}})
    assert u["mta_sts"]["id"] == ids[-1]

    # each of mode, mx and max_age: a new id, and the new policy served
    for change, text in (
            ({"max_age": 7200}, policy_text("testing", [SELF], 7200)),
            ({"mx": [SELF, "*.sts.test"]},
             policy_text("testing", [SELF, "*.sts.test"], 7200)),
            ({"mx": ["*.sts.test", SELF]},
             policy_text("testing", ["*.sts.test", SELF], 7200)),
            ({"mode": "enforce"},
             policy_text("enforce", ["*.sts.test", SELF], 7200))):
        u = put({"mta_sts": change})
        assert u["mta_sts"]["id"] not in ids, change
        ids.append(u["mta_sts"]["id"])
        assert served(inst, "mta-sts.sts.test", text) == text

    assert api(inst, "GET", path).json()["mta_sts"]["id"] == ids[-1]

    # read-only in the API
    r = api(inst, "PUT", path, json={"mta_sts": {"id": "abc"}})
    assert r.status_code == 422
    assert {"field": "mta_sts.id", "message": "is read-only"} \
        in r.json()["errors"]

    # a change by hand gets a new id too (the trigger, not the API)
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("UPDATE domains SET mta_sts_max_age = 60"
                        " WHERE id = %s RETURNING mta_sts_id", (d["id"],))
            by_hand = cur.fetchone()[0]
            cur.execute("UPDATE domains SET comment = 'x'"
                        " WHERE id = %s RETURNING mta_sts_id", (d["id"],))
            assert cur.fetchone()[0] == by_hand
    finally:
        conn.close()
    assert by_hand not in ids and ID_RE.match(by_hand)
    served(inst, "mta-sts.sts.test",
           policy_text("enforce", ["*.sts.test", SELF], 60))

    # every domain has its own id
    other = create(inst, "other.test")
    assert other["mta_sts"]["id"] not in ids + [by_hand]


def test_mode_none(inst):
    """RFC 8461, 8.3: mode none is served, so that senders drop a policy
    they cached; a domain that never had one serves mode none too."""
    d = create(inst, "sts.test", mta_sts={"mode": "enforce", "mx": [SELF],
                                          "max_age": 604800})
    served(inst, "mta-sts.sts.test")
    r = api(inst, "PUT", "%s/%d" % (DOMAINS, d["id"]),
            json={"mta_sts": {"mode": "none", "max_age": 86400}})
    assert r.status_code == 200, r.text
    assert r.json()["mta_sts"]["id"] != d["mta_sts"]["id"]
    text = served(inst, "mta-sts.sts.test",
                  policy_text("none", [SELF], 86400))
    assert parse_policy(text)["mode"] == "none"

    create(inst, "plain.test")
    text = served(inst, "mta-sts.plain.test")
    assert text == "version: STSv1\r\nmode: none\r\nmax_age: 604800\r\n"
    assert parse_policy(text) == {"version": "STSv1", "mode": "none",
                                  "max_age": "604800", "mx": []}


def test_rename_and_delete(inst):
    d = create(inst, "sts.test", mta_sts={"mode": "testing", "mx": [SELF]})
    served(inst, "mta-sts.sts.test")
    r = api(inst, "PUT", "%s/%d" % (DOMAINS, d["id"]),
            json={"name": "new.test"})
    assert r.status_code == 200
    assert r.json()["mta_sts"]["id"] == d["mta_sts"]["id"]
    served(inst, "mta-sts.new.test")
    gone(inst, "mta-sts.sts.test")
    assert api(inst, "DELETE", "%s/%d" % (DOMAINS, d["id"])).status_code \
        == 204
    gone(inst, "mta-sts.new.test")


def test_policy_with_active_certificate_and_sni(inst, pg, tmp_path):
    """A sender's fetch (RFC 8461, 3.3): SNI mta-sts.<domain>, the
    certificate validated for that name. The certificate made active
    through the database is served without a reload."""
    host = "mta-sts.sts.test"
    create(inst, "sts.test", mta_sts={"mode": "enforce", "mx": [SELF]})
    served(inst, host)

    cert_pem, key_pem = sgtest.make_self_signed(host)
    cafile = tmp_path / "ca.pem"
    cafile.write_text(cert_pem)
    cert_id = sgtest.store_certificate(pg.conninfo, cert_pem, key_pem, host,
                                       activate=True)
    try:
        def verified():
            try:
                return fetch_verified(inst, host, str(cafile))
            except ssl.SSLError:
                return None     # still the previous certificate
        status, ctype, body = wait_for(verified, "the new certificate")
        assert status == 200 and ctype == "text/plain"
        assert body == policy_text("enforce", [SELF], 604800)

        # the dns endpoint sees that it names the policy host
        r = api(inst, "GET", DOMAINS + "/sts.test/dns")
        assert r.status_code == 200, r.text
        assert r.json()["certificate"]["id"] == cert_id
        assert r.json()["certificate"]["covers_policy_host"] is True
    finally:
        inst.reset_settings()

    # the instance's own certificate does not name it: a sender refuses
    wait_for(lambda: verified() is None, "the old certificate again")


# GET /api/v1/domains/{id}/dns


def by_name(body):
    return {(r["name"], r["type"]): r for r in body["records"]}


def test_dns_records(inst, dns):
    ok = create(inst, "ok.test", mta_sts={"mode": "enforce",
                                          "mx": [SELF, "*.ok.test"]},
                tlsrpt_rua="mailto:tlsrpt@ok.test, https://r.ok.test/v1")
    diff = create(inst, "diff.test", mta_sts={"mode": "testing",
                                              "mx": [SELF]},
                  tlsrpt_rua="mailto:tlsrpt@diff.test")
    missing = create(inst, "missing.test",
                     mta_sts={"mode": "enforce", "mx": [SELF]},
                     tlsrpt_rua="mailto:t@missing.test")
    none = create(inst, "none.test")
    dns.reload({
        "zones": ["test"],
        "mx": [("ok.test", SELF, 10), ("ok.test", "backup.ok.test", 20),
               ("diff.test", "mx.elsewhere.test", 10)],
        "hosts": {SELF: ["127.0.0.1"], "backup.ok.test": ["127.0.0.2"],
                  "mta-sts.ok.test": ["127.0.0.1"],
                  "mta-sts.diff.test": ["127.0.0.99"],
                  "mx.elsewhere.test": ["127.0.0.98"]},
        "cname": [],
        "txt": [("_mta-sts.ok.test", "v=STSv1; id=%s" % ok["mta_sts"]["id"]),
                ("_smtp._tls.ok.test",
                 "v=TLSRPTv1;rua=mailto:tlsrpt@ok.test,https://r.ok.test/v1"),
                ("_mta-sts.diff.test", "v=STSv1; id=20200101T000000Z1"),
                ("_smtp._tls.diff.test",
                 "v=TLSRPTv1; rua=mailto:someone@else.test"),
                ("diff.test", "v=spf1 -all")],
    })

    # everything published as sg says: ok
    r = api(inst, "GET", DOMAINS + "/ok.test/dns")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["domain"] == "ok.test"
    assert body["host_name"] == SELF
    assert body["host_name_from"] == "certificate"
    assert body["mta_sts"] == {
        "mode": "enforce", "id": ok["mta_sts"]["id"],
        "policy_url": "https://mta-sts.ok.test/.well-known/mta-sts.txt",
        "policy": policy_text("enforce", [SELF, "*.ok.test"], 604800)}
    recs = by_name(body)
    assert [(x["name"], x["type"]) for x in body["records"]] == [
        ("ok.test", "MX"), ("mta-sts.ok.test", "CNAME"),
        ("_mta-sts.ok.test", "TXT"), ("_smtp._tls.ok.test", "TXT")]
    mx = recs[("ok.test", "MX")]
    assert mx["value"] == "10 %s." % SELF and mx["status"] == "ok"
    assert sorted(mx["live"]) == ["10 %s." % SELF, "20 backup.ok.test."]
    ph = recs[("mta-sts.ok.test", "CNAME")]
    assert ph["value"] == SELF + "." and ph["status"] == "ok"
    assert ph["live"] == ["127.0.0.1"]
    txt = recs[("_mta-sts.ok.test", "TXT")]
    assert txt["value"] == "v=STSv1; id=" + ok["mta_sts"]["id"]
    assert txt["status"] == "ok" and txt["required"] is True
    rpt = recs[("_smtp._tls.ok.test", "TXT")]
    assert rpt["value"] == \
        "v=TLSRPTv1; rua=mailto:tlsrpt@ok.test, https://r.ok.test/v1"
    assert rpt["status"] == "ok"
    assert body["ok"] is True
    # the instance's certificate names sg.mail.test only
    assert body["certificate"]["covers_policy_host"] is False
    assert any("mta-sts.ok.test" in w for w in body["warnings"])

    # published, but not what sg says: different, with what DNS says
    body = api(inst, "GET", "%s/%d/dns" % (DOMAINS, diff["id"])).json()
    recs = by_name(body)
    mx = recs[("diff.test", "MX")]
    assert mx["status"] == "different"
    assert mx["live"] == ["10 mx.elsewhere.test."]
    ph = recs[("mta-sts.diff.test", "CNAME")]
    assert ph["status"] == "different" and ph["live"] == ["127.0.0.99"]
    txt = recs[("_mta-sts.diff.test", "TXT")]
    assert txt["status"] == "different"
    assert txt["live"] == ["v=STSv1; id=20200101T000000Z1"]
    rpt = recs[("_smtp._tls.diff.test", "TXT")]
    assert rpt["status"] == "different"
    assert rpt["live"] == ["v=TLSRPTv1; rua=mailto:someone@else.test"]
    assert body["ok"] is False
    # RFC 8461, 4.1: an MX the policy does not allow
    assert any("mx.elsewhere.test" in w and "4.1" in w
               for w in body["warnings"])

    # nothing published: missing
    body = api(inst, "GET", DOMAINS + "/missing.test/dns").json()
    assert [(x["name"], x["status"], x["live"]) for x in body["records"]] \
        == [("missing.test", "missing", []),
            ("mta-sts.missing.test", "missing", []),
            ("_mta-sts.missing.test", "missing", []),
            ("_smtp._tls.missing.test", "missing", [])]
    assert body["ok"] is False

    # mode none: no TLS-RPT address, no record for it; the policy records
    # are not required (RFC 8461, 8.3)
    body = api(inst, "GET", "%s/%d/dns" % (DOMAINS, none["id"])).json()
    assert [(x["name"], x["required"]) for x in body["records"]] == [
        ("none.test", True), ("mta-sts.none.test", False),
        ("_mta-sts.none.test", False)]
    assert body["mta_sts"]["policy"] == \
        "version: STSv1\r\nmode: none\r\nmax_age: 604800\r\n"
    assert "note" in by_name(body)[("_mta-sts.none.test", "TXT")]
    del missing


def test_dns_failures_and_access(inst, pg):
    # outside every zone dnsmasq knows: REFUSED, which is SERVFAIL to sg
    create(inst, "fail.invalid-zone", mta_sts={"mode": "testing",
                                               "mx": [SELF]})
    r = api(inst, "GET", DOMAINS + "/fail.invalid-zone/dns", timeout=40)
    assert r.status_code == 200, r.text
    body = r.json()
    for rec in body["records"]:
        assert rec["status"] == "error" and rec["error"], rec
    assert body["ok"] is False

    r = api(inst, "GET", DOMAINS + "/nope.test/dns")
    assert r.status_code == 404
    r = api(inst, "GET", DOMAINS + "/123456/dns")
    assert r.status_code == 404
    r = api(inst, "GET", DOMAINS + "/fail.invalid-zone/dns", token=None)
    assert r.status_code == 401
    ro = create_token(pg.conninfo, "sts-ro", "read-only")
    r = api(inst, "GET", DOMAINS + "/fail.invalid-zone/dns", token=ro,
            timeout=40)
    assert r.status_code == 200
    r = api(inst, "POST", DOMAINS + "/fail.invalid-zone/dns", json={})
    assert r.status_code == 405


def test_policy_only_server(sg_instance, pg, tmp_path):
    """The documented public server: only the policy location, no API; it
    serves the active certificate like the admin listener."""
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM domains")
    finally:
        conn.close()
    port = sgtest.free_port()
    cert, key = sgtest.make_self_signed("fallback.invalid")
    (tmp_path / "c.pem").write_text(cert)
    (tmp_path / "k.pem").write_text(key)
    inst = sg_instance(hostname=SELF, extra_http="""
server {
    listen 127.0.0.1:%d ssl;
    ssl_certificate %s;
    ssl_certificate_key %s;
    location = /.well-known/mta-sts.txt { sgadmin; }
}
""" % (port, tmp_path / "c.pem", tmp_path / "k.pem"))
    create(inst, "pub.test", mta_sts={"mode": "enforce", "mx": [SELF]})
    url = "https://127.0.0.1:%d" % port
    expect = policy_text("enforce", [SELF], 604800)
    wait_for(lambda: fetch(inst, "mta-sts.pub.test", url=url).text == expect,
             "the policy on the public server")
    r = api(url, "GET", "/api/v1/health", token=None)
    assert r.status_code == 404 and "problem" not in \
        r.headers.get("Content-Type", "")
    with socket.create_connection(("127.0.0.1", port)) as s:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(s, server_hostname="mta-sts.pub.test") as t:
            der = t.getpeercert(binary_form=True)
    assert ssl.DER_cert_to_PEM_cert(der).split() == inst.cert_pem.split()
