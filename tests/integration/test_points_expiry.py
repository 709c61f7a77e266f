"""The points expiry job on SQLite and PostgreSQL: lots expire at the end of their expiry day
in the program's time zone (31 January plus one month is the end of February; Shanghai's
midnight is 16:00 UTC), each expiry once however often and however concurrently the job
runs, with its notice and its reminder in the members' outbox; and `cardcore points expire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from cardcore import limits
from cardcore.cards.model import Kind, Outcome, PosResult
from cardcore.ledger.writer import Busy
from cardcore.points.http import POINTS_KEY
from cardcore.points.service import PointsService
from tests.helpers import AdminClient, run_cardcore, sql_rows
from tests.integration.test_points_pos import Shop, fixed

ROOT = Path(__file__).resolve().parents[2]


def utc_ms(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text).timestamp() * 1000)


EARNED = utc_ms("2026-01-31T02:00:00+00:00")  # 31 Jan 10:00 in Shanghai
LAST_MOMENT = utc_ms("2026-02-28T15:59:59.999+00:00")  # 28 Feb 23:59:59.999 in Shanghai
MIDNIGHT = utc_ms("2026-02-28T16:00:00+00:00")  # 1 March 00:00 in Shanghai


Points = tuple[Shop, dict[str, Any], PointsService]


async def shop_with_points(admin: AdminClient, **program: Any) -> Points:
    shop = await Shop(admin).make(expiry={"kind": "rolling_months", "months": 1}, **program)
    service: PointsService = admin.app[POINTS_KEY]
    service.clock_ms = lambda: EARNED
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert (sale.outcome, sale.points) == (Outcome.APPROVED, 100)
    return shop, card, service


async def notices(db_url: str) -> list[dict[str, Any]]:
    return await sql_rows(db_url, "SELECT * FROM member_notices ORDER BY id")


async def test_31_january_plus_one_month_expires_at_shanghai_midnight_ending_february(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, service = await shop_with_points(admin)
    [lot] = (await shop.points(card))["lots"]
    assert lot["expires_on"] == "2026-02-28"
    assert lot["expires_at_ms"] == MIDNIGHT
    before = await service.expire(LAST_MOMENT, 0)
    assert before == {
        "lots_expired": 0,
        "points_expired": 0,
        "reminders": 0,
        "failed": 0,
        "tiers_changed": 0,
    }
    assert await notices(db_url) == []
    service.clock_ms = lambda: LAST_MOMENT
    assert (await shop.points(card))["balance"] == 100
    done = await service.expire(MIDNIGHT, 0)
    assert (done["lots_expired"], done["points_expired"]) == (1, 100)
    service.clock_ms = lambda: MIDNIGHT
    view = await shop.points(card)
    assert (view["balance"], view["usable"], view["lots"]) == (0, 0, [])
    [notice] = await notices(db_url)
    assert notice["kind"] == "points_expired"
    assert notice["member_id"] == card["member_id"]
    assert notice["holder"] == card["account_id"]
    assert json.loads(notice["payload"])["points"] == 100
    [expired] = await sql_rows(db_url, "SELECT credits_posted FROM ledger_accounts WHERE "
                               "purpose = 'points_expired'")  # fmt: skip
    assert expired["credits_posted"] == 100
    # UTC midnight is not the program's: the lot was gone at 16:00 UTC on the 28th already.
    assert datetime.datetime.fromtimestamp(MIDNIGHT / 1000, datetime.UTC).day == 28


async def test_the_job_is_idempotent_and_safe_to_run_concurrently(
    admin: AdminClient, db_url: str
) -> None:
    shop, _card, service = await shop_with_points(admin)
    second = await shop.card()
    service.clock_ms = lambda: EARNED
    await shop.one(shop.request(Kind.PURCHASE, second, amount=5_000))
    runs = await asyncio.gather(*(service.expire(MIDNIGHT, 0) for _ in range(4)))
    assert sum(r["points_expired"] for r in runs) == 150
    assert sum(r["lots_expired"] for r in runs) == 2
    again = await service.expire(MIDNIGHT + 86_400_000, 0)
    assert again["points_expired"] == 0
    assert [n["kind"] for n in await notices(db_url)] == ["points_expired"] * 2
    transfers = await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason = "
                               "'points_expire'")  # fmt: skip
    assert len(transfers) == 2


async def test_reminders_go_out_once_per_lot_within_the_days_asked(
    admin: AdminClient, db_url: str
) -> None:
    _shop, _card, service = await shop_with_points(admin)
    week_before = MIDNIGHT - 7 * 86_400_000
    assert (await service.expire(week_before - 1, 7))["reminders"] == 0
    assert (await service.expire(week_before, 7))["reminders"] == 1
    assert (await service.expire(week_before + 3_600_000, 7))["reminders"] == 0
    [reminder] = await notices(db_url)
    assert reminder["kind"] == "points_expiring"
    assert json.loads(reminder["payload"])["expires_at_ms"] == MIDNIGHT


async def test_what_a_spend_left_expires(admin: AdminClient, db_url: str) -> None:
    shop, card, service = await shop_with_points(admin)
    await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))  # spends all of it
    done = await service.expire(MIDNIGHT, 0)
    assert done["points_expired"] == 0
    service.clock_ms = lambda: EARNED
    await shop.one(shop.request(Kind.PURCHASE, card, amount=4_000))
    done = await service.expire(MIDNIGHT, 0)
    assert (done["lots_expired"], done["points_expired"]) == (1, 40)


async def test_a_stale_run_that_read_a_lot_before_a_spend_takes_nothing_twice(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run reads a page of lots, and a redemption spends from one of them before the
    run expires it: the run's transfer (keyed by the lot's version as read) is refused, so
    the points spent are never expired too; the next run expires exactly what is left."""
    shop, card, service = await shop_with_points(admin, redeem_points=10, redeem_fen=10)
    real = PointsService._expire_lot
    spent: list[PosResult] = []

    async def spend_first(self: PointsService, *args: Any) -> None:
        if not spent:  # between the run's read of the lot and its transfer
            spent.append(await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=30)))
        await real(self, *args)

    monkeypatch.setattr(PointsService, "_expire_lot", spend_first)
    stale = await service.expire(MIDNIGHT, 0)
    assert spent[0].outcome is Outcome.APPROVED
    assert (stale["failed"], stale["lots_expired"], stale["points_expired"]) == (1, 0, 0)
    monkeypatch.setattr(PointsService, "_expire_lot", real)
    done = await service.expire(MIDNIGHT, 0)
    assert (done["failed"], done["lots_expired"], done["points_expired"]) == (0, 1, 70)
    assert (await service.expire(MIDNIGHT, 0))["points_expired"] == 0
    service.clock_ms = lambda: MIDNIGHT
    assert (await shop.points(card))["balance"] == 0
    expired = await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason = "
                             "'points_expire'")  # fmt: skip
    assert len(expired) == 1


async def test_points_put_back_into_an_expired_lot_expire_again(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, service = await shop_with_points(admin, redeem_points=10, redeem_fen=10)
    redeem = shop.request(Kind.POINTS_REDEEM, card, points=30)
    assert (await shop.one(redeem)).outcome is Outcome.APPROVED
    assert (await service.expire(MIDNIGHT, 0))["points_expired"] == 70
    await shop.one(shop.request(Kind.REVERSE, None, stan=redeem.stan))  # 30 back, expired
    service.clock_ms = lambda: MIDNIGHT
    assert (await shop.points(card))["balance"] == 0
    assert (await service.expire(MIDNIGHT + 1, 0))["points_expired"] == 30
    # One notice of the day: the second expiry's 30 are left out of it, never told twice.
    [notice] = await notices(db_url)
    assert (notice["kind"], json.loads(notice["payload"])["points"]) == ("points_expired", 70)


END_OF_MARCH = utc_ms("2026-03-31T16:00:00+00:00")  # 1 April 00:00 in Shanghai
DAY_MS = 86_400_000


async def lots_on_days(
    shop: Shop, service: PointsService, card: dict[str, Any], days: list[str], fen: int
) -> None:
    """A purchase of `fen` on each local day (2026-MM-DD, 10:00 in Shanghai): under a
    return window, a lot each."""
    for day in days:
        service.clock_ms = fixed(utc_ms(f"2026-{day}T02:00:00+00:00"))
        sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=fen))
        assert sale.outcome is Outcome.APPROVED


async def notices_of(db_url: str, kind: str) -> dict[tuple[int, int], tuple[int, int]]:
    """(holder, expiry instant) -> (points, lots) of each notice of `kind`, each once."""
    rows = [n for n in await notices(db_url) if n["kind"] == kind]
    payloads = [(n["holder"], json.loads(n["payload"])) for n in rows]
    out = {(h, p["expires_at_ms"]): (p["points"], p["lots"]) for h, p in payloads}
    assert len(out) == len(rows), rows
    return out


async def return_window_shop(admin: AdminClient) -> tuple[Shop, PointsService]:
    """Points usable the day after: one lot per holder and earning day."""
    expiry = {"kind": "rolling_months", "months": 1}
    shop = await Shop(admin).make(expiry=expiry, pending_days=1)
    service: PointsService = admin.app[POINTS_KEY]
    return shop, service


async def test_a_holders_lots_of_one_day_give_one_reminder_and_one_expired_notice(
    admin: AdminClient, db_url: str
) -> None:
    """Five earning days of January are five lots expiring at the end of February: the
    member hears of them once before and once after, with their total; another member
    hears of their own; a second run tells nobody again."""
    shop, service = await return_window_shop(admin)
    one, two = await shop.card(), await shop.card()
    await lots_on_days(shop, service, one, [f"01-{d}" for d in range(27, 32)], 1_000)
    await lots_on_days(shop, service, two, ["01-30", "01-31"], 2_000)
    week_before = MIDNIGHT - 7 * DAY_MS
    assert (await service.expire(week_before, 7))["reminders"] == 2
    assert (await service.expire(week_before, 7))["reminders"] == 0
    assert await notices_of(db_url, "points_expiring") == {
        (one["account_id"], MIDNIGHT): (50, 5),
        (two["account_id"], MIDNIGHT): (40, 2),
    }
    done = await service.expire(MIDNIGHT, 7)
    assert (done["lots_expired"], done["points_expired"]) == (7, 90)
    again = await service.expire(MIDNIGHT, 7)
    assert (again["lots_expired"], again["reminders"]) == (0, 0)
    assert await notices_of(db_url, "points_expired") == {
        (one["account_id"], MIDNIGHT): (50, 5),
        (two["account_id"], MIDNIGHT): (40, 2),
    }
    assert len(await notices(db_url)) == 4
    [notice] = [n for n in await notices(db_url) if n["holder"] == one["account_id"]
                and n["kind"] == "points_expired"]  # fmt: skip
    assert notice["member_id"] == one["member_id"]
    assert json.loads(notice["payload"])["program"] == "CLUB"


async def test_lots_of_different_expiry_days_give_a_notice_each_day(
    admin: AdminClient, db_url: str
) -> None:
    shop, service = await return_window_shop(admin)
    card = await shop.card()
    await lots_on_days(shop, service, card, ["01-30", "01-31", "02-01", "02-02"], 1_000)
    assert (await service.expire(MIDNIGHT - DAY_MS, 40))["reminders"] == 2
    holder = card["account_id"]
    assert await notices_of(db_url, "points_expiring") == {
        (holder, MIDNIGHT): (20, 2),
        (holder, END_OF_MARCH): (20, 2),
    }
    assert (await service.expire(MIDNIGHT, 0))["points_expired"] == 20
    assert (await service.expire(END_OF_MARCH, 0))["points_expired"] == 20
    assert await notices_of(db_url, "points_expired") == {
        (holder, MIDNIGHT): (20, 2),
        (holder, END_OF_MARCH): (20, 2),
    }


async def test_a_holders_lots_over_page_boundaries_still_give_one_notice(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop, service = await return_window_shop(admin)
    one, two = await shop.card(), await shop.card()
    await lots_on_days(shop, service, one, [f"01-{d}" for d in range(27, 32)], 1_000)
    await lots_on_days(shop, service, two, ["01-29", "01-30", "01-31"], 2_000)
    monkeypatch.setattr(limits, "POINTS_EXPIRY_PAGE_ROWS_MAX", 2)
    assert (await service.expire(MIDNIGHT - DAY_MS, 7))["reminders"] == 2
    done = await service.expire(MIDNIGHT, 0)
    assert (done["lots_expired"], done["points_expired"]) == (8, 110)
    expected = {(one["account_id"], MIDNIGHT): (50, 5), (two["account_id"], MIDNIGHT): (60, 3)}
    assert await notices_of(db_url, "points_expiring") == expected
    assert await notices_of(db_url, "points_expired") == expected


async def test_the_cli_expires_and_refuses_bad_input(db_url: str) -> None:
    bad = run_cardcore("points", "--db", db_url, "expire", "--remind-days", "999", cwd=ROOT)
    assert bad.returncode == 2
    assert "--remind-days must be 0..366" in bad.stderr
    assert "Traceback" not in bad.stderr
    worse = run_cardcore("points", "--db", db_url, "expire", "--remind-days", "x", cwd=ROOT)
    assert worse.returncode == 2
    done = run_cardcore("points", "--db", db_url, "expire", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "failed": 0,
        "lots_expired": 0,
        "points_expired": 0,
        "reminders": 0,
        "tiers_changed": 0,
    }


# --- tiers ---------------------------------------------------------------------------------

TIERS = {"ladder": [{"code": "SILVER", "threshold": 0, "multiplier_pct": 100},
                    {"code": "GOLD", "threshold": 1000, "multiplier_pct": 150}],
         "basis": "points_earned", "period": "calendar_year"}  # fmt: skip
IN_2026 = utc_ms("2026-06-01T04:00:00+00:00")
IN_2027 = utc_ms("2027-01-01T00:00:00+08:00")  # Shanghai's new year
IN_2028 = utc_ms("2028-03-01T00:00:00+00:00")


async def test_a_tier_comes_at_once_and_goes_at_the_periods_end(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make(tiers=TIERS)
    service: PointsService = admin.app[POINTS_KEY]
    service.clock_ms = lambda: IN_2026
    card = await shop.card(balance=300_000)
    assert (await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))).points == 100
    assert (await shop.points(card))["tier"] == "SILVER"
    assert (await shop.one(shop.request(Kind.PURCHASE, card, amount=100_000))).points == 1000
    assert (await shop.points(card))["tier"] == "GOLD"
    assert (await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))).points == 150
    # 2026 earned 1250: GOLD stays for 2027; 2027 earns nothing: SILVER from 2028 on.
    assert await service.review_tiers(IN_2027) == 0
    assert await service.review_tiers(IN_2027 + 1) == 0  # reviewed once a period
    assert (await shop.points(card))["tier"] == "GOLD"
    assert await service.review_tiers(IN_2028) == 1
    assert (await shop.points(card))["tier"] == "SILVER"
    [holder] = await sql_rows(db_url, "SELECT * FROM points_holders")
    assert (holder["tier"], holder["tier_since_ms"]) == ("SILVER", IN_2028)


async def test_an_upgrade_earned_in_a_new_period_survives_the_ended_periods_review(
    admin: AdminClient,
) -> None:
    """SILVER in 2026; in the first minutes of 2027, before the job's first run of the
    year, the member earns GOLD: that run reviews 2026 for everyone else, but not this
    member, whose tier changed in 2027 already."""
    shop = await Shop(admin).make(tiers=TIERS)
    service: PointsService = admin.app[POINTS_KEY]
    service.clock_ms = lambda: IN_2026
    card = await shop.card(balance=300_000)
    await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert (await shop.points(card))["tier"] == "SILVER"
    service.clock_ms = lambda: IN_2027 + 1_000
    await shop.one(shop.request(Kind.PURCHASE, card, amount=100_000))
    assert (await shop.points(card))["tier"] == "GOLD"
    assert await service.review_tiers(IN_2027 + 60_000) == 0
    assert (await shop.points(card))["tier"] == "GOLD"


async def test_a_spend_tier_counts_purchases_that_earned_no_points(
    admin: AdminClient, db_url: str
) -> None:
    """Only FOOD earns; a spend tier counts every purchase of the program's cards all the
    same: 1,000.00 of TV (no points) and 10.00 of FOOD reach GOLD at 500.00, at once, and a
    refund of the TV brings the year's spend back under it (the next review says SILVER)."""
    tiers = {**TIERS, "basis": "spend_fen", "ladder": [
        {"code": "SILVER", "threshold": 0, "multiplier_pct": 100},
        {"code": "GOLD", "threshold": 50_000, "multiplier_pct": 150}]}  # fmt: skip
    shop = await Shop(admin).make(tiers=tiers)
    await admin.ok("PATCH", "/v1/points/programs/CLUB/rules/BASE", json={"state": "retired"})
    await admin.ok("POST", "/v1/points/programs/CLUB/rules", json={
        "code": "FOOD", "kind": "category", "points": 1, "per_fen": 100,
        "departments": ["FOOD"]})  # fmt: skip
    service: PointsService = admin.app[POINTS_KEY]
    service.clock_ms = lambda: IN_2026
    card = await shop.card(balance=300_000)
    tv = await shop.one(shop.request(Kind.PURCHASE, card, amount=100_000,
                                     basket=(("TV", 100_000),)))  # fmt: skip
    assert (tv.outcome, tv.points) == (Outcome.APPROVED, 0)
    assert (await shop.points(card))["tier"] == "GOLD"  # 1,000.00 spent: at once
    food = await shop.one(shop.request(Kind.PURCHASE, card, amount=1_000,
                                       basket=(("FOOD", 1_000),)))  # fmt: skip
    assert food.points == 15  # 10 points at GOLD's 150 %
    back = await shop.one(shop.request(Kind.REFUND, card, amount=100_000, rrn=tv.rrn))
    assert back.outcome is Outcome.APPROVED
    rows = await sql_rows(db_url, "SELECT points, amount, returned FROM points_earnings "
                          "ORDER BY points")  # fmt: skip
    assert [(r["points"], r["amount"], r["returned"]) for r in rows] == [
        (0, 100_000, 100_000), (15, 1_000, 0)]  # fmt: skip
    assert await service.review_tiers(IN_2027 + 60_000) == 1
    assert (await shop.points(card))["tier"] == "SILVER"


async def test_under_downgrade_never_a_tier_stays(admin: AdminClient) -> None:
    shop = await Shop(admin).make(tiers={**TIERS, "downgrade": "never"})
    service: PointsService = admin.app[POINTS_KEY]
    service.clock_ms = lambda: IN_2026
    card = await shop.card(balance=300_000)
    await shop.one(shop.request(Kind.PURCHASE, card, amount=100_000))
    assert (await shop.points(card))["tier"] == "GOLD"
    assert await service.review_tiers(IN_2028) == 0
    assert (await shop.points(card))["tier"] == "GOLD"


async def test_the_server_runs_the_job_on_its_schedule(admin: AdminClient, db_url: str) -> None:
    shop, card, service = await shop_with_points(admin)
    service.clock_ms = lambda: MIDNIGHT
    job = asyncio.create_task(service.expire_on_schedule(0, 0.05, 0))
    try:
        for _ in range(200):
            if await notices(db_url):
                break
            await asyncio.sleep(0.05)
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
    [notice] = await notices(db_url)
    assert notice["kind"] == "points_expired"
    assert (await shop.points(card))["balance"] == 0


async def test_a_period_review_never_puts_a_tier_below_what_the_new_period_earned(
    admin: AdminClient,
) -> None:
    """GOLD through 2026, 2026 earned little; in 2027's first minute, before the review ran,
    the member earned GOLD's threshold in 2027: the review of 2026 put SILVER all the same
    (a reviewer's finding). Up at once holds against the review too."""
    shop = await Shop(admin).make(tiers=TIERS)
    service: PointsService = admin.app[POINTS_KEY]
    service.clock_ms = lambda: utc_ms("2025-06-01T04:00:00+00:00")
    card = await shop.card(balance=300_000)
    await shop.one(shop.request(Kind.PURCHASE, card, amount=100_000))
    service.clock_ms = lambda: IN_2026
    assert await service.review_tiers(IN_2026) == 0  # 2025 qualified GOLD: GOLD for 2026
    await shop.one(shop.request(Kind.PURCHASE, card, amount=6_000))  # 2026: 90 points
    service.clock_ms = lambda: IN_2027 + 1_000
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=70_000))  # 2027: 1,050
    assert sale.points == 1_050
    await service.review_tiers(IN_2027 + 60_000)
    assert (await shop.points(card))["tier"] == "GOLD"


async def test_a_period_review_never_undoes_an_upgrade_made_while_it_ran(
    admin: AdminClient,
) -> None:
    """The review read the ended period's value, a purchase upgraded the member meanwhile,
    and the review wrote the ended period's tier over it (a reviewer's finding)."""
    shop = await Shop(admin).make(tiers=TIERS)
    service: PointsService = admin.app[POINTS_KEY]
    service.clock_ms = lambda: IN_2026
    card = await shop.card(balance=300_000)
    await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert (await shop.points(card))["tier"] == "SILVER"
    service.clock_ms = lambda: IN_2027 + 1_000
    real = service._period_value
    upgraded: list[bool] = []

    async def racing(*args: Any) -> int:  # the review reads the ended period ...
        value = await real(*args)
        if not upgraded:  # ... while a purchase in the new period upgrades the member
            upgraded.append(True)
            await shop.one(shop.request(Kind.PURCHASE, card, amount=100_000))
        return value

    service._period_value = racing  # type: ignore[method-assign,assignment]
    try:
        await service.review_tiers(IN_2027 + 500)
    finally:
        service._period_value = real  # type: ignore[method-assign]
    assert (await shop.points(card))["tier"] == "GOLD"


async def test_a_run_stopped_half_way_through_a_holder_still_tells_what_it_expired(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger busy at a holder's third lot: the run stops, and the notices of the two
    lots it expired (two days here) are written before it does (they were lost: the next
    run finds those lots empty and cannot count them again)."""
    shop, service = await return_window_shop(admin)
    card = await shop.card()
    await lots_on_days(shop, service, card, ["01-30", "01-31", "02-01"], 1_000)
    submit, expiries = service.ledger.submit, []

    async def busy_at_the_third(ops: Any) -> Any:
        if ops and getattr(ops[0], "key", "").startswith("expire/"):
            expiries.append(ops[0].key)
            if len(expiries) == 3:
                raise Busy("ledger busy")
        return await submit(ops)

    monkeypatch.setattr(service.ledger, "submit", busy_at_the_third)
    with pytest.raises(Busy):
        await service.expire(END_OF_MARCH, 0)
    assert await notices_of(db_url, "points_expired") == {(card["account_id"], MIDNIGHT): (20, 2)}
    monkeypatch.setattr(service.ledger, "submit", submit)
    await service.expire(END_OF_MARCH, 0)
    assert await notices_of(db_url, "points_expired") == {
        (card["account_id"], MIDNIGHT): (20, 2),
        (card["account_id"], END_OF_MARCH): (10, 1),
    }
