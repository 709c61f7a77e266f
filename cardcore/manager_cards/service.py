"""Manager special-discount cards: issued to a staff user in a store, with a PIN; at the POS
the manager's card and PIN authorize a discount within the card's per-transaction percentage
and daily total, for one of its reasons.

Rules:
- Issuing, the PIN and the card's state and policy are `manager_cards_write` in the card's
  store (an HQ admin anywhere in scope, a store supervisor in its own store); reads are
  `loyalty_read` in scope; the authorizations (the audit of every use) are `audit_read`.
- A card number has the group's prefix and a Luhn digit, drawn from `secrets` and unique
  among customer and manager cards; it is kept as a keyed token and ciphertext, answered in
  full once (to the issuer, who hands the card over), masked everywhere else, never logged.
- The PIN is kept as a verification value (`Vault.pvv`); wrong PINs count by a guarded
  update and lock the card at PIN_FAILURES_MAX, until a new PIN is set.
- The card's staff user is read with the card at every use (one joined select): a user
  since disabled, or no longer of a role and scope that may hold the card, makes the card
  refuse (`manager_staff_disabled`, `manager_staff_not_eligible`) before its PIN is read.
- At the POS every use, approved or refused, is a `manager_authorizations` row under the POS
  key, written in one transaction that first takes the card's row lock: uses of one card
  run one after another (across processes too), so the daily total (the approved,
  unreversed rows of the card's local day) is never exceeded. A resend answers the stored
  outcome; a reversal frees the discount from the daily total, once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from cardcore import limits
from cardcore.cards import admin
from cardcore.cards.directory import Directory
from cardcore.cards.model import Card, Outcome, PosRequest, PosResult, Terminal, luhn_ok, mask_pan
from cardcore.cards.pins import pin_is_valid
from cardcore.localtime import DEFAULT_TIMEZONE, day_number
from cardcore.manager_cards import model, schema
from cardcore.manager_cards.model import Holder, ManagerCard, ManagerState
from cardcore.org.model import Function, Perm, Place, Principal, Refused, require, scoped_filter
from cardcore.org.service import OrgService
from cardcore.records import Conflict, Records, Unit
from cardcore.service_cards.service import reversed_before_arrival
from cardcore.vault import Vault

log = logging.getLogger(__name__)

CARDS, USES, USERS = "manager_cards", "manager_authorizations", "org_staff_users"
APPROVED = "approved"
# Outcomes of a use that the model does not decide (stored as the row's outcome).
PIN_WRONG, PIN_LOCKED, PIN_REQUIRED = "pin_wrong", "pin_locked", "pin_required"
PIN_NOT_SET = "manager_pin_not_set"
WRONG_STORE = "manager_wrong_store"  # the card authorizes in the store it was issued for
REVERSED_FIRST = "reversed_before_arrival"  # a use's row written by its reversal
BAD_PIN_BLOCK = "manager_bad_pin_block"
PIN_UNREADABLE = "manager_pin_unreadable"  # this host has no PIN key (no KEK): not the terminal
_OUTCOME_OF = {
    APPROVED: Outcome.APPROVED,
    PIN_WRONG: Outcome.PIN_WRONG,
    PIN_LOCKED: Outcome.PIN_LOCKED,
    PIN_REQUIRED: Outcome.PIN_REQUIRED,
    BAD_PIN_BLOCK: Outcome.BAD_REQUEST,
    PIN_UNREADABLE: Outcome.UNAVAILABLE,
    model.BAD_AMOUNT: Outcome.BAD_REQUEST,
    model.OVER_PERCENT: Outcome.OVER_LIMIT,
    model.OVER_DAILY: Outcome.OVER_LIMIT,
}
PinReader = Callable[[str, str], str]  # (PAN, zone PIN block hex) -> PIN; ValueError


def policy_of(row: dict[str, Any]) -> ManagerCard:
    d = json.loads(row["definition"])
    return ManagerCard(
        staff_user_id=int(row["staff_user_id"]),
        max_percent_bp=int(d["max_percent_bp"]),
        daily_total_fen=int(d["daily_total_fen"]),
        reasons=frozenset(d["reasons"]),
        state=ManagerState(row["state"]),
    )


def definition_of(c: ManagerCard) -> str:
    return json.dumps(
        {
            "max_percent_bp": c.max_percent_bp,
            "daily_total_fen": c.daily_total_fen,
            "reasons": sorted(c.reasons),
        },
        sort_keys=True,
    )


def card_view(row: dict[str, Any]) -> dict[str, Any]:
    """What answers and audit images show: never the number, the token or the PIN value."""
    c = policy_of(row)
    return {
        "id": int(row["id"]),
        "pan_masked": row["pan_masked"],
        "staff_user_id": c.staff_user_id,
        "store": row["store"],
        "legal_entity": row["legal_entity"],
        "max_percent_bp": c.max_percent_bp,
        "daily_total_fen": c.daily_total_fen,
        "reasons": sorted(c.reasons),
        "state": str(c.state),
        "has_pin": bool(row["pvv"]),
        "pin_failures": int(row["pin_failures"]),
        "created_at_ms": int(row["created_at_ms"]),
        "updated_at_ms": int(row["updated_at_ms"]),
    }


def use_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": row["key"],
        "card_id": int(row["card"]),
        "staff_user_id": int(row["staff_user_id"]),
        "store": row["store"],
        "terminal": row["terminal"],
        "day": int(row["day"]),
        "bill_fen": int(row["bill_fen"]),
        "discount_fen": int(row["discount_fen"]),
        "reason": row["reason"],
        "outcome": row["outcome"],
        "reversed": bool(row["reversed"]),
        "created_at_ms": int(row["created_at_ms"]),
    }


def place_of(row: dict[str, Any]) -> Place:
    return Place(row["legal_entity"], row["store"])


def holder_of(row: dict[str, Any]) -> Holder | None:
    """The staff user of a `schema.card_and_holder_select` row (None: no such user)."""
    state, role, kind, scope_id = (row[label] for label, _ in schema.HOLDER)
    if state is None:
        return None
    return Holder(state=state, role=role, scope_kind=kind, scope_id=scope_id)


def usable(row: dict[str, Any]) -> str:
    """ "" when a card and its staff user (a `schema.card_and_holder_select` row) may
    authorize now, else the use's outcome: the card disabled, then its user disabled, gone,
    or no longer of a role and scope that may hold it."""
    if row["state"] != ManagerState.ACTIVE:
        return model.NOT_ACTIVE
    return model.holder_refusal(holder_of(row), place_of(row))


class ManagerCards:
    def __init__(  # noqa: PLR0917 - the services it composes, one each, in a fixed order
        self,
        records: Records,
        org: OrgService,
        vault: Vault,
        directory: Directory,
        pin_of: PinReader | None = None,
        clock_ms: Callable[[], int] | None = None,
        tz: str = DEFAULT_TIMEZONE,
    ) -> None:
        self.records = records
        self.org = org
        self.vault = vault
        self.directory = directory
        self.pin_of = pin_of
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.tz = tz

    # --- issuing and administration ---------------------------------------------------------

    async def issue(self, p: Principal, values: dict[str, Any]) -> dict[str, Any]:
        """A new manager card bound to a staff user of the store (or above it); its number
        is answered in full this once."""
        require(p, Perm.MANAGER_CARDS_WRITE)
        place = await self.org.store_place(values["store"], open_=True)
        require(p, Perm.MANAGER_CARDS_WRITE, place)
        policy = ManagerCard(
            staff_user_id=values["staff_user_id"],
            max_percent_bp=values["max_percent_bp"],
            daily_total_fen=values["daily_total_fen"],
            reasons=frozenset(values["reasons"]),
            state=ManagerState.ACTIVE,
        )
        model.check_card(policy)
        if p.user_id == policy.staff_user_id:  # separation of duties: limits set by another
            raise Refused(
                "forbidden", "manager_self_issue",
                "a manager card is issued to a staff user by another", "staff_user_id",
            )  # fmt: skip
        await self._check_user(policy.staff_user_id, place)
        pan = await self._draw()
        token = self.vault.card_token(pan)
        now = self.clock_ms()
        row = {
            "token": token,
            "pan_masked": mask_pan(pan),
            "pan_sealed": self.vault.seal_text(f"manager-pan:{token}", pan),
            "staff_user_id": policy.staff_user_id,
            "store": place.store,
            "legal_entity": place.entity,
            "definition": definition_of(policy),
            "pvv": "",
            "pin_failures": 0,
            "state": str(ManagerState.ACTIVE),
            "created_at_ms": now,
            "updated_at_ms": now,
        }
        async with self.records.begin() as uow:
            await _one_active_card(uow, policy.staff_user_id)
            # HQ grants a store the manager function (docs/admin-api.md "Grants"): one card
            # of its count budget, spent with the card's row.
            await self.org.use_grant(uow, place.store, Function.MANAGER, "", count=1, amount=0)
            try:
                card_id = await uow.insert(CARDS, row)
            except Conflict:
                raise Refused("conflict", "card_number_clash", "try again") from None
            assert card_id is not None
            view = card_view({**row, "id": card_id})
            await uow.audit(
                p, action="manager_card.issue", kind="manager_card", object_id=card_id,
                place=place, before=None, after=view, now_ms=now,
            )  # fmt: skip
        return {**view, "pan": pan}

    async def _check_user(self, user_id: int, place: Place) -> None:
        """The card's holder: an active staff user of this store, or of HQ with a scope
        that covers it; never an auditor (who changes nothing)."""
        async with self.records.read() as uow:
            user = await uow.get(USERS, id=user_id)
        if user is None:
            raise Refused("not_found", "user_not_found", "no such staff user", "staff_user_id")
        holder = Holder(state=user["state"], role=user["role"], scope_kind=user["scope_kind"],
                        scope_id=user["scope_id"])  # fmt: skip
        refusal = model.holder_refusal(holder, place)
        if refusal == model.STAFF_DISABLED:
            raise Refused("conflict", "user_disabled", "the staff user is disabled",
                          "staff_user_id")  # fmt: skip
        if refusal:
            raise Refused(
                "conflict", "manager_user_not_eligible",
                "a manager card is for a staff user of this store or of HQ above it",
                "staff_user_id",
            )  # fmt: skip

    async def _draw(self) -> str:
        """A new number, neither a customer card's nor a manager card's."""
        for _ in range(limits.CARD_ISSUE_ATTEMPTS_MAX):
            pan = admin.new_pan()
            token = self.vault.card_token(pan)
            if await self.directory.existing_tokens([token]):
                continue
            async with self.records.read() as uow:
                if await uow.get(CARDS, token=token) is None:
                    return pan
        raise Refused("conflict", "card_number_clash", "no free card number; try again")

    async def _card_for(self, p: Principal, card_id: int, perm: Perm) -> dict[str, Any]:
        require(p, perm)
        async with self.records.read() as uow:
            row = await uow.get(CARDS, id=card_id)
        if row is None:
            raise Refused("not_found", "manager_card_not_found", "no such manager card",
                          "card_id")  # fmt: skip
        require(p, perm, place_of(row))
        return row

    async def get(self, p: Principal, card_id: int) -> dict[str, Any]:
        return card_view(await self._card_for(p, card_id, Perm.LOYALTY_READ))

    async def list_cards(
        self, p: Principal, filters: dict[str, Any], after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        require(p, Perm.LOYALTY_READ)
        scoped = scoped_filter(p, filters)
        if scoped is None:
            return []
        where: dict[str, Any] = scoped
        async with self.records.read() as uow:
            rows = await uow.find(CARDS, where, after=after, limit=limit)
        return [card_view(r) for r in rows]

    async def change(self, p: Principal, card_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        """Disable or enable the card, or change its percent, daily total or reasons; never
        by its own holder (separation of duties, as at its issue: 403 `manager_self_change`)."""
        await self._card_for(p, card_id, Perm.MANAGER_CARDS_WRITE)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await _touch(uow, card_id)
            row = await uow.get(CARDS, id=card_id)
            assert row is not None
            if p.user_id == int(row["staff_user_id"]):
                raise Refused(
                    "forbidden", "manager_self_change",
                    "a manager card's limits and state are changed by another", "card_id",
                )  # fmt: skip
            before = card_view(row)
            merged = {**before, **changes}
            policy = ManagerCard(
                staff_user_id=before["staff_user_id"],
                max_percent_bp=merged["max_percent_bp"],
                daily_total_fen=merged["daily_total_fen"],
                reasons=frozenset(merged["reasons"]),
                state=ManagerState(merged["state"]),
            )
            model.check_card(policy)
            if policy.state is ManagerState.ACTIVE and row["state"] != ManagerState.ACTIVE:
                await _one_active_card(uow, policy.staff_user_id)
            stored = {"definition": definition_of(policy), "state": str(policy.state),
                      "updated_at_ms": now}  # fmt: skip
            await uow.update(CARDS, {"id": card_id}, stored)
            after = card_view({**row, **stored})
            await uow.audit(
                p, action="manager_card.change", kind="manager_card", object_id=card_id,
                place=place_of(row), before=before, after=after, now_ms=now,
            )  # fmt: skip
        return after

    async def set_pin(self, p: Principal, card_id: int, pin: str) -> dict[str, Any]:
        """Set or change the PIN; the count of wrong PINs starts again (a locked card
        unlocks). Its holder may set its own PIN, but not unlock it: once locked, another
        officer sets it (403 `manager_self_unlock`; the lock is checked by the update)."""
        row = await self._card_for(p, card_id, Perm.MANAGER_CARDS_WRITE)
        if not pin_is_valid(pin):
            raise Refused(
                "invalid", "invalid_value",
                f"a PIN is {limits.PIN_DIGITS_MIN} to {limits.PIN_DIGITS_MAX} digits", "pin",
            )  # fmt: skip
        own = p.user_id == int(row["staff_user_id"])
        unlocked = {"pin_failures": limits.PIN_FAILURES_MAX - 1} if own else None
        now = self.clock_ms()
        changes = {"pvv": self.vault.pvv(row["token"], pin), "pin_failures": 0,
                   "updated_at_ms": now}  # fmt: skip
        async with self.records.begin() as uow:
            if not await uow.update(CARDS, {"id": card_id}, changes, at_most=unlocked):
                raise Refused(
                    "forbidden", "manager_self_unlock",
                    "a locked manager card is unlocked by another officer", "card_id",
                )  # fmt: skip
            after = card_view({**row, **changes})
            await uow.audit(
                p, action="manager_card.pin_set", kind="manager_card", object_id=card_id,
                place=place_of(row), before=card_view(row), after=after, now_ms=now,
            )  # fmt: skip
        return after

    async def authorizations(
        self, p: Principal, card_id: int, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Every use of the card, approved or refused (the audit of its authority)."""
        await self._card_for(p, card_id, Perm.AUDIT_READ)
        async with self.records.read() as uow:
            rows = await uow.find(USES, {"card": card_id}, order="key", after=after, limit=limit)
        return [use_view(r) for r in rows]

    # --- the POS ---------------------------------------------------------------------------------

    async def authorize(
        self, r: PosRequest, t: Terminal, key: str, _card: Card | None
    ) -> PosResult:
        """A manager's card (F2) and PIN authorize `r.discount` off `r.amount` for `r.reason`,
        or not; either way the use is recorded under the POS key, once."""
        async with self.records.read() as uow:
            stored = await uow.get(USES, key=key)
            late = stored is None and await reversed_before_arrival(uow, key)
        if stored is not None:
            return _replayed(stored)
        if late:  # the terminal reversed it before it arrived: nothing is authorized
            return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL)
        row = None
        if r.card and luhn_ok(r.card):
            async with self.records.read() as uow:
                row = await uow.get(CARDS, token=self.vault.card_token(r.card))
        now = self.clock_ms()
        day = day_number(self.tz, now)
        use = {
            "key": key, "card": 0, "staff_user_id": 0, "store": t.store, "terminal": t.tid,
            "day": day, "bill_fen": r.amount, "discount_fen": r.discount,
            "reason": r.reason[: limits.MANAGER_REASON_CHARS_MAX],
            "outcome": model.NOT_MANAGER, "reversed": False, "created_at_ms": now,
        }  # fmt: skip
        try:
            if row is None:  # a cashier's or a member's card, or no card at all
                async with self.records.begin() as uow:
                    await uow.insert(USES, use)
                return _answer(model.NOT_MANAGER, 0)
            outcome = await self._decide(r, row, use)
        except Conflict:  # the same request at the same moment: the first one's answer
            async with self.records.read() as uow:
                stored = await uow.get(USES, key=key)
            return PosResult(Outcome.UNAVAILABLE) if stored is None else _replayed(stored)
        return _answer(outcome, r.discount)

    async def _decide(self, r: PosRequest, row: dict[str, Any], use: dict[str, Any]) -> str:
        """The outcome of one use of a manager card, written with it. The first write takes
        the card's row lock (PostgreSQL) or the write lock (SQLite): the PIN count, the
        daily total and this use are decided by one card's uses one at a time. The card is
        read again under the lock with its staff user, in one statement: a user disabled
        meanwhile authorizes nothing."""
        card_id = int(row["id"])
        use = {**use, "card": card_id, "staff_user_id": int(row["staff_user_id"])}
        async with self.records.begin() as uow:
            await _touch(uow, card_id)
            fresh = await uow.select_one(
                "manager_card_and_holder", schema.card_and_holder_select, {"id": card_id}
            )
            assert fresh is not None
            outcome = WRONG_STORE if fresh["store"] != use["store"] else ""
            outcome = outcome or usable(fresh)
            outcome = outcome or await self._pin(uow, r, fresh)
            if not outcome:
                today = await uow.total(  # the manager's, whichever of its cards took it
                    USES, "discount_fen", staff_user_id=use["staff_user_id"], day=use["day"],
                    outcome=APPROVED, reversed=False,
                )  # fmt: skip
                decision = model.authorize(
                    policy_of(fresh), bill_fen=r.amount, discount_fen=r.discount,
                    reason=r.reason, authorized_today_fen=today,
                    presenting_role=model.MANAGER_ROLE,
                )  # fmt: skip
                outcome = APPROVED if decision.ok else decision.refusal
            await uow.insert(USES, {**use, "outcome": outcome})
        return outcome

    async def _pin(self, uow: Unit, r: PosRequest, card: dict[str, Any]) -> str:
        """ "" when the PIN is right, else the use's outcome. The caller refuses a disabled
        card or staff user before this (its PIN is not looked at, nothing is counted)."""
        if not card["pvv"]:
            return PIN_NOT_SET
        failures = int(card["pin_failures"])
        if failures >= limits.PIN_FAILURES_MAX:
            return PIN_LOCKED
        if not r.pin_block:
            return PIN_REQUIRED
        if self.pin_of is None:  # the host's fault, not the terminal's: 96
            log.error("a manager card has a PIN and this host cannot read PIN blocks")
            return PIN_UNREADABLE
        try:
            pin = self.pin_of(r.card, r.pin_block)
        except ValueError:
            return BAD_PIN_BLOCK
        if pin_is_valid(pin) and self.vault.pin_matches(card["token"], pin, card["pvv"]):
            if failures:
                await uow.update(CARDS, {"id": card["id"]}, {"pin_failures": 0})
            return ""
        counted = await uow.update(
            CARDS, {"id": card["id"]}, {"pin_failures": ("+", 1)},
            at_most={"pin_failures": limits.PIN_FAILURES_MAX},
        )  # fmt: skip
        return PIN_LOCKED if not counted or failures + 1 >= limits.PIN_FAILURES_MAX else PIN_WRONG

    async def reverse(self, t: Terminal, key: str) -> None:
        """A reversed use no longer counts towards the daily total (once). When no use was
        recorded under `key` (yet), a reversed row stands there instead: the use arriving
        later conflicts on the key and authorizes nothing."""
        now = self.clock_ms()
        try:
            async with self.records.begin() as uow:
                if await uow.get(USES, key=key) is None:
                    await uow.insert(USES, {
                        "key": key, "card": 0, "staff_user_id": 0, "store": t.store,
                        "terminal": t.tid, "day": day_number(self.tz, now), "bill_fen": 0,
                        "discount_fen": 0, "reason": "", "outcome": REVERSED_FIRST,
                        "reversed": True, "created_at_ms": now,
                    })  # fmt: skip
                    return
                await uow.update(USES, {"key": key, "reversed": False}, {"reversed": True})
        except Conflict:  # the use itself landed at this moment: mark it reversed now
            await self.reverse(t, key)


# --- helpers -------------------------------------------------------------------------------------


async def _touch(uow: Unit, card_id: int) -> None:
    """Write first: the row lock on PostgreSQL, the write lock on SQLite."""
    await uow.update(CARDS, {"id": card_id}, {"pin_failures": ("+", 0)})


def _answer(outcome: str, discount: int) -> PosResult:
    if outcome == APPROVED:
        return PosResult(Outcome.APPROVED, discount=discount)
    return PosResult(_OUTCOME_OF.get(outcome, Outcome.NOT_PERMITTED), refusal=outcome)


def _replayed(stored: dict[str, Any]) -> PosResult:
    """The stored answer of a use resent; an approval reversed since is not approved again."""
    if stored["outcome"] in (APPROVED, REVERSED_FIRST) and stored["reversed"]:
        return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL, replayed=True)
    answer = _answer(stored["outcome"], int(stored["discount_fen"]))
    return PosResult(answer.outcome, discount=answer.discount, refusal=answer.refusal,
                     replayed=True)  # fmt: skip


async def _one_active_card(uow: Unit, staff_user_id: int) -> None:
    """409 `manager_user_has_card` when the staff user already holds an active manager
    card: the daily total is the manager's, never one per card. The staff user's row is
    locked first (a write of nothing), so two issues for one user at the same moment are
    decided one after the other: on PostgreSQL both read "none" and both cards became
    active (SQLite's BEGIN IMMEDIATE orders them already)."""
    await uow.update(USERS, {"id": staff_user_id}, {"created_at_ms": ("+", 0)})
    held = await uow.find(CARDS, {"staff_user_id": staff_user_id, "state": "active"}, limit=1)
    if held:
        raise Refused(
            "conflict", "manager_user_has_card",
            f"the staff user holds active manager card {held[0]['id']}: disable it first",
            "staff_user_id",
        )  # fmt: skip
