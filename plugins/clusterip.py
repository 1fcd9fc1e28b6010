"""Built-in plugin `clusterip` (essential): one frontend per service port on the
Service's ClusterIP of each family, backends chosen by internalTrafficPolicy."""

from __future__ import annotations

from svcproxy import hookimpl
from svcproxy.ir import Frontend, FrontendKind
from svcproxy.plan import PortContext


@hookimpl
def svcproxy_build_frontends(port: PortContext) -> list[Frontend]:
    ip = port.cluster_ip
    if ip is None:
        return []
    return [port.frontend(ip, port.port.port, FrontendKind.CLUSTER_IP,
                          port.service.internal_traffic_policy, bind_address=True)]
