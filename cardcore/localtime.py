"""Local time for the rules that count in days and months: a program's or the group's IANA
time zone, its calendar dates, the instant a local day starts, and calendar-month steps. Pure
(integer milliseconds since the UTC epoch in and out, never a float).

Every day boundary of the card functions (points expiry and caps, service-card validity, the
manager card's daily total) comes from here: a local day starts at its midnight; when the
clocks skip midnight, at the instant they jump.
"""

from __future__ import annotations

import calendar
import datetime
import re
import zoneinfo
from typing import Final

DEFAULT_TIMEZONE: Final = "Asia/Shanghai"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_ONE_MS = datetime.timedelta(milliseconds=1)
_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*")
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})  # host files, not IANA zones


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone `name` (ZoneInfo caches it); KeyError or ValueError when unknown."""
    if name in _NOT_ZONES or not _ZONE_NAME.fullmatch(name):
        raise ValueError(f"not an IANA time zone name: {name!r}")
    return zoneinfo.ZoneInfo(name)


def timezone_known(name: str) -> bool:
    """Whether `name` is an IANA time zone this host knows."""
    try:
        zone(name)
    except (KeyError, ValueError, OSError):
        return False
    return True


def local_time(tz: str, ms: int) -> datetime.datetime:
    """The local wall time in zone `tz` at the instant `ms`."""
    return (_EPOCH + ms * _ONE_MS).astimezone(zone(tz))


def local_date(tz: str, ms: int) -> datetime.date:
    """The local calendar date in zone `tz` at the instant `ms` (UTC epoch milliseconds)."""
    return local_time(tz, ms).date()


def day_start_ms(tz: str, day: datetime.date) -> int:
    """The first instant of local `day`: its midnight; when the clocks skip midnight, the
    instant they jump (fold 0 reads a missing 00:00 with the offset before the jump)."""
    start = datetime.datetime.combine(day, datetime.time(), tzinfo=zone(tz))
    return (start - _EPOCH) // _ONE_MS


def days_in_month(year: int, month: int) -> int:
    """28 to 31."""
    return calendar.monthrange(year, month)[1]


def add_months(day: datetime.date, months: int) -> datetime.date:
    """`day` moved `months` calendar months on, clamped to that month's end (31 Jan + 1 =
    28 or 29 Feb)."""
    year, month0 = divmod(day.year * 12 + day.month - 1 + months, 12)
    return datetime.date(year, month0 + 1, min(day.day, days_in_month(year, month0 + 1)))


def month_end(day: datetime.date) -> datetime.date:
    """The last day of `day`'s month."""
    return day.replace(day=days_in_month(day.year, day.month))


def day_bounds(tz: str, ms: int) -> tuple[int, int]:
    """[start_ms, end_ms) of the local day in `tz` that holds the instant `ms`."""
    today = local_date(tz, ms)
    return day_start_ms(tz, today), day_start_ms(tz, today + datetime.timedelta(days=1))


def day_number(tz: str, ms: int) -> int:
    """The local date of an instant as YYYYMMDD: the key of every daily cap, total and limit
    (points per day, a manager's daily total, a member's coupons per day)."""
    d = local_date(tz, ms)
    return d.year * 10_000 + d.month * 100 + d.day
