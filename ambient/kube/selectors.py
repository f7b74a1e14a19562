"""Kubernetes label and field selectors: parse the query-string form and match objects.

Shared by the local API server (server-side filtering) and clients (cache filtering). Pure code:
no IO, no knowledge of resource kinds beyond the field paths it is given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    """A selector string that does not parse; the message says which part is wrong."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.op:
            case "=":
                return present and value == self.values[0]
            case "!=":
                return not present or value != self.values[0]
            case "in":
                return present and value in self.values
            case "notin":
                return not present or value not in self.values
            case "exists":
                return present
            case _:
                return not present


_KEY = r"[A-Za-z0-9](?:[A-Za-z0-9._/-]*[A-Za-z0-9])?"
_SET_RE = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)\s*$")
_EQ_RE = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)\s*$")
_EXISTS_RE = re.compile(rf"^\s*(?P<neg>!?)\s*(?P<key>{_KEY})\s*$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> tuple[Requirement, ...]:
    """`a=b,c!=d,e in (x,y),f notin (z),g,!h` → requirements (all must hold)."""
    if not text:
        return ()
    requirements = []
    for part in _split_top_level(text):
        if m := _SET_RE.match(part):
            values = tuple(v.strip() for v in m["values"].split(",") if v.strip())
            requirements.append(Requirement(m["key"], m["op"], values))
        elif m := _EQ_RE.match(part):
            requirements.append(Requirement(m["key"], "!=" if m["op"] == "!=" else "=", (m["value"],)))
        elif m := _EXISTS_RE.match(part):
            requirements.append(Requirement(m["key"], "!" if m["neg"] else "exists"))
        else:
            raise SelectorError(f"unable to parse label selector requirement {part.strip()!r}")
    return tuple(requirements)


def labels_match(requirements: tuple[Requirement, ...], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in requirements)


def selector_from_match_labels(selector: Mapping[str, Any] | None) -> tuple[Requirement, ...]:
    """A `LabelSelector` object (matchLabels + matchExpressions) or a plain Service selector map."""
    if not selector:
        return ()
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return tuple(Requirement(k, "=", (str(v),)) for k, v in sorted(selector.items()))
    reqs = [Requirement(k, "=", (str(v),)) for k, v in sorted((selector.get("matchLabels") or {}).items())]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.get("matchExpressions") or []:
        # Comes from user manifests: a malformed entry is a SelectorError (→ 422), not a crash (→ 500).
        if not isinstance(expr, Mapping) or not isinstance(expr.get("key"), str):
            raise SelectorError(f"matchExpressions entry {expr!r} needs a string `key`")
        op = ops.get(expr.get("operator", ""))
        if op is None:
            raise SelectorError(f"unknown matchExpressions operator {expr.get('operator')!r}")
        reqs.append(Requirement(expr["key"], op, tuple(expr.get("values") or ())))
    return tuple(reqs)


# Field selectors: only the fields Kubernetes supports for the kinds we serve.
FIELD_PATHS = {
    "metadata.name": ("metadata", "name"),
    "metadata.namespace": ("metadata", "namespace"),
    "spec.nodeName": ("spec", "nodeName"),
    "status.phase": ("status", "phase"),
    "spec.serviceAccountName": ("spec", "serviceAccountName"),
}


@dataclass(frozen=True)
class FieldRequirement:
    path: tuple[str, ...]
    negate: bool
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        current: Any = obj
        for part in self.path:
            current = current.get(part) if isinstance(current, Mapping) else None
        actual = "" if current is None else str(current)
        return (actual != self.value) if self.negate else (actual == self.value)


def parse_field_selector(text: str | None) -> tuple[FieldRequirement, ...]:
    if not text:
        return ()
    requirements = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise SelectorError(f"unable to parse field selector requirement {part.strip()!r}")
        if m.group(1) not in FIELD_PATHS:
            raise SelectorError(f"field label not supported: {m.group(1)}")
        requirements.append(FieldRequirement(FIELD_PATHS[m.group(1)], m.group(2) == "!=", m.group(3)))
    return tuple(requirements)


def fields_match(requirements: tuple[FieldRequirement, ...], obj: Mapping[str, Any]) -> bool:
    return all(r.matches(obj) for r in requirements)
