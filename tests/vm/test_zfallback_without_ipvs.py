"""With the IPVS modules made unavailable inside the VM, `svcproxy run` in IPVS
mode falls back to the nftables datapath, says why, and serves traffic; when
the modules come back, the running proxy's DatapathWatch switches to IPVS,
and the connections nftables set up keep answering.

The module is unloaded and loading is blocked (the kernel's modprobe helper
set to /bin/false, userspace modprobe pointed at an empty module tree), then
everything is put back. The file name sorts last so the VM tier's other
tests never run without IPVS even if putting it back failed."""

from __future__ import annotations

import gc
import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from factories import ProxyHarness, config_text, endpoint, node, run_cli, service, slice_
from netns import Topology

NODE_IP = "192.168.100.1"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
MODPROBE = Path("/proc/sys/kernel/modprobe")
#: a throwaway table using every expression the nftables datapath writes, so
#: their modules are loaded before module loading is blocked
NFT_MODULES = """\
add table ip warm
add chain ip warm nat { type nat hook prerouting priority -100 ; }
add chain ip warm post { type nat hook postrouting priority 100 ; }
add chain ip warm filter { type filter hook input priority -110 ; }
add set ip warm s { type ipv4_addr . ipv4_addr ; }
add set ip warm aff { type ipv4_addr ; size 65535 ; flags dynamic,timeout ; timeout 1m ; }
add rule ip warm nat fib daddr type local meta l4proto . th dport vmap { tcp . 1 : drop }
add rule ip warm nat meta l4proto tcp numgen random mod 2 0 counter dnat to 10.0.0.1:80
add rule ip warm nat update @aff { ip saddr }
add rule ip warm nat meta mark set meta mark | 0x00004000
add rule ip warm post ct status dnat ip saddr . ip daddr @s masquerade fully-random
add rule ip warm filter ct state new ip daddr 10.0.0.2 reject
delete table ip warm
"""


def ipvs_modules() -> list[str]:
    names = [line.split()[0] for line in Path("/proc/modules").read_text().splitlines()]
    # dependents first: schedulers and xt_ipvs hold ip_vs
    return sorted((n for n in names if n.startswith("ip_vs") or n == "xt_ipvs"),
                  key=lambda n: n == "ip_vs")


def unload_ipvs() -> None:
    # earlier tests' proxies may be unreachable but not yet collected: their
    # netlink sockets keep their namespaces, and so the virtual servers in
    # them, alive
    gc.collect()
    deadline = time.monotonic() + 60
    while True:
        mods = ipvs_modules()
        if not mods:
            return
        proc = subprocess.run(["modprobe", "-r", *mods], capture_output=True, text=True)
        if proc.returncode == 0 and not ipvs_modules():
            return
        if time.monotonic() > deadline:  # namespaces of earlier tests still exiting?
            raise AssertionError(f"cannot unload {mods}: {proc.stderr.strip()}")
        time.sleep(1)


def test_nftables_takes_over_without_ipvs_modules_and_ipvs_when_they_return(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    manifests = tmp_path / "cluster"
    manifests.mkdir()
    (manifests / "all.yaml").write_text(yaml.safe_dump_all([
        node("node-a", ips=[NODE_IP]),
        service("web", cluster_ip="10.96.0.10", type="NodePort",
                ports=[{**HTTP[0], "nodePort": 30080}]),
        slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                                 endpoint("10.244.2.12", "node-b")])]))
    config = tmp_path / "config.yaml"
    status = tmp_path / "status.json"
    old_helper = MODPROBE.read_text().strip()
    topo = Topology()
    try:
        topo.create_node()
        topo.add_client("c1", "192.168.100.2", NODE_IP)
        topo.add_pod("a", "10.244.1.11")
        topo.add_pod("b", "10.244.2.12")
        # the iptables datapath's own modules load now, while loading still works
        # (in-process: a Python start costs seconds under emulation)
        warm = ProxyHarness(textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: iptables
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            disable: [metrics, conntrack, metallb]
            datapaths: [iptables]
            datapathOptions: {{iptables: {{netns: {topo.node}}}}}
        """), "iptables", [NODE_IP])
        for obj in yaml.safe_load_all((manifests / "all.yaml").read_text()):
            warm.publish(obj)
        warm.sync()
        assert warm.host.cleanup()
        # and the nftables datapath's (numgen, fib, ct, reject, masquerade, dnat)
        subprocess.run(["ip", "netns", "exec", topo.node, "nft", "-f", "-"], check=True,
                       text=True, input=NFT_MODULES)

        unload_ipvs()
        MODPROBE.write_text("/bin/false\n")
        config.write_text(config_text(
            {"mode": "ipvs", "metricsBindAddress": "", "healthzBindAddress": ""},
            datapathOptions={"ipvs": {"netns": topo.node,
                                      "sysctlBackup": str(tmp_path / "sysctl.json")},
                             "iptables": {"netns": topo.node},
                             "nftables": {"netns": topo.node}}))
        # `svcproxy run` in this process (run_cli: a Python start costs tens of
        # seconds under emulation); svcproxy's modprobe finds no modules
        monkeypatch.setenv("MODPROBE_OPTIONS", "--dirname=/nonexistent")
        code, _ = run_cli("run", "--once", "--manifests", str(manifests), "--config",
                          str(config), "--status-file", str(status), "--status-socket", "")
        monkeypatch.delenv("MODPROBE_OPTIONS")
        assert code == 0
        assert not Path("/sys/module/ip_vs").exists()
        # what run logged (its logging setup writes to stderr, not to caplog)
        (line,) = [x for x in capfd.readouterr().err.splitlines() if "datapath unusable" in x]
        assert "ipvs datapath unusable: the ip_vs kernel module is not loaded and cannot " \
               "be loaded" in line and line.endswith("; using nftables")
        recorded = json.loads(status.read_text())
        assert recorded["datapath"] == "nftables"
        (fallback,) = recorded["fallbacks"]
        assert fallback["datapath"] == "ipvs" and "cannot be loaded" in fallback["reason"]
        # the random choice: 16 tries miss one of two backends 1 in 30,000
        assert topo.answers("c1", "http", NODE_IP, 30080, 16).keys() == {"a", "b"}
        assert topo.answers("c1", "http", "10.96.0.10", 80, 16).keys() == {"a", "b"}

        # the modules come back while svcproxy runs (in-process: the proxy and
        # the DatapathWatch `run` starts, without its signal handling)
        from svcproxy.cli import DatapathWatch
        from svcproxy.config import parse_config
        from svcproxy.manager import PluginHost
        from svcproxy.proxy import Proxy

        host = PluginHost(parse_config(config.read_text(), str(config)))
        host.configure()
        monkeypatch.setenv("MODPROBE_OPTIONS", "--dirname=/nonexistent")
        name, _ = host.select_datapath()
        assert name == "nftables"
        proxy = Proxy(host.config, host, "node-a", name, use_host_addresses=False)
        for obj in yaml.safe_load_all((manifests / "all.yaml").read_text()):
            from svcproxy.bus import Event, EventType
            from svcproxy.model import parse_object

            proxy.bus.publish(Event(EventType.ADDED, parse_object(obj)))
        assert proxy.sync().ok
        held = topo.hold("c1", "10.96.0.10", 80)
        watch = DatapathWatch(host, proxy, 60.0)
        assert watch.check() is None  # IPVS still unavailable
        monkeypatch.delenv("MODPROBE_OPTIONS")
        MODPROBE.write_text(old_helper + "\n")
        assert watch.check() == "ipvs"  # its probe loads the modules again
        result = proxy.sync()
        assert result.ok and result.full and result.datapath == "ipvs"
        assert held.again()["second"] == held.first  # nftables' NAT, kept by conntrack
        assert "kube-proxy" not in subprocess.run(
            ["ip", "netns", "exec", topo.node, "nft", "list", "tables"],
            capture_output=True, text=True).stdout  # retired once IPVS served
        vs = subprocess.run(["ip", "netns", "exec", topo.node, "ipvsadm", "-S", "-n"],
                            capture_output=True, text=True).stdout
        assert "-A -t 10.96.0.10:80" in vs
        assert topo.answers("c1", "http", "10.96.0.10", 80, 16).keys() == {"a", "b"}
        host.cleanup()
    finally:
        MODPROBE.write_text(old_helper + "\n")
        subprocess.run(["modprobe", "ip_vs"], check=False)
        topo.close()
    assert Path("/sys/module/ip_vs").exists()
