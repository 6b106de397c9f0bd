"""A test DNS server on loopback for sg's delivery tests: dnsmasq
(Debian's dnsmasq-base) serving the records a test gives, plus a silent
server that never answers (timeouts).

    dns = DnsServer().start({
        "mx": [("a.test", "mx1.a.test", 10), ("null.test", ".", 0)],
        "hosts": {"mx1.a.test": ["127.0.0.11", "::11"]},
        "txt": [("_mta-sts.a.test", "v=STSv1; id=1")],
    })
    inst = start_sg(pg, redis, resolver=dns.address)   # "127.0.0.1:PORT"
    ...
    dns.reload({...})     # new records, same address
    dns.stop()            # idempotent; also at interpreter exit

Records (every key optional):

    mx      [(domain, exchange, preference)]; exchange "." is the RFC 7505
            null MX ("MX 0 .")
    hosts   {name: [address, ...]}: A and AAAA records
    txt     [(name, text)] (text longer than 255 octets is split into
            strings by dnsmasq)
    cname   [(alias, target)]
    rr      [(name, rrtype, hex_rdata)]: any record (TLSA is 52: rdata
            "030101" + sha256 hex), served as is
    zones   domains dnsmasq is authoritative for (default: the last label
            of every name above): a name in them it does not know is
            NXDOMAIN, a known name without the asked type is NODATA
            (NOERROR, no answer).  Names outside every zone are REFUSED,
            which libunbound reports as SERVFAIL: the way to get a
            temporary failure for a name.

sg forwards "test." names to its sg_resolver (libunbound would answer
NXDOMAIN itself, RFC 6761): any TLD works, "test" included.  Unbound's
other special names (localhost, invalid, onion) stay local.

DnsServer.queries() returns the names asked so far (from dnsmasq's log),
to check what sg looked up.  SilentServer binds a UDP (and TCP) port and
never answers: DNS timeouts.
"""

import atexit
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

import sginstance    # tools/, on sys.path through sgtest

DNSMASQ = "/usr/sbin/dnsmasq"
KEEP_TMP = bool(os.environ.get("SG_KEEP_TMP"))

_running = set()


@atexit.register
def _stop_all():
    for s in list(_running):
        s.stop()


def free_udp_tcp_port(host="127.0.0.1"):
    """A port free for both UDP and TCP on host a moment ago, never one
    sginstance.free_port() handed out before (nor the other way round)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            if port in sginstance.PORTS_GIVEN:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                sginstance.PORTS_GIVEN.add(port)
                return port
    raise OSError("no free port on %s" % host)


def dns_query(host, port, name, rrtype=1, timeout=1.0):
    """One UDP query; the raw answer, or None. For readiness checks."""
    qname = b"".join(bytes([len(l)]) + l.encode()
                     for l in name.rstrip(".").split(".") if l) + b"\0"
    msg = struct.pack(">HHHHHH", 0x5347, 0x0100, 1, 0, 0, 0) + qname \
        + struct.pack(">HH", rrtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(msg, (host, port))
            data, _ = s.recvfrom(4096)
        except OSError:
            return None
    return data


def rcode_of(answer):
    return answer[3] & 0x0F if answer and len(answer) >= 4 else None


def _zones_of(records):
    names = [m[0] for m in records.get("mx", ())]
    names += [m[1] for m in records.get("mx", ()) if m[1] != "."]
    names += list(records.get("hosts", {}))
    names += [t[0] for t in records.get("txt", ())]
    names += [c[0] for c in records.get("cname", ())]
    names += [r[0] for r in records.get("rr", ())]
    return sorted({n.rstrip(".").rsplit(".", 1)[-1].lower()
                   for n in names if n.strip(".")})


def _check(value, what):
    v = str(value)
    if any(c in v for c in "\n\r") or (what != "txt" and "," in v):
        raise ValueError("%s: %r cannot go into a dnsmasq option" % (what, v))
    return v


def dnsmasq_conf(records, port, host, log_file):
    """The dnsmasq configuration serving records on host:port."""
    lines = [
        "port=%d" % port,
        "listen-address=%s" % host,
        "bind-interfaces",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "no-negcache",
        "cache-size=0",
        "local-ttl=0",
        "log-queries",
        "log-facility=%s" % log_file,
    ]
    zones = records.get("zones")
    if zones is None:
        zones = _zones_of(records)
    for z in zones:
        lines.append("local=/%s/" % _check(z.strip("."), "zone"))
    for domain, exchange, pref in records.get("mx", ()):
        lines.append("mx-host=%s,%s,%d" % (_check(domain, "mx"),
                                           _check(exchange, "mx"), int(pref)))
    for name, addrs in records.get("hosts", {}).items():
        for a in addrs:
            # one address per line: dnsmasq adds them up
            lines.append("host-record=%s,%s" % (_check(name, "host"),
                                                _check(a, "address")))
    for name, text in records.get("txt", ()):
        t = _check(text, "txt").replace("\\", "\\\\").replace('"', '\\"')
        lines.append('txt-record=%s,"%s"' % (_check(name, "txt"), t))
    for alias, target in records.get("cname", ()):
        lines.append("cname=%s,%s" % (_check(alias, "cname"),
                                      _check(target, "cname")))
    for name, rrtype, hexdata in records.get("rr", ()):
        lines.append("dns-rr=%s,%d,%s" % (_check(name, "rr"), int(rrtype),
                                          _check(hexdata, "rr")))
    return "\n".join(lines) + "\n"


class DnsServer:
    """dnsmasq on host:port (a free port by default) serving records."""

    def __init__(self, host="127.0.0.1", port=None, base_dir=None):
        self.host = host
        self.port = port or free_udp_tcp_port(host)
        self._own_dir = base_dir is None
        self.dir = base_dir or tempfile.mkdtemp(prefix="sgdns-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.conf = os.path.join(self.dir, "dnsmasq.conf")
        self.log_file = os.path.join(self.dir, "dnsmasq.log")
        self.proc = None
        self.records = {}

    @property
    def address(self):
        """For sg_resolver / start_sg(resolver=...)."""
        return "%s:%d" % (self.host, self.port)

    def start(self, records=None, timeout=10):
        if records is not None:
            self.records = records
        with open(self.conf, "w") as f:
            f.write(dnsmasq_conf(self.records, self.port, self.host,
                                 self.log_file))
        # dnsmasq drops to nobody after binding: its log must stay writable
        open(self.log_file, "a").close()
        os.chmod(self.log_file, 0o666)
        self.proc = subprocess.Popen(
            [DNSMASQ, "--keep-in-foreground", "--conf-file=" + self.conf,
             "--pid-file="],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        _running.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace")
                self.proc = None
                _running.discard(self)
                raise RuntimeError("dnsmasq exited (%s):\n%s\n%s"
                                   % (self.conf, out, self.log_tail()))
            if dns_query(self.host, self.port, "sg-ready.invalid",
                         timeout=0.2) is not None:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("dnsmasq on %s does not answer" % self.address)

    def reload(self, records):
        """Serve other records at the same address (dnsmasq restarts: it
        reads mx-host= and friends only when it starts)."""
        self.stop(cleanup=False)
        return self.start(records)

    def stop(self, cleanup=True):
        p, self.proc = self.proc, None
        _running.discard(self)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if p is not None and p.stdout:
            p.stdout.close()
        if cleanup and self._own_dir and not KEEP_TMP:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines=30):
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def queries(self):
        """[(type, name)] asked so far, e.g. ("MX", "a.test")."""
        out = []
        try:
            with open(self.log_file, errors="replace") as f:
                for line in f:
                    i = line.find(" query[")
                    if i < 0:
                        continue
                    rest = line[i + 7:]
                    qtype, _, rest = rest.partition("] ")
                    out.append((qtype, rest.split(" ", 1)[0]))
        except OSError:
            pass
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class SilentServer:
    """Binds host:port for UDP and TCP and never answers: every query to
    it times out. TCP connections are accepted and held open."""

    def __init__(self, host="127.0.0.1", port=None):
        self.host = host
        self.port = port or free_udp_tcp_port(host)
        self.received = 0
        self._udp = self._tcp = None
        self._held = []
        self._stop = threading.Event()
        self._thread = None

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    def start(self):
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((self.host, self.port))
        self._udp.settimeout(0.2)
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind((self.host, self.port))
        self._tcp.listen(16)
        self._tcp.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        _running.add(self)
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self._udp.recvfrom(4096)
                self.received += 1
            except OSError:
                pass
            try:
                c, _ = self._tcp.accept()
                self._held.append(c)
            except OSError:
                pass

    def stop(self):
        _running.discard(self)
        self._stop.set()
        if self._thread:
            self._thread.join(5)
            self._thread = None
        for s in [self._udp, self._tcp] + self._held:
            if s is not None:
                s.close()
        self._udp = self._tcp = None
        self._held = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
