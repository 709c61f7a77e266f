"""The POS host on cards of issue 4, on SQLite and PostgreSQL: card states, PINs and their
lockout, discount cards, split tender, cross-entity clearing and the top-up maximum, each
also under concurrency (many `handle` calls at once, and many requests in one call).

The host is `PosService` on a real ledger (tests/integration/pos_world.py builds terminals of
two legal entities, card classes, members and cards with PINs as the admin services would).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any

import pytest

from cardcore import limits
from cardcore.cards.model import Kind, Outcome, PosResult, batch_totals
from cardcore.db import Statement
from cardcore.ledger.model import Side
from cardcore.ledger.service import Ledger
from cardcore.records import Unit
from tests.helpers import AdminClient, sql_rows
from tests.integration.pos_world import Issued, World, request, zone_block

PIN = "204816"
WRONG_PIN = "999999"


@pytest.fixture
async def world(ledger: Ledger) -> World:
    return await World.make(ledger)


async def versions(world: World, *account_ids: int) -> list[int]:
    return [(await world.account(a)).balance.version for a in account_ids]


async def purchase(world: World, issued: Issued, amount: int, **fields: object) -> PosResult:
    return await world.one(request(Kind.PURCHASE, world.terminals["LE-A"], issued,
                                   amount=amount, **fields))  # fmt: skip


async def transfer_metadata(db_url: str, transfer_id: int) -> dict[str, str]:
    [row] = await sql_rows(
        db_url, "SELECT metadata FROM ledger_transfers WHERE id = :id", id=transfer_id
    )
    meta: dict[str, str] = json.loads(row["metadata"])
    return meta


# --- card states -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        ("frozen", Outcome.CARD_FROZEN),
        ("lost", Outcome.CARD_LOST),
        ("closed", Outcome.CARD_CLOSED),
        ("replaced", Outcome.CARD_CLOSED),
        ("inactive", Outcome.CARD_NOT_ACTIVE),
    ],
)
async def test_a_card_not_active_is_declined_with_its_state_and_nothing_changes(
    world: World, state: str, outcome: Outcome
) -> None:
    t = world.terminals["LE-A"]
    card = await world.card("LE-A", 10_000)
    first = request(Kind.PURCHASE, t, card, amount=1_000)
    sale = await world.one(first)
    assert sale.outcome is Outcome.APPROVED
    second = request(Kind.PURCHASE, t, card, amount=2_000)
    refundable = await world.one(second)
    await world.set_state(card, state)
    before = await world.account(card.account_id)
    sales_before = await versions(world, t.sales_account, t.cash_account)

    for kind, amount in ((Kind.INQUIRY, 0), (Kind.PURCHASE, 500), (Kind.TOPUP, 500)):
        answer = await world.one(request(kind, t, card, amount=amount))
        assert answer.outcome is outcome, (kind, answer)
    assert await world.account(card.account_id) == before
    assert await versions(world, t.sales_account, t.cash_account) == sales_before

    # Money may go back to a frozen or lost card (it stays on the blocked account); never to
    # a closed or replaced one (the new card carries the account), nor an inactive one.
    void = await world.one(request(Kind.VOID, t, card, amount=1_000, original_batch=t.batch,
                                   original_stan=first.stan))  # fmt: skip
    refund = await world.one(request(Kind.REFUND, t, card, amount=500, rrn=refundable.rrn))
    if state in ("frozen", "lost"):
        assert (void.outcome, refund.outcome) == (Outcome.APPROVED, Outcome.APPROVED)
        assert await world.available(card.account_id) == 10_000 - 2_000 + 500
    else:
        assert (void.outcome, refund.outcome) == (outcome, outcome)
        assert await world.account(card.account_id) == before
    # A reversal is always taken: the refundable sale is undone whatever the card's state.
    reversal = await world.one(request(Kind.REVERSE, t, stan=second.stan))
    assert reversal.outcome is Outcome.APPROVED
    expected = 10_000 if state in ("frozen", "lost") else 10_000 - 1_000
    assert await world.available(card.account_id) == expected


async def test_the_successor_of_a_replaced_card_takes_the_refund_of_the_old_cards_sale(
    world: World,
) -> None:
    t = world.terminals["LE-A"]
    old = await world.card("LE-A", 5_000)
    sale = await purchase(world, old, 1_200)
    await world.set_state(old, "replaced")
    # The new card shares the old card's account, as a replacement makes it.
    new = await world.card("LE-A", 0)
    async with world.records.begin() as uow:
        await uow.update("cards", {"id": new.card.id}, {"account_id": old.account_id})
    world.directory.forget_card(new.card.token)
    refused = await world.one(request(Kind.REFUND, t, old, amount=200, rrn=sale.rrn))
    assert refused.outcome is Outcome.CARD_CLOSED
    refund = await world.one(request(Kind.REFUND, t, new, amount=200, rrn=sale.rrn))
    assert refund.outcome is Outcome.APPROVED, refund
    assert refund.balance == 5_000 - 1_200 + 200


# --- PINs --------------------------------------------------------------------------------------


async def test_a_card_with_a_pin_needs_it_for_a_purchase(world: World, db_url: str) -> None:
    card = await world.card("LE-A", 10_000, pin=PIN)
    plain = await world.card("LE-A", 10_000)
    assert (await purchase(world, card, 100)).outcome is Outcome.PIN_REQUIRED
    wrong = await purchase(world, card, 100, pin_block=zone_block(WRONG_PIN, card.pan))
    assert wrong.outcome is Outcome.PIN_WRONG
    right = await purchase(world, card, 100, pin_block=zone_block(PIN, card.pan))
    assert right.outcome is Outcome.APPROVED
    [row] = await sql_rows(db_url, "SELECT pin_failures FROM cards WHERE id = :id",
                           id=card.card.id)  # fmt: skip
    assert row["pin_failures"] == 0  # the right PIN reset the count
    # A card without a PIN needs none; a block sent with it is not read.
    assert (await purchase(world, plain, 100)).outcome is Outcome.APPROVED
    blocked = await purchase(world, plain, 100, pin_block=zone_block(WRONG_PIN, plain.pan))
    assert blocked.outcome is Outcome.APPROVED
    # An inquiry with a PIN block is checked; without one it is answered.
    t = world.terminals["LE-A"]
    asked = await world.one(request(Kind.INQUIRY, t, card))
    assert (asked.outcome, asked.balance) == (Outcome.APPROVED, 9_900)
    checked = await world.one(
        request(Kind.INQUIRY, t, card, pin_block=zone_block(WRONG_PIN, card.pan))
    )
    assert checked.outcome is Outcome.PIN_WRONG
    assert await world.available(card.account_id) == 9_900


async def test_pin_lockout_holds_under_concurrent_wrong_pins(world: World, db_url: str) -> None:
    card = await world.card("LE-A", 10_000, pin=PIN)
    terminals = [world.terminals["LE-A"], world.terminals["LE-B"]]
    tries = 4 * limits.PIN_FAILURES_MAX
    calls = [
        world.one(request(Kind.PURCHASE, terminals[i % 2], card, amount=100,
                          pin_block=zone_block(WRONG_PIN, card.pan)))
        for i in range(tries)
    ]  # fmt: skip
    answers = Counter(a.outcome for a in await asyncio.gather(*calls))
    assert answers == {
        Outcome.PIN_WRONG: limits.PIN_FAILURES_MAX - 1,
        Outcome.PIN_LOCKED: tries - limits.PIN_FAILURES_MAX + 1,
    }, answers
    [row] = await sql_rows(db_url, "SELECT pin_failures FROM cards WHERE id = :id",
                           id=card.card.id)  # fmt: skip
    assert row["pin_failures"] == limits.PIN_FAILURES_MAX  # exactly the bound counted
    # Locked: even the right PIN is refused, at any terminal, and nothing moves.
    for t in terminals:
        right = await world.one(
            request(Kind.PURCHASE, t, card, amount=100, pin_block=zone_block(PIN, card.pan))
        )
        assert right.outcome is Outcome.PIN_LOCKED
    assert await world.available(card.account_id) == 10_000
    # Many wrong PINs in one call lock it all the same (a fresh card).
    other = await world.card("LE-A", 10_000, pin=PIN)
    batch = await world.ask(
        *(
            request(Kind.PURCHASE, terminals[0], other, amount=100,
                    pin_block=zone_block(WRONG_PIN, other.pan))
            for _ in range(tries)
        )
    )  # fmt: skip
    assert Counter(a.outcome for a in batch)[Outcome.PIN_LOCKED] == tries - 2
    # An officer's unlock (the count back to zero) lets the right PIN through again.
    async with world.records.begin() as uow:
        assert world.pos.pins is not None
        await world.pos.pins.unlock(uow, card.card.id)
    ok = await purchase(world, card, 100, pin_block=zone_block(PIN, card.pan))
    assert ok.outcome is Outcome.APPROVED


# --- discount cards ------------------------------------------------------------------------------


async def test_the_class_discount_comes_back_on_inquiry_and_is_in_the_purchases_metadata(
    world: World, db_url: str
) -> None:
    await world.card_class("VIP", discount_bp=500)
    await world.card_class("PLAIN")
    vip = await world.card("LE-A", 10_000, class_code="VIP")
    plain = await world.card("LE-A", 10_000, class_code="PLAIN")
    bare = await world.card("LE-A", 10_000, member=False)
    t = world.terminals["LE-A"]
    assert (await world.one(request(Kind.INQUIRY, t, vip))).discount_bp == 500
    assert (await world.one(request(Kind.INQUIRY, t, plain))).discount_bp == 0
    assert (await world.one(request(Kind.INQUIRY, t, bare))).discount_bp is None

    bought = request(Kind.PURCHASE, t, vip, amount=2_232, operator="007")  # 23.50, 5 % off
    sale = await world.one(bought)
    assert sale.outcome is Outcome.APPROVED
    meta = await transfer_metadata(db_url, int(sale.rrn))
    assert meta == {
        "batch": t.batch,
        "card_class": "VIP",
        "discount_bp": "500",
        "operator": "007",
        "stan": bought.stan,
        "store": t.store,
        "terminal": t.tid,
    }
    other = await purchase(world, bare, 100)
    assert "card_class" not in await transfer_metadata(db_url, int(other.rrn))
    topup = await world.one(request(Kind.TOPUP, t, vip, amount=100))
    assert (await transfer_metadata(db_url, int(topup.rrn)))["card_class"] == "VIP"


# --- split tender --------------------------------------------------------------------------------


async def test_split_tender_takes_exactly_the_balance_and_answers_the_remainder(
    world: World, db_url: str
) -> None:
    t = world.terminals["LE-A"]
    card = await world.card("LE-A", 5_000)
    # A terminal that does not take partial approvals: declined, nothing moves.
    assert (await purchase(world, card, 8_000)).outcome is Outcome.INSUFFICIENT_FUNDS
    first = request(Kind.PURCHASE, t, card, amount=8_000, partial=True)
    split = await world.one(first)
    assert (split.outcome, split.amount, split.remainder, split.balance) == (
        Outcome.PARTIAL_APPROVED,
        5_000,
        3_000,
        0,
    )
    assert (await world.account(card.account_id)).balance.debits_posted == 5_000
    assert (await transfer_metadata(db_url, int(split.rrn)))["requested"] == "8000"
    # Resent (its reply lost): the same answer, even after the balance moved.
    again = await world.one(first)
    assert again == PosResult(
        Outcome.PARTIAL_APPROVED, 0, 5_000, split.rrn, split.auth_code, replayed=True,
        remainder=3_000,
    )  # fmt: skip
    await world.fund(card.account_id, 20_000)
    later = await world.one(first)
    assert (later.outcome, later.amount, later.rrn, later.remainder) == (
        Outcome.PARTIAL_APPROVED,
        5_000,
        split.rrn,
        3_000,
    )
    # The same STAN with another amount is another request: 94, nothing moves.
    changed = await world.one(request(Kind.PURCHASE, t, card, amount=9_000, partial=True,
                                      stan=first.stan))  # fmt: skip
    assert changed.outcome is Outcome.DUPLICATE_MISMATCH
    assert await world.available(card.account_id) == 20_000
    # The void names the amount taken; the batch counts it.
    wrong = await world.one(request(Kind.VOID, t, card, amount=8_000, original_batch=t.batch,
                                    original_stan=first.stan))  # fmt: skip
    assert wrong.outcome is Outcome.ORIGINAL_MISMATCH
    lines = await world.directory.batch_lines(f"{t.tid}/0/{t.batch}/")
    assert batch_totals(lines)[:2] == (5_000, 1)
    void = await world.one(request(Kind.VOID, t, card, amount=5_000, original_batch=t.batch,
                                   original_stan=first.stan))  # fmt: skip
    assert void.outcome is Outcome.APPROVED
    assert await world.available(card.account_id) == 25_000
    # A card with nothing on it: declined, never split into nothing.
    empty = await world.card("LE-A", 0)
    nothing = await world.one(request(Kind.PURCHASE, t, empty, amount=100, partial=True))
    assert nothing.outcome is Outcome.INSUFFICIENT_FUNDS
    # A refund of a partial purchase: at most the amount taken.
    other = await world.card("LE-A", 700)
    part = await world.one(request(Kind.PURCHASE, t, other, amount=1_000, partial=True))
    assert (part.amount, part.remainder) == (700, 300)
    over = await world.one(request(Kind.REFUND, t, other, amount=701, rrn=part.rrn))
    assert over.outcome is Outcome.REFUND_EXCEEDS_ORIGINAL
    back = await world.one(request(Kind.REFUND, t, other, amount=700, rrn=part.rrn))
    assert (back.outcome, back.balance) == (Outcome.APPROVED, 700)


async def test_concurrent_purchases_on_one_card_never_overdraw_it(world: World) -> None:
    card = await world.card("LE-A", 10_000)
    terminals = list(world.terminals.values())
    calls = [
        world.one(request(Kind.PURCHASE, terminals[i % 2], card, amount=700, partial=i % 3 > 0))
        for i in range(40)
    ]
    answers = await asyncio.gather(*calls)
    approvals = (Outcome.APPROVED, Outcome.PARTIAL_APPROVED)
    taken = sum(a.amount or 0 for a in answers if a.outcome in approvals)
    outcomes = Counter(a.outcome for a in answers)
    assert set(outcomes) <= {
        Outcome.APPROVED,
        Outcome.PARTIAL_APPROVED,
        Outcome.INSUFFICIENT_FUNDS,
    }, outcomes
    account = await world.account(card.account_id)
    assert account.balance.debits_posted == taken <= 10_000
    assert await world.available(card.account_id) == 10_000 - taken >= 0
    assert outcomes[Outcome.PARTIAL_APPROVED] <= 1  # only the purchase that meets the floor

    # Many purchases in one call: each sees what the ones before it took.
    other = await world.card("LE-A", 10_000)
    t = terminals[0]
    batch = await world.ask(
        *(request(Kind.PURCHASE, t, other, amount=700, partial=True) for _ in range(20))
    )
    assert [a.outcome for a in batch] == (
        [Outcome.APPROVED] * 14 + [Outcome.PARTIAL_APPROVED] + [Outcome.INSUFFICIENT_FUNDS] * 5
    )
    assert (batch[14].amount, batch[14].remainder) == (200, 500)
    assert await world.available(other.account_id) == 0
    assert (await world.account(other.account_id)).balance.debits_posted == 10_000


async def test_the_cards_of_one_call_are_read_together(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call plans its requests one after another: the cards they name (not held in
    memory) are read in one statement first, not one each; the answers are the same."""
    cards = [await world.card("LE-A", 5_000) for _ in range(6)]
    frozen = await world.card("LE-A", 5_000)
    await world.set_state(frozen, "frozen")
    world.directory.forget_all_cards()
    reads: list[str] = []
    real = Unit._rows

    async def counted(self: Unit, statement: Statement, params: dict[str, Any]) -> Any:
        text = str(statement.clause)  # one statement, whichever database runs it
        if "FROM cards" in text:
            reads.append(text)
        return await real(self, statement, params)

    monkeypatch.setattr(Unit, "_rows", counted)
    t = world.terminals["LE-A"]
    answers = await world.ask(
        *(request(Kind.PURCHASE, t, c, amount=100) for c in [*cards, frozen]),
        request(Kind.PURCHASE, t, cards[0], amount=100),
    )
    assert [a.outcome for a in answers] == [Outcome.APPROVED] * 6 + [
        Outcome.CARD_FROZEN,
        Outcome.APPROVED,
    ]
    assert len(reads) == 1, reads
    assert [await world.available(c.account_id) for c in cards] == [4_800] + [4_900] * 5


async def test_a_call_whose_cards_cannot_be_read_together_reads_each_with_its_plan(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    cards = [await world.card("LE-A", 5_000) for _ in range(3)]
    world.directory.forget_all_cards()

    async def down(tokens: object) -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(world.directory, "warm_cards", down)
    t = world.terminals["LE-A"]
    answers = await world.ask(*(request(Kind.PURCHASE, t, c, amount=100) for c in cards))
    assert [a.outcome for a in answers] == [Outcome.APPROVED] * 3


# --- cross-entity clearing -----------------------------------------------------------------------


async def entity_legs(world: World, postings: list[tuple[int, str, int]]) -> dict[str, list[int]]:
    """Per legal entity: [debits, credits] of a transfer's legs."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for account_id, side, amount in postings:
        entity = (await world.account(account_id)).info.legal_entity
        out[entity][0 if side == Side.DEBIT else 1] += amount
    return dict(out)


async def test_a_cross_entity_purchase_balances_each_legal_entity(world: World) -> None:
    card = await world.card("LE-A", 10_000)
    at_b = world.terminals["LE-B"]
    bought = request(Kind.PURCHASE, at_b, card, amount=2_500)
    sale = await world.one(bought)
    assert sale.outcome is Outcome.APPROVED
    found = await world.directory.transfer_by_id(int(sale.rrn))
    assert found is not None
    postings = found["postings"]
    assert len(postings) == 4
    assert await entity_legs(world, postings) == {"LE-A": [2_500, 2_500], "LE-B": [2_500, 2_500]}
    clearing = await world.accounts.clearing("LE-A", "LE-B")
    assert clearing is not None
    due_to, due_from = clearing
    assert (await world.account(due_to)).balance.credits_posted == 2_500  # A owes B
    assert (await world.account(due_from)).balance.debits_posted == 2_500  # B is owed by A
    assert (await world.account(at_b.sales_account)).balance.credits_posted == 2_500

    # A top-up at B of A's card: B took the cash and owes A the value.
    loading = request(Kind.TOPUP, at_b, card, amount=1_000)
    topup = await world.one(loading)
    assert topup.outcome is Outcome.APPROVED
    hold = await world.directory.transfer_by_id(int(topup.rrn))
    assert hold is not None
    assert await entity_legs(world, hold["postings"]) == {
        "LE-A": [1_000, 1_000],
        "LE-B": [1_000, 1_000],
    }
    back = await world.accounts.clearing("LE-B", "LE-A")
    assert back is not None
    assert back[0] in {p[0] for p in hold["postings"]}
    confirm = await world.one(request(Kind.TOPUP_CONFIRM, at_b, amount=1_000,
                                      original_batch=at_b.batch,
                                      original_stan=loading.stan))  # fmt: skip
    assert confirm.outcome is Outcome.APPROVED
    assert await world.available(card.account_id) == 10_000 - 2_500 + 1_000

    # A void undoes every leg; the batch still counts amounts (first leg) correctly.
    partial = await world.one(request(Kind.PURCHASE, at_b, card, amount=9_000, partial=True))
    assert (partial.outcome, partial.amount) == (Outcome.PARTIAL_APPROVED, 8_500)
    void = await world.one(request(Kind.VOID, at_b, card, amount=2_500,
                                   original_batch=at_b.batch,
                                   original_stan=bought.stan))  # fmt: skip
    assert void.outcome is Outcome.APPROVED
    assert (await world.account(due_to)).balance.debits_posted == 2_500  # the void's leg
    refund = await world.one(request(Kind.REFUND, at_b, card, amount=500, rrn=partial.rrn))
    assert refund.outcome is Outcome.APPROVED
    lines = await world.directory.batch_lines(f"{at_b.tid}/0/{at_b.batch}/")
    totals = batch_totals(lines)
    assert totals == (8_500, 1, 1_000 + 500, 2)
    settled = await world.one(request(Kind.SETTLE, at_b, totals=totals))
    assert (settled.outcome, settled.balanced) == (Outcome.APPROVED, True)
    # 10,000 - 2,500 + 1,000 - 8,500 (all it had) + 2,500 (void) + 500 (refund)
    assert await world.available(card.account_id) == 3_000


async def test_a_void_of_a_sale_refunded_in_part_is_declined_and_the_batch_stays_true(
    world: World,
) -> None:
    """Purchase 10.00, refund 3.00 of it, then void the purchase: the ledger gave back the
    7.00 left, the 0210 said 10.00, and the batch's totals dropped the voided sale but kept
    the refund: a balanced settlement of 3.00 paid out when nothing net had moved (a
    settlement review). A void is of the whole sale: declined 12, nothing moves."""
    t = world.terminals["LE-A"]
    card = await world.card("LE-A", 10_000)
    bought = request(Kind.PURCHASE, t, card, amount=1_000)
    sale = await world.one(bought)
    refund = await world.one(request(Kind.REFUND, t, card, amount=300, rrn=sale.rrn))
    assert (sale.outcome, refund.outcome) == (Outcome.APPROVED, Outcome.APPROVED)
    before = await world.account(card.account_id)
    void = await world.one(request(Kind.VOID, t, card, amount=1_000, original_batch=t.batch,
                                   original_stan=bought.stan))  # fmt: skip
    assert void.outcome is Outcome.ALREADY_REVERSED
    assert await world.account(card.account_id) == before
    lines = await world.directory.batch_lines(f"{t.tid}/0/{t.batch}/")
    assert batch_totals(lines) == (1_000, 1, 300, 1)  # what moved: 10.00 out, 3.00 back
    rest = await world.one(request(Kind.REFUND, t, card, amount=700, rrn=sale.rrn))
    assert rest.outcome is Outcome.APPROVED  # the rest goes back as a refund
    assert await world.available(card.account_id) == 10_000


# --- top-up maximum ------------------------------------------------------------------------------


async def test_a_top_up_over_the_class_maximum_is_refused_and_changes_nothing(
    world: World,
) -> None:
    await world.card_class("NAMED", balance_max=10_000)
    t = world.terminals["LE-A"]
    card = await world.card("LE-A", 9_000, class_code="NAMED")
    before = await world.account(card.account_id)
    cash = await world.account(t.cash_account)
    over = await world.one(request(Kind.TOPUP, t, card, amount=1_001))
    assert over.outcome is Outcome.OVER_LIMIT
    assert await world.account(card.account_id) == before
    assert await world.account(t.cash_account) == cash

    # Two top-ups of one card in one call: the second sees the first's hold.
    first, second = await world.ask(
        request(Kind.TOPUP, t, card, amount=600), request(Kind.TOPUP, t, card, amount=600)
    )
    assert (first.outcome, second.outcome) == (Outcome.APPROVED, Outcome.OVER_LIMIT)
    # Concurrent calls: only what fits passes.
    tries = [request(Kind.TOPUP, t, card, amount=100) for _ in range(10)]
    more = await asyncio.gather(*(world.one(r) for r in tries))
    assert Counter(a.outcome for a in more) == {Outcome.APPROVED: 4, Outcome.OVER_LIMIT: 6}
    held = (await world.account(card.account_id)).balance
    assert held.credits_posted - held.debits_posted + held.credits_pending == 10_000
    # A resent top-up (same STAN) at the maximum is the same top-up: approved again, not 61.
    taken = next(r for r, a in zip(tries, more, strict=True) if a.outcome is Outcome.APPROVED)
    again = await world.one(taken)
    assert (again.outcome, again.replayed) == (Outcome.APPROVED, True)
    assert (await world.account(card.account_id)).balance == held
    # A card's own maximum counts when tighter than its class's.
    tight = await world.card("LE-A", 0, class_code="NAMED", balance_max=500)
    assert (await world.one(request(Kind.TOPUP, t, tight, amount=501))).outcome is (
        Outcome.OVER_LIMIT
    )
    assert (await world.one(request(Kind.TOPUP, t, tight, amount=500))).outcome is (
        Outcome.APPROVED
    )


async def test_a_void_or_refund_that_would_pass_the_cards_maximum_is_refused_and_changes_nothing(
    world: World,
) -> None:
    """A card at its maximum after a top-up that followed a purchase: giving the purchase
    back (a void, a refund) would pass the maximum, so it is declined 61 and nothing moves
    (the till pays it back otherwise); what fits is approved, and a resend of an approved
    refund once the card is at its maximum again is that refund, not a decline."""
    await world.card_class("NAMED", balance_max=10_000)
    t = world.terminals["LE-A"]
    card = await world.card("LE-A", 10_000, class_code="NAMED")
    bought = request(Kind.PURCHASE, t, card, amount=6_000)
    sale = await world.one(bought)
    assert sale.outcome is Outcome.APPROVED
    topup = await world.one(request(Kind.TOPUP, t, card, amount=6_000))  # a hold: counted
    assert topup.outcome is Outcome.APPROVED
    before = await world.account(card.account_id)
    void = request(Kind.VOID, t, card, amount=6_000, original_batch=t.batch,
                   original_stan=bought.stan)  # fmt: skip
    refund = request(Kind.REFUND, t, card, amount=1, rrn=sale.rrn)
    for asked in (void, refund):
        got = await world.one(asked)
        assert got.outcome is Outcome.OVER_LIMIT, (asked.kind, got)
        assert await world.account(card.account_id) == before
    more = await purchase(world, card, 3_000)  # 1,000 + 6,000 held: room for 3,000 more
    assert more.outcome is Outcome.APPROVED
    fits = request(Kind.REFUND, t, card, amount=3_000, rrn=sale.rrn)
    over = request(Kind.REFUND, t, card, amount=1, rrn=sale.rrn)
    first, second = await world.ask(fits, over)  # one call: the second sees the first
    assert (first.outcome, second.outcome) == (Outcome.APPROVED, Outcome.OVER_LIMIT)
    at_max = await world.account(card.account_id)
    again = await world.one(fits)
    assert (again.outcome, again.replayed) == (Outcome.APPROVED, True)
    assert await world.account(card.account_id) == at_max
    unlimited = await world.card("LE-A", 10_000)  # a class without a maximum: no check
    paid = await purchase(world, unlimited, 100)
    back = await world.one(request(Kind.REFUND, t, unlimited, amount=100, rrn=paid.rrn))
    assert back.outcome is Outcome.APPROVED


async def test_a_lost_settlement_or_upload_end_answer_is_answered_again_and_closes_nothing_more(
    world: World,
) -> None:
    """The 0330 of an upload's end was lost: the same end again gets the stored answer
    (never 77, whose sign-on would have the terminal close its next, empty batch); the same
    holds across a batch wrap (the settlement is that of the batch closed last, in its
    cycle), and a settlement naming an older batch of the same number is 77."""
    t = world.terminals["LE-A"]
    card = await world.card("LE-A", 10_000)
    assert (await world.one(request(Kind.PURCHASE, t, card, amount=1_000))).outcome is (
        Outcome.APPROVED
    )
    unbalanced = await world.one(request(Kind.SETTLE, t, totals=(999, 1, 0, 0)))
    assert (unbalanced.outcome, unbalanced.balanced) == (Outcome.APPROVED, False)
    end = request(Kind.UPLOAD, t, totals=(999, 1, 0, 0))
    first = await world.one(end)
    assert (first.outcome, first.balanced, first.totals) == (
        Outcome.APPROVED, False, (1_000, 1, 0, 0))  # fmt: skip
    for _ in range(2):
        again = await world.one(end)
        assert (again.outcome, again.balanced, again.totals, again.replayed) == (
            Outcome.APPROVED, False, (1_000, 1, 0, 0), True)  # fmt: skip
    other = await world.one(replace(end, totals=(1_000, 1, 0, 0)))  # not the same end
    assert (other.outcome, other.batch) == (Outcome.BATCH_MISMATCH, "000002")
    zero = request(Kind.SETTLE, t, batch="000002", totals=(0, 0, 0, 0))
    assert (await world.one(zero)).balanced is True  # 000002 closes, 000003 opens

    async def move_to(batch: str, cycle: int) -> None:  # as if many batches went by
        async with world.records.begin() as uow:
            await uow.update("pos_terminals", {"tid": t.tid},
                             {"batch": batch, "batch_cycle": cycle})  # fmt: skip
        world.directory.forget_terminal(t.tid)

    # A wrap later, batch 000003 is open again: 000002 of the last cycle never closed, so
    # a 0500 naming it is 77, though a 000002 of the cycle before closed with its totals.
    await move_to("000003", 1)
    stale = await world.one(zero)
    assert (stale.outcome, stale.batch) == (Outcome.BATCH_MISMATCH, "000003")
    # Across a wrap: 999999 closes balanced and 000001 of the next cycle opens; the same
    # settlement again is answered as first.
    await move_to("999999", 1)
    settle = request(Kind.SETTLE, t, batch="999999", totals=(0, 0, 0, 0))
    closed = await world.one(settle)
    assert (closed.outcome, closed.balanced, closed.replayed) == (Outcome.APPROVED, True, False)
    again = await world.one(settle)
    assert (again.outcome, again.balanced, again.replayed) == (Outcome.APPROVED, True, True)
    fresh = await world.directory.terminal(t.tid)
    assert fresh is not None and (fresh.batch, fresh.batch_cycle) == ("000001", 2)
    old = await world.one(request(Kind.UPLOAD, t, batch="999998", totals=(0, 0, 0, 0)))
    assert (old.outcome, old.batch) == (Outcome.BATCH_MISMATCH, "000001")


async def test_a_resent_purchase_gets_its_first_answer_after_the_card_was_frozen(
    world: World,
) -> None:
    t = world.terminals["LE-A"]
    card = await world.card("LE-A", 3_000, pin=PIN)
    first = request(Kind.PURCHASE, t, card, amount=1_000, pin_block=zone_block(PIN, card.pan))
    sale = await world.one(first)
    assert sale.outcome is Outcome.APPROVED
    await world.set_state(card, "frozen")
    again = await world.one(first)
    assert (again.outcome, again.rrn, again.replayed, again.balance) == (
        Outcome.APPROVED,
        sale.rrn,
        True,
        2_000,
    )
    assert await world.available(card.account_id) == 2_000


async def test_the_internal_issue_refuses_a_balance_past_the_cards_maximum(
    admin: AdminClient, db_url: str
) -> None:
    before = await sql_rows(db_url, "SELECT count(*) AS n FROM cards")
    status, answer = await admin.call("POST", "/internal/v1/cards", json={
        "legal_entity": "LE1", "count": 1, "balance": 900_000, "balance_max": 100_000})  # fmt: skip
    assert (status, answer["error"]["field"]) == (400, "balance")
    assert await sql_rows(db_url, "SELECT count(*) AS n FROM cards") == before


async def test_the_bootstrap_names_only_the_organizations_entities_and_their_stores(
    admin: AdminClient, db_url: str
) -> None:
    """`cardcore terminal add` and `cardcore card issue` (the internal bootstrap) registered a
    terminal in a store that does not exist, or of another legal entity, and issued cards
    of an entity that does not exist (a reviewer's finding): once the organization has
    legal entities, each is refused and nothing changes."""
    await admin.org("LE1", "S1")
    await admin.org("LE2", "S3")
    terminal = {"tid": "BOOT0001", "mid": "898310048990001", "key_mode": "aes"}
    tables = ("SELECT count(*) AS n FROM pos_terminals", "SELECT count(*) AS n FROM cards",
              "SELECT count(*) AS n FROM ledger_accounts")  # fmt: skip
    before = [await sql_rows(db_url, q) for q in tables]
    for body, status, code in (
        ({**terminal, "store": "NOPE", "legal_entity": "LE1"}, 404, "store_not_found"),
        ({**terminal, "store": "S3", "legal_entity": "LE1"}, 400, "store_other_entity"),
        ({**terminal, "store": "S1", "legal_entity": "NOPE"}, 404, "entity_not_found"),
    ):
        got, answer = await admin.call("POST", "/internal/v1/terminals", json=body)
        assert (got, answer["error"]["code"]) == (status, code), body
    got, answer = await admin.call("POST", "/internal/v1/cards",
                                   json={"legal_entity": "NOPE", "count": 1})  # fmt: skip
    assert (got, answer["error"]["code"]) == (404, "entity_not_found")
    assert [await sql_rows(db_url, q) for q in tables] == before
    made = await admin.ok("POST", "/internal/v1/terminals",
                          json={**terminal, "store": "S3", "legal_entity": "LE2"})  # fmt: skip
    assert made["tid"] == "BOOT0001"


async def test_a_terminals_reversal_of_a_batch_it_settled_is_refused_and_moves_nothing(
    world: World,
) -> None:
    """A terminal sends what it owes before it settles; a 0400 of a settled batch gave the
    money back after the close, seen by no batch's totals (a protocol review). It is refused
    (12); one delivered from the gateway's store and forward (`forwarded`) is still taken."""
    t = world.terminals["LE-A"]
    card = await world.card("LE-A", 10_000)
    sales = [request(Kind.PURCHASE, t, card, amount=4_000) for _ in range(2)]
    for sale in sales:
        assert (await world.one(sale)).outcome is Outcome.APPROVED
    totals = batch_totals(await world.directory.batch_lines(f"{t.tid}/0/{t.batch}/"))
    settled = await world.one(request(Kind.SETTLE, t, totals=totals))
    assert (settled.outcome, settled.balanced) == (Outcome.APPROVED, True)
    late = await world.one(request(Kind.REVERSE, t, batch=t.batch, stan=sales[0].stan))
    assert late.outcome is Outcome.BATCH_SETTLED
    assert await world.available(card.account_id) == 2_000
    closed = batch_totals(await world.directory.batch_lines(f"{t.tid}/0/{t.batch}/"))
    assert closed == totals
    stored = request(Kind.REVERSE, t, batch=t.batch, stan=sales[1].stan)
    forwarded = await world.one(replace(stored, forwarded=True))
    assert forwarded.outcome is Outcome.APPROVED
    assert await world.available(card.account_id) == 6_000
