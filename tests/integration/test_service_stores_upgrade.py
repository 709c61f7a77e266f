"""Packages that recorded no stores (SQLite and PostgreSQL): code older than migration 0009
sells packages without `service_entitlements.stores` while a rolling upgrade runs. Such a
sale is accepted (0009 adds the column nullable, 0012 drops NOT NULL where 0009 once set
it), and the package redeems where its product does at each use, as that code read it;
the 0012 downgrade fills those packages from their product (else the selling store)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, inspect
from sqlalchemy.exc import IntegrityError

from cardcore import migrate
from cardcore.cards.model import Outcome
from cardcore.db import make_engine
from cardcore.ledger import schema
from cardcore.records import Unit
from cardcore.service_cards.http import SERVICE_CARDS_KEY
from tests.helpers import AdminClient, sql_execute, sql_rows
from tests.integration.test_schema import _compare
from tests.integration.test_service_cards import (
    PRODUCTS,
    counts,
    issue,
    pos,
    redemption,
    sell,
    world,
)

YEAR_MS = 366 * 86_400_000
COLUMNS = (
    "product, holder, member_id, store, uses_total, uses_left, price_fen, refund_policy, "
    "refund_fee_fen, single_use_price_fen, refund_after_expiry, sold_ms, expires_ms, state, "
    "sale_key, refund_key, refunded_fen, updated_at_ms"
)
DEFINITION = (
    '{{"price_fen": 5000, "refund_after_expiry": false, "refund_fee_fen": 0, '
    '"refund_policy": "pro_rata", "single_use_price_fen": 2500, "stores": {}, '
    '"uses": 2, "validity_months": 12}}'
)


def old_sale(product: str, holder: int, store: str, key: str, *, now_ms: int, id_: int = 0) -> str:
    """A package as code older than 0009 sells it: every column but `stores` (2 uses for
    5,000 fen, pro rata, valid a year); `id_` 0 = the next id."""
    id_column, id_value = ("id, ", f"{id_}, ") if id_ else ("", "")
    return (
        f"INSERT INTO service_entitlements ({id_column}{COLUMNS}) VALUES ({id_value}"  # noqa: S608
        f"'{product}', {holder}, NULL, '{store}', 2, 2, 5000, 'pro_rata', 0, 2500, FALSE, "
        f"{now_ms}, {now_ms + YEAR_MS}, 'active', '{store}/{key}', NULL, 0, {now_ms})"
    )


async def sold_by_old_code(
    admin: AdminClient, db_url: str, card: dict[str, Any], product: str, store: str = "S1"
) -> int:
    """The id of a package of `product` sold on `card` in `store` by code older than 0009."""
    [row] = await sql_rows(db_url, "SELECT account_id FROM cards WHERE id = :i", i=card["id"])
    key = f"old-{product}-{card['id']}"
    now_ms = admin.app[SERVICE_CARDS_KEY].clock_ms()
    await sql_execute(db_url, old_sale(product, int(row["account_id"]), store, key, now_ms=now_ms))
    [sold] = await sql_rows(db_url, "SELECT id, stores FROM service_entitlements "
                            "WHERE sale_key = :k", k=f"{store}/{key}")  # fmt: skip
    assert sold["stores"] is None
    return int(sold["id"])


async def stored_stores(db_url: str, package_id: int) -> Any:
    query = "SELECT stores FROM service_entitlements WHERE id = :i"
    [row] = await sql_rows(db_url, query, i=package_id)
    return row["stores"]


# --- the code: NULL reads the product's stores at the use ----------------------------------------


async def test_a_package_sold_by_older_code_redeems_in_its_products_stores_at_each_use(
    admin: AdminClient, db_url: str
) -> None:
    """SPA is redeemable in S1 only. A package of it sold by code older than 0009 (no
    `stores`) is listed with S1, refused in S2 as a package sold now is, approved in S1;
    once HQ widens SPA to S1 and S2 it redeems in S2 too (its product's stores at the use,
    as older code read them), while a package sold now keeps S1. Nothing is written back."""
    w = await world(admin)
    card, pan = w["card"], w["card"]["pan"]
    old = await sold_by_old_code(admin, db_url, card, "SPA")
    listed = await admin.ok("GET", f"/v1/cards/{card['id']}/service-packages")
    assert [(p["id"], p["stores"], p["uses_left"]) for p in listed["items"]] == [(old, ["S1"], 2)]

    later = await issue(admin, "S1")
    _, recorded = await sell(admin, later["id"], "SPA")
    assert recorded["stores"] == ["S1"]
    before = await counts(db_url)
    [wrong] = await pos(admin, redemption(w["t2"], pan, product="SPA"))
    [chosen] = await pos(admin, redemption(w["t2"], pan))  # "" = the card's choice
    [also] = await pos(admin, redemption(w["t2"], later["pan"], product="SPA"))
    refused = (Outcome.NOT_PERMITTED, "service_wrong_store")
    assert [(a.outcome, a.refusal) for a in (wrong, chosen, also)] == [refused] * 3
    assert await counts(db_url) == before  # refusals change nothing
    [here] = await pos(admin, redemption(w["t1"], pan, product="SPA"))
    assert (here.outcome, here.uses_left) == (Outcome.APPROVED, 1)

    await admin.ok("PATCH", f"{PRODUCTS}/SPA", json={"stores": ["S1", "S2"]})
    [wider] = await pos(admin, redemption(w["t2"], pan, product="SPA"))
    assert (wider.outcome, wider.uses_left) == (Outcome.APPROVED, 0)
    [kept] = await pos(admin, redemption(w["t2"], later["pan"], product="SPA"))
    assert (kept.outcome, kept.refusal) == refused
    listed = await admin.ok("GET", f"/v1/cards/{card['id']}/service-packages")
    assert [(p["id"], p["stores"]) for p in listed["items"]] == [(old, ["S1", "S2"])]
    assert await stored_stores(db_url, old) is None


async def test_a_package_sold_by_older_code_whose_product_is_gone_redeems_where_sold(
    admin: AdminClient, db_url: str
) -> None:
    """No product is ever deleted; should one be gone, its package that recorded no stores
    redeems where it was sold (0009's rule), and its refund answers with that store."""
    w = await world(admin)
    card, pan = w["card"], w["card"]["pan"]
    old = await sold_by_old_code(admin, db_url, card, "GONE")
    [wrong] = await pos(admin, redemption(w["t2"], pan, product="GONE"))
    assert (wrong.outcome, wrong.refusal) == (Outcome.NOT_PERMITTED, "service_wrong_store")
    [here] = await pos(admin, redemption(w["t1"], pan, product="GONE"))
    assert (here.outcome, here.uses_left) == (Outcome.APPROVED, 1)
    path = f"/v1/service-packages/{old}/refund"
    refunded = await admin.ok("POST", path, json={"key": "rf-old", "receipt": "R9"})
    assert (refunded["stores"], refunded["refund_fen"], refunded["state"]) == (
        ["S1"], 2_500, "refunded")  # fmt: skip
    again = await admin.ok("POST", path, json={"key": "rf-old", "receipt": "R9"})
    assert (again["stores"], again["refund_fen"], again["replayed"]) == (["S1"], 2_500, True)
    assert await stored_stores(db_url, old) is None


async def test_the_product_is_read_at_a_redemption_only_for_a_package_without_stores(
    admin: AdminClient, db_url: str, monkeypatch: Any
) -> None:
    """The POS path runs the statements it ran before for a package that recorded its
    stores (no product read); one that did not costs one read of its product more."""
    w = await world(admin)
    statements: list[str] = []
    tables: list[str] = []
    rows, find = Unit._rows, Unit.find

    async def counted_rows(self: Unit, *args: Any, **kwargs: Any) -> Any:
        statements.append("rows")
        return await rows(self, *args, **kwargs)

    async def noted_find(self: Unit, table: str, *args: Any, **kwargs: Any) -> Any:
        tables.append(table)
        return await find(self, table, *args, **kwargs)

    monkeypatch.setattr(Unit, "_rows", counted_rows)
    monkeypatch.setattr(Unit, "find", noted_find)

    async def redeem_counting(pan: str) -> tuple[int, list[str]]:
        statements.clear()
        tables.clear()
        [answer] = await pos(admin, redemption(w["t1"], pan, product="SPA"))
        assert (answer.outcome, answer.uses_left) == (Outcome.APPROVED, 1)
        return len(statements), list(tables)

    await sell(admin, w["card"]["id"], "SPA")
    await redeem_counting(w["card"]["pan"])  # the terminal is read once, then kept
    recorded = await issue(admin, "S1")
    _, sold = await sell(admin, recorded["id"], "SPA")
    assert sold["stores"] == ["S1"]
    reads_recorded, tables_recorded = await redeem_counting(recorded["pan"])
    assert "service_products" not in tables_recorded
    unrecorded = await issue(admin, "S1")
    await sold_by_old_code(admin, db_url, unrecorded, "SPA")
    reads_unrecorded, tables_unrecorded = await redeem_counting(unrecorded["pan"])
    assert tables_unrecorded == [*tables_recorded, "service_products"]
    assert reads_unrecorded == reads_recorded + 1


# --- the migrations ------------------------------------------------------------------------------


def _stores_column(db_url: str) -> dict[str, Any]:
    def column(conn: Connection) -> dict[str, Any]:
        [found] = [c for c in inspect(conn).get_columns("service_entitlements")
                   if c["name"] == "stores"]  # fmt: skip
        return dict(found)

    async def read() -> dict[str, Any]:
        engine = make_engine(db_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(column)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_after_0009_a_sale_by_older_code_is_accepted_with_its_stores_unrecorded(
    db_url: str,
) -> None:
    """0009 adds `stores` nullable with no default: a package older code sells after it
    (or while its fill runs) is accepted and stays NULL, never '[]' (every store)."""
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0008")
    asyncio.run(sql_execute(db_url, old_sale("SPA", 7, "S1", "before", now_ms=0, id_=1)))
    command.upgrade(config, "0009")
    column = _stores_column(db_url)
    assert (column["nullable"], column["default"]) == (True, None)
    asyncio.run(sql_execute(db_url, old_sale("SPA", 7, "S1", "after", now_ms=0, id_=2)))
    rows = asyncio.run(sql_rows(db_url, "SELECT id, stores FROM service_entitlements "
                                "ORDER BY id"))  # fmt: skip
    assert [(r["id"], r["stores"]) for r in rows] == [(1, '["S1"]'), (2, None)]  # product gone
    command.upgrade(config, "head")
    assert asyncio.run(_compare(db_url, schema.metadata)) == []


def test_the_0012_downgrade_fills_unrecorded_stores_and_the_upgrade_accepts_them_again(
    db_url: str,
) -> None:
    """Down from 0012 a package without stores gets its product's as they are, else the
    store that sold it (as 0009 fills), and the column is NOT NULL; up again, NULL is
    accepted and the schema is the metadata's."""
    config = migrate._alembic_config(db_url)
    products = [("TWO", '["S1", "S2"]'), ("ALL", "[]")]
    packages = [(1, "TWO", "S1"), (2, "ALL", "S1"), (3, "GONE", "S3"), (20_004, "TWO", "S2")]
    asyncio.run(
        sql_execute(
            db_url,
            *[
                "INSERT INTO service_products (code, name, legal_entity, definition, state, "  # noqa: S608
                f"created_at_ms, updated_at_ms) VALUES ('{code}', '{code}', 'LE1', "
                f"'{DEFINITION.format(stores)}', 'active', 0, 0)"
                for code, stores in products
            ],
            *[old_sale(code, 7, store, f"k{i}", now_ms=0, id_=i) for i, code, store in packages],
            "INSERT INTO service_entitlements (id, stores, "  # noqa: S608
            f"{COLUMNS}) VALUES (5, '[\"S2\"]', 'TWO', 7, NULL, 'S2', 2, 2, 5000, 'pro_rata', "
            "0, 2500, FALSE, 0, 1, 'active', 'S2/k5', NULL, 0, 0)",
        )
    )
    command.downgrade(config, "0011")
    assert _stores_column(db_url)["nullable"] is False
    rows = asyncio.run(sql_rows(db_url, "SELECT id, stores FROM service_entitlements "
                                "ORDER BY id"))  # fmt: skip
    assert [(r["id"], json.loads(r["stores"])) for r in rows] == [
        (1, ["S1", "S2"]),
        (2, []),  # every store, as its product
        (3, ["S3"]),  # its product is gone: where it was sold
        (5, ["S2"]),  # recorded at its sale: kept
        (20_004, ["S1", "S2"]),  # in a later fill
    ]
    with pytest.raises(IntegrityError):
        asyncio.run(sql_execute(db_url, old_sale("TWO", 7, "S1", "k6", now_ms=0, id_=6)))

    command.upgrade(config, "head")
    asyncio.run(migrate.check_current(db_url))
    assert asyncio.run(_compare(db_url, schema.metadata)) == []
    asyncio.run(sql_execute(db_url, old_sale("TWO", 7, "S1", "k6", now_ms=0, id_=6)))
    assert asyncio.run(stored_stores(db_url, 6)) is None
