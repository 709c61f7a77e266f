"""The host's card, card-class and terminal records, and the ledger reads the POS service
needs, on the ledger's engine: a POS call's reads through `records.py` (on PostgreSQL at the
driver, no transaction; one statement for a call's cards or keys on either database), its
key claims as one statement on PostgreSQL (`schema.CLAIM_SQL`). Records are cached in
memory: this process is the only writer of these tables, and every change made through the
admin services calls `forget_card` / `forget_class` / `forget_terminal`, so the POS never
acts on a stale state."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import ColumnElement, bindparam, func, insert, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cardcore import limits
from cardcore.cards import schema
from cardcore.cards.model import (
    POS_CLIENT,
    BatchLine,
    Card,
    CardClass,
    Settlement,
    Terminal,
    claims_mark,
)
from cardcore.ledger import schema as ledger_schema
from cardcore.ledger.decide import TOMBSTONE_CODE
from cardcore.ledger.model import Balance
from cardcore.records import Records

# The manager cards' numbers (their own table, manager_cards.schema: named here, not imported,
# as cards may not import that feature).
_MANAGER_TOKENS = sa_table("manager_cards", sa_column("token")).c.token


class Directory:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # The reads of every POS call (its cards, its keys' claims), on PostgreSQL at the
        # driver without a transaction: one round trip each, where SQLAlchemy's connection
        # adds a BEGIN and a ROLLBACK (docs/adr/0008).
        self._records = Records(engine)
        self._terminals: dict[str, Terminal] = {}
        self._cards: OrderedDict[str, Card] = OrderedDict()
        self._classes: dict[str, CardClass] = {}
        self._card_generation = 0  # moves on every forget: a read begun before is stale
        self._issue_lock = asyncio.Lock()

    # --- terminals ---------------------------------------------------------------------------

    async def terminal(self, tid: str) -> Terminal | None:
        cached = self._terminals.get(tid)
        if cached is not None:
            return cached
        async with self._records.read() as unit:
            row = await unit.get("pos_terminals", tid=tid)
        if row is None:
            return None
        terminal = _terminal(row)
        if len(self._terminals) < limits.CARD_CACHE_ENTRIES_MAX:
            self._terminals[tid] = terminal
        return terminal

    async def add_terminal(self, t: Terminal, now_ms: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(schema.pos_terminals).values(**terminal_row(t, now_ms)))

    async def close_batch(
        self,
        t: Terminal,
        *,
        host: tuple[int, int, int, int],
        terminal: tuple[int, int, int, int],
        balanced: bool,
        next_batch: str,
        next_cycle: int,
        now_ms: int,
    ) -> Terminal:
        """Record the settlement of the open batch and open the next, in one transaction."""
        s = schema.pos_settlements
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(s).values(
                    tid=t.tid,
                    batch_cycle=t.batch_cycle,
                    batch=t.batch,
                    debit_amount=host[0],
                    debit_count=host[1],
                    credit_amount=host[2],
                    credit_count=host[3],
                    terminal_debit_amount=terminal[0],
                    terminal_debit_count=terminal[1],
                    terminal_credit_amount=terminal[2],
                    terminal_credit_count=terminal[3],
                    balanced=balanced,
                    settled_at_ms=now_ms,
                )
            )
            await conn.execute(
                update(schema.pos_terminals)
                .where(schema.pos_terminals.c.tid == t.tid)
                .values(batch=next_batch, batch_cycle=next_cycle, claims_batch="")
            )
        self._terminals.pop(t.tid, None)
        fresh = await self.terminal(t.tid)
        assert fresh is not None
        return fresh

    async def settlement(self, tid: str, cycle: int, batch: str) -> Settlement | None:
        """The settlement recorded when batch (`cycle`, `batch`) closed; None while it is
        open or unknown."""
        s = schema.pos_settlements
        query = select(s).where(s.c.tid == tid, s.c.batch_cycle == cycle, s.c.batch == batch)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            return None
        names = ("debit_amount", "debit_count", "credit_amount", "credit_count")
        a, b, c, d = (int(row[n]) for n in names)
        e, f, g, h = (int(row[f"terminal_{n}"]) for n in names)
        return Settlement((a, b, c, d), (e, f, g, h), bool(row["balanced"]))

    # --- cards -------------------------------------------------------------------------------

    async def card(self, token: str) -> Card | None:
        cached = self._cards.get(token)
        if cached is not None:
            return cached
        generation = self._card_generation
        async with self._records.read() as unit:
            row = await unit.get("cards", token=token)
        if row is None:
            return None
        card = card_of(row)
        if generation == self._card_generation:  # else a card changed meanwhile: not held
            self._hold([card])
        return card

    async def warm_cards(self, tokens: Sequence[str]) -> None:
        """Read the cards of `tokens` that are not held yet into memory, in one statement:
        otherwise each request of a `handle` call would read its own card when planned (a
        group's cards far outnumber what is held, so most are read). Cards found
        are held as `card` holds them; none is held when a card changed meanwhile."""
        wanted = sorted({t for t in tokens if t not in self._cards})
        if len(wanted) < 2:  # one read either way
            return
        generation = self._card_generation
        async with self._records.read() as unit:
            rows = await unit.find_unique("cards", "token", wanted, {})
        if generation == self._card_generation:
            self._hold([card_of(row) for row in rows])

    def _hold(self, cards: Sequence[Card]) -> None:
        """Cards read while no card changed, kept; the least recently used go past
        `CARD_CACHE_ENTRIES_MAX`."""
        for card in cards:
            self._cards[card.token] = card
        while len(self._cards) > limits.CARD_CACHE_ENTRIES_MAX:
            self._cards.popitem(last=False)

    def forget_card(self, token: str) -> None:
        self._card_generation += 1
        self._cards.pop(token, None)

    def forget_terminal(self, tid: str) -> None:
        self._terminals.pop(tid, None)

    def forget_class(self, code: str) -> None:
        self._classes.pop(code, None)

    async def card_class(self, code: str) -> CardClass | None:
        if not code:
            return None
        cached = self._classes.get(code)
        if cached is not None:
            return cached
        c = schema.card_classes
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(c).where(c.c.code == code))).mappings().first()
        if row is None:
            return None
        found = class_of(row)
        if len(self._classes) < limits.CARD_CACHE_ENTRIES_MAX:
            self._classes[code] = found
        return found

    async def existing_tokens(self, tokens: list[str]) -> set[str]:
        """The tokens a customer card or a manager card already has (a number is unique
        among both: the POS tells them apart by it)."""
        found: set[str] = set()
        async with self.engine.connect() as conn:
            for c in (schema.cards.c.token, _MANAGER_TOKENS):
                for i in range(0, len(tokens), 1000):
                    chunk = tokens[i : i + 1000]
                    found.update((await conn.execute(select(c).where(c.in_(chunk)))).scalars())
        return found

    async def add_cards(
        self, cards: list[Card], now_ms: int, extra: list[dict[str, Any]] | None = None
    ) -> list[Card]:
        """Insert new cards, numbering them (ids follow the highest; one issuer at a time in
        this process, and the unique index refuses a clash). `extra` holds per card the
        columns the POS record does not carry (sealed number and secret, member, PIN value).
        Answers the cards with their ids."""
        if not cards:
            return []
        c = schema.cards
        async with self._issue_lock, self.engine.begin() as conn:
            top = (await conn.execute(select(func.max(c.c.id)))).scalar_one_or_none() or 0
            numbered = [replace(card, id=int(top) + 1 + i) for i, card in enumerate(cards)]
            rows = []
            for i, card in enumerate(numbered):
                row = {
                    "token": card.token,
                    "pan_masked": card.pan_masked,
                    "legal_entity": card.legal_entity,
                    "account_id": card.account_id,
                    "expires": card.expires,
                    "state": card.state,
                    "balance_max": card.balance_max,
                    "created_at_ms": now_ms,
                    "id": card.id,
                    "class_code": card.class_code,
                    "store": card.store,
                    "named": card.named,
                    "pan_sealed": "",
                    "secret_sealed": "",
                    "member_id": None,
                    "pvv": "",
                    "pin_failures": 0,
                    "replaced_by": None,
                    "updated_at_ms": now_ms,
                }
                if extra is not None:
                    row.update(extra[i])
                rows.append(row)
            for i in range(0, len(rows), limits.DB_INSERT_ROWS_MAX):
                await conn.execute(insert(c), rows[i : i + limits.DB_INSERT_ROWS_MAX])
        return numbered

    def forget_all_cards(self) -> None:
        """Drop every cached card (a class change rewrote many cards at once)."""
        self._card_generation += 1
        self._cards.clear()

    @property
    def issue_lock(self) -> asyncio.Lock:
        """Held while a new card's id is chosen and its row written (ids follow the highest)."""
        return self._issue_lock

    async def expired_cards(
        self, before: str, states: Sequence[str], *, after_id: int, limit: int
    ) -> list[dict[str, Any]]:
        """Cards in `states` whose expiry (YYMM) is before `before`: id order, after a cursor."""
        c = schema.cards
        query = (
            select(c.c.id, c.c.legal_entity, c.c.store, c.c.class_code, c.c.account_id)
            .where(
                c.c.expires != "",
                c.c.expires < before,
                c.c.state.in_(list(states)),
                c.c.id > after_id,
            )
            .order_by(c.c.id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def balances(self, account_ids: Sequence[int]) -> dict[int, Balance]:
        """The balances of many accounts at once (a report's read; no snapshot across calls)."""
        a = ledger_schema.accounts
        out: dict[int, Balance] = {}
        wanted = list(dict.fromkeys(account_ids))
        async with self.engine.connect() as conn:
            for i in range(0, len(wanted), limits.DB_INSERT_ROWS_MAX):
                chunk = wanted[i : i + limits.DB_INSERT_ROWS_MAX]
                query = select(
                    a.c.id,
                    a.c.debits_posted,
                    a.c.credits_posted,
                    a.c.debits_pending,
                    a.c.credits_pending,
                    a.c.version,
                ).where(a.c.id.in_(chunk))
                for row in (await conn.execute(query)).all():
                    out[int(row[0])] = Balance(*(int(x) for x in row[1:]))
        return out

    async def keyed_transfer(self, client: str, key: str) -> dict[str, Any] | None:
        """The transfer applied under (client, key), if any (a counter request's retry)."""
        t = ledger_schema.transfers
        query = select(*_transfer_columns(t)).where(t.c.client == client, t.c.key == key)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else _transfer(row)

    # --- ledger reads --------------------------------------------------------------------------

    async def transfer_by_key(self, key: str) -> dict[str, Any] | None:
        return await self._pos_transfer(ledger_schema.transfers.c.key == key)

    async def transfer_by_id(self, transfer_id: int) -> dict[str, Any] | None:
        return await self._pos_transfer(ledger_schema.transfers.c.id == transfer_id)

    async def _pos_transfer(self, condition: ColumnElement[bool]) -> dict[str, Any] | None:
        t = ledger_schema.transfers
        query = select(*_transfer_columns(t)).where(t.c.client == POS_CLIENT, condition)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else _transfer(row)

    async def holds_resolved(self, hold_ids: Sequence[int]) -> dict[int, str]:
        """The holds of `hold_ids` that were resolved, each with the kind of the transfer
        that resolved it (post, void, expire); open holds are left out. One read (a hold
        resolves once: `pending_id` is unique)."""
        if not hold_ids:
            return {}
        t = ledger_schema.transfers
        query = select(t.c.pending_id, t.c.kind).where(t.c.pending_id.in_(sorted(set(hold_ids))))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return {int(r["pending_id"]): str(r["kind"]) for r in rows}

    # --- the functions of POS transaction keys -------------------------------------------------

    async def claim_keys(self, wanted: dict[str, str], now_ms: int) -> dict[str, str]:
        """Claim each key of `wanted` (key -> function) for its function, unless the ledger
        holds it (`ledger_keys`: a purchase's, or a decline it keeps), which is never
        claimed and stands for "money": the function each key stands for afterwards (a key
        claimed before keeps its first function). PostgreSQL: one statement
        (`schema.CLAIM_SQL`); a key another transaction claimed after its snapshot is read
        again. SQLite: the ledger's keys read, then one transaction (a read, an insert of
        the new claims). Each key's terminal keeps its batch as the one of its last claim
        (`claims_batch`, in the same statement or transaction, and in memory after)."""
        keys = sorted(wanted)
        marks = dict(claims_mark(k) for k in keys)  # terminal -> the batch of its claim
        if self._records.postgres:
            args = [keys, [wanted[k] for k in keys], now_ms, POS_CLIENT, TOMBSTONE_CODE,
                    list(marks), list(marks.values())]  # fmt: skip
            rows = await self._records.statement_rows(schema.CLAIM_SQL, args)
            found = {str(row["key"]): str(row["function"]) for row in rows}
            missing = [k for k in keys if k not in found]
            claims = found | (await self.claimed(missing) if missing else {})
        else:
            held = await self.ledger_keys(keys)
            free = {k: wanted[k] for k in keys if k not in held}
            claims = dict.fromkeys(held, "money") | await self._claim_free(free, now_ms, marks)
        for tid, mark in marks.items():  # as the statement wrote it
            if (t := self._terminals.get(tid)) is not None:
                self._terminals[tid] = replace(t, claims_batch=mark)
        return claims

    async def _claim_free(
        self, wanted: dict[str, str], now_ms: int, marks: dict[str, str]
    ) -> dict[str, str]:
        """SQLite: claim the keys not claimed yet, and mark their terminals' batch, in one
        transaction under the write lock."""
        c, t = schema.pos_claims, schema.pos_terminals
        keys = sorted(wanted)
        for _ in range(2):
            try:
                async with self.engine.connect() as plain:
                    # The write lock at BEGIN, as `Records.begin` takes it.
                    conn = await plain.execution_options(sqlite_begin="IMMEDIATE")
                    async with conn.begin():
                        found = await _claims(conn, keys)
                        new = [
                            {"key": k, "function": wanted[k], "created_at_ms": now_ms}
                            for k in keys
                            if k not in found
                        ]
                        if new:
                            await conn.execute(insert(c), new)
                        for tid, mark in marks.items():
                            await conn.execute(
                                update(t).where(t.c.tid == tid).values(claims_batch=mark)
                            )
                        return found | {str(row["key"]): str(row["function"]) for row in new}
            except IntegrityError:
                continue
        async with self.engine.connect() as conn:
            return await _claims(conn, keys)

    async def claimed(self, keys: Sequence[str]) -> dict[str, str]:
        """The function each of `keys` was claimed for, if any."""
        async with self._records.read() as unit:
            rows = await unit.find_unique("pos_claims", "key", keys, {})
        return {str(row["key"]): str(row["function"]) for row in rows}

    async def ledger_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of `keys` the ledger holds a POS transfer or a decided failure under (not a
        reversal's tombstone: a request reversed before it arrived is its own feature's to
        answer)."""
        where = {"client": POS_CLIENT}
        async with self._records.read() as unit:
            posted = await unit.find_unique("ledger_transfers", "key", keys, where)
            failed = await unit.find_unique("ledger_failures", "key", keys, where)
        return {str(row["key"]) for row in posted} | {
            str(row["key"]) for row in failed if row["code"] != TOMBSTONE_CODE
        }

    async def undone(self, transfer_id: int) -> bool:
        """Whether the transfer was reversed (or, a hold, voided or expired) since, and
        stays so: a reversal that was itself reversed (a void the terminal reversed) leaves
        its target standing (`reversals_of`: an odd chain undoes it)."""
        t = ledger_schema.transfers
        query = select(t.c.id).where(
            t.c.kind.in_(("void", "expire")) & (t.c.pending_id == transfer_id)
        )
        async with self.engine.connect() as conn:
            if (await conn.execute(query.limit(1))).first() is not None:
                return True
        return len(await self.reversals_of(transfer_id)) % 2 == 1

    async def reversals_of(self, transfer_id: int) -> list[dict[str, Any]]:
        """The chain of reversals from a transfer, in order: its reversal, that reversal's
        reversal, and so on (the ledger reverses a transfer at most once), the whole chain:
        the POS lets it grow to `REVERSAL_CHAIN_MAX` + 1 links, and this reads one more. An
        odd chain leaves the transfer undone, an even one standing (a void, the terminal's
        reversal of that void: the purchase stands again)."""
        t = ledger_schema.transfers
        query = select(*_transfer_columns(t)).where(
            t.c.kind == "reverse", t.c.target_id == bindparam("target")
        )
        chain: list[dict[str, Any]] = []
        async with self.engine.connect() as conn:
            target = transfer_id
            for _ in range(limits.REVERSAL_CHAIN_MAX + 2):
                row = (await conn.execute(query, {"target": target})).mappings().first()
                if row is None:
                    break
                chain.append(_transfer(row))
                target = int(row["id"])
        return chain

    async def balance_after(self, transfer_id: int, account_id: int) -> Balance | None:
        """The account's balance right after `transfer_id` (the stored answer of a replay)."""
        e = ledger_schema.entries
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        e.c.debits_posted,
                        e.c.credits_posted,
                        e.c.debits_pending,
                        e.c.credits_pending,
                        e.c.version,
                    ).where(e.c.transfer_id == transfer_id, e.c.account_id == account_id)
                )
            ).first()
        return None if row is None else Balance(*(int(x) for x in row))

    async def batch_lines(self, prefix: str) -> list[BatchLine]:
        """Every POS transfer whose key starts with `prefix` (one terminal batch): a range
        scan of the ledger's unique (client, key) index."""
        t = ledger_schema.transfers
        # '/' + 1 is '0': every key with the prefix sorts before prefix[:-1] + '0'.
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        query = select(t.c.id, t.c.key, t.c.kind, t.c.reason, t.c.postings, t.c.target_id).where(
            t.c.client == POS_CLIENT, t.c.key >= prefix, t.c.key < upper
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [
            BatchLine(
                id=int(r["id"]),
                key=r["key"],
                kind=r["kind"],
                reason=r["reason"],
                amount=int(json.loads(r["postings"])[0][2]),
                target_id=None if r["target_id"] is None else int(r["target_id"]),
            )
            for r in rows
        ]


def terminal_row(t: Terminal, now_ms: int) -> dict[str, Any]:
    """The pos_terminals row of a new terminal."""
    return {
        "tid": t.tid,
        "mid": t.mid,
        "store": t.store,
        "legal_entity": t.legal_entity,
        "key_mode": t.key_mode,
        "tmk_sealed": t.tmk_sealed,
        "state": t.state,
        "batch": t.batch,
        "batch_cycle": t.batch_cycle,
        "sales_account": t.sales_account,
        "cash_account": t.cash_account,
        "created_at_ms": now_ms,
        "claims_batch": "",  # none claimed yet
    }


def card_of(row: Any) -> Card:
    return Card(
        token=row["token"],
        pan_masked=row["pan_masked"],
        legal_entity=row["legal_entity"],
        account_id=int(row["account_id"]),
        expires=row["expires"],
        state=row["state"],
        balance_max=int(row["balance_max"]),
        id=int(row["id"]),
        class_code=row["class_code"],
        store=row["store"],
        named=bool(row["named"]),
        has_pin=bool(row["pvv"]),
    )


def class_of(row: Any) -> CardClass:
    return CardClass(
        code=row["code"],
        name=row["name"],
        named=bool(row["named"]),
        gift=bool(row["gift"]),
        denominations=tuple(int(x) for x in json.loads(row["denominations"])),
        discount_bp=int(row["discount_bp"]),
        points_multiplier_pct=int(row["points_multiplier_pct"]),
        issue_fee=int(row["issue_fee"]),
        replace_fee=int(row["replace_fee"]),
        balance_max=int(row["balance_max"]),
        validity_months=int(row["validity_months"]),
        state=row["state"],
        points_program=row["points_program"],
    )


def _terminal(row: Any) -> Terminal:
    return Terminal(
        tid=row["tid"],
        mid=row["mid"],
        store=row["store"],
        legal_entity=row["legal_entity"],
        key_mode=row["key_mode"],
        tmk_sealed=row["tmk_sealed"],
        state=row["state"],
        batch=row["batch"],
        batch_cycle=int(row["batch_cycle"]),
        sales_account=int(row["sales_account"]),
        cash_account=int(row["cash_account"]),
        claims_batch=row["claims_batch"],
    )


def _transfer_columns(t: Any) -> tuple[Any, ...]:
    return (
        t.c.id, t.c.key, t.c.kind, t.c.reason, t.c.postings, t.c.target_id, t.c.pending_id,
        t.c.metadata,
    )  # fmt: skip


def _transfer(row: Any) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "key": row["key"],
        "kind": row["kind"],
        "reason": row["reason"],
        "target_id": None if row["target_id"] is None else int(row["target_id"]),
        "pending_id": None if row["pending_id"] is None else int(row["pending_id"]),
        "postings": [
            (int(a), str(side), int(amount)) for a, side, amount in json.loads(row["postings"])
        ],
        "metadata": dict(json.loads(row["metadata"])),
    }


async def _claims(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, str]:
    c = schema.pos_claims
    rows = await conn.execute(select(c.c.key, c.c.function).where(c.c.key.in_(keys)))
    return {str(key): str(function) for key, function in rows}
