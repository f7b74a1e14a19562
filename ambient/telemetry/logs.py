"""Log lines in ztunnel's two formats, written without ever blocking the event loop.

text: `<RFC 3339 time, µs>\\t<level>\\t<scope>\\t<message>\\t<k=v k=v ...>` — strings quoted, numbers and
      `Bare` values (addresses) not, like ztunnel's tracing output;
json: `{"level":..,"time":..,"scope":..,"message":..,<fields>}` (`--log-format json`).

`scope` is the logger name (`access` for access logs). Lines go through a bounded queue to one writer
thread per stream: a slow or blocked stderr costs the loop a `put_nowait`, and when the queue is full
lines are dropped, counted, and the next written line says how many were lost.

Levels use Istio's names (`trace|debug|info|warn|error|off`); `set_level("debug")` or
`set_level("info,access=off")` is what the admin port's `/logging?level=` calls.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import queue
import re
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TextIO

TRACE = 5  # below logging.DEBUG, for Istio's `trace`
OFF = logging.CRITICAL + 10  # above every level we emit
LEVELS: dict[str, int] = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
                          "error": logging.ERROR, "off": OFF}
MAX_QUEUED_LINES = 10_000  # about 5 MB of access log at ~500 bytes a line; beyond that, drop and count

FieldValue = str | int | float | bool | None
Fields = Mapping[str, FieldValue]
LineFormat = Callable[[float, str, str, str, Fields], str]


class Bare(str):
    """A field value the text format writes without quotes (addresses, as tracing's `%` fields)."""

    __slots__ = ()


def level_name(levelno: int) -> str:
    """Istio's name for a logging level number (CRITICAL reads as `error`)."""
    if levelno <= TRACE:
        return "trace"
    if levelno <= logging.DEBUG:
        return "debug"
    if levelno <= logging.INFO:
        return "info"
    if levelno <= logging.WARNING:
        return "warn"
    if levelno < OFF:
        return "error"
    return "off"


def timestamp(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Strings json.dumps would write unchanged between its quotes: printable ASCII except `"` and `\\`.
_PLAIN = re.compile(r'[ !#-\[\]-~]*')


def _text_value(value: FieldValue) -> str:
    if isinstance(value, Bare):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and _PLAIN.fullmatch(value):  # nothing to escape: skip json.dumps (hot path)
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


def format_text(when: float, level: str, scope: str, message: str, fields: Fields) -> str:
    head = f"{timestamp(when)}\t{level}\t{scope}\t{message}"
    present = [f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None]
    return f"{head}\t{' '.join(present)}\n" if present else head + "\n"


def format_json(when: float, level: str, scope: str, message: str, fields: Fields) -> str:
    record: dict[str, FieldValue] = {"level": level, "time": timestamp(when), "scope": scope, "message": message}
    record.update((k, v) for k, v in fields.items() if v is not None)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


FORMATS: dict[str, LineFormat] = {"text": format_text, "json": format_json}


def line_format(log_format: str) -> LineFormat:
    try:
        return FORMATS[log_format]
    except KeyError:
        raise ValueError(f"unknown log format {log_format!r}: use one of {', '.join(FORMATS)}") from None


class LineWriter:
    """Writes whole lines to a stream from a background thread; `write` never blocks."""

    _STOP = object()

    def __init__(self, stream: TextIO, max_queued: int = MAX_QUEUED_LINES) -> None:
        self._stream = stream
        self._queue: queue.Queue[object] = queue.Queue(max_queued)
        self._dropped = 0
        self._lock = threading.Lock()  # guards _dropped (the only state both threads change)
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting up to `timeout` seconds), then stop the thread."""
        with contextlib.suppress(queue.Full):
            self._queue.put(self._STOP, timeout=timeout)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            try:
                if dropped:
                    self._stream.write(f"{dropped} log lines dropped: the log stream could not keep up\n")
                if line is not self._STOP:
                    self._stream.write(str(line))
                if line is self._STOP or self._queue.empty():
                    self._stream.flush()
            except (OSError, ValueError):  # closed or broken stream: nothing useful left to do with the line
                pass
            if line is self._STOP:
                return


_writers: dict[TextIO, LineWriter] = {}  # keeps each stream referenced, so a writer never outlives its stream
_writers_lock = threading.Lock()


def writer_for(stream: TextIO | None = None) -> LineWriter:
    """The one writer of `stream` (default stderr), shared so that lines from several sources never mix."""
    stream = stream if stream is not None else sys.stderr
    with _writers_lock:
        writer = _writers.get(stream)
        if writer is None:
            writer = _writers[stream] = LineWriter(stream)
        return writer


class IstioHandler(logging.Handler):
    """A logging handler writing records in the text or JSON format. Structured fields come from
    `extra={"fields": {...}}`."""

    def __init__(self, log_format: str = "text", writer: LineWriter | None = None) -> None:
        super().__init__()
        self._format = line_format(log_format)
        self._writer = writer or writer_for()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
            fields = getattr(record, "fields", None) or {}
            self._writer.write(self._format(record.created, level_name(record.levelno), record.name, message, fields))
        except Exception:
            self.handleError(record)


def setup_logging(log_format: str = "text", level: str = "info", stream: TextIO | None = None) -> IstioHandler:
    """Route every logger through one `IstioHandler` on the root logger (replacing earlier handlers)."""
    handler = IstioHandler(log_format, writer_for(stream))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    return handler


_overrides: dict[str, int] = {}  # scope → level set through set_level, for current_level()


def parse_level(spec: str) -> tuple[int | None, dict[str, int]]:
    """`info` or `info,access=off,ztunnel.pod:debug` → (default level or None, per-scope levels)."""
    default: int | None = None
    scopes: dict[str, int] = {}
    for clause in (c.strip() for c in spec.split(",")):
        scope, sep, name = clause.replace(":", "=").rpartition("=")
        if name not in LEVELS or (sep and not scope):
            raise ValueError(f"invalid log level {clause!r}: use one of {'|'.join(LEVELS)}, optionally as "
                             "<scope>=<level> (for example access=off)")
        if sep:
            scopes[scope] = LEVELS[name]
        else:
            default = LEVELS[name]
    return default, scopes


def set_level(spec: str) -> None:
    """Apply `parse_level(spec)`; nothing changes when any clause is invalid (ValueError)."""
    default, scopes = parse_level(spec)
    if default is not None:
        logging.getLogger().setLevel(default)
    for scope, level in scopes.items():
        logging.getLogger(scope).setLevel(level)
        _overrides[scope] = level


def current_level() -> str:
    """`info`, or `info,access=off` when scopes were set apart."""
    parts = [level_name(logging.getLogger().getEffectiveLevel())]
    parts += [f"{scope}={level_name(level)}" for scope, level in sorted(_overrides.items())]
    return ",".join(parts)
