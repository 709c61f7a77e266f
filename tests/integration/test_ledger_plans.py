"""The writer's reads on PostgreSQL probe their indexes whatever the table's statistics
say: a journal of many transfers, never analyzed (a new database, or autovacuum off as on
this machine), costs a probe per key or id asked for, not a pass over the table
(docs/benchmarks.md, sixth session)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from cardcore.db import Statement, make_engine
from cardcore.ledger import schema
from cardcore.ledger.service import Ledger
from cardcore.ledger.store import (
    WriterSession,
    by_client_keys,
    given_back,
    holds_by_id,
)
from cardcore.metrics import Metrics
from tests.helpers import sql_execute

ROWS = 20_000  # transfers already in the journal (the INSERTs below)
ASKED = 200  # keys or ids in one lookup

_JOURNAL = (
    # No autovacuum may analyze the table behind the test's back.
    "ALTER TABLE ledger_transfers SET (autovacuum_enabled = false)",
    "INSERT INTO ledger_batches (seq, prev_hash, hash, ops, committed_at_ms) "
    "VALUES (1, repeat('0', 64), repeat('1', 64), 1, 0)",
    # 19,900 posted transfers of one client (ids 1..19900, keys k-1..k-19900), then 50
    # posts resolving holds 1..50 and 50 refunds of transfers 51..100.
    "INSERT INTO ledger_transfers (id, client, key, kind, asset, postings, reason, "
    "metadata, seq, created_at_ms) "
    "SELECT g, 'pos', 'k-' || g, 'posted', 'CNY', '[]', '', '{}', 1, 0 "
    "FROM generate_series(1, 19900) AS g",
    "INSERT INTO ledger_transfers (id, client, key, kind, asset, postings, pending_id, "
    "reason, metadata, seq, created_at_ms) "
    "SELECT 19900 + g, 'pos', 'p-' || g, 'post', 'CNY', '[]', g, '', '{}', 1, 0 "
    "FROM generate_series(1, 50) AS g",
    "INSERT INTO ledger_transfers (id, client, key, kind, asset, postings, target_id, "
    "reason, metadata, seq, created_at_ms) "
    "SELECT 19950 + g, 'pos', 'r-' || g, 'refund', 'CNY', '[]', 50 + g, '', '{}', 1, 0 "
    "FROM generate_series(1, 50) AS g",
)


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


def _examined(nodes: list[dict[str, Any]]) -> int:
    """Rows of the transfers table its scans looked at: returned or thrown away, in every
    loop (EXPLAIN gives the per-loop average)."""
    total = 0
    for n in nodes:
        if n.get("Relation Name") != "ledger_transfers" and not n.get("Index Name", "").startswith(
            ("uq_ledger_transfers", "pk_ledger_transfers", "ix_ledger_transfers")
        ):
            continue
        per_loop = (
            n.get("Actual Rows", 0)
            + n.get("Rows Removed by Filter", 0)
            + n.get("Rows Removed by Index Recheck", 0)
        )
        total += (per_loop + 1) * n.get("Actual Loops", 1)  # +1: a rounded-down average
    return total


async def _plan(db_url: str, clause: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    engine = make_engine(db_url, pool_size=1)
    try:
        statement = Statement(clause, engine.dialect)
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + statement.sql
            raw = await driver.fetchval(explain, *statement.args(params))
        return _nodes((json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"])
    finally:
        await engine.dispose()


LOOKUPS: dict[str, tuple[Callable[[], Any], dict[str, Any], int]] = {
    # name: (statement, parameters, rows it must find)
    "keys": (
        lambda: by_client_keys(schema.transfers, postgres=True),
        {"client": "pos", "keys": [f"k-{i}" for i in range(1, 301, 3)]
         + [f"new-{i}" for i in range(ASKED // 2)]},
        ASKED // 2,
    ),
    "holds": (lambda: holds_by_id(postgres=True), {"ids": list(range(1, ASKED + 1))}, ASKED),
    "given_back": (
        lambda: given_back(postgres=True), {"ids": list(range(1, ASKED + 1))}, 50
    ),
}  # fmt: skip


@pytest.mark.parametrize("lookup", sorted(LOOKUPS))
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_writer_reads_probe_the_index_without_statistics(db_url: str, lookup: str) -> None:
    await sql_execute(db_url, *_JOURNAL)
    build, params, found = LOOKUPS[lookup]
    nodes = await _plan(db_url, build(), params)
    assert nodes[0]["Actual Rows"] == found
    # A probe per value reads a row or two for each; a pass over the table reads ROWS.
    assert _examined(nodes) <= 4 * ASKED < ROWS, nodes


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_the_writer_warns_once_when_autovacuum_is_off(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            off = (await conn.exec_driver_sql("SHOW autovacuum")).scalar() != "on"
    finally:
        await engine.dispose()
    ledger = Ledger.open(db_url, Metrics())
    with caplog.at_level(logging.WARNING, logger="cardcore.ledger.store"):
        for _ in range(2):  # a writer that reconnects (recovery) does not warn again
            session, _state = await WriterSession.open(ledger.store)
            await session.close()
    await ledger.close()
    warned = [r for r in caplog.records if "autovacuum is off" in r.getMessage()]
    assert len(warned) == (1 if off else 0)
