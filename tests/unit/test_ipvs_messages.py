"""IPVS netlink message packing and parsing without a kernel: what svcproxy
writes parses back the same, through the lean dump parser full syncs use and
the general one `svcproxy status` uses. (The VM tier checks both against a real
IPVS table.)"""

from __future__ import annotations

import struct

import pytest

from svcproxy.plugins.kernel import ipvs as nl


@pytest.mark.parametrize("address", ["10.244.1.5", "fd00:244::5"])
def test_real_servers_parse_back_through_both_parsers(address: str) -> None:
    rs = nl.RealServer(address, 8080, weight=3)
    packed = nl._dest_full(rs)  # a CMD_ATTR_DEST as svcproxy sends it
    # the kernel adds the connection counters when it answers a dump
    counters = b"".join(nl._attr(kind, struct.pack("=I", value)) for kind, value in (
        (nl.DEST_ACTIVE_CONNS, 7), (nl.DEST_INACT_CONNS, 2), (nl.DEST_PERSIST_CONNS, 1)))
    body = packed[4:] + counters
    family = 10 if ":" in address else 2
    lean = nl._dest_at(body, 0, len(body), family)
    general = nl._parse_dest(body, family)
    assert lean == general == rs
    assert (lean.active, lean.inactive, lean.persistent) == (7, 2, 1)
    assert (general.active, general.inactive, general.persistent) == (7, 2, 1)


def test_service_messages_carry_every_field() -> None:
    vs = nl.VirtualServer("10.96.0.10", 53, "UDP", "mh", nl.F_SCHED1 | nl.F_PERSISTENT, 300)
    packed = nl._service_full(vs)
    assert nl._parse_service(packed[4:]) == vs
    six = nl.VirtualServer("fd00:96::a", 443, "SCTP", "rr")
    assert nl._parse_service(nl._service_full(six)[4:]) == six

