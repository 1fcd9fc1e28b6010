"""Endpoint selection, exactly as kube-proxy's CategorizeEndpoints does it, in one
place for every datapath (kube-proxy's pkg/proxy/topology.go).

Given every endpoint of one service port, it returns the cluster endpoints (ready
ones after topology filtering, else serving+terminating ones) and the local
endpoints (local ready ones, else local serving+terminating ones), each only when
the service's traffic policies use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .ir import Backend
from .model import EndpointSlice, Protocol

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Candidate:
    """An endpoint of a service port before selection (never hashed or shared:
    a plain slots class is four times cheaper to make than a frozen one)."""

    backend: Backend
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Categorized:
    cluster: tuple[Backend, ...] = ()
    local: tuple[Backend, ...] = ()
    #: some usable endpoint exists somewhere in the cluster
    has_any: bool = False
    uses_cluster: bool = True
    uses_local: bool = False
    #: topology mode applied to the cluster endpoints: "", PreferSameNode, PreferSameZone
    topology: str = ""


_new = object.__new__
_EMPTY: frozenset[str] = frozenset()
_SET = tuple(getattr(Backend, f).__set__ for f in (
    "address", "port", "weight", "ready", "serving", "terminating", "local", "node_name"))


def _backend(address: str, port: int, ready: bool, serving: bool, terminating: bool,
             local: bool, node_name: str) -> Backend:
    """Backend(...) without the frozen dataclass __init__ (object.__setattr__ per
    field, twice as slow), through the slots' own setters: planning makes one
    per endpoint port."""
    b = _new(Backend)
    sa, sp, sw, sr, ss, st, sl, sn = _SET
    sa(b, address)
    sp(b, port)
    sw(b, 1)
    sr(b, ready)
    ss(b, serving)
    st(b, terminating)
    sl(b, local)
    sn(b, node_name)
    return b


def endpoints_for_port(slices: Iterable[EndpointSlice], port_name: str, protocol: Protocol,
                       family: int, node_name: str) -> list[Candidate]:
    """Every endpoint of one service port in one IP family, de-duplicated.

    Slices are matched by address type; their ports by name and protocol. An
    endpoint found in several slices is kept once, preferring a local copy, as
    kube-proxy's endpoint-slice cache does."""
    address_type = "IPv4" if family == 4 else "IPv6"
    found: dict[tuple[str, int], Candidate] = {}
    for eps in sorted(slices, key=lambda s: s.name):
        if eps.address_type != address_type:
            continue
        for sp in eps.ports:
            if sp.name != port_name or sp.protocol != protocol or sp.port is None:
                continue
            for ep in eps.endpoints:
                if not ep.addresses:
                    continue
                local = bool(node_name) and ep.node_name == node_name
                key = (ep.addresses[0], sp.port)
                if key in found and not local:
                    continue
                found[key] = Candidate(
                    _backend(ep.addresses[0], sp.port, ep.ready, ep.serving, ep.terminating,
                             local, ep.node_name),
                    frozenset(ep.hint_zones) if ep.hint_zones else _EMPTY,
                    frozenset(ep.hint_nodes) if ep.hint_nodes else _EMPTY)
    return [found[k] for k in sorted(found)]


def _topology_mode(candidates: Sequence[Candidate], node_name: str, zone: str,
                   prefer_same_node: bool) -> str:
    has_for_node = has_for_zone = False
    all_node_hints = all_zone_hints = True
    any_ready = False
    for c in candidates:
        if not c.backend.ready:
            continue
        any_ready = True
        if not c.node_hints:
            all_node_hints = False
        elif node_name in c.node_hints:
            has_for_node = True
        if not c.zone_hints:
            all_zone_hints = False
        elif zone in c.zone_hints:
            has_for_zone = True
    if not any_ready:
        return ""
    if prefer_same_node and all_node_hints and has_for_node:
        return "PreferSameNode"
    if all_zone_hints:
        if has_for_zone:
            return "PreferSameZone"
        if not zone:
            log.debug("ignoring topology hints: node %s has no zone label", node_name)
        else:
            log.debug("ignoring topology hints: none for zone %s", zone)
    return ""


def _available(c: Candidate, mode: str, node_name: str, zone: str) -> bool:
    if mode == "PreferSameNode":
        return node_name in c.node_hints
    if mode == "PreferSameZone":
        return zone in c.zone_hints
    return True


def _pick(candidates: Sequence[Candidate],
          pred: Callable[[Candidate], bool]) -> tuple[Backend, ...]:
    return tuple(c.backend for c in candidates if pred(c))


def categorize(candidates: Sequence[Candidate], *, uses_cluster: bool, uses_local: bool,
               node_name: str, zone: str, prefer_same_node: bool = True) -> Categorized:
    """kube-proxy's CategorizeEndpoints."""
    cluster: tuple[Backend, ...] = ()
    local: tuple[Backend, ...] = ()
    has_any = False
    mode = ""
    if uses_cluster:
        mode = _topology_mode(candidates, node_name, zone, prefer_same_node)
        if mode:
            cluster = _pick(candidates, lambda c: c.backend.ready
                            and _available(c, mode, node_name, zone))
        else:  # no topology (most Services): every ready endpoint
            cluster = tuple(b for c in candidates if (b := c.backend).ready)
        if not cluster:
            # No ready endpoint anywhere (topology never empties a ready set: it is
            # ignored when it would), so fall back to serving+terminating ones.
            cluster = _pick(candidates, lambda c: c.backend.serving and c.backend.terminating)
        has_any = bool(cluster)
    if uses_local:
        local_ready = local_st = False
        for c in candidates:
            b = c.backend
            if b.ready:
                has_any = True
                local_ready = local_ready or b.local
            elif b.serving and b.terminating:
                has_any = True
                local_st = local_st or b.local
        if local_ready:
            local = _pick(candidates, lambda c: c.backend.local and c.backend.ready)
        elif local_st:
            local = _pick(candidates, lambda c: c.backend.local and c.backend.serving
                          and c.backend.terminating)
    return Categorized(cluster=cluster, local=local, has_any=has_any, uses_cluster=uses_cluster,
                       uses_local=uses_local, topology=mode)
