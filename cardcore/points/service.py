"""The points engine's use cases (ADR 0007): programs and earning rules (admin API), earning
at the POS after the money, its reversal and its proportional clawback, and the card's
points as the admin API shows them.

Ledger shape. A program's points are one ledger asset, made with the program. A card's
points belong to its holder, the card's value account id (a replacement card shares it):
one account per lot (owner kind "points", owner id the holder, purpose `model.lot_purpose`,
no-overdraft) and one debt account (purpose "debt", no-overcredit), in the card's legal
entity. The entity's accounts `points_issued`, `points_clawed` (owner kind "entity") are the
other side of earnings and clawbacks.

Keys (POS client, under the terminal transaction's key K):
- a purchase's earning is `K:p` (points_issued -> lot), pinned in `points_earnings` (with its
  per-rule parts, which the daily caps count) BEFORE it is submitted: a resend reads the row
  and submits the identical transfer, which the ledger answers as a replay;
- a POINTS_EARN (a purchase paid some other way) earns the same way under `K:p`; a terminal
  reversal that overtook it left a tombstone under K (the POS host's), which refuses it;
- a void V of purchase K reverses `K:p` under `V:p`; a terminal reversal of any K undoes what
  stands under `K:p` under `K/R:p` (`reverse_pos`): a ledger Reverse for a one-lot transfer,
  the mirrored legs for a multi-lot one (a clawback): the key makes it happen at most once;
- a refund F claws back under `F:p` (pinned in `points_clawbacks`): the returned part's share,
  from the earning's own lot first, then pending, then usable lots latest expiry first, and
  what the lots cannot cover debits the holder's debt account;
- a POINTS_RETURN F2 (goods of a POINTS_EARN returned) names the earning by its RRN and claws
  back under `F2:p` exactly as a refund does (`pos_return`); a terminal reversal of F2 puts
  back what stands under `F2:p` like a refund's clawback.

`:` is in the ledger's key alphabet; the transfers' reasons (points_earn, points_repay,
points_clawback, points_reversal, points_redeem) are ones settlement totals ignore.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cardcore import limits
from cardcore.cards.accounts import Accounts, AccountsUnavailable, Wanted
from cardcore.cards.directory import Directory
from cardcore.cards.model import (
    CURRENCY,
    POS_CLIENT,
    Card,
    Kind,
    Outcome,
    PosRequest,
    PosResult,
    Terminal,
    auth_code_of,
    line_parts,
    rrn_of,
    unusable_outcome,
    value_postings,
)
from cardcore.cards.pos import MoneyDone, PointsAnswer
from cardcore.coalesce import Coalescer
from cardcore.db import DATABASE_ERRORS
from cardcore.ledger.model import (
    AccountFlags,
    AssetKind,
    CreateAsset,
    CreateTransfer,
    Metadata,
    Op,
    Posting,
    Result,
    Reverse,
    Side,
)
from cardcore.ledger.service import Ledger
from cardcore.ledger.writer import Busy, LedgerUnavailable
from cardcore.localtime import day_number
from cardcore.org.model import (
    Function,
    Perm,
    Place,
    Principal,
    Problem,
    Refused,
    ScopeKind,
    require,
)
from cardcore.org.service import OrgService
from cardcore.points import model, schema
from cardcore.records import Conflict, Records, Unit

log = logging.getLogger(__name__)

TRANSFERS = "points_transfers"
PROGRAMS, RULES, EARNINGS, PARTS, CLAWBACKS, HOLDERS = (
    "points_programs",
    "points_rules",
    "points_earnings",
    "points_earning_parts",
    "points_clawbacks",
    "points_holders",
)
ACCOUNTS = "ledger_accounts"
OWNER_KIND = "points"  # lot and debt accounts: owner id = the holder
EARN_SUFFIX = ":p"  # the points part of a POS transaction, under its key
REVERSAL_SUFFIX = "/R"  # as cards.model.reversal_key
DEBT_SUFFIX = ":d"  # an earning's repayment of the holder's debt, under the earning's key
EXPIRY_CLIENT = "points"  # the ledger scope of the expiry job's transfers
ADMIN_CLIENT = "points-admin"  # the ledger scope of reward redemptions and transfers
NO_OVERDRAFT = AccountFlags(no_overdraft=True)
NO_OVERCREDIT = AccountFlags(no_overcredit=True)


@dataclass(slots=True)
class _Run:
    """One run of the expiry job: its instant, how many days ahead it reminds, its totals."""

    now_ms: int
    remind_days: int
    totals: dict[str, int]


@dataclass(slots=True)
class _Due:
    """What one notice of the expiry job says: the points of a holder's lots of one expiry
    day (`expires_ms`, the next local midnight), and how many lots they were."""

    expires_ms: int
    points: int = 0
    lots: int = 0


class PointsUnavailable(Exception):
    """The ledger could not take a points step now; retry."""


def _refused(exc: model.PointsRefused) -> Refused:
    return Refused("invalid", exc.code, exc.message, exc.field)


def _invalid(code: str, problems: Sequence[Problem]) -> None:
    if problems:
        raise Refused("invalid", code, problems[0].message, problems[0].field)


# --- definitions -----------------------------------------------------------------------------


def tiers_json(policy: model.TierPolicy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {
        "ladder": [
            {"code": t.code, "threshold": t.threshold, "multiplier_pct": t.multiplier_pct}
            for t in policy.tiers
        ],
        "basis": str(policy.basis),
        "period": str(policy.period),
        "downgrade": str(policy.downgrade),
    }


def tiers_of(raw: object) -> model.TierPolicy | None:
    if not isinstance(raw, dict):
        return None
    ladder = tuple(
        model.Tier(str(t["code"]), int(t["threshold"]), int(t["multiplier_pct"]))
        for t in raw.get("ladder", [])
    )
    return model.TierPolicy(
        ladder,
        model.TierBasis(raw.get("basis", model.TierBasis.POINTS_EARNED)),
        model.TierPeriod(raw.get("period", model.TierPeriod.CALENDAR_YEAR)),
        model.Downgrade(raw.get("downgrade", model.Downgrade.PERIOD_END)),
    )


@dataclass(frozen=True, slots=True)
class ProgramRecord:
    code: str
    name: str
    state: str
    program: model.Program
    tiers: model.TierPolicy | None


def program_record(row: dict[str, Any]) -> ProgramRecord:
    raw = json.loads(row["definition"])
    return ProgramRecord(
        row["code"], row["name"], row["state"], model.program_of(raw), tiers_of(raw.get("tiers"))
    )


def program_view(row: dict[str, Any]) -> dict[str, Any]:
    found = program_record(row)
    return {
        **model.program_json(found.program),
        "name": row["name"],
        "state": row["state"],
        "tiers": tiers_json(found.tiers),
        "created_at_ms": int(row["created_at_ms"]),
        "updated_at_ms": int(row["updated_at_ms"]),
    }


def _checked_program(values: dict[str, Any]) -> tuple[model.Program, model.TierPolicy | None]:
    """The program and tier policy of a definition, or 400 naming the first problem."""
    program = model.program_of(values)
    _invalid(model.PROGRAM_INVALID, model.check_program(program))
    tiers = tiers_of(values.get("tiers"))
    if tiers is not None:
        found = model.check_tiers(tiers.tiers)
        _invalid(model.TIERS_INVALID, [Problem(f"tiers.{p.field}", p.message) for p in found])
    return program, tiers


def _definition(program: model.Program, tiers: model.TierPolicy | None) -> str:
    return json.dumps({**model.program_json(program), "tiers": tiers_json(tiers)}, sort_keys=True)


def rule_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **json.loads(row["definition"]),
        "program": row["program"],
        "legal_entity": row["legal_entity"],
        "store": row["store"],
        "state": row["state"],
        "created_at_ms": int(row["created_at_ms"]),
        "updated_at_ms": int(row["updated_at_ms"]),
    }


def _checked_rule(values: dict[str, Any]) -> model.Rule:
    try:
        rule = model.rule_of(values)
    except model.PointsRefused as exc:
        raise _refused(exc) from None
    _invalid(model.RULE_INVALID, model.check_rule(rule))
    return rule


def rule_place(row: dict[str, Any]) -> Place:
    return Place(row["legal_entity"], row["store"])


def visible(p: Principal, row: dict[str, Any]) -> bool:
    """Group rules are everyone's to read; an entity's or a store's only within scope."""
    if p.scope.kind is ScopeKind.GROUP:
        return True
    if row["legal_entity"] not in ("", p.scope_entity):
        return False
    return p.scope.kind is ScopeKind.ENTITY or row["store"] in ("", p.store)


def applies_at(row: dict[str, Any], t: Terminal) -> bool:
    """A rule is in scope of a store: the group's, its entity's, or its own."""
    return (
        row["state"] == "active"
        and row["legal_entity"] in ("", t.legal_entity)
        and row["store"] in ("", t.store)
    )


# --- lots ------------------------------------------------------------------------------------


def available(row: dict[str, Any]) -> int:
    return int(row["credits_posted"]) - int(row["debits_posted"]) - int(row["debits_pending"])


def owed(row: dict[str, Any] | None) -> int:
    """A debt account's debt: what clawbacks debited and repayments did not credit back."""
    if row is None:
        return 0
    return int(row["debits_posted"]) - int(row["credits_posted"])


@dataclass(frozen=True, slots=True)
class Holding:
    """A holder's points in one program: its lots (key = purpose) and their account ids."""

    lots: tuple[model.Lot, ...]
    ids: dict[str, int]
    debt: int
    debt_id: int | None

    def usable(self, now_ms: int) -> int:
        return sum(lot.remaining for lot in self.lots if model.is_usable(lot, now_ms))

    def pending(self, now_ms: int) -> int:
        return sum(lot.remaining for lot in self.lots if model.is_pending(lot, now_ms))

    def spendable(self, now_ms: int, program: model.Program) -> int:
        """What a POS reply's PB says: usable points less the debt (`spendable`)."""
        return spendable(self.usable(now_ms), self.debt, program)


def spendable(usable: int, debt: int, program: model.Program) -> int:
    """Usable points less what the holder owes (every spend counts the debt against them):
    never below 0 under the `debt` policy, signed under `negative`."""
    left = usable - debt
    return left if program.negative_policy is model.NegativePolicy.NEGATIVE else max(0, left)


def _metadata(t: Terminal, r: PosRequest) -> Metadata:
    pairs = {"batch": r.batch, "operator": r.operator, "stan": r.stan, "store": t.store,
             "terminal": t.tid}  # fmt: skip
    return tuple(sorted((k, v) for k, v in pairs.items() if v))


DEBITS_PER_TRANSFER_MAX = limits.POSTINGS_PER_TRANSFER_MAX - 1  # and one credit


def chunk_key(key: str, index: int) -> str:
    """The key of a multi-lot move's `index`th transfer: the key itself, then `key.2`, ..."""
    return key if index == 0 else f"{key}.{index + 1}"


_CHUNK_SUFFIX = re.compile(r".*\.[0-9]+")  # `chunk_key`'s ending


def check_client_key(key: str) -> None:
    """A caller's key of a move may not end like a chunk's (`.N`): `big.2` would name the
    second transfer of the move under `big` (its replay answered, its reversal undoing
    part of another move: points made from nothing). 400 `invalid_value`."""
    if _CHUNK_SUFFIX.fullmatch(key):
        raise Refused("invalid", "invalid_value", "a key may not end in .N (a move's parts)",
                      "key")  # fmt: skip


def split(
    client: str, key: str, asset: str, debits: Sequence[Posting], credit: int, *,
    reason: str, metadata: Metadata, client_link_last: bool = False,
) -> list[Op]:  # fmt: skip
    """Debits from many lots to one account, as linked transfers of at most
    POSTINGS_PER_TRANSFER_MAX legs each (the ledger's bound), keyed `chunk_key`. With
    `client_link_last` the last is linked too (the caller's op follows in the group)."""
    chunks = [
        debits[i : i + DEBITS_PER_TRANSFER_MAX]
        for i in range(0, len(debits), DEBITS_PER_TRANSFER_MAX)
    ]
    out: list[Op] = []
    for index, chunk in enumerate(chunks):
        legs = (*chunk, Posting(credit, Side.CREDIT, sum(p.amount for p in chunk)))
        linked = client_link_last or index < len(chunks) - 1
        out.append(CreateTransfer(client, chunk_key(key, index), asset, legs, reason=reason,
                                  metadata=metadata, linked=linked))  # fmt: skip
    return out


def again(stored: Sequence[dict[str, Any]], client: str, keys: Sequence[str],
          metadata: Metadata, *, link_last: bool = False) -> list[Op]:  # fmt: skip
    """Stored transfers submitted again as they were (the ledger answers them as replays)."""
    return [
        CreateTransfer(
            client, key, t["asset"], tuple(Posting(a, Side(s), x) for a, s, x in t["postings"]),
            reason=t["reason"], metadata=metadata,
            linked=link_last or i < len(stored) - 1,
        )
        for i, (t, key) in enumerate(zip(stored, keys, strict=True))
    ]  # fmt: skip


def _mirror(stored: dict[str, Any], key: str, reason: str, metadata: Metadata) -> CreateTransfer:
    """A transfer with every leg of `stored` moved back (sides swapped)."""
    swapped = tuple(
        Posting(a, Side.CREDIT if side == "debit" else Side.DEBIT, amount)
        for a, side, amount in stored["postings"]
    )
    return CreateTransfer(POS_CLIENT, key, stored["asset"], swapped, reason=reason,
                          metadata=metadata)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _ToPin:
    """An earning to pin: its key, the card and terminal, the program, the bill, the
    purchase's key it comes from ("" for POINTS_EARN), and whether that purchase's money
    was applied just now (nothing can be pinned under its key yet: no look-up)."""

    key: str
    card: Card
    terminal: Terminal
    found: ProgramRecord
    basket: model.Basket
    source: str
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class _Pinned:
    """A decided earning: its points_earnings row and its per-rule parts."""

    row: dict[str, Any]
    parts: list[dict[str, Any]]


class RewardCoupons(Protocol):
    """The coupon side of a reward redemption (CouponService; wired by the app: the points
    engine writes no coupon table). `key` is the redemption's ledger key."""

    async def points_reward_issue(
        self, p: Principal, campaign: str, member: int | None, key: str
    ) -> str: ...

    async def points_reward_of(self, key: str) -> tuple[str, str] | None: ...

    async def points_reward_void(self, key: str) -> bool: ...


# --- the service -----------------------------------------------------------------------------


class PointsService:
    def __init__(  # noqa: PLR0917 - the services it composes, one each
        self,
        records: Records,
        org: OrgService,
        ledger: Ledger,
        directory: Directory,
        accounts: Accounts,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.records = records
        self.org = org
        self.ledger = ledger
        self.directory = directory
        self.accounts = accounts
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.coupons: RewardCoupons | None = None  # the app wires CouponService
        # What every purchase at the till reads, kept a moment (monotonic time read, value):
        # active programs by code and the rules of each program (row and parsed rule).
        # Forgotten at every program or rule change made here, and after
        # POINTS_DEFINITIONS_CACHE_S.
        self._programs: dict[str, tuple[float, ProgramRecord | None]] = {}
        self._rules: dict[str, tuple[float, list[tuple[dict[str, Any], model.Rule]]]] = {}
        self._grants: dict[tuple[str, str], tuple[float, bool]] = {}  # (store, program)
        # The reads of the POS redemptions asked in one turn of the event loop, together.
        self._redeeming = Coalescer(self._redeem_reads, limits.POINTS_POS_TOGETHER_MAX)

    def _forget(self) -> None:
        self._programs.clear()
        self._rules.clear()
        self._grants.clear()

    async def _active_program(self, code: str) -> ProgramRecord | None:
        """The program `code` when it is active (cached), else None."""
        found = self._programs.get(code)
        if found is not None and time.monotonic() - found[0] < limits.POINTS_DEFINITIONS_CACHE_S:
            return found[1]
        async with self.records.read() as uow:
            row = await uow.get(PROGRAMS, code=code)
        record = None if row is None or row["state"] != "active" else program_record(row)
        if len(self._programs) >= limits.POINTS_PROGRAMS_CACHED_MAX:
            self._programs.clear()  # bounded: a group has a few programs
        self._programs[code] = (time.monotonic(), record)
        return record

    async def _store_granted(self, store: str, program: str) -> bool:
        """Whether HQ grants `store` the points function for `program` today (cached as the
        rules are): a store's own rules earn only while it does."""
        found = self._grants.get((store, program))
        if found is not None and time.monotonic() - found[0] < limits.POINTS_DEFINITIONS_CACHE_S:
            return found[1]
        granted = await self.org.granted(store, Function.POINTS, program)
        if len(self._grants) >= limits.POINTS_GRANTS_CACHED_MAX:
            self._grants.clear()
        self._grants[store, program] = (time.monotonic(), granted)
        return granted

    async def _rules_of(self, program: str) -> list[tuple[dict[str, Any], model.Rule]]:
        """The program's active rule rows (at most POINTS_RULES_PER_PROGRAM_MAX: the writes
        keep it so, however many retired rows there are), each with its parsed rule
        (cached)."""
        found = self._rules.get(program)
        if found is not None and time.monotonic() - found[0] < limits.POINTS_DEFINITIONS_CACHE_S:
            return found[1]
        async with self.records.read() as uow:
            rows = await uow.find(RULES, {"program": program, "state": "active"}, order="code",
                                  limit=limits.POINTS_RULES_PER_PROGRAM_MAX)  # fmt: skip
        parsed = [(r, model.rule_of(json.loads(r["definition"]))) for r in rows]
        # Each checked when it was made (`check_rule`; codes unique in the table): earning
        # takes at most POINTS_RULES_PER_PROGRAM_MAX of them, so `earn` need not check again.
        assert not any(model.check_rule(rule) for _, rule in parsed), program
        if len(self._rules) >= limits.POINTS_PROGRAMS_CACHED_MAX:
            self._rules.clear()
        self._rules[program] = (time.monotonic(), parsed)
        return parsed

    # --- programs ----------------------------------------------------------------------------

    async def create_program(self, p: Principal, values: dict[str, Any]) -> dict[str, Any]:
        """A program and its ledger asset (made first; the asset of a refused program may
        stay behind, unused: assets are idempotent by code)."""
        self._forget()
        _require_group(p, Perm.PROGRAMS_WRITE)
        program, tiers = _checked_program(values)
        async with self.records.read() as uow:
            if await uow.get(PROGRAMS, code=program.code) is not None:
                raise Refused("conflict", "program_exists", "a program has this code", "code")
            if await uow.get(PROGRAMS, asset=program.asset) is not None:
                raise Refused("conflict", "asset_taken", "another program has this asset", "asset")
        await self._asset(program)
        now = self.clock_ms()
        row = {
            "code": program.code,
            "name": values["name"],
            "asset": program.asset,
            "definition": _definition(program, tiers),
            "state": "active",
            "created_at_ms": now,
            "updated_at_ms": now,
        }
        async with self.records.begin() as uow:
            try:
                await uow.insert(PROGRAMS, row)
            except Conflict:
                raise Refused("conflict", "program_exists", "made at the same moment") from None
            view = program_view(row)
            await uow.audit(
                p, action="points_program.create", kind="points_program", object_id=program.code,
                place=Place(), before=None, after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def _asset(self, program: model.Program) -> None:
        op = CreateAsset(program.asset, AssetKind.POINTS, 0, f"points {program.code}")
        try:
            [made] = await self.ledger.submit([op])
        except (Busy, LedgerUnavailable) as exc:
            raise PointsUnavailable(str(exc)) from None
        if made.code.startswith("exists_with_different_"):
            raise Refused("conflict", "asset_taken", "the ledger has this asset", "asset")
        if not made.ok:
            raise PointsUnavailable(made.code)

    async def list_programs(
        self, p: Principal, state: str | None, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        require(p, Perm.LOYALTY_READ)
        where = {} if state is None else {"state": state}
        async with self.records.read() as uow:
            rows = await uow.find(PROGRAMS, where, order="code", after=after, limit=limit)
        return [program_view(r) for r in rows]

    async def get_program(self, p: Principal, code: str) -> dict[str, Any]:
        require(p, Perm.LOYALTY_READ)
        async with self.records.read() as uow:
            return program_view(await _program_row(uow, code))

    async def update_program(
        self, p: Principal, code: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change a program's name, state or definition (never its code, asset or time zone:
        a lot's expiry and availability days, and the days of caps and transfer limits, are
        read in the zone, so a new one would move what was earned under the old)."""
        self._forget()
        _require_group(p, Perm.PROGRAMS_WRITE)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await uow.update(PROGRAMS, {"code": code}, {"updated_at_ms": ("+", 0)})
            row = await _program_row(uow, code)
            before = program_view(row)
            merged = {**before, **changes, "code": code, "asset": row["asset"]}
            program, tiers = _checked_program(merged)
            if merged["timezone"] != before["timezone"]:
                raise Refused("conflict", "program_timezone_fixed",
                              "a program's time zone never changes", "timezone")  # fmt: skip
            stored = {
                "name": merged["name"],
                "state": merged["state"],
                "definition": _definition(program, tiers),
                "updated_at_ms": now,
            }
            await uow.update(PROGRAMS, {"code": code}, stored)
            after = program_view({**row, **stored})
            await uow.audit(
                p, action="points_program.update", kind="points_program", object_id=code,
                place=Place(), before=before, after=after, now_ms=now,
            )  # fmt: skip
        return after

    # --- rules -------------------------------------------------------------------------------

    async def _place(self, uow: Unit, entity: str, store: str) -> Place:
        """Where a rule lives: a store (in its entity), an entity, or the group."""
        if store:
            found = await uow.get("org_stores", id=store)
            if found is None:
                raise Refused("not_found", "store_not_found", "no such store", "store")
            if entity and entity != found["legal_entity"]:
                raise Refused("invalid", "store_not_in_entity", "the store is not in it", "store")
            return Place(found["legal_entity"], store)
        if entity:
            if await uow.get("org_legal_entities", id=entity) is None:
                raise Refused("not_found", "entity_not_found", "no such legal entity",
                              "legal_entity")  # fmt: skip
            return Place(entity)
        return Place()

    async def _check_rule_scope(
        self, uow: Unit, p: Principal, place: Place, rule: model.Rule, program: str
    ) -> None:
        """The principal may write rules at `place`; a store officer only its own store's,
        and only while HQ grants its store the points function; the rule names no store
        outside its place."""
        require(p, Perm.RULES_WRITE, place)
        if p.scope.kind is ScopeKind.STORE:
            await self.org.use_grant(uow, p.store, Function.POINTS, program, count=0, amount=0)
        if place.store and not rule.stores <= {place.store}:
            raise Refused("forbidden", "scope_forbidden", "a store's rule names only it", "stores")
        if place.entity and not place.store and rule.stores:
            rows = await uow.find("org_stores", {"id": sorted(rule.stores)}, limit=len(rule.stores))
            if len(rows) != len(rule.stores) or any(
                r["legal_entity"] != place.entity for r in rows
            ):
                raise Refused(
                    "forbidden", "scope_forbidden", "an entity's rule names only its stores",
                    "stores",
                )  # fmt: skip

    async def create_rule(
        self, p: Principal, program: str, values: dict[str, Any]
    ) -> dict[str, Any]:
        self._forget()
        require(p, Perm.RULES_WRITE)
        definition = {k: v for k, v in values.items() if k not in ("legal_entity", "store")}
        rule = _checked_rule(definition)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await uow.update(PROGRAMS, {"code": program}, {"updated_at_ms": ("+", 0)})
            await _program_row(uow, program, "program")
            entity, store = values.get("legal_entity", ""), values.get("store", "")
            place = await self._place(uow, entity, store)
            await self._check_rule_scope(uow, p, place, rule, program)
            if await uow.get(RULES, program=program, code=rule.code) is not None:
                raise Refused("conflict", "rule_exists", "the program has a rule with this code",
                              "code")  # fmt: skip
            live = await uow.count(RULES, program=program, state="active")
            if live >= limits.POINTS_RULES_PER_PROGRAM_MAX:
                raise Refused("conflict", "too_many_rules", "the program has its most rules")
            row = {
                "program": program,
                "code": rule.code,
                "legal_entity": place.entity,
                "store": place.store,
                "definition": json.dumps(model.rule_json(rule), sort_keys=True),
                "state": "active",
                "created_at_ms": now,
                "updated_at_ms": now,
            }
            try:
                await uow.insert(RULES, row)
            except Conflict:
                raise Refused("conflict", "rule_exists", "made at the same moment") from None
            view = rule_view(row)
            await uow.audit(
                p, action="points_rule.create", kind="points_rule",
                object_id=f"{program}/{rule.code}", place=place, before=None, after=view,
                now_ms=now,
            )  # fmt: skip
        return view

    async def list_rules(
        self, p: Principal, program: str, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """The rules the principal sees, in code order after `after`: `limit + 1` of them
        when there are more. Read in chunks until the page is full or the rules end, so
        rules outside the scope (other stores', retired ones by the hundred) never hide
        the caller's own behind a short last page."""
        require(p, Perm.LOYALTY_READ)
        chunk = limits.POINTS_RULES_PER_PROGRAM_MAX * 4
        shown: list[dict[str, Any]] = []
        async with self.records.read() as uow:
            await _program_row(uow, program, "program")
            while len(shown) <= limit:
                rows = await uow.find(
                    RULES, {"program": program}, order="code", after=after, limit=chunk
                )
                shown += [rule_view(r) for r in rows[:chunk] if visible(p, r)]
                if len(rows) <= chunk:
                    break
                after = rows[chunk - 1]["code"]
        return shown[: limit + 1]

    async def get_rule(self, p: Principal, program: str, code: str) -> dict[str, Any]:
        require(p, Perm.LOYALTY_READ)
        async with self.records.read() as uow:
            row = await _rule_row(uow, program, code)
        if not visible(p, row):
            raise Refused("forbidden", "scope_forbidden", f"outside the token's scope ({p.scope})")
        return rule_view(row)

    async def update_rule(
        self, p: Principal, program: str, code: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        self._forget()
        require(p, Perm.RULES_WRITE)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await uow.update(RULES, {"program": program, "code": code}, {"updated_at_ms": ("+", 0)})
            row = await _rule_row(uow, program, code)
            place = rule_place(row)
            require(p, Perm.RULES_WRITE, place)
            before = rule_view(row)
            definition = {**json.loads(row["definition"]), **changes, "code": code}
            definition.pop("state", None)
            rule = _checked_rule(definition)
            await self._check_rule_scope(uow, p, place, rule, program)
            state = changes.get("state", row["state"])
            if state == "active" and row["state"] != "active":
                live = await uow.count(RULES, program=program, state="active")
                if live >= limits.POINTS_RULES_PER_PROGRAM_MAX:
                    raise Refused("conflict", "too_many_rules", "too many active rules")
            stored = {
                "definition": json.dumps(model.rule_json(rule), sort_keys=True),
                "state": state,
                "updated_at_ms": now,
            }
            await uow.update(RULES, {"id": row["id"]}, stored)
            after = rule_view({**row, **stored})
            await uow.audit(
                p, action="points_rule.update", kind="points_rule",
                object_id=f"{program}/{code}", place=place, before=before, after=after,
                now_ms=now,
            )  # fmt: skip
        return after

    # --- holdings ------------------------------------------------------------------------------

    async def _program_of_card(self, card: Card) -> ProgramRecord | None:
        """The active program the card's class earns in, or None."""
        klass = await self.directory.card_class(card.class_code)
        if klass is None or not klass.points_program:
            return None
        return await self._active_program(klass.points_program)

    async def holding(self, program: model.Program, holder: int) -> Holding:
        return (await self.holdings([(program, holder)]))[program.asset, holder]

    async def holdings(
        self, wanted: Sequence[tuple[model.Program, int]]
    ) -> dict[tuple[str, int], Holding]:
        """The holdings of (program, holder) pairs, keyed (asset, holder), in one read."""
        async with self.records.read() as uow:
            return await _holdings(uow, wanted)

    async def points_held(self, holders: Sequence[int]) -> dict[int, int]:
        """The points each holder (a card's value account id) still has to use, in every
        program, active or closed, whether or not its card's class earns in it now: its
        usable and pending lots (not expired) summed. A debt is not netted against them (it
        is what the holder owes, not what it holds). One read of the programs (at most
        PAGE_LIMIT_MAX, as the expiry job reads them) and one of the holders' accounts."""
        out = dict.fromkeys(holders, 0)
        if not out:
            return out
        now = self.clock_ms()
        async with self.records.read() as uow:
            rows = await uow.find(PROGRAMS, order="code", limit=limits.PAGE_LIMIT_MAX)
            programs = [program_record(r).program for r in rows[: limits.PAGE_LIMIT_MAX]]
            wanted = [(program, holder) for program in programs for holder in sorted(out)]
            held = await _holdings(uow, wanted) if wanted else {}
        for (_asset, holder), holding in held.items():
            out[holder] += holding.usable(now) + holding.pending(now)
        return out

    async def forfeit(self, holder: int) -> int:
        """Every point the holder (a card's value account) still has, usable or pending, in
        any program, moved to its lot's legal entity's `points_forfeited` account: a card
        closed with its points given up (`CardService.close`, `forfeit_points`). The caller
        holds the card account's lock. The holder's accounts are read a page at a time
        (`POINTS_FORFEIT_LOTS_MAX`), each page's lots with points left in one submit; each
        lot goes under `forfeit/<lot account>/<its version>`, so a retry forfeits nothing
        twice. A debt stays. How many points went. The ledger busy or away raises its
        error (`Busy`, `LedgerUnavailable`): the close is retried."""
        total, after = 0, None
        while True:
            async with self.records.read() as uow:
                rows = await uow.find(
                    ACCOUNTS, {"owner_kind": OWNER_KIND, "owner_id": str(holder)},
                    after=after, limit=limits.POINTS_FORFEIT_LOTS_MAX,
                )  # fmt: skip
            page = rows[: limits.POINTS_FORFEIT_LOTS_MAX]
            total += await self._forfeit_lots(
                [r for r in page if r["purpose"].startswith(model.LOT_PREFIX) and available(r)]
            )
            if len(rows) <= limits.POINTS_FORFEIT_LOTS_MAX:
                return total
            after = page[-1]["id"]

    async def _forfeit_lots(self, lots: Sequence[dict[str, Any]]) -> int:
        if not lots:
            return 0
        wanted = [Wanted(r["legal_entity"], "entity", r["legal_entity"], "points_forfeited",
                         r["asset"]) for r in lots]  # fmt: skip
        into = await self.accounts.ensure(wanted)
        ops: list[Op] = [
            CreateTransfer(
                EXPIRY_CLIENT,
                f"forfeit/{r['id']}/{r['version']}",
                r["asset"],
                (
                    Posting(int(r["id"]), Side.DEBIT, available(r)),
                    Posting(forfeited, Side.CREDIT, available(r)),
                ),
                reason="points_forfeit",
            )
            for r, forfeited in zip(lots, into, strict=True)
        ]
        results = await self.ledger.submit(ops)  # Busy, LedgerUnavailable: retry
        refused = next((res.code for res in results if not res.ok), None)
        if refused is not None:  # nothing moves the lots under the lock: a defect, or a race
            raise Refused("conflict", "ledger_refused", f"the ledger refused it: {refused}")
        return sum(available(r) for r, res in zip(lots, results, strict=True) if not res.replayed)

    def _entity_account(self, program: model.Program, entity: str, purpose: str) -> Wanted:
        return Wanted(entity, "entity", entity, purpose, program.asset)

    def _lot_account(
        self, program: model.Program, entity: str, holder: int, purpose: str
    ) -> Wanted:
        return Wanted(entity, OWNER_KIND, str(holder), purpose, program.asset, NO_OVERDRAFT)

    def _debt_account(self, program: model.Program, entity: str, holder: int) -> Wanted:
        return Wanted(
            entity, OWNER_KIND, str(holder), model.DEBT_PURPOSE, program.asset, NO_OVERCREDIT
        )

    # --- earning ---------------------------------------------------------------------------

    async def _decide_earnings(
        self, items: Sequence[_ToPin], held: dict[tuple[str, int], Holding]
    ) -> list[_Pinned]:
        """Each item's earning as the rows to pin (0 points when it earns nothing: its spend
        is kept), from the holders' debts in `held` and one read of their tiers and the
        capped rules' points of the day (when the programs have them). Items are decided in
        order, each seeing the ones before it (caps, debt)."""
        now = self.clock_ms()
        holders = sorted({i.card.account_id for i in items})
        rules = [
            [
                rule
                for row, rule in await self._rules_of(i.found.code)
                if applies_at(row, i.terminal)
                and (not row["store"] or await self._store_granted(row["store"], i.found.code))
            ][: limits.POINTS_RULES_PER_PROGRAM_MAX]
            for i in items
        ]
        days = [day_number(i.found.program.timezone, now) for i in items]
        capped = sorted({r.code for rs in rules for r in rs if r.cap_per_day_points is not None})
        tiered = sorted({i.found.code for i in items if i.found.tiers is not None})
        tiers: dict[tuple[int, str], str] = {}
        today: dict[tuple[Any, ...], int] = {}
        debts = {key: holding.debt for key, holding in held.items()}
        if tiered or capped:
            async with self.records.read() as uow:
                if tiered:
                    for row in await uow.find(
                        HOLDERS, {"holder": holders, "program": tiered}, order="holder",
                        limit=len(holders) * len(tiered),
                    ):  # fmt: skip
                        tiers[int(row["holder"]), row["program"]] = row["tier"]
                if capped:
                    today = await uow.totals(
                        PARTS, "points", ("holder", "rule", "day"),
                        holder=holders, rule=capped, day=sorted(set(days)),
                    )  # fmt: skip
        out: list[_Pinned] = []
        for item, item_rules, day in zip(items, rules, days, strict=True):
            holder, program = item.card.account_id, item.found.program
            klass = await self.directory.card_class(item.card.class_code)
            class_pct = model.PCT if klass is None else klass.points_multiplier_pct
            tier = tiers.get((holder, item.found.code))
            policy = item.found.tiers
            tier_pct = next(
                (t.multiplier_pct for t in (policy.tiers if policy else ()) if t.code == tier),
                model.PCT,
            )
            earning = model.earn(
                program, item_rules, item.basket, now_ms=now, store=item.terminal.store,
                card_class_multiplier_pct=class_pct, tier_multiplier_pct=tier_pct,
                earned_today_by_rule={
                    r.code: today.get((holder, r.code, day), 0)
                    for r in item_rules if r.cap_per_day_points is not None
                },
            )  # fmt: skip
            if earning.points <= 0:  # pinned all the same: its spend counts (tiers, segments)
                out.append(_Pinned(_nothing_earned(item, holder, day, now), []))
                continue
            debt = debts.get((program.asset, holder), 0)
            repaid, _ = model.settle_debt(debt, earning.points)
            debts[program.asset, holder] = debt - repaid
            for part in earning.parts:
                today[holder, part.rule, day] = today.get((holder, part.rule, day), 0) + part.points
            row = {
                "key": item.key, "holder": holder, "program": item.found.code, "day": day,
                "points": earning.points, "debt_repaid": repaid,
                "amount": item.basket.amount_fen, "returned": 0, "clawed": 0,
                "lot": model.lot_purpose(program, now), "store": item.terminal.store,
                "source": item.source, "created_at_ms": now,
            }  # fmt: skip
            parts = [
                {"key": item.key, "rule": p.rule, "holder": holder, "day": day, "points": p.points}
                for p in earning.parts
            ]
            out.append(_Pinned(row, parts))
        return out

    async def _pin(
        self, items: Sequence[_ToPin]
    ) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Holding]]:
        """The earning pinned under each item's key: read back, or decided and written now
        (0 points where it earns nothing), and the holders' points before them: one read (the
        pinned keys looked up only for items whose money was not applied just now), one
        decision round, one insert of all (one statement on PostgreSQL). Two items never
        share a key (one request in flight per terminal)."""
        if not items:
            return [], {}
        again = [i.key for i in items if not i.fresh]
        async with self.records.read() as uow:
            rows = (
                await uow.find(EARNINGS, {"key": again}, order="key", limit=len(again))
                if again
                else []
            )
            held = await _holdings(uow, [(i.found.program, i.card.account_id) for i in items])
        pinned: dict[str, dict[str, Any]] = {r["key"]: r for r in rows}
        unpinned = [i for i in items if i.key not in pinned]
        writes = await self._decide_earnings(unpinned, held) if unpinned else []
        for item, new in zip(unpinned, writes, strict=True):
            pinned[item.key] = new.row
        if not writes:
            return [pinned[i.key] for i in items], held
        try:
            await self.records.insert_together({
                EARNINGS: [new.row for new in writes],
                PARTS: [part for new in writes for part in new.parts],
            })  # fmt: skip
        except Conflict:
            # Pinned at the same moment by another process: each on its own, what stands.
            for new in writes:
                try:
                    async with self.records.begin() as uow:
                        await uow.insert(EARNINGS, new.row)
                        await uow.insert(PARTS, new.parts)
                except Conflict:
                    async with self.records.read() as uow:
                        stood = await uow.get(EARNINGS, key=new.row["key"])
                    assert stood is not None  # the conflict was this key's row
                    pinned[new.row["key"]] = stood
        return [pinned[i.key] for i in items], held

    async def _period_value(
        self, found: ProgramRecord, policy: model.TierPolicy, holder: int, bounds: tuple[int, int]
    ) -> int:
        """The tier basis of a holder over [start, end): points earned (less clawbacks) or
        fen spent (less returns) in the program's local days of the period."""
        tz = found.program.timezone
        first, last = day_number(tz, bounds[0]), day_number(tz, bounds[1] - 1)
        async with self.records.read() as uow:
            rows = await uow.find(
                EARNINGS, {"holder": holder, "program": found.code}, order="key",
                at_least={"day": first}, limit=limits.POINTS_TIER_EARNINGS_READ_MAX,
            )  # fmt: skip
        rows = [r for r in rows if r["day"] <= last][: limits.POINTS_TIER_EARNINGS_READ_MAX]
        if policy.basis is model.TierBasis.POINTS_EARNED:
            return sum(int(r["points"]) - int(r["clawed"]) for r in rows)
        return sum(int(r["amount"]) - int(r["returned"]) for r in rows)

    async def _set_tier(
        self, found: ProgramRecord, holder: int, tier: model.Tier | None, now: int, *,
        reviewed: bool, unless_since: int | None = None,
    ) -> bool:  # fmt: skip
        """Record a holder's tier (and, for a period review, that it was reviewed now);
        whether the tier changed. `unless_since` (a review: its period's start): nothing
        when the row changed since (an upgrade at the POS while the review read the ended
        period), by a guarded update on the version read, so the review never undoes it."""
        code = "" if tier is None else tier.code
        async with self.records.begin() as uow:
            row = await uow.get(HOLDERS, holder=holder, program=found.code)
            if row is None:
                try:
                    await uow.insert(HOLDERS, {"holder": holder, "program": found.code,
                                               "tier": code, "tier_since_ms": now,
                                               "updated_at_ms": now})  # fmt: skip
                except Conflict:
                    return False  # made at the same moment: the next earning or review decides
                return True
            if unless_since is not None and int(row["updated_at_ms"]) >= unless_since:
                return False
            changes: dict[str, Any] = {"updated_at_ms": now} if reviewed else {}
            if row["tier"] != code:  # a change counts as this period's review: an upgrade
                # earned in a new period is never undone by the ended period's review
                changes |= {"tier": code, "tier_since_ms": now, "updated_at_ms": now}
            if not changes:
                return False
            where = {"holder": holder, "program": found.code}
            if unless_since is not None:  # as read: not changed by anyone since
                where["updated_at_ms"] = row["updated_at_ms"]
            return bool(await uow.update(HOLDERS, where, changes)) and row["tier"] != code

    async def _upgrade_by_spend(self, found: ProgramRecord, holder: int) -> None:
        """After a purchase that earned nothing: its spend may still reach a tier."""
        if found.tiers is not None and found.tiers.basis is model.TierBasis.SPEND_FEN:
            await self._upgrade(found, holder)

    async def _upgrade(self, found: ProgramRecord, holder: int) -> None:
        """After an earning: up at once when the period's value reaches a higher tier."""
        policy = found.tiers
        if policy is None:
            return
        now = self.clock_ms()
        bounds = model.period_bounds(policy, found.program.timezone, now)
        value = await self._period_value(found, policy, holder, bounds)
        async with self.records.read() as uow:
            row = await uow.get(HOLDERS, holder=holder, program=found.code)
        current = _tier_named(policy, "" if row is None else row["tier"])
        wanted = model.next_tier(current, value, at_period_end=False, policy=policy)
        if row is None or wanted != current:
            await self._set_tier(found, holder, wanted, now, reviewed=False)

    async def review_tiers(self, now_ms: int) -> int:
        """At a period's end (the first run after it): every holder not reviewed since the
        period began gets the tier the ended period's value qualifies for, under downgrade
        "period_end" (under "never", only ever up). How many tiers changed."""
        changed = 0
        async with self.records.read() as uow:
            programs = await uow.find(PROGRAMS, order="code", limit=limits.PAGE_LIMIT_MAX)
        for row in programs[: limits.PAGE_LIMIT_MAX]:
            found = program_record(row)
            policy = found.tiers
            if policy is None:
                continue
            period = model.period_bounds(policy, found.program.timezone, now_ms)
            start = period[0]
            previous = model.period_bounds(policy, found.program.timezone, start - 1)
            after = None
            while True:
                async with self.records.read() as uow:
                    holders = await uow.find(
                        HOLDERS, {"program": found.code}, order="holder", after=after,
                        limit=limits.POINTS_EXPIRY_PAGE_ROWS_MAX,
                    )  # fmt: skip
                page = holders[: limits.POINTS_EXPIRY_PAGE_ROWS_MAX]
                for h in page:
                    if int(h["updated_at_ms"]) >= start:
                        continue  # reviewed (or changed) in this period already
                    holder = int(h["holder"])
                    value = await self._period_value(found, policy, holder, previous)
                    current = _tier_named(policy, h["tier"])
                    wanted = model.next_tier(current, value, at_period_end=True, policy=policy)
                    # never below what the new period has earned already (before this run)
                    so_far = await self._period_value(found, policy, holder, period)
                    wanted = model.next_tier(wanted, so_far, at_period_end=False, policy=policy)
                    changed += await self._set_tier(
                        found, holder, wanted, now_ms, reviewed=True, unless_since=start
                    )
                if len(holders) <= limits.POINTS_EXPIRY_PAGE_ROWS_MAX:
                    break
                after = page[-1]["holder"]
        return changed

    async def _earn_ops(
        self, pinned: Sequence[tuple[dict[str, Any], Card, ProgramRecord, Metadata]]
    ) -> list[list[Op]]:
        """Each pinned earning's transfers (the accounts made in one ledger call when new):
        points_issued -> its lot under its key, and, when the holder owed points, the
        repayment lot -> debt under `key:d` (not linked: if a repayment were refused, the
        earning still lands and the debt stays)."""
        wanted = [
            [
                self._entity_account(found.program, card.legal_entity, "points_issued"),
                self._lot_account(found.program, card.legal_entity, card.account_id, row["lot"]),
                *(
                    [self._debt_account(found.program, card.legal_entity, card.account_id)]
                    if int(row["debt_repaid"])
                    else []
                ),
            ]
            for row, card, found, _ in pinned
        ]
        flat = [w for ws in wanted for w in ws]
        ids = dict(zip(flat, await self.accounts.ensure(flat), strict=True)) if flat else {}
        out = []
        for (row, _, found, metadata), ws in zip(pinned, wanted, strict=True):
            issued, lot, *debt = [ids[w] for w in ws]
            points, repaid = int(row["points"]), int(row["debt_repaid"])
            ops: list[Op] = [CreateTransfer(
                POS_CLIENT, row["key"], found.program.asset,
                (Posting(issued, Side.DEBIT, points), Posting(lot, Side.CREDIT, points)),
                reason="points_earn", metadata=metadata,
            )]  # fmt: skip
            if repaid:
                ops.append(CreateTransfer(
                    POS_CLIENT, row["key"] + DEBT_SUFFIX, found.program.asset,
                    (Posting(lot, Side.DEBIT, repaid), Posting(debt[0], Side.CREDIT, repaid)),
                    reason="points_repay", metadata=metadata,
                ))  # fmt: skip
            out.append(ops)
        return out

    async def _balance(self, found: ProgramRecord, holder: int) -> int:
        return (await self.holding(found.program, holder)).spendable(self.clock_ms(), found.program)

    async def _program(self, code: str) -> ProgramRecord | None:
        async with self.records.read() as uow:
            row = await uow.get(PROGRAMS, code=code)
        return None if row is None else program_record(row)

    async def after_money(self, done: Sequence[MoneyDone]) -> list[PointsAnswer | None]:
        """The points of a `PosService.handle` call's approved purchases, voids and refunds
        (ADR 0007: points after money, in the same call): the purchases' earnings pinned
        together first (a void in the call then finds its purchase's), every step in one
        ledger submit, each answer's balance worked out from the holdings read before."""
        out: list[PointsAnswer | None] = [None] * len(done)
        earning: list[tuple[int, _ToPin]] = []
        for i, d in enumerate(done):
            if d.request.kind is Kind.PURCHASE:
                found = await self._program_of_card(d.card)
                if found is not None:
                    basket = _basket(d.request, d.amount)
                    earn = d.key + EARN_SUFFIX
                    to_pin = _ToPin(earn, d.card, d.terminal, found, basket, d.key, d.fresh)
                    earning.append((i, to_pin))
        rows, held = await self._pin([item for _, item in earning])
        steps: list[tuple[int, list[Op], ProgramRecord, int, int]] = [
            (i, [], item.found, item.card.account_id, 0)
            for (i, item), row in zip(earning, rows, strict=True) if not _points_of(row)
        ]  # fmt: skip
        earned = [(i, item, row) for (i, item), row in zip(earning, rows, strict=True)
                  if _points_of(row)]  # fmt: skip
        for (_, item), row in zip(earning, rows, strict=True):
            if not _points_of(row):  # a spend tier counts it all the same
                await self._upgrade_by_spend(item.found, item.card.account_id)
        ops_of = await self._earn_ops([
            (row, item.card, item.found, _metadata(item.terminal, done[i].request))
            for i, item, row in earned
        ])  # fmt: skip
        lots = {}
        for (i, item, row), ops in zip(earned, ops_of, strict=True):
            steps.append((i, ops, item.found, item.card.account_id, int(row["points"])))
            lots[i] = row["lot"], int(row["debt_repaid"])
        claws = await self._claw_steps(done)
        steps += claws
        clawing = {(found.program.asset, holder) for _, _, found, holder, _ in claws}
        steps.sort(key=lambda step: step[0])
        submitted = [op for step in steps for op in step[1]]
        results = iter(await self.ledger.submit(submitted) if submitted else [])
        # The balance after each, in order: the holding read before, with what this call
        # added to a lot usable now (under the card's lock nothing else of this process
        # spends it). A holder with a clawback in the call is read again after the submit,
        # and each of its answers carries that balance.
        now = self.clock_ms()
        usable = {key: holding.usable(now) for key, holding in held.items()}
        owed = {key: holding.debt for key, holding in held.items()}
        reread = [(p, h) for p, h in {(f.program, h) for _, _, f, h, _ in steps}
                  if (p.asset, h) in clawing]  # fmt: skip
        for i, ops, found, holder, points in steps:
            got = [next(results) for _ in ops]
            res, rest = (got[0], got[1:]) if got else (None, [])
            if res is not None and not res.ok:
                # Not decided: the terminal is answered 96 and the request reversed (the
                # gateway's store and forward), which unpins what was pinned for it.
                log.warning("points step refused by the ledger", extra={"code": res.code})
                out[i] = PointsAnswer(None, None, ok=False)
                continue
            key = (found.program.asset, holder)
            if res is not None and points > 0:
                await self._upgrade(found, holder)
                lot, repaid = lots[i]
                landed = model.is_usable(model.lot_of(found.program, lot, 0), now)
                if not res.replayed and key not in clawing:
                    repaid = repaid if rest and rest[0].ok else 0
                    owed[key] -= repaid
                    if landed:
                        usable[key] += points - repaid
            balance = None if key in clawing else spendable(usable[key], owed[key], found.program)
            out[i] = PointsAnswer(points, balance)
        if reread:
            await self._balances_after(reread, steps, out, now)
        return out

    async def _balances_after(
        self, reread: list[tuple[model.Program, int]],
        steps: list[tuple[int, list[Op], ProgramRecord, int, int]],
        out: list[PointsAnswer | None], now: int,
    ) -> None:  # fmt: skip
        """The answers of holders with a clawback in the call: their balance read again."""
        again = await self.holdings(reread)
        for i, _, found, holder, points in steps:
            answer = out[i]
            if answer is not None and answer.ok and answer.points_balance is None:
                holding = again[found.program.asset, holder]
                out[i] = PointsAnswer(points, holding.spendable(now, found.program))

    async def _claw_steps(
        self, done: Sequence[MoneyDone]
    ) -> list[tuple[int, list[Op], ProgramRecord, int, int]]:
        """The clawbacks of the call's voids and refunds whose purchase earned."""
        steps: list[tuple[int, list[Op], ProgramRecord, int, int]] = []
        for i, d in enumerate(done):
            if d.request.kind is Kind.PURCHASE:
                continue
            pinned = await self._earning(d.original_key + EARN_SUFFIX)
            found = None if pinned is None else await self._program(pinned["program"])
            if pinned is None or found is None:
                continue
            returned = d.amount if d.request.kind is Kind.REFUND else None
            claw = await self._claw_earning(
                pinned, found, d.card.legal_entity, d.key + EARN_SUFFIX,
                _metadata(d.terminal, d.request), returned=returned,
            )  # fmt: skip
            if claw is not None:
                steps.append((i, claw[0], found, d.card.account_id, -claw[1]))
        return steps

    async def _earning(self, key: str) -> dict[str, Any] | None:
        async with self.records.read() as uow:
            return await uow.get(EARNINGS, key=key)

    async def _claw_earning(
        self, earning: dict[str, Any], found: ProgramRecord, entity: str, key: str,
        metadata: Metadata, *, returned: int | None,
    ) -> tuple[list[Op], int] | None:  # fmt: skip
        """Take back an earning's points under `key`: a return's proportional share
        (`returned` fen), or all it still holds (None: a void or reversal of the purchase).
        Pinned in points_clawbacks, with the earning's counters moved in the same
        transaction (a guarded update: two takers cannot both take the same points); the
        transfer takes from the lots as planned now, under the card account's lock. An
        earning that never reached the ledger is tombstoned instead, so it never will."""
        if not _points_of(earning):  # nothing issued: only its spend goes back (the fen)
            left = int(earning["amount"]) - int(earning["returned"])
            fen = left if returned is None else min(returned, left)
            await self._pin_clawback(key, earning, fen, 0, whole=False)
            return None
        if await self.directory.keyed_transfer(POS_CLIENT, earning["key"]) is None:
            # Never issued, and never will be: the whole earning goes (its counters, and
            # its day-cap parts negated), so no cap, tier or spend segment counts it.
            await self._pin_clawback(
                key, earning, int(earning["amount"]) - int(earning["returned"]),
                int(earning["points"]) - int(earning["clawed"]), whole=True,
            )  # fmt: skip
            op = Reverse(POS_CLIENT, key, earning["key"], tombstone=True,
                         reason="points_reversal", metadata=metadata)  # fmt: skip
            return [op], 0
        async with self.records.read() as uow:
            pinned = await uow.get(CLAWBACKS, key=key)
        if pinned is None:
            amount, before = int(earning["amount"]), int(earning["returned"])
            if returned is None:
                fen, points = amount - before, int(earning["points"]) - int(earning["clawed"])
            else:
                fen = min(returned, amount - before)
                points = model.proportional_clawback(
                    int(earning["points"]), amount, before, fen, int(earning["clawed"])
                )
            whole = returned is None and fen > 0  # a second whole take-back undoes nothing
            pinned = await self._pin_clawback(key, earning, fen, points, whole=whole)
            if pinned is None:
                return None
        points = int(pinned["points"])
        if points <= 0:
            return None
        stored, keys = await self._chunks(key)
        if stored:  # a resend: the same transfers again (the ledger replays them)
            return again(stored, POS_CLIENT, keys, metadata), points
        own = (earning["lot"],)
        claw = await self._claw(found, entity, int(earning["holder"]), key, points=points,
                                own=own, metadata=metadata)  # fmt: skip
        return claw, points

    async def _pin_clawback(
        self, key: str, earning: dict[str, Any], returned: int, points: int, *, whole: bool
    ) -> dict[str, Any] | None:
        """The clawback pinned under `key`, the earning's counters moved with it. A `whole`
        take-back (a void or a terminal's reversal of the purchase) also gives the earning's
        points back to the day caps of its rules: its parts again, negated, under `key` (a
        sale reversed and rung again earns within the cap as the first did)."""
        row = {"key": key, "earning": earning["key"], "returned": returned, "points": points,
               "debt": 0, "created_at_ms": self.clock_ms()}  # fmt: skip
        try:
            async with self.records.begin() as uow:
                await uow.insert(CLAWBACKS, row)
                if whole:
                    await _negate_parts(uow, earning["key"], key)
                changed = await uow.update(
                    EARNINGS,
                    {"key": earning["key"], "returned": earning["returned"],
                     "clawed": earning["clawed"]},
                    {"returned": ("+", returned), "clawed": ("+", points)},
                )  # fmt: skip
                if not changed:
                    _raced()
        except Conflict:
            async with self.records.read() as uow:
                return await uow.get(CLAWBACKS, key=key)
        return row

    async def _claw(
        self, found: ProgramRecord, entity: str, holder: int, key: str, *, points: int,
        own: Sequence[str], metadata: Metadata,
    ) -> list[Op]:  # fmt: skip
        """Take `points` back: `model.plan_clawback` over the holder's lots; the shortfall
        debits the holder's debt account; to points_clawed (in linked transfers of at most
        the ledger's legs each)."""
        program = found.program
        holding = await self.holding(program, holder)
        plan = model.plan_clawback(holding.lots, points, self.clock_ms(), own)
        clawed, debt = await self.accounts.ensure([
            self._entity_account(program, entity, "points_clawed"),
            self._debt_account(program, entity, holder),
        ])  # fmt: skip
        legs = [Posting(holding.ids[take.key], Side.DEBIT, take.points) for take in plan.takes]
        if plan.shortfall:
            legs.append(Posting(debt, Side.DEBIT, plan.shortfall))
        return split(POS_CLIENT, key, program.asset, legs, clawed, reason="points_clawback",
                     metadata=metadata)  # fmt: skip

    # --- POS: earning on another tender, redemption, reversal --------------------------------

    async def _still_usable(self, card: Card, *, giving_back: bool = False) -> PosResult | None:
        """Under the card account's lock: the card as the directory holds it now (every change
        of it, a member's delete closing it, a freeze, forgets it while it holds this lock),
        declined with the outcome of its state when it is gone or may no longer do this, as
        `PosService._still_usable` declines a purchase; None when it may go on."""
        outcome = unusable_outcome(await self.directory.card(card.token), giving_back=giving_back)
        return None if outcome is None else PosResult(outcome)

    async def pos_earn(self, r: PosRequest, t: Terminal, key: str, card: Card | None) -> PosResult:
        """Kind.POINTS_EARN: a purchase paid by another tender earns on `r.amount` under
        `K:p` like a purchase (no money moves); a resend gets the same answer. A terminal
        reversal takes it back like a purchase's (`reverse_pos`); one that overtook it left
        its tombstone under K (the POS host's reversal of K), which refuses it for ever."""
        if card is None or r.amount <= 0:
            return PosResult(Outcome.BAD_REQUEST)
        found = await self._program_of_card(card)
        if found is None:
            return PosResult(Outcome.NOT_PERMITTED, refusal="points_no_program")
        # Under the card's lock from the pin on: the day's caps count the earnings pinned
        # before, so two earnings of one card at once cannot both pass a cap.
        async with self.accounts.lock(card.account_id):
            declined = await self._still_usable(card)
            if declined is not None:
                return declined
            try:
                [row], _ = await self._pin(
                    [_ToPin(key + EARN_SUFFIX, card, t, found, _basket(r, r.amount), "")]
                )
            except model.PointsRefused as exc:
                return PosResult(Outcome.BAD_REQUEST, refusal=exc.code)
            if await self._tombstoned(key):  # checked after the pin: see reverse_pos
                return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL)
            if not _points_of(row):
                await self._upgrade_by_spend(found, card.account_id)
                balance = await self._balance(found, card.account_id)
                return PosResult(Outcome.APPROVED, points=0, points_balance=balance)
            [ops] = await self._earn_ops([(row, card, found, _metadata(t, r))])
            res, *_rest = await self.ledger.submit(ops)
        if res.ok:
            await self._upgrade(found, card.account_id)
        return await self._answer(res, found, card, int(row["points"]))

    async def pos_return(
        self, r: PosRequest, t: Terminal, key: str, card: Card | None
    ) -> PosResult:
        """Kind.POINTS_RETURN: goods of a POINTS_EARN come back. `r.rrn` names the earning
        (the 900000's reply F37: its transfer under `K:p`), `r.amount` the fen returned: its
        share of the earning's points (`model.proportional_clawback`, floored cumulatively)
        is taken back under `F2:p` as a refund's is (`_claw_earning`), all returns of one
        earning together at most its amount. A resend submits the pinned clawback again; a
        terminal reversal puts back exactly what it took (`reverse_pos`), and one that
        overtook it (F2's tombstone, the POS host's) refuses it for ever."""
        if card is None or r.amount <= 0 or not r.rrn:
            return PosResult(Outcome.BAD_REQUEST)
        original = await self.directory.transfer_by_id(int(r.rrn))
        earning = None
        if original is not None and original["reason"] == "points_earn":
            earning = await self._earning(original["key"])
        if earning is None or earning["source"]:  # a card purchase's earning: its refund
            return PosResult(Outcome.ORIGINAL_NOT_FOUND)
        if int(earning["holder"]) != card.account_id:
            return PosResult(Outcome.ORIGINAL_MISMATCH)
        found = await self._program(earning["program"])
        if found is None:
            return PosResult(Outcome.ORIGINAL_NOT_FOUND)
        claw_key = key + EARN_SUFFIX
        async with self.accounts.lock(card.account_id):
            declined = await self._still_usable(card, giving_back=True)
            if declined is not None:
                return declined
            earning = await self._earning(earning["key"])  # its counters, under the lock
            assert earning is not None  # an earning row is never deleted
            refused = await self._return_refused(r, key, earning)
            if refused is not None:
                return refused
            claw = await self._claw_earning(
                earning, found, card.legal_entity, claw_key, _metadata(t, r), returned=r.amount
            )
            if await self._tombstoned(key):  # checked after the pin: see reverse_pos
                await self._unpin_return(claw_key)
                return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL)
            if claw is None:  # a share of less than one point: nothing to take
                balance = await self._balance(found, card.account_id)
                return PosResult(Outcome.APPROVED, points=0, points_balance=balance)
            results = await self.ledger.submit(claw[0])
            failed = next((x for x in results if x.code != "linked_event_failed" and not x.ok),
                          None)  # fmt: skip
            if failed is not None:
                return await self._return_failed(failed, claw_key)
            return await self._answer(results[0], found, card, -claw[1])

    async def _return_failed(self, res: Result, claw_key: str) -> PosResult:
        """A POINTS_RETURN's clawback the ledger refused. After its terminal reversal (the
        reversal tombstoned `claw_key` before the return pinned): refused for ever, its pin
        undone. Else not decided (a lot moved meanwhile): `unavailable`, so the gateway
        reverses it, which undoes the pin (`reverse_pos`), and the terminal retries anew."""
        code = res.original_code if res.code == "id_already_failed" else res.code
        if code == "reversed_before_arrival":
            await self._unpin_return(claw_key)
            return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL, replayed=res.replayed)
        log.warning("points return refused by the ledger", extra={"code": code})
        return PosResult(Outcome.UNAVAILABLE)

    async def _return_refused(
        self, r: PosRequest, key: str, earning: dict[str, Any]
    ) -> PosResult | None:
        """Why a POINTS_RETURN under `key` of `earning` is refused, or None. A resend (its
        clawback pinned) must match it; a new return must not come after its own terminal
        reversal, nor of a reversed earning, nor past what is left of the earning."""
        async with self.records.read() as uow:
            pinned = await uow.get(CLAWBACKS, key=key + EARN_SUFFIX)
            earn_key = earning["key"].removesuffix(EARN_SUFFIX)
            undone = await uow.get(CLAWBACKS, key=earn_key + REVERSAL_SUFFIX + EARN_SUFFIX)
        if pinned is not None:
            if pinned["earning"] != earning["key"] or int(pinned["returned"]) != r.amount:
                return PosResult(Outcome.DUPLICATE_MISMATCH)
            return None
        if await self._tombstoned(key):
            return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL)
        if undone is not None:
            return PosResult(Outcome.ALREADY_REVERSED)
        if r.amount > int(earning["amount"]) - int(earning["returned"]):
            return PosResult(Outcome.REFUND_EXCEEDS_ORIGINAL,
                             refusal=model.RETURN_EXCEEDS_ORIGINAL)  # fmt: skip
        return None

    async def _unpin_return(self, claw_key: str) -> None:
        """A POINTS_RETURN its terminal reversed before it reached the ledger: the earning's
        counters moved back, once (`_unpin_clawback`; the reversal may have done it)."""
        async with self.records.read() as uow:
            pinned = await uow.get(CLAWBACKS, key=claw_key)
        if pinned is not None:
            undo = claw_key.removesuffix(EARN_SUFFIX) + REVERSAL_SUFFIX + EARN_SUFFIX
            await self._unpin_clawback(pinned, undo)

    async def pos_redeem(
        self, r: PosRequest, t: Terminal, key: str, card: Card | None
    ) -> PosResult:
        """Kind.POINTS_REDEEM: `r.points` (whole redemption blocks) pay `fen_for_points` of
        the bill. Two linked transfers: the points from the lots `plan_spend` chose to
        points_redeemed under `K:p`, and the money from the card entity's points_funding to
        the store's sales (through the clearing pair across entities) under K itself, which
        the terminal's reversal undoes (and tombstones when it overtakes)."""
        if card is None:
            return PosResult(Outcome.BAD_REQUEST)
        found = await self._program_of_card(card)
        if found is None:
            return PosResult(Outcome.NOT_PERMITTED, refusal="points_no_program")
        try:
            fen = model.fen_for_points(found.program, r.points, exact=True)
        except model.PointsRefused as exc:
            return PosResult(Outcome.BAD_REQUEST, refusal=exc.code)
        async with self.accounts.lock(card.account_id):
            declined = await self._still_usable(card)
            if declined is not None:
                return declined
            planned = await self._redeem_ops(r, t, key, card, found=found, fen=fen)
            if isinstance(planned, PosResult):
                return planned
            ops, before = planned
            results = await self.ledger.submit(ops)
        failed = next((x for x in results if x.code != "linked_event_failed" and not x.ok), None)
        # The balance after: what was usable before, less this spend (read again for a resend).
        after = None if before is None or results[-1].replayed else before - r.points
        answer = await self._answer(failed or results[-1], found, card, r.points, after)
        return replace(answer, amount=fen) if answer.outcome is Outcome.APPROVED else answer

    async def _redeem_ops(
        self, r: PosRequest, t: Terminal, key: str, card: Card, *, found: ProgramRecord, fen: int
    ) -> tuple[list[Op], int | None] | PosResult:
        """The redemption's transfers, and the points usable before it (None for a resend,
        which submits the stored transfers again)."""
        program, metadata = found.program, _metadata(t, r)
        points_key = key + EARN_SUFFIX
        before = None
        holding = await self._redeeming((program, card.account_id, key))
        if holding is None:  # a resend
            stored, keys = await self._chunks(points_key)
            stored_money = await self._full_transfer(key)
            assert stored
            assert stored_money is not None
            money = tuple(Posting(a, Side(s), x) for a, s, x in stored_money["postings"])
            points_ops = again(stored, POS_CLIENT, keys, metadata, link_last=True)
        else:
            before = holding.spendable(self.clock_ms(), program)
            try:
                takes = model.plan_spend(holding.lots, r.points, self.clock_ms(), holding.debt)
            except model.InsufficientPoints as exc:
                return PosResult(Outcome.INSUFFICIENT_FUNDS, refusal=exc.code,
                                 points_balance=exc.usable)  # fmt: skip
            [redeemed] = await self.accounts.ensure(
                [self._entity_account(program, card.legal_entity, "points_redeemed")]
            )
            legs = [Posting(holding.ids[take.key], Side.DEBIT, take.points) for take in takes]
            points_ops = split(POS_CLIENT, points_key, program.asset, legs, redeemed,
                               reason="points_redeem", metadata=metadata,
                               client_link_last=True)  # fmt: skip
            [funding] = await self.accounts.ensure(
                [Wanted(card.legal_entity, "entity", card.legal_entity, "points_funding")]
            )
            clearing = await self.accounts.clearing(card.legal_entity, t.legal_entity)
            money = tuple(
                Posting(a, Side(side), x)
                for a, side, x in value_postings(
                    source=funding, target=t.sales_account, amount=fen, clearing=clearing
                )
            )
        return [
            *points_ops,
            CreateTransfer(POS_CLIENT, key, CURRENCY, money, reason="points_redeem",
                           metadata=metadata),
        ], before  # fmt: skip

    async def _redeem_reads(
        self, asked: list[tuple[model.Program, int, str]]
    ) -> list[Holding | None]:
        """For each POS redemption (program, holder, POS key): None when both its transfers
        stand (a resend: they are linked, both or neither), else the holder's points. On
        one connection, for all of them: one read of their keys, one of the holdings."""
        keys = sorted({k for _, _, key in asked for k in (key + EARN_SUFFIX, key)})
        async with self.records.read() as uow:
            rows = await uow.find(
                "ledger_transfers", {"client": POS_CLIENT, "key": keys}, order="key",
                limit=len(keys),
            )  # fmt: skip
            stored = {row["key"] for row in rows}
            resends = {key for _, _, key in asked if {key, key + EARN_SUFFIX} <= stored}
            fresh = [(program, holder) for program, holder, key in asked if key not in resends]
            held = await _holdings(uow, fresh) if fresh else {}
        return [
            None if key in resends else held[program.asset, holder]
            for program, holder, key in asked
        ]

    async def _answer(
        self, res: Result, found: ProgramRecord, card: Card, points: int,
        balance: int | None = None,
    ) -> PosResult:  # fmt: skip
        if not res.ok:
            code = res.original_code if res.code == "id_already_failed" else res.code
            if code == "reversed_before_arrival":
                outcome = Outcome.REVERSED_BEFORE_ARRIVAL
            elif code == "exceeds_credits":
                outcome = Outcome.INSUFFICIENT_FUNDS
            elif (code or "").startswith("exists_with_different_"):
                outcome = Outcome.DUPLICATE_MISMATCH
            else:
                outcome = Outcome.BAD_REQUEST
            return PosResult(outcome, replayed=res.replayed)
        assert res.transfer_id is not None
        if res.replayed and await self.directory.undone(res.transfer_id):
            return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL, replayed=True)
        return PosResult(
            Outcome.APPROVED,
            points=points,
            points_balance=(
                await self._balance(found, card.account_id) if balance is None else balance
            ),
            rrn=rrn_of(res.transfer_id),
            auth_code=auth_code_of(res.transfer_id),
            replayed=res.replayed,
        )

    async def reverse_pos(self, t: Terminal, target_key: str) -> None:
        """A terminal's reversal of `target_key`: undo what stands under `target_key:p`,
        under `target_key/R:p`, at most once (the key): a purchase's earning is taken back
        whole (what refunds did not take already), a clawback or a redemption's points are
        put back exactly into the lots they came from (their mirrored legs). The POS host
        reversed `target_key` itself first (money, a redemption's money, a POINTS_EARN's
        tombstone) and calls this only once the ledger took that reversal."""
        key = target_key + EARN_SUFFIX
        undo = target_key + REVERSAL_SUFFIX + EARN_SUFFIX
        meta: Metadata = (("store", t.store), ("terminal", t.tid))
        earning = await self._earning(key)
        if earning is not None:
            await self._reverse_earning(earning, undo, meta)
            return
        async with self.records.read() as uow:
            clawback = await uow.get(CLAWBACKS, key=key)
        stored, _keys = await self._chunks(key)
        # Nothing under the key (yet): the tombstone makes a late earning or redemption
        # under it refused by the ledger, so a reversal that overtook its request is never
        # lost.
        ops: list[Op] = [
            replace(_mirror(t, chunk_key(undo, i), "points_reversal", meta),
                    linked=i < len(stored) - 1)
            for i, t in enumerate(stored)
        ] or [Reverse(POS_CLIENT, undo, key, tombstone=True, reason="points_reversal",
                      metadata=meta)]  # fmt: skip
        if clawback is None:
            if stored and stored[0]["reason"] != "points_redeem":
                return
            res, *_rest = await self.ledger.submit(ops)
        else:
            earning = await self._earning(clawback["earning"])
            if earning is None:
                return
            # Under the holder's lock from the unpin to the put-back's submit: an earning
            # that repays the debt cannot slip in between (the put-back would credit the
            # debt past what is owed and be refused, the clawback already unpinned).
            async with self.accounts.lock(int(earning["holder"])):
                if not await self._unpin_standing(clawback, earning, undo):
                    return
                if stored:
                    ops = await self._debt_aware(earning, ops)
                res, *_rest = await self.ledger.submit(ops)
        if not res.ok:
            log.warning("points reversal refused by the ledger", extra={"code": res.code})

    async def _debt_aware(self, earning: dict[str, Any], ops: list[Op]) -> list[Op]:
        """The put-back of a clawback of `earning`, what it recorded as debt given back to
        the debt only as far as the holder still owes it: a later earning may have repaid that debt
        since (a credit past the debt is refused: no-overcredit), and then those points
        go back to the earning's own lot instead."""
        found = await self._program(earning["program"])
        if found is None:
            return ops
        holder = int(earning["holder"])
        holding = await self.holding(found.program, holder)
        if holding.debt_id is None:
            return ops
        owed = holding.debt
        async with self.records.read() as uow:
            card = await uow.get("cards", account_id=holder)
        if card is None:
            return ops
        [lot] = await self.accounts.ensure([
            self._lot_account(found.program, card["legal_entity"], holder, earning["lot"])
        ])  # fmt: skip
        out: list[Op] = []
        for op in ops:
            if not isinstance(op, CreateTransfer):
                out.append(op)
                continue
            legs: list[Posting] = []
            for leg in op.postings:
                if leg.account_id != holding.debt_id or leg.side is not Side.CREDIT:
                    legs.append(leg)
                    continue
                back = min(leg.amount, owed)
                owed -= back
                legs += [Posting(a, Side.CREDIT, x) for a, x in
                         ((holding.debt_id, back), (lot, leg.amount - back)) if x]  # fmt: skip
            out.append(replace(op, postings=tuple(legs)))
        return out

    async def _reverse_earning(self, earning: dict[str, Any], undo: str, meta: Metadata) -> None:
        holder = int(earning["holder"])
        found = await self._program(earning["program"])
        async with self.records.read() as uow:
            card = await uow.get("cards", account_id=holder)
        if found is None or card is None:
            return
        async with self.accounts.lock(holder):
            claw = await self._claw_earning(
                earning, found, card["legal_entity"], undo, meta, returned=None
            )
            if claw is None:
                return
            res, *_rest = await self.ledger.submit(claw[0])
        if not res.ok:
            log.warning("points reversal refused by the ledger", extra={"code": res.code})

    async def _unpin_standing(
        self, clawback: dict[str, Any], earning: dict[str, Any], undo: str
    ) -> bool:
        """`_unpin_clawback` while the earning stands: once a terminal's reversal of the
        earning itself took back all it held (the return's share was taken already), a
        reversal of the return puts nothing back, as the money ledger never takes back a
        refund of a reversed purchase. The caller holds the holder's lock, which the
        earning's reversal holds too."""
        base = str(earning["key"]).removesuffix(EARN_SUFFIX)
        async with self.records.read() as uow:
            reversed_whole = await uow.get(CLAWBACKS, key=base + REVERSAL_SUFFIX + EARN_SUFFIX)
        if reversed_whole is not None:
            return False
        return await self._unpin_clawback(clawback, undo)

    async def _unpin_clawback(self, clawback: dict[str, Any], undo: str) -> bool:
        """Record that a clawback is undone: a row with its amounts negated under `undo`, and
        the earning's counters moved back, in one transaction. Whether there is anything
        to put back (False: a clawback of no points, whose returned fen alone go back, or
        nothing at all)."""
        if int(clawback["points"]) <= 0 and int(clawback["returned"]) <= 0:
            return False
        row = {
            "key": undo,
            "earning": clawback["earning"],
            "returned": -clawback["returned"],
            "points": -clawback["points"],
            "debt": 0,
            "created_at_ms": self.clock_ms(),
        }
        try:
            async with self.records.begin() as uow:
                await uow.insert(CLAWBACKS, row)
                await uow.update(
                    EARNINGS,
                    {"key": clawback["earning"]},
                    {"returned": ("+", row["returned"]), "clawed": ("+", row["points"])},
                )
                # A whole take-back gave the day caps back (its negated parts): undone too.
                await _negate_parts(uow, clawback["key"], undo)
        except Conflict:
            pass  # pinned before: the resend submits the same transfer again
        return int(clawback["points"]) > 0

    async def _tombstoned(self, key: str) -> bool:
        """Whether a terminal reversal of `key` arrived before anything was done under it."""
        async with self.records.read() as uow:
            failed = await uow.get("ledger_failures", client=POS_CLIENT, key=key)
        return failed is not None and failed["code"] == "reversed_before_arrival"

    async def _chunks(
        self, key: str, client: str = POS_CLIENT
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """The stored transfers of a multi-lot move under `key` (see `split`), and keys."""
        stored, keys = [], []
        for index in range(limits.POINTS_OPEN_LOTS_MAX):
            found = await self._full_transfer(chunk_key(key, index), client)
            if found is None:
                break
            stored.append(found)
            keys.append(chunk_key(key, index))
        return stored, keys

    async def _full_transfer(self, key: str, client: str = POS_CLIENT) -> dict[str, Any] | None:
        async with self.records.read() as uow:
            row = await uow.get("ledger_transfers", client=client, key=key)
        if row is None:
            return None
        legs = [(int(a), str(side), int(x)) for a, side, x in json.loads(row["postings"])]
        meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
        return {"asset": row["asset"], "reason": row["reason"], "postings": legs,
                "metadata": meta}  # fmt: skip

    # --- admin: rewards and transfers between members --------------------------------------

    async def redeem_reward(
        self, p: Principal, card_id: int, *, points: int, reward: str, key: str,
        coupon_campaign: str = "",
    ) -> dict[str, Any]:  # fmt: skip
        """Spend `points` of a card for a reward (a coupon, a gift card, goods; `reward` is
        its reference): from the lots `plan_spend` chooses to points_redeemed, idempotent by
        the caller's `key` (the same key and request answers the first result again). With
        `coupon_campaign`, one code of it is issued to the card's member under the same key
        (`RewardCoupons`) BEFORE the points move, and voided if the ledger refuses them: the
        code is answered only once the points are spent. A retry of a redemption that was
        made answers it again even if the card was frozen (or lost, closed) since: its
        points were spent while the card could spend them."""
        check_client_key(key)
        card, found = await self._card_and_program(p, card_id, Perm.POINTS_WRITE)
        if found is None or found.state != "active":
            raise Refused("conflict", "points_no_program", "the card earns in no active program")
        holder = int(card["account_id"])
        ledger_key = f"reward/{holder}/{key}"
        metadata: Metadata = (("external_ref", reward),)
        coupon: str | None = None
        async with self.accounts.lock(holder):
            stored, keys = await self._chunks(ledger_key, ADMIN_CLIENT)
            async with self.records.read() as uow:  # frozen, lost or closed meanwhile?
                now_card = await uow.get("cards", id=card_id)
            if not stored and (now_card is None or now_card["state"] != "active"):
                state = "closed" if now_card is None else now_card["state"]
                raise Refused("conflict", "card_state", f"the card is {state}")
            if stored:
                coupon = await self._same_redemption(stored, ledger_key, points, metadata,
                                                     coupon_campaign)  # fmt: skip
                results = await self._submit(again(stored, ADMIN_CLIENT, keys, metadata))
            else:
                # An earlier attempt under this key may have issued its code and then not
                # heard the ledger (503, a crash): that code is this redemption's, and goes
                # with it whenever the points are not spent now.
                prior = None
                if self.coupons is not None:
                    prior = await self.coupons.points_reward_of(ledger_key)
                if prior is not None and prior[0] != coupon_campaign:
                    raise Refused("conflict", "key_reused", "the key names another redemption",
                                  "key")  # fmt: skip
                assert now_card is not None  # refused above when it is not
                try:
                    ops = await self._reward_ops(found, card, ledger_key, points, metadata)
                    if coupon_campaign:
                        member = now_card["member_id"]
                        coupon = await self._coupons().points_reward_issue(
                            p, coupon_campaign, None if member is None else int(member),
                            ledger_key,
                        )  # fmt: skip
                    results = await self._submit(ops)
                except Refused:  # the points stay: the code (never answered) goes
                    if coupon is not None or prior is not None:
                        await self._coupons().points_reward_void(ledger_key)
                    raise
        first = results[0]
        place = Place(card["legal_entity"], card["store"])
        view = {"key": key, "card_id": card_id, "points": points, "reward": reward,
                "coupon_campaign": coupon_campaign or None, "coupon": coupon,
                "transfer_id": first.transfer_id, "replayed": first.replayed,
                "points_balance": await self._balance(found, holder)}  # fmt: skip
        if not first.replayed:
            await self._audit(p, "points.redeem", card_id, place, view)
        return view

    def _coupons(self) -> RewardCoupons:
        if self.coupons is None:
            raise Refused("invalid", "invalid_value", "coupons are not served here",
                          "coupon_campaign")  # fmt: skip
        return self.coupons

    async def _same_redemption(
        self, stored: list[dict[str, Any]], ledger_key: str, points: int, metadata: Metadata,
        coupon_campaign: str,
    ) -> str | None:  # fmt: skip
        """A redemption asked again under its key: the same one (else 409 `key_reused`), not
        reversed (else 409 `redemption_reversed`); the code it issued, if any."""
        issued = None
        if self.coupons is not None:
            issued = await self.coupons.points_reward_of(ledger_key)
        same = sum(x for *_, x in _credits(stored)) == points
        if (not same or _meta(stored[0]) != metadata
                or (issued[0] if issued else "") != coupon_campaign):  # fmt: skip
            raise Refused("conflict", "key_reused", "the key names another redemption", "key")
        undone, _ = await self._chunks(ledger_key + REVERSAL_SUFFIX, ADMIN_CLIENT)
        if undone:  # a retry must not hear that a reversed redemption stands
            raise Refused(
                "conflict", "redemption_reversed",
                "this redemption was reversed; redeem under a new key", "key",
            )  # fmt: skip
        return None if issued is None else issued[1]

    async def _reward_ops(
        self, found: ProgramRecord, card: dict[str, Any], ledger_key: str, points: int,
        metadata: Metadata,
    ) -> list[Op]:  # fmt: skip
        """The transfers of a new reward redemption (409 when the usable points are short)."""
        program, holder = found.program, int(card["account_id"])
        holding = await self.holding(program, holder)
        try:
            takes = model.plan_spend(holding.lots, points, self.clock_ms(), holding.debt)
        except model.PointsRefused as exc:
            raise Refused("conflict", exc.code, exc.message, "points") from None
        [redeemed] = await self.accounts.ensure(
            [self._entity_account(program, card["legal_entity"], "points_redeemed")]
        )
        legs = [Posting(holding.ids[t.key], Side.DEBIT, t.points) for t in takes]
        return split(ADMIN_CLIENT, ledger_key, program.asset, legs, redeemed,
                     reason="points_reward", metadata=metadata)  # fmt: skip

    async def reverse_reward(self, p: Principal, card_id: int, key: str) -> dict[str, Any]:
        """Undo a reward redemption: its points back into exactly the lots they came from
        (with their own expiry), once (the reversal's key is the redemption's plus "/R").
        The coupon it issued is voided first, while unused; a coupon already used (or held
        by a terminal) refuses the reversal, 409 `coupon_used`, nothing changed."""
        card, found = await self._card_and_program(p, card_id, Perm.POINTS_WRITE)
        if found is None or _CHUNK_SUFFIX.fullmatch(key):  # a part of a move is none
            raise Refused("not_found", "redemption_not_found", "no such redemption", "key")
        holder = int(card["account_id"])
        ledger_key = f"reward/{holder}/{key}"
        undo = ledger_key + REVERSAL_SUFFIX
        coupon = None
        async with self.accounts.lock(holder):
            stored, _keys = await self._chunks(ledger_key, ADMIN_CLIENT)
            if not stored:
                raise Refused("not_found", "redemption_not_found", "no such redemption", "key")
            coupons = self.coupons
            issued = None if coupons is None else await coupons.points_reward_of(ledger_key)
            if coupons is not None and issued is not None:
                coupon = issued[1]
                if not await coupons.points_reward_void(ledger_key):
                    raise Refused("conflict", "coupon_used",
                                  "the redemption's coupon was used: a reward given stays given",
                                  "key")  # fmt: skip
            metadata = _meta(stored[0])
            ops: list[Op] = [
                replace(_mirror(t, chunk_key(undo, i), "points_reward_reversal", metadata),
                        client=ADMIN_CLIENT, linked=i < len(stored) - 1)
                for i, t in enumerate(stored)
            ]  # fmt: skip
            results = await self._submit(ops)
        first = results[0]
        points = sum(x for _, _s, x in _credits(stored))
        view = {"key": key, "card_id": card_id, "points": points, "reversed": True,
                "coupon": coupon, "transfer_id": first.transfer_id,
                "replayed": first.replayed,
                "points_balance": await self._balance(found, holder)}  # fmt: skip
        if not first.replayed:
            place = Place(card["legal_entity"], card["store"])
            await self._audit(p, "points.redeem_reversal", card_id, place, view)
        return view

    async def transfer(
        self, p: Principal, card_id: int, *, to_card_id: int, points: int, key: str
    ) -> dict[str, Any]:
        """Give `points` of one card to another member's card in the same program, within
        the program's transfer policy (`model.check_transfer`: allowed, per transfer, per
        giving member and local day: what all of the member's cards gave that day; a
        bearer card is its own giver). The points keep their lots' expiry on the receiving
        side; across legal entities they pass the entities' points clearing pair. Under
        the account locks of the receiving card and of every card of the giving member
        (ascending, the one order: two of its cards never pass the day's limit together),
        where both cards' states are read again: a member's delete or a freeze that came
        first is seen."""
        check_client_key(key)
        card, found = await self._card_and_program(p, card_id, Perm.POINTS_WRITE)
        if found is None or found.state != "active":
            raise Refused("conflict", "points_no_program", "the card earns in no active program")
        program, giver = found.program, int(card["account_id"])
        ledger_key = f"gift/{giver}/{key}"
        async with self.records.read() as uow:
            done = await uow.get(TRANSFERS, key=ledger_key)
        if done is not None:  # made, its answer lost: answered again whatever the cards are now
            return await self._transfer_again(
                found, card, done, to_card_id=to_card_id, points=points, key=key
            )
        if card["state"] != "active":
            raise Refused("conflict", "card_state", f"the card is {card['state']}")
        to = await self._receiving(found, to_card_id)
        receiver = int(to["account_id"])
        if receiver == giver:
            raise Refused("invalid", "transfer_not_allowed", "a card gives to itself", "to_card_id")
        givers = await self._givers(card)
        now = self.clock_ms()
        day = day_number(program.timezone, now)
        async with contextlib.AsyncExitStack() as held:
            for account_id in sorted({*givers, receiver}):
                await held.enter_async_context(self.accounts.lock(account_id))
            async with self.records.read() as uow:
                card = await _card_row(uow, card_id)
                to = await _card_row(uow, to_card_id)
                done = await uow.get(TRANSFERS, key=ledger_key)
                today = await uow.total(  # this program's day: another program's is its own
                    TRANSFERS, "points", from_holder=givers, day=day, program=found.code
                )
            if done is not None:  # made by a request with this key that held the locks first
                return await self._transfer_again(
                    found, card, done, to_card_id=to_card_id, points=points, key=key
                )
            _refuse_moved(card, to)
            refusal = model.check_transfer(program, points, today)
            if refusal is not None:
                raise Refused("conflict", refusal, "the program's transfer policy refuses it",
                              "points")  # fmt: skip
            ops = await self._transfer_ops(found, card, to, ledger_key, points=points, now=now)
            results = await self._submit(ops)
            async with self.records.begin() as uow:
                await uow.insert(TRANSFERS, {
                    "key": ledger_key, "program": found.code, "from_holder": giver,
                    "to_holder": receiver, "day": day, "points": points, "created_at_ms": now,
                })  # fmt: skip
        view = {"key": key, "card_id": card_id, "to_card_id": to_card_id, "points": points,
                "transfer_id": results[0].transfer_id, "replayed": False,
                "points_balance": await self._balance(found, giver)}  # fmt: skip
        await self._audit(p, "points.transfer", card_id,
                          Place(card["legal_entity"], card["store"]), view)  # fmt: skip
        return view

    async def _transfer_again(
        self, found: ProgramRecord, card: dict[str, Any], done: dict[str, Any], *,
        to_card_id: int, points: int, key: str,
    ) -> dict[str, Any]:  # fmt: skip
        """A transfer asked again under its key: the same one (else 409 `key_reused`),
        answered as it was made, even when either card was frozen, lost or closed since: its
        points moved while both could move them. Its transfers are submitted again, and the
        ledger answers them as replays."""
        async with self.records.read() as uow:
            to = await uow.get("cards", id=to_card_id)
        if to is None or (int(done["points"]), int(done["to_holder"])) != (
            points, int(to["account_id"])
        ):  # fmt: skip
            raise Refused("conflict", "key_reused", "the key names another transfer", "key")
        stored, keys = await self._chunks(done["key"], ADMIN_CLIENT)
        results = await self._submit(again(stored, ADMIN_CLIENT, keys, ()))
        giver = int(card["account_id"])
        return {"key": key, "card_id": int(card["id"]), "to_card_id": to_card_id,
                "points": points, "transfer_id": results[0].transfer_id, "replayed": True,
                "points_balance": await self._balance(found, giver)}  # fmt: skip

    async def _givers(self, card: dict[str, Any]) -> list[int]:
        """The holders whose transfers count against a giving card's daily limit: the
        accounts of every card of its member (at most `POINTS_MEMBER_CARDS_READ_MAX`), or
        the card's own for a bearer card."""
        own = int(card["account_id"])
        if card["member_id"] is None:
            return [own]
        async with self.records.read() as uow:
            rows = await uow.find(
                "cards", {"member_id": int(card["member_id"])}, order="id",
                limit=limits.POINTS_MEMBER_CARDS_READ_MAX,
            )  # fmt: skip
        return sorted({own, *(int(r["account_id"]) for r in rows)})

    async def _receiving(self, found: ProgramRecord, to_card_id: int) -> dict[str, Any]:
        """The receiving card of a transfer in `found`'s program: 404 `card_not_found`, 409
        `transfer_not_allowed` when it is in another program (or none) or not active."""
        async with self.records.read() as uow:
            to = await uow.get("cards", id=to_card_id)
            to_class = None if to is None else await uow.get("card_classes", code=to["class_code"])
        if to is None or to_class is None:
            raise Refused("not_found", "card_not_found", "no such card", "to_card_id")
        if to_class["points_program"] != found.code or to["state"] != "active":
            raise Refused(
                "conflict", "transfer_not_allowed", "the receiving card is not in this program",
                "to_card_id",
            )  # fmt: skip
        return to

    async def _transfer_ops(
        self, found: ProgramRecord, card: dict[str, Any], to: dict[str, Any], key: str, *,
        points: int, now: int,
    ) -> list[Op]:  # fmt: skip
        program = found.program
        giver, receiver = int(card["account_id"]), int(to["account_id"])
        owing, owed = card["legal_entity"], to["legal_entity"]
        holding = await self.holding(program, giver)
        try:
            takes = model.plan_spend(holding.lots, points, now, holding.debt)
        except model.PointsRefused as exc:
            raise Refused("conflict", exc.code, exc.message, "points") from None
        lots = await self.accounts.ensure(
            [self._lot_account(program, owed, receiver, t.key) for t in takes]
        )
        clearing = None
        if owing != owed:
            clearing = await self.accounts.ensure([
                Wanted(owing, "entity", owed, "points_due_to", program.asset),
                Wanted(owed, "entity", owing, "points_due_from", program.asset),
            ])  # fmt: skip
        ops: list[Op] = []
        step = DEBITS_PER_TRANSFER_MAX // 2 - 1  # lots out, lots in, the clearing pair
        for index in range(0, len(takes), step):
            part = list(zip(takes[index : index + step], lots[index : index + step], strict=True))
            moved = sum(t.points for t, _ in part)
            legs = [Posting(holding.ids[t.key], Side.DEBIT, t.points) for t, _ in part]
            if clearing is not None:
                legs += [Posting(clearing[0], Side.CREDIT, moved),
                         Posting(clearing[1], Side.DEBIT, moved)]  # fmt: skip
            legs += [Posting(lot, Side.CREDIT, t.points) for t, lot in part]
            chunk = chunk_key(key, index // step)
            ops.append(CreateTransfer(ADMIN_CLIENT, chunk, program.asset, tuple(legs),
                                      reason="points_transfer", linked=True))  # fmt: skip
        last = ops[-1]
        assert isinstance(last, CreateTransfer)
        ops[-1] = replace(last, linked=False)
        return ops

    async def _submit(self, ops: Sequence[Op]) -> list[Result]:
        """Submit an admin move: 503 when the ledger cannot take it now, 409 when it refuses."""
        try:
            results = await self.ledger.submit(ops)
        except (Busy, LedgerUnavailable) as exc:
            raise PointsUnavailable(str(exc)) from None
        failed = next((r for r in results if not r.ok and r.code != "linked_event_failed"), None)
        if failed is not None:
            code = failed.original_code if failed.code == "id_already_failed" else failed.code
            if code == "exceeds_credits":
                raise Refused("conflict", model.POINTS_INSUFFICIENT, "the lots moved meanwhile",
                              "points")  # fmt: skip
            raise Refused("conflict", "ledger_refused", f"the ledger refused it: {code}")
        return results

    async def _audit(
        self, p: Principal, action: str, card_id: int, place: Place, view: dict[str, Any]
    ) -> None:
        async with self.records.begin() as uow:
            await uow.audit(p, action=action, kind="card", object_id=card_id, place=place,
                            before=None, after=view, now_ms=self.clock_ms())  # fmt: skip

    # --- expiry ------------------------------------------------------------------------------

    async def expire(self, now_ms: int, remind_days: int) -> dict[str, int]:
        """Expire every lot whose expiry passed at `now_ms` (in its program's time zone):
        its points go to the entity's points_expired account under the key
        `expire/<lot account>/<its version>`, so a second run, or one racing a spend, never
        takes twice (a spend since moves the version on; a stale transfer fails on the
        lot's no-overdraft floor and the next run takes what is left).

        Notices go into the members' outbox per holder, program and expiry day, however
        many lots (one per earning day under a return window or a fixed date) the day has:
        one "points_expired" notice of what the run expired, under
        `points_expired/<holder>/<program>/<YYYYMMDD>`, and one "points_expiring" reminder
        of the points of lots expiring within `remind_days` days, under
        `points_expiring/<holder>/<program>/<YYYYMMDD>/<remind_days>`. A notice follows
        its transfers: a crash between them loses that notice, never doubles it. Its key
        is written once: a later run that expires more of that day (a spend's stale
        transfer retried, points put back into an expired lot) or two runs at once write
        no second notice, and the figure of the one written leaves that part out."""
        if not 0 <= remind_days <= limits.POINTS_REMINDER_DAYS_MAX:
            raise ValueError(f"remind_days is 0..{limits.POINTS_REMINDER_DAYS_MAX}")
        totals = {"lots_expired": 0, "points_expired": 0, "reminders": 0, "failed": 0}
        run = _Run(now_ms, remind_days, totals)
        async with self.records.read() as uow:
            programs = await uow.find(PROGRAMS, order="code", limit=limits.PAGE_LIMIT_MAX)
        for row in programs[: limits.PAGE_LIMIT_MAX]:
            await self._expire_program(program_record(row), run)
        totals["tiers_changed"] = await self.review_tiers(now_ms)
        return totals

    async def expire_on_schedule(self, first_s: float, every_s: float, remind_days: int) -> None:
        """The expiry job inside the server: `expire` after `first_s` seconds, then every
        `every_s`, until cancelled. A run that fails (the database away) is logged and the
        next one takes what it left: every expiry and notice is idempotent."""
        await asyncio.sleep(first_s)
        while True:
            try:
                totals = await self.expire(self.clock_ms(), remind_days)
            except (*DATABASE_ERRORS, AccountsUnavailable, Busy, LedgerUnavailable):
                log.exception("scheduled points expiry failed; the next run retries")
            else:
                if totals["lots_expired"] or totals["reminders"] or totals["tiers_changed"]:
                    log.info("points expiry ran", extra=totals)
            await asyncio.sleep(every_s)

    async def _expire_program(self, found: ProgramRecord, run: _Run) -> None:
        """The program's lot accounts a page at a time in (holder, id) order
        (`schema.holder_accounts_select`): a holder's lots come one after the other, over
        pages too, so the holder's notices are written when the next holder begins, and
        what is kept meanwhile is one holder's."""
        holder = ""
        due: dict[tuple[str, str], _Due] = {}
        params = {"asset": found.program.asset, "owner_kind": OWNER_KIND, "holder": "",
                  "after": 0, "limit": limits.POINTS_EXPIRY_PAGE_ROWS_MAX + 1}  # fmt: skip
        try:
            while True:
                async with self.records.read() as uow:
                    rows = await uow.select_all(
                        "points_holder_accounts", schema.holder_accounts_select, params
                    )
                page = rows[: limits.POINTS_EXPIRY_PAGE_ROWS_MAX]
                for row in page:
                    if row["owner_id"] != holder:
                        await self._notify(found, holder, due, run)
                        holder, due = row["owner_id"], {}
                    if row["purpose"].startswith(model.LOT_PREFIX) and available(row) > 0:
                        await self._expire_lot(found, row, due, run)
                if len(rows) <= limits.POINTS_EXPIRY_PAGE_ROWS_MAX:
                    break
                params |= {"holder": page[-1]["owner_id"], "after": page[-1]["id"]}
        except Exception:
            # A run stopped half way through a holder (the ledger busy, the database away):
            # what it expired of that holder is told now, as far as it can be. The next run
            # finds those lots empty and could not count them again. (A run cancelled by the
            # server's shutdown does no more database work: that notice is lost, not doubled.)
            with contextlib.suppress(Exception):
                await self._notify(found, holder, due, run)
            raise
        await self._notify(found, holder, due, run)

    async def _expire_lot(
        self, found: ProgramRecord, row: dict[str, Any], due: dict[tuple[str, str], _Due],
        run: _Run,
    ) -> None:  # fmt: skip
        """Expire the lot if its expiry passed, and count its points into its holder's
        notice of its kind and expiry day (`due`): expired (once its transfer applied, or
        was applied before) or expiring within `remind_days` days."""
        program = found.program
        lot = model.lot_of(program, row["purpose"], available(row))
        if model.expire([lot], run.now_ms):
            [expired] = await self.accounts.ensure(
                [self._entity_account(program, row["legal_entity"], "points_expired")]
            )
            account_id, version = int(row["id"]), int(row["version"])
            op = CreateTransfer(
                EXPIRY_CLIENT, f"expire/{account_id}/{version}", program.asset,
                (Posting(account_id, Side.DEBIT, lot.remaining),
                 Posting(expired, Side.CREDIT, lot.remaining)),
                reason="points_expire",
            )  # fmt: skip
            [res] = await self.ledger.submit([op])
            if not res.ok:
                run.totals["failed"] += 1  # a spend moved the lot meanwhile: the next run
                return
            if not res.replayed:
                run.totals["lots_expired"] += 1
                run.totals["points_expired"] += lot.remaining
            kind = "points_expired"
        elif model.expiring_within([lot], run.now_ms, run.remind_days):
            kind = "points_expiring"
        else:
            return
        assert lot.expires_ms is not None
        day = due.setdefault((kind, model.lot_expiry_day(lot.key)), _Due(lot.expires_ms))
        day.points += lot.remaining
        day.lots += 1

    async def _notify(
        self, found: ProgramRecord, holder: str, due: dict[tuple[str, str], _Due], run: _Run
    ) -> None:
        """A holder's notices of the program, one per kind and expiry day (`expire`)."""
        for (kind, day), what in sorted(due.items()):
            key = f"{kind}/{holder}/{found.code}/{day}"
            if kind == "points_expiring":
                key += f"/{run.remind_days}"
            payload = {"program": found.code, "points": what.points, "lots": what.lots,
                       "expires_at_ms": what.expires_ms}  # fmt: skip
            written = await self._notice(key, kind, int(holder), payload, run.now_ms)
            if written and kind == "points_expiring":
                run.totals["reminders"] += 1

    async def _notice(
        self, key: str, kind: str, holder: int, payload: dict[str, Any], now_ms: int
    ) -> bool:
        """One notice in the members' outbox; False when its key was written before."""
        async with self.records.read() as uow:
            cards = await uow.find("cards", {"account_id": holder}, limit=limits.PAGE_LIMIT_MAX)
        live = [c for c in cards if c["state"] not in ("replaced", "closed")] or cards
        member = next((c["member_id"] for c in live if c["member_id"] is not None), None)
        row = {"key": key, "kind": kind, "member_id": member, "holder": holder,
               "payload": json.dumps(payload, sort_keys=True), "created_at_ms": now_ms,
               "sent_at_ms": None}  # fmt: skip
        try:
            async with self.records.begin() as uow:
                await uow.insert("member_notices", row)
        except Conflict:
            return False
        return True

    # --- reads -------------------------------------------------------------------------------

    async def _card_and_program(
        self, p: Principal, card_id: int, perm: Perm
    ) -> tuple[dict[str, Any], ProgramRecord | None]:
        """A card in the principal's scope (404, 403) and its class's program, if any."""
        require(p, perm)
        async with self.records.read() as uow:
            card = await uow.get("cards", id=card_id)
        if card is None:
            raise Refused("not_found", "card_not_found", "no such card", "card_id")
        require(p, perm, Place(card["legal_entity"], card["store"]))
        async with self.records.read() as uow:
            klass = await uow.get("card_classes", code=card["class_code"])
            row = None
            if klass is not None and klass["points_program"]:
                row = await uow.get(PROGRAMS, code=klass["points_program"])
        return card, None if row is None else program_record(row)

    async def points_history(
        self, p: Principal, card_id: int, after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """The journal lines of the card's points accounts (its lots and its debt), newest
        first: what each earning, spend, clawback, expiry and reversal moved, and where."""
        card, found = await self._card_and_program(p, card_id, Perm.LOYALTY_READ)
        if found is None:
            return []
        async with self.records.read() as uow:
            accounts = await uow.find(
                ACCOUNTS,
                {"owner_kind": OWNER_KIND, "owner_id": str(card["account_id"]),
                 "asset": found.program.asset},
                limit=limits.POINTS_OPEN_LOTS_MAX,
            )  # fmt: skip
            purposes = {int(a["id"]): a["purpose"] for a in accounts}
            if not purposes:
                return []
            entries = await uow.find(
                "ledger_entries", {"account_id": sorted(purposes)}, after=after, limit=limit,
                descending=True,
            )  # fmt: skip
            ids = sorted({int(e["transfer_id"]) for e in entries})
            transfers = {
                int(t["id"]): t
                for t in await uow.find("ledger_transfers", {"id": ids}, limit=len(ids))
            }
        return [_history_view(e, transfers[int(e["transfer_id"])], purposes) for e in entries]

    async def card_points(self, p: Principal, card_id: int) -> dict[str, Any]:
        """A card's points: its balance, usable, pending, debt, lots and tier."""
        card, _found = await self._card_and_program(p, card_id, Perm.LOYALTY_READ)
        return await self._points_view(card)

    async def member_points(self, p: Principal, member_id: int) -> dict[str, Any]:
        """A member's points over its live cards: each card's view, and per program the sum
        (cards sharing one account, a replaced card and its successor, count once)."""
        require(p, Perm.LOYALTY_READ)
        async with self.records.read() as uow:
            member = await uow.get("members", id=member_id)
        if member is None:
            raise Refused("not_found", "member_not_found", "no such member", "member_id")
        require(p, Perm.LOYALTY_READ, Place(member["legal_entity"], member["home_store"]))
        async with self.records.read() as uow:
            cards = await uow.find("cards", {"member_id": member_id}, limit=limits.PAGE_LIMIT_MAX)
        dead = ("replaced", "closed")
        live = [c for c in cards[: limits.PAGE_LIMIT_MAX] if c["state"] not in dead]
        views, seen = [], set()
        totals: dict[str, dict[str, int]] = {}
        for card in live:
            if int(card["account_id"]) in seen:
                continue
            seen.add(int(card["account_id"]))
            view = await self._points_view(card)
            views.append(view)
            if view["program"] is not None:
                total = totals.setdefault(view["program"], dict.fromkeys(_SUMMED, 0))
                for name in _SUMMED:
                    total[name] += view[name]
        programs = [{"program": code, **total} for code, total in sorted(totals.items())]
        return {"member_id": member_id, "programs": programs, "cards": views}

    async def _points_view(self, card: dict[str, Any]) -> dict[str, Any]:
        card_id = int(card["id"])
        async with self.records.read() as uow:
            klass = await uow.get("card_classes", code=card["class_code"])
            row = None
            if klass is not None and klass["points_program"]:
                row = await uow.get(PROGRAMS, code=klass["points_program"])
        if row is None:
            return {"card_id": card_id, "program": None, "balance": 0, "usable": 0,
                    "pending": 0, "debt": 0, "tier": None, "lots": []}  # fmt: skip
        found = program_record(row)
        holder, now = int(card["account_id"]), self.clock_ms()
        holding = await self.holding(found.program, holder)
        total = sum(lot.remaining for lot in holding.lots if not model.is_expired(lot, now))
        negative = found.program.negative_policy is model.NegativePolicy.NEGATIVE
        async with self.records.read() as uow:
            tier = await uow.get(HOLDERS, holder=holder, program=found.code)
        return {
            "card_id": card_id,
            "program": found.code,
            "balance": total - holding.debt if negative else total,
            "usable": holding.usable(now),
            "pending": holding.pending(now),
            "debt": holding.debt,
            "tier": tier["tier"] or None if tier else None,
            "lots": [_lot_view(lot, found.program) for lot in sorted(
                holding.lots, key=lambda x: (x.expires_ms is None, x.expires_ms or 0, x.key))
                if lot.remaining > 0 and not model.is_expired(lot, now)],
        }  # fmt: skip


_SUMMED = ("balance", "usable", "pending", "debt")


def _history_view(e: dict[str, Any], t: dict[str, Any], purposes: dict[int, str]) -> dict[str, Any]:
    purpose = purposes[int(e["account_id"])]
    amount = abs(int(e["posted_delta"]))
    debt = purpose == model.DEBT_PURPOSE
    # A lot gains on a credit; a debt grows on a debit.
    gained = (e["side"] == "credit") != debt
    return {
        "id": int(e["id"]),
        "transfer_id": int(e["transfer_id"]),
        "reason": t["reason"],
        "account": "debt" if debt else purpose,
        "points": amount if gained else -amount,
        "at_ms": int(t["created_at_ms"]),
    }


def _lot_view(lot: model.Lot, program: model.Program) -> dict[str, Any]:
    _, expires, usable = lot.key.split(":")
    return {
        "lot": lot.key,
        "remaining": lot.remaining,
        "expires_on": None if expires == "never" else f"{expires[:4]}-{expires[4:6]}-{expires[6:]}",
        "usable_from": None if usable == "0" else f"{usable[:4]}-{usable[4:6]}-{usable[6:]}",
        "expires_at_ms": lot.expires_ms,
        "available_at_ms": lot.available_ms,
    }


def _meta(stored: dict[str, Any]) -> Metadata:
    raw = stored["metadata"] or {}
    pairs = raw.items() if isinstance(raw, dict) else raw
    return tuple(sorted((str(k), str(v)) for k, v in pairs))


def _credits(stored: Sequence[dict[str, Any]]) -> list[tuple[int, str, int]]:
    return [leg for t in stored for leg in t["postings"] if leg[1] == "credit"]


def _tier_named(policy: model.TierPolicy, code: str) -> model.Tier | None:
    return next((t for t in policy.tiers if t.code == code), None)


async def _card_row(uow: Unit, card_id: int) -> dict[str, Any]:
    row = await uow.get("cards", id=card_id)
    assert row is not None  # a card is never deleted
    return row


def _refuse_moved(card: dict[str, Any], to: dict[str, Any]) -> None:
    """A transfer's cards read again under their locks: 409 `card_state` when the giving card
    is no longer active, `transfer_not_allowed` when the receiving one is not (a member's
    delete closed it, an officer froze it, while the transfer waited for the locks)."""
    if card["state"] != "active":
        raise Refused("conflict", "card_state", f"the card is {card['state']}")
    if to["state"] != "active":
        raise Refused("conflict", "transfer_not_allowed",
                      f"the receiving card is {to['state']}", "to_card_id")  # fmt: skip


def _raced() -> None:
    raise Conflict(EARNINGS)


def _points_of(row: dict[str, Any]) -> int:
    """The points an earning row issued (0: it earned nothing, only its spend counts)."""
    return int(row["points"])


async def _negate_parts(uow: Unit, of: str, key: str) -> None:
    """The day-cap parts under `of` written again negated under `key` (none: nothing)."""
    parts = await uow.find(PARTS, {"key": of}, order="rule",
                           limit=limits.POINTS_RULES_PER_PROGRAM_MAX)  # fmt: skip
    if parts:
        await uow.insert(PARTS, [{**p, "key": key, "points": -int(p["points"])} for p in parts])


def _nothing_earned(item: _ToPin, holder: int, day: int, now: int) -> dict[str, Any]:
    """The earning row of a purchase in a program that earned no points (under a rule's
    minimum, out of its windows or categories): nothing is issued, but its spend is kept for
    the tier basis and the coupon segments by spend."""
    return {
        "key": item.key, "holder": holder, "program": item.found.code, "day": day,
        "points": 0, "debt_repaid": 0, "amount": item.basket.amount_fen, "returned": 0,
        "clawed": 0, "lot": model.lot_purpose(item.found.program, now),
        "store": item.terminal.store, "source": item.source, "created_at_ms": now,
    }  # fmt: skip


def _basket(r: PosRequest, amount: int) -> model.Basket:
    """The bill an earning looks at: the request's department (and category) lines when
    they fit in the amount, else the whole amount as one line."""
    lines = tuple(model.Line(*line_parts(label), fen) for label, fen in r.basket)
    if sum(line.amount_fen for line in lines) > amount:
        lines = ()
    return model.Basket(amount, lines)


async def _holdings(
    uow: Unit, wanted: Sequence[tuple[model.Program, int]]
) -> dict[tuple[str, int], Holding]:
    programs = {program.asset: program for program, _ in wanted}
    keys = {(program.asset, holder) for program, holder in wanted}
    # Each holder's accounts by a probe of its own: at most the bound (+1: it is reached)
    # for each program asked, so one program's lots never crowd out another's; a holder's
    # accounts of a program asked for another holder only are skipped below.
    rows = await uow.find_each(
        ACCOUNTS, "owner_id", [str(h) for _, h in keys],
        {"owner_kind": OWNER_KIND, "asset": sorted(programs)},
        limit_each=(limits.POINTS_OPEN_LOTS_MAX + 1) * len(programs),
    )  # fmt: skip
    lots: dict[tuple[str, int], list[model.Lot]] = {k: [] for k in keys}
    ids: dict[tuple[str, int], dict[str, int]] = {k: {} for k in keys}
    debts: dict[tuple[str, int], tuple[int, int]] = {}
    for row in rows:
        key = (row["asset"], int(row["owner_id"]))
        if key not in keys:
            continue  # another program of one holder, the same program of another
        purpose = row["purpose"]
        if purpose == model.DEBT_PURPOSE:
            debts[key] = (owed(row), int(row["id"]))
        elif purpose.startswith(model.LOT_PREFIX):
            lots[key].append(model.lot_of(programs[key[0]], purpose, available(row)))
            ids[key][purpose] = int(row["id"])
    out = {}
    for key in keys:
        debt, debt_id = debts.get(key, (0, None))
        out[key] = Holding(tuple(lots[key]), ids[key], debt, debt_id)
    return out


async def _program_row(uow: Unit, code: str, field: str = "code") -> dict[str, Any]:
    row = await uow.get(PROGRAMS, code=code)
    if row is None:
        raise Refused("not_found", "program_not_found", "no such points program", field)
    return row


async def _rule_row(uow: Unit, program: str, code: str) -> dict[str, Any]:
    row = await uow.get(RULES, program=program, code=code)
    if row is None:
        raise Refused("not_found", "rule_not_found", "no such earning rule", "code")
    return row


def _require_group(p: Principal, perm: Perm) -> None:
    require(p, perm)
    if p.scope.kind is not ScopeKind.GROUP:
        raise Refused("forbidden", "scope_forbidden", "programs are changed by the group")
