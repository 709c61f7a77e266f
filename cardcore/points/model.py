"""The points engine's rules, pure: programs, earning rules, lots, tiers, transfers and
redemption. Integers in, integers out: points are whole points, money is fen (1 CNY = 100
fen), instants are UTC epoch milliseconds, and every division rounds DOWN (no float).

Programs (`Program`, `check_program`)
- Dates are the program's local dates (`timezone`, an IANA name, default Asia/Shanghai). A
  local day starts at its midnight (`day_start_ms`); when the clocks skip midnight, at the
  instant they jump.
- Earned points become usable `pending_days` local days after the earning's local date, at
  that day's start (`available_ms`; 0 days: at once). That is the return window.
- Expiry (`expiry_ms`): "rolling_months" = the end of the month N months after the earning's
  local month (31 Jan + 1 = end of Feb; 15 Mar + 12 = end of March next year);
  "fixed_date" = the first month-day (29 Feb is 28 Feb in common years) on or after the
  earning's local date moved on `months` months (0 = none); "never" = None. A lot expires at
  the END of its expiry day: the next local midnight. `pending_days` may not exceed 28 x
  `months`, so no lot can expire before it becomes usable.
- A clawback shortfall is owed under either `negative_policy`: later earnings repay it first
  (`settle_debt`). The policy only says what the balance shows: below zero ("negative"), or
  zero with the debt kept apart ("debt").

Earning (`Rule`, `check_rule`, `earn`)
- Rules apply in (priority, code) order. A rule applies only on its local dates (inclusive),
  weekdays (ISO 1-7, of the purchase's own local date), time window ([start, end) local
  "HH:MM"; an end not after the start crosses midnight) and stores (none named = all), and
  when its eligible spend is positive and reaches `min_spend_fen`.
- Eligible spend: the basket total ("base", "bonus") or its lines whose department or
  category the rule names ("category"). Rate rules give floor(eligible x points / per_fen);
  a bonus gives its fixed `points`.
- Then the card class and tier percentages the rule accepts, in ONE floor:
  floor(x x class_pct x tier_pct / 10 000); a bonus then adds floor(points so far x
  bonus_pct / 100), of points already multiplied (never multiplied again); then the
  per-transaction cap; then what is left of the per-day cap after what the rule earned
  earlier that local day.
- A rule that gives 0 is not listed and stops nothing; a non-stackable rule that gives points
  stops the rules after it. An earning gives at most POINTS_PER_TXN_MAX points.

Lots (`Lot`, `plan_spend`, `plan_clawback`, `expire`, ...)
- Usable at `now`: available_ms <= now < expires_ms. A lot past expires_ms is expired and is
  never drawn from, by a spend or a clawback.
- A spend takes the earliest expiry first (never-expiring last), ties by key.
- A clawback takes pending lots first (the issue: "from pending first"; the returned
  earning's own lot first among them), then usable lots (the earning's own first, then the
  LATEST expiry first, never-expiring first): the member
  keeps the points that expire soonest, which favours the program; the shortfall is a debt.
- `proportional_clawback` floors cumulatively on what was clawed, so a return in parts claws
  back exactly what the whole return would, and never more than the earning in all. A
  reversed spend puts back exactly its takes (`put_back`).

Tiers (`Tier`, `TierPolicy`, `tier_for`, `next_tier`, `period_bounds`)
- Upgrade at once when the period's value reaches a higher threshold; with downgrade
  "period_end", at a period's end the member gets the tier that period's value qualifies
  for (possibly none); with "never", never lower.

Transfers and redemption: `check_transfer` answers a refusal code or None;
`fen_for_points` and `points_for_fen` count whole redemption blocks only.

Refusals carry the stable codes below (`PointsRefused.code`); checks of definitions answer
every `Problem` (field, message) at once for the admin API.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from cardcore import limits
from cardcore.localtime import (
    DEFAULT_TIMEZONE,
    add_months,
    day_start_ms,
    days_in_month,
    local_date,
    local_time,
    month_end,
    timezone_known,
)
from cardcore.org.model import Problem

# --- refusal codes (stable: services, the admin API and the ISO gateway map them) ------------
POINTS_INSUFFICIENT: Final = "points_insufficient"
POINTS_NOT_POSITIVE: Final = "points_not_positive"
POINTS_OVER_LIMIT: Final = "points_over_limit"
AMOUNT_NOT_POSITIVE: Final = "amount_not_positive"
TRANSFER_NOT_ALLOWED: Final = "transfer_not_allowed"
TRANSFER_OVER_LIMIT: Final = "transfer_over_limit"  # one transfer above the program's maximum
TRANSFER_OVER_DAILY_LIMIT: Final = "transfer_over_daily_limit"  # the member's local day
RETURN_EXCEEDS_ORIGINAL: Final = "return_exceeds_original"
REDEEM_NOT_WHOLE_BLOCKS: Final = "redeem_not_whole_blocks"
BASKET_INVALID: Final = "basket_invalid"
PROGRAM_INVALID: Final = "points_program_invalid"
RULE_INVALID: Final = "points_rule_invalid"
TIERS_INVALID: Final = "points_tiers_invalid"

DAY_MS: Final = 86_400_000
PCT: Final = 100  # 100 % in integer percent
DAYS_IN_SHORTEST_MONTH: Final = 28
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_CODE = re.compile(r"[A-Za-z0-9_.\-]+")


# --- refusals and problems ---------------------------------------------------------------------


class PointsRefused(ValueError):
    """An operating refusal; nothing changed. `code` is stable, `field` names the input."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class InsufficientPoints(PointsRefused):
    """A spend larger than the points usable now."""

    def __init__(self, needed: int, usable: int) -> None:
        super().__init__(POINTS_INSUFFICIENT, f"{needed} points needed, {usable} usable", "points")
        self.needed = needed
        self.usable = usable


def require_valid(code: str, problems: Sequence[Problem]) -> None:
    """Raise `PointsRefused(code)` naming the first problem's field; nothing if there is none."""
    if problems:
        raise PointsRefused(code, problems[0].message, problems[0].field)


def _check_points(points: int, field: str = "points") -> None:
    """Points moved at once are positive and at most POINTS_PER_TXN_MAX."""
    if points <= 0:
        raise PointsRefused(POINTS_NOT_POSITIVE, "points must be positive", field)
    if points > limits.POINTS_PER_TXN_MAX:
        raise PointsRefused(POINTS_OVER_LIMIT, "too many points at once", field)


def _code_problem(text: str, field: str) -> list[Problem]:
    """A code is 1..POINTS_CODE_CHARS_MAX letters, digits, '_', '.' or '-'."""
    if len(text) > limits.POINTS_CODE_CHARS_MAX or not _CODE.fullmatch(text):
        return [Problem(field, f"1-{limits.POINTS_CODE_CHARS_MAX} letters, digits, _ . -")]
    return []


def _range_problem(value: int, low: int, high: int, field: str) -> list[Problem]:
    """`value` lies in [low, high]."""
    if not low <= value <= high:
        return [Problem(field, f"must be from {low} to {high}")]
    return []


# --- local time: cardcore.localtime ---------------------------------------------------------


# --- programs -----------------------------------------------------------------------------------


class ExpiryKind(enum.StrEnum):
    ROLLING_MONTHS = "rolling_months"
    FIXED_DATE = "fixed_date"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Expiry:
    """When a program's points expire. `months`: the rolling term, or the fixed date's minimum
    months first (0 = none); `month`/`day`: the fixed date (29 Feb = 28 Feb in common years)."""

    kind: ExpiryKind = ExpiryKind.NEVER
    months: int = 0
    month: int = 12
    day: int = 31


class NegativePolicy(enum.StrEnum):
    NEGATIVE = "negative"  # a clawback shortfall shows as a balance below zero
    DEBT = "debt"  # the balance stays at zero; the shortfall is a debt kept apart


@dataclass(frozen=True, slots=True)
class TransferPolicy:
    """Whether members may give points to other members, and how many."""

    allowed: bool = False
    per_transfer_max_points: int = 0
    per_day_max_points: int = 0  # per giving member and local day


@dataclass(frozen=True, slots=True)
class Program:
    """A points program: one ledger asset, its time zone, return window, expiry, redemption
    rate (`redeem_points` points are worth `redeem_fen` fen), negative and transfer policies."""

    code: str
    asset: str = "PTS"
    timezone: str = DEFAULT_TIMEZONE
    pending_days: int = 0
    expiry: Expiry = Expiry()
    redeem_points: int = 100
    redeem_fen: int = 100
    negative_policy: NegativePolicy = NegativePolicy.DEBT
    transfer: TransferPolicy = TransferPolicy()


def _expiry_problems(expiry: Expiry, pending_days: int) -> list[Problem]:
    """Rolling terms are 1..max months; fixed dates are real month-days; `pending_days` fits in
    the shortest term (28 days a month), so a lot is usable before it expires."""
    if expiry.kind is ExpiryKind.NEVER:
        return []
    low = 1 if expiry.kind is ExpiryKind.ROLLING_MONTHS else 0
    found = _range_problem(expiry.months, low, limits.POINTS_EXPIRY_MONTHS_MAX, "expiry.months")
    if expiry.kind is ExpiryKind.FIXED_DATE:
        found += _range_problem(expiry.month, 1, 12, "expiry.month")
        if not found:
            found += _range_problem(expiry.day, 1, days_in_month(2000, expiry.month), "expiry.day")
    if not found and pending_days > DAYS_IN_SHORTEST_MONTH * expiry.months:
        found.append(Problem("pending_days", "points would expire before they are usable"))
    return found


def _transfer_problems(transfer: TransferPolicy) -> list[Problem]:
    """An allowed transfer has positive per-transfer and per-day maxima within the limits."""
    if not transfer.allowed:
        return []
    return _range_problem(
        transfer.per_transfer_max_points,
        1,
        limits.POINTS_PER_TXN_MAX,
        "transfer.per_transfer_max_points",
    ) + _range_problem(
        transfer.per_day_max_points,
        1,
        limits.POINTS_TRANSFER_PER_DAY_MAX,
        "transfer.per_day_max_points",
    )


def check_program(program: Program) -> tuple[Problem, ...]:
    """Every problem of a program definition (none: it is valid)."""
    found = _code_problem(program.code, "code")
    if not 1 <= len(program.asset) <= limits.ASSET_CODE_CHARS_MAX:
        found.append(Problem("asset", f"1-{limits.ASSET_CODE_CHARS_MAX} characters"))
    if not timezone_known(program.timezone):
        found.append(Problem("timezone", "not an IANA time zone this host knows"))
    found += _range_problem(program.pending_days, 0, limits.POINTS_PENDING_DAYS_MAX, "pending_days")
    found += _expiry_problems(program.expiry, program.pending_days)
    found += _range_problem(program.redeem_points, 1, limits.POINTS_RATE_MAX, "redeem_points")
    found += _range_problem(program.redeem_fen, 1, limits.POINTS_RATE_MAX, "redeem_fen")
    found += _transfer_problems(program.transfer)
    return tuple(found)


def _next_month_day(base: datetime.date, month: int, day: int) -> datetime.date:
    """The first date on or after `base` falling on month-day (29 Feb: 28 Feb in common years)."""

    def on(year: int) -> datetime.date:
        return datetime.date(year, month, min(day, days_in_month(year, month)))

    return on(base.year) if on(base.year) >= base else on(base.year + 1)


def expiry_day(expiry: Expiry, earned: datetime.date) -> datetime.date | None:
    """The last local day points earned on local date `earned` may be used (None: never)."""
    match expiry.kind:
        case ExpiryKind.NEVER:
            return None
        case ExpiryKind.ROLLING_MONTHS:
            return month_end(add_months(earned, expiry.months))
        case ExpiryKind.FIXED_DATE:
            return _next_month_day(add_months(earned, expiry.months), expiry.month, expiry.day)


def expiry_ms(program: Program, earned_ms: int) -> int | None:
    """The instant points earned at `earned_ms` expire: the end of their expiry day, i.e. the
    following local midnight (None: they never expire)."""
    last = expiry_day(program.expiry, local_date(program.timezone, earned_ms))
    if last is None:
        return None
    return day_start_ms(program.timezone, last + datetime.timedelta(days=1))


def available_ms(program: Program, earned_ms: int) -> int:
    """The instant points earned at `earned_ms` become usable: at once without a return window,
    else the start of the local day `pending_days` after the earning's local date."""
    if program.pending_days == 0:
        return earned_ms
    earned = local_date(program.timezone, earned_ms)
    return day_start_ms(program.timezone, earned + datetime.timedelta(days=program.pending_days))


# --- earning rules ------------------------------------------------------------------------------


class RuleKind(enum.StrEnum):
    BASE = "base"  # `points` per `per_fen` of the basket
    CATEGORY = "category"  # the same, on the lines of the named departments or categories
    BONUS = "bonus"  # fixed `points` plus `bonus_pct` % of the points so far


@dataclass(frozen=True, slots=True)
class Rule:
    """An earning rule. Caps of None are no cap; dates are local and inclusive (None = open);
    `window` is local ("HH:MM", "HH:MM"), start inclusive, end exclusive (None = all day);
    empty weekdays (ISO 1-7) or stores mean all of them."""

    code: str
    kind: RuleKind
    priority: int = 0  # lower applies first; ties by code
    points: int = 0
    per_fen: int = 100
    bonus_pct: int = 0
    departments: frozenset[str] = frozenset()  # category rules: lines of these departments
    categories: frozenset[str] = frozenset()  # ... or of these categories
    min_spend_fen: int = 0  # of the eligible spend
    cap_per_txn_points: int | None = None
    cap_per_day_points: int | None = None
    valid_from: datetime.date | None = None
    valid_to: datetime.date | None = None
    window: tuple[str, str] | None = None
    weekdays: frozenset[int] = frozenset()
    stores: frozenset[str] = frozenset()
    stackable: bool = True  # False: when it gives points, the later rules do not apply
    card_class_multiplier: bool = True
    tier_multiplier: bool = True


def _minute_of(text: str) -> int | None:
    """Minutes after local midnight of "HH:MM" (00:00-23:59), or None."""
    match = _HHMM.fullmatch(text)
    return None if match is None else int(match[1]) * 60 + int(match[2])


def _rate_problems(rule: Rule) -> list[Problem]:
    """Rate rules earn 1..max points per 1..max fen; a bonus gives fixed points, a percent, or
    both; only category rules name departments or categories, and they name at least one."""
    if rule.kind is RuleKind.BONUS:
        found = _range_problem(rule.points, 0, limits.POINTS_RATE_MAX, "points")
        found += _range_problem(rule.bonus_pct, 0, limits.POINTS_BONUS_PCT_MAX, "bonus_pct")
        if not found and rule.points == rule.bonus_pct == 0:
            found.append(Problem("points", "a bonus gives fixed points, a percent, or both"))
    else:
        found = _range_problem(rule.points, 1, limits.POINTS_RATE_MAX, "points")
        found += _range_problem(rule.per_fen, 1, limits.POINTS_RATE_MAX, "per_fen")
        found += _range_problem(rule.bonus_pct, 0, 0, "bonus_pct")
    named = bool(rule.departments or rule.categories)
    if named != (rule.kind is RuleKind.CATEGORY):
        found.append(Problem("departments", "category rules, and only they, name departments"))
    return found


def _names_problems(names: frozenset[str], field: str) -> list[Problem]:
    """A set of names is at most POINTS_RULE_SET_ITEMS_MAX names of 1..NAME_CHARS_MAX chars."""
    if len(names) > limits.POINTS_RULE_SET_ITEMS_MAX:
        return [Problem(field, f"at most {limits.POINTS_RULE_SET_ITEMS_MAX} names")]
    if any(not 1 <= len(name) <= limits.NAME_CHARS_MAX for name in names):
        return [Problem(field, f"names are 1-{limits.NAME_CHARS_MAX} characters")]
    return []


def _when_problems(rule: Rule) -> list[Problem]:
    """Dates in order, a window of two different "HH:MM" times, weekdays from 1 to 7."""
    found = []
    if rule.valid_from and rule.valid_to and rule.valid_from > rule.valid_to:
        found.append(Problem("valid_to", "ends before valid_from"))
    if rule.window is not None:
        start, end = (_minute_of(text) for text in rule.window)
        if start is None or end is None or start == end:
            found.append(Problem("window", 'two different local times "HH:MM" (00:00-23:59)'))
    if not rule.weekdays <= frozenset(range(1, 8)):
        found.append(Problem("weekdays", "ISO weekdays: 1 (Monday) to 7 (Sunday)"))
    return found


def _cap_problems(rule: Rule) -> list[Problem]:
    """Caps are None or 0..POINTS_PER_TXN_MAX; the minimum spend 0..POS_AMOUNT_MAX fen."""
    found = _range_problem(rule.min_spend_fen, 0, limits.POS_AMOUNT_MAX, "min_spend_fen")
    caps = {"cap_per_txn_points": rule.cap_per_txn_points}
    caps["cap_per_day_points"] = rule.cap_per_day_points
    for name, cap in caps.items():
        if cap is not None:
            found += _range_problem(cap, 0, limits.POINTS_PER_TXN_MAX, name)
    return found


def check_rule(rule: Rule) -> tuple[Problem, ...]:
    """Every problem of one earning rule (none: it is valid)."""
    found = _code_problem(rule.code, "code")
    found += _range_problem(rule.priority, 0, limits.POINTS_PRIORITY_MAX, "priority")
    found += _rate_problems(rule)
    found += _cap_problems(rule)
    found += _when_problems(rule)
    named = {"departments": rule.departments, "categories": rule.categories}
    named["stores"] = rule.stores
    for field, names in named.items():
        found += _names_problems(names, field)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Line:
    """One basket line: its department, category and amount."""

    department: str
    category: str
    amount_fen: int


@dataclass(frozen=True, slots=True)
class Basket:
    """What was bought: the total, and optionally its lines (which may cover less than it)."""

    amount_fen: int
    lines: tuple[Line, ...] = ()


def check_basket(basket: Basket) -> tuple[Problem, ...]:
    """A total of 0..POS_AMOUNT_MAX fen; at most POINTS_BASKET_LINES_MAX lines of >= 0 fen,
    summing to no more than the total."""
    found = _range_problem(basket.amount_fen, 0, limits.POS_AMOUNT_MAX, "amount_fen")
    if len(basket.lines) > limits.POINTS_BASKET_LINES_MAX:
        found.append(Problem("lines", f"at most {limits.POINTS_BASKET_LINES_MAX} lines"))
    elif any(line.amount_fen < 0 for line in basket.lines):
        found.append(Problem("lines", "a line's amount is not negative"))
    elif sum(line.amount_fen for line in basket.lines) > basket.amount_fen:
        found.append(Problem("lines", "the lines sum to more than the total"))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class EarnPart:
    """What one rule gave."""

    rule: str
    points: int


@dataclass(frozen=True, slots=True)
class Earning:
    """The points of one purchase: the total and each giving rule's part, in rule order."""

    points: int
    parts: tuple[EarnPart, ...]


@dataclass(frozen=True, slots=True)
class _Moment:
    """Where and when (local) a purchase happens."""

    day: datetime.date
    minute: int
    store: str


def _in_window(window: tuple[str, str] | None, minute: int) -> bool:
    """[start, end) in local minutes; an end not after the start crosses midnight."""
    if window is None:
        return True
    start, end = _minute_of(window[0]), _minute_of(window[1])
    assert start is not None
    assert end is not None
    assert start != end
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def _in_scope(rule: Rule, moment: _Moment) -> bool:
    """A rule applies only on its dates, weekdays, time window and stores."""
    return (
        (rule.valid_from is None or rule.valid_from <= moment.day)
        and (rule.valid_to is None or moment.day <= rule.valid_to)
        and (not rule.weekdays or moment.day.isoweekday() in rule.weekdays)
        and _in_window(rule.window, moment.minute)
        and (not rule.stores or moment.store in rule.stores)
    )


def _eligible_fen(rule: Rule, basket: Basket) -> int:
    """The basket total, or for a category rule the lines of its departments or categories."""
    if rule.kind is not RuleKind.CATEGORY:
        return basket.amount_fen
    return sum(
        line.amount_fen
        for line in basket.lines
        if line.department in rule.departments or line.category in rule.categories
    )


def _raw_points(rule: Rule, eligible_fen: int) -> int:
    """Rate rules: floor(eligible x points / per_fen); a bonus: its fixed points."""
    if rule.kind is RuleKind.BONUS:
        return rule.points
    return eligible_fen * rule.points // rule.per_fen


def multiplied(points: int, class_pct: int, tier_pct: int) -> int:
    """Points times both percentages, floored once: floor(points x class x tier / 10 000)."""
    return points * class_pct * tier_pct // (PCT * PCT)


def _capped(rule: Rule, points: int, earned_today: int) -> int:
    """The per-transaction cap first, then what is left of the rule's per-day cap."""
    if rule.cap_per_txn_points is not None:
        points = min(points, rule.cap_per_txn_points)
    if rule.cap_per_day_points is not None:
        points = min(points, max(0, rule.cap_per_day_points - earned_today))
    return points


def _rule_points(
    rule: Rule, basket: Basket, moment: _Moment, *, so_far: int, pcts: tuple[int, int], today: int
) -> int:
    """What one rule gives: 0 out of scope or below its minimum spend, else its points with the
    multipliers it accepts, then capped."""
    eligible = _eligible_fen(rule, basket)
    if not _in_scope(rule, moment) or eligible <= 0 or eligible < rule.min_spend_fen:
        return 0
    class_pct = pcts[0] if rule.card_class_multiplier else PCT
    tier_pct = pcts[1] if rule.tier_multiplier else PCT
    points = multiplied(_raw_points(rule, eligible), class_pct, tier_pct)
    if rule.kind is RuleKind.BONUS:  # of points already multiplied: never multiplied again
        points += so_far * rule.bonus_pct // PCT
    return _capped(rule, points, today)


def earn(
    program: Program,
    rules: Sequence[Rule],
    basket: Basket,
    *,
    now_ms: int,
    store: str,
    card_class_multiplier_pct: int,
    tier_multiplier_pct: int,
    earned_today_by_rule: Mapping[str, int],
) -> Earning:
    """The points a purchase earns under `rules` (see the module docstring for the order,
    scope, arithmetic and caps). `earned_today_by_rule`: points each rule already gave this
    card in the program's local day. `rules`: at most POINTS_RULES_PER_PROGRAM_MAX, codes
    unique, each passing `check_rule` (checked where it is made and where it is loaded, not
    at every earning). An invalid basket is refused (`basket_invalid`)."""
    require_valid(BASKET_INVALID, check_basket(basket))
    for pct in (card_class_multiplier_pct, tier_multiplier_pct):
        assert 0 <= pct <= limits.POINTS_MULTIPLIER_PCT_MAX
    local = local_time(program.timezone, now_ms)
    moment = _Moment(local.date(), local.hour * 60 + local.minute, store)
    pcts = (card_class_multiplier_pct, tier_multiplier_pct)
    parts: list[EarnPart] = []
    total = 0
    for rule in sorted(rules, key=lambda r: (r.priority, r.code)):
        today = earned_today_by_rule.get(rule.code, 0)
        points = _rule_points(rule, basket, moment, so_far=total, pcts=pcts, today=today)
        points = min(points, limits.POINTS_PER_TXN_MAX - total)
        if points > 0:
            parts.append(EarnPart(rule.code, points))
            total += points
            if not rule.stackable:
                break
    return Earning(total, tuple(parts))


# --- lots ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lot:
    """Points with one availability and one expiry (None: never), and how many are left."""

    key: str
    available_ms: int
    expires_ms: int | None
    remaining: int

    def __post_init__(self) -> None:
        assert self.remaining >= 0, self


@dataclass(frozen=True, slots=True)
class Take:
    """Points taken from (or put back into) one lot."""

    key: str
    points: int


@dataclass(frozen=True, slots=True)
class Clawback:
    """A clawback's plan: what it takes from which lots, and what the lots could not cover."""

    takes: tuple[Take, ...]
    shortfall: int


def earn_lot(program: Program, key: str, earned_ms: int, points: int) -> Lot:
    """The lot of points earned at `earned_ms`, with the program's availability and expiry."""
    _check_points(points)
    return Lot(key, available_ms(program, earned_ms), expiry_ms(program, earned_ms), points)


def is_expired(lot: Lot, now_ms: int) -> bool:
    """A lot is expired from its `expires_ms` on."""
    return lot.expires_ms is not None and lot.expires_ms <= now_ms


def is_usable(lot: Lot, now_ms: int) -> bool:
    """Available (from `available_ms` on) and not expired."""
    return lot.available_ms <= now_ms and not is_expired(lot, now_ms)


def is_pending(lot: Lot, now_ms: int) -> bool:
    """Not available yet (still in the return window) and not expired."""
    return now_ms < lot.available_ms and not is_expired(lot, now_ms)


def _draw(ordered: Iterable[Lot], points: int) -> tuple[tuple[Take, ...], int]:
    """Take from the lots in order until `points` are covered: (takes, shortfall)."""
    takes = []
    for lot in ordered:
        if points == 0:
            break
        take = min(lot.remaining, points)
        if take > 0:
            takes.append(Take(lot.key, take))
            points -= take
    return tuple(takes), points


def _bounded(lots: Sequence[Lot]) -> None:
    """Callers read at most POINTS_OPEN_LOTS_MAX lots with points left, each key once."""
    assert len(lots) <= limits.POINTS_OPEN_LOTS_MAX
    assert len({lot.key for lot in lots}) == len(lots), "lot keys are unique"


def plan_spend(lots: Sequence[Lot], points: int, now_ms: int, owed: int) -> tuple[Take, ...]:
    """Spend from the lots usable at `now_ms`, earliest expiry first, never-expiring last, ties
    by key; `InsufficientPoints` when they hold fewer than `points` once the holder's debt
    (`owed`: points clawed back that the lots could not cover) is counted against them: points
    put back into lots beside a debt (a reward's reversal) are not spendable twice."""
    _check_points(points)
    _bounded(lots)
    assert owed >= 0, owed
    usable = sorted(
        (lot for lot in lots if is_usable(lot, now_ms)),
        key=lambda lot: (lot.expires_ms is None, lot.expires_ms or 0, lot.key),
    )
    spendable = sum(lot.remaining for lot in usable) - owed
    if spendable < points:
        raise InsufficientPoints(points, max(0, spendable))
    takes, shortfall = _draw(usable, points)
    assert shortfall == 0, shortfall
    return takes


def _clawback_order(lot: Lot, now_ms: int, own: Collection[str]) -> tuple[int, int, int, int, str]:
    """Pending lots first (the issue: "from pending first"), then usable ones; within each,
    the returned earning's own lots first. Other pending lots latest available first; other
    usable lots never-expiring first, then latest expiry first; ties by key."""
    mine = 0 if lot.key in own else 1
    if is_pending(lot, now_ms):
        return (0, mine, -lot.available_ms, 0, lot.key)
    return (1, mine, lot.expires_ms is not None, -(lot.expires_ms or 0), lot.key)


def plan_clawback(
    lots: Sequence[Lot], points: int, now_ms: int, earn_lot_keys: Collection[str] = ()
) -> Clawback:
    """Take back `points` from unexpired lots in `_clawback_order`; what they cannot cover is
    the shortfall (a debt under either negative policy)."""
    assert 0 <= points <= limits.POINTS_PER_TXN_MAX
    _bounded(lots)
    live = [lot for lot in lots if not is_expired(lot, now_ms)]
    ordered = sorted(live, key=lambda lot: _clawback_order(lot, now_ms, earn_lot_keys))
    takes, shortfall = _draw(ordered, points)
    return Clawback(takes, shortfall)


def proportional_clawback(
    earned_points: int,
    original_fen: int,
    returned_fen_before: int,
    returned_fen_now: int,
    clawed_before: int,
) -> int:
    """The points a return of `returned_fen_now` takes back, floored cumulatively on what
    was taken: floor(earned x (before + now) / original) - clawed_before, never below 0 nor
    past what the earning still holds. So parts of a return sum to what the whole return
    takes, and a return reversed in between (its fen and points given back) never makes
    later returns take more than the earning; `return_exceeds_original` past the original."""
    assert min(earned_points, original_fen, returned_fen_before, returned_fen_now) >= 0
    assert 0 <= clawed_before <= earned_points, (clawed_before, earned_points)
    after = returned_fen_before + returned_fen_now
    if after > original_fen:
        raise PointsRefused(RETURN_EXCEEDS_ORIGINAL, "more returned than bought", "amount_fen")
    if original_fen == 0:
        return 0
    return max(0, earned_points * after // original_fen - clawed_before)


def settle_debt(debt: int, earned: int) -> tuple[int, int]:
    """New earnings repay a debt first: (repaid, left for a new lot)."""
    assert min(debt, earned) >= 0
    repaid = min(debt, earned)
    return repaid, earned - repaid


def expire(lots: Sequence[Lot], now_ms: int) -> tuple[Take, ...]:
    """What expires at `now_ms`: every expired lot's remaining points, earliest first. Once
    taken (`take_from`), nothing is left to expire at the same instant."""
    gone = [lot for lot in lots if is_expired(lot, now_ms) and lot.remaining > 0]
    gone.sort(key=lambda lot: (lot.expires_ms, lot.key))
    return tuple(Take(lot.key, lot.remaining) for lot in gone)


def expiring_within(lots: Sequence[Lot], now_ms: int, days: int) -> tuple[Take, ...]:
    """For reminders: points of unexpired lots that expire within `days` x 24 hours of
    `now_ms`, earliest first."""
    assert 0 <= days <= limits.POINTS_REMINDER_DAYS_MAX
    horizon = now_ms + days * DAY_MS
    soon = [
        lot
        for lot in lots
        if lot.remaining > 0 and lot.expires_ms is not None and now_ms < lot.expires_ms <= horizon
    ]
    soon.sort(key=lambda lot: (lot.expires_ms, lot.key))
    return tuple(Take(lot.key, lot.remaining) for lot in soon)


def _moved(lots: Sequence[Lot], takes: Sequence[Take], sign: int) -> tuple[Lot, ...]:
    """The lots after adding sign x each take to its lot (each key at most once)."""
    change = {take.key: take.points for take in takes}
    assert len(change) == len(takes), "a lot is named once"
    assert all(take.points > 0 for take in takes)
    assert change.keys() <= {lot.key for lot in lots}, "a take names an unknown lot"
    return tuple(
        replace(lot, remaining=lot.remaining + sign * change.get(lot.key, 0)) for lot in lots
    )


def take_from(lots: Sequence[Lot], takes: Sequence[Take]) -> tuple[Lot, ...]:
    """The lots after a spend, clawback or expiry took `takes` (never below zero)."""
    return _moved(lots, takes, -1)


def put_back(lots: Sequence[Lot], takes: Sequence[Take]) -> tuple[Lot, ...]:
    """The lots after a reversal put back exactly `takes`, into the same lots (so with their
    own availability and expiry; points put back into an expired lot expire again)."""
    return _moved(lots, takes, +1)


# --- tiers --------------------------------------------------------------------------------------


class TierBasis(enum.StrEnum):
    POINTS_EARNED = "points_earned"
    SPEND_FEN = "spend_fen"


class TierPeriod(enum.StrEnum):
    CALENDAR_MONTH = "calendar_month"
    CALENDAR_QUARTER = "calendar_quarter"
    CALENDAR_YEAR = "calendar_year"


class Downgrade(enum.StrEnum):
    NEVER = "never"
    PERIOD_END = "period_end"


PERIOD_MONTHS: Final = {
    TierPeriod.CALENDAR_MONTH: 1,
    TierPeriod.CALENDAR_QUARTER: 3,
    TierPeriod.CALENDAR_YEAR: 12,
}


@dataclass(frozen=True, slots=True)
class Tier:
    """A tier: reached at `threshold` (points or fen, per the policy's basis)."""

    code: str
    threshold: int
    multiplier_pct: int  # 100 = the program's own rate


@dataclass(frozen=True, slots=True)
class TierPolicy:
    """A tier ladder (lowest first) and how a member climbs and falls on it."""

    tiers: tuple[Tier, ...]
    basis: TierBasis = TierBasis.POINTS_EARNED
    period: TierPeriod = TierPeriod.CALENDAR_YEAR
    downgrade: Downgrade = Downgrade.PERIOD_END


def check_tiers(tiers: Sequence[Tier]) -> tuple[Problem, ...]:
    """1..POINTS_TIERS_MAX tiers with unique codes, thresholds from 0 strictly increasing, and
    multipliers from 100 % that never fall on the way up."""
    found = []
    if not 1 <= len(tiers) <= limits.POINTS_TIERS_MAX:
        found.append(Problem("tiers", f"1 to {limits.POINTS_TIERS_MAX} tiers"))
    for index, tier in enumerate(tiers):
        at = f"tiers[{index}]"
        found += _code_problem(tier.code, f"{at}.code")
        found += _range_problem(tier.threshold, 0, limits.BALANCE_MAX, f"{at}.threshold")
        found += _range_problem(
            tier.multiplier_pct, PCT, limits.POINTS_MULTIPLIER_PCT_MAX, f"{at}.multiplier_pct"
        )
        below = tiers[index - 1] if index else None
        if below and tier.threshold <= below.threshold:
            found.append(Problem(f"{at}.threshold", "thresholds increase strictly"))
        if below and tier.multiplier_pct < below.multiplier_pct:
            found.append(Problem(f"{at}.multiplier_pct", "a higher tier never earns less"))
    if len({tier.code for tier in tiers}) != len(tiers):
        found.append(Problem("tiers", "tier codes are unique"))
    return tuple(found)


def tier_for(tiers: Sequence[Tier], value: int) -> Tier | None:
    """The tier with the highest threshold not above `value` (None: below every tier)."""
    reached = [tier for tier in tiers if tier.threshold <= value]
    return max(reached, key=lambda tier: tier.threshold, default=None)


def period_bounds(policy: TierPolicy, tz: str, now_ms: int) -> tuple[int, int]:
    """The local calendar period holding `now_ms`: [start_ms, end_ms)."""
    today = local_date(tz, now_ms)
    months = PERIOD_MONTHS[policy.period]
    first_month = (today.month - 1) // months * months + 1
    start = datetime.date(today.year, first_month, 1)
    return day_start_ms(tz, start), day_start_ms(tz, add_months(start, months))


def next_tier(
    current: Tier | None, value: int, *, at_period_end: bool, policy: TierPolicy
) -> Tier | None:
    """A member's tier given the period's `value`: up at once when it reaches a higher
    threshold; at a period's end under downgrade "period_end", the tier that value qualifies
    for; otherwise never down."""
    qualified = tier_for(policy.tiers, value)
    if at_period_end and policy.downgrade is Downgrade.PERIOD_END:
        return qualified
    if current is None or (qualified and qualified.threshold > current.threshold):
        return qualified
    return current


# --- transfers and redemption -------------------------------------------------------------------


def check_transfer(program: Program, points: int, transferred_today: int) -> str | None:
    """The refusal code of a member giving `points` after giving `transferred_today` in the
    program's local day, or None: allowed by the program, positive, within the per-transfer
    and per-day maxima."""
    assert transferred_today >= 0
    policy = program.transfer
    if not policy.allowed:
        return TRANSFER_NOT_ALLOWED
    if points <= 0:
        return POINTS_NOT_POSITIVE
    if points > policy.per_transfer_max_points:
        return TRANSFER_OVER_LIMIT
    if transferred_today + points > policy.per_day_max_points:
        return TRANSFER_OVER_DAILY_LIMIT
    return None


def fen_for_points(program: Program, points: int, *, exact: bool = False) -> int:
    """What `points` are worth: whole blocks only, (points // redeem_points) x redeem_fen.
    With `exact`, points that are not whole blocks are refused."""
    _check_points(points)
    blocks, rest = divmod(points, program.redeem_points)
    if exact and rest:
        raise PointsRefused(REDEEM_NOT_WHOLE_BLOCKS, "points in whole blocks only", "points")
    return blocks * program.redeem_fen


def points_for_fen(program: Program, fen: int, *, exact: bool = False) -> int:
    """The fewest whole-block points worth at least `fen`. With `exact`, an amount that is not
    a whole number of blocks is refused."""
    if fen <= 0:
        raise PointsRefused(AMOUNT_NOT_POSITIVE, "the amount must be positive", "amount_fen")
    if exact and fen % program.redeem_fen:
        raise PointsRefused(
            REDEEM_NOT_WHOLE_BLOCKS, "the amount in whole blocks only", "amount_fen"
        )
    points = -(-fen // program.redeem_fen) * program.redeem_points  # blocks, rounded up
    _check_points(points)
    return points


# --- definitions as JSON, lots as ledger accounts ---------------------------------------------


def program_json(p: Program) -> dict[str, object]:
    """A program's definition as the admin API shows it and the database keeps it."""
    return {
        "code": p.code,
        "asset": p.asset,
        "timezone": p.timezone,
        "pending_days": p.pending_days,
        "expiry": {
            "kind": str(p.expiry.kind),
            "months": p.expiry.months,
            "month": p.expiry.month,
            "day": p.expiry.day,
        },
        "redeem_points": p.redeem_points,
        "redeem_fen": p.redeem_fen,
        "negative_policy": str(p.negative_policy),
        "transfer": {
            "allowed": p.transfer.allowed,
            "per_transfer_max_points": p.transfer.per_transfer_max_points,
            "per_day_max_points": p.transfer.per_day_max_points,
        },
    }


def program_of(raw: Mapping[str, object]) -> Program:
    """The program of a definition whose shape the API schema already checked (`check_program`
    then judges its values). Missing parts take the defaults."""
    expiry = raw.get("expiry") or {}
    transfer = raw.get("transfer") or {}
    assert isinstance(expiry, Mapping)
    assert isinstance(transfer, Mapping)
    base = Program(code=str(raw["code"]))
    return Program(
        code=base.code,
        asset=str(raw.get("asset", base.asset)),
        timezone=str(raw.get("timezone", base.timezone)),
        pending_days=_int(raw.get("pending_days", base.pending_days)),
        expiry=Expiry(
            kind=ExpiryKind(str(expiry.get("kind", ExpiryKind.NEVER))),
            months=_int(expiry.get("months", 0)),
            month=_int(expiry.get("month", 12)),
            day=_int(expiry.get("day", 31)),
        ),
        redeem_points=_int(raw.get("redeem_points", base.redeem_points)),
        redeem_fen=_int(raw.get("redeem_fen", base.redeem_fen)),
        negative_policy=NegativePolicy(str(raw.get("negative_policy", base.negative_policy))),
        transfer=TransferPolicy(
            allowed=bool(transfer.get("allowed", False)),
            per_transfer_max_points=_int(transfer.get("per_transfer_max_points", 0)),
            per_day_max_points=_int(transfer.get("per_day_max_points", 0)),
        ),
    )


def rule_json(r: Rule) -> dict[str, object]:
    """A rule's definition as the admin API shows it and the database keeps it."""
    return {
        "code": r.code,
        "kind": str(r.kind),
        "priority": r.priority,
        "points": r.points,
        "per_fen": r.per_fen,
        "bonus_pct": r.bonus_pct,
        "departments": sorted(r.departments),
        "categories": sorted(r.categories),
        "min_spend_fen": r.min_spend_fen,
        "cap_per_txn_points": r.cap_per_txn_points,
        "cap_per_day_points": r.cap_per_day_points,
        "valid_from": None if r.valid_from is None else r.valid_from.isoformat(),
        "valid_to": None if r.valid_to is None else r.valid_to.isoformat(),
        "window": None if r.window is None else list(r.window),
        "weekdays": sorted(r.weekdays),
        "stores": sorted(r.stores),
        "stackable": r.stackable,
        "card_class_multiplier": r.card_class_multiplier,
        "tier_multiplier": r.tier_multiplier,
    }


def rule_of(raw: Mapping[str, object]) -> Rule:
    """The rule of a definition whose shape the API schema already checked; a date that is
    not a real ISO date raises PointsRefused (RULE_INVALID) naming its field."""
    window = raw.get("window")
    base = Rule(code=str(raw["code"]), kind=RuleKind(str(raw["kind"])))
    return Rule(
        code=base.code,
        kind=base.kind,
        priority=_int(raw.get("priority", base.priority)),
        points=_int(raw.get("points", base.points)),
        per_fen=_int(raw.get("per_fen", base.per_fen)),
        bonus_pct=_int(raw.get("bonus_pct", base.bonus_pct)),
        departments=_names(raw.get("departments")),
        categories=_names(raw.get("categories")),
        min_spend_fen=_int(raw.get("min_spend_fen", 0)),
        cap_per_txn_points=_opt(raw.get("cap_per_txn_points")),
        cap_per_day_points=_opt(raw.get("cap_per_day_points")),
        valid_from=_date(raw.get("valid_from"), "valid_from"),
        valid_to=_date(raw.get("valid_to"), "valid_to"),
        window=None if not isinstance(window, list) else (str(window[0]), str(window[1])),
        weekdays=frozenset(_int(d) for d in _list(raw.get("weekdays"))),
        stores=_names(raw.get("stores")),
        stackable=bool(raw.get("stackable", True)),
        card_class_multiplier=bool(raw.get("card_class_multiplier", True)),
        tier_multiplier=bool(raw.get("tier_multiplier", True)),
    )


def _int(value: object) -> int:
    assert isinstance(value, int), value
    assert not isinstance(value, bool), value
    return value


def _opt(value: object) -> int | None:
    return None if value is None else _int(value)


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []


def _names(value: object) -> frozenset[str]:
    return frozenset(str(v) for v in _list(value))


def _date(value: object, field: str) -> datetime.date | None:
    if value is None:
        return None
    try:
        return datetime.date.fromisoformat(str(value))
    except ValueError:
        raise PointsRefused(RULE_INVALID, "a date is YYYY-MM-DD", field) from None


LOT_PREFIX: Final = "lot:"
DEBT_PURPOSE: Final = "debt"
_NEVER: Final = "never"
_AT_ONCE: Final = "0"


def lot_purpose(program: Program, earned_ms: int) -> str:
    """The ledger purpose of the lot account points earned at `earned_ms` go to: its expiry
    day and its availability day, so every earning with the same two lands in one account
    (`lot:20270531:20260408`; `never` and `0` for no expiry and no return window)."""
    last = expiry_day(program.expiry, local_date(program.timezone, earned_ms))
    expires = _NEVER if last is None else last.strftime("%Y%m%d")
    if program.pending_days == 0:
        return f"{LOT_PREFIX}{expires}:{_AT_ONCE}"
    usable = local_date(program.timezone, earned_ms) + datetime.timedelta(days=program.pending_days)
    return f"{LOT_PREFIX}{expires}:{usable.strftime('%Y%m%d')}"


def lot_of(program: Program, purpose: str, remaining: int) -> Lot:
    """The lot a lot account holds (`lot_purpose`'s inverse), with what is left in it."""
    assert purpose.startswith(LOT_PREFIX), purpose
    expires, usable = purpose[len(LOT_PREFIX) :].split(":")
    tz = program.timezone
    expires_at = (
        None if expires == _NEVER else day_start_ms(tz, _ymd(expires) + datetime.timedelta(days=1))
    )
    available_at = 0 if usable == _AT_ONCE else day_start_ms(tz, _ymd(usable))
    return Lot(purpose, available_at, expires_at, max(remaining, 0))


def lot_expiry_day(purpose: str) -> str:
    """A lot account's expiry day as its purpose names it (YYYYMMDD, `never` for none): the
    day the expiry job's notices of a holder's lots are grouped by."""
    assert purpose.startswith(LOT_PREFIX), purpose
    return purpose[len(LOT_PREFIX) :].split(":", maxsplit=1)[0]


def _ymd(text: str) -> datetime.date:
    return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
