"""The nftables datapath's full sync renders, compares and writes a chunk of
service ports at a time (datapath.CHUNK) and keeps chain digests, not text.
Against the fake nftables door (a transaction all or nothing, references
checked): chunked and whole give the same table and the same counts for a
new table, a table that drifted, and one that must be rebuilt.
tests/host/test_nftables_sync.py runs the same against the kernel."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from factories import endpoint, node, plan_of, service, slice_

from svcproxy.ir import ServiceMap
from svcproxy.plugins.kernel.fakes import FakeNft
from svcproxy.plugins.nftables import datapath
from svcproxy.plugins.nftables.datapath import FamilyResult, FamilyState, sync_family
from svcproxy.plugins.nftables.rules import NftOptions

PORTS = [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080},
         {"name": "d", "port": 53, "protocol": "UDP", "targetPort": 53}]
EP_PORTS = [{"name": "p", "port": 8080, "protocol": "TCP"},
            {"name": "d", "port": 53, "protocol": "UDP"}]
STICKY = {"sessionAffinity": "ClientIP",
          "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}


def cluster(n: int, moved: int = -1, timeout: int = 60) -> ServiceMap:
    objs: list[dict[str, Any]] = [node("node-a", ips=["192.168.1.10"])]
    for i in range(n):
        extra: dict[str, Any] = {}
        if i % 3 == 0:
            extra = {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {
                "clientIP": {"timeoutSeconds": timeout}}}
        if i % 4 == 1:
            extra = {"type": "NodePort"}
        objs += [service(f"app{i}", cluster_ip=f"10.96.1.{i + 1}", ports=PORTS, **extra),
                 slice_(f"app{i}", ports=EP_PORTS,
                        endpoints=[endpoint(f"10.244.{i + (50 if i == moved else 0)}.{j}",
                                            "node-a" if j == 1 else "node-b")
                                   for j in range(1, 3)])]
    return plan_of(objs)


def sync(state: FamilyState, plan: ServiceMap, chunk: int,
         monkeypatch: pytest.MonkeyPatch) -> FamilyResult:
    monkeypatch.setattr(datapath, "CHUNK", chunk)
    return sync_family(state, plan, None, NftOptions())


def counts(r: FamilyResult) -> tuple[int, ...]:
    return (r.chains_written, r.chains_flushed, r.chains_deleted, r.elements, r.sets,
            r.transactions, int(r.rebuilt))


def both(state: FamilyState, plan: ServiceMap, monkeypatch: pytest.MonkeyPatch
         ) -> tuple[FamilyState, FamilyResult, FamilyResult]:
    """The same full sync whole and two service ports at a time, from copies
    of `state`; the chunked state is returned, after checking they agree."""
    whole = copy.deepcopy(state)
    want = sync(whole, plan, 10_000, monkeypatch)
    got = sync(state, plan, 2, monkeypatch)
    assert state.kernel.table == whole.kernel.table
    assert counts(got) == counts(want)
    assert state.chains.have == whole.chains.have
    assert state.elements.have == whole.elements.have and state.sets.have == whole.sets.have
    return state, want, got


def test_new_table_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    state, _, got = both(FamilyState(FakeNft()), cluster(9), monkeypatch)  # type: ignore[arg-type]
    assert got.transactions == 2 and got.chains_written > 9
    texts = state.kernel.texts  # type: ignore[attr-defined]
    # the body came in parts joined per chunk, yet reads as one statement a line
    assert all(line.startswith(("add ", "flush ", "delete ")) for t in texts
               for line in t.splitlines() if line)
    # what the state keeps of a chain: its header and a digest, no rules' text
    assert all(isinstance(v[1], int) for v in state.chains.have.values())
    assert all(not hasattr(b, "chains") for b in state.blocks.values())


def test_drifted_table_repaired_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    state = FamilyState(FakeNft())  # type: ignore[arg-type]
    sync(state, cluster(9), 10_000, monkeypatch)
    kernel: FakeNft = state.kernel  # type: ignore[assignment]
    assert kernel.table is not None
    # behind svcproxy's back: one chain loses its rules, a stale service chain
    # appears; the cluster meanwhile moves app4's endpoints, drops app8 and
    # changes the affinity timeout (its sets redeclared)
    victim = next(n for n in kernel.table.chains if n.startswith("service-"))
    kernel.table.chains[victim].rules = ()
    kernel.gen += 1
    state, _, got = both(state, cluster(8, moved=4, timeout=120), monkeypatch)
    assert got.chains_written >= 2 and got.chains_flushed >= 1 and got.sets > 0
    assert kernel.table.chains[victim].rules  # repaired
    # then nothing to do, whichever way
    again = sync(state, cluster(8, moved=4, timeout=120), 2, monkeypatch)
    assert (again.chains_written, again.elements, again.sets) == (0, 0, 0)


def test_rebuilt_table_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    state = FamilyState(FakeNft())  # type: ignore[arg-type]
    sync(state, cluster(5), 10_000, monkeypatch)
    kernel: FakeNft = state.kernel  # type: ignore[assignment]
    assert kernel.table is not None
    name = next(n for n, c in kernel.table.chains.items() if c.header)
    kernel.table.chains[name].header = ("type nat hook prerouting priority 0; policy accept;",)
    kernel.gen += 1
    _, _, got = both(state, cluster(5), monkeypatch)
    assert got.rebuilt and got.transactions == 1
