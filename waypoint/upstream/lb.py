"""Load balancers: pick one endpoint of an upstream cluster for a request (DestinationRule `loadBalancer`).

One balancer per cluster — (service, subset, port), as Envoy's clusters are — kept across requests by the
caller, since round robin position, active request counts and the hash ring are per-cluster state.
`pick` gets the endpoints that may take traffic now (healthy, not ejected: see `outlier.usable_hosts`);
it never does I/O and never raises for an empty list (it returns None: the caller answers 503 `UH`).

Policies (Istio `loadBalancer.simple` / `consistentHash`):
- ROUND_ROBIN: strict rotation, starting at a random offset so that many waypoints do not all start on
  the same pod.
- LEAST_REQUEST (Istio's default; LEAST_CONN is its deprecated alias): power of two choices — two
  *distinct* random endpoints, the one with fewer active requests wins (Envoy samples with replacement;
  sampling distinct ones never wastes a choice). Active counts come from `started`/`finished`.
- RANDOM: uniform.
- consistentHash: a ring where every endpoint gets DEFAULT_MINIMUM_RING_SIZE virtual nodes placed by
  hashing its uid, so an endpoint's positions never depend on its peers: removing one of N endpoints
  moves only the keys it owned (~1/N). A request without a key (header/cookie/parameter absent) lands
  on a random point, as in Envoy. PASSTHROUGH and MAGLEV are not implemented: PASSTHROUGH falls back to
  the default, a maglev table to the ring (same key → same endpoint either way).

Retries: `exclude` holds the uids already tried; every balancer avoids them while another endpoint is
left. Istio drops the previous-hosts retry predicate under consistent hashing (a retry stays on the
hashed endpoint), so the caller should pass `exclude` only when `balancer.retries_prefer_other_hosts`.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from waypoint.http.message import RequestHeadLike
from waypoint.routing.model import DEFAULT_LOAD_BALANCER, HashCookie, LbAlgorithm, LoadBalancer
from waypoint.upstream.endpoints import Endpoint

ROUND_ROBIN = "ROUND_ROBIN"
LEAST_REQUEST = "LEAST_REQUEST"
RANDOM = "RANDOM"
RING_HASH = "RING_HASH"
# Envoy's and Istio's default minimum ring size. We give *each* endpoint this many virtual nodes (Envoy
# divides it among the endpoints) so that positions do not move when peers come and go.
DEFAULT_MINIMUM_RING_SIZE = 1024
# Envoy's hard ceiling on a ring; bounds memory for large clusters (per-endpoint nodes shrink to fit).
MAXIMUM_RING_SIZE = 8 * 1024 * 1024

_RNG = random.Random()


# --- hash keys ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HashKey:
    """A request's point on the ring. `set_cookie` is a `Set-Cookie` value the caller must add to the
    response when the affinity cookie was absent and generated for this request."""

    value: int
    set_cookie: str | None = None


def hash_key(policy: LoadBalancer | None, head: RequestHeadLike, source_ip: str | None, *,
             rng: random.Random | None = None) -> HashKey | None:
    """The consistent-hash key of a request, or None (not a consistent-hash policy, or the header,
    cookie, source IP or query parameter is absent: the ring then picks a random endpoint).

    A missing cookie with a `ttl` is generated like Envoy does: a random 64-bit hex value, hashed now
    and returned as `Set-Cookie: <name>="<value>"; Max-Age=<ttl>; Path=<path>; HttpOnly` (no Max-Age
    when ttl is 0: a session cookie), so the next request carrying it lands on the same endpoint.
    """
    settings = policy.consistent_hash if policy is not None else None
    if settings is None:
        return None
    header_name = settings.header
    if header_name:
        values = _header_values(head, header_name.lower())
        return HashKey(_hash64("\n".join(sorted(values)))) if values else None
    if settings.cookie is not None:
        return _cookie_key(settings.cookie, head, rng or _RNG)
    if settings.use_source_ip:
        return HashKey(_hash64(source_ip)) if source_ip else None
    parameter = settings.query_parameter
    if parameter:
        _, _, query = head.path.partition("?")
        value = next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == parameter), None)
        return HashKey(_hash64(value)) if value is not None else None
    return None


def _header_values(head: RequestHeadLike, name: str) -> list[str]:
    # Host and the pseudo-headers are not in `headers`; Istio lets a hash name them.
    if name in ("host", ":authority"):
        return [head.authority] if head.authority else []
    if name == ":path":
        return [head.path]
    if name == ":method":
        return [head.method]
    return head.headers.get_all(name)


def _cookie_key(cookie: HashCookie, head: RequestHeadLike, rng: random.Random) -> HashKey | None:
    value = _find_cookie(head.headers.get_all("cookie"), cookie.name)
    if value is not None:
        return HashKey(_hash64(value))
    ttl = cookie.ttl
    if ttl is None:
        return None
    value = f"{rng.getrandbits(64):016x}"
    parts = [f'{cookie.name}="{value}"']
    if ttl > 0:
        parts.append(f"Max-Age={int(ttl)}")
    path = getattr(cookie, "path", None)
    if path:
        parts.append(f"Path={path}")
    parts.append("HttpOnly")
    return HashKey(_hash64(value), set_cookie="; ".join(parts))


def _find_cookie(headers: Sequence[str], name: str) -> str | None:
    for header in headers:
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value
    return None


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


# --- balancers ---------------------------------------------------------------------------------------

class Balancer:
    """Common state: active requests per endpoint uid (for LEAST_REQUEST and for config_dump)."""

    name = ""
    retries_prefer_other_hosts = True

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._active: dict[str, int] = {}

    def pick(self, endpoints: Sequence[Endpoint], key: HashKey | None = None,
             exclude: Collection[str] = ()) -> Endpoint | None:
        """One of `endpoints`, avoiding uids in `exclude` while any other is left; None if empty."""
        if not endpoints:
            return None
        if exclude:
            remaining = [e for e in endpoints if e.uid not in exclude]
            if remaining:
                endpoints = remaining
        return self._choose(endpoints, key)

    def _choose(self, endpoints: Sequence[Endpoint], key: HashKey | None) -> Endpoint:
        raise NotImplementedError

    def started(self, endpoint: Endpoint) -> None:
        """A request was sent to `endpoint`; pair with exactly one `finished`."""
        self._active[endpoint.uid] = self._active.get(endpoint.uid, 0) + 1

    def finished(self, endpoint: Endpoint) -> None:
        count = self._active.get(endpoint.uid, 0) - 1
        if count > 0:
            self._active[endpoint.uid] = count
        else:
            self._active.pop(endpoint.uid, None)

    def active(self, uid: str) -> int:
        return self._active.get(uid, 0)

    def describe(self) -> dict[str, Any]:
        """For /config_dump: the policy and the endpoints with requests in flight."""
        return {"policy": self.name, "active_requests": dict(sorted(self._active.items()))}


class RoundRobinBalancer(Balancer):
    name = ROUND_ROBIN

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._next = rng.randrange(1 << 30)

    def _choose(self, endpoints: Sequence[Endpoint], key: HashKey | None) -> Endpoint:
        chosen = endpoints[self._next % len(endpoints)]
        self._next += 1
        return chosen


class LeastRequestBalancer(Balancer):
    name = LEAST_REQUEST

    def _choose(self, endpoints: Sequence[Endpoint], key: HashKey | None) -> Endpoint:
        count = len(endpoints)
        if count == 1:
            return endpoints[0]
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = endpoints[first], endpoints[second]
        return b if self.active(b.uid) < self.active(a.uid) else a


class RandomBalancer(Balancer):
    name = RANDOM

    def _choose(self, endpoints: Sequence[Endpoint], key: HashKey | None) -> Endpoint:
        return endpoints[self._rng.randrange(len(endpoints))]


class RingHashBalancer(Balancer):
    name = RING_HASH
    retries_prefer_other_hosts = False   # Istio's consistent-hash retry policy has no previous-hosts predicate

    def __init__(self, rng: random.Random, minimum_ring_size: int = DEFAULT_MINIMUM_RING_SIZE) -> None:
        super().__init__(rng)
        self.nodes_per_endpoint = max(1, minimum_ring_size)
        self._points: dict[tuple[str, int], list[int]] = {}   # (uid, nodes) → sorted ring positions
        self._ring_for: tuple[str, ...] = ()
        self._ring: list[int] = []
        self._owners: list[int] = []      # index into the endpoint list the ring was built for

    def pick(self, endpoints: Sequence[Endpoint], key: HashKey | None = None,
             exclude: Collection[str] = ()) -> Endpoint | None:
        if not endpoints:
            return None
        self._ensure_ring(endpoints)
        point = key.value if key is not None else self._rng.getrandbits(64)
        start = bisect.bisect_left(self._ring, point)
        size = len(self._ring)
        # Walking clockwise past excluded endpoints is exactly what removing them from the ring would do.
        for step in range(size if exclude else 1):
            owner = endpoints[self._owners[(start + step) % size]]
            if owner.uid not in exclude:
                return owner
        return endpoints[self._owners[start % size]]

    def _ensure_ring(self, endpoints: Sequence[Endpoint]) -> None:
        uids = tuple(e.uid for e in endpoints)
        if uids == self._ring_for:
            return
        nodes = max(1, min(self.nodes_per_endpoint, MAXIMUM_RING_SIZE // len(uids)))
        wanted = {(uid, nodes) for uid in uids}
        for stale in self._points.keys() - wanted:
            del self._points[stale]
        lists = []
        for index, uid in enumerate(uids):
            points = self._points.get((uid, nodes))
            if points is None:
                points = self._points[(uid, nodes)] = sorted(_hash64(f"{uid}#{i}") for i in range(nodes))
            lists.append([(p, index) for p in points])
        merged = list(heapq.merge(*lists))
        self._ring = [p for p, _ in merged]
        self._owners = [i for _, i in merged]
        self._ring_for = uids

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ring_size": len(self._ring),
                "virtual_nodes_per_endpoint": self.nodes_per_endpoint}


def make_balancer(policy: LoadBalancer | None, *, rng: random.Random | None = None) -> Balancer:
    """The balancer for a DestinationRule `loadBalancer` (None → Istio's default, LEAST_REQUEST; PASSTHROUGH
    falls back to it too, see the module docstring)."""
    rng = rng or random.Random()
    policy = policy or DEFAULT_LOAD_BALANCER
    if policy.consistent_hash is not None:
        return RingHashBalancer(rng, DEFAULT_MINIMUM_RING_SIZE)  # `minimumRingSize` is ignored (routing README)
    if policy.simple is LbAlgorithm.ROUND_ROBIN:
        return RoundRobinBalancer(rng)
    if policy.simple is LbAlgorithm.RANDOM:
        return RandomBalancer(rng)
    return LeastRequestBalancer(rng)
