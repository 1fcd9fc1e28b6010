"""The batched ipset netlink writer against the host kernel's ipset (in a
namespace made here): members of every set type kube-proxy's IPVS mode uses,
in both families, read back with `ipset save`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from netns import ipset_save

from svcproxy.plugins.kernel.ipset import IpsetNetlink, member_data
from svcproxy.plugins.kernel.netns import opened_in

SETS = """\
create PORT hash:ip,port family inet hashsize 1024 maxelem 65536
create LOOP hash:ip,port,ip family inet hashsize 1024 maxelem 65536
create CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536
create NP bitmap:port range 0-65535
create IPS hash:ip family inet hashsize 1024 maxelem 65536
create PORT6 hash:ip,port family inet6 hashsize 1024 maxelem 65536
create CIDR6 hash:ip,port,net family inet6 hashsize 1024 maxelem 65536
"""


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"svpipset{id(SETS) % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ipset", "restore"], input=SETS,
                       text=True, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def saved(ns: str) -> dict[str, set[str]]:
    """What `ipset save` says is there (the independent view)."""
    return ipset_save(ns)


def test_members_of_every_type_read_back_as_written(ns: str) -> None:
    nl = opened_in(ns, IpsetNetlink)
    try:
        v4 = [("PORT", "10.96.0.1,tcp:443"), ("PORT", "10.96.0.10,udp:53"),
              ("PORT", "10.96.0.90,sctp:90"), ("LOOP", "10.244.1.5,tcp:8080,10.244.1.5"),
              ("CIDR", "203.0.113.10,tcp:80,198.51.100.0/24"), ("NP", "30080"),
              ("NP", "32000"), ("IPS", "10.96.0.1")]
        assert nl.write(v4, [], 4) == []
        assert nl.write([("PORT6", "fd00:96::10,tcp:80"),
                         ("CIDR6", "fd00::7,udp:53,fd00:1::/64")], [], 6) == []
        want = {"PORT": {"10.96.0.1,tcp:443", "10.96.0.10,udp:53", "10.96.0.90,sctp:90"},
                "LOOP": {"10.244.1.5,tcp:8080,10.244.1.5"},
                "CIDR": {"203.0.113.10,tcp:80,198.51.100.0/24"}, "NP": {"30080", "32000"},
                "IPS": {"10.96.0.1"}, "PORT6": {"fd00:96::10,tcp:80"},
                "CIDR6": {"fd00::7,udp:53,fd00:1::/64"}}
        assert saved(ns) == want
        # like `ipset -exist`: adding what is there and deleting what is not are fine
        assert nl.write([("PORT", "10.96.0.1,tcp:443")], [("IPS", "10.0.0.9"),
                                                          ("NP", "30080")], 4) == []
        want["NP"] = {"32000"}
        assert saved(ns) == want
        # a refusal names the operation, set and member
        (failure,) = nl.write([("MISSING", "10.0.0.1")], [], 4)
        assert str(failure).startswith("add MISSING 10.0.0.1: ")
    finally:
        nl.close()


def test_refusals_in_a_large_batch_are_each_reported(ns: str) -> None:
    """Only refusals and the last message are answered (send_batch): a batch of
    many sends reports exactly the refused members, wherever they are (first,
    middle, last), and everything else lands."""
    nl = opened_in(ns, IpsetNetlink)
    nl.SEND_CHUNK = 4096  # many sends, with refusals read between them
    try:
        good = [("IPS", f"10.{i // 250}.{i % 250}.1") for i in range(3000)]
        bad = {0, 1234, 1235, 2999}
        batch = [("MISSING", m) if i in bad else (s, m) for i, (s, m) in enumerate(good)]
        failures = nl.write(batch, [], 4)
        assert sorted(f.member for f in failures) == sorted(good[i][1] for i in bad)
        assert all(f.set_name == "MISSING" and f.op == "add" for f in failures)
        assert saved(ns)["IPS"] == {m for i, (_, m) in enumerate(good) if i not in bad}
        # a member the kernel refuses in the middle of one set's members (sent
        # together): exactly that one is reported, the others land
        port = [f"10.96.1.{i},tcp:80" for i in range(1, 100)]
        port[50] = "fd00::1,tcp:80"  # an IPv6 member in an IPv4 set
        (failure,) = nl.write([("PORT", m) for m in port], [], 4)
        assert (failure.op, failure.set_name, failure.member) == ("add", "PORT", port[50])
        assert saved(ns)["PORT"] == set(port) - {port[50]}
        # a batch whose only (so last) message is refused, then a clean one
        assert len(nl.write([], [("MISSING", "10.0.0.1")], 4)) == 1
        assert nl.write([], [("IPS", m) for _, m in good], 4) == []
        assert "IPS" in saved(ns) and not saved(ns)["IPS"]
    finally:
        nl.close()


def test_sets_read_back_through_netlink_as_svcproxy_writes_them(ns: str) -> None:
    """The netlink dump (full syncs read the sets with it, not `ipset save`,
    which looks every protocol number up through NSS) gives members in the text
    svcproxy renders: the same as `ipset save`, except that a network keeps its
    prefix length even when it is a single address."""
    nl = opened_in(ns, IpsetNetlink)
    try:
        members = [("PORT", "10.96.0.1,tcp:443"), ("PORT", "10.96.0.10,udp:53"),
                   ("PORT", "10.96.0.90,sctp:90"), ("LOOP", "10.244.1.5,tcp:8080,10.244.1.5"),
                   ("CIDR", "203.0.113.10,tcp:80,198.51.100.0/24"),
                   ("CIDR", "203.0.113.10,tcp:80,198.51.100.7/32"), ("NP", "30080"),
                   ("IPS", "10.96.0.1")] + [("IPS", f"10.97.{i // 250}.{i % 250}")
                                           for i in range(3000)]  # many dump messages
        assert nl.write(members, [], 4) == []
        assert nl.write([("PORT6", "fd00:96::10,tcp:80"),
                         ("CIDR6", "fd00::7,udp:53,fd00:1::/64")], [], 6) == []
        got = nl.read(lambda name: name != "LOOP")
        want: dict[str, set[str]] = {}
        for name, member in [*members, ("PORT6", "fd00:96::10,tcp:80"),
                             ("CIDR6", "fd00::7,udp:53,fd00:1::/64")]:
            want.setdefault(name, set()).add(member)
        want["LOOP"] = set()  # not asked for: the name only
        assert got == want
        independent = saved(ns)
        independent["CIDR"] = {m.replace(",198.51.100.7", ",198.51.100.7/32")
                               for m in independent["CIDR"]}
        independent["LOOP"] = set()
        assert got == independent
    finally:
        nl.close()


def test_bad_member_text_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown protocol"):
        member_data("10.0.0.1,icmp:0")


def test_sets_are_destroyed_in_one_batch_except_one_a_rule_uses(ns: str) -> None:
    """Ipset.destroy (cleanup's): every named set goes but the one an iptables
    rule matches on, which the kernel refuses by name and keeps; sets not named
    stay."""
    from svcproxy.plugins.kernel.ipset import Ipset, IpsetFailure

    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-m", "set",
                    "--match-set", "IPS", "src", "-j", "ACCEPT"], check=True)
    door = Ipset(ns)
    try:
        refused = door.destroy(["PORT", "LOOP", "IPS", "PORT6"])
    finally:
        door.close()
    assert {name: IpsetFailure.describe(code) for name, code in refused.items()} \
        == {"IPS": "the set is in use"}
    assert set(saved(ns)) == {"CIDR", "NP", "IPS", "CIDR6"}


def _headers(ns: str) -> dict[str, tuple[str, str, str]]:
    """{set: (type, revision, header without initval)} as `ipset list -t` says."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ipset", "list", "-t"], text=True,
                         capture_output=True, check=True).stdout
    found: dict[str, tuple[str, str, str]] = {}
    for block in out.strip().split("\n\n"):
        f = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        header = " ".join(w for w in f["Header"].split() if not w.startswith("0x"))
        found[f["Name"]] = (f["Type"], f["Revision"], header.replace(" initval", ""))
    return found


def test_sets_created_over_netlink_are_what_ipset_restore_makes() -> None:
    """Ipset.create (the IPVS datapath's, at a new node's first write) against
    `ipset restore` of the same lines in another namespace: the same type,
    revision and header for every set type and family kube-proxy uses; again
    is a no-op (-exist); a clash and an unknown type are named."""
    from svcproxy.plugins.ipvs.helpers import SETS as IPVS_SETS
    from svcproxy.plugins.ipvs.helpers import set_name, set_specs
    from svcproxy.plugins.kernel.ipset import Ipset, SetSpec
    from svcproxy.plugins.kernel.tools import KernelError

    names = {4: list(IPVS_SETS), 6: [set_name(n, 6) for n in IPVS_SETS]}
    specs = [s for fam, ns_names in names.items() for s in set_specs(ns_names, fam)]
    made, tool = "svpipsetnl", "svpipsettool"
    for ns in (made, tool):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    door = Ipset(made)
    try:
        subprocess.run(["ip", "netns", "exec", tool, "ipset", "restore"],
                       input="".join(s.text() + "\n" for s in specs), text=True, check=True)
        door.create(specs)
        want = _headers(tool)
        assert len(want) == len(specs) and _headers(made) == want
        door.create(specs[:3])  # there alike: fine
        with pytest.raises(KernelError, match=r"KUBE-CLUSTER-IP: a set of that name is "
                                              r"there, of another type"):
            door.create([SetSpec("KUBE-CLUSTER-IP", "hash:ip,port,ip")])
        with pytest.raises(KernelError, match="no set type hash:nothing"):
            door.create([SetSpec("X", "hash:nothing")])
        assert _headers(made) == want
    finally:
        door.close()
        for ns in (made, tool):
            subprocess.run(["ip", "netns", "del", ns], check=False)
