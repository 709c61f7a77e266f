"""A unit of work over the host's record tables (organization, members, cards): the few verbs
the admin services need, so services hold rules and never SQL.

    async with records.begin() as uow:       # one transaction; leaving by an error rolls back
        row = await uow.get("org_stores", id="S1")
        await uow.update("org_stores", {"id": "S1"}, {"state": "closed"})
        await uow.audit(principal, ...)

`records.read()` is the same on a connection without a transaction of its own. Tables are
named as in the shared MetaData; filters are equalities (a list or tuple means IN).

On PostgreSQL each statement is built by SQLAlchemy once, compiled once, and run at the
driver (asyncpg, its prepared statement cached per connection) inside a transaction the
driver holds; SQLAlchemy keeps the pool (docs/adr/0008). SQLite runs the same statements
through SQLAlchemy.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Integer,
    Table,
    any_,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import greenlet_spawn

from cardcore import limits
from cardcore.cards import schema as _cards_tables  # noqa: F401 - registers the tables
from cardcore.coupons import schema as _coupon_tables  # noqa: F401
from cardcore.db import Statement, array_of, each_value, unnest_insert
from cardcore.ledger.schema import metadata
from cardcore.manager_cards import schema as _manager_tables  # noqa: F401
from cardcore.members import schema as _member_tables  # noqa: F401
from cardcore.org import schema as _org_tables  # noqa: F401
from cardcore.org.model import Place, Principal
from cardcore.points import schema as _points_tables  # noqa: F401
from cardcore.service_cards import schema as _service_tables  # noqa: F401


class Deadlock(Exception):
    """PostgreSQL ended a statement to break a deadlock: the statement changed nothing."""


class Conflict(Exception):
    """A write broke a unique rule (two requests made the same thing at once)."""


# Built statements by query shape (verb, table, filter columns and kinds, ...): a shape is
# built and its cache key computed once (on PostgreSQL compiled once too), then executed with
# its values as parameters. The shapes are the code's own queries, a bounded set; the bound
# is a safety net.
_built: dict[tuple[Any, ...], Statement] = {}


def _kind(value: object) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return "in"
    return "null" if value is None else "eq"


def _shape(where: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((name, _kind(value)) for name, value in where.items())


def _params(where: dict[str, Any]) -> dict[str, Any]:
    return {
        "w_" + name: list(value) if _kind(value) == "in" else value
        for name, value in where.items()
        if value is not None
    }


def _increment(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and value[0] == "+"


def _like_escaped(prefix: str) -> str:
    """A LIKE prefix matched literally (escape character `/`)."""
    return prefix.replace("/", "//").replace("%", "/%").replace("_", "/_")


@functools.cache
def _columns(table: str) -> frozenset[str]:
    return frozenset(metadata.tables[table].c.keys())


def _built_statement(
    shape: tuple[Any, ...],
    build: Callable[[], Any],
    dialect: Dialect | None,
    column_keys: Sequence[str] | None = None,
) -> Statement:
    found = _built.get(shape)
    if found is None:
        if len(_built) >= limits.RECORDS_STATEMENTS_MAX:
            _built.clear()
        found = _built[shape] = Statement(build(), dialect, column_keys)
    return found


class Unit:
    """The verbs over one connection: on PostgreSQL the asyncpg connection (`driver`;
    statements run there, in the transaction it holds), on SQLite SQLAlchemy's (`conn`).
    One statement at a time: a unit's verbs are awaited in turn, never gathered."""

    def __init__(
        self, dialect: Dialect, *, conn: AsyncConnection | None = None, driver: Any = None
    ) -> None:
        assert (conn is None) != (driver is None)
        self._conn = conn
        self.driver = driver
        self.postgres = dialect.name == "postgresql"
        self._dialect = dialect if driver is not None else None

    @property
    def conn(self) -> AsyncConnection:
        assert self._conn is not None, "SQLAlchemy's connection is SQLite's"
        return self._conn

    @staticmethod
    def table(name: str) -> Table:
        return metadata.tables[name]

    def _where(self, t: Table, shape: tuple[tuple[str, str], ...]) -> list[ColumnElement[bool]]:
        """The filter of a shape. A list is one array parameter on PostgreSQL (`= ANY`: one
        statement text whatever its length, so one prepared statement), an expanding IN on
        SQLite."""
        out: list[ColumnElement[bool]] = []
        for name, kind in shape:
            column = t.c[name]
            if kind == "in" and self.postgres:
                out.append(column == any_(bindparam("w_" + name, type_=array_of(column))))
            elif kind == "in":
                out.append(column.in_(bindparam("w_" + name, expanding=True)))
            elif kind == "null":
                out.append(column.is_(None))
            else:
                out.append(column == bindparam("w_" + name))
        return out

    def _statement(self, shape: tuple[Any, ...], build: Callable[[], Any]) -> Statement:
        return _built_statement(shape, build, self._dialect)

    async def _rows(self, s: Statement, params: dict[str, Any]) -> Sequence[Any]:
        """The result rows, as mappings by column name."""
        if self.driver is not None:
            return list(await self.driver.fetch(s.sql, *s.args(params)))
        return [r._mapping for r in (await self.conn.execute(s.clause, params)).all()]

    async def _scalar(self, s: Statement, params: dict[str, Any]) -> Any:
        if self.driver is not None:
            return await self.driver.fetchval(s.sql, *s.args(params))
        return (await self.conn.execute(s.clause, params)).scalar_one()

    async def _changed(self, s: Statement, params: dict[str, Any]) -> int:
        """Run an UPDATE or DELETE; how many rows it changed."""
        try:
            if self.driver is not None:
                status = await self.driver.execute(s.sql, *s.args(params))
                return int(status.rsplit(" ", 1)[-1])
            return int((await self.conn.execute(s.clause, params)).rowcount)
        except (IntegrityError, asyncpg.IntegrityConstraintViolationError):
            raise Conflict(s.clause.table.name) from None

    async def get(self, table: str, **where: Any) -> dict[str, Any] | None:
        t = self.table(table)
        shape = _shape(where)
        statement = self._statement(
            ("get", self.postgres, table, shape),
            lambda: select(t).where(*self._where(t, shape)).limit(1),
        )
        rows = await self._rows(statement, _params(where))
        return dict(rows[0]) if rows else None

    async def select_one(
        self, name: str, build: Callable[[], Any], params: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The first row of a select an adapter's schema builds (several tables read in one
        round trip, say), as a mapping by column label; None when there is none. `name`
        names it (in logs and tests); it is built once per dialect and builder, and reused."""
        statement = self._statement(("select_one", self.postgres, name, build), build)
        rows = await self._rows(statement, params)
        return dict(rows[0]) if rows else None

    async def select_all(
        self, name: str, build: Callable[[], Any], params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Every row of a select an adapter's schema builds (a grouping the database does,
        say), as mappings by column label. The select bounds its own rows (a `limit`
        parameter); built and reused as `select_one`'s."""
        statement = self._statement(("select_all", self.postgres, name, build), build)
        return [dict(r) for r in await self._rows(statement, params)]

    async def find(
        self,
        table: str,
        where: dict[str, Any] | None = None,
        *,
        order: str = "id",
        after: object | None = None,
        limit: int = limits.PAGE_LIMIT_MAX,
        descending: bool = False,
        at_least: dict[str, int] | None = None,
        starts_with: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows in `order`, after the cursor; `limit + 1` of them, so a page knows if there
        is more (callers of a full list pass their own limit and ignore the extra row)."""
        t = self.table(table)
        where, at_least, starts_with = where or {}, at_least or {}, starts_with or {}
        shape = _shape(where)
        floors, prefixes = tuple(at_least), tuple(starts_with)

        def build() -> Any:
            key = t.c[order]
            query = select(t).where(*self._where(t, shape))
            for name in floors:
                query = query.where(t.c[name] >= bindparam("min_" + name))
            for name in prefixes:
                query = query.where(t.c[name].startswith(bindparam("pre_" + name), escape="/"))
            if after is not None:
                cursor: BindParameter[Any] = bindparam("after")
                query = query.where(key < cursor if descending else key > cursor)
            order_by = key.desc() if descending else key
            return query.order_by(order_by).limit(bindparam("limit", type_=Integer))

        statement = self._statement(
            (
                "find",
                self.postgres,
                table,
                shape,
                order,
                after is None,
                descending,
                floors,
                prefixes,
            ),
            build,
        )
        params = _params(where) | {"limit": limit + 1}
        params |= {"min_" + name: low for name, low in at_least.items()}
        params |= {"pre_" + name: _like_escaped(p) for name, p in starts_with.items()}
        if after is not None:
            params["after"] = after
        return [dict(r) for r in await self._rows(statement, params)]

    async def find_each(
        self, table: str, column: str, values: Sequence[Any], where: dict[str, Any], *,
        limit_each: int,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The rows whose `column` is one of `values` and that match `where`, at most
        `limit_each` a value, in no order. On PostgreSQL one statement, an index probe per
        value whatever the table's statistics (`db.each_value`): `column = ANY(...)` beside
        another condition can be planned as a pass over every row of that other condition
        when the table was never analyzed (the points holdings read fetched every holder's
        lots: docs/benchmarks.md, eighth session). On SQLite a query per value."""
        t = self.table(table)
        shape = _shape(where)
        params = _params(where) | {"limit_each": limit_each}

        def matching(match: ColumnElement[bool]) -> Any:
            query = select(t).where(match, *self._where(t, shape))
            return query.limit(bindparam("limit_each", type_=Integer))

        wanted = sorted(set(values))
        if self.postgres:
            statement = self._statement(
                ("find_each", table, column, shape),
                lambda: each_value("values", t.c[column], matching, one=False, postgres=True),
            )
            return [dict(r) for r in await self._rows(statement, params | {"values": wanted})]
        statement = self._statement(
            ("find_one_value", table, column, shape),
            lambda: matching(t.c[column] == bindparam("value")),
        )
        out = []
        for value in wanted:
            out += [dict(r) for r in await self._rows(statement, params | {"value": value})]
        return out

    async def find_unique(
        self, table: str, column: str, values: Sequence[Any], where: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The rows whose `column` is one of `values` and that match `where`, where at most
        one row matches each value (a unique key), in no order. One statement on either
        database: on PostgreSQL `find_each` (an index probe per value), on SQLite one `IN`
        (`find_each` there is a statement per value)."""
        wanted = sorted(set(values))
        if not wanted:
            return []
        if self.postgres:
            return await self.find_each(table, column, wanted, where, limit_each=1)
        return await self.find(table, where | {column: wanted}, order=column, limit=len(wanted))

    async def count(
        self, table: str, *, at_least: dict[str, int] | None = None, **where: Any
    ) -> int:
        """How many rows match `where`, and, with `at_least`, have each named column at
        least its bound."""
        t = self.table(table)
        shape = _shape(where)
        floors = tuple(at_least or {})

        def build() -> Any:
            query = select(func.count()).select_from(t).where(*self._where(t, shape))
            for name in floors:
                query = query.where(t.c[name] >= bindparam("min_" + name))
            return query

        statement = self._statement(("count", self.postgres, table, shape, floors), build)
        params = _params(where) | {"min_" + name: low for name, low in (at_least or {}).items()}
        return int(await self._scalar(statement, params))

    async def total(self, table: str, column: str, **where: Any) -> int:
        t = self.table(table)
        shape = _shape(where)
        statement = self._statement(
            ("total", self.postgres, table, column, shape),
            lambda: select(func.coalesce(func.sum(t.c[column]), 0)).where(*self._where(t, shape)),
        )
        return int(await self._scalar(statement, _params(where)))

    async def totals(
        self, table: str, column: str, by: tuple[str, ...], **where: Any
    ) -> dict[tuple[Any, ...], int]:
        """Sums of `column` over the matching rows, by the values of the `by` columns."""
        t = self.table(table)
        shape = _shape(where)

        labels = [f"by_{i}" for i in range(len(by))]

        def build() -> Any:
            keys = [t.c[name] for name in by]
            named = [key.label(label) for key, label in zip(keys, labels, strict=True)]
            total = func.sum(t.c[column]).label("total")
            return select(*named, total).where(*self._where(t, shape)).group_by(*keys)

        statement = self._statement(("totals", self.postgres, table, column, by, shape), build)
        rows = await self._rows(statement, _params(where))
        return {tuple(r[label] for label in labels): int(r["total"]) for r in rows}

    async def insert(self, table: str, values: dict[str, Any] | list[dict[str, Any]]) -> int | None:
        """Insert one row (its generated integer key back) or many; Conflict on a duplicate;
        ValueError for a value of no column (a caller's slip, never silently dropped)."""
        columns = _columns(table)
        rows = values if isinstance(values, list) else [values]
        for row in rows:
            if not row.keys() <= columns:
                unknown = ", ".join(sorted(row.keys() - columns))
                raise ValueError(f"{table} has no column {unknown}")
        try:
            if self.driver is None:
                return await self._insert_sqlalchemy(table, values)
            if isinstance(values, list):
                for keys, group in _runs(values):
                    s = self._insert_statement(table, keys)
                    await self.driver.executemany(s.sql, [s.args(row) for row in group])
                return None
            s = self._insert_statement(table, tuple(values))
            key = await self.driver.fetchval(s.sql, *s.args(values))
        except (IntegrityError, asyncpg.IntegrityConstraintViolationError):
            raise Conflict(table) from None
        if key is None:
            key = _given_key(self.table(table), values)
        return key if isinstance(key, int) else None

    def _insert_statement(self, table: str, keys: tuple[str, ...]) -> Statement:
        """INSERT of these columns; RETURNING the generated key when the table makes one."""
        t = self.table(table)

        def build() -> Any:
            made = t.autoincrement_column
            statement = insert(t)
            return statement if made is None or made.name in keys else statement.returning(made)

        return _built_statement(("insert", True, table, keys), build, self._dialect, keys)

    async def _insert_sqlalchemy(
        self, table: str, values: dict[str, Any] | list[dict[str, Any]]
    ) -> int | None:
        s = self._statement(("insert", False, table), lambda: insert(self.table(table)))
        if isinstance(values, list):
            if values:
                await self.conn.execute(s.clause, values)
            return None
        result = await self.conn.execute(s.clause, values)
        key = result.inserted_primary_key
        return int(key[0]) if key and isinstance(key[0], int) else None

    async def update(
        self,
        table: str,
        where: dict[str, Any],
        values: dict[str, Any],
        *,
        at_most: dict[str, int] | None = None,
        at_least: dict[str, int] | None = None,
    ) -> int:
        """Update the matching rows; `at_most` guards `column + increment <= bound` for
        counters (values hold `column: ("+", n)`), `at_least` guards `>= bound` (for a
        column that is not raised: its value as it is). Returns how many rows changed."""
        t = self.table(table)
        shape = _shape(where)
        bounds = tuple(at_most or {})
        floors = tuple(at_least or {})
        added = tuple(name for name, value in values.items() if _increment(value))
        set_ = tuple(name for name in values if name not in added)

        def build() -> Any:
            condition = self._where(t, shape)
            changes: dict[str, Any] = {
                name: bindparam("v_" + name, type_=t.c[name].type) for name in set_
            }
            changes |= {name: t.c[name] + bindparam("i_" + name) for name in added}
            for name in bounds:
                bound: BindParameter[Any] = bindparam("b_" + name)
                after = t.c[name] + bindparam("i_" + name) if name in added else t.c[name]
                condition.append(after <= bound)
            for name in floors:
                floor: BindParameter[Any] = bindparam("f_" + name)
                after = t.c[name] + bindparam("i_" + name) if name in added else t.c[name]
                condition.append(after >= floor)
            return update(t).where(*condition).values(**changes)

        statement = self._statement(
            ("update", self.postgres, table, shape, set_, added, bounds, floors), build
        )
        params = _params(where)
        params |= {"v_" + name: values[name] for name in set_}
        params |= {"i_" + name: values[name][1] for name in added}
        params |= {"b_" + name: bound for name, bound in (at_most or {}).items()}
        params |= {"f_" + name: floor for name, floor in (at_least or {}).items()}
        return await self._changed(statement, params)

    async def delete(self, table: str, where: dict[str, Any]) -> int:
        """Delete the matching rows (tables that hold a current state only, never a log);
        how many went."""
        t = self.table(table)
        shape = _shape(where)
        statement = self._statement(
            ("delete", self.postgres, table, shape),
            lambda: t.delete().where(*self._where(t, shape)),
        )
        return await self._changed(statement, _params(where))

    async def audit(
        self,
        p: Principal,
        *,
        action: str,
        kind: str,
        object_id: object,
        place: Place,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        now_ms: int,
    ) -> None:
        """One append-only audit row in this transaction: it commits with the change or not
        at all. Images are the public views (never a card number, PIN, key or token)."""
        await self.insert(
            "org_audit_log",
            {
                "at_ms": now_ms,
                "user_id": p.user_id,
                "user": p.user,
                "token_id": p.token_id,
                "role": str(p.role),
                "action": action,
                "object_kind": kind,
                "object_id": str(object_id)[: limits.NAME_CHARS_MAX],
                "entity": place.entity,
                "store": place.store,
                "before": _image(before),
                "after": _image(after),
            },
        )


@functools.lru_cache(maxsize=limits.RECORDS_STATEMENTS_MAX)
def _together(
    shape: tuple[tuple[str, tuple[str, ...]], ...], dialect: Dialect
) -> tuple[str, list[list[Callable[[Any], Any] | None]]]:
    """`Records.insert_together`'s statement on PostgreSQL for tables and their columns:
    its text and each column's bind processor (None for most)."""
    parts: list[str] = []
    processors: list[list[Callable[[Any], Any] | None]] = []
    n = 1
    for table, keys in shape:
        t = metadata.tables[table]
        parts.append(unnest_insert(t, keys, dialect, n))
        n += len(keys)
        processors.append([_processor(t.c[name].type, dialect) for name in keys])
    ctes = ", ".join(f"w{i} AS ({part})" for i, part in enumerate(parts[:-1]))
    return (f"WITH {ctes} {parts[-1]}" if ctes else parts[-1]), processors


def _processor(type_: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    convert: Callable[[Any], Any] | None = type_.dialect_impl(dialect).bind_processor(dialect)
    return convert


def _runs(rows: list[dict[str, Any]]) -> list[tuple[tuple[str, ...], list[dict[str, Any]]]]:
    """Consecutive rows naming the same columns, in order (one statement each run)."""
    out: list[tuple[tuple[str, ...], list[dict[str, Any]]]] = []
    for row in rows:
        keys = tuple(row)
        if out and out[-1][0] == keys:
            out[-1][1].append(row)
        else:
            out.append((keys, [row]))
    return out


def _given_key(t: Table, row: dict[str, Any]) -> object:
    """The integer primary key a row named itself (SQLAlchemy's inserted_primary_key)."""
    keys = list(t.primary_key.columns)
    return row.get(keys[0].name) if len(keys) == 1 else None


def _image(value: dict[str, Any] | None) -> str | None:
    if value is None:
        return None
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > limits.AUDIT_VALUE_BYTES_MAX:
        text = json.dumps({"truncated": True, "keys": sorted(value)})
    return text


class Records:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Unit]:
        """A write transaction. On SQLite it takes the write lock at BEGIN (IMMEDIATE), so a
        unit that reads before it writes waits its turn instead of failing "database is
        locked" when another writer committed in between; PostgreSQL ignores the option."""
        dialect = self.engine.dialect
        if self.postgres:
            async with self._driver() as driver, driver.transaction():
                yield Unit(dialect, driver=driver)
            return
        async with self.engine.connect() as plain:
            conn = await plain.execution_options(sqlite_begin="IMMEDIATE")
            async with conn.begin():
                yield Unit(dialect, conn=conn)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Unit]:
        """Reads. On PostgreSQL without a transaction of their own (autocommit: no BEGIN and
        ROLLBACK round trips); at READ COMMITTED each statement sees its own snapshot
        either way."""
        dialect = self.engine.dialect
        if self.postgres:
            async with self._driver() as driver:
                yield Unit(dialect, driver=driver)
            return
        async with self.engine.connect() as conn:
            yield Unit(dialect, conn=conn)

    @asynccontextmanager
    async def _driver(self) -> AsyncIterator[Any]:
        """The asyncpg connection of a pooled PostgreSQL connection, taken from the pool
        without SQLAlchemy's Connection around it (SQLAlchemy never begins a transaction
        on it). One the server dropped is forgotten with the pool's other idle ones; one a
        cancelled unit left inside its transaction is invalidated: never pooled again."""
        pooled = await self.engine.raw_connection()
        driver = pooled.driver_connection
        assert driver is not None
        if driver.is_closed():  # the server dropped it while it waited in the pool
            await self._forget(pooled)
            pooled = await self.engine.raw_connection()
            driver = pooled.driver_connection
            assert driver is not None
        try:
            yield driver
        finally:
            if driver.is_closed():
                await self._forget(pooled)
            elif driver.is_in_transaction():
                await greenlet_spawn(pooled.invalidate)
            await greenlet_spawn(pooled.close)

    async def insert_together(self, rows: dict[str, list[dict[str, Any]]]) -> None:
        """Insert rows into several tables, all or none; Conflict on a duplicate. Each
        table's rows name the same columns; a column left out gets its server default
        (SQLAlchemy's Python-side `default=` is not applied: name such columns). On
        PostgreSQL one statement (one round trip, its own transaction): the tables but the
        last are data-modifying CTEs, each fed by `unnest` of one array per column, so the
        text is the same whatever the number of rows. On SQLite one transaction of
        inserts."""
        shape: list[tuple[str, tuple[str, ...]]] = []
        for table, table_rows in rows.items():
            if not table_rows:
                continue
            keys = tuple(table_rows[0])
            if not set(keys) <= _columns(table) or any(tuple(r) != keys for r in table_rows):
                raise ValueError(f"{table}: every row names the same columns of the table")
            shape.append((table, keys))
        if not shape:
            return
        dialect = self.engine.dialect
        if not self.postgres:
            async with self.begin() as uow:
                for table, _ in shape:
                    await uow.insert(table, rows[table])
            return
        sql, processors = _together(tuple(shape), dialect)
        args = []
        for (table, keys), converts in zip(shape, processors, strict=True):
            for name, convert in zip(keys, converts, strict=True):
                values = [row[name] for row in rows[table]]
                args.append(values if convert is None else [convert(v) for v in values])
        try:
            async with self._driver() as driver:
                await driver.execute(sql, *args)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise Conflict(getattr(exc, "table_name", None) or shape[0][0]) from None

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    async def statement_rows(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        """PostgreSQL only: one statement an adapter wrote for a hot path (several changes
        as data-modifying CTEs, say; the requests of one turn of the event loop as one
        array per parameter), run at the driver as its own transaction, and the rows it
        returns. Conflict on a duplicate, as `insert`; Deadlock when PostgreSQL broke a
        deadlock by ending this statement (it changed nothing)."""
        if not self.postgres:
            raise RuntimeError("statement_rows is for PostgreSQL")
        try:
            async with self._driver() as driver:
                rows = await driver.fetch(sql, *args)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise Conflict(getattr(exc, "table_name", None) or "") from None
        except asyncpg.DeadlockDetectedError:
            raise Deadlock from None
        return [dict(row) for row in rows]

    async def _forget(self, pooled: Any) -> None:
        """A connection the server dropped: it, and every other idle one of the pool (a
        restart or failover dropped them all), are closed, never handed out again."""
        await greenlet_spawn(pooled.invalidate)
        await self.engine.dispose()
