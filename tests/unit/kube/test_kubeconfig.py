"""Where the Kubernetes client finds its configuration, and what it says when there is none."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient.kube import client
from ambient.kube.client import KubeConfig, KubeConfigError


def test_outside_a_pod_in_cluster_config_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(client, "IN_CLUSTER_DIR", tmp_path)

    with pytest.raises(KubeConfigError, match="not running in a Kubernetes pod"):
        KubeConfig.in_cluster()


def test_in_a_pod_the_service_account_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "namespace").write_text("istio-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setattr(client, "IN_CLUSTER_DIR", tmp_path)

    config = KubeConfig.in_cluster()

    assert (config.server, config.token, config.namespace) == ("https://10.96.0.1:443", "tok", "istio-system")
