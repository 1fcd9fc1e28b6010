#!/bin/bash
# Runs inside the virtme-ng guest as its --exec command. The host has no udev,
# so virtme-ng's init cannot find its virtio-serial ports by name; find them
# here, point the exit-status port where the init writes it, and run the given
# command with stdout/stderr on the host's pipes (docs/architecture.md, "Testing").
set -u
declare -A port
for d in /sys/class/virtio-ports/*; do
    [ -r "$d/name" ] && port[$(cat "$d/name")]=/dev/$(basename "$d")
done
mkdir -p /dev/virtio-ports
[ -n "${port[virtme.ret]:-}" ] && ln -sf "${port[virtme.ret]}" /dev/virtio-ports/virtme.ret
out=${port[virtme.stdout]:-/dev/console}
err=${port[virtme.stderr]:-/dev/console}
"$@" > "$out" 2> "$err"
