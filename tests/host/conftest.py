"""Host tier: real iptables and conntrack inside network namespaces made here."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import vm_tier
from factories import ProxyHarness
from netns import Topology

NODE_IP = "192.168.100.1"
NODE_IP6 = "fd00:100::1"


@pytest.hookimpl(trylast=True)  # after -k / --deselect have had their say
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not (os.geteuid() == 0 and shutil.which("iptables-nft-restore")):
        skip = pytest.mark.skip(reason="host tier needs root and iptables (run `make test` "
                                       "as root)")
        for item in items:
            if "tests/host" in str(item.fspath):
                item.add_marker(skip)
        return
    # The VM tier is the long pole: start it now, in the background, and run
    # its reporting test last, after every other tier ran beside it.
    vm = [item for item in items if item.name == "test_vm_tier"]
    if vm:
        for item in vm:
            items.remove(item)
        items.extend(vm)
        vm_tier.current = vm_tier.VmTier()
        vm_tier.current.start()


def pytest_sessionfinish() -> None:
    """A run stopped early (-x, Ctrl-C) does not leave a VM behind."""
    if vm_tier.current is not None:
        vm_tier.current.close()
        vm_tier.current = None


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    try:
        t.create_node()
        t.add_client("c1", "192.168.100.2", NODE_IP, ip6="fd00:100::2", node_ip6=NODE_IP6)
        t.add_client("c2", "198.51.100.2", "198.51.100.1")
        # c2 plays the node's uplink: like a real node, the node has a default
        # route, so traffic no rule claims is routed (and then dropped by c2).
        t.set_default_route("198.51.100.2")
        yield t
    finally:
        t.close()


class Node(ProxyHarness):
    """svcproxy's core and a netfilter datapath (iptables, or nftables) running
    against the node namespace."""

    def __init__(self, topo: Topology, extra_config: str = "", backend: str = "nft",
                 start: bool = True, datapath: str = "iptables", svcproxy_config: str = "",
                 extra_plugins: list[tuple[str, Any]] | None = None) -> None:
        """`start`: start the plugins now, as `svcproxy run` does (False: the
        test starts them itself, with its own listeners). `extra_config` may
        say MODE for the configured mode's section (masqueradeAll is read from
        iptables or nftables, as in kube-proxy)."""
        extra_config = extra_config.replace("MODE:", f"{datapath}:")
        extra_config = extra_config.replace("\n", "\n" + " " * 12)  # for dedent below
        text = textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: {datapath}
            clusterCIDR: 10.244.0.0/16
            {extra_config}
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            datapaths: [{datapath}]
            datapathOptions:
              iptables: {{netns: {topo.node}, backend: {backend}}}
              nftables: {{netns: {topo.node}}}
              ipvs: {{netns: {topo.node}}}
        """) + svcproxy_config
        super().__init__(text, datapath, [NODE_IP, NODE_IP6], start=start,
                         extra_plugins=extra_plugins)
        self.topo = topo

    def restores(self) -> int:
        return sum(s.kernel.restores for s in self.plugin.families.values())

    def transactions(self) -> int:
        """nftables transactions committed so far."""
        return sum(s.kernel.transactions for s in self.plugin.families.values())
