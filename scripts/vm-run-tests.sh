#!/bin/bash
# Inside the guest: the VM test tier, with a hard timeout so a hung test still
# powers the VM off. $1 = a directory shared with the host for results.
set -u
cd "$(dirname "$0")/.."
results=${1:-/tmp}
export SVCPROXY_IN_VM=1 PYTHONDONTWRITEBYTECODE=1
modprobe ip_vs 2>/dev/null
timeout 1200 .venv/bin/pytest tests/vm -q -p no:cacheprovider -o addopts="" \
    --junitxml="$results/vm-junit.xml" "${@:2}"
