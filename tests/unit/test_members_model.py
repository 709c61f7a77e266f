"""The member rules: mobile numbers, ID documents and their masks, gender, birthday, consent
purposes (pure; no I/O)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcore.members.model import (
    IdType,
    Purpose,
    check_birthday,
    check_gender,
    check_purpose,
    mask_id,
    normalize_id,
    normalize_mobile,
    resident_id_check,
)
from cardcore.org.model import Refused

TODAY = datetime.date(2026, 11, 23)
FULL_WIDTH = {ord(d): ord(d) + 0xFEE0 for d in "0123456789"}  # "1" -> U+FF11 and so on
RESIDENT = "11010519491231002X"  # the example number of GB 11643


def refused_code(call: object, *args: object) -> str:
    assert callable(call)
    with pytest.raises(Refused) as caught:
        call(*args)
    assert caught.value.status == 400
    return caught.value.code


# --- mobile numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed",
    [
        "13800138000",
        "138 0013 8000",
        "138-0013-8000",
        "+86 138 0013 8000",
        "+8613800138000",
        "0086 13800138000",
        "86-138-0013-8000",
        "  13800138000  ",
    ],
)
def test_every_spelling_of_a_china_mobile_is_stored_the_same(typed: str) -> None:
    assert normalize_mobile(typed) == "+8613800138000"


@pytest.mark.parametrize("typed", ["+44 20 7946 0958", "+1-212-555-0100", "+12345678"])
def test_other_countries_are_kept_in_e164(typed: str) -> None:
    assert normalize_mobile(typed) == "+" + "".join(c for c in typed if c.isdigit())


@pytest.mark.parametrize(
    "typed",
    [
        "",
        "12800138000",  # China mobiles start 13-19
        "1380013800",  # ten digits
        "138001380001",  # twelve digits
        "+8612800138000",  # +86, but not a mobile
        "+861380013800",
        "0044 20 7946 0958",  # 00 is accepted only before 86
        "+1234567",  # seven digits
        "+1234567890123456",  # sixteen digits
        "+0123456789",  # no country code starts with 0
        "13800138000x",
        "(138)00138000",
        "13800138000".translate(FULL_WIDTH),
        "1" * 40,
    ],
)
def test_anything_else_is_not_a_mobile_number_negative(typed: str) -> None:
    assert refused_code(normalize_mobile, typed) == "invalid_mobile"


@given(st.text(max_size=40))
def test_a_normalized_mobile_is_refused_or_canonical_and_stable(typed: str) -> None:
    try:
        stored = normalize_mobile(typed)
    except Refused as exc:
        refusal = exc.code
    else:
        refusal = ""
    if refusal:
        assert refusal == "invalid_mobile"
        return
    assert stored.startswith("+")
    assert stored[1:].isascii()
    assert stored[1:].isdigit()
    assert 9 <= len(stored) <= 16
    assert normalize_mobile(stored) == stored


# --- ID documents ------------------------------------------------------------------------------


def test_resident_id_check_character_follows_iso_7064_mod_11_2() -> None:
    assert resident_id_check(RESIDENT[:17]) == "X"
    assert resident_id_check("44030119900307123") == "0"
    assert normalize_id(IdType.RESIDENT_ID, RESIDENT.lower()) == RESIDENT
    assert normalize_id(IdType.RESIDENT_ID, " 440301199003071230 ") == "440301199003071230"


@pytest.mark.parametrize(
    "number",
    [
        "110105194912310021",  # wrong check character
        "11010519491231002",  # 17 characters
        "11010519491231002XX",
        "1101051949123100X2",  # X only as the check character
        "",
    ],
)
def test_a_resident_id_with_a_wrong_check_or_form_is_refused_negative(number: str) -> None:
    assert refused_code(normalize_id, IdType.RESIDENT_ID, number) == "invalid_id_number"


def test_every_single_digit_typo_of_a_resident_id_is_caught() -> None:
    for i in range(17):
        for digit in "0123456789":
            if digit == RESIDENT[i]:
                continue
            typo = RESIDENT[:i] + digit + RESIDENT[i + 1 :]
            with pytest.raises(Refused):
                normalize_id(IdType.RESIDENT_ID, typo)


def test_passport_and_other_documents() -> None:
    assert normalize_id(IdType.PASSPORT, "e1234567") == "E1234567"
    for bad in ("E123", "E" * 21, "E12-34567", "护照12345"):
        assert refused_code(normalize_id, IdType.PASSPORT, bad) == "invalid_id_number"
    assert normalize_id(IdType.OTHER, " 港澳通行证 C1234 ") == "港澳通行证 C1234"
    for bad in ("", "   ", "x" * 33, "a\nb", "\ud800", "𠀀" * 25):
        assert refused_code(normalize_id, IdType.OTHER, bad) == "invalid_id_number"


def test_a_refusal_never_repeats_the_id_number() -> None:
    with pytest.raises(Refused) as caught:
        normalize_id(IdType.RESIDENT_ID, "110105194912310021")
    assert "110105194912310021" not in str(caught.value)
    assert "110105194912310021" not in caught.value.message


def test_resident_id_mask_shows_first_three_and_last_four() -> None:
    assert mask_id(IdType.RESIDENT_ID, RESIDENT) == "110***********002X"
    assert mask_id(IdType.PASSPORT, "E12345678") == "E1*****78"


NO_STAR = st.characters(blacklist_characters="*")


@given(st.sampled_from(list(IdType)), st.text(NO_STAR, min_size=1, max_size=40))
def test_a_mask_hides_the_middle_and_more_than_half(id_type: IdType, number: str) -> None:
    masked = mask_id(id_type, number)
    assert len(masked) == len(number)
    assert masked.count("*") * 2 > len(number)
    assert masked[len(number) // 2] == "*"  # the middle never shows
    shown = [i for i, ch in enumerate(masked) if ch != "*"]
    assert all(masked[i] == number[i] for i in shown)


def test_short_numbers_show_almost_nothing() -> None:
    assert [mask_id(IdType.OTHER, n) for n in ("A", "AB", "ABC", "ABCD", "ABCDE")] == [
        "*", "**", "**C", "***D", "A***E",
    ]  # fmt: skip


# --- the rest ----------------------------------------------------------------------------------


def test_gender_is_empty_f_m_or_x() -> None:
    for gender in ("", "F", "M", "X"):
        assert check_gender(gender) == gender
    for bad in ("f", "male", "U"):
        assert refused_code(check_gender, bad) == "invalid_value"


def test_birthday_is_a_real_past_date() -> None:
    assert check_birthday("", TODAY) == ""
    assert check_birthday("2000-02-29", TODAY) == "2000-02-29"
    assert check_birthday("2026-11-23", TODAY) == "2026-11-23"  # born today
    wide = "2000-01-01".translate(FULL_WIDTH)
    for bad in ("2001-02-29", "2026-13-01", "2026-11-24", "20000101", "2000-1-01", wide):
        assert refused_code(check_birthday, bad, TODAY) == "invalid_birthday"


def test_consent_purposes_are_alerts_and_marketing() -> None:
    assert [check_purpose(p) for p in ("alerts", "marketing")] == list(Purpose)
    assert refused_code(check_purpose, "calls") == "invalid_value"
