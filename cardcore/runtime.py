"""Process-wide settings of long-running processes: the servers (`serve`, `ledger`,
`gateway`) once listening, and the load generators (`bench ...`) before their timed part.

The event loop (ADR 0009): `run` runs a server's or load generator's main coroutine on
uvloop (libuv's loop, by asyncpg's authors; the same `asyncio` interfaces) where it is
installed (CPython but on Windows and Cygwin: setup.cfg), elsewhere on the standard loop.
A plain-purchase POS benchmark spends about a tenth less CPU in the server on it
(docs/benchmarks.md, tenth session). Short commands (migrate, admin, verify) keep
`asyncio.run`: their time is in the database.

The garbage collector: CPython collects its youngest generation every 700 net new container
objects. A busy server makes that many in a few milliseconds (a POS message, its futures,
the writer's batch), so the collector ran about 90 times a second, and about once a second
a full collection scanned every object the process keeps (caches, sessions, connections,
pooled statements): 85 ms each, in all about 11 % of the process's time at 1,600 purchases
a second (docs/benchmarks.md, fourth session), and pauses that show in the 99th
percentile. Once the server has started, `settle_gc` moves what it built so far out of the
collector's sight for good (`gc.freeze`: start-up objects are not garbage; one that later
becomes part of a garbage cycle, say a pooled database connection dropped after a server
restart, stays in memory with what it holds: once per start-up object, never growing) and
raises the young threshold. Cycles made later are still collected: every new object counts
towards the threshold, so at most about `GC_YOUNG_OBJECTS_MAX` objects of garbage wait for
the next collection.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

from cardcore import limits

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on uvloop when it is installed."""
    try:
        import uvloop  # noqa: PLC0415 - only the long-running processes need it
    except ImportError:  # pragma: no cover - Windows: the standard loop
        return asyncio.run(main)
    return uvloop.run(main)


def settle_gc() -> None:
    """Call once the server is listening, after its start-up objects were made."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(limits.GC_YOUNG_OBJECTS_MAX, older, oldest)
