"""The gateway's one port to the host (the ledger service), and its two adapters.

- `InProcessHost` calls the host's POS service directly (`cardcore serve`: one process).
- `HttpHost` batches concurrent terminal requests into one `POST /internal/v1/pos` over a
  pooled aiohttp session, and fails over to the next ledger URL when one does not answer.

Either raises `HostUnavailable` when no answer comes in time: the caller answers 96 and, for
a request that may have moved money, queues a reversal (`cardcore.frontend_gateway.saf`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import aiohttp

from cardcore import limits
from cardcore.cards.model import PosRequest, PosResult, request_json, result_from_json

log = logging.getLogger(__name__)


class HostUnavailable(Exception):
    """No answer from any host in time; nothing is known about the outcome."""


class Host(Protocol):
    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]: ...

    async def close(self) -> None: ...


PosHandler = Callable[[Sequence[PosRequest]], Awaitable[list[PosResult]]]


def _ended(
    timer: asyncio.TimerHandle,
    batch: list[tuple[PosRequest, asyncio.Future[PosResult]]],
    _call: object,
) -> None:
    """A call is over: its timer goes, and a caller it left unanswered (the call was
    cancelled, or failed past its own handler) hears HostUnavailable now."""
    timer.cancel()
    _too_late(batch)


def _too_late(batch: list[tuple[PosRequest, asyncio.Future[PosResult]]]) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(HostUnavailable("the host did not answer in time"))


class InProcessHost:
    """The host's `PosService.handle`, called in this process, with the same time limit.

    Requests that arrive in the same turn of the event loop go to the host in one call (so
    to the writer in one submission), as the HTTP adapter batches them into one POST. The
    time limit is one timer per call: when it passes, the call's callers not answered yet
    get `HostUnavailable` (the call itself goes on; what it decides is reversed by the
    gateway's store and forward, as for any 96). Requests not decided yet, waiting or in a
    call that goes on after its time limit, are at most `queue_max`: past it a request gets
    `HostUnavailable` at once, so a host that hangs never piles up calls without bound."""

    def __init__(
        self,
        handle: PosHandler,
        timeout_ms: int = limits.GATEWAY_HOST_TIMEOUT_MS,
        batch_max: int = limits.GATEWAY_HOST_BATCH_MAX,
        queue_max: int = limits.GATEWAY_HOST_QUEUE_MAX,
    ):
        self._handle = handle
        self._timeout_s = timeout_ms / 1000
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._undecided = 0  # requests waiting or in a call not ended
        self._waiting: list[tuple[PosRequest, asyncio.Future[PosResult]]] = []
        self._calls: set[asyncio.Task[None]] = set()

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        if self._undecided + len(requests) > self._queue_max:
            raise HostUnavailable("too many requests waiting for the host")
        self._undecided += len(requests)
        loop = asyncio.get_running_loop()
        futures = []
        for r in requests:
            future: asyncio.Future[PosResult] = loop.create_future()
            if not self._waiting:
                loop.call_soon(self._flush)
            self._waiting.append((r, future))
            futures.append(future)
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        loop = asyncio.get_running_loop()
        for i in range(0, len(waiting), self._batch_max):
            batch = waiting[i : i + self._batch_max]
            call = loop.create_task(self._call(batch))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)
            call.add_done_callback(functools.partial(self._decided, len(batch)))
            timer = loop.call_later(self._timeout_s, _too_late, batch)
            call.add_done_callback(functools.partial(_ended, timer, batch))

    def _decided(self, count: int, _call: object) -> None:
        self._undecided -= count

    async def _call(self, batch: list[tuple[PosRequest, asyncio.Future[PosResult]]]) -> None:
        try:
            results = await self._handle([r for r, _ in batch])
        except Exception as exc:
            log.exception("the in-process host failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(HostUnavailable(repr(exc)))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        for call in list(self._calls):
            call.cancel()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)


class HttpHost:
    """Batches concurrent requests into one call; fails over across `urls` in order."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str = "",
        timeout_ms: int = limits.GATEWAY_HOST_TIMEOUT_MS,
        batch_max: int = limits.GATEWAY_HOST_BATCH_MAX,
        batch_wait_ms: int = limits.GATEWAY_HOST_BATCH_WAIT_MS,
        queue_max: int = limits.GATEWAY_HOST_QUEUE_MAX,
    ) -> None:
        if not urls:
            raise ValueError("at least one ledger URL")
        self.urls = [u.rstrip("/") for u in urls]
        self._active = 0  # the URL that answered last
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout_s = timeout_ms / 1000
        self._batch_max = batch_max
        self._batch_wait_s = batch_wait_ms / 1000
        self._queue: asyncio.Queue[tuple[PosRequest, asyncio.Future[PosResult]]] = asyncio.Queue(
            queue_max
        )
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._in_flight = asyncio.Semaphore(limits.GATEWAY_HOST_CALLS_MAX)

    async def kek_check_value(self) -> str | None:
        """The check value of the ledger's key-encrypting key (`GET /internal/v1/kek`), from
        the first URL that answers it; None when none does (down, or without a key)."""
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for url in self.urls:
                try:
                    async with session.get(url + "/internal/v1/kek", headers=self._headers) as r:
                        if r.status == 200:
                            value = (await r.json()).get("check_value")
                            if isinstance(value, str):
                                return value
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    continue
        return None

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        self._start()
        if self._queue.maxsize - self._queue.qsize() < len(requests):  # all or none queued
            raise HostUnavailable("too many requests waiting for the host")
        loop = asyncio.get_running_loop()
        futures = []
        for r in requests:
            future: asyncio.Future[PosResult] = loop.create_future()
            self._queue.put_nowait((r, future))  # room was checked, and nothing awaited since
            futures.append(future)
        try:
            async with asyncio.timeout(self._timeout_s):  # a timer; wait_for makes a task
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            if all(f.done() and not f.cancelled() and f.exception() is None for f in futures):
                # Every answer came in the loop turn the time ran out: it stands (the
                # ledger applied it), so it is given, not a 96 and a reversal.
                return [f.result() for f in futures]
            raise HostUnavailable("the host did not answer in time") from None

    def _start(self) -> None:
        if self._task is None:
            connector = aiohttp.TCPConnector(
                limit=limits.GATEWAY_HOST_CALLS_MAX,
                keepalive_timeout=limits.GATEWAY_HOST_KEEPALIVE_S,
            )
            self._session = aiohttp.ClientSession(connector=connector)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = asyncio.get_running_loop().time() + self._batch_wait_s
            while len(batch) < self._batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
            batch = [(r, future) for r, future in batch if not future.done()]  # gave up
            if not batch:
                continue
            await self._in_flight.acquire()  # bounded calls: the queue above then fills
            call = asyncio.get_running_loop().create_task(self._call(batch))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)
            call.add_done_callback(lambda _call: self._in_flight.release())

    async def _call(self, batch: list[tuple[PosRequest, asyncio.Future[PosResult]]]) -> None:
        body = {"requests": [request_json(r) for r, _ in batch]}
        try:
            results = await self._post(body)
        except (HostUnavailable, ValueError, KeyError, TypeError) as exc:
            error = exc if isinstance(exc, HostUnavailable) else HostUnavailable(repr(exc))
            for _, future in batch:  # every waiter learns the call failed
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _post(self, body: Mapping[str, object]) -> list[PosResult]:
        assert self._session is not None
        # Every URL gets its share of the time the terminal is promised, so a hung first
        # ledger leaves time to try the next; a refused connection fails at once anyway.
        share = self._timeout_s / len(self.urls)
        timeout = aiohttp.ClientTimeout(
            total=share, sock_connect=min(limits.GATEWAY_HOST_CONNECT_MS / 1000, share)
        )
        errors = []
        for attempt in range(len(self.urls)):
            index = (self._active + attempt) % len(self.urls)
            url = self.urls[index] + "/internal/v1/pos"
            try:
                async with self._session.post(
                    url, json=body, headers=self._headers, timeout=timeout
                ) as response:
                    if response.status >= 500:
                        errors.append(f"{url}: HTTP {response.status}")
                        continue
                    document = await response.json()
                    if response.status != 200:
                        raise HostUnavailable(f"{url}: HTTP {response.status}: {document}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"{url}: {type(exc).__name__}")
                continue
            if index != self._active:
                log.warning("ledger failover", extra={"url": self.urls[index]})
                self._active = index
            results = [result_from_json(r) for r in document["results"]]
            if len(results) != len(body["requests"]):  # type: ignore[arg-type]
                raise HostUnavailable(f"{url}: answered a different number of results")
            return results
        raise HostUnavailable("; ".join(errors))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for call in list(self._calls):
            call.cancel()
        if self._session is not None:
            await self._session.close()
