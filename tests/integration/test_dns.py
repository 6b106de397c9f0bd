"""DNS for delivery (common/sg_dns.c, libunbound on nginx's event loop),
end to end through GET /api/v1/delivery/resolve/{domain}, against dnsmasq
on loopback (dnsserver.py). sg never asks the system's resolver here:
every instance is given sg_resolver.

RFC 5321, 5.1 (MX order, implicit MX, unusable MX), RFC 7505 (null MX).
"""

import os
import signal
import threading
import time

import pytest

import dnsserver
import sgtest
from peers import wait_for
from sgtest import api, create_token, make_tmp, remove_tmp

RECORDS = {
    "mx": [
        # RFC 5321, 5.1: order by preference
        ("order.test", "mx30.order.test", 30),
        ("order.test", "mx10.order.test", 10),
        ("order.test", "mx20.order.test", 20),
        # equal preferences, shuffled per lookup
        ("equal.test", "a.equal.test", 10),
        ("equal.test", "b.equal.test", 10),
        # RFC 7505: MX 0 .
        ("null.test", ".", 0),
        # one MX host without address: dropped, the other kept
        ("partial.test", "gone.partial.test", 5),
        ("partial.test", "mx.partial.test", 10),
        # no MX host has an address
        ("noaddr.test", "gone1.noaddr.test", 10),
        ("noaddr.test", "gone2.noaddr.test", 20),
        # the only MX host's lookup fails (REFUSED -> SERVFAIL)
        ("hostfail.test", "mx.elsewhere.invalid-zone", 10),
        # an MX written as an IP address names no host
        ("literal.test", "192.0.2.1", 10),
        # an exchange with IPv6 only
        ("v6.test", "mx.v6.test", 10),
        # changed by test_records_change_without_restart
        ("moved.test", "mx10.order.test", 1),
    ],
    "hosts": {
        "mx10.order.test": ["127.0.0.10"],
        "mx20.order.test": ["127.0.0.20"],
        "mx30.order.test": ["127.0.0.30"],
        "a.equal.test": ["127.0.1.1"],
        "b.equal.test": ["127.0.1.2"],
        "mx.partial.test": ["127.0.2.1", "fd00::2:1"],
        "implicit.test": ["127.0.3.1", "127.0.3.2", "fd00::3:1"],
        "relay.test": ["127.0.4.1", "fd00::4:1"],
        "mx.v6.test": ["2001:db8::25"],
    },
    # exists, but no MX and no address: NODATA twice
    "txt": [("bare.test", "v=spf1 -all"),
            ("_mta-sts.order.test", "v=STSv1; id=20240101")],
    # DANE-EE SPKI SHA-256 (RFC 7672 3.1.1)
    "rr": [("_25._tcp.mx10.order.test", 52, "030101" + "ab" * 32)],
    "cname": [("alias.test", "mx10.order.test")],
    "zones": ["test"],
}


@pytest.fixture(scope="module")
def dns():
    d = dnsserver.DnsServer().start(RECORDS)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def sgd(dns, pg, redis_srv, module_so):
    # debug logging: exercises every ngx_log_debug of sg_dns.c
    inst = sgtest.start_sg(pg, redis_srv, resolver=dns.address,
                           error_log_level="debug")
    yield inst
    sgtest.finish_sg(inst)


def resolve(inst, name, http_timeout=10, **params):
    r = api(inst, "GET", "/api/v1/delivery/resolve/" + name, params=params,
            timeout=http_timeout)
    assert r.status_code == 200, r.text
    return r.json()


def names(body):
    return [h["name"] for h in body["hosts"]]


def test_mx_sorted_by_preference(sgd):
    """RFC 5321, 5.1: lowest preference first."""
    b = resolve(sgd, "order.test")
    assert b["status"] == "ok", b
    assert b["domain"] == "order.test"
    assert names(b) == ["mx10.order.test", "mx20.order.test",
                        "mx30.order.test"]
    assert [h["pref"] for h in b["hosts"]] == [10, 20, 30]
    assert [h["addresses"] for h in b["hosts"]] == [
        ["127.0.0.10"], ["127.0.0.20"], ["127.0.0.30"]]
    assert b["implicit"] is False
    assert b["reason"] is None
    # DNSSEC is off without a trust anchor: nothing claims to be secure
    assert b["dnssec_validation"] is False
    assert b["mx_secure"] is False
    assert not any(h["secure"] for h in b["hosts"])


def test_equal_preferences_shuffled(sgd):
    """RFC 5321, 5.1: equal preferences MUST be randomized."""
    seen = set()
    for _ in range(24):
        b = resolve(sgd, "equal.test")
        assert b["status"] == "ok"
        seen.add(tuple(names(b)))
        if len(seen) == 2:
            break
    assert seen == {("a.equal.test", "b.equal.test"),
                    ("b.equal.test", "a.equal.test")}


def test_name_is_normalized(sgd):
    b = resolve(sgd, "ORDER.Test.")
    assert b["domain"] == "order.test"
    assert b["status"] == "ok"


def test_ipv6_addresses_after_ipv4(sgd):
    b = resolve(sgd, "partial.test")
    assert b["status"] == "ok"
    assert names(b) == ["mx.partial.test"]
    assert b["hosts"][0]["addresses"] == ["127.0.2.1", "fd00::2:1"]

    b = resolve(sgd, "v6.test")
    assert b["status"] == "ok"
    assert b["hosts"] == [{"name": "mx.v6.test", "pref": 10,
                           "addresses": ["2001:db8::25"], "secure": False,
                           "tempfail": False}]


def test_mx_host_without_address_dropped(sgd):
    """RFC 5321, 5.1: hosts without an address are skipped, the reason
    names the one lost."""
    b = resolve(sgd, "partial.test")
    assert names(b) == ["mx.partial.test"]
    assert "gone.partial.test" in b["reason"]
    assert "NXDOMAIN" in b["reason"]


def test_no_mx_host_has_an_address(sgd):
    """RFC 5321, 5.1: MX records present, none usable: an error."""
    b = resolve(sgd, "noaddr.test")
    assert b["status"] == "not_found", b
    assert b["hosts"] == []
    assert b["reason"].startswith("no MX host of noaddr.test has an address")


def test_mx_host_lookup_fails_temporarily(sgd):
    b = resolve(sgd, "hostfail.test")
    assert b["status"] == "tempfail", b
    assert b["reason"] == ("address lookup for mx.elsewhere.invalid-zone:"
                           " A lookup: SERVFAIL")


def test_implicit_mx(sgd):
    """RFC 5321, 5.1: no MX: the domain's own addresses, preference 0."""
    b = resolve(sgd, "implicit.test")
    assert b["status"] == "ok", b
    assert b["implicit"] is True
    h = b["hosts"]
    assert len(h) == 1 and h[0]["name"] == "implicit.test"
    assert h[0]["pref"] == 0
    # IPv4 first (in the server's order), then IPv6
    assert sorted(h[0]["addresses"][:2]) == ["127.0.3.1", "127.0.3.2"]
    assert h[0]["addresses"][2:] == ["fd00::3:1"]


def test_implicit_mx_without_address(sgd):
    """RFC 5321, 5.1: the implicit MX is unusable: an error."""
    b = resolve(sgd, "bare.test")
    assert b["status"] == "not_found", b
    assert b["implicit"] is True
    assert b["reason"] == "bare.test has no MX record and no address (A/AAAA)"


def test_null_mx(sgd):
    """RFC 7505, 3: MX 0 . means the domain accepts no mail."""
    b = resolve(sgd, "null.test")
    assert b["status"] == "null_mx", b
    assert b["hosts"] == []
    assert "RFC 7505" in b["reason"]


def test_nxdomain(sgd):
    b = resolve(sgd, "nx.test")
    assert b["status"] == "not_found", b
    assert b["reason"] == ("MX lookup for nx.test: NXDOMAIN, the domain does"
                           " not exist")


def test_servfail(sgd):
    """A name the server refuses: libunbound says SERVFAIL, a temporary
    failure."""
    b = resolve(sgd, "example.invalid-zone")
    assert b["status"] == "tempfail", b
    assert b["reason"] == "MX lookup for example.invalid-zone: SERVFAIL"


def test_mx_that_is_an_ip_address(sgd):
    b = resolve(sgd, "literal.test")
    assert b["status"] == "not_found", b
    assert "192.0.2.1" in b["reason"] and "IP address" in b["reason"]


def test_host_lookup(sgd):
    """mx=0: the addresses of one host (a relay host), no MX."""
    b = resolve(sgd, "relay.test", mx=0)
    assert b["status"] == "ok", b
    assert b["implicit"] is False
    assert b["hosts"] == [{"name": "relay.test", "pref": 0,
                           "addresses": ["127.0.4.1", "fd00::4:1"],
                           "secure": False, "tempfail": False}]

    b = resolve(sgd, "nx.test", mx=0)
    assert b["status"] == "not_found"
    assert b["reason"] == "host nx.test has no address (A lookup: NXDOMAIN)"


def test_ip_literals_need_no_dns(sgd, dns):
    before = len(dns.queries())
    for literal, addr in [("192.0.2.7", "192.0.2.7"), ("[::1]", "::1"),
                          ("[IPv6:2001:DB8::7]", "2001:db8::7"),
                          ("2001:db8::8", "2001:db8::8")]:
        for mx in (0, 1):
            b = resolve(sgd, literal, mx=mx)
            assert b["status"] == "ok", (literal, b)
            assert b["hosts"][0]["addresses"] == [addr]
            assert b["hosts"][0]["name"] == addr
    assert len(dns.queries()) == before


def test_records_change_without_restart(sgd, dns):
    """Answers are not kept past their TTL (0 here)."""
    b = resolve(sgd, "moved.test")
    assert names(b) == ["mx10.order.test"]
    records = dict(RECORDS)
    records["mx"] = [m for m in RECORDS["mx"] if m[0] != "moved.test"] \
        + [("moved.test", "mx20.order.test", 1)]
    dns.reload(records)
    try:
        b = resolve(sgd, "moved.test")
        assert b["status"] == "ok", b
        assert names(b) == ["mx20.order.test"]
    finally:
        dns.reload(RECORDS)


def test_many_lookups_at_once(sgd):
    results = []

    def one(name):
        results.append((name,
                        resolve(sgd, name, http_timeout=20)["status"]))

    threads = [threading.Thread(target=one, args=(n,))
               for n in ["order.test", "implicit.test", "null.test",
                         "nx.test", "partial.test"] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    expect = {"order.test": "ok", "implicit.test": "ok",
              "null.test": "null_mx", "nx.test": "not_found",
              "partial.test": "ok"}
    assert len(results) == 40
    assert all(status == expect[n] for n, status in results), results


def test_validation_and_access(sgd, pg):
    r = api(sgd, "GET", "/api/v1/delivery/resolve/bad_name!.test")
    assert r.status_code == 422
    assert r.headers["Content-Type"] == "application/problem+json"
    assert r.json()["errors"][0]["field"] == "domain"

    r = api(sgd, "GET", "/api/v1/delivery/resolve/order.test",
            params={"timeout": "0"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "timeout"

    r = api(sgd, "GET", "/api/v1/delivery/resolve/order.test",
            params={"mx": "2"})
    assert r.status_code == 422

    r = api(sgd, "GET", "/api/v1/delivery/resolve/order.test", token=None)
    assert r.status_code == 401

    reader = create_token(pg.conninfo, "dns-reader", role="read-only")
    r = api(sgd, "GET", "/api/v1/delivery/resolve/order.test", token=reader)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"

    r = api(sgd, "POST", "/api/v1/delivery/resolve/order.test", json={})
    assert r.status_code == 405


def test_timeout_is_a_tempfail(sg_instance):
    """A server that never answers: sg's own timer ends the lookup
    (libunbound is cancelled) and the worker keeps serving meanwhile."""
    with dnsserver.SilentServer().start() as silent:
        inst = sg_instance(resolver=silent.address)
        out = {}

        def slow():
            t = time.monotonic()
            out["body"] = resolve(inst, "order.test", http_timeout=30,
                                  timeout="6000")
            out["elapsed"] = time.monotonic() - t

        th = threading.Thread(target=slow)
        th.start()
        time.sleep(0.5)
        # the worker is not blocked by the lookup: it answers another
        # request while the lookup is still waiting
        r = api(inst, "GET", "/api/v1/delivery/resolve/192.0.2.1")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert th.is_alive() and "body" not in out
        th.join(30)

        b = out["body"]
        assert b["status"] == "tempfail", b
        assert b["reason"] == ("MX lookup for order.test: no answer within"
                               " 6000 ms")
        assert out["elapsed"] >= 5.9
        assert silent.received > 0


def test_dead_resolver_port(sg_instance):
    """Nothing listens on the resolver's port: libunbound gives up by
    itself (SERVFAIL) before sg's 30 s timer; a temporary failure."""
    port = dnsserver.free_udp_tcp_port()
    inst = sg_instance(resolver="127.0.0.1:%d" % port)
    b = resolve(inst, "order.test", http_timeout=60)
    assert b["status"] == "tempfail", b
    assert b["reason"].startswith("MX lookup for order.test: ")
    assert "no answer within" not in b["reason"], b     # not sg's timer


def test_raw_queries(sgd):
    """sg_dns_query: what MTA-STS (TXT) and DANE (TLSA) will ask."""
    b = resolve(sgd, "_mta-sts.order.test", type="txt")
    assert b["rcode"] == 0 and b["havedata"] is True, b
    assert b["txt"] == ["v=STSv1; id=20240101"]
    assert b["rdata"] == [(bytes([20]) + b"v=STSv1; id=20240101").hex()]
    assert b["secure"] is False and b["bogus"] is False
    assert b["canonname"] == "_mta-sts.order.test"

    b = resolve(sgd, "_25._tcp.mx10.order.test", type="tlsa")
    assert b["type"] == 52 and b["rcode"] == 0
    assert b["rdata"] == ["030101" + "ab" * 32]

    # CNAME followed: the records of the target, its name
    b = resolve(sgd, "alias.test", type="a")
    assert b["rdata"] == ["7f00000a"]
    assert b["canonname"] == "mx10.order.test"

    b = resolve(sgd, "_mta-sts.nx.test", type="16")
    assert b["rcode"] == 3 and b["havedata"] is False and b["rdata"] == []

    b = resolve(sgd, "order.test", type="txt")        # NODATA
    assert b["rcode"] == 0 and b["havedata"] is False

    b = resolve(sgd, "x.invalid-zone", type="txt")
    assert b["rcode"] == 2                            # SERVFAIL

    # a name no server can hold: NXDOMAIN without asking
    b = resolve(sgd, "bad name.test", type="txt")
    assert b["rcode"] == 3

    r = api(sgd, "GET", "/api/v1/delivery/resolve/order.test",
            params={"type": "nope"})
    assert r.status_code == 422


def test_fast_stop_with_lookups_running(sg_instance):
    """SIGTERM while lookups wait: the worker exits at once, libunbound's
    thread and pipe are torn down, nothing is reported."""
    with dnsserver.SilentServer().start() as silent:
        inst = sg_instance(resolver=silent.address)
        errors = []

        def slow():
            try:
                api(inst, "GET", "/api/v1/delivery/resolve/order.test",
                    timeout=30)
            except Exception as e:      # the connection is cut
                errors.append(e)

        threads = [threading.Thread(target=slow) for _ in range(3)]
        for t in threads:
            t.start()
        # a lookup is pending (libunbound may merge the three queries)
        wait_for(lambda: silent.received >= 1, timeout=15)
        workers = sgtest.descendants(inst.nginx.pid)
        os.kill(inst.nginx.pid, signal.SIGTERM)
        # a worker waiting for its lookups would outlive the master's
        # SIGKILL grace and show "exited on signal 9" at teardown
        deadline = time.monotonic() + 15
        while any(sgtest.sginstance.pid_alive(w) for w in workers) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(sgtest.sginstance.pid_alive(w) for w in workers)
        for t in threads:
            t.join(30)
        assert len(errors) == 3


@pytest.fixture
def anchor_dir():
    d = make_tmp("sgdns-ta-")
    yield d
    remove_tmp(d)


def test_dnssec_bogus_is_a_tempfail(sg_instance, dns, anchor_dir):
    """With a trust anchor for test. and an unsigned zone, the chain of
    trust cannot be built: bogus, never used, never secure."""
    ta = os.path.join(anchor_dir, "test.key")
    with open(ta, "w") as f:
        f.write("test. IN DS 12345 13 2 " + "00" * 32 + "\n")
    os.chmod(ta, 0o644)
    inst = sg_instance(resolver=dns.address, dnssec_trust_anchor=ta)
    b = resolve(inst, "order.test")
    assert b["dnssec_validation"] is True
    assert b["status"] == "tempfail", b
    assert b["reason"].startswith(
        "MX lookup for order.test: DNSSEC validation failed: ")
    assert b["mx_secure"] is False

    # an IP literal needs no DNS, and is not DNSSEC-secure either
    b = resolve(inst, "192.0.2.1", mx=0)
    assert b["status"] == "ok"
    assert b["hosts"][0]["secure"] is False


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="workers run as nobody only when started as root")
def test_unreadable_trust_anchor(sg_instance, dns, anchor_dir):
    """The worker cannot read the trust anchor: DNS is off in it, loudly;
    the rest of sg works."""
    ta = os.path.join(anchor_dir, "secret.key")
    with open(ta, "w") as f:
        f.write("test. IN DS 12345 13 2 " + "00" * 32 + "\n")
    os.chmod(ta, 0o600)
    inst = sg_instance(resolver=dns.address, dnssec_trust_anchor=ta)
    inst.allow_problems.append("DNS is off in this worker")
    r = api(inst, "GET", "/api/v1/delivery/resolve/order.test")
    assert r.status_code == 503, r.text
    assert r.json()["type"] == "urn:sg:problem:dns-unavailable"
    with open(inst.error_log) as f:
        log = f.read()
    assert "DNS is off in this worker" in log
    assert "secret.key" in log
