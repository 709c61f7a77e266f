"""POS terminals as the admin API manages them: each belongs to one store (and so to the
store's legal entity); registered with a fresh master key shown once; listed, read, disabled
and enabled inside the caller's scope. A disabled terminal is refused at the POS at once
(the directory forgets its cached record)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable
from typing import Any

from cardcore import limits
from cardcore.cards import admin
from cardcore.cards.accounts import Accounts
from cardcore.cards.directory import Directory, terminal_row
from cardcore.cards.model import Terminal, batch_totals
from cardcore.ledger.service import Ledger
from cardcore.org.model import Perm, Principal, Refused, require, scoped_filter
from cardcore.org.service import OrgService
from cardcore.records import Conflict, Records

TERMINALS = "pos_terminals"
SETTLEMENTS = "pos_settlements"


_TOTALS = ("debit_amount", "debit_count", "credit_amount", "credit_count")


def settlement_view(
    row: dict[str, Any], store: str, now: tuple[int, int, int, int]
) -> dict[str, Any]:
    """A settled terminal batch: the host's totals at its close, the terminal's, whether they
    agreed, and the host's totals of the batch now (`now`, from the ledger): a reversal
    that reached the host after the close (a gateway's store and forward) moves them."""

    def totals(prefix: str) -> dict[str, int]:
        return {name: int(row[prefix + name]) for name in _TOTALS}

    host = totals("")
    host_now = dict(zip(_TOTALS, now, strict=True))
    return {
        "id": int(row["id"]), "tid": row["tid"], "store": store, "batch": row["batch"],
        "batch_cycle": int(row["batch_cycle"]), "host": host,
        "terminal": totals("terminal_"), "balanced": bool(row["balanced"]),
        "settled_at_ms": int(row["settled_at_ms"]), "host_now": host_now,
        "moved_since_close": host_now != host,
    }  # fmt: skip


def terminal_view(row: dict[str, Any]) -> dict[str, Any]:
    """What the admin API shows of a terminal: never its sealed master key."""
    return {
        "tid": row["tid"],
        "mid": row["mid"],
        "store": row["store"],
        "legal_entity": row["legal_entity"],
        "key_mode": row["key_mode"],
        "state": row["state"],
        "batch": row["batch"],
        "created_at_ms": int(row["created_at_ms"]),
    }


class TerminalAdmin:
    def __init__(
        self,
        records: Records,
        org: OrgService,
        ledger: Ledger,
        directory: Directory,
        accounts: Accounts,
        *,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.records = records
        self.org = org
        self.ledger = ledger
        self.directory = directory
        self.accounts = accounts
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))

    async def register(
        self, p: Principal, *, tid: str, mid: str, store: str, key_mode: str, tmk_sealed: str
    ) -> dict[str, Any]:
        """The terminal row and its audit row commit together; a second registration of the
        same id (even at the same moment) is 409 `terminal_exists`."""
        place = await self.org.store_place(store, open_=True)
        require(p, Perm.ORG_WRITE, place)
        await admin.ensure_currency(self.ledger)
        sales = await self.accounts.store(place.entity, store, "sales")
        cash = await self.accounts.store(place.entity, store, "cash")
        terminal = Terminal(
            tid=tid,
            mid=mid,
            store=store,
            legal_entity=place.entity,
            key_mode=key_mode,
            tmk_sealed=tmk_sealed,
            state="active",
            batch="000001",
            batch_cycle=0,
            sales_account=sales,
            cash_account=cash,
        )
        now = self.clock_ms()
        row = terminal_row(terminal, now)
        view = terminal_view(row)
        exists = Refused("conflict", "terminal_exists", f"terminal {tid} exists", "tid")
        async with self.records.begin() as uow:
            if await uow.get(TERMINALS, tid=tid) is not None:
                raise exists
            try:
                await uow.insert(TERMINALS, row)
            except Conflict:
                raise exists from None
            await uow.audit(
                p, action="terminal.create", kind="terminal", object_id=tid, place=place,
                before=None, after=view, now_ms=now,
            )  # fmt: skip
        self.directory.forget_terminal(tid)
        return view

    async def _row(self, p: Principal, tid: str, perm: Perm) -> dict[str, Any]:
        async with self.records.read() as uow:
            row = await uow.get(TERMINALS, tid=tid)
        if row is None:
            raise Refused("not_found", "terminal_not_found", "no such terminal", "tid")
        require(p, perm, await self.org.store_place(row["store"]))
        return row

    async def get(self, p: Principal, tid: str) -> dict[str, Any]:
        return terminal_view(await self._row(p, tid, Perm.ORG_READ))

    async def list(
        self, p: Principal, filters: dict[str, str], after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        require(p, Perm.ORG_READ)
        scoped = scoped_filter(p, filters)
        if scoped is None:
            return []
        where: dict[str, Any] = scoped
        async with self.records.read() as uow:
            rows = await uow.find(TERMINALS, where, order="tid", after=after, limit=limit)
        return [terminal_view(r) for r in rows]

    async def settlements(
        self, p: Principal, filters: dict[str, Any], after: int | None, limit: int
    ) -> builtins.list[dict[str, Any]]:
        """HQ finance's daily reconciliation of terminals: each settled batch (0500 or the
        upload's end), the host's totals beside the terminal's and whether they agreed,
        newest last, of the terminals in the caller's scope (`tid`, `store` and `balanced`
        narrow it). A scope or store narrower than the group reads its terminals first (at
        most REPORT_TERMINALS_MAX)."""
        require(p, Perm.REPORTS_READ)
        place = {k: filters[k] for k in ("store",) if k in filters}
        scoped = scoped_filter(p, place)
        if scoped is None:
            return []
        where: dict[str, Any] = {}
        if "balanced" in filters:
            where["balanced"] = filters["balanced"]
        if "tid" in filters:
            scoped = {**scoped, "tid": filters["tid"]}
        async with self.records.read() as uow:
            stores: dict[str, str] | None = None  # tid -> store, when read first
            if scoped:
                terminals = await uow.find(
                    TERMINALS, scoped, order="tid", limit=limits.REPORT_TERMINALS_MAX
                )
                if len(terminals) > limits.REPORT_TERMINALS_MAX:
                    raise Refused(
                        "invalid", "too_many_terminals",
                        f"more than {limits.REPORT_TERMINALS_MAX} terminals: narrow by store",
                        "store",
                    )  # fmt: skip
                if not terminals:
                    return []
                stores = {t["tid"]: t["store"] for t in terminals}
                where["tid"] = sorted(stores)
            rows = await uow.find(SETTLEMENTS, where, after=after, limit=limit)
            tids = sorted({r["tid"] for r in rows})
            if stores is None and tids:  # the whole group: the page's terminals' stores
                page = await uow.find(TERMINALS, {"tid": tids}, order="tid", limit=len(tids))
                stores = {t["tid"]: t["store"] for t in page}
        now = [
            batch_totals(await self.directory.batch_lines(
                f"{r['tid']}/{int(r['batch_cycle'])}/{r['batch']}/"
            ))
            for r in rows
        ]  # fmt: skip
        return [
            settlement_view(r, (stores or {}).get(r["tid"], ""), totals)
            for r, totals in zip(rows, now, strict=True)
        ]

    async def set_state(self, p: Principal, tid: str, state: str) -> dict[str, Any]:
        row = await self._row(p, tid, Perm.ORG_WRITE)
        before = terminal_view(row)
        after = {**before, "state": state}
        async with self.records.begin() as uow:
            await uow.update(TERMINALS, {"tid": tid}, {"state": state})
            await uow.audit(
                p, action=f"terminal.{state}", kind="terminal", object_id=tid,
                place=await self.org.store_place(row["store"]), before=before, after=after,
                now_ms=self.clock_ms(),
            )  # fmt: skip
        self.directory.forget_terminal(tid)
        return after
