"""Entry points of components that later issues build: they say so and exit non-zero."""

from __future__ import annotations

import sys


def not_implemented(component: str) -> int:
    print(f"{component}: not implemented yet", file=sys.stderr)
    return 1
