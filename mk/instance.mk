# mk/instance.mk — run a local sg instance under var/ (included by Makefile).
#
#   make deps      install missing Debian packages (tools/deps.sh)
#   make run       deps + build, then start PostgreSQL, Redis and nginx under
#                  var/ and print the endpoints (tools/sginstance.py run)
#   make stop      stop them
#   make status    show what is running
#   make migrate   apply sql/ migrations to the var/ instance's database
#
# Environment: SG_SMTP_PORT (2525) SG_ADMIN_PORT (8443) SG_HTTP_PORT (8080)
# SG_RESOLVER SG_CA_FILE SG_DNSSEC_TRUST_ANCHOR (see README).

SG_PYTHON ?= /usr/bin/python3
SG_INSTANCE = $(SG_PYTHON) tools/sginstance.py

.PHONY: deps run stop status migrate

deps:
	@tools/deps.sh

run: deps all
	@$(SG_INSTANCE) run

stop:
	@$(SG_INSTANCE) stop

status:
	@$(SG_INSTANCE) status

migrate:
	@$(SG_INSTANCE) migrate
