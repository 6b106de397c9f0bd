"""Settings and certificate changes reach every worker and every node
sharing the database without a reload (issue 2, item 5)."""

import socket
import ssl
import time

import pytest
import requests

from sgtest import api, free_port, make_self_signed, store_certificate


def health_http(url):
    r = requests.get(url + "/api/v1/health", timeout=5,
                     headers={"Connection": "close"})
    assert r.status_code == 200, r.text
    return r.json()["worker"]


@pytest.fixture
def two_workers(sg_instance):
    """An instance with worker_processes 2 and an extra plain-HTTP listener
    with reuseport, so that new connections spread over both workers."""
    port = free_port()
    inst = sg_instance(workers=2, extra_http="""
server {
    listen 127.0.0.1:%d reuseport;
    location / { sgadmin; }
}""" % port)
    inst.spread_url = "http://127.0.0.1:%d" % port
    yield inst
    inst.reset_settings()


def worker_pids(inst, timeout=10):
    pids = set()
    deadline = time.monotonic() + timeout
    while len(pids) < 2 and time.monotonic() < deadline:
        pids.add(health_http(inst.spread_url)["pid"])
    return pids


def wait_all_workers(inst, pids, version, window):
    """Poll health over new connections for `window` seconds; return the
    pids that reported settings_version >= version.  A window well within
    sg_settings_poll (30 s): only NOTIFY can bring the change that soon."""
    seen = set()
    deadline = time.monotonic() + window
    while seen != pids and time.monotonic() < deadline:
        w = health_http(inst.spread_url)
        if w["settings_version"] >= version:
            seen.add(w["pid"])
    return seen


def test_patch_reaches_both_workers(two_workers):
    inst = two_workers
    pids = worker_pids(inst)
    assert len(pids) == 2, "only one worker answered: %s" % pids
    for i in range(3):
        r = api(inst, "PATCH", "/api/v1/settings",
                json={"starttls_outbound": i % 2 == 0})
        assert r.status_code == 200
        version = int(r.headers["ETag"].strip('"'))
        seen = wait_all_workers(inst, pids, version, 10.0)
        assert seen == pids, ("workers with version %d after 10 s: %s of %s"
                              % (version, seen, pids))


def test_database_change_reaches_workers(two_workers, pg):
    """Another node writing the settings row directly."""
    inst = two_workers
    pids = worker_pids(inst)
    assert len(pids) == 2
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute("UPDATE settings SET doc = jsonb_set(doc,"
                    " '{mta_sts_enabled}', 'false') WHERE id = 1"
                    " RETURNING version")
        version = cur.fetchone()[0]
    seen = wait_all_workers(inst, pids, version, 10.0)
    assert seen == pids
    r = api(inst, "GET", "/api/v1/settings")
    assert r.json()["mta_sts_enabled"] is False
    assert r.headers["ETag"] == '"%d"' % version


def test_database_change_reaches_single_worker(sg, pg):
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute("UPDATE settings SET doc = jsonb_set(doc,"
                    " '{mta_sts_enabled}', 'false') WHERE id = 1"
                    " RETURNING version")
        version = cur.fetchone()[0]
    # well within sg_settings_poll (30 s): NOTIFY brought it
    deadline = time.monotonic() + 10.0
    got = None
    while time.monotonic() < deadline:
        got = api(sg, "GET", "/api/v1/health", token=None).json()
        if got["worker"]["settings_version"] >= version:
            break
    assert got["worker"]["settings_version"] >= version, got


def served_cert_der(port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="sg.local") as t:
            return t.getpeercert(binary_form=True)


def der(pem):
    return ssl.PEM_cert_to_DER_cert(pem)


def wait_served(port, want, timeout=5.0):
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = served_cert_der(port)
        if got == want:
            break
        time.sleep(0.1)
    return got


def test_certificate_switch_without_reload(sg_instance, pg):
    inst = sg_instance(workers=2)
    try:
        with pg.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT certificate_pem FROM certificates WHERE id = %s",
                        (inst.certificate_id,))
            stored = cur.fetchone()[0]
        assert served_cert_der(inst.admin_port) == der(stored)

        other_pem, other_key = make_self_signed("other.example")
        other_id = store_certificate(pg.conninfo, other_pem, other_key,
                                     "other.example", activate=False)
        master = inst.nginx.pid
        r = api(inst, "PATCH", "/api/v1/settings",
                json={"active_certificate_id": other_id})
        assert r.status_code == 200, r.text
        assert r.json()["active_certificate_id"] == other_id

        assert wait_served(inst.admin_port, der(other_pem)) == der(other_pem)
        # soon every new connection (any worker) serves it: ten in a row
        deadline = time.monotonic() + 10.0
        while not all(served_cert_der(inst.admin_port) == der(other_pem)
                      for _ in range(10)):
            assert time.monotonic() < deadline, \
                "a worker still serves the old certificate after 10 s"
            time.sleep(0.1)
        h = api(inst, "GET", "/api/v1/health", token=None).json()
        assert h["worker"]["certificate_id"] == other_id

        # and back
        r = api(inst, "PATCH", "/api/v1/settings",
                json={"active_certificate_id": inst.certificate_id})
        assert r.status_code == 200
        assert wait_served(inst.admin_port, der(stored)) == der(stored)
        assert inst.nginx.pid == master
        with open(inst.error_log) as f:
            assert "reconfiguring" not in f.read()
    finally:
        inst.reset_settings()
