"""One netlink transport for every door that speaks netlink (IPVS generic
netlink, rtnetlink, ipset's nfnetlink): sockets, batches that ask for an ack
only on the last message (the kernel answers the others only when it refuses
them), attribute packing and walking.

The codecs on top live beside it: ipvs.py, rtnl.py, ipset.py.
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# netlink
NETLINK_GENERIC = 16
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLA_F_NESTED = 0x8000
#: IP protocol numbers of the protocols Services use (ipset and nf_tables keys)
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
NLA_TYPE_MASK = 0x3FFF

_NLMSGHDR = struct.Struct("=IHHII")
_GENLHDR = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_BE16 = struct.Struct("!H")
_FLAGS = struct.Struct("=II")


class NetlinkError(OSError):
    """A netlink request failed; errno is the kernel's answer."""


# ---- encoding ------------------------------------------------------------------------

def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))



# ---- decoding ------------------------------------------------------------------------

def each_message(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, seq, payload start, end) of every netlink message in one datagram:
    offsets into `data`, nothing copied (every reader here walks answers this way)."""
    offset, size = 0, len(data)
    while offset + 16 <= size:
        length, mtype, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < 16:
            return
        yield mtype, seq, offset + 16, offset + length
        offset += (length + 3) & ~3


def error_code(data: bytes, start: int) -> int:
    """The errno of an NLMSG_ERROR whose payload starts at `start` (0: an ack)."""
    return -int(struct.unpack_from("=i", data, start)[0])


def each_attr(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flags, value start, value end) of the attributes in
    data[start:end]."""
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def _attrs(data: bytes, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    end = len(data) if end is None else end
    while offset + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size:
            break
        yield kind & NLA_TYPE_MASK, data[offset + _NLA.size: offset + length]
        offset += (length + 3) & ~3



# ---- the socket ------------------------------------------------------------------------

@dataclass
class Failure:
    """One operation of a batch that the kernel refused."""

    op: str
    target: str
    errno: int
    #: (address, port, protocol) of the virtual server concerned, if any
    key: tuple[str, int, str] | None = None

    def __str__(self) -> str:
        return f"{self.op} {self.target}: {os.strerror(self.errno)} (errno {self.errno})"


#: bytes packed into one sendmsg (the kernel takes many messages per skb)
SEND_CHUNK = 32 * 1024


def open_socket(protocol: int) -> socket.socket:
    """A bound netlink socket with room for the acks of a whole chunk, and large
    dumps."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 * 1024 * 1024)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((0, 0))
    return sock


def send_batch(sock: socket.socket, messages: Iterable[tuple[int, bytes]],
               chunk_size: int = SEND_CHUNK) -> dict[int, int]:
    """Send (seq, message) pairs many per system call; returns {seq: errno} for
    the messages the kernel refused.

    Only the last message asks for an acknowledgement (NLM_F_ACK is set on it
    here; callers build messages without it): the kernel answers a request
    without NLM_F_ACK only when it fails, and it processes a send's messages in
    order before the call returns, so every refusal arrives before that last
    ack. Skipping the acks of the other messages saves the kernel an answer
    and svcproxy a parse per message (60,000 for 10,000 services)."""
    refused: dict[int, int] = {}
    last_seq: int | None = None
    done = False

    def drain(block: bool) -> None:
        nonlocal done
        sock.setblocking(block)
        try:
            while not done:
                try:
                    data = sock.recv(1 << 20)
                except OSError as exc:
                    if exc.errno == errno_mod.ENOBUFS:  # answers were lost
                        raise NetlinkError(exc.errno, "netlink receive buffer overflowed; "
                                           "the kernel's answers to a batch were lost") from None
                    raise
                for mtype, seq, start, _ in each_message(data):
                    if mtype == NLMSG_ERROR:
                        code = error_code(data, start)
                        if code:
                            refused[seq] = code
                        if seq == last_seq:
                            done = True
        except BlockingIOError:
            pass
        finally:
            sock.setblocking(True)

    chunk: list[bytes] = []
    size = 0
    previous: tuple[int, bytes] | None = None
    for item in messages:
        if previous is not None:
            msg = previous[1]
            if size + len(msg) > chunk_size and chunk:
                sock.send(b"".join(chunk))
                chunk, size = [], 0
                drain(block=False)  # refusals, if any, so they cannot pile up
            chunk.append(msg)
            size += len(msg)
        previous = item
    if previous is None:
        return refused
    last_seq, msg = previous
    flags = _U16.unpack_from(msg, 6)[0] | NLM_F_ACK
    chunk.append(msg[:6] + _U16.pack(flags) + msg[8:])
    sock.send(b"".join(chunk))
    drain(block=True)
    return refused
