# mk/bench.mk — `make bench`: sg vs Postfix on this machine (included by
# Makefile). Installs Postfix (smtp-source, smtp-sink) and stunnel4 when
# missing, builds sg, runs bench/bench.py, which starts private instances
# of both, an smtp-sink and a STARTTLS front for it in a temporary folder
# on free loopback ports, measures end-to-end throughput (smtp-source →
# server → smtp-sink, plaintext and TLS outbound) and idle sessions,
# prints the table and writes docs/benchmarks.md. Takes 5–10 minutes.
# Environment: BENCH_MESSAGES (5000), BENCH_IDLE (10000), BENCH_TLS_FRONT
# (nginx | stunnel), BENCH_STALL (20), BENCH_BUDGET (540), BENCH_KEEP_TMP;
# see bench/bench.py.

BENCH_PYTHON ?= /usr/bin/python3

.PHONY: bench bench-deps bench-sts

bench-deps: deps
	@bench/deps.sh

# bench.py writes docs/benchmarks.md; the MTA-STS section (issue 5: a
# cached policy decision, sg against postfix-mta-sts-resolver) follows it
bench: bench-deps all
	$(BENCH_PYTHON) bench/bench.py
	$(BENCH_PYTHON) bench/sts_bench.py --out $(BUILD)/sts-bench.md
	printf '\n' >> docs/benchmarks.md
	cat $(BUILD)/sts-bench.md >> docs/benchmarks.md

bench-sts: bench-deps all
	$(BENCH_PYTHON) bench/sts_bench.py --out $(BUILD)/sts-bench.md
