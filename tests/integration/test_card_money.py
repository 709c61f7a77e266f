"""Money at the counter over the admin API (SQLite and PostgreSQL): top-ups against the class
maximum, gift sales, closing with a cash refund, fees, cross-entity clearing, and the
breakage report. Every amount is checked against the ledger's own rows."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from cardcore import limits
from cardcore.cards.admin_http import CARDS_KEY
from cardcore.cards.http import POS_KEY
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult
from cardcore.cards.service import CardsUnavailable
from cardcore.org.model import Refused
from tests.helpers import AdminClient, sql_rows
from tests.integration.test_cards_api import (
    card,
    counts,
    grant,
    issue,
    new_class,
    pos,
    terminal,
    topup,
    world,
)

YEAR_MS = 366 * 24 * 3600 * 1000


async def store_account(db_url: str, store: str, purpose: str) -> dict[str, Any]:
    rows = await sql_rows(
        db_url,
        "SELECT * FROM ledger_accounts WHERE owner_kind = 'store' AND owner_id = :s "
        "AND purpose = :p",
        s=store,
        p=purpose,
    )
    assert len(rows) == 1, rows
    return rows[0]


async def legs_by_entity(db_url: str, transfer_id: int) -> dict[str, tuple[int, int]]:
    """(debits, credits) of one transfer's journal lines, per legal entity of their accounts."""
    rows = await sql_rows(
        db_url,
        "SELECT a.legal_entity, e.side, e.posted_delta FROM ledger_entries e "
        "JOIN ledger_accounts a ON a.id = e.account_id WHERE e.transfer_id = :t",
        t=transfer_id,
    )
    out: dict[str, list[int]] = {}
    for r in rows:
        totals = out.setdefault(r["legal_entity"], [0, 0])
        totals[0 if r["side"] == "debit" else 1] += abs(int(r["posted_delta"]))
    return {e: (d, c) for e, (d, c) in out.items()}


def pay(amount: int, key: str, **extra: Any) -> dict[str, Any]:
    return {"amount": amount, "tender": "cash", "receipt": f"R-{key}", "key": key, **extra}


# --- top-ups -----------------------------------------------------------------------------------


async def test_a_counter_topup_is_idempotent_by_key_and_records_store_operator_and_receipt(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    issued = await issue(admin, "BEAR")
    path = f"/v1/cards/{issued['id']}/topups"
    status, first = await admin.call("POST", path, json=pay(5_000, "t-1"))
    assert (status, first["available"], first["replayed"]) == (201, 5_000, False)
    status, again = await admin.call("POST", path, json=pay(5_000, "t-1"))
    assert (status, again["transfer_id"], again["replayed"]) == (200, first["transfer_id"], True)
    status, answer = await admin.call("POST", path, json=pay(6_000, "t-1"))
    assert (status, answer["error"]["code"]) == (409, "idempotency_key_reused")
    assert (await card(admin, issued["id"]))["balances"]["available"] == 5_000
    [row] = await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE id = :i",
                           i=first["transfer_id"])  # fmt: skip
    assert (row["client"], row["key"], row["reason"]) == ("counter", "counter/S1/t-1",
                                                          "counter_topup")  # fmt: skip
    assert '"external_ref":"R-t-1"' in row["metadata"].replace(" ", "")
    assert '"operator":"root"' in row["metadata"].replace(" ", "")
    assert '"store":"S1"' in row["metadata"].replace(" ", "")
    by_card = {**pay(1_000, "t-2"), "tender": "bank_card"}
    status, _ = await admin.call("POST", path, json=by_card)
    assert status == 201
    assert int((await store_account(db_url, "S1", "bank_card"))["debits_posted"]) == 1_000
    assert int((await store_account(db_url, "S1", "cash"))["debits_posted"]) == 5_000


async def test_two_clerks_whose_names_begin_alike_stay_two_operators_in_the_ledger(
    admin: AdminClient,
) -> None:
    await world(admin)
    issued = await issue(admin, "BEAR")
    names = ("s1-counter-clerk-wang", "s1-counter-clerk-zhang-" + "x" * 9)  # 21 and 32 chars
    for i, name in enumerate(names):
        user = await admin.ok("POST", "/v1/users", json={"name": name, "role": "store_supervisor",
                              "scope_kind": "store", "scope_id": "S1"})  # fmt: skip
        token = (await admin.ok("POST", f"/v1/users/{user['id']}/tokens", json={}))["token"]
        status, _ = await admin.call("POST", f"/v1/cards/{issued['id']}/topups", token,
                                     pay(1_000, f"clerk-{i}"))  # fmt: skip
        assert status == 201
    lines = (await admin.ok("GET", f"/v1/cards/{issued['id']}/transactions"))["items"]
    assert sorted(line["metadata"]["operator"] for line in lines) == sorted(names)


async def grant_of(admin: AdminClient, store: str, grant_id: int) -> dict[str, Any]:
    listed = await admin.ok("GET", "/v1/grants", store=store)
    [found] = [g for g in listed["items"] if g["id"] == grant_id]
    return dict(found)


async def test_a_topup_needs_the_counter_stores_stored_value_grant_and_spends_its_budget(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1", "S2")
    await new_class(admin, "BEAR", name="Bearer", named=False)
    budget = await grant(admin, "S1", "stored_value", product="BEAR", budget_amount=30_000)
    issued = await issue(admin, "BEAR")
    path = f"/v1/cards/{issued['id']}/topups"
    status, first = await admin.call("POST", path, json=pay(20_000, "g-1"))
    assert status == 201, first
    assert (await grant_of(admin, "S1", budget["id"]))["used_amount"] == 20_000
    [audited] = (await admin.ok("GET", "/v1/audit", action="card.topup"))["items"]
    assert (audited["object_id"], audited["before"]) == (str(issued["id"]), None)
    assert audited["after"] == {
        "card_id": issued["id"], "amount": 20_000, "tender": "cash", "receipt": "R-g-1",
        "store": "S1", "transfer_id": first["transfer_id"], "grant_id": budget["id"],
    }  # fmt: skip
    status, again = await admin.call("POST", path, json=pay(20_000, "g-1"))
    assert (status, again["replayed"]) == (200, True)  # a replay spends nothing again
    assert (await grant_of(admin, "S1", budget["id"]))["used_amount"] == 20_000
    before = await counts(db_url)
    refusals = [
        (pay(20_000, "g-2"), "grant_budget_exceeded"),  # 40,000 would pass the 30,000
        (pay(1_000, "g-3", store="S2"), "not_granted"),  # S2 was granted nothing
    ]
    for body, code in refusals:
        status, answer = await admin.call("POST", path, json=body)
        assert (status, answer["error"]["code"]) == (403, code), answer
    assert await counts(db_url) == before
    status, _ = await admin.call("POST", path, json=pay(10_000, "g-4"))
    assert status == 201
    assert (await grant_of(admin, "S1", budget["id"]))["used_amount"] == 30_000
    await admin.ok("DELETE", f"/v1/grants/{budget['id']}")
    before = await counts(db_url)
    status, answer = await admin.call("POST", path, json=pay(1, "g-5"))
    assert (status, answer["error"]["code"]) == (403, "not_granted")
    assert await counts(db_url) == before
    assert (await card(admin, issued["id"]))["balances"]["available"] == 30_000


async def test_a_pos_topup_spends_its_stores_grant_and_one_past_it_is_voided_at_once(
    admin: AdminClient, db_url: str
) -> None:
    """A POS top-up sells stored value as a counter's does: its hold spends the terminal
    store's stored_value grant for the card's class; past the budget, or at a store granted
    nothing, it is declined (57, the refusal) and its hold voided at once, so nothing is
    held on the card; a resend of the approved one spends nothing again, and a resend of a
    refused one gets the same refusal."""
    await admin.org("LE1", "S1", "S2")
    await new_class(admin, "BEAR", name="Bearer", named=False)
    budget = await grant(admin, "S1", "stored_value", product="BEAR", budget_amount=30_000)
    issued = await issue(admin, "BEAR")
    at_s1, at_s2 = await terminal(admin, "S1"), await terminal(admin, "S2")
    pan, service = issued["pan"], admin.app[POS_KEY]
    sale = PosRequest(kind=Kind.TOPUP, terminal=at_s1, batch="000001", stan="000101", card=pan,
                      amount=20_000)  # fmt: skip
    for _ in range(2):  # the second: a resend
        [held] = await service.handle([sale])
        assert held.outcome is Outcome.APPROVED
        assert (await grant_of(admin, "S1", budget["id"]))["used_amount"] == 20_000
    for tid, code in ((at_s1, "grant_budget_exceeded"), (at_s2, "not_granted")):
        refused = replace(sale, terminal=tid, stan="000102")
        for _ in range(2):
            [answer] = await service.handle([refused])
            assert (answer.outcome, answer.refusal) == (Outcome.NOT_PERMITTED, code)
    assert (await grant_of(admin, "S1", budget["id"]))["used_amount"] == 20_000
    balances = (await card(admin, issued["id"]))["balances"]
    assert balances["incoming"] == 20_000, balances  # the refused holds were voided


async def _budgeted_topups(admin: AdminClient) -> tuple[int, str, str, int]:
    """A bearer class granted 50,000 fen of top-ups at S1, a card of it and a terminal:
    (grant id, terminal, card number, card id)."""
    await admin.org("LE1", "S1")
    await new_class(admin, "BEAR", name="Bearer", named=False)
    budget = await grant(admin, "S1", "stored_value", product="BEAR", budget_amount=50_000)
    issued = await issue(admin, "BEAR")
    return budget["id"], await terminal(admin, "S1"), issued["pan"], issued["id"]


def _topup(tid: str, pan: str, stan: str, amount: int = 20_000) -> PosRequest:
    return PosRequest(kind=Kind.TOPUP, terminal=tid, batch="000001", stan=stan, card=pan,
                      amount=amount)  # fmt: skip


def _confirm(tid: str, stan: str, original: str, amount: int = 20_000) -> PosRequest:
    return PosRequest(kind=Kind.TOPUP_CONFIRM, terminal=tid, batch="000001", stan=stan,
                      original_batch="000001", original_stan=original, amount=amount)  # fmt: skip


def _reversal(tid: str, stan: str) -> PosRequest:
    return PosRequest(kind=Kind.REVERSE, terminal=tid, batch="000001", stan=stan)


async def test_a_reversed_pos_topup_gives_its_grant_spend_back_once(
    admin: AdminClient,
) -> None:
    """The terminal reverses a top-up (its hold, or the confirmation that posted it): the
    value leaves the card, so the stored-value budget it spent is given back, once however
    often the reversal is sent; the budget then sells the same amount again."""
    grant_id, tid, pan, card_id = await _budgeted_topups(admin)
    service = admin.app[POS_KEY]

    async def used() -> int:
        return int((await grant_of(admin, "S1", grant_id))["used_amount"])

    [held] = await service.handle([_topup(tid, pan, "000201")])
    assert (held.outcome, await used()) == (Outcome.APPROVED, 20_000)
    for _ in range(2):  # the 0400 and its resend
        [undone] = await service.handle([_reversal(tid, "000201")])
        assert (undone.outcome, await used()) == (Outcome.APPROVED, 0)
    # a confirmed top-up, then its confirmation reversed
    [held] = await service.handle([_topup(tid, pan, "000202", 30_000)])
    [posted] = await service.handle([_confirm(tid, "000203", "000202", 30_000)])
    assert (posted.outcome, await used()) == (Outcome.APPROVED, 30_000)
    assert (await card(admin, card_id))["balances"]["available"] == 30_000
    for _ in range(2):
        [undone] = await service.handle([_reversal(tid, "000203")])
        assert undone.outcome is Outcome.APPROVED
        assert await used() == 0
    assert (await card(admin, card_id))["balances"]["available"] == 0
    [again] = await service.handle([_topup(tid, pan, "000204", 50_000)])  # the whole budget
    assert (again.outcome, await used()) == (Outcome.APPROVED, 50_000)
    # a refused reversal (the hold is confirmed: only the confirmation can be reversed)
    # gives nothing back
    await service.handle([_confirm(tid, "000205", "000204", 50_000)])
    [refused] = await service.handle([_reversal(tid, "000204")])
    assert (refused.outcome, await used()) == (Outcome.ALREADY_REVERSED, 50_000)


async def test_a_lapsed_pos_topup_hold_gives_its_grant_spend_back_and_a_confirmed_one_keeps_it(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep (`CardService.sweep_topup_grants`, on a schedule in the server): a hold that
    lapsed unconfirmed gives its spend back, a confirmed one keeps it, an open one waits;
    a second sweep changes nothing."""
    grant_id, tid, pan, _ = await _budgeted_topups(admin)
    service, cards = admin.app[POS_KEY], admin.app[CARDS_KEY]
    monkeypatch.setattr(limits, "TOPUP_CONFIRM_S", 1)
    [lapsing] = await service.handle([_topup(tid, pan, "000301", 10_000)])
    [kept] = await service.handle([_topup(tid, pan, "000302", 15_000)])
    await service.handle([_confirm(tid, "000303", "000302", 15_000)])
    assert (lapsing.outcome, kept.outcome) == (Outcome.APPROVED, Outcome.APPROVED)
    monkeypatch.setattr(limits, "TOPUP_CONFIRM_S", 600)
    [waiting] = await service.handle([_topup(tid, pan, "000304", 5_000)])
    assert waiting.outcome is Outcome.APPROVED
    assert (await grant_of(admin, "S1", grant_id))["used_amount"] == 30_000
    for _ in range(100):  # the writer expires the 1 s hold on its own scan
        await asyncio.sleep(0.05)
        lapsed = await sql_rows(
            db_url, "SELECT count(*) AS n FROM ledger_transfers WHERE kind = 'expire'"
        )
        if lapsed[0]["n"]:
            break
    assert await cards.sweep_topup_grants() == {"kept": 1, "returned": 1}
    assert (await grant_of(admin, "S1", grant_id))["used_amount"] == 20_000
    assert await cards.sweep_topup_grants() == {"kept": 0, "returned": 0}
    states = await sql_rows(db_url, "SELECT key, state FROM pos_grant_spends ORDER BY key")
    assert [r["state"] for r in states] == ["returned", "kept", "open"]
    [late] = await service.handle([_reversal(tid, "000301")])  # the lapsed hold's 0400
    assert (await grant_of(admin, "S1", grant_id))["used_amount"] == 20_000, late


async def test_a_topup_whose_grant_goes_meanwhile_is_given_back_and_its_key_stays_refused(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await admin.org("LE1", "S1")
    await new_class(admin, "BEAR", name="Bearer", named=False)
    only = await grant(admin, "S1", "stored_value")
    issued = await issue(admin, "BEAR")
    service = admin.app[CARDS_KEY]
    checked = service._check_grant

    async def check_then_revoke(*args: Any, **kwargs: Any) -> None:
        await checked(*args, **kwargs)  # the grant lets it through ...
        await admin.ok("DELETE", f"/v1/grants/{only['id']}")  # ... and HQ revokes it now

    monkeypatch.setattr(service, "_check_grant", check_then_revoke)
    path = f"/v1/cards/{issued['id']}/topups"
    status, answer = await admin.call("POST", path, json=pay(5_000, "race"))
    assert (status, answer["error"]["code"]) == (403, "not_granted")
    assert (await card(admin, issued["id"]))["balances"]["available"] == 0
    reasons = await sql_rows(db_url, "SELECT reason FROM ledger_transfers ORDER BY id")
    assert [r["reason"] for r in reasons] == ["counter_topup", "counter_topup_undone"]
    assert (await admin.ok("GET", "/v1/audit", action="card.topup"))["items"] == []
    assert (await grant_of(admin, "S1", only["id"]))["used_amount"] == 0
    status, answer = await admin.call("POST", path, json=pay(5_000, "race"))
    assert (status, answer["error"]["code"]) == (409, "counter_request_undone")
    assert (await card(admin, issued["id"]))["balances"]["available"] == 0


async def test_a_retry_finishes_the_give_back_a_refused_counter_request_could_not_make(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A top-up (and a gift sale) whose record was refused after its value went in, and
    whose give-back then failed too (the ledger busy): its retry under the same key gives
    the value back and is refused as undone; it never answers the top-up as done without
    its grant spent and its audit row (nor leaves a sold gift card inactive with value)."""
    await world(admin)
    service = admin.app[CARDS_KEY]
    bearer, gift = await issue(admin, "BEAR"), await issue(admin, "GIFT")

    async def refused_record(*_args: Any, **_kwargs: Any) -> None:
        raise Refused("forbidden", "not_granted", "the grant went meanwhile")

    async def busy(*_args: Any, **_kwargs: Any) -> None:
        raise CardsUnavailable("the ledger is busy")

    for issued, path, record in (
        (bearer, "topups", "_record_topup"), (gift, "sell", "_activate_sold")
    ):  # fmt: skip
        url = f"/v1/cards/{issued['id']}/{path}"
        with monkeypatch.context() as patched:
            patched.setattr(service, record, refused_record)
            patched.setattr(service, "_undo", busy)
            status, _ = await admin.call("POST", url, json=pay(20_000, f"k-{path}"))
        assert status == 503
        assert (await card(admin, issued["id"]))["balances"]["available"] == 20_000
        for _ in range(2):
            status, answer = await admin.call("POST", url, json=pay(20_000, f"k-{path}"))
            assert (status, answer["error"]["code"]) == (409, "counter_request_undone")
        assert (await card(admin, issued["id"]))["balances"]["available"] == 0
    assert (await admin.ok("GET", "/v1/audit", action="card.topup"))["items"] == []


async def test_concurrent_topups_never_pass_the_class_maximum_and_a_refused_one_changes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    issued = await issue(admin, "BEAR")  # at most 100,000 fen
    path = f"/v1/cards/{issued['id']}/topups"
    answers = await asyncio.gather(
        *(admin.call("POST", path, json=pay(30_000, f"c-{i}")) for i in range(8))
    )
    ok = [a for s, a in answers if s == 201]
    refused = [a for s, a in answers if s != 201]
    assert len(ok) == 3, answers
    assert {(a["error"]["code"]) for a in refused} == {"over_balance_max"}
    balances = (await card(admin, issued["id"]))["balances"]
    assert (balances["available"], balances["maximum"]) == (90_000, 100_000)
    before = await counts(db_url)
    status, answer = await admin.call("POST", path, json=pay(10_001, "c-over"))
    assert (status, answer["error"]["code"], answer["error"]["field"]) == (
        409, "over_balance_max", "amount")  # fmt: skip
    assert await counts(db_url) == before
    failures = await sql_rows(db_url, "SELECT count(*) AS n FROM ledger_failures")
    assert failures[0]["n"] == 0
    assert (await card(admin, issued["id"]))["balances"]["available"] == 90_000
    status, _ = await admin.call("POST", path, json=pay(10_000, "c-last"))
    assert status == 201


async def test_only_an_active_unexpired_stored_value_card_takes_a_topup(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    gift = await issue(admin, "GIFT")
    frozen = await issue(admin, "BEAR")
    await admin.ok("POST", f"/v1/cards/{frozen['id']}/freeze")
    fresh = await issue(admin, "BEAR")
    before = await counts(db_url)
    cases = [(gift, "gift_not_reloadable"), (frozen, "card_state")]
    for c, code in cases:
        status, answer = await topup(admin, c["id"], 100)
        assert (status, answer["error"]["code"]) == (409, code)
    service = admin.app[CARDS_KEY]
    now = service.clock_ms()
    service.clock_ms = lambda: now + 4 * YEAR_MS
    status, answer = await topup(admin, fresh["id"], 100)
    assert (status, answer["error"]["code"]) == (409, "card_expired")
    assert await counts(db_url) == before


async def test_a_cross_entity_topup_leaves_each_entitys_postings_balanced(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    issued = await issue(admin, "BEAR", "S1")  # issued by LE1
    status, paid = await topup(admin, issued["id"], 7_000, store="S3")  # paid in at LE2's S3
    assert status == 201, paid
    legs = await legs_by_entity(db_url, paid["transfer_id"])
    assert legs == {"LE1": (7_000, 7_000), "LE2": (7_000, 7_000)}
    due = await sql_rows(
        db_url, "SELECT legal_entity, purpose FROM ledger_accounts WHERE owner_kind = 'entity'"
    )
    assert sorted((d["legal_entity"], d["purpose"]) for d in due) == [
        ("LE1", "due_from"),
        ("LE2", "due_to"),
    ]
    assert (await card(admin, issued["id"]))["balances"]["available"] == 7_000
    assert int((await store_account(db_url, "S3", "cash"))["debits_posted"]) == 7_000
    # the card spent back at its own entity's store: within one entity, no clearing
    tid = await terminal(admin, "S1")
    result = await pos(admin, Kind.PURCHASE, tid, issued["pan"], 2_000)
    assert (result.outcome, result.balance) == (Outcome.APPROVED, 5_000)


# --- gift cards --------------------------------------------------------------------------------


async def test_a_gift_card_is_sold_once_at_a_denomination_and_spends_the_grants_amount(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    budget = await grant(admin, "S1", "gift", product="GIFT", budget_amount=30_000)
    gift = await issue(admin, "GIFT")
    other = await issue(admin, "GIFT")
    path = f"/v1/cards/{gift['id']}/sell"
    before = await counts(db_url)
    status, answer = await admin.call("POST", path, json=pay(15_000, "g-0"))
    assert (status, answer["error"]["code"], answer["error"]["field"]) == (
        400, "not_a_denomination", "amount")  # fmt: skip
    assert await counts(db_url) == before
    status, sold = await admin.call("POST", path, json=pay(20_000, "g-1"))
    assert (status, sold["available"]) == (201, 20_000)
    status, again = await admin.call("POST", path, json=pay(20_000, "g-1"))
    assert (status, again["replayed"], again["transfer_id"]) == (200, True, sold["transfer_id"])
    status, answer = await admin.call("POST", path, json=pay(20_000, "g-2"))
    assert (status, answer["error"]["code"]) == (409, "card_state")
    detail = await card(admin, gift["id"])
    assert (detail["state"], detail["balances"]["available"]) == ("active", 20_000)
    used = [g for g in (await admin.ok("GET", "/v1/grants", store="S1"))["items"]
            if g["id"] == budget["id"]]  # fmt: skip
    assert used[0]["used_amount"] == 20_000
    # 20,000 more would pass the 30,000 budget: the general gift grant of S1 takes it
    status, _ = await admin.call("POST", f"/v1/cards/{other['id']}/sell", json=pay(20_000, "g-3"))
    assert status == 201
    tid = await terminal(admin, "S1")
    result = await pos(admin, Kind.PURCHASE, tid, gift["pan"], 5_000)
    assert (result.outcome, result.balance) == (Outcome.APPROVED, 15_000)
    status, answer = await topup(admin, gift["id"], 100)
    assert (status, answer["error"]["code"]) == (409, "gift_not_reloadable")
    # Nor at a terminal (whatever stored-value grant its store holds): declined, no hold.
    await grant(admin, "S1", "stored_value")
    before = await counts(db_url)
    for _ in range(2):  # twice: nothing is held either time
        at_pos = await pos(admin, Kind.TOPUP, tid, gift["pan"], 5_000)
        assert (at_pos.outcome, at_pos.refusal) == (Outcome.NOT_PERMITTED, "gift_not_reloadable")
    assert await counts(db_url) == before
    assert (await card(admin, gift["id"]))["balances"]["incoming"] == 0


async def test_a_gift_sale_past_the_only_grants_amount_budget_is_refused_and_changes_nothing(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await new_class(admin, "GIFT", name="Gift", named=False, gift=True,
                    denominations=[10_000, 50_000])  # fmt: skip
    await grant(admin, "S1", "gift", product="GIFT", budget_amount=20_000)
    gift = await issue(admin, "GIFT")
    before = await counts(db_url)
    status, answer = await admin.call(
        "POST", f"/v1/cards/{gift['id']}/sell", json=pay(50_000, "too-much")
    )
    assert (status, answer["error"]["code"]) == (403, "grant_budget_exceeded")
    assert await counts(db_url) == before
    assert (await card(admin, gift["id"]))["state"] == "inactive"


# --- closing -----------------------------------------------------------------------------------


async def test_close_refunds_the_exact_balance_in_cash_and_records_it(
    admin: AdminClient, db_url: str
) -> None:
    await world(admin)
    issued = await issue(admin, "BEAR")
    await topup(admin, issued["id"], 8_765)
    await admin.ok("POST", f"/v1/cards/{issued['id']}/freeze")
    cash_before = await store_account(db_url, "S1", "cash")
    closed = await admin.ok("POST", f"/v1/cards/{issued['id']}/close", json={"receipt": "C-9"})
    assert (closed["state"], closed["refund"]["amount"]) == ("closed", 8_765)
    cash_after = await store_account(db_url, "S1", "cash")
    assert int(cash_after["credits_posted"]) - int(cash_before["credits_posted"]) == 8_765
    detail = await card(admin, issued["id"])
    assert detail["balances"]["available"] == 0
    [refund] = closed["refund"]["transfer_ids"]
    [row] = await sql_rows(db_url, "SELECT reason, metadata FROM ledger_transfers WHERE id = :i",
                           i=refund)  # fmt: skip
    assert row["reason"] == "close_refund"
    assert "C-9" in row["metadata"]
    records = await admin.ok("GET", "/v1/audit", action="card.close_refund")
    assert records["items"][0]["after"]["amount"] == 8_765
    before = await counts(db_url)
    status, answer = await admin.call("POST", f"/v1/cards/{issued['id']}/close",
                                      json={"receipt": "C-10"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "card_state")
    assert await counts(db_url) == before


async def test_close_racing_purchases_refunds_exactly_what_the_purchases_left(
    admin: AdminClient,
) -> None:
    await world(admin)
    tid = await terminal(admin, "S1")
    issued = await issue(admin, "BEAR")
    await topup(admin, issued["id"], 50_000)
    purchases = [pos(admin, Kind.PURCHASE, tid, issued["pan"], 1_000) for _ in range(20)]
    closing = admin.ok("POST", f"/v1/cards/{issued['id']}/close", json={"receipt": "C-1"})
    *results, closed = await asyncio.gather(*purchases, closing)
    spent = sum(1_000 for r in results if r.outcome is Outcome.APPROVED)
    assert spent + closed["refund"]["amount"] == 50_000
    assert (await card(admin, issued["id"]))["balances"]["available"] == 0


# --- fees --------------------------------------------------------------------------------------


async def test_issue_and_replace_fees_move_the_stores_cash_to_its_fees(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await new_class(admin, "FEE", name="With fees", named=False, issue_fee=500, replace_fee=300)
    await grant(admin, "S1", "stored_value")
    one = await issue(admin, "FEE")
    batch = await admin.ok("POST", "/v1/card-batches", json={"class_code": "FEE", "store": "S1",
                                                             "count": 4})  # fmt: skip
    await admin.ok("POST", f"/v1/cards/{one['id']}/replace")
    fees = await store_account(db_url, "S1", "fees")
    assert int(fees["credits_posted"]) == 500 + 300  # the batch is stock: no fee paid yet
    # A batch card pays its fee when it is handed out, once.
    first = batch["first_id"]
    for card_id in (first, first + 1):
        await admin.ok("POST", f"/v1/cards/{card_id}/activate")
    status, answer = await admin.call("POST", f"/v1/cards/{first}/activate")
    assert (status, answer["error"]["code"]) == (409, "card_state")
    fees = await store_account(db_url, "S1", "fees")
    assert int(fees["credits_posted"]) == 500 + 300 + 2 * 500
    reasons = await sql_rows(db_url, "SELECT reason FROM ledger_transfers ORDER BY id")
    assert [r["reason"] for r in reasons] == ["issue_fee", "replace_fee", "issue_fee", "issue_fee"]
    due = await sql_rows(db_url, "SELECT id, fee_due FROM cards WHERE id >= :f ORDER BY id",
                         f=first)  # fmt: skip
    assert [int(r["fee_due"]) for r in due][:4] == [0, 0, 500, 500]


async def test_an_activation_retried_after_a_refused_write_pays_its_fee_once(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch card's fee is keyed by the card: an activation refused after its fee, whose
    give-back the ledger could not take either, is retried and replays that same fee (not a
    second); one whose give-back landed pays again under the card's next fee key. Either
    way the store's fee income is one fee."""
    await admin.org("LE1", "S1")
    await new_class(admin, "FEE", name="With fees", named=False, issue_fee=500)
    await grant(admin, "S1", "stored_value")
    batch = await admin.ok("POST", "/v1/card-batches", json={"class_code": "FEE", "store": "S1",
                                                             "count": 2})  # fmt: skip
    service = admin.app[CARDS_KEY]

    async def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise CardsUnavailable("the ledger went away")

    for card_id, give_back_fails in ((batch["first_id"], True), (batch["last_id"], False)):
        with monkeypatch.context() as patched:
            patched.setattr(service, "_transition", refused)
            if give_back_fails:
                patched.setattr(service, "_fee_back", refused)
            status, _ = await admin.call("POST", f"/v1/cards/{card_id}/activate")
        assert status == 503
        assert (await admin.ok("POST", f"/v1/cards/{card_id}/activate"))["state"] == "active"
    fees = await store_account(db_url, "S1", "fees")
    assert int(fees["credits_posted"]) - int(fees["debits_posted"]) == 2 * 500


async def test_a_stock_card_lost_before_its_hand_out_is_replaced_by_stock_owing_the_fee(
    admin: AdminClient, db_url: str
) -> None:
    """A batch card reported lost in the store (never handed out, its fee still due) is
    replaced by an inactive card owing the same fee: its activation pays it, once; the
    replacement never skips the fee by being active at once."""
    await admin.org("LE1", "S1")
    await new_class(admin, "FEE", name="With fees", named=False, issue_fee=500)
    await grant(admin, "S1", "stored_value")
    batch = await admin.ok("POST", "/v1/card-batches", json={"class_code": "FEE", "store": "S1",
                                                             "count": 1})  # fmt: skip
    await admin.ok("POST", f"/v1/cards/{batch['first_id']}/lost")
    new = await admin.ok("POST", f"/v1/cards/{batch['first_id']}/replace")
    assert new["state"] == "inactive"
    assert await sql_rows(db_url, "SELECT id FROM ledger_transfers WHERE reason = "
                          "'issue_fee'") == []  # fmt: skip
    await admin.ok("POST", f"/v1/cards/{new['id']}/activate")
    fees = await store_account(db_url, "S1", "fees")
    assert int(fees["credits_posted"]) == 500


async def test_a_gift_batch_card_pays_its_issue_fee_at_its_sale_once(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await new_class(admin, "GFEE", name="Gift with fee", named=False, gift=True,
                    denominations=[10_000], issue_fee=200)  # fmt: skip
    await grant(admin, "S1", "gift")
    batch = await admin.ok("POST", "/v1/card-batches", json={"class_code": "GFEE", "store": "S1",
                                                             "count": 2})  # fmt: skip
    assert await sql_rows(db_url, "SELECT id FROM ledger_transfers WHERE reason = "
                          "'issue_fee'") == []  # fmt: skip
    path = f"/v1/cards/{batch['first_id']}/sell"
    for expected in (201, 200):  # the sale and its retry (a replay)
        status, _ = await admin.call("POST", path, json=pay(10_000, "gf-1"))
        assert status == expected
    fees = await store_account(db_url, "S1", "fees")
    assert int(fees["credits_posted"]) == 200


async def test_a_fee_is_taken_before_its_card_is_written_and_given_back_when_the_write_fails(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An issue (or replace) whose fee the ledger cannot take now is refused before any card
    is written (503, nothing changed: no card whose number nobody was told); one whose
    card write is refused after the fee gives the fee back, and the store's cash is as it
    was."""
    await admin.org("LE1", "S1")
    await new_class(admin, "FEE", name="With fees", named=False, issue_fee=500, replace_fee=300)
    await grant(admin, "S1", "stored_value")
    service = admin.app[CARDS_KEY]
    real_submit = service._submit_one

    async def ledger_busy(op: Any) -> Any:
        if op.reason.endswith("_fee"):
            raise CardsUnavailable("busy")
        return await real_submit(op)

    before = await counts(db_url)
    with monkeypatch.context() as patched:
        patched.setattr(service, "_submit_one", ledger_busy)
        status, answer = await admin.call("POST", "/v1/cards",
                                          json={"class_code": "FEE", "store": "S1"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (503, "ledger_unavailable")
    cards_after = await sql_rows(db_url, "SELECT count(*) AS n FROM cards")
    assert cards_after[0]["n"] == 0
    assert (await counts(db_url))["ledger_transfers"] == before["ledger_transfers"]

    async def refused_write(*_args: Any, **_kwargs: Any) -> Any:
        raise Refused("conflict", "member_not_active", "the member went meanwhile")

    with monkeypatch.context() as patched:
        patched.setattr(service, "_write", refused_write)
        status, answer = await admin.call("POST", "/v1/cards",
                                          json={"class_code": "FEE", "store": "S1"})  # fmt: skip
    assert (status, answer["error"]["code"]) == (409, "member_not_active")
    reasons = await sql_rows(db_url, "SELECT reason FROM ledger_transfers WHERE reason LIKE "
                             "'issue_fee%' ORDER BY id")  # fmt: skip
    assert [r["reason"] for r in reasons] == ["issue_fee", "issue_fee_undone"]
    cash = await store_account(db_url, "S1", "cash")
    assert int(cash["debits_posted"]) == int(cash["credits_posted"]) == 500


# --- breakage ----------------------------------------------------------------------------------


async def test_breakage_is_the_value_left_on_expired_cards_per_issuing_entity_in_scope(
    admin: AdminClient,
) -> None:
    await world(admin)
    gift = await issue(admin, "GIFT", "S1")
    await admin.ok("POST", f"/v1/cards/{gift['id']}/sell", json=pay(10_000, "b-1"))
    await issue(admin, "GIFT", "S1")  # never sold: no value, not counted
    bearer = await issue(admin, "BEAR", "S2")
    await topup(admin, bearer["id"], 2_500)
    other = await issue(admin, "BEAR", "S3")
    await topup(admin, other["id"], 700)
    closed = await issue(admin, "BEAR", "S1")
    await admin.ok("POST", f"/v1/cards/{closed['id']}/close", json={"receipt": "X"})
    named = await issue(admin, "ORD", "S1")  # no expiry
    await topup(admin, named["id"], 900)
    now = await admin.ok("GET", "/v1/reports/breakage", as_of="2026-01")
    assert now["entities"] == []
    later = await admin.ok("GET", "/v1/reports/breakage", as_of="2099-01")
    assert later["entities"] == [
        {"legal_entity": "LE1", "gift": {"cards": 1, "value": 10_000},
         "stored_value": {"cards": 1, "value": 2_500}},
        {"legal_entity": "LE2", "gift": {"cards": 0, "value": 0},
         "stored_value": {"cards": 1, "value": 700}},
    ]  # fmt: skip
    officer = await admin.token("store_crm", "store", "S2")
    mine = await admin.ok("GET", "/v1/reports/breakage", officer, as_of="2099-01")
    assert mine["entities"] == [{"legal_entity": "LE1", "gift": {"cards": 0, "value": 0},
                                 "stored_value": {"cards": 1, "value": 2_500}}]  # fmt: skip
    for month in ("2099-13", "1999-01", "2100-01"):  # expiries are YYMM: 2000-2099 only
        status, answer = await admin.call("GET", "/v1/reports/breakage", as_of=month)
        assert (status, answer["error"]["field"]) == (400, "as_of"), month
    status, answer = await admin.call("GET", "/v1/reports/breakage")
    assert (status, answer["error"]["code"]) == (400, "missing_field")


async def test_a_resend_after_the_class_discount_changed_gets_the_first_answer(
    admin: AdminClient, db_url: str
) -> None:
    """The purchase recorded the class discount; HQ changes it while the terminal's reply is
    lost: the resend (same STAN) is the same request, answered as the first (approved, the
    same reference), never 94 for money that was taken."""
    await world(admin)
    await new_class(admin, "VIP", name="VIP", named=False, discount_bp=500)
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "stored_value",
                                              "product": "VIP"})  # fmt: skip
    vip = await issue(admin, "VIP", "S1")
    assert (await topup(admin, vip["id"], 10_000))[0] == 201
    tid = await terminal(admin, "S1")
    sale = PosRequest(kind=Kind.PURCHASE, terminal=tid, batch="000001", stan="000777",
                      card=vip["pan"], amount=2_000)  # fmt: skip
    [first] = await admin.app[POS_KEY].handle([sale])
    assert first.outcome is Outcome.APPROVED
    await admin.ok("PATCH", "/v1/card-classes/VIP", json={"discount_bp": 800})
    [again] = await admin.app[POS_KEY].handle([sale])
    assert (again.outcome, again.rrn) == (Outcome.APPROVED, first.rrn)
    rows = await sql_rows(
        db_url, "SELECT count(*) AS n FROM ledger_transfers WHERE reason = 'purchase'"
    )
    assert int(rows[0]["n"]) == 1
    other = replace(sale, amount=2_500)  # another amount under the key: still 94
    assert (await admin.app[POS_KEY].handle([other]))[0].outcome is Outcome.DUPLICATE_MISMATCH


async def test_a_refund_is_made_in_the_store_where_the_purchase_was(
    admin: AdminClient, db_url: str
) -> None:
    """A refund gives back from the selling store's sales: at another store's terminal (of
    its entity or of another) it is 25 and nothing moves; at the selling store it goes."""
    await world(admin)
    bear = await issue(admin, "BEAR", "S1")
    assert (await topup(admin, bear["id"], 10_000))[0] == 201
    here, same_entity, other_entity = [await terminal(admin, s) for s in ("S1", "S2", "S3")]
    [sale] = await admin.app[POS_KEY].handle([PosRequest(
        kind=Kind.PURCHASE, terminal=here, batch="000001", stan="000001", card=bear["pan"],
        amount=5_000)])  # fmt: skip
    assert sale.outcome is Outcome.APPROVED
    before = await sql_rows(db_url, "SELECT count(*) AS n FROM ledger_transfers")
    for tid in (same_entity, other_entity):
        [got] = await admin.app[POS_KEY].handle([PosRequest(
            kind=Kind.REFUND, terminal=tid, batch="000001", stan="000002", card=bear["pan"],
            amount=2_000, rrn=sale.rrn)])  # fmt: skip
        assert got.outcome is Outcome.ORIGINAL_NOT_FOUND
    assert await sql_rows(db_url, "SELECT count(*) AS n FROM ledger_transfers") == before
    [done] = await admin.app[POS_KEY].handle([PosRequest(
        kind=Kind.REFUND, terminal=here, batch="000001", stan="000003", card=bear["pan"],
        amount=2_000, rrn=sale.rrn)])  # fmt: skip
    assert (done.outcome, done.balance) == (Outcome.APPROVED, 7_000)


async def test_the_settlement_report_shows_each_settled_batch_in_the_callers_scope(
    admin: AdminClient,
) -> None:
    """Terminals of S1 and S3 settle, one balanced and one not: HQ finance sees both with
    the host's totals beside the terminal's; S1's officer sees its own; filters narrow."""
    await world(admin)
    bear = await issue(admin, "BEAR", "S1")
    assert (await topup(admin, bear["id"], 10_000))[0] == 201
    t1, t3 = await terminal(admin, "S1"), await terminal(admin, "S3")
    pos_service = admin.app[POS_KEY]
    [sale] = await pos_service.handle([PosRequest(
        kind=Kind.PURCHASE, terminal=t1, batch="000001", stan="000001", card=bear["pan"],
        amount=1_500)])  # fmt: skip
    assert sale.outcome is Outcome.APPROVED
    for tid, totals in ((t1, (1_500, 1, 0, 0)), (t3, (700, 1, 0, 0))):
        [settled] = await pos_service.handle(
            [
                PosRequest(
                    kind=Kind.SETTLE, terminal=tid, batch="000001", stan="000002", totals=totals
                )
            ]
        )
        assert settled.outcome is Outcome.APPROVED
    [end] = await pos_service.handle(
        [
            PosRequest(  # S3's batch closes by its upload
                kind=Kind.UPLOAD, terminal=t3, batch="000001", stan="000003", totals=(700, 1, 0, 0)
            )
        ]
    )
    assert end.outcome is Outcome.APPROVED
    everything = await admin.ok("GET", "/v1/reports/settlements")
    assert [(x["tid"], x["store"], x["balanced"], x["host"]["debit_amount"],
             x["terminal"]["debit_amount"]) for x in everything["items"]] == [
        (t1, "S1", True, 1_500, 1_500), (t3, "S3", False, 0, 700)]  # fmt: skip
    officer = await admin.token("store_crm", "store", "S1")
    mine = await admin.ok("GET", "/v1/reports/settlements", officer)
    assert [x["tid"] for x in mine["items"]] == [t1]
    unbalanced = await admin.ok("GET", "/v1/reports/settlements", balanced="false")
    assert [x["tid"] for x in unbalanced["items"]] == [t3]
    assert (await admin.ok("GET", "/v1/reports/settlements", officer, store="S3"))[
        "items"] == []  # fmt: skip
    assert (await admin.ok("GET", "/v1/reports/settlements", tid=t3))["items"][0]["tid"] == t3
    page = await admin.ok("GET", "/v1/reports/settlements", limit=1)
    assert page["next_after"] == str(everything["items"][0]["id"])


async def test_a_reversal_after_the_batch_closed_shows_in_the_settlement_report(
    admin: AdminClient,
) -> None:
    """A purchase, its batch settled balanced, then its 0400 (a gateway's store and forward,
    delivered late): the money went back, and the report kept showing the batch as closed
    (a settlement review). The host's totals now beside those at the close say it moved."""
    await world(admin)
    bear = await issue(admin, "BEAR", "S1")
    assert (await topup(admin, bear["id"], 10_000))[0] == 201
    tid = await terminal(admin, "S1")
    pos_service = admin.app[POS_KEY]

    async def one(**fields: Any) -> PosResult:
        [got] = await pos_service.handle(
            [PosRequest(terminal=tid, batch="000001", **{"card": bear["pan"], **fields})]
        )
        return got

    assert (await one(kind=Kind.PURCHASE, stan="000001", amount=1_000)).outcome is Outcome.APPROVED
    assert (await one(kind=Kind.PURCHASE, stan="000002", amount=400)).outcome is Outcome.APPROVED
    settled = await one(kind=Kind.SETTLE, stan="000003", card="", totals=(1_400, 2, 0, 0))
    assert (settled.outcome, settled.balanced) == (Outcome.APPROVED, True)
    [item] = (await admin.ok("GET", "/v1/reports/settlements"))["items"]
    assert (item["host_now"], item["moved_since_close"]) == (item["host"], False)
    late = await one(kind=Kind.REVERSE, stan="000001", card="", forwarded=True)
    assert late.outcome is Outcome.APPROVED
    [item] = (await admin.ok("GET", "/v1/reports/settlements"))["items"]
    assert item["host"]["debit_amount"] == 1_400  # what the close recorded
    assert item["host_now"] == {"debit_amount": 400, "debit_count": 1, "credit_amount": 0,
                                "credit_count": 0}  # fmt: skip
    assert (item["balanced"], item["moved_since_close"]) == (True, True)
