"""Self-tests of the receiving peers in peers.py (TestCA, SmtpSink,
PostfixMX, the client helpers), with Python's smtplib or raw sockets as the
client, so that the delivery tests can trust them. No sg instance here.
"""

import smtplib
import socket
import ssl
import threading
import time

import pytest

from peers import (PostfixMX, ReplySequence, SmtpSink, TestCA, loopback_host,
                   mail_text, peer_ca, send_via_smtp, smtp_sinks, tlsa,
                   wait_for)

# fixtures imported from peers
__all__ = ["peer_ca", "smtp_sinks"]

MX = "mx.example.test"
FROM = "sender@sg.test"
TO = "rcpt@example.test"
WAIT = 10


def read_reply(f):
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("closed after %r" % lines)
        lines.append(line.decode().rstrip("\r\n"))
        if line[3:4] != b"-":
            return int(lines[0][:3]), lines


def raw_session(sink):
    s = socket.create_connection(sink.address, timeout=WAIT)
    f = s.makefile("rb")
    assert read_reply(f)[0] == 220
    return s, f


def verified(ca, name=MX):
    ctx = ca.client_context()
    return dict(starttls=True, tls_context=ctx, server_name=name)


# ------------------------------------------------------------------ TestCA


def test_ca_good_certificate_verifies_and_sni_is_recorded(peer_ca, smtp_sinks):
    sink = smtp_sinks(tls=peer_ca.issue([MX, "mx2.example.test"]))
    qid = send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host,
                        **verified(peer_ca))
    (txn,) = sink.wait_messages(1)
    s = txn.session
    assert txn.queue_id == qid and txn.tls
    assert s.tls and s.sni == MX
    assert s.tls_version == "TLSv1.3" and s.tls_cipher


@pytest.mark.parametrize("kind, error", [
    ("expired", "certificate has expired"),
    ("not_yet_valid", "certificate is not yet valid"),
    ("untrusted", "unable to get local issuer certificate"),
    ("mismatched", "Hostname mismatch"),
    ("self_signed", "self-signed certificate"),
])
def test_ca_bad_certificates_fail_verification(peer_ca, smtp_sinks, kind, error):
    if kind == "expired":
        pair = peer_ca.issue([MX], expired=True)
    elif kind == "not_yet_valid":
        pair = peer_ca.issue([MX], not_yet_valid=True)
    elif kind == "untrusted":
        pair = peer_ca.untrusted.issue([MX])
    elif kind == "mismatched":
        pair = peer_ca.mismatched()
    else:
        pair = peer_ca.self_signed([MX])
    sink = smtp_sinks(tls=pair)
    with pytest.raises(ssl.SSLCertVerificationError) as e:
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host,
                      **verified(peer_ca))
    assert error in e.value.verify_message
    # the same certificate is fine when nothing is verified
    send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host,
                  starttls=True)
    sink.wait_messages(1)
    failed = sink.wait_sessions(2, closed=True)[0]
    assert failed.end == "tls failed" and failed.tls_error


def test_ca_ip_san_intermediate_and_key_types(peer_ca, smtp_sinks):
    inter = peer_ca.intermediate()
    host = loopback_host()
    for pair, name in ((peer_ca.issue([host]), host),           # IP SAN
                       (inter.issue([MX], key_type="ec"), MX),  # chain + ECDSA
                       (peer_ca.issue([MX], key_type="ed25519"), MX)):
        sink = smtp_sinks(host=host, tls=pair)
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=host,
                      **verified(peer_ca, name))
        sink.wait_messages(1)
        sink.stop()
    with open(inter.issue(["x.test"])[0]) as f:
        assert f.read().count("BEGIN CERTIFICATE") == 2
    usage, selector, mtype, data = tlsa(pair[0])
    assert (usage, selector, mtype) == (3, 1, 1) and len(data) == 64


def test_tls_version_limits(peer_ca, smtp_sinks):
    sink = smtp_sinks(tls=peer_ca.issue([MX]), tls_max_version="TLSv1.2")
    send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host,
                  **verified(peer_ca))
    assert sink.wait_messages(1)[0].session.tls_version == "TLSv1.2"
    ctx = peer_ca.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(ssl.SSLError):
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host,
                      starttls=True, tls_context=ctx, server_name=MX)


# ---------------------------------------------------------------- SmtpSink


def test_sink_plain_records_envelope_and_unstuffed_data(smtp_sinks):
    sink = smtp_sinks()
    body = "first\n.leading dot\n..two dots\n.\nlast\n"
    msg = mail_text(FROM, [TO, "b@example.test"], subject="plain", body=body)
    qid = send_via_smtp(sink.port, FROM, [TO, "b@example.test"], msg,
                        host=sink.host, mail_options=["SIZE=%d" % len(msg), "BODY=8BITMIME"],
                        rcpt_options=["NOTIFY=FAILURE,DELAY"])
    (txn,) = sink.wait_messages(1)
    assert qid and txn.queue_id == qid
    assert txn.mail_from == FROM
    assert txn.mail_params == {"SIZE": str(len(msg)), "BODY": "8BITMIME"}
    assert txn.mail_line == "mail FROM:<%s> SIZE=%d BODY=8BITMIME" % (FROM, len(msg))
    assert [r.address for r in txn.rcpts] == [TO, "b@example.test"]
    assert txn.rcpts[0].params == {"NOTIFY": "FAILURE,DELAY"}
    assert txn.data == msg.encode()
    assert txn.message["Subject"] == "plain"
    assert txn.message.get_content() == body.replace("\n", "\r\n")
    s = txn.session
    assert b"\r\n...two dots\r\n..\r\n" in s.raw_clear     # stuffed on the wire
    assert s.raw_clear.endswith(b"\r\n.\r\nQUIT\r\n") or s.raw_clear.endswith(b"\r\n.\r\n")
    assert s.raw_tls == b"" and not s.tls and s.helo == "client.test"
    assert s.verbs[:4] == ["EHLO", "MAIL", "RCPT", "RCPT"]
    assert not any(c.pipelined for c in s.commands)
    sink.wait_sessions(1, closed=True)
    assert s.end == "quit"


def test_sink_starttls_separates_clear_and_tls_bytes(peer_ca, smtp_sinks):
    sink = smtp_sinks(tls=peer_ca.issue([MX]),
                      ehlo_tls=["PIPELINING", "REQUIRETLS", "ENHANCEDSTATUSCODES"])
    with smtplib.SMTP(sink.host, sink.port, timeout=WAIT) as c:
        c.ehlo()
        assert c.has_extn("starttls") and not c.has_extn("requiretls")
        c._host = MX
        c.starttls(context=peer_ca.client_context())
        c.ehlo()
        assert c.has_extn("requiretls") and not c.has_extn("starttls")
        c.sendmail(FROM, [TO], mail_text(), mail_options=["REQUIRETLS"])
    (txn,) = sink.wait_messages(1)
    s = txn.session
    assert s.raw_clear.endswith(b"STARTTLS\r\n")
    assert b"MAIL" not in s.raw_clear.upper()
    assert s.raw_tls.startswith(b"ehlo ") and b"REQUIRETLS" in s.raw_tls
    assert txn.mail_params == {"REQUIRETLS": None}
    assert [c.tls for c in s.commands] == [False, False] + [True] * (len(s.commands) - 2)


@pytest.mark.parametrize("mode", [True, "garbage"])
def test_sink_tls_fail(peer_ca, smtp_sinks, mode):
    sink = smtp_sinks(tls_fail=mode)
    with smtplib.SMTP(sink.host, sink.port, timeout=WAIT) as c:
        c.ehlo()
        assert c.has_extn("starttls")
        with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPServerDisconnected)):
            c.starttls(context=peer_ca.client_context(check_hostname=False))
    (s,) = sink.wait_sessions(1, closed=True)
    assert s.end == "tls failed" and not s.tls
    assert s.commands[-1].verb == "STARTTLS" and s.commands[-1].reply.startswith("220")


def test_sink_capabilities_helo_only_and_banner(smtp_sinks, peer_ca):
    sink = smtp_sinks(tls=peer_ca.issue([MX]), ehlo=["8BITMIME"])   # STARTTLS withheld
    with smtplib.SMTP(sink.host, sink.port, timeout=WAIT) as c:
        c.ehlo()
        assert c.esmtp_features == {"8bitmime": ""}
        assert c.docmd("STARTTLS")[0] == 220     # accepted though not offered

    sink = smtp_sinks(helo_only=True)
    send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host)
    s = sink.wait_messages(1)[0].session
    assert s.commands[0].verb == "EHLO" and s.commands[0].reply.startswith("502")
    assert s.helo_verb == "HELO"

    sink = smtp_sinks(banner="554 5.3.2 no service for you")
    with pytest.raises(smtplib.SMTPConnectError) as e:
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host)
    assert e.value.smtp_code == 554
    sink = smtp_sinks(banner="421 4.3.2 busy")
    with pytest.raises((smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected)):
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host)
    assert sink.wait_sessions(1, closed=True)[0].end == "421"


def test_sink_no_tls_configured_refuses_starttls(smtp_sinks):
    sink = smtp_sinks()
    with smtplib.SMTP(sink.host, sink.port, timeout=WAIT) as c:
        c.ehlo()
        assert not c.has_extn("starttls")
        assert c.docmd("STARTTLS")[0] == 502


def test_sink_per_recipient_mail_and_final_replies(smtp_sinks):
    sink = smtp_sinks(rcpt_replies={"Gone@example.test": "550 5.1.1 no such user",
                                    "later@example.test": "450 4.2.1 try later\n"
                                                          "450 4.2.1 really"})
    rcpts = [TO, "gone@example.test", "later@example.test"]
    send_via_smtp(sink.port, FROM, rcpts, mail_text(), host=sink.host,
                  allow_refused=True)
    (txn,) = sink.wait_messages(1)
    assert txn.accepted_rcpts == [TO]
    assert [r.reply for r in txn.rcpts] == [
        "250 2.1.5 Ok", "550 5.1.1 no such user",
        "450-4.2.1 try later\r\n450 4.2.1 really"]

    sink = smtp_sinks(mail_reply="451 4.7.1 greylisted")
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host)
    assert e.value.smtp_code == 451

    sink = smtp_sinks(final_reply="452 4.3.1 full")
    with pytest.raises(smtplib.SMTPDataError) as e:
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host)
    assert e.value.smtp_code == 452
    (txn,) = sink.transactions
    assert txn.complete and not txn.accepted and sink.messages == []

    sink = smtp_sinks(final_reply=ReplySequence("451 4.3.0 later", "250 2.0.0 Ok: queued as ABC123"))
    with pytest.raises(smtplib.SMTPDataError):
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host)
    assert send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host) == "ABC123"

    sink = smtp_sinks(max_rcpts=2, ehlo=["SIZE 1000"])
    send_via_smtp(sink.port, FROM, ["a@x.test", "b@x.test", "c@x.test"], mail_text(),
                  host=sink.host, allow_refused=True)
    assert sink.wait_messages(1)[0].rcpts[2].reply.startswith("452 4.5.3")
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        send_via_smtp(sink.port, FROM, [TO], mail_text(size=2000), host=sink.host,
                      mail_options=["SIZE=2000"])
    assert e.value.smtp_code == 552


def test_sink_drop_in_data_and_after_dot(smtp_sinks):
    sink = smtp_sinks(drop_in_data=True)
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        send_via_smtp(sink.port, FROM, [TO], mail_text(size=200000), host=sink.host)
    (s,) = sink.wait_sessions(1, closed=True)
    (txn,) = s.transactions
    assert s.end == "dropped in data"
    assert not txn.complete and txn.data and txn.final_reply is None

    sink = smtp_sinks(drop_in_data=5000)
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        send_via_smtp(sink.port, FROM, [TO], mail_text(size=200000), host=sink.host)
    txn = sink.wait_sessions(1, closed=True)[0].transactions[0]
    assert 5000 <= len(txn.data_raw) < 200000

    sink = smtp_sinks(drop_after_dot=True)
    msg = mail_text()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send_via_smtp(sink.port, FROM, [TO], msg, host=sink.host)
    (s,) = sink.wait_sessions(1, closed=True)
    assert s.end == "dropped after dot"
    assert s.transactions[0].complete and s.transactions[0].data == msg.encode()
    assert s.transactions[0].final_reply is None and sink.messages == []


def test_sink_delay(smtp_sinks):
    sink = smtp_sinks(delays={"mail": 0.5})
    t = time.monotonic()
    send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host)
    assert time.monotonic() - t >= 0.5
    sink = smtp_sinks(delays={"banner": 3})
    with pytest.raises((socket.timeout, smtplib.SMTPServerDisconnected)):
        send_via_smtp(sink.port, FROM, [TO], mail_text(), host=sink.host, timeout=0.5)


def test_sink_records_pipelining_and_bdat(smtp_sinks):
    sink = smtp_sinks(ehlo=["PIPELINING", "CHUNKING"])
    s, f = raw_session(sink)
    with s, f:
        s.sendall(b"EHLO client.test\r\n")
        assert read_reply(f)[0] == 250
        s.sendall(b"MAIL FROM:<a@sg.test>\r\nRCPT TO:<b@example.test>\r\n"
                  b"RCPT TO:<c@example.test>\r\nDATA\r\n")
        assert [read_reply(f)[0] for _ in range(4)] == [250, 250, 250, 354]
        s.sendall(b"Subject: p\r\n\r\nhi\r\n.\r\n")
        assert read_reply(f)[0] == 250
        s.sendall(b"MAIL FROM:<a@sg.test>\r\nRCPT TO:<b@example.test>\r\n"
                  b"BDAT 5\r\nhelloBDAT 3 LAST\r\nabc")
        assert [read_reply(f)[0] for _ in range(4)] == [250, 250, 250, 250]
        s.sendall(b"MAIL FROM:<a@sg.test>\r\nRCPT TO:<b@example.test>\r\n"
                  b"DATA\r\nSubject: too early\r\n\r\nx\r\n.\r\n")
        assert [read_reply(f)[0] for _ in range(4)] == [250, 250, 354, 250]
        s.sendall(b"QUIT\r\n")
        read_reply(f)
    (sess,) = sink.wait_sessions(1, closed=True)
    flags = [(c.verb, c.pipelined) for c in sess.commands]
    assert flags[:5] == [("EHLO", False), ("MAIL", False), ("RCPT", True),
                         ("RCPT", True), ("DATA", True)]
    t1, t2, t3 = sess.transactions
    assert t1.accepted_rcpts == ["b@example.test", "c@example.test"]
    assert t1.data == b"Subject: p\r\n\r\nhi\r\n" and not t1.data_pipelined
    assert t2.bdat and t2.data == b"helloabc" and t2.accepted
    assert t3.data_pipelined and t3.accepted


def test_sink_connection_reuse_and_rset(smtp_sinks):
    sink = smtp_sinks()
    with smtplib.SMTP(sink.host, sink.port, timeout=WAIT) as c:
        for i in range(3):
            c.sendmail(FROM, [TO], mail_text(subject="m%d" % i))
        c.mail(FROM)
        c.rset()
        c.sendmail(FROM, [TO], mail_text(subject="last"))
    msgs = sink.wait_messages(4)
    assert len(sink.sessions) == 1
    assert [m.message["Subject"] for m in msgs] == ["m0", "m1", "m2", "last"]
    txns = sink.sessions[0].transactions
    assert len(txns) == 5 and txns[3].aborted and not txns[3].complete


def test_sink_starttls_injection_is_recorded(peer_ca, smtp_sinks):
    sink = smtp_sinks(tls=peer_ca.issue([MX]))
    s, f = raw_session(sink)
    with s:
        s.sendall(b"EHLO c\r\n")
        read_reply(f)
        s.sendall(b"STARTTLS\r\nRSET\r\n")
        assert read_reply(f)[0] == 220
        f.close()
        t = peer_ca.client_context().wrap_socket(s, server_hostname=MX)
        t.sendall(b"NOOP\r\n")
        assert t.recv(100).startswith(b"250")
        t.close()
    (sess,) = sink.wait_sessions(1, closed=True)
    assert sess.starttls_injected == b"RSET\r\n"
    assert sess.raw_tls == b"NOOP\r\n" and sess.tls


def test_sink_concurrent_sessions(smtp_sinks):
    sink = smtp_sinks(delays={"rcpt": 0.2})
    errors = []

    def one(i):
        try:
            send_via_smtp(sink.port, FROM, [TO], mail_text(subject="c%d" % i),
                          host=sink.host)
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors
    msgs = sink.wait_messages(10)
    assert sorted(m.message["Subject"] for m in msgs) == sorted("c%d" % i for i in range(10))
    sessions = sink.wait_sessions(10, closed=True)
    assert len(sessions) == 10
    # served in parallel: sessions overlap (a sink serving one at a time
    # starts each after the previous one ended)
    spans = [(x.started, x.ended) for x in sessions]
    assert max(sum(1 for a, b in spans if a <= t < b)
               for t, _ in spans) >= 2


def test_sink_stop_closes_open_connections():
    sink = SmtpSink()
    s, f = raw_session(sink)
    sink.stop()
    assert f.read() == b""          # our end sees the close
    s.close()
    with pytest.raises(OSError):
        socket.create_connection(sink.address, timeout=2)
    assert sink.sessions[0].closed and sink.sessions[0].end == "stopped"


def test_wait_for_times_out_with_message():
    with pytest.raises(AssertionError, match="nothing came"):
        wait_for(lambda: False, timeout=0.1, message="nothing came")


# --------------------------------------------------------------- PostfixMX


@pytest.fixture(scope="module")
def postfix():
    ca = TestCA()
    mx = PostfixMX(domains=["example.test", "other.test"],
                   tls=ca.issue([MX]), hostname=MX)
    mx.ca = ca
    yield mx
    mx.cleanup()
    ca.cleanup()


def test_postfix_receives_over_starttls(postfix):
    msg = mail_text(FROM, [TO, "Someone@Other.test"], subject="via postfix")
    qid = send_via_smtp(postfix.port, FROM, [TO, "Someone@Other.test"], msg,
                        host=postfix.host, **verified(postfix.ca))
    assert qid and len(qid) >= 8
    msgs = postfix.wait_messages(2)
    assert sorted(m.recipient for m in msgs) == ["Someone@Other.test", TO]
    for m in msgs:
        assert m.message["Subject"] == "via postfix" and m.return_path == FROM
        assert "using TLSv1.3" in m.message["Received"]
        assert b"\nvia" not in m.raw and m.raw.endswith(b"Hello from the sg tests.\n")
    postfix.wait_log(r"TLS connection established from \S+\[127\.0\.0\.1\]: TLSv1\.3")
    postfix.wait_log(r"%s: to=<%s>, relay=virtual.*status=sent" % (qid, TO))


def test_postfix_refuses_other_domains(postfix):
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        send_via_smtp(postfix.port, FROM, ["x@elsewhere.test"], mail_text(),
                      host=postfix.host)
    assert e.value.recipients["x@elsewhere.test"][0] == 554


def test_postfix_users_without_tls_and_clean_stop():
    with PostfixMX(domains=["example.test"], users=["alice@example.test"]) as mx:
        with smtplib.SMTP(mx.host, mx.port, timeout=WAIT) as c:
            c.ehlo()
            assert not c.has_extn("starttls")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            send_via_smtp(mx.port, FROM, ["bob@example.test"], mail_text(), host=mx.host)
        assert e.value.recipients["bob@example.test"][0] == 550
        send_via_smtp(mx.port, FROM, ["Alice@example.test"], mail_text(), host=mx.host)
        (m,) = mx.wait_messages(1)
        assert "/mail/example.test/alice/new/" in m.path
        with open(mx.queue_dir + "/pid/master.pid") as f:
            master = int(f.read())
    assert mx.proc is None
    wait_for(lambda: not _alive(master), 10)
    mx.cleanup()


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False
