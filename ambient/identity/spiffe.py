"""SPIFFE identities of Kubernetes workloads: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

This is the only identity form Istio issues and checks (PROTOCOLS.md §5, §6). Parsing follows the SPIFFE
ID spec's character rules (trust domain: lowercase letters, digits, `.-_`; path segments: letters,
digits, `.-_`, never `.` or `..`) and Istio's shape rule (exactly `ns/<ns>/sa/<sa>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ambient.identity.errors import InvalidSpiffeId

SCHEME = "spiffe://"
MAX_LENGTH = 2048  # bytes; the SPIFFE spec's limit for a whole ID
DEFAULT_TRUST_DOMAIN = "cluster.local"  # Istio's default mesh trust domain

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def _check_trust_domain(value: str, whole: str) -> None:
    if not _TRUST_DOMAIN.fullmatch(value):
        raise InvalidSpiffeId(f"invalid SPIFFE id {whole!r}: trust domain {value!r} must be non-empty and use only "
                              "lowercase letters, digits, '.', '-' and '_'")


def _check_segment(value: str, what: str, whole: str) -> None:
    if not _SEGMENT.fullmatch(value) or value in {".", ".."}:
        raise InvalidSpiffeId(f"invalid SPIFFE id {whole!r}: {what} {value!r} must be non-empty, not '.' or '..', "
                              "and use only letters, digits, '.', '-' and '_'")


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        whole = f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
        _check_trust_domain(self.trust_domain, whole)
        _check_segment(self.namespace, "namespace", whole)
        _check_segment(self.service_account, "service account", whole)
        if len(whole.encode()) > MAX_LENGTH:
            raise InvalidSpiffeId(f"invalid SPIFFE id: longer than {MAX_LENGTH} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """`spiffe://td/ns/NS/sa/SA` → SpiffeId; anything else raises `InvalidSpiffeId` saying why."""
        if not isinstance(text, str):
            raise InvalidSpiffeId(f"invalid SPIFFE id {text!r}: not a string")
        if not text.startswith(SCHEME):
            raise InvalidSpiffeId(f"invalid SPIFFE id {text!r}: must start with {SCHEME!r}")
        parts = text[len(SCHEME):].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise InvalidSpiffeId(f"invalid SPIFFE id {text!r}: expected "
                                  "spiffe://<trust domain>/ns/<namespace>/sa/<service account>")
        return cls(parts[0], parts[2], parts[4])

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
