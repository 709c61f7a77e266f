"""Group commit: the one writer per database.

Callers `submit` a request (a list of operations). The writer drains its bounded queue into a
batch (up to `batch_size_max` operations, waiting at most `batch_wait_ms_max` for company),
reads everything the batch touches in a few queries, decides every operation in memory in
arrival order, writes journal, balances, idempotency records and outbox in bulk, commits once,
and only then answers each caller. A full queue answers `Busy` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cardcore import limits
from cardcore.ledger.decide import decide_batch
from cardcore.ledger.model import Op, Result
from cardcore.ledger.store import LedgerStore, WriterSession, WriterState
from cardcore.metrics import Metrics

log = logging.getLogger(__name__)


class Busy(Exception):
    """The writer's queue is full; retry later."""


class LedgerUnavailable(Exception):
    """The batch could not be committed; nothing of it was acknowledged."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Request:
    ops: Sequence[Op]
    future: asyncio.Future[list[Result]]


class Writer:
    def __init__(
        self,
        store: LedgerStore,
        metrics: Metrics,
        *,
        batch_size_max: int = limits.BATCH_SIZE_MAX_DEFAULT,
        batch_wait_ms_max: int = limits.BATCH_WAIT_MS_MAX_DEFAULT,
        queue_requests_max: int = limits.WRITER_QUEUE_REQUESTS_MAX,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        if not 1 <= batch_size_max <= limits.BATCH_SIZE_MAX_CEILING:
            raise ValueError(f"batch_size_max must be 1..{limits.BATCH_SIZE_MAX_CEILING}")
        if not 0 <= batch_wait_ms_max <= limits.BATCH_WAIT_MS_MAX_CEILING:
            raise ValueError(f"batch_wait_ms_max must be 0..{limits.BATCH_WAIT_MS_MAX_CEILING}")
        self._store = store
        self._metrics = metrics
        self._batch_size_max = batch_size_max
        self._batch_wait_s = batch_wait_ms_max / 1000
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=queue_requests_max)
        self._clock_ms = clock_ms
        self._session: WriterSession | None = None
        self._state: WriterState | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_now_ms = 0
        self._next_scan_ms = 0
        self._failed_commits = 0

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    @property
    def ready(self) -> bool:
        return (
            self._task is not None
            and not self._task.done()
            and not self._closing
            and self._failed_commits < limits.WRITER_RECOVERY_ATTEMPTS_MAX
        )

    @property
    def last_seq(self) -> int:
        return 0 if self._state is None else self._state.seq

    async def stop(self, grace_s: int = limits.SHUTDOWN_GRACE_S) -> None:
        """Refuse new requests, finish the queued ones within `grace_s`, then close."""
        self._closing = True
        deadline = asyncio.get_running_loop().time() + grace_s
        while not self._queue.empty() and asyncio.get_running_loop().time() < deadline:
            if self._task is None or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            request = self._queue.get_nowait()
            if not request.future.done():
                request.future.set_exception(LedgerUnavailable("ledger is shutting down"))
        await self._disconnect()

    async def _connect(self) -> None:
        self._session, self._state = await WriterSession.open(self._store)

    async def _disconnect(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None

    # --- submit -----------------------------------------------------------------------------

    async def submit(self, ops: Sequence[Op]) -> list[Result]:
        """Apply `ops` (one request; a linked group never spans requests). Raises `Busy` or
        `LedgerUnavailable`; on success every result is committed."""
        if self._closing or not self.ready:
            raise LedgerUnavailable("ledger writer is not running")
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Request(ops, future))
        except asyncio.QueueFull:
            self._metrics.ledger_busy.inc()
            raise Busy("ledger writer queue is full") from None
        self._metrics.ledger_queue_depth.set(self._queue.qsize())
        return await future

    # --- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        scan_s = limits.EXPIRY_SCAN_INTERVAL_MS / 1000
        while True:
            batch: list[_Request] = []
            with contextlib.suppress(TimeoutError):
                batch.append(await asyncio.wait_for(self._queue.get(), timeout=scan_s))
            if batch:
                await self._fill(batch)
            now_ms = self._now_ms()
            scan = now_ms >= self._next_scan_ms
            if not batch and not scan:
                continue
            self._metrics.ledger_queue_depth.set(self._queue.qsize())
            try:
                await self._process(batch, now_ms, scan)
            except asyncio.CancelledError:
                _fail(batch, LedgerUnavailable("ledger is shutting down"))
                raise
            except Exception as exc:
                self._failed_commits += 1
                self._metrics.ledger_commit_failures.inc()
                log.exception("ledger batch failed; nothing of it was acknowledged")
                _fail(batch, LedgerUnavailable(f"ledger batch failed: {type(exc).__name__}"))
                await self._recover()

    async def _fill(self, batch: list[_Request]) -> None:
        count = len(batch[0].ops)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._batch_wait_s
        while count < self._batch_size_max:
            try:
                request = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    request = await asyncio.wait_for(self._queue.get(), timeout=remaining)
                except TimeoutError:
                    break
            batch.append(request)
            count += len(request.ops)

    def _now_ms(self) -> int:
        # Never step back: batch times, hold expiries and hashes follow commit order.
        self._last_now_ms = max(self._last_now_ms, self._clock_ms())
        return self._last_now_ms

    async def _process(self, batch: list[_Request], now_ms: int, scan: bool) -> None:
        session, state = self._session, self._state
        if session is None or state is None:
            raise LedgerUnavailable("writer has no connection")
        ops = [op for request in batch for op in request.ops]
        started = time.perf_counter()
        async with session.transaction():
            due: list[int] = []
            if scan:
                due = await session.due_holds(now_ms, limits.EXPIRY_OPS_PER_BATCH_MAX)
                more_due = len(due) == limits.EXPIRY_OPS_PER_BATCH_MAX
                self._next_scan_ms = now_ms + (0 if more_due else limits.EXPIRY_SCAN_INTERVAL_MS)
            if not ops and not due:
                return
            view = await session.read_view(ops, state.assets, due)
            requests = [request.ops for request in batch]
            effects = decide_batch(requests, view, state.counters, state.seq + 1, now_ms)
            digest = None
            if not effects.is_empty:
                digest = await session.write_batch(effects, state.hash, len(ops))
        # Committed: only now may anyone hear of it.
        self._failed_commits = 0
        if digest is not None:
            state.seq, state.hash = effects.seq, digest
            state.counters = effects.counters
            state.assets.update((a.code, a) for a in effects.assets)
        self._metrics.ledger_commit_seconds.observe(time.perf_counter() - started)
        self._metrics.ledger_batch_ops.observe(len(ops))
        position = 0
        for request in batch:
            results = effects.results[position : position + len(request.ops)]
            position += len(request.ops)
            for result in results:
                self._metrics.ledger_ops.labels(result.code).inc()
            if not request.future.done():
                request.future.set_result(results)

    async def _recover(self) -> None:
        """After a failed batch: reconnect and reload seq, hash and ids from the database."""
        await asyncio.sleep(limits.WRITER_RECOVERY_SLEEP_MS / 1000)
        await self._disconnect()
        try:
            await self._connect()
        except Exception:
            log.exception("ledger writer could not reconnect; will retry with the next batch")


def _fail(batch: list[_Request], exc: Exception) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)
