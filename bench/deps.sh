#!/bin/bash
# Install what `make bench` needs beyond `make deps`: Postfix (the
# comparison MTA, and its smtp-source and smtp-sink) and stunnel4 (the
# optional STARTTLS front of the sink, BENCH_TLS_FRONT=stunnel; the
# default front is an nginx mail proxy, from libnginx-mod-mail of
# `make deps`). Debian's own system Postfix instance must not run: the
# package is preseeded to "No configuration" (no /etc/postfix/main.cf, so
# nothing starts or binds port 25), and if installing did start a system
# master anyway, it is stopped again. stunnel4 starts nothing without a
# configuration in /etc/stunnel.
set -euo pipefail

missing=()
for p in postfix stunnel4; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "bench: missing ${missing[*]}; run as root or install them" >&2
    exit 1
fi

sys_master() {   # pid of a running system Postfix master, if any
    local pid
    pid=$(cat /var/spool/postfix/pid/master.pid 2>/dev/null | tr -d ' ') || true
    if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then echo "$pid"; fi
}
before=$(sys_master)

echo "bench: installing ${missing[*]}"
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "bench: apt-get could not install ${missing[*]}" >&2
    exit 1
fi

after=$(sys_master)
if [ -n "$after" ] && [ "$after" != "$before" ]; then
    echo "bench: the package started the system Postfix (pid $after); stopping it"
    postfix -c /etc/postfix stop || kill "$after"
fi
echo "bench: installed ${missing[*]}"
