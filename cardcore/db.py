"""Database engines for SQLite (embedded) and PostgreSQL (production).

SQLite runs in WAL mode with `synchronous=FULL` (a commit survives power loss); PostgreSQL with
`synchronous_commit=on`. Transactions on SQLite begin explicitly; a connection opened with
`execution_options(sqlite_begin="IMMEDIATE")` takes the write lock at BEGIN, as the writer does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
from sqlalchemy import String, Table, bindparam, event, func, select, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL, Connection, Dialect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement

from cardcore import limits


class DatabaseUrlError(ValueError):
    """The database URL is malformed or names an unsupported engine."""


# What reaching or using a database can raise besides our own errors (for the CLI's one line).
# asyncpg's own errors come from statements run at the driver (records, the writer's bulk writes);
# SQLAlchemy's pool raises its own TimeoutError when no connection is free in time.
DATABASE_ERRORS = (
    OSError, DBAPIError, TimeoutError, PoolTimeout, asyncpg.PostgresError, asyncpg.InterfaceError,
)  # fmt: skip


def async_url(url: str) -> URL:
    """Accept `sqlite:///file`, `postgresql://...` and their async driver spellings; libpq's
    `sslmode=` is asyncpg's `ssl=`. Refused with a one-line error (the password never in
    it): a URL that does not parse, a port outside 1..65535, an in-memory SQLite database
    (each connection would see its own), another database."""
    try:
        parsed = make_url(url)
        port = parsed.port
    except Exception as exc:
        raise DatabaseUrlError(f"not a database URL: {_without_password(url)!r}") from exc
    if port is not None and not 1 <= port <= _PORT_MAX:
        raise DatabaseUrlError(f"the database port is 1..{_PORT_MAX}, not {port}")
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise DatabaseUrlError("SQLite needs a file (sqlite:///path.db), not memory")
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg", query=_pg_query(parsed.query))
    raise DatabaseUrlError(f"unsupported database {backend!r}: use sqlite or postgresql")


# A PostgreSQL URL's parameters (libpq's names, or asyncpg's `ssl`): what each becomes.
_PG_PARAMETERS = {"sslmode": "ssl", "ssl": "ssl", "connect_timeout": "timeout",
                  "application_name": "application_name"}  # fmt: skip


def _pg_query(query: Mapping[str, str | tuple[str, ...]]) -> dict[str, str]:
    """The URL's parameters as `make_engine` takes them; any other is refused by name (its
    value could hold a secret), as is one given twice or a connect_timeout that is not
    1..DB_CONNECT_TIMEOUT_S_MAX seconds. Before, asyncpg was handed them and failed with a
    traceback."""
    out: dict[str, str] = {}
    for name, value in query.items():
        if name not in _PG_PARAMETERS:
            known = ", ".join(sorted(_PG_PARAMETERS))
            raise DatabaseUrlError(f"the database URL parameter {name!r} is not one of {known}")
        if not isinstance(value, str) or _PG_PARAMETERS[name] in out:
            raise DatabaseUrlError(f"the database URL parameter {name!r} is given twice")
        out[_PG_PARAMETERS[name]] = value
    timeout = out.get("timeout")
    most = limits.DB_CONNECT_TIMEOUT_S_MAX
    if timeout is not None and not (
        re.fullmatch(r"[0-9]{1,6}", timeout) and 1 <= int(timeout) <= most
    ):
        raise DatabaseUrlError(
            f"connect_timeout is 1..{limits.DB_CONNECT_TIMEOUT_S_MAX} seconds, not {timeout!r}"
        )
    return out


_PORT_MAX = 65_535


def _without_password(url: str) -> str:
    """`scheme://user:secret@host` as `scheme://user:***@host`, for messages."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def make_engine(url: str, *, pool_size: int = limits.DB_POOL_SIZE_MAX) -> AsyncEngine:
    target = async_url(url)
    if target.get_backend_name() == "sqlite":
        engine = create_async_engine(
            target,
            pool_size=pool_size,
            max_overflow=0,
            hide_parameters=True,  # an error's text (logged) never holds a code or a token
            connect_args={"timeout": limits.SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        _sqlite_events(engine)
        return engine
    query = dict(target.query)  # `async_url` left ssl, timeout and application_name: text
    timeout = int(str(query.pop("timeout", limits.DB_CONNECT_TIMEOUT_S)))
    name = str(query.pop("application_name", "cardcore"))
    return create_async_engine(
        target.set(query=query),
        pool_size=pool_size,
        max_overflow=0,
        hide_parameters=True,
        pool_timeout=timeout,
        connect_args={
            "timeout": timeout,
            "command_timeout": limits.DB_STATEMENT_TIMEOUT_MS / 1000,
            "statement_cache_size": limits.DB_STATEMENTS_CACHED_MAX,
            "server_settings": {
                "synchronous_commit": "on",
                "statement_timeout": str(limits.DB_STATEMENT_TIMEOUT_MS),
                "lock_timeout": str(limits.DB_LOCK_TIMEOUT_MS),
                "application_name": name,
                "plan_cache_mode": "force_custom_plan",
            },
        },
    )


def _sqlite_events(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's implicit transactions are unreliable).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA case_sensitive_like=ON")  # a prefix matches as on PostgreSQL
        cursor.execute(f"PRAGMA busy_timeout={limits.SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA wal_autocheckpoint={limits.SQLITE_WAL_CHECKPOINT_PAGES_MAX}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        assert mode in ("DEFERRED", "IMMEDIATE"), mode
        conn.exec_driver_sql(f"BEGIN {mode}")


class Statement:
    """A statement SQLAlchemy built, to be run many times: on PostgreSQL (a `dialect`) also
    compiled once into its SQL for asyncpg, the order of its named parameters and their
    conversions (SQLAlchemy's bind processors, None for most), docs/adr/0008."""

    __slots__ = ("clause", "given", "names", "processors", "sql")

    def __init__(
        self, clause: Any, dialect: Dialect | None, column_keys: Sequence[str] | None = None
    ) -> None:
        self.clause = clause
        self.sql = ""
        self.names: tuple[str, ...] = ()
        self.processors: tuple[Callable[[Any], Any] | None, ...] = ()
        self.given: dict[str, Any] = {}
        if dialect is not None:
            compiled = clause.compile(dialect=dialect, column_keys=column_keys)
            self.sql = str(compiled)
            self.names = tuple(compiled.positiontup or ())
            self.processors = tuple(
                compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
                for name in self.names
            )
            # Values the statement carries itself (`.limit(1)`); the rest are required.
            self.given = {
                name: compiled.binds[name].value
                for name in self.names
                if not compiled.binds[name].required
            }

    def args(self, params: dict[str, Any]) -> list[Any]:
        out = []
        for name, convert in zip(self.names, self.processors, strict=True):
            value = params[name] if name in params or name not in self.given else self.given[name]
            out.append(value if convert is None else convert(value))
        return out


def unnest_insert(table: Table, names: Sequence[str], dialect: Dialect, first: int) -> str:
    """`INSERT INTO table (names) SELECT * FROM unnest($first::T[], ...)` on PostgreSQL:
    rows as one array parameter per column, numbered from `first`, so the text is the same
    whatever the number of rows (one prepared statement). Each array is of the column's type
    without its length (VARCHAR, not VARCHAR(64)): an explicit cast would cut a long
    string, where the INSERT's own assignment refuses it."""
    quote = dialect.identifier_preparer.quote
    arrays = []
    for i, name in enumerate(names):
        bare = type(table.c[name].type)().compile(dialect=dialect)
        arrays.append(f"${first + i}::{bare}[]")
    columns = ", ".join(quote(name) for name in names)
    # Names from the shared MetaData only; every value is a parameter.
    into = f"INSERT INTO {quote(table.name)} ({columns})"
    return f"{into} SELECT * FROM unnest({', '.join(arrays)})"  # noqa: S608


def array_of(column: ColumnElement[Any]) -> ARRAY[Any]:
    """The PostgreSQL array type of a list parameter matched against `column`: its own type,
    a string without its length (a cast to VARCHAR(n)[] would cut a longer value to n
    characters, and it would match the row those name)."""
    return ARRAY(String() if isinstance(column.type, String) else column.type)


def each_value(
    name: str,
    column: ColumnElement[Any],
    build: Callable[[ColumnElement[bool]], Any],
    *,
    one: bool,
    postgres: bool,
) -> Any:
    """The query `build(match)` for every value of the list parameter `name` (distinct
    values), `match` being the condition on `column`. On PostgreSQL one probe of the index
    on `column` per value, whatever the table's statistics say: a lateral subquery per
    value, kept from being flattened into a join by its LIMIT 1 (`one`: at most one row a
    value) or OFFSET 0. Written as `column = ANY(list)` the plan rests on statistics, and
    without them (a new table, autovacuum off) PostgreSQL took `client = $1` for selective
    and filtered every transfer of the client: a batch's key lookup grew with the journal
    (18 ms at 110,000 transfers, 0.5 ms once analyzed; docs/benchmarks.md, sixth session),
    and the holds and give-backs lookups turned into full scans from a few dozen ids on.
    On SQLite `column IN (...)`."""
    if not postgres:
        return build(column.in_(bindparam(name, expanding=True)))
    values = func.unnest(bindparam(name, type_=array_of(column))).table_valued("v")
    values = values.render_derived()
    query = build(column == values.c.v)
    probe = (query.limit(1) if one else query.offset(0)).lateral()
    return select(probe).select_from(values).join(probe, true())
