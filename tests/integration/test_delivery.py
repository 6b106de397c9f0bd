"""Delivery (issue 4): sg relays queued mail to MX hosts, relay hosts and
internal servers, with the outbound TLS decision of DESIGN.md, retries,
bounces (RFC 3464 DSNs) and every attempt on record.

The world of this module: its own PostgreSQL and Redis (the session's
PostgreSQL holds other modules' test mail), a dnsmasq for the test zones,
an sg instance that delivers (sg_delivery_port 25: MX hosts are sinks on
127.0.0.x:25), scriptable sinks (peers.SmtpSink) and a Postfix MX.
Every test uses its own domains, so DNS answers cached by sg never mix.
"""

import contextlib
import email
import email.policy
import itertools
import os
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sgtest  # noqa: E402
from dnsserver import DnsServer  # noqa: E402
from peers import (PostfixMX, ReplySequence, SmtpSink,  # noqa: E402,F401
                   TestCA, mail_text, peer_ca, send_via_smtp, smtp_sinks, wait_for)
from sgtest import api, finish_sg, start_sg  # noqa: E402

DELIVERY_CONF = """
sg_delivery_hostname sg-out.test;
sg_delivery_poll 1s;
sg_delivery_retry_schedule 1s;
sg_delivery_lease 3s;
sg_delivery_idle_timeout 1s;
sg_delivery_connect_timeout 2s;
sg_delivery_command_timeout 5s;
sg_delivery_data_done_timeout 5s;
sg_mta_sts_txt_recheck 0;
"""

FINAL = ("delivered", "bounced", "deleted")
_seq = itertools.count(1)


class World:
    """pg, redis, dns, inst (sg), dsn_sink (MX of sender.test), records;
    conf: the delivery directives every sg of this world starts with."""

    def __init__(self, base, pg, redis, dns, ca, conf=DELIVERY_CONF):
        self.base, self.pg, self.redis, self.dns, self.ca = base, pg, redis, dns, ca
        self.conf = conf
        self.records = {"mx": [], "hosts": {}, "txt": [], "cname": []}
        self.inst = None
        self.dsn_sink = None

    def start(self, **kw):
        # debug logging exposes what info level hides (NGINX-NOTES)
        conf = dict(delivery=True, resolver=self.dns.address,
                    ca_file=self.ca.cert_file, extra_main=self.conf,
                    error_log_level="debug")
        conf.update(kw)
        return start_sg(self.pg, self.redis, **conf)

    @contextlib.contextmanager
    def instance(self, **kw):
        """Another sg (other directives) delivers instead of the module's
        one for the duration: two delivering instances on one queue would
        share the work."""
        finish_sg(self.inst)
        other = self.start(**kw)
        self.inst = other
        try:
            settings(other, starttls_outbound=False, tls_failure_fallback=True)
            r = api(other, "POST", "/api/v1/relay-networks",
                    json={"value": "127.0.0.0/8"})
            assert r.status_code in (201, 409), r.text
            yield other
        finally:
            try:
                finish_sg(other)
            finally:
                self.inst = self.start()

    def mx(self, domain, *hosts):
        """hosts: (name, address or [addresses], preference)."""
        for name, addrs, pref in hosts:
            self.records["mx"].append((domain, name, pref))
            if addrs is not None:
                self.records["hosts"][name] = (
                    [addrs] if isinstance(addrs, str) else list(addrs))
        self.dns.reload(self.records)

    def host(self, name, *addrs):
        self.records["hosts"][name] = list(addrs)
        self.dns.reload(self.records)

    def sink_mx(self, sink, domain=None, name=None):
        """A new domain whose only MX is sink; returns the domain."""
        domain = domain or unique("d")
        name = name or "mx." + domain
        self.mx(domain, (name, sink.host, 10))
        return domain


def unique(prefix):
    return "%s%d.test" % (prefix, next(_seq))


@contextlib.contextmanager
def world_up(ca, tmp_prefix, conf=DELIVERY_CONF):
    """A World whose sg starts with conf (the delivery directives), up for
    the duration: its own PostgreSQL, Redis and DNS, the DSN sink as MX of
    sender.test, and sg relaying for 127.0.0.0/8."""
    base = sgtest.make_tmp(tmp_prefix)
    pg = sgtest.start_postgres(base)
    redis = sgtest.start_redis(base)
    dns = DnsServer().start({})
    w = World(base, pg, redis, dns, ca, conf)
    w.dsn_sink = SmtpSink()
    w.mx("sender.test", ("mx.sender.test", w.dsn_sink.host, 10))
    w.inst = w.start()
    try:
        r = api(w.inst, "POST", "/api/v1/relay-networks",
                json={"value": "127.0.0.0/8", "comment": "delivery tests"})
        assert r.status_code == 201, r.text
        yield w
    finally:
        finish_sg(w.inst)
        w.dsn_sink.stop()
        dns.stop()
        redis.stop()
        pg.stop()
        sgtest.remove_tmp(base)


@pytest.fixture(scope="module")
def world(peer_ca):
    with world_up(peer_ca, "sgdlv-") as w:
        yield w


@pytest.fixture
def W(world):
    """The world with default settings and an empty DSN sink (hosts are
    new in every test: the TLS-failure list needs no reset)."""
    settings(world.inst, starttls_outbound=False, tls_failure_fallback=True)
    world.dsn_sink.clear()
    return world


def settings(inst, **kw):
    p = api(inst, "PATCH", "/api/v1/settings", json=kw)
    assert p.status_code == 200, p.text
    version = int(p.headers["ETag"].strip('"'))
    wait_for(lambda: api(inst, "GET", "/api/v1/health", token=None,
                         headers={"Connection": "close"})
             .json()["worker"]["settings_version"] >= version,
             timeout=10, message="settings version %d in the worker" % version)


def send(w, rcpts, sender="alice@sender.test", msg=None, **kw):
    if isinstance(rcpts, str):
        rcpts = [rcpts]
    msg = msg or mail_text(sender=sender, rcpts=rcpts, subject="delivery test")
    qid = send_via_smtp(w.inst.smtp_port, sender, rcpts, msg, **kw)
    assert qid and len(qid) == 16, qid
    return qid


def entry(w, qid):
    r = api(w.inst, "GET", "/api/v1/queue/" + qid)
    assert r.status_code == 200, r.text
    return r.json()


def wait_entry(w, qid, pred, timeout=30, what="queue entry"):
    box = {}

    def check():
        r = api(w.inst, "GET", "/api/v1/queue/" + qid)
        if r.status_code != 200:        # PostgreSQL restarting: 503
            return False
        box["e"] = r.json()
        return pred(box["e"])
    try:
        wait_for(check, timeout=timeout, message=what)
    except Exception:
        raise AssertionError("%s not reached; entry: %r" % (what, box.get("e")))
    return box["e"]


def wait_final(w, qid, timeout=30):
    return wait_entry(w, qid, lambda e: all(r["state"] in FINAL
                                            for r in e["recipients"]),
                      timeout, "every recipient final")


def states(e):
    return {r["address"]: r["state"] for r in e["recipients"]}


_LISTS_EVENT = re.compile(r" (\d+)#\d+: (?:\*\d+ )?sg: lists"
                          r" (query sent|reloaded)")


@contextlib.contextmanager
def list_change(inst, timeout=10):
    """Every worker of inst has loaded its lists again after the change made
    in the block. Until then a worker may route, or decide TLS for, a
    message by the lists it had before. A load already under way when the
    block committed may have read the lists before the change, so the
    test NOTIFYs sg_lists once more after the block and waits, in each
    worker, for a query sent after that and its "lists reloaded" (a
    worker with a load under way sends another when it ends)."""
    yield
    mark = inst.log_mark()
    conn = inst.pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("NOTIFY sg_lists, 'test'")
    finally:
        conn.close()

    def reloaded_since_mark():
        sent, done = set(), set()
        for m in _LISTS_EVENT.finditer(inst.log_since(mark)):
            if m.group(2) == "query sent":
                sent.add(m.group(1))
            elif m.group(1) in sent:
                done.add(m.group(1))
        return len(done) >= inst.workers
    wait_for(reloaded_since_mark, timeout=timeout,
             message=lambda: "every worker (%d) loads its lists:\n%s"
             % (inst.workers, inst.log_since(mark)[-3000:]))


def dsns_for(w, qid, n=1, timeout=30):
    """The DSNs the sender's MX received for message qid."""
    def found():
        return [t for t in w.dsn_sink.messages
                if qid in t.data.decode("utf-8", "replace")]
    wait_for(lambda: len(found()) >= n, timeout=timeout,
             message="%d DSN(s) for %s" % (n, qid))
    return found()


def dsn_parts(txn):
    """(message, [per-recipient dicts]) of a DSN, parsed by Python's email
    package (RFC 3464, 2.1: multipart/report, report-type=delivery-status)."""
    msg = email.message_from_bytes(txn.data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    return msg, [dict(b.items()) for b in blocks[1:]], parts


# ----------------------------------------------------------------- basics

def test_plain_delivery_to_the_mx_with_the_attempt_recorded(W):
    """RFC 5321, 5.1: the MX host gets the mail; the setting "send with
    STARTTLS whenever possible" is off, so the session stays in clear
    (decision row 7), and the queue entry shows the attempt."""
    sink = SmtpSink(tls=W.ca.issue(["mx.plain.test"]))
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "bob@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"bob@" + dom: "delivered"}
        assert sink.wait_messages(1)
        t = sink.messages[0]
        assert t.mail_from == "alice@sender.test"
        assert [r.address for r in t.rcpts] == ["bob@" + dom]
        assert b"delivery test" in t.data
        assert not any(s.tls for s in sink.sessions)
        assert "STARTTLS" not in [c.verb for s in sink.sessions
                                  for c in s.commands]
        a = e["attempts"][-1]
        assert a["result"] == "delivered"
        assert a["mx_host"] == "mx." + dom
        assert a["ip"] == sink.host and a["port"] == 25
        assert a["tls_level"] == "none" and a["tls_rule"] == 7
        assert a["starttls"] is False
        assert a["reply"].startswith("250")
        assert e["recipients"][0]["last_reply"].startswith("250")
    finally:
        sink.stop()


def test_swaks_to_postfix_mx_over_starttls(W):
    """The issue's "done when": swaks -> sg -> Postfix MX over STARTTLS;
    the queue entry shows the attempt with its TLS facts."""
    dom = unique("pf")
    cert = W.ca.issue(["mx." + dom])
    with PostfixMX(domains=[dom], tls=cert, hostname="mx." + dom) as pf:
        W.mx(dom, ("mx." + dom, pf.host, 10))
        settings(W.inst, starttls_outbound=True)
        import subprocess
        out = subprocess.run(
            ["swaks", "--server", "127.0.0.1:%d" % W.inst.smtp_port,
             "--from", "alice@sender.test", "--to", "carol@" + dom,
             "--header", "Subject: via swaks"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        qid = [l for l in out.stdout.splitlines() if "queued as" in l][0] \
            .rsplit(" ", 1)[-1]
        e = wait_final(W, qid)
        assert states(e) == {"carol@" + dom: "delivered"}
        assert pf.wait_messages(1)
        assert pf.messages()[0].message["Subject"] == "via swaks"
        pf.wait_log(r"TLS connection established from")
        a = e["attempts"][-1]
        assert a["tls_level"] == "may" and a["tls_rule"] == 6
        assert a["starttls"] is True
        assert a["tls_protocol"] in ("TLSv1.2", "TLSv1.3")
        assert a["tls_cipher"]
        assert a["tls_verify"] == "ok" and a["tls_host_match"] is True
        assert a["tls_result_type"] is None


def test_mx_preference_and_every_address_tried(W):
    """RFC 5321, 5.1: MX hosts in preference order; a host that refuses
    the connection is skipped (next_mx) and the next one delivers."""
    good = SmtpSink()
    try:
        dom = unique("pref")
        # 127.0.0.254:25 has no listener: connection refused
        W.mx(dom, ("mx1." + dom, "127.0.0.254", 10),
             ("mx2." + dom, good.host, 20))
        qid = send(W, "dan@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"dan@" + dom: "delivered"}
        results = [(a["mx_host"], a["result"]) for a in e["attempts"]]
        assert results == [("mx1." + dom, "next_mx"),
                           ("mx2." + dom, "delivered")]
    finally:
        good.stop()


def test_equal_preferences_are_tried_in_random_order(W):
    """RFC 5321, 5.1: MX hosts of equal preference are tried in random
    order ("the sender-SMTP MUST randomize them").  20 domains, each with
    the same two MX hosts at preference 10, always listed in the same
    order (dnsmasq answers them as configured); one message per domain.
    A sender that kept the DNS order would give every message to the
    first host: both must get some (the chance that a fair choice picks
    one host 20 times is 2 in a million).  Each domain is its own
    destination, so each message comes from a lookup of its own."""
    first, second = SmtpSink(), SmtpSink()
    try:
        doms = [unique("eq") for _ in range(20)]
        for dom in doms:
            W.records["mx"].append((dom, "mx-a." + dom, 10))
            W.records["mx"].append((dom, "mx-b." + dom, 10))
            W.records["hosts"]["mx-a." + dom] = [first.host]
            W.records["hosts"]["mx-b." + dom] = [second.host]
        W.dns.reload(W.records)
        ids = [send(W, "eve@" + dom) for dom in doms]
        used = {}
        for qid, dom in zip(ids, doms):
            e = wait_final(W, qid)
            assert states(e) == {"eve@" + dom: "delivered"}
            # the first host tried delivered: no next_mx attempt before it
            assert [a["result"] for a in e["attempts"]] == ["delivered"]
            used[dom] = e["attempts"][0]["mx_host"]
        assert set(used.values()) <= {"mx-a." + d for d in doms} \
            | {"mx-b." + d for d in doms}
        a_count = sum(1 for d in doms if used[d] == "mx-a." + d)
        assert 0 < a_count < len(doms), used
        # on the wire: each sink got the messages of the domains it won
        assert len(first.messages) == a_count
        assert len(second.messages) == len(doms) - a_count
    finally:
        first.stop()
        second.stop()


def test_implicit_mx_when_the_domain_has_only_an_address(W):
    """RFC 5321, 5.1: no MX records -> the domain's own A record."""
    sink = SmtpSink()
    try:
        dom = unique("impl")
        W.host(dom, sink.host)
        qid = send(W, "erin@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"erin@" + dom: "delivered"}
        assert e["attempts"][-1]["mx_host"] == dom
    finally:
        sink.stop()


def test_null_mx_bounces_with_5_1_10_and_a_dsn(W):
    """RFC 7505, 3: a null MX means no mail: the recipient bounces with
    5.1.10 at once, and the sender gets a DSN (RFC 3464)."""
    dom = unique("null")
    W.mx(dom, (".", None, 0))
    qid = send(W, "fay@" + dom)
    e = wait_final(W, qid)
    assert states(e) == {"fay@" + dom: "bounced"}
    assert "5.1.10" in (e["recipients"][0]["dsn_status"] or "")
    (txn,) = dsns_for(W, qid)
    assert txn.mail_from == ""                  # RFC 3461, 6.1: MAIL FROM:<>
    assert [r.address for r in txn.rcpts] == ["alice@sender.test"]
    msg, rcpts, _ = dsn_parts(txn)
    assert rcpts[0]["Action"] == "failed"
    assert rcpts[0]["Status"] == "5.1.10"
    assert rcpts[0]["Final-Recipient"] == "rfc822; fay@" + dom


def test_nxdomain_bounces(W):
    """A recipient domain that does not exist bounces (5.1.2)."""
    dom = unique("nx")
    W.host("other." + dom, "127.0.0.9")        # the zone exists
    qid = send(W, "gus@" + dom)
    e = wait_final(W, qid)
    assert states(e) == {"gus@" + dom: "bounced"}
    assert e["recipients"][0]["dsn_status"] == "5.1.2"


def test_dns_failure_defers(W):
    """SERVFAIL (a zone the DNS server refuses) defers, never bounces."""
    qid = send(W, "hal@unknown-zone.example")
    e = wait_entry(W, qid, lambda e: e["recipients"][0]["state"] == "deferred"
                   and e["recipients"][0]["attempts"] >= 1)
    assert e["recipients"][0]["last_reply"]
    api(W.inst, "DELETE", "/api/v1/queue/" + qid)


# ------------------------------------------------------ per-recipient results

def test_per_recipient_results_and_one_dsn_per_message(W):
    """RFC 5321, 4.2: 2xx delivered, 5xx bounced, 4xx deferred and retried;
    one DSN for the message with a block for each failed recipient, once
    nothing is pending (RFC 3464, 2.3)."""
    sink = SmtpSink()
    try:
        dom = W.sink_mx(sink)
        ok, no, full, later = ("ok@" + dom, "no@" + dom, "full@" + dom,
                               "later@" + dom)
        sink.rcpt_replies = {no: "550 5.1.1 no such user",
                             full: "553 5.1.3 bad destination mailbox address",
                             later: ReplySequence("451 4.2.1 try later",
                                                  "250 2.1.5 Ok")}
        qid = send(W, [ok, no, full, later])
        e = wait_final(W, qid)
        assert states(e) == {ok: "delivered", no: "bounced", full: "bounced",
                             later: "delivered"}
        by = {r["address"]: r for r in e["recipients"]}
        assert by[later]["attempts"] == 2
        assert by[no]["last_reply"].startswith("550 5.1.1")
        (txn,) = dsns_for(W, qid)
        _, rcpts, parts = dsn_parts(txn)
        assert sorted(r["Final-Recipient"] for r in rcpts) == \
            ["rfc822; " + full, "rfc822; " + no]
        rcpts = {r["Final-Recipient"]: r for r in rcpts}
        assert rcpts["rfc822; " + full]["Status"] == "5.1.3"
        assert "553 5.1.3 bad destination mailbox address" in \
            rcpts["rfc822; " + full]["Diagnostic-Code"]
        rcpts = [rcpts["rfc822; " + no]]
        assert rcpts[0]["Status"] == "5.1.1"
        assert rcpts[0]["Remote-MTA"] == "dns; mx." + dom
        assert "550 5.1.1 no such user" in rcpts[0]["Diagnostic-Code"]
        # the original message comes back (no RET given: full)
        assert parts[2].get_content_type() == "message/rfc822"
        time.sleep(2)                   # a second DSN would come by now
        assert len(dsns_for(W, qid)) == 1
    finally:
        sink.stop()


def test_mail_from_refused_bounces_everyone_and_4xx_data_defers(W):
    sink = SmtpSink(mail_reply="550 5.7.1 sender refused")
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "ivy@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"ivy@" + dom: "bounced"}
        sink.mail_reply = None
        sink.final_reply = ReplySequence("452 4.3.1 full", "250 2.0.0 Ok")
        qid = send(W, "jon@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"jon@" + dom: "delivered"}
        assert [a["result"] for a in e["attempts"]] == ["deferred",
                                                        "delivered"]
    finally:
        sink.stop()


def test_connection_dropped_mid_data_is_retried(W):
    sink = SmtpSink(drop_in_data=True)
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "kim@" + dom)
        wait_entry(W, qid, lambda e: len(e["attempts"]) >= 1)
        sink.drop_in_data = False
        e = wait_final(W, qid)
        assert states(e) == {"kim@" + dom: "delivered"}
        assert e["attempts"][0]["result"] == "deferred"
        assert len(sink.messages) == 1
    finally:
        sink.stop()


def test_sigterm_hands_back_at_once_what_was_not_sent(W):
    """Issue 4, item 9: nginx stopped fast (SIGTERM) while one transaction
    waits for its RCPT reply and another for the reply to its final ".":
    the first recipient goes back to the queue at once (not when its
    5-minute lease runs out); the second stays claimed, since the remote
    may have accepted it (docs/design.md, "Delivered twice"). After the
    restart the first is delivered."""
    import threading
    held = threading.Event()

    def hold(session, obj):
        held.set()
        time.sleep(30)

    waiting, sent = SmtpSink(rcpt_reply=hold), SmtpSink(final_reply=hold)
    try:
        with W.instance(extra_main=W.conf.replace(
                "sg_delivery_lease 3s;", "sg_delivery_lease 5m;")) as inst:
            d1, d2 = W.sink_mx(waiting), W.sink_mx(sent)
            q1 = send(W, "ada@" + d1)
            q2 = send(W, "bob@" + d2)
            wait_for(lambda: waiting.transactions and sent.transactions
                     and sent.transactions[0].complete, timeout=20,
                     message="one transaction at RCPT, one after the dot")
            os.kill(inst.nginx.pid, signal.SIGTERM)
            inst.nginx.proc.wait(30)
            conn = W.pg.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT message_id, state, claimed_by"
                                " FROM recipients WHERE message_id"
                                " IN (%s, %s)", (q1, q2))
                    got = {r[0]: (r[1], r[2] is None)
                           for r in cur.fetchall()}
            finally:
                conn.close()
            assert got[q1] == ("deferred", True), got
            assert got[q2] == ("delivering", False), got
            with open(inst.error_log, errors="replace") as f:
                assert "1 of 1 recipients not sent went back to the" \
                    " queue" in f.read()
            waiting.rcpt_reply = None
            inst.start()
            e = wait_final(W, q1)
            assert states(e) == {"ada@" + d1: "delivered"}
            api(W.inst, "DELETE", "/api/v1/queue/" + q2)
    finally:
        waiting.stop()
        sent.stop()


def test_one_transaction_per_message_and_connection_reuse(W):
    """Recipients of one message and destination share one transaction;
    the next message to the destination reuses the connection.  (The
    idle timeout is 10 s here: between q1's reply and q2's claim come
    the results statement, the test's polling, a submission and the
    NOTIFY, which on a loaded machine can outlast DELIVERY_CONF's 1 s.)"""
    sink = SmtpSink()
    conf = W.conf.replace("sg_delivery_idle_timeout 1s;",
                          "sg_delivery_idle_timeout 10s;")
    assert conf != W.conf
    try:
        with W.instance(extra_main=conf):
            dom = W.sink_mx(sink)
            q1 = send(W, ["a@" + dom, "b@" + dom, "c@" + dom])
            wait_final(W, q1)
            q2 = send(W, "d@" + dom)
            wait_final(W, q2)
            assert len(sink.messages) == 2
            assert sorted(r.address for r in sink.messages[0].rcpts) == \
                ["a@" + dom, "b@" + dom, "c@" + dom]
            assert sink.messages[0].session is sink.messages[1].session
            # RFC 5321, 4.1.1.10: the idle connection ends with QUIT
            # (after sg_delivery_idle_timeout, 10 s here)
            sink.wait_sessions(1, timeout=40, closed=True)
            assert len(sink.sessions) == 1, sink.dump()
            s = sink.sessions[0]
            assert s.commands[-1].verb == "QUIT" and s.end == "quit", \
                sink.dump()
    finally:
        sink.stop()


def test_esmtp_parameters_pipelining_and_dot_stuffing(W):
    """RFC 1870, 6152, 3461 parameters are passed on when the next hop
    offers them; RFC 2920 pipelining; RFC 5321, 4.5.2 dot-stuffing on the
    wire, CRLF line ends only."""
    sink = SmtpSink()
    try:
        dom = W.sink_mx(sink)
        body = ("Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n"
                "caf\xc3\xa9\r\n.\r\nend\r\n")
        qid = send(W, "lee@" + dom, msg=body.encode("latin-1"),
                   mail_options=("BODY=8BITMIME", "RET=HDRS",
                                 "ENVID=env+2Bid"),
                   rcpt_options=("NOTIFY=FAILURE,DELAY",
                                 "ORCPT=rfc822;lee@" + dom))
        e = wait_final(W, qid)
        assert states(e) == {"lee@" + dom: "delivered"}, e
        t = sink.messages[0]
        assert t.mail_params.get("BODY") == "8BITMIME"
        assert t.mail_params.get("RET") == "HDRS"
        assert t.mail_params.get("ENVID") == "env+2Bid"
        assert int(t.mail_params["SIZE"]) > 0
        assert t.rcpts[0].params.get("NOTIFY") == "FAILURE,DELAY"
        assert t.rcpts[0].params.get("ORCPT") == "rfc822;lee@" + dom
        assert b"\r\n.leading dot\r\n..two dots\r\n" in t.data
        assert b"\r\n.\r\nend\r\n" in t.data
        assert not t.bare_lf
        assert ".leading dot" not in t.data_raw.decode("latin-1").replace(
            "..leading dot", "")
        session = t.session
        assert any(c.pipelined for c in session.commands
                   if c.verb == "RCPT")
    finally:
        sink.stop()


def test_helo_fallback_and_no_dsn_parameters_without_the_extension(W):
    sink = SmtpSink(helo_only=True)
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "max@" + dom, rcpt_options=("NOTIFY=FAILURE",))
        e = wait_final(W, qid)
        assert states(e) == {"max@" + dom: "delivered"}
        t = sink.messages[0]
        assert t.session.helo_verb == "HELO"
        assert t.rcpts[0].params == {} and "SIZE" not in t.mail_params
    finally:
        sink.stop()


# ------------------------------------------------------ routes and locals

def test_route_sends_through_a_relay_host(W):
    """Routes (/api/v1/routes): a domain's mail goes to a relay host
    instead of its MX, as Postfix's transport_maps do."""
    relay = SmtpSink(port=2526)
    try:
        dom = unique("routed")             # no DNS records at all
        r = api(W.inst, "POST", "/api/v1/routes",
                json={"domain": dom, "relay": "%s:2526" % relay.host})
        assert r.status_code == 201, r.text
        qid = send(W, "ned@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"ned@" + dom: "delivered"}
        assert e["attempts"][-1]["destination"] == "route:%s:2526" % relay.host
        assert relay.messages[0].rcpts[0].address == "ned@" + dom
        api(W.inst, "DELETE", "/api/v1/routes/%s" % r.json()["id"])
    finally:
        relay.stop()


def test_local_domain_goes_to_its_internal_server(W):
    internal = SmtpSink(port=2527)
    try:
        dom = unique("local")
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/domains",
                    json={"name": dom,
                          "internal_server": "%s:2527" % internal.host})
            assert r.status_code == 201, r.text
        qid = send(W, "ola@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"ola@" + dom: "delivered"}
        assert e["attempts"][-1]["destination"] == "local:%s:2527" % internal.host
        api(W.inst, "DELETE", "/api/v1/domains/%s" % r.json()["id"])
    finally:
        internal.stop()


# ------------------------------------------------------ TLS decision rows

def test_starttls_whenever_possible_with_any_certificate(W):
    """Row 6: STARTTLS when offered; an untrusted, expired or mismatched
    certificate does not stop delivery, and the attempt classifies it
    with RFC 8460's result types (4.3)."""
    settings(W.inst, starttls_outbound=True)
    cases = [
        (W.ca.untrusted.issue(["mx.u.test"]), "certificate-not-trusted"),
        (W.ca.issue(["mx.e.test"], expired=True), "certificate-expired"),
        (W.ca.issue(["some-other-name.test"]), "certificate-host-mismatch"),
    ]
    for cert, result_type in cases:
        sink = SmtpSink(tls=cert)
        try:
            dom = W.sink_mx(sink)
            qid = send(W, "pat@" + dom)
            e = wait_final(W, qid)
            assert states(e) == {"pat@" + dom: "delivered"}, result_type
            a = e["attempts"][-1]
            assert a["starttls"] is True and a["tls_level"] == "may"
            assert a["tls_result_type"] == result_type
            assert sink.messages[0].tls
            # RFC 6066, 3: SNI names the MX host
            assert sink.messages[0].session.sni == "mx." + dom
        finally:
            sink.stop()


# the system's files, as sg without sg_resolver and sg_trusted_ca reads them
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"   # OpenSSL's cert.pem
SYSTEM_RESOLV_CONF = "/etc/resolv.conf"
SYSTEM_ROOT_KEY = "/usr/share/dns/root.key"             # Debian's dns-root-data
SYSTEM_DNS_HOST = "127.0.0.153"                        # port 53: resolv.conf


def test_system_resolver_and_ca_store_without_directives(W):
    """Issue 4, items 2 and 5: with neither sg_resolver nor sg_trusted_ca,
    sg resolves through the servers of the system's resolv.conf and
    verifies MX certificates against the system CA store.  sg runs in a
    private mount namespace whose /etc/resolv.conf names a dnsmasq on
    127.0.0.153:53, whose CA bundle is the real one plus a CA of this test,
    and whose Debian root key is replaced by an anchor for an unrelated
    zone (the real root key would make every answer of a server without
    DNSSEC bogus; with the stand-in, validation is on and the test zone is
    insecure).  Two MX hosts: one with a certificate from the system-store
    CA (verified), one from the CA the module's sg trusts only through
    sg_trusted_ca, which this sg lacks (certificate-not-trusted, RFC 8460,
    4.3; delivered anyway under "STARTTLS whenever possible")."""
    tmp = sgtest.make_tmp("sgsysfiles-")
    sys_ca = TestCA(os.path.join(tmp, "sys-ca"),
                    name="sg Delivery System Store Only CA")
    sink_sys = sink_peer = sysdns = None
    try:
        with open(SYSTEM_BUNDLE, "rb") as f:
            real = f.read()
        assert sys_ca.cert_pem not in real and W.ca.cert_pem not in real
        files = {
            SYSTEM_BUNDLE: real + b"\n" + sys_ca.cert_pem,
            SYSTEM_RESOLV_CONF: b"nameserver %s\n" % SYSTEM_DNS_HOST.encode(),
            SYSTEM_ROOT_KEY: b"anchor.sg-unrelated-zone. IN DS 12345 13 2 "
                             + b"00" * 32 + b"\n",
        }
        mounts = {}
        for target, content in files.items():
            source = os.path.join(tmp, os.path.basename(target))
            with open(source, "wb") as f:
                f.write(content)
            os.chmod(source, 0o644)
            mounts[target] = source

        # not under "test.": without sg_resolver libunbound keeps RFC 6761's
        # special names to itself
        d_sys, d_peer = "a.sysfiles.sgtest", "b.sysfiles.sgtest"
        sink_sys = SmtpSink(tls=sys_ca.issue(["mx." + d_sys]))
        sink_peer = SmtpSink(tls=W.ca.issue(["mx." + d_peer]))
        sysdns = DnsServer(host=SYSTEM_DNS_HOST, port=53).start({
            "mx": [(d_sys, "mx." + d_sys, 10), (d_peer, "mx." + d_peer, 10)],
            "hosts": {"mx." + d_sys: [sink_sys.host],
                      "mx." + d_peer: [sink_peer.host]},
        })
        with W.instance(resolver=None, ca_file=None,
                        wrap=sgtest.with_bind_mounts(mounts)) as inst:
            with open(inst.conf) as f:
                conf = f.read()
            assert "\nsg_resolver" not in conf
            assert "\nsg_trusted_ca" not in conf
            settings(inst, starttls_outbound=True)
            r = api(inst, "GET", "/api/v1/delivery/resolve/" + d_sys)
            assert r.status_code == 200, r.text
            assert r.json()["dnssec_validation"] is True      # root.key read
            assert r.json()["status"] == "ok", r.json()

            q_sys, q_peer = send(W, "pat@" + d_sys), send(W, "pat@" + d_peer)
            e_sys, e_peer = wait_final(W, q_sys), wait_final(W, q_peer)
        assert states(e_sys) == {"pat@" + d_sys: "delivered"}
        assert states(e_peer) == {"pat@" + d_peer: "delivered"}
        a = e_sys["attempts"][-1]
        assert a["mx_host"] == "mx." + d_sys and a["starttls"] is True
        assert a["tls_verify"] == "ok" and a["tls_host_match"] is True
        assert a["tls_result_type"] is None
        a = e_peer["attempts"][-1]
        assert a["mx_host"] == "mx." + d_peer and a["starttls"] is True
        assert a["tls_result_type"] == "certificate-not-trusted"
        assert sink_sys.messages[0].tls and sink_peer.messages[0].tls
        # the names were asked of the resolv.conf server, not the module's
        asked = {n for _, n in sysdns.queries()}
        assert {d_sys, d_peer, "mx." + d_sys} <= asked, asked
        assert not [n for _, n in W.dns.queries() if "sysfiles" in n]
    finally:
        for s in (sink_sys, sink_peer, sysdns):
            if s:
                s.stop()
        sys_ca.cleanup()
        sgtest.remove_tmp(tmp)


def test_starttls_not_offered_sends_in_clear_when_possible_only(W):
    settings(W.inst, starttls_outbound=True)
    sink = SmtpSink()
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "quinn@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"quinn@" + dom: "delivered"}
        assert e["attempts"][-1]["starttls"] is False
    finally:
        sink.stop()


def test_required_list_defers_without_starttls_and_sends_nothing_in_clear(W):
    """Row 4: a host on the STARTTLS required list gets mail only over
    TLS; without STARTTLS the recipient is deferred with a clear reason
    and no envelope crosses the wire in clear."""
    sink = SmtpSink()
    try:
        dom = W.sink_mx(sink)
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/starttls/required",
                    json={"value": "mx." + dom})
            assert r.status_code == 201, r.text
        qid = send(W, "rex@" + dom)
        e = wait_entry(W, qid, lambda e: len(e["attempts"]) >= 1)
        a = e["attempts"][0]
        assert a["tls_level"] == "encrypt" and a["tls_rule"] == 4
        assert a["result"] in ("next_mx", "deferred")
        assert "STARTTLS" in a["reply"]
        assert e["recipients"][0]["state"] in ("deferred", "delivering")
        for s in sink.sessions:
            assert b"MAIL FROM" not in s.raw_clear
            assert b"RCPT TO" not in s.raw_clear
        # STARTTLS offered now: delivered over TLS, any certificate
        sink.stop()
        sink = SmtpSink(host=sink.host, tls=W.ca.untrusted.issue(["x.test"]))
        e = wait_final(W, qid)
        assert states(e) == {"rex@" + dom: "delivered"}
        assert e["attempts"][-1]["starttls"] is True
        assert e["attempts"][-1]["tls_level"] == "encrypt"
        assert all(b"MAIL FROM" not in s.raw_clear for s in sink.sessions)
        api(W.inst, "DELETE", "/api/v1/starttls/required/%s" % r.json()["id"])
    finally:
        sink.stop()


def test_required_list_by_ip_and_failed_handshake_defers(W):
    sink = SmtpSink(tls_fail=True)
    try:
        dom = W.sink_mx(sink)
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/starttls/required",
                    json={"value": sink.host})
            assert r.status_code == 201, r.text
        qid = send(W, "sam@" + dom)
        e = wait_entry(W, qid, lambda e: len(e["attempts"]) >= 1
                       and e["recipients"][0]["state"] == "deferred")
        a = e["attempts"][0]
        assert a["tls_rule"] == 4
        assert a["result"] in ("next_mx", "deferred"), a
        # a clear reason: the required list, and what failed
        assert a["tls_reason"] == \
            "STARTTLS required list: STARTTLS must succeed", a
        rcpt = e["recipients"][0]
        assert "TLS handshake" in rcpt["last_reply"], rcpt
        assert rcpt["dsn_status"].startswith("4."), rcpt
        assert not sink.messages
        assert all(b"MAIL FROM" not in s.raw_clear for s in sink.sessions)
        api(W.inst, "DELETE", "/api/v1/starttls/required/%s" % r.json()["id"])
        api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        sink.stop()


def test_whitelisted_host_never_gets_starttls(W):
    """Row 5: the STARTTLS whitelist: never STARTTLS, even when offered
    and the setting says whenever possible."""
    settings(W.inst, starttls_outbound=True)
    sink = SmtpSink(tls=W.ca.issue(["mx.wl.test"]))
    try:
        dom = W.sink_mx(sink)
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/starttls/whitelist",
                    json={"value": dom})
            assert r.status_code == 201, r.text
        qid = send(W, "tia@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"tia@" + dom: "delivered"}
        a = e["attempts"][-1]
        assert a["tls_level"] == "none" and a["tls_rule"] == 5
        assert "STARTTLS" not in [c.verb for s in sink.sessions
                                  for c in s.commands]
        api(W.inst, "DELETE", "/api/v1/starttls/whitelist/%s" % r.json()["id"])
    finally:
        sink.stop()


def test_handshake_failure_retries_in_clear_and_lists_the_host(W):
    """Row 6 with "SSL negotiation failures will retry without SSL for up
    to one hour": the failed handshake lists the host (Redis, until the
    next full hour), the delivery is retried at once in clear, and later
    deliveries within the hour skip STARTTLS. DELETE takes it off."""
    settings(W.inst, starttls_outbound=True, tls_failure_fallback=True)
    sink = SmtpSink(tls_fail=True)
    try:
        dom = W.sink_mx(sink)
        before = time.time()
        qid = send(W, "uma@" + dom)
        e = wait_final(W, qid)
        after = time.time()
        assert states(e) == {"uma@" + dom: "delivered"}
        assert [a["result"] for a in e["attempts"]] == ["retry_clear",
                                                        "delivered"]
        assert e["attempts"][1]["starttls"] is False
        assert e["attempts"][1]["tls_rule"] == 6
        fl = api(W.inst, "GET", "/api/v1/tls-failures").json()["items"]
        item = [i for i in fl if i["host"] == "mx." + dom][0]
        assert item["ip"] == sink.host
        # the next full hour after the failure (the failure happened
        # between before and after: either hour if they straddle one)
        ends = {(int(t) // 3600 + 1) * 3600 for t in (before, after)}
        assert item["expires_at"] in {
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(x))
            for x in ends}, (item, ends)
        # the Redis key expires then too (SET ... EXAT, redis/README.md)
        ttl = W.redis.client().ttl("sg:tls-failure:mx." + dom)
        assert any(abs(time.time() + ttl - x) <= 2 for x in ends), ttl
        n_sessions = len(sink.sessions)
        qid2 = send(W, "vic@" + dom)
        e2 = wait_final(W, qid2)
        assert [a["result"] for a in e2["attempts"]] == ["delivered"]
        assert "STARTTLS" not in [c.verb for s in sink.sessions[n_sessions:]
                                  for c in s.commands]
        assert "on the TLS-failure list" in e2["attempts"][0]["tls_reason"] \
            or "within the hour" in e2["attempts"][0]["tls_reason"]
        d = api(W.inst, "DELETE", "/api/v1/tls-failures/mx." + dom)
        assert d.status_code == 204
        n_sessions = len(sink.sessions)
        qid3 = send(W, "wes@" + dom)
        e3 = wait_final(W, qid3)
        assert e3["attempts"][0]["result"] == "retry_clear"
        assert "STARTTLS" in [c.verb for s in sink.sessions[n_sessions:]
                              for c in s.commands]
    finally:
        sink.stop()


def test_handshake_failure_without_fallback_defers(W):
    settings(W.inst, starttls_outbound=True, tls_failure_fallback=False)
    sink = SmtpSink(tls_fail=True)
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "xia@" + dom)
        e = wait_entry(W, qid, lambda e: len(e["attempts"]) >= 1)
        assert e["attempts"][0]["result"] in ("next_mx", "deferred")
        assert e["recipients"][0]["state"] != "delivered"
        assert not sink.messages
        api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        sink.stop()


def test_failure_list_expires_at_the_period_boundary(W):
    """The list is reset at every full period (an hour by default;
    sg_delivery_tls_failure_period makes the boundary testable): after
    it, STARTTLS is tried again."""
    with W.instance(extra_main=DELIVERY_CONF
                    + "sg_delivery_tls_failure_period 3s;\n") as inst:
        settings(inst, starttls_outbound=True, tls_failure_fallback=True)
        sink = SmtpSink(tls_fail=True)
        try:
            dom = W.sink_mx(sink)
            qid = send(W, "yan@" + dom)
            e = wait_final(W, qid)
            assert e["attempts"][0]["result"] == "retry_clear"
            wait_for(lambda: not [i for i in api(inst, "GET",
                                                 "/api/v1/tls-failures")
                                  .json()["items"]
                                  if i["host"] == "mx." + dom],
                     timeout=10, message="the key expires")
            time.sleep(0.2)
            n = len(sink.sessions)
            qid = send(W, "zed@" + dom)
            e = wait_final(W, qid)
            assert e["attempts"][0]["result"] == "retry_clear"
            assert "STARTTLS" in [c.verb for s in sink.sessions[n:]
                                  for c in s.commands]
        finally:
            sink.stop()


def test_failure_list_in_worker_memory_while_redis_is_down(W):
    settings(W.inst, starttls_outbound=True, tls_failure_fallback=True)
    sink = SmtpSink(tls_fail=True)
    W.redis.stop()
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "abe@" + dom)
        e = wait_final(W, qid)
        assert e["attempts"][0]["result"] == "retry_clear"
        n = len(sink.sessions)
        qid = send(W, "bea@" + dom)
        e = wait_final(W, qid)
        assert [a["result"] for a in e["attempts"]] == ["delivered"]
        assert "STARTTLS" not in [c.verb for s in sink.sessions[n:]
                                  for c in s.commands]
        with open(W.inst.error_log, errors="replace") as f:
            assert "in this worker's memory" in f.read()
        r = api(W.inst, "GET", "/api/v1/tls-failures")
        assert r.status_code == 503
    finally:
        W.redis.start()
        sink.stop()


# ------------------------------------------------------ retries and DSNs

def test_queue_lifetime_bounces_with_4_4_7(W):
    sink = SmtpSink(rcpt_reply="451 4.2.0 busy")
    with W.instance(extra_main=DELIVERY_CONF
                    + "sg_delivery_max_lifetime 3s;\n"):
        dom = W.sink_mx(sink)
        qid = send(W, "cy@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"cy@" + dom: "bounced"}
        assert e["recipients"][0]["dsn_status"] == "4.4.7"
        assert len(e["attempts"]) >= 2
        (txn,) = dsns_for(W, qid)
        _, rcpts, _ = dsn_parts(txn)
        assert rcpts[0]["Status"] == "4.4.7"
        assert rcpts[0]["Action"] == "failed"
    sink.stop()


def test_dsn_options_ret_envid_orcpt_and_notify_never(W):
    """RFC 3461: RET=HDRS returns headers only, ENVID and ORCPT come back
    in the DSN; NOTIFY=NEVER gets no DSN; a null sender never does."""
    sink = SmtpSink(rcpt_reply="550 5.1.1 unknown")
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "dee@" + dom, mail_options=("RET=HDRS", "ENVID=abc123"),
                   rcpt_options=("ORCPT=rfc822;orig+2Bdee@" + dom,))
        (txn,) = dsns_for(W, qid)
        msg, rcpts, parts = dsn_parts(txn)
        per_msg = dict(parts[1].get_payload()[0].items())
        assert per_msg["Original-Envelope-Id"] == "abc123"
        assert rcpts[0]["Original-Recipient"].replace(" ", "") == \
            "rfc822;orig+2Bdee@" + dom
        assert parts[2].get_content_type() == "text/rfc822-headers"
        q2 = send(W, "eve@" + dom, rcpt_options=("NOTIFY=NEVER",))
        q3 = send(W, "fox@" + dom, sender="")
        wait_final(W, q2)
        wait_final(W, q3)
        time.sleep(2)
        assert not [t for t in W.dsn_sink.messages
                    if q2.encode() in t.data or q3.encode() in t.data]
    finally:
        sink.stop()


def test_dsn_of_a_large_message_returns_its_header_section_only(W):
    """RFC 3461, 4.3: with RET=FULL the DSN returns the whole message only
    up to 64 KiB of body; a 2 MB message comes back as its header section
    (text/rfc822-headers, RFC 6522), complete, and the DSN stays small."""
    sink = SmtpSink(rcpt_reply="550 5.1.1 unknown")
    try:
        dom = W.sink_mx(sink)
        big = mail_text(sender="alice@sender.test", rcpts=["gil@" + dom],
                        subject="a large one", size=2 * 1000 * 1000,
                        headers=[("X-Last-Header", "still here")])
        small = mail_text(sender="alice@sender.test", rcpts=["hoa@" + dom],
                          subject="a small one", size=60 * 1000)
        qbig = send(W, "gil@" + dom, msg=big, mail_options=("RET=FULL",))
        qsmall = send(W, "hoa@" + dom, msg=small, mail_options=("RET=FULL",))

        (txn,) = dsns_for(W, qbig)
        _, rcpts, parts = dsn_parts(txn)
        assert rcpts[0]["Status"] == "5.1.1"
        assert parts[2].get_content_type() == "text/rfc822-headers"
        returned = parts[2].get_payload()
        assert "Subject: a large one" in returned
        assert "X-Last-Header: still here" in returned
        assert "x" * 76 not in returned
        assert "too large to be returned" in \
            parts[0].get_payload().replace("\r\n", " ")
        assert len(txn.data) < 64 * 1024

        (txn,) = dsns_for(W, qsmall)
        _, _, parts = dsn_parts(txn)
        assert parts[2].get_content_type() == "message/rfc822"
        assert ("x" * 76).encode() in txn.data
    finally:
        sink.stop()


def test_notify_success_relayed_when_the_next_hop_lacks_dsn(W):
    """RFC 3461, 6.2.1: NOTIFY=SUCCESS to a next hop without DSN: sg
    reports "relayed"; a next hop with DSN gets NOTIFY and reports
    itself."""
    plain = SmtpSink(ehlo=["PIPELINING", "8BITMIME"])
    dsn = SmtpSink()
    try:
        d1, d2 = W.sink_mx(plain), W.sink_mx(dsn)
        q1 = send(W, "gil@" + d1, rcpt_options=("NOTIFY=SUCCESS",))
        (txn,) = dsns_for(W, q1)
        _, rcpts, _ = dsn_parts(txn)
        assert rcpts[0]["Action"] == "relayed"
        q2 = send(W, "hub@" + d2, rcpt_options=("NOTIFY=SUCCESS",))
        wait_final(W, q2)
        assert dsn.messages[0].rcpts[0].params.get("NOTIFY") == "SUCCESS"
        time.sleep(2)
        assert not [t for t in W.dsn_sink.messages if q2.encode() in t.data]
    finally:
        plain.stop()
        dsn.stop()


def test_delay_notice(W):
    sink = SmtpSink(rcpt_reply="451 4.2.0 busy")
    with W.instance(extra_main=DELIVERY_CONF
                    + "sg_delivery_delay_notice 2s;\n") as inst:
        dom = W.sink_mx(sink)
        qid = send(W, "ian@" + dom, rcpt_options=("NOTIFY=DELAY,FAILURE",))
        (txn,) = dsns_for(W, qid)
        _, rcpts, _ = dsn_parts(txn)
        assert rcpts[0]["Action"] == "delayed"
        assert rcpts[0]["Status"].startswith("4.")
        time.sleep(2.5)
        assert len(dsns_for(W, qid)) == 1          # once per recipient
        api(inst, "DELETE", "/api/v1/queue/" + qid)
    sink.stop()


# ------------------------------------------------------ the queue API

def test_retry_now_and_delete_with_and_without_bounce(W):
    sink = SmtpSink(rcpt_reply=ReplySequence("451 4.2.0 busy", "250 2.1.5 Ok"))
    with W.instance(extra_main=DELIVERY_CONF.replace(
            "sg_delivery_retry_schedule 1s;",
            "sg_delivery_retry_schedule 1h;")) as inst:
        dom = W.sink_mx(sink)
        qid = send(W, "jay@" + dom)
        wait_entry(W, qid, lambda e: e["recipients"][0]["state"] == "deferred")
        r = api(inst, "POST", "/api/v1/queue/%s/retry" % qid)
        assert r.status_code == 200, r.text
        e = wait_final(W, qid, timeout=15)
        assert states(e) == {"jay@" + dom: "delivered"}
        sink.rcpt_reply = "451 4.2.0 busy"
        q2 = send(W, "kai@" + dom)
        wait_entry(W, q2, lambda e: e["recipients"][0]["state"] == "deferred")
        assert api(inst, "DELETE", "/api/v1/queue/%s?bounce=true" % q2) \
            .status_code in (200, 204)
        (txn,) = dsns_for(W, q2)
        q3 = send(W, "lou@" + dom)
        wait_entry(W, q3, lambda e: e["recipients"][0]["state"] == "deferred")
        assert api(inst, "DELETE", "/api/v1/queue/" + q3).status_code in (200, 204)
        assert entry(W, q3)["recipients"][0]["state"] == "deleted"
        time.sleep(2)
        assert not [t for t in W.dsn_sink.messages if q3.encode() in t.data]
    sink.stop()


# ------------------------------------------------------ crashes

def test_kill_9_of_a_worker_mid_delivery_is_delivered_later(W):
    """A worker killed in a transaction loses nothing: its lease runs out
    and another worker delivers (a duplicate is possible only after the
    final dot: docs/design.md)."""
    sink = SmtpSink(delays={"rcpt": 30})
    with W.instance(workers=2) as inst:
        inst.allow_problems.append("exited on signal 9")
        dom = W.sink_mx(sink)
        qid = send(W, "mia@" + dom)
        sink.wait_for(lambda: any(c.verb == "RCPT" for s in sink.sessions
                                  for c in s.commands), timeout=20)
        e = entry(W, qid)
        assert e["recipients"][0]["state"] == "delivering"
        # the worker holding the connection to the sink
        out = subprocess.run(["ss", "-tnpH", "dst", "%s:25" % sink.host],
                             capture_output=True, text=True).stdout
        pid = int(out.split("pid=")[1].split(",")[0])
        os.kill(pid, signal.SIGKILL)
        sink.delays = {}
        e = wait_final(W, qid, timeout=30)
        assert states(e) == {"mia@" + dom: "delivered"}
        assert len(sink.messages) == 1
    sink.stop()


def test_postgresql_restart_during_delivery(W):
    """PostgreSQL goes away while a transaction is under way: the result
    is recorded once it is back, and nothing is lost."""
    sink = SmtpSink(delays={"dot": 3})
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "ned@" + dom)
        sink.wait_for(lambda: any(c.verb == "DATA" for s in sink.sessions
                                  for c in s.commands), timeout=20)
        W.pg.stop()
        time.sleep(1)
        W.pg.start()
        e = wait_final(W, qid, timeout=40)
        assert states(e) == {"ned@" + dom: "delivered"}
        assert len(sink.messages) == 1
    finally:
        sink.stop()


def test_reload_lets_a_transaction_in_flight_finish(W):
    """A reload (SIGHUP) while a transaction waits for the final reply:
    the old worker finishes it, the message is delivered once, nothing
    is logged as an alert."""
    sink = SmtpSink(delays={"dot": 3})
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "olga@" + dom)
        sink.wait_for(lambda: any(c.verb == "DATA" for s in sink.sessions
                                  for c in s.commands), timeout=20)
        W.inst.reload()
        e = wait_final(W, qid, timeout=30)
        assert states(e) == {"olga@" + dom: "delivered"}
        assert len(e["attempts"]) == 1
        time.sleep(2)
        assert len(sink.messages) == 1
        with open(W.inst.error_log, errors="replace") as f:
            assert "gracefully shutting down" in f.read()
    finally:
        sink.stop()


def test_ipv6_mx_and_every_address_of_a_host(W):
    """RFC 5321, 5.1: IPv4 and IPv6 addresses; every address of a host is
    tried before the next host (the first address refuses)."""
    v6 = SmtpSink(host="::1")
    try:
        dom = unique("six")
        W.mx(dom, ("mx." + dom, ["127.0.0.253", "::1"], 10))
        qid = send(W, "pia@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"pia@" + dom: "delivered"}
        assert [(a["ip"], a["result"]) for a in e["attempts"]] == \
            [("127.0.0.253", "next_mx"), ("::1", "delivered")]
        assert v6.messages[0].rcpts[0].address == "pia@" + dom
    finally:
        v6.stop()


def peak_sessions(*sinks):
    """The most SMTP sessions the sinks had open at one time.  A session
    ends when its QUIT arrives: sg closes the connection after the reply,
    and the sink's own end of the session may be recorded after sg's next
    connection began."""
    spans = sorted((s.started, s.quit_at or s.ended or time.time())
                   for sink in sinks for s in sink.sessions)
    return max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)


def peak_busy(*sinks):
    """The most SMTP sessions the sinks had carrying mail at one time: a
    session from its start to the final reply of its last transaction.
    sg counts a session for its destination until it has given it up
    (after that last reply, before its QUIT, as Postfix counts deliveries
    in progress); the next one may connect before the sink has read the
    QUIT of the one before."""
    spans = sorted((s.started, max(t.final_at for t in s.transactions
                                   if t.final_at))
                   for sink in sinks for s in sink.sessions
                   if any(t.final_at for t in s.transactions))
    return max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)


def delivery_order(inst, ids):
    """The pids of the workers that delivered messages ids, in the order
    of their log lines (the info line of each attempt: "<pid>#0: sg
    delivery: <id> to ... delivered: ...")."""
    order = []
    with open(inst.error_log) as f:
        for line in f:
            m = re.search(r" (\d+)#\d+: sg delivery: (\w+) to .* delivered: ",
                          line)
            if m and m.group(2) in ids:
                order.append(int(m.group(1)))
    return order


def deliver_many(W, dom, prefix, n, timeout=60):
    """n messages to prefix<i>@dom, each to its final state; their ids."""
    ids = [send(W, "%s%d@%s" % (prefix, i, dom)) for i in range(n)]
    for qid in ids:
        wait_final(W, qid, timeout=timeout)
    return ids


def test_destination_concurrency_limit(W):
    """sg_delivery_destination_concurrency: at most that many connections
    to one destination at once; the messages queue behind them."""
    sink = SmtpSink(delays={"dot": 0.5})
    conf = DELIVERY_CONF + "sg_delivery_destination_concurrency 2;\n"
    with W.instance(extra_main=conf):
        deliver_many(W, W.sink_mx(sink), "q", 6, timeout=30)
        assert len(sink.messages) == 6
        # sessions overlapping in time: never more than 2
        assert peak_sessions(sink) <= 2, sink.sessions
        assert len(sink.sessions) <= 3
    sink.stop()


# two workers that count their deliveries exactly: a lease that outlasts
# a loaded machine's pauses (with 3 s, a worker that cannot renew in time
# has its claims released and sent again by the other; lease expiry is
# not under test where this is used)
LONG_LEASE_CONF = DELIVERY_CONF.replace("sg_delivery_lease 3s;",
                                        "sg_delivery_lease 60s;")
assert LONG_LEASE_CONF != DELIVERY_CONF

# sg_delivery_batch: the jobs a worker holds at most; two workers share
# the messages, and each holds enough to open every session it may
NODE_CONF = LONG_LEASE_CONF + "sg_delivery_batch 4;\n"


def test_destination_concurrency_limit_holds_for_the_node(W):
    """sg_delivery_destination_concurrency counts the sessions of every
    worker of the node (the shared memory zone "sg_delivery"): two workers
    that both deliver to one destination keep 2 sessions between them,
    not 2 each."""
    sink = SmtpSink(delays={"dot": 1.0})
    conf = NODE_CONF + "sg_delivery_destination_concurrency 2;\n"
    with W.instance(workers=2, extra_main=conf) as inst:
        ids = deliver_many(W, W.sink_mx(sink), "n", 12)
        assert len(sink.messages) == 12
        assert peak_busy(sink) <= 2, [(x.started, x.ended)
                                      for x in sink.sessions]
        # the limit was shared: both workers delivered
        assert len(set(delivery_order(inst, ids))) == 2
    sink.stop()


def test_a_killed_worker_gives_its_room_on_the_node_back(W):
    """A worker killed while it holds the only session a destination may
    have (sg_delivery_destination_concurrency 1) does not keep it: the
    node drops a dead process's sessions, and the message it was sending
    and the one waiting behind it are delivered."""
    sink = SmtpSink(delays={"rcpt": 30})
    # one job per worker: the second message goes to the other worker
    conf = (DELIVERY_CONF + "sg_delivery_batch 1;\n"
            "sg_delivery_destination_concurrency 1;\n")
    with W.instance(workers=2, extra_main=conf) as inst:
        inst.allow_problems.append("exited on signal 9")
        dom = W.sink_mx(sink)
        first = send(W, "k1@" + dom)
        sink.wait_for(lambda: any(c.verb == "RCPT" for s in sink.sessions
                                  for c in s.commands), timeout=20)
        second = send(W, "k2@" + dom)
        wait_entry(W, second, lambda e: e["recipients"][0]["state"]
                   == "delivering", what="second message claimed")
        out = subprocess.run(["ss", "-tnpH", "dst", "%s:25" % sink.host],
                             capture_output=True, text=True).stdout
        pid = int(out.split("pid=")[1].split(",")[0])
        os.kill(pid, signal.SIGKILL)
        sink.delays = {}
        for qid in (first, second):
            e = wait_final(W, qid, timeout=30)
            assert states(e) == {r: "delivered" for r in states(e)}
        assert len(sink.messages) == 2
        with open(inst.error_log) as f:
            log = f.read()
        assert "sg delivery: process %d is gone" % pid in log
    sink.stop()


# workers that hold more mail than they have room for, and connections
# that stay open while idle (only giving way closes them)
BUSY_CONF = LONG_LEASE_CONF.replace("sg_delivery_idle_timeout 1s;",
                                    "sg_delivery_idle_timeout 30s;") \
    + "sg_delivery_batch 8;\n"


def test_workers_take_turns_at_a_full_destination(W):
    """Room on the node is shared fairly: with
    sg_delivery_destination_concurrency 1 and two workers that both have
    mail for the destination, the worker holding the session gives way
    after each message while the other waits (its session closes; the
    node reserves the room for the waiting worker), so their deliveries
    alternate.  Without that, the holder's session always has a next job
    (it keeps claiming the new mail) and would stay open until its
    worker's last message; the other worker's messages would wait for it
    and then for the idle timeout (30 s here)."""
    sink = SmtpSink(delays={"dot": 0.3})
    conf = NODE_CONF.replace("sg_delivery_idle_timeout 1s;",
                             "sg_delivery_idle_timeout 30s;") \
        + "sg_delivery_destination_concurrency 1;\n"
    with W.instance(workers=2, extra_main=conf) as inst:
        ids = deliver_many(W, W.sink_mx(sink), "t", 16)
        assert len(sink.messages) == 16
        assert peak_busy(sink) == 1
        order = delivery_order(inst, ids)
        assert len(order) == 16 and len(set(order)) == 2, order
        longest = max(len(list(g)) for _, g in itertools.groupby(order))
        assert longest <= 4, order
    sink.stop()


def test_workers_share_a_destination_limit_without_churn(W):
    """With sg_delivery_destination_concurrency 3 and two workers, the
    one holding more gives way until their sessions differ by at most
    one (2 and 1: a limit that does not divide evenly), and from then on
    every session carries one message after another: 32 messages over at
    most 8 connections.  (A build whose sessions gave way after every
    message while the other worker waited opened 14 with a limit of 4.)"""
    sink = SmtpSink(delays={"dot": 0.5})
    conf = BUSY_CONF + "sg_delivery_destination_concurrency 3;\n"
    with W.instance(workers=2, extra_main=conf) as inst:
        ids = deliver_many(W, W.sink_mx(sink), "w", 32)
        assert len(sink.messages) == 32
        assert peak_busy(sink) <= 3
        assert len(set(delivery_order(inst, ids))) == 2
        assert len(sink.sessions) <= 8, len(sink.sessions)
    sink.stop()


def test_workers_share_the_node_limit(W):
    """sg_delivery_concurrency counts the connections of every worker of
    the node, over all destinations, and the workers share it: two
    workers with mail for two destinations and room for two connections
    on the node carry no more than two sessions at once between them (not
    two each), and both deliver as the mail comes, their deliveries
    interleaved."""
    sinks = [SmtpSink(delays={"dot": 0.3}) for _ in range(2)]
    conf = BUSY_CONF + "sg_delivery_concurrency 2;\n"
    with W.instance(workers=2, extra_main=conf) as inst:
        doms = [W.sink_mx(sink) for sink in sinks]
        ids = [send(W, "u%d@%s" % (i, doms[i % 2])) for i in range(24)]
        for qid in ids:
            wait_final(W, qid, timeout=60)
        assert sum(len(sink.messages) for sink in sinks) == 24
        assert peak_busy(*sinks) <= 2
        order = delivery_order(inst, ids)
        assert len(order) == 24 and len(set(order)) == 2, order
        longest = max(len(list(g)) for _, g in itertools.groupby(order))
        assert longest <= 5, order
    for sink in sinks:
        sink.stop()


# connections kept idle for an hour: only giving way closes them in a test
IDLE_HOUR_CONF = LONG_LEASE_CONF.replace("sg_delivery_idle_timeout 1s;",
                                         "sg_delivery_idle_timeout 1h;")


def test_an_idle_connection_gives_way_to_another_workers_mail(W):
    """sg_delivery_destination_concurrency 1, two workers, connections
    kept idle for an hour: messages sent one at a time are claimed by
    either worker, and when the one without the connection gets one, the
    other's idle connection closes for it (it looks every 250 ms for a
    worker waiting for its room).  A connection that stayed idle would
    hold that message for the hour: its wait_final fails.

    Whichever worker asks first after the NOTIFY claims a message, so
    messages go one at a time until the other worker has won one (at
    most 40: two fair workers let one win 40 in a row with a chance of
    2 in 10^12)."""
    sink = SmtpSink()
    conf = (IDLE_HOUR_CONF
            + "sg_delivery_batch 1;\n"
              "sg_delivery_destination_concurrency 1;\n")
    with W.instance(workers=2, extra_main=conf) as inst:
        dom = W.sink_mx(sink)
        ids = []
        changes = 0
        for i in range(40):
            ids.append(send(W, "i%d@%s" % (i, dom)))
            wait_final(W, ids[-1], timeout=20)
            # the info line of the attempt precedes its record
            order = delivery_order(inst, ids)
            assert len(order) == len(ids), (order, ids)
            changes = sum(1 for a, b in zip(order, order[1:]) if a != b)
            if changes >= 1:
                break
        assert changes >= 1, order
        assert len(sink.messages) == len(ids)
        assert peak_busy(sink) == 1
        # each change of worker was a connection given up for the other
        assert len(sink.sessions) == changes + 1, order
    sink.stop()


def test_mail_for_another_destination_takes_an_idle_connections_room(W):
    """sg_delivery_concurrency 1, one worker, connections kept idle for an
    hour: after a message to one destination its connection stays open
    for the next; a message to another destination needs that room, so
    the idle connection says QUIT and the message goes, rather than
    waiting for the hour."""
    sink_a, sink_b = SmtpSink(), SmtpSink()
    conf = (IDLE_HOUR_CONF
            + "sg_delivery_concurrency 1;\n")
    with W.instance(extra_main=conf):
        first = send(W, "ia@" + W.sink_mx(sink_a))
        wait_final(W, first)
        assert sink_a.sessions[0].quit_at is None        # kept, idle
        second = send(W, "ib@" + W.sink_mx(sink_b))
        e = wait_final(W, second, timeout=20)
        assert states(e) == {"ib@" + e["recipients"][0]["domain"]:
                             "delivered"}
        # the idle connection gave way with QUIT (the sink's thread may
        # record it after the second message's record)
        sink_a.wait_for(lambda: sink_a.sessions[0].quit_at is not None,
                        timeout=5)
        assert len(sink_a.sessions) == 1 and len(sink_b.messages) == 1
    sink_a.stop()
    sink_b.stop()


def test_a_session_does_not_idle_while_its_workers_mail_waits(W):
    """sg_delivery_concurrency 1, one worker: a message to a second
    destination arrives while the only connection is sending to the
    first.  When that transaction ends, the session closes at once for
    the waiting mail instead of going idle (the debug log says so), and
    the second message goes."""
    # the second message must be claimed and waiting before the first's
    # final reply: 3 s for that on a loaded machine
    sink_a, sink_b = SmtpSink(delays={"dot": 3.0}), SmtpSink()
    conf = (IDLE_HOUR_CONF
            + "sg_delivery_concurrency 1;\n")
    with W.instance(extra_main=conf) as inst:
        first = send(W, "wa@" + W.sink_mx(sink_a))
        sink_a.wait_for(lambda: any(c.verb == "DATA" for s in sink_a.sessions
                                    for c in s.commands), timeout=20)
        dom_b = W.sink_mx(sink_b)
        second = send(W, "wb@" + dom_b)
        for qid in (first, second):
            wait_final(W, qid)
        assert len(sink_b.messages) == 1
        with open(inst.error_log, errors="replace") as f:
            log = f.read()
        assert "a session closes for this worker's mail to other" \
               " destinations" in log
    sink_a.stop()
    sink_b.stop()


def test_a_reload_keeps_the_node_counts(W):
    """A reload with the same sg_delivery_concurrency keeps the shared
    memory zone: a transaction an old worker is finishing still holds its
    room, so the new workers open no second session to a destination
    limited to one; they deliver once the old worker is done."""
    sink = SmtpSink(delays={"rcpt": 3})
    conf = LONG_LEASE_CONF + "sg_delivery_destination_concurrency 1;\n"
    with W.instance(workers=2, extra_main=conf) as inst:
        dom = W.sink_mx(sink)
        first = send(W, "rl1@" + dom)
        sink.wait_for(lambda: any(c.verb == "RCPT" for s in sink.sessions
                                  for c in s.commands), timeout=20)
        inst.reload()
        second = send(W, "rl2@" + dom)
        for qid in (first, second):
            e = wait_final(W, qid, timeout=30)
            assert states(e) == {r: "delivered" for r in states(e)}
        assert len(sink.messages) == 2
        assert peak_busy(sink) == 1, [(x.started, x.quit_at, x.ended)
                                      for x in sink.sessions]
        with open(inst.error_log, errors="replace") as f:
            assert "gracefully shutting down" in f.read()
    sink.stop()


def test_8bit_message_bounces_at_a_next_hop_without_8bitmime(W):
    """RFC 6152, 3: 8-bit data is never sent to a server that does not
    offer 8BITMIME: the recipient bounces with 5.6.3."""
    sink = SmtpSink(ehlo=["PIPELINING", "ENHANCEDSTATUSCODES"])
    try:
        dom = W.sink_mx(sink)
        body = "Subject: 8bit\r\n\r\ncaf\xc3\xa9\r\n".encode("latin-1")
        qid = send(W, "rio@" + dom, msg=body, mail_options=("BODY=8BITMIME",))
        e = wait_final(W, qid)
        assert states(e) == {"rio@" + dom: "bounced"}
        assert e["recipients"][0]["dsn_status"] == "5.6.3"
        assert not sink.transactions
    finally:
        sink.stop()

