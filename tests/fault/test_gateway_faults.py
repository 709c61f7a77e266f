"""The terminal gateway under faults, as real processes on loopback, on SQLite.

Most tests share one `cardcore serve` (ledger, POS host and gateway in one process); the
ledger-down tests run `cardcore ledger` and `cardcore gateway` as two processes with a
store-and-forward file, and kill, stop and restart them. Terminals are registered and cards
issued over the host's internal HTTP API. Each test ends by checking isolation: a terminal
that behaves still gets a purchase approved quickly. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cardcore import limits, migrate
from cardcore.frontend_gateway import codec
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import HEADER, TPDU, PosTerminal, Reply
from tests.helpers import cardcore_env, free_port, run_cardcore
from tests.unit.test_gateway_fuzz import decode_reply

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KEK = secrets.token_hex(32)
MID = "FAULTMERCHANT01"
CARD_BALANCE = 10_000_000  # fen
START_S_MAX = 30
STOP_S_MAX = 15
REPLY_S_MAX = 20  # a terminal's own patience for one reply (bounded below the test timeout)
QUICK_S = 1.0  # a purchase of a well-behaved terminal on a healthy gateway
CLOSE_S_MAX = 3.0  # a connection whose framing is lost is closed at once
SLACK_S = 3.0  # on top of a configured timeout
P99_S_MAX = 0.2
FLOOD_S = 3.0
FLOOD_PER_S = 100
HOST_TIMEOUT_S = limits.GATEWAY_HOST_TIMEOUT_MS / 1000
REFUSED_S_MAX = 2.0  # a purchase while nothing listens on the ledger's port: 96 at once
_tids = itertools.count(1)
_RUN = secrets.token_hex(2).upper()


# --- processes -----------------------------------------------------------------------------------


class Proc:
    """`python -m cardcore ARGS` in the background; `wait_ready` reads its listening line."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path, name: str) -> None:
        self.args = args
        self.log_path = cwd / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cardcore", *args],
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def wait_ready(self) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=START_S_MAX)
        except queue.Empty:
            self.kill()
            pytest.fail(f"{self.args} did not listen within {START_S_MAX} s:\n{self.log}")
        self.ready = json.loads(line)
        assert self.ready["event"] == "listening", self.ready
        return self.ready

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def gateway(self) -> tuple[str, int]:
        host, _, port = self.ready["gateway"].rpartition(":")
        return host, int(port)

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (also when stopped) and reap, bounded."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_S_MAX)
        self._log.close()

    def stop(self) -> int:
        """SIGTERM; its exit status (SIGKILL and a failure if it does not end in time)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=STOP_S_MAX)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.args} still running {STOP_S_MAX} s after SIGTERM:\n{self.log}")
        self._log.close()
        return status


async def started(args: list[str], env: Mapping[str, str], cwd: Path, name: str) -> Proc:
    proc = Proc(args, env, cwd, name)
    await asyncio.to_thread(proc.wait_ready)
    return proc


def _env(db_url: str, **settings: str) -> dict[str, str]:
    return cardcore_env(
        CARDCORE_DB_URL=db_url,
        CARDCORE_HOST="127.0.0.1",
        CARDCORE_PORT=str(free_port()),
        CARDCORE_KEK=KEK,
        CARDCORE_LOG_LEVEL="WARNING",
        **settings,
    )


def _no_errors_logged(log: str) -> None:
    assert "Traceback" not in log, log[-4000:]
    assert '"level": "error"' not in log, log[-4000:]


@dataclass
class Serve:
    """The shared `cardcore serve`: its HTTP URL and gateway address."""

    proc: Proc
    url: str
    host: str
    port: int
    saf_file: Path


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("gateway-serve")
    db = f"sqlite:///{tmp / 'serve.db'}"
    migrate.upgrade(db)
    saf_file = tmp / "saf.jsonl"
    proc = Proc(["serve"], _env(db, CARDCORE_GATEWAY_SAF_FILE=str(saf_file)), tmp, "serve")
    try:
        ready = proc.wait_ready()
        host, port = proc.gateway
        yield Serve(proc, ready["url"], host, port, saf_file)
        assert proc.stop() == 0, proc.log
        _no_errors_logged(proc.log)
    finally:
        proc.kill()


# --- the host's internal API ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Card:
    pan: str
    account_id: int


@dataclass(frozen=True, slots=True)
class Registered:
    tid: str
    tmk: bytes
    card: Card


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REPLY_S_MAX)) as s:
        yield s


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as response:
        document = await response.json()
        assert response.status == 201, document
        return document


async def register(
    session: aiohttp.ClientSession, url: str, count: int, balance: int = CARD_BALANCE
) -> list[Registered]:
    """`count` new terminals (AES) of one store, each with a new card holding `balance`."""
    answer = await _post(
        session,
        f"{url}/internal/v1/cards",
        {"legal_entity": "LE-FAULT", "count": count, "balance": balance},
    )
    cards = [Card(c["pan"], int(c["account_id"])) for c in answer["cards"]]
    out = []
    for card in cards:
        tid = f"F{_RUN}{next(_tids):03d}"
        answer = await _post(
            session,
            f"{url}/internal/v1/terminals",
            {
                "tid": tid,
                "mid": MID,
                "store": "S-FAULT",
                "legal_entity": "LE-FAULT",
                "key_mode": "aes",
            },
        )
        out.append(Registered(tid, bytes.fromhex(answer["tmk"]), card))
    return out


async def available(session: aiohttp.ClientSession, url: str, account_id: int) -> int:
    """What the card may spend; nothing may be held on it."""
    async with session.get(f"{url}/internal/v1/accounts/{account_id}") as response:
        account = await response.json()
        assert response.status == 200, account
    assert account["debits_pending"] == 0, account
    return int(account["credits_posted"]) - int(account["debits_posted"])


async def metric(session: aiohttp.ClientSession, url: str, sample: str) -> float:
    """One sample of the server's /metrics, e.g. 'name_total{label="x"}' (0 if absent)."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


DROPPED = 'cardcore_gateway_frames_dropped_total{{reason="{reason}"}}'


async def dropped_frames(session: aiohttp.ClientSession, url: str, reason: str) -> float:
    """The gateway's count of connections closed for `reason`."""
    return await metric(session, url, DROPPED.format(reason=reason))


async def counter_moves(
    session: aiohttp.ClientSession, url: str, sample: str, was: float, *, within_s: float
) -> float:
    """When (monotonic, to 0.05 s) the counter `sample` first differs from `was`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await metric(session, url, sample) != was:
            return time.monotonic()
        await asyncio.sleep(0.05)
    pytest.fail(f"{sample} still {was} after {within_s} s")


# --- terminals -----------------------------------------------------------------------------------


async def signed_on(host: str, port: int, r: Registered) -> PosTerminal:
    terminal = PosTerminal(host, port, r.tid, MID, r.tmk, KeyMode.AES, timeout_s=REPLY_S_MAX)
    reply = await asyncio.wait_for(terminal.sign_on(), REPLY_S_MAX)
    assert reply.code == "00", reply
    return terminal


def purchase_fields(terminal: PosTerminal, pan: str, amount: int) -> dict[str, str]:
    """A purchase as `PosTerminal.purchase` builds it, with the terminal's next STAN."""
    stamp = time.localtime()
    return {
        "t": "0200",
        "2": pan,
        "3": "000000",
        "4": f"{amount:012d}",
        "11": terminal.next_stan(),
        "12": time.strftime("%H%M%S", stamp),
        "13": time.strftime("%m%d", stamp),
        "22": "011",
        "25": "00",
        "41": terminal.tid,
        "42": terminal.mid,
        "49": "156",
        "60": codec.format_f60(codec.Field60("22", terminal.batch, "000")),
    }


def reversal_fields(purchase: dict[str, str]) -> dict[str, str]:
    """The 0400 a terminal sends for a purchase that got no reply (`PosTerminal.financial`)."""
    kept = {k: v for k, v in purchase.items() if k not in ("2", "35", "52", "53", "37")}
    return {**kept, "t": "0400", "39": "98"}


def frame(terminal: PosTerminal, fields: dict[str, str], *, mac: bool = True) -> bytes:
    return codec.pack_frame(TPDU, HEADER, terminal.encode(fields, mac=mac))


def echo_frame(tid: str, stan: int = 1) -> bytes:
    body = codec.encode({"t": "0820", "11": f"{stan:06d}", "41": tid, "60": "00000001301"})
    return codec.pack_frame(TPDU, HEADER, body)


async def timed_purchase(terminal: PosTerminal, pan: str, amount: int) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = await asyncio.wait_for(terminal.purchase(pan, amount), REPLY_S_MAX)
    return reply, time.monotonic() - started


async def assert_served_quickly(host: str, port: int, r: Registered) -> None:
    """Isolation: a terminal that behaves, on a new connection, signs on and buys, quickly."""
    terminal = await signed_on(host, port, r)
    try:
        for _ in range(3):
            reply, elapsed = await timed_purchase(terminal, r.card.pan, 1)
            assert reply.code == "00", reply
            assert elapsed < QUICK_S, f"a purchase took {elapsed:.3f} s"
    finally:
        await terminal.close()


class Line(asyncio.Protocol):
    """A raw client connection: keeps every byte received, knows when it was closed, and
    tells when its own writes are held back (the peer does not read)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(time.monotonic())
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


async def connect(host: str, port: int, *, tiny: bool = False) -> tuple[asyncio.Transport, Line]:
    """A raw connection; `tiny`: the smallest buffers and segments the kernel allows, set
    before connecting, so that the server's socket buffers stay small too (its send buffer
    grows with our segment size: with loopback's 64 KiB segments it holds megabytes)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if tiny:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), REPLY_S_MAX)
        transport, line = await loop.create_connection(Line, sock=sock)
    except BaseException:
        sock.close()
        raise
    assert isinstance(transport, asyncio.Transport)
    return transport, line


async def closed_within(line: Line, seconds: float) -> float:
    """When the server closed `line`; fails if it is still open after `seconds`."""
    try:
        return await asyncio.wait_for(asyncio.shield(line.closed), seconds)
    except TimeoutError:
        pytest.fail(f"the connection is still open after {seconds} s")


def replies_in(data: bytes) -> list[dict[str, str]]:
    out = []
    while data:
        length = int.from_bytes(data[:2], "big")
        payload, data = data[2 : 2 + length], data[2 + length :]
        assert len(payload) == length, "a torn reply"
        split = codec.split_frame(payload)
        assert split.tpdu == codec.reply_tpdu(TPDU), split
        out.append(decode_reply(split.body))
    return out


async def wait_replies(
    line: Line, count: int, seconds: float = REPLY_S_MAX
) -> list[dict[str, str]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError):
            replies = replies_in(bytes(line.received))
            if len(replies) >= count:
                return replies
        if line.closed.done():
            break
        await asyncio.sleep(0.01)
    pytest.fail(f"{count} replies expected, got {bytes(line.received).hex()}")


# --- one connection's faults, on the shared `cardcore serve` -------------------------------------

DROPPED_PURCHASES = 8  # amounts 3**i: the debit's base-3 digits count each one's applications


async def test_a_purchase_whose_connection_drops_is_applied_once_or_not_and_a_reversal_undoes_it(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    payer, good = await register(http, serve.url, 2)
    account = payer.card.account_id
    before = await available(http, serve.url, account)
    terminal = await signed_on(serve.host, serve.port, payer)
    await terminal.close()  # it keeps its keys and STAN, and connects again when it sends
    purchases = []
    for i in range(DROPPED_PURCHASES):
        fields = purchase_fields(terminal, payer.card.pan, 3**i)
        transport, _ = await connect(serve.host, serve.port)
        transport.write(frame(terminal, fields))
        if i % 2:
            transport.abort()  # gone at once, before any reply
        else:
            transport.close()  # flushed, then closed: the reply finds no reader
        purchases.append(fields)

    # The server lives on; once it has dealt with all of them, each was applied once or not.
    try:
        assert (await asyncio.wait_for(terminal.echo(), REPLY_S_MAX)).code == "00"
        debit = before - await _settled_balance(http, serve.url, account)
        assert 0 <= debit < 3**DROPPED_PURCHASES, debit
        applied = [(debit // 3**i) % 3 for i in range(DROPPED_PURCHASES)]
        assert set(applied) <= {0, 1}, f"applied more than once: {applied}"

        # The terminal reverses each (it never heard back): none of them stays applied.
        for fields in purchases:
            reply = await asyncio.wait_for(
                terminal.exchange(reversal_fields(fields), mac=True), REPLY_S_MAX
            )
            assert reply.code == "00", reply
        assert await available(http, serve.url, account) == before
    finally:
        await terminal.close()
    await assert_served_quickly(serve.host, serve.port, good)


async def _settled_balance(http: aiohttp.ClientSession, url: str, account: int) -> int:
    """The balance once it stops moving (three equal reads 0.2 s apart), bounded."""
    last, same = None, 0
    for _ in range(50):
        now = await available(http, url, account)
        same = same + 1 if now == last else 0
        if same >= 2:
            return now
        last = now
        await asyncio.sleep(0.2)
    pytest.fail("the card's balance keeps moving")


ECHOES_ANSWERED = 'cardcore_gateway_messages_total{code="00",mti="0820"}'


async def test_a_peer_that_stops_reading_is_closed_within_the_write_timeout(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    (good,) = await register(http, serve.url, 1)
    dropped_before = await dropped_frames(http, serve.url, "write")
    transport, line = await connect(serve.host, serve.port, tiny=True)
    transport.pause_reading()  # it never reads a reply, and never closes
    echoes = echo_frame("HALFOPEN") * 64
    started = time.monotonic()

    async def flood() -> int:
        sent = 0
        while not line.closed.done():
            await line.writable.wait()
            if line.closed.done():
                break
            transport.write(echoes)
            sent += 64
            await asyncio.sleep(0)
        return sent

    flooding = asyncio.create_task(flood())
    try:
        # Its replies back up until the server's write blocks: the server stops answering
        # it (and reading from it). Others are served meanwhile.
        answered, stalled_at = await metric(http, serve.url, ECHOES_ANSWERED), time.monotonic()
        while time.monotonic() - stalled_at < 1.0:
            assert time.monotonic() - started < 2 * SLACK_S, "the server never stalled"
            await asyncio.sleep(0.05)
            now = await metric(http, serve.url, ECHOES_ANSWERED)
            if now != answered:
                answered, stalled_at = now, time.monotonic()
        await assert_served_quickly(serve.host, serve.port, good)
        # The server gives up on it (its count of connections dropped on a blocked write
        # moves), and is gone: read again, and the line ends after the replies it holds.
        closed_at = await counter_moves(
            http,
            serve.url,
            DROPPED.format(reason="write"),
            dropped_before,
            within_s=limits.GATEWAY_WRITE_S + SLACK_S,
        )
        transport.resume_reading()
        # Under load the client may take a while to drain what it holds before the end.
        await closed_within(line, 3 * SLACK_S)
        sent = await asyncio.wait_for(flooding, SLACK_S)
    finally:
        flooding.cancel()
        transport.abort()
    assert answered > 100, answered  # the echoes were answered until the buffers were full
    assert sent > answered
    blocked_s = closed_at - stalled_at
    assert limits.GATEWAY_WRITE_S - 1 <= blocked_s <= limits.GATEWAY_WRITE_S + SLACK_S, blocked_s
    assert await dropped_frames(http, serve.url, "write") == dropped_before + 1
    await assert_served_quickly(serve.host, serve.port, good)


async def test_a_sender_of_one_byte_a_second_is_closed_by_the_frame_timeout(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    (good,) = await register(http, serve.url, 1)
    dropped_before = await dropped_frames(http, serve.url, "slow")
    transport, line = await connect(serve.host, serve.port)
    data = echo_frame("TRICKLE1")
    assert len(data) > limits.GATEWAY_FRAME_READ_S + SLACK_S  # it cannot finish in time
    started = time.monotonic()

    async def trickle() -> None:
        for byte in data:
            if line.closed.done():
                return
            transport.write(bytes([byte]))
            await asyncio.sleep(1)

    trickling = asyncio.create_task(trickle())
    terminal = await signed_on(serve.host, serve.port, good)
    try:
        # A well-behaved terminal buys every half second while the trickle goes on.
        while not line.closed.done():
            assert time.monotonic() - started < limits.GATEWAY_FRAME_READ_S + SLACK_S, (
                "the slow sender is still connected"
            )
            reply, elapsed = await timed_purchase(terminal, good.card.pan, 1)
            assert reply.code == "00", reply
            assert elapsed < QUICK_S, elapsed
            await asyncio.sleep(0.5)
        closed_at = await closed_within(line, 0)
    finally:
        trickling.cancel()
        transport.abort()
        await terminal.close()
    elapsed = closed_at - started
    assert limits.GATEWAY_FRAME_READ_S - 1 <= elapsed <= limits.GATEWAY_FRAME_READ_S + SLACK_S
    assert not line.received, "the slow sender got a reply"
    assert await dropped_frames(http, serve.url, "slow") == dropped_before + 1
    await assert_served_quickly(serve.host, serve.port, good)


def _bad_tpdu() -> bytes:
    data = bytearray(echo_frame("BADTPDU1"))
    data[2] = 0x61
    return bytes(data)


CLOSING = {
    "length 0": (b"\x00\x00", "length"),
    "length 65535": (b"\xff\xff", "length"),
    "garbage": (b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n", "length"),
    "truncated frame": (echo_frame("TRUNC001")[:-7], "truncated"),
    "bad TPDU id": (_bad_tpdu(), "bad_tpdu"),
}


@pytest.mark.parametrize("case", CLOSING)
async def test_lost_framing_closes_the_connection_without_a_reply(
    serve: Serve, http: aiohttp.ClientSession, case: str
) -> None:
    data, reason = CLOSING[case]
    (good,) = await register(http, serve.url, 1)
    dropped_before = await dropped_frames(http, serve.url, reason)
    transport, line = await connect(serve.host, serve.port)
    try:
        transport.write(data)
        if case == "truncated frame":
            transport.write_eof()  # EOF in the middle of the frame
        started = time.monotonic()
        closed_at = await closed_within(line, CLOSE_S_MAX)
    finally:
        transport.abort()
    assert closed_at - started < CLOSE_S_MAX
    assert not line.received, bytes(line.received).hex()
    assert await dropped_frames(http, serve.url, reason) == dropped_before + 1
    await assert_served_quickly(serve.host, serve.port, good)


def _echo_body(tid: str, stan: int = 1) -> bytes:
    return echo_frame(tid, stan)[codec.LENGTH_BYTES + codec.TPDU_BYTES + codec.HEADER_BYTES :]


def _framed(body: bytes) -> bytes:
    return codec.pack_frame(TPDU, HEADER, body)


def _hex_in_bcd(tid: str) -> bytes:
    body = bytearray(_echo_body(tid))
    stan_at = codec.MTI_BYTES + codec.BITMAP_BYTES  # F11, the first field of an echo
    body[stan_at + 2] = 0x1A  # STAN 00001A
    return bytes(body)


ANSWERED_30 = {
    "trailing bytes": lambda tid: _echo_body(tid) + b"\x00",
    "hex digits in a BCD field": _hex_in_bcd,
}


@pytest.mark.parametrize("case", ANSWERED_30)
async def test_a_message_that_frames_but_does_not_decode_is_answered_30_and_the_line_stays(
    serve: Serve, http: aiohttp.ClientSession, case: str
) -> None:
    (good,) = await register(http, serve.url, 1)
    transport, line = await connect(serve.host, serve.port)
    try:
        transport.write(_framed(ANSWERED_30[case]("BADMSG01")))
        (reply,) = await wait_replies(line, 1)
        assert reply["t"] == "0830", reply
        assert reply["39"] == "30", reply
        transport.write(echo_frame("BADMSG01", 2))
        _, echo = await wait_replies(line, 2)
        assert echo["39"] == "00", echo
        assert echo["11"] == "000002", echo
        assert not line.closed.done()
    finally:
        transport.abort()
    await assert_served_quickly(serve.host, serve.port, good)


def _unserved(tid: str, stan: int) -> bytes:
    """An echo under MTI 0100 (an authorization request): a request we do not serve."""
    return _framed(bytes.fromhex("0100") + _echo_body(tid, stan)[codec.MTI_BYTES :])


async def test_an_mti_we_do_not_serve_is_answered_12_and_the_line_stays(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    (good,) = await register(http, serve.url, 1)
    count = limits.GATEWAY_BAD_FRAMES_MAX + 1  # more than close a line when unanswered
    transport, line = await connect(serve.host, serve.port)
    try:
        transport.write(b"".join(_unserved("NOSERV01", stan) for stan in range(1, count + 1)))
        replies = await wait_replies(line, count)
        assert [(r["t"], r["39"], r["11"], r["41"]) for r in replies] == [
            ("0110", "12", f"{stan:06d}", "NOSERV01") for stan in range(1, count + 1)
        ]
        transport.write(echo_frame("NOSERV01", count + 1))
        *_, echo = await wait_replies(line, count + 1)
        assert (echo["t"], echo["39"], echo["11"]) == ("0830", "00", f"{count + 1:06d}"), echo
        assert not line.closed.done()
    finally:
        transport.abort()
    await assert_served_quickly(serve.host, serve.port, good)


async def test_undecodable_messages_in_a_row_close_the_connection(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    (good,) = await register(http, serve.url, 1)
    no_mti = _framed(b"\xff\xff" + bytes(8))  # the MTI is not BCD: nothing to answer
    short = limits.GATEWAY_BAD_FRAMES_MAX - 1
    transport, line = await connect(serve.host, serve.port)
    try:
        # One short of the limit, then a good message: answered, and the count starts over.
        transport.write(no_mti * short + echo_frame("NOMTI001", 7))
        (echo,) = await wait_replies(line, 1)
        assert echo["39"] == "00" and echo["11"] == "000007", echo
        transport.write(no_mti * short + echo_frame("NOMTI001", 8))
        _, echo = await wait_replies(line, 2)
        assert echo["39"] == "00" and echo["11"] == "000008", echo
        assert not line.closed.done()
        # The limit in a row: closed, nothing more said.
        transport.write(no_mti * limits.GATEWAY_BAD_FRAMES_MAX)
        await closed_within(line, CLOSE_S_MAX)
    finally:
        transport.abort()
    assert len(replies_in(bytes(line.received))) == 2
    await assert_served_quickly(serve.host, serve.port, good)


# --- one terminal's flood ------------------------------------------------------------------------


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def test_a_flooding_terminal_is_slowed_down_and_others_keep_a_low_p99(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    flooder, *others = await register(http, serve.url, 6)
    flood = await signed_on(serve.host, serve.port, flooder)
    terminals = [await signed_on(serve.host, serve.port, r) for r in others]
    total = int(FLOOD_S * FLOOD_PER_S)
    codes: list[str] = []
    flood_times: list[float] = []

    async def send_flood() -> None:
        started = time.monotonic()
        flood_times.append(started)
        for i in range(total):
            await asyncio.sleep(max(0.0, started + i / FLOOD_PER_S - time.monotonic()))
            await flood.send_raw(frame(flood, purchase_fields(flood, flooder.card.pan, 1)))

    async def read_flood() -> None:
        for _ in range(total):
            codes.append((await flood.read_reply()).code)
        flood_times.append(time.monotonic())

    latencies: list[float] = []

    async def buy(terminal: PosTerminal, r: Registered) -> None:
        started = time.monotonic()
        while time.monotonic() - started < FLOOD_S:
            reply, elapsed = await timed_purchase(terminal, r.card.pan, 1)
            assert reply.code == "00", reply
            latencies.append(elapsed)
            await asyncio.sleep(0.1)  # 10 a second: well inside the terminal rate

    try:
        await asyncio.wait_for(
            asyncio.gather(
                send_flood(),
                read_flood(),
                *(buy(t, r) for t, r in zip(terminals, others, strict=True)),
            ),
            FLOOD_S + REPLY_S_MAX,
        )
    finally:
        for terminal in (flood, *terminals):
            await terminal.close()
    assert len(latencies) >= 5 * 20, len(latencies)
    assert _p99(latencies) < P99_S_MAX, sorted(latencies)[-5:]
    # The flooder: what its rate allows is approved (a burst, then the rate), the rest 91.
    rate = limits.GATEWAY_TERMINAL_RATE_PER_S
    allowed = rate * (1 + flood_times[1] - flood_times[0])
    assert len(codes) == total
    assert set(codes) <= {"00", "91"}, codes
    assert rate <= codes.count("00") <= allowed + 2, (codes.count("00"), allowed)
    assert codes.count("91") >= total - allowed - 2, (codes.count("91"), allowed)
    await assert_served_quickly(serve.host, serve.port, others[0])


# --- the ledger down: `cardcore ledger` and `cardcore gateway` as two processes ------------------


@dataclass
class Split:
    """A ledger and a gateway in two processes; every process started, to end them all."""

    tmp: Path
    db_url: str
    ledger_env: dict[str, str]
    gateway_env: dict[str, str]
    url: str
    saf_file: Path
    ledger: Proc
    gateway: Proc
    procs: list[Proc] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.gateway.gateway[0]

    @property
    def port(self) -> int:
        return self.gateway.gateway[1]

    async def restart_ledger(self) -> None:
        """A new ledger process on the same database and port."""
        self.ledger = await started(["ledger"], self.ledger_env, self.tmp, "ledger")
        self.procs.append(self.ledger)
        assert self.ledger.ready["url"] == self.url

    async def restart_gateway(self) -> None:
        """A new gateway process on the same store-and-forward file and port."""
        self.gateway = await started(["gateway"], self.gateway_env, self.tmp, "gateway")
        self.procs.append(self.gateway)


@pytest.fixture
async def split(tmp_path: Path) -> AsyncIterator[Split]:
    db_url = f"sqlite:///{tmp_path / 'split.db'}"
    await asyncio.to_thread(migrate.upgrade, db_url)
    saf_file = tmp_path / "saf.jsonl"
    ledger_env = _env(db_url)
    procs = []
    try:
        ledger = await started(["ledger"], ledger_env, tmp_path, "ledger")
        procs.append(ledger)
        url = ledger.ready["url"]
        gateway_env = _env(
            db_url, CARDCORE_GATEWAY_LEDGER_URLS=url, CARDCORE_GATEWAY_SAF_FILE=str(saf_file)
        )
        gateway = await started(["gateway"], gateway_env, tmp_path, "gateway")
        procs.append(gateway)
        yield Split(
            tmp_path, db_url, ledger_env, gateway_env, url, saf_file, ledger, gateway, procs
        )
    finally:
        for proc in procs:
            proc.kill()
    for proc in procs:
        _no_errors_logged(proc.log)


Owed = tuple[str, str, str]  # terminal, batch, STAN of a transaction to reverse


def saf_pending(path: Path) -> set[Owed]:
    """The reversals the gateway's store-and-forward file holds and the host has not
    confirmed (a torn last line, from a crash mid-append, is skipped as the gateway does)."""
    pending: dict[int, Owed] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "add" in record:
            r = record["request"]
            assert r["kind"] == "reverse", r
            pending[int(record["add"])] = (r["terminal"], r["batch"], r["stan"])
        else:
            pending.pop(int(record["done"]), None)
    return set(pending.values())


async def saf_drained(path: Path, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while saf_pending(path):
        if time.monotonic() > deadline:
            pytest.fail(f"reversals still owed after {within_s} s: {saf_pending(path)}")
        await asyncio.sleep(0.1)


@dataclass
class Book:
    """What each terminal was told: approved amounts, and the purchases answered 96."""

    approved: dict[str, int] = field(default_factory=dict)  # tid -> sum approved
    declined: list[Owed] = field(default_factory=list)
    slowed: int = 0  # 91: past the terminal's rate, refused before the host (nothing done)
    other: list[Reply] = field(default_factory=list)

    async def buy(self, terminal: PosTerminal, pan: str, amount: int) -> tuple[str, float]:
        reply, elapsed = await timed_purchase(terminal, pan, amount)
        if reply.code == "00":
            self.approved[terminal.tid] = self.approved.get(terminal.tid, 0) + amount
        elif reply.code == "96":
            self.declined.append((terminal.tid, terminal.batch, reply.fields["11"]))
        elif reply.code == "91":
            self.slowed += 1
        else:
            self.other.append(reply)
        return reply.code, elapsed


async def echo_quickly(terminal: PosTerminal) -> None:
    started_at = time.monotonic()
    reply = await asyncio.wait_for(terminal.echo(), REPLY_S_MAX)
    assert reply.code == "00", reply
    assert time.monotonic() - started_at < QUICK_S


async def run_verify(db_url: str) -> None:
    done = await asyncio.to_thread(
        run_cardcore,
        "ledger",
        "verify",
        "--db",
        db_url,
        cwd=PROJECT_ROOT,
        env=cardcore_env(CARDCORE_LOG_LEVEL="WARNING"),
        timeout_s=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.splitlines()[0])["status"] == "ok", done.stdout


async def test_with_the_ledger_down_purchases_get_96_in_time_and_are_reversed_once_it_is_back(
    split: Split, http: aiohttp.ClientSession
) -> None:
    *payers, watcher = await register(http, split.url, 4)
    initial = {r.tid: await available(http, split.url, r.card.account_id) for r in payers}
    terminals = [await signed_on(split.host, split.port, r) for r in payers]
    echoer = await signed_on(split.host, split.port, watcher)
    book = Book()
    amounts = itertools.count(101)
    try:
        for t, r in zip(terminals, payers, strict=True):
            assert (await book.buy(t, r.card.pan, next(amounts)))[0] == "00"

        # The ledger hangs: each purchase answers 96 when the host timeout runs out, and
        # the gateway answers echoes at once meanwhile.
        split.ledger.signal(signal.SIGSTOP)
        hung = [
            asyncio.create_task(book.buy(t, r.card.pan, next(amounts)))
            for t, r in zip(terminals, payers, strict=True)
        ]
        while not all(task.done() for task in hung):
            await echo_quickly(echoer)
            await asyncio.sleep(0.5)
        for code, elapsed in await asyncio.wait_for(asyncio.gather(*hung), REPLY_S_MAX):
            assert code == "96"
            assert HOST_TIMEOUT_S - 1 <= elapsed <= HOST_TIMEOUT_S + SLACK_S, elapsed
        assert set(book.declined) <= saf_pending(split.saf_file)

        # It wakes up (and may apply the purchases it held): the reversals owed reach it.
        split.ledger.signal(signal.SIGCONT)
        await saf_drained(split.saf_file, 5 * SLACK_S)

        # It dies under load: 96 at once while nothing listens, the reversals are stored.
        load_declined = len(book.declined)

        async def buy_until_refused(t: PosTerminal, r: Registered) -> None:
            refused = 0
            while refused < 2:
                code, elapsed = await book.buy(t, r.card.pan, next(amounts))
                if code == "96":
                    refused += 1
                    assert elapsed < REFUSED_S_MAX, elapsed
                elif code == "91":  # refusals come fast: past 20 a second, "slow down"
                    await asyncio.sleep(0.1)
                else:
                    assert code == "00", code

        load = [
            asyncio.create_task(buy_until_refused(t, r))
            for t, r in zip(terminals, payers, strict=True)
        ]
        await asyncio.sleep(0.3)
        split.ledger.kill()
        await asyncio.wait_for(asyncio.gather(*load), REPLY_S_MAX)
        await echo_quickly(echoer)
        owed = set(book.declined[load_declined:])
        assert len(owed) >= 2 * len(payers)
        assert owed <= saf_pending(split.saf_file)

        # Back on the same database: the reversals are delivered, and every purchase that
        # was answered 96 left the card as it was.
        await split.restart_ledger()
        await saf_drained(split.saf_file, 5 * SLACK_S)
        assert not book.other, [(r.code, r.fields.get("11")) for r in book.other]
        for r in payers:
            spent = initial[r.tid] - await available(http, split.url, r.card.account_id)
            assert spent == book.approved[r.tid], (r.tid, spent, book.approved[r.tid])
        await assert_served_quickly(split.host, split.port, watcher)
    finally:
        for terminal in (*terminals, echoer):
            await terminal.close()
    await run_verify(split.db_url)


async def test_reversals_owed_survive_a_gateway_restart_and_are_delivered_after_it(
    split: Split, http: aiohttp.ClientSession
) -> None:
    payer, good = await register(http, split.url, 2)
    account = payer.card.account_id
    before = await available(http, split.url, account)
    terminal = await signed_on(split.host, split.port, payer)
    try:
        split.ledger.kill()
        reply, elapsed = await timed_purchase(terminal, payer.card.pan, 777)
        assert reply.code == "96", reply
        assert elapsed < REFUSED_S_MAX
        owed = (payer.tid, terminal.batch, reply.fields["11"])
        assert saf_pending(split.saf_file) == {owed}
    finally:
        await terminal.close()

    # The gateway dies before it could deliver; the ledger comes back; nothing was sent.
    split.gateway.kill()
    await split.restart_ledger()
    assert saf_pending(split.saf_file) == {owed}

    # A new gateway on the same file delivers what the old one owed.
    await split.restart_gateway()
    await saf_drained(split.saf_file, 5 * SLACK_S)
    assert await available(http, split.url, account) == before
    # Delivered, not lost: the purchase itself, sent again under its STAN, finds its
    # reversal there first (12) and is never applied.
    again = await signed_on(split.host, split.port, payer)
    try:
        again.stan = f"{int(owed[2]) - 1:06d}"
        reply, _ = await timed_purchase(again, payer.card.pan, 777)
        assert reply.fields["11"] == owed[2]
        assert reply.code == "12", reply
    finally:
        await again.close()
    assert await available(http, split.url, account) == before
    await assert_served_quickly(split.host, split.port, good)
    await run_verify(split.db_url)


def _sign_on_frame(tid: str, stan: int) -> bytes:
    fields = {"t": "0800", "11": f"{stan:06d}", "41": tid, "42": MID, "60": "00000001005"}
    return codec.pack_frame(TPDU, HEADER, codec.encode(fields))


async def test_a_sign_on_with_a_malformed_terminal_id_does_not_fail_other_terminals(
    split: Split, http: aiohttp.ClientSession
) -> None:
    payers = await register(http, split.url, 3)
    terminals = [await signed_on(split.host, split.port, r) for r in payers]
    stop = asyncio.Event()
    rogue_replies: list[str] = []

    async def rogue() -> None:
        """Signs on as 'BAD-TID!' again and again (sign-ons are not rate limited)."""
        transport, line = await connect(split.host, split.port)
        try:
            for n in itertools.count(1):
                if stop.is_set():
                    return
                transport.write(_sign_on_frame("BAD-TID!", n))
                replies = await wait_replies(line, n)
                rogue_replies.append(replies[-1]["39"])
        finally:
            transport.abort()

    async def buy(t: PosTerminal, r: Registered) -> list[str]:
        codes = []
        for _ in range(10):
            reply, _ = await timed_purchase(t, r.card.pan, 1)
            codes.append(reply.code)
            await asyncio.sleep(0.05)
        return codes

    rogues = [asyncio.create_task(rogue()) for _ in range(4)]
    try:
        codes = await asyncio.wait_for(
            asyncio.gather(*(buy(t, r) for t, r in zip(terminals, payers, strict=True))),
            REPLY_S_MAX,
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*rogues, return_exceptions=True), REPLY_S_MAX)
        for terminal in terminals:
            await terminal.close()
    assert rogue_replies, "the rogue terminal was never answered"
    assert all(code == "00" for c in codes for code in c), codes
