#!/bin/bash
# Inside the guest: the VM test tier, with a hard timeout so a hung test still
# powers the VM off. $1 = a directory shared with the host for results;
# then --with-host-tests to run first the host tests that take the IPVS path
# where the kernel has IPVS (the demo, `svcproxy check`): the suite shown to
# pass on a machine with IPVS as well as on one without. They take 6 minutes
# under emulation, so `make test` leaves them out; SVCPROXY_VM_HOST_TESTS=1
# make test runs them (tests/host/vm_tier.py passes the flag); the rest goes to
# pytest.
set -u
cd "$(dirname "$0")/.."
results=${1:-/tmp}
shift
export SVCPROXY_IN_VM=1 PYTHONDONTWRITEBYTECODE=1
modprobe ip_vs 2>/dev/null
host=0
if [ "${1:-}" = "--with-host-tests" ]; then
    shift
    # a run of their own: tests/host and tests/vm each have a conftest module
    # of the same name
    timeout 900 .venv/bin/pytest tests/host/test_demo.py \
        tests/host/test_status_check.py::test_check_reports_the_missing_ipvs_module \
        -q -p no:cacheprovider -o addopts="" --junitxml="$results/host-junit.xml"
    host=$?
fi
# tests/vm, or the files after --tests (tests/host/vm_tier.py splits the tier
# between two VMs); test_zfallback_without_ipvs.py runs without the IPVS
# modules, then puts them back: it comes last
targets=tests/vm
if [ "${1:-}" = "--tests" ]; then
    targets=$2
    shift 2
fi
# shellcheck disable=SC2086  # $targets is a list of paths
timeout 2400 .venv/bin/pytest $targets -q -p no:cacheprovider -o addopts="" \
    --durations=8 --junitxml="$results/vm-junit.xml" "$@"
vm=$?
[ $host -eq 0 ] && exit $vm
exit $host
