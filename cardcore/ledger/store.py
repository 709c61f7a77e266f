"""The ledger's database adapter: what the writer reads and writes, and the read side.

Only the writer calls `read_view` and `write_batch`, on its own connections (a batch's
write is its own transaction). Everything else here reads, on pooled connections, and
never takes the writer's path.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    any_,
    bindparam,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnClause

from cardcore import limits
from cardcore.db import Statement, array_of, each_value, make_engine, unnest_insert
from cardcore.ledger import journal, schema
from cardcore.ledger.decide import BatchEffects
from cardcore.ledger.model import (
    Account,
    Asset,
    CreateAccount,
    CreateTransfer,
    IdCounters,
    LedgerView,
    Op,
    PendingState,
    PostPending,
    Refund,
    Reverse,
    SetAccountFrozen,
    Transfer,
    TransferKind,
    VoidPending,
    natural_key,
)

log = logging.getLogger(__name__)

_IN_CHUNK = 900  # SQLite binds at most 32766 variables in one statement


@dataclass(frozen=True, slots=True)
class _Reader:
    conn: AsyncConnection
    driver: Any  # asyncpg's connection on PostgreSQL, None on SQLite


@dataclass(slots=True)
class WriterState:
    seq: int
    hash: str
    counters: IdCounters
    assets: dict[str, Asset]
    committed_at_ms: int = 0  # the last batch's time: a restarted writer never goes before it


class LedgerStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._reads: dict[str, Statement] = {}
        self.autovacuum_checked = False  # the start-up warning, once (not per reconnect)
        self._batch_sql: str | None = None
        self._ping_engine: AsyncEngine | None = None  # readiness: `ping`

    async def ping(self) -> None:
        """One `SELECT 1`: the database answers now (readiness). On a connection of its own
        (a pool of one, made on first use), so a pool busy with requests never reads as a
        database away. Raises the database's error when it does not answer."""
        if self._ping_engine is None:
            self._ping_engine = make_engine(
                self.engine.url.render_as_string(hide_password=False), pool_size=1
            )
        async with self._ping_engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every connection of the store's engines."""
        await self.engine.dispose()
        if self._ping_engine is not None:
            await self._ping_engine.dispose()

    # --- helpers ----------------------------------------------------------------------------

    def _member(self, column: Any, values: Collection[Any]) -> list[ColumnElement[bool]]:
        """`column IN values`, as one array parameter on PostgreSQL (one cached statement)."""
        if self.postgres:
            param = bindparam(None, list(values), type_=array_of(column))
            return [column == any_(param)]
        items = list(values)
        return [column.in_(items[i : i + _IN_CHUNK]) for i in range(0, len(items), _IN_CHUNK)]

    # --- writer -----------------------------------------------------------------------------

    async def writer_state(self, conn: AsyncConnection) -> WriterState:
        b = schema.batches
        last = (
            await conn.execute(
                select(b.c.seq, b.c.hash, b.c.committed_at_ms).order_by(b.c.seq.desc()).limit(1)
            )
        ).first()

        async def next_id(column: ColumnClause[Any]) -> int:
            value = (await conn.execute(select(func.max(column)))).scalar()
            return int(value or 0) + 1

        counters = IdCounters(
            account=await next_id(schema.accounts.c.id),
            transfer=await next_id(schema.transfers.c.id),
            entry=await next_id(schema.entries.c.id),
            account_event=await next_id(schema.account_events.c.id),
            outbox=await next_id(schema.outbox.c.id),
        )
        assets = {
            r["code"]: journal.asset_from_row(r)
            for r in (await conn.execute(select(schema.assets))).mappings()
        }
        if last is None:
            return WriterState(0, journal.GENESIS_HASH, counters, assets)
        return WriterState(
            int(last.seq), str(last.hash), counters, assets, int(last.committed_at_ms)
        )

    async def due_holds(self, conn: AsyncConnection, now_ms: int, limit: int) -> list[int]:
        holds = schema.open_holds
        reader = await self._reader(conn)

        def build() -> Any:
            return (
                select(holds.c.transfer_id)
                .where(
                    holds.c.expires_at_ms.is_not(None),
                    holds.c.expires_at_ms <= bindparam("now"),
                )
                .order_by(holds.c.expires_at_ms)
                .limit(bindparam("limit"))
            )

        rows = await self._select(reader, "due_holds", build, {"now": now_ms, "limit": limit})
        return [int(r["transfer_id"]) for r in rows]

    # --- the writer's reads: each statement built once (ADR 0008) ---------------------------

    def _in(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """`column IN` the list parameter `name`: one array parameter on PostgreSQL (one
        prepared statement whatever the length), an expanding IN on SQLite."""
        if self.postgres:
            return column == any_(bindparam(name, type_=array_of(column)))
        return column.in_(bindparam(name, expanding=True))

    async def _reader(self, conn: AsyncConnection) -> _Reader:
        """The connection and, on PostgreSQL, the asyncpg connection under it (looked up
        once per read, not per statement)."""
        if not self.postgres:
            return _Reader(conn, None)
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        return _Reader(conn, driver)

    async def _select(
        self,
        reader: _Reader,
        name: str,
        build: Callable[[], Any],
        params: dict[str, Any],
        listed: str = "",
    ) -> list[Any]:
        """The rows of the writer's read `name`, by column name. On PostgreSQL at the driver
        (its statement compiled once); on SQLite through SQLAlchemy, the list parameter
        `listed` in chunks under SQLite's bound on variables."""
        statement = self._reads.get(name)
        if statement is None:
            dialect = self.engine.dialect if self.postgres else None
            statement = self._reads[name] = Statement(build(), dialect)
        if reader.driver is not None:
            return list(await reader.driver.fetch(statement.sql, *statement.args(params)))
        conn = reader.conn
        if not listed:
            return list((await conn.execute(statement.clause, params)).mappings().all())
        values, out = list(params[listed]), list[Any]()
        for i in range(0, len(values), _IN_CHUNK):
            chunk = params | {listed: values[i : i + _IN_CHUNK]}
            out += (await conn.execute(statement.clause, chunk)).mappings().all()
        return out

    async def read_view(
        self,
        conn: AsyncConnection,
        ops: Sequence[Op],
        assets: dict[str, Asset],
        due_hold_ids: Iterable[int] = (),
        *,
        known: Mapping[int, Account] | None = None,
        committed: tuple[int, int] | None = None,
    ) -> LedgerView:
        """Everything `decide_batch` needs for `ops`, in a handful of queries. Accounts in
        `known` (the writer's committed accounts) are taken from it, not read; they are as
        fresh as the database's only while the last batch committed is one of the writer's
        own, within `committed` (its last settled batch .. the one it has in flight), else
        ForeignBatchError (another writer's batches: on SQLite two processes may each run
        one; on PostgreSQL one whose lock went with a dead connection)."""
        reader = await self._reader(conn)
        await self._check_last_batch(reader, committed)
        view = LedgerView(assets=dict(assets))
        keys: dict[str, set[str]] = {}
        pending_ids: set[int] = set(due_hold_ids)
        account_ids: set[int] = set()
        natural_keys: set[str] = set()
        target_keys: set[tuple[str, str]] = set()
        for op in ops:
            if isinstance(op, CreateTransfer | PostPending | VoidPending | Reverse | Refund):
                keys.setdefault(op.client, set()).add(op.key)
            if isinstance(op, Reverse | Refund):
                keys[op.client].add(op.target_key)
                target_keys.add((op.client, op.target_key))
            if isinstance(op, CreateTransfer):
                account_ids.update(p.account_id for p in op.postings)
            elif isinstance(op, PostPending | VoidPending):
                pending_ids.add(op.pending_id)
            elif isinstance(op, SetAccountFrozen):
                account_ids.add(op.account_id)
            elif isinstance(op, CreateAccount):
                natural_keys.add(
                    natural_key(op.legal_entity, op.owner_kind, op.owner_id, op.asset, op.purpose)
                )

        t, f, a = schema.transfers, schema.failures, schema.accounts

        def by_key(table: Table) -> Callable[[], Any]:
            return lambda: by_client_keys(table, postgres=self.postgres)

        for client, client_keys in keys.items():
            params = {"client": client, "keys": list(client_keys)}
            for r in await self._select(reader, "transfers", by_key(t), params, "keys"):
                transfer = journal.transfer_from_row(r)
                view.transfers_by_key[(client, transfer.key)] = transfer
                if transfer.pending_id is not None:
                    pending_ids.add(transfer.pending_id)
            for r in await self._select(reader, "failures", by_key(f), params, "keys"):
                view.failures_by_key[(client, r["key"])] = journal.failure_from_row(r)

        targets = [view.transfers_by_key[k] for k in target_keys if k in view.transfers_by_key]
        if targets:
            for target in targets:
                account_ids.update(p.account_id for p in target.postings)
            await self._read_give_backs(reader, view, targets)

        if pending_ids:
            for r in await self._select(
                reader, "pendings", lambda: holds_by_id(postgres=self.postgres),
                {"ids": list(pending_ids)}, "ids",
            ):  # fmt: skip
                held = journal.transfer_from_row(r)
                resolved = r["resolved_by"]
                view.pendings[held.id] = PendingState(
                    held, None if resolved is None else TransferKind(resolved)
                )
                account_ids.update(p.account_id for p in held.postings)

        if known:
            for aid in [aid for aid in account_ids if aid in known]:
                view.accounts[aid] = known[aid]
                account_ids.discard(aid)
        columns = [a.c[name] for name in journal.ACCOUNT_COLUMNS]
        rows = []
        for name, by, wanted in (
            ("accounts_by_id", a.c.id, account_ids),
            ("accounts_by_natural_key", a.c.natural_key, natural_keys),
        ):
            if wanted:
                build = functools.partial(self._accounts_by, columns, by)
                rows += await self._select(reader, name, build, {"ids": list(wanted)}, "ids")
        for r in rows:
            account = journal.account_from_row(r)
            view.accounts[account.id] = account
            view.account_ids_by_natural_key[account.info.natural_key] = account.id
        return view

    async def _check_last_batch(self, reader: _Reader, committed: tuple[int, int] | None) -> None:
        if committed is None:
            return
        low, high = committed
        b = schema.batches
        build = functools.partial(select, func.max(b.c.seq).label("seq"))
        [row] = await self._select(reader, "last_seq", build, {})
        last = int(row["seq"] or 0)
        if not low <= last <= high:
            raise ForeignBatchError(
                f"the journal's last batch is {last}; this writer expected {low}..{high}: "
                "another writer committed"
            )

    def _accounts_by(self, columns: list[Any], by: ColumnElement[Any]) -> Any:
        return select(*columns).where(self._in(by, "ids"))

    async def _read_give_backs(
        self, reader: _Reader, view: LedgerView, targets: list[Transfer]
    ) -> None:
        """Which targets were reversed, and how much of each was refunded and not reversed
        (with the originals of targets that are refunds: reversing one changes them)."""
        t = schema.transfers
        ids = {x.id for x in targets}
        ids.update(x.target_id for x in targets if x.target_id is not None)
        inner = {x.target_id for x in targets if x.target_id is not None}
        if inner:
            for r in await self._select(
                reader, "kinds",
                lambda: each_value(
                    "ids", t.c.id, lambda match: select(t.c.id, t.c.kind).where(match),
                    one=True, postgres=self.postgres,
                ),
                {"ids": list(inner)}, "ids",
            ):  # fmt: skip
                view.kinds[int(r["id"])] = TransferKind(r["kind"])
        refunds: dict[int, tuple[int, int]] = {}  # refund id -> (origin, amount)
        for r in await self._select(
            reader, "given_back", lambda: given_back(postgres=self.postgres),
            {"ids": list(ids)}, "ids",
        ):  # fmt: skip
            if r["kind"] == TransferKind.REVERSE:
                view.reversed_by[int(r["target_id"])] = int(r["id"])
            else:
                amount = journal.postings_from_json(r["postings"])[0].amount
                refunds[int(r["id"])] = (int(r["target_id"]), amount)
        reversed_refunds: set[int] = set()
        if refunds:
            for r in await self._select(
                reader, "reversed_refunds",
                lambda: each_value(
                    "ids", t.c.target_id,
                    lambda match: select(t.c.target_id).where(
                        match, t.c.kind == bindparam("reverse")
                    ),
                    one=True, postgres=self.postgres,  # reversed at most once
                ),
                {"ids": list(refunds), "reverse": str(TransferKind.REVERSE)}, "ids",
            ):  # fmt: skip
                reversed_refunds.add(int(r["target_id"]))
        for refund_id, (origin, amount) in refunds.items():
            if refund_id not in reversed_refunds:
                view.refunded[origin] = view.refunded.get(origin, 0) + amount

    async def write_batch(
        self,
        conn: AsyncConnection,
        effects: BatchEffects,
        *,
        records: dict[str, list[journal.Record]],
        digest: str,
        prev_hash: str,
        ops_count: int,
    ) -> None:
        """Append the batch (its `journal.batch_records`, hashed to `digest`) and update
        balances. On PostgreSQL one statement, its own transaction, committed when it
        returns (docs/adr/0002); on SQLite inside the caller's transaction, which the caller
        commits."""
        header = (effects.seq, prev_hash, digest, ops_count, effects.now_ms)
        changed = [
            (account.id, *journal.balance_record(account.balance), *_frozen(account))
            for aid, account in effects.accounts.items()
            if aid not in effects.new_account_ids
        ]
        outbox = [(o.id, o.seq, o.event, o.transfer_id) for o in effects.outbox]
        if self.postgres:
            rows = {
                schema.batches: [header],
                schema.assets: records["assets"],
                schema.accounts: _new_account_records(effects),
                **{schema.JOURNAL_TABLES[name]: records[name] for name in _JOURNALED},
                schema.outbox: outbox,
                schema.open_holds: list(effects.opened_pendings.items()),
            }
            args: list[Any] = []
            for table in _PG_WRITTEN:
                width = len(table.columns)
                args += list(zip(*rows[table], strict=True)) or [()] * width
            args += list(zip(*changed, strict=True)) or [()] * _ACCOUNT_UPDATE_WIDTH
            args.append(effects.closed_pendings)
            # One statement sees none of its own rows: decide.py never lists a hold as both
            # opened and closed in one batch (unit-tested there), and `changed` holds no new
            # account, so nothing here is inserted and then changed.
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            if driver is None or driver.is_in_transaction():
                # Inside a transaction the statement would not commit by itself.
                raise RuntimeError("the batch must be its own transaction")
            await driver.execute(self._pg_batch_sql(), *args)
            return
        # Through SQLAlchemy first: this also opens the transaction the bulk writes join.
        await conn.execute(
            schema.batches.insert(), [dict(zip(schema.batches.c.keys(), header, strict=True))]
        )
        await self._insert(conn, schema.assets, records["assets"])
        await self._insert(conn, schema.accounts, _new_account_records(effects))
        for name in _JOURNALED:
            await self._insert(conn, schema.JOURNAL_TABLES[name], records[name])
        if changed:
            driver = await _driver(conn)
            await driver.executemany(_SQLITE_UPDATE_ACCOUNTS, [(*r[1:], r[0]) for r in changed])
        await self._insert(conn, schema.outbox, outbox)
        await self._insert(conn, schema.open_holds, list(effects.opened_pendings.items()))
        if effects.closed_pendings:
            for cond in self._member(schema.open_holds.c.transfer_id, effects.closed_pendings):
                await conn.execute(schema.open_holds.delete().where(cond))

    async def _insert(
        self, conn: AsyncConnection, table: Table, records: list[journal.Record]
    ) -> None:
        """SQLite: bulk insert of tuples in the table's column order, at the driver, on the
        writer's own connection and transaction (docs/adr/0002)."""
        if not records:
            return
        columns = [c.name for c in table.columns]
        driver = await _driver(conn)
        marks = ", ".join("?" * len(columns))
        await driver.executemany(
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
            records,
        )

    def _pg_batch_sql(self) -> str:
        """The batch as one PostgreSQL statement: every insert a data-modifying CTE fed by
        `unnest` of one array per column (`db.unnest_insert`), the balances' UPDATE one
        more, the resolved holds' DELETE the statement itself. One text for every batch."""
        if self._batch_sql is None:
            dialect = self.engine.dialect
            parts, n = [], 1
            for table in _PG_WRITTEN:
                names = [c.name for c in table.columns]
                parts.append(unnest_insert(table, names, dialect, n))
                n += len(names)
            parts.append(_PG_UPDATE_ACCOUNTS.format(*range(n, n + _ACCOUNT_UPDATE_WIDTH)))
            n += _ACCOUNT_UPDATE_WIDTH
            ctes = ", ".join(f"w{i} AS ({part})" for i, part in enumerate(parts))
            closed = f"DELETE FROM ledger_open_holds WHERE transfer_id = ANY(${n}::BIGINT[])"  # noqa: S608 - a number
            self._batch_sql = f"WITH {ctes} {closed}"
        return self._batch_sql

    # --- reads ------------------------------------------------------------------------------

    async def account(self, account_id: int) -> Account | None:
        async with self.engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        select(schema.accounts).where(schema.accounts.c.id == account_id)
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else journal.account_from_row(row)

    async def entries(
        self, account_id: int, *, cursor: int | None, limit: int, newest_first: bool
    ) -> list[dict[str, Any]]:
        e, t = schema.entries, schema.transfers
        query = (
            select(
                e,
                t.c.kind.label("transfer_kind"),
                t.c.reason,
                t.c.metadata,
                t.c.created_at_ms,
            )
            .select_from(e.join(t, t.c.id == e.c.transfer_id))
            .where(e.c.account_id == account_id)
        )
        if newest_first:
            if cursor is not None:
                query = query.where(e.c.id < cursor)
            query = query.order_by(e.c.id.desc())
        else:
            if cursor is not None:
                query = query.where(e.c.id > cursor)
            query = query.order_by(e.c.id)
        async with self.engine.connect() as conn:
            result = await conn.execute(query.limit(limit))
            return [dict(r) for r in result.mappings()]

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction that sees one committed state throughout (the writer may commit
        meanwhile): REPEATABLE READ on PostgreSQL; any SQLite read transaction already is."""
        options = {"isolation_level": "REPEATABLE READ"} if self.postgres else {}
        async with self.engine.connect() as plain:
            conn = await plain.execution_options(**options)
            async with conn.begin():
                yield conn

    async def journal_page(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Committed batches with seq > after, in order, each with its rows."""
        async with self._snapshot() as conn:
            return [{**header, **rows} async for header, rows in self._batches(conn, after, limit)]

    async def _batches(
        self, conn: AsyncConnection, after: int, limit: int, rows_max: int | None = None
    ) -> AsyncIterator[tuple[dict[str, Any], dict[str, list[journal.Row]]]]:
        """The batches after `after`, at most `limit`, each with its rows. With `rows_max`
        their rows are read in chunks of consecutive batches with at most that many rows of
        any one journal table (a batch with more comes alone): memory holds one chunk."""
        b = schema.batches
        headers = [
            dict(r)
            for r in (
                await conn.execute(select(b).where(b.c.seq > after).order_by(b.c.seq).limit(limit))
            ).mappings()
        ]
        if not headers:
            return
        chunks = [headers]
        if rows_max is not None and len(headers) > 1:
            chunks = _chunks(headers, await _rows_per_batch(conn, headers), rows_max)
        for chunk in chunks:
            by_seq = await self._batch_rows(conn, chunk)
            for header in chunk:
                yield header, by_seq[header["seq"]]

    @staticmethod
    async def _batch_rows(
        conn: AsyncConnection, headers: list[dict[str, Any]]
    ) -> dict[int, dict[str, list[journal.Row]]]:
        """The rows of the batches `headers` (consecutive), per batch and table."""
        low, high = headers[0]["seq"], headers[-1]["seq"]
        by_seq: dict[int, dict[str, list[journal.Row]]] = {
            h["seq"]: {name: [] for name in journal.TABLES} for h in headers
        }
        for name, table in schema.JOURNAL_TABLES.items():
            # Rows with an id come in id order; assets and failures have none and are sorted
            # here, in Python, as the writer sorts them (a database collation may differ).
            order = [table.c.id] if "id" in table.c else []
            query = (
                select(*[table.c[c] for c in journal.COLUMNS[name]])
                .where(and_(table.c.seq >= low, table.c.seq <= high))
                .order_by(table.c.seq, *order)
            )
            for r in (await conn.execute(query)).mappings():
                row = dict(r)
                bucket = by_seq.get(row["seq"])
                if bucket is not None:
                    bucket[name].append(row)
        for bucket in by_seq.values():
            bucket["assets"].sort(key=lambda row: row["code"])
            bucket["failures"].sort(key=lambda row: (row["client"], row["key"]))
        return by_seq

    async def verify(
        self, chunk: int, rows: int = limits.VERIFY_CHUNK_ROWS_MAX
    ) -> journal.Verifier:
        """Replay the whole journal; raises `journal.Mismatch` at the first inconsistency.

        Memory does not grow with the history: the journal is read `chunk` batches and at
        most `rows` rows of any one table at a time (a bigger batch alone), the accounts a
        page at a time, and the reversals and refunds streamed grouped by family (the
        transfer their chain of targets ends at), so the verifier holds one family's."""
        verifier = journal.Verifier()
        async with self._snapshot() as conn:
            after = 0
            while True:
                seen = 0
                async for header, batch_rows in self._batches(conn, after, chunk, rows):
                    verifier.batch(header, batch_rows)
                    after = header["seq"]
                    seen += 1
                if seen == 0:
                    break
            for table in schema.JOURNAL_TABLES.values():
                outside = (table.c.seq > verifier.last_seq) | (table.c.seq < 1)
                query = select(func.count(), func.min(table.c.seq)).where(outside)
                count, first = (await conn.execute(query)).one()
                if count:
                    raise journal.Mismatch(
                        f"{table.name}: {count} rows claim batch {first}, "
                        f"but the journal's batches are 1..{verifier.last_seq}"
                    )
            await self._verify_accounts(conn, verifier, rows)
            holds = await conn.execute(
                select(schema.open_holds.c.transfer_id, schema.open_holds.c.expires_at_ms)
            )
            verifier.open_holds((int(r[0]), r[1]) for r in holds)
            await self._verify_given_back(conn, verifier)
        return verifier

    @staticmethod
    async def _verify_accounts(
        conn: AsyncConnection, verifier: journal.Verifier, page: int
    ) -> None:
        """The accounts table against the replay, `page` accounts per read, in id order."""
        a, after = schema.accounts, None
        while True:
            query = select(a).order_by(a.c.id).limit(page)
            if after is not None:
                query = query.where(a.c.id > after)
            stored = (await conn.execute(query)).mappings().all()
            for r in stored:
                account = journal.account_from_row(r)
                if r["natural_key"] != account.info.natural_key:
                    raise journal.Mismatch(f"account {account.id}: natural key does not match")
                verifier.account(account)
            if len(stored) < page:
                break
            after = stored[-1]["id"]
        verifier.accounts_end()

    @staticmethod
    async def _verify_given_back(conn: AsyncConnection, verifier: journal.Verifier) -> None:
        """Every reversal and refund, streamed grouped by family (`given_back_families`),
        then: none was left out (one whose target is not before it has no family)."""
        given = await conn.stream(
            given_back_families().execution_options(yield_per=limits.VERIFY_FETCH_ROWS_MAX)
        )
        async for row in given.mappings():
            verifier.given_back(dict(row))
        t = schema.transfers
        gives = t.c.kind.in_(_GIVE_BACKS)
        total = (await conn.execute(select(func.count()).where(gives))).scalar_one()
        if total != verifier.given_backs:  # left out: a give-back of a later give-back
            g = schema.transfers.alias("target")
            first = (
                await conn.execute(
                    select(t.c.id, t.c.target_id)
                    .select_from(t.join(g, g.c.id == t.c.target_id))
                    .where(gives, g.c.kind.in_(_GIVE_BACKS), g.c.id >= t.c.id)
                    .order_by(t.c.id)
                    .limit(1)
                )
            ).first()
            raise journal.Mismatch(
                f"transfer {first[0]}: gives back transfer {first[1]}, which is not before it"
                if first is not None
                else f"{total} reversals and refunds, {verifier.given_backs} in families"
            )


# The tables a batch inserts into on PostgreSQL, in the order of the statement's parameters.
_JOURNALED = ("account_events", "transfers", "entries", "failures")
_PG_WRITTEN = (
    schema.batches,
    schema.assets,
    schema.accounts,
    *(schema.JOURNAL_TABLES[name] for name in _JOURNALED),
    schema.outbox,
    schema.open_holds,
)
# The balances: one set-based UPDATE of the accounts a batch changed (new ones are inserted).
_ACCOUNT_UPDATE_WIDTH = 8
_PG_UPDATE_ACCOUNTS = """
UPDATE ledger_accounts AS a SET
    debits_posted = v.debits_posted, credits_posted = v.credits_posted,
    debits_pending = v.debits_pending, credits_pending = v.credits_pending,
    version = v.version, debit_frozen = v.debit_frozen, credit_frozen = v.credit_frozen
FROM unnest(${}::bigint[], ${}::bigint[], ${}::bigint[], ${}::bigint[], ${}::bigint[],
            ${}::bigint[], ${}::boolean[], ${}::boolean[])
    AS v(id, debits_posted, credits_posted, debits_pending, credits_pending, version,
         debit_frozen, credit_frozen)
WHERE a.id = v.id
"""


_SQLITE_UPDATE_ACCOUNTS = """
UPDATE ledger_accounts SET debits_posted = ?, credits_posted = ?, debits_pending = ?,
    credits_pending = ?, version = ?, debit_frozen = ?, credit_frozen = ?
WHERE id = ?
"""


async def _driver(conn: AsyncConnection) -> Any:
    """SQLite's driver connection (aiosqlite) under SQLAlchemy's, in the same open
    transaction."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    assert driver.in_transaction, "bulk write outside a transaction"
    return driver


# pg_advisory_lock key held by the writer for its life: one writer per database.
_WRITER_LOCK_KEY = 0x63617264636F7265  # "cardcore"


def by_client_keys(table: Table, *, postgres: bool) -> Any:
    """The rows of `table` (transfers, failures: unique on (client, key)) of the parameter
    `client` and the list parameter `keys`."""
    client = table.c.client == bindparam("client")
    return each_value(
        "keys", table.c.key, lambda match: select(table).where(client, match),
        one=True, postgres=postgres,
    )  # fmt: skip


def holds_by_id(*, postgres: bool) -> Any:
    """The transfers of the list parameter `ids`, each with the kind of the transfer that
    resolved it (`resolved_by`, NULL while open: a hold resolves once)."""
    t = schema.transfers
    resolver = t.alias("resolver")
    return each_value(
        "ids", t.c.id,
        lambda match: select(t, resolver.c.kind.label("resolved_by"))
        .select_from(t.outerjoin(resolver, resolver.c.pending_id == t.c.id))
        .where(match),
        one=True, postgres=postgres,
    )  # fmt: skip


# The reversals and refunds: transfers that give back another (`target_id`).
_GIVE_BACKS = (str(TransferKind.REVERSE), str(TransferKind.REFUND))
# The journal tables whose rows bound a verify chunk (assets: one row per asset code).
_CHUNKED = tuple(
    schema.JOURNAL_TABLES[name] for name in ("account_events", "transfers", "entries", "failures")
)


def given_back_families() -> Any:
    """Every reversal and refund with its target (`target_kind`, `target_target_id`,
    `target_postings`) and its family's `root`, ordered by root then id: the transfer its
    chain of targets ends at (a refund's payment; a reversal of a reversal of a payment, the
    payment), 0 for none. A recursive query: the give-backs of a transfer that is not one,
    then theirs (later ids only: a chain that loops has no family), and so on."""
    t, g = schema.transfers, schema.transfers.alias("target")
    start = (
        select(t.c.id, func.coalesce(t.c.target_id, 0).label("root"))
        .select_from(t.outerjoin(g, g.c.id == t.c.target_id))
        .where(t.c.kind.in_(_GIVE_BACKS), or_(g.c.kind.is_(None), g.c.kind.not_in(_GIVE_BACKS)))
        .cte("family", recursive=True)
    )
    child = schema.transfers.alias("child")
    family = start.union_all(
        select(child.c.id, start.c.root)
        .select_from(child.join(start, child.c.target_id == start.c.id))
        .where(child.c.kind.in_(_GIVE_BACKS), child.c.id > start.c.id)
    )
    return (
        select(
            t.c.id, t.c.kind, t.c.target_id, t.c.postings,
            g.c.kind.label("target_kind"), g.c.target_id.label("target_target_id"),
            g.c.postings.label("target_postings"), family.c.root,
        )
        .select_from(family.join(t, t.c.id == family.c.id).outerjoin(g, g.c.id == t.c.target_id))
        .order_by(family.c.root, family.c.id)
    )  # fmt: skip


async def _rows_per_batch(
    conn: AsyncConnection, headers: list[dict[str, Any]]
) -> list[dict[int, int]]:
    """Per journal table that bounds a chunk, its row count per batch of `headers`: one
    grouped count over their range (an index scan of what the chunks then read, whatever
    plan the database picks without statistics)."""
    low, high = headers[0]["seq"], headers[-1]["seq"]
    counts = []
    for table in _CHUNKED:
        query = (
            select(table.c.seq, func.count())
            .where(and_(table.c.seq >= low, table.c.seq <= high))
            .group_by(table.c.seq)
        )
        counts.append({int(seq): int(n) for seq, n in (await conn.execute(query)).all()})
    return counts


def _chunks(
    headers: list[dict[str, Any]], counts: list[dict[int, int]], rows_max: int
) -> list[list[dict[str, Any]]]:
    """`headers` cut into runs of consecutive batches with at most `rows_max` rows of any
    one table (`counts`, per table and batch); a batch with more is a run of its own."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    load = [0] * len(counts)
    for header in headers:
        rows = [c.get(header["seq"], 0) for c in counts]
        if current and any(n + r > rows_max for n, r in zip(load, rows, strict=True)):
            chunks.append(current)
            current, load = [], [0] * len(counts)
        current.append(header)
        load = [n + r for n, r in zip(load, rows, strict=True)]
    chunks.append(current)
    return chunks


def given_back(*, postgres: bool) -> Any:
    """The reversals and refunds of the transfers in the list parameter `ids`."""
    t = schema.transfers
    return each_value(
        "ids", t.c.target_id,
        lambda match: select(t.c.id, t.c.kind, t.c.target_id, t.c.postings).where(match),
        one=False, postgres=postgres,
    )  # fmt: skip


class WriterLockError(RuntimeError):
    """Another writer already owns this database."""


class ForeignBatchError(RuntimeError):
    """Batches this writer did not write were committed: what it remembers is stale."""


async def _take_writer_lock(conn: AsyncConnection) -> None:
    query = text("SELECT pg_try_advisory_lock(:k)")
    locked = (await conn.execute(query, {"k": _WRITER_LOCK_KEY})).scalar()
    await conn.commit()
    if not locked:
        raise WriterLockError("another cardcore ledger writer owns this database")


async def warn_without_autovacuum(conn: AsyncConnection) -> bool:
    """Log a warning when the server's autovacuum is off (True then): no table is ever
    analyzed, and every query whose plan rests on statistics (the writer's reads probe
    their indexes whatever the statistics say; the host's, such as a card's points
    holdings, do not) may read far more than it needs as the tables grow (docs/ledger.md,
    "PostgreSQL settings"). Advice only: a server that will not say answers False."""
    try:
        setting = (await conn.execute(text("SHOW autovacuum"))).scalar()
        await conn.commit()
    except DBAPIError:
        await conn.rollback()
        return False
    if setting == "on":
        return False
    log.warning(
        "PostgreSQL autovacuum is off: tables are never analyzed and query plans "
        "degrade as they grow; turn it on or run ANALYZE on a schedule"
    )
    return True


class WriterSession:
    """The writer's two connections, held for its life (docs/adr/0001).

    The write connection runs one transaction per batch; on PostgreSQL it holds the writer
    advisory lock, on SQLite its transactions begin IMMEDIATE. The read connection reads what
    the next batch touches while the previous batch is still being written and committed.
    """

    def __init__(
        self, store: LedgerStore, write: AsyncConnection, read: AsyncConnection,
        lock: IO[bytes] | None = None,
    ) -> None:  # fmt: skip
        self._store = store
        self._write = write
        self._read = read
        self._lock = lock

    @classmethod
    async def open(cls, store: LedgerStore) -> tuple[WriterSession, WriterState]:
        lock = None if store.postgres else _sqlite_writer_lock(store.engine)
        try:
            write = await store.engine.connect()
        except BaseException:
            _release(lock)
            raise
        read: AsyncConnection | None = None
        try:
            if store.postgres:
                await _take_writer_lock(write)
                if not store.autovacuum_checked:
                    store.autovacuum_checked = True
                    await warn_without_autovacuum(write)
            else:
                write = await write.execution_options(sqlite_begin="IMMEDIATE")
            state = await store.writer_state(write)
            await write.commit()
            read = await store.engine.connect()
        except BaseException:
            await write.invalidate()
            await write.close()
            _release(lock)
            raise
        return cls(store, write, read, lock), state

    async def read_view(
        self,
        ops: Sequence[Op],
        assets: dict[str, Asset],
        due_after_ms: int | None,
        known: Mapping[int, Account] | None = None,
        committed: tuple[int, int] | None = None,
    ) -> LedgerView:
        """What a batch touches, as committed (the accounts in `known` taken from there), with
        the holds due at `due_after_ms` (when a scan is due) among them. On SQLite one short
        read transaction; on PostgreSQL each read at the driver sees its own snapshot (READ
        COMMITTED gave each statement its own anyway), so SQLAlchemy's begin there sends
        nothing."""
        async with self._read.begin():
            due: list[int] = []
            if due_after_ms is not None:
                due = await self._store.due_holds(
                    self._read, due_after_ms, limits.EXPIRY_OPS_PER_BATCH_MAX
                )
            return await self._store.read_view(
                self._read, ops, assets, due, known=known, committed=committed
            )

    async def write_batch(
        self,
        effects: BatchEffects,
        *,
        records: dict[str, list[journal.Record]],
        digest: str,
        prev_hash: str,
        ops_count: int,
    ) -> None:
        """Write the decided batch and commit it (on PostgreSQL one statement: its own
        transaction)."""
        postgres = self._store.postgres
        async with contextlib.nullcontext() if postgres else self._write.begin():
            await self._store.write_batch(
                self._write,
                effects,
                records=records,
                digest=digest,
                prev_hash=prev_hash,
                ops_count=ops_count,
            )

    async def close(self) -> None:
        # Invalidate rather than return to the pool: the physical connection closes, and with
        # it the advisory lock, so the writer's next session (or process) can take it.
        for conn in (self._write, self._read):
            with contextlib.suppress(Exception):
                await conn.invalidate()
                await conn.close()
        _release(self._lock)
        self._lock = None


def _sqlite_writer_lock(engine: AsyncEngine) -> IO[bytes] | None:
    """On SQLite the file beside the database (`<file>.writer-lock`) locked for the writer's
    life, as PostgreSQL's advisory lock is: a second writer on the file (another `serve`,
    `ledger`, `points expire`) is refused WriterLockError; the operating system releases it
    when the process ends, however it ends. None for a database in memory."""
    name = engine.url.database
    if not name or name == ":memory:":
        return None
    # Beside the file itself: a symbolic link to it (another path) meets the same lock.
    real = Path(name).resolve()
    handle = real.with_name(real.name + ".writer-lock").open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise WriterLockError("another cardcore ledger writer owns this database") from None
    return handle


def _release(lock: IO[bytes] | None) -> None:
    if lock is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()


def _frozen(account: Account) -> tuple[bool, bool]:
    return (account.info.flags.debit_frozen, account.info.flags.credit_frozen)


def _new_account_records(effects: BatchEffects) -> list[journal.Record]:
    records = []
    for aid in sorted(effects.new_account_ids):
        account = effects.accounts[aid]
        info = account.info
        records.append(
            (
                aid,
                info.natural_key,
                info.asset,
                info.legal_entity,
                info.owner_kind,
                info.owner_id,
                info.purpose,
                *journal.flags_record(info.flags),
                *journal.balance_record(account.balance),
                effects.seq,
            )
        )
    return records
