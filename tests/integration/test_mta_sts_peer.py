"""MTA-STS (RFC 8461) compared with a peer: Debian's postfix-mta-sts-resolver.

The same fixtures (the TXT records and policy hosts of test_mta_sts.py,
and every policy file of the shared corpus) go through sg
(?refresh=1, the fetch) and through the resolver:

* mta-sts-query (one fetch, printed as STSFetchResult.VALID / NONE /
  FETCH_ERROR): the verdict "valid:<mode>", "none" or "error";
* mta-sts-daemon (the socketmap Postfix asks, with its cache): the answer
  Postfix gets, "OK secure match=<mx>" or "NOTFOUND", compared with what
  sg's lookup means for delivery (enforce: those mx; anything else: no
  constraint).

The resolver only uses the system's resolver (aiodns reads
/etc/resolv.conf), so each run is in a private mount namespace
(`unshare -m`) whose bind-mounted /etc/resolv.conf names a dnsmasq on
port 53 of a loopback address (resolv.conf has no port), serving the same
records as sg's; SSL_CERT_FILE names the test CA.  Nothing leaves
loopback.

Same verdicts, or a reason listed in KNOWN_DIFFERENCES /
CORPUS_DIFFERENCES (and docs/mta-sts.md): the test fails on a difference
that is not listed, and on a listed one that has gone.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

import sgtest
from dnsserver import DnsServer
from peers import peer_ca, wait_for, loopback_host  # noqa: F401 (fixture)
from sts_servers import policy
from test_mta_sts import env_up

MTA_STS_QUERY = "/usr/bin/mta-sts-query"
MTA_STS_DAEMON = "/usr/bin/mta-sts-daemon"
CORPUS = os.environ.get("SG_CORPUS") or next(
    (d for d in (os.path.join(sgtest.PROJECT, "..", "shared", "corpus"),
                 "/work/shared/corpus") if os.path.isdir(d)), None)

# tools/deps.sh installs the peer: in CI (CI=true) its absence fails every
# test here; elsewhere the module is skipped
PEER_MISSING = [name for name, there in (
    (MTA_STS_QUERY, os.path.exists(MTA_STS_QUERY)),
    (MTA_STS_DAEMON, os.path.exists(MTA_STS_DAEMON)),
    ("unshare", shutil.which("unshare") is not None)) if not there]
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="module", autouse=True)
def peer_installed():
    """postfix-mta-sts-resolver (and unshare) are there: missing, the
    module is skipped outside CI and fails in CI."""
    if PEER_MISSING:
        why = ("%s missing: postfix-mta-sts-resolver is not installed"
               " (tools/deps.sh)" % ", ".join(PEER_MISSING))
        if IN_CI:
            pytest.fail(why + "; CI must run the peer comparison",
                        pytrace=False)
        pytest.skip(why)

MX = ("mx1.peer.test", "*.mx.peer.test")

# (domain label, how it is published, what RFC 8461 says)
PEER_FIXTURES = [
    ("enforce", dict(body=policy(mx=MX)), "3.2"),
    ("testing", dict(body=policy(mode="testing", mx=MX)), "3.2"),
    ("modenone", dict(body=policy(mode="none", mx=())), "3.2"),
    ("notxt", dict(txt=[]), "3.1"),
    ("twotxt", dict(txt=["v=STSv1; id=a1", "v=STSv1; id=a2"]), "3.1"),
    ("othertxt", dict(txt=["v=spf1 -all", "v=STSv1; id=o1"]), "3.1"),
    ("stsv1case", dict(txt=["V=STSv1; id=c1"]), "3.1"),
    ("semicolons", dict(txt=["v=STSv1; id=s1;;"]), "3.1 (decision)"),
    ("hyphenid", dict(txt=["v=STSv1; id=a-1"]), "3.1"),
    ("expired", dict(cert="expired"), "3.3"),
    ("untrusted", dict(cert="untrusted"), "3.3"),
    ("wrongname", dict(cert="wrong-name"), "3.3"),
    ("status404", dict(status=404), "3.3"),
    ("status500", dict(status=500), "3.3"),
    ("redirect", dict(redirect="https://mta-sts.peer-enforce.sts.test"
                                "/.well-known/mta-sts.txt"), "3.3"),
    ("html", dict(content_type="text/html"), "3.2"),
    ("charset", dict(charset="utf-8"), "3.2"),
    ("crlf", dict(body=policy(mx=MX, crlf=True)), "3.2"),
    ("big", dict(body=policy() + "# " + "x" * 70000 + "\n"), "3.3"),
    ("nomx", dict(body="version: STSv1\nmode: enforce\nmax_age: 60\n"),
     "3.2"),
    ("clamp", dict(body=policy(max_age=31557601)), "3.2 (decision)"),
]

# sg's verdict differs from the resolver's here, for the reason given
# (docs/mta-sts.md, "Compared with postfix-mta-sts-resolver")
KNOWN_DIFFERENCES = {
    "peer-hyphenid.sts.test":
        "RFC 8461, 3.1: an id is 1*32(ALPHA / DIGIT); the resolver does not"
        " check it",
    "peer-clamp.sts.test":
        "RFC-NOTES decision: sg clamps max_age above 31557600, the resolver"
        " refuses the policy",
}

# corpus files on which sg and the resolver (a lenient parser) differ
CORPUS_DIFFERENCES = {
    "snawoot-bad-policy6-max-age-over-31557600.txt":
        "RFC-NOTES decision: sg clamps max_age, the resolver refuses",
    "mox-bad-mx-empty-value.txt":
        "RFC 8461, 3.2: mx is a host name; the resolver keeps \"\"",
    "mox-bad-mx-double-wildcard-labels.txt":
        "RFC 8461, 3.2: only one leading \"*.\"; the resolver does not"
        " check mx",
    "mox-bad-mx-double-star.txt": "RFC 8461, 3.2: as above",
    "mox-bad-mx-double-star-trailing-hyphen.txt": "RFC 8461, 3.2: as above",
    "mox-bad-mx-trailing-hyphen.txt":
        "RFC 8461, 3.2: LDH labels end with a letter or digit",
    "mox-bad-extension-empty-value.txt":
        "RFC 8461, 3.2: an extension value is 1*(VCHAR); the resolver"
        " ignores unknown keys unchecked",
    "mox-bad-extension-name-33-chars.txt":
        "RFC 8461, 3.2: an extension name is at most 32 characters",
    "mox-bad-extension-name-leading-underscore.txt":
        "RFC 8461, 3.2: an extension name starts with a letter or digit",
}

# the fixtures where RFC 8461 leaves no doubt: they must agree
MUST_AGREE = ("enforce", "testing", "modenone", "notxt", "twotxt",
              "othertxt", "stsv1case", "cname", "cnamehost", "expired",
              "untrusted", "wrongname", "status404", "status500", "redirect",
              "html", "charset", "crlf", "big", "nomx", "semicolons", "slow")


@pytest.fixture(scope="module")
def env(peer_installed, pg, redis_srv, module_so, peer_ca):  # noqa: F811
    with env_up(pg, redis_srv, peer_ca) as e:
        dns53 = None
        try:
            cases, corpus = publish_fixtures(e)
            # the resolver asks a DNS server on port 53: resolv.conf has no
            # port
            dns53 = DnsServer(host=loopback_host(53), port=53)
            dns53.start(e.records)
            e.dns53, e.cases, e.corpus = dns53, cases, corpus
            yield e
        finally:
            if dns53 is not None:
                dns53.stop()


def publish_fixtures(env):
    cases = []
    for label, how, _section in PEER_FIXTURES:
        how = dict(how)
        domain = "peer-%s.sts.test" % label
        env.publish(domain, how.pop("body", None), txt_id="p1",
                    txt=how.pop("txt", None), apply=False, **how)
        cases.append(domain)
    # a host that accepts and never answers (the resolver gives up after
    # its 4 s, sg after sg_mta_sts_fetch_timeout)
    env.publish("peer-slow.sts.test", apply=False)
    env.records["hosts"]["mta-sts.peer-slow.sts.test"] = [env.slow.ip]
    cases.append("peer-slow.sts.test")
    # RFC 8461, 3.1: the TXT record through a CNAME
    env.publish("peer-cname.sts.test", policy(mx=MX), txt=[], apply=False)
    env.records["txt"].append(("_mta-sts.peer-target.sts.test",
                               "v=STSv1; id=c1"))
    env.records["cname"].append(("_mta-sts.peer-cname.sts.test",
                                 "_mta-sts.peer-target.sts.test"))
    cases.append("peer-cname.sts.test")
    # RFC 8461, 3.3: mta-sts.<domain> a CNAME to the web server; the
    # certificate is for mta-sts.<domain>
    env.publish("peer-cnamehost.sts.test", policy(mx=MX), txt_id="h1",
                apply=False)
    del env.records["hosts"]["mta-sts.peer-cnamehost.sts.test"]
    env.records["hosts"]["web.peer-hosting.sts.test"] = [env.hosts.ip]
    env.records["cname"].append(("mta-sts.peer-cnamehost.sts.test",
                                 "web.peer-hosting.sts.test"))
    cases.append("peer-cnamehost.sts.test")
    corpus = {}
    for i, (name, _expected) in enumerate(corpus_policies()):
        domain = "corpus%d.sts.test" % i
        with open(os.path.join(CORPUS, "mta-sts", name), "rb") as f:
            env.publish(domain, f.read(), txt_id="k%d" % i, apply=False)
        corpus[domain] = name
        cases.append(domain)
    env.apply()
    return cases, corpus


def corpus_policies():
    if CORPUS is None:
        return []
    out = []
    with open(os.path.join(CORPUS, "mta-sts", "index.tsv")) as f:
        for line in f.read().splitlines()[1:]:
            cols = line.split("\t")
            if len(cols) > 2 and cols[1] == "policy":
                out.append((cols[0], cols[2]))
    return out


def in_namespace(dns_ip, ca_file, argv, workdir):
    """argv as a command line run in a mount namespace whose
    /etc/resolv.conf names dns_ip, trusting ca_file: (argv for Popen)."""
    conf = os.path.join(workdir, "resolv.conf")
    with open(conf, "w") as f:
        f.write("nameserver %s\noptions timeout:5 attempts:2\n" % dns_ip)
    script = ('mount --bind "$1" /etc/resolv.conf && '
              'SSL_CERT_FILE="$2" && export SSL_CERT_FILE && shift 2 && '
              'exec "$@"')
    return ["unshare", "-m", "sh", "-c", script, "sh", conf, ca_file] + argv


def resolver_verdict(env, domain):
    """mta-sts-query on domain: ("valid:<mode>"|"none"|"error", output)."""
    d = sgtest.make_tmp("sgresolv-")
    try:
        argv = in_namespace(env.dns53.host, env.ca.cert_file,
                            [MTA_STS_QUERY, "-v", "error", domain], d)
        out = subprocess.run(argv, capture_output=True, text=True,
                             timeout=60)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    text = out.stdout.strip()
    if "STSFetchResult.VALID" in text:
        mode = text.split("'mode': '")[1].split("'")[0]
        return "valid:" + mode, text
    if "STSFetchResult.NONE" in text:
        return "none", text
    if "STSFetchResult.FETCH_ERROR" in text:
        return "error", text
    return "unknown", text + out.stderr


def sg_verdict(body):
    if body["result_type"]:
        return "error"
    if body["policy"] is None:
        return "none"
    return "valid:" + body["policy"]["mode"]


def test_query_same_verdicts(env):
    """RFC 8461, 3.1 to 3.3: every fixture (TXT records, policy hosts,
    certificates, and every policy file of the shared corpus) through sg's
    fetch and through mta-sts-query: the same verdict (valid with its mode
    / no policy / error), or a reason listed in KNOWN_DIFFERENCES,
    CORPUS_DIFFERENCES and docs/mta-sts.md."""
    results, differences = {}, {}
    for domain in env.cases:
        mine = sg_verdict(env.refresh(domain))
        theirs, raw = resolver_verdict(env, domain)
        assert theirs != "unknown", (domain, raw)
        results[domain] = (mine, theirs)
        if mine != theirs:
            differences[domain] = (mine, theirs, raw[:200])

    report = "\n".join("%-28s sg=%-14s resolver=%-14s %s" % (
        d, m, t, env.corpus.get(d, "")) for d, (m, t) in
        sorted(results.items()))
    print(report)
    unexplained = {d: v for d, v in differences.items()
                   if d not in KNOWN_DIFFERENCES
                   and env.corpus.get(d) not in CORPUS_DIFFERENCES}
    assert not unexplained, "unexplained differences:\n%s\n\n%s" % (
        "\n".join("%s: %r" % kv for kv in unexplained.items()), report)
    # each documented difference is still one
    for d in KNOWN_DIFFERENCES:
        assert d in differences, (d, results[d])
    for d, name in env.corpus.items():
        if name in CORPUS_DIFFERENCES:
            assert d in differences, (name, results[d])
    for label in MUST_AGREE:
        m, t = results["peer-%s.sts.test" % label]
        assert m == t, (label, m, t)
    # the fixtures are what they claim to be
    assert results["peer-enforce.sts.test"][0] == "valid:enforce"
    assert results["peer-cname.sts.test"][0] == "valid:enforce"
    assert results["peer-cnamehost.sts.test"][0] == "valid:enforce"
    assert results["peer-notxt.sts.test"][0] == "none"
    assert results["peer-expired.sts.test"][0] == "error"


# ------------------------------------------------- the daemon's socketmap


def netstring(data):
    return b"%d:%s," % (len(data), data)


def socketmap_get(sock, domain):
    """One socketmap request ("sts <domain>"), its answer (bytes)."""
    sock.sendall(netstring(b"sts " + domain.encode()))
    buf = b""
    while b":" not in buf:
        chunk = sock.recv(4096)
        assert chunk, "the daemon closed the connection"
        buf += chunk
    n, rest = buf.split(b":", 1)
    while len(rest) < int(n) + 1:
        chunk = sock.recv(4096)
        assert chunk, "the daemon closed the connection"
        rest += chunk
    assert rest[int(n):int(n) + 1] == b","
    return rest[:int(n)]


class Daemon:
    """mta-sts-daemon (internal cache) on 127.0.0.1:port, in a namespace
    whose resolver is the test DNS."""

    def __init__(self, env, cache="internal"):
        self.dir = sgtest.make_tmp("sgstsd-")
        self.port = sgtest.free_port()
        cfg = os.path.join(self.dir, "mta-sts-daemon.yml")
        with open(cfg, "w") as f:
            f.write("host: 127.0.0.1\nport: %d\n"
                    "cache_grace: 3600\ncache:\n  type: %s\n"
                    "default_zone:\n  strict_testing: false\n"
                    "  timeout: 4\n" % (self.port, cache))
        self.log = open(os.path.join(self.dir, "daemon.log"), "w")
        argv = in_namespace(env.dns53.host, env.ca.cert_file,
                            [MTA_STS_DAEMON, "-v", "info", "-c", cfg],
                            self.dir)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        wait_for(self._listening, timeout=20, interval=0.1)

    def _listening(self):
        assert self.proc.poll() is None, self.output()
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.5).close()
            return True
        except OSError:
            return False

    def output(self):
        self.log.flush()
        return open(self.log.name, errors="replace").read()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(25)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def postfix_view_of_sg(body):
    """What sg's lookup means for a delivery, in socketmap words: enforce
    constrains the MX hosts (RFC 8461, 4.1), anything else does not."""
    p = body["policy"]
    if body["result_type"] or p is None or body["mode"] != "enforce":
        return "NOTFOUND"
    return "secure match=" + ":".join(sorted(m[1:] if m.startswith("*.")
                                             else m for m in p["mx"]))


def postfix_view_of_daemon(answer):
    if answer.startswith(b"NOTFOUND"):
        return "NOTFOUND"
    assert answer.startswith(b"OK secure match="), answer
    words = answer.decode().split()
    mx = words[2][len("match="):].split(":")
    return "secure match=" + ":".join(sorted(mx))


def test_daemon_socketmap_same_answers(env):
    """RFC 8461, 4.1 and 5: what a delivery is told about every hand-made
    fixture — sg's lookup (?lookup=1) against the socketmap answer Postfix
    gets from mta-sts-daemon ("OK secure match=..." for enforce, NOTFOUND
    otherwise: testing is not enforced, strict_testing off), asked twice
    (the second time from the daemon's cache)."""
    daemon = Daemon(env)
    results, differences = {}, {}
    try:
        hand_made = [d for d in env.cases if d.startswith("peer-")]
        with socket.create_connection(("127.0.0.1", daemon.port), 30) as s:
            s.settimeout(30)
            for domain in hand_made:
                mine = postfix_view_of_sg(env.lookup(domain))
                first = socketmap_get(s, domain)
                second = socketmap_get(s, domain)      # from its cache
                theirs = postfix_view_of_daemon(first)
                assert postfix_view_of_daemon(second) == theirs, (
                    domain, first, second)
                results[domain] = (mine, theirs)
                if mine != theirs:
                    differences[domain] = (mine, theirs)
    finally:
        out = daemon.output()
        daemon.stop()
    report = "\n".join("%-28s sg=%-40s daemon=%s" % (d, m, t)
                       for d, (m, t) in sorted(results.items()))
    print(report)
    assert set(differences) == set(KNOWN_DIFFERENCES), (
        differences, report, out)
    mx = "secure match=" + ":".join(sorted(("mx1.peer.test",
                                            ".mx.peer.test")))
    for label in ("enforce", "cname", "cnamehost", "crlf"):
        assert results["peer-%s.sts.test" % label] == (mx, mx), label
    for label in ("testing", "modenone", "notxt", "expired", "status404"):
        assert results["peer-%s.sts.test" % label] == ("NOTFOUND",
                                                       "NOTFOUND"), label
