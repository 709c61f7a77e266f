"""Calls made in one turn of the event loop, answered together by one batch call.

A POS call's feature requests start as tasks in one turn of the loop (`PosService.handle`);
each needs the same kind of read, one database round trip each. A round trip costs the
server 70-100 µs of CPU whatever the statement does (docs/benchmarks.md, eleventh
session), so N requests that ask in one turn are better served by one statement that
answers all N. `Coalescer` gathers the calls of a turn and runs its batch function once
for them (at most `max_items` together), one result per item, in order.

The gateway's in-process host batches its terminals' requests the same way, with a time
limit of its own per call (`frontend_gateway.host.InProcessHost`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """`await coalescer(item)`: the item's result from one call of `batch` with every item
    asked in the same turn of the event loop (in the order asked; `batch` gives one
    result per item, in that order). When `batch` raises, every caller of that batch
    raises the same exception; a caller cancelled while it waits leaves the others be (its
    item stays in the batch: what the batch does for it is done, as for a request whose
    caller went away after it was sent)."""

    def __init__(self, batch: Callable[[list[T]], Awaitable[Sequence[R]]], max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._batch = batch
        self._max_items = max_items
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if self._loop is not loop:  # a loop that ended with calls waiting: theirs are gone
            self._loop, self._waiting = loop, []
        if not self._waiting:
            loop.call_soon(self._flush)  # after the other tasks ready in this turn
        self._waiting.append((item, future))
        return await future

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(waiting), self._max_items):
            task = loop.create_task(self._run(waiting[start : start + self._max_items]))
            self._running.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._running.discard)

    async def _run(self, part: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._batch([item for item, _ in part])
        except Exception as exc:  # noqa: BLE001 - each caller handles it as its own failure
            _fail(part, exc)
            return
        except BaseException:  # cancelled (the loop ends), or the process exits
            for _, future in part:
                future.cancel()
            raise
        if len(results) != len(part):
            _fail(part, RuntimeError(f"a batch of {len(part)} gave {len(results)} results"))
            return
        for (_, future), result in zip(part, results, strict=True):
            if not future.done():
                future.set_result(result)


def _fail(part: Sequence[tuple[object, asyncio.Future[R]]], exc: Exception) -> None:
    for _, future in part:
        if not future.done():
            future.set_exception(exc)
