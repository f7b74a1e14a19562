"""What the local API server does to an object of a given kind before storing it: defaults,
validation (422 naming the field at fault) and ClusterIP allocation — the work Kubernetes'
registry strategies and admission plugins do. No storage, no HTTP.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable
from typing import Any

from ambient.kube.errors import ApiError, invalid
from ambient.kube.selectors import SelectorError, labels_match, selector_from_match_labels

Obj = dict[str, Any]

SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")
# Kubernetes keeps the first addresses for well-known services (kubernetes = .1, kube-dns = .10).
SERVICE_RESERVED = 16

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kinds whose names must be DNS labels (they become DNS names or hostnames).
_LABEL_NAMED = {"Namespace", "Service"}


def random_suffix(n: int = 5) -> str:
    # Kubernetes' generateName alphabet leaves out vowels and lookalikes.
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def check_name(kind: str, name: str) -> None:
    pattern, limit = (_DNS1123_LABEL, 63) if kind in _LABEL_NAMED else (_DNS1123_SUBDOMAIN, 253)
    if not name or len(name) > limit or not pattern.match(name):
        raise invalid(kind, name, [("metadata.name", (
            f"Invalid value: {name!r}: a lowercase RFC 1123 {'label' if limit == 63 else 'subdomain'} must "
            "consist of lower case alphanumeric characters, '-' (or '.'), and must start and end with an "
            "alphanumeric character"))])


def _check_labels(kind: str, name: str, meta: Obj) -> None:
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise invalid(kind, name, [(f"metadata.{field}", "must be a map of string keys to string values")])
        for k, v in value.items():
            if not isinstance(v, str):
                raise invalid(kind, name, [(f"metadata.{field}.{k}",
                                            f"Invalid value: {v!r}: must be a string (quote it in YAML)")])
            if field == "labels" and (len(v) > 63 or not re.match(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", v)):
                raise invalid(kind, name, [(f"metadata.labels.{k}", f"Invalid value: {v!r}: not a valid label value")])


class ServiceIPs:
    """ClusterIP allocator over the service CIDR; rebuilt from stored Services at start."""

    def __init__(self, in_use: Iterable[str] = ()) -> None:
        self._used = {ipaddress.ip_address(ip) for ip in in_use if ip and ip != "None"}
        self._next = int(SERVICE_CIDR.network_address) + SERVICE_RESERVED

    def allocate(self, requested: str | None, name: str) -> str:
        if requested:
            try:
                ip = ipaddress.ip_address(requested)
            except ValueError:
                raise invalid("Service", name,
                              [("spec.clusterIP", f"Invalid value: {requested!r}: must be an IP")]) from None
            if ip not in SERVICE_CIDR:
                raise invalid("Service", name, [("spec.clusterIP", (
                    f"Invalid value: {requested!r}: provided IP is not in the valid range. "
                    f"The range of valid IPs is {SERVICE_CIDR}"))])
            if ip in self._used:
                raise invalid("Service", name, [("spec.clusterIP",
                                                 f"Invalid value: {requested!r}: provided IP is already allocated")])
            self._used.add(ip)
            return str(ip)
        size = SERVICE_CIDR.num_addresses
        base = int(SERVICE_CIDR.network_address)
        for _ in range(size):
            candidate = ipaddress.ip_address(self._next)
            self._next += 1
            if self._next >= base + size - 1:
                self._next = base + SERVICE_RESERVED
            if candidate not in self._used:
                self._used.add(candidate)
                return str(candidate)
        raise ApiError(500, "no ClusterIP addresses left in the service range")

    def dry(self) -> ServiceIPs:
        """A copy to validate against without allocating (dry-run requests)."""
        copy = ServiceIPs()
        copy._used, copy._next = set(self._used), self._next
        return copy

    def release(self, ip: str | None) -> None:
        if ip and ip != "None":
            self._used.discard(ipaddress.ip_address(ip))


def default_and_validate(kind: str, obj: Obj, old: Obj | None, ips: ServiceIPs) -> None:
    """Mutate `obj` in place with the defaults of its kind; raise 422 for invalid fields."""
    meta = obj["metadata"]
    name = meta["name"]
    _check_labels(kind, name, meta)
    spec = obj.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise invalid(kind, name, [("spec", "must be an object")])
    handler = _KIND_RULES.get(kind)
    if handler:
        handler(obj, old, ips)


def _pod(obj: Obj, old: Obj | None, ips: ServiceIPs) -> None:
    name = obj["metadata"]["name"]
    spec = obj.setdefault("spec", {})
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise invalid("Pod", name, [("spec.containers", "Required value")])
    seen = set()
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name"):
            raise invalid("Pod", name, [(f"spec.containers[{i}].name", "Required value")])
        if c["name"] in seen:
            raise invalid("Pod", name, [(f"spec.containers[{i}].name", f"Duplicate value: {c['name']!r}")])
        seen.add(c["name"])
        for field in ("command", "args"):
            if field in c and not (isinstance(c[field], list) and all(isinstance(a, str) for a in c[field])):
                raise invalid("Pod", name, [(f"spec.containers[{i}].{field}", "must be a list of strings")])
    if spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
        raise invalid("Pod", name, [("spec.restartPolicy", (
            f"Unsupported value: {spec['restartPolicy']!r}: supported values: \"Always\", \"OnFailure\", \"Never\""))])
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    if old is None:
        obj["status"] = {"phase": "Pending"}


def _service(obj: Obj, old: Obj | None, ips: ServiceIPs) -> None:
    name = obj["metadata"]["name"]
    spec = obj.setdefault("spec", {})
    ports = spec.get("ports") or []
    if not isinstance(ports, list):
        raise invalid("Service", name, [("spec.ports", "must be a list")])
    if len(ports) > 1:
        for i, p in enumerate(ports):
            if not p.get("name"):
                raise invalid("Service", name, [(f"spec.ports[{i}].name", "Required value")])
    for i, p in enumerate(ports):
        port = p.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise invalid("Service", name, [(f"spec.ports[{i}].port",
                                             f"Invalid value: {port!r}: must be between 1 and 65535, inclusive")])
        p.setdefault("protocol", "TCP")
        p.setdefault("targetPort", port)
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if old is not None:
        old_ip = old.get("spec", {}).get("clusterIP")
        if spec.get("clusterIP") in (None, "", old_ip):
            spec["clusterIP"] = old_ip
        else:
            raise invalid("Service", name, [("spec.clusterIP", "Invalid value: field is immutable")])
    elif spec.get("clusterIP") != "None":
        spec["clusterIP"] = ips.allocate(spec.get("clusterIP"), name)
    spec["clusterIPs"] = [spec["clusterIP"]]
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    obj.setdefault("status", {"loadBalancer": {}})


def _deployment(obj: Obj, old: Obj | None, ips: ServiceIPs) -> None:
    _replicated("Deployment", obj)
    obj["spec"].setdefault("strategy", {"type": "RollingUpdate"})
    obj["spec"].setdefault("revisionHistoryLimit", 10)


def _replicated(kind: str, obj: Obj) -> None:
    name = obj["metadata"]["name"]
    spec = obj.setdefault("spec", {})
    replicas = spec.setdefault("replicas", 1)
    if not isinstance(replicas, int) or replicas < 0:
        raise invalid(kind, name, [("spec.replicas",
                                    f"Invalid value: {replicas!r}: must be greater than or equal to 0")])
    selector = spec.get("selector")
    if not selector:
        raise invalid(kind, name, [("spec.selector", "Required value")])
    template = spec.get("template")
    if not isinstance(template, dict):
        raise invalid(kind, name, [("spec.template", "Required value")])
    labels = (template.get("metadata") or {}).get("labels") or {}
    try:
        requirements = selector_from_match_labels(selector)
    except SelectorError as exc:
        raise invalid(kind, name, [("spec.selector", str(exc))]) from None
    if not requirements or not labels_match(requirements, labels):
        raise invalid(kind, name, [("spec.template.metadata.labels",
                                    f"Invalid value: {labels!r}: `selector` does not match template `labels`")])
    pod = {"metadata": {"name": name, **(template.get("metadata") or {})}, "spec": template.get("spec")}
    try:
        _pod(pod, None, ServiceIPs())
    except ApiError as exc:
        causes = [(f"spec.template.{c['field']}", c["message"]) for c in exc.details.get("causes", [])]
        raise invalid(kind, name, causes) from None


def _namespace(obj: Obj, old: Obj | None, ips: ServiceIPs) -> None:
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    if old is None:
        obj["status"] = {"phase": "Active"}
    obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]


_KIND_RULES = {
    "Pod": _pod,
    "Service": _service,
    "Deployment": _deployment,
    "ReplicaSet": lambda obj, old, ips: _replicated("ReplicaSet", obj),
    "Namespace": _namespace,
}

__all__ = ["ServiceIPs", "check_name", "default_and_validate", "random_suffix"]
