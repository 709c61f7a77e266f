"""Members over the admin API (SQLite and PostgreSQL): registration, lookups, changes, SMS
consent, merging duplicates, deletion, scopes, and the ID number kept out of every answer and
audit row. Every answer is checked against its route's schema in the OpenAPI document."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy.exc import DBAPIError

from cardcore.api import routes
from cardcore.api.app import ADMIN_ROUTES, build_app
from cardcore.api.edge import ApiError
from cardcore.cards.admin import ensure_currency
from cardcore.cards.admin_http import CARDS_KEY
from cardcore.cards.http import POS_KEY
from cardcore.cards.model import CURRENCY, Kind, Outcome
from cardcore.config import Config
from cardcore.ledger.model import AccountFlags, CreateAccount
from cardcore.ledger.service import Ledger
from cardcore.members.http import MEMBERS_KEY
from cardcore.members.service import id_context
from cardcore.metrics import Metrics
from cardcore.org.http import ORG_KEY
from cardcore.records import Records
from cardcore.vault import Vault
from tests.conftest import ADMIN_KEK
from tests.helpers import AdminClient, move, quiet_server, sql_execute, sql_rows
from tests.integration import test_cards_api as cards_api

RESIDENT = "11010519491231002X"  # GB 11643's example number
RESIDENT_2 = "440301199003071230"
MASKED = "110***********002X"

# --- answers checked against the route table's schemas ------------------------------------------


def _draft7(schema: Any) -> Any:
    """OpenAPI 3.0 `nullable` as JSON Schema draft 7 understands it."""
    if isinstance(schema, list):
        return [_draft7(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _draft7(v) for k, v in schema.items() if k != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") else out


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")


_ROUTES = sorted(ADMIN_ROUTES, key=lambda r: r.path.count("{"))  # plain paths first


_DRAFT7: dict[tuple[str, str, int], Any] = {}  # kept alive: routes.check caches by id()


def check_answer(method: str, path: str, status: int, body: Any) -> None:
    """The answer fits what the route's OpenAPI entry promises for `status`."""
    route = next((r for r in _ROUTES if r.method == method and _pattern(r.path).match(path)),
                 None)  # fmt: skip
    if route is None:  # the document itself
        return
    if status < 300:
        assert status in route.answers, (method, path, status)
        schema = route.answers[status]
    else:
        assert status in {*route.refusals, 401, 413, 503}, (method, path, status, body)
        schema = routes.ERROR
    key = (route.method, route.path, status if status < 300 else 0)
    draft = _DRAFT7.setdefault(key, _draft7(schema))
    try:
        routes.check(draft, body)
    except ApiError as exc:
        raise AssertionError(f"{method} {path} {status}: {exc.field}: {exc.message}") from None


ANSWERS: list[str] = []  # the JSON text of every answer of the test (searched for secrets)


async def call(
    admin: AdminClient, method: str, path: str, token: str | None = None, body: Any = None,
    **params: Any,
) -> tuple[int, Any]:  # fmt: skip
    status, answer = await admin.call(method, path, token, body, **params)
    check_answer(method, path, status, answer)
    ANSWERS.append(json.dumps(answer, ensure_ascii=False))
    return status, answer


async def ok(
    admin: AdminClient, method: str, path: str, token: str | None = None, body: Any = None,
    **params: Any,
) -> Any:  # fmt: skip
    status, answer = await call(admin, method, path, token, body, **params)
    assert status in (200, 201), (method, path, status, answer)
    return answer


async def refused(
    admin: AdminClient, method: str, path: str, token: str | None = None, body: Any = None,
    **params: Any,
) -> tuple[int, str]:  # fmt: skip
    status, answer = await call(admin, method, path, token, body, **params)
    assert status >= 400, (method, path, status, answer)
    return status, answer["error"]["code"]


# --- a small world ----------------------------------------------------------------------------


async def world(admin: AdminClient) -> dict[str, str]:
    """LE1 with stores S1 and S2, LE2 with S3; a CRM officer token of S1 and of S2."""
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    return {
        "s1": await admin.token("store_crm", "store", "S1"),
        "s2": await admin.token("store_crm", "store", "S2"),
    }


def new_member(mobile: str, store: str = "S1", **extra: Any) -> dict[str, Any]:
    return {"mobile": mobile, "name": extra.pop("name", f"Member {mobile[-4:]}"),
            "home_store": store, **extra}  # fmt: skip


async def register(admin: AdminClient, mobile: str, store: str = "S1", **extra: Any) -> Any:
    return await ok(admin, "POST", "/v1/members", None, new_member(mobile, store, **extra))


_card_ids = itertools.count(1)


async def card(
    admin: AdminClient, member_id: int, *, fund: int = 0, pending: int = 0, state: str = "active"
) -> dict[str, int]:
    """A card of the member whose stored-value account holds `fund` fen posted and `pending`
    fen on hold toward it, through the ledger; the card row points at that account."""
    ledger: Ledger = admin.app[POS_KEY].ledger
    await ensure_currency(ledger)
    n = next(_card_ids)
    source, account = await ledger.submit(
        [
            CreateAccount(CURRENCY, "LE1", "entity", "LE1", "test_float"),
            CreateAccount(CURRENCY, "LE1", "card", f"test-{n}", "stored_value",
                          AccountFlags(no_overdraft=True)),
        ]
    )  # fmt: skip
    assert source.account_id is not None
    assert account.account_id is not None
    ops = []
    if fund:
        ops.append(move(f"fund-{n}", source.account_id, account.account_id, fund))
    if pending:
        ops.append(move(f"hold-{n}", source.account_id, account.account_id, pending,
                        pending=True))  # fmt: skip
    if ops:
        assert all(r.ok for r in await ledger.submit(ops))
    card_id = 1000 + n
    async with Records(ledger.store.engine).begin() as uow:
        await uow.insert(
            "cards",
            {
                "token": f"t{n:063d}", "pan_masked": f"628888*********{n % 10000:04d}",
                "legal_entity": "LE1", "account_id": account.account_id, "expires": "",
                "state": state, "balance_max": 0, "created_at_ms": 0, "id": card_id,
                "pan_sealed": "", "secret_sealed": "", "class_code": "VIP",
                "member_id": member_id, "store": "S1", "named": True, "pvv": "",
                "pin_failures": 0, "replaced_by": None, "updated_at_ms": 0,
            },
        )  # fmt: skip
    return {"id": card_id, "account_id": account.account_id}


async def balance(admin: AdminClient, account_id: int) -> tuple[int, int, int, int]:
    found = await admin.app[POS_KEY].ledger.account(account_id)
    assert found is not None
    b = found.balance
    return b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending


async def snapshot(db_url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row a member change could touch."""
    return {
        table: await sql_rows(db_url, f"SELECT * FROM {table} ORDER BY 1")  # noqa: S608
        for table in ("members", "member_consents", "cards", "org_audit_log")
    }


# --- registration -----------------------------------------------------------------------------


async def test_registration_normalizes_the_mobile_seals_the_id_and_records_both_consents(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    member = await register(
        admin, "138 0013 8000", id_type="resident_id", id_number=RESIDENT.lower(),
        sms_alerts=True, sms_marketing=False, consent_source="counter", gender="F",
        birthday="1949-12-31", email="li@example.cn", tier="gold",
    )  # fmt: skip
    assert member["mobile"] == "+8613800138000"
    assert (member["id_type"], member["id_masked"]) == ("resident_id", MASKED)
    assert [member[k] for k in ("home_store", "legal_entity", "state")] == ["S1", "LE1", "active"]
    assert (member["sms_alerts"], member["sms_marketing"]) == (True, False)
    assert (member["cards"], member["cards_more"]) == ([], False)
    assert await ok(admin, "GET", f"/v1/members/{member['id']}") == member
    history = await ok(admin, "GET", f"/v1/members/{member['id']}/consents")
    assert [(c["purpose"], c["granted"], c["source"]) for c in history["items"]] == [
        ("alerts", True, "counter"),
        ("marketing", False, "counter"),
    ]
    assert all(c["at_ms"] == member["created_at_ms"] for c in history["items"])
    [row] = await sql_rows(db_url, "SELECT id_hash, id_sealed FROM members")
    vault = Vault(ADMIN_KEK)
    assert row["id_hash"] == vault.lookup("id:resident_id", RESIDENT)
    assert vault.open_text(id_context(member["id"]), row["id_sealed"]) == RESIDENT
    audit = await ok(admin, "GET", "/v1/audit", object_kind="member")
    assert [(a["action"], a["store"], a["after"]["id_masked"]) for a in audit["items"]] == [
        ("member.create", "S1", MASKED)
    ]


async def test_a_mobile_is_one_member_in_the_group_whatever_its_spelling(
    admin: AdminClient, db_url: str
) -> None:
    tokens = await world(admin)
    first = await register(admin, "13800138000")
    status, answer = await call(
        admin, "POST", "/v1/members", tokens["s2"], new_member("+86 138-0013-8000", "S2")
    )
    assert (status, answer["error"]["code"]) == (409, "member_exists")
    assert str(first["id"]) not in answer["error"]["message"]  # the other member stays unnamed
    assert len((await snapshot(db_url))["members"]) == 1


async def test_concurrent_registrations_of_one_mobile_make_exactly_one_member(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    spellings = ["13900139000", "+8613900139000", "0086 139 0013 9000", "139-0013-9000"] * 3
    answers = await asyncio.gather(
        *(call(admin, "POST", "/v1/members", None, new_member(m)) for m in spellings)
    )
    assert sorted(status for status, _ in answers) == [201] + [409] * (len(spellings) - 1)
    assert {a["error"]["code"] for s, a in answers if s == 409} == {"member_exists"}
    rows = await snapshot(db_url)
    assert [m["mobile"] for m in rows["members"]] == ["+8613900139000"]
    assert [a["action"] for a in rows["org_audit_log"] if a["object_kind"] == "member"] == [
        "member.create"
    ]


async def test_registration_is_refused_for_bad_data_and_closed_or_foreign_stores(
    admin: AdminClient, db_url: str
) -> None:
    tokens = await world(admin)
    await ok(admin, "PATCH", "/v1/stores/S2", None, {"state": "closed"})
    auditor = await admin.token("auditor")
    before = await snapshot(db_url)
    cases = [
        (None, new_member("12800138000"), 400, "invalid_mobile"),
        (None, new_member("13800138000", id_type="resident_id", id_number="110105194912310021"),
         400, "invalid_id_number"),
        (None, new_member("13800138000", id_type="passport"), 400, "missing_field"),
        (None, new_member("13800138000", birthday="2999-01-01"), 400, "invalid_birthday"),
        (None, new_member("13800138000", birthday="2001-02-29"), 400, "invalid_birthday"),
        (None, new_member("13800138000", gender="W"), 400, "invalid_value"),
        (None, new_member("13800138000", email="no-at-sign"), 400, "invalid_value"),
        (None, new_member("13800138000", name=""), 400, "invalid_value"),
        (None, new_member("13800138000", name="a\u0000b"), 400, "invalid_value"),
        (None, new_member("13800138000", nickname="x"), 400, "unknown_field"),
        (None, new_member("13800138000", "S9"), 404, "store_not_found"),
        (None, new_member("13800138000", "S2"), 409, "store_closed"),
        (tokens["s1"], new_member("13800138000", "S3"), 403, "scope_forbidden"),
        (auditor, new_member("13800138000"), 403, "role_forbidden"),
    ]  # fmt: skip
    for token, body, status, code in cases:
        assert await refused(admin, "POST", "/v1/members", token, body) == (status, code), body
    assert await snapshot(db_url) == before


# --- scopes ---------------------------------------------------------------------------------


async def test_a_store_officer_cannot_read_list_change_merge_or_delete_another_stores_member(
    admin: AdminClient, db_url: str
) -> None:
    tokens = await world(admin)
    mine = await register(admin, "13800000001", "S1")
    theirs = await register(admin, "13800000002", "S2", id_type="passport", id_number="E1234567")
    await card(admin, theirs["id"])
    before = await snapshot(db_url)
    s1, path = tokens["s1"], f"/v1/members/{theirs['id']}"
    attempts: list[tuple[str, str, Any]] = [
        ("GET", path, None),
        ("PATCH", path, {"name": "Mine now"}),
        ("DELETE", path, None),
        ("POST", f"{path}/merge", {"duplicate_id": mine["id"]}),
        ("POST", f"/v1/members/{mine['id']}/merge", {"duplicate_id": theirs["id"]}),
        ("POST", f"{path}/consents", {"purpose": "marketing", "granted": True, "source": "app"}),
        ("GET", f"{path}/consents", None),
        ("PATCH", f"/v1/members/{mine['id']}", {"home_store": "S2"}),
    ]
    for method, url, body in attempts:
        assert await refused(admin, method, url, s1, body) == (403, "scope_forbidden"), url
    listed = await ok(admin, "GET", "/v1/members", s1)
    assert [m["id"] for m in listed["items"]] == [mine["id"]]
    assert (await ok(admin, "GET", "/v1/members", s1, home_store="S2"))["items"] == []
    assert (await ok(admin, "GET", "/v1/members", s1, mobile="13800000002"))["items"] == []
    found = await ok(admin, "POST", "/v1/members/lookup", s1,
                     {"id_type": "passport", "id_number": "E1234567"})  # fmt: skip
    assert found["items"] == []
    assert await snapshot(db_url) == before  # nothing changed, nothing audited
    assert (await ok(admin, "GET", path))["name"] == theirs["name"]
    # the other store's officer does see it; an entity token sees only its entity
    assert (await ok(admin, "GET", path, tokens["s2"]))["id"] == theirs["id"]
    le2 = await admin.token("hq_marketing", "entity", "LE2")
    assert (await ok(admin, "GET", "/v1/members", le2))["items"] == []
    assert await refused(admin, "GET", path, le2) == (403, "scope_forbidden")
    le1 = await admin.token("hq_marketing", "entity", "LE1")
    listed = await ok(admin, "GET", "/v1/members", le1)
    assert [m["id"] for m in listed["items"]] == [mine["id"], theirs["id"]]


# --- lookups ----------------------------------------------------------------------------------


async def test_members_are_listed_by_filters_with_a_cursor(admin: AdminClient) -> None:
    await world(admin)
    made = [
        await register(admin, "13800000001", "S1", name="Wang Fang", tier="gold"),
        await register(admin, "13800000002", "S1", name="Wang Wei"),
        await register(admin, "13800000003", "S2", name="Li Na", tier="gold"),
        await register(admin, "+44 20 7946 0958", "S3", name="Wang Lei"),
    ]
    ids = [m["id"] for m in made]

    async def listed(**params: Any) -> list[int]:
        return [m["id"] for m in (await ok(admin, "GET", "/v1/members", **params))["items"]]

    assert await listed() == ids
    assert await listed(mobile="138-0000-0002") == [ids[1]]
    assert await listed(mobile="+442079460958") == [ids[3]]
    assert await listed(name_prefix="Wang") == [ids[0], ids[1], ids[3]]
    assert await listed(name_prefix="wang") == []  # case-sensitive on either database
    assert await listed(name_prefix="Wang", home_store="S1") == [ids[0], ids[1]]
    assert await listed(tier="gold") == [ids[0], ids[2]]
    assert await listed(state="merged") == []
    page = await ok(admin, "GET", "/v1/members", limit=2)
    assert ([m["id"] for m in page["items"]], page["next_after"]) == (ids[:2], str(ids[1]))
    rest = await ok(admin, "GET", "/v1/members", limit=2, after=page["next_after"])
    assert ([m["id"] for m in rest["items"]], rest["next_after"]) == (ids[2:], None)
    named = await ok(admin, "GET", "/v1/members", name_prefix="Wang", limit=2)
    assert [m["id"] for m in named["items"]] == ids[:2]
    more = await ok(admin, "GET", "/v1/members", name_prefix="Wang", after=named["next_after"])
    assert ([m["id"] for m in more["items"]], more["next_after"]) == ([ids[3]], None)
    assert "cards" not in page["items"][0]
    assert await refused(admin, "GET", "/v1/members", mobile="12345") == (400, "invalid_mobile")
    assert await refused(admin, "GET", "/v1/members", id_number="x") == (
        400, "unknown_parameter",
    )  # fmt: skip
    assert await refused(admin, "GET", "/v1/members", after="x") == (400, "invalid_value")


async def test_lookup_by_id_document_takes_the_number_in_the_body(admin: AdminClient) -> None:
    await world(admin)
    member = await register(admin, "13800000001", id_type="resident_id", id_number=RESIDENT)
    await register(admin, "13800000002", id_type="passport", id_number="E1234567")
    found = await ok(admin, "POST", "/v1/members/lookup", None,
                     {"id_type": "resident_id", "id_number": RESIDENT.lower()})  # fmt: skip
    assert [m["id"] for m in found["items"]] == [member["id"]]
    other_type = await ok(admin, "POST", "/v1/members/lookup", None,
                          {"id_type": "other", "id_number": RESIDENT})  # fmt: skip
    assert other_type["items"] == []
    # Paged as the docs say: the answer's next_after goes back as after.
    twin = await register(admin, "13800000003", id_type="passport", id_number="E1234567")
    ask = {"id_type": "passport", "id_number": "E1234567", "limit": 1}
    first = await ok(admin, "POST", "/v1/members/lookup", None, ask)
    assert first["next_after"] is not None
    second = await ok(admin, "POST", "/v1/members/lookup", None,
                      {**ask, "after": first["next_after"]})  # fmt: skip
    assert [m["id"] for m in second["items"]] == [twin["id"]]
    assert await refused(admin, "POST", "/v1/members/lookup", None,
                         {"id_type": "resident_id", "id_number": "110105194912310021"}) == (
        400, "invalid_id_number",
    )  # fmt: skip
    document = await ok(admin, "GET", "/v1/openapi.json", "")
    for path, operations in document["paths"].items():
        for operation in operations.values():
            names = {p["name"] for p in operation.get("parameters", [])}
            assert "id_number" not in names, path


# --- changes ----------------------------------------------------------------------------------


async def test_a_change_is_checked_applied_and_audited_with_the_masked_id(
    admin: AdminClient, db_url: str
) -> None:
    tokens = await world(admin)
    member = await register(admin, "13800000001", id_type="passport", id_number="E1234567")
    other = await register(admin, "13800000002")
    path = f"/v1/members/{member['id']}"
    changed = await ok(admin, "PATCH", path, tokens["s1"], {
        "name": "Zhang San", "gender": "M", "birthday": "1990-03-07", "email": "z@example.cn",
        "tier": "silver", "mobile": "+86 139 0000 0001", "id_type": "resident_id",
        "id_number": RESIDENT_2,
    })  # fmt: skip
    assert changed["mobile"] == "+8613900000001"
    assert (changed["id_type"], changed["id_masked"]) == ("resident_id", "440***********1230")
    assert (changed["name"], changed["tier"], changed["gender"]) == ("Zhang San", "silver", "M")
    assert changed["updated_at_ms"] >= member["updated_at_ms"]
    assert await ok(admin, "GET", path) == changed
    [row] = await sql_rows(db_url, "SELECT id_sealed FROM members WHERE id = :id", id=member["id"])
    assert Vault(ADMIN_KEK).open_text(id_context(member["id"]), row["id_sealed"]) == RESIDENT_2
    audit = await ok(admin, "GET", "/v1/audit", action="member.update")
    [entry] = audit["items"]
    assert entry["before"]["id_masked"] == "E*****67"
    assert entry["after"]["id_masked"] == "440***********1230"
    # Personal data is masked in the log (append-only: a delete could not erase it there).
    assert (entry["before"]["name"], entry["after"]["name"]) == ("M**********", "Z********")
    assert entry["after"]["mobile"] == "**********0001"
    assert {"name", "mobile", "id_masked", "tier"} <= set(entry["after"]["changed"])
    assert "Zhang San" not in str(audit) and member["name"] not in str(audit)

    before = await snapshot(db_url)
    cases = [
        ({"mobile": "13800000002"}, 409, "member_exists"),
        ({"birthday": "2999-01-01"}, 400, "invalid_birthday"),
        ({"id_number": RESIDENT}, 400, "missing_field"),
        ({"home_store": "S9"}, 404, "store_not_found"),
        ({"id": 5}, 400, "unknown_field"),
    ]
    for body, status, code in cases:
        assert await refused(admin, "PATCH", path, None, body) == (status, code), body
    assert await refused(admin, "PATCH", "/v1/members/999999", None, {"name": "x"}) == (
        404, "member_not_found",
    )  # fmt: skip
    assert await refused(admin, "GET", "/v1/members/99999999999") == (404, "member_not_found")
    assert await snapshot(db_url) == before
    moved = await ok(admin, "PATCH", f"/v1/members/{other['id']}", None, {"home_store": "S3"})
    assert (moved["home_store"], moved["legal_entity"]) == ("S3", "LE2")


async def test_consent_withdrawal_keeps_the_history(admin: AdminClient, db_url: str) -> None:
    await world(admin)
    member = await register(admin, "13800000001")
    path = f"/v1/members/{member['id']}/consents"
    steps = [("marketing", True, "counter"), ("alerts", True, "sms"), ("marketing", False, "app")]
    for purpose, granted, source in steps:
        given = await ok(admin, "POST", path, None,
                         {"purpose": purpose, "granted": granted, "source": source})  # fmt: skip
        assert (given["purpose"], given["granted"], given["source"]) == (purpose, granted, source)
    now = await ok(admin, "GET", f"/v1/members/{member['id']}")
    assert (now["sms_alerts"], now["sms_marketing"]) == (True, False)
    history = await ok(admin, "GET", path)
    assert [(c["purpose"], c["granted"], c["source"]) for c in history["items"]] == steps
    first = await ok(admin, "GET", path, limit=1)
    assert first["next_after"] == str(history["items"][0]["id"])
    wrong = {"purpose": "calls", "granted": True, "source": "app"}
    assert await refused(admin, "POST", path, None, wrong) == (400, "invalid_value")
    with pytest.raises(DBAPIError):  # the history is append-only: the table refuses deletes
        await sql_execute(db_url, "DELETE FROM member_consents")
    assert len((await snapshot(db_url))["member_consents"]) == 3


# --- merge ------------------------------------------------------------------------------------


async def test_merging_a_duplicate_keeps_every_card_and_balance(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    survivor = await register(admin, "13800000001")
    duplicate = await register(admin, "13800000002", "S2", sms_marketing=True)
    kept = await card(admin, survivor["id"], fund=1_000)
    moved = [
        await card(admin, duplicate["id"], fund=2_500),
        await card(admin, duplicate["id"], pending=700),
        await card(admin, duplicate["id"], state="closed"),
    ]
    balances = {c["account_id"]: await balance(admin, c["account_id"]) for c in [kept, *moved]}
    merged = await ok(admin, "POST", f"/v1/members/{survivor['id']}/merge", None,
                      {"duplicate_id": duplicate["id"]})  # fmt: skip
    assert [c["id"] for c in merged["cards"]] == [kept["id"], *(c["id"] for c in moved)]
    assert {c["account_id"]: await balance(admin, c["account_id"]) for c in [kept, *moved]} == (
        balances
    )
    gone = await ok(admin, "GET", f"/v1/members/{duplicate['id']}")
    assert (gone["state"], gone["merged_into"], gone["mobile"]) == ("merged", survivor["id"], None)
    assert gone["cards"] == []
    # the number is free again, and a merged member cannot be merged or changed
    assert (await register(admin, "13800000002"))["mobile"] == "+8613800000002"
    merge = f"/v1/members/{survivor['id']}/merge"
    again = {"duplicate_id": duplicate["id"]}
    assert await refused(admin, "POST", merge, None, again) == (409, "member_not_active")
    assert await refused(admin, "PATCH", f"/v1/members/{duplicate['id']}", None,
                         {"name": "x"}) == (409, "member_not_active")  # fmt: skip
    itself = {"duplicate_id": survivor["id"]}
    assert await refused(admin, "POST", merge, None, itself) == (400, "merge_same_member")
    nobody = {"duplicate_id": 999_999}
    assert await refused(admin, "POST", merge, None, nobody) == (404, "member_not_found")
    audit = {a["action"]: a for a in (await snapshot(db_url))["org_audit_log"]}
    assert json.loads(audit["member.merged"]["after"])["merged_into"] == survivor["id"]
    assert json.loads(audit["member.merge"]["after"])["card_ids"] == [
        kept["id"], *(c["id"] for c in moved)
    ]  # fmt: skip
    assert audit["member.merged"]["store"] == "S2"
    assert audit["member.merge"]["store"] == "S1"


# --- delete -----------------------------------------------------------------------------------


async def test_deleting_a_member_with_value_on_a_card_is_refused_and_changes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    posted = await register(admin, "13800000001", id_type="resident_id", id_number=RESIDENT)
    held = await register(admin, "13800000002")
    await card(admin, posted["id"], state="replaced", fund=300)  # its successor has the account
    valued = await card(admin, posted["id"], fund=1)
    await card(admin, held["id"], pending=500, state="frozen")
    before = await snapshot(db_url)
    for member in (posted, held):
        assert await refused(admin, "DELETE", f"/v1/members/{member['id']}") == (
            409, "member_has_value",
        )  # fmt: skip
    assert await snapshot(db_url) == before
    # once the card with value is closed and its value refunded, the member can go (closed
    # with its value still on it, the delete is refused as for a live card)
    async with Records(admin.app[POS_KEY].ledger.store.engine).begin() as uow:
        await uow.update("cards", {"id": valued["id"]}, {"state": "closed"})
    assert await refused(admin, "DELETE", f"/v1/members/{posted['id']}") == (
        409, "member_has_value",
    )  # fmt: skip
    ledger: Ledger = admin.app[POS_KEY].ledger
    [float_] = await ledger.submit([CreateAccount(CURRENCY, "LE1", "entity", "LE1", "test_float")])
    assert float_.account_id is not None
    [refund] = await ledger.submit(
        [move("refund-valued", valued["account_id"], float_.account_id, 1)]
    )
    assert refund.ok
    await ok(admin, "POST", f"/v1/members/{posted['id']}/consents", None,
             {"purpose": "alerts", "granted": True, "source": "counter"})  # fmt: skip
    deleted = await ok(admin, "DELETE", f"/v1/members/{posted['id']}")
    assert deleted["state"] == "deleted"
    erased = {k: deleted[k] for k in ("mobile", "name", "birthday", "email", "id_type",
                                      "id_masked", "sms_alerts", "gender")}  # fmt: skip
    assert erased == {"mobile": None, "name": "", "birthday": "", "email": "", "id_type": "",
                      "id_masked": "", "sms_alerts": False, "gender": ""}  # fmt: skip
    [row] = await sql_rows(db_url, "SELECT * FROM members WHERE id = :id", id=posted["id"])
    assert (row["id_hash"], row["id_sealed"]) == (None, "")
    found = await ok(admin, "POST", "/v1/members/lookup", None,
                     {"id_type": "resident_id", "id_number": RESIDENT})  # fmt: skip
    assert found["items"] == []
    history = await ok(admin, "GET", f"/v1/members/{posted['id']}/consents")
    assert [(c["granted"], c["source"]) for c in history["items"]] == [
        (True, "counter"), (False, "erasure"),
    ]  # fmt: skip
    assert await ok(admin, "DELETE", f"/v1/members/{posted['id']}") == deleted  # once is enough
    actions = [a["action"] for a in (await snapshot(db_url))["org_audit_log"]]
    assert actions.count("member.delete") == 1


async def test_deleting_a_member_closes_its_cards_and_no_value_reaches_them_after(
    admin: AdminClient,
) -> None:
    await cards_api.world(admin)
    tid = await cards_api.terminal(admin, "S1")
    first = await cards_api.issue(admin, "ORD")
    member_id = first["member_id"]
    frozen = await cards_api.issue(admin, "ORD", member_id=member_id)
    await ok(admin, "POST", f"/v1/cards/{frozen['id']}/freeze")
    deleted = await ok(admin, "DELETE", f"/v1/members/{member_id}")
    assert [(c["id"], c["state"]) for c in deleted["cards"]] == [
        (first["id"], "closed"), (frozen["id"], "closed"),
    ]  # fmt: skip
    for c in (first, frozen):
        status, answer = await cards_api.topup(admin, c["id"], 50_000)
        assert (status, answer["error"]["code"]) == (409, "card_state")
        for kind in (Kind.TOPUP, Kind.PURCHASE):
            result = await cards_api.pos(admin, kind, tid, c["pan"], 1_000)
            assert result.outcome is Outcome.CARD_CLOSED, kind
        assert (await cards_api.card(admin, c["id"]))["balances"]["available"] == 0
    closes = (await ok(admin, "GET", "/v1/audit", action="card.close"))["items"]
    assert sorted((a["object_id"], a["before"]["state"], a["after"]["state"]) for a in closes) == [
        (str(first["id"]), "active", "closed"), (str(frozen["id"]), "frozen", "closed"),
    ]  # fmt: skip
    [erased] = (await ok(admin, "GET", "/v1/audit", action="member.delete"))["items"]
    assert erased["after"]["closed_card_ids"] == [first["id"], frozen["id"]]
    named = {"class_code": "ORD", "store": "S1", "member_id": member_id}
    status, answer = await call(admin, "POST", "/v1/cards", None, named)
    assert (status, answer["error"]["code"]) == (409, "member_not_active")


async def test_a_store_officer_cannot_delete_a_member_with_a_card_of_another_store(
    admin: AdminClient, db_url: str
) -> None:
    await cards_api.world(admin)
    member_id = await cards_api.member(admin, "S1")
    await cards_api.issue(admin, "ORD", "S2", member_id=member_id)  # HQ issued it at S2
    officer = await admin.token("store_crm", "store", "S1")
    before = await snapshot(db_url)
    status, code = await refused(admin, "DELETE", f"/v1/members/{member_id}", officer)
    assert (status, code) == (403, "scope_forbidden")
    assert await snapshot(db_url) == before


async def test_a_store_officer_cannot_merge_a_duplicate_with_a_card_of_another_store(
    admin: AdminClient, db_url: str
) -> None:
    """Both members are the officer's, but the duplicate's card is S2's: a merge would move
    it, so it is refused as a delete is, and nothing changes; HQ may merge them."""
    await cards_api.world(admin)
    survivor, duplicate = await cards_api.member(admin, "S1"), await cards_api.member(admin, "S1")
    elsewhere = await cards_api.issue(admin, "ORD", "S2", member_id=duplicate)
    officer = await admin.token("store_crm", "store", "S1")
    before = await snapshot(db_url)
    status, code = await refused(
        admin, "POST", f"/v1/members/{survivor}/merge", officer, {"duplicate_id": duplicate}
    )
    assert (status, code) == (403, "scope_forbidden")
    assert await snapshot(db_url) == before
    await admin.ok("POST", f"/v1/members/{survivor}/merge", json={"duplicate_id": duplicate})
    assert (await cards_api.card(admin, elsewhere["id"]))["member_id"] == survivor


async def test_a_counter_topup_racing_a_member_delete_never_lands_on_its_closed_card(
    admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await cards_api.world(admin)
    issued = await cards_api.issue(admin, "ORD")
    service = admin.app[MEMBERS_KEY]
    checked = service._refuse_value
    racing: list[asyncio.Task[tuple[int, Any]]] = []

    async def check_then_topup(row: dict[str, Any]) -> None:
        await checked(row)  # no value yet: the delete may go on ...
        racing.append(asyncio.create_task(cards_api.topup(admin, issued["id"], 30_000)))
        await asyncio.wait(racing, timeout=1.0)  # ... while a top-up of the card comes in

    monkeypatch.setattr(service, "_refuse_value", check_then_topup)
    deleted = await ok(admin, "DELETE", f"/v1/members/{issued['member_id']}")
    status, answer = await racing[0]
    assert (deleted["state"], deleted["cards"][0]["state"]) == ("deleted", "closed")
    assert (status, answer["error"]["code"]) == (409, "card_state")
    assert (await cards_api.card(admin, issued["id"]))["balances"]["available"] == 0


async def test_a_card_issued_while_its_member_is_deleted_is_refused(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await cards_api.world(admin)
    member_id = await cards_api.member(admin)
    service = admin.app[CARDS_KEY]
    checked = service._check_member

    async def check_then_delete(*args: Any) -> None:
        await checked(*args)  # the member is active ...
        await ok(admin, "DELETE", f"/v1/members/{member_id}")  # ... and is deleted now

    monkeypatch.setattr(service, "_check_member", check_then_delete)
    named = {"class_code": "ORD", "store": "S1", "member_id": member_id}
    status, answer = await call(admin, "POST", "/v1/cards", None, named)
    assert (status, answer["error"]["code"]) == (409, "member_not_active")
    assert await sql_rows(db_url, "SELECT id FROM cards") == []


# --- secrets and availability -------------------------------------------------------------------


async def test_a_member_moved_to_another_entity_is_audited_where_it_was_and_where_it_is(
    admin: AdminClient,
) -> None:
    """The entity that lost the member reads that it did: the change is audited at both
    places (each side's auditor sees it), once at each."""
    await admin.org("LE1", "S1")
    await admin.org("LE2", "S3")
    moved = await admin.ok("POST", "/v1/members", json={"mobile": "13800138000", "name": "A",
                                                      "home_store": "S1"})  # fmt: skip
    await admin.ok("PATCH", f"/v1/members/{moved['id']}", json={"home_store": "S3"})
    for entity in ("LE1", "LE2"):
        auditor = await admin.token("auditor", "entity", entity)
        rows = await admin.ok("GET", "/v1/audit", auditor, object_kind="member")
        updates = [r for r in rows["items"] if r["action"] == "member.update"]
        assert len(updates) == 1, (entity, rows)
    stay = await admin.ok("POST", "/v1/members", json={"mobile": "13800138001", "name": "B",
                                                     "home_store": "S1"})  # fmt: skip
    await admin.ok("PATCH", f"/v1/members/{stay['id']}", json={"name": "Bo"})
    rows = await admin.ok("GET", "/v1/audit", object_kind="member", object_id=str(stay["id"]))
    assert [r["action"] for r in rows["items"]].count("member.update") == 1


async def test_the_id_number_is_in_no_answer_and_no_audit_row(
    admin: AdminClient, db_url: str
) -> None:
    ANSWERS.clear()
    tokens = await world(admin)
    member = await register(admin, "13800000001", id_type="resident_id", id_number=RESIDENT)
    other = await register(admin, "13800000002", id_type="resident_id", id_number=RESIDENT_2)
    path = f"/v1/members/{member['id']}"
    await ok(admin, "GET", path)
    await ok(admin, "GET", "/v1/members")
    await ok(admin, "POST", "/v1/members/lookup", tokens["s1"],
             {"id_type": "resident_id", "id_number": RESIDENT})  # fmt: skip
    await ok(admin, "PATCH", path, None, {"id_type": "resident_id", "id_number": RESIDENT_2,
                                          "name": "New"})  # fmt: skip
    await ok(admin, "PATCH", path, None, {"id_type": "resident_id", "id_number": RESIDENT})
    await ok(admin, "POST", f"{path}/merge", None, {"duplicate_id": other["id"]})
    await ok(admin, "DELETE", path)
    await ok(admin, "GET", "/v1/audit")
    rows = await snapshot(db_url)
    texts = [*ANSWERS, json.dumps(rows["org_audit_log"]), json.dumps(rows["member_consents"])]
    texts += [json.dumps({k: v for k, v in m.items() if k != "id_sealed"}) for m in rows["members"]]
    for number in (RESIDENT, RESIDENT_2, RESIDENT_2[:17]):
        assert not [t for t in texts if number in t.upper()], number
    assert any(MASKED in t for t in ANSWERS)  # the mask is what shows


async def test_member_routes_answer_503_without_a_key_encrypting_key(db_url: str) -> None:
    metrics = Metrics()
    app = build_app(Config(db_url=db_url), metrics, Ledger.open(db_url, metrics))
    async with TestClient(await quiet_server(app)) as client:
        minted = await app[ORG_KEY].bootstrap_admin("root", 3600)
        headers = {"Authorization": f"Bearer {minted['token']}"}
        for method, path in (("GET", "/v1/members"), ("POST", "/v1/members"),
                             ("GET", "/v1/members/1")):  # fmt: skip
            response = await client.request(method, path, headers=headers, json={})
            body = await response.json()
            assert (response.status, body["error"]["code"]) == (503, "kek_missing")
            check_answer(method, path, response.status, body)
        response = await client.get("/v1/members")
        assert response.status == 401  # the token is checked first


async def test_an_id_number_changed_behind_the_same_mask_is_named_in_the_audit(
    admin: AdminClient, db_url: str
) -> None:
    """`changed` exists because two masks may look alike: a passport E1234567 replaced by
    E9999967 (both E*****67) was audited with `changed: []` (a reviewer's finding)."""
    await world(admin)
    m = await register(admin, "13800000001", id_type="passport", id_number="E1234567")
    out = await ok(admin, "PATCH", f"/v1/members/{m['id']}", None,
                   {"id_type": "passport", "id_number": "E9999967"})  # fmt: skip
    assert out["id_masked"] == m["id_masked"]
    [row] = await sql_rows(db_url, "SELECT after FROM org_audit_log WHERE action = 'member.update'")
    assert "id_masked" in json.loads(row["after"])["changed"]


async def test_a_member_is_not_deleted_by_an_officer_whose_scope_misses_a_closed_card(
    admin: AdminClient, db_url: str
) -> None:
    """All of the member's cards must be in the caller's scope: the check skipped closed
    and replaced cards, and a store officer erased a member with a card of another store
    (a reviewer's finding)."""
    tokens = await world(admin)
    m = await register(admin, "13800000001")
    c = await card(admin, m["id"], state="closed")
    await sql_execute(db_url, f"UPDATE cards SET store = 'S2' WHERE id = {int(c['id'])}")  # noqa: S608 - the test's own id
    before = await snapshot(db_url)
    got = await refused(admin, "DELETE", f"/v1/members/{m['id']}", tokens["s1"])
    assert got == (403, "scope_forbidden")
    assert await snapshot(db_url) == before


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("birthday", "2023-13-01", "invalid_birthday"),
        ("birthday", "1990/01/01", "invalid_birthday"),
        ("birthday", "19900101", "invalid_birthday"),
        ("mobile", "1" * 40, "invalid_mobile"),
        ("name", "   ", "invalid_value"),
    ],
)
async def test_each_bad_member_field_gets_its_documented_code(
    admin: AdminClient, field: str, value: str, code: str
) -> None:
    """Refused by the schema, some bad birthdays and long mobiles got `invalid_value` where
    the docs promise `invalid_birthday` and `invalid_mobile`; a name of spaces was taken."""
    await world(admin)
    body = new_member("13800000001", **{field: value}) if field != "mobile" else new_member(value)
    assert await refused(admin, "POST", "/v1/members", None, body) == (400, code)


@pytest.mark.parametrize("path", ["/v1/members/0", "/v1/members/abc", "/v1/members/" + "9" * 20])
async def test_a_member_id_that_cannot_be_is_member_not_found(
    admin: AdminClient, path: str
) -> None:
    await world(admin)
    assert await refused(admin, "GET", path) == (404, "member_not_found")
