"""Runs the sample programs as real subprocesses on 127.0.0.1 for the integration tests.

Readiness is polled (GET /health, or a TCP connect) against a deadline; every program started here is
stopped, SIGTERM first, when its owner's fixture is torn down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
READY_DEADLINE_S = 20.0  # generous: a loaded CI box starts ten Pythons at once
STOP_DEADLINE_S = 5.0
POLL_INTERVAL_S = 0.05


def free_port() -> int:
    """A port nothing listens on right now; also what tests use as a dead upstream."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Program:
    name: str
    port: int
    kind: str  # "http" (ready when GET /health is 200) or "tcp" (ready when it accepts)
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_ready(self) -> bool:
        try:
            if self.kind == "tcp":
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False


class Programs:
    """Starts sample programs and owns them until `stop_all`."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._running: list[Program] = []

    def start(self, module: str, name: str, *, kind: str = "http", env: dict[str, str] | None = None) -> Program:
        """Start `python -m module` with PORT set to a free port; does not wait for it to be ready."""
        port = free_port()
        log_path = self._log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module],
                cwd=REPO_ROOT,
                env={**os.environ, "PORT": str(port), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        program = Program(name, port, kind, process, log_path)
        self._running.append(program)
        return program

    def wait_ready(self, *programs: Program) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        pending = list(programs)
        while pending:
            for program in list(pending):
                if program.process.poll() is not None:
                    raise AssertionError(f"{program.name} exited {program.process.returncode}:\n{program.log()}")
                if program.is_ready():
                    pending.remove(program)
            if pending and time.monotonic() > deadline:
                names = ", ".join(program.name for program in pending)
                raise AssertionError(f"not ready after {READY_DEADLINE_S}s: {names}")
            if pending:
                time.sleep(POLL_INTERVAL_S)

    def stop(self, program: Program) -> int:
        """SIGTERM, then SIGKILL after STOP_DEADLINE_S; the exit code."""
        if program in self._running:
            self._running.remove(program)
        if program.process.poll() is None:
            program.process.send_signal(signal.SIGTERM)
            try:
                return program.process.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                program.process.kill()
        return program.process.wait()

    def stop_all(self) -> None:
        for program in list(self._running):
            self.stop(program)
