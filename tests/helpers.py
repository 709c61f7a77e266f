"""Helpers shared by the test layers (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import socket
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


def account_json(owner_id: str, purpose: str, **extra: Any) -> dict[str, Any]:
    """A create_account operation of legal entity LE1 (CNY, owned by a card unless told)."""
    return {
        "op": "create_account",
        "asset": extra.pop("asset", "CNY"),
        "legal_entity": "LE1",
        "owner_kind": extra.pop("owner_kind", "card"),
        "owner_id": owner_id,
        "purpose": purpose,
        **extra,
    }


async def setup_accounts_over_http(
    api: ApiClient, wallets: int, funding: int = 0
) -> tuple[int, list[int]]:
    """`setup_accounts` over HTTP: CNY, a source account that may go negative, and `wallets`
    no-overdraft accounts, each funded with `funding` fen under key `fund-{id}` of client
    "setup". Returns (source id, wallet ids)."""
    asset = {"op": "create_asset", "code": "CNY", "kind": "currency", "scale": 2, "name": "RMB"}
    assert (await post_ops(api, [asset]))[0]["status"] == "ok"
    created = await post_ops(
        api,
        [account_json("LE1", "float", owner_kind="entity")]
        + [
            account_json(f"c{i}", "stored_value", flags={"no_overdraft": True})
            for i in range(wallets)
        ],
    )
    assert all(r["status"] == "ok" for r in created), created
    source, *wallet_ids = [int(r["account_id"]) for r in created]
    if funding:
        funded = await post_ops(
            api, [transfer_json(f"fund-{w}", source, w, funding) for w in wallet_ids], "setup"
        )
        assert all(r["status"] == "ok" for r in funded), funded
    return source, wallet_ids


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
