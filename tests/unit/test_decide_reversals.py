"""Reversals and refunds in the ledger's domain: `decide_batch` on hand-built views, no I/O.

A `Book` decides batch after batch and lays each one over its view with `decide.overlay`,
the way the writer's pipeline decides a batch on top of the one before it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cardcore.ledger.decide import (
    NO_EFFECT_CODE,
    TOMBSTONE_CODE,
    BatchEffects,
    decide_batch,
    overlay,
)
from cardcore.ledger.model import (
    Account,
    AccountFlags,
    AccountInfo,
    Asset,
    AssetKind,
    Balance,
    CreateTransfer,
    IdCounters,
    LedgerView,
    Op,
    Posting,
    PostPending,
    Refund,
    Reverse,
    SetAccountFrozen,
    Side,
    TransferKind,
    VoidPending,
)

CNY = Asset("CNY", AssetKind.CURRENCY, 2, "Renminbi")
COUNTERS = IdCounters(account=100, transfer=1, entry=1, account_event=1, outbox=1)
NOW = 1_800_000_000_000
CLIENT = "pos"
CARD, SHOP, FLOAT, CLR_A, CLR_B, FEE = 1, 2, 3, 4, 5, 6
FUNDS = 10_000


def account(aid: int, *, credits: int = 0, debits: int = 0, **flags: bool) -> Account:
    info = AccountInfo(aid, "CNY", "LE1", "card", f"c{aid}", "sv", AccountFlags(**flags))
    return Account(info, Balance(debits_posted=debits, credits_posted=credits))


def move(
    key: str, debit: int, credit: int, amount: int, *, pending: bool = False, linked: bool = False
) -> CreateTransfer:
    legs = (Posting(debit, Side.DEBIT, amount), Posting(credit, Side.CREDIT, amount))
    return CreateTransfer(CLIENT, key, "CNY", legs, pending=pending, linked=linked)


def sale(key: str, amount: int, *, pending: bool = False, linked: bool = False) -> CreateTransfer:
    return move(key, CARD, SHOP, amount, pending=pending, linked=linked)


def reverse(key: str, target: str, *, tombstone: bool = False, linked: bool = False) -> Reverse:
    return Reverse(CLIENT, key, target, tombstone=tombstone, linked=linked)


def refund(key: str, target: str, amount: int, *, linked: bool = False) -> Refund:
    return Refund(CLIENT, key, target, amount, linked=linked)


class Book:
    """A ledger in memory: each `run` decides one batch and lays it over the view."""

    def __init__(self, *accounts: Account) -> None:
        if not accounts:
            accounts = (
                account(CARD, credits=FUNDS, no_overdraft=True),
                account(SHOP),
                account(FLOAT),
                account(CLR_A),
                account(CLR_B),
                account(FEE),
            )
        self.view = LedgerView(
            assets={"CNY": CNY},
            accounts={a.id: a for a in accounts},
            account_ids_by_natural_key={a.info.natural_key: a.id for a in accounts},
        )
        self.counters = COUNTERS
        self.seq = 1

    def run(self, *ops: Op) -> BatchEffects:
        return self.run_requests([list(ops)])

    def run_requests(self, requests: list[list[Op]]) -> BatchEffects:
        effects = decide_batch(requests, self.view, self.counters, self.seq, NOW + self.seq)
        overlay(self.view, effects)
        self.counters = effects.counters
        self.seq += 1
        return effects

    def one(self, op: Op, code: str = "ok") -> BatchEffects:
        e = self.run(op)
        assert [r.code for r in e.results] == [code], e.results
        return e

    def balance(self, aid: int) -> Balance:
        return self.view.accounts[aid].balance

    def net(self, aid: int) -> int:
        b = self.balance(aid)
        return b.credits_posted - b.debits_posted

    def nets(self) -> dict[int, int]:
        return {aid: self.net(aid) for aid in self.view.accounts}


def codes(effects: BatchEffects) -> list[str]:
    return [r.code for r in effects.results]


def assert_no_effect(e: BatchEffects) -> None:
    assert e.transfers == [] and e.entries == [] and e.outbox == [] and e.accounts == {}


# --- reverse -------------------------------------------------------------------------------


def test_reverse_moves_every_leg_back_and_names_its_target() -> None:
    book = Book()
    before = book.nets()
    clearing = CreateTransfer(
        CLIENT,
        "sale-1",
        "CNY",
        (
            Posting(CARD, Side.DEBIT, 2_500),
            Posting(SHOP, Side.CREDIT, 2_500),
            Posting(CLR_A, Side.DEBIT, 2_500),
            Posting(CLR_B, Side.CREDIT, 2_500),
        ),
        reason="purchase",
    )
    target = book.one(clearing).transfers[0]

    e = book.one(Reverse(CLIENT, "rev-1", "sale-1", reason="void", metadata=(("stan", "9"),)))

    [r] = e.results
    [t] = e.transfers
    assert r.ok and not r.replayed and r.transfer_id == t.id and r.seq == book.seq - 1
    assert r.asset == "CNY"
    assert t.kind is TransferKind.REVERSE and t.target_id == target.id and t.key == "rev-1"
    assert t.reason == "void" and t.metadata == (("stan", "9"),)
    assert t.pending_id is None and t.timeout_s is None
    assert t.postings == (
        Posting(CARD, Side.CREDIT, 2_500),
        Posting(SHOP, Side.DEBIT, 2_500),
        Posting(CLR_A, Side.CREDIT, 2_500),
        Posting(CLR_B, Side.DEBIT, 2_500),
    )
    assert [
        (x.transfer_id, x.account_id, x.side, x.posted_delta, x.pending_delta) for x in e.entries
    ] == [
        (t.id, CARD, Side.CREDIT, 2_500, 0),
        (t.id, SHOP, Side.DEBIT, 2_500, 0),
        (t.id, CLR_A, Side.CREDIT, 2_500, 0),
        (t.id, CLR_B, Side.DEBIT, 2_500, 0),
    ]
    assert book.nets() == before
    assert book.balance(CARD) == Balance(
        debits_posted=2_500, credits_posted=FUNDS + 2_500, version=2
    )
    assert [o.event for o in e.outbox] == ["transfer.reversed"]
    assert e.reversed_by == {target.id: t.id}
    assert e.failures == []


def test_second_reverse_is_target_already_reversed_and_kept() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    first = book.one(reverse("rev-1", "sale-1"))
    nets = book.nets()

    second = book.run(reverse("rev-2", "sale-1"))
    assert [(r.code, r.field) for r in second.results] == [
        ("target_already_reversed", "target_key")
    ]
    assert second.transfers == [] and second.entries == []
    assert [(f.key, f.code) for f in second.failures] == [("rev-2", "target_already_reversed")]

    again = book.run(reverse("rev-2", "sale-1"))
    assert codes(again) == ["id_already_failed"]
    assert again.results[0].original_code == "target_already_reversed"
    assert again.results[0].replayed
    assert_no_effect(again)
    assert again.failures == []
    assert book.nets() == nets
    assert book.view.reversed_by == {first.transfers[0].target_id: first.transfers[0].id}


def test_second_reverse_in_the_same_batch_is_refused_too() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    e = book.run(reverse("rev-1", "sale-1"), reverse("rev-2", "sale-1"), reverse("rev-2", "sale-1"))
    assert codes(e) == ["ok", "target_already_reversed", "id_already_failed"]
    assert len(e.transfers) == 1
    assert book.net(CARD) == FUNDS


def test_reverse_replayed_under_its_key_has_no_second_effect() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    first = book.one(reverse("rev-1", "sale-1")).results[0]
    nets = book.nets()

    again = book.run(reverse("rev-1", "sale-1"))
    [r] = again.results
    assert r.ok and r.replayed and r.transfer_id == first.transfer_id and r.seq == first.seq
    assert_no_effect(again)
    assert book.nets() == nets

    same_batch = book.run(reverse("rev-1", "sale-1"), reverse("rev-1", "sale-1"))
    assert [(r.ok, r.replayed) for r in same_batch.results] == [(True, True), (True, True)]
    assert_no_effect(same_batch)


@pytest.mark.parametrize("other", ["sale-2", "never-seen"])
def test_reverse_key_naming_another_target_is_refused(other: str) -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(sale("sale-2", 700))
    book.one(reverse("rev-1", "sale-1"))
    nets = book.nets()

    e = book.run(reverse("rev-1", other))
    assert [(r.code, r.field) for r in e.results] == [
        ("exists_with_different_target_key", "target_key")
    ]
    assert e.transfers == [] and book.nets() == nets


def test_reverse_key_used_by_a_refund_is_refused_as_another_op() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(reverse("rev-1", "sale-1"))
    e = book.run(refund("rev-1", "sale-1", 10))
    assert codes(e) == ["exists_with_different_op"]
    e = book.run(sale("rev-1", 10))
    assert codes(e) == ["exists_with_different_op"]


def test_reverse_without_tombstone_of_unknown_or_failed_target() -> None:
    book = Book()
    book.one(sale("too-big", FUNDS + 1), "exceeds_credits")
    e = book.run(reverse("rev-1", "never-seen"), reverse("rev-2", "too-big"))
    assert [(r.code, r.field) for r in e.results] == [
        ("target_not_found", "target_key"),
        ("target_failed", "target_key"),
    ]
    assert [(f.key, f.code) for f in e.failures] == [
        ("rev-1", "target_not_found"),
        ("rev-2", "target_failed"),
    ]
    assert e.transfers == []
    # A cashier's void never leaves a tombstone: the original may still arrive.
    assert codes(book.run(sale("never-seen", 100))) == ["ok"]
    # The reverse that found nothing stays failed.
    again = book.run(reverse("rev-1", "never-seen"))
    assert codes(again) == ["id_already_failed"]
    assert again.results[0].original_code == "target_not_found"


# --- tombstones ----------------------------------------------------------------------------


def test_tombstone_reverse_of_a_reversed_target_is_ok_without_effect() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(reverse("void-1", "sale-1"))
    nets = book.nets()
    e = book.one(reverse("auto-rev-1", "sale-1", tombstone=True))
    assert e.results[0].ok
    assert_no_effect(e)
    assert [(f.key, f.code) for f in e.failures] == [("auto-rev-1", NO_EFFECT_CODE)]
    assert book.nets() == nets


def test_tombstone_reverse_of_a_failed_target_is_ok_without_effect() -> None:
    book = Book()
    book.one(sale("too-big", FUNDS + 1), "exceeds_credits")
    nets = book.nets()
    e = book.one(reverse("auto-rev-1", "too-big", tombstone=True))
    assert_no_effect(e)
    assert [(f.key, f.code) for f in e.failures] == [("auto-rev-1", NO_EFFECT_CODE)]
    assert book.nets() == nets
    # The failed original keeps its own code, not the tombstone's.
    again = book.run(sale("too-big", FUNDS + 1))
    assert codes(again) == ["id_already_failed"]
    assert again.results[0].original_code == "exceeds_credits"


def test_tombstone_reverse_before_its_original_refuses_the_late_original() -> None:
    book = Book()
    nets = book.nets()
    e = book.one(reverse("auto-rev-1", "sale-1", tombstone=True))
    assert e.results[0].ok and e.results[0].seq == 1
    assert e.transfers == [] and e.entries == []
    [tomb] = [f for f in e.failures if f.code != NO_EFFECT_CODE]
    assert (tomb.client, tomb.key, tomb.code) == (CLIENT, "sale-1", TOMBSTONE_CODE)

    late = book.run(sale("sale-1", 1_000))
    [r] = late.results
    assert (r.ok, r.code, r.original_code) == (False, "id_already_failed", TOMBSTONE_CODE)
    assert r.seq == 1
    assert_no_effect(late)
    assert late.failures == []
    assert book.nets() == nets

    # For ever, and whatever the late original's request.
    assert book.run(sale("sale-1", 5)).results[0].original_code == TOMBSTONE_CODE
    assert book.run(refund("sale-1", "x", 5)).results[0].original_code == TOMBSTONE_CODE

    # A repeated tombstoning reverse (new key or same key): ok, nothing more.
    for key in ("auto-rev-2", "auto-rev-1"):
        dup = book.one(reverse(key, "sale-1", tombstone=True))
        assert_no_effect(dup)
        # a new key is kept (no effect); the first key replays and records nothing more
        assert [f.key for f in dup.failures] == ([key] if key == "auto-rev-2" else [])
    assert book.nets() == nets

    # Nothing arrived to give back: a cashier's void or a refund finds a failed target.
    assert codes(book.run(reverse("void-1", "sale-1"))) == ["target_failed"]
    assert codes(book.run(refund("ref-1", "sale-1", 5))) == ["target_failed"]


def test_tombstone_reverse_of_a_posted_target_reverses_it() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    e = book.one(reverse("auto-rev-1", "sale-1", tombstone=True))
    assert [t.kind for t in e.transfers] == [TransferKind.REVERSE]
    assert book.net(CARD) == FUNDS
    again = book.run(reverse("void-1", "sale-1"))
    assert codes(again) == ["target_already_reversed"]


def test_tombstone_reverse_key_naming_another_target_is_refused() -> None:
    book = Book()
    book.one(sale("sale-2", 1_000))
    book.one(reverse("auto-rev-1", "sale-1", tombstone=True))  # leaves a tombstone for sale-1
    nets = book.nets()
    e = book.run(reverse("auto-rev-1", "sale-2", tombstone=True))
    assert codes(e) == ["exists_with_different_target_key"]
    assert e.transfers == [] and book.nets() == nets


def test_tombstone_reverse_key_cannot_be_reused_by_a_transfer() -> None:
    book = Book()
    book.one(reverse("auto-rev-1", "sale-1", tombstone=True))
    nets = book.nets()
    e = book.run(sale("auto-rev-1", 100))
    assert codes(e) == ["exists_with_different_op"]
    assert e.transfers == [] and book.nets() == nets


# --- refunds -------------------------------------------------------------------------------


def test_partial_refunds_accumulate_up_to_the_amount_and_not_one_fen_more() -> None:
    book = Book()
    target = book.one(sale("sale-1", 1_000)).transfers[0]
    e = book.run(refund("ref-1", "sale-1", 300), refund("ref-2", "sale-1", 500))
    assert codes(e) == ["ok", "ok"]
    assert [(t.kind, t.target_id, t.postings) for t in e.transfers] == [
        (
            TransferKind.REFUND,
            target.id,
            (Posting(CARD, Side.CREDIT, 300), Posting(SHOP, Side.DEBIT, 300)),
        ),
        (
            TransferKind.REFUND,
            target.id,
            (Posting(CARD, Side.CREDIT, 500), Posting(SHOP, Side.DEBIT, 500)),
        ),
    ]
    assert [o.event for o in e.outbox] == ["transfer.refunded", "transfer.refunded"]
    assert e.refunded == {target.id: 800}
    assert book.net(CARD) == FUNDS - 200 and book.net(SHOP) == 200
    nets = book.nets()

    over = book.run(refund("ref-3", "sale-1", 201))
    assert [(r.code, r.field) for r in over.results] == [("exceeds_refundable_amount", "amount")]
    assert over.transfers == [] and over.entries == [] and over.refunded == {}
    assert [(f.key, f.code) for f in over.failures] == [("ref-3", "exceeds_refundable_amount")]
    assert book.nets() == nets and book.view.refunded == {target.id: 800}

    rest = book.one(refund("ref-4", "sale-1", 200))
    assert rest.refunded == {target.id: 1_000}
    assert book.net(CARD) == FUNDS and book.net(SHOP) == 0
    assert codes(book.run(refund("ref-5", "sale-1", 1))) == ["exceeds_refundable_amount"]


def test_refund_replay_and_changed_amount() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    first = book.one(refund("ref-1", "sale-1", 300)).results[0]
    again = book.run(refund("ref-1", "sale-1", 300))
    assert again.results[0].replayed and again.results[0].transfer_id == first.transfer_id
    assert_no_effect(again)
    assert codes(book.run(refund("ref-1", "sale-1", 301))) == ["exists_with_different_amount"]
    assert codes(book.run(refund("ref-1", "sale-2", 300))) == ["exists_with_different_target_key"]
    assert book.net(CARD) == FUNDS - 700


def test_refund_amount_zero_or_negative_is_refused_by_the_domain() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    e = book.run(refund("ref-0", "sale-1", 0), refund("ref-neg", "sale-1", -5))
    assert [(r.code, r.field) for r in e.results] == [
        ("amount_must_be_positive", "amount"),
        ("amount_must_be_positive", "amount"),
    ]
    assert e.transfers == [] and book.net(CARD) == FUNDS - 1_000


def test_refund_of_unknown_or_failed_target() -> None:
    book = Book()
    book.one(sale("too-big", FUNDS + 1), "exceeds_credits")
    e = book.run(refund("ref-1", "never-seen", 1), refund("ref-2", "too-big", 1))
    assert codes(e) == ["target_not_found", "target_failed"]
    assert e.transfers == []


def test_refund_after_reverse_is_target_already_reversed() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(reverse("rev-1", "sale-1"))
    nets = book.nets()
    e = book.run(refund("ref-1", "sale-1", 1))
    assert [(r.code, r.field) for r in e.results] == [("target_already_reversed", "target_key")]
    assert e.transfers == [] and book.nets() == nets


def test_reverse_after_partial_refunds_reverses_only_the_rest() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(refund("ref-1", "sale-1", 300))
    book.one(refund("ref-2", "sale-1", 250))
    e = book.one(reverse("rev-1", "sale-1"))
    assert e.transfers[0].postings == (
        Posting(CARD, Side.CREDIT, 450),
        Posting(SHOP, Side.DEBIT, 450),
    )
    assert book.net(CARD) == FUNDS and book.net(SHOP) == 0
    assert codes(book.run(refund("ref-3", "sale-1", 1))) == ["target_already_reversed"]


def test_a_whole_reverse_of_a_target_refunded_in_part_is_refused_and_moves_nothing() -> None:
    """A cashier's void is of the whole sale: after a refund of part of it, it gave back the
    rest (the terminal's 0210 said the whole). With `whole` it is refused; once the refund
    is reversed (nothing refunded live) it is taken, the whole amount."""
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(refund("ref-1", "sale-1", 300))
    nets = book.nets()
    e = book.run(replace(reverse("void-1", "sale-1"), whole=True))
    assert [(r.code, r.field) for r in e.results] == [("target_partly_refunded", "target_key")]
    assert e.transfers == [] and book.nets() == nets
    book.one(reverse("ref-1-undo", "ref-1"))
    whole = book.one(replace(reverse("void-2", "sale-1"), whole=True))
    assert {p.amount for p in whole.transfers[0].postings} == {1_000}
    assert book.net(CARD) == FUNDS


def test_reverse_after_refunds_took_everything() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(refund("ref-1", "sale-1", 400))
    book.one(refund("ref-2", "sale-1", 600))
    nets = book.nets()
    e = book.run(reverse("rev-1", "sale-1"))
    assert [(r.code, r.field) for r in e.results] == [("target_already_refunded", "target_key")]
    assert e.transfers == [] and [f.code for f in e.failures] == ["target_already_refunded"]
    tomb = book.one(reverse("auto-rev-1", "sale-1", tombstone=True))
    assert_no_effect(tomb)
    assert [(f.key, f.code) for f in tomb.failures] == [("auto-rev-1", NO_EFFECT_CODE)]
    assert book.nets() == nets


def test_reversing_a_refund_puts_its_amount_back() -> None:
    book = Book()
    target = book.one(sale("sale-1", 1_000)).transfers[0]
    ref = book.one(refund("ref-1", "sale-1", 700)).transfers[0]
    assert codes(book.run(refund("ref-2", "sale-1", 301))) == ["exceeds_refundable_amount"]

    e = book.one(reverse("rev-ref-1", "ref-1"))
    [t] = e.transfers
    assert t.kind is TransferKind.REVERSE and t.target_id == ref.id
    assert t.postings == (Posting(CARD, Side.DEBIT, 700), Posting(SHOP, Side.CREDIT, 700))
    assert e.refunded == {target.id: 0} and e.reversed_by == {ref.id: t.id}
    assert book.net(CARD) == FUNDS - 1_000

    assert codes(book.run(reverse("rev-ref-2", "ref-1"))) == ["target_already_reversed"]
    book.one(refund("ref-3", "sale-1", 1_000))
    assert book.net(CARD) == FUNDS
    assert codes(book.run(refund("ref-4", "sale-1", 1))) == ["exceeds_refundable_amount"]


def test_reversing_a_refund_lets_a_later_reverse_undo_that_amount_too() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(refund("ref-1", "sale-1", 1_000))
    book.one(reverse("rev-ref-1", "ref-1"))
    e = book.one(reverse("rev-1", "sale-1"))
    assert e.transfers[0].postings[0] == Posting(CARD, Side.CREDIT, 1_000)
    assert book.net(CARD) == FUNDS


def hold_and_resolve(book: Book) -> None:
    book.one(sale("hold-1", 500, pending=True))
    book.one(sale("hold-2", 400, pending=True))
    book.one(sale("sale-1", 100))
    hold1 = book.view.transfers_by_key[(CLIENT, "hold-1")].id
    hold2 = book.view.transfers_by_key[(CLIENT, "hold-2")].id
    book.one(PostPending(CLIENT, "post-1", hold1, amount=300))
    book.one(VoidPending(CLIENT, "void-2", hold2))
    book.one(reverse("rev-1", "sale-1"))


@pytest.mark.parametrize("target", ["hold-1", "hold-2", "void-2"])
def test_refund_and_reverse_of_holds_and_voids_are_refused(target: str) -> None:
    book = Book()
    hold_and_resolve(book)
    nets = book.nets()
    e = book.run(refund("ref-x", target, 10), reverse("rev-x", target))
    assert [(r.code, r.field) for r in e.results] == [
        ("target_not_reversible", "target_key"),
        ("target_not_reversible", "target_key"),
    ]
    assert e.transfers == [] and book.nets() == nets
    assert [(f.key, f.code) for f in e.failures] == [
        ("ref-x", "target_not_reversible"),
        ("rev-x", "target_not_reversible"),
    ]


def test_a_reversal_is_reversed_once_and_never_refunded() -> None:
    book = Book()
    hold_and_resolve(book)  # ends with rev-1 reversing sale-1
    nets = book.nets()
    book.one(refund("ref-r", "rev-1", 10), "target_not_reversible")
    e = book.one(reverse("unrev-1", "rev-1"))  # a terminal reversing a void
    [t] = e.transfers
    rev1 = book.view.transfers_by_key[(CLIENT, "rev-1")]
    assert t.kind is TransferKind.REVERSE and t.target_id == rev1.id
    assert book.nets() != nets  # the sale's money moved back to the shop
    book.one(reverse("unrev-2", "rev-1"), "target_already_reversed")
    # The sale is live again but is never reversed (nor refunded) a second time.
    book.one(reverse("rev-again", "sale-1"), "target_already_reversed")
    book.one(refund("ref-s", "sale-1", 1), "target_already_reversed")


def test_a_post_can_be_refunded_and_reversed() -> None:
    book = Book()
    hold_and_resolve(book)
    e = book.run(refund("ref-p", "post-1", 100), reverse("rev-p", "post-1"))
    assert codes(e) == ["ok", "ok"]
    assert [t.postings[0].amount for t in e.transfers] == [100, 200]
    assert book.net(CARD) == FUNDS and book.balance(CARD).debits_pending == 0


def test_a_refund_cannot_be_refunded() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(refund("ref-1", "sale-1", 500))
    assert codes(book.run(refund("ref-2", "ref-1", 1))) == ["target_not_reversible"]


def test_targets_with_unequal_legs_are_refused() -> None:
    book = Book()
    split = CreateTransfer(
        CLIENT,
        "split-1",
        "CNY",
        (
            Posting(CARD, Side.DEBIT, 1_000),
            Posting(SHOP, Side.CREDIT, 970),
            Posting(FEE, Side.CREDIT, 30),
        ),
    )
    book.one(split)
    nets = book.nets()
    e = book.run(reverse("rev-1", "split-1"), refund("ref-1", "split-1", 10))
    assert [(r.code, r.field) for r in e.results] == [
        ("target_not_uniform", "target_key"),
        ("target_not_uniform", "target_key"),
    ]
    assert [f.code for f in e.failures] == ["target_not_uniform", "target_not_uniform"]
    assert e.transfers == [] and book.nets() == nets


# --- frozen flags and floors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("freeze", "probe", "refused"),
    [
        (SetAccountFrozen(CARD, debit_frozen=True), (CARD, SHOP), "debit_account_frozen"),
        (SetAccountFrozen(CARD, credit_frozen=True), (FLOAT, CARD), "credit_account_frozen"),
        (
            SetAccountFrozen(CARD, debit_frozen=True, credit_frozen=True),
            (FLOAT, CARD),
            "credit_account_frozen",
        ),
        (
            SetAccountFrozen(SHOP, debit_frozen=True, credit_frozen=True),
            (SHOP, FLOAT),
            "debit_account_frozen",
        ),
    ],
)
def test_frozen_accounts_do_not_stop_reversals_and_refunds(
    freeze: SetAccountFrozen, probe: tuple[int, int], refused: str
) -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    book.one(sale("sale-2", 1_000))
    book.one(freeze)
    assert codes(book.run(move("probe", *probe, 1))) == [refused]  # the freeze holds
    e = book.run(reverse("rev-1", "sale-1"), refund("ref-2", "sale-2", 400))
    assert codes(e) == ["ok", "ok"]
    assert e.account_events == []  # the flags stay as they were
    assert book.net(CARD) == FUNDS - 600 and book.net(SHOP) == 600


def test_floors_still_refuse_a_reversal() -> None:
    book = Book(
        account(CARD, credits=FUNDS, no_overdraft=True),
        account(SHOP, no_overdraft=True),
        account(FLOAT),
    )
    book.one(sale("sale-1", 1_000))
    book.one(move("payout", SHOP, FLOAT, 800))  # the shop was paid out: 200 left
    nets = book.nets()
    e = book.run(reverse("rev-1", "sale-1"), refund("ref-1", "sale-1", 201))
    assert [(r.code, r.field) for r in e.results] == [
        ("exceeds_credits", "postings[1].account_id"),
        ("exceeds_credits", "postings[1].account_id"),
    ]
    assert e.transfers == [] and book.nets() == nets and book.view.reversed_by == {}
    assert [f.code for f in e.failures] == ["exceeds_credits", "exceeds_credits"]
    assert codes(book.run(refund("ref-2", "sale-1", 200))) == ["ok"]


# --- linked groups and batches -------------------------------------------------------------


def test_reverse_in_a_failed_linked_group_leaves_nothing_and_can_be_done_later() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    nets = book.nets()
    e = book.run(
        reverse("rev-1", "sale-1", linked=True),
        sale("too-big", FUNDS * 2),
    )
    assert codes(e) == ["linked_event_failed", "exceeds_credits"]
    assert e.transfers == [] and e.entries == [] and e.outbox == []
    assert e.reversed_by == {} and book.view.reversed_by == {}
    assert [f.key for f in e.failures] == ["too-big"]
    assert book.nets() == nets

    later = book.one(reverse("rev-1", "sale-1"))  # the same key: linked_event_failed is not kept
    assert later.transfers[0].kind is TransferKind.REVERSE
    assert book.net(CARD) == FUNDS


def test_reverse_rolled_back_in_a_group_frees_the_target_within_the_batch() -> None:
    book = Book()
    book.one(sale("sale-1", 1_000))
    e = book.run(
        reverse("rev-1", "sale-1", linked=True),
        sale("too-big", FUNDS * 2),
        reverse("rev-2", "sale-1"),
    )
    assert codes(e) == ["linked_event_failed", "exceeds_credits", "ok"]
    assert [t.key for t in e.transfers] == ["rev-2"]
    assert book.net(CARD) == FUNDS


def test_refunds_in_a_failed_linked_group_give_back_nothing() -> None:
    book = Book()
    target = book.one(sale("sale-1", 1_000)).transfers[0]
    e = book.run(
        refund("ref-1", "sale-1", 600, linked=True),
        refund("ref-2", "sale-1", 400, linked=True),
        sale("too-big", FUNDS * 2),
        refund("ref-3", "sale-1", 1_000),
    )
    assert codes(e) == ["linked_event_failed", "linked_event_failed", "exceeds_credits", "ok"]
    assert [t.key for t in e.transfers] == ["ref-3"]
    assert e.refunded == {target.id: 1_000}
    assert book.net(CARD) == FUNDS


def test_reversal_of_a_refund_in_a_failed_group_keeps_the_refund_counted() -> None:
    book = Book()
    target = book.one(sale("sale-1", 1_000)).transfers[0]
    book.one(refund("ref-1", "sale-1", 1_000))
    e = book.run(reverse("rev-ref-1", "ref-1", linked=True), sale("too-big", FUNDS * 2))
    assert codes(e) == ["linked_event_failed", "exceeds_credits"]
    assert book.view.refunded == {target.id: 1_000}
    assert codes(book.run(reverse("rev-1", "sale-1"))) == ["target_already_refunded"]


def test_tombstone_in_a_failed_linked_group_is_rolled_back() -> None:
    book = Book()
    e = book.run(
        reverse("auto-rev-1", "sale-1", tombstone=True, linked=True),
        sale("too-big", FUNDS * 2),
    )
    assert codes(e) == ["linked_event_failed", "exceeds_credits"]
    assert [f.key for f in e.failures] == ["too-big"]
    assert codes(book.run(sale("sale-1", 100))) == ["ok"]


def test_original_and_its_reverse_in_one_request() -> None:
    book = Book()
    e = book.run(sale("sale-1", 1_000), reverse("rev-1", "sale-1"))
    assert codes(e) == ["ok", "ok"]
    sale_t, rev_t = e.transfers
    assert rev_t.target_id == sale_t.id and e.reversed_by == {sale_t.id: rev_t.id}
    assert book.net(CARD) == FUNDS
    assert codes(book.run(reverse("rev-2", "sale-1"))) == ["target_already_reversed"]


def test_original_and_its_refunds_in_one_request() -> None:
    book = Book()
    e = book.run(
        sale("sale-1", 1_000),
        refund("ref-1", "sale-1", 600),
        refund("ref-2", "sale-1", 401),
        refund("ref-3", "sale-1", 400),
        reverse("rev-1", "sale-1"),
    )
    assert codes(e) == ["ok", "ok", "exceeds_refundable_amount", "ok", "target_already_refunded"]
    assert book.net(CARD) == FUNDS


def test_tombstone_reverse_before_its_original_in_one_request() -> None:
    book = Book()
    e = book.run(reverse("auto-rev-1", "sale-1", tombstone=True), sale("sale-1", 1_000))
    assert codes(e) == ["ok", "id_already_failed"]
    assert e.results[1].original_code == TOMBSTONE_CODE
    assert e.transfers == [] and e.entries == []
    assert sorted((f.key, f.code) for f in e.failures) == [
        ("auto-rev-1", NO_EFFECT_CODE),
        ("sale-1", TOMBSTONE_CODE),
    ]
    assert book.net(CARD) == FUNDS


def test_tombstone_and_original_in_two_requests_of_one_batch() -> None:
    book = Book()
    e = book.run_requests(
        [[reverse("auto-rev-1", "sale-1", tombstone=True)], [sale("sale-1", 1_000)]]
    )
    assert codes(e) == ["ok", "id_already_failed"]
    assert e.transfers == []


def test_view_of_give_backs_comes_from_the_view_not_the_transfers() -> None:
    """What the writer reads (`reversed_by`, `refunded`) decides, even for a target the batch
    did not make: a view saying the target is reversed refuses a refund."""
    book = Book()
    target = book.one(sale("sale-1", 1_000)).transfers[0]
    book.view.reversed_by[target.id] = 999
    assert codes(book.run(refund("ref-1", "sale-1", 1))) == ["target_already_reversed"]
    book2 = Book()
    target2 = book2.one(sale("sale-1", 1_000)).transfers[0]
    book2.view = replace(book2.view, refunded={target2.id: 900})
    assert codes(book2.run(refund("ref-1", "sale-1", 101))) == ["exceeds_refundable_amount"]
    e = book2.one(reverse("rev-1", "sale-1"))
    assert e.transfers[0].postings[0].amount == 100


def test_a_reversed_refund_is_final_and_a_reversed_original_keeps_its_refunds() -> None:
    """The two chains that could give back more than was taken stay closed."""
    book = Book()
    book.one(sale("sale-9", 100))
    book.one(refund("ref-9", "sale-9", 30))
    book.one(reverse("rev-ref-9", "ref-9"))  # the refund taken back: 100 charged again
    # Reversing that reversal would refund 30 again without counting it as a refund.
    book.one(reverse("rev-rev-9", "rev-ref-9"), "target_not_reversible")
    book.one(refund("ref-9b", "sale-9", 100))  # the whole 100 may still be refunded, once
    book.one(refund("ref-9c", "sale-9", 1), "exceeds_refundable_amount")

    book.one(sale("sale-8", 100))
    book.one(refund("ref-8", "sale-8", 30))
    book.one(reverse("rev-8", "sale-8"))  # gives back the other 70
    # Taking the refund back now would charge 30 for a sale that is reversed.
    book.one(reverse("rev-ref-8", "ref-8"), "target_not_reversible")


def next_view(committed: LedgerView, n: BatchEffects) -> LedgerView:
    """The writer's view of batch N+1 when none of its keys is committed yet (N is not): the
    accounts as read, and N laid over them (`overlay`)."""
    view = LedgerView(
        assets={"CNY": CNY},
        accounts=dict(committed.accounts),
        account_ids_by_natural_key=dict(committed.account_ids_by_natural_key),
    )
    overlay(view, n)
    return view


def test_a_reversed_refund_stays_final_when_its_reversal_is_not_committed_yet() -> None:
    """The writer's pipeline: batch N+1 is read from the database before batch N commits,
    then N is laid over it (`overlay`). N reverses refund F; N+1 reverses that reversal.
    The kind of F (a refund: its reversal is final) comes with N's effects, so N+1 refuses
    as one batch after the other would; an unknown kind is refused, never let through."""
    book = Book()
    book.one(sale("P", 100))
    book.one(refund("F", "P", 100))
    committed = book.view  # P and F, read by N with N's keys
    n = decide_batch([[reverse("RF", "F")]], committed, book.counters, book.seq, NOW)
    assert codes(n) == ["ok"]
    # N+1 names only RRF and RF: none of them is in the database yet, so its view holds no
    # transfers, and the kinds it knows are those of what N did.
    fresh = next_view(committed, n)
    later = decide_batch([[reverse("RRF", "RF")]], fresh, n.counters, book.seq + 1, NOW)
    assert codes(later) == ["target_not_reversible"]
    assert_no_effect(later)
    blind = LedgerView(
        assets={"CNY": CNY},
        accounts=dict(committed.accounts),
        account_ids_by_natural_key=dict(committed.account_ids_by_natural_key),
        transfers_by_key={(CLIENT, "RF"): n.transfers[0]},
    )  # a reversal whose target's kind is unknown: refused
    unknown = decide_batch([[reverse("RRF", "RF")]], blind, n.counters, book.seq + 1, NOW)
    assert codes(unknown) == ["target_not_reversible"]


def test_a_reverse_or_refund_naming_its_own_key_is_refused_and_changes_nothing() -> None:
    """A tombstone reversal whose target key is its own key would write its tombstone and
    its own record under one key (the batch's commit would fail for everyone in it)."""
    book = Book()
    e = book.run(reverse("X", "X", tombstone=True), sale("other", 10))
    assert codes(e) == ["target_not_reversible", "ok"]
    assert [t.key for t in e.transfers] == ["other"]
    assert len(e.failures) == 1


def test_a_void_reversed_in_the_next_batch_before_the_void_commits_is_allowed() -> None:
    """Batch N, read with the kind of P (the inner target of refund F it names), reverses F
    and voids P; batch N+1, read before N commits, reverses the void. P's kind comes over
    with N's effects (every kind N knew, not only the new ones), so the void's reversal is
    allowed, as when N had committed first."""
    book = Book()
    p = book.one(sale("P", 100)).transfers[0]
    book.one(refund("F", "P", 30))
    committed = book.view
    committed.kinds[p.id] = p.kind  # what the store reads for a batch naming F
    n = decide_batch(
        [[reverse("RF", "F")], [reverse("V", "P")]], committed, book.counters, book.seq, NOW
    )
    assert codes(n) == ["ok", "ok"]
    fresh = next_view(committed, n)
    later = decide_batch([[reverse("RV", "V")]], fresh, n.counters, book.seq + 1, NOW)
    assert codes(later) == ["ok"]
