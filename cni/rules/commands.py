"""Running the rule tools (iptables-restore, nft, ipset) in the node netns or, through nsenter, in a pod netns.

The one place that spawns processes for the rules package: every failure becomes a `RuleError` that names
the command line and what the tool printed on stderr.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence

from ambient.netns import netns_path
from cni.rules.errors import BACKEND_UNAVAILABLE, COMMAND_FAILED, NETNS_MISSING, TOOL_MISSING, RuleError

log = logging.getLogger("cni.rules")

COMMAND_TIMEOUT = 30.0  # seconds; iptables-restore waits at most XTABLES_WAIT for the xtables lock
XTABLES_WAIT = "--wait=5"  # legacy iptables-restore takes a global lock that other agents may hold

IPTABLES = "iptables"
NFTABLES = "nftables"
BACKENDS = (IPTABLES, NFTABLES)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(argv: Sequence[str], *, netns: str | None = None, stdin: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `argv` (inside `netns` via `nsenter --net=` when given); raise `RuleError` when it fails and `check`."""
    if not have(argv[0]):
        raise RuleError(TOOL_MISSING, f"{argv[0]} not found on PATH; install the iptables/nftables/ipset package")
    full = list(argv)
    if netns is not None:
        path = netns_path(netns)
        if not os.path.exists(path):
            raise RuleError(NETNS_MISSING, f"network namespace {path} does not exist (pod gone?)")
        full = ["nsenter", f"--net={path}", "--", *argv]
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuleError(COMMAND_FAILED, f"{' '.join(full)} did not finish within {COMMAND_TIMEOUT:.0f}s") from e
    except OSError as e:
        raise RuleError(TOOL_MISSING, f"cannot run {' '.join(full)}: {e.strerror}") from e
    if check and proc.returncode != 0:
        raise RuleError(COMMAND_FAILED, f"{' '.join(full)} failed (exit {proc.returncode}): "
                                        f"{proc.stderr.strip() or proc.stdout.strip() or 'no output'}")
    log.debug("ran %s in %s", " ".join(argv), netns or "node netns")
    return proc


def iptables_tool(family: str, what: str) -> str:
    """`iptables_tool("ipv6", "save")` → `ip6tables-save`."""
    return f"{'ip6tables' if family == 'ipv6' else 'iptables'}-{what}"


def resolve_backend(backend: str) -> str:
    """`auto` picks iptables when `iptables-save` runs here (the same check upstream makes), else nftables."""
    if backend in BACKENDS:
        return backend
    if backend != "auto":
        raise RuleError(BACKEND_UNAVAILABLE, f"unknown rules backend {backend!r}; use auto, iptables or nftables")
    if have("iptables-restore") and have("iptables-save"):
        try:
            run(["iptables-save"])
            return IPTABLES
        except RuleError as e:
            log.info("iptables does not work here (%s); trying nftables", e.message)
    if have("nft"):
        try:
            run(["nft", "list", "tables"])
            return NFTABLES
        except RuleError as e:
            raise RuleError(BACKEND_UNAVAILABLE, f"neither iptables nor nftables works here: {e.message}") from e
    raise RuleError(BACKEND_UNAVAILABLE, "neither iptables-restore nor nft is installed; install iptables or nftables")
