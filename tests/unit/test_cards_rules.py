"""The card rules that need no database: expiry months, class checks and defaults, numbers and
secrets, the class maximum, counter metadata, views and the CSV of a print run."""

from __future__ import annotations

import calendar

import pytest

from cardcore import limits
from cardcore.cards import admin
from cardcore.cards.model import luhn_ok
from cardcore.cards.service import (
    _ledger_ok,
    card_view,
    check_class,
    class_defaults,
    csv_text,
    expired,
    expiry_at_sale,
    expiry_of,
    metadata,
    month_yymm,
    over_maximum,
)
from cardcore.ledger.model import Balance, Result
from cardcore.org.model import CODE, Refused
from cardcore.vault import Vault, VaultError


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, 0)) * 1000


# --- expiry -------------------------------------------------------------------------------------


def test_a_card_is_valid_through_the_month_its_term_ends_in() -> None:
    assert expiry_of(utc_ms(2025, 3, 15), 36) == "2803"
    assert expiry_of(utc_ms(2025, 12, 1), 1) == "2601"
    assert expiry_of(utc_ms(2025, 1, 1), 600) == "7501"


def test_the_issue_month_is_the_shanghai_month() -> None:
    # 16:30 UTC on 31 March is 00:30 on 1 April in Shanghai
    assert expiry_of(utc_ms(2025, 3, 31, 16, 30), 36) == "2804"
    assert expiry_of(utc_ms(2025, 3, 31, 15, 59), 36) == "2803"


def test_no_validity_means_no_expiry() -> None:
    assert expiry_of(utc_ms(2025, 3, 15), 0) == ""
    assert not expired("", utc_ms(2099, 1, 1))


def test_a_card_expires_after_its_last_month_not_during_it() -> None:
    assert not expired("2803", utc_ms(2028, 3, 31, 15, 59))
    assert expired("2803", utc_ms(2028, 3, 31, 16, 0))  # April in Shanghai
    assert month_yymm("2028-04") == "2804"


def test_a_card_sold_late_gets_its_whole_term_from_the_sale_and_never_less_than_it_had() -> None:
    printed = expiry_of(utc_ms(2025, 1, 15), 36)  # stock printed in January 2025: "2801"
    assert expiry_at_sale(printed, utc_ms(2027, 11, 20), 36) == "3011"
    assert expiry_at_sale("3912", utc_ms(2027, 11, 20), 36) == "3912"  # never shortened
    assert expiry_at_sale("", utc_ms(2027, 11, 20), 36) == ""  # no expiry stays
    assert expiry_at_sale(printed, utc_ms(2027, 11, 20), 0) == ""


# --- classes ------------------------------------------------------------------------------------


def test_defaults_depend_on_named_or_bearer() -> None:
    named = class_defaults({"code": "N", "name": "n", "named": True})
    bearer = class_defaults({"code": "B", "name": "b", "named": False})
    assert (named["balance_max"], named["validity_months"]) == (
        limits.NAMED_BALANCE_DEFAULT, 0)  # fmt: skip
    assert (bearer["balance_max"], bearer["validity_months"]) == (
        limits.BEARER_BALANCE_DEFAULT, limits.BEARER_VALIDITY_MONTHS_MIN)  # fmt: skip
    assert named["points_multiplier_pct"] == 100
    check_class(named)
    check_class(bearer)


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"named": False, "validity_months": 35}, "bearer_validity_too_short", "validity_months"),
        ({"named": False, "validity_months": 0}, "bearer_validity_too_short", "validity_months"),
        ({"named": False, "gift": True}, "denominations_required", "denominations"),
        ({"named": True, "gift": True, "denominations": [100]}, "gift_class_named", "named"),
        ({"named": True, "denominations": [100]}, "invalid_value", "denominations"),
        ({"named": False, "gift": True, "denominations": [100, 100]}, "invalid_value",
         "denominations"),
        ({"named": False, "gift": True, "denominations": [0]}, "invalid_value", "denominations"),
        ({"named": False, "gift": True,
          "denominations": list(range(1, limits.DENOMINATIONS_MAX + 2))}, "invalid_value",
         "denominations"),
        ({"named": False, "gift": True, "denominations": [100_001]},
         "denomination_over_balance_max", "denominations"),
        ({"named": True, "discount_bp": limits.DISCOUNT_BP_MAX + 1}, "invalid_value",
         "discount_bp"),
        ({"named": True, "issue_fee": -1}, "invalid_value", "issue_fee"),
        ({"named": True, "validity_months": limits.CARD_VALIDITY_MONTHS_MAX + 1},
         "invalid_value", "validity_months"),
    ],
)  # fmt: skip
def test_a_class_whose_fields_do_not_fit_is_refused(
    fields: dict[str, object], code: str, field: str
) -> None:
    values = class_defaults({"code": "X", "name": "x", **fields})
    with pytest.raises(Refused) as refused:
        check_class(values)
    assert (refused.value.kind, refused.value.code, refused.value.field) == (
        "invalid", code, field)  # fmt: skip


def test_a_gift_class_with_denominations_under_its_maximum_is_accepted() -> None:
    check_class(class_defaults({"code": "G", "name": "g", "named": False, "gift": True,
                                "denominations": [10_000, 50_000, 100_000]}))  # fmt: skip


# --- numbers and secrets ------------------------------------------------------------------------


def test_card_numbers_have_the_group_prefix_nineteen_digits_and_a_check_digit() -> None:
    drawn = {admin.new_pan() for _ in range(2_000)}
    assert len(drawn) == 2_000
    for pan in drawn:
        assert (len(pan), pan[:6], pan.isdigit(), luhn_ok(pan)) == (19, "628888", True, True)


def test_a_card_secret_is_random_and_opens_only_for_its_own_card() -> None:
    vault = Vault(bytes(range(32)))
    pan = admin.new_pan()
    token = vault.card_token(pan)
    first = admin.sealed_columns(vault, token, pan)
    second = admin.sealed_columns(vault, token, pan)
    assert vault.open_text(f"pan:{token}", first["pan_sealed"]) == pan
    secret = vault.open_text(f"secret:{token}", first["secret_sealed"])
    assert len(bytes.fromhex(secret)) == admin.SECRET_BYTES
    assert secret != vault.open_text(f"secret:{token}", second["secret_sealed"])
    assert pan not in first["pan_sealed"] and pan not in secret
    with pytest.raises(VaultError):
        vault.open_text(f"pan:{vault.card_token(admin.new_pan())}", first["pan_sealed"])


# --- money --------------------------------------------------------------------------------------


def test_the_class_maximum_counts_top_ups_waiting_for_confirmation() -> None:
    held = Balance(credits_posted=60_000, debits_posted=10_000, credits_pending=40_000)
    assert not over_maximum(held, 10_000, 100_000)
    assert over_maximum(held, 10_001, 100_000)
    assert not over_maximum(held, 10**9, 0)  # 0 means no maximum


def test_counter_metadata_is_sorted_and_keeps_the_whole_operator_name() -> None:
    longest = "s1-counter-clerk-zhang-" + "x" * 9  # a staff user name is at most 32 characters
    assert CODE.fullmatch(longest) and not CODE.fullmatch(longest + "x")
    pairs = metadata("S1", longest, "R-1")
    assert [name for name, _ in pairs] == sorted(name for name, _ in pairs)
    assert dict(pairs) == {"external_ref": "R-1", "operator": longest, "store": "S1"}
    assert dict(metadata("S1", "amy", "")) == {"operator": "amy", "store": "S1"}
    assert len(dict(metadata("S1", longest + "-more", ""))["operator"]) == (
        limits.OPERATOR_CHARS_MAX
    )
    assert limits.OPERATOR_CHARS_MAX <= limits.METADATA_VALUE_CHARS_MAX


@pytest.mark.parametrize(
    ("code", "original", "refusal"),
    [
        ("exists_with_different_postings", None, "idempotency_key_reused"),
        ("debit_account_frozen", None, "card_frozen"),
        ("id_already_failed", "credit_account_frozen", "card_frozen"),
        ("exceeds_credits", None, "insufficient_funds"),
        ("account_not_found", None, "ledger_refused"),
    ],
)
def test_a_ledger_refusal_becomes_a_stable_conflict(
    code: str, original: str | None, refusal: str
) -> None:
    with pytest.raises(Refused) as refused:
        _ledger_ok(Result(ok=False, code=code, original_code=original))
    assert (refused.value.status, refused.value.code) == (409, refusal)
    _ledger_ok(Result(ok=True, code="ok"))  # an applied transfer passes


# --- views and the print file -------------------------------------------------------------------

ROW = {
    "id": 7, "token": "t" * 64, "pan_masked": "628888*********1234", "legal_entity": "LE1",
    "account_id": 9, "expires": "2803", "state": "active", "balance_max": 100_000,
    "created_at_ms": 1, "pan_sealed": "aa", "secret_sealed": "bb", "class_code": "BEAR",
    "member_id": None, "store": "S1", "named": False, "pvv": "cc", "pin_failures": 0,
    "replaced_by": None, "updated_at_ms": 2,
}  # fmt: skip


def test_a_card_view_never_carries_its_token_number_secret_or_pin_value() -> None:
    view = card_view(ROW)
    assert not {"token", "pan_sealed", "secret_sealed", "pvv"} & set(view)
    assert (view["has_pin"], view["pan_masked"]) == (True, "628888*********1234")


def test_the_print_file_has_a_header_and_one_line_per_card() -> None:
    text = csv_text([(1, "628888*********1234", "GIFT", "2803", ""), (2, "x", "GIFT", "", 500)])
    assert text.splitlines() == [
        "card_id,card_number,class_code,expires,face_value",
        "1,628888*********1234,GIFT,2803,",
        "2,x,GIFT,,500",
    ]
