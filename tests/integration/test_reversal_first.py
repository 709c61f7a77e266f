"""A reversal that overtakes its request inside the host (review finding): the POS host took
the 0400 and each feature's reverser ran while the request itself was still on its way
(between its checks and its write). Each feature must leave something under the POS key that
the late request meets, so it changes nothing: a reversed row (service uses, a manager's
authorization) or a ledger tombstone (points). Here the reverser runs alone, without the
ledger's own tombstone under the key, which is exactly that window.
"""

from __future__ import annotations

from cardcore.cards.http import POS_KEY
from cardcore.cards.model import Kind, Outcome, Terminal, transaction_key
from cardcore.manager_cards.http import MANAGER_CARDS_KEY
from cardcore.points.http import POINTS_KEY
from cardcore.service_cards.http import SERVICE_CARDS_KEY
from tests.helpers import AdminClient
from tests.integration import test_manager_cards as managers
from tests.integration import test_service_cards as services
from tests.integration.test_points_pos import Shop


async def _terminal_and_key(admin: AdminClient, tid: str, stan: str) -> tuple[Terminal, str]:
    t = await admin.app[POS_KEY].directory.terminal(tid)
    assert t is not None
    return t, transaction_key(t, "000001", stan)


async def test_service_uses_are_not_taken_by_a_redemption_its_reversal_overtook(
    admin: AdminClient,
) -> None:
    w = await services.world(admin)
    await services.sell(admin, w["card"]["id"], "WASH")
    late = services.redemption(w["t1"], w["card"]["pan"])
    t, key = await _terminal_and_key(admin, w["t1"], late.stan)
    await admin.app[SERVICE_CARDS_KEY].reverse(t, key)
    [answer] = await admin.app[POS_KEY].handle([late])
    assert answer.outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    listed = await admin.ok("GET", f"/v1/cards/{w['card']['id']}/service-packages")
    assert [p["uses_left"] for p in listed["items"]] == [3]


async def test_a_manager_authorization_its_reversal_overtook_takes_no_daily_room(
    admin: AdminClient,
) -> None:
    w = await managers.world(admin)
    card = await managers.ready_card(admin, w["manager"])
    late = managers.ask(w["t1"], card["pan"], discount=1_000)
    t, key = await _terminal_and_key(admin, w["t1"], late.stan)
    await admin.app[MANAGER_CARDS_KEY].reverse(t, key)
    assert (await managers.pos(admin, late)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    fresh = managers.ask(w["t1"], card["pan"], discount=1_000)
    assert (await managers.pos(admin, fresh)).outcome is Outcome.APPROVED  # room intact


async def test_points_its_reversal_overtook_are_never_earned(admin: AdminClient) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    late = shop.request(Kind.POINTS_EARN, card, amount=10_000)
    t, key = await _terminal_and_key(admin, shop.tids["S1"], late.stan)
    await admin.app[POINTS_KEY].reverse_pos(t, key)
    answer = await shop.one(late)
    assert answer.outcome is not Outcome.APPROVED, answer
    assert (await shop.points(card))["balance"] == 0


async def test_a_points_return_its_reversal_overtook_takes_nothing_and_unpins(
    admin: AdminClient,
) -> None:
    """The points reverser ran first: it found nothing under the return's `K:p` and left
    its tombstone there. The late return pins its clawback, the ledger refuses it, and the
    pin is undone: the earning can still be returned whole."""
    shop = await Shop(admin).make()
    card = await shop.card()
    earn = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=10_000))
    late = shop.request(Kind.POINTS_RETURN, card, amount=4_000, rrn=earn.rrn)
    t, key = await _terminal_and_key(admin, shop.tids["S1"], late.stan)
    await admin.app[POINTS_KEY].reverse_pos(t, key)
    assert (await shop.one(late)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await shop.points(card))["balance"] == 100
    whole = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=10_000, rrn=earn.rrn))
    assert (whole.outcome, whole.points, whole.points_balance) == (Outcome.APPROVED, -100, 0)
