"""tools/sg-migrate refuses to continue from a half-applied or edited
migration, rolls back failing transactional ones, and serialises concurrent
runs (issue 2, item 4).

Every test migrates a fresh database (in the session's PostgreSQL) from a
temporary copy of sql/ plus extra files numbered 900 and up.
"""

import os
import shutil
import subprocess
import threading
import time

import psycopg2
import pytest

import sgtest

PYTHON = "/usr/bin/python3"
SG_MIGRATE = os.path.join(sgtest.PROJECT, "tools", "sg-migrate")
SQL = os.path.join(sgtest.PROJECT, "sql")


@pytest.fixture
def fresh_db(pg):
    """(dsn, sql dir copy) for a new, empty database owned by sg."""
    if not pg.is_running():
        pg.start()
    name = "sgmig_%d" % time.monotonic_ns()
    admin = psycopg2.connect(pg.admin_conninfo)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("CREATE DATABASE %s OWNER sg" % name)
    sqldir = os.path.join(sgtest.make_tmp("sgmig-"), "sql")
    shutil.copytree(SQL, sqldir)
    dsn = "host=%s port=%d dbname=%s user=sg" % (pg.sockdir, pg.port, name)
    try:
        yield dsn, sqldir
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
        admin.close()
        sgtest.remove_tmp(os.path.dirname(sqldir))


def migrate(dsn, sqldir, *args):
    p = subprocess.run([PYTHON, SG_MIGRATE, "--dsn", dsn, "--dir", sqldir]
                       + list(args), capture_output=True, text=True,
                       timeout=120)
    p.text = "exit %d\n--- stdout:\n%s--- stderr:\n%s" % (
        p.returncode, p.stdout, p.stderr)
    return p


def write(sqldir, name, text):
    with open(os.path.join(sqldir, name), "w") as f:
        f.write(text)


def query(dsn, sql, args=None):
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def table_exists(dsn, name):
    return query(dsn, "SELECT to_regclass(%s) IS NOT NULL", (name,))[0][0]


def recorded(dsn):
    """{version: finished?} of schema_migrations."""
    return dict(query(dsn, "SELECT version, finished_at IS NOT NULL"
                           " FROM schema_migrations"))


def n_base():
    return len([n for n in os.listdir(SQL) if n.endswith(".sql")])


def test_fresh_database_then_up_to_date(fresh_db):
    dsn, sqldir = fresh_db
    p = migrate(dsn, sqldir)
    assert p.returncode == 0, p.text
    assert p.stdout.count("applied ") == n_base(), p.text
    p = migrate(dsn, sqldir)
    assert p.returncode == 0, p.text
    assert "schema up to date (%d migrations)" % n_base() in p.stdout, p.text


def test_no_transaction_failure_refuses_until_mark_done(fresh_db):
    dsn, sqldir = fresh_db
    write(sqldir, "900_nt_fails.sql",
          "-- sg:no-transaction\n"
          "CREATE TABLE nt_first (x int);\n"
          "SELECT 1 / 0;\n"
          "CREATE TABLE nt_second (x int);\n")
    write(sqldir, "901_after.sql", "CREATE TABLE after_nt (x int);\n")

    p = migrate(dsn, sqldir)
    assert p.returncode == 1, p.text
    assert "900" in p.stderr and "--mark-done 900" in p.stderr, p.text
    assert "division by zero" in p.stderr, p.text
    # part way: the first statement stayed, the rest did not run
    assert table_exists(dsn, "nt_first")
    assert not table_exists(dsn, "nt_second")
    assert not table_exists(dsn, "after_nt")
    assert recorded(dsn)[900] is False
    assert 901 not in recorded(dsn)

    # every later run refuses, naming the version and --mark-done
    for _ in range(2):
        p = migrate(dsn, sqldir)
        assert p.returncode == 1, p.text
        assert "migration 900 (900_nt_fails.sql)" in p.stderr, p.text
        assert "--mark-done 900" in p.stderr, p.text
        assert not table_exists(dsn, "after_nt")
    st = migrate(dsn, sqldir, "--status")
    assert st.returncode == 0, st.text
    assert "UNFINISHED" in st.stdout and "901_after.sql" in st.stdout

    # finished by hand, then marked done: the next run continues
    query_ddl(dsn, "CREATE TABLE nt_second (x int)")
    p = migrate(dsn, sqldir, "--mark-done", "900")
    assert p.returncode == 0, p.text
    assert "marked migration 900" in p.stdout, p.text
    p = migrate(dsn, sqldir)
    assert p.returncode == 0, p.text
    assert "applied 901_after.sql" in p.stdout, p.text
    assert table_exists(dsn, "after_nt")
    assert recorded(dsn)[900] is True and recorded(dsn)[901] is True
    p = migrate(dsn, sqldir)
    assert p.returncode == 0 and "schema up to date" in p.stdout, p.text


def query_ddl(dsn, sql):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def test_edited_applied_migration_is_refused(fresh_db):
    dsn, sqldir = fresh_db
    write(sqldir, "900_edit_me.sql", "CREATE TABLE edit_me (x int);\n")
    assert migrate(dsn, sqldir).returncode == 0
    write(sqldir, "900_edit_me.sql", "CREATE TABLE edit_me (x int, y int);\n")
    write(sqldir, "901_later.sql", "CREATE TABLE later_one (x int);\n")
    p = migrate(dsn, sqldir)
    assert p.returncode == 1, p.text
    assert "migration 900 (900_edit_me.sql) was changed" in p.stderr, p.text
    assert "checksum" in p.stderr, p.text
    assert not table_exists(dsn, "later_one")
    # an edited base migration too
    base = sorted(n for n in os.listdir(sqldir) if n.startswith("001_"))[0]
    write(sqldir, "900_edit_me.sql", "CREATE TABLE edit_me (x int);\n")
    with open(os.path.join(sqldir, base), "a") as f:
        f.write("\n-- an innocent comment\n")
    p = migrate(dsn, sqldir)
    assert p.returncode == 1, p.text
    assert "(%s) was changed" % base in p.stderr, p.text
    assert not table_exists(dsn, "later_one")


def test_failing_transactional_migration_leaves_nothing(fresh_db):
    dsn, sqldir = fresh_db
    assert migrate(dsn, sqldir).returncode == 0
    before = recorded(dsn)
    write(sqldir, "900_tx_fails.sql",
          "CREATE TABLE tx_table (x int);\n"
          "CREATE INDEX tx_index ON tx_table (x);\n"
          "INSERT INTO tx_table VALUES (1);\n"
          "SELECT 1 / 0;\n")
    write(sqldir, "901_after_tx.sql", "CREATE TABLE after_tx (x int);\n")
    for _ in range(2):
        p = migrate(dsn, sqldir)
        assert p.returncode == 1, p.text
        assert "migration 900 (900_tx_fails.sql) failed and was rolled back" \
            in p.stderr, p.text
        assert recorded(dsn) == before
        assert not table_exists(dsn, "tx_table")
        assert not table_exists(dsn, "tx_index")
        assert not table_exists(dsn, "after_tx")
    # fixed: both apply
    write(sqldir, "900_tx_fails.sql", "CREATE TABLE tx_table (x int);\n")
    p = migrate(dsn, sqldir)
    assert p.returncode == 0, p.text
    assert table_exists(dsn, "tx_table") and table_exists(dsn, "after_tx")


def test_concurrent_runs_apply_once(fresh_db):
    dsn, sqldir = fresh_db
    # a slow one, so that the runs overlap
    write(sqldir, "900_slow.sql", "SELECT pg_sleep(1.5);\n"
                                  "CREATE TABLE slow_done (x int);\n")
    results = [None, None]

    def one(i):
        results[i] = migrate(dsn, sqldir)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in results:
        assert p is not None and p.returncode == 0, p and p.text
    applied = [p for p in results if "applied 900_slow.sql" in p.stdout]
    idle = [p for p in results if "schema up to date" in p.stdout]
    assert len(applied) == 1 and len(idle) == 1, \
        "\n".join(p.text for p in results)
    assert applied[0].stdout.count("applied ") == n_base() + 1
    assert "(%d migrations)" % (n_base() + 1) in idle[0].stdout
    assert recorded(dsn) == {v: True for v in recorded(dsn)}
    assert len(recorded(dsn)) == n_base() + 1
