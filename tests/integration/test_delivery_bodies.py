"""Delivery of message bodies, whichever way they leave the queue: a small
body comes with the claim (on the first row of each job, as bytea in hex),
a larger one is loaded when its session starts (sg_dlv_sess_body, the
limit is SG_DLV_CLAIM_BODY_MAX, 32 KB). The bytes at the MX must be the
bytes received, either way, and for every job of a message.

Uses the world of test_delivery.py (its own PostgreSQL, Redis, DNS and sg).
"""

import os
import secrets
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import SmtpSink, peer_ca, wait_for  # noqa: E402,F401
from test_delivery import (W, entry, send, states, wait_final,  # noqa: E402,F401
                           world)

LIMIT = 32768


def body_of(size):
    """A message of about size bytes whose every line differs (a hex
    decoding slip would show), CRLF line ends."""
    text = ("Subject: body %d\r\nFrom: alice@sender.test\r\n\r\n" % size)
    n = 0
    while len(text) < size:
        text += "%08d %s\r\n" % (n, secrets.token_hex(30))
        n += 1
    return text.encode()


def test_bodies_below_at_and_above_the_claim_limit_arrive_intact(W):
    sink = SmtpSink()
    try:
        dom = W.sink_mx(sink)
        sent = {}
        for size in (200, LIMIT - 3000, LIMIT + 3000, 200000):
            msg = body_of(size)
            qid = send(W, "s%d@%s" % (size, dom), msg=msg)
            sent[qid] = msg
        for qid in sent:
            e = wait_final(W, qid)
            assert set(states(e).values()) == {"delivered"}, e
        got = sink.wait_messages(len(sent))
        assert len(got) == len(sent)
        for msg in sent.values():
            assert [t for t in got if t.data.endswith(msg)], \
                "a body of %d bytes did not arrive intact" % len(msg)
    finally:
        sink.stop()


def test_every_job_of_a_message_gets_the_body(W):
    """Recipients in two domains are two jobs of one message: each needs
    the body, which the claim sends only once per job."""
    s1, s2 = SmtpSink(), SmtpSink()
    try:
        d1, d2 = W.sink_mx(s1), W.sink_mx(s2)
        for size in (500, LIMIT + 1000):
            msg = body_of(size)
            qid = send(W, ["a@" + d1, "b@" + d1, "c@" + d2], msg=msg)
            e = wait_final(W, qid)
            assert set(states(e).values()) == {"delivered"}, e
            for sink, n in ((s1, 2), (s2, 1)):
                t = sink.wait_messages(1)[-1]
                assert t.data.endswith(msg)
                assert len(t.rcpts) == n
                sink.clear()
    finally:
        s1.stop()
        s2.stop()


def test_delivery_memory_bounds_the_bodies_held(W):
    """sg_delivery_memory (issue 4: limits on every length and count): a
    worker holds at most that many bytes of bodies. With 1m and one 700 KB
    body held by a transaction that waits for its final reply, a second
    700 KB message waits before it even connects; it goes once the first
    is done. A message bigger than the whole budget still goes when
    nothing else is held."""
    from test_delivery_edges import Gate

    gate = Gate()
    held, other = SmtpSink(final_reply=gate), SmtpSink()
    conf = W.conf + "sg_delivery_memory 1m;\n"
    try:
        with W.instance(extra_main=conf):
            d1, d2 = W.sink_mx(held), W.sink_mx(other)
            m1, m2 = body_of(700000), body_of(700001)
            q1 = send(W, "big1@" + d1, msg=m1)
            assert gate.reached.wait(30)
            q2 = send(W, "big2@" + d2, msg=m2)
            # q2 is claimed, and waits for memory: no connection at all
            wait_for(lambda: entry(W, q2)["recipients"][0]["state"]
                     == "delivering", timeout=20,
                     message="the second message claimed")
            time.sleep(2)
            assert not other.sessions
            gate.open()
            for qid in (q1, q2):
                e = wait_final(W, qid)
                assert set(states(e).values()) == {"delivered"}, e
            assert other.wait_messages(1)[0].data.endswith(m2)
            huge = body_of(1500000)
            q3 = send(W, "huge@" + d2, msg=huge)
            e = wait_final(W, q3, timeout=60)
            assert set(states(e).values()) == {"delivered"}, e
            assert other.wait_messages(2)[1].data.endswith(huge)
    finally:
        gate.open()
        held.stop()
        other.stop()
