"""`Coalescer`: the calls of one turn of the event loop answered by one batch call."""

from __future__ import annotations

import asyncio

import pytest

from cardcore.coalesce import Coalescer


class Batches:
    """A batch function that records what it was asked; `fail` makes it raise."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.asked: list[list[int]] = []
        self.fail = fail

    async def __call__(self, items: list[int]) -> list[int]:
        self.asked.append(list(items))
        await asyncio.sleep(0)  # a round trip
        if self.fail is not None:
            raise self.fail
        return [item * 10 for item in items]


async def test_calls_of_one_turn_are_one_batch_in_order_each_given_its_own_result() -> None:
    batches = Batches()
    together = Coalescer(batches, max_items=100)
    got = await asyncio.gather(*(together(i) for i in range(5)))
    assert got == [0, 10, 20, 30, 40]
    assert batches.asked == [[0, 1, 2, 3, 4]]


async def test_calls_of_later_turns_are_batches_of_their_own() -> None:
    batches = Batches()
    together = Coalescer(batches, max_items=100)
    assert await together(1) == 10
    assert list(await asyncio.gather(together(2), together(3))) == [20, 30]
    assert batches.asked == [[1], [2, 3]]


async def test_a_turn_with_more_than_the_bound_is_split_into_batches_of_at_most_it() -> None:
    batches = Batches()
    together = Coalescer(batches, max_items=2)
    assert await asyncio.gather(*(together(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert batches.asked == [[0, 1], [2, 3], [4]]


async def test_a_batch_that_raises_fails_each_of_its_callers_with_that_exception() -> None:
    together = Coalescer(Batches(fail=ConnectionResetError("gone")), max_items=100)
    got = await asyncio.gather(together(1), together(2), return_exceptions=True)
    assert [type(e) for e in got] == [ConnectionResetError, ConnectionResetError]


async def test_a_batch_short_of_results_fails_its_callers_never_pairing_them_wrongly() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[1:]

    together = Coalescer(short, max_items=100)
    got = await asyncio.gather(together(1), together(2), return_exceptions=True)
    assert [type(e) for e in got] == [RuntimeError, RuntimeError]


async def test_a_caller_cancelled_while_it_waits_leaves_the_others_their_results() -> None:
    batches = Batches()
    together = Coalescer(batches, max_items=100)
    first = asyncio.ensure_future(together(1))
    second = asyncio.ensure_future(together(2))
    await asyncio.sleep(0)  # both asked in this turn
    first.cancel()
    assert await second == 20
    with pytest.raises(asyncio.CancelledError):
        await first
    assert batches.asked == [[1, 2]]


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(Batches(), max_items=0)


async def test_a_batch_cancelled_cancels_each_of_its_callers() -> None:
    started = asyncio.Event()

    async def forever(items: list[int]) -> list[int]:
        started.set()
        await asyncio.Event().wait()
        return items

    together = Coalescer(forever, max_items=100)
    callers = [asyncio.ensure_future(together(i)) for i in range(2)]
    await started.wait()
    for task in list(together._running):  # the loop ending cancels it so
        task.cancel()
    got = await asyncio.gather(*callers, return_exceptions=True)
    assert [type(e) for e in got] == [asyncio.CancelledError, asyncio.CancelledError]


def test_a_loop_that_ended_with_calls_waiting_leaves_the_next_loop_a_working_coalescer() -> None:
    batches = Batches()
    together = Coalescer(batches, max_items=100)
    first = asyncio.new_event_loop()
    try:
        waiting = first.create_task(together(1))
        first.call_soon(first.stop)
        first.run_forever()  # one turn: the call waits, its flush never ran
        assert not waiting.done()
        waiting.cancel()
    finally:
        first.close()
    second = asyncio.new_event_loop()
    try:
        assert second.run_until_complete(together(2)) == 20
    finally:
        second.close()
    assert batches.asked == [[2]]
