#!/usr/bin/env bash
# Install the Debian packages svcproxy and its tests need, when missing.
# Safe to run repeatedly; does nothing when everything is present.
set -euo pipefail

packages=(python3 python3-venv iptables ipset ipvsadm conntrack iproute2 nftables kmod qemu-system-x86 busybox-static prometheus)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        # a python3 from elsewhere (pyenv) with venv support is fine too
        if [[ $p == python3 || $p == python3-venv ]] && python3 -c 'import venv, ensurepip' 2>/dev/null; then
            continue
        fi
        missing+=("$p")
    fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
