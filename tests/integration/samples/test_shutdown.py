"""Every sample server exits 0 on SIGTERM, and expected errors never print a traceback."""

from __future__ import annotations

import subprocess
import sys

from .programs import REPO_ROOT, Programs

SERVERS = {
    "samples.bookinfo.details": "http",
    "samples.bookinfo.ratings": "http",
    "samples.bookinfo.reviews": "http",
    "samples.bookinfo.productpage": "http",
    "samples.httpbin.server": "http",
    "samples.tcp_echo.server": "tcp",
}


def test_servers_exit_cleanly_on_sigterm(programs: Programs) -> None:
    started = [
        programs.start(module, module.removeprefix("samples.").replace(".", "-"), kind=kind)
        for module, kind in SERVERS.items()
    ]
    programs.wait_ready(*started)

    for program in started:
        assert programs.stop(program) == 0, program.log()
        assert "shutting down" in program.log()
        assert "Traceback" not in program.log()


def test_bad_configuration_exits_2_with_one_line() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "samples.bookinfo.reviews"],
        cwd=REPO_ROOT,
        env={"VERSION": "v9", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert run.returncode == 2
    assert "VERSION='v9'" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


def test_port_in_use_exits_1_without_traceback(programs: Programs) -> None:
    first = programs.start("samples.httpbin.server", "httpbin-first")
    programs.wait_ready(first)

    run = subprocess.run(
        [sys.executable, "-m", "samples.httpbin.server"],
        cwd=REPO_ROOT,
        env={"PORT": str(first.port), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert run.returncode == 1
    assert "cannot start" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
