"""svcproxy-drain-nodes: an example third-party svcproxy plugin.

Before a node is taken down for maintenance, an operator lists it here; every
backend running on it gets weight 0, so it receives no new connections while
its established ones finish (IPVS keeps existing connections to weight-0 real
servers). Enable it in the SvcProxyConfiguration document:

    enable:
      - name: drain-nodes
        options:
          nodes: [node-b, node-c]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from svcproxy import hookimpl
from svcproxy.errors import PluginError
from svcproxy.ir import Frontend


class DrainNodes:
    def __init__(self) -> None:
        self.nodes: frozenset[str] = frozenset()

    @hookimpl
    def svcproxy_configure_plugin(self, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - {"nodes"})
        if unknown:
            raise PluginError(f"unknown option {unknown[0]!r} (this plugin takes: nodes)")
        nodes = options.get("nodes", [])
        if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
            raise PluginError(f"nodes: must be a list of node names (got {nodes!r})")
        self.nodes = frozenset(nodes)

    @hookimpl
    def svcproxy_adjust_frontend(self, frontend: Frontend) -> Frontend | None:
        if not any(b.node_name in self.nodes for b in frontend.backends):
            return None
        backends = tuple(replace(b, weight=0) if b.node_name in self.nodes else b
                         for b in frontend.backends)
        return replace(frontend, backends=backends)
