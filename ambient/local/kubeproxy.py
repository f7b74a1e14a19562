"""Service VIP forwarding for pods outside the mesh, the way kube-proxy's iptables mode does it.

Inside one node's network namespace, traffic to a Service's cluster IP and port is DNATed to
one of its ready endpoints, picked at random with ``-m statistic``. A pod that reaches itself
through a VIP (hairpin) is marked in the endpoint chain and masqueraded on the way out, so the
reply comes back through the node instead of short-circuiting inside the pod.

The rules live in our own ``nat`` chains: ``AMBIENT-SERVICES`` (jumped to from PREROUTING and
OUTPUT), one ``AMBIENT-SVC-<hash>`` per service port, one ``AMBIENT-SEP-<hash>`` per endpoint,
and ``AMBIENT-POSTROUTING`` (jumped to from POSTROUTING). Rendering them is pure
(:func:`render`, :func:`jump_rules_missing`, :func:`jump_rules_to_delete`, :func:`chains_in`);
:class:`KubeProxy` is the thin shell that runs ``iptables-save``/``iptables-restore``.

Deliberately REJECT-free: a VIP without ready endpoints gets no rules at all, so its packets
are not translated and are routed like any other address (usually nowhere) instead of being
answered with an ICMP reject. The caller's clients see a timeout rather than "connection
refused".

What this module must not do: touch chains it does not own, flush whole tables or built-in
chains, enter network namespaces itself (the caller runs it inside the node's netns), or
handle NodePort, LoadBalancer, externalIPs, session affinity, IPv6 or SCTP.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import shlex
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

CHAIN_SERVICES = "AMBIENT-SERVICES"
CHAIN_POSTROUTING = "AMBIENT-POSTROUTING"
SVC_CHAIN_PREFIX = "AMBIENT-SVC-"
SEP_CHAIN_PREFIX = "AMBIENT-SEP-"
OUR_CHAIN_PREFIX = "AMBIENT-"
# kube-proxy's masquerade bit, so anyone who knows kube-proxy's rules reads ours the same way.
MASQ_MARK = "0x4000"
MASQ_MARK_MASK = "0x4000/0x4000"
# 60 s: iptables-restore -w waits for the xtables lock; a minute means something is stuck.
COMMAND_TIMEOUT = 60.0
SERVICE_LABEL = "kubernetes.io/service-name"
PROTOCOLS = ("TCP", "UDP")

# (built-in chain, our chain, comment) for each jump we own.
_JUMPS = (
    ("PREROUTING", CHAIN_SERVICES, "ambient service portals"),
    ("OUTPUT", CHAIN_SERVICES, "ambient service portals"),
    ("POSTROUTING", CHAIN_POSTROUTING, "ambient postrouting rules"),
)
_BUILTIN_CHAINS = frozenset(chain for chain, _, _ in _JUMPS)


class KubeProxyError(Exception):
    """An iptables command failed; carries the command line and what it printed on stderr."""

    reason = "iptables_failed"

    def __init__(self, command: Sequence[str], stderr: str, returncode: int | None = None) -> None:
        self.command = tuple(command)
        self.stderr = stderr
        self.returncode = returncode
        hint = ""
        if "Permission denied" in stderr or "must be root" in stderr:
            hint = " (kube-proxy rules need CAP_NET_ADMIN in the node's network namespace)"
        super().__init__(f"{shlex.join(self.command)} failed (exit {returncode}): {stderr.strip()}{hint}")


@dataclass(frozen=True, order=True)
class _Endpoint:
    ip: ipaddress.IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class _ServicePort:
    namespace: str
    service: str
    port_name: str
    protocol: str  # "TCP" or "UDP"
    port: int
    cluster_ips: tuple[str, ...]
    endpoints: tuple[_Endpoint, ...]  # ready ones, sorted

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port_name}/{self.protocol}"

    @property
    def display(self) -> str:
        name = f"{self.namespace}/{self.service}"
        return f"{name}:{self.port_name}" if self.port_name else name

    @property
    def svc_chain(self) -> str:
        return SVC_CHAIN_PREFIX + _hash16(self.key)

    def sep_chain(self, endpoint: _Endpoint) -> str:
        return SEP_CHAIN_PREFIX + _hash16(f"{self.key}/{endpoint}")


def _hash16(key: str) -> str:
    """16 base32 characters of SHA-256, as kube-proxy names its chains: stable and within 28 chars."""
    return base64.b32encode(hashlib.sha256(key.encode()).digest()).decode()[:16]


def _ipv4(text: object) -> ipaddress.IPv4Address | None:
    if not isinstance(text, str):
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip if isinstance(ip, ipaddress.IPv4Address) else None


def _protocol(port: Mapping[str, Any]) -> str:
    return str(port.get("protocol") or "TCP").upper()


def _ready_endpoints(slices: Iterable[Mapping[str, Any]], port_name: str, protocol: str) -> list[_Endpoint]:
    """Ready IPv4 endpoints of the slice port with this name and protocol.

    The port number comes from the slice, not from the Service's targetPort: the EndpointSlice
    controller has already resolved a named targetPort against each pod's container ports.
    """
    found: set[_Endpoint] = set()
    for slice_ in slices:
        if slice_.get("addressType", "IPv4") != "IPv4":
            continue
        numbers = [
            p.get("port")
            for p in slice_.get("ports") or []
            if (p.get("name") or "") == port_name and _protocol(p) == protocol
        ]
        if not numbers or not isinstance(numbers[0], int):
            continue
        for endpoint in slice_.get("endpoints") or []:
            # An unset "ready" means unknown, which consumers treat as ready (as kube-proxy does).
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                ip = _ipv4(address)
                if ip is not None:
                    found.add(_Endpoint(ip, numbers[0]))
    return sorted(found)


def _service_ports(services: Sequence[Mapping[str, Any]], slices: Sequence[Mapping[str, Any]]) -> list[_ServicePort]:
    slices_by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for slice_ in slices:
        metadata = slice_.get("metadata") or {}
        service = (metadata.get("labels") or {}).get(SERVICE_LABEL)
        if service:
            slices_by_service[(metadata.get("namespace") or "default", service)].append(slice_)

    ports: dict[str, _ServicePort] = {}
    for service in services:
        metadata = service.get("metadata") or {}
        spec = service.get("spec") or {}
        namespace, name = metadata.get("namespace") or "default", metadata.get("name") or ""
        # Headless ("None"), ExternalName ("") and IPv6-only services have no IPv4 VIP to forward.
        candidates = spec.get("clusterIPs") or [spec.get("clusterIP")]
        cluster_ips = tuple(sorted({str(ip) for ip in map(_ipv4, candidates) if ip is not None}))
        if not cluster_ips:
            continue
        for port in spec.get("ports") or []:
            protocol = _protocol(port)
            if protocol not in PROTOCOLS or not isinstance(port.get("port"), int):
                continue
            port_name = port.get("name") or ""
            service_port = _ServicePort(
                namespace=namespace,
                service=name,
                port_name=port_name,
                protocol=protocol,
                port=port["port"],
                cluster_ips=cluster_ips,
                endpoints=tuple(_ready_endpoints(slices_by_service[(namespace, name)], port_name, protocol)),
            )
            ports.setdefault(service_port.key, service_port)
    return [ports[key] for key in sorted(ports)]


def _comment(text: str) -> list[str]:
    return ["-m", "comment", "--comment", text]


def _rule(chain: str, *args: str) -> str:
    # iptables-restore understands double quotes only, so shlex's single quoting would not do.
    return " ".join(f'"{arg}"' if " " in arg else arg for arg in ("-A", chain, *args))


def _service_port_rules(service_port: _ServicePort) -> list[str]:
    proto = service_port.protocol.lower()
    svc_chain = service_port.svc_chain
    rules = [
        _rule(
            CHAIN_SERVICES,
            *("-d", f"{ip}/32", "-p", proto),
            *_comment(f"{service_port.display} cluster IP"),
            *("-m", proto, "--dport", str(service_port.port), "-j", svc_chain),
        )
        for ip in service_port.cluster_ips
    ]
    count = len(service_port.endpoints)
    for index, endpoint in enumerate(service_port.endpoints):
        sep_chain = service_port.sep_chain(endpoint)
        # Endpoint i is taken with probability 1/(n-i) of what is left, so each gets 1/n overall;
        # the last one takes everything that reaches it and needs no statistic match.
        spread = []
        if index < count - 1:
            spread = ["-m", "statistic", "--mode", "random", "--probability", f"{1.0 / (count - index):0.10f}"]
        rules += [
            _rule(svc_chain, *_comment(f"{service_port.display} -> {endpoint}"), *spread, "-j", sep_chain),
            _rule(
                sep_chain,
                *("-s", f"{endpoint.ip}/32"),
                *_comment(service_port.display),
                *("-j", "MARK", "--set-xmark", MASQ_MARK_MASK),
            ),
            _rule(
                sep_chain,
                *("-p", proto),
                *_comment(service_port.display),
                *("-m", proto, "-j", "DNAT", "--to-destination", str(endpoint)),
            ),
        ]
    return rules


def _postrouting_rules() -> list[str]:
    return [
        _rule(CHAIN_POSTROUTING, "-m", "mark", "!", "--mark", MASQ_MARK_MASK, "-j", "RETURN"),
        # Clear the bit so a packet that is re-routed is not masqueraded twice.
        _rule(CHAIN_POSTROUTING, "-j", "MARK", "--xor-mark", MASQ_MARK),
        _rule(CHAIN_POSTROUTING, *_comment("ambient hairpin traffic requiring SNAT"), "-j", "MASQUERADE"),
    ]


def _payload(chains: Iterable[str], rules: Iterable[str], deleted: Iterable[str]) -> str:
    # Declaring a chain (re)creates it empty, even under --noflush; that is what makes the
    # payload idempotent. Deleted chains are declared too, so they are empty and unreferenced
    # by the time their -X runs in the same transaction.
    deleted = sorted(deleted)
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in [*chains, *deleted]]
    lines += rules
    lines += [f"-X {chain}" for chain in deleted]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render(
    services: Sequence[Mapping[str, Any]],
    slices: Sequence[Mapping[str, Any]],
    existing_chains: Iterable[str] | None = None,
) -> str:
    """The ``iptables-restore --noflush`` payload for table ``nat`` forwarding these services.

    ``services`` and ``slices`` are Service and EndpointSlice objects as the API returns them.
    ``existing_chains`` (see :func:`chains_in`) lets stale AMBIENT-SVC/SEP chains be deleted.
    The jumps from the built-in chains are not in here: see :func:`jump_rules_missing`.
    """
    rendered: list[str] = [CHAIN_SERVICES, CHAIN_POSTROUTING]
    rules = _postrouting_rules()
    for service_port in _service_ports(services, slices):
        if not service_port.endpoints:
            continue  # no ready endpoint: no DNAT, and no SVC chain (see the module docstring)
        rendered.append(service_port.svc_chain)
        rendered += [service_port.sep_chain(endpoint) for endpoint in service_port.endpoints]
        rules += _service_port_rules(service_port)
    stale = {
        chain
        for chain in existing_chains or ()
        if chain.startswith((SVC_CHAIN_PREFIX, SEP_CHAIN_PREFIX)) and chain not in rendered
    }
    return _payload([*rendered[:2], *sorted(rendered[2:])], rules, stale)


def render_removal(existing_chains: Iterable[str]) -> str:
    """The ``iptables-restore --noflush`` payload that empties and deletes every AMBIENT-* chain."""
    ours = {chain for chain in existing_chains if chain.startswith(OUR_CHAIN_PREFIX)}
    return _payload([], [], ours)


def chains_in(iptables_save_output: str) -> set[str]:
    """Names of the chains declared (``:NAME POLICY [p:b]``) in ``iptables-save -t nat`` output."""
    return {line[1:].split()[0] for line in iptables_save_output.splitlines() if line.startswith(":")}


def _our_jumps(iptables_save_output: str) -> list[list[str]]:
    """Rules of the built-in chains that jump to one of our chains, as ``[chain, *spec]``."""
    jumps = []
    for line in iptables_save_output.splitlines():
        fields = line.split()
        if (
            len(fields) >= 4
            and fields[0] == "-A"
            and fields[1] in _BUILTIN_CHAINS
            and fields[-2] == "-j"
            and fields[-1].startswith(OUR_CHAIN_PREFIX)
        ):
            jumps.append(shlex.split(line)[1:])
    return jumps


def jump_rules_missing(iptables_save_output: str) -> list[list[str]]:
    """``iptables`` arguments (``-t nat -I CHAIN ...``) inserting the jumps not yet present."""
    present = {(jump[0], jump[-1]) for jump in _our_jumps(iptables_save_output)}
    return [
        ["-t", "nat", "-I", chain, *_comment(comment), "-j", target]
        for chain, target, comment in _JUMPS
        if (chain, target) not in present
    ]


def jump_rules_to_delete(iptables_save_output: str) -> list[list[str]]:
    """``iptables`` arguments (``-t nat -D CHAIN ...``) deleting every jump into our chains."""
    return [["-t", "nat", "-D", *jump] for jump in _our_jumps(iptables_save_output)]


class CommandRunner(Protocol):
    """Runs one command and returns its stdout, raising :class:`KubeProxyError` on failure."""

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str: ...


def run_command(argv: Sequence[str], stdin: str | None = None) -> str:
    """The real :class:`CommandRunner`: a subprocess in the current network namespace."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KubeProxyError(argv, str(exc)) from exc
    if done.returncode != 0:
        raise KubeProxyError(argv, done.stderr, done.returncode)
    return done.stdout


@dataclass(frozen=True)
class IptablesCommands:
    """The binaries to run; the defaults are whatever backend the node's ``iptables`` is."""

    iptables: str = "iptables"
    save: str = "iptables-save"
    restore: str = "iptables-restore"


class KubeProxy:
    """Applies :func:`render` to the network namespace this process runs in."""

    def __init__(self, runner: CommandRunner = run_command, commands: IptablesCommands | None = None) -> None:
        self._run = runner
        self._commands = commands or IptablesCommands()

    def _save(self) -> str:
        return self._run([self._commands.save, "-t", "nat"])

    def _restore(self, payload: str) -> None:
        self._run([self._commands.restore, "--noflush", "-w"], payload)

    def sync(self, services: Sequence[Mapping[str, Any]], slices: Sequence[Mapping[str, Any]]) -> None:
        """Make the nat table forward exactly these services; safe to repeat."""
        before = self._save()
        # Chains first: a jump can only be inserted once its target chain exists.
        self._restore(render(services, slices, chains_in(before)))
        for args in jump_rules_missing(before):
            self._run([self._commands.iptables, "-w", *args])

    def remove(self) -> None:
        """Delete our jumps, then every AMBIENT-* chain; a no-op when there is nothing of ours."""
        before = self._save()
        for args in jump_rules_to_delete(before):
            self._run([self._commands.iptables, "-w", *args])
        ours = {chain for chain in chains_in(before) if chain.startswith(OUR_CHAIN_PREFIX)}
        if ours:
            self._restore(render_removal(ours))
