"""GET /metrics: the Prometheus text exposition format 0.0.4 on the admin
listener (issue 6, item 6: REQUIRETLS deliveries and bounces are counted).

The numbers are counted cluster-wide from PostgreSQL, so the tests write
queue rows straight into the tables (no delivery runs: the instances have
"sg_delivery off") and compare the metrics before and after. The session's
PostgreSQL may hold other modules' rows: only differences are asserted.
"""

import re
import secrets
import time

import pytest
import requests

import sgtest
from sgtest import api, create_token, poll
from test_api_delivery import problem, sql

METRICS = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WAIT = 20

STATES = ("queued", "delivering", "deferred", "delivered", "bounced",
          "deleted")
RESULTS = ("delivered", "deferred", "bounced", "next_mx", "retry_clear")
SOURCES = ("parameter", "rule", "address", "dsn")
STATUSES = ("5.7.10", "5.7.30")

FAMILIES = {
    "sg_queue_recipients": ("gauge", ("state",)),
    "sg_delivery_attempts_total": ("counter", ("result",)),
    "sg_requiretls_deliveries_total": ("counter", ()),
    "sg_requiretls_bounces_total": ("counter", ("status",)),
    "sg_requiretls_messages_total": ("counter", ("source",)),
    "sg_delivery_policy_total": ("counter", ("policy_type", "result_type")),
}

CREATED = []       # queue ids written by this module, removed at its end


# ---------------------------------------------------------------- parser

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _label_value(line, i):
    """The quoted label value starting at line[i] (the opening quote);
    returns (value, index after the closing quote)."""
    assert line[i] == '"', line
    i += 1
    out = []
    while True:
        c = line[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            assert line[i + 1] in ESCAPES, "bad escape in %r" % line
            out.append(ESCAPES[line[i + 1]])
            i += 2
            continue
        assert c != "\n", line
        out.append(c)
        i += 1


def parse(text):
    """A strict reader of the subset of text format 0.0.4 sg writes.
    Returns (types, helps, samples): samples maps (name, ((label, value),
    ...)) to the value (an int: every sg metric is a count)."""
    assert text.endswith("\n") and not text.endswith("\n\n"), repr(text[-40:])
    types, helps, samples = {}, {}, {}
    done = set()          # families whose samples are over
    current = None
    for line in text[:-1].split("\n"):
        assert line, "empty line in %r" % text
        if line.startswith("#"):
            m = re.match(r"^# (HELP|TYPE) (\S+) (.*)$", line)
            assert m, line
            kind, name, rest = m.groups()
            assert NAME.fullmatch(name), line
            if kind == "HELP":
                assert name not in helps, "second HELP: " + line
                assert rest and "\n" not in rest
                helps[name] = rest
            else:
                assert name not in types, "second TYPE: " + line
                assert rest in ("counter", "gauge", "untyped"), line
                # TYPE comes before the family's samples
                assert name not in done and name != current, line
                types[name] = rest
            continue
        m = NAME.match(line)
        assert m, line
        name = m.group(0)
        i = m.end()
        labels = []
        if line[i] == "{":
            i += 1
            while line[i] != "}":
                lm = LABEL.match(line, i)
                assert lm and line[lm.end()] == "=", line
                value, i = _label_value(line, lm.end() + 1)
                labels.append((lm.group(0), value))
                if line[i] == ",":
                    i += 1
            i += 1
        assert line[i] == " ", line
        value = line[i + 1:]
        assert re.fullmatch(r"[0-9]+", value), line
        # a family's samples are together, after its TYPE
        assert name in types, "sample before TYPE: " + line
        if name != current:
            assert name not in done, "family split: " + line
            if current:
                done.add(current)
            current = name
        key = (name, tuple(labels))
        assert key not in samples, "duplicate series: " + line
        assert len({l for l, _ in labels}) == len(labels), line
        samples[key] = int(value)
    return types, helps, samples


def test_parser_reads_escapes():
    _, _, s = parse('# TYPE x counter\nx{a="q\\"b\\\\c\\nd",b=""} 3\n')
    assert s == {("x", (("a", 'q"b\\c\nd'), ("b", ""))): 3}
    for bad in ("x 1\n",                               # no TYPE
                "# TYPE x counter\nx 1\n\n",           # blank line
                '# TYPE x counter\nx{a="\\t"} 1\n',     # unknown escape
                "# TYPE x counter\nx 1.5\n"):
        with pytest.raises(AssertionError):
            parse(bad)


# --------------------------------------------------------------- helpers

def scrape(inst, token=...):
    r = api(inst, "GET", METRICS, token=token)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == CONTENT_TYPE
    return parse(r.text)[2]


def value(samples, name, **labels):
    key = (name, tuple(labels.items()))
    return samples.get(key, 0)


def diff(before, after):
    """Series whose value changed, with the change."""
    keys = set(before) | set(after)
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys
            if after.get(k, 0) != before.get(k, 0)}


def series(name, **labels):
    return (name, tuple(labels.items()))


def add_message(pg, requiretls=False, sources=(), recipients=(),
                attempts=()):
    """One message with its recipients [(state, dsn_status)] and delivery
    attempts [(result, tls_rule, policy_type, policy_result_type)], as
    the receiving side and the delivery engine write them. Returns its id."""
    qid = secrets.token_hex(8).upper()
    CREATED.append(qid)
    conn = pg.connect()
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO messages (id, sender, size, body, requiretls,"
                " requiretls_sources, client_ip, helo, esmtp)"
                " VALUES (%s, 'm@metrics.example', 5, 'Hi.\r\n', %s, %s,"
                " '127.0.0.1', 'client.example', true)",
                (qid, requiretls, list(sources)))
            for n, (state, status) in enumerate(recipients):
                final = state in ("delivered", "bounced", "deleted")
                cur.execute(
                    "INSERT INTO recipients (message_id, address,"
                    " original_address, domain, local_domain, state,"
                    " next_attempt_at, final_at, dsn_status)"
                    " VALUES (%s, %s, %s, 'metrics.example', false, %s,"
                    " now() + interval '1 day',"
                    " CASE WHEN %s THEN now() END, %s)",
                    (qid, "r%d@metrics.example" % n,
                     "r%d@metrics.example" % n, state, final, status))
            for result, rule, ptype, presult in attempts:
                cur.execute(
                    "INSERT INTO delivery_attempts (message_id, recipients,"
                    " started_at, destination, tls_rule, result,"
                    " policy_type, policy_result_type, worker)"
                    " VALUES (%s, ARRAY['r0@metrics.example'], now(),"
                    " 'metrics.example', %s, %s, %s, %s, 'test_metrics')",
                    (qid, rule, result, ptype, presult))
    finally:
        conn.close()
    return qid


def remove(pg, *qids):
    sql(pg, "DELETE FROM messages WHERE id = ANY(%s)", list(qids))


@pytest.fixture(scope="module", autouse=True)
def leave_no_rows(pg):
    yield
    if not pg.is_running():
        pg.start()
    if CREATED:
        remove(pg, *CREATED)


@pytest.fixture
def inst(sg_module, pg):
    if not pg.is_running():
        pg.start()
    return sg_module


# ----------------------------------------------------------------- tests

def test_every_family_with_help_and_type(inst):
    r = api(inst, "GET", METRICS)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == CONTENT_TYPE
    assert r.headers.get("Cache-Control") == "no-store"
    types, helps, samples = parse(r.text)
    assert types == {name: t for name, (t, _) in FAMILIES.items()}
    assert set(helps) == set(FAMILIES)
    for name, (_, labels) in FAMILIES.items():
        for key in samples:
            if key[0] == name:
                assert tuple(l for l, _ in key[1]) == labels, key
    # fixed label values are always there, zero or not
    have = set(samples)
    for s in STATES:
        assert series("sg_queue_recipients", state=s) in have
    for x in RESULTS:
        assert series("sg_delivery_attempts_total", result=x) in have
    assert series("sg_requiretls_deliveries_total") in have
    for x in STATUSES:
        assert series("sg_requiretls_bounces_total", status=x) in have
    for x in SOURCES:
        assert series("sg_requiretls_messages_total", source=x) in have
    assert all(v >= 0 for v in samples.values())


def test_counts_follow_the_tables(inst, pg):
    before = scrape(inst)
    flagged = add_message(
        pg, requiretls=True, sources=["parameter", "rule:7"],
        recipients=[("bounced", "5.7.30"), ("bounced", "5.7.10"),
                    ("delivered", "2.0.0"), ("deferred", None),
                    ("queued", None)],
        attempts=[("delivered", 1, "sts", None),
                  ("bounced", 1, "sts", "validation-failure")])
    plain = add_message(
        pg, recipients=[("bounced", "5.7.30"), ("delivered", "2.0.0"),
                        ("bounced", "5.1.1")],
        attempts=[("delivered", 6, "no-policy-found", None),
                  ("next_mx", 7, "no-policy-found", None),
                  ("retry_clear", 6, "no-policy-found", None),
                  ("deferred", None, None, None)])
    # one address source among two counts once
    other = add_message(
        pg, requiretls=True,
        sources=["address:a+requiretls@x.example",
                 "address:b+requiretls@x.example"],
        recipients=[("deleted", "5.0.0"), ("delivering", None),
                    ("bounced", "5.7.10")],
        attempts=[("delivered", 1, "sts", None)])
    # the bounce of a flagged message, as sg queues it (RFC 8689, 5): not
    # flagged itself, sent with REQUIRETLS only if the next hop offers it
    dsn = add_message(pg, requiretls=False, sources=["dsn"])
    after = scrape(inst)

    assert diff(before, after) == {
        series("sg_queue_recipients", state="queued"): 1,
        series("sg_queue_recipients", state="delivering"): 1,
        series("sg_queue_recipients", state="deferred"): 1,
        series("sg_queue_recipients", state="delivered"): 2,
        series("sg_queue_recipients", state="bounced"): 5,
        series("sg_queue_recipients", state="deleted"): 1,
        series("sg_delivery_attempts_total", result="delivered"): 3,
        series("sg_delivery_attempts_total", result="bounced"): 1,
        series("sg_delivery_attempts_total", result="next_mx"): 1,
        series("sg_delivery_attempts_total", result="retry_clear"): 1,
        series("sg_delivery_attempts_total", result="deferred"): 1,
        # result delivered and decision rule 1 (REQUIRETLS)
        series("sg_requiretls_deliveries_total"): 2,
        # the plain message's 5.7.30 is not a REQUIRETLS bounce
        series("sg_requiretls_bounces_total", status="5.7.30"): 1,
        series("sg_requiretls_bounces_total", status="5.7.10"): 2,
        series("sg_requiretls_messages_total", source="parameter"): 1,
        series("sg_requiretls_messages_total", source="rule"): 1,
        series("sg_requiretls_messages_total", source="address"): 1,
        series("sg_requiretls_messages_total", source="dsn"): 1,
        # an attempt without a policy type (before sql/011) is left out
        series("sg_delivery_policy_total", policy_type="sts",
               result_type="none"): 2,
        series("sg_delivery_policy_total", policy_type="sts",
               result_type="validation-failure"): 1,
        series("sg_delivery_policy_total", policy_type="no-policy-found",
               result_type="none"): 3,
    }

    # a recipient changes state: the gauge follows, the counters stay
    sql(pg, "UPDATE recipients SET state = 'delivered', dsn_status = '2.0.0'"
            " WHERE message_id = %s AND state = 'queued'", flagged)
    moved = diff(after, scrape(inst))
    assert moved == {series("sg_queue_recipients", state="queued"): -1,
                     series("sg_queue_recipients", state="delivered"): 1}

    # rows removed from the queue are no longer counted
    remove(pg, flagged, plain, other, dsn)
    assert diff(before, scrape(inst)) == {}


def test_label_values_are_escaped(inst, pg):
    odd = 'sts-"quoted"\\back\nline'
    before = scrape(inst)
    add_message(pg, recipients=[("deferred", None)],
                attempts=[("deferred", 3, "sts", odd)])
    r = api(inst, "GET", METRICS)
    assert ('sg_delivery_policy_total{policy_type="sts",'
            'result_type="sts-\\"quoted\\"\\\\back\\nline"} 1\n') in r.text
    after = parse(r.text)[2]
    assert diff(before, after)[series("sg_delivery_policy_total",
                                      policy_type="sts",
                                      result_type=odd)] == 1


def test_read_only_token_may_read(inst, pg):
    token = create_token(pg.conninfo, "metrics-ro-%d" % time.monotonic_ns(),
                         "read-only")
    samples = scrape(inst, token=token)
    assert series("sg_requiretls_deliveries_total") in samples


def test_head(inst):
    r = api(inst, "HEAD", METRICS)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == CONTENT_TYPE
    assert r.content == b""


def test_needs_a_token(inst):
    r = api(inst, "GET", METRICS, token=None)
    problem(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    problem(api(inst, "GET", METRICS, token="not-a-token"), 401,
            "unauthorized")


def test_other_methods_and_paths(inst):
    problem(api(inst, "POST", METRICS, json={}), 405, "method-not-allowed")
    problem(api(inst, "GET", "/api/v1/metrics"), 404, "not-found")
    problem(api(inst, "GET", "/metrics/x"), 404, "not-found")


def test_plain_http_is_refused(inst):
    # sgadmin_require_https is on by default, as for the rest of the API
    r = requests.get(inst.http_url + METRICS, timeout=10,
                     headers={"Authorization": "Bearer " + inst.token})
    problem(r, 403, "https-required")


def test_statement_failure_is_503(sg_instance, pg):
    """The metrics statement itself fails (a table locked beyond
    sg_postgres_timeout, which is the statement_timeout): an RFC 9457 503,
    and the next scrape works again."""
    inst = sg_instance(extra_main="sg_postgres_timeout 1s;")
    assert api(inst, "GET", METRICS).status_code == 200
    conn = pg.connect()
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE delivery_attempts IN ACCESS EXCLUSIVE"
                        " MODE")
            r = api(inst, "GET", METRICS, timeout=20)
            body = problem(r, 503, "database-unavailable")
            assert "statement timeout" in body["detail"], body
    finally:
        conn.rollback()
        conn.close()
    assert api(inst, "GET", METRICS).status_code == 200


def test_postgres_down_is_503(sg_instance, pg):
    inst = sg_instance()
    assert api(inst, "GET", METRICS).status_code == 200
    pg.stop()
    try:
        r = poll(lambda: api(inst, "GET", METRICS),
                 lambda r: r.status_code == 503, WAIT)
        problem(r, 503, "database-unavailable")
    finally:
        pg.start()
    r = poll(lambda: api(inst, "GET", METRICS),
             lambda r: r.status_code == 200, WAIT)
    assert r.status_code == 200, r.text
    parse(r.text)
