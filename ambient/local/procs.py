"""Processes the local cluster started, identified by PID *and* start time so that a reused PID is never
signalled. Every process we start is recorded here; `down` ends exactly those."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import psutil


def record(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "created": psutil.Process(pid).create_time()}))


def recorded_process(path: Path) -> psutil.Process | None:
    """The recorded process if it is still running (same PID and start time)."""
    try:
        entry = json.loads(path.read_text())
        proc = psutil.Process(entry["pid"])
        if abs(proc.create_time() - entry["created"]) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return None


def stop(path: Path, timeout: float) -> bool:
    """SIGTERM the recorded process, SIGKILL after `timeout`; True if it was running."""
    proc = recorded_process(path)
    if proc is None:
        path.unlink(missing_ok=True)
        return False
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and recorded_process(path) is not None:
        time.sleep(0.05)
    if recorded_process(path) is not None:
        with contextlib.suppress(psutil.Error):
            proc.kill()
        with contextlib.suppress(psutil.Error):
            proc.wait(5)
    path.unlink(missing_ok=True)
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
