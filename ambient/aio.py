"""Small asyncio helpers shared by every long-running component."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any


def cancel_on_signals(*signals: signal.Signals) -> None:
    """Turn SIGTERM/SIGINT (by default) into cancellation of the calling task, so that a component's
    shutdown runs as `except asyncio.CancelledError` / `finally` in its main coroutine."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("cancel_on_signals must be called from inside a task")
    loop = asyncio.get_running_loop()
    for sig in signals or (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)


class OwnedTasks:
    """Background tasks an owner keeps: referenced until done (never a bare `create_task`), failures
    logged with the task's name, cancelled together on close."""

    def __init__(self, log: logging.Logger) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = log

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._own(task)
        return task

    def add_current(self) -> None:
        """Own the running task (e.g. a connection handler started by asyncio.start_server)."""
        task = asyncio.current_task()
        if task is not None:
            self._own(task)

    def _own(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
