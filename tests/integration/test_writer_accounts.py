"""The writer keeps the accounts it committed in memory (`AccountCache`) and takes them from
there instead of reading them again, on SQLite and PostgreSQL: a later batch on the same
accounts reads none of them, and a batch whose commit was reported failed (it may have
committed all the same) never leaves a stale balance behind."""

from __future__ import annotations

from typing import Any

import pytest

from cardcore.ledger.model import Account, AccountFlags, AccountInfo, Balance
from cardcore.ledger.service import Ledger
from cardcore.ledger.store import LedgerStore, WriterSession
from cardcore.ledger.writer import AccountCache, LedgerUnavailable
from tests.helpers import move, setup_accounts, sql_rows


def _account(aid: int, credits: int = 0) -> Account:
    info = AccountInfo(aid, "CNY", "LE1", "card", str(aid), "stored_value", AccountFlags())
    return Account(info, Balance(credits_posted=credits))


def test_the_cache_keeps_the_most_recently_used_within_its_size() -> None:
    cache = AccountCache(3)
    cache.learn([_account(1), _account(2), _account(3)])
    cache.learn([_account(1, credits=5)])  # used again: now the newest
    cache.learn([_account(4)])
    assert list(cache.by_id) == [3, 1, 4]
    assert cache.by_id[1].balance.credits_posted == 5
    cache.learn(_account(i) for i in range(10, 20))
    assert list(cache.by_id) == [17, 18, 19]
    cache.clear()
    assert cache.by_id == {}
    with pytest.raises(ValueError, match="at least 0"):
        AccountCache(-1)
    empty = AccountCache(0)
    empty.learn([_account(1)])
    assert empty.by_id == {}


async def _reads_of_accounts(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> list[list[int]]:
    """The account ids each batch of the writer read from the database, from now on."""
    reads: list[list[int]] = []
    select = LedgerStore._select

    async def spy(self: LedgerStore, reader: Any, name: str, *args: Any) -> Any:
        rows = await select(self, reader, name, *args)
        if name == "accounts_by_id":
            reads.append(sorted(int(r["id"]) for r in rows))
        return rows

    monkeypatch.setattr(LedgerStore, "_select", spy)
    return reads


async def test_a_batch_takes_the_accounts_the_writer_committed_without_reading_them(
    db_url: str, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, (a, b) = await setup_accounts(ledger, 2, funding=1_000)
    [first] = await ledger.submit([move("m-1", a, b, 300)])
    assert first.ok
    reads = await _reads_of_accounts(ledger, monkeypatch)
    [second] = await ledger.submit([move("m-2", a, b, 300)])
    [third] = await ledger.submit([move("m-3", b, source, 50)])
    assert second.ok and third.ok
    assert reads == []  # every account of both batches came from the writer's memory
    cached = ledger.writer.accounts.by_id
    assert cached[a].balance.debits_posted == 600
    assert cached[b].balance.credits_posted == 1_600 and cached[b].balance.debits_posted == 50
    rows = await sql_rows(
        db_url, "SELECT id, debits_posted, credits_posted, version FROM ledger_accounts"
    )
    for row in rows:  # what it holds is what the database holds
        if row["id"] in cached:
            balance = cached[row["id"]].balance
            assert (balance.debits_posted, balance.credits_posted, balance.version) == (
                row["debits_posted"], row["credits_posted"], row["version"],
            )  # fmt: skip


async def test_an_account_the_writer_does_not_hold_is_read(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, (a, b) = await setup_accounts(ledger, 2, funding=1_000)
    ledger.writer.accounts.by_id.pop(b)
    reads = await _reads_of_accounts(ledger, monkeypatch)
    [result] = await ledger.submit([move("m-1", a, b, 300)])
    assert result.ok
    assert reads == [[b]]
    assert ledger.writer.accounts.by_id[b].balance.credits_posted == 1_300


async def test_a_commit_reported_failed_that_landed_leaves_no_stale_balance(
    db_url: str, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write commits, then the writer hears an error (a connection lost as COMMIT was
    answered): the batch's callers are told it failed, the writer reconnects, and the next
    batch must see the balance the database holds, not the one remembered before it."""
    _, (a, b) = await setup_accounts(ledger, 2, funding=100)
    write = WriterSession.write_batch
    calls = 0

    async def lost_answer(self: WriterSession, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        await write(self, *args, **kwargs)
        raise ConnectionResetError("the answer to COMMIT was lost")

    monkeypatch.setattr(WriterSession, "write_batch", lost_answer)
    with pytest.raises(LedgerUnavailable):
        await ledger.submit([move("m-1", a, b, 60)])
    monkeypatch.setattr(WriterSession, "write_batch", write)
    assert calls == 1
    [again] = await ledger.submit([move("m-2", a, b, 60)])
    assert again.code == "exceeds_credits"  # 40 left, not 100
    [retry] = await ledger.submit([move("m-1", a, b, 60)])
    assert retry.ok and retry.replayed  # the first attempt did land
    [row] = await sql_rows(
        db_url, "SELECT debits_posted, credits_posted FROM ledger_accounts WHERE id = :i", i=a
    )
    assert (row["debits_posted"], row["credits_posted"]) == (60, 100)
