#!/usr/bin/env bash
# The main job on the bundled example cluster (root):
#   1. the dry run: what svcproxy will program for node-a;
#   2. svcproxy run --once on a throwaway "node" network namespace with the
#      example config (mode: ipvs). On a kernel without IPVS the log says why
#      and the fallback (nftables, else iptables) programs the rules;
#   3. what landed in the kernel and the status file; then everything is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
svcproxy=.venv/bin/svcproxy
ns="svcproxy-example-$$"
tmp=$(mktemp -d)
cleanup() { ip netns del "$ns" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

echo "== svcproxy plan --manifests examples/cluster --config examples/config.yaml"
$svcproxy plan --manifests examples/cluster --config examples/config.yaml
echo
echo "== svcproxy run --once (in network namespace $ns)"
ip netns add "$ns"
ip netns exec "$ns" $svcproxy run --once --manifests examples/cluster \
    --config examples/config.yaml --status-file "$tmp/status.json"
echo
echo "== status file"
cat "$tmp/status.json"
echo
datapath=$(sed -n 's/.*"datapath": "\([a-z]*\)".*/\1/p' "$tmp/status.json" | head -1)
if [ "$datapath" = nftables ]; then
    echo "== what the kernel holds: the dispatch map (nft list map ip kube-proxy service-ips)"
    ip netns exec "$ns" nft list map ip kube-proxy service-ips
    echo
    echo "== chains svcproxy wrote: $(ip netns exec "$ns" nft list chains ip | grep -c 'chain ') (IPv4), $(ip netns exec "$ns" nft list chains ip6 | grep -c 'chain ') (IPv6)"
else
    echo "== what the kernel holds: nat KUBE-SERVICES (iptables-save)"
    ip netns exec "$ns" iptables-save -t nat | grep -E '^-A KUBE-SERVICES' || true
    echo
    echo "== rules svcproxy wrote: $(ip netns exec "$ns" iptables-save | grep -c '^-A KUBE-') (IPv4), $(ip netns exec "$ns" ip6tables-save | grep -c '^-A KUBE-') (IPv6)"
fi
