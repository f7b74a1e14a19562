"""The sample manifests: they parse, their selectors select, and the modules they run exist."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

SAMPLES = Path(__file__).resolve().parents[3] / "samples"
MANIFESTS = sorted(SAMPLES.rglob("*.yaml"))
BOOKINFO_DEPLOYMENTS = {"details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3", "productpage-v1"}


def objects(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, obj) for path in MANIFESTS for obj in objects(path) if obj["kind"] == kind]


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def test_every_sample_has_its_manifest() -> None:
    names = {path.relative_to(SAMPLES).as_posix() for path in MANIFESTS}

    assert names >= {
        "bookinfo/bookinfo.yaml",
        "sleep/sleep.yaml",
        "curl/curl.yaml",
        "httpbin/httpbin.yaml",
        "tcp_echo/tcp-echo.yaml",
    }


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_objects_are_well_formed(path: Path) -> None:
    api_versions = {"Namespace": "v1", "Service": "v1", "ServiceAccount": "v1", "Deployment": "apps/v1",
                    "VirtualService": "networking.istio.io/v1", "DestinationRule": "networking.istio.io/v1",
                    "AuthorizationPolicy": "security.istio.io/v1", "RequestAuthentication": "security.istio.io/v1"}
    for obj in objects(path):
        assert obj["apiVersion"] == api_versions[obj["kind"]], obj
        assert obj["metadata"]["name"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"], obj


def test_deployment_selectors_match_their_template_labels() -> None:
    for path, deployment in of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector, path
        assert selector.items() <= labels.items(), f"{path}: {deployment['metadata']['name']}"


def test_services_select_a_deployment_listening_on_the_target_port() -> None:
    deployments = of_kind("Deployment")
    for path, service in of_kind("Service"):
        selected = [
            d
            for _, d in deployments
            if d["metadata"]["namespace"] == service["metadata"]["namespace"]
            and service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, f"{path}: service {service['metadata']['name']} selects nothing"
        for port in service["spec"]["ports"]:
            assert port["name"]
            target = port.get("targetPort", port["port"])
            for deployment in selected:
                container_ports = {p["containerPort"] for c in containers(deployment) for p in c.get("ports", [])}
                # sleep and curl expose a port for the Service shape only; nothing listens.
                if container_ports:
                    assert target in container_ports, f"{path}: {service['metadata']['name']}:{target}"


def test_bookinfo_deployments_are_versioned_and_have_their_own_accounts() -> None:
    bookinfo = objects(SAMPLES / "bookinfo" / "bookinfo.yaml")
    deployments = {obj["metadata"]["name"]: obj for obj in bookinfo if obj["kind"] == "Deployment"}
    accounts = {obj["metadata"]["name"] for obj in bookinfo if obj["kind"] == "ServiceAccount"}

    assert set(deployments) == BOOKINFO_DEPLOYMENTS
    assert {obj["metadata"]["name"] for obj in bookinfo if obj["kind"] == "Namespace"} == {"bookinfo"}
    for name, deployment in deployments.items():
        service, version = name.rsplit("-", 1)
        template = deployment["spec"]["template"]
        assert template["metadata"]["labels"] == {"app": service, "version": version}
        assert template["spec"]["serviceAccountName"] == f"bookinfo-{service}"
        assert f"bookinfo-{service}" in accounts
        [container] = template["spec"]["containers"]
        assert container["command"] == ["python3", "-m", f"samples.bookinfo.{service}"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 9080}
        if service == "reviews":
            assert container["env"] == [{"name": "VERSION", "value": version}]


def test_every_python_module_a_manifest_runs_is_importable() -> None:
    modules = {
        container["command"][2]
        for _, deployment in of_kind("Deployment")
        for container in containers(deployment)
        if container["command"][:2] == ["python3", "-m"]
    }

    assert len(modules) == 6
    for module in sorted(modules):
        assert callable(importlib.import_module(module).main), module
