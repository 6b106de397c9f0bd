#!/usr/bin/python3
"""bench/bench.py: sg against Postfix on this machine, in one run.

Called by `make bench` (mk/bench.mk), after sg is built and Postfix is
installed. Everything runs in a temporary folder in /tmp on free loopback
ports and is stopped and removed at the end, also on failure:

  * sg: PostgreSQL (fsync on, the defaults), Redis, nginx with
    `worker_processes 2`, `worker_connections 20000`,
    `worker_rlimit_nofile 30000`; relay_networks holds 127.0.0.0/8.
  * Postfix: a private instance (own config, queue and data folders,
    `postfix -c DIR start`), smtpd on 127.0.0.1:PORT, mynetworks
    127.0.0.0/8, everything delivered by the discard transport, fsync on,
    Postfix's default process limits (default_process_limit = 100).

Measured:
  1. smtp-source -s 20 and -s 100 (-m 5000 -l 4096) against each;
     messages/s from the wall time of each smtp-source run, and how many
     messages were really queued (sg: rows in `messages`; Postfix: qmgr
     "(queue active)" lines in its maillog_file).
  2. 10,000 concurrent idle SMTP sessions: greetings received, and the
     memory (sum of VmRSS and of Pss) of all server processes before and
     after.

Prints the table and writes docs/benchmarks.md. Environment:
BENCH_MESSAGES (5000), BENCH_IDLE (10000), BENCH_KEEP_TMP=1 keeps the
temporary folder, BENCH_DOC (docs/benchmarks.md).
"""

import asyncio
import datetime
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(PROJECT, "tools"))

import sginstance  # noqa: E402
from sginstance import (InstanceError, Nginx, Postgres, Redis,  # noqa: E402
                        free_port, make_self_signed, pid_alive, stop_pid,
                        wait_tcp)

MODULE_SO = os.environ.get("BENCH_MODULE_SO") or os.path.join(
    PROJECT, "build", "ngx_sg_module.so")
DOC = os.environ.get("BENCH_DOC") or os.path.join(PROJECT, "docs", "benchmarks.md")
MESSAGES = int(os.environ.get("BENCH_MESSAGES") or 5000)
IDLE = int(os.environ.get("BENCH_IDLE") or 10000)
SIZE = 4096
SESSIONS = (20, 100)
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
RUN_TIMEOUT = 600           # one smtp-source run
DRAIN_TIMEOUT = 180         # Postfix delivering (discarding) its queue
IDLE_CONNECT_TIMEOUT = 5    # per connection attempt
IDLE_GREETING_TIMEOUT = 5   # per connection, after connect
IDLE_BOUND = 60             # whole idle phase, per server
NGINX_WORKERS = 2
NGINX_WORKER_CONNECTIONS = 20000
# at most the hard limit: the master cannot raise it in a container
NGINX_RLIMIT_NOFILE = min(30000, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def log(msg):
    print("bench: " + msg, flush=True)


def smtp_source_cmd(sessions, port):
    return [SMTP_SOURCE, "-s", str(sessions), "-m", str(MESSAGES),
            "-l", str(SIZE), "-f", "from@example.com", "-t", "to@example.org",
            "127.0.0.1:%d" % port]


def cmd_text(cmd):
    return " ".join(os.path.basename(c) if i == 0 else c
                    for i, c in enumerate(cmd))


# ---------------------------------------------------------------- processes

def children(pid):
    """Pids of all descendants of pid."""
    parent = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parent.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in parent.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def proc_name(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return "?"


def memory_kb(pids):
    """(sum of VmRSS, sum of Pss) in kB over pids."""
    rss = pss = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return rss, pss


def tree(pid):
    return [pid] + children(pid) if pid_alive(pid) else []


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE + 2000
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(new, soft), hard))
        except (ValueError, OSError):
            pass
        if new < want and os.geteuid() == 0:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            except (ValueError, OSError):
                pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---------------------------------------------------------------- sg

class Sg:
    name = "sg"

    def __init__(self, base):
        self.base = base
        self.pg = self.redis = self.nginx = None

    def start(self):
        b = self.base
        self.pg = Postgres(os.path.join(b, "pg", "data"),
                           os.path.join(b, "pg-run"), free_port())
        self.pg.init()
        self.pg.start()
        sginstance.migrate(self.pg.conninfo)
        with self.pg.connect() as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO relay_networks(value) VALUES ('127.0.0.0/8')")
            cur.execute("SHOW fsync")
            self.fsync = cur.fetchone()[0]
            cur.execute("SHOW synchronous_commit")
            self.sync_commit = cur.fetchone()[0]
        conn.close()
        self.redis = Redis(os.path.join(b, "redis"))
        self.redis.start()

        d = os.path.join(b, "nginx")
        os.makedirs(os.path.join(d, "tls"), mode=0o755)
        cert, key = make_self_signed("sg.bench")
        cert_file = os.path.join(d, "tls", "cert.pem")
        key_file = os.path.join(d, "tls", "key.pem")
        with open(cert_file, "w") as f:
            f.write(cert)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        ports = set()
        while len(ports) < 4:
            ports.add(free_port())
        self.port, admin, http, dns = sorted(ports)
        self.conf = os.path.join(d, "nginx.conf")
        # sg_resolver on a loopback port where nothing answers: nothing in
        # this benchmark may send DNS queries off the machine.
        sginstance.write_nginx_conf(
            self.conf, prefix_dir=d, module_so=MODULE_SO,
            pg_conninfo=self.pg.conninfo, redis_addr=self.redis.address,
            smtp_listen="127.0.0.1:%d" % self.port,
            admin_listen="127.0.0.1:%d" % admin,
            http_listen="127.0.0.1:%d" % http,
            cert_file=cert_file, key_file=key_file, workers=NGINX_WORKERS,
            resolver="127.0.0.1:%d" % dns, hostname="sg.bench",
            extra_main="worker_rlimit_nofile %d;" % NGINX_RLIMIT_NOFILE,
            error_log_level="notice")
        # write_nginx_conf fixes worker_connections at 1024
        with open(self.conf) as f:
            text = f.read()
        text, n = re.subn(r"worker_connections\s+\d+;",
                          "worker_connections %d;" % NGINX_WORKER_CONNECTIONS,
                          text)
        if n != 1:
            raise InstanceError("cannot set worker_connections in %s" % self.conf)
        with open(self.conf, "w") as f:
            f.write(text)
        self.nginx = Nginx(d, self.conf, wait_port=self.port)
        self.nginx.start()

    def queued(self):
        conn = self.pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM messages")
                return cur.fetchone()[0]
        finally:
            conn.close()

    def settle(self, before, sent):
        return self.queued() - before

    def pids(self):
        return tree(self.nginx.pid) if self.nginx else []

    def problems(self):
        if not self.nginx:
            return []
        return self.nginx.error_log_problems()

    def error_lines(self):
        try:
            with open(self.nginx.error_log, errors="replace") as f:
                return [l.rstrip("\n") for l in f if "[error]" in l]
        except OSError:
            return []

    def stop(self):
        for svc in (self.nginx, self.redis, self.pg):
            if svc is None:
                continue
            try:
                svc.stop()
            except Exception as e:  # keep stopping the others
                log("stopping %s: %s" % (type(svc).__name__, e))


# ---------------------------------------------------------------- Postfix

POSTFIX_MASTER_CF = """\
# generated by bench/bench.py: a private instance, no chroot
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

POSTFIX_MAIN_CF = """\
# generated by bench/bench.py: a private instance that accepts mail from
# 127.0.0.0/8 and discards it after queueing (nothing leaves the machine)
compatibility_level = 3.6
myhostname = postfix.bench
mydomain = bench
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
queue_directory = {queue}
data_directory = {data}
meta_directory = /etc/postfix
maillog_file = {maillog}
maillog_file_prefixes = {dir}
syslog_name = postfix-bench
default_transport = discard:bench
relay_transport = discard:bench
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_banner = $myhostname ESMTP
"""


class PostfixInstance:
    name = "Postfix"

    def __init__(self, base):
        self.dir = os.path.join(base, "postfix")
        self.etc = os.path.join(self.dir, "etc")
        self.queue = os.path.join(self.dir, "queue")
        self.data = os.path.join(self.dir, "data")
        self.maillog = os.path.join(self.dir, "maillog")
        self.started = False
        self.master_pid = None

    def _postfix(self, *args, timeout=120):
        cmd = [POSTFIX, "-c", self.etc] + list(args)
        if shutil.which("script"):
            # postfix reports to syslog, or to stderr only when it is a tty
            cmd = ["script", "-qec", " ".join(cmd), "/dev/null"]
        p = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise InstanceError("postfix %s failed (%d):\n%s%s\nmaillog:\n%s"
                                % (" ".join(args), p.returncode, p.stdout,
                                   p.stderr, sginstance.tail(self.maillog)))
        return p.stdout + p.stderr

    def postconf(self, *names):
        p = subprocess.run(["postconf", "-c", self.etc] + list(names),
                           capture_output=True, text=True, timeout=30)
        return p.stdout.strip()

    def start(self):
        self.port = free_port()
        os.makedirs(self.etc)
        os.makedirs(self.queue)
        os.makedirs(self.data)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(queue=self.queue, data=self.data,
                                           maillog=self.maillog,
                                           dir=self.dir))
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(port=self.port))
        self._postfix("check")
        self.started = True
        self._postfix("start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.master_pid = sginstance.read_pid(
                os.path.join(self.queue, "pid", "master.pid"))
            if pid_alive(self.master_pid):
                break
            time.sleep(0.1)
        if not wait_tcp("127.0.0.1", self.port, 30,
                        lambda: pid_alive(self.master_pid)):
            raise InstanceError("Postfix does not answer on port %d; maillog:\n%s"
                                % (self.port, sginstance.tail(self.maillog)))
        self.fsync = "on (Postfix always fsyncs queue files)"

    def _maillog(self):
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def queued(self):
        """Messages that entered Postfix's queue: qmgr '(queue active)'
        lines with our sender (one per message)."""
        return len(re.findall(r"qmgr\[\d+\]: \w+: from=<from@example\.com>,"
                              r" size=\d+, nrcpt=\d+ \(queue active\)",
                              self._maillog()))

    def delivered(self):
        return len(re.findall(r"discard\[\d+\]: .*status=sent", self._maillog()))

    def queue_files(self):
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(os.path.join(self.queue, sub)):
                n += len(files)
        return n

    def settle(self, before, sent):
        """Wait until the queue is empty (everything discarded) and the
        log has caught up; return messages queued since `before`."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        last, stable = -1, 0
        while time.monotonic() < deadline:
            n = self.queued()
            if self.queue_files() == 0 and n == last:
                stable += 1
                if stable >= 3:
                    break
            else:
                stable = 0
            last = n
            time.sleep(0.5)
        return self.queued() - before

    def pids(self):
        return tree(self.master_pid) if self.master_pid else []

    def problems(self):
        return [l for l in self._maillog().splitlines()
                if re.search(r": (fatal|panic|error):", l)]

    def warnings(self):
        return [l for l in self._maillog().splitlines() if ": warning:" in l]

    def stop(self):
        if not self.started:
            return
        pid = self.master_pid
        procs = self.pids()
        try:
            self._postfix("stop", timeout=60)
        except Exception as e:
            log("postfix stop: %s" % e)
        if pid and pid_alive(pid):
            stop_pid(pid, signal.SIGTERM, 30)
        # the children (smtpd, cleanup, ...) notice the master's exit on
        # their own; wait for them, then kill what is left, by pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(p) for p in procs):
            time.sleep(0.1)
        for p in procs:
            if pid_alive(p):
                stop_pid(p, signal.SIGKILL, 5)


# ---------------------------------------------------------------- load

def run_smtp_source(server, sessions):
    cmd = smtp_source_cmd(sessions, server.port)
    before = server.queued()
    log("%s: %s" % (server.name, cmd_text(cmd)))
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
        rc, out = p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", ((e.stdout or b"") + (e.stderr or b"")).decode(
            errors="replace") if isinstance(e.stdout, bytes) else str(e)
    wall = time.monotonic() - t0
    queued = server.settle(before, MESSAGES)
    rate = MESSAGES / wall if wall > 0 else 0.0
    errors = [l for l in out.splitlines() if l.strip()]
    log("%s -s %d: %.2f s, %.0f msg/s, %d queued, exit %s%s"
        % (server.name, sessions, wall, rate, queued, rc,
           ("; smtp-source said:\n  " + "\n  ".join(errors[:10])) if errors else ""))
    return {"wall": wall, "rate": rate, "queued": queued, "rc": rc,
            "output": errors, "cmd": cmd_text(cmd)}


async def _idle(port, n, connect_timeout, greeting_timeout, bound):
    conns = []
    counts = {"connected": 0, "greeted": 0, "refused": 0, "timeout": 0,
              "other": 0, "no_greeting": 0}
    sem = asyncio.Semaphore(1000)
    deadline = time.monotonic() + bound

    async def one():
        async with sem:
            left = deadline - time.monotonic()
            if left <= 0:
                counts["timeout"] += 1
                return
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port),
                    min(connect_timeout, left))
            except asyncio.TimeoutError:
                counts["timeout"] += 1
                return
            except ConnectionRefusedError:
                counts["refused"] += 1
                return
            except OSError:
                counts["other"] += 1
                return
        counts["connected"] += 1
        conns.append(w)
        try:
            left = max(0.1, min(greeting_timeout, deadline - time.monotonic()))
            while True:
                line = await asyncio.wait_for(r.readline(), left)
                if not line:
                    raise EOFError
                if line[:4] == b"220 ":
                    counts["greeted"] += 1
                    return
                if line[:4] != b"220-":
                    raise EOFError
        except (asyncio.TimeoutError, EOFError, OSError):
            counts["no_greeting"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    counts["seconds"] = time.monotonic() - t0
    return conns, counts


def idle_sessions(server):
    """Open IDLE sessions to server, read greetings, measure memory, close."""
    pids = server.pids()
    rss0, pss0 = memory_kb(pids)
    loop = asyncio.new_event_loop()
    conns = []
    try:
        conns, counts = loop.run_until_complete(
            _idle(server.port, IDLE, IDLE_CONNECT_TIMEOUT,
                  IDLE_GREETING_TIMEOUT, IDLE_BOUND))
        time.sleep(1)
        pids = server.pids()
        rss1, pss1 = memory_kb(pids)
        procs = {}
        for p in pids:
            procs[proc_name(p)] = procs.get(proc_name(p), 0) + 1
        alive = server_alive(server)
    finally:
        for w in conns:
            try:
                w.transport.abort()
            except Exception:
                pass
        loop.run_until_complete(asyncio.sleep(0.2))
        loop.close()
    res = dict(counts, rss_before=rss0, rss_after=rss1, pss_before=pss0,
               pss_after=pss1, procs=procs, alive=alive)
    g = max(counts["greeted"], 1)
    res["kb_per_session"] = (rss1 - rss0) / g
    res["pss_kb_per_session"] = (pss1 - pss0) / g
    log("%s idle: %d attempts, %d connected, %d greeted in %.1f s; "
        "RSS %.1f -> %.1f MB (%.1f KB/greeted session), PSS %.1f -> %.1f MB; "
        "processes %s" % (server.name, IDLE, counts["connected"],
                          counts["greeted"], counts["seconds"], rss0 / 1024,
                          rss1 / 1024, res["kb_per_session"], pss0 / 1024,
                          pss1 / 1024, procs))
    return res


def server_alive(server):
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.settimeout(5)
            return s.recv(512).startswith(b"220")
    except OSError:
        return False


# ---------------------------------------------------------------- report

def sh(cmd):
    try:
        p = subprocess.run(cmd, shell=True, capture_output=True, text=True,
                           timeout=30)
        return (p.stdout + p.stderr).strip()
    except Exception as e:
        return "(%s)" % e


def machine_facts():
    mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    cpu = sh("awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo")
    return [
        ("CPU", "%s × %s" % (sh("nproc"), cpu or "?")),
        ("memory", mem),
        ("kernel", platform.release()),
        ("OS", sh(". /etc/os-release && echo \"$PRETTY_NAME\"")),
        ("nginx", sh("nginx -v 2>&1").replace("nginx version: ", "")),
        ("PostgreSQL", sh("/usr/lib/postgresql/15/bin/postgres --version")),
        ("Redis", sh("redis-server --version | awk '{print $3}'")),
        ("Postfix", sh("postconf -d -h mail_version")),
        ("sg", ("module %s (BENCH_MODULE_SO; not built from this tree)"
                % MODULE_SO) if os.environ.get("BENCH_MODULE_SO") else
         "%s, built by make into build/ngx_sg_module.so" % sh(
             "cd %s && git describe --always --dirty 2>/dev/null"
             " || echo unknown" % PROJECT)),
    ]


def fmt_mb(kb):
    return "%.1f MB" % (kb / 1024.0)


def rate_cell(r):
    if not r:
        return "–"
    if r["rc"] != 0:
        return ("**failed**: smtp-source gave up after %.1f s (exit %s)"
                % (r["wall"], r["rc"]))
    return "%.0f (%.1f s)" % (r["rate"], r["wall"])


def table(results):
    sgr, pfr = results["sg"], results["Postfix"]
    rows = ["| | sg | Postfix |", "|---|---:|---:|"]
    for s in SESSIONS:
        a, b = sgr["load"].get(s), pfr["load"].get(s)
        rows.append("| msg/s, `smtp-source -s %d` | %s | %s |" % (
            s, rate_cell(a), rate_cell(b)))
        rows.append("| messages queued of %d, `-s %d` | %s | %s |" % (
            MESSAGES, s, a["queued"] if a else "–", b["queued"] if b else "–"))
    a, b = sgr.get("idle"), pfr.get("idle")

    def idle_cell(r, f):
        return f(r) if r else "–"
    rows.append("| idle sessions greeted of %d | %s | %s |" % (
        IDLE, idle_cell(a, lambda r: "%d" % r["greeted"]),
        idle_cell(b, lambda r: "%d (TCP connected: %d)" % (r["greeted"], r["connected"]))))
    rows.append("| RSS of all server processes, before → with idle sessions | %s | %s |" % (
        idle_cell(a, lambda r: "%s → %s" % (fmt_mb(r["rss_before"]), fmt_mb(r["rss_after"]))),
        idle_cell(b, lambda r: "%s → %s" % (fmt_mb(r["rss_before"]), fmt_mb(r["rss_after"])))))
    rows.append("| PSS (shared pages split), before → with idle sessions | %s | %s |" % (
        idle_cell(a, lambda r: "%s → %s" % (fmt_mb(r["pss_before"]), fmt_mb(r["pss_after"]))),
        idle_cell(b, lambda r: "%s → %s" % (fmt_mb(r["pss_before"]), fmt_mb(r["pss_after"])))))
    rows.append("| RSS growth per greeted session | %s | %s |" % (
        idle_cell(a, lambda r: "%.1f KB" % r["kb_per_session"]),
        idle_cell(b, lambda r: "%.1f KB" % r["kb_per_session"])))
    rows.append("| PSS growth per greeted session | %s | %s |" % (
        idle_cell(a, lambda r: "%.1f KB" % r["pss_kb_per_session"]),
        idle_cell(b, lambda r: "%.1f KB" % r["pss_kb_per_session"])))
    return "\n".join(rows)


def write_doc(results, facts, started, problems_text):
    sgr, pfr = results["sg"], results["Postfix"]
    cmds = []
    for name in ("sg", "Postfix"):
        for s in SESSIONS:
            r = results[name]["load"].get(s)
            if r:
                cmds.append("%-8s %s" % (name + ":", r["cmd"]))
    pf = results.get("postfix_conf", "")
    doc = """\
# Benchmarks

Written by `make bench` (bench/bench.py) on {date}. Re-run it to refresh
this page; numbers from another machine are not comparable.

## Machine

{facts}

## Results

{table}

## How it was measured

One run of `bench/bench.py` starts, in a temporary folder in /tmp and on
free loopback ports, a private sg instance and a private Postfix instance,
runs the same load against both, and stops and removes everything.

* **sg**: PostgreSQL 15 with its defaults (`fsync = {pg_fsync}`,
  `synchronous_commit = {pg_sync}`), Redis, nginx with `worker_processes
  {workers}`, `worker_connections {wc}`, `worker_rlimit_nofile {rl}`, the
  generated configuration of `tools/sginstance.py` otherwise (sg's
  defaults: `sg_postgres_pool 2` connections per worker, no
  `sg_smtp_greeting_delay`, TLS off). `relay_networks` holds
  `127.0.0.0/8`. sg answers 250 only after the message and its recipients
  are committed to PostgreSQL.
* **Postfix {pfver}**: its own config, queue and data folders, started
  with `postfix -c DIR start`; `127.0.0.1:PORT inet n - n - - smtpd` in
  master.cf (no chroot), `compatibility_level = 3.6`, `mynetworks =
  127.0.0.0/8`, `mydestination =` (empty), `default_transport =
  relay_transport = discard`, `maillog_file` in the instance folder.
  Postfix's default limits are kept: {pflimits}. Postfix fsyncs every queue
  file before it answers 250.
* **Load**, against each server in turn (sg then Postfix, for each `-s`):

  ```
{cmds}
  ```

  smtp-source opens one SMTP session per message; each message is 4096
  bytes of body. msg/s = {m} / wall time of the smtp-source process
  (`time.monotonic()` around it).
* **Queued**: sg: `SELECT count(*) FROM messages` before and after the
  run. Postfix: lines `qmgr[…]: ID: from=<from@example.com>, size=…,
  nrcpt=1 (queue active)` in its maillog_file (one per message that
  entered the queue), after waiting until the queue folders are empty.
  Postfix also delivers (discards) during the run, sg does not deliver in
  this version; both do their work on the same 2 cores as smtp-source.
* **Idle sessions**: one Python asyncio client (RLIMIT_NOFILE raised)
  opens {idle} TCP connections to the SMTP port, at most 1000 connects in
  flight, {ct} s connect timeout, then waits up to {gt} s for each
  greeting (`220 `), {bound} s at most for all; the connections stay open,
  idle, while memory is read: the sum of `VmRSS` (/proc/PID/status) and of
  `Pss` (/proc/PID/smaps_rollup) over the nginx master and its workers, or
  over the Postfix master and all its children (smtpd, qmgr, pickup,
  anvil, …), before the connections and 1 s after the last greeting. This
  runs first, on the freshly started servers, before the load runs.
  RSS counts shared pages once per process, so the RSS sum overstates what
  several processes really use; PSS splits shared pages. Per-session
  growth = (RSS after − RSS before) / greeted sessions. Then every
  connection is closed.

## Notes

* sg greeted {sg_greeted} of {idle} concurrent sessions; Postfix greeted
  {pf_greeted}: it serves at most `default_process_limit` (100) sessions
  with one smtpd process each; the other clients wait in the kernel's
  listen queue (or their SYNs are dropped) without a greeting until an
  smtpd becomes free (under stress Postfix shortens `smtpd_timeout` to 10 s).
* Both commit to disk before 250: sg with one PostgreSQL transaction per
  message (WAL fsync; PostgreSQL groups concurrent commits), Postfix with
  an fsync of the queue file. Neither number is a tuning result: both run
  with their defaults on a small machine, and the client runs on the same
  cores.
{problems}""".format(
        date=started.strftime("%Y-%m-%d %H:%M UTC"),
        facts="\n".join("* %s: %s" % kv for kv in facts),
        table=table(results),
        pg_fsync=sgr.get("fsync", "?"), pg_sync=sgr.get("sync_commit", "?"),
        workers=NGINX_WORKERS, wc=NGINX_WORKER_CONNECTIONS, rl=NGINX_RLIMIT_NOFILE,
        pfver=dict(facts).get("Postfix", ""), pflimits=pf,
        cmds="\n".join("  " + c for c in cmds), m=MESSAGES, idle=IDLE,
        ct=IDLE_CONNECT_TIMEOUT, gt=IDLE_GREETING_TIMEOUT, bound=IDLE_BOUND,
        sg_greeted=sgr.get("idle", {}).get("greeted", "–"),
        pf_greeted=pfr.get("idle", {}).get("greeted", "–"),
        problems=problems_text)
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC + ".tmp", "w") as f:
        f.write(doc)
    os.replace(DOC + ".tmp", DOC)


# ---------------------------------------------------------------- main

def main():
    if not os.path.exists(MODULE_SO):
        sys.stderr.write("bench: %s is missing: run make\n" % MODULE_SO)
        return 1
    for tool in (SMTP_SOURCE, POSTFIX):
        if not os.path.exists(tool):
            sys.stderr.write("bench: %s is missing: apt-get install postfix\n" % tool)
            return 1
    nofile = raise_nofile()
    log("client RLIMIT_NOFILE %s" % (nofile,))
    started = datetime.datetime.now(datetime.timezone.utc)
    base = tempfile.mkdtemp(prefix="sgbench-", dir="/tmp")
    os.chmod(base, 0o755)
    sg, pf = Sg(base), PostfixInstance(base)
    results = {"sg": {"load": {}}, "Postfix": {"load": {}}}
    failed = None
    problems_text = ""
    try:
        log("starting sg in %s" % base)
        sg.start()
        results["sg"]["fsync"] = sg.fsync
        results["sg"]["sync_commit"] = sg.sync_commit
        log("sg: SMTP 127.0.0.1:%d, nginx pid %d, workers %s"
            % (sg.port, sg.nginx.pid, children(sg.nginx.pid)))
        log("starting Postfix")
        pf.start()
        results["postfix_conf"] = ", ".join(
            "`%s`" % l for l in pf.postconf(
                "default_process_limit", "smtpd_client_connection_count_limit",
                "smtpd_timeout", "in_flow_delay").splitlines())
        log("Postfix: SMTP 127.0.0.1:%d, master pid %s; %s"
            % (pf.port, pf.master_pid, results["postfix_conf"]))

        # idle sessions first, on freshly started servers: afterwards
        # Postfix keeps ~100 smtpd and cleanup processes from the load
        # around, which would hide what the idle sessions cost
        for server in (sg, pf):
            results[server.name]["idle"] = idle_sessions(server)
        for s in SESSIONS:
            for server in (sg, pf):
                results[server.name]["load"][s] = run_smtp_source(server, s)
        results["sg"]["alive_after"] = server_alive(sg)
    except Exception:
        failed = traceback.format_exc()
        sys.stderr.write(failed)
    finally:
        sg_problems = sg.problems()
        sg_errors = sg.error_lines()
        pf_problems = pf.problems()
        pf_warnings = pf.warnings()
        pf.stop()
        sg.stop()
        if os.environ.get("BENCH_KEEP_TMP"):
            log("kept %s" % base)
        else:
            shutil.rmtree(base, ignore_errors=True)

    lines = []
    if sg_problems or sg_errors:
        lines.append("* sg's error log had %d [alert]/[crit]/[emerg] and %d [error]"
                     " lines during the run%s" % (
                         len(sg_problems), len(sg_errors),
                         ", for example:\n\n  ```\n" + "\n".join(
                             "  " + l for l in (sg_problems + sg_errors)[:8])
                         + "\n  ```" if (sg_problems or sg_errors) else ""))
    else:
        lines.append("* sg's error log had no [error], [alert], [crit] or"
                     " [emerg] lines during the run.")
    if pf_problems:
        lines.append("* Postfix logged %d error/fatal/panic lines, e.g.:\n\n  ```\n%s\n  ```"
                     % (len(pf_problems), "\n".join("  " + l for l in pf_problems[:5])))
    if pf_warnings:
        uniq = sorted({re.sub(r"^.*?: warning: ", "", l) for l in pf_warnings})
        lines.append("* Postfix warnings (%d lines): %s" % (
            len(pf_warnings), "; ".join("`%s`" % u for u in uniq[:4])))
    for name in ("sg", "Postfix"):
        for s, r in sorted(results[name]["load"].items()):
            if r["rc"] != 0 or r["output"]:
                lines.append("* smtp-source -s %d against %s exited %s: %s" % (
                    s, name, r["rc"], "; ".join("`%s`" % o for o in r["output"][:3])))
    if failed:
        lines.append("* The run FAILED:\n\n  ```\n%s\n  ```" % "\n".join(
            "  " + l for l in failed.strip().splitlines()[-15:]))
    problems_text = "\n".join(lines) + "\n"

    print()
    print(table(results))
    print()
    print(problems_text)
    try:
        facts = machine_facts()
        write_doc(results, facts, started, problems_text)
        log("wrote %s" % DOC)
    except Exception:
        traceback.print_exc()
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
