"""`cardcore bench ledger`: drive a ledger over HTTP and print one JSON line.

With `--url` it drives a ledger that is already running. Otherwise it migrates `--db` (a new
SQLite file in a temporary folder by default), starts `cardcore ledger` on it as a separate
process on a free loopback port, drives it, and stops it.

Load: `--clients` concurrent HTTP clients, each sending requests of `--ops-per-request`
transfers between two accounts drawn uniformly from `--accounts` funded no-overdraft accounts,
for `--seconds`. Every transfer has its own idempotency key. `ops_per_s` counts transfers the
ledger answered `ok`; `p50_ms`/`p99_ms` are request latencies; `errors` counts failed
operations and failed requests; `server_cpu_ms_per_op` is the CPU the ledger it started spent
per `ok` transfer in the timed part (from /proc; null with `--url`), `load_cpu_ms_per_op`
the same for the benchmark's own process. The clients speak
HTTP/1.1 over keep-alive connections through `HttpClient`, cheap enough that the load
generator does not starve the ledger it measures.
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
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardcore import limits, migrate, runtime
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
    writer = {"--batch-size-max": options.batch_size_max,
              "--batch-wait-ms-max": options.batch_wait_ms_max}  # fmt: skip
    given = [name for name, value in writer.items() if value is not None]
    if options.url and given:  # a running ledger keeps the settings it started with
        raise BenchError(f"{given[0]} is for the ledger started here, not one at --url")
    if options.batch_size_max is not None and not (
        1 <= options.batch_size_max <= limits.BATCH_SIZE_MAX_CEILING
    ):
        raise BenchError(f"--batch-size-max must be 1..{limits.BATCH_SIZE_MAX_CEILING}")
    if options.batch_wait_ms_max is not None and not (
        0 <= options.batch_wait_ms_max <= limits.BATCH_WAIT_MS_MAX_CEILING
    ):
        raise BenchError(f"--batch-wait-ms-max must be 0..{limits.BATCH_WAIT_MS_MAX_CEILING}")


def run(options: BenchOptions) -> dict[str, Any]:
    check(options)
    if options.url:
        return runtime.run(_drive(options.url, options, backend="external"))
    with tempfile.TemporaryDirectory(prefix="cardcore-bench-") as tmp:
        db = options.db or f"sqlite:///{Path(tmp) / 'bench.db'}"
        migrate.upgrade(db)
        with _server(db, options) as (url, pid):
            backend = "postgresql" if db.startswith("postgres") else "sqlite"
            return runtime.run(_drive(url, options, backend=backend, server_pid=pid))


@contextlib.contextmanager
def _server(db: str, options: BenchOptions) -> Any:
    port = free_port()
    env = dict(os.environ, CARDCORE_DB_URL=db, CARDCORE_PORT=str(port), CARDCORE_HOST="127.0.0.1")
    env["CARDCORE_LOG_LEVEL"] = "WARNING"
    if options.batch_wait_ms_max is not None:
        env["CARDCORE_BATCH_WAIT_MS_MAX"] = str(options.batch_wait_ms_max)
    if options.batch_size_max is not None:
        env["CARDCORE_BATCH_SIZE_MAX"] = str(options.batch_size_max)
    with started_cardcore("ledger", env) as (process, ready):
        yield ready["url"], process.pid


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


class HttpClient:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the answer: the load
    generator's own, far cheaper per request than a general client (aiohttp's cost the
    bench process about 0.2 ms a request, as much as the ledger spent answering it, on the
    same two cores). A request that gets no whole answer (or one without a Content-Length)
    fails and drops the connection; the next request connects again. An answer saying
    `Connection: close` (or an HTTP/1.0 one without keep-alive) ends the connection after it."""

    def __init__(self, url: str, token: str) -> None:
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise BenchError(f"bad port in URL: {url!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BenchError(f"not an http(s) URL: {url!r}")
        if parts.username is not None or parts.password is not None:
            raise BenchError("credentials in the URL: pass a bearer token with --token")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        name = f"[{self._host}]" if ":" in self._host else self._host
        head = f"Host: {name}:{self._port}\r\nContent-Type: application/json\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        self._head = head.encode()
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one POST. ValueError (the connection dropped) when no whole
        answer came in `HTTP_CLIENT_TIMEOUT_S`."""
        try:
            async with asyncio.timeout(limits.HTTP_CLIENT_TIMEOUT_S):
                if self._stream is None:
                    self._stream = await asyncio.open_connection(
                        self._host,
                        self._port,
                        ssl=self._tls or None,
                        limit=limits.BENCH_ANSWER_HEAD_BYTES_MAX,
                    )
                reader, writer = self._stream
                writer.write(
                    b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
                    % ((self._prefix + path).encode(), self._head, len(body), body)
                )
                head = await reader.readuntil(b"\r\n\r\n")
                status, length, close = _response_head(head)
                payload = await reader.readexactly(length)
        except (
            OSError,
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            self._drop()
            raise ValueError(f"no answer: {type(exc).__name__}: {exc}") from None
        except BaseException:  # cancelled mid-request: the connection's state is unknown
            self._drop()
            raise
        if close:
            await self.close()
        return status, payload

    def _drop(self) -> None:
        """Abort the connection at once (no waiting to flush what was not sent)."""
        if self._stream is not None:
            self._stream[1].transport.abort()
            self._stream = None

    async def close(self) -> None:
        if self._stream is not None:
            writer = self._stream[1]
            self._stream = None
            writer.close()
            with contextlib.suppress(OSError):
                async with asyncio.timeout(limits.HTTP_CLIENT_TIMEOUT_S):
                    await writer.wait_closed()


def _response_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and whether the server closes, from a response's head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or not rest[:3].isdigit():
        raise ValueError(
            f"not an HTTP/1.x status line: {lines[0][: limits.BENCH_SHOWN_CHARS_MAX]!r}"
        )
    fields = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip().lower()
    length = fields.get("content-length", "")
    if not length.isdigit() or "chunked" in fields.get("transfer-encoding", ""):
        raise ValueError("answer without a Content-Length")
    if int(length) > limits.BENCH_ANSWER_BYTES_MAX:
        raise ValueError(f"answer of {length} bytes, over {limits.BENCH_ANSWER_BYTES_MAX}")
    tokens = {t.strip() for t in fields.get("connection", "").split(",")}
    close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
    return int(rest[:3]), int(length), close


async def _post(client: HttpClient, ops: list[Op]) -> list[Any]:
    """One setup request; BenchError for anything but 200 with a result per operation."""
    body = json.dumps({"client": "bench", "ops": [wire.encode_op(op) for op in ops]}).encode()
    try:
        status, raw = await client.post(OPS_PATH, body)
    except ValueError as exc:
        raise BenchError(f"setting up: {exc}") from None
    if status != 200:
        raise BenchError(
            f"setting up: HTTP {status}: {raw[: limits.BENCH_ANSWER_HEAD_BYTES_MAX]!r}"
        )
    try:
        results = json.loads(raw)["results"]
    except (ValueError, KeyError, TypeError):
        raise BenchError("setting up: an answer without results") from None
    if not isinstance(results, list) or len(results) != len(ops):
        raise BenchError("setting up: an answer without a result per operation")
    return results


async def _setup(client: HttpClient, options: BenchOptions) -> list[int]:
    await _post(client, [CreateAsset(ASSET, AssetKind.CURRENCY, 2, "benchmark")])
    source = (await _post(client, [CreateAccount(ASSET, "BENCH", "bench", "source", "float")]))[0][
        "account_id"
    ]
    ids: list[int] = []
    wallet = AccountFlags(no_overdraft=True)
    chunk = limits.REQUEST_OPS_MAX // 2
    for start in range(0, options.accounts, chunk):
        count = min(chunk, options.accounts - start)
        created = await _post(
            client,
            [
                CreateAccount(ASSET, "BENCH", "bench", f"a{start + i}", "wallet", wallet)
                for i in range(count)
            ],
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
        for result in await _post(client, list(fund)):
            if result["status"] != "ok":
                raise BenchError(f"funding failed: {result}")
        ids.extend(new_ids)
    return ids


async def _drive(
    url: str, options: BenchOptions, *, backend: str, server_pid: int | None = None
) -> dict[str, Any]:
    raise_open_files(options.clients)
    clients = [HttpClient(url, options.token) for _ in range(options.clients)]
    try:
        ids = await _setup(clients[0], options)
        run_id = f"{time.time_ns():x}"
        tally = _Tally()
        settle_gc()  # the load generator too, as the servers do once listening
        servers = [] if server_pid is None else [server_pid]
        cpu_before = cpu_s(servers)
        load_before = time.process_time()
        started = time.perf_counter()
        deadline = started + options.seconds
        async with asyncio.TaskGroup() as group:  # one failing client stops the others
            for c, client in enumerate(clients):
                group.create_task(
                    _client(
                        client,
                        ids,
                        options=options,
                        name=f"{run_id}-{c}",
                        deadline=deadline,
                        tally=tally,
                    )
                )
        elapsed = time.perf_counter() - started
        server_cpu_s = cpu_s(servers) - cpu_before
        load_cpu_s = time.process_time() - load_before
    finally:
        await asyncio.gather(*(client.close() for client in clients))
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
        "server_cpu_ms_per_op": (
            round(server_cpu_s * 1000 / tally.ok_ops, 4) if servers and tally.ok_ops else None
        ),
        "load_cpu_ms_per_op": round(load_cpu_s * 1000 / tally.ok_ops, 4) if tally.ok_ops else None,
    }


async def _client(
    client: HttpClient,
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
            status, raw = await client.post(OPS_PATH, body)
            results = json.loads(raw)["results"] if status == 200 else None
        except (ValueError, KeyError, TypeError):
            results = None
        if not isinstance(results, list):
            tally.errors += options.ops_per_request
            # A refused connection or an error answer comes back at once: pause, or this
            # client would spin and starve the others (and the server) until the deadline.
            await asyncio.sleep(limits.BENCH_RETRY_PAUSE_MS / 1000)
            continue
        tally.latencies_ms.append((time.perf_counter() - sent) * 1000)
        ok = sum(1 for r in results if isinstance(r, dict) and r.get("status") == "ok")
        tally.ok_ops += ok
        tally.errors += options.ops_per_request - ok  # a missing result is an error too


def raise_open_files(connections: int) -> None:
    """Raise this process's open-file limit (soft, up to the hard one) for `connections`."""
    import resource  # noqa: PLC0415 - POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * connections + limits.BENCH_SPARE_FILES_MIN))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def cpu_s(pids: list[int]) -> float:
    """User and system CPU seconds the processes used so far (0 for one that is gone)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


OPS_PATH = "/internal/v1/ops"
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
