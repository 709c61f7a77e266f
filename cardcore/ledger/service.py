"""The ledger service: the one object entrypoints use (HTTP routes, the in-process client of
`cardcore serve`, the CLI). Writes go through the writer; reads go straight to the store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cardcore import limits
from cardcore.db import make_engine
from cardcore.ledger.model import Account, Op, Result
from cardcore.ledger.store import LedgerStore
from cardcore.ledger.writer import Writer
from cardcore.metrics import Metrics


class Ledger:
    def __init__(self, store: LedgerStore, writer: Writer) -> None:
        self.store = store
        self.writer = writer

    @classmethod
    def open(
        cls,
        db_url: str,
        metrics: Metrics,
        *,
        batch_size_max: int = limits.BATCH_SIZE_MAX_DEFAULT,
        batch_wait_ms_max: int = limits.BATCH_WAIT_MS_MAX_DEFAULT,
        queue_requests_max: int = limits.WRITER_QUEUE_REQUESTS_MAX,
    ) -> Ledger:
        store = LedgerStore(make_engine(db_url))
        writer = Writer(
            store,
            metrics,
            batch_size_max=batch_size_max,
            batch_wait_ms_max=batch_wait_ms_max,
            queue_requests_max=queue_requests_max,
        )
        return cls(store, writer)

    async def start(self) -> None:
        await self.writer.start()

    async def close(self, grace_s: int = limits.SHUTDOWN_GRACE_S) -> None:
        await self.writer.stop(grace_s)
        await self.store.dispose()

    async def submit(self, ops: Sequence[Op]) -> list[Result]:
        return await self.writer.submit(ops)

    async def account(self, account_id: int) -> Account | None:
        return await self.store.account(account_id)

    async def entries(
        self, account_id: int, *, cursor: int | None, limit: int, newest_first: bool
    ) -> list[dict[str, Any]]:
        return await self.store.entries(
            account_id, cursor=cursor, limit=limit, newest_first=newest_first
        )

    async def journal_page(self, after: int, limit: int) -> list[dict[str, Any]]:
        return await self.store.journal_page(after, limit)
