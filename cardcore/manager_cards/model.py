"""The rules of manager cards: the card a manager presents at the till to authorize a special
discount. Pure: a policy and integers in, a decision out.

- A manager card is bound to one staff user and authorizes, per transaction, at most
  `max_percent_bp` of the bill (basis points; the cap is floor(bill * bp / 10000) fen) and,
  per local day in the program's timezone (Asia/Shanghai unless told), at most
  `daily_total_fen` in all.
- Every discount names a reason from the card's list; no reason, no discount.
- All or nothing: a discount over a cap is refused whole, never cut down to the cap, so the
  cashier and the member see exactly what was asked or a refusal.
- The card's authority is its staff user's: at every use, as at issue, that user must exist,
  be active, and hold a role and scope that may hold the card (`holder_refusal`).
- Money is int fen (1 CNY = 100 fen); times are int milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from cardcore import limits
from cardcore.localtime import DEFAULT_TIMEZONE, day_bounds
from cardcore.org.model import Place, Refused, Role, ScopeKind

DEFAULT_TZ = DEFAULT_TIMEZONE  # the group's timezone: its day bounds the daily total
MANAGER_ROLE = "manager"  # the role of a card that may authorize (vs "cashier", "member")
BASIS_POINTS = 10_000  # 100 % in basis points

_REASON = re.compile(r"[a-z][a-z0-9_]*")

# Stable refusal codes (the contract with POS and admin callers).
NOT_MANAGER = "manager_not_manager"
NOT_ACTIVE = "manager_not_active"
BAD_AMOUNT = "manager_bad_amount"
REASON_UNKNOWN = "manager_reason_unknown"
OVER_PERCENT = "manager_over_percent"
OVER_DAILY = "manager_over_daily"
STAFF_DISABLED = "manager_staff_disabled"  # the card's staff user is disabled or gone
STAFF_NOT_ELIGIBLE = "manager_staff_not_eligible"  # its role or scope no longer fits the card

# Staff a manager card may be bound to: anyone who works in the store, not an auditor.
MANAGER_ROLES = frozenset(set(Role) - {Role.AUDITOR})
STAFF_ACTIVE = "active"  # the state of a staff user who may act (vs "disabled")


class ManagerState(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class ManagerCard:
    """What one manager card may authorize."""

    staff_user_id: int  # the staff user the card is bound to (the audit names them)
    max_percent_bp: int  # per transaction, 1..MANAGER_PERCENT_BP_MAX
    daily_total_fen: int  # per local day, 1..MANAGER_DAILY_FEN_MAX
    reasons: frozenset[str]  # allowed reason codes, 1..MANAGER_REASONS_MAX of them
    state: ManagerState


@dataclass(frozen=True, slots=True)
class Holder:
    """The staff user a card is bound to, as the staff table has them now."""

    state: str  # STAFF_ACTIVE or "disabled"
    role: str
    scope_kind: str
    scope_id: str  # a store or legal entity code; "" for the group


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request: approved whole (`ok`, `approved_fen` = the discount asked)
    or refused (`refusal` names why, `approved_fen` = 0)."""

    ok: bool
    refusal: str  # "" when ok
    approved_fen: int

    @staticmethod
    def approve(discount_fen: int) -> Decision:
        return Decision(ok=True, refusal="", approved_fen=discount_fen)

    @staticmethod
    def refuse(code: str) -> Decision:
        return Decision(ok=False, refusal=code, approved_fen=0)


# --- the policy ---------------------------------------------------------------------------------


def check_card(c: ManagerCard) -> None:
    """Refuse (400 `invalid_value`, naming the field) a policy out of its bounds: a staff
    user id 1..RECORD_ID_MAX, a percent 1..MANAGER_PERCENT_BP_MAX bp, a daily total
    1..MANAGER_DAILY_FEN_MAX fen, 1..MANAGER_REASONS_MAX reason codes of lower-case letters,
    digits and _ up to MANAGER_REASON_CHARS_MAX characters."""
    bounded = (
        ("staff_user_id", c.staff_user_id, limits.RECORD_ID_MAX),
        ("max_percent_bp", c.max_percent_bp, limits.MANAGER_PERCENT_BP_MAX),
        ("daily_total_fen", c.daily_total_fen, limits.MANAGER_DAILY_FEN_MAX),
    )
    for name, value, high in bounded:
        if type(value) is not int or not 1 <= value <= high:
            raise Refused("invalid", "invalid_value", f"{name} is 1..{high}", name)
    if not 1 <= len(c.reasons) <= limits.MANAGER_REASONS_MAX:
        raise Refused(
            "invalid", "invalid_value", f"1..{limits.MANAGER_REASONS_MAX} reasons", "reasons"
        )
    if not all(_reason_ok(r) for r in c.reasons):
        chars = limits.MANAGER_REASON_CHARS_MAX
        message = f"a reason is 1..{chars} lower-case letters, digits and _, from a letter"
        raise Refused("invalid", "invalid_value", message, "reasons")


def holder_refusal(holder: Holder | None, place: Place) -> str:
    """ "" when `holder` may hold (and use) a manager card of the store at `place`, else why
    not: no such user or not active (`manager_staff_disabled`); an auditor, or a scope that
    covers neither that store nor its legal entity nor the group
    (`manager_staff_not_eligible`)."""
    if holder is None or holder.state != STAFF_ACTIVE:
        return STAFF_DISABLED
    covers = (
        holder.scope_kind == ScopeKind.GROUP
        or (holder.scope_kind == ScopeKind.ENTITY and holder.scope_id == place.entity)
        or (holder.scope_kind == ScopeKind.STORE and holder.scope_id == place.store)
    )
    if holder.role not in MANAGER_ROLES or not covers:
        return STAFF_NOT_ELIGIBLE
    return ""


def _reason_ok(reason: str) -> bool:
    """A reason code is short and plain: "damaged", "vip", "price_match"."""
    return len(reason) <= limits.MANAGER_REASON_CHARS_MAX and bool(_REASON.fullmatch(reason))


def percent_cap_fen(bill_fen: int, max_percent_bp: int) -> int:
    """The most one transaction's discount may be: floor(bill * bp / 10000) fen. The cap on
    the card's authority rounds down: a fraction of a fen is not authorized."""
    return bill_fen * max_percent_bp // BASIS_POINTS


# --- authorization ------------------------------------------------------------------------------


def authorize(
    policy: ManagerCard,
    *,
    bill_fen: int,
    discount_fen: int,
    reason: str,
    authorized_today_fen: int,
    presenting_role: str,
) -> Decision:
    """Approve `discount_fen` off `bill_fen` whole, or refuse it whole (never a part).

    Checked in this order: the card presented is a manager card (`manager_not_manager`; a
    cashier's or member's card cannot authorize); the card is active (`manager_not_active`);
    0 < discount <= bill (`manager_bad_amount`); the reason is one of the card's
    (`manager_reason_unknown`, also when none is given); discount <= the percent cap
    (`manager_over_percent`); what this card authorized today (`authorized_today_fen`, summed
    over `local_day_bounds`) plus the discount <= the daily total (`manager_over_daily`).
    """
    assert authorized_today_fen >= 0
    if presenting_role != MANAGER_ROLE:
        return Decision.refuse(NOT_MANAGER)
    if policy.state is not ManagerState.ACTIVE:
        return Decision.refuse(NOT_ACTIVE)
    if not 0 < discount_fen <= bill_fen:
        return Decision.refuse(BAD_AMOUNT)
    if reason not in policy.reasons:
        return Decision.refuse(REASON_UNKNOWN)
    if discount_fen > percent_cap_fen(bill_fen, policy.max_percent_bp):
        return Decision.refuse(OVER_PERCENT)
    if authorized_today_fen + discount_fen > policy.daily_total_fen:
        return Decision.refuse(OVER_DAILY)
    return Decision.approve(discount_fen)


# --- the local day ------------------------------------------------------------------------------


def local_day_bounds(tz: str, now_ms: int) -> tuple[int, int]:
    """[start_ms, end_ms) of the local day in `tz` that holds `now_ms`: from local midnight to
    the next (in Asia/Shanghai, 16:00 UTC to 16:00 UTC; a DST day may be 23 or 25 hours)."""
    return day_bounds(tz, now_ms)
