"""`make run` / `make stop` (tools/sginstance.py run|stop) in a copy of the
project tree (issue 2, item 7 and "Done when").

The copy holds the project's tracked files as they are in the working tree
(so var/ is fresh); nothing is built: the module is SG_MODULE_SO or
build/ngx_sg_module.so, passed to sginstance.py through SG_MODULE_SO. Ports
come from SG_SMTP_PORT, SG_ADMIN_PORT and SG_HTTP_PORT (free loopback
ports).
"""

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

import sgtest
from sgtest import api, free_port, sginstance

PYTHON = "/usr/bin/python3"


def copy_project(dest):
    """The project's tracked files, as in the working tree, into dest."""
    out = subprocess.run(["git", "-C", sgtest.PROJECT, "ls-files", "-z"],
                         check=True, capture_output=True).stdout
    for rel in out.decode().split("\0"):
        if not rel:
            continue
        src = os.path.join(sgtest.PROJECT, rel)
        if not os.path.lexists(src):
            continue        # deleted in the working tree
        dst = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    assert not os.path.exists(os.path.join(dest, "var", "admin-token"))


class MakeRun:
    """tools/sginstance.py of a project copy, on its own free ports."""

    def __init__(self, project, module_so):
        self.project = project
        self.smtp, self.admin, self.http = _three_ports()
        self.env = dict(os.environ, SG_SMTP_PORT=str(self.smtp),
                        SG_ADMIN_PORT=str(self.admin),
                        SG_HTTP_PORT=str(self.http), SG_MODULE_SO=module_so)
        for k in ("SG_CA_FILE", "SG_DNSSEC_TRUST_ANCHOR"):
            self.env.pop(k, None)
        # queued test mail must not make delivery ask the system's resolver
        self.env["SG_RESOLVER"] = "127.0.0.1:9"
        self.base_url = "https://127.0.0.1:%d" % self.admin
        self.token_file = os.path.join(project, "var", "admin-token")

    def cmd(self, what, timeout=180):
        p = subprocess.run([PYTHON, os.path.join(self.project, "tools",
                                                 "sginstance.py"), what],
                           env=self.env, capture_output=True, text=True,
                           timeout=timeout, cwd=self.project)
        p.text = "exit %d\n--- stdout:\n%s--- stderr:\n%s" % (
            p.returncode, p.stdout, p.stderr)
        return p

    @property
    def token(self):
        with open(self.token_file) as f:
            return f.read().strip()

    def pids(self):
        """{name: pid} of the three services, read from their pid files."""
        lay = sginstance.Layout(self.project)
        pg, rd, ngx = lay.services()
        return {"postgresql": pg.pid, "redis": rd.pid, "nginx": ngx.pid}

    def pids_with_children(self):
        pids = set()
        for pid in self.pids().values():
            if pid:
                pids.add(pid)
                pids |= sgtest.descendants(pid)
        return pids

    def stop_quietly(self):
        try:
            self.cmd("stop", timeout=120)
        except Exception:
            pass


def _three_ports():
    while True:
        ports = (free_port(), free_port(), free_port())
        if len(set(ports)) == 3:
            return ports


def swaks(port, *args):
    return subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port,
                           "--timeout", "15"] + list(args),
                          capture_output=True, text=True, timeout=60)


def check_running_instance(mr, p):
    """The first `run`: endpoints printed, token file, settings, SMTP,
    relaying from loopback. Returns the queue id of the relayed message."""
    assert p.returncode == 0, p.text
    out = p.stdout
    assert "sg is running" in out, p.text
    assert re.search(r"SMTP +127\.0\.0\.1:%d\b" % mr.smtp, out), p.text
    assert "https://127.0.0.1:%d/" % mr.admin in out, p.text
    assert "http://127.0.0.1:%d/" % mr.http in out, p.text
    assert mr.token_file in out, p.text

    st = os.stat(mr.token_file)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert re.fullmatch(r"sg_[A-Za-z0-9_-]{43}", mr.token)

    h = api(mr.base_url, "GET", "/api/v1/health", token=None)
    assert h.status_code == 200, h.text
    r = api(mr.base_url, "GET", "/api/v1/settings", token=mr.token)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["tls_enabled"] is True
    assert isinstance(doc["active_certificate_id"], int)
    assert api(mr.base_url, "GET", "/api/v1/settings",
               token="sg_wrong").status_code == 401

    e = swaks(mr.smtp, "--quit-after", "EHLO")
    assert e.returncode == 0, e.stdout + e.stderr
    assert "250" in e.stdout

    sender = "makerun-%d@client.example" % time.monotonic_ns()
    m = swaks(mr.smtp, "--from", sender, "--to", "someone@example.org",
              "--header", "Subject: make run test")
    assert m.returncode == 0, m.stdout + m.stderr
    q = re.findall(r"<[-~]? +250 2\.0\.0 Ok: queued as ([0-9A-F]{16})", m.stdout)
    assert len(q) == 1, m.stdout
    return q[0], sender


def check_stop(mr):
    pids = mr.pids_with_children()
    assert len(pids) >= 3
    p = mr.cmd("stop")
    assert p.returncode == 0, p.text
    for name in ("nginx", "redis", "postgresql"):
        assert "stopped %s" % name in p.stdout, p.text
    alive = [pid for pid in pids if sginstance.pid_alive(pid)]
    assert alive == [], "still running after stop: %s" % alive
    p = mr.cmd("stop")
    assert p.returncode == 0 and "nothing was running" in p.stdout, p.text


def check_run_again(mr, token, qid, sender):
    p = mr.cmd("run")
    assert p.returncode == 0, p.text
    assert "created" not in p.stdout, p.text      # nothing new was made
    assert mr.token == token
    r = api(mr.base_url, "GET", "/api/v1/settings", token=token)
    assert r.status_code == 200, r.text
    assert r.json()["tls_enabled"] is True
    r = api(mr.base_url, "GET", "/api/v1/queue", token=token,
            params={"sender": sender})
    assert r.status_code == 200, r.text
    assert [i["id"] for i in r.json()["items"]] == [qid]


def run_cycle(mr):
    p = mr.cmd("run")
    try:
        qid, sender = check_running_instance(mr, p)
        token = mr.token

        again = mr.cmd("run")
        assert again.returncode == 0, again.text
        assert "already running" in again.stdout, again.text

        check_stop(mr)
        check_run_again(mr, token, qid, sender)
        check_stop(mr)
    finally:
        mr.stop_quietly()
    return p


@pytest.fixture
def project_tmp():
    d = sgtest.make_tmp("sgmakerun-")
    yield d
    sgtest.remove_tmp(d)


def test_make_run_stop_run(project_tmp, module_so):
    proj = os.path.join(project_tmp, "sg")
    copy_project(proj)
    mr = MakeRun(proj, module_so)
    p = run_cycle(mr)
    # the state lives in var/ itself here
    lay = sginstance.Layout(proj)
    assert not lay.relocated
    assert os.path.isdir(os.path.join(proj, "var", "pg", "data"))
    assert "created PostgreSQL cluster in %s" % lay.pg_data in p.stdout


def test_run_reports_unhealthy(project_tmp, module_so):
    """Health not 200 within the bound: exit 1, the health JSON and the
    error log tail printed, the services left running (and it says so).
    Redis is kept from starting (its start() replaced by a no-op) and the
    bound is 3 s."""
    proj = os.path.join(project_tmp, "sg")
    copy_project(proj)
    mr = MakeRun(proj, module_so)
    try:
        p = subprocess.run([PYTHON, "-c", _UNHEALTHY_SCRIPT, proj],
                           env=mr.env, capture_output=True, text=True,
                           timeout=180, cwd=proj)
        text = "exit %d\n%s\n%s" % (p.returncode, p.stdout, p.stderr)
        assert p.returncode == 1, text
        assert "UNHEALTHY" in p.stderr, text
        assert "answered 503" in p.stderr, text
        assert '"redis": {' in p.stderr and '"ok": false' in p.stderr, text
        lay = sginstance.Layout(proj)
        assert "last lines of %s" % os.path.join(lay.nginx, "error.log") \
            in p.stderr, text
        assert "left running" in p.stderr, text
        pids = mr.pids()
        assert sginstance.pid_alive(pids["nginx"]), text
        assert sginstance.pid_alive(pids["postgresql"]), text
    finally:
        mr.stop_quietly()


_UNHEALTHY_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
import sginstance
sginstance.HEALTH_TIMEOUT = 10
sginstance.Redis.start = lambda self, timeout=30: None
sys.exit(sginstance.main(["run"]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (postgres, nobody)")
def test_make_run_from_untraversable_folder(module_so):
    """A clone under a 0700 folder (like /root/sg): PostgreSQL, Redis and
    nginx's files go to /var/lib/sg/<sha1[:12]>/, var/state links there,
    and stop / run again find it."""
    parent = tempfile.mkdtemp(prefix="sgmakerun-", dir="/root")
    os.chmod(parent, 0o700)
    proj = os.path.join(parent, "sg")
    state = os.path.join(sginstance.STATE_ROOT, hashlib.sha1(
        os.path.realpath(proj).encode()).hexdigest()[:12])
    assert not os.path.exists(state)
    try:
        copy_project(proj)
        mr = MakeRun(proj, module_so)
        first = mr.cmd("run")
        assert first.returncode == 0, first.text
        assert state in first.stdout, first.text
        assert os.path.islink(os.path.join(proj, "var", "state"))
        assert os.path.realpath(os.path.join(proj, "var", "state")) == state
        assert os.path.exists(os.path.join(proj, "var", "STATE.txt"))
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o755
        data = os.path.join(state, "pg", "data")
        assert os.stat(data).st_uid == sginstance.pwd.getpwnam("postgres").pw_uid
        assert os.stat(os.path.join(state, "run", "pg")).st_uid == \
            sginstance.pwd.getpwnam("postgres").pw_uid
        assert os.path.exists(os.path.join(state, "run", "redis.sock"))
        # nothing of the services in the project's var/
        assert not os.path.exists(os.path.join(proj, "var", "pg"))
        mr.cmd("stop")
        # the full cycle, now with the existing state
        p = run_cycle(mr)
        assert p.returncode == 0
        assert "created PostgreSQL cluster" not in p.stdout, p.text
    finally:
        try:
            MakeRun(proj, module_so).stop_quietly()
        finally:
            shutil.rmtree(parent, ignore_errors=True)
            if os.path.isdir(state):
                shutil.rmtree(state, ignore_errors=True)


def test_make_run_target_with_outbound_overrides(tmp_path_factory):
    """Issue 2, item 7: `make run` itself (deps check, build, instance) with
    SG_RESOLVER and SG_CA_FILE: they reach nginx.conf as sg_resolver and
    sg_trusted_ca, nginx accepts them, the instance is healthy; `make stop`
    stops it. A bad SG_RESOLVER makes `make run` fail with nginx's clear
    message naming the value."""
    base = sgtest.make_tmp()
    project = os.path.join(base, "sg")
    os.makedirs(project)
    copy_project(project)
    mr = MakeRun(project, os.path.join(project, "build", "ngx_sg_module.so"))
    mr.env.pop("SG_MODULE_SO")
    ca = "/etc/ssl/certs/ca-certificates.crt"
    env = dict(mr.env, SG_RESOLVER="127.0.0.1:5353", SG_CA_FILE=ca)
    try:
        p = subprocess.run(["make", "-C", project, "run"], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "sg is running" in p.stdout
        conf = open(os.path.join(project, "var", "nginx",
                                 "nginx.conf")).read()
        assert "sg_resolver 127.0.0.1:5353;" in conf
        assert "sg_trusted_ca %s;" % ca in conf
        r = api(type("I", (), {"base_url": mr.base_url, "token": mr.token}),
                "GET", "/api/v1/health")
        assert r.status_code == 200, r.text
        p = subprocess.run(["make", "-C", project, "stop"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert not any(sginstance.pid_alive(pid)
                       for pid in mr.pids().values() if pid)

        env["SG_RESOLVER"] = "not-an-address"
        p = subprocess.run(["make", "-C", project, "run"], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode != 0
        assert 'invalid resolver "not-an-address"' in p.stdout + p.stderr
    finally:
        subprocess.run(["make", "-C", project, "stop"], env=env,
                       capture_output=True, timeout=120)
        sgtest.remove_tmp(base)
