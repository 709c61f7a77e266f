"""Helpers shared by the test layers (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import text

from cardcore.db import make_engine
from cardcore.ledger.model import (
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    Op,
    Posting,
    PostPending,
    Result,
    SetAccountFrozen,
    Side,
    VoidPending,
)
from cardcore.ledger.service import Ledger
from tests import logscan

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


# --- real ledger activity, SQL access and the `cardcore` command (schema, verify, e2e) -------


@dataclass(frozen=True, slots=True)
class Activity:
    """What `run_activity` did: ids to aim checks (and tampering) at."""

    source: int  # may go negative
    wallets: tuple[int, int, int]  # no-overdraft, funded with 10_000 each
    sale: int  # a posted transfer with metadata
    held: int  # a hold, partly posted
    voided: int  # a hold, voided


async def run_activity(ledger: Ledger) -> Activity:
    """One operation kind per batch: assets, accounts, transfers, a hold posted in part, a
    hold voided, a frozen account, and failures kept against their keys. Every table of the
    journal gets rows; no hold can time out during a test."""
    source, wallets = await setup_accounts(ledger, 3, funding=10_000)
    a, b, c = wallets

    async def one(op: Op, code: str = "ok") -> Result:
        [result] = await ledger.submit([op])
        assert result.code == code, result
        return result

    await one(CreateAsset("PTS", AssetKind.POINTS, 0, "Points"))
    metadata = (("stan", "000001"), ("store", "S1"), ("terminal", "T1"))
    sale = await one(move("sale-1", a, b, 2_500, reason="purchase", metadata=metadata))
    held = await one(move("hold-1", a, c, 1_000, pending=True, timeout_s=3600))
    assert held.transfer_id is not None
    await one(PostPending("test", "post-1", held.transfer_id, 600))
    voided = await one(move("hold-2", b, c, 500, pending=True))
    assert voided.transfer_id is not None
    await one(VoidPending("test", "void-1", voided.transfer_id))
    await one(move("overdraft-1", c, a, 10**9), "exceeds_credits")
    await one(SetAccountFrozen(b, debit_frozen=True))
    await one(move("frozen-1", b, a, 1), "debit_account_frozen")
    await one(SetAccountFrozen(b, debit_frozen=False))
    assert sale.transfer_id is not None
    return Activity(source, (a, b, c), sale.transfer_id, held.transfer_id, voided.transfer_id)


async def sql_rows(db_url: str, query: str, **params: Any) -> list[dict[str, Any]]:
    """Run one query on its own connection and return its rows as dicts."""
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(query), params)
            return [dict(r) for r in result.mappings()]
    finally:
        await engine.dispose()


async def sql_execute(db_url: str, *statements: str) -> None:
    """Run the statements in one transaction, committed (raises if any is refused)."""
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


def cardcore_env(**settings: str) -> dict[str, str]:
    """This process's environment without any CARDCORE_* setting, plus `settings`; the
    terminal gateway on a free port unless `settings` names one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDCORE_")}
    env["CARDCORE_GATEWAY_PORT"] = str(free_port())
    env.update(settings)
    return env


def run_cardcore(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m cardcore ARGS` to completion (bounded), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "cardcore", *args],
        cwd=cwd,
        env=cardcore_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def expected_balances(
    ops: Iterable[dict[str, Any]], accounts: Iterable[int]
) -> dict[int, tuple[int, int, int]]:
    """(debits_posted, credits_posted, version) of each account after `ops` applied once."""
    out = {a: [0, 0, 0] for a in accounts}
    for op in ops:
        for p in op["postings"]:
            totals = out[p["account_id"]]
            totals[0 if p["side"] == "debit" else 1] += p["amount"]
            totals[2] += 1
    return {a: (d, c, v) for a, (d, c, v) in out.items()}


class AdminClient:
    """The admin API as a test sees it: calls with a bearer token, and staff made on demand."""

    def __init__(self, client: ApiClient, root_token: str, app: web.Application) -> None:
        self.client = client
        self.root = root_token
        self.app = app
        self._made = 0

    async def call(
        self, method: str, path: str, token: str | None = None, json: Any = None, **params: Any
    ) -> tuple[int, Any]:
        """(status, decoded JSON body). `token=""` sends no Authorization header."""
        token = self.root if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.client.request(
            method, path, json=json, headers=headers, params=params or None
        )
        answer = await response.json() if response.content_type == "application/json" else (
            await response.text()
        )  # fmt: skip
        remember_secrets(json)
        remember_secrets(answer)
        return response.status, answer

    async def ok(self, method: str, path: str, token: str | None = None, json: Any = None,
                 **params: Any) -> Any:  # fmt: skip
        status, body = await self.call(method, path, token, json, **params)
        assert status in (200, 201), (method, path, status, body)
        return body

    async def org(self, entity: str = "LE1", *stores: str) -> None:
        """A legal entity and its stores (S1 in LE1 by default), made if missing."""
        status, body = await self.call("POST", "/v1/legal-entities", json={"id": entity,
                                        "name": f"Entity {entity}"})  # fmt: skip
        assert status in (201, 409), body
        for store in stores or ("S1",):
            status, body = await self.call(
                "POST",
                "/v1/stores",
                json={"id": store, "legal_entity": entity, "name": f"Store {store}",
                      "region": "East", "city": "Shanghai"},
            )  # fmt: skip
            assert status in (201, 409), body

    async def token(self, role: str, scope_kind: str = "group", scope_id: str = "") -> str:
        """A new staff user with this role and scope, and its token's secret."""
        self._made += 1
        user = await self.ok(
            "POST",
            "/v1/users",
            json={"name": f"{role}-{self._made}", "role": role, "scope_kind": scope_kind,
                  "scope_id": scope_id},
        )  # fmt: skip
        minted = await self.ok("POST", f"/v1/users/{user['id']}/tokens", json={"label": "test"})
        return str(minted["token"])


SECRET_FIELDS = frozenset({"pan", "pin", "id_number", "token", "tmk", "secret", "new_pin"})
COUPON_FIELDS = frozenset({"codes", "coupon"})  # {"codes": [...]} generated, {"coupon": code}
COUPON_CODE_CHARS_MIN = 12  # a generated code; shorter values are partner codes or names


def remember_secrets(value: object) -> None:
    """Register every secret a request or an answer carries with the whole run's log scan
    (tests/logscan.py): the scan fails the run if any of them reaches a log line."""
    if isinstance(value, dict):
        for name, item in value.items():
            if name in SECRET_FIELDS and isinstance(item, str):
                logscan.SCAN.remember(f"{name} sent or answered over the admin API", item)
            elif name in COUPON_FIELDS:  # a code is a bearer value: never in a log line
                for code in item if isinstance(item, list) else [item]:
                    if isinstance(code, str) and len(code) >= COUPON_CODE_CHARS_MIN:
                        logscan.SCAN.remember("a coupon code answered over the admin API", code)
            else:
                remember_secrets(item)
    elif isinstance(value, list):
        for item in value:
            remember_secrets(item)


@dataclass
class ClaimsInMemory:
    """The key claims of a fake card directory (`Directory.claim_keys`, `claimed`), for
    unit tests of `PosService`: claims kept in a dict, no ledger keys."""

    claims: dict[str, str] = field(default_factory=dict, kw_only=True)

    async def claim_keys(self, wanted: dict[str, str], now_ms: int) -> dict[str, str]:
        for key, function in wanted.items():  # (the real one also marks the terminal)
            self.claims.setdefault(key, function)
        return {key: self.claims[key] for key in wanted}

    async def claimed(self, keys: Sequence[str]) -> dict[str, str]:
        return {key: self.claims[key] for key in keys if key in self.claims}


async def quiet_server(app: web.Application) -> TestServer:
    """A test server run as `cardcore serve` runs it (api/server.py): no access log. A path
    may hold a bearer coupon code (/v1/coupons/{code}), which the run's log scan counts as a
    leak. (TestServer drops the keywords it is made with: they go to `start_server`.)"""
    server = TestServer(app)
    await server.start_server(access_log=None)
    return server
