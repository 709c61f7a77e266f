"""Card classes, issuing, the card lifecycle, PINs, reads, bulk batches and their CSV export,
and the breakage report over the admin API (SQLite and PostgreSQL), with the POS path of
the same app answering for the cards the API changed."""

from __future__ import annotations

import asyncio
import calendar
import csv
import io
import itertools
from typing import Any

from jsonschema import Draft7Validator

from cardcore.cards.admin_http import CARDS_KEY, LEDGER_ACCOUNT, LEDGER_ENTRY
from cardcore.cards.http import POS_KEY
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult, luhn_ok
from cardcore.ledger.http import LEDGER_KEY
from cardcore.ledger.model import CreateAccount
from tests import logscan
from tests.helpers import AdminClient, sql_rows

_stans = itertools.count(1)
_tids = itertools.count(1)
_mobiles = itertools.count(1)


# --- the world the tests share -------------------------------------------------------------------


async def world(admin: AdminClient) -> None:
    """LE1 with stores S1 and S2, LE2 with S3; classes ORD (named), BEAR (bearer) and GIFT
    (gift: 100, 200 and 500 CNY); S1 and S3 may issue and sell everything, S2 only stored
    value."""
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    await new_class(admin, "ORD", name="Ordinary", named=True)
    await new_class(admin, "BEAR", name="Bearer", named=False)
    await new_class(admin, "GIFT", name="Gift", named=False, gift=True,
                    denominations=[10_000, 20_000, 50_000])  # fmt: skip
    for store in ("S1", "S3"):
        await grant(admin, store, "stored_value")
        await grant(admin, store, "gift")
    await grant(admin, "S2", "stored_value")


async def new_class(admin: AdminClient, code: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = await admin.ok("POST", "/v1/card-classes", json={"code": code, **fields})
    return body


async def grant(admin: AdminClient, store: str, function: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = await admin.ok(
        "POST", "/v1/grants", json={"store": store, "function": function, **extra}
    )
    return body


async def member(admin: AdminClient, store: str = "S1") -> int:
    mobile = f"139{next(_mobiles):08d}"
    body = await admin.ok(
        "POST", "/v1/members", json={"mobile": mobile, "name": "Li Lei", "home_store": store}
    )
    return int(body["id"])


async def issue(
    admin: AdminClient, class_code: str, store: str = "S1", token: str | None = None, **extra: Any
) -> dict[str, Any]:
    if class_code == "ORD" and "member_id" not in extra:
        extra["member_id"] = await member(admin, store)
    body: dict[str, Any] = await admin.ok(
        "POST", "/v1/cards", token, {"class_code": class_code, "store": store, **extra}
    )
    return body


async def topup(
    admin: AdminClient, card_id: int, amount: int, token: str | None = None, **extra: Any
) -> tuple[int, Any]:
    body = {"amount": amount, "tender": "cash", "receipt": f"R{next(_stans)}",
            "key": f"k{next(_stans)}", **extra}  # fmt: skip
    return await admin.call("POST", f"/v1/cards/{card_id}/topups", token, body)


async def card(admin: AdminClient, card_id: int) -> dict[str, Any]:
    body: dict[str, Any] = await admin.ok("GET", f"/v1/cards/{card_id}")
    return body


async def terminal(admin: AdminClient, store: str) -> str:
    n = next(_tids)
    tid, mid = f"T{n:07d}", f"M{n:014d}"
    answer = await admin.ok("POST", "/v1/terminals", json={"tid": tid, "mid": mid, "store": store})
    logscan.SCAN.remember("a terminal master key", answer["tmk"])
    return tid


async def pos(admin: AdminClient, kind: Kind, tid: str, pan: str, amount: int = 0) -> PosResult:
    request = PosRequest(kind=kind, terminal=tid, batch="000001", stan=f"{next(_stans):06d}",
                         card=pan, amount=amount)  # fmt: skip
    [result] = await admin.app[POS_KEY].handle([request])
    return result


def shanghai_noon(year: int, month: int, day: int) -> int:
    """The clock (ms) at noon of a day in Asia/Shanghai (UTC+8)."""
    return calendar.timegm((year, month, day, 4, 0, 0)) * 1000


async def count(db_url: str, table: str) -> int:
    rows = await sql_rows(db_url, f"SELECT count(*) AS n FROM {table}")  # noqa: S608 - a test's own table names
    return int(rows[0]["n"])


async def counts(db_url: str) -> dict[str, int]:
    tables = ("cards", "ledger_accounts", "ledger_transfers", "org_audit_log")
    return {t: await count(db_url, t) for t in tables}


# --- card classes ---------------------------------------------------------------------------------


async def test_class_defaults_follow_named_or_bearer_and_bad_classes_are_refused(
    admin: AdminClient,
) -> None:
    await admin.org("LE1", "S1")
    named = await new_class(admin, "ORD", name="Ordinary", named=True)
    bearer = await new_class(admin, "BEAR", name="Bearer", named=False)
    assert (named["balance_max"], named["validity_months"]) == (500_000, 0)
    assert (bearer["balance_max"], bearer["validity_months"]) == (100_000, 36)
    cases = [
        ({"code": "B2", "name": "x", "named": False, "validity_months": 12},
         "bearer_validity_too_short", "validity_months"),
        ({"code": "B3", "name": "x", "named": False, "validity_months": 0},
         "bearer_validity_too_short", "validity_months"),
        ({"code": "G1", "name": "x", "named": False, "gift": True}, "denominations_required",
         "denominations"),
        ({"code": "G2", "name": "x", "named": True, "gift": True, "denominations": [100]},
         "gift_class_named", "named"),
        ({"code": "G3", "name": "x", "named": False, "gift": True, "denominations": [200_000]},
         "denomination_over_balance_max", "denominations"),
        ({"code": "V1", "name": "x", "named": True, "discount_bp": 10_001}, "invalid_value",
         "discount_bp"),
    ]  # fmt: skip
    for body, code, field in cases:
        status, answer = await admin.call("POST", "/v1/card-classes", json=body)
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (400, code, field)
    status, answer = await admin.call("POST", "/v1/card-classes", json={"code": "ORD",
                                      "name": "again", "named": True})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "class_exists")
    listed = await admin.ok("GET", "/v1/card-classes")
    assert [c["code"] for c in listed["items"]] == ["BEAR", "ORD"]


async def test_only_the_group_scope_changes_card_classes(admin: AdminClient) -> None:
    await admin.org("LE1", "S1")
    await new_class(admin, "ORD", name="Ordinary", named=True)
    entity_admin = await admin.token("hq_admin", "entity", "LE1")
    officer = await admin.token("store_crm", "store", "S1")
    body = {"code": "X", "name": "x", "named": True}
    status, answer = await admin.call("POST", "/v1/card-classes", entity_admin, body)
    assert (status, answer["error"]["code"]) == (403, "scope_forbidden")
    status, answer = await admin.call("PATCH", "/v1/card-classes/ORD", officer, {"name": "y"})
    assert (status, answer["error"]["code"]) == (403, "role_forbidden")
    assert (await admin.ok("GET", "/v1/card-classes/ORD", officer))["name"] == "Ordinary"


async def test_a_new_class_maximum_applies_at_once_to_its_cards(admin: AdminClient) -> None:
    await world(admin)
    issued = await issue(admin, "BEAR")
    assert issued["balance_max"] == 100_000
    status, _ = await topup(admin, issued["id"], 80_000)
    assert status == 201
    changed = await admin.ok("PATCH", "/v1/card-classes/BEAR", json={"balance_max": 90_000})
    assert changed["balance_max"] == 90_000
    assert (await card(admin, issued["id"]))["balance_max"] == 90_000
    status, answer = await topup(admin, issued["id"], 10_001)
    assert (status, answer["error"]["code"]) == (409, "over_balance_max")
    status, _ = await topup(admin, issued["id"], 10_000)
    assert status == 201
    audit = await admin.ok("GET", "/v1/audit", action="card_class.update")
    assert audit["items"][0]["before"]["balance_max"] == 100_000


# --- issuing --------------------------------------------------------------------------------------


async def test_issuing_from_a_store_without_a_grant_is_refused_and_changes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    before = await counts(db_url)
    status, answer = await admin.call("POST", "/v1/cards", json={"class_code": "GIFT",
                                      "store": "S2"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (403, "not_granted")
    assert await counts(db_url) == before
    revoked = await grant(admin, "S2", "gift", product="GIFT")
    await admin.ok("DELETE", f"/v1/grants/{revoked['id']}")
    before = await counts(db_url)
    status, answer = await admin.call("POST", "/v1/cards", json={"class_code": "GIFT",
                                      "store": "S2"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (403, "not_granted")
    assert await counts(db_url) == before


async def test_a_grants_count_budget_is_never_exceeded_under_concurrent_issues(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await new_class(admin, "BEAR", name="Bearer", named=False)
    limited = await grant(admin, "S1", "stored_value", product="BEAR", budget_count=3)
    body = {"class_code": "BEAR", "store": "S1"}
    answers = await asyncio.gather(*(admin.call("POST", "/v1/cards", json=body) for _ in range(10)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [201] * 3 + [403] * 7, answers
    assert {a["error"]["code"] for s, a in answers if s == 403} == {"grant_budget_exceeded"}
    grants = await admin.ok("GET", "/v1/grants", store="S1")
    assert [g["used_count"] for g in grants["items"] if g["id"] == limited["id"]] == [3]
    assert await count(db_url, "cards") == 3


async def test_a_named_card_needs_an_active_member_in_scope_and_a_bearer_card_none(
    admin: AdminClient,
) -> None:
    await world(admin)
    officer = await admin.token("store_crm", "store", "S1")
    elsewhere = await member(admin, "S2")
    cases = [
        ({"class_code": "ORD", "store": "S1"}, 400, "member_required"),
        ({"class_code": "ORD", "store": "S1", "member_id": 999_999}, 404, "member_not_found"),
        ({"class_code": "ORD", "store": "S1", "member_id": elsewhere}, 403, "scope_forbidden"),
        ({"class_code": "BEAR", "store": "S1", "member_id": elsewhere}, 400,
         "bearer_card_member"),
        ({"class_code": "NOPE", "store": "S1"}, 404, "class_not_found"),
        ({"class_code": "BEAR", "store": "S2"}, 403, "scope_forbidden"),
    ]  # fmt: skip
    for body, status, code in cases:
        got, answer = await admin.call("POST", "/v1/cards", officer, body)
        assert (got, answer["error"]["code"]) == (status, code), body
    mine = await member(admin, "S1")
    issued = await issue(admin, "ORD", "S1", officer, member_id=mine)
    assert (issued["member_id"], issued["named"], issued["state"]) == (mine, True, "active")


async def test_a_card_number_is_shown_once_and_kept_only_as_a_token_and_ciphertext(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    issued = await issue(admin, "BEAR")
    pan = issued["pan"]
    assert (len(pan), pan[:6], luhn_ok(pan)) == (19, "628888", True)
    assert issued["pan_masked"] == pan[:6] + "*" * 9 + pan[-4:]
    assert "pan" not in await card(admin, issued["id"])
    [row] = await sql_rows(db_url, "SELECT * FROM cards")
    assert pan not in "|".join(str(v) for v in row.values())
    assert row["secret_sealed"] and row["pan_sealed"] and row["secret_sealed"] != row["pan_sealed"]
    audit = await admin.ok("GET", "/v1/audit", object_kind="card")
    assert audit["items"] and pan not in str(audit["items"])
    found = await admin.ok("POST", "/v1/cards/lookup", json={"pan": pan})
    assert found["id"] == issued["id"]
    wrong_check_digit = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    status, answer = await admin.call("POST", "/v1/cards/lookup", json={"pan": wrong_check_digit})
    assert (status, answer["error"]["code"]) == (404, "card_not_found")


async def test_a_gift_card_is_inactive_until_sold_and_a_bearer_card_expires_after_its_term(
    admin: AdminClient,
) -> None:
    await world(admin)
    gift = await issue(admin, "GIFT")
    bearer = await issue(admin, "BEAR")
    assert gift["state"] == "inactive"
    assert bearer["state"] == "active"
    assert len(bearer["expires"]) == 4
    assert bearer["expires"][2:] == gift["expires"][2:]
    status, answer = await admin.call("POST", f"/v1/cards/{gift['id']}/activate")
    assert (status, answer["error"]["code"]) == (409, "gift_sale_required")


async def test_batch_cards_sold_or_activated_years_after_printing_get_their_whole_term(
    admin: AdminClient,
) -> None:
    await world(admin)
    service = admin.app[CARDS_KEY]
    service.clock_ms = lambda: shanghai_noon(2025, 1, 15)  # printed in January 2025
    gifts = await admin.ok("POST", "/v1/card-batches", json={"class_code": "GIFT",
                           "store": "S1", "count": 1})  # fmt: skip
    bearers = await admin.ok("POST", "/v1/card-batches", json={"class_code": "BEAR",
                             "store": "S1", "count": 1})  # fmt: skip
    assert (await card(admin, bearers["first_id"]))["expires"] == "2801"
    service.clock_ms = lambda: shanghai_noon(2027, 11, 20)  # handed out in November 2027
    sale = {"amount": 10_000, "tender": "cash", "receipt": "R1", "key": "late-sale"}
    await admin.ok("POST", f"/v1/cards/{gifts['first_id']}/sell", json=sale)
    activated = await admin.ok("POST", f"/v1/cards/{bearers['first_id']}/activate")
    assert activated["expires"] == "3011"  # November 2027 + 36 months
    assert (await card(admin, gifts["first_id"]))["expires"] == "3011"
    for action in ("card.activate", "card.sell"):
        [row] = (await admin.ok("GET", "/v1/audit", action=action))["items"]
        assert (row["before"]["expires"], row["after"]["expires"]) == ("2801", "3011")


# --- the lifecycle and the POS -------------------------------------------------------------


async def test_wrong_lifecycle_steps_are_refused_with_card_state_and_change_nothing(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    issued = await issue(admin, "BEAR")
    path = f"/v1/cards/{issued['id']}"
    frozen = await admin.ok("POST", f"{path}/freeze")
    assert frozen["state"] == "frozen"
    before = await counts(db_url)
    for step in ("freeze", "activate"):
        status, answer = await admin.call("POST", f"{path}/{step}")
        assert (status, answer["error"]["code"]) == (409, "card_state"), step
    assert await counts(db_url) == before
    assert (await admin.ok("POST", f"{path}/unfreeze"))["state"] == "active"
    assert (await card(admin, issued["id"]))["account_frozen"] is False
    assert (await admin.ok("POST", f"{path}/lost"))["state"] == "lost"
    assert (await card(admin, issued["id"]))["account_frozen"] is True
    before = await counts(db_url)
    for step in ("unfreeze", "freeze", "activate"):
        status, answer = await admin.call("POST", f"{path}/{step}")
        assert (status, answer["error"]["code"]) == (409, "card_state"), step
    assert await counts(db_url) == before
    actions = [a["action"] for a in (await admin.ok("GET", "/v1/audit", object_kind="card"))
               ["items"]]  # fmt: skip
    assert actions == ["card.issue", "card.freeze", "card.unfreeze", "card.lost"]


async def test_frozen_and_lost_cards_are_declined_at_the_pos(admin: AdminClient) -> None:
    await world(admin)
    tid = await terminal(admin, "S1")
    frozen, lost = await issue(admin, "BEAR"), await issue(admin, "BEAR")
    for c in (frozen, lost):
        await topup(admin, c["id"], 5_000)
        assert (await pos(admin, Kind.PURCHASE, tid, c["pan"], 100)).outcome is Outcome.APPROVED
    await admin.ok("POST", f"/v1/cards/{frozen['id']}/freeze")
    await admin.ok("POST", f"/v1/cards/{lost['id']}/lost")
    for c, outcome in ((frozen, Outcome.CARD_FROZEN), (lost, Outcome.CARD_LOST)):
        assert (await pos(admin, Kind.PURCHASE, tid, c["pan"], 100)).outcome is outcome
        assert (await pos(admin, Kind.INQUIRY, tid, c["pan"])).outcome is outcome
        assert (await card(admin, c["id"]))["balances"]["available"] == 4_900
    await admin.ok("POST", f"/v1/cards/{frozen['id']}/unfreeze")
    result = await pos(admin, Kind.PURCHASE, tid, frozen["pan"], 100)
    assert (result.outcome, result.balance) == (Outcome.APPROVED, 4_800)


async def test_a_stock_card_lost_before_hand_out_is_replaced_by_stock_whatever_its_fee(
    admin: AdminClient,
) -> None:
    """A bearer card printed in January 2025 (a class without an issue fee), reported lost
    in stock in November 2027 and replaced: the replacement is stock too (inactive, takes
    no money), and its term starts when it is handed out, as any stock card's."""
    await world(admin)
    service = admin.app[CARDS_KEY]
    service.clock_ms = lambda: shanghai_noon(2025, 1, 15)
    batch = await admin.ok("POST", "/v1/card-batches",
                           json={"class_code": "BEAR", "store": "S1", "count": 1})  # fmt: skip
    service.clock_ms = lambda: shanghai_noon(2027, 11, 20)
    await admin.ok("POST", f"/v1/cards/{batch['first_id']}/lost")
    new = await admin.ok("POST", f"/v1/cards/{batch['first_id']}/replace")
    assert new["state"] == "inactive"
    status, answer = await topup(admin, new["id"], 50_000)
    assert (status, answer["error"]["code"]) == (409, "card_state")
    handed = await admin.ok("POST", f"/v1/cards/{new['id']}/activate")
    assert (handed["state"], handed["expires"] >= "3011") == ("active", True)


async def test_replace_carries_the_exact_balance_and_the_old_card_is_dead_at_the_pos(
    admin: AdminClient,
) -> None:
    await world(admin)
    tid = await terminal(admin, "S1")
    old = await issue(admin, "ORD")
    await topup(admin, old["id"], 12_345)
    assert (await pos(admin, Kind.PURCHASE, tid, old["pan"], 345)).outcome is Outcome.APPROVED
    await admin.ok("POST", f"/v1/cards/{old['id']}/lost")
    new = await admin.ok("POST", f"/v1/cards/{old['id']}/replace")
    assert new["pan"] != old["pan"]
    assert (new["member_id"], new["class_code"], new["store"], new["state"]) == (
        old["member_id"], "ORD", "S1", "active")  # fmt: skip
    fresh = await card(admin, new["id"])
    assert fresh["balances"]["available"] == 12_000
    assert fresh["account_frozen"] is False
    dead = await card(admin, old["id"])
    assert (dead["state"], dead["replaced_by"]) == ("replaced", new["id"])
    result = await pos(admin, Kind.PURCHASE, tid, old["pan"], 100)
    assert result.outcome is Outcome.CARD_CLOSED
    result = await pos(admin, Kind.PURCHASE, tid, new["pan"], 2_000)
    assert (result.outcome, result.balance) == (Outcome.APPROVED, 10_000)
    history = await admin.ok("GET", f"/v1/cards/{new['id']}/transactions")
    reasons = [e["reason"] for e in history["items"]]
    assert reasons == ["purchase", "purchase", "counter_topup"]
    status, answer = await admin.call("POST", f"/v1/cards/{old['id']}/replace")
    assert (status, answer["error"]["code"]) == (409, "card_state")


async def test_a_closed_card_is_declined_at_the_pos(admin: AdminClient) -> None:
    await world(admin)
    tid = await terminal(admin, "S1")
    issued = await issue(admin, "BEAR")
    await topup(admin, issued["id"], 1_000)
    await admin.ok("POST", f"/v1/cards/{issued['id']}/close", json={"receipt": "C1"})
    assert (await pos(admin, Kind.PURCHASE, tid, issued["pan"], 1)).outcome is Outcome.CARD_CLOSED


# --- scope ----------------------------------------------------------------------------------------


async def test_a_store_officer_cannot_see_or_change_another_stores_card_through_any_route(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    theirs = await issue(admin, "BEAR", "S2")
    await topup(admin, theirs["id"], 3_000)
    mine = await issue(admin, "BEAR", "S1")
    officer = await admin.token("store_crm", "store", "S1")
    supervisor = await admin.token("store_supervisor", "store", "S1")
    path = f"/v1/cards/{theirs['id']}"
    pay = {"amount": 100, "tender": "cash", "receipt": "R1", "key": "k1"}
    calls: list[tuple[str, str, Any]] = [
        ("GET", path, None),
        ("GET", f"{path}/transactions", None),
        ("POST", "/v1/cards/lookup", {"pan": theirs["pan"]}),
        ("POST", f"{path}/activate", None),
        ("POST", f"{path}/freeze", None),
        ("POST", f"{path}/unfreeze", None),
        ("POST", f"{path}/lost", None),
        ("POST", f"{path}/replace", None),
        ("POST", f"{path}/close", {"receipt": "R1"}),
        ("POST", f"{path}/topups", pay),
        ("POST", f"{path}/topups", {**pay, "store": "S2"}),
        ("POST", f"{path}/sell", pay),
        ("POST", f"{path}/pin", {"pin": "739152"}),
        ("POST", f"{path}/pin/verify", {"pin": "739152"}),
        ("POST", f"{path}/pin/unlock", None),
        ("POST", "/v1/cards", {"class_code": "BEAR", "store": "S2"}),
        ("POST", "/v1/card-batches", {"class_code": "BEAR", "store": "S2", "count": 1}),
    ]
    before = (await counts(db_url), await card(admin, theirs["id"]))
    for token in (officer, supervisor):
        for method, url, body in calls:
            status, answer = await admin.call(method, url, token, body)
            assert status == 403, (method, url, status, answer)
            assert answer["error"]["code"] in ("scope_forbidden", "role_forbidden"), answer
        listed = await admin.ok("GET", "/v1/cards", token)
        assert [c["id"] for c in listed["items"]] == [mine["id"]]
        assert (await admin.ok("GET", "/v1/cards", token, store="S2"))["items"] == []
    # moving money at S1 for S2's card is refused too: the card is outside the scope
    status, _ = await admin.call("POST", f"{path}/topups", officer, {**pay, "store": "S1"})
    assert status == 403
    assert (await counts(db_url), await card(admin, theirs["id"])) == before
    status, text = await admin.call("GET", "/v1/cards/export", officer,
                                    first_id=1, last_id=theirs["id"] + 10)  # fmt: skip
    assert status == 200
    assert [r["card_id"] for r in csv.DictReader(io.StringIO(text))] == [str(mine["id"])]


# --- bulk issuance and its export ---------------------------------------------------------------


async def test_a_batch_of_2000_gift_cards_exports_full_numbers_only_to_a_role_with_cards_pan(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    budget = await grant(admin, "S1", "gift", product="GIFT", budget_count=2_000)
    batch = await admin.ok(
        "POST", "/v1/card-batches", json={"class_code": "GIFT", "store": "S1", "count": 2_000}
    )
    assert batch["count"] == 2_000
    assert batch["last_id"] - batch["first_id"] == 1_999
    grants = await admin.ok("GET", "/v1/grants", store="S1")
    assert [g["used_count"] for g in grants["items"] if g["id"] == budget["id"]] == [2_000]
    assert await count(db_url, "cards") == 2_000
    query = {"first_id": batch["first_id"], "last_id": batch["last_id"]}
    status, full_text = await admin.call("GET", "/v1/cards/export", **query)
    assert status == 200
    full = list(csv.DictReader(io.StringIO(full_text)))
    assert len(full) == 2_000
    assert all(luhn_ok(r["card_number"]) and len(r["card_number"]) == 19 for r in full)
    assert len({r["card_number"] for r in full}) == 2_000
    assert {(r["class_code"], r["face_value"]) for r in full} == {("GIFT", "")}
    for r in full:
        logscan.SCAN.remember("an exported card number", r["card_number"])
    marketing = await admin.token("hq_marketing")  # cards_read, no cards_pan
    status, masked_text = await admin.call("GET", "/v1/cards/export", marketing, **query)
    assert status == 200
    masked = list(csv.DictReader(io.StringIO(masked_text)))
    assert [m["card_id"] for m in masked] == [r["card_id"] for r in full]
    assert all("*" in m["card_number"] for m in masked)
    pairs = zip(masked, full, strict=True)
    assert all(m["card_number"][-4:] == r["card_number"][-4:] for m, r in pairs)
    first = full[0]
    found = await admin.ok("POST", "/v1/cards/lookup", json={"pan": first["card_number"]})
    assert found["state"] == "inactive"
    sold = {"amount": 20_000, "tender": "cash", "receipt": "G1", "key": "sale-1"}
    await admin.ok("POST", f"/v1/cards/{found['id']}/sell", json=sold)
    status, again = await admin.call("GET", "/v1/cards/export", marketing,
                                     first_id=found["id"], last_id=found["id"])  # fmt: skip
    assert [r["face_value"] for r in csv.DictReader(io.StringIO(again))] == ["20000"]
    exports = await admin.ok("GET", "/v1/audit", action="cards.export_full_numbers")
    assert len(exports["items"]) == 1


async def test_a_batch_of_a_named_class_is_refused(admin: AdminClient, db_url: str) -> None:
    await world(admin)
    before = await counts(db_url)
    status, answer = await admin.call(
        "POST", "/v1/card-batches", json={"class_code": "ORD", "store": "S1", "count": 5}
    )
    assert (status, answer["error"]["code"]) == (409, "class_is_named")
    assert await counts(db_url) == before


# --- PINs -----------------------------------------------------------------------------------------


async def test_a_pin_is_set_checked_locked_and_unlocked_and_never_shown_or_audited(
    admin: AdminClient,
) -> None:
    await world(admin)
    issued = await issue(admin, "ORD")
    path = f"/v1/cards/{issued['id']}/pin"
    logscan.SCAN.remember("a test PIN", "482913")
    answer = await admin.call("POST", f"{path}/verify", json={"pin": "482913"})
    assert answer == (200, {"result": "not_set", "failures": 0})
    set_answer = await admin.ok("POST", path, json={"pin": "482913"})
    assert set_answer["has_pin"] is True
    assert "482913" not in str(set_answer)
    assert (await admin.ok("POST", f"{path}/verify", json={"pin": "482913"}))["result"] == "ok"
    verdicts = [await admin.ok("POST", f"{path}/verify", json={"pin": "846201"}) for _ in range(4)]
    assert [v["result"] for v in verdicts] == ["wrong", "wrong", "locked", "locked"]
    assert (await admin.ok("POST", f"{path}/verify", json={"pin": "482913"}))["result"] == "locked"
    status, answer = await admin.call("POST", path, json={"pin": "4x2y"})
    assert (status, answer["error"]["code"], answer["error"]["field"]) == (
        400, "invalid_value", "pin")  # fmt: skip
    # The officer who typed those wrong PINs cannot unlock (they could guess on for ever);
    # another officer does, and after that unlock the first may verify and unlock again.
    status, answer = await admin.call("POST", f"{path}/unlock")
    assert (status, answer["error"]["code"]) == (403, "pin_self_unlock")
    for _ in range(101):  # 202 other rows of the card's audit do not hide the guesses
        await admin.ok("POST", f"/v1/cards/{issued['id']}/freeze")
        await admin.ok("POST", f"/v1/cards/{issued['id']}/unfreeze")
    status, answer = await admin.call("POST", f"{path}/unlock")
    assert (status, answer["error"]["code"]) == (403, "pin_self_unlock")
    other = await admin.token("store_supervisor", "store", "S1")
    await admin.ok("POST", f"{path}/unlock", other)
    assert (await admin.ok("POST", f"{path}/verify", json={"pin": "482913"}))["result"] == "ok"
    for action, count in (
        ("card.pin_set", 1),
        ("card.pin_unlock", 1),
        ("card.pin_verify_failed", 5),
    ):  # 2 wrong, then 3 locked
        audit = await admin.ok("GET", "/v1/audit", object_kind="card", action=action)
        assert len(audit["items"]) == count, action
        assert "482913" not in str(audit) and "846201" not in str(audit)
    await admin.ok("POST", f"{path}/unlock")  # no wrong PIN of its own since the last unlock


# --- reads ----------------------------------------------------------------------------------------


async def test_cards_are_listed_by_filter_in_cursor_pages(admin: AdminClient) -> None:
    await world(admin)
    owner = await member(admin, "S1")
    a = await issue(admin, "ORD", member_id=owner)
    b = await issue(admin, "BEAR")
    c = await issue(admin, "BEAR", "S2")
    await admin.ok("POST", f"/v1/cards/{b['id']}/freeze")
    ids = [x["id"] for x in (await admin.ok("GET", "/v1/cards"))["items"]]
    assert ids == [a["id"], b["id"], c["id"]]
    page = await admin.ok("GET", "/v1/cards", limit=2)
    assert page["next_after"] == str(b["id"])
    rest = await admin.ok("GET", "/v1/cards", limit=2, after=page["next_after"])
    assert ([x["id"] for x in rest["items"]], rest["next_after"]) == ([c["id"]], None)
    checks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
        ({"member_id": owner}, [a]),
        ({"store": "S2"}, [c]),
        ({"class_code": "BEAR"}, [b, c]),
        ({"state": "frozen"}, [b]),
    ]
    for query, wanted in checks:
        found = await admin.ok("GET", "/v1/cards", **query)
        assert [x["id"] for x in found["items"]] == [w["id"] for w in wanted], query
    detail = await card(admin, a["id"])
    assert detail["balances"] == {"available": 0, "posted": 0, "pending": 0, "incoming": 0,
                                  "maximum": 500_000}  # fmt: skip
    status, answer = await admin.call("GET", "/v1/cards/999999")
    assert (status, answer["error"]["code"]) == (404, "card_not_found")


async def test_a_card_shows_its_class_discount(admin: AdminClient) -> None:
    await world(admin)
    await new_class(admin, "VIP", name="VIP", named=True, discount_bp=500)
    vip = await issue(admin, "VIP", member_id=await member(admin))
    assert (await card(admin, vip["id"]))["discount_bp"] == 500


async def test_routes_answer_kek_missing_without_a_key(api: Any) -> None:
    from cardcore.org.http import ORG_KEY  # noqa: PLC0415 - the app under test

    minted = await api.app[ORG_KEY].bootstrap_admin("root", 3600)
    headers = {"Authorization": f"Bearer {minted['token']}"}
    response = await api.get("/v1/cards", headers=headers)
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (503, "kek_missing")


# --- ledger accounts through the staff API ------------------------------------------------------


async def test_ledger_accounts_and_their_entries_are_read_within_the_tokens_scope(
    admin: AdminClient, db_url: str
) -> None:
    """GET /v1/accounts/{id} and its entries (`reports_read`, which every role has): any
    account to the group,
    an entity's accounts to its entity, a store's own and its cards' accounts to the store;
    anything else 403, an unknown id 404, and nothing changes."""
    await world(admin)
    mine = await issue(admin, "BEAR", "S1")
    theirs = await issue(admin, "BEAR", "S3")
    for _ in range(3):
        assert (await topup(admin, mine["id"], 1_000))[0] == 201
    assert (await topup(admin, theirs["id"], 500))[0] == 201
    account = mine["account_id"]
    [cash] = await sql_rows(
        db_url, "SELECT id FROM ledger_accounts WHERE owner_kind = 'store' AND owner_id = 'S1' "
        "AND purpose = 'cash'",
    )  # fmt: skip
    # An entity's own account (as the clearing between entities makes them)
    [made] = await admin.app[LEDGER_KEY].submit(
        [CreateAccount("CNY", "LE1", "entity", "LE2", "due_to")]
    )
    entity = {"id": made.account_id}
    finance = await admin.token("hq_finance")
    got = await admin.ok("GET", f"/v1/accounts/{account}", finance)
    assert (got["id"], got["legal_entity"], got["owner_kind"]) == (account, "LE1", "card")
    assert got["credits_posted"] - got["debits_posted"] == 3_000
    assert got["flags"]["no_overdraft"] is True
    first = await admin.ok("GET", f"/v1/accounts/{account}/entries", finance, limit=2)
    assert [e["credits_posted"] for e in first["items"]] == [3_000, 2_000]  # newest first
    assert first["next_after"] is not None
    rest = await admin.ok(
        "GET", f"/v1/accounts/{account}/entries", finance, limit=2, after=first["next_after"]
    )
    assert [e["credits_posted"] for e in rest["items"]] == [1_000]
    assert rest["next_after"] is None
    assert {e["transfer_kind"] for e in first["items"] + rest["items"]} <= {"posted", "post"}
    # The answers are what the route table (and so the OpenAPI document) declares.
    Draft7Validator(LEDGER_ACCOUNT).validate(got)
    for entry in first["items"] + rest["items"]:
        Draft7Validator(LEDGER_ENTRY).validate(entry)

    store = await admin.token("store_supervisor", "store", "S1")
    le1 = await admin.token("auditor", "entity", "LE1")
    le2 = await admin.token("auditor", "entity", "LE2")
    before = await counts(db_url)
    allowed = {
        store: {account, cash["id"]},
        le1: {account, cash["id"], entity["id"]},
        le2: {theirs["account_id"]},
    }
    every = {account, cash["id"], entity["id"], theirs["account_id"]}
    for token, ids in allowed.items():
        for aid in every:
            for path in (f"/v1/accounts/{aid}", f"/v1/accounts/{aid}/entries"):
                status, answer = await admin.call("GET", path, token)
                if aid in ids:
                    assert status == 200, (path, answer)
                else:
                    assert status == 403, (path, status, answer)
                    assert answer["error"]["code"] == "scope_forbidden", answer
    for path in ("/v1/accounts/999999", "/v1/accounts/999999/entries"):
        status, answer = await admin.call("GET", path, finance)
        assert (status, answer["error"]["code"]) == (404, "account_not_found"), answer
    status, answer = await admin.call("GET", "/v1/accounts/x1", finance)
    assert status == 404, answer
    status, answer = await admin.call("GET", f"/v1/accounts/{account}/entries", finance, limit=0)
    assert status == 400, answer
    assert await counts(db_url) == before


async def test_a_store_officer_sees_only_its_own_stores_cards_of_a_member(
    admin: AdminClient,
) -> None:
    await world(admin)
    owner = await member(admin, "S1")
    here = await issue(admin, "ORD", "S1", member_id=owner)
    await issue(admin, "ORD", "S2", member_id=owner)
    await issue(admin, "ORD", "S3", member_id=owner)
    everything = await admin.ok("GET", f"/v1/members/{owner}")
    assert len(everything["cards"]) == 3
    officer = await admin.token("store_crm", "store", "S1")
    mine = await admin.ok("GET", f"/v1/members/{owner}", officer)
    assert [c["id"] for c in mine["cards"]] == [here["id"]]


async def _pos_ask(admin: AdminClient, **fields: Any) -> tuple[PosRequest, PosResult]:
    r = PosRequest(batch="000001", stan=f"{next(_stans) + 500_000:06d}", **fields)
    [res] = await admin.app[POS_KEY].handle([r])
    return r, res


async def test_a_card_is_not_closed_while_a_terminals_top_up_waits_for_its_confirmation(
    admin: AdminClient, db_url: str
) -> None:
    """Closed with a POS top-up's hold open, the refund left the held amount out; its
    confirmation then put it on the closed card, beyond any refund or report (a reviewer's
    finding). The close is refused (409 `card_has_pending_topup`) until the hold is
    confirmed or lapses; then the whole value is refunded."""
    await world(admin)
    tid = await terminal(admin, "S1")
    issued = await issue(admin, "BEAR")
    await topup(admin, issued["id"], 1_000)
    hold, res = await _pos_ask(admin, kind=Kind.TOPUP, terminal=tid, card=issued["pan"],
                               amount=5_000)  # fmt: skip
    assert res.outcome is Outcome.APPROVED, res
    before = await sql_rows(db_url, "SELECT count(*) AS n FROM ledger_transfers")
    got, answer = await admin.call("POST", f"/v1/cards/{issued['id']}/close",
                                   json={"receipt": "C1"})  # fmt: skip
    assert (got, answer["error"]["code"]) == (409, "card_has_pending_topup")
    assert (await card(admin, issued["id"]))["state"] == "active"
    assert await sql_rows(db_url, "SELECT count(*) AS n FROM ledger_transfers") == before
    _, confirmed = await _pos_ask(admin, kind=Kind.TOPUP_CONFIRM, terminal=tid, amount=5_000,
                                  original_batch="000001", original_stan=hold.stan)  # fmt: skip
    assert confirmed.outcome is Outcome.APPROVED
    closed = await admin.ok("POST", f"/v1/cards/{issued['id']}/close", json={"receipt": "C2"})
    assert closed["refund"]["amount"] == 6_000


async def test_a_top_up_voided_for_its_grant_carries_its_store_and_terminal(
    admin: AdminClient, db_url: str
) -> None:
    """Every movement carries store and terminal: the void of a top-up its store's grant
    refused had none (a reviewer's finding)."""
    await admin.org("LE1", "S1", "S2")
    await admin.ok("POST", "/v1/card-classes", json={"code": "BEAR", "name": "B", "named": False})
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "stored_value"})
    issued = await issue(admin, "BEAR")
    tid = await terminal(admin, "S2")  # no stored-value grant in S2
    _, res = await _pos_ask(admin, kind=Kind.TOPUP, terminal=tid, card=issued["pan"],
                            amount=5_000)  # fmt: skip
    assert res.outcome is Outcome.NOT_PERMITTED, res
    [void] = await sql_rows(db_url, "SELECT metadata FROM ledger_transfers WHERE kind = 'void'")
    assert '"store":"S2"' in void["metadata"] and f'"terminal":"{tid}"' in void["metadata"]


async def test_a_gift_card_kept_in_stock_past_its_term_is_sold_with_a_whole_term(
    admin: AdminClient,
) -> None:
    """A gift card's term counts from its sale, as a stock card's from its activation: one
    printed more than three years before was refused `card_expired` at its sale (a
    reviewer's finding)."""
    await world(admin)
    service = admin.app[CARDS_KEY]
    service.clock_ms = lambda: shanghai_noon(2025, 1, 15)  # printed January 2025
    gifts = await admin.ok("POST", "/v1/card-batches",
                           json={"class_code": "GIFT", "store": "S1", "count": 1})  # fmt: skip
    service.clock_ms = lambda: shanghai_noon(2028, 3, 10)  # sold March 2028
    sale = {"amount": 10_000, "tender": "cash", "receipt": "R1", "key": "late-sale"}
    await admin.ok("POST", f"/v1/cards/{gifts['first_id']}/sell", json=sale)
    sold = await card(admin, gifts["first_id"])
    assert (sold["state"], sold["expires"]) == ("active", "3103")
