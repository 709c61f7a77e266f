"""The writer keeps the accounts it committed in memory (`AccountCache`) and takes them from
there instead of reading them again, on SQLite and PostgreSQL: a later batch on the same
accounts reads none of them, and a batch whose commit was reported failed (it may have
committed all the same) never leaves a stale balance behind."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from cardcore.ledger.model import Account, AccountFlags, AccountInfo, Balance, Op, SetAccountFrozen
from cardcore.ledger.service import Ledger
from cardcore.ledger.store import LedgerStore, WriterLockError, WriterSession
from cardcore.ledger.writer import AccountCache, LedgerUnavailable
from cardcore.metrics import Metrics
from tests.helpers import move, setup_accounts, sql_execute, sql_rows


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


async def _reads_of_accounts(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
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


async def _held_as_stored(db_url: str, ledger: Ledger) -> None:
    """Every account the writer holds is what the database holds: balances, version, flags."""
    held = ledger.writer.accounts.by_id
    rows = await sql_rows(db_url, "SELECT * FROM ledger_accounts")
    assert any(row["id"] in held for row in rows)
    for row in rows:
        account = held.get(row["id"])
        if account is None:
            continue
        b, flags = account.balance, account.info.flags
        assert (
            b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending, b.version,
            flags.debit_frozen, flags.credit_frozen,
        ) == (
            row["debits_posted"], row["credits_posted"], row["debits_pending"],
            row["credits_pending"], row["version"], bool(row["debit_frozen"]),
            bool(row["credit_frozen"]),
        ), row  # fmt: skip


async def test_pipelined_batches_with_lost_commits_keep_memory_and_journal_true(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small batches, so that (on PostgreSQL) most are decided while the one before is
    still being written, over shared accounts; one write in ten fails, half of them after
    their COMMIT. What the writer holds stays what the database holds, and the journal
    verifies."""
    ledger = Ledger.open(db_url, Metrics(), batch_size_max=3, batch_wait_ms_max=0)
    await ledger.start()
    try:
        source, wallets = await setup_accounts(ledger, 5, funding=5_000)
        write = WriterSession.write_batch
        rng = random.Random(11)
        lost = 0

        async def flaky(self: WriterSession, *args: Any, **kwargs: Any) -> None:
            nonlocal lost
            roll = rng.random()
            await asyncio.sleep(0.002)  # time for the next batch to be decided meanwhile
            if roll < 0.05:
                raise ConnectionResetError("the write failed")
            await write(self, *args, **kwargs)
            if roll < 0.10:
                lost += 1
                raise ConnectionResetError("the answer to COMMIT was lost")

        monkeypatch.setattr(WriterSession, "write_batch", flaky)
        monkeypatch.setattr("cardcore.limits.WRITER_RECOVERY_SLEEP_MS", 1)

        async def worker(w: int) -> None:
            for i in range(40):
                a, b = rng.sample([*wallets, source], 2)
                ops: list[Op] = [move(f"w{w}-{i}", a, b, rng.randint(1, 2_500))]
                if rng.random() < 0.1:
                    ops = [SetAccountFrozen(a, debit_frozen=rng.random() < 0.3)]
                for _ in range(5):
                    try:
                        await ledger.submit(ops)
                        break
                    except LedgerUnavailable:
                        await asyncio.sleep(0.003)

        await asyncio.gather(*(worker(w) for w in range(10)))
        monkeypatch.setattr(WriterSession, "write_batch", write)
        assert lost >= 3
        await _held_as_stored(db_url, ledger)
    finally:
        await ledger.close()
    checker = Ledger.open(db_url, Metrics())
    try:
        assert (await checker.store.verify(1_000)).last_seq > 20
    finally:
        await checker.close()


async def test_a_batch_committed_behind_the_writers_back_makes_it_forget(
    db_url: str, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch row the writer did not write (another writer's) fails the writer's next
    batch before anything is decided from memory; the writer reloads, reads the accounts
    again and goes on."""
    _, (a, b) = await setup_accounts(ledger, 2, funding=100)
    seq = ledger.writer.last_seq
    foreign = f"VALUES ({seq + 1}, '{'0' * 64}', '{'1' * 64}', 0, 0)"
    columns = "(seq, prev_hash, hash, ops, committed_at_ms)"
    await sql_execute(db_url, f"INSERT INTO ledger_batches {columns} {foreign}")
    reads = await _reads_of_accounts(ledger, monkeypatch)
    with pytest.raises(LedgerUnavailable):
        await ledger.submit([move("m-1", a, b, 10)])
    [result] = await ledger.submit([move("m-1", a, b, 10)])
    assert result.ok and not result.replayed
    assert reads == [sorted((a, b))]  # forgotten, read again
    assert ledger.writer.last_seq == seq + 2


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_second_writer_on_sqlite_is_refused_while_the_first_runs(
    db_url: str, ledger: Ledger
) -> None:
    """SQLite had no writer lock: two servers on one file each ran a writer and failed each
    other's batches (an operations review saw 503s while /readyz said ready). The lock
    file beside the database keeps a second writer out, as PostgreSQL's advisory lock does,
    and is free again once the first stops. (A batch committed behind a writer's back all
    the same is still seen first: the test above.)"""
    _, (a,) = await setup_accounts(ledger, 1, funding=100)
    other = Ledger.open(db_url, Metrics(), batch_wait_ms_max=1)
    with pytest.raises(WriterLockError):
        await other.start()
    await other.close()
    path = Path(make_url(db_url).database or "")
    link = path.with_name("another-name.db")
    link.symlink_to(path)  # the same file by another path meets the same lock
    linked = Ledger.open(f"sqlite:///{link}", Metrics(), batch_wait_ms_max=1)
    with pytest.raises(WriterLockError):
        await linked.start()
    await linked.close()
    await ledger.close()
    after = Ledger.open(db_url, Metrics(), batch_wait_ms_max=1)
    await after.start()
    try:
        [frozen] = await after.submit([SetAccountFrozen(a, debit_frozen=True)])
        assert frozen.ok and not frozen.replayed
    finally:
        await after.close()


async def test_a_batch_the_database_refuses_writes_nothing_of_itself(
    db_url: str, ledger: Ledger
) -> None:
    """The batch is all or nothing (on PostgreSQL one statement): a row in the way of one
    of its inserts (an outbox id taken behind the writer's back) leaves no batch, transfer,
    entry or balance of it; the writer reloads its ids and the retry lands."""
    _, (a, b) = await setup_accounts(ledger, 2, funding=100)

    async def counts() -> dict[str, int]:
        out = {}
        for table in ("ledger_batches", "ledger_transfers", "ledger_entries"):
            [row] = await sql_rows(db_url, f"SELECT count(*) AS n FROM {table}")  # noqa: S608
            out[table] = int(row["n"])
        return out

    before = await counts()
    [taken] = await sql_rows(db_url, "SELECT max(id) + 1 AS id FROM ledger_outbox")
    row_in_the_way = f"VALUES ({int(taken['id'])}, 0, 'foreign', 0)"
    columns = "(id, seq, event, transfer_id)"
    await sql_execute(db_url, f"INSERT INTO ledger_outbox {columns} {row_in_the_way}")
    with pytest.raises(LedgerUnavailable):
        await ledger.submit([move("m-1", a, b, 60)])
    assert await counts() == before
    [row] = await sql_rows(db_url, "SELECT debits_posted FROM ledger_accounts WHERE id = :i", i=a)
    assert row["debits_posted"] == 0
    [retry] = await ledger.submit([move("m-1", a, b, 60)])
    assert retry.ok and not retry.replayed


async def test_a_restarted_writer_never_dates_a_batch_before_the_last_one(db_url: str) -> None:
    """The clock of the machine that takes over is an hour behind: its first batch is dated
    no earlier than the journal's last (batch times, hold expiries and the hash chain follow
    commit order)."""
    first = Ledger.open(db_url, Metrics(), batch_wait_ms_max=1)
    await first.start()
    source, [wallet] = await setup_accounts(first, 1, funding=100)
    await first.submit([move("before", source, wallet, 1)])
    await first.close()
    [last] = await sql_rows(db_url, "SELECT max(committed_at_ms) AS t FROM ledger_batches")
    second = Ledger.open(db_url, Metrics(), batch_wait_ms_max=1)
    second.writer._clock_ms = lambda: int(last["t"]) - 3_600_000
    await second.start()
    try:
        await second.submit([move("after", source, wallet, 1)])
    finally:
        await second.close()
    rows = await sql_rows(db_url, "SELECT committed_at_ms AS t FROM ledger_batches ORDER BY seq")
    times = [int(r["t"]) for r in rows]
    assert times == sorted(times) and times[-1] >= int(last["t"])
