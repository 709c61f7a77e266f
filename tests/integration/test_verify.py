"""`cardcore ledger verify` on SQLite and PostgreSQL: a clean journal passes with the right
counts, and each kind of tampering fails it with exit code 1, naming where.

The clean run is a real `python -m cardcore` process. The tampering cases call the same
`cardcore.cli.main` in this process (its return value is the exit code): one interpreter start
per case would cost most of this suite's time budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cardcore import cli, limits
from cardcore.db import make_engine
from cardcore.ledger import journal, schema
from cardcore.ledger.model import Refund, Reverse
from cardcore.ledger.service import Ledger
from cardcore.ledger.store import LedgerStore
from tests.helpers import (
    Activity,
    move,
    run_activity,
    run_cardcore,
    setup_accounts,
    sql_execute,
    sql_rows,
)

APPEND_ONLY = [t.name for t in schema.APPEND_ONLY_TABLES]


def _open_the_journal(db_url: str) -> list[str]:
    """What a tamperer with the table owner's rights does first: lift the triggers."""
    if db_url.startswith("postgresql"):
        return [f"ALTER TABLE {t} DISABLE TRIGGER {t}_append_only" for t in APPEND_ONLY]
    return [f"DROP TRIGGER {t}_no_{verb}" for t in APPEND_ONLY for verb in ("update", "delete")]


async def _activity(ledger: Ledger) -> Activity:
    activity = await run_activity(ledger)
    await ledger.close()  # nothing may write while the journal is read or changed
    return activity


def _verify_process(db_url: str, cwd: Path) -> tuple[int, dict[str, object], str]:
    done = run_cardcore("ledger", "verify", "--db", db_url, cwd=cwd, timeout_s=120)
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done
    return done.returncode, json.loads(lines[0]), done.stderr


async def _verify_in_process(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, dict[str, object], str]:
    for name in [n for n in os.environ if n.startswith("CARDCORE_")]:
        monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() configures logging for itself
    try:
        code = await asyncio.wait_for(
            asyncio.to_thread(cli.main, ["ledger", "verify", "--db", db_url]), timeout=30
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1, (out, err)
    return code, json.loads(lines[0]), err


async def test_verify_passes_a_real_journal_and_counts_its_batches(
    db_url: str, ledger: Ledger, tmp_path: Path
) -> None:
    await _activity(ledger)
    [batches] = await sql_rows(db_url, "SELECT count(*) AS n FROM ledger_batches")
    [entries] = await sql_rows(db_url, "SELECT count(*) AS n FROM ledger_entries")
    [accounts] = await sql_rows(db_url, "SELECT count(*) AS n FROM ledger_accounts")
    [last] = await sql_rows(db_url, "SELECT hash FROM ledger_batches ORDER BY seq DESC LIMIT 1")
    assert batches["n"] == ledger.writer.last_seq >= 13

    code, summary, stderr = _verify_process(db_url, tmp_path)

    assert code == 0, stderr
    assert summary == {
        "status": "ok",
        "batches": batches["n"],
        "entries": entries["n"],
        "accounts": accounts["n"],
        "last_hash": last["hash"],
    }


@dataclass(frozen=True, slots=True)
class Tamper:
    """Statements that change the stored journal or balances, and the place verify must name
    (a regular expression matched against its error line)."""

    statements: list[str]
    names: str


async def _entry_amount(db_url: str, a: Activity) -> Tamper:
    [e] = await sql_rows(
        db_url,
        "SELECT id, seq FROM ledger_entries WHERE transfer_id = :t ORDER BY id LIMIT 1",
        t=a.sale,
    )
    return Tamper(
        [f"UPDATE ledger_entries SET posted_delta = posted_delta + 1 WHERE id = {e['id']}"],  # noqa: S608
        rf"batch {e['seq']}\b",
    )


async def _batch_hash(db_url: str, a: Activity) -> Tamper:
    [t] = await sql_rows(db_url, "SELECT seq FROM ledger_transfers WHERE id = :t", t=a.sale)
    forged = "ab" * 32
    return Tamper(
        [f"UPDATE ledger_batches SET hash = '{forged}' WHERE seq = {t['seq']}"],  # noqa: S608
        rf"batch {t['seq']}\b",
    )


async def _batch_deleted(db_url: str, a: Activity) -> Tamper:
    [t] = await sql_rows(db_url, "SELECT seq FROM ledger_transfers WHERE id = :t", t=a.held)
    seq = t["seq"]
    return Tamper(
        [f"DELETE FROM ledger_batches WHERE seq = {seq}"],  # noqa: S608
        rf"batch {seq + 1}\b.*gap",
    )


async def _account_balance(_db_url: str, a: Activity) -> Tamper:
    wallet = a.wallets[1]
    return Tamper(
        [f"UPDATE ledger_accounts SET credits_posted = credits_posted + 1 WHERE id = {wallet}"],  # noqa: S608
        rf"account {wallet}\b",
    )


async def _transfer_metadata(db_url: str, a: Activity) -> Tamper:
    [t] = await sql_rows(db_url, "SELECT seq FROM ledger_transfers WHERE id = :t", t=a.sale)
    return Tamper(
        [
            'UPDATE ledger_transfers SET metadata = \'{"store":"S9"}\' '  # noqa: S608
            f"WHERE id = {a.sale}"
        ],
        rf"batch {t['seq']}\b",
    )


async def _forged_entry_after_the_last_batch(db_url: str, a: Activity) -> Tamper:
    """An entry appended (INSERT is allowed) with a seq no batch has: the API's entry list
    would show it, so the journal no longer matches its hash chain."""
    [top] = await sql_rows(db_url, "SELECT max(id) AS id FROM ledger_entries")
    [last] = await sql_rows(db_url, "SELECT max(seq) AS seq FROM ledger_batches")
    entry_id, seq = top["id"] + 1, last["seq"] + 1
    return Tamper(
        [
            "INSERT INTO ledger_entries (id, seq, transfer_id, account_id, side, posted_delta,"  # noqa: S608
            " pending_delta, debits_posted, credits_posted, debits_pending, credits_pending,"
            f" version) VALUES ({entry_id}, {seq}, {a.sale}, {a.wallets[0]}, 'credit',"
            " 1000000, 0, 0, 1000000, 0, 0, 99)"
        ],
        rf"(batch {seq}|entry {entry_id})\b",
    )


async def _account_asset(_db_url: str, a: Activity) -> Tamper:
    """The stored account says PTS while the journal created it in CNY."""
    wallet = a.wallets[1]
    return Tamper(
        [f"UPDATE ledger_accounts SET asset = 'PTS' WHERE id = {wallet}"],  # noqa: S608
        rf"account {wallet}\b",
    )


TAMPERING: dict[str, Callable[[str, Activity], Awaitable[Tamper]]] = {
    "entry-amount": _entry_amount,
    "batch-hash": _batch_hash,
    "batch-deleted": _batch_deleted,
    "account-balance": _account_balance,
    "transfer-metadata": _transfer_metadata,
    "forged-entry-after-the-last-batch": _forged_entry_after_the_last_batch,
    "account-asset": _account_asset,
}


@pytest.mark.parametrize("rows", ["default", "2"])
@pytest.mark.parametrize("kind", TAMPERING)
async def test_verify_fails_with_exit_1_naming_the_tampered_place(
    db_url: str,
    ledger: Ledger,
    kind: str,
    rows: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Also read two rows of a table at a time: a tampered place is named whichever chunk
    holds it, and a deleted batch between two chunks is still a gap."""
    if rows != "default":
        monkeypatch.setattr(limits, "VERIFY_CHUNK_ROWS_MAX", int(rows))
    activity = await _activity(ledger)
    tamper = await TAMPERING[kind](db_url, activity)
    await sql_execute(db_url, *_open_the_journal(db_url), *tamper.statements)

    code, summary, stderr = await _verify_in_process(db_url, capsys, monkeypatch)

    assert code == 1, (summary, stderr)
    assert summary["status"] == "mismatch"
    [line] = stderr.splitlines()
    assert line.startswith("cardcore: error: journal verification failed: "), line
    assert re.search(tamper.names, line), (tamper.names, line)


# --- memory: bounded reads, one family of give-backs at a time (verify review) --------------

_BOUNDED = ("account_events", "transfers", "entries", "failures")


async def test_verify_reads_chunks_bounded_in_rows_whatever_the_batches(
    db_url: str, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With at most 6 rows of a table per read, the journal is read in many chunks of
    consecutive batches, each within the bound but for a batch bigger than it (16 entries),
    read alone; the accounts a page of 6 at a time; and the replay is the one a single read
    gives. The reversals and refunds are checked one family at a time."""
    _source, wallets = await setup_accounts(ledger, 9, funding=100_000)
    a, b, c = wallets[:3]
    for i in range(12):
        assert all(r.ok for r in await ledger.submit([move(f"s-{i}", a, b, 100)]))
    assert all(r.ok for r in await ledger.submit([move(f"big-{i}", b, c, 10) for i in range(8)]))
    for op in (
        Refund("test", "r-1", "s-1", 30),
        Reverse("test", "v-r-1", "r-1"),  # a refund's reversal: its sale's family
        Reverse("test", "v-2", "s-2"),
        Reverse("test", "v-v-2", "v-2"),  # a reversal's reversal: the sale stands again
        Refund("test", "r-3", "s-3", 10),
        Refund("test", "r-0", "s-0", 50),
    ):
        [result] = await ledger.submit([op])
        assert result.ok, result
    await ledger.close()
    reads: list[tuple[int, dict[str, int]]] = []
    read = LedgerStore._batch_rows

    async def counted(conn: Any, headers: list[dict[str, Any]]) -> Any:
        by_seq = await read(conn, headers)
        rows = {name: sum(len(batch[name]) for batch in by_seq.values()) for name in _BOUNDED}
        reads.append((len(headers), rows))
        return by_seq

    monkeypatch.setattr(LedgerStore, "_batch_rows", staticmethod(counted))
    store = LedgerStore(make_engine(db_url, pool_size=1))
    try:
        bounded = await store.verify(limits.VERIFY_CHUNK_BATCHES, 6)
        chunks = list(reads)
        whole = await store.verify(limits.VERIFY_CHUNK_BATCHES)
    finally:
        await store.engine.dispose()

    assert len(reads) - len(chunks) == 1  # the default bound reads this journal at once
    assert len(chunks) > 5
    assert sum(batches for batches, _ in chunks) == bounded.batches
    assert all(batches == 1 or max(rows.values()) <= 6 for batches, rows in chunks), chunks
    assert (1, 8, 16) in [(n, rows["transfers"], rows["entries"]) for n, rows in chunks]
    for got in (bounded, whole):
        assert got.given_backs == 6
        assert len(got.balances) == len(got.infos) == 10
    assert (bounded.batches, bounded.entries, bounded.prev_hash) == (
        whole.batches, whole.entries, whole.prev_hash,
    )  # fmt: skip
    # what is left of the give-backs is the last family's (the fourth sale's: one refund)
    assert bounded.family is not None and len(bounded.refunded) == 1
    assert not (bounded.reversal_of or bounded.undone or bounded.ever_reversed)


class _Families(journal.Verifier):
    """Records the give-backs in the order `LedgerStore.verify` hands them over."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def given_back(self, t: journal.Row) -> None:
        self.seen.append((t["root"], t["id"]))
        self.given_backs += 1


def _transfer_row(tid: int, kind: str, target: int | None = None) -> str:
    return (
        "INSERT INTO ledger_transfers (id, client, key, kind, asset, postings, reason,"  # noqa: S608
        " metadata, seq, created_at_ms, target_id) VALUES"
        f" ({tid}, 'x', 'k{tid}', '{kind}', 'CNY', '[]', '', '{{}}', 1, 0,"
        f" {'NULL' if target is None else target})"
    )


async def test_give_backs_come_grouped_by_family_and_a_loop_is_a_mismatch(db_url: str) -> None:
    """The families query on the database: two sales whose give-backs interleave by id come
    one family after the other, each in id order (a chain of reversals down to its sale, an
    unknown target its own family); a pair of reversals of each other, which no chain of
    targets leads out of, is named, not skipped."""
    await sql_execute(
        db_url,
        _transfer_row(1, "posted"),
        _transfer_row(2, "posted"),
        _transfer_row(3, "refund", 2),
        _transfer_row(4, "refund", 1),
        _transfer_row(5, "reverse", 4),
        _transfer_row(6, "reverse", 5),
        _transfer_row(7, "reverse", 2),
        _transfer_row(8, "refund", 99),
    )
    store = LedgerStore(make_engine(db_url, pool_size=1))
    try:
        families = _Families()
        async with store._snapshot() as conn:
            await store._verify_given_back(conn, families)
        assert families.seen == [(1, 4), (1, 5), (1, 6), (2, 3), (2, 7), (99, 8)]

        await sql_execute(db_url, _transfer_row(9, "reverse", 10), _transfer_row(10, "reverse", 9))
        async with store._snapshot() as conn:
            with pytest.raises(journal.Mismatch, match="transfer 9: gives back transfer 10, "):
                await store._verify_given_back(conn, _Families())
    finally:
        await store.engine.dispose()
