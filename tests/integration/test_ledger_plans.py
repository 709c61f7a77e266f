"""The writer's idempotency lookup on PostgreSQL probes the unique index whatever the
table's statistics say: a journal of many transfers under one client, never analyzed
(a new database, or autovacuum off as on this machine), costs a probe per key, not a
pass over the client's rows (docs/benchmarks.md, sixth session)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from cardcore.db import Statement, make_engine
from cardcore.ledger import schema
from cardcore.ledger.store import by_client_keys, warn_without_autovacuum
from tests.helpers import sql_execute

ROWS = 20_000  # transfers of one client already in the journal (the INSERT below)


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


async def _plan(db_url: str, keys: list[str]) -> list[dict[str, Any]]:
    engine = make_engine(db_url, pool_size=1)
    try:
        statement = Statement(by_client_keys(schema.transfers, postgres=True), engine.dialect)
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            args = statement.args({"client": "pos", "keys": keys})
            raw = await driver.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + statement.sql, *args)
        return _nodes((json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"])
    finally:
        await engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_key_lookup_probes_the_index_without_statistics(db_url: str) -> None:
    await sql_execute(
        db_url,
        # No autovacuum may analyze the table behind the test's back.
        "ALTER TABLE ledger_transfers SET (autovacuum_enabled = false)",
        "INSERT INTO ledger_batches (seq, prev_hash, hash, ops, committed_at_ms) "
        "VALUES (1, repeat('0', 64), repeat('1', 64), 1, 0)",
        "INSERT INTO ledger_transfers (id, client, key, kind, asset, postings, reason, "
        "metadata, seq, created_at_ms) "
        "SELECT g, 'pos', 'k-' || g, 'posted', 'CNY', '[]', '', '{}', 1, 0 "
        "FROM generate_series(1, 20000) AS g",
    )
    wanted = [f"k-{i}" for i in range(1, 301, 3)] + [f"new-{i}" for i in range(100)]
    nodes = await _plan(db_url, wanted)
    found = nodes[0]["Actual Rows"]
    assert found == 100  # the hundred keys that exist, and only those
    examined = sum(
        n.get("Actual Rows", 0) * n.get("Actual Loops", 1) + n.get("Rows Removed by Filter", 0)
        for n in nodes
        if n.get("Relation Name") == "ledger_transfers"
        or n.get("Index Name", "").startswith("uq_ledger_transfers")
    )
    # A probe per key finds at most the key itself; a pass over the client reads all ROWS.
    assert examined <= len(wanted) < ROWS, nodes


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_the_writer_warns_when_autovacuum_is_off(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            off = (await conn.exec_driver_sql("SHOW autovacuum")).scalar() != "on"
            await conn.commit()
            with caplog.at_level(logging.WARNING, logger="cardcore.ledger.store"):
                assert await warn_without_autovacuum(conn) is off
    finally:
        await engine.dispose()
    warned = [r for r in caplog.records if "autovacuum is off" in r.getMessage()]
    assert len(warned) == (1 if off else 0)
