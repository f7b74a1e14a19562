"""ConfigIndex: every VirtualService, HTTPRoute and DestinationRule → per-(service, port) RouteTables
and per-(host, subset, port) DestinationPolicies, plus every ConfigError found on the way.

Built once per configuration change (CRDs or the service catalog changed) and then only read;
tables and policies are assembled on first use and memoized. Precedence, as Istio does it for
waypoints (pilot listener_waypoint.go) except where noted:

- A service's routes come from the HTTPRoutes attached to it (for that port) if there are any,
  otherwise from the VirtualServices whose hosts match it, otherwise from a single default route to
  the service itself. HTTPRoute winning outright is our choice: Istio calls mixing the two for one
  service "undefined behavior" (it concatenates both, Gateway API routes first).
- Only routes in the service's namespace or the waypoint's namespace apply (Istio's
  getVirtualServiceForWaypoint).
- Several VirtualServices for one host are merged in creation order (oldest first, then
  namespace/name), as Istio's waypoint does ("merge their routes, consistent with gateway.go").
- A route naming a subset no DestinationRule defines is dropped with an error on its VirtualService;
  the other routes stay. A mirror naming one is dropped alone.
- DestinationRules are looked up in the waypoint's namespace, then the service's, then the root
  namespace; within one namespace the exact host beats the longest wildcard, and rules for the same
  host are merged (oldest first).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from waypoint.routing.destinationrule import CompiledDestinationRule, compile_destination_rule, merge_rules
from waypoint.routing.httproute import CompiledHTTPRoute, compile_http_route
from waypoint.routing.model import (
    DEFAULT_INBOUND_RETRY_POLICY,
    ConfigError,
    DestinationPolicy,
    Forward,
    Mirror,
    Route,
    RouteTable,
    ServiceLookup,
    UnknownSubset,
    WeightedDestination,
    dump,
    host_matches,
)
from waypoint.routing.virtualservice import CompiledRoute, CompiledVirtualService, compile_virtual_service

#: Istio's default root namespace (MeshConfig.rootNamespace): its DestinationRules apply mesh-wide.
DEFAULT_ROOT_NAMESPACE = "istio-system"
DEFAULT_DOMAIN = "cluster.local"


class ConfigIndex:
    """All L7 routing configuration a waypoint applies, compiled. Pure: no IO, no clocks."""

    def __init__(self, virtual_services: Iterable[Mapping[str, Any]] = (),
                 http_routes: Iterable[Mapping[str, Any]] = (),
                 destination_rules: Iterable[Mapping[str, Any]] = (), *,
                 services: ServiceLookup,
                 waypoint_namespace: str | None = None,
                 waypoint_name: str | None = None,
                 domain: str = DEFAULT_DOMAIN,
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self._services = services
        self._waypoint_namespace = waypoint_namespace
        self._root_namespace = root_namespace
        self._errors: list[ConfigError] = []
        self._tables: dict[tuple[str, int], RouteTable] = {}
        self._policies: dict[str, DestinationPolicy | None] = {}

        self._destination_rules = [compile_destination_rule(obj, domain) for obj in destination_rules]
        self._dr_groups: dict[str, dict[str, DestinationPolicy]] = defaultdict(dict)  # namespace → host → merged
        self._index_destination_rules()

        waypoint = (waypoint_namespace, waypoint_name) if waypoint_namespace and waypoint_name else None
        self._http_routes = sorted((compile_http_route(obj, services, domain, waypoint) for obj in http_routes),
                                   key=lambda r: (r.created, r.namespace, r.name))
        for compiled_route in self._http_routes:
            self._errors.extend(compiled_route.errors)

        self._virtual_services = sorted((compile_virtual_service(obj, services, domain) for obj in virtual_services),
                                        key=lambda vs: vs.key)
        self._vs_routes: dict[tuple[str, str], tuple[Route, ...]] = {}
        for vs in self._virtual_services:
            self._errors.extend(vs.errors)
            if vs.applies_to_mesh:
                self._vs_routes[(vs.namespace, vs.name)] = self._checked_routes(vs)
        self._warn_about_precedence()

    # -- public API --------------------------------------------------------------------------------

    @property
    def errors(self) -> list[ConfigError]:
        """Every rejected or suspicious piece of configuration (severity "error" or "warning")."""
        return list(self._errors)

    def routes_for(self, hostname: str, port: int) -> RouteTable:
        """The routes for requests to service `hostname` (FQDN) on service port `port`."""
        key = (hostname, port)
        table = self._tables.get(key)
        if table is None:
            table = self._build_table(hostname, port)
            self._tables[key] = table
        return table

    def policy_for(self, hostname: str, subset: str | None, port: int | None) -> DestinationPolicy:
        """The effective DestinationRule policy for one destination (subset and port merged as Istio
        does). Raises UnknownSubset for a subset no rule defines (routes naming one were dropped)."""
        policy = self._policy_for_host(hostname)
        if policy is None:
            if subset is not None:
                raise UnknownSubset(f"no DestinationRule for {hostname} defines subset {subset!r}")
            return DestinationPolicy(hostname)
        return policy.resolve(subset, port)

    def dump(self) -> dict[str, Any]:
        """The compiled configuration for /config_dump (tables built so far, resources, errors)."""
        return {
            "route_tables": {f"{host}:{port}": dump(table) for (host, port), table in sorted(self._tables.items())},
            "virtual_services": [{"namespace": vs.namespace, "name": vs.name, "hosts": list(vs.hosts),
                                  "routes": [dump(r) for r in self._vs_routes.get((vs.namespace, vs.name), ())]}
                                 for vs in self._virtual_services],
            "http_routes": [{"namespace": r.namespace, "name": r.name,
                             "parents": [dump(a) for a in r.attachments],
                             "routes": [dump(g.route) for g in r.routes]} for r in self._http_routes],
            "destination_rules": {ns: {host: dump(policy) for host, policy in hosts.items()}
                                  for ns, hosts in sorted(self._dr_groups.items())},
            "errors": [dump(error) for error in self._errors],
        }

    # -- DestinationRules --------------------------------------------------------------------------

    def _index_destination_rules(self) -> None:
        grouped: dict[tuple[str, str], list[CompiledDestinationRule]] = defaultdict(list)
        for rule in self._destination_rules:
            self._errors.extend(rule.errors)
            if rule.host:
                grouped[(rule.namespace, rule.host)].append(rule)
        for (namespace, host), rules in sorted(grouped.items()):
            policy, errors = merge_rules(host, rules)
            self._errors.extend(errors)
            self._dr_groups[namespace][host] = policy

    def _namespace_of(self, hostname: str) -> str | None:
        service = self._services(hostname)
        if service is not None:
            return service.namespace
        parts = hostname.split(".")
        if len(parts) >= 3 and parts[2] == "svc":
            return parts[1]
        return None

    def _policy_for_host(self, hostname: str) -> DestinationPolicy | None:
        if hostname in self._policies:
            return self._policies[hostname]
        found: DestinationPolicy | None = None
        for namespace in _unique([self._waypoint_namespace, self._namespace_of(hostname), self._root_namespace]):
            hosts = self._dr_groups.get(namespace, {})
            if hostname in hosts:
                found = hosts[hostname]
                break
            wildcards = [pattern for pattern in hosts if pattern.startswith("*") and host_matches(pattern, hostname)]
            if wildcards:
                found = dataclasses.replace(hosts[max(wildcards, key=len)], host=hostname)
                break
        self._policies[hostname] = found
        return found

    # -- VirtualServices ---------------------------------------------------------------------------

    def _checked_routes(self, vs: CompiledVirtualService) -> tuple[Route, ...]:
        """The VirtualService's routes minus those naming unknown subsets (errors recorded)."""
        kept: list[Route] = []
        for compiled in vs.routes:
            route = self._check_subsets(vs, compiled)
            if route is not None:
                kept.append(route)
        return tuple(kept)

    def _subset_error(self, host: str, subset: str) -> str | None:
        policy = self._policy_for_host(host)
        if policy is None:
            return f"subset {subset!r} of {host} is not defined: no DestinationRule applies to {host}"
        if subset not in policy.subsets:
            known = ", ".join(sorted(policy.subsets)) or "none"
            return f"subset {subset!r} is not defined by the DestinationRule for {host} (defined: {known})"
        return None

    def _check_subsets(self, vs: CompiledVirtualService, compiled: CompiledRoute) -> Route | None:
        route = compiled.route
        if isinstance(route.action, Forward):
            for destination, field in zip(route.action.destinations, compiled.destination_fields, strict=True):
                if destination.subset is None:
                    continue
                problem = self._subset_error(destination.host, destination.subset)
                if problem is not None:
                    self._errors.append(ConfigError("VirtualService", vs.namespace, vs.name, f"{field}.subset",
                                                    f"{problem}; this route is dropped"))
                    return None
        mirrors: list[Mirror] = []
        for mirror, field in zip(route.mirrors, compiled.mirror_fields, strict=True):
            problem = self._subset_error(mirror.host, mirror.subset) if mirror.subset is not None else None
            if problem is not None:
                self._errors.append(ConfigError("VirtualService", vs.namespace, vs.name, f"{field}.subset",
                                                f"{problem}; this mirror is dropped"))
                continue
            mirrors.append(mirror)
        if len(mirrors) != len(route.mirrors):
            route = dataclasses.replace(route, mirrors=tuple(mirrors))
        return route

    def _warn_about_precedence(self) -> None:
        attached: dict[str, CompiledHTTPRoute] = {}
        for http_route in self._http_routes:
            for attachment in http_route.attachments:
                attached.setdefault(attachment.hostname, http_route)
                self._warn_if_not_visible("HTTPRoute", http_route.namespace, http_route.name, attachment.hostname,
                                          attachment.field)
        first_vs: dict[str, CompiledVirtualService] = {}
        for vs in self._virtual_services:
            if not vs.applies_to_mesh:
                continue
            for i, host in enumerate(vs.hosts):
                field = f"spec.hosts[{i}]"
                if host.startswith("*") or self._warn_if_not_visible("VirtualService", vs.namespace, vs.name,
                                                                     host, field):
                    continue
                if host in attached:
                    other = attached[host]
                    self._errors.append(ConfigError(
                        "VirtualService", vs.namespace, vs.name, field,
                        f"HTTPRoute {other.namespace}/{other.name} also attaches to {host}; the HTTPRoute's rules "
                        "apply and this VirtualService is ignored for it (Istio: mixing both is undefined)",
                        "warning"))
                elif host in first_vs:
                    older = first_vs[host]
                    self._errors.append(ConfigError(
                        "VirtualService", vs.namespace, vs.name, field,
                        f"VirtualService {older.namespace}/{older.name} (older) also routes {host}; its routes "
                        "are tried first, then these", "warning"))
                else:
                    first_vs[host] = vs

    def _visible(self, namespace: str, hostname: str) -> bool:
        service_namespace = self._namespace_of(hostname)
        if service_namespace is None:
            return True
        return namespace in (service_namespace, self._waypoint_namespace) or self._waypoint_namespace is None

    def _warn_if_not_visible(self, kind: str, namespace: str, name: str, hostname: str, field: str) -> bool:
        """Warn (and return True) when a route for one of our waypoint's services is ignored because it
        lives in a third namespace."""
        if self._visible(namespace, hostname) or self._namespace_of(hostname) != self._waypoint_namespace:
            return False
        self._errors.append(ConfigError(
            kind, namespace, name, field,
            f"waypoints only apply routes from the service's namespace ({self._namespace_of(hostname)}) or their "
            f"own; this {kind} in {namespace} is ignored for {hostname}", "warning"))
        return True

    # -- tables ------------------------------------------------------------------------------------

    def _build_table(self, hostname: str, port: int) -> RouteTable:
        attached = [http_route for http_route in self._http_routes
                    if self._visible(http_route.namespace, hostname)
                    and any(a.hostname == hostname and a.port in (None, port) for a in http_route.attachments)]
        if attached:
            # Even with no usable rule: Gateway API answers 404 when no attached rule matches.
            gateway_routes = sorted((g for http_route in attached for g in http_route.routes),
                                    key=lambda g: (g.precedence, g.order))
            return RouteTable(tuple(self._resolve_ports(g.route, port) for g in gateway_routes), hostname, port,
                              "HTTPRoute")
        routes: list[Route] = []
        for vs in self._virtual_services:
            if not vs.applies_to_mesh or not vs.applies_to(hostname) or not self._visible(vs.namespace, hostname):
                continue
            for route in self._vs_routes.get((vs.namespace, vs.name), ()):
                for_port = _for_port(route, port)
                if for_port is not None:
                    routes.append(self._resolve_ports(for_port, port))
        if routes:
            return RouteTable(tuple(routes), hostname, port, "VirtualService")
        return default_table(hostname, port)

    def _resolve_ports(self, route: Route, port: int) -> Route:
        """Fill destination and mirror ports left unset: the service's only port, else the request's
        (Istio's getWaypointDestinationCluster)."""
        changed = False
        action = route.action
        if isinstance(action, Forward) and any(d.port is None for d in action.destinations):
            action = Forward(tuple(
                d if d.port is not None else dataclasses.replace(d, port=self._port_for(d.host, port))
                for d in action.destinations))
            changed = True
        mirrors = route.mirrors
        if any(m.port is None for m in mirrors):
            mirrors = tuple(m if m.port is not None else dataclasses.replace(m, port=self._port_for(m.host, port))
                            for m in mirrors)
            changed = True
        return dataclasses.replace(route, action=action, mirrors=mirrors) if changed else route

    def _port_for(self, host: str, port: int) -> int:
        service = self._services(host)
        if service is not None and len(service.ports) == 1:
            return service.ports[0]
        return port


def default_table(hostname: str, port: int) -> RouteTable:
    """A service without VirtualService/HTTPRoute: everything goes to the service itself."""
    route = Route(name="default", matches=(), action=Forward((WeightedDestination(hostname, port),)),
                  retries=DEFAULT_INBOUND_RETRY_POLICY, origin="default")
    return RouteTable((route,), hostname, port, "default")


def _for_port(route: Route, port: int) -> Route | None:
    """The route as seen on `port`: matches bound to another port are dropped; None if none is left."""
    if not route.matches or all(m.port is None or m.port == port for m in route.matches):
        return route
    kept = tuple(m for m in route.matches if m.port is None or m.port == port)
    return dataclasses.replace(route, matches=kept) if kept else None


def _unique(items: Iterable[str | None]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out
