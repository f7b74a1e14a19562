"""How `ztunnel.config.parse_args` reads the environment Istio's ztunnel chart (and Istio's ztunnel) uses;
see docs/compatibility.md for the full table."""

from __future__ import annotations

import pytest

from ambient.xds.types import ztunnel_node_id
from ztunnel.config import CONTROL_SERVER_NAME, DRAIN_DEADLINE, parse_args, parse_go_duration


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("XDS_ADDRESS", "CA_ADDRESS", "XDS_SERVER_NAME", "ALT_XDS_HOSTNAME", "XDS_ROOT_CA", "CA_ROOT_CA",
                 "TOKEN_PATH", "AUTH_TOKEN", "CLUSTER_ID", "ISTIO_META_CLUSTER_ID", "ISTIO_META_DNS_CAPTURE",
                 "INPOD_UDS", "TRUST_DOMAIN", "INSTANCE_IP", "LOG_FORMAT", "RUST_LOG", "POD_NAME", "POD_NAMESPACE",
                 "TERMINATION_GRACE_PERIOD_SECONDS", "CONNECTION_TERMINATION_DEADLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_NAME", "node-1")


def test_istio_meta_cluster_id_wins_over_cluster_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTER_ID", "ignored")
    monkeypatch.setenv("ISTIO_META_CLUSTER_ID", "east")
    assert parse_args([])[0].cluster_id == "east"


def test_addresses_accept_istios_https_uris_and_verify_the_revisioned_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDS_ADDRESS", "https://istiod-canary.istio-system.svc:15012")
    monkeypatch.setenv("CA_ADDRESS", "istiod-canary.istio-system.svc:15012")
    config = parse_args([])[0]
    assert config.xds_address == config.ca_address == "istiod-canary.istio-system.svc:15012"
    assert config.server_name == "istiod-canary.istio-system.svc"


def test_an_ip_address_verifies_istiods_name_unless_alt_hostname_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDS_ADDRESS", "10.96.0.10:15012")
    assert parse_args([])[0].server_name == CONTROL_SERVER_NAME
    monkeypatch.setenv("ALT_XDS_HOSTNAME", "istiod.example")
    assert parse_args([])[0].server_name == "istiod.example"


def test_root_and_token_files_by_istios_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CA_ROOT_CA", "/mnt/ca/root.pem")
    monkeypatch.setenv("AUTH_TOKEN", "/mnt/tokens/token")
    config = parse_args([])[0]
    assert (config.root_cert, config.token_path) == ("/mnt/ca/root.pem", "/mnt/tokens/token")
    monkeypatch.setenv("XDS_ROOT_CA", "/mnt/xds/root.pem")
    assert parse_args([])[0].root_cert == "/mnt/xds/root.pem"


def test_dns_capture_follows_istio_meta_dns_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args([])[0].dns_capture is True
    monkeypatch.setenv("ISTIO_META_DNS_CAPTURE", "false")
    assert parse_args([])[0].dns_capture is False


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDS_ADDRESS", "istiod.istio-system.svc:15012")
    config = parse_args(["--xds-address", "10.0.0.1:15012", "--server-name", "cp.local"])[0]
    assert (config.xds_address, config.server_name) == ("10.0.0.1:15012", "cp.local")


def test_the_node_id_names_the_pod_from_the_downward_api(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_args([])[0]
    assert (config.pod_name, config.pod_namespace) == ("ztunnel", "istio-system")
    monkeypatch.setenv("POD_NAME", "ztunnel-x7k2p")
    monkeypatch.setenv("POD_NAMESPACE", "mesh-system")
    config = parse_args([])[0]
    assert ztunnel_node_id("10.0.0.5", config.pod_name, config.pod_namespace) == (
        "ztunnel~10.0.0.5~ztunnel-x7k2p.mesh-system~mesh-system.svc.cluster.local")


@pytest.mark.parametrize(("grace", "deadline"), [("30", 25.0), ("11", 6.0), ("10", 9.0), ("2", 1.0), ("0", 1.0)])
def test_drain_deadline_leaves_a_margin_inside_the_grace_period(
        monkeypatch: pytest.MonkeyPatch, grace: str, deadline: float) -> None:
    assert parse_args([])[0].drain_deadline == DRAIN_DEADLINE
    monkeypatch.setenv("TERMINATION_GRACE_PERIOD_SECONDS", grace)
    assert parse_args([])[0].drain_deadline == deadline


def test_connection_termination_deadline_wins_and_the_flag_wins_over_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERMINATION_GRACE_PERIOD_SECONDS", "30")
    monkeypatch.setenv("CONNECTION_TERMINATION_DEADLINE", "1m30s")
    assert parse_args([])[0].drain_deadline == 90.0
    assert parse_args(["--drain-deadline", "2.5"])[0].drain_deadline == 2.5


@pytest.mark.parametrize(("env", "value"), [("TERMINATION_GRACE_PERIOD_SECONDS", "thirty"),
                                            ("CONNECTION_TERMINATION_DEADLINE", "10 seconds")])
def test_a_bad_deadline_is_a_one_line_usage_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as exit_:
        parse_args([])
    assert exit_.value.code == 2
    assert value in capsys.readouterr().err


def test_go_durations() -> None:
    assert parse_go_duration("250ms") == 0.25
    assert parse_go_duration("1h2m3s") == 3723.0
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration("5")
