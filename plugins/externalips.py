"""Built-in plugin `externalips`: one frontend per spec.externalIPs address of the
port's family, backends chosen by externalTrafficPolicy. The address is bound to
the node unless it is already one of the node's own addresses."""

from __future__ import annotations

from svcproxy import hookimpl
from svcproxy.ir import Frontend, FrontendKind
from svcproxy.plan import PortContext


@hookimpl
def svcproxy_build_frontends(port: PortContext) -> list[Frontend]:
    policy = port.service.external_traffic_policy
    return [port.frontend(ip, port.port.port, FrontendKind.EXTERNAL_IP, policy,
                          bind_address=not port.plan.is_local_address(ip))
            for ip in port.service.external_ips if port.in_family(ip)]
