"""The plugin's kubeconfig as the agent renders it in a pod (as Istio's install-cni): the `kubernetes`
Service address from the environment, IPv6 bracketed, the pod's CA and token inline; the plugin's own parser
reads back what was meant; a rotated token or CA is noticed and rewritten atomically, mode 0600."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cni.config import api_target
from cni.installer import (
    KUBECONFIG_NAME,
    InstallError,
    PluginKubeconfig,
    ServiceAccountKubeconfig,
    api_server_url,
    render_kubeconfig,
)
from cni.plugin import read_kubeconfig

CA = b"-----BEGIN CERTIFICATE-----\nMIIBdummy\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(("host", "port", "url"), [
    ("10.96.0.1", "443", "https://10.96.0.1:443"),
    ("fd00:10:96::1", "443", "https://[fd00:10:96::1]:443"),
    ("[fd00:10:96::1]", "6443", "https://[fd00:10:96::1]:6443"),
    ("kubernetes.default.svc", "443", "https://kubernetes.default.svc:443"),
])
def test_api_server_url_brackets_ipv6(host: str, port: str, url: str) -> None:
    assert api_server_url(host, port) == url


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535))
def test_the_plugin_reaches_the_address_it_was_given(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                     port: int) -> None:
    url = urlsplit(api_server_url(str(ip), str(port)))  # what the plugin's KubeReader does with it
    assert (url.scheme, url.hostname, url.port) == ("https", str(ip), port)


def test_rendering_is_what_the_plugin_parses(tmp_path: Path) -> None:
    text = render_kubeconfig("https://[fd00::1]:443", CA, "tok.en-1")
    doc = json.loads(text)
    assert doc == yaml.safe_load(text), "JSON, hence also the YAML every kubeconfig reader accepts"
    assert doc["current-context"] == "istio-cni-context"  # Istio's names
    assert doc["contexts"] == [{"name": "istio-cni-context", "context": {"cluster": "local", "user": "istio-cni"}}]
    assert base64.b64decode(doc["clusters"][0]["cluster"]["certificate-authority-data"]) == CA
    target = api_target(doc, "/var/run/istio-cni/istio-cni-kubeconfig")
    assert (target.server, target.token, target.ca_data) == ("https://[fd00::1]:443", "tok.en-1", CA.decode())
    assert not target.insecure and target.token_file is None and target.client_cert is None
    path = tmp_path / KUBECONFIG_NAME
    path.write_bytes(text)
    assert read_kubeconfig(str(path)) == target  # the plugin's file reader (stdlib JSON path)


def service_account(tmp_path: Path, token: str = "token-1\n", ca: bytes = CA) -> Path:
    account = tmp_path / "serviceaccount"
    account.mkdir(exist_ok=True)
    (account / "token").write_text(token)
    (account / "ca.crt").write_bytes(ca)
    return account


def test_service_account_source_reads_the_pods_token_and_ca(tmp_path: Path) -> None:
    source = ServiceAccountKubeconfig("10.96.0.1", "443", service_account(tmp_path))
    target = api_target(json.loads(source.content()), "kubeconfig")
    assert (target.server, target.token, target.ca_data) == ("https://10.96.0.1:443", "token-1", CA.decode())


def test_missing_or_empty_token_is_an_actionable_error(tmp_path: Path) -> None:
    source = ServiceAccountKubeconfig("10.96.0.1", "443", tmp_path / "nowhere")
    with pytest.raises(InstallError, match=r"nowhere/token.*automountServiceAccountToken.*--plugin-kubeconfig") as exc:
        source.content()
    assert exc.value.reason == "kubeconfig"
    with pytest.raises(InstallError, match="is empty"):
        ServiceAccountKubeconfig("10.96.0.1", "443", service_account(tmp_path, token="\n")).content()


def test_a_rotated_token_or_ca_is_rewritten_atomically_and_private(tmp_path: Path) -> None:
    account = service_account(tmp_path)
    target = tmp_path / "run" / KUBECONFIG_NAME
    kubeconfig = PluginKubeconfig(target, ServiceAccountKubeconfig("10.96.0.1", "443", account))
    assert not kubeconfig.current()
    assert kubeconfig.write() and kubeconfig.current()
    assert target.stat().st_mode & 0o777 == 0o600
    assert not kubeconfig.write(), "unchanged: not rewritten"
    inode = target.stat().st_ino

    (account / "token").write_text("token-2")  # the kubelet refreshed the projected token
    assert not kubeconfig.current()
    assert kubeconfig.write()
    assert api_target(json.loads(target.read_bytes()), str(target)).token == "token-2"
    assert target.stat().st_ino != inode, "replaced by rename: the plugin never reads a half-written file"
    assert sorted(p.name for p in target.parent.iterdir()) == [KUBECONFIG_NAME], "no temporary file left"

    (account / "ca.crt").write_bytes(CA.replace(b"dummy", b"other"))
    assert not kubeconfig.current() and kubeconfig.write()

    os.chmod(target, 0o644)
    assert kubeconfig.write(), "a loosened mode is repaired"
    assert target.stat().st_mode & 0o777 == 0o600
