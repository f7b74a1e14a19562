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


def test_a_rotated_service_account_token_is_read_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The kubelet rotates projected tokens in place; a long-running client must pick up the new one (every
    TOKEN_RELOAD seconds, as client-go), and keeps the old one while the file cannot be read."""
    (tmp_path / "token").write_text("first\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setattr(client, "IN_CLUSTER_DIR", tmp_path)
    now = [1000.0]
    monkeypatch.setattr(client.time, "monotonic", lambda: now[0])
    kube = client.KubeClient(KubeConfig.in_cluster())
    assert kube.auth_headers() == {"Authorization": "Bearer first"}

    (tmp_path / "token").write_text("second\n")
    now[0] += client.TOKEN_RELOAD / 2
    assert kube.auth_headers() == {"Authorization": "Bearer first"}, "read again before its time"
    now[0] += client.TOKEN_RELOAD
    assert kube.auth_headers() == {"Authorization": "Bearer second"}

    (tmp_path / "token").unlink()
    now[0] += client.TOKEN_RELOAD
    assert kube.auth_headers() == {"Authorization": "Bearer second"}


def test_a_kubeconfig_token_file_is_followed_and_a_literal_token_is_not(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc")
    for user, expected in (({"tokenFile": str(token)}, str(token)), ({"token": "literal"}, None)):
        path = tmp_path / "kubeconfig"
        path.write_text(json_kubeconfig(user))
        assert KubeConfig.load(path).token_file == expected


def json_kubeconfig(user: dict[str, str]) -> str:
    import json

    return json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                       "clusters": [{"name": "k", "cluster": {"server": "https://k.example:6443"}}],
                       "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                       "users": [{"name": "u", "user": user}]})
