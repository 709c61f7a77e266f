"""Points through the admin API on SQLite and PostgreSQL: redemption for rewards and its
reversal, and transfers between members within the program's policy; each idempotent by the
caller's key, audited, refused with a stable code and nothing changed."""

from __future__ import annotations

import asyncio
from typing import Any

import jsonschema
import pytest

from cardcore import limits
from cardcore.cards.model import Kind, Outcome
from cardcore.points.http import POINTS_KEY
from tests.helpers import AdminClient, sql_rows
from tests.integration.test_points_api import counts
from tests.integration.test_points_pos import Shop, fixed, pause_after

TRANSFER = {"allowed": True, "per_transfer_max_points": 300, "per_day_max_points": 500}


async def earned(shop: Shop, card: dict[str, Any], amount: int) -> None:
    answer = await shop.one(shop.request(Kind.PURCHASE, card, amount=amount))
    assert answer.points == amount // 100


async def refused(admin: AdminClient, db_url: str, path: str, body: Any, status: int, code: str,
                  token: str | None = None) -> None:  # fmt: skip
    before = await counts(db_url), await sql_rows(db_url, "SELECT * FROM ledger_accounts")
    got, answer = await admin.call("POST", path, token, body)
    assert (got, answer["error"]["code"]) == (status, code), answer
    after = await counts(db_url), await sql_rows(db_url, "SELECT * FROM ledger_accounts")
    assert after == before


async def test_a_reward_redemption_spends_once_and_its_reversal_restores_the_lots(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    await earned(shop, card, 50_000)
    path = f"/v1/cards/{card['id']}/points/redemptions"
    body = {"points": 120, "reward": "COUPON-9", "key": "r1"}
    status, made = await admin.call("POST", path, json=body)
    assert status == 201
    assert (made["points"], made["points_balance"], made["replayed"]) == (120, 380, False)
    status, again = await admin.call("POST", path, json=body)
    assert (status, again["replayed"], again["transfer_id"]) == (200, True, made["transfer_id"])
    assert (await shop.points(card))["balance"] == 380
    await refused(admin, db_url, path, {**body, "points": 121}, 409, "key_reused")
    await refused(admin, db_url, path, {**body, "key": "r2", "points": 381}, 409,
                  "points_insufficient")  # fmt: skip
    await refused(admin, db_url, path, {**body, "key": "r2", "points": 0}, 400, "invalid_value")
    outsider = await admin.token("store_crm", "store", "S2")
    await refused(admin, db_url, path, {**body, "key": "r3"}, 403, "scope_forbidden", outsider)
    auditor = await admin.token("auditor")
    await refused(admin, db_url, path, {**body, "key": "r3"}, 403, "role_forbidden", auditor)
    undo = f"{path}/r1/reversal"
    reversed_ = await admin.ok("POST", undo)
    assert (reversed_["reversed"], reversed_["points_balance"]) == (True, 500)
    assert (await admin.ok("POST", undo))["replayed"] is True
    assert (await shop.points(card))["balance"] == 500
    await refused(admin, db_url, f"{path}/nope/reversal", None, 404, "redemption_not_found")
    # A retry of the redemption after its reversal must not hear that it stands.
    await refused(admin, db_url, path, body, 409, "redemption_reversed")
    audit = await sql_rows(db_url, "SELECT action FROM org_audit_log WHERE action LIKE "
                           "'points.%' ORDER BY id")  # fmt: skip
    assert [a["action"] for a in audit] == ["points.redeem", "points.redeem_reversal"]


async def test_members_give_points_within_the_programs_policy(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    giver, taker = await shop.card(), await shop.card()
    await earned(shop, giver, 100_000)
    path = f"/v1/cards/{giver['id']}/points/transfers"
    body = {"to_card_id": taker["id"], "points": 100, "key": "t1"}
    await refused(admin, db_url, path, body, 409, "transfer_not_allowed")
    await admin.ok("PATCH", "/v1/points/programs/CLUB", json={"transfer": TRANSFER})
    status, made = await admin.call("POST", path, json=body)
    assert (status, made["points_balance"]) == (201, 900)
    status, again = await admin.call("POST", path, json=body)
    assert (status, again["replayed"]) == (200, True)
    view = await shop.points(taker)
    assert view["balance"] == 100
    assert view["lots"][0]["expires_on"] == (await shop.points(giver))["lots"][0]["expires_on"]
    await refused(admin, db_url, path, {**body, "key": "t2", "points": 301}, 409,
                  "transfer_over_limit")  # fmt: skip
    await admin.ok("POST", path, json={**body, "key": "t2", "points": 300})
    await refused(admin, db_url, path, {**body, "key": "t3", "points": 101}, 409,
                  "transfer_over_daily_limit")  # fmt: skip
    await refused(admin, db_url, path, {**body, "key": "t1", "points": 99}, 409, "key_reused")
    await refused(admin, db_url, path, {**body, "key": "t4", "to_card_id": giver["id"]}, 400,
                  "transfer_not_allowed")  # fmt: skip
    plain = await shop.card("PLAIN")
    await refused(admin, db_url, path, {**body, "key": "t5", "to_card_id": plain["id"]}, 409,
                  "transfer_not_allowed")  # fmt: skip
    await refused(admin, db_url, path, {**body, "key": "t6", "to_card_id": 999_999}, 404,
                  "card_not_found")  # fmt: skip
    rows = await sql_rows(db_url, "SELECT points FROM points_transfers ORDER BY key")
    assert [r["points"] for r in rows] == [100, 300]
    assert (await shop.points(giver))["balance"] == 600
    assert (await shop.points(taker))["balance"] == 400


async def test_the_daily_transfer_limit_is_the_giving_members_over_all_its_cards(
    admin: AdminClient, db_url: str
) -> None:
    """500 a day per giving member: what one card gave counts against the member's other
    cards, also when both give at the same moment; a bearer card is its own giver."""
    shop = await Shop(admin).make(transfer=TRANSFER)
    first, taker = await shop.card(), await shop.card()
    second = await admin.ok("POST", "/v1/cards", json={
        "class_code": "PTS", "store": "S1", "member_id": first["member_id"]})  # fmt: skip
    await admin.ok("POST", f"/v1/cards/{second['id']}/topups", json={
        "amount": 100_000, "tender": "cash", "receipt": "R2", "key": "top-second"})  # fmt: skip
    for card in (first, second):
        await earned(shop, card, 100_000)

    def give(card: dict[str, Any], points: int, key: str) -> Any:
        body = {"to_card_id": taker["id"], "points": points, "key": key}
        return admin.call("POST", f"/v1/cards/{card['id']}/points/transfers", None, body)

    assert (await give(first, 300, "a1"))[0] == 201
    together = await asyncio.gather(give(first, 200, "a2"), give(second, 200, "b1"))
    codes = sorted(str(answer.get("error", {}).get("code", status)) for status, answer in together)
    assert codes == ["201", "transfer_over_daily_limit"], together
    path = f"/v1/cards/{second['id']}/points/transfers"
    await refused(admin, db_url, path, {"to_card_id": taker["id"], "points": 1, "key": "b2"},
                  409, "transfer_over_daily_limit")  # fmt: skip
    rows = await sql_rows(db_url, "SELECT points FROM points_transfers")
    assert sum(r["points"] for r in rows) == 500


async def test_points_put_back_beside_a_debt_are_not_spent_twice(admin: AdminClient) -> None:
    """Earn 100, spend them on a reward, return the purchase (a debt of 100), reverse the
    reward (100 back in a lot): the member holds 100 and owes 100, so nothing is spendable,
    at the POS, on a reward or by a transfer; the refusals change nothing."""
    shop = await Shop(admin).make(transfer=TRANSFER)
    card, other = await shop.card(), await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert sale.points == 100
    path = f"/v1/cards/{card['id']}/points"
    await admin.ok("POST", f"{path}/redemptions", json={"points": 100, "reward": "mug",
                                                      "key": "r1"})  # fmt: skip
    await shop.one(shop.request(Kind.REFUND, card, amount=10_000, rrn=sale.rrn))
    await admin.ok("POST", f"{path}/redemptions/r1/reversal")
    before = await shop.points(card)
    assert (before["usable"], before["debt"]) == (100, 100)
    spent = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    assert (spent.outcome, spent.points_balance) == (Outcome.INSUFFICIENT_FUNDS, 0)
    status, answer = await admin.call("POST", f"{path}/redemptions", None,
                                      {"points": 100, "reward": "mug", "key": "r2"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "points_insufficient")
    status, answer = await admin.call(
        "POST", f"{path}/transfers", None, {"to_card_id": other["id"], "points": 100, "key": "t1"}
    )
    assert (status, answer["error"]["code"]) == (409, "points_insufficient")
    assert await shop.points(card) == before


async def test_a_transfer_across_legal_entities_clears_between_them(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make(transfer=TRANSFER)
    await admin.org("LE2", "S3")
    await admin.ok("POST", "/v1/grants", json={"store": "S3", "function": "stored_value"})
    giver = await shop.card()
    member = await admin.ok("POST", "/v1/members", json={"mobile": "13600000001",
                            "name": "Li Lei", "home_store": "S3"})  # fmt: skip
    taker = await admin.ok("POST", "/v1/cards", json={"class_code": "PTS", "store": "S3",
                           "member_id": member["id"]})  # fmt: skip
    await earned(shop, giver, 10_000)
    await admin.ok("POST", f"/v1/cards/{giver['id']}/points/transfers",
                   json={"to_card_id": taker["id"], "points": 40, "key": "x1"})  # fmt: skip
    rows = await sql_rows(db_url, "SELECT legal_entity, purpose, debits_posted, credits_posted"
                          " FROM ledger_accounts WHERE purpose LIKE 'points_due_%'")  # fmt: skip
    got = {(r["legal_entity"], r["purpose"]): (r["debits_posted"], r["credits_posted"])
           for r in rows}  # fmt: skip
    assert got == {("LE1", "points_due_to"): (0, 40), ("LE2", "points_due_from"): (40, 0)}
    lots = await sql_rows(db_url, "SELECT legal_entity FROM ledger_accounts WHERE owner_id = "
                          ":o AND owner_kind = 'points'", o=str(taker["account_id"]))  # fmt: skip
    assert {r["legal_entity"] for r in lots} == {"LE2"}


async def test_a_reward_redemption_on_a_card_frozen_while_it_waited_for_the_lock_is_refused(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The redemption read the card active; an officer froze it before the redemption took
    the card's lock: under the lock it reads the card again, 409 `card_state`, and nothing
    is spent."""
    shop = await Shop(admin).make()
    card = await shop.card()
    await earned(shop, card, 50_000)
    inside, go_on = pause_after(monkeypatch, admin.app[POINTS_KEY], "_card_and_program")
    path = f"/v1/cards/{card['id']}/points/redemptions"
    asked = asyncio.create_task(
        admin.call("POST", path, json={"points": 120, "reward": "COUPON-9", "key": "r1"})
    )
    await asyncio.wait_for(inside.wait(), timeout=5)
    await admin.ok("POST", f"/v1/cards/{card['id']}/freeze")
    go_on.set()
    status, answer = await asyncio.wait_for(asked, timeout=5)
    assert (status, answer["error"]["code"]) == (409, "card_state"), answer
    assert (await shop.points(card))["balance"] == 500
    assert await sql_rows(db_url, "SELECT id FROM ledger_transfers WHERE reason = "
                          "'points_reward'") == []  # fmt: skip


async def test_a_card_holding_points_closes_only_when_they_are_given_up(
    admin: AdminClient, db_url: str
) -> None:
    """Points are value: a close of a card holding any (usable, or pending in the return
    window) is refused 409 `card_has_points` and changes nothing; with `forfeit_points` the
    card closes, its money is refunded and every point goes to the entity's
    points_forfeited account, once. The member may then be deleted."""
    shop = await Shop(admin).make()
    card = await shop.card(balance=20_000)
    await earned(shop, card, 5_000)  # 50 points, 15,000 fen left
    path = f"/v1/cards/{card['id']}/close"
    before = await counts(db_url)
    status, answer = await admin.call("POST", path, json={"receipt": "C-1"})
    assert (status, answer["error"]["code"]) == (409, "card_has_points"), answer
    assert answer["error"]["field"] == "forfeit_points"
    assert await counts(db_url) == before
    assert (await admin.ok("GET", f"/v1/cards/{card['id']}"))["state"] == "active"
    closed = await admin.ok("POST", path, json={"receipt": "C-1", "forfeit_points": True})
    assert (closed["state"], closed["refund"]["amount"], closed["points_forfeited"]) == (
        "closed", 15_000, 50)  # fmt: skip
    view = await shop.points(card)
    assert (view["balance"], view["usable"], view["pending"]) == (0, 0, 0)
    [forfeit] = await sql_rows(db_url, "SELECT postings FROM ledger_transfers WHERE reason = "
                               "'points_forfeit'")  # fmt: skip
    [into] = await sql_rows(db_url, "SELECT credits_posted FROM ledger_accounts WHERE "
                            "purpose = 'points_forfeited'")  # fmt: skip
    assert int(into["credits_posted"]) == 50, forfeit
    status, again = await admin.call("POST", path, json={"receipt": "C-1", "forfeit_points": True})
    assert (status, again["error"]["code"]) == (409, "card_state")  # nothing left
    [audit] = (await admin.ok("GET", "/v1/audit", action="card.close_refund"))["items"]
    assert audit["after"]["points_forfeited"] == 50
    status, _ = await admin.call("DELETE", f"/v1/members/{card['member_id']}")
    assert status == 200


async def test_pending_points_refuse_a_close_too(admin: AdminClient) -> None:
    shop = await Shop(admin).make(pending_days=14)
    card = await shop.card()
    await earned(shop, card, 3_000)
    assert (await shop.points(card))["pending"] == 30
    status, answer = await admin.call("POST", f"/v1/cards/{card['id']}/close",
                                      json={"receipt": "C-2"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "card_has_points"), answer


async def test_a_forfeit_on_close_takes_every_lot_page_by_page(
    admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A card with more point accounts than one page of the forfeit: every lot still goes,
    the emptied ones and the full ones, so the closed card holds no points."""
    shop = await Shop(admin).make(pending_days=0, expiry={"kind": "rolling_months", "months": 120})
    service = admin.app[POINTS_KEY]
    card = await shop.card(balance=100_000)
    start, day_ms = 1_768_000_000_000, 86_400_000
    for month in range(5):  # five lots, one per month-end of expiry
        service.clock_ms = fixed(start + month * 31 * day_ms)
        await earned(shop, card, 1_000)
    service.clock_ms = fixed(start + 5 * 31 * day_ms)
    assert len((await shop.points(card))["lots"]) == 5
    monkeypatch.setattr(limits, "POINTS_FORFEIT_LOTS_MAX", 2)
    closed = await admin.ok("POST", f"/v1/cards/{card['id']}/close",
                            json={"receipt": "C-3", "forfeit_points": True})  # fmt: skip
    assert closed["points_forfeited"] == 50
    view = await shop.points(card)
    assert (view["balance"], view["pending"], view["lots"]) == (0, 0, [])


async def test_a_key_ending_like_a_moves_part_is_refused_and_never_names_one(
    admin: AdminClient,
) -> None:
    """A move over many lots is several transfers keyed `K`, `K.2`, ...: a caller's key
    `big.2` named the second part of the move under `big`, so its reversal put back part of
    another move's points, and the real reversal then made points from nothing (170 spent,
    190 back; a reviewer's finding). Such keys are refused, and are no redemption."""
    start, day = 1_768_000_000_000, 86_400_000
    shop = await Shop(admin).make(expiry={"kind": "rolling_months", "months": 120})
    service = admin.app[POINTS_KEY]
    card = await shop.card(balance=100_000)
    for month in range(17):  # 17 lots: a spend of all of them is two transfers
        service.clock_ms = fixed(start + month * 31 * day)
        await earned(shop, card, 1_000)
    service.clock_ms = fixed(start + 17 * 31 * day)
    path = f"/v1/cards/{card['id']}/points/redemptions"
    await admin.ok("POST", path, json={"points": 170, "reward": "TV", "key": "big"})
    got, answer = await admin.call("POST", f"{path}/big.2/reversal")
    assert (got, answer["error"]["code"]) == (404, "redemption_not_found")
    got, answer = await admin.call("POST", path, json={"points": 10, "reward": "x", "key": "big.2"})
    assert (got, answer["error"]["code"], answer["error"]["field"]) == (400, "invalid_value", "key")
    assert (await shop.points(card))["balance"] == 0
    await admin.ok("POST", f"{path}/big/reversal")
    assert (await shop.points(card))["balance"] == 170


async def test_the_days_transfer_limit_counts_only_the_programs_own_transfers(
    admin: AdminClient,
) -> None:
    """A member's transfers in another program counted against this one's daily limit (a
    reviewer's finding): each program's limit is its own."""
    from tests.integration.test_points_api import PROGRAM, RULE  # noqa: PLC0415 - this test's

    shop = await Shop(admin).make(transfer=TRANSFER)
    gold_program = {**PROGRAM, "code": "GOLD", "asset": "PTS:GOLD", "transfer": TRANSFER}
    await admin.ok("POST", "/v1/points/programs", json=gold_program)
    await admin.ok("POST", "/v1/points/programs/GOLD/rules", json=RULE)
    await admin.ok("POST", "/v1/card-classes", json={"code": "GLD", "name": "Gold",
                   "named": True, "points_program": "GOLD"})  # fmt: skip
    first, taker = await shop.card(), await shop.card()
    gold = await admin.ok("POST", "/v1/cards", json={"class_code": "GLD", "store": "S1",
                          "member_id": first["member_id"]})  # fmt: skip
    await admin.ok("POST", f"/v1/cards/{gold['id']}/topups", json={
        "amount": 100_000, "tender": "cash", "receipt": "R2", "key": "top-gold"})  # fmt: skip
    gold_taker = await admin.ok("POST", "/v1/cards", json={"class_code": "GLD", "store": "S1",
                                "member_id": taker["member_id"]})  # fmt: skip
    await earned(shop, first, 100_000)
    await earned(shop, gold, 100_000)
    for giver, to, key in ((first, taker, "a1"), (gold, gold_taker, "g1")):
        body = {"to_card_id": to["id"], "points": 300, "key": key}
        await admin.ok("POST", f"/v1/cards/{giver['id']}/points/transfers", json=body)


async def test_a_redemption_retried_after_a_freeze_answers_what_it_did(
    admin: AdminClient,
) -> None:
    """The points were spent, the answer lost, the card frozen: the retry under the same key
    was refused 409 `card_state`, which tells a client that nothing was spent (a reviewer's
    finding). It answers the redemption again; a new one on the frozen card is refused."""
    shop = await Shop(admin).make()
    card = await shop.card()
    await earned(shop, card, 50_000)
    path = f"/v1/cards/{card['id']}/points/redemptions"
    body = {"points": 120, "reward": "COUPON-9", "key": "r1"}
    first = await admin.ok("POST", path, json=body)
    await admin.ok("POST", f"/v1/cards/{card['id']}/freeze")
    again = await admin.ok("POST", path, json=body)
    assert (again["replayed"], again["transfer_id"]) == (True, first["transfer_id"])
    got, answer = await admin.call("POST", path, json={**body, "key": "r2"})
    assert (got, answer["error"]["code"]) == (409, "card_state")


async def test_a_transfer_retried_after_its_cards_were_frozen_answers_what_it_did(
    admin: AdminClient,
) -> None:
    """The points moved, the answer was lost, then the cards were frozen: the retry under
    the same key was refused 409 `card_state` (a client hears nothing moved, and gives
    again under a new key). It answers the transfer again; another request under the key
    is `key_reused`; a new transfer from the frozen card is refused."""
    shop = await Shop(admin).make(transfer=TRANSFER)
    giver, taker = await shop.card(), await shop.card()
    await earned(shop, giver, 100_000)
    path = f"/v1/cards/{giver['id']}/points/transfers"
    body = {"to_card_id": taker["id"], "points": 300, "key": "t1"}
    first = await admin.ok("POST", path, json=body)
    for card in (giver, taker):
        await admin.ok("POST", f"/v1/cards/{card['id']}/freeze")
    status, again = await admin.call("POST", path, json=body)
    assert (status, again["replayed"], again["transfer_id"]) == (
        200, True, first["transfer_id"],
    ), again  # fmt: skip
    assert again["points_balance"] == first["points_balance"]
    got, answer = await admin.call("POST", path, json={**body, "points": 301})
    assert (got, answer["error"]["code"]) == (409, "key_reused")
    got, answer = await admin.call("POST", path, json={**body, "key": "t2"})
    assert (got, answer["error"]["code"]) == (409, "card_state")
    assert (await shop.points(taker))["balance"] == 300


async def test_an_answer_below_zero_under_negative_matches_the_served_document(
    admin: AdminClient,
) -> None:
    """Under `negative` a card's points go below zero (a void took back what was spent): a
    retried redemption answers the card's points now, -100, and the OpenAPI document the
    server serves says so (it said at least 0, so an answer broke the schema)."""
    shop = await Shop(admin).make(negative_policy="negative")
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=10_000)
    await shop.one(sale)
    path = f"/v1/cards/{card['id']}/points/redemptions"
    body = {"points": 100, "reward": "mug", "key": "r1"}
    await admin.ok("POST", path, json=body)
    await shop.one(shop.request(Kind.VOID, card, amount=10_000, original_batch="000001",
                                original_stan=sale.stan))  # fmt: skip
    status, again = await admin.call("POST", path, json=body)
    assert (status, again["replayed"], again["points_balance"]) == (200, True, -100)
    document = await admin.ok("GET", "/v1/openapi.json")
    operation = document["paths"]["/v1/cards/{card_id}/points/redemptions"]["post"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(again["points_balance"], schema["properties"]["points_balance"])
