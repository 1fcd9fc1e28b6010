"""The IPVS datapath's start-up warm-up against the host kernel's ipset and
iptables (in a namespace made here; no IPVS needed): while the initial lists
load it detects the helper rules' iptables backend and has the kernel load
every helper set type, and it writes nothing in the namespace; the
early masquerade still runs at the first write."""

from __future__ import annotations

import subprocess

from svcproxy.config import Config
from svcproxy.plugins.ipvs import IpvsPlugin
from svcproxy.plugins.ipvs.helpers import SETS
from svcproxy.plugins.kernel.ipset import Ipset
from svcproxy.plugins.kernel.iptables import IptablesKernel


def test_warm_up_prepares_and_touches_nothing() -> None:
    ns = "svpwarmup"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    plugin = IpvsPlugin()
    try:
        def state() -> tuple[str, str]:
            sets = subprocess.run(["ip", "netns", "exec", ns, "ipset", "list", "-n"],
                                  capture_output=True, text=True, check=True).stdout
            rules = "".join(subprocess.run(
                ["ip", "netns", "exec", ns, tool], capture_output=True, text=True,
                check=True).stdout for tool in ("iptables-legacy-save", "iptables-nft-save"))
            return sets, "\n".join(line for line in rules.splitlines()
                                   if not line.startswith("#"))

        before = state()
        plugin.svcproxy_configure_plugin(Config(), {"netns": ns})
        plugin.svcproxy_start_proxy("ipvs")
        assert plugin._warming is not None
        plugin._warmed()
        helper = plugin.helpers[4]
        assert isinstance(helper.ipt, IptablesKernel) and helper.ipt.backend in ("legacy", "nft")
        assert isinstance(helper.ipset, Ipset)
        revisions = helper.ipset._netlink().revisions
        assert {t for t, _ in revisions} == {kind for kind, _ in SETS.values()}
        assert all(r > 0 for r in revisions.values())
        assert state() == before  # nothing written to the namespace
        assert not plugin.early_done  # the first write still masquerades early
        # and the plugin is not stopped from using its helpers afterwards
        assert plugin._helper(4) is helper and plugin._warming is None
    finally:
        for helper in plugin.helpers.values():
            if isinstance(helper.ipset, Ipset):
                helper.ipset.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_warm_up_only_for_the_ipvs_datapath() -> None:
    plugin = IpvsPlugin()
    plugin.svcproxy_start_proxy("iptables")
    assert plugin._warming is None and plugin.helpers == {}


def test_check_restore_builds_without_committing() -> None:
    """IptablesKernel.check_restore (`iptables-restore --test`, the warm-up's):
    good input leaves the namespace as it was, bad input is refused naming
    the line."""
    import pytest

    from svcproxy.plugins.kernel.iptables import detect_backend
    from svcproxy.plugins.kernel.tools import KernelError

    ns = "svpcheckrestore"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ipt = IptablesKernel(4, detect_backend(4, ns)[0], ns)
        ipt.check_restore("*nat\n:KUBE-X - [0:0]\n-A KUBE-X -j MASQUERADE\n"
                          "-I POSTROUTING 1 -j KUBE-X\nCOMMIT\n")
        assert ("nat", "KUBE-X") not in ipt.save_all()
        with pytest.raises(KernelError, match="input line 3"):
            ipt.check_restore("*nat\n:KUBE-X - [0:0]\n"
                              "-A KUBE-X -m no-such-match -j RETURN\nCOMMIT\n")
        assert ipt.restores == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
