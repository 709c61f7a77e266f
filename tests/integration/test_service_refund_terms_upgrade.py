"""Packages that recorded no refund terms (SQLite and PostgreSQL): code older than migration
0007 sells packages without `service_entitlements`' four refund-term columns (nor `stores`)
while a rolling upgrade runs. Such a sale is accepted (0007 adds the columns nullable, 0014
drops NOT NULL where 0007 once set it), and the package is listed and refunded by its
product's terms as they are at each read, as that code read them; the 0014 downgrade fills
those packages from their product (else no refund, as 0007 fills)."""

from __future__ import annotations

import asyncio
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
    issue,
    pos,
    product,
    redemption,
    sell,
    world,
)

YEAR_MS = 366 * 86_400_000
TERMS = ("refund_policy", "refund_fee_fen", "single_use_price_fen", "refund_after_expiry")
# Every column code older than 0007 writes (neither the refund terms nor `stores`).
COLUMNS = (
    "product, holder, member_id, store, uses_total, uses_left, price_fen, sold_ms, "
    "expires_ms, state, sale_key, refund_key, refunded_fen, updated_at_ms"
)
# TEN: 10 uses for 10,000 fen, one use listed at 1,200, a 100 fee, every store.
TEN_TERMS = {"refund_policy": "pro_rata_after_use_price", "refund_fee_fen": 100,
             "single_use_price_fen": 1_200, "refund_after_expiry": False}  # fmt: skip
TEN = (
    '{"price_fen": 10000, "refund_after_expiry": false, "refund_fee_fen": 100, '
    '"refund_policy": "pro_rata_after_use_price", "single_use_price_fen": 1200, '
    '"stores": [], "uses": 10, "validity_months": 12}'
)
NO_REFUND = {"refund_policy": "none", "refund_fee_fen": 0, "single_use_price_fen": 0,
             "refund_after_expiry": False}  # fmt: skip


def old_sale(product: str, holder: int, store: str, key: str, *, now_ms: int, id_: int = 0) -> str:
    """A package as code older than 0007 sells it: no refund terms, no stores (10 uses for
    10,000 fen, valid a year); `id_` 0 = the next id."""
    id_column, id_value = ("id, ", f"{id_}, ") if id_ else ("", "")
    return (
        f"INSERT INTO service_entitlements ({id_column}{COLUMNS}) VALUES ({id_value}"  # noqa: S608
        f"'{product}', {holder}, NULL, '{store}', 10, 10, 10000, {now_ms}, "
        f"{now_ms + YEAR_MS}, 'active', '{store}/{key}', NULL, 0, {now_ms})"
    )


def insert_product(code: str, definition: str) -> str:
    return (
        "INSERT INTO service_products (code, name, legal_entity, definition, state, "  # noqa: S608
        f"created_at_ms, updated_at_ms) VALUES ('{code}', '{code}', 'LE1', '{definition}', "
        "'active', 0, 0)"
    )


async def sold_by_old_code(
    admin: AdminClient, db_url: str, card: dict[str, Any], product: str, key: str = ""
) -> int:
    """The id of a package of `product` sold on `card` in S1 by code older than 0007 (its
    sale key S1/`key`, by default one of its own)."""
    [row] = await sql_rows(db_url, "SELECT account_id FROM cards WHERE id = :i", i=card["id"])
    key = key or f"old-{product}-{card['id']}"
    now_ms = admin.app[SERVICE_CARDS_KEY].clock_ms()
    await sql_execute(db_url, old_sale(product, int(row["account_id"]), "S1", key, now_ms=now_ms))
    [sold] = await sql_rows(db_url, "SELECT * FROM service_entitlements WHERE sale_key = :k",
                            k=f"S1/{key}")  # fmt: skip
    assert [sold[t] for t in (*TERMS, "stores")] == [None] * 5
    return int(sold["id"])


async def stored_terms(db_url: str, package_id: int) -> dict[str, Any]:
    [row] = await sql_rows(db_url, "SELECT * FROM service_entitlements WHERE id = :i",
                           i=package_id)  # fmt: skip
    return {t: row[t] for t in (*TERMS, "stores")}


def terms_of(package: dict[str, Any]) -> dict[str, Any]:
    return {t: package[t] for t in TERMS}


async def listed(admin: AdminClient, card: dict[str, Any]) -> dict[int, dict[str, Any]]:
    answer = await admin.ok("GET", f"/v1/cards/{card['id']}/service-packages")
    return {p["id"]: p for p in answer["items"]}


# --- the code: NULL reads the product's terms at the refund -------------------------------------


async def test_a_package_sold_by_older_code_is_refunded_by_its_products_terms_at_the_refund(
    admin: AdminClient, db_url: str
) -> None:
    """A package of TEN sold by code older than 0007 (no refund terms, no stores) is listed
    with TEN's terms and stores, replayed by its sale key with them, and refunded by TEN's
    terms as they are at the refund: after HQ makes TEN 5,000 with a use at 500 and no fee,
    5 used refund the 10,000 paid less 5 x 500 (a package sold now keeps 1,200 and the
    fee); replayed the same;
    after HQ makes TEN `none`, another such package refunds nothing. Nothing is written
    back."""
    w = await world(admin)
    await product(admin, "TEN", uses=10, price_fen=10_000, **TEN_TERMS)
    card, pan = w["card"], w["card"]["pan"]
    old = await sold_by_old_code(admin, db_url, card, "TEN", key="old-sale")
    seen = (await listed(admin, card))[old]
    assert (terms_of(seen), seen["stores"], seen["uses_left"]) == (TEN_TERMS, [], 10)
    replayed = await admin.ok("POST", f"/v1/cards/{card['id']}/service-packages", json={
        "product": "TEN", "tender": "cash", "receipt": "R1", "key": "old-sale"})  # fmt: skip
    assert (replayed["id"], replayed["replayed"], terms_of(replayed)) == (old, True, TEN_TERMS)
    recorded_card = await issue(admin, "S1")
    _, recorded = await sell(admin, recorded_card["id"], "TEN")
    assert terms_of(recorded) == TEN_TERMS
    for used_pan in (pan, recorded_card["pan"]):
        [used] = await pos(admin, redemption(w["t1"], used_pan, product="TEN", uses=5))
        assert (used.outcome, used.uses_left) == (Outcome.APPROVED, 5)

    await admin.ok("PATCH", f"{PRODUCTS}/TEN", json={"price_fen": 5_000, "refund_fee_fen": 0,
                                                     "single_use_price_fen": 500})  # fmt: skip
    now_terms = TEN_TERMS | {"single_use_price_fen": 500, "refund_fee_fen": 0}
    assert terms_of((await listed(admin, card))[old]) == now_terms
    assert terms_of((await listed(admin, recorded_card))[recorded["id"]]) == TEN_TERMS
    path = f"/v1/service-packages/{old}/refund"
    refunded = await admin.ok("POST", path, json={"key": "rf-old", "receipt": "R2"})
    assert (refunded["refund_fen"], refunded["state"], terms_of(refunded)) == (
        10_000 - 5 * 500, "refunded", now_terms)  # fmt: skip
    again = await admin.ok("POST", path, json={"key": "rf-old", "receipt": "R2"})
    assert (again["refund_fen"], again["transfer_id"], again["replayed"]) == (
        7_500, refunded["transfer_id"], True)  # fmt: skip
    kept = await admin.ok("POST", f"/v1/service-packages/{recorded['id']}/refund",
                          json={"key": "rf-recorded"})  # fmt: skip
    assert kept["refund_fen"] == 10_000 - 5 * 1_200 - 100

    await admin.ok("PATCH", f"{PRODUCTS}/TEN", json={"refund_policy": "none"})
    later = await sold_by_old_code(admin, db_url, card, "TEN", key="old-later")
    status, answer = await admin.call("POST", f"/v1/service-packages/{later}/refund",
                                      json={"key": "rf-later"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "service_refund_not_allowed")
    for package_id in (old, later):
        assert await stored_terms(db_url, package_id) == dict.fromkeys((*TERMS, "stores"))


async def test_a_package_sold_by_older_code_whose_product_is_gone_refunds_nothing(
    admin: AdminClient, db_url: str
) -> None:
    """No product is ever deleted; should one be gone, its package that recorded no terms
    refunds nothing (0007's rule) and redeems where it was sold (0009's)."""
    w = await world(admin)
    card, pan = w["card"], w["card"]["pan"]
    old = await sold_by_old_code(admin, db_url, card, "GONE")
    seen = (await listed(admin, card))[old]
    assert (terms_of(seen), seen["stores"]) == (NO_REFUND, ["S1"])
    [wrong] = await pos(admin, redemption(w["t2"], pan, product="GONE"))
    assert (wrong.outcome, wrong.refusal) == (Outcome.NOT_PERMITTED, "service_wrong_store")
    [here] = await pos(admin, redemption(w["t1"], pan, product="GONE"))
    assert (here.outcome, here.uses_left) == (Outcome.APPROVED, 9)
    status, answer = await admin.call("POST", f"/v1/service-packages/{old}/refund",
                                      json={"key": "rf-gone"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "service_refund_not_allowed")
    assert await stored_terms(db_url, old) == dict.fromkeys((*TERMS, "stores"))


async def test_a_package_missing_any_refund_term_takes_all_four_from_its_product(
    admin: AdminClient, db_url: str
) -> None:
    """Code writes all four terms or none; a row missing only one (written by hand) takes
    all four from its product, never a mix of two days' terms, and keeps its stores."""
    w = await world(admin)
    await product(admin, "TEN", uses=10, price_fen=10_000, **TEN_TERMS)
    card = w["card"]
    _, sold = await sell(admin, card["id"], "TEN")
    await sql_execute(db_url, "UPDATE service_entitlements SET refund_fee_fen = NULL, "  # noqa: S608
                      "stores = '[\"S2\"]', refund_policy = 'none' "
                      f"WHERE id = {sold['id']}")  # fmt: skip
    seen = (await listed(admin, card))[sold["id"]]
    assert (terms_of(seen), seen["stores"]) == (TEN_TERMS, ["S2"])


async def test_the_product_is_read_at_a_redemption_only_for_a_package_without_terms(
    admin: AdminClient, db_url: str, monkeypatch: Any
) -> None:
    """The POS path runs the statements it ran before for a package that recorded its terms
    (no product read); one sold by code older than 0007 (no refund terms, no stores) costs
    one read of its product more, for both."""
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
        [answer] = await pos(admin, redemption(w["t1"], pan, product="WASH"))
        assert answer.outcome is Outcome.APPROVED
        return len(statements), list(tables)

    await sell(admin, w["card"]["id"], "WASH")
    await redeem_counting(w["card"]["pan"])  # the terminal is read once, then kept
    recorded = await issue(admin, "S1")
    await sell(admin, recorded["id"], "WASH")
    reads_recorded, tables_recorded = await redeem_counting(recorded["pan"])
    assert "service_products" not in tables_recorded
    unrecorded = await issue(admin, "S1")
    await sold_by_old_code(admin, db_url, unrecorded, "WASH")
    reads_unrecorded, tables_unrecorded = await redeem_counting(unrecorded["pan"])
    assert tables_unrecorded == [*tables_recorded, "service_products"]
    assert reads_unrecorded == reads_recorded + 1


# --- the migrations ------------------------------------------------------------------------------


def _terms_columns(db_url: str) -> dict[str, dict[str, Any]]:
    def columns(conn: Connection) -> dict[str, dict[str, Any]]:
        found = inspect(conn).get_columns("service_entitlements")
        return {c["name"]: dict(c) for c in found if c["name"] in TERMS}

    async def read() -> dict[str, dict[str, Any]]:
        engine = make_engine(db_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(columns)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _terms_by_id(db_url: str) -> list[tuple[int, dict[str, Any]]]:
    query = f"SELECT id, {', '.join(TERMS)} FROM service_entitlements ORDER BY id"  # noqa: S608
    rows = asyncio.run(sql_rows(db_url, query))
    return [(int(r["id"]), {t: r[t] for t in TERMS}) for r in rows]  # SQLite's 0 == False


def test_after_0007_a_sale_by_older_code_is_accepted_with_its_terms_unrecorded(
    db_url: str,
) -> None:
    """0007 adds the terms nullable with no default: the packages before it get their
    product's terms (no refund, their product gone); a package older code sells after it
    is accepted and stays NULL, never `none` (no refund)."""
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0006")
    asyncio.run(
        sql_execute(
            db_url,
            insert_product("TEN", TEN),
            old_sale("TEN", 7, "S1", "before", now_ms=0, id_=1),
            old_sale("GONE", 7, "S1", "gone", now_ms=0, id_=2),
        )
    )
    command.upgrade(config, "0007")
    assert {n: (c["nullable"], c["default"]) for n, c in _terms_columns(db_url).items()} == (
        dict.fromkeys(TERMS, (True, None)))  # fmt: skip
    asyncio.run(sql_execute(db_url, old_sale("TEN", 7, "S1", "after", now_ms=0, id_=3)))
    assert _terms_by_id(db_url) == [
        (1, TEN_TERMS),
        (2, NO_REFUND),  # its product is gone
        (3, dict.fromkeys(TERMS)),
    ]
    command.upgrade(config, "head")
    assert asyncio.run(_compare(db_url, schema.metadata)) == []


def test_the_0014_downgrade_fills_unrecorded_terms_and_the_upgrade_accepts_them_again(
    db_url: str,
) -> None:
    """Down from 0014 a package without terms gets its product's as they are, else no
    refund (as 0007 fills), one with its terms keeps them, and the columns are NOT NULL; up
    again, NULL is accepted and the schema is the metadata's."""
    config = migrate._alembic_config(db_url)
    packages = [(1, "TEN"), (2, "GONE"), (20_004, "TEN")]  # the last in a later fill
    pro_rata = {"refund_policy": "pro_rata", "refund_fee_fen": 50, "single_use_price_fen": 900,
                "refund_after_expiry": True}  # fmt: skip
    asyncio.run(
        sql_execute(
            db_url,
            insert_product("TEN", TEN),
            *[old_sale(code, 7, "S1", f"k{i}", now_ms=0, id_=i) for i, code in packages],
            "INSERT INTO service_entitlements (id, refund_policy, refund_fee_fen, "  # noqa: S608
            f"single_use_price_fen, refund_after_expiry, {COLUMNS}) VALUES (3, 'pro_rata', 50, "
            "900, TRUE, 'TEN', 7, NULL, 'S1', 10, 10, 10000, 0, 1, 'active', 'S1/k3', NULL, "
            "0, 0)",
        )
    )
    command.downgrade(config, "0013")
    assert {n: c["nullable"] for n, c in _terms_columns(db_url).items()} == (
        dict.fromkeys(TERMS, False))  # fmt: skip
    assert _terms_by_id(db_url) == [
        (1, TEN_TERMS),
        (2, NO_REFUND),  # its product is gone
        (3, pro_rata),  # recorded at its sale: kept
        (20_004, TEN_TERMS),
    ]
    with pytest.raises(IntegrityError):
        asyncio.run(sql_execute(db_url, old_sale("TEN", 7, "S1", "k5", now_ms=0, id_=5)))

    command.upgrade(config, "head")
    asyncio.run(migrate.check_current(db_url))
    assert asyncio.run(_compare(db_url, schema.metadata)) == []
    asyncio.run(sql_execute(db_url, old_sale("TEN", 7, "S1", "k5", now_ms=0, id_=5)))
    assert dict(_terms_by_id(db_url))[5] == dict.fromkeys(TERMS)
