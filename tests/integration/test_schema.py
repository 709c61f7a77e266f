"""The migrated database against `cardcore/ledger/schema.py`, and what the database itself
refuses (append-only triggers, CHECK constraints), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    UniqueConstraint,
    inspect,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from cardcore import migrate
from cardcore.cards import schema as cards_schema
from cardcore.coupons import schema as coupons_schema
from cardcore.db import make_engine
from cardcore.ledger import schema
from cardcore.ledger.service import Ledger
from cardcore.manager_cards import schema as manager_schema
from cardcore.members import schema as members_schema
from cardcore.org import schema as org_schema
from cardcore.points import schema as points_schema
from cardcore.service_cards import schema as service_schema
from tests.helpers import cardcore_env, run_activity, sql_execute, sql_rows

APPEND_ONLY = [t.name for t in schema.APPEND_ONLY_TABLES]

# A change that would matter in each append-only table, should the database allow it.
TAMPER_SET = {
    "ledger_batches": "hash = 'f' || substr(hash, 2)",
    "ledger_assets": "name = 'forged'",
    "ledger_account_events": "owner_id = 'forged'",
    "ledger_transfers": "metadata = '{}'",
    "ledger_entries": "posted_delta = posted_delta + 1",
    "ledger_failures": "code = 'forged'",
}


def _differences(conn: Connection, metadata: MetaData) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def _compare(db_url: str, metadata: MetaData) -> list[Any]:
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_differences, metadata)
    finally:
        await engine.dispose()


async def test_migrated_database_matches_the_metadata(db_url: str) -> None:
    # Autogenerate compares tables, columns, types, nullability, indexes, unique and foreign
    # keys. It does not compare CHECK constraints (see the next test) and, left at its
    # default, not server defaults (the schema has none). No false positives were needed.
    # The host's card and terminal tables share the ledger's MetaData.
    assert cards_schema.cards.metadata is schema.metadata
    assert {"cards", "pos_terminals", "pos_settlements"} <= set(schema.metadata.tables)
    assert org_schema.audit_log.metadata is members_schema.members.metadata is schema.metadata
    issue_5 = (points_schema.points_earnings, coupons_schema.coupon_codes,
               service_schema.service_entitlements, manager_schema.manager_cards)  # fmt: skip
    assert all(t.metadata is schema.metadata for t in issue_5)
    assert await _compare(db_url, schema.metadata) == []

    # The comparison bites: a column the database lacks is reported.
    altered = MetaData(naming_convention=schema.metadata.naming_convention)
    for table in schema.metadata.sorted_tables:
        table.to_metadata(altered)
    altered.tables["ledger_entries"].append_column(Column("forged", Integer, nullable=True))
    differences = await _compare(db_url, altered)
    assert [(d[0], d[3].name) for d in differences] == [("add_column", "forged")]


def _constraint_kind(constraint: Any) -> str:
    kinds = {
        CheckConstraint: "ck",
        UniqueConstraint: "uq",
        ForeignKeyConstraint: "fk",
        PrimaryKeyConstraint: "pk",
    }
    return kinds[type(constraint)]


def _sql(text_: str) -> str:
    """CHECK text without the parentheses and spacing each database adds."""
    return re.sub(r"[()\s]+", " ", text_).strip().lower()


def _database_names(conn: Connection) -> set[tuple[str, str, str, str]]:
    inspector = inspect(conn)
    found: set[tuple[str, str, str, str]] = set()
    for table in schema.metadata.sorted_tables:
        name = table.name
        found.add((name, "pk", str(inspector.get_pk_constraint(name)["name"]), ""))
        found |= {(name, "uq", str(u["name"]), "") for u in inspector.get_unique_constraints(name)}
        found |= {(name, "fk", str(f["name"]), "") for f in inspector.get_foreign_keys(name)}
        found |= {
            (name, "ck", str(c["name"]), _sql(c["sqltext"]))
            for c in inspector.get_check_constraints(name)
        }
        found |= {
            (name, "ix", str(i["name"]), "")
            for i in inspector.get_indexes(name)
            if "duplicates_constraint" not in i  # PostgreSQL: the index behind a UNIQUE
        }
    return found


async def test_every_constraint_and_index_has_the_name_and_check_the_metadata_gives(
    db_url: str,
) -> None:
    """Autogenerate skips CHECK constraints, so compare every named object by hand: a later
    migration that drops or alters a constraint by its metadata name must find it."""
    expected: set[tuple[str, str, str, str]] = set()
    for table in schema.metadata.sorted_tables:
        for c in table.constraints:
            kind = _constraint_kind(c)
            sqltext = _sql(str(c.sqltext)) if isinstance(c, CheckConstraint) else ""
            expected.add((table.name, kind, str(c.name), sqltext))
        expected |= {(table.name, "ix", str(i.name), "") for i in table.indexes}
    assert any(kind == "ck" for _, kind, _, _ in expected)

    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            found = await conn.run_sync(_database_names)
    finally:
        await engine.dispose()
    only_metadata, only_database = sorted(expected - found), sorted(found - expected)
    assert not only_metadata and not only_database, (
        f"named in the metadata only: {only_metadata}; in the database only: {only_database}"
    )


async def _snapshot(db_url: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for table in schema.APPEND_ONLY_TABLES:
        order = ", ".join(c.name for c in table.primary_key.columns)
        out[table.name] = await sql_rows(db_url, f"SELECT * FROM {table.name} ORDER BY {order}")  # noqa: S608
    return out


async def _refused(db_url: str, statement: str) -> str:
    try:
        await sql_execute(db_url, statement)
    except DBAPIError as exc:
        return str(exc)
    pytest.fail(f"the database accepted {statement}")


async def test_database_refuses_to_rewrite_or_erase_the_journal(
    db_url: str, ledger: Ledger
) -> None:
    await run_activity(ledger)
    await ledger.close()
    before = await _snapshot(db_url)
    # Row triggers only fire on rows: every table must have some for this test to mean much.
    assert all(before[name] for name in APPEND_ONLY), {k: len(v) for k, v in before.items()}

    postgres = db_url.startswith("postgresql")
    for name in APPEND_ONLY:
        attempts = [f"UPDATE {name} SET {TAMPER_SET[name]}", f"DELETE FROM {name}"]  # noqa: S608
        if postgres:
            attempts.append(f"TRUNCATE {name} CASCADE")
        for statement in attempts:
            message = await _refused(db_url, statement)
            verb = statement.split()[0]
            assert f"{verb} on {name} refused" in message, (statement, message)

    assert await _snapshot(db_url) == before

    # The control: the triggers guard the journal, not the tables the writer keeps current.
    await sql_execute(
        db_url,
        "UPDATE ledger_accounts SET purpose = 'renamed'",
        "DELETE FROM ledger_open_holds",
        "DELETE FROM ledger_outbox",
    )
    assert await sql_rows(db_url, "SELECT * FROM ledger_outbox") == []


# Writes that break a floor of `ledger_accounts`, each refused by the named CHECK constraint.
FLOOR_BREAKS = {
    "overdrawn": ("debits_posted = credits_posted + 1", "no_overdraft"),
    "over-held": ("debits_pending = credits_posted - debits_posted + 1", "no_overdraft"),
    "negative": ("credits_posted = -1", "balances_not_negative"),
    "flagged-over-existing-credit": ("no_overcredit = TRUE", "no_overcredit"),
}


async def _integrity_error(db_url: str, statement: str) -> str | None:
    try:
        await sql_execute(db_url, statement)
    except IntegrityError as exc:
        return str(exc)
    return None


async def test_check_constraints_hold_each_account_to_its_floors(
    db_url: str, ledger: Ledger
) -> None:
    activity = await run_activity(ledger)
    await ledger.close()
    source, wallet = activity.source, activity.wallets[0]
    query = "SELECT * FROM ledger_accounts WHERE id = :i"
    before = await sql_rows(db_url, query, i=wallet)
    for case, (assignment, constraint) in FLOOR_BREAKS.items():
        statement = f"UPDATE ledger_accounts SET {assignment} WHERE id = {wallet}"  # noqa: S608
        refusal = await _integrity_error(db_url, statement)
        assert refusal is not None, f"{case}: the database accepted {assignment}"
        assert constraint in refusal, (case, refusal)
    assert await sql_rows(db_url, query, i=wallet) == before

    # The same overdraft is fine on an account without no_overdraft, and the wallet may go
    # down to its floor exactly: the constraints refuse no more than they should.
    await sql_execute(
        db_url,
        f"UPDATE ledger_accounts SET debits_posted = credits_posted + 1 "  # noqa: S608
        f"WHERE id = {source}",
        f"UPDATE ledger_accounts SET debits_posted = credits_posted - debits_pending "  # noqa: S608
        f"WHERE id = {wallet}",
    )
    rows = await sql_rows(db_url, "SELECT * FROM ledger_accounts ORDER BY id")
    by_id = {r["id"]: r for r in rows}
    assert by_id[source]["debits_posted"] == by_id[source]["credits_posted"] + 1
    floor = by_id[wallet]["credits_posted"]
    assert by_id[wallet]["debits_posted"] + by_id[wallet]["debits_pending"] == floor


def _tables(db_url: str) -> set[str]:
    async def names() -> set[str]:
        engine = make_engine(db_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(names())


def test_downgrade_to_base_then_upgrade_to_head_rebuilds_the_schema(db_url: str) -> None:
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "base")
    assert _tables(db_url) <= {"alembic_version"}
    with pytest.raises(migrate.NotMigrated):
        asyncio.run(migrate.check_current(db_url))

    command.upgrade(config, "head")
    asyncio.run(migrate.check_current(db_url))
    assert asyncio.run(_compare(db_url, schema.metadata)) == []
    # The triggers came back with the tables (on PostgreSQL, so did their function).
    asyncio.run(
        sql_execute(
            db_url,
            "INSERT INTO ledger_batches (seq, prev_hash, hash, ops, committed_at_ms) "  # noqa: S608
            f"VALUES (1, '{'0' * 64}', '{'1' * 64}', 0, 0)",
        )
    )
    with pytest.raises(DBAPIError, match="append-only"):
        asyncio.run(sql_execute(db_url, "DELETE FROM ledger_batches"))


async def test_database_refuses_to_rewrite_or_erase_the_audit_log_and_consents(
    db_url: str,
) -> None:
    await sql_execute(
        db_url,
        'INSERT INTO org_audit_log (at_ms, user_id, "user", token_id, role, action, '
        "object_kind, object_id, entity, store, before, after) VALUES "
        "(1, 1, 'root', 1, 'hq_admin', 'store.create', 'store', 'S1', 'LE1', 'S1', NULL, '{}')",
        "INSERT INTO member_consents (member_id, purpose, granted, source, at_ms, user_id) "
        "VALUES (1, 'marketing', TRUE, 'counter', 1, 1)",
    )
    tables = {"org_audit_log": "action = 'forged'", "member_consents": "granted = FALSE"}
    before = {t: await sql_rows(db_url, f"SELECT * FROM {t}") for t in tables}  # noqa: S608
    for table, change in tables.items():
        for statement in (f"UPDATE {table} SET {change}", f"DELETE FROM {table}"):  # noqa: S608
            message = await _refused(db_url, statement)
            assert f"{statement.split()[0]} on {table} refused" in message, message
    assert {t: await sql_rows(db_url, f"SELECT * FROM {t}") for t in tables} == before  # noqa: S608


def test_cards_from_before_0004_are_numbered_in_issue_order_and_keep_working(
    db_url: str,
) -> None:
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0003")
    rows = [("tok-c", 30), ("tok-a", 10), ("tok-b", 10)]  # created_at_ms ties sort by token
    asyncio.run(
        sql_execute(
            db_url,
            *[
                "INSERT INTO cards (token, pan_masked, legal_entity, account_id, expires, state, "  # noqa: S608
                f"balance_max, created_at_ms) VALUES ('{t}', '628888******0001', 'LE', {i}, "
                f"'', 'active', 0, {at})"
                for i, (t, at) in enumerate(rows, start=1)
            ],
        )
    )
    command.upgrade(config, "head")
    numbered = asyncio.run(sql_rows(db_url, "SELECT token, id, updated_at_ms, class_code, "
                                    "pin_failures FROM cards ORDER BY id"))  # fmt: skip
    assert [(r["token"], r["id"], r["updated_at_ms"]) for r in numbered] == [
        ("tok-a", 1, 10),
        ("tok-b", 2, 10),
        ("tok-c", 3, 30),
    ]
    assert {(r["class_code"], r["pin_failures"]) for r in numbered} == {("", 0)}


def test_downgrade_below_0004_is_refused_once_two_cards_share_an_account(db_url: str) -> None:
    asyncio.run(
        sql_execute(
            db_url,
            *[
                "INSERT INTO cards (token, pan_masked, legal_entity, account_id, expires, state, "  # noqa: S608
                "balance_max, created_at_ms, id, pan_sealed, secret_sealed, class_code, "
                "member_id, store, named, pvv, pin_failures, replaced_by, updated_at_ms) VALUES "
                f"('{t}', 'x', 'LE', 7, '', '{state}', 0, 0, {i}, '', '', '', NULL, 'S1', "
                f"FALSE, '', 0, NULL, 0)"
                for i, (t, state) in enumerate((("old", "replaced"), ("new", "active")), start=1)
            ],
        )
    )
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0004")  # later revisions go down cleanly
    with pytest.raises(RuntimeError, match="replaced cards share value accounts"):
        command.downgrade(config, "0003")
    migrate.upgrade(db_url)  # still at 0004, nothing half done: up again to head
    asyncio.run(migrate.check_current(db_url))


def test_packages_from_before_0007_keep_their_products_refund_terms(db_url: str) -> None:
    """0007: a package sold before it gets its product's terms as they are (the terms of its
    day were not kept); one whose product is gone refunds nothing."""
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0006")
    definition = (
        '{"price_fen": 10000, "refund_after_expiry": true, "refund_fee_fen": 150, '
        '"refund_policy": "pro_rata_after_use_price", "single_use_price_fen": 1200, '
        '"stores": [], "uses": 10, "validity_months": 12}'
    )
    packages = [(1, "TEN"), (2, "GONE"), (20_003, "TEN")]  # the last in a later fill
    asyncio.run(
        sql_execute(
            db_url,
            "INSERT INTO service_products (code, name, legal_entity, definition, state, "  # noqa: S608
            f"created_at_ms, updated_at_ms) VALUES ('TEN', 'Ten', 'LE1', '{definition}', "
            "'active', 0, 0)",
            *[
                "INSERT INTO service_entitlements (id, product, holder, member_id, store, "  # noqa: S608
                "uses_total, uses_left, price_fen, sold_ms, expires_ms, state, sale_key, "
                f"refund_key, refunded_fen, updated_at_ms) VALUES ({i}, '{code}', 7, NULL, "
                f"'S1', 10, 5, 10000, 0, 1, 'active', 'S1/k{i}', NULL, 0, 0)"
                for i, code in packages
            ],
        )
    )
    command.upgrade(config, "head")
    rows = asyncio.run(sql_rows(db_url, "SELECT id, refund_policy, refund_fee_fen, "
                                "single_use_price_fen, refund_after_expiry "
                                "FROM service_entitlements ORDER BY id"))  # fmt: skip
    terms = [(r["id"], r["refund_policy"], r["refund_fee_fen"], r["single_use_price_fen"],
              bool(r["refund_after_expiry"])) for r in rows]  # fmt: skip
    assert terms == [
        (1, "pro_rata_after_use_price", 150, 1200, True),
        (2, "none", 0, 0, False),
        (20_003, "pro_rata_after_use_price", 150, 1200, True),
    ]
    assert asyncio.run(_compare(db_url, schema.metadata)) == []


async def test_the_migrations_make_the_schema_the_code_declares(db_url: str) -> None:
    """`alembic check` compared the ledger's tables only and proposed dropping every other
    table (an operations review): it compares them all, and finds nothing to do."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "alembic", "-c", str(migrate.PROJECT_ROOT / "alembic.ini"), "check"],
        cwd=migrate.PROJECT_ROOT,
        env=cardcore_env(CARDCORE_DB_URL=db_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip  (its own process: this one has imported every schema module already)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No new upgrade operations detected" in done.stdout + done.stderr


async def test_a_database_newer_than_the_code_is_refused_in_one_line(db_url: str) -> None:
    """A database a newer cardcore migrated was told to `cardcore migrate`, and that
    printed a traceback ("Can't locate revision")."""
    await sql_execute(db_url, "UPDATE alembic_version SET version_num = '0999'")
    with pytest.raises(migrate.NotMigrated, match="newer than this code"):
        await migrate.check_current(db_url)
    with pytest.raises(migrate.NotMigrated, match="migrated by a newer cardcore"):
        await asyncio.to_thread(migrate.upgrade, db_url)
