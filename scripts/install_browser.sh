#!/usr/bin/env bash
# Debian's chromium and chromium-driver for the report pages' browser tests.
#
# Idempotent: returns at once when both binaries are there. Another apt/dpkg run holding
# the lock (unattended upgrades, a parallel install) is waited for, not failed on.
# Needs root (or sudo) and Debian's package archive; nothing else is downloaded.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver

if [[ -x $CHROMIUM && -x $DRIVER ]]; then
    exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo -n)
fi

# apt-get's own lock wait (apt >= 1.9) plus a retry loop for the window between runs.
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q)

retry() {
    local n
    for n in 1 2 3 4 5; do
        if "$@"; then
            return 0
        fi
        echo "install_browser: '$*' failed (try $n); retrying in 10 s" >&2
        sleep 10
    done
    return 1
}

if ! apt-cache policy chromium-driver 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    retry "${APT[@]}" update
fi
retry "${APT[@]}" install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core

"$CHROMIUM" --version
"$DRIVER" --version
