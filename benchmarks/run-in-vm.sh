#!/usr/bin/env bash
# Run a benchmark script inside the virtme-ng VM (real IPVS kernel), from a
# clean boot. Usage: benchmarks/run-in-vm.sh benchmarks/ipvs_sync.py [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=$(scripts/vm-prepare.sh | tail -1)
export PATH="$PWD/.cache/vng-venv/bin:$PATH"
printf -v args '%q ' "$@"
vng --disable-kvm --force-9p -r "$kernel" --memory 4G --cpus 2 --cwd "$PWD" \
    --exec "bash scripts/vm-guest-wrap.sh bash -c 'modprobe ip_vs; .venv/bin/python $args'" \
    < /dev/null > >(cat) 2> >(cat >&2)
