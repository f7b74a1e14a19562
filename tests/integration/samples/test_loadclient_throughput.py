"""`throughput` against a real `sink` on 127.0.0.1: every byte counted, the CLI's JSON, failures as
errors (exit 1) rather than tracebacks, and the sink as a program that stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from samples.loadclient.throughput import measure, start_sink

from .programs import REPO_ROOT, Program, Programs, free_port


@pytest.fixture(scope="module")
def sink_port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start_sink("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def loadclient(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "samples.loadclient", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=30, check=False)


def test_every_byte_sent_is_counted_by_the_sink(sink_port: int) -> None:
    result = measure("127.0.0.1", sink_port, 0.2, chunk=64 * 1024)
    assert result.error is None
    assert result.received == result.sent > 0
    assert result.elapsed_s >= 0.2 and result.mb_per_s > 0


def test_cli_prints_json_and_exits_0(sink_port: int) -> None:
    run = loadclient("throughput", f"127.0.0.1:{sink_port}", "--duration", "0.2", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["error"] is None and result["received"] == result["sent"] > 0


def test_nothing_listening_is_an_error_not_a_traceback() -> None:
    run = loadclient("throughput", f"127.0.0.1:{free_port()}", "--duration", "0.2")
    assert run.returncode == 1
    assert "error: ConnectionRefusedError" in run.stdout and "Traceback" not in run.stderr


def test_a_server_that_is_not_a_sink_is_named_as_the_problem() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer_http() -> None:
            conn, _ = server.accept()
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        threading.Thread(target=answer_http, daemon=True).start()
        result = measure("127.0.0.1", server.getsockname()[1], 0.05, timeout_s=5)
    assert result.error is not None and "not a byte count" in result.error


def test_sink_program_listens_on_its_port_and_stops_on_sigterm(programs: Programs,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    port = free_port()
    log_path = tmp_path_factory.mktemp("sink") / "sink.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "samples.loadclient", "sink", "--port", str(port)],
                                   cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    program = Program("sink", port, "tcp", process, log_path)
    try:
        programs.wait_ready(program)
        assert measure("127.0.0.1", port, 0.1).error is None
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, program.log()
