"""The HTTP listener in process, on the gateway's metrics app: aiohttp takes the bounds it is
given (its `web.Server` drops keywords it does not know with only a warning), and an idle
connection is closed at the head deadline while another client is served."""

from __future__ import annotations

import asyncio
import contextlib

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


async def _post_then_idle(
    monkeypatch: pytest.MonkeyPatch, *, late_body: bool
) -> tuple[bytes, bytes]:
    """A POST answered without its body being read (405 on /healthz), the body in time or
    after the answer; then 2.5 s idle (the head bound 1 s) and a GET on the connection."""
    monkeypatch.setattr(limits, "HTTP_HEADERS_READ_S", 1)
    monkeypatch.setattr(limits, "HTTP_WATCHDOG_MS", 50)
    port = free_port()
    listener = HttpListener(metrics_app(Metrics()))
    await listener.start("127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n"
        writer.write(head if late_body else head + b"hello")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1])
            for line in answer.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        if late_body:
            writer.write(b"hello")  # the rest of the body, after the answer
        await asyncio.sleep(2.5)
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            after = await asyncio.wait_for(reader.read(100), 5)
        except ConnectionError:
            after = b"<reset>"
        writer.close()
        return answer, after
    finally:
        await listener.close()


async def test_a_body_sent_in_time_keeps_the_connection_alive_past_the_head_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answer, after = await _post_then_idle(monkeypatch, late_body=False)
    assert b"connection: close" not in answer.lower()
    assert after.startswith(b"HTTP/1.1 200")


async def test_an_answer_before_the_body_arrived_closes_the_connection_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the late rest of the body started a head deadline on the idle connection,
    which was reset 10 s later while a pooling client (the gateway) reused it."""
    answer, after = await _post_then_idle(monkeypatch, late_body=True)
    assert b"connection: close" in answer.lower()
    assert after in (b"", b"<reset>")
