#!/usr/bin/python3
"""bench/sts_bench.py: the cost of a cached MTA-STS policy decision, sg
against postfix-mta-sts-resolver, on this machine, in one run.

Everything runs in a temporary folder on loopback (the test helpers of
tests/integration: PostgreSQL, Redis, dnsmasq, Debian's nginx as the
policy host with a certificate from a throwaway CA) and is stopped by pid
and removed at the end. One policy domain, bench.sts.test, publishes an
enforce policy; every measured decision is a cache hit.

What is measured (nanoseconds per decision, lookups one after another,
each started when the previous one is answered, as a delivery asks them):

  sg, in-worker hit   GET /api/v1/mta-sts/policies/D?bench=N&mx=H inside
                      one nginx worker: N times sg_sts_lookup() (the real
                      code: domain check, rbtree + LRU, answer, posted
                      event, handler), sg_sts_match_mx(H), sg_sts_release().
                      Timed in the worker (CLOCK_MONOTONIC) around the N
                      lookups: no HTTP, no client in the number.
  sg, Redis hit       the same with &from=redis: the worker forgets the
                      domain before each lookup, so each one is an MGET of
                      the three keys, the JSON decoded and the policy text
                      parsed again, then (as sg does whenever it takes a
                      policy from Redis) the TXT id confirmed through
                      libunbound, whose cache answers (the test DNS serves
                      its records with a TTL of 3600 s here).
  resolver, socketmap mta-sts-daemon 1.1.2 (Debian), cache "internal" (its
                      default) and "sqlite": N socketmap requests
                      ("sts D") over one TCP connection from a small C
                      client; each answer is a cache hit within
                      cache_grace (no DNS). This is what Postfix pays per
                      lookup: its smtp(8) asks the socketmap for every
                      delivery. Its "redis" cache is tried too; with
                      Debian 12's python3-aioredis 1.3 it cannot start
                      (it needs aioredis 2's from_url) and is reported so.

The resolver is Python (asyncio, uvloop) and is reached over a socket;
sg's decision is a C function call in the delivering worker. The numbers
are therefore per-decision costs of the two designs as deployed, not of
two implementations of one design. Rounds are interleaved (sg memory, sg
Redis, resolver ...) and the median of BENCH_STS_ROUNDS is shown, with
the range.

Environment: BENCH_STS_ROUNDS (5), BENCH_STS_N_MEMORY (100000),
BENCH_STS_N_REDIS (2000), BENCH_STS_N_SOCKETMAP (5000), BENCH_MODULE_SO
(build/ngx_sg_module.so). Prints a Markdown section (also to --out FILE).
Needs root (the resolver's DNS is dnsmasq on port 53 of a loopback
address, seen through a private mount namespace's /etc/resolv.conf).
"""

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(PROJECT, "tests", "integration"))
sys.path.insert(0, os.path.join(PROJECT, "tools"))

import dnsserver  # noqa: E402
import sgtest  # noqa: E402
from dnsserver import DnsServer  # noqa: E402
from peers import TestCA, loopback_host  # noqa: E402
from sts_servers import PolicyHosts, policy  # noqa: E402

MTA_STS_DAEMON = "/usr/bin/mta-sts-daemon"
DOMAIN = "bench.sts.test"
MX = "mx1.bench.sts.test"

ROUNDS = int(os.environ.get("BENCH_STS_ROUNDS", "5"))
N_MEMORY = int(os.environ.get("BENCH_STS_N_MEMORY", "100000"))
N_REDIS = int(os.environ.get("BENCH_STS_N_REDIS", "2000"))
N_SOCKETMAP = int(os.environ.get("BENCH_STS_N_SOCKETMAP", "5000"))

# N socketmap requests over one connection; prints ns per request
CLIENT_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int
read_answer(int fd, char *buf, size_t size)
{
    size_t  have = 0, len = 0, need = 0;
    char   *colon;

    for ( ;; ) {
        ssize_t  n = read(fd, buf + have, size - 1 - have);
        if (n <= 0) {
            return -1;
        }
        have += n;
        buf[have] = '\0';
        colon = memchr(buf, ':', have);
        if (colon) {
            len = strtoul(buf, NULL, 10);
            need = (colon - buf) + 1 + len + 1;
            if (need > size - 1) {
                return -1;
            }
            if (have >= need) {
                return have == need ? 0 : -1;
            }
        }
    }
}

int
main(int argc, char **argv)
{
    int                 fd, one = 1;
    long                i, n, ok = 0;
    char                req[300], buf[4096];
    size_t              rlen;
    struct timespec     a, b;
    struct sockaddr_in  sin;

    if (argc != 5) {
        return 2;
    }
    n = atol(argv[4]);
    rlen = snprintf(req, sizeof(req), "%zu:sts %s,", strlen(argv[3]) + 4,
                    argv[3]);

    fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &sin.sin_addr);
    if (connect(fd, (struct sockaddr *) &sin, sizeof(sin)) != 0) {
        perror("connect");
        return 1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    clock_gettime(CLOCK_MONOTONIC, &a);
    for (i = 0; i < n; i++) {
        if (write(fd, req, rlen) != (ssize_t) rlen
            || read_answer(fd, buf, sizeof(buf)) != 0)
        {
            fprintf(stderr, "request %ld failed\n", i);
            return 1;
        }
        ok += (strstr(buf, "OK secure match=") != NULL);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);

    printf("%.1f %ld %s\n", ((b.tv_sec - a.tv_sec) * 1e9
           + (b.tv_nsec - a.tv_nsec)) / n, ok, buf);
    return 0;
}
"""


class Daemon:
    """mta-sts-daemon on 127.0.0.1:port with the given cache, in a mount
    namespace whose /etc/resolv.conf names the test DNS on port 53."""

    def __init__(self, tmp, dns_ip, ca_file, cache, redis_url=None):
        self.dir = os.path.join(tmp, "daemon-" + cache)
        os.makedirs(self.dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        opts = ""
        if cache == "sqlite":
            opts = "  options:\n    filename: %s/cache.db\n" % self.dir
        elif cache == "redis":
            opts = "  options:\n    url: %s\n" % redis_url
        cfg = os.path.join(self.dir, "daemon.yml")
        with open(cfg, "w") as f:
            f.write("host: 127.0.0.1\nport: %d\ncache:\n  type: %s\n%s"
                    % (self.port, cache, opts))
        conf = os.path.join(self.dir, "resolv.conf")
        with open(conf, "w") as f:
            f.write("nameserver %s\n" % dns_ip)
        script = ('mount --bind "$1" /etc/resolv.conf && '
                  'SSL_CERT_FILE="$2" exec %s -v warn -c "$3"'
                  % MTA_STS_DAEMON)
        self.logf = open(os.path.join(self.dir, "daemon.log"), "w")
        self.proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script, "sh", conf, ca_file, cfg],
            stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf,
            start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("mta-sts-daemon (%s) exited: %s"
                                   % (cache, self.log()[-600:]))
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mta-sts-daemon does not listen")
                time.sleep(0.1)

    def log(self):
        self.logf.flush()
        return open(self.logf.name, errors="replace").read()

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(25)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.logf.close()


def _dnsmasq_conf_with_ttl(records, port, host, log_file):
    """The test DNS with a TTL, as real zones have (the tests use 0 so that
    record changes are seen at once): libunbound caches the TXT record."""
    return _dnsmasq_conf(records, port, host, log_file).replace(
        "local-ttl=0\n", "local-ttl=3600\n")


_dnsmasq_conf = dnsserver.dnsmasq_conf
dnsserver.dnsmasq_conf = _dnsmasq_conf_with_ttl


def sg_bench(inst, n, source):
    r = sgtest.api(inst, "GET", "/api/v1/mta-sts/policies/%s?bench=%d&mx=%s%s"
                   % (DOMAIN, n, MX, "&from=redis" if source == "redis"
                      else ""), timeout=600)
    r.raise_for_status()
    body = r.json()
    # every lookup was the kind of hit measured, and matched the MX
    if body["sources"][source] != n or body["mx_matched"] != n:
        raise RuntimeError("sg bench: not all %s hits: %r" % (source, body))
    return body["ns_per_lookup"]


def socketmap_bench(client, port, n):
    out = subprocess.run([client, "127.0.0.1", str(port), DOMAIN, str(n)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError("socketmap client: %s" % out.stderr)
    ns, ok, answer = out.stdout.split(" ", 2)
    if int(ok) != n:
        raise RuntimeError("socketmap: not every answer was a policy: %s"
                           % answer)
    return float(ns)


def fmt(values):
    med = statistics.median(values)
    if med >= 10000:
        unit, div = "µs", 1000.0
    else:
        unit, div = "ns", 1.0
    return "%.1f %s (%.1f–%.1f)" % (med / div, unit, min(values) / div,
                                    max(values) / div)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the Markdown section here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("sts_bench: needs root (dnsmasq on port 53, unshare -m)")
    if not os.path.exists(MTA_STS_DAEMON):
        sys.exit("sts_bench: postfix-mta-sts-resolver is missing:"
                 " tools/deps.sh installs it")

    tmp = sgtest.make_tmp("sgstsbench-")
    started = []
    try:
        cc = shutil.which("cc") or shutil.which("gcc")
        client = os.path.join(tmp, "socketmap-client")
        with open(client + ".c", "w") as f:
            f.write(CLIENT_C)
        subprocess.run([cc, "-O2", "-o", client, client + ".c"], check=True)

        pg = sgtest.start_postgres(tmp)
        started.append(pg.stop)
        redis = sgtest.start_redis(tmp)
        started.append(redis.stop)
        ca = TestCA(os.path.join(tmp, "ca"))
        hosts = PolicyHosts(ca)
        hosts.add(DOMAIN, policy(mx=(MX, "*.mx.bench.sts.test"),
                                 max_age=604800))
        hosts.start()
        started.append(hosts.cleanup)
        records = {"txt": [("_mta-sts." + DOMAIN, "v=STSv1; id=bench1")],
                   "hosts": {"mta-sts." + DOMAIN: [hosts.ip]},
                   "cname": [], "rr": [], "zones": ["test"]}
        dns = DnsServer()
        dns.start(records)
        started.append(dns.stop)
        dns53 = DnsServer(host=loopback_host(53), port=53)
        dns53.start(records)
        started.append(dns53.stop)

        inst = sgtest.start_sg(pg, redis, resolver=dns.address,
                               ca_file=ca.cert_file, error_log_level="warn")
        started.append(inst.stop)
        first = sgtest.api(inst, "GET", "/api/v1/mta-sts/policies/%s"
                           "?lookup=1" % DOMAIN).json()
        if first["mode"] != "enforce":
            raise RuntimeError("sg: no policy: %r" % first)

        daemons = {}
        notes = []
        for cache in ("internal", "sqlite", "redis"):
            try:
                d = Daemon(tmp, dns53.host, ca.cert_file, cache,
                           "unix://%s?db=1" % redis.socket)
            except RuntimeError as e:
                notes.append("resolver cache `%s`: not usable here (%s)"
                             % (cache, str(e).strip().splitlines()[-1]))
                continue
            started.append(d.stop)
            # the first request fetches; then the cache answers
            try:
                socketmap_bench(client, d.port, 1)
            except RuntimeError as e:
                notes.append("resolver cache `%s`: no answer (%s)"
                             % (cache, e))
                continue
            daemons[cache] = d

        results = {"sg, in-worker hit": [], "sg, Redis hit": []}
        for cache in daemons:
            results["resolver socketmap, %s cache" % cache] = []
        for _ in range(ROUNDS):
            # keep the TXT id confirmed (sg_mta_sts_txt_recheck, 60 s)
            sgtest.api(inst, "GET", "/api/v1/mta-sts/policies/%s?lookup=1"
                       % DOMAIN)
            results["sg, in-worker hit"].append(
                sg_bench(inst, N_MEMORY, "memory"))
            results["sg, Redis hit"].append(sg_bench(inst, N_REDIS, "redis"))
            for cache, d in daemons.items():
                results["resolver socketmap, %s cache" % cache].append(
                    socketmap_bench(client, d.port, N_SOCKETMAP))

        notes.append("TXT queries for _mta-sts.%s that reached sg's DNS"
                     " server during the run: %d (for %d Redis hits)" % (
                         DOMAIN, dns.queries().count(
                             ("TXT", "_mta-sts." + DOMAIN)),
                         ROUNDS * N_REDIS))
        n_of = {"sg, in-worker hit": N_MEMORY, "sg, Redis hit": N_REDIS}
        lines = [
            "## MTA-STS: a cached policy decision (bench/sts_bench.py)",
            "",
            "%s, %d CPUs, %s; %s. Median of %d rounds (range), per"
            " decision, decisions one after another." % (
                platform.node() or "this machine", os.cpu_count(),
                platform.platform(), time.strftime("%Y-%m-%d"), ROUNDS),
            "",
            "| path | per decision | lookups per round |",
            "|---|---|---|",
        ]
        for name, values in results.items():
            lines.append("| %s | %s | %d |" % (
                name, fmt(values), n_of.get(name, N_SOCKETMAP)))
        lines += [""] + ["* " + n for n in notes] + [
            "* sg's numbers are timed inside the worker around the lookups"
            " (sg_sts_lookup, its posted answer, sg_sts_match_mx,"
            " sg_sts_release); the Redis hit includes the MGET, decoding"
            " and parsing the cached policy, and the TXT id check answered"
            " by libunbound's cache.",
            "* The resolver's numbers are socketmap round trips over"
            " loopback TCP from a C client, each a hit in its cache (no"
            " DNS within cache_grace): what Postfix's smtp(8) pays per"
            " lookup.", ""]
        text = "\n".join(lines)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    finally:
        for stop in reversed(started):
            try:
                stop()
            except Exception as e:  # keep stopping the others
                print("sts_bench: stopping: %s" % e, file=sys.stderr)
        sgtest.remove_tmp(tmp)


if __name__ == "__main__":
    main()
