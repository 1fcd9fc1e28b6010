"""ipset members over netlink, batched.

`ipset restore` parses every member in userspace and resolves names through
NSS and getaddrinfo; in the VM that cost ~1.5 ms per member — 30 s for the
20,000 members of a 10,000-service node, more than the whole IPVS table.
This module sends ADD/DEL messages for members in kube-proxy's text form
("10.96.0.1,tcp:443", "10.244.1.5,tcp:8080,10.244.1.5",
"203.0.113.10,tcp:80,198.51.100.0/24", "30080", "10.96.0.1") many per
system call, as the IPVS writer does (netlink.send_batch: only refusals and
the last message are answered). Without NLM_F_EXCL the kernel treats "already there" and "not
there" as success, like `ipset -exist`. Sets are created the same way
(IPSET_CMD_CREATE, at the revision `ipset create` would pick): a new node's
first write started `ipset restore` twice, 0.5-1 s each in the emulated VM.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .netlink import (
    _NLA,
    _NLMSGHDR,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    PROTO_NUMBERS,
    SEND_CHUNK,
    _attr,
    each_attr,
    each_message,
    error_code,
    open_socket,
    send_batch,
)
from .netns import opened_in
from .tools import KernelError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 7
CMD_CREATE, CMD_DESTROY, CMD_ADD, CMD_DEL, CMD_TYPE = 2, 3, 9, 10, 13
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_DATA, ATTR_ADT, ATTR_LINENO = 1, 2, 7, 8, 9
ATTR_TYPENAME, ATTR_REVISION, ATTR_FAMILY, ATTR_REVISION_MIN = 3, 4, 5, 10
# inside IPSET_ATTR_DATA of a create
ATTR_PORT_TO, ATTR_HASHSIZE, ATTR_MAXELEM = 5, 18, 19
NFPROTO_UNSPEC, NFPROTO_IPV4, NFPROTO_IPV6 = 0, 2, 10
#: the newest revision of each set type that `ipset` 7.17 (Debian bookworm's:
#: the image's, and kube-proxy's) creates; svcproxy creates the newer of this
#: and what the kernel offers at most, so `ipset list` in the image reads them
USERSPACE_REVISIONS = {"hash:ip": 6, "hash:ip,port": 7, "hash:ip,port,ip": 6,
                       "hash:ip,port,net": 8, "hash:net": 7, "bitmap:port": 3}
# inside IPSET_ATTR_DATA
ATTR_IP, ATTR_PORT, ATTR_PROTO, ATTR_IP2, ATTR_CIDR2 = 1, 4, 7, 20, 21
ATTR_IPADDR_IPV4, ATTR_IPADDR_IPV6 = 1, 2
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000

_NFGEN = struct.Struct("=BBH")


def nfproto_of(type_name: str, family: int = 4) -> int:
    """The netfilter family a set of this type is made in: a port bitmap has
    none, a hash set its address family's."""
    if type_name.startswith("bitmap:"):
        return NFPROTO_UNSPEC
    return NFPROTO_IPV6 if family == 6 else NFPROTO_IPV4


@dataclass(frozen=True)
class SetSpec:
    """A set to create, as `ipset create` takes it (the port bitmaps span every
    port)."""

    name: str
    type: str
    family: int = 4  # of a hash type
    hashsize: int = 1024
    maxelem: int = 65536

    @property
    def nfproto(self) -> int:
        return nfproto_of(self.type, self.family)

    def text(self) -> str:
        """The `ipset restore` line (previews, docs)."""
        if self.nfproto == NFPROTO_UNSPEC:
            return f"create {self.name} {self.type} range 0-65535 -exist"
        fam = "inet" if self.family == 4 else "inet6"
        return (f"create {self.name} {self.type} family {fam} hashsize {self.hashsize} "
                f"maxelem {self.maxelem} -exist")

    def data(self) -> bytes:
        """IPSET_ATTR_DATA's attributes (numbers in network order, flagged so)."""
        if self.nfproto == NFPROTO_UNSPEC:
            return (_attr(ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack(">H", 0))
                    + _attr(ATTR_PORT_TO | NLA_F_NET_BYTEORDER, struct.pack(">H", 65535)))
        return (_attr(ATTR_HASHSIZE | NLA_F_NET_BYTEORDER, struct.pack(">I", self.hashsize))
                + _attr(ATTR_MAXELEM | NLA_F_NET_BYTEORDER, struct.pack(">I", self.maxelem)))


#: IPSET_ATTR_LINENO (the kernel requires one with IPSET_ATTR_ADT)
_LINENO = _attr(ATTR_LINENO, struct.pack("=I", 0))


#: the nested IPSET_ATTR_IP / IPSET_ATTR_IP2 headers, by attribute and address size
_IP_HEADS = {(kind, size): struct.pack("=HHHH", 8 + size, kind | NLA_F_NESTED, 4 + size,
                                       (ATTR_IPADDR_IPV6 if size == 16 else ATTR_IPADDR_IPV4)
                                       | NLA_F_NET_BYTEORDER)
             for kind in (ATTR_IP, ATTR_IP2) for size in (4, 16)}


def _ip(kind: int, address: str) -> bytes:
    if ":" in address:
        return _IP_HEADS[(kind, 16)] + socket.inet_pton(socket.AF_INET6, address)
    return _IP_HEADS[(kind, 4)] + socket.inet_pton(socket.AF_INET, address)


@functools.lru_cache(maxsize=4096)
def _proto_port(text: str) -> bytes:
    """IPSET_ATTR_PORT and IPSET_ATTR_PROTO of "tcp:8080" (few distinct:
    cached)."""
    proto, _, port = text.rpartition(":")
    number = PROTO_NUMBERS.get(proto) if not proto.isdigit() else int(proto)
    if number is None:
        raise ValueError(f"unknown protocol {proto!r}")
    return (_attr(ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(port)))
            + _attr(ATTR_PROTO, struct.pack("B", number)))


@functools.lru_cache(maxsize=256)
def _cidr2(cidr: str) -> bytes:
    return _attr(ATTR_CIDR2, struct.pack("B", int(cidr)))


def member_data(member: str) -> bytes:
    """IPSET_ATTR_DATA for one member in ipset's text form (assembled from
    fixed headers: 20,000 members at 10,000 services)."""
    parts = member.split(",")
    if len(parts) == 1 and parts[0].isdigit():  # bitmap:port
        return _attr(ATTR_DATA | NLA_F_NESTED,
                     _attr(ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(parts[0]))))
    body = _ip(ATTR_IP, parts[0])
    if len(parts) >= 2:
        try:
            body += _proto_port(parts[1])
        except ValueError as exc:
            raise ValueError(f"{exc} in ipset member {member!r}") from None
    if len(parts) >= 3:
        address, _, cidr = parts[2].partition("/")
        body += _ip(ATTR_IP2, address)
        if cidr:
            body += _cidr2(cidr)
    return _NLA.pack(4 + len(body), ATTR_DATA | NLA_F_NESTED) + body


@dataclass
class IpsetFailure:
    op: str
    set_name: str
    member: str
    errno: int

    @property
    def reason(self) -> str:
        return self.describe(self.errno)

    @staticmethod
    def describe(code: int) -> str:
        """An errno or one of ipset's own error numbers, in words."""
        if code < 4096:
            return os.strerror(code)
        return IPSET_ERRORS.get(code, f"ipset error {code}")

    def __str__(self) -> str:
        return f"{self.op} {self.set_name} {self.member}: {self.reason}"


IPSET_ERR_HASH_FULL = 4352

#: ipset's own error numbers (linux/netfilter/ipset/ip_set.h, ip_set_hash.h)
IPSET_ERRORS = {
    4097: "protocol error", 4098: "no such set type (its kernel module is missing?)",
    4099: "too many sets", 4100: "the set is in use",
    4102: "the set type does not match", 4103: "the element already exists",
    4104: "invalid CIDR", 4106: "invalid address family", 4107: "timeout not supported",
    4108: "the set is referenced", 4109: "an IPv4 address was expected",
    4110: "an IPv6 address was expected",
    4352: "the set is full (its maxelem is reached; kube-proxy's sets hold 65536)",
    4353: "invalid element", 4354: "invalid protocol", 4355: "missing protocol",
}


class IpsetNetlink:
    SEND_CHUNK = SEND_CHUNK
    #: members per message
    GROUP = 64

    def __init__(self) -> None:
        self.sock = open_socket(NETLINK_NETFILTER)
        self.seq = int.from_bytes(os.urandom(2), "big")
        #: (type, nfproto) -> the revision to create
        self.revisions: dict[tuple[str, int], int] = {}

    def close(self) -> None:
        self.sock.close()

    def read(self, parse: Callable[[str], bool]) -> dict[str, set[str]]:
        """Every set by name, with the members of those `parse` accepts."""
        return IpsetReader(self.sock).sets(parse)

    def _message(self, cmd: int, family: int, set_name: str, data: bytes,
                 type_name: str = "") -> tuple[int, bytes]:
        self.seq += 1
        payload = _attr(ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
        if set_name:
            payload += _attr(ATTR_SETNAME, set_name.encode() + b"\0")
        if type_name:
            payload += _attr(ATTR_TYPENAME, type_name.encode() + b"\0")
        payload += data
        body = _NFGEN.pack(family, 0, 0) + payload
        return self.seq, _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_IPSET << 8) | cmd,
                                        NLM_F_REQUEST, self.seq, 0) + body

    def write(self, adds: Iterable[tuple[str, str]], dels: Iterable[tuple[str, str]],
              family: int) -> list[IpsetFailure]:
        """Add and delete (set, member) pairs; returns what the kernel refused.

        Members of one set go up to GROUP per message (IPSET_ATTR_ADT, as
        `ipset restore` batches them): the kernel looks the set up and takes
        its lock once per message, not per member. It stops at the first member
        it refuses, so the members of a refused message are sent again one by
        one (adding what is there and deleting what is not are no-ops), which
        names exactly the refused ones."""
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        groups: dict[int, tuple[int, int, str, str, list[str]]] = {}
        messages: list[tuple[int, bytes]] = []
        for op, cmd, pairs in (("add", CMD_ADD, adds), ("del", CMD_DEL, dels)):
            by_set: dict[str, list[str]] = {}
            for set_name, member in pairs:
                by_set.setdefault(set_name, []).append(member)
            for set_name, members in by_set.items():
                fam = 0 if members[0].isdigit() else af
                for i in range(0, len(members), self.GROUP):
                    part = members[i:i + self.GROUP]
                    data = b"".join(member_data(m) for m in part)
                    if len(part) > 1:
                        data = _LINENO + _attr(ATTR_ADT | NLA_F_NESTED, data)
                    seq, msg = self._message(cmd, fam, set_name, data)
                    groups[seq] = (cmd, fam, op, set_name, part)
                    messages.append((seq, msg))
        refused = send_batch(self.sock, messages, self.SEND_CHUNK)
        failures: list[IpsetFailure] = []
        retry: list[tuple[int, bytes]] = []
        singles: dict[int, tuple[str, str, str]] = {}
        for seq, code in refused.items():
            cmd, fam, op, set_name, part = groups[seq]
            if len(part) == 1:
                failures.append(IpsetFailure(op, set_name, part[0], code))
                continue
            for member in part:
                rseq, msg = self._message(cmd, fam, set_name, member_data(member))
                singles[rseq] = (op, set_name, member)
                retry.append((rseq, msg))
        if retry:
            for seq, code in send_batch(self.sock, retry, self.SEND_CHUNK).items():
                failures.append(IpsetFailure(*singles[seq], code))
        return failures

    def revision(self, type_name: str, nfproto: int) -> int:
        """The revision of a set type to create: the kernel's newest
        (IPSET_CMD_TYPE, which also loads the type's module), or `ipset`'s if
        that is older. Raises KernelError naming the type the kernel lacks."""
        key = (type_name, nfproto)
        if key in self.revisions:
            return self.revisions[key]
        seq, msg = self._message(CMD_TYPE, nfproto, "", _attr(ATTR_FAMILY, bytes([nfproto])),
                                 type_name=type_name)
        self.sock.send(msg)
        newest = oldest = -1
        while newest < 0:
            data = self.sock.recv(65536)
            for mtype, mseq, start, end in each_message(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = error_code(data, start)
                    raise KernelError(f"ipset: the kernel has no set type {type_name} "
                                      f"({IpsetFailure.describe(code)})")
                top = _nested_attrs(data, start + _NFGEN.size, end)
                if ATTR_REVISION in top:
                    newest = data[top[ATTR_REVISION][0]]
                    oldest = data[top[ATTR_REVISION_MIN][0]] if ATTR_REVISION_MIN in top \
                        else newest
        chosen = max(oldest, min(newest, USERSPACE_REVISIONS.get(type_name, newest)))
        self.revisions[key] = chosen
        return chosen

    def create(self, specs: Iterable[SetSpec]) -> dict[str, int]:
        """Create sets in one batch, as `ipset restore -exist` does: a set that
        is there with the same type and parameters is left alone. Returns
        {name: errno} of those the kernel refused (EEXIST: one by that name
        and of another type or size is there)."""
        sent = {}
        messages = []
        for spec in specs:
            payload = (_attr(ATTR_REVISION, bytes([self.revision(spec.type, spec.nfproto)]))
                       + _attr(ATTR_FAMILY, bytes([spec.nfproto]))
                       + _attr(ATTR_DATA | NLA_F_NESTED, spec.data()))
            seq, msg = self._message(CMD_CREATE, spec.nfproto, spec.name, payload,
                                     type_name=spec.type)
            sent[seq] = spec.name
            messages.append((seq, msg))
        return {sent[seq]: code for seq, code in
                send_batch(self.sock, messages, self.SEND_CHUNK).items()}

    def destroy(self, names: Iterable[str]) -> dict[str, int]:
        """Destroy sets by name in one batch; returns {name: errno} for those
        the kernel refused (a rule uses it: IPSET_ERR_BUSY, 4100)."""
        sent = {}
        messages = []
        for name in names:
            seq, msg = self._message(CMD_DESTROY, 0, name, b"")
            sent[seq] = name
            messages.append((seq, msg))
        return {sent[seq]: code for seq, code in
                send_batch(self.sock, messages, self.SEND_CHUNK).items()}


# ---- reading ---------------------------------------------------------------------------

CMD_LIST = 7
ATTR_CIDR = 3
PROTO_NAMES = {number: name for name, number in PROTO_NUMBERS.items()}


def _nested_attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """{type: (value start, value end)} of the attributes in data[start:end]."""
    return {kind: (value, stop) for kind, value, stop in each_attr(data, start, end)}


def _address(data: bytes, span: tuple[int, int]) -> str:
    inner = _nested_attrs(data, *span)
    if ATTR_IPADDR_IPV6 in inner:
        a, b = inner[ATTR_IPADDR_IPV6]
        return socket.inet_ntop(socket.AF_INET6, data[a:b])
    a, b = inner[ATTR_IPADDR_IPV4]
    return socket.inet_ntop(socket.AF_INET, data[a:b])


def member_text(data: bytes, start: int, end: int) -> str:
    """One IPSET_ATTR_DATA element in kube-proxy's text form: "30080",
    "10.96.0.1", "10.96.0.1,tcp:443", "10.244.1.5,tcp:8080,10.244.1.5" or
    "203.0.113.10,tcp:80,198.51.100.0/24" (a network always with its prefix
    length, as svcproxy renders it; `ipset save` drops a full-length one)."""
    a = _nested_attrs(data, start, end)
    if ATTR_IP not in a:
        p, _ = a[ATTR_PORT]
        return str(struct.unpack_from("!H", data, p)[0])
    text = _address(data, a[ATTR_IP])
    if ATTR_PORT in a:
        port = struct.unpack_from("!H", data, a[ATTR_PORT][0])[0]
        number = data[a[ATTR_PROTO][0]] if ATTR_PROTO in a else 6
        text += f",{PROTO_NAMES.get(number, str(number))}:{port}"
    if ATTR_IP2 in a:
        second = _address(data, a[ATTR_IP2])
        text += "," + second
        if ATTR_CIDR2 in a:
            text += f"/{data[a[ATTR_CIDR2][0]]}"
    return text


class IpsetReader:
    """Every set's members through one IPSET_CMD_LIST dump, parsed here:
    `ipset save` resolves each member's protocol number through NSS
    (getprotobynumber), which cost ~2.5 ms per member in the VM - seconds for a
    1,000-service node, a minute for 10,000."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sets(self, parse: Callable[[str], bool]) -> dict[str, set[str]]:
        """{set name: members} of every set; members only for the sets `parse`
        accepts (others come back empty: svcproxy only needs their names)."""
        seq = int.from_bytes(os.urandom(4), "big") or 1
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0) + _attr(ATTR_PROTOCOL,
                                                           bytes([IPSET_PROTOCOL]))
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body),
                                      (NFNL_SUBSYS_IPSET << 8) | CMD_LIST,
                                      NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        out: dict[str, set[str]] = {}
        while True:
            data = self.sock.recv(1 << 20)
            for mtype, mseq, start, end in each_message(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = error_code(data, start)
                    if code:
                        raise OSError(code, f"listing ipsets: {os.strerror(code)}"
                                      if code < 4096 else f"listing ipsets: error {code}")
                    continue
                top = _nested_attrs(data, start + _NFGEN.size, end)
                if ATTR_SETNAME not in top:
                    continue
                a, b = top[ATTR_SETNAME]
                name = data[a:b].split(b"\0", 1)[0].decode()
                members = out.setdefault(name, set())
                if ATTR_ADT in top and parse(name):
                    for _, value, stop in each_attr(data, *top[ATTR_ADT]):
                        members.add(member_text(data, value, stop))


class Ipset:
    """The ipset door of one network namespace: members read and written
    through netlink (IpsetNetlink, opened there on first use), sets created
    from `ipset restore` input."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._nl: IpsetNetlink | None = None

    def _netlink(self) -> IpsetNetlink:
        if self._nl is None:
            self._nl = opened_in(self.netns, IpsetNetlink)
        return self._nl

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def read(self, wanted: Callable[[str], bool]) -> dict[str, set[str]]:
        """The sets `wanted` accepts, with their members."""
        return {k: v for k, v in self._netlink().read(wanted).items() if wanted(k)}

    def write(self, adds: Sequence[tuple[str, str]], dels: Sequence[tuple[str, str]],
              family: int) -> list[IpsetFailure]:
        return self._netlink().write(adds, dels, family)

    def create(self, specs: Sequence[SetSpec]) -> None:
        """Create sets (-exist: one that is there alike is kept) over netlink.
        Raises KernelError naming each set the kernel refused and why."""
        refused = self._netlink().create(specs)
        if refused:
            raise KernelError("ipset create refused: " + "; ".join(
                f"{name}: " + ("a set of that name is there, of another type or size"
                               if code == errno.EEXIST else IpsetFailure.describe(code))
                for name, code in sorted(refused.items())))

    def prepare(self, types: Iterable[str]) -> None:
        """Ask the kernel for each set type's revision now (IpsetNetlink.revision:
        it loads the type's module, a modprobe each), so the first creation
        does not wait for it. Raises KernelError for a type it lacks."""
        nl = self._netlink()
        for type_name in types:
            nl.revision(type_name, nfproto_of(type_name))

    def destroy(self, names: Iterable[str]) -> dict[str, int]:
        """Destroy the sets `names` (one netlink batch, no process per set);
        {name: errno} of those the kernel refused."""
        return self._netlink().destroy(names)
