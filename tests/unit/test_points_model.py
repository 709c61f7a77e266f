"""The points engine's pure rules: local days and expiry, earning rules, lots (spend,
clawback, expiry, reversal), tiers, transfers and redemption. No I/O."""

from __future__ import annotations

import calendar
import datetime
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardcore import limits
from cardcore.localtime import day_number, day_start_ms, local_date
from cardcore.org.model import Problem
from cardcore.points.model import (
    DAY_MS,
    POINTS_INSUFFICIENT,
    POINTS_NOT_POSITIVE,
    POINTS_OVER_LIMIT,
    RETURN_EXCEEDS_ORIGINAL,
    TRANSFER_NOT_ALLOWED,
    TRANSFER_OVER_DAILY_LIMIT,
    TRANSFER_OVER_LIMIT,
    Basket,
    Downgrade,
    Earning,
    EarnPart,
    Expiry,
    ExpiryKind,
    InsufficientPoints,
    Line,
    Lot,
    NegativePolicy,
    PointsRefused,
    Program,
    Rule,
    RuleKind,
    Take,
    Tier,
    TierPeriod,
    TierPolicy,
    TransferPolicy,
    available_ms,
    check_basket,
    check_program,
    check_rule,
    check_tiers,
    check_transfer,
    earn,
    earn_lot,
    expire,
    expiring_within,
    expiry_ms,
    fen_for_points,
    is_expired,
    is_usable,
    lot_expiry_day,
    lot_of,
    lot_purpose,
    next_tier,
    period_bounds,
    plan_clawback,
    plan_spend,
    points_for_fen,
    program_json,
    program_of,
    proportional_clawback,
    put_back,
    rule_json,
    rule_of,
    settle_debt,
    take_from,
    tier_for,
)

SHANGHAI = "Asia/Shanghai"
PROGRAM = Program("P")
ROLLING_1 = Expiry(ExpiryKind.ROLLING_MONTHS, months=1)
BASE = Rule("base", RuleKind.BASE, points=1, per_fen=100)


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, 0)) * 1000


def shanghai_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return utc_ms(year, month, day, hour, minute) - 8 * 3600 * 1000


def earn_at(
    rules: list[Rule],
    basket: Basket | int,
    *,
    now_ms: int = shanghai_ms(2026, 4, 1, 12),  # a Wednesday, noon
    store: str = "S1",
    class_pct: int = 100,
    tier_pct: int = 100,
    today: dict[str, int] | None = None,
) -> Earning:
    return earn(
        PROGRAM,
        rules,
        basket if isinstance(basket, Basket) else Basket(basket),
        now_ms=now_ms,
        store=store,
        card_class_multiplier_pct=class_pct,
        tier_multiplier_pct=tier_pct,
        earned_today_by_rule=today or {},
    )


def fields(problems: tuple[Problem, ...]) -> list[str]:
    return [p.field for p in problems]


# --- local days ---------------------------------------------------------------------------------


def test_midnight_in_shanghai_is_1600_utc_the_day_before() -> None:
    assert day_start_ms(SHANGHAI, datetime.date(2026, 4, 1)) == utc_ms(2026, 3, 31, 16)


def test_an_instant_after_1600_utc_is_the_next_local_day_in_shanghai() -> None:
    assert local_date(SHANGHAI, utc_ms(2026, 3, 31, 16, 30)) == datetime.date(2026, 4, 1)
    assert local_date(SHANGHAI, utc_ms(2026, 3, 31, 16) - 1) == datetime.date(2026, 3, 31)


def test_a_day_in_a_dst_zone_starts_at_its_own_offset() -> None:
    assert day_start_ms("Europe/Berlin", datetime.date(2026, 3, 29)) == utc_ms(2026, 3, 28, 23)
    assert day_start_ms("Europe/Berlin", datetime.date(2026, 3, 30)) == utc_ms(2026, 3, 29, 22)


def test_a_skipped_midnight_starts_the_day_when_the_clocks_jump() -> None:
    # Santiago moves from 00:00 -04 straight to 01:00 -03 on 6 September 2026
    start = day_start_ms("America/Santiago", datetime.date(2026, 9, 6))
    assert start == utc_ms(2026, 9, 6, 4)
    assert local_date("America/Santiago", start - 1) == datetime.date(2026, 9, 5)


ZONES = [
    SHANGHAI,
    "UTC",
    "Europe/Berlin",
    "America/Santiago",
    "America/Sao_Paulo",
    "America/Havana",
    "Asia/Beirut",
    "Australia/Lord_Howe",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ZONES), st.dates(datetime.date(1980, 1, 1), datetime.date(2037, 12, 31)))
def test_a_local_day_starts_at_its_first_instant_in_any_zone(tz: str, day: datetime.date) -> None:
    start = day_start_ms(tz, day)
    assert local_date(tz, start) == day
    assert local_date(tz, start - 1) == day - datetime.timedelta(days=1)


# --- expiry and availability --------------------------------------------------------------------


@pytest.mark.parametrize(("year", "last"), [(2026, 28), (2027, 28), (2028, 29)])
def test_one_rolling_month_from_31_january_ends_with_february(year: int, last: int) -> None:
    program = replace(PROGRAM, expiry=ROLLING_1)
    assert expiry_ms(program, shanghai_ms(year, 1, 31, 10)) == shanghai_ms(year, 3, 1)
    assert local_date(SHANGHAI, shanghai_ms(year, 3, 1) - 1) == datetime.date(year, 2, last)


def test_twelve_rolling_months_end_with_the_same_month_next_year() -> None:
    program = replace(PROGRAM, expiry=Expiry(ExpiryKind.ROLLING_MONTHS, months=12))
    assert expiry_ms(program, shanghai_ms(2026, 3, 15, 9)) == shanghai_ms(2027, 4, 1)


def test_rolling_expiry_counts_from_the_local_date_of_the_earning() -> None:
    program = replace(PROGRAM, expiry=ROLLING_1)
    # 16:30 UTC on 31 March is 00:30 on 1 April in Shanghai: expires at the end of 31 May
    assert expiry_ms(program, utc_ms(2026, 3, 31, 16, 30)) == utc_ms(2026, 5, 31, 16)
    # a minute before local midnight it is still March: expires at the end of 30 April
    assert expiry_ms(program, utc_ms(2026, 3, 31, 15, 59)) == utc_ms(2026, 4, 30, 16)


@pytest.mark.parametrize(
    ("expiry", "earned", "last_day"),
    [
        (Expiry(ExpiryKind.FIXED_DATE, 0, 12, 31), (2026, 6, 1), (2026, 12, 31)),
        (Expiry(ExpiryKind.FIXED_DATE, 0, 12, 31), (2026, 12, 31), (2026, 12, 31)),
        (Expiry(ExpiryKind.FIXED_DATE, 0, 6, 30), (2026, 7, 1), (2027, 6, 30)),
        (Expiry(ExpiryKind.FIXED_DATE, 6, 12, 31), (2026, 9, 1), (2027, 12, 31)),
        (Expiry(ExpiryKind.FIXED_DATE, 6, 12, 31), (2026, 6, 30), (2026, 12, 31)),
        (Expiry(ExpiryKind.FIXED_DATE, 0, 2, 29), (2026, 3, 1), (2027, 2, 28)),
        (Expiry(ExpiryKind.FIXED_DATE, 0, 2, 29), (2027, 3, 1), (2028, 2, 29)),
    ],
)
def test_a_fixed_date_is_its_next_occurrence_after_the_minimum_months(
    expiry: Expiry, earned: tuple[int, int, int], last_day: tuple[int, int, int]
) -> None:
    program = replace(PROGRAM, expiry=expiry)
    end = datetime.date(*last_day) + datetime.timedelta(days=1)
    assert expiry_ms(program, shanghai_ms(*earned, 12)) == day_start_ms(SHANGHAI, end)


def test_points_of_a_never_expiring_program_have_no_expiry() -> None:
    assert expiry_ms(PROGRAM, utc_ms(2026, 1, 1)) is None
    lot = earn_lot(PROGRAM, "a", utc_ms(2026, 1, 1), 10)
    assert is_usable(lot, utc_ms(2999, 1, 1))


def test_a_lot_is_usable_through_the_last_millisecond_of_its_expiry_day() -> None:
    lot = earn_lot(replace(PROGRAM, expiry=ROLLING_1), "a", shanghai_ms(2026, 1, 31, 10), 10)
    assert is_usable(lot, shanghai_ms(2026, 3, 1) - 1)
    assert not is_usable(lot, shanghai_ms(2026, 3, 1))
    assert is_expired(lot, shanghai_ms(2026, 3, 1))


def test_points_are_usable_at_once_without_a_return_window() -> None:
    assert available_ms(PROGRAM, 1_775_000_000_123) == 1_775_000_000_123


def test_pending_points_become_usable_at_local_midnight_after_the_return_window() -> None:
    program = replace(PROGRAM, pending_days=7)
    assert available_ms(program, utc_ms(2026, 3, 31, 16, 30)) == shanghai_ms(2026, 4, 8)
    lot = earn_lot(program, "a", utc_ms(2026, 3, 31, 16, 30), 5)
    assert not is_usable(lot, shanghai_ms(2026, 4, 8) - 1)
    assert is_usable(lot, shanghai_ms(2026, 4, 8))


# --- program definitions ------------------------------------------------------------------------


def test_a_default_program_is_valid() -> None:
    assert check_program(PROGRAM) == ()
    allowed = TransferPolicy(allowed=True, per_transfer_max_points=500, per_day_max_points=2000)
    assert check_program(replace(PROGRAM, pending_days=28, expiry=ROLLING_1)) == ()
    assert check_program(replace(PROGRAM, transfer=allowed)) == ()


@pytest.mark.parametrize(
    ("program", "field"),
    [
        (replace(PROGRAM, code="has space"), "code"),
        (replace(PROGRAM, code=""), "code"),
        (replace(PROGRAM, asset=""), "asset"),
        (replace(PROGRAM, timezone="Mars/Olympus"), "timezone"),
        (replace(PROGRAM, timezone="localtime"), "timezone"),
        (replace(PROGRAM, timezone="../etc/passwd"), "timezone"),
        (replace(PROGRAM, pending_days=limits.POINTS_PENDING_DAYS_MAX + 1), "pending_days"),
        (replace(PROGRAM, pending_days=-1), "pending_days"),
        (replace(PROGRAM, expiry=Expiry(ExpiryKind.ROLLING_MONTHS, months=0)), "expiry.months"),
        (replace(PROGRAM, expiry=Expiry(ExpiryKind.ROLLING_MONTHS, months=121)), "expiry.months"),
        (replace(PROGRAM, expiry=Expiry(ExpiryKind.FIXED_DATE, 0, 13, 1)), "expiry.month"),
        (replace(PROGRAM, expiry=Expiry(ExpiryKind.FIXED_DATE, 0, 2, 30)), "expiry.day"),
        (replace(PROGRAM, expiry=Expiry(ExpiryKind.FIXED_DATE, 0, 4, 31)), "expiry.day"),
        (replace(PROGRAM, expiry=ROLLING_1, pending_days=29), "pending_days"),
        (
            replace(PROGRAM, expiry=Expiry(ExpiryKind.FIXED_DATE, 0, 12, 31), pending_days=1),
            "pending_days",
        ),
        (replace(PROGRAM, redeem_points=0), "redeem_points"),
        (replace(PROGRAM, redeem_fen=0), "redeem_fen"),
        (
            replace(PROGRAM, transfer=TransferPolicy(allowed=True)),
            "transfer.per_transfer_max_points",
        ),
    ],
)
def test_a_faulty_program_names_the_field_at_fault(program: Program, field: str) -> None:
    assert field in fields(check_program(program))


# --- earning ------------------------------------------------------------------------------------


def test_the_base_rate_rounds_down() -> None:
    assert earn_at([BASE], 12_345) == Earning(123, (EarnPart("base", 123),))
    assert earn_at([BASE], 199).points == 1


def test_a_rule_that_gives_nothing_is_not_listed() -> None:
    assert earn_at([BASE], 99) == Earning(0, ())


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, limits.POS_AMOUNT_MAX // 1000),
    st.integers(1, 1000),
    st.integers(1, 100_000),
)
def test_a_rate_rule_gives_the_exact_floor_and_never_more(
    amount: int, points: int, per_fen: int
) -> None:
    rule = Rule("r", RuleKind.BASE, points=points, per_fen=per_fen)
    earned = earn_at([rule], amount).points
    assert earned == min(amount * points // per_fen, limits.POINTS_PER_TXN_MAX)
    assert earned * per_fen <= amount * points
    assert type(earned) is int


def test_a_category_rule_counts_only_lines_of_its_departments_or_categories() -> None:
    rule = Rule(
        "fresh",
        RuleKind.CATEGORY,
        points=2,
        per_fen=100,
        departments=frozenset({"fresh"}),
        categories=frozenset({"wine"}),
    )
    lines = (Line("fresh", "fruit", 1_050), Line("drinks", "wine", 2_000), Line("toys", "x", 900))
    assert earn_at([rule], Basket(5_000, lines)).points == 61  # 3050 fen x 2 / 100
    assert earn_at([rule], Basket(5_000)).points == 0


def test_multipliers_apply_in_one_floor() -> None:
    # 123 x 150 % x 120 % = 221.4: one floor gives 221 (two floors would give 220 or 221)
    assert earn_at([BASE], 12_345, class_pct=150, tier_pct=120).points == 221
    assert earn_at([BASE], 12_345, class_pct=0).points == 0


def test_a_rule_may_refuse_each_multiplier() -> None:
    no_class = replace(BASE, card_class_multiplier=False)
    no_tier = replace(BASE, tier_multiplier=False)
    assert earn_at([no_class], 10_000, class_pct=200, tier_pct=150).points == 150
    assert earn_at([no_tier], 10_000, class_pct=200, tier_pct=150).points == 200


def test_the_per_transaction_cap_comes_before_the_daily_cap() -> None:
    rule = replace(BASE, cap_per_txn_points=50, cap_per_day_points=120)
    assert earn_at([rule], 10_000).points == 50
    assert earn_at([rule], 10_000, today={"base": 100}).points == 20
    assert earn_at([rule], 10_000, today={"base": 120}).points == 0
    assert earn_at([rule], 10_000, today={"other": 120}).points == 50


def test_caps_apply_after_the_multipliers() -> None:
    rule = replace(BASE, cap_per_txn_points=150)
    assert earn_at([rule], 10_000, tier_pct=200).points == 150


@pytest.mark.parametrize(
    ("hour", "minute", "gives"),
    [(21, 59, False), (22, 0, True), (23, 59, True), (0, 0, True), (1, 59, True), (2, 0, False)],
)
def test_a_time_window_may_cross_midnight(hour: int, minute: int, gives: bool) -> None:
    rule = replace(BASE, window=("22:00", "02:00"))
    now = shanghai_ms(2026, 4, 1, hour, minute)
    assert (earn_at([rule], 1_000, now_ms=now).points > 0) is gives


def test_a_window_ending_at_midnight_covers_the_evening() -> None:
    rule = replace(BASE, window=("18:00", "00:00"))
    assert earn_at([rule], 1_000, now_ms=shanghai_ms(2026, 4, 1, 23, 59)).points == 10
    assert earn_at([rule], 1_000, now_ms=shanghai_ms(2026, 4, 2, 0, 0)).points == 0


def test_validity_dates_are_local_and_inclusive() -> None:
    rule = replace(BASE, valid_from=datetime.date(2026, 4, 1), valid_to=datetime.date(2026, 4, 30))
    assert earn_at([rule], 1_000, now_ms=shanghai_ms(2026, 4, 1)).points == 10
    assert earn_at([rule], 1_000, now_ms=shanghai_ms(2026, 5, 1) - 1).points == 10
    assert earn_at([rule], 1_000, now_ms=utc_ms(2026, 4, 30, 16, 30)).points == 0  # 1 May local
    assert earn_at([rule], 1_000, now_ms=utc_ms(2026, 3, 31, 15, 59)).points == 0  # 31 March


def test_weekdays_are_those_of_the_local_purchase_date() -> None:
    weekend = replace(BASE, weekdays=frozenset({6, 7}))
    assert earn_at([weekend], 1_000, now_ms=shanghai_ms(2026, 4, 4, 10)).points == 10  # Saturday
    assert earn_at([weekend], 1_000, now_ms=shanghai_ms(2026, 4, 3, 10)).points == 0  # Friday
    assert earn_at([weekend], 1_000, now_ms=utc_ms(2026, 4, 3, 16, 30)).points == 10  # Sat local


def test_a_rule_naming_stores_applies_only_there() -> None:
    rule = replace(BASE, stores=frozenset({"S2"}))
    assert earn_at([rule], 1_000, store="S1").points == 0
    assert earn_at([rule], 1_000, store="S2").points == 10


def test_below_the_minimum_spend_a_rule_gives_nothing() -> None:
    rule = replace(BASE, min_spend_fen=5_000)
    assert earn_at([rule], 4_999).points == 0
    assert earn_at([rule], 5_000).points == 50


def test_a_non_stackable_rule_that_gives_points_stops_the_later_rules() -> None:
    promo = Rule("promo", RuleKind.BASE, priority=1, points=3, per_fen=100, stackable=False)
    later = replace(BASE, priority=2)
    assert earn_at([later, promo], 1_000) == Earning(30, (EarnPart("promo", 30),))


def test_a_non_stackable_rule_that_gives_nothing_stops_nothing() -> None:
    promo = Rule(
        "promo",
        RuleKind.BASE,
        priority=1,
        points=3,
        per_fen=100,
        stackable=False,
        stores=frozenset({"S9"}),
    )
    capped = replace(promo, stores=frozenset(), cap_per_day_points=30)
    later = replace(BASE, priority=2)
    assert earn_at([promo, later], 1_000).points == 10
    assert earn_at([capped, later], 1_000, today={"promo": 30}).points == 10


def test_a_bonus_adds_fixed_points_and_a_percent_of_the_points_so_far() -> None:
    bonus = Rule("double", RuleKind.BONUS, priority=5, points=7, bonus_pct=100)
    assert earn_at([BASE, bonus], 12_345) == Earning(
        253, (EarnPart("base", 123), EarnPart("double", 130))
    )
    half = replace(bonus, points=0, bonus_pct=50)
    assert earn_at([BASE, half], 12_345).points == 123 + 61


def test_a_percent_bonus_takes_its_share_of_points_already_multiplied_once() -> None:
    """Class 200 %, tier 150 %: the base's 100 points become 300; a 50 % bonus adds 150 (of
    the 300, not multiplied again), its fixed 7 points multiplied (21)."""
    bonus = Rule("bonus", RuleKind.BONUS, priority=5, points=7, bonus_pct=50)
    got = earn_at([BASE, bonus], 10_000, class_pct=200, tier_pct=150)
    assert got.parts == (EarnPart("base", 300), EarnPart("bonus", 21 + 150))


def test_rules_apply_by_priority_then_code() -> None:
    first = Rule("b", RuleKind.BASE, priority=1, points=1, per_fen=100)
    second = Rule("a", RuleKind.BASE, priority=2, points=1, per_fen=100)
    tie = Rule("c", RuleKind.BASE, priority=1, points=1, per_fen=100)
    bonus = Rule("bonus", RuleKind.BONUS, priority=3, bonus_pct=10)
    parts = earn_at([bonus, second, tie, first], 1_000).parts
    assert [p.rule for p in parts] == ["b", "c", "a", "bonus"]
    assert parts[-1].points == 3


def test_one_earning_gives_at_most_the_transaction_limit() -> None:
    rule = Rule("big", RuleKind.BASE, points=limits.POINTS_RATE_MAX, per_fen=1)
    earned = earn_at([rule, replace(rule, code="big2")], limits.POS_AMOUNT_MAX)
    assert earned.points == limits.POINTS_PER_TXN_MAX
    assert [p.points for p in earned.parts] == [limits.POINTS_PER_TXN_MAX]


@pytest.mark.parametrize(
    "basket",
    [
        Basket(-1),
        Basket(100, (Line("d", "c", 60), Line("d", "c", 50))),
        Basket(100, (Line("d", "c", -1),)),
        Basket(limits.POS_AMOUNT_MAX + 1),
    ],
)
def test_a_faulty_basket_is_refused(basket: Basket) -> None:
    assert check_basket(basket)
    with pytest.raises(PointsRefused) as caught:
        earn_at([BASE], basket)
    assert caught.value.code == "basket_invalid"


def test_a_basket_of_lines_covering_less_than_its_total_is_fine() -> None:
    assert check_basket(Basket(100, (Line("d", "c", 60),))) == ()


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (replace(BASE, code=""), "code"),
        (replace(BASE, code="x" * 33), "code"),
        (replace(BASE, priority=-1), "priority"),
        (replace(BASE, points=0), "points"),
        (replace(BASE, per_fen=0), "per_fen"),
        (replace(BASE, bonus_pct=10), "bonus_pct"),
        (replace(BASE, departments=frozenset({"fresh"})), "departments"),
        (Rule("c", RuleKind.CATEGORY, points=1, per_fen=100), "departments"),
        (Rule("b", RuleKind.BONUS), "points"),
        (Rule("b", RuleKind.BONUS, bonus_pct=limits.POINTS_BONUS_PCT_MAX + 1), "bonus_pct"),
        (replace(BASE, min_spend_fen=-1), "min_spend_fen"),
        (replace(BASE, cap_per_txn_points=-1), "cap_per_txn_points"),
        (replace(BASE, cap_per_day_points=-1), "cap_per_day_points"),
        (
            replace(BASE, valid_from=datetime.date(2026, 5, 1), valid_to=datetime.date(2026, 4, 1)),
            "valid_to",
        ),
        (replace(BASE, window=("22:00", "22:00")), "window"),
        (replace(BASE, window=("24:00", "02:00")), "window"),
        (replace(BASE, window=("9:00", "12:00")), "window"),
        (replace(BASE, weekdays=frozenset({0})), "weekdays"),
        (replace(BASE, stores=frozenset({""})), "stores"),
        (replace(BASE, stores=frozenset(str(n) for n in range(501))), "stores"),
    ],
)
def test_a_faulty_rule_names_the_field_at_fault(rule: Rule, field: str) -> None:
    assert field in fields(check_rule(rule))


# --- lots ---------------------------------------------------------------------------------------

NOW = utc_ms(2026, 6, 1)


def lot(key: str, remaining: int, expires: int | None, available: int = NOW - DAY_MS) -> Lot:
    return Lot(key, available, expires, remaining)


def pairs(takes: tuple[Take, ...]) -> list[tuple[str, int]]:
    return [(t.key, t.points) for t in takes]


def test_a_spend_takes_the_earliest_expiry_first_and_never_expiring_points_last() -> None:
    lots = [
        lot("never", 100, None),
        lot("late", 10, NOW + 9 * DAY_MS),
        lot("b-soon", 10, NOW + DAY_MS),
        lot("a-soon", 10, NOW + DAY_MS),
    ]
    assert pairs(plan_spend(lots, 35, NOW, 0)) == [
        ("a-soon", 10),
        ("b-soon", 10),
        ("late", 10),
        ("never", 5),
    ]


def test_a_debt_counts_against_the_usable_points_of_a_spend() -> None:
    """Points put back into a lot beside a debt (a reward's reversal after a return left a
    debt) are not spent twice: 100 usable and 100 owed spend nothing; 150 usable, 40."""
    lots = [lot("back", 100, None)]
    with pytest.raises(InsufficientPoints) as caught:
        plan_spend(lots, 1, NOW, 100)
    assert caught.value.usable == 0
    more = [lot("back", 100, None), lot("new", 50, None)]
    assert sum(t.points for t in plan_spend(more, 50, NOW, 100)) == 50
    with pytest.raises(InsufficientPoints) as caught:
        plan_spend(more, 51, NOW, 100)
    assert caught.value.usable == 50


def test_a_spend_never_draws_on_pending_or_expired_lots() -> None:
    lots = [
        lot("expired", 50, NOW),
        lot("pending", 50, None, available=NOW + 1),
        lot("ok", 5, None),
    ]
    assert pairs(plan_spend(lots, 5, NOW, 0)) == [("ok", 5)]
    with pytest.raises(InsufficientPoints) as caught:
        plan_spend(lots, 6, NOW, 0)
    assert (caught.value.code, caught.value.needed, caught.value.usable) == (
        POINTS_INSUFFICIENT,
        6,
        5,
    )


@pytest.mark.parametrize(
    ("points", "code"),
    [
        (0, POINTS_NOT_POSITIVE),
        (-5, POINTS_NOT_POSITIVE),
        (limits.POINTS_PER_TXN_MAX + 1, POINTS_OVER_LIMIT),
    ],
)
def test_a_spend_of_no_or_too_many_points_is_refused(points: int, code: str) -> None:
    with pytest.raises(PointsRefused) as caught:
        plan_spend([lot("a", 10, None)], points, NOW, 0)
    assert caught.value.code == code


def test_a_clawback_takes_pending_first_then_the_earnings_lot_then_latest_expiry() -> None:
    """From pending first (issue 5), whichever earning they came from; then the returned
    earning's own usable lot; then the other usable lots, latest expiry first."""
    lots = [
        lot("soon", 10, NOW + DAY_MS),
        lot("late", 10, NOW + 9 * DAY_MS),
        lot("never", 10, None),
        lot("pending-old", 10, None, available=NOW + DAY_MS),
        lot("pending-new", 10, None, available=NOW + 2 * DAY_MS),
        lot("own", 10, NOW + DAY_MS),
        lot("expired", 10, NOW),
    ]
    claw = plan_clawback(lots, 65, NOW, earn_lot_keys={"own", "expired"})
    assert pairs(claw.takes) == [
        ("pending-new", 10),
        ("pending-old", 10),
        ("own", 10),
        ("never", 10),
        ("late", 10),
        ("soon", 10),
    ]
    assert claw.shortfall == 5


def test_a_clawback_takes_the_earnings_own_pending_lot_before_other_pending_ones() -> None:
    lots = [
        lot("pending-new", 10, None, available=NOW + 2 * DAY_MS),
        lot("own", 10, None, available=NOW + DAY_MS),
        lot("usable", 10, None),
    ]
    claw = plan_clawback(lots, 15, NOW, earn_lot_keys={"own"})
    assert pairs(claw.takes) == [("own", 10), ("pending-new", 5)]


def test_a_clawback_of_nothing_takes_nothing() -> None:
    claw = plan_clawback([lot("a", 10, None)], 0, NOW)
    assert (claw.takes, claw.shortfall) == ((), 0)


def test_a_return_in_parts_claws_back_what_the_whole_return_would() -> None:
    parts = [proportional_clawback(100, 300, before, 100, 100 * before // 300)
             for before in (0, 100, 200)]  # fmt: skip
    assert parts == [33, 33, 34]
    assert proportional_clawback(100, 300, 0, 300, 0) == 100
    assert proportional_clawback(100, 300, 0, 150, 0) == 50


def test_a_return_after_an_earlier_one_was_reversed_never_takes_more_than_the_earning() -> None:
    """100 points on 100.00: 1.50 returned (1 point), 98.50 returned (99), the 1.50 return
    reversed (1.50 and 1 point back), 1.50 returned again: 1 point, never 2 (101 in all)."""
    first = proportional_clawback(100, 10_000, 0, 150, 0)
    second = proportional_clawback(100, 10_000, 150, 9_850, first)
    assert (first, second) == (1, 99)
    again = proportional_clawback(100, 10_000, 9_850, 150, first + second - first)
    assert again == 1
    # More taken than the floor says (a reversal's order): nothing more, never negative.
    assert proportional_clawback(100, 300, 100, 50, 40) == 10
    assert proportional_clawback(100, 300, 100, 1, 40) == 0


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, limits.POINTS_PER_TXN_MAX),
    st.lists(st.integers(0, 10**9), min_size=1, max_size=20),
)
def test_any_split_of_a_whole_return_claws_back_exactly_all_points(
    earned: int, returns: list[int]
) -> None:
    original = sum(returns)
    before = clawed = 0
    for now in returns:
        clawed += proportional_clawback(earned, original, before, now, clawed)
        before += now
        assert 0 <= clawed <= earned
    assert clawed == (earned if original else 0)


def test_a_return_beyond_the_original_amount_is_refused() -> None:
    with pytest.raises(PointsRefused) as caught:
        proportional_clawback(100, 300, 200, 101, 66)
    assert caught.value.code == RETURN_EXCEEDS_ORIGINAL
    assert proportional_clawback(100, 300, 200, 100, 66) == 34


def test_new_earnings_repay_a_debt_first() -> None:
    assert settle_debt(30, 100) == (30, 70)
    assert settle_debt(300, 100) == (100, 0)
    assert settle_debt(0, 100) == (0, 100)


def test_expiry_takes_every_expired_remainder_once() -> None:
    lots = (lot("old", 7, NOW - 1), lot("now", 3, NOW), lot("empty", 0, NOW), lot("ok", 5, None))
    takes = expire(lots, NOW)
    assert pairs(takes) == [("old", 7), ("now", 3)]
    after = take_from(lots, takes)
    assert expire(after, NOW) == ()
    assert [x.remaining for x in after] == [0, 0, 0, 5]


def test_reminders_list_points_expiring_within_the_days_asked() -> None:
    lots = [
        lot("gone", 5, NOW),
        lot("d3", 5, NOW + 3 * DAY_MS),
        lot("d1", 5, NOW + DAY_MS),
        lot("d8", 5, NOW + 8 * DAY_MS),
        lot("never", 5, None),
        lot("spent", 0, NOW + DAY_MS),
    ]
    assert pairs(expiring_within(lots, NOW, 7)) == [("d1", 5), ("d3", 5)]
    assert expiring_within(lots, NOW, 0) == ()


def test_a_reversal_puts_back_exactly_the_takes_into_the_same_lots() -> None:
    lots = (lot("a", 10, NOW + DAY_MS), lot("b", 10, None))
    takes = plan_spend(lots, 15, NOW, 0)
    spent = take_from(lots, takes)
    assert [x.remaining for x in spent] == [0, 5]
    assert put_back(spent, takes) == lots


# --- the ledger of lots under any history (hypothesis) ------------------------------------------

SIM_PROGRAM = replace(PROGRAM, pending_days=2, expiry=ROLLING_1)
SIM_START = shanghai_ms(2026, 1, 1)


@dataclass
class EarnRecord:
    lot_key: str | None
    points: int
    fen: int
    returned_fen: int = 0
    clawed: int = 0


@dataclass
class Simulator:
    """A member's lots driven only by the model's functions, and a balance kept apart."""

    now: int = SIM_START
    lots: tuple[Lot, ...] = ()
    balance: int = 0
    debt: int = 0
    put_in: dict[str, int] = field(default_factory=dict)
    taken: dict[str, int] = field(default_factory=dict)
    earnings: list[EarnRecord] = field(default_factory=list)
    spends: list[tuple[Take, ...]] = field(default_factory=list)

    def take(self, takes: tuple[Take, ...]) -> int:
        self.lots = take_from(self.lots, takes)
        for t in takes:
            self.taken[t.key] = self.taken.get(t.key, 0) + t.points
        return sum(t.points for t in takes)

    def earn(self, fen: int) -> None:
        earned = earn(
            SIM_PROGRAM,
            [BASE],
            Basket(fen),
            now_ms=self.now,
            store="S1",
            card_class_multiplier_pct=100,
            tier_multiplier_pct=100,
            earned_today_by_rule={},
        ).points
        repaid, left = settle_debt(self.debt, earned)
        self.debt -= repaid
        key = f"lot{len(self.earnings)}" if left else None
        if key is not None:
            self.lots += (earn_lot(SIM_PROGRAM, key, self.now, left),)
            self.put_in[key] = left
            self.balance += left
        self.earnings.append(EarnRecord(key, earned, fen))

    def spend(self, points: int) -> None:
        spendable = sum(x.remaining for x in self.lots if is_usable(x, self.now)) - self.debt
        if spendable < points:
            with pytest.raises(InsufficientPoints) as refused:
                plan_spend(self.lots, points, self.now, self.debt)
            assert refused.value.usable == max(0, spendable)
            return
        takes = plan_spend(self.lots, points, self.now, self.debt)
        by_key = {x.key: x for x in self.lots}
        assert all(is_usable(by_key[t.key], self.now) for t in takes), "drew an unusable lot"
        assert self.take(takes) == points
        self.balance -= points
        self.spends.append(takes)

    def give_back(self, which: int, percent: int) -> None:
        if not self.earnings:
            return
        record = self.earnings[which % len(self.earnings)]
        now_fen = (record.fen - record.returned_fen) * percent // 100
        claw = proportional_clawback(
            record.points, record.fen, record.returned_fen, now_fen, record.clawed
        )
        record.returned_fen += now_fen
        record.clawed += claw
        own = {record.lot_key} if record.lot_key else set()
        plan = plan_clawback(self.lots, claw, self.now, own)
        by_key = {x.key: x for x in self.lots}
        assert not any(is_expired(by_key[t.key], self.now) for t in plan.takes)
        taken = self.take(plan.takes)
        assert taken + plan.shortfall == claw
        self.balance -= taken
        self.debt += plan.shortfall
        if record.returned_fen == record.fen:
            assert record.clawed == record.points

    def expire(self) -> None:
        takes = expire(self.lots, self.now)
        by_key = {x.key: x for x in self.lots}
        assert all(is_expired(by_key[t.key], self.now) for t in takes)
        self.balance -= self.take(takes)
        assert expire(self.lots, self.now) == ()

    def reverse(self, which: int) -> None:
        if not self.spends:
            return
        takes = self.spends.pop(which % len(self.spends))
        before = {x.key: x for x in self.lots}
        self.lots = put_back(self.lots, takes)
        back = {t.key: t.points for t in takes}
        for after in self.lots:
            old = before[after.key]
            assert after == replace(old, remaining=old.remaining + back.get(after.key, 0))
            self.put_in[after.key] += back.get(after.key, 0)
        self.balance += sum(back.values())

    def check(self) -> None:
        assert sum(x.remaining for x in self.lots) == self.balance
        assert self.debt >= 0
        for x in self.lots:
            assert x.remaining >= 0
            assert self.taken.get(x.key, 0) <= self.put_in[x.key], "a lot spent twice"
            assert x.remaining == self.put_in[x.key] - self.taken.get(x.key, 0)


OPERATION = st.tuples(
    st.sampled_from(["earn", "spend", "return", "expire", "reverse"]),
    st.integers(1, 50_000),
    st.integers(0, 100),
    st.integers(0, 10 * DAY_MS),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(OPERATION, max_size=40))
def test_lots_always_add_up_to_the_balance_under_any_history(
    operations: list[tuple[str, int, int, int]],
) -> None:
    sim = Simulator()
    for kind, amount, percent, step_ms in operations:
        sim.now += step_ms
        match kind:
            case "earn":
                sim.earn(amount)
            case "spend":
                sim.spend(amount // 100 + 1)
            case "return":
                sim.give_back(amount, percent)
            case "expire":
                sim.expire()
            case "reverse":
                sim.reverse(amount)
        sim.check()


# --- tiers --------------------------------------------------------------------------------------

SILVER = Tier("silver", 0, 100)
GOLD = Tier("gold", 1_000, 150)
PLATINUM = Tier("platinum", 5_000, 200)
LADDER = TierPolicy((SILVER, GOLD, PLATINUM))


def test_the_tier_is_the_highest_threshold_reached() -> None:
    assert tier_for(LADDER.tiers, 999) == SILVER
    assert tier_for(LADDER.tiers, 1_000) == GOLD
    assert tier_for(LADDER.tiers, 10**9) == PLATINUM
    assert tier_for((GOLD,), 999) is None


def test_a_member_moves_up_at_once_and_not_down_during_the_period() -> None:
    assert next_tier(SILVER, 1_000, at_period_end=False, policy=LADDER) == GOLD
    assert next_tier(None, 6_000, at_period_end=False, policy=LADDER) == PLATINUM
    assert next_tier(PLATINUM, 0, at_period_end=False, policy=LADDER) == PLATINUM


def test_at_period_end_a_member_gets_the_tier_the_period_qualifies_for() -> None:
    assert next_tier(PLATINUM, 1_200, at_period_end=True, policy=LADDER) == GOLD
    assert next_tier(SILVER, 6_000, at_period_end=True, policy=LADDER) == PLATINUM
    assert next_tier(GOLD, 10, at_period_end=True, policy=TierPolicy((GOLD,))) is None


def test_without_downgrades_a_member_never_moves_down() -> None:
    keep = replace(LADDER, downgrade=Downgrade.NEVER)
    assert next_tier(PLATINUM, 0, at_period_end=True, policy=keep) == PLATINUM
    assert next_tier(SILVER, 1_000, at_period_end=True, policy=keep) == GOLD


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        (TierPeriod.CALENDAR_MONTH, (2026, 5, 1), (2026, 6, 1)),
        (TierPeriod.CALENDAR_QUARTER, (2026, 4, 1), (2026, 7, 1)),
        (TierPeriod.CALENDAR_YEAR, (2026, 1, 1), (2027, 1, 1)),
    ],
)
def test_tier_periods_are_local_calendar_periods(
    period: TierPeriod, start: tuple[int, int, int], end: tuple[int, int, int]
) -> None:
    policy = replace(LADDER, period=period)
    bounds = (shanghai_ms(*start), shanghai_ms(*end))
    assert period_bounds(policy, SHANGHAI, shanghai_ms(2026, 5, 15, 12)) == bounds
    assert period_bounds(policy, SHANGHAI, shanghai_ms(*start)) == bounds
    assert period_bounds(policy, SHANGHAI, shanghai_ms(*end) - 1) == bounds


def test_a_sound_ladder_has_no_problems() -> None:
    assert check_tiers(LADDER.tiers) == ()


@pytest.mark.parametrize(
    ("tiers", "field"),
    [
        ((), "tiers"),
        (tuple(Tier(f"t{n}", n, 100) for n in range(limits.POINTS_TIERS_MAX + 1)), "tiers"),
        ((SILVER, replace(GOLD, code="silver")), "tiers"),
        ((GOLD, SILVER), "tiers[1].threshold"),
        ((SILVER, replace(GOLD, threshold=0)), "tiers[1].threshold"),
        ((SILVER, replace(GOLD, multiplier_pct=99)), "tiers[1].multiplier_pct"),
        (
            (
                replace(GOLD, multiplier_pct=200),
                PLATINUM,
                replace(PLATINUM, code="x", threshold=9_000, multiplier_pct=150),
            ),
            "tiers[2].multiplier_pct",
        ),
        ((replace(SILVER, threshold=-1),), "tiers[0].threshold"),
        ((replace(SILVER, code="a b"),), "tiers[0].code"),
    ],
)
def test_a_faulty_ladder_names_the_field_at_fault(tiers: tuple[Tier, ...], field: str) -> None:
    assert field in fields(check_tiers(tiers))


# --- transfers ----------------------------------------------------------------------------------

TRANSFERS = replace(
    PROGRAM,
    transfer=TransferPolicy(allowed=True, per_transfer_max_points=500, per_day_max_points=800),
)


@pytest.mark.parametrize(
    ("program", "points", "today", "code"),
    [
        (PROGRAM, 10, 0, TRANSFER_NOT_ALLOWED),
        (TRANSFERS, 0, 0, POINTS_NOT_POSITIVE),
        (TRANSFERS, -1, 0, POINTS_NOT_POSITIVE),
        (TRANSFERS, 501, 0, TRANSFER_OVER_LIMIT),
        (TRANSFERS, 500, 301, TRANSFER_OVER_DAILY_LIMIT),
        (TRANSFERS, 500, 300, None),
        (TRANSFERS, 1, 0, None),
    ],
)
def test_a_transfer_is_refused_beyond_the_programs_policy(
    program: Program, points: int, today: int, code: str | None
) -> None:
    assert check_transfer(program, points, today) == code


# --- redemption ---------------------------------------------------------------------------------

BLOCKS = replace(PROGRAM, redeem_points=200, redeem_fen=150)  # 200 points = 1.50 CNY


def test_points_are_worth_whole_blocks_only() -> None:
    assert fen_for_points(BLOCKS, 200) == 150
    assert fen_for_points(BLOCKS, 399) == 150
    assert fen_for_points(BLOCKS, 199) == 0
    assert fen_for_points(PROGRAM, 12_345) == 12_300


def test_an_amount_costs_the_fewest_whole_blocks_covering_it() -> None:
    assert points_for_fen(BLOCKS, 150) == 200
    assert points_for_fen(BLOCKS, 151) == 400
    assert points_for_fen(BLOCKS, 1) == 200
    assert points_for_fen(PROGRAM, 12_345) == 12_400


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**6), st.integers(1, 1000), st.integers(1, 1000))
def test_the_points_for_an_amount_always_cover_it(fen: int, points: int, per: int) -> None:
    program = replace(PROGRAM, redeem_points=points, redeem_fen=per)
    needed = points_for_fen(program, fen)
    assert fen_for_points(program, needed) >= fen
    assert needed == points or fen_for_points(program, needed - points) < fen


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda: fen_for_points(BLOCKS, 300, exact=True), "redeem_not_whole_blocks"),
        (lambda: points_for_fen(BLOCKS, 200, exact=True), "redeem_not_whole_blocks"),
        (lambda: fen_for_points(BLOCKS, 0), POINTS_NOT_POSITIVE),
        (lambda: points_for_fen(BLOCKS, 0), "amount_not_positive"),
        (lambda: points_for_fen(PROGRAM, limits.POINTS_PER_TXN_MAX + 1), POINTS_OVER_LIMIT),
    ],
)
def test_redemption_refuses_part_blocks_when_exact_and_empty_amounts(
    call: object, code: str
) -> None:
    assert callable(call)
    with pytest.raises(PointsRefused) as caught:
        call()
    assert caught.value.code == code


def test_exact_redemption_of_whole_blocks_is_allowed() -> None:
    assert fen_for_points(BLOCKS, 400, exact=True) == 300
    assert points_for_fen(BLOCKS, 300, exact=True) == 400


# --- definitions as JSON and lots as ledger accounts -----------------------------------------


def test_a_program_and_a_rule_survive_their_json_form() -> None:
    program = Program(
        "P1",
        pending_days=7,
        expiry=Expiry(ExpiryKind.FIXED_DATE, months=6, month=12, day=31),
        negative_policy=NegativePolicy.NEGATIVE,
        transfer=TransferPolicy(True, 500, 1000),
    )
    assert program_of(program_json(program)) == program
    rule = Rule(
        "R1",
        RuleKind.CATEGORY,
        points=2,
        per_fen=100,
        departments=frozenset({"FOOD"}),
        valid_from=datetime.date(2026, 1, 1),
        window=("22:00", "02:00"),
        weekdays=frozenset({6, 7}),
        cap_per_day_points=500,
    )
    assert rule_of(rule_json(rule)) == rule


def test_a_rule_with_a_date_that_is_not_a_date_is_refused_naming_the_field() -> None:
    raw = {**rule_json(Rule("R1", RuleKind.BASE, points=1)), "valid_to": "2026-02-30"}
    with pytest.raises(PointsRefused) as caught:
        rule_of(raw)
    assert caught.value.field == "valid_to"


def test_a_lot_account_purpose_names_its_local_expiry_and_availability_days() -> None:
    program = Program("P", pending_days=7, expiry=Expiry(ExpiryKind.ROLLING_MONTHS, 1))
    earned = utc_ms(2026, 1, 30, 17, 0)  # 31 January in Shanghai
    purpose = lot_purpose(program, earned)
    assert purpose == "lot:20260228:20260207"
    lot = lot_of(program, purpose, 40)
    assert lot == Lot(purpose, available_ms(program, earned), expiry_ms(program, earned), 40)
    assert lot.expires_ms == utc_ms(2026, 2, 28, 16, 0)
    assert lot_expiry_day(purpose) == "20260228"  # the day its notices are grouped by


def test_a_lot_without_window_or_expiry_is_usable_at_once_for_ever() -> None:
    program = Program("P")
    purpose = lot_purpose(program, utc_ms(2026, 5, 1))
    assert purpose == "lot:never:0"
    assert lot_expiry_day(purpose) == "never"
    assert lot_of(program, purpose, 3) == Lot(purpose, 0, None, 3)
    assert lot_of(program, purpose, -2).remaining == 0  # a debt never shows as a lot


def test_day_number_is_the_programs_local_date() -> None:
    assert day_number("Asia/Shanghai", utc_ms(2026, 3, 31, 16, 30)) == 20260401
    assert day_number("UTC", utc_ms(2026, 3, 31, 16, 30)) == 20260331
