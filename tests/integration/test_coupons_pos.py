"""E-coupons at the POS, on SQLite and PostgreSQL, through `PosService.handle` (the host API
the gateway calls): query, reserve, confirm, reserve-and-redeem, reversal (COUPON_REVERSE and
the 0400 hook), lapsed reservations, signed QR texts, the rules' refusals and their outcomes,
cost by funder, redemption budgets, per-member limits, instant rewards by rule, and THE RACE:
many terminals (and direct service calls) redeem one code at once and exactly one wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from cardcore import limits
from cardcore.cards.http import POS_KEY
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult, transaction_key
from cardcore.cards.pos import PosService
from cardcore.coupons import model
from cardcore.coupons.schema import presented_many_sql
from cardcore.coupons.service import CouponService
from cardcore.db import Statement
from cardcore.records import Deadlock, Records, Unit
from cardcore.vault import Vault
from tests import logscan
from tests.conftest import ADMIN_KEK
from tests.helpers import AdminClient, sql_execute, sql_rows
from tests.integration.test_coupons_admin import (
    DAY_MS,
    NOW_MS,
    campaign,
    campaign_row,
    codes,
    count,
    member,
    service,
)

_stans = itertools.count(1)
_tids = itertools.count(1)


async def terminal(admin: AdminClient, store: str = "S1") -> str:
    n = next(_tids)
    tid, mid = f"C{n:07d}", f"M{n:014d}"
    answer = await admin.ok("POST", "/v1/terminals", json={"tid": tid, "mid": mid, "store": store})
    logscan.SCAN.remember("a terminal master key", answer["tmk"])
    return tid


def pos(admin: AdminClient) -> PosService:
    return admin.app[POS_KEY]


def ask(kind: Kind, tid: str, coupon: str = "", **fields: Any) -> PosRequest:
    stan = fields.pop("stan", f"{next(_stans):06d}")
    return PosRequest(kind=kind, terminal=tid, batch="000001", stan=stan, coupon=coupon, **fields)


async def one(admin: AdminClient, request: PosRequest) -> PosResult:
    [answer] = await pos(admin).handle([request])
    return answer


async def redeem_each(admin: AdminClient, tids: list[str], made: list[str]) -> list[PosResult]:
    """One call: each terminal redeems its code (a bill of 50.00)."""
    return await pos(admin).handle([
        ask(Kind.COUPON_REDEEM, tid, code, amount=5_000)
        for tid, code in zip(tids, made, strict=True)
    ])  # fmt: skip


async def signed_on_with_codes(
    admin: AdminClient, campaign_code: str, n: int
) -> tuple[list[str], list[str]]:
    """n terminals of S1, signed on (in the card directory's memory, as at a till), and n
    codes of a fresh campaign of LE1."""
    await admin.org("LE1", "S1")
    tids = [await terminal(admin) for _ in range(n)]
    await campaign(admin, campaign_code)
    made = await codes(admin, campaign_code, n)
    await pos(admin).handle([ask(Kind.SIGN_ON, tid) for tid in tids])
    return tids, made


def watch_holds(
    monkeypatch: pytest.MonkeyPatch, failure: Callable[[Sequence[str]], Exception | None]
) -> list[int]:
    """The number of holds of each hold statement run from now on; `failure` (given the
    statement's codes) names an exception it raises instead of running, or None."""
    holds: list[int] = []
    real_rows = Records.statement_rows

    async def statement_rows(self: Records, sql: str, args: Sequence[Any]) -> Any:
        if "INSERT INTO coupon_redemptions" in sql:
            holds.append(len(args[0]))
            exc = failure(args[0])
            if exc is not None:
                raise exc
        return await real_rows(self, sql, args)

    monkeypatch.setattr(Records, "statement_rows", statement_rows)
    return holds


async def code_row(db_url: str, code: str) -> dict[str, Any]:
    [row] = await sql_rows(db_url, "SELECT * FROM coupon_codes WHERE code = :c", c=code)
    return row


async def state_of(db_url: str) -> list[Any]:
    """Every coupon row that a POS request may change."""
    out: list[Any] = []
    for table in ("coupon_codes", "coupon_redemptions", "coupon_campaigns", "coupon_batches"):
        rows = await sql_rows(db_url, f"SELECT * FROM {table}")  # noqa: S608 - the test's own tables
        out.append(sorted(repr(sorted(r.items())) for r in rows))
    return out


async def setup(admin: AdminClient, **extra: Any) -> tuple[str, str]:
    """LE1 (S1, S2), LE2 (S3), an active campaign TENOFF and one code; a terminal in S1."""
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    await campaign(admin, **extra)
    [code] = await codes(admin, "TENOFF", 1)
    return code, await terminal(admin)


async def card_of(admin: AdminClient, member_id: int) -> str:
    """A named card of the member (its number, for F2)."""
    status, _ = await admin.call("POST", "/v1/card-classes", json={"code": "ORD",
                                 "name": "Ordinary", "named": True})  # fmt: skip
    if status == 201:
        await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "stored_value"})
    made = await admin.ok("POST", "/v1/cards", json={"class_code": "ORD", "store": "S1",
                          "member_id": member_id})  # fmt: skip
    return str(made["pan"])


# --- query, reserve, confirm ---------------------------------------------------------------------


async def test_query_changes_nothing_reserve_holds_and_confirm_redeems_once(
    admin: AdminClient, db_url: str
) -> None:
    code, tid = await setup(admin, supplier_share_bp=3_000, store_share_bp=7_000,
                            supplier_id="SUP1")  # fmt: skip
    other = await terminal(admin, "S2")
    before = await state_of(db_url)
    query = await one(admin, ask(Kind.COUPON_QUERY, tid, code.lower(), amount=5_000))
    assert (query.outcome, query.discount, query.forfeited, query.campaign) == (
        Outcome.APPROVED, 1_000, 0, "TENOFF")  # fmt: skip
    assert await state_of(db_url) == before
    reserve = ask(Kind.COUPON_RESERVE, tid, code, amount=5_000)
    held = await one(admin, reserve)
    assert (held.outcome, held.discount, held.replayed) == (Outcome.APPROVED, 1_000, False)
    assert (await code_row(db_url, code))["state"] == "reserved"
    taken = await one(admin, ask(Kind.COUPON_RESERVE, other, code, amount=5_000))
    assert (taken.outcome, taken.refusal) == (Outcome.COUPON_USED, "coupon_reserved")
    again = await one(admin, reserve)  # a resend of the reservation: the stored answer
    assert (again.outcome, again.discount, again.replayed) == (Outcome.APPROVED, 1_000, True)
    confirm = ask(Kind.COUPON_REDEEM, tid, amount=5_000, original_batch="000001",
                  original_stan=reserve.stan)  # fmt: skip
    redeemed = await one(admin, confirm)
    assert (redeemed.outcome, redeemed.discount, redeemed.replayed) == (
        Outcome.APPROVED, 1_000, False)  # fmt: skip
    resent = await one(admin, confirm)
    assert (resent.outcome, resent.discount, resent.replayed) == (Outcome.APPROVED, 1_000, True)
    row = await campaign_row(db_url, "TENOFF")
    assert (row["redeemed_count"], row["redeemed_value"]) == (1, 1_000)
    assert (row["store_cost"], row["supplier_cost"]) == (700, 300)
    assert (await code_row(db_url, code))["state"] == "redeemed"
    states = await sql_rows(db_url, "SELECT state FROM coupon_redemptions ORDER BY state")
    assert [s["state"] for s in states] == ["confirmed", "redeemed"]
    used = await one(admin, ask(Kind.COUPON_REDEEM, other, code, amount=5_000))
    assert (used.outcome, used.refusal) == (Outcome.COUPON_USED, "coupon_used")
    mismatch = await one(admin, ask(Kind.COUPON_RESERVE, tid, "PARTNER-0001", amount=1,
                                    stan=reserve.stan))  # fmt: skip
    assert mismatch.outcome is Outcome.DUPLICATE_MISMATCH
    figures = await admin.ok("GET", "/v1/coupon-campaigns/TENOFF/figures")
    assert (figures["redeemed"], figures["redemption_rate_bp"], figures["cost_fen"]) == (
        1, 10_000, 1_000)  # fmt: skip


async def test_a_redeem_confirms_the_reservation_of_its_own_stan_or_of_its_batch(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin)
    first, second = await codes(admin, "TENOFF", 2)
    tid, other = await terminal(admin), await terminal(admin)
    reserve = ask(Kind.COUPON_RESERVE, tid, first, amount=5_000)
    assert (await one(admin, reserve)).outcome is Outcome.APPROVED
    same = ask(Kind.COUPON_REDEEM, tid, first, amount=5_000, stan=reserve.stan)
    done = await one(admin, same)
    assert (done.outcome, done.discount, done.replayed) == (Outcome.APPROVED, 1_000, False)
    assert (await one(admin, same)).replayed is True
    assert (await one(admin, reserve)).replayed is True
    [row] = await sql_rows(db_url, "SELECT state FROM coupon_redemptions")
    assert row["state"] == "redeemed"
    held = ask(Kind.COUPON_RESERVE, tid, second, amount=5_000)
    assert (await one(admin, held)).outcome is Outcome.APPROVED
    elsewhere = await one(admin, ask(Kind.COUPON_REDEEM, other, second, amount=5_000))
    assert (elsewhere.outcome, elsewhere.refusal) == (Outcome.COUPON_USED, "coupon_reserved")
    later = await one(admin, ask(Kind.COUPON_REDEEM, tid, second, amount=5_000))
    assert (later.outcome, later.discount) == (Outcome.APPROVED, 1_000)
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 2
    assert (await code_row(db_url, second))["state"] == "redeemed"
    undo = ask(Kind.COUPON_REVERSE, tid, first, original_batch="000001",
               original_stan=reserve.stan)  # fmt: skip
    assert (await one(admin, undo)).outcome is Outcome.APPROVED
    late = await one(admin, same)  # the redemption was reversed: never approved again
    assert late.outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 1
    wrong = ask(Kind.COUPON_REVERSE, tid, second, original_batch="000001",
                original_stan=reserve.stan)  # fmt: skip
    assert (await one(admin, wrong)).outcome is Outcome.ORIGINAL_MISMATCH


async def test_a_reservation_confirmed_under_another_stan_is_never_redeemed_or_reversed_again(
    admin: AdminClient, db_url: str
) -> None:
    """Reserve under STAN1, confirm under STAN2 (F61 = STAN1): the reservation is STAN2's
    redemption now. A 930000 under STAN1 is refused C2 before STAN2's reversal and
    `reversed_before_arrival` after it (it never gets an approval that redeemed nothing), a
    940000 naming STAN1 answers 25 and undoes nothing; reversing STAN2 gives the coupon
    back, once, and reverses STAN1's reservation with it."""
    code, tid = await setup(admin)
    reserve = ask(Kind.COUPON_RESERVE, tid, code, amount=5_000)
    assert (await one(admin, reserve)).outcome is Outcome.APPROVED
    confirm = ask(Kind.COUPON_REDEEM, tid, amount=5_000, original_batch="000001",
                  original_stan=reserve.stan)  # fmt: skip
    assert (await one(admin, confirm)).discount == 1_000
    again = ask(Kind.COUPON_REDEEM, tid, code, amount=5_000, stan=reserve.stan)
    got = await one(admin, again)
    assert (got.outcome, got.refusal) == (Outcome.COUPON_USED, "coupon_used")
    wrong = ask(Kind.COUPON_REVERSE, tid, code, original_batch="000001",
                original_stan=reserve.stan)  # fmt: skip
    assert (await one(admin, wrong)).outcome is Outcome.ORIGINAL_NOT_FOUND
    assert (await code_row(db_url, code))["state"] == "redeemed"
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 1
    undo = ask(Kind.COUPON_REVERSE, tid, code, original_batch="000001",
               original_stan=confirm.stan)  # fmt: skip
    resent = await one(admin, reserve)  # the reservation stands, confirmed: its answer again
    assert (resent.outcome, resent.replayed) == (Outcome.APPROVED, True)
    assert (await one(admin, undo)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, code))["state"] == "issued"
    got = await one(admin, again)  # STAN1's reservation was reversed with STAN2
    assert (got.outcome, got.discount) == (Outcome.REVERSED_BEFORE_ARRIVAL, None)
    # A resend of the reservation now holds nothing: it was approved again, with the code
    # issued and held by no one (a review found), and the till told it held a coupon
    resent = await one(admin, reserve)
    assert (resent.outcome, resent.discount) == (Outcome.REVERSED_BEFORE_ARRIVAL, None)
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 0
    elsewhere = await one(admin, ask(Kind.COUPON_REDEEM, await terminal(admin, "S2"), code,
                                     amount=5_000))  # fmt: skip
    assert elsewhere.outcome is Outcome.APPROVED  # usable again, once
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 1


async def test_a_confirm_of_another_bill_than_the_reserved_one_is_refused_and_redeems_nothing(
    admin: AdminClient, db_url: str
) -> None:
    """The discount, the minimum spend and the no-change rule were judged on the reserved
    bill: a confirm carrying a smaller F4 would skip them (10.00 off a 5.00 bill under
    `refuse`, below the 40.00 minimum), a larger one would take another sale's discount."""
    code, tid = await setup(admin, change_rule="refuse", min_spend_fen=4_000)
    reserve = ask(Kind.COUPON_RESERVE, tid, code, amount=5_000)
    assert (await one(admin, reserve)).discount == 1_000
    before = await state_of(db_url)
    for bill in (500, 6_000):
        for confirm in (
            ask(Kind.COUPON_REDEEM, tid, amount=bill, original_batch="000001",
                original_stan=reserve.stan),
            ask(Kind.COUPON_REDEEM, tid, code, amount=bill, stan=reserve.stan),
            ask(Kind.COUPON_REDEEM, tid, code, amount=bill),  # another STAN of the batch
        ):  # fmt: skip
            got = await one(admin, confirm)
            assert got.outcome is Outcome.ORIGINAL_MISMATCH, (bill, confirm, got)
            assert await state_of(db_url) == before
    done = await one(admin, ask(Kind.COUPON_REDEEM, tid, amount=5_000, original_batch="000001",
                                original_stan=reserve.stan))  # fmt: skip
    assert (done.outcome, done.discount) == (Outcome.APPROVED, 1_000)


async def test_a_redemption_counts_against_the_value_budget_as_it_is_when_it_writes(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HQ lowers a campaign's value budget between a till's read of the campaign and its
    write: the write judges the budget as it is now (both the one-statement hold and the
    transaction's update), so a 50.00 discount is refused under a 10.00 budget."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "PCT", kind="percent_off", value_fen=0, percent_bp=5_000,
                   max_value_fen=10_000)  # fmt: skip
    first, second = await codes(admin, "PCT", 2)
    coupons = service(admin)
    real = coupons._present
    lowered = iter([1_000, 2_000])

    async def present(*args: Any, **kw: Any) -> Any:
        got = await real(*args, **kw)
        budget = next(lowered, None)  # meanwhile HQ lowers the budget (nothing counted yet)
        if budget is not None:
            await admin.ok("PATCH", "/v1/coupon-campaigns/PCT", json={"max_value_fen": budget})
        return got

    monkeypatch.setattr(coupons, "_present", present)
    before = await state_of(db_url)
    spent = await one(admin, ask(Kind.COUPON_REDEEM, tid, first, amount=10_000))
    assert (spent.outcome, spent.refusal) == (Outcome.OVER_LIMIT, "coupon_budget_spent")
    after = await state_of(db_url)
    assert after[:2] == before[:2]  # no code or redemption changed (only the budget did)
    assert (await campaign_row(db_url, "PCT"))["redeemed_value"] == 0
    assert (await code_row(db_url, first))["state"] == "issued"
    fits = await one(admin, ask(Kind.COUPON_REDEEM, tid, second, amount=2_000))
    assert (fits.outcome, fits.discount) == (Outcome.APPROVED, 1_000)  # within the new 2,000
    assert (await campaign_row(db_url, "PCT"))["redeemed_value"] == 1_000
    status, body = await admin.call("PATCH", "/v1/coupon-campaigns/PCT",
                                    json={"max_value_fen": 999})  # fmt: skip
    assert (status, body["error"]["code"]) == (409, "budget_below_issued")


async def test_a_lapsed_reservation_frees_the_code_and_its_holder_can_no_longer_confirm(
    admin: AdminClient, db_url: str
) -> None:
    code, tid = await setup(admin)
    other = await terminal(admin)
    coupons = service(admin)
    start = int(time.time() * 1000)
    coupons.clock_ms = lambda: start
    reserve = ask(Kind.COUPON_RESERVE, tid, code, amount=2_000)
    assert (await one(admin, reserve)).outcome is Outcome.APPROVED
    coupons.clock_ms = lambda: start + limits.COUPON_RESERVE_S * 1000 - 1
    held = await one(admin, ask(Kind.COUPON_REDEEM, other, code, amount=2_000))
    assert (held.outcome, held.refusal) == (Outcome.COUPON_USED, "coupon_reserved")
    coupons.clock_ms = lambda: start + limits.COUPON_RESERVE_S * 1000
    taken = await one(admin, ask(Kind.COUPON_REDEEM, other, code, amount=2_000))
    assert taken.outcome is Outcome.APPROVED
    [first] = await sql_rows(db_url, "SELECT state FROM coupon_redemptions WHERE key = :k",
                             k=f"{tid}/0/000001/{reserve.stan}")  # fmt: skip
    assert first["state"] == "released"
    late = await one(admin, ask(Kind.COUPON_REDEEM, tid, amount=2_000, original_batch="000001",
                                original_stan=reserve.stan))  # fmt: skip
    assert (late.outcome, late.refusal) == (Outcome.COUPON_USED, "coupon_used")
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 1


async def test_a_lapsed_reservation_is_not_confirmed_even_when_nobody_took_the_code(
    admin: AdminClient, db_url: str
) -> None:
    """The hold's time limit ends it: a confirm of it after COUPON_RESERVE_S answers 25
    `coupon_reservation_lapsed` and redeems nothing, though the code is still free; a
    redeem of the coupon under a new STAN of the same batch redeems it afresh."""
    code, tid = await setup(admin)
    coupons = service(admin)
    start = int(time.time() * 1000)
    coupons.clock_ms = lambda: start
    reserve = ask(Kind.COUPON_RESERVE, tid, code, amount=2_000)
    assert (await one(admin, reserve)).outcome is Outcome.APPROVED
    coupons.clock_ms = lambda: start + limits.COUPON_RESERVE_S * 1000
    for late in (
        ask(Kind.COUPON_REDEEM, tid, code, amount=2_000, stan=reserve.stan),  # the same key
        ask(Kind.COUPON_REDEEM, tid, amount=2_000, original_batch="000001",
            original_stan=reserve.stan),
    ):  # fmt: skip
        answer = await one(admin, late)
        assert (answer.outcome, answer.refusal) == (Outcome.ORIGINAL_NOT_FOUND,
                                                    "coupon_reservation_lapsed")  # fmt: skip
    assert (await code_row(db_url, code))["state"] == "reserved"  # lapsed: issued to the POS
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 0
    afresh = await one(admin, ask(Kind.COUPON_REDEEM, tid, code, amount=2_000))
    assert (afresh.outcome, afresh.discount) == (Outcome.APPROVED, 1_000)
    assert (await code_row(db_url, code))["state"] == "redeemed"
    [held] = await sql_rows(db_url, "SELECT state FROM coupon_redemptions WHERE key = :k",
                            k=f"{tid}/0/000001/{reserve.stan}")  # fmt: skip
    assert held["state"] == "released"
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 1


async def test_a_lapsed_reservation_no_longer_counts_against_the_members_limits(
    admin: AdminClient,
) -> None:
    """A member's reservation counts against its limits while it holds the code, not after
    it lapsed (the code is free again: a lookup shows it issued)."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "ONCE", per_member_max=1, per_member_per_day_max=1)
    first, second = await codes(admin, "ONCE", 2)
    pan = await card_of(admin, await member(admin))
    coupons = service(admin)
    start = int(time.time() * 1000)
    coupons.clock_ms = lambda: start
    held = await one(admin, ask(Kind.COUPON_RESERVE, tid, first, amount=5_000, card=pan))
    assert held.outcome is Outcome.APPROVED
    coupons.clock_ms = lambda: start + limits.COUPON_RESERVE_S * 1000 - 1
    still = await one(admin, ask(Kind.COUPON_QUERY, tid, second, amount=5_000, card=pan))
    assert (still.outcome, still.refusal) == (Outcome.NOT_PERMITTED, "coupon_member_limit")
    coupons.clock_ms = lambda: start + limits.COUPON_RESERVE_S * 1000
    assert (await admin.ok("GET", f"/v1/coupons/{first}"))["state"] == "issued"
    other = await one(admin, ask(Kind.COUPON_REDEEM, tid, second, amount=5_000, card=pan))
    assert other.outcome is Outcome.APPROVED
    again = await one(admin, ask(Kind.COUPON_REDEEM, tid, first, amount=5_000, card=pan))
    assert (again.outcome, again.refusal) == (Outcome.NOT_PERMITTED, "coupon_member_limit")


async def test_a_lapsed_reservation_is_no_longer_one_of_its_sales_coupons(
    admin: AdminClient,
) -> None:
    """A non-stackable coupon reserved in a sale: while it holds, another coupon of that
    sale is refused (not stackable) and a stackable one takes only what it left of the
    bill; once it lapsed, it holds nothing and takes nothing from the sale."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "LONE")
    await campaign(admin, "PAIR", stackable=True)
    [lone], [pair] = await codes(admin, "LONE", 1), await codes(admin, "PAIR", 1)
    coupons = service(admin)
    start = int(time.time() * 1000)
    coupons.clock_ms = lambda: start
    held = await one(admin, ask(Kind.COUPON_RESERVE, tid, lone, amount=1_500, sale="S-3"))
    assert held.outcome is Outcome.APPROVED
    coupons.clock_ms = lambda: start + limits.COUPON_RESERVE_S * 1000 - 1
    joined = await one(admin, ask(Kind.COUPON_QUERY, tid, pair, amount=1_500, sale="S-3"))
    assert (joined.outcome, joined.refusal) == (Outcome.NOT_PERMITTED, "coupon_not_stackable")
    coupons.clock_ms = lambda: start + limits.COUPON_RESERVE_S * 1000
    alone = await one(admin, ask(Kind.COUPON_REDEEM, tid, pair, amount=1_500, sale="S-3"))
    assert (alone.outcome, alone.discount, alone.forfeited) == (Outcome.APPROVED, 1_000, 0)


async def test_two_coupons_of_one_sale_never_take_more_than_its_bill(admin: AdminClient) -> None:
    """The no-change rule of a sale's coupons together: a bill of 15.00 and two stackable
    10.00 coupons; the second is refused under "refuse", and takes the 5.00 left under
    "forfeit" (5.00 forfeited). Released coupons give their share back."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "A", stackable=True, change_rule="refuse")
    await campaign(admin, "B", stackable=True, change_rule="refuse")
    await campaign(admin, "C", stackable=True)
    [a], [b], [c] = [await codes(admin, name, 1) for name in "ABC"]
    first = await one(admin, ask(Kind.COUPON_REDEEM, tid, a, amount=1_500, sale="S-9"))
    assert (first.outcome, first.discount) == (Outcome.APPROVED, 1_000)
    second = await one(admin, ask(Kind.COUPON_REDEEM, tid, b, amount=1_500, sale="S-9"))
    assert (second.outcome, second.refusal) == (Outcome.NOT_PERMITTED, "coupon_exceeds_bill")
    hold = ask(Kind.COUPON_RESERVE, tid, c, amount=1_500, sale="S-9")
    rest = await one(admin, hold)
    assert (rest.outcome, rest.discount, rest.forfeited) == (Outcome.APPROVED, 500, 500)
    undo = ask(Kind.COUPON_REVERSE, tid, original_batch="000001", original_stan=hold.stan)
    assert (await one(admin, undo)).outcome is Outcome.APPROVED
    alone = await one(admin, ask(Kind.COUPON_QUERY, tid, b, amount=2_000, sale="S-9"))
    assert (alone.outcome, alone.discount) == (Outcome.APPROVED, 1_000)


async def test_two_department_coupons_of_one_sale_never_take_more_than_its_lines(
    admin: AdminClient,
) -> None:
    """A 100.00 bill with 30.00 of FOOD and two stackable 30.00-off FOOD coupons: the
    second finds FOOD taken and is refused, under "forfeit" too (never used up for no
    discount); a DRINK coupon still takes its own."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    for name, department, rule in (
        ("F1", "FOOD", "refuse"),
        ("F2", "FOOD", "forfeit"),
        ("D1", "DRINK", "refuse"),
    ):
        await campaign(admin, name, stackable=True, change_rule=rule, value_fen=3_000,
                       departments=[department])  # fmt: skip
    [f1], [f2], [d1] = [await codes(admin, name, 1) for name in ("F1", "F2", "D1")]
    basket = (("FOOD", 3_000), ("DRINK", 7_000))

    def redeem(code: str) -> PosRequest:
        return ask(Kind.COUPON_REDEEM, tid, code, amount=10_000, basket=basket, sale="S-7")

    assert (await one(admin, redeem(f1))).discount == 3_000
    second = await one(admin, redeem(f2))
    assert (second.outcome, second.refusal) == (Outcome.NOT_PERMITTED, "coupon_nothing_left")
    drink = await one(admin, redeem(d1))
    assert (drink.outcome, drink.discount) == (Outcome.APPROVED, 3_000)


async def test_a_reversal_makes_a_redeemed_code_usable_again_exactly_once(
    admin: AdminClient, db_url: str
) -> None:
    code, tid = await setup(admin)
    other = await terminal(admin)
    sale = ask(Kind.COUPON_REDEEM, tid, code, amount=3_000)
    assert (await one(admin, sale)).outcome is Outcome.APPROVED
    undo = ask(Kind.COUPON_REVERSE, tid, original_batch="000001", original_stan=sale.stan)
    answers = await asyncio.gather(*(one(admin, undo) for _ in range(8)))
    assert sorted(a.replayed for a in answers) == [False] + [True] * 7
    assert all(a.outcome is Outcome.APPROVED and a.campaign == "TENOFF" for a in answers)
    row = await campaign_row(db_url, "TENOFF")
    assert (row["redeemed_count"], row["redeemed_value"], row["store_cost"]) == (0, 0, 0)
    assert (await code_row(db_url, code))["state"] == "issued"
    # The terminal's own 0400 of the same sale changes nothing more.
    assert (await one(admin, ask(Kind.REVERSE, tid, stan=sale.stan))).outcome in (
        Outcome.APPROVED, Outcome.ALREADY_REVERSED)  # fmt: skip
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 0
    again = await one(admin, ask(Kind.COUPON_REDEEM, other, code, amount=3_000))
    assert again.outcome is Outcome.APPROVED
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 1
    nothing = await one(admin, ask(Kind.COUPON_REVERSE, tid, original_batch="000001",
                                   original_stan="999999"))  # fmt: skip
    assert nothing.outcome is Outcome.ORIGINAL_NOT_FOUND


async def test_a_0400_reversal_releases_a_reservation(admin: AdminClient, db_url: str) -> None:
    code, tid = await setup(admin)
    held = ask(Kind.COUPON_RESERVE, tid, code, amount=3_000)
    assert (await one(admin, held)).outcome is Outcome.APPROVED
    await one(admin, ask(Kind.REVERSE, tid, stan=held.stan))
    assert (await code_row(db_url, code))["state"] == "issued"
    [row] = await sql_rows(db_url, "SELECT state FROM coupon_redemptions")
    assert row["state"] == "released"
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 0


async def test_a_0400_overtaken_by_its_own_confirm_undoes_the_redemption(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 0400 of a reservation read it reserved; its own 930000 (through another gateway)
    confirmed it in place before the 0400 wrote. The 0400 was answered 00 with the coupon
    left redeemed and counted (a reviewer's race on two gateways, 5-10 codes in 150). Now
    it reads the row again and undoes the redemption."""
    code, tid = await setup(admin)
    held = ask(Kind.COUPON_RESERVE, tid, code, amount=3_000)
    assert (await one(admin, held)).outcome is Outcome.APPROVED
    confirm = ask(Kind.COUPON_REDEEM, tid, code, amount=3_000, stan=held.stan)
    real_begin = Records.begin
    confirmed: list[PosResult] = []

    def begin(self: Records) -> Any:
        if not confirmed and sys._getframe(1).f_code.co_name == "_undo":
            confirmed.append(PosResult(Outcome.APPROVED))  # once: the confirm writes too
            return _confirm_then(real_begin(self))
        return real_begin(self)

    @contextlib.asynccontextmanager
    async def _confirm_then(inner: contextlib.AbstractAsyncContextManager[Unit]) -> Any:
        confirmed[0] = await one(admin, confirm)  # between the 0400's read and its write
        async with inner as uow:
            yield uow

    monkeypatch.setattr(Records, "begin", begin)
    undone = await one(admin, ask(Kind.REVERSE, tid, stan=held.stan))
    monkeypatch.undo()
    assert (confirmed[0].outcome, undone.outcome) == (Outcome.APPROVED, Outcome.APPROVED)
    assert (await code_row(db_url, code))["state"] == "issued"
    [row] = await sql_rows(db_url, "SELECT state FROM coupon_redemptions")
    assert row["state"] == "reversed"
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 0


async def test_a_coupon_request_after_its_own_reversal_changes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    code, tid = await setup(admin)
    late = ask(Kind.COUPON_REDEEM, tid, code, amount=5_000)
    await one(admin, ask(Kind.REVERSE, tid, stan=late.stan))  # the 0400 overtook it
    undo = ask(Kind.COUPON_REVERSE, tid, original_batch="000001", original_stan="777777")
    assert (await one(admin, undo)).outcome is Outcome.ORIGINAL_NOT_FOUND
    before = await state_of(db_url)
    for request in (late, ask(Kind.COUPON_RESERVE, tid, code, amount=5_000, stan="777777")):
        answer = await one(admin, request)
        assert (answer.outcome, answer.replayed) == (Outcome.REVERSED_BEFORE_ARRIVAL, True)
    assert await state_of(db_url) == before
    assert (await code_row(db_url, code))["state"] == "issued"
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 0


# --- refusals ------------------------------------------------------------------------------------


async def test_each_rule_refuses_with_its_outcome_and_changes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    code, tid = await setup(admin, min_spend_fen=2_000, change_rule="refuse")
    s3 = await terminal(admin, "S3")
    await campaign(admin, "OLD", valid_from_ms=NOW_MS - 10 * DAY_MS, valid_to_ms=NOW_MS - DAY_MS)
    [old] = await codes(admin, "OLD", 1)
    await campaign(admin, "S2ONLY", store="S2")
    [s2only] = await codes(admin, "S2ONLY", 1)
    await campaign(admin, "MINE", holder_only=True)
    [mine] = (await admin.ok("POST", "/v1/coupon-campaigns/MINE/issues",
                             json={"member_ids": [await member(admin)]}))["codes"]  # fmt: skip
    await campaign(admin, "PAUSED")
    await admin.ok("PATCH", "/v1/coupon-campaigns/PAUSED", json={"state": "paused"})
    [paused] = await codes(admin, "PAUSED", 1)
    await campaign(admin, "ENDED")
    [ended] = await codes(admin, "ENDED", 1)
    await admin.ok("PATCH", "/v1/coupon-campaigns/ENDED", json={"state": "ended"})
    await campaign(admin, "VOIDED")
    [voided] = await codes(admin, "VOIDED", 1)
    await admin.ok("POST", f"/v1/coupons/{voided}/void")
    unknown = code[:-1] + ("0" if code[-1] != "0" else "1")
    cases = [
        (tid, unknown, 5_000, Outcome.COUPON_UNKNOWN, "coupon_not_found"),
        (tid, "!!", 5_000, Outcome.COUPON_UNKNOWN, "coupon_code_malformed"),
        (tid, "v1|garbage", 5_000, Outcome.COUPON_UNKNOWN, "coupon_qr_malformed"),
        (tid, old, 5_000, Outcome.COUPON_EXPIRED, "coupon_expired"),
        (tid, ended, 5_000, Outcome.COUPON_EXPIRED, "coupon_expired"),
        (tid, code, 1_999, Outcome.NOT_PERMITTED, "coupon_min_spend"),
        (tid, s2only, 5_000, Outcome.NOT_PERMITTED, "coupon_wrong_store"),
        (s3, code, 5_000, Outcome.NOT_PERMITTED, "coupon_wrong_store"),
        (tid, mine["code"], 5_000, Outcome.NOT_PERMITTED, "coupon_not_holder"),
        (tid, paused, 5_000, Outcome.COUPON_EXPIRED, "coupon_inactive"),
        (tid, voided, 5_000, Outcome.NOT_PERMITTED, "coupon_inactive"),
    ]
    before = await state_of(db_url)
    for kind in (Kind.COUPON_QUERY, Kind.COUPON_RESERVE, Kind.COUPON_REDEEM):
        for where, text, amount, outcome, refusal in cases:
            answer = await one(admin, ask(kind, where, text, amount=amount))
            assert (answer.outcome, answer.refusal) == (outcome, refusal), (kind, text)
    bad = await one(admin, ask(Kind.COUPON_REDEEM, tid, "", amount=5_000))
    assert bad.outcome is Outcome.BAD_REQUEST
    assert await state_of(db_url) == before


async def test_the_no_change_rule_refuses_or_forfeits_per_campaign(admin: AdminClient) -> None:
    code, tid = await setup(admin, change_rule="refuse")
    await campaign(admin, "FORFEIT")
    [forfeit] = await codes(admin, "FORFEIT", 1)
    refused = await one(admin, ask(Kind.COUPON_REDEEM, tid, code, amount=600))
    assert (refused.outcome, refused.refusal) == (Outcome.NOT_PERMITTED, "coupon_exceeds_bill")
    taken = await one(admin, ask(Kind.COUPON_REDEEM, tid, forfeit, amount=600))
    assert (taken.outcome, taken.discount, taken.forfeited) == (Outcome.APPROVED, 600, 400)


async def test_percent_off_on_departments_splits_cost_and_stops_at_the_value_budget(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "FOOD20", kind="percent_off", value_fen=0, percent_bp=5_000,
                   departments=["FOOD"], supplier_share_bp=2_500, store_share_bp=7_500,
                   supplier_id="SUP9", max_value_fen=1_500)  # fmt: skip
    first, second = await codes(admin, "FOOD20", 2)
    basket = (("FOOD", 2_000), ("TOYS", 5_000))
    answer = await one(admin, ask(Kind.COUPON_REDEEM, tid, first, amount=7_000, basket=basket))
    assert (answer.outcome, answer.discount) == (Outcome.APPROVED, 1_000)
    row = await campaign_row(db_url, "FOOD20")
    assert (row["store_cost"], row["supplier_cost"], row["redeemed_value"]) == (750, 250, 1_000)
    before = await state_of(db_url)
    spent = await one(admin, ask(Kind.COUPON_REDEEM, tid, second, amount=7_000, basket=basket))
    assert (spent.outcome, spent.refusal) == (Outcome.OVER_LIMIT, "coupon_budget_spent")
    assert await state_of(db_url) == before
    toys = await one(admin, ask(Kind.COUPON_QUERY, tid, second, amount=5_000,
                                basket=(("TOYS", 5_000),)))  # fmt: skip
    assert (toys.outcome, toys.refusal) == (Outcome.NOT_PERMITTED, "coupon_wrong_department")


async def test_a_member_limit_counts_the_members_redemptions(admin: AdminClient) -> None:
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "ONCE", per_member_max=1)
    first, second = await codes(admin, "ONCE", 2)
    pan = await card_of(admin, await member(admin))
    anonymous = await one(admin, ask(Kind.COUPON_QUERY, tid, first, amount=5_000))
    assert (anonymous.outcome, anonymous.refusal) == (Outcome.NOT_PERMITTED,
                                                      "coupon_member_limit")  # fmt: skip
    ok = await one(admin, ask(Kind.COUPON_REDEEM, tid, first, amount=5_000, card=pan))
    assert ok.outcome is Outcome.APPROVED
    again = await one(admin, ask(Kind.COUPON_REDEEM, tid, second, amount=5_000, card=pan))
    assert (again.outcome, again.refusal) == (Outcome.NOT_PERMITTED, "coupon_member_limit")


async def test_one_member_redeeming_many_codes_at_once_stays_within_its_limit(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    tids = [await terminal(admin) for _ in range(3)]
    await campaign(admin, "TWICE", per_member_max=2, per_member_per_day_max=2)
    made = await codes(admin, "TWICE", 12)
    pan = await card_of(admin, await member(admin))
    kinds = (Kind.COUPON_REDEEM, Kind.COUPON_RESERVE)
    racers = [ask(kinds[i % 2], tids[i % 3], code, amount=5_000, card=pan)
              for i, code in enumerate(made)]  # fmt: skip
    answers = await asyncio.gather(*(one(admin, r) for r in racers))
    approved = [a for a in answers if a.outcome is Outcome.APPROVED]
    refused = {a.refusal for a in answers if a.outcome is not Outcome.APPROVED}
    assert len(approved) == 2 and refused <= {"coupon_member_limit", "coupon_daily_limit"}
    live = await sql_rows(db_url, "SELECT count(*) AS n FROM coupon_redemptions "
                          "WHERE state IN ('reserved', 'redeemed')")  # fmt: skip
    assert live[0]["n"] == 2


async def test_a_redeem_of_a_typed_code_reads_key_code_campaign_and_member_in_one_statement(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round trips are most of a POS coupon's cost: the redemption under the key, the code,
    its campaign and the card's member come from one statement, and the answers are those
    the separate reads gave: the member is counted, a resend is replayed, an unknown code
    refused (a named card, a bearer request)."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "ONCE", per_member_max=1)
    first, second = await codes(admin, "ONCE", 2)
    pan = await card_of(admin, await member(admin))
    reads: list[str] = []
    for verb in ("get", "find", "select_one"):
        real = getattr(Unit, verb)

        def counted(self: Unit, table: str, *args: Any, _real: Any = real, _verb: str = verb,
                    **kwargs: Any) -> Any:  # fmt: skip
            # The POS call's own reads of its terminal and card (the card directory's, before
            # the coupon is planned) are not the coupon's.
            if not sys._getframe(1).f_code.co_filename.endswith("directory.py"):
                reads.append(f"{_verb} {table}")
            return _real(self, table, *args, **kwargs)

        monkeypatch.setattr(Unit, verb, counted)
    real_rows = Records.statement_rows

    async def statement_rows(self: Records, sql: str, args: Sequence[Any]) -> Any:
        if sql == presented_many_sql():
            reads.append("statement_rows coupon_presented")
        return await real_rows(self, sql, args)

    monkeypatch.setattr(Records, "statement_rows", statement_rows)
    redeem = ask(Kind.COUPON_REDEEM, tid, first.lower(), amount=5_000, card=pan)
    assert (await one(admin, redeem)).outcome is Outcome.APPROVED
    coupon_reads = [r for r in reads if r.split()[1].startswith("coupon") or r.endswith(" cards")]
    one_read = "statement_rows" if db_url.startswith("postgresql") else "select_one"
    assert coupon_reads == [f"{one_read} coupon_presented"], reads
    again = await one(admin, redeem)
    assert (again.outcome, again.replayed) == (Outcome.APPROVED, True)
    limited = await one(admin, ask(Kind.COUPON_REDEEM, tid, second, amount=5_000, card=pan))
    assert (limited.outcome, limited.refusal) == (Outcome.NOT_PERMITTED, "coupon_member_limit")
    unknown = await one(
        admin, ask(Kind.COUPON_QUERY, tid, model.new_code(secrets.token_bytes), amount=5_000)
    )
    assert unknown.refusal == "coupon_not_found"
    bearer = await one(admin, ask(Kind.COUPON_QUERY, tid, second, amount=5_000))
    assert (bearer.outcome, bearer.refusal) == (Outcome.NOT_PERMITTED, "coupon_member_limit")
    assert await count(db_url, "coupon_redemptions") == 1


async def test_the_coupon_requests_of_one_call_read_together_each_answered_as_alone(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coupon requests of one `handle` call read in one turn of the event loop: on
    PostgreSQL one statement for all of them (`presented_many_sql`), on SQLite one select
    each. Each gets the answer it would get alone: a redemption, a query, an unknown code,
    a resend replayed, and the same code asked twice in the call: exactly one wins."""
    await admin.org("LE1", "S1")
    tids = [await terminal(admin) for _ in range(5)]
    await campaign(admin, "MANY")
    free, queried, earlier = await codes(admin, "MANY", 3)
    before = ask(Kind.COUPON_REDEEM, tids[0], earlier, amount=5_000)
    assert (await one(admin, before)).outcome is Outcome.APPROVED
    # Signed on: their terminals are in the card directory's memory, as at a till.
    await pos(admin).handle([ask(Kind.SIGN_ON, tid) for tid in tids])
    statements: list[int] = []
    real_rows = Records.statement_rows

    async def statement_rows(self: Records, sql: str, args: Sequence[Any]) -> Any:
        if sql == presented_many_sql():
            statements.append(len(args[0]))
        return await real_rows(self, sql, args)

    monkeypatch.setattr(Records, "statement_rows", statement_rows)
    unknown = model.new_code(secrets.token_bytes)
    answers = await pos(admin).handle([
        ask(Kind.COUPON_REDEEM, tids[1], free, amount=5_000),
        ask(Kind.COUPON_QUERY, tids[2], queried, amount=5_000),
        ask(Kind.COUPON_QUERY, tids[3], unknown, amount=5_000),
        before,
        ask(Kind.COUPON_REDEEM, tids[4], free, amount=5_000),
    ])  # fmt: skip
    assert statements == ([5] if db_url.startswith("postgresql") else [])
    redeem, query, missing, resend, twice = answers
    assert query.outcome is Outcome.APPROVED
    assert query.discount == 1_000  # the campaign takes 10.00 off
    assert missing.refusal == "coupon_not_found"
    assert (resend.outcome, resend.replayed) == (Outcome.APPROVED, True)
    won = [a for a in (redeem, twice) if a.outcome is Outcome.APPROVED]
    lost = [a for a in (redeem, twice) if a.outcome is not Outcome.APPROVED]
    assert len(won) == 1, answers
    assert [a.refusal for a in lost] == ["coupon_used"]
    assert (await code_row(db_url, queried))["state"] == "issued"
    assert (await code_row(db_url, free))["state"] == "redeemed"
    assert await count(db_url, "coupon_redemptions") == 2


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("deadlock", [False, True])
async def test_the_coupon_redemptions_of_one_call_hold_in_one_statement(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch, deadlock: bool
) -> None:
    """A call's redemptions of distinct codes hold in one statement (`holds_sql`), counted
    together; when PostgreSQL ends that statement to break a deadlock (it changed nothing),
    each runs again alone, and each is approved once."""
    tids, made = await signed_on_with_codes(admin, "FOUR", 4)
    holds = watch_holds(monkeypatch, lambda codes: Deadlock() if deadlock and len(codes) > 1
                        else None)  # fmt: skip
    answers = await redeem_each(admin, tids, made)
    assert [a.outcome for a in answers] == [Outcome.APPROVED] * 4
    assert holds == ([4, 1, 1, 1, 1] if deadlock else [4])
    row = await campaign_row(db_url, "FOUR")
    assert (row["redeemed_count"], row["redeemed_value"]) == (4, 4_000)
    assert [(await code_row(db_url, code))["state"] for code in made] == ["redeemed"] * 4
    assert await count(db_url, "coupon_redemptions") == 4


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_hold_statement_ended_by_a_database_error_answers_its_holds_unavailable_once(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A statement of three holds ends in a database error (a lock waited on too long): it
    changed nothing, its three requests are answered `unavailable` at once (never retried,
    so a call never waits for it twice), and the turn's other statement keeps its own
    outcome: the fourth request, which repeats the first's code, runs after, alone, and
    takes the code the failed statement left free."""
    tids, made = await signed_on_with_codes(admin, "HOT", 4)
    made = made[:3]
    timeout = TimeoutError("canceling statement due to lock timeout")
    holds = watch_holds(monkeypatch, lambda codes: timeout if made[1] in codes else None)
    answers = await redeem_each(admin, tids, [*made, made[0]])
    assert [a.outcome for a in answers] == [Outcome.UNAVAILABLE] * 3 + [Outcome.APPROVED]
    assert holds == [3, 1]
    # Answered as a database error (`_plan_or_unavailable`), not as a defect (`feature`).
    assert "a feature request failed" not in caplog.text
    assert "POS request could not be planned" in caplog.text
    row = await campaign_row(db_url, "HOT")
    assert (row["redeemed_count"], row["redeemed_value"]) == (1, 1_000)
    assert [(await code_row(db_url, c))["state"] for c in made] == ["redeemed", "issued", "issued"]


async def test_redemptions_of_one_call_over_the_budget_together_stop_exactly_at_it(
    admin: AdminClient, db_url: str
) -> None:
    """Four redemptions of 10.00 (half of a 20.00 bill) in one call against a budget of
    25.00: not all fit, so the statement refuses the campaign for all four and each is
    decided by the transaction: two approved, two refused `coupon_budget_spent`, the
    counters at 20.00."""
    await admin.org("LE1", "S1")
    tids = [await terminal(admin) for _ in range(4)]
    await campaign(admin, "TIGHT", kind="percent_off", value_fen=0, percent_bp=5_000,
                   max_value_fen=2_500)  # fmt: skip
    made = await codes(admin, "TIGHT", 4)
    await pos(admin).handle([ask(Kind.SIGN_ON, tid) for tid in tids])
    answers = await pos(admin).handle([
        ask(Kind.COUPON_REDEEM, tid, code, amount=2_000)
        for tid, code in zip(tids, made, strict=True)
    ])  # fmt: skip
    outcomes = sorted((str(a.outcome), a.refusal) for a in answers)
    assert outcomes == [("approved", "")] * 2 + [("over_limit", "coupon_budget_spent")] * 2
    row = await campaign_row(db_url, "TIGHT")
    assert (row["redeemed_count"], row["redeemed_value"]) == (2, 2_000)
    assert await count(db_url, "coupon_redemptions") == 2


async def test_when_the_read_of_a_calls_coupons_fails_each_is_unavailable_and_nothing_changes(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One statement reads a call's coupon requests: when it fails, every one of them is
    answered `unavailable` (the gateway answers 96 and reverses), nothing is held, and the
    next call reads again."""
    await admin.org("LE1", "S1")
    tids = [await terminal(admin) for _ in range(3)]
    await campaign(admin, "DOWN")
    made = await codes(admin, "DOWN", 3)
    before = await state_of(db_url)

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionResetError("the database went away")

    with monkeypatch.context() as patched:
        if db_url.startswith("postgresql"):
            patched.setattr(Records, "statement_rows", down)
        else:
            patched.setattr(Unit, "select_one", down)
        answers = await redeem_each(admin, tids, made)
    assert [a.outcome for a in answers] == [Outcome.UNAVAILABLE] * 3
    assert await state_of(db_url) == before
    again = await one(admin, ask(Kind.COUPON_REDEEM, tids[0], made[0], amount=5_000))
    assert again.outcome is Outcome.APPROVED


async def test_a_card_whose_id_is_past_32_bits_reads_its_member(
    admin: AdminClient, db_url: str
) -> None:
    """Card ids are 64-bit: the one-statement read binds the card's id with the column's own
    type (a 32-bit parameter made PostgreSQL's driver refuse the request: unavailable)."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "ONCE", per_member_max=1)
    first, second = await codes(admin, "ONCE", 2)
    pan = await card_of(admin, await member(admin))
    await sql_execute(db_url, "UPDATE cards SET id = 3000000000")
    pos(admin).directory.forget_all_cards()
    query = await one(admin, ask(Kind.COUPON_QUERY, tid, first, amount=5_000, card=pan))
    assert (query.outcome, query.discount) == (Outcome.APPROVED, 1_000)
    redeem = await one(admin, ask(Kind.COUPON_REDEEM, tid, first, amount=5_000, card=pan))
    assert redeem.outcome is Outcome.APPROVED
    limited = await one(admin, ask(Kind.COUPON_REDEEM, tid, second, amount=5_000, card=pan))
    assert (limited.outcome, limited.refusal) == (Outcome.NOT_PERMITTED, "coupon_member_limit")


# --- signed QR -----------------------------------------------------------------------------------


async def test_a_signed_qr_redeems_and_a_forged_or_retired_one_is_unknown(
    admin: AdminClient, db_url: str
) -> None:
    code, tid = await setup(admin)
    await admin.ok("POST", "/v1/coupon-keys", json={"legal_entity": "LE1", "kid": "k1"})
    await admin.ok("POST", "/v1/coupon-keys", json={"legal_entity": "LE2", "kid": "k2"})
    qr = (await admin.ok("GET", f"/v1/coupons/{code}/qr"))["qr"]
    payload, _, signature = qr.rpartition("|")
    forged = payload.replace("|LE1|", "|LE2|").replace("|k1|", "|k2|") + "|" + signature
    flipped = qr[:-2] + ("A" if qr[-2] != "A" else "B") + qr[-1]
    before = await state_of(db_url)
    for text in (forged, flipped):
        answer = await one(admin, ask(Kind.COUPON_REDEEM, tid, text, amount=5_000))
        assert (answer.outcome, answer.refusal) == (Outcome.COUPON_UNKNOWN,
                                                    "coupon_qr_signature")  # fmt: skip
    assert await state_of(db_url) == before
    query = await one(admin, ask(Kind.COUPON_QUERY, tid, qr, amount=5_000))
    assert (query.outcome, query.discount) == (Outcome.APPROVED, 1_000)
    await admin.ok("POST", "/v1/coupon-keys/k1/retire")
    retired = await one(admin, ask(Kind.COUPON_REDEEM, tid, qr, amount=5_000))
    assert retired.outcome is Outcome.COUPON_UNKNOWN
    await admin.ok("POST", "/v1/coupon-keys", json={"legal_entity": "LE1", "kid": "k3"})
    fresh = (await admin.ok("GET", f"/v1/coupons/{code}/qr"))["qr"]
    assert (await one(admin, ask(Kind.COUPON_REDEEM, tid, fresh, amount=5_000))).outcome is (
        Outcome.APPROVED)  # fmt: skip


# --- THE RACE ------------------------------------------------------------------------------------


async def test_many_terminals_redeeming_one_code_at_once_exactly_one_wins(
    admin: AdminClient, db_url: str
) -> None:
    code, _ = await setup(admin)
    tids = [await terminal(admin) for _ in range(4)]
    coupons: CouponService = service(admin)
    t0 = await pos(admin).directory.terminal(tids[0])
    assert t0 is not None
    racers = [ask(Kind.COUPON_REDEEM, tids[i % 4], code, amount=5_000) for i in range(20)]
    direct = [ask(Kind.COUPON_REDEEM, tids[0], code, amount=5_000) for _ in range(5)]
    answers = await asyncio.gather(
        *(one(admin, r) for r in racers),
        *(coupons.pos(r, t0, transaction_key(t0, r.batch, r.stan), None) for r in direct),
    )
    outcomes = sorted(str(a.outcome) for a in answers)
    assert outcomes == ["approved"] + ["coupon_used"] * 24, outcomes
    row = await campaign_row(db_url, "TENOFF")
    assert (row["redeemed_count"], row["redeemed_value"], row["store_cost"]) == (1, 1_000, 1_000)
    assert await count(db_url, "coupon_redemptions") == 1
    winner = next(r for r, a in zip([*racers, *direct], answers, strict=True)
                  if a.outcome is Outcome.APPROVED)  # fmt: skip
    assert (await code_row(db_url, code))["redeemed_key"].endswith("/" + winner.stan)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_hold_whose_statement_saw_an_older_campaign_is_decided_afresh(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-statement hold judges the campaign on the snapshot it began with: a campaign
    paused then but active again by the time it is refused is decided by the transaction
    (approved), not answered budget_spent or expired."""
    code, tid = await setup(admin)
    coupons: CouponService = service(admin)
    real = coupons.records.statement_rows

    async def paused_meanwhile(sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        if "INSERT INTO coupon_redemptions" not in sql:  # the read
            return await real(sql, args)
        await sql_execute(db_url, "UPDATE coupon_campaigns SET state = 'paused'")
        try:
            return await real(sql, args)
        finally:
            await sql_execute(db_url, "UPDATE coupon_campaigns SET state = 'active'")

    monkeypatch.setattr(coupons.records, "statement_rows", paused_meanwhile)
    answer = await one(admin, ask(Kind.COUPON_REDEEM, tid, code, amount=5_000))
    assert answer.outcome is Outcome.APPROVED, answer
    row = await campaign_row(db_url, "TENOFF")
    assert (row["redeemed_count"], row["redeemed_value"]) == (1, 1_000)
    assert (await code_row(db_url, code))["state"] == "redeemed"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_hold_whose_statement_was_ended_by_a_deadlock_is_decided_afresh(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, tid = await setup(admin)
    coupons: CouponService = service(admin)

    real = coupons.records.statement_rows

    async def deadlocked(sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        if "INSERT INTO coupon_redemptions" not in sql:  # the read
            return await real(sql, args)
        raise Deadlock

    monkeypatch.setattr(coupons.records, "statement_rows", deadlocked)
    answer = await one(admin, ask(Kind.COUPON_REDEEM, tid, code, amount=5_000))
    assert answer.outcome is Outcome.APPROVED, answer
    assert (await campaign_row(db_url, "TENOFF"))["redeemed_count"] == 1
    assert await count(db_url, "coupon_redemptions") == 1


async def test_many_terminals_reserving_one_code_at_once_exactly_one_holds_it(
    admin: AdminClient, db_url: str
) -> None:
    code, _ = await setup(admin)
    tids = [await terminal(admin) for _ in range(4)]
    racers = [ask(Kind.COUPON_RESERVE, tids[i % 4], code, amount=5_000) for i in range(20)]
    answers = await asyncio.gather(*(pos(admin).handle([r]) for r in racers))
    outcomes = sorted(str(a.outcome) for [a] in answers)
    assert outcomes == ["approved"] + ["coupon_used"] * 19, outcomes
    assert await count(db_url, "coupon_redemptions") == 1
    assert (await code_row(db_url, code))["state"] == "reserved"


# --- instant reward by rule ----------------------------------------------------------------------


async def test_a_qualifying_purchase_earns_one_coupon_of_each_reward_campaign_once(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1", "S2")
    tid = await terminal(admin)
    await campaign(admin, "SPEND100", reward_spend_fen=10_000, holder_only=True)
    await campaign(admin, "SPEND50", reward_spend_fen=5_000, max_issued=1)
    await campaign(admin, "ELSEWHERE", reward_spend_fen=1, store="S2")
    await campaign(admin, "PLAIN")
    buyer = await member(admin)
    pan = await card_of(admin, buyer)
    t = await pos(admin).directory.terminal(tid)
    card = await pos(admin).directory.card(Vault(ADMIN_KEK).card_token(pan))
    assert t is not None and card is not None
    coupons = service(admin)
    key = transaction_key(t, "000001", "000123")
    earned = await coupons.reward_purchase(t, key, card, 12_000)
    assert sorted(e["campaign"] for e in earned) == ["SPEND100", "SPEND50"]
    again = await coupons.reward_purchase(t, key, card, 12_000)
    assert sorted(again, key=str) == sorted(earned, key=str)
    assert await count(db_url, "coupon_codes") == 2
    mine = next(e["code"] for e in earned if e["campaign"] == "SPEND100")
    assert (await code_row(db_url, mine))["member_id"] == buyer
    stranger = await one(admin, ask(Kind.COUPON_QUERY, tid, mine, amount=100))
    assert (stranger.outcome, stranger.refusal) == (Outcome.NOT_PERMITTED, "coupon_not_holder")
    holder = await one(admin, ask(Kind.COUPON_QUERY, tid, mine, amount=100, card=pan))
    assert (holder.outcome, holder.discount, holder.forfeited) == (Outcome.APPROVED, 100, 900)
    other = await coupons.reward_purchase(t, transaction_key(t, "000001", "000124"), card, 12_000)
    assert [e["campaign"] for e in other] == ["SPEND100"]  # SPEND50's budget is used up
    small = await coupons.reward_purchase(t, transaction_key(t, "000001", "000125"), None, 6_000)
    assert small == []
    row = await campaign_row(db_url, "SPEND50")
    assert row["issued_count"] == 1


async def rewarding_campaign_and_card(admin: AdminClient, db_url: str) -> tuple[str, str]:
    """A terminal of S1, a "spend 100.00, get a coupon" campaign, and a member's card with
    500.00 on it: (terminal id, card number)."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "SPEND100", reward_spend_fen=10_000)
    pan = await card_of(admin, await member(admin))
    [card] = (await admin.ok("GET", "/v1/cards", member_id=(await member_of(db_url, pan))))["items"]
    topup = {"amount": 50_000, "tender": "cash", "receipt": "R", "key": "rw"}
    await admin.ok("POST", f"/v1/cards/{card['id']}/topups", json=topup)
    return tid, pan


async def test_a_purchase_at_the_pos_earns_its_reward_once_and_its_reversal_voids_it(
    admin: AdminClient, db_url: str
) -> None:
    """The campaign card at the till: the approved purchase carries the coupon it earned
    (a resend the same one); the purchase's reversal voids it while it is unused, and a
    reward already used stays used when its purchase is reversed."""
    tid, pan = await rewarding_campaign_and_card(admin, db_url)
    sale = ask(Kind.PURCHASE, tid, card=pan, amount=12_000)
    first = await one(admin, sale)
    assert first.outcome is Outcome.APPROVED and len(first.rewards) == 1, first
    [reward] = first.rewards
    assert (await one(admin, sale)).rewards == (reward,)  # a resend: the same coupon
    small = await one(admin, ask(Kind.PURCHASE, tid, card=pan, amount=9_999))
    assert small.rewards == ()
    reverse = PosRequest(kind=Kind.REVERSE, terminal=tid, batch="000001", stan=sale.stan)
    assert (await one(admin, reverse)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, reward))["state"] == "voided"
    voided = await one(admin, ask(Kind.COUPON_QUERY, tid, reward, amount=1_000))
    assert (voided.outcome, voided.refusal) == (Outcome.NOT_PERMITTED, "coupon_inactive")

    second_sale = ask(Kind.PURCHASE, tid, card=pan, amount=10_000)
    [used] = (await one(admin, second_sale)).rewards
    redeem = await one(admin, ask(Kind.COUPON_REDEEM, tid, used, amount=2_000))
    assert redeem.outcome is Outcome.APPROVED
    undo = PosRequest(kind=Kind.REVERSE, terminal=tid, batch="000001", stan=second_sale.stan)
    assert (await one(admin, undo)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, used))["state"] == "redeemed"


async def test_a_reversed_purchase_keeps_no_reward_whatever_the_order(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purchase's reward never outlives its reversal: a resend after the 0400 (the
    campaign started in between, so the resend would be the first to qualify) is declined
    and issues nothing; and a 0400 taken while the purchase's reward was being issued (its
    hook found nothing to void yet) leaves the reward voided."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    pan = await card_of(admin, await member(admin))
    [card] = (await admin.ok("GET", "/v1/cards", member_id=(await member_of(db_url, pan))))["items"]
    topup = {"amount": 50_000, "tender": "cash", "receipt": "R", "key": "rw"}
    await admin.ok("POST", f"/v1/cards/{card['id']}/topups", json=topup)
    sale = ask(Kind.PURCHASE, tid, card=pan, amount=12_000)
    assert (await one(admin, sale)).rewards == ()  # no campaign yet
    await campaign(admin, "SPEND100", reward_spend_fen=10_000)
    reverse = PosRequest(kind=Kind.REVERSE, terminal=tid, batch="000001", stan=sale.stan)
    assert (await one(admin, reverse)).outcome is Outcome.APPROVED
    again = await one(admin, sale)
    assert (again.outcome, again.rewards) == (Outcome.REVERSED_BEFORE_ARRIVAL, ())
    assert await sql_rows(db_url, "SELECT code FROM coupon_codes") == []

    host = pos(admin)
    real = host.rewards
    assert real is not None
    racing = ask(Kind.PURCHASE, tid, card=pan, amount=12_000)

    async def reversed_meanwhile(*args: Any) -> Any:
        undo = PosRequest(kind=Kind.REVERSE, terminal=tid, batch="000001", stan=racing.stan)
        assert (await one(admin, undo)).outcome is Outcome.APPROVED  # its hook: nothing yet
        return await real(*args)

    monkeypatch.setattr(host, "rewards", reversed_meanwhile)
    raced = await one(admin, racing)
    assert (raced.outcome, raced.rewards) == (Outcome.APPROVED, ())
    [row] = await sql_rows(db_url, "SELECT state FROM coupon_codes")
    assert row["state"] == "voided"


async def test_a_void_of_a_rewarded_purchase_voids_its_unused_reward(
    admin: AdminClient, db_url: str
) -> None:
    """A void cancels the purchase, so its instant reward goes with it (while unused), as
    with a reversal; the void's resend changes nothing more; the void's own reversal (the
    terminal owes one when the void got no reply) puts the purchase back, and its reward
    with it. A refund leaves the reward."""
    tid, pan = await rewarding_campaign_and_card(admin, db_url)
    sale = ask(Kind.PURCHASE, tid, card=pan, amount=12_000)
    [reward] = (await one(admin, sale)).rewards
    void = ask(Kind.VOID, tid, card=pan, amount=12_000, original_batch="000001",
               original_stan=sale.stan)  # fmt: skip
    assert (await one(admin, void)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, reward))["state"] == "voided"
    again = await one(admin, void)
    assert (again.outcome, again.replayed) == (Outcome.APPROVED, True)
    late = await one(admin, ask(Kind.COUPON_REDEEM, tid, reward, amount=2_000))
    assert (late.outcome, late.refusal) == (Outcome.NOT_PERMITTED, "coupon_inactive")
    undo = PosRequest(kind=Kind.REVERSE, terminal=tid, batch="000001", stan=void.stan)
    assert (await one(admin, undo)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, reward))["state"] == "issued"
    assert (await one(admin, undo)).outcome is Outcome.APPROVED  # again: changes nothing
    assert (await code_row(db_url, reward))["state"] == "issued"
    # The cashier voids the reinstated purchase again: the reward goes again, and comes
    # back with that void's reversal (the purchase found through the chain of reversals).
    void_again = ask(Kind.VOID, tid, card=pan, amount=12_000, original_batch="000001",
                     original_stan=sale.stan)  # fmt: skip
    assert (await one(admin, void_again)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, reward))["state"] == "voided"
    undo_again = PosRequest(kind=Kind.REVERSE, terminal=tid, batch="000001", stan=void_again.stan)
    assert (await one(admin, undo_again)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, reward))["state"] == "issued"
    kept = ask(Kind.PURCHASE, tid, card=pan, amount=12_000)
    answer = await one(admin, kept)
    [other] = answer.rewards
    refund = ask(Kind.REFUND, tid, card=pan, amount=12_000, rrn=answer.rrn)
    assert (await one(admin, refund)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, other))["state"] == "issued"


async def test_a_key_used_for_one_function_is_answered_94_for_another(
    admin: AdminClient, db_url: str
) -> None:
    """A key (terminal, batch, STAN) is one transaction whatever function it is sent with:
    a coupon under a purchase's key, and a purchase under a coupon's key, are answered 94 and
    change nothing; a redeem under its own reservation's key is the same function; a resend
    is answered as before; and the 0400 of the key undoes only what was done under it."""
    tid, pan = await rewarding_campaign_and_card(admin, db_url)
    await campaign(admin, "TENOFF")
    first, second, third = await codes(admin, "TENOFF", 3)
    balance = (await one(admin, ask(Kind.INQUIRY, tid, card=pan))).balance
    sale = ask(Kind.PURCHASE, tid, card=pan, amount=1_000)
    assert (await one(admin, sale)).outcome is Outcome.APPROVED
    reused = await one(admin, ask(Kind.COUPON_REDEEM, tid, first, amount=2_000, stan=sale.stan))
    assert reused.outcome is Outcome.DUPLICATE_MISMATCH
    assert (await code_row(db_url, first))["state"] == "issued"
    coupon = ask(Kind.COUPON_REDEEM, tid, second, amount=2_000)
    assert (await one(admin, coupon)).outcome is Outcome.APPROVED
    paid = await one(admin, ask(Kind.PURCHASE, tid, card=pan, amount=700, stan=coupon.stan))
    assert paid.outcome is Outcome.DUPLICATE_MISMATCH
    after = (await one(admin, ask(Kind.INQUIRY, tid, card=pan))).balance
    assert balance is not None and after == balance - 1_000
    resent = await one(admin, coupon)
    assert (resent.outcome, resent.replayed) == (Outcome.APPROVED, True)
    held = ask(Kind.COUPON_RESERVE, tid, third, amount=2_000)
    assert (await one(admin, held)).outcome is Outcome.APPROVED
    confirm = ask(Kind.COUPON_REDEEM, tid, third, amount=2_000, stan=held.stan)
    assert (await one(admin, confirm)).outcome is Outcome.APPROVED
    undo = PosRequest(kind=Kind.REVERSE, terminal=tid, batch="000001", stan=coupon.stan)
    assert (await one(admin, undo)).outcome is Outcome.APPROVED
    assert (await code_row(db_url, second))["state"] == "issued"
    assert (await one(admin, ask(Kind.INQUIRY, tid, card=pan))).balance == after


async def test_the_claims_are_read_only_for_a_terminal_that_claimed_in_its_open_batch(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call reads its money keys against the claims only for terminals that may have one
    in their open batch (`pos_terminals.claims_batch`): none before a coupon, then every
    time, also once the terminal is read again from the database (a restart); and a
    terminal whose mark is not known (NULL: registered before migration 0016) is read."""
    tid, pan = await rewarding_campaign_and_card(admin, db_url)
    await campaign(admin, "TENOFF")
    [code] = await codes(admin, "TENOFF", 1)
    reads: list[str] = []
    real = Unit._rows

    async def counted(self: Unit, statement: Statement, params: dict[str, Any]) -> Any:
        if "FROM pos_claims" in str(statement.clause):
            reads.append(str(statement.clause))
        return await real(self, statement, params)

    monkeypatch.setattr(Unit, "_rows", counted)
    assert (await one(admin, ask(Kind.PURCHASE, tid, card=pan, amount=100))).outcome is (
        Outcome.APPROVED
    )
    assert reads == []  # no claim in its open batch: nothing to read
    coupon = ask(Kind.COUPON_REDEEM, tid, code, amount=2_000)
    assert (await one(admin, coupon)).outcome is Outcome.APPROVED
    [mark] = await sql_rows(db_url, "SELECT claims_batch FROM pos_terminals WHERE tid = :t", t=tid)
    assert mark["claims_batch"] == "0/000001"
    reads.clear()
    reused = ask(Kind.PURCHASE, tid, card=pan, amount=700, stan=coupon.stan)
    assert (await one(admin, reused)).outcome is Outcome.DUPLICATE_MISMATCH
    assert len(reads) == 1
    pos(admin).directory.forget_terminal(tid)  # read again from the database, as at a start
    assert (await one(admin, reused)).outcome is Outcome.DUPLICATE_MISMATCH
    await sql_execute(db_url, f"UPDATE pos_terminals SET claims_batch = NULL WHERE tid = '{tid}'")  # noqa: S608
    pos(admin).directory.forget_terminal(tid)
    reads.clear()
    assert (await one(admin, reused)).outcome is Outcome.DUPLICATE_MISMATCH
    assert len(reads) == 1


async def member_of(db_url: str, pan: str) -> int:
    token = Vault(ADMIN_KEK).card_token(pan)
    [row] = await sql_rows(db_url, "SELECT member_id FROM cards WHERE token = :t", t=token)
    return int(row["member_id"])


async def test_coupons_of_one_sale_combine_only_when_every_one_is_stackable(
    admin: AdminClient, db_url: str
) -> None:
    """The coupons a terminal presents under one sale number are one transaction: a
    non-stackable coupon joins no other, stackable ones combine; another sale is free."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "SOLO")
    await campaign(admin, "DUO1", stackable=True)
    await campaign(admin, "DUO2", stackable=True)
    solo, solo2 = await codes(admin, "SOLO", 2)
    [duo1] = await codes(admin, "DUO1", 1)
    [duo2] = await codes(admin, "DUO2", 1)

    def in_sale(coupon: str, sale: str) -> PosRequest:
        return ask(Kind.COUPON_REDEEM, tid, coupon, amount=50_000, sale=sale)

    assert (await one(admin, in_sale(duo1, "S-1"))).outcome is Outcome.APPROVED
    assert (await one(admin, in_sale(duo2, "S-1"))).outcome is Outcome.APPROVED  # both stack
    joined = await one(admin, in_sale(solo, "S-1"))  # one per transaction: not with others
    assert (joined.outcome, joined.refusal) == (Outcome.NOT_PERMITTED, "coupon_not_stackable")
    assert (await one(admin, in_sale(solo, "S-2"))).outcome is Outcome.APPROVED
    second = await one(admin, in_sale(solo2, "S-2"))  # nothing joins a non-stackable one
    assert (second.outcome, second.refusal) == (Outcome.NOT_PERMITTED, "coupon_not_stackable")
    assert (await one(admin, in_sale(solo2, "S-3"))).outcome is Outcome.APPROVED
    assert (await code_row(db_url, solo))["state"] == "redeemed"


async def test_an_enrolled_only_campaign_rewards_only_its_enrolled_members(
    admin: AdminClient, db_url: str
) -> None:
    """The campaign card: members are enrolled into a campaign; its instant reward goes to
    their qualifying purchases only; withdrawn, they earn no more. Refusals change nothing."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "CLUB", reward_spend_fen=5_000, enrolled_only=True)
    t = await pos(admin).directory.terminal(tid)
    assert t is not None
    inside, outside = await member(admin), await member(admin)
    cards = {}
    for who in (inside, outside):
        pan = await card_of(admin, who)
        cards[who] = await pos(admin).directory.card(Vault(ADMIN_KEK).card_token(pan))
    path = "/v1/coupon-campaigns/CLUB/enrolments"
    made = await admin.ok("POST", path, json={"member_ids": [inside]})
    assert (made["enrolled"], made["already"]) == (1, 0)
    again = await admin.ok("POST", path, json={"member_ids": [inside]})
    assert (again["enrolled"], again["already"]) == (0, 1)
    before = await count(db_url, "coupon_enrolments")
    status, body = await admin.call("POST", path, json={"member_ids": [inside, 999_999]})
    assert (status, body["error"]["code"]) == (404, "member_not_found")
    assert await count(db_url, "coupon_enrolments") == before
    listed = await admin.ok("GET", path)
    assert [e["member_id"] for e in listed["items"]] == [inside]

    coupons = service(admin)

    def key(stan: str) -> str:
        return transaction_key(t, "000001", stan)

    assert len(await coupons.reward_purchase(t, key("000201"), cards[inside], 6_000)) == 1
    assert await coupons.reward_purchase(t, key("000202"), cards[outside], 6_000) == []
    await admin.ok("DELETE", f"{path}/{inside}")
    status, body = await admin.call("DELETE", f"{path}/{inside}")
    assert (status, body["error"]["code"]) == (404, "enrolment_not_found")
    assert await coupons.reward_purchase(t, key("000203"), cards[inside], 6_000) == []
    audit = await sql_rows(db_url, "SELECT action FROM org_audit_log WHERE action LIKE "
                           "'coupon.%rol%' OR action = 'coupon.withdraw' ORDER BY id")  # fmt: skip
    assert [a["action"] for a in audit] == ["coupon.enrol", "coupon.withdraw"]


# --- audit fixes: instant rewards by rule ------------------------------------------------------


async def grant_used(db_url: str, grant: int) -> int:
    [row] = await sql_rows(db_url, "SELECT used_count FROM org_grants WHERE id = :g", g=grant)
    return int(row["used_count"])


async def test_a_store_campaigns_reward_spends_its_stores_coupon_grant_and_stops_without_it(
    admin: AdminClient, db_url: str
) -> None:
    """An instant reward of a store's campaign is an issuance of the store: it spends HQ's
    `coupon` grant as the store officer's issuance does, and gets no reward once the budget
    is used or the grant revoked (the sale stands). A group campaign needs no grant."""
    tid, pan = await rewarding_campaign_and_card(admin, db_url)  # SPEND100: HQ's
    made = await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "coupon",
                          "budget_count": 1})  # fmt: skip
    await campaign(admin, "S1SPEND", store="S1", reward_spend_fen=5_000)
    t = await pos(admin).directory.terminal(tid)
    assert t is not None
    coupons = service(admin)
    key = transaction_key(t, "000001", "000301")
    earned = await coupons.reward_purchase(t, key, None, 6_000)
    assert [e["campaign"] for e in earned] == ["S1SPEND"]
    assert await grant_used(db_url, made["id"]) == 1
    assert await coupons.reward_purchase(t, key, None, 6_000) == earned  # a resend: no spend
    assert await grant_used(db_url, made["id"]) == 1
    before = await state_of(db_url)
    spent = await coupons.reward_purchase(t, transaction_key(t, "000001", "000302"), None, 6_000)
    assert spent == []  # the grant's budget is used: no reward, nothing written
    assert await state_of(db_url) == before
    sale = await one(admin, ask(Kind.PURCHASE, tid, card=pan, amount=12_000))
    assert sale.outcome is Outcome.APPROVED  # the sale stands, with the group's reward only
    assert [(await code_row(db_url, c))["campaign"] for c in sale.rewards] == ["SPEND100"]
    again = await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "coupon"})
    more = await coupons.reward_purchase(t, transaction_key(t, "000001", "000303"), None, 6_000)
    assert [e["campaign"] for e in more] == ["S1SPEND"]
    await admin.ok("DELETE", f"/v1/grants/{again['id']}")  # HQ stops the store's campaign
    assert await coupons.reward_purchase(t, transaction_key(t, "000001", "000304"), None,
                                         6_000) == []  # fmt: skip
    assert (await campaign_row(db_url, "S1SPEND"))["issued_count"] == 2


async def test_a_paused_reward_campaign_issues_no_reward_even_from_a_stale_cache(
    admin: AdminClient, db_url: str
) -> None:
    """Issuance by rule needs the campaign active when it issues, whatever the reward
    campaigns cached for the till say (another server paused it meanwhile)."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "SPEND50", reward_spend_fen=5_000)
    t = await pos(admin).directory.terminal(tid)
    assert t is not None
    coupons = service(admin)
    first = await coupons.reward_purchase(t, transaction_key(t, "000001", "000401"), None, 6_000)
    assert len(first) == 1  # the reward campaigns are cached now
    await sql_execute(db_url, "UPDATE coupon_campaigns SET state = 'paused', updated_at_ms ="
                      " updated_at_ms + 1 WHERE code = 'SPEND50'")  # fmt: skip
    before = await state_of(db_url)
    late = await coupons.reward_purchase(t, transaction_key(t, "000001", "000402"), None, 6_000)
    assert late == []
    assert await state_of(db_url) == before


async def test_a_campaign_change_forgets_the_cached_reward_campaigns_after_it_commits(
    admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purchase that reads the reward campaigns while a pause is being written caches the
    campaign as active; the change forgets the cache once it committed, so the till sees the
    pause at once (not COUPON_REWARD_CACHE_S later)."""
    await admin.org("LE1", "S1")
    await campaign(admin, "SPEND50", reward_spend_fen=5_000)
    coupons = service(admin)
    real = coupons._granted

    async def granted_then_read(*args: Any) -> None:
        await real(*args)
        await coupons._rewarding_of("LE1")  # a purchase's read inside the change's transaction

    monkeypatch.setattr(coupons, "_granted", granted_then_read)
    await admin.ok("PATCH", "/v1/coupon-campaigns/SPEND50", json={"state": "paused"})
    assert [r["code"] for r in await coupons._rewarding_of("LE1")] == []
