"""The identity package's exceptions: one base class, each subclass with a stable `reason`.

`reason` is meant for metric labels and log fields; the message is for the user and says what to fix.
Third-party exceptions (cryptography's parsers, grpc) are caught where they are raised and wrapped into
these, so callers handle one hierarchy.
"""

from __future__ import annotations


class IdentityError(Exception):
    """Base class; `reason` is a short stable identifier."""

    reason = "identity_error"


class InvalidSpiffeId(IdentityError, ValueError):
    """A string that is not `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`."""

    reason = "invalid_spiffe_id"


class InvalidCsr(IdentityError, ValueError):
    """A certificate signing request that cannot be parsed or does not carry exactly one SPIFFE URI SAN."""

    reason = "invalid_csr"


class InvalidCertificate(IdentityError, ValueError):
    """A certificate chain that cannot be parsed, does not chain up, or names the wrong identity."""

    reason = "invalid_certificate"


class CaMaterialError(IdentityError):
    """The CA's own certificate or key (generated, persisted or given with --ca-cert/--ca-key) is unusable."""

    reason = "ca_material"


class SigningError(IdentityError):
    """The signer refused a request (for example a validity longer than the maximum)."""

    reason = "signing_refused"


class CaError(IdentityError):
    """A certificate request to the CA failed; `code` is the gRPC status code name (e.g. "UNAVAILABLE")."""

    reason = "ca_request_failed"

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class CertificateUnavailable(IdentityError):
    """No valid certificate for an identity: the CA has not (yet) issued one, or the last one expired."""

    reason = "certificate_unavailable"
