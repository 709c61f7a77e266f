"""Deleting a member whose cards hold points, on SQLite and PostgreSQL, through the whole host
app: points are value (they redeem for money at the POS), so a delete is refused
`409 member_has_points` while a live card's holder has points to use, usable or pending, in
any program, and changes nothing; once they are redeemed or clawed back the member can go,
and a points debt alone (owed by the member) does not keep it. The check runs under the
cards' account locks: an earning in flight when the delete comes is seen, and an earning or
a transfer that read a card before the delete and waited for its lock reads it again under
the lock: nothing lands on the closed card."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cardcore.cards.model import Kind, Outcome, PosResult
from cardcore.points.http import POINTS_KEY
from tests.helpers import AdminClient, sql_rows
from tests.integration.test_members_api import call, ok, snapshot
from tests.integration.test_points_admin import TRANSFER
from tests.integration.test_points_api import PROGRAM
from tests.integration.test_points_pos import Shop, pause_after

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


async def no_points_moved(admin: AdminClient, db_url: str, card: dict[str, Any]) -> None:
    """Nothing earned or moved: no lot of the card holds a point, no earning was pinned, no
    transfer was recorded and the ledger holds no earning or transfer of points."""
    view = await admin.ok("GET", f"/v1/cards/{card['id']}/points")
    assert (view["balance"], view["usable"], view["pending"], view["lots"]) == (0, 0, 0, [])
    for table in ("points_earnings", "points_transfers"):
        assert await sql_rows(db_url, f"SELECT * FROM {table}") == []  # noqa: S608
    moved = await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason IN "
                           "('points_earn', 'points_transfer')")  # fmt: skip
    assert moved == []


async def test_an_earning_that_waited_for_the_delete_is_declined_card_closed(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POINTS_EARN read the card active, then the member was deleted before it took the
    card's lock: under the lock it reads the card again and is declined `card_closed`."""
    shop = await Shop(admin).make()
    card = await points_card(shop)
    inside, go_on = pause_after(monkeypatch, admin.app[POINTS_KEY], "_program_of_card")
    earning = asyncio.create_task(shop.one(shop.request(Kind.POINTS_EARN, card, amount=10_000)))
    await asyncio.wait_for(inside.wait(), timeout=5)
    await deleted(admin, card)  # the earning holds no lock yet: the delete goes through
    go_on.set()
    answer = await asyncio.wait_for(earning, timeout=5)
    assert (answer.outcome, answer.points, answer.rrn) == (Outcome.CARD_CLOSED, None, "")
    await no_points_moved(admin, db_url, card)


async def transfer_after(
    admin: AdminClient, monkeypatch: pytest.MonkeyPatch, giver: dict[str, Any],
    taker: dict[str, Any], meanwhile: Callable[[], Awaitable[None]],
) -> tuple[int, Any]:  # fmt: skip
    """A transfer of 40 points from `giver` to `taker` that read both cards, then waited
    while `meanwhile` ran to its end, before it took the cards' locks."""
    inside, go_on = pause_after(monkeypatch, admin.app[POINTS_KEY], "_receiving")
    path = f"/v1/cards/{giver['id']}/points/transfers"
    body = {"to_card_id": taker["id"], "points": 40, "key": f"t{next(_keys)}"}
    moving = asyncio.create_task(call(admin, "POST", path, None, body))
    await asyncio.wait_for(inside.wait(), timeout=5)
    await meanwhile()
    go_on.set()
    return await asyncio.wait_for(moving, timeout=5)


async def test_a_transfer_that_waited_for_the_receivers_delete_is_refused(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiving member is deleted (its card holds no points yet) between the
    transfer's reads and its locks: under both cards' locks the transfer reads the receiving
    card closed and is refused `transfer_not_allowed`; no point leaves the giver."""
    shop = await Shop(admin).make(transfer=TRANSFER)
    giver, taker = await points_card(shop), await points_card(shop)
    await earn(shop, giver, 10_000)
    status, answer = await transfer_after(
        admin, monkeypatch, giver, taker, lambda: deleted(admin, taker)
    )
    assert status == 409, answer
    assert (answer["error"]["code"], answer["error"]["field"]) == (
        "transfer_not_allowed",
        "to_card_id",
    )
    assert "closed" in answer["error"]["message"]
    assert (await admin.ok("GET", f"/v1/cards/{giver['id']}/points"))["balance"] == 100
    await no_transfer(admin, db_url, taker)


async def test_a_transfer_whose_giving_card_was_frozen_meanwhile_is_refused(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An officer freezes the giving card between the transfer's reads and its locks: under
    the locks the transfer reads it frozen and is refused `card_state`, nothing moved."""
    shop = await Shop(admin).make(transfer=TRANSFER)
    giver, taker = await points_card(shop), await points_card(shop)
    await earn(shop, giver, 10_000)

    async def freeze() -> None:
        await admin.ok("POST", f"/v1/cards/{giver['id']}/freeze")

    status, answer = await transfer_after(admin, monkeypatch, giver, taker, freeze)
    assert (status, answer["error"]["code"]) == (409, "card_state"), answer
    assert (await admin.ok("GET", f"/v1/cards/{giver['id']}/points"))["balance"] == 100
    await no_transfer(admin, db_url, taker)


async def no_transfer(admin: AdminClient, db_url: str, taker: dict[str, Any]) -> None:
    """No transfer recorded and none in the ledger; the receiving card holds no point."""
    view = await admin.ok("GET", f"/v1/cards/{taker['id']}/points")
    assert (view["balance"], view["usable"], view["lots"]) == (0, 0, [])
    assert await sql_rows(db_url, "SELECT * FROM points_transfers") == []
    moved = await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason = "
                           "'points_transfer'")  # fmt: skip
    assert moved == []
    audit = await sql_rows(db_url, "SELECT * FROM org_audit_log WHERE action = "
                           "'points.transfer'")  # fmt: skip
    assert audit == []


async def test_a_transfer_in_flight_makes_the_receivers_delete_wait_and_refuse(
    admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer holds the receiving card's lock too, from its reads to its ledger answer:
    the receiving member's delete waits for it and then sees the points it brought."""
    shop = await Shop(admin).make(transfer=TRANSFER)
    giver, taker = await points_card(shop), await points_card(shop)
    await earn(shop, giver, 10_000)
    inside, go_on = pause_after(monkeypatch, admin.app[POINTS_KEY], "_transfer_ops")
    path = f"/v1/cards/{giver['id']}/points/transfers"
    body = {"to_card_id": taker["id"], "points": 40, "key": f"t{next(_keys)}"}
    moving = asyncio.create_task(call(admin, "POST", path, None, body))
    await asyncio.wait_for(inside.wait(), timeout=5)  # under both cards' locks
    deleting = asyncio.create_task(delete(admin, taker))
    await asyncio.sleep(0.2)
    assert not deleting.done()  # waiting for the receiving card's lock
    go_on.set()
    status, answer = await asyncio.wait_for(moving, timeout=5)
    assert status == 201, answer
    status, answer = await asyncio.wait_for(deleting, timeout=5)
    assert (status, answer["error"]["code"]) == (409, "member_has_points"), answer
    member = await ok(admin, "GET", f"/v1/members/{taker['member_id']}")
    assert member["state"] == "active"
    assert [(c["id"], c["state"]) for c in member["cards"]] == [(taker["id"], "active")]
    assert (await admin.ok("GET", f"/v1/cards/{taker['id']}/points"))["balance"] == 40


async def test_a_closed_card_holding_value_again_refuses_the_members_delete(
    admin: AdminClient,
) -> None:
    """A closed card can hold money again (a terminal's reversal of a purchase after the
    close refunded the rest): the member's delete is refused 409 `member_has_value`, until
    a second close refunds it."""
    shop = await Shop(admin).make()
    card = await shop.card("PLAIN", balance=10_000)
    sale = shop.request(Kind.PURCHASE, card, amount=3_000)
    assert (await shop.one(sale)).outcome is Outcome.APPROVED
    closed = await admin.ok("POST", f"/v1/cards/{card['id']}/close", json={"receipt": "C1"})
    assert closed["refund"]["amount"] == 7_000
    undone = await shop.one(shop.request(Kind.REVERSE, None, stan=sale.stan))
    assert undone.outcome is Outcome.APPROVED  # always taken: 3,000 back on the closed card
    status, answer = await delete(admin, card)
    assert (status, answer["error"]["code"]) == (409, "member_has_value"), answer
    again = await admin.ok("POST", f"/v1/cards/{card['id']}/close", json={"receipt": "C2"})
    assert again["refund"]["amount"] == 3_000
    status, _ = await delete(admin, card)
    assert status == 200
