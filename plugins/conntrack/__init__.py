"""Built-in plugin `conntrack`: the KubeProxyConfiguration `conntrack` section
applied as kube-proxy applies it (conntrack.SetSysctls), in every mode:

- maxPerCore > 0: nf_conntrack_max = maxPerCore x online CPUs, capped at
  1,048,576, at least `min`; only ever raised. The hash table
  (/sys/module/nf_conntrack/parameters/hashsize) is raised to max/4.
- tcpEstablishedTimeout, tcpCloseWaitTimeout, udpTimeout, udpStreamTimeout
  when > 0; tcpBeLiberal sets nf_conntrack_tcp_be_liberal=1.

Beyond kube-proxy: every value changed is recorded and `svcproxy cleanup` puts
it back, and a warning is logged when the table is more than 90 % full
(checked after syncs, at most every 10 minutes per state change).
Options: sysctlBackup (file), netns (tests), warnAt (fraction, default 0.9).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from svcproxy import hookimpl
from svcproxy.config import Config
from svcproxy.datapath import SyncResult
from svcproxy.errors import PluginError
from svcproxy.plugins.kernel.sysctl import DEFAULT_BACKUP, SysctlStore

log = logging.getLogger(__name__)

CAP = 1_048_576
HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"
NF = "net/netfilter/"
NAMES = (f"{NF}nf_conntrack_max", HASHSIZE, f"{NF}nf_conntrack_tcp_timeout_established",
         f"{NF}nf_conntrack_tcp_timeout_close_wait", f"{NF}nf_conntrack_tcp_be_liberal",
         f"{NF}nf_conntrack_udp_timeout", f"{NF}nf_conntrack_udp_timeout_stream")


def online_cpus(text: str | None = None) -> int:
    """CPUs in /sys/devices/system/cpu/online ("0-3,6"), as kube-proxy counts them."""
    if text is None:
        try:
            with open("/sys/devices/system/cpu/online") as f:
                text = f.read()
        except OSError:
            import os

            return os.cpu_count() or 1
    n = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return max(n, 1)


def wanted_settings(config: Config, cpus: int) -> list[tuple[str, str, bool]]:
    """(name, value, only_raise) in the order kube-proxy writes them."""
    ct = config.kube_proxy.conntrack
    out: list[tuple[str, str, bool]] = []
    if ct.max_per_core > 0:
        scaled = ct.max_per_core * cpus
        limit = CAP if scaled > CAP else max(scaled, ct.min)
        out.append((f"{NF}nf_conntrack_max", str(limit), True))
        out.append((HASHSIZE, str(limit // 4), True))
    if ct.tcp_established_timeout > 0:
        out.append((f"{NF}nf_conntrack_tcp_timeout_established",
                    str(int(ct.tcp_established_timeout)), False))
    if ct.tcp_close_wait_timeout > 0:
        out.append((f"{NF}nf_conntrack_tcp_timeout_close_wait",
                    str(int(ct.tcp_close_wait_timeout)), False))
    if ct.tcp_be_liberal:
        out.append((f"{NF}nf_conntrack_tcp_be_liberal", "1", False))
    if ct.udp_timeout > 0:
        out.append((f"{NF}nf_conntrack_udp_timeout", str(int(ct.udp_timeout)), False))
    if ct.udp_stream_timeout > 0:
        out.append((f"{NF}nf_conntrack_udp_timeout_stream", str(int(ct.udp_stream_timeout)),
                    False))
    return out


class ConntrackPlugin:
    WARN_EVERY = 600.0
    CHECK_EVERY = 10.0

    def __init__(self) -> None:
        self.config = Config()
        self.store = SysctlStore()
        self.explicit_backup = False
        self.warn_at = 0.9
        self.last_warning = 0.0
        self.last_check: float | None = None
        self.clock = time.monotonic

    @hookimpl
    def svcproxy_configure_plugin(self, config: Config, options: Mapping[str, Any]) -> None:
        self.config = config
        unknown = sorted(set(options) - {"sysctlBackup", "netns", "warnAt"})
        if unknown:
            raise PluginError(f"conntrack: unknown option {unknown[0]!r} (options: netns, "
                              "sysctlBackup, warnAt)")
        warn_at = options.get("warnAt", 0.9)
        if isinstance(warn_at, bool) or not isinstance(warn_at, int | float) or \
                not 0 < warn_at <= 1:
            raise PluginError(f"conntrack: warnAt must be a fraction in (0, 1] (got {warn_at!r})")
        self.warn_at = float(warn_at)
        self.explicit_backup = "sysctlBackup" in options
        self.store = SysctlStore(str(options.get("sysctlBackup", DEFAULT_BACKUP)),
                                 options.get("netns"))

    @hookimpl
    def svcproxy_start_proxy(self, config: Config, datapath: str) -> None:
        self.store.follow_datapath(config, datapath, self.explicit_backup)
        self.apply()

    def apply(self) -> list[str]:
        """Write the configured settings; returns the names written."""
        written = []
        for name, value, only_raise in wanted_settings(self.config, online_cpus()):
            if name.startswith("/") and self.store.netns:
                continue  # module parameters are global: not from inside a namespace
            # (nf_conntrack_max, say, is read-only outside the initial namespace)
            if self.store.ensure_or_warn(name, value, only_raise=only_raise):
                written.append(name)
        return written

    @hookimpl
    def svcproxy_prepare_node(self, config: Config, datapath: str) -> list[str]:
        self.store.follow_datapath(config, datapath, self.explicit_backup)
        return [f"sysctl {name.strip('/').replace('/', '.')}" for name in self.apply()]

    def usage(self) -> tuple[int, int] | None:
        count = self.store.read(f"{NF}nf_conntrack_count")
        limit = self.store.read(f"{NF}nf_conntrack_max")
        if count is None or limit is None or not count.isdigit() or not limit.isdigit():
            return None
        return int(count), int(limit)

    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        now = self.clock()
        if self.last_check is not None and now - self.last_check < self.CHECK_EVERY:
            return  # not on every sync of a busy node
        self.last_check = now
        used = self.usage()
        if used is None or not used[1]:
            return
        count, limit = used
        if count / limit > self.warn_at and now - self.last_warning >= self.WARN_EVERY:
            self.last_warning = now
            log.warning("the conntrack table is %.0f%% full (%d of %d entries): new "
                        "connections will be dropped when it fills; raise conntrack.maxPerCore "
                        "or conntrack.min", 100 * count / limit, count, limit)

    @hookimpl
    def svcproxy_cleanup_datapath(self) -> list[str]:
        return self.store.restore(NAMES)
