"""Built-in plugin `loadbalancer`: one frontend per status.loadBalancer.ingress IP
of the port's family, with loadBalancerSourceRanges and backends chosen by
externalTrafficPolicy. Ingress points with ipMode Proxy are skipped (the load
balancer delivers to the node, not to the VIP), as kube-proxy does."""

from __future__ import annotations

import ipaddress

from svcproxy import hookimpl
from svcproxy.ir import Frontend, FrontendKind
from svcproxy.plan import PortContext


@hookimpl
def svcproxy_build_frontends(port: PortContext) -> list[Frontend]:
    svc = port.service
    ranges = tuple(r for r in svc.load_balancer_source_ranges
                   if ipaddress.ip_network(r).version == port.family)
    return [port.frontend(ing.ip, port.port.port, FrontendKind.LOAD_BALANCER,
                          svc.external_traffic_policy,
                          bind_address=not port.plan.is_local_address(ing.ip),
                          source_ranges=ranges)
            for ing in svc.load_balancer_ingress
            if ing.ip and ing.ip_mode != "Proxy" and port.in_family(ing.ip)]
