"""Delivery under MTA-STS (issue 5, item 3) and REQUIRETLS (issue 6).

The world of test_delivery.py (its own PostgreSQL, Redis, dnsmasq and a
delivering sg), plus Debian's nginx serving MTA-STS policies on
127.0.0.N:443 (sts_servers.PolicyHosts) with certificates of the test CA.
MX hosts are scriptable sinks (peers.SmtpSink) on 127.0.0.x:25, a private
Postfix, and a second sg instance.
"""

import itertools
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sgtest  # noqa: E402
from peers import (DEFAULT_EHLO, PostfixMX, SmtpSink,  # noqa: E402,F401
                   loopback_host, peer_ca, wait_for)
from sgtest import api  # noqa: E402
from sts_servers import PolicyHosts, policy  # noqa: E402
from test_delivery import (DELIVERY_CONF, W, dsn_parts, dsns_for, entry,  # noqa: E402,F401
                           list_change, send, settings, states, unique,
                           wait_entry, wait_final, world)

_ids = itertools.count(1)

RT_EHLO = DEFAULT_EHLO + ["REQUIRETLS"]


@pytest.fixture(scope="module")
def hosts(world, peer_ca):
    h = PolicyHosts(peer_ca)
    h.start()
    try:
        yield h
    finally:
        h.cleanup()


def publish(W, hosts, domain, mode="enforce", mx=None, txt_id=None, **site):
    """An MTA-STS policy for domain (RFC 8461, 3): the TXT record, the
    policy host's address and the policy served over HTTPS."""
    txt_id = txt_id or "id%d" % next(_ids)
    hosts.add(domain, policy(mode=mode, mx=mx or ("mx." + domain,)), **site)
    name = "_mta-sts." + domain
    W.records["txt"] = [t for t in W.records["txt"] if t[0] != name]
    W.records["txt"].append((name, "v=STSv1; id=%s" % txt_id))
    W.records["hosts"]["mta-sts." + domain] = [hosts.ip]
    hosts.apply()
    W.dns.reload(W.records)
    return txt_id


def tls_sink(W, name, ehlo_tls=None, **kw):
    """A sink with STARTTLS and a certificate of the test CA for name."""
    return SmtpSink(tls=W.ca.issue([name]), ehlo_tls=ehlo_tls, **kw)


def mail_lines(sink):
    return [c.line for s in sink.sessions for c in s.commands
            if c.verb == "MAIL"]


def nothing_in_clear(sink):
    """Nothing of the message reached the sink (RFC 8689, 4.1: no
    transmission): no MAIL, RCPT or DATA at all, in clear or in TLS, and
    none of it in the raw bytes received before TLS or after STARTTLS
    ahead of the handshake."""
    for s in sink.sessions:
        verbs = [c.verb for c in s.commands]
        assert not set(verbs) & {"MAIL", "RCPT", "DATA", "BDAT"}, verbs
        for raw in (s.raw_clear, s.starttls_injected):
            assert b"MAIL FROM" not in (raw or b"").upper(), raw
    assert not sink.transactions
    assert not sink.messages


def flagged_send(W, rcpt, **kw):
    """A message flagged by the MAIL parameter (RFC 8689, 4): sent to sg
    over STARTTLS with MAIL FROM:<...> REQUIRETLS."""
    return send(W, rcpt, starttls=True, mail_options=["REQUIRETLS"], **kw)


def metric(W, line_start):
    """A value from GET /metrics (issue 6, item 6)."""
    r = api(W.inst, "GET", "/metrics")
    assert r.status_code == 200, r.text
    for line in r.text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split(" ")[-1])
    raise AssertionError("%s not in /metrics:\n%s" % (line_start, r.text))


def first_deferral(W, qid):
    """The queue entry once its first attempt deferred the recipient."""
    return wait_entry(W, qid, lambda e: len(e["attempts"]) >= 1
                      and e["recipients"][0]["state"] == "deferred")


def bounce_of(W, qid):
    e = wait_final(W, qid)
    assert all(r["state"] == "bounced" for r in e["recipients"]), e
    return e


# ------------------------------------------------------ MTA-STS delivery

def test_sts_enforce_matching_mx_delivered_over_verified_tls(W, hosts):
    """RFC 8461, 4.1 and 5: enforce, the MX matches the policy: delivered
    over STARTTLS with a verified certificate, even with "STARTTLS
    whenever possible" off; the attempt names the policy. The message is
    not flagged: no REQUIRETLS although the MX offers it."""
    dom = unique("stsok")
    sink = tls_sink(W, "mx." + dom, ehlo_tls=RT_EHLO)
    try:
        W.sink_mx(sink, dom)
        pid = publish(W, hosts, dom)
        qid = send(W, "ann@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"ann@" + dom: "delivered"}
        assert sink.wait_messages(1)
        assert sink.messages[0].tls
        # RFC 8689, 4: only a flagged message carries the keyword, even
        # to an MX that offers it
        assert "REQUIRETLS" not in sink.messages[0].mail_line.upper()
        a = e["attempts"][-1]
        assert (a["tls_level"], a["tls_rule"]) == ("verify", 3)
        assert a["tls_verify"] == "ok" and a["tls_host_match"] is True
        assert a["policy"]["type"] == "sts"
        assert a["policy"]["domain"] == dom
        assert a["policy"]["id"] == pid
        assert a["policy"]["mode"] == "enforce"
        assert "mx: mx." + dom in a["policy"]["text"]
        assert a["policy"]["result_type"] is None
    finally:
        sink.stop()


def test_sts_enforce_mx_mismatch_is_skipped_and_deferred(W, hosts):
    """RFC 8461, 4.1: an MX that does not match an enforce policy is
    treated as unreachable: nothing is sent to it, the message is deferred
    (never bounced at once, RFC 8461, 5) with the reason in the queue;
    RFC 8460, 4.3.2.2: recorded as validation-failure."""
    dom = unique("stsmis")
    sink = tls_sink(W, "mx." + dom)
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom, mx=("mail.elsewhere.test",))
        qid = send(W, "bea@" + dom)
        e = first_deferral(W, qid)
        a = e["attempts"][0]
        assert a["result"] == "next_mx" and a["mx_host"] == "mx." + dom
        assert a["policy"]["result_type"] == "validation-failure"
        assert a["policy"]["reason"].startswith("mx-mismatch: mx." + dom)
        assert "does not match the policy" in a["tls_reason"]
        r = e["recipients"][0]
        assert r["state"] == "deferred"
        assert "does not match the policy" in r["last_reply"]
        assert not sink.sessions            # not even a connection
        api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        sink.stop()


def test_sts_enforce_new_policy_id_lets_the_message_through(W, hosts):
    """RFC 8461, 5 and 10.2: a new policy (new TXT id) is looked for before
    a deferred message gives up: once it lists the MX, the retry delivers,
    and its attempt names the new policy id."""
    dom = unique("stsnew")
    sink = tls_sink(W, "mx." + dom)
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom, mx=("old.elsewhere.test",))
        qid = send(W, "cid@" + dom)
        wait_entry(W, qid, lambda e: e["recipients"][0]["state"]
                   == "deferred")
        assert not sink.sessions
        # a new id, listing mx.<dom>: the retry's own lookup sees the TXT
        # id change (RFC 8461, 3.1; sg_mta_sts_txt_recheck 0 in this
        # world) and fetches the new policy; nothing asks for a refresh
        new_id = publish(W, hosts, dom)
        assert api(W.inst, "POST",
                   "/api/v1/queue/%s/retry" % qid).status_code in (200, 202)
        e = wait_final(W, qid, timeout=60)
        assert states(e) == {"cid@" + dom: "delivered"}
        assert sink.messages[0].tls
        assert e["attempts"][-1]["policy"]["id"] == new_id
    finally:
        sink.stop()


def test_sts_enforce_walks_past_a_mismatched_mx(W, hosts):
    """RFC 8461, 4.1: "treated as unreachable": the first MX, not in the
    enforce policy, is skipped in the MX walk (no connection, a next_mx
    attempt with validation-failure), and the second, which matches, gets
    the message over verified TLS."""
    dom = unique("stswalk")
    first = tls_sink(W, "mx1." + dom)
    second = tls_sink(W, "mx2." + dom)
    try:
        W.mx(dom, ("mx1." + dom, first.host, 10),
             ("mx2." + dom, second.host, 20))
        publish(W, hosts, dom, mx=("mx2." + dom,))
        qid = send(W, "ike@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"ike@" + dom: "delivered"}, e
        assert not first.sessions
        assert second.messages[0].tls
        skip, done = e["attempts"][0], e["attempts"][-1]
        assert skip["mx_host"] == "mx1." + dom
        assert skip["result"] == "next_mx"
        assert skip["policy"]["result_type"] == "validation-failure"
        assert done["mx_host"] == "mx2." + dom
        assert (done["tls_level"], done["result"]) == ("verify", "delivered")
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("cert,result_type", [
    ("untrusted", "certificate-not-trusted"),
    ("wrong-name", "certificate-host-mismatch"),
    ("expired", "certificate-expired"),
    ("no-starttls", "starttls-not-supported"),
])
def test_sts_enforce_tls_failure_defers(W, hosts, cert, result_type):
    """RFC 8461, 4.2 and 5: under enforce the MX must offer STARTTLS
    (RFC-NOTES) and its certificate must chain to a trusted root and name
    the MX host; else nothing is sent, not even in clear, the message is
    deferred, and the RFC 8460 result type is recorded (4.3.2.1)."""
    dom = unique("stscert")
    name = "mx." + dom
    pair = {"untrusted": lambda: W.ca.untrusted.issue([name]),
            "wrong-name": lambda: W.ca.mismatched("other.invalid"),
            "expired": lambda: W.ca.issue([name], expired=True),
            "no-starttls": lambda: None}[cert]()
    sink = SmtpSink(tls=pair)
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom)
        qid = send(W, "dee@" + dom)
        e = first_deferral(W, qid)
        a = e["attempts"][0]
        assert a["tls_level"] == "verify" and a["tls_rule"] == 3
        assert a["tls_result_type"] == result_type
        assert e["recipients"][0]["state"] == "deferred"
        nothing_in_clear(sink)
        assert not any(t for s in sink.sessions for t in s.transactions)
        api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        sink.stop()


def test_sts_testing_delivers_and_records_the_failure(W, hosts):
    """RFC 8461, 5: testing: deliver as without a policy, and record what
    would have failed (RFC 8460: validation-failure for the MX)."""
    settings(W.inst, starttls_outbound=True)
    dom = unique("ststest")
    sink = SmtpSink(tls=W.ca.untrusted.issue(["mx." + dom]))
    try:
        W.sink_mx(sink, dom)
        pid = publish(W, hosts, dom, mode="testing",
                      mx=("mail.elsewhere.test",))
        qid = send(W, "eve@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"eve@" + dom: "delivered"}
        a = e["attempts"][-1]
        assert a["tls_level"] == "may" and a["starttls"] is True
        assert a["policy"]["mode"] == "testing" and a["policy"]["id"] == pid
        assert a["policy"]["result_type"] == "validation-failure"
        assert a["tls_result_type"] == "certificate-not-trusted"
    finally:
        sink.stop()


def test_sts_setting_off_ignores_policies(W, hosts):
    """The reference page's "MTA-STS" setting off: an enforce policy whose
    MX list does not match is ignored, the mail is delivered."""
    dom = unique("stsoff")
    sink = SmtpSink()
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom, mx=("mail.elsewhere.test",))
        settings(W.inst, mta_sts_enabled=False)
        qid = send(W, "fin@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"fin@" + dom: "delivered"}
        assert e["attempts"][-1]["policy"]["type"] == "no-policy-found"
    finally:
        settings(W.inst, mta_sts_enabled=True)
        sink.stop()


@pytest.mark.parametrize("site,result_type,why", [
    ({"status": 404}, "sts-policy-fetch-error", "404"),
    ({"content_type": "text/html"}, "sts-policy-invalid", "text/html"),
    ({"cert": "expired"}, "sts-webpki-invalid", "expired"),
])
def test_sts_fetch_error_delivers_as_without_policy(W, hosts, site,
                                                    result_type, why):
    """RFC 8461, 5.1: a policy that cannot be fetched (HTTP 404), is not
    valid (not text/plain, 3.2) or comes from a host whose certificate
    fails (3.3) means delivery as without one; the attempt records the
    RFC 8460 result type (4.3.1.1, 4.3.1.2, 4.3.1.3) and the reason."""
    dom = unique("stsfail")
    sink = SmtpSink()
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom, **site)
        qid = send(W, "gil@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"gil@" + dom: "delivered"}
        p = e["attempts"][-1]["policy"]
        assert p["type"] == "sts" and p["id"] is None
        assert p["result_type"] == result_type
        assert why in p["reason"], p
    finally:
        sink.stop()


def test_sts_policy_domain_of_a_route_is_the_relay_host(W, hosts):
    """Issue 4, item 2 (RFC 8461, 3.4): through a route, the policy is the
    relay host's, and the relay host is matched against it."""
    relay = "relay." + unique("stsrt")
    dom = unique("routed")
    sink = tls_sink(W, relay)
    try:
        W.host(relay, sink.host)
        publish(W, hosts, relay, mx=(relay,))
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/routes",
                    json={"domain": dom, "relay": "%s:25" % relay})
            assert r.status_code == 201, r.text
        qid = send(W, "hal@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"hal@" + dom: "delivered"}
        a = e["attempts"][-1]
        assert a["tls_level"] == "verify" and a["tls_rule"] == 3
        assert a["policy"]["domain"] == relay
        assert sink.messages[0].tls
        api(W.inst, "DELETE", "/api/v1/routes/%s" % r.json()["id"])
    finally:
        sink.stop()


# ------------------------------------------------------- REQUIRETLS

def test_requiretls_to_a_second_sg_is_delivered_with_the_keyword(
        W, hosts):
    """RFC 8689, 4.1: sg -> a second sg (which advertises REQUIRETLS after
    STARTTLS): every requirement met, MAIL FROM:<...> REQUIRETLS sent; the
    second sg flags the message from the parameter."""
    dom = unique("rtsg")
    mxname = "mx." + dom
    # an address whose port 25 is free now: the sinks of this module's
    # fixtures take theirs from the same cycle of 127.0.0.10..250
    ip = loopback_host(25)
    base = sgtest.make_tmp("sgrt2-")
    pg2 = sgtest.start_postgres(base)
    cert_file, key_file = W.ca.issue([mxname])
    other = None
    try:
        other = sgtest.start_sg(pg2, W.redis, hostname=mxname,
                                extra_mail_server="listen %s:25;" % ip)
        cid = sgtest.store_certificate(pg2.conninfo, open(cert_file).read(),
                                       open(key_file).read(), mxname,
                                       activate=True)
        assert cid
        r = api(other, "POST", "/api/v1/domains",
                json={"name": dom, "internal_server": "127.0.0.1:9"})
        assert r.status_code == 201, r.text
        W.mx(dom, (mxname, ip, 10))
        publish(W, hosts, dom)

        def offers_requiretls():
            import smtplib
            import ssl
            with smtplib.SMTP(ip, 25, timeout=10) as s:
                s.starttls(context=ssl._create_unverified_context())
                s.ehlo("probe.test")
                cert = s.sock.getpeercert(binary_form=True)
                return (s.has_extn("requiretls")
                        and cert == _der(cert_file))
        wait_for(offers_requiretls, timeout=20,
                 message="the second sg offers REQUIRETLS with the CA's cert")

        qid = flagged_send(W, "ida@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"ida@" + dom: "delivered"}, e
        a = e["attempts"][-1]
        assert a["tls_rule"] == 1 and a["tls_level"] == "verify"
        assert a["requirements"] == {
            "mx_validated": "ok: MTA-STS policy in enforce mode",
            "starttls": "ok", "certificate": "ok",
            "requiretls_offered": "ok"}
        conn = pg2.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT requiretls, requiretls_sources"
                            " FROM messages")
                got = cur.fetchall()
        finally:
            conn.close()
        assert got == [(True, ["parameter"])]
    finally:
        if other is not None:
            sgtest.finish_sg(other)
        pg2.stop()
        sgtest.remove_tmp(base)


def _der(cert_file):
    import ssl
    return ssl.PEM_cert_to_DER_cert(open(cert_file).read())


def test_requiretls_to_postfix_bounces_5_7_30_headers_only(W, hosts):
    """RFC 8689, 4.1 and 5: Postfix does not offer REQUIRETLS: no MAIL is
    sent, the sender gets a bounce with 5.7.30 naming the MX and the
    requirement; RFC 8689, 5: the bounce has the headers only, from
    MAIL FROM:<>."""
    dom = unique("rtpf")
    cert = W.ca.issue(["mx." + dom])
    with PostfixMX(domains=[dom], tls=cert, hostname="mx." + dom) as pf:
        W.mx(dom, ("mx." + dom, pf.host, 10))
        publish(W, hosts, dom)
        body = "Subject: secret\r\n\r\nthe secret body text\r\n"
        bounced = metric(W, 'sg_requiretls_bounces_total{status="5.7.30"}')
        qid = send(W, "jo@" + dom, starttls=True,
                   mail_options=["REQUIRETLS", "RET=FULL"],
                   msg="From: alice@sender.test\r\nTo: jo@%s\r\n%s"
                   % (dom, body))
        e = bounce_of(W, qid)
        r = e["recipients"][0]
        assert r["dsn_status"] == "5.7.30"
        assert metric(W, 'sg_requiretls_bounces_total{status="5.7.30"}') \
            == bounced + 1
        assert "mx.%s" % dom in r["last_reply"]
        assert "REQUIRETLS" in r["last_reply"]
        assert e["attempts"][-1]["requirements"]["requiretls_offered"] \
            == "failed"
        time.sleep(0.5)
        assert not pf.messages()
        (txn,) = dsns_for(W, qid)
        assert txn.mail_from == ""
        msg, rcpts, parts = dsn_parts(txn)
        assert rcpts[0]["Status"] == "5.7.30"
        assert "mx.%s" % dom in rcpts[0]["Diagnostic-Code"]
        assert parts[2].get_content_type() == "text/rfc822-headers"
        assert b"the secret body text" not in txn.data
        assert b"Subject: secret" in txn.data
        # RFC 8689, 5: the sender's MX offers no REQUIRETLS: the bounce
        # is sent all the same, without the keyword
        assert "REQUIRETLS" not in txn.mail_line.upper()


@pytest.mark.parametrize("outbound,back_tls", [
    (True, "ok"), (False, "ok"), (False, "handshake-fails"),
    (True, "handshake-fails")])
def test_bounce_of_a_flagged_message_carries_requiretls_when_offered(
        W, hosts, outbound, back_tls):
    """RFC 8689, 5: the non-delivery report of a flagged message is sent
    with MAIL FROM:<> REQUIRETLS when the sender's MX offers it; STARTTLS
    is tried for it even with "STARTTLS whenever possible" off, since
    only the post-TLS EHLO tells whether the next hop supports it; and it
    is "not discarded": when that TLS handshake fails (TLS 1.1 only, an
    alert), it goes again at once in clear, without the keyword."""
    settings(W.inst, starttls_outbound=outbound, tls_failure_fallback=False)
    snd = unique("rtsnd")
    if back_tls == "ok":
        back = tls_sink(W, "mx." + snd, ehlo_tls=RT_EHLO)
    else:
        back = SmtpSink(tls=W.ca.issue(["mx." + snd]), ehlo_tls=RT_EHLO,
                        tls_min_version="TLSv1", tls_max_version="TLSv1.1")
    try:
        W.sink_mx(back, snd)
        dom = unique("rtnop")               # no policy: 5.7.10
        sink = SmtpSink()
        try:
            W.sink_mx(sink, dom)
            qid = flagged_send(W, "rae@" + dom, sender="sam@" + snd)
            e = bounce_of(W, qid)
            assert e["recipients"][0]["dsn_status"] == "5.7.10"
            back.wait_messages(1, timeout=30)
            (txn,) = back.messages
            assert txn.mail_from == ""
            if back_tls == "ok":
                assert txn.tls
                assert txn.mail_line.upper().endswith(" REQUIRETLS")
            else:
                assert not txn.tls
                assert "REQUIRETLS" not in txn.mail_line.upper()
                assert "STARTTLS" in [c.verb for ss in back.sessions
                                      for c in ss.commands]
            _, rcpts, parts = dsn_parts(txn)
            assert rcpts[0]["Status"] == "5.7.10"
            assert parts[2].get_content_type() == "text/rfc822-headers"
            nothing_in_clear(sink)
        finally:
            sink.stop()
    finally:
        settings(W.inst, starttls_outbound=False, tls_failure_fallback=True)
        back.stop()


@pytest.mark.parametrize("case", [
    "no-policy", "testing-policy", "untrusted", "name-mismatch",
    "no-starttls", "whitelist", "failure-list", "no-requiretls",
])
def test_requiretls_each_requirement_failing(W, hosts, case):
    """RFC 8689, 4.1: each requirement of the reference page's list,
    failing alone: the message bounces (5.7.10 without usable TLS, 5.7.30
    without REQUIRETLS at the next hop), the diagnostic names the MX and
    the requirement, and nothing crosses the wire in clear (the STARTTLS
    whitelist and the hourly failure list never apply)."""
    settings(W.inst, starttls_outbound=True, tls_failure_fallback=True)
    dom = unique("rt" + case.replace("-", "")[:6])
    name = "mx." + dom
    kw = {"ehlo_tls": RT_EHLO}
    mode = "enforce"
    if case == "untrusted":
        kw["tls"] = W.ca.untrusted.issue([name])
    elif case == "name-mismatch":
        kw["tls"] = W.ca.mismatched("other.invalid")
    elif case == "no-starttls":
        kw = {"ehlo": DEFAULT_EHLO}
    elif case == "failure-list":
        # a TLS failure (a protocol version alert; a closed connection
        # would be transient)
        kw = {"tls": W.ca.issue([name]), "tls_min_version": "TLSv1",
              "tls_max_version": "TLSv1.1", "ehlo_tls": RT_EHLO}
    elif case == "no-requiretls":
        kw = {"tls": W.ca.issue([name])}
    else:
        kw["tls"] = W.ca.issue([name])
    if case == "testing-policy":
        mode = "testing"
    sink = SmtpSink(**kw)
    wl = None
    try:
        W.sink_mx(sink, dom)
        if case != "no-policy":
            publish(W, hosts, dom, mode=mode)
        if case == "whitelist":
            # whitelisted, and offering no STARTTLS: never sent in clear
            sink.ehlo = list(DEFAULT_EHLO)
            with list_change(W.inst):
                r = api(W.inst, "POST", "/api/v1/starttls/whitelist",
                        json={"value": name})
                assert r.status_code == 201, r.text
                wl = r.json()["id"]
        if case == "failure-list":
            # on the hourly list, as a failed handshake puts it there
            exp = int(time.time()) + 3600
            W.redis.client().set(
                "sg:tls-failure:" + name,
                json.dumps({"host": name, "ip": sink.host,
                            "reason": "the TLS handshake failed",
                            "failed_at": "2026-01-01T00:00:00Z",
                            "expires_at": time.strftime(
                                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))}),
                exat=exp)
            fl = api(W.inst, "GET", "/api/v1/tls-failures").json()["items"]
            assert name in [i["host"] for i in fl]
        qid = flagged_send(W, "kim@" + dom)
        e = bounce_of(W, qid)
        r = e["recipients"][0]
        want = "5.7.30" if case == "no-requiretls" else "5.7.10"
        assert r["dsn_status"] == want, r
        assert name in r["last_reply"]
        why = {"no-policy": "validated neither",
               "testing-policy": "validated neither",
               "untrusted": "certificate verification failed",
               "name-mismatch": "does not name",
               "no-starttls": "STARTTLS is required but not offered",
               "whitelist": "STARTTLS is required but not offered",
               "failure-list": name,
               "no-requiretls": "REQUIRETLS is required but not offered",
               }[case]
        assert why in r["last_reply"], r["last_reply"]
        assert all(a["result"] != "retry_clear" for a in e["attempts"])
        req = e["attempts"][-1]["requirements"]
        failed = {"no-policy": "mx_validated",
                  "testing-policy": "mx_validated",
                  "untrusted": "certificate",
                  "name-mismatch": "certificate",
                  "no-starttls": "starttls", "whitelist": "starttls",
                  "failure-list": "starttls",
                  "no-requiretls": "requiretls_offered"}[case]
        assert req[failed] == "failed", req
        if case == "failure-list":
            # the hourly list does not apply: STARTTLS was tried
            assert "STARTTLS" in [c.verb for ss in sink.sessions
                                  for c in ss.commands]
        nothing_in_clear(sink)
        (txn,) = dsns_for(W, qid)
        _, rcpts, _ = dsn_parts(txn)
        assert rcpts[0]["Status"] == want
    finally:
        if wl is not None:
            api(W.inst, "DELETE", "/api/v1/starttls/whitelist/%s" % wl)
        sink.stop()


def test_requiretls_whitelisted_mx_still_gets_verified_tls(W, hosts):
    """RFC 8689, 4.1: the STARTTLS whitelist does not apply to a flagged
    message: a whitelisted MX offering everything gets STARTTLS and
    MAIL FROM:<...> REQUIRETLS."""
    dom = unique("rtwl")
    sink = tls_sink(W, "mx." + dom, ehlo_tls=RT_EHLO)
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom)
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/starttls/whitelist",
                    json={"value": dom})
            assert r.status_code == 201, r.text
        qid = flagged_send(W, "lee@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"lee@" + dom: "delivered"}
        (line,) = mail_lines(sink)
        assert line.upper().endswith(" REQUIRETLS")
        assert sink.messages[0].tls
        api(W.inst, "DELETE", "/api/v1/starttls/whitelist/%s"
            % r.json()["id"])
    finally:
        sink.stop()


@pytest.mark.parametrize("how", ["greeting-421", "closed-in-handshake",
                                 "starttls-454", "ehlo-421-after-tls"])
def test_requiretls_transient_failure_defers(W, hosts, how):
    """Issue 6, item 1: "transient failures (timeouts, 4xx) defer as
    usual": a 421 greeting, the connection closed in the TLS handshake, a
    454 to STARTTLS (RFC 3207, 4: TLS not available for a temporary
    reason) or a 421 to the EHLO after TLS defers a flagged message; it is
    not bounced, its requirements say what was not reached, and once the
    host is well it is delivered with REQUIRETLS."""
    dom = unique("rttr")
    name = "mx." + dom
    kw = {"tls": W.ca.issue([name]), "ehlo_tls": RT_EHLO}
    if how == "greeting-421":
        kw["banner"] = "421 4.3.2 busy, later"
    elif how == "closed-in-handshake":
        kw["tls_fail"] = True
    elif how == "starttls-454":
        kw["replies"] = {"STARTTLS": "454 4.7.0 TLS not available now"}
    else:
        kw["replies"] = {"EHLO": lambda sess, cmd:
                         "421 4.3.2 going down" if sess.tls else None}
    sink = SmtpSink(**kw)
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom)
        qid = flagged_send(W, "tia@" + dom)
        e = first_deferral(W, qid)
        assert e["recipients"][0]["state"] == "deferred", e
        req = e["attempts"][0]["requirements"]
        assert req["mx_validated"].startswith("ok")
        assert "failed" not in req.values(), req
        if how == "ehlo-421-after-tls":
            assert req["starttls"] == "ok" and req["certificate"] == "ok"
            assert req["requiretls_offered"] == "not reached"
        elif how == "greeting-421":
            assert req["starttls"] == "not reached", req
        else:
            assert "transient" in req["starttls"], req
        nothing_in_clear(sink)
        assert not dsns_for_now(W, qid)
        sink.tls_fail = False
        sink.replies = {}
        sink.banner = None
        assert api(W.inst, "POST",
                   "/api/v1/queue/%s/retry" % qid).status_code in (200, 202)
        e = wait_final(W, qid)
        assert states(e) == {"tia@" + dom: "delivered"}
        assert mail_lines(sink)[-1].upper().endswith(" REQUIRETLS")
    finally:
        sink.stop()


def dsns_for_now(W, qid):
    return [t for t in W.dsn_sink.messages
            if qid in t.data.decode("utf-8", "replace")]


def test_requiretls_starttls_refused_with_5xx_bounces(W, hosts):
    """RFC 8689, 4.1: STARTTLS must succeed; a permanent refusal (5xx) is
    that requirement failing: 5.7.10, naming the MX and STARTTLS."""
    dom = unique("rt5xx")
    sink = tls_sink(W, "mx." + dom, ehlo_tls=RT_EHLO,
                    replies={"STARTTLS": "554 5.7.0 no TLS here"})
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom)
        qid = flagged_send(W, "uma@" + dom)
        e = bounce_of(W, qid)
        r = e["recipients"][0]
        assert r["dsn_status"] == "5.7.10", r
        assert "mx." + dom in r["last_reply"]
        assert "554 5.7.0 no TLS here" in r["last_reply"]
        assert e["attempts"][-1]["requirements"]["starttls"] == "failed"
        nothing_in_clear(sink)
    finally:
        sink.stop()


def test_requiretls_walks_to_the_next_mx_that_qualifies(W, hosts):
    """RFC 8689, 4.1: "otherwise try the next MX": the first MX lacks the
    REQUIRETLS keyword, the second qualifies: delivered there with
    REQUIRETLS; the first got no MAIL, and its attempt names the failed
    requirement."""
    dom = unique("rtwalk")
    first = tls_sink(W, "mx1." + dom)               # no REQUIRETLS
    second = tls_sink(W, "mx2." + dom, ehlo_tls=RT_EHLO)
    try:
        W.mx(dom, ("mx1." + dom, first.host, 10),
             ("mx2." + dom, second.host, 20))
        publish(W, hosts, dom, mx=("mx1." + dom, "mx2." + dom))
        qid = flagged_send(W, "val@" + dom)
        e = wait_final(W, qid)
        assert states(e) == {"val@" + dom: "delivered"}, e
        nothing_in_clear(first)
        assert mail_lines(second)[-1].upper().endswith(" REQUIRETLS")
        by_mx = {a["mx_host"]: a for a in e["attempts"]}
        assert by_mx["mx1." + dom]["result"] == "next_mx"
        assert by_mx["mx1." + dom]["requirements"]["requiretls_offered"] \
            == "failed"
        assert by_mx["mx2." + dom]["requirements"]["requiretls_offered"] \
            == "ok"
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("fails,status", [
    (("no-requiretls", "untrusted"), "5.7.30"),
    (("untrusted", "no-starttls"), "5.7.10"),
    (("no-requiretls", "busy"), None)])
def test_requiretls_every_mx_failing(W, hosts, fails, status):
    """RFC 8689, 4.1: when no MX qualifies nothing is transmitted and the
    bounce names each MX and the requirement it failed: 5.7.30 when a host
    lacked only the REQUIRETLS keyword, else 5.7.10 (docs/design.md); a
    transient failure at one MX (a 421 greeting) defers instead."""
    dom = unique("rtall")
    names = ("mx1." + dom, "mx2." + dom)
    why = {"no-requiretls": "REQUIRETLS is required but not offered",
           "untrusted": "certificate verification failed",
           "no-starttls": "STARTTLS is required but not offered"}
    sinks = []
    try:
        for name, how in zip(names, fails):
            if how == "no-requiretls":
                sinks.append(tls_sink(W, name))
            elif how == "untrusted":
                sinks.append(SmtpSink(tls=W.ca.untrusted.issue([name]),
                                      ehlo_tls=RT_EHLO))
            elif how == "no-starttls":
                sinks.append(SmtpSink(ehlo=DEFAULT_EHLO))
            else:
                sinks.append(tls_sink(W, name, ehlo_tls=RT_EHLO,
                                      banner="421 4.3.2 busy, later"))
        W.mx(dom, (names[0], sinks[0].host, 10),
             (names[1], sinks[1].host, 20))
        publish(W, hosts, dom, mx=names)
        qid = flagged_send(W, "wes@" + dom)
        if status is None:
            e = wait_entry(W, qid, lambda e: len(e["attempts"]) >= 2
                           and e["recipients"][0]["state"] == "deferred")
            assert e["recipients"][0]["state"] == "deferred", e
            assert not dsns_for_now(W, qid)
            # no retries for the rest of the module
            api(W.inst, "DELETE", "/api/v1/queue/" + qid)
        else:
            e = bounce_of(W, qid)
            r = e["recipients"][0]
            assert r["dsn_status"] == status, r
            for name, how in zip(names, fails):
                assert name in r["last_reply"], r
                assert why[how] in r["last_reply"], r
            (txn,) = dsns_for(W, qid)
            _, rcpts, _ = dsn_parts(txn)
            assert rcpts[0]["Status"] == status
            for name in names:
                assert name in rcpts[0]["Diagnostic-Code"]
        for sink in sinks:
            nothing_in_clear(sink)
    finally:
        for sink in sinks:
            sink.stop()


def test_requiretls_walk_limit_defers_instead_of_bouncing(W, hosts):
    """RFC 8689, 4.1 bounces only when no MX qualifies: when
    sg_delivery_mx_session_limit stops the walk after a first MX that
    failed a requirement, a later MX was never tried, so the flagged
    message is deferred (docs/directives.md), not bounced."""
    dom = unique("rtlim")
    first = tls_sink(W, "mx1." + dom)               # no REQUIRETLS
    second = tls_sink(W, "mx2." + dom, ehlo_tls=RT_EHLO)
    conf = W.conf + "sg_delivery_mx_session_limit 1;\n"
    try:
        with W.instance(extra_main=conf):
            W.mx(dom, ("mx1." + dom, first.host, 10),
                 ("mx2." + dom, second.host, 20))
            publish(W, hosts, dom, mx=("mx1." + dom, "mx2." + dom))
            qid = flagged_send(W, "yul@" + dom)
            e = first_deferral(W, qid)
            r = e["recipients"][0]
            assert r["state"] == "deferred", e
            assert "sg_delivery_mx_session_limit" in r["last_reply"], r
            assert not dsns_for_now(W, qid)
            assert not second.sessions
            api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("source", ["parameter", "rule", "address"])
def test_requiretls_each_flag_source(W, hosts, source):
    """Issue 6: a message flagged by the MAIL parameter (RFC 8689, 4), by a
    content filter rule, or by a <local>+requiretls@ recipient (the
    reference page) is sent with MAIL FROM:<...> REQUIRETLS, and the
    queue entry says where the flag came from."""
    dom = unique("rtsrc")
    sink = tls_sink(W, "mx." + dom, ehlo_tls=RT_EHLO)
    rule = None
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom)
        delivered = metric(W, "sg_requiretls_deliveries_total")
        if source == "parameter":
            qid = flagged_send(W, "ned@" + dom)
            want = ["parameter"]
        elif source == "rule":
            with list_change(W.inst):
                r = api(W.inst, "POST", "/api/v1/content-filter/rules",
                        json={"conditions": [{"field": "recipient",
                                              "match": "contains",
                                              "value": "@" + dom}],
                              "action": "flag_requiretls"})
                assert r.status_code == 201, r.text
                rule = r.json()["id"]
            qid = send(W, "ned@" + dom)
            want = ["rule:%d" % rule]
        else:
            qid = send(W, "ned+requiretls@" + dom)
            want = ["address:ned+requiretls@" + dom]
        e = wait_final(W, qid)
        assert e["requiretls"] == {"flagged": True, "sources": want}
        assert states(e) == {"ned@" + dom: "delivered"}
        (txn,) = sink.messages
        assert txn.mail_line.upper().endswith(" REQUIRETLS")
        assert [r.address for r in txn.rcpts] == ["ned@" + dom]
        assert txn.tls
        assert metric(W, "sg_requiretls_deliveries_total") == delivered + 1
    finally:
        if rule is not None:
            api(W.inst, "DELETE", "/api/v1/content-filter/rules/%d" % rule)
        sink.stop()


def test_requiretls_disabled_delivers_as_unflagged(W, hosts):
    """The reference page: with REQUIRETLS disabled, flagged messages are
    "treated as if the service is disabled": a flagged message deferred
    while it was on is then delivered without the keyword to an MX that
    does not offer REQUIRETLS (enforce policy: verified TLS still)."""
    dom = unique("rtoff")
    sink = tls_sink(W, "mx." + dom, banner="421 4.3.2 busy, later")
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom)
        qid = flagged_send(W, "ola@" + dom)
        e = first_deferral(W, qid)
        assert e["attempts"][0]["tls_rule"] == 1
        settings(W.inst, requiretls_enabled=False)
        sink.banner = None
        assert api(W.inst, "POST",
                   "/api/v1/queue/%s/retry" % qid).status_code in (200, 202)
        e = wait_final(W, qid)
        assert e["requiretls"]["flagged"] is True
        assert states(e) == {"ola@" + dom: "delivered"}
        assert e["attempts"][-1]["tls_rule"] == 3
        (txn,) = sink.messages
        assert txn.tls and "REQUIRETLS" not in txn.mail_line.upper()
    finally:
        settings(W.inst, requiretls_enabled=True)
        sink.stop()


@pytest.mark.parametrize("tls", ["untrusted", "handshake-fails"])
def test_tls_required_no_delivers_despite_failing_enforce(W, hosts, tls):
    """RFC 8689, 5: "TLS-Required: No": delivered although the enforce
    policy does not list the MX and the certificate is untrusted; STARTTLS
    is still attempted; the outcome is recorded. A handshake that fails
    (TLS 1.1 only: an alert, sg needs TLS 1.2) retries at once without
    STARTTLS (the hourly fallback setting), as for unflagged mail."""
    settings(W.inst, tls_failure_fallback=True)
    dom = unique("trn")
    if tls == "untrusted":
        sink = SmtpSink(tls=W.ca.untrusted.issue(["mx." + dom]))
    else:
        sink = SmtpSink(tls=W.ca.issue(["mx." + dom]),
                        tls_min_version="TLSv1", tls_max_version="TLSv1.1")
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom, mx=("mail.elsewhere.test",))
        qid = send(W, "pat@" + dom, msg=(
            "From: alice@sender.test\r\nTo: pat@%s\r\nTLS-Required: No\r\n"
            "Subject: relaxed\r\n\r\nbody\r\n" % dom))
        e = wait_final(W, qid)
        assert states(e) == {"pat@" + dom: "delivered"}, e
        first, a = e["attempts"][0], e["attempts"][-1]
        assert first["tls_level"] == "may" and first["tls_rule"] == 3
        assert a["policy"]["result_type"] == "validation-failure"
        if tls == "untrusted":
            assert first["starttls"] is True
            assert a["tls_result_type"] == "certificate-not-trusted"
            assert sink.messages[0].tls
        else:
            assert first["result"] == "retry_clear"
            assert not sink.messages[0].tls
    finally:
        api(W.inst, "DELETE", "/api/v1/tls-failures/mx." + dom)
        sink.stop()


def test_requiretls_disabled_bounce_honours_ret_full(W, hosts):
    """The reference page: REQUIRETLS disabled, a flagged message is an
    ordinary one, and so is its bounce: RET=FULL returns the whole message
    (RFC 3461, 4.3), not only the headers (RFC 8689, 5 applies only to
    REQUIRETLS messages)."""
    dom = unique("rtret")
    sink = tls_sink(W, "mx." + dom, banner="421 4.3.2 busy, later")
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom)
        qid = send(W, "xia@" + dom, starttls=True,
                   mail_options=["REQUIRETLS", "RET=FULL"],
                   msg="From: alice@sender.test\r\nTo: xia@%s\r\n"
                   "Subject: full\r\n\r\nthe whole body\r\n" % dom)
        first_deferral(W, qid)
        settings(W.inst, requiretls_enabled=False)
        sink.banner = None
        sink.rcpt_reply = "550 5.1.1 no such user"
        assert api(W.inst, "POST",
                   "/api/v1/queue/%s/retry" % qid).status_code in (200, 202)
        e = bounce_of(W, qid)
        assert e["requiretls"]["flagged"] is True
        (txn,) = dsns_for(W, qid)
        _, rcpts, parts = dsn_parts(txn)
        assert rcpts[0]["Status"] == "5.1.1"
        assert parts[2].get_content_type() == "message/rfc822"
        assert b"the whole body" in txn.data
    finally:
        settings(W.inst, requiretls_enabled=True)
        sink.stop()


@pytest.mark.parametrize("cert", ["good", "wrong-name"])
def test_requiretls_through_a_route_relay_host(W, hosts, cert):
    """Issue 6, item 1 and docs/design.md (our decision): a route's relay
    host is configured by the admin, not taken from an MX answer, so it
    counts as validated; STARTTLS, a certificate naming the relay host and
    the REQUIRETLS keyword are still required: delivered with REQUIRETLS,
    or, with a certificate for another name, bounced 5.7.10 naming it."""
    relay = "relay." + unique("rtrt")
    dom = unique("rtrouted")
    pair = W.ca.issue([relay]) if cert == "good" \
        else W.ca.mismatched("other.invalid")
    sink = SmtpSink(tls=pair, ehlo_tls=RT_EHLO)
    r = None
    try:
        W.host(relay, sink.host)
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/routes",
                    json={"domain": dom, "relay": "%s:25" % relay})
            assert r.status_code == 201, r.text
        qid = flagged_send(W, "yan@" + dom)
        e = wait_final(W, qid)
        a = e["attempts"][-1]
        assert a["mx_host"] == relay
        assert a["requirements"]["mx_validated"] \
            == "ok: a configured host, not from MX"
        if cert == "good":
            assert states(e) == {"yan@" + dom: "delivered"}, e
            assert mail_lines(sink)[-1].upper().endswith(" REQUIRETLS")
            assert a["requirements"]["requiretls_offered"] == "ok"
        else:
            assert e["recipients"][0]["state"] == "bounced", e
            assert e["recipients"][0]["dsn_status"] == "5.7.10"
            assert relay in e["recipients"][0]["last_reply"]
            assert a["requirements"]["certificate"] == "failed"
            nothing_in_clear(sink)
    finally:
        if r is not None and r.status_code == 201:
            api(W.inst, "DELETE", "/api/v1/routes/%s" % r.json()["id"])
        sink.stop()


@pytest.mark.parametrize("trusted,server", [
    (False, "no-keyword"), (True, "no-keyword"), (True, "keyword"),
    (True, "wrong-name"), (True, "no-starttls")])
def test_requiretls_to_a_local_domains_internal_server(W, hosts, trusted,
                                                       server):
    """Issue 6, item 5: a flagged message for a local domain's internal
    server follows the same rules (verified TLS to the configured host);
    "internal server is trusted for REQUIRETLS" relaxes only the
    REQUIRETLS keyword: without the setting a server lacking the keyword
    means 5.7.30; with it the message is delivered without the keyword,
    or with it when the server offers it, and a certificate for another
    name or no STARTTLS still bounce with 5.7.10."""
    dom = unique("rtloc")
    name = "internal." + dom
    if server == "wrong-name":
        sink = SmtpSink(tls=W.ca.mismatched("other.invalid"), port=2529)
    elif server == "no-starttls":
        sink = SmtpSink(port=2529)
    else:
        sink = tls_sink(W, name, port=2529,
                        ehlo_tls=RT_EHLO if server == "keyword" else None)
    r = None
    try:
        W.host(name, sink.host)
        with list_change(W.inst):
            r = api(W.inst, "POST", "/api/v1/domains",
                    json={"name": dom, "internal_server": "%s:2529" % name,
                          "requiretls_trusted": trusted})
            assert r.status_code == 201, r.text
        qid = send(W, "quin+requiretls@" + dom)
        e = wait_final(W, qid)
        req = e["attempts"][-1]["requirements"]
        assert req["mx_validated"].startswith("ok")
        if server in ("wrong-name", "no-starttls"):
            assert e["recipients"][0]["dsn_status"] == "5.7.10", e
            failed = "certificate" if server == "wrong-name" else "starttls"
            assert req[failed] == "failed", req
            nothing_in_clear(sink)
        elif trusted:
            assert states(e) == {"quin@" + dom: "delivered"}
            (txn,) = sink.messages
            assert txn.tls
            if server == "keyword":
                assert txn.mail_line.upper().endswith(" REQUIRETLS")
                assert req["requiretls_offered"] == "ok"
            else:
                assert "REQUIRETLS" not in txn.mail_line.upper()
                assert req["requiretls_offered"].startswith("not offered")
        else:
            assert e["recipients"][0]["dsn_status"] == "5.7.30"
            nothing_in_clear(sink)
    finally:
        if r is not None and r.status_code == 201:
            api(W.inst, "DELETE", "/api/v1/domains/%s" % r.json()["id"])
        sink.stop()


def test_local_domains_sharing_a_server_keep_their_own_trust(W, hosts):
    """Issue 6, item 5: "trusted for REQUIRETLS" is a per-domain setting:
    two local domains on one internal server (without the keyword), one
    trusted and one not: the trusted one's flagged message is delivered,
    the other's bounces with 5.7.30, whichever comes first."""
    a, b = unique("rtsha"), unique("rtshb")
    name = "internal." + unique("shared")
    sink = tls_sink(W, name, port=2529)
    ids = []
    try:
        W.host(name, sink.host)
        # one change at a time: a reload under way when the second
        # commits may not see it (the NOTIFY brings another)
        for dom, trusted in ((a, False), (b, True)):
            with list_change(W.inst):
                r = api(W.inst, "POST", "/api/v1/domains",
                        json={"name": dom,
                              "internal_server": "%s:2529" % name,
                              "requiretls_trusted": trusted})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
        qa = send(W, "una+requiretls@" + a)
        qb = send(W, "ben+requiretls@" + b)
        ea, eb = wait_final(W, qa), wait_final(W, qb)
        assert ea["recipients"][0]["dsn_status"] == "5.7.30", ea
        assert states(eb) == {"ben@" + b: "delivered"}, eb
        assert [t.rcpts[0].address for t in sink.messages] == ["ben@" + b]
    finally:
        for i in ids:
            api(W.inst, "DELETE", "/api/v1/domains/%s" % i)
        sink.stop()


def test_flagged_job_never_rides_a_connection_kept_without_requiretls(
        W, hosts):
    """RFC 8689, 4.1: a connection kept from an unflagged message to an
    MX without REQUIRETLS (enforce policy, verified TLS) is not used for a
    flagged message to the same domain: that one bounces 5.7.30 and the
    MX receives only the first."""
    dom = unique("rtkept")
    sink = tls_sink(W, "mx." + dom)
    conf = W.conf.replace("sg_delivery_idle_timeout 1s;",
                          "sg_delivery_idle_timeout 60s;")
    try:
        with W.instance(extra_main=conf):
            W.sink_mx(sink, dom)
            publish(W, hosts, dom)
            q1 = send(W, "vic@" + dom)
            assert states(wait_final(W, q1)) == {"vic@" + dom: "delivered"}
            q2 = flagged_send(W, "wil@" + dom)
            e = bounce_of(W, q2)
            assert e["recipients"][0]["dsn_status"] == "5.7.30", e
            assert [t.rcpts[0].address for t in sink.messages] \
                == ["vic@" + dom]
            assert len(sink.sessions) == 2, sink.sessions
    finally:
        sink.stop()


def test_requiretls_policy_fetch_failure_defers(W, hosts):
    """docs/design.md (our decision): an MTA-STS policy that cannot be
    fetched (HTTP 500) is a transient failure for a flagged message: it
    waits for the policy (RFC 8689, 4.1 needs an enforce policy to trust
    the MX) and is not bounced; nothing is sent."""
    dom = unique("rtfetch")
    sink = tls_sink(W, "mx." + dom, ehlo_tls=RT_EHLO)
    try:
        W.sink_mx(sink, dom)
        publish(W, hosts, dom, status=500)
        qid = flagged_send(W, "xan@" + dom)
        e = first_deferral(W, qid)
        a = e["attempts"][0]
        assert a["policy"]["result_type"] == "sts-policy-fetch-error"
        assert e["recipients"][0]["state"] == "deferred"
        assert not sink.sessions
        api(W.inst, "DELETE", "/api/v1/queue/" + qid)
    finally:
        sink.stop()


# ------------------------------------------------------------ limits

def test_mx_address_limit_bounds_the_walk(W):
    """sg_delivery_mx_address_limit: a domain with many unreachable MX
    hosts costs at most that many connection attempts per delivery; the
    recipient is deferred with the reason."""
    dom = unique("lim")
    # 127.0.0.251..254:25 have no listener: connection refused
    W.mx(dom, *[("mx%d.%s" % (i, dom), "127.0.0.%d" % (250 + i), 10 * i)
                for i in range(1, 5)])
    with W.instance(extra_main=DELIVERY_CONF
                    + "sg_delivery_mx_address_limit 2;\n"):
        qid = send(W, "una@" + dom)
        e = wait_entry(W, qid, lambda e: e["recipients"][0]["state"]
                       == "deferred" and e["attempts"])
        hosts = [a["mx_host"] for a in e["attempts"]]
        assert hosts[:2] == ["mx1." + dom, "mx2." + dom]
        assert "mx3." + dom not in hosts and "mx4." + dom not in hosts
        assert "sg_delivery_mx_address_limit (2)" in \
            e["recipients"][0]["last_reply"]
        api(W.inst, "DELETE", "/api/v1/queue/" + qid)


def test_domains_sharing_a_route_go_in_one_transaction(W):
    """Issue 4, item 1: recipients of one message and one destination go
    in one SMTP transaction: two domains routed to one relay host make one
    MAIL with both RCPTs (RFC 5321, 3.3)."""
    relay = SmtpSink(port=2530)
    ids = []
    try:
        d1, d2 = unique("shr"), unique("shr")
        # one change at a time: a reload under way when the second
        # commits may not see it (the NOTIFY brings another)
        for d in (d1, d2):
            with list_change(W.inst):
                r = api(W.inst, "POST", "/api/v1/routes",
                        json={"domain": d, "relay": "%s:2530" % relay.host})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
        qid = send(W, ["ann@" + d1, "bob@" + d2])
        e = wait_final(W, qid)
        assert states(e) == {"ann@" + d1: "delivered",
                             "bob@" + d2: "delivered"}
        assert len(relay.transactions) == 1, relay.dump()
        (txn,) = relay.messages
        assert sorted(r.address for r in txn.rcpts) == \
            sorted(["ann@" + d1, "bob@" + d2])
        assert len(e["attempts"]) == 1
        assert e["attempts"][0]["destination"] == \
            "route:%s:2530" % relay.host
    finally:
        for i in ids:
            api(W.inst, "DELETE", "/api/v1/routes/%s" % i)
        relay.stop()
