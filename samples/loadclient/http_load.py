"""HTTP/1.1 load over keep-alive connections, one per worker."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from samples.loadclient.pacing import Pacing, drive
from samples.loadclient.result import LoadResult

DEFAULT_TIMEOUT_S = 5.0


class HttpProbe:
    def __init__(self, session: aiohttp.ClientSession, method: str, url: str, headers: Mapping[str, str]) -> None:
        self._session = session
        self._method = method
        self._url = url
        self._headers = headers

    async def open(self) -> None:
        """Connections open on first use and stay in the session's pool."""

    async def send(self) -> str | None:
        try:
            async with self._session.request(
                self._method, self._url, headers=self._headers, allow_redirects=False
            ) as response:
                await response.read()
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError as exc:
            return type(exc).__name__
        return str(response.status) if response.status >= 400 else None

    async def close(self) -> None:
        """The session closes the pooled connections."""


async def run_http(
    url: str,
    pacing: Pacing,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> LoadResult:
    """Send `method url` as `pacing` says; a response is an error when it is 4xx/5xx or does not arrive."""
    connector = aiohttp.TCPConnector(limit=pacing.concurrency)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    ) as session:
        return await drive(pacing, lambda: HttpProbe(session, method, url, headers or {}), "http", url)
