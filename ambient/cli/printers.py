"""Table output for `ambientctl get`, column for column like kubectl's for the kinds users look at."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]
Column = tuple[str, Callable[[Obj], str]]


def age(obj: Obj, field: str = "creationTimestamp") -> str:
    stamp = obj.get("metadata", {}).get(field) if field == "creationTimestamp" else obj.get(field)
    if not stamp:
        return "<unknown>"
    seconds = int((datetime.now(UTC) - datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC))
                  .total_seconds())
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600 * 3:
        return f"{seconds // 60}m"
    if seconds < 86400 * 2:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def pod_status(pod: Obj) -> str:
    """kubectl's STATUS column: Terminating, a container's waiting/terminated reason, or the phase."""
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    status = pod.get("status", {})
    reason = status.get("phase", "Pending")
    for c in status.get("containerStatuses") or []:
        state = c.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state and status.get("phase") != "Running":
            reason = state["terminated"].get("reason") or reason
    return str(reason)


def _ready_count(pod: Obj) -> str:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    total = len(pod.get("spec", {}).get("containers") or [])
    return f"{sum(1 for c in statuses if c.get('ready'))}/{total}"


def _ports(svc: Obj) -> str:
    ports = svc.get("spec", {}).get("ports") or []
    return ",".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _node_status(node: Obj) -> str:
    ready = next((c for c in node.get("status", {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    return "Ready" if ready and ready.get("status") == "True" else "NotReady"


def _internal_ip(node: Obj) -> str:
    return next((a["address"] for a in node.get("status", {}).get("addresses") or []
                 if a.get("type") == "InternalIP"), "<none>")


def _name(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


def _selector(obj: Obj) -> str:
    selector = obj.get("spec", {}).get("selector") or {}
    labels = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    return ",".join(f"{k}={v}" for k, v in labels.items() if isinstance(v, str)) or "<none>"


def _s(value: Any) -> str:
    return "<none>" if value in (None, "", []) else str(value)


COLUMNS: dict[str, tuple[list[Column], list[Column]]] = {
    # kind: (columns, extra columns for -o wide)
    "Pod": ([("NAME", _name), ("READY", _ready_count), ("STATUS", pod_status),
             ("RESTARTS", lambda p: str(sum(c.get("restartCount", 0)
                                            for c in p.get("status", {}).get("containerStatuses") or []))),
             ("AGE", age)],
            [("IP", lambda p: _s(p.get("status", {}).get("podIP"))),
             ("NODE", lambda p: _s(p.get("spec", {}).get("nodeName")))]),
    "Service": ([("NAME", _name), ("TYPE", lambda s: s["spec"].get("type", "ClusterIP")),
                 ("CLUSTER-IP", lambda s: _s(s["spec"].get("clusterIP"))), ("EXTERNAL-IP", lambda s: "<none>"),
                 ("PORT(S)", _ports), ("AGE", age)],
                [("SELECTOR", _selector)]),
    "Deployment": ([("NAME", _name),
                    ("READY", lambda d: f"{d.get('status', {}).get('readyReplicas', 0)}/"
                                        f"{d['spec'].get('replicas', 1)}"),
                    ("UP-TO-DATE", lambda d: str(d.get("status", {}).get("updatedReplicas", 0))),
                    ("AVAILABLE", lambda d: str(d.get("status", {}).get("availableReplicas", 0))), ("AGE", age)],
                   [("CONTAINERS", lambda d: ",".join(c["name"] for c in d["spec"]["template"]["spec"]["containers"])),
                    ("SELECTOR", _selector)]),
    "ReplicaSet": ([("NAME", _name), ("DESIRED", lambda r: str(r["spec"].get("replicas", 1))),
                    ("CURRENT", lambda r: str(r.get("status", {}).get("replicas", 0))),
                    ("READY", lambda r: str(r.get("status", {}).get("readyReplicas", 0))), ("AGE", age)],
                   [("SELECTOR", _selector)]),
    "Node": ([("NAME", _name), ("STATUS", _node_status), ("ROLES", lambda n: "<none>"), ("AGE", age),
              ("VERSION", lambda n: n.get("status", {}).get("nodeInfo", {}).get("kubeletVersion", ""))],
             [("INTERNAL-IP", _internal_ip), ("POD-CIDR", lambda n: _s(n.get("spec", {}).get("podCIDR")))]),
    "Namespace": ([("NAME", _name), ("STATUS", lambda n: n.get("status", {}).get("phase", "Active")), ("AGE", age)],
                  [("LABELS", lambda n: ",".join(f"{k}={v}" for k, v in (n["metadata"].get("labels") or {}).items()))]),
    "EndpointSlice": ([("NAME", _name), ("ADDRESSTYPE", lambda s: s.get("addressType", "")),
                       ("PORTS", lambda s: ",".join(str(p.get("port")) for p in s.get("ports") or []) or "<unset>"),
                       ("ENDPOINTS", lambda s: ",".join(a for e in s.get("endpoints") or []
                                                        for a in e.get("addresses", [])) or "<unset>"),
                       ("AGE", age)], []),
    "ServiceAccount": ([("NAME", _name), ("SECRETS", lambda s: str(len(s.get("secrets") or []))), ("AGE", age)], []),
    "Event": ([("LAST SEEN", lambda e: age(e, "lastTimestamp")), ("TYPE", lambda e: e.get("type", "")),
               ("REASON", lambda e: e.get("reason", "")),
               ("OBJECT", lambda e: f"{e['involvedObject'].get('kind', '').lower()}/{e['involvedObject'].get('name')}"),
               ("MESSAGE", lambda e: e.get("message", ""))], []),
}
DEFAULT_COLUMNS: tuple[list[Column], list[Column]] = ([("NAME", _name), ("AGE", age)], [])


def table(items: list[Obj], kind: str, *, wide: bool, with_namespace: bool, show_kind: str = "") -> str:
    columns, extra = COLUMNS.get(kind, DEFAULT_COLUMNS)
    columns = list(columns) + (list(extra) if wide else [])
    if show_kind:
        columns[0] = ("NAME", lambda o: f"{show_kind}/{o['metadata']['name']}")
    if with_namespace:
        columns.insert(0, ("NAMESPACE", lambda o: o["metadata"].get("namespace", "")))
    rows = [[header for header, _ in columns]] + [[fn(o) for _, fn in columns] for o in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)
