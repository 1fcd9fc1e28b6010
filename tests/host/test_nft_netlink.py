"""Small nftables transactions over netlink (plugins/kernel/nft_netlink.py)
against the real kernel: every rule shape the datapath writes compiles to the
bytecode nft itself writes (expression for expression, as the kernel dumps
them back), partial syncs go over netlink and serve traffic, and a refused
batch commits nothing and names the statement."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import Node
from factories import endpoint, service, slice_
from netns import Topology, sh
from test_nftables_sync import HTTP, every_kind, rendered

from svcproxy.bus import EventType
from svcproxy.plugins.kernel import nft_netlink
from svcproxy.plugins.kernel.nftables import NftKernel, parse_table
from svcproxy.plugins.kernel.tools import KernelError
from svcproxy.plugins.nftables import nft_options
from svcproxy.plugins.nftables.datapath import Transaction, desired_table, render_blocks
from svcproxy.plugins.nftables.rules import NftOptions, skeleton

#: local-traffic detectors whose rules encode differently: a prefix on a byte
#: boundary loads only its bytes, one off it loads the address and masks it,
#: an interface name is padded, a wildcard compares its prefix
DETECTORS = {4: [("saddr", "10.244.0.0/16"), ("saddr", "10.240.0.0/12"),
                 ("iifname", "cbr0"), ("iifname", "veth*")],
             6: [("saddr", "fd00:244::/48"), ("saddr", "fd00:240::/28")]}


def _texts(opts: NftOptions, plan: object, prefix: str) -> tuple[str, str, str, set[str]]:
    """(the whole table as one nft -f text; the same table with every service
    port's chains empty and none of their elements; those rules and elements
    as statements; the chains whose rules the compiler does not take)."""
    blocks = render_blocks(plan, None, opts)  # type: ignore[arg-type]
    desired = desired_table(blocks, opts)
    fixed = set(skeleton(opts).chains)
    whole, shell, body = Transaction(prefix), Transaction(prefix), Transaction(prefix)
    for tx in (whole, shell):
        tx.add_table()
        for name, decl in desired.sets.items():
            tx.add_set(name, decl)
    whole.elements(desired.elements, ())
    shell.elements({k: v for k, v in desired.elements.items() if k[0] == "nodeport-ips"}, ())
    body.elements({k: v for k, v in desired.elements.items() if k[0] != "nodeport-ips"}, ())
    refused: set[str] = set()
    for name, chain in desired.chains.items():
        whole.write_chain(name, chain, exists=False)
        if name in fixed:
            shell.write_chain(name, chain, exists=False)
            continue
        try:
            for rule in chain[1]:
                nft_netlink.encode_rule(opts.family, rule)
        except nft_netlink.Unsupported:
            refused.add(name)
            shell.write_chain(name, chain, exists=False)
            continue
        shell.write_chain(name, (chain[0], ()), exists=False)
        body.rules.extend(f"add rule {prefix} {name} {rule}" for rule in chain[1])
    return whole.text(), shell.text(), "\n".join([*body.rules, *body.element_adds]) + "\n", \
        refused


def test_every_rule_shape_compiles_to_the_bytecode_nft_writes(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    eps6 = [endpoint("fd00:244:1::11", "node-a"), endpoint("fd00:244:2::12", "node-b")]
    for name, extra in (("web6", {"type": "NodePort", "externalTrafficPolicy": "Local"}),
                        ("sticky6", {"sessionAffinity": "ClientIP"})):
        n.publish(service(name, cluster_ip=["10.96.1.10", "fd00:96::1:10"] if name == "web6"
                          else ["10.96.1.20", "fd00:96::1:20"],
                          ports=[{**HTTP[0], "nodePort": 30610}] if name == "web6" else HTTP,
                          **extra))
        n.publish(slice_(name, name=f"{name}-6", address_type="IPv6", endpoints=eps6))
    plan = n.plan()
    mirror = topo._ns("mirror")
    for family, detectors in DETECTORS.items():
        word = "ip" if family == 4 else "ip6"
        for detector in detectors:
            opts = dataclasses.replace(nft_options(n.config, family, plan),
                                       local_detector=detector)
            whole, shell, body, refused = _texts(opts, plan, f"{word} kube-proxy")
            for ns in (topo.node, mirror):
                sh("nft", "delete", "table", word, "kube-proxy", netns=ns, check=False)
            sh("nft", "-f", "-", netns=topo.node, stdin=whole)
            sh("nft", "-f", "-", netns=mirror, stdin=shell)
            kernel = NftKernel(family, mirror)
            kernel.list_table()  # learns the sets' key types
            batch = nft_netlink.compile_batch(body, family, "kube-proxy", kernel.key_types.get)
            assert len(batch.messages) > 10
            nft_netlink.commit(batch, mirror)
            by_nft = nft_netlink.dump_rules(family, "kube-proxy", topo.node)
            by_netlink = nft_netlink.dump_rules(family, "kube-proxy", mirror)
            assert len(by_nft) > 25
            assert by_netlink == by_nft, (family, detector)
            listed = [sh("nft", "list", "table", word, "kube-proxy", netns=ns).stdout
                      for ns in (topo.node, mirror)]
            assert parse_table(listed[1]) == parse_table(listed[0])
            # only the firewall's anonymous set of source ranges is left to nft
            assert all(c.startswith("firewall-") for c in refused), refused
            assert bool(refused) == (family == 4)  # (the LoadBalancer is IPv4 only)


def test_partial_syncs_go_over_netlink_and_serve(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("b", "10.244.1.12")
    every_kind(n)
    n.sync()
    kernel = n.plugin.families[4].kernel
    # a new table: declarations through nft -f, then the service ports' rules
    # and elements over netlink
    assert kernel.transactions == 2 and kernel.netlink_transactions == 1
    n.publish(slice_("web", endpoints=[endpoint("10.244.1.12", "node-a")]), EventType.MODIFIED)
    n.publish(service("new", cluster_ip="10.96.0.70", ports=HTTP))
    n.publish(slice_("new", endpoints=[endpoint("10.244.1.11", "node-a")]))
    result = n.sync()
    assert not result.full
    assert kernel.netlink_transactions == 2 and kernel.transactions == 3
    assert parse_table(sh("nft", "list", "table", "ip", "kube-proxy", netns=topo.node).stdout) \
        == parse_table(rendered(n, 4))
    assert topo.answers("c1", "http", "10.96.0.10", 80, 4) == {"b": 4}
    assert topo.answers("c1", "http", "10.96.0.70", 80, 4) == {"a": 4}
    # the next full sync finds nothing to repair: what netlink wrote lists as rendered
    n.plugin.generation = None  # make it list the table
    full = n.sync(full=True)
    assert full.apply.details["ipv4"]["listed"] and full.apply.changes == 0, full.apply.details


def test_a_refused_batch_commits_nothing_and_names_the_statement(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    n.sync()
    kernel = NftKernel(4, topo.node)
    kernel.list_table()
    before = sh("nft", "list", "table", "ip", "kube-proxy", netns=topo.node).stdout
    chain = next(c for c in parse_table(before).chains if c.startswith("service-"))
    text = (f"flush chain ip kube-proxy {chain}\n"
            f"add rule ip kube-proxy {chain} goto nowhere\n")
    with pytest.raises(KernelError, match=r"nothing of it was committed.*goto nowhere"):
        kernel.run(text)
    assert kernel.transactions == 0
    assert sh("nft", "list", "table", "ip", "kube-proxy", netns=topo.node).stdout == before
