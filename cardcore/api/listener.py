"""The HTTP listener of every cardcore process (`serve`, `ledger`, the gateway's metrics): an
aiohttp application behind bounds on slow and idle clients, which aiohttp does not have
(ADR 0010).

- A request's head (request line and headers) arrives whole within `HTTP_HEADERS_READ_S` of
  its first byte, a new connection's first one within that of the connection: else the
  connection is aborted, nothing written (no request was read to answer).
- Between requests a connection idles at most `HTTP_KEEPALIVE_IDLE_S` (aiohttp's
  `keepalive_timeout`, 3630 s by its default).
- A body: `edge.read_json` reads it within `HTTP_BODY_READ_S` (408 `request_timeout`); one no
  handler reads is read and dropped for `HTTP_BODY_LINGER_S` (aiohttp's `lingering_time`).
- At most `HTTP_CONNECTIONS_MAX` connections at once: one more is aborted as it is accepted.

Only public aiohttp is used: the runner's `server` is the protocol factory of aiohttp's
low-level server, which `_Connection` wraps to see each connection open, its bytes arrive and
it close; a middleware, put first in the application's, says when a request's head was read
whole. Every `HTTP_WATCHDOG_MS` one watchdog aborts the connections past their head deadline
(so it holds to within that period), as the terminal gateway does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from cardcore import limits

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpListener:
    """One application served on one address; `start`, then `close` once."""

    def __init__(self, app: web.Application) -> None:
        app.middlewares.insert(0, self._request_began)
        self.runner = web.AppRunner(
            app,
            access_log=None,  # a path may hold a bearer coupon code (docs/operations.md)
            shutdown_timeout=limits.SHUTDOWN_GRACE_S,
            keepalive_timeout=limits.HTTP_KEEPALIVE_IDLE_S,
            lingering_time=limits.HTTP_BODY_LINGER_S,
        )
        self._connections: dict[asyncio.BaseTransport, _Connection] = {}
        self._server: asyncio.Server | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> None:
        """Start the application (its `cleanup_ctx`), then listen."""
        await self.runner.setup()
        server, connections = self.runner.server, self._connections
        assert server is not None  # set up
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _Connection(connections, server), host, port, reuse_address=True
            )
        except BaseException:
            await self.runner.cleanup()
            raise
        self._watchdog = asyncio.create_task(self._watch())

    async def close(self) -> None:
        """Stop accepting, then shut the application down as aiohttp does: idle connections
        closed, requests in flight given `SHUTDOWN_GRACE_S`."""
        if self._server is not None:
            self._server.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self.runner.cleanup()

    @web.middleware
    async def _request_began(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = self._connections.get(request.transport)  # type: ignore[arg-type]
        if connection is None:  # closed meanwhile
            return await handler(request)
        connection.head_since, connection.busy = None, True
        try:
            response = await handler(request)
        except web.HTTPException as raised:  # aiohttp answers with it (a 404, a 405)
            _close_unless_whole(request, raised)
            raise
        finally:
            connection.busy = False
        _close_unless_whole(request, response)
        return response

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(limits.HTTP_WATCHDOG_MS / 1000)
            began_before = loop.time() - limits.HTTP_HEADERS_READ_S
            for transport, connection in list(self._connections.items()):
                if connection.head_since is not None and connection.head_since < began_before:
                    try:
                        transport.abort()  # type: ignore[attr-defined]
                    except Exception:  # one connection's failure never stops the watchdog
                        log.exception("an HTTP connection could not be closed")


def _close_unless_whole(request: web.Request, response: web.StreamResponse) -> None:
    """An answer given before the request's body arrived whole (a refusal, a 408) ends the
    connection (`Connection: close`): the rest of the body, arriving later, would look like
    the next request's head and start its deadline on a connection idle between requests."""
    if not request.content.is_eof():
        response.force_close()


class _Connection(asyncio.Protocol):
    """aiohttp's protocol of one connection, made once the connection is admitted; the
    time its current request's head began, while one is awaited."""

    def __init__(
        self,
        connections: dict[asyncio.BaseTransport, _Connection],
        server: Callable[[], asyncio.Protocol],
    ) -> None:
        self._connections, self._server = connections, server
        self._transport: asyncio.BaseTransport | None = None
        self._inner: asyncio.Protocol | None = None
        self.head_since: float | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self._connections) >= limits.HTTP_CONNECTIONS_MAX:
            transport.abort()  # type: ignore[attr-defined]
            return
        self._connections[transport], self._transport = self, transport
        self.head_since = asyncio.get_running_loop().time()
        self._inner = self._server()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self.head_since is None and not self.busy:
            self.head_since = asyncio.get_running_loop().time()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self._connections.pop(self._transport)  # type: ignore[arg-type]
        self._inner.connection_lost(exc)
