"""Log levels with Istio's names, the handler's formats, and a writer that drops (and says so) instead of
blocking when its stream cannot keep up."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from ambient.telemetry import logs


@pytest.fixture(autouse=True)
def restore_levels() -> Iterator[None]:
    names = ["", "access", "ztunnel.pod"]
    before = {name: logging.getLogger(name).level for name in names}
    overrides = dict(logs._overrides)
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)
    logs._overrides.clear()
    logs._overrides.update(overrides)


@pytest.mark.parametrize(("spec", "default", "scopes"), [
    ("debug", logging.DEBUG, {}),
    ("warn", logging.WARNING, {}),
    ("info,access=off", logging.INFO, {"access": logs.OFF}),
    ("access:error, ztunnel.pod=trace", None, {"access": logging.ERROR, "ztunnel.pod": logs.TRACE}),
])
def test_parse_level_reads_istio_level_names(spec: str, default: int | None, scopes: dict[str, int]) -> None:
    assert logs.parse_level(spec) == (default, scopes)


@pytest.mark.parametrize("spec", ["verbose", "info,=debug", "", "access=loud"])
def test_parse_level_refuses_what_it_cannot_apply(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid log level"):
        logs.parse_level(spec)


def test_set_level_changes_loggers_and_current_level_reports_it() -> None:
    logs.set_level("debug,access=off")
    assert logging.getLogger().level == logging.DEBUG
    assert not logging.getLogger("access").isEnabledFor(logging.ERROR)
    assert logs.current_level() == "debug,access=off"
    with pytest.raises(ValueError):
        logs.set_level("info,access=nonsense")
    assert logs.current_level() == "debug,access=off"  # nothing applied from a bad spec


def test_handler_writes_records_with_scope_and_fields() -> None:
    buffer = io.StringIO()
    writer = logs.LineWriter(buffer)
    logger = logging.getLogger("ztunnel.pod")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    text, js = logs.IstioHandler("text", writer), logs.IstioHandler("json", writer)
    logger.addHandler(text)
    logger.addHandler(js)
    try:
        logger.warning("pod %s added", "default/sleep", extra={"fields": {"uid": "u-1", "ips": 2}})
    finally:
        logger.removeHandler(text)
        logger.removeHandler(js)
        logger.propagate = True
    writer.close()
    text_line, json_line = buffer.getvalue().splitlines()
    assert text_line.split("\t")[1:] == ["warn", "ztunnel.pod", "pod default/sleep added", 'uid="u-1" ips=2']
    assert json.loads(json_line) == {**json.loads(json_line), "level": "warn", "scope": "ztunnel.pod",
                                     "message": "pod default/sleep added", "uid": "u-1", "ips": 2}


class BlockingStream(io.StringIO):
    """A stream whose first write blocks until released (a stalled stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.release.wait(5)
        return super().write(s)


def test_writer_never_blocks_and_reports_dropped_lines() -> None:
    stream = BlockingStream()
    writer = logs.LineWriter(stream, max_queued=2)
    writer.write("first\n")
    assert stream.entered.wait(5)  # the writer thread is stuck in the stream
    for i in range(4):  # two fit in the queue, two are dropped; none of these calls may block
        writer.write(f"line {i}\n")
    stream.release.set()
    writer.close()
    assert stream.getvalue().splitlines() == [
        "first", "2 log lines dropped: the log stream could not keep up", "line 0", "line 1"]
