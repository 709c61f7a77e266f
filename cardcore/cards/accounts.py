"""The ledger accounts card functions post to, found or made on first use and remembered:
a store's cash, bank-card and sales accounts, the due-to / due-from clearing pair between two
legal entities, and any other account by its natural key (asset, entity, owner kind, owner
id, purpose) and flags: the points engine's lots, debts and entity accounts. And one lock per
card account, for the checks that must see the balance they change (a top-up against the
class maximum, a points spend against the lots).

Accounts are made through the ledger by natural key, so making one twice (two processes,
a restart) finds the first; the flags are part of what is asked (the ledger refuses the same
natural key with other flags).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from cardcore import limits
from cardcore.cards.model import CURRENCY
from cardcore.ledger.model import AccountFlags, CreateAccount, Result
from cardcore.ledger.service import Ledger

NO_FLAGS = AccountFlags()


class AccountsUnavailable(RuntimeError):
    """The ledger refused or could not make an account now."""


@dataclass(frozen=True, slots=True)
class Wanted:
    """One account by its natural key and flags."""

    entity: str
    owner_kind: str
    owner_id: str
    purpose: str
    asset: str = CURRENCY
    flags: AccountFlags = NO_FLAGS


class Accounts:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._ids: dict[Wanted, int] = {}
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    def lock(self, account_id: int) -> asyncio.Lock:
        """The lock of one card account (held only while a check and its change run)."""
        found = self._locks.get(account_id)
        if found is None:
            found = asyncio.Lock()
            self._locks[account_id] = found
        return found

    async def ensure(self, wanted: Sequence[Wanted]) -> list[int]:
        """Account ids of `wanted`, in order, made in one ledger call when missing."""
        found = {w: self._ids[w] for w in wanted if w in self._ids}
        missing = [w for w in dict.fromkeys(wanted) if w not in found]
        if missing:
            ops = [
                CreateAccount(w.asset, w.entity, w.owner_kind, w.owner_id, w.purpose, w.flags)
                for w in missing
            ]
            results: list[Result] = await self.ledger.submit(ops)
            for key, result in zip(missing, results, strict=True):
                if not result.ok or result.account_id is None:
                    raise AccountsUnavailable(f"account {key.purpose}: {result.code}")
                found[key] = result.account_id
                if len(self._ids) < limits.CARD_CACHE_ENTRIES_MAX:
                    self._ids[key] = result.account_id
        return [found[w] for w in wanted]

    async def _ensure(self, wanted: Sequence[tuple[str, str, str, str]]) -> list[int]:
        """Account ids of (entity, owner kind, owner id, purpose), CNY, no flags."""
        return await self.ensure([Wanted(*w) for w in wanted])

    async def store(self, entity: str, store: str, purpose: str) -> int:
        """A store's account: "cash", "bank_card" (card payments at the counter), "sales",
        "fees"."""
        return (await self._ensure([(entity, "store", store, purpose)]))[0]

    async def clearing(self, owing: str, owed: str) -> tuple[int, int] | None:
        """(due_to at the owing entity, due_from at the owed entity), or None within one
        entity."""
        if owing == owed:
            return None
        due_to, due_from = await self._ensure(
            [(owing, "entity", owed, "due_to"), (owed, "entity", owing, "due_from")]
        )
        return due_to, due_from
