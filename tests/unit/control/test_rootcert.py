"""ConfigMap `istio-ca-root-cert` in every namespace (istiod's namespace controller): which namespaces,
what the ConfigMap holds, and when an existing one needs repair."""

from __future__ import annotations

from typing import Any

import pytest

from ambient.control.rootcert import (
    publishes_to,
    repair_patch,
    root_configmap,
    skippable_create_error,
)
from ambient.kube.errors import ApiError
from ambient.kube.merge import merge_patch

Obj = dict[str, Any]
ROOT = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"
NEW_ROOT = "-----BEGIN CERTIFICATE-----\nnew\n-----END CERTIFICATE-----\n"


def namespace(name: str, *, phase: str = "Active", deleting: bool = False) -> Obj:
    meta: Obj = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta, "status": {"phase": phase}}


@pytest.mark.parametrize("name", ["default", "shop", "istio-system", "kube-system"])
def test_every_namespace_gets_it_including_kube_system_where_ztunnel_may_run(name: str) -> None:
    assert publishes_to(namespace(name))


@pytest.mark.parametrize("name", ["kube-public", "kube-node-lease", "local-path-storage"])
def test_the_namespaces_istiod_skips_are_skipped(name: str) -> None:
    assert not publishes_to(namespace(name))


def test_a_terminating_namespace_is_left_alone() -> None:
    assert not publishes_to(namespace("shop", phase="Terminating"))
    assert not publishes_to(namespace("shop", deleting=True))


def test_the_configmap_is_istiods() -> None:
    assert root_configmap("shop", ROOT) == {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio-ca-root-cert", "namespace": "shop", "labels": {"istio.io/config": "true"}},
        "data": {"root-cert.pem": ROOT}}


def test_an_intact_configmap_needs_nothing() -> None:
    current = root_configmap("shop", ROOT)
    current["metadata"]["labels"]["team"] = "a"  # others' labels and keys are theirs
    current["data"]["extra.pem"] = "x"
    assert repair_patch(current, ROOT) is None


def test_an_edited_root_is_rewritten_and_other_keys_stay() -> None:
    current = root_configmap("shop", ROOT)
    current["data"] = {"root-cert.pem": "garbage", "extra.pem": "x"}
    patch = repair_patch(current, ROOT)
    assert patch is not None
    assert merge_patch(current, patch)["data"] == {"root-cert.pem": ROOT, "extra.pem": "x"}


def test_a_new_root_is_written_and_a_lost_label_put_back() -> None:
    current = root_configmap("shop", ROOT)
    current["metadata"]["labels"] = {"team": "a"}
    patched = merge_patch(current, repair_patch(current, NEW_ROOT) or {})
    assert patched["data"]["root-cert.pem"] == NEW_ROOT
    assert patched["metadata"]["labels"] == {"team": "a", "istio.io/config": "true"}
    assert repair_patch(patched, NEW_ROOT) is None


def test_a_configmap_without_data_gets_the_root() -> None:
    current = root_configmap("shop", ROOT)
    del current["data"]
    assert repair_patch(current, ROOT) == {"data": {"root-cert.pem": ROOT}}


@pytest.mark.parametrize(("error", "skip"), [
    (ApiError(404, 'namespaces "shop" not found'), True),
    (ApiError(403, "unable to create new content in namespace shop because it is being terminated",
              details={"causes": [{"reason": "NamespaceTerminating"}]}), True),
    (ApiError(403, 'configmaps "istio-ca-root-cert" is forbidden: unable to create new content in namespace '
                   "shop because it is being terminated"), True),
    (ApiError(403, 'configmaps is forbidden: User "system:serviceaccount:istio-system:ambient-control" cannot '
                   'create resource "configmaps"'), False),  # RBAC: retried until someone fixes it
    (ApiError(500, "etcdserver: request timed out"), False),
])
def test_only_a_namespace_going_away_makes_a_failed_create_moot(error: ApiError, skip: bool) -> None:
    assert skippable_create_error(error) is skip
