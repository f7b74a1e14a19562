"""Run Python code inside another network namespace without touching the calling thread.

Linux network namespaces are per thread, so `in_netns` enters the namespace on a fresh thread, runs the
function there and returns its result (or re-raises its exception). Sockets created by the function stay in
that namespace for their whole life and may be used from any thread afterwards. Used by the rules package
(netlink via pyroute2) and by tests; ztunnel needs the same to open its per-pod listeners.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
RUN_NETNS_DIR = "/run/netns"


class NetnsError(Exception):
    """The namespace could not be opened or entered."""

    reason = "netns-unavailable"


def netns_path(netns: str) -> str:
    """`/run/netns/X` and `/proc/<pid>/ns/net` stay as they are; a bare name `X` means `/run/netns/X`."""
    return netns if "/" in netns else f"{RUN_NETNS_DIR}/{netns}"


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn()` on a dedicated thread inside network namespace `netns` (path or name); return its result."""
    path = netns_path(netns)
    outcome: dict[str, Any] = {}

    def enter_and_run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            outcome["error"] = NetnsError(f"cannot open network namespace {path}: {e.strerror}")
            return
        try:
            _setns(fd)
        except OSError as e:
            outcome["error"] = NetnsError(f"cannot enter network namespace {path}: {e.strerror} (needs root)")
            return
        finally:
            os.close(fd)
        try:
            outcome["result"] = fn()
        except BaseException as e:  # handed to the caller's thread unchanged
            outcome["error"] = e

    thread = threading.Thread(target=enter_and_run, name=f"netns:{path}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    result: T = outcome["result"]
    return result


class NetnsExecutor:
    """One thread parked inside a network namespace, for the many small jobs that must run there
    (creating listeners and outbound sockets for a pod). Cheaper than a thread per job: the namespace is
    entered once. Given an fd (as ZDS delivers it), which it duplicates and owns."""

    def __init__(self, netns_fd: int, name: str = "netns") -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._fd = os.dup(netns_fd)
        self._entered = threading.Event()
        self._error: OSError | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._enter)

    def _enter(self) -> None:
        try:
            _setns(self._fd)
        except OSError as e:
            self._error = e

    async def call(self, fn: Callable[[], T]) -> T:
        import asyncio

        return await asyncio.wrap_future(self._pool.submit(self._guarded, fn))

    def _guarded(self, fn: Callable[[], T]) -> T:
        if self._error is not None:
            raise NetnsError(f"cannot enter the pod network namespace: {self._error.strerror}")
        return fn()

    @property
    def inode(self) -> tuple[int, int]:
        st = os.fstat(self._fd)
        return st.st_ino, st.st_dev

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._fd)
