#!/bin/bash
# Install the Debian packages sg needs to build, run and test (Debian 12).
# Idempotent and quiet when everything is present; runs apt only when a
# package is missing. Used by `make deps` (and so by `make run`, `make test`).
#
# Installing may start Debian's own nginx/redis/postgresql services; sg's
# instances use their own sockets and ports (see tools/sginstance.py), so
# they are left alone.
set -euo pipefail

PACKAGES=(
    # build: nginx headers and sg's libraries
    nginx nginx-dev libnginx-mod-mail libpcre2-dev libssl-dev zlib1g-dev
    libpq-dev libhiredis-dev libjansson-dev libcurl4-openssl-dev
    libunbound-dev pkg-config gcc libc6-dev make
    # tools used by make run, the tests and the README's examples
    curl
    # services of an instance
    postgresql-15 redis-server openssl ca-certificates
    # tests and tools (Debian's /usr/bin/python3)
    python3 python3-pytest python3-psycopg2 python3-redis python3-requests
    python3-cryptography python3-yaml
    swaks dnsmasq-base
    # the MTA-STS peer (tests/integration/test_mta_sts_peer.py) and the
    # benchmark bench/sts_bench.py: mta-sts-query and mta-sts-daemon
    postfix-mta-sts-resolver
)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing+=("$p")
    fi
done

[ ${#missing[@]} -eq 0 ] && exit 0

echo "deps: installing ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        SUDO=(sudo)
    else
        echo "deps: missing packages: ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
else
    SUDO=()
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${SUDO[@]}" apt-get update -qq &&
       "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
       >"$log" 2>&1; then
    cat "$log" >&2
    echo "deps: apt-get could not install: ${missing[*]}" >&2
    exit 1
fi
echo "deps: installed ${missing[*]}"
