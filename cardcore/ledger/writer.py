"""Group commit: the one writer per database.

Callers `submit` a request (a list of operations). The writer drains its bounded queue into a
batch (up to `batch_size_max` operations, waiting at most `batch_wait_ms_max` for company),
reads everything the batch touches in a few queries, decides every operation in memory in
arrival order, writes journal, balances, idempotency records and outbox in bulk, commits once,
and only then answers each caller. A full queue answers `Busy` at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cardcore import limits
from cardcore.ledger import journal
from cardcore.ledger.decide import BatchEffects, decide_batch, overlay
from cardcore.ledger.model import Account, Op, Result
from cardcore.ledger.store import LedgerStore, WriterSession, WriterState
from cardcore.metrics import Metrics

log = logging.getLogger(__name__)


class Busy(Exception):
    """The writer's queue is full; retry later."""


class LedgerUnavailable(Exception):
    """The batch could not be committed; nothing of it was acknowledged."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class AccountCache:
    """The committed accounts the writer last read or wrote, by id, at most `size` of them
    (the least recently used go first). The writer is the only one that changes an account
    (it holds the database's writer lock), so what it committed is what the database holds:
    a batch takes these instead of reading them again while the journal's last batch is
    one of the writer's own (`LedgerStore.read_view` checks). Emptied whenever the writer
    reconnects, since a failed batch may have committed after all."""

    def __init__(self, size: int = limits.WRITER_ACCOUNTS_CACHED_MAX) -> None:
        if size < 0:
            raise ValueError("size must be at least 0")
        self._size = size
        self.by_id: dict[int, Account] = {}  # insertion order: least recently used first

    def learn(self, accounts: Iterable[Account]) -> None:
        by_id = self.by_id
        for account in accounts:
            by_id.pop(account.id, None)
            by_id[account.id] = account
        excess = len(by_id) - self._size
        if excess > 0:
            for aid in list(itertools.islice(by_id, excess)):
                del by_id[aid]

    def clear(self) -> None:
        self.by_id.clear()


@dataclass(slots=True)
class _Decided:
    batch: list[_Request]
    effects: BatchEffects
    records: dict[str, list[journal.Record]] | None  # None: nothing to write
    digest: str | None
    prev_hash: str
    tip: WriterState  # the ledger's state once this batch commits
    ops_count: int


@dataclass(slots=True)
class _InFlight:
    decided: _Decided
    task: asyncio.Task[None]
    started_ns: int


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
        self._idle = asyncio.Event()  # set while nothing is queued, decided or in flight
        self._current: list[_Request] = []  # taken off the queue, not yet answered or in flight
        self.accounts = AccountCache()

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
        while asyncio.get_running_loop().time() < deadline:
            if self._task is None or self._task.done():
                break
            if self._queue.empty() and self._idle.is_set():
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
        self.accounts.clear()  # a batch that failed may have committed all the same
        self._session, self._state = await WriterSession.open(self._store)
        # Batch times never step back, across a restart too (the clock may be behind).
        self._last_now_ms = max(self._last_now_ms, self._state.committed_at_ms)

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
        """The pipeline: while batch N is written and committed (on the write connection),
        batch N+1 is read (on the read connection) and decided on top of N's effects. N's
        callers are answered when N commits; N+1 is written only after that."""
        in_flight: _InFlight | None = None
        try:
            while True:
                batch = await self._collect(block=in_flight is None)
                now_ms = self._now_ms()
                scan = now_ms >= self._next_scan_ms
                if not batch and not scan:
                    if in_flight is not None:
                        committed = await self._settle(in_flight)
                        in_flight = None
                        if not committed:
                            await self._recover()
                    continue
                self._metrics.ledger_queue_depth.set(self._queue.qsize())
                if in_flight is not None and not self._store.postgres:
                    # SQLite: reading beside a write starves its WAL checkpoints; no pipeline.
                    committed = await self._settle(in_flight)
                    in_flight = None
                    if not committed:
                        _fail(batch, LedgerUnavailable("ledger batch failed: an earlier one"))
                        await self._recover()
                        continue
                broken = False
                try:
                    decided = await self._decide(batch, now_ms, scan, in_flight)
                except Exception as exc:  # noqa: BLE001 - a failed batch fails its callers only
                    decided, broken = None, True
                    self._batch_failed(batch, exc)
                if in_flight is not None:
                    committed = await self._settle(in_flight)
                    in_flight = None
                    if not committed:
                        broken = True
                        if decided is not None:
                            # Decided on top of a batch that did not commit: nothing holds.
                            _fail(batch, LedgerUnavailable("ledger batch failed: an earlier one"))
                            decided = None
                if broken:
                    await self._recover()
                elif decided is not None:
                    in_flight = self._launch(decided)
        except asyncio.CancelledError:
            if in_flight is not None:
                in_flight.task.cancel()
                with contextlib.suppress(BaseException):
                    await in_flight.task
                _fail(in_flight.decided.batch, LedgerUnavailable("ledger is shutting down"))
            _fail(self._current, LedgerUnavailable("ledger is shutting down"))
            raise

    async def _collect(self, *, block: bool) -> list[_Request]:
        """The next batch: waits for a first request only when nothing is in flight."""
        batch: list[_Request] = []
        self._current = batch  # so that a shutdown mid-batch can still answer its callers
        if block:
            scan_s = limits.EXPIRY_SCAN_INTERVAL_MS / 1000
            self._idle.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(scan_s):  # a timer; wait_for would make a task
                    batch.append(await self._queue.get())
            self._idle.clear()
        else:
            with contextlib.suppress(asyncio.QueueEmpty):
                batch.append(self._queue.get_nowait())
        if batch:
            await self._fill(batch)
        return batch

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
                    async with asyncio.timeout(remaining):
                        request = await self._queue.get()
                except TimeoutError:
                    break
            batch.append(request)
            count += len(request.ops)

    def _now_ms(self) -> int:
        # Never step back: batch times, hold expiries and hashes follow commit order.
        self._last_now_ms = max(self._last_now_ms, self._clock_ms())
        return self._last_now_ms

    async def _decide(
        self, batch: list[_Request], now_ms: int, scan: bool, in_flight: _InFlight | None
    ) -> _Decided | None:
        """Read and decide `batch` as if `in_flight` had committed. None: nothing to write."""
        session, state = self._session, self._state
        if session is None or state is None:
            raise LedgerUnavailable("writer has no connection")
        tip = in_flight.decided.tip if in_flight is not None else state
        ops = [op for request in batch for op in request.ops]
        if scan:
            self._next_scan_ms = now_ms + limits.EXPIRY_SCAN_INTERVAL_MS
        due = now_ms if scan else None
        committed = (state.seq, tip.seq)  # the journal's last batch is one of these
        view = await session.read_view(ops, tip.assets, due, self.accounts.by_id, committed)
        self.accounts.learn(view.accounts.values())
        if in_flight is not None:
            overlay(view, in_flight.decided.effects)
        if scan and len(view.pendings) >= limits.EXPIRY_OPS_PER_BATCH_MAX:
            self._next_scan_ms = now_ms  # more may be due: look again with the next batch
        requests = [request.ops for request in batch]
        effects = decide_batch(requests, view, tip.counters, tip.seq + 1, now_ms)
        if not batch and effects.is_empty:
            return None
        next_tip = tip
        records = digest = None
        if not effects.is_empty:
            records = journal.batch_records(effects)
            digest = journal.batch_hash(tip.hash, effects.seq, now_ms, records)
            assets = {**tip.assets, **{a.code: a for a in effects.assets}}
            next_tip = WriterState(effects.seq, digest, effects.counters, assets, now_ms)
        return _Decided(batch, effects, records, digest, tip.hash, next_tip, len(ops))

    def _launch(self, decided: _Decided) -> _InFlight:
        session = self._session
        assert session is not None
        started_ns = time.perf_counter_ns()
        if decided.records is None or decided.digest is None:
            task = asyncio.create_task(asyncio.sleep(0))  # nothing to write: only replays
        else:
            task = asyncio.create_task(
                session.write_batch(
                    decided.effects,
                    records=decided.records,
                    digest=decided.digest,
                    prev_hash=decided.prev_hash,
                    ops_count=decided.ops_count,
                )
            )
        return _InFlight(decided, task, started_ns)

    async def _settle(self, in_flight: _InFlight) -> bool:
        """Wait for the in-flight batch's commit; answer its callers. False if it failed."""
        try:
            await in_flight.task
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its callers only
            self._batch_failed(in_flight.decided.batch, exc)
            return False
        # Committed: only now may anyone hear of it.
        self._failed_commits = 0
        self._state = in_flight.decided.tip
        self.accounts.learn(in_flight.decided.effects.accounts.values())
        elapsed_ns = time.perf_counter_ns() - in_flight.started_ns
        self._metrics.ledger_commit_seconds.observe(elapsed_ns / 1e9)
        batch, results = in_flight.decided.batch, in_flight.decided.effects.results
        self._metrics.ledger_batch_ops.observe(sum(len(r.ops) for r in batch))
        for code, count in collections.Counter(r.code for r in results).items():
            self._metrics.ledger_ops.labels(code).inc(count)
        position = 0
        for request in batch:
            answer = results[position : position + len(request.ops)]
            position += len(request.ops)
            if not request.future.done():
                request.future.set_result(answer)
        return True

    def _batch_failed(self, batch: list[_Request], exc: Exception) -> None:
        self._failed_commits += 1
        self._metrics.ledger_commit_failures.inc()
        log.error(
            "ledger batch failed; nothing of it was acknowledged",
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        _fail(batch, LedgerUnavailable(f"ledger batch failed: {type(exc).__name__}"))

    async def _recover(self) -> None:
        """After a failed batch: reconnect and reload seq, hash and ids from the database."""
        await asyncio.sleep(limits.WRITER_RECOVERY_SLEEP_MS / 1000)
        await self._disconnect()
        try:
            await self._connect()
            self._failed_commits = 0  # reconnected with the committed state: ready again
        except Exception:
            log.exception("ledger writer could not reconnect; will retry with the next batch")


def _fail(batch: list[_Request], exc: Exception) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)
