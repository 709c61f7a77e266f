"""The rules of service cards: products, the entitlements sold on a card, redemption, expiry
and refunds. Pure: records and integers in, records, integers or a refusal code out.

- A product sells `uses` entitlements for `price_fen` (int fen; 1 CNY = 100 fen). A sold
  package (an `Entitlement`) expires at the end of the month `validity_months` after the local
  sale date, in the group's timezone: the instant of local midnight after that month's last
  day (sold 31 January with 1 month: the end of February).
- A package keeps every term of its sale: the uses sold, the expiry, the price paid, the
  stores where it may be redeemed and the refund terms (`RefundTerms`). A later change of
  the product applies to later sales only: a package's use and refund read the package,
  never the product.
- A redemption uses one or more entitlements of one active, unexpired package, in a store the
  package names (the product's stores on the day of its sale; none named = every store). A
  package sold by code that recorded no stores (before migration 0009) is given its
  product's stores of the day of the use by the service that reads it.
- A refund follows the refund terms the package was sold under: none; pro rata (the unused
  share of the price paid, the fraction of a fen to the member); or the price paid less the
  used ones charged at the one-use list price of the sale. A refund fee is taken last and
  never makes a refund negative. A package sold by code that recorded no refund terms
  (before migration 0007) is given its product's terms of the day of the refund by the
  service that reads it.
- Times are int milliseconds since the Unix epoch (UTC); no float anywhere.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

from cardcore import limits
from cardcore.localtime import add_months, day_start_ms, local_date, month_end
from cardcore.org.model import CODE, Problem, Refused


class RefundPolicy(enum.StrEnum):
    NONE = "none"  # unused entitlements are not refunded
    PRO_RATA = "pro_rata"  # unused/uses of the price, rounded up, less the fee
    PRO_RATA_AFTER_USE_PRICE = "pro_rata_after_use_price"  # price less used at list, less fee


class EntitlementState(enum.StrEnum):
    ACTIVE = "active"
    REFUNDED = "refunded"
    EXPIRED = "expired"  # set by a sweep; an active one past `expires_ms` is expired too


# Stable refusal codes (the contract with POS and admin callers).
NO_USES_LEFT = "service_no_uses_left"
EXPIRED = "service_expired"
WRONG_STORE = "service_wrong_store"
REFUNDED = "service_refunded"
BAD_COUNT = "service_bad_count"
REFUND_NOT_ALLOWED = "service_refund_not_allowed"
REFUND_EXPIRED = "service_refund_expired"


@dataclass(frozen=True, slots=True)
class ServiceProduct:
    """A service package the group sells: `uses` entitlements for `price_fen`."""

    code: str
    name: str
    uses: int  # entitlements per sale, 1..SERVICE_USES_MAX
    price_fen: int  # what the member pays for the package
    validity_months: int  # 1..SERVICE_VALIDITY_MONTHS_MAX, to the end of the month
    stores: frozenset[str]  # where packages sold now may be redeemed; empty = every store
    refund_policy: RefundPolicy
    refund_fee_fen: int  # taken from a refund, never below zero
    single_use_price_fen: int  # the one-use list price (policy pro_rata_after_use_price)
    refund_after_expiry: bool  # whether an expired package may still be refunded


@dataclass(frozen=True, slots=True)
class RefundTerms:
    """How a package is refunded: its product's refund terms on the day it was sold, kept
    with the package (the price paid and the uses sold are the package's own fields)."""

    policy: RefundPolicy
    fee_fen: int  # taken from a refund, never below zero
    single_use_price_fen: int  # the one-use list price (policy pro_rata_after_use_price)
    after_expiry: bool  # whether an expired package may still be refunded


def refund_terms_of(p: ServiceProduct) -> RefundTerms:
    """The refund terms a package of `p` sold now keeps."""
    return RefundTerms(
        policy=p.refund_policy,
        fee_fen=p.refund_fee_fen,
        single_use_price_fen=p.single_use_price_fen,
        after_expiry=p.refund_after_expiry,
    )


@dataclass(frozen=True, slots=True)
class Entitlement:
    """One sold package on a card, with the terms of its sale. `id` is its record id (0
    before it is stored); it breaks ties when two packages are otherwise alike."""

    id: int
    product_code: str
    uses_total: int
    uses_left: int
    sold_ms: int
    expires_ms: int  # exclusive: at this instant the package is expired
    price_fen: int  # the price paid at sale (refunds use it, not today's product price)
    state: EntitlementState
    refund_terms: RefundTerms  # as of the sale (refunds use them, not today's product's)
    stores: frozenset[str]  # where it redeems: the product's at the sale; empty = every store


# --- time ---------------------------------------------------------------------------------------


def expiry_ms(sold_ms: int, months: int, tz: str) -> int:
    """When a package sold at `sold_ms` expires: local midnight (zone `tz`) after the last day
    of the month `months` after the local sale date (sold 31 January + 1 month -> 1 March
    00:00 local, the end of February)."""
    assert 0 <= months <= limits.SERVICE_VALIDITY_MONTHS_MAX
    last = month_end(add_months(local_date(tz, sold_ms), months))
    return day_start_ms(tz, last + datetime.timedelta(days=1))


# --- products -----------------------------------------------------------------------------------


def product_problems(p: ServiceProduct) -> tuple[Problem, ...]:
    """Every fault of `p` (names, money, counts, stores); empty when it may be saved."""
    found = [*_identity_problems(p), *_money_problems(p)]
    if not _int_in(p.uses, 1, limits.SERVICE_USES_MAX):
        found.append(Problem("uses", f"uses is 1..{limits.SERVICE_USES_MAX}"))
    if not _int_in(p.validity_months, 1, limits.SERVICE_VALIDITY_MONTHS_MAX):
        months = limits.SERVICE_VALIDITY_MONTHS_MAX
        found.append(Problem("validity_months", f"validity_months is 1..{months}"))
    found.extend(_store_problems(p.stores))
    return tuple(found)


def check_product(p: ServiceProduct, *, kept_price: int | None = None) -> None:
    """Refuse (400 `invalid_value`, naming the field) the first fault of `p`. `kept_price`:
    the stored price, when a change leaves it as it is; a product priced 0 before the price
    had to be at least 1 may then still be renamed, changed or retired."""
    for problem in product_problems(p):
        if problem.field == "price_fen" and p.price_fen == kept_price == 0:
            continue
        raise Refused("invalid", "invalid_value", problem.message, problem.field)


def _identity_problems(p: ServiceProduct) -> list[Problem]:
    """A product code is 1-32 letters, digits . _ -; a name is 1..SERVICE_NAME_CHARS_MAX."""
    found = []
    if not CODE.fullmatch(p.code):
        found.append(Problem("code", "a product code is 1-32 letters, digits . _ -"))
    if not p.name.strip() or len(p.name) > limits.SERVICE_NAME_CHARS_MAX:
        found.append(Problem("name", f"name is 1..{limits.SERVICE_NAME_CHARS_MAX} characters"))
    return found


def _money_problems(p: ServiceProduct) -> list[Problem]:
    """Price, fee and list price are int fen in 0..SERVICE_PRICE_FEN_MAX, the price at least
    1 (a sale is a ledger transfer of it, and the ledger moves no 0: a product of price 0
    was made and then never sold). When the refund charges used entitlements at the list
    price, all uses at that price cost at least the package, so such a refund never exceeds
    the unused share of the price (rounded up)."""
    high = limits.SERVICE_PRICE_FEN_MAX
    found = [
        Problem(name, f"{name} is {low}..{high} fen")
        for name, value, low in (
            ("price_fen", p.price_fen, 1),
            ("refund_fee_fen", p.refund_fee_fen, 0),
            ("single_use_price_fen", p.single_use_price_fen, 0),
        )
        if not _int_in(value, low, high)
    ]
    if p.refund_policy is RefundPolicy.PRO_RATA_AFTER_USE_PRICE and (
        p.single_use_price_fen * p.uses < p.price_fen
    ):
        found.append(
            Problem("single_use_price_fen", "uses at the list price cost at least the package")
        )
    return found


def _int_in(value: object, low: int, high: int) -> bool:
    """Whether `value` is an int (not a bool, not a float) in low..high."""
    return type(value) is int and low <= value <= high


def _store_problems(stores: frozenset[str]) -> list[Problem]:
    """At most SERVICE_STORES_MAX stores, each a store code."""
    if len(stores) > limits.SERVICE_STORES_MAX:
        return [Problem("stores", f"at most {limits.SERVICE_STORES_MAX} stores")]
    if not all(CODE.fullmatch(s) for s in stores):
        return [Problem("stores", "a store code is 1-32 letters, digits . _ -")]
    return []


# --- sale and redemption ------------------------------------------------------------------------


def sell(p: ServiceProduct, *, sold_ms: int, tz: str, id_: int = 0) -> Entitlement:
    """The package a sale of `p` at `sold_ms` puts on a card: every use left, today's price,
    stores and refund terms, expiring at the end of the month `p.validity_months` after the
    local sale date."""
    return Entitlement(
        id=id_,
        product_code=p.code,
        uses_total=p.uses,
        uses_left=p.uses,
        sold_ms=sold_ms,
        expires_ms=expiry_ms(sold_ms, p.validity_months, tz),
        price_fen=p.price_fen,
        state=EntitlementState.ACTIVE,
        refund_terms=refund_terms_of(p),
        stores=p.stores,
    )


def is_expired(e: Entitlement, now_ms: int) -> bool:
    """A package is expired once marked so, or from the instant `expires_ms` on."""
    return e.state is EntitlementState.EXPIRED or now_ms >= e.expires_ms


def check_redeem(e: Entitlement, *, store: str, now_ms: int, uses: int) -> str | None:
    """None when `uses` entitlements of `e` may be redeemed in `store` at `now_ms`, else
    the refusal code. Only the package's own terms count, never its product's today.
    Checked in this order: the count asked is 1..SERVICE_USES_MAX (`service_bad_count`);
    the package is not refunded (`service_refunded`) nor expired (`service_expired`); the
    package may be redeemed in `store` (`service_wrong_store`); at least `uses` are left
    (`service_no_uses_left`, also when some but too few are left)."""
    if not 1 <= uses <= limits.SERVICE_USES_MAX:
        return BAD_COUNT
    if e.state is EntitlementState.REFUNDED:
        return REFUNDED
    if is_expired(e, now_ms):
        return EXPIRED
    if e.stores and store not in e.stores:
        return WRONG_STORE
    if uses > e.uses_left:
        return NO_USES_LEFT
    return None


def redeemed(e: Entitlement, uses: int) -> Entitlement:
    """`e` after `uses` entitlements were redeemed (the caller checked `check_redeem`)."""
    assert 1 <= uses <= e.uses_left
    return replace(e, uses_left=e.uses_left - uses)


def choose_entitlement(
    entitlements: Iterable[Entitlement], product_code: str, now_ms: int
) -> Entitlement | None:
    """The package a redemption of `product_code` uses: of the active, unexpired ones with
    uses left, the one expiring first; ties go to the one sold first, then the lowest id.
    None when there is none."""
    candidates = list(entitlements)
    assert len(candidates) <= limits.SERVICE_ENTITLEMENTS_PER_CARD_MAX
    usable = [
        e
        for e in candidates
        if e.product_code == product_code
        and e.state is EntitlementState.ACTIVE
        and e.uses_left > 0
        and not is_expired(e, now_ms)
    ]
    return min(usable, key=lambda e: (e.expires_ms, e.sold_ms, e.id), default=None)


# --- refunds ------------------------------------------------------------------------------------


def refund_of(e: Entitlement, now_ms: int) -> int:
    """The fen refunded for the unused entitlements of `e`, by the refund terms it was sold
    under (`e.refund_terms`: policy, fee, one-use price, refund after expiry), on the price
    the member paid (`e.price_fen`); the product's terms today play no part. Refuses (409) a
    refunded package (`service_refunded`), a package sold without refunds
    (`service_refund_not_allowed`) and an expired package sold with no refund after expiry
    (`service_refund_expired`). Nothing unused refunds 0; a fee never makes a refund
    negative."""
    assert 0 <= e.uses_left <= e.uses_total
    terms = e.refund_terms
    if e.state is EntitlementState.REFUNDED:
        raise Refused("conflict", REFUNDED, "the package was refunded already")
    if terms.policy is RefundPolicy.NONE:
        raise Refused("conflict", REFUND_NOT_ALLOWED, "this package was sold without refunds")
    if is_expired(e, now_ms) and not terms.after_expiry:
        raise Refused("conflict", REFUND_EXPIRED, "the package expired; no refund after expiry")
    if e.uses_left == 0:
        return 0
    return max(0, _gross_refund(e) - terms.fee_fen)


def _gross_refund(e: Entitlement) -> int:
    """The refund before the fee.

    - pro_rata: the price less the used share rounded DOWN, so the member gets the fraction
      of a fen (10000 fen, 3 uses, 1 used: 3333 used, 6667 back).
    - pro_rata_after_use_price: the price less each used entitlement at the one-use list
      price, never below zero (a package bought for its discount loses it when refunded).
    """
    used = e.uses_total - e.uses_left
    terms = e.refund_terms
    if terms.policy is RefundPolicy.PRO_RATA:
        return e.price_fen - e.price_fen * used // e.uses_total
    assert terms.policy is RefundPolicy.PRO_RATA_AFTER_USE_PRICE
    return max(0, e.price_fen - used * terms.single_use_price_fen)


def refund_rest_of(e: Entitlement, refunded_fen: int) -> int:
    """What a refunded package still owes: what its refund terms give for its uses left
    now less what its refunds paid (`refunded_fen`). A redemption reversed after the
    refund gives its uses back to the package; the refund paid only the uses left then, so
    a further refund pays the difference, once (the fee was taken by the first). Expiry
    plays no part (the refund was allowed; this finishes it). Refuses (409
    `service_refunded`) when nothing more is owed. Only for a refunded package (`refund_of`
    refunds an active one)."""
    assert 0 <= e.uses_left <= e.uses_total
    assert e.state is EntitlementState.REFUNDED
    owes = e.uses_left > 0 and e.refund_terms.policy is not RefundPolicy.NONE
    # (a package sold before migration 0007 takes its product's terms as they are now: HQ
    # may have made them `none` since its first refund, which then owes nothing more)
    due = max(0, _gross_refund(e) - e.refund_terms.fee_fen) if owes else 0
    if due <= refunded_fen:
        message = "the package was refunded already; nothing more is owed"
        raise Refused("conflict", REFUNDED, message)
    return due - refunded_fen
