"""Service cards over the admin API and the POS host of the same app (SQLite and PostgreSQL):
products, packages sold at the counter (the money into the store's sales, once per key),
redemption at the POS (guarded, idempotent, reversible once, one winner for the last use),
and refunds of unused entitlements."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from alembic import command

from cardcore import limits, migrate
from cardcore.cards.http import POS_KEY
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult
from cardcore.ledger.http import LEDGER_KEY
from cardcore.service_cards.http import SERVICE_CARDS_KEY
from cardcore.service_cards.service import ServicesUnavailable, entitlement_of, take_uses
from tests import logscan
from tests.helpers import AdminClient, sql_execute, sql_rows

_stans = itertools.count(1)
_tids = itertools.count(1)
_mobiles = itertools.count(1)
PRODUCTS = "/v1/service-products"


# --- the world -----------------------------------------------------------------------------------


async def world(admin: AdminClient) -> dict[str, Any]:
    """LE1 with S1 and S2, LE2 with S3; class ORD; S1 may issue cards and sell services, S2
    may issue cards only; product WASH (3 uses for 100 CNY, every store), product SPA (2
    uses, only in S1); a card of S1 with a member; a terminal in S1 and one in S2."""
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    await admin.ok("POST", "/v1/card-classes", json={"code": "ORD", "name": "Ordinary",
                   "named": True})  # fmt: skip
    for store in ("S1", "S2"):
        await admin.ok("POST", "/v1/grants", json={"store": store, "function": "stored_value"})
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "service"})
    await product(admin, "WASH", uses=3, price_fen=10_000)
    await product(admin, "SPA", uses=2, price_fen=5_000, stores=["S1"])
    card = await issue(admin, "S1")
    return {"card": card, "t1": await terminal(admin, "S1"), "t2": await terminal(admin, "S2")}


async def product(admin: AdminClient, code: str, **fields: Any) -> dict[str, Any]:
    body = {"code": code, "name": f"Product {code}", "legal_entity": "LE1",
            "validity_months": 12, **fields}  # fmt: skip
    answer: dict[str, Any] = await admin.ok("POST", PRODUCTS, json=body)
    return answer


async def issue(admin: AdminClient, store: str) -> dict[str, Any]:
    member = await admin.ok("POST", "/v1/members", json={
        "mobile": f"137{next(_mobiles):08d}", "name": "Han Mei", "home_store": store})  # fmt: skip
    card: dict[str, Any] = await admin.ok(
        "POST", "/v1/cards", json={"class_code": "ORD", "store": store, "member_id": member["id"]}
    )
    return card


async def terminal(admin: AdminClient, store: str) -> str:
    n = next(_tids)
    tid, mid = f"S{n:07d}", f"N{n:014d}"
    answer = await admin.ok("POST", "/v1/terminals", json={"tid": tid, "mid": mid, "store": store})
    logscan.SCAN.remember("a terminal master key", answer["tmk"])
    return tid


async def sell(
    admin: AdminClient, card_id: int, product_code: str, token: str | None = None, **extra: Any
) -> tuple[int, Any]:
    body = {"product": product_code, "tender": "cash", "receipt": "R1",
            "key": f"sale-{next(_stans)}", **extra}  # fmt: skip
    return await admin.call("POST", f"/v1/cards/{card_id}/service-packages", token, body)


def redemption(tid: str, pan: str, stan: str | None = None, **fields: Any) -> PosRequest:
    return PosRequest(kind=Kind.SERVICE_REDEEM, terminal=tid, batch="000001",
                      stan=stan or f"{next(_stans):06d}", card=pan, **fields)  # fmt: skip


async def pos(admin: AdminClient, *requests: PosRequest) -> list[PosResult]:
    return await admin.app[POS_KEY].handle(list(requests))


async def reverse(admin: AdminClient, original: PosRequest) -> PosResult:
    [answer] = await pos(admin, PosRequest(kind=Kind.REVERSE, terminal=original.terminal,
                                           batch=original.batch, stan=original.stan))  # fmt: skip
    return answer


async def counts(db_url: str) -> dict[str, int]:
    out = {}
    for table in ("service_products", "service_entitlements", "service_redemptions",
                  "ledger_transfers", "org_audit_log", "org_grants"):  # fmt: skip
        rows = await sql_rows(db_url, f"SELECT count(*) AS n FROM {table}")  # noqa: S608
        out[table] = int(rows[0]["n"])
    return out


async def store_balance(admin: AdminClient, store: str, purpose: str) -> int:
    """Credits less debits posted on a store's account (sales grow, a till pays out)."""
    services = admin.app[SERVICE_CARDS_KEY]
    account_id = await services.accounts.store("LE1", store, purpose)
    account = await admin.app[LEDGER_KEY].account(account_id)
    assert account is not None
    return account.balance.credits_posted - account.balance.debits_posted


# --- products ------------------------------------------------------------------------------------


async def test_hq_defines_products_and_bad_ones_are_refused_changing_nothing(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    made = await product(admin, "WASH", uses=10, price_fen=30_000, stores=["S1"])
    assert made | {"created_at_ms": 0, "updated_at_ms": 0} == {
        "code": "WASH", "name": "Product WASH", "legal_entity": "LE1", "uses": 10,
        "price_fen": 30_000, "validity_months": 12, "stores": ["S1"],
        "refund_policy": "pro_rata", "refund_fee_fen": 0, "single_use_price_fen": 3_000,
        "refund_after_expiry": False, "state": "active", "created_at_ms": 0,
        "updated_at_ms": 0,
    }  # fmt: skip
    supervisor = await admin.token("store_supervisor", "store", "S2")
    base = {"code": "X1", "name": "x", "legal_entity": "LE1", "uses": 2, "price_fen": 100,
            "validity_months": 1}  # fmt: skip
    before = await counts(db_url)
    cases = [
        (None, {**base, "uses": 0}, 400, "invalid_value", "uses"),
        (None, {**base, "price_fen": 1.5}, 400, "wrong_type", "price_fen"),
        (None, {**base, "price_fen": 0}, 400, "invalid_value", "price_fen"),  # never sold
        (None, {**base, "refund_policy": "pro_rata_after_use_price",
                "single_use_price_fen": 49}, 400, "invalid_value", "single_use_price_fen"),
        (None, {**base, "stores": ["S3"]}, 400, "store_other_entity", "stores"),
        (None, {**base, "stores": ["S9"]}, 404, "store_not_found", "stores"),
        (None, {**base, "legal_entity": "LE9"}, 404, "entity_not_found", "legal_entity"),
        (None, {**base, "code": "WASH"}, 409, "product_exists", "code"),
        (supervisor, base, 403, "role_forbidden", None),
    ]  # fmt: skip
    for token, body, status, code, field in cases:
        got, answer = await admin.call("POST", PRODUCTS, token, body)
        assert (got, answer["error"]["code"], answer["error"]["field"]) == (status, code, field)
    assert await counts(db_url) == before

    changed = await admin.ok("PATCH", f"{PRODUCTS}/WASH", json={"price_fen": 32_000,
                             "stores": []})  # fmt: skip
    assert (changed["price_fen"], changed["stores"]) == (32_000, [])
    status, answer = await admin.call("PATCH", f"{PRODUCTS}/WASH", json={"uses": 0})
    assert (status, answer["error"]["field"]) == (400, "uses")
    assert (await admin.ok("GET", f"{PRODUCTS}/WASH"))["price_fen"] == 32_000
    # A store officer reads its entity's products, never another entity's.
    await admin.org("LE2", "S3")
    other = await admin.token("store_supervisor", "store", "S3")
    assert (await admin.ok("GET", PRODUCTS, supervisor))["items"][0]["code"] == "WASH"
    assert (await admin.ok("GET", PRODUCTS, other))["items"] == []
    status, answer = await admin.call("GET", f"{PRODUCTS}/WASH", other)
    assert (status, answer["error"]["code"]) == (403, "scope_forbidden")
    audit = await admin.ok("GET", "/v1/audit", object_kind="service_product")
    assert [a["action"] for a in audit["items"]] == ["service_product.create",
                                                     "service_product.update"]  # fmt: skip


# --- selling -------------------------------------------------------------------------------------


async def test_a_sale_moves_the_price_from_the_till_to_sales_once_per_key(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    card_id = w["card"]["id"]
    till, sales = (
        await store_balance(admin, "S1", "cash"),
        await store_balance(admin, "S1", "sales"),
    )
    status, sold = await sell(admin, card_id, "WASH", key="k-1")
    assert status == 201, sold
    assert (sold["uses_total"], sold["uses_left"], sold["price_fen"], sold["state"],
            sold["store"], sold["replayed"]) == (3, 3, 10_000, "active", "S1", False)  # fmt: skip
    assert await store_balance(admin, "S1", "cash") == till - 10_000
    assert await store_balance(admin, "S1", "sales") == sales + 10_000
    before = await counts(db_url)
    status, again = await sell(admin, card_id, "WASH", key="k-1")
    assert status == 200
    assert again == {**sold, "replayed": True}
    status, answer = await sell(admin, card_id, "SPA", key="k-1")
    assert (status, answer["error"]["code"]) == (409, "idempotency_key_reused")
    status, answer = await sell(admin, card_id, "WASH", key="k-1", tender="bank_card")
    assert (status, answer["error"]["code"]) == (409, "idempotency_key_reused")  # paid in cash
    assert await counts(db_url) == before
    assert await store_balance(admin, "S1", "sales") == sales + 10_000
    [transfer] = await sql_rows(
        db_url, "SELECT reason FROM ledger_transfers WHERE key = :k", k="service-sale/S1/k-1"
    )
    assert transfer["reason"] == "service_sale"
    listed = await admin.ok("GET", f"/v1/cards/{card_id}/service-packages")
    assert [p["id"] for p in listed["items"]] == [sold["id"]]


async def test_a_sale_without_the_grant_or_outside_scope_is_refused_and_changes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    card_id = w["card"]["id"]
    s2 = await admin.token("store_supervisor", "store", "S2")
    s1 = await admin.token("store_supervisor", "store", "S1")
    s2_card = await issue(admin, "S2")
    await admin.ok("PATCH", f"{PRODUCTS}/SPA", json={"state": "retired"})
    before = await counts(db_url)
    cases = [
        (s2, card_id, "WASH", {}, 403, "scope_forbidden"),  # S1's card
        (s2, s2_card["id"], "WASH", {}, 403, "not_granted"),  # S2 has no service grant
        (None, s2_card["id"], "WASH", {"store": "S2"}, 403, "not_granted"),
        (s1, card_id, "SPA", {}, 409, "product_retired"),
        (s1, card_id, "NOPE", {}, 404, "product_not_found"),
        (s1, card_id, "WASH", {"store": "S2"}, 403, "scope_forbidden"),
        (s1, card_id, "WASH", {"tender": "cheque"}, 400, "invalid_value"),
    ]
    for token, card, code, extra, status, error in cases:
        got, answer = await sell(admin, card, code, token, **extra)
        assert (got, answer["error"]["code"]) == (status, error), (code, extra, answer)
    assert await counts(db_url) == before
    status, answer = await sell(admin, card_id, "WASH", s1)
    assert status == 201, answer


# --- the POS -------------------------------------------------------------------------------------


async def test_a_redemption_uses_entitlements_once_and_a_reversal_gives_them_back_once(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    pan = w["card"]["pan"]
    _, sold = await sell(admin, w["card"]["id"], "WASH")
    first = redemption(w["t1"], pan, product="WASH")
    [answer] = await pos(admin, first)
    assert (answer.outcome, answer.uses_left) == (Outcome.APPROVED, 2)
    [resent] = await pos(admin, first)
    assert (resent.outcome, resent.uses_left, resent.replayed) == (Outcome.APPROVED, 2, True)
    [two] = await pos(admin, redemption(w["t1"], pan, uses=2))  # "" = the card's choice
    assert (two.outcome, two.uses_left) == (Outcome.APPROVED, 0)
    [empty] = await pos(admin, redemption(w["t1"], pan, product="WASH"))
    assert (empty.outcome, empty.refusal) == (Outcome.INSUFFICIENT_FUNDS, "service_no_uses_left")
    assert (await reverse(admin, first)).outcome is Outcome.APPROVED
    assert (await reverse(admin, first)).outcome in (Outcome.APPROVED, Outcome.ALREADY_REVERSED)
    listed = await admin.ok("GET", f"/v1/cards/{w['card']['id']}/service-packages")
    assert listed["items"][0]["uses_left"] == 1  # given back once, not twice
    [late] = await pos(admin, first)
    assert late.outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    rows = await sql_rows(db_url, "SELECT uses, reversed FROM service_redemptions ORDER BY key")
    assert sorted((r["uses"], bool(r["reversed"])) for r in rows) == [(1, True), (2, False)]
    assert sold["id"] == listed["items"][0]["id"]


async def test_a_redemption_is_refused_in_the_wrong_store_when_expired_or_with_no_package(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    pan = w["card"]["pan"]
    [none] = await pos(admin, redemption(w["t1"], pan, product="WASH"))
    assert (none.outcome, none.refusal) == (Outcome.NOT_PERMITTED, "service_no_package")
    await sell(admin, w["card"]["id"], "SPA")
    before = await counts(db_url)
    [wrong] = await pos(admin, redemption(w["t2"], pan, product="SPA"))
    assert (wrong.outcome, wrong.refusal) == (Outcome.NOT_PERMITTED, "service_wrong_store")
    services = admin.app[SERVICE_CARDS_KEY]
    now = services.clock_ms()
    services.clock_ms = lambda: now + 400 * 86_400_000  # past the 12 months' end
    [old] = await pos(admin, redemption(w["t1"], pan, product="SPA"))
    assert (old.outcome, old.refusal) == (Outcome.NOT_PERMITTED, "service_expired")
    assert await counts(db_url) == before
    listed = await admin.ok("GET", f"/v1/cards/{w['card']['id']}/service-packages")
    assert (listed["items"][0]["state"], listed["items"][0]["uses_left"]) == ("expired", 2)


async def test_terminals_taking_the_last_use_at_once_one_wins(admin: AdminClient) -> None:
    w = await world(admin)
    pan = w["card"]["pan"]
    await sell(admin, w["card"]["id"], "WASH")
    [two] = await pos(admin, redemption(w["t1"], pan, uses=2))
    assert two.uses_left == 1
    tids = [w["t1"], w["t2"], *[await terminal(admin, "S1") for _ in range(6)]]
    answers = await asyncio.gather(*(pos(admin, redemption(tid, pan)) for tid in tids))
    outcomes = sorted(str(a.outcome) for [a] in answers)
    assert outcomes == ["approved"] + ["insufficient_funds"] * 7, answers
    listed = await admin.ok("GET", f"/v1/cards/{w['card']['id']}/service-packages")
    assert listed["items"][0]["uses_left"] == 0
    # The guard itself: a package read with a use left that has none now changes nothing.
    services = admin.app[SERVICE_CARDS_KEY]
    async with services.records.begin() as uow:
        taken = await take_uses(uow, listed["items"][0]["id"], 1, now_ms=services.clock_ms())
    assert taken == 0


# --- refunds -------------------------------------------------------------------------------------


async def test_a_refund_pays_the_unused_share_once_and_the_package_is_dead(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    pan = w["card"]["pan"]
    _, sold = await sell(admin, w["card"]["id"], "WASH")
    [used] = await pos(admin, redemption(w["t1"], pan))
    assert used.uses_left == 2
    till, sales = (
        await store_balance(admin, "S1", "cash"),
        await store_balance(admin, "S1", "sales"),
    )
    path = f"/v1/service-packages/{sold['id']}/refund"
    refunded = await admin.ok("POST", path, json={"key": "rf-1", "receipt": "R2"})
    # 10,000 fen for 3 uses, 1 used: 3,333 kept (rounded down), 6,667 back to the member.
    assert (refunded["refund_fen"], refunded["state"], refunded["replayed"]) == (
        6_667, "refunded", False)  # fmt: skip
    assert await store_balance(admin, "S1", "sales") == sales - 6_667
    assert await store_balance(admin, "S1", "cash") == till + 6_667
    before = await counts(db_url)
    again = await admin.ok("POST", path, json={"key": "rf-1", "receipt": "R2"})
    assert (again["refund_fen"], again["transfer_id"], again["replayed"]) == (
        6_667, refunded["transfer_id"], True)  # fmt: skip
    status, answer = await admin.call("POST", path, json={"key": "rf-2"})
    assert (status, answer["error"]["code"]) == (409, "service_refunded")
    [late] = await pos(admin, redemption(w["t1"], pan))
    assert (late.outcome, late.refusal) == (Outcome.NOT_PERMITTED, "service_refunded")
    assert await counts(db_url) == before
    assert await store_balance(admin, "S1", "sales") == sales - 6_667
    s2 = await admin.token("store_supervisor", "store", "S2")
    status, answer = await admin.call("POST", path, s2, {"key": "rf-3"})
    assert (status, answer["error"]["code"]) == (403, "scope_forbidden")


async def test_refunds_follow_the_policy_and_a_key_names_one_package(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    card_id = w["card"]["id"]
    await product(admin, "GYM", uses=4, price_fen=8_000, refund_policy="none")
    await product(admin, "NAIL", uses=4, price_fen=8_000, refund_fee_fen=500,
                  refund_policy="pro_rata_after_use_price", single_use_price_fen=2_500)  # fmt: skip
    _, gym = await sell(admin, card_id, "GYM")
    _, nail = await sell(admin, card_id, "NAIL")
    _, wash = await sell(admin, card_id, "WASH")
    before = await counts(db_url)
    status, answer = await admin.call("POST", f"/v1/service-packages/{gym['id']}/refund",
                                      json={"key": "same"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "service_refund_not_allowed")
    status, answer = await admin.call("POST", "/v1/service-packages/999/refund",
                                      json={"key": "same"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (404, "package_not_found")
    assert await counts(db_url) == before
    [used] = await pos(admin, redemption(w["t1"], w["card"]["pan"], product="NAIL"))
    assert used.uses_left == 3
    # 8,000 less 1 used at the 2,500 list price, less the 500 fee.
    nail_refund = await admin.ok("POST", f"/v1/service-packages/{nail['id']}/refund",
                                 json={"key": "same"})  # fmt: skip
    assert nail_refund["refund_fen"] == 5_000
    # The same key on another package is another refund, never a clash.
    wash_refund = await admin.ok("POST", f"/v1/service-packages/{wash['id']}/refund",
                                 json={"key": "same"})  # fmt: skip
    assert (wash_refund["refund_fen"], wash_refund["replayed"]) == (10_000, False)
    assert wash_refund["transfer_id"] != nail_refund["transfer_id"]


async def test_a_package_is_refunded_by_the_terms_of_its_sale_not_a_later_change(
    admin: AdminClient, db_url: str
) -> None:
    """Audit finding (issue 5): a reprice or a policy change of the product (PATCH) applied
    to packages already sold. 100.00 for 10 uses, one use listed at 12.00, 5 used: 4,000 fen
    back less the 1.00 fee, also after HQ makes it 50.00, 5.00 a use, no fee, or `none`."""
    w = await world(admin)
    card_id, pan = w["card"]["id"], w["card"]["pan"]
    sold_terms = {"refund_policy": "pro_rata_after_use_price", "single_use_price_fen": 1_200,
                  "refund_fee_fen": 100, "refund_after_expiry": False}  # fmt: skip
    await product(admin, "TEN", uses=10, price_fen=10_000, **sold_terms)
    _, first = await sell(admin, card_id, "TEN")
    _, second = await sell(admin, card_id, "TEN")
    assert {k: first[k] for k in sold_terms} == sold_terms
    [used] = await pos(admin, redemption(w["t1"], pan, product="TEN", uses=5))
    assert (used.outcome, used.uses_left) == (Outcome.APPROVED, 5)
    path = f"{PRODUCTS}/TEN"
    await admin.ok("PATCH", path, json={"price_fen": 5_000, "single_use_price_fen": 500,
                                        "refund_fee_fen": 0})  # fmt: skip
    listed = await admin.ok("GET", f"/v1/cards/{card_id}/service-packages")
    assert all({k: p[k] for k in sold_terms} == sold_terms for p in listed["items"])
    refunded = await admin.ok("POST", f"/v1/service-packages/{first['id']}/refund",
                              json={"key": "rf-1"})  # fmt: skip
    assert refunded["refund_fen"] == 10_000 - 5 * 1_200 - 100
    await admin.ok("PATCH", path, json={"refund_policy": "none"})
    refunded = await admin.ok("POST", f"/v1/service-packages/{second['id']}/refund",
                              json={"key": "rf-2"})  # fmt: skip
    assert refunded["refund_fen"] == 10_000 - 100
    # A package sold after the change keeps the new terms.
    _, third = await sell(admin, card_id, "TEN")
    assert (third["price_fen"], third["refund_policy"]) == (5_000, "none")
    status, answer = await admin.call("POST", f"/v1/service-packages/{third['id']}/refund",
                                      json={"key": "rf-3"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "service_refund_not_allowed")
    [row] = await sql_rows(db_url, "SELECT * FROM service_entitlements WHERE id = :i",
                           i=first["id"])  # fmt: skip
    assert (row["refund_policy"], row["single_use_price_fen"], row["refund_fee_fen"]) == (
        "pro_rata_after_use_price", 1_200, 100)  # fmt: skip


async def test_a_redemption_reversed_before_it_arrives_takes_nothing(admin: AdminClient) -> None:
    w = await world(admin)
    await sell(admin, w["card"]["id"], "WASH")
    late = redemption(w["t1"], w["card"]["pan"])
    assert (await reverse(admin, late)).outcome is Outcome.APPROVED  # the tombstone
    [answer] = await pos(admin, late)
    assert answer.outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    listed = await admin.ok("GET", f"/v1/cards/{w['card']['id']}/service-packages")
    assert listed["items"][0]["uses_left"] == 3


async def test_the_same_sale_sent_twice_at_once_sells_one_package(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    sales = await store_balance(admin, "S1", "sales")
    answers = await asyncio.gather(*(sell(admin, w["card"]["id"], "WASH", key="twice")
                                     for _ in range(3)))  # fmt: skip
    assert sorted(status for status, _ in answers) == [200, 200, 201], answers
    assert len({body["id"] for _, body in answers}) == 1
    assert await store_balance(admin, "S1", "sales") == sales + 10_000
    rows = await sql_rows(db_url, "SELECT id FROM service_entitlements")
    assert len(rows) == 1


# --- the terms of the sale -----------------------------------------------------------------------


async def test_a_package_redeems_in_the_stores_of_its_sale_not_a_later_narrowing(
    admin: AdminClient, db_url: str
) -> None:
    """Audit finding: a package's redeemable stores were the product's of the day of the
    redemption, so narrowing the product refused packages already sold. Ten washes sold
    valid in S1 and S2 stay valid in S2 after HQ narrows the product to S1; a package sold
    after the change is refused in S2."""
    w = await world(admin)
    pan = w["card"]["pan"]
    await product(admin, "TWO", uses=10, price_fen=10_000, stores=["S1", "S2"])
    _, before = await sell(admin, w["card"]["id"], "TWO")
    assert before["stores"] == ["S1", "S2"]
    narrowed = await admin.ok("PATCH", f"{PRODUCTS}/TWO", json={"stores": ["S1"]})
    assert narrowed["stores"] == ["S1"]
    [kept] = await pos(admin, redemption(w["t2"], pan, product="TWO"))
    assert (kept.outcome, kept.uses_left) == (Outcome.APPROVED, 9)
    [chosen] = await pos(admin, redemption(w["t2"], pan))  # "" = the card's choice
    assert (chosen.outcome, chosen.uses_left) == (Outcome.APPROVED, 8)
    listed = await admin.ok("GET", f"/v1/cards/{w['card']['id']}/service-packages")
    assert [p["stores"] for p in listed["items"]] == [["S1", "S2"]]

    later = await issue(admin, "S1")
    _, after = await sell(admin, later["id"], "TWO")
    assert after["stores"] == ["S1"]
    before_counts = await counts(db_url)
    [refused] = await pos(admin, redemption(w["t2"], later["pan"], product="TWO"))
    assert (refused.outcome, refused.refusal) == (Outcome.NOT_PERMITTED, "service_wrong_store")
    [chosen] = await pos(admin, redemption(w["t2"], later["pan"]))
    assert (chosen.outcome, chosen.refusal) == (Outcome.NOT_PERMITTED, "service_wrong_store")
    assert await counts(db_url) == before_counts  # refusals change nothing
    [here] = await pos(admin, redemption(w["t1"], later["pan"], product="TWO"))
    assert (here.outcome, here.uses_left) == (Outcome.APPROVED, 9)
    query = "SELECT stores FROM service_entitlements WHERE id = :i"
    stored = [(await sql_rows(db_url, query, i=p["id"]))[0]["stores"] for p in (before, after)]
    assert [json.loads(s) for s in stored] == [["S1", "S2"], ["S1"]]


async def test_a_package_keeps_the_uses_and_validity_of_its_sale_not_a_later_change(
    admin: AdminClient,
) -> None:
    """The other terms a package is redeemed by (the uses sold, the expiry) are its own too:
    after HQ cuts the product from 10 uses for 12 months to 5 for 1, a package sold before
    takes 8 uses at once and redeems after the new month is over; one sold after has 5 uses
    and is expired by then."""
    w = await world(admin)
    pan = w["card"]["pan"]
    await product(admin, "LONG", uses=10, price_fen=10_000)
    _, before = await sell(admin, w["card"]["id"], "LONG")
    await admin.ok("PATCH", f"{PRODUCTS}/LONG", json={"uses": 5, "validity_months": 1})
    later = await issue(admin, "S1")
    _, after = await sell(admin, later["id"], "LONG")
    assert (before["uses_total"], after["uses_total"]) == (10, 5)
    assert after["expires_ms"] < before["expires_ms"]
    [eight] = await pos(admin, redemption(w["t1"], pan, product="LONG", uses=8))
    assert (eight.outcome, eight.uses_left) == (Outcome.APPROVED, 2)
    [six] = await pos(admin, redemption(w["t1"], later["pan"], product="LONG", uses=6))
    assert (six.outcome, six.refusal) == (Outcome.INSUFFICIENT_FUNDS, "service_no_uses_left")
    services = admin.app[SERVICE_CARDS_KEY]
    now = services.clock_ms()
    services.clock_ms = lambda: now + 70 * 86_400_000  # past the new month's end, not the year's
    [kept] = await pos(admin, redemption(w["t1"], pan, product="LONG"))
    assert (kept.outcome, kept.uses_left) == (Outcome.APPROVED, 1)
    [old] = await pos(admin, redemption(w["t1"], later["pan"], product="LONG"))
    assert (old.outcome, old.refusal) == (Outcome.NOT_PERMITTED, "service_expired")


def test_packages_from_before_0009_get_their_products_stores_of_the_upgrade(db_url: str) -> None:
    """0009: a package sold before it gets its product's stores as they are (what its
    redemptions read until then); one whose product is gone gets the store that sold it.
    Each reads back as the package's own stores."""
    config = migrate._alembic_config(db_url)
    command.downgrade(config, "0008")
    definition = (
        '{{"price_fen": 10000, "refund_after_expiry": false, "refund_fee_fen": 0, '
        '"refund_policy": "pro_rata", "single_use_price_fen": 1000, "stores": {}, '
        '"uses": 10, "validity_months": 12}}'
    )
    products = [("TWO", '["S1", "S2"]'), ("ALL", "[]")]
    packages = [(1, "TWO", "S1"), (2, "ALL", "S1"), (3, "GONE", "S3"), (20_003, "TWO", "S2")]
    asyncio.run(
        sql_execute(
            db_url,
            *[
                "INSERT INTO service_products (code, name, legal_entity, definition, state, "  # noqa: S608
                f"created_at_ms, updated_at_ms) VALUES ('{code}', '{code}', 'LE1', "
                f"'{definition.format(stores)}', 'active', 0, 0)"
                for code, stores in products
            ],
            *[
                "INSERT INTO service_entitlements (id, product, holder, member_id, store, "  # noqa: S608
                "uses_total, uses_left, price_fen, refund_policy, refund_fee_fen, "
                "single_use_price_fen, refund_after_expiry, sold_ms, expires_ms, state, "
                "sale_key, refund_key, refunded_fen, updated_at_ms) VALUES "
                f"({i}, '{code}', 7, NULL, '{store}', 10, 5, 10000, 'pro_rata', 0, 1000, "
                f"FALSE, 0, 1, 'active', '{store}/k{i}', NULL, 0, 0)"
                for i, code, store in packages
            ],
        )
    )
    command.upgrade(config, "head")
    rows = asyncio.run(sql_rows(db_url, "SELECT * FROM service_entitlements ORDER BY id"))
    assert [(r["id"], entitlement_of(r).stores) for r in rows] == [
        (1, frozenset({"S1", "S2"})),
        (2, frozenset()),  # every store, as its product
        (3, frozenset({"S3"})),  # its product is gone: where it was sold
        (20_003, frozenset({"S1", "S2"})),  # in a later fill
    ]


# --- audit findings (races, the cap, refunds after a reversal, refund retries) -------------------


async def test_a_redemption_losing_its_package_to_another_terminal_takes_another_one(
    admin: AdminClient, monkeypatch: Any
) -> None:
    """Audit finding: two terminals redeeming "any package" at once both chose the package
    expiring first (1 use left); the loser was declined `service_no_uses_left` although
    the card's other package had uses. Now it reads again and takes the other one."""
    w = await world(admin)
    pan, card_id = w["card"]["pan"], w["card"]["id"]
    _, first = await sell(admin, card_id, "WASH")
    [two] = await pos(admin, redemption(w["t1"], pan, product="WASH", uses=2))
    assert two.uses_left == 1
    _, second = await sell(admin, card_id, "WASH")
    services = admin.app[SERVICE_CARDS_KEY]
    choose, chosen = services._choose, []
    both_read = asyncio.Barrier(2)

    async def choose_together(*args: Any, **kwargs: Any) -> Any:
        found = await choose(*args, **kwargs)
        assert found[0] is not None
        chosen.append(found[0].id)
        if len(chosen) <= 2:  # both first reads are made before either takes
            await both_read.wait()
        return found

    monkeypatch.setattr(services, "_choose", choose_together)
    t3 = await terminal(admin, "S1")
    answers = await asyncio.gather(*(pos(admin, redemption(tid, pan)) for tid in (w["t1"], t3)))
    assert chosen[:2] == [first["id"], first["id"]]
    assert sorted((a.outcome, a.uses_left) for [a] in answers) == [
        (Outcome.APPROVED, 0), (Outcome.APPROVED, 2)]  # fmt: skip
    listed = await admin.ok("GET", f"/v1/cards/{card_id}/service-packages")
    assert {p["id"]: p["uses_left"] for p in listed["items"]} == {first["id"]: 0,
                                                                  second["id"]: 2}  # fmt: skip


async def test_a_lost_take_whose_package_was_refunded_meanwhile_is_declined_refunded(
    admin: AdminClient, monkeypatch: Any
) -> None:
    """Choosing again after a lost take answers the refusal of the package now: refunded."""
    w = await world(admin)
    pan = w["card"]["pan"]
    _, sold = await sell(admin, w["card"]["id"], "WASH")
    services = admin.app[SERVICE_CARDS_KEY]
    choose = services._choose
    refunded = False

    async def refund_after_choosing(*args: Any, **kwargs: Any) -> Any:
        nonlocal refunded
        found = await choose(*args, **kwargs)
        if not refunded:
            refunded = True
            await admin.ok("POST", f"/v1/service-packages/{sold['id']}/refund",
                           json={"key": "rf-race"})  # fmt: skip
        return found

    monkeypatch.setattr(services, "_choose", refund_after_choosing)
    [answer] = await pos(admin, redemption(w["t1"], pan))
    assert (answer.outcome, answer.refusal) == (Outcome.NOT_PERMITTED, "service_refunded")


async def test_the_cap_counts_usable_packages_and_old_live_ones_stay_redeemable(
    admin: AdminClient, monkeypatch: Any
) -> None:
    """Audit finding: used-up and expired packages counted against the card's cap for ever,
    and a redemption read only the newest packages of any state, so an older live package
    fell out of view. Cap 2: a used-up WASH no longer counts; the old SPA still redeems."""
    monkeypatch.setattr(limits, "SERVICE_ENTITLEMENTS_PER_CARD_MAX", 2)
    w = await world(admin)
    card_id, pan = w["card"]["id"], w["card"]["pan"]
    _, spa = await sell(admin, card_id, "SPA")
    _, used_up = await sell(admin, card_id, "WASH")
    [gone] = await pos(admin, redemption(w["t1"], pan, product="WASH", uses=3))
    assert (gone.outcome, gone.uses_left) == (Outcome.APPROVED, 0)
    status, wash = await sell(admin, card_id, "WASH")
    assert status == 201, wash  # SPA and the new WASH are the 2 usable ones
    status, answer = await sell(admin, card_id, "WASH")
    assert (status, answer["error"]["code"]) == (409, "service_too_many_packages")
    # "" = the card's choice: the SPA, sold first (both expire at the same month's end).
    [kept] = await pos(admin, redemption(w["t1"], pan))
    assert (kept.outcome, kept.uses_left) == (Outcome.APPROVED, 1)
    listed = await admin.ok("GET", f"/v1/cards/{card_id}/service-packages")
    assert [p["id"] for p in listed["items"]] == [wash["id"], used_up["id"], spa["id"]]
    # Expired packages no longer count either.
    services = admin.app[SERVICE_CARDS_KEY]
    now = services.clock_ms()
    services.clock_ms = lambda: now + 400 * 86_400_000  # past the 12 months' end
    [old] = await pos(admin, redemption(w["t1"], pan, product="SPA"))
    assert (old.outcome, old.refusal) == (Outcome.NOT_PERMITTED, "service_expired")
    status, answer = await sell(admin, card_id, "WASH")
    assert status == 201, answer


async def test_a_redemption_reversed_after_the_refund_is_refunded_by_a_second_refund_once(
    admin: AdminClient,
) -> None:
    """Audit finding: a redemption reversed after its package was refunded gave the use
    back to a dead package; the refund had paid only the uses left then. 10,000 fen for 3
    uses, 1 used, refunded 6,667; the use comes back; a second refund pays 3,333 (10,000
    in all); a third pays nothing."""
    w = await world(admin)
    pan = w["card"]["pan"]
    _, sold = await sell(admin, w["card"]["id"], "WASH")
    used = redemption(w["t1"], pan)
    [answer] = await pos(admin, used)
    assert answer.uses_left == 2
    path = f"/v1/service-packages/{sold['id']}/refund"
    sales = await store_balance(admin, "S1", "sales")
    first = await admin.ok("POST", path, json={"key": "rf-1"})
    assert (first["refund_fen"], first["refunded_fen"]) == (6_667, 6_667)
    assert (await reverse(admin, used)).outcome is Outcome.APPROVED
    listed = await admin.ok("GET", f"/v1/cards/{w['card']['id']}/service-packages")
    assert (listed["items"][0]["state"], listed["items"][0]["uses_left"]) == ("refunded", 3)
    second = await admin.ok("POST", path, json={"key": "rf-2"})
    assert (second["refund_fen"], second["refunded_fen"], second["replayed"]) == (
        3_333, 10_000, False)  # fmt: skip
    assert await store_balance(admin, "S1", "sales") == sales - 10_000
    status, answer = await admin.call("POST", path, json={"key": "rf-3"})
    assert (status, answer["error"]["code"]) == (409, "service_refunded")
    again = await admin.ok("POST", path, json={"key": "rf-1"})
    assert (again["refund_fen"], again["transfer_id"], again["replayed"]) == (
        6_667, first["transfer_id"], True)  # fmt: skip
    again = await admin.ok("POST", path, json={"key": "rf-2"})
    assert (again["refund_fen"], again["transfer_id"], again["replayed"]) == (
        3_333, second["transfer_id"], True)  # fmt: skip
    assert await store_balance(admin, "S1", "sales") == sales - 10_000


async def test_a_refund_marked_but_not_paid_is_paid_before_any_other_refund(
    admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: a refund marked and then not paid (the ledger away), a use given back,
    and a refund under a new key counted the unpaid one as paid. Now the new key is refused
    409 `refund_pending` until the first key's retry pays; then the second pays the rest."""
    w = await world(admin)
    pan = w["card"]["pan"]
    _, sold = await sell(admin, w["card"]["id"], "WASH")
    used = redemption(w["t1"], pan)
    await pos(admin, used)
    path = f"/v1/service-packages/{sold['id']}/refund"
    sales = await store_balance(admin, "S1", "sales")
    services = admin.app[SERVICE_CARDS_KEY]

    async def away(*_args: Any, **_kwargs: Any) -> Any:
        raise ServicesUnavailable("the ledger went away")

    with monkeypatch.context() as patched:
        patched.setattr(services, "_submit_one", away)
        status, _ = await admin.call("POST", path, json={"key": "rf-1"})
    assert status == 503
    assert (await reverse(admin, used)).outcome is Outcome.APPROVED
    status, answer = await admin.call("POST", path, json={"key": "rf-2"})
    assert (status, answer["error"]["code"]) == (409, "refund_pending")
    first = await admin.ok("POST", path, json={"key": "rf-1"})
    assert first["refund_fen"] == 6_667
    second = await admin.ok("POST", path, json={"key": "rf-2"})
    assert (second["refund_fen"], second["refunded_fen"]) == (3_333, 10_000)
    assert await store_balance(admin, "S1", "sales") == sales - 10_000


async def test_a_refund_retried_by_another_operator_with_another_receipt_is_replayed(
    admin: AdminClient,
) -> None:
    """Audit finding: the retry rebuilt the transfer's metadata from its own caller and
    receipt, so the ledger answered `idempotency_key_reused`. The first refund answers."""
    w = await world(admin)
    _, sold = await sell(admin, w["card"]["id"], "WASH")
    path = f"/v1/service-packages/{sold['id']}/refund"
    first = await admin.ok("POST", path, json={"key": "rf-1", "receipt": "R2"})
    assert first["refund_fen"] == 10_000
    sales = await store_balance(admin, "S1", "sales")
    other = await admin.token("store_supervisor", "store", "S1")
    status, again = await admin.call("POST", path, other, {"key": "rf-1", "receipt": "R9"})
    assert status == 200, again
    assert (again["refund_fen"], again["transfer_id"], again["replayed"]) == (
        10_000, first["transfer_id"], True)  # fmt: skip
    assert await store_balance(admin, "S1", "sales") == sales


async def test_a_card_or_member_holding_a_usable_package_is_not_closed_or_deleted(
    admin: AdminClient, db_url: str
) -> None:
    """The member paid for the package: closing the card, or deleting its member (which
    closes it), is 409 and changes nothing while the package is usable; once it is
    refunded the close goes through."""
    w = await world(admin)
    card_id, member_id = w["card"]["id"], w["card"]["member_id"]
    _, sold = await sell(admin, card_id, "WASH")
    before = await counts(db_url)
    status, answer = await admin.call("POST", f"/v1/cards/{card_id}/close",
                                      json={"receipt": "C1"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "card_has_services")
    status, answer = await admin.call("DELETE", f"/v1/members/{member_id}")
    assert (status, answer["error"]["code"]) == (409, "member_has_services")
    assert await counts(db_url) == before
    assert (await admin.ok("GET", f"/v1/cards/{card_id}"))["state"] == "active"
    await admin.ok("POST", f"/v1/service-packages/{sold['id']}/refund",
                   json={"key": "rf-1", "receipt": "R2"})  # fmt: skip
    closed = await admin.ok("POST", f"/v1/cards/{card_id}/close", json={"receipt": "C1"})
    assert closed["state"] == "closed"


async def test_a_refund_key_that_paid_nothing_answers_the_same_after_a_later_refund(
    admin: AdminClient,
) -> None:
    """Used up, refunded 0 under rf-1; a reversal gives the uses back and rf-2 pays 100.00:
    rf-1 again is its own refund (0, replayed), not a 409."""
    w = await world(admin)
    pan = w["card"]["pan"]
    _, sold = await sell(admin, w["card"]["id"], "WASH")
    used = redemption(w["t1"], pan, uses=3)
    assert (await pos(admin, used))[0].uses_left == 0
    path = f"/v1/service-packages/{sold['id']}/refund"
    assert (await admin.ok("POST", path, json={"key": "rf-1"}))["refund_fen"] == 0
    assert (await reverse(admin, used)).outcome is Outcome.APPROVED
    assert (await admin.ok("POST", path, json={"key": "rf-2"}))["refund_fen"] == 10_000
    again = await admin.ok("POST", path, json={"key": "rf-1"})
    assert (again["refund_fen"], again["replayed"], again["transfer_id"]) == (0, True, None)


async def test_the_sale_that_loses_the_grant_budget_race_says_its_key_is_spent(
    admin: AdminClient, db_url: str
) -> None:
    """Two sales at once against a grant's last package: the loser's money moves and is
    given back, and its key is spent. It was answered 403 `grant_budget_exceeded` (as if
    nothing had happened; a resend then got 409 `service_sale_undone`); it is answered 409
    `service_sale_undone` at once, as docs/service-cards.md says."""
    w = await world(admin)
    await admin.ok("POST", "/v1/grants", json={"store": "S2", "function": "service",
                                               "budget_count": 1})  # fmt: skip
    card = w["card"]["id"]
    answers = await asyncio.gather(
        sell(admin, card, "WASH", store="S2", key="race-a"),
        sell(admin, card, "WASH", store="S2", key="race-b"),
    )
    statuses = sorted(status for status, _ in answers)
    assert statuses in ([201, 403], [201, 409]), answers
    [(_, lost)] = [a for a in answers if a[0] != 201]
    # Refused before its money moved (it read the grant after the winner wrote): 403, and
    # nothing happened. Refused after (both read it first): the money went back and the key
    # is spent, which the answer must say.
    undone = await sql_rows(
        db_url, "SELECT count(*) AS n FROM ledger_transfers WHERE reason = 'service_sale_undone'"
    )
    expected = "service_sale_undone" if undone[0]["n"] else "grant_budget_exceeded"
    assert lost["error"]["code"] == expected, (lost, undone)


async def test_a_further_refund_of_an_older_package_whose_product_refunds_nothing_now(
    admin: AdminClient, db_url: str
) -> None:
    """A package sold before migration 0007 takes its product's refund terms as they are at
    the refund. Refunded, then a use given back by a reversal, then the product's policy
    made `none`: the further refund was a 500 (an assertion); it is 409
    `service_refunded`, nothing more owed."""
    w = await world(admin)
    pan = w["card"]["pan"]
    _, sold = await sell(admin, w["card"]["id"], "WASH")
    await sql_execute(db_url, "UPDATE service_entitlements SET refund_policy = NULL, "  # noqa: S608 - the test's own id
                      "refund_fee_fen = NULL, single_use_price_fen = NULL, "
                      f"refund_after_expiry = NULL WHERE id = {int(sold['id'])}")  # fmt: skip
    used = redemption(w["t1"], pan)
    [answer] = await pos(admin, used)
    assert answer.uses_left == 2
    path = f"/v1/service-packages/{sold['id']}/refund"
    first = await admin.ok("POST", path, json={"key": "rf-1"})
    assert first["refund_fen"] == 6_667
    assert (await reverse(admin, used)).outcome is Outcome.APPROVED
    await admin.ok("PATCH", "/v1/service-products/WASH", json={"refund_policy": "none"})
    status, body = await admin.call("POST", path, json={"key": "rf-2"})
    assert (status, body["error"]["code"]) == (409, "service_refunded"), body


async def test_a_product_priced_0_before_the_rule_can_still_be_retired(
    admin: AdminClient, db_url: str
) -> None:
    """A price of 0 was accepted before a product had to cost at least 1 fen; such a product
    is retired (or renamed) with its price as it is, and only a change of price is held to
    the rule (the session's diff review)."""
    await world(admin)
    await sql_execute(db_url, "UPDATE service_products SET definition = "
                      "replace(definition, '\"price_fen\": 10000', '\"price_fen\": 0') "
                      "WHERE code = 'WASH'")  # fmt: skip
    [row] = await sql_rows(db_url, "SELECT definition FROM service_products WHERE code = 'WASH'")
    assert '"price_fen": 0' in row["definition"]
    retired = await admin.ok("PATCH", "/v1/service-products/WASH", json={"state": "retired"})
    assert retired["state"] == "retired"
    got, answer = await admin.call("PATCH", "/v1/service-products/WASH", json={"price_fen": 0})
    assert (got, answer["error"]["code"]) == (400, "invalid_value")
