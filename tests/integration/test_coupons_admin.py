"""E-coupon campaigns, codes, signing keys and figures through the admin API, on SQLite and
PostgreSQL: definitions and their refusals, state changes, a store officer inside HQ's grant,
budgets under concurrency, generated, imported and member codes (idempotent by key), lookup,
void, signed QR texts. Every refusal is checked to change nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from cardcore.api import routes
from cardcore.api.edge import ApiError
from cardcore.coupons import model
from cardcore.coupons.http import COUPONS_KEY
from cardcore.coupons.http import ROUTES as COUPON_ROUTES
from cardcore.coupons.service import CouponService
from cardcore.vault import ed25519_verify
from tests.helpers import AdminClient, sql_execute, sql_rows

DAY_MS = 86_400_000
NOW_MS = int(time.time() * 1000)
_mobiles = itertools.count(1)


def definition(code: str = "TENOFF", **extra: Any) -> dict[str, Any]:
    """An amount-off campaign of LE1 valid from yesterday for 30 days (HQ, entity-wide)."""
    body: dict[str, Any] = {
        "code": code,
        "name": "Ten yuan off",
        "kind": "amount_off",
        "legal_entity": "LE1",
        "valid_from_ms": NOW_MS - DAY_MS,
        "valid_to_ms": NOW_MS + 30 * DAY_MS,
        "value_fen": 1_000,
    }
    body.update(extra)
    if "store" in extra:
        body.pop("legal_entity")
    return body


async def campaign(
    admin: AdminClient, code: str = "TENOFF", *, state: str = "active", **extra: Any
) -> dict[str, Any]:
    made: dict[str, Any] = await admin.ok("POST", "/v1/coupon-campaigns",
                                          json=definition(code, **extra))  # fmt: skip
    if state != "draft":
        made = await admin.ok("PATCH", f"/v1/coupon-campaigns/{code}", json={"state": state})
    return made


async def codes(admin: AdminClient, code: str, count: int, **extra: Any) -> list[str]:
    made = await admin.ok("POST", f"/v1/coupon-campaigns/{code}/codes",
                          json={"count": count, **extra})  # fmt: skip
    return list(made["codes"])


async def member(admin: AdminClient, store: str = "S1") -> int:
    body = {"mobile": f"1390000{next(_mobiles):04d}", "name": "Coupon Member", "home_store": store}
    made = await admin.ok("POST", "/v1/members", json=body)
    return int(made["id"])


async def count(db_url: str, table: str, **where: Any) -> int:
    clause = " AND ".join(f"{name} = :{name}" for name in where) or "1 = 1"
    rows = await sql_rows(db_url, f"SELECT count(*) AS n FROM {table} WHERE {clause}", **where)  # noqa: S608 - the test's own table names
    return int(rows[0]["n"])


async def counts(db_url: str) -> dict[str, int]:
    tables = ("coupon_campaigns", "coupon_codes", "coupon_batches", "coupon_signing_keys",
              "org_audit_log")  # fmt: skip
    return {t: await count(db_url, t) for t in tables}


async def campaign_row(db_url: str, code: str) -> dict[str, Any]:
    [row] = await sql_rows(db_url, "SELECT * FROM coupon_campaigns WHERE code = :c", c=code)
    return row


def service(admin: AdminClient) -> CouponService:
    return admin.app[COUPONS_KEY]


# --- campaigns ---------------------------------------------------------------------------------


async def test_a_campaign_moves_draft_active_paused_ended_each_change_audited(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    made = await campaign(admin, state="draft", supplier_share_bp=4_000, store_share_bp=6_000,
                          supplier_id="SUP1", max_issued=1_000)  # fmt: skip
    assert (made["state"], made["legal_entity"], made["store"]) == ("draft", "LE1", "")
    assert made["issued_count"] == 0 and made["supplier_share_bp"] == 4_000
    for state in ("active", "paused", "active", "ended"):
        changed = await admin.ok("PATCH", "/v1/coupon-campaigns/TENOFF", json={"state": state})
        assert changed["state"] == state
    before = await counts(db_url)
    status, body = await admin.call("PATCH", "/v1/coupon-campaigns/TENOFF",
                                    json={"state": "active"})  # fmt: skip
    assert (status, body["error"]["code"]) == (409, "campaign_state")
    assert await counts(db_url) == before
    actions = await sql_rows(db_url, "SELECT action FROM org_audit_log WHERE object_id = 'TENOFF'"
                             " ORDER BY id")  # fmt: skip
    assert [a["action"] for a in actions] == ["coupon_campaign.create"] + [
        "coupon_campaign.update"
    ] * 4
    got = await admin.ok("GET", "/v1/coupon-campaigns/TENOFF")
    assert got["state"] == "ended"
    listed = await admin.ok("GET", "/v1/coupon-campaigns", state="ended")
    assert [c["code"] for c in listed["items"]] == ["TENOFF"]


@pytest.mark.parametrize(
    ("extra", "status", "code", "field"),
    [
        ({"percent_bp": 500}, 400, "invalid", "percent_bp"),
        ({"store_share_bp": 5_000}, 400, "invalid", "supplier_share_bp"),
        ({"supplier_share_bp": 10_000, "store_share_bp": 0}, 400, "invalid", "supplier_id"),
        ({"valid_to_ms": NOW_MS - 2 * DAY_MS}, 400, "invalid", "valid_to_ms"),
        ({"value_fen": 0}, 400, "invalid", "value_fen"),
        ({"value_fen": 10.5}, 400, "wrong_type", "value_fen"),
        ({"kind": "percent_off", "percent_bp": 20_000, "value_fen": 0}, 400, "invalid",
         "percent_bp"),
        ({"stores": ["S1", "S1"]}, 400, "invalid", "stores"),
        ({"surprise": 1}, 400, "unknown_field", "surprise"),
        ({"legal_entity": "LE9"}, 404, "entity_not_found", "legal_entity"),
        ({"store": "S1", "stores": ["S2"]}, 400, "invalid", "stores"),
    ],
)  # fmt: skip
async def test_a_bad_definition_is_refused_naming_its_field_and_changes_nothing(
    admin: AdminClient, db_url: str, extra: dict[str, Any], status: int, code: str, field: str
) -> None:
    await admin.org("LE1", "S1", "S2")
    before = await counts(db_url)
    got, body = await admin.call("POST", "/v1/coupon-campaigns", json=definition(**extra))
    assert (got, body["error"]["code"], body["error"]["field"]) == (status, code, field)
    assert await counts(db_url) == before


async def test_a_live_campaign_keeps_its_definition_and_budgets_never_go_below_issued(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin, max_issued=100)
    await codes(admin, "TENOFF", 10)
    before = await counts(db_url)
    for change, status, code in (
        ({"value_fen": 5_000}, 409, "campaign_live"),
        ({"max_issued": 9}, 409, "budget_below_issued"),
        ({"name": "\u0000"}, 400, "invalid_value"),
        ({}, 400, "invalid_value"),
    ):
        got, body = await admin.call("PATCH", "/v1/coupon-campaigns/TENOFF", json=change)
        assert (got, body["error"]["code"]) == (status, code), change
    assert await counts(db_url) == before
    renamed = await admin.ok("PATCH", "/v1/coupon-campaigns/TENOFF",
                             json={"name": "Ten off, again", "max_issued": 10})  # fmt: skip
    assert (renamed["name"], renamed["max_issued"]) == ("Ten off, again", 10)
    got, body = await admin.call("POST", "/v1/coupon-campaigns/TENOFF/codes", json={"count": 1})
    assert (got, body["error"]["code"]) == (409, "campaign_budget_exceeded")


async def test_a_store_officer_runs_only_its_own_store_campaigns_while_hq_grants_coupons(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1", "S2")
    crm = await admin.token("store_crm", "store", "S1")
    supervisor = await admin.token("store_supervisor", "store", "S1")
    before = await counts(db_url)
    got, body = await admin.call("POST", "/v1/coupon-campaigns", crm,
                                 definition("MINE", store="S1"))  # fmt: skip
    assert (got, body["error"]["code"]) == (403, "not_granted")
    for other in (definition("THEIRS", store="S2"), definition("HQ")):
        got, body = await admin.call("POST", "/v1/coupon-campaigns", crm, other)
        assert (got, body["error"]["code"]) == (403, "scope_forbidden")
    got, body = await admin.call("POST", "/v1/coupon-campaigns", supervisor,
                                 definition("MINE", store="S1"))  # fmt: skip
    assert (got, body["error"]["code"]) == (403, "role_forbidden")
    assert await counts(db_url) == before
    grant = await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "coupon",
                           "budget_count": 5})  # fmt: skip
    made = await admin.ok("POST", "/v1/coupon-campaigns", crm, definition("MINE", store="S1"))
    assert (made["store"], made["legal_entity"]) == ("S1", "LE1")
    await admin.ok("PATCH", "/v1/coupon-campaigns/MINE", crm, {"state": "active"})
    assert len(await codes(admin, "MINE", 5)) == 5  # HQ spends no grant budget
    got, body = await admin.call("POST", "/v1/coupon-campaigns/MINE/codes", crm, {"count": 6})
    assert (got, body["error"]["code"]) == (403, "grant_budget_exceeded")
    made_codes = await admin.ok("POST", "/v1/coupon-campaigns/MINE/codes", crm, {"count": 5})
    assert made_codes["count"] == 5
    hq = await campaign(admin, "HQ")
    got, _ = await admin.call("GET", "/v1/coupon-campaigns/HQ", crm)
    assert got == 403 and hq["store"] == ""
    listed = await admin.ok("GET", "/v1/coupon-campaigns", crm)
    assert [c["code"] for c in listed["items"]] == ["MINE"]
    await admin.ok("DELETE", f"/v1/grants/{grant['id']}")
    got, body = await admin.call("PATCH", "/v1/coupon-campaigns/MINE", crm, {"state": "paused"})
    assert (got, body["error"]["code"]) == (403, "not_granted")
    assert (await campaign_row(db_url, "MINE"))["state"] == "active"


# --- codes ---------------------------------------------------------------------------------------


async def test_generated_codes_are_valid_unique_and_a_repeated_key_makes_no_more(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin)
    first = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/codes",
                           json={"count": 500, "key": "print-1"})  # fmt: skip
    made = first["codes"]
    assert len(made) == len(set(made)) == 500 and first["replayed"] is False
    assert all(model.parse(code) == code and len(code) == 16 for code in made)
    again = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/codes",
                           json={"count": 500, "key": "print-1"})  # fmt: skip
    assert again["replayed"] is True and sorted(again["codes"]) == sorted(made)
    assert again["batch"] == first["batch"]
    assert await count(db_url, "coupon_codes") == 500
    assert (await campaign_row(db_url, "TENOFF"))["issued_count"] == 500
    assert (await campaign_row(db_url, "TENOFF"))["issued_value"] == 500 * 1_000


async def test_a_code_that_clashes_is_drawn_again(admin: AdminClient, db_url: str) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin)
    coupons = service(admin)
    draws = itertools.count()

    def randbytes(n: int) -> bytes:
        return bytes(n) if next(draws) < 3 else bytes([7]) * n  # one draw thrice, then another

    coupons.randbytes = randbytes
    first = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/codes", json={"count": 1})
    second = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/codes", json={"count": 1})
    assert first["codes"] != second["codes"]
    assert await count(db_url, "coupon_codes") == 2
    assert (await campaign_row(db_url, "TENOFF"))["issued_count"] == 2


async def test_budgets_hold_under_concurrent_issuance(admin: AdminClient, db_url: str) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin, max_issued=100, max_value_fen=1_000_000)
    answers = await asyncio.gather(*(
        admin.call("POST", "/v1/coupon-campaigns/TENOFF/codes", json={"count": 15})
        for _ in range(10)
    ))  # fmt: skip
    statuses = sorted(status for status, _ in answers)
    assert statuses == [201] * 6 + [409] * 4, answers
    row = await campaign_row(db_url, "TENOFF")
    assert row["issued_count"] == 90 == await count(db_url, "coupon_codes")
    assert row["issued_value"] == 90_000


async def test_partner_codes_import_all_or_none(admin: AdminClient, db_url: str) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin)
    made = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/imports",
                          json={"codes": ["PARTNER-0001", " partner-0002 "]})  # fmt: skip
    assert sorted(c["code"] for c in made["codes"]) == ["PARTNER-0001", "PARTNER-0002"]
    before = await counts(db_url)
    for codes_, status, code in (
        (["PARTNER-0003", "PARTNER-0001"], 409, "coupon_code_exists"),
        (["PARTNER-0004", "partner-0004"], 400, "invalid_value"),
        (["PARTNER-0005", "no spaces"], 400, "coupon_code_malformed"),
        (["---"], 400, "coupon_code_malformed"),
    ):
        got, body = await admin.call("POST", "/v1/coupon-campaigns/TENOFF/imports",
                                     json={"codes": codes_})  # fmt: skip
        assert (got, body["error"]["code"]) == (status, code), codes_
    assert await counts(db_url) == before
    found = await admin.ok("GET", "/v1/coupons/partner-0002")
    assert (found["code"], found["source"], found["state"]) == (
        "PARTNER-0002",
        "imported",
        "issued",
    )


async def test_codes_are_issued_to_members_by_list_and_by_segment_once_per_key(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin, holder_only=True)
    ids = [await member(admin) for _ in range(3)]
    made = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/issues",
                          json={"member_ids": ids[:2], "key": "welcome"})  # fmt: skip
    assert sorted(c["member_id"] for c in made["codes"]) == ids[:2]
    again = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/issues",
                           json={"member_ids": ids[:2], "key": "welcome"})  # fmt: skip
    assert again["replayed"] is True and again["batch"] == made["batch"]
    await admin.ok("POST", "/v1/card-classes", json={"code": "VIP", "name": "VIP", "named": True})
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "stored_value"})
    await admin.ok("POST", "/v1/cards", json={"class_code": "VIP", "store": "S1",
                                              "member_id": ids[2]})  # fmt: skip
    listed = await admin.ok("GET", "/v1/coupon-campaigns/TENOFF/codes", member_id=ids[1])
    assert [(c["member_id"], c["state"]) for c in listed["items"]] == [(ids[1], "issued")]
    page = await admin.ok("GET", "/v1/coupon-campaigns/TENOFF/codes", limit=1)
    rest = await admin.ok("GET", "/v1/coupon-campaigns/TENOFF/codes", after=page["next_after"])
    assert len(page["items"]) == 1 and rest["next_after"] is None
    assert sorted(c["code"] for c in page["items"] + rest["items"]) == sorted(
        c["code"] for c in made["codes"]
    )
    segment = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/issues",
                             json={"segment": {"card_class": "VIP"}})  # fmt: skip
    assert [c["member_id"] for c in segment["codes"]] == [ids[2]]
    before = await counts(db_url)
    for body, status, code in (
        ({"member_ids": [999_999]}, 404, "member_not_found"),
        ({"segment": {"tier": "NOBODY"}}, 400, "no_members"),
        ({"member_ids": ids, "segment": {"tier": "X"}}, 400, "invalid_value"),
        ({"segment": {"card_class": "VIP", "tier": "X"}}, 400, "invalid_value"),
    ):
        got, answer = await admin.call("POST", "/v1/coupon-campaigns/TENOFF/issues", json=body)
        assert (got, answer["error"]["code"]) == (status, code), body
    assert await counts(db_url) == before
    assert await count(db_url, "coupon_codes", member_id=ids[0]) == 1


async def test_a_code_is_found_however_typed_and_voided_once(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin)
    [code] = await codes(admin, "TENOFF", 1)
    typed = " " + model.display(code).lower().replace("1", "l").replace("0", "o") + " "
    found = await admin.ok("GET", f"/v1/coupons/{typed}")
    assert (found["code"], found["state"], found["campaign"]) == (code, "issued", "TENOFF")
    assert found["valid_to_ms"] == NOW_MS + 30 * DAY_MS
    voided = await admin.ok("POST", f"/v1/coupons/{code}/void")
    assert voided["state"] == "voided"
    before = await counts(db_url)
    got, body = await admin.call("POST", f"/v1/coupons/{code}/void")
    assert (got, body["error"]["code"]) == (409, "coupon_state")
    wrong = code[:-1] + ("0" if code[-1] != "0" else "1")
    # A typo in a generated code finds nothing (it could still be a partner's code).
    for text, status, error in ((wrong, 404, "coupon_not_found"),
                                ("ab", 400, "coupon_code_malformed"),
                                ("NO_SUCH_CODE", 400, "coupon_code_malformed"),
                                ("NOSUCHCODE", 404, "coupon_not_found")):  # fmt: skip
        got, body = await admin.call("GET", f"/v1/coupons/{text}")
        assert (got, body["error"]["code"]) == (status, error), text
    assert await counts(db_url) == before


# --- signing keys and QR -----------------------------------------------------------------------


async def test_a_signed_qr_verifies_under_the_entity_key_until_the_key_is_retired(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin)
    [code] = await codes(admin, "TENOFF", 1)
    got, body = await admin.call("GET", f"/v1/coupons/{code}/qr")
    assert (got, body["error"]["code"]) == (409, "no_signing_key")
    key = await admin.ok("POST", "/v1/coupon-keys", json={"legal_entity": "LE1", "kid": "le1-1"})
    [stored] = await sql_rows(db_url, "SELECT * FROM coupon_signing_keys")
    assert stored["public_hex"] == key["public_hex"] and key["public_hex"] not in str(
        stored["private_sealed"]
    )
    qr = await admin.ok("GET", f"/v1/coupons/{code}/qr")
    claims = model.parse_qr(qr["qr"])
    assert (claims.code, claims.issuer_entity, claims.kid) == (code, "LE1", "le1-1")
    assert claims.expiry_ms == NOW_MS + 30 * DAY_MS
    assert ed25519_verify(bytes.fromhex(key["public_hex"]), claims.payload, claims.signature)
    listed = await admin.ok("GET", "/v1/coupon-keys", legal_entity="LE1")
    assert [k["kid"] for k in listed["items"]] == ["le1-1"]
    before = await counts(db_url)
    got, body = await admin.call("POST", "/v1/coupon-keys", json={"legal_entity": "LE1",
                                                                  "kid": "le1-1"})  # fmt: skip
    assert (got, body["error"]["code"]) == (409, "key_exists")
    got, body = await admin.call("POST", "/v1/coupon-keys", json={"legal_entity": "LE7",
                                                                  "kid": "le7-1"})  # fmt: skip
    assert (got, body["error"]["code"]) == (404, "entity_not_found")
    assert await counts(db_url) == before
    retired = await admin.ok("POST", "/v1/coupon-keys/le1-1/retire")
    assert retired["state"] == "retired"
    got, body = await admin.call("POST", "/v1/coupon-keys/le1-1/retire")
    assert (got, body["error"]["code"]) == (409, "key_retired")
    got, body = await admin.call("GET", f"/v1/coupons/{code}/qr")
    assert (got, body["error"]["code"]) == (409, "no_signing_key")


# --- figures -------------------------------------------------------------------------------------


async def test_figures_count_issued_codes_and_expired_ones_once_the_campaign_ended(
    admin: AdminClient,
) -> None:
    await admin.org("LE1", "S1")
    await campaign(admin)
    await codes(admin, "TENOFF", 4)
    figures = await admin.ok("GET", "/v1/coupon-campaigns/TENOFF/figures")
    assert figures == {
        "campaign": "TENOFF", "issued": 4, "redeemed": 0, "expired": 0,
        "redemption_rate_bp": 0, "store_cost_fen": 0, "supplier_cost_fen": 0, "cost_fen": 0,
        "redeemed_value_fen": 0,
    }  # fmt: skip
    await admin.ok("PATCH", "/v1/coupon-campaigns/TENOFF", json={"state": "ended"})
    figures = await admin.ok("GET", "/v1/coupon-campaigns/TENOFF/figures")
    assert figures["expired"] == 4
    got, body = await admin.call("POST", "/v1/coupon-campaigns/TENOFF/codes", json={"count": 1})
    assert (got, body["error"]["code"]) == (409, "campaign_ended")


# --- answers match the OpenAPI document ----------------------------------------------------------


def draft7(schema: Any) -> Any:
    """An OpenAPI 3.0 schema as JSON Schema draft 7: `nullable` becomes "or null"."""
    if isinstance(schema, list):
        return [draft7(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {name: draft7(value) for name, value in schema.items() if name != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") else out


async def test_every_coupon_answer_matches_its_route_schema(admin: AdminClient) -> None:
    await admin.org("LE1", "S1")
    schemas = {(r.method, r.path): r.answers for r in COUPON_ROUTES}
    seen = set()

    async def call(method: str, route: str, path: str, **extra: Any) -> Any:
        status, body = await admin.call(method, path, **extra)
        try:
            routes.check(draft7(schemas[(method, route)][status]), body)
        except ApiError as exc:
            raise AssertionError((method, route, exc.field, exc.message, body)) from None
        seen.add((method, route))
        return body

    person = await member(admin)
    await call("POST", "/v1/coupon-campaigns", "/v1/coupon-campaigns",
               json=definition(holder_only=True, supplier_share_bp=100, store_share_bp=9_900,
                               supplier_id="SUP", departments=["FOOD"]))  # fmt: skip
    await call("PATCH", "/v1/coupon-campaigns/{code}", "/v1/coupon-campaigns/TENOFF",
               json={"state": "active"})  # fmt: skip
    await call("GET", "/v1/coupon-campaigns", "/v1/coupon-campaigns")
    await call("GET", "/v1/coupon-campaigns/{code}", "/v1/coupon-campaigns/TENOFF")
    generate = ("POST", "/v1/coupon-campaigns/{code}/codes", "/v1/coupon-campaigns/TENOFF/codes")
    made = await call(*generate, json={"count": 3, "key": "k"})
    await call(*generate, json={"count": 3, "key": "k"})
    await call("GET", "/v1/coupon-campaigns/{code}/codes", "/v1/coupon-campaigns/TENOFF/codes")
    await call("POST", "/v1/coupon-campaigns/{code}/imports",
               "/v1/coupon-campaigns/TENOFF/imports", json={"codes": ["P-0001"]})  # fmt: skip
    await call("POST", "/v1/coupon-campaigns/{code}/issues",
               "/v1/coupon-campaigns/TENOFF/issues", json={"member_ids": [person]})  # fmt: skip
    await call("GET", "/v1/coupon-campaigns/{code}/figures", "/v1/coupon-campaigns/TENOFF/figures")
    enrolments = "/v1/coupon-campaigns/{code}/enrolments"
    await call("POST", enrolments, "/v1/coupon-campaigns/TENOFF/enrolments",
               json={"member_ids": [person]})  # fmt: skip
    await call("GET", enrolments, "/v1/coupon-campaigns/TENOFF/enrolments")
    await call("DELETE", enrolments + "/{member_id}",
               f"/v1/coupon-campaigns/TENOFF/enrolments/{person}")  # fmt: skip
    code = made["codes"][0]
    await call("GET", "/v1/coupons/{code}", f"/v1/coupons/{code}")
    await call("POST", "/v1/coupon-keys", "/v1/coupon-keys",
               json={"legal_entity": "LE1", "kid": "k1"})  # fmt: skip
    await call("GET", "/v1/coupon-keys", "/v1/coupon-keys")
    await call("GET", "/v1/coupons/{code}/qr", f"/v1/coupons/{code}/qr")
    await call("POST", "/v1/coupons/{code}/void", f"/v1/coupons/{code}/void")
    await call("POST", "/v1/coupon-keys/{kid}/retire", "/v1/coupon-keys/k1/retire")
    assert seen == set(schemas)


# --- audit fixes ---------------------------------------------------------------------------------


async def test_enrolment_refuses_members_outside_the_campaigns_scope_and_changes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    """Enrolment names members as issuance to members does: of the campaign's legal entity
    and, for a store's campaign, of its home store; anyone else is not found here."""
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    await campaign(admin, "HQCLUB", reward_spend_fen=5_000, enrolled_only=True)
    await campaign(admin, "S1CLUB", store="S1", reward_spend_fen=5_000, enrolled_only=True)
    here, next_door, abroad = (
        await member(admin),
        await member(admin, "S2"),
        await member(admin, "S3"),
    )
    before = await count(db_url, "coupon_enrolments")
    audit = await count(db_url, "org_audit_log")
    for path, ids in (
        ("/v1/coupon-campaigns/HQCLUB/enrolments", [here, abroad]),
        ("/v1/coupon-campaigns/S1CLUB/enrolments", [here, next_door]),
        ("/v1/coupon-campaigns/S1CLUB/enrolments", [999_999]),
    ):
        got, body = await admin.call("POST", path, json={"member_ids": ids})
        assert (got, body["error"]["code"]) == (404, "member_not_found"), (path, ids)
    assert await count(db_url, "coupon_enrolments") == before
    assert await count(db_url, "org_audit_log") == audit
    made = await admin.ok("POST", "/v1/coupon-campaigns/HQCLUB/enrolments",
                          json={"member_ids": [here, next_door]})  # fmt: skip
    assert made["enrolled"] == 2
    made = await admin.ok("POST", "/v1/coupon-campaigns/S1CLUB/enrolments",
                          json={"member_ids": [here]})  # fmt: skip
    assert made["enrolled"] == 1


async def test_an_import_of_another_spelling_of_an_existing_code_is_refused_whole(
    admin: AdminClient, db_url: str
) -> None:
    """A partner code whose normalised form (what a cashier typing it finds) is a code that
    exists, or is another code of the same import, would make a lookup find two codes: the
    import is refused and writes nothing."""
    await admin.org("LE1", "S1")
    await campaign(admin)
    service(admin).randbytes = bytes  # every symbol 0: the code 0000000000000000
    [generated] = await codes(admin, "TENOFF", 1)
    assert generated == "0" * 16
    await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/imports",
                   json={"codes": ["PART0001"]})  # fmt: skip
    before = await counts(db_url)
    row = await campaign_row(db_url, "TENOFF")
    spelled = model.display(generated)  # hyphens kept by the import
    for codes_, status, error in (
        (["FRESH-0001", spelled], 409, "coupon_code_exists"),
        (["oooo0000OOOO0000"], 409, "coupon_code_exists"),
        (["PART-0001"], 409, "coupon_code_exists"),
        (["FRESH-0002", "FRESH0002"], 400, "invalid_value"),
        (["FRESH-0003", "FRE-SH-0003"], 400, "invalid_value"),
    ):
        got, body = await admin.call("POST", "/v1/coupon-campaigns/TENOFF/imports",
                                     json={"codes": codes_})  # fmt: skip
        assert (got, body["error"]["code"]) == (status, error), codes_
    assert await counts(db_url) == before
    assert await campaign_row(db_url, "TENOFF") == row
    found = await admin.ok("GET", f"/v1/coupons/{spelled}")
    assert (found["code"], found["source"]) == (generated, "generated")
    made = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/imports",
                          json={"codes": ["FRESH-0001"]})  # fmt: skip
    assert [c["code"] for c in made["codes"]] == ["FRESH-0001"]


async def test_a_codes_qr_expiry_and_shown_dates_follow_its_drafts_later_validity(
    admin: AdminClient,
) -> None:
    """Codes issued while the campaign was a draft: the draft's validity changed afterwards
    is the one a lookup shows and the QR text is signed with (the one the till judges)."""
    await admin.org("LE1", "S1")
    await campaign(admin, state="draft")
    [code] = await codes(admin, "TENOFF", 1)
    later = {"valid_from_ms": NOW_MS - 2 * DAY_MS, "valid_to_ms": NOW_MS + 10 * DAY_MS}
    await admin.ok("PATCH", "/v1/coupon-campaigns/TENOFF", json=later)
    await admin.ok("PATCH", "/v1/coupon-campaigns/TENOFF", json={"state": "active"})
    found = await admin.ok("GET", f"/v1/coupons/{code}")
    assert (found["valid_from_ms"], found["valid_to_ms"]) == (
        later["valid_from_ms"],
        later["valid_to_ms"],
    )
    listed = await admin.ok("GET", "/v1/coupon-campaigns/TENOFF/codes")
    assert [c["valid_to_ms"] for c in listed["items"]] == [later["valid_to_ms"]]
    await admin.ok("POST", "/v1/coupon-keys", json={"legal_entity": "LE1", "kid": "le1-1"})
    qr = await admin.ok("GET", f"/v1/coupons/{code}/qr")
    assert qr["expiry_ms"] == later["valid_to_ms"]
    assert model.parse_qr(qr["qr"]).expiry_ms == later["valid_to_ms"]


async def test_an_enrolment_member_id_past_the_column_is_a_clear_refusal(
    admin: AdminClient,
) -> None:
    """PostgreSQL's member ids are int4: an id past it is 404 (path) or 400 (cursor), never
    the 503 of a statement the database refused."""
    await admin.org("LE1", "S1")
    await campaign(admin)
    base = "/v1/coupon-campaigns/TENOFF/enrolments"
    status, answer = await admin.call("GET", base, after="3000000000")
    assert (status, answer["error"]["field"]) == (400, "after")
    status, answer = await admin.call("DELETE", f"{base}/3000000000")
    assert (status, answer["error"]["code"]) == (404, "not_found")


async def test_a_card_class_segment_reaches_only_members_in_the_campaigns_scope_each_once(
    admin: AdminClient, db_url: str
) -> None:
    """A store's campaign issues by card class to its home store's members holding an active
    card of the class issued there: not to another store's member holding one (a reviewer's
    finding: the segment read the cards alone), and once to a member with two."""
    await admin.org("LE1", "S1", "S2")
    await admin.ok("POST", "/v1/card-classes", json={"code": "VIP", "name": "VIP", "named": True})
    for store in ("S1", "S2"):
        await admin.ok("POST", "/v1/grants", json={"store": store, "function": "stored_value"})
    theirs, ours = await member(admin, "S1"), await member(admin, "S2")
    for holder in (theirs, ours, ours):
        await admin.ok("POST", "/v1/cards", json={"class_code": "VIP", "store": "S2",
                                                  "member_id": holder})  # fmt: skip
    await campaign(admin, "S2ONLY", store="S2")
    await campaign(admin, "S2MORE", store="S2")
    segment = {"segment": {"card_class": "VIP"}}
    made = await admin.ok("POST", "/v1/coupon-campaigns/S2ONLY/issues", json=segment)
    assert [c["member_id"] for c in made["codes"]] == [ours]
    await admin.ok("PATCH", f"/v1/members/{ours}", json={"home_store": "S1"})
    before = await counts(db_url)
    got, answer = await admin.call("POST", "/v1/coupon-campaigns/S2MORE/issues", json=segment)
    assert (got, answer["error"]["code"]) == (400, "no_members"), answer
    assert await counts(db_url) == before


async def test_an_issuance_key_answers_only_its_own_request_again(
    admin: AdminClient, db_url: str
) -> None:
    """The same key with another request (other codes, count, members, kind of issuance) is
    409 `key_reused` and changes nothing: before, it was answered `replayed` and the new
    request was never done. A repeat of a segment's issuance answers its first batch even
    when the segment holds others by then."""
    await admin.org("LE1", "S1")
    await campaign(admin)
    await admin.ok("POST", "/v1/card-classes", json={"code": "VIP", "name": "VIP", "named": True})
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "stored_value"})
    one, two = await member(admin), await member(admin)
    await admin.ok("POST", "/v1/cards", json={"class_code": "VIP", "store": "S1",
                                              "member_id": one})  # fmt: skip
    path = "/v1/coupon-campaigns/TENOFF"
    imported = await admin.ok("POST", f"{path}/imports", json={"codes": ["PARTNER-A1"], "key": "a"})
    generated = await admin.ok("POST", f"{path}/codes", json={"count": 3, "key": "g"})
    issued = await admin.ok("POST", f"{path}/issues", json={"member_ids": [one], "key": "m"})
    by_class = await admin.ok("POST", f"{path}/issues",
                              json={"segment": {"card_class": "VIP"}, "key": "s"})  # fmt: skip
    before = await counts(db_url)
    for route, body in (
        ("imports", {"codes": ["PARTNER-B2"], "key": "a"}),
        ("codes", {"count": 4, "key": "g"}),
        ("codes", {"count": 1, "key": "a"}),
        ("issues", {"member_ids": [two], "key": "m"}),
        ("issues", {"member_ids": [one], "key": "s"}),
        ("issues", {"segment": {"card_class": "VIP"}, "key": "m"}),
    ):
        got, answer = await admin.call("POST", f"{path}/{route}", json=body)
        assert (got, answer["error"]["code"]) == (409, "key_reused"), (route, body)
    assert await counts(db_url) == before
    await admin.ok("POST", "/v1/cards", json={"class_code": "VIP", "store": "S1",
                                              "member_id": two})  # fmt: skip
    for route, body, first in (
        ("imports", {"codes": ["PARTNER-A1"], "key": "a"}, imported),
        ("codes", {"count": 3, "key": "g"}, generated),
        ("issues", {"member_ids": [one], "key": "m"}, issued),
        ("issues", {"segment": {"card_class": "VIP"}, "key": "s"}, by_class),
    ):
        again = await admin.ok("POST", f"{path}/{route}", json=body)
        assert (again["replayed"], again["batch"]) == (True, first["batch"]), (route, body)
    looked, _ = await admin.call("GET", "/v1/coupons/PARTNER-B2")
    assert looked == 404


async def test_an_entity_campaign_names_only_stores_of_its_legal_entity(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await admin.org("LE2", "S3")
    before = await counts(db_url)
    for stores in (["S3"], ["S1", "S3"], ["NOWHERE"]):
        got, answer = await admin.call("POST", "/v1/coupon-campaigns",
                                       json=definition(stores=stores))  # fmt: skip
        assert (got, answer["error"]["code"]) == (400, "store_other_entity"), stores
    assert await counts(db_url) == before
    await campaign(admin, state="draft", stores=["S1"])
    got, answer = await admin.call("PATCH", "/v1/coupon-campaigns/TENOFF", json={"stores": ["S3"]})
    assert (got, answer["error"]["code"]) == (400, "store_other_entity"), answer
    assert (await admin.ok("GET", "/v1/coupon-campaigns/TENOFF"))["stores"] == ["S1"]


async def test_a_live_campaign_saved_before_the_store_check_can_still_be_ended(
    admin: AdminClient, db_url: str
) -> None:
    """An entity campaign naming another entity's store was accepted before the check; a
    live campaign's stores cannot change, so every change of it was refused since (the
    session's diff review): the check runs only on a change of `stores`."""
    await admin.org("LE1", "S1")
    await admin.org("LE2", "S3")
    await campaign(admin, stores=["S1"])
    [row] = await sql_rows(db_url, "SELECT definition FROM coupon_campaigns WHERE code = 'TENOFF'")
    legacy = row["definition"].replace('"stores":["S1"]', '"stores":["S1","S3"]')
    assert legacy != row["definition"]
    await sql_execute(
        db_url,
        "UPDATE coupon_campaigns SET definition = replace(definition, "
        """'"stores":["S1"]', '"stores":["S1","S3"]') WHERE code = 'TENOFF'""",
    )
    [row] = await sql_rows(db_url, "SELECT definition FROM coupon_campaigns WHERE code = 'TENOFF'")
    assert row["definition"] == legacy
    ended = await admin.ok("PATCH", "/v1/coupon-campaigns/TENOFF", json={"state": "ended"})
    assert ended["state"] == "ended"
