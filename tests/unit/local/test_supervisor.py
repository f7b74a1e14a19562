"""The supervisor's pure parts: the ztunnel mirror pod must look like a pod of the ztunnel DaemonSet
`ambientctl install` deploys, so that one way of finding ztunnels works on both kinds of cluster."""

from __future__ import annotations

from dataclasses import dataclass, field

from ambient.cli.install import InstallValues, ztunnel_objects
from ambient.local.kubelet import MIRROR_ANNOTATION
from ambient.local.network import NodeNet
from ambient.local.supervisor import ztunnel_mirror_pod, ztunnel_mirror_status


@dataclass
class FakeZtunnel:
    argv: list[str] = field(default_factory=lambda: ["ztunnel"])
    started_at: str | None = None
    restarts: int = 0
    running: bool = False


def test_mirror_pod_has_the_daemonset_pods_labels_container_and_ports() -> None:
    [daemonset] = [o for o in ztunnel_objects(InstallValues()) if o["kind"] == "DaemonSet"]
    template = daemonset["spec"]["template"]
    [ds_container] = template["spec"]["containers"]
    pod = ztunnel_mirror_pod(NodeNet(2), FakeZtunnel())
    assert pod["metadata"]["labels"] == template["metadata"]["labels"]
    assert pod["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    [container] = pod["spec"]["containers"]
    assert container["name"] == ds_container["name"]
    assert all(port in container["ports"] for port in ds_container["ports"])
    # The admin port first: what pods/proxy uses when no port is named.
    assert container["ports"][0]["containerPort"] == 15000


def test_mirror_hash_changes_with_the_spec_only() -> None:
    def digest(ztunnel: FakeZtunnel) -> str:
        return str(ztunnel_mirror_pod(NodeNet(1), ztunnel)["metadata"]["annotations"][MIRROR_ANNOTATION])

    assert digest(FakeZtunnel()) == digest(FakeZtunnel(started_at="2024-05-01T10:00:00Z", restarts=3, running=True))
    assert digest(FakeZtunnel()) != digest(FakeZtunnel(argv=["ztunnel", "--other"]))


def test_status_before_the_first_start_is_pending_and_not_ready() -> None:
    status = ztunnel_mirror_status(NodeNet(1), FakeZtunnel())
    assert status["phase"] == "Pending"
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "False"
