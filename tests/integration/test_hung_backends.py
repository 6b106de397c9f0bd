"""A HUNG PostgreSQL or Redis (every process of it stopped with SIGSTOP:
connections accepted by the kernel, nothing answered) under a running
nginx: clear errors within the configured timeouts, never a hung or
restarted worker, recovery alone after SIGCONT (issue 2, item 3).

The session's PostgreSQL and Redis are frozen; SIGCONT is always sent in
`finally`.
"""

import os
import signal

import sgtest
from sgtest import api, poll, smtp_dialog

PG_TIMEOUTS = "sg_postgres_timeout 2s;\nsg_postgres_connect_timeout 2s;"
REDIS_TIMEOUTS = "sg_redis_timeout 1s;"
RECOVER = 30


def cluster_pids(pg):
    """The postmaster and every process it started."""
    pm = pg.pid
    assert pm and sgtest.sginstance.pid_alive(pm)
    return [pm] + sorted(sgtest.descendants(pm))


class Frozen:
    """SIGSTOP the given processes (the parent first, so that it forks no
    new ones meanwhile); SIGCONT them all on exit."""

    def __init__(self, pids_fn):
        self.pids_fn = pids_fn
        self.pids = []

    def __enter__(self):
        self.pids = self.pids_fn()
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
        # processes forked between listing and stopping
        for pid in self.pids_fn():
            if pid not in self.pids:
                os.kill(pid, signal.SIGSTOP)
                self.pids.append(pid)
        return self

    def __exit__(self, *exc):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        return False


def health(inst, timeout=20):
    return api(inst, "GET", "/api/v1/health", token=None, timeout=timeout)


def assert_problem_503(r):
    assert r.status_code == 503, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["status"] == 503
    assert doc["type"].startswith("urn:sg:problem:")


def ehlo_answers(inst):
    replies = smtp_dialog(inst.smtp_port, ["EHLO client.example", "QUIT"],
                          timeout=20)
    assert [c for c, _ in replies] == [220, 250, 221], replies


def worker_pid(inst):
    r = health(inst)
    assert r.status_code == 200, r.text
    return r.json()["worker"]["pid"]


def test_hung_postgres(sg_instance, pg):
    inst = sg_instance(extra_main=PG_TIMEOUTS)
    master = inst.nginx.pid
    worker = worker_pid(inst)
    assert api(inst, "GET", "/api/v1/settings").status_code == 200

    with Frozen(lambda: cluster_pids(pg)):
        # requests' timeout=20 bounds each wait: an answer is required
        s = api(inst, "GET", "/api/v1/settings", timeout=20)
        assert_problem_503(s)

        h = poll(lambda: health(inst), lambda r: r.status_code == 503, 20)
        assert h is not None and h.status_code == 503, h and h.text
        doc = h.json()
        assert doc["postgres"]["ok"] is False
        assert isinstance(doc["postgres"]["error"], str) \
            and doc["postgres"]["error"]
        assert doc["redis"]["ok"] is True
        assert doc["worker"]["pid"] == worker

        ehlo_answers(inst)
        # a transaction cannot be queued: a temporary refusal, not a hang
        replies = smtp_dialog(inst.smtp_port, [
            "EHLO client.example", "MAIL FROM:<a@client.example>",
            "RCPT TO:<someone@example.org>", "QUIT"], timeout=20)
        codes = [c for c, _ in replies]
        assert codes[:2] == [220, 250] and codes[-1] == 221, replies
        assert 451 in codes[2:4], replies
        assert any(l.startswith("451 4.3.0") for _, ls in replies for l in ls)
        s = api(inst, "GET", "/api/v1/settings", timeout=20)
        assert_problem_503(s)

    r = poll(lambda: health(inst), lambda r: r.status_code == 200, RECOVER)
    assert r is not None and r.status_code == 200, \
        (r and r.text, inst.log_tail())
    assert r.json()["worker"]["pid"] == worker
    assert inst.nginx.pid == master
    s = poll(lambda: api(inst, "GET", "/api/v1/settings"),
             lambda r: r.status_code == 200, RECOVER)
    assert s.status_code == 200, s.text
    assert s.json()["active_certificate_id"] == inst.certificate_id
    ehlo_answers(inst)
    assert worker_pid(inst) == worker


def test_hung_redis(sg_instance, redis_srv):
    inst = sg_instance(extra_main=REDIS_TIMEOUTS)
    master = inst.nginx.pid
    worker = worker_pid(inst)

    with Frozen(lambda: [redis_srv.pid]):
        h = poll(lambda: health(inst), lambda r: r.status_code == 503, 20)
        assert h is not None and h.status_code == 503, h and h.text
        doc = h.json()
        assert doc["redis"]["ok"] is False
        assert "timed out" in doc["redis"]["error"], doc
        assert doc["postgres"]["ok"] is True
        assert doc["worker"]["pid"] == worker
        # the settings API does not need Redis
        assert api(inst, "GET", "/api/v1/settings",
                   timeout=20).status_code == 200
        ehlo_answers(inst)

    r = poll(lambda: health(inst), lambda r: r.status_code == 200, RECOVER)
    assert r is not None and r.status_code == 200, \
        (r and r.text, inst.log_tail())
    assert r.json()["redis"]["ok"] is True
    assert r.json()["worker"]["pid"] == worker
    assert inst.nginx.pid == master
