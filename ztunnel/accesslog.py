"""ztunnel's access log: one line per connection when it closes (PROTOCOLS.md §10), in ztunnel's text or
JSON format, e.g.

    2025-01-01T12:00:00.000000Z  info  access  connection complete  src.addr=10.244.1.5:40936
    src.workload="sleep-v1" src.namespace="default" src.identity="spiffe://cluster.local/ns/default/sa/sleep"
    dst.addr=10.244.2.4:15008 dst.hbone_addr=10.244.2.4:8080 dst.service="httpbin.default.svc.cluster.local"
    dst.workload="httpbin-v1" dst.namespace="default" dst.identity="spiffe://cluster.local/ns/default/sa/httpbin"
    direction="outbound" bytes_sent=84 bytes_recv=306 duration="7ms"

(one line, tab-separated head). A failed connection logs at `error` with `error="..."`. Fields that are
unknown are left out; identities only appear for mutual TLS. The level is that of the `access` logger
(`/logging?level=access=off` silences it). Writing costs the loop one formatted string and a queue put.
"""

from __future__ import annotations

import logging
import time

from ambient.telemetry.labels import MUTUAL_TLS, UNKNOWN, ConnectionLabels
from ambient.telemetry.logs import Bare, FieldValue, LineWriter, line_format, writer_for

SCOPE = "access"
MESSAGE = "connection complete"
Address = tuple[str, int]


def host_port(address: Address) -> Bare:
    ip, port = address[0], address[1]
    return Bare(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")


def _known(value: str) -> str | None:
    return None if value == UNKNOWN or not value else value


def connection_fields(*, direction: str, src: Address, dst: Address, hbone: Address | None,
                      labels: ConnectionLabels, sent: int, received: int, duration: float, error: str = "",
                      src_workload: str | None = None, dst_workload: str | None = None) -> dict[str, FieldValue]:
    """The fields of one access log line, in ztunnel's order. `dst` is the address dialled (for HBONE the
    peer's :15008), `hbone` the CONNECT authority inside the tunnel; `sent`/`received` are the bytes the
    local workload sent and received; `src_workload`/`dst_workload` name the pods when known (ztunnel
    logs pod names), else the workload labels are used."""
    mtls = labels.connection_security_policy == MUTUAL_TLS
    fields: dict[str, FieldValue] = {
        "src.addr": host_port(src),
        "src.workload": src_workload or _known(labels.source_workload),
        "src.namespace": _known(labels.source_workload_namespace),
        "src.identity": _known(labels.source_principal) if mtls else None,
        "dst.addr": host_port(dst),
        "dst.hbone_addr": host_port(hbone) if hbone else None,
        "dst.service": _known(labels.destination_service),
        "dst.workload": dst_workload or _known(labels.destination_workload),
        "dst.namespace": _known(labels.destination_workload_namespace),
        "dst.identity": _known(labels.destination_principal) if mtls else None,
        "direction": direction,
        "bytes_sent": sent,
        "bytes_recv": received,
        "duration": f"{int(duration * 1000)}ms",
    }
    if error:
        fields["error"] = error
    return fields


class AccessLog:
    def __init__(self, log_format: str = "text", writer: LineWriter | None = None) -> None:
        self._format = line_format(log_format)  # ValueError names the accepted formats
        self._writer = writer or writer_for()
        self._logger = logging.getLogger(SCOPE)  # only for its level

    def connection(self, *, direction: str, src: Address, dst: Address, hbone: Address | None,
                   labels: ConnectionLabels, sent: int, received: int, duration: float, error: str = "",
                   src_workload: str | None = None, dst_workload: str | None = None) -> None:
        """Log one closed connection (arguments as `connection_fields`)."""
        level = logging.ERROR if error else logging.INFO
        if not self._logger.isEnabledFor(level):
            return
        fields = connection_fields(direction=direction, src=src, dst=dst, hbone=hbone, labels=labels, sent=sent,
                                   received=received, duration=duration, error=error, src_workload=src_workload,
                                   dst_workload=dst_workload)
        self._writer.write(self._format(time.time(), "error" if error else "info", SCOPE, MESSAGE, fields))
