"""Small nftables transactions straight over nf_tables netlink.

`nft -f` fetches its cache of the table before it commits anything: every
chain for a rule, every set for an element. At 50,000 services that is half a
second for a one-endpoint change, 15 times what the same change costs at
1,000 (benchmarks/RESULTS.md, issue #15). This module compiles the
statements a partial sync sends (the text the datapath renders, so there is
one source of truth) into one nf_tables batch and commits it with a single
sendmsg: the cost follows the change, not the table.

It understands exactly the statement and rule shapes the nftables datapath
writes for service ports: regular chains added, flushed and deleted; rules
made of `meta l4proto`, `numgen random mod`, address, interface and `fib
saddr type local` matches, counters, DNAT, jumps and gotos, affinity lookups
and updates, comments; elements added and deleted; sets deleted. Anything
else (a table, a base chain, a set declaration, an anonymous set) raises
Unsupported and the caller uses `nft -f`. The bytecode is nft's own
(nft --debug=netlink), checked expression for expression against what nft
writes into the kernel (tests/host/test_nft_netlink.py), so `nft list table`
prints the same text either way.

A batch is all or nothing, as `nft -f` is: the kernel commits it only when
every message is accepted, and answers each refused one with its errno, which
names the statement here.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .netlink import (
    NLMSG_ERROR,
    PROTO_NUMBERS,
    _attr,
    _nested,
    each_attr,
    each_message,
    error_code,
    open_socket,
)
from .netns import opened_in

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_APPEND, NLM_F_CREATE = 0x800, 0x400
NFPROTO = {4: 2, 6: 10}

# nf_tables messages
NEWCHAIN, DELCHAIN, NEWRULE, GETRULE, DELRULE = 3, 5, 6, 7, 8
DELSET, NEWSETELEM, DELSETELEM = 11, 12, 14
# attributes (include/uapi/linux/netfilter/nf_tables.h)
TABLE_ATTR, CHAIN_NAME = 1, 3              # NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS, RULE_USERDATA = 1, 2, 4, 7
SET_TABLE, SET_NAME = 1, 2
ELEM_LIST_TABLE, ELEM_LIST_SET, ELEM_LIST_ELEMENTS = 1, 2, 3
ELEM_KEY, ELEM_DATA = 1, 2
LIST_ELEM, EXPR_NAME, EXPR_DATA = 1, 1, 2
DATA_VALUE, DATA_VERDICT, VERDICT_CODE, VERDICT_CHAIN = 1, 2, 1, 2
VERDICTS = {"accept": 1, "drop": 0, "return": -5, "goto": -4, "jump": -3}
REG_VERDICT, REG_1, REG_2 = 0, 1, 2
META_L4PROTO, META_IIFNAME = 16, 6
PAYLOAD_NETWORK = 1
CMP_EQ, CMP_NEQ, CMP_LT = 0, 1, 2
NG_RANDOM = 1
BYTEORDER_HTON = 1
FIB_F_SADDR, FIB_RESULT_ADDRTYPE, RTN_LOCAL = 1, 3, 2
NAT_DNAT, NAT_RANGE_PROTO_SPECIFIED = 1, 2
DYNSET_OP_UPDATE = 1
UDATA_RULE_COMMENT = 0
IFNAMSIZ = 16

#: one batch at most this many bytes (sent in one sendmsg, which needs a send
#: buffer this big; nft sends its batches the same way)
MAX_BATCH = 1 << 30
#: element lists are split so that a nested attribute stays under 64 KiB
ELEMENT_CHUNK = 48 * 1024

_TOKEN = re.compile(r'"[^"]*"|\S+')
_STATEMENT = re.compile(r"(add|delete|flush) (chain|rule|element|set|map) (ip6?) (\S+) (\S+)"
                        r"(?: (.*))?$")


class Unsupported(ValueError):
    """A statement or rule this compiler does not translate: use `nft -f`."""


# ---- attributes ----------------------------------------------------------------------

def _str(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!I", value & 0xFFFFFFFF))


def _value(kind: int, data: bytes) -> bytes:
    return _nested(kind, _attr(DATA_VALUE, data))


def _verdict(kind: int, verb: str, chain: str | None = None) -> bytes:
    inner = _u32(VERDICT_CODE, VERDICTS[verb])
    if chain is not None:
        inner += _str(VERDICT_CHAIN, chain)
    return _nested(kind, _nested(DATA_VERDICT, inner))


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nested(LIST_ELEM, _str(EXPR_NAME, name), _nested(EXPR_DATA, *attrs))


# ---- expressions, as nft linearizes them ----------------------------------------------

@functools.lru_cache(maxsize=4096)
def _meta(key: int) -> bytes:
    return _expr("meta", _u32(2, key), _u32(1, REG_1))  # KEY, DREG


@functools.lru_cache(maxsize=4096)
def _cmp(op: int, data: bytes) -> bytes:
    return _expr("cmp", _u32(1, REG_1), _u32(2, op), _value(3, data))  # SREG, OP, DATA


@functools.lru_cache(maxsize=4096)
def _payload(offset: int, length: int) -> bytes:
    # DREG, BASE, OFFSET, LEN
    return _expr("payload", _u32(1, REG_1), _u32(2, PAYLOAD_NETWORK), _u32(3, offset),
                 _u32(4, length))


def _immediate(reg: int, data: bytes) -> bytes:
    return _expr("immediate", _u32(1, reg), _value(2, data))


@functools.lru_cache(maxsize=4096)
def _jump(verb: str, chain: str | None) -> bytes:
    return _expr("immediate", _u32(1, REG_VERDICT), _verdict(2, verb, chain))


@dataclass(frozen=True)
class _Family:
    word: str
    saddr: int  # offset of the source address in the network header
    size: int  # address bytes


FAMILIES = {4: _Family("ip", 12, 4), 6: _Family("ip6", 8, 16)}


def _address(fam: _Family, text: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET6 if fam.size == 16 else socket.AF_INET, text)
    except OSError:
        raise Unsupported(f"{text} is not an {fam.word} address") from None


def _saddr_match(fam: _Family, op: int, text: str) -> list[bytes]:
    """`ip saddr [!=] ADDR|CIDR`: nft loads only the whole bytes of a prefix
    that ends on a byte, else the whole address and masks it."""
    net = ipaddress.ip_network(text, strict=False)
    if len(net.network_address.packed) != fam.size:
        raise Unsupported(f"{text} is not an {fam.word} network")
    prefix, packed = net.prefixlen, net.network_address.packed
    if prefix == 0:
        raise Unsupported("a zero-length prefix")
    if prefix % 8 == 0:
        n = prefix // 8
        return [_payload(fam.saddr, n), _cmp(op, packed[:n])]
    mask = net.netmask.packed
    return [_payload(fam.saddr, fam.size),
            _expr("bitwise", _u32(1, REG_1), _u32(2, REG_1), _u32(3, fam.size),  # SREG DREG LEN
                  _value(4, mask), _value(5, b"\0" * fam.size)),  # MASK, XOR
            _cmp(op, packed)]


def _iifname(op: int, quoted: str) -> list[bytes]:
    name = quoted[1:-1].encode()
    data = name[:-1] if name.endswith(b"*") else name + b"\0" * (IFNAMSIZ - len(name))
    if not data or len(data) > IFNAMSIZ or b"\\" in data or b"*" in data:
        raise Unsupported(f"interface name {quoted}")
    return [_meta(META_IIFNAME), _cmp(op, data)]


def _host_port(fam: _Family, text: str) -> tuple[bytes, int]:
    if text.startswith("["):
        addr, _, port = text[1:].partition("]:")
    else:
        addr, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise Unsupported(f"dnat to {text}")
    return _address(fam, addr), int(port)


class _Rule:
    """One rule's tokens, consumed left to right: matches, then one verdict
    (DNAT, goto, jump, drop...), then perhaps a comment."""

    def __init__(self, family: int, rule: str) -> None:
        self.fam = FAMILIES[family]
        self.family = family
        self.rule = rule
        self.tokens = _TOKEN.findall(rule)
        self.i = 0
        self.exprs: list[bytes] = []
        self.userdata = b""
        self.ended = False

    def fail(self, why: str = "") -> Unsupported:
        return Unsupported(f"rule {self.rule!r}{': ' + why if why else ''}")

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.tokens[j] if j < len(self.tokens) else ""

    def take(self, *words: str) -> None:
        if tuple(self.tokens[self.i:self.i + len(words)]) != words:
            raise self.fail()
        self.i += len(words)

    def number(self) -> int:
        t = self.peek()
        if not t.isdigit():
            raise self.fail(f"{t!r} is not a number")
        self.i += 1
        return int(t)

    def encode(self) -> tuple[bytes, bytes]:
        handlers: dict[str, Callable[[], None]] = {
            "meta": self.meta, "numgen": self.numgen, self.fam.word: self.saddr,
            "iifname": self.iifname, "fib": self.fib, "counter": self.counter,
            "dnat": self.dnat, "goto": self.chain_verdict, "jump": self.chain_verdict,
            "drop": self.verdict, "accept": self.verdict, "return": self.verdict,
            "update": self.update, "comment": self.comment,
        }
        while self.i < len(self.tokens):
            t = self.peek()
            handler = handlers.get(t)
            if handler is None:
                raise self.fail(repr(t))
            if self.ended and t != "comment":
                raise self.fail("something after its verdict")
            handler()
        if not self.exprs:
            raise self.fail()
        return b"".join(self.exprs), self.userdata

    def meta(self) -> None:
        self.take("meta", "l4proto")
        proto = PROTO_NUMBERS.get(self.peek())
        if proto is None:
            raise self.fail()
        self.i += 1
        self.exprs += [_meta(META_L4PROTO), _cmp(CMP_EQ, bytes([proto]))]

    def numgen(self) -> None:
        self.take("numgen", "random", "mod")
        # DREG, MODULUS, TYPE, OFFSET
        self.exprs.append(_expr("numgen", _u32(1, REG_1), _u32(2, self.number()),
                                _u32(3, NG_RANDOM), _u32(4, 0)))
        if self.peek() == "<":
            self.i += 1
            below = self.number()
            # SREG, DREG, OP, LEN, SIZE: numgen's result is host-endian
            self.exprs += [_expr("byteorder", _u32(1, REG_1), _u32(2, REG_1),
                                 _u32(3, BYTEORDER_HTON), _u32(4, 4), _u32(5, 4)),
                           _cmp(CMP_LT, struct.pack("!I", below))]
        elif self.peek() == "0":
            self.i += 1
            self.exprs.append(_cmp(CMP_EQ, b"\0\0\0\0"))
        else:
            raise self.fail()

    def saddr(self) -> None:
        self.take(self.fam.word, "saddr")
        target = self.peek()
        self.i += 1
        if target.startswith("@"):
            self.exprs += [_payload(self.fam.saddr, self.fam.size),
                           _expr("lookup", _str(1, target[1:]), _u32(2, REG_1))]  # SET, SREG
            return
        op = CMP_EQ
        if target == "!=":
            op, target = CMP_NEQ, self.peek()
            self.i += 1
        if not re.fullmatch(r"[0-9a-fA-F.:]+(/\d+)?", target):
            raise self.fail(repr(target))
        self.exprs += _saddr_match(self.fam, op, target)

    def iifname(self) -> None:
        self.take("iifname")
        op = CMP_EQ
        if self.peek() == "!=":
            op = CMP_NEQ
            self.i += 1
        quoted = self.peek()
        if not (len(quoted) >= 2 and quoted.startswith('"')):
            raise self.fail()
        self.i += 1
        self.exprs += _iifname(op, quoted)

    def fib(self) -> None:
        self.take("fib", "saddr", "type", "local")
        self.exprs += [_expr("fib", _u32(1, REG_1), _u32(2, FIB_RESULT_ADDRTYPE),  # DREG RESULT
                             _u32(3, FIB_F_SADDR)),  # FLAGS
                       _cmp(CMP_EQ, struct.pack("=I", RTN_LOCAL))]

    def counter(self) -> None:
        self.take("counter", "packets", "0", "bytes", "0")
        self.exprs.append(_expr("counter"))

    def dnat(self) -> None:
        self.take("dnat", "to")
        addr, port = _host_port(self.fam, self.peek())
        self.i += 1
        self.exprs += [_immediate(REG_1, addr), _immediate(REG_2, struct.pack("!H", port)),
                       # TYPE, FAMILY, REG_ADDR_MIN, REG_PROTO_MIN, FLAGS
                       _expr("nat", _u32(1, NAT_DNAT), _u32(2, NFPROTO[self.family]),
                             _u32(3, REG_1), _u32(5, REG_2), _u32(7, NAT_RANGE_PROTO_SPECIFIED))]
        self.ended = True

    def chain_verdict(self) -> None:
        verb, chain = self.peek(), self.peek(1)
        if not chain:
            raise self.fail()
        self.i += 2
        self.exprs.append(_jump(verb, chain))
        self.ended = True

    def verdict(self) -> None:
        self.exprs.append(_jump(self.peek(), None))
        self.i += 1
        self.ended = True

    def update(self) -> None:
        self.take("update")
        target = self.peek()
        if not target.startswith("@"):
            raise self.fail()
        self.i += 1
        self.take("{", self.fam.word, "saddr", "}")
        self.exprs += [_payload(self.fam.saddr, self.fam.size),
                       _expr("dynset", _str(1, target[1:]), _u32(3, DYNSET_OP_UPDATE),
                             _u32(4, REG_1))]  # SET_NAME, OP, SREG_KEY

    def comment(self) -> None:
        self.take("comment")
        quoted = self.peek()
        if not (len(quoted) >= 2 and quoted.startswith('"')) or self.i + 1 != len(self.tokens):
            raise self.fail()
        self.i += 1
        text = quoted[1:-1].encode() + b"\0"
        if len(text) > 255:
            raise self.fail("a comment this long")
        self.userdata = bytes([UDATA_RULE_COMMENT, len(text)]) + text


#: the endpoint rule, nine in ten of a table's rules: encoded without the
#: general parser (the same bytes, tests/unit/test_nft_netlink_compile.py)
_DNAT_RULE = re.compile(r"meta l4proto (tcp|udp|sctp) (?:numgen random mod (\d+) (?:(0)|< (\d+)) )?"
                        r"counter packets 0 bytes 0 dnat to (\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d+)")


@functools.lru_cache(maxsize=4096)
def _dnat_head(proto: str, modulus: int | None, below: int | None) -> bytes:
    """What comes before the DNAT's address: protocol, numgen test, counter."""
    out = _meta(META_L4PROTO) + _cmp(CMP_EQ, bytes([PROTO_NUMBERS[proto]]))
    if modulus is not None:
        out += _expr("numgen", _u32(1, REG_1), _u32(2, modulus), _u32(3, NG_RANDOM), _u32(4, 0))
        if below is None:
            out += _cmp(CMP_EQ, b"\0\0\0\0")
        else:
            out += _expr("byteorder", _u32(1, REG_1), _u32(2, REG_1), _u32(3, BYTEORDER_HTON),
                         _u32(4, 4), _u32(5, 4)) + _cmp(CMP_LT, struct.pack("!I", below))
    return out + _expr("counter")


@functools.lru_cache(maxsize=4)
def _dnat_parts(family: int) -> tuple[bytes, bytes, bytes, bytes]:
    """(immediate-address template split around its value, port immediate
    prefix, nat expression) for `family`."""
    size = FAMILIES[family].size
    marker = b"\xa5" * size
    imm = _immediate(REG_1, marker)
    at = imm.index(marker)
    port = _immediate(REG_2, b"\0\0")
    nat = _expr("nat", _u32(1, NAT_DNAT), _u32(2, NFPROTO[family]), _u32(3, REG_1),
                _u32(5, REG_2), _u32(7, NAT_RANGE_PROTO_SPECIFIED))
    return imm[:at], imm[at + size:], port[:-4], nat


def _fast_dnat(family: int, rule: str) -> bytes | None:
    m = _DNAT_RULE.fullmatch(rule)
    if m is None:
        return None
    proto, modulus, zero, below, host, port = m.groups()
    if modulus is None and (zero or below):
        return None
    fam = FAMILIES[family]
    if host.startswith("[") != (fam.size == 16):
        return None
    addr = _address(fam, host.strip("[]"))
    number = int(port)
    if number > 65535:
        return None
    before, after, port_head, nat = _dnat_parts(family)
    head = _dnat_head(proto, int(modulus) if modulus else None,
                      None if below is None else int(below))
    # the port immediate's value: 2 bytes padded to 4 (the last 4 of port_head's template)
    return (head + before + addr + after + port_head + struct.pack("!H", number) + b"\0\0"
            + nat)


def encode_rule(family: int, rule: str) -> tuple[bytes, bytes]:
    """(NFTA_RULE_EXPRESSIONS payload, NFTA_RULE_USERDATA payload or b"") of
    one rule in the datapath's text; Unsupported for any other shape."""
    fast = _fast_dnat(family, rule)
    if fast is not None:
        return fast, b""
    try:
        return _Rule(family, rule).encode()
    except Unsupported:
        raise
    except (ValueError, struct.error) as exc:  # an address that does not parse, a
        raise Unsupported(f"rule {rule!r}: {exc}") from None  # number out of range


# ---- elements --------------------------------------------------------------------------

def key_types(declaration: Iterable[str]) -> tuple[str, ...] | None:
    """The key's types from a set or map declaration's lines ("type ipv4_addr .
    inet_proto . inet_service : verdict" -> ("ipv4_addr", "inet_proto",
    "inet_service")); None without a type line, or for an interval set."""
    lines = [line.rstrip(" ;") for line in declaration]
    if any(line.startswith("flags ") and "interval" in line for line in lines):
        return None  # (interval elements are ranges: nft encodes those)
    for line in lines:
        if line.startswith("type "):
            key = line[5:].partition(" : ")[0]
            return tuple(part.strip() for part in key.split(" . "))
    return None


def encode_key(types: tuple[str, ...], text: str) -> bytes:
    """One element's key in the kernel's layout: a concatenation pads each
    field to 4 bytes (ports are big-endian, a protocol is one byte)."""
    parts = text.split(" . ")
    if len(parts) != len(types):
        raise Unsupported(f"element {text!r} does not match {' . '.join(types)}")
    out = b""
    for kind, part in zip(types, parts, strict=True):
        if kind in ("ipv4_addr", "ipv6_addr"):
            try:
                value = socket.inet_pton(socket.AF_INET if kind == "ipv4_addr"
                                         else socket.AF_INET6, part)
            except OSError:
                raise Unsupported(f"element field {part!r} of type {kind}") from None
        elif kind == "inet_proto" and part in PROTO_NUMBERS:
            value = bytes([PROTO_NUMBERS[part]])
        elif kind == "inet_service" and part.isdigit() and int(part) < 65536:
            value = struct.pack("!H", int(part))
        else:
            raise Unsupported(f"element field {part!r} of type {kind}")
        out += value if len(types) == 1 else value + b"\0" * (-len(value) % 4)
    return out


def _element(types: tuple[str, ...], item: str) -> bytes:
    key, sep, value = item.partition(" : ")
    attrs = [_value(ELEM_KEY, encode_key(types, key))]
    if sep:
        words = value.split()
        if len(words) == 2 and words[0] in ("goto", "jump"):
            attrs.append(_verdict(ELEM_DATA, words[0], words[1]))
        elif len(words) == 1 and words[0] in ("drop", "accept", "return"):
            attrs.append(_verdict(ELEM_DATA, words[0]))
        else:
            raise Unsupported(f"element value {value!r}")
    return _nested(LIST_ELEM, *attrs)


# ---- statements and the batch ------------------------------------------------------------

_NFGEN_HEADER = struct.Struct("=IHHIIBBH")  # nlmsghdr + nfgenmsg


def _control(mtype: int, seq: int) -> bytes:
    """BATCH_BEGIN or BATCH_END (for the nf_tables subsystem)."""
    return _NFGEN_HEADER.pack(20, mtype, NLM_F_REQUEST, seq, 0, 0, 0,
                              socket.htons(NFNL_SUBSYS_NFTABLES))


@dataclass
class Batch:
    """An nf_tables batch as it is built: BATCH_BEGIN (seq 1) and the
    messages, framed in one buffer (message i has seq i + 2); BATCH_END is
    added when it is sent. For each message, the number of the statement
    (line of `text`) it came from."""

    family: int
    text: str = ""
    data: bytearray = field(default_factory=lambda: bytearray(_control(NFNL_MSG_BATCH_BEGIN, 1)))
    lines: array[int] = field(default_factory=lambda: array("I"))

    def add(self, msg: int, flags: int, body: bytes, line: int) -> None:
        self.data += _NFGEN_HEADER.pack(20 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg,
                                        NLM_F_REQUEST | flags, len(self.lines) + 2, 0,
                                        NFPROTO[self.family], 0, 0)
        self.data += body
        self.lines.append(line)

    def __len__(self) -> int:
        return len(self.lines)

    def statement(self, index: int) -> str:
        """The statement message `index` came from."""
        wanted = self.lines[index]
        return next(line for n, line in enumerate(_lines(self.text)) if n == wanted)

    @property
    def messages(self) -> list[tuple[int, int, bytes]]:
        """(message type, flags, body after nfgenmsg) of each message."""
        out = []
        for mtype, _, start, end in each_message(bytes(self.data)):
            if mtype >> 8 == NFNL_SUBSYS_NFTABLES:
                flags = struct.unpack_from("=H", self.data, start - 10)[0]
                out.append((mtype & 0xFF, flags & ~NLM_F_REQUEST, bytes(self.data[start + 4:end])))
        return out

    @property
    def statements(self) -> list[str]:
        return [self.statement(i) for i in range(len(self.lines))]


def _lines(text: str) -> Iterator[str]:
    """The lines of `text`, one at a time (a list of a large transaction's
    lines is 8 MB at 10,000 services; io.StringIO copies the text at 4 bytes
    a character)."""
    start, size = 0, len(text)
    while start < size:
        end = text.find("\n", start)
        if end < 0:
            end = size
        yield text[start:end]
        start = end + 1


@functools.lru_cache(maxsize=8192)
def _chain_attr(name: str) -> bytes:
    return _str(RULE_CHAIN, name)


def compile_batch(text: str, family: int, table: str,
                  types: Callable[[str], tuple[str, ...] | None]) -> Batch:
    """The messages for a transaction's statements (one per line) on
    `<family> <table>`; `types(set)` is a set's key types. Unsupported if any
    statement is not one this module writes."""
    word = FAMILIES[family].word
    batch = Batch(family, text)
    tbl = _str(TABLE_ATTR, table)
    for number, line in enumerate(_lines(text)):
        if not line:
            continue
        m = _STATEMENT.match(line)
        if m is None or m.group(3) != word or m.group(4) != table:
            raise Unsupported(f"statement {line[:80]!r}")
        verb, kind, _, _, name, rest = m.groups()
        if kind == "chain" and rest is None and verb in ("add", "delete", "flush"):
            msg = {"add": NEWCHAIN, "delete": DELCHAIN, "flush": DELRULE}[verb]
            flags = NLM_F_CREATE if verb == "add" else 0
            attr = _str(CHAIN_NAME, name) if verb != "flush" else _str(RULE_CHAIN, name)
            batch.add(msg, flags, tbl + attr, number)
        elif kind == "rule" and verb == "add" and rest:
            exprs, userdata = encode_rule(family, rest)
            body = tbl + _chain_attr(name) + _nested(RULE_EXPRESSIONS, exprs)
            if userdata:
                body += _attr(RULE_USERDATA, userdata)
            batch.add(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body, number)
        elif kind in ("set", "map") and verb == "delete" and rest is None:
            batch.add(DELSET, 0, tbl + _str(SET_NAME, name), number)
        elif kind == "element" and verb in ("add", "delete") and rest and \
                rest.startswith("{ ") and rest.endswith(" }"):
            key = types(name)
            if key is None:
                raise Unsupported(f"elements of {name}: its type is not known")
            head = tbl + _str(ELEM_LIST_SET, name)
            msg, flags = (NEWSETELEM, NLM_F_CREATE) if verb == "add" else (DELSETELEM, 0)
            chunk: list[bytes] = []
            size = 0
            for item in rest[2:-2].split(", "):
                elem = _element(key, item)
                if chunk and size + len(elem) > ELEMENT_CHUNK:
                    batch.add(msg, flags, head + _nested(ELEM_LIST_ELEMENTS, *chunk), number)
                    chunk, size = [], 0
                chunk.append(elem)
                size += len(elem)
            batch.add(msg, flags, head + _nested(ELEM_LIST_ELEMENTS, *chunk), number)
        else:
            raise Unsupported(f"statement {line[:80]!r}")
    return batch


class Refused(OSError):
    """The kernel refused a batch (nothing of it was committed)."""

    def __init__(self, err: int, statement: str, unknown: bool = False) -> None:
        super().__init__(err, f"{statement}: {os.strerror(err)}")
        self.statement = statement
        #: the batch was sent but its answers were lost: it may have committed
        self.unknown = unknown


class Channel:
    """One nf_tables netlink socket in a namespace, opened on first use and
    kept: closing one costs the kernel ~3 ms (measured at 10,000 services), and
    a sync needs three exchanges (the generation before, the commit, the
    generation after). A socket that failed is dropped and opened again."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._socket: socket.socket | None = None
        self._seq = 0

    def _open(self) -> socket.socket:
        if self._socket is None:
            self._socket = opened_in(self.netns, lambda: open_socket(NETLINK_NETFILTER))
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _next(self, count: int = 1) -> int:
        seq = self._seq + 1
        self._seq += count
        return seq

    def _pending(self, sock: socket.socket) -> list[bytes]:
        """Whatever answers are queued (the kernel answers within the system
        call that asked), without waiting."""
        out: list[bytes] = []
        sock.setblocking(False)
        try:
            while True:
                try:
                    out.append(sock.recv(1 << 20))
                except BlockingIOError:
                    return out
        finally:
            sock.setblocking(True)

    def request(self, msg: int, nfproto: int, attrs: bytes = b""
                ) -> tuple[bytes, list[tuple[int, int, int]]] | None:
        """One request and its answer: the datagram and its messages (type
        without the subsystem, payload start, end); None when netfilter
        netlink cannot be reached."""
        try:
            sock = self._open()
            self._pending(sock)  # (left over from an earlier exchange)
            seq = self._next()
            body = struct.pack("=BBH", nfproto, 0, 0) + attrs  # nfgenmsg: family, v0, res 0
            sock.send(struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg,
                                  NLM_F_REQUEST, seq, 0) + body)
            while True:
                data = sock.recv(65536)
                messages = [(NLMSG_ERROR if mtype == NLMSG_ERROR else mtype & 0xFF, start, end)
                            for mtype, mseq, start, end in each_message(data)
                            if mseq == seq and (mtype == NLMSG_ERROR or
                                                mtype >> 8 == NFNL_SUBSYS_NFTABLES)]
                if messages:
                    return data, messages
        except OSError:
            self.close()
            return None

    def commit(self, batch: Batch) -> None:
        """Send the batch as one sendmsg; Refused (with the first refused
        statement) when the kernel did not commit it. The kernel handles a
        batch inside the system call, so its answers are all queued when send
        returns. Another OSError: netlink could not be used, nothing was sent."""
        if not batch.lines:
            return
        data = batch.data
        if len(data) > MAX_BATCH:
            raise Unsupported(f"a batch of {len(data)} bytes")
        end = _control(NFNL_MSG_BATCH_END, len(batch.lines) + 2)
        try:
            sock = self._open()
            self._pending(sock)
            size = len(data) + len(end)
            if size > 200_000:  # (the default send buffer)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, 32, size + 65536)  # SO_SNDBUFFORCE
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size + 65536)
            data += end  # (in place: the batch of 50,000 services is 100 MB)
            try:
                sock.send(data)  # (an error here: nothing was committed)
            finally:
                del data[-len(end):]
        except OSError:
            self.close()
            raise
        refused: dict[int, int] = {}
        try:
            answers = self._pending(sock)
        except OSError as exc:  # sent, but the answers are lost: say so
            self.close()
            raise Refused(exc.errno or 0, "the batch was sent but its answers could "
                          "not be read", unknown=True) from None
        for answer in answers:
            for mtype, seq, start, _ in each_message(answer):
                if mtype == NLMSG_ERROR and error_code(answer, start):
                    refused.setdefault(seq, error_code(answer, start))
        if refused:
            seq = min(refused)
            index = seq - 2
            statement = batch.statement(index) if 0 <= index < len(batch.lines) else \
                "the batch"
            raise Refused(refused[seq], statement)


def commit(batch: Batch, netns: str | None = None) -> None:
    """Channel.commit on a socket of its own."""
    channel = Channel(netns)
    try:
        channel.commit(batch)
    finally:
        channel.close()


# ---- reading rules back (tests compare nft's bytecode with this module's) -------------

def dump_rules(family: int, table: str, netns: str | None = None
               ) -> list[tuple[str, bytes, bytes]]:
    """(chain, expressions, userdata) of every rule in the table, in order, as
    the kernel serializes them (handles left out)."""
    body = struct.pack("=BBH", NFPROTO[family], 0, 0) + _str(RULE_TABLE, table)
    request = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | GETRULE,
                          NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body
    sock = opened_in(netns, lambda: open_socket(NETLINK_NETFILTER))
    out: list[tuple[str, bytes, bytes]] = []
    try:
        sock.send(request)
        while True:
            data = sock.recv(1 << 20)
            for mtype, _, start, end in each_message(data):
                if mtype == 3:  # NLMSG_DONE
                    return out
                if mtype == NLMSG_ERROR:
                    code = error_code(data, start)
                    if code:
                        raise OSError(code, os.strerror(code))
                    continue
                chain, exprs, udata = "", b"", b""
                for kind, vs, ve in each_attr(data, start + 4, end):
                    if kind == RULE_CHAIN:
                        chain = data[vs:ve].rstrip(b"\0").decode()
                    elif kind == RULE_EXPRESSIONS:
                        exprs = data[vs:ve]
                    elif kind == RULE_USERDATA:
                        udata = data[vs:ve]
                out.append((chain, exprs, udata))
    finally:
        sock.close()

