"""Outbound STARTTLS (RFC 3207, 4.2), on real wire traffic: what sg's
SMTP client does with bytes a server sends after its 220 reply to
STARTTLS and before the handshake, and that it forgets what the server
said before TLS.

The world is test_delivery_edges.py's (test_delivery's World with
EDGE_CONF: the queue runner's poll and the retry schedule are an hour), so
a deferral stays a deferral and nothing is retried by the clock. The
setting "send with STARTTLS whenever possible" is on in every test here
(decision row 6, level "may").
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import DEFAULT_EHLO, SmtpSink, peer_ca  # noqa: E402,F401
from sgtest import api  # noqa: E402
from test_delivery import (dsn_parts, dsns_for, send, settings,  # noqa: E402
                           states, wait_entry, wait_final, world_up)
from test_delivery_edges import EDGE_CONF  # noqa: E402

INJECTION = "data after the 220 reply to STARTTLS: possible command injection"


@pytest.fixture(scope="module")
def world(peer_ca):
    """test_delivery's world, whose sg runs with EDGE_CONF."""
    with world_up(peer_ca, "sgstls-", EDGE_CONF) as w:
        yield w


@pytest.fixture
def W(world):
    settings(world.inst, starttls_outbound=True, tls_failure_fallback=True)
    world.dsn_sink.clear()
    return world


def tls_failure_listed(w, host):
    items = api(w.inst, "GET", "/api/v1/tls-failures").json()["items"]
    return [i for i in items if i["host"] == host]


# ------------------------------------------------- STARTTLS injection

def test_bytes_after_the_220_to_starttls_end_the_session(W):
    """RFC 3207, 4.2: bytes a server sends after its 220 reply to STARTTLS
    and before the handshake were not protected by TLS (a man in the
    middle may have injected them, CVE-2011-0411 style): sg must never
    read them as replies after TLS. sg closes the connection without
    completing a handshake: no EHLO, no MAIL FROM, in TLS or in clear;
    the attempt is "next_mx" with the reason, the only MX is exhausted,
    and the recipient is deferred (4.4.1). A protocol failure, not a
    handshake failure: no retry in clear, the host is not put on the
    TLS-failure list."""
    dom_cert = W.ca.issue(["mx.inject.test"])
    injected = (b"250-sink.test\r\n250 PIPELINING\r\n"    # a fake EHLO reply
                b"250 2.1.0 injected\r\n250 2.1.5 injected\r\n"
                b"354 injected\r\n250 2.0.0 injected: queued\r\n")
    sink = SmtpSink(tls=dom_cert, starttls_inject=injected)
    try:
        dom = W.sink_mx(sink)
        qid = send(W, "ivy@" + dom)
        # deferred (or, were the injection taken for replies, delivered)
        e = wait_entry(W, qid, lambda e: e["recipients"][0]["state"]
                       not in ("queued", "delivering"),
                       what="an outcome for the recipient")
        (s,) = sink.wait_sessions(1, closed=True)

        # on the wire: EHLO, STARTTLS, then nothing; the sink sent the
        # 220 and the injected bytes in one write, sg closed before any
        # handshake completed and sent no command after STARTTLS
        assert s.verbs == ["EHLO", "STARTTLS"], sink.dump()
        assert s.replies[-1] == "220 2.0.0 Ready to start TLS"
        assert s.raw_clear.endswith(b"STARTTLS\r\n")
        assert s.raw_clear.count(b"\r\n") == 2
        assert s.starttls_injected == b""
        assert not s.tls and s.end == "tls failed", s.tls_error
        assert s.raw_tls == b""
        assert not s.transactions and not sink.messages
        assert b"MAIL FROM" not in s.raw_clear

        # the queue entry: one attempt, its reason; the recipient deferred
        (a,) = e["attempts"]
        assert a["result"] == "next_mx"
        assert a["reply"] == "mx.%s[%s]: %s" % (dom, sink.host, INJECTION)
        assert a["starttls"] is False
        assert a["tls_level"] == "may" and a["tls_rule"] == 6
        r = e["recipients"][0]
        assert r["state"] == "deferred"
        assert r["last_reply"] == a["reply"]
        assert r["dsn_status"] == "4.4.1" and r["attempts"] == 1

        # no retry in clear (that is for a failed handshake) and no
        # listing: the one session above is all sg did
        assert not tls_failure_listed(W, "mx." + dom)
        assert len(sink.sessions) == 1
        api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        sink.stop()


# ------------------------------------ forgetting what EHLO said in clear

def send_with_dsn_options(W, sink, names):
    """The message both tests below send: two recipients of sink's domain
    (local parts names), with RET, ENVID, NOTIFY=SUCCESS,FAILURE and
    ORCPT; once delivered over TLS: (queue id, entry, recipients, domain,
    the sink's transaction, its session)."""
    dom = W.sink_mx(sink)
    rcpts = [n + "@" + dom for n in names]
    qid = send(W, rcpts, mail_options=("RET=HDRS", "ENVID=env+2Bid"),
               rcpt_options=("NOTIFY=SUCCESS,FAILURE",
                             "ORCPT=rfc822;orig@" + dom))
    e = wait_final(W, qid)
    assert states(e) == {r: "delivered" for r in rcpts}, e
    (t,) = sink.messages
    return qid, e, rcpts, dom, t, t.session

def test_extensions_offered_only_before_tls_are_not_used_after_it(W):
    """RFC 3207, 4.2: after TLS the client discards what it learned from
    the server before it and uses only the EHLO sent after TLS. The sink
    offers PIPELINING, SIZE (100 octets, smaller than the message), DSN,
    8BITMIME and SMTPUTF8 in clear, and none of them after TLS: sg's MAIL
    FROM and RCPT TO in TLS carry no SIZE=, RET=, ENVID=, NOTIFY= or
    ORCPT=, no command is pipelined, the old SIZE limit does not refuse
    the message, and NOTIFY=SUCCESS is answered by a "relayed" DSN
    (RFC 3461, 6.2.1: the next hop after TLS does not offer DSN)."""
    clear = ["PIPELINING", "SIZE 100", "8BITMIME", "ENHANCEDSTATUSCODES",
             "DSN", "SMTPUTF8", "STARTTLS"]
    sink = SmtpSink(tls=W.ca.issue(["mx.forget.test"]), ehlo=clear,
                    ehlo_tls=["ENHANCEDSTATUSCODES"])
    try:
        qid, e, rcpts, dom, t, s = send_with_dsn_options(
            W, sink, ("kim", "lou"))
        assert t.tls and s.tls
        assert e["attempts"][-1]["starttls"] is True

        # the EHLO in clear offered them all; the one after TLS none
        assert [c.verb for c in s.commands if not c.tls] == ["EHLO",
                                                             "STARTTLS"]
        assert "250-DSN\r\n250-SMTPUTF8" in s.commands[0].reply
        assert s.commands[2].verb == "EHLO" and s.commands[2].tls
        assert "DSN" not in s.commands[2].reply

        # RFC 1870, 6152, 3461: no parameter of a vanished extension
        assert t.mail_line == "MAIL FROM:<alice@sender.test>"
        assert t.mail_params == {}
        assert [r.line for r in t.rcpts] == ["RCPT TO:<%s>" % r
                                             for r in rcpts]
        assert all(r.params == {} for r in t.rcpts)

        # RFC 2920: each command waited for the reply to the one before
        tls_cmds = [c for c in s.commands if c.tls]
        assert [c.verb for c in tls_cmds][:5] == ["EHLO", "MAIL", "RCPT",
                                                  "RCPT", "DATA"]
        assert not any(c.pipelined for c in tls_cmds), s.transcript()

        # RFC 3461, 6.2.1: NOTIFY=SUCCESS to a next hop without DSN
        assert {r["dsn_action"] for r in e["recipients"]} == {"relayed"}
        (txn,) = dsns_for(W, qid)
        _, per_rcpt, _ = dsn_parts(txn)
        assert sorted(b["Action"] for b in per_rcpt) == ["relayed",
                                                         "relayed"]
    finally:
        sink.stop()


def test_extensions_offered_only_after_tls_are_used(W):
    """RFC 3207, 4.2, the other way round (and what makes the test above
    able to fail): the same message to a sink that offers nothing but
    STARTTLS in clear and PIPELINING, SIZE and DSN after TLS: sg uses
    them, from the EHLO after TLS (SIZE=, RET=, ENVID=, NOTIFY=, ORCPT=,
    pipelined RCPTs), and sends no "relayed" DSN."""
    sink = SmtpSink(tls=W.ca.issue(["mx.learn.test"]),
                    ehlo=["ENHANCEDSTATUSCODES", "STARTTLS"],
                    ehlo_tls=DEFAULT_EHLO)
    try:
        qid, e, rcpts, dom, t, s = send_with_dsn_options(
            W, sink, ("mel", "ned"))
        assert t.tls
        assert "DSN" not in s.commands[0].reply
        assert int(t.mail_params["SIZE"]) > 0
        assert t.mail_params.get("RET") == "HDRS"
        assert t.mail_params.get("ENVID") == "env+2Bid"
        for r in t.rcpts:
            assert r.params.get("NOTIFY") == "SUCCESS,FAILURE"
            assert r.params.get("ORCPT") == "rfc822;orig@" + dom
        assert any(c.pipelined for c in s.commands
                   if c.tls and c.verb == "RCPT"), s.transcript()
        # NOTIFY=SUCCESS went on to the next hop, which reports itself
        assert {r["dsn_action"] for r in e["recipients"]} == {"delivered"}
    finally:
        sink.stop()


def test_8bitmime_offered_only_before_tls_refuses_an_8bit_message(W):
    """RFC 3207, 4.2 with RFC 6152, 3: 8BITMIME offered in clear only is
    not offered: an 8-bit message is not sent after TLS (no MAIL FROM at
    all) and bounces with 5.6.3, sg's own refusal."""
    sink = SmtpSink(tls=W.ca.issue(["mx.eight.test"]),
                    ehlo=DEFAULT_EHLO + ["STARTTLS"],
                    ehlo_tls=["PIPELINING", "ENHANCEDSTATUSCODES", "DSN"])
    try:
        dom = W.sink_mx(sink)
        body = "Subject: eight\r\n\r\ncaf\xc3\xa9\r\n".encode("latin-1")
        qid = send(W, "ora@" + dom, msg=body, mail_options=("BODY=8BITMIME",))
        e = wait_final(W, qid)
        assert states(e) == {"ora@" + dom: "bounced"}, e
        r = e["recipients"][0]
        assert r["dsn_status"] == "5.6.3"
        assert "8BITMIME" in r["last_reply"]
        a = e["attempts"][-1]
        assert a["result"] == "bounced" and a["starttls"] is True
        assert all(c.verb not in ("MAIL", "RCPT", "DATA")
                   for s in sink.sessions for c in s.commands), sink.dump()
        assert any(s.tls for s in sink.sessions)
        assert not sink.transactions
    finally:
        sink.stop()
