"""Built-in datapath plugin `ipvs` — so far its capability probe only.

The probe is functional, as kube-proxy's is since v1.27 (PR #114669): load the
ip_vs module if needed, then create and delete a test virtual server
(198.51.100.0:20000/TCP, TEST-NET-2) with the configured scheduler. A failure
is reported in words a user can act on, and svcproxy falls back to the next
datapath.

Programming IPVS (virtual servers, real servers, kube-ipvs0, ipsets) is not in
this version yet: on a kernel where the probe succeeds the plugin still reports
itself unusable and says so, so svcproxy falls back instead of running without
rules.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess

from svcproxy import hookimpl
from svcproxy.config import Config
from svcproxy.datapath import ProbeResult

log = logging.getLogger(__name__)

NAME = "ipvs"
PROBE_ADDRESS = "198.51.100.0"
PROBE_PORT = 20000


def _load_module(name: str) -> str | None:
    """modprobe `name`; None on success, else why it failed."""
    if shutil.which("modprobe") is None:
        return "modprobe not found (install the kmod package)"
    try:
        proc = subprocess.run(["modprobe", name], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


def probe_ipvs(scheduler: str) -> str | None:
    """None when IPVS can be programmed with `scheduler` here, else the reason."""
    from pyroute2 import IPVS, IPVSService
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipvs = IPVS()
    except NetlinkError:
        why = _load_module("ip_vs")
        try:
            ipvs = IPVS()
        except NetlinkError:
            detail = f" ({why})" if why else ""
            return f"the ip_vs kernel module is not loaded and cannot be loaded{detail}"
    try:
        for svc in ipvs.service("dump"):
            # restart case: a virtual server already uses this scheduler
            if svc.get("IPVS_SVC_ATTR_SCHED_NAME") == scheduler:
                return None
        service = IPVSService(addr=PROBE_ADDRESS, port=PROBE_PORT, protocol=socket.IPPROTO_TCP,
                              sched_name=scheduler)
        try:
            ipvs.service("add", service=service)
        except NetlinkError as exc:
            if exc.code == 2:  # ENOENT: the kernel has no such scheduler module
                return f"scheduler {scheduler} not available (modprobe ip_vs_{scheduler})"
            return f"creating a test virtual server failed: {exc}"
        try:
            ipvs.service("del", service=service)
        except NetlinkError as exc:
            return f"deleting the test virtual server failed: {exc}"
    finally:
        ipvs.close()
    return None


class IpvsPlugin:
    def __init__(self) -> None:
        self.config = Config()

    @hookimpl
    def svcproxy_configure_plugin(self, config: Config) -> None:
        self.config = config

    @hookimpl
    def svcproxy_list_datapaths(self) -> list[str]:
        return [NAME]

    @hookimpl
    def svcproxy_probe_datapath(self, name: str) -> ProbeResult | None:
        if name != NAME:
            return None
        try:
            reason = probe_ipvs(self.config.kube_proxy.ipvs_scheduler)
        except Exception as exc:  # pyroute2 raises many kinds; all mean "unusable"
            reason = f"IPVS probe failed: {type(exc).__name__}: {exc}"
        if reason is None:
            reason = ("IPVS works in this kernel, but this svcproxy version cannot program "
                      "it yet (the IPVS datapath is still being built)")
        return ProbeResult.unusable(reason)
