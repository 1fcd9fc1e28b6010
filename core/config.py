"""Configuration: kube-proxy's KubeProxyConfiguration (v1alpha1), read unchanged,
plus svcproxy's own SvcProxyConfiguration document.

A config file holds one or both documents; it may also be kube-proxy's ConfigMap
with the configuration under ``data["config.conf"]``. Defaults and validation
follow kube-proxy (see docs/configuration.md). Every problem names the file, the
field path and the bad value; all problems of a file are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .durations import format_duration, parse_duration
from .errors import ConfigError, ConfigProblem, show
from .yamlio import line_of, load_documents, syntax_error_line, syntax_error_text

KUBE_PROXY_API = "kubeproxy.config.k8s.io/v1alpha1"
KUBE_PROXY_KIND = "KubeProxyConfiguration"
SVCPROXY_API = "svcproxy.io/v1alpha1"
SVCPROXY_KIND = "SvcProxyConfiguration"

#: Datapaths in the order svcproxy tries them when the config does not say.
DEFAULT_DATAPATHS: tuple[str, ...] = ("ipvs", "nftables", "iptables")
#: Built-in feature plugins enabled when the config does not list plugins.
DEFAULT_PLUGINS: tuple[str, ...] = ("clusterip", "nodeport", "externalips", "loadbalancer",
                                    "affinity", "metrics", "conntrack", "metallb")
MODES = ("", "ipvs", "iptables", "nftables")
DETECT_LOCAL_MODES = ("", "ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")


class _FieldError(Exception):
    """Raised by a field parser; the loader adds file, path and line."""


Parser = Callable[[Any], Any]


def _opt(json_name: str, parse: Parser, default: Any = None, *,
         factory: Callable[[], Any] | None = None, default_if_zero: bool = False) -> Any:
    meta = {"json": json_name, "parse": parse, "default_if_zero": default_if_zero}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---- field parsers --------------------------------------------------------------

def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _FieldError(f"must be a string (got {show(value)})")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(f"must be true or false (got {show(value)})")
    return value


def _int(lo: int | None = None, hi: int | None = None) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(f"must be an integer (got {show(value)})")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                raise _FieldError(f"must be >= {lo} (got {value})")
            raise _FieldError(f"must be between {lo} and {hi} (got {value})")
        return value
    return parse


def _number(lo: float = 0) -> Parser:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _FieldError(f"must be a number (got {show(value)})")
        if value < lo:
            raise _FieldError(f"must be >= {lo:g} (got {value})")
        return float(value)
    return parse


def _duration(nonnegative: bool = True) -> Parser:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _FieldError(f"must be a duration such as 30s or 1h30m (got {show(value)})")
        if isinstance(value, int):
            if value != 0:
                raise _FieldError(f"missing unit in duration {value} (use e.g. 30s, 5m, 1h)")
            return 0.0
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _FieldError(str(exc)) from None
        if nonnegative and seconds < 0:
            raise _FieldError(f"must be greater than or equal to 0 (got {value!r})")
        return seconds
    return parse


def _enum(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            hint = _nearest(str(value), [c for c in choices if c])
            raise _FieldError(f"must be one of {shown} (got {show(value)}){hint}")
        return str(value)
    return parse


def _ip(value: Any) -> str:
    s = _str(value)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise _FieldError(f"not a valid IP address (got {show(value)})") from None


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise _FieldError(f"not a valid CIDR (got {show(text)})") from None


def _cidr_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _FieldError(f"must be a list of CIDRs (got {show(value)})")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(_cidr(_str(item)))
        except _FieldError as exc:
            raise _FieldError(f"[{i}]: {exc}") from None
    return tuple(out)


def _host_port(default_port: int) -> Parser:
    def parse(value: Any) -> str:
        s = _str(value).strip()
        if not s:
            return ""
        host, port = _split_host_port(s)
        if port is None:
            port = default_port
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise _FieldError(f"must be IP:port (got {show(value)})") from None
        if not 1 <= port <= 65535:
            raise _FieldError(f"port must be between 1 and 65535 (got {show(value)})")
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return parse


def _split_host_port(s: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", s)
    if m:
        return m.group(1), int(m.group(2)) if m.group(2) else None
    if s.count(":") == 1:
        host, _, port = s.partition(":")
        if not port.isdigit():
            raise _FieldError(f"must be IP:port (got {s!r})")
        return host, int(port)
    return s, None


def _port_range(value: Any) -> str:
    s = _str(value).strip()
    if not s:
        return ""
    m = re.fullmatch(r"(\d+)(?:[-+](\d+))?", s)
    if not m or int(m.group(1)) > 65535 or (m.group(2) and int(m.group(2)) > 65535):
        raise _FieldError(f"must be a port range such as 30000-32767 (got {show(value)})")
    return s


def _gates(value: Any) -> dict[str, bool]:
    if not isinstance(value, dict):
        raise _FieldError(f"must be a map of gate name to true/false (got {show(value)})")
    out = {}
    for k, v in value.items():
        if not isinstance(v, bool):
            raise _FieldError(f"{k}: must be true or false (got {show(v)})")
        out[str(k)] = v
    return out


def _any(value: Any) -> Any:
    return value


def _node_port_addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _FieldError(f"must be a list of CIDRs or the keyword 'primary' (got {show(value)})")
    keywords = {"primary", "all", "localhost"}
    if any(v in keywords for v in value) and len(value) > 1:
        raise _FieldError(f"the keywords {sorted(keywords)} cannot be mixed with other entries "
                          f"(got {show(value)})")
    if len(value) == 1 and value[0] in keywords:
        return (str(value[0]),)
    return _cidr_list(value)


def _cluster_cidr(value: Any) -> tuple[str, ...]:
    s = _str(value).strip()
    if not s:
        return ()
    parts = [p.strip() for p in s.split(",")]
    if len(parts) > 2:
        raise _FieldError(f"at most two CIDRs, one per IP family (got {show(value)})")
    nets = [_cidr(p) for p in parts]
    if len(nets) == 2 and ipaddress.ip_network(nets[0]).version == \
            ipaddress.ip_network(nets[1]).version:
        raise _FieldError(f"a dual-stack pair needs one IPv4 and one IPv6 CIDR (got {show(value)})")
    return tuple(nets)


# ---- KubeProxyConfiguration ----------------------------------------------------

@dataclass(frozen=True)
class ClientConnection:
    kubeconfig: str = _opt("kubeconfig", _str, "")
    accept_content_types: str = _opt("acceptContentTypes", _str, "")
    content_type: str = _opt("contentType", _str, "application/vnd.kubernetes.protobuf")
    qps: float = _opt("qps", _number(), 5.0)
    burst: int = _opt("burst", _int(0), 10)


@dataclass(frozen=True)
class Logging:
    format: str = _opt("format", _enum("text", "json"), "text")
    flush_frequency: Any = _opt("flushFrequency", _any, "5s")
    verbosity: int = _opt("verbosity", _int(0), 0)
    vmodule: Any = _opt("vmodule", _any, None)
    options: Any = _opt("options", _any, None)


@dataclass(frozen=True)
class IPTables:
    masquerade_bit: int = _opt("masqueradeBit", _int(0, 31), 14)
    masquerade_all: bool = _opt("masqueradeAll", _bool, False)
    localhost_node_ports: bool = _opt("localhostNodePorts", _bool, True)
    sync_period: float = _opt("syncPeriod", _duration(), 30.0, default_if_zero=True)
    min_sync_period: float = _opt("minSyncPeriod", _duration(), 1.0)
    snat_node_internal_ip: Any = _opt("snatNodeInternalIP", _any, None)


#: every scheduler Linux IPVS offers ("" = rr); kube-proxy validates the same way
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh",
                   "fo", "ovf", "twos")


@dataclass(frozen=True)
class IPVS:
    sync_period: float = _opt("syncPeriod", _duration(), 30.0, default_if_zero=True)
    min_sync_period: float = _opt("minSyncPeriod", _duration(), 0.0)
    scheduler: str = _opt("scheduler", _enum("", *IPVS_SCHEDULERS), "")
    exclude_cidrs: tuple[str, ...] = _opt("excludeCIDRs", _cidr_list, ())
    strict_arp: bool = _opt("strictARP", _bool, False)
    tcp_timeout: float = _opt("tcpTimeout", _duration(), 0.0)
    tcp_fin_timeout: float = _opt("tcpFinTimeout", _duration(), 0.0)
    udp_timeout: float = _opt("udpTimeout", _duration(), 0.0)


@dataclass(frozen=True)
class NFTables:
    masquerade_bit: int = _opt("masqueradeBit", _int(0, 31), 14)
    masquerade_all: bool = _opt("masqueradeAll", _bool, False)
    sync_period: float = _opt("syncPeriod", _duration(), 30.0, default_if_zero=True)
    min_sync_period: float = _opt("minSyncPeriod", _duration(), 1.0)


@dataclass(frozen=True)
class Conntrack:
    max_per_core: int = _opt("maxPerCore", _int(0), 32768)
    min: int = _opt("min", _int(0), 131072)
    tcp_established_timeout: float = _opt("tcpEstablishedTimeout", _duration(), 86400.0)
    tcp_close_wait_timeout: float = _opt("tcpCloseWaitTimeout", _duration(), 3600.0)
    tcp_be_liberal: bool = _opt("tcpBeLiberal", _bool, False)
    udp_timeout: float = _opt("udpTimeout", _duration(), 0.0)
    udp_stream_timeout: float = _opt("udpStreamTimeout", _duration(), 0.0)


@dataclass(frozen=True)
class DetectLocal:
    bridge_interface: str = _opt("bridgeInterface", _str, "")
    interface_name_prefix: str = _opt("interfaceNamePrefix", _str, "")
    cluster_cidrs: Any = _opt("clusterCIDRs", _any, None)


@dataclass(frozen=True)
class WinKernel:
    network_name: str = _opt("networkName", _str, "")
    source_vip: str = _opt("sourceVip", _str, "")
    enable_dsr: bool = _opt("enableDSR", _bool, False)
    root_hns_endpoint_name: str = _opt("rootHnsEndpointName", _str, "")
    forward_health_check_vip: bool = _opt("forwardHealthCheckVip", _bool, False)


def _section(cls: type[Any]) -> Parser:
    # Marker parser: the loader recurses into nested dataclasses itself.
    def parse(value: Any) -> Any:
        raise AssertionError("sections are parsed by the loader")
    parse.section = cls  # type: ignore[attr-defined]
    return parse


@dataclass(frozen=True)
class KubeProxyConfiguration:
    """kube-proxy's configuration with kube-proxy's defaults applied."""

    api_version: str = _opt("apiVersion", _enum(KUBE_PROXY_API), KUBE_PROXY_API)
    kind: str = _opt("kind", _enum(KUBE_PROXY_KIND), KUBE_PROXY_KIND)
    feature_gates: dict[str, bool] = _opt("featureGates", _gates, factory=dict)
    client_connection: ClientConnection = _opt("clientConnection", _section(ClientConnection),
                                               factory=ClientConnection)
    logging: Logging = _opt("logging", _section(Logging), factory=Logging)
    hostname_override: str = _opt("hostnameOverride", _str, "")
    bind_address: str = _opt("bindAddress", _ip, "0.0.0.0")
    healthz_bind_address: str = _opt("healthzBindAddress", _host_port(10256), "0.0.0.0:10256")
    metrics_bind_address: str = _opt("metricsBindAddress", _host_port(10249), "127.0.0.1:10249")
    bind_address_hard_fail: bool = _opt("bindAddressHardFail", _bool, False)
    enable_profiling: bool = _opt("enableProfiling", _bool, False)
    show_hidden_metrics_for_version: str = _opt("showHiddenMetricsForVersion", _str, "")
    mode: str = _opt("mode", _enum(*MODES), "")
    iptables: IPTables = _opt("iptables", _section(IPTables), factory=IPTables)
    ipvs: IPVS = _opt("ipvs", _section(IPVS), factory=IPVS)
    nftables: NFTables = _opt("nftables", _section(NFTables), factory=NFTables)
    winkernel: WinKernel = _opt("winkernel", _section(WinKernel), factory=WinKernel)
    detect_local_mode: str = _opt("detectLocalMode", _enum(*DETECT_LOCAL_MODES), "")
    detect_local: DetectLocal = _opt("detectLocal", _section(DetectLocal), factory=DetectLocal)
    cluster_cidr: tuple[str, ...] = _opt("clusterCIDR", _cluster_cidr, ())
    node_port_addresses: tuple[str, ...] = _opt("nodePortAddresses", _node_port_addresses, ())
    oom_score_adj: int = _opt("oomScoreAdj", _int(-1000, 1000), -999)
    conntrack: Conntrack = _opt("conntrack", _section(Conntrack), factory=Conntrack)
    config_sync_period: float = _opt("configSyncPeriod", _duration(), 900.0)
    port_range: str = _opt("portRange", _port_range, "")
    windows_run_as_service: bool = _opt("windowsRunAsService", _bool, False)

    # -- effective values, as kube-proxy's v1alpha1 -> internal conversion derives them

    def _mode_section(self) -> IPTables | IPVS | NFTables:
        if self.mode == "ipvs":
            return self.ipvs
        if self.mode == "nftables":
            return self.nftables
        return self.iptables

    @property
    def sync_period(self) -> float:
        """The effective syncPeriod: from the section of the configured mode."""
        return self._mode_section().sync_period

    @property
    def min_sync_period(self) -> float:
        return self._mode_section().min_sync_period

    @property
    def masquerade_all(self) -> bool:
        if self.mode == "nftables":
            return self.nftables.masquerade_all
        return self.iptables.masquerade_all

    @property
    def masquerade_bit(self) -> int:
        if self.mode == "nftables":
            return self.nftables.masquerade_bit
        return self.iptables.masquerade_bit

    @property
    def effective_node_port_addresses(self) -> tuple[str, ...]:
        """nodePortAddresses as kube-proxy applies it: unset means every node
        address, except in nftables mode, where it means the primary one."""
        if not self.node_port_addresses and self.mode == "nftables":
            return ("primary",)
        return self.node_port_addresses

    @property
    def effective_detect_local_mode(self) -> str:
        return self.detect_local_mode or "ClusterCIDR"

    @property
    def ipvs_scheduler(self) -> str:
        return self.ipvs.scheduler or "rr"

    @property
    def health_timeout(self) -> float:
        """/healthz turns unhealthy when a queued update is older than this."""
        return 2 * self.sync_period


# ---- SvcProxyConfiguration -----------------------------------------------------

@dataclass(frozen=True)
class PluginSpec:
    """One enabled plugin and the options the config gives it."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    #: field path of this entry in the config file, for error messages
    path: str = ""


@dataclass(frozen=True)
class SvcProxyConfiguration:
    #: the enabled plugins, in call order: the defaults minus `disable`, then `enable`
    plugins: tuple[PluginSpec, ...] = tuple(PluginSpec(n) for n in DEFAULT_PLUGINS)
    #: default plugins the file disables
    disabled: tuple[str, ...] = ()
    datapaths: tuple[str, ...] = DEFAULT_DATAPATHS
    #: options for datapath plugins, by datapath name
    datapath_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: seconds between full syncs; None = max(syncPeriod, 100 x last full sync time)
    full_sync_period: float | None = None
    #: cold start: a first sync of at least this many Services programs the
    #: priority Services first (coldStart.minServices)
    cold_start_min_services: int = 1000
    #: the priority Services as namespace/name (coldStart.services); None = the
    #: API server's and the cluster DNS (default/kubernetes, kube-system/kube-dns
    #: and any Service labelled k8s-app=kube-dns)
    cold_start_services: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Config:
    """Everything read from one config file."""

    kube_proxy: KubeProxyConfiguration = field(default_factory=KubeProxyConfiguration)
    svcproxy: SvcProxyConfiguration = field(default_factory=SvcProxyConfiguration)
    source: str = "<defaults>"

    def datapath_order(self) -> tuple[str, ...]:
        """Datapaths to probe, in order: the configured mode first, then the fallback
        order. An empty mode means "the first of the fallback order" (svcproxy is
        IPVS-first; kube-proxy would pick iptables). An empty fallback list means
        only the configured mode is tried."""
        mode = self.kube_proxy.mode
        order = list(self.svcproxy.datapaths)
        if not mode:
            return tuple(order) if order else DEFAULT_DATAPATHS[:1]
        return (mode, *[d for d in order if d != mode])


# ---- loading -------------------------------------------------------------------

T = TypeVar("T")


def nearest_name(word: str, candidates: list[str]) -> str | None:
    """The candidate a typo most likely meant, or None."""
    lowered = {c.lower(): c for c in candidates}
    if word.lower() in lowered:
        return lowered[word.lower()]
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def _nearest(word: str, candidates: list[str]) -> str:
    match = nearest_name(word, candidates)
    return f"; did you mean {match}?" if match else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _load_section(cls: type[T], data: Any, path: str, problems: list[ConfigProblem]) -> T:
    if not isinstance(data, Mapping):
        problems.append(ConfigProblem(path, f"must be a mapping (got {show(data)})",
                                      line_of(data)))
        return cls()
    fields = {f.metadata["json"]: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if "json" in f.metadata}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        fpath = _join(path, str(key))
        f = fields.get(key)
        if f is None:
            match = nearest_name(str(key), list(fields))
            hint = f"; did you mean {_join(path, match)}?" if match else ""
            problems.append(ConfigProblem("", f"unknown field {fpath}{hint}",
                                          line_of(data, key)))
            continue
        if raw is None:
            continue  # null means "use the default", as in kube-proxy's Go structs
        parse = f.metadata["parse"]
        section = getattr(parse, "section", None)
        try:
            if section is not None:
                value = _load_section(section, raw, fpath, problems)
            else:
                value = parse(raw)
        except _FieldError as exc:
            problems.append(ConfigProblem(fpath, str(exc), line_of(data, key)))
            continue
        if f.metadata["default_if_zero"] and value == 0:
            continue
        values[f.name] = value
    return cls(**values)


def _validate_kube_proxy(kp: KubeProxyConfiguration, problems: list[ConfigProblem]) -> None:
    section = {"ipvs": "ipvs", "nftables": "nftables"}.get(kp.mode, "iptables")
    if kp.min_sync_period > kp.sync_period:
        problems.append(ConfigProblem(
            f"{section}.minSyncPeriod",
            f"must be less than or equal to {section}.syncPeriod "
            f"(got {format_duration(kp.min_sync_period)} > {format_duration(kp.sync_period)})"))
    if kp.config_sync_period <= 0:
        problems.append(ConfigProblem("configSyncPeriod", "must be greater than 0 (got 0s)"))
    mode = kp.detect_local_mode
    if mode == "BridgeInterface" and not kp.detect_local.bridge_interface:
        problems.append(ConfigProblem("detectLocal.bridgeInterface",
                                      "must be set when detectLocalMode is BridgeInterface"))
    if mode == "InterfaceNamePrefix" and not kp.detect_local.interface_name_prefix:
        problems.append(ConfigProblem("detectLocal.interfaceNamePrefix",
                                      "must be set when detectLocalMode is InterfaceNamePrefix"))


_PLUGIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _load_svcproxy(doc: Mapping[str, Any], problems: list[ConfigProblem]) -> SvcProxyConfiguration:
    known = ["apiVersion", "kind", "enable", "disable", "datapaths", "datapathOptions",
             "fullSyncPeriod", "coldStart"]
    for key in doc:
        if key == "plugins":
            problems.append(ConfigProblem("plugins", _plugins_migration(doc["plugins"]),
                                          line_of(doc, "plugins")))
        elif key not in known:
            problems.append(ConfigProblem("", f"unknown field {key}{_nearest(str(key), known)}",
                                          line_of(doc)))
    plugins = _plugin_list(doc, problems)
    datapaths = DEFAULT_DATAPATHS
    raw_dp = doc.get("datapaths")
    if raw_dp is not None:
        if not isinstance(raw_dp, list) or not all(isinstance(d, str) for d in raw_dp):
            problems.append(ConfigProblem("datapaths",
                                          f"must be a list of datapath names (got {show(raw_dp)})",
                                          line_of(doc)))
        else:
            datapaths = tuple(raw_dp)
    dp_options: dict[str, Mapping[str, Any]] = {}
    raw_opts = doc.get("datapathOptions")
    if raw_opts is not None:
        if not isinstance(raw_opts, Mapping) or not all(isinstance(v, Mapping) or v is None
                                                        for v in raw_opts.values()):
            problems.append(ConfigProblem(
                "datapathOptions", f"must map datapath names to option mappings "
                f"(got {show(raw_opts)})", line_of(doc, "datapathOptions")))
        else:
            dp_options = {str(k): dict(v or {}) for k, v in raw_opts.items()}
    full_sync_period: float | None = None
    raw_full = doc.get("fullSyncPeriod")
    if raw_full is not None:
        try:
            full_sync_period = _duration()(raw_full)
            if full_sync_period <= 0:
                raise _FieldError(f"must be greater than 0 (got {show(raw_full)})")
        except _FieldError as exc:
            problems.append(ConfigProblem("fullSyncPeriod", str(exc),
                                          line_of(doc, "fullSyncPeriod")))
            full_sync_period = None
    min_services, priority = _cold_start(doc, problems)
    return SvcProxyConfiguration(plugins=plugins[0], disabled=plugins[1], datapaths=datapaths,
                                 datapath_options=dp_options, full_sync_period=full_sync_period,
                                 cold_start_min_services=min_services,
                                 cold_start_services=priority)


_SERVICE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _cold_start(doc: Mapping[str, Any], problems: list[ConfigProblem]
                ) -> tuple[int, tuple[str, ...] | None]:
    """coldStart: {minServices: N, services: [namespace/name, ...]}."""
    default = SvcProxyConfiguration()
    raw = doc.get("coldStart")
    if raw is None:
        return default.cold_start_min_services, None
    if not isinstance(raw, Mapping):
        problems.append(ConfigProblem("coldStart", f"must be a mapping with minServices and "
                                      f"services (got {show(raw)})", line_of(doc, "coldStart")))
        return default.cold_start_min_services, None
    min_services = default.cold_start_min_services
    services: tuple[str, ...] | None = None
    for key, value in raw.items():
        where = f"coldStart.{key}"
        if key == "minServices":
            try:
                min_services = _int(0)(value)
            except _FieldError as exc:
                problems.append(ConfigProblem(where, str(exc), line_of(raw, key)))
        elif key == "services":
            bad = [v for v in value if not isinstance(v, str) or not _SERVICE_NAME.match(v)] \
                if isinstance(value, list) else None
            if bad is None or bad:
                shown = show(value) if bad is None else show(bad[0])
                problems.append(ConfigProblem(where, f"must be a list of namespace/name "
                                              f"(got {shown})", line_of(raw, key)))
            else:
                services = tuple(value)
        else:
            problems.append(ConfigProblem(where, "unknown field; coldStart has minServices "
                                          "and services", line_of(raw, key)))
    return min_services, services


def _plugin_list(doc: Mapping[str, Any], problems: list[ConfigProblem]
                 ) -> tuple[tuple[PluginSpec, ...], tuple[str, ...]]:
    """The enabled plugins: the defaults, minus `disable`, plus `enable` (an
    `enable` entry naming a default plugin gives it options, in its place)."""
    disabled: list[str] = []
    raw_disable = doc.get("disable")
    if raw_disable is not None:
        if not isinstance(raw_disable, list) or not all(isinstance(n, str) for n in raw_disable):
            problems.append(ConfigProblem("disable", "must be a list of default plugin names "
                                          f"(got {show(raw_disable)})", line_of(doc, "disable")))
        else:
            for i, name in enumerate(raw_disable):
                problem = _disable_problem(name, disabled)
                if problem:
                    problems.append(ConfigProblem(f"disable[{i}]", problem,
                                                  line_of(doc, "disable")))
                else:
                    disabled.append(name)
    enabled: list[PluginSpec] = []
    raw_enable = doc.get("enable")
    if raw_enable is not None:
        if not isinstance(raw_enable, list):
            problems.append(ConfigProblem("enable", f"must be a list (got {show(raw_enable)})",
                                          line_of(doc, "enable")))
        else:
            for i, entry in enumerate(raw_enable):
                p = f"enable[{i}]"
                spec = _plugin_entry(entry, p, problems)
                if spec is None:
                    continue
                if spec.name in {e.name for e in enabled}:
                    problems.append(ConfigProblem(f"{p}.name", f"plugin {spec.name!r} is "
                                                  "enabled twice", line_of(entry)))
                elif spec.name in disabled:
                    problems.append(ConfigProblem(f"{p}.name", f"plugin {spec.name!r} is both "
                                                  "enabled and disabled", line_of(entry)))
                else:
                    enabled.append(spec)
    by_name = {e.name: e for e in enabled}
    plugins = [by_name.get(n, PluginSpec(n)) for n in DEFAULT_PLUGINS if n not in disabled]
    plugins += [e for e in enabled if e.name not in DEFAULT_PLUGINS]
    return tuple(plugins), tuple(disabled)


def _disable_problem(name: str, disabled: list[str]) -> str:
    if name in ESSENTIAL_DEFAULTS:
        return (f"plugin {name!r} cannot be disabled: without it no Service is reachable "
                "at all")
    if name not in DEFAULT_PLUGINS:
        return (f"{name!r} is not a default plugin{_nearest(name, list(DEFAULT_PLUGINS))} "
                f"(defaults: {', '.join(DEFAULT_PLUGINS)}; a plugin that is not enabled "
                "needs no disabling)")
    if name in disabled:
        return f"plugin {name!r} is disabled twice"
    return ""


def _plugins_migration(raw: Any) -> str:
    """The error for the old complete `plugins:` list, with its translation."""
    names = [e if isinstance(e, str) else e.get("name") if isinstance(e, Mapping) else None
             for e in raw] if isinstance(raw, list) else []
    if not names or not all(isinstance(n, str) for n in names):
        return ("replaced by `enable:` / `disable:` over the default plugins "
                f"({', '.join(DEFAULT_PLUGINS)})")
    dropped = [n for n in DEFAULT_PLUGINS if n not in names and n not in ESSENTIAL_DEFAULTS]
    extra = [n for n in names if n not in DEFAULT_PLUGINS]
    parts = [f"disable: [{', '.join(dropped)}]"] if dropped else []
    parts += [f"enable: [{', '.join(str(n) for n in extra)}]"] if extra else []
    return ("replaced by `enable:` / `disable:` over the default plugins "
            f"({', '.join(DEFAULT_PLUGINS)}), so that a list cannot silently drop a feature; "
            f"this list is written {' and '.join(parts) or '(nothing: it is the default)'}")


#: KubeProxyConfiguration settings a default feature plugin applies (all others
#: are applied by the core or the datapath, or not used: UNUSED_FIELDS). A config
#: that gives one a non-default value and disables its plugin is refused.
PLUGIN_SETTINGS: tuple[tuple[str, str], ...] = (
    ("healthzBindAddress", "metrics"),
    ("metricsBindAddress", "metrics"),
    ("conntrack.maxPerCore", "conntrack"),
    ("conntrack.min", "conntrack"),
    ("conntrack.tcpEstablishedTimeout", "conntrack"),
    ("conntrack.tcpCloseWaitTimeout", "conntrack"),
    ("conntrack.tcpBeLiberal", "conntrack"),
    ("conntrack.udpTimeout", "conntrack"),
    ("conntrack.udpStreamTimeout", "conntrack"),
    ("ipvs.strictARP", "metallb"),
    ("nodePortAddresses", "nodeport"),
)
#: a default plugin that cannot be disabled (the manager always loads it)
ESSENTIAL_DEFAULTS: tuple[str, ...] = ("clusterip",)


def _check_disabled_settings(kp: KubeProxyConfiguration, sp: SvcProxyConfiguration,
                             problems: list[ConfigProblem]) -> None:
    default = KubeProxyConfiguration()
    for path, plugin in PLUGIN_SETTINGS:
        value = _field_value(kp, path)
        # an "off" value ("", 0, false) asks nothing of the disabled plugin
        if plugin in sp.disabled and value and value != _field_value(default, path):
            problems.append(ConfigProblem(
                path, f"is set ({show(value)}) but plugin {plugin!r}, which applies it, is "
                "disabled: enable the plugin (remove it from disable:) or remove the setting"))


def _plugin_entry(entry: Any, path: str, problems: list[ConfigProblem]) -> PluginSpec | None:
    name: Any
    options: Any
    if isinstance(entry, str):
        name, options = entry, {}
    elif isinstance(entry, Mapping):
        for key in entry:
            if key not in ("name", "options"):
                problems.append(ConfigProblem(
                    "", f"unknown field {path}.{key}{_nearest(str(key), ['name', 'options'])}",
                    line_of(entry)))
        name = entry.get("name")
        options = entry.get("options") or {}
        if not isinstance(options, Mapping):
            problems.append(ConfigProblem(f"{path}.options",
                                          f"must be a mapping (got {show(options)})",
                                          line_of(entry)))
            return None
    else:
        problems.append(ConfigProblem(path, f"must be a plugin name or {{name, options}} "
                                      f"(got {show(entry)})"))
        return None
    if not isinstance(name, str) or not _PLUGIN_NAME.match(name):
        problems.append(ConfigProblem(f"{path}.name", f"not a valid plugin name (got {show(name)})",
                                      line_of(entry)))
        return None
    return PluginSpec(name=name, options=dict(options), path=path)


def parse_config(text: str, source: str) -> Config:
    """Parse the text of a config file. Raises ConfigError naming `source`."""
    try:
        docs = load_documents(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [ConfigProblem("", syntax_error_text(exc),
                                                 syntax_error_line(exc))]) from None
    # kube-proxy's ConfigMap: the configuration is a string under data["config.conf"].
    if len(docs) == 1 and isinstance(docs[0], Mapping) and docs[0].get("kind") == "ConfigMap":
        data = docs[0].get("data") or {}
        if "config.conf" not in data:
            raise ConfigError(source, [ConfigProblem(
                "data", "ConfigMap has no config.conf key (kube-proxy's ConfigMap keeps its "
                "configuration under data.config.conf)", line_of(docs[0]))])
        inner = str(data["config.conf"])
        if "svcproxy.conf" in data:
            inner += "\n---\n" + str(data["svcproxy.conf"])
        return parse_config(inner, f"{source} (data.config.conf)")

    problems: list[ConfigProblem] = []
    kube_proxy: KubeProxyConfiguration | None = None
    svcproxy: SvcProxyConfiguration | None = None
    for doc in docs:
        if not isinstance(doc, Mapping):
            problems.append(ConfigProblem("", f"a document must be a mapping (got {show(doc)})"))
            continue
        kind = doc.get("kind")
        if kind == KUBE_PROXY_KIND:
            if kube_proxy is not None:
                problems.append(ConfigProblem("kind", "a second KubeProxyConfiguration document",
                                              line_of(doc)))
                continue
            api = doc.get("apiVersion")
            if api != KUBE_PROXY_API:
                problems.append(ConfigProblem(
                    "apiVersion", f"svcproxy reads {KUBE_PROXY_API} (got {show(api)})",
                    line_of(doc)))
                continue
            kube_proxy = _load_section(KubeProxyConfiguration, doc, "", problems)
            _validate_kube_proxy(kube_proxy, problems)
        elif kind == SVCPROXY_KIND:
            if svcproxy is not None:
                problems.append(ConfigProblem("kind", "a second SvcProxyConfiguration document",
                                              line_of(doc)))
                continue
            api = doc.get("apiVersion")
            if api != SVCPROXY_API:
                problems.append(ConfigProblem("apiVersion", f"must be {SVCPROXY_API} "
                                              f"(got {show(api)})", line_of(doc)))
                continue
            svcproxy = _load_svcproxy(doc, problems)
        else:
            kinds = [KUBE_PROXY_KIND, SVCPROXY_KIND, "ConfigMap"]
            problems.append(ConfigProblem(
                "kind", f"expected one of {', '.join(kinds)} (got {show(kind)})"
                f"{_nearest(str(kind), kinds)}", line_of(doc)))
    if not problems and kube_proxy is not None and svcproxy is not None:
        _check_disabled_settings(kube_proxy, svcproxy, problems)
    if problems:
        raise ConfigError(source, problems)
    return Config(kube_proxy=kube_proxy or KubeProxyConfiguration(),
                  svcproxy=svcproxy or SvcProxyConfiguration(), source=source)


def load_config(path: str | Path | None) -> Config:
    """Read a config file; None gives the defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [ConfigProblem("", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), [ConfigProblem("", "not a UTF-8 text file")]) from None
    return parse_config(text, str(p))


def effective_values(config: Config) -> dict[str, Any]:
    """The configuration as svcproxy will use it, for `svcproxy config check`."""

    def render(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            out = {}
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f.metadata.get("json", f.name)
                if _is_duration_field(f):
                    out[key] = format_duration(value)
                else:
                    out[key] = render(value)
            return out
        if isinstance(obj, tuple):
            return [render(v) for v in obj]
        if isinstance(obj, Mapping):
            return {k: render(v) for k, v in obj.items()}
        return obj

    kp = config.kube_proxy
    return {
        "source": config.source,
        "kubeProxyConfiguration": render(kp),
        "effective": {
            "mode": kp.mode or f"{config.datapath_order()[0]} (mode is empty)",
            "datapathOrder": list(config.datapath_order()),
            "syncPeriod": format_duration(kp.sync_period),
            "minSyncPeriod": format_duration(kp.min_sync_period),
            "masqueradeAll": kp.masquerade_all,
            "masqueradeBit": kp.masquerade_bit,
            "ipvsScheduler": kp.ipvs_scheduler,
            "detectLocalMode": kp.effective_detect_local_mode,
            "healthTimeout": format_duration(kp.health_timeout),
        },
        "svcProxyConfiguration": {
            "plugins": [{"name": p.name, "options": dict(p.options)}
                        for p in config.svcproxy.plugins],
            "disabled": list(config.svcproxy.disabled),
            "datapaths": list(config.svcproxy.datapaths),
            "datapathOptions": {k: dict(v) for k, v in
                                config.svcproxy.datapath_options.items()},
            "fullSyncPeriod": format_duration(config.svcproxy.full_sync_period)
            if config.svcproxy.full_sync_period is not None else "auto",
        },
    }


def _is_duration_field(f: dataclasses.Field[Any]) -> bool:
    parse = f.metadata.get("parse")
    return getattr(parse, "__qualname__", "").startswith("_duration")


#: feature gates svcproxy reads; every other one is accepted and not used
USED_FEATURE_GATES = frozenset({"PreferSameTrafficDistribution"})
#: KubeProxyConfiguration fields svcproxy accepts (a kube-proxy config works
#: unchanged) but that have no effect in svcproxy, with why
UNUSED_FIELDS: tuple[tuple[str, str], ...] = (
    ("bindAddress", "the node's addresses come from the Node object and the kernel"),
    ("bindAddressHardFail", "svcproxy binds only its health and metrics addresses"),
    ("enableProfiling", "no pprof endpoint"),
    ("showHiddenMetricsForVersion", "svcproxy has no hidden metrics"),
    ("clientConnection.qps", "the client is not rate limited"),
    ("clientConnection.burst", "the client is not rate limited"),
    ("clientConnection.contentType", "svcproxy always talks JSON"),
    ("clientConnection.acceptContentTypes", "svcproxy always talks JSON"),
    ("logging.flushFrequency", "log lines are written at once"),
    ("logging.vmodule", "per-module verbosity is not supported"),
    ("logging.options", "klog options do not apply"),
    ("detectLocal.clusterCIDRs", "detectLocalMode ClusterCIDR uses clusterCIDR"),
    ("iptables.snatNodeInternalIP", "not a kube-proxy v1 feature either"),
    ("portRange", "the userspace proxy mode is gone"),
    ("winkernel", "Windows only"),
    ("windowsRunAsService", "Windows only"),
)


def _field_value(obj: Any, path: str) -> Any:
    for part in path.split("."):
        name = next((f.name for f in fields(obj) if f.metadata.get("json") == part), None)
        if name is None:
            return None
        obj = getattr(obj, name)
    return obj


def _non_default(obj: Any, default: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for f in fields(obj):
        path = prefix + f.metadata.get("json", f.name)
        value, base = getattr(obj, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += _non_default(value, base, path + ".")
        elif isinstance(value, Mapping):
            out += [(f"{path}.{k}", v) for k, v in value.items() if base.get(k) != v]
        elif value != base:
            out.append((path, format_duration(value) if _is_duration_field(f) else value))
    return out


def setting_owners(config: Config) -> dict[str, str]:
    """Who applies each setting the config gives a non-default value, for
    `svcproxy config check`: a plugin, a datapath, the core, or nobody."""
    by_plugin = dict(PLUGIN_SETTINGS)
    unused = dict(UNUSED_FIELDS)
    enabled = {p.name for p in config.svcproxy.plugins}
    out = {}
    for path, value in _non_default(config.kube_proxy, KubeProxyConfiguration()):
        if path in ("apiVersion", "kind"):
            continue
        section = path.split(".", 1)[0]
        key = f"{path}={show(list(value) if isinstance(value, tuple) else value)}"
        if path in by_plugin:
            plugin = by_plugin[path]
            out[key] = f"plugin {plugin}" + ("" if plugin in enabled else " (disabled)")
        elif path in unused or section in unused or (
                section == "featureGates" and path.split(".", 1)[1] not in USED_FEATURE_GATES):
            out[key] = "not used by svcproxy"
        elif section in ("ipvs", "iptables", "nftables"):
            out[key] = f"datapath {section}" + (
                "" if section in config.datapath_order() else " (not in the datapath order)")
        elif path in ("masqueradeAll", "detectLocalMode", "clusterCIDR") or \
                section == "detectLocal":
            out[key] = "the datapath"
        else:
            out[key] = "core"
    return out


def unused_settings(kp: KubeProxyConfiguration) -> list[str]:
    """The settings this config gives a non-default value that svcproxy accepts
    and does not use, one line each (logged once at start, so never silently)."""
    default = KubeProxyConfiguration()
    out = []
    for path, why in UNUSED_FIELDS:
        value = _field_value(kp, path)
        if value != _field_value(default, path):
            out.append(f"{path}={show(value)}: accepted, not used by svcproxy ({why})")
    for gate in sorted(set(kp.feature_gates) - USED_FEATURE_GATES):
        out.append(f"featureGates.{gate}={str(kp.feature_gates[gate]).lower()}: accepted, "
                   "not used by svcproxy (its behaviour is svcproxy's default, or not "
                   "implemented)")
    return out
