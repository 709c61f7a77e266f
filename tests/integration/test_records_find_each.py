"""`Unit.find_each`: the rows of each of a list of values, at most a bound each, on SQLite
and PostgreSQL; on PostgreSQL one index probe per value even on a table never analyzed
(the points holdings read fetched every points account of the group: docs/benchmarks.md,
eighth session)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cardcore import limits
from cardcore.db import Statement
from cardcore.points.model import Program
from cardcore.points.service import _holdings
from cardcore.records import Records, Unit
from tests.helpers import sql_execute

HOLDERS = 5_000  # points holders, four accounts each (three lots of PTS, one of MILES)


def _account(id_: int, asset: str, kind: str, owner: str, purpose: str) -> dict[str, Any]:
    return {
        "id": id_, "natural_key": f"n{id_}", "asset": asset, "legal_entity": "E1",
        "owner_kind": kind, "owner_id": owner, "purpose": purpose, "no_overdraft": True,
        "no_overcredit": False, "debit_frozen": False, "credit_frozen": False,
        "debits_posted": 0, "credits_posted": 0, "debits_pending": 0, "credits_pending": 0,
        "version": 0, "created_seq": 0,
    }  # fmt: skip


async def _holders(records: Records, holders: int) -> None:
    """Holder h has accounts 4h+1..4h+4: three lots of PTS, one of MILES; and a card
    account under the same owner id (another owner kind)."""
    lots = [
        _account(g, "MILES" if g % 4 == 0 else "PTS", "points", str((g - 1) // 4), f"lot:{g}")
        for g in range(1, holders * 4 + 1)
    ]
    cards = [_account(10**6 + h, "PTS", "card", str(h), "value") for h in range(holders)]
    assets = [{"code": c, "kind": "points", "scale": 0, "name": c, "seq": 0}
              for c in ("PTS", "MILES")]  # fmt: skip
    await records.insert_together({"ledger_assets": assets, "ledger_accounts": lots + cards})


async def test_each_value_gets_its_matching_rows_up_to_the_bound(
    db_url: str, records: Records
) -> None:
    await _holders(records, 20)
    where = {"owner_kind": "points", "asset": ["PTS"]}
    async with records.read() as uow:
        rows = await uow.find_each("ledger_accounts", "owner_id", ["3", "7", "7", "99"], where,
                                   limit_each=10)  # fmt: skip
        bounded = await uow.find_each("ledger_accounts", "owner_id", ["3", "7"], where,
                                      limit_each=2)  # fmt: skip
        none = await uow.find_each("ledger_accounts", "owner_id", [], where, limit_each=2)
    assert sorted((r["owner_id"], r["id"]) for r in rows) == [
        ("3", 13), ("3", 14), ("3", 15), ("7", 29), ("7", 30), ("7", 31),
    ]  # fmt: skip
    assert all(r["owner_kind"] == "points" and r["asset"] == "PTS" for r in rows)
    assert sorted(r["owner_id"] for r in bounded) == ["3", "3", "7", "7"]
    assert none == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_each_value_is_one_probe_on_a_table_never_analyzed(
    db_url: str, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No autovacuum may analyze the table behind the test's back.
    await sql_execute(db_url, "ALTER TABLE ledger_accounts SET (autovacuum_enabled = false)")
    await _holders(records, HOLDERS)
    asked = [str(h) for h in range(0, HOLDERS, 50)]  # 100 holders
    seen: list[tuple[Statement, dict[str, Any]]] = []
    rows_of = Unit._rows

    async def keep(self: Unit, s: Statement, params: dict[str, Any]) -> Any:
        seen.append((s, params))
        return await rows_of(self, s, params)

    monkeypatch.setattr(Unit, "_rows", keep)
    where = {"owner_kind": "points", "asset": ["PTS"]}
    async with records.read() as uow:
        rows = await uow.find_each("ledger_accounts", "owner_id", asked, where, limit_each=10)
        assert len(rows) == 3 * len(asked)
        [(statement, params)] = seen
        assert uow.driver is not None
        raw = await uow.driver.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement.sql, *statement.args(params)
        )
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    examined = _examined(plan)
    # Three PTS lots and a MILES one per holder asked: four rows a probe, not all 20,000.
    assert examined <= 6 * len(asked), examined


def _examined(node: dict[str, Any]) -> int:
    """Rows of ledger_accounts the plan's scans looked at, returned or thrown away, in every
    loop (EXPLAIN gives the per-loop average)."""
    total = 0
    if "ledger_accounts" in (node.get("Relation Name", ""), node.get("Index Name", "")[:18]):
        per_loop = (
            node.get("Actual Rows", 0)
            + node.get("Rows Removed by Filter", 0)
            + node.get("Rows Removed by Index Recheck", 0)
        )
        total += (per_loop + 1) * node.get("Actual Loops", 1)
    return total + sum(_examined(child) for child in node.get("Plans", []))


async def test_a_holding_reads_each_program_of_a_holder_within_its_own_bound(
    records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder's lots of one program never crowd out its lots of another in one read
    (`points.service._holdings`, each holder one probe): the bound is per program."""
    monkeypatch.setattr(limits, "POINTS_OPEN_LOTS_MAX", 3)
    pts, miles = Program("CLUB", asset="PTS"), Program("AIR", asset="MILES")
    days = ["lot:20991231:0", "lot:20991130:0", "lot:20991031:0"]
    accounts = [_account(1 + i, "PTS", "points", "8", days[i]) for i in range(3)]
    accounts += [_account(10 + i, "MILES", "points", "8", days[i]) for i in range(2)]
    accounts += [_account(20 + i, "MILES", "points", "9", days[i]) for i in range(3)]
    accounts += [_account(30, "PTS", "points", "9", days[0])]
    assets = [{"code": c, "kind": "points", "scale": 0, "name": c, "seq": 0}
              for c in ("PTS", "MILES")]  # fmt: skip
    await records.insert_together({"ledger_assets": assets, "ledger_accounts": accounts})
    async with records.read() as uow:
        held = await _holdings(uow, [(pts, 8), (miles, 8), (pts, 9)])
    assert {key: len(h.lots) for key, h in held.items()} == {
        ("PTS", 8): 3, ("MILES", 8): 2, ("PTS", 9): 1,
    }  # fmt: skip


async def test_a_list_filter_never_matches_a_value_by_its_first_characters(
    records: Records,
) -> None:
    """A value longer than its column is compared whole: PostgreSQL's VARCHAR(n)[] cast
    would have cut it to the n characters of a stored row and matched that row."""
    stored = "h" * limits.NAME_CHARS_MAX
    assets = [{"code": "PTS", "kind": "points", "scale": 0, "name": "p", "seq": 0}]
    account = _account(1, "PTS", "points", stored, "lot:20991231:0")
    await records.insert_together({"ledger_assets": assets, "ledger_accounts": [account]})
    async with records.read() as uow:
        longer = await uow.find("ledger_accounts", {"owner_id": [stored + "x", "y"]})
        exact = await uow.find("ledger_accounts", {"owner_id": [stored, "y"]})
        counted = await uow.count("ledger_accounts", owner_id=[stored + "x"])
    assert longer == []
    assert [r["id"] for r in exact] == [1]
    assert counted == 0
