"""Health endpoint, and PostgreSQL / Redis stopped and restarted under a
running nginx (issue 2, items 3, 5 and 8)."""

import re
import socket
import time

import pytest

from sgtest import api, read_reply, smtp_dialog

WAIT = 15


def health(inst):
    return api(inst, "GET", "/api/v1/health", token=None)


def poll_health(inst, pred, timeout=WAIT):
    """Poll /api/v1/health until pred(response) holds; return the last
    response (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    r = None
    while time.monotonic() < deadline:
        try:
            r = health(inst)
            if pred(r):
                return r
        except Exception:
            pass
        time.sleep(0.2)
    return r


def check_part(part, ok):
    assert set(part) >= {"ok", "latency_ms", "error"}, part
    assert part["ok"] is ok
    if ok:
        assert isinstance(part["latency_ms"], (int, float))
        assert part["latency_ms"] >= 0
        assert part["error"] is None
    else:
        assert isinstance(part["error"], str) and part["error"]


def test_health_ok_without_auth(sg):
    r = health(sg)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    assert doc["status"] == "ok"
    check_part(doc["postgres"], True)
    check_part(doc["redis"], True)
    w = doc["worker"]
    assert isinstance(w["pid"], int) and w["pid"] > 0
    assert w["settings_loaded"] is True
    assert isinstance(w["settings_version"], int) and w["settings_version"] > 0
    assert w["certificate_id"] == sg.certificate_id


def test_health_on_plain_http_port(sg):
    import requests
    r = requests.get(sg.http_url + "/api/v1/health", timeout=10)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def smtp_mail_from(port):
    return smtp_dialog(port, ["EHLO client.example", "MAIL FROM:<a@b.example>",
                              "QUIT"], timeout=10)


def worker_pid(inst):
    r = health(inst)
    assert r.status_code == 200, r.text
    return r.json()["worker"]["pid"]


def assert_patch_reaches_worker(inst, pid, window=10.0):
    """A PATCH now reaches the (single) worker within `window` seconds
    (well within sg_settings_poll, 30 s):
    health reports its settings_version (the PATCH's ETag) -- the LISTEN
    connection was re-established after the outage."""
    r = api(inst, "PATCH", "/api/v1/settings",
            json={"mta_sts_enabled": False})
    assert r.status_code == 200, r.text
    version = int(r.headers["ETag"].strip('"'))
    deadline = time.monotonic() + window
    seen = None
    while time.monotonic() < deadline:
        w = health(inst).json()["worker"]
        assert w["pid"] == pid
        seen = w["settings_version"]
        if seen >= version:
            return
        time.sleep(0.05)
    pytest.fail("worker %d has settings_version %s, not %d, %.1f s after "
                "the PATCH" % (pid, seen, version, window))


def test_postgres_down_and_back(sg_instance, pg):
    # the poll would bring the settings too: an hour, so that only the
    # LISTEN connection re-established can bring them within the window
    sg = sg_instance(extra_main="sg_settings_poll 1h;\n")
    # the adapter's own [alert] lines on PostgreSQL loss are covered by
    # test_postgres_down_no_alert_lines below
    assert health(sg).status_code == 200
    pid = worker_pid(sg)
    assert api(sg, "GET", "/api/v1/settings").status_code == 200
    pg.stop()
    try:
        r = poll_health(sg, lambda r: r.status_code == 503)
        assert r.status_code == 503
        doc = r.json()
        assert doc["status"] == "degraded"
        assert doc["postgres"]["ok"] is False
        assert doc["redis"]["ok"] is True

        s = api(sg, "GET", "/api/v1/settings")
        assert s.status_code == 503
        assert s.headers["Content-Type"].startswith("application/problem+json")
        assert s.json()["type"] == "urn:sg:problem:database-unavailable"
        assert s.json()["status"] == 503

        # greeting and EHLO still work; MAIL is refused temporarily
        replies = smtp_mail_from(sg.smtp_port)
        assert replies[0][0] == 220
        assert replies[1][0] == 250
        assert replies[2][0] == 451
        assert replies[2][1][-1].startswith("451 4.3.0")
        assert replies[3][0] == 221
    finally:
        pg.start()

    r = poll_health(sg, lambda r: r.status_code == 200)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    check_part(r.json()["postgres"], True)
    s = api(sg, "GET", "/api/v1/settings")
    assert s.status_code == 200
    assert s.json()["active_certificate_id"] == sg.certificate_id
    # the same worker (no restart), and it hears about changes again
    assert r.json()["worker"]["pid"] == pid
    try:
        assert_patch_reaches_worker(sg, pid)
    finally:
        sg.reset_settings()

    with open(sg.error_log, errors="replace") as f:
        log = f.read()
    assert "[error]" in log and "postgresql" in log


def test_postgres_down_health_has_error_string(sg, pg):
    pg.stop()
    try:
        r = poll_health(sg, lambda r: r.status_code == 503)
        assert r.status_code == 503
        check_part(r.json()["postgres"], False)
    finally:
        pg.start()
    poll_health(sg, lambda r: r.status_code == 200)


def test_postgres_down_error_log_is_readable(sg, pg):
    pg.stop()
    try:
        poll_health(sg, lambda r: r.status_code == 503)
        # let the reconnect loop log at least one failure
        deadline = time.monotonic() + WAIT
        lines = []
        while time.monotonic() < deadline:
            with open(sg.error_log, "rb") as f:
                lines = [l for l in f.read().splitlines()
                         if b"postgresql connection" in l and b"failed" in l]
            if lines:
                break
            time.sleep(0.2)
    finally:
        pg.start()
    poll_health(sg, lambda r: r.status_code == 200)
    assert lines
    for l in lines:
        text = l.decode("utf-8")      # raises on garbage
        assert text.isprintable(), text
        reason = text.split(" failed: ", 1)[1].split(", retrying", 1)[0]
        # libpq's reason names the socket or the refusal (or, caught
        # while it stops, PostgreSQL's own "shutting down")
        assert "connect" in reason or "socket" in reason \
            or "No such file" in reason or "shutting down" in reason, text


def test_postgres_down_no_alert_lines(sg_instance, pg):
    inst = sg_instance(workers=2)
    pg.stop()
    try:
        poll_health(inst, lambda r: r.status_code == 503)
        time.sleep(0.5)
    finally:
        pg.start()
    poll_health(inst, lambda r: r.status_code == 200)
    problems = inst.problems()
    assert problems == []


def test_smtp_greeting_and_ehlo_do_not_hang_while_postgres_down(sg, pg):
    pg.stop()
    try:
        poll_health(sg, lambda r: r.status_code == 503)
        with socket.create_connection(("127.0.0.1", sg.smtp_port),
                                      timeout=10) as s:
            f = s.makefile("rb")
            code, _ = read_reply(f)
            assert code == 220
            s.sendall(b"EHLO client.example\r\n")
            code, lines = read_reply(f)
            assert code == 250
            s.sendall(b"QUIT\r\n")
            assert read_reply(f)[0] == 221
    finally:
        pg.start()
    poll_health(sg, lambda r: r.status_code == 200)


def test_redis_down_and_back(sg, redis_srv):
    assert health(sg).status_code == 200
    pid = worker_pid(sg)
    redis_srv.stop()
    try:
        r = poll_health(sg, lambda r: r.status_code == 503)
        assert r.status_code == 503
        doc = r.json()
        assert doc["status"] == "degraded"
        check_part(doc["redis"], False)
        check_part(doc["postgres"], True)
        # the settings API does not need Redis
        s = api(sg, "GET", "/api/v1/settings")
        assert s.status_code == 200
        p = api(sg, "PATCH", "/api/v1/settings",
                json={"starttls_outbound": True})
        assert p.status_code == 200
        assert p.json()["starttls_outbound"] is True
        # SMTP greeting still works
        replies = smtp_dialog(sg.smtp_port, ["EHLO x", "QUIT"])
        assert [c for c, _ in replies] == [220, 250, 221]
    finally:
        redis_srv.start()
        sg.reset_settings()
    r = poll_health(sg, lambda r: r.status_code == 200)
    assert r.status_code == 200, r.text
    check_part(r.json()["redis"], True)
    assert r.json()["worker"]["pid"] == pid
    try:
        assert_patch_reaches_worker(sg, pid)
    finally:
        sg.reset_settings()


def _sg_backends(pg, app):
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = %s", (app,))
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_postgres_pool_size(sg_instance, pg):
    """Issue 2, item 3: a small pool per worker (sg_postgres_pool) plus one
    connection that only LISTENs."""
    # the last test's instance has stopped, but its backends may still be
    # leaving pg_stat_activity: count once the numbers hold for a second
    before = None
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        now = _sg_backends(pg, "sg"), _sg_backends(pg, "sg-listen")
        if now == before:
            break
        before = now
        time.sleep(1)
    inst = sg_instance(workers=2, extra_main="sg_postgres_pool 3;")
    poll_health(inst, lambda r: r.status_code == 200)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        now = _sg_backends(pg, "sg"), _sg_backends(pg, "sg-listen")
        if now == (before[0] + 6, before[1] + 2):
            break
        time.sleep(0.2)
    assert now == (before[0] + 6, before[1] + 2), (before, now)


def test_postgres_reconnect_backs_off(sg, pg):
    """Issue 2, item 3: reconnects back off (100 ms, doubling, at most
    5 s) instead of hammering a PostgreSQL that is down."""
    mark = sg.log_mark()
    pg.stop()
    try:
        deadline = time.monotonic() + WAIT
        delays = []
        while time.monotonic() < deadline:
            delays = [int(d) for d in re.findall(
                r"postgresql connection 0 \w+: .*?, retrying in (\d+)ms",
                sg.log_since(mark))]
            if len(delays) >= 4:
                break
            time.sleep(0.2)
    finally:
        pg.start()
    poll_health(sg, lambda r: r.status_code == 200)
    assert len(delays) >= 4, delays
    assert delays[:4] == [100, 200, 400, 800], delays
    assert max(delays) <= 5000
