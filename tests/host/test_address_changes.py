"""kube-ipvs0 addresses through batched rtnetlink from a background thread
(plugins/ipvs/kernel.py AddressChanges), against the host kernel in a namespace
made here. The host cannot make dummy links, so the addresses go on a veth
(the messages are the same)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator

import pytest

from svcproxy.plugins.kernel.netlink import open_socket
from svcproxy.plugins.kernel.netns import opened_in
from svcproxy.plugins.kernel.rtnl import (
    _IFINFOMSG,
    RTM_DELLINK,
    AddressChanges,
    DummyLink,
    dump_addresses,
    link_index,
    rt_request,
)

NS = "svpaddrs"


def ip(*args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", NS, "ip", *args], capture_output=True,
                          text=True, check=True).stdout


@pytest.fixture
def index() -> Iterator[int]:
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
        yield int(json.loads(ip("-j", "link", "show", "va"))[0]["ifindex"])
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


def addresses() -> set[str]:
    return {a["local"] for link in json.loads(ip("-j", "addr", "show", "va"))
            for a in link.get("addr_info", ())}


def apply(sock: socket.socket, index: int, add: list[str], remove: list[str]) -> list[str]:
    changes = AddressChanges(sock, index, add, remove)
    changes.start()
    return changes.finish()


def test_addresses_added_and_removed_in_bulk(index: int) -> None:
    sock = opened_in(NS, lambda: open_socket(0))
    try:
        v4 = [f"10.96.{i // 250}.{i % 250 + 1}" for i in range(2000)]
        v6 = [f"fd00:96::{i:x}" for i in range(1, 51)]
        assert apply(sock, index, v4 + v6, []) == []
        assert addresses() == set(v4) | set(v6)
        # what svcproxy reads back (full syncs): the same, by interface index
        found = set(dump_addresses(sock))
        assert {a for i, a in found if i == index} == set(v4) | set(v6)
        assert json.loads(ip("-j", "addr", "show", "va"))[0]["addr_info"][0]["prefixlen"] == 32
        # "already there" and "not there" are what was wanted: not failures
        assert apply(sock, index, v4[:10], ["10.97.0.1", "fd00:97::1"]) == []
        assert apply(sock, index, [], v4[1000:] + v6[25:]) == []
        assert addresses() == set(v4[:1000]) | set(v6[:25])
        # a refusal names the address and the kernel's reason
        (failure,) = apply(sock, index + 100, ["10.98.0.1"], [])
        assert failure.startswith("add address 10.98.0.1 on kube-ipvs0: No such device")
    finally:
        sock.close()


def test_links_looked_up_and_deleted_by_rtnetlink(index: int) -> None:
    """kube-ipvs0 is found by name and removed (cleanup) with svcproxy's own
    rtnetlink requests; creating it (a dummy link, which this host's kernel
    cannot make) is exercised by every test of the VM tier."""
    sock = opened_in(NS, lambda: open_socket(0))
    try:
        assert link_index(sock, "va") == index
        assert link_index(sock, "kube-ipvs0") is None
        rt_request(sock, RTM_DELLINK, 0, _IFINFOMSG.pack(0, 0, index, 0, 0))
        assert link_index(sock, "va") is None and link_index(sock, "vb") is None
        with pytest.raises(OSError) as exc:
            rt_request(sock, RTM_DELLINK, 0, _IFINFOMSG.pack(0, 0, index, 0, 0))
        assert exc.value.errno == 19  # ENODEV
    finally:
        sock.close()


def test_kube_ipvs0_is_created_or_the_error_says_why(index: int) -> None:
    """Creating kube-ipvs0 needs the dummy module: where it loads (the VM tier),
    the link appears; where it cannot (this host's kernel), the error names the
    link and the module instead of a bare errno."""
    link = DummyLink(NS)
    try:
        try:
            created = link.index()
        except OSError as exc:
            assert "cannot create kube-ipvs0 (a dummy link; is the dummy kernel module " \
                   "available?)" in str(exc)
        else:
            assert created is not None and created == link.index(create=False)
    finally:
        link.close()
