"""MTA-STS (RFC 8461): discovery, HTTPS fetch, cache and API, end to end.

Real servers on loopback: dnsmasq for _mta-sts TXT and mta-sts.<domain>
addresses, Debian's nginx as the policy hosts (certificates from the test
CA: good, expired, for another name, from an untrusted CA), a server that
never answers, PostgreSQL and Redis.  sg is asked through the admin API:

    GET /api/v1/mta-sts/policies/{d}?refresh=1   fetch now, every step
    GET /api/v1/mta-sts/policies/{d}?lookup=1    the lookup delivery makes
    GET /api/v1/mta-sts/policies/{d}             the cache (Redis)
    GET /api/v1/mta-sts/policies                 the list
    DELETE /api/v1/mta-sts/policies/{d}          evict everywhere

Each test names the section of RFC 8461 (or the decision of RFC-NOTES) it
covers.  The comparison with postfix-mta-sts-resolver is in
test_mta_sts_peer.py.
"""

import contextlib
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

import sginstance
import sgtest
from dnsserver import DnsServer
from peers import (TestCA, peer_ca, wait_for,  # noqa: F401 (fixture)
                   loopback_host)
from sts_servers import WELL_KNOWN, PolicyHosts, SlowServer, policy

# every test's domains are its own: no test sees another's cache
# (the fetch timeout: what a host that never answers costs a test, and
# more than a good fetch takes on a loaded machine)
FETCH_TIMEOUT_S = 5
NEGATIVE_TTL_S = 3
BACKOFF_S = 4

EXTRA_MAIN = """
sg_mta_sts_fetch_timeout %ds;
sg_mta_sts_txt_recheck 0;
sg_mta_sts_negative_ttl %ds;
sg_mta_sts_failure_backoff %ds;
sg_mta_sts_refresh_interval 1s;
""" % (FETCH_TIMEOUT_S, NEGATIVE_TTL_S, BACKOFF_S)

POLICY_PATH = "/api/v1/mta-sts/policies/"


class Env:
    def __init__(self, ca, hosts, slow, dns, records):
        self.ca, self.hosts, self.slow, self.dns = ca, hosts, slow, dns
        self.records = records
        self.sg = None

    def publish(self, domain, body=None, txt_id="id1", txt=None, apply=True,
                **site):
        """A policy domain: TXT _mta-sts.<domain> (txt, or
        "v=STSv1; id=<txt_id>"), mta-sts.<domain> at the policy host, and
        the policy served there (site: cert, status, content_type,
        charset, redirect)."""
        self.hosts.add(domain, body if body is not None else policy(),
                       **site)
        if txt is None and txt_id is not None:
            txt = ["v=STSv1; id=%s" % txt_id]
        self.set_txt(domain, txt or [], reload=False)
        self.records["hosts"]["mta-sts." + domain] = [self.hosts.ip]
        if apply:
            self.apply()

    def set_txt(self, domain, texts, reload=True):
        name = "_mta-sts." + domain
        self.records["txt"] = [t for t in self.records["txt"]
                               if t[0] != name]
        self.records["txt"] += [(name, t) for t in texts]
        if reload:
            self.dns.reload(self.records)

    def apply(self):
        self.hosts.apply()
        self.dns.reload(self.records)

    # the API

    def get(self, domain, query="", status=200, timeout=30):
        r = sgtest.api(self.sg, "GET", POLICY_PATH + domain + query,
                       timeout=timeout)
        assert r.status_code == status, (r.status_code, r.text)
        return r.json()

    def refresh(self, domain, **kw):
        return self.get(domain, "?refresh=1", **kw)

    def lookup(self, domain, **kw):
        return self.get(domain, "?lookup=1", **kw)


def steps(body):
    return {s["step"]: s for s in body["steps"]}


def served(env, domain, n, timeout=10):
    """The policy host has answered exactly n GETs of domain's policy.
    It logs a request just after answering it, so sg (and the API) can
    answer before the line is written: wait for n lines, then let the
    host log whatever it answered before (hosts.sync()) and check that
    there are no more."""
    wait_for(lambda: env.hosts.requests(domain) >= n, timeout=timeout,
             message=lambda: "%d GETs of %s" % (env.hosts.requests(domain),
                                                 domain))
    env.hosts.sync()
    got = env.hosts.requests(domain)
    assert got == n, "%d GETs of %s's policy, not %d" % (got, domain, n)


@contextlib.contextmanager
def env_up(pg, redis_srv, ca, **sg_kw):
    """An Env up for the duration: the policy hosts, a server that never
    answers, the test zones' DNS and an sg with EXTRA_MAIN (and sg_kw)
    using them; Redis is running again when it ends."""
    hosts = PolicyHosts(ca)
    slow = SlowServer().start()
    dns = DnsServer()
    records = {"txt": [], "hosts": {}, "cname": [], "rr": [],
               "zones": ["test"]}
    e = Env(ca, hosts, slow, dns, records)
    inst = None
    try:
        hosts.start()
        dns.start(records)
        if not redis_srv.is_running():
            redis_srv.start()
        inst = sgtest.start_sg(pg, redis_srv, resolver=dns.address,
                               ca_file=ca.cert_file, extra_main=EXTRA_MAIN,
                               **sg_kw)
        e.sg = inst
        yield e
    finally:
        if not redis_srv.is_running():
            redis_srv.start()
        if inst is not None:
            sgtest.finish_sg(inst)
        dns.stop()
        slow.stop()
        hosts.cleanup()


@pytest.fixture(scope="module")
def env(pg, redis_srv, module_so, peer_ca):  # noqa: F811
    with env_up(pg, redis_srv, peer_ca, error_log_level="debug") as e:
        yield e


def redis_keys(redis_srv, pattern):
    return sorted(k.decode() if isinstance(k, bytes) else k
                  for k in redis_srv.client().keys(pattern))


# ------------------------------------------------------------ the happy path


def test_refresh_explains_every_step(env):
    """RFC 8461, 3.1 (TXT, id), 3.3 (HTTPS with SNI and a WebPKI-valid
    certificate, HTTP 200, text/plain), 3.2 (the policy): ?refresh=1
    fetches now and reports each step; the policy is cached in Redis."""
    env.publish("good.sts.test", policy(mx=("mx1.good.sts.test",
                                            "*.mx.good.sts.test")),
                txt_id="20240501T000000")
    body = env.refresh("good.sts.test")
    s = steps(body)
    assert s["txt"]["ok"] and s["txt"]["id"] == "20240501T000000"
    assert s["txt"]["records"] == ["v=STSv1; id=20240501T000000"]
    assert s["dns"]["ok"] and s["dns"]["addresses"] == [env.hosts.ip]
    h = s["https"]
    assert h["ok"] and h["status"] == 200
    assert h["content_type"].startswith("text/plain")
    assert h["address"] == env.hosts.ip
    assert h["url"] == ("https://mta-sts.good.sts.test"
                        "/.well-known/mta-sts.txt")
    assert h["certificate"]["verified"] is True
    assert "mta-sts.good.sts.test" in h["certificate"]["subject"]
    assert h["certificate"]["dns_names"] == "mta-sts.good.sts.test"
    assert s["parse"]["ok"]
    assert s["parse"]["policy"]["mx"] == ["mx1.good.sts.test",
                                          "*.mx.good.sts.test"]
    assert body["result_type"] is None
    p = body["policy"]
    assert p["mode"] == "enforce" and p["policy_id"] == "20240501T000000"
    assert p["max_age"] == 86400 and p["source"] == "fetched"

    cached = env.get("good.sts.test")
    assert cached["policy_id"] == "20240501T000000"
    assert cached["source"] == "redis"
    assert cached["text"] == policy(mx=("mx1.good.sts.test",
                                        "*.mx.good.sts.test"))
    assert cached["last_failure"] is None

    # RFC 8461, 3.3: the cache lives max_age from the fetch
    ttl = env.sg.redis.client().ttl("sg:mta-sts:good.sts.test")
    assert 86000 < ttl <= 86400

    listed = sgtest.api(env.sg, "GET", "/api/v1/mta-sts/policies").json()
    assert listed["next_cursor"] is None
    item = [i for i in listed["items"] if i["id"] == "good.sts.test"][0]
    assert item == {"id": "good.sts.test", "domain": "good.sts.test",
                    "policy_id": "20240501T000000", "mode": "enforce",
                    "mx": ["mx1.good.sts.test", "*.mx.good.sts.test"],
                    "max_age": 86400, "fetched_at": item["fetched_at"],
                    "expires_at": item["expires_at"]}


def test_lookup_fetches_once_then_uses_the_cache(env):
    """RFC 8461, 3.1 and 5.1: a lookup fetches when nothing is cached; the
    next one finds the TXT id unchanged and uses the cached policy without
    another HTTPS request."""
    env.publish("once.sts.test", policy(mode="testing"), txt_id="a1")
    first = env.lookup("once.sts.test")
    assert first["mode"] == "testing" and first["source"] == "fetched"
    assert first["result_type"] is None
    assert first["policy"]["policy_id"] == "a1"
    second = env.lookup("once.sts.test")
    assert second["mode"] == "testing" and second["source"] == "memory"
    assert "id of the TXT record" in second["reason"]
    served(env, "once.sts.test", 1)


def test_plain_get_is_the_cache_only(env):
    """The plain GET reads the cache and never fetches: 404 before a
    lookup, the policy after it."""
    env.publish("plain.sts.test", txt_id="p1")
    r = sgtest.api(env.sg, "GET", POLICY_PATH + "plain.sts.test")
    assert r.status_code == 404
    assert r.headers["Content-Type"] == "application/problem+json"
    served(env, "plain.sts.test", 0)
    env.lookup("plain.sts.test")
    assert env.get("plain.sts.test")["policy_id"] == "p1"


def test_id_change_refetches(env):
    """RFC 8461, 3.1: the policy is fetched again when the TXT id differs
    from the cached policy's; a changed policy under the same id is not
    seen before that."""
    env.publish("idchange.sts.test", policy(mode="testing"), txt_id="v1")
    assert env.lookup("idchange.sts.test")["mode"] == "testing"
    env.hosts.set_body("idchange.sts.test", policy(mode="enforce"))
    same = env.lookup("idchange.sts.test")
    assert same["mode"] == "testing" and same["source"] == "memory"
    served(env, "idchange.sts.test", 1)
    env.set_txt("idchange.sts.test", ["v=STSv1; id=v2"])
    new = env.lookup("idchange.sts.test")
    assert new["mode"] == "enforce" and new["source"] == "fetched"
    assert new["policy"]["policy_id"] == "v2"
    served(env, "idchange.sts.test", 2)
    assert env.get("idchange.sts.test")["policy_id"] == "v2"


def test_change_to_mode_none(env):
    """RFC 8461, 3.2 and 5: a policy in mode "none" (the way to withdraw
    MTA-STS) replaces the cached enforce policy when its id is published;
    it is a cached "no policy": mode none, with its id."""
    env.publish("tonone.sts.test", policy(mode="enforce"), txt_id="e1")
    assert env.lookup("tonone.sts.test")["mode"] == "enforce"
    env.hosts.set_body("tonone.sts.test", policy(mode="none", mx=()))
    env.set_txt("tonone.sts.test", ["v=STSv1; id=n1"])
    body = env.lookup("tonone.sts.test")
    assert body["mode"] == "none" and body["result_type"] is None
    assert body["policy"]["policy_id"] == "n1"
    assert body["policy"]["mx"] == []
    again = env.lookup("tonone.sts.test")
    assert again["mode"] == "none" and again["source"] == "memory"
    assert env.get("tonone.sts.test")["mode"] == "none"


def test_no_txt_record_is_no_policy_and_cached_briefly(env):
    """RFC 8461, 3.1: no _mta-sts TXT record, no policy; sg caches that
    "no policy" for sg_mta_sts_negative_ttl (sg:mta-sts-none:<domain>),
    then asks DNS again."""
    # the policy host is ready, only the TXT record is missing (so that
    # publishing it below is quick: within the negative TTL)
    env.publish("nothing.sts.test", txt=[])
    body = env.lookup("nothing.sts.test")
    assert body["mode"] == "none" and body["policy"] is None
    assert body["result_type"] is None
    assert "no \"v=STSv1\" TXT record" in body["reason"]
    ttl = env.sg.redis.client().ttl("sg:mta-sts-none:nothing.sts.test")
    assert 0 < ttl <= NEGATIVE_TTL_S
    # published now: seen once the negative entry has expired
    env.set_txt("nothing.sts.test", ["v=STSv1; id=late1"])
    cached = env.lookup("nothing.sts.test")
    assert cached["mode"] == "none" and cached["source"] == "none"
    # (libunbound may keep the NXDOMAIN a few seconds more)
    time.sleep(NEGATIVE_TTL_S)
    wait_for(lambda: env.lookup("nothing.sts.test")["mode"] == "enforce",
             timeout=15, interval=0.5)


def test_dns_failure_is_not_cached_as_no_policy(env):
    """RFC 8461, 5.1 and redis/README.md: a TXT lookup that fails
    (SERVFAIL) is not "no record": without a cached policy the answer is
    no policy but nothing is cached (the next lookup asks DNS again); with
    a cached policy, that policy applies."""
    # names under "sfail." are REFUSED by the test DNS (no zone): SERVFAIL
    body = env.lookup("down.sfail")
    assert body["mode"] == "none" and body["policy"] is None
    assert "the TXT lookup failed" in body["reason"], body
    assert not env.sg.redis.client().exists("sg:mta-sts-none:down.sfail")
    assert ("TXT", "_mta-sts.down.sfail") in env.dns.queries()
    # not answered from a cached "no policy": DNS is asked (libunbound
    # may repeat its SERVFAIL from its own cache for a while)
    again = env.lookup("down.sfail")
    assert "the TXT lookup failed" in again["reason"], again
    assert not env.sg.redis.client().exists("sg:mta-sts-none:down.sfail")

    env.records["zones"].append("sfail")
    env.publish("up.sfail", txt_id="sf1")
    assert env.lookup("up.sfail")["mode"] == "enforce"
    # no zone and no record: REFUSED, SERVFAIL to sg
    env.records["zones"].remove("sfail")
    env.set_txt("up.sfail", [])

    def cached_policy_applies():
        # (until libunbound's cached answer expires, the id is confirmed)
        body = env.lookup("up.sfail")
        assert body["mode"] == "enforce" and body["source"] == "memory"
        return "the TXT lookup failed" in body["reason"]
    wait_for(cached_policy_applies, timeout=30, interval=0.5)


def test_txt_removed_cached_policy_still_applies(env):
    """RFC 8461, 3.1 and 5.1: without a usable TXT record a cached,
    unexpired policy still applies (an attacker who suppresses the record
    does not downgrade delivery)."""
    env.publish("gone.sts.test", txt_id="g1")
    assert env.lookup("gone.sts.test")["mode"] == "enforce"
    env.set_txt("gone.sts.test", [])
    body = env.lookup("gone.sts.test")
    assert body["mode"] == "enforce" and body["source"] == "memory"
    assert "cached policy has not expired" in body["reason"]


def test_several_txt_records(env):
    """RFC 8461, 3.1: records not starting "v=STSv1" are ignored; two
    "v=STSv1" records mean no policy (unless one is cached)."""
    env.publish("two.sts.test", txt=["v=STSv1; id=t1", "v=STSv1; id=t2"])
    body = env.refresh("two.sts.test")
    s = steps(body)
    assert not s["txt"]["ok"]
    assert sorted(s["txt"]["records"]) == ["v=STSv1; id=t1",
                                           "v=STSv1; id=t2"]
    assert "more than one" in s["txt"]["detail"]
    assert body["policy"] is None
    assert env.lookup("two.sts.test")["mode"] == "none"

    env.publish("mixed.sts.test", txt=["v=spf1 -all", "v=STSv1; id=m1",
                                       "something else"])
    body = env.lookup("mixed.sts.test")
    assert body["mode"] == "enforce"
    assert body["policy"]["policy_id"] == "m1"


def test_txt_record_of_several_strings(env):
    """RFC 8461, 3.1: the character-strings of one TXT record are joined
    without spaces before parsing."""
    strings = [b"v=STSv1; i", b"d=split", b"42"]
    rdata = b"".join(bytes([len(s)]) + s for s in strings).hex()
    env.publish("split.sts.test", txt=[], apply=False)
    env.records["rr"].append(("_mta-sts.split.sts.test", 16, rdata))
    env.apply()
    body = env.refresh("split.sts.test")
    assert steps(body)["txt"]["records"] == ["v=STSv1; id=split42"]
    assert body["policy"]["policy_id"] == "split42"


def test_txt_through_cname(env):
    """RFC 8461, 3.1: _mta-sts may be a CNAME; it is followed."""
    env.publish("alias.sts.test", txt=[], apply=False)
    env.records["txt"].append(("_mta-sts.target.sts.test",
                               "v=STSv1; id=cn1"))
    env.records["cname"].append(("_mta-sts.alias.sts.test",
                                 "_mta-sts.target.sts.test"))
    env.apply()
    body = env.refresh("alias.sts.test")
    s = steps(body)
    assert s["txt"]["ok"] and s["txt"]["id"] == "cn1"
    assert s["txt"]["name"] == "_mta-sts.target.sts.test"
    assert body["policy"]["policy_id"] == "cn1"

    # a chain of two CNAMEs
    env.publish("alias2.sts.test", txt=[], apply=False)
    env.records["cname"].append(("_mta-sts.alias2.sts.test",
                                 "_mta-sts.alias.sts.test"))
    env.apply()
    body = env.refresh("alias2.sts.test")
    s = steps(body)
    assert s["txt"]["ok"] and s["txt"]["id"] == "cn1"
    assert s["txt"]["name"] == "_mta-sts.target.sts.test"


def test_policy_host_through_cname(env):
    """RFC 8461, 3.3: mta-sts.<domain> may be a CNAME to a web server;
    SNI and the certificate are still for mta-sts.<domain>: a certificate
    valid only for the CNAME's target is not enough."""
    env.publish("cnhost.sts.test", txt_id="ch1", apply=False)
    del env.records["hosts"]["mta-sts.cnhost.sts.test"]
    env.records["hosts"]["web.hosting.sts.test"] = [env.hosts.ip]
    env.records["cname"].append(("mta-sts.cnhost.sts.test",
                                 "web.hosting.sts.test"))
    # the web server's certificate names only the target
    pair = env.ca.issue(["web.hosting.sts.test"])
    env.publish("cnhostbad.sts.test", txt_id="cb1", cert=pair, apply=False)
    del env.records["hosts"]["mta-sts.cnhostbad.sts.test"]
    env.records["cname"].append(("mta-sts.cnhostbad.sts.test",
                                 "web.hosting.sts.test"))
    env.apply()
    body = env.refresh("cnhost.sts.test")
    assert steps(body)["dns"]["addresses"] == [env.hosts.ip]
    assert steps(body)["https"]["certificate"]["verified"] is True
    assert body["policy"]["policy_id"] == "ch1"
    bad = env.refresh("cnhostbad.sts.test")
    assert steps(bad)["https"]["error"] == "tls-verify"
    assert bad["result_type"] == "sts-webpki-invalid"


def test_parent_domain_policy_not_used(env):
    """RFC 8461, 4.1 (RFC-NOTES): a subdomain without its own record has
    no policy, whatever its parent publishes."""
    env.publish("parent.sts.test", txt_id="pa1")
    assert env.lookup("parent.sts.test")["mode"] == "enforce"
    body = env.lookup("child.parent.sts.test")
    assert body["mode"] == "none" and body["policy"] is None
    assert body["result_type"] is None
    served(env, "child.parent.sts.test", 0)


def test_bad_txt_id(env):
    """RFC 8461, 3.1: an id is 1 to 32 letters and digits; a record with
    another id is invalid: no policy."""
    env.publish("badid.sts.test", txt=["v=STSv1; id=not-valid"])
    body = env.refresh("badid.sts.test")
    assert not steps(body)["txt"]["ok"]
    assert "id" in steps(body)["txt"]["detail"]
    assert body["policy"] is None
    assert env.lookup("badid.sts.test")["mode"] == "none"


def test_empty_txt_fields_tolerated(env):
    """RFC 8461, 3.1 (decision, RFC-NOTES): empty fields ("id=a;;",
    a trailing ";") are tolerated."""
    env.publish("semi.sts.test", txt=["v=STSv1; id=semi1;;"])
    assert env.lookup("semi.sts.test")["policy"]["policy_id"] == "semi1"


# ---------------------------------------------------------- WebPKI, 3.3


@pytest.mark.parametrize("cert,words", [
    ("expired", "expired"),
    ("untrusted", "local issuer"),
    ("wrong-name", "mta-sts.webpki-wrong-name.sts.test"),
])
def test_certificate_not_valid(env, cert, words):
    """RFC 8461, 3.3: the policy host's certificate must chain to a
    trusted root, be unexpired and be valid for mta-sts.<domain>;
    otherwise sts-webpki-invalid (RFC 8460, 4.3.2.1) and no policy."""
    domain = "webpki-%s.sts.test" % cert
    env.publish(domain, cert=cert)
    body = env.refresh(domain)
    h = steps(body)["https"]
    assert not h["ok"] and h["error"] == "tls-verify"
    assert h["certificate"]["verified"] is False
    assert words in h["detail"]
    assert "parse" not in steps(body)
    assert body["result_type"] == "sts-webpki-invalid"
    assert body["policy"] is None
    served(env, domain, 0)
    look = env.lookup(domain)
    assert look["mode"] == "none"
    assert look["result_type"] == "sts-webpki-invalid"


# libcurl's default CA bundle (CURLOPT_CAINFO; `curl-config --ca` on
# Debian): "the system store" of sg_http.c; sg_trusted_ca comes on top
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def with_system_bundle(bundle):
    """A wrap for start_sg(): nginx sees the file bundle as SYSTEM_BUNDLE
    (in a private mount namespace: no other process sees it)."""
    return sgtest.with_bind_mounts({SYSTEM_BUNDLE: bundle})


def https_verdicts(inst, domains):
    """{domain: (https ok, error, detail)} of ?refresh=1 through inst."""
    out = {}
    for d in domains:
        r = sgtest.api(inst, "GET", POLICY_PATH + d + "?refresh=1",
                       timeout=30)
        assert r.status_code == 200, (d, r.text)
        h = steps(r.json())["https"]
        out[d] = (h["ok"], h.get("error"), h.get("detail"))
    return out


def test_webpki_system_store_plus_sg_trusted_ca(env, pg, redis_srv):
    """RFC 8461, 3.3 (RFC-NOTES: WebPKI validation, trusted CA file
    configurable): the policy host's certificate is checked against the
    system store *and* sg_trusted_ca, each on its own.  Three policy
    hosts: one from a CA that is only in the system store sg sees (a
    bind-mounted SYSTEM_BUNDLE: the real bundle plus that CA, in sg's own
    mount namespace), one from the CA that is only in sg_trusted_ca, one
    from a CA in neither.  Three sg: the module's (real system store,
    sg_trusted_ca), one with the extended store and sg_trusted_ca, one
    with the extended store and no sg_trusted_ca.  A host verifies exactly
    when its CA is in one of the two sources of that sg."""
    # (in the policy hosts' folder: their nginx.conf keeps naming it)
    sys_ca = TestCA(os.path.join(env.hosts.dir, "sys-ca"),
                    name="sg System Store Only CA")
    tmp = sgtest.make_tmp("sgsysca-")
    others = []
    try:
        with open(SYSTEM_BUNDLE, "rb") as f:
            real = f.read()
        for ca in (sys_ca, env.ca, env.ca.untrusted):
            assert ca.cert_pem not in real
        bundle = os.path.join(tmp, "ca-certificates.crt")
        with open(bundle, "wb") as f:
            f.write(real + b"\n" + sys_ca.cert_pem)
        os.chmod(bundle, 0o644)

        d_sys, d_extra, d_none = ("sysca.webpki.sts.test",
                                  "extraca.webpki.sts.test",
                                  "noca.webpki.sts.test")
        env.publish(d_sys, cert=sys_ca.issue(["mta-sts." + d_sys]),
                    apply=False)
        env.publish(d_extra, cert="good", apply=False)      # env.ca
        env.publish(d_none, cert="untrusted")
        domains = (d_sys, d_extra, d_none)

        def start(ca_file):
            inst = sgtest.start_sg(pg, redis_srv, resolver=env.dns.address,
                                   ca_file=ca_file, extra_main=EXTRA_MAIN,
                                   wrap=with_system_bundle(bundle))
            others.append(inst)
            return inst

        both = https_verdicts(start(env.ca.cert_file), domains)
        system_only = https_verdicts(start(None), domains)
        plain = https_verdicts(env.sg, domains)

        ok = {"both": {d: v[0] for d, v in both.items()},
              "system_only": {d: v[0] for d, v in system_only.items()},
              "plain": {d: v[0] for d, v in plain.items()}}
        # extended system store + sg_trusted_ca: both sources are used
        assert ok["both"] == {d_sys: True, d_extra: True, d_none: False}, (
            both)
        # extended system store alone: the system store is used
        assert ok["system_only"] == {d_sys: True, d_extra: False,
                                     d_none: False}, system_only
        # the real system store + sg_trusted_ca: sg_trusted_ca is used, and
        # the first two sg trusted sys_ca only through the mounted bundle
        assert ok["plain"] == {d_sys: False, d_extra: True,
                               d_none: False}, plain
        for verdicts in (both, system_only, plain):
            for d, (good, error, detail) in verdicts.items():
                if not good:
                    assert error == "tls-verify", (d, verdicts)
                    assert "local issuer" in detail, (d, verdicts)
    finally:
        for inst in others:
            sgtest.finish_sg(inst)
        sgtest.remove_tmp(tmp)


def test_policy_host_with_only_tls_1_1_is_refused(env):
    """RFC 8461, 3.3 (RFC-NOTES: TLS >= 1.2): a policy host that speaks
    only TLS 1.1 gets no policy fetched from it: the handshake fails,
    no request is sent, and the lookup says sts-policy-fetch-error or
    sts-webpki-invalid, never a policy.  (Debian's OpenSSL refuses TLS 1.1
    on its own: test_client_hello_offers_only_tls_1_2_and_up checks sg's
    own minimum.)"""
    domain = "tls11.sts.test"
    cert, key = env.ca.issue(["mta-sts." + domain])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(cert, key)
    seen = {"hello": 0, "request": b""}

    def serve(conn):
        try:
            first = conn.recv(5, socket.MSG_PEEK)
            seen["hello"] += (first[:1] == b"\x16")
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen["request"] += tls.recv(4096)
        except (OSError, ssl.SSLError):
            pass

    srv = Listener443(serve)
    ip = srv.ip
    try:
        env.set_txt(domain, ["v=STSv1; id=t11"], reload=False)
        env.records["hosts"]["mta-sts." + domain] = [ip]
        env.dns.reload(env.records)
        body = env.refresh(domain)
        h = steps(body)["https"]
        assert not h["ok"], h
        assert body["policy"] is None
        assert body["result_type"] in ("sts-policy-fetch-error",
                                       "sts-webpki-invalid")
        assert seen["hello"] >= 1          # the client did try TLS
        assert seen["request"] == b""      # and sent no request in it
    finally:
        srv.close()


# an OpenSSL configuration that allows TLS 1.0 and every cipher: with it,
# only sg's own minimum keeps TLS 1.0 and 1.1 out of its ClientHello
# (Debian's /etc/ssl/openssl.cnf has MinProtocol = TLSv1.2 already)
PERMISSIVE_OPENSSL_CNF = """\
openssl_conf = sg_test_conf
[sg_test_conf]
ssl_conf = sg_test_ssl
[sg_test_ssl]
system_default = sg_test_system
[sg_test_system]
MinProtocol = TLSv1
CipherString = DEFAULT:@SECLEVEL=0
"""


def parse_client_hello(data):
    """A TLS record holding a ClientHello (RFC 8446, 4.1.2) as a dict:
    record_version, legacy_version, supported_versions (list of ints, or
    None without the extension), server_name (str or None)."""
    assert data[0] == 0x16, "not a handshake record: %r" % data[:8]
    rec_len = int.from_bytes(data[3:5], "big")
    hs = data[5:5 + rec_len]
    assert hs[0] == 1, "not a ClientHello"
    body = hs[4:4 + int.from_bytes(hs[1:4], "big")]
    out = {"record_version": int.from_bytes(data[1:3], "big"),
           "legacy_version": int.from_bytes(body[0:2], "big"),
           "supported_versions": None, "server_name": None}
    p = 2 + 32                                  # version, random
    p += 1 + body[p]                            # legacy_session_id
    p += 2 + int.from_bytes(body[p:p + 2], "big")   # cipher_suites
    p += 1 + body[p]                            # compression methods
    end = p + 2 + int.from_bytes(body[p:p + 2], "big")
    p += 2
    while p < end:
        etype = int.from_bytes(body[p:p + 2], "big")
        elen = int.from_bytes(body[p + 2:p + 4], "big")
        ext = body[p + 4:p + 4 + elen]
        p += 4 + elen
        if etype == 43:                         # supported_versions
            out["supported_versions"] = [
                int.from_bytes(ext[1 + i:3 + i], "big")
                for i in range(0, ext[0], 2)]
        elif etype == 0:                        # server_name (RFC 6066)
            name_len = int.from_bytes(ext[3:5], "big")
            out["server_name"] = ext[5:5 + name_len].decode()
    return out


class Listener443:
    """A TCP listener on a loopback ip:443 whose thread hands each accepted
    connection (5 s timeout) to handle(conn), then closes it."""

    def __init__(self, handle):
        self.ip = loopback_host(443)
        self._handle = handle
        self._srv = socket.create_server((self.ip, 443))
        self._srv.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                self._handle(conn)

    def close(self):
        self._stop.set()
        self._srv.close()
        self._thread.join(5)


class HelloCatcher(Listener443):
    """Reads one ClientHello per connection and closes it (no TLS is ever
    answered)."""

    def __init__(self):
        self.hellos = []
        super().__init__(self._catch)

    def _catch(self, conn):
        data = b""
        try:
            while len(data) < 5 or len(data) < 5 + int.from_bytes(
                    data[3:5], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        self.hellos.append(data)


def test_client_hello_offers_only_tls_1_2_and_up(env, pg, redis_srv):
    """RFC 8461, 3.3 (RFC-NOTES: TLS >= 1.2): sg's own ClientHello to a
    policy host, read off the wire, offers TLS 1.2 and 1.3 only (the
    supported_versions extension, RFC 8446 4.2.1: nothing below 0x0303),
    and names mta-sts.<domain> in SNI.  sg runs with an OpenSSL
    configuration that would allow TLS 1.0 (PERMISSIVE_OPENSSL_CNF), so
    the minimum seen is sg's (CURLOPT_SSLVERSION), not the system's:
    without it this hello offers 0x0302 and 0x0301."""
    tmp = sgtest.make_tmp("sgossl-")
    cnf = os.path.join(tmp, "openssl.cnf")
    with open(cnf, "w") as f:
        f.write(PERMISSIVE_OPENSSL_CNF)
    os.chmod(cnf, 0o644)
    catcher = HelloCatcher()
    inst = None
    try:
        domain = "hello.sts.test"
        env.set_txt(domain, ["v=STSv1; id=he1"], reload=False)
        env.records["hosts"]["mta-sts." + domain] = [catcher.ip]
        env.dns.reload(env.records)
        inst = sgtest.start_sg(pg, redis_srv, resolver=env.dns.address,
                               ca_file=env.ca.cert_file,
                               extra_main=EXTRA_MAIN,
                               wrap=["env", "OPENSSL_CONF=" + cnf])
        r = sgtest.api(inst, "GET", POLICY_PATH + domain + "?refresh=1",
                       timeout=30)
        assert r.status_code == 200, r.text
        assert not steps(r.json())["https"]["ok"]
        assert catcher.hellos, "sg sent no ClientHello"
        for data in catcher.hellos:
            hello = parse_client_hello(data)
            versions = hello["supported_versions"]
            assert versions is not None, hello
            assert min(versions) >= 0x0303, [hex(v) for v in versions]
            assert versions, hello
            assert hello["legacy_version"] == 0x0303, hello
            assert hello["server_name"] == "mta-sts." + domain, hello
    finally:
        if inst is not None:
            sgtest.finish_sg(inst)
        catcher.close()
        sgtest.remove_tmp(tmp)


# ------------------------------------------------------------ HTTP, 3.3


@pytest.mark.parametrize("status", [404, 500, 203, 204])
def test_http_status_not_200(env, status):
    """RFC 8461, 3.3 ("HTTP 200 only" in RFC-NOTES): only HTTP 200 is a
    policy: sts-policy-fetch-error.  203 comes with a valid text/plain
    policy and 204 without a body: another 2xx is not 200 either."""
    domain = "status%d.sts.test" % status
    env.publish(domain, policy(), status=status)
    body = env.refresh(domain)
    h = steps(body)["https"]
    assert h["status"] == status and h["error"] == "http-status"
    assert not h["ok"] and "parse" not in steps(body)
    assert body["policy"] is None
    assert body["result_type"] == "sts-policy-fetch-error"
    assert env.lookup(domain)["result_type"] == "sts-policy-fetch-error"
    if status == 203:
        assert h["content_type"].startswith("text/plain")
        assert h["size"] == len(policy())


def https_get(env, domain, headers=()):
    """GET the policy of domain from the policy host ourselves (with the
    extra request headers given as (name, value)): (status, response
    headers with lower-case names, body)."""
    ctx = env.ca.client_context()
    host = "mta-sts." + domain
    extra = "".join("%s: %s\r\n" % h for h in headers)
    with socket.create_connection((env.hosts.ip, 443), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\n%s"
                         "Connection: close\r\n\r\n"
                         % (WELL_KNOWN, host, extra)).encode())
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, payload


def test_policy_fetch_uses_no_http_cache(env):
    """RFC 8461, 3.3: "HTTP caching [RFC7234] MUST NOT be used"
    (RFC-NOTES: no HTTP caching).  The policy host sends ETag,
    Last-Modified and Cache-Control: max-age=86400; the TXT id changes
    while the policy text does not (a conditional GET would get 304).
    Every fetch sg makes (the first, the one for the new id, a ?refresh=1)
    is a full GET answered 200 with the whole body: no If-None-Match,
    If-Modified-Since or other conditional header, no Cache-Control or
    Pragma that would accept a stored copy."""
    domain = "nocache.sts.test"
    text = policy(mode="testing")
    env.publish(domain, text, txt_id="nc1", cache_control="max-age=86400")
    status, headers, payload = https_get(env, domain)
    assert status == 200 and payload == text.encode()
    assert headers.get("etag") and headers.get("last-modified"), headers
    assert headers.get("cache-control") == "max-age=86400", headers
    # a conditional GET would be answered 304, and the log shows it
    status, _, payload = https_get(env, domain, [
        ("If-None-Match", headers["etag"]),
        ("If-Modified-Since", headers["last-modified"])])
    assert status == 304 and payload == b""
    served(env, domain, 2)
    ours = env.hosts.log(domain)
    assert len(ours) == 2
    assert ours[1]["if_none_match"] == headers["etag"], ours
    assert ours[1]["status"] == 304, ours

    first = env.lookup(domain)
    assert first["source"] == "fetched" and first["mode"] == "testing"
    env.set_txt(domain, ["v=STSv1; id=nc2"])
    second = env.lookup(domain)
    assert second["source"] == "fetched"
    assert second["policy"]["policy_id"] == "nc2"
    again = env.refresh(domain)
    assert steps(again)["https"]["status"] == 200
    assert steps(again)["https"]["size"] == len(text)

    # (each line is written just after its answer: wait for the three)
    served(env, domain, len(ours) + 3)
    fetches = env.hosts.log(domain)[len(ours):]
    assert len(fetches) == 3, fetches
    for e in fetches:
        assert e["status"] == 200 and e["bytes"] == len(text), e
        for h in ("if_none_match", "if_modified_since", "if_match",
                  "if_unmodified_since", "if_range"):
            assert e[h] == "", (h, e)
        assert e["cache_control"] in ("", "no-cache", "no-store"), e
        assert e["pragma"] in ("", "no-cache"), e


def test_redirect_not_followed(env):
    """RFC 8461, 3.3: "HTTP 3xx redirects MUST NOT be followed"."""
    env.publish("target.redir.sts.test", txt_id="t1")
    env.publish("redir.sts.test", redirect="https://mta-sts.target.redir."
                "sts.test/.well-known/mta-sts.txt")
    body = env.refresh("redir.sts.test")
    h = steps(body)["https"]
    assert h["status"] == 301 and h["error"] == "redirect"
    assert "not followed" in h["detail"]
    assert body["result_type"] == "sts-policy-fetch-error"
    served(env, "redir.sts.test", 1)
    served(env, "target.redir.sts.test", 0)


def test_body_larger_than_64k(env):
    """RFC 8461, 3.3: sg stops reading above 64 KiB: sts-policy-invalid."""
    big = policy() + "# " + "x" * (70 * 1024) + "\n"
    env.publish("big.sts.test", big)
    body = env.refresh("big.sts.test")
    h = steps(body)["https"]
    assert h["error"] == "too-big"
    assert body["result_type"] == "sts-policy-invalid"

    # exactly 64 KiB is still read (and then judged by the parser)
    exact = policy()
    exact += "x: " + "y" * (65536 - len(exact) - 4) + "\n"
    assert len(exact) == 65536
    env.publish("exact64k.sts.test", exact)
    body = env.refresh("exact64k.sts.test")
    assert steps(body)["https"]["ok"] and steps(body)["parse"]["ok"]


def test_content_type(env):
    """RFC 8461, 3.2: the policy is text/plain: text/html is refused
    (sts-policy-invalid); a charset parameter is allowed."""
    env.publish("html.sts.test", content_type="text/html")
    body = env.refresh("html.sts.test")
    h = steps(body)["https"]
    assert h["error"] == "content-type" and h["content_type"] == "text/html"
    assert body["result_type"] == "sts-policy-invalid"

    env.publish("charset.sts.test", charset="utf-8")
    body = env.refresh("charset.sts.test")
    assert steps(body)["https"]["content_type"] == "text/plain; charset=utf-8"
    assert body["policy"]["mode"] == "enforce"


def test_slow_server_times_out(env):
    """RFC 8461, 3.3: a timeout on the fetch (sg_mta_sts_fetch_timeout,
    at most 60 s): a host that never answers is a fetch error."""
    env.publish("slow.sts.test", apply=False)
    env.records["hosts"]["mta-sts.slow.sts.test"] = [env.slow.ip]
    env.apply()
    before = env.slow.accepted
    body = env.refresh("slow.sts.test")
    h = steps(body)["https"]
    assert h["error"] == "timeout"
    # the server accepted the connection: the timeout, not a refusal
    wait_for(lambda: env.slow.accepted > before, timeout=5)
    assert env.slow.accepted - before == 1
    assert body["result_type"] == "sts-policy-fetch-error"


def nginx_t(pg, redis_srv, extra_main):
    """nginx -t on an sg configuration with extra_main: (exit code,
    stderr)."""
    d = sgtest.make_tmp("sgconf-")
    try:
        cert, key = sginstance.make_self_signed("sg.local")
        for name, pem in (("cert.pem", cert), ("key.pem", key)):
            with open(os.path.join(d, name), "w") as f:
                f.write(pem)
        conf = os.path.join(d, "nginx.conf")
        sginstance.write_nginx_conf(
            conf, prefix_dir=d, module_so=sgtest.MODULE_SO,
            pg_conninfo=pg.conninfo, redis_addr=redis_srv.address,
            smtp_listen="127.0.0.1:%d" % sgtest.free_port(),
            admin_listen="127.0.0.1:%d" % sgtest.free_port(),
            http_listen="127.0.0.1:%d" % sgtest.free_port(),
            cert_file=os.path.join(d, "cert.pem"),
            key_file=os.path.join(d, "key.pem"),
            resolver="127.0.0.1:9", extra_main=extra_main)
        r = subprocess.run([sginstance.NGINX_BIN, "-t", "-p", d + "/",
                            "-c", conf, "-e", os.path.join(d, "error.log")],
                           capture_output=True, text=True, timeout=60)
        return r.returncode, r.stderr
    finally:
        sgtest.remove_tmp(d)


def test_fetch_timeout_capped_at_60s(pg, redis_srv, module_so):
    """RFC 8461, 3.3 (RFC-NOTES: timeout <= 60 s): "sg_mta_sts_fetch_timeout
    61s" (and 0) are refused at configuration time with a message naming
    the directive; 60s, 60000ms and 1m are accepted."""
    for bad in ("61s", "60001ms", "2m", "0"):
        rc, err = nginx_t(pg, redis_srv,
                          "sg_delivery off;\nsg_mta_sts_fetch_timeout %s;"
                          % bad)
        assert rc != 0, (bad, err)
        assert "[emerg]" in err, (bad, err)
        assert '"sg_mta_sts_fetch_timeout" must be from 1ms to 60s' in err, (
            bad, err)
    for good in ("60s", "60000ms", "1m", "1ms"):
        rc, err = nginx_t(pg, redis_srv,
                          "sg_delivery off;\nsg_mta_sts_fetch_timeout %s;"
                          % good)
        assert rc == 0, (good, err)
        assert "sg_mta_sts_fetch_timeout" not in err, (good, err)


def test_no_address_for_policy_host(env):
    """RFC 8461, 3.3: mta-sts.<domain> without an address: fetch error,
    and curl never resolves a name itself."""
    env.publish("noaddr.sts.test", apply=False)
    del env.records["hosts"]["mta-sts.noaddr.sts.test"]
    env.apply()
    body = env.refresh("noaddr.sts.test")
    assert not steps(body)["dns"]["ok"]
    assert "https" not in steps(body)
    assert body["result_type"] == "sts-policy-fetch-error"


# ----------------------------------------------------------- policy, 3.2


def test_invalid_policy(env):
    """RFC 8461, 3.2: mode enforce without mx is invalid:
    sts-policy-invalid, with the line in the reason."""
    env.publish("invalid.sts.test", "version: STSv1\nmode: enforce\n"
                "max_age: 600\n")
    body = env.refresh("invalid.sts.test")
    p = steps(body)["parse"]
    assert not p["ok"] and "no mx" in p["detail"]
    assert body["result_type"] == "sts-policy-invalid"


def test_max_age_clamped(env):
    """RFC 8461, 3.2 (decision, RFC-NOTES): max_age above 31557600 is
    clamped, and the Redis key expires then."""
    env.publish("clamp.sts.test", policy(max_age=99999999))
    body = env.refresh("clamp.sts.test")
    assert body["policy"]["max_age"] == 31557600
    assert "clamped" in steps(body)["parse"]["detail"]
    ttl = env.sg.redis.client().ttl("sg:mta-sts:clamp.sts.test")
    assert 31557000 < ttl <= 31557600


def test_crlf_policy(env):
    """RFC 8461, 3.2: CRLF line ends."""
    env.publish("crlf.sts.test", policy(crlf=True, mode="testing"))
    assert env.lookup("crlf.sts.test")["mode"] == "testing"


# ------------------------------------------------------- failures and cache


def test_refetch_failure_keeps_cached_policy_and_backs_off(env):
    """RFC 8461, 3.3 and RFC-NOTES: when the fetch of a new id fails, the
    cached unexpired policy keeps applying, and that id is not fetched
    again before the backoff (5 minutes; sg_mta_sts_failure_backoff here)
    is over."""
    env.publish("keep.sts.test", policy(mode="enforce"), txt_id="k1")
    assert env.lookup("keep.sts.test")["mode"] == "enforce"

    env.publish("keep.sts.test", policy(mode="testing"), txt_id="k2",
                status=500)
    body = env.lookup("keep.sts.test")
    assert body["mode"] == "enforce" and body["result_type"] is None
    assert body["policy"]["policy_id"] == "k1"
    assert "refetch failed" in body["reason"]
    assert "HTTP status 500" in body["reason"]
    served(env, "keep.sts.test", 2)                     # k1, then k2

    again = env.lookup("keep.sts.test")
    assert again["policy"]["policy_id"] == "k1"
    assert "failed recently" in again["reason"]
    served(env, "keep.sts.test", 2)                     # not refetched

    failure = env.get("keep.sts.test")["last_failure"]
    assert failure["policy_id"] == "k2"
    assert failure["result_type"] == "sts-policy-fetch-error"

    # the host is fixed; after the backoff the new id is fetched
    env.publish("keep.sts.test", policy(mode="testing"), txt_id="k2")
    time.sleep(BACKOFF_S)
    later = env.lookup("keep.sts.test")
    assert later["mode"] == "testing" and later["source"] == "fetched"
    assert env.get("keep.sts.test")["last_failure"] is None


def test_failure_without_cache_is_reported_and_not_repeated(env):
    """RFC 8461, 3.3 and 5.1: no policy could be fetched and none is
    cached: delivery goes on as without MTA-STS, the RFC 8460 result type
    is reported, and the fetch is not repeated within the backoff."""
    env.publish("failing.sts.test", status=404, txt_id="f1")
    first = env.lookup("failing.sts.test")
    assert first["mode"] == "none"
    assert first["result_type"] == "sts-policy-fetch-error"
    second = env.lookup("failing.sts.test")
    assert second["result_type"] == "sts-policy-fetch-error"
    assert "no refetch of id f1" in second["reason"]
    served(env, "failing.sts.test", 1)
    # ?refresh=1 is a person asking: it fetches whatever the backoff says
    env.refresh("failing.sts.test")
    served(env, "failing.sts.test", 2)


def test_concurrent_lookups_share_one_fetch(env):
    """Lookups of one domain while its fetch runs wait for that fetch
    (one connection to the policy host, one answer for all)."""
    env.publish("shared.sts.test", apply=False)
    env.records["hosts"]["mta-sts.shared.sts.test"] = [env.slow.ip]
    env.apply()
    before = env.slow.accepted
    results = []

    def one():
        results.append(env.lookup("shared.sts.test"))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 5
    assert all(r["result_type"] == "sts-policy-fetch-error" for r in results)
    wait_for(lambda: env.slow.accepted > before, timeout=5)
    assert env.slow.accepted - before == 1


def test_setting_off_ignores_policies(env):
    """DESIGN.md settings: "Enable MTA-STS" off: policies are ignored, a
    lookup answers "no policy" at once."""
    env.publish("off.sts.test", txt_id="o1")
    try:
        r = sgtest.api(env.sg, "PATCH", "/api/v1/settings",
                       json={"mta_sts_enabled": False})
        assert r.status_code == 200, r.text
        wait_for(lambda: "setting is off" in
                 env.lookup("off.sts.test")["reason"], timeout=15)
        assert env.lookup("off.sts.test")["policy"] is None
        served(env, "off.sts.test", 0)
    finally:
        sgtest.api(env.sg, "PATCH", "/api/v1/settings",
                   json={"mta_sts_enabled": True})
    wait_for(lambda: env.lookup("off.sts.test")["mode"] == "enforce",
             timeout=15)


def test_domain_validation(env):
    """RFC 8461, 4.1 / RFC-NOTES: address literals have no policy; names
    that are not host names are refused (422)."""
    for bad in ("[192.0.2.1]", "192.0.2.1", "a..b", "-x.test"):
        r = sgtest.api(env.sg, "GET", POLICY_PATH + bad + "?lookup=1")
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["errors"][0]["field"] == "domain"


def test_upper_case_and_trailing_dot(env):
    """RFC 8461, 3.1: the policy domain is a DNS name: case and a final
    dot do not make another domain."""
    env.publish("case.sts.test", txt_id="c1")
    assert env.lookup("CASE.Sts.TEST.")["policy"]["policy_id"] == "c1"
    assert env.get("case.sts.test")["policy_id"] == "c1"


def test_roles(env):
    """API: read-only tokens read and look up, only admins evict."""
    env.publish("roles.sts.test", txt_id="r1")
    ro = sgtest.create_token(env.sg.pg.conninfo, "sts-ro", "read-only")
    r = sgtest.api(env.sg, "GET", POLICY_PATH + "roles.sts.test?lookup=1",
                   token=ro)
    assert r.status_code == 200
    r = sgtest.api(env.sg, "GET", "/api/v1/mta-sts/policies", token=ro)
    assert r.status_code == 200
    r = sgtest.api(env.sg, "DELETE", POLICY_PATH + "roles.sts.test",
                   token=ro)
    assert r.status_code == 403
    r = sgtest.api(env.sg, "GET", "/api/v1/mta-sts/policies", token=None)
    assert r.status_code == 401


def test_bench_counts_cached_decisions(env):
    """?bench=N (bench/sts_bench.py): N lookups in a row, each a cache
    hit of the kind asked (memory, or Redis with the TXT id confirmed),
    each checking the MX (RFC 8461, 4.1); admins only."""
    env.publish("benchapi.sts.test", txt_id="b1")
    env.lookup("benchapi.sts.test")
    body = env.get("benchapi.sts.test", "?bench=200&mx=mx1.example.test")
    assert body["lookups"] == 200 and body["from"] == "memory"
    assert body["sources"] == {"memory": 200, "redis": 0, "fetched": 0,
                               "none": 0}
    assert body["mx_matched"] == 200 and body["ns_per_lookup"] > 0
    # (the MtaStsBench of docs/api/openapi.yaml)
    assert set(body) == {"domain", "lookups", "from", "elapsed_ns",
                         "ns_per_lookup", "mx_matched", "sources"}
    body = env.get("benchapi.sts.test",
                   "?bench=5&from=redis&mx=other.example.test")
    assert body["sources"]["redis"] == 5 and body["mx_matched"] == 0
    served(env, "benchapi.sts.test", 1)
    for bad in ("?bench=0", "?bench=1000001", "?bench=x",
                "?bench=1&from=disk"):
        r = sgtest.api(env.sg, "GET", POLICY_PATH + "benchapi.sts.test" + bad)
        assert r.status_code == 422, (bad, r.text)
    ro = sgtest.create_token(env.sg.pg.conninfo, "sts-bench-ro", "read-only")
    r = sgtest.api(env.sg, "GET", POLICY_PATH + "benchapi.sts.test?bench=1",
                   token=ro)
    assert r.status_code == 403
    assert r.json()["type"] == "urn:sg:problem:forbidden"


def test_openapi_documents_every_mta_sts_route_and_parameter():
    """docs/api/openapi.yaml describes what the code serves: every
    MTA-STS route of the admin module (and GET /domains/{id}/dns) with
    its method, every query parameter ngx_http_sgadmin_sts.c reads
    (lookup, refresh, bench, from, mx), the 403 of ?bench for a read-only
    token and the MtaStsBench answer."""
    import re
    import yaml
    src = os.path.join(sgtest.PROJECT, "ngx_http_sgadmin_module")
    with open(os.path.join(sgtest.PROJECT, "docs", "api",
                           "openapi.yaml")) as f:
        api = yaml.safe_load(f)
    with open(os.path.join(src, "ngx_http_sgadmin_module.c")) as f:
        routes = re.findall(r'NGX_HTTP_(GET|POST|PUT|PATCH|DELETE),\s*'
                            r'ngx_string\("(/mta-sts/[^"]*|[^"]*/dns)"\)',
                            f.read())
    assert len(routes) >= 4, routes
    for method, path in routes:
        assert method.lower() in api["paths"].get(path, {}), (method, path)
    with open(os.path.join(src, "ngx_http_sgadmin_sts.c")) as f:
        read = set(re.findall(r'ngx_http_arg\(r, \(u_char \*\) "(\w+)"',
                              f.read()))
    get = api["paths"]["/mta-sts/policies/{domain}"]["get"]
    documented = {p["name"] for p in get["parameters"] if p["in"] == "query"}
    assert read == {"lookup", "refresh", "bench", "from", "mx"}, read
    assert read <= documented, read - documented
    assert "403" in get["responses"]
    assert "bench" in get["responses"]["403"]["description"]
    bench = api["components"]["schemas"]["MtaStsBench"]["properties"]
    assert set(bench) == {"domain", "lookups", "from", "elapsed_ns",
                          "ns_per_lookup", "mx_matched", "sources"}


def test_delete_evicts_redis_and_memory(env):
    """DELETE: the Redis keys go, every worker forgets the domain (NOTIFY
    sg_mta_sts), the next lookup fetches again; audited."""
    env.publish("evict.sts.test", txt_id="e1")
    env.lookup("evict.sts.test")
    # the policy host logs a GET after sg has its answer: wait for the line
    wait_for(lambda: env.hosts.requests("evict.sts.test") == 1, timeout=10)
    r = sgtest.api(env.sg, "DELETE", POLICY_PATH + "evict.sts.test")
    assert r.status_code == 204, r.text
    assert redis_keys(env.sg.redis, "sg:mta-sts*:evict.sts.test") == []
    sgtest.api(env.sg, "GET", POLICY_PATH + "evict.sts.test")
    assert sgtest.api(env.sg, "GET", POLICY_PATH +
                      "evict.sts.test").status_code == 404
    wait_for(lambda: "evict.sts.test evicted" in
             open(env.sg.error_log, errors="replace").read(), timeout=10)
    body = env.lookup("evict.sts.test")
    assert body["source"] == "fetched"
    wait_for(lambda: env.hosts.requests("evict.sts.test") == 2, timeout=10)

    with env.sg.pg.connect() as conn:
        cur = conn.cursor()
        cur.execute("SELECT actor, object, old->>'id' FROM audit_log"
                    " WHERE action = 'mta_sts.delete' ORDER BY id DESC"
                    " LIMIT 1")
        actor, obj, old_id = cur.fetchone()
    assert actor == "token:test-admin"
    assert obj == "mta_sts:evict.sts.test" and old_id == "e1"

    r = sgtest.api(env.sg, "DELETE", POLICY_PATH + "never.sts.test")
    assert r.status_code == 404


def test_redis_is_read_when_memory_misses(env):
    """DESIGN.md: Redis is the cluster's cache: a policy another node
    fetched (written to Redis) is used without a fetch."""
    env.publish("shared-redis.sts.test", policy(mode="testing"),
                txt_id="sr1")
    now = int(time.time())
    text = policy(mode="testing")
    value = json.dumps({"domain": "shared-redis.sts.test", "id": "sr1",
                        "mode": "testing", "mx": ["mx1.example.test"],
                        "max_age": 86400, "fetched_at": now,
                        "expires_at": now + 86400, "text": text})
    env.sg.redis.client().set("sg:mta-sts:shared-redis.sts.test", value,
                              exat=now + 86400)
    body = env.lookup("shared-redis.sts.test")
    assert body["mode"] == "testing" and body["source"] == "redis"
    served(env, "shared-redis.sts.test", 0)


def refresh_due(fetched_at, max_age):
    """When sg refreshes a policy fetched at fetched_at (the API's
    "%Y-%m-%dT%H:%M:%SZ"), as a time.time(): a quarter of max_age before
    expiry (sg_sts_refresh_due)."""
    t = datetime.datetime.strptime(fetched_at, "%Y-%m-%dT%H:%M:%SZ")
    t = t.replace(tzinfo=datetime.timezone.utc).timestamp()
    return t + max_age - max_age // 4


def sleep_past_refresh(fetched_at, max_age):
    """Sleep until a refresh of that copy, if sg (wrongly) made one, would
    have been served: its due time, the 1 s tick after it, 2 s more."""
    time.sleep(max(0.0, refresh_due(fetched_at, max_age) + 3 - time.time()))


def test_proactive_refresh_once(env):
    """RFC 8461, 3.3 and 5.1: a policy in use is fetched again before it
    expires, in the background, by one worker of the cluster (the lock
    sg:mta-sts-lock:<domain>)."""
    env.publish("proactive.sts.test", policy(max_age=8), txt_id="pr1")
    first = env.lookup("proactive.sts.test")
    fetched_at = first["policy"]["fetched_at"]
    served(env, "proactive.sts.test", 1)
    # due a quarter of max_age before expiry: 6 s after the fetch
    wait_for(lambda: env.hosts.requests("proactive.sts.test") >= 2,
             timeout=15, interval=0.2)
    lock = "sg:mta-sts-lock:proactive.sts.test"
    assert env.sg.redis.client().exists(lock)
    wait_for(lambda: env.get("proactive.sts.test")["fetched_at"]
             != fetched_at, timeout=5)
    # not in use since: no further refresh, past the new copy's due time
    # (without the lock, which lasts longer than this policy: it would
    # stop a second refresh whether the policy was in use or not)
    env.sg.redis.client().delete(lock)
    sleep_past_refresh(env.get("proactive.sts.test")["fetched_at"], 8)
    served(env, "proactive.sts.test", 2)


# max_age of the two-node refresh tests: refresh due at +12 s (a quarter
# of max_age before expiry), expiry at +16 s.  A node that finds the lock
# taken at its tick T (in [+12, +13)) looks in Redis again at T+1, T+2,
# T+3, before expiry; were it to wait the failure backoff instead, it
# would look again at T + BACKOFF_S >= +16: expired, too late (true while
# that quarter of max_age is at most BACKOFF_S).
CLUSTER_MAX_AGE = 16
assert CLUSTER_MAX_AGE // 4 <= BACKOFF_S


def test_proactive_refresh_once_per_cluster(env, pg, redis_srv):
    """RFC 8461, 5.1 and DESIGN.md: two nodes sharing Redis both use a
    policy close to expiry; it is fetched again once for the cluster (the
    lock sg:mta-sts-lock:<domain>), and the other node takes the refreshed
    copy from Redis instead of fetching."""
    env.publish("cluster.sts.test", policy(max_age=CLUSTER_MAX_AGE),
                txt_id="cl1")
    other = sgtest.start_sg(pg, redis_srv, resolver=env.dns.address,
                            ca_file=env.ca.cert_file, extra_main=EXTRA_MAIN,
                            error_log_level="debug")
    mark = env.sg.log_mark()
    try:
        first = env.lookup("cluster.sts.test")
        assert first["source"] == "fetched"
        served(env, "cluster.sts.test", 1)
        r = sgtest.api(other, "GET", POLICY_PATH + "cluster.sts.test"
                       "?lookup=1")
        assert r.status_code == 200 and r.json()["source"] == "redis"
        served(env, "cluster.sts.test", 1)
        fetched_at = first["policy"]["fetched_at"]
        # due a quarter of max_age before expiry, on both nodes
        wait_for(lambda: env.get("cluster.sts.test")["fetched_at"]
                 != fetched_at, timeout=30, interval=0.2)
        # the node that lost the lock takes the new copy from Redis
        wait_for(lambda: "cluster.sts.test: refreshed elsewhere" in
                 env.sg.log_since(mark) +
                 other.log_since(0),
                 timeout=15, interval=0.2)
        # not in use since: no further refresh, on either node, past the
        # new copy's due time (without the lock, which lasts longer than
        # this policy: it would stop a second refresh whether the policy
        # was in use or not)
        env.sg.redis.client().delete("sg:mta-sts-lock:cluster.sts.test")
        sleep_past_refresh(env.get("cluster.sts.test")["fetched_at"],
                           CLUSTER_MAX_AGE)
        served(env, "cluster.sts.test", 2)
    finally:
        sgtest.finish_sg(other)


def test_proactive_refresh_waits_for_the_lock_holder(env):
    """RFC 8461, 5.1 and DESIGN.md: a node whose proactive refresh finds
    sg:mta-sts-lock:<domain> taken does not fetch; it looks in Redis again
    at its next tick and takes the lock holder's copy before its own
    (short-lived) copy expires (were it to wait the failure backoff, it
    would be too late: CLUSTER_MAX_AGE).  The lock holder is another node,
    played by the test: it takes the lock, then writes its copy to Redis
    as sg does (test_redis_is_read_when_memory_misses)."""
    domain = "lockheld.sts.test"
    env.publish(domain, policy(max_age=CLUSTER_MAX_AGE), txt_id="lh1")
    lock = "sg:mta-sts-lock:" + domain
    rc = env.sg.redis.client()
    mark = env.sg.log_mark()
    try:
        first = env.lookup(domain)
        assert first["source"] == "fetched"
        # the other node has begun the refresh
        assert rc.set(lock, "1", nx=True, ex=60)
        wait_for(lambda: domain + ": refresh lock held elsewhere"
                 in env.sg.log_since(mark),
                 timeout=30, interval=0.05)
        # ... and completes it
        now = int(time.time())
        value = json.dumps({"domain": domain, "id": "lh1", "mode": "enforce",
                            "mx": ["mx1.example.test"],
                            "max_age": CLUSTER_MAX_AGE, "fetched_at": now,
                            "expires_at": now + CLUSTER_MAX_AGE,
                            "text": policy(max_age=CLUSTER_MAX_AGE)})
        rc.set("sg:mta-sts:" + domain, value, exat=now + CLUSTER_MAX_AGE)
        wait_for(lambda: domain + ": refreshed elsewhere" in
                 env.sg.log_since(mark),
                 timeout=10, interval=0.1)
        got = env.get(domain)["fetched_at"]
        assert got != first["policy"]["fetched_at"]
        assert got == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        # this node never fetched again
        served(env, domain, 1)
    finally:
        rc.delete(lock)


def test_redis_hangs_mid_test(env):
    """DESIGN.md / RFC-NOTES decision: Redis stops answering (SIGSTOP)
    with a policy cached in memory and in Redis: its commands time out
    (sg_redis_timeout), the cached policy keeps applying, a new id is
    fetched directly, a new domain too — never "no policy" because the
    cache hangs."""
    env.publish("hang1.sts.test", policy(mode="enforce"), txt_id="h1")
    env.publish("hang2.sts.test", policy(mode="testing"), txt_id="h2")
    assert env.lookup("hang1.sts.test")["source"] == "fetched"
    redis = env.sg.redis
    pid = redis.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        body = env.lookup("hang1.sts.test")
        assert body["mode"] == "enforce" and body["source"] == "memory"
        body = env.lookup("hang2.sts.test")
        assert body["mode"] == "testing" and body["source"] == "fetched"
        env.hosts.set_body("hang1.sts.test", policy(mode="testing"))
        env.set_txt("hang1.sts.test", ["v=STSv1; id=h1b"])
        body = env.lookup("hang1.sts.test")
        assert body["mode"] == "testing" and body["source"] == "fetched"
        assert body["policy"]["policy_id"] == "h1b"
        served(env, "hang2.sts.test", 1)
        again = env.lookup("hang2.sts.test")
        assert again["mode"] == "testing" and again["source"] == "memory"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: sgtest.api(env.sg, "GET", "/api/v1/health")
             .status_code == 200, timeout=20)
    log = open(env.sg.error_log, errors="replace").read()
    assert "Redis is unavailable" in log


def test_redis_down_fetches_directly(env):
    """DESIGN.md / RFC-NOTES decision: with Redis down sg fetches directly
    and keeps the policy in worker memory; never "no policy" because the
    cache is down; the log says so."""
    env.publish("noredis.sts.test", policy(mode="enforce"), txt_id="nr1")
    redis = env.sg.redis
    try:
        redis.stop()
        body = env.lookup("noredis.sts.test")
        assert body["mode"] == "enforce" and body["source"] == "fetched"
        again = env.lookup("noredis.sts.test")
        assert again["mode"] == "enforce" and again["source"] == "memory"
        served(env, "noredis.sts.test", 1)
        cached = env.get("noredis.sts.test")
        assert cached["source"] == "memory"
        assert cached["policy_id"] == "nr1"
        r = sgtest.api(env.sg, "GET", "/api/v1/mta-sts/policies")
        assert r.status_code == 503
        assert r.json()["type"] == "urn:sg:problem:redis-unavailable"
        log = open(env.sg.error_log, errors="replace").read()
        assert "Redis is unavailable" in log
        assert "cached in this worker's memory" in log
    finally:
        if not redis.is_running():
            redis.start()
    wait_for(lambda: sgtest.api(env.sg, "GET", "/api/v1/health")
             .status_code == 200, timeout=20)
    env.set_txt("noredis.sts.test", ["v=STSv1; id=nr2"])
    wait_for(lambda: env.lookup("noredis.sts.test")["policy"]["policy_id"]
             == "nr2", timeout=15)
    assert env.get("noredis.sts.test")["policy_id"] == "nr2"


def test_two_workers_evict_and_stop_with_fetches_running(env, pg, redis_srv):
    """DELETE reaches every worker (NOTIFY sg_mta_sts); a worker stopping
    with a fetch still running (its client gone) cancels it cleanly."""
    env.publish("workers.sts.test", txt_id="w1")
    env.publish("hang.sts.test", apply=False)
    env.records["hosts"]["mta-sts.hang.sts.test"] = [env.slow.ip]
    env.apply()
    # (FETCH_TIMEOUT_S: the fetch still runs when the instance stops, a
    # second after the lookup; the stop waits for it to end)
    assert FETCH_TIMEOUT_S >= 5
    inst = sgtest.start_sg(pg, redis_srv, workers=2,
                           resolver=env.dns.address,
                           ca_file=env.ca.cert_file,
                           extra_main=EXTRA_MAIN)
    try:
        for _ in range(4):
            r = sgtest.api(inst, "GET", POLICY_PATH +
                           "workers.sts.test?lookup=1")
            assert r.status_code == 200 and r.json()["mode"] == "enforce"
        r = sgtest.api(inst, "DELETE", POLICY_PATH + "workers.sts.test")
        assert r.status_code == 204

        def evicting_pids():
            pids = set()
            for line in open(inst.error_log, errors="replace"):
                if "workers.sts.test evicted" in line:
                    pids.add(line.split()[3].split("#")[0])
            return len(pids) == 2 and pids
        wait_for(evicting_pids, timeout=10)

        # a lookup whose client gives up; the fetch goes on, then nginx
        # stops under it
        with pytest.raises(Exception):
            sgtest.api(inst, "GET", POLICY_PATH + "hang.sts.test?lookup=1",
                       timeout=1)
    finally:
        problems = inst.stop()
        log = open(inst.error_log, errors="replace").read()
        inst.cleanup()
    assert not problems, problems
    assert "exited on signal" not in log
