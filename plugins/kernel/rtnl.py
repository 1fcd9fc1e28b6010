"""rtnetlink, packed and parsed here (pyroute2's generic machinery cost
seconds under emulation): links looked up, created and deleted, addresses
dumped, and address changes sent in batches from a background thread.

`DummyLink` is the door the IPVS datapath uses for kube-ipvs0.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence

from .netlink import (
    _NLMSGHDR,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    _attr,
    each_attr,
    each_message,
    error_code,
    open_socket,
    send_batch,
)
from .netns import opened_in

DUMMY = "kube-ipvs0"

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2
_IFADDRMSG = struct.Struct("=BBBBI")
#: ifaddrmsg (family, prefix length, flags, scope, index), then IFA_LOCAL and
#: IFA_ADDRESS with the same address, as `ip address add` sends them
_ADDR4 = struct.Struct("=BBBBI HH4s HH4s")
_ADDR6 = struct.Struct("=BBBBI HH16s HH16s")


def dump_addresses(sock: socket.socket) -> Iterator[tuple[int, str]]:
    """(interface index, address) of every address in the socket's namespace,
    from one RTM_GETADDR dump."""
    seq = int.from_bytes(os.urandom(4), "big") or 1
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR,
                             NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
    while True:
        data = sock.recv(1 << 20)
        for mtype, mseq, start, end in each_message(data):
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                code = error_code(data, start)
                raise OSError(code, f"listing addresses: {os.strerror(code)}")
            if mtype == RTM_NEWADDR:
                family, _, _, _, index = _IFADDRMSG.unpack_from(data, start)
                for kind, value, stop in each_attr(data, start + _IFADDRMSG.size, end):
                    if kind == IFA_ADDRESS:
                        yield index, socket.inet_ntop(family, data[value:stop])
                        break


RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
#: ifinfomsg: family (+ padding), type, index, flags, change
_IFINFOMSG = struct.Struct("=BxHiII")


def rt_request(sock: socket.socket, mtype: int, flags: int, body: bytes) -> list[bytes]:
    """One rtnetlink request with an ack; the payloads of the replies before it.
    A refusal raises OSError with the kernel's errno."""
    seq = int.from_bytes(os.urandom(4), "big") or 1
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype,
                             NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0) + body)
    replies: list[bytes] = []
    while True:
        data = sock.recv(1 << 20)
        for kind, mseq, start, end in each_message(data):
            if mseq != seq:
                continue
            if kind == NLMSG_ERROR:
                code = error_code(data, start)
                if code:
                    raise OSError(code, os.strerror(code))
                return replies
            replies.append(data[start:end])


def link_index(sock: socket.socket, name: str) -> int | None:
    """The index of the link called `name`, None when there is none."""
    try:
        replies = rt_request(sock, RTM_GETLINK, 0, _IFINFOMSG.pack(0, 0, 0, 0, 0)
                             + _attr(IFLA_IFNAME, name.encode() + b"\0"))
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return int(_IFINFOMSG.unpack_from(replies[0])[2]) if replies else None


def create_dummy(sock: socket.socket, name: str) -> None:
    """`ip link add NAME type dummy` (left down)."""
    linkinfo = _attr(IFLA_INFO_KIND, b"dummy")
    rt_request(sock, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
               _IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
               + _attr(IFLA_LINKINFO | 0x8000, linkinfo))


class AddressChanges:
    """kube-ipvs0 address additions and removals sent by a background thread
    (the socket calls release the GIL while the kernel works). "Already there"
    on add and "not there" on delete count as done."""

    def __init__(self, sock: socket.socket, index: int, add: Sequence[str],
                 remove: Sequence[str], link: str = DUMMY) -> None:
        self.sock = sock
        self.link = link
        self.index = index
        self.ops = [*((RTM_NEWADDR, a) for a in add), *((RTM_DELADDR, a) for a in remove)]
        self.refused: dict[int, int] = {}
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def _messages(self) -> Iterator[tuple[int, bytes]]:
        for seq, (kind, address) in enumerate(self.ops, 1):
            flags = NLM_F_REQUEST | (NLM_F_CREATE | NLM_F_EXCL if kind == RTM_NEWADDR else 0)
            if ":" in address:
                raw = socket.inet_pton(socket.AF_INET6, address)
                body = _ADDR6.pack(socket.AF_INET6, 128, 0, 0, self.index, 20, IFA_LOCAL, raw,
                                   20, IFA_ADDRESS, raw)
            else:
                raw = socket.inet_pton(socket.AF_INET, address)
                body = _ADDR4.pack(socket.AF_INET, 32, 0, 0, self.index, 8, IFA_LOCAL, raw,
                                   8, IFA_ADDRESS, raw)
            yield seq, _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body

    def _run(self) -> None:
        try:
            self.refused = send_batch(self.sock, self._messages())
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="kube-ipvs0-addresses",
                                       daemon=True)
        self.thread.start()

    def finish(self) -> list[str]:
        if self.thread is not None:
            self.thread.join()
            # the thread refers back to this object: no cycle left holding the
            # socket (and so its network namespace) until a garbage collection
            self.thread = None
        if self.error is not None:
            return [f"kube-ipvs0 addresses: {self.error}"]
        out = []
        for seq, code in sorted(self.refused.items()):
            kind, address = self.ops[seq - 1]
            if (kind, code) in ((RTM_NEWADDR, errno.EEXIST), (RTM_DELADDR, errno.EADDRNOTAVAIL),
                                (RTM_DELADDR, errno.ENOENT)):
                continue
            verb = "add" if kind == RTM_NEWADDR else "delete"
            out.append(f"{verb} address {address} on {self.link}: {os.strerror(code)} "
                       f"(errno {code})")
        return out


class DummyLink:
    """A dummy link (kube-ipvs0) and its addresses, in the host or in a network
    namespace: the socket is opened there and stays bound to it."""

    def __init__(self, netns: str | None = None, name: str = DUMMY) -> None:
        self.netns = netns
        self.name = name
        self._rt: socket.socket | None = None

    def close(self) -> None:
        if self._rt is not None:
            self._rt.close()
            self._rt = None

    def _socket(self) -> socket.socket:
        if self._rt is None:
            self._rt = opened_in(self.netns, lambda: open_socket(NETLINK_ROUTE))
        return self._rt

    def index(self, create: bool = True) -> int | None:
        """The link's index; with `create`, made first when missing (left DOWN,
        as kube-proxy does: the addresses are local all the same)."""
        sock = self._socket()
        index = link_index(sock, self.name)
        if index is not None or not create:
            return index
        try:
            create_dummy(sock, self.name)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise OSError(code, f"cannot create {self.name} (a dummy link; is the dummy "
                                f"kernel module available?): {os.strerror(code)}") from None
        return link_index(sock, self.name)

    def addresses(self) -> set[str]:
        """The addresses on the link, from one RTM_GETADDR dump parsed here
        (pyroute2's generic decoding of 10,000 addresses took seconds)."""
        index = self.index(create=False)
        if index is None:
            return set()
        return {a for i, a in dump_addresses(self._socket()) if i == index}

    def other_addresses(self) -> set[str]:
        """Every address in the namespace that is not on this link (the node's
        own addresses, when the link is kube-ipvs0)."""
        index = self.index(create=False)
        return {a for i, a in dump_addresses(self._socket()) if i != index}

    def start_changes(self, add: Sequence[str], remove: Sequence[str]
                      ) -> AddressChanges | None:
        """Add and remove addresses (full-length prefixes) through batched
        rtnetlink in a background thread, while the caller goes on;
        `finish_changes` waits and returns what the kernel refused. Adding many
        /32s to one device is quadratic in the kernel (natively 37 ms for 1,000,
        1.6 s for 10,000): worth overlapping. (pyroute2's namespace proxy took
        ~50 ms per request under emulation, and `ip -batch` costs two process
        starts there.)"""
        if add:
            index = self.index()
        else:
            index = self.index(create=False) if remove else None
            if index is None:
                return None
        assert index is not None
        changes = AddressChanges(self._socket(), index, add, remove, self.name)
        changes.start()
        return changes

    @staticmethod
    def finish_changes(changes: AddressChanges | None) -> list[str]:
        """Wait for the background address changes; the refused ones, as text."""
        return changes.finish() if changes is not None else []

    def delete(self) -> bool:
        """Remove the link (and its addresses); False when there is none."""
        index = self.index(create=False)
        if index is None:
            return False
        rt_request(self._socket(), RTM_DELLINK, 0, _IFINFOMSG.pack(0, 0, index, 0, 0))
        return True
