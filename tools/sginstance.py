#!/usr/bin/python3
"""sginstance: start and stop the services of one sg instance.

Used by `make run` / `make stop` (the CLI at the bottom, instance under
<project>/var/) and by the integration test fixtures (tests/integration/),
which build instances in temporary folders on free loopback ports.

    sginstance.py run | stop | status | migrate

run     start PostgreSQL, Redis and nginx (each only if not running yet),
        then wait up to 30 s until GET https://127.0.0.1:ADMIN/api/v1/health
        answers 200 and print the endpoints; exit 0. If health answers
        something else (or nothing) by then, print its JSON and the tail of
        nginx's error log and exit 1. The services are LEFT RUNNING in that
        case (so they can be inspected): `make stop` stops them.
        Run while everything runs: says so, exit 0.
stop    stop nginx, Redis and PostgreSQL by pid; data is kept for the next run.
status  what is running.
migrate apply sql/ migrations to the instance's database.

Layout of the state folder (normally <project>/var/):
    pg/data            PostgreSQL cluster (owned by postgres), pg/postgres.log
    run/               sockets and pids: run/pg/ (PostgreSQL socket, owned by
                       postgres), run/redis.sock, run/redis.pid
    redis/             redis.conf, dump.rdb, redis.log
    nginx/             nginx.conf, nginx.pid, error.log, access.log, tmp/,
                       tls/cert.pem + tls/key.pem (bootstrap certificate)
<project>/var/admin-token   bootstrap admin API token (mode 0600), always in var/

PostgreSQL (running as postgres) and the nginx workers (running as nobody)
must be able to enter the state folder. When run as root from a project
under a folder other users cannot traverse (e.g. a clone in /root, mode
0700), the state folder is /var/lib/sg/<first 12 hex digits of the sha1 of
the project's real path>/ instead (mode 0755), and var/state is a symlink to
it: later runs, stop and status follow that link. Delete that folder by hand
when the clone is removed.

Environment read by `run`: SG_SMTP_PORT (2525), SG_ADMIN_PORT (8443),
SG_HTTP_PORT (8080), SG_RESOLVER, SG_CA_FILE, SG_DNSSEC_TRUST_ANCHOR, and
SG_MODULE_SO (the module to load; default <project>/build/ngx_sg_module.so).
"""

import datetime
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_BIN = "/usr/lib/postgresql/15/bin"
NGINX_BIN = "/usr/sbin/nginx"
REDIS_BIN = "/usr/bin/redis-server"
MAIL_MODULE_SO = "/usr/lib/nginx/modules/ngx_mail_module.so"
SG_MIGRATE = os.path.join(PROJECT, "tools", "sg-migrate")
SQL_DIR = os.path.join(PROJECT, "sql")
PYTHON = "/usr/bin/python3"

# Must equal the row inserted by sql/001_settings.sql.
DEFAULT_SETTINGS = {
    "tls_enabled": False,
    "starttls_outbound": False,
    "tls_failure_fallback": True,
    "requiretls_enabled": True,
    "mta_sts_enabled": True,
    "tls_reporting": {
        "enabled": False,
        "organization_name": "",
        "contact_info": "",
        "submitter": "",
        "include_failure_details": True,
        "copy_to": None,
        "send_hour_utc": 1,
        "dkim_selector": "",
    },
}


class InstanceError(Exception):
    """A service could not be set up or started; the message says why."""


# ---------------------------------------------------------------- helpers

def _run(cmd, user=None, input=None, timeout=120):
    """Run cmd (list), optionally as `user`; raise InstanceError with its
    output when it fails; return stdout."""
    if user is not None and os.geteuid() == 0:
        cmd = ["runuser", "-u", user, "--"] + list(cmd)
    try:
        p = subprocess.run(cmd, input=input, capture_output=True, text=True,
                           timeout=timeout, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstanceError("%s: %s" % (" ".join(cmd), e))
    if p.returncode != 0:
        raise InstanceError("%s failed (exit %d):\n%s%s"
                            % (" ".join(cmd), p.returncode, p.stdout, p.stderr))
    return p.stdout


def pid_alive(pid):
    """True if process `pid` exists and is not a zombie."""
    if not pid:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


def _wait_gone(pid, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return True
        if not pid_alive(pid):
            if proc is not None:
                proc.wait()
            return True
        time.sleep(0.05)
    return False


def stop_pid(pid, sig, timeout=30, proc=None):
    """Send sig to pid, wait until it is gone; SIGKILL after timeout.
    Returns True if a process was stopped."""
    if not pid_alive(pid):
        if proc is not None:
            proc.poll()
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    if not _wait_gone(pid, timeout, proc):
        # the whole process group where pid leads one (servers started in
        # their own session): nginx's workers, not only its master
        try:
            if os.getpgid(pid) == pid != os.getpgrp():
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(pid, 10, proc)
    return True


def _chown(path, user):
    if os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _mkdir(path, mode=0o755, owner=None):
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    if owner:
        _chown(path, owner)


def untraversable_parent(path):
    """The first parent folder of path that other users cannot traverse
    (no o+x), or None when postgres and nobody can reach path."""
    path = os.path.abspath(path)
    parent = path
    while parent != "/":
        parent = os.path.dirname(parent)
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            continue
        if not st.st_mode & 0o001:
            return parent
    return None


def check_traversable(path):
    """Raise unless every parent of path is traversable by others (postgres
    and the nginx workers running as nobody must reach sockets and data)."""
    path = os.path.abspath(path)
    parent = path
    while True:
        parent = os.path.dirname(parent)
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            continue
        if not st.st_mode & 0o001:
            raise InstanceError(
                "%s is not traversable by other users (mode %o): postgres "
                "and nobody must reach %s; chmod o+x %s or move the project"
                % (parent, st.st_mode & 0o7777, path, parent))
        if parent == "/":
            return


def wait_tcp(host, port, timeout=30, alive=None):
    """Wait until host:port accepts TCP. `alive` is an optional callable;
    stop waiting when it returns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            pass
        if alive is not None and not alive():
            return False
        time.sleep(0.05)
    return False


PORTS_GIVEN = set()      # by free_port() and dnsserver.free_udp_tcp_port()


def free_port(host="127.0.0.1"):
    """A TCP port on host that was free a moment ago, never one this
    process handed out before: the kernel may draw a closed port again, and
    a caller may not have bound the first one yet (or may count on nobody
    listening there)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in PORTS_GIVEN:
            PORTS_GIVEN.add(port)
            return port


def tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no %s)\n" % path


# ---------------------------------------------------------------- PostgreSQL

class Postgres:
    """A PostgreSQL cluster run as the `postgres` user, reachable only over
    a unix socket in `sockdir` (mode 0777, so nginx workers as nobody can
    connect). Database and role: sg (trust authentication)."""

    def __init__(self, datadir, sockdir, port=5432, fast=False):
        self.datadir = os.path.abspath(datadir)
        self.sockdir = os.path.abspath(sockdir)
        self.port = int(port)
        self.fast = fast            # fsync off etc.: for tests
        self.logfile = os.path.join(os.path.dirname(self.datadir), "postgres.log")
        self.user = "postgres"

    @property
    def conninfo(self):
        return "host=%s port=%d dbname=sg user=sg" % (self.sockdir, self.port)

    @property
    def admin_conninfo(self):
        return "host=%s port=%d dbname=postgres user=postgres" % (self.sockdir, self.port)

    @property
    def pid(self):
        return read_pid(os.path.join(self.datadir, "postmaster.pid"))

    def is_running(self):
        return pid_alive(self.pid)

    def initialized(self):
        return os.path.exists(os.path.join(self.datadir, "PG_VERSION"))

    def init(self):
        """initdb (only if the cluster does not exist yet). The role and
        database sg are created by start() when missing."""
        check_traversable(self.datadir)
        _mkdir(os.path.dirname(self.datadir))
        _mkdir(self.sockdir, 0o755, self.user)
        if self.initialized():
            return False
        _mkdir(self.datadir, 0o700, self.user)
        _run([os.path.join(PG_BIN, "initdb"), "-D", self.datadir,
              "-U", "postgres", "--auth=trust", "-E", "UTF8",
              "--locale=C.UTF-8"], user=self.user)
        return True

    def start(self, timeout=60):
        """Start the server (if not running), wait until it accepts
        connections, create role and database sg when missing."""
        if not self.initialized():
            self.init()
        _mkdir(self.sockdir, 0o755, self.user)
        if not self.is_running():
            if not os.path.exists(self.logfile):
                open(self.logfile, "a").close()
            _chown(self.logfile, self.user)
            opts = ["-k", self.sockdir, "-p", str(self.port),
                    "-c", "listen_addresses=''",
                    "-c", "unix_socket_permissions=0777"]
            if self.fast:
                opts += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                         "-c", "full_page_writes=off"]
            _run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.datadir,
                  "-l", self.logfile, "-w", "-t", str(timeout),
                  "-o", " ".join(opts), "start"], user=self.user,
                 timeout=timeout + 10)
        self.wait_ready(timeout)
        self._ensure_db()

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = subprocess.run([os.path.join(PG_BIN, "pg_isready"), "-q",
                                "-h", self.sockdir, "-p", str(self.port)],
                               capture_output=True)
            if p.returncode == 0:
                return
            time.sleep(0.1)
        raise InstanceError("PostgreSQL did not become ready in %ds; log %s:\n%s"
                            % (timeout, self.logfile, tail(self.logfile)))

    def _ensure_db(self):
        import psycopg2
        conn = psycopg2.connect(self.admin_conninfo)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'sg'")
                if not cur.fetchone():
                    cur.execute("CREATE ROLE sg LOGIN")
                cur.execute("SELECT 1 FROM pg_database WHERE datname = 'sg'")
                if not cur.fetchone():
                    cur.execute("CREATE DATABASE sg OWNER sg ENCODING 'UTF8'")
        finally:
            conn.close()

    def stop(self, timeout=60):
        """Fast shutdown (SIGINT to the postmaster); returns True if it was
        running."""
        return stop_pid(self.pid, signal.SIGINT, timeout)

    def connect(self, autocommit=True):
        """A psycopg2 connection to database sg as sg."""
        import psycopg2
        conn = psycopg2.connect(self.conninfo)
        conn.autocommit = autocommit
        return conn


# ---------------------------------------------------------------- Redis

class Redis:
    """A redis-server with a unix socket `dir/redis.sock` (mode 777; or the
    socket path given) and, when a port is given, 127.0.0.1:port."""

    def __init__(self, dir, port_or_socket=None):
        self.dir = os.path.abspath(dir)
        self.port = 0
        self.socket = os.path.join(self.dir, "redis.sock")
        if isinstance(port_or_socket, int):
            self.port = port_or_socket
        elif port_or_socket:
            self.socket = os.path.abspath(port_or_socket)
        self.conf = os.path.join(self.dir, "redis.conf")
        self.pidfile = os.path.join(os.path.dirname(self.socket), "redis.pid")
        self.logfile = os.path.join(self.dir, "redis.log")
        self.proc = None

    @property
    def address(self):
        """The value of the nginx directive sg_redis."""
        return "unix:" + self.socket

    @property
    def pid(self):
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return read_pid(self.pidfile)

    def is_running(self):
        return pid_alive(self.pid)

    def write_conf(self):
        _mkdir(self.dir, 0o755)
        _mkdir(os.path.dirname(self.socket), 0o755)
        with open(self.conf, "w") as f:
            f.write("# generated by tools/sginstance.py\n"
                    "daemonize no\n"
                    "bind 127.0.0.1\n"
                    "port %d\n"
                    "unixsocket %s\n"
                    "unixsocketperm 777\n"
                    "dir %s\n"
                    "pidfile %s\n"
                    "logfile %s\n"
                    "save 60 1\n"
                    "appendonly no\n"
                    "protected-mode no\n"
                    % (self.port, self.socket, self.dir, self.pidfile,
                       self.logfile))

    def start(self, timeout=30):
        if self.is_running():
            return
        check_traversable(self.dir)
        self.write_conf()
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.proc = subprocess.Popen([REDIS_BIN, self.conf], cwd=self.dir,
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InstanceError("redis-server exited (%d); log %s:\n%s"
                                    % (self.proc.returncode, self.logfile,
                                       tail(self.logfile)))
            if self.ping():
                return
            time.sleep(0.05)
        raise InstanceError("redis-server did not answer in %ds; log %s:\n%s"
                            % (timeout, self.logfile, tail(self.logfile)))

    def ping(self):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(self.socket)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self):
        """A redis-py client on the unix socket."""
        import redis
        return redis.Redis(unix_socket_path=self.socket)

    def stop(self, timeout=30):
        """SIGTERM (redis saves and exits); returns True if it was running."""
        stopped = stop_pid(self.pid, signal.SIGTERM, timeout, self.proc)
        if self.proc is not None:
            self.proc.poll()
            self.proc = None
        return stopped


# ---------------------------------------------------------------- database

def migrate(conninfo, sql_dir=SQL_DIR):
    """Run tools/sg-migrate; raise InstanceError if it fails. Returns its
    output."""
    return _run([PYTHON, SG_MIGRATE, "--dsn", conninfo, "--dir", sql_dir])


def _connect(conninfo):
    import psycopg2
    conn = psycopg2.connect(conninfo)
    conn.autocommit = True
    return conn


def make_self_signed(host, key_type="rsa", days=365):
    """A self-signed certificate for host (SAN: host, localhost, 127.0.0.1).
    Returns (cert_pem, key_pem)."""
    if key_type == "rsa":
        newkey = ["-newkey", "rsa:2048"]
    elif key_type == "ecdsa":
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    else:
        raise ValueError("key_type must be rsa or ecdsa")
    sans = ["DNS:" + host]
    if host != "localhost":
        sans.append("DNS:localhost")
    if host != "127.0.0.1":
        sans.append("IP:127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="sgcert-") as d:
        crt, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        _run(["openssl", "req", "-x509", "-nodes", "-sha256", "-days", str(days)]
             + newkey + ["-keyout", key, "-out", crt, "-subj", "/CN=" + host,
                         "-addext", "subjectAltName=" + ",".join(sans),
                         "-addext", "basicConstraints=critical,CA:FALSE",
                         "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
                         "-addext", "extendedKeyUsage=serverAuth"])
        with open(crt) as f:
            cert_pem = f.read()
        with open(key) as f:
            key_pem = f.read()
    return cert_pem, key_pem


def _openssl_time(s):
    # "Nov 28 12:00:00 2025 GMT"
    t = datetime.datetime.strptime(s.strip(), "%b %d %H:%M:%S %Y %Z")
    return t.replace(tzinfo=datetime.timezone.utc)


def certificate_info(cert_pem):
    """not_before, not_after (aware datetimes), fingerprint_sha256 (lowercase
    hex), key_type, subject alternative names of the first certificate."""
    out = _run(["openssl", "x509", "-noout", "-startdate", "-enddate",
                "-fingerprint", "-sha256", "-ext", "subjectAltName", "-text"],
               input=cert_pem)
    info = {"alt_names": []}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("notBefore="):
            info["not_before"] = _openssl_time(line.split("=", 1)[1])
        elif line.startswith("notAfter="):
            info["not_after"] = _openssl_time(line.split("=", 1)[1])
        elif "Fingerprint=" in line and "fingerprint_sha256" not in info:
            info["fingerprint_sha256"] = line.split("=", 1)[1].replace(":", "").lower()
        elif "Subject Alternative Name" in line and not info["alt_names"] \
                and i + 1 < len(lines):
            for item in lines[i + 1].split(","):
                item = item.strip()
                if ":" in item:
                    info["alt_names"].append(item.split(":", 1)[1].strip())
    info["key_type"] = "ecdsa" if "id-ecPublicKey" in out else "rsa"
    return info


def store_certificate(conninfo, cert_pem, key_pem, host, activate=True,
                      source="self-signed", organization="", country=""):
    """Insert a certificate; when activate, make it the active one and set
    tls_enabled. Returns its id."""
    info = certificate_info(cert_pem)
    alt = [n for n in info["alt_names"] if n != host]
    conn = _connect(conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO certificates (host_name, alternative_host_names,"
                " organization, country, key_type, certificate_pem,"
                " private_key_pem, source, not_before, not_after,"
                " fingerprint_sha256) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (host, alt, organization, country, info["key_type"], cert_pem,
                 key_pem, source, info["not_before"], info["not_after"],
                 info["fingerprint_sha256"]))
            cert_id = cur.fetchone()[0]
            if activate:
                cur.execute(
                    "UPDATE settings SET active_certificate_id = %s,"
                    " doc = jsonb_set(doc, '{tls_enabled}', 'true'),"
                    " updated_by = 'bootstrap' WHERE id = 1", (cert_id,))
        return cert_id
    finally:
        conn.close()


def token_hash(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(conninfo, name, role="admin", secret=None):
    """Create an API token; returns the secret ("sg_" + 43 base64url
    characters). Only its sha256 is stored. Pass `secret` to store a given
    one (e.g. re-registering var/admin-token in a new database)."""
    if secret is None:
        secret = "sg_" + secrets.token_urlsafe(32)
    conn = _connect(conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO api_tokens (name, role, token_sha256)"
                        " VALUES (%s, %s, %s)", (name, role, token_hash(secret)))
        return secret
    finally:
        conn.close()


def reset_settings(conninfo, tls_enabled=False, active_certificate_id=None,
                   updated_by="test"):
    """Put the settings row back to the defaults of sql/001_settings.sql,
    with the given tls_enabled and active certificate."""
    doc = json.loads(json.dumps(DEFAULT_SETTINGS))
    doc["tls_enabled"] = bool(tls_enabled)
    conn = _connect(conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute("UPDATE settings SET doc = %s::jsonb,"
                        " active_certificate_id = %s, updated_by = %s"
                        " WHERE id = 1",
                        (json.dumps(doc), active_certificate_id, updated_by))
    finally:
        conn.close()


# ---------------------------------------------------------------- nginx

def write_nginx_conf(path, *, prefix_dir, module_so, pg_conninfo, redis_addr,
                     smtp_listen, admin_listen, http_listen, cert_file,
                     key_file, workers=1, resolver=None, ca_file=None,
                     dnssec_trust_anchor=None, hostname="sg.local",
                     extra_main="", extra_http="", extra_mail_server="",
                     error_log_level="info"):
    """Write nginx.conf for one sg instance; every path inside prefix_dir."""
    p = os.path.abspath(prefix_dir)
    _mkdir(p)
    _mkdir(os.path.join(p, "tmp"))
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    opt = []
    # outbound infrastructure (validated by nginx at start)
    opt.append("sg_resolver %s;" % resolver if resolver
               else "# sg_resolver <ip[:port]>;   (default: /etc/resolv.conf)")
    opt.append("sg_trusted_ca %s;" % ca_file if ca_file
               else "# sg_trusted_ca <file>;")
    if dnssec_trust_anchor:
        opt.append("sg_dnssec_trust_anchor %s;" % dnssec_trust_anchor)
    conf = """\
# generated by tools/sginstance.py -- changes are overwritten
load_module {mail_so};
load_module {module_so};

worker_processes {workers};
pid {p}/nginx.pid;
lock_file {p}/nginx.lock;
error_log {p}/error.log {level};
{user}
events {{
    worker_connections 1024;
}}

sg_postgres "{conninfo}";
sg_redis {redis};
{opt}
{extra_main}

http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
{extra_http}
    server {{
        listen {admin_listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            sgadmin;
        }}
    }}

    server {{
        listen {http_listen};
        location / {{
            sgadmin;
        }}
    }}
}}

mail {{
    auth_http 127.0.0.1:1;    # nginx requires it in every mail server; sg never uses it

    server {{
        listen {smtp_listen};
        protocol sg_smtp;
        server_name {hostname};
        # STARTTLS: offered while the tls_enabled setting is on; the active
        # certificate comes from PostgreSQL, this one is the fallback
        starttls on;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        sg_smtp_temp_path {p}/tmp/sg_smtp;
{extra_mail_server}
    }}
}}
""".format(mail_so=MAIL_MODULE_SO, module_so=os.path.abspath(module_so),
           workers=workers, p=p, level=error_log_level, user=user,
           conninfo=pg_conninfo, redis=redis_addr, opt="\n".join(opt),
           extra_main=extra_main, extra_http=_indent(extra_http, 4),
           admin_listen=admin_listen, cert=os.path.abspath(cert_file),
           key=os.path.abspath(key_file), http_listen=http_listen,
           smtp_listen=smtp_listen, hostname=hostname,
           extra_mail_server=_indent(extra_mail_server, 8))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(conf)
    os.replace(tmp, path)
    return path


def _indent(text, n):
    if not text:
        return ""
    return "\n".join((" " * n + l) if l.strip() else l
                     for l in text.strip("\n").splitlines())


class Nginx:
    """nginx run with -p prefix_dir -c conf_path. daemon=False (tests):
    nginx stays in the foreground as our child; daemon=True (make run):
    nginx daemonizes itself."""

    def __init__(self, prefix_dir, conf_path, wait_port=None, daemon=False,
                 wrap=()):
        self.prefix = os.path.abspath(prefix_dir)
        self.conf = os.path.abspath(conf_path)
        self.wait_port = wait_port
        self.daemon = daemon
        # wrap: a command that ends by exec'ing its arguments (unshare -m
        # with bind mounts, env VAR=...): nginx runs under it, same pid
        self.wrap = list(wrap)
        self.pidfile = os.path.join(self.prefix, "nginx.pid")
        self.error_log = os.path.join(self.prefix, "error.log")
        self.proc = None

    def _cmd(self):
        cmd = [NGINX_BIN, "-p", self.prefix + "/", "-c", self.conf,
               "-e", self.error_log]
        if not self.daemon:
            cmd += ["-g", "daemon off;"]
        return self.wrap + cmd

    @property
    def pid(self):
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return read_pid(self.pidfile)

    def is_running(self):
        return pid_alive(self.pid)

    def test_config(self):
        _run([NGINX_BIN, "-t", "-q", "-p", self.prefix + "/", "-c", self.conf,
              "-e", self.error_log])

    def start(self, timeout=30):
        """Start nginx and wait until wait_port (if set) accepts TCP."""
        if self.is_running():
            return
        if self.daemon:
            _run(self._cmd(), timeout=timeout)
            alive = lambda: self.is_running()
        else:
            self.proc = subprocess.Popen(self._cmd(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE,
                                         start_new_session=True)
            alive = lambda: self.proc.poll() is None
        if self.wait_port is None:
            time.sleep(0.2)
            ok = alive()
        else:
            ok = wait_tcp("127.0.0.1", self.wait_port, timeout, alive)
        if not ok:
            err = ""
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.stop()
                err = self.proc.stderr.read().decode(errors="replace")
                self.proc.stderr.close()
                self.proc = None
            raise InstanceError("nginx did not start (port %s); %s\nerror log %s:\n%s"
                                % (self.wait_port, err.strip(), self.error_log,
                                   tail(self.error_log)))
        if self.proc is not None:
            # nothing more is read from stderr; do not let a full pipe block
            self.proc.stderr.close()

    def reload(self):
        os.kill(self.pid, signal.SIGHUP)

    def stop(self, timeout=30):
        """Graceful stop (SIGQUIT to the master); returns True if it was
        running."""
        stopped = stop_pid(self.pid, signal.SIGQUIT, timeout, self.proc)
        if self.proc is not None:
            self.proc.poll()
        return stopped

    def error_log_problems(self):
        """Lines of the error log at level alert, crit or emerg."""
        try:
            with open(self.error_log, errors="replace") as f:
                return [l.rstrip("\n") for l in f
                        if "[alert]" in l or "[crit]" in l or "[emerg]" in l]
        except OSError:
            return []


# ---------------------------------------------------------------- make run

STATE_ROOT = "/var/lib/sg"


class Layout:
    """Paths of the instance: var/ under the project, and the state folder
    (var/ itself, or /var/lib/sg/<hash>/ reached through the symlink
    var/state when var/ is not traversable by other users; see the module
    docstring)."""

    def __init__(self, project=PROJECT):
        self.project = project
        self.var = os.path.join(project, "var")
        self.state_link = os.path.join(self.var, "state")
        self.state, self.relocated, self.blocked_by = self._find_state()
        self.pg_data = os.path.join(self.state, "pg", "data")
        self.run = os.path.join(self.state, "run")
        self.pg_sock = os.path.join(self.run, "pg")
        self.redis_dir = os.path.join(self.state, "redis")
        self.redis_sock = os.path.join(self.run, "redis.sock")
        self.nginx = os.path.join(self.state, "nginx")
        self.nginx_conf = os.path.join(self.nginx, "nginx.conf")
        self.tls = os.path.join(self.nginx, "tls")
        self.cert = os.path.join(self.tls, "cert.pem")
        self.key = os.path.join(self.tls, "key.pem")
        self.token = os.path.join(self.var, "admin-token")
        self.module = (os.environ.get("SG_MODULE_SO")
                       or os.path.join(project, "build", "ngx_sg_module.so"))

    def _find_state(self):
        """(state folder, relocated?, the parent that forced it or None)."""
        if os.path.islink(self.state_link):
            return os.path.realpath(self.state_link), True, None
        if os.path.exists(os.path.join(self.var, "pg", "data")):
            return self.var, False, None    # an instance made in var/ before
        if os.geteuid() != 0:
            return self.var, False, None    # everything runs as this user
        blocked = untraversable_parent(os.path.join(self.var, "x"))
        if blocked is None:
            return self.var, False, None
        h = hashlib.sha1(os.path.realpath(self.project).encode()).hexdigest()
        return os.path.join(STATE_ROOT, h[:12]), True, blocked

    def prepare(self):
        """Create var/ and the state folder (and the var/state symlink when
        the state lives outside the project)."""
        _mkdir(self.var)
        if self.relocated:
            _mkdir(STATE_ROOT, 0o755)
            _mkdir(self.state, 0o755)
            if not os.path.islink(self.state_link):
                os.symlink(self.state, self.state_link)
                note = os.path.join(self.var, "STATE.txt")
                with open(note, "w") as f:
                    f.write("%s is not traversable by other users, so the\n"
                            "PostgreSQL cluster, Redis and nginx's files of this\n"
                            "instance live in %s (var/state links there).\n"
                            "Remove that folder by hand when this clone goes.\n"
                            % (self.blocked_by, self.state))
                print("sg: %s cannot be entered by postgres and nobody; the "
                      "instance's data lives in %s (var/state links there)"
                      % (self.blocked_by, self.state))
        _mkdir(self.run)

    def env_ports(self):
        def port(name, default):
            v = os.environ.get(name) or str(default)
            if not v.isdigit() or not 0 < int(v) < 65536:
                raise InstanceError("%s=%r is not a port number" % (name, v))
            return int(v)
        return (port("SG_SMTP_PORT", 2525), port("SG_ADMIN_PORT", 8443),
                port("SG_HTTP_PORT", 8080))

    def services(self):
        smtp, admin, http = self.env_ports()
        return (Postgres(self.pg_data, self.pg_sock, 5432),
                Redis(self.redis_dir, self.redis_sock),
                Nginx(self.nginx, self.nginx_conf, wait_port=admin, daemon=True))


def _print_endpoints(lay, admin_port=None):
    smtp, admin, http = lay.env_ports()
    admin = admin_port or admin
    print("""\
  SMTP        127.0.0.1:%d
  admin       https://127.0.0.1:%d/   (self-signed certificate)
  plain HTTP  http://127.0.0.1:%d/
  API token   %s
  error log   %s
  data        %s
  stop with   make stop""" % (smtp, admin, http, lay.token,
                              os.path.join(lay.nginx, "error.log"), lay.state))


def _bootstrap(lay, pg):
    """First run: bootstrap certificate and admin token. Existing files are
    reused; they are (re-)registered if the database does not know them."""
    conninfo = pg.conninfo
    conn = _connect(conninfo)
    try:
        cur = conn.cursor()
        _mkdir(lay.tls, 0o700)
        if not (os.path.exists(lay.cert) and os.path.exists(lay.key)):
            cert_pem, key_pem = make_self_signed("localhost")
            _write_private(lay.key, key_pem)
            with open(lay.cert, "w") as f:
                f.write(cert_pem)
            print("sg: created bootstrap certificate %s" % lay.cert)
        with open(lay.cert) as f:
            cert_pem = f.read()
        with open(lay.key) as f:
            key_pem = f.read()
        fp = certificate_info(cert_pem)["fingerprint_sha256"]
        cur.execute("SELECT 1 FROM certificates WHERE fingerprint_sha256 = %s", (fp,))
        if not cur.fetchone():
            store_certificate(conninfo, cert_pem, key_pem, "localhost", activate=True)

        if os.path.exists(lay.token):
            with open(lay.token) as f:
                secret = f.read().strip()
            cur.execute("SELECT 1 FROM api_tokens WHERE token_sha256 = %s",
                        (token_hash(secret),))
            if not cur.fetchone():
                create_token(conninfo, "bootstrap", "admin", secret=secret)
        else:
            secret = create_token(conninfo, "bootstrap", "admin")
            _write_private(lay.token, secret + "\n")
            print("sg: created admin API token in %s" % lay.token)

        # this local instance relays for loopback clients
        cur.execute("INSERT INTO relay_networks (value, comment) VALUES"
                    " ('127.0.0.0/8', 'make run: loopback'),"
                    " ('::1/128', 'make run: loopback')"
                    " ON CONFLICT (value) DO NOTHING")
        conn.commit()
    finally:
        conn.close()


def _write_private(path, text):
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


HEALTH_TIMEOUT = 30


def _health(port, timeout=2):
    """(status code, body text) of GET /api/v1/health on the admin port;
    raises requests.RequestException when it does not answer."""
    import requests
    import urllib3
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    r = requests.get("https://127.0.0.1:%d/api/v1/health" % port,
                     verify=False, timeout=timeout)
    return r.status_code, r.text


def _wait_health(port, timeout=HEALTH_TIMEOUT, alive=None):
    """Poll health until it answers 200 or timeout passes. Returns
    (status, body) of the last answer, or (None, error text) when it never
    answered. `alive`: optional callable, stop waiting when it is False."""
    import requests
    deadline = time.monotonic() + timeout
    last = (None, "no answer")
    while True:
        try:
            last = _health(port)
            if last[0] == 200:
                return last
        except requests.RequestException as e:
            if last[0] is None:
                last = (None, str(e))
        if time.monotonic() >= deadline or (alive is not None and not alive()):
            return last
        time.sleep(0.2)


def _pretty(body):
    try:
        return json.dumps(json.loads(body), indent=2)
    except ValueError:
        return body


def cmd_run(lay):
    smtp, admin, http = lay.env_ports()
    pg, rd, ngx = lay.services()
    if pg.is_running() and rd.is_running() and ngx.is_running():
        print("sg is already running (nginx pid %d):" % ngx.pid)
        _print_endpoints(lay)
        return 0
    if not os.path.exists(lay.module):
        raise InstanceError("%s is missing: build it first (make)" % lay.module)
    lay.prepare()
    check_traversable(lay.state)

    if pg.init():
        print("sg: created PostgreSQL cluster in %s" % lay.pg_data)
    pg.start()
    for line in migrate(pg.conninfo).splitlines():
        print("sg: " + line)
    _bootstrap(lay, pg)
    rd.start()
    rd.proc = None      # runs on after we exit; stopped by pid

    write_nginx_conf(lay.nginx_conf, prefix_dir=lay.nginx, module_so=lay.module,
                     pg_conninfo=pg.conninfo, redis_addr=rd.address,
                     smtp_listen="127.0.0.1:%d" % smtp,
                     admin_listen="127.0.0.1:%d" % admin,
                     http_listen="127.0.0.1:%d" % http,
                     cert_file=lay.cert, key_file=lay.key,
                     resolver=os.environ.get("SG_RESOLVER") or None,
                     ca_file=os.environ.get("SG_CA_FILE") or None,
                     dnssec_trust_anchor=os.environ.get("SG_DNSSEC_TRUST_ANCHOR") or None)
    try:
        if ngx.is_running():
            ngx.reload()
        else:
            ngx.start()
    except InstanceError as e:
        sys.stderr.write("sg: %s\n--- last lines of %s:\n%s"
                         % (e, ngx.error_log, tail(ngx.error_log)))
        return 1
    status, body = _wait_health(admin, HEALTH_TIMEOUT, ngx.is_running)
    if status != 200:
        if status is None:
            what = "did not answer (%s)" % body
        else:
            what = "answered %d:\n%s" % (status, _pretty(body))
        sys.stderr.write(
            "sg: UNHEALTHY: after %d s https://127.0.0.1:%d/api/v1/health %s\n"
            "--- last lines of %s:\n%s"
            "sg: the services were left running for inspection; stop them "
            "with make stop\n"
            % (HEALTH_TIMEOUT, admin, what, ngx.error_log,
               tail(ngx.error_log)))
        return 1
    print("sg is running:")
    _print_endpoints(lay)
    return 0


def cmd_stop(lay):
    pg, rd, ngx = lay.services()
    any_stopped = False
    for name, svc in (("nginx", ngx), ("redis", rd), ("postgresql", pg)):
        pid = svc.pid
        if svc.stop():
            print("sg: stopped %s (pid %d)" % (name, pid))
            any_stopped = True
    if not any_stopped:
        print("sg: nothing was running")
    return 0


def cmd_status(lay):
    pg, rd, ngx = lay.services()
    running = 0
    for name, svc in (("nginx", ngx), ("redis", rd), ("postgresql", pg)):
        if svc.is_running():
            running += 1
            print("%-11s running (pid %d)" % (name, svc.pid))
        else:
            print("%-11s stopped" % name)
    if running == 3:
        _print_endpoints(lay)
    return 0


def cmd_migrate(lay):
    pg = lay.services()[0]
    if not pg.initialized():
        raise InstanceError("no database yet in %s: run make run" % lay.pg_data)
    if not pg.is_running():
        pg.start()
        print("sg: started PostgreSQL (stop it with make stop)")
    sys.stdout.write(migrate(pg.conninfo))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmds = {"run": cmd_run, "stop": cmd_stop, "status": cmd_status,
            "migrate": cmd_migrate}
    if len(argv) != 1 or argv[0] not in cmds:
        sys.stderr.write("usage: sginstance.py run|stop|status|migrate"
                         "   (see the top of %s)\n" % os.path.abspath(__file__))
        return 2
    try:
        return cmds[argv[0]](Layout())
    except InstanceError as e:
        sys.stderr.write("sg: %s\n" % e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
