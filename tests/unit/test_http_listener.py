"""The HTTP listener in process, on the gateway's metrics app: aiohttp takes the bounds it is
given (its `web.Server` drops keywords it does not know with only a warning), and an idle
connection is closed at the head deadline while another client is served."""

from __future__ import annotations

import asyncio

import pytest

from cardcore import limits
from cardcore.api.app import metrics_app
from cardcore.api.listener import HttpListener
from cardcore.metrics import Metrics
from tests.helpers import free_port


async def test_aiohttp_takes_the_keep_alive_and_linger_bounds() -> None:
    listener = HttpListener(metrics_app(Metrics()))
    await listener.start("127.0.0.1", free_port())
    try:
        assert listener.runner.server is not None
        protocol = listener.runner.server()
        assert protocol.keepalive_timeout == limits.HTTP_KEEPALIVE_IDLE_S
        assert protocol._lingering_time == limits.HTTP_BODY_LINGER_S
    finally:
        await listener.close()


async def test_the_metrics_listener_closes_a_silent_connection_and_serves_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "HTTP_HEADERS_READ_S", 0.5)
    monkeypatch.setattr(limits, "HTTP_WATCHDOG_MS", 50)
    port = free_port()
    listener = HttpListener(metrics_app(Metrics()))
    await listener.start("127.0.0.1", port)
    try:
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        assert await asyncio.wait_for(silent_reader.read(), 2) == b""
        silent.close()
    finally:
        await listener.close()
