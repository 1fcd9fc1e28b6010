"""Built-in plugin `nodeport`: one frontend per node address on the port's
nodePort, backends chosen by externalTrafficPolicy.

Node addresses are the plan context's NodePort addresses: the Node object's
addresses (or the host's, under `svcproxy run`) filtered by nodePortAddresses."""

from __future__ import annotations

from svcproxy import hookimpl
from svcproxy.ir import Frontend, FrontendKind
from svcproxy.plan import PortContext


@hookimpl
def svcproxy_build_frontends(port: PortContext) -> list[Frontend]:
    node_port = port.port.node_port
    if not node_port:
        return []
    policy = port.service.external_traffic_policy
    return [port.frontend(address, node_port, FrontendKind.NODE_PORT, policy, bind_address=False)
            for address in port.plan.node_port_addresses.get(port.family, ())]
