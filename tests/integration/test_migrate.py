"""tools/sg-migrate against the test PostgreSQL: idempotent."""

import os
import subprocess

from sgtest import PROJECT


def run_migrate(pg, *args):
    return subprocess.run(["/usr/bin/python3",
                           os.path.join(PROJECT, "tools", "sg-migrate"),
                           "--dsn", pg.conninfo,
                           "--dir", os.path.join(PROJECT, "sql")] + list(args),
                          capture_output=True, text=True, timeout=60)


def test_migrate_twice_is_up_to_date(pg):
    first = run_migrate(pg)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_migrate(pg)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "up to date" in (second.stdout + second.stderr).lower()
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(finished_at) FROM schema_migrations")
        total, finished = cur.fetchone()
    n_files = len([f for f in os.listdir(os.path.join(PROJECT, "sql"))
                   if f.endswith(".sql")])
    assert total == finished == n_files
