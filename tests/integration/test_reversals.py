"""Reversals and refunds over HTTP, on SQLite and PostgreSQL: what they move, what they
refuse, what they keep under their keys, under concurrency, and what the database and
`cardcore ledger verify` hold of them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc, text

from cardcore.db import make_engine
from cardcore.ledger import journal
from tests.helpers import (
    ApiClient,
    account_json,
    post_ops,
    run_cardcore,
    sql_execute,
    sql_rows,
    transfer_json,
)

CLIENT = "pos"
FUNDS = 10_000
TOMBSTONE = "reversed_before_arrival"


async def setup(api: ApiClient) -> dict[str, int]:
    """CNY; a float that may go negative; a card wallet funded with FUNDS; a shop without
    floor; a shop with a floor (no_overdraft) and a fee account."""
    asset = {"op": "create_asset", "code": "CNY", "kind": "currency", "scale": 2, "name": "RMB"}
    assert (await post_ops(api, [asset]))[0]["status"] == "ok"
    names = ("float", "card", "shop", "guarded", "fee")
    created = await post_ops(
        api,
        [
            account_json("LE1", "float", owner_kind="entity"),
            account_json("C1", "stored_value", flags={"no_overdraft": True}),
            account_json("S1", "sales", owner_kind="store"),
            account_json("S2", "sales", owner_kind="store", flags={"no_overdraft": True}),
            account_json("LE1", "fees", owner_kind="entity"),
        ],
    )
    ids = {name: int(r["account_id"]) for name, r in zip(names, created, strict=True)}
    funded = await post_ops(api, [transfer_json("fund", ids["float"], ids["card"], FUNDS)], "setup")
    assert funded[0]["status"] == "ok", funded
    return ids


def reverse(key: str, target: str, *, tombstone: bool = False, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "reverse", "key": key, "target_key": target, **extra}
    if tombstone:
        op["tombstone"] = True
    return op


def refund(key: str, target: str, amount: Any, **extra: Any) -> dict[str, Any]:
    return {"op": "refund", "key": key, "target_key": target, "amount": amount, **extra}


async def run(api: ApiClient, *ops: dict[str, Any], client: str = CLIENT) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = await post_ops(api, list(ops), client)
    return results


async def one(
    api: ApiClient, op: dict[str, Any], code: str = "ok", client: str = CLIENT
) -> dict[str, Any]:
    [result] = await run(api, op, client=client)
    assert result["code"] == code, result
    return result


async def account(api: ApiClient, account_id: int) -> dict[str, Any]:
    response = await api.get(f"/internal/v1/accounts/{account_id}")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def nets(api: ApiClient, ids: dict[str, int]) -> dict[str, int]:
    """credits_posted - debits_posted of every account."""
    out = {}
    for name, aid in ids.items():
        a = await account(api, aid)
        out[name] = a["credits_posted"] - a["debits_posted"]
    return out


async def versions(api: ApiClient, ids: dict[str, int]) -> dict[str, int]:
    return {name: (await account(api, aid))["version"] for name, aid in ids.items()}


async def count(db_url: str, table: str) -> int:
    [row] = await sql_rows(db_url, f"SELECT count(*) AS n FROM {table}")  # noqa: S608
    return int(row["n"])


def sale(ids: dict[str, int], key: str, amount: int, **extra: Any) -> dict[str, Any]:
    return transfer_json(key, ids["card"], ids["shop"], amount, **extra)


async def test_reverse_moves_every_leg_back_once_and_keeps_its_key(
    api: ApiClient, db_url: str
) -> None:
    ids = await setup(api)
    before = await nets(api, ids)
    clearing = {
        "op": "transfer",
        "key": "T1/000001/000123",
        "asset": "CNY",
        "reason": "purchase",
        "postings": [
            {"account_id": ids["card"], "side": "debit", "amount": 2_500},
            {"account_id": ids["shop"], "side": "credit", "amount": 2_500},
            {"account_id": ids["float"], "side": "debit", "amount": 2_500},
            {"account_id": ids["fee"], "side": "credit", "amount": 2_500},
        ],
    }
    target = await one(api, clearing)
    assert (await nets(api, ids))["card"] == FUNDS - 2_500

    rev = await one(api, reverse("T1/000001/000124", "T1/000001/000123", reason="void"))
    assert rev["status"] == "ok" and "replayed" not in rev
    assert isinstance(rev["transfer_id"], int) and rev["transfer_id"] != target["transfer_id"]
    assert rev["asset"] == "CNY" and rev["seq"] > target["seq"]
    assert await nets(api, ids) == before

    [row] = await sql_rows(
        db_url,
        "SELECT kind, target_id, postings, reason FROM ledger_transfers WHERE id = :id",
        id=rev["transfer_id"],
    )
    assert (row["kind"], row["target_id"], row["reason"]) == (
        "reverse",
        target["transfer_id"],
        "void",
    )
    swapped = [
        (p.account_id, str(p.side), p.amount) for p in journal.postings_from_json(row["postings"])
    ]
    assert swapped == [
        (ids["card"], "credit", 2_500),
        (ids["shop"], "debit", 2_500),
        (ids["float"], "credit", 2_500),
        (ids["fee"], "debit", 2_500),
    ]
    entries = await sql_rows(
        db_url,
        "SELECT account_id, side, posted_delta, pending_delta FROM ledger_entries "
        "WHERE transfer_id = :id ORDER BY id",
        id=rev["transfer_id"],
    )
    assert [
        (e["account_id"], e["side"], e["posted_delta"], e["pending_delta"]) for e in entries
    ] == [
        (ids["card"], "credit", 2_500, 0),
        (ids["shop"], "debit", 2_500, 0),
        (ids["float"], "credit", 2_500, 0),
        (ids["fee"], "debit", 2_500, 0),
    ]
    page = await (
        await api.get(f"/internal/v1/accounts/{ids['card']}/entries?order=desc&limit=1")
    ).json()
    [newest] = page["entries"]
    assert (newest["transfer_id"], newest["transfer_kind"], newest["side"]) == (
        rev["transfer_id"],
        "reverse",
        "credit",
    )
    assert newest["credits_posted"] - newest["debits_posted"] == FUNDS
    [event] = await sql_rows(
        db_url, "SELECT event FROM ledger_outbox WHERE transfer_id = :id", id=rev["transfer_id"]
    )
    assert event["event"] == "transfer.reversed"
    journal_page = await (await api.get(f"/internal/v1/journal?after={rev['seq'] - 1}")).json()
    [stored] = journal_page["batches"][0]["transfers"]
    assert stored["target_id"] == target["transfer_id"]

    # The same key again: the first answer, replayed, and no second effect.
    settled = await versions(api, ids)
    again = await one(api, reverse("T1/000001/000124", "T1/000001/000123", reason="void"))
    assert again == {**rev, "replayed": True}
    # The same key naming another target.
    await one(api, sale(ids, "sale-2", 100))
    other = await one(
        api,
        reverse("T1/000001/000124", "sale-2", reason="void"),
        "exists_with_different_target_key",
    )
    assert other["field"] == "target_key"
    # A second reverse of the target under a new key: refused, and kept under that key.
    second = await one(
        api, reverse("T1/000001/000125", "T1/000001/000123"), "target_already_reversed"
    )
    assert second["field"] == "target_key"
    retry = await one(api, reverse("T1/000001/000125", "T1/000001/000123"), "id_already_failed")
    assert retry["original_code"] == "target_already_reversed" and retry["replayed"] is True
    after = await versions(api, ids)
    assert {k: v for k, v in after.items() if k not in ("card", "shop")} == {
        k: v for k, v in settled.items() if k not in ("card", "shop")
    }
    assert (after["card"], after["shop"]) == (settled["card"] + 1, settled["shop"] + 1)  # sale-2
    [reversals] = await sql_rows(
        db_url,
        "SELECT count(*) AS n FROM ledger_transfers WHERE kind = 'reverse' AND target_id = :t",
        t=target["transfer_id"],
    )
    assert reversals["n"] == 1
    # Keys are scoped by client: another client cannot see the target.
    await one(api, reverse("r-other", "T1/000001/000123"), "target_not_found", client="other")


async def test_tombstoning_reverse(api: ApiClient, db_url: str) -> None:
    ids = await setup(api)
    await one(api, sale(ids, "sale-1", 1_000))
    await one(api, reverse("void-1", "sale-1"))
    await one(api, sale(ids, "too-big", FUNDS + 1), "exceeds_credits")
    settled = await versions(api, ids)
    transfers = await count(db_url, "ledger_transfers")

    # Already reversed, or failed: ok, nothing more.
    done = await one(api, reverse("auto-1", "sale-1", tombstone=True))
    failed = await one(api, reverse("auto-2", "too-big", tombstone=True))
    assert done["status"] == failed["status"] == "ok"
    assert await count(db_url, "ledger_transfers") == transfers
    retry = await one(api, sale(ids, "too-big", FUNDS + 1), "id_already_failed")
    assert retry["original_code"] == "exceeds_credits"

    # Never seen: ok, and the target key is tombstoned for ever.
    tomb = await one(api, reverse("T1/000002/000007", "T1/000002/000006", tombstone=True))
    assert tomb["status"] == "ok" and "transfer_id" not in tomb
    [row] = await sql_rows(
        db_url,
        "SELECT code, seq FROM ledger_failures WHERE client = :c AND key = :k",
        c=CLIENT,
        k="T1/000002/000006",
    )
    assert (row["code"], row["seq"]) == (TOMBSTONE, tomb["seq"])
    late = await one(api, sale(ids, "T1/000002/000006", 700), "id_already_failed")
    assert late["original_code"] == TOMBSTONE and late["replayed"] is True
    assert late["message"]
    # A duplicate tombstoning reverse, under the same key or a new one: ok, nothing more.
    await one(api, reverse("T1/000002/000007", "T1/000002/000006", tombstone=True))
    await one(api, reverse("T1/000002/000008", "T1/000002/000006", tombstone=True))
    late = await one(api, sale(ids, "T1/000002/000006", 700), "id_already_failed")
    assert late["original_code"] == TOMBSTONE
    [tombs] = await sql_rows(
        db_url, "SELECT count(*) AS n FROM ledger_failures WHERE code = :c", c=TOMBSTONE
    )
    assert tombs["n"] == 1

    # Without tombstone, an unknown key is an error, kept.
    await one(api, reverse("void-9", "never-seen"), "target_not_found")
    kept = await one(api, reverse("void-9", "never-seen"), "id_already_failed")
    assert kept["original_code"] == "target_not_found"
    # ... and leaves no tombstone: the original may still come.
    await one(api, sale(ids, "never-seen", 10))

    assert await count(db_url, "ledger_transfers") == transfers + 1
    final = await versions(api, ids)
    assert (final["card"], final["shop"]) == (settled["card"] + 1, settled["shop"] + 1)
    assert (await nets(api, ids))["card"] == FUNDS - 10


async def test_refunds_accumulate_and_never_exceed_the_target(api: ApiClient, db_url: str) -> None:
    ids = await setup(api)
    await one(api, sale(ids, "sale-1", 1_000))
    r1 = await one(api, refund("ref-1", "sale-1", 300))
    r2 = await one(api, refund("ref-2", "sale-1", 500))
    assert (await nets(api, ids))["card"] == FUNDS - 200
    [row] = await sql_rows(
        db_url, "SELECT kind, target_id FROM ledger_transfers WHERE id = :id", id=r2["transfer_id"]
    )
    assert row["kind"] == "refund"
    settled = await versions(api, ids)
    over = await one(api, refund("ref-3", "sale-1", 201), "exceeds_refundable_amount")
    assert over["field"] == "amount"
    assert await versions(api, ids) == settled
    assert (await one(api, refund("ref-3", "sale-1", 201), "id_already_failed"))[
        "original_code"
    ] == "exceeds_refundable_amount"
    # Replays and the same key with another amount.
    assert (await one(api, refund("ref-1", "sale-1", 300))) == {**r1, "replayed": True}
    await one(api, refund("ref-1", "sale-1", 299), "exists_with_different_amount")

    # Reversing a refund puts its amount back: 500 may be refunded again.
    await one(api, reverse("rev-ref-2", "ref-2"))
    assert (await nets(api, ids))["card"] == FUNDS - 700
    await one(api, reverse("rev-ref-2b", "ref-2"), "target_already_reversed")
    await one(api, refund("ref-4", "sale-1", 600))
    await one(api, refund("ref-5", "sale-1", 101), "exceeds_refundable_amount")
    # Reverse after partial refunds: only the rest (100).
    rev = await one(api, reverse("rev-1", "sale-1"))
    [moved] = await sql_rows(
        db_url,
        "SELECT posted_delta FROM ledger_entries WHERE transfer_id = :id AND account_id = :a",
        id=rev["transfer_id"],
        a=ids["card"],
    )
    assert moved["posted_delta"] == 100
    assert (await nets(api, ids))["card"] == FUNDS
    assert (await nets(api, ids))["shop"] == 0
    await one(api, refund("ref-6", "sale-1", 1), "target_already_reversed")


async def test_reverse_after_full_refunds_and_unrefundable_targets(api: ApiClient) -> None:
    ids = await setup(api)
    await one(api, sale(ids, "sale-1", 1_000))
    await one(api, refund("ref-1", "sale-1", 400))
    await one(api, refund("ref-2", "sale-1", 600))
    await one(api, reverse("rev-1", "sale-1"), "target_already_refunded")
    settled = await versions(api, ids)
    await one(api, reverse("auto-1", "sale-1", tombstone=True))
    assert await versions(api, ids) == settled

    hold = await one(api, sale(ids, "hold-1", 300, pending=True))
    hold2 = await one(api, sale(ids, "hold-2", 200, pending=True))
    await one(api, {"op": "void_pending", "key": "void-2", "pending_id": hold2["transfer_id"]})
    await one(api, {"op": "post_pending", "key": "post-1", "pending_id": hold["transfer_id"]})
    await one(api, sale(ids, "sale-3", 50))
    await one(api, reverse("rev-3", "sale-3"))
    split = {
        "op": "transfer",
        "key": "split-1",
        "asset": "CNY",
        "postings": [
            {"account_id": ids["card"], "side": "debit", "amount": 1_000},
            {"account_id": ids["shop"], "side": "credit", "amount": 970},
            {"account_id": ids["fee"], "side": "credit", "amount": 30},
        ],
    }
    await one(api, split)
    settled = await versions(api, ids)
    results = await run(
        api,
        *(refund(f"r-{t}", t, 1) for t in ("hold-1", "hold-2", "void-2", "rev-3")),
        *(reverse(f"v-{t}", t) for t in ("hold-1", "void-2")),
        refund("r-split", "split-1", 10),
        reverse("v-split", "split-1"),
        reverse("v-split-t", "split-1", tombstone=True),
    )
    assert [r["code"] for r in results] == ["target_not_reversible"] * 6 + [
        "target_not_uniform"
    ] * 3
    assert all(r["field"] == "target_key" for r in results)
    assert await versions(api, ids) == settled
    # A post moved posted balances: it may be refunded.
    await one(api, refund("r-post", "post-1", 300))


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        (0, "amount_must_be_positive"),
        (-1, "amount_must_be_positive"),
        (2**63, "amount_too_large"),
        ("5", "wrong_type"),
        (1.5, "wrong_type"),
        (None, "missing_field"),
    ],
)
async def test_bad_refund_amount_is_a_400_with_a_stable_code(
    api: ApiClient, amount: Any, code: str
) -> None:
    op = refund("ref-bad", "sale-1", amount)
    if amount is None:
        del op["amount"]
    response = await api.post(
        "/internal/v1/ops", json={"client": CLIENT, "ops": [transfer_json("x", 1, 2, 1), op]}
    )
    body = await response.json()
    assert response.status == 400, body
    assert body["error"]["code"] == code
    assert body["error"]["field"] == "ops[1].amount"


@pytest.mark.parametrize(
    ("op", "code", "field"),
    [
        ({"op": "reverse", "key": "r"}, "missing_field", "ops[0].target_key"),
        ({**reverse("r", "t"), "tombstone": "yes"}, "wrong_type", "ops[0].tombstone"),
        ({**reverse("r", "t"), "tombstone": 1}, "wrong_type", "ops[0].tombstone"),
        (reverse("r", "t", amount=5), "unknown_field", "ops[0].amount"),
        (refund("r", "t", 5, tombstone=True), "unknown_field", "ops[0].tombstone"),
        (reverse("r", "bad key"), "invalid_characters", "ops[0].target_key"),
        (reverse("r", ""), "empty_string", "ops[0].target_key"),  # as an empty key
        (reverse("r", "k" * 129), "string_too_long", "ops[0].target_key"),
    ],
)
async def test_bad_reverse_and_refund_shapes_are_400(
    api: ApiClient, op: dict[str, Any], code: str, field: str
) -> None:
    response = await api.post("/internal/v1/ops", json={"client": CLIENT, "ops": [op]})
    body = await response.json()
    assert response.status == 400, body
    assert (body["error"]["code"], body["error"]["field"]) == (code, field)


async def test_frozen_accounts_do_not_stop_a_reverse_but_floors_do(api: ApiClient) -> None:
    ids = await setup(api)
    await one(api, sale(ids, "sale-1", 1_000))
    await one(api, sale(ids, "sale-2", 1_000))
    await one(api, sale(ids, "sale-3", 1_000))
    freeze = {"op": "set_account_frozen", "account_id": ids["card"], "debit_frozen": True}
    await one(api, freeze)
    await one(api, sale(ids, "sale-4", 1), "debit_account_frozen")
    await one(api, reverse("rev-1", "sale-1"))
    await one(api, {**freeze, "debit_frozen": False, "credit_frozen": True})
    await one(api, transfer_json("top-up", ids["float"], ids["card"], 1), "credit_account_frozen")
    await one(api, reverse("rev-2", "sale-2"))
    await one(api, refund("ref-3", "sale-3", 250))
    card = await account(api, ids["card"])
    assert card["flags"]["credit_frozen"] is True
    assert card["credits_posted"] - card["debits_posted"] == FUNDS - 750

    # A shop with a floor that was paid out cannot give back more than it holds.
    guarded = transfer_json("sale-g", ids["float"], ids["guarded"], 1_000)
    await one(api, guarded)
    await one(api, transfer_json("payout", ids["guarded"], ids["float"], 800))
    settled = await versions(api, ids)
    results = await run(api, reverse("rev-g", "sale-g"), refund("ref-g", "sale-g", 201))
    assert [(r["code"], r["field"]) for r in results] == [
        ("exceeds_credits", "postings[1].account_id"),
        ("exceeds_credits", "postings[1].account_id"),
    ]
    assert await versions(api, ids) == settled
    await one(api, refund("ref-g2", "sale-g", 200))


async def test_linked_group_failure_rolls_back_the_reverse(api: ApiClient, db_url: str) -> None:
    ids = await setup(api)
    await one(api, sale(ids, "sale-1", 1_000))
    await one(api, refund("ref-1", "sale-1", 100))
    settled = await versions(api, ids)
    results = await run(
        api,
        refund("ref-2", "sale-1", 50, linked=True),
        reverse("rev-1", "sale-1", linked=True),
        sale(ids, "too-big", FUNDS * 2),
    )
    assert [r["code"] for r in results] == [
        "linked_event_failed",
        "linked_event_failed",
        "exceeds_credits",
    ]
    assert await versions(api, ids) == settled
    [rows] = await sql_rows(
        db_url, "SELECT count(*) AS n FROM ledger_transfers WHERE kind = 'reverse'"
    )
    assert rows["n"] == 0
    rev = await one(api, reverse("rev-1", "sale-1"))  # linked_event_failed is not kept
    [moved] = await sql_rows(
        db_url,
        "SELECT posted_delta FROM ledger_entries WHERE transfer_id = :id AND account_id = :a",
        id=rev["transfer_id"],
        a=ids["card"],
    )
    assert moved["posted_delta"] == 900
    assert (await nets(api, ids))["card"] == FUNDS


async def test_tombstone_of_a_failed_linked_group_is_not_written(
    api: ApiClient, db_url: str
) -> None:
    ids = await setup(api)
    results = await run(
        api,
        reverse("auto-1", "late-1", tombstone=True, linked=True),
        sale(ids, "too-big", FUNDS * 2),
    )
    assert [r["code"] for r in results] == ["linked_event_failed", "exceeds_credits"]
    tombs = await sql_rows(db_url, "SELECT key FROM ledger_failures WHERE code = :c", c=TOMBSTONE)
    assert tombs == []
    await one(api, sale(ids, "late-1", 100))


async def test_rolled_back_tombstone_cannot_poison_its_batch(api: ApiClient) -> None:
    ids = await setup(api)
    ops = [
        reverse("auto-1", "late-1", tombstone=True, linked=True),
        sale(ids, "too-big", FUNDS * 2),
        sale(ids, "late-1", FUNDS * 2),
    ]
    response = await api.post("/internal/v1/ops", json={"client": CLIENT, "ops": ops})
    body = await response.json()
    assert response.status == 200, body
    assert [r["code"] for r in body["results"]] == [
        "linked_event_failed",
        "exceeds_credits",
        "exceeds_credits",
    ]


async def test_tombstoning_reverse_keeps_its_key(api: ApiClient) -> None:
    ids = await setup(api)
    await one(api, sale(ids, "sale-1", 1_000))
    await one(api, reverse("auto-1", "late-1", tombstone=True))
    settled = await versions(api, ids)
    await one(api, reverse("auto-1", "sale-1"), "exists_with_different_target_key")
    assert await versions(api, ids) == settled


async def test_original_and_reverse_in_one_request(api: ApiClient) -> None:
    ids = await setup(api)
    results = await run(api, sale(ids, "sale-1", 1_000), reverse("rev-1", "sale-1"))
    assert [r["code"] for r in results] == ["ok", "ok"]
    assert results[0]["seq"] == results[1]["seq"]
    assert (await nets(api, ids))["card"] == FUNDS
    await one(api, reverse("rev-2", "sale-1"), "target_already_reversed")

    results = await run(
        api,
        reverse("auto-1", "late-1", tombstone=True),
        sale(ids, "late-1", 1_000),
        reverse("auto-2", "late-1", tombstone=True),
    )
    assert [r["code"] for r in results] == ["ok", "id_already_failed", "ok"]
    assert results[1]["original_code"] == TOMBSTONE
    assert (await nets(api, ids))["card"] == FUNDS
    late = await one(api, sale(ids, "late-1", 1_000), "id_already_failed")
    assert late["original_code"] == TOMBSTONE


async def test_concurrent_reverses_of_one_target_apply_once(api: ApiClient, db_url: str) -> None:
    ids = await setup(api)
    target = await one(api, sale(ids, "sale-1", 2_000))
    await one(api, sale(ids, "sale-2", 2_000))

    async def send(key: str, target_key: str, i: int) -> list[dict[str, Any]]:
        response = await api.post(
            "/internal/v1/ops",
            json={"client": CLIENT, "ops": [reverse(f"{key}-{i}", target_key)]},
        )
        body = await response.json()
        assert response.status == 200, body
        results: list[dict[str, Any]] = body["results"]
        return results

    answers = await asyncio.gather(*(send("rev", "sale-1", i) for i in range(20)))
    got = sorted(r["code"] for [r] in answers)
    assert got == ["ok"] + ["target_already_reversed"] * 19
    assert (await nets(api, ids))["card"] == FUNDS - 2_000
    [rows] = await sql_rows(
        db_url,
        "SELECT count(*) AS n FROM ledger_transfers WHERE kind = 'reverse' AND target_id = :t",
        t=target["transfer_id"],
    )
    assert rows["n"] == 1

    async def give(i: int) -> dict[str, Any]:
        [result] = await run(api, refund(f"ref-{i}", "sale-2", 201))
        return result

    refunds = await asyncio.gather(*(give(i) for i in range(20)))
    ok = [r for r in refunds if r["code"] == "ok"]
    assert len(ok) == 9  # 9 * 201 = 1809 <= 2000 < 10 * 201
    assert all(r["code"] == "exceeds_refundable_amount" for r in refunds if r not in ok)
    [total] = await sql_rows(
        db_url,
        "SELECT count(*) AS n FROM ledger_transfers WHERE kind = 'refund'",
    )
    assert total["n"] == 9
    assert (await nets(api, ids))["card"] == FUNDS - 2_000 + 9 * 201


async def test_verify_passes_after_reversals_and_refunds(
    api: ApiClient, db_url: str, tmp_path: Path
) -> None:
    ids = await setup(api)
    await run(
        api,
        sale(ids, "sale-1", 1_000),
        sale(ids, "sale-2", 1_000),
        refund("ref-1", "sale-2", 300),
        reverse("auto-1", "late-1", tombstone=True),
    )
    await run(api, reverse("rev-1", "sale-1"), refund("ref-2", "sale-2", 200))
    await run(api, reverse("rev-ref-1", "ref-1"), sale(ids, "late-1", 5))
    await run(api, reverse("rev-2", "sale-2"), refund("ref-x", "sale-1", 1))
    await run(api, reverse("rev-1b", "sale-1", linked=True), sale(ids, "too-big", FUNDS * 2))
    assert (await nets(api, ids))["card"] == FUNDS

    done = await asyncio.to_thread(
        run_cardcore, "ledger", "verify", "--db", db_url, cwd=tmp_path, timeout_s=120
    )
    assert done.returncode == 0, done
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["status"] == "ok"
    assert summary["batches"] == await count(db_url, "ledger_batches")


async def test_database_refuses_a_second_reverse_of_one_target(api: ApiClient, db_url: str) -> None:
    ids = await setup(api)
    await one(api, sale(ids, "sale-1", 1_000))
    await one(api, refund("ref-1", "sale-1", 100))
    await one(api, reverse("rev-1", "sale-1"))
    columns = journal.COLUMNS["transfers"]
    assert "target_id" in columns
    picked = ", ".join(
        "id + 1000000" if c == "id" else "key || '-copy'" if c == "key" else c for c in columns
    )

    def copy_of(kind: str) -> str:
        return (
            f"INSERT INTO ledger_transfers ({', '.join(columns)}) "  # noqa: S608
            f"SELECT {picked} FROM ledger_transfers WHERE kind = '{kind}'"
        )

    with pytest.raises(
        exc.IntegrityError, match=r"ledger_transfers\.target_id|uq_ledger_transfers_reversed_once"
    ):
        await sql_execute(db_url, copy_of("reverse"))
    # The append-only triggers allow an INSERT, and the index is partial: a second refund
    # row of the same target is accepted (then rolled back, to leave the journal intact).
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            trans = await conn.begin()
            inserted = await conn.execute(text(copy_of("refund")))
            assert inserted.rowcount == 1
            await trans.rollback()
    finally:
        await engine.dispose()
    assert await count(db_url, "ledger_transfers") == 4
