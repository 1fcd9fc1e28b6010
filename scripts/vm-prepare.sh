#!/usr/bin/env bash
# Prepare what the VM test tier needs, once, under .cache/ (docs/architecture.md, "Testing"):
# the Debian kernel with its modules (unpacked, depmod'ed) and virtme-ng.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=.cache
mkdir -p "$cache/kernel"
if [ ! -x "$cache/vng-venv/bin/vng" ]; then
    python3 -m venv "$cache/vng-venv"
    "$cache/vng-venv/bin/pip" install -q virtme-ng
fi
if ! ls "$cache"/kernel/root/boot/vmlinuz-* >/dev/null 2>&1; then
    apt-get update -qq || true
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$pkg" ] || { echo "vm-prepare: cannot resolve the linux-image-amd64 package" >&2; exit 1; }
    (cd "$cache/kernel" && apt-get download "$pkg" 2>/dev/null)
    dpkg -x "$cache"/kernel/"$pkg"_*.deb "$cache/kernel/root"
    rm -f "$cache"/kernel/"$pkg"_*.deb
    version=$(ls "$cache/kernel/root/lib/modules")
    depmod -b "$cache/kernel/root" "$version"
fi
ls "$cache"/kernel/root/boot/vmlinuz-* | head -1
