"""Helpers for sg integration tests: start real PostgreSQL, Redis and nginx
with the sg modules on loopback, talk to them.

The fixtures in conftest.py use these; tests may call them directly, e.g.
to start a second instance with other settings:

    inst = start_sg(pg, redis_srv, workers=2, extra_mail_server="...")
    try: ...
    finally: inst.stop()           # returns error log problems

Everything lives under one folder in /tmp (mode 0755: postgres and the
nginx workers, running as nobody, must reach sockets and files there).
"""

import os
import shutil
import socket
import sys
import tempfile
import time
import warnings

import pytest
import requests
import urllib3

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(PROJECT, "tools"))

import sginstance  # noqa: E402
from sginstance import (DEFAULT_SETTINGS, InstanceError, Nginx,  # noqa: E402,F401
                        Postgres, Redis, create_token, free_port,
                        make_self_signed, store_certificate, wait_tcp)

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

MODULE_SO = os.environ.get("SG_MODULE_SO",
                           os.path.join(PROJECT, "build", "ngx_sg_module.so"))
KEEP_TMP = bool(os.environ.get("SG_KEEP_TMP"))


def make_tmp(prefix="sgtest-"):
    """A fresh folder in /tmp, mode 0755."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


def remove_tmp(d):
    if not KEEP_TMP:
        shutil.rmtree(d, ignore_errors=True)


def start_postgres(base):
    """A fresh, migrated PostgreSQL in base/pg (socket in base/pg-run).
    Restart it with .stop() / .start(): same socket path, same data."""
    pg = Postgres(os.path.join(base, "pg", "data"),
                  os.path.join(base, "pg-run"), free_port(), fast=True)
    pg.init()
    pg.start()
    sginstance.migrate(pg.conninfo)
    return pg


def start_redis(base, port=None):
    """Redis on the unix socket base/redis/redis.sock (plus 127.0.0.1:port
    when port is given). Restart with .stop() / .start()."""
    r = Redis(os.path.join(base, "redis"), port)
    r.start()
    return r


def reset_settings(pg, tls_enabled=False, active_certificate_id=None):
    """Settings row back to the defaults of sql/001_settings.sql (TLS off,
    no active certificate unless given)."""
    sginstance.reset_settings(pg.conninfo, tls_enabled=tls_enabled,
                              active_certificate_id=active_certificate_id)


class SgInstance:
    """One running nginx with the sg modules.

    Attributes: smtp_port, admin_port, http_port, token (admin API secret),
    base_url ('https://127.0.0.1:ADMIN'), http_url ('http://127.0.0.1:HTTP'),
    certificate_id, cert_pem, key_pem, cert_file, key_file, dir, conf,
    error_log, nginx (sginstance.Nginx), pg, redis.
    allow_problems: substrings of [alert]/[crit]/[emerg] lines the test
    expects; other such lines fail the test at teardown.
    """

    def __init__(self, pg, redis, workers=1, hostname="sg.local",
                 key_type="rsa", delivery=False, wrap=(), **conf_kw):
        self.pg, self.redis = pg, redis
        self.workers = workers
        # "sg: lists loaded" is an info line
        self.log_info = conf_kw.get("error_log_level", "info") in (
            "info", "debug")
        self.dir = make_tmp("sgnginx-")
        self.allow_problems = []
        self.hostname = hostname
        self.cert_pem, self.key_pem = make_self_signed(hostname, key_type)
        tls = os.path.join(self.dir, "tls")
        os.makedirs(tls, mode=0o700)
        self.cert_file = os.path.join(tls, "cert.pem")
        self.key_file = os.path.join(tls, "key.pem")
        with open(self.cert_file, "w") as f:
            f.write(self.cert_pem)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.key_pem)
        self.certificate_id = store_certificate(
            pg.conninfo, self.cert_pem, self.key_pem, hostname, activate=True)
        self.token = create_token(pg.conninfo, "test-admin", "admin")

        # free_port() never hands out the same port twice
        self.smtp_port = free_port()
        self.admin_port = free_port()
        self.http_port = free_port()
        self.base_url = "https://127.0.0.1:%d" % self.admin_port
        self.http_url = "http://127.0.0.1:%d" % self.http_port
        self.conf = os.path.join(self.dir, "nginx.conf")
        # delivery must never ask the system's resolver from a test: DNS
        # goes to a dead loopback port unless a test names its server
        conf_kw.setdefault("resolver", "127.0.0.1:9")
        # instances deliver only where a test asks for it (delivery=True):
        # the session's PostgreSQL holds every module's test mail
        if not delivery:
            conf_kw["extra_main"] = "sg_delivery off;\n" + conf_kw.get(
                "extra_main", "")
        sginstance.write_nginx_conf(
            self.conf, prefix_dir=self.dir, module_so=MODULE_SO,
            pg_conninfo=pg.conninfo, redis_addr=redis.address,
            smtp_listen="127.0.0.1:%d" % self.smtp_port,
            admin_listen="127.0.0.1:%d" % self.admin_port,
            http_listen="127.0.0.1:%d" % self.http_port,
            cert_file=self.cert_file, key_file=self.key_file,
            workers=workers, hostname=hostname, **conf_kw)
        self.nginx = Nginx(self.dir, self.conf, wait_port=self.admin_port,
                           wrap=wrap)
        self.error_log = self.nginx.error_log

    def start(self, timeout=30):
        mark = self.log_mark()
        self.nginx.start(timeout)
        if not wait_tcp("127.0.0.1", self.smtp_port, timeout,
                        self.nginx.is_running):
            raise InstanceError("SMTP port %d does not answer; error log:\n%s"
                                % (self.smtp_port,
                                   sginstance.tail(self.error_log)))
        if self.log_info and self.pg.is_running():
            self.wait_lists_loaded(mark)
        return self

    def reload(self):
        """SIGHUP; returns once the new workers have loaded their lists
        (nginx starts them, then tells the old ones to stop accepting)."""
        mark = self.log_mark()
        self.nginx.reload()
        if self.log_info and self.pg.is_running():
            self.wait_lists_loaded(mark)

    def log_mark(self):
        """Where the error log ends now, for log_since()."""
        try:
            return os.path.getsize(self.error_log)
        except OSError:
            return 0

    def log_since(self, mark):
        """The error log's text from log_mark()'s mark on."""
        with open(self.error_log, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def wait_lists_loaded(self, mark, timeout=15):
        """Wait until every worker has logged "sg: lists loaded" after
        byte mark of the error log (until then a worker answers RCPT with
        451 4.3.0). A bound, not an assertion: a test may start sg with a
        PostgreSQL it cannot use."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_since(mark).count("sg: lists loaded") >= self.workers:
                return True
            time.sleep(0.05)
        return False

    def stop(self):
        """Stop nginx; return the unexpected [alert]/[crit]/[emerg] lines."""
        self.nginx.stop()
        return self.problems()

    def problems(self):
        return [l for l in self.nginx.error_log_problems()
                if not any(a in l for a in self.allow_problems)]

    def reset_settings(self):
        """Defaults, but with this instance's certificate active and TLS on
        (the state right after start)."""
        reset_settings(self.pg, tls_enabled=True,
                       active_certificate_id=self.certificate_id)

    def log_tail(self, lines=50):
        return sginstance.tail(self.error_log, lines)

    def cleanup(self):
        remove_tmp(self.dir)


def start_sg(pg, redis, workers=1, **conf_kw):
    """Start an sg instance (self-signed certificate stored and activated,
    admin token created, nginx on free loopback ports, daemon off).
    conf_kw go to sginstance.write_nginx_conf (resolver, ca_file,
    hostname, extra_main, extra_http, extra_mail_server, error_log_level)
    or SgInstance (key_type, delivery: False writes "sg_delivery off;",
    wrap: a command nginx is run under that execs its arguments, e.g. an
    `unshare -m` with bind mounts or `env VAR=...`).
    Stop it with .stop()."""
    inst = SgInstance(pg, redis, workers=workers, **conf_kw)
    try:
        inst.start()
    except Exception:
        inst.nginx.stop()
        inst.cleanup()      # the exception holds the error log tail
        raise
    return inst


def with_bind_mounts(mounts):
    """A wrap for start_sg(): nginx runs in a private mount namespace
    (unshare -m) where each target path of mounts {target: source file}
    shows the source file instead; no other process sees the change.
    For the system's files sg reads (CA bundle, resolv.conf, DNSSEC root
    key).  Sources must be readable by the workers (nobody)."""
    script = " && ".join('mount --bind "$%d" "$%d"' % (2 * i + 1, 2 * i + 2)
                         for i in range(len(mounts)))
    args = []
    for target, source in mounts.items():
        args += [source, target]
    return ["unshare", "-m", "sh", "-c",
            '%s && shift %d && exec "$@"' % (script, 2 * len(mounts)),
            "sh"] + args


def finish_sg(inst):
    """Stop an instance and fail the test on [alert]/[crit]/[emerg] lines."""
    problems = inst.stop()
    if problems:
        pytest.fail("nginx error log %s has problems:\n%s"
                    % (inst.error_log, "\n".join(problems)), pytrace=False)
    inst.cleanup()


def lock_waiters(pg, statement=""):
    """How many other PostgreSQL backends wait for a lock now, running a
    query that contains statement (e.g. sg's commit behind a test's LOCK
    TABLE)."""
    conn = pg.connect()             # autocommit: a fresh view each time
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock'"
                        " AND query LIKE %s AND pid <> pg_backend_pid()",
                        ("%" + statement + "%",))
            return cur.fetchone()[0]
    finally:
        conn.close()


def api(inst, method, path, json=None, token=..., data=None, headers=None,
        timeout=10, **kw):
    """Request to the admin API over HTTPS (certificate not verified).
    path is relative to base_url (e.g. '/api/v1/settings'). token: the
    instance's admin token by default, None for no Authorization header,
    or any string. Returns the requests.Response."""
    h = {}
    if token is ...:
        token = inst.token
    if token is not None:
        h["Authorization"] = "Bearer " + token
    if headers:
        h.update(headers)
    base = inst.base_url if hasattr(inst, "base_url") else inst
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        return requests.request(method, base + path, json=json, data=data,
                                headers=h, verify=False, timeout=timeout, **kw)


def poll(fn, pred, timeout):
    """Call fn() until pred(result) holds or timeout passes (a bound on the
    wait, not something asserted); returns the last result (a
    requests.RequestException counts as None)."""
    deadline = time.monotonic() + timeout
    r = None
    while True:
        try:
            r = fn()
        except requests.RequestException:
            r = None
        if r is not None and pred(r):
            return r
        if time.monotonic() >= deadline:
            return r
        time.sleep(0.2)


def read_reply(f):
    """Read one SMTP reply (all its lines) from a socket file; returns
    (code, [lines])."""
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("connection closed; got %r" % lines)
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return int(line[:3]), lines


def smtp_dialog(port, lines, host="127.0.0.1", timeout=10, greeting=True):
    """Raw SMTP over TCP: read the greeting, then send each line (CRLF
    added) and read its reply. A line that is a list/tuple of strings is
    sent in one write (pipelining) and one reply is read per element.
    A bytes line is sent as is, and one reply is read.
    Returns the replies, greeting first: [(code, [text lines]), ...].
    The connection is closed at the end."""
    replies = []
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        if greeting:
            replies.append(read_reply(f))
        for line in lines:
            if isinstance(line, bytes):
                s.sendall(line)
                n = 1
            elif isinstance(line, (list, tuple)):
                s.sendall("".join(l + "\r\n" for l in line).encode())
                n = len(line)
            else:
                s.sendall((line + "\r\n").encode())
                n = 1
            for _ in range(n):
                replies.append(read_reply(f))
        f.close()
    return replies


def descendants(pid):
    """Pids of every living descendant of pid (children, their children...),
    read from /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found
