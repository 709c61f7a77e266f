"""The member use cases: register, read, list, look up by ID document, change, SMS consent,
merge a duplicate, delete.

A member lives at its home store: its place is the store's legal entity and the store, and
every use case checks the caller's permission and scope against that place first (a store
officer sees and changes only its own store's members). Every change and its audit row are
one transaction: a refused request changes nothing, an accepted one is always audited.

Secrets: the ID number is kept only as a keyed hash (lookup) and AES-GCM ciphertext bound to
the member; answers and audit images carry its mask, never the number, and a member's cards
appear with their masked numbers only.

Concurrency: a change writes to the member's row before it reads it ("touch first"): on
PostgreSQL that takes the row lock, so two changes of one member run one after the other;
on SQLite the first statement of the transaction takes the write lock, so a transaction never
has to upgrade a stale read. Two registrations of one mobile number meet at the unique index
on `members.mobile`: one wins, the other gets 409 `member_exists`.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cardcore import limits
from cardcore.cards.accounts import Accounts
from cardcore.cards.directory import Directory
from cardcore.cards.model import CardState
from cardcore.cards.service import card_view as card_image
from cardcore.ledger.service import Ledger
from cardcore.members.model import (
    ID_MAX,
    IdType,
    MemberState,
    Purpose,
    check_birthday,
    check_gender,
    check_name,
    mask_id,
    masked_personal,
    normalize_id,
    normalize_mobile,
)
from cardcore.org.model import Perm, Place, Principal, Refused, ScopeKind, require
from cardcore.org.service import OrgService, day_of
from cardcore.records import Conflict, Records, Unit
from cardcore.vault import Vault

MEMBERS, CONSENTS, CARDS = "members", "member_consents", "cards"
DEAD_CARD_STATES = (CardState.CLOSED.value, CardState.REPLACED.value)  # not closed by a delete
PUBLIC = (
    "id", "mobile", "name", "gender", "birthday", "id_type", "id_masked", "email",
    "sms_alerts", "sms_marketing", "tier", "home_store", "legal_entity", "state",
    "merged_into", "created_at_ms", "updated_at_ms",
)  # fmt: skip
ERASED = {
    "mobile": None,
    "name": "",
    "gender": "",
    "birthday": "",
    "email": "",
    "id_type": "",
    "id_hash": None,
    "id_sealed": "",
    "id_masked": "",
    "sms_alerts": False,
    "sms_marketing": False,
}
FLAG = {Purpose.ALERTS: "sms_alerts", Purpose.MARKETING: "sms_marketing"}
# The points each holder (a card's value account id) still has to use, usable or pending, in
# any program: the points engine's read (`PointsService.points_held`), wired by the app.
PointsHeld = Callable[[Sequence[int]], Awaitable[dict[int, int]]]
# A merge's coupon side (`CouponService.merge_member`, wired by the app): in the merge's unit
# of work, the duplicate's (second id) coupon codes, redemptions and campaign enrolments
# become the survivor's (first id); answers how many rows of each moved or were dropped.
CouponsMerge = Callable[[Unit, int, int], Awaitable[dict[str, int]]]


def member_view(row: dict[str, Any]) -> dict[str, Any]:
    """What answers and audit images show of a member: never the ID hash or ciphertext."""
    view = {name: row[name] for name in PUBLIC}
    view["id"] = int(row["id"])
    view["sms_alerts"] = bool(row["sms_alerts"])
    view["sms_marketing"] = bool(row["sms_marketing"])
    view["merged_into"] = None if row["merged_into"] is None else int(row["merged_into"])
    view["created_at_ms"] = int(row["created_at_ms"])
    view["updated_at_ms"] = int(row["updated_at_ms"])
    return view


def audit_image(row: dict[str, Any]) -> dict[str, Any]:
    """A member as the audit log keeps it: the public view, its personal data masked."""
    return masked_personal(member_view(row))


def card_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "pan_masked": row["pan_masked"],
        "class_code": row["class_code"],
        "state": row["state"],
    }


def consent_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "member_id": int(row["member_id"]),
        "purpose": row["purpose"],
        "granted": bool(row["granted"]),
        "source": row["source"],
        "at_ms": int(row["at_ms"]),
        "user_id": int(row["user_id"]),
    }


def place_of(row: dict[str, Any]) -> Place:
    return Place(row["legal_entity"], row["home_store"])


def id_context(member_id: int) -> str:
    """The associated data the ID number is sealed under: it opens for this member only."""
    return f"cardcore/member/{member_id}/id_number"


def not_found(field: str = "member_id") -> Refused:
    return Refused("not_found", "member_not_found", "no such member", field)


def not_active(row: dict[str, Any], field: str = "member_id") -> Refused:
    return Refused("conflict", "member_not_active", f"the member is {row['state']}", field)


def member_changed() -> Refused:
    return Refused("conflict", "member_changed", "the member's cards changed meanwhile; retry")


def mobile_taken() -> Refused:
    # Never says which member holds the number: the caller may not be allowed to see it.
    return Refused("conflict", "member_exists", "a member has this mobile number", "mobile")


class MemberService:
    def __init__(
        self,
        records: Records,
        org: OrgService,
        vault: Vault,
        ledger: Ledger,
        *,
        accounts: Accounts,
        directory: Directory,
        points_held: PointsHeld,
        coupons_merge: CouponsMerge,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.records = records
        self.org = org
        self.vault = vault
        self.ledger = ledger
        self.accounts = accounts  # the card-account locks, shared with top-ups and the POS
        self.directory = directory  # the POS's card cache, told of the cards a delete closes
        self.points_held = points_held  # read under the same card-account locks as the value
        # (the service cards, wired by the app) the usable packages each value account holds
        self.services_held: PointsHeld | None = None
        self.coupons_merge = coupons_merge  # run inside the merge's transaction
        self.clock_ms = clock_ms or org.clock_ms

    # --- register ------------------------------------------------------------------------------

    async def create(self, p: Principal, values: dict[str, Any]) -> dict[str, Any]:
        """Register a member at `home_store` (which must be open and in the caller's scope).
        `values`: mobile, name, home_store; optional gender, birthday, email, tier, id_type
        with id_number, sms_alerts, sms_marketing (each recorded as a consent from
        consent_source)."""
        require(p, Perm.MEMBERS_WRITE)
        store = values["home_store"]
        if p.scope.kind is ScopeKind.STORE and store != p.scope.id:
            raise Refused("forbidden", "scope_forbidden", "a store registers its own members")
        place = await self.org.store_place(store, "home_store", open_=True)
        require(p, Perm.MEMBERS_WRITE, place)
        now = self.clock_ms()
        row: dict[str, Any] = {
            "mobile": normalize_mobile(values["mobile"]),
            "name": check_name(values["name"]),
            "gender": check_gender(values.get("gender", "")),
            "birthday": check_birthday(values.get("birthday", ""), _today(now)),
            "email": values.get("email", ""),
            "tier": values.get("tier", ""),
            "id_type": "",
            "id_hash": None,
            "id_sealed": "",
            "id_masked": "",
            "sms_alerts": bool(values.get("sms_alerts", False)),
            "sms_marketing": bool(values.get("sms_marketing", False)),
            "home_store": store,
            "legal_entity": place.entity,
            "state": MemberState.ACTIVE.value,
            "merged_into": None,
            "created_at_ms": now,
            "updated_at_ms": now,
        }
        document = _document(values)
        if document is not None:
            row.update(self._document_columns(*document))
        given = [(purpose, bool(values[flag])) for purpose, flag in FLAG.items() if flag in values]
        async with self.records.begin() as uow:
            try:  # the first statement writes: see "Concurrency" above
                member_id = await uow.insert(MEMBERS, row)
            except Conflict:
                raise mobile_taken() from None
            assert member_id is not None
            if document is not None:
                sealed = self.vault.seal_text(id_context(member_id), document[1])
                await uow.update(MEMBERS, {"id": member_id}, {"id_sealed": sealed})
            source = values.get("consent_source", "counter")
            for purpose, granted in given:
                await _record_consent(
                    uow, p, member_id, purpose, granted=granted, source=source, now=now
                )
            view = member_view({**row, "id": member_id})
            await uow.audit(
                p, action="member.create", kind="member", object_id=member_id,
                place=place, before=None, after=masked_personal(view), now_ms=now,
            )  # fmt: skip
        return {**view, "cards": [], "cards_more": False}

    def _document_columns(self, id_type: IdType, number: str) -> dict[str, Any]:
        """The columns of an ID document but its ciphertext (sealed once the id is known)."""
        return {
            "id_type": id_type.value,
            "id_hash": self.vault.lookup(f"id:{id_type.value}", number),
            "id_masked": mask_id(id_type, number),
        }

    # --- read ----------------------------------------------------------------------------------

    async def _read(self, p: Principal, perm: Perm, member_id: int, field: str = "member_id"
                    ) -> dict[str, Any]:  # fmt: skip
        """The member's row, after checking the caller may `perm` it (404, then 403)."""
        require(p, perm)
        row = None
        if 0 < member_id <= ID_MAX:
            async with self.records.read() as uow:
                row = await uow.get(MEMBERS, id=member_id)
        if row is None:
            raise not_found(field)
        require(p, perm, place_of(row))
        return row

    async def _full_view(self, p: Principal, uow: Unit, row: dict[str, Any]) -> dict[str, Any]:
        """The member and its cards in the caller's scope (a store officer sees its own
        store's cards of the member, not the ones other stores issued)."""
        shown = limits.MEMBER_CARDS_SHOWN_MAX
        cards = await uow.find(CARDS, {"member_id": row["id"]}, limit=shown)
        more = len(cards) > shown
        mine = [c for c in cards[:shown] if p.covers(Place(c["legal_entity"], c["store"]))]
        return {**member_view(row), "cards": [card_view(c) for c in mine], "cards_more": more}

    async def get(self, p: Principal, member_id: int) -> dict[str, Any]:
        row = await self._read(p, Perm.MEMBERS_READ, member_id)
        async with self.records.read() as uow:
            return await self._full_view(p, uow, row)

    def _scoped(self, p: Principal, where: dict[str, Any]) -> dict[str, Any] | None:
        """`where` narrowed to the caller's scope; None when nothing in it can match."""
        where = dict(where)
        if p.scope.kind is ScopeKind.ENTITY:
            if where.get("legal_entity", p.scope.id) != p.scope.id:
                return None
            where["legal_entity"] = p.scope.id
        elif p.scope.kind is ScopeKind.STORE:
            if where.get("home_store", p.scope.id) != p.scope.id:
                return None
            where["home_store"] = p.scope.id
        return where

    async def list_members(
        self, p: Principal, filters: dict[str, Any], after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of members in the caller's scope, by id: (items, next_after). Filters:
        mobile (normalized first), name_prefix, home_store, tier, state."""
        require(p, Perm.MEMBERS_READ)
        assert 1 <= limit <= limits.PAGE_LIMIT_MAX
        filters = dict(filters)
        prefix = filters.pop("name_prefix", "")
        if "mobile" in filters:
            filters["mobile"] = normalize_mobile(filters["mobile"])
        where = self._scoped(p, filters)
        if where is None:
            return [], None
        after = None if after is None else min(after, ID_MAX)
        async with self.records.read() as uow:
            rows = await uow.find(
                MEMBERS,
                where,
                after=after,
                limit=limit,
                starts_with={"name": prefix} if prefix else None,
            )
        more = len(rows) > limit
        rows = rows[:limit]
        return [member_view(r) for r in rows], str(rows[-1]["id"]) if more else None

    async def lookup_by_id(
        self, p: Principal, id_type: IdType, number: str, after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Members in scope with this ID document (given in a body, never a URL)."""
        require(p, Perm.MEMBERS_READ)
        normalized = normalize_id(id_type, number)
        where = self._scoped(p, {"id_hash": self.vault.lookup(f"id:{id_type.value}", normalized)})
        if where is None:
            return [], None
        after = None if after is None else min(after, ID_MAX)
        async with self.records.read() as uow:
            rows = await uow.find(MEMBERS, where, after=after, limit=limit)
        more = len(rows) > limit
        rows = rows[:limit]
        return [member_view(r) for r in rows], str(rows[-1]["id"]) if more else None

    # --- change --------------------------------------------------------------------------------

    async def _lock(self, uow: Unit, member_id: int) -> dict[str, Any]:
        """Touch the member's row with a write that changes nothing (the row lock on
        PostgreSQL, the write lock on SQLite), then read it."""
        await uow.update(MEMBERS, {"id": member_id}, {"updated_at_ms": ("+", 0)})
        row = await uow.get(MEMBERS, id=member_id)
        if row is None:
            raise not_found()
        return row

    async def update(self, p: Principal, member_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        """Change name, gender, birthday, email, mobile, tier, the ID document (id_type and
        id_number together) or the home store (open, and in the caller's scope)."""
        current = await self._read(p, Perm.MEMBERS_WRITE, member_id)
        now = self.clock_ms()
        values, number = await self._changes(p, current, changes, now)
        if not values:
            return await self.get(p, member_id)
        async with self.records.begin() as uow:
            before = await self._lock(uow, member_id)
            if before["state"] != MemberState.ACTIVE:
                raise not_active(before)
            require(p, Perm.MEMBERS_WRITE, place_of(before))  # it may have moved meanwhile
            if number is not None:
                values["id_sealed"] = self.vault.seal_text(id_context(member_id), number)
            values["updated_at_ms"] = now
            try:
                await uow.update(MEMBERS, {"id": member_id}, values)
            except Conflict:
                raise mobile_taken() from None
            after = {**before, **values}
            # A move to another store is seen from both places: the row at the old one too,
            # so the entity and store that lost the member can read that they did.
            places = dict.fromkeys((place_of(before), place_of(after)))
            was, now_is = member_view(before), member_view(after)
            changed = sorted(k for k in now_is if k != "updated_at_ms" and was[k] != now_is[k])
            if before.get("id_hash") != after.get("id_hash") and "id_masked" not in changed:
                changed = sorted([*changed, "id_masked"])  # another number behind the same mask
            for place in places:
                await uow.audit(
                    p, action="member.update", kind="member", object_id=member_id,
                    place=place, before=audit_image(before),
                    after={**audit_image(after), "changed": changed}, now_ms=now,
                )  # fmt: skip
            return await self._full_view(p, uow, after)

    async def _changes(
        self, p: Principal, current: dict[str, Any], changes: dict[str, Any], now: int
    ) -> tuple[dict[str, Any], str | None]:
        """The columns `changes` set, checked, and the normalized ID number when it changes
        (sealed inside the transaction)."""
        values: dict[str, Any] = {}
        for name in ("name", "email", "tier"):
            if name in changes:
                values[name] = changes[name]
        if "name" in changes:
            check_name(changes["name"])
        if "gender" in changes:
            values["gender"] = check_gender(changes["gender"])
        if "birthday" in changes:
            values["birthday"] = check_birthday(changes["birthday"], _today(now))
        if "mobile" in changes:
            values["mobile"] = normalize_mobile(changes["mobile"])
        document = _document(changes)
        if document is not None:
            values.update(self._document_columns(*document))
        store = changes.get("home_store", current["home_store"])
        if store != current["home_store"]:
            if p.scope.kind is ScopeKind.STORE:
                raise Refused(
                    "forbidden", "scope_forbidden", "a store cannot move members to another"
                )
            place = await self.org.store_place(store, "home_store", open_=True)
            require(p, Perm.MEMBERS_WRITE, place)
            values["home_store"] = store
            values["legal_entity"] = place.entity
        return values, None if document is None else document[1]

    # --- consent -------------------------------------------------------------------------------

    async def consent(
        self, p: Principal, member_id: int, purpose: Purpose, granted: bool, source: str
    ) -> dict[str, Any]:
        """Give or withdraw one SMS consent: a new row of the history, and the current flag."""
        await self._read(p, Perm.MEMBERS_WRITE, member_id)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            before = await self._lock(uow, member_id)
            if before["state"] != MemberState.ACTIVE:
                raise not_active(before)
            require(p, Perm.MEMBERS_WRITE, place_of(before))
            flag = FLAG[purpose]
            await uow.update(MEMBERS, {"id": member_id}, {flag: granted, "updated_at_ms": now})
            consent_id = await _record_consent(
                uow, p, member_id, purpose, granted=granted, source=source, now=now
            )
            after = {**before, flag: granted, "updated_at_ms": now}
            await uow.audit(
                p, action=f"member.consent.{purpose.value}", kind="member",
                object_id=member_id, place=place_of(after), before=audit_image(before),
                after=audit_image(after), now_ms=now,
            )  # fmt: skip
            row = await uow.get(CONSENTS, id=consent_id)
        assert row is not None
        return consent_view(row)

    async def consents(
        self, p: Principal, member_id: int, after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The member's consent history, oldest first."""
        await self._read(p, Perm.MEMBERS_READ, member_id)
        after = None if after is None else min(after, ID_MAX)
        async with self.records.read() as uow:
            rows = await uow.find(CONSENTS, {"member_id": member_id}, after=after, limit=limit)
        more = len(rows) > limit
        rows = rows[:limit]
        return [consent_view(r) for r in rows], str(rows[-1]["id"]) if more else None

    # --- merge ---------------------------------------------------------------------------------

    async def merge(self, p: Principal, survivor_id: int, duplicate_id: int) -> dict[str, Any]:
        """Fold `duplicate_id` into `survivor_id`: every card of the duplicate moves to the
        survivor with its account (so every balance and every point stays as it is: points
        are held by the card's account), and so do the duplicate's coupon codes, coupon
        redemptions (what the per-member limits count) and campaign enrolments
        (`coupons_merge`, in the same transaction); the duplicate becomes "merged" with
        `merged_into` and loses its mobile number (free for reuse). Every card moved must be
        in the caller's scope (403 `scope_forbidden` otherwise, nothing changed), as for a
        delete."""
        if survivor_id == duplicate_id:
            raise Refused(
                "invalid", "merge_same_member", "a member cannot merge into itself",
                "duplicate_id",
            )  # fmt: skip
        await self._read(p, Perm.MEMBERS_WRITE, survivor_id)
        await self._read(p, Perm.MEMBERS_WRITE, duplicate_id, "duplicate_id")
        now = self.clock_ms()
        async with self.records.begin() as uow:
            locked = {i: await self._lock(uow, i) for i in sorted((survivor_id, duplicate_id))}
            survivor, duplicate = locked[survivor_id], locked[duplicate_id]
            for row, field in ((survivor, "member_id"), (duplicate, "duplicate_id")):
                if row["state"] != MemberState.ACTIVE:
                    raise not_active(row, field)
                require(p, Perm.MEMBERS_WRITE, place_of(row))
            kept = await _card_ids(uow, survivor_id)
            cards = await _all_cards(uow, duplicate_id)
            for card in cards:  # the merge moves them: each must be in the caller's scope
                if not p.covers(Place(card["legal_entity"], card["store"])):
                    raise Refused(
                        "forbidden", "scope_forbidden",
                        f"card {card['pan_masked']} of the duplicate is outside your scope",
                        "duplicate_id",
                    )  # fmt: skip
            moved = [int(c["id"]) for c in cards]
            await uow.update(
                CARDS, {"member_id": duplicate_id}, {"member_id": survivor_id, "updated_at_ms": now}
            )
            coupons = await self.coupons_merge(uow, survivor_id, duplicate_id)
            merged = {
                "state": MemberState.MERGED.value,
                "merged_into": survivor_id,
                "mobile": None,
                "updated_at_ms": now,
            }
            await uow.update(MEMBERS, {"id": duplicate_id}, merged)
            await uow.update(MEMBERS, {"id": survivor_id}, {"updated_at_ms": now})
            gone, kept_row = {**duplicate, **merged}, {**survivor, "updated_at_ms": now}
            await uow.audit(
                p, action="member.merged", kind="member", object_id=duplicate_id,
                place=place_of(duplicate),
                before={**audit_image(duplicate), "card_ids": moved},
                after={**audit_image(gone), "card_ids": []}, now_ms=now,
            )  # fmt: skip
            await uow.audit(
                p, action="member.merge", kind="member", object_id=survivor_id,
                place=place_of(survivor),
                before={**audit_image(survivor), "card_ids": kept},
                after={**audit_image(kept_row), "card_ids": sorted(kept + moved),
                       "merged_from": duplicate_id, "coupons": coupons},
                now_ms=now,
            )  # fmt: skip
            return await self._full_view(p, uow, kept_row)

    # --- delete --------------------------------------------------------------------------------

    async def delete(self, p: Principal, member_id: int) -> dict[str, Any]:
        """Erase the member's personal data, mark it deleted and close its live cards (not
        closed or replaced), in one transaction; 409 `member_has_value` while one of them,
        or a closed card of the member, holds value, posted or pending, and 409
        `member_has_points` while one of those holds points (409 `member_has_services` while
        one holds a usable service package),
        usable or pending, in any program (a points debt alone does not refuse: it is
        written off with the cards). Both are read under the cards' account locks, the ones
        every counter and POS top-up and purchase, every earning and spend of points of those
        cards holds (a points transfer holds both cards'), and the transaction commits
        before they are let go: no value and no points arrive between the check and the
        delete. Deleting a deleted member changes nothing."""
        row = await self._read(p, Perm.MEMBERS_WRITE, member_id)
        if row["state"] == MemberState.DELETED:
            return await self.get(p, member_id)
        if row["state"] != MemberState.ACTIVE:
            raise not_active(row)
        async with self.records.read() as uow:
            all_cards = await _all_cards(uow, member_id)
        checked = [c for c in all_cards if c["state"] not in DEAD_CARD_STATES]
        for card in all_cards:  # the delete closes them and erases the member of every one
            if not p.covers(Place(card["legal_entity"], card["store"])):
                raise Refused(
                    "forbidden", "scope_forbidden",
                    f"card {card['pan_masked']} of the member is outside your scope",
                )  # fmt: skip
        # A closed card can hold value too (a close whose refund stopped half way, a
        # terminal's reversal since): the delete is refused for it as for a live card.
        valued = [*checked, *(c for c in all_cards if c["state"] == CardState.CLOSED.value)]
        async with contextlib.AsyncExitStack() as held:
            for account_id in sorted({int(c["account_id"]) for c in valued}):  # one order
                await held.enter_async_context(self.accounts.lock(account_id))
            for card in valued:
                await self._refuse_value(card)
            await self._refuse_points(valued)
            await self._refuse_services(valued)
            view, closed = await self._erase(p, member_id, checked)
            for card in closed:
                self.directory.forget_card(card["token"])
        return view

    async def _erase(
        self, p: Principal, member_id: int, checked: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The deleting transaction: the member erased and its live cards, still the ones
        `checked`, closed (each with its audit row). Answers the view and the closed cards."""
        now = self.clock_ms()
        async with self.records.begin() as uow:
            before = await self._lock(uow, member_id)
            if before["state"] != MemberState.ACTIVE:
                raise not_active(before)
            require(p, Perm.MEMBERS_WRITE, place_of(before))
            live = await _live_cards(uow, member_id)
            if {c["id"] for c in live} != {c["id"] for c in checked}:
                raise member_changed()
            for card in live:
                await _close_card(uow, p, card, now)
            for purpose, flag in FLAG.items():
                if before[flag]:
                    await _record_consent(
                        uow, p, member_id, purpose, granted=False, source="erasure", now=now
                    )
            values = {**ERASED, "state": MemberState.DELETED.value, "updated_at_ms": now}
            await uow.update(MEMBERS, {"id": member_id}, values)
            after = {**before, **values}
            closed_ids = sorted(int(c["id"]) for c in live)
            await uow.audit(
                p, action="member.delete", kind="member", object_id=member_id,
                place=place_of(before), before=audit_image(before),
                after={**audit_image(after), "closed_card_ids": closed_ids}, now_ms=now,
            )  # fmt: skip
            return await self._full_view(p, uow, after), live

    async def _refuse_value(self, card: dict[str, Any]) -> None:
        account = await self.ledger.account(int(card["account_id"]))
        if account is None:
            return
        b = account.balance
        if b.credits_posted - b.debits_posted != 0 or b.credits_pending or b.debits_pending:
            raise Refused(
                "conflict",
                "member_has_value",
                f"card {card['pan_masked']} holds value: close it (refunding the value) first",
            )

    async def _refuse_services(self, cards: list[dict[str, Any]]) -> None:
        """409 `member_has_services` while a card's account holds a usable service package."""
        if self.services_held is None:
            return
        held = await self.services_held(sorted({int(c["account_id"]) for c in cards}))
        for card in cards:
            if held.get(int(card["account_id"]), 0):
                raise Refused(
                    "conflict", "member_has_services",
                    f"card {card['pan_masked']} holds usable service packages: redeem or "
                    "refund them first",
                )  # fmt: skip

    async def _refuse_points(self, cards: list[dict[str, Any]]) -> None:
        """409 `member_has_points` when a card's holder (its account: a replaced card and its
        successor share it) has points to use, usable or pending, in any program."""
        held = await self.points_held(sorted({int(c["account_id"]) for c in cards}))
        for card in cards:
            points = held.get(int(card["account_id"]), 0)
            if points:
                raise Refused(
                    "conflict",
                    "member_has_points",
                    f"card {card['pan_masked']} holds {points} points: redeem or transfer "
                    "them (pending points once usable) first, or close the card with "
                    "forfeit_points",
                )


# --- helpers -----------------------------------------------------------------------------------


def _today(now_ms: int) -> datetime.date:
    return datetime.date.fromisoformat(day_of(now_ms))


def _document(values: dict[str, Any]) -> tuple[IdType, str] | None:
    """(type, normalized number) when `values` name an ID document; both or neither."""
    if "id_type" not in values and "id_number" not in values:
        return None
    for name in ("id_type", "id_number"):
        if name not in values:
            raise Refused("invalid", "missing_field", "give id_type and id_number together", name)
    id_type = IdType(values["id_type"])
    return id_type, normalize_id(id_type, values["id_number"])


async def _record_consent(
    uow: Unit, p: Principal, member_id: int, purpose: Purpose, *, granted: bool, source: str,
    now: int,
) -> int:  # fmt: skip
    consent_id = await uow.insert(
        CONSENTS,
        {
            "member_id": member_id,
            "purpose": purpose.value,
            "granted": granted,
            "source": source,
            "at_ms": now,
            "user_id": p.user_id,
        },
    )
    assert consent_id is not None
    return consent_id


async def _all_cards(uow: Unit, member_id: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = None
    while True:
        rows = await uow.find(CARDS, {"member_id": member_id}, after=after)
        out.extend(rows[: limits.PAGE_LIMIT_MAX])
        if len(rows) <= limits.PAGE_LIMIT_MAX:
            return out
        after = rows[limits.PAGE_LIMIT_MAX - 1]["id"]


async def _card_ids(uow: Unit, member_id: int) -> list[int]:
    return [int(c["id"]) for c in await _all_cards(uow, member_id)]


async def _close_card(uow: Unit, p: Principal, card: dict[str, Any], now: int) -> None:
    """Close a card of a deleted member (it holds no value: nothing to refund), audited as
    `card.close` at the card's place; a card another request changed first refuses all."""
    changes = {"state": CardState.CLOSED.value, "updated_at_ms": now}
    if not await uow.update(CARDS, {"id": card["id"], "state": card["state"]}, changes):
        raise member_changed()
    await uow.audit(
        p, action="card.close", kind="card", object_id=card["id"],
        place=Place(card["legal_entity"], card["store"]), before=card_image(card),
        after=card_image({**card, **changes}), now_ms=now,
    )  # fmt: skip


async def _live_cards(uow: Unit, member_id: int) -> list[dict[str, Any]]:
    return [c for c in await _all_cards(uow, member_id) if c["state"] not in DEAD_CARD_STATES]
