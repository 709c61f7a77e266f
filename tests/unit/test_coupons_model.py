"""The coupon rules: codes and their check symbol, campaign definitions, what a coupon takes off
a bill at the POS and who pays for it, campaign figures (pure; no I/O)."""

from __future__ import annotations

import dataclasses
import itertools
import random
import secrets
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcore import limits
from cardcore.coupons.model import (
    ALPHABET,
    CHECK_ALPHABET,
    REFUSALS,
    Campaign,
    CampaignState,
    ChangeRule,
    CodeState,
    CodeStatus,
    Context,
    CouponKind,
    Line,
    Verdict,
    budget_room,
    check_campaign,
    check_imported,
    check_symbol,
    display,
    evaluate,
    figures,
    new_code,
    normalize,
    parse,
)
from cardcore.org.model import Refused

DAY_MS = 86_400_000
START_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC
END_MS = START_MS + 30 * DAY_MS
NOW_MS = START_MS + DAY_MS


def counting_bytes() -> Callable[[int], bytes]:
    """A deterministic stand-in for secrets.token_bytes: 0, 1, 2, ... mod 256."""
    counter = itertools.count()
    return lambda n: bytes(next(counter) % 256 for _ in range(n))


def refused(call: Callable[..., object], *args: object) -> Refused:
    with pytest.raises(Refused) as caught:
        call(*args)
    assert caught.value.status == 400
    return caught.value


def campaign(**changes: object) -> Campaign:
    base = Campaign(
        code="SPRING26",
        name="Spring 10 off",
        kind=CouponKind.AMOUNT_OFF,
        value_fen=1000,
        valid_from_ms=START_MS,
        valid_to_ms=END_MS,
        state=CampaignState.ACTIVE,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def ctx(**changes: object) -> Context:
    return dataclasses.replace(Context(now_ms=NOW_MS, store="S001", bill_fen=5000), **changes)  # type: ignore[arg-type]


ISSUED = CodeState(CodeStatus.ISSUED)


# --- codes -------------------------------------------------------------------------------------


def test_new_code_is_crockford_symbols_and_its_check_symbol() -> None:
    code = new_code(counting_bytes())
    assert len(code) == limits.COUPON_CODE_CHARS_DEFAULT + 1
    assert set(code[:-1]) <= set(ALPHABET)
    assert code[-1] == check_symbol(code[:-1])
    assert parse(code) == code


def test_new_code_reads_five_bits_per_symbol_from_the_stream() -> None:
    # 0x00 0x44 0x32 0x14 0xc7 = 00000 00001 00010 00011 00100 00101 00110 00111
    stream = bytes.fromhex("00443214c7" * 2)
    code = new_code(lambda n: stream[:n], length=16)
    assert code[:-1] == "0123456701234567"


def test_new_code_draws_each_symbol_equally_often() -> None:
    """Every 5-bit value appears once per 5 bytes of a full cycle: no modulo bias."""
    draw = random.Random(7).randbytes  # deterministic, uniform bytes
    counts = Counter("".join(new_code(draw, length=16)[:-1] for _ in range(4000)))
    assert set(counts) == set(ALPHABET)
    expected = 4000 * 16 / 32
    assert all(abs(count - expected) < 0.1 * expected for count in counts.values())


def test_new_code_of_a_real_csprng_parses() -> None:
    assert parse(new_code(secrets.token_bytes)) != parse(new_code(secrets.token_bytes))


def test_new_code_refuses_a_length_below_the_minimum_negative() -> None:
    with pytest.raises(AssertionError):
        new_code(counting_bytes(), length=limits.COUPON_CODE_CHARS_MIN - 1)


def test_check_symbol_is_the_base32_value_mod_37() -> None:
    assert check_symbol("0") == "0"
    assert check_symbol("Z") == "Z"  # 31
    assert check_symbol("10") == "*"  # 32
    assert check_symbol("14") == "U"  # 36
    assert check_symbol("15") == "0"  # 37
    assert len(CHECK_ALPHABET) == 37


def test_normalize_reads_typing_slips() -> None:
    assert normalize(" abcd-efgh ijkl-mnop ") == "ABCDEFGH1JK1MN0P"
    assert normalize("o0iIlL") == "001111"


def test_normalize_folds_no_non_ascii_letter_negative() -> None:
    assert normalize("\u0131") == "\u0131"  # dotless i: upper-cases to I, never to 1 here


def test_parse_accepts_the_code_as_displayed_and_typed() -> None:
    code = new_code(counting_bytes())
    assert parse(display(code)) == code
    assert parse(display(code).lower()) == code
    assert parse(" " + code.replace("1", "l").replace("0", "o") + " ") == code


@given(st.integers(0, limits.COUPON_CODE_CHARS_DEFAULT), st.sampled_from(ALPHABET))
def test_parse_refuses_any_single_symbol_typo_negative(position: int, symbol: str) -> None:
    code = new_code(counting_bytes())
    typo = code[:position] + symbol + code[position + 1 :]
    if typo != code:
        assert refused(parse, typo).code == "coupon_code_malformed"


def test_parse_refuses_swapped_neighbours_negative() -> None:
    code = "0123456789ABCDE"
    code += check_symbol(code)
    for i in range(len(code) - 2):
        swapped = code[:i] + code[i + 1] + code[i] + code[i + 2 :]
        assert refused(parse, swapped).code == "coupon_code_malformed"


@pytest.mark.parametrize(
    "text",
    ["", "0123", "0" * 40, "0" * 100, "ABCDEFGHJKMNPQRU0", "ABCDEFGHJKMNPQR?", "\uff10" * 16],
)
def test_parse_refuses_wrong_length_or_alphabet_negative(text: str) -> None:
    error = refused(parse, text)
    assert error.code == "coupon_code_malformed"
    assert error.field == "code"


def test_display_groups_by_four() -> None:
    assert display("0123456789ABCDEF") == "0123-4567-89AB-CDEF"
    assert display("0123456789ABC") == "0123-4567-89AB-C"


def test_check_imported_accepts_partner_codes_upper_cased() -> None:
    assert check_imported("ab-12") == "AB-12"
    assert check_imported("ABCD") == "ABCD"
    assert check_imported("X" * limits.COUPON_IMPORTED_CHARS_MAX) == "X" * 32


@pytest.mark.parametrize(
    "text", ["ABC", "X" * 33, "AB CD", "AB_CD", "ÄBCD", "----", "ABCD|1", "AB\tCD"]
)
def test_check_imported_refuses_other_shapes_negative(text: str) -> None:
    assert refused(check_imported, text).code == "coupon_code_malformed"


# --- campaigns ---------------------------------------------------------------------------------


def test_check_campaign_accepts_each_kind() -> None:
    check_campaign(campaign())
    check_campaign(
        campaign(kind=CouponKind.PERCENT_OFF, value_fen=0, percent_bp=1500, cap_fen=3000)
    )
    check_campaign(campaign(kind=CouponKind.GIFT_ITEM, value_fen=800, item_sku="6901234567890"))
    check_campaign(
        campaign(
            store_share_bp=3000,
            supplier_share_bp=7000,
            supplier_id="SUP-1",
            stores=("S001", "S002"),
            departments=("dairy",),
            per_member_max=3,
            per_member_per_day_max=1,
            max_issued=1000,
            max_value_fen=1_000_000,
            min_spend_fen=5000,
            valid_to_ms=START_MS + limits.COUPON_VALIDITY_DAYS_MAX * DAY_MS,
        )
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"code": ""}, "code"),
        ({"code": "a b"}, "code"),
        ({"name": " "}, "name"),
        ({"name": "x\n"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"value_fen": 0}, "value_fen"),
        ({"value_fen": -1}, "value_fen"),
        ({"value_fen": 10.5}, "value_fen"),
        ({"value_fen": True}, "value_fen"),
        ({"value_fen": limits.COUPON_VALUE_FEN_MAX + 1}, "value_fen"),
        ({"percent_bp": 500}, "percent_bp"),
        ({"item_sku": "X1"}, "item_sku"),
        ({"kind": CouponKind.PERCENT_OFF, "value_fen": 0, "percent_bp": 0}, "percent_bp"),
        ({"kind": CouponKind.PERCENT_OFF, "value_fen": 0, "percent_bp": 10_001}, "percent_bp"),
        ({"kind": CouponKind.PERCENT_OFF, "percent_bp": 100}, "value_fen"),
        (
            {"kind": CouponKind.PERCENT_OFF, "value_fen": 0, "percent_bp": 1, "cap_fen": -1},
            "cap_fen",
        ),
        ({"kind": CouponKind.GIFT_ITEM}, "item_sku"),
        ({"store_share_bp": 5000}, "supplier_share_bp"),
        (
            {"store_share_bp": 6000, "supplier_share_bp": 5000, "supplier_id": "S"},
            "supplier_share_bp",
        ),
        ({"store_share_bp": -1, "supplier_share_bp": 10_001}, "store_share_bp"),
        ({"store_share_bp": 5000, "supplier_share_bp": 5000}, "supplier_id"),
        ({"max_issued": -1}, "max_issued"),
        ({"max_value_fen": -1}, "max_value_fen"),
        ({"min_spend_fen": -1}, "min_spend_fen"),
        ({"valid_from_ms": -1}, "valid_from_ms"),
        ({"valid_to_ms": START_MS}, "valid_to_ms"),
        ({"valid_to_ms": START_MS - 1}, "valid_to_ms"),
        ({"valid_to_ms": START_MS + (limits.COUPON_VALIDITY_DAYS_MAX + 1) * DAY_MS}, "valid_to_ms"),
        ({"stores": ("S001", "S001")}, "stores"),
        ({"stores": ("",)}, "stores"),
        ({"stores": tuple(f"S{i}" for i in range(1001))}, "stores"),
        ({"departments": ("da iry",)}, "departments"),
        ({"per_member_max": -1}, "per_member_max"),
        ({"per_member_max": 2, "per_member_per_day_max": 3}, "per_member_per_day_max"),
    ],
)
def test_check_campaign_refuses_bad_definitions_negative(
    changes: dict[str, object], field: str
) -> None:
    error = refused(check_campaign, campaign(**changes))
    assert (error.code, error.field) == ("invalid", field)


def test_budget_room_counts_codes_and_value() -> None:
    c = campaign(max_issued=10, max_value_fen=10_000)
    assert budget_room(c, issued=9, value_used_fen=9000, count=1, value_fen=1000)
    assert budget_room(campaign(), issued=10**8, value_used_fen=10**12, count=1, value_fen=1)


def test_budget_room_refuses_past_either_budget_negative() -> None:
    c = campaign(max_issued=10, max_value_fen=10_000)
    assert not budget_room(c, issued=10, value_used_fen=0, count=1, value_fen=0)
    assert not budget_room(c, issued=0, value_used_fen=9001, count=1, value_fen=1000)


# --- at the POS --------------------------------------------------------------------------------


def test_amount_off_takes_its_value_and_the_store_pays_it() -> None:
    verdict = evaluate(campaign(), ISSUED, ctx())
    assert verdict == Verdict(True, "", 1000, 0, 1000, 0, "")


def test_amount_off_worth_more_than_the_bill_forfeits_the_rest() -> None:
    verdict = evaluate(campaign(value_fen=8000), ISSUED, ctx(bill_fen=5000))
    assert (verdict.ok, verdict.discount_fen, verdict.forfeited_fen) == (True, 5000, 3000)
    assert verdict.store_cost_fen == 5000


def test_amount_off_worth_more_than_the_bill_is_refused_under_refuse_negative() -> None:
    c = campaign(value_fen=8000, change_rule=ChangeRule.REFUSE)
    assert evaluate(c, ISSUED, ctx(bill_fen=5000)) == Verdict(False, "coupon_exceeds_bill")
    assert evaluate(c, ISSUED, ctx(bill_fen=8000)).discount_fen == 8000


def test_percent_off_rounds_down_and_stops_at_its_cap() -> None:
    c = campaign(kind=CouponKind.PERCENT_OFF, value_fen=0, percent_bp=1500, cap_fen=1000)
    assert evaluate(c, ISSUED, ctx(bill_fen=3333)).discount_fen == 499  # 499.95
    assert evaluate(c, ISSUED, ctx(bill_fen=100_000)).discount_fen == 1000
    uncapped = dataclasses.replace(c, cap_fen=0)
    assert evaluate(uncapped, ISSUED, ctx(bill_fen=100_000)).discount_fen == 15_000


def test_gift_item_takes_nothing_off_and_names_the_item() -> None:
    c = campaign(
        kind=CouponKind.GIFT_ITEM,
        value_fen=801,
        item_sku="MUG-01",
        store_share_bp=5000,
        supplier_share_bp=5000,
        supplier_id="SUP",
    )
    verdict = evaluate(c, ISSUED, ctx())
    assert (verdict.discount_fen, verdict.gift_sku) == (0, "MUG-01")
    assert (verdict.store_cost_fen, verdict.supplier_cost_fen) == (401, 400)


@given(
    st.integers(0, limits.COUPON_VALUE_FEN_MAX),
    st.integers(0, 10_000),
    st.integers(1, 10_000),
)
def test_costs_sum_to_the_discount_with_the_remainder_to_the_store(
    bill: int, supplier_bp: int, percent_bp: int
) -> None:
    c = campaign(
        kind=CouponKind.PERCENT_OFF,
        value_fen=0,
        percent_bp=percent_bp,
        store_share_bp=10_000 - supplier_bp,
        supplier_share_bp=supplier_bp,
        supplier_id="SUP",
    )
    verdict = evaluate(c, ISSUED, ctx(bill_fen=bill))
    assert verdict.store_cost_fen + verdict.supplier_cost_fen == verdict.discount_fen
    assert verdict.supplier_cost_fen == verdict.discount_fen * supplier_bp // 10_000
    assert 0 <= verdict.discount_fen <= bill


@pytest.mark.parametrize(
    ("status", "refusal"),
    [
        (CodeStatus.RESERVED, "coupon_reserved"),
        (CodeStatus.REDEEMED, "coupon_used"),
        (CodeStatus.VOIDED, "coupon_inactive"),
        (CodeStatus.EXPIRED, "coupon_expired"),
    ],
)
def test_a_code_not_issued_is_refused_negative(status: CodeStatus, refusal: str) -> None:
    assert evaluate(campaign(), CodeState(status), ctx()) == Verdict(False, refusal)


@pytest.mark.parametrize("state", [CampaignState.DRAFT, CampaignState.PAUSED, CampaignState.ENDED])
def test_a_campaign_not_active_is_refused_negative(state: CampaignState) -> None:
    assert evaluate(campaign(state=state), ISSUED, ctx()).refusal == "coupon_inactive"


def test_validity_is_from_start_until_before_the_end() -> None:
    assert evaluate(campaign(), ISSUED, ctx(now_ms=START_MS)).ok
    assert evaluate(campaign(), ISSUED, ctx(now_ms=END_MS - 1)).ok


def test_validity_refuses_before_start_and_from_the_end_negative() -> None:
    assert evaluate(campaign(), ISSUED, ctx(now_ms=START_MS - 1)).refusal == "coupon_not_started"
    assert evaluate(campaign(), ISSUED, ctx(now_ms=END_MS)).refusal == "coupon_expired"


def test_a_code_expiring_before_its_campaign_expires_first_negative() -> None:
    code = CodeState(CodeStatus.ISSUED, expiry_ms=NOW_MS)
    assert evaluate(campaign(), code, ctx(now_ms=NOW_MS - 1)).ok
    assert evaluate(campaign(), code, ctx(now_ms=NOW_MS)).refusal == "coupon_expired"


def test_store_list_admits_its_stores() -> None:
    assert evaluate(campaign(stores=("S001", "S002")), ISSUED, ctx(store="S002")).ok


def test_store_outside_the_list_or_the_scope_is_refused_negative() -> None:
    c = campaign(stores=("S001",))
    assert evaluate(c, ISSUED, ctx(store="S009")).refusal == "coupon_wrong_store"
    assert evaluate(campaign(), ISSUED, ctx(store_in_scope=False)).refusal == "coupon_wrong_store"


def test_department_scope_applies_to_its_lines_only() -> None:
    c = campaign(kind=CouponKind.PERCENT_OFF, value_fen=0, percent_bp=1000, min_spend_fen=2000)
    scoped = dataclasses.replace(c, departments=("dairy", "bakery"))
    lines = (Line("dairy", 1500), Line("bakery", 500), Line("wine", 3000))
    assert evaluate(scoped, ISSUED, ctx(lines=lines)).discount_fen == 200
    assert evaluate(c, ISSUED, ctx(lines=lines)).discount_fen == 500  # unscoped: the bill


def test_department_scope_refuses_without_its_lines_negative() -> None:
    c = campaign(departments=("dairy",))
    assert evaluate(c, ISSUED, ctx()).refusal == "coupon_wrong_department"
    assert evaluate(c, ISSUED, ctx(lines=())).refusal == "coupon_wrong_department"
    other = ctx(lines=(Line("wine", 5000),))
    assert evaluate(c, ISSUED, other).refusal == "coupon_wrong_department"


def test_min_spend_is_of_the_eligible_amount_negative() -> None:
    c = campaign(departments=("dairy",), min_spend_fen=2000)
    short = ctx(lines=(Line("dairy", 1999), Line("wine", 3001)))
    assert evaluate(c, ISSUED, short).refusal == "coupon_min_spend"
    enough = ctx(lines=(Line("dairy", 2000), Line("wine", 3000)))
    assert evaluate(c, ISSUED, enough).ok


def test_holder_only_coupon_redeems_for_its_holder() -> None:
    code = CodeState(CodeStatus.ISSUED, holder_member_id=42)
    assert evaluate(campaign(holder_only=True), code, ctx(member_id=42)).ok
    assert evaluate(campaign(), code, ctx(member_id=None)).ok  # a bearer coupon: anyone


def test_holder_only_coupon_refuses_anyone_else_negative() -> None:
    c = campaign(holder_only=True)
    code = CodeState(CodeStatus.ISSUED, holder_member_id=42)
    assert evaluate(c, code, ctx(member_id=43)).refusal == "coupon_not_holder"
    assert evaluate(c, code, ctx(member_id=None)).refusal == "coupon_not_holder"
    assert evaluate(c, ISSUED, ctx(member_id=42)).refusal == "coupon_not_holder"


def test_member_limits_leave_room_below_them() -> None:
    c = campaign(per_member_max=3, per_member_per_day_max=1)
    assert evaluate(c, ISSUED, ctx(member_id=7, member_redeemed=2, member_redeemed_today=0)).ok


def test_member_limits_refuse_when_reached_or_uncountable_negative() -> None:
    c = campaign(per_member_max=3, per_member_per_day_max=1)
    total = ctx(member_id=7, member_redeemed=3)
    today = ctx(member_id=7, member_redeemed=1, member_redeemed_today=1)
    assert evaluate(c, ISSUED, total).refusal == "coupon_member_limit"
    assert evaluate(c, ISSUED, today).refusal == "coupon_daily_limit"
    assert evaluate(c, ISSUED, ctx(member_id=None)).refusal == "coupon_member_limit"


def test_stackable_coupons_combine() -> None:
    c = campaign(stackable=True)
    assert evaluate(c, ISSUED, ctx(others_in_transaction=2, others_stackable=True)).ok
    assert evaluate(campaign(), ISSUED, ctx(others_in_transaction=0)).ok


def test_stacked_coupons_never_take_more_than_the_bill_together() -> None:
    """The no-change rule holds for a sale's coupons together: each takes at most what the
    others left of the bill (forfeiting the rest, or refused), while the minimum spend stays
    of the basket."""
    after = ctx(bill_fen=1500, others_in_transaction=1, others_discount_fen=1000)
    forfeit = evaluate(campaign(stackable=True), ISSUED, after)
    assert (forfeit.ok, forfeit.discount_fen, forfeit.forfeited_fen) == (True, 500, 500)
    strict = campaign(stackable=True, change_rule=ChangeRule.REFUSE)
    assert evaluate(strict, ISSUED, after) == Verdict(False, "coupon_exceeds_bill")
    assert evaluate(strict, ISSUED, dataclasses.replace(after, bill_fen=2000)).discount_fen == 1000
    pct = campaign(stackable=True, kind=CouponKind.PERCENT_OFF, value_fen=0, percent_bp=1000)
    assert evaluate(pct, ISSUED, after).discount_fen == 50  # 10 % of the 5.00 left
    spend = campaign(stackable=True, min_spend_fen=1500)
    assert evaluate(spend, ISSUED, after).discount_fen == 500  # the basket reaches 15.00
    gone = dataclasses.replace(after, others_discount_fen=1500)
    forfeiting = dataclasses.replace(strict, change_rule=ChangeRule.FORFEIT)
    for coupon in (strict, forfeiting, pct):  # never used up for no discount at all
        assert evaluate(coupon, ISSUED, gone) == Verdict(False, "coupon_nothing_left")
    # 10 % of the 0.09 left rounds down to nothing: refused, not used up for 0.00 (it was
    # approved with discount 0 and the code redeemed, a reviewer found)
    tiny = dataclasses.replace(after, others_discount_fen=1491)
    assert evaluate(pct, ISSUED, tiny) == Verdict(False, "coupon_nothing_left")
    assert evaluate(pct, ISSUED, dataclasses.replace(after, others_discount_fen=1490)).ok


def test_stacked_department_coupons_never_take_more_than_their_lines_together() -> None:
    """Two 30.00-off FOOD coupons on 30.00 of FOOD in a 100.00 bill: the second finds the
    FOOD lines taken (whatever the rest of the bill left); two 60 %-off FOOD coupons take
    60 % and then 60 % of what is left; a DRINK coupon is not held back by FOOD's."""
    lines = (Line("FOOD", 3000), Line("DRINK", 7000))
    food = campaign(stackable=True, value_fen=3000, departments=("FOOD",))
    first = evaluate(food, ISSUED, ctx(bill_fen=10_000, lines=lines))
    assert first.discount_fen == 3000
    after = ctx(bill_fen=10_000, lines=lines, others_in_transaction=1, others_discount_fen=3000,
                others_scoped=((("FOOD",), 3000),))  # fmt: skip
    nothing = Verdict(False, "coupon_nothing_left")  # never used up for no discount
    assert evaluate(food, ISSUED, after) == nothing
    strict = dataclasses.replace(food, change_rule=ChangeRule.REFUSE)
    assert evaluate(strict, ISSUED, after) == nothing
    drink = dataclasses.replace(food, departments=("DRINK",))
    assert evaluate(drink, ISSUED, after).discount_fen == 3000
    wide = ((("FOOD", "DRINK"), 3000),)  # an overlap counts in full, whatever it took from
    assert evaluate(food, ISSUED, dataclasses.replace(after, others_scoped=wide)) == nothing
    pct = campaign(stackable=True, kind=CouponKind.PERCENT_OFF, value_fen=0, percent_bp=6000,
                   departments=("FOOD",))  # fmt: skip
    big = (Line("FOOD", 10_000), Line("DRINK", 90_000))
    a = evaluate(pct, ISSUED, ctx(bill_fen=100_000, lines=big))
    b = evaluate(pct, ISSUED, ctx(bill_fen=100_000, lines=big, others_in_transaction=1,
                                  others_discount_fen=a.discount_fen,
                                  others_scoped=((("FOOD",), a.discount_fen),)))  # fmt: skip
    assert (a.discount_fen, b.discount_fen) == (6000, 2400)


def test_a_non_stackable_coupon_or_company_is_refused_negative() -> None:
    lone = ctx(others_in_transaction=1, others_stackable=True)
    assert evaluate(campaign(), ISSUED, lone).refusal == "coupon_not_stackable"
    company = ctx(others_in_transaction=1, others_stackable=False)
    assert evaluate(campaign(stackable=True), ISSUED, company).refusal == "coupon_not_stackable"
    crowd = ctx(others_in_transaction=limits.COUPON_PER_TRANSACTION_MAX)
    assert evaluate(campaign(stackable=True), ISSUED, crowd).refusal == "coupon_not_stackable"


def test_a_used_coupon_says_used_before_anything_else() -> None:
    c = campaign(state=CampaignState.ENDED, stores=("S999",))
    verdict = evaluate(c, CodeState(CodeStatus.REDEEMED), ctx(now_ms=END_MS + 1))
    assert verdict.refusal == "coupon_used"


def test_every_refusal_has_a_message() -> None:
    assert all(code.startswith("coupon_") and message for code, message in REFUSALS.items())


def test_refused_verdicts_take_nothing_off_negative() -> None:
    verdict = evaluate(campaign(), CodeState(CodeStatus.REDEEMED), ctx())
    assert verdict.refusal in REFUSALS
    assert (verdict.discount_fen, verdict.store_cost_fen, verdict.supplier_cost_fen) == (0, 0, 0)


# --- figures -----------------------------------------------------------------------------------


def test_figures_give_the_redemption_rate_in_basis_points() -> None:
    result = figures(issued=3, redeemed=1, expired=1, store_cost_fen=700, supplier_cost_fen=300)
    assert result["redemption_rate_bp"] == 3333
    assert result["cost_fen"] == 1000
    assert all(type(value) is int for value in result.values())


def test_figures_of_no_codes_give_a_zero_rate_negative() -> None:
    assert figures(0, 0, 0, 0, 0)["redemption_rate_bp"] == 0
