"""Manager special-discount cards over the admin API and the POS host of the same app (SQLite
and PostgreSQL): issuing (the number once, never in the audit), scope, the PIN and its
lockout, the percent and daily total, the record of every use, resends, reversals, and the
daily total under concurrent terminals."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from cardcore.cards.http import POS_KEY
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult, luhn_ok
from cardcore.frontend_gateway import security
from cardcore.vault import Vault
from tests import logscan
from tests.conftest import ADMIN_KEK
from tests.helpers import AdminClient, sql_execute, sql_rows

_stans = itertools.count(1)
_tids = itertools.count(1)
CARDS = "/v1/manager-cards"
PIN = "860412"
STAFF_NOT_ELIGIBLE = "manager_staff_not_eligible"


async def world(admin: AdminClient) -> dict[str, Any]:
    """LE1 with S1 and S2; a supervisor user of S1 (the manager) and one of S2; a customer
    card of S1; terminals in S1."""
    await admin.org("LE1", "S1", "S2")
    supervisor = {"role": "store_supervisor", "scope_kind": "store"}
    manager = await admin.ok("POST", "/v1/users", json={"name": "mgr1", **supervisor,
                             "scope_id": "S1"})  # fmt: skip
    other = await admin.ok("POST", "/v1/users", json={"name": "mgr2", **supervisor,
                           "scope_id": "S2"})  # fmt: skip
    await admin.ok("POST", "/v1/card-classes", json={"code": "BEAR", "name": "Bearer",
                   "named": False})  # fmt: skip
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "stored_value"})
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "manager"})
    customer = await admin.ok("POST", "/v1/cards", json={"class_code": "BEAR", "store": "S1"})
    return {"manager": manager["id"], "other": other["id"], "customer": customer["pan"],
            "t1": await terminal(admin, "S1"), "t2": await terminal(admin, "S1")}  # fmt: skip


async def terminal(admin: AdminClient, store: str) -> str:
    n = next(_tids)
    tid, mid = f"M{n:07d}", f"K{n:014d}"
    answer = await admin.ok("POST", "/v1/terminals", json={"tid": tid, "mid": mid, "store": store})
    logscan.SCAN.remember("a terminal master key", answer["tmk"])
    return tid


async def issue(admin: AdminClient, user_id: int, token: str | None = None,
                **extra: Any) -> tuple[int, Any]:  # fmt: skip
    body = {"staff_user_id": user_id, "store": "S1", "max_percent_bp": 1_000,
            "daily_total_fen": 1_000, "reasons": ["damaged", "vip"], **extra}  # fmt: skip
    return await admin.call("POST", CARDS, token, body)


def block(pin: str, pan: str) -> str:
    value = security.pin_block_4(pin, pan, security.zone_pin_key(ADMIN_KEK)).hex().upper()
    logscan.SCAN.remember("a test PIN block", value)
    return value


def ask(tid: str, pan: str, pin: str | None = PIN, *, bill: int = 10_000, discount: int = 500,
        reason: str = "damaged", stan: str | None = None) -> PosRequest:  # fmt: skip
    return PosRequest(
        kind=Kind.MANAGER_AUTH, terminal=tid, batch="000001",
        stan=stan or f"{next(_stans):06d}", card=pan,
        pin_block="" if pin is None else block(pin, pan), amount=bill, discount=discount,
        reason=reason,
    )  # fmt: skip


async def pos(admin: AdminClient, request: PosRequest) -> PosResult:
    [answer] = await admin.app[POS_KEY].handle([request])
    return answer


async def reverse(admin: AdminClient, original: PosRequest) -> PosResult:
    return await pos(admin, PosRequest(kind=Kind.REVERSE, terminal=original.terminal,
                                       batch=original.batch, stan=original.stan))  # fmt: skip


async def counts(db_url: str) -> dict[str, int]:
    out = {}
    for table in ("manager_cards", "manager_authorizations", "org_audit_log"):
        rows = await sql_rows(db_url, f"SELECT count(*) AS n FROM {table}")  # noqa: S608
        out[table] = int(rows[0]["n"])
    return out


async def ready_card(admin: AdminClient, user_id: int, **extra: Any) -> dict[str, Any]:
    status, card = await issue(admin, user_id, **extra)
    assert status == 201, card
    await admin.ok("POST", f"{CARDS}/{card['id']}/pin", json={"pin": PIN})
    return dict(card)


# --- issuing -------------------------------------------------------------------------------------


async def test_a_card_is_issued_with_its_number_once_and_refusals_change_nothing(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    status, card = await issue(admin, w["manager"])
    assert status == 201, card
    pan = card["pan"]
    assert len(pan) == 19 and pan.startswith("628888") and luhn_ok(pan)
    assert card["pan_masked"] == pan[:6] + "*" * 9 + pan[-4:]
    assert (card["store"], card["legal_entity"], card["has_pin"], card["state"]) == (
        "S1", "LE1", False, "active")  # fmt: skip
    read: dict[str, Any] = await admin.ok("GET", f"{CARDS}/{card['id']}")
    assert "pan" not in read and read == {k: v for k, v in card.items() if k != "pan"}
    rows = await sql_rows(db_url, "SELECT * FROM manager_cards")
    assert pan not in repr(rows)
    audit = await admin.ok("GET", "/v1/audit", object_kind="manager_card")
    assert audit["items"] and pan not in repr(audit)

    s1 = await admin.token("store_supervisor", "store", "S1")
    s2 = await admin.token("store_supervisor", "store", "S2")
    crm = await admin.token("store_crm", "store", "S1")
    auditor = await admin.ok("POST", "/v1/users", json={"name": "aud", "role": "auditor",
                             "scope_kind": "group", "scope_id": ""})  # fmt: skip
    before = await counts(db_url)
    cases: list[tuple[str | None, int, dict[str, Any], int, str]] = [
        (s2, w["manager"], {}, 403, "scope_forbidden"),
        (crm, w["manager"], {}, 403, "role_forbidden"),
        (None, w["other"], {}, 409, "manager_user_not_eligible"),  # S2's supervisor
        (None, auditor["id"], {}, 409, "manager_user_not_eligible"),
        (None, 99_999, {}, 404, "user_not_found"),
        (None, w["manager"], {"max_percent_bp": 0}, 400, "invalid_value"),
        (None, w["manager"], {"max_percent_bp": 10_001}, 400, "invalid_value"),
        (None, w["manager"], {"reasons": ["VIP"]}, 400, "invalid_value"),
        (None, w["manager"], {"reasons": []}, 400, "invalid_value"),
        (None, w["manager"], {"store": "S9"}, 404, "store_not_found"),
    ]
    for token, user, extra, status, code in cases:
        got, answer = await issue(admin, user, token, **extra)
        assert (got, answer["error"]["code"]) == (status, code), (user, extra, answer)
    assert await counts(db_url) == before
    # One active card a manager: the daily total is the manager's, never one per card.
    status, answer = await issue(admin, w["manager"], s1)
    assert (status, answer["error"]["code"]) == (409, "manager_user_has_card")
    assert await counts(db_url) == before
    await admin.ok("PATCH", f"{CARDS}/{card['id']}", json={"state": "disabled"})
    status, mine = await issue(admin, w["manager"], s1)
    assert status == 201, mine
    status, answer = await admin.call("PATCH", f"{CARDS}/{card['id']}", json={"state": "active"})
    assert (status, answer["error"]["code"]) == (409, "manager_user_has_card")
    listed = await admin.ok("GET", CARDS, s1)
    assert [c["id"] for c in listed["items"]] == [card["id"], mine["id"]]
    assert (await admin.ok("GET", CARDS, s2))["items"] == []
    status, answer = await admin.call("GET", f"{CARDS}/{card['id']}", s2)
    assert (status, answer["error"]["code"]) == (403, "scope_forbidden")


async def test_a_manager_card_needs_hqs_grant_and_another_issuer_than_its_holder(
    admin: AdminClient, db_url: str
) -> None:
    """HQ grants a store the manager function (with a count budget): without it, or past
    it, a card is refused and nothing changes; nobody issues a card to themselves (the one
    who uses it never sets its own limits)."""
    w = await world(admin)
    own = await admin.ok("POST", f"/v1/users/{w['manager']}/tokens", json={"label": "own"})
    before = await counts(db_url)
    got, answer = await issue(admin, w["other"], store="S2")  # S2 holds no manager grant
    assert (got, answer["error"]["code"]) == (403, "not_granted")
    got, answer = await issue(admin, w["manager"], own["token"])
    assert (got, answer["error"]["code"], answer["error"]["field"]) == (
        403, "manager_self_issue", "staff_user_id")  # fmt: skip
    assert await counts(db_url) == before
    await admin.ok("POST", "/v1/grants", json={"store": "S2", "function": "manager",
                                             "budget_count": 1})  # fmt: skip
    got, _ = await issue(admin, w["other"], store="S2")
    assert got == 201
    third = await admin.ok(
        "POST",
        "/v1/users",
        json={"name": "mgr3", "role": "store_supervisor", "scope_kind": "store", "scope_id": "S2"},
    )
    got, answer = await issue(admin, third["id"], store="S2")
    assert (got, answer["error"]["code"]) == (403, "grant_budget_exceeded")


# --- the POS -------------------------------------------------------------------------------------


async def test_a_manager_authorizes_within_the_percent_and_the_daily_total_each_use_recorded(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    card = await ready_card(admin, w["manager"])
    pan = card["pan"]
    first = ask(w["t1"], pan, discount=600)
    approved = await pos(admin, first)
    assert (approved.outcome, approved.discount) == (Outcome.APPROVED, 600)
    resent = await pos(admin, first)
    assert (resent.outcome, resent.discount, resent.replayed) == (Outcome.APPROVED, 600, True)
    cases = [
        (ask(w["t1"], pan, discount=1_001), Outcome.OVER_LIMIT, "manager_over_percent"),
        (ask(w["t1"], pan, discount=500), Outcome.OVER_LIMIT, "manager_over_daily"),
        (ask(w["t1"], pan, reason="friend"), Outcome.NOT_PERMITTED, "manager_reason_unknown"),
        (ask(w["t1"], pan, discount=0), Outcome.BAD_REQUEST, "manager_bad_amount"),
        (ask(w["t1"], w["customer"]), Outcome.NOT_PERMITTED, "manager_not_manager"),
        (ask(w["t1"], pan, None), Outcome.PIN_REQUIRED, "pin_required"),
    ]
    for request, outcome, refusal in cases:
        answer = await pos(admin, request)
        assert (answer.outcome, answer.refusal) == (outcome, refusal), request.discount
    assert (await pos(admin, ask(w["t2"], pan, discount=400))).outcome is Outcome.APPROVED
    # A reversal frees its discount from the day's total, once.
    assert (await reverse(admin, first)).outcome is Outcome.APPROVED
    await reverse(admin, first)
    assert (await pos(admin, first)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await pos(admin, ask(w["t1"], pan, discount=600))).outcome is Outcome.APPROVED
    assert (await pos(admin, ask(w["t1"], pan, discount=1))).refusal == "manager_over_daily"

    auditor = await admin.token("auditor", "group")
    uses = await admin.ok("GET", f"{CARDS}/{card['id']}/authorizations", auditor)
    mine = [u for u in uses["items"] if u["card_id"] == card["id"]]
    expected = ["approved", "manager_over_percent", "manager_over_daily",
                "manager_reason_unknown", "manager_bad_amount", "pin_required", "approved",
                "approved", "manager_over_daily"]  # fmt: skip
    assert sorted(u["outcome"] for u in mine) == sorted(expected)
    assert sum(u["discount_fen"] for u in mine if u["outcome"] == "approved"
               and not u["reversed"]) == 1_000  # fmt: skip
    [stranger] = await sql_rows(db_url, "SELECT * FROM manager_authorizations WHERE card = 0")
    assert stranger["outcome"] == "manager_not_manager"
    supervisor = await admin.token("store_supervisor", "store", "S1")
    status, answer = await admin.call("GET", f"{CARDS}/{card['id']}/authorizations", supervisor)
    assert (status, answer["error"]["code"]) == (403, "role_forbidden")


async def test_wrong_pins_lock_the_card_a_new_pin_unlocks_it_and_a_disabled_card_refuses(
    admin: AdminClient,
) -> None:
    w = await world(admin)
    card = await ready_card(admin, w["manager"])
    pan, path = card["pan"], f"{CARDS}/{card['id']}"
    outcomes = [(await pos(admin, ask(w["t1"], pan, "111111"))).outcome for _ in range(3)]
    assert outcomes == [Outcome.PIN_WRONG, Outcome.PIN_WRONG, Outcome.PIN_LOCKED]
    assert (await pos(admin, ask(w["t1"], pan))).outcome is Outcome.PIN_LOCKED  # right PIN too
    assert (await admin.ok("GET", path))["pin_failures"] == 3
    await admin.ok("POST", f"{path}/pin", json={"pin": PIN})
    assert (await pos(admin, ask(w["t1"], pan))).outcome is Outcome.APPROVED
    disabled = await admin.ok("PATCH", path, json={"state": "disabled"})
    assert disabled["state"] == "disabled"
    answer = await pos(admin, ask(w["t1"], pan))
    assert (answer.outcome, answer.refusal) == (Outcome.NOT_PERMITTED, "manager_not_active")
    await admin.ok("PATCH", path, json={"state": "active", "daily_total_fen": 5_000})
    assert (await pos(admin, ask(w["t1"], pan, discount=1_000))).outcome is Outcome.APPROVED


async def test_a_cards_holder_never_changes_its_limits_nor_unlocks_its_own_pin(
    admin: AdminClient, db_url: str
) -> None:
    """Separation of duties past the issue: the holder's own token may not raise its
    percent or daily total (nor change its state), and may set its own PIN while the card
    is not locked, but once wrong PINs locked it another officer unlocks it; nothing
    changes on a refusal."""
    w = await world(admin)
    card = await ready_card(admin, w["manager"])
    pan, path = card["pan"], f"{CARDS}/{card['id']}"
    own = (await admin.ok("POST", f"/v1/users/{w['manager']}/tokens", json={"label": "own"}))[
        "token"
    ]
    before = await counts(db_url)
    for change in ({"max_percent_bp": 10_000}, {"daily_total_fen": 100_000_000},
                   {"state": "disabled"}):  # fmt: skip
        got, answer = await admin.call("PATCH", path, own, change)
        assert (got, answer["error"]["code"]) == (403, "manager_self_change"), change
    assert await counts(db_url) == before
    assert (await pos(admin, ask(w["t1"], pan, bill=10_000, discount=9_000))).outcome is not (
        Outcome.APPROVED
    )
    await admin.ok("POST", f"{path}/pin", own, json={"pin": "482913"})  # its own PIN: fine
    for _ in range(3):
        await pos(admin, ask(w["t1"], pan, "111111"))
    assert (await admin.ok("GET", path))["pin_failures"] == 3
    got, answer = await admin.call("POST", f"{path}/pin", own, {"pin": "482914"})
    assert (got, answer["error"]["code"]) == (403, "manager_self_unlock")
    assert (await admin.ok("GET", path))["pin_failures"] == 3
    await admin.ok("POST", f"{path}/pin", json={"pin": PIN})  # another officer unlocks it
    assert (await pos(admin, ask(w["t1"], pan))).outcome is Outcome.APPROVED


async def test_concurrent_terminals_never_exceed_the_daily_total(admin: AdminClient) -> None:
    w = await world(admin)
    card = await ready_card(admin, w["manager"])
    tids = [w["t1"], w["t2"], *[await terminal(admin, "S1") for _ in range(4)]]
    answers = await asyncio.gather(*(pos(admin, ask(t, card["pan"], discount=300)) for t in tids))
    approved = [a for a in answers if a.outcome is Outcome.APPROVED]
    assert len(approved) == 3  # 3 x 300 <= 1,000 < 4 x 300
    assert {a.refusal for a in answers if a.outcome is not Outcome.APPROVED} == {
        "manager_over_daily"}  # fmt: skip


async def test_an_authorization_reversed_before_it_arrives_authorizes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    w = await world(admin)
    card = await ready_card(admin, w["manager"])
    late = ask(w["t1"], card["pan"], discount=900)
    assert (await reverse(admin, late)).outcome is Outcome.APPROVED  # the tombstone
    assert (await pos(admin, late)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    [stone] = await sql_rows(db_url, "SELECT * FROM manager_authorizations")  # the reversal's
    assert (stone["card"], stone["outcome"], stone["reversed"]) == (
        0, "reversed_before_arrival", True)  # fmt: skip
    assert (await pos(admin, ask(w["t1"], card["pan"], discount=900))).outcome is (
        Outcome.APPROVED)  # fmt: skip


async def test_a_manager_card_authorizes_only_in_its_own_store(admin: AdminClient) -> None:
    """Issued for S1, presented at a terminal of S2: refused, its PIN not even looked at
    (a wrong one is not counted), the use recorded (review finding)."""
    w = await world(admin)
    card = await ready_card(admin, w["manager"])
    elsewhere = await terminal(admin, "S2")
    for pin in (PIN, "000000"):
        answer = await pos(admin, ask(elsewhere, card["pan"], pin))
        assert (answer.outcome, answer.refusal) == (Outcome.NOT_PERMITTED, "manager_wrong_store")
    assert (await pos(admin, ask(w["t1"], card["pan"]))).outcome is Outcome.APPROVED
    uses = await admin.ok("GET", f"{CARDS}/{card['id']}/authorizations")
    assert sorted(u["outcome"] for u in uses["items"]) == [
        "approved", "manager_wrong_store", "manager_wrong_store"]  # fmt: skip


async def test_a_card_authorizes_nothing_once_its_staff_user_is_disabled_or_not_eligible(
    admin: AdminClient, db_url: str
) -> None:
    """The staff user is checked at every use, not only at issue (audit finding, issue 5):
    disabled, gone, or of a role or scope that may no longer hold the card, the card refuses
    57 before its PIN is looked at (a wrong one is not counted); each use is recorded."""
    w = await world(admin)
    card = await ready_card(admin, w["manager"])
    pan, user = card["pan"], f"/v1/users/{w['manager']}"
    assert (await pos(admin, ask(w["t1"], pan, discount=100))).outcome is Outcome.APPROVED
    await admin.ok("PATCH", user, json={"state": "disabled"})
    for pin in (PIN, "000000"):
        answer = await pos(admin, ask(w["t1"], pan, pin, discount=100))
        assert (answer.outcome, answer.refusal) == (Outcome.NOT_PERMITTED,
                                                    "manager_staff_disabled")  # fmt: skip
    assert (await admin.ok("GET", f"{CARDS}/{card['id']}"))["pin_failures"] == 0
    await admin.ok("PATCH", user, json={"state": "active"})
    assert (await pos(admin, ask(w["t1"], pan, discount=100))).outcome is Outcome.APPROVED
    # No route changes a user's role or scope; the check holds should the row change.
    changes = [
        ("UPDATE org_staff_users SET role = 'auditor'", STAFF_NOT_ELIGIBLE),
        ("UPDATE org_staff_users SET role = 'store_supervisor', scope_id = 'S2'",
         STAFF_NOT_ELIGIBLE),
        ("DELETE FROM org_staff_users", "manager_staff_disabled"),
    ]  # fmt: skip
    for change, refusal in changes:
        await sql_execute(db_url, f"{change} WHERE id = {int(w['manager'])}")
        answer = await pos(admin, ask(w["t1"], pan, discount=100))
        assert (answer.outcome, answer.refusal) == (Outcome.NOT_PERMITTED, refusal), change
    uses = await admin.ok("GET", f"{CARDS}/{card['id']}/authorizations")
    expected = ["approved"] * 2 + ["manager_staff_disabled"] * 3 + [STAFF_NOT_ELIGIBLE] * 2
    assert sorted(u["outcome"] for u in uses["items"]) == sorted(expected)


async def test_a_manager_cards_number_is_never_a_customer_cards(admin: AdminClient) -> None:
    """A number is unique among customer and manager cards, whichever is issued second: the
    customer side's check of a number sees the manager cards too."""
    w = await world(admin)
    status, card = await issue(admin, w["manager"])
    assert status == 201
    pos = admin.app[POS_KEY]
    token = Vault(ADMIN_KEK).card_token(card["pan"])
    assert await pos.directory.existing_tokens([token]) == {token}


async def test_issues_at_the_same_moment_leave_one_active_card_per_staff_user(
    admin: AdminClient, db_url: str
) -> None:
    """Two issues for one staff user at once both read "no active card" on PostgreSQL and
    both cards became active (a reviewer's finding: 2 to 4 of 4): the day's total is the
    manager's, so one card at a time. Re-enabling disabled cards at once the same."""
    w = await world(admin)
    results = await asyncio.gather(*[issue(admin, w["manager"]) for _ in range(4)])
    assert sorted(status for status, _ in results) == [201, 409, 409, 409]
    assert {body["error"]["code"] for status, body in results if status == 409} == {
        "manager_user_has_card"
    }
    [made] = [body for status, body in results if status == 201]
    await admin.ok("PATCH", f"{CARDS}/{made['id']}", json={"state": "disabled"})
    ids = [made["id"]]
    for _ in range(2):
        status, card = await issue(admin, w["manager"])
        assert status == 201
        await admin.ok("PATCH", f"{CARDS}/{card['id']}", json={"state": "disabled"})
        ids.append(card["id"])
    answers = await asyncio.gather(
        *[admin.call("PATCH", f"{CARDS}/{i}", None, {"state": "active"}) for i in ids]
    )
    assert sorted(status for status, _ in answers) == [200, 409, 409]
    rows = await sql_rows(db_url, "SELECT id FROM manager_cards WHERE state = 'active'")
    assert len(rows) == 1


async def test_the_days_total_is_the_managers_whichever_card_took_it(admin: AdminClient) -> None:
    """The day's total was summed per card: a card disabled and another issued to the same
    manager the same day started the day again (a reviewer's finding). It is the manager's."""
    w = await world(admin)
    first = await ready_card(admin, w["manager"])  # 10 % a bill, 10.00 a day
    used = await pos(admin, ask(w["t1"], first["pan"], discount=800))
    assert used.outcome is Outcome.APPROVED
    await admin.ok("PATCH", f"{CARDS}/{first['id']}", json={"state": "disabled"})
    second = await ready_card(admin, w["manager"])
    over = await pos(admin, ask(w["t1"], second["pan"], discount=300))
    assert (over.outcome, over.refusal) == (Outcome.OVER_LIMIT, "manager_over_daily")
    within = await pos(admin, ask(w["t1"], second["pan"], discount=200))
    assert within.outcome is Outcome.APPROVED
