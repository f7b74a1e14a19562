"""Kubernetes API errors as one exception type, carrying the `Status` object's facts.

The local API server raises these and renders them as `Status`; the client parses a `Status` body back
into the same type, so callers handle a real cluster and the local one alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass
class ApiError(Exception):
    code: int
    message: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reason = self.reason or REASONS.get(self.code, "Unknown")
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body

    @classmethod
    def from_status(cls, code: int, body: Any) -> ApiError:
        if isinstance(body, dict) and body.get("kind") == "Status":
            return cls(int(body.get("code") or code), str(body.get("message", "")),
                       str(body.get("reason", "")), body.get("details") or {})
        return cls(code, str(body)[:500] or f"HTTP {code}")


def not_found(kind: str, name: str, group: str = "") -> ApiError:
    resource = f"{kind}.{group}" if group else kind
    return ApiError(404, f'{resource} "{name}" not found', details={"name": name, "kind": kind})


def invalid(kind: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """422 naming each field at fault, as Kubernetes validation does."""
    text = "; ".join(f"{f}: {m}" for f, m in causes)
    return ApiError(422, f'{kind} "{name}" is invalid: {text}', details={
        "name": name, "kind": kind,
        "causes": [{"reason": "FieldValueInvalid", "field": f, "message": m} for f, m in causes],
    })
