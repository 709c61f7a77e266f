"""records.Unit on SQLite and PostgreSQL: each query shape is built once and run with
parameters, so the same shape must give the right rows for every set of values (a cache
keyed on too little would run one call's statement with another call's meaning)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from cardcore.db import DATABASE_ERRORS, async_url, make_engine
from cardcore.records import Conflict, Records

pytestmark = pytest.mark.asyncio

ENTITIES = "org_legal_entities"


async def _records(db_url: str) -> Records:
    records = Records(make_engine(db_url))
    async with records.begin() as uow:
        await uow.insert(ENTITIES, [
            {"id": code, "name": name, "created_at_ms": at}
            for code, name, at in (
                ("E1", "50% off_shop", 10), ("E2", "50 percent", 20), ("E3", "a/b_c", 30),
                ("E4", "a/bxc", 40), ("E5", "abc", 50),
            )
        ])  # fmt: skip
    return records


async def test_find_shapes_keep_their_meaning_for_every_value(db_url: str) -> None:
    records = await _records(db_url)
    try:
        async with records.read() as uow:
            ids = [r["id"] for r in await uow.find(ENTITIES, order="id")]
            assert ids == ["E1", "E2", "E3", "E4", "E5"]
            page = await uow.find(ENTITIES, order="id", after="E2", limit=2)
            assert [r["id"] for r in page] == ["E3", "E4", "E5"]  # limit + 1
            back = await uow.find(ENTITIES, order="id", after="E4", descending=True, limit=5)
            assert [r["id"] for r in back] == ["E3", "E2", "E1"]
            # The same shapes with other values, and IN lists of other lengths.
            assert [r["id"] for r in await uow.find(ENTITIES, {"id": ["E5"]}, order="id")] == ["E5"]
            some = await uow.find(ENTITIES, {"id": ["E1", "E3", "E9"]}, order="id")
            assert [r["id"] for r in some] == ["E1", "E3"]
            assert await uow.find(ENTITIES, {"id": []}, order="id") == []
            later = await uow.find(ENTITIES, order="id", at_least={"created_at_ms": 30})
            assert [r["id"] for r in later] == ["E3", "E4", "E5"]
            later = await uow.find(ENTITIES, order="id", at_least={"created_at_ms": 50})
            assert [r["id"] for r in later] == ["E5"]
            # A prefix is matched literally: % _ and / are no wildcards.
            for prefix, expected in (("50%", ["E1"]), ("50", ["E1", "E2"]), ("a/b_", ["E3"]),
                                     ("a/b", ["E3", "E4"]), ("a_", []), ("%", [])):  # fmt: skip
                rows = await uow.find(ENTITIES, order="id", starts_with={"name": prefix})
                assert [r["id"] for r in rows] == expected, prefix
            assert (await uow.get(ENTITIES, id="E2") or {})["name"] == "50 percent"
            assert await uow.get(ENTITIES, id="E9") is None
            assert await uow.count(ENTITIES, id=["E1", "E2"]) == 2
            assert await uow.total(ENTITIES, "created_at_ms", id=["E1", "E5"]) == 60
            assert await uow.total(ENTITIES, "created_at_ms", id="E9") == 0
    finally:
        await records.engine.dispose()


async def test_updates_guards_and_deletes_with_built_statements(db_url: str) -> None:
    records = await _records(db_url)
    try:
        async with records.begin() as uow:
            # A counter raised under a bound, twice with other values through one shape.
            bump = {"created_at_ms": ("+", 5)}
            assert await uow.update(ENTITIES, {"id": "E1"}, bump, at_most={"created_at_ms": 15})
            assert not await uow.update(
                ENTITIES, {"id": "E1"}, bump, at_most={"created_at_ms": 15}
            )  # 15 + 5 > 15
            assert await uow.update(ENTITIES, {"id": "E1"}, {"created_at_ms": ("+", -15)},
                                    at_most={"created_at_ms": 15})  # fmt: skip
            # A bound on a column that is only set, not raised.
            assert not await uow.update(ENTITIES, {"id": "E5"}, {"name": "x"},
                                        at_most={"created_at_ms": 49})  # fmt: skip
            # Floors: on the value after the increment, and on a column as it is.
            take = {"created_at_ms": ("+", -30)}
            assert not await uow.update(ENTITIES, {"id": "E3"}, take,  # 30 - 30 < 1
                                        at_least={"created_at_ms": 1})  # fmt: skip
            assert not await uow.update(ENTITIES, {"id": "E3"}, {"name": "x"},
                                        at_least={"created_at_ms": 31})  # fmt: skip
            assert await uow.update(ENTITIES, {"id": "E3"}, {"created_at_ms": ("+", -29)},
                                    at_least={"created_at_ms": 1})  # fmt: skip
            back = {"created_at_ms": ("+", 29)}
            exactly = {"created_at_ms": 30}
            assert await uow.update(ENTITIES, {"id": "E3"}, back, at_least=exactly, at_most=exactly)
            assert await uow.update(ENTITIES, {"id": ["E4", "E5"]}, {"name": "renamed"}) == 2
            assert await uow.delete(ENTITIES, {"id": ["E2", "E9"]}) == 1
        with pytest.raises(ValueError, match="no column colour"):
            async with records.begin() as uow:
                await uow.insert(ENTITIES, {"id": "E6", "name": "n", "created_at_ms": 0,
                                            "colour": "red"})  # fmt: skip
        with pytest.raises(Conflict):  # and the unit rolls back (PostgreSQL aborts it)
            async with records.begin() as uow:
                await uow.insert(ENTITIES, {"id": "E3", "name": "twice", "created_at_ms": 0})
        async with records.read() as uow:
            rows = await uow.find(ENTITIES, order="id")
        assert [(r["id"], r["name"], r["created_at_ms"]) for r in rows] == [
            ("E1", "50% off_shop", 0), ("E3", "a/b_c", 30), ("E4", "renamed", 40),
            ("E5", "renamed", 50),
        ]  # fmt: skip
    finally:
        await records.engine.dispose()


async def test_a_write_in_a_unit_that_fails_changes_nothing(db_url: str) -> None:
    records = await _records(db_url)
    try:

        async def fails() -> None:
            async with records.begin() as uow:
                await uow.update(ENTITIES, {"id": "E1"}, {"name": "gone"})
                raise RuntimeError

        with pytest.raises(RuntimeError):
            await fails()
        async with records.read() as uow:
            assert (await uow.get(ENTITIES, id="E1") or {})["name"] == "50% off_shop"
            assert await uow.totals(ENTITIES, "created_at_ms", ("name",), id=["E1", "E2"]) == {
                ("50% off_shop",): 10, ("50 percent",): 20,
            }  # fmt: skip
    finally:
        await records.engine.dispose()


def _stores(*ids: str, entity: str = "E1") -> list[dict[str, object]]:
    return [
        {"id": i, "legal_entity": entity, "name": f"store {i}", "region": "r", "city": "c",
         "state": "open", "created_at_ms": n}
        for n, i in enumerate(ids)
    ]  # fmt: skip


async def test_insert_together_writes_every_table_or_none(db_url: str) -> None:
    records = await _records(db_url)
    try:
        # Two tables, rows of any number (the PostgreSQL text is one per shape), then a
        # table with no rows, which is left out.
        await records.insert_together({
            ENTITIES: [{"id": "F1", "name": "it's \"quoted\"", "created_at_ms": 60}],
            "org_stores": _stores("S1", "S2", entity="F1"),
        })  # fmt: skip
        await records.insert_together({
            ENTITIES: [{"id": f"G{n}", "name": "g", "created_at_ms": n} for n in range(3)],
            "org_stores": _stores("S3"),
        })  # fmt: skip
        await records.insert_together({ENTITIES: [], "org_stores": _stores("S4", "S5")})
        await records.insert_together({ENTITIES: [], "org_stores": []})
        # A duplicate in the last table undoes the first table's rows too, and the other
        # way round.
        with pytest.raises(Conflict):
            await records.insert_together({
                ENTITIES: [{"id": "H1", "name": "h", "created_at_ms": 1}],
                "org_stores": _stores("S6", "S1"),
            })  # fmt: skip
        with pytest.raises(Conflict):
            await records.insert_together({
                ENTITIES: [{"id": "H2", "name": "h", "created_at_ms": 1},
                           {"id": "E1", "name": "again", "created_at_ms": 1}],
                "org_stores": _stores("S7"),
            })  # fmt: skip
        with pytest.raises(ValueError, match="same columns"):
            await records.insert_together({ENTITIES: [{"id": "H3", "nope": 1}]})
        with pytest.raises(ValueError, match="same columns"):
            await records.insert_together({ENTITIES: [
                {"id": "H4", "name": "h", "created_at_ms": 1}, {"id": "H5", "name": "h"},
            ]})  # fmt: skip
        async with records.read() as uow:
            entities = await uow.find(ENTITIES, order="id")
            stores = await uow.find("org_stores", order="id")
        assert [r["id"] for r in entities] == ["E1", "E2", "E3", "E4", "E5", "F1", "G0", "G1",
                                               "G2"]  # fmt: skip
        assert next(r for r in entities if r["id"] == "F1")["name"] == 'it\'s "quoted"'
        assert [r["id"] for r in stores] == ["S1", "S2", "S3", "S4", "S5"]
        assert [r["created_at_ms"] for r in stores] == [0, 1, 0, 0, 1]
    finally:
        await records.engine.dispose()


def _card_class(code: str, *, named: bool) -> dict[str, object]:
    return {
        "code": code, "name": code, "named": named, "gift": not named, "denominations": "[]",
        "discount_bp": 0, "points_multiplier_pct": 100, "issue_fee": 0, "replace_fee": 0,
        "balance_max": 0, "validity_months": 12, "state": "active", "created_at_ms": 1,
        "updated_at_ms": 1,
    }  # fmt: skip


def _card(token: str, card_id: int, member: int | None) -> dict[str, object]:
    return {
        "token": token, "pan_masked": "628888*****1234", "legal_entity": "E1",
        "account_id": card_id, "expires": "2912", "state": "active", "balance_max": 0,
        "created_at_ms": 1, "id": card_id, "pan_sealed": "x", "secret_sealed": "y",
        "class_code": "C1", "member_id": member, "store": "S1", "named": member is not None,
        "pvv": "", "pin_failures": 0, "replaced_by": None, "updated_at_ms": 1,
    }  # fmt: skip


async def test_insert_together_keeps_booleans_nulls_and_server_defaults(db_url: str) -> None:
    records = await _records(db_url)
    try:
        await records.insert_together({
            "card_classes": [_card_class("C1", named=True), _card_class("C2", named=False)],
            "cards": [_card("T1", 1, 7), _card("T2", 2, None)],
        })  # fmt: skip
        async with records.read() as uow:
            classes = await uow.find("card_classes", order="code")
            cards = await uow.find("cards", order="id")
        assert [(c["named"], c["gift"], c["points_program"]) for c in classes] == [
            (True, False, ""), (False, True, ""),
        ]  # fmt: skip
        assert [(c["member_id"], c["replaced_by"], c["named"]) for c in cards] == [
            (7, None, True), (None, None, False),
        ]  # fmt: skip
        if db_url.startswith("postgresql"):
            # Too long for the column: refused as a plain insert would be, never cut short.
            with pytest.raises(DATABASE_ERRORS):
                await records.insert_together({
                    "card_classes": [_card_class("C" * 40, named=True)],
                    "cards": [_card("T3", 3, None)],
                })  # fmt: skip
            async with records.read() as uow:
                assert await uow.count("cards", id=3) == 0
                assert await uow.count("card_classes", code=["C" * 40, "C" * 32]) == 0
    finally:
        await records.engine.dispose()


# --- PostgreSQL: statements at the driver, in the driver's transaction (ADR 0008) ------------


def _postgres_only(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("the driver path is PostgreSQL's")


async def test_a_connection_the_server_dropped_is_not_pooled_again(db_url: str) -> None:
    _postgres_only(db_url)
    records = Records(make_engine(db_url, pool_size=1))  # the next unit would get it back
    try:
        with pytest.raises(DATABASE_ERRORS):
            async with records.read() as uow:
                await uow.driver.fetchval("SELECT pg_terminate_backend(pg_backend_pid())")
        async with records.read() as uow:
            assert await uow.count(ENTITIES) == 0
    finally:
        await records.engine.dispose()


async def test_after_a_server_restart_no_idle_connection_fails_a_unit(db_url: str) -> None:
    """Every idle pooled connection dropped at once (a restart, a failover): the units after
    it get new connections, none meets a dead one."""
    _postgres_only(db_url)
    records = Records(make_engine(db_url, pool_size=3))
    try:
        async with records.read() as a, records.read() as b, records.read() as c:
            pids = [await u.driver.fetchval("SELECT pg_backend_pid()") for u in (a, b, c)]
        async with records.read() as killer:  # the first of the three, by the pool's order
            killed = await killer.driver.fetch(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid "
                "WHERE pid <> pg_backend_pid()",
                pids,
            )
            assert len(killed) == 2
        await asyncio.sleep(0.2)  # the driver hears of it
        for _ in range(4):
            async with records.read() as uow:
                assert await uow.count(ENTITIES) == 0
    finally:
        await records.engine.dispose()


async def test_a_unit_cancelled_mid_transaction_commits_nothing_and_leaves_the_pool_usable(
    db_url: str,
) -> None:
    _postgres_only(db_url)
    records = Records(make_engine(db_url, pool_size=1))
    inside = asyncio.Event()

    async def stuck() -> None:
        async with records.begin() as uow:
            await uow.insert(ENTITIES, {"id": "X1", "name": "never", "created_at_ms": 0})
            inside.set()
            await asyncio.Event().wait()

    try:
        task = asyncio.create_task(stuck())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with records.begin() as uow:  # the one pooled connection, usable again
            await uow.insert(ENTITIES, {"id": "X2", "name": "kept", "created_at_ms": 0})
        async with records.read() as uow:
            assert [r["id"] for r in await uow.find(ENTITIES, order="id")] == ["X2"]
    finally:
        await records.engine.dispose()


async def test_no_free_connection_in_time_is_a_database_error(db_url: str) -> None:
    """The pool's own time-out (every connection busy) is one of DATABASE_ERRORS, so the
    POS answers that request `unavailable` and the CLI prints one line, as for any other
    database failure."""
    engine = create_async_engine(async_url(db_url), pool_size=1, max_overflow=0, pool_timeout=0.2)
    records = Records(engine)
    try:
        async with records.read():
            with pytest.raises(DATABASE_ERRORS):
                async with records.read():
                    pass
    finally:
        await engine.dispose()


async def test_a_database_error_never_carries_its_statements_values(db_url: str) -> None:
    """A database error is logged with its text: SQLAlchemy put the statement's parameters in
    it (a bearer coupon code, a lookup hash), which a security review found in the log."""
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            with pytest.raises(DATABASE_ERRORS) as caught:
                await conn.execute(
                    text("SELECT code FROM coupon_codes WHERE code = :code AND no_such = 1"),
                    {"code": "BEARERCODE77"},
                )
        assert "no_such" in str(caught.value)  # the error says what went wrong
        assert "BEARERCODE77" not in str(caught.value), str(caught.value)
    finally:
        await engine.dispose()
