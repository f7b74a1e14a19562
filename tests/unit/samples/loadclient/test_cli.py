from __future__ import annotations

import argparse

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from samples.loadclient.__main__ import header, host_port, main, parser


def test_host_port_accepts_names_and_bracketed_ipv6() -> None:
    assert host_port("tcp-echo:9000") == ("tcp-echo", 9000)
    assert host_port("[::1]:9000") == ("::1", 9000)


def test_header_splits_at_the_first_colon() -> None:
    assert header("X-Time: 12:00") == ("X-Time", "12:00")


@given(st.text())
@example("h:²")  # a digit to str.isdigit, not to int()
def test_argument_parsers_fail_only_with_argument_errors(text: str) -> None:
    for parse in (header, host_port):
        try:
            parse(text)
        except argparse.ArgumentTypeError:
            pass


def test_defaults() -> None:
    args = parser().parse_args(["http", "http://productpage:9080/productpage"])

    assert args.rate is None
    assert args.concurrency == 8
    assert args.method == "GET"


def test_rate_and_max_rate_are_exclusive() -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["tcp", "h:1", "--rate", "5", "--max-rate"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["http"],
        ["http", "ftp://example.com/"],
        ["http", "http://127.0.0.1:1/", "--rate", "0"],
        ["http", "http://127.0.0.1:1/", "--rate", "nan"],
        ["http", "http://127.0.0.1:1/", "--duration", "1", "--requests", "3"],
        ["http", "http://127.0.0.1:1/", "--header", "no-colon"],
        ["http", "http://127.0.0.1:1/", "--method", "GET /x"],
        ["tcp", "127.0.0.1"],
        ["tcp", "127.0.0.1:99999"],
        ["tcp", "127.0.0.1:9000", "--size", "0"],
    ],
)
def test_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)

    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
