"""ApiError ↔ Kubernetes `Status`: what the server renders is what the client parses back."""

from __future__ import annotations

from typing import Any

import pytest

from ambient.kube.errors import REASONS, ApiError, invalid, not_found


@pytest.mark.parametrize(("code", "reason"), sorted(REASONS.items()))
def test_default_reason_per_code(code: int, reason: str) -> None:
    assert ApiError(code, "x").reason == reason


def test_unknown_code_has_unknown_reason() -> None:
    assert ApiError(418, "teapot").reason == "Unknown"


def test_explicit_reason_wins() -> None:
    assert ApiError(409, "exists", "AlreadyExists").reason == "AlreadyExists"


def test_status_shape() -> None:
    assert ApiError(404, 'pods "p" not found').status() == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "p" not found', "reason": "NotFound", "code": 404,
    }
    assert ApiError(409, "m", details={"name": "p"}).status()["details"] == {"name": "p"}


@pytest.mark.parametrize("error", [
    ApiError(404, 'pods "p" not found'),
    ApiError(409, "exists", "AlreadyExists", {"name": "p", "kind": "pods"}),
    ApiError(410, "too old resource version", "Expired"),
    invalid("Service", "s", [("spec.ports[0].port", "bad"), ("spec.clusterIP", "worse")]),
])
def test_status_round_trips(error: ApiError) -> None:
    parsed = ApiError.from_status(599, error.status())
    assert (parsed.code, parsed.reason, parsed.message, parsed.details) == (
        error.code, error.reason, error.message, error.details)
    assert str(parsed) == error.message


@pytest.mark.parametrize(("code", "body", "message", "reason"), [
    (502, "<html>bad gateway</html>", "<html>bad gateway</html>", "Unknown"),
    (503, "", "HTTP 503", "ServiceUnavailable"),
    (500, {"kind": "Other"}, "{'kind': 'Other'}", "InternalError"),
    (500, {"kind": "Status", "message": "m"}, "m", "InternalError"),  # code missing: the HTTP code
    (500, "x" * 600, "x" * 500, "InternalError"),
])
def test_from_status_of_other_bodies(code: int, body: Any, message: str, reason: str) -> None:
    error = ApiError.from_status(code, body)
    assert (error.code, error.message, error.reason) == (code, message, reason)


def test_is_an_exception_carrying_the_message() -> None:
    with pytest.raises(ApiError, match="gone") as info:
        raise ApiError(410, "gone")
    assert info.value.code == 410


def test_not_found_names_the_resource_with_its_group() -> None:
    assert not_found("pods", "p").message == 'pods "p" not found'
    error = not_found("virtualservices", "vs", "networking.istio.io")
    assert error.message == 'virtualservices.networking.istio.io "vs" not found'
    assert (error.code, error.reason, error.details) == (404, "NotFound", {"name": "vs", "kind": "virtualservices"})


def test_invalid_names_each_field() -> None:
    error = invalid("Service", "s", [("spec.ports[0].port", "too big"), ("spec.clusterIP", "taken")])
    assert error.code == 422
    assert error.reason == "Invalid"
    assert error.message == 'Service "s" is invalid: spec.ports[0].port: too big; spec.clusterIP: taken'
    assert [c["field"] for c in error.details["causes"]] == ["spec.ports[0].port", "spec.clusterIP"]
    assert {c["reason"] for c in error.details["causes"]} == {"FieldValueInvalid"}
