"""The doors' shapes, as Protocols: what a reconciler may ask of the kernel.
The real implementations are the modules beside this one; `fakes.py` holds
in-memory ones with the same behaviour for unit tests (kube-proxy tests its
proxiers the same way, against fakes of pkg/util/{ipvs,ipset,iptables})."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from .ipset import IpsetFailure, SetSpec
from .iptables import RestoreInput
from .ipvs import RealServer, VirtualServer
from .netlink import Failure

VSKey = tuple[str, int, str]


class IpvsBatchDoor(Protocol):
    """IPVS writes collected and sent together."""

    def __len__(self) -> int: ...
    def add_service(self, vs: VirtualServer) -> None: ...
    def update_service(self, vs: VirtualServer) -> None: ...
    def delete_service(self, vs: VirtualServer) -> None: ...
    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def commit(self) -> list[Failure]:
        """Send everything; the operations the kernel refused (the others apply)."""
        ...


class IpvsDoor(Protocol):
    """The IPVS table of one network namespace."""

    def services(self, expect: Iterable[VSKey] = ()) -> list[VirtualServer]:
        """Every virtual server, and those of `expect` a dump missed."""
        ...
    def get_services(self, keys: Sequence[VSKey]) -> list[VirtualServer]: ...
    def dests(self, vs: VirtualServer) -> list[RealServer]: ...
    def dests_of(self, services: Sequence[VirtualServer]) -> dict[VSKey, list[RealServer]]: ...
    def batch(self) -> IpvsBatchDoor: ...


class LinkDoor(Protocol):
    """A dummy link (kube-ipvs0) and the addresses bound to it."""

    def index(self, create: bool = True) -> int | None: ...
    def addresses(self) -> set[str]: ...
    def other_addresses(self) -> set[str]: ...
    def start_changes(self, add: Sequence[str], remove: Sequence[str]) -> Any:
        """Begin adding/removing addresses (in the background); a handle for
        finish_changes, which returns what the kernel refused, as text."""
        ...
    def finish_changes(self, changes: Any) -> list[str]: ...
    def delete(self) -> bool: ...


class IpsetDoor(Protocol):
    """The ipsets of one namespace, members in kube-proxy's text form."""

    def read(self, wanted: Callable[[str], bool]) -> dict[str, set[str]]: ...
    def write(self, adds: Sequence[tuple[str, str]], dels: Sequence[tuple[str, str]],
              family: int) -> Sequence[IpsetFailure]:
        """Add and delete (set, member) pairs; what the kernel refused."""
        ...
    def create(self, specs: Sequence[SetSpec]) -> None:
        """Create sets (-exist); raises KernelError naming refused ones."""
        ...
    def prepare(self, types: Iterable[str]) -> None:
        """Have the kernel load these set types (its modules) ahead of the
        first creation."""
        ...
    def destroy(self, names: Iterable[str]) -> Mapping[str, int]:
        """Destroy sets; {name: errno} of those the kernel refused."""
        ...


class IptablesDoor(Protocol):
    """One IP family's iptables, in one backend."""

    def save_all(self) -> dict[tuple[str, str], tuple[str, ...]]: ...
    def restore(self, text: RestoreInput) -> None:
        """iptables-restore --noflush; raises when refused (nothing changed)."""
        ...
    def check_restore(self, text: RestoreInput) -> None:
        """iptables-restore --test: build the input, commit nothing."""
        ...


class ConntrackDoor(Protocol):
    def delete(self, args: Sequence[str], family: int = 4) -> int: ...


class IpvsKernelDoors(Protocol):
    """The doors the IPVS reconciler uses (IpvsKernel; fakes.FakeIpvsKernel)."""

    @property
    def nl(self) -> IpvsDoor: ...
    @property
    def link(self) -> LinkDoor: ...
    @property
    def conntrack(self) -> ConntrackDoor: ...
