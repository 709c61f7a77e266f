"""`cardcore bench pos`: simulated POS terminals buying through a gateway; one JSON line.

Processes (each a separate `cardcore` process on loopback, on `--db`, a new SQLite file in a
temporary folder by default, migrated first):
  default       `cardcore serve`: ledger, host and gateway in one process (in-process host)
  --separate    `cardcore ledger` and `cardcore gateway --ledger URL`: two processes
  --ledger URL  a ledger already running (same key-encrypting key, CARDCORE_KEK): only a
                `cardcore gateway` is started against it

Through the admin API (/v1, with an HQ admin token it mints, or `--admin-token` with
`--ledger`) the benchmark makes two legal entities with one store each, a named card class
with a 5 % discount, a grant, `--terminals` terminals (AES keys, alternating between the two
stores) and, per terminal, a member with a named card of store SA, topped up at the counter.
So every purchase records its discount, and half of them clear across legal entities
(four-leg transfers through due-to/due-from accounts). Each terminal signs on (checking its
key check values), then sends MAC'd purchases of 0.01-1.00 on its own card back to back
for `--seconds`, checking every reply's MAC; with `--rate R` the terminals together offer R
purchases per second instead (each at R/N per second, evenly spaced, never catching up a
backlog), which measures latency at a given load. `--idle N` adds N more signed-on
terminals that only hold their connection and echo every 60 s.

Each terminal is held to `GATEWAY_TERMINAL_RATE_PER_S` (20) requests a second like any other:
past that it is answered 91, which counts as an error here, so use enough terminals.

`tx_per_s` counts approved purchases; `p50_ms`/`p99_ms` are purchase round trips seen by the
terminals; `errors` counts anything but an approval; `gateway_rss_mb` is the resident memory
of the process that holds the terminal connections, read at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from cardcore import limits, migrate
from cardcore.bench import BenchError, free_port, percentile, started_cardcore
from cardcore.db import make_engine
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import PosTerminal, TerminalError
from cardcore.org.service import OrgService
from cardcore.records import Records

CARD_BALANCE = 10**11  # fen: enough for any run
ECHO_INTERVAL_S = 60


@dataclass(frozen=True, slots=True)
class PosBenchOptions:
    terminals: int
    seconds: int
    db: str | None = None
    ledger: str | None = None
    separate: bool = False
    idle: int = 0
    token: str = ""
    admin_token: str = ""  # staff token of the ledger at --ledger (minted here otherwise)
    rate: int = 0  # offered purchases per second in all; 0 = back to back


@dataclass(slots=True)
class _Tally:
    approved: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


def check(options: PosBenchOptions) -> None:
    if not 1 <= options.terminals <= limits.BENCH_TERMINALS_MAX:
        raise BenchError(f"--terminals must be 1..{limits.BENCH_TERMINALS_MAX}")
    if not 0 <= options.idle <= limits.BENCH_TERMINALS_MAX:
        raise BenchError(f"--idle must be 0..{limits.BENCH_TERMINALS_MAX}")
    if not 1 <= options.seconds <= limits.BENCH_SECONDS_MAX:
        raise BenchError(f"--seconds must be 1..{limits.BENCH_SECONDS_MAX}")
    if not 0 <= options.rate <= limits.BENCH_RATE_PER_S_MAX:
        raise BenchError(f"--rate must be 0..{limits.BENCH_RATE_PER_S_MAX}")
    if options.ledger and options.separate:
        raise BenchError("--ledger and --separate exclude each other")
    if options.ledger and not options.admin_token:
        raise BenchError("--ledger needs --admin-token (an HQ admin token of that ledger)")
    if options.terminals > 9999:
        raise BenchError("--terminals is at most 9999 (one member mobile number each)")


def run(options: PosBenchOptions) -> dict[str, Any]:
    check(options)
    _raise_open_files(options.terminals + options.idle)
    with tempfile.TemporaryDirectory(prefix="cardcore-bench-pos-") as tmp:
        kek = os.environ.get("CARDCORE_KEK") or os.urandom(32).hex()
        env = dict(os.environ, CARDCORE_KEK=kek, CARDCORE_LOG_LEVEL="WARNING")
        env["CARDCORE_GATEWAY_SAF_FILE"] = str(Path(tmp) / "saf.jsonl")
        db = options.db or f"sqlite:///{Path(tmp) / 'bench.db'}"
        backend = "postgresql" if db.startswith("postgres") else "sqlite"
        with contextlib.ExitStack() as stack:
            if options.ledger:
                ledger_url, backend = options.ledger, "external"
                gateway = stack.enter_context(_gateway(env, ledger_url, options.token))
            else:
                migrate.upgrade(db)
                options = replace(options, admin_token=asyncio.run(_bootstrap_token(db)))
                env["CARDCORE_DB_URL"] = db
                if options.separate:
                    ledger_url = stack.enter_context(_process(env, "ledger"))[0]
                    gateway = stack.enter_context(_gateway(env, ledger_url, options.token))
                else:
                    ledger_url, gateway = stack.enter_context(_process(env, "serve"))
            mode = "separate" if options.separate or options.ledger else "serve"
            result = asyncio.run(_drive(ledger_url, gateway, options))
            return {"bench": "pos", "mode": mode, "backend": backend, **result}


def _raise_open_files(connections: int) -> None:
    import resource  # noqa: PLC0415 - POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * connections + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@dataclass(frozen=True, slots=True)
class _Gateway:
    host: str
    port: int
    pid: int


@contextlib.contextmanager
def _process(env: dict[str, str], role: str) -> Iterator[tuple[str, _Gateway]]:
    port, gateway_port = free_port(), free_port()
    env = dict(env, CARDCORE_PORT=str(port), CARDCORE_GATEWAY_PORT=str(gateway_port))
    with started_cardcore(role, env) as (process, _ready):
        yield f"http://127.0.0.1:{port}", _Gateway("127.0.0.1", gateway_port, process.pid)


@contextlib.contextmanager
def _gateway(env: dict[str, str], ledger_url: str, token: str) -> Iterator[_Gateway]:
    gateway_port = free_port()
    env = dict(
        env, CARDCORE_GATEWAY_PORT=str(gateway_port), CARDCORE_GATEWAY_LEDGER_URLS=ledger_url
    )
    if token:
        env["CARDCORE_INTERNAL_TOKEN"] = token
    with started_cardcore("gateway", env) as (process, _ready):
        yield _Gateway("127.0.0.1", gateway_port, process.pid)


# The benchmark's organization: cards issued in store SA (entity A); terminals alternate
# between SA and SB (entity B), so half the purchases cross legal entities.
BENCH_CLASS = "BENCHVIP"
BENCH_DISCOUNT_BP = 500
STORES = (("LE-BENCH-A", "SA"), ("LE-BENCH-B", "SB"))


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], exists_ok: bool = False
) -> Any:
    async with session.post(url, json=body) as response:
        document = await response.json()
        if response.status == 409 and exists_ok:
            return document
        if response.status >= 300:
            raise BenchError(f"{url}: HTTP {response.status}: {document}")
        return document


async def _setup(
    ledger_url: str, options: PosBenchOptions
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The organization, a discount card class, terminals, members, their named cards and
    their top-ups, all through the admin API (/v1), as a store would make them."""
    headers = {"Authorization": f"Bearer {options.admin_token}"}
    timeout = aiohttp.ClientTimeout(total=600)
    run_id = random.randrange(10**4)
    total = options.terminals + options.idle
    v1 = f"{ledger_url}/v1"
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        for entity, store in STORES:
            await _post(
                session, f"{v1}/legal-entities", {"id": entity, "name": entity}, exists_ok=True
            )
            await _post(
                session,
                f"{v1}/stores",
                {
                    "id": store,
                    "legal_entity": entity,
                    "name": store,
                    "region": "East",
                    "city": "Shanghai",
                },
                exists_ok=True,
            )
        await _post(
            session,
            f"{v1}/card-classes",
            {
                "code": BENCH_CLASS,
                "name": "Bench VIP",
                "named": True,
                "discount_bp": BENCH_DISCOUNT_BP,
                "balance_max": CARD_BALANCE,
            },
            exists_ok=True,
        )
        await _post(
            session,
            f"{v1}/grants",
            {"store": STORES[0][1], "function": "stored_value", "product": BENCH_CLASS},
        )
        gate = asyncio.Semaphore(16)

        async def register(i: int) -> tuple[str, bytes]:
            tid = f"B{run_id:04d}{i:03X}"[-8:] if total <= 4096 else f"{run_id % 100:02d}{i:06d}"
            async with gate:
                answer = await _post(
                    session,
                    f"{v1}/terminals",
                    {
                        "tid": tid,
                        "mid": "BENCH0000000001",
                        "store": STORES[i % 2][1],
                        "key_mode": "aes",
                    },
                )
            return tid, bytes.fromhex(answer["tmk"])

        async def card(i: int) -> str:
            async with gate:
                member = await _post(
                    session,
                    f"{v1}/members",
                    {
                        "mobile": f"139{run_id:04d}{i:04d}",
                        "name": f"Bench {i}",
                        "home_store": STORES[0][1],
                    },
                )
                issued = await _post(
                    session,
                    f"{v1}/cards",
                    {"class_code": BENCH_CLASS, "store": STORES[0][1], "member_id": member["id"]},
                )
                await _post(
                    session,
                    f"{v1}/cards/{issued['id']}/topups",
                    {
                        "amount": CARD_BALANCE,
                        "tender": "cash",
                        "receipt": f"B{i}",
                        "key": f"bench-{run_id}-{i}",
                    },
                )
            return str(issued["pan"])

        terminals = await asyncio.gather(*(register(i) for i in range(total)))
        cards = await asyncio.gather(*(card(i) for i in range(options.terminals)))
    return list(terminals), list(cards)


async def _bootstrap_token(db: str) -> str:
    """A staff token for the setup, minted the way `cardcore admin token` does."""
    engine = make_engine(db)
    try:
        minted = await OrgService(Records(engine)).bootstrap_admin("bench", 3600)
    finally:
        await engine.dispose()
    return str(minted["token"])


async def _drive(ledger_url: str, gateway: _Gateway, options: PosBenchOptions) -> dict[str, Any]:
    terminals, cards = await _setup(ledger_url, options)
    tally = _Tally()
    stop = asyncio.Event()
    idle = [
        PosTerminal(gateway.host, gateway.port, tid, "BENCH0000000001", tmk, KeyMode.AES)
        for tid, tmk in terminals[options.terminals :]
    ]
    busy = [
        PosTerminal(gateway.host, gateway.port, tid, "BENCH0000000001", tmk, KeyMode.AES)
        for tid, tmk in terminals[: options.terminals]
    ]
    gate = asyncio.Semaphore(256)

    async def sign_on(t: PosTerminal) -> None:
        async with gate:
            reply = await t.sign_on()
            if reply.code != "00":
                raise BenchError(f"terminal {t.tid} sign-on answered {reply.code}")

    await asyncio.gather(*(sign_on(t) for t in idle + busy))
    idle_tasks = [asyncio.create_task(_idle(t, stop)) for t in idle]
    started = time.perf_counter()
    deadline = started + options.seconds
    interval = options.terminals / options.rate if options.rate else 0.0
    await asyncio.gather(
        *(_buy(t, card, deadline, tally, interval) for t, card in zip(busy, cards, strict=True))
    )
    elapsed = time.perf_counter() - started
    rss_mb = _rss_mb(gateway.pid)
    stop.set()
    await asyncio.gather(*idle_tasks, return_exceptions=True)
    await asyncio.gather(*(t.close() for t in idle + busy), return_exceptions=True)
    latencies = sorted(tally.latencies_ms)
    return {
        "seconds": round(elapsed, 2),
        "offered_per_s": options.rate or None,
        "terminals": options.terminals,
        "idle_terminals": options.idle,
        "connections": len(idle) + len(busy),
        "tx_per_s": round(tally.approved / elapsed, 1),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "purchases": len(latencies),
        "approved": tally.approved,
        "errors": tally.errors,
        "discount_bp": BENCH_DISCOUNT_BP,
        "cross_entity_terminals": len(busy) // 2,
        "gateway_rss_mb": rss_mb,
    }


async def _buy(t: PosTerminal, card: str, deadline: float, tally: _Tally, interval: float) -> None:
    rng = random.Random(t.tid)
    next_at = time.perf_counter() + rng.random() * interval
    while time.perf_counter() < deadline:
        if interval:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at = max(next_at + interval, time.perf_counter())
        sent = time.perf_counter()
        try:
            reply = await t.purchase(card, rng.randint(1, 100))
        except (TerminalError, OSError):
            tally.errors += 1
            with contextlib.suppress(TerminalError, OSError):
                await t.sign_on()
            continue
        tally.latencies_ms.append((time.perf_counter() - sent) * 1000)
        if reply.code == "00":
            tally.approved += 1
        else:
            tally.errors += 1
        t.lines.clear()  # the benchmark never settles: keep the terminal's memory flat


async def _idle(t: PosTerminal, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ECHO_INTERVAL_S)
        if not stop.is_set():
            with contextlib.suppress(TerminalError, OSError):
                await t.echo()


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
