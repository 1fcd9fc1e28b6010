#!/usr/bin/env bash
# Run a benchmark script inside the virtme-ng VM (real IPVS kernel), from a
# clean boot. Usage: benchmarks/run-in-vm.sh benchmarks/ipvs_sync.py [ARGS...]
# The repository is read-only inside; RWDIR=DIR makes DIR writable there (for
# a benchmark that writes a file, e.g. nftables_sync.py --latency-json).
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=$(scripts/vm-prepare.sh | tail -1)
export PATH="$PWD/.cache/vng-venv/bin:$PATH"
printf -v args '%q ' "$@"
rw=()
if [ -n "${RWDIR:-}" ]; then mkdir -p "$RWDIR"; rw=(--rwdir "$RWDIR"); fi
vng --disable-kvm --force-9p -r "$kernel" --memory 4G --cpus 2 --cwd "$PWD" "${rw[@]}" \
    --exec "bash scripts/vm-guest-wrap.sh bash -c 'modprobe ip_vs; .venv/bin/python $args'" \
    < /dev/null > >(cat) 2> >(cat >&2)
