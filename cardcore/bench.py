"""`cardcore bench ledger`: drive a ledger over HTTP and print one JSON line.

With `--url` it drives a ledger that is already running. Otherwise it migrates `--db` (a new
SQLite file in a temporary folder by default), starts `cardcore ledger` on it as a separate
process on a free loopback port, drives it, and stops it.

Load: `--clients` concurrent HTTP clients, each sending requests of `--ops-per-request`
transfers between two accounts drawn uniformly from `--accounts` funded no-overdraft accounts,
for `--seconds`. Every transfer has its own idempotency key. `ops_per_s` counts transfers the
ledger answered `ok`; `p50_ms`/`p99_ms` are request latencies; `errors` counts failed
operations and failed requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cardcore import limits, migrate
from cardcore.ledger import wire
from cardcore.ledger.model import (
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    Op,
    Posting,
    Side,
)
from cardcore.runtime import settle_gc

ASSET = "BENCH"
FUNDING_PER_ACCOUNT = 10**12


class BenchError(RuntimeError):
    """The benchmark cannot run as asked."""


@dataclass(frozen=True, slots=True)
class BenchOptions:
    url: str | None
    db: str | None
    token: str
    seconds: int
    clients: int
    accounts: int
    ops_per_request: int
    batch_wait_ms_max: int | None = None
    batch_size_max: int | None = None


@dataclass(slots=True)
class _Tally:
    ok_ops: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


def check(options: BenchOptions) -> None:
    if not 1 <= options.seconds <= limits.BENCH_SECONDS_MAX:
        raise BenchError(f"--seconds must be 1..{limits.BENCH_SECONDS_MAX}")
    if not 1 <= options.clients <= limits.BENCH_CLIENTS_MAX:
        raise BenchError(f"--clients must be 1..{limits.BENCH_CLIENTS_MAX}")
    if not 2 <= options.accounts <= limits.BENCH_ACCOUNTS_MAX:
        raise BenchError(f"--accounts must be 2..{limits.BENCH_ACCOUNTS_MAX}")
    if not 1 <= options.ops_per_request <= limits.REQUEST_OPS_MAX:
        raise BenchError(f"--ops-per-request must be 1..{limits.REQUEST_OPS_MAX}")


def run(options: BenchOptions) -> dict[str, Any]:
    check(options)
    if options.url:
        return asyncio.run(_drive(options.url, options, backend="external"))
    with tempfile.TemporaryDirectory(prefix="cardcore-bench-") as tmp:
        db = options.db or f"sqlite:///{Path(tmp) / 'bench.db'}"
        migrate.upgrade(db)
        with _server(db, options) as url:
            backend = "postgresql" if db.startswith("postgres") else "sqlite"
            return asyncio.run(_drive(url, options, backend=backend))


@contextlib.contextmanager
def _server(db: str, options: BenchOptions) -> Any:
    port = free_port()
    env = dict(os.environ, CARDCORE_DB_URL=db, CARDCORE_PORT=str(port), CARDCORE_HOST="127.0.0.1")
    env["CARDCORE_LOG_LEVEL"] = "WARNING"
    if options.batch_wait_ms_max is not None:
        env["CARDCORE_BATCH_WAIT_MS_MAX"] = str(options.batch_wait_ms_max)
    if options.batch_size_max is not None:
        env["CARDCORE_BATCH_SIZE_MAX"] = str(options.batch_size_max)
    with started_cardcore("ledger", env) as (_process, ready):
        yield ready["url"]


@contextlib.contextmanager
def started_cardcore(
    role: str, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """`cardcore ROLE` as a child process, once it printed its "listening" line; stopped
    (SIGTERM, then SIGKILL) on the way out."""
    process = subprocess.Popen(  # noqa: S603 - our own command, a fixed role name
        [sys.executable, "-m", "cardcore", role], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], limits.BENCH_SERVER_START_S_MAX)
        if not ready:
            raise BenchError(
                f"cardcore {role} did not listen within {limits.BENCH_SERVER_START_S_MAX} s"
            )
        line = process.stdout.readline()  # the "listening" line, or EOF if it died
        if not line:
            raise BenchError(f"cardcore {role} exited with {process.wait()} before listening")
        yield process, json.loads(line)
    finally:
        process.terminate()
        try:
            process.wait(timeout=limits.SHUTDOWN_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _post(session: aiohttp.ClientSession, url: str, ops: list[Op], client: str) -> list[Any]:
    body = {"client": client, "ops": [wire.encode_op(op) for op in ops]}
    async with session.post(f"{url}/internal/v1/ops", json=body) as response:
        payload = await response.json()
        if response.status != 200:
            raise BenchError(f"HTTP {response.status}: {payload}")
        results: list[Any] = payload["results"]
        return results


async def _setup(session: aiohttp.ClientSession, url: str, options: BenchOptions) -> list[int]:
    await _post(session, url, [CreateAsset(ASSET, AssetKind.CURRENCY, 2, "benchmark")], "bench")
    source = (
        await _post(
            session, url, [CreateAccount(ASSET, "BENCH", "bench", "source", "float")], "bench"
        )
    )[0]["account_id"]
    ids: list[int] = []
    wallet = AccountFlags(no_overdraft=True)
    chunk = limits.REQUEST_OPS_MAX // 2
    for start in range(0, options.accounts, chunk):
        count = min(chunk, options.accounts - start)
        created = await _post(
            session,
            url,
            [
                CreateAccount(ASSET, "BENCH", "bench", f"a{start + i}", "wallet", wallet)
                for i in range(count)
            ],
            "bench",
        )
        new_ids = [r["account_id"] for r in created]
        fund = [
            CreateTransfer(
                client="bench",
                key=f"fund-{aid}",
                asset=ASSET,
                postings=(
                    Posting(source, Side.DEBIT, FUNDING_PER_ACCOUNT),
                    Posting(aid, Side.CREDIT, FUNDING_PER_ACCOUNT),
                ),
                reason="bench_fund",
            )
            for aid in new_ids
        ]
        for result in await _post(session, url, list(fund), "bench"):
            if result["status"] != "ok":
                raise BenchError(f"funding failed: {result}")
        ids.extend(new_ids)
    return ids


async def _drive(url: str, options: BenchOptions, *, backend: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
    timeout = aiohttp.ClientTimeout(total=limits.HTTP_CLIENT_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=options.clients)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as s:
        ids = await _setup(s, url, options)
        run_id = f"{time.time_ns():x}"
        tally = _Tally()
        settle_gc()  # the load generator too, as the servers do once listening
        deadline = time.perf_counter() + options.seconds
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _client(
                    s,
                    url,
                    ids,
                    options=options,
                    name=f"{run_id}-{c}",
                    deadline=deadline,
                    tally=tally,
                )
                for c in range(options.clients)
            )
        )
        elapsed = time.perf_counter() - started
    latencies = sorted(tally.latencies_ms)
    return {
        "bench": "ledger",
        "backend": backend,
        "seconds": round(elapsed, 2),
        "clients": options.clients,
        "accounts": options.accounts,
        "ops_per_request": options.ops_per_request,
        "ops_per_s": round(tally.ok_ops / elapsed, 1),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "requests": len(latencies),
        "errors": tally.errors,
    }


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    ids: list[int],
    *,
    options: BenchOptions,
    name: str,
    deadline: float,
    tally: _Tally,
) -> None:
    rng = random.Random(name)
    n = 0
    while time.perf_counter() < deadline:
        body = _load_body(rng, ids, name, n, options.ops_per_request)
        n += options.ops_per_request
        sent = time.perf_counter()
        try:
            async with session.post(f"{url}/internal/v1/ops", data=body, headers=_JSON) as r:
                payload = await r.json()
        except (aiohttp.ClientError, TimeoutError):
            tally.errors += options.ops_per_request
            continue
        if r.status != 200:
            tally.errors += options.ops_per_request
            continue
        results = payload["results"]
        tally.latencies_ms.append((time.perf_counter() - sent) * 1000)
        ok = sum(1 for r in results if r["status"] == "ok")
        tally.ok_ops += ok
        tally.errors += len(results) - ok


_JSON = {"Content-Type": "application/json"}
# The load's requests are formatted from a template: the generator must cost the client far
# less than the server spends on the same request, or it measures itself.
_TRANSFER = (
    '{{"op":"transfer","key":"{key}","asset":"' + ASSET + '","reason":"bench","postings":['
    '{{"account_id":{debit},"side":"debit","amount":{amount}}},'
    '{{"account_id":{credit},"side":"credit","amount":{amount}}}]}}'
)


def _load_body(rng: random.Random, ids: list[int], name: str, first: int, count: int) -> bytes:
    ops = []
    for n in range(first, first + count):
        debit, credit = rng.sample(ids, 2)
        amount = rng.randint(1, 10_000)
        ops.append(_TRANSFER.format(key=f"{name}-{n}", debit=debit, credit=credit, amount=amount))
    return ('{"client":"bench","ops":[' + ",".join(ops) + "]}").encode()


def percentile(sorted_values: list[float], pct: int) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, (len(sorted_values) * pct) // 100)
    return round(sorted_values[index], 2)
