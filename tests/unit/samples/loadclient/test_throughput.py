from __future__ import annotations

from typing import Any

import pytest

from samples.loadclient.__main__ import main, parser
from samples.loadclient.throughput import DEFAULT_CHUNK, DEFAULT_DURATION_S, ThroughputResult, _Sink, parse_count


def test_the_sink_answer_is_a_decimal_count_on_one_line() -> None:
    assert parse_count(b"1048576\n") == 1048576


@pytest.mark.parametrize("answer", [b"", b"12", b"HTTP/1.1 400 Bad Request\r\n", b"-1\n", b"1e6\n"])
def test_anything_else_is_not_a_sink_and_says_so(answer: bytes) -> None:
    with pytest.raises(ValueError, match=r"samples\.loadclient sink"):
        parse_count(answer)


def test_rate_is_what_the_sink_received_over_the_elapsed_time() -> None:
    result = ThroughputResult("10.0.0.1:9100", sent=300_000_000, received=300_000_000, elapsed_s=2.0)
    assert result.mb_per_s == 150.0
    assert result.to_json() == {"mode": "throughput", "target": "10.0.0.1:9100", "sent": 300_000_000,
                                "received": 300_000_000, "elapsed_s": 2.0, "mb_per_s": 150.0, "error": None}
    assert result.render() == "throughput 10.0.0.1:9100: 300.0 MB in 2.00 s = 150.0 MB/s"


def test_a_failed_upload_reports_its_error_and_no_rate() -> None:
    result = ThroughputResult("h:1", sent=0, received=0, elapsed_s=0.0, error="ConnectionRefusedError")
    assert result.mb_per_s == 0.0
    assert result.render().endswith("error: ConnectionRefusedError")


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def test_the_sink_counts_and_answers_at_eof_then_closes() -> None:
    sink = _Sink()
    transport: Any = FakeTransport()
    sink.connection_made(transport)
    for size in (1, 65536, 7):
        assert len(sink.get_buffer(-1)) >= size
        sink.buffer_updated(size)
    assert sink.eof_received() is False  # asyncio closes the transport after the answer
    assert transport.written == b"65544\n"


def test_throughput_defaults() -> None:
    args = parser().parse_args(["throughput", "tcp-echo:9100"])
    assert (args.target, args.duration, args.chunk, args.json) == (("tcp-echo", 9100), DEFAULT_DURATION_S,
                                                                    DEFAULT_CHUNK, False)
    assert parser().parse_args(["sink"]).port is None  # $PORT, else 9100


@pytest.mark.parametrize("args", [["throughput"], ["throughput", "h"], ["throughput", "h:1", "--duration", "0"],
                                  ["throughput", "h:1", "--chunk", "0"], ["sink", "--port", "0"],
                                  ["sink", "--port", "http"]])
def test_bad_throughput_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
