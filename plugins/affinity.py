"""Built-in plugin `affinity`: sessionAffinity ClientIP becomes a persistence
timeout (sessionAffinityConfig.clientIP.timeoutSeconds, default 10800) on every
frontend of the Service, as kube-proxy sets the IPVS persistent flag."""

from __future__ import annotations

from dataclasses import replace

from svcproxy import hookimpl
from svcproxy.ir import Frontend
from svcproxy.plan import PortContext


@hookimpl
def svcproxy_adjust_frontend(frontend: Frontend, port: PortContext) -> Frontend | None:
    if port.service.session_affinity != "ClientIP":
        return None
    return replace(frontend, persistence_timeout=port.service.affinity_timeout)
