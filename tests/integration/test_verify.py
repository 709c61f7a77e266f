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

import pytest

from cardcore import cli
from cardcore.ledger import schema
from cardcore.ledger.service import Ledger
from tests.helpers import Activity, run_activity, run_cardcore, sql_execute, sql_rows

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


@pytest.mark.parametrize("kind", TAMPERING)
async def test_verify_fails_with_exit_1_naming_the_tampered_place(
    db_url: str,
    ledger: Ledger,
    kind: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    activity = await _activity(ledger)
    tamper = await TAMPERING[kind](db_url, activity)
    await sql_execute(db_url, *_open_the_journal(db_url), *tamper.statements)

    code, summary, stderr = await _verify_in_process(db_url, capsys, monkeypatch)

    assert code == 1, (summary, stderr)
    assert summary["status"] == "mismatch"
    [line] = stderr.splitlines()
    assert line.startswith("cardcore: error: journal verification failed: "), line
    assert re.search(tamper.names, line), (tamper.names, line)
