"""Schema migrations (alembic), run by `cardcore migrate` and checked before serving."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from cardcore.db import DATABASE_ERRORS, async_url, make_engine

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class NotMigrated(RuntimeError):
    """The database is missing or its schema is not the code's."""


def _alembic_config(db_url: str) -> AlembicConfig:
    ini = PROJECT_ROOT / "alembic.ini"
    if not ini.exists():
        raise NotMigrated(f"alembic.ini not found at {ini}: install cardcore from its source tree")
    cfg = AlembicConfig(str(ini))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return cfg


def _sqlite_path(db_url: str) -> Path | None:
    url = async_url(db_url)  # a URL that does not parse is refused in one line, not a traceback
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database)
    return None


def ensure_sqlite_dir(db_url: str) -> None:
    path = _sqlite_path(db_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def upgrade(db_url: str) -> None:
    """Bring the database to the newest schema. Synchronous: call it outside an event loop."""
    async_url(db_url)  # refuse unsupported URLs before alembic does anything
    ensure_sqlite_dir(db_url)
    command.upgrade(_alembic_config(db_url), "head")


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached."""


async def check_current(db_url: str) -> None:
    """Raise `NotMigrated` unless the database is at the newest schema, or
    `DatabaseUnavailable` when it cannot be reached. Never creates a database."""
    path = _sqlite_path(db_url)
    if path is not None and not path.is_file():
        raise NotMigrated(f"no database at {path}: run `cardcore migrate`")
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            try:
                query = text("SELECT version_num FROM alembic_version")
                found = (await conn.execute(query)).scalar()
            except DBAPIError:  # no alembic_version table: never migrated
                found = None
    except DATABASE_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {reason(exc)}") from None
    finally:
        await engine.dispose()
    head = head_revision()
    if found != head:
        raise NotMigrated(
            f"database schema is at {found or 'nothing'}, code needs {head}: run `cardcore migrate`"
        )


def reason(exc: BaseException) -> str:
    """The driver's one-line reason, without SQL or connection parameters."""
    original = getattr(exc, "orig", None) or exc
    return str(original).splitlines()[0] if str(original) else type(original).__name__
