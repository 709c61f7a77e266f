"""The service card rules (pure): expiry to the end of a month in the group's timezone, product
checks, redemption by the package's own terms and its refusal codes, the choice of a package,
refunds by policy."""

from __future__ import annotations

import calendar
import itertools
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcore import limits
from cardcore.org.model import Refused
from cardcore.service_cards.model import (
    Entitlement,
    EntitlementState,
    RefundPolicy,
    RefundTerms,
    ServiceProduct,
    check_product,
    check_redeem,
    choose_entitlement,
    expiry_ms,
    product_problems,
    redeemed,
    refund_of,
    refund_rest_of,
    refund_terms_of,
    sell,
)

SHANGHAI = "Asia/Shanghai"
HOUR_MS = 3600 * 1000


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, 0)) * 1000


def shanghai_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return utc_ms(year, month, day, hour, minute) - 8 * HOUR_MS  # UTC+8, no DST


WASH = ServiceProduct(
    code="WASH10",
    name="Ten car washes",
    uses=10,
    price_fen=30_000,
    validity_months=12,
    stores=frozenset(),
    refund_policy=RefundPolicy.PRO_RATA,
    refund_fee_fen=0,
    single_use_price_fen=0,
    refund_after_expiry=False,
)
SOLD_MS = shanghai_ms(2026, 1, 31, 10)
NOW_MS = shanghai_ms(2026, 6, 1, 12)


def package(**changes: object) -> Entitlement:
    e = Entitlement(
        id=1,
        product_code="WASH10",
        uses_total=10,
        uses_left=10,
        sold_ms=SOLD_MS,
        expires_ms=shanghai_ms(2027, 2, 1),
        price_fen=30_000,
        state=EntitlementState.ACTIVE,
        refund_terms=refund_terms_of(WASH),
        stores=WASH.stores,
    )
    return replace(e, **changes)  # type: ignore[arg-type]


def sold_under(e: Entitlement, p: ServiceProduct) -> Entitlement:
    """`e` as sold when `p` had its terms: the refund terms it keeps."""
    return replace(e, refund_terms=refund_terms_of(p))


def refused(call: object, *args: object) -> tuple[int, str]:
    assert callable(call)
    with pytest.raises(Refused) as caught:
        call(*args)
    return caught.value.status, caught.value.code


# --- expiry -------------------------------------------------------------------------------------


def test_sold_31_january_plus_one_month_expires_at_the_end_of_february() -> None:
    assert expiry_ms(shanghai_ms(2026, 1, 31, 10), 1, SHANGHAI) == shanghai_ms(2026, 3, 1)
    assert expiry_ms(shanghai_ms(2026, 1, 31, 10), 1, SHANGHAI) == utc_ms(2026, 2, 28, 16)


def test_sold_31_january_plus_one_month_is_not_cut_to_28_february_nor_run_into_march() -> None:
    end = expiry_ms(shanghai_ms(2026, 1, 31, 10), 1, SHANGHAI)
    assert end > shanghai_ms(2026, 2, 28, 23, 59)  # all of 28 February is valid
    assert end != shanghai_ms(2026, 3, 3)  # not 31 January + 31 days rolled over
    assert end <= shanghai_ms(2026, 3, 1)


def test_a_leap_february_is_valid_to_its_29th() -> None:
    assert expiry_ms(shanghai_ms(2028, 1, 31), 1, SHANGHAI) == shanghai_ms(2028, 3, 1)


def test_months_roll_into_the_next_year() -> None:
    assert expiry_ms(shanghai_ms(2026, 12, 15), 1, SHANGHAI) == shanghai_ms(2027, 2, 1)
    assert expiry_ms(shanghai_ms(2026, 1, 1), 12, SHANGHAI) == shanghai_ms(2027, 2, 1)
    assert expiry_ms(shanghai_ms(2026, 11, 30), 0, SHANGHAI) == shanghai_ms(2026, 12, 1)


def test_the_sale_month_is_the_local_one() -> None:
    # 31 January 17:00 UTC is already 1 February 01:00 in Shanghai: the term counts from February
    assert expiry_ms(utc_ms(2026, 1, 31, 17), 1, SHANGHAI) == shanghai_ms(2026, 4, 1)


def test_the_sale_month_is_not_the_utc_one_negative() -> None:
    # 31 January 15:59 UTC is 23:59 in Shanghai: still January, so the end of February
    assert expiry_ms(utc_ms(2026, 1, 31, 15, 59), 1, SHANGHAI) == shanghai_ms(2026, 3, 1)
    assert expiry_ms(utc_ms(2026, 1, 31, 17), 1, "UTC") == utc_ms(2026, 3, 1)


def test_a_sale_puts_every_use_and_the_end_of_month_expiry_on_the_card() -> None:
    e = sell(WASH, sold_ms=SOLD_MS, tz=SHANGHAI, id_=7)
    assert (e.id, e.product_code, e.uses_total, e.uses_left) == (7, "WASH10", 10, 10)
    assert (e.price_fen, e.state, e.sold_ms) == (30_000, EntitlementState.ACTIVE, SOLD_MS)
    assert e.expires_ms == shanghai_ms(2027, 2, 1)


# --- products -----------------------------------------------------------------------------------


def test_a_sound_product_has_no_problems() -> None:
    assert product_problems(WASH) == ()
    check_product(WASH)
    after_use = replace(
        WASH,
        refund_policy=RefundPolicy.PRO_RATA_AFTER_USE_PRICE,
        single_use_price_fen=3_000,
        stores=frozenset({"S001", "S002"}),
    )
    at_bounds = replace(
        WASH,
        uses=limits.SERVICE_USES_MAX,
        validity_months=limits.SERVICE_VALIDITY_MONTHS_MAX,
        price_fen=limits.SERVICE_PRICE_FEN_MAX,
        refund_fee_fen=limits.SERVICE_PRICE_FEN_MAX,
        stores=frozenset(f"S{i}" for i in range(limits.SERVICE_STORES_MAX)),
    )
    assert product_problems(at_bounds) == ()
    assert product_problems(after_use) == ()


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("code", {"code": ""}),
        ("code", {"code": "bad code"}),
        ("name", {"name": " "}),
        ("name", {"name": "x" * (limits.SERVICE_NAME_CHARS_MAX + 1)}),
        ("uses", {"uses": 0}),
        ("uses", {"uses": limits.SERVICE_USES_MAX + 1}),
        ("uses", {"uses": True}),
        ("price_fen", {"price_fen": -1}),
        ("price_fen", {"price_fen": limits.SERVICE_PRICE_FEN_MAX + 1}),
        ("price_fen", {"price_fen": 300.0}),
        ("refund_fee_fen", {"refund_fee_fen": -1}),
        ("single_use_price_fen", {"single_use_price_fen": -1}),
        ("validity_months", {"validity_months": 0}),
        ("validity_months", {"validity_months": limits.SERVICE_VALIDITY_MONTHS_MAX + 1}),
        ("stores", {"stores": frozenset({"no spaces"})}),
        ("stores", {"stores": frozenset(f"S{i}" for i in range(limits.SERVICE_STORES_MAX + 1))}),
        (
            "single_use_price_fen",
            {"refund_policy": RefundPolicy.PRO_RATA_AFTER_USE_PRICE, "single_use_price_fen": 0},
        ),
        (
            "single_use_price_fen",  # ten uses at 29.99 CNY cost less than the 300 CNY package
            {"refund_policy": RefundPolicy.PRO_RATA_AFTER_USE_PRICE, "single_use_price_fen": 2999},
        ),
    ],
)
def test_a_faulty_product_is_refused_naming_the_field_negative(
    field: str, changes: dict[str, object]
) -> None:
    bad = replace(WASH, **changes)  # type: ignore[arg-type]
    assert [p.field for p in product_problems(bad)] == [field]
    with pytest.raises(Refused) as caught:
        check_product(bad)
    assert (caught.value.status, caught.value.code, caught.value.field) == (
        400,
        "invalid_value",
        field,
    )


def test_every_problem_of_a_product_is_listed() -> None:
    bad = replace(WASH, code="", uses=0, price_fen=-1)
    assert [p.field for p in product_problems(bad)] == ["code", "price_fen", "uses"]


# --- redemption ---------------------------------------------------------------------------------


def test_an_active_package_with_uses_left_redeems() -> None:
    assert check_redeem(package(), store="S001", now_ms=NOW_MS, uses=1) is None
    assert check_redeem(package(uses_left=3), store="S001", now_ms=NOW_MS, uses=3) is None


def test_a_package_without_enough_uses_left_is_refused_negative() -> None:
    for left, asked in ((0, 1), (2, 3)):
        e = package(uses_left=left)
        assert check_redeem(e, store="S001", now_ms=NOW_MS, uses=asked) == "service_no_uses_left"


def test_the_last_use_redeems_and_then_none_is_left() -> None:
    e = package(uses_left=1)
    assert check_redeem(e, store="S001", now_ms=NOW_MS, uses=1) is None
    after = redeemed(e, 1)
    assert after.uses_left == 0
    assert check_redeem(after, store="S001", now_ms=NOW_MS, uses=1) == "service_no_uses_left"


def test_a_package_redeems_until_the_instant_before_it_expires() -> None:
    e = package()
    assert check_redeem(e, store="S001", now_ms=e.expires_ms - 1, uses=1) is None


def test_a_package_is_refused_from_the_instant_it_expires_negative() -> None:
    e = package()
    assert check_redeem(e, store="S001", now_ms=e.expires_ms, uses=1) == "service_expired"
    marked = package(state=EntitlementState.EXPIRED)
    assert check_redeem(marked, store="S001", now_ms=NOW_MS, uses=1) == "service_expired"


def test_a_package_for_named_stores_redeems_in_them() -> None:
    named = package(stores=frozenset({"S001", "S002"}))
    assert check_redeem(named, store="S001", now_ms=NOW_MS, uses=1) is None
    assert check_redeem(named, store="S002", now_ms=NOW_MS, uses=1) is None
    assert check_redeem(package(), store="S999", now_ms=NOW_MS, uses=1) is None  # all


def test_a_package_for_named_stores_is_refused_elsewhere_negative() -> None:
    e = package(stores=frozenset({"S001"}))
    assert check_redeem(e, store="S002", now_ms=NOW_MS, uses=1) == "service_wrong_store"


def test_a_sale_keeps_the_stores_of_its_day() -> None:
    """A package redeems where its product did when it was sold: a package sold for S001
    and S002 keeps both (the check reads no product, so narrowing the product later cannot
    reach it); one sold after the product named S001 alone redeems there only."""
    both = sell(replace(WASH, stores=frozenset({"S001", "S002"})), sold_ms=SOLD_MS, tz=SHANGHAI)
    assert both.stores == frozenset({"S001", "S002"})
    assert check_redeem(both, store="S002", now_ms=NOW_MS, uses=1) is None
    narrowed = sell(replace(WASH, stores=frozenset({"S001"})), sold_ms=NOW_MS, tz=SHANGHAI)
    assert check_redeem(narrowed, store="S002", now_ms=NOW_MS, uses=1) == "service_wrong_store"
    assert check_redeem(narrowed, store="S001", now_ms=NOW_MS, uses=1) is None
    assert sell(WASH, sold_ms=SOLD_MS, tz=SHANGHAI).stores == frozenset()  # every store


def test_a_refunded_package_is_refused_negative() -> None:
    e = package(state=EntitlementState.REFUNDED)
    assert check_redeem(e, store="S001", now_ms=NOW_MS, uses=1) == "service_refunded"


@pytest.mark.parametrize("uses", [0, -1, limits.SERVICE_USES_MAX + 1])
def test_a_count_out_of_bounds_is_refused_negative(uses: int) -> None:
    e = package()
    assert check_redeem(e, store="S001", now_ms=NOW_MS, uses=uses) == "service_bad_count"


def test_refusals_come_in_a_stable_order() -> None:
    e = package(state=EntitlementState.REFUNDED, uses_left=0, stores=frozenset({"S001"}))
    late = e.expires_ms
    assert check_redeem(e, store="S002", now_ms=late, uses=0) == "service_bad_count"
    assert check_redeem(e, store="S002", now_ms=late, uses=1) == "service_refunded"
    active = replace(e, state=EntitlementState.ACTIVE)
    assert check_redeem(active, store="S002", now_ms=late, uses=1) == "service_expired"
    assert check_redeem(active, store="S002", now_ms=NOW_MS, uses=1) == "service_wrong_store"


# --- choosing the package -----------------------------------------------------------------------


def test_the_package_expiring_first_is_chosen() -> None:
    late = package(id=1, expires_ms=shanghai_ms(2027, 3, 1))
    soon = package(id=2, expires_ms=shanghai_ms(2026, 9, 1))
    for order in itertools.permutations([late, soon]):
        assert choose_entitlement(order, "WASH10", NOW_MS) == soon


def test_spent_refunded_expired_and_other_packages_are_never_chosen_negative() -> None:
    skipped = [
        package(id=1, expires_ms=shanghai_ms(2026, 7, 1), uses_left=0),
        package(id=2, expires_ms=shanghai_ms(2026, 7, 1), state=EntitlementState.REFUNDED),
        package(id=3, expires_ms=shanghai_ms(2026, 7, 1), state=EntitlementState.EXPIRED),
        package(id=4, expires_ms=NOW_MS),  # expires at this very instant
        package(id=5, expires_ms=shanghai_ms(2026, 7, 1), product_code="SPA6"),
    ]
    usable = package(id=6, expires_ms=shanghai_ms(2027, 3, 1))
    assert choose_entitlement(skipped, "WASH10", NOW_MS) is None
    assert choose_entitlement([*skipped, usable], "WASH10", NOW_MS) == usable
    assert choose_entitlement([], "WASH10", NOW_MS) is None


def test_ties_go_to_the_first_sold_then_the_lowest_id() -> None:
    first = package(id=9, sold_ms=SOLD_MS)
    later = package(id=3, sold_ms=SOLD_MS + 1)
    twin = package(id=4, sold_ms=SOLD_MS)
    for order in itertools.permutations([later, first, twin]):
        assert choose_entitlement(order, "WASH10", NOW_MS) == twin
    for order in itertools.permutations([later, first]):
        assert choose_entitlement(order, "WASH10", NOW_MS) == first


# --- refunds ------------------------------------------------------------------------------------

THREE = replace(WASH, uses=3, price_fen=10_000)


def test_a_pro_rata_refund_gives_the_member_the_fraction_of_a_fen() -> None:
    e = package(uses_total=3, uses_left=2, price_fen=10_000)
    assert refund_of(sold_under(e, THREE), NOW_MS) == 6667  # 1/3 used is 3333.33: 3333 kept


def test_a_pro_rata_refund_never_rounds_the_members_share_down_negative() -> None:
    e = package(uses_total=3, uses_left=1, price_fen=10_000)
    assert refund_of(sold_under(e, THREE), NOW_MS) == 3334  # 2/3 used is 6666.67: 6666 kept
    other = package(uses_total=3, uses_left=2, price_fen=10_000)
    assert refund_of(sold_under(other, THREE), NOW_MS) != 6666


def test_an_unused_package_refunds_its_whole_price_less_the_fee() -> None:
    e = package()
    assert refund_of(sold_under(e, WASH), NOW_MS) == 30_000
    assert refund_of(sold_under(e, replace(WASH, refund_fee_fen=500)), NOW_MS) == 29_500


def test_a_refund_uses_the_price_paid_not_todays_price() -> None:
    dearer = replace(WASH, price_fen=40_000)
    assert refund_of(sold_under(package(uses_left=5), dearer), NOW_MS) == 15_000


def test_a_sale_keeps_the_refund_terms_of_its_day() -> None:
    """Audit finding (issue 5): 100.00 paid for 10 uses, 5 used, one use listed at 12.00:
    4,000 fen back less the 1.00 fee of the sale, whatever the product's terms become later
    (a reprice to 50.00 and 5.00 a use made it 7,500, more than the 5,000 unused share)."""
    product = replace(WASH, price_fen=10_000, refund_policy=RefundPolicy.PRO_RATA_AFTER_USE_PRICE,
                      single_use_price_fen=1_200, refund_fee_fen=100)  # fmt: skip
    e = redeemed(sell(product, sold_ms=SOLD_MS, tz=SHANGHAI), 5)
    assert e.refund_terms == RefundTerms(
        policy=RefundPolicy.PRO_RATA_AFTER_USE_PRICE, fee_fen=100, single_use_price_fen=1_200,
        after_expiry=False,
    )  # fmt: skip
    assert refund_of(e, NOW_MS) == 10_000 - 5 * 1_200 - 100
    assert refused(refund_of, e, e.expires_ms) == (409, "service_refund_expired")
    kept = sell(replace(product, refund_after_expiry=True), sold_ms=SOLD_MS, tz=SHANGHAI)
    assert refund_of(kept, kept.expires_ms) == 10_000 - 100


def test_a_fee_never_makes_a_refund_negative_negative() -> None:
    e = package(uses_total=3, uses_left=1, price_fen=10_000)
    assert refund_of(sold_under(e, replace(THREE, refund_fee_fen=3334)), NOW_MS) == 0
    assert refund_of(sold_under(e, replace(THREE, refund_fee_fen=5000)), NOW_MS) == 0
    assert refund_of(sold_under(e, replace(THREE, refund_fee_fen=3333)), NOW_MS) == 1


def test_a_fully_used_package_refunds_nothing() -> None:
    assert refund_of(sold_under(package(uses_left=0), WASH), NOW_MS) == 0


AFTER_USE = replace(
    WASH, refund_policy=RefundPolicy.PRO_RATA_AFTER_USE_PRICE, single_use_price_fen=3_500
)


def test_after_use_price_refund_charges_used_ones_at_the_list_price() -> None:
    e = package(uses_left=7)  # 3 used at 35 CNY
    assert refund_of(sold_under(e, AFTER_USE), NOW_MS) == 30_000 - 3 * 3_500
    assert refund_of(sold_under(e, replace(AFTER_USE, refund_fee_fen=1_000)), NOW_MS) == 18_500


def test_after_use_price_refund_is_never_negative_negative() -> None:
    e = package(uses_left=1)  # 9 used at 35 CNY = 315 CNY, more than the 300 CNY paid
    assert refund_of(sold_under(e, AFTER_USE), NOW_MS) == 0
    assert (
        refund_of(
            sold_under(package(uses_left=2), replace(AFTER_USE, refund_fee_fen=9_999)), NOW_MS
        )
        == 0
    )


def test_a_product_without_refunds_refuses_negative() -> None:
    none = replace(WASH, refund_policy=RefundPolicy.NONE)
    assert refused(refund_of, sold_under(package(), none), NOW_MS) == (
        409,
        "service_refund_not_allowed",
    )


def test_an_expired_package_refunds_only_when_the_product_allows() -> None:
    late = package().expires_ms
    allows = replace(WASH, refund_after_expiry=True)
    assert refund_of(sold_under(package(uses_left=4), allows), late) == 12_000
    marked = package(uses_left=4, state=EntitlementState.EXPIRED)
    assert refund_of(sold_under(marked, allows), NOW_MS) == 12_000


def test_an_expired_package_is_not_refunded_otherwise_negative() -> None:
    e = package()
    assert refund_of(sold_under(e, WASH), e.expires_ms - 1) == 30_000
    assert refused(refund_of, sold_under(e, WASH), e.expires_ms) == (409, "service_refund_expired")


def test_a_refunded_package_is_not_refunded_again_negative() -> None:
    e = package(state=EntitlementState.REFUNDED)
    assert refused(refund_of, sold_under(e, WASH), NOW_MS) == (409, "service_refunded")


@given(
    uses=st.integers(1, 50),
    used=st.integers(0, 50),
    price=st.integers(1, 1_000_000),
    fee=st.integers(0, 100_000),
    list_extra=st.integers(0, 100_000),
    policy=st.sampled_from([RefundPolicy.PRO_RATA, RefundPolicy.PRO_RATA_AFTER_USE_PRICE]),
)
def test_a_refund_is_an_int_between_zero_and_the_unused_share(
    uses: int, used: int, price: int, fee: int, list_extra: int, policy: RefundPolicy
) -> None:
    used = min(used, uses)
    single = -(-price // uses) + list_extra  # uses at the list price cost at least the price
    product = replace(
        WASH,
        uses=uses,
        price_fen=price,
        refund_fee_fen=fee,
        refund_policy=policy,
        single_use_price_fen=max(single, 1),
    )
    assert product_problems(product) == ()
    e = package(uses_total=uses, uses_left=uses - used, price_fen=price)
    refund = refund_of(sold_under(e, product), NOW_MS)
    assert type(refund) is int
    assert 0 <= refund <= price - price * used // uses  # the unused share, rounded up


def test_a_refunded_package_given_uses_back_owes_the_difference_once() -> None:
    """10,000 fen for 3 uses, refunded at 2 left (6,667); a reversal gives the third back:
    3,333 more is owed, and then nothing (the fee, taken by the first refund, not again)."""
    e = package(uses_total=3, uses_left=2, price_fen=10_000)
    paid = refund_of(e, NOW_MS)
    assert paid == 6_667
    back = replace(e, state=EntitlementState.REFUNDED, uses_left=3)
    assert refund_rest_of(back, paid) == 3_333
    assert refused(refund_rest_of, back, 10_000) == (409, "service_refunded")
    dead = replace(e, state=EntitlementState.REFUNDED)  # no use came back
    assert refused(refund_rest_of, dead, paid) == (409, "service_refunded")
    fee = RefundTerms(RefundPolicy.PRO_RATA, fee_fen=500, single_use_price_fen=0,
                      after_expiry=False)  # fmt: skip
    with_fee = replace(e, refund_terms=fee)
    first = refund_of(with_fee, NOW_MS)
    assert first == 6_167
    later = replace(
        with_fee, state=EntitlementState.REFUNDED, uses_left=3, expires_ms=NOW_MS
    )  # expired since: the refund is finished all the same
    assert first + refund_rest_of(later, first) == 10_000 - 500
