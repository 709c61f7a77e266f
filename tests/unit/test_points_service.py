"""The points service's pure helpers: multi-lot moves split to the ledger's leg bound, rule
scope and visibility, tier definitions as JSON, the basket an earning sees, history lines."""

from __future__ import annotations

from typing import Any

import pytest

from cardcore import limits
from cardcore.cards.model import Kind, PosRequest, Terminal
from cardcore.ledger.model import CreateTransfer, Posting, Side
from cardcore.org.model import Principal, Role, Scope, ScopeKind
from cardcore.points import model
from cardcore.points.service import (
    _basket,
    _history_view,
    again,
    applies_at,
    chunk_key,
    split,
    tiers_json,
    tiers_of,
    visible,
)


def _debits(n: int) -> list[Posting]:
    return [Posting(100 + i, Side.DEBIT, i + 1) for i in range(n)]


@pytest.mark.parametrize("lots", [1, 15, 16, 30, 31, 100])
def test_a_multi_lot_move_is_linked_transfers_within_the_leg_bound(lots: int) -> None:
    ops = split("pos", "K:p", "PTS", _debits(lots), 9, reason="points_redeem", metadata=())
    transfers = [op for op in ops if isinstance(op, CreateTransfer)]
    assert len(transfers) == len(ops) == -(-lots // (limits.POSTINGS_PER_TRANSFER_MAX - 1))
    assert [t.key for t in transfers] == [chunk_key("K:p", i) for i in range(len(ops))]
    assert transfers[0].key == "K:p"
    assert all(len(t.postings) <= limits.POSTINGS_PER_TRANSFER_MAX for t in transfers)
    for t in transfers:  # each balances by itself, into the one credit account
        debits = sum(p.amount for p in t.postings if p.side is Side.DEBIT)
        credits = [p for p in t.postings if p.side is Side.CREDIT]
        assert [c.account_id for c in credits] == [9]
        assert credits[0].amount == debits
    assert [t.linked for t in transfers] == [True] * (len(ops) - 1) + [False]
    moved = [p for t in transfers for p in t.postings if p.side is Side.DEBIT]
    assert moved == _debits(lots)  # every lot once, in plan order


def test_a_split_followed_by_another_op_stays_linked_to_it() -> None:
    ops = split("pos", "K:p", "PTS", _debits(3), 9, reason="r", metadata=(),
                client_link_last=True)  # fmt: skip
    assert [op.linked for op in ops] == [True]


def test_stored_transfers_are_submitted_again_as_they_were() -> None:
    stored = [
        {
            "asset": "PTS",
            "reason": "points_redeem",
            "postings": [(1, "debit", 5), (2, "credit", 5)],
        },
        {
            "asset": "PTS",
            "reason": "points_redeem",
            "postings": [(3, "debit", 2), (2, "credit", 2)],
        },
    ]
    made = again(stored, "pos", ["K:p", "K:p.2"], (("store", "S1"),))
    ops = [op for op in made if isinstance(op, CreateTransfer)]
    assert len(ops) == len(made)
    assert [op.key for op in ops] == ["K:p", "K:p.2"]
    assert [op.linked for op in ops] == [True, False]
    assert ops[1].postings == (Posting(3, Side.DEBIT, 2), Posting(2, Side.CREDIT, 2))


def _terminal(store: str, entity: str) -> Terminal:
    return Terminal("T0000001", "M", store, entity, "aes", "00", "active", "000001", 0, 1, 2)


def _rule(entity: str, store: str, state: str = "active") -> dict[str, Any]:
    return {"legal_entity": entity, "store": store, "state": state}


def test_a_store_sees_the_groups_its_entitys_and_its_own_active_rules() -> None:
    t = _terminal("S1", "LE1")
    assert applies_at(_rule("", ""), t)
    assert applies_at(_rule("LE1", ""), t)
    assert applies_at(_rule("LE1", "S1"), t)
    assert not applies_at(_rule("LE2", ""), t)
    assert not applies_at(_rule("LE1", "S2"), t)
    assert not applies_at(_rule("", "", "retired"), t)


def _principal(kind: ScopeKind, scope_id: str, entity: str) -> Principal:
    role = Role.STORE_CRM if kind is ScopeKind.STORE else Role.HQ_MARKETING
    return Principal(1, "u", 1, role, Scope(kind, scope_id), entity)


def test_a_rule_is_visible_within_the_readers_scope_only() -> None:
    group = _principal(ScopeKind.GROUP, "", "")
    entity = _principal(ScopeKind.ENTITY, "LE1", "LE1")
    store = _principal(ScopeKind.STORE, "S1", "LE1")
    rules = [_rule("", ""), _rule("LE1", ""), _rule("LE1", "S1"), _rule("LE1", "S2"),
             _rule("LE2", "")]  # fmt: skip
    assert [visible(group, r) for r in rules] == [True] * 5
    assert [visible(entity, r) for r in rules] == [True, True, True, True, False]
    assert [visible(store, r) for r in rules] == [True, True, True, False, False]


def test_tiers_round_trip_through_json_and_none_stays_none() -> None:
    policy = model.TierPolicy(
        (model.Tier("SILVER", 0, 100), model.Tier("GOLD", 1000, 150)),
        model.TierBasis.SPEND_FEN,
        model.TierPeriod.CALENDAR_QUARTER,
        model.Downgrade.NEVER,
    )
    assert tiers_of(tiers_json(policy)) == policy
    assert tiers_json(None) is None
    assert tiers_of(None) is None
    assert tiers_of({"ladder": [{"code": "A", "threshold": 0, "multiplier_pct": 100}]}) == (
        model.TierPolicy((model.Tier("A", 0, 100),))
    )


def test_an_earning_sees_the_department_lines_only_when_they_fit_the_amount() -> None:
    r = PosRequest(Kind.PURCHASE, "T0000001", basket=(("FOOD", 600), ("TOYS", 300)))
    fits = _basket(r, 1_000)
    assert fits.amount_fen == 1_000
    assert [(x.department, x.amount_fen) for x in fits.lines] == [("FOOD", 600), ("TOYS", 300)]
    assert not model.check_basket(fits)
    taken_less = _basket(r, 800)  # a split tender took less than the lines
    assert (taken_less.amount_fen, taken_less.lines) == (800, ())
    assert _basket(PosRequest(Kind.PURCHASE, "T0000001"), 500).lines == ()


@pytest.mark.parametrize(
    ("purpose", "side", "points"),
    [("lot:20270228:0", "credit", 40), ("lot:20270228:0", "debit", -40),
     ("debt", "debit", 40), ("debt", "credit", -40)],
)  # fmt: skip
def test_a_history_line_says_what_the_lot_gained_or_the_debt_grew(
    purpose: str, side: str, points: int
) -> None:
    entry = {"id": 1, "transfer_id": 2, "account_id": 7, "side": side, "posted_delta": 40}
    line = _history_view(entry, {"reason": "r", "created_at_ms": 5}, {7: purpose})
    assert line["points"] == points
    assert line["account"] == ("debt" if purpose == "debt" else purpose)
