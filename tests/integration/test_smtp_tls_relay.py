"""SMTP receiving, issue 3: STARTTLS (RFC 3207) with the active certificate
and the STARTTLS whitelist, REQUIRETLS receiving (RFC 8689), relay control
and the classic relay tricks, content filter rules, PROXY protocol, the
queue API and the per-transaction log line.

Lists (domains, relay_networks, starttls_whitelist, content_filter_rules)
are written with SQL; workers reload them on NOTIFY sg_lists, so every test
polls (bounded) until the effect is visible. The module saves the lists at
start, works on empty ones and restores them at the end.
"""

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from dnsserver import dns_query, free_udp_tcp_port
from sgtest import (api, create_token, free_port, make_self_signed,
                    read_reply, store_certificate)

LOCAL = "local.test"
LISTS = ["domains", "relay_networks", "starttls_whitelist",
         "content_filter_rules"]
QUEUED_RE = re.compile(r"queued as ([0-9A-F]{16})")


# ---------------------------------------------------------------- helpers

def wait_for(fn, timeout=10.0, interval=0.05):
    """Call fn until it returns something true; return the last value."""
    deadline = time.monotonic() + timeout
    v = fn()
    while not v and time.monotonic() < deadline:
        time.sleep(interval)
        v = fn()
    return v


def sql(pg, query, args=None):
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def no_tls_ctx(**kw):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


class Client:
    """A raw SMTP client that can switch to TLS."""

    def __init__(self, port, source=None, proxy=None, timeout=10):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None)
        if proxy:
            self.sock.sendall(proxy)
        self.f = self.sock.makefile("rb")
        self.greeting = read_reply(self.f)

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        return read_reply(self.f)

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return read_reply(self.f)

    def ehlo(self, name="client.example"):
        code, lines = self.cmd("EHLO " + name)
        assert code == 250, lines
        return [l[4:].upper() for l in lines[1:]]

    def tls(self, ctx=None):
        """Handshake after a 220 to STARTTLS has been read."""
        self.f.close()
        self.sock = (ctx or no_tls_ctx()).wrap_socket(
            self.sock, server_hostname="sg.local")
        self.f = self.sock.makefile("rb")

    def starttls(self, ctx=None):
        code, lines = self.cmd("STARTTLS")
        assert (code, lines[-1][4:9]) == (220, "2.0.0"), lines
        self.tls(ctx)

    def message(self, sender, rcpts, data, mail_params=""):
        """One transaction; returns the final reply (code, lines)."""
        code, lines = self.cmd("MAIL FROM:<%s>%s" % (sender, mail_params))
        assert code == 250, lines
        for r in rcpts:
            code, lines = self.cmd("RCPT TO:<%s>" % r)
            assert code == 250, (r, lines)
        code, lines = self.cmd("DATA")
        assert code == 354, lines
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data + b"\r\n.\r\n")
        return self.reply()

    def close(self):
        try:
            self.sock.sendall(b"QUIT\r\n")
            read_reply(self.f)
        except (OSError, ConnectionError):
            pass
        self.f.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def make_data(subject="test", headers=(), body="hello"):
    h = ["From: <a@client.example>", "To: <user@local.test>",
         "Subject: " + subject] + list(headers)
    return "\r\n".join(h) + "\r\n\r\n" + body


def send(port, sender, rcpts, data=None, tls=True, mail_params="", **kw):
    """Send one message; returns the queue id (asserts 250)."""
    with Client(port, **kw) as c:
        c.ehlo()
        if tls:
            c.starttls()
            c.ehlo()
        code, lines = c.message(sender, rcpts, data or make_data(),
                                mail_params)
    assert code == 250 and lines[-1][4:9] == "2.0.0", lines
    return QUEUED_RE.search(lines[-1]).group(1)


def message(pg, qid):
    rows = sql(pg, "SELECT row_to_json(m)::text FROM messages m"
                   " WHERE id = %s", (qid,))
    assert rows, "message %s is not in the queue" % qid
    m = json.loads(rows[0][0])
    m["recipients"] = [json.loads(r[0]) for r in sql(
        pg, "SELECT row_to_json(r)::text FROM recipients r"
            " WHERE message_id = %s ORDER BY id", (qid,))]
    return m


def body_of(pg, qid):
    return bytes(sql(pg, "SELECT body FROM messages WHERE id = %s",
                     (qid,))[0][0])


def ehlo_caps(port, **kw):
    with Client(port, **kw) as c:
        return c.ehlo()


def rcpt_reply(port, address, **kw):
    with Client(port, **kw) as c:
        c.ehlo()
        code, lines = c.cmd("MAIL FROM:<probe@probe.example>")
        assert code == 250, lines
        return c.cmd("RCPT TO:<%s>" % address)


def code_enh(reply):
    code, lines = reply
    return code, lines[-1][4:].split(" ", 1)[0]


def wait_settings(inst):
    """Until the worker runs the settings version stored in PostgreSQL."""
    want = sql(inst.pg, "SELECT version FROM settings WHERE id = 1")[0][0]

    def ok():
        h = api(inst, "GET", "/api/v1/health", token=None).json()
        return h["worker"]["settings_version"] >= want
    assert wait_for(ok), "worker did not load settings version %d" % want


def patch_settings(inst, doc):
    r = api(inst, "PATCH", "/api/v1/settings", json=doc)
    assert r.status_code == 200, r.text
    wait_settings(inst)


def add_domain(pg, name=LOCAL):
    sql(pg, "INSERT INTO domains (name, internal_server) VALUES (%s,"
            " '127.0.0.1:2525') ON CONFLICT DO NOTHING", (name,))


def add_relay(pg, cidr):
    sql(pg, "INSERT INTO relay_networks (value) VALUES (%s)", (cidr,))


def add_whitelist(pg, value, kind):
    return sql(pg, "INSERT INTO starttls_whitelist (value, kind)"
                   " VALUES (%s, %s) RETURNING id", (value, kind))[0][0]


def add_rule(pg, conditions, position=10, enabled=True, name=""):
    return sql(pg, "INSERT INTO content_filter_rules (position, name, enabled,"
                   " conditions, action) VALUES (%s, %s, %s, %s::jsonb,"
                   " 'flag_requiretls') RETURNING id",
               (position, name, enabled, json.dumps(conditions)))[0][0]


def wait_local(port, name=LOCAL, **kw):
    """Until RCPT to the local domain is accepted (no relay networks)."""
    assert wait_for(lambda: rcpt_reply(port, "user@" + name, **kw)[0] == 250), \
        "%s never became a local domain" % name


def tls_cert_der(port, ctx=None):
    with Client(port) as c:
        c.ehlo()
        c.starttls(ctx)
        return c.sock.getpeercert(binary_form=True), c.sock.version()


def active_cert_der(pg):
    pem = sql(pg, "SELECT c.certificate_pem FROM settings s JOIN certificates"
                  " c ON c.id = s.active_certificate_id WHERE s.id = 1")[0][0]
    return ssl.PEM_cert_to_DER_cert(pem)


def log_text(inst):
    with open(inst.error_log, errors="replace") as f:
        return f.read()


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def saved_lists(pg):
    """The lists as other modules left them: saved, emptied, restored."""
    saved = {t: sql(pg, "SELECT coalesce(json_agg(t), '[]')::text FROM %s t"
                    % t)[0][0] for t in LISTS}
    for t in LISTS:
        sql(pg, "DELETE FROM %s" % t)
    yield
    for t in LISTS:
        sql(pg, "DELETE FROM %s" % t)
        sql(pg, "INSERT INTO {0} SELECT * FROM json_populate_recordset("
                "null::{0}, %s::json)".format(t), (saved[t],))


@pytest.fixture
def inst(sg_module, pg, saved_lists):
    """The module's instance with empty lists, TLS on with its own
    certificate active, REQUIRETLS enabled, all visible in the worker."""
    for t in LISTS:
        sql(pg, "DELETE FROM %s" % t)
    sg_module.reset_settings()
    wait_settings(sg_module)
    port = sg_module.smtp_port
    assert wait_for(lambda: "STARTTLS" in ehlo_caps(port)
                    and rcpt_reply(port, "x@probe.invalid")[0] == 554), \
        "lists/settings did not come back to the clean state"
    yield sg_module
    for t in LISTS:
        sql(pg, "DELETE FROM %s" % t)
    sg_module.reset_settings()


# ================================================================ STARTTLS

def test_starttls_offered_when_tls_enabled(inst):
    """RFC 3207, 4: STARTTLS is listed in the EHLO response; the fixture's
    instance has tls_enabled on and an active certificate."""
    doc = api(inst, "GET", "/api/v1/settings").json()
    assert doc["tls_enabled"] is True
    assert "STARTTLS" in ehlo_caps(inst.smtp_port)


def test_starttls_not_offered_when_setting_off(inst):
    """RFC 3207, 4: STARTTLS is advertised only when offered; with the
    tls_enabled setting off it is not in EHLO and the command is refused."""
    patch_settings(inst, {"tls_enabled": False})
    assert wait_for(lambda: "STARTTLS" not in ehlo_caps(inst.smtp_port))
    with Client(inst.smtp_port) as c:
        c.ehlo()
        assert code_enh(c.cmd("STARTTLS")) == (502, "5.5.1")
    patch_settings(inst, {"tls_enabled": True})
    assert wait_for(lambda: "STARTTLS" in ehlo_caps(inst.smtp_port))


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_starttls_handshake_tls12_tls13(inst, version):
    """RFC 3207, 4: after 220 the TLS negotiation starts; TLS 1.2 and 1.3
    are both accepted."""
    v = getattr(ssl.TLSVersion, version)
    ctx = no_tls_ctx(minimum_version=v, maximum_version=v)
    with Client(inst.smtp_port) as c:
        c.ehlo()
        c.starttls(ctx)
        assert c.sock.version() == version.replace("_", ".")
        caps = c.ehlo()
        assert "STARTTLS" not in caps


def test_starttls_tls11_refused(inst):
    """TLS 1.2 and 1.3 only (issue 3, item 2): a TLS 1.1 client fails the
    handshake with a protocol-version alert from the server."""
    try:
        ctx = no_tls_ctx()
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError) as e:
        pytest.skip("local OpenSSL cannot offer TLS 1.1: %s" % e)
    with Client(inst.smtp_port) as c:
        c.ehlo()
        code, lines = c.cmd("STARTTLS")
        assert code == 220, lines
        with pytest.raises(ssl.SSLError) as ei:
            c.tls(ctx)
        msg = str(ei.value)
        if "NO_PROTOCOLS_AVAILABLE" in msg or "no protocols available" in msg:
            pytest.skip("local OpenSSL cannot offer TLS 1.1: %s" % msg)
        assert "PROTOCOL_VERSION" in msg.upper() or \
            "UNSUPPORTED_PROTOCOL" in msg.upper(), msg


def test_starttls_serves_active_certificate(inst, pg):
    """Issue 3, item 2: STARTTLS serves the active certificate stored in
    PostgreSQL."""
    der, _ = tls_cert_der(inst.smtp_port)
    assert der == active_cert_der(pg)
    assert der == ssl.PEM_cert_to_DER_cert(inst.cert_pem)


def test_starttls_certificate_switch_without_reload(inst, pg):
    """Issue 3, item 2: changing active_certificate_id switches the
    STARTTLS certificate without a reload."""
    other_pem, other_key = make_self_signed("mx2.example")
    other_id = store_certificate(pg.conninfo, other_pem, other_key,
                                 "mx2.example", activate=False)
    master = inst.nginx.pid
    patch_settings(inst, {"active_certificate_id": other_id})
    want = ssl.PEM_cert_to_DER_cert(other_pem)
    assert wait_for(lambda: tls_cert_der(inst.smtp_port)[0] == want)
    assert active_cert_der(pg) == want
    for _ in range(3):
        assert tls_cert_der(inst.smtp_port)[0] == want
    assert inst.nginx.pid == master
    assert "reconfiguring" not in log_text(inst)


def test_starttls_resets_session(inst):
    """RFC 3207, 4.2: after TLS the server discards all knowledge from the
    client; MAIL without a new EHLO is a bad sequence (503 5.5.1)."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    with Client(inst.smtp_port) as c:
        c.ehlo()
        c.starttls()
        assert code_enh(c.cmd("MAIL FROM:<a@client.example>")) == \
            (503, "5.5.1")
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@client.example>")[0] == 250


def test_second_starttls_refused(inst):
    """RFC 3207, 4.2: STARTTLS inside TLS is refused with 503 5.5.1, and
    not advertised in the post-TLS EHLO."""
    with Client(inst.smtp_port) as c:
        c.ehlo()
        c.starttls()
        assert "STARTTLS" not in c.ehlo()
        assert code_enh(c.cmd("STARTTLS")) == (503, "5.5.1")
        assert c.cmd("NOOP")[0] == 250


def test_starttls_pipelined_noop_discarded(inst):
    """RFC 3207, 4.2 (and RFC-NOTES, smuggling): bytes sent after STARTTLS
    in the same write are discarded; no NOOP reply arrives inside TLS."""
    with Client(inst.smtp_port) as c:
        c.ehlo()
        c.send(b"STARTTLS\r\nNOOP\r\n")
        code, lines = c.reply()
        assert code == 220, lines
        c.tls()
        c.sock.settimeout(1.0)
        with pytest.raises((socket.timeout, TimeoutError)):
            got = c.sock.recv(512)
            raise AssertionError("got a reply inside TLS: %r" % got)
        c.sock.settimeout(10)
        c.f = c.sock.makefile("rb")
        assert "STARTTLS" not in c.ehlo()


def test_posttls_finger(inst):
    """RFC 3207: a real STARTTLS client (Postfix's posttls-finger)
    establishes TLS."""
    env = dict(os.environ)
    if not os.path.exists("/etc/postfix/main.cf"):
        # posttls-finger reads main.cf; an empty one means the defaults
        conf = os.path.join(inst.dir, "postfix")
        os.makedirs(conf, exist_ok=True)
        open(os.path.join(conf, "main.cf"), "w").close()
        env["MAIL_CONFIG"] = conf
    p = subprocess.run(["/usr/sbin/posttls-finger", "-c", "-l", "may", "-P",
                        "/etc/ssl/certs", "[127.0.0.1]:%d" % inst.smtp_port],
                       capture_output=True, text=True, timeout=30, env=env)
    out = p.stdout + p.stderr
    assert "TLS connection established" in out, out
    assert re.search(r"TLSv1\.[23]", out), out


@pytest.fixture
def swaks_msg(inst):
    """A message sent with swaks --tls to a local recipient."""
    # make test installs swaks: its absence is a failure, not a skip
    assert shutil.which("swaks"), "swaks is not installed"
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    sender = "swaks-%d@client.example" % time.monotonic_ns()
    p = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % inst.smtp_port,
                        "--tls", "--from", sender, "--to", "user@local.test",
                        "--helo", "swaks.client.example",
                        "--header", "Subject: swaks tls"],
                       capture_output=True, text=True, timeout=30)
    m = QUEUED_RE.search(p.stdout)
    assert p.returncode == 0 and m, p.stdout + p.stderr
    return m.group(1), sender


def test_swaks_tls_delivers_with_tls_details(inst, swaks_msg):
    """RFC 3848, 4 and RFC 5321, 4.4: a message received over STARTTLS is
    queued with its TLS details and its Received header says `with ESMTPS`
    and `(using <version> with cipher <cipher>)`."""
    qid, sender = swaks_msg
    m = message(inst.pg, qid)
    assert m["sender"] == sender
    assert m["tls_protocol"] in ("TLSv1.2", "TLSv1.3")
    assert m["tls_cipher"]
    assert m["esmtp"] is True and m["helo"] == "swaks.client.example"
    assert [r["address"] for r in m["recipients"]] == ["user@local.test"]
    body = body_of(inst.pg, qid).decode()
    received = body.split("\r\n\tfor", 1)[0]
    assert body.startswith("Received: from swaks.client.example"), body[:300]
    assert "with ESMTPS" in received, received
    assert "(using %s with cipher %s)" % (m["tls_protocol"], m["tls_cipher"]) \
        in received, received
    assert "id " + qid in body.split("\r\n\r\n", 1)[0]


# ====================================================== STARTTLS whitelist

@pytest.mark.parametrize("value,kind", [("127.0.0.1", "ip"),
                                        ("127.0.0.0/8", "cidr")])
def test_whitelist_ip_and_cidr(inst, value, kind):
    """Issue 3, item 2: a client on the STARTTLS whitelist is not offered
    STARTTLS (RFC 3207, 4: the server need not offer it to every client);
    the command gets 502 5.5.1; the log says why; removing the entry brings
    STARTTLS back."""
    wid = add_whitelist(inst.pg, value, kind)
    assert wait_for(lambda: "STARTTLS" not in ehlo_caps(inst.smtp_port))
    with Client(inst.smtp_port) as c:
        c.ehlo()
        assert code_enh(c.cmd("STARTTLS")) == (502, "5.5.1")
    assert "STARTTLS not offered: client on the STARTTLS whitelist" \
        in log_text(inst)
    sql(inst.pg, "DELETE FROM starttls_whitelist WHERE id = %s", (wid,))
    assert wait_for(lambda: "STARTTLS" in ehlo_caps(inst.smtp_port))
    der, _ = tls_cert_der(inst.smtp_port)
    assert der


def test_whitelist_other_address_not_affected(inst):
    """Issue 3, item 2: an ip entry only exempts that address."""
    add_whitelist(inst.pg, "127.0.0.1", "ip")
    assert wait_for(lambda: "STARTTLS" not in ehlo_caps(inst.smtp_port))
    assert "STARTTLS" in ehlo_caps(inst.smtp_port, source="127.0.0.2")


@pytest.fixture
def dnsmasq(sg_tmp):
    exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    assert os.path.exists(exe), "dnsmasq (dnsmasq-base) is not installed"
    port = free_udp_tcp_port()
    p = subprocess.Popen(
        [exe, "--no-daemon", "--port=%d" % port, "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts",
         "--pid-file=" + os.path.join(sg_tmp, "dnsmasq-%d.pid" % port),
         "--ptr-record=1.0.0.127.in-addr.arpa,client.whitelisted.test",
         "--ptr-record=3.0.0.127.in-addr.arpa,other.example.test",
         # a PTR that does not resolve back: claims a whitelisted name
         "--ptr-record=4.0.0.127.in-addr.arpa,fake.whitelisted.test",
         # not a host name (an underscore): never trusted, never logged raw
         "--ptr-record=5.0.0.127.in-addr.arpa,bad_name.whitelisted.test",
         "--host-record=bad_name.whitelisted.test,127.0.0.5",
         # forward confirmation: the name must resolve back to the client
         "--host-record=client.whitelisted.test,127.0.0.1",
         "--host-record=other.example.test,127.0.0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: p.poll() is not None or dns_query(
        "127.0.0.1", port, "client.whitelisted.test") is not None)
    assert p.poll() is None, "dnsmasq does not start: %s" % p.stdout.read()
    yield port
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def test_whitelist_by_reverse_dns_name(inst, sg_instance, dnsmasq, pg):
    """Issue 3, item 2: a name entry matches the client's reverse DNS name
    or a name below it (client.whitelisted.test under whitelisted.test);
    a client without a matching name is still offered STARTTLS."""
    # ipv6=off: the test dnsmasq refuses AAAA queries (no upstream)
    s2 = sg_instance(extra_mail_server="resolver 127.0.0.1:%d ipv6=off;\n"
                                       "resolver_timeout 5s;" % dnsmasq)
    port = s2.smtp_port
    assert wait_for(lambda: "STARTTLS" in ehlo_caps(port))
    add_whitelist(pg, "whitelisted.test", "name")
    assert wait_for(lambda: "STARTTLS" not in ehlo_caps(port))
    with Client(port) as c:
        c.ehlo()
        assert code_enh(c.cmd("STARTTLS")) == (502, "5.5.1")
    # 127.0.0.3 is other.example.test, 127.0.0.2 has no name
    assert "STARTTLS" in ehlo_caps(port, source="127.0.0.3")
    assert "STARTTLS" in ehlo_caps(port, source="127.0.0.2")
    # a name that does not resolve back to the client is not trusted
    assert "STARTTLS" in ehlo_caps(port, source="127.0.0.4")
    assert "does not resolve back" in log_text(s2)
    assert "STARTTLS" in ehlo_caps(port, source="127.0.0.5")
    assert "has an invalid host name" in log_text(s2)
    assert "STARTTLS not offered: client on the STARTTLS whitelist" \
        in log_text(s2)
    # the name is in the Received header and the queue record
    add_domain(pg)
    wait_local(port)
    qid = send(port, "a@client.example", ["user@local.test"], tls=False)
    m = message(pg, qid)
    assert m["client_name"] == "client.whitelisted.test"
    assert "(client.whitelisted.test [127.0.0.1])" in \
        body_of(pg, qid).decode().split("\r\n")[0]
    sql(pg, "DELETE FROM starttls_whitelist")
    assert wait_for(lambda: "STARTTLS" in ehlo_caps(port))
    s2.reset_settings()


# ================================================================ REQUIRETLS

def test_requiretls_not_advertised_before_starttls(inst):
    """RFC 8689, 4.1 (RFC-NOTES): REQUIRETLS is advertised only after
    STARTTLS."""
    assert "REQUIRETLS" not in ehlo_caps(inst.smtp_port)


def test_requiretls_advertised_after_starttls(inst):
    """RFC 8689, 4.1: the post-TLS EHLO lists REQUIRETLS when enabled."""
    with Client(inst.smtp_port) as c:
        c.ehlo()
        c.starttls()
        assert "REQUIRETLS" in c.ehlo()


def test_requiretls_disabled(inst):
    """RFC 8689, 4.1 and RFC 5321, 4.1.1.11 (a parameter of an extension
    not offered): with requiretls_enabled false REQUIRETLS is not
    advertised after STARTTLS and the MAIL parameter gets 555 5.5.4."""
    patch_settings(inst, {"requiretls_enabled": False})
    with Client(inst.smtp_port) as c:
        c.ehlo()
        c.starttls()
        assert "REQUIRETLS" not in c.ehlo()
        assert code_enh(c.cmd("MAIL FROM:<a@b.example> REQUIRETLS")) == \
            (555, "5.5.4")
        assert c.cmd("MAIL FROM:<a@b.example>")[0] == 250


def test_requiretls_in_clear_refused(inst):
    """RFC 8689, 4.1 (RFC-NOTES decision): MAIL ... REQUIRETLS on a session
    without TLS gets 530 5.7.10."""
    with Client(inst.smtp_port) as c:
        c.ehlo()
        assert code_enh(c.cmd("MAIL FROM:<a@b.example> REQUIRETLS")) == \
            (530, "5.7.10")
        assert c.cmd("MAIL FROM:<a@b.example>")[0] == 250


def test_requiretls_parameter_flags_message(inst):
    """RFC 8689, 4.1: MAIL FROM:<...> REQUIRETLS inside TLS is accepted and
    the message is flagged, source "parameter"."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    qid = send(inst.smtp_port, "a@b.example", ["user@local.test"],
               mail_params=" REQUIRETLS")
    m = message(inst.pg, qid)
    assert m["requiretls"] is True
    assert m["requiretls_sources"] == ["parameter"]
    assert m["tls_protocol"] in ("TLSv1.2", "TLSv1.3")


def test_requiretls_recipient_tag(inst):
    """Issue 3, item 3 (RFC-NOTES, REQUIRETLS): a user+requiretls@local
    recipient flags the message; the tag is removed from the address to
    deliver and kept in original_address."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    qid = send(inst.smtp_port, "a@b.example", ["user+requiretls@local.test"])
    m = message(inst.pg, qid)
    assert m["requiretls"] is True
    assert m["requiretls_sources"] == ["address:user+requiretls@local.test"]
    (r,) = m["recipients"]
    assert r["address"] == "user@local.test"
    assert r["original_address"] == "user+requiretls@local.test"
    assert r["domain"] == LOCAL and r["local_domain"] is True


def test_tls_required_no_header(inst):
    """RFC 8689, 5: a TLS-Required: No header is recorded on an unflagged
    message, and ignored (false) when the message is REQUIRETLS-flagged."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    data = make_data(headers=["TLS-Required: No"])
    q1 = send(inst.smtp_port, "a@b.example", ["user@local.test"], data)
    m1 = message(inst.pg, q1)
    assert (m1["requiretls"], m1["tls_required_no"]) == (False, True)
    q2 = send(inst.smtp_port, "a@b.example", ["user@local.test"], data,
              mail_params=" REQUIRETLS")
    m2 = message(inst.pg, q2)
    assert (m2["requiretls"], m2["tls_required_no"]) == (True, False)
    q3 = send(inst.smtp_port, "a@b.example", ["user@local.test"])
    assert message(inst.pg, q3)["tls_required_no"] is False
    # ABNF strings are case-insensitive (RFC 5234, 2.3); FWS allowed
    for h in ("tls-required:no", "TLS-REQUIRED:   NO  "):
        q = send(inst.smtp_port, "a@b.example", ["user@local.test"],
                 make_data(headers=[h]))
        assert message(inst.pg, q)["tls_required_no"] is True, h
    q = send(inst.smtp_port, "a@b.example", ["user@local.test"],
             make_data(headers=["TLS-Required: Nope"]))
    assert message(inst.pg, q)["tls_required_no"] is False


# ================================================================ relay

def test_relay_local_domain_only(inst):
    """Issue 3, item 4: with no relay networks a local domain is accepted
    from 127.0.0.1 and any other domain is refused with 554 5.7.1."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    assert code_enh(rcpt_reply(inst.smtp_port, "user@other.example")) == \
        (554, "5.7.1")


def test_relay_network_allows_other_domains(inst):
    """Issue 3, item 4: a client in relay_networks may relay to any domain;
    the recipient is queued with local_domain false."""
    add_relay(inst.pg, "127.0.0.0/8")
    assert wait_for(lambda: rcpt_reply(
        inst.smtp_port, "user@other.example")[0] == 250)
    qid = send(inst.smtp_port, "a@client.example", ["user@Other.Example"])
    (r,) = message(inst.pg, qid)["recipients"]
    assert (r["domain"], r["local_domain"]) == ("other.example", False)


TRICKS = [
    ("user%other.example@local.test", 554, "5.7.1"),
    ("other.example!user@local.test", 554, "5.7.1"),
    ('"user@other.example"@local.test', 554, "5.7.1"),
    ("@local.test:user@other.example", 554, "5.7.1"),
    ("user@other.example.", 553, "5.1.3"),
    ("user@[127.0.0.1]", 554, "5.7.1"),
    ("user@LOCAL.TEST.other.example", 554, "5.7.1"),
]


@pytest.mark.parametrize("address,code,enh", TRICKS,
                         ids=[t[0] for t in TRICKS])
def test_relay_tricks_refused(inst, address, code, enh):
    """Issue 3, item 4 (never an open relay): for a client outside the relay
    networks the classic tricks are refused: percent hack and bang path
    (RFC 5321, 3.6.1/2.3.5 - sg must not reroute), quoted local part holding
    '@' (RFC 5321, 4.1.2), source route (RFC 5321, 4.1.1.3 and appendix C:
    the route is ignored, the final address is not local), trailing dot
    (RFC 5321, 4.1.2 Domain syntax: 553 5.1.3), IP literal (never local),
    local domain as a prefix of another. Nothing is queued for them."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    sender = "trick-%d@client.example" % time.monotonic_ns()
    with Client(inst.smtp_port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<%s>" % sender)[0] == 250
        assert code_enh(c.cmd("RCPT TO:<%s>" % address)) == (code, enh)
        assert c.cmd("RCPT TO:<ok@local.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(make_data().encode() + b"\r\n.\r\n")
        code2, lines = c.reply()
        assert code2 == 250, lines
        qid = QUEUED_RE.search(lines[-1]).group(1)
        # a transaction with only the refused recipient queues nothing
        assert c.cmd("MAIL FROM:<%s>" % sender)[0] == 250
        assert c.cmd("RCPT TO:<%s>" % address)[0] == code
        code3, lines = c.cmd("DATA")
        assert code3 in (503, 554) and lines[-1][4:5] == "5", lines
    m = message(inst.pg, qid)
    assert [r["original_address"] for r in m["recipients"]] == \
        ["ok@local.test"]
    n = sql(inst.pg, "SELECT count(*) FROM messages WHERE sender = %s",
            (sender,))[0][0]
    assert n == 1
    assert sql(inst.pg, "SELECT count(*) FROM recipients WHERE domain <> %s"
               " AND message_id IN (SELECT id FROM messages WHERE sender = %s)",
               (LOCAL, sender))[0][0] == 0
    assert "relay denied" in log_text(inst) or code == 553


def test_relay_case_insensitive_local_domain(inst):
    """RFC 5321, 2.4: domain names are case-insensitive; User@LOCAL.Test is
    local, stored with a lower-case domain and local_domain true."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    qid = send(inst.smtp_port, "a@client.example", ["User@LOCAL.Test"],
               tls=False)
    (r,) = message(inst.pg, qid)["recipients"]
    assert r["domain"] == "local.test" and r["local_domain"] is True
    assert r["original_address"] == "User@LOCAL.Test"


def test_relay_postmaster_accepted(inst):
    """RFC 5321, 4.5.1: RCPT TO:<Postmaster> (no domain) is always accepted,
    and the message is queued."""
    assert code_enh(rcpt_reply(inst.smtp_port, "Postmaster")) == \
        (250, "2.1.5")
    qid = send(inst.smtp_port, "a@client.example", ["Postmaster"], tls=False)
    (r,) = message(inst.pg, qid)["recipients"]
    assert r["original_address"] == "Postmaster"


# ======================================================= content filter

def wait_rule(port, pg, rule_id, sender, rcpts, data):
    """Send probe messages until one is flagged by rule_id; return it."""
    last = {}

    def probe():
        qid = send(port, sender, rcpts, data, tls=False)
        last["m"] = message(pg, qid)
        return last["m"]["content_filter_rule_id"] == rule_id
    assert wait_for(probe, interval=0.1), last.get("m")
    return last["m"]


def assert_flagged_by(m, rule_id):
    assert m["content_filter_rule_id"] == rule_id
    assert m["requiretls"] is True
    assert "rule:%d" % rule_id in m["requiretls_sources"]


def assert_not_flagged(m):
    assert m["content_filter_rule_id"] is None
    assert m["requiretls"] is False and m["requiretls_sources"] == []


@pytest.fixture
def local(inst):
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    return inst


def test_rule_header_contains_case_insensitive(local):
    """Issue 3, item 5: a header condition "contains" matches case-
    insensitively; the rule id is recorded and the message flagged for
    REQUIRETLS (source rule:<id>); a non-matching message is not flagged."""
    inst = local
    rid = add_rule(inst.pg, [{"field": "header", "header": "Subject",
                              "match": "contains", "value": "secret"}])
    m = wait_rule(inst.smtp_port, inst.pg, rid, "a@client.example",
                  ["user@local.test"], make_data("Top SECRET plans"))
    assert_flagged_by(m, rid)
    # the header name matches case-insensitively too
    q = send(inst.smtp_port, "a@client.example", ["user@local.test"],
             "SUBJECT: a Secret\r\n\r\nx", tls=False)
    assert_flagged_by(message(inst.pg, q), rid)
    q = send(inst.smtp_port, "a@client.example", ["user@local.test"],
             make_data("lunch; secre t"), tls=False)
    assert_not_flagged(message(inst.pg, q))
    # the value in another header does not count
    q = send(inst.smtp_port, "a@client.example", ["user@local.test"],
             make_data("lunch", ["X-Note: secret"]), tls=False)
    assert_not_flagged(message(inst.pg, q))


def test_rule_header_regex(local):
    """Issue 3, item 5: a header condition with a regular expression
    (case-sensitive unless (?i))."""
    inst = local
    rid = add_rule(inst.pg, [{"field": "header", "header": "Subject",
                              "match": "regex", "value": "^Invoice [0-9]+$"}])
    m = wait_rule(inst.smtp_port, inst.pg, rid, "a@client.example",
                  ["user@local.test"], make_data("Invoice 1234"))
    assert_flagged_by(m, rid)
    for subject in ("invoice 1234", "Invoice 12a", "Re: Invoice 1"):
        q = send(inst.smtp_port, "a@client.example", ["user@local.test"],
                 make_data(subject), tls=False)
        assert_not_flagged(message(inst.pg, q))


def test_rule_sender_contains(local):
    """Issue 3, item 5: an envelope sender condition."""
    inst = local
    rid = add_rule(inst.pg, [{"field": "sender", "match": "contains",
                              "value": "boss@"}])
    m = wait_rule(inst.smtp_port, inst.pg, rid, "The.Boss@corp.example",
                  ["user@local.test"], make_data())
    assert_flagged_by(m, rid)
    q = send(inst.smtp_port, "clerk@corp.example", ["boss@local.test"],
             make_data(), tls=False)
    assert_not_flagged(message(inst.pg, q))


def test_rule_recipient_regex(local):
    """Issue 3, item 5: a recipient condition with a regular expression
    matches if any recipient matches."""
    inst = local
    rid = add_rule(inst.pg, [{"field": "recipient", "match": "regex",
                              "value": "^vip[0-9]*@local\\.test$"}])
    m = wait_rule(inst.smtp_port, inst.pg, rid, "a@client.example",
                  ["user@local.test", "vip7@local.test"], make_data())
    assert_flagged_by(m, rid)
    q = send(inst.smtp_port, "a@client.example", ["xvip7@local.test"],
             make_data(), tls=False)
    assert_not_flagged(message(inst.pg, q))


def test_rule_two_conditions_and(local):
    """Issue 3, item 5 (005_relay_and_lists.sql): all conditions of a rule
    must match."""
    inst = local
    rid = add_rule(inst.pg, [
        {"field": "header", "header": "Subject", "match": "contains",
         "value": "confidential"},
        {"field": "sender", "match": "contains", "value": "@legal.example"}])
    m = wait_rule(inst.smtp_port, inst.pg, rid, "a@legal.example",
                  ["user@local.test"], make_data("Confidential memo"))
    assert_flagged_by(m, rid)
    for sender, subject in (("a@legal.example", "memo"),
                            ("a@sales.example", "Confidential memo")):
        q = send(inst.smtp_port, sender, ["user@local.test"],
                 make_data(subject), tls=False)
        assert_not_flagged(message(inst.pg, q))


def test_rule_disabled_ignored(local):
    """Issue 3, item 5: a disabled rule is skipped even when it comes first
    and matches."""
    inst = local
    cond = [{"field": "header", "header": "Subject", "match": "contains",
             "value": "quarterly"}]
    off = add_rule(inst.pg, cond, position=1, enabled=False)
    on = add_rule(inst.pg, cond, position=2)
    m = wait_rule(inst.smtp_port, inst.pg, on, "a@client.example",
                  ["user@local.test"], make_data("Quarterly report"))
    assert_flagged_by(m, on)
    assert "rule:%d" % off not in m["requiretls_sources"]
    # only a disabled rule left: nothing is flagged
    sql(inst.pg, "DELETE FROM content_filter_rules WHERE id = %s", (on,))
    dummy = add_rule(inst.pg, [{"field": "sender", "match": "contains",
                                "value": "sync-marker"}], position=99)
    wait_rule(inst.smtp_port, inst.pg, dummy, "sync-marker@client.example",
              ["user@local.test"], make_data())
    q = send(inst.smtp_port, "a@client.example", ["user@local.test"],
             make_data("Quarterly report"), tls=False)
    assert_not_flagged(message(inst.pg, q))


def test_rule_first_by_position_wins(local):
    """Issue 3, item 5 (005_relay_and_lists.sql): rules are evaluated in
    position order (not id order); the first match wins and only it is
    recorded."""
    inst = local
    cond = [{"field": "header", "header": "Subject", "match": "contains",
             "value": "budget"}]
    later = add_rule(inst.pg, cond, position=20, name="later")
    first = add_rule(inst.pg, cond, position=10, name="first")
    assert first > later
    m = wait_rule(inst.smtp_port, inst.pg, first, "a@client.example",
                  ["user@local.test"], make_data("Budget 2026"))
    assert_flagged_by(m, first)
    assert m["requiretls_sources"] == ["rule:%d" % first]
    assert "sg: content filter rule %d matched, action flag_requiretls" \
        % first in log_text(inst)


def test_rule_with_parameter_records_both_sources(local):
    """RFC 8689, 4.1 and issue 3, item 3: every source of the flag is
    recorded (parameter and rule)."""
    inst = local
    rid = add_rule(inst.pg, [{"field": "header", "header": "Subject",
                              "match": "contains", "value": "both"}])
    wait_rule(inst.smtp_port, inst.pg, rid, "a@client.example",
              ["user@local.test"], make_data("both"))
    q = send(inst.smtp_port, "a@client.example", ["user@local.test"],
             make_data("both"), mail_params=" REQUIRETLS")
    m = message(inst.pg, q)
    assert m["requiretls"] is True
    assert sorted(m["requiretls_sources"]) == \
        sorted(["parameter", "rule:%d" % rid])


def test_rule_folded_header(local):
    """RFC 5322, 2.2.3: a folded header field is matched unfolded."""
    inst = local
    rid = add_rule(inst.pg, [{"field": "header", "header": "Subject",
                              "match": "contains", "value": "top secret"}])
    m = wait_rule(inst.smtp_port, inst.pg, rid, "a@client.example",
                  ["user@local.test"], make_data("Top Secret"))
    assert_flagged_by(m, rid)
    q = send(inst.smtp_port, "a@client.example", ["user@local.test"],
             make_data("a very long subject, Top\r\n Secret"), tls=False)
    assert_flagged_by(message(inst.pg, q), rid)


def test_rule_header_after_many_headers(local):
    """Issue 3, item 5: a header rule sees every header field of an
    accepted message; padding the header with other fields must not evade
    a REQUIRETLS rule."""
    inst = local
    rid = add_rule(inst.pg, [{"field": "header", "header": "Subject",
                              "match": "contains", "value": "secret"}])
    wait_rule(inst.smtp_port, inst.pg, rid, "a@client.example",
              ["user@local.test"], make_data("secret"))
    pad = ["X-Pad-%d: x" % i for i in range(300)]
    data = "\r\n".join(pad + ["Subject: secret"]) + "\r\n\r\nbody"
    q = send(inst.smtp_port, "a@client.example", ["user@local.test"], data,
             tls=False)
    assert_flagged_by(message(inst.pg, q), rid)


def test_bad_rule_does_not_freeze_lists(inst):
    """Design, Receiving (lists reloaded on NOTIFY): a rule with an invalid
    regular expression (inserted with SQL) must not stop other list changes
    from taking effect, e.g. a new local domain."""
    add_rule(inst.pg, [{"field": "header", "header": "Subject",
                        "match": "regex", "value": "(["}])
    add_domain(inst.pg, "after-bad-rule.test")
    ok = wait_for(lambda: rcpt_reply(inst.smtp_port,
                                     "u@after-bad-rule.test")[0] == 250,
                  timeout=20)
    assert ok, "the new domain never became local"


# ================================================================ PROXY

def test_proxy_protocol_real_client(inst, sg_instance, pg):
    """Issue 3, item 8: behind nginx's PROXY protocol listener the real
    client address (192.0.2.7, only text in the header) is recorded and
    drives relay control: with 127.0.0.0/8 the only relay network, the
    proxied client may not relay while a direct 127.0.0.1 client may."""
    p2 = free_port()
    s2 = sg_instance(extra_mail_server="listen 127.0.0.1:%d proxy_protocol;\n"
                                       "set_real_ip_from 127.0.0.1;" % p2)
    proxy = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 25\r\n"
    add_domain(pg)
    add_relay(pg, "127.0.0.0/8")
    assert wait_for(lambda: rcpt_reply(s2.smtp_port,
                                       "user@other.example")[0] == 250)
    assert wait_for(lambda: rcpt_reply(p2, "user@local.test",
                                       proxy=proxy)[0] == 250)
    assert code_enh(rcpt_reply(p2, "user@other.example", proxy=proxy)) == \
        (554, "5.7.1")
    assert "client 192.0.2.7, recipient <user@other.example>" in log_text(s2)
    qid = send(p2, "a@client.example", ["user@local.test"], proxy=proxy)
    m = message(pg, qid)
    assert m["client_ip"] == "192.0.2.7"
    assert m["client_port"] == 5555
    assert "[192.0.2.7]" in body_of(pg, qid).decode().split("\r\n")[0]
    assert wait_for(lambda: "sg: id=%s client=192.0.2.7 " % qid
                    in log_text(s2))
    # the whitelist uses the real address too
    add_whitelist(pg, "192.0.2.7", "ip")
    assert wait_for(lambda: "STARTTLS" not in ehlo_caps(p2, proxy=proxy))
    assert "STARTTLS" in ehlo_caps(s2.smtp_port)
    s2.reset_settings()


# ================================================================ queue API

def test_queue_api_shows_swaks_message(inst, swaks_msg):
    """Issue 3, done-when: a message sent with swaks --tls appears in
    GET /api/v1/queue with its TLS details and flags."""
    qid, sender = swaks_msg
    r = api(inst, "GET", "/api/v1/queue", params={"sender": sender})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["id"] for i in items] == [qid]
    it = items[0]
    m = message(inst.pg, qid)
    assert it["tls"] == {"protocol": m["tls_protocol"],
                         "cipher": m["tls_cipher"]}
    assert it["requiretls"] == {"flagged": False, "sources": []}
    assert it["tls_required_no"] is False
    assert it["client"]["ip"] == "127.0.0.1"
    assert it["recipients"][0]["address"] == "user@local.test"
    assert it["recipients"][0]["state"] == "queued"


def test_queue_api_filters(inst):
    """Issue 3, item 7: filters state, domain and sender; a bad state is
    422."""
    add_domain(inst.pg)
    add_domain(inst.pg, "local2.test")
    wait_local(inst.smtp_port)
    wait_local(inst.smtp_port, "local2.test")
    tag = time.monotonic_ns()
    s1, s2 = "f1-%d@client.example" % tag, "f2-%d@client.example" % tag
    q1 = send(inst.smtp_port, s1, ["u@local.test"], tls=False)
    q2 = send(inst.smtp_port, s2, ["u@local2.test"],
              mail_params=" REQUIRETLS")

    def ids(**params):
        r = api(inst, "GET", "/api/v1/queue", params=dict(limit=500, **params))
        assert r.status_code == 200, r.text
        return [i["id"] for i in r.json()["items"]]
    assert ids(sender=s1) == [q1]
    assert ids(sender=s2.upper()) == [q2]
    assert ids(sender=s1, domain="local2.test") == []
    assert ids(sender=s2, domain="LOCAL2.test") == [q2]
    assert q1 in ids(domain="local.test") and q2 not in ids(domain="local.test")
    assert ids(sender=s1, state="queued") == [q1]
    assert ids(sender=s1, state="delivered") == []
    it = api(inst, "GET", "/api/v1/queue", params={"sender": s2}).json()
    assert it["items"][0]["requiretls"] == {"flagged": True,
                                            "sources": ["parameter"]}
    assert it["items"][0]["tls"] is None or it["items"][0]["tls"]["protocol"]
    r = api(inst, "GET", "/api/v1/queue", params={"state": "frozen"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "state"
    for bad in ({"limit": 0}, {"limit": 501}, {"limit": "x"},
                {"cursor": "nonsense"}):
        r = api(inst, "GET", "/api/v1/queue", params=bad)
        assert r.status_code == 422, (bad, r.text)


def test_queue_api_pagination(inst):
    """Issue 3, item 7: limit=1 and next_cursor walk every message exactly
    once, newest first; a larger page walk returns every queued id."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    sender = "page-%d@client.example" % time.monotonic_ns()
    sent = [send(inst.smtp_port, sender, ["u@local.test"], tls=False)
            for _ in range(4)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"sender": sender, "limit": 1}
        if cursor:
            params["cursor"] = cursor
        doc = api(inst, "GET", "/api/v1/queue", params=params).json()
        assert len(doc["items"]) <= 1
        seen += [i["id"] for i in doc["items"]]
        cursor = doc["next_cursor"]
        pages += 1
        assert pages <= 10
        if not cursor:
            break
    assert seen == list(reversed(sent))
    # the whole queue, 50 at a time
    all_ids, cursor = [], None
    for _ in range(1000):
        params = {"limit": 50}
        if cursor:
            params["cursor"] = cursor
        doc = api(inst, "GET", "/api/v1/queue", params=params).json()
        all_ids += [i["id"] for i in doc["items"]]
        cursor = doc["next_cursor"]
        if not cursor:
            break
    db = {r[0] for r in sql(inst.pg, "SELECT id FROM messages")}
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == db


def test_queue_api_get_one(inst, pg):
    """Issue 3, item 7: GET /api/v1/queue/{id} (upper or lower case id);
    an unknown id is 404; a read-only token may read the queue."""
    add_domain(pg)
    wait_local(inst.smtp_port)
    qid = send(inst.smtp_port, "one@client.example",
               ["user+requiretls@local.test"])
    r = api(inst, "GET", "/api/v1/queue/" + qid)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == qid and doc["sender"] == "one@client.example"
    assert doc["requiretls"] == {
        "flagged": True, "sources": ["address:user+requiretls@local.test"]}
    assert doc["recipients"][0]["address"] == "user@local.test"
    assert doc["recipients"][0]["original_address"] == \
        "user+requiretls@local.test"
    assert doc["recipients"][0]["local_domain"] is True
    assert doc["tls"]["protocol"] in ("TLSv1.2", "TLSv1.3")
    r = api(inst, "GET", "/api/v1/queue/" + qid.lower())
    assert r.status_code == 200 and r.json()["id"] == qid
    for bad in ("0123456789ABCDEF", "XYZ", "0123456789abcdeg"):
        assert api(inst, "GET", "/api/v1/queue/" + bad).status_code == 404
    ro = create_token(pg.conninfo, "ro-%d" % time.monotonic_ns(), "read-only")
    r = api(inst, "GET", "/api/v1/queue/" + qid, token=ro)
    assert r.status_code == 200 and r.json()["id"] == qid
    r = api(inst, "GET", "/api/v1/queue", token=ro, params={"limit": 1})
    assert r.status_code == 200
    assert api(inst, "GET", "/api/v1/queue", token=None).status_code == 401


# ================================================================ log line

def test_one_log_line_per_transaction(inst):
    """Issue 3, item 9: one log line per transaction with the queue id,
    client, TLS protocol/cipher, sender, recipients, size and result."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    with Client(inst.smtp_port) as c:
        c.ehlo()
        c.starttls()
        c.ehlo()
        ver = c.sock.version()
        cipher = c.sock.cipher()[0]
        code, lines = c.message("log@client.example",
                                ["a@local.test", "b+requiretls@local.test"],
                                make_data("log"))
        assert code == 250, lines
        q1 = QUEUED_RE.search(lines[-1]).group(1)
        code, lines = c.message("log2@client.example", ["c@local.test"],
                                make_data("log2"))
        q2 = QUEUED_RE.search(lines[-1]).group(1)
    q3 = send(inst.smtp_port, "log3@client.example", ["d@local.test"],
              tls=False)
    sizes = {q: message(inst.pg, q)["size"] for q in (q1, q2, q3)}

    def lines_for(q):
        return [l for l in log_text(inst).splitlines()
                if "sg: id=%s " % q in l]
    assert wait_for(lambda: all(lines_for(q) for q in (q1, q2, q3)))
    (l1,) = lines_for(q1)
    assert re.search(r"sg: id=%s client=127\.0\.0\.1 tls=%s/%s"
                     r" from=<log@client\.example>"
                     r" to=<a@local\.test>,<b\+requiretls@local\.test>"
                     r" size=\d+ " % (q1, re.escape(ver), re.escape(cipher)),
                     l1), l1
    assert 'result="250 queued"' in l1, l1
    (l2,) = lines_for(q2)
    assert "from=<log2@client.example> to=<c@local.test>" in l2
    assert 'result="250 queued"' in l2
    (l3,) = lines_for(q3)
    assert "client=127.0.0.1 tls=none from=<log3@client.example>" in l3
    assert 'result="250 queued"' in l3


def _log_line(inst, qid):
    def get():
        return [l for l in log_text(inst).splitlines()
                if "sg: id=%s " % qid in l]
    lines = wait_for(get)
    assert len(lines) == 1, lines
    return lines[0]


def test_log_size_is_queued_size(inst):
    """Issue 3, item 9: the size in the log line is the size of the queued
    message (messages.size, what GET /api/v1/queue reports)."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    qid = send(inst.smtp_port, "size@client.example", ["u@local.test"],
               tls=False)
    size = message(inst.pg, qid)["size"]
    assert " size=%d " % size in _log_line(inst, qid)


def test_log_requiretls_matches_flag(inst):
    """Issue 3, item 9 and RFC 8689: the log line does not contradict the
    queued flag: a message flagged by a +requiretls recipient is not logged
    as requiretls=no."""
    add_domain(inst.pg)
    wait_local(inst.smtp_port)
    qid = send(inst.smtp_port, "flag@client.example",
               ["u+requiretls@local.test"])
    assert message(inst.pg, qid)["requiretls"] is True
    assert "requiretls=no" not in _log_line(inst, qid)


def test_starttls_falls_back_to_nginx_conf_certificate(inst, pg):
    """Issue 3, item 2: the nginx.conf certificate is the fallback: with no
    active certificate (and TLS enabled) STARTTLS is still offered and
    serves the mail server's ssl_certificate; activating a stored one
    switches to it without a reload."""
    with open(inst.cert_file) as f:
        conf_der = ssl.PEM_cert_to_DER_cert(f.read())
    other_pem, other_key = make_self_signed("mx3.example")
    other_id = store_certificate(pg.conninfo, other_pem, other_key,
                                 "mx3.example", activate=False)
    other_der = ssl.PEM_cert_to_DER_cert(other_pem)
    master = inst.nginx.pid
    try:
        patch_settings(inst, {"active_certificate_id": other_id})
        assert wait_for(lambda: tls_cert_der(inst.smtp_port)[0] == other_der)
        patch_settings(inst, {"active_certificate_id": None})
        assert wait_for(lambda: tls_cert_der(inst.smtp_port)[0] == conf_der)
        assert "STARTTLS" in ehlo_caps(inst.smtp_port)
        assert inst.nginx.pid == master
    finally:
        inst.reset_settings()
