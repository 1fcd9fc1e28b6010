"""ipset members' netlink encoding (assembled from fixed headers) against the
attribute-by-attribute encoding it replaced, for every member shape
kube-proxy's sets hold. (tests/host/test_ipset_netlink.py writes them into
the kernel and reads them back with `ipset save`.)"""

from __future__ import annotations

import socket
import struct

import pytest

from svcproxy.plugins.kernel.ipset import (
    ATTR_CIDR2,
    ATTR_DATA,
    ATTR_IP,
    ATTR_IP2,
    ATTR_IPADDR_IPV4,
    ATTR_IPADDR_IPV6,
    ATTR_PORT,
    ATTR_PROTO,
    NLA_F_NESTED,
    NLA_F_NET_BYTEORDER,
    PROTO_NUMBERS,
    member_data,
)
from svcproxy.plugins.kernel.netlink import _attr


def _reference_ip(kind: int, address: str) -> bytes:
    six = ":" in address
    inner = _attr((ATTR_IPADDR_IPV6 if six else ATTR_IPADDR_IPV4) | NLA_F_NET_BYTEORDER,
                  socket.inet_pton(socket.AF_INET6 if six else socket.AF_INET, address))
    return _attr(kind | NLA_F_NESTED, inner)


def reference(member: str) -> bytes:
    parts = member.split(",")
    if len(parts) == 1 and parts[0].isdigit():
        return _attr(ATTR_DATA | NLA_F_NESTED,
                     _attr(ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(parts[0]))))
    attrs = [_reference_ip(ATTR_IP, parts[0])]
    if len(parts) >= 2:
        proto, _, port = parts[1].rpartition(":")
        number = PROTO_NUMBERS[proto] if not proto.isdigit() else int(proto)
        attrs.append(_attr(ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(port))))
        attrs.append(_attr(ATTR_PROTO, struct.pack("B", number)))
    if len(parts) >= 3:
        address, _, cidr = parts[2].partition("/")
        attrs.append(_reference_ip(ATTR_IP2, address))
        if cidr:
            attrs.append(_attr(ATTR_CIDR2, struct.pack("B", int(cidr))))
    return _attr(ATTR_DATA | NLA_F_NESTED, b"".join(attrs))


@pytest.mark.parametrize("member", [
    "10.96.0.1", "fd00:96::1",
    "10.96.0.1,tcp:443", "10.96.0.1,udp:53", "10.96.0.1,sctp:9", "fd00::1,tcp:65535",
    "10.244.1.5,tcp:8080,10.244.1.5", "fd00:244::5,udp:53,fd00:244::5",
    "203.0.113.10,tcp:80,198.51.100.0/24", "fd00::10,tcp:80,fd00:1::/64",
    "30080", "10.0.0.1,6:80",
])
def test_members_encode_as_before(member: str) -> None:
    assert member_data(member) == reference(member)


def test_bad_members_are_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown protocol .icmp. in ipset member"):
        member_data("10.0.0.1,icmp:0")
    with pytest.raises(OSError):
        member_data("10.0.0.999,tcp:80")
