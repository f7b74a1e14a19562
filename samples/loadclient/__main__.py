"""`python3 -m samples.loadclient`: exit 0 when every request succeeded, 1 when any failed, 2 on bad
arguments. `throughput` exits 1 when the upload failed; `sink` serves until SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

import uvloop

from samples.common import LISTEN_HOST, env_port, log, until_terminated
from samples.common import run as run_sample
from samples.loadclient import throughput
from samples.loadclient.http_load import DEFAULT_TIMEOUT_S, run_http
from samples.loadclient.pacing import Pacing
from samples.loadclient.result import LoadResult
from samples.loadclient.tcp_load import DEFAULT_SIZE, run_tcp

DEFAULT_DURATION_S = 5.0  # fortio's default run length
DEFAULT_CONCURRENCY = 8  # covers a few thousand req/s at millisecond latencies in fixed-rate mode


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a header; use Name:value")
    return name.strip(), value.strip()


def http_method(text: str) -> str:
    if not text.isascii() or not text.isalpha():
        raise argparse.ArgumentTypeError(f"{text!r} is not an HTTP method")
    return text.upper()


def http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def host_port(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    pace = common.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=positive_float, help="requests per second, on a fixed schedule")
    pace.add_argument("--max-rate", action="store_true", help="closed loop, as fast as answers come (default)")
    stop = common.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=positive_float, help=f"seconds (default {DEFAULT_DURATION_S:g})")
    stop.add_argument("--requests", type=positive_int, help="stop after this many requests")
    common.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    common.add_argument("--json", action="store_true", help="print one JSON object")

    top = argparse.ArgumentParser(prog="python3 -m samples.loadclient", description=__doc__)
    modes = top.add_subparsers(dest="mode", required=True)
    http = modes.add_parser("http", parents=[common], help="HTTP/1.1 requests over keep-alive connections")
    http.add_argument("url", type=http_url)
    http.add_argument("--concurrency", "-c", type=positive_int, default=DEFAULT_CONCURRENCY)
    http.add_argument("--header", "-H", type=header, action="append", default=[], help="Name:value")
    http.add_argument("--method", "-X", type=http_method, default="GET")
    tcp = modes.add_parser("tcp", parents=[common], help="round trips to an echo server")
    tcp.add_argument("target", type=host_port, metavar="HOST:PORT")
    tcp.add_argument("--size", type=positive_int, default=DEFAULT_SIZE, help="bytes per round trip")
    tcp.add_argument("--connections", "-c", type=positive_int, default=DEFAULT_CONCURRENCY)
    upload = modes.add_parser("throughput", help="single-stream upload to a `sink`, in MB/s up to its receipt")
    upload.add_argument("target", type=host_port, metavar="HOST:PORT")
    upload.add_argument("--duration", type=positive_float, default=throughput.DEFAULT_DURATION_S,
                        help=f"seconds of sending (default {throughput.DEFAULT_DURATION_S:g})")
    upload.add_argument("--chunk", type=positive_int, default=throughput.DEFAULT_CHUNK, help="bytes per send")
    upload.add_argument("--timeout", type=positive_float, default=throughput.DEFAULT_TIMEOUT_S,
                        help="seconds any one socket operation may block")
    upload.add_argument("--json", action="store_true", help="print one JSON object")
    sink = modes.add_parser("sink", help="the receiver for `throughput`: counts bytes, answers the count at EOF")
    sink.add_argument("--port", type=port_number, default=None,
                      help=f"port to listen on (default $PORT, else {throughput.DEFAULT_SINK_PORT})")
    return top


def port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    return int(text)


async def serve_sink(port: int | None) -> None:
    port = port or env_port(os.environ, "PORT", throughput.DEFAULT_SINK_PORT)
    server = await throughput.start_sink(LISTEN_HOST, port)
    log.info("sink listening on %s:%d", LISTEN_HOST, port)
    try:
        await until_terminated()
    finally:
        server.close()


async def run(args: argparse.Namespace) -> LoadResult:
    duration = args.duration if args.duration is not None or args.requests is not None else DEFAULT_DURATION_S
    if args.mode == "http":
        pacing = Pacing(args.rate, duration, args.requests, args.concurrency)
        return await run_http(args.url, pacing, method=args.method, headers=dict(args.header), timeout_s=args.timeout)
    host, port = args.target
    pacing = Pacing(args.rate, duration, args.requests, args.connections)
    return await run_tcp(host, port, pacing, size=args.size, timeout_s=args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.mode == "sink":
        run_sample("loadclient-sink", lambda: serve_sink(args.port))
    if args.mode == "throughput":
        host, port = args.target
        upload = throughput.measure(host, port, args.duration, chunk=args.chunk, timeout_s=args.timeout)
        print(json.dumps(upload.to_json()) if args.json else upload.render())
        return 1 if upload.error else 0
    try:
        result = uvloop.run(run(args))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result.to_json()) if args.json else result.render())
    return 1 if result.error_count else 0


if __name__ == "__main__":
    sys.exit(main())
