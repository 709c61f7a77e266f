"""A points redemption that issues a coupon (`coupon_campaign`), on SQLite and PostgreSQL,
through the admin API and the POS: the points spent and one holder code issued under the
redemption's key (a retry answers the same code and spends nothing more), a campaign past its
budget refuses the redemption with nothing spent, a spend the ledger refuses voids the code
it issued, and the reversal voids an unused code and gives the points back, or is refused
while the code was used (a reward given stays given).
"""

from __future__ import annotations

from typing import Any

import pytest

from cardcore.cards.model import Kind, Outcome
from cardcore.org.model import Refused
from cardcore.points.http import POINTS_KEY
from cardcore.points.service import PointsUnavailable
from tests.helpers import AdminClient, sql_rows
from tests.integration.test_coupons_admin import campaign, campaign_row, count
from tests.integration.test_points_admin import earned
from tests.integration.test_points_pos import Shop


async def shop_with_points(admin: AdminClient, **extra: Any) -> tuple[Shop, dict[str, Any], str]:
    """The points shop, a holder-only coupon campaign GIFT of LE1, and a member's card with
    500 points: (shop, card, the card's redemptions path)."""
    shop = await Shop(admin).make()
    await campaign(admin, "GIFT", holder_only=True, **extra)
    card = await shop.card()
    await earned(shop, card, 50_000)
    return shop, card, f"/v1/cards/{card['id']}/points/redemptions"


async def codes_of(db_url: str) -> list[dict[str, Any]]:
    return await sql_rows(db_url, "SELECT * FROM coupon_codes ORDER BY code")


async def member_of(db_url: str, card: dict[str, Any]) -> int:
    [row] = await sql_rows(db_url, "SELECT member_id FROM cards WHERE id = :i", i=card["id"])
    return int(row["member_id"])


async def test_a_redemption_with_a_campaign_spends_the_points_and_issues_one_holder_code(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, path = await shop_with_points(admin)
    body = {"points": 120, "reward": "GIFT", "key": "r1", "coupon_campaign": "GIFT"}
    status, made = await admin.call("POST", path, json=body)
    assert status == 201, made
    assert (made["points_balance"], made["coupon_campaign"]) == (380, "GIFT")
    [row] = await codes_of(db_url)
    assert (made["coupon"], row["state"], row["source"]) == (row["code"], "issued", "points")
    assert row["member_id"] == await member_of(db_url, card)
    # The code is the member's: redeemed at the POS with the card, refused without it.
    tid = shop.tids["S1"]
    stranger = await shop.one(shop.request(Kind.COUPON_QUERY, None, coupon=made["coupon"],
                                           amount=5_000))  # fmt: skip
    assert (stranger.outcome, stranger.refusal) == (Outcome.NOT_PERMITTED, "coupon_not_holder")
    redeemed = await shop.one(shop.request(Kind.COUPON_REDEEM, card, coupon=made["coupon"],
                                           amount=5_000))  # fmt: skip
    assert (redeemed.outcome, redeemed.discount) == (Outcome.APPROVED, 1_000), tid
    # A retry answers the same code and spends nothing more.
    status, again = await admin.call("POST", path, json=body)
    assert (status, again["replayed"], again["coupon"]) == (200, True, made["coupon"])
    assert (await shop.points(card))["balance"] == 380
    assert await count(db_url, "coupon_codes") == 1
    assert (await campaign_row(db_url, "GIFT"))["issued_count"] == 1
    # The same key for another campaign, or none, names another redemption.
    await campaign(admin, "OTHER")
    for changed in ({**body, "coupon_campaign": "OTHER"}, {k: body[k] for k in body
                                                           if k != "coupon_campaign"}):  # fmt: skip
        got, answer = await admin.call("POST", path, json=changed)
        assert (got, answer["error"]["code"]) == (409, "key_reused"), changed
    assert await count(db_url, "coupon_codes") == 1


async def test_a_campaign_past_its_budget_refuses_the_redemption_and_spends_nothing(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, path = await shop_with_points(admin, max_issued=1)
    first = {"points": 100, "reward": "GIFT", "key": "r1", "coupon_campaign": "GIFT"}
    await admin.ok("POST", path, json=first)
    before = await shop.points(card), await codes_of(db_url)
    got, answer = await admin.call("POST", path, json={**first, "key": "r2"})
    assert (got, answer["error"]["code"], answer["error"]["field"]) == (
        409, "campaign_budget_exceeded", "coupon_campaign")  # fmt: skip
    assert (await shop.points(card), await codes_of(db_url)) == before
    assert before[0]["balance"] == 400
    # A card without a member cannot hold a holder-only code: refused, nothing spent.
    await campaign(admin, "MORE", holder_only=True)
    await admin.ok("POST", "/v1/card-classes", json={"code": "ANON", "name": "Anonymous",
                   "named": False, "points_program": "CLUB"})  # fmt: skip
    bare = await admin.ok("POST", "/v1/cards", json={"class_code": "ANON", "store": "S1"})
    await admin.ok("POST", f"/v1/cards/{bare['id']}/topups", json={
        "amount": 50_000, "tender": "cash", "receipt": "R1", "key": "bare"})  # fmt: skip
    await earned(shop, bare, 10_000)
    bare_path = f"/v1/cards/{bare['id']}/points/redemptions"
    got, answer = await admin.call("POST", bare_path, json={**first, "coupon_campaign": "MORE"})
    assert (got, answer["error"]["code"]) == (409, "coupon_needs_member")
    assert (await shop.points(bare))["balance"] == 100
    assert await count(db_url, "coupon_codes", campaign="MORE") == 0


async def test_a_spend_the_ledger_refuses_voids_the_code_it_issued(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop, card, path = await shop_with_points(admin)
    points = admin.app[POINTS_KEY]

    async def refuse(_ops: Any) -> Any:
        raise Refused("conflict", "points_insufficient", "the lots moved meanwhile", "points")

    body = {"points": 100, "reward": "GIFT", "key": "r1", "coupon_campaign": "GIFT"}
    with monkeypatch.context() as patched:
        patched.setattr(points, "_submit", refuse)
        got, answer = await admin.call("POST", path, json=body)
    assert (got, answer["error"]["code"]) == (409, "points_insufficient")
    [row] = await codes_of(db_url)
    assert row["state"] == "voided"
    assert (await shop.points(card))["balance"] == 500
    # A retry under the key that the ledger takes: its points buy that code, live again
    # (it was never answered), never a void one; and a resend changes nothing more.
    for _ in range(2):
        made = await admin.ok("POST", path, json=body)
        assert (made["coupon"], made["points_balance"]) == (row["code"], 400)
        [again] = await codes_of(db_url)
        assert again["state"] == "issued"


async def test_a_redemption_whose_spend_went_unheard_keeps_its_one_code_or_voids_it(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger did not answer the spend (503) after the code was issued: a retry under
    the key answers that same code and spends once; when the points are gone by the retry,
    the retry is refused and the code voided, never left live without points spent."""
    shop, card, path = await shop_with_points(admin)
    points = admin.app[POINTS_KEY]
    real_submit = points._submit

    async def unheard(_ops: Any) -> Any:
        raise PointsUnavailable("the ledger did not answer")

    body = {"points": 100, "reward": "GIFT", "key": "r1", "coupon_campaign": "GIFT"}
    with monkeypatch.context() as patched:
        patched.setattr(points, "_submit", unheard)
        got, _ = await admin.call("POST", path, json=body)
    assert got == 503
    [issued] = await codes_of(db_url)
    assert issued["state"] == "issued"
    made = await admin.ok("POST", path, json=body)  # the retry: the same code, spent once
    assert (made["coupon"], made["points_balance"]) == (issued["code"], 400)
    assert len(await codes_of(db_url)) == 1
    # Another redemption unheard, then the points spent elsewhere before its retry.
    body2 = {**body, "key": "r2", "points": 400}
    with monkeypatch.context() as patched:
        patched.setattr(points, "_submit", unheard)
        got, _ = await admin.call("POST", path, json=body2)
    assert got == 503
    assert points._submit == real_submit
    spent = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=300))
    assert spent.outcome is Outcome.APPROVED
    got, answer = await admin.call("POST", path, json=body2)
    assert (got, answer["error"]["code"]) == (409, "points_insufficient")
    states = sorted(r["state"] for r in await codes_of(db_url))
    assert states == ["issued", "voided"]  # r1's code stays; r2's never stood
    without = {k: v for k, v in body2.items() if k != "coupon_campaign"}
    got, answer = await admin.call("POST", path, json=without)  # the key named a coupon
    assert (got, answer["error"]["code"]) == (409, "key_reused"), answer


async def test_the_reversal_voids_an_unused_code_and_gives_the_points_back(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, path = await shop_with_points(admin)
    body = {"points": 150, "reward": "GIFT", "key": "r1", "coupon_campaign": "GIFT"}
    made = await admin.ok("POST", path, json=body)
    undone = await admin.ok("POST", f"{path}/r1/reversal")
    assert (undone["coupon"], undone["points_balance"]) == (made["coupon"], 500)
    [row] = await codes_of(db_url)
    assert row["state"] == "voided"
    late = await shop.one(shop.request(Kind.COUPON_REDEEM, card, coupon=made["coupon"],
                                       amount=5_000))  # fmt: skip
    assert (late.outcome, late.refusal) == (Outcome.NOT_PERMITTED, "coupon_inactive")
    again = await admin.ok("POST", f"{path}/r1/reversal")
    assert (again["replayed"], again["points_balance"]) == (True, 500)
    got, answer = await admin.call("POST", path, json=body)
    assert (got, answer["error"]["code"]) == (409, "redemption_reversed")
    assert await count(db_url, "coupon_codes") == 1


async def test_the_reversal_of_a_redemption_whose_code_was_used_is_refused(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, path = await shop_with_points(admin)
    body = {"points": 150, "reward": "GIFT", "key": "r1", "coupon_campaign": "GIFT"}
    made = await admin.ok("POST", path, json=body)
    used = await shop.one(shop.request(Kind.COUPON_REDEEM, card, coupon=made["coupon"],
                                       amount=5_000))  # fmt: skip
    assert used.outcome is Outcome.APPROVED
    got, answer = await admin.call("POST", f"{path}/r1/reversal")
    assert (got, answer["error"]["code"]) == (409, "coupon_used")
    [row] = await codes_of(db_url)
    assert row["state"] == "redeemed"
    assert (await shop.points(card))["balance"] == 350
