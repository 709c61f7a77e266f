"""`HttpHost.pos` at its time limit: answers that all came are given, others are 96."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult
from cardcore.frontend_gateway.host import HostUnavailable, HttpHost

REQUEST = PosRequest(Kind.PURCHASE, "T0000001", "000001", "000001", amount=100)


def _host(timeout_ms: int) -> HttpHost:
    host = HttpHost(["http://127.0.0.1:9"], timeout_ms=timeout_ms)
    host._start = lambda: None  # type: ignore[method-assign]  # no caller task: we answer
    return host


async def _answer_queued(host: HttpHost, result: PosResult) -> None:
    _request, future = await host._queue.get()
    future.set_result(result)


async def test_answers_that_all_came_as_the_time_ran_out_are_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @contextlib.asynccontextmanager
    async def out_of_time(_delay: float) -> AsyncIterator[None]:
        yield  # the body finished (every answer is in), yet the timer fired too
        raise TimeoutError

    monkeypatch.setattr(asyncio, "timeout", out_of_time)
    host = _host(timeout_ms=1000)
    approved = PosResult(Outcome.APPROVED, balance=5)
    answering = asyncio.create_task(_answer_queued(host, approved))
    assert await host.pos([REQUEST]) == [approved]
    await answering


async def test_no_answer_in_time_is_host_unavailable_and_abandons_the_request() -> None:
    host = _host(timeout_ms=20)
    with pytest.raises(HostUnavailable, match="did not answer in time"):
        await host.pos([REQUEST])
    _request, future = host._queue.get_nowait()
    assert future.cancelled()  # the caller task skips it instead of calling the ledger
