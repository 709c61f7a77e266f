"""Many clients at once on the same few accounts, over HTTP, on SQLite and PostgreSQL.

However the writer groups concurrent requests, no wallet is ever overdrawn, money is
conserved, no update is lost and an idempotency key is applied at most once; and a full writer
queue answers 503 busy at once and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from sqlalchemy.engine import make_url

from cardcore.api.app import build_app
from cardcore.config import Config
from cardcore.ledger import http as ledger_http
from cardcore.ledger.service import Ledger
from cardcore.metrics import Metrics
from tests.helpers import (
    ApiClient,
    expected_balances,
    quiet_server,
    setup_accounts_over_http,
    transfer_json,
)

CLIENT = "load"
TASKS = 64
ROUNDS = 12
WALLETS = 3
FUNDING = 5_000
LOAD_TIMEOUT_S = 120


def op_for(key: str, source: int, wallets: list[int]) -> dict[str, Any]:
    """The one transfer every sender of `key` sends: drawn from the key, so duplicates match.

    Wallets hold a few thousand fen and moves ask up to 1,500, so many would overdraw."""
    rng = random.Random(key)
    a, b = rng.sample(wallets, 2)
    kind = rng.choice(("top_up", "top_up", "spend", "move", "move", "split"))
    if kind == "top_up":
        return transfer_json(key, source, a, rng.randint(1, 400), reason="top_up")
    if kind == "spend":
        return transfer_json(key, a, source, rng.randint(1, 600), reason="spend")
    if kind == "move":
        return transfer_json(key, a, b, rng.randint(1, 1_500), reason="move")
    x, y = rng.randint(1, 500), rng.randint(1, 500)  # two wallets pay together
    return {
        "op": "transfer",
        "key": key,
        "asset": "CNY",
        "postings": [
            {"account_id": a, "side": "debit", "amount": x},
            {"account_id": b, "side": "debit", "amount": y},
            {"account_id": source, "side": "credit", "amount": x + y},
        ],
        "reason": "split",
    }


@dataclass
class Load:
    source: int
    wallets: list[int]
    ops: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> the op sent under it
    answers: defaultdict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    groups: list[list[str]] = field(default_factory=list)  # keys of each linked group

    def op(self, key: str, *, linked: bool = False) -> dict[str, Any]:
        op = op_for(key, self.source, self.wallets)
        self.ops[key] = op
        return {**op, "linked": True} if linked else op


async def client_task(api: ApiClient, task: int, load: Load) -> None:
    """ROUNDS requests, each of 1 to 16 transfers under the task's own keys plus, in round r,
    the shared key `dup-r` (64 copies race, sometimes two in one request) and the first key of
    the next task's request (the same key from two clients); a quarter also carry a linked
    pair. Every request must get HTTP 200 (no 503: the default queue is far from full)."""
    rng = random.Random(f"task-{task}")
    for r in range(ROUNDS):
        own = [[load.op(f"t{task}-r{r}-{i}")] for i in range(rng.choice((1, 1, 2, 5, 16)))]
        parts = [*own, [load.op(f"dup-{r}")], [load.op(f"t{(task + 1) % TASKS}-r{r}-0")]]
        if rng.random() < 0.25:
            group = [f"t{task}-r{r}-g0", f"t{task}-r{r}-g1"]
            load.groups.append(group)
            parts.append([load.op(group[0], linked=True), load.op(group[1])])
        if rng.random() < 0.1:
            parts.append([load.op(f"dup-{r}")])
        rng.shuffle(parts)
        ops = [op for part in parts for op in part]
        response = await api.post("/internal/v1/ops", json={"client": CLIENT, "ops": ops})
        body = await response.json()
        assert response.status == 200, body
        for op, result in zip(ops, body["results"], strict=True):
            load.answers[op["key"]].append(result)


async def watch_wallets(api: ApiClient, wallets: list[int], stop: asyncio.Event) -> int:
    """Read the wallets while the load runs: never overdrawn, versions never step back."""
    versions = dict.fromkeys(wallets, 0)
    reads = 0
    while not stop.is_set():
        for wallet in wallets:
            response = await api.get(f"/internal/v1/accounts/{wallet}")
            assert response.status == 200
            account = await response.json()
            assert account["credits_posted"] >= account["debits_posted"] + account["debits_pending"]
            assert account["version"] >= versions[wallet], account
            versions[wallet] = account["version"]
            reads += 1
    return reads


async def journal_transfers(api: ApiClient) -> list[dict[str, Any]]:
    """Every transfer in the journal, in commit order, read through GET /internal/v1/journal."""
    transfers: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await api.get(f"/internal/v1/journal?after={after}")
        assert response.status == 200
        page = await response.json()
        if not page["batches"]:
            return transfers
        for batch in page["batches"]:
            transfers.extend(batch["transfers"])
        after = page["next_after"]


def postings_of(op: dict[str, Any]) -> list[list[Any]]:
    return [[p["account_id"], p["side"], p["amount"]] for p in op["postings"]]


async def balances(api: ApiClient, accounts: Iterable[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for account in accounts:
        response = await api.get(f"/internal/v1/accounts/{account}")
        assert response.status == 200
        out[account] = await response.json()
    return out


async def test_many_clients_on_few_wallets_never_overdraw_and_never_lose_an_update(
    api: ApiClient,
) -> None:
    source, wallets = await setup_accounts_over_http(api, WALLETS, FUNDING)
    accounts = [source, *wallets]
    load = Load(source, wallets)
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_wallets(api, wallets, stop))
    try:
        await asyncio.wait_for(
            asyncio.gather(*(client_task(api, t, load) for t in range(TASKS))), LOAD_TIMEOUT_S
        )
    finally:
        stop.set()
        reads = await asyncio.wait_for(watcher, 30)
    assert reads > 0

    # Each key has one outcome, however many copies raced: applied once (one fresh answer,
    # the rest replays of the same transfer id), or failed once (one first failure, the
    # rest id_already_failed with that code).
    applied: dict[str, int] = {}
    for key, answers in load.answers.items():
        oks = [a for a in answers if a["status"] == "ok"]
        if oks:
            assert len(oks) == len(answers), (key, answers)
            assert len({a["transfer_id"] for a in oks}) == 1, (key, answers)
            assert [a.get("replayed", False) for a in oks].count(False) == 1, (key, answers)
            applied[key] = oks[0]["transfer_id"]
            continue
        firsts = [a for a in answers if not a.get("replayed")]
        assert len(firsts) == 1, (key, answers)
        for again in answers:
            if again is not firsts[0]:
                assert again["code"] == "id_already_failed", (key, answers)
                assert again["original_code"] == firsts[0]["code"], (key, answers)
    for group in load.groups:
        outcomes = {load.answers[key][0]["status"] for key in group}
        assert len(outcomes) == 1, [load.answers[key] for key in group]

    # The load really raced duplicates and really pressed on the no-overdraft rule.
    codes = Counter(a["code"] for answers in load.answers.values() for a in answers)
    replays = sum(a.get("replayed", False) for x in load.answers.values() for a in x)
    assert codes["exceeds_credits"] > 0 and codes["id_already_failed"] > 0, codes
    assert replays > TASKS, replays
    moves_applied = [k for k in applied if load.ops[k]["reason"] == "move"]
    assert moves_applied, "no wallet-to-wallet transfer went through"
    assert any(load.answers[g[0]][0]["status"] == "ok" for g in load.groups)
    assert any(load.answers[g[0]][0]["status"] != "ok" for g in load.groups)

    # The journal holds exactly the transfers answered ok, under the ids given, as sent.
    journal = await journal_transfers(api)
    setup = [t for t in journal if t["client"] == "setup"]
    loaded = {t["key"]: t for t in journal if t["client"] == CLIENT}
    assert len(setup) == WALLETS
    assert len(loaded) + len(setup) == len(journal)
    assert {k: t["id"] for k, t in loaded.items()} == applied
    for key, transfer in loaded.items():
        assert json.loads(transfer["postings"]) == postings_of(load.ops[key]), key

    # Every balance is the funding plus exactly the transfers answered ok: nothing lost,
    # nothing twice; no wallet below zero; money conserved.
    funding = [transfer_json(f"fund-{w}", source, w, FUNDING) for w in wallets]
    expected = expected_balances([*funding, *(load.ops[k] for k in applied)], accounts)
    stored = await balances(api, accounts)
    for account in accounts:
        b = stored[account]
        assert (b["debits_posted"], b["credits_posted"], b["version"]) == expected[account]
        assert b["debits_pending"] == 0 and b["credits_pending"] == 0
    for wallet in wallets:
        b = stored[wallet]
        assert b["credits_posted"] >= b["debits_posted"] + b["debits_pending"], b
    assert sum(b["credits_posted"] - b["debits_posted"] for b in stored.values()) == 0

    verifier = await api.app[ledger_http.LEDGER_KEY].store.verify(100)
    assert verifier.entries == sum(v for _, _, v in expected.values())
    for account in accounts:
        replayed = verifier.balances[account]
        assert (replayed.debits_posted, replayed.credits_posted) == expected[account][:2]


# --- a full writer queue ---------------------------------------------------------------------

FLOOD = 40
STALL_S_MAX = 4.0  # below PostgreSQL's lock_timeout (5 s), after which the writer gives up


@contextlib.asynccontextmanager
async def writer_stalled(db_url: str) -> AsyncIterator[None]:
    """Hold a lock the writer needs to commit, so it stalls inside its batch until we leave.

    SQLite: our write transaction makes the writer's BEGIN IMMEDIATE wait (busy_timeout).
    PostgreSQL: an EXCLUSIVE lock on ledger_batches makes the writer's INSERT wait."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(
            str(url.database), isolation_level=None, timeout=10, check_same_thread=False
        )
        try:
            await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
            yield
        finally:
            await asyncio.to_thread(conn.close)  # closing rolls our empty transaction back
        return
    pg = await asyncpg.connect(db_url, timeout=10)
    try:
        await pg.execute("BEGIN")
        await pg.execute("LOCK TABLE ledger_batches IN EXCLUSIVE MODE")
        yield
    finally:
        await pg.close()


async def until_answered(tasks: list[asyncio.Task[Any]], count: int, within_s: float) -> None:
    """Return once `count` of `tasks` are done, or after `within_s` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    pending = {t for t in tasks if not t.done()}
    while len(tasks) - len(pending) < count:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        _, pending = await asyncio.wait(
            pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )


async def post_one(api: ApiClient, op: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await api.post("/internal/v1/ops", json={"client": CLIENT, "ops": [op]})
    body: dict[str, Any] = await response.json()
    return response.status, body


async def test_full_writer_queue_answers_busy_at_once_and_changes_nothing(db_url: str) -> None:
    metrics = Metrics()
    # One request in the writer's batch and one waiting in the queue, no more: batch_size_max=1
    # keeps the writer from draining the queue into its batch.
    ledger = Ledger.open(
        db_url, metrics, queue_requests_max=1, batch_size_max=1, batch_wait_ms_max=0
    )
    app = build_app(Config(db_url=db_url), metrics, ledger)
    async with TestClient(await quiet_server(app)) as api:
        source, (wallet,) = await setup_accounts_over_http(api, 1)
        ops = {
            f"flood-{i}": transfer_json(f"flood-{i}", source, wallet, 100 + i) for i in range(FLOOD)
        }
        async with writer_stalled(db_url):
            tasks = [asyncio.create_task(post_one(api, op)) for op in ops.values()]
            await until_answered(tasks, FLOOD - 2, STALL_S_MAX)
            while_stalled = [t.result() for t in tasks if t.done()]
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)

        # All but the one or two requests the writer holds were answered busy while the writer
        # was stuck: they never waited for it.
        assert len(while_stalled) >= FLOOD - 2, answers
        for status, body in while_stalled:
            assert status == 503, body
            assert body["error"]["code"] == "busy", body
        ok = {key for key, (status, _) in zip(ops, answers, strict=True) if status == 200}
        busy = set(ops) - ok
        assert 1 <= len(ok) <= 2, answers
        for key, (status, body) in zip(ops, answers, strict=True):
            if key in ok:
                assert body["results"][0]["status"] == "ok", body
            else:
                assert (status, body["error"]["code"]) == (503, "busy"), body
        metrics_text = await (await api.get("/metrics")).text()
        assert f"cardcore_ledger_busy_total {float(len(busy))}" in metrics_text

        # Only the accepted requests moved money or reached the journal.
        journal = {t["key"] for t in await journal_transfers(api) if t["client"] == CLIENT}
        assert journal == ok
        stored = (await balances(api, [wallet]))[wallet]
        assert stored["credits_posted"] == sum(ops[k]["postings"][1]["amount"] for k in ok)
        assert stored["version"] == len(ok)

        # A busy request left no trace under its key: sent again, it applies now, fresh.
        for key in sorted(busy):
            status, body = await post_one(api, ops[key])
            assert status == 200, body
            result = body["results"][0]
            assert result["status"] == "ok" and "replayed" not in result, result
        stored = (await balances(api, [wallet]))[wallet]
        assert stored["credits_posted"] == sum(op["postings"][1]["amount"] for op in ops.values())
        assert stored["version"] == FLOOD
        await ledger.store.verify(100)
