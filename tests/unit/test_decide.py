"""Every decision of the ledger's domain, with no I/O: `decide_batch` on hand-built views."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cardcore import limits
from cardcore.ledger.decide import BatchEffects, decide_batch
from cardcore.ledger.model import (
    Account,
    AccountFlags,
    AccountInfo,
    Asset,
    AssetKind,
    Balance,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    IdCounters,
    LedgerView,
    Op,
    PendingState,
    Posting,
    PostPending,
    SetAccountFrozen,
    Side,
    TransferKind,
    VoidPending,
)

CNY = Asset("CNY", AssetKind.CURRENCY, 2, "Renminbi")
PTS = Asset("PTS", AssetKind.POINTS, 0, "Points")
COUNTERS = IdCounters(account=100, transfer=1, entry=1, account_event=1, outbox=1)
NOW = 1_800_000_000_000


def account(
    aid: int, *, asset: str = "CNY", credits: int = 0, debits: int = 0, **flags: bool
) -> Account:
    info = AccountInfo(aid, asset, "LE1", "card", f"c{aid}", "sv", AccountFlags(**flags))
    return Account(info, Balance(debits_posted=debits, credits_posted=credits))


def view(*accounts: Account) -> LedgerView:
    return LedgerView(
        assets={"CNY": CNY, "PTS": PTS},
        accounts={a.id: a for a in accounts},
        account_ids_by_natural_key={a.info.natural_key: a.id for a in accounts},
    )


def move(key: str, debit: int, credit: int, amount: int, **extra: object) -> CreateTransfer:
    return CreateTransfer(
        "pos",
        key,
        str(extra.pop("asset", "CNY")),
        (Posting(debit, Side.DEBIT, amount), Posting(credit, Side.CREDIT, amount)),
        **extra,  # type: ignore[arg-type]
    )


def decide(ops: list[Op], v: LedgerView, now: int = NOW) -> BatchEffects:
    return decide_batch([ops], v, COUNTERS, seq=7, now_ms=now)


def codes(effects: BatchEffects) -> list[str]:
    return [r.code for r in effects.results]


def test_posted_transfer_moves_posted_balances_and_journals_balance_after() -> None:
    e = decide(
        [move("k1", 1, 2, 300)], view(account(1, credits=1000, no_overdraft=True), account(2))
    )
    assert codes(e) == ["ok"]
    assert e.accounts[1].balance == Balance(debits_posted=300, credits_posted=1000, version=1)
    assert e.accounts[2].balance == Balance(credits_posted=300, version=1)
    assert [(x.account_id, x.posted_delta, x.balance.version) for x in e.entries] == [
        (1, 300, 1),
        (2, 300, 1),
    ]
    assert [o.event for o in e.outbox] == ["transfer.posted"]
    assert e.results[0].seq == 7 and e.results[0].transfer_id == 1


def test_insufficient_funds_fails_only_that_operation_and_is_remembered() -> None:
    v = view(account(1, credits=100, no_overdraft=True), account(2))
    e = decide([move("a", 1, 2, 101), move("b", 1, 2, 100)], v)
    assert codes(e) == ["exceeds_credits", "ok"]
    assert e.results[0].field == "postings[0].account_id"
    assert [(f.key, f.code) for f in e.failures] == [("a", "exceeds_credits")]
    assert e.accounts[1].balance.debits_posted == 100


def test_no_overcredit_refuses_credit_beyond_debits() -> None:
    v = view(account(1), account(2, debits=50, no_overcredit=True))
    assert codes(decide([move("k", 1, 2, 51)], v)) == ["exceeds_debits"]
    assert codes(decide([move("k", 1, 2, 50)], v)) == ["ok"]


def test_frozen_accounts_refuse_new_debits_and_credits() -> None:
    v = view(account(1, credits=500, debit_frozen=True), account(2, credit_frozen=True), account(3))
    e = decide([move("a", 1, 3, 10), move("b", 3, 2, 10), move("c", 2, 3, 10)], v)
    assert codes(e) == ["debit_account_frozen", "credit_account_frozen", "ok"]


def test_unknown_account_and_asset_mismatch_name_the_posting() -> None:
    v = view(account(1, credits=500), account(2, asset="PTS"))
    e = decide([move("a", 1, 9, 10), move("b", 1, 2, 10)], v)
    assert [(r.code, r.field) for r in e.results] == [
        ("account_not_found", "postings[1].account_id"),
        ("account_asset_mismatch", "postings[1].account_id"),
    ]
    assert codes(decide([move("c", 1, 2, 10, asset="XXX")], v)) == ["asset_not_found"]


def test_domain_rechecks_balance_and_shape() -> None:
    v = view(account(1, credits=500), account(2))
    unbalanced = CreateTransfer(
        "pos", "u", "CNY", (Posting(1, Side.DEBIT, 10), Posting(2, Side.CREDIT, 9))
    )
    twice = CreateTransfer(
        "pos", "t", "CNY", (Posting(1, Side.DEBIT, 10), Posting(1, Side.CREDIT, 10))
    )
    zero = move("z", 1, 2, 0)
    assert codes(decide([unbalanced, twice, zero], v)) == [
        "postings_unbalanced",
        "accounts_must_be_different",
        "amount_must_be_positive",
    ]


def test_overflow_is_refused_not_wrapped() -> None:
    v = view(account(1), account(2, credits=limits.BALANCE_MAX))
    assert codes(decide([move("k", 1, 2, 1)], v)) == ["overflows_balance"]


def test_same_key_same_request_replays_first_result_without_effect() -> None:
    v = view(account(1, credits=1000, no_overdraft=True), account(2))
    first = decide([move("k", 1, 2, 10)], v)
    v2 = replace(
        v,
        accounts={**v.accounts, **first.accounts},
        transfers_by_key={("pos", "k"): first.transfers[0]},
    )
    again = decide([move("k", 1, 2, 10)], v2)
    assert again.results[0].ok and again.results[0].replayed
    assert again.results[0].transfer_id == first.results[0].transfer_id
    assert again.is_empty and again.entries == []


def test_same_key_in_one_batch_applies_once() -> None:
    v = view(account(1, credits=1000, no_overdraft=True), account(2))
    e = decide([move("k", 1, 2, 10), move("k", 1, 2, 10)], v)
    assert [r.replayed for r in e.results] == [False, True]
    assert len(e.transfers) == 1 and e.accounts[1].balance.debits_posted == 10


@pytest.mark.parametrize(
    ("changed", "code"),
    [
        ({"amount": 11}, "exists_with_different_postings"),
        ({"asset": "PTS"}, "exists_with_different_asset"),
        ({"reason": "other"}, "exists_with_different_reason"),
        ({"metadata": (("store", "S2"),)}, "exists_with_different_metadata"),
        ({"pending": True}, "exists_with_different_pending"),
    ],
)
def test_same_key_different_request_names_the_field(changed: dict[str, object], code: str) -> None:
    v = view(account(1, credits=1000), account(2))
    amount = int(changed.pop("amount", 10))  # type: ignore[call-overload]
    e = decide([move("k", 1, 2, 10), move("k", 1, 2, amount, **changed)], v)
    assert codes(e) == ["ok", code]
    assert len(e.transfers) == 1


def test_failed_key_stays_failed_even_when_funds_arrive() -> None:
    v = view(account(1, credits=5, no_overdraft=True), account(2), account(3, credits=1000))
    e = decide([move("k", 1, 2, 10), move("topup", 3, 1, 100), move("k", 1, 2, 10)], v)
    assert codes(e) == ["exceeds_credits", "ok", "id_already_failed"]
    assert e.results[2].original_code == "exceeds_credits"
    v2 = replace(v, failures_by_key={("pos", "k"): e.failures[0]})
    assert codes(decide([move("k", 1, 2, 10)], v2)) == ["id_already_failed"]
    assert codes(decide([move("k", 1, 2, 11)], v2)) == ["exists_with_different_postings"]


def held(
    v: LedgerView, *legs: tuple[int, Side, int], timeout_s: int | None = None
) -> tuple[LedgerView, int]:
    op = CreateTransfer(
        "pos",
        "hold",
        "CNY",
        tuple(Posting(a, s, n) for a, s, n in legs),
        pending=True,
        timeout_s=timeout_s,
    )
    e = decide([op], v)
    assert e.results[0].ok, e.results
    t = e.transfers[0]
    return replace(
        v,
        accounts={**v.accounts, **e.accounts},
        transfers_by_key={("pos", "hold"): t},
        pendings={t.id: PendingState(t, None)},
    ), t.id


def test_hold_reserves_funds_and_posting_in_part_releases_the_rest() -> None:
    v = view(account(1, credits=100, no_overdraft=True), account(2))
    v, pid = held(v, (1, Side.DEBIT, 80), (2, Side.CREDIT, 80))
    assert v.accounts[1].balance.debits_pending == 80
    assert codes(decide([move("other", 1, 2, 21)], v)) == ["exceeds_credits"]
    e = decide([PostPending("pos", "p", pid, amount=50)], v)
    assert codes(e) == ["ok"]
    assert e.accounts[1].balance == Balance(debits_posted=50, credits_posted=100, version=2)
    assert e.accounts[2].balance.credits_posted == 50 and e.accounts[2].balance.credits_pending == 0
    assert e.closed_pendings == [pid] and e.outbox[0].event == "transfer.posted"


def test_a_hold_opened_and_resolved_in_one_batch_is_neither_opened_nor_closed() -> None:
    """The store writes a batch as one statement on PostgreSQL, which cannot delete a row it
    inserts itself: a hold resolved in the batch that opened it must be in neither set."""
    v = view(account(1, credits=100, no_overdraft=True), account(2))
    v, earlier = held(v, (1, Side.DEBIT, 10), (2, Side.CREDIT, 10))
    counters = replace(COUNTERS, transfer=earlier + 1)  # the ids after the earlier hold's
    ops: list[Op] = [
        move("h1", 1, 2, 20, pending=True),
        PostPending("pos", "p1", earlier + 1, amount=20),
        move("h2", 1, 2, 30, pending=True),
        VoidPending("pos", "v0", earlier),
    ]
    e = decide_batch([ops], v, counters, seq=7, now_ms=NOW)
    assert codes(e) == ["ok", "ok", "ok", "ok"]
    assert set(e.opened_pendings) == {e.results[2].transfer_id}
    assert e.closed_pendings == [earlier]


def test_post_more_than_held_and_double_resolution_are_refused() -> None:
    v = view(account(1, credits=100), account(2))
    v, pid = held(v, (1, Side.DEBIT, 80), (2, Side.CREDIT, 80))
    e = decide(
        [
            PostPending("pos", "p1", pid, amount=81),
            VoidPending("pos", "v1", pid),
            PostPending("pos", "p2", pid),
            VoidPending("pos", "v2", pid),
            PostPending("pos", "p3", 999),
        ],
        v,
    )
    assert codes(e) == [
        "exceeds_pending_amount",
        "ok",
        "pending_transfer_already_voided",
        "pending_transfer_already_voided",
        "pending_transfer_not_found",
    ]
    assert e.accounts[1].balance.debits_pending == 0 and e.accounts[1].balance.debits_posted == 0


def test_partial_post_needs_uniform_legs_but_full_post_does_not() -> None:
    v = view(account(1, credits=100), account(2), account(3))
    v, pid = held(v, (1, Side.DEBIT, 10), (2, Side.CREDIT, 9), (3, Side.CREDIT, 1))
    assert codes(decide([PostPending("pos", "p", pid, amount=5)], v)) == [
        "partial_post_not_uniform"
    ]
    assert codes(decide([PostPending("pos", "p", pid)], v)) == ["ok"]


def test_posting_a_posted_transfer_is_refused() -> None:
    v = view(account(1, credits=100), account(2))
    first = decide([move("k", 1, 2, 10)], v)
    t = first.transfers[0]
    v2 = replace(v, pendings={t.id: PendingState(t, None)})
    assert codes(decide([PostPending("pos", "p", t.id)], v2)) == ["pending_transfer_not_pending"]


def test_expired_hold_is_released_before_the_batch_and_cannot_be_posted() -> None:
    v = view(account(1, credits=100, no_overdraft=True), account(2))
    v, pid = held(v, (1, Side.DEBIT, 80), (2, Side.CREDIT, 80), timeout_s=30)
    still = decide([PostPending("pos", "p", pid)], v, now=NOW + 29_999)
    assert codes(still) == ["ok"]
    late = decide([PostPending("pos", "p", pid)], v, now=NOW + 30_000)
    assert codes(late) == ["pending_transfer_expired"]
    assert [t.kind for t in late.transfers] == [TransferKind.EXPIRE]
    assert late.accounts[1].balance.debits_pending == 0
    assert late.closed_pendings == [pid]
    assert [o.event for o in late.outbox] == ["transfer.expired"]


def test_linked_group_commits_all_or_nothing() -> None:
    v = view(
        account(1, credits=100, no_overdraft=True),
        account(2),
        account(3, credits=5, no_overdraft=True),
    )
    ops: list[Op] = [
        move("a", 1, 2, 50, linked=True),
        move("b", 3, 2, 10, linked=True),  # fails: 3 has only 5
        move("c", 1, 2, 1),
        move("d", 1, 2, 7),  # not in the group
    ]
    e = decide(ops, v)
    assert codes(e) == ["linked_event_failed", "exceeds_credits", "linked_event_failed", "ok"]
    assert [t.key for t in e.transfers] == ["d"]
    assert e.accounts[1].balance.debits_posted == 7
    assert [f.key for f in e.failures] == ["b"]  # only the cause is remembered


def test_linked_group_rolls_back_created_accounts_too() -> None:
    v = view(account(1, credits=5, no_overdraft=True))
    ops: list[Op] = [
        CreateAccount("CNY", "LE1", "card", "new", "sv", linked=True),
        move("x", 1, 100, 10),  # 100 is the id the new account would get
    ]
    e = decide(ops, v)
    assert codes(e) == ["linked_event_failed", "exceeds_credits"]
    assert e.account_events == [] and e.counters.account == COUNTERS.account


def test_linked_group_never_reaches_into_the_next_request() -> None:
    v = view(account(1, credits=100), account(2))
    e = decide_batch(
        [[move("a", 1, 2, 1, linked=True)], [move("b", 1, 2, 1)]], v, COUNTERS, seq=7, now_ms=NOW
    )
    assert codes(e) == ["linked_event_chain_open", "ok"]
    assert [t.key for t in e.transfers] == ["b"]


def test_open_chain_at_end_of_batch_fails_whole_chain() -> None:
    v = view(account(1, credits=100), account(2))
    e = decide([move("a", 1, 2, 1), move("b", 1, 2, 1, linked=True)], v)
    assert codes(e) == ["ok", "linked_event_chain_open"]


def test_create_account_is_idempotent_by_natural_key() -> None:
    v = view()
    op = CreateAccount("CNY", "LE1", "card", "c9", "sv", AccountFlags(no_overdraft=True))
    e = decide([op, op, replace(op, flags=AccountFlags())], v)
    assert codes(e) == ["ok", "ok", "exists_with_different_flags"]
    assert e.results[0].account_id == e.results[1].account_id == 100 and e.results[1].replayed
    assert codes(decide([replace(op, asset="NOPE")], v)) == ["asset_not_found"]


def test_an_account_asked_for_again_after_a_freeze_is_the_same_account() -> None:
    """Frozen flags are the account's state (a freeze, a thaw), not what it is: creating it
    again with the flags it was made with answers it, frozen as it is."""
    v = view(account(9, no_overdraft=True, debit_frozen=True))
    again = CreateAccount("CNY", "LE1", "card", "c9", "sv", AccountFlags(no_overdraft=True))
    e = decide([again], v)
    assert codes(e) == ["ok"] and e.results[0].account_id == 9 and e.results[0].replayed


def test_create_asset_idempotent_and_checked() -> None:
    e = decide(
        [
            CreateAsset("CPN:1", AssetKind.COUPON, 0, "coupon"),
            CreateAsset("CNY", AssetKind.CURRENCY, 3, "x"),
        ],
        view(),
    )
    assert codes(e) == ["ok", "exists_with_different_scale"]


def test_freeze_and_unfreeze_are_journaled_once() -> None:
    v = view(account(1, credits=100), account(2))
    e = decide(
        [
            SetAccountFrozen(1, debit_frozen=True),
            SetAccountFrozen(1, debit_frozen=True),
            move("k", 1, 2, 1),
        ],
        v,
    )
    assert codes(e) == ["ok", "ok", "debit_account_frozen"]
    assert [ev.kind for ev in e.account_events] == ["flags"]
    assert e.results[1].replayed
    assert codes(decide([SetAccountFrozen(42, debit_frozen=True)], v)) == ["account_not_found"]


def test_cny_cannot_be_added_to_points() -> None:
    v = view(account(1, credits=100), account(2, asset="PTS"))
    e = decide([move("k", 1, 2, 10, asset="CNY")], v)
    assert codes(e) == ["account_asset_mismatch"]
    assert e.entries == []


def test_post_replay_accepts_explicit_full_amount() -> None:
    v = view(account(1, credits=100), account(2))
    v, pid = held(v, (1, Side.DEBIT, 80), (2, Side.CREDIT, 80))
    e = decide(
        [
            PostPending("pos", "p", pid),
            PostPending("pos", "p", pid, amount=80),
            PostPending("pos", "p", pid, amount=70),
        ],
        v,
    )
    assert codes(e) == ["ok", "ok", "exists_with_different_amount"]
    assert e.results[1].replayed


def test_an_operation_past_the_journals_columns_is_refused_alone() -> None:
    """An in-process caller skips the edge: a key past KEY_CHARS_MAX or too many postings is
    refused with its own result, and the batch's other operations go on (on PostgreSQL the
    batch's one statement would otherwise fail for everyone in it)."""
    v = view(account(1, credits=100), account(2))
    long_key = move("k" * (limits.KEY_CHARS_MAX + 1), 1, 2, 1)
    e = decide([long_key, move("fine", 1, 2, 1)], v)
    assert codes(e) == ["string_too_long", "ok"]
    assert e.results[0].field == "key" and e.failures == []
