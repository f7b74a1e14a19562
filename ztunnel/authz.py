"""L4 authorization of inbound connections (PROTOCOLS.md §5.3), as Istio ztunnel's `assert_rbac`.

Sans-IO: `authorize(snapshot, dest, conn)` decides one connection to workload `dest` from the policies in
one `WorkloadSnapshot`. Applicable policies: every GLOBAL-scope policy (istiod gives that scope only to
policies of the root namespace), the NAMESPACE-scope policies of `dest`'s namespace, and the policies
`dest.authorization_policies` names (selector policies, PeerAuthentication conversions). Then:
a matching DENY rejects (`explicitly denied by: <ns>/<name>`); no ALLOW policy → allow; a matching ALLOW
allows; otherwise reject (`allow policies exist, but none allowed`). `dry_run` policies are evaluated and
reported but never decide.

Matching, exactly as ztunnel's `Authorization::matches`: a policy without rules matches nothing; rules OR;
clauses of a rule AND (a clause without matches holds); matches of a clause OR (an empty match never
matches); inside a match every present field must hold — positive lists need any entry to hold, `not_`
lists need none to. `principals` compare to the peer's SPIFFE id without `spiffe://`, `namespaces` to the
namespace in it (empty for plaintext, so plaintext matches no principal and no namespace, and
`not_principals: [presence]` — STRICT mTLS — matches exactly the plaintext connections). Address entries
that are not valid CIDRs are dropped, as ztunnel drops them.

Policies are compiled once per policy map (the store keeps the map object until authorizations change).
This module must not do I/O or log; callers log `AuthzResult.reason` and `dry_run`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ambient.identity.errors import InvalidSpiffeId
from ambient.identity.spiffe import SCHEME, SpiffeId
from ambient.proto import authorization_pb2
from ambient.xds.store import Authorization, IpAddress, Workload, WorkloadSnapshot
from ztunnel.errors import AuthorizationDenied, ExplicitlyDenied, NotAllowed

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
StringPredicate = Callable[[str], bool]

DRY_RUN_DENY = "dry-run: deny policy match"
DRY_RUN_ALLOW = "dry-run: allow policy match"
DRY_RUN_NO_ALLOW = "dry-run: no allow policies match"


@dataclass(frozen=True)
class ConnectionInfo:
    """One inbound connection as authorization sees it.

    `dst_port` is the resolved target port (the pod's port, not the service port). `src_identity` is the
    peer's SPIFFE id from its mTLS certificate, or None for plaintext (15006).
    """

    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: SpiffeId | str | None = None


@dataclass(frozen=True)
class AuthzResult:
    """The verdict. `policy` (`<ns>/<name>`) is the policy that decided: the matching DENY or ALLOW; None when
    no ALLOW policy applied (default allow) or none matched. `reason` is ztunnel's log string of a rejection
    (`explicitly denied by: <ns>/<name>`, `allow policies exist, but none allowed`), empty when allowed.
    `dry_run` holds one log line per dry-run policy that matched (and the dry-run "no allow" outcome)."""

    allowed: bool
    policy: str | None = None
    reason: str = ""
    dry_run: tuple[str, ...] = ()

    def error(self) -> AuthorizationDenied | None:
        """The rejection as an exception (its `reason` is the stable metrics label), or None when allowed."""
        if self.allowed:
            return None
        return ExplicitlyDenied(self.policy) if self.policy is not None else NotAllowed()


@dataclass(frozen=True)
class _Peer:
    src_ip: IpAddress
    dst_ip: IpAddress
    dst_port: int
    principal: str  # the SPIFFE id with its scheme (ztunnel strips it while matching); "" for plaintext
    namespace: str  # "" for plaintext
    service_account: tuple[str, str] | None  # (namespace, service account); None for plaintext


def _peer(conn: ConnectionInfo) -> _Peer:
    identity = conn.src_identity
    principal, namespace, service_account = "", "", None
    if isinstance(identity, str):
        principal = identity
        try:
            identity = SpiffeId.parse(identity)
        except InvalidSpiffeId:
            identity = None  # still matched as a principal string; no namespace or service account
    if isinstance(identity, SpiffeId):
        principal = str(identity)
        namespace = identity.namespace
        service_account = (identity.namespace, identity.service_account)
    return _Peer(_canonical(conn.src_ip), _canonical(conn.dst_ip), conn.dst_port, principal, namespace,
                 service_account)


def _canonical(text: str) -> IpAddress:
    """IPv4-mapped IPv6 (`::ffff:10.0.0.1`, what a dual-stack socket reports) → the IPv4 address."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _string_predicate(match: authorization_pb2.StringMatch) -> StringPredicate | None:
    kind = match.WhichOneof("match_type")
    if kind == "exact":
        return match.exact.__eq__
    if kind == "prefix":
        prefix = match.prefix
        return lambda value: value.startswith(prefix)
    if kind == "suffix":
        suffix = match.suffix
        return lambda value: value.endswith(suffix)
    if kind == "presence":
        return bool
    return None  # unset oneof: ztunnel drops the entry


def _strings(matches: Iterable[authorization_pb2.StringMatch]) -> tuple[StringPredicate, ...]:
    return tuple(p for p in map(_string_predicate, matches) if p is not None)


def _networks(addresses: Iterable[authorization_pb2.Address]) -> tuple[IpNetwork, ...]:
    result = []
    for address in addresses:
        try:
            result.append(ipaddress.ip_network((ipaddress.ip_address(address.address), address.length), strict=False))
        except ValueError:
            continue  # not 4/16 bytes, or a prefix longer than the address: ztunnel drops it too
    return tuple(result)


def _ports(ports: Iterable[int]) -> frozenset[int]:
    return frozenset(p & 0xFFFF for p in ports)  # ztunnel reads the uint32 as a u16


def _accounts(matches: Iterable[authorization_pb2.ServiceAccountMatch]) -> frozenset[tuple[str, str]]:
    return frozenset((m.namespace, m.serviceAccount) for m in matches)


def _principal_holds(predicate: StringPredicate, principal: str) -> bool:
    # Istio writes principals without the scheme; an identity without it matches none.
    return principal.startswith(SCHEME) and predicate(principal[len(SCHEME):])


@dataclass(frozen=True)
class _Match:
    namespaces: tuple[StringPredicate, ...]
    not_namespaces: tuple[StringPredicate, ...]
    principals: tuple[StringPredicate, ...]
    not_principals: tuple[StringPredicate, ...]
    source_ips: tuple[IpNetwork, ...]
    not_source_ips: tuple[IpNetwork, ...]
    destination_ips: tuple[IpNetwork, ...]
    not_destination_ips: tuple[IpNetwork, ...]
    destination_ports: frozenset[int]
    not_destination_ports: frozenset[int]
    service_accounts: frozenset[tuple[str, str]]
    not_service_accounts: frozenset[tuple[str, str]]

    @classmethod
    def compile(cls, match: authorization_pb2.Match) -> _Match:
        return cls(
            _strings(match.namespaces), _strings(match.not_namespaces),
            _strings(match.principals), _strings(match.not_principals),
            _networks(match.source_ips), _networks(match.not_source_ips),
            _networks(match.destination_ips), _networks(match.not_destination_ips),
            _ports(match.destination_ports), _ports(match.not_destination_ports),
            _accounts(match.service_accounts), _accounts(match.not_service_accounts))

    @property
    def empty(self) -> bool:
        return not any((self.namespaces, self.not_namespaces, self.principals, self.not_principals,
                        self.source_ips, self.not_source_ips, self.destination_ips, self.not_destination_ips,
                        self.destination_ports, self.not_destination_ports, self.service_accounts,
                        self.not_service_accounts))

    def holds(self, peer: _Peer) -> bool:
        # Positive list: empty or any entry holds. Negative list: empty or no entry holds.
        if self.destination_ips and not any(peer.dst_ip in n for n in self.destination_ips):
            return False
        if any(peer.dst_ip in n for n in self.not_destination_ips):
            return False
        if self.source_ips and not any(peer.src_ip in n for n in self.source_ips):
            return False
        if any(peer.src_ip in n for n in self.not_source_ips):
            return False
        if self.destination_ports and peer.dst_port not in self.destination_ports:
            return False
        if peer.dst_port in self.not_destination_ports:
            return False
        if self.service_accounts and peer.service_account not in self.service_accounts:
            return False
        if peer.service_account is not None and peer.service_account in self.not_service_accounts:
            return False
        if self.principals and not any(_principal_holds(p, peer.principal) for p in self.principals):
            return False
        if any(_principal_holds(p, peer.principal) for p in self.not_principals):
            return False
        if self.namespaces and not any(p(peer.namespace) for p in self.namespaces):
            return False
        return not any(p(peer.namespace) for p in self.not_namespaces)


@dataclass(frozen=True)
class _Policy:
    key: str
    deny: bool
    dry_run: bool
    # rules → clauses → matches (empty matches already removed; `None` marks a clause that held only those)
    rules: tuple[tuple[tuple[_Match, ...] | None, ...], ...]

    @classmethod
    def compile(cls, key: str, policy: Authorization) -> _Policy:
        rules = []
        for rule in policy.rules:
            clauses: list[tuple[_Match, ...] | None] = []
            for clause in rule.clauses:
                matches = tuple(m for m in map(_Match.compile, clause.matches) if not m.empty)
                # A clause without matches holds; one whose matches are all empty never does.
                clauses.append(matches if matches or not clause.matches else None)
            rules.append(tuple(clauses))
        return cls(key, policy.action == authorization_pb2.DENY, policy.dry_run, tuple(rules))

    def matches(self, peer: _Peer) -> bool:
        return any(all(self._clause_holds(clause, peer) for clause in rule) for rule in self.rules)

    @staticmethod
    def _clause_holds(clause: tuple[_Match, ...] | None, peer: _Peer) -> bool:
        if clause is None:
            return False
        return not clause or any(m.holds(peer) for m in clause)


@dataclass(frozen=True)
class _PolicyIndex:
    by_key: Mapping[str, _Policy]
    global_keys: tuple[str, ...]
    namespace_keys: Mapping[str, tuple[str, ...]]

    @classmethod
    def build(cls, authorizations: Mapping[str, Authorization]) -> _PolicyIndex:
        by_key = {key: _Policy.compile(key, policy) for key, policy in sorted(authorizations.items())}
        namespaces: dict[str, list[str]] = {}
        global_keys = []
        for key, policy in sorted(authorizations.items()):
            if policy.scope == authorization_pb2.GLOBAL:
                global_keys.append(key)
            elif policy.scope == authorization_pb2.NAMESPACE:
                namespaces.setdefault(policy.namespace, []).append(key)
        return cls(by_key, tuple(global_keys), {ns: tuple(keys) for ns, keys in namespaces.items()})

    def applicable(self, dest: Workload) -> list[_Policy]:
        # ztunnel's order: namespace, global, then the workload's own list; each policy once.
        keys = dict.fromkeys((*self.namespace_keys.get(dest.namespace, ()), *self.global_keys,
                              *dest.authorization_policies))
        # A name the workload lists but the store lacks is a policy not pushed yet (or just removed): skip it.
        return [self.by_key[k] for k in keys if k in self.by_key]


_index_cache: tuple[Mapping[str, Authorization], _PolicyIndex] | None = None


def _policy_index(authorizations: Mapping[str, Authorization]) -> _PolicyIndex:
    # Keyed by the map object, which the cache keeps alive: the store swaps in a new map on every change.
    global _index_cache
    cached = _index_cache
    if cached is not None and cached[0] is authorizations:
        return cached[1]
    index = _PolicyIndex.build(authorizations)
    _index_cache = (authorizations, index)
    return index


ALLOWED = AuthzResult(True)


def authorize(snapshot: WorkloadSnapshot, dest: Workload, conn: ConnectionInfo) -> AuthzResult:
    """Decide one inbound connection to `dest` (PROTOCOLS §5.3)."""
    policies = _policy_index(snapshot.authorizations).applicable(dest)
    if not policies:
        return ALLOWED
    return _evaluate(policies, _peer(conn))


def _evaluate(policies: Sequence[_Policy], peer: _Peer) -> AuthzResult:
    dry_run: list[str] = []
    for policy in policies:
        if policy.deny and policy.dry_run and policy.matches(peer):
            dry_run.append(f"{DRY_RUN_DENY}: {policy.key}")
    for policy in policies:
        if policy.deny and not policy.dry_run and policy.matches(peer):
            return AuthzResult(False, policy.key, str(ExplicitlyDenied(policy.key)), tuple(dry_run))
    allow = [p for p in policies if not p.deny and not p.dry_run]
    allow_dry_run = [p for p in policies if not p.deny and p.dry_run]
    dry_allowed = [p.key for p in allow_dry_run if p.matches(peer)]
    dry_run += [f"{DRY_RUN_ALLOW}: {key}" for key in dry_allowed]
    if not allow:
        if allow_dry_run and not dry_allowed:
            dry_run.append(DRY_RUN_NO_ALLOW)  # enforcing the dry-run policies would reject this
        return AuthzResult(True, dry_run=tuple(dry_run))
    for policy in allow:
        if policy.matches(peer):
            return AuthzResult(True, policy.key, dry_run=tuple(dry_run))
    return AuthzResult(False, None, str(NotAllowed()), tuple(dry_run))
