"""The iptables datapath's full sync builds its restore input a chunk of
service ports at a time (datapath.CHUNK) so the text of every chain never
exists at once. Against the fake iptables door: the chunked input does
exactly what the whole ruleset would, in one restore, every chain declared
before any rule of its table; what the state keeps is names, not text.
tests/host/test_iptables_sync.py writes a chunked input to real
iptables-restore."""

from __future__ import annotations

from typing import Any

import pytest
from factories import endpoint, node, plan_of, service, slice_

from svcproxy.plugins.iptables import datapath
from svcproxy.plugins.iptables.datapath import (
    FamilyState,
    WrittenPort,
    desired_ruleset,
    render_service_ports,
    sync_family,
)
from svcproxy.plugins.iptables.rules import RuleOptions
from svcproxy.plugins.kernel.fakes import BUILTIN_CHAINS, FakeIptables
from svcproxy.plugins.kernel.iptables import (
    RestoreInput,
    _explain_restore_failure,
    input_lines,
    restore_text,
)

PORTS = [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080},
         {"name": "d", "port": 53, "protocol": "UDP", "targetPort": 53}]
EP_PORTS = [{"name": "p", "port": 8080, "protocol": "TCP"},
            {"name": "d", "port": 53, "protocol": "UDP"}]
FOREIGN = ("nat", "SOMEONE-ELSES")
STALE = ("nat", "KUBE-SVC-STALESTALESTALE")


def cluster(n: int, first_ep: int = 1) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [node("node-a", ips=["192.168.1.10"])]
    for i in range(n):
        out += [service(f"app{i}", cluster_ip=f"10.96.1.{i + 1}", ports=PORTS),
                slice_(f"app{i}", ports=EP_PORTS,
                       endpoints=[endpoint(f"10.244.{first_ep + i}.{j}", "node-b")
                                  for j in range(1, 3)])]
    return out


class Recording(FakeIptables):
    """The fake door, keeping each restore's input as it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[RestoreInput] = []
        self.chains[FOREIGN] = ("-A SOMEONE-ELSES -j ACCEPT",)
        self.chains[STALE] = ("-A KUBE-SVC-STALESTALESTALE -j ACCEPT",)

    def restore(self, text: RestoreInput) -> None:
        self.inputs.append(text)
        super().restore(text)


def full_sync(chunk: int, monkeypatch: pytest.MonkeyPatch, n: int = 9
              ) -> tuple[Recording, FamilyState, datapath.FamilyResult]:
    monkeypatch.setattr(datapath, "CHUNK", chunk)
    kernel = Recording()
    state = FamilyState(kernel)  # type: ignore[arg-type]
    result = sync_family(state, plan_of(cluster(n)), None, RuleOptions())
    return kernel, state, result


def test_chunked_input_does_what_the_whole_ruleset_does(monkeypatch: pytest.MonkeyPatch) -> None:
    whole, _, want = full_sync(10_000, monkeypatch)
    chunked, state, got = full_sync(2, monkeypatch)
    opts = RuleOptions()
    plan = plan_of(cluster(9))
    expected = desired_ruleset(render_service_ports(plan, None, opts), opts)
    # the kernel holds exactly the desired chains, the foreign chain and the
    # built-in ones (with svcproxy's jumps); the stale one is gone
    ours = {k: v for k, v in chunked.chains.items() if k not in BUILTIN_CHAINS}
    assert ours == {**expected, FOREIGN: ("-A SOMEONE-ELSES -j ACCEPT",)}
    assert chunked.chains == whole.chains
    assert (got.written, got.deleted, got.jumps) == (want.written, want.deleted, want.jumps)
    assert got.deleted == [STALE]
    # one restore, in parts: 18 service ports two at a time, then the rest
    assert chunked.restores == 1 and len(chunked.inputs) == 1
    parts = chunked.inputs[0]
    assert not isinstance(parts, str) and len(parts) > 9
    assert all(p.endswith("\n") for p in parts)
    # within each table, every chain is declared before the first rule
    table, ruled = "", False
    for line in input_lines(parts):
        if line.startswith("*"):
            table, ruled = line[1:], False
        elif line.startswith(":"):
            assert not ruled, f"{table}: {line} declared after a rule"
        elif line.startswith("-A "):
            ruled = True
    # what the state keeps: chain names and fragments, not chains' text
    assert all(isinstance(w, WrittenPort) for w in state.sp_rules.values())
    assert {c for w in state.sp_rules.values() for c in w.names} == {
        c for c in expected if c[1].startswith(("KUBE-SVC-", "KUBE-SEP-"))}


def test_chunked_sync_then_nothing_then_only_the_change(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, state, _ = full_sync(2, monkeypatch)
    plan = plan_of(cluster(9))
    assert sync_family(state, plan, None, RuleOptions()).written == []
    assert kernel.restores == 1  # a full sync with nothing to change writes nothing
    moved = plan_of([*cluster(9)[:-1], slice_(
        "app8", ports=EP_PORTS, endpoints=[endpoint("10.244.99.1", "node-b")])])
    changed = [k for k in moved.frontends if k.address == "10.96.1.9"]
    res = sync_family(state, moved, changed, RuleOptions())
    assert res.written and all("KUBE-SVC-" in c or "KUBE-SEP-" in c for _, c in res.written)
    again = FakeIptables()
    sync_family(FamilyState(again), moved, None, RuleOptions())  # type: ignore[arg-type]
    assert {k: v for k, v in kernel.chains.items() if k not in (FOREIGN,)} == again.chains


def test_a_refusal_names_the_line_across_parts() -> None:
    parts = ["*nat\n:KUBE-SVC-A - [0:0]\n", "-A KUBE-SVC-A -j NOWHERE\nCOMMIT\n"]
    text = _explain_restore_failure("iptables-restore: line 3 failed", parts)
    assert "(input line 3: -A KUBE-SVC-A -j NOWHERE)" in text
    assert "input line" not in _explain_restore_failure("line 9 failed", parts)
    assert restore_text({("nat", "A"): ("-A A -j B",)}, []) == "".join(
        ["*nat\n", ":A - [0:0]\n", "-A A -j B\n", "COMMIT\n"])
