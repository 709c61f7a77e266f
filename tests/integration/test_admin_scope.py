"""A store officer cannot read or change another store's data through any admin route.

Root builds a world in store S1 (legal entity LE1): a terminal, a grant, members, cards with
value (a sold gift card among them), a staff user with a token; and a sold gift card in S3
(LE2), so that by 2099 both entities have breakage a leaking report would show. Then officers
of store S2 (same legal entity) call every route of the admin route table aimed at S1's
objects. Each call must be refused 403 (or, for a listing, answer only objects of S2), and the
database must be exactly as it was: every table's rows and every account's balances. A route
missing from the table below fails the test, so a new route cannot skip the check.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from cardcore.api.app import ADMIN_ROUTES
from cardcore.db import make_engine
from cardcore.ledger.schema import metadata
from tests.helpers import AdminClient

REFUSED = "refused"  # 403 role_forbidden or scope_forbidden
SHARED = "shared"  # group-wide objects every role may read (card classes)


@dataclass(frozen=True)
class Call:
    path: str  # with S1's ids filled in
    expect: str | Callable[[Any], bool]  # REFUSED, SHARED, or a check of a 200 answer
    body: dict[str, Any] | None = None
    query: dict[str, Any] | None = None


async def _world(admin: AdminClient) -> dict[str, Any]:
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    ok = admin.ok
    await ok("POST", "/v1/card-classes", json={"code": "ORD", "name": "Ordinary", "named": True})
    await ok("POST", "/v1/card-classes", json={"code": "GIFT", "name": "Gift", "named": False,
             "gift": True, "denominations": [10_000], "validity_months": 36})  # fmt: skip
    grant = await ok("POST", "/v1/grants", json={"store": "S1", "function": "stored_value"})
    await ok("POST", "/v1/grants", json={"store": "S1", "function": "gift"})
    await ok("POST", "/v1/terminals", json={"tid": "T0000001", "mid": "M00000000000001",
             "store": "S1"})  # fmt: skip
    members = [
        await ok("POST", "/v1/members", json={"mobile": f"1380000000{i}", "name": f"M{i}",
                 "home_store": "S1", "id_type": "passport", "id_number": f"E1234567{i}"})
        for i in (1, 2)
    ]  # fmt: skip
    card = await ok("POST", "/v1/cards", json={"class_code": "ORD", "store": "S1",
                    "member_id": members[0]["id"]})  # fmt: skip
    await ok("POST", f"/v1/cards/{card['id']}/topups", json={"amount": 10_000,
             "tender": "cash", "receipt": "R1", "key": "k1"})  # fmt: skip
    gift = await ok("POST", "/v1/cards", json={"class_code": "GIFT", "store": "S1"})
    # Sold gift cards in S1 (LE1) and S3 (LE2): value left on them by 2099 is breakage that a
    # report leaking another store's or entity's cards would show.
    await ok("POST", f"/v1/cards/{gift['id']}/sell", json={"amount": 10_000, "tender": "cash",
             "receipt": "R2", "key": "k2"})  # fmt: skip
    await ok("POST", "/v1/grants", json={"store": "S3", "function": "gift"})
    elsewhere = await ok("POST", "/v1/cards", json={"class_code": "GIFT", "store": "S3"})
    await ok("POST", f"/v1/cards/{elsewhere['id']}/sell", json={"amount": 10_000,
             "tender": "cash", "receipt": "R3", "key": "k3"})  # fmt: skip
    await ok("POST", "/v1/users", json={"name": "s3crm", "role": "store_crm",
             "scope_kind": "store", "scope_id": "S3"})  # fmt: skip
    user = await ok("POST", "/v1/users", json={"name": "s1crm", "role": "store_crm",
                    "scope_kind": "store", "scope_id": "S1"})  # fmt: skip
    token = await ok("POST", f"/v1/users/{user['id']}/tokens", json={"label": "t"})
    # --- service and manager cards ---
    await ok("POST", "/v1/grants", json={"store": "S1", "function": "service"})
    await ok("POST", "/v1/grants", json={"store": "S1", "function": "manager"})
    await ok("POST", "/v1/service-products", json={"code": "WASH", "name": "Car wash",
             "legal_entity": "LE1", "uses": 10, "price_fen": 30_000,
             "validity_months": 12})  # fmt: skip
    package = await ok("POST", f"/v1/cards/{card['id']}/service-packages", json={
        "product": "WASH", "tender": "cash", "key": "sk1"})  # fmt: skip
    manager = await ok("POST", "/v1/manager-cards", json={"staff_user_id": user["id"],
                       "store": "S1", "max_percent_bp": 1000, "daily_total_fen": 5000,
                       "reasons": ["damaged"]})  # fmt: skip
    assert (package["id"], manager["id"]) == (1, 1)  # the ids the calls below name
    # --- end service and manager cards ---
    # --- points ---
    await ok("POST", "/v1/points/programs", json={"code": "CLUB", "name": "Club",
             "asset": "PTS:CLUB"})  # fmt: skip
    await ok("POST", "/v1/points/programs/CLUB/rules", json={"code": "S1R", "kind": "base",
             "points": 1, "per_fen": 100, "store": "S1"})  # fmt: skip
    # --- end points ---
    # --- coupons ---
    await ok("POST", "/v1/grants", json={"store": "S1", "function": "coupon"})
    await ok("POST", "/v1/coupon-campaigns", json={"code": "S1OFF", "name": "S1 off",
             "kind": "amount_off", "store": "S1", "valid_from_ms": 1_700_000_000_000,
             "valid_to_ms": 1_900_000_000_000, "value_fen": 500})  # fmt: skip
    await ok("PATCH", "/v1/coupon-campaigns/S1OFF", json={"state": "active"})
    await ok("POST", "/v1/coupon-campaigns/S1OFF/imports", json={"codes": ["S1-COUPON-1"]})
    await ok("POST", "/v1/coupon-keys", json={"legal_entity": "LE1", "kid": "le1-k1"})
    # --- end coupons ---
    return {
        "grant": grant["id"],
        "member": members[0]["id"],
        "duplicate": members[1]["id"],
        "card": card["id"],
        "account": card["account_id"],
        "pan": card["pan"],
        "gift": gift["id"],
        "user": user["id"],
        "token": token["id"],
    }


def _items_outside_s1(answer: Any) -> bool:
    items = answer["items"]
    text_ = json.dumps(items)
    return '"S1"' not in text_ and "LE2" not in text_


def _calls(w: dict[str, Any]) -> dict[tuple[str, str], Call]:
    card, member = w["card"], w["member"]
    pay = {"amount": 100, "tender": "cash", "receipt": "R9", "key": "k9"}
    return {
        ("POST", "/v1/legal-entities"): Call("/v1/legal-entities", REFUSED,
                                             {"id": "LE9", "name": "x"}),
        ("GET", "/v1/legal-entities"): Call("/v1/legal-entities",
                                            lambda a: [e["id"] for e in a["items"]] == ["LE1"]),
        ("GET", "/v1/legal-entities/{entity_id}"): Call("/v1/legal-entities/LE2", REFUSED),
        ("POST", "/v1/stores"): Call("/v1/stores", REFUSED, {"id": "S9", "legal_entity": "LE1",
                                     "name": "x", "region": "r", "city": "c"}),
        ("GET", "/v1/stores"): Call("/v1/stores",
                                    lambda a: [s["id"] for s in a["items"]] == ["S2"]),
        ("GET", "/v1/stores/{store_id}"): Call("/v1/stores/S1", REFUSED),
        ("PATCH", "/v1/stores/{store_id}"): Call("/v1/stores/S1", REFUSED, {"name": "Mine"}),
        ("POST", "/v1/users"): Call("/v1/users", REFUSED, {"name": "evil", "role": "store_crm",
                                    "scope_kind": "store", "scope_id": "S1"}),
        ("GET", "/v1/users"): Call("/v1/users", _items_outside_s1),
        ("GET", "/v1/users/{user_id}"): Call(f"/v1/users/{w['user']}", REFUSED),
        ("PATCH", "/v1/users/{user_id}"): Call(f"/v1/users/{w['user']}", REFUSED,
                                               {"state": "disabled"}),
        ("POST", "/v1/users/{user_id}/tokens"): Call(f"/v1/users/{w['user']}/tokens", REFUSED,
                                                     {"label": "stolen"}),
        ("GET", "/v1/users/{user_id}/tokens"): Call(f"/v1/users/{w['user']}/tokens", REFUSED),
        ("DELETE", "/v1/tokens/{token_id}"): Call(f"/v1/tokens/{w['token']}", REFUSED),
        ("POST", "/v1/grants"): Call("/v1/grants", REFUSED, {"store": "S1", "function": "gift"}),
        ("GET", "/v1/grants"): Call("/v1/grants", lambda a: a["items"] == []),
        ("DELETE", "/v1/grants/{grant_id}"): Call(f"/v1/grants/{w['grant']}", REFUSED),
        ("GET", "/v1/audit"): Call("/v1/audit", _items_outside_s1),
        ("POST", "/v1/terminals"): Call("/v1/terminals", REFUSED, {"tid": "T0000009",
                                        "mid": "M00000000000001", "store": "S1"}),
        ("GET", "/v1/terminals"): Call("/v1/terminals", lambda a: a["items"] == []),
        ("GET", "/v1/terminals/{tid}"): Call("/v1/terminals/T0000001", REFUSED),
        ("PATCH", "/v1/terminals/{tid}"): Call("/v1/terminals/T0000001", REFUSED,
                                               {"state": "disabled"}),
        ("POST", "/v1/members"): Call("/v1/members", REFUSED, {"mobile": "13800000009",
                                      "name": "x", "home_store": "S1"}),
        ("GET", "/v1/members"): Call("/v1/members", lambda a: a["items"] == []),
        ("POST", "/v1/members/lookup"): Call("/v1/members/lookup",
                                             lambda a: a["items"] == [],
                                             {"id_type": "passport", "id_number": "E12345671"}),
        ("GET", "/v1/members/{member_id}"): Call(f"/v1/members/{member}", REFUSED),
        ("PATCH", "/v1/members/{member_id}"): Call(f"/v1/members/{member}", REFUSED,
                                                   {"name": "Mine"}),
        ("DELETE", "/v1/members/{member_id}"): Call(f"/v1/members/{w['duplicate']}", REFUSED),
        ("POST", "/v1/members/{member_id}/merge"): Call(f"/v1/members/{member}/merge", REFUSED,
                                                        {"duplicate_id": w["duplicate"]}),
        ("POST", "/v1/members/{member_id}/consents"): Call(
            f"/v1/members/{member}/consents", REFUSED,
            {"purpose": "marketing", "granted": True, "source": "counter"}),
        ("GET", "/v1/members/{member_id}/consents"): Call(f"/v1/members/{member}/consents",
                                                          REFUSED),
        ("POST", "/v1/card-classes"): Call("/v1/card-classes", REFUSED,
                                           {"code": "X", "name": "x", "named": True}),
        ("GET", "/v1/card-classes"): Call("/v1/card-classes", SHARED),
        ("GET", "/v1/card-classes/{code}"): Call("/v1/card-classes/ORD", SHARED),
        ("PATCH", "/v1/card-classes/{code}"): Call("/v1/card-classes/ORD", REFUSED,
                                                   {"discount_bp": 9000}),
        ("POST", "/v1/cards"): Call("/v1/cards", REFUSED, {"class_code": "GIFT", "store": "S1"}),
        ("GET", "/v1/cards"): Call("/v1/cards", lambda a: a["items"] == []),
        ("POST", "/v1/card-batches"): Call("/v1/card-batches", REFUSED,
                                           {"class_code": "GIFT", "store": "S1", "count": 5}),
        ("GET", "/v1/cards/export"): Call(
            "/v1/cards/export", lambda a: len(str(a).strip().splitlines()) <= 1,
            query={"first_id": card, "last_id": w["gift"]}),
        ("POST", "/v1/cards/lookup"): Call("/v1/cards/lookup", REFUSED, {"pan": w["pan"]}),
        ("GET", "/v1/cards/{card_id}"): Call(f"/v1/cards/{card}", REFUSED),
        ("GET", "/v1/cards/{card_id}/transactions"): Call(f"/v1/cards/{card}/transactions",
                                                          REFUSED),
        ("GET", "/v1/accounts/{account_id}"): Call(f"/v1/accounts/{w['account']}", REFUSED),
        ("GET", "/v1/accounts/{account_id}/entries"): Call(
            f"/v1/accounts/{w['account']}/entries", REFUSED),
        ("POST", "/v1/cards/{card_id}/activate"): Call(f"/v1/cards/{card}/activate", REFUSED),
        ("POST", "/v1/cards/{card_id}/freeze"): Call(f"/v1/cards/{card}/freeze", REFUSED),
        ("POST", "/v1/cards/{card_id}/unfreeze"): Call(f"/v1/cards/{card}/unfreeze", REFUSED),
        ("POST", "/v1/cards/{card_id}/lost"): Call(f"/v1/cards/{card}/lost", REFUSED),
        ("POST", "/v1/cards/{card_id}/replace"): Call(f"/v1/cards/{card}/replace", REFUSED),
        ("POST", "/v1/cards/{card_id}/close"): Call(f"/v1/cards/{card}/close", REFUSED,
                                                    {"receipt": "R7"}),
        ("POST", "/v1/cards/{card_id}/topups"): Call(f"/v1/cards/{card}/topups", REFUSED, pay),
        ("POST", "/v1/cards/{card_id}/sell"): Call(f"/v1/cards/{w['gift']}/sell", REFUSED,
                                                   {**pay, "amount": 10_000}),
        ("POST", "/v1/cards/{card_id}/pin"): Call(f"/v1/cards/{card}/pin", REFUSED,
                                                  {"pin": "123456"}),
        ("POST", "/v1/cards/{card_id}/pin/verify"): Call(f"/v1/cards/{card}/pin/verify",
                                                         REFUSED, {"pin": "123456"}),
        ("POST", "/v1/cards/{card_id}/pin/unlock"): Call(f"/v1/cards/{card}/pin/unlock",
                                                         REFUSED),
        # --- service and manager cards ---
        ("POST", "/v1/service-products"): Call("/v1/service-products", REFUSED, {
            "code": "X", "name": "x", "legal_entity": "LE1", "uses": 1, "price_fen": 1,
            "validity_months": 1}),
        ("GET", "/v1/service-products"): Call("/v1/service-products", SHARED),
        ("GET", "/v1/service-products/{code}"): Call("/v1/service-products/WASH", SHARED),
        ("PATCH", "/v1/service-products/{code}"): Call("/v1/service-products/WASH", REFUSED,
                                                       {"price_fen": 1}),
        ("POST", "/v1/cards/{card_id}/service-packages"): Call(
            f"/v1/cards/{card}/service-packages", REFUSED,
            {"product": "WASH", "tender": "cash", "key": "sk9"}),
        ("GET", "/v1/cards/{card_id}/service-packages"): Call(
            f"/v1/cards/{card}/service-packages", REFUSED),
        ("POST", "/v1/service-packages/{package_id}/refund"): Call(
            "/v1/service-packages/1/refund", REFUSED, {"key": "rk9"}),
        ("POST", "/v1/manager-cards"): Call("/v1/manager-cards", REFUSED, {
            "staff_user_id": w["user"], "store": "S1", "max_percent_bp": 1000,
            "daily_total_fen": 5000, "reasons": ["damaged"]}),
        ("GET", "/v1/manager-cards"): Call("/v1/manager-cards", lambda a: a["items"] == []),
        ("GET", "/v1/manager-cards/{card_id}"): Call("/v1/manager-cards/1", REFUSED),
        ("PATCH", "/v1/manager-cards/{card_id}"): Call("/v1/manager-cards/1", REFUSED,
                                                       {"state": "disabled"}),
        ("POST", "/v1/manager-cards/{card_id}/pin"): Call("/v1/manager-cards/1/pin", REFUSED,
                                                          {"pin": "123456"}),
        ("GET", "/v1/manager-cards/{card_id}/authorizations"): Call(
            "/v1/manager-cards/1/authorizations", REFUSED),
        # --- end service and manager cards ---
        # --- points ---
        ("POST", "/v1/points/programs"): Call("/v1/points/programs", REFUSED, {
            "code": "P9", "name": "x", "asset": "PTS:P9"}),
        ("GET", "/v1/points/programs"): Call("/v1/points/programs", SHARED),
        ("GET", "/v1/points/programs/{code}"): Call("/v1/points/programs/CLUB", SHARED),
        ("PATCH", "/v1/points/programs/{code}"): Call("/v1/points/programs/CLUB", REFUSED,
                                                      {"name": "Mine"}),
        ("POST", "/v1/points/programs/{code}/rules"): Call(
            "/v1/points/programs/CLUB/rules", REFUSED,
            {"code": "X", "kind": "base", "points": 9, "per_fen": 1, "store": "S1"}),
        ("GET", "/v1/points/programs/{code}/rules"): Call(
            "/v1/points/programs/CLUB/rules",
            lambda a: all(r["store"] != "S1" for r in a["items"])),
        ("GET", "/v1/points/programs/{code}/rules/{rule}"): Call(
            "/v1/points/programs/CLUB/rules/S1R", REFUSED),
        ("PATCH", "/v1/points/programs/{code}/rules/{rule}"): Call(
            "/v1/points/programs/CLUB/rules/S1R", REFUSED, {"points": 9}),
        ("GET", "/v1/cards/{card_id}/points"): Call(f"/v1/cards/{card}/points", REFUSED),
        ("GET", "/v1/cards/{card_id}/points/history"): Call(
            f"/v1/cards/{card}/points/history", REFUSED),
        ("GET", "/v1/members/{member_id}/points"): Call(f"/v1/members/{member}/points",
                                                        REFUSED),
        ("POST", "/v1/cards/{card_id}/points/redemptions"): Call(
            f"/v1/cards/{card}/points/redemptions", REFUSED,
            {"points": 1, "reward": "R1", "key": "pk1"}),
        ("POST", "/v1/cards/{card_id}/points/redemptions/{key}/reversal"): Call(
            f"/v1/cards/{card}/points/redemptions/pk1/reversal", REFUSED),
        ("POST", "/v1/cards/{card_id}/points/transfers"): Call(
            f"/v1/cards/{card}/points/transfers", REFUSED,
            {"to_card_id": w["gift"], "points": 1, "key": "pt1"}),
        # --- end points ---
        # --- coupons ---
        ("POST", "/v1/coupon-campaigns"): Call("/v1/coupon-campaigns", REFUSED, {
            "code": "X9", "name": "x", "kind": "amount_off", "store": "S1",
            "valid_from_ms": 1_700_000_000_000, "valid_to_ms": 1_800_000_000_000,
            "value_fen": 100}),
        ("GET", "/v1/coupon-campaigns"): Call("/v1/coupon-campaigns",
                                              lambda a: a["items"] == []),
        ("GET", "/v1/coupon-campaigns/{code}"): Call("/v1/coupon-campaigns/S1OFF", REFUSED),
        ("PATCH", "/v1/coupon-campaigns/{code}"): Call("/v1/coupon-campaigns/S1OFF", REFUSED,
                                                       {"state": "paused"}),
        ("GET", "/v1/coupon-campaigns/{code}/figures"): Call(
            "/v1/coupon-campaigns/S1OFF/figures", REFUSED),
        ("GET", "/v1/coupon-campaigns/{code}/codes"): Call(
            "/v1/coupon-campaigns/S1OFF/codes", REFUSED),
        ("POST", "/v1/coupon-campaigns/{code}/codes"): Call(
            "/v1/coupon-campaigns/S1OFF/codes", REFUSED, {"count": 1}),
        ("POST", "/v1/coupon-campaigns/{code}/imports"): Call(
            "/v1/coupon-campaigns/S1OFF/imports", REFUSED, {"codes": ["S2-STEAL-1"]}),
        ("POST", "/v1/coupon-campaigns/{code}/issues"): Call(
            "/v1/coupon-campaigns/S1OFF/issues", REFUSED, {"member_ids": [member]}),
        ("POST", "/v1/coupon-campaigns/{code}/enrolments"): Call(
            "/v1/coupon-campaigns/S1OFF/enrolments", REFUSED, {"member_ids": [member]}),
        ("GET", "/v1/coupon-campaigns/{code}/enrolments"): Call(
            "/v1/coupon-campaigns/S1OFF/enrolments", REFUSED),
        ("DELETE", "/v1/coupon-campaigns/{code}/enrolments/{member_id}"): Call(
            f"/v1/coupon-campaigns/S1OFF/enrolments/{member}", REFUSED),
        ("GET", "/v1/coupons/{code}"): Call("/v1/coupons/S1-COUPON-1", REFUSED),
        ("POST", "/v1/coupons/{code}/void"): Call("/v1/coupons/S1-COUPON-1/void", REFUSED),
        ("GET", "/v1/coupons/{code}/qr"): Call("/v1/coupons/S1-COUPON-1/qr", REFUSED),
        ("POST", "/v1/coupon-keys"): Call("/v1/coupon-keys", REFUSED,
                                          {"legal_entity": "LE1", "kid": "evil"}),
        ("GET", "/v1/coupon-keys"): Call("/v1/coupon-keys", _items_outside_s1),
        ("POST", "/v1/coupon-keys/{kid}/retire"): Call("/v1/coupon-keys/le1-k1/retire",
                                                       REFUSED),
        # --- end coupons ---
        ("GET", "/v1/reports/breakage"): Call(
            "/v1/reports/breakage",
            lambda a: all(e[k]["cards"] == 0 for e in a["entities"]
                          for k in ("gift", "stored_value")),
            query={"as_of": "2099-12"}),
        ("GET", "/v1/reports/settlements"): Call(
            "/v1/reports/settlements", lambda a: a["items"] == [], query={"store": "S1"}),
    }  # fmt: skip


async def _snapshot(db_url: str) -> dict[str, list[Any]]:
    """Every row of every table (the audit log included), in a stable order."""
    engine = make_engine(db_url)
    out: dict[str, list[Any]] = {}
    try:
        async with engine.connect() as conn:
            for table in metadata.sorted_tables:
                rows = (await conn.execute(text(f"SELECT * FROM {table.name}"))).all()  # noqa: S608
                out[table.name] = sorted(repr(tuple(r)) for r in rows)
    finally:
        await engine.dispose()
    return out


async def test_a_store_officer_reaches_no_other_stores_data_through_any_route(
    admin: AdminClient, db_url: str
) -> None:
    world = await _world(admin)
    calls = _calls(world)
    routes = {(r.method, r.path) for r in ADMIN_ROUTES}
    assert routes == set(calls), (
        f"routes without a scope check here: {sorted(routes - set(calls))}; "
        f"checks of routes that no longer exist: {sorted(set(calls) - routes)}"
    )
    # Root's report shows the world's breakage: the officers' empty one below is their scope.
    everything = await admin.ok("GET", "/v1/reports/breakage", as_of="2099-12")
    breakage = {e["legal_entity"]: e["gift"]["cards"] for e in everything["entities"]}
    assert breakage == {"LE1": 1, "LE2": 1}
    officers = {
        role: await admin.token(role, "store", "S2") for role in ("store_crm", "store_supervisor")
    }
    before = await _snapshot(db_url)
    seen = []
    for (method, _), call in sorted(calls.items()):
        for role, token in officers.items():
            status, answer = await admin.call(method, call.path, token, call.body,
                                              **(call.query or {}))  # fmt: skip
            where = (role, method, call.path, status, answer)
            if call.expect == REFUSED:
                assert status == 403, where
                assert answer["error"]["code"] in ("scope_forbidden", "role_forbidden"), where
            elif call.expect == SHARED:
                assert status == 200, where
            elif status == 200:
                assert callable(call.expect) and call.expect(answer), where
            else:
                assert status == 403, where  # a listing may also refuse the role outright
            seen.append(status)
    assert await _snapshot(db_url) == before
    assert seen.count(403) > len(calls)  # the officers were refused, not merely mistaken


async def test_entity_scoped_readers_of_the_audit_log_and_staff_see_their_entity_only(
    admin: AdminClient, db_url: str
) -> None:
    """No store role reads the audit log or the staff (they are `audit_read`, `staff_read`:
    HQ roles and auditors, in a group or an entity scope), so the narrowest scoped readers
    are an entity's: each listing and filter shows them their entity's rows, nothing else."""
    await _world(admin)
    readers = {
        (role, entity): await admin.token(role, "entity", entity)
        for role in ("hq_admin", "hq_finance", "auditor")
        for entity in ("LE1", "LE2")
    }
    before = await _snapshot(db_url)
    for (role, entity), token in readers.items():
        other = "LE2" if entity == "LE1" else "LE1"
        where = (role, entity)
        rows = await _all_pages(admin, token, "/v1/audit", limit=7)
        assert rows, where
        assert {r["entity"] for r in rows} == {entity}, where
        sales = (await admin.ok("GET", "/v1/audit", token, action="card.sell"))["items"]
        assert [r["store"] for r in sales] == ["S1" if entity == "LE1" else "S3"], where
        for filters in ({"entity": other}, {"store": "S3" if entity == "LE1" else "S1"}):
            found = await admin.ok("GET", "/v1/audit", token, **filters)
            assert found["items"] == [], (where, filters)
        mine = await admin.ok("GET", "/v1/audit", token, entity=entity, object_kind="card")
        assert mine["items"], where
        assert {r["entity"] for r in mine["items"]} == {entity}, where
        users = await _all_pages(admin, token, "/v1/users", limit=2)
        assert {u["scope_entity"] for u in users} == {entity}, where
        assert {u["scope_kind"] for u in users} <= {"entity", "store"}, where  # never root
        named = {u["name"] for u in users}
        assert ("s1crm" in named, "s3crm" in named) == (entity == "LE1", entity == "LE2"), where
    assert await _snapshot(db_url) == before


async def _all_pages(admin: AdminClient, token: str, path: str, limit: int) -> list[Any]:
    """Every item of a listing, page by page."""
    items: list[Any] = []
    after = None
    for _ in range(100):
        query: dict[str, Any] = (
            {"limit": limit} if after is None else {"limit": limit, "after": after}
        )
        page = await admin.ok("GET", path, token, **query)
        items.extend(page["items"])
        after = page["next_after"]
        if after is None:
            return items
    raise AssertionError(f"{path} never ended")
