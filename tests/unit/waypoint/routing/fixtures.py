"""Shared builders for the routing tests: requests, a service catalog, CRD dicts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from waypoint.http.message import Headers, RequestHead
from waypoint.routing.model import ConfigError, ServiceRef

NS = "bookinfo"
REVIEWS = "reviews.bookinfo.svc.cluster.local"
RATINGS = "ratings.bookinfo.svc.cluster.local"
PRODUCTPAGE = "productpage.bookinfo.svc.cluster.local"
HTTPBIN = "httpbin.web.svc.cluster.local"

SERVICES = {
    REVIEWS: ServiceRef(REVIEWS, NS, "reviews", (9080,), ("10.96.0.20",)),
    RATINGS: ServiceRef(RATINGS, NS, "ratings", (9080,), ("10.96.0.21",)),
    PRODUCTPAGE: ServiceRef(PRODUCTPAGE, NS, "productpage", (9080,), ("10.96.0.22",)),
    HTTPBIN: ServiceRef(HTTPBIN, "web", "httpbin", (8000, 8080), ("10.96.1.5",)),
}


def lookup(name: str) -> ServiceRef | None:
    """The ServiceLookup the compilers get: by hostname or VIP."""
    if name in SERVICES:
        return SERVICES[name]
    for service in SERVICES.values():
        if name in service.vips:
            return service
    return None


def head(path: str = "/", method: str = "GET", authority: str = "reviews:9080",
         headers: Iterable[tuple[str, str]] = (), scheme: str = "http") -> RequestHead:
    return RequestHead(method=method, path=path, authority=authority, headers=Headers(headers), scheme=scheme)


def meta(name: str, namespace: str = NS, created: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "creationTimestamp": created}


def virtual_service(http: list[Any], hosts: list[str] | None = None, name: str = "reviews", namespace: str = NS,
                    created: str = "2024-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": meta(name, namespace, created),
            "spec": {"hosts": hosts if hosts is not None else ["reviews"], "http": http, **spec}}


def destination_rule(host: str = "reviews", subsets: Iterable[str] = ("v1", "v2", "v3"), name: str = "reviews",
                     namespace: str = NS, created: str = "2024-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"host": host, **spec}
    if subsets:
        body["subsets"] = [{"name": s, "labels": {"version": s}} for s in subsets]
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": meta(name, namespace, created), "spec": body}


def http_route(rules: list[Any], parent: str = "reviews", name: str = "reviews", namespace: str = NS,
               created: str = "2024-01-01T00:00:00Z", port: int | None = None, **spec: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {"group": "", "kind": "Service", "name": parent}
    if port is not None:
        ref["port"] = port
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": meta(name, namespace, created),
            "spec": {"parentRefs": [ref], "rules": rules, **spec}}


def to(host: str = "reviews", subset: str | None = None, weight: int | None = None,
       port: int | None = None) -> dict[str, Any]:
    """A VirtualService route[] entry."""
    destination: dict[str, Any] = {"host": host}
    if subset is not None:
        destination["subset"] = subset
    if port is not None:
        destination["port"] = {"number": port}
    entry: dict[str, Any] = {"destination": destination}
    if weight is not None:
        entry["weight"] = weight
    return entry


def backend(name: str = "reviews", port: int | None = 9080, weight: int | None = None, **extra: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, **extra}
    if port is not None:
        ref["port"] = port
    if weight is not None:
        ref["weight"] = weight
    return ref


def fields(errors: Iterable[ConfigError], severity: str | None = None) -> list[str]:
    return [e.field for e in errors if severity is None or e.severity == severity]


class Dice:
    """A scripted RandomSource: returns the given values in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)
