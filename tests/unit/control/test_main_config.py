"""`ambient-control`'s configuration: the system namespace it runs in decides where the CA Secret is read,
which ztunnel is trusted as a node proxy and how waypoint pods reach the control plane."""

from __future__ import annotations

import pytest

from ambient.control.main import parse_args
from ambient.control.waypoints import DEFAULT_COMMAND


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("POD_NAMESPACE", "KUBECONFIG", "CLUSTER_ID", "TRUST_DOMAIN"):
        monkeypatch.delenv(name, raising=False)


def test_outside_a_pod_it_is_istio_system_with_istiods_ports() -> None:
    config, _ = parse_args([])
    assert (config.system_namespace, config.root_namespace) == ("istio-system", "istio-system")
    assert (config.xds_plaintext_port, config.xds_tls_port, config.monitoring_port) == (15010, 15012, 15014)
    assert config.node_proxies == {("istio-system", "ztunnel")}
    assert config.control_address == "istiod.istio-system.svc:15012"
    assert config.serving_names == ("istiod.istio-system.svc",)
    assert config.waypoint_command == DEFAULT_COMMAND
    assert config.waypoint_image == "ambient-py:0.1.0"
    assert config.waypoint_cluster_role == "ambient-waypoint"


def test_in_a_pod_it_is_the_pods_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "mesh-system")
    config, _ = parse_args([])
    assert config.system_namespace == "mesh-system"
    assert config.root_namespace == "mesh-system"  # as Istio's meshConfig.rootNamespace default
    assert config.node_proxies == {("mesh-system", "ztunnel")}
    assert config.control_address == "istiod.mesh-system.svc:15012"
    # Clients of the Service verify its name; clients dialling an IP verify Istio's default name.
    assert config.serving_names == ("istiod.mesh-system.svc", "istiod.istio-system.svc")


def test_flags_win_and_reach_the_waypoint_template(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "ignored")
    config, _ = parse_args(["--system-namespace", "ambient", "--root-namespace", "policies", "--xds-tls-port", "16012",
                            "--waypoint-image", "registry.example/ambient-py:2", "--trust-domain", "corp.example",
                            "--cluster-id", "east", "--waypoint-cluster-role", ""])
    template = config.waypoint_template
    assert template.control_address == "istiod.ambient.svc:16012"
    assert template.image == "registry.example/ambient-py:2"
    assert (template.cluster_id, template.trust_domain, template.root_namespace) == ("east", "corp.example",
                                                                                      "policies")
    assert config.waypoint_cluster_role == ""  # disabled


@pytest.mark.parametrize(("argv", "message"), [
    (["--system-namespace", "Istio_System"], "not a namespace name"),
    (["--xds-tls-port", "70000"], "invalid port value"),
    (["--monitoring-port", "15012"], "must differ"),
    (["--waypoint-command", " "], "must name a program"),
])
def test_bad_values_are_one_line_usage_errors(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
