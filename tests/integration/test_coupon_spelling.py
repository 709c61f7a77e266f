"""One stored code per normalised form (`coupon_codes.spelling`, unique), on SQLite and
PostgreSQL: two imports of confusable codes at the same moment store one (PostgreSQL: the
only database where two imports' transactions overlap), the second answered as the
import's look-up answers; every insert writes the spelling; migration 0013 fills it with
exactly `model.normalize`, and where stored codes were confusable already the first issued
keeps it and the later ones are left without one, logged."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import random
import time
from types import ModuleType
from typing import Any

import pytest
from alembic import command
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from cardcore import migrate
from cardcore.coupons import model
from cardcore.coupons import service as coupons_service
from cardcore.db import make_engine
from cardcore.records import Unit
from tests.helpers import AdminClient, sql_execute, sql_rows
from tests.integration.test_coupons_admin import campaign, campaign_row, counts, service

MIGRATION = migrate.PROJECT_ROOT / "migrations" / "versions" / "0013_coupon_code_spelling.py"
WAIT_S = 10  # the longest a step of a race waits for the other import
EXISTS = {
    "code": "coupon_code_exists",
    "message": "a code exists already (as it is, or in its normalised form)",
    "field": "codes",
}
# Stored code, then an import's code with the same normalised form.
CONFUSABLE = [
    ("PART0001", "PART-0001"),  # the import's normalised form is the stored code
    ("PART-0001", "PART0001"),  # the stored code's normalised form is the import's code
    ("PA-RT0001", "PART-0001"),  # neither is the other's normalised form
    ("COOL-1111", "C00L-IIII"),  # I/L as 1, O as 0, neither normalised
    ("COOL-1111", " cool-1111"),  # the same code, as typed
]


def migration() -> ModuleType:
    """Revision 0013's module, as alembic loads it."""
    spec = importlib.util.spec_from_file_location("revision_0013", MIGRATION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def imports(admin: AdminClient, campaign_code: str, codes: list[str]) -> tuple[int, Any]:
    return await admin.call("POST", f"/v1/coupon-campaigns/{campaign_code}/imports",
                            json={"codes": codes})  # fmt: skip


async def stored(db_url: str) -> dict[str, str | None]:
    rows = await sql_rows(db_url, "SELECT code, spelling FROM coupon_codes ORDER BY code")
    return {r["code"]: r["spelling"] for r in rows}


async def two_campaigns(admin: AdminClient) -> None:
    """TENOFF and OTHER, active: imports into each take no common row lock."""
    await admin.org("LE1", "S1")
    await campaign(admin, "TENOFF")
    await campaign(admin, "OTHER")


async def unchanged_but_one_import(db_url: str, before: dict[str, int]) -> None:
    """The tables hold one import more than `before`: one code, its batch, its audit row."""
    after = await counts(db_url)
    grown = {"coupon_codes": 1, "coupon_batches": 1, "org_audit_log": 1}
    assert after == {t: n + grown.get(t, 0) for t, n in before.items()}


# --- every insert writes the spelling -------------------------------------------------------------


async def test_every_code_is_stored_with_its_normalised_form(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin)
    generated = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/codes", json={"count": 3})
    await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/imports",
                   json={"codes": ["Part-0I0L", "COOL-1"]})  # fmt: skip
    expected = {code: code for code in generated["codes"]}
    expected |= {"PART-0I0L": "PART0101", "COOL-1": "C0011"}
    assert await stored(db_url) == expected


async def test_a_generated_code_equal_to_an_imported_codes_normalised_form_is_drawn_again(
    admin: AdminClient, db_url: str
) -> None:
    """A generated code is its own normalised form: one drawn equal to the normalised form
    of an imported code would be confusable with it, and is drawn again (as one equal to a
    stored code is)."""
    await admin.org("LE1", "S1")
    await campaign(admin)
    await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/imports",
                   json={"codes": ["0000-0000-0000-0000"]})  # fmt: skip
    draws = iter(range(100))
    service(admin).randbytes = lambda n: bytes(n) if next(draws) < 3 else bytes([7]) * n
    [code] = (await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/codes", json={"count": 1}))[
        "codes"
    ]
    assert code != "0" * 16 and next(draws) == 4  # three draws of zeros clashed, the fourth not
    assert await stored(db_url) == {"0000-0000-0000-0000": "0" * 16, code: code}


# --- an import confusable with a stored code ------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), CONFUSABLE)
async def test_an_import_confusable_with_a_stored_code_is_refused_and_stores_nothing(
    admin: AdminClient, db_url: str, first: str, second: str
) -> None:
    await two_campaigns(admin)
    status, _ = await imports(admin, "TENOFF", [first])
    assert status == 201
    before, row = await counts(db_url), await campaign_row(db_url, "OTHER")
    status, body = await imports(admin, "OTHER", ["FRESH-0001", second])
    assert (status, body.get("error")) == (409, EXISTS)
    assert await counts(db_url) == before
    assert await campaign_row(db_url, "OTHER") == row
    assert await stored(db_url) == {first.strip().upper(): model.normalize(first)}


@pytest.mark.parametrize(("first", "second"), CONFUSABLE)
async def test_the_unique_index_refuses_an_import_the_look_up_missed_with_the_same_answer(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch, first: str, second: str
) -> None:
    """Without the look-up (as when another import committed just after it), the insert
    meets the unique index: the same 409, and nothing of the import is stored."""
    await two_campaigns(admin)
    assert (await imports(admin, "TENOFF", [first]))[0] == 201

    async def no_look_up(uow: Unit, codes: list[str]) -> None:
        return None

    monkeypatch.setattr(coupons_service, "_no_other_spelling", no_look_up)
    before, row = await counts(db_url), await campaign_row(db_url, "OTHER")
    status, body = await imports(admin, "OTHER", ["FRESH-0001", second])
    assert (status, body.get("error")) == (409, EXISTS)
    assert await counts(db_url) == before
    assert await campaign_row(db_url, "OTHER") == row


async def test_a_code_older_code_stored_without_a_spelling_is_refused_by_the_look_up(
    admin: AdminClient, db_url: str
) -> None:
    """Code older than migration 0013 inserts codes without `spelling` (NULL), and still
    can; the index does not see such a code, the import's look-up does (a new code that is
    it, or whose normalised form is it), as before 0013."""
    await two_campaigns(admin)
    await sql_execute(
        db_url,
        "INSERT INTO coupon_codes (code, campaign, member_id, batch, source, state, "
        "valid_from_ms, valid_to_ms, reserved_key, reserved_until_ms, redeemed_key, "
        "redeemed_at_ms, issued_at_ms, version) VALUES ('PART0001', 'TENOFF', NULL, NULL, "
        "'imported', 'issued', 0, 9999999999999, NULL, NULL, NULL, NULL, 1, 0)",
    )
    before = await counts(db_url)
    for codes_ in (["PART0001"], ["PART-0001"], ["part-oool"]):
        status, body = await imports(admin, "OTHER", codes_)
        assert (status, body.get("error")) == (409, EXISTS), codes_
    assert await counts(db_url) == before
    assert await stored(db_url) == {"PART0001": None}


# --- two imports at the same moment (PostgreSQL) --------------------------------------------------


def overlapping_only(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite runs one writing transaction at a time: two imports never overlap")


def hold_after_insert(
    monkeypatch: pytest.MonkeyPatch, admin: AdminClient, codes: list[str]
) -> tuple[asyncio.Event, asyncio.Event]:
    """The import of `codes` stops inside its transaction once its codes are inserted (the
    first event set), until the second event is set; then it commits."""
    coupons = service(admin)
    insert = coupons._insert_codes
    inserted, go = asyncio.Event(), asyncio.Event()

    async def held(uow: Unit, batch: int, base: dict[str, Any], given: list[str],
                   owners: list[int | None]) -> None:  # fmt: skip
        await insert(uow, batch, base, given, owners)
        if given == codes:
            inserted.set()
            await asyncio.wait_for(go.wait(), WAIT_S)

    monkeypatch.setattr(coupons, "_insert_codes", held)
    return inserted, go


@pytest.mark.parametrize(("first", "second"), CONFUSABLE[:4])
async def test_two_imports_of_confusable_codes_at_the_same_moment_store_one(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch, first: str, second: str
) -> None:
    """The second import's look-up runs while the first has inserted its code but not
    committed (so it misses it); the second inserts once the first committed. The unique
    index refuses it: 409 as the look-up answers, nothing of it stored."""
    overlapping_only(db_url)
    await two_campaigns(admin)
    first_in, first_go = hold_after_insert(monkeypatch, admin, [first])
    look_up = coupons_service._no_other_spelling
    looked, second_go = asyncio.Event(), asyncio.Event()

    async def paused(uow: Unit, codes: list[str]) -> None:
        await look_up(uow, codes)
        if codes == [second]:
            looked.set()
            await asyncio.wait_for(second_go.wait(), WAIT_S)

    monkeypatch.setattr(coupons_service, "_no_other_spelling", paused)
    before, row = await counts(db_url), await campaign_row(db_url, "OTHER")
    one = asyncio.create_task(imports(admin, "TENOFF", [first]))
    await asyncio.wait_for(first_in.wait(), WAIT_S)
    two = asyncio.create_task(imports(admin, "OTHER", [second]))
    await asyncio.wait_for(looked.wait(), WAIT_S)  # it saw nothing: the first is uncommitted
    first_go.set()
    assert (await one)[0] == 201
    second_go.set()
    status, body = await two
    assert (status, body.get("error")) == (409, EXISTS)
    await unchanged_but_one_import(db_url, before)
    assert await campaign_row(db_url, "OTHER") == row
    assert await stored(db_url) == {first: model.normalize(first)}
    status, body = await imports(admin, "OTHER", [second])  # now the look-up answers
    assert (status, body.get("error")) == (409, EXISTS)


async def waiting_insert(db_url: str, task: asyncio.Task[Any]) -> None:
    """Until a connection waits on another transaction to insert into coupon_codes; fails if
    `task` ends first (its insert did not wait)."""
    query = (
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND wait_event = 'transactionid'"
        " AND query LIKE 'INSERT INTO coupon_codes%'"
    )
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert not task.done(), f"the second import did not wait: {task.result()}"
        [row] = await sql_rows(db_url, query)
        if row["n"]:
            return
        await asyncio.sleep(0.02)
    pytest.fail("no insert waited on the first import's transaction")


async def test_an_import_waits_in_the_index_for_a_confusable_one_and_is_refused_once_it_commits(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both imports pass the look-up; the second's insert waits in the unique index for the
    first's transaction, and is refused when it commits (PostgreSQL)."""
    overlapping_only(db_url)
    await two_campaigns(admin)
    first_in, first_go = hold_after_insert(monkeypatch, admin, ["PA-RT0001"])
    before = await counts(db_url)
    one = asyncio.create_task(imports(admin, "TENOFF", ["PA-RT0001"]))
    await asyncio.wait_for(first_in.wait(), WAIT_S)
    two = asyncio.create_task(imports(admin, "OTHER", ["PART-0001"]))
    await waiting_insert(db_url, two)
    first_go.set()
    assert (await one)[0] == 201
    status, body = await two
    assert (status, body.get("error")) == (409, EXISTS)
    await unchanged_but_one_import(db_url, before)
    assert await stored(db_url) == {"PA-RT0001": "PART0001"}


# --- migration 0013 -------------------------------------------------------------------------------


def test_the_migrations_normalize_is_model_normalize() -> None:
    """The migration keeps its own copy (a migration does not follow later code): the same
    table in the same function of the text."""
    copy = migration()
    assert copy._TYPED == model._TYPED
    assert copy.normalize("  pArt-o1iL 0 ") == model.normalize("  pArt-o1iL 0 ") == "PART01110"


NORMALIZE = migration().normalize


@given(st.text(max_size=64))
def test_the_migrations_normalize_agrees_with_model_normalize_on_any_text(typed: str) -> None:
    assert NORMALIZE(typed) == model.normalize(typed)


CODE_COLUMNS = (
    "code, campaign, member_id, batch, source, state, valid_from_ms, valid_to_ms, "
    "reserved_key, reserved_until_ms, redeemed_key, redeemed_at_ms, issued_at_ms, version"
)


def insert_codes(db_url: str, codes: dict[str, int]) -> None:
    """Codes as any code before 0013 stored them (campaign C, batch 1), with their
    issue times."""
    rows = [{"code": code, "issued_at_ms": at} for code, at in codes.items()]
    statement = text(
        f"INSERT INTO coupon_codes ({CODE_COLUMNS}) VALUES (:code, 'C', NULL, 1, "  # noqa: S608
        "'imported', 'issued', 0, 9999999999999, NULL, NULL, NULL, NULL, :issued_at_ms, 0)"
    )

    async def run() -> None:
        engine = make_engine(db_url, pool_size=1)
        try:
            async with engine.begin() as conn:
                await conn.execute(statement, rows)
        finally:
            await engine.dispose()

    asyncio.run(run())


def spellings_of(db_url: str) -> dict[str, str | None]:
    return asyncio.run(stored(db_url))


def spread() -> list[str]:
    """Codes of every shape a row might hold: generated, imported (hyphens, I/L/O, digits),
    and what only a hand-written row could (lower case, spaces, a tab, non-ASCII letters,
    Unicode spaces at the ends); no two with one normalised form."""
    draw = random.Random(13)
    generated = [model.new_code(draw.randbytes) for _ in range(40)]
    imported = ["PART-0001", "OIL-LOO-1", "--X--Y", "Z-0-O", "ABCD", "UUUU-****"]
    odd = ["ab-cd-ef", " lead", "trail ", "mid dle", "tab\there", "\u0131i-\u00df",
           "\uff21\uff22\uff23", "\u00a0nbsp\u00a0", "ol\u0130", "-\t-q"]  # fmt: skip
    codes = generated + imported + odd
    assert len({model.normalize(c) for c in codes}) == len(codes)
    return codes


def test_0013_fills_each_code_with_exactly_model_normalize(db_url: str) -> None:
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0012")
    codes = spread()
    insert_codes(db_url, {code: n for n, code in enumerate(codes)})
    command.upgrade(config, "head")
    assert spellings_of(db_url) == {code: model.normalize(code) for code in codes}
    # Code older than 0013 still inserts codes without the column: NULL.
    insert_codes(db_url, {"LATER-1": 99})
    assert spellings_of(db_url)["LATER-1"] is None


# Codes stored before 0013 (issue times): `0ABCD` is filled in the first batch and loses its
# spelling in the second to `OABCD`, issued before it; of B110's group `B1L0` and `BLI0`
# were issued first, at one time, and `B1L0` comes first in code order; of PART0001's the
# first issued is first in code order too. The fillers are their own normalised forms.
FIRST_ISSUED = {"0ABCD": 200, "OABCD": 100, "BIL0": 50, "B1L0": 30, "BLI0": 30, "B110": 40,
                "PART-0001": 10, "PART0001": 20, "SOLO-1": 5}  # fmt: skip
LEFT_OUT = ["0ABCD", "B110", "BIL0", "BLI0", "PART0001"]


def test_0013_leaves_the_later_issued_of_confusable_codes_without_a_spelling_and_logs_them(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0012")
    fillers = {f"F{n:07d}": 1 for n in range(migration().BACKFILL_ROWS)}  # a batch's worth
    insert_codes(db_url, FIRST_ISSUED | fillers)
    with caplog.at_level(logging.WARNING, logger="cardcore.migrations"):
        command.upgrade(config, "head")
    spelled = spellings_of(db_url)
    expected = {code: model.normalize(code) for code in FIRST_ISSUED | fillers}
    assert spelled == expected | dict.fromkeys(LEFT_OUT)
    assert {spelled[k] for k in ("OABCD", "B1L0", "PART-0001")} == {"0ABCD", "B110", "PART0001"}

    logged = [r.getMessage() for r in caplog.records if r.name == "cardcore.migrations"]
    masked = [code[: len(code) // 3] + "#" * (len(code) - len(code) // 3) for code in LEFT_OUT]
    assert len(logged) == len(LEFT_OUT) + 1
    assert sorted(m.split()[3] for m in logged[:-1]) == sorted(masked)
    assert all("of campaign C (batch 1)" in m for m in logged[:-1])
    assert logged[-1].startswith("0013: 5 coupon codes have no spelling")
    assert not any(code in " ".join(logged) for code in LEFT_OUT if len(code) > 4)

    # The docstring's query lists the codes left out, each with the code keeping its form.
    query = str(migration().__doc__).split("in full")[1].split("A NULL")[0]
    query = " ".join(query.split(":", 1)[1].split())
    listed = asyncio.run(sql_rows(db_url, query))
    assert sorted((r["code"], r["kept"]) for r in listed) == [
        ("0ABCD", "OABCD"), ("B110", "B1L0"), ("BIL0", "B1L0"), ("BLI0", "B1L0"),
        ("PART0001", "PART-0001"),
    ]  # fmt: skip
    # The index refuses a second code with a normalised form taken.
    with pytest.raises(IntegrityError):
        asyncio.run(sql_execute(db_url, "UPDATE coupon_codes SET spelling = 'B110' "
                                "WHERE code = 'BIL0'"))  # fmt: skip


def test_0013_run_again_after_failing_half_way_ends_as_one_run(db_url: str) -> None:
    """A run that failed half way (PostgreSQL: the column, the index and some batches
    committed) runs again as it is: here the later-issued code of a pair got the spelling
    first and the earlier one none yet; the run again gives it to the first issued."""
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0012")
    insert_codes(db_url, FIRST_ISSUED)
    command.upgrade(config, "0013")
    once = spellings_of(db_url)
    asyncio.run(
        sql_execute(
            db_url,
            "UPDATE coupon_codes SET spelling = NULL WHERE code IN ('OABCD', 'SOLO-1')",
            "UPDATE coupon_codes SET spelling = '0ABCD' WHERE code = '0ABCD'",
            "UPDATE alembic_version SET version_num = '0012'",
        )
    )
    command.upgrade(config, "0013")  # each revision commits alone: 0013 failed, none after ran
    assert spellings_of(db_url) == once
    command.upgrade(config, "head")
