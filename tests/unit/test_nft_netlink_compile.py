"""The nf_tables netlink compiler without a kernel: what it takes, what it
leaves to `nft -f`, how keys are laid out, and how NftKernel learns the key
types it needs. (The bytecode itself is checked against nft's in
tests/host/test_nft_netlink.py.)"""

from __future__ import annotations

import struct

import pytest

from svcproxy.plugins.kernel import nft_netlink as nn
from svcproxy.plugins.kernel.nftables import NftKernel

TYPES = {"service-ips": ("ipv4_addr", "inet_proto", "inet_service"),
         "cluster-ips": ("ipv4_addr",)}


def test_keys_are_laid_out_as_the_kernel_stores_them() -> None:
    assert nn.encode_key(TYPES["service-ips"], "10.96.0.1 . tcp . 443") == \
        bytes([10, 96, 0, 1, 6, 0, 0, 0, 0x01, 0xBB, 0, 0])
    assert nn.encode_key(("ipv4_addr",), "10.96.0.1") == bytes([10, 96, 0, 1])
    assert nn.encode_key(("inet_proto", "inet_service"), "udp . 30053") == \
        bytes([17, 0, 0, 0]) + struct.pack("!H", 30053) + b"\0\0"
    six = nn.encode_key(("ipv6_addr", "ipv6_addr"), "fd00::1 . fd00::1")
    assert len(six) == 32 and six[:2] == b"\xfd\x00" and six[15] == 1
    for bad in ("10.96.0.1 . tcp", "10.96.0.1 . icmp . 1", "10.96.0.1 . tcp . 70000",
                "fd00::1 . tcp . 80"):
        with pytest.raises(nn.Unsupported):
            nn.encode_key(TYPES["service-ips"], bad)


def test_key_types_come_from_a_declaration() -> None:
    assert nn.key_types(["type ipv4_addr . inet_proto . inet_service : verdict",
                         'comment "x"']) == TYPES["service-ips"]
    assert nn.key_types(["type ipv6_addr ;"]) == ("ipv6_addr",)
    assert nn.key_types(['comment "no type"']) is None
    assert nn.key_types(["type ipv4_addr", "flags interval"]) is None  # ranges: for nft


@pytest.mark.parametrize("statement", [
    'add table ip kube-proxy { comment "rules for kube-proxy" ; }',
    "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }",
    "add set ip kube-proxy affinity-X { type ipv4_addr ; flags dynamic,timeout ; }",
    "add rule ip kube-proxy firewall-X ip saddr != { 10.0.0.0/8, 192.0.2.1 } drop",
    "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
    "add rule ip kube-proxy mark-for-masquerade meta mark set meta mark | 0x00004000",
    "add rule ip kube-proxy X meta l4proto tcp counter packets 3 bytes 9 dnat to 10.0.0.1:80",
    "add rule ip kube-proxy X goto Y drop",
    "add rule ip6 kube-proxy X goto Y",  # the other family's table
    "add element ip kube-proxy unknown-set { 10.0.0.1 }",
    "delete table ip kube-proxy",
])
def test_what_it_leaves_to_nft(statement: str) -> None:
    with pytest.raises(nn.Unsupported):
        nn.compile_batch(statement + "\n", 4, "kube-proxy", TYPES.get)


def test_a_partial_syncs_statements_compile_one_message_each() -> None:
    text = "\n".join([
        "add chain ip kube-proxy service-X",
        "flush chain ip kube-proxy service-X",
        "add rule ip kube-proxy service-X meta l4proto tcp numgen random mod 2 0 "
        "counter packets 0 bytes 0 dnat to 10.244.1.11:8080",
        "add rule ip kube-proxy service-X meta l4proto tcp counter packets 0 bytes 0 "
        "dnat to 10.244.1.12:8080",
        'add rule ip kube-proxy external-X fib saddr type local goto service-X '
        'comment "short-circuit local traffic"',
        "delete element ip kube-proxy service-ips { 10.96.0.9 . tcp . 80 }",
        "add element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80 : goto service-X }",
        "delete chain ip kube-proxy service-old",
        "delete set ip kube-proxy affinity-old",
    ]) + "\n"
    batch = nn.compile_batch(text, 4, "kube-proxy", TYPES.get)
    assert [m[0] for m in batch.messages] == [nn.NEWCHAIN, nn.DELRULE, nn.NEWRULE, nn.NEWRULE,
                                              nn.NEWRULE, nn.DELSETELEM, nn.NEWSETELEM,
                                              nn.DELCHAIN, nn.DELSET]
    assert batch.statements == text.splitlines()
    # rules append; adds create without insisting the object is new (nft's "add")
    assert batch.messages[2][1] == nn.NLM_F_CREATE | nn.NLM_F_APPEND
    assert batch.messages[0][1] == nn.NLM_F_CREATE and batch.messages[7][1] == 0
    # the comment travels as the rule's userdata, NUL-terminated
    assert b"\x00\x1cshort-circuit local traffic\x00" in batch.messages[4][2]


def test_long_element_lists_are_split_below_the_attribute_limit() -> None:
    keys = ", ".join(f"10.96.{i // 250}.{i % 250} . tcp . 80 : goto service-{i:05d}"
                     for i in range(3000))
    batch = nn.compile_batch(f"add element ip kube-proxy service-ips {{ {keys} }}\n", 4,
                             "kube-proxy", TYPES.get)
    assert len(batch.messages) > 1
    assert all(len(body) < 65535 for _, _, body in batch.messages)
    # every element in exactly one message
    assert sum(body.count(b"goto") + body.count(b"service-") for _, _, body in
               batch.messages) >= 3000


def test_the_kernel_door_learns_key_types_from_what_it_commits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = NftKernel(4, "nowhere")
    kernel.netlink = False
    sent: list[str] = []
    monkeypatch.setattr("svcproxy.plugins.kernel.nftables.run_tool",
                        lambda args, netns, stdin="", check=True: sent.append(stdin) or
                        type("P", (), {"returncode": 0, "stderr": ""})())
    kernel.run('add table ip kube-proxy { comment "rules for kube-proxy" ; }\n'
               "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . "
               'inet_service : verdict ; comment "x" ; }\n'
               "add set ip kube-proxy cluster-ips { type ipv4_addr ; }\n")
    assert len(sent) == 1  # declarations: nft -f
    assert kernel.key_types == TYPES
    kernel.run("delete set ip kube-proxy cluster-ips\n")
    assert kernel.key_types == {"service-ips": TYPES["service-ips"]}
    kernel.run("add table ip kube-proxy\ndelete table ip kube-proxy\n")
    assert kernel.key_types == {}


def test_the_endpoint_rule_fast_path_writes_what_the_parser_writes() -> None:
    rules = []
    for family, host in ((4, "10.244.1.11:8080"), (4, "192.0.2.255:1"),
                         (6, "[fd00:244:1::11]:8080"), (6, "[::1]:65535")):
        for proto in ("tcp", "udp", "sctp"):
            for test in ("", "numgen random mod 5 0 ", "numgen random mod 7 < 3 ",
                         "numgen random mod 1000 < 999 "):
                rules.append((family, f"meta l4proto {proto} {test}counter packets 0 bytes 0 "
                                      f"dnat to {host}"))
    for family, rule in rules:
        fast = nn._fast_dnat(family, rule)
        assert fast is not None, rule
        assert fast == nn._Rule(family, rule).encode()[0], rule
    # shapes it does not take go to the parser (or are refused there)
    for family, rule in ((4, "meta l4proto tcp counter packets 0 bytes 0 dnat to [fd00::1]:80"),
                         (6, "meta l4proto tcp counter packets 0 bytes 0 dnat to 10.0.0.1:80"),
                         (4, "meta l4proto tcp counter packets 0 bytes 0 dnat to 10.0.0.1:70000")):
        assert nn._fast_dnat(family, rule) is None
        with pytest.raises(nn.Unsupported):
            nn.encode_rule(family, rule)


def test_a_compiler_failure_falls_back_to_nft(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    kernel = NftKernel(4, "nowhere")
    sent: list[str] = []
    monkeypatch.setattr("svcproxy.plugins.kernel.nftables.run_tool",
                        lambda args, netns, stdin="", check=True: sent.append(stdin) or
                        type("P", (), {"returncode": 0, "stderr": ""})())

    def broken(*args: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(nn, "compile_batch", broken)
    kernel.run("flush chain ip kube-proxy service-X\n")
    assert sent == ["flush chain ip kube-proxy service-X\n"]
    assert kernel.transactions == 1 and kernel.netlink_transactions == 0
    assert "netlink compiler failed (KeyError" in caplog.text
