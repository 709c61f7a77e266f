"""A unit of work over the host's record tables (organization, members, cards): the few verbs
the admin services need, so services hold rules and never SQL.

    async with records.begin() as uow:       # one transaction; leaving by an error rolls back
        row = await uow.get("org_stores", id="S1")
        await uow.update("org_stores", {"id": "S1"}, {"state": "closed"})
        await uow.audit(principal, ...)

`records.read()` is the same on a connection without a transaction of its own. Tables are
named as in the shared MetaData; filters are equalities (a list or tuple means IN).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import ColumnElement, Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cardcore import limits
from cardcore.cards import schema as _cards_tables  # noqa: F401 - registers the tables
from cardcore.coupons import schema as _coupon_tables  # noqa: F401
from cardcore.ledger.schema import metadata
from cardcore.manager_cards import schema as _manager_tables  # noqa: F401
from cardcore.members import schema as _member_tables  # noqa: F401
from cardcore.org import schema as _org_tables  # noqa: F401
from cardcore.org.model import Place, Principal
from cardcore.points import schema as _points_tables  # noqa: F401
from cardcore.service_cards import schema as _service_tables  # noqa: F401


class Conflict(Exception):
    """A write broke a unique rule (two requests made the same thing at once)."""


class Unit:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    @staticmethod
    def table(name: str) -> Table:
        return metadata.tables[name]

    def _where(self, t: Table, where: dict[str, Any]) -> list[ColumnElement[bool]]:
        out: list[ColumnElement[bool]] = []
        for name, value in where.items():
            column = t.c[name]
            if isinstance(value, list | tuple | set | frozenset):
                out.append(column.in_(list(value)))
            elif value is None:
                out.append(column.is_(None))
            else:
                out.append(column == value)
        return out

    async def get(self, table: str, **where: Any) -> dict[str, Any] | None:
        t = self.table(table)
        row = (await self.conn.execute(select(t).where(*self._where(t, where)).limit(1))).first()
        return None if row is None else dict(row._mapping)

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
        key = t.c[order]
        query = select(t).where(*self._where(t, where or {}))
        for name, low in (at_least or {}).items():
            query = query.where(t.c[name] >= low)
        for name, prefix in (starts_with or {}).items():
            query = query.where(t.c[name].startswith(prefix, autoescape=True))
        if after is not None:
            query = query.where(key < after if descending else key > after)
        query = query.order_by(key.desc() if descending else key).limit(limit + 1)
        return [dict(r._mapping) for r in (await self.conn.execute(query)).all()]

    async def count(self, table: str, **where: Any) -> int:
        t = self.table(table)
        query = select(func.count()).select_from(t).where(*self._where(t, where))
        return int((await self.conn.execute(query)).scalar_one())

    async def total(self, table: str, column: str, **where: Any) -> int:
        t = self.table(table)
        query = select(func.coalesce(func.sum(t.c[column]), 0)).where(*self._where(t, where))
        return int((await self.conn.execute(query)).scalar_one())

    async def insert(self, table: str, values: dict[str, Any] | list[dict[str, Any]]) -> int | None:
        """Insert one row (its generated integer key back) or many; Conflict on a duplicate."""
        t = self.table(table)
        try:
            if isinstance(values, list):
                if values:
                    await self.conn.execute(insert(t), values)
                return None
            result = await self.conn.execute(insert(t).values(**values))
        except IntegrityError:
            raise Conflict(table) from None
        key = result.inserted_primary_key
        return int(key[0]) if key and isinstance(key[0], int) else None

    async def update(
        self,
        table: str,
        where: dict[str, Any],
        values: dict[str, Any],
        *,
        at_most: dict[str, int] | None = None,
    ) -> int:
        """Update the matching rows; `at_most` guards `column + increment <= bound` for
        counters (values hold `column: ("+", n)`). Returns how many rows changed."""
        t = self.table(table)
        condition = self._where(t, where)
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, tuple) and len(value) == 2 and value[0] == "+":
                changes[name] = t.c[name] + value[1]
            else:
                changes[name] = value
        for name, bound in (at_most or {}).items():
            increment = values[name][1] if isinstance(values.get(name), tuple) else 0
            condition.append(t.c[name] + increment <= bound)
        try:
            result = await self.conn.execute(update(t).where(*condition).values(**changes))
        except IntegrityError:
            raise Conflict(table) from None
        return int(result.rowcount)

    async def delete(self, table: str, where: dict[str, Any]) -> int:
        """Delete the matching rows (tables that hold a current state only, never a log);
        how many went."""
        t = self.table(table)
        result = await self.conn.execute(t.delete().where(*self._where(t, where)))
        return int(result.rowcount)

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
        async with self.engine.connect() as plain:
            conn = await plain.execution_options(sqlite_begin="IMMEDIATE")
            async with conn.begin():
                yield Unit(conn)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Unit]:
        async with self.engine.connect() as conn:
            yield Unit(conn)
