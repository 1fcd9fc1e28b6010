"""IPVS netlink message packing and parsing without a kernel: what svcproxy
writes parses back the same, through the lean dump parser full syncs use and
the general one `svcproxy status` uses. (The VM tier checks both against a real
IPVS table.)"""

from __future__ import annotations

import struct

import pytest

from svcproxy.plugins.ipvs import netlink as nl


@pytest.mark.parametrize("address", ["10.244.1.5", "fd00:244::5"])
def test_real_servers_parse_back_through_both_parsers(address: str) -> None:
    rs = nl.RealServer(address, 8080, weight=3)
    packed = nl._dest_full(rs)  # a CMD_ATTR_DEST as svcproxy sends it
    # the kernel adds the connection counters when it answers a dump
    counters = b"".join(nl._attr(kind, struct.pack("=I", value)) for kind, value in (
        (nl.DEST_ACTIVE_CONNS, 7), (nl.DEST_INACT_CONNS, 2), (nl.DEST_PERSIST_CONNS, 1)))
    body = packed[4:] + counters
    family = 10 if ":" in address else 2
    lean = nl._dest_at(body, 0, len(body), family, nl._U32.unpack_from, nl._BE16.unpack_from)
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


def test_proc_ip_vs_listing_parses_into_real_servers() -> None:
    """/proc/net/ip_vs as the kernel prints it (ip_vs_info_seq_show): full syncs
    read real servers from it in one go. The VM tier compares it with netlink."""
    from svcproxy.plugins.ipvs.kernel import parse_proc_ip_vs

    text = (
        "IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n"
        "TCP  0A600001:0050 rr \n"
        "  -> 0AF40105:1F90      Masq    1      3          0         \n"
        "  -> 0AF40206:1F90      Masq    0      0          2         \n"
        "FWM  00000010 rr \n"
        "  -> 0AF40107:0050      Route   1      0          0         \n"
        "UDP  [fd00:0096:0000:0000:0000:0000:0000:000a]:0035 mh persistent 300 FFFFFFFF\n"
        "  -> [fd00:0244:0000:0000:0000:0000:0000:0011]:14E9    Masq    1      0          0  \n"
        "SCTP 0A60005A:005A rr \n")
    got = parse_proc_ip_vs(text.splitlines(keepends=True))
    assert got == {
        ("10.96.0.1", 80, "TCP"): [nl.RealServer("10.244.1.5", 8080, 1),
                                   nl.RealServer("10.244.2.6", 8080, 0)],
        ("fd00:96::a", 53, "UDP"): [nl.RealServer("fd00:244::11", 5353, 1)],
        ("10.96.0.90", 90, "SCTP"): []}
    first, second = got[("10.96.0.1", 80, "TCP")]
    assert (first.active, first.inactive, second.inactive) == (3, 0, 2)
