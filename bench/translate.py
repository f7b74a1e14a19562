"""CPU time to translate a synthetic cluster (default 1,000 pods / 200 services) into the workload model.

    .venv/bin/python bench/translate.py [--pods 1000] [--services 200] [--runs 5]

Prints numbers; asserts nothing. The cluster: 20 namespaces, one Deployment-style app per Service
(pods spread evenly), named target ports, a namespace-wide and a selector AuthorizationPolicy per
namespace, mesh-wide STRICT PeerAuthentication, and a waypoint bound to every other namespace.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from ambient.control.translate import ClusterState, translate

NAMESPACES = 20


def synthetic_cluster(pods: int, services: int) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = [{
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}}]
    for n in range(NAMESPACES):
        ns = f"ns-{n}"
        ns_labels = {"istio.io/dataplane-mode": "ambient"}
        if n % 2 == 0:
            ns_labels["istio.io/use-waypoint"] = "waypoint"
            objects.append({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": ns, "labels": {"istio.io/waypoint-for": "all"}},
                "spec": {"gatewayClassName": "istio-waypoint",
                         "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
                "status": {"addresses": [{"type": "Hostname", "value": f"waypoint.{ns}.svc.cluster.local"}]}})
        objects.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": ns_labels}})
        objects.append({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "same-namespace", "namespace": ns},
            "spec": {"rules": [{"from": [{"source": {"namespaces": [ns, "istio-system"]}}]}]}})
        objects.append({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "app-0-http", "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": f"app-{n}"}}, "action": "DENY",
                     "rules": [{"to": [{"operation": {"ports": ["9090"], "methods": ["DELETE"]}}]}]}})
    for s in range(services):
        ns = f"ns-{s % NAMESPACES}"
        objects.append({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": f"app-{s}", "namespace": ns},
            "spec": {"clusterIP": f"10.96.{s // 250}.{s % 250 + 1}", "selector": {"app": f"app-{s}"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                               {"name": "grpc", "port": 9090, "targetPort": 9090}]}})
    for p in range(pods):
        s = p % services
        ns = f"ns-{s % NAMESPACES}"
        objects.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"app-{s}-5d8f7c9b6-{p:05d}", "namespace": ns,
                         "labels": {"app": f"app-{s}", "version": "v1", "pod-template-hash": "5d8f7c9b6"},
                         "annotations": {"ambient.istio.io/redirection": "enabled"},
                         "ownerReferences": [{"kind": "ReplicaSet", "name": f"app-{s}-5d8f7c9b6", "controller": True}]},
            "spec": {"nodeName": f"node-{p % 3}", "serviceAccountName": f"app-{s}",
                     "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": f"10.244.{p // 250}.{p % 250 + 1}",
                       "conditions": [{"type": "Ready", "status": "True"}]}})
    return objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--services", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    state = ClusterState.from_objects(synthetic_cluster(args.pods, args.services))
    cpu: list[float] = []
    serialize: list[float] = []
    for _ in range(args.runs):
        start = time.process_time()
        translation = translate(state, "Kubernetes", "cluster.local")
        middle = time.process_time()
        size = sum(len(a.SerializeToString(deterministic=True)) for a in translation.addresses.values())
        size += sum(len(a.SerializeToString(deterministic=True)) for a in translation.authorizations.values())
        serialize.append(time.process_time() - middle)
        cpu.append(middle - start)
    print(f"{args.pods} pods / {args.services} services → {len(translation.addresses)} addresses, "
          f"{len(translation.authorizations)} authorizations, {size / 1024:.0f} KiB serialized")
    print(f"translate CPU: median {statistics.median(cpu) * 1000:.1f} ms, min {min(cpu) * 1000:.1f} ms "
          f"over {args.runs} runs; serialize all (deterministic): median {statistics.median(serialize) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
