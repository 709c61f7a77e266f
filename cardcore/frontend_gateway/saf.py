"""Store and forward: reversals the gateway owes the host, kept on disk until it confirms.

When the host does not answer a request that may have moved money, the gateway answers the
terminal 96 and must undo whatever the host may have done. It appends the reversal to this
file (fsync'd before the terminal hears anything), and a background task sends every
undelivered reversal until the host answers it. A reversal is idempotent at the host
(`reverse` with a tombstone, keyed by terminal, batch and STAN), so sending one twice, or
after a crash between delivery and the `done` record, is harmless.

File format: JSON lines, `{"add": id, "request": {...}}` and `{"done": id}`. On start the
file is locked (one gateway process per file), read, pending entries are kept, and it is
rewritten with only those. A money-moving request reserves room before it goes to the host,
so a 96 always has its reversal on disk; if the file cannot be written, the gateway sends no
answer at all and the terminal reverses by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cardcore import limits
from cardcore.cards.model import Outcome, PosRequest, parse_request, request_json
from cardcore.frontend_gateway.host import Host, HostUnavailable

log = logging.getLogger(__name__)

# Answers after which a reversal is delivered: the host decided, and will decide the same.
# (A reversal the ledger cannot apply, a floor say, is answered 12 by the host and logged
# there for the back office; an unknown terminal can never be reversed.)
_FINAL = frozenset(set(Outcome) - {Outcome.UNAVAILABLE})


class SafFull(Exception):
    """No room (or no sound file) for one more reversal: the gateway stops taking
    money-moving requests until the host has confirmed some."""


class SafError(Exception):
    """The store-and-forward file cannot be used; the gateway must not start."""


class SafLocked(SafError):
    """Another process holds this store-and-forward file; each gateway needs its own."""


class SafDamaged(SafError):
    """A line before the last is not a record we wrote."""


Owed = tuple[str, str, str]  # terminal, batch, STAN of a request that is being reversed


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
        self._owed: dict[Owed, int] = {}
        self._reserved = 0  # slots promised to requests now waiting for the host
        self._broken = False  # an append failed: the file's tail is unknown until a rewrite
        self._next_id = 1
        self._span = limits.GATEWAY_HOST_BATCH_MAX  # reversals per round; halved on a failure
        self._after = 0  # the last id a round sent: the next round starts past it
        self._compacted_bytes = 0  # the file's size after its last rewrite
        self._file: Any = None
        self._lock_file: Any = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- opening ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the file for this process, read what an earlier run left, keep the
        undelivered, rewrite the file with them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self.path.with_name(self.path.name + ".lock").open("a")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise SafLocked(
                f"{self.path} is in use by another gateway process; give each its own "
                "gateway_saf_file"
            ) from None
        if self.path.exists():
            lines = self.path.read_bytes().split(b"\n")
            complete, tail = lines[:-1], lines[-1]
            for number, line in enumerate(complete, 1):
                self._replay(line, number)
            if tail:  # a crash in the middle of an append: that entry was never acknowledged
                log.warning("store-and-forward: torn last line skipped")
        self._rewrite()

    def _replay(self, line: bytes, number: int) -> None:
        try:
            record = json.loads(line.decode("utf-8"))  # not UTF-8: a ValueError, damaged
            if "add" in record:
                request = parse_request(record["request"], "saf")
                self._remember(int(record["add"]), request)
                self._next_id = max(self._next_id, int(record["add"]) + 1)
            else:
                self._forget(int(record["done"]))
        except (ValueError, KeyError, TypeError):
            # Whole lines are only ever written with fsync: a damaged one is not ours to skip.
            raise SafDamaged(
                f"store-and-forward file {self.path} is damaged at line {number}"
            ) from None

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")  # its own, as the lock file is
        with tmp.open("w", encoding="utf-8") as handle:
            for entry_id, request in sorted(self.pending.items()):
                handle.write(json.dumps({"add": entry_id, "request": request_json(request)}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself is durable
        finally:
            os.close(directory)
        if self._file is not None:
            self._file.close()
        self._file = self.path.open("a", encoding="utf-8")
        self._broken = False
        self._compacted_bytes = self.path.stat().st_size

    # --- the owed set ---------------------------------------------------------------------------

    def _remember(self, entry_id: int, request: PosRequest) -> None:
        self.pending[entry_id] = request
        self._owed[(request.terminal, request.batch, request.stan)] = entry_id

    def _forget(self, entry_id: int) -> None:
        request = self.pending.pop(entry_id, None)
        if request is not None:
            self._owed.pop((request.terminal, request.batch, request.stan), None)

    def owes(self, terminal: str, batch: str, stan: str) -> bool:
        """Whether a reversal of this transaction is stored and not yet confirmed: a resend
        of it must not be forwarded, or it could be applied and then reversed."""
        return (terminal, batch, stan) in self._owed

    def owes_terminal(self, terminal: str) -> bool:
        return any(key[0] == terminal for key in self._owed)

    # --- adding ---------------------------------------------------------------------------------

    def reserve(self) -> bool:
        """Promise room for one reversal before a money-moving request goes to the host, so
        that a 96 is never answered without its reversal on disk. False: no room."""
        if self._broken or len(self.pending) + self._reserved >= self.entries_max:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """The host answered: the promised room is not needed."""
        self._reserved = max(0, self._reserved - 1)

    async def add(self, request: PosRequest, *, reserved: bool = False) -> None:
        """Durably queue `request`; returns once it is on disk. Raises SafFull when there is
        no room or the file cannot be written (the caller must then not answer at all)."""
        if reserved:
            self.release()
        async with self._lock:
            if self._broken:
                raise SafFull("the store-and-forward file could not be written")
            if not reserved and len(self.pending) + self._reserved >= self.entries_max:
                raise SafFull(f"{len(self.pending)} reversals undelivered")
            entry_id = self._next_id
            self._next_id += 1
            line = json.dumps({"add": entry_id, "request": request_json(request)}) + "\n"
            # Shielded: a cancelled caller must not leave the line half written.
            await asyncio.shield(asyncio.to_thread(self._append, line))
            self._remember(entry_id, request)
        self.on_change(len(self.pending))
        self._wake.set()

    def _append(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._broken = True  # the tail of the file is unknown: nothing more is appended
            log.exception("store-and-forward: append failed")
            raise SafFull("the store-and-forward file could not be written") from None

    # --- delivering -----------------------------------------------------------------------------

    def start(self, host: Host) -> None:
        self._task = asyncio.get_running_loop().create_task(self._deliver_forever(host))

    async def _deliver_forever(self, host: Host) -> None:
        while True:
            delivered = 0
            try:
                if self._broken:  # repaired first: nothing is appended to a torn tail
                    async with self._lock:
                        await asyncio.to_thread(self._rewrite)
                if self.pending:
                    delivered = await self.deliver(host)
            except asyncio.CancelledError:
                raise
            except Exception:  # the task must outlive any failure, or nothing is delivered
                log.exception("store-and-forward: delivery round failed")
            if delivered and self.pending:
                continue  # more is owed and the host is taking it: no pause
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), limits.GATEWAY_SAF_RETRY_MS / 1000)

    def _next_round(self) -> list[tuple[int, PosRequest]]:
        """The next `_span` pending reversals after the last one sent, wrapping around: a
        reversal whose call keeps failing is retried in its turn, never ahead of all."""
        ordered = sorted(self.pending.items())
        start = next((i for i, (entry_id, _) in enumerate(ordered) if entry_id > self._after), 0)
        return (ordered[start:] + ordered[:start])[: self._span]

    async def deliver(self, host: Host) -> int:
        """One round: send the next pending reversals; return how many the host confirmed.
        A failed call halves the round (down to one reversal, so one the host cannot take
        holds up no other); a confirmed one doubles it again."""
        entries = self._next_round()
        if not entries:
            return 0
        self._after = entries[-1][0]
        try:
            results = await host.pos([replace(r, forwarded=True) for _, r in entries])
        except HostUnavailable:
            self._span = max(1, len(entries) // 2)
            return 0
        except Exception:
            self._span = max(1, len(entries) // 2)
            raise
        self._span = min(limits.GATEWAY_HOST_BATCH_MAX, self._span * 2)
        done = [
            entry_id
            for (entry_id, _), res in zip(entries, results, strict=True)
            if res.outcome in _FINAL
        ]
        if not done:
            return 0
        async with self._lock:
            if self._broken:  # an add's append failed meanwhile: the rewrite records it
                for entry_id in done:
                    self._forget(entry_id)
                await asyncio.to_thread(self._rewrite)
            else:
                lines = "".join(json.dumps({"done": entry_id}) + "\n" for entry_id in done)
                await asyncio.shield(asyncio.to_thread(self._append, lines))
                for entry_id in done:
                    self._forget(entry_id)
                grown = self.path.stat().st_size - self._compacted_bytes
                if grown > limits.GATEWAY_SAF_COMPACT_BYTES:  # pending or not
                    await asyncio.to_thread(self._rewrite)
            self.on_change(len(self.pending))
        log.info("store-and-forward: reversals delivered", extra={"count": len(done)})
        return len(done)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None
