"""The manager card rules (pure): the policy's bounds, all-or-nothing authorization against
the percent cap, the daily total, the reasons and the presenting card, and the local day."""

from __future__ import annotations

import calendar
from dataclasses import replace

import pytest

from cardcore import limits
from cardcore.manager_cards.model import (
    DEFAULT_TZ,
    Decision,
    Holder,
    ManagerCard,
    ManagerState,
    authorize,
    check_card,
    holder_refusal,
    local_day_bounds,
    percent_cap_fen,
)
from cardcore.org.model import Place, Refused

SHANGHAI = DEFAULT_TZ
HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS

CARD = ManagerCard(
    staff_user_id=42,
    max_percent_bp=1_000,  # 10 % of the bill
    daily_total_fen=50_000,  # 500 CNY a day
    reasons=frozenset({"damaged", "vip", "price_match"}),
    state=ManagerState.ACTIVE,
)


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, 0)) * 1000


def ask(
    card: ManagerCard = CARD,
    *,
    bill: int = 100_000,
    discount: int = 5_000,
    reason: str = "damaged",
    today: int = 0,
    role: str = "manager",
) -> Decision:
    return authorize(
        card,
        bill_fen=bill,
        discount_fen=discount,
        reason=reason,
        authorized_today_fen=today,
        presenting_role=role,
    )


def refusal(decision: Decision) -> str:
    assert not decision.ok
    assert decision.approved_fen == 0  # nothing is approved of a refused discount
    return decision.refusal


# --- the policy ---------------------------------------------------------------------------------


def test_a_policy_within_its_bounds_is_accepted() -> None:
    check_card(CARD)
    check_card(
        replace(
            CARD,
            max_percent_bp=limits.MANAGER_PERCENT_BP_MAX,
            daily_total_fen=limits.MANAGER_DAILY_FEN_MAX,
            reasons=frozenset({"x" * limits.MANAGER_REASON_CHARS_MAX}),
        )
    )


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("staff_user_id", {"staff_user_id": 0}),
        ("staff_user_id", {"staff_user_id": limits.RECORD_ID_MAX + 1}),
        ("max_percent_bp", {"max_percent_bp": 0}),
        ("max_percent_bp", {"max_percent_bp": limits.MANAGER_PERCENT_BP_MAX + 1}),
        ("max_percent_bp", {"max_percent_bp": 10.5}),
        ("daily_total_fen", {"daily_total_fen": 0}),
        ("daily_total_fen", {"daily_total_fen": limits.MANAGER_DAILY_FEN_MAX + 1}),
        ("daily_total_fen", {"daily_total_fen": 500.0}),
        ("reasons", {"reasons": frozenset()}),
        ("reasons", {"reasons": frozenset(f"r{i}" for i in range(limits.MANAGER_REASONS_MAX + 1))}),
        ("reasons", {"reasons": frozenset({"x" * (limits.MANAGER_REASON_CHARS_MAX + 1)})}),
        ("reasons", {"reasons": frozenset({"Price Match"})}),
        ("reasons", {"reasons": frozenset({""})}),
    ],
)
def test_a_policy_out_of_bounds_is_refused_naming_the_field_negative(
    field: str, changes: dict[str, object]
) -> None:
    with pytest.raises(Refused) as caught:
        check_card(replace(CARD, **changes))  # type: ignore[arg-type]
    assert (caught.value.status, caught.value.code, caught.value.field) == (
        400,
        "invalid_value",
        field,
    )


# --- the presenting card and its state ----------------------------------------------------------


def test_a_manager_card_authorizes_the_whole_discount() -> None:
    assert ask(discount=5_000) == Decision(ok=True, refusal="", approved_fen=5_000)


@pytest.mark.parametrize("role", ["cashier", "member", "", "MANAGER"])
def test_a_card_that_is_not_a_manager_card_cannot_authorize_negative(role: str) -> None:
    assert refusal(ask(role=role)) == "manager_not_manager"


def test_a_disabled_manager_card_cannot_authorize_negative() -> None:
    assert refusal(ask(replace(CARD, state=ManagerState.DISABLED))) == "manager_not_active"


def test_the_presenting_card_is_checked_before_anything_else() -> None:
    disabled = replace(CARD, state=ManagerState.DISABLED)
    assert refusal(ask(disabled, role="cashier", discount=0)) == "manager_not_manager"
    assert refusal(ask(disabled, discount=0)) == "manager_not_active"


# --- amounts and reasons ------------------------------------------------------------------------


def test_a_discount_of_the_whole_bill_is_a_valid_amount() -> None:
    whole = replace(CARD, max_percent_bp=10_000)
    assert ask(whole, bill=3_000, discount=3_000).approved_fen == 3_000
    assert ask(bill=3_000, discount=1).approved_fen == 1


@pytest.mark.parametrize(("bill", "discount"), [(3_000, 0), (3_000, -1), (3_000, 3_001), (0, 1)])
def test_a_discount_of_nothing_or_more_than_the_bill_is_refused_negative(
    bill: int, discount: int
) -> None:
    whole = replace(CARD, max_percent_bp=10_000)
    assert refusal(ask(whole, bill=bill, discount=discount)) == "manager_bad_amount"


@pytest.mark.parametrize("reason", ["damaged", "vip", "price_match"])
def test_an_allowed_reason_authorizes(reason: str) -> None:
    assert ask(reason=reason).ok


@pytest.mark.parametrize("reason", ["", "birthday", "VIP", " vip"])
def test_a_missing_or_unknown_reason_is_refused_negative(reason: str) -> None:
    assert refusal(ask(reason=reason)) == "manager_reason_unknown"


# --- the percent cap ----------------------------------------------------------------------------


def test_a_discount_exactly_at_the_percent_cap_is_approved() -> None:
    assert ask(bill=100_000, discount=10_000) == Decision.approve(10_000)
    # 10 % of 99.99 CNY is 9.999 CNY: the cap is 999 fen, and 999 fen is approved
    assert percent_cap_fen(9_999, 1_000) == 999
    assert ask(bill=9_999, discount=999).approved_fen == 999


def test_a_discount_one_fen_over_the_percent_cap_is_refused_whole_negative() -> None:
    assert refusal(ask(bill=100_000, discount=10_001)) == "manager_over_percent"
    assert refusal(ask(bill=9_999, discount=1_000)) == "manager_over_percent"  # not cut to 999


# --- the daily total ----------------------------------------------------------------------------


def test_a_discount_that_reaches_the_daily_total_exactly_is_approved() -> None:
    assert ask(bill=200_000, discount=10_000, today=40_000).approved_fen == 10_000


def test_the_next_fen_after_the_daily_total_is_refused_negative() -> None:
    assert refusal(ask(bill=200_000, discount=10_001, today=40_000)) == "manager_over_daily"
    assert refusal(ask(discount=1, today=50_000)) == "manager_over_daily"


def test_a_discount_over_the_daily_total_is_not_cut_down_negative() -> None:
    decision = ask(discount=10_000, today=45_000)  # 5,000 fen of room left: still all or none
    assert refusal(decision) == "manager_over_daily"


# --- the card's staff user ---------------------------------------------------------------------

S1 = Place("LE1", "S1")
SUPERVISOR = Holder(state="active", role="store_supervisor", scope_kind="store", scope_id="S1")


@pytest.mark.parametrize(
    "holder",
    [
        SUPERVISOR,
        Holder(state="active", role="hq_admin", scope_kind="group", scope_id=""),
        Holder(state="active", role="hq_admin", scope_kind="entity", scope_id="LE1"),
    ],
)
def test_an_active_staff_user_of_the_store_or_above_it_may_hold_the_card(holder: Holder) -> None:
    assert holder_refusal(holder, S1) == ""


@pytest.mark.parametrize(
    ("holder", "refusal"),
    [
        (None, "manager_staff_disabled"),
        (replace(SUPERVISOR, state="disabled"), "manager_staff_disabled"),
        (replace(SUPERVISOR, role="auditor"), "manager_staff_not_eligible"),
        (replace(SUPERVISOR, scope_id="S2"), "manager_staff_not_eligible"),
        (replace(SUPERVISOR, scope_kind="entity", scope_id="LE2"), "manager_staff_not_eligible"),
    ],
)
def test_a_staff_user_disabled_gone_or_out_of_role_cannot_hold_the_card_negative(
    holder: Holder | None, refusal: str
) -> None:
    assert holder_refusal(holder, S1) == refusal


# --- the local day ------------------------------------------------------------------------------


def test_the_day_begins_at_local_midnight_in_shanghai_16_00_utc() -> None:
    start, end = local_day_bounds(SHANGHAI, utc_ms(2026, 3, 10, 12))  # 20:00 in Shanghai
    assert (start, end) == (utc_ms(2026, 3, 9, 16), utc_ms(2026, 3, 10, 16))
    assert local_day_bounds(SHANGHAI, utc_ms(2026, 3, 10, 16)) == (end, end + DAY_MS)
    assert local_day_bounds(SHANGHAI, utc_ms(2026, 3, 10, 16) - 1) == (start, end)


def test_the_day_does_not_begin_at_utc_midnight_negative() -> None:
    # 23:30 UTC on 9 March is 07:30 on 10 March in Shanghai: the same day as 12:00 UTC on 10 March
    late_utc = utc_ms(2026, 3, 9, 23, 30)
    assert local_day_bounds(SHANGHAI, late_utc) == local_day_bounds(
        SHANGHAI, utc_ms(2026, 3, 10, 12)
    )
    start, _ = local_day_bounds(SHANGHAI, late_utc)
    assert start != utc_ms(2026, 3, 9)
    assert start != utc_ms(2026, 3, 10)
    assert local_day_bounds("UTC", late_utc) == (utc_ms(2026, 3, 9), utc_ms(2026, 3, 10))


def test_a_day_that_skips_midnight_for_summer_time_is_23_hours() -> None:
    santiago = "America/Santiago"  # clocks went 24:00 -> 01:00 on 8 September 2024
    start, end = local_day_bounds(santiago, utc_ms(2024, 9, 8, 16))
    assert (start, end) == (utc_ms(2024, 9, 8, 4), utc_ms(2024, 9, 9, 3))
    assert end - start == 23 * HOUR_MS
    start, end = local_day_bounds(santiago, utc_ms(2024, 4, 6, 16))  # 25 hours: 24:00 -> 23:00
    assert end - start == 25 * HOUR_MS
