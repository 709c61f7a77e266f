"""Helpers shared by the test layers (not fixtures: those live in conftest.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from cardcore.ledger.model import (
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    Posting,
    Side,
)
from cardcore.ledger.service import Ledger

ApiClient = TestClient[web.Request, web.Application]


async def post_ops(api: ApiClient, ops: list[dict[str, Any]], client: str = "test") -> Any:
    """POST the ops and return the decoded JSON body (asserting HTTP 200)."""
    response = await api.post("/internal/v1/ops", json={"client": client, "ops": ops})
    body = await response.json()
    assert response.status == 200, body
    return body["results"]


def transfer_json(key: str, debit: int, credit: int, amount: int, **extra: Any) -> dict[str, Any]:
    return {
        "op": "transfer",
        "key": key,
        "asset": extra.pop("asset", "CNY"),
        "postings": [
            {"account_id": debit, "side": "debit", "amount": amount},
            {"account_id": credit, "side": "credit", "amount": amount},
        ],
        **extra,
    }


def move(key: str, debit: int, credit: int, amount: int, **extra: Any) -> CreateTransfer:
    return CreateTransfer(
        client=extra.pop("client", "test"),
        key=key,
        asset=extra.pop("asset", "CNY"),
        postings=(Posting(debit, Side.DEBIT, amount), Posting(credit, Side.CREDIT, amount)),
        **extra,
    )


async def setup_accounts(ledger: Ledger, wallets: int, funding: int = 0) -> tuple[int, list[int]]:
    """CNY, a source account that may go negative, and `wallets` no-overdraft accounts,
    each funded with `funding` fen. Returns (source id, wallet ids)."""
    await ledger.submit([CreateAsset("CNY", AssetKind.CURRENCY, 2, "Renminbi")])
    results = await ledger.submit(
        [CreateAccount("CNY", "LE1", "entity", "LE1", "float")]
        + [
            CreateAccount(
                "CNY", "LE1", "card", f"c{i}", "stored_value", AccountFlags(no_overdraft=True)
            )
            for i in range(wallets)
        ]
    )
    ids = [r.account_id for r in results]
    assert all(i is not None for i in ids), results
    source, wallet_ids = ids[0], ids[1:]
    assert source is not None
    if funding:
        funded = await ledger.submit(
            [move(f"fund-{w}", source, w, funding, client="setup") for w in wallet_ids if w]
        )
        assert all(r.ok for r in funded), funded
    return source, [w for w in wallet_ids if w is not None]
