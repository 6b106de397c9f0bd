#!/usr/bin/python3
"""bench/profile.py: where sg's time goes in one end-to-end run.

Not part of `make bench`. Starts the benchmark's sg instance (bench/bench.py)
with pg_stat_statements loaded, an smtp-sink and its TLS front, runs one
end-to-end run (smtp-source -m 5000 -l 4096 into sg, relayed to the sink)
under `perf record -a -g`, and prints:

  * the run's msg/s, CPU per group (nginx, PostgreSQL, Redis);
  * PostgreSQL's statements by total execution time (pg_stat_statements);
  * perf's top symbols for sg's processes only (nginx workers, the
    PostgreSQL backends and auxiliaries of this instance).

Usage: /usr/bin/python3 bench/profile.py [plaintext|TLS] [SESSIONS]
Environment: as bench/bench.py (BENCH_MESSAGES, BENCH_MODULE_SO, ...);
PROFILE_PERF=0 skips perf. Everything runs in a temporary folder and is
stopped by pid and removed at the end.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
from bench import (Sg, Sink, TlsFront, make_ca, run_e2e, log,  # noqa: E402
                   stop_pid)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "plaintext"
    sessions = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    use_perf = os.environ.get("PROFILE_PERF", "1") != "0" and shutil.which("perf")
    base = tempfile.mkdtemp(prefix="sgprof-", dir="/tmp")
    os.chmod(base, 0o755)
    sink = front = sg = perf = None
    try:
        ca, cert, key = make_ca(os.path.join(base, "ca"))
        sink = Sink(os.path.join(base, "sink"))
        sink.start()
        front = TlsFront(os.path.join(base, "front"), bench.TLS_FRONT, sink,
                         cert, key)
        front.start()
        sg = Sg(base, ca)
        sg.start()
        # pg_stat_statements needs a restart of PostgreSQL
        sg.nginx.stop()
        with open(os.path.join(sg.pg.datadir, "postgresql.conf"), "a") as f:
            f.write("\nshared_preload_libraries = 'pg_stat_statements'\n"
                    "pg_stat_statements.track = all\n"
                    "track_wal_io_timing = on\n")
        sg.pg.stop()
        sg.pg.start()
        import psycopg2
        conn = psycopg2.connect(sg.pg.admin_conninfo.replace(
            "dbname=postgres", "dbname=sg"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            cur.execute("GRANT pg_read_all_stats TO sg")
            cur.execute("GRANT EXECUTE ON FUNCTION pg_stat_statements_reset"
                        "(oid, oid, bigint) TO sg")
            cur.execute("GRANT EXECUTE ON FUNCTION pg_stat_reset_shared"
                        "(text) TO sg")
        conn.close()
        sg.nginx.start()
        sg.configure(mode, sink.port, front.port)
        sg.sql("SELECT pg_stat_statements_reset()")
        sg.sql("SELECT pg_stat_reset_shared('wal')")
        commits0 = sg.sql("SELECT xact_commit FROM pg_stat_database"
                          " WHERE datname = 'sg'")[0][0]
        perf_data = os.path.join(base, "perf.data")
        if use_perf:
            perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "499",
                                     "-o", perf_data],
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(1)
        r = run_e2e(sg, sessions, mode, sink, front)
        groups = sg.groups()
        pids = [p for g in groups.values() for p in g]
        with open(os.path.join(base, "pids"), "w") as f:
            for g, ps in groups.items():
                f.write("%s %s\n" % (g, ",".join(str(x) for x in ps)))
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
            perf = None
        print("\n== run: %s" % ("%.0f msg/s end to end, %.0f accepted" % (
            r["rate"], r["accept_rate"]) if r["ok"] else r["why"]))
        print("== CPU s per 1000 messages: %s" % ", ".join(
            "%s %.2f" % (g, v * 1000.0 / bench.MESSAGES)
            for g, v in r["cpu"].items()))
        time.sleep(0.6)     # statistics are flushed every 0.5 s at most
        commits = sg.sql("SELECT xact_commit FROM pg_stat_database"
                         " WHERE datname = 'sg'")[0][0] - commits0
        wal = sg.sql("SELECT wal_records, wal_bytes, wal_write, wal_sync,"
                     " round(wal_sync_time::numeric, 0) FROM pg_stat_wal")[0]
        print("== commits in database sg: %d; WAL: %d records, %d bytes,"
              " %d writes, %d syncs (fdatasync), %s ms in syncs"
              % ((commits,) + tuple(wal)))
        rows = sg.sql(
            "SELECT calls, round(total_exec_time::numeric, 0),"
            " round(mean_exec_time::numeric, 3), rows,"
            " regexp_replace(query, '\\s+', ' ', 'g')"
            " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25")
        print("\n== PostgreSQL statements by total execution time"
              " (calls, total ms, mean ms, rows, query)")
        for c, tot, mean, n, q in rows:
            print("%7d %8s %8s %7d  %s" % (c, tot, mean, n, q[:150]))
        if use_perf:
            for title, extra in (("by process name", ["--sort", "comm"]),
                                 ("by symbol", ["--sort", "comm,dso,sym"])):
                p = subprocess.run(
                    ["perf", "report", "-i", perf_data, "--no-children",
                     "--stdio", "-g", "none", "--pid",
                     ",".join(str(x) for x in pids)] + extra,
                    capture_output=True, text=True, timeout=300)
                lines = [l for l in p.stdout.splitlines()
                         if l.strip() and not l.startswith("#")]
                print("\n== perf, sg's processes only, %s" % title)
                print("\n".join(lines[:40]))
    finally:
        if perf:
            stop_pid(perf.pid, signal.SIGINT, 30, perf)
        for thing in (sg, front, sink):
            if thing is not None:
                try:
                    thing.stop()
                except Exception as e:
                    log("stopping %s: %s" % (type(thing).__name__, e))
        if os.environ.get("BENCH_KEEP_TMP"):
            log("kept %s" % base)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
