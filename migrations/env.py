"""Alembic environment, async: runs migrations over the same engines cardcore uses.

On PostgreSQL every migration runs with lock and statement timeouts, so a migration that
would wait behind live traffic fails fast instead of stalling the ledger.
"""

import asyncio
import importlib

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from cardcore import config as cardcore_config
from cardcore import limits
from cardcore.db import make_engine
from cardcore.ledger.schema import metadata
from cardcore.migrate import SCHEMA_MODULES, migration_lock

# Every table is on the ledger's MetaData once its module is imported: all of them, so that
# `alembic check` and autogenerate compare the whole schema (with the ledger's alone they
# proposed dropping every other table).
for _module in SCHEMA_MODULES:
    importlib.import_module(_module)

target_metadata = metadata


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    return url or cardcore_config.load().db_url


def _run(connection: Connection) -> None:
    with migration_lock(connection):
        _run_locked(connection)


def _run_locked(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SET lock_timeout = {limits.DB_LOCK_TIMEOUT_MS}"))
        connection.execute(text(f"SET statement_timeout = {limits.DB_STATEMENT_TIMEOUT_MS}"))
        connection.commit()  # session settings; the migrations' transaction is alembic's own
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # Each revision commits on its own: the locks one takes (a column added to a busy
        # table) are held for that revision, not for every revision after it, and a
        # revision that commits in steps (`autocommit_block`, 0013) starts clean.
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = make_engine(_url(), pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run cardcore migrate")
asyncio.run(_run_async())
