"""The journal's records, hash chain and verifier, without a database."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcore.ledger import journal, schema
from cardcore.ledger.decide import BatchEffects, decide_batch, overlay
from cardcore.ledger.model import (
    Account,
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    IdCounters,
    LedgerView,
    Posting,
    PostPending,
    Refund,
    Reverse,
    Side,
    VoidPending,
)

NOW = 1_800_000_000_000


def _rows(effects: BatchEffects) -> dict[str, list[dict[str, Any]]]:
    records = journal.batch_records(effects)
    return {
        table: [dict(zip(journal.COLUMNS[table], r, strict=True)) for r in records[table]]
        for table in journal.TABLES
    }


def _two_batches() -> tuple[
    list[tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]], dict[int, Account]
]:
    counters = IdCounters(1, 1, 1, 1, 1)
    first = decide_batch(
        [
            [
                CreateAsset("CNY", AssetKind.CURRENCY, 2, "RMB"),
                CreateAccount("CNY", "LE", "entity", "LE", "float"),
                CreateAccount("CNY", "LE", "card", "c1", "sv", AccountFlags(no_overdraft=True)),
            ]
        ],
        LedgerView(),
        counters,
        seq=1,
        now_ms=NOW,
    )
    view = LedgerView(
        assets={a.code: a for a in first.assets},
        accounts=dict(first.accounts),
    )
    second = decide_batch(
        [
            [
                CreateTransfer(
                    "t", "k1", "CNY", (Posting(1, Side.DEBIT, 500), Posting(2, Side.CREDIT, 500))
                )
            ],
            [
                CreateTransfer(
                    "t", "k2", "CNY", (Posting(2, Side.DEBIT, 900), Posting(1, Side.CREDIT, 900))
                )
            ],
        ],
        view,
        first.counters,
        seq=2,
        now_ms=NOW + 5,
    )
    batches = []
    prev = journal.GENESIS_HASH
    for effects in (first, second):
        rows = _rows(effects)
        digest = journal.batch_hash(prev, effects.seq, effects.now_ms, journal.records_of(rows))
        header = {
            "seq": effects.seq,
            "prev_hash": prev,
            "hash": digest,
            "committed_at_ms": effects.now_ms,
        }
        batches.append((header, rows))
        prev = digest
    accounts = {**first.accounts, **second.accounts}
    return batches, accounts


def test_schema_columns_follow_the_hashed_column_order() -> None:
    for name, table in schema.JOURNAL_TABLES.items():
        assert tuple(table.c.keys()) == journal.COLUMNS[name]


def test_records_hash_the_same_as_rows_read_back() -> None:
    batches, _ = _two_batches()
    header, rows = batches[1]
    records = journal.records_of(rows)
    assert (
        journal.batch_hash(header["prev_hash"], 2, header["committed_at_ms"], records)
        == header["hash"]
    )


def test_verifier_accepts_a_consistent_journal() -> None:
    batches, accounts = _two_batches()
    verifier = journal.Verifier()
    for header, rows in batches:
        verifier.batch(header, rows)
    verifier.accounts(accounts.values())
    assert verifier.batches == 2 and verifier.entries == 2  # k2 failed: exceeds_credits
    assert len(batches[1][1]["failures"]) == 1


def _tamper_amount(rows: dict[str, list[dict[str, Any]]]) -> None:
    rows["entries"][0]["posted_delta"] += 1


def _tamper_metadata(rows: dict[str, list[dict[str, Any]]]) -> None:
    rows["transfers"][0]["metadata"] = '{"store":"X"}'


def _tamper_failure(rows: dict[str, list[dict[str, Any]]]) -> None:
    rows["failures"].clear()


@pytest.mark.parametrize("tamper", [_tamper_amount, _tamper_metadata, _tamper_failure])
def test_verifier_names_the_batch_whose_rows_changed(tamper: Any) -> None:
    batches, _ = _two_batches()
    tamper(batches[1][1])
    verifier = journal.Verifier()
    verifier.batch(*batches[0])
    with pytest.raises(journal.Mismatch, match="batch 2"):
        verifier.batch(*batches[1])


def test_verifier_detects_gap_and_broken_link() -> None:
    batches, _ = _two_batches()
    with pytest.raises(journal.Mismatch, match="sequence gap"):
        journal.Verifier().batch(*batches[1])
    header, rows = batches[1]
    verifier = journal.Verifier()
    verifier.batch(*batches[0])
    with pytest.raises(journal.Mismatch, match="prev_hash"):
        verifier.batch({**header, "prev_hash": "f" * 64}, rows)


def test_verifier_detects_balance_that_disagrees_with_the_replay() -> None:
    batches, accounts = _two_batches()
    verifier = journal.Verifier()
    for header, rows in batches:
        verifier.batch(header, rows)
    card = accounts[2]
    card.balance.credits_posted += 1  # the stored balance drifted
    with pytest.raises(journal.Mismatch, match="account 2"):
        verifier.accounts(accounts.values())


def _rehashed(header: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The header of a batch whose rows a tamperer changed, its hash computed again."""
    digest = journal.batch_hash(
        header["prev_hash"], header["seq"], header["committed_at_ms"], journal.records_of(rows)
    )
    return {**header, "hash": digest}


def test_verifier_rechecks_balance_after_each_entry_even_with_a_valid_hash() -> None:
    batches, _ = _two_batches()
    header, rows = batches[1]
    rows["entries"][1]["credits_posted"] += 1  # balance-after lies, and the hash is recomputed
    header = _rehashed(header, rows)
    verifier = journal.Verifier()
    verifier.batch(*batches[0])
    with pytest.raises(journal.Mismatch, match="balance after"):
        verifier.batch(header, rows)


def test_verifier_checks_a_transfers_postings_against_its_entries_even_with_a_valid_hash() -> None:
    """A sale's stored postings rewritten (500 -> 5,000: what a refund's bound reads) with
    the batch hash recomputed: its entries still move 500, and verify says so."""
    batches, _ = _two_batches()
    header, rows = batches[1]
    rows["transfers"][0]["postings"] = json.dumps([[1, "debit", 5000], [2, "credit", 5000]])
    header = _rehashed(header, rows)
    verifier = journal.Verifier()
    verifier.batch(*batches[0])
    with pytest.raises(journal.Mismatch, match="postings are not its entries"):
        verifier.batch(header, rows)


def test_a_transfer_without_target_hashes_as_before_migration_0002() -> None:
    """Batches written before target_id existed (13 columns) still verify."""
    before = (7, "pos", "k", "posted", "CNY", "[]", None, None, None, "", "{}", 3, 1000)
    now = (*before, None)
    assert len(now) == len(journal.COLUMNS["transfers"])
    old = hashlib.sha256(
        (
            journal.GENESIS_HASH
            + json.dumps([3, 1000, [], [], [list(before)], [], []], separators=(",", ":"))
        ).encode()
    ).hexdigest()
    assert journal.batch_hash(journal.GENESIS_HASH, 3, 1000, {"transfers": [now]}) == old
    targeted = (*before, 5)
    assert journal.batch_hash(journal.GENESIS_HASH, 3, 1000, {"transfers": [targeted]}) != old


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=-(2**70), max_value=2**70),
            st.sampled_from(Side),
            st.integers(min_value=-(2**70), max_value=2**70),
        ),
        max_size=6,
    ),
    st.lists(st.tuples(st.text(max_size=8), st.text(max_size=12)), max_size=5),
)
def test_stored_texts_are_json_dumps_canonical_text(
    postings: list[tuple[int, Side, int]], metadata: list[tuple[str, str]]
) -> None:
    """The journal's postings and metadata texts are hashed into the chain: formatted by
    hand or by a shared encoder, they must be byte for byte what json.dumps makes, or
    journals written before would no longer verify."""
    made = [Posting(a, side, amount) for a, side, amount in postings]
    assert journal.postings_json(made) == _dumps([[a, str(s), n] for a, s, n in postings])
    assert journal.metadata_json(tuple(metadata)) == _dumps(dict(metadata))
    assert journal.canonical_json({"k": metadata, "b": [1, None]}) == _dumps(
        {"k": metadata, "b": [1, None]}
    )


# --- holds, reversals and refunds against what came before (second ledger review) ------------


def _legs(*legs: tuple[int, str, int]) -> str:
    return journal.postings_json(tuple(Posting(a, Side(s), x) for a, s, x in legs))


def _transfer(tid: int, kind: str, legs: str, **extra: Any) -> dict[str, Any]:
    return {"id": tid, "kind": kind, "postings": legs, "pending_id": None, "target_id": None,
            "expires_at_ms": None, **extra}  # fmt: skip


def test_a_resolution_must_resolve_an_open_hold_once_moving_its_legs() -> None:
    from collections import Counter  # noqa: PLC0415

    v = journal.Verifier()
    hold = _legs((1, "debit", 100), (2, "credit", 100))
    v._chain(1, _transfer(10, "pending", hold), Counter())
    released = Counter({(1, "debit", 0, -100): 1, (2, "credit", 0, -100): 1})
    moved_money = Counter({(1, "debit", 60, -100): 1, (2, "credit", 60, -100): 1})
    with pytest.raises(journal.Mismatch, match="posts money"):  # a void that pays out
        v._chain(2, _transfer(11, "void", hold, pending_id=10), moved_money)
    v._chain(1, _transfer(10, "pending", hold), Counter())
    too_much = Counter({(1, "debit", 5000, -100): 1, (2, "credit", 5000, -100): 1})
    with pytest.raises(journal.Mismatch, match="does not move its hold's legs"):
        v._chain(2, _transfer(11, "post", hold, pending_id=10), too_much)
    v._chain(1, _transfer(10, "pending", hold), Counter())
    v._chain(2, _transfer(11, "post", hold, pending_id=10), moved_money)  # a partial post
    with pytest.raises(journal.Mismatch, match="resolves no open hold"):  # twice
        v._chain(3, _transfer(12, "void", hold, pending_id=10), released)
    v.open_holds([])
    v._chain(4, _transfer(13, "pending", hold, expires_at_ms=5), Counter())
    with pytest.raises(journal.Mismatch, match="missing \\[13\\]"):  # its working-set row gone
        v.open_holds([])
    v.open_holds([(13, 5)])
    uneven = _legs((1, "debit", 54), (2, "credit", 27), (3, "credit", 27))
    v._chain(5, _transfer(20, "pending", uneven), Counter())
    in_full = Counter({(1, "debit", 54, -54): 1, (2, "credit", 27, -27): 1,
                       (3, "credit", 27, -27): 1})  # fmt: skip
    v._chain(6, _transfer(21, "post", uneven, pending_id=20), in_full)  # legs may differ


def _given(tid: int, kind: str, target: int, legs: str, target_kind: str, target_legs: str,
           target_target: int | None = None, root: int = 10) -> dict[str, Any]:  # fmt: skip
    return {"id": tid, "kind": kind, "target_id": target, "postings": legs,
            "target_kind": target_kind, "target_target_id": target_target,
            "target_postings": target_legs, "root": root}  # fmt: skip


def _check(rows: list[dict[str, Any]]) -> None:
    v = journal.Verifier()
    for row in rows:
        v.given_back(row)


def test_reversals_and_refunds_mirror_their_targets_and_never_give_back_more() -> None:
    sale = _legs((1, "debit", 100), (2, "credit", 100))

    def back(amount: int) -> str:
        return _legs((1, "credit", amount), (2, "debit", amount))

    def forth(amount: int) -> str:
        return _legs((1, "debit", amount), (2, "credit", amount))

    _check([
        _given(11, "refund", 10, back(30), "posted", sale),
        _given(12, "reverse", 11, forth(30), "refund", back(30), target_target=10),
        _given(13, "refund", 10, back(100), "posted", sale),  # 100 refundable again
    ])  # fmt: skip
    _check([  # a void, its reversal, a void again, its reversal; then a refund
        _given(11, "reverse", 10, back(100), "posted", sale),
        _given(12, "reverse", 11, forth(100), "reverse", back(100), target_target=10),
        _given(13, "reverse", 12, back(100), "reverse", forth(100), target_target=11),
        _given(14, "reverse", 13, forth(100), "reverse", back(100), target_target=12),
        _given(15, "refund", 10, back(40), "posted", sale),
    ])  # fmt: skip
    bad = {
        "refunds more": [_given(11, "refund", 10, back(60), "posted", sale),
                         _given(12, "refund", 10, back(60), "posted", sale)],
        "what is left": [_given(11, "refund", 10, back(30), "posted", sale),
                         _given(12, "reverse", 10, back(100), "posted", sale)],
        "does not mirror": [_given(11, "refund", 10, sale, "posted", sale)],
        "unknown transfer": [_given(11, "refund", 99, back(1), None, "[]", root=99)],  # type: ignore[arg-type]
        "which was undone": [_given(11, "reverse", 10, back(100), "posted", sale),
                             _given(12, "refund", 10, back(50), "posted", sale)],
        "not a payment": [_given(11, "refund", 10, forth(5), "refund", back(5))],
        # a reversal of a 30 refund rewritten to 80, then 100 refunded
        "left of transfer 11": [
            _given(11, "refund", 10, back(30), "posted", sale),
            _given(12, "reverse", 11, forth(80), "refund", back(30), target_target=10)],
        # void, its reversal, a refund of 40, then the void undone again: 140 given back
        "again past its refunds": [
            _given(11, "reverse", 10, back(100), "posted", sale),
            _given(12, "reverse", 11, forth(100), "reverse", back(100), target_target=10),
            _given(13, "refund", 10, back(40), "posted", sale),
            _given(14, "reverse", 12, back(100), "reverse", forth(100), target_target=11)],
        # what `decide` refuses (target_not_reversible), rewritten into the journal: a hold
        # reversed, a reversal of a refund reversed, a refund of a reversed sale reversed
        "a pending, which no reversal may": [_given(11, "reverse", 10, back(100), "pending", sale)],
        "the final reversal of a refund": [
            _given(11, "refund", 10, back(30), "posted", sale),
            _given(12, "reverse", 11, forth(30), "refund", back(30), target_target=10),
            _given(13, "reverse", 12, back(30), "reverse", forth(30), target_target=11)],
        "of a transfer reversed before": [
            _given(11, "refund", 10, back(30), "posted", sale),
            _given(12, "reverse", 10, back(70), "posted", sale),
            _given(13, "reverse", 11, forth(30), "refund", back(30), target_target=10)],
    }  # fmt: skip
    for match, rows in bad.items():
        with pytest.raises(journal.Mismatch, match=match):
            _check(rows)


# --- memory: the accounts and the open holds, not the history (verify review) ---------------

_GIVE_BACK_KINDS = ("refund", "reverse")


def _long_journal(
    days: int,
) -> tuple[list[tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]], list[Account],
           list[dict[str, Any]]]:  # fmt: skip
    """A journal of `days` batches after the one that makes the accounts, each with two
    sales, a hold (the day before's posted in part or voided), a refund, a reversal of the
    day before's refund, a reversal of a sale (what refunds left) and a reversal of that
    reversal: every kind of transfer, decided by `decide_batch` as the writer would. Also the
    accounts as stored and every reversal and refund as `LedgerStore.verify` reads them:
    with its target's facts and family root, ordered by root then id."""
    view, counters = LedgerView(), IdCounters(1, 1, 1, 1, 1)
    requests: list[list[Any]] = [[
        CreateAsset("CNY", AssetKind.CURRENCY, 2, "RMB"),
        CreateAccount("CNY", "LE", "entity", "LE", "float"),
        *(CreateAccount("CNY", "LE", "store", f"s{i}", "sales") for i in range(3)),
    ]]  # fmt: skip
    batches, prev = [], journal.GENESIS_HASH
    transfers: dict[int, dict[str, Any]] = {}
    for seq in range(1, days + 2):
        day = seq - 1
        if day:
            src, store = 1, 2 + day % 3
            sales = [_move(f"sale-{day}", src, store, 1_000)]
            sales.append(_move(f"sale-b-{day}", src, store, 500))
            requests = [
                sales,
                [_move(f"hold-{day}", src, store, 300, pending=True)],
                [Refund("t", f"refund-{day}", f"sale-{day}", 100)],
            ]
            if day > 1:
                held = view.transfers_by_key[("t", f"hold-{day - 1}")].id
                close = (
                    PostPending("t", f"post-{day}", held, 200)
                    if day % 2
                    else VoidPending("t", f"void-{day}", held)
                )
                requests += [
                    [close],
                    [Reverse("t", f"unrefund-{day}", f"refund-{day - 1}")],
                    [Reverse("t", f"void-sale-{day}", f"sale-b-{day - 1}")],
                ]
            if day > 2:
                requests.append([Reverse("t", f"unvoid-{day}", f"void-sale-{day - 1}")])
        effects = decide_batch(requests, view, counters, seq=seq, now_ms=NOW + seq)
        assert all(r.ok for r in effects.results), effects.results
        overlay(view, effects)
        counters = effects.counters
        rows = _rows(effects)
        digest = journal.batch_hash(prev, seq, effects.now_ms, journal.records_of(rows))
        batches.append(({"seq": seq, "prev_hash": prev, "hash": digest,
                         "committed_at_ms": effects.now_ms}, rows))  # fmt: skip
        prev = digest
        transfers.update((t["id"], t) for t in rows["transfers"])

    def root(t: dict[str, Any]) -> int:
        while t["kind"] in _GIVE_BACK_KINDS:
            t = transfers[t["target_id"]]
        return int(t["id"])

    given = []
    for t in transfers.values():
        if t["kind"] in _GIVE_BACK_KINDS:
            target = transfers[t["target_id"]]
            given.append({**t, "target_kind": target["kind"], "root": root(t),
                          "target_target_id": target["target_id"],
                          "target_postings": target["postings"]})  # fmt: skip
    given.sort(key=lambda row: (row["root"], row["id"]))
    return batches, list(view.accounts.values()), given


def _move(key: str, debit: int, credit: int, amount: int, **extra: Any) -> CreateTransfer:
    legs = (Posting(debit, Side.DEBIT, amount), Posting(credit, Side.CREDIT, amount))
    return CreateTransfer("t", key, "CNY", legs, **extra)


def _history_state(v: journal.Verifier) -> int:
    """How many transfers the verifier holds facts of: its open holds and its family's."""
    family = (v.refunded, v.reversal_of, v.reversal_amount, v.reversal_leg, v.undone,
              v.reverses_refund, v.ever_reversed)  # fmt: skip
    return len(v.holds) + sum(len(known) for known in family)


def test_the_verifier_holds_the_accounts_and_open_holds_never_the_history() -> None:
    """A journal ten times as long leaves the verifier holding as much: per account its
    balance and what it is, the open hold, and the give-backs of one family at a time (the
    verifier of the second review kept every refund and reversal it ever saw)."""
    held = {}
    for days in (12, 120):
        batches, accounts, given = _long_journal(days)
        v = journal.Verifier()
        for header, rows in batches:
            v.batch(header, rows)
        v.accounts(accounts)
        assert len(v.holds) == 1  # the last day's, still open
        most = 0
        for row in given:
            v.given_back(row)
            most = max(most, _history_state(v))
        assert len(given) == 4 * days - 4
        assert len(v.balances) == len(v.infos) == len(accounts) == 4
        held[days] = most
    # a family here is a sale with a refund and its reversal, or a sale reversed and
    # restored: two give-backs, a few facts each (the open hold besides)
    assert held[120] == held[12] <= 10


def test_give_backs_must_come_grouped_by_family_and_each_checked_against_its_own() -> None:
    _, _, given = _long_journal(6)
    families = sorted({row["root"] for row in given})
    v = journal.Verifier()
    last = [row for row in given if row["root"] == families[-1]]
    for row in last:
        v.given_back(row)
    assert v.given_backs == len(last)
    with pytest.raises(ValueError, match="after family"):  # the reader's order, not a tamper
        v.given_back(given[0])
    # a refund of the last family past what its sale moved: the family's facts are its own
    v = journal.Verifier()
    refund = next(row for row in last if row["kind"] == "refund")
    for row in given:
        v.given_back(row)
    with pytest.raises(journal.Mismatch, match="refunds more than"):
        v.given_back({**refund, "id": refund["id"] + 10_000,
                      "postings": refund["target_postings"].replace("debit", "x")
                      .replace("credit", "debit").replace("x", "credit")})  # fmt: skip


def test_a_give_back_of_a_later_transfer_is_a_mismatch() -> None:
    sale = _legs((1, "debit", 100), (2, "credit", 100))
    back = _legs((1, "credit", 100), (2, "debit", 100))
    with pytest.raises(journal.Mismatch, match="transfer 11: gives back transfer 12, which is not"):
        _check([_given(11, "reverse", 12, back, "posted", sale, root=12)])


def test_the_accounts_check_keeps_a_byte_per_account_and_names_the_first_missing() -> None:
    batches, accounts, _ = _long_journal(2)
    v = journal.Verifier()
    for header, rows in batches:
        v.batch(header, rows)
    v.accounts(reversed(accounts))  # any order
    v.accounts(accounts)  # and again: it forgets which it saw
    with pytest.raises(journal.Mismatch, match="account 2: in the journal but not stored"):
        v.accounts([a for a in accounts if a.id not in (2, 4)])
    with pytest.raises(journal.Mismatch, match="account 1: in the journal but not stored"):
        v.accounts([])
