"""Doors that read the real kernel and only record what they are asked to write.

`svcproxy plan --against-kernel` runs a datapath's own full sync through them,
on a fresh reconciler that knows nothing (as at start-up): what it prints is
what the first sync of `svcproxy run` would change on this node, and nothing
changes. Each wrapper takes the real door and a Changes list; reads pass
through, writes become one line each (in the tools' own syntax where there is
one: `ipvsadm`, `ipset`, iptables chains).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .doors import IpsetDoor, IpvsDoor, LinkDoor, VSKey
from .ipset import IpsetFailure, SetSpec
from .iptables import RestoreInput, input_lines
from .ipvs import RealServer, VirtualServer, ipvsadm_dest, ipvsadm_service
from .netlink import Failure


class Changes(list[str]):
    """The recorded writes, in order, one line each."""


class PreviewBatch:
    def __init__(self, changes: Changes) -> None:
        self.changes = changes
        self.ops: list[str] = []

    def __len__(self) -> int:
        return len(self.ops)

    def add_service(self, vs: VirtualServer) -> None:
        self.ops.append("ipvsadm " + ipvsadm_service(vs, "-A"))

    def update_service(self, vs: VirtualServer) -> None:
        self.ops.append("ipvsadm " + ipvsadm_service(vs, "-E"))

    def delete_service(self, vs: VirtualServer) -> None:
        self.ops.append("ipvsadm " + ipvsadm_service(vs, "-D"))

    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.ops.append("ipvsadm " + ipvsadm_dest(vs, rs, "-a"))

    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.ops.append("ipvsadm " + ipvsadm_dest(vs, rs, "-e"))

    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.ops.append("ipvsadm " + ipvsadm_dest(vs, rs, "-d"))

    def commit(self) -> list[Failure]:
        self.changes.extend(self.ops)
        return []


class PreviewIpvs:
    def __init__(self, real: IpvsDoor, changes: Changes) -> None:
        self.real = real
        self.changes = changes

    def services(self, expect: Iterable[VSKey] = ()) -> list[VirtualServer]:
        return self.real.services(expect)

    def get_services(self, keys: Sequence[VSKey]) -> list[VirtualServer]:
        return self.real.get_services(keys)

    def dests(self, vs: VirtualServer) -> list[RealServer]:
        return self.real.dests(vs)

    def dests_of(self, services: Sequence[VirtualServer]) -> dict[VSKey, list[RealServer]]:
        return self.real.dests_of(services)

    def batch(self) -> PreviewBatch:
        return PreviewBatch(self.changes)


class PreviewLink:
    def __init__(self, real: LinkDoor, changes: Changes, name: str = "kube-ipvs0") -> None:
        self.real = real
        self.changes = changes
        self.name = name

    def index(self, create: bool = True) -> int | None:
        index = self.real.index(create=False)
        if index is None and create:
            self.changes.append(f"ip link add {self.name} type dummy")
        return index

    def addresses(self) -> set[str]:
        return self.real.addresses() if self.real.index(create=False) is not None else set()

    def other_addresses(self) -> set[str]:
        return self.real.other_addresses()

    def start_changes(self, add: Sequence[str], remove: Sequence[str]) -> Any:
        if add and self.real.index(create=False) is None:
            self.changes.append(f"ip link add {self.name} type dummy")
        for address in add:
            self.changes.append(f"ip addr add {address}/{128 if ':' in address else 32} "
                                f"dev {self.name}")
        for address in remove:
            self.changes.append(f"ip addr del {address}/{128 if ':' in address else 32} "
                                f"dev {self.name}")
        return None

    def finish_changes(self, changes: Any) -> list[str]:
        return []

    def delete(self) -> bool:
        self.changes.append(f"ip link del {self.name}")
        return True


class PreviewConntrack:
    def __init__(self, changes: Changes) -> None:
        self.changes = changes

    def delete(self, args: Sequence[str], family: int = 4) -> int:
        self.changes.append(f"conntrack -D -f ipv{family} " + " ".join(args))
        return 0


class PreviewIpset:
    def __init__(self, real: IpsetDoor, changes: Changes) -> None:
        self.real = real
        self.changes = changes

    def read(self, wanted: Callable[[str], bool]) -> dict[str, set[str]]:
        return self.real.read(wanted)

    def write(self, adds: Sequence[tuple[str, str]], dels: Sequence[tuple[str, str]],
              family: int) -> Sequence[IpsetFailure]:
        self.changes.extend(f"ipset add {name} {member}" for name, member in adds)
        self.changes.extend(f"ipset del {name} {member}" for name, member in dels)
        return []

    def create(self, specs: Sequence[SetSpec]) -> None:
        self.changes.extend(f"ipset {spec.text()}" for spec in specs)

    def prepare(self, types: Iterable[str]) -> None:
        pass  # (changes nothing)

    def destroy(self, names: Iterable[str]) -> dict[str, int]:
        self.changes.extend(f"ipset destroy {name}" for name in names)
        return {}


def describe_restore(text: RestoreInput, command: str = "iptables") -> list[str]:
    """One line per chain an iptables-restore --noflush input (restore_text's)
    writes or deletes, and per rule it inserts into or deletes from a chain."""
    out: list[str] = []
    table = ""
    declared: list[str] = []
    rules: dict[str, int] = {}
    deleted: set[str] = set()
    for line in input_lines(text):
        if line.startswith("*"):
            table, declared, rules, deleted = line[1:], [], {}, set()
        elif line.startswith(":"):
            declared.append(line[1:].split()[0])
        elif line.startswith("-A "):
            chain = line.split()[1]
            rules[chain] = rules.get(chain, 0) + 1
        elif line.startswith("-X "):
            deleted.add(line.split()[1])
        elif line.startswith(("-I ", "-D ")):
            out.append(f"{command} -t {table} {line}")
        elif line == "COMMIT":
            for chain in declared:
                if chain in deleted:
                    out.append(f"{command} -t {table} -X {chain}")
                else:
                    out.append(f"{command} -t {table} write {chain} "
                               f"({rules.get(chain, 0)} rules)")
    return out


class PreviewIptables:
    """For IptablesDoor users (save_all / restore) and the iptables datapath's
    IptablesKernel (save per table, conntrack_delete): reads pass through."""

    def __init__(self, real: Any, changes: Changes, command: str = "iptables") -> None:
        self.real = real
        self.changes = changes
        self.command = command

    def __getattr__(self, name: str) -> Any:
        # family, backend, available(), ... of the real kernel
        return getattr(self.real, name)

    def save_all(self) -> dict[tuple[str, str], tuple[str, ...]]:
        result: dict[tuple[str, str], tuple[str, ...]] = self.real.save_all()
        return result

    def save(self, table: str) -> dict[str, tuple[str, ...]]:
        result: dict[str, tuple[str, ...]] = self.real.save(table)
        return result

    def restore(self, text: RestoreInput) -> None:
        self.changes.extend(describe_restore(text, self.command))

    def check_restore(self, text: RestoreInput) -> None:
        pass  # (commits nothing: no change to show)

    def conntrack_delete(self, args: Sequence[str]) -> int:
        self.changes.append("conntrack -D " + " ".join(args))
        return 0

