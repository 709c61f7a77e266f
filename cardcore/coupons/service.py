"""The e-coupon use cases: campaigns, codes (generated, imported, issued to members, by rule),
signing keys and signed QR texts, campaign figures, and the POS's coupon requests.

Rules of every use case:
- Admin use cases check the principal's permission and scope first. A campaign lives at
  Place(issuing legal entity, store): "" for an HQ (entity-wide) campaign. A store officer
  works only on its own store's campaigns, and only while HQ grants its store the coupon
  function (`OrgService.use_grant`, in the change's transaction; issuing spends the grant's
  count budget). A refused request changes nothing; a change and its audit row commit
  together.
- Budgets (`max_issued`, `max_value_fen`) are counters on the campaign row moved by guarded
  updates (`column + n <= bound`), so concurrent issuances can never overspend them. The
  value an issuance counts is the face value (amount off, the gift's cost, a percent-off
  coupon's cap); an uncapped percent-off coupon's value is counted when it is redeemed.
- A code's state moves by single guarded UPDATEs (`WHERE state = 'issued'`, or a lapsed
  reservation named by its key and time): the row count decides who won, so any number of
  terminals racing for one code meet in the database and exactly one wins. Nothing is read
  and then written on the strength of the read alone.
- POS requests are idempotent under their POS key: the `coupon_redemptions` row under the
  key is the stored answer; a resend gets it and changes nothing. A reversal releases a
  reservation or un-redeems a redemption by a guarded update of that row's state, so the
  code becomes usable again exactly once however often the reversal is sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, NoReturn

from cardcore import limits, localtime
from cardcore.cards.model import (
    Card,
    Kind,
    Outcome,
    PosRequest,
    PosResult,
    Terminal,
    line_parts,
    transaction_key,
)
from cardcore.coalesce import Coalescer
from cardcore.coupons import model, schema
from cardcore.coupons.model import Campaign, CampaignState, CodeStatus, CouponKind
from cardcore.org.model import (
    Function,
    Perm,
    Place,
    Principal,
    Refused,
    ScopeKind,
    require,
    scoped_filter,
)
from cardcore.org.service import OrgService
from cardcore.points import model as points_model
from cardcore.records import Conflict, Deadlock, Records, Unit
from cardcore.vault import (
    Vault,
    VaultError,
    ed25519_new_private,
    ed25519_public_of,
    ed25519_sign,
    ed25519_verify,
)

log = logging.getLogger(__name__)

ENROLMENTS = "coupon_enrolments"
CAMPAIGNS, CODES, REDEMPTIONS, BATCHES, KEYS = (
    "coupon_campaigns",
    "coupon_codes",
    "coupon_redemptions",
    "coupon_batches",
    "coupon_signing_keys",
)
MEMBERS, CARDS, ENTITIES, STORES = "members", "cards", "org_legal_entities", "org_stores"
PROGRAMS = "points_programs"
TIMEZONE = "Asia/Shanghai"  # the group's business day (per-day limits)
# Campaign state changes an officer may make.
TRANSITIONS = {
    CampaignState.DRAFT: {CampaignState.ACTIVE, CampaignState.ENDED},
    CampaignState.ACTIVE: {CampaignState.PAUSED, CampaignState.ENDED},
    CampaignState.PAUSED: {CampaignState.ACTIVE, CampaignState.ENDED},
    CampaignState.ENDED: set(),
}
# What may still change once a campaign left its draft: its name and budgets.
LIVE_CHANGES = frozenset({"name", "max_issued", "max_value_fen", "state"})
# A budget and the counters it bounds: a change below what was used is refused.
_BUDGETS_USED = (
    ("max_issued", "issued_count"),
    ("max_value_fen", "issued_value"),
    ("max_value_fen", "redeemed_value"),
)
ISSUING_STATES = (CampaignState.DRAFT, CampaignState.ACTIVE, CampaignState.PAUSED)
# The service's own refusal codes at the POS (beside model.REFUSALS).
NOT_FOUND = "coupon_not_found"
BUDGET_SPENT = "coupon_budget_spent"
QR_SIGNATURE = "coupon_qr_signature"
RESERVATION_LAPSED = "coupon_reservation_lapsed"  # a confirm after COUPON_RESERVE_S
# Refusals -> POS outcomes (anything else: not_permitted, the refusal naming the rule).
OUTCOME_OF_REFUSAL = {
    NOT_FOUND: Outcome.COUPON_UNKNOWN,
    model.CODE_MALFORMED: Outcome.COUPON_UNKNOWN,
    model.QR_MALFORMED: Outcome.COUPON_UNKNOWN,
    QR_SIGNATURE: Outcome.COUPON_UNKNOWN,
    RESERVATION_LAPSED: Outcome.ORIGINAL_NOT_FOUND,  # 25, as a lapsed top-up hold
    BUDGET_SPENT: Outcome.OVER_LIMIT,  # 61
    "coupon_used": Outcome.COUPON_USED,
    "coupon_reserved": Outcome.COUPON_USED,
    "coupon_expired": Outcome.COUPON_EXPIRED,
    "coupon_not_started": Outcome.COUPON_EXPIRED,
}
CAMPAIGN_FIELDS = tuple(
    f.name for f in dataclasses.fields(Campaign) if f.name not in ("code", "state")
)

Sink = Callable[[list[str]], None]  # receives each chunk of generated codes, in order
Progress = Callable[[str, int, int], None]  # (phase, done, total)


class _Refusal(Exception):
    """Leaves a POS transaction (rolling it back) with the refusal to answer."""

    def __init__(self, refusal: str) -> None:
        super().__init__(refusal)
        self.refusal = refusal


@dataclasses.dataclass(frozen=True, slots=True)
class _Read:
    """What `CouponService._read` read for `_present`: the code's row and its campaign's
    (None: no such code), the member of the card presented (None: none, or bearer), and
    the refusal of a text that names no code (malformed: nothing else was read)."""

    found: tuple[dict[str, Any], dict[str, Any]] | None
    member: int | None
    malformed: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class _Sale:
    """The other coupons of a sale (`_same_sale`): how many, whether all may be combined,
    what they take off together, and (departments, fen) of those scoped to departments."""

    count: int
    stackable: bool
    discount_fen: int
    scoped: tuple[tuple[tuple[str, ...], int], ...]


class _Moved(Exception):
    """A redemption row's state moved since it was read (`CouponService._undo`)."""


class _Clash(Exception):
    """A generated code clashed with one that exists: draw the chunk again."""


# --- pure helpers ------------------------------------------------------------------------------


def campaign_of(row: dict[str, Any]) -> Campaign:
    """The model campaign of a stored row (its state from the row). Parsed once per code,
    state and definition: a till message reads the row several times (Campaign is frozen)."""
    return _campaign(row["code"], row["state"], row["definition"])


@functools.lru_cache(maxsize=limits.COUPON_CAMPAIGNS_PARSED_MAX)
def _campaign(code: str, state: str, definition: str) -> Campaign:
    d = json.loads(definition)
    fields = {name: d[name] for name in CAMPAIGN_FIELDS if name in d}
    fields["kind"] = CouponKind(fields["kind"])
    fields["change_rule"] = model.ChangeRule(fields.get("change_rule", "forfeit"))
    fields["stores"] = tuple(fields.get("stores", ()))
    fields["departments"] = tuple(fields.get("departments", ()))
    return Campaign(code=code, state=CampaignState(state), **fields)


def definition_of(c: Campaign, reward_spend_fen: int, enrolled_only: bool = False) -> str:
    d: dict[str, Any] = {name: getattr(c, name) for name in CAMPAIGN_FIELDS}
    d["kind"] = str(c.kind)
    d["change_rule"] = str(c.change_rule)
    d["stores"] = list(c.stores)
    d["departments"] = list(c.departments)
    d["reward_spend_fen"] = reward_spend_fen
    d["enrolled_only"] = enrolled_only
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def reward_spend_of(row: dict[str, Any]) -> int:
    return int(json.loads(row["definition"]).get("reward_spend_fen", 0))


def enrolled_only_of(row: dict[str, Any]) -> bool:
    """Whether only the members enrolled into the campaign earn its instant reward."""
    return bool(json.loads(row["definition"]).get("enrolled_only", False))


def campaign_view(row: dict[str, Any]) -> dict[str, Any]:
    c = campaign_of(row)
    view: dict[str, Any] = {
        "code": c.code,
        "legal_entity": row["legal_entity"],
        "store": row["store"],
        "state": str(c.state),
    }
    for name in CAMPAIGN_FIELDS:
        value = getattr(c, name)
        view[name] = list(value) if isinstance(value, tuple) else value
    view["kind"] = str(c.kind)
    view["change_rule"] = str(c.change_rule)
    view["reward_spend_fen"] = reward_spend_of(row)
    view["enrolled_only"] = enrolled_only_of(row)
    for name in ("issued_count", "issued_value", "redeemed_count", "redeemed_value"):
        view[name] = int(row[name])
    view["store_cost_fen"] = int(row["store_cost"])
    view["supplier_cost_fen"] = int(row["supplier_cost"])
    view["created_at_ms"] = int(row["created_at_ms"])
    view["updated_at_ms"] = int(row["updated_at_ms"])
    return view


def place_of(row: dict[str, Any]) -> Place:
    """A campaign's place: its issuing entity, and its store for a store campaign."""
    return Place(row["legal_entity"], row["store"])


def face_value(c: Campaign) -> int:
    """What one issued code counts against the value budget."""
    return c.cap_fen if c.kind is CouponKind.PERCENT_OFF else c.value_fen


def status_of(row: dict[str, Any], now_ms: int) -> CodeStatus:
    """A code's status as the rules see it: a lapsed reservation is issued again."""
    state = CodeStatus(row["state"])
    if state is CodeStatus.RESERVED and int(row["reserved_until_ms"] or 0) <= now_ms:
        return CodeStatus.ISSUED
    return state


def code_view(row: dict[str, Any], campaign: Campaign, now_ms: int) -> dict[str, Any]:
    """What a lookup shows of a code: its state as the POS would see it now, and its
    campaign's validity (the code row's copy is the validity when it was issued, which a
    draft's change may have moved since)."""
    status = status_of(row, now_ms)
    ended = campaign.state is CampaignState.ENDED or now_ms >= campaign.valid_to_ms
    if status is CodeStatus.ISSUED and ended:
        status = CodeStatus.EXPIRED
    member = row["member_id"]
    return {
        "code": row["code"],
        "display": model.display(row["code"]),
        "campaign": row["campaign"],
        "campaign_state": str(campaign.state),
        "state": str(status),
        "source": row["source"],
        "member_id": None if member is None else int(member),
        "valid_from_ms": campaign.valid_from_ms,  # the campaign's, as the till judges it
        "valid_to_ms": campaign.valid_to_ms,
        "reserved_until_ms": (
            int(row["reserved_until_ms"]) if status is CodeStatus.RESERVED else None
        ),
        "redeemed_at_ms": None if row["redeemed_at_ms"] is None else int(row["redeemed_at_ms"]),
        "issued_at_ms": int(row["issued_at_ms"]),
    }


def key_view(row: dict[str, Any]) -> dict[str, Any]:
    """A signing key as answered and audited: never its private half."""
    return {
        "kid": row["kid"],
        "legal_entity": row["legal_entity"],
        "public_hex": row["public_hex"],
        "state": row["state"],
        "created_at_ms": int(row["created_at_ms"]),
    }


def day_of(now_ms: int) -> int:
    """The group's business day of an instant, YYYYMMDD (per-day limits)."""
    return localtime.day_number(TIMEZONE, now_ms)


def outcome_of(refusal: str, campaign_state: str = "") -> Outcome:
    """A paused or ended campaign's coupon is C3 (expired); a voided code or a draft's 57."""
    paused = (CampaignState.PAUSED, CampaignState.ENDED)
    if refusal == "coupon_inactive" and campaign_state in paused:
        return Outcome.COUPON_EXPIRED
    return OUTCOME_OF_REFUSAL.get(refusal, Outcome.NOT_PERMITTED)


def refused(refusal: str, campaign: str = "", campaign_state: str = "") -> PosResult:
    return PosResult(outcome_of(refusal, campaign_state), refusal=refusal, campaign=campaign)


def answer_of(row: dict[str, Any], *, replayed: bool) -> PosResult:
    """The approval stored under a POS key."""
    return PosResult(
        Outcome.APPROVED,
        discount=int(row["discount_fen"]),
        forfeited=int(row["forfeited_fen"]),
        campaign=row["campaign"],
        replayed=replayed,
    )


def same_code(row: dict[str, Any], coupon: str) -> bool:
    """Whether a request's coupon (if it names one) is the code of a stored POS row; a QR
    text is checked by its code field."""
    if not coupon:
        return True
    if coupon.startswith(model.QR_VERSION + "|"):
        try:
            return bool(model.parse_qr(coupon).code == row["code"])
        except Refused:
            return False
    try:
        return row["code"] in candidates(coupon)
    except Refused:
        return False


def replay(row: dict[str, Any], request: PosRequest) -> PosResult:
    """A resend under a stored POS key: the stored approval; another code under the key is
    a duplicate mismatch; a key whose coupon was released or reversed since is never
    approved again (the cashier must not give the discount)."""
    if row["state"] in ("released", "reversed"):
        return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL, campaign=row["campaign"], replayed=True)
    if not same_code(row, request.coupon):
        return PosResult(Outcome.DUPLICATE_MISMATCH, replayed=True)
    return answer_of(row, replayed=True)


def _not_found(field: str = "code") -> Refused:
    return Refused("not_found", NOT_FOUND, "no such coupon", field)


def _campaign_not_found(field: str = "code") -> Refused:
    return Refused("not_found", "campaign_not_found", "no such coupon campaign", field)


def candidates(text: str) -> list[str]:
    """The stored spellings a typed code may have: a generated code (forgiving: case, spaces,
    hyphens, I/L/O), or a partner's imported code as it is. `coupon_code_malformed` when it
    can be neither."""
    out = []
    with contextlib.suppress(Refused):
        out.append(model.parse(text))
    if len(text) <= limits.COUPON_TYPED_CHARS_MAX:
        with contextlib.suppress(Refused):
            imported = model.check_imported(text)
            if imported not in out:
                out.append(imported)
    if not out:
        raise Refused("invalid", model.CODE_MALFORMED, "not a coupon code", "code")
    return out


def spellings(code: str) -> list[str]:
    """The stored codes an imported code would be confused with: itself, and its normalised
    form (`model.normalize`: how `candidates` reads a typed generated code). Every spelling
    `candidates` finds for the code typed as it is printed is one of them."""
    return sorted({code, model.normalize(code)})


def _code_exists() -> Refused:
    """An import's code exists already, as it is or in its normalised form: the answer of
    the look-up and, the same, of the unique index behind it."""
    return Refused(
        "conflict", "coupon_code_exists",
        "a code exists already (as it is, or in its normalised form)", "codes",
    )  # fmt: skip


async def _no_other_spelling(uow: Unit, codes: list[str]) -> None:
    """Inside an import's transaction, before its rows: 409 `coupon_code_exists` when a
    stored code has the normalised form of a code of the import (its `spelling`: what the
    unique index refuses), or is a code of the import or its normalised form (`spellings`:
    for the codes stored without a spelling, see `schema.coupon_codes`). A look-up, for the
    clear answer in the common case: two imports at the same moment can each miss the
    other's code, and then the unique index refuses the later one's insert, answered the
    same (`CouponService._issue`)."""
    normal = sorted({model.normalize(c) for c in codes})
    if await uow.find_each(CODES, "spelling", normal, {}, limit_each=1):
        raise _code_exists()
    wanted = sorted({s for c in codes for s in spellings(c)})
    if await uow.find_each(CODES, "code", wanted, {}, limit_each=1):
        raise _code_exists()


# --- the service -------------------------------------------------------------------------------


class CouponService:
    def __init__(
        self,
        records: Records,
        org: OrgService,
        vault: Vault,
        clock_ms: Callable[[], int] | None = None,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.records = records
        self.org = org
        self.vault = vault
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.randbytes = randbytes  # a CSPRNG; tests pass a repeating one to force clashes
        # The active campaigns of each legal entity that give an instant reward, as the
        # purchases at the till read them (monotonic time they were read at, the rows):
        # forgotten at every campaign change made here, and after COUPON_REWARD_CACHE_S.
        self._rewarding: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        # The POS coupon requests that read in one turn of the event loop (a call's feature
        # tasks start together) read in one statement on PostgreSQL (`_presented_rows`).
        self._presented = Coalescer(self._presented_rows, limits.COUPON_POS_TOGETHER_MAX)
        # Likewise the holds (reservations; redemptions, counted) of one turn, one statement.
        self._holding = {
            count: Coalescer(self._holds_together, limits.COUPON_POS_TOGETHER_MAX)
            for count in (False, True)
        }

    # --- campaigns -----------------------------------------------------------------------------

    async def _campaign_place(self, p: Principal, values: dict[str, Any]) -> Place:
        """Where a new campaign lives: its store's place, or its legal entity."""
        store = values.get("store", "")
        entity = values.get("legal_entity", "")
        if store:
            place = await self.org.store_place(store, open_=True)
            if entity and entity != place.entity:
                raise Refused(
                    "invalid", "invalid_value", "the store is of another legal entity",
                    "legal_entity",
                )  # fmt: skip
            return place
        if not entity:
            raise Refused("invalid", "missing_field", "name a legal_entity or a store", "store")
        require(p, Perm.CAMPAIGNS_WRITE, Place(entity))
        async with self.records.read() as uow:
            if await uow.get(ENTITIES, id=entity) is None:
                raise Refused(
                    "not_found", "entity_not_found", "no such legal entity", "legal_entity"
                )
        return Place(entity)

    async def _granted(self, uow: Unit, p: Principal, place: Place, code: str, count: int) -> None:
        """A store officer acts only while HQ grants its store coupons (issuing spends the
        grant's count budget); HQ roles need no grant."""
        if p.scope.kind is ScopeKind.STORE:
            await self.org.use_grant(uow, place.store, Function.COUPON, code, count=count, amount=0)

    async def create_campaign(self, p: Principal, values: dict[str, Any]) -> dict[str, Any]:
        self._rewarding.clear()
        place = await self._campaign_place(p, values)
        require(p, Perm.CAMPAIGNS_WRITE, place)
        fields = {k: v for k, v in values.items() if k in CAMPAIGN_FIELDS}
        for name in ("stores", "departments"):
            if name in fields:
                fields[name] = tuple(fields[name])
        for name in ("kind", "change_rule"):
            if name in fields:
                fields[name] = (CouponKind if name == "kind" else model.ChangeRule)(fields[name])
        campaign = Campaign(code=values["code"], state=CampaignState.DRAFT, **fields)
        model.check_campaign(campaign)
        await self._check_stores(campaign, place)
        reward = int(values.get("reward_spend_fen", 0))
        enrolled_only = bool(values.get("enrolled_only", False))
        now = self.clock_ms()
        row = {
            "code": campaign.code,
            "name": campaign.name,
            "legal_entity": place.entity,
            "store": place.store,
            "definition": definition_of(campaign, reward, enrolled_only),
            "state": str(CampaignState.DRAFT),
            "issued_count": 0,
            "issued_value": 0,
            "redeemed_count": 0,
            "redeemed_value": 0,
            "store_cost": 0,
            "supplier_cost": 0,
            "created_at_ms": now,
            "updated_at_ms": now,
        }
        async with self.records.begin() as uow:
            await self._granted(uow, p, place, campaign.code, 0)
            if await uow.get(CAMPAIGNS, code=campaign.code) is not None:
                raise Refused("conflict", "campaign_exists", "a campaign has this code", "code")
            try:
                await uow.insert(CAMPAIGNS, row)
            except Conflict:
                raise Refused("conflict", "campaign_exists", "made at the same moment") from None
            view = campaign_view(row)
            await uow.audit(
                p, action="coupon_campaign.create", kind="coupon_campaign",
                object_id=campaign.code, place=place, before=None, after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def _campaign_row(self, code: str, field: str = "code") -> dict[str, Any]:
        async with self.records.read() as uow:
            row = await uow.get(CAMPAIGNS, code=code)
        if row is None:
            raise _campaign_not_found(field)
        return row

    async def get_campaign(self, p: Principal, code: str) -> dict[str, Any]:
        row = await self._campaign_row(code)
        require(p, Perm.LOYALTY_READ, place_of(row))
        return campaign_view(row)

    async def list_campaigns(
        self, p: Principal, filters: dict[str, Any], after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Campaigns in the principal's scope: all (group), one entity's, or one store's own."""
        require(p, Perm.LOYALTY_READ)
        scoped = scoped_filter(p, filters)
        if scoped is None:
            return []
        where: dict[str, Any] = scoped
        async with self.records.read() as uow:
            rows = await uow.find(CAMPAIGNS, where, order="code", after=after, limit=limit)
        return [campaign_view(r) for r in rows]

    async def update_campaign(
        self, p: Principal, code: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change a draft's definition, or a live campaign's name and budgets; move its state
        (draft -> active -> paused <-> active, any -> ended). A guarded update: a change made
        meanwhile by another request makes this one 409 `campaign_changed`. The reward
        campaigns read for the till are forgotten once the change committed (a purchase that
        read them meanwhile would otherwise keep the old ones cached)."""
        row = await self._campaign_row(code)
        place = place_of(row)
        require(p, Perm.CAMPAIGNS_WRITE, place)
        before = campaign_of(row)
        if before.state is not CampaignState.DRAFT:
            fixed = sorted(set(changes) - LIVE_CHANGES)
            if fixed:
                raise Refused(
                    "conflict", "campaign_live",
                    "only a draft's definition changes; a live campaign's name and budgets",
                    fixed[0],
                )  # fmt: skip
        state = CampaignState(changes.get("state", before.state))
        if state is not before.state and state not in TRANSITIONS[before.state]:
            raise Refused(
                "conflict", "campaign_state", f"a {before.state} campaign cannot become {state}",
                "state",
            )  # fmt: skip
        fields = {k: v for k, v in changes.items() if k in CAMPAIGN_FIELDS}
        for name in ("stores", "departments"):
            if name in fields:
                fields[name] = tuple(fields[name])
        if "kind" in fields:
            fields["kind"] = CouponKind(fields["kind"])
        if "change_rule" in fields:
            fields["change_rule"] = model.ChangeRule(fields["change_rule"])
        after = dataclasses.replace(before, state=state, **fields)
        model.check_campaign(after)
        if "stores" in changes:  # a campaign saved before the check stays changeable
            await self._check_stores(after, place)
        for budget, used in _BUDGETS_USED:
            bound = getattr(after, budget)
            if budget in changes and bound and bound < int(row[used]):
                raise Refused(
                    "conflict", "budget_below_issued",
                    f"{budget} is below what was {used.split('_')[0]}",
                    budget,
                )  # fmt: skip
        reward = int(changes.get("reward_spend_fen", reward_spend_of(row)))
        enrolled_only = bool(changes.get("enrolled_only", enrolled_only_of(row)))
        now = max(self.clock_ms(), int(row["updated_at_ms"]) + 1)
        stored = {
            "name": after.name,
            "definition": definition_of(after, reward, enrolled_only),
            "state": str(after.state),
            "updated_at_ms": now,
        }
        bounds = {used: getattr(after, budget) for budget, used in _BUDGETS_USED}
        bounds = {used: bound for used, bound in bounds.items() if bound}
        async with self.records.begin() as uow:
            await self._granted(uow, p, place, code, 0)
            changed = await uow.update(
                CAMPAIGNS,
                {"code": code, "state": row["state"], "updated_at_ms": row["updated_at_ms"]},
                stored,
                at_most=bounds,
            )
            if not changed:
                raise Refused(
                    "conflict", "campaign_changed",
                    "the campaign changed meanwhile (or its budget was used); read it again",
                )  # fmt: skip
            fresh = await uow.get(CAMPAIGNS, code=code)
            assert fresh is not None
            view = campaign_view(fresh)
            await uow.audit(
                p, action="coupon_campaign.update", kind="coupon_campaign", object_id=code,
                place=place, before=campaign_view(row), after=view, now_ms=now,
            )  # fmt: skip
        self._rewarding.clear()  # after the commit, never before it
        return view

    async def figures(self, p: Principal, code: str) -> dict[str, Any]:
        """Issued, redeemed, expired (codes never redeemed once the campaign is over), the
        redemption rate in basis points and the cost by funder."""
        row = await self._campaign_row(code)
        require(p, Perm.LOYALTY_READ, place_of(row))
        c = campaign_of(row)
        now = self.clock_ms()
        expired = 0
        if c.state is CampaignState.ENDED or now >= c.valid_to_ms:
            async with self.records.read() as uow:
                expired = await uow.count(CODES, campaign=code, state=["issued", "reserved"])
        out = model.figures(
            int(row["issued_count"]),
            int(row["redeemed_count"]),
            expired,
            int(row["store_cost"]),
            int(row["supplier_cost"]),
        )
        return {"campaign": code, "redeemed_value_fen": int(row["redeemed_value"]), **out}

    # --- issuing codes -------------------------------------------------------------------------

    async def generate(
        self,
        p: Principal,
        campaign: str,
        count: int,
        *,
        key: str = "",
        sink: Sink | None = None,
        progress: Progress | None = None,
        opened: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """`count` fresh bearer codes for printing (cryptographically random, unique across
        the group, as they are and in their normalised form: a chunk that clashes is drawn
        again). Up to COUPON_INSERT_CHUNK_MAX codes
        commit at once with their budget; more (the CLI) reserve the budget first and then
        commit chunk by chunk, the batch's `done` counting them. `sink` receives the codes;
        `opened` the batch's id once its budget is reserved (the CLI names it when a run is
        cut short)."""
        assert 1 <= count <= limits.COUPON_GENERATE_CLI_MAX, count
        return await self._issue(
            p, campaign, count, source="generated", key=key, sink=sink, progress=progress,
            request={"count": count}, opened=opened,
        )  # fmt: skip

    async def import_codes(
        self, p: Principal, campaign: str, codes: list[str], *, key: str = ""
    ) -> dict[str, Any]:
        """A partner's codes, as they are (`model.check_imported`); all or none: a code
        with the normalised form of a stored code (`_no_other_spelling`: a cashier typing
        one might find the other) refuses the import (409 `coupon_code_exists`), also when
        that code's import commits at the same moment (the unique index on `spelling`); two
        codes of the import with one normalised form refuse it too (400 `invalid_value`)."""
        checked = [model.check_imported(c) for c in codes]
        if len({model.normalize(c) for c in checked}) != len(checked):
            raise Refused(
                "invalid", "invalid_value",
                "the codes repeat (as typed: case, hyphens, I/L as 1, O as 0 aside)", "codes",
            )  # fmt: skip
        return await self._issue(p, campaign, len(checked), source="imported", key=key,
                                 given=checked, request={"codes": checked})  # fmt: skip

    async def issue_to_members(
        self,
        p: Principal,
        campaign: str,
        *,
        member_ids: list[int] | None = None,
        segment: dict[str, Any] | None = None,
        key: str = "",
    ) -> dict[str, Any]:
        """One code for each member: a list, or a segment (holders of a card class, members
        of a tier, or members whose spend in a points program over a period reached a
        bound) of the campaign's legal entity (a store officer: its store's members). At
        most COUPON_ISSUE_MEMBERS_MAX members."""
        row = await self._campaign_row(campaign, "campaign")
        place = place_of(row)
        require(p, Perm.CAMPAIGNS_WRITE, place)
        request = {"member_ids": member_ids, "segment": segment}  # as asked, not as resolved
        if key:  # a repeat answers the first batch, whoever the segment holds by now
            done = await self._replay_batch(f"{campaign}/{key}", campaign, "member", request, None)
            if done is not None:
                return done
        members = await self._members(p, place, member_ids, segment)
        if not members:
            raise Refused("invalid", "no_members", "no member to issue to", "member_ids")
        owners: list[int | None] = list(members)
        return await self._issue(
            p, campaign, len(owners), source="member", key=key, members=owners, request=request
        )

    async def _members(
        self,
        p: Principal,
        place: Place,
        member_ids: list[int] | None,
        segment: dict[str, Any] | None,
    ) -> list[int]:
        most = limits.COUPON_ISSUE_MEMBERS_MAX
        where = _member_scope(p, place)
        store = place.store or p.store
        if segment is not None and "spend_at_least" in segment:
            return await self._spend_members(where, segment)
        async with self.records.read() as uow:
            if member_ids is not None:
                rows = await uow.find(MEMBERS, {**where, "id": member_ids}, limit=most)
                found = {int(r["id"]) for r in rows}
                missing = [m for m in member_ids if m not in found]
                if missing:
                    raise Refused(
                        "not_found", "member_not_found",
                        f"member {missing[0]} is not an active member here", "member_ids",
                    )  # fmt: skip
                return list(member_ids)
            assert segment is not None
            if "tier" in segment:
                rows = await uow.find(MEMBERS, {**where, "tier": segment["tier"]}, limit=most)
                ids = sorted({int(r["id"]) for r in rows})
            else:  # members in scope holding an active card of the class (of the store)
                params = {
                    "entity": where["legal_entity"], "state": where["state"],
                    "class_code": segment["card_class"], "card_state": "active",
                    "limit": most + 1,
                }  # fmt: skip
                build = schema.class_segment_select
                if store:
                    assert where.get("home_store") == store
                    params["store"] = store
                    build = schema.class_segment_in_store_select
                rows = await uow.select_all("coupon_class_segment", build, params)
                ids = [int(r["member_id"]) for r in rows]
        _check_segment_size(len(rows))
        return ids

    async def _spend_members(self, where: dict[str, Any], segment: dict[str, Any]) -> list[int]:
        """The members in scope (`where`, `_member_scope`) whose spend in the points program
        `segment["program"]` over its local days since..until (both included) is at least
        `spend_at_least` fen: what the points engine counts as spend for tiers
        (`TierBasis.SPEND`: `amount - returned` of the earnings, that is of purchases that
        earned points in the program), summed over the holders of all of a member's cards.
        One statement grouped by the database (`schema.spend_segment_select`); 404
        `program_not_found` for an unknown program (every program is the group's)."""
        first, last = model.spend_period(
            segment["spend_at_least"], segment["since"], segment["until"]
        )
        async with self.records.read() as uow:
            program = await uow.get(PROGRAMS, code=segment["program"])
            if program is None:
                raise Refused(
                    "not_found", "program_not_found", "no such points program", "segment.program"
                )
            tz = points_model.program_of(json.loads(program["definition"])).timezone
            params = {
                "entity": where["legal_entity"],
                "state": where["state"],
                "program": segment["program"],
                "first": localtime.day_number(tz, localtime.day_start_ms(tz, first)),
                "last": localtime.day_number(tz, localtime.day_start_ms(tz, last)),
                "at_least": segment["spend_at_least"],
                "limit": limits.COUPON_ISSUE_MEMBERS_MAX + 1,
            }
            if "home_store" in where:
                params["store"] = where["home_store"]
                build = schema.spend_segment_in_store_select
            else:
                build = schema.spend_segment_select
            rows = await uow.select_all("coupon_spend_segment", build, params)
        _check_segment_size(len(rows))
        return [int(r["member_id"]) for r in rows]

    async def _issue(
        self,
        p: Principal | None,
        campaign: str,
        count: int,
        *,
        source: str,
        key: str = "",
        given: list[str] | None = None,
        members: list[int | None] | None = None,
        sink: Sink | None = None,
        progress: Progress | None = None,
        raw_key: bool = False,
        request: dict[str, Any],
        opened: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """The budget reserved by a guarded update, a batch row, the codes (given, or drawn
        fresh), the audit row. Under a `key` a repeat of the same `request` (what the caller
        asked, with `source`) answers the first batch; another request under it is 409
        `key_reused`. An officer's key is the campaign's (`<campaign>/<key>`) unless
        `raw_key` (a points redemption's key, found again without its campaign)."""
        row = await self._campaign_row(campaign, "campaign")
        place = place_of(row)
        if p is not None:
            require(p, Perm.CAMPAIGNS_WRITE, place)
        c = campaign_of(row)
        batch_key = f"{campaign}/{key}" if key and p is not None and not raw_key else key
        if batch_key:
            done = await self._replay_batch(batch_key, campaign, source, request, sink)
            if done is not None:
                return done
        _check_issuable(c, row, count, by_rule=p is None)
        now = self.clock_ms()
        chunk = limits.COUPON_INSERT_CHUNK_MAX
        base = {
            "campaign": campaign,
            "source": source,
            "state": str(CodeStatus.ISSUED),
            "valid_from_ms": c.valid_from_ms,
            "valid_to_ms": c.valid_to_ms,
            "reserved_key": None,
            "reserved_until_ms": None,
            "redeemed_key": None,
            "redeemed_at_ms": None,
            "issued_at_ms": now,
            "version": 0,
        }
        owners: list[int | None] = list(members) if members is not None else [None] * count
        for attempt in range(limits.COUPON_GENERATE_ATTEMPTS_MAX):
            try:
                async with self.records.begin() as uow:
                    if given is not None:
                        await _no_other_spelling(uow, given)
                    batch = await self._open_batch(
                        uow, p, row, c, count, source=source, key=batch_key, now=now,
                        digest=model.issue_digest(source, request) if batch_key else None,
                    )  # fmt: skip
                    codes: list[str] = []
                    if count <= chunk:
                        codes = given or self._draw(count)
                        await self._insert_codes(uow, batch, base, codes, owners)
                        await uow.update(BATCHES, {"id": batch}, {"done": count, "state": "done"})
                break
            except _Clash:
                if given is not None:  # a code or its normalised form stored meanwhile
                    raise _code_exists() from None
                if attempt + 1 == limits.COUPON_GENERATE_ATTEMPTS_MAX:
                    raise
            except Conflict:
                if batch_key:  # the same key at the same moment: the first batch answers
                    done = await self._replay_batch(batch_key, campaign, source, request, sink)
                    if done is not None:
                        return done
                raise
        if opened is not None:
            opened(batch)
        if count <= chunk:
            if sink is not None:
                sink(codes)
            if progress is not None:
                progress("codes", count, count)
        else:
            await self._fill(batch, base, count, sink, progress)
        return {"campaign": campaign, "batch": batch, "count": count, "source": source}

    async def _open_batch(
        self,
        uow: Unit,
        p: Principal | None,
        row: dict[str, Any],
        c: Campaign,
        count: int,
        *,
        source: str,
        key: str,
        now: int,
        digest: str | None,
    ) -> int:
        """Inside the issuance's transaction: the grant (a store officer), the budget by a
        guarded update (never past max_issued or max_value_fen, never after a change of the
        campaign read before), the batch row and its audit row."""
        place = place_of(row)
        if p is not None:
            await self._granted(uow, p, place, c.code, count)
        elif place.store:  # by rule, a store's campaign: its grant, as its officer's issuance
            await self.org.use_grant(uow, place.store, Function.COUPON, c.code, count=count,
                                     amount=0)  # fmt: skip
        bounds = {}
        if c.max_issued:
            bounds["issued_count"] = c.max_issued
        if c.max_value_fen:
            bounds["issued_value"] = c.max_value_fen
        changed = await uow.update(
            CAMPAIGNS,
            {"code": c.code, "state": row["state"], "updated_at_ms": row["updated_at_ms"]},
            {"issued_count": ("+", count), "issued_value": ("+", count * face_value(c))},
            at_most=bounds,
        )
        if not changed:
            raise Refused(
                "conflict", "campaign_budget_exceeded",
                "the campaign's budget has no room (or the campaign changed meanwhile)",
                "count",
            )  # fmt: skip
        batch = await uow.insert(
            BATCHES,
            {
                "campaign": c.code,
                "source": source,
                "count": count,
                "done": 0,
                "state": "running",
                "created_by": 0 if p is None else p.user_id,
                "created_at_ms": now,
                "key": key or None,
                "request_sha256": digest,
            },
        )
        assert batch is not None
        if p is not None:
            await uow.audit(
                p, action=f"coupon_codes.{source}", kind="coupon_batch", object_id=batch,
                place=place, before=None,
                after={"campaign": c.code, "batch": batch, "count": count, "source": source},
                now_ms=now,
            )  # fmt: skip
        return batch

    def _draw(self, count: int) -> list[str]:
        """`count` distinct fresh codes."""
        codes: set[str] = set()
        while len(codes) < count:
            codes.add(model.new_code(self.randbytes))
        return list(codes)

    async def _insert_codes(
        self,
        uow: Unit,
        batch: int,
        base: dict[str, Any],
        codes: list[str],
        owners: list[int | None],
    ) -> None:
        """The codes' rows, each with its normalised form (`spelling`, unique). A code
        stored already, or one whose normalised form a stored code has (the primary key or
        the unique index refuses it, also when that code committed a moment ago): `_Clash`,
        and the transaction writes nothing."""
        rows = [
            {**base, "code": code, "spelling": model.normalize(code), "batch": batch,
             "member_id": owner}
            for code, owner in zip(codes, owners, strict=True)
        ]  # fmt: skip
        try:
            await uow.insert(CODES, rows)
        except Conflict:
            raise _Clash from None

    async def _fill(
        self, batch: int, base: dict[str, Any], count: int, sink: Sink | None,
        progress: Progress | None,
    ) -> None:  # fmt: skip
        """A large batch, chunk by chunk, each chunk one transaction with the batch's count."""
        chunk = limits.COUPON_INSERT_CHUNK_MAX
        done = 0
        while done < count:
            size = min(chunk, count - done)
            for attempt in range(limits.COUPON_GENERATE_ATTEMPTS_MAX):
                codes = self._draw(size)
                try:
                    async with self.records.begin() as uow:
                        await self._insert_codes(uow, batch, base, codes, [None] * size)
                        await uow.update(BATCHES, {"id": batch}, {"done": ("+", size)})
                    break
                except _Clash:
                    if attempt + 1 == limits.COUPON_GENERATE_ATTEMPTS_MAX:
                        raise
            done += size
            if sink is not None:
                sink(codes)
            if progress is not None:
                progress("codes", done, count)
        async with self.records.begin() as uow:
            await uow.update(BATCHES, {"id": batch}, {"state": "done"})

    async def _check_stores(self, c: Campaign, place: Place) -> None:
        """A store campaign applies in its own store only; an entity's campaign names only
        stores of its legal entity (400 `store_other_entity`, also for a store that does
        not exist)."""
        if place.store:
            if c.stores not in ((), (place.store,)):
                raise Refused(
                    "invalid", "invalid", "a store campaign applies in its own store", "stores"
                )
            return
        if not c.stores:
            return
        async with self.records.read() as uow:
            rows = await uow.find(STORES, {"id": sorted(set(c.stores))}, limit=len(c.stores))
        if len(rows) != len(set(c.stores)) or any(r["legal_entity"] != place.entity for r in rows):
            raise Refused(
                "invalid", "store_other_entity",
                "an entity's campaign names only stores of its legal entity", "stores",
            )  # fmt: skip

    async def _replay_batch(
        self, key: str, campaign: str, source: str, request: dict[str, Any], sink: Sink | None
    ) -> dict[str, Any] | None:
        """The batch made under `key` before, its codes to `sink`; None when there is none.
        409 `key_reused` when it was made for another campaign or another request (a batch
        made before its request was kept, migration 0017, is compared by campaign and
        source only)."""
        async with self.records.read() as uow:
            batch = await uow.get(BATCHES, key=key)
            if batch is None:
                return None
            if batch["campaign"] != campaign:
                raise Refused("conflict", "key_reused", "the key was used for another campaign",
                              "key")  # fmt: skip
            kept = batch["request_sha256"]
            if batch["source"] != source or (
                kept is not None and kept != model.issue_digest(source, request)
            ):
                raise Refused("conflict", "key_reused", "the key was used for another request",
                              "key")  # fmt: skip
            rows = []
            if sink is not None:
                rows = await uow.find(
                    CODES, {"batch": batch["id"]}, order="code",
                    limit=limits.COUPON_GENERATE_ROUTE_MAX,
                )  # fmt: skip
        if sink is not None:
            sink([r["code"] for r in rows[: limits.COUPON_GENERATE_ROUTE_MAX]])
        return {
            "campaign": campaign,
            "batch": int(batch["id"]),
            "count": int(batch["count"]),
            "source": batch["source"],
            "replayed": True,
        }

    # --- issuance on points redemption (PointsService.coupons: points may not import us) ------

    async def points_reward_issue(
        self, p: Principal, campaign: str, member: int | None, key: str
    ) -> str:
        """One code of `campaign` for a points redemption, keyed by the redemption (`key`,
        the batch's key as it is): a repeat answers the same code and issues nothing; the
        same key for another campaign is 409 `key_reused`. Exactly an officer's issuance to
        members: `campaigns_write` at the campaign's place, the member in `_member_scope`
        (404 `member_not_found`), the budget's guarded update, a store officer's grant, the
        audit row. The code is the member's (holder-bound); a holder-only campaign needs a
        member (409 `coupon_needs_member`). Every refusal names `coupon_campaign`. A repeat
        whose code was voided (`points_reward_void`: the ledger refused that attempt's
        points, and the code was never answered) issues that code again: the retry's points
        buy a live code, never a void one."""
        try:
            batch = await self._points_batch(p, campaign, member, key)
        except Refused as exc:
            raise Refused(_KIND_OF[exc.status], exc.code, str(exc), "coupon_campaign") from None
        async with self.records.begin() as uow:
            [code] = await uow.find(CODES, {"batch": batch}, order="code", limit=1)
            if code["state"] == str(CodeStatus.VOIDED):
                revived = {"state": str(CodeStatus.ISSUED), "version": ("+", 1)}
                await uow.update(CODES, {"code": code["code"], "state": code["state"]}, revived)
        return str(code["code"])

    async def _points_batch(self, p: Principal, campaign: str, member: int | None, key: str) -> int:
        row = await self._campaign_row(campaign, "campaign")
        place = place_of(row)
        require(p, Perm.CAMPAIGNS_WRITE, place)
        if member is None and campaign_of(row).holder_only:
            raise Refused(
                "conflict", "coupon_needs_member",
                "the campaign is holder-only and the card has no member", "campaign",
            )  # fmt: skip
        if member is not None:
            await self._members(p, place, [member], None)
        done = await self._issue(p, campaign, 1, source="points", key=key, members=[member],
                                 raw_key=True, request={"member": member})  # fmt: skip
        return int(done["batch"])

    async def points_reward_of(self, key: str) -> tuple[str, str] | None:
        """(campaign, code) issued under a points redemption's `key`, or None."""
        async with self.records.read() as uow:
            batch = await uow.get(BATCHES, key=key)
            rows = [] if batch is None else await uow.find(
                CODES, {"batch": batch["id"]}, order="code", limit=1
            )  # fmt: skip
        return None if not rows else (str(rows[0]["campaign"]), str(rows[0]["code"]))

    async def points_reward_void(self, key: str) -> bool:
        """Void the code a points redemption (`key`) issued while it is unused (a guarded
        update; a lapsed reservation counts as unused): True when it is void now (by this
        call or before) or none was issued; False when a terminal holds it or it was
        redeemed (a reward given is not taken back)."""
        found = await self.points_reward_of(key)
        if found is None:
            return True
        values = {"state": str(CodeStatus.VOIDED), "reserved_key": None,
                  "reserved_until_ms": None, "version": ("+", 1)}  # fmt: skip
        async with self.records.begin() as uow:
            row = await uow.get(CODES, code=found[1])
            assert row is not None
            if row["state"] == str(CodeStatus.VOIDED):
                return True
            return await self._take(uow, row, self.clock_ms(), values)

    async def batch_codes(self, p: Principal, campaign: str, batch: int) -> list[dict[str, Any]]:
        """The codes of one small batch (an issuance's answer), with their holders."""
        row = await self._campaign_row(campaign, "campaign")
        require(p, Perm.LOYALTY_READ, place_of(row))
        async with self.records.read() as uow:
            rows = await uow.find(
                CODES, {"batch": batch, "campaign": campaign}, order="code",
                limit=limits.COUPON_GENERATE_ROUTE_MAX,
            )  # fmt: skip
        return [
            {
                "code": r["code"],
                "member_id": None if r["member_id"] is None else int(r["member_id"]),
            }
            for r in rows[: limits.COUPON_GENERATE_ROUTE_MAX]
        ]

    async def list_codes(
        self, p: Principal, campaign: str, filters: dict[str, Any], after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """A campaign's codes in code order (filters: stored `state`, `member_id`, `batch`),
        each as a lookup shows it."""
        row = await self._campaign_row(campaign)
        require(p, Perm.LOYALTY_READ, place_of(row))
        async with self.records.read() as uow:
            rows = await uow.find(
                CODES, {**filters, "campaign": campaign}, order="code", after=after, limit=limit
            )
        c, now = campaign_of(row), self.clock_ms()
        return [code_view(r, c, now) for r in rows]

    # --- one code ------------------------------------------------------------------------------

    async def _code(self, uow: Unit, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The code row a typed code names, and its campaign's row; 404 when there is none."""
        rows = await uow.find(CODES, {"code": candidates(text)}, order="code", limit=2)
        if not rows:
            raise _not_found()
        campaign = await uow.get(CAMPAIGNS, code=rows[0]["campaign"])
        assert campaign is not None
        return rows[0], campaign

    async def lookup(self, p: Principal, text: str) -> dict[str, Any]:
        async with self.records.read() as uow:
            row, campaign = await self._code(uow, text)
        require(p, Perm.LOYALTY_READ, place_of(campaign))
        return code_view(row, campaign_of(campaign), self.clock_ms())

    async def void(self, p: Principal, text: str) -> dict[str, Any]:
        """Cancel an issued code (a lapsed reservation counts as issued): a guarded update,
        so a code a terminal holds or redeemed is refused 409 `coupon_state`."""
        async with self.records.read() as uow:
            row, campaign = await self._code(uow, text)
        place = place_of(campaign)
        require(p, Perm.CAMPAIGNS_WRITE, place)
        now = self.clock_ms()
        c = campaign_of(campaign)
        values = {"state": str(CodeStatus.VOIDED), "reserved_key": None,
                  "reserved_until_ms": None, "version": ("+", 1)}  # fmt: skip
        async with self.records.begin() as uow:
            await self._granted(uow, p, place, c.code, 0)
            taken = await self._take(uow, row, now, values)
            if not taken:
                raise Refused(
                    "conflict", "coupon_state",
                    f"the coupon is {status_of(row, now)}: only an issued coupon is voided",
                )  # fmt: skip
            fresh = await uow.get(CODES, code=row["code"])
            assert fresh is not None
            view = code_view(fresh, c, now)
            await uow.audit(
                p, action="coupon.void", kind="coupon", object_id=row["code"], place=place,
                before=code_view(row, c, now), after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def _take(self, uow: Unit, row: dict[str, Any], now: int, values: dict[str, Any]) -> bool:
        """Move an issued code (or one whose reservation lapsed) to `values` by one guarded
        UPDATE; whether this call won it. A lapsed reservation is named by its key and time,
        so a terminal that renewed it meanwhile keeps it; its redemption row is released."""
        if await uow.update(CODES, {"code": row["code"], "state": "issued"}, values):
            return True
        lapsed = row["state"] == "reserved" and int(row["reserved_until_ms"] or 0) <= now
        if not lapsed:
            return False
        held = {
            "code": row["code"],
            "state": "reserved",
            "reserved_key": row["reserved_key"],
            "reserved_until_ms": row["reserved_until_ms"],
        }
        if not await uow.update(CODES, held, values):
            return False
        await uow.update(
            REDEMPTIONS,
            {"key": row["reserved_key"], "state": "reserved"},
            {"state": "released", "updated_at_ms": now},
        )
        return True

    # --- signing keys and QR -------------------------------------------------------------------

    async def create_key(self, p: Principal, entity: str, kid: str) -> dict[str, Any]:
        """A new Ed25519 key pair of a legal entity: the private half sealed by the vault,
        the public half answered. The newest active key signs the entity's QR texts."""
        place = Place(entity)
        require(p, Perm.CAMPAIGNS_WRITE, place)
        now = self.clock_ms()
        private = ed25519_new_private()
        row = {
            "kid": kid,
            "legal_entity": entity,
            "public_hex": ed25519_public_of(private).hex(),
            "private_sealed": self.vault.seal_text(_key_context(kid, entity), private.hex()),
            "state": "active",
            "created_at_ms": now,
        }
        async with self.records.begin() as uow:
            if await uow.get(ENTITIES, id=entity) is None:
                raise Refused(
                    "not_found", "entity_not_found", "no such legal entity", "legal_entity"
                )
            if await uow.get(KEYS, kid=kid) is not None:
                raise Refused("conflict", "key_exists", "a signing key has this id", "kid")
            try:
                await uow.insert(KEYS, row)
            except Conflict:
                raise Refused("conflict", "key_exists", "made at the same moment") from None
            view = key_view(row)
            await uow.audit(
                p, action="coupon_key.create", kind="coupon_key", object_id=kid, place=place,
                before=None, after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def list_keys(
        self, p: Principal, entity: str | None, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Public keys in scope: all (group), or the principal's legal entity's."""
        require(p, Perm.LOYALTY_READ)
        where: dict[str, Any] = {} if entity is None else {"legal_entity": entity}
        if p.scope.kind is not ScopeKind.GROUP:
            if where.get("legal_entity", p.scope_entity) != p.scope_entity:
                return []
            where["legal_entity"] = p.scope_entity
        async with self.records.read() as uow:
            rows = await uow.find(KEYS, where, order="kid", after=after, limit=limit)
        return [key_view(r) for r in rows]

    async def retire_key(self, p: Principal, kid: str) -> dict[str, Any]:
        """A retired key signs nothing more, and QR texts under it no longer verify."""
        async with self.records.read() as uow:
            row = await uow.get(KEYS, kid=kid)
        if row is None:
            raise Refused("not_found", "key_not_found", "no such signing key", "kid")
        place = Place(row["legal_entity"])
        require(p, Perm.CAMPAIGNS_WRITE, place)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            changed = await uow.update(KEYS, {"kid": kid, "state": "active"}, {"state": "retired"})
            if not changed:
                raise Refused("conflict", "key_retired", "the key is retired already", "kid")
            after = key_view({**row, "state": "retired"})
            await uow.audit(
                p, action="coupon_key.retire", kind="coupon_key", object_id=kid, place=place,
                before=key_view(row), after=after, now_ms=now,
            )  # fmt: skip
        return after

    async def qr(self, p: Principal, text: str) -> dict[str, Any]:
        """The signed QR text of a code, under its issuing entity's newest active key; valid
        until its campaign's end (as the till judges it; never the code row's copy, which
        a draft's change of validity leaves behind). 409 `no_signing_key` when the entity
        has none."""
        async with self.records.read() as uow:
            row, campaign = await self._code(uow, text)
            require(p, Perm.LOYALTY_READ, place_of(campaign))
            entity = campaign["legal_entity"]
            keys = await uow.find(
                KEYS, {"legal_entity": entity, "state": "active"}, order="created_at_ms",
                descending=True, limit=1,
            )  # fmt: skip
        if not keys:
            raise Refused("conflict", "no_signing_key", f"{entity} has no active signing key")
        key = keys[0]
        try:
            private = bytes.fromhex(
                self.vault.open_text(_key_context(key["kid"], entity), key["private_sealed"])
            )
        except (VaultError, ValueError):
            raise Refused(
                "conflict", "signing_key_unreadable", "the signing key does not open"
            ) from None
        expiry = campaign_of(campaign).valid_to_ms
        payload = model.qr_payload(
            model.QR_VERSION,
            code=row["code"],
            issuer_entity=entity,
            expiry_ms=expiry,
            nonce_hex=model.new_qr_nonce(self.randbytes),
            kid=key["kid"],
        )
        qr_text = model.qr_text(payload, ed25519_sign(private, payload))
        return {"code": row["code"], "qr": qr_text, "kid": key["kid"], "expiry_ms": expiry}

    async def _verified_code(self, uow: Unit, text: str, now: int) -> str:
        """The code a scanned QR names once its signature verifies under its issuer's active
        key; a refusal code otherwise."""
        claims = model.parse_qr(text)
        key = await uow.get(KEYS, kid=claims.kid)
        good = (
            key is not None
            and key["state"] == "active"
            and key["legal_entity"] == claims.issuer_entity
            and ed25519_verify(bytes.fromhex(key["public_hex"]), claims.payload, claims.signature)
        )
        if not good:
            raise _Refusal(QR_SIGNATURE)
        if claims.expired(now):
            raise _Refusal("coupon_expired")
        return claims.code

    # --- at the POS ----------------------------------------------------------------------------

    async def pos(
        self, request: PosRequest, terminal: Terminal, key: str, card: Card | None
    ) -> PosResult:
        """The feature handler of the four coupon kinds (PosService.features)."""
        if request.kind is Kind.COUPON_REVERSE:
            original = transaction_key(terminal, request.original_batch, request.original_stan)
            return await self._reverse(terminal, original, request.coupon)
        confirm = request.kind is Kind.COUPON_REDEEM and bool(request.original_stan)
        if not 0 <= request.amount <= limits.POS_AMOUNT_MAX or not (request.coupon or confirm):
            return PosResult(Outcome.BAD_REQUEST)
        if any(not 0 <= fen <= limits.POS_AMOUNT_MAX for _, fen in request.basket):
            return PosResult(Outcome.BAD_REQUEST)
        if len(request.basket) > limits.COUPON_BASKET_LINES_MAX:
            return PosResult(Outcome.BAD_REQUEST)
        try:
            if request.kind is Kind.COUPON_QUERY:
                return await self._query(request, terminal, card)
            if confirm:
                original = transaction_key(terminal, request.original_batch, request.original_stan)
                return await self._confirm(request, key, original)
            return await self._hold(request, terminal, key, card)
        except _Refusal as exc:
            return refused(exc.refusal)
        except Refused as exc:  # a malformed code or QR text
            return refused(exc.code)

    async def _read(
        self, text: str, key: str, card: Card | None
    ) -> tuple[dict[str, Any] | None, _Read]:
        """The redemption stored under the POS key (a resend; "": none asked) and what
        `_present` needs, in one statement with the other requests reading in this turn
        of the event loop (`_presented_rows`): the code a typed text or a QR names (the QR
        is verified by `_present`, after the key's look-up: a resend is answered whatever
        the QR's expiry). A text that names no code: the key's redemption alone, and the
        refusal."""
        try:
            code = model.parse_qr(text).code if text.startswith(model.QR_VERSION + "|") else text
            typed = candidates(code)
        except Refused as exc:
            mine = None
            if key:
                async with self.records.read() as uow:
                    mine = await uow.get(REDEMPTIONS, key=key)
            return mine, _Read(None, None, malformed=exc.code)
        card_id = card.id if card is not None and card.id else None
        got = await self._presented((key, typed[0], typed[-1], card_id))
        mine, row, campaign_row = (
            {c.name: got[prefix + c.name] for c in table.c} for prefix, table in schema.PRESENTED
        )
        found = None if row["code"] is None else (row, campaign_row)
        return (None if mine["key"] is None else mine), _Read(found, _member(got["card_member"]))

    async def _presented_rows(
        self, asked: list[tuple[str, str, str, int | None]]
    ) -> list[dict[str, Any]]:
        """For each (POS key, the code's two spellings, card id or None): one row of what
        `schema.presented_select` reads. PostgreSQL: all in one statement
        (`schema.presented_many_sql`); SQLite: one select each, on one connection."""
        if self.records.postgres:
            columns = [list(column) for column in zip(*asked, strict=True)]
            return await self.records.statement_rows(schema.presented_many_sql(), columns)
        out = []
        async with self.records.read() as uow:
            for key, code1, code2, card_id in asked:
                got = await uow.select_one(
                    "coupon_presented", schema.presented_select,
                    {"key": key, "code1": code1, "code2": code2, "card": card_id},
                )  # fmt: skip
                assert got is not None  # the statement always gives one row
                out.append(got)
        return out

    async def _present(
        self, request: PosRequest, terminal: Terminal, now: int, read: _Read
    ) -> tuple[dict[str, Any], dict[str, Any], model.Verdict, int | None]:
        """The code presented (a QR's signature verified first), its campaign, the rules'
        verdict and the card's member, from what `_read` read; what else the rules need
        (the QR's key, the member's redemptions, the sale's other coupons) read on one
        connection, taken only when there is such a thing to read."""
        if read.malformed:
            raise _Refusal(read.malformed)
        qr = request.coupon.startswith(model.QR_VERSION + "|")
        c = None if read.found is None else campaign_of(read.found[1])
        limited = bool(
            read.member is not None and c and (c.per_member_max or c.per_member_per_day_max)
        )
        async with contextlib.AsyncExitStack() as stack:
            needed = qr or limited or bool(request.sale)
            uow = await stack.enter_async_context(self.records.read()) if needed else None
            return await self._judge(uow, request, terminal, now, read, limited=limited)

    async def _judge(
        self, uow: Unit | None, request: PosRequest, terminal: Terminal, now: int,
        read: _Read, *, limited: bool,
    ) -> tuple[dict[str, Any], dict[str, Any], model.Verdict, int | None]:  # fmt: skip
        """`_present`'s work; `uow` (None: nothing more to read) reads the QR's key, the
        member's redemptions (`limited`) and the sale's other coupons."""
        qr = request.coupon.startswith(model.QR_VERSION + "|")
        if qr:
            assert uow is not None
            await self._verified_code(uow, request.coupon, now)
        if read.found is None:
            raise _Refusal(NOT_FOUND)
        (row, campaign_row), member = read.found, read.member
        assert campaign_row["code"] is not None  # a code's campaign is never deleted
        if qr and model.parse_qr(request.coupon).issuer_entity != campaign_row["legal_entity"]:
            raise _Refusal(QR_SIGNATURE)
        c = campaign_of(campaign_row)
        redeemed = today = 0
        if limited:
            assert uow is not None
            assert member is not None
            redeemed = await member_uses(uow, c.code, member, now)
            today = await member_uses(uow, c.code, member, now, day=day_of(now))
        in_scope = terminal.legal_entity == campaign_row["legal_entity"] and (
            not campaign_row["store"] or terminal.store == campaign_row["store"]
        )
        sale = await self._same_sale(uow, terminal, request, row["code"], now)
        lines = (
            tuple(model.Line(line_parts(label)[0], fen) for label, fen in request.basket) or None
        )
        ctx = model.Context(
            now_ms=now,
            store=terminal.store,
            bill_fen=request.amount,
            lines=lines,
            member_id=member,
            member_redeemed=redeemed,
            member_redeemed_today=today,
            others_in_transaction=sale.count,
            others_stackable=sale.stackable,
            others_discount_fen=sale.discount_fen,
            others_scoped=sale.scoped,
            store_in_scope=in_scope,
        )
        code_state = model.CodeState(status_of(row, now), _member(row["member_id"]))
        verdict = model.evaluate(c, code_state, ctx)
        ended = c.state is CampaignState.ENDED
        if not verdict.ok and verdict.refusal == "coupon_inactive" and ended:
            raise _Refusal("coupon_expired")
        return row, campaign_row, verdict, member

    async def _same_sale(
        self, uow: Unit | None, terminal: Terminal, request: PosRequest, code: str, now: int
    ) -> _Sale:
        """The other coupons held or redeemed in this terminal's sale (its sale number):
        how many, whether all of them may be combined, what they take off the bill
        together, and what those scoped to departments take. A reservation that lapsed
        holds nothing and is not one of them. Without a sale number each coupon message is
        a sale of its own."""
        if not request.sale:
            return _Sale(0, True, 0, ())
        assert uow is not None  # `_present` reads for a sale number
        rows = await uow.find(
            REDEMPTIONS,
            {"terminal": terminal.tid, "sale": request.sale, "state": ["reserved", "redeemed"]},
            order="key", limit=limits.COUPON_PER_TRANSACTION_MAX + 1,
        )  # fmt: skip
        held_since = now - limits.COUPON_RESERVE_S * 1000  # reserved after it: held still
        others = {
            r["code"]: r
            for r in rows
            if r["code"] != code
            and (r["state"] == "redeemed" or int(r["created_at_ms"]) > held_since)
        }
        stackable = True
        departments: dict[str, tuple[str, ...]] = {}
        for campaign in sorted({r["campaign"] for r in others.values()}):
            found = await uow.get(CAMPAIGNS, code=campaign)
            stackable = stackable and found is not None and campaign_of(found).stackable
            departments[campaign] = () if found is None else campaign_of(found).departments
        taken = min(limits.AMOUNT_MAX, sum(int(r["discount_fen"]) for r in others.values()))
        scoped = tuple(
            (departments[r["campaign"]], min(limits.AMOUNT_MAX, int(r["discount_fen"])))
            for r in others.values()
            if departments[r["campaign"]]
        )
        return _Sale(len(others), stackable, taken, scoped)

    async def _query(self, request: PosRequest, terminal: Terminal, card: Card | None) -> PosResult:
        now = self.clock_ms()
        _, read = await self._read(request.coupon, "", card)
        _, campaign_row, verdict, _ = await self._present(request, terminal, now, read)
        if not verdict.ok:
            return refused(verdict.refusal, campaign_row["code"], campaign_row["state"])
        return PosResult(
            Outcome.APPROVED,
            discount=verdict.discount_fen,
            forfeited=verdict.forfeited_fen,
            campaign=campaign_row["code"],
        )

    async def _stored(self, uow: Unit, key: str, request: PosRequest) -> PosResult | None:
        """The answer stored under this POS key (a resend), or None."""
        row = await uow.get(REDEMPTIONS, key=key)
        return None if row is None else replay(row, request)

    async def _hold(
        self, request: PosRequest, terminal: Terminal, key: str, card: Card | None
    ) -> PosResult:
        """Reserve (COUPON_RESERVE); or redeem (COUPON_REDEEM): confirm the reservation this
        terminal holds in this batch (under this STAN or another), else reserve and redeem
        at once."""
        redeem = request.kind is Kind.COUPON_REDEEM
        now = self.clock_ms()
        mine, read = await self._read(request.coupon, key, card)
        if mine is not None:
            if redeem and mine["state"] == "reserved" and same_code(mine, request.coupon):
                return await self._confirm(request, key, key)
            if redeem and mine["state"] == "confirmed":  # another STAN redeemed it: not this
                return refused("coupon_used", mine["campaign"])
            return replay(mine, request)
        row, campaign_row, verdict, member = await self._present(request, terminal, now, read)
        held_by = row["reserved_key"] or ""
        if redeem and status_of(row, now) is CodeStatus.RESERVED and held_by.startswith(
            transaction_key(terminal, request.batch, "")
        ):  # fmt: skip
            return await self._confirm(request, key, held_by)
        campaign = campaign_row["code"]
        if not verdict.ok:
            return refused(verdict.refusal, campaign, campaign_row["state"])
        if redeem:
            values: dict[str, Any] = {
                "state": str(CodeStatus.REDEEMED), "reserved_key": None,
                "reserved_until_ms": None, "redeemed_key": key, "redeemed_at_ms": now,
                "version": ("+", 1),
            }  # fmt: skip
        else:
            values = {
                "state": str(CodeStatus.RESERVED), "reserved_key": key,
                "reserved_until_ms": now + limits.COUPON_RESERVE_S * 1000, "version": ("+", 1),
            }  # fmt: skip
        redemption = {
            "key": key,
            "code": row["code"],
            "campaign": campaign,
            "member_id": member,
            "store": terminal.store,
            "terminal": terminal.tid,
            "sale": request.sale,
            "day": day_of(now),
            "bill_fen": request.amount,
            "discount_fen": verdict.discount_fen,
            "forfeited_fen": verdict.forfeited_fen,
            "store_cost_fen": verdict.store_cost_fen,
            "supplier_cost_fen": verdict.supplier_cost_fen,
            "supplier_id": campaign_of(campaign_row).supplier_id,
            "state": "redeemed" if redeem else "reserved",
            "created_at_ms": now,
            "updated_at_ms": now,
        }
        try:
            if self._at_once(row, campaign_row, member):
                held = await self._hold_at_once(
                    request, key, campaign_row, values, redemption, count=redeem
                )
                if held is not None:
                    return held
            async with self.records.begin() as uow:
                if not await self._take(uow, row, now, values):
                    again = await self._stored(uow, key, request)
                    if again is not None:  # the same request, decided meanwhile
                        return again
                    _lost()
                try:
                    await uow.insert(REDEMPTIONS, redemption)
                except Conflict:
                    raise _Refusal("coupon_used") from None
                if redeem:
                    await self._count(uow, campaign_row, redemption, 1)
                await self._member_limits(uow, campaign_row, member, now, locked=redeem)
        except _Refusal as exc:
            async with self.records.read() as uow:
                stored = await self._stored(uow, key, request)  # its reversal came first
            return stored or refused(exc.refusal, campaign)
        return answer_of(redemption, replayed=False)

    def _at_once(
        self, row: dict[str, Any], campaign_row: dict[str, Any], member: int | None
    ) -> bool:
        """Whether a hold is one statement (`schema.holds_sql`): on PostgreSQL, for a code
        issued when read (a lapsed reservation is taken back by the transaction below),
        with no member limit to count again under the campaign's lock."""
        c = campaign_of(campaign_row)
        limited = member is not None and bool(c.per_member_max or c.per_member_per_day_max)
        return self.records.postgres and row["state"] == "issued" and not limited

    async def _hold_at_once(
        self, request: PosRequest, key: str, campaign_row: dict[str, Any],
        values: dict[str, Any], redemption: dict[str, Any], *, count: bool,
    ) -> PosResult | None:  # fmt: skip
        """The hold as one statement, with the outcomes of `_hold`'s transaction (the code
        taken by another, or the key stored meanwhile: coupon_used, which `_hold` turns into
        the stored answer when there is one): a round trip instead of five, and the
        campaign's row locked for one statement only, never across a turn of the event loop.
        None: the transaction decides, after a statement that changed nothing: when the
        campaign refused (the statement judged it on the snapshot it began with, before it
        waited for the code; the transaction's update judges it afresh), or PostgreSQL broke
        a deadlock with another path's transaction (a terminal reusing a POS key for another
        code)."""
        counted = _counted(campaign_row, redemption) if count else None
        got = await self._holding[count](schema.Hold(values, redemption, counted))
        if isinstance(got, Deadlock):
            log.warning("a coupon hold met a deadlock: the transaction decides")
            return None
        if isinstance(got, Conflict):
            raise _Refusal("coupon_used")
        if isinstance(got, Exception):
            raise got  # a database error: the request is answered `unavailable`
        if not got["code"]:
            _lost()  # `_hold` answers a resend decided meanwhile with its stored answer
        if not got["campaign"]:
            return None
        if not got["added"]:
            raise _Refusal("coupon_used")
        return answer_of(redemption, replayed=False)

    async def _holds_together(self, holds: list[schema.Hold]) -> list[dict[str, Any] | Exception]:
        """The holds of one turn (one shape): those on distinct codes under distinct keys
        (and of one budget per campaign) in one statement (`schema.holds_sql`); each later
        one that repeats a code or a key, or read its campaign's budget otherwise, after,
        alone. For each hold, what the statement's row says of it, or the exception that
        ended its statement (its caller raises it: Conflict and Deadlock are decided as
        before, a database error answers it `unavailable`). A statement of several that a
        deadlock or a conflict ended changed nothing and is one hold's doing: its holds run
        again one by one. Any other error (a lock waited on too long, the connection lost)
        ends the statement's holds at once, so a call never waits for it twice; the holds
        of the turn's other statements keep their own outcomes."""
        out: list[dict[str, Any] | Exception | None] = [None] * len(holds)
        together: list[int] = []
        alone: list[int] = []
        codes: set[str] = set()
        keys: set[str] = set()
        budgets: dict[str, tuple[int, int]] = {}
        for i, h in enumerate(holds):
            code, key = h.redemption["code"], h.redemption["key"]
            campaign, budget = (
                ("", (0, 0)) if h.counted is None
                else (h.counted.campaign, (h.counted.budget, h.counted.read_at))
            )  # fmt: skip
            if code in codes or key in keys or budgets.setdefault(campaign, budget) != budget:
                alone.append(i)
            else:
                together.append(i)
            codes.add(code)
            keys.add(key)
        for group in [together, *([i] for i in alone)]:
            await self._hold_group(holds, group, out)
        assert all(got is not None for got in out)  # every hold has its row or its error
        return [got for got in out if got is not None]

    async def _hold_group(
        self, holds: list[schema.Hold], group: list[int],
        out: list[dict[str, Any] | Exception | None],
    ) -> None:  # fmt: skip
        try:
            rows = await self.records.statement_rows(
                *schema.holds_statement([holds[i] for i in group])
            )
        except (Conflict, Deadlock) as exc:
            if len(group) == 1:
                out[group[0]] = exc
                return
            log.warning("a statement of coupon holds met %s: each runs alone", type(exc).__name__)
            for i in group:
                await self._hold_group(holds, [i], out)
            return
        except Exception as exc:  # noqa: BLE001 - each hold's outcome, raised by its caller
            for i in group:
                out[i] = exc
            return
        for i, row in zip(group, rows, strict=True):
            out[i] = row

    async def _member_limits(
        self, uow: Unit, campaign_row: dict[str, Any], member: int | None, now: int, *,
        locked: bool,
    ) -> None:  # fmt: skip
        """Inside the redemption's transaction, after its own row: the member's live
        redemptions of the campaign, counted again under the campaign row's lock (taken by
        the counters' update, or here), so two codes of one member redeemed at the same
        moment cannot both pass a limit. Nothing to do without limits or a member."""
        c = campaign_of(campaign_row)
        if member is None or not (c.per_member_max or c.per_member_per_day_max):
            return
        if not locked:
            await uow.update(CAMPAIGNS, {"code": c.code}, {"code": c.code})  # the row lock
        total = await member_uses(uow, c.code, member, now)
        if c.per_member_max and total > c.per_member_max:
            raise _Refusal("coupon_member_limit")
        if c.per_member_per_day_max:
            today = await member_uses(uow, c.code, member, now, day=day_of(now))
            if today > c.per_member_per_day_max:
                raise _Refusal("coupon_daily_limit")

    async def _count(
        self, uow: Unit, campaign_row: dict[str, Any], r: dict[str, Any], sign: int
    ) -> None:
        """The campaign's redemption counters and cost by funder, by one guarded update: a
        redemption needs the campaign active and room in its value budget, the budget of
        the row as it is: the update also names the `updated_at_ms` the budget was read at,
        and a campaign changed since (its budget lowered, say) is read again and judged on
        that (only its name, budgets and state change while it is active)."""
        n = _counted(campaign_row, r)
        values = {
            "redeemed_count": ("+", sign),
            "redeemed_value": ("+", sign * n.value),
            "store_cost": ("+", sign * n.store_cost),
            "supplier_cost": ("+", sign * n.supplier_cost),
        }
        if sign < 0:
            await uow.update(CAMPAIGNS, {"code": campaign_row["code"]}, values)
            return
        row = campaign_row
        for _ in range(limits.COUPON_BUDGET_READS_MAX):
            c = campaign_of(row)
            bounds = {"redeemed_value": c.max_value_fen} if c.max_value_fen else {}
            where = {
                "code": c.code, "state": str(CampaignState.ACTIVE),
                "updated_at_ms": row["updated_at_ms"],
            }  # fmt: skip
            if await uow.update(CAMPAIGNS, where, values, at_most=bounds):
                return
            fresh = await uow.get(CAMPAIGNS, code=c.code)
            if fresh is None or fresh["state"] != CampaignState.ACTIVE:
                raise _Refusal("coupon_inactive")
            if fresh["updated_at_ms"] == row["updated_at_ms"]:
                break  # the budget as it is has no room
            row = fresh
        raise _Refusal(BUDGET_SPENT)

    async def _confirm(self, request: PosRequest, key: str, held_key: str) -> PosResult:
        """Redeem the reservation held under `held_key` (this request's own key, or another
        STAN of this terminal's batch): one guarded update of the code (still reserved under
        that key, and still held) decides. A reservation that lapsed answers
        `coupon_reservation_lapsed` (25), one another request took since `coupon_used`. A
        redeem under another STAN of a coupon whose reservation lapsed does not come here:
        it redeems the coupon afresh, its rules judged again."""
        now = self.clock_ms()
        async with self.records.read() as uow:
            if key != held_key:
                stored = await self._stored(uow, key, request)
                if stored is not None:
                    return stored
            held = await uow.get(REDEMPTIONS, key=held_key)
            campaign_row = None if held is None else await uow.get(CAMPAIGNS, code=held["campaign"])
        if held is None or campaign_row is None:
            return PosResult(Outcome.ORIGINAL_NOT_FOUND)
        if not same_code(held, request.coupon) or request.amount != int(held["bill_fen"]):
            # The discount, minimum spend and no-change rule were judged on the reserved
            # bill: a confirm of another bill would skip them (release and redeem afresh).
            return PosResult(Outcome.ORIGINAL_MISMATCH)
        campaign = held["campaign"]
        if held["state"] != "reserved":
            return refused("coupon_used", campaign)
        until = int(held["created_at_ms"]) + limits.COUPON_RESERVE_S * 1000
        if until <= now:
            return refused(RESERVATION_LAPSED, campaign)
        redemption = {**held, "key": key, "state": "redeemed", "created_at_ms": now,
                      "updated_at_ms": now}  # fmt: skip
        values = {"state": str(CodeStatus.REDEEMED), "reserved_key": None,
                  "reserved_until_ms": None, "redeemed_key": key, "redeemed_at_ms": now,
                  "version": ("+", 1)}  # fmt: skip
        try:
            async with self.records.begin() as uow:
                mine = {"code": held["code"], "state": "reserved", "reserved_key": held_key}
                live = {"reserved_until_ms": now + 1}  # lapsed meanwhile: not confirmed
                if not await uow.update(CODES, mine, values, at_least=live):
                    again = await self._stored(uow, key, request)
                    if again is not None and key != held_key:
                        return again
                    _lost()  # the reservation lapsed and was taken
                if key == held_key:  # confirmed in place: the row becomes the redemption
                    await uow.update(
                        REDEMPTIONS,
                        {"key": key, "state": "reserved"},
                        {"state": "redeemed", "updated_at_ms": now},
                    )
                else:
                    await uow.update(
                        REDEMPTIONS,
                        {"key": held_key, "state": "reserved"},
                        {"state": "confirmed", "updated_at_ms": now},
                    )
                    try:
                        await uow.insert(REDEMPTIONS, redemption)
                    except Conflict:
                        raise _Refusal("coupon_used") from None
                await self._count(uow, campaign_row, redemption, 1)
        except _Refusal as exc:
            return refused(exc.refusal, campaign)
        return answer_of(redemption, replayed=False)

    async def _reverse(self, terminal: Terminal, original: str, coupon: str) -> PosResult:
        async with self.records.read() as uow:
            found = await uow.get(REDEMPTIONS, key=original)
        if found is None:
            await self._tombstone(terminal, original)
            return PosResult(Outcome.ORIGINAL_NOT_FOUND)
        if not found["code"]:  # a tombstone: the original never arrived
            return PosResult(Outcome.ORIGINAL_NOT_FOUND, replayed=True)
        if not same_code(found, coupon):
            return PosResult(Outcome.ORIGINAL_MISMATCH)
        if found["state"] == "confirmed":  # redeemed under another STAN: reverse that one
            return PosResult(Outcome.ORIGINAL_NOT_FOUND, campaign=found["campaign"])
        row, undone = await self._undo(original)
        if row is None:
            return PosResult(Outcome.ORIGINAL_NOT_FOUND)
        return PosResult(
            Outcome.APPROVED,
            discount=int(row["discount_fen"]),
            campaign=row["campaign"],
            replayed=not undone,
        )

    async def reverse_key(self, terminal: Terminal, key: str) -> None:
        """The 0400 reversal hook (PosService.reversers): undo what a coupon request did
        under `key`, if anything (idempotent). When nothing was done under it, a tombstone:
        should the request arrive after its reversal, it changes nothing."""
        row, _ = await self._undo(key)
        if row is None:
            await self._tombstone(terminal, key)
        await self.void_rewards(key)

    async def void_rewards(self, key: str, by: str = "") -> None:
        """The coupons a purchase reversed or voided (`key`: the purchase's) earned as an
        instant reward are voided while still unused, each by a guarded update; one the
        member already used stays used. Idempotent. A POS void names itself (`by`, its key,
        kept in the code's `reserved_key`): its reversal gives them back (`rewards_back`)."""
        rows = await self._reward_codes(key)
        now = self.clock_ms()
        values = {"state": str(CodeStatus.VOIDED), "reserved_key": by or None,
                  "reserved_until_ms": None, "version": ("+", 1)}  # fmt: skip
        for row in rows:
            async with self.records.begin() as uow:
                await self._take(uow, row, now, values)

    async def rewards_back(self, key: str, by: str) -> None:
        """The reversal of the void `by` of purchase `key`: the reward coupons that void
        voided are issued again (each by a guarded update: voided by `by`). Idempotent."""
        back = {"state": str(CodeStatus.ISSUED), "reserved_key": None, "version": ("+", 1)}
        for row in await self._reward_codes(key):
            async with self.records.begin() as uow:
                mine = {"code": row["code"], "state": str(CodeStatus.VOIDED), "reserved_key": by}
                await uow.update(CODES, mine, back)

    async def _reward_codes(self, key: str) -> list[dict[str, Any]]:
        """The codes purchase `key` earned as instant rewards (its `reward/{key}/` batches)."""
        async with self.records.read() as uow:
            batches = await uow.find(
                BATCHES, starts_with={"key": f"reward/{key}/"}, order="id",
                limit=limits.COUPON_REWARD_CAMPAIGNS_MAX,
            )  # fmt: skip
            rows = [] if not batches else await uow.find(
                CODES, {"batch": [b["id"] for b in batches]}, order="code",
                limit=limits.COUPON_REWARD_CAMPAIGNS_MAX,
            )  # fmt: skip
        return rows[: limits.COUPON_REWARD_CAMPAIGNS_MAX]

    # --- enrolment (the campaign card) -----------------------------------------------------------

    async def enrol(self, p: Principal, code: str, member_ids: list[int]) -> dict[str, Any]:
        """Enrol members into a campaign (only enrolled members earn the instant reward of
        an `enrolled_only` campaign). Members enrolled already stay as they were; an unknown
        member, or one outside the scope issuance to members has (`_member_scope`), refuses
        the whole request (404 `member_not_found`), changing nothing."""
        row = await self._campaign_row(code)
        place = place_of(row)
        require(p, Perm.CAMPAIGNS_WRITE, place)
        wanted = sorted(set(member_ids))
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await self._granted(uow, p, place, code, 0)
            known = await uow.find(MEMBERS, {**_member_scope(p, place), "id": wanted},
                                   limit=limits.COUPON_ISSUE_MEMBERS_MAX)  # fmt: skip
            missing = sorted(set(wanted) - {int(m["id"]) for m in known})
            if missing:
                raise Refused("not_found", "member_not_found",
                              f"member {missing[0]} is not an active member here",
                              "member_ids")  # fmt: skip
            have = await uow.find(
                ENROLMENTS, {"campaign": code, "member_id": wanted}, order="member_id",
                limit=limits.COUPON_ISSUE_MEMBERS_MAX,
            )  # fmt: skip
            new = sorted(set(wanted) - {int(e["member_id"]) for e in have})
            await uow.insert(ENROLMENTS, [
                {"campaign": code, "member_id": m, "enrolled_at_ms": now} for m in new
            ])  # fmt: skip
            if new:
                await uow.audit(p, action="coupon.enrol", kind="coupon_campaign", object_id=code,
                                place=place, before=None, after={"member_ids": new},
                                now_ms=now)  # fmt: skip
        return {"campaign": code, "enrolled": len(new), "already": len(wanted) - len(new)}

    async def withdraw(self, p: Principal, code: str, member_id: int) -> dict[str, Any]:
        """Take a member out of a campaign (404 `enrolment_not_found` when not in it)."""
        row = await self._campaign_row(code)
        place = place_of(row)
        require(p, Perm.CAMPAIGNS_WRITE, place)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await self._granted(uow, p, place, code, 0)
            gone = await uow.delete(ENROLMENTS, {"campaign": code, "member_id": member_id})
            if not gone:
                raise Refused(
                    "not_found", "enrolment_not_found",
                    "the member is not enrolled into this campaign", "member_id",
                )  # fmt: skip
            await uow.audit(p, action="coupon.withdraw", kind="coupon_campaign", object_id=code,
                            place=place, before={"member_id": member_id}, after=None,
                            now_ms=now)  # fmt: skip
        return {"campaign": code, "member_id": member_id, "enrolled": False}

    async def enrolments(
        self, p: Principal, code: str, after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        row = await self._campaign_row(code)
        require(p, Perm.LOYALTY_READ, place_of(row))
        async with self.records.read() as uow:
            rows = await uow.find(ENROLMENTS, {"campaign": code}, order="member_id",
                                  after=after, limit=limit)  # fmt: skip
        return [{"member_id": int(r["member_id"]), "enrolled_at_ms": int(r["enrolled_at_ms"])}
                for r in rows]  # fmt: skip

    # --- a member merge ------------------------------------------------------------------------

    @staticmethod
    async def merge_member(uow: Unit, survivor_id: int, duplicate_id: int) -> dict[str, int]:
        """The coupon side of a member merge, in the merge's own unit of work (all or
        nothing with the cards it moves; wired by the app, members may not import coupons):
        every per-member row of the duplicate becomes the survivor's. Its codes
        (`coupon_codes.member_id`: a holder-only code redeems by the survivor's cards), its
        redemption rows in every state (`coupon_redemptions.member_id`, with their `day`:
        what `member_uses` counts against `per_member_max` and `per_member_per_day_max`),
        and its enrolments (the campaign card); where both were enrolled into a campaign
        the survivor's enrolment stays and the duplicate's is dropped. In the order the POS
        takes them (a code, then its redemption). How many rows of each moved or went."""
        assert survivor_id != duplicate_id
        to_survivor = {"member_id": survivor_id}
        moved_codes = await uow.update(CODES, {"member_id": duplicate_id}, to_survivor)
        moved_uses = await uow.update(REDEMPTIONS, {"member_id": duplicate_id}, to_survivor)
        dropped = 0
        after: str | None = None
        while True:  # a page of the duplicate's enrolments at a time, by campaign
            page = await uow.find(ENROLMENTS, {"member_id": duplicate_id}, order="campaign",
                                  after=after, limit=limits.PAGE_LIMIT_MAX)  # fmt: skip
            campaigns = [str(r["campaign"]) for r in page[: limits.PAGE_LIMIT_MAX]]
            if campaigns:
                both = await uow.find(
                    ENROLMENTS, {"member_id": survivor_id, "campaign": campaigns},
                    order="campaign", limit=limits.PAGE_LIMIT_MAX,
                )  # fmt: skip
                clash = [str(r["campaign"]) for r in both]
                if clash:
                    dropped += await uow.delete(
                        ENROLMENTS, {"member_id": duplicate_id, "campaign": clash}
                    )
            if len(page) <= limits.PAGE_LIMIT_MAX:
                break
            after = campaigns[-1]
        moved_enrolments = await uow.update(ENROLMENTS, {"member_id": duplicate_id}, to_survivor)
        return {
            "codes": moved_codes,
            "redemptions": moved_uses,
            "enrolments": moved_enrolments,
            "enrolments_dropped": dropped,
        }

    async def _rewarding_of(self, entity: str) -> list[dict[str, Any]]:
        """The entity's active reward campaigns, read at most every COUPON_REWARD_CACHE_S."""
        found = self._rewarding.get(entity)
        if found is not None and time.monotonic() - found[0] < limits.COUPON_REWARD_CACHE_S:
            return found[1]
        async with self.records.read() as uow:
            rows = await uow.find(
                CAMPAIGNS, {"state": str(CampaignState.ACTIVE), "legal_entity": entity},
                order="code", limit=limits.COUPON_REWARD_CAMPAIGNS_MAX,
            )  # fmt: skip
        rows = [r for r in rows[: limits.COUPON_REWARD_CAMPAIGNS_MAX] if reward_spend_of(r) > 0]
        self._rewarding[entity] = (time.monotonic(), rows)
        return rows

    async def rewards(
        self, terminal: Terminal, key: str, card: Card, amount: int
    ) -> tuple[str, ...]:
        """PosService's reward round: the codes `reward_purchase` issued for this purchase."""
        return tuple(r["code"] for r in await self.reward_purchase(terminal, key, card, amount))

    async def _tombstone(self, terminal: Terminal, key: str) -> None:
        """A `reversed` row with no code under a POS key nothing was done under (a 0400 of
        any kind of request: a few rows, only on timeouts); a request under the key later is
        answered reversed_before_arrival."""
        now = self.clock_ms()
        stone = {
            "key": key, "code": "", "campaign": "", "member_id": None,
            "store": terminal.store, "terminal": terminal.tid, "sale": "", "day": day_of(now),
            "bill_fen": 0, "discount_fen": 0, "forfeited_fen": 0, "store_cost_fen": 0,
            "supplier_cost_fen": 0, "supplier_id": "", "state": "reversed",
            "created_at_ms": now, "updated_at_ms": now,
        }  # fmt: skip
        try:
            async with self.records.begin() as uow:
                await uow.insert(REDEMPTIONS, stone)
        except Conflict:
            await self._undo(key)  # the request itself arrived at this moment: undo it

    async def _undo(self, key: str) -> tuple[dict[str, Any] | None, bool]:
        """Release a reservation or un-redeem a redemption made under `key`: the row's state
        moves by a guarded update, so only the first reversal changes anything; the code is
        issued again only if it is still this key's. A reservation confirmed in place (or a
        redemption undone) between the read and the write is read again and undone as it
        is now: a 0400 racing its own 930000 never answers 00 with the coupon still
        redeemed. (row, whether this call undid it)."""
        now = self.clock_ms()
        row = None
        for _ in range(limits.COUPON_UNDO_READS_MAX):
            async with self.records.read() as uow:
                row = await uow.get(REDEMPTIONS, key=key)
            if row is None or row["state"] not in ("reserved", "redeemed"):
                return row, False
            try:
                async with self.records.begin() as uow:
                    await self._undo_row(uow, row, key, now)
            except _Moved:
                continue
            return row, True
        return row, False

    async def _undo_row(self, uow: Unit, row: dict[str, Any], key: str, now: int) -> None:
        """Inside a transaction: the code back to issued (when it is still `key`'s), then the
        row from the state read (`_Moved` when it is no longer so: the transaction rolls
        back), and a redemption's campaign counters down. The code is written first, as a
        confirm writes it (`_confirm`): in the other order the two deadlocked."""
        state = row["state"]
        back = {"state": str(CodeStatus.ISSUED), "reserved_key": None, "reserved_until_ms": None,
                "redeemed_key": None, "redeemed_at_ms": None, "version": ("+", 1)}  # fmt: skip
        holder = "reserved_key" if state == "reserved" else "redeemed_key"
        await uow.update(CODES, {"code": row["code"], "state": state, holder: key}, back)
        after = "released" if state == "reserved" else "reversed"
        if not await uow.update(
            REDEMPTIONS, {"key": key, "state": state}, {"state": after, "updated_at_ms": now}
        ):
            raise _Moved
        if state == "redeemed":
            # The reservation a redeem under another STAN confirmed holds nothing now: a
            # resend of it is never approved again (`replay`). A code is redeemed by one key
            # at a time, so its confirmed reservation is this redemption's.
            await uow.update(REDEMPTIONS, {"code": row["code"], "state": "confirmed"},
                             {"state": "reversed", "updated_at_ms": now})  # fmt: skip
            campaign_row = await uow.get(CAMPAIGNS, code=row["campaign"])
            assert campaign_row is not None
            await self._count(uow, campaign_row, row, -1)

    # --- issuance by rule ----------------------------------------------------------------------

    async def reward_purchase(
        self, terminal: Terminal, key: str, card: Card | None, amount: int
    ) -> list[dict[str, Any]]:
        """Instant reward: one code of each active "spend X, get a coupon" campaign (its
        `reward_spend_fen` reached by `amount`) whose scope holds the terminal's store, to the
        card's member (a holder-only campaign needs one). Idempotent under the POS key: a
        resend answers the codes issued the first time. A campaign whose budget is used up
        is skipped. [{campaign, code}]"""
        assert 0 <= amount <= limits.POS_AMOUNT_MAX, amount
        now = self.clock_ms()
        rows = [r for r in await self._rewarding_of(terminal.legal_entity)
                if 0 < reward_spend_of(r) <= amount]  # fmt: skip
        if not rows:
            return []  # most purchases: no database read at all
        async with self.records.read() as uow:
            held = None if card is None or not card.id else await uow.get(CARDS, id=card.id)
            member = None if held is None else _member(held["member_id"])
            enrolled: set[str] = set()  # the reward campaigns the member is enrolled into
            wanted = [r["code"] for r in rows if enrolled_only_of(r)]
            if member is not None and wanted:
                found = await uow.find(ENROLMENTS, {"campaign": wanted, "member_id": member},
                                       order="campaign")  # fmt: skip
                enrolled = {str(r["campaign"]) for r in found}
        out: list[dict[str, Any]] = []
        for row in rows[: limits.COUPON_REWARD_CAMPAIGNS_MAX]:
            spend = reward_spend_of(row)
            c = campaign_of(row)
            fits = (
                spend > 0
                and amount >= spend
                and c.valid_from_ms <= now < c.valid_to_ms
                and (not row["store"] or row["store"] == terminal.store)
                and (not c.stores or terminal.store in c.stores)
                and (member is not None or not c.holder_only)
                and (not enrolled_only_of(row) or row["code"] in enrolled)
            )
            if not fits:
                continue
            batch_key = f"reward/{key}/{c.code}"
            try:
                done = await self._issue(
                    None, c.code, 1, source="rule", key=batch_key, members=[member],
                    request={"member": member},
                )  # fmt: skip
            except Refused:
                continue  # the budget is used up, or the campaign changed: no reward
            async with self.records.read() as uow:
                codes = await uow.find(CODES, {"batch": done["batch"]}, order="code", limit=1)
            out.extend({"campaign": c.code, "code": r["code"]} for r in codes[:1])
        return out


def _counted(campaign_row: dict[str, Any], r: dict[str, Any]) -> schema.Counted:
    """What redemption `r` adds to its campaign: its value against the budget is the
    discount or, when the funders pay more (a gift item), their cost."""
    store, supplier = int(r["store_cost_fen"]), int(r["supplier_cost_fen"])
    value = max(int(r["discount_fen"]), store + supplier)
    budget = campaign_of(campaign_row).max_value_fen
    read_at = int(campaign_row["updated_at_ms"])
    return schema.Counted(campaign_row["code"], budget, read_at, value, store, supplier)


async def member_uses(
    uow: Unit, campaign: str, member: int, now: int, *, day: int | None = None
) -> int:
    """A member's redemptions of a campaign (of one local day, with `day`) that count
    against its limits: those redeemed, and the reservations still held at `now`. A
    reservation that lapsed frees its code (`status_of`) and counts no more, though its
    row stays `reserved` until another request takes the code."""
    where: dict[str, Any] = {"campaign": campaign, "member_id": member}
    if day is not None:
        where["day"] = day
    redeemed = await uow.count(REDEMPTIONS, state="redeemed", **where)
    held_since = now - limits.COUPON_RESERVE_S * 1000 + 1  # reserved after it: held still
    held = await uow.count(
        REDEMPTIONS, state="reserved", at_least={"created_at_ms": held_since}, **where
    )
    return redeemed + held


_KIND_OF = {status: kind for kind, status in Refused.STATUS.items()}


def _lost() -> NoReturn:
    """Another request took the code first."""
    raise _Refusal("coupon_used")


def _check_issuable(c: Campaign, row: dict[str, Any], count: int, *, by_rule: bool) -> None:
    """`count` more codes may be issued now (the budget is checked again, guarded, as the
    batch reserves it): a live campaign (by rule: an active one) with room in its budget."""
    if c.state not in ISSUING_STATES:
        raise Refused("conflict", "campaign_ended", "the campaign has ended", "campaign")
    if by_rule and c.state is not CampaignState.ACTIVE:
        raise Refused("conflict", "campaign_inactive", "the campaign is not active", "campaign")
    if not model.budget_room(
        c, int(row["issued_count"]), int(row["issued_value"]), count, count * face_value(c)
    ):
        raise Refused(
            "conflict", "campaign_budget_exceeded", "the campaign's budget has no room", "count"
        )


def _check_segment_size(rows: int) -> None:
    """A segment's read takes one row past COUPON_ISSUE_MEMBERS_MAX: then it is too large."""
    most = limits.COUPON_ISSUE_MEMBERS_MAX
    if rows > most:
        raise Refused(
            "invalid", "segment_too_large", f"the segment is over {most} members", "segment"
        )


def _member_scope(p: Principal, place: Place) -> dict[str, Any]:
    """The members a campaign at `place` may name, as the principal sees them: active, of
    the campaign's legal entity and, for a store's campaign or a store officer, of that
    home store (issuance to members and enrolment alike)."""
    where: dict[str, Any] = {"legal_entity": place.entity, "state": "active"}
    store = place.store or p.store
    if store:
        where["home_store"] = store
    return where


def _member(value: object) -> int | None:
    return None if value is None else int(str(value))


def _key_context(kid: str, entity: str) -> str:
    """What a sealed private key is bound to: it opens only as this key of this entity."""
    return f"coupon-signing-key/{entity}/{kid}"
