"""Fixtures for sg integration tests (see sgtest.py for the helpers).

    sg_tmp        session: a 0755 folder in /tmp for the servers
    pg            session: PostgreSQL, fresh cluster, migrated (sgtest.Postgres;
                  .conninfo, .connect(), .stop(), .start())
    redis_srv     session: Redis on a unix socket (sgtest.Redis; .address,
                  .client(), .stop(), .start())
    sg_instance   function: factory; sg_instance(workers=1, **conf_kw) starts
                  an instance (sgtest.SgInstance); stopped at teardown, and the
                  test fails if its error log has [alert]/[crit]/[emerg]
    sg            function: one started instance with defaults
    sg_module     module: one instance shared by the tests of a module
    clean_settings function: settings row reset to defaults (TLS off, no
                  certificate) before the test
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sgtest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")


@pytest.fixture(scope="session")
def sg_tmp():
    d = sgtest.make_tmp()
    yield d
    sgtest.remove_tmp(d)


@pytest.fixture(scope="session")
def pg(sg_tmp):
    p = sgtest.start_postgres(sg_tmp)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def redis_srv(sg_tmp):
    r = sgtest.start_redis(sg_tmp)
    yield r
    r.stop()


@pytest.fixture(scope="session")
def module_so():
    if not os.path.exists(sgtest.MODULE_SO):
        pytest.fail("%s is missing: run make first" % sgtest.MODULE_SO,
                    pytrace=False)
    return sgtest.MODULE_SO


def _ensure_running(pg, redis_srv):
    # a previous test may have stopped them
    if not pg.is_running():
        pg.start()
    if not redis_srv.is_running():
        redis_srv.start()


class _Factory:
    def __init__(self, pg, redis_srv):
        self.pg, self.redis = pg, redis_srv
        self.started = []

    def __call__(self, workers=1, **conf_kw):
        _ensure_running(self.pg, self.redis)
        inst = sgtest.start_sg(self.pg, self.redis, workers=workers, **conf_kw)
        self.started.append(inst)
        return inst

    def finish(self):
        problems = []
        for inst in self.started:
            p = inst.stop()
            if p:
                problems.append("%s:\n%s" % (inst.error_log, "\n".join(p)))
            else:
                inst.cleanup()
        self.started = []
        if problems:
            pytest.fail("nginx error log has [alert]/[crit]/[emerg] lines:\n"
                        + "\n".join(problems), pytrace=False)


@pytest.fixture
def sg_instance(pg, redis_srv, module_so):
    f = _Factory(pg, redis_srv)
    yield f
    f.finish()


@pytest.fixture
def sg(sg_instance):
    return sg_instance()


@pytest.fixture(scope="module")
def sg_module(pg, redis_srv, module_so):
    f = _Factory(pg, redis_srv)
    inst = f()
    yield inst
    f.finish()


@pytest.fixture
def clean_settings(pg):
    if not pg.is_running():
        pg.start()
    sgtest.reset_settings(pg)
    yield pg
