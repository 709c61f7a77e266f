"""Deleting a member whose cards hold points, on SQLite and PostgreSQL, through the whole host
app: points are value (they redeem for money at the POS), so a delete is refused
`409 member_has_points` while a live card's holder has points to use, usable or pending, in
any program, and changes nothing; once they are redeemed or clawed back the member can go,
and a points debt alone (owed by the member) does not keep it. The check runs under the
cards' account locks: an earning in flight when the delete comes is seen."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from cardcore.cards.model import Kind, Outcome, PosResult
from cardcore.points.http import POINTS_KEY
from tests.helpers import AdminClient
from tests.integration.test_members_api import call, ok, snapshot
from tests.integration.test_points_api import PROGRAM
from tests.integration.test_points_pos import Shop

_mobiles = itertools.count(1)
_keys = itertools.count(1)


async def points_card(shop: Shop) -> dict[str, Any]:
    """A member of S1 and its card of class PTS (earning in CLUB), holding no money."""
    admin = shop.admin
    mobile = f"136{next(_mobiles):08d}"
    member = await admin.ok("POST", "/v1/members", json={
        "mobile": mobile, "name": "Li Lei", "home_store": "S1"})  # fmt: skip
    card: dict[str, Any] = await admin.ok("POST", "/v1/cards", json={
        "class_code": "PTS", "store": "S1", "member_id": member["id"]})  # fmt: skip
    return card


async def earn(shop: Shop, card: dict[str, Any], fen: int) -> PosResult:
    """A purchase paid another way (POINTS_EARN): 1 point per CNY, no money on the card."""
    answer = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=fen))
    assert answer.outcome is Outcome.APPROVED, answer
    return answer


async def redeem(admin: AdminClient, card: dict[str, Any], points: int) -> None:
    path = f"/v1/cards/{card['id']}/points/redemptions"
    body = {"points": points, "reward": "GIFT-1", "key": f"k{next(_keys)}"}
    await admin.ok("POST", path, json=body)


async def delete(admin: AdminClient, card: dict[str, Any]) -> tuple[int, Any]:
    return await call(admin, "DELETE", f"/v1/members/{card['member_id']}")


async def refused_unchanged(admin: AdminClient, db_url: str, card: dict[str, Any]) -> None:
    """The delete is refused `409 member_has_points`, naming the card, and changes nothing:
    the member, its consents, its cards, the audit log and the card's points as they were."""
    before = await snapshot(db_url)
    points = await admin.ok("GET", f"/v1/cards/{card['id']}/points")
    status, answer = await delete(admin, card)
    assert status == 409, answer
    assert answer["error"]["code"] == "member_has_points"
    assert card["pan_masked"] in answer["error"]["message"]
    assert await snapshot(db_url) == before
    assert await admin.ok("GET", f"/v1/cards/{card['id']}/points") == points
    member = await ok(admin, "GET", f"/v1/members/{card['member_id']}")
    assert member["state"] == "active"
    assert [(c["id"], c["state"]) for c in member["cards"]] == [(card["id"], "active")]


async def deleted(admin: AdminClient, card: dict[str, Any]) -> None:
    status, answer = await delete(admin, card)
    assert status == 200, answer
    assert answer["state"] == "deleted"
    assert [(c["id"], c["state"]) for c in answer["cards"]] == [(card["id"], "closed")]


async def test_a_member_whose_card_holds_points_is_not_deleted_until_they_are_redeemed(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await points_card(shop)
    assert (await earn(shop, card, 10_000)).points_balance == 100
    await refused_unchanged(admin, db_url, card)
    # Still a live card: it earns at the POS as before.
    assert (await earn(shop, card, 2_000)).points_balance == 120
    await redeem(admin, card, 119)
    await refused_unchanged(admin, db_url, card)  # one point is still value
    await redeem(admin, card, 1)
    await deleted(admin, card)


async def test_pending_points_in_the_return_window_refuse_a_delete_too(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make(pending_days=7)
    card = await points_card(shop)
    sale = await earn(shop, card, 10_000)
    view = await admin.ok("GET", f"/v1/cards/{card['id']}/points")
    assert (view["usable"], view["pending"]) == (0, 100)
    await refused_unchanged(admin, db_url, card)
    back = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=10_000, rrn=sale.rrn))
    assert (back.outcome, back.points) == (Outcome.APPROVED, -100)
    await deleted(admin, card)


async def test_points_in_a_program_the_class_no_longer_earns_in_still_refuse_a_delete(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await points_card(shop)
    await earn(shop, card, 5_000)
    await admin.ok("POST", "/v1/points/programs",
                   json={**PROGRAM, "code": "CLUB2", "asset": "PTS:CLUB2"})  # fmt: skip
    await admin.ok("PATCH", "/v1/card-classes/PTS", json={"points_program": "CLUB2"})
    await admin.ok("PATCH", "/v1/points/programs/CLUB", json={"state": "closed"})
    await refused_unchanged(admin, db_url, card)


async def test_a_member_owing_only_a_points_debt_can_be_deleted_and_the_debt_stays_recorded(
    admin: AdminClient,
) -> None:
    shop = await Shop(admin).make()
    card = await points_card(shop)
    sale = await earn(shop, card, 10_000)
    await redeem(admin, card, 100)
    back = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=10_000, rrn=sale.rrn))
    assert (back.outcome, back.points) == (Outcome.APPROVED, -100)
    view = await admin.ok("GET", f"/v1/cards/{card['id']}/points")
    assert (view["usable"], view["pending"], view["debt"]) == (0, 0, 100)
    await deleted(admin, card)
    view = await admin.ok("GET", f"/v1/cards/{card['id']}/points")
    assert (view["usable"], view["pending"], view["debt"]) == (0, 0, 100)


async def test_an_earning_in_flight_when_the_delete_comes_makes_it_refuse(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The earning holds the card account's lock from its pin to its ledger answer; the
    delete reads the points under that lock, so it waits and then sees them."""
    shop = await Shop(admin).make()
    card = await points_card(shop)
    points = admin.app[POINTS_KEY]
    pinned = points._pin
    inside, go_on = asyncio.Event(), asyncio.Event()

    async def pin_then_wait(*args: Any) -> Any:
        got = await pinned(*args)
        inside.set()  # the earning is under the card's lock ...
        await go_on.wait()  # ... and stays there while the delete comes
        return got

    monkeypatch.setattr(points, "_pin", pin_then_wait)
    earning = asyncio.create_task(earn(shop, card, 10_000))
    await asyncio.wait_for(inside.wait(), timeout=5)
    before = await snapshot(db_url)
    deleting = asyncio.create_task(delete(admin, card))
    await asyncio.sleep(0.2)
    assert not deleting.done()  # waiting for the card's lock
    go_on.set()
    assert (await earning).points_balance == 100
    status, answer = await deleting
    assert status == 409, answer  # not deleted under the earning's feet
    assert answer["error"]["code"] == "member_has_points"
    assert await snapshot(db_url) == before
