"""The card use cases of the admin API: card classes, issuing (one card or a batch), the
card lifecycle, money at the counter, PINs, reads and the breakage report.

Rules of every use case:
- The principal's permission and scope are checked first. A card lives at
  Place(issuing entity, issuing store): a store officer sees and changes only its own
  store's cards; counter work also needs a scope that covers the counter's store.
- A refused request changes nothing. A record change and its audit row commit together;
  a state change is a guarded update (`state = what we read`), so two officers racing on
  one card cannot both win.
- Ledger steps that tighten (freeze) run before the record change; steps that loosen
  (unfreeze, refund) run while the card's state still makes the POS decline it. All
  lifecycle and counter steps on a card hold the card account's lock (shared with the POS
  top-up path), so the balance a check reads is the one its change acts on.
- After every state change `directory.forget_card` runs, so the POS sees it at once.
- Numbers: the group prefix, 19 digits from `secrets`, Luhn; kept as a keyed token plus
  ciphertext, shown in full only to a principal with `cards_pan`, never logged or audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cardcore import limits
from cardcore.cards import admin
from cardcore.cards.accounts import Accounts, AccountsUnavailable
from cardcore.cards.directory import Directory
from cardcore.cards.model import CURRENCY, CardState, luhn_ok, mask_pan, value_postings
from cardcore.cards.pins import PinCheck, Pins, pin_is_valid
from cardcore.db import DATABASE_ERRORS
from cardcore.ledger import wire
from cardcore.ledger.model import (
    Account,
    AccountFlags,
    Balance,
    CreateAccount,
    CreateTransfer,
    Op,
    Posting,
    Result,
    Reverse,
    SetAccountFrozen,
    Side,
    TransferKind,
)
from cardcore.ledger.service import Ledger
from cardcore.ledger.writer import Busy, LedgerUnavailable
from cardcore.org.model import (
    CODE,
    Function,
    Perm,
    Place,
    Principal,
    Refused,
    ScopeKind,
    require,
    scoped_filter,
)
from cardcore.org.service import STORES, OrgService
from cardcore.records import Conflict, Records, Unit
from cardcore.vault import Vault

log = logging.getLogger(__name__)

CARDS, CLASSES, MEMBERS = "cards", "card_classes", "members"
GRANT_SPENDS = "pos_grant_spends"
FEE_INTENTS = "card_fee_intents"
INTENT_OPEN, INTENT_UNDOING = "open", "undoing"
# A POS top-up's grant spend: its hold open, its value kept (confirmed), or given back.
SPEND_OPEN, SPEND_KEPT, SPEND_RETURNED = "open", "kept", "returned"
COUNTER_CLIENT = "counter"  # the ledger scope of counter top-ups, sales, refunds and fees
AUDIT = "org_audit_log"
PIN_VERIFY_FAILED, PIN_UNLOCKED = "card.pin_verify_failed", "card.pin_unlock"  # audit actions
TENDERS = ("cash", "bank_card")  # the store account a counter payment comes from
# States in which a card still holds its holder's value (a replaced card's value moved on
# with its account; a closed card's was refunded).
LIVE_STATES = (CardState.ACTIVE, CardState.FROZEN, CardState.LOST)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class CardsUnavailable(Exception):
    """The ledger could not take a step now (busy, unavailable); retry the request."""


class _DryRun(Exception):
    """Leaves a transaction that only checked something, rolling it back."""


# --- pure rules ------------------------------------------------------------------------------


def shanghai_month(now_ms: int) -> tuple[int, int]:
    """(year, month) of an instant in Asia/Shanghai (UTC+8, no daylight saving)."""
    t = time.gmtime(now_ms // 1000 + 8 * 3600)
    return t.tm_year, t.tm_mon


def expiry_of(now_ms: int, validity_months: int) -> str:
    """YYMM of the last month a card issued now is valid in; "" for no expiry. A card issued
    on any day of March 2025 with 36 months is valid through March 2028: at least the full
    term."""
    if validity_months == 0:
        return ""
    year, month = shanghai_month(now_ms)
    total = year * 12 + (month - 1) + validity_months
    return f"{(total // 12) % 100:02d}{total % 12 + 1:02d}"


def expiry_at_sale(expires: str, now_ms: int, validity_months: int) -> str:
    """The expiry of a card sold or activated now: its term counts from the sale, so a card
    printed long before (a batch in stock) still gets the class's whole term, and never ends
    sooner than it already did. "" (no expiry) on either side wins."""
    counted = expiry_of(now_ms, validity_months)
    if not expires or not counted:
        return ""
    return max(expires, counted)


def expired(expires: str, now_ms: int) -> bool:
    year, month = shanghai_month(now_ms)
    return bool(expires) and f"{year % 100:02d}{month:02d}" > expires


def month_yymm(as_of: str) -> str:
    """ "2028-04" -> "2804"."""
    return as_of[2:4] + as_of[5:7]


def available(b: Balance) -> int:
    """What a card may spend: credits posted less debits posted and held."""
    return b.credits_posted - b.debits_posted - b.debits_pending


def over_maximum(b: Balance, amount: int, maximum: int) -> bool:
    """Whether crediting `amount` could take the card past its class maximum (0 = none):
    top-ups still waiting for their terminal's confirmation count as already there."""
    return maximum > 0 and available(b) + b.credits_pending + amount > maximum


def check_class(c: dict[str, Any]) -> None:
    """Refuse (400) a card class whose fields do not fit together."""
    if c["gift"] and c["named"]:
        raise Refused("invalid", "gift_class_named", "a gift card is a bearer card", "named")
    names = c["denominations"]
    if c["gift"]:
        if not names:
            raise Refused(
                "invalid", "denominations_required", "a gift class needs denominations",
                "denominations",
            )  # fmt: skip
    elif names:
        raise Refused(
            "invalid", "invalid_value", "only gift classes have denominations", "denominations"
        )
    if len(names) > limits.DENOMINATIONS_MAX or len(set(names)) != len(names):
        raise Refused(
            "invalid", "invalid_value",
            f"at most {limits.DENOMINATIONS_MAX} different denominations", "denominations",
        )  # fmt: skip
    for value in names:
        if not 0 < value <= limits.POS_AMOUNT_MAX:
            raise Refused("invalid", "invalid_value", "a denomination is > 0 fen", "denominations")
        if c["balance_max"] and value > c["balance_max"]:
            raise Refused(
                "invalid", "denomination_over_balance_max",
                "a denomination is above the class's maximum balance", "denominations",
            )  # fmt: skip
    bounded = {
        "discount_bp": limits.DISCOUNT_BP_MAX,
        "points_multiplier_pct": limits.POINTS_MULTIPLIER_PCT_MAX,
        "issue_fee": limits.POS_AMOUNT_MAX,
        "replace_fee": limits.POS_AMOUNT_MAX,
        "balance_max": limits.POS_AMOUNT_MAX,
        "validity_months": limits.CARD_VALIDITY_MONTHS_MAX,
    }
    for name, high in bounded.items():
        if not 0 <= c[name] <= high:
            raise Refused("invalid", "invalid_value", f"{name} is 0..{high}", name)
    if not c["named"] and c["validity_months"] < limits.BEARER_VALIDITY_MONTHS_MIN:
        raise Refused(
            "invalid", "bearer_validity_too_short",
            f"bearer cards are valid at least {limits.BEARER_VALIDITY_MONTHS_MIN} months",
            "validity_months",
        )  # fmt: skip


def class_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """A new class's fields with the defaults filled in (maximum balance and validity by
    named or bearer)."""
    named = bool(values["named"])
    return {
        "code": values["code"],
        "name": values["name"],
        "named": named,
        "gift": bool(values.get("gift", False)),
        "denominations": list(values.get("denominations", [])),
        "discount_bp": values.get("discount_bp", 0),
        "points_multiplier_pct": values.get("points_multiplier_pct", 100),
        "issue_fee": values.get("issue_fee", 0),
        "replace_fee": values.get("replace_fee", 0),
        "balance_max": values.get(
            "balance_max",
            limits.NAMED_BALANCE_DEFAULT if named else limits.BEARER_BALANCE_DEFAULT,
        ),
        "validity_months": values.get(
            "validity_months", 0 if named else limits.BEARER_VALIDITY_MONTHS_MIN
        ),
        "points_program": values.get("points_program", ""),
    }


def class_view(row: dict[str, Any]) -> dict[str, Any]:
    names = row["denominations"]
    return {
        "code": row["code"],
        "name": row["name"],
        "named": bool(row["named"]),
        "gift": bool(row["gift"]),
        "denominations": [int(x) for x in (json.loads(names) if isinstance(names, str) else names)],
        "discount_bp": int(row["discount_bp"]),
        "points_multiplier_pct": int(row["points_multiplier_pct"]),
        "issue_fee": int(row["issue_fee"]),
        "replace_fee": int(row["replace_fee"]),
        "balance_max": int(row["balance_max"]),
        "validity_months": int(row["validity_months"]),
        "points_program": row["points_program"],
        "state": row["state"],
        "created_at_ms": int(row["created_at_ms"]),
        "updated_at_ms": int(row["updated_at_ms"]),
    }


def card_view(row: dict[str, Any]) -> dict[str, Any]:
    """What answers and audit images show of a card: never the number, secret or PIN value."""
    return {
        "id": int(row["id"]),
        "pan_masked": row["pan_masked"],
        "class_code": row["class_code"],
        "legal_entity": row["legal_entity"],
        "store": row["store"],
        "member_id": None if row["member_id"] is None else int(row["member_id"]),
        "named": bool(row["named"]),
        "state": row["state"],
        "expires": row["expires"],
        "balance_max": int(row["balance_max"]),
        "account_id": int(row["account_id"]),
        "replaced_by": None if row["replaced_by"] is None else int(row["replaced_by"]),
        "has_pin": bool(row["pvv"]),
        "pin_failures": int(row["pin_failures"]),
        "created_at_ms": int(row["created_at_ms"]),
        "updated_at_ms": int(row["updated_at_ms"]),
    }


def place_of(card: dict[str, Any]) -> Place:
    return Place(card["legal_entity"], card["store"])


def metadata(store: str, operator: str, receipt: str) -> tuple[tuple[str, str], ...]:
    """A counter transfer's metadata, sorted by name as the ledger keeps it."""
    pairs = (
        ("external_ref", receipt),
        ("operator", operator[: limits.OPERATOR_CHARS_MAX]),
        ("store", store),
    )
    return tuple(pair for pair in pairs if pair[1])


def csv_text(rows: list[tuple[object, ...]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("card_id", "card_number", "class_code", "expires", "face_value"))
    writer.writerows(rows)
    return out.getvalue()


def _state_refused(state: str, wanted: str) -> Refused:
    return Refused("conflict", "card_state", f"the card is {state}; {wanted}")


@dataclass(frozen=True, slots=True)
class _New:
    """A card about to be written: its number (in memory only) and its row."""

    pan: str
    row: dict[str, Any]


# --- the service -----------------------------------------------------------------------------


class CardService:
    def __init__(  # noqa: PLR0917 - the services it composes, one each, in a fixed order
        self,
        records: Records,
        org: OrgService,
        vault: Vault,
        ledger: Ledger,
        directory: Directory,
        accounts: Accounts,
        pins: Pins,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.records = records
        self.org = org
        self.vault = vault
        self.ledger = ledger
        self.directory = directory
        self.accounts = accounts
        self.pins = pins
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._currency_ready = False
        # Registered by the application (the points engine): the points each value account
        # still holds, usable or pending, and the forfeit of all of them (a close).
        self.points_held: Callable[[Sequence[int]], Awaitable[dict[int, int]]] | None = None
        self.forfeit_points: Callable[[int], Awaitable[int]] | None = None
        # (the service cards) the usable packages each value account holds
        self.services_held: Callable[[Sequence[int]], Awaitable[dict[int, int]]] | None = None

    # --- card classes ---------------------------------------------------------------------

    async def create_class(self, p: Principal, values: dict[str, Any]) -> dict[str, Any]:
        _require_group(p, Perm.CLASSES_WRITE)
        fields = class_defaults(values)
        if not CODE.fullmatch(fields["code"]):
            raise Refused(
                "invalid", "invalid_value", "a class code is 1-32 letters, digits . _ -", "code"
            )
        check_class(fields)
        now = self.clock_ms()
        row = {
            **fields,
            "denominations": json.dumps(fields["denominations"]),
            "state": "active",
            "created_at_ms": now,
            "updated_at_ms": now,
        }
        async with self.records.begin() as uow:
            await _touch(uow, CLASSES, code=fields["code"])
            if await uow.get(CLASSES, code=fields["code"]) is not None:
                raise Refused("conflict", "class_exists", "a card class has this code", "code")
            await _check_program(uow, fields["points_program"])
            try:
                await uow.insert(CLASSES, row)
            except Conflict:
                raise Refused("conflict", "class_exists", "made at the same moment") from None
            view = class_view(row)
            await uow.audit(
                p, action="card_class.create", kind="card_class", object_id=fields["code"],
                place=Place(), before=None, after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def list_classes(
        self, p: Principal, state: str | None, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        require(p, Perm.CLASSES_READ)
        where = {} if state is None else {"state": state}
        async with self.records.read() as uow:
            rows = await uow.find(CLASSES, where, order="code", after=after, limit=limit)
        return [class_view(r) for r in rows]

    async def get_class(self, p: Principal, code: str) -> dict[str, Any]:
        require(p, Perm.CLASSES_READ)
        return class_view(await self._class_row(code, "code"))

    async def update_class(
        self, p: Principal, code: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change a class. A new maximum balance applies at once to every card of the class
        (the POS's cached cards are dropped); a new validity applies to cards issued later."""
        _require_group(p, Perm.CLASSES_WRITE)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await _touch(uow, CLASSES, code=code)
            row = await uow.get(CLASSES, code=code)
            if row is None:
                raise Refused("not_found", "class_not_found", "no such card class", "code")
            before = class_view(row)
            merged = {**before, **changes}
            check_class(merged)
            if "points_program" in changes:
                await _check_program(uow, changes["points_program"])
            stored = dict(changes)
            if "denominations" in stored:
                stored["denominations"] = json.dumps(stored["denominations"])
            stored["updated_at_ms"] = now
            await uow.update(CLASSES, {"code": code}, stored)
            if merged["balance_max"] != before["balance_max"]:
                await uow.update(
                    CARDS,
                    {"class_code": code},
                    {"balance_max": merged["balance_max"], "updated_at_ms": now},
                )
            after = {**merged, "updated_at_ms": now}
            await uow.audit(
                p, action="card_class.update", kind="card_class", object_id=code,
                place=Place(), before=before, after=after, now_ms=now,
            )  # fmt: skip
        self.directory.forget_class(code)
        if after["balance_max"] != before["balance_max"]:
            self.directory.forget_all_cards()
        return after

    async def _class_row(self, code: str, field: str) -> dict[str, Any]:
        async with self.records.read() as uow:
            row = await uow.get(CLASSES, code=code)
        if row is None:
            raise Refused("not_found", "class_not_found", "no such card class", field)
        return row

    async def _live_class(self, code: str) -> dict[str, Any]:
        klass = class_view(await self._class_row(code, "class_code"))
        if klass["state"] != "active":
            raise Refused("conflict", "class_retired", "the card class is retired", "class_code")
        return klass

    # --- issuing ---------------------------------------------------------------------------

    async def issue(
        self, p: Principal, class_code: str, store: str, member_id: int | None
    ) -> dict[str, Any]:
        """One card of `class_code` issued by `store` (which HQ granted the class), named to
        a member or bearer. Answers the card and its number (in full only for `cards_pan`)."""
        place = await self.org.store_place(store, open_=True)
        require(p, Perm.CARDS_ISSUE, place)
        klass = await self._live_class(class_code)
        await self._check_member(p, klass, member_id)
        function = Function.GIFT if klass["gift"] else Function.STORED_VALUE
        await self._check_grant(store, function, class_code, count=1, amount=0)
        now = self.clock_ms()
        [new] = await self._prepare(klass, place, member_id, 1, now, state=_first_state(klass))

        async with self._fee_first(klass["issue_fee"], place, p, "issue") as intent:

            async def also(uow: Unit, _first_id: int) -> None:
                """A member deleted (its cards closed) since the check gets no new card; the
                fee's record goes with the card's write (`_fee_first`)."""
                await _fee_recorded(uow, intent)
                if member_id is None:
                    return
                await _touch(uow, MEMBERS, id=member_id)  # waits for a delete of the member
                member = await uow.get(MEMBERS, id=member_id)
                if member is None or member["state"] != "active":
                    raise Refused(
                        "conflict", "member_not_active", "the member is not active", "member_id"
                    )

            written = await self._write(
                p, [new], grant=(store, function, class_code, 1), action="card.issue", now=now,
                also=also,
            )  # fmt: skip
        return self._issued_view(p, written[0].row, new.pan)

    async def issue_batch(
        self,
        p: Principal,
        class_code: str,
        store: str,
        count: int,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """`count` bearer or gift cards for printing, issued inactive (activated at hand-out,
        or by the sale for gift cards). The grant is spent once for the whole batch, in the
        transaction that writes every card: all of them are issued, or none."""
        if not 1 <= count <= limits.CARD_ISSUE_BATCH_MAX:
            raise Refused(
                "invalid", "invalid_value", f"count is 1..{limits.CARD_ISSUE_BATCH_MAX}", "count"
            )
        place = await self.org.store_place(store, open_=True)
        require(p, Perm.CARDS_ISSUE, place)
        klass = await self._live_class(class_code)
        if klass["named"]:
            raise Refused(
                "conflict", "class_is_named", "batches are of bearer or gift classes", "class_code"
            )
        function = Function.GIFT if klass["gift"] else Function.STORED_VALUE
        await self._check_grant(store, function, class_code, count=count, amount=0)
        now = self.clock_ms()
        new = await self._prepare(
            klass, place, None, count, now, state=CardState.INACTIVE, progress=progress,
            fee_due=klass["issue_fee"],
        )  # fmt: skip
        written = await self._write(
            p, new, grant=(store, function, class_code, count), action="card_batch.issue",
            now=now, progress=progress,
        )  # fmt: skip
        first, last = int(written[0].row["id"]), int(written[-1].row["id"])
        return {"first_id": first, "last_id": last, "count": count}

    async def _check_member(
        self, p: Principal, klass: dict[str, Any], member_id: int | None
    ) -> None:
        if not klass["named"]:
            if member_id is not None:
                raise Refused(
                    "invalid", "bearer_card_member", "a bearer card has no member", "member_id"
                )
            return
        if member_id is None:
            raise Refused("invalid", "member_required", "a named card needs a member", "member_id")
        async with self.records.read() as uow:
            member = await uow.get(MEMBERS, id=member_id)
        if member is None:
            raise Refused("not_found", "member_not_found", "no such member", "member_id")
        if not p.covers(Place(member["legal_entity"], member["home_store"])):
            raise Refused("forbidden", "scope_forbidden", "the member is outside your scope")
        if member["state"] != "active":
            raise Refused("conflict", "member_not_active", "the member is not active", "member_id")

    async def _check_grant(
        self, store: str, function: Function, product: str, *, count: int, amount: int
    ) -> None:
        """Whether the grant would let this happen, spending nothing: the real spend happens
        with the change; this check only keeps a refused request from touching the ledger."""
        try:
            async with self.records.begin() as uow:
                await _touch(uow, CARDS, id=0)
                await self.org.use_grant(uow, store, function, product, count=count, amount=amount)
                _roll_back()
        except _DryRun:
            return

    async def _prepare(
        self,
        klass: dict[str, Any],
        place: Place,
        member_id: int | None,
        count: int,
        now: int,
        *,
        state: str,
        account_ids: list[int] | None = None,
        progress: Progress | None = None,
        fee_due: int = 0,
    ) -> list[_New]:
        """New unique numbers, their sealed columns and (unless given) their value accounts."""
        pans = await self._draw(count)
        tokens = [self.vault.card_token(pan) for pan in pans]
        if account_ids is None:
            purpose = "gift" if klass["gift"] else "stored_value"
            account_ids = await self._open_accounts(place.entity, tokens, purpose, progress)
        expires = expiry_of(now, klass["validity_months"])
        out = []
        for i, (pan, token, account_id) in enumerate(zip(pans, tokens, account_ids, strict=True)):
            row = {
                "token": token,
                "pan_masked": mask_pan(pan),
                "legal_entity": place.entity,
                "account_id": account_id,
                "expires": expires,
                "state": str(state),
                "balance_max": klass["balance_max"],
                "created_at_ms": now,
                "class_code": klass["code"],
                "member_id": member_id,
                "store": place.store,
                "named": klass["named"],
                "pvv": "",
                "pin_failures": 0,
                "replaced_by": None,
                "updated_at_ms": now,
                "fee_due": fee_due,
                **admin.sealed_columns(self.vault, token, pan),
            }
            out.append(_New(pan, row))
            if i % limits.DB_INSERT_ROWS_MAX == limits.DB_INSERT_ROWS_MAX - 1:
                await asyncio.sleep(0)  # sealing 100,000 numbers: let the server breathe
        return out

    async def _draw(self, count: int) -> list[str]:
        """`count` new card numbers, none drawn twice and none already issued."""
        pans: list[str] = []
        seen: set[str] = set()
        for _ in range(limits.CARD_ISSUE_ATTEMPTS_MAX):
            while len(pans) < count:
                pan = admin.new_pan()
                if pan not in seen:
                    seen.add(pan)
                    pans.append(pan)
            taken = await self.directory.existing_tokens([self.vault.card_token(x) for x in pans])
            if not taken:
                return pans
            pans = [x for x in pans if self.vault.card_token(x) not in taken]
        raise Refused("conflict", "card_number_clash", "no free card number; try again")

    async def _open_accounts(
        self, entity: str, tokens: list[str], purpose: str, progress: Progress | None
    ) -> list[int]:
        await self._ensure_currency()
        wallet = AccountFlags(no_overdraft=True)
        ids: list[int] = []
        for i in range(0, len(tokens), limits.REQUEST_OPS_MAX):
            chunk = tokens[i : i + limits.REQUEST_OPS_MAX]
            ops: list[Op] = [
                CreateAccount(CURRENCY, entity, "card", t[:32], purpose, wallet) for t in chunk
            ]
            for result in await self._submit(ops):
                if not result.ok or result.account_id is None:
                    raise CardsUnavailable(f"the ledger refused a card account: {result.code}")
                ids.append(result.account_id)
            if progress is not None:
                progress("accounts", len(ids), len(tokens))
        return ids

    async def _write(
        self,
        p: Principal,
        new: list[_New],
        *,
        grant: tuple[str, Function, str, int] | None,
        action: str,
        now: int,
        progress: Progress | None = None,
        also: Callable[[Unit, int], Any] | None = None,
    ) -> list[_New]:
        """Number the cards and write them, with the grant spent and the audit row, in one
        transaction (ids follow the highest; one issuer at a time in this process, and the
        unique index refuses a clash with another process: then we read the top again).
        `also(uow, first_id)` runs in the same transaction (a replaced card's update)."""
        for _ in range(limits.CARD_ISSUE_ATTEMPTS_MAX):
            try:
                async with self.directory.issue_lock, self.records.begin() as uow:
                    await _touch(uow, CARDS, id=0)
                    if grant is not None:
                        store, function, product, count = grant
                        await self.org.use_grant(
                            uow, store, function, product, count=count, amount=0
                        )
                    top = await uow.find(CARDS, order="id", descending=True, limit=1)
                    first = int(top[0]["id"]) + 1 if top else 1
                    rows = [{**n.row, "id": first + i} for i, n in enumerate(new)]
                    for i in range(0, len(rows), limits.DB_INSERT_ROWS_MAX):
                        await uow.insert(CARDS, rows[i : i + limits.DB_INSERT_ROWS_MAX])
                        if progress is not None:
                            progress("cards", min(i + limits.DB_INSERT_ROWS_MAX, len(rows)),
                                     len(rows))  # fmt: skip
                    if also is not None:
                        await also(uow, first)
                    await self._audit_issue(uow, p, rows, action, now)
                return [_New(n.pan, row) for n, row in zip(new, rows, strict=True)]
            except Conflict:
                continue
        raise Refused("conflict", "card_id_clash", "another issuer took the ids; try again")

    @staticmethod
    async def _audit_issue(
        uow: Unit, p: Principal, rows: list[dict[str, Any]], action: str, now: int
    ) -> None:
        first = rows[0]
        place = place_of(first)
        if len(rows) == 1:
            await uow.audit(
                p, action=action, kind="card", object_id=first["id"], place=place,
                before=None, after=card_view(first), now_ms=now,
            )  # fmt: skip
            return
        summary = {
            "first_id": first["id"],
            "last_id": rows[-1]["id"],
            "count": len(rows),
            "class_code": first["class_code"],
            "store": first["store"],
            "expires": first["expires"],
        }
        await uow.audit(
            p, action=action, kind="card_batch", object_id=f"{first['id']}-{rows[-1]['id']}",
            place=place, before=None, after=summary, now_ms=now,
        )  # fmt: skip

    def _issued_view(self, p: Principal, row: dict[str, Any], pan: str) -> dict[str, Any]:
        view = card_view(row)
        if p.can(Perm.CARDS_PAN):
            view["pan"] = pan  # shown this once, to a role that must see it
        return view

    async def _fee(
        self, amount: int, place: Place, p: Principal, key: str, reason: str
    ) -> CreateTransfer | None:
        """A fee paid at the counter: the store's cash to its fee income (the op made)."""
        if amount <= 0:
            return None
        cash = await self._store_account(place, "cash")
        fees = await self._store_account(place, "fees")
        op = CreateTransfer(
            client=COUNTER_CLIENT,
            key=key,
            asset=CURRENCY,
            postings=(Posting(cash, Side.DEBIT, amount), Posting(fees, Side.CREDIT, amount)),
            reason=reason,
            metadata=metadata(place.store, p.user, ""),
        )
        _ledger_ok(await self._submit_one(op))
        return op

    @contextlib.asynccontextmanager
    async def _fee_first(
        self, amount: int, place: Place, p: Principal, fee: str, *, of: str = ""
    ) -> AsyncIterator[str]:
        """The fee of a change (issue, replace, a batch card handed out), paid on entering,
        before the change inside is written: a fee the ledger cannot take now refuses the
        change before anything is written, so an error never leaves a written card whose
        number nobody was told; a change refused inside gives the fee back (best effort: a
        give-back the ledger cannot take now is logged) and its error goes on. With `of`
        (the card it is for: a replace, a hand-out) the key is that card's, so a retry
        replays the fee that stands (never a second fee, even when a give-back failed). A
        new card has no identity yet: its fee's key is drawn at random, and the fee is
        recorded first (`card_fee_intents`); it yields the record's key, which the card's
        write deletes in its transaction (`_fee_recorded`), and a record left behind (the
        server stopped, the request was cancelled) is the sweep's to give back
        (`sweep_fee_intents`). Otherwise it yields ""."""
        op, intent = None, ""
        if amount > 0:
            if of:
                key = await self._fee_key(f"fee/{fee}/card/{of}")
            else:
                key = intent = f"fee/{fee}/{secrets.token_hex(8)}"
                async with self.records.begin() as uow:
                    await uow.insert(FEE_INTENTS, {
                        "key": key, "store": place.store, "state": INTENT_OPEN,
                        "operator": p.user[: limits.OPERATOR_CHARS_MAX],
                        "created_at_ms": self.clock_ms(),
                    })  # fmt: skip
            op = await self._fee(amount, place, p, key, f"{fee}_fee")
        try:
            yield intent
        except Exception:
            given_back = op is None
            if op is not None:
                try:
                    await self._fee_back(op.key, place.store, p.user, f"{fee}_fee_undone")
                    given_back = True
                except (CardsUnavailable, Refused):  # a new card's: the sweep's, later
                    log.exception("a fee whose change was refused could not be given back")
            if intent and given_back:
                with contextlib.suppress(*DATABASE_ERRORS):  # else the sweep finds it given
                    async with self.records.begin() as uow:
                        await uow.delete(FEE_INTENTS, {"key": intent, "state": INTENT_OPEN})
            raise

    async def _fee_back(self, key: str, store: str, operator: str, reason: str) -> None:
        """Give back the counter fee under `key`: reversed once (its reversal's key is the
        fee's and "/R", the same from every path), or, never taken, a tombstone under its key
        so it never will be. Refused when the ledger cannot answer now."""
        result = await self._submit_one(
            Reverse(
                client=COUNTER_CLIENT,
                key=key[: limits.KEY_CHARS_MAX - 2] + "/R",
                target_key=key,
                reason=reason,
                metadata=metadata(store, operator, ""),
                tombstone=True,
            )
        )
        if not result.ok and result.code != "target_already_reversed":
            _ledger_ok(result)

    async def sweep_fee_intents(self) -> dict[str, int]:
        """The fees of new cards whose card was never written, given back: each record older
        than `CARD_FEE_INTENT_STALE_S` is first turned undoing (a card write that comes
        this late then finds it gone and is refused), its fee given back (or, never taken,
        barred by a tombstone), and the record deleted. Idempotent: a sweep that stopped
        half way leaves records undoing, which the next one finishes; the ledger being
        unavailable ends it (CardsUnavailable) for the next. How many records it settled
        (`fees_settled`: a fee given back, or one never taken barred)."""
        stale = self.clock_ms() - limits.CARD_FEE_INTENT_STALE_S * 1000
        done, after = 0, None
        while True:
            async with self.records.read() as uow:
                rows = await uow.find(
                    FEE_INTENTS, order="key", after=after,
                    limit=limits.CARD_FEE_SWEEP_PAGE_ROWS_MAX,
                )  # fmt: skip
            page = rows[: limits.CARD_FEE_SWEEP_PAGE_ROWS_MAX]
            for row in (r for r in page if int(r["created_at_ms"]) < stale):
                async with self.records.begin() as uow:
                    await uow.update(
                        FEE_INTENTS, {"key": row["key"], "state": INTENT_OPEN},
                        {"state": INTENT_UNDOING},
                    )  # fmt: skip
                    current = await uow.get(FEE_INTENTS, key=row["key"])
                if current is None:  # its card was written meanwhile
                    continue
                try:  # the give-back of `_fee_first`'s: the same reversal, whichever is first
                    await self._fee_back(
                        row["key"], row["store"], row["operator"], "issue_fee_undone"
                    )
                except Refused:  # left undoing; the ledger being down ends the sweep
                    log.exception("a fee of a card never written could not be given back")
                    continue
                async with self.records.begin() as uow:
                    done += await uow.delete(FEE_INTENTS, {"key": row["key"]})
            if len(rows) <= limits.CARD_FEE_SWEEP_PAGE_ROWS_MAX:
                return {"fees_settled": done}
            after = page[-1]["key"]

    async def _fee_key(self, base: str) -> str:
        """`base`, unless the fee under it was given back (its change refused): then the
        next `base/N` not given back (at most `CARD_FEE_ATTEMPTS_MAX`)."""
        key = base
        for n in range(2, limits.CARD_FEE_ATTEMPTS_MAX + 2):
            known = await self.directory.keyed_transfer(COUNTER_CLIENT, key)
            if known is None or not await self.directory.undone(int(known["id"])):
                return key
            key = f"{base}/{n}"
        raise Refused("conflict", "fee_attempts_exceeded", "too many refused attempts: ask HQ")

    # --- reading cards -----------------------------------------------------------------------

    async def _card(self, card_id: int) -> dict[str, Any]:
        async with self.records.read() as uow:
            row = await uow.get(CARDS, id=card_id)
        if row is None:
            raise Refused("not_found", "card_not_found", "no such card", "card_id")
        return row

    async def _card_for(self, p: Principal, card_id: int, perm: Perm) -> dict[str, Any]:
        row = await self._card(card_id)
        require(p, perm, place_of(row))
        return row

    async def get_card(self, p: Principal, card_id: int) -> dict[str, Any]:
        row = await self._card_for(p, card_id, Perm.CARDS_READ)
        return await self._full_view(row)

    async def lookup(self, p: Principal, pan: str) -> dict[str, Any]:
        """Find a card by its number (sent in a body, never in a URL)."""
        require(p, Perm.CARDS_READ)
        row = None
        if pan.isascii() and pan.isdigit() and luhn_ok(pan):
            async with self.records.read() as uow:
                row = await uow.get(CARDS, token=self.vault.card_token(pan))
        if row is None:
            raise Refused("not_found", "card_not_found", "no card has this number", "pan")
        require(p, Perm.CARDS_READ, place_of(row))
        return await self._full_view(row)

    async def _full_view(self, row: dict[str, Any]) -> dict[str, Any]:
        view = card_view(row)
        account = await self.ledger.account(int(row["account_id"]))
        b = account.balance if account is not None else Balance()
        view["balances"] = {
            "available": available(b),
            "posted": b.credits_posted - b.debits_posted,
            "pending": b.debits_pending,
            "incoming": b.credits_pending,
            "maximum": int(row["balance_max"]),
        }
        view["account_frozen"] = bool(account is not None and account.info.flags.debit_frozen)
        klass = await self.directory.card_class(row["class_code"])
        view["discount_bp"] = klass.discount_bp if klass is not None else 0
        return view

    async def list_cards(
        self, p: Principal, filters: dict[str, Any], after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        require(p, Perm.CARDS_READ)
        scoped = scoped_filter(p, filters)
        if scoped is None:
            return []
        where: dict[str, Any] = scoped
        async with self.records.read() as uow:
            rows = await uow.find(CARDS, where, after=after, limit=limit)
        return [card_view(r) for r in rows]

    async def transactions(
        self, p: Principal, card_id: int, after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """The value account's journal lines, newest first. A replaced card and its successor
        share the account: either shows the whole history."""
        row = await self._card_for(p, card_id, Perm.CARDS_READ)
        entries = await self.ledger.entries(
            int(row["account_id"]), cursor=after, limit=limit + 1, newest_first=True
        )
        return [_entry_view(e) for e in entries]

    # --- ledger accounts: what finance and auditors read of any account in their scope --------

    async def ledger_account(self, p: Principal, account_id: int) -> dict[str, Any]:
        """A ledger account with its flags, four balances and version (`reports_read`)."""
        return wire.account_json(await self._account_for(p, account_id))

    async def ledger_entries(
        self, p: Principal, account_id: int, after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """The account's journal entries, newest first, each with the balances after it."""
        await self._account_for(p, account_id)
        rows = await self.ledger.entries(
            account_id, cursor=after, limit=limit + 1, newest_first=True
        )
        return [wire.entry_json(row) for row in rows]

    async def _account_for(self, p: Principal, account_id: int) -> Account:
        """The account, when the principal may read reports and its scope covers the
        account: a legal entity's accounts are its entity's; a store's own accounts and its
        cards' value accounts are also the store's."""
        require(p, Perm.REPORTS_READ)
        account = await self.ledger.account(account_id)
        if account is None:
            raise Refused("not_found", "account_not_found", "no account with this id", "account_id")
        info = account.info
        places = [Place(info.legal_entity)]
        if info.owner_kind == "store":
            places = [Place(info.legal_entity, info.owner_id)]
        elif info.owner_kind == "card":  # a replaced card shares its account with its successor
            async with self.records.read() as uow:
                held = await uow.find(
                    CARDS, {"account_id": account_id}, limit=limits.PAGE_LIMIT_MAX
                )
            places = [place_of(card) for card in held] or places
        require(p, Perm.REPORTS_READ, next((x for x in places if p.covers(x)), places[0]))
        return account

    async def export(self, p: Principal, first_id: int, last_id: int) -> str:
        """Cards first_id..last_id in the caller's scope as CSV for printing: numbers in full
        only for `cards_pan` (and that export is audited), masked otherwise."""
        require(p, Perm.CARDS_READ)
        if not 1 <= first_id <= last_id or last_id - first_id >= limits.EXPORT_ROWS_MAX:
            raise Refused(
                "invalid", "invalid_value",
                f"first_id <= last_id, at most {limits.EXPORT_ROWS_MAX} cards", "last_id",
            )  # fmt: skip
        full = p.can(Perm.CARDS_PAN)
        where: dict[str, Any] = {}
        if p.scope.kind is ScopeKind.STORE:
            where["store"] = p.scope.id
        elif p.scope.kind is ScopeKind.ENTITY:
            where["legal_entity"] = p.scope.id
        rows: list[dict[str, Any]] = []
        async with self.records.read() as uow:
            cursor = first_id - 1
            while True:
                chunk = await uow.find(CARDS, where, after=cursor, limit=limits.DB_INSERT_ROWS_MAX)
                chunk = [r for r in chunk[: limits.DB_INSERT_ROWS_MAX] if r["id"] <= last_id]
                rows.extend(chunk)
                if len(chunk) < limits.DB_INSERT_ROWS_MAX:
                    break
                cursor = int(chunk[-1]["id"])
        gift_codes = await self._gift_codes({r["class_code"] for r in rows})
        sold = [int(r["account_id"]) for r in rows if r["class_code"] in gift_codes]
        balances = await self.directory.balances(sold) if sold else {}
        lines: list[tuple[object, ...]] = []
        for r in rows:
            number = (
                self.vault.open_text(f"pan:{r['token']}", r["pan_sealed"])
                if full and r["pan_sealed"]
                else r["pan_masked"]
            )
            face: object = ""
            if r["class_code"] in gift_codes and r["state"] != CardState.INACTIVE:
                b = balances.get(int(r["account_id"]))
                face = b.credits_posted if b is not None else ""
            lines.append((r["id"], number, r["class_code"], r["expires"], face))
        if full and rows:
            now = self.clock_ms()
            async with self.records.begin() as uow:
                await uow.audit(
                    p, action="cards.export_full_numbers", kind="card_batch",
                    object_id=f"{first_id}-{last_id}", place=_scope_place(p), before=None,
                    after={"first_id": first_id, "last_id": last_id, "count": len(rows)},
                    now_ms=now,
                )  # fmt: skip
        return csv_text(lines)

    async def _gift_codes(self, codes: set[str]) -> set[str]:
        out = set()
        for code in codes:
            klass = await self.directory.card_class(code)
            if klass is not None and klass.gift:
                out.add(code)
        return out

    # --- lifecycle -------------------------------------------------------------------------

    async def activate(self, p: Principal, card_id: int) -> dict[str, Any]:
        """An inactive stored-value card handed out becomes active (gift cards: by sale), its
        term counted again from now (`expiry_at_sale`)."""
        card = await self._card_for(p, card_id, Perm.CARDS_ISSUE)
        klass = await self.directory.card_class(card["class_code"])
        if klass is not None and klass.gift:
            raise Refused(
                "conflict", "gift_sale_required", "a gift card becomes active when it is sold"
            )
        async with self.accounts.lock(int(card["account_id"])):
            fresh = await self._card(card_id)  # only activation and sale change an expiry
            if fresh["state"] != CardState.INACTIVE:
                raise _state_refused(fresh["state"], "only an inactive card is activated")
            expires = fresh["expires"]
            if klass is not None:
                expires = expiry_at_sale(expires, self.clock_ms(), klass.validity_months)
            # A batch card pays its issue fee now that it is handed out, once (`fee_due`
            # turns 0 in the guarded update that activates it).
            async with self._fee_first(
                int(fresh["fee_due"]), place_of(fresh), p, "issue", of=str(card_id)
            ):
                return await self._transition(
                    p, card_id, allowed={CardState.INACTIVE}, state=CardState.ACTIVE,
                    action="card.activate", extra={"expires": expires, "fee_due": 0},
                )  # fmt: skip

    async def freeze(self, p: Principal, card_id: int) -> dict[str, Any]:
        card = await self._card_for(p, card_id, Perm.CARDS_STATE)
        return await self._freezing(p, card, CardState.FROZEN, "card.freeze")

    async def report_lost(self, p: Principal, card_id: int) -> dict[str, Any]:
        card = await self._card_for(p, card_id, Perm.CARDS_STATE)
        return await self._freezing(p, card, CardState.LOST, "card.lost")

    async def _freezing(
        self, p: Principal, card: dict[str, Any], state: CardState, action: str
    ) -> dict[str, Any]:
        """Freeze the value account's debits first, then change the state: a failure in
        between leaves a card that declines, never one that pays."""
        allowed = {CardState.ACTIVE} if state is CardState.FROZEN else {
            CardState.ACTIVE, CardState.FROZEN, CardState.INACTIVE}  # fmt: skip
        account_id = int(card["account_id"])
        async with self.accounts.lock(account_id):
            fresh = await self._card(int(card["id"]))
            if fresh["state"] not in allowed:
                raise _state_refused(fresh["state"], f"it cannot be {action.split('.')[1]}")
            was_frozen = await self._debit_frozen(account_id)
            await self._set_frozen(account_id, frozen=True)
            try:
                return await self._transition(
                    p, int(card["id"]), allowed=allowed, state=state, action=action
                )
            except Exception:
                if not was_frozen:
                    await self._set_frozen(account_id, frozen=False)
                raise

    async def unfreeze(self, p: Principal, card_id: int) -> dict[str, Any]:
        """A frozen card active again: the account opens while the state still declines."""
        card = await self._card_for(p, card_id, Perm.CARDS_STATE)
        account_id = int(card["account_id"])
        async with self.accounts.lock(account_id):
            fresh = await self._card(card_id)
            if fresh["state"] != CardState.FROZEN:
                raise _state_refused(fresh["state"], "only a frozen card is unfrozen")
            await self._set_frozen(account_id, frozen=False)
            try:
                return await self._transition(
                    p, card_id, allowed={CardState.FROZEN}, state=CardState.ACTIVE,
                    action="card.unfreeze",
                )  # fmt: skip
            except Exception:
                await self._set_frozen(account_id, frozen=True)
                raise

    async def _transition(
        self,
        p: Principal,
        card_id: int,
        *,
        allowed: set[CardState],
        state: CardState,
        action: str,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Move the card from one of `allowed` to `state` with its audit row; 409 card_state
        (and nothing changed) when another request moved it first."""
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await _touch(uow, CARDS, id=card_id)
            row = await uow.get(CARDS, id=card_id)
            assert row is not None
            if row["state"] not in allowed:
                raise _state_refused(row["state"], f"{action} needs {sorted(allowed)}")
            changes = {"state": str(state), "updated_at_ms": now, **(extra or {})}
            changed = await uow.update(CARDS, {"id": card_id, "state": row["state"]}, changes)
            if not changed:
                raise _state_refused("changing", "another request changed it first")
            after = card_view({**row, **changes})
            await uow.audit(
                p, action=action, kind="card", object_id=card_id, place=place_of(row),
                before=card_view(row), after=after, now_ms=now,
            )  # fmt: skip
        self.directory.forget_card(row["token"])
        return after

    async def replace(self, p: Principal, card_id: int) -> dict[str, Any]:
        """A new card of the same class, member and store that shares the old card's value
        account: balance and history carry over exactly, and no transfer can race a
        purchase. The old card is dead (replaced, pointing at its successor)."""
        old = await self._card_for(p, card_id, Perm.CARDS_ISSUE)
        klass = class_view(await self._class_row(old["class_code"], "card_id"))
        place = place_of(old)
        allowed = {CardState.ACTIVE, CardState.FROZEN, CardState.LOST}
        account_id = int(old["account_id"])
        async with self.accounts.lock(account_id):
            old = await self._card(card_id)
            if old["state"] not in allowed:
                raise _state_refused(old["state"], "only an active, frozen or lost card")
            now = self.clock_ms()
            # A stock card reported lost before it was handed out (its fee still due, or its
            # loss reported while inactive) is replaced by stock: inactive, owing the same
            # fee, paid when it is handed out (its term starts then, as any stock card's).
            stock = int(old["fee_due"]) > 0 or await self._lost_in_stock(old)
            [new] = await self._prepare(
                klass, place, old["member_id"], 1, now,
                state=CardState.INACTIVE if stock else CardState.ACTIVE,
                account_ids=[account_id], fee_due=int(old["fee_due"]),
            )  # fmt: skip
            new.row["expires"] = old["expires"]  # replacing never extends the value's life
            new.row["balance_max"] = old["balance_max"]
            was_frozen = await self._debit_frozen(account_id)
            if was_frozen:
                await self._set_frozen(account_id, frozen=False)  # the old state declines

            async def retire_old(uow: Unit, new_id: int) -> None:
                changed = await uow.update(
                    CARDS,
                    {"id": card_id, "state": old["state"]},
                    {"state": str(CardState.REPLACED), "replaced_by": new_id,
                     "updated_at_ms": now},
                )  # fmt: skip
                if not changed:
                    raise _state_refused("changing", "another request changed it first")
                await uow.audit(
                    p, action="card.replaced", kind="card", object_id=card_id, place=place,
                    before=card_view(old),
                    after=card_view({**old, "state": "replaced", "replaced_by": new_id}),
                    now_ms=now,
                )  # fmt: skip

            try:
                async with self._fee_first(
                    klass["replace_fee"], place, p, "replace", of=str(card_id)
                ):
                    [written] = await self._write(
                        p, [new], grant=None, action="card.replace", now=now, also=retire_old
                    )
            except Exception:
                if was_frozen:
                    await self._set_frozen(account_id, frozen=True)
                raise
            self.directory.forget_card(old["token"])
        return self._issued_view(p, written.row, written.pan)

    async def close(
        self, p: Principal, card_id: int, *, receipt: str, store: str | None,
        forfeit_points: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """Close the card, then refund its available balance in cash at the counter. The
        state changes first, so the POS declines the card; a purchase that was already on
        its way may still change the balance, so the refund reads and tries again (at most
        CARD_CLOSE_ATTEMPTS_MAX times). A closed card with value left (an earlier close
        stopped half way) may be closed again to finish the refund. A usable service
        package refuses it (409 `card_has_services`). Points are value too:
        while the card's account holds points (usable or pending, any program) the close is
        refused 409 `card_has_points` and nothing changes, unless `forfeit_points` gives
        them up (moved to the entity's points_forfeited account, in the audit row)."""
        card = await self._card_for(p, card_id, Perm.CARDS_MONEY)
        counter = await self._counter(p, store, card)
        account_id = int(card["account_id"])
        closable = {*LIVE_STATES, CardState.INACTIVE}
        async with self.accounts.lock(account_id):
            card = await self._card(card_id)
            if card["state"] not in {*closable, CardState.CLOSED}:  # replaced: its successor
                raise _state_refused(card["state"], f"card.close needs {sorted(closable)}")
            points = await self._points_left(account_id, forfeit=forfeit_points)
            if card["state"] != CardState.CLOSED:
                await self._refuse_services(account_id)
                await self._refuse_incoming(account_id)
            if card["state"] == CardState.CLOSED:
                account = await self.ledger.account(account_id)
                if not points and (account is None or available(account.balance) <= 0):
                    raise _state_refused("closed", "nothing is left to refund")
                view = card_view(card)
            else:
                view = await self._transition(
                    p, card_id, allowed=closable, state=CardState.CLOSED, action="card.close"
                )
            if await self._debit_frozen(account_id):
                await self._set_frozen(account_id, frozen=False)  # the closed state declines
            forfeited = await self._forfeit(account_id) if points else 0
            refund, transfer_ids = await self._refund_all(p, card, counter, receipt)
        now = self.clock_ms()
        record = {"card_id": card_id, "amount": refund, "transfer_ids": transfer_ids,
                  "receipt": receipt, "store": counter.store,
                  "points_forfeited": forfeited}  # fmt: skip
        async with self.records.begin() as uow:
            await uow.audit(
                p, action="card.close_refund", kind="card", object_id=card_id,
                place=place_of(card), before=None, after=record, now_ms=now,
            )  # fmt: skip
        return {
            **view,
            "refund": {"amount": refund, "transfer_ids": transfer_ids},
            "points_forfeited": forfeited,
        }

    async def _refuse_incoming(self, account_id: int) -> None:
        """409 `card_has_pending_topup` while a terminal's top-up waits for its confirmation
        on the card (its hold is open): confirmed after the close, its value would land on
        the closed card beyond the refund. The terminal confirms it (or it lapses after
        `TOPUP_CONFIRM_S`), then the card is closed."""
        account = await self.ledger.account(account_id)
        if account is not None and account.balance.credits_pending > 0:
            raise Refused(
                "conflict", "card_has_pending_topup",
                "a top-up waits for its terminal's confirmation: close the card once it is "
                "confirmed or has lapsed",
            )  # fmt: skip

    async def _refuse_services(self, account_id: int) -> None:
        """409 `card_has_services` while the card's account holds a usable service package
        (paid for: redeem or refund it first)."""
        if self.services_held is None:
            return
        held = (await self.services_held([account_id]))[account_id]
        if held:
            raise Refused(
                "conflict", "card_has_services",
                f"the card holds {held} usable service packages: redeem or refund them first",
            )  # fmt: skip

    async def _points_left(self, account_id: int, *, forfeit: bool) -> int:
        """The points the account holds (0 without a points engine); 409 `card_has_points`
        when it holds some and the close does not give them up."""
        if self.points_held is None:
            return 0
        points = (await self.points_held([account_id]))[account_id]
        if points and not forfeit:
            raise Refused(
                "conflict", "card_has_points",
                f"the card holds {points} points: redeem or transfer them first, or close "
                "with forfeit_points", "forfeit_points",
            )  # fmt: skip
        return points

    async def _forfeit(self, account_id: int) -> int:
        assert self.forfeit_points is not None
        try:
            return await self.forfeit_points(account_id)
        except (AccountsUnavailable, Busy, LedgerUnavailable) as exc:
            raise CardsUnavailable("the ledger cannot take the points now; retry") from exc

    async def _refund_all(
        self, p: Principal, card: dict[str, Any], counter: Place, receipt: str
    ) -> tuple[int, list[int]]:
        account_id = int(card["account_id"])
        cash = await self._store_account(counter, "cash")
        clearing = await self._clearing(owing=card["legal_entity"], owed=counter.entity)
        refunded, ids = 0, list[int]()
        for _ in range(limits.CARD_CLOSE_ATTEMPTS_MAX):
            account = await self.ledger.account(account_id)
            assert account is not None
            amount = available(account.balance)
            if amount <= 0:
                return refunded, ids
            legs = value_postings(source=account_id, target=cash, amount=amount, clearing=clearing)
            result = await self._submit_one(
                CreateTransfer(
                    client=COUNTER_CLIENT,
                    key=f"close/{card['id']}/{account.balance.version}",
                    asset=CURRENCY,
                    postings=tuple(Posting(a, Side(s), n) for a, s, n in legs),
                    reason="close_refund",
                    metadata=metadata(counter.store, p.user, receipt),
                )
            )
            if result.ok:
                assert result.transfer_id is not None
                if not result.replayed:
                    refunded += amount
                ids.append(result.transfer_id)
                continue
            if result.code not in ("exceeds_credits", "id_already_failed"):
                _ledger_ok(result)
        account = await self.ledger.account(account_id)
        if account is not None and available(account.balance) <= 0:
            return refunded, ids
        raise Refused(
            "conflict", "close_refund_incomplete",
            "the balance kept changing; the card is closed: close it again to refund the rest",
        )  # fmt: skip

    # --- money at the counter ----------------------------------------------------------------

    async def _counter(self, p: Principal, store: str | None, card: dict[str, Any]) -> Place:
        """The store doing counter work: the one named, else the caller's own store, else
        the card's issuing store. The caller's scope must cover it."""
        name = store or p.store or card["store"]
        place = await self.org.store_place(name, open_=True)
        require(p, Perm.CARDS_MONEY, place)
        return place

    async def topup(
        self,
        p: Principal,
        card_id: int,
        *,
        amount: int,
        tender: str,
        receipt: str,
        key: str,
        store: str | None = None,
    ) -> dict[str, Any]:
        """Stored value bought at the counter in cash or by bank card, idempotent by the
        caller's key. The class maximum is checked under the card account's lock, which the
        POS top-up path holds too, so two top-ups never pass it together. Selling stored
        value needs the counter store's `stored_value` grant for the card's class: checked
        before the ledger is touched, then spent (its amount budget) with the top-up's audit
        row once the transfer is in; if that is refused the transfer is reversed, as a
        gift sale's is."""
        card = await self._card_for(p, card_id, Perm.CARDS_MONEY)
        counter = await self._counter(p, store, card)
        klass = await self.directory.card_class(card["class_code"])
        if klass is not None and klass.gift:
            raise Refused("conflict", "gift_not_reloadable", "a gift card is sold, not topped up")
        _check_payment(amount, tender)
        account_id = int(card["account_id"])
        async with self.accounts.lock(account_id):
            known = await self.directory.keyed_transfer(COUNTER_CLIENT, _key(counter, key))
            if known is not None:
                await self._refuse_undone(known)
            else:
                fresh = await self._card(card_id)
                self._check_payable(fresh)
                account = await self.ledger.account(account_id)
                if account is not None and over_maximum(
                    account.balance, amount, int(fresh["balance_max"])
                ):
                    raise Refused(
                        "conflict", "over_balance_max",
                        f"the card's maximum balance is {fresh['balance_max']} fen", "amount",
                    )  # fmt: skip
                await self._check_grant(counter.store, Function.STORED_VALUE,
                                        card["class_code"], count=0, amount=amount)  # fmt: skip
            op = await self._counter_op(
                p, card, counter=counter, amount=amount, tender=tender, receipt=receipt,
                key=key, reason="counter_topup",
            )  # fmt: skip
            result = await self._submit_one(op)
            _ledger_ok(result)
            if known is not None and not await self._topup_recorded(card_id, known):
                # The first attempt's record was refused and its give-back failed too (the
                # ledger busy): this retry gives the value back, as that attempt meant to.
                await self._undo(op, "counter_topup_undone")
                await self._refuse_undone(known)
            if known is None and not result.replayed:  # a replay spent and audited before
                try:
                    await self._record_topup(
                        p, card, counter, result, amount=amount, tender=tender, receipt=receipt
                    )
                except Exception:
                    await self._undo(op, "counter_topup_undone")
                    raise
        return await self._money_answer(card, result, amount)

    async def _topup_recorded(self, card_id: int, known: dict[str, Any]) -> bool:
        """Whether the counter top-up `known` (a transfer) has its record: the `card.topup`
        audit row written with its grant spend (`_record_topup`), among the card's latest
        `CARD_TOPUP_RECORDS_READ_MAX` (a retry comes soon after its attempt)."""
        async with self.records.read() as uow:
            rows = await uow.find(
                "org_audit_log",
                {"object_kind": "card", "object_id": str(card_id), "action": "card.topup"},
                order="id", descending=True, limit=limits.CARD_TOPUP_RECORDS_READ_MAX,
            )  # fmt: skip
        return any(
            json.loads(row["after"] or "{}").get("transfer_id") == int(known["id"])
            for row in rows[: limits.CARD_TOPUP_RECORDS_READ_MAX]
        )

    async def pos_topup_grant(
        self, store: str, class_code: str, amount: int, *, key: str, hold_id: int
    ) -> str:
        """A POS top-up's spend of its store's stored-value grant for the card's class
        (`PosService.topup_grant`), in a transaction of its own with the record of the spend
        (`pos_grant_spends`, by the top-up's key, state open): "" when spent, else the
        refusal (`not_granted`, `grant_budget_exceeded`). The spend is given back when the
        hold ends without its value staying (`pos_topup_release`, `sweep_topup_grants`). A
        terminal the bootstrap registered on a host without an organization
        (`OrgService.check_bootstrap_place`) is in no store the organization holds and has
        no grants to spend: "" (a terminal of the admin API is always in one)."""
        try:
            async with self.records.begin() as uow:
                if await uow.get(STORES, id=store) is None:
                    return ""
                grant = await self.org.use_grant(
                    uow, store, Function.STORED_VALUE, class_code, count=0, amount=amount
                )
                await uow.insert(GRANT_SPENDS, {
                    "key": key, "grant_id": grant.id, "amount": amount, "hold_id": hold_id,
                    "state": SPEND_OPEN, "created_at_ms": self.clock_ms(),
                })  # fmt: skip
        except Refused as exc:
            return exc.code
        except Conflict:
            return ""  # spent for this key already (nothing spent twice: rolled back)
        return ""

    async def pos_topup_release(self, _t: object, key: str) -> None:
        """A reverser of the POS (`PosService.reversers`): the ledger took a reversal of the
        transfer under `key`. When that was a top-up's hold, or the confirmation that posted
        it, the value left the card: the grant spend of the top-up is given back, once."""
        async with self.records.read() as uow:
            spend = await uow.get(GRANT_SPENDS, key=key)
        if spend is None:
            confirm = await self.directory.transfer_by_key(key)
            if confirm is None or confirm["reason"] != "topup_confirm":
                return
            if confirm["pending_id"] is None:
                return
            hold = await self.directory.transfer_by_id(confirm["pending_id"])
            if hold is None:
                return
            key = hold["key"]
        await self._give_back_spend(key, (SPEND_OPEN, SPEND_KEPT))

    async def sweep_topup_grants(self) -> dict[str, int]:
        """The open POS top-up grant spends whose hold has ended: posted by its confirmation
        (kept), or voided or lapsed unconfirmed (the amount given back to the grant, once).
        Holds still open stay for a later sweep. Idempotent, safe to run twice or at once
        with a reversal (each state turns in a guarded update)."""
        totals = {"kept": 0, "returned": 0}
        after = None
        while True:
            async with self.records.read() as uow:
                rows = await uow.find(
                    GRANT_SPENDS, {"state": SPEND_OPEN}, order="key", after=after,
                    limit=limits.TOPUP_GRANT_SWEEP_PAGE_ROWS_MAX,
                )  # fmt: skip
            page = rows[: limits.TOPUP_GRANT_SWEEP_PAGE_ROWS_MAX]
            ended = await self.directory.holds_resolved([int(r["hold_id"]) for r in page])
            for row in page:
                kind = ended.get(int(row["hold_id"]))
                if kind == TransferKind.POST:
                    async with self.records.begin() as uow:
                        totals["kept"] += await uow.update(
                            GRANT_SPENDS, {"key": row["key"], "state": SPEND_OPEN},
                            {"state": SPEND_KEPT},
                        )  # fmt: skip
                elif kind is not None:
                    totals["returned"] += await self._give_back_spend(row["key"], (SPEND_OPEN,))
            if len(rows) <= limits.TOPUP_GRANT_SWEEP_PAGE_ROWS_MAX:
                return totals
            after = page[-1]["key"]

    async def sweeps_on_schedule(self, first_s: int) -> None:
        """The card sweeps inside the server, until cancelled: after `first_s` seconds, then
        `sweep_topup_grants` every `TOPUP_GRANT_SWEEP_EVERY_S` and `sweep_fee_intents` every
        `CARD_FEE_SWEEP_EVERY_S`. A sweep that fails is logged; its next turn retries."""
        jobs = (
            (self.sweep_topup_grants, limits.TOPUP_GRANT_SWEEP_EVERY_S),
            (self.sweep_fee_intents, limits.CARD_FEE_SWEEP_EVERY_S),
        )
        await asyncio.sleep(first_s)
        due = [0.0] * len(jobs)
        while True:
            now = asyncio.get_running_loop().time()
            for n, (sweep, every_s) in enumerate(jobs):
                if now < due[n]:
                    continue
                due[n] = now + every_s
                try:
                    result = await sweep()
                except Exception:  # a sweep that fails never stops the other
                    log.exception("a card sweep failed; its next turn retries",
                                  extra={"sweep": sweep.__name__})  # fmt: skip
                else:
                    if result.get("returned") or result.get("fees_settled"):
                        log.info("a card sweep gave back", extra=result)
            await asyncio.sleep(max(0.0, min(due) - asyncio.get_running_loop().time()))

    async def _give_back_spend(self, key: str, states: tuple[str, ...]) -> int:
        """The spend under `key` turned returned (from one of `states`) and its amount given
        back to its grant, in one transaction: 1, or 0 when it had turned already."""
        async with self.records.begin() as uow:
            spend = await uow.get(GRANT_SPENDS, key=key)
            if spend is None or spend["state"] not in states:
                return 0
            turned = await uow.update(
                GRANT_SPENDS, {"key": key, "state": spend["state"]}, {"state": SPEND_RETURNED}
            )
            if turned:
                await self.org.give_back_grant(uow, int(spend["grant_id"]), int(spend["amount"]))
            return turned

    async def _record_topup(
        self, p: Principal, card: dict[str, Any], counter: Place, result: Result,
        *, amount: int, tender: str, receipt: str,
    ) -> None:  # fmt: skip
        """Spend the counter store's stored-value grant and write the top-up's audit row, in
        one transaction."""
        assert result.transfer_id is not None
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await _touch(uow, CARDS, id=card["id"])
            grant = await self.org.use_grant(
                uow, counter.store, Function.STORED_VALUE, card["class_code"], count=0,
                amount=amount,
            )  # fmt: skip
            record = {"card_id": int(card["id"]), "amount": amount, "tender": tender,
                      "receipt": receipt, "store": counter.store,
                      "transfer_id": result.transfer_id, "grant_id": grant.id}  # fmt: skip
            await uow.audit(
                p, action="card.topup", kind="card", object_id=card["id"],
                place=place_of(card), before=None, after=record, now_ms=now,
            )  # fmt: skip

    async def sell(
        self,
        p: Principal,
        card_id: int,
        *,
        amount: int,
        tender: str,
        receipt: str,
        key: str,
        store: str | None = None,
    ) -> dict[str, Any]:
        """Sell an inactive gift card at one of its class's denominations: its value comes
        from the counter's till, the card becomes active, and the selling store's gift
        grant spends the amount. Idempotent by the caller's key."""
        card = await self._card_for(p, card_id, Perm.CARDS_MONEY)
        counter = await self._counter(p, store, card)
        klass = await self.directory.card_class(card["class_code"])
        if klass is None or not klass.gift:
            raise Refused("conflict", "not_a_gift_card", "only gift cards are sold")
        if amount not in klass.denominations:
            raise Refused(
                "invalid", "not_a_denomination",
                f"a {klass.code} card sells at {list(klass.denominations)} fen", "amount",
            )  # fmt: skip
        _check_payment(amount, tender)
        account_id = int(card["account_id"])
        async with self.accounts.lock(account_id):
            known = await self.directory.keyed_transfer(COUNTER_CLIENT, _key(counter, key))
            if known is not None:  # the same sale again: the ledger answers as the first time
                await self._refuse_undone(known)
                op = await self._counter_op(
                    p, card, counter=counter, amount=amount, tender=tender, receipt=receipt,
                    key=key, reason="gift_sale",
                )  # fmt: skip
                result = await self._submit_one(op)
                _ledger_ok(result)
                if (await self._card(card_id))["state"] == CardState.INACTIVE:
                    # Its activation was refused and the give-back failed too (the ledger
                    # busy): this retry gives the value back, as that attempt meant to.
                    await self._undo(op, "gift_sale_undone")
                    await self._refuse_undone(known)
                return await self._money_answer(card, result, amount)
            fresh = await self._card(card_id)
            if fresh["state"] != CardState.INACTIVE:
                raise _state_refused(fresh["state"], "only an unsold (inactive) gift card")
            # No expiry check: an unsold card's term starts again at its sale
            # (`_activate_sold`), however long it waited in stock.
            await self._check_grant(counter.store, Function.GIFT, klass.code, count=0,
                                    amount=amount)  # fmt: skip
            # A batch card pays its issue fee at its sale, once (`fee_due` turns 0 with the
            # state in `_activate_sold`), before its value is taken.
            async with self._fee_first(int(fresh["fee_due"]), counter, p, "issue", of=str(card_id)):
                op = await self._counter_op(
                    p, card, counter=counter, amount=amount, tender=tender, receipt=receipt,
                    key=key, reason="gift_sale",
                )  # fmt: skip
                result = await self._submit_one(op)
                _ledger_ok(result)
                try:
                    await self._activate_sold(
                        p, fresh, counter=counter, product=klass.code, amount=amount,
                        receipt=receipt, validity_months=klass.validity_months,
                    )  # fmt: skip
                except Exception:
                    await self._undo(op, "gift_sale_undone")
                    raise
        return await self._money_answer(card, result, amount)

    async def _activate_sold(
        self,
        p: Principal,
        card: dict[str, Any],
        *,
        counter: Place,
        product: str,
        amount: int,
        receipt: str,
        validity_months: int,
    ) -> None:
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await _touch(uow, CARDS, id=card["id"])
            await self.org.use_grant(
                uow, counter.store, Function.GIFT, product, count=0, amount=amount
            )
            changes = {
                "state": str(CardState.ACTIVE),
                "expires": expiry_at_sale(card["expires"], now, validity_months),
                "updated_at_ms": now,
                "fee_due": 0,
            }
            changed = await uow.update(
                CARDS, {"id": card["id"], "state": str(CardState.INACTIVE)}, changes
            )
            if not changed:
                raise _state_refused("changing", "another request changed it first")
            after = {**card_view({**card, **changes}), "sold_for": amount, "receipt": receipt,
                     "sold_at": counter.store}  # fmt: skip
            await uow.audit(
                p, action="card.sell", kind="card", object_id=card["id"],
                place=place_of(card), before=card_view(card), after=after, now_ms=now,
            )  # fmt: skip
        self.directory.forget_card(card["token"])

    async def _refuse_undone(self, known: dict[str, Any]) -> None:
        """Refuse the retry of a counter request that was refused after its payment went in
        (and was given back by `_undo`): the key stays spent, the value never arrived."""
        if await self.directory.undone(int(known["id"])):
            raise Refused(
                "conflict", "counter_request_undone",
                "the request under this key was refused and its payment given back; "
                "send it again under a new key", "key",
            )  # fmt: skip

    async def _undo(self, op: CreateTransfer, reason: str) -> None:
        """Give back a counter transfer whose record change was refused: a sale whose card
        could not be activated (the card stays inactive, so nothing can spend it), a top-up
        whose grant refused it (the card account's lock is still held, so nothing spent it).
        Best effort: a failure is logged by the ledger under its key."""
        await self._submit_one(
            Reverse(
                client=COUNTER_CLIENT,
                key=op.key[: limits.KEY_CHARS_MAX - 2] + "/R",
                target_key=op.key,
                reason=reason,
                metadata=op.metadata,
            )
        )

    async def _counter_op(
        self,
        p: Principal,
        card: dict[str, Any],
        *,
        counter: Place,
        amount: int,
        tender: str,
        receipt: str,
        key: str,
        reason: str,
    ) -> CreateTransfer:
        source = await self._store_account(counter, tender)
        clearing = await self._clearing(owing=counter.entity, owed=card["legal_entity"])
        legs = value_postings(
            source=source, target=int(card["account_id"]), amount=amount, clearing=clearing
        )
        return CreateTransfer(
            client=COUNTER_CLIENT,
            key=_key(counter, key),
            asset=CURRENCY,
            postings=tuple(Posting(a, Side(s), n) for a, s, n in legs),
            reason=reason,
            metadata=metadata(counter.store, p.user, receipt),
        )

    def _check_payable(self, card: dict[str, Any]) -> None:
        if card["state"] != CardState.ACTIVE:
            raise _state_refused(card["state"], "only an active card takes money")
        if expired(card["expires"], self.clock_ms()):
            raise Refused("conflict", "card_expired", "the card has expired")

    async def _money_answer(
        self, card: dict[str, Any], result: Result, amount: int
    ) -> dict[str, Any]:
        account_id = int(card["account_id"])
        balance = (result.balances or {}).get(account_id)
        if balance is None:
            account = await self.ledger.account(account_id)
            balance = account.balance if account is not None else Balance()
        assert result.transfer_id is not None
        return {
            "card_id": int(card["id"]),
            "transfer_id": result.transfer_id,
            "amount": amount,
            "available": available(balance),
            "replayed": result.replayed,
        }

    # --- PINs --------------------------------------------------------------------------------

    async def set_pin(self, p: Principal, card_id: int, pin: str) -> dict[str, Any]:
        card = await self._card_for(p, card_id, Perm.CARDS_ISSUE)
        if card["state"] in (CardState.CLOSED, CardState.REPLACED):
            raise _state_refused(card["state"], "a dead card has no PIN")
        if not pin_is_valid(pin):
            raise Refused(
                "invalid", "invalid_value",
                f"a PIN is {limits.PIN_DIGITS_MIN} to {limits.PIN_DIGITS_MAX} digits", "pin",
            )  # fmt: skip
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await self.pins.set(uow, card_id, card["token"], pin)
            after = card_view({**card, "pvv": "set", "pin_failures": 0})
            await uow.audit(
                p, action="card.pin_set", kind="card", object_id=card_id, place=place_of(card),
                before=card_view(card), after=after, now_ms=now,
            )  # fmt: skip
        self.directory.forget_card(card["token"])
        return after

    async def verify_pin(self, p: Principal, card_id: int, pin: str) -> dict[str, Any]:
        """A PIN typed at the counter, checked and counted as at the POS. Every wrong or
        locked answer is audited (`card.pin_verify_failed`, who and the count): the officer
        whose guesses those are cannot then unlock the card (`unlock_pin`)."""
        card = await self._card_for(p, card_id, Perm.CARDS_STATE)
        verdict, failures = await self.pins.check(card_id, pin)
        if verdict in (PinCheck.WRONG, PinCheck.LOCKED):
            async with self.records.begin() as uow:
                await uow.audit(
                    p, action=PIN_VERIFY_FAILED, kind="card", object_id=card_id,
                    place=place_of(card), before=None,
                    after={"result": str(verdict), "failures": failures},
                    now_ms=self.clock_ms(),
                )  # fmt: skip
        return {"result": str(verdict), "failures": failures}

    async def _latest(self, card_id: int, action: str, **where: Any) -> dict[str, Any] | None:
        """The card's newest audit row of `action` (and `where`), or None."""
        async with self.records.read() as uow:
            rows = await uow.find(
                AUDIT, {"object_kind": "card", "object_id": str(card_id), "action": action,
                        **where},
                descending=True, limit=1,
            )  # fmt: skip
        return rows[0] if rows else None

    async def _guessed_since_unlock(self, card_id: int, user_id: int) -> bool:
        """Whether `user_id` typed a wrong PIN for the card since its last unlock."""
        guessed = await self._latest(card_id, PIN_VERIFY_FAILED, user_id=user_id)
        if guessed is None:
            return False
        unlocked = await self._latest(card_id, PIN_UNLOCKED)
        return unlocked is None or int(unlocked["id"]) < int(guessed["id"])

    async def _lost_in_stock(self, card: dict[str, Any]) -> bool:
        """Whether a lost card was reported lost before it was ever handed out (inactive)."""
        if card["state"] != CardState.LOST:
            return False
        lost = await self._latest(int(card["id"]), "card.lost")
        before = {} if lost is None else json.loads(lost["before"] or "{}")
        return bool(before.get("state") == CardState.INACTIVE)

    async def unlock_pin(self, p: Principal, card_id: int) -> dict[str, Any]:
        """The count of wrong PINs back to 0, by an officer; never by one who typed wrong
        PINs at the counter for the card since its last unlock (403 `pin_self_unlock`: they
        could guess on for ever)."""
        card = await self._card_for(p, card_id, Perm.CARDS_STATE)
        if not card["pvv"]:
            raise Refused("conflict", "pin_not_set", "the card has no PIN")
        if await self._guessed_since_unlock(card_id, p.user_id):
            raise Refused(
                "forbidden", "pin_self_unlock",
                "the card is unlocked by another officer than one who typed wrong PINs",
                "card_id",
            )  # fmt: skip
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await self.pins.unlock(uow, card_id)
            after = card_view({**card, "pin_failures": 0})
            await uow.audit(
                p, action=PIN_UNLOCKED, kind="card", object_id=card_id,
                place=place_of(card), before=card_view(card), after=after, now_ms=now,
            )  # fmt: skip
        self.directory.forget_card(card["token"])
        return after

    # --- reports -----------------------------------------------------------------------------

    async def breakage(self, p: Principal, as_of: str) -> dict[str, Any]:
        """Per issuing legal entity: the gift and the stored-value cards whose last valid
        month is before `as_of` (YYYY-MM), still holding their holder's value (active, frozen
        or lost; never sold, closed and replaced cards hold none), their count and the value
        left on them. A store officer sees its store's cards, an entity officer its entity's."""
        require(p, Perm.REPORTS_READ)
        before = month_yymm(as_of)
        totals: dict[str, dict[str, dict[str, int]]] = {}
        after_id = 0
        states = [str(s) for s in LIVE_STATES]
        while True:
            rows = await self.directory.expired_cards(
                before, states, after_id=after_id, limit=limits.REPORT_READ_ROWS_MAX
            )
            if not rows:
                break
            after_id = int(rows[-1]["id"])
            rows = [r for r in rows if p.covers(Place(r["legal_entity"], r["store"]))]
            balances = await self.directory.balances([int(r["account_id"]) for r in rows])
            gift_codes = await self._gift_codes({r["class_code"] for r in rows})
            for r in rows:
                kind = "gift" if r["class_code"] in gift_codes else "stored_value"
                entity = totals.setdefault(
                    r["legal_entity"],
                    {"gift": {"cards": 0, "value": 0}, "stored_value": {"cards": 0, "value": 0}},
                )
                b = balances.get(int(r["account_id"]))
                entity[kind]["cards"] += 1
                entity[kind]["value"] += max(0, available(b)) if b is not None else 0
        return {
            "as_of": as_of,
            "entities": [{"legal_entity": e, **totals[e]} for e in sorted(totals)],
        }

    # --- ledger steps ------------------------------------------------------------------------

    async def _ensure_currency(self) -> None:
        if not self._currency_ready:
            try:
                await admin.ensure_currency(self.ledger)
            except (Busy, LedgerUnavailable) as exc:
                raise CardsUnavailable("the ledger cannot take the change now; retry") from exc
            self._currency_ready = True

    async def _submit(self, ops: list[Op]) -> list[Result]:
        try:
            return await self.ledger.submit(ops)
        except (Busy, LedgerUnavailable) as exc:
            raise CardsUnavailable("the ledger cannot take the change now; retry") from exc

    async def _submit_one(self, op: Op) -> Result:
        [result] = await self._submit([op])
        return result

    async def _store_account(self, place: Place, purpose: str) -> int:
        await self._ensure_currency()
        try:
            return await self.accounts.store(place.entity, place.store, purpose)
        except (AccountsUnavailable, Busy, LedgerUnavailable) as exc:
            raise CardsUnavailable("the ledger cannot make the store's account now") from exc

    async def _clearing(self, *, owing: str, owed: str) -> tuple[int, int] | None:
        try:
            return await self.accounts.clearing(owing=owing, owed=owed)
        except (AccountsUnavailable, Busy, LedgerUnavailable) as exc:
            raise CardsUnavailable("the ledger cannot make the clearing accounts now") from exc

    async def _debit_frozen(self, account_id: int) -> bool:
        account = await self.ledger.account(account_id)
        return bool(account is not None and account.info.flags.debit_frozen)

    async def _set_frozen(self, account_id: int, *, frozen: bool) -> None:
        result = await self._submit_one(SetAccountFrozen(account_id, debit_frozen=frozen))
        if not result.ok:
            raise CardsUnavailable(f"the ledger refused to change the account: {result.code}")


# --- helpers -----------------------------------------------------------------------------------


async def _fee_recorded(uow: Unit, intent: str) -> None:
    """In the transaction that writes a new card: its fee's record (`_fee_first`) deleted.
    One the sweep took meanwhile (the request outlasted `CARD_FEE_INTENT_STALE_S`: its fee
    is being given back) refuses the write."""
    if intent and not await uow.delete(FEE_INTENTS, {"key": intent, "state": INTENT_OPEN}):
        raise Refused(
            "conflict", "fee_given_back",
            "the card's fee was given back (the request took too long): issue the card again",
        )  # fmt: skip


async def _touch(uow: Unit, table: str, **where: Any) -> None:
    """Write first in a transaction that reads before it writes: on SQLite the first statement
    then takes the write lock (waiting its turn) instead of a read that later cannot upgrade;
    on PostgreSQL an existing row is locked until the transaction ends."""
    await uow.update(table, where, {"updated_at_ms": ("+", 0)})


def _key(counter: Place, key: str) -> str:
    """The ledger key of a counter request: the caller's key within its store."""
    return f"counter/{counter.store}/{key}"


def _check_payment(amount: int, tender: str) -> None:
    if tender not in TENDERS:
        raise Refused("invalid", "invalid_value", f"tender is one of {TENDERS}", "tender")
    if not 0 < amount <= limits.POS_AMOUNT_MAX:
        raise Refused("invalid", "invalid_value", "amount is > 0 fen", "amount")


def _roll_back() -> None:
    raise _DryRun


def _first_state(klass: dict[str, Any]) -> CardState:
    """A card issued at the counter is active, a gift card inactive until it is sold."""
    return CardState.INACTIVE if klass["gift"] else CardState.ACTIVE


async def _check_program(uow: Unit, program: str) -> None:
    """A class names an existing points program, or none ("")."""
    if program and await uow.get("points_programs", code=program) is None:
        raise Refused("not_found", "program_not_found", "no such points program", "points_program")


def _require_group(p: Principal, perm: Perm) -> None:
    require(p, perm)
    if p.scope.kind is not ScopeKind.GROUP:
        raise Refused("forbidden", "scope_forbidden", "card classes are changed by the group")


def _scope_place(p: Principal) -> Place:
    if p.scope.kind is ScopeKind.STORE:
        return Place(p.scope_entity, p.scope.id)
    if p.scope.kind is ScopeKind.ENTITY:
        return Place(p.scope.id)
    return Place()


def _ledger_ok(result: Result) -> None:
    """Refuse (409) with a stable code when the ledger refused a counter transfer."""
    if result.ok:
        return
    code = result.original_code if result.code == "id_already_failed" else result.code
    if result.code.startswith("exists_with_different_"):
        raise Refused(
            "conflict", "idempotency_key_reused", "the key was used for another request", "key"
        )
    if code in ("debit_account_frozen", "credit_account_frozen"):
        raise Refused("conflict", "card_frozen", "the card's account is frozen")
    if code == "exceeds_credits":
        raise Refused("conflict", "insufficient_funds", "the account cannot pay this")
    raise Refused("conflict", "ledger_refused", f"the ledger refused: {code}")


def _entry_view(e: dict[str, Any]) -> dict[str, Any]:
    raw = json.loads(e["metadata"]) if isinstance(e["metadata"], str) else e["metadata"]
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return {
        "id": int(e["id"]),
        "transfer_id": int(e["transfer_id"]),
        "kind": e["transfer_kind"],
        "reason": e["reason"],
        "side": e["side"],
        "posted": int(e["posted_delta"]),
        "pending": int(e["pending_delta"]),
        "available_after": int(e["credits_posted"])
        - int(e["debits_posted"])
        - int(e["debits_pending"]),
        "metadata": {str(k): str(v) for k, v in pairs},
        "at_ms": int(e["created_at_ms"]),
    }
