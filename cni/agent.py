"""`ambient-cni-agent` entry point (built by a later issue)."""

from __future__ import annotations

import sys

from ambient.stub import not_implemented


def main() -> None:
    sys.exit(not_implemented("ambient-cni-agent"))
