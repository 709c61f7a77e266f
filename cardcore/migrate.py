"""Schema migrations (alembic), run by `cardcore migrate` and checked before serving."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from cardcore import limits
from cardcore.db import DATABASE_ERRORS, async_url, make_engine
from cardcore.vault import Vault, VaultError, kek_check_value, unseal

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
    try:
        command.upgrade(_alembic_config(db_url), "head")
    except CommandError as exc:  # a revision this code does not know: a newer cardcore's
        raise NotMigrated(
            f"cannot migrate: {str(exc).splitlines()[0]} (this code's newest is "
            f"{head_revision()}: the database was migrated by a newer cardcore)"
        ) from None


# pg_advisory_lock key held while one connection migrates (not the writer's key: a server
# may run while its database is migrated).
_MIGRATE_LOCK_KEY = 0x636172646D696772  # "cardmigr"
_LOCK_POLL_S = 0.1


@contextlib.contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """One migration of a database at a time (migrations/env.py holds it around alembic's
    run): a second `cardcore migrate` waits for the first, up to MIGRATE_LOCK_WAIT_S, and then
    finds the schema current, instead of failing halfway (`relation already exists`,
    `database is locked`). PostgreSQL: an advisory lock of the session; SQLite: `flock` on
    `<file>.migrate-lock` beside the database; both end with the process, however it ends.
    The waiter polls, outside any transaction: a transaction waiting on PostgreSQL would hold
    a snapshot that the running migration's CREATE INDEX CONCURRENTLY waits for (deadlock)."""
    if connection.dialect.name == "postgresql":

        def taken() -> bool:
            query = text("SELECT pg_try_advisory_lock(:k)")
            locked = bool(connection.execute(query, {"k": _MIGRATE_LOCK_KEY}).scalar())
            connection.commit()
            return locked

        _wait_for(taken)
        yield  # the session's lock ends with the connection (migrations/env.py closes it)
        return
    name = connection.engine.url.database
    if not name or name == ":memory:":
        yield
        return
    real = Path(name).resolve()  # a symbolic link to the file meets the same lock
    path = real.with_name(real.name + ".migrate-lock")
    try:  # read-only: a lock file another user made (0644) still locks
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise NotMigrated(f"cannot open the migration lock {path}: {exc.strerror}") from None
    with os.fdopen(descriptor, "rb") as handle:

        def flocked() -> bool:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        _wait_for(flocked)
        yield  # closing the file releases it


def _wait_for(taken: Callable[[], bool]) -> None:
    wait_s = limits.MIGRATE_LOCK_WAIT_S
    deadline = time.monotonic() + wait_s
    while not taken():
        if time.monotonic() > deadline:
            raise NotMigrated(
                f"another `cardcore migrate` of this database has run for over {wait_s} s; "
                "run this one again when it ends"
            )
        time.sleep(_LOCK_POLL_S)


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config("sqlite://"))


def head_revision() -> str | None:
    return _scripts().get_current_head()


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
    if found is not None and found != head and not _known(found):
        raise NotMigrated(
            f"database schema is at {found}, newer than this code ({head}): run the cardcore "
            "that migrated it"
        )
    if found != head:
        raise NotMigrated(
            f"database schema is at {found or 'nothing'}, code needs {head}: run `cardcore migrate`"
        )


def _known(revision: str) -> bool:
    """Whether `revision` is one of this code's migrations."""
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


# The modules whose tables make the schema (each on the ledger's MetaData): what the
# migrations make, and what `alembic check` compares them with (migrations/env.py).
SCHEMA_MODULES = (
    "cardcore.ledger.schema", "cardcore.org.schema", "cardcore.members.schema",
    "cardcore.cards.schema", "cardcore.points.schema", "cardcore.coupons.schema",
    "cardcore.service_cards.schema", "cardcore.manager_cards.schema",
)  # fmt: skip


class WrongKek(Exception):
    """The key-encrypting key given is not the one the database was sealed with."""


async def check_kek(db_url: str, kek: bytes, *, now_ms: int | None = None) -> None:
    """The KEK is the database's: its check value (`vault.kek_check_value`) recorded on the
    first start with a key, compared on every later one; `WrongKek` for another key. A
    wrong key would find no card at the POS, count every PIN wrong, and seal what it made
    next so that the right key never opens it."""
    value = kek_check_value(kek)
    at = int(time.time() * 1000) if now_ms is None else now_ms
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            found = (await conn.execute(_KEK_READ)).scalar()
            # None: a new database, or one upgraded to 0019 with data sealed before it. The
            # key is first tried on what is sealed (a terminal's master key, a card number),
            # so an upgrade never records the wrong key as the database's own.
            sealed = None
            for query in _SEALED_READS if found is None else ():
                sealed = (await conn.execute(query)).first()
                if sealed is not None:
                    break
        if sealed is not None and not _opens(kek, sealed):
            raise WrongKek(
                "the key-encrypting key (kek / kek_file) does not open what this database "
                f"sealed (its check value is {value})"
            )
        if found is None:
            async with engine.begin() as conn:  # written first: no read lock to upgrade
                await conn.execute(_KEK_RECORD, {"value": value, "at": at})  # unless made
                found = (await conn.execute(_KEK_READ)).scalar()
    except DATABASE_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {reason(exc)}") from None
    finally:
        await engine.dispose()
    if found != value:
        raise WrongKek(
            f"the key-encrypting key (kek / kek_file) is not this database's: its check value "
            f"is {value}, the database's {found}"
        )


_KEK_READ = text("SELECT check_value FROM vault_keys WHERE name = 'kek'")
# One sealed value of the database, if any: a terminal's master key, else a card's number
# (each read one row by its primary key's order: cheap on a database of millions of cards).
_SEALED_READS = (
    text("SELECT 1, tid, tmk_sealed FROM pos_terminals ORDER BY tid LIMIT 1"),
    text("SELECT 2, token, pan_sealed FROM cards WHERE pan_sealed <> '' ORDER BY token LIMIT 1"),
)


def _opens(kek: bytes, row: Any) -> bool:
    """Whether `kek` opens a sealed value `_SEALED_READS` found, with its own context."""
    kind, name, sealed = row
    try:
        if kind == 1:
            unseal(kek, bytes.fromhex(sealed), b"tmk:" + name.encode())
        else:
            Vault(kek).open_text(f"pan:{name}", sealed)
    except (VaultError, ValueError):
        return False
    return True


_KEK_RECORD = text(
    "INSERT INTO vault_keys (name, check_value, created_at_ms) VALUES ('kek', :value, :at) "
    "ON CONFLICT (name) DO NOTHING"
)


def reason(exc: BaseException) -> str:
    """The driver's one-line reason, without SQL or connection parameters."""
    original = getattr(exc, "orig", None) or exc
    return str(original).splitlines()[0] if str(original) else type(original).__name__
