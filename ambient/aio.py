"""Small asyncio helpers shared by every long-running component."""

from __future__ import annotations

import asyncio
import signal


def cancel_on_signals(*signals: signal.Signals) -> None:
    """Turn SIGTERM/SIGINT (by default) into cancellation of the calling task, so that a component's
    shutdown runs as `except asyncio.CancelledError` / `finally` in its main coroutine."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("cancel_on_signals must be called from inside a task")
    loop = asyncio.get_running_loop()
    for sig in signals or (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
