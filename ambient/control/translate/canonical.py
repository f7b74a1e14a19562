"""A readable, stable JSON form of a Translation: protobuf JSON with proto field names, IP bytes as
IP strings, sorted keys. Used by the table tests (expected outputs) and by debug dumps."""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from .model import Translation

# Every bytes field named like this holds a 4- or 16-byte IP (workload and authorization protos).
_IP_FIELDS = ("address", "addresses")


def message_to_canonical(message: Message) -> dict[str, Any]:
    return _render_ips(json_format.MessageToDict(message, preserving_proto_field_name=True))  # type: ignore[no-any-return]


def to_canonical(translation: Translation) -> dict[str, Any]:
    return {
        "addresses": {k: message_to_canonical(v) for k, v in translation.addresses.items()},
        "authorizations": {k: message_to_canonical(v) for k, v in translation.authorizations.items()},
        "statuses": {"/".join(k): v for k, v in sorted(translation.statuses.items())},
    }


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def _render_ips(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _render_ips(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_ips(v, key) for v in value]
    if isinstance(value, str) and key in _IP_FIELDS:
        return str(ipaddress.ip_address(base64.b64decode(value)))
    return value
