"""E-coupons as the host sees them: codes, campaigns, what a coupon takes off a bill at the
POS and who pays for it, campaign figures and the signed QR payload. Pure: no I/O, no clock,
no randomness of its own (callers pass `secrets.token_bytes`), no cryptography (signatures
are `cardcore.vault`'s). Money is `int` fen.

Codes
-----
A code is `limits.COUPON_CODE_CHARS_DEFAULT` random Crockford base32 symbols (0-9 and A-Z without
I, L, O, U), five random bits each, and one check symbol: the code read as a base-32 number,
mod 37, written in `CHECK_ALPHABET`. A typed code is normalized first (upper case, spaces and
hyphens dropped, I and L read as 1, O as 0). A mistyped generated code fails its check
symbol; the service still looks its spelling up as a partner code (`candidates`), and it is
answered `coupon_not_found`. Partner codes are imported as they are
(`check_imported`): 4 to `limits.COUPON_IMPORTED_CHARS_MAX` of A-Z, 0-9 and "-".

Signed QR
---------
The QR text is `v1|CODE|ISSUER|EXPIRY_MS|NONCE_HEX|KID|SIGNATURE`, the signature an Ed25519
signature (base64url, no padding) of the ASCII bytes before the last "|", under the key the
issuing legal entity names `KID`. `parse_qr` only checks the shape; the service verifies the
signature (`cardcore.vault.ed25519_verify`), the expiry and the nonce.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import enum
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from cardcore import limits
from cardcore.org.model import CODE, Refused

BP_WHOLE = 10_000  # basis points in the whole: shares sum to it, 100 % off is it
MS_PER_DAY = 86_400_000

# --- codes -------------------------------------------------------------------------------------

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
CHECK_ALPHABET = ALPHABET + "*~$=U"  # the 37 check symbols
CODE_MALFORMED = "coupon_code_malformed"

_SYMBOL_VALUE = {symbol: value for value, symbol in enumerate(ALPHABET)}
_BITS_PER_SYMBOL = 5
# ASCII only: a non-ASCII letter is never folded into an ASCII one, so it stays malformed.
_TYPED = str.maketrans(
    {
        **{chr(c): chr(c - 32) for c in range(ord("a"), ord("z") + 1)},
        "i": "1",
        "I": "1",
        "l": "1",
        "L": "1",
        "o": "0",
        "O": "0",
        " ": None,
        "-": None,
    }
)
_IMPORTED = re.compile(
    rf"[A-Z0-9-]{{{limits.COUPON_IMPORTED_CHARS_MIN},{limits.COUPON_IMPORTED_CHARS_MAX}}}"
)


def _malformed(message: str, field: str = "code") -> Refused:
    return Refused("invalid", CODE_MALFORMED, message, field)


def check_symbol(symbols: str) -> str:
    """Crockford's check symbol of `symbols`: their base-32 value mod 37."""
    value = 0
    for symbol in symbols:
        value = (value * 32 + _SYMBOL_VALUE[symbol]) % 37
    return CHECK_ALPHABET[value]


def new_code(
    randbytes: Callable[[int], bytes], length: int = limits.COUPON_CODE_CHARS_DEFAULT
) -> str:
    """A fresh code: `length` random symbols and their check symbol. Each symbol takes the
    next five bits of `randbytes` (a CSPRNG: `secrets.token_bytes`), so every symbol is
    equally likely: no modulo bias."""
    assert limits.COUPON_CODE_CHARS_MIN <= length <= limits.COUPON_CODE_CHARS_MAX, length
    count = (length * _BITS_PER_SYMBOL + 7) // 8
    drawn = randbytes(count)
    assert len(drawn) == count, len(drawn)
    number = int.from_bytes(drawn, "big") >> (count * 8 - length * _BITS_PER_SYMBOL)
    shifts = range((length - 1) * _BITS_PER_SYMBOL, -1, -_BITS_PER_SYMBOL)
    symbols = "".join(ALPHABET[(number >> shift) & 0b11111] for shift in shifts)
    return symbols + check_symbol(symbols)


def normalize(text: str) -> str:
    """A code as typed, in its one spelling: ends trimmed, ASCII upper case, spaces and hyphens
    dropped, I and L read as 1, O as 0. Checks nothing (`parse` does)."""
    return text.strip().translate(_TYPED)


def parse(text: str, length: int = limits.COUPON_CODE_CHARS_DEFAULT) -> str:
    """The code `text` spells, or `coupon_code_malformed`: wrong length, a symbol outside the
    alphabet, or a check symbol that does not match (most typos)."""
    if len(text) > limits.COUPON_TYPED_CHARS_MAX:
        raise _malformed(f"a coupon code is at most {limits.COUPON_TYPED_CHARS_MAX} characters")
    code = normalize(text)
    symbols, check = code[:-1], code[-1:]
    if len(symbols) != length or not all(symbol in _SYMBOL_VALUE for symbol in symbols):
        raise _malformed(f"a coupon code is {length} symbols and a check symbol")
    if check != check_symbol(symbols):
        raise _malformed("the coupon code does not add up: check it for a typo")
    return code


def display(code: str) -> str:
    """The code in groups of four, joined by hyphens, as printed and shown."""
    return "-".join(code[start : start + 4] for start in range(0, len(code), 4))


def check_imported(code: str) -> str:
    """A partner's code as imported (ends trimmed, upper case), or `coupon_code_malformed`:
    4 to `COUPON_IMPORTED_CHARS_MAX` of A-Z, 0-9 and "-", not only hyphens. No check symbol."""
    text = code.strip().upper() if code.isascii() else ""
    if not _IMPORTED.fullmatch(text) or not text.strip("-"):
        raise _malformed(
            f"an imported coupon code is {limits.COUPON_IMPORTED_CHARS_MIN} to "
            f"{limits.COUPON_IMPORTED_CHARS_MAX} letters, digits or hyphens"
        )
    return text


# --- campaigns ---------------------------------------------------------------------------------


class CouponKind(enum.StrEnum):
    AMOUNT_OFF = "amount_off"  # value_fen off the bill
    PERCENT_OFF = "percent_off"  # percent_bp of the eligible amount, at most cap_fen
    GIFT_ITEM = "gift_item"  # an item (item_sku) given away; value_fen is its cost


class ChangeRule(enum.StrEnum):
    """What an amount-off coupon worth more than the bill does."""

    FORFEIT = "forfeit"  # takes the whole bill off; the rest is lost
    REFUSE = "refuse"  # is refused (coupon_exceeds_bill)


class CampaignState(enum.StrEnum):
    DRAFT = "draft"
    ACTIVE = "active"  # the only state whose coupons redeem
    PAUSED = "paused"
    ENDED = "ended"


@dataclass(frozen=True, slots=True, kw_only=True)
class Campaign:
    """A coupon campaign. Zero means unlimited for `max_issued`, `max_value_fen`, `cap_fen`,
    `per_member_max` and `per_member_per_day_max`; an empty `stores` means every store of the
    issuing scope, an empty `departments` the whole bill. Valid in [valid_from_ms,
    valid_to_ms), UTC ms, as the admin API is given them (the caller turns local dates into
    instants); the per-day limits count days in the group's zone (`service.TIMEZONE`)."""

    code: str
    name: str
    kind: CouponKind
    valid_from_ms: int
    valid_to_ms: int
    value_fen: int = 0  # amount_off: the face value; gift_item: the item's cost
    percent_bp: int = 0  # percent_off: 1..10000
    cap_fen: int = 0  # percent_off: the largest discount
    item_sku: str = ""  # gift_item: the item given
    store_share_bp: int = BP_WHOLE  # who pays the discount: store and supplier, sum 10000
    supplier_share_bp: int = 0
    supplier_id: str = ""  # required when the supplier pays a share
    max_issued: int = 0  # codes
    max_value_fen: int = 0  # face or discount value over the campaign
    min_spend_fen: int = 0  # of the eligible amount
    stores: tuple[str, ...] = ()
    departments: tuple[str, ...] = ()
    per_member_max: int = 0  # redemptions per member over the campaign
    per_member_per_day_max: int = 0
    holder_only: bool = False  # only the member the code was issued to; else the bearer
    stackable: bool = False  # may be combined with other coupons in one transaction
    change_rule: ChangeRule = ChangeRule.FORFEIT
    state: CampaignState = CampaignState.DRAFT


def _invalid(field: str, message: str) -> Refused:
    return Refused("invalid", "invalid", message, field)


def _check_int(field: str, value: int, low: int, high: int) -> None:
    """An int (never a float or a bool) in low..high."""
    if type(value) is not int or not low <= value <= high:
        raise _invalid(field, f"{field} is a whole number from {low} to {high}")


def _check_code(field: str, value: str) -> None:
    if not CODE.fullmatch(value):
        raise _invalid(field, f"{field} is 1-32 letters, digits, '.', '_' or '-'")


def _check_codes(field: str, values: tuple[str, ...], most: int) -> None:
    """At most `most` distinct codes."""
    if len(values) > most or len(set(values)) != len(values):
        raise _invalid(field, f"{field} names at most {most} distinct codes")
    for value in values:
        _check_code(field, value)


def _check_naming(c: Campaign) -> None:
    _check_code("code", c.code)
    name_ok = c.name.strip() and c.name.isprintable()
    if not name_ok or len(c.name) > limits.COUPON_NAME_CHARS_MAX:
        raise _invalid("name", f"name is 1-{limits.COUPON_NAME_CHARS_MAX} printable characters")


def _check_unset(field: str, value: object, kind: CouponKind) -> None:
    if value:
        raise _invalid(field, f"a {kind} campaign leaves {field} unset")


def _check_kind(c: Campaign) -> None:
    """Each kind sets its own fields and leaves the others' unset."""
    top = limits.COUPON_VALUE_FEN_MAX
    if c.kind is CouponKind.PERCENT_OFF:
        _check_int("percent_bp", c.percent_bp, 1, BP_WHOLE)
        _check_int("cap_fen", c.cap_fen, 0, top)
        _check_unset("value_fen", c.value_fen, c.kind)
    else:
        _check_int("value_fen", c.value_fen, 1, top)
        _check_unset("percent_bp", c.percent_bp, c.kind)
        _check_unset("cap_fen", c.cap_fen, c.kind)
    if c.kind is CouponKind.GIFT_ITEM:
        _check_code("item_sku", c.item_sku)
    else:
        _check_unset("item_sku", c.item_sku, c.kind)


def _check_funding(c: Campaign) -> None:
    """The store and the supplier share the cost; a paying supplier is named."""
    _check_int("store_share_bp", c.store_share_bp, 0, BP_WHOLE)
    _check_int("supplier_share_bp", c.supplier_share_bp, 0, BP_WHOLE)
    if c.store_share_bp + c.supplier_share_bp != BP_WHOLE:
        raise _invalid("supplier_share_bp", "store and supplier shares sum to 10000 bp")
    if c.supplier_id or c.supplier_share_bp:
        _check_code("supplier_id", c.supplier_id)


def _check_bounds(c: Campaign) -> None:
    """Budgets, validity, minimum spend, places and per-member limits."""
    _check_int("max_issued", c.max_issued, 0, limits.COUPON_ISSUED_MAX)
    _check_int("max_value_fen", c.max_value_fen, 0, limits.AMOUNT_MAX)
    _check_int("min_spend_fen", c.min_spend_fen, 0, limits.COUPON_VALUE_FEN_MAX)
    _check_int("valid_from_ms", c.valid_from_ms, 0, limits.AMOUNT_MAX)
    longest_ms = limits.COUPON_VALIDITY_DAYS_MAX * MS_PER_DAY
    span_ms = c.valid_to_ms - c.valid_from_ms if type(c.valid_to_ms) is int else 0
    if not 0 < span_ms <= longest_ms:
        days = limits.COUPON_VALIDITY_DAYS_MAX
        raise _invalid("valid_to_ms", f"valid_to_ms is after valid_from_ms, by {days} days at most")
    _check_codes("stores", c.stores, limits.COUPON_STORES_MAX)
    _check_codes("departments", c.departments, limits.COUPON_DEPARTMENTS_MAX)
    _check_int("per_member_max", c.per_member_max, 0, limits.COUPON_PER_MEMBER_MAX)
    daily_max = c.per_member_max or limits.COUPON_PER_MEMBER_MAX
    _check_int("per_member_per_day_max", c.per_member_per_day_max, 0, daily_max)


def check_campaign(c: Campaign) -> None:
    """Refuse a bad definition (400 `invalid`, naming the field): a code or name out of shape;
    a kind's fields wrong (amount_off and gift_item: value_fen 1..COUPON_VALUE_FEN_MAX;
    percent_off: percent_bp 1..10000, cap_fen 0..COUPON_VALUE_FEN_MAX; gift_item: item_sku);
    shares not summing to 10000 or a paying supplier unnamed; negative budgets; an empty or
    too long validity (valid_to_ms after valid_from_ms, at most COUPON_VALIDITY_DAYS_MAX);
    repeated or malformed stores and departments; a daily limit above the campaign's."""
    _check_naming(c)
    _check_kind(c)
    _check_funding(c)
    _check_bounds(c)


def budget_room(c: Campaign, issued: int, value_used_fen: int, count: int, value_fen: int) -> bool:
    """Whether the budgets have room for `count` more codes worth `value_fen` more, after
    `issued` codes worth `value_used_fen` (the service counts; zero budgets are unlimited)."""
    assert min(issued, value_used_fen, count, value_fen) >= 0
    if c.max_issued and issued + count > c.max_issued:
        return False
    return not c.max_value_fen or value_used_fen + value_fen <= c.max_value_fen


# --- issuing to a spend segment ----------------------------------------------------------------

_ISO_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")


def _segment_value(field: str, message: str) -> Refused:
    return Refused("invalid", "invalid_value", message, f"segment.{field}")


def _local_date(field: str, text: str) -> datetime.date:
    """A YYYY-MM-DD calendar date (nothing else ISO 8601 allows: no week dates, no 20250101)."""
    found = _ISO_DATE.fullmatch(text)
    if found is None:
        raise _segment_value(field, f"{field} is a date YYYY-MM-DD")
    try:
        day = datetime.date(*(int(part) for part in found.groups()))
    except ValueError:
        raise _segment_value(field, f"{field} is not a calendar date") from None
    low, high = limits.COUPON_SEGMENT_YEAR_MIN, limits.COUPON_SEGMENT_YEAR_MAX
    if not low <= day.year <= high:
        raise _segment_value(field, f"{field} is a date in the years {low} to {high}")
    return day


def spend_period(
    spend_at_least: int, since: str, until: str
) -> tuple[datetime.date, datetime.date]:
    """The first and last local day of a spend segment (`{"spend_at_least", "program",
    "since", "until"}`), both included, or 400 `invalid_value` naming the field: a spend
    below 1 fen (or past AMOUNT_MAX), a date that is not YYYY-MM-DD or not in the calendar
    (2025-02-30), `until` before `since`, more than COUPON_SEGMENT_DAYS_MAX days."""
    if type(spend_at_least) is not int or not 1 <= spend_at_least <= limits.AMOUNT_MAX:
        raise _segment_value(
            "spend_at_least", f"spend_at_least is a whole number of fen, 1 to {limits.AMOUNT_MAX}"
        )
    first, last = _local_date("since", since), _local_date("until", until)
    if last < first:
        raise _segment_value("until", "until is before since")
    days = (last - first).days + 1
    if days > limits.COUPON_SEGMENT_DAYS_MAX:
        most = limits.COUPON_SEGMENT_DAYS_MAX
        raise _segment_value("until", f"the period is {days} days, at most {most}")
    return first, last


# --- at the POS --------------------------------------------------------------------------------


class CodeStatus(enum.StrEnum):
    ISSUED = "issued"  # redeemable
    RESERVED = "reserved"  # held by a transaction in progress
    REDEEMED = "redeemed"
    VOIDED = "voided"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class CodeState:
    """One code as stored: its status, the member it was issued to, its own expiry."""

    status: CodeStatus
    holder_member_id: int | None = None
    expiry_ms: int | None = None  # None: the campaign's end


@dataclass(frozen=True, slots=True)
class Line:
    """The amount of one department in the basket."""

    department: str
    amount_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """The transaction a coupon is presented in, as the service sees it: it validated the
    POS's amounts, counted the member's redemptions, and knows whether the store belongs to
    the campaign's issuing scope."""

    now_ms: int
    store: str
    bill_fen: int
    lines: tuple[Line, ...] | None = None  # the basket by department, when the POS sends it
    member_id: int | None = None  # the member of the card presented
    member_redeemed: int = 0  # this member's redemptions of this campaign so far
    member_redeemed_today: int = 0
    others_in_transaction: int = 0  # coupons already taken in this transaction
    others_stackable: bool = True  # whether all of those may be combined
    others_discount_fen: int = 0  # what those take off the bill together
    # those of them scoped to departments: (their departments, what each takes off)
    others_scoped: tuple[tuple[tuple[str, ...], int], ...] = ()
    store_in_scope: bool = True


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the coupon redeems, and if so what it takes off the bill (`discount_fen`),
    what is lost (`forfeited_fen`) and who pays: store and supplier costs sum to the discount,
    or to the gift's value."""

    ok: bool
    refusal: str = ""  # a stable code of REFUSALS when not ok
    discount_fen: int = 0
    forfeited_fen: int = 0
    store_cost_fen: int = 0
    supplier_cost_fen: int = 0
    gift_sku: str = ""  # gift_item: the item the cashier hands over


REFUSALS = {
    "coupon_not_found": "no such coupon",  # the service's
    "coupon_not_started": "the coupon is not valid yet",
    "coupon_expired": "the coupon has expired",
    "coupon_used": "the coupon has been used",
    "coupon_reserved": "the coupon is held by another transaction",
    "coupon_inactive": "the coupon or its campaign is not active",
    "coupon_wrong_store": "the coupon is not valid in this store",
    "coupon_wrong_department": "the coupon applies to none of these goods",
    "coupon_min_spend": "the bill is below the coupon's minimum spend",
    "coupon_not_holder": "the coupon belongs to another member",
    "coupon_member_limit": "the member has used this campaign's coupons as often as allowed",
    "coupon_daily_limit": "the member has used this campaign's coupons as often as allowed today",
    "coupon_not_stackable": "the coupon cannot be combined with the other coupons",
    "coupon_exceeds_bill": "the coupon is worth more than the bill",
    "coupon_nothing_left": "the sale's other coupons left nothing for this one to take",
}

_STATUS_REFUSAL = {
    CodeStatus.RESERVED: "coupon_reserved",
    CodeStatus.REDEEMED: "coupon_used",
    CodeStatus.VOIDED: "coupon_inactive",
    CodeStatus.EXPIRED: "coupon_expired",
}


def _check_context(ctx: Context) -> None:
    """The service hands over validated, bounded figures: anything else is a bug."""
    assert 0 <= ctx.bill_fen <= limits.AMOUNT_MAX, ctx.bill_fen
    assert min(ctx.member_redeemed, ctx.member_redeemed_today, ctx.others_in_transaction) >= 0
    assert 0 <= ctx.others_discount_fen <= limits.AMOUNT_MAX, ctx.others_discount_fen
    assert all(0 <= fen <= limits.AMOUNT_MAX for _, fen in ctx.others_scoped), ctx.others_scoped
    if ctx.lines is not None:
        assert len(ctx.lines) <= limits.COUPON_BASKET_LINES_MAX, len(ctx.lines)
        assert all(0 <= line.amount_fen <= limits.AMOUNT_MAX for line in ctx.lines)


def _refuse_time(c: Campaign, code: CodeState, now_ms: int) -> str:
    """Valid from the campaign's start until the earlier of its end and the code's expiry."""
    if now_ms < c.valid_from_ms:
        return "coupon_not_started"
    ends_ms = c.valid_to_ms if code.expiry_ms is None else min(c.valid_to_ms, code.expiry_ms)
    return "coupon_expired" if now_ms >= ends_ms else ""


def _refuse_place(c: Campaign, ctx: Context) -> str:
    """The store is in the campaign's scope and list; a department-scoped coupon needs the
    basket's lines and one of its departments among them."""
    if not ctx.store_in_scope or (c.stores and ctx.store not in c.stores):
        return "coupon_wrong_store"
    if c.departments and not any(line.department in c.departments for line in ctx.lines or ()):
        return "coupon_wrong_department"
    return ""


def _refuse_member(c: Campaign, code: CodeState, ctx: Context) -> str:
    """The holder's own coupon, and the member's limits (which need the member's card)."""
    holder = code.holder_member_id
    if c.holder_only and (holder is None or ctx.member_id != holder):
        return "coupon_not_holder"
    limited = c.per_member_max or c.per_member_per_day_max
    if limited and ctx.member_id is None:
        return "coupon_member_limit"
    if c.per_member_max and ctx.member_redeemed >= c.per_member_max:
        return "coupon_member_limit"
    if c.per_member_per_day_max and ctx.member_redeemed_today >= c.per_member_per_day_max:
        return "coupon_daily_limit"
    return ""


def _refuse_stacking(c: Campaign, ctx: Context) -> str:
    """A coupon joins others only if it and all of them are stackable, up to the bound."""
    others = ctx.others_in_transaction
    if others >= limits.COUPON_PER_TRANSACTION_MAX:
        return "coupon_not_stackable"
    if others and not (c.stackable and ctx.others_stackable):
        return "coupon_not_stackable"
    return ""


def eligible_fen(c: Campaign, ctx: Context) -> int:
    """What the coupon applies to: the bill, or the department lines it names (never more
    than the bill)."""
    if not c.departments:
        return ctx.bill_fen
    lines = ctx.lines or ()
    scoped_fen = sum(line.amount_fen for line in lines if line.department in c.departments)
    return min(ctx.bill_fen, scoped_fen)


def split_cost(c: Campaign, cost_fen: int) -> tuple[int, int]:
    """(store, supplier) shares of `cost_fen`; the rounding remainder is the store's."""
    supplier_fen = cost_fen * c.supplier_share_bp // BP_WHOLE
    return cost_fen - supplier_fen, supplier_fen


def _granted(c: Campaign, discount_fen: int, forfeited_fen: int, cost_fen: int) -> Verdict:
    store_fen, supplier_fen = split_cost(c, cost_fen)
    sku = c.item_sku if c.kind is CouponKind.GIFT_ITEM else ""
    return Verdict(True, "", discount_fen, forfeited_fen, store_fen, supplier_fen, sku)


def _discount(c: Campaign, eligible: int) -> Verdict:
    """amount_off: its value, at most the eligible amount (the rest forfeited, or refused under
    "refuse"); percent_off: floor(eligible * bp / 10000), at most cap_fen; gift_item: none,
    its value is the cost."""
    if c.kind is CouponKind.GIFT_ITEM:
        return _granted(c, 0, 0, c.value_fen)
    if c.kind is CouponKind.PERCENT_OFF:
        discount = eligible * c.percent_bp // BP_WHOLE
        discount = min(discount, c.cap_fen) if c.cap_fen else discount
        if discount == 0:  # a few fen at a small percent round down to nothing
            return Verdict(False, "coupon_nothing_left")
        return _granted(c, discount, 0, discount)
    if c.value_fen > eligible and c.change_rule is ChangeRule.REFUSE:
        return Verdict(False, "coupon_exceeds_bill")
    discount = min(c.value_fen, eligible)
    return _granted(c, discount, c.value_fen - discount, discount)


def evaluate(c: Campaign, code: CodeState, ctx: Context) -> Verdict:
    """Whether `code` of campaign `c` redeems in `ctx`, the first failed rule in this order:

    1. the code is issued: reserved -> coupon_reserved, redeemed -> coupon_used, voided ->
       coupon_inactive, expired -> coupon_expired;
    2. the campaign is active, else coupon_inactive;
    3. now is in [valid_from_ms, min(valid_to_ms, the code's expiry_ms)): before ->
       coupon_not_started, after -> coupon_expired;
    4. the store is in the issuing scope and in `stores` (if any), else coupon_wrong_store;
    5. a department-scoped coupon sees lines of its departments, else coupon_wrong_department;
    6. holder_only: the presented card's member is the holder, else coupon_not_holder;
    7. per-member limits need a member card and room: coupon_member_limit, coupon_daily_limit;
    8. with other coupons in the transaction, this one and all of them are stackable (and
       fewer than COUPON_PER_TRANSACTION_MAX), else coupon_not_stackable;
    9. the eligible amount (the bill, or its lines in the departments) reaches min_spend_fen,
       else coupon_min_spend;
    10. an amount_off coupon worth more than the eligible amount under "refuse" ->
        coupon_exceeds_bill; under "forfeit" it takes the eligible amount, the rest forfeited.
        An amount-off or percent-off coupon with nothing left to take (the sale's other
        coupons took it all), or a percent-off one whose discount rounds down to 0 fen ->
        coupon_nothing_left, under either rule.

    From step 10 on, the eligible amount is at most what the transaction's other coupons left
    of the bill: two coupons of one sale never take off more than the bill together (the
    minimum spend is of the basket, before any coupon). A department-scoped coupon's lines
    are also less what the sale's other coupons scoped to any of its departments took (all
    of it, whichever of their departments they took it from): two coupons never take more
    than a department's lines together.
    """
    _check_context(ctx)
    refusal = (
        _STATUS_REFUSAL.get(code.status, "")
        or ("" if c.state is CampaignState.ACTIVE else "coupon_inactive")
        or _refuse_time(c, code, ctx.now_ms)
        or _refuse_place(c, ctx)
        or _refuse_member(c, code, ctx)
        or _refuse_stacking(c, ctx)
    )
    if refusal:
        return Verdict(False, refusal)
    eligible = eligible_fen(c, ctx)
    if eligible < c.min_spend_fen:
        return Verdict(False, "coupon_min_spend")
    left = max(0, ctx.bill_fen - ctx.others_discount_fen)
    if c.departments:
        mine = set(c.departments)
        taken = sum(fen for departments, fen in ctx.others_scoped if mine.intersection(departments))
        left = min(left, max(0, eligible - taken))
    if min(eligible, left) == 0 and c.kind is not CouponKind.GIFT_ITEM:
        return Verdict(False, "coupon_nothing_left")  # never used up for no discount at all
    return _discount(c, min(eligible, left))


# --- figures -----------------------------------------------------------------------------------


def figures(
    issued: int, redeemed: int, expired: int, store_cost_fen: int, supplier_cost_fen: int
) -> dict[str, int]:
    """A campaign's figures; the redemption rate in basis points of the codes issued (0 when
    none were), rounded down."""
    assert min(issued, redeemed, expired, store_cost_fen, supplier_cost_fen) >= 0
    return {
        "issued": issued,
        "redeemed": redeemed,
        "expired": expired,
        "redemption_rate_bp": redeemed * BP_WHOLE // issued if issued else 0,
        "store_cost_fen": store_cost_fen,
        "supplier_cost_fen": supplier_cost_fen,
        "cost_fen": store_cost_fen + supplier_cost_fen,
    }


# --- signed QR payload -------------------------------------------------------------------------

QR_VERSION = "v1"
QR_MALFORMED = "coupon_qr_malformed"
QR_FIELDS = ("version", "code", "issuer_entity", "expiry_ms", "nonce_hex", "kid")
QR_SIGNATURE_BYTES = 64  # Ed25519
QR_SIGNATURE_CHARS = 86  # its base64url without padding

_QR_CODE = re.compile(rf"[0-9A-Z*~$=-]{{4,{limits.COUPON_QR_CODE_CHARS_MAX}}}")
_QR_EXPIRY = re.compile(rf"0|[1-9][0-9]{{0,{limits.COUPON_QR_EXPIRY_DIGITS_MAX - 1}}}")
_QR_NONCE = re.compile(rf"[0-9a-f]{{{2 * limits.COUPON_QR_NONCE_BYTES}}}")
_QR_SIGNATURE = re.compile(rf"[A-Za-z0-9_-]{{{QR_SIGNATURE_CHARS}}}")
_QR_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "version": (re.compile(re.escape(QR_VERSION)), f"the version is {QR_VERSION}"),
    "code": (_QR_CODE, "the code is 4-64 of 0-9, A-Z, *~$= and -"),
    "issuer_entity": (CODE, "the issuer is a legal entity code"),
    "expiry_ms": (_QR_EXPIRY, "the expiry is Unix ms in decimal, no leading zero"),
    "nonce_hex": (_QR_NONCE, f"the nonce is {2 * limits.COUPON_QR_NONCE_BYTES} lowercase hex"),
    "kid": (CODE, "the key id is 1-32 letters, digits, '.', '_' or '-'"),
}


@dataclass(frozen=True, slots=True)
class QrClaims:
    """A scanned QR text, its shape checked, its signature not yet verified."""

    version: str
    code: str
    issuer_entity: str
    expiry_ms: int
    nonce_hex: str
    kid: str
    payload: bytes  # the signed bytes
    signature: bytes

    def expired(self, now_ms: int) -> bool:
        """The QR is good until (not at) its expiry."""
        return now_ms >= self.expiry_ms


def _qr_malformed(message: str, field: str = "qr") -> Refused:
    return Refused("invalid", QR_MALFORMED, message, field)


def _check_qr_fields(values: tuple[str, ...]) -> None:
    """Each field in its shape: visible ASCII, never "|", bounded."""
    for field, value in zip(QR_FIELDS, values, strict=True):
        pattern, rule = _QR_RULES[field]
        if not pattern.fullmatch(value):
            raise _qr_malformed(rule, field)


def new_qr_nonce(randbytes: Callable[[int], bytes]) -> str:
    """A fresh nonce for a QR payload, from a CSPRNG (`secrets.token_bytes`)."""
    drawn = randbytes(limits.COUPON_QR_NONCE_BYTES)
    assert len(drawn) == limits.COUPON_QR_NONCE_BYTES, len(drawn)
    return drawn.hex()


def qr_payload(
    version: str, *, code: str, issuer_entity: str, expiry_ms: int, nonce_hex: str, kid: str
) -> bytes:
    """The bytes a QR's signature covers: "v1|CODE|ISSUER|EXPIRY_MS|NONCE_HEX|KID" in ASCII;
    `coupon_qr_malformed` if a field is out of shape. Keywords: the issuer and the key id
    have the same shape, and a swap would sign a wrong but well-formed payload."""
    if type(expiry_ms) is not int or expiry_ms < 0:
        raise _qr_malformed("the expiry is Unix ms, not negative", "expiry_ms")
    fields = (version, code, issuer_entity, str(expiry_ms), nonce_hex, kid)
    _check_qr_fields(fields)
    return "|".join(fields).encode("ascii")


def qr_text(payload: bytes, signature: bytes) -> str:
    """The text a QR code carries: the payload, "|", the signature in base64url unpadded."""
    assert len(signature) == QR_SIGNATURE_BYTES, len(signature)
    return payload.decode("ascii") + "|" + base64.urlsafe_b64encode(signature).decode().rstrip("=")


def _signature_of(text: str) -> bytes:
    """The signature's bytes; only its canonical base64url spelling is accepted."""
    if not _QR_SIGNATURE.fullmatch(text):
        raise _qr_malformed(f"the signature is {QR_SIGNATURE_CHARS} base64url characters")
    try:
        signature = base64.urlsafe_b64decode(text + "==")
    except binascii.Error:
        raise _qr_malformed("the signature is not base64url") from None
    if base64.urlsafe_b64encode(signature).decode().rstrip("=") != text:
        raise _qr_malformed("the signature is not in canonical base64url")
    return signature


def parse_qr(text: str) -> QrClaims:
    """The claims of a scanned QR text "payload|SIGNATURE", or `coupon_qr_malformed`: ASCII, at
    most COUPON_QR_CHARS_MAX, exactly six payload fields each in its shape (`qr_payload`), a
    64-byte signature in base64url without padding. Nothing trimmed, nothing verified."""
    if len(text) > limits.COUPON_QR_CHARS_MAX or not text.isascii():
        raise _qr_malformed(f"a coupon QR is at most {limits.COUPON_QR_CHARS_MAX} ASCII characters")
    payload, bar, signature_text = text.rpartition("|")
    fields = tuple(payload.split("|"))
    if not bar or len(fields) != len(QR_FIELDS):
        raise _qr_malformed(f"a coupon QR has {len(QR_FIELDS)} fields and a signature")
    _check_qr_fields(fields)
    version, code, issuer, expiry, nonce, kid = fields
    signature = _signature_of(signature_text)
    return QrClaims(
        version, code, issuer, int(expiry), nonce, kid, payload.encode("ascii"), signature
    )


def issue_digest(source: str, request: object) -> str:
    """SHA-256 (hex) of an issuance's request as its caller gave it (`source` and the
    request in canonical JSON): what an idempotency key's repeat is compared by."""
    text = json.dumps([source, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
