"""POS holds of issued coupons on PostgreSQL are one statement (`schema.holds_sql`, the holds
of one turn of the event loop): each hold all of it or none of it, whatever refuses (the
code taken, the campaign ended or out of budget, the key stored already), a campaign's
redemptions of one statement within its budget together or not at all, and the guards hold
when many statements run at once."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import make_url

from cardcore.coupons.schema import Counted, Hold, holds_statement
from cardcore.records import Records
from tests.helpers import sql_execute

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)

CAMPAIGN = "C1"
REDEEMED = {
    "state": "redeemed", "reserved_key": None, "reserved_until_ms": None,
    "redeemed_key": "", "redeemed_at_ms": 5, "version": ("+", 1),
}  # fmt: skip
RESERVED = {"state": "reserved", "reserved_key": "", "reserved_until_ms": 99, "version": ("+", 1)}


def _campaign_sql(state: str = "active") -> str:
    return (
        "INSERT INTO coupon_campaigns (code, name, legal_entity, store, definition, state, "  # noqa: S608
        "issued_count, issued_value, redeemed_count, redeemed_value, store_cost, supplier_cost, "
        f"created_at_ms, updated_at_ms) VALUES ('{CAMPAIGN}', 'c', 'E1', '', '{{}}', '{state}', "
        "0, 0, 0, 0, 0, 0, 0, 0)"
    )


def _codes_sql(count: int, state: str = "issued") -> str:
    return (
        "INSERT INTO coupon_codes (code, campaign, source, state, valid_from_ms, valid_to_ms, "  # noqa: S608
        f"issued_at_ms, version) SELECT 'K' || g, '{CAMPAIGN}', 'generated', '{state}', 0, 10, "
        f"0, 0 FROM generate_series(1, {count}) AS g"
    )


def _redemption(key: str, code: str, discount: int = 100) -> dict[str, Any]:
    return {
        "key": key, "code": code, "campaign": CAMPAIGN, "member_id": None, "store": "S1",
        "terminal": "T0000001", "sale": "", "day": 1, "bill_fen": 1000,
        "discount_fen": discount, "forfeited_fen": 0, "store_cost_fen": discount,
        "supplier_cost_fen": 0, "supplier_id": "", "state": "redeemed", "created_at_ms": 5,
        "updated_at_ms": 5,
    }  # fmt: skip


def _counted(budget: int = 0, value: int = 100, read_at: int = 0) -> Counted:
    """What a redemption adds, its budget read from the campaign as `_campaign_sql` made it
    (updated_at_ms 0) unless `read_at` says otherwise."""
    return Counted(CAMPAIGN, budget, read_at, value, value * 7 // 10, value * 3 // 10)


async def _hold(
    records: Records, key: str, code: str, counted: Counted | None, values: dict[str, Any]
) -> tuple[int, int, int]:
    [got] = await _holds(records, [(key, code)], counted, values)
    return got


def _ask(key: str, code: str, counted: Counted | None, values: dict[str, Any]) -> Hold:
    own = {**values, "redeemed_key" if counted else "reserved_key": key}
    return Hold(own, _redemption(key, code), counted)


async def _holds(
    records: Records, asked: list[tuple[str, str]], counted: Counted | None,
    values: dict[str, Any],
) -> list[tuple[int, int, int]]:  # fmt: skip
    sql, args = holds_statement([_ask(key, code, counted, values) for key, code in asked])
    rows = await records.statement_rows(sql, args)
    return [(r["code"], r["campaign"], r["added"]) for r in rows]


async def _state(records: Records) -> dict[str, Any]:
    async with records.read() as uow:
        campaign = await uow.get("coupon_campaigns", code=CAMPAIGN)
        codes = await uow.find("coupon_codes", {"campaign": CAMPAIGN}, order="code", limit=1000)
        rows = await uow.find("coupon_redemptions", {"campaign": CAMPAIGN}, order="key", limit=1000)
    assert campaign is not None
    return {
        "counters": [
            campaign[c] for c in ("redeemed_count", "redeemed_value", "store_cost", "supplier_cost")
        ],
        "codes": {
            c["code"]: (c["state"], c["version"], c["redeemed_key"] or c["reserved_key"])
            for c in codes
        },
        "keys": [r["key"] for r in rows],
    }


async def test_a_redemption_takes_the_code_adds_its_row_and_counts_it(
    db_url: str, records: Records
) -> None:
    await sql_execute(db_url, _campaign_sql(), _codes_sql(1))
    assert await _hold(records, "t:1", "K1", _counted(), REDEEMED) == (1, 1, 1)
    assert await _state(records) == {
        "counters": [1, 100, 70, 30],
        "codes": {"K1": ("redeemed", 1, "t:1")},
        "keys": ["t:1"],
    }


async def test_a_reservation_takes_the_code_and_adds_its_row_without_counting(
    db_url: str, records: Records
) -> None:
    await sql_execute(db_url, _campaign_sql(), _codes_sql(1))
    assert await _hold(records, "t:1", "K1", None, RESERVED) == (1, 1, 1)
    after = await _state(records)
    assert after["counters"] == [0, 0, 0, 0]
    assert after["codes"] == {"K1": ("reserved", 1, "t:1")}
    assert await _hold(records, "t:2", "K1", None, RESERVED) == (0, 0, 0)
    assert await _state(records) == after


@pytest.mark.parametrize(
    ("campaign", "code", "stored", "counted", "expected"),
    [
        ("active", "redeemed", False, _counted(), (0, 0, 0)),  # taken by another
        ("active", "reserved", False, _counted(), (0, 0, 0)),
        ("ended", "issued", False, _counted(), (1, 0, 0)),
        ("paused", "issued", False, _counted(), (1, 0, 0)),
        ("active", "issued", False, _counted(budget=99), (1, 0, 0)),  # over the budget
        ("active", "issued", False, _counted(read_at=-1), (1, 0, 0)),  # changed since read
        ("active", "issued", True, _counted(), (1, 1, 0)),  # the key stored meanwhile
    ],
)
async def test_whatever_refuses_the_hold_changes_nothing(
    db_url: str, records: Records, campaign: str, code: str, stored: bool,
    counted: Counted, expected: tuple[int, int, int],
) -> None:  # fmt: skip
    await sql_execute(db_url, _campaign_sql(campaign), _codes_sql(2, code))
    if stored:  # a tombstone (its reversal came first) under the key, on the other code
        await sql_execute(
            db_url,
            "INSERT INTO coupon_redemptions (key, code, campaign, store, terminal, sale, day, "
            "bill_fen, discount_fen, forfeited_fen, store_cost_fen, supplier_cost_fen, "
            "supplier_id, state, created_at_ms, updated_at_ms) VALUES ('t:1', 'K2', "
            "'C1', 'S1', 'T0000001', '', 1, 0, 0, 0, 0, 0, '', 'reversed', 0, 0)",
        )
    before = await _state(records)
    assert await _hold(records, "t:1", "K1", counted, REDEEMED) == expected
    assert await _state(records) == before


async def test_many_at_once_on_one_code_exactly_one_takes_it(db_url: str, records: Records) -> None:
    await sql_execute(db_url, _campaign_sql(), _codes_sql(1))
    got = await asyncio.gather(
        *(_hold(records, f"t:{i}", "K1", _counted(), REDEEMED) for i in range(16))
    )
    assert sorted(got).count((1, 1, 1)) == 1
    assert sorted(got).count((0, 0, 0)) == 15
    after = await _state(records)
    assert after["counters"] == [1, 100, 70, 30]
    assert len(after["keys"]) == 1


async def test_many_at_once_on_one_campaign_stop_exactly_at_its_budget(
    db_url: str, records: Records
) -> None:
    await sql_execute(db_url, _campaign_sql(), _codes_sql(24))
    got = await asyncio.gather(
        *(_hold(records, f"t:{i}", f"K{i}", _counted(budget=1000), REDEEMED)
          for i in range(1, 25))
    )  # fmt: skip
    assert got.count((1, 1, 1)) == 10
    assert got.count((1, 0, 0)) == 14
    after = await _state(records)
    assert after["counters"] == [10, 1000, 700, 300]
    assert len(after["keys"]) == 10
    assert sum(state == "redeemed" for state, _, _ in after["codes"].values()) == 10


async def test_a_code_changed_while_the_hold_waited_is_taken_from_its_newest_version(
    db_url: str, records: Records
) -> None:
    """Another transaction holds the code (and raises the campaign) while the statement
    waits: once it commits, the statement re-checks the newest rows and builds on them."""
    await sql_execute(db_url, _campaign_sql(), _codes_sql(1))
    dsn = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    other = await asyncpg.connect(dsn)
    try:
        async with other.transaction():
            await other.execute("UPDATE coupon_codes SET version = version + 5 WHERE code = 'K1'")
            hold = asyncio.create_task(_hold(records, "t:1", "K1", _counted(), REDEEMED))
            await asyncio.sleep(0.3)
            assert not hold.done()  # waiting for the code's lock
            await other.execute(
                "UPDATE coupon_campaigns SET redeemed_count = 4, redeemed_value = 50"
            )
        assert await hold == (1, 1, 1)
    finally:
        await other.close()
    after = await _state(records)
    assert after["codes"] == {"K1": ("redeemed", 6, "t:1")}
    assert after["counters"] == [5, 150, 70, 30]


# --- several holds in one statement ---------------------------------------------------------------


async def test_a_statement_of_many_redemptions_takes_each_code_and_counts_them_together(
    db_url: str, records: Records
) -> None:
    await sql_execute(db_url, _campaign_sql(), _codes_sql(3))
    asked = [("t:1", "K2"), ("t:2", "K1"), ("t:3", "K3")]
    assert await _holds(records, asked, _counted(), REDEEMED) == [(1, 1, 1)] * 3
    assert await _state(records) == {
        "counters": [3, 300, 210, 90],
        "codes": {"K1": ("redeemed", 1, "t:2"), "K2": ("redeemed", 1, "t:1"),
                  "K3": ("redeemed", 1, "t:3")},
        "keys": ["t:1", "t:2", "t:3"],
    }  # fmt: skip


async def test_in_one_statement_each_hold_is_answered_as_alone_and_only_the_free_code_moves(
    db_url: str, records: Records
) -> None:
    await sql_execute(db_url, _campaign_sql(), _codes_sql(3))
    assert await _hold(records, "t:0", "K1", _counted(), REDEEMED) == (1, 1, 1)
    before = await _state(records)
    asked = [("t:1", "K1"), ("t:0", "K2"), ("t:3", "K3"), ("t:4", "K9")]  # taken, key stored,
    got = await _holds(records, asked, _counted(), REDEEMED)  # free, no such code
    assert got == [(0, 0, 0), (1, 1, 0), (1, 1, 1), (0, 0, 0)]
    after = await _state(records)
    assert after["counters"] == [2, 200, 140, 60]
    assert after["codes"] == {**before["codes"], "K3": ("redeemed", 1, "t:3")}
    assert after["keys"] == ["t:0", "t:3"]


async def test_redemptions_of_one_statement_over_their_campaigns_budget_together_change_nothing(
    db_url: str, records: Records
) -> None:
    """Each would fit alone, not all three: the statement refuses the campaign for all of
    them (the service's transaction then decides each, exactly to the budget)."""
    await sql_execute(db_url, _campaign_sql(), _codes_sql(3))
    before = await _state(records)
    asked = [("t:1", "K1"), ("t:2", "K2"), ("t:3", "K3")]
    assert await _holds(records, asked, _counted(budget=250), REDEEMED) == [(1, 0, 0)] * 3
    assert await _state(records) == before


async def test_reservations_in_one_statement_hold_their_codes_without_counting(
    db_url: str, records: Records
) -> None:
    await sql_execute(db_url, _campaign_sql(), _codes_sql(2))
    got = await _holds(records, [("t:1", "K1"), ("t:2", "K2")], None, RESERVED)
    assert got == [(1, 1, 1), (1, 1, 1)]
    after = await _state(records)
    assert after["counters"] == [0, 0, 0, 0]
    assert after["codes"] == {"K1": ("reserved", 1, "t:1"), "K2": ("reserved", 1, "t:2")}


async def test_many_statements_of_many_redemptions_at_once_never_pass_the_budget(
    db_url: str, records: Records
) -> None:
    await sql_execute(db_url, _campaign_sql(), _codes_sql(40))
    batches = [[(f"t:{i}", f"K{i}") for i in range(start, start + 4)] for start in range(1, 41, 4)]
    got = await asyncio.gather(
        *(_holds(records, batch, _counted(budget=1000), REDEEMED) for batch in batches)
    )
    added = sum(row[2] for rows in got for row in rows)
    after = await _state(records)
    assert added == 8  # two statements of four fit; a third would pass the budget
    assert after["counters"] == [added, added * 100, added * 70, added * 30]
    assert len(after["keys"]) == added
    assert sum(state == "redeemed" for state, _, _ in after["codes"].values()) == added
