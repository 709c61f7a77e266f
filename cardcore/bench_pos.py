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
terminals; `errors` counts anything but an approval, and `declines` those answered, by
response code; `gateway_rss_mb` is the resident memory
of the process that holds the terminal connections, read at the end; `server_cpu_ms_per_tx`
is the CPU time the processes the benchmark started (`serve`, or `ledger` and `gateway`;
the gateway alone with `--ledger`) spent during the timed part, per approved transaction:
on a machine shared with the load generator and the database it varies far less from run
to run than `tx_per_s` does. `load_cpu_ms_per_tx` is the same for the benchmark's own
process, the simulated terminals (on two cores, what they spend the servers cannot).

`--mix realistic` (issue 5) makes the card class part of a points program (1 point per yuan,
100 points = 1.00 CNY), an active coupon campaign (1.00 CNY off) with enough codes, and has
each card earn at least 10,000 points first (a 900000 message, not timed). Then each
terminal draws its next transaction: 70 % a purchase of 2.00-100.00 that earns points in the
same transaction, 20 % a coupon redeem (930000) and the purchase of the bill less the
discount (two messages, timed as one transaction), 10 % a points redemption of 100 points
(910000). `--shares P,C,R` sets those three percentages (a group's own mix; `100,0,0` or
`0,100,0` measures one kind alone). Each store gets codes for every coupon purchase its
terminals can make and each card a first earning for every redemption (both with a
margin); a coupon purchase drawn when the store's codes ran out anyway is a purchase.
`tx_per_s` counts approved transactions of every kind, `messages_per_s` the messages;
`by_kind` has each kind's count, p50 and p99; `shares_pct` the shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from cardcore import limits, migrate, runtime
from cardcore.bench import (
    BenchError,
    cpu_s,
    free_port,
    percentile,
    raise_open_files,
    started_cardcore,
)
from cardcore.db import make_engine
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import PosTerminal, ReversalOwed, TerminalError
from cardcore.org.service import OrgService
from cardcore.records import Records
from cardcore.runtime import settle_gc

CARD_BALANCE = 10**11  # fen: enough for any run
ECHO_INTERVAL_S = 60
MIXES = ("plain", "realistic")
# --mix realistic: the shares of purchase / coupon purchase / points redemption, in percent
# (--shares P,C,R: a group's own mix, or one kind alone to see what it costs)
MIX_SHARES_PCT_DEFAULT = (70, 20, 10)
MIX_REDEEM_POINTS = 100  # one redemption block...
MIX_REDEEM_FEN = 100  # ...worth 1.00 CNY
MIX_START_POINTS_FEN = 1_000_000  # a first earning of at least 10,000 points per card, untimed
MIX_COUPON_FEN = 100
# A terminal sends at most GATEWAY_TERMINAL_RATE_PER_S messages a second: the coupons a run
# can use, with a margin (a coupon purchase is two messages).
MIX_COUPON_MARGIN_PCT = 130


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
    mix: str = "plain"  # "realistic": points and coupons too
    # realistic: percent of purchases, coupon purchases, redemptions (None: the default)
    shares: tuple[int, ...] | None = None


@dataclass(slots=True)
class _Tally:
    approved: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)  # answers other than 00, by code


def check(options: PosBenchOptions) -> None:
    if not 1 <= options.terminals <= limits.BENCH_TERMINALS_MAX:
        raise BenchError(f"--terminals must be 1..{limits.BENCH_TERMINALS_MAX}")
    if not 0 <= options.idle <= limits.BENCH_IDLE_TERMINALS_MAX:
        raise BenchError(f"--idle must be 0..{limits.BENCH_IDLE_TERMINALS_MAX}")
    if not 1 <= options.seconds <= limits.BENCH_SECONDS_MAX:
        raise BenchError(f"--seconds must be 1..{limits.BENCH_SECONDS_MAX}")
    if not 0 <= options.rate <= limits.BENCH_RATE_PER_S_MAX:
        raise BenchError(f"--rate must be 0..{limits.BENCH_RATE_PER_S_MAX}")
    if options.ledger and options.separate:
        raise BenchError("--ledger and --separate exclude each other")
    if options.ledger and not options.admin_token:
        raise BenchError("--ledger needs --admin-token (an HQ admin token of that ledger)")
    if options.mix not in MIXES:
        raise BenchError(f"--mix must be one of {', '.join(MIXES)}")
    if options.shares is not None:
        _check_shares(options.shares, options.mix)


def _check_shares(shares: tuple[int, ...], mix: str) -> None:
    if mix != "realistic":
        raise BenchError("--shares is for --mix realistic")
    if len(shares) != 3 or any(not 0 <= x <= 100 for x in shares):
        raise BenchError("--shares is three percentages: purchase,coupon,redemption (70,20,10)")
    if sum(shares) != 100:
        raise BenchError(f"--shares must add up to 100, not {sum(shares)}")


def shares_of(options: PosBenchOptions) -> tuple[int, ...]:
    """The realistic mix's percentages: those given, else the default."""
    return MIX_SHARES_PCT_DEFAULT if options.shares is None else options.shares


def run(options: PosBenchOptions) -> dict[str, Any]:
    check(options)
    raise_open_files(options.terminals + options.idle)
    with tempfile.TemporaryDirectory(prefix="cardcore-bench-pos-") as tmp:
        kek = os.environ.get("CARDCORE_KEK") or os.urandom(32).hex()
        env = dict(os.environ, CARDCORE_KEK=kek, CARDCORE_LOG_LEVEL="WARNING")
        env["CARDCORE_GATEWAY_SAF_FILE"] = str(Path(tmp) / "saf.jsonl")
        db = options.db or f"sqlite:///{Path(tmp) / 'bench.db'}"
        backend = "postgresql" if db.startswith("postgres") else "sqlite"
        servers: list[int] = []  # the processes started here, for their CPU time
        with contextlib.ExitStack() as stack:
            if options.ledger:
                ledger_url, backend = options.ledger, "external"
                gateway = stack.enter_context(_gateway(env, ledger_url, options.token))
            else:
                migrate.upgrade(db)
                options = replace(options, admin_token=asyncio.run(_bootstrap_token(db)))
                env["CARDCORE_DB_URL"] = db
                if options.separate:
                    ledger_url, ledger = stack.enter_context(_process(env, "ledger"))
                    gateway = stack.enter_context(_gateway(env, ledger_url, options.token))
                    servers.append(ledger.pid)
                else:
                    ledger_url, gateway = stack.enter_context(_process(env, "serve"))
            mode = "separate" if options.separate or options.ledger else "serve"
            servers.append(gateway.pid)
            result = runtime.run(_drive(ledger_url, gateway, options, servers))
            return {"bench": "pos", "mode": mode, "backend": backend, **result}


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
BENCH_PROGRAM = "BENCHPTS"
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
) -> tuple[list[tuple[str, bytes]], list[str], dict[str, list[str]]]:
    """The organization, a discount card class, terminals, members, their named cards and
    their top-ups, all through the admin API (/v1), as a store would make them; with the
    realistic mix a points program and coupons too (the codes are the third part)."""
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
        coupons: dict[str, list[str]] = {}
        if options.mix == "realistic":
            coupons = await _loyalty(session, v1, run_id, _coupons_needed(options))
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
    return list(terminals), list(cards), coupons


def _most_tx(options: PosBenchOptions, share_pct: int) -> int:
    """The most transactions of a kind with `share_pct` one terminal can make in a run (with
    the margin): at the offered rate, or back to back at GATEWAY_TERMINAL_RATE_PER_S
    messages a second, a coupon purchase being two messages."""
    if options.rate:
        per_s = options.rate / options.terminals
    else:
        per_s = limits.GATEWAY_TERMINAL_RATE_PER_S * 100 / (100 + shares_of(options)[1])
    return math.ceil(per_s * options.seconds * share_pct * MIX_COUPON_MARGIN_PCT / 10_000)


def _coupons_needed(options: PosBenchOptions) -> int:
    """Codes for each store: what its terminals can use (terminals alternate between the
    two stores, so a store has at most half of them, rounded up)."""
    return max(1, _most_tx(options, shares_of(options)[1]) * ((options.terminals + 1) // 2))


def _start_points_fen(options: PosBenchOptions) -> int:
    """The first earning of each card (1 point a yuan): enough points for every redemption
    its terminal can make in the run."""
    points = _most_tx(options, shares_of(options)[2]) * MIX_REDEEM_POINTS
    return min(limits.POS_AMOUNT_MAX, max(MIX_START_POINTS_FEN, points * 100))


async def _loyalty(
    session: aiohttp.ClientSession, v1: str, run_id: int, coupons: int
) -> dict[str, list[str]]:
    """A points program for the bench class (1 point a yuan, 100 points = 1.00 CNY) and, per
    legal entity, an active coupon campaign (1.00 CNY off) with `coupons` fresh codes for its
    store."""
    await _post(
        session,
        f"{v1}/points/programs",
        {"code": BENCH_PROGRAM, "name": "Bench points", "asset": "PTS:BENCH",
         "redeem_points": MIX_REDEEM_POINTS, "redeem_fen": MIX_REDEEM_FEN},
        exists_ok=True,
    )  # fmt: skip
    await _post(
        session,
        f"{v1}/points/programs/{BENCH_PROGRAM}/rules",
        {"code": "BASE", "kind": "base", "points": 1, "per_fen": 100},
        exists_ok=True,
    )
    async with session.patch(
        f"{v1}/card-classes/{BENCH_CLASS}", json={"points_program": BENCH_PROGRAM}
    ) as response:
        if response.status >= 300:
            raise BenchError(f"card class: HTTP {response.status}: {await response.text()}")
    now_ms = int(time.time() * 1000)
    codes: dict[str, list[str]] = {}
    for i, (entity, store) in enumerate(STORES):  # a coupon is valid in its entity's stores
        campaign = f"BENCH{run_id:04d}{i}"
        await _post(
            session,
            f"{v1}/coupon-campaigns",
            {"code": campaign, "name": "Bench 1 off", "kind": "amount_off",
             "legal_entity": entity, "value_fen": MIX_COUPON_FEN,
             "valid_from_ms": now_ms - 3_600_000, "valid_to_ms": now_ms + 86_400_000},
        )  # fmt: skip
        async with session.patch(
            f"{v1}/coupon-campaigns/{campaign}", json={"state": "active"}
        ) as response:
            if response.status >= 300:
                raise BenchError(f"campaign: HTTP {response.status}: {await response.text()}")
        made_codes = codes.setdefault(store, [])
        while len(made_codes) < coupons:
            count = min(limits.COUPON_GENERATE_ROUTE_MAX, coupons - len(made_codes))
            path = f"{v1}/coupon-campaigns/{campaign}/codes"
            made_codes += [str(c) for c in (await _post(session, path, {"count": count}))["codes"]]
    return codes


async def _bootstrap_token(db: str) -> str:
    """A staff token for the setup, minted the way `cardcore admin token` does."""
    engine = make_engine(db)
    try:
        minted = await OrgService(Records(engine)).bootstrap_admin("bench", 3600)
    finally:
        await engine.dispose()
    return str(minted["token"])


async def _drive(
    ledger_url: str, gateway: _Gateway, options: PosBenchOptions, servers: list[int]
) -> dict[str, Any]:
    terminals, cards, coupons = await _setup(ledger_url, options)
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
    mix = _Mix(coupons, shares_of(options)) if options.mix == "realistic" else None
    if mix is not None:
        fen = _start_points_fen(options)
        await asyncio.gather(
            *(_first_points(t, card, fen) for t, card in zip(busy, cards, strict=True))
        )
    idle_tasks = [asyncio.create_task(_idle(t, stop)) for t in idle]
    settle_gc()  # the simulated terminals' process, as the servers do once listening
    cpu_before = cpu_s(servers)
    load_before = time.process_time()
    started = time.perf_counter()
    deadline = started + options.seconds
    interval = options.terminals / options.rate if options.rate else 0.0
    if mix is None:
        await asyncio.gather(
            *(_buy(t, card, deadline, tally, interval) for t, card in zip(busy, cards, strict=True))
        )
    else:
        await asyncio.gather(
            *(
                _shop(
                    t, card, store=STORES[i % 2][1], deadline=deadline, mix=mix, interval=interval
                )
                for i, (t, card) in enumerate(zip(busy, cards, strict=True))
            )
        )
    elapsed = time.perf_counter() - started
    used_s = cpu_s(servers) - cpu_before
    load_s = time.process_time() - load_before
    rss_mb = _rss_mb(gateway.pid)
    stop.set()
    await asyncio.gather(*idle_tasks, return_exceptions=True)
    await asyncio.gather(*(t.close() for t in idle + busy), return_exceptions=True)
    if mix is not None:
        return {
            "seconds": round(elapsed, 2),
            "mix": options.mix,
            "shares_pct": list(shares_of(options)),
            "offered_per_s": options.rate or None,
            "terminals": options.terminals,
            "connections": len(idle) + len(busy),
            **mix.figures(elapsed),
            "server_cpu_ms_per_tx": _per_tx_ms(used_s, mix.approved()),
            "load_cpu_ms_per_tx": _per_tx_ms(load_s, mix.approved()),
            "gateway_rss_mb": rss_mb,
        }
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
        "declines": dict(sorted(tally.codes.items())),
        "discount_bp": BENCH_DISCOUNT_BP,
        "cross_entity_terminals": len(busy) // 2,
        "server_cpu_ms_per_tx": _per_tx_ms(used_s, tally.approved),
        "load_cpu_ms_per_tx": _per_tx_ms(load_s, tally.approved),
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
        except ReversalOwed as owed:  # an unMAC'd decline's reversal goes first: declined
            tally.errors += 1
            tally.codes[owed.code] = tally.codes.get(owed.code, 0) + 1
            await _signed_on_again(t, owed)
            continue
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
            tally.codes[reply.code] = tally.codes.get(reply.code, 0) + 1
        t.lines.clear()  # the benchmark never settles: keep the terminal's memory flat


@dataclass(slots=True)
class _Mix:
    """The realistic mix's shared state: the coupon codes left, and a tally per kind."""

    coupons: dict[str, list[str]]  # by store: the codes left
    shares: tuple[int, ...]  # percent: purchase, coupon purchase, points redemption
    kinds: dict[str, _Tally] = field(default_factory=dict)
    messages: int = 0
    codes: dict[str, int] = field(default_factory=dict)  # declines by response code (rule)

    def count(self, kind: str, ok: bool, ms: float | None, code: str = "") -> None:
        tally = self.kinds.setdefault(kind, _Tally())
        if ms is not None:
            tally.latencies_ms.append(ms)
        if ok:
            tally.approved += 1
            return
        tally.errors += 1
        self.codes[code or "none"] = self.codes.get(code or "none", 0) + 1

    def approved(self) -> int:
        return sum(t.approved for t in self.kinds.values())

    def figures(self, elapsed: float) -> dict[str, Any]:
        every = sorted(x for t in self.kinds.values() for x in t.latencies_ms)
        approved = self.approved()
        return {
            "tx_per_s": round(approved / elapsed, 1),
            "messages_per_s": round(self.messages / elapsed, 1),
            "p50_ms": percentile(every, 50),
            "p99_ms": percentile(every, 99),
            "approved": approved,
            "errors": sum(t.errors for t in self.kinds.values()),
            "declines": dict(sorted(self.codes.items())),
            "by_kind": {
                kind: {
                    "approved": t.approved,
                    "errors": t.errors,
                    "p50_ms": percentile(sorted(t.latencies_ms), 50),
                    "p99_ms": percentile(sorted(t.latencies_ms), 99),
                }
                for kind, t in sorted(self.kinds.items())
            },
        }


async def _first_points(t: PosTerminal, card: str, fen: int) -> None:
    """Points to redeem from the start: a purchase paid otherwise earns them (not timed)."""
    reply = await t.points_earn(card, fen)
    if reply.code != "00" or not reply.points:
        raise BenchError(f"terminal {t.tid}: the first points earning answered {reply.code}")


async def _shop(
    t: PosTerminal, card: str, *, store: str, deadline: float, mix: _Mix, interval: float
) -> None:
    """The realistic mix on one terminal of `store` until the deadline (the module's doc)."""
    coupons = mix.coupons[store]
    rng = random.Random(t.tid)
    next_at = time.perf_counter() + rng.random() * interval
    while time.perf_counter() < deadline:
        if interval:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at = max(next_at + interval, time.perf_counter())
        draw, amount = rng.randrange(100), rng.randint(2 * MIX_COUPON_FEN, 10_000)
        kind = kind_of(draw, mix.shares, coupons=bool(coupons))
        sent = time.perf_counter()
        try:
            ok, code = await _one(t, card, kind, amount, mix=mix, coupons=coupons)
        except ReversalOwed as owed:
            mix.count(kind, False, None, owed.code)
            await _signed_on_again(t, owed)
            continue
        except (TerminalError, OSError):
            mix.count(kind, False, None, "no reply")
            with contextlib.suppress(TerminalError, OSError):
                await t.sign_on()
            continue
        mix.count(kind, ok, (time.perf_counter() - sent) * 1000, code)
        t.lines.clear()


async def _signed_on_again(t: PosTerminal, owed: ReversalOwed) -> None:
    """After a reversal answered 77 the terminal signs on; after 91 or 96 it just goes on
    (the reversal is sent again before its next request)."""
    if owed.code == "77":
        with contextlib.suppress(TerminalError, OSError):
            await t.sign_on()


def kind_of(draw: int, shares: tuple[int, ...], *, coupons: bool) -> str:
    """The kind of a transaction of the realistic mix from a draw in 0..99 and the shares
    (percent: purchase, coupon purchase, points redemption). A coupon purchase when no codes
    are left is a plain purchase with points."""
    purchase, coupon, _ = shares
    if draw < purchase:
        return "purchase"
    if draw < purchase + coupon:
        return "coupon_purchase" if coupons else "purchase"
    return "points_redeem"


async def _one(
    t: PosTerminal, card: str, kind: str, amount: int, *, mix: _Mix, coupons: list[str]
) -> tuple[bool, str]:
    """One transaction of the mix: (approved, the response code of a decline)."""
    if kind == "points_redeem":
        mix.messages += 1
        reply = await t.points_redeem(card, MIX_REDEEM_POINTS)
        return reply.code == "00" and reply.approved_amount == MIX_REDEEM_FEN, reply.code
    if kind == "coupon_purchase":
        mix.messages += 1
        coupon = await t.coupon("930000", coupons.pop(), amount, card)
        if coupon.code != "00" or coupon.discount is None:
            return False, f"{coupon.code} {coupon.refusal}".strip()
        amount -= coupon.discount
    mix.messages += 1
    reply = await t.purchase(card, amount)
    return reply.code == "00" and reply.points is not None, reply.code


async def _idle(t: PosTerminal, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ECHO_INTERVAL_S)
        if not stop.is_set():
            with contextlib.suppress(TerminalError, OSError):
                await t.echo()


def _per_tx_ms(used_s: float, approved: int) -> float | None:
    return round(used_s * 1000 / approved, 3) if approved else None


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
