"""Receiving peers for sg's outbound delivery tests (loopback only).

    TestCA          a CA made with python3-cryptography in a temporary folder:
                    ca.cert_file, ca.issue(names, ...) -> (cert_file, key_file),
                    ca.untrusted (a second CA nobody trusts), ca.mismatched(),
                    ca.intermediate(), ca.client_context()
    SmtpSink        a scriptable SMTP server in threads that records every
                    session: raw bytes (clear and inside TLS), commands (with a
                    "pipelined" flag), TLS facts (version, cipher, SNI),
                    envelopes and dot-unstuffed message data
    ReplySequence   replies handed out in order (the last one repeats), for
                    "451 first, 250 on the retry"
    PostfixMX       a private Postfix (master -c DIR -d, our child) on 127.0.0.x:25
                    delivering the test domains into a Maildir, logging to a
                    file (TLS lines included)
    mail_text(), send_via_smtp(), tlsa(), wait_for(), loopback_host()
    fixtures        peer_ca (session), smtp_sinks (function: a factory whose
                    sinks are stopped at teardown); import them into a test
                    module to use them

Every peer listens on a loopback address only and is stopped by .stop()
(idempotent), by its context manager, or at interpreter exit at the latest.
"""

import atexit
import datetime
import email
import email.message
import email.policy
import email.utils
import errno
import grp
import hashlib
import ipaddress
import itertools
import os
import pty
import pwd
import re
import secrets
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEEP_TMP = bool(os.environ.get("SG_KEEP_TMP"))
IS_ROOT = os.geteuid() == 0
MASTER = "/usr/lib/postfix/sbin/master"

# --------------------------------------------------------------- utilities


def make_tmp(prefix="sgpeer-"):
    """A fresh folder in /tmp, mode 0755 (Postfix daemons must reach it)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


def remove_tmp(d):
    if d and not KEEP_TMP:
        shutil.rmtree(d, ignore_errors=True)


def wait_for(predicate, timeout=10.0, interval=0.02, message=None):
    """Poll predicate() until it returns something truthy; return that value.
    On timeout raise AssertionError (message: a string or a callable giving
    one, e.g. lambda: sink.dump())."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if callable(message):
                message = message()
            raise AssertionError("timed out after %.1fs waiting for %s%s" % (
                timeout, getattr(predicate, "__name__", "condition"),
                "\n" + message if message else ""))
        time.sleep(interval)


_loopback_lock = threading.Lock()
_loopback_next = [10 + os.getpid() % 200]


def _bindable(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def loopback_host(port=25):
    """A 127.0.0.N (N in 10..250, a different one at each call, cycling)
    where port is free now. Port 25 needs root; without root any address
    works with a free port."""
    with _loopback_lock:
        for _ in range(241):
            n = _loopback_next[0]
            _loopback_next[0] = 10 + (n - 10 + 1) % 241
            host = "127.0.0.%d" % n
            if not IS_ROOT and port < 1024:
                return host
            if _bindable(host, port):
                return host
    raise RuntimeError("no loopback address with port %d free" % port)


def _listening(host, port):
    """True when something LISTENs on host:port (read from /proc/net/tcp,
    so the check itself makes no connection)."""
    want = proc_tcp_address(host, port)
    return any(s["local"] == want and s["state"] == "0A"
               for s in proc_tcp_sockets())


def proc_tcp_address(host, port):
    """host:port (IPv4) as /proc/net/tcp writes it."""
    return "%s:%04X" % ("".join("%02X" % int(b)
                                for b in reversed(host.split("."))), port)


def proc_tcp_sockets():
    """The IPv4 TCP sockets of /proc/net/tcp: dicts with local, remote
    (as proc_tcp_address writes them), state (hex, "0A" for LISTEN) and
    rx_queue (bytes received and not read yet)."""
    try:
        with open("/proc/net/tcp") as f:
            lines = f.readlines()[1:]
    except OSError:
        return []
    sockets = []
    for line in lines:
        parts = line.split()
        sockets.append({"local": parts[1], "remote": parts[2],
                        "state": parts[3],
                        "rx_queue": int(parts[4].split(":")[1], 16)})
    return sockets


_live = set()
_live_lock = threading.Lock()


def _register(peer):
    with _live_lock:
        _live.add(peer)


def _unregister(peer):
    with _live_lock:
        _live.discard(peer)


@atexit.register
def _stop_leftovers():
    with _live_lock:
        peers = list(_live)
    for p in peers:
        try:
            p.stop()
        except Exception:
            pass


# ---------------------------------------------------------------- test CA


class _RsaPool:
    """RSA 2048 keys made ahead by a background thread (a key takes about a
    second here; OpenSSL releases the GIL meanwhile). Every key is handed
    out once only, so certificates never share a key by accident."""

    SIZE = 3

    def __init__(self):
        self._keys = []
        self._cond = threading.Condition()
        self._thread = None

    def _fill(self):
        while True:
            with self._cond:
                while len(self._keys) >= self.SIZE:
                    self._cond.wait()
            k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            with self._cond:
                self._keys.append(k)
                self._cond.notify_all()

    def start(self):
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill, daemon=True,
                                                name="rsa-key-pool")
                self._thread.start()

    def get(self):
        self.start()
        with self._cond:
            while not self._keys:
                self._cond.wait()
            k = self._keys.pop(0)
            self._cond.notify_all()
            return k


_rsa_pool = _RsaPool()


def _new_key(key_type):
    kt = key_type.lower()
    if kt in ("rsa", "rsa2048"):
        return _rsa_pool.get()
    if kt.startswith("rsa"):
        bits = int(kt[3:].lstrip("-"))
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if kt in ("ec", "ecdsa", "ec256", "ecdsa-p256", "p256", "ecdsa256"):
        return ec.generate_private_key(ec.SECP256R1())
    if kt in ("ec384", "ecdsa-p384", "p384", "ecdsa384"):
        return ec.generate_private_key(ec.SECP384R1())
    if kt == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError("key_type %r: use rsa, rsa1024, rsa4096, ec, ec384 "
                     "or ed25519" % key_type)


def _sign_hash(key):
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _san(name):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class TestCA:
    """A certificate authority in a folder (made with make_tmp() when
    directory is None; removed by .cleanup() unless SG_KEEP_TMP is set).

        ca.cert_file / ca.cert_pem    the CA certificate (trust anchor)
        ca.issue(names, ...)          -> (cert_file, key_file)
        ca.untrusted                  another CA, same API, that nobody trusts
        ca.mismatched(...)            a good certificate for a name nobody asks
        ca.self_signed(names)         a self-signed leaf
        ca.intermediate()             a sub-CA; its leaves' cert_file holds the
                                      chain (leaf, then the intermediates)
        ca.client_context()           ssl.SSLContext trusting this CA
    """

    __test__ = False  # not a pytest test class

    MISMATCH_NAME = "wrong-name.invalid"

    def __init__(self, directory=None, name="sg Test Root CA", key_type="ec",
                 _parent=None):
        self._own_dir = directory is None
        self.directory = directory or make_tmp("sgca-")
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        self.name = name
        self.parent = _parent
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._untrusted = None
        _rsa_pool.start()      # leaves are RSA by default: start making keys
        self.key = _new_key(key_type)
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                "sg tests")])
        issuer_name = _parent.cert.subject if _parent else subject
        issuer_key = _parent.key if _parent else self.key
        b = (x509.CertificateBuilder()
             .subject_name(subject).issuer_name(issuer_name)
             .public_key(self.key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=3650))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                            critical=True)
             .add_extension(x509.KeyUsage(
                 digital_signature=True, content_commitment=False,
                 key_encipherment=False, data_encipherment=False,
                 key_agreement=False, key_cert_sign=True, crl_sign=True,
                 encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                 self.key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 issuer_key.public_key()), critical=False))
        self.cert = b.sign(issuer_key, _sign_hash(issuer_key))
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.cert_file = _write(os.path.join(self.directory, "ca.crt"),
                                self.cert_pem)
        self.key_file = _write(os.path.join(self.directory, "ca.key"),
                               _key_pem(self.key), 0o600)

    # chain of intermediates (PEM) appended to leaves this CA issues
    @property
    def chain_pem(self):
        if self.parent is None:
            return b""
        return self.cert_pem + self.parent.chain_pem

    @property
    def root(self):
        return self.parent.root if self.parent else self

    def _base(self, names):
        n = next(self._counter)
        tag = re.sub(r"[^A-Za-z0-9.-]", "_", names[0] if names else "leaf")[:40]
        return os.path.join(self.directory, "%03d-%s" % (n, tag))

    def issue(self, names, expired=False, not_yet_valid=False, key_type="rsa",
              cn=None, days=30, client=True, self_signed=False, key_file=None):
        """A leaf certificate for names (str or list; DNS SANs, IP SANs for
        IP strings; the CN is cn or the first name). Returns
        (cert_file, key_file); cert_file holds the leaf then any
        intermediate certificates. key_type: rsa (2048), rsa1024, rsa4096,
        ec (P-256), ec384, ed25519. Each certificate gets a new key unless
        key_file names one to reuse (a renewal with the same key)."""
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if key_file is not None:
            with open(key_file, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
        else:
            key = _new_key(key_type)
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            nb, na = now - datetime.timedelta(days=60), now - datetime.timedelta(days=1)
        elif not_yet_valid:
            nb, na = now + datetime.timedelta(days=30), now + datetime.timedelta(days=90)
        else:
            nb, na = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
        cn = cn if cn is not None else (names[0] if names else "sg test leaf")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])])
        signer = key if self_signed else self.key
        issuer = subject if self_signed else self.cert.subject
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
        if client:
            eku.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        b = (x509.CertificateBuilder()
             .subject_name(subject).issuer_name(issuer)
             .public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(nb).not_valid_after(na)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                            critical=True)
             .add_extension(x509.KeyUsage(
                 digital_signature=True, content_commitment=False,
                 key_encipherment=is_rsa, data_encipherment=False,
                 key_agreement=False, key_cert_sign=False, crl_sign=False,
                 encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                 key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 signer.public_key()), critical=False))
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(
                [_san(n) for n in names]), critical=False)
        cert = b.sign(signer, _sign_hash(signer))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        if not self_signed:
            pem += self.chain_pem
        with self._lock:
            base = self._base(names)
        return (_write(base + ".crt", pem),
                _write(base + ".key", _key_pem(key), 0o600))

    def mismatched(self, name=None, **kw):
        """A valid certificate from this CA whose only name is `name`
        (default wrong-name.invalid), i.e. matching no test host."""
        return self.issue([name or self.MISMATCH_NAME], **kw)

    def self_signed(self, names, **kw):
        """A self-signed leaf (no CA trusts it)."""
        return self.issue(names, self_signed=True, **kw)

    @property
    def untrusted(self):
        """A second, independent CA (in a subfolder); nothing trusts it."""
        with self._lock:
            if self._untrusted is None:
                self._untrusted = TestCA(
                    os.path.join(self.directory, "untrusted"),
                    name="sg Untrusted CA")
            return self._untrusted

    def intermediate(self, name="sg Test Intermediate CA", key_type="ec"):
        with self._lock:
            n = next(self._counter)
        return TestCA(os.path.join(self.directory, "intermediate-%d" % n),
                      name=name, key_type=key_type, _parent=self)

    def client_context(self, check_hostname=True):
        """An ssl client context trusting only this CA's root."""
        ctx = ssl.create_default_context(cafile=self.root.cert_file)
        ctx.check_hostname = check_hostname
        return ctx

    def cleanup(self):
        if self._own_dir:
            remove_tmp(self.directory)


def tlsa(cert_file, usage=3, selector=1, mtype=1):
    """TLSA record data for the first certificate in cert_file:
    (usage, selector, mtype, hex). selector 0 = full cert, 1 = SPKI;
    mtype 0 = exact, 1 = SHA-256, 2 = SHA-512."""
    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    if selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return usage, selector, mtype, data.hex()


# -------------------------------------------------------------- SMTP sink


class ReplySequence:
    """Replies handed out in order, one per use; the last one repeats.
    Usable wherever SmtpSink takes a reply:
        final_reply=ReplySequence("451 4.3.0 try later", "250 2.0.0 Ok")"""

    def __init__(self, *replies):
        if not replies:
            raise ValueError("ReplySequence needs at least one reply")
        self._replies = list(replies)
        self._lock = threading.Lock()
        self.used = 0

    def __call__(self, session, obj):
        with self._lock:
            r = self._replies[min(self.used, len(self._replies) - 1)]
            self.used += 1
        return r


class Command:
    """One command line as received.
    verb (upper case), arg, line (str, no line end), raw (bytes, with the
    line end), tls (inside TLS), pipelined (it was already received when the
    server sent its previous reply), reply (the reply sent, or None)."""

    def __init__(self, raw, tls, pipelined):
        self.raw = bytes(raw)
        self.line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        verb, _, arg = self.line.partition(" ")
        self.verb = verb.upper()
        self.arg = arg
        self.tls = tls
        self.pipelined = pipelined
        self.reply = None

    def __repr__(self):
        return "<%s%s %r -> %r>" % ("TLS " if self.tls else "",
                                    "pipelined" if self.pipelined else "",
                                    self.line, self.reply)


class Rcpt:
    """address, params (dict, upper-case keys; value None for a bare
    keyword), line, reply, accepted (2xx)."""

    def __init__(self, address, params, line, reply):
        self.address, self.params, self.line, self.reply = address, params, line, reply

    @property
    def accepted(self):
        return self.reply.startswith("2")

    def __repr__(self):
        return "<Rcpt %s %r %s>" % (self.address, self.params, self.reply[:3])


class Transaction:
    """One mail transaction (from an accepted MAIL on).

    mail_from, mail_params (dict), mail_line, rcpts [Rcpt], data (bytes,
    dot-unstuffed, None until DATA/BDAT), data_raw (bytes as received, without
    the final '.' line), complete (the final '.' or BDAT LAST arrived),
    final_reply, final_at (time.time() as the final reply was sent), queue_id
    (in the sink's 250), tls, bdat, data_pipelined
    (message bytes arrived before the 354), bare_lf (a line ended in a bare
    LF), aborted (RSET/new session/drop before completion), session."""

    def __init__(self, session, mail_from, params, line):
        self.session = session
        self.mail_from, self.mail_params, self.mail_line = mail_from, params, line
        self.rcpts = []
        self.data = None
        self.data_raw = None
        self.complete = False
        self.final_reply = None
        self.final_at = None
        self.queue_id = None
        self.tls = session.tls
        self.bdat = False
        self.data_pipelined = False
        self.bare_lf = False
        self.aborted = False

    @property
    def accepted_rcpts(self):
        return [r.address for r in self.rcpts if r.accepted]

    @property
    def accepted(self):
        """Message completely received and answered 2xx."""
        return bool(self.complete and self.final_reply
                    and self.final_reply.startswith("2"))

    @property
    def message(self):
        """The data parsed with the email package (policy.default)."""
        return email.message_from_bytes(self.data or b"",
                                        policy=email.policy.default)

    def __repr__(self):
        return "<Transaction from=%s to=%s %d bytes%s %s>" % (
            self.mail_from, self.accepted_rcpts,
            len(self.data or b""), " complete" if self.complete else "",
            self.final_reply)


class Session:
    """One SMTP connection.

    peer (host, port), started (time.time()), raw_clear (bytes from the
    client before TLS, including anything sent after the STARTTLS line before
    the handshake), raw_tls (decrypted bytes from the client), commands
    [Command], replies [str], helo (EHLO/HELO argument; the last one),
    helo_verb, tls (bool), tls_version, tls_cipher (name), sni (server name
    the client sent, or None), tls_error (handshake failure text),
    starttls_injected (bytes that followed STARTTLS in the same flight),
    quit_at (time.time() when QUIT arrived, or None),
    transactions [Transaction], closed (bool), end ("quit", "client closed",
    "dropped in data", "dropped after dot", "tls failed", "timeout",
    "stopped", "421", "error: ..."), error (exception text if any)."""

    def __init__(self, peer):
        self.peer = peer
        self.started = time.time()
        self.raw_clear = b""
        self.raw_tls = b""
        self.commands = []
        self.replies = []
        self.helo = None
        self.helo_verb = None
        self.tls = False
        self.tls_version = None
        self.tls_cipher = None
        self.sni = None
        self.tls_error = None
        self.starttls_injected = b""
        self.transactions = []
        self.closed = False
        self.ended = None
        self.quit_at = None         # time.time() when QUIT arrived
        self.end = None
        self.error = None

    @property
    def verbs(self):
        return [c.verb for c in self.commands]

    def transcript(self):
        out = ["session from %s:%d%s" % (self.peer[0], self.peer[1],
                                         " (TLS %s, SNI %s)" % (self.tls_version, self.sni)
                                         if self.tls else "")]
        for c in self.commands:
            out.append("  C: %s%s%s" % ("[tls] " if c.tls else "",
                                         "[p] " if c.pipelined else "", c.line))
            if c.reply is not None:
                out.append("  S: " + c.reply.replace("\r\n", "\n     "))
        for t in self.transactions:
            out.append("  %r" % t)
        out.append("  end: %s%s" % (self.end, " (%s)" % self.error if self.error else ""))
        return "\n".join(out)

    def __repr__(self):
        return "<Session %s:%d %s %d cmds %d txns%s>" % (
            self.peer[0], self.peer[1], "TLS" if self.tls else "clear",
            len(self.commands), len(self.transactions),
            " closed:%s" % self.end if self.closed else "")


class _Drop(Exception):
    """Close the connection now (session.end = args[0])."""


DEFAULT_EHLO = ["PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES",
                "DSN", "SMTPUTF8"]

_TLS_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.0": ssl.TLSVersion.TLSv1,
                 "TLSv1.1": ssl.TLSVersion.TLSv1_1, "TLSv1.2": ssl.TLSVersion.TLSv1_2,
                 "TLSv1.3": ssl.TLSVersion.TLSv1_3}

_PATH_RE = re.compile(r"^(?:FROM|TO):\s*(<[^>]*>|[^\s<>]+)(.*)$", re.I | re.S)


def _tls_version(v):
    if v is None or isinstance(v, ssl.TLSVersion):
        return v
    return _TLS_VERSIONS[v]


def _format_reply(text):
    """'550 5.1.1 no' -> '550 5.1.1 no\\r\\n'; several lines (separated by
    '\\n', each with or without its code) -> '250-a\\r\\n250 b\\r\\n'."""
    lines = text.split("\n")
    code = lines[0][:3]
    out = []
    for i, line in enumerate(lines):
        line = line.rstrip("\r")
        if line[:3] == code and line[3:4] in ("", " ", "-"):
            line = line[4:]
        sep = " " if i == len(lines) - 1 else "-"
        out.append(code + sep + line + "\r\n")
    return "".join(out)


def _params(text):
    out = {}
    for p in text.split():
        k, eq, v = p.partition("=")
        out[k.upper()] = v if eq else None
    return out


class SmtpSink:
    """A scriptable SMTP server on loopback. Starts listening at once.

    host: 127.0.0.x (default: loopback_host()); port: default 25 as root,
    else a free port. sink.host, sink.port, sink.address.

    hostname            name in the banner, EHLO and default replies
    banner              greeting text (default "220 <hostname> ESMTP sg test
                        sink"); a non-220 banner answers every command but
                        QUIT with 503; a 421 banner closes at once
    ehlo                capabilities advertised before TLS (list; default
                        DEFAULT_EHLO plus STARTTLS when tls or tls_fail is set)
    ehlo_tls            capabilities after TLS (default: ehlo minus STARTTLS)
    helo_only           EHLO answered 502 (HELO works)
    tls                 (cert_file, key_file) for STARTTLS (e.g. ca.issue(..))
    tls_fail            answer 220 to STARTTLS then fail: True/"close" closes
                        the connection, "garbage" sends non-TLS bytes first
    starttls_inject     bytes sent right after the 220 reply to STARTTLS, in
                        the same sendall(), before the handshake (RFC 3207,
                        4.2: a client must ignore them); default None
    tls_min_version, tls_max_version   "TLSv1".."TLSv1.3" or ssl.TLSVersion
    tls_ciphers         OpenSSL cipher string (TLS <= 1.2)
    mail_reply          reply to MAIL (default 250 2.1.0 Ok)
    rcpt_replies        {address: reply} (address compared case-insensitively)
    rcpt_reply          reply to other RCPTs (default 250 2.1.5 Ok)
    max_rcpts           RCPTs beyond this number get 452 4.5.3
    data_reply          reply to DATA (default 354 ...; a non-3xx ends the
                        transaction)
    final_reply         reply after the final '.' / BDAT LAST (default
                        "250 2.0.0 Ok: queued as <hex>")
    replies             {VERB: reply} overrides for EHLO, HELO, STARTTLS, RSET,
                        NOOP, QUIT, VRFY, BDAT (non-LAST chunks), ...
    stall_in_data       seconds to stop reading after the 354 reply (the
                        client's writes then block once the socket buffers
                        are full)
    drop_in_data        close mid-DATA after receiving message bytes: True =
                        after the first ones, an int = after at least that many
    drop_after_dot      close after the final '.' without replying
    delays              {step: seconds} before the reply: banner, ehlo, helo,
                        starttls, mail, rcpt, data, dot (final reply), rset,
                        quit, noop, bdat
    timeout             idle timeout per connection (seconds)

    A reply is a string ("550 5.1.1 no such user"; lines separated by "\\n"
    make a multi-line reply), a callable (session, obj) -> string (obj: the
    Transaction, the RCPT address or the Command), or a ReplySequence.
    A reply with code 421 closes the connection after it is sent.
    Options are attributes: change them between connections if needed.

    Records: sink.sessions [Session], sink.transactions (all),
    sink.messages (transactions with complete data answered 2xx).
    Waits: sink.wait_for(pred, timeout), sink.wait_messages(n, timeout),
    sink.wait_sessions(n, timeout, closed=False). sink.dump() -> transcript.
    """

    def __init__(self, host=None, port=None, *, hostname="sink.test",
                 banner=None, ehlo=None, ehlo_tls=None, helo_only=False,
                 tls=None, tls_fail=False, starttls_inject=None,
                 tls_min_version=None,
                 tls_max_version=None, tls_ciphers=None,
                 mail_reply=None, rcpt_replies=None, rcpt_reply=None,
                 max_rcpts=None, data_reply=None, final_reply=None,
                 replies=None, drop_in_data=False, drop_after_dot=False,
                 stall_in_data=None,
                 delays=None, timeout=60):
        if port is None:
            port = 25 if IS_ROOT else 0
        if host is None:
            host = loopback_host(port) if port else "127.0.0.1"
        if not (host.startswith("127.") or host == "::1"):
            raise ValueError("SmtpSink listens on loopback only, not %r" % host)
        self.hostname = hostname
        self.banner = banner
        self.ehlo = ehlo
        self.ehlo_tls = ehlo_tls
        self.helo_only = helo_only
        self.tls = tls
        self.tls_fail = tls_fail
        self.starttls_inject = starttls_inject
        self.tls_min_version = tls_min_version
        self.tls_max_version = tls_max_version
        self.tls_ciphers = tls_ciphers
        self.mail_reply = mail_reply
        self.rcpt_replies = rcpt_replies or {}
        self.rcpt_reply = rcpt_reply
        self.max_rcpts = max_rcpts
        self.data_reply = data_reply
        self.final_reply = final_reply
        self.replies = replies or {}
        self.drop_in_data = drop_in_data
        self.stall_in_data = stall_in_data
        self.drop_after_dot = drop_after_dot
        self.delays = delays or {}
        self.timeout = timeout

        self.sessions = []
        self._lock = threading.Lock()
        self._conns = set()
        self._threads = []
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(128)
        self.host, self.port = self._listener.getsockname()[:2]
        self.address = (self.host, self.port)
        _register(self)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="smtpsink-%s:%d" % self.address,
            daemon=True)
        self._accept_thread.start()

    # ---- life cycle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        """Stop listening, close every connection, join the threads."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                socket.socket.shutdown(c, socket.SHUT_RDWR)
            except OSError:
                pass
        self._accept_thread.join(5)
        for t in list(self._threads):
            t.join(5)
        _unregister(self)

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                r, _, _ = select.select([self._listener], [], [], 0.1)
            except (OSError, ValueError):
                return
            if not r:
                continue
            try:
                conn, peer = self._listener.accept()
            except OSError:
                continue
            s = Session(peer)
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self.sessions.append(s)
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn, s),
                                 name="smtpsink-session", daemon=True)
            self._threads.append(t)
            t.start()

    # ---- records and waits

    @property
    def transactions(self):
        with self._lock:
            sessions = list(self.sessions)
        return [t for s in sessions for t in list(s.transactions)]

    @property
    def messages(self):
        return [t for t in self.transactions if t.accepted]

    def wait_for(self, predicate, timeout=10.0, message=None):
        return wait_for(predicate, timeout, message=message or self.dump)

    def wait_messages(self, n=1, timeout=10.0):
        """Wait until at least n messages were accepted; return them all."""
        def enough_messages():
            m = self.messages
            return m if len(m) >= n else None
        return self.wait_for(enough_messages, timeout)

    def wait_sessions(self, n=1, timeout=10.0, closed=False):
        """Wait until n sessions started (and ended, with closed=True)."""
        def enough_sessions():
            with self._lock:
                s = list(self.sessions)
            if closed:
                s = [x for x in s if x.closed]
            return s if len(s) >= n else None
        return self.wait_for(enough_sessions, timeout)

    def clear(self):
        """Forget finished sessions (running ones stay)."""
        with self._lock:
            self.sessions = [s for s in self.sessions if not s.closed]

    def dump(self):
        with self._lock:
            sessions = list(self.sessions)
        return "sink %s:%d, %d sessions\n%s" % (
            self.host, self.port, len(sessions),
            "\n".join(s.transcript() for s in sessions))

    # ---- protocol

    def _pick(self, value, default, session, obj):
        if value is None:
            return default
        if callable(value):
            value = value(session, obj)
            return default if value is None else value
        return value

    def _capabilities(self, tls):
        if tls and self.ehlo_tls is not None:
            return list(self.ehlo_tls)
        if self.ehlo is not None:
            caps = list(self.ehlo)
        else:
            caps = list(DEFAULT_EHLO)
            if self.tls or self.tls_fail:
                caps.append("STARTTLS")
        if tls:
            caps = [c for c in caps if c.upper() != "STARTTLS"]
        return caps

    def _size_limit(self, tls):
        for c in self._capabilities(tls):
            parts = c.split()
            if parts[0].upper() == "SIZE" and len(parts) > 1 and parts[1].isdigit():
                return int(parts[1]) or None
        return None

    def _serve(self, conn, s):
        conn.settimeout(self.timeout)
        h = _Handler(self, conn, s)
        try:
            h.run()
        except _Drop as e:
            s.end = e.args[0]
            if s.end == "client closed" and self._stopping.is_set():
                s.end = "stopped"
        except socket.timeout:
            s.end = "timeout"
        except (ConnectionError, ssl.SSLError, OSError) as e:
            s.end = "stopped" if self._stopping.is_set() else "client closed"
            if not self._stopping.is_set() and not isinstance(e, ConnectionError):
                s.error = "%s: %s" % (type(e).__name__, e)
        except Exception as e:  # a bug here: keep it visible in the records
            s.end = "error: %r" % e
            s.error = repr(e)
        finally:
            h.close()
            with self._lock:
                self._conns.discard(conn)
                self._conns.discard(h.sock)
            s.closed = True
            s.ended = time.time()


class _Handler:
    def __init__(self, sink, conn, session):
        self.sink, self.sock, self.s = sink, conn, session
        self.buf = bytearray()
        self.pre = 0            # bytes already buffered when the last reply was sent
        self.txn = None
        self.rejected_banner = False

    # -- I/O

    def close(self):
        try:
            socket.socket.close(self.sock)
        except OSError:
            pass

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise _Drop("client closed")
        if self.s.tls:
            self.s.raw_tls += data
        else:
            self.s.raw_clear += data
        self.buf += data

    def readline(self):
        """(line bytes with its end, pipelined)."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                n = i + 1
                line = bytes(self.buf[:n])
                pipelined = n <= self.pre
                del self.buf[:n]
                self.pre = max(0, self.pre - n)
                return line, pipelined
            if len(self.buf) > 1 << 20:
                raise _Drop("line too long")
            self._recv()

    def read_exact(self, n, on_progress=None):
        out = bytearray()
        while len(out) < n:
            if not self.buf:
                self._recv()
            k = min(n - len(out), len(self.buf))
            out += self.buf[:k]
            del self.buf[:k]
            self.pre = max(0, self.pre - k)
            if on_progress:
                on_progress(len(out))
        return bytes(out)

    def send(self, text, step=None, cmd=None, extra=b""):
        delay = self.sink.delays.get(step) if step else None
        if delay:
            self.sink._stopping.wait(delay)
        wire = _format_reply(text)
        self.s.replies.append(wire.rstrip("\r\n"))
        if cmd is not None:
            cmd.reply = wire.rstrip("\r\n")
        self.pre = len(self.buf)
        self.sent_at = time.time()      # the reply leaves now
        self.sock.sendall(wire.encode("utf-8") + extra)
        if text.startswith("421"):
            raise _Drop("421")

    # -- session

    def run(self):
        sk = self.sink
        banner = sk.banner or "220 %s ESMTP sg test sink" % sk.hostname
        self.send(banner, "banner")
        self.rejected_banner = not banner.startswith("220")
        while True:
            raw, pipelined = self.readline()
            cmd = Command(raw, self.s.tls, pipelined)
            self.s.commands.append(cmd)
            self.dispatch(cmd)

    def reply_for(self, verb, default, obj=None):
        return self.sink._pick(self.sink.replies.get(verb), default, self.s, obj)

    def end_txn(self):
        if self.txn is not None and not self.txn.complete:
            self.txn.aborted = True
        self.txn = None

    def dispatch(self, cmd):
        sk, s, v = self.sink, self.s, cmd.verb
        if v == "QUIT":
            s.quit_at = time.time()
            self.send(self.reply_for("QUIT", "221 2.0.0 Bye", cmd), "quit", cmd)
            raise _Drop("quit")
        if self.rejected_banner:
            return self.send("503 5.5.1 Error: no SMTP service here", None, cmd)
        if v == "EHLO":
            if sk.helo_only:
                return self.send(self.reply_for(
                    "EHLO", "502 5.5.2 Error: command not recognized", cmd), "ehlo", cmd)
            self.end_txn()
            s.helo, s.helo_verb = cmd.arg, v
            caps = sk._capabilities(s.tls)
            text = "\n".join(["250 %s" % sk.hostname] + ["250 " + c for c in caps])
            return self.send(self.reply_for("EHLO", text, cmd), "ehlo", cmd)
        if v == "HELO":
            self.end_txn()
            s.helo, s.helo_verb = cmd.arg, v
            return self.send(self.reply_for("HELO", "250 %s" % sk.hostname, cmd), "helo", cmd)
        if v == "STARTTLS":
            return self.starttls(cmd)
        if v == "NOOP":
            return self.send(self.reply_for("NOOP", "250 2.0.0 Ok", cmd), "noop", cmd)
        if v == "RSET":
            self.end_txn()
            return self.send(self.reply_for("RSET", "250 2.0.0 Ok", cmd), "rset", cmd)
        if v == "VRFY":
            return self.send(self.reply_for("VRFY", "252 2.0.0 Send some mail", cmd), "vrfy", cmd)
        if v == "MAIL":
            return self.mail(cmd)
        if v == "RCPT":
            return self.rcpt(cmd)
        if v == "DATA":
            return self.data(cmd)
        if v == "BDAT":
            return self.bdat(cmd)
        if v in sk.replies:
            return self.send(self.reply_for(v, "", cmd), v.lower(), cmd)
        return self.send("502 5.5.2 Error: command not recognized", None, cmd)

    def starttls(self, cmd):
        sk, s = self.sink, self.s
        if s.tls:
            return self.send("503 5.5.1 Error: TLS already active", None, cmd)
        if not (sk.tls or sk.tls_fail):
            return self.send("502 5.5.1 Error: command not implemented", None, cmd)
        reply = self.reply_for("STARTTLS", "220 2.0.0 Ready to start TLS", cmd)
        inject = sk.starttls_inject if reply.startswith("220") else None
        self.send(reply, "starttls", cmd, extra=inject or b"")
        if not reply.startswith("220"):
            return
        # anything the client sent after STARTTLS in clear must be discarded
        s.starttls_injected = bytes(self.buf)
        self.buf.clear()
        self.pre = 0
        if sk.tls_fail:
            s.tls_error = "tls_fail=%s" % sk.tls_fail
            if sk.tls_fail == "garbage":
                self.sock.sendall(b"220 this is not TLS at all\r\n" * 4)
            raise _Drop("tls failed")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        minv, maxv = _tls_version(sk.tls_min_version), _tls_version(sk.tls_max_version)
        if minv is not None:
            if minv < ssl.TLSVersion.TLSv1_2:
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = minv
        if maxv is not None:
            ctx.maximum_version = maxv
        if sk.tls_ciphers:
            ctx.set_ciphers(sk.tls_ciphers)
        ctx.load_cert_chain(*sk.tls)

        def sni(sslobj, name, c):
            s.sni = name
        ctx.sni_callback = sni
        tsock = ctx.wrap_socket(self.sock, server_side=True,
                                do_handshake_on_connect=False)
        with sk._lock:
            sk._conns.discard(self.sock)
            sk._conns.add(tsock)
        self.sock = tsock
        try:
            tsock.do_handshake()
        except (ssl.SSLError, OSError) as e:
            s.tls_error = "%s: %s" % (type(e).__name__, e)
            raise _Drop("tls failed")
        s.tls = True
        s.tls_version = tsock.version()
        s.tls_cipher = (tsock.cipher() or (None,))[0]
        s.helo = s.helo_verb = None
        self.end_txn()

    def need_helo(self, cmd):
        if self.s.helo is None:
            self.send("503 5.5.1 Error: send HELO/EHLO first", None, cmd)
            return True
        return False

    def mail(self, cmd):
        sk, s = self.sink, self.s
        if self.need_helo(cmd):
            return
        if self.txn is not None:
            return self.send("503 5.5.1 Error: nested MAIL command", None, cmd)
        m = _PATH_RE.match(cmd.arg)
        if not m or not cmd.arg.upper().startswith("FROM:"):
            return self.send("501 5.5.4 Syntax: MAIL FROM:<address>", None, cmd)
        addr, params = m.group(1).strip("<>"), _params(m.group(2))
        txn = Transaction(s, addr, params, cmd.line)
        limit = sk._size_limit(s.tls)
        default = "250 2.1.0 Ok"
        size = params.get("SIZE")
        if limit and size and size.isdigit() and int(size) > limit:
            default = "552 5.3.4 Message size exceeds fixed limit"
        reply = sk._pick(sk.mail_reply, default, s, txn)
        if reply.startswith("2"):
            self.txn = txn
            s.transactions.append(txn)
        self.send(reply, "mail", cmd)

    def rcpt(self, cmd):
        sk, s = self.sink, self.s
        if self.txn is None:
            return self.send("503 5.5.1 Error: need MAIL command", None, cmd)
        m = _PATH_RE.match(cmd.arg)
        if not m or not cmd.arg.upper().startswith("TO:"):
            return self.send("501 5.5.4 Syntax: RCPT TO:<address>", None, cmd)
        addr, params = m.group(1).strip("<>"), _params(m.group(2))
        if sk.max_rcpts is not None and len(self.txn.rcpts) >= sk.max_rcpts:
            reply = "452 4.5.3 Error: too many recipients"
        else:
            table = {k.lower(): v for k, v in sk.rcpt_replies.items()}
            value = table.get(addr.lower(), sk.rcpt_reply)
            reply = sk._pick(value, "250 2.1.5 Ok", s, addr)
        self.txn.rcpts.append(Rcpt(addr, params, cmd.line, _format_reply(reply).rstrip("\r\n")))
        self.send(reply, "rcpt", cmd)

    def _drop_check(self, nbytes):
        d = self.sink.drop_in_data
        if d and nbytes >= (1 if d is True else int(d)):
            raise _Drop("dropped in data")

    def data(self, cmd):
        sk, s, txn = self.sink, self.s, self.txn
        if txn is None:
            return self.send("503 5.5.1 Error: need RCPT command", None, cmd)
        if not txn.accepted_rcpts:
            return self.send("554 5.5.1 Error: no valid recipients", None, cmd)
        reply = sk._pick(sk.data_reply, "354 End data with <CR><LF>.<CR><LF>", s, txn)
        txn.data_pipelined = len(self.buf) > 0
        self.send(reply, "data", cmd)
        if not reply.startswith("3"):
            self.end_txn()
            return
        if sk.stall_in_data:
            sk._stopping.wait(sk.stall_in_data)
        raw, data = bytearray(), bytearray()
        txn.data_raw, txn.data = b"", b""
        try:
            while True:
                line, _ = self.readline()
                if line == b".\r\n" or line == b".\n":
                    break
                if not line.endswith(b"\r\n"):
                    txn.bare_lf = True
                raw += line
                data += line[1:] if line.startswith(b".") else line
                txn.data_raw, txn.data = bytes(raw), bytes(data)
                self._drop_check(len(raw))
        finally:
            txn.data_raw, txn.data = bytes(raw), bytes(data)
        self.finish(txn, "dot")

    def bdat(self, cmd):
        txn = self.txn
        parts = cmd.arg.split()
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (
                len(parts) == 2 and parts[1].upper() != "LAST"):
            return self.send("501 5.5.4 Syntax: BDAT count [LAST]", None, cmd)
        n, last = int(parts[0]), len(parts) == 2
        if txn is None or not txn.accepted_rcpts:
            self.read_exact(n)
            return self.send("503 5.5.1 Error: need RCPT command", None, cmd)
        txn.bdat = True
        if txn.data is None:
            txn.data = txn.data_raw = b""
        base = len(txn.data)

        def progress(k):
            self._drop_check(base + k)
        chunk = self.read_exact(n, progress)
        txn.data = txn.data_raw = txn.data + chunk
        if not last:
            return self.send(self.reply_for(
                "BDAT", "250 2.0.0 %d bytes received" % n, txn), "bdat", cmd)
        self.finish(txn, "dot", cmd)

    def finish(self, txn, step, cmd=None):
        sk, s = self.sink, self.s
        txn.complete = True
        self.txn = None
        if sk.drop_after_dot:
            raise _Drop("dropped after dot")
        qid = secrets.token_hex(6).upper()
        reply = sk._pick(sk.final_reply, "250 2.0.0 Ok: queued as %s" % qid, s, txn)
        m = re.search(r"queued as ([0-9A-Za-z]+)", reply)
        txn.queue_id = m.group(1) if m and reply.startswith("2") else None
        txn.final_reply = _format_reply(reply).rstrip("\r\n")
        self.send(reply, step, cmd)
        txn.final_at = self.sent_at


# ------------------------------------------------------------ Postfix MX


class Delivered:
    """A message in the Postfix Maildir: path, raw (bytes), message
    (email.message.EmailMessage), recipient (Delivered-To),
    original_recipient (X-Original-To), return_path."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.raw = f.read()
        self.message = email.message_from_bytes(self.raw, policy=email.policy.default)
        self.recipient = self.message.get("Delivered-To")
        self.original_recipient = self.message.get("X-Original-To")
        rp = self.message.get("Return-Path")
        self.return_path = rp.strip().strip("<>") if rp is not None else None

    def __repr__(self):
        return "<Delivered to=%s from=%s %s>" % (self.recipient, self.return_path,
                                                  self.message.get("Subject"))


def _postfix_group_members(pgid):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            exe = os.readlink("/proc/%s/exe" % name)
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z" and \
                exe.startswith("/usr/lib/postfix/"):
            out.append(int(name))
    return out


class PostfixMX:
    """A private Postfix receiving mail on host:port (default
    loopback_host(25):25), beside any system Postfix: its own config,
    queue and data directories under one temporary folder, its master
    (`master -c DIR -d`) our child and a process group leader; .stop()
    sends it SIGTERM (as `postfix stop` does) and kills its group.

    domains     virtual mailbox domains accepted (others: 554 relay denied)
    users       None: any local part is accepted, all into one Maildir
                (mail/all/); a list of addresses: only those (others get
                550 5.1.1 at RCPT), each into mail/<domain>/<local>/
    tls         (cert_file, key_file) enables STARTTLS (tls_level "may")
    tls_level   smtpd_tls_security_level when tls is set ("may", "encrypt")
    hostname    myhostname
    main_cf     extra main.cf parameters {name: value}

    .start() / .stop() (also context manager), .messages() -> [Delivered],
    .wait_messages(n, timeout), .log_text(), .wait_log(regex, timeout),
    .postconf(**params) (rewrite main.cf and reload), .dir, .log_file,
    .maildir, .host, .port, .address.
    Nothing leaves the machine: default_transport and relay_transport are
    error:, DNS lookups are off, bounces go nowhere.
    """

    def __init__(self, host=None, port=25, domains=("example.test",), users=None,
                 tls=None, tls_level="may", hostname="mx.example.test",
                 main_cf=None, directory=None, start=True):
        if not IS_ROOT:
            pytest.skip("PostfixMX needs root")
        try:
            self.uid = pwd.getpwnam("postfix").pw_uid
            self.gid = pwd.getpwnam("postfix").pw_gid
        except KeyError:
            raise RuntimeError("no 'postfix' user: is the postfix package installed?")
        self.host = host or loopback_host(port)
        self.port = port
        self.address = (self.host, self.port)
        self.domains = list(domains)
        self.users = list(users) if users is not None else None
        self.tls = tls
        self.tls_level = tls_level
        self.hostname = hostname
        self.extra = dict(main_cf or {})
        self._own_dir = directory is None
        self.dir = directory or make_tmp("sgpostfix-")
        self.conf_dir = os.path.join(self.dir, "conf")
        self.queue_dir = os.path.join(self.dir, "queue")
        self.data_dir = os.path.join(self.dir, "data")
        self.maildir = os.path.join(self.dir, "mail")
        self.log_file = os.path.join(self.dir, "maillog")
        self._out_file = os.path.join(self.dir, "master.out")
        self.proc = None
        for d in (self.conf_dir, self.queue_dir, self.data_dir, self.maildir):
            os.makedirs(d, mode=0o755, exist_ok=True)
        os.chown(self.data_dir, self.uid, self.gid)
        os.chown(self.maildir, self.uid, self.gid)
        self._write_config()
        if start:
            try:
                self.start()
            except BaseException:
                self.cleanup()
                raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _params(self):
        p = {
            "compatibility_level": "3.6",
            "config_directory": self.conf_dir,
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2] or self.hostname,
            "mydestination": "",
            "relay_domains": "",
            # must be an address of an interface: 127.0.0.x is not one; the
            # listener address comes from master.cf
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "alias_maps": "",
            "alias_database": "",
            "default_transport": "error:5.7.1 test Postfix delivers nowhere else",
            "relay_transport": "error:5.7.1 test Postfix delivers nowhere else",
            "disable_dns_lookups": "yes",
            "smtpd_peername_lookup": "no",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "yes",
            "enable_original_recipient": "yes",
            "maillog_file": self.log_file,
            "maillog_file_prefixes": self.dir,
            "syslog_name": "sgtest-postfix",
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_base": self.maildir,
            "virtual_uid_maps": "static:%d" % self.uid,
            "virtual_gid_maps": "static:%d" % self.gid,
            "virtual_minimum_uid": "1",
        }
        if self.users is None:
            p["virtual_mailbox_maps"] = "static:all/"
        else:
            entries = []
            for u in self.users:
                local, _, dom = u.rpartition("@")
                entries.append("{%s=%s/%s/}" % (u.lower(), dom.lower(), local.lower()))
            p["virtual_mailbox_maps"] = "inline:{ %s }" % ", ".join(entries)
        if self.tls:
            p.update({
                "smtpd_tls_cert_file": self.tls[0],
                "smtpd_tls_key_file": self.tls[1],
                "smtpd_tls_security_level": self.tls_level,
                "smtpd_tls_loglevel": "1",
                "smtpd_tls_received_header": "yes",
            })
        else:
            p["smtpd_tls_security_level"] = "none"
        p.update(self.extra)
        return p

    def _write_config(self):
        with open(os.path.join(self.conf_dir, "main.cf"), "w") as f:
            for k, v in self._params().items():
                f.write("%s = %s\n" % (k, v))
        master = [
            "%s:%d inet n - n - - smtpd" % (self.host, self.port),
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "virtual unix - n n - - virtual",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        with open(os.path.join(self.conf_dir, "master.cf"), "w") as f:
            f.write("\n".join(master) + "\n")
        # Postfix re-reads a config file until its time stamp is over a
        # second old (it might be half written): age them, no waiting
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(os.path.join(self.conf_dir, name), (past, past))

    def start(self, timeout=30):
        if self.proc is not None and self.proc.poll() is None:
            return
        self._make_queue_dirs()
        self._out = open(self._out_file, "ab")
        # master in the foreground, as our child and a process group leader
        # (it signals its group when it stops). `postfix start-fg` does the
        # same after `postfix check`, which costs seconds here.
        self.proc = subprocess.Popen(
            [MASTER, "-c", self.conf_dir, "-d"],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)
        _register(self)
        try:
            wait_for(lambda: self.proc.poll() is not None or
                     _listening(self.host, self.port), timeout)
            if self.proc.poll() is not None:
                with open(self._out_file, errors="replace") as f:
                    out = f.read()
                raise RuntimeError("postfix master exited with %s:\n%s%s\n%s" % (
                    self.proc.returncode, out[-2000:], self.check(),
                    self.log_text()[-3000:]))
        except BaseException:
            self.stop()
            raise

    def _make_queue_dirs(self):
        """What `postfix check` (post-install create-missing) would make."""
        postdrop = grp.getgrnam("postdrop").gr_gid
        for name, mode, uid, gid in (
                [(d, 0o700, self.uid, 0) for d in (
                    "active", "bounce", "corrupt", "defer", "deferred", "flush",
                    "hold", "incoming", "private", "saved", "trace")]
                + [("maildrop", 0o730, self.uid, postdrop),
                   ("public", 0o710, self.uid, postdrop),
                   ("pid", 0o755, 0, 0)]):
            path = os.path.join(self.queue_dir, name)
            os.makedirs(path, exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, mode)

    def check(self):
        """`postfix -c DIR check` output: problems with the setup. Postfix
        writes them to syslog (absent here) and to stderr only if it is a
        terminal, hence the pty."""
        master_fd, slave_fd = pty.openpty()
        try:
            r = subprocess.run(["/usr/sbin/postfix", "-c", self.conf_dir, "check"],
                               stdin=subprocess.DEVNULL, stdout=slave_fd,
                               stderr=slave_fd, timeout=60)
        finally:
            os.close(slave_fd)
        out = b""
        try:
            while True:
                chunk = os.read(master_fd, 65536)
                if not chunk:
                    break
                out += chunk
        except OSError:      # EIO: the other side is closed
            pass
        finally:
            os.close(master_fd)
        return "postfix check: exit %d\n%s" % (
            r.returncode, out.decode("utf-8", "replace").replace("\r\n", "\n"))

    def reload(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def postconf(self, **params):
        """Change main.cf parameters (rewritten whole) and reload."""
        self.extra.update(params)
        self._write_config()
        if self.proc is not None and self.proc.poll() is None:
            self.reload()

    def stop(self, timeout=20):
        """Stop the instance (SIGTERM to master as `postfix stop` does, then
        SIGKILL to what is left). .cleanup() also removes the folder."""
        if self.proc is not None:
            if self.proc.poll() is None:
                # what `postfix stop` does: SIGTERM to master, which passes
                # it on to its process group (the daemons) and exits
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(5)
            # daemons still in master's process group: kill them one by one
            # (only Postfix programs; never signal a group blindly)
            for pid in _postfix_group_members(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as e:
                    if e.errno != errno.ESRCH:
                        raise
            self.proc = None
            self._out.close()
        _unregister(self)

    def cleanup(self):
        self.stop()
        if self._own_dir:
            remove_tmp(self.dir)

    # ---- results

    def messages(self):
        """Delivered messages, oldest first."""
        paths = []
        for root, dirs, files in os.walk(self.maildir):
            if os.path.basename(root) in ("new", "cur"):
                paths += [os.path.join(root, f) for f in files]
        paths.sort(key=lambda p: (os.stat(p).st_mtime, p))
        return [Delivered(p) for p in paths]

    def wait_messages(self, n=1, timeout=20.0):
        def enough_messages():
            m = self.messages()
            return m if len(m) >= n else None
        return wait_for(enough_messages, timeout,
                        message=lambda: self.log_text()[-3000:])

    def log_text(self):
        try:
            with open(self.log_file, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_log(self, pattern, timeout=20.0):
        """Wait for a log line matching regex pattern; return the match."""
        rx = re.compile(pattern)

        def log_matches():
            return rx.search(self.log_text())
        return wait_for(log_matches, timeout,
                        message=lambda: self.log_text()[-3000:])


# --------------------------------------------------------- client helpers


def mail_text(sender="sender@sg.test", rcpts=("rcpt@example.test",),
              subject="sg test message", body="Hello from the sg tests.\n",
              headers=None, message_id=None, date=None, size=None):
    """A simple RFC 5322 message (str, CRLF line ends). headers: extra
    [(name, value)] or dict; size: pad the body with lines up to about that
    many bytes."""
    if isinstance(rcpts, str):
        rcpts = [rcpts]
    domain = sender.rpartition("@")[2] or "sg.test"
    hdrs = [("From", sender), ("To", ", ".join(rcpts)), ("Subject", subject),
            ("Date", date or email.utils.formatdate(localtime=False)),
            ("Message-ID", message_id or "<%s@%s>" % (secrets.token_hex(8), domain)),
            ("MIME-Version", "1.0"),
            ("Content-Type", "text/plain; charset=utf-8")]
    if headers:
        hdrs += list(headers.items()) if isinstance(headers, dict) else list(headers)
    lines = ["%s: %s" % h for h in hdrs] + [""] + body.replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    text = "\r\n".join(lines) + "\r\n"
    if size is not None:
        pad = "x" * 76 + "\r\n"
        while len(text.encode()) + len(pad) <= size:
            text += pad
    return text


def send_via_smtp(port, sender, rcpts, msg, host="127.0.0.1", starttls=False,
                  tls_context=None, server_name=None, ehlo_name="client.test",
                  mail_options=(), rcpt_options=(), timeout=30,
                  allow_refused=False):
    """Send one message with smtplib; return the queue id of the final 250
    reply ("... queued as <ID>"), or None when it names none. Raises
    smtplib exceptions on refusals (some refused recipients are tolerated
    with allow_refused=True). starttls: use STARTTLS (tls_context, default an
    unverified context; server_name: the name sent as SNI and checked in the
    certificate, default host)."""
    if isinstance(rcpts, str):
        rcpts = [rcpts]
    if isinstance(msg, email.message.Message):
        msg = msg.as_bytes(policy=email.policy.SMTP)
    elif isinstance(msg, str):
        msg = msg.encode("utf-8")
    with smtplib.SMTP(local_hostname=ehlo_name, timeout=timeout) as s:
        code, resp = s.connect(host, port)
        if code != 220:
            raise smtplib.SMTPConnectError(code, resp)
        # what smtplib's starttls() uses for SNI and the name check
        s._host = server_name or host
        s.ehlo_or_helo_if_needed()
        if starttls:
            if tls_context is None:
                tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                tls_context.check_hostname = False
                tls_context.verify_mode = ssl.CERT_NONE
            s.starttls(context=tls_context)
            s.ehlo()
        code, resp = s.mail(sender, list(mail_options))
        if code != 250:
            s.rset()
            raise smtplib.SMTPSenderRefused(code, resp, sender)
        refused = {}
        for r in rcpts:
            code, resp = s.rcpt(r, list(rcpt_options))
            if code not in (250, 251):
                refused[r] = (code, resp)
        if len(refused) == len(rcpts) or (refused and not allow_refused):
            s.rset()
            raise smtplib.SMTPRecipientsRefused(refused)
        code, resp = s.data(msg)
        if code != 250:
            raise smtplib.SMTPDataError(code, resp)
        m = re.search(rb"queued as ([0-9A-Za-z]+)", resp)
        return m.group(1).decode() if m else None


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def peer_ca():
    """A TestCA for the whole session (its folder removed at the end)."""
    ca = TestCA()
    yield ca
    ca.cleanup()


@pytest.fixture
def smtp_sinks():
    """Factory: smtp_sinks(**SmtpSink options) -> a started SmtpSink; all
    are stopped at teardown."""
    started = []

    def make(*args, **kw):
        s = SmtpSink(*args, **kw)
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()
