"""A member merge keeps the duplicate's coupons (SQLite and PostgreSQL): its holder-only codes
redeem by its former cards, what it redeemed counts against the survivor's per-member and
per-day limits, its campaign enrolments reward the merged cards (one enrolment a campaign
when both were enrolled), and all of it moves in the merge's transaction or not at all."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cardcore.cards.model import Kind, Outcome, transaction_key
from cardcore.members.http import MEMBERS_KEY
from cardcore.org.model import Refused
from cardcore.records import Unit
from cardcore.vault import Vault
from tests.conftest import ADMIN_KEK
from tests.helpers import AdminClient, sql_rows
from tests.integration.test_coupons_admin import campaign, codes, count, member, service
from tests.integration.test_coupons_pos import ask, card_of, one, pos, terminal


async def merge(admin: AdminClient, survivor: int, duplicate: int) -> dict[str, Any]:
    merged: dict[str, Any] = await admin.ok(
        "POST", f"/v1/members/{survivor}/merge", json={"duplicate_id": duplicate}
    )
    return merged


async def owners(db_url: str, table: str) -> set[int]:
    rows = await sql_rows(db_url, f"SELECT member_id FROM {table}")  # noqa: S608 - the test's own tables
    return {int(r["member_id"]) for r in rows if r["member_id"] is not None}


async def merge_audit(db_url: str) -> Any:
    """The coupon rows the merge's `member.merge` audit row says moved."""
    query = "SELECT after FROM org_audit_log WHERE action = 'member.merge'"
    [audit] = await sql_rows(db_url, query)
    return json.loads(audit["after"])["coupons"]


async def test_a_merged_duplicates_holder_only_coupon_redeems_by_its_former_card(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "MINE", holder_only=True)
    survivor, duplicate = await member(admin), await member(admin)
    await card_of(admin, survivor)
    former = await card_of(admin, duplicate)
    [mine] = (await admin.ok("POST", "/v1/coupon-campaigns/MINE/issues",
                             json={"member_ids": [duplicate]}))["codes"]  # fmt: skip
    await merge(admin, survivor, duplicate)
    used = await one(admin, ask(Kind.COUPON_REDEEM, tid, mine["code"], amount=5_000, card=former))
    assert (used.outcome, used.refusal) == (Outcome.APPROVED, "")
    assert await owners(db_url, "coupon_codes") == {survivor}


async def test_what_the_duplicate_redeemed_counts_against_the_survivors_member_limits(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "ONCE", per_member_max=1)
    await campaign(admin, "DAILY", per_member_per_day_max=1)
    survivor, duplicate = await member(admin), await member(admin)
    own = await card_of(admin, survivor)
    former = await card_of(admin, duplicate)
    once, daily = await codes(admin, "ONCE", 3), await codes(admin, "DAILY", 3)
    for code in (once[0], daily[0]):
        first = await one(admin, ask(Kind.COUPON_REDEEM, tid, code, amount=5_000, card=former))
        assert first.outcome is Outcome.APPROVED
    merged = await merge(admin, survivor, duplicate)
    for pan, i in ((own, 1), (former, 2)):
        again = await one(admin, ask(Kind.COUPON_REDEEM, tid, once[i], amount=5_000, card=pan))
        assert (again.outcome, again.refusal) == (Outcome.NOT_PERMITTED, "coupon_member_limit")
        today = await one(admin, ask(Kind.COUPON_REDEEM, tid, daily[i], amount=5_000, card=pan))
        assert (today.outcome, today.refusal) == (Outcome.NOT_PERMITTED, "coupon_daily_limit")
    assert merged["id"] == survivor
    assert await owners(db_url, "coupon_redemptions") == {survivor}
    assert await merge_audit(db_url) == {
        "codes": 0, "redemptions": 2, "enrolments": 0, "enrolments_dropped": 0,
    }  # fmt: skip


async def test_the_duplicates_enrolment_rewards_a_purchase_on_the_merged_card(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "CLUB", reward_spend_fen=5_000, enrolled_only=True)
    survivor, duplicate = await member(admin), await member(admin)
    await card_of(admin, survivor)
    pan = await card_of(admin, duplicate)
    await admin.ok("POST", "/v1/coupon-campaigns/CLUB/enrolments",
                   json={"member_ids": [duplicate]})  # fmt: skip
    await merge(admin, survivor, duplicate)
    t = await pos(admin).directory.terminal(tid)
    card = await pos(admin).directory.card(Vault(ADMIN_KEK).card_token(pan))
    assert t is not None and card is not None
    key = transaction_key(t, "000001", "000301")
    [earned] = await service(admin).reward_purchase(t, key, card, 6_000)
    assert earned["campaign"] == "CLUB"
    listed = await admin.ok("GET", "/v1/coupon-campaigns/CLUB/enrolments")
    assert [e["member_id"] for e in listed["items"]] == [survivor]
    assert await owners(db_url, "coupon_codes") == {survivor}


async def test_a_merge_of_two_enrolled_members_leaves_one_enrolment(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin, "CLUB", reward_spend_fen=5_000, enrolled_only=True)
    await campaign(admin, "SOLO", reward_spend_fen=5_000, enrolled_only=True)
    survivor, duplicate = await member(admin), await member(admin)
    both = {"member_ids": [survivor, duplicate]}
    await admin.ok("POST", "/v1/coupon-campaigns/CLUB/enrolments", json=both)
    await admin.ok("POST", "/v1/coupon-campaigns/SOLO/enrolments",
                   json={"member_ids": [duplicate]})  # fmt: skip
    [kept] = await sql_rows(db_url, "SELECT enrolled_at_ms FROM coupon_enrolments "
                            "WHERE campaign = 'CLUB' AND member_id = :m", m=survivor)  # fmt: skip
    await merge(admin, survivor, duplicate)
    rows = await sql_rows(db_url, "SELECT campaign, member_id, enrolled_at_ms "
                          "FROM coupon_enrolments ORDER BY campaign")  # fmt: skip
    assert [(r["campaign"], r["member_id"]) for r in rows] == [
        ("CLUB", survivor), ("SOLO", survivor),
    ]  # fmt: skip
    assert rows[0]["enrolled_at_ms"] == kept["enrolled_at_ms"]  # the survivor's own one
    moved = await merge_audit(db_url)
    assert (moved["enrolments"], moved["enrolments_dropped"]) == (1, 1)


async def test_a_merge_refused_after_its_coupon_side_moves_nothing(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coupon side runs in the merge's transaction: a merge refused after it leaves
    the cards, codes, redemptions and enrolments where they were."""
    await admin.org("LE1", "S1")
    tid = await terminal(admin)
    await campaign(admin, "MINE", holder_only=True, per_member_max=2)
    survivor, duplicate = await member(admin), await member(admin)
    former = await card_of(admin, duplicate)
    made = (await admin.ok("POST", "/v1/coupon-campaigns/MINE/issues",
                           json={"member_ids": [duplicate, survivor]}))["codes"]  # fmt: skip
    mine = next(c for c in made if c["member_id"] == duplicate)
    used = await one(admin, ask(Kind.COUPON_RESERVE, tid, mine["code"], amount=5_000, card=former))
    assert used.outcome is Outcome.APPROVED
    await admin.ok("POST", "/v1/coupon-campaigns/MINE/enrolments",
                   json={"member_ids": [duplicate]})  # fmt: skip
    members = admin.app[MEMBERS_KEY]
    real: Callable[[Unit, int, int], Awaitable[dict[str, int]]] = members.coupons_merge

    async def then_refused(uow: Unit, survivor_id: int, duplicate_id: int) -> dict[str, int]:
        moved = await real(uow, survivor_id, duplicate_id)
        assert moved["codes"] == moved["redemptions"] == moved["enrolments"] == 1
        raise Refused("conflict", "member_changed", "refused after the coupons moved")

    monkeypatch.setattr(members, "coupons_merge", then_refused)
    status, body = await admin.call(
        "POST", f"/v1/members/{survivor}/merge", json={"duplicate_id": duplicate}
    )
    assert (status, body["error"]["code"]) == (409, "member_changed")
    for table in ("cards", "coupon_redemptions", "coupon_enrolments"):
        assert await owners(db_url, table) == {duplicate}, table
    assert await count(db_url, "coupon_codes", member_id=duplicate) == 1
    gone = await admin.ok("GET", f"/v1/members/{duplicate}")
    assert gone["state"] == "active"
