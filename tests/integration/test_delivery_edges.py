"""Delivery edge cases (issue 4, from a review): what test_delivery.py
leaves untested, on real wire traffic.

The world is test_delivery.py's (World: its own PostgreSQL, Redis and
dnsmasq, scriptable sinks as MX hosts on 127.0.0.x:25), with another
configuration for this module's sg: the queue runner's poll and the retry
schedule are an hour. Nothing here is retried by the clock, then: what is
delivered was delivered because a NOTIFY woke the worker, because a lease
ran out, or because sg went on at once (the next MX, the next
transaction, a new connection). A deferral stays a deferral.

Replies a test must hold (a worker killed while waiting for one) are
held by a Gate until the test opens it, not by a delay.
"""

import concurrent.futures
import contextlib
import datetime
import json
import os
import secrets
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import (PostfixMX, SmtpSink, _Drop, mail_text,  # noqa: E402,F401
                   peer_ca, send_via_smtp, wait_for)
import sgtest  # noqa: E402
from sgtest import api, finish_sg, lock_waiters  # noqa: E402
from test_delivery import (dsn_parts, dsns_for, entry,  # noqa: E402
                           list_change, send, settings, states, unique,
                           wait_entry, wait_final, world_up)

EDGE_CONF = """
sg_delivery_hostname sg-out.test;
sg_delivery_poll 1h;
sg_delivery_retry_schedule 1h;
sg_delivery_lease 3s;
sg_delivery_idle_timeout 3s;
sg_delivery_connect_timeout 2s;
sg_delivery_command_timeout 30s;
sg_delivery_data_done_timeout 30s;
"""

# RFC 5321, 4.5.3.2: short timeouts, for servers that say nothing (for
# 60 s); they apply to the servers that answer too, whose replies a loaded
# machine may delay by a second or more
SHORT_TIMEOUTS = EDGE_CONF.replace(
    "sg_delivery_command_timeout 30s;", "sg_delivery_command_timeout 3s;"
).replace(
    "sg_delivery_data_done_timeout 30s;", "sg_delivery_data_done_timeout 3s;")
assert "30s" not in SHORT_TIMEOUTS


@pytest.fixture(scope="module")
def world(peer_ca):
    """test_delivery's world, whose sg runs with EDGE_CONF."""
    with world_up(peer_ca, "sgedge-", EDGE_CONF) as w:
        yield w


@pytest.fixture
def W(world):
    if not world.pg.is_running():
        world.pg.start()
    settings(world.inst, starttls_outbound=False, tls_failure_fallback=True)
    world.dsn_sink.clear()
    return world


class Gate:
    """A sink reply held until the test opens the gate: a callable for
    SmtpSink's mail_reply, rcpt_reply, final_reply... (None: the sink's
    default reply once open)."""

    def __init__(self, reply=None):
        self.reply = reply
        self.opened = threading.Event()
        self.reached = threading.Event()

    def __call__(self, session, obj):
        self.reached.set()
        self.opened.wait(120)
        return self.reply

    def open(self):
        self.opened.set()


def worker_talking_to(host, port=25):
    """The pid of the process with a TCP connection to host:port."""
    out = subprocess.run(["ss", "-tnpH", "dst", "%s:%d" % (host, port)],
                         capture_output=True, text=True).stdout
    m = re.search(r"pid=(\d+)", out)
    assert m, "no connection to %s:%d: %r" % (host, port, out)
    return int(m.group(1))


def rcpt_verbs(sink):
    return [c for s in sink.sessions for c in s.commands if c.verb == "RCPT"]


# ------------------------------------------------------------ the runner

def test_notify_wakes_the_queue_runner(W):
    """New mail is claimed at once on NOTIFY sg_queue (issue 4, item 1):
    the poll of this module's sg is an hour, so it cannot be what
    delivers."""
    with open(W.inst.conf) as f:
        assert re.search(r"sg_delivery_poll\s+1h;", f.read())
    sink = SmtpSink()
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "ann@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"ann@" + dom: "delivered"}
        assert [t.rcpts[0].address for t in sink.messages] == ["ann@" + dom]
        # one claim: the recipient was taken once
        assert e["recipients"][0]["attempts"] == 1
    finally:
        sink.stop()


def test_overall_concurrency_limit(W):
    """sg_delivery_concurrency 1: one connection at a time in all, even
    for two destinations with jobs waiting (the per-destination limit
    is higher)."""
    a, b = SmtpSink(), SmtpSink()
    conf = EDGE_CONF + ("sg_delivery_concurrency 1;\n"
                        "sg_delivery_destination_concurrency 5;\n")
    try:
        with W.instance(extra_main=conf):
            da, db = W.sink_mx(a), W.sink_mx(b)
            ids = []
            for i in range(3):
                ids.append(send(W, "c%d@%s" % (i, da)))
                ids.append(send(W, "c%d@%s" % (i, db)))
            for qid in ids:
                e = wait_final(W, qid)
                assert list(states(e).values()) == ["delivered"], e
            assert len(a.messages) == 3 and len(b.messages) == 3
            # the sinks' sessions, both together: none starts before the
            # one before it has ended
            for sink in (a, b):     # the kept connections close when idle
                sink.wait_sessions(len(sink.sessions), closed=True)
            # (the end of a session is when its QUIT arrived: sg opens the
            # next connection only after the 221 and the close, so that
            # is causally before the next session's start)
            spans = sorted((s.started, s.quit_at or s.ended)
                           for s in a.sessions + b.sessions)
            for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
                assert s2 >= e1, spans
    finally:
        a.stop()
        b.stop()


# ------------------------------------------------------------ routes

def test_default_route_sends_every_other_domain_through_its_relay(W):
    """The default route ("*", like Postfix's relayhost): every domain
    without a route of its own goes to its relay host, whatever its DNS
    says; a domain's own route still wins."""
    relay = SmtpSink(port=2526)
    own = SmtpSink(port=2526)
    mx = SmtpSink()
    routes = []
    try:
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/routes",
                    json={"domain": "*", "relay": "%s:2526" % relay.host})
            assert r.status_code == 201, r.text
            routes.append(r.json()["id"])
        d_dns = W.sink_mx(mx)             # has an MX: the route wins
        d_none = unique("nodns")          # no DNS records at all
        d_own = unique("own")
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/routes",
                    json={"domain": d_own, "relay": "%s:2526" % own.host})
            assert r.status_code == 201, r.text
            routes.append(r.json()["id"])
        q1 = send(W, "amy@" + d_dns)
        q2 = send(W, "bob@" + d_none)
        q3 = send(W, "cat@" + d_own)
        for qid in (q1, q2, q3):
            e = wait_final(W, qid)
            assert list(states(e).values()) == ["delivered"], e
        assert e["attempts"][-1]["destination"] == "route:%s:2526" % own.host
        assert entry(W, q1)["attempts"][-1]["destination"] == \
            "route:%s:2526" % relay.host
        assert sorted(t.rcpts[0].address for t in relay.messages) == \
            sorted(["amy@" + d_dns, "bob@" + d_none])
        assert [t.rcpts[0].address for t in own.messages] == ["cat@" + d_own]
        assert not mx.sessions
    finally:
        for rid in routes:
            api(W.inst, "DELETE", "/api/v1/routes/%s" % rid)
        relay.stop()
        own.stop()
        mx.stop()


def test_relay_host_on_the_required_list_without_starttls_defers(W):
    """The TLS rules apply to a route's relay host (issue 4, item 2;
    DESIGN.md row 4): the relay host named on the STARTTLS required list
    does not offer STARTTLS, so nothing is sent in clear (RFC 3207, 4)
    and the recipient is deferred with the reason."""
    relay = SmtpSink(port=2526)
    rid = wid = None
    try:
        dom = unique("rreq")
        name = "relay." + dom
        W.host(name, relay.host)
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/routes",
                    json={"domain": dom, "relay": "%s:2526" % name})
            assert r.status_code == 201, r.text
            rid = r.json()["id"]
            r = api(W.inst, "POST", "/api/v1/starttls/required",
                    json={"value": name})
            assert r.status_code == 201, r.text
            wid = r.json()["id"]
        qid = send(W, "dee@" + dom)
        e = wait_entry(W, qid, lambda e: e["recipients"][0]["state"]
                       == "deferred")
        (a,) = e["attempts"]
        assert a["destination"] == "route:%s:2526" % name
        assert a["mx_host"] == name and a["port"] == 2526
        assert a["tls_level"] == "encrypt" and a["tls_rule"] == 4
        assert a["result"] == "next_mx"
        assert "STARTTLS" in a["reply"]
        rc = e["recipients"][0]
        assert "STARTTLS" in rc["last_reply"] and name in rc["last_reply"]
        assert relay.sessions, "the relay host was not even asked"
        for s in relay.sessions:
            assert b"MAIL FROM" not in s.raw_clear
        assert not relay.transactions
    finally:
        if wid:
            api(W.inst, "DELETE", "/api/v1/starttls/required/%s" % wid)
        if rid:
            api(W.inst, "DELETE", "/api/v1/routes/%s" % rid)
        relay.stop()


# ------------------------------------------------------------ MX walk

def test_silent_servers_time_out(W):
    """RFC 5321, 4.5.3.2: a client's timeouts (short ones here).
    4.5.3.2.1: a greeting that never comes: the host is given up and the
    next MX delivers. 4.5.3.2.6: no reply to the final dot: the recipient
    is deferred with the reason (the message may have arrived: it is not
    sent to another host at once, RFC 1047)."""
    mute = SmtpSink(delays={"banner": 60})
    good = SmtpSink()
    slow = SmtpSink(delays={"dot": 60})
    good2 = SmtpSink()
    try:
        with W.instance(extra_main=SHORT_TIMEOUTS):
            dom = unique("mute")
            W.mx(dom, ("mx1." + dom, mute.host, 10),
                 ("mx2." + dom, good.host, 20))
            qid = send(W, "eli@" + dom)
            e = wait_final(W, qid)
            assert states(e) == {"eli@" + dom: "delivered"}
            a1, a2 = e["attempts"]
            assert (a1["mx_host"], a1["result"]) == ("mx1." + dom, "next_mx")
            assert "no reply in time" in a1["reply"]
            assert (a2["mx_host"], a2["result"]) == ("mx2." + dom,
                                                    "delivered")
            assert mute.sessions and not mute.transactions
            assert good.messages[0].rcpts[0].address == "eli@" + dom

            dom = unique("slow")
            W.mx(dom, ("mx1." + dom, slow.host, 10),
                 ("mx2." + dom, good2.host, 20))
            qid = send(W, "fay@" + dom)
            e = wait_entry(W, qid, lambda e: e["recipients"][0]["state"]
                           == "deferred")
            (a,) = e["attempts"]
            assert (a["mx_host"], a["result"]) == ("mx1." + dom, "deferred")
            rc = e["recipients"][0]
            assert "after the message was sent" in rc["last_reply"]
            assert rc["dsn_status"].startswith("4.")
            assert slow.transactions[0].complete
            assert not good2.sessions
    finally:
        for s in (mute, good, slow, good2):
            s.stop()


def test_data_initiation_and_data_block_timeouts(W):
    """RFC 5321, 4.5.3.2.4: no 354 to DATA within the DATA-initiation
    timeout, and 4.5.3.2.5: a write of message data that cannot complete
    within the data-block timeout (the server stopped reading): each
    ends the session, and the recipient is deferred with the reason. No
    final dot was sent, so the message cannot have arrived."""
    mute = SmtpSink(delays={"data": 60})
    stalled = SmtpSink(stall_in_data=60)
    # 3 s: the stalled sink's 354 must come within the DATA-initiation
    # timeout on a loaded machine too
    conf = EDGE_CONF + ("sg_delivery_data_init_timeout 3s;\n"
                        "sg_delivery_data_block_timeout 3s;\n")
    try:
        with W.instance(extra_main=conf):
            for sink, rcpt, size, why in (
                    (mute, "gia", None, "no reply in time"),
                    (stalled, "hal", 20 * 1000 * 1000,
                     "timed out while sending the message")):
                dom = W.sink_mx(sink)
                msg = mail_text(sender="alice@sender.test",
                                rcpts=[rcpt + "@" + dom])
                if size:                # mail_text(size=) is slow for MBs
                    msg += ("x" * 76 + "\r\n") * (size // 78)
                qid = send(W, rcpt + "@" + dom, msg=msg)
                e = wait_entry(W, qid, lambda e: e["recipients"][0]["state"]
                               == "deferred", timeout=60)
                rc = e["recipients"][0]
                assert rc["dsn_status"].startswith("4."), rc
                assert rc["last_reply"] == ("the connection was lost during"
                                            " the transaction (%s)" % why), rc
                assert e["attempts"][0]["result"] in ("next_mx", "deferred")
                assert not sink.messages
                assert not any(t.complete for t in sink.transactions)
                api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        mute.stop()
        stalled.stop()


def test_5xx_greeting_tries_the_next_mx(W):
    """RFC 5321, 3.1 and 4.2: a 554 greeting refuses the session; the
    next MX host is tried at once (5.1) and delivers."""
    closed = SmtpSink(banner="554 5.3.2 no service for you")
    good = SmtpSink()
    try:
        dom = unique("g554")
        W.mx(dom, ("mx1." + dom, closed.host, 10),
             ("mx2." + dom, good.host, 20))
        qid = send(W, "gil@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"gil@" + dom: "delivered"}
        a1, a2 = e["attempts"]
        assert (a1["mx_host"], a1["result"]) == ("mx1." + dom, "next_mx")
        assert "554" in a1["reply"]
        assert a2["result"] == "delivered"
        assert not closed.transactions
        # nothing but QUIT after a refused greeting (RFC 5321, 3.1)
        assert all(c.verb == "QUIT" for s in closed.sessions
                   for c in s.commands)
    finally:
        closed.stop()
        good.stop()


def test_servfail_defers_with_a_reason_and_no_attempt_row(W):
    """A DNS failure (SERVFAIL) reaches no host: no delivery attempt is
    recorded, the recipient is deferred (never bounced) and the queue
    entry says why (issue 4, item 2)."""
    qid = send(W, "hal@srvfail%d.example" % os.getpid())
    e = wait_entry(W, qid, lambda e: e["recipients"][0]["state"]
                   == "deferred")
    rc = e["recipients"][0]
    assert e["attempts"] == []
    assert rc["dsn_status"] == "4.4.3"
    assert rc["last_reply"] == \
        "MX lookup for srvfail%d.example: SERVFAIL" % os.getpid(), rc
    assert not dsns_for_quick(W, qid)
    api(W.inst, "DELETE", "/api/v1/queue/" + qid)


def test_bare_cr_and_lf_in_a_queued_body_leave_as_crlf(W):
    """Issue 4, item 3: "CRLF normalization (never a bare CR or LF on the
    wire)". sg's own SMTP server refuses bare CR and LF (smuggling), so
    this body is written into the queue directly, as another program or
    an older node could: bare LF, bare CR, CR CR LF, a line starting with
    a dot after a bare LF, and no line end at the very end. On the wire
    every line ends in CRLF (RFC 5321, 2.3.8), the dot is stuffed (4.5.2)
    and the text is otherwise unchanged."""
    sink = SmtpSink()
    qid = secrets.token_hex(8).upper()
    body = (b"Subject: raw\r\n\r\none\ntwo\rthree\r\r\n"
            b"four\n.five\r\nsix")
    try:
        dom = W.sink_mx(sink)
        conn = W.pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO messages (id, sender, size, body, client_ip,"
                    " helo, esmtp) VALUES (%s, 'alice@sender.test', %s, %s,"
                    " '127.0.0.1', 'raw.test', true)",
                    (qid, len(body), body))
                cur.execute(
                    "INSERT INTO recipients (message_id, address,"
                    " original_address, domain, local_domain)"
                    " VALUES (%s, %s, %s, %s, false)",
                    (qid, "raw@" + dom, "raw@" + dom, dom))
            conn.commit()
        finally:
            conn.close()
        e = wait_final(W, qid)
        assert states(e) == {"raw@" + dom: "delivered"}
        (t,) = sink.messages
        assert not t.bare_lf
        raw = t.data_raw
        assert b"\r" not in raw.replace(b"\r\n", b"")
        assert b"\n" not in raw.replace(b"\r\n", b"")
        assert raw.endswith(b"four\r\n..five\r\nsix\r\n"), raw
        assert b"one\r\ntwo\r\nthree\r\n" in raw, raw
    finally:
        sink.stop()


def test_dns_timeout_defers(W):
    """Issue 4, item 2: a DNS server that never answers (timeouts) defers
    the recipient with the reason, records no attempt and sends no
    bounce. libunbound gives up by itself after its retries (it reports
    SERVFAIL, about 20 s here); sg's own timer (30 s per lookup) ends the
    wait if it does not."""
    import dnsserver
    with dnsserver.SilentServer().start() as silent:
        with W.instance(resolver=silent.address):
            qid = send(W, "ivy@timeout%d.example" % os.getpid())
            e = wait_entry(W, qid, lambda e: e["recipients"][0]["state"]
                           == "deferred", timeout=60)
            rc = e["recipients"][0]
            assert e["attempts"] == []
            assert rc["dsn_status"] == "4.4.3", rc
            assert rc["last_reply"] in (
                "MX lookup for timeout%d.example: %s" % (os.getpid(), why)
                for why in ("SERVFAIL", "no answer within 30000 ms")), rc
            assert silent.received > 0
            assert not dsns_for_quick(W, qid)
            api(W.inst, "DELETE", "/api/v1/queue/" + qid)


def dsns_for_quick(w, qid):
    return [t for t in w.dsn_sink.messages if qid.encode() in t.data]


def test_postfix_mx_without_tls_receives_the_message(W):
    """A real Postfix MX without TLS (RFC 5321, 5.1): sg delivers in
    clear, as the setting "send with STARTTLS whenever possible" is
    on but nothing is offered."""
    dom = unique("pfp")
    with PostfixMX(domains=[dom], hostname="mx." + dom) as pf:
        W.mx(dom, ("mx." + dom, pf.host, 10))
        settings(W.inst, starttls_outbound=True)
        qid = send(W, "ida@" + dom, msg=mail_text(
            sender="alice@sender.test", rcpts=["ida@" + dom],
            subject="to postfix in clear"))
        e = wait_final(W, qid)
        assert states(e) == {"ida@" + dom: "delivered"}
        (m,) = pf.wait_messages(1)
        assert m.message["Subject"] == "to postfix in clear"
        assert m.recipient == "ida@" + dom
        assert m.return_path == "alice@sender.test"
        a = e["attempts"][-1]
        assert a["starttls"] is False and a["tls_level"] == "may"
        assert a["reply"].startswith("250")
        assert "TLS connection established" not in pf.log_text()


# ------------------------------------------------------------ TLS rows

def test_whitelist_by_host_name_and_by_ip(W):
    """DESIGN.md row 5: H or A on the STARTTLS whitelist: no STARTTLS
    (RFC 3207), though the host offers it and the setting says whenever
    possible. By the MX host's name, then by its address."""
    settings(W.inst, starttls_outbound=True)
    by_name = SmtpSink(tls=W.ca.issue(["mx.wln.test"]))
    by_ip = SmtpSink(tls=W.ca.issue(["mx.wli.test"]))
    ids = []
    try:
        d1, d2 = W.sink_mx(by_name), W.sink_mx(by_ip)
        with list_change(W.inst):
            for value in ("mx." + d1, by_ip.host):
                r = api(W.inst, "POST", "/api/v1/starttls/whitelist",
                        json={"value": value})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
        for dom, sink in ((d1, by_name), (d2, by_ip)):
            qid = send(W, "joe@" + dom)
            e = wait_final(W, qid)
            assert states(e) == {"joe@" + dom: "delivered"}
            a = e["attempts"][-1]
            assert a["tls_level"] == "none" and a["tls_rule"] == 5, a
            assert a["starttls"] is False
            assert "STARTTLS" not in [c.verb for s in sink.sessions
                                      for c in s.commands]
            assert not sink.messages[0].tls
        # the same host not listed: STARTTLS (the rows above decided)
        other = SmtpSink(tls=W.ca.issue(["mx.wlo.test"]))
        try:
            d3 = W.sink_mx(other)
            e = wait_final(W, send(W, "kim@" + d3))
            assert e["attempts"][-1]["starttls"] is True
        finally:
            other.stop()
    finally:
        for i in ids:
            api(W.inst, "DELETE", "/api/v1/starttls/whitelist/%s" % i)
        by_name.stop()
        by_ip.stop()


# ------------------------------------------------------------ SMTPUTF8

def test_smtputf8_message_to_a_peer_without_smtputf8_bounces_5_6_7(W):
    """RFC 6531, 3.4 (and 3.2): a message that needs SMTPUTF8 is not sent
    to a server that does not offer it: the recipient bounces with
    5.6.7 (RFC 6531, 3.5) and the sender gets a DSN naming the recipient
    as RFC 6533, 3 says; nothing of the envelope crosses the wire."""
    sink = SmtpSink(ehlo=["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES",
                          "DSN"])
    try:
        dom = W.sink_mx(sink)
        rcpt = "j\u00f6rg@" + dom
        msg = ("From: alice@sender.test\r\nTo: %s\r\nSubject: utf8\r\n\r\n"
               "hello\r\n" % rcpt).encode("utf-8")
        qid = send(W, rcpt, msg=msg, mail_options=("SMTPUTF8",))
        e = wait_final(W, qid)
        assert states(e) == {rcpt: "bounced"}
        rc = e["recipients"][0]
        assert rc["dsn_status"] == "5.6.7"
        assert "SMTPUTF8" in rc["last_reply"]
        assert sink.sessions, "the host was not asked"
        assert not [c for s in sink.sessions for c in s.commands
                    if c.verb in ("MAIL", "RCPT", "DATA")]
        (txn,) = dsns_for(W, qid)
        _, rcpts, _ = dsn_parts(txn)
        assert rcpts[0]["Status"] == "5.6.7"
        assert rcpts[0]["Action"] == "failed"
        # RFC 6533, 3: the address in 7 bits, type utf-8
        assert rcpts[0]["Final-Recipient"] == "utf-8; j\\x{F6}rg@" + dom
    finally:
        sink.stop()


# ------------------------------------------------------------ RCPT replies

def test_552_to_rcpt_is_temporary(W):
    """RFC 5321, 4.5.3.1.10: 552 to RCPT ("too many recipients" in RFC
    821's words) is treated as 452: the recipient is deferred, not
    bounced, and no DSN goes out; the others are delivered."""
    sink = SmtpSink()
    try:
        dom = W.sink_mx(sink)
        full, ok = "full@" + dom, "ok@" + dom
        sink.rcpt_replies = {full: "552 5.2.2 mailbox full"}
        qid = send(W, [ok, full])
        e = wait_entry(W, qid, lambda e: all(
            r["state"] in ("delivered", "deferred", "bounced")
            for r in e["recipients"]))
        assert states(e) == {ok: "delivered", full: "deferred"}
        by = {r["address"]: r for r in e["recipients"]}
        assert by[full]["last_reply"].startswith("552")
        assert by[full]["dsn_status"].startswith("4.")
        assert [t.accepted_rcpts for t in sink.messages][0] == [ok]
        assert not dsns_for_quick(W, qid)
        api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        sink.stop()


def test_452_too_many_recipients_sends_the_rest_at_once(W):
    """RFC 5321, 4.5.3.1.10: a server that takes only so many recipients
    per transaction answers 452 to the others; they go in a new
    transaction at once (the retry schedule is an hour here)."""
    sink = SmtpSink(max_rcpts=2)
    try:
        dom = W.sink_mx(sink)
        rcpts = ["r%d@%s" % (i, dom) for i in range(5)]
        qid = send(W, rcpts)
        e = wait_final(W, qid)
        assert states(e) == {r: "delivered" for r in rcpts}
        assert all(r["attempts"] == 1 for r in e["recipients"])
        got = [t.accepted_rcpts for t in sink.messages]
        assert sorted(a for t in got for a in t) == sorted(rcpts)
        assert [len(t) for t in got] == [2, 2, 1]
        # one connection
        assert len({id(t.session) for t in sink.messages}) == 1
        assert [a["result"] for a in e["attempts"]] == ["delivered"] * 3
    finally:
        sink.stop()


# ------------------------------------------------------------ reuse

def test_kept_connection_lost_at_mail_from_is_retried_on_a_new_one(W):
    """A kept connection (issue 4, item 3) that the peer closed while
    idle fails at MAIL FROM with no reply: nothing was transacted, so the
    job goes over a new connection at once instead of being deferred."""
    def drop_second_mail(session, txn):
        if session.transactions:      # not the first on this connection
            raise _Drop("closed the idle connection")
        return None

    sink = SmtpSink(mail_reply=drop_second_mail)
    # the connection is kept until q2 is claimed, however long that takes
    conf = EDGE_CONF.replace("sg_delivery_idle_timeout 3s;",
                             "sg_delivery_idle_timeout 1h;")
    assert conf != EDGE_CONF
    try:
        with W.instance(extra_main=conf):
            dom = W.sink_mx(sink)
            q1 = send(W, "kay@" + dom)
            wait_final(W, q1)
            q2 = send(W, "lou@" + dom)
            e = wait_final(W, q2)
            assert states(e) == {"lou@" + dom: "delivered"}
            assert e["recipients"][0]["attempts"] == 1
            s1 = sink.messages[0].session
            # the second MAIL went over the kept connection, which closed
            assert [c.verb for c in s1.commands].count("MAIL") == 2
            assert s1.end == "closed the idle connection"
            assert sink.messages[1].session is not s1
            assert sink.messages[1].rcpts[0].address == "lou@" + dom
    finally:
        sink.stop()


# ------------------------------------------------------------ stops

def test_sigterm_mid_delivery_hands_the_claim_back(W):
    """nginx stopped fast (SIGTERM) while a transaction waits for a
    reply: nothing is recorded, the claim runs out (sg_delivery_lease)
    and the restarted sg delivers the message, once."""
    gate = Gate()
    sink = SmtpSink(rcpt_reply=gate)
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "max@" + dom)
        assert gate.reached.wait(20)
        assert entry(W, qid)["recipients"][0]["state"] == "delivering"
        master = W.inst.nginx.pid
        os.kill(master, signal.SIGTERM)
        W.inst.nginx.proc.wait(30)
        sink.rcpt_reply = None
        gate.open()
        W.inst.start()
        e = wait_final(W, qid)
        assert states(e) == {"max@" + dom: "delivered"}
        assert len(sink.messages) == 1
        assert sink.messages[0].rcpts[0].address == "max@" + dom
    finally:
        gate.open()
        sink.stop()


def test_sigquit_mid_delivery_finishes_and_hands_back_the_rest(W):
    """A graceful stop (SIGQUIT) while one transaction runs and another
    job waits for the destination: the running one finishes and is
    recorded, the waiting one goes back to the queue at once (issue 4,
    item 9) and is delivered after the restart; each exactly once."""
    gate = Gate()
    sink = SmtpSink(final_reply=gate)
    conf = EDGE_CONF + "sg_delivery_destination_concurrency 1;\n"
    try:
        with W.instance(extra_main=conf) as inst:
            dom = W.sink_mx(sink)
            q1 = send(W, "ned@" + dom)
            assert gate.reached.wait(20)
            q2 = send(W, "ora@" + dom)
            wait_entry(W, q2, lambda e: e["recipients"][0]["state"]
                       == "delivering")
            os.kill(inst.nginx.pid, signal.SIGQUIT)
            # the running transaction keeps the worker; the waiting job
            # is handed back
            # (the admin API has stopped listening: PostgreSQL itself)
            wait_for(lambda: states(entry_db(W, q2))["ora@" + dom]
                     == "deferred", timeout=20,
                     message="the waiting job handed back")
            gate.open()
            inst.nginx.proc.wait(30)
            assert states(entry_db(W, q1)) == {"ned@" + dom: "delivered"}
            inst.start()
            e = wait_final(W, q2)
            assert states(e) == {"ora@" + dom: "delivered"}
            assert sorted(t.rcpts[0].address for t in sink.messages) == \
                ["ned@" + dom, "ora@" + dom]
            with open(inst.error_log, errors="replace") as f:
                assert "waiting recipients go back to the queue" in f.read()
    finally:
        gate.open()
        sink.stop()


def entry_db(w, qid):
    """A message's recipients from PostgreSQL itself (sg is down)."""
    conn = w.pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT address, state FROM recipients"
                        " WHERE message_id = %s", (qid,))
            return {"recipients": [{"address": a, "state": s}
                                   for a, s in cur.fetchall()]}
    finally:
        conn.close()


def test_postgresql_outage_longer_than_the_lease(W):
    """PostgreSQL is away for longer than sg_delivery_lease while a
    transaction runs, and the remote accepts meanwhile: the worker keeps
    its result and records it when PostgreSQL is back; the message is
    delivered exactly once."""
    gate = Gate()
    sink = SmtpSink(final_reply=gate)
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "pam@" + dom)
        assert gate.reached.wait(20)
        W.pg.stop()
        gate.open()
        sink.wait_messages(1)
        time.sleep(4)                   # the lease (3s) runs out
        W.pg.start()
        e = wait_final(W, qid, timeout=40)
        assert states(e) == {"pam@" + dom: "delivered"}
        assert [a["result"] for a in e["attempts"]] == ["delivered"]
        # a second copy would come once the claim came back; the worker
        # has claimed again since (q2), and the sink has one of each
        q2 = send(W, "quin@" + dom)
        wait_final(W, q2)
        assert [t.rcpts[0].address for t in sink.messages] == \
            ["pam@" + dom, "quin@" + dom]
    finally:
        gate.open()
        if not W.pg.is_running():
            W.pg.start()
        sink.stop()


def test_a_claim_that_lapsed_in_an_outage_is_not_sent_by_its_worker(W):
    """Issue 4, item 1 (several workers) and docs/design.md "Delivered
    twice": a worker has claimed a message and waits for a slow greeting
    when PostgreSQL goes away for longer than sg_delivery_lease (3 s).
    When it is back, the claim may be released and taken by the other
    worker, which delivers the message; the first worker, when its
    greeting finally comes, does not send (its claim lapsed) and says so.
    The MX gets the message once, and the queue ends delivered."""
    class FirstOnly(dict):
        """The banner delay of the first connection only."""
        def get(self, key, default=None):
            return self.pop(key, default)

    # The greeting comes after 30 s: after the worker is back on
    # PostgreSQL (the outage, PostgreSQL's stop and start, and a reconnect
    # backoff of up to 5 s) and has found its claim lapsed.  The greeting
    # timeout (sg_delivery_command_timeout) outlasts the delay.
    sink = SmtpSink(delays=FirstOnly(banner=30))
    conf = EDGE_CONF.replace("sg_delivery_command_timeout 30s;",
                             "sg_delivery_command_timeout 90s;")
    assert conf != EDGE_CONF
    try:
        with W.instance(workers=2, extra_main=conf) as inst:
            dom = W.sink_mx(sink)
            qid = send(W, "ria@" + dom)
            sink.wait_sessions(1, timeout=20)
            W.pg.stop()
            time.sleep(4)               # longer than the lease
            W.pg.start()
            e = wait_final(W, qid, timeout=90)  # the greeting: 30 s
            assert states(e) == {"ria@" + dom: "delivered"}
            # the first session got its greeting, and the lapsed job's
            # worker has done what it does with it
            first = sink.sessions[0]
            sink.wait_for(lambda: first.closed, timeout=60)
            with open(inst.error_log, errors="replace") as f:
                log = f.read()
            assert "%s: its claim was not renewed" % qid in log
            # one transaction in all: the lapsed job sent no MAIL (the
            # job that delivered may have used the same connection)
            assert [t.rcpts[0].address for t in sink.transactions] == \
                ["ria@" + dom], sink.dump()
    finally:
        if not W.pg.is_running():
            W.pg.start()
        sink.stop()


# sg's results statement (it inserts the attempt rows)
RESULTS = "INSERT INTO delivery_attempts"


def attempt_logged(inst, qid, result):
    """The info line of an attempt of message qid with that result ("sg
    delivery: <id> to <rcpt> via ... <result>: <reply>"): sg writes it when
    the transaction ends, before the job's results go to PostgreSQL."""
    pattern = re.compile(r"sg delivery: %s to .* %s: " % (qid, result))
    with open(inst.error_log, errors="replace") as f:
        return any(pattern.search(line) for line in f)


def test_results_batch_refused_is_recorded_job_by_job(W):
    """Group commit of results (docs/design.md): jobs that finish while a
    results statement runs are recorded together. Here the first
    statement waits on a row lock held by the test, five jobs finish
    meanwhile, and their batch is refused by PostgreSQL (a trigger
    refuses the attempt rows of two of them with a check violation).
    Each job is then recorded alone: the three good ones with their
    attempt rows, the two refused ones without them; every recipient ends
    delivered, once.

    The trigger exists before the lock is taken: created while sg's
    statement waits (holding its lock on delivery_attempts) it would
    deadlock with it, and PostgreSQL would abort one of the two."""
    gate = Gate()                       # the first 250 waits for the lock
    first_sink, sink = SmtpSink(final_reply=gate), SmtpSink()
    conn = W.pg.connect()
    conn.autocommit = True
    # the waiting statement holds its recipients' rows, and the lease
    # renewal waits for them: more connections, and a lease that outlasts
    # the wait, so that the other jobs go on meanwhile
    conf = EDGE_CONF.replace("sg_delivery_lease 3s;",
                             "sg_delivery_lease 60s;") \
        + "sg_postgres_pool 4;\n"
    try:
        stack = contextlib.ExitStack()
        stack.enter_context(W.instance(extra_main=conf))
        d1, d2 = W.sink_mx(first_sink), W.sink_mx(sink)
        rcpts = ["b%d@%s" % (i, d2) for i in range(5)]
        bad = rcpts[1:3]
        with conn.cursor() as cur:
            cur.execute(
                "CREATE FUNCTION sg_test_refuse_attempt() RETURNS trigger"
                " LANGUAGE plpgsql AS $$BEGIN"
                " IF NEW.recipients && %s::text[] THEN RAISE EXCEPTION"
                " 'attempt refused by the test' USING ERRCODE = '23514';"
                " END IF; RETURN NEW; END$$", (bad,))
            cur.execute("CREATE TRIGGER sg_test_refuse_attempt BEFORE INSERT"
                        " ON delivery_attempts FOR EACH ROW EXECUTE FUNCTION"
                        " sg_test_refuse_attempt()")
        q1 = send(W, "first@" + d1)
        # the first job's results statement waits for this lock
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM messages WHERE id = %s FOR UPDATE",
                        (q1,))
        assert gate.reached.wait(20)
        gate.open()
        first_sink.wait_messages(1, timeout=20)
        wait_for(lambda: lock_waiters(W.pg, RESULTS) >= 1,
                 timeout=20, message="the first results statement waits")
        qids = [send(W, r) for r in rcpts]
        bad_ids = qids[1:3]
        # the commit ends the lock: not before the five are done and wait
        # for the running statement (sg logs each attempt, then queues its
        # results at once)
        sink.wait_messages(5, timeout=30)
        wait_for(lambda: all(attempt_logged(W.inst, qid, "delivered")
                             for qid in qids),
                 timeout=20, message="the five attempts logged")
        assert lock_waiters(W.pg, RESULTS) >= 1
        conn.commit()
        e1 = wait_final(W, q1)
        assert states(e1) == {"first@" + d1: "delivered"}
        for qid, rcpt in zip(qids, rcpts):
            e = wait_final(W, qid)
            assert states(e) == {rcpt: "delivered"}, e
            assert e["recipients"][0]["attempts"] == 1, e
            assert len(e["attempts"]) == (0 if qid in bad_ids else 1), e
        assert sorted(t.rcpts[0].address for t in sink.messages) == rcpts
        with open(W.inst.error_log, errors="replace") as f:
            log = f.read()
        assert "cannot record the results of 5 jobs together" in log, \
            "\n".join(l for l in log.splitlines() if "sg delivery" in l and "debug" not in l)
        for qid in bad_ids:
            assert "%s: the attempt rows are refused" % qid in log
    finally:
        gate.open()
        conn.rollback()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DROP TRIGGER IF EXISTS sg_test_refuse_attempt"
                        " ON delivery_attempts")
            cur.execute("DROP FUNCTION IF EXISTS sg_test_refuse_attempt()")
        conn.close()
        stack.close()
        first_sink.stop()
        sink.stop()


def test_kill_9_after_the_final_dot_may_deliver_twice(W):
    """docs/design.md "Delivered twice": a worker killed after the final
    dot was sent but before the 250 was recorded (the sink holds its
    250) leaves a claim that comes back after the lease; the message is
    sent again. At least once, and the queue ends delivered."""
    gate = Gate()
    sink = SmtpSink(final_reply=gate)
    try:
        dom = W.sink_mx(sink)
        W.inst.allow_problems.append("exited on signal 9")
        qid = send(W, "rae@" + dom)
        assert gate.reached.wait(20)
        assert sink.transactions[0].complete          # the dot arrived
        pid = worker_talking_to(sink.host)
        assert pid != W.inst.nginx.pid
        os.kill(pid, signal.SIGKILL)
        sink.final_reply = None
        gate.open()
        e = wait_final(W, qid, timeout=40)
        assert states(e) == {"rae@" + dom: "delivered"}
        assert len(sink.messages) >= 1
        assert all(t.rcpts[0].address == "rae@" + dom for t in sink.messages)
        assert e["attempts"][-1]["result"] == "delivered"
    finally:
        gate.open()
        sink.stop()


# ------------------------------------------------------------ review 4

def pg_time(text):
    """A timestamp of the queue API (PostgreSQL's JSON: ISO 8601 with an
    offset) as an aware datetime."""
    return datetime.datetime.fromisoformat(text)


def test_two_nodes_with_two_workers_deliver_each_message_once(W):
    """Issue 4, item 1: the queue runner is "safe with several workers and
    several nodes" (FOR UPDATE SKIP LOCKED; DESIGN.md principle 4): two sg
    instances on one PostgreSQL, two workers each, and 200 messages
    received by both at once. The MX gets every Message-ID exactly once,
    every recipient was claimed once (attempts == 1, one attempt row), and
    workers of both nodes took part. (The lease is long here: the claim is
    under test, not its expiry.)"""
    conf = EDGE_CONF.replace("sg_delivery_lease 3s;",
                             "sg_delivery_lease 60s;") \
        + "sg_delivery_batch 8;\n"
    sink = SmtpSink()
    other = None
    try:
        with W.instance(workers=2, extra_main=conf) as one:
            other = W.start(workers=2, extra_main=conf)
            dom = W.sink_mx(sink)
            tag = secrets.token_hex(4)

            def one_message(i):
                node = (one, other)[i % 2]
                rcpt = "n%d@%s" % (i, dom)
                mid = "<m%d.%s@sender.test>" % (i, tag)
                qid = send_via_smtp(node.smtp_port, "alice@sender.test",
                                    [rcpt], mail_text(
                                        sender="alice@sender.test",
                                        rcpts=[rcpt], message_id=mid,
                                        subject="load %d" % i))
                assert qid and len(qid) == 16, qid
                return mid, qid, rcpt

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                sent = list(pool.map(one_message, range(200)))
            sink.wait_messages(200, timeout=180)
            workers = set()
            for mid, qid, rcpt in sent:
                e = wait_final(W, qid, timeout=60)
                assert states(e) == {rcpt: "delivered"}, e
                assert e["recipients"][0]["attempts"] == 1, e
                (a,) = e["attempts"]
                assert a["result"] == "delivered" and a["recipients"] == [rcpt]
                workers.add(a["worker"])
            got = [t.message["Message-ID"] for t in sink.messages]
            want = sorted(mid for mid, _, _ in sent)
            assert sorted(got) == want          # each once, none missing
            assert all(len(t.accepted_rcpts) == 1 for t in sink.messages)
            # both nodes took part (worker ids are host:pid:start)
            pids = {int(w.split(":")[1]) for w in workers}
            assert pids & sgtest.descendants(one.nginx.pid), workers
            assert pids & sgtest.descendants(other.nginx.pid), workers
    finally:
        if other is not None:
            finish_sg(other)
        sink.stop()


def test_retry_schedule_steps_and_the_last_one_repeats(W):
    """Issue 4, item 6: the backoff schedule (sg_delivery_retry_schedule,
    docs/directives.md: "the waits after the first, second, ... temporary
    failure; the last one repeats"). A sink answers 451 to RCPT (RFC 5321,
    4.2.1: try again later); after each attempt the queue API's
    next_attempt_at of the recipient minus the message's last_attempt_at
    (both the server's clock) is the step for that many attempts: 2 s,
    3 s, 4 s, then 4 s again.  (Steps of 2 s and more: the test must see
    every deferral through the API, which a loaded machine answers
    slowly.)"""
    conf = EDGE_CONF.replace("sg_delivery_poll 1h;", "sg_delivery_poll 1s;") \
        .replace("sg_delivery_retry_schedule 1h;",
                 "sg_delivery_retry_schedule 2s 3s 4s;")
    sink = SmtpSink(rcpt_reply="451 4.2.0 try later")
    try:
        with W.instance(extra_main=conf) as inst:
            dom = W.sink_mx(sink)
            qid = send(W, "ray@" + dom)
            gaps = {}

            def five_deferrals():
                r = api(inst, "GET", "/api/v1/queue/" + qid)
                if r.status_code != 200:
                    return False
                e = r.json()
                rc = e["recipients"][0]
                if rc["state"] == "deferred" and e["last_attempt_at"]:
                    gap = (pg_time(rc["next_attempt_at"])
                           - pg_time(e["last_attempt_at"])).total_seconds()
                    gaps.setdefault(rc["attempts"], gap)
                return rc["attempts"] >= 5 and 5 in gaps
            wait_for(five_deferrals, timeout=90,
                     message=lambda: "gaps seen: %r" % gaps)
            # every deferral was seen (each lasts two seconds at least)
            assert sorted(gaps) == [1, 2, 3, 4, 5], gaps
            for attempts, step in ((1, 2), (2, 3), (3, 4), (4, 4), (5, 4)):
                assert abs(gaps[attempts] - step) < 0.5, gaps
            # one RCPT on the wire per recorded attempt; the retries go on,
            # so the entry and the sink are read one right after the other,
            # between attempts (an attempt under way has sent its RCPT and
            # not yet recorded it)
            seen = []

            def between_attempts():
                e = entry(W, qid)
                n = len(rcpt_verbs(sink))
                seen.append((e["recipients"][0]["state"],
                             e["recipients"][0]["attempts"], n))
                if e["recipients"][0]["state"] == "deferred" \
                        and n == e["recipients"][0]["attempts"]:
                    return e
                return None
            e = wait_for(between_attempts, timeout=30,
                         message=lambda: "(state, attempts, RCPTs): %r"
                         % seen[-5:])
            assert all(a["result"] == "deferred" for a in e["attempts"])
            assert e["recipients"][0]["last_reply"].startswith("451")
            assert not sink.messages
            api(inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        sink.stop()


def test_failure_list_entry_in_redis_is_honoured(W):
    """Issue 4, item 4 (DESIGN.md row 6, redis/README.md): the hourly
    TLS-failure list is shared through Redis. A host this sg never failed
    with, put on the list by someone else (another node: the key
    sg:tls-failure:<host> written straight into Redis), gets an unflagged
    message without STARTTLS though it offers STARTTLS and "send with
    STARTTLS whenever possible" is on; the attempt's TLS reason says why.
    Off the list again (DELETE /api/v1/tls-failures/{host}), STARTTLS is
    used."""
    settings(W.inst, starttls_outbound=True, tls_failure_fallback=True)
    dom = unique("rfl")
    name = "mx." + dom
    sink = SmtpSink(tls=W.ca.issue([name]))
    try:
        W.sink_mx(sink, dom, name)
        listed = api(W.inst, "GET", "/api/v1/tls-failures").json()["items"]
        assert name not in [i["host"] for i in listed]
        exp = int(time.time()) + 3600
        W.redis.client().set(
            "sg:tls-failure:" + name,
            json.dumps({"host": name, "ip": sink.host,
                        "reason": "handshake failed on another node",
                        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                   time.gmtime()),
                        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                    time.gmtime(exp))}),
            exat=exp)
        qid = send(W, "una@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"una@" + dom: "delivered"}
        (a,) = e["attempts"]
        assert a["result"] == "delivered"
        assert a["starttls"] is False
        assert a["tls_level"] == "none" and a["tls_rule"] == 6, a
        assert "TLS failed with this host within the hour" in a["tls_reason"]
        assert all("STARTTLS" in c.reply for s in sink.sessions
                   for c in s.commands if c.verb == "EHLO"), sink.dump()
        assert "STARTTLS" not in [c.verb for s in sink.sessions
                                  for c in s.commands]
        assert not sink.messages[0].tls
        # the same host off the list: STARTTLS
        d = api(W.inst, "DELETE", "/api/v1/tls-failures/" + name)
        assert d.status_code == 204, d.text
        n = len(sink.sessions)
        e = wait_final(W, send(W, "val@" + dom))
        assert e["attempts"][-1]["starttls"] is True, e["attempts"]
        assert "STARTTLS" in [c.verb for s in sink.sessions[n:]
                              for c in s.commands]
    finally:
        W.redis.client().delete("sg:tls-failure:" + name)
        sink.stop()


def test_smtputf8_message_to_a_peer_offering_smtputf8(W):
    """Issue 4, item 3; RFC 6531, 3.4: a message received with SMTPUTF8
    and a UTF-8 recipient goes to a next hop that offers SMTPUTF8 with
    MAIL FROM:<...> SMTPUTF8, and the recipient (RCPT TO, RFC 6531, 3.3)
    and the UTF-8 header arrive intact, as UTF-8 octets."""
    sink = SmtpSink()                   # DEFAULT_EHLO offers SMTPUTF8
    try:
        dom = W.sink_mx(sink)
        rcpt = "j\u00f6rg.\u00e5se@" + dom
        msg = ("From: alice@sender.test\r\nTo: %s\r\n"
               "Subject: Gr\u00fc\u00dfe\r\n\r\nh\u00e4llo\r\n"
               % rcpt).encode("utf-8")
        qid = send(W, rcpt, msg=msg, mail_options=("SMTPUTF8",))
        e = wait_final(W, qid)
        assert states(e) == {rcpt: "delivered"}, e
        (t,) = sink.messages
        assert "SMTPUTF8" in t.mail_params, t.mail_line
        assert [r.address for r in t.rcpts] == [rcpt]
        raw = [c.raw for c in t.session.commands if c.verb == "RCPT"]
        assert len(raw) == 1 and rcpt.encode("utf-8") in raw[0], raw
        assert "Subject: Gr\u00fc\u00dfe\r\n".encode("utf-8") in t.data
        assert t.data.endswith("h\u00e4llo\r\n".encode("utf-8"))
    finally:
        sink.stop()


def move_mx(w, domain, *hosts):
    """domain's MX records replaced by hosts ((name, address, pref))."""
    w.records["mx"] = [m for m in w.records["mx"] if m[0] != domain]
    w.mx(domain, *hosts)


def test_route_of_a_busy_destination_is_resolved_again(W):
    """Issue 4, item 2 (SLOW: about 70 s): a destination's route (its MX
    lookup) is reused for SG_DLV_ROUTE_TTL, 60 s, and then resolved again
    even while the destination stays busy. A trickle of messages keeps
    the connection to the old MX in use (one kept session, reused,
    sg_delivery_idle_timeout 15s: a gap of the trickle on a loaded
    machine must not close it) when the MX record changes; after the
    route's lifetime the next messages go to the new MX, and every
    message arrives once, at one of them."""
    old, new = SmtpSink(), SmtpSink()
    conf = EDGE_CONF.replace("sg_delivery_idle_timeout 3s;",
                             "sg_delivery_idle_timeout 15s;")
    assert conf != EDGE_CONF
    try:
        with W.instance(extra_main=conf):
            dom = unique("moving")
            W.mx(dom, ("mx1." + dom, old.host, 10))
            sent = []                   # (qid, rcpt, sent after the change)

            def one(after):
                rcpt = "t%d@%s" % (len(sent), dom)
                qid = send(W, rcpt)
                sent.append((qid, rcpt, after))
                e = wait_final(W, qid)
                assert states(e) == {rcpt: "delivered"}, e
                time.sleep(0.5)         # a trickle (a pause, not a check)
                return e["attempts"][-1]["mx_host"]

            for _ in range(3):
                assert one(False) == "mx1." + dom
            move_mx(W, dom, ("mx2." + dom, new.host, 10))
            hosts = []
            wait_for(lambda: hosts.append(one(True))
                     or hosts[-1] == "mx2." + dom,
                     timeout=150, interval=0,
                     message="a message to the new MX")
            # the old connection was busy across the change: the same
            # session carried messages sent before and after it (else this
            # test did not test what it says)
            first = old.messages[0].session
            carried = {t.rcpts[0].address for t in first.transactions}
            assert {r for _, r, after in sent if after} & carried, hosts
            # from now on the new MX only
            for _ in range(3):
                assert one(True) == "mx2." + dom
            got = [t.rcpts[0].address for t in old.messages + new.messages]
            assert sorted(got) == sorted(r for _, r, _ in sent)
            assert [t.rcpts[0].address for t in new.messages] == \
                [r for _, r, _ in sent[-len(new.messages):]]
    finally:
        old.stop()
        new.stop()


def test_452_attempt_rows_list_their_own_transactions(W):
    """Issue 4, items 3 and 8 (RFC 5321, 4.5.3.1.10): a server taking two
    recipients per transaction answers 452 to the rest, which go in the
    next transaction at once. Each attempt row of GET /api/v1/queue/{id}
    lists the recipients of its own transaction only: all five, then the
    three refused with 452, then the last one; a 550 in the second
    transaction bounces that recipient alone."""
    sink = SmtpSink(max_rcpts=2)
    try:
        dom = W.sink_mx(sink)
        r = ["a@", "b@", "c@", "d@", "e@"]
        r = [x + dom for x in r]
        sink.rcpt_replies = {r[3]: "550 5.1.1 no such user"}
        qid = send(W, r)
        e = wait_final(W, qid)
        assert states(e) == {r[0]: "delivered", r[1]: "delivered",
                             r[2]: "delivered", r[3]: "bounced",
                             r[4]: "delivered"}, e
        by = {x["address"]: x for x in e["recipients"]}
        assert all(by[x]["attempts"] == 1 for x in r), e["recipients"]
        assert by[r[3]]["last_reply"].startswith("550 5.1.1")
        assert by[r[3]]["dsn_status"] == "5.1.1"
        assert all(by[x]["last_reply"].startswith("250")
                   for x in r if x != r[3])
        # what the wire saw: three transactions on one connection
        txns = sink.transactions
        assert [[x.address for x in t.rcpts] for t in txns] == \
            [r, r[2:], r[4:]]
        assert [t.accepted_rcpts for t in txns] == \
            [r[:2], [r[2]], [r[4]]]
        rows = e["attempts"]
        assert [sorted(a["recipients"]) for a in rows] == \
            [r, r[2:], r[4:]], rows
        assert [a["result"] for a in rows] == ["delivered"] * 3, rows
        (txn,) = dsns_for(W, qid)
        _, dsn_rcpts, _ = dsn_parts(txn)
        assert [x["Final-Recipient"] for x in dsn_rcpts] == \
            ["rfc822; " + r[3]]
    finally:
        sink.stop()
