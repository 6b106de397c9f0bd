# mk/bench.mk — `make bench`: sg vs Postfix on this machine (included by
# Makefile). Installs Postfix (smtp-source) when missing, builds sg, runs
# bench/bench.py, which starts private instances of both in a temporary
# folder on free loopback ports, measures, prints the table and writes
# docs/benchmarks.md. Environment: BENCH_MESSAGES (5000), BENCH_IDLE (10000).

BENCH_PYTHON ?= /usr/bin/python3

.PHONY: bench bench-deps

bench-deps: deps
	@bench/deps.sh

bench: bench-deps all
	$(BENCH_PYTHON) bench/bench.py
