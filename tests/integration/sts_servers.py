"""MTA-STS policy hosts for sg's tests (loopback only).

    hosts = PolicyHosts(ca).start()          # Debian's nginx on 127.0.0.N:443
    hosts.add("a.test", POLICY)              # https://mta-sts.a.test/...
    hosts.add("exp.test", POLICY, cert="expired")
    hosts.add("r.test", redirect="https://mta-sts.a.test/.well-known/mta-sts.txt")
    hosts.add("big.test", "x" * 70000)
    hosts.add("html.test", POLICY, content_type="text/html")
    hosts.add("c.test", POLICY, cache_control="max-age=86400")
    hosts.add("s203.test", POLICY, status=203)  # that body, with status 203
    hosts.apply()                            # write nginx.conf, reload
    hosts.set_body("a.test", NEW_POLICY)     # rewrite the file, no reload
    hosts.requests("a.test")                 # GETs served so far
    hosts.log("a.test")                      # those GETs: status, size and
                                             # the caching request headers
    hosts.sync()                             # every answer so far logged
    hosts.stop()

One nginx serves every domain on one address: SNI picks the server block
and its certificate ("good": from the test CA for mta-sts.<domain>;
"expired"; "wrong-name": valid, for another name; "untrusted": from a CA
nobody trusts).  Bodies are files (alias), so a policy can change without a
reload.  Static bodies carry ETag and Last-Modified (nginx's defaults),
and Cache-Control when a site asks for it.  SlowServer accepts TCP on
127.0.0.M:443 and never answers (the fetch timeout).
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import peers

NGINX = "/usr/sbin/nginx"
WELL_KNOWN = "/.well-known/mta-sts.txt"


def policy(mode="enforce", mx=("mx1.example.test",), max_age=86400,
           extra="", crlf=False):
    """A policy body (RFC 8461, 3.2)."""
    lines = ["version: STSv1", "mode: %s" % mode]
    lines += ["mx: %s" % m for m in mx]
    lines.append("max_age: %d" % max_age)
    if extra:
        lines.append(extra)
    eol = "\r\n" if crlf else "\n"
    return eol.join(lines) + eol


class PolicyHosts:
    """Debian's nginx serving /.well-known/mta-sts.txt on ip:443."""

    def __init__(self, ca, ip=None):
        self.ca = ca
        self.ip = ip or peers.loopback_host(443)
        self.dir = peers.make_tmp("sgsts-")
        self.conf = os.path.join(self.dir, "nginx.conf")
        self.error_log = os.path.join(self.dir, "error.log")
        self.access_log = os.path.join(self.dir, "access.log")
        self.json_log = os.path.join(self.dir, "access.json")
        self.sites = {}
        self.proc = None
        self._default = ca.issue(["default.invalid"])

    # ------------------------------------------------------------ sites

    def add(self, domain, body=None, cert="good", status=200,
            content_type="text/plain", charset=None, redirect=None,
            cache_control=None):
        """Serve body for mta-sts.<domain> (or a bare status, or a 301).
        A 2xx status other than 200 is sent with body (a valid policy
        under the wrong status); cache_control adds that header."""
        host = "mta-sts." + domain
        if cert == "good":
            pair = self.ca.issue([host])
        elif cert == "expired":
            pair = self.ca.issue([host], expired=True)
        elif cert == "wrong-name":
            pair = self.ca.mismatched("mta-sts.somewhere-else.test")
        elif cert == "untrusted":
            pair = self.ca.untrusted.issue([host])
        else:
            pair = cert
        self.sites[domain] = dict(cert=pair, status=status,
                                  content_type=content_type, charset=charset,
                                  redirect=redirect,
                                  cache_control=cache_control)
        self.set_body(domain, body if body is not None else "")
        return self

    def set_body(self, domain, body):
        """New policy text for domain: served from the next request on."""
        path = self._file(domain)
        data = body.encode() if isinstance(body, str) else body
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _file(self, domain):
        return os.path.join(self.dir, "%s.txt" % domain)

    def _body(self, domain):
        with open(self._file(domain), errors="replace") as f:
            return f.read()

    def _server(self, domain, s):
        cert, key = s["cert"]
        if s["redirect"]:
            action = "return 301 %s;" % s["redirect"]
        elif 200 < s["status"] < 300:
            action = "return %d %s;" % (s["status"],
                                        _quote(self._body(domain)))
        elif s["status"] != 200:
            action = "return %d;" % s["status"]
        else:
            action = "alias %s;" % self._file(domain)
        charset = "charset %s;" % s["charset"] if s["charset"] else ""
        if s["cache_control"]:
            action += '\n            add_header Cache-Control "%s" always;' % (
                s["cache_control"])
        return """
    server {
        listen %(ip)s:443 ssl;
        server_name mta-sts.%(domain)s;
        ssl_certificate %(cert)s;
        ssl_certificate_key %(key)s;
        location = %(wk)s {
            types { }
            default_type %(ct)s;
            %(charset)s
            %(action)s
        }
        location / {
            return 404;
        }
    }
""" % dict(ip=self.ip, domain=domain, cert=cert, key=key, wk=WELL_KNOWN,
           ct=s["content_type"], charset=charset, action=action)

    def write_conf(self):
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        servers = "".join(self._server(d, s) for d, s in self.sites.items())
        conf = """
%(user)s
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log info;
events { worker_connections 256; }
http {
    log_format sts '$ssl_server_name $request_uri $status';
    log_format stsjson escape=json '{"host":"$ssl_server_name",'
        '"uri":"$request_uri","status":$status,"bytes":$body_bytes_sent,'
        '"if_none_match":"$http_if_none_match",'
        '"if_modified_since":"$http_if_modified_since",'
        '"if_match":"$http_if_match",'
        '"if_unmodified_since":"$http_if_unmodified_since",'
        '"if_range":"$http_if_range",'
        '"cache_control":"$http_cache_control","pragma":"$http_pragma"}';
    access_log %(dir)s/access.log sts;
    access_log %(dir)s/access.json stsjson;
    client_body_temp_path %(dir)s/tmp;
    proxy_temp_path %(dir)s/tmp;
    fastcgi_temp_path %(dir)s/tmp;
    uwsgi_temp_path %(dir)s/tmp;
    scgi_temp_path %(dir)s/tmp;
    charset_types text/plain text/html;
    ssl_protocols TLSv1.2 TLSv1.3;
    server {
        listen %(ip)s:443 ssl default_server;
        ssl_certificate %(dcert)s;
        ssl_certificate_key %(dkey)s;
        return 444;
    }
%(servers)s
}
""" % dict(user=user, dir=self.dir, ip=self.ip, dcert=self._default[0],
           dkey=self._default[1], servers=servers)
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(conf)

    # ---------------------------------------------------------- process

    def start(self):
        self.write_conf()
        self.proc = subprocess.Popen(
            [NGINX, "-p", self.dir + "/", "-c", self.conf, "-e",
             self.error_log, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        peers._register(self)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                self.proc = None
                raise RuntimeError("policy nginx did not start: %s\n%s"
                                   % (err, self.log_tail()))
            if peers._listening(self.ip, 443):
                self.proc.stderr.close()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("policy nginx does not listen on %s:443" % self.ip)

    def apply(self):
        """Write the configuration for the sites added and reload."""
        self.write_conf()
        if self.proc is None:
            return self.start()
        check = subprocess.run(
            [NGINX, "-t", "-q", "-p", self.dir + "/", "-c", self.conf, "-e",
             self.error_log], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError("policy nginx config: %s" % check.stderr)
        old = self._workers()
        assert old, "no running worker in the log:\n" + self.log_tail()
        self.proc.send_signal(signal.SIGHUP)
        # The master starts the new workers, then tells the old ones to
        # quit; until an old worker has closed its listening socket it
        # still accepts, and answers with the old configuration (a new
        # name gets the default certificate).  Done when every worker that
        # ran before the reload has exited ("worker process N exited").
        peers.wait_for(lambda: not (old & self._workers()), timeout=20,
                       message=self.log_tail)
        return self

    def _workers(self):
        """The pids of the worker processes started and not yet exited,
        from the error log (info level: "start worker process N",
        "worker process N exited with code 0")."""
        try:
            with open(self.error_log, errors="replace") as f:
                text = f.read()
        except OSError:
            return set()
        live = set()                    # in order: a pid may be reused
        for m in re.finditer(r"start worker process (\d+)"
                             r"|worker process (\d+) exited", text):
            if m.group(1):
                live.add(m.group(1))
            else:
                live.discard(m.group(2))
        return live

    def stop(self):
        p, self.proc = self.proc, None
        peers._unregister(self)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGQUIT)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def cleanup(self):
        self.stop()
        peers.remove_tmp(self.dir)

    def log_tail(self, n=20):
        try:
            with open(self.error_log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def sync(self):
        """Return once every request the policy host answered before the
        call is in its access log.  nginx writes a request's line right
        after sending the answer, in the same event handler, so a client
        (sg, then the API) can have the answer first; the one worker
        (worker_processes 1, not reloading: apply() waits until the old
        worker is gone) handles events one at a time, so when it has
        handled a TLS handshake and request of ours, the handler that
        sent any earlier answer has returned.  (A request to the default
        server, answered 444: in no site's count.)"""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((self.ip, 443), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET /sync HTTP/1.0\r\n\r\n")
                try:
                    while tls.recv(4096):
                        pass
                except (ssl.SSLError, ConnectionError):
                    pass    # 444: closed without close_notify

    def requests(self, domain):
        """How many GETs of the policy mta-sts.<domain> was served."""
        want = "mta-sts.%s %s " % (domain, WELL_KNOWN)
        try:
            with open(self.access_log, errors="replace") as f:
                return sum(1 for line in f if line.startswith(want))
        except OSError:
            return 0

    def log(self, domain):
        """The GETs of the policy of mta-sts.<domain> so far, in order:
        dicts of status, bytes (body sent) and the request's caching
        headers (if_none_match, if_modified_since, if_match,
        if_unmodified_since, if_range, cache_control, pragma; "" when
        absent)."""
        out = []
        try:
            with open(self.json_log, errors="replace") as f:
                for line in f:
                    e = json.loads(line)
                    if (e["host"] == "mta-sts." + domain
                            and e["uri"] == WELL_KNOWN):
                        out.append(e)
        except OSError:
            pass
        return out


def _quote(text):
    """text as one quoted nginx configuration string ($ cannot be
    escaped there)."""
    assert "$" not in text, "a body served with return holds no $"
    return '"%s"' % (text.replace("\\", "\\\\").replace('"', '\\"')
                     .replace("\r", "\\r").replace("\n", "\\n"))


class SlowServer:
    """Accepts TCP on ip:port and never sends a byte."""

    def __init__(self, ip=None, port=443):
        self.ip = ip or peers.loopback_host(port)
        self.port = port
        self.accepted = 0
        self._sock = None
        self._held = []
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.ip, self.port))
        s.listen(16)
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        peers._register(self)
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
                self.accepted += 1
                self._held.append(c)
            except OSError:
                pass

    def stop(self):
        peers._unregister(self)
        self._stop.set()
        if self._thread:
            self._thread.join(5)
            self._thread = None
        for s in [self._sock] + self._held:
            if s is not None:
                s.close()
        self._sock = None
        self._held = []
