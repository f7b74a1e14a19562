"""What integration tests against a real API server on loopback share: the server itself
(`local_apiserver`), a kubeconfig pointing at it, `ambientctl` run in a worker thread (the CLI runs its own
event loop) and an async `eventually` (poll a condition with a deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from click.testing import CliRunner, Result

from ambient.local.apiserver import ApiServer

T = TypeVar("T")

HOST = "127.0.0.1"
POLL = 0.02  # seconds between two looks at a condition


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def local_apiserver(token: str, host: str = HOST) -> AsyncIterator[str]:
    """`ambient.local.apiserver.ApiServer` (in memory, bearer `token`) on a free port → its URL."""
    server = ApiServer(None, token)
    port = free_port(host)
    await server.start([host], port)
    try:
        yield f"http://{host}:{port}"
    finally:
        await server.close()


def write_kubeconfig(path: Path, server: str, token: str, namespace: str | None = None) -> Path:
    """A kubeconfig with one context: `server`, bearer `token`, default namespace `namespace` if given."""
    context = {"cluster": "local", "user": "admin", **({"namespace": namespace} if namespace else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "contexts": [{"name": "local", "context": context}],
        "users": [{"name": "admin", "user": {"token": token}}],
    }))
    return path


async def ambientctl(kubeconfig: Path, *args: str, timeout: float) -> Result:
    """One `ambientctl --kubeconfig KUBECONFIG ARGS...` run in a worker thread. Fails the test if the CLI
    ended in an uncaught exception (a traceback for the user) rather than through its own exit path."""
    from ambient.cli.main import cli

    result = await asyncio.wait_for(asyncio.to_thread(
        CliRunner().invoke, cli, ["--kubeconfig", str(kubeconfig), *args], prog_name="ambientctl"), timeout)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"ambientctl raised {result.exception!r}:\n{result.output}") from result.exception
    return result


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float,
                     retry_on: tuple[type[BaseException], ...] = ()) -> T:
    """Await `probe` until it returns something truthy (→ that) or `timeout` seconds pass (→ AssertionError
    naming `what` and the last answer). Exceptions in `retry_on` (e.g. not listening yet) count as no answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while True:
        try:
            result = await probe()
        except retry_on as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {last!r}")
        await asyncio.sleep(POLL)


def contains(live: Any, wanted: Any) -> bool:
    """Everything `wanted` says is in `live` (a server may add defaults and metadata): how a test checks that
    an object round-tripped through an API server."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(live) == len(wanted) and all(map(contains, live, wanted))
    return bool(live == wanted)
