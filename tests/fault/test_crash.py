"""SIGKILL the real ledger server under load; after a restart on the same database every
acknowledged operation is there exactly once and `cardcore ledger verify` passes.

The server runs as `python -m cardcore ledger` in its own process, on SQLite and PostgreSQL.
16 clients post transfers under unique keys; each answer is booked: acknowledged (HTTP 200,
status ok), failed (HTTP 200, status failed) or unanswered (the request was in flight when the
process died, or never reached it). After LOAD_S the first answer a client gets while other
clients wait for theirs triggers the SIGKILL: a server that answered before its commit was
durable dies inside that window. A kill may lose only unanswered requests, and each
of those at most once: sent again, it replays what was committed or applies now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cardcore.ledger import codes
from tests.helpers import (
    account_json,
    cardcore_env,
    expected_balances,
    free_port,
    run_cardcore,
    sql_rows,
    transfer_json,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLIENT = "load"
CLIENTS = 16
LOAD_S = 1.5
WALLETS = 8
FUNDING = 10**8
RESUBMIT_CHUNK = 256
START_S_MAX = 30
REQUEST_S_MAX = 10
STOP_S_MAX = 20
VERIFY_S_MAX = 60


# --- the server process ------------------------------------------------------------------------


@dataclass
class Server:
    process: asyncio.subprocess.Process
    stderr: bytearray
    drain: asyncio.Task[None]
    url: str = ""

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")


async def _collect(stream: asyncio.StreamReader, into: bytearray) -> None:
    while chunk := await stream.read(65536):
        into.extend(chunk)


async def start_server(db_url: str) -> Server:
    """`cardcore ledger` on `db_url` and a free loopback port, once it says it listens."""
    env = cardcore_env(
        CARDCORE_DB_URL=db_url,
        CARDCORE_HOST="127.0.0.1",
        CARDCORE_PORT=str(free_port()),
        CARDCORE_LOG_LEVEL="WARNING",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cardcore",
        "ledger",
        cwd=PROJECT_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = bytearray()
    server = Server(process, stderr, asyncio.create_task(_collect(process.stderr, stderr)))
    try:
        line = await asyncio.wait_for(process.stdout.readline(), START_S_MAX)
        if not line:
            await finish(server)
            pytest.fail(f"server exited with {process.returncode} before listening:\n{server.log}")
        ready = json.loads(line)
        assert ready["event"] == "listening", ready
        server.url = ready["url"]
    except BaseException:
        await finish(server)
        raise
    return server


async def exited(server: Server) -> int:
    """Wait (bounded) for the server to exit and its log to be read; its exit status.

    Signal nothing here: on Python 3.11, `Process.kill` on a child that died but is not yet
    reaped reaps it itself, and asyncio then reports exit status 255 instead of -9."""
    status = await asyncio.wait_for(server.process.wait(), STOP_S_MAX)
    await asyncio.wait_for(server.drain, STOP_S_MAX)
    return status


async def finish(server: Server, *, graceful: bool = False) -> int:
    """Stop the server unless it already exited, and return its exit status: SIGTERM first
    when `graceful` (SIGKILL if it is not gone within STOP_S_MAX), else SIGKILL at once."""
    if graceful and server.process.returncode is None:
        server.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(server.process.wait()), STOP_S_MAX)
    if server.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            server.process.kill()
    return await exited(server)


async def run_verify(db_url: str) -> tuple[int, str]:
    """`python -m cardcore ledger verify --db URL` (bounded): (exit status, its output)."""
    done = await asyncio.to_thread(
        run_cardcore,
        "ledger",
        "verify",
        "--db",
        db_url,
        cwd=PROJECT_ROOT,
        env=cardcore_env(CARDCORE_LOG_LEVEL="WARNING"),
        timeout_s=VERIFY_S_MAX,
    )
    return done.returncode, done.stdout + done.stderr


# --- requests -----------------------------------------------------------------------------------


async def post(
    session: aiohttp.ClientSession, url: str, ops: list[dict[str, Any]], client: str = CLIENT
) -> list[dict[str, Any]]:
    async with session.post(
        f"{url}/internal/v1/ops", json={"client": client, "ops": ops}
    ) as response:
        body = await response.json()
        assert response.status == 200, body
        results: list[dict[str, Any]] = body["results"]
        return results


def op_for(key: str, source: int, wallets: list[int]) -> dict[str, Any]:
    """The transfer sent under `key`, drawn from it (so it can be sent again identically).
    One in twenty asks more than any wallet holds and fails with exceeds_credits."""
    rng = random.Random(key)
    a, b = rng.sample(wallets, 2)
    roll = rng.random()
    if roll < 0.05:
        return transfer_json(key, a, b, FUNDING * 100, reason="overdraw")
    if roll < 0.2:
        return transfer_json(key, a, source, rng.randint(1, 5_000), reason="spend")
    if roll < 0.35:
        return transfer_json(key, source, a, rng.randint(1, 5_000), reason="top_up")
    return transfer_json(key, a, b, rng.randint(1, 5_000), reason="move")


@dataclass
class Book:
    source: int
    wallets: list[int]
    ops: dict[str, dict[str, Any]] = field(default_factory=dict)  # every key sent
    acked: dict[str, int] = field(default_factory=dict)  # key -> transfer id answered ok
    failed: dict[str, str] = field(default_factory=dict)  # key -> code answered
    unanswered: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)

    def op(self, key: str) -> dict[str, Any]:
        self.ops[key] = op_for(key, self.source, self.wallets)
        return self.ops[key]


@dataclass
class Killer:
    """SIGKILLs the server the moment a client gets an answer, once armed, if other clients
    still wait for theirs: a server that answered before its commit was durable dies right
    inside that window, and requests are in flight."""

    pid: int
    armed: bool = False
    fired: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: dict[int, list[str]] = field(default_factory=dict)  # client -> keys sent
    in_flight_at_kill: set[str] = field(default_factory=set)

    def answered(self, client: int) -> None:
        del self.outstanding[client]
        if self.armed and self.outstanding and not self.fired.is_set():
            os.kill(self.pid, signal.SIGKILL)
            self.fired.set()
            self.in_flight_at_kill = {k for keys in self.outstanding.values() for k in keys}


async def load_client(
    session: aiohttp.ClientSession, url: str, c: int, book: Book, killer: Killer
) -> None:
    """Post requests of 1, 4 or 16 transfers under fresh keys until the server is gone. A
    pause of up to 4 ms before each keeps the clients out of step with each other (in step,
    all requests share each batch and none is in flight when an answer comes)."""
    rng = random.Random(f"client-{c}")
    n = 0
    while not killer.fired.is_set():
        await asyncio.sleep(rng.uniform(0, 0.004))
        keys = [f"c{c}-{n + i}" for i in range(rng.choice((1, 1, 4, 16)))]
        n += len(keys)
        ops = [book.op(key) for key in keys]
        killer.outstanding[c] = keys
        try:
            async with session.post(
                f"{url}/internal/v1/ops", json={"client": CLIENT, "ops": ops}
            ) as response:
                status = response.status
                body = await response.json()
            killer.answered(c)
        except (aiohttp.ClientError, TimeoutError):
            book.unanswered.update(keys)  # in flight when the server died, or refused
            return
        book.statuses[status] += 1
        if status != 200:
            book.unanswered.update(keys)
            continue
        for key, result in zip(keys, body["results"], strict=True):
            if result["status"] == "ok":
                book.acked[key] = result["transfer_id"]
            else:
                book.failed[key] = result["code"]


# --- the database as it is ----------------------------------------------------------------------


async def stored_transfers(db_url: str) -> list[tuple[str, int, list[list[Any]]]]:
    """(key, id, postings) of every transfer of CLIENT in ledger_transfers."""
    rows = await sql_rows(
        db_url, "SELECT key, id, postings FROM ledger_transfers WHERE client = :c", c=CLIENT
    )
    return [(str(r["key"]), int(r["id"]), json.loads(r["postings"])) for r in rows]


async def stored_failures(db_url: str) -> dict[str, str]:
    """key -> code of every failure of CLIENT kept in ledger_failures."""
    rows = await sql_rows(
        db_url, "SELECT key, code FROM ledger_failures WHERE client = :c", c=CLIENT
    )
    return {str(r["key"]): str(r["code"]) for r in rows}


async def max_transfer_id(db_url: str) -> int:
    [row] = await sql_rows(db_url, "SELECT max(id) AS id FROM ledger_transfers")
    return int(row["id"] or 0)


def postings_of(op: dict[str, Any]) -> list[list[Any]]:
    return [[p["account_id"], p["side"], p["amount"]] for p in op["postings"]]


def chunks(keys: Iterable[str]) -> list[list[str]]:
    ordered = sorted(keys)
    return [ordered[i : i + RESUBMIT_CHUNK] for i in range(0, len(ordered), RESUBMIT_CHUNK)]


# --- the test -----------------------------------------------------------------------------------


async def setup_ledger(session: aiohttp.ClientSession, url: str) -> tuple[int, list[int]]:
    asset = {"op": "create_asset", "code": "CNY", "kind": "currency", "scale": 2, "name": "RMB"}
    assert (await post(session, url, [asset], "setup"))[0]["status"] == "ok"
    created = await post(
        session,
        url,
        [account_json("LE1", "float", owner_kind="entity")]
        + [
            account_json(f"c{i}", "stored_value", flags={"no_overdraft": True})
            for i in range(WALLETS)
        ],
        "setup",
    )
    assert all(r["status"] == "ok" for r in created), created
    source, *wallets = [int(r["account_id"]) for r in created]
    funding = [transfer_json(f"fund-{w}", source, w, FUNDING) for w in wallets]
    assert all(r["status"] == "ok" for r in await post(session, url, funding, "setup"))
    return source, wallets


async def test_sigkill_under_load_loses_no_acknowledged_operation_and_applies_none_twice(
    db_url: str,
) -> None:
    servers: list[Server] = []
    timeout = aiohttp.ClientTimeout(total=REQUEST_S_MAX)
    connector = aiohttp.TCPConnector(limit=CLIENTS + 4)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            # Load; then the first answer after LOAD_S with others awaited triggers the SIGKILL.
            first = await start_server(db_url)
            servers.append(first)
            source, wallets = await setup_ledger(session, first.url)
            book = Book(source, wallets)
            killer = Killer(first.process.pid)
            clients = [
                asyncio.create_task(load_client(session, first.url, c, book, killer))
                for c in range(CLIENTS)
            ]
            await asyncio.sleep(LOAD_S)
            for task in clients:
                if task.done():
                    task.result()  # a client that stopped early: surface why
            killer.armed = True
            await asyncio.wait_for(killer.fired.wait(), REQUEST_S_MAX)
            await asyncio.wait_for(asyncio.gather(*clients), REQUEST_S_MAX + 5)
            assert await exited(first) == -signal.SIGKILL, (book.statuses, first.log)
            assert book.statuses == {200: sum(book.statuses.values())}, book.statuses
            assert len(book.acked) > 100, "the load barely ran before the kill"
            assert book.failed, "no acknowledged failure to check"
            assert book.unanswered & killer.in_flight_at_kill, "the kill cut no request short"

            # The database as the kill left it: every acknowledged transfer, once, as sent;
            # nothing answered failed and nothing never sent; every answered failure kept.
            crashed_verify = await run_verify(db_url)
            stored = await stored_transfers(db_url)
            ids = {key: tid for key, tid, _ in stored}
            lost = sorted(set(book.acked) - set(ids))
            assert not lost, f"{len(lost)} acknowledged transfers lost, e.g. {lost[:5]}"
            assert {k: ids[k] for k in book.acked} == book.acked
            for key, _, postings in stored:
                assert key in book.acked or key in book.unanswered, key
                assert postings == postings_of(book.ops[key]), key
            failures = await stored_failures(db_url)
            for key, code in book.failed.items():
                assert code in codes.PERSISTED_FAILURES, (key, code)
                assert failures.get(key) == code, (key, code)
            for key in failures:
                assert key in book.failed or key in book.unanswered, key
                assert key not in ids, key
            committed_unanswered = {k: ids[k] for k in book.unanswered if k in ids}
            failed_unanswered = {k: failures[k] for k in book.unanswered if k in failures}
            last_id = await max_transfer_id(db_url)

            # Restart on the same database.
            second = await start_server(db_url)
            servers.append(second)
            url = second.url
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 200, await response.text()

            # Every acknowledged transfer replays under its key with its id, every answered
            # failure stays failed.
            for keys in chunks(book.acked):
                results = await post(session, url, [book.ops[k] for k in keys])
                for key, result in zip(keys, results, strict=True):
                    assert result == {
                        "status": "ok",
                        "code": "ok",
                        "seq": result["seq"],
                        "transfer_id": book.acked[key],
                        "asset": "CNY",
                        "replayed": True,
                    }, (key, result)
            for keys in chunks(book.failed):
                results = await post(session, url, [book.ops[k] for k in keys])
                for key, result in zip(keys, results, strict=True):
                    assert result["code"] == "id_already_failed", (key, result)
                    assert result["original_code"] == book.failed[key], (key, result)

            # An unanswered request sent again replays what the kill left committed, or applies
            # now; sent once more it only replays.
            outcome: dict[str, dict[str, Any]] = {}
            for keys in chunks(book.unanswered):
                results = await post(session, url, [book.ops[k] for k in keys])
                for key, result in zip(keys, results, strict=True):
                    outcome[key] = result
                    if key in committed_unanswered:
                        assert result["status"] == "ok" and result.get("replayed"), (key, result)
                        assert result["transfer_id"] == committed_unanswered[key], (key, result)
                    elif key in failed_unanswered:
                        assert result["code"] == "id_already_failed", (key, result)
                        assert result["original_code"] == failed_unanswered[key], (key, result)
                    elif result["status"] == "ok":
                        assert "replayed" not in result, (key, result)
                        assert result["transfer_id"] > last_id, (key, result)
                    else:
                        assert result["code"] == "exceeds_credits", (key, result)
                        assert "replayed" not in result, (key, result)
            for keys in chunks(book.unanswered):
                results = await post(session, url, [book.ops[k] for k in keys])
                for key, result in zip(keys, results, strict=True):
                    assert result.get("replayed"), (key, result)
                    if outcome[key]["status"] == "ok":
                        assert result["transfer_id"] == outcome[key]["transfer_id"], key
                    else:
                        first_code = outcome[key].get("original_code", outcome[key]["code"])
                        assert result["original_code"] == first_code, (key, result)

            # A new transfer after the restart takes a new id.
            fresh = transfer_json("after-restart", source, wallets[0], 1, reason="top_up")
            book.ops["after-restart"] = fresh
            [result] = await post(session, url, [fresh])
            assert result["status"] == "ok" and result["transfer_id"] > last_id, result

            # The journal now holds exactly the transfers with an ok outcome, and the balances
            # are the funding plus exactly those.
            applied = {**book.acked, "after-restart": result["transfer_id"]}
            applied |= {k: r["transfer_id"] for k, r in outcome.items() if r["status"] == "ok"}
            stored = await stored_transfers(db_url)
            # One row per key (the schema's unique (client, key) says so too: this guards it).
            twice = [k for k, n in Counter(key for key, _, _ in stored).items() if n > 1]
            assert not twice, f"keys applied twice: {twice[:5]}"
            assert {key: tid for key, tid, _ in stored} == applied
            funding = [transfer_json(f"fund-{w}", source, w, FUNDING) for w in wallets]
            accounts = [source, *wallets]
            expected = expected_balances([*funding, *(book.ops[k] for k in applied)], accounts)
            total = 0
            for account in accounts:
                async with session.get(f"{url}/internal/v1/accounts/{account}") as response:
                    assert response.status == 200
                    b = await response.json()
                got = (b["debits_posted"], b["credits_posted"], b["version"])
                assert got == expected[account], (account, b)
                if account in wallets:
                    assert b["credits_posted"] >= b["debits_posted"] + b["debits_pending"], b
                total += b["credits_posted"] - b["debits_posted"]
            assert total == 0

            # A clean stop, a clean log, and the journal verifies: as the kill left it (checked
            # above, asserted here so that the replay checks report first) and now.
            assert await finish(second, graceful=True) == 0, second.log
            assert "Traceback" not in second.log and '"level": "error"' not in second.log, (
                second.log
            )
            status, output = crashed_verify
            assert status == 0, f"verify after the kill:\n{output}"
            status, output = await run_verify(db_url)
            assert status == 0, f"verify after the restart:\n{output}"
            assert json.loads(output.splitlines()[0])["status"] == "ok", output
    finally:
        for server in servers:
            await finish(server)
