"""`Directory`'s reads and writes of POS transaction keys, on SQLite and PostgreSQL: a claim
keeps its first function, claims made at once agree on one function per key, and the keys
the ledger holds are told apart from a reversal's tombstone. On PostgreSQL a call's claims
are one statement (`schema.CLAIM_SQL`) and its reads run at the driver without a
transaction (docs/benchmarks.md, fifteenth session)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from cardcore.cards import schema
from cardcore.cards.directory import Directory
from cardcore.cards.model import POS_CLIENT
from cardcore.db import make_engine
from cardcore.ledger.decide import TOMBSTONE_CODE
from tests.helpers import sql_execute


@pytest.fixture
async def directory(db_url: str) -> AsyncIterator[Directory]:
    engine = make_engine(db_url, pool_size=8)
    try:
        yield Directory(engine)
    finally:
        await engine.dispose()


async def test_a_claim_keeps_its_first_function(directory: Directory) -> None:
    assert await directory.claimed(["T1/1/000001/000001"]) == {}
    first = await directory.claim_keys(
        {"T1/1/000001/000001": "coupon", "T1/1/000001/000002": "points"}, 1
    )
    assert first == {"T1/1/000001/000001": "coupon", "T1/1/000001/000002": "points"}
    again = await directory.claim_keys(
        {"T1/1/000001/000001": "service", "T1/1/000001/000003": "manager"}, 2
    )
    assert again == {"T1/1/000001/000001": "coupon", "T1/1/000001/000003": "manager"}
    assert await directory.claimed(
        ["T1/1/000001/000001", "T1/1/000001/000003", "T1/1/000001/000009"]
    ) == {"T1/1/000001/000001": "coupon", "T1/1/000001/000003": "manager"}


async def test_claims_made_at_once_agree_on_one_function_per_key(directory: Directory) -> None:
    keys = [f"T2/1/000001/{n:06d}" for n in range(1, 21)]
    functions = ("coupon", "points", "service", "manager")
    answers = await asyncio.gather(
        *(
            directory.claim_keys({k: functions[(i + j) % 4] for j, k in enumerate(keys)}, i)
            for i in range(len(functions))
        )
    )
    stored = await directory.claimed(keys)
    assert sorted(stored) == keys
    for answer in answers:
        assert answer == stored  # every caller sees the one function each key stands for


async def test_ledger_keys_tell_a_tombstone_from_a_kept_decline(
    directory: Directory, db_url: str
) -> None:
    def failure(client: str, key: str, code: str) -> str:
        return (
            "INSERT INTO ledger_failures (client, key, request, code, seq, created_at_ms)"  # noqa: S608
            f" VALUES ('{client}', '{key}', '{{}}', '{code}', 0, 0)"
        )

    await sql_execute(
        db_url,
        failure(POS_CLIENT, "T3/1/000001/000001", "51"),  # a decline the ledger keeps
        failure(POS_CLIENT, "T3/1/000001/000002", TOMBSTONE_CODE),  # a reversal came first
        failure("other", "T3/1/000001/000003", "51"),  # another client's key
    )
    asked = ["T3/1/000001/000001", "T3/1/000001/000002", "T3/1/000001/000003"]
    assert await directory.ledger_keys(asked) == {"T3/1/000001/000001"}
    # A key the ledger holds is never claimed: it stands for "money". A tombstone's key and
    # another client's key are claimed as any other.
    claims = await directory.claim_keys(dict.fromkeys(asked, "coupon"), 1)
    assert claims == {
        "T3/1/000001/000001": "money",
        "T3/1/000001/000002": "coupon",
        "T3/1/000001/000003": "coupon",
    }
    assert await directory.claimed(asked) == {
        "T3/1/000001/000002": "coupon",
        "T3/1/000001/000003": "coupon",
    }


async def test_a_key_claimed_by_a_transaction_still_open_is_read_once_it_commits(
    directory: Directory, db_url: str
) -> None:
    """PostgreSQL: the claim statement waits for the other transaction's insert of the same
    key and skips it, and its snapshot, taken before that commit, does not see the claim;
    the claim is read again, so the caller learns the function the key stands for."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite takes the write lock at BEGIN: no claim is made meanwhile")
    other = make_engine(db_url, pool_size=1)
    try:
        async with other.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO pos_claims (key, function, created_at_ms)"
                    " VALUES ('T4/1/000001/000001', 'coupon', 0)"
                )
            )
            claiming = asyncio.ensure_future(
                directory.claim_keys({"T4/1/000001/000001": "points"}, 1)
            )
            await asyncio.sleep(0.3)
            assert not claiming.done()  # waiting for the open transaction
        assert await claiming == {"T4/1/000001/000001": "coupon"}
    finally:
        await other.dispose()


async def test_the_claim_statement_probes_each_key_on_tables_never_analyzed(db_url: str) -> None:
    """PostgreSQL: the ledger's keys are looked up one index probe per key even with no
    statistics (an EXISTS was planned as a hash of every POS key the ledger holds)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("one statement on PostgreSQL only")
    await sql_execute(
        db_url,
        "INSERT INTO ledger_failures (client, key, request, code, seq, created_at_ms)"  # noqa: S608
        f" SELECT '{POS_CLIENT}', 'K' || g, '{{}}', '51', 0, 0 FROM generate_series(1, 20000) g",
    )
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            args = [["K1", "K2", "X"], ["coupon"] * 3, 1, POS_CLIENT, TOMBSTONE_CODE, [], []]
            plan = [row[0] for row in await driver.fetch("EXPLAIN " + schema.CLAIM_SQL, *args)]
    finally:
        await engine.dispose()
    ledger = [line for line in plan if " on ledger_" in line]
    assert len(ledger) == 2, plan
    assert all("Index" in line and "Scan" in line for line in ledger), plan
    conditions = [line for line in plan if "Index Cond" in line and "client" in line]
    assert len(conditions) == 2 and all("key" in line for line in conditions), plan
