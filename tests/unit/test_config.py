"""KubeProxyConfiguration defaults and validation (kube-proxy's pkg/proxy/apis/config/validation)
and the SvcProxyConfiguration document."""

from __future__ import annotations

import textwrap

import pytest

from svcproxy.config import Config, effective_values, load_config, parse_config, setting_owners
from svcproxy.durations import format_duration, parse_duration
from svcproxy.errors import ConfigError

HEAD = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


def kp(body: str = "") -> Config:
    return parse_config(HEAD + textwrap.dedent(body), "test.yaml")


def problems(body: str, head: str = HEAD) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(head + textwrap.dedent(body), "test.yaml")
    assert str(exc.value).startswith("test.yaml")
    return [str(p) for p in exc.value.problems]


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("1h30m", 5400), ("0s", 0), ("0", 0), ("250ms", 0.25), ("1.5h", 5400),
    ("15m", 900), ("24h", 86400), ("1m30.5s", 90.5), ("-5s", -5), ("100us", 1e-4),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "1x", "s", "", "1h 30m", "h1"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for s in (0, 1, 30, 90, 3600, 5400, 86400, 0.25):
        assert parse_duration(format_duration(s)) == pytest.approx(s)


def test_defaults_match_kube_proxy() -> None:
    c = kp().kube_proxy
    assert c.mode == ""
    assert c.bind_address == "0.0.0.0"
    assert c.healthz_bind_address == "0.0.0.0:10256"
    assert c.metrics_bind_address == "127.0.0.1:10249"
    assert c.client_connection.content_type == "application/vnd.kubernetes.protobuf"
    assert (c.client_connection.qps, c.client_connection.burst) == (5.0, 10)
    assert c.config_sync_period == 900
    assert c.oom_score_adj == -999
    assert (c.iptables.masquerade_bit, c.iptables.masquerade_all) == (14, False)
    assert c.iptables.localhost_node_ports is True
    assert (c.iptables.sync_period, c.iptables.min_sync_period) == (30, 1)
    assert (c.ipvs.sync_period, c.ipvs.min_sync_period) == (30, 0)
    assert c.ipvs.scheduler == "" and c.ipvs_scheduler == "rr"
    assert c.ipvs.exclude_cidrs == () and c.ipvs.strict_arp is False
    assert (c.ipvs.tcp_timeout, c.ipvs.tcp_fin_timeout, c.ipvs.udp_timeout) == (0, 0, 0)
    assert (c.nftables.masquerade_bit, c.nftables.sync_period, c.nftables.min_sync_period) == \
        (14, 30, 1)
    assert (c.conntrack.max_per_core, c.conntrack.min) == (32768, 131072)
    assert c.conntrack.tcp_established_timeout == 86400
    assert c.conntrack.tcp_close_wait_timeout == 3600
    assert c.conntrack.tcp_be_liberal is False
    assert (c.conntrack.udp_timeout, c.conntrack.udp_stream_timeout) == (0, 0)
    assert c.effective_detect_local_mode == "ClusterCIDR"
    assert c.health_timeout == 60


def test_empty_file_is_all_defaults() -> None:
    assert parse_config("", "empty.yaml").kube_proxy == kp().kube_proxy


def test_null_means_default_as_kubeadm_writes_it() -> None:
    c = kp("""
        conntrack:
          maxPerCore: null
          min: null
        ipvs:
          excludeCIDRs: null
        oomScoreAdj: null
        nodePortAddresses: null
    """).kube_proxy
    assert c.conntrack.max_per_core == 32768 and c.oom_score_adj == -999


def test_effective_sync_periods_follow_the_mode() -> None:
    body = textwrap.dedent("""
        iptables: {syncPeriod: 10s, minSyncPeriod: 2s, masqueradeAll: true}
        ipvs: {syncPeriod: 20s, minSyncPeriod: 3s}
        nftables: {syncPeriod: 40s, minSyncPeriod: 4s, masqueradeBit: 3, masqueradeAll: false}
    """)
    assert (kp("mode: ''" + body).kube_proxy.sync_period) == 10
    ipvs = kp("mode: ipvs" + body).kube_proxy
    assert (ipvs.sync_period, ipvs.min_sync_period, ipvs.masquerade_all) == (20, 3, True)
    nft = kp("mode: nftables" + body).kube_proxy
    assert (nft.sync_period, nft.masquerade_bit, nft.masquerade_all) == (40, 3, False)


def test_zero_sync_period_is_defaulted_like_go() -> None:
    assert kp("ipvs: {syncPeriod: 0s}\nmode: ipvs").kube_proxy.sync_period == 30


def test_address_ports_are_completed() -> None:
    c = kp("healthzBindAddress: 10.0.0.1\nmetricsBindAddress: '[::1]:9999'").kube_proxy
    assert c.healthz_bind_address == "10.0.0.1:10256"
    assert c.metrics_bind_address == "[::1]:9999"


def test_typo_suggests_the_nearest_field() -> None:
    assert problems("ipvs:\n  schedular: rr\n") == \
        ["line 4: unknown field ipvs.schedular; did you mean ipvs.scheduler?"]
    assert problems("clusterCidr: 10.0.0.0/8\n") == \
        ["line 3: unknown field clusterCidr; did you mean clusterCIDR?"]
    assert "unknown field frobnicate" in problems("frobnicate: 1\n")[0]


@pytest.mark.parametrize("body,expected", [
    ("ipvs: {syncPeriod: 30x}", "ipvs.syncPeriod: invalid duration '30x'"),
    ("ipvs: {syncPeriod: 30}", "ipvs.syncPeriod: missing unit in duration 30"),
    ("ipvs: {tcpTimeout: -1s}", "ipvs.tcpTimeout: must be greater than or equal to 0"),
    ("mode: ipvs\nipvs: {minSyncPeriod: 1m, syncPeriod: 30s}",
     "ipvs.minSyncPeriod: must be less than or equal to ipvs.syncPeriod (got 1m0s > 30s)"),
    ("iptables: {minSyncPeriod: 45s}",
     "iptables.minSyncPeriod: must be less than or equal to iptables.syncPeriod"),
    ("iptables: {masqueradeBit: 32}", "iptables.masqueradeBit: must be between 0 and 31 (got 32)"),
    ("nftables: {masqueradeBit: -1}", "nftables.masqueradeBit: must be between 0 and 31"),
    ("mode: userspace", "mode: must be one of '', 'ipvs', 'iptables', 'nftables' "
                        "(got 'userspace')"),
    ("mode: IPVS", "did you mean ipvs?"),
    ("ipvs: {excludeCIDRs: [10.0.0.0/33]}", "ipvs.excludeCIDRs: [0]: not a valid CIDR "
                                           "(got '10.0.0.0/33')"),
    ("clusterCIDR: 10.0.0.0/8,10.1.0.0/16", "clusterCIDR: a dual-stack pair needs one IPv4 "
                                            "and one IPv6 CIDR"),
    ("clusterCIDR: 10.0.0.0/8,fd00::/48,10.1.0.0/16", "clusterCIDR: at most two CIDRs"),
    ("clusterCIDR: banana", "clusterCIDR: not a valid CIDR (got 'banana')"),
    ("bindAddress: 1.2.3", "bindAddress: not a valid IP address (got '1.2.3')"),
    ("metricsBindAddress: 127.0.0.1:70000", "metricsBindAddress: port must be between 1 and "
                                            "65535"),
    ("healthzBindAddress: localhost:10256", "healthzBindAddress: must be IP:port"),
    ("oomScoreAdj: -1001", "oomScoreAdj: must be between -1000 and 1000"),
    ("conntrack: {maxPerCore: -1}", "conntrack.maxPerCore: must be >= 0 (got -1)"),
    ("conntrack: {tcpBeLiberal: 'yes'}", "conntrack.tcpBeLiberal: must be true or false "
                                         "(got 'yes')"),
    ("clientConnection: {burst: -1}", "clientConnection.burst: must be >= 0"),
    ("configSyncPeriod: 0s", "configSyncPeriod: must be greater than 0"),
    ("portRange: abc", "portRange: must be a port range"),
    ("detectLocalMode: Bridge", "detectLocalMode: must be one of"),
    ("detectLocalMode: BridgeInterface", "detectLocal.bridgeInterface: must be set when"),
    ("detectLocalMode: InterfaceNamePrefix",
     "detectLocal.interfaceNamePrefix: must be set when"),
    ("nodePortAddresses: [primary, 10.0.0.0/8]", "nodePortAddresses: the keywords"),
    ("nodePortAddresses: [10.0.0.0/8, nope]", "nodePortAddresses: [1]: not a valid CIDR"),
    ("featureGates: {Foo: maybe}", "featureGates: Foo: must be true or false"),
    ("ipvs: [1, 2]", "ipvs: must be a mapping"),
    ("logging: {format: xml}", "logging.format: must be one of 'text', 'json' (got 'xml')"),
    # kube-proxy validates the scheduler; svcproxy once passed it and fell back at run time
    ("ipvs: {scheduler: bogus}", "ipvs.scheduler: must be one of '', 'rr', 'wrr', 'lc', "
                                 "'wlc', 'lblc', 'lblcr', 'dh', 'sh', 'sed', 'nq', 'mh', 'fo', "
                                 "'ovf', 'twos' (got 'bogus')"),
    ("ipvs: {scheduler: wrrr}", "did you mean wrr?"),
])
def test_validation_errors_name_field_and_value(body: str, expected: str) -> None:
    found = problems(body + "\n")
    assert any(expected in p for p in found), found


def test_all_problems_reported_together() -> None:
    found = problems("ipvs: {schedular: rr, syncPeriod: x}\niptables: {masqueradeBit: 99}\n")
    assert len(found) == 3


def test_wrong_api_version_and_kind() -> None:
    assert "svcproxy reads kubeproxy.config.k8s.io/v1alpha1" in problems(
        "", head="apiVersion: kubeproxy.config.k8s.io/v1beta9\nkind: KubeProxyConfiguration\n")[0]
    assert "did you mean KubeProxyConfiguration?" in problems(
        "", head="apiVersion: v1\nkind: KubeProxyConfig\n")[0]


def test_yaml_syntax_error_names_the_line() -> None:
    found = problems("ipvs:\n  scheduler: [rr\nmode: ipvs\n")
    assert found[0].startswith("line ") and "invalid YAML" in found[0]


def test_kube_proxy_configmap_is_read_unchanged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cm = tmp_path / "kube-proxy.yaml"
    cm.write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: kube-proxy, namespace: kube-system}
        data:
          config.conf: |-
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: ipvs
            ipvs:
              scheduler: lc
              strictARP: true
            clusterCIDR: 10.244.0.0/16
          kubeconfig.conf: |-
            apiVersion: v1
            kind: Config
    """))
    c = load_config(cm)
    assert c.kube_proxy.mode == "ipvs"
    assert c.kube_proxy.ipvs_scheduler == "lc" and c.kube_proxy.ipvs.strict_arp
    assert c.kube_proxy.cluster_cidr == ("10.244.0.0/16",)


def test_configmap_errors_name_the_embedded_document(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cm = tmp_path / "cm.yaml"
    cm.write_text("kind: ConfigMap\ndata:\n  config.conf: |\n    " + HEAD.replace("\n", "\n    ")
                  + "ipvs: {scheduler: 5}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cm)
    assert "cm.yaml (data.config.conf)" in str(exc.value)
    assert "ipvs.scheduler: must be one of" in str(exc.value) and "(got 5)" in str(exc.value)


def test_missing_file_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


SVC_DOC = "---\napiVersion: svcproxy.io/v1alpha1\nkind: SvcProxyConfiguration\n"


def test_svcproxy_document_plugins_and_datapaths() -> None:
    c = parse_config(HEAD + "mode: ipvs\n" + SVC_DOC + textwrap.dedent("""\
        enable:
          - name: drain-nodes
            options: {nodes: [node-b]}
          - {name: conntrack, options: {warnAt: 0.5}}
        disable: [externalips, metallb]
        datapaths: [ipvs, iptables]
    """), "c.yaml")
    # the defaults in their order, minus disable, then what enable adds
    assert [p.name for p in c.svcproxy.plugins] == [
        "clusterip", "nodeport", "loadbalancer", "affinity", "metrics", "conntrack",
        "drain-nodes"]
    assert c.svcproxy.plugins[-1].options == {"nodes": ["node-b"]}
    assert c.svcproxy.plugins[-1].path == "enable[0]"
    # naming a default plugin in enable gives it options in its own place
    assert c.svcproxy.plugins[5].options == {"warnAt": 0.5}
    assert c.svcproxy.disabled == ("externalips", "metallb")


def test_old_complete_plugin_list_is_refused_with_its_translation() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(SVC_DOC + "plugins: [clusterip, nodeport, externalips, loadbalancer, "
                     "affinity, metrics, drain-nodes]\n", "c.yaml")
    msg = str(exc.value)
    assert msg.startswith("c.yaml: line 4: plugins: replaced by `enable:` / `disable:`")
    assert "this list is written disable: [conntrack, metallb] and enable: [drain-nodes]" in msg


@pytest.mark.parametrize("setting,plugin", [
    ("conntrack: {maxPerCore: 65536}", "conntrack"),
    ("healthzBindAddress: 0.0.0.0:20256", "metrics"),
    ("ipvs: {strictARP: true}", "metallb"),
    ("nodePortAddresses: [primary]", "nodeport"),
])
def test_disabling_a_plugin_whose_setting_the_config_sets_is_an_error(setting: str,
                                                                      plugin: str) -> None:
    text = HEAD + setting + "\n" + SVC_DOC + f"disable: [{plugin}]\n"
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "c.yaml")
    path = setting.split(":")[0] if "{" not in setting else \
        setting.split(":")[0] + "." + setting.split("{")[1].split(":")[0]
    assert f"{path}: is set (" in str(exc.value)
    assert f"but plugin {plugin!r}, which applies it, is disabled" in str(exc.value)
    # the same setting with the plugin on, or the plugin off at the default value: fine
    parse_config(HEAD + setting + "\n", "c.yaml")
    parse_config(HEAD + SVC_DOC + f"disable: [{plugin}]\n", "c.yaml")


def test_disabling_a_plugin_with_its_settings_off_is_fine() -> None:
    c = parse_config(HEAD + 'healthzBindAddress: ""\nmetricsBindAddress: ""\n'
                     "conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s}\n"
                     + SVC_DOC + "disable: [metrics, conntrack]\n", "c.yaml")
    assert c.svcproxy.disabled == ("metrics", "conntrack")


def test_config_check_names_who_applies_each_changed_setting() -> None:
    c = parse_config(HEAD + textwrap.dedent("""\
        mode: ipvs
        conntrack: {maxPerCore: 65536}
        ipvs: {scheduler: wrr}
        iptables: {masqueradeBit: 15}
        clusterCIDR: 10.244.0.0/16
        enableProfiling: true
        featureGates: {PreferSameTrafficDistribution: true, Foo: true}
        configSyncPeriod: 1m
    """) + SVC_DOC + "disable: [metallb]\ndatapaths: [ipvs]\n", "c.yaml")
    assert setting_owners(c) == {
        "mode='ipvs'": "core",
        "conntrack.maxPerCore=65536": "plugin conntrack",
        "ipvs.scheduler='wrr'": "datapath ipvs",
        "iptables.masqueradeBit=15": "datapath iptables (not in the datapath order)",
        "clusterCIDR=['10.244.0.0/16']": "the datapath",
        "enableProfiling=true": "not used by svcproxy",
        "featureGates.PreferSameTrafficDistribution=true": "core",
        "featureGates.Foo=true": "not used by svcproxy",
        "configSyncPeriod='1m0s'": "core",
    }


def test_default_plugins_and_datapath_order() -> None:
    c = Config()
    assert [p.name for p in c.svcproxy.plugins] == ["clusterip", "nodeport", "externalips",
                                                     "loadbalancer", "affinity", "metrics",
                                                     "conntrack", "metallb"]
    assert c.datapath_order() == ("ipvs", "nftables", "iptables")


@pytest.mark.parametrize("mode,datapaths,order", [
    ("ipvs", "[ipvs, iptables]", ("ipvs", "iptables")),
    ("iptables", "[ipvs, iptables]", ("iptables", "ipvs")),
    ("", "[iptables]", ("iptables",)),
    ("ipvs", "[]", ("ipvs",)),
    ("nftables", "[ipvs, iptables]", ("nftables", "ipvs", "iptables")),
])
def test_datapath_order(mode: str, datapaths: str, order: tuple[str, ...]) -> None:
    c = parse_config(HEAD + f"mode: '{mode}'\n" + SVC_DOC + f"datapaths: {datapaths}\n", "c.yaml")
    assert c.datapath_order() == order


@pytest.mark.parametrize("body,expected", [
    ("enabled: [a]", "unknown field enabled; did you mean enable?"),
    ("enable: {a: 1}", "enable: must be a list"),
    ("enable: [{name: a, option: {}}]", "unknown field enable[0].option; did you mean"),
    ("enable: [{name: a, options: [1]}]", "enable[0].options: must be a mapping"),
    ("enable: [a, a]", "enable[1].name: plugin 'a' is enabled twice"),
    ("enable: ['Bad Name']", "enable[0].name: not a valid plugin name"),
    ("disable: metrics", "disable: must be a list of default plugin names"),
    ("disable: [metrcs]", "disable[0]: 'metrcs' is not a default plugin; did you mean metrics?"),
    ("disable: [tracing]", "disable[0]: 'tracing' is not a default plugin"),
    ("disable: [metrics, metrics]", "disable[1]: plugin 'metrics' is disabled twice"),
    ("disable: [metrics]\nenable: [metrics]",
     "enable[0].name: plugin 'metrics' is both enabled and disabled"),
    ("datapaths: ipvs", "datapaths: must be a list of datapath names"),
])
def test_svcproxy_document_errors(body: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(SVC_DOC + body + "\n", "c.yaml")
    assert expected in str(exc.value)


def test_effective_values_render_durations() -> None:
    values = effective_values(kp("mode: ipvs\nipvs: {syncPeriod: 1h30m}\n"))
    assert values["kubeProxyConfiguration"]["ipvs"]["syncPeriod"] == "1h30m0s"
    assert values["effective"]["syncPeriod"] == "1h30m0s"
    assert values["effective"]["datapathOrder"] == ["ipvs", "nftables", "iptables"]
    assert values["effective"]["ipvsScheduler"] == "rr"


def test_full_sync_period_setting() -> None:
    c = parse_config(SVC_DOC + "fullSyncPeriod: 1h\n", "c.yaml")
    assert c.svcproxy.full_sync_period == 3600
    assert Config().svcproxy.full_sync_period is None
    with pytest.raises(ConfigError, match="fullSyncPeriod: must be greater than 0"):
        parse_config(SVC_DOC + "fullSyncPeriod: 0s\n", "c.yaml")
    with pytest.raises(ConfigError, match="fullSyncPeriod: invalid duration"):
        parse_config(SVC_DOC + "fullSyncPeriod: soon\n", "c.yaml")


def test_accepted_settings_svcproxy_does_not_use_are_named() -> None:
    """A kube-proxy config works unchanged, and nothing in it is ignored
    silently: each setting with no effect in svcproxy is named with why."""
    from svcproxy.config import unused_settings

    assert unused_settings(parse_config(HEAD, "c.yaml").kube_proxy) == []
    config = parse_config(HEAD + "bindAddress: 10.0.0.1\nenableProfiling: true\n"
                          "clientConnection: {qps: 50, kubeconfig: /k}\n"
                          "featureGates: {PreferSameTrafficDistribution: true, Foo: false}\n"
                          "detectLocal: {clusterCIDRs: [10.0.0.0/8]}\n", "c.yaml")
    lines = unused_settings(config.kube_proxy)
    assert [line.split("=")[0] for line in lines] == [
        "bindAddress", "enableProfiling", "clientConnection.qps", "detectLocal.clusterCIDRs",
        "featureGates.Foo"]
    assert lines[0].startswith("bindAddress='10.0.0.1': accepted, not used by svcproxy (")
