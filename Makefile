# sg: build, run and test.  See README.md.
#
#   make          build build/ngx_sg_module.so against Debian's nginx-dev
#   make run      start a self-contained instance under var/ (make stop)
#   make test     install what is missing, build, run every test
#   make bench    compare sg with Postfix on this machine

NGINX_SRC   ?= /usr/share/nginx/src
BUILD       := build
NGX_BUILD   := $(BUILD)/nginx
MODULE      := $(BUILD)/ngx_sg_module.so
PYTHON      := /usr/bin/python3
SHELL       := /bin/bash

# Debian's compiler and linker flags, as the nginx that loads the module
# was built with (hardening included)
NGX_CC_OPT = $(shell nginx -V 2>&1 | sed -n "s/.*--with-cc-opt='\([^']*\)'.*/\1/p")
NGX_LD_OPT = $(shell nginx -V 2>&1 | sed -n "s/.*--with-ld-opt='\([^']*\)'.*/\1/p")

SOURCES := config $(wildcard common/*.[ch] ngx_mail_sg_module/*.[ch] \
                             ngx_http_sgadmin_module/*.[ch])

.PHONY: all check-nginx test unit integration clean

all: $(MODULE)

# The module must match the nginx binary that loads it.
check-nginx:
	@command -v nginx >/dev/null || { echo "error: nginx is missing: apt-get install nginx" >&2; exit 1; }
	@test -f $(NGINX_SRC)/conf_flags || { echo "error: $(NGINX_SRC) is missing: apt-get install nginx-dev" >&2; exit 1; }
	@have=$$(nginx -v 2>&1 | sed 's|.*nginx/||'); \
	 want=$$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' $(NGINX_SRC)/src/core/nginx.h); \
	 if [ "$$have" != "$$want" ]; then \
	     echo "error: nginx is $$have but nginx-dev is $$want: install matching versions" >&2; exit 1; fi

$(NGX_BUILD)/objs/Makefile: config Makefile | check-nginx
	rm -rf $(NGX_BUILD) && mkdir -p $(BUILD) && cp -r $(NGINX_SRC) $(NGX_BUILD)
	cd $(NGX_BUILD) && . ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" --with-cc-opt="$(NGX_CC_OPT)" \
	    --with-ld-opt="$(NGX_LD_OPT)" --add-dynamic-module=$(CURDIR) \
	    > configure.log 2>&1 || { tail -5 configure.log >&2; exit 1; }

$(MODULE): $(NGX_BUILD)/objs/Makefile $(SOURCES)
	$(MAKE) -s -C $(NGX_BUILD) -f objs/Makefile objs/ngx_sg_module.so
	@# a new inode: running nginx processes keep the object they mapped
	cp $(NGX_BUILD)/objs/ngx_sg_module.so $@.tmp && mv -f $@.tmp $@

unit:
	$(MAKE) -s -C tests/unit

integration: $(MODULE)
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/integration

# the tests use Postfix's smtp-source and posttls-finger (bench-deps)
test: deps bench-deps all
	$(MAKE) -s unit
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/integration

clean:
	rm -rf $(BUILD)

include mk/instance.mk
include mk/bench.mk
