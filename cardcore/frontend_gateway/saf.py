"""Store and forward: reversals the gateway owes the host, kept on disk until it confirms.

When the host does not answer a request that may have moved money, the gateway answers the
terminal 96 and must undo whatever the host may have done. It appends the reversal to this
file (fsync'd before the terminal hears anything), and a background task sends every
undelivered reversal until the host answers it. A reversal is idempotent at the host
(`reverse` with a tombstone, keyed by terminal, batch and STAN), so sending one twice, or
after a crash between delivery and the `done` record, is harmless.

File format: JSON lines, `{"add": id, "request": {...}}` and `{"done": id}`. On start the
file is read, pending entries are kept, and it is rewritten with only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cardcore import limits
from cardcore.cards.model import Outcome, PosRequest, parse_request, request_json
from cardcore.frontend_gateway.host import Host, HostUnavailable

log = logging.getLogger(__name__)

# Answers after which a reversal is delivered: the host decided, and will decide the same.
_FINAL = frozenset(set(Outcome) - {Outcome.UNAVAILABLE})


class SafFull(Exception):
    """Too many undelivered reversals: the gateway stops taking money-moving requests."""


class ReversalQueue:
    def __init__(
        self,
        path: Path,
        *,
        entries_max: int = limits.GATEWAY_SAF_ENTRIES_MAX,
        on_change: Callable[[int], None] = lambda _pending: None,
    ):
        self.path = path
        self.on_change = on_change  # told the number of pending reversals when it changes
        self.entries_max = entries_max
        self.pending: dict[int, PosRequest] = {}
        self.delivered = 0
        self._next_id = 1
        self._file: Any = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Read what an earlier run left, keep the undelivered, rewrite the file with them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with self.path.open("r", encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    self._replay(line, number)
        self._rewrite()

    def _replay(self, line: str, number: int) -> None:
        try:
            record = json.loads(line)
            if "add" in record:
                self.pending[int(record["add"])] = parse_request(record["request"], "saf")
                self._next_id = max(self._next_id, int(record["add"]) + 1)
            else:
                self.pending.pop(int(record["done"]), None)
        except (ValueError, KeyError, TypeError):
            # A torn last line (a crash mid-append) was never acknowledged: skip it.
            log.warning("store-and-forward: unreadable line skipped", extra={"line": number})

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for entry_id, request in sorted(self.pending.items()):
                handle.write(json.dumps({"add": entry_id, "request": request_json(request)}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)
        if self._file is not None:
            self._file.close()
        self._file = self.path.open("a", encoding="utf-8")

    async def add(self, request: PosRequest) -> None:
        """Durably queue `request`; returns once it is on disk."""
        async with self._lock:
            if len(self.pending) >= self.entries_max:
                raise SafFull(f"{len(self.pending)} reversals undelivered")
            entry_id = self._next_id
            self._next_id += 1
            line = json.dumps({"add": entry_id, "request": request_json(request)}) + "\n"
            await asyncio.to_thread(self._append, line)
            self.pending[entry_id] = request
        self.on_change(len(self.pending))
        self._wake.set()

    def _append(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def start(self, host: Host) -> None:
        self._task = asyncio.get_running_loop().create_task(self._deliver_forever(host))

    async def _deliver_forever(self, host: Host) -> None:
        while True:
            if self.pending:
                await self.deliver(host)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), limits.GATEWAY_SAF_RETRY_MS / 1000)

    async def deliver(self, host: Host) -> int:
        """One round: send every pending reversal; return how many the host confirmed."""
        entries = sorted(self.pending.items())[: limits.GATEWAY_HOST_BATCH_MAX]
        if not entries:
            return 0
        try:
            results = await host.pos([r for _, r in entries])
        except HostUnavailable:
            return 0
        done = [
            entry_id
            for (entry_id, _), res in zip(entries, results, strict=True)
            if res.outcome in _FINAL
        ]
        async with self._lock:
            lines = "".join(json.dumps({"done": entry_id}) + "\n" for entry_id in done)
            if lines:
                await asyncio.to_thread(self._append, lines)
            for entry_id in done:
                self.pending.pop(entry_id, None)
            self.delivered += len(done)
            self.on_change(len(self.pending))
            if not self.pending and self.path.stat().st_size > limits.GATEWAY_SAF_COMPACT_BYTES:
                await asyncio.to_thread(self._rewrite)
        if done:
            log.info("store-and-forward: reversals delivered", extra={"count": len(done)})
        return len(done)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._file is not None:
            self._file.close()
            self._file = None
