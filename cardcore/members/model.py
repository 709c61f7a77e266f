"""The rules of a member's personal data: mobile numbers, ID documents and their masks,
gender, birthday, SMS consent purposes. Pure: strings in, normalized strings or a `Refused`
(400) out.

- Mobile numbers are stored normalized, so one number has one spelling and the unique index
  on `members.mobile` holds across spellings: a China mobile (11 digits, 1[3-9]...) as
  "+86" and its 11 digits, whatever the prefix it came with (+86, 0086, 86, none) and
  whatever spaces or dashes; any other country in E.164 ("+", 8 to 15 digits).
- ID documents: a resident identity card number (GB 11643, 18 characters, the last an
  ISO 7064 MOD 11-2 check character), a passport number (5-20 letters or digits) or another
  document (1-32 printable characters). The number is only ever stored as a keyed hash and
  ciphertext; answers, logs and audit rows show `mask_id` of it, which never shows the middle
  and always hides at least half of it.
"""

from __future__ import annotations

import datetime
import enum
import re
from typing import Any

from cardcore import limits
from cardcore.org.model import Refused

ID_MAX = 2**31 - 1  # members.id is a 32-bit integer: a larger id names no member


class MemberState(enum.StrEnum):
    ACTIVE = "active"
    MERGED = "merged"  # a duplicate folded into another member (`merged_into`)
    DELETED = "deleted"  # personal data erased


class IdType(enum.StrEnum):
    RESIDENT_ID = "resident_id"  # 居民身份证, GB 11643
    PASSPORT = "passport"
    OTHER = "other"


class Purpose(enum.StrEnum):
    """What a member may consent to receive by SMS; each is given and withdrawn apart."""

    ALERTS = "alerts"  # transaction alerts
    MARKETING = "marketing"


GENDERS = ("", "F", "M", "X")  # "" = not given

# --- mobile numbers ----------------------------------------------------------------------------

_SEPARATORS = re.compile(r"[ \-]")
_CHINA_MOBILE = re.compile(r"1[3-9][0-9]{9}")
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")  # "+" and 8 to 15 digits in all
CHINA = "+86"


def normalize_mobile(raw: str, field: str = "mobile") -> str:
    """The one spelling of a mobile number, or 400 `invalid_mobile`."""
    text = _SEPARATORS.sub("", raw.strip()) if len(raw) <= limits.MOBILE_CHARS_MAX else ""
    for prefix in ("+86", "0086", "86"):
        rest = text.removeprefix(prefix)
        if rest != text and _CHINA_MOBILE.fullmatch(rest):
            return CHINA + rest
    if _CHINA_MOBILE.fullmatch(text):
        return CHINA + text
    if _E164.fullmatch(text) and not text.startswith(CHINA):
        return text
    raise Refused(
        "invalid",
        "invalid_mobile",
        "a mobile number is a China mobile (11 digits from 13-19, optionally after +86, "
        "0086 or 86) or an international number in E.164 (+ and 8-15 digits)",
        field,
    )


# --- ID documents ------------------------------------------------------------------------------

_RESIDENT_ID = re.compile(r"[0-9]{17}[0-9X]")
_PASSPORT = re.compile(r"[A-Z0-9]{5,20}")
_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))  # 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2
_CHECK = "10X98765432"  # the check character for a weighted sum mod 11


def resident_id_check(first17: str) -> str:
    """The GB 11643 check character (ISO 7064 MOD 11-2) of the first 17 digits."""
    assert len(first17) == 17, first17
    assert first17.isascii(), first17
    assert first17.isdigit(), first17
    return _CHECK[sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True)) % 11]


def normalize_id(id_type: IdType, raw: str, field: str = "id_number") -> str:
    """The number as stored and looked up: letters upper-cased, the ends trimmed; or 400
    `invalid_id_number`. The message never repeats the number."""
    number = raw.strip()
    if id_type is not IdType.OTHER:
        number = number.upper()
    ok = False
    if id_type is IdType.RESIDENT_ID:
        ok = bool(_RESIDENT_ID.fullmatch(number)) and resident_id_check(number[:17]) == number[17]
    elif id_type is IdType.PASSPORT:
        ok = bool(_PASSPORT.fullmatch(number))
    else:
        ok = (
            1 <= len(number) <= limits.ID_NUMBER_CHARS_MAX
            and number.isprintable()  # no control character, separator or lone surrogate
            and len(number.encode()) <= limits.ID_NUMBER_BYTES_MAX
        )
    if not ok:
        raise Refused("invalid", "invalid_id_number", _ID_RULES[id_type], field)
    return number


_ID_RULES = {
    IdType.RESIDENT_ID: "a resident ID number is 17 digits and a check character (0-9 or X) "
    "that matches them",
    IdType.PASSPORT: "a passport number is 5 to 20 letters or digits",
    IdType.OTHER: f"a document number is 1 to {limits.ID_NUMBER_CHARS_MAX} printable characters",
}


_SHOWN = {IdType.RESIDENT_ID: (3, 4), IdType.PASSPORT: (2, 2), IdType.OTHER: (2, 2)}


def mask_id(id_type: IdType, number: str) -> str:
    """The number with its middle starred: at most its first and last few characters show
    (3 and 4 of a resident ID), and always less than half of it."""
    head, tail = _SHOWN[id_type]
    shown_max = (len(number) - 1) // 2  # so more than half is hidden, the middle too
    while head + tail > shown_max:
        if head >= tail and head > 0:
            head -= 1
        else:
            tail -= 1
    hidden = len(number) - head - tail
    return number[:head] + "*" * hidden + (number[len(number) - tail :] if tail else "")


def masked_personal(view: dict[str, Any]) -> dict[str, Any]:
    """A member's view as the append-only audit log keeps it: the name, mobile, email and
    birthday masked (a delete erases the member; the log, which cannot be changed, must not
    keep what it erased). Which fields a change changed, the update's audit row lists."""
    out = dict(view)
    name = out.get("name") or ""
    out["name"] = name[:1] + "*" * max(1, len(name) - 1) if name else name
    mobile = out.get("mobile") or ""  # E.164 (8 to 16 characters): its last four shown
    out["mobile"] = "*" * (len(mobile) - 4) + mobile[-4:] if mobile else mobile
    email = out.get("email") or ""
    local, at, domain = email.partition("@")
    out["email"] = local[:1] + "***" + at + domain if email else email
    birthday = out.get("birthday") or ""
    out["birthday"] = birthday[:4] + "-**-**" if birthday else birthday
    return out


# --- the rest of the natural identity ----------------------------------------------------------

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def check_gender(gender: str, field: str = "gender") -> str:
    if gender not in GENDERS:
        raise Refused("invalid", "invalid_value", "gender is '', F, M or X", field)
    return gender


def check_name(text: str, field: str = "name") -> str:
    """A name with something in it: spaces alone are refused (400 `invalid_value`)."""
    if not text.strip():
        raise Refused("invalid", "invalid_value", "a name is not spaces alone", field)
    return text


def check_birthday(text: str, today: datetime.date, field: str = "birthday") -> str:
    """Empty (not given) or a real date, YYYY-MM-DD, not after `today`; else 400
    `invalid_birthday`."""
    if text == "":
        return text
    day = None
    if _DATE.fullmatch(text):
        try:
            day = datetime.date.fromisoformat(text)
        except ValueError:
            day = None
    if day is None:
        raise Refused("invalid", "invalid_birthday", "a birthday is a real date, YYYY-MM-DD", field)
    if day > today:
        raise Refused("invalid", "invalid_birthday", "a birthday cannot be in the future", field)
    return text


def check_purpose(purpose: str, field: str = "purpose") -> Purpose:
    try:
        return Purpose(purpose)
    except ValueError:
        raise Refused("invalid", "invalid_value", "purpose is alerts or marketing", field) from None
