"""The waypoint's HTTP side ports (PROTOCOLS.md §1, §10), on `ambient.telemetry.admin_http`:

- 15000, the pod's loopback (Envoy's admin port in a real waypoint): `GET /config_dump` (JSON: `routes`,
  `clusters`, `policies`, `errors`, `certificates`, `version`, from what the app hands over), `GET|POST
  /logging[?level=]`, `POST /quitquitquit`, `GET /stats/prometheus`, `GET /healthz/ready`.
- 15020, all addresses: `GET /stats/prometheus` and `GET /metrics` (rendered on demand, per scrape).
- 15021, all addresses: `GET /healthz/ready` → `200 ready` or `503 not ready: <reason>` (what Istio's
  readiness probe on a waypoint pod reads; Envoy and pilot-agent answer 503 while not ready).

`config_dump_document` is pure: it turns the app's compiled configuration (frozen dataclasses, mappings,
enums, regexes, protobuf messages) into JSON with camelCase keys. The servers own nothing but their sockets.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import logging
import math
import platform
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from google.protobuf.message import Message

from ambient.telemetry import admin_http
from ambient.telemetry.admin_http import Request, Response, Router, json_response, text_response
from ambient.telemetry.registry import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger("waypoint.admin")

Address = tuple[str, int]
Json = dict[str, Any]
DUMP_SECTIONS = ("routes", "clusters", "policies", "errors", "certificates")  # then "version", then any extra


class ConfigDumpSource(Protocol):
    """An app that can describe its configuration: a mapping with (some of) `DUMP_SECTIONS`."""

    def config_dump(self) -> Mapping[str, Any]: ...


ConfigDump = Callable[[], Mapping[str, Any]]
ReadinessCheck = Callable[[], tuple[bool, str]]  # (ready, why not)


# -- config_dump: pure conversions ----------------------------------------------------------------------
def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def jsonable(value: Any) -> Any:
    """`value` as JSON-ready data: dataclasses → objects with camelCase keys, mappings → objects (keys as
    strings), sequences and sets → arrays (sets sorted), enums → their names, regexes → their patterns,
    protobuf messages → their proto3 JSON, bytes → text when UTF-8 else hex, non-finite floats → strings;
    anything else → its `str`."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {camel(f.name): jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(jsonable(k)) if not isinstance(k, str) else k: jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, Message):
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(value)
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return bytes(value).hex()
    return str(value)


def version_json() -> Json:
    try:
        version = importlib.metadata.version("ambient-py")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "pythonVersion": platform.python_version()}


def config_dump_document(parts: Mapping[str, Any]) -> Json:
    """The `/config_dump` document: `DUMP_SECTIONS` in order (a missing one is empty), `version` (ours
    unless the app gives one), then any other section the app adds, all passed through `jsonable`."""
    document: Json = {name: jsonable(parts.get(name, [])) for name in DUMP_SECTIONS}
    document["version"] = jsonable(parts["version"]) if "version" in parts else version_json()
    for name, value in parts.items():
        if name not in document:
            document[name] = jsonable(value)
    return document


# -- readiness ------------------------------------------------------------------------------------------
def readiness_response(check: ReadinessCheck | None) -> Response:
    if check is None:
        return text_response("ready\n")
    try:
        ready, reason = check()
    except Exception as exc:  # a readiness check that fails says not ready, with why
        log.exception("readiness check failed")
        ready, reason = False, f"readiness check failed: {exc}"
    if ready:
        return text_response("ready\n")
    return text_response(f"not ready: {reason or 'no reason given'}\n", 503)


# -- HTTP shells ----------------------------------------------------------------------------------------
class HttpServer(admin_http.HttpServer):
    """One of the three ports; `start()` raises `admin_http.ListenError` (an OSError) naming the address."""

    def __init__(self, router: Router, address: Address, what: str) -> None:
        super().__init__(router, address, what=what)

    async def start(self, sock: socket.socket | None = None) -> None:
        await super().start(sock)
        log.info("%s listening on %s:%d", self.what, self.address[0], self.port)


INDEX = """waypoint admin
  /config_dump      compiled routes, clusters, policies, config errors, certificates (JSON)
  /logging          current log level; ?level=debug|info|warn|error|off or <scope>=<level>
  /quitquitquit     POST: shut down
  /stats/prometheus metrics
  /healthz/ready    readiness
"""


class AdminServer(HttpServer):
    """Port 15000. `source` is a callable returning the dump's parts, or an object with `config_dump()`.
    `POST /quitquitquit` calls `on_quit()` (which should start the shutdown and return) and answers at
    once, so that the drain is free to close this server."""

    def __init__(self, source: ConfigDump | ConfigDumpSource, on_quit: Callable[[], object],
                 address: Address = ("127.0.0.1", 15000), *, readiness: ReadinessCheck | None = None,
                 metrics: Callable[[], bytes] | None = None) -> None:
        self._dump: ConfigDump = source if callable(source) else source.config_dump
        self._on_quit = on_quit
        self._readiness = readiness
        self._metrics = metrics
        router = Router()
        router.get("/", lambda _: text_response(INDEX))
        router.get("/config_dump", self._config_dump)
        router.add(("GET", "POST"), "/logging", admin_http.log_level)
        router.post("/quitquitquit", self._quit)
        router.get("/healthz/ready", lambda _: readiness_response(self._readiness))
        if metrics is not None:
            router.get("/stats/prometheus", self._stats)
        super().__init__(router, address, "admin server")

    def _config_dump(self, _: Request) -> Response:
        try:
            return json_response(config_dump_document(self._dump()))
        except Exception as exc:
            log.exception("config_dump failed")
            return text_response(f"config_dump failed: {exc}\n", 500)

    def _quit(self, _: Request) -> Response:
        log.info("shutdown requested on the admin port")
        self._on_quit()
        return text_response("shutdown now\n")

    def _stats(self, _: Request) -> Response:
        assert self._metrics is not None
        return Response(body=self._metrics(), content_type=METRICS_CONTENT_TYPE)


class MetricsServer(HttpServer):
    """Port 15020: `GET /stats/prometheus` and `GET /metrics`, the body from `render()`."""

    def __init__(self, render: Callable[[], bytes], address: Address = ("0.0.0.0", 15020)) -> None:
        self._render = render
        router = Router()
        router.get("/stats/prometheus", self._metrics)
        router.get("/metrics", self._metrics)
        super().__init__(router, address, "metrics server")

    def _metrics(self, _: Request) -> Response:
        return Response(body=self._render(), content_type=METRICS_CONTENT_TYPE)


class ReadinessServer(HttpServer):
    """Port 15021: `GET /healthz/ready`."""

    def __init__(self, readiness: ReadinessCheck, address: Address = ("0.0.0.0", 15021)) -> None:
        self._readiness = readiness
        router = Router()
        router.get("/healthz/ready", lambda _: readiness_response(self._readiness))
        super().__init__(router, address, "readiness server")
