"""Shared pieces of the POS certification tests (tests/e2e/test_pos_certification.py).

- `CardcoreServer`: a real `cardcore serve` process with its terminal gateway (CARDCORE_KEK
  set), its stderr kept in one file across restarts, and a `vault` of every secret the run
  handed out or used (card numbers, master keys, working keys, PINs, the KEK) so the log can
  be scanned for them at the end.
- `Kit`: what a POS vendor gets from the host's operator: terminals registered and cards
  issued over the internal HTTP API, account balances over GET /internal/v1/accounts/{id}.
- `CertTerminal`: the reference terminal, checking every reply strictly (MTI + 10, echoed
  F3/F11/F41/F42, header, and a MAC that verifies under the session MAK on every reply to a
  MAC'd request except A0 and 77).
- Field builders for hand-made messages: `message`, `reversal_of`, `bad_mac_frame`.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import aiohttp
import pytest
from sqlalchemy.engine import make_url

from cardcore import migrate
from cardcore.cards.model import luhn_digit, luhn_ok
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import HEADER, TPDU, PosTerminal, Reply
from tests import logscan
from tests.conftest import PG_URL, drop_pg_database, new_pg_database
from tests.helpers import cardcore_env, free_port

START_S_MAX = 30
STOP_S_MAX = 20
REPLY_S_MAX = 10.0
LEGAL_ENTITY = "LE-CERT"
# Replies a host cannot (or need not) MAC: a MAC error, no session, and a merchant id that is
# not the terminal's (refused before the MAC is looked at).
UNMACED_CODES = frozenset({"A0", "77", "03"})


# --- the server ------------------------------------------------------------------------------


class CardcoreServer:
    """`python -m cardcore serve` on loopback with the POS gateway, restartable on the same
    ports and database; stderr appended to one log file for the whole module."""

    def __init__(self, db_url: str, workdir: Path) -> None:
        self.db_url = db_url
        self.workdir = workdir
        kek = secrets.token_bytes(32).hex()
        self.env = cardcore_env(
            CARDCORE_DB_URL=db_url,
            CARDCORE_PORT=str(free_port()),
            CARDCORE_KEK=kek,
            CARDCORE_GATEWAY_SAF_FILE=str(workdir / "gateway-saf.jsonl"),
            CARDCORE_LOG_LEVEL="DEBUG",
        )
        self.log = workdir / "server-stderr.log"
        logscan.SCAN.files.append(self.log)  # the whole run's log scan reads it at the end
        self.vault: dict[str, str] = {"kek": kek}  # label -> secret text (hex or digits)
        self.url = ""
        self.gateway_host = ""
        self.gateway_port = 0
        self.starts = 0
        self._process: subprocess.Popen[str] | None = None
        self._stderr: TextIO | None = None

    def start(self) -> None:
        assert self._process is None, "already running"
        self._stderr = self.log.open("a", encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-m", "cardcore", "serve"],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._process = process
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)

        threading.Thread(target=read, daemon=True).start()
        try:
            ready = json.loads(lines.get(timeout=START_S_MAX))
        except queue.Empty:
            self.kill()
            raise AssertionError(f"no listening line in {START_S_MAX} s: {self.stderr}") from None
        assert ready["event"] == "listening", ready
        assert "gateway" in ready, f"the gateway did not start: {ready}"
        self.url = str(ready["url"])
        host, _, port = str(ready["gateway"]).rpartition(":")
        self.gateway_host, self.gateway_port = host, int(port)
        self.starts += 1

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        process = self._process
        assert process is not None, "not running"
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_S_MAX)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {STOP_S_MAX} s after SIGTERM") from None
        self._closed()
        return code

    def kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_S_MAX)
        self._closed()

    def _closed(self) -> None:
        for label, value in self.vault.items():
            logscan.SCAN.remember(label, value)
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8") if self.log.exists() else ""


# --- the host's operator API --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registered:
    tid: str
    mid: str
    mode: KeyMode
    tmk: bytes = field(repr=False)
    kcv: str


@dataclass(frozen=True, slots=True)
class Issued:
    pan: str = field(repr=False)
    account_id: int


def new_tid() -> str:
    return "C" + secrets.token_hex(4)[:7].upper()


def unissued_pan() -> str:
    """A 19-digit number with a valid check digit that no card has (12 random digits)."""
    body = "628888" + "".join(secrets.choice("0123456789") for _ in range(12))
    return body + luhn_digit(body)


def bad_luhn(pan: str) -> str:
    """`pan` with its check digit changed: the Luhn check fails."""
    wrong = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    assert not luhn_ok(wrong)
    return wrong


def available(account: Mapping[str, Any]) -> int:
    """What a stored-value card may spend (credits posted - debits posted and held)."""
    return (
        int(account["credits_posted"])
        - int(account["debits_posted"])
        - int(account["debits_pending"])
    )


class Kit:
    """A test's handle on the host: register terminals, issue cards, read balances. Closes
    its terminals' connections at the end."""

    def __init__(self, server: CardcoreServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.terminals: list[CertTerminal] = []

    async def __aenter__(self) -> Kit:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for term in self.terminals:
            await term.close()
        await self.session.close()

    async def post(self, path: str, body: Mapping[str, Any]) -> Any:
        async with self.session.post(self.server.url + path, json=body) as response:
            document = await response.json()
            assert response.status == 201, (path, response.status, document)
            return document

    async def register(self, mode: KeyMode = KeyMode.AES) -> Registered:
        tid = new_tid()
        mid = f"M{tid}000000"
        body = {
            "tid": tid,
            "mid": mid,
            "store": f"store-{tid}",
            "legal_entity": LEGAL_ENTITY,
            "key_mode": str(mode),
        }
        answer = await self.post("/internal/v1/terminals", body)
        assert answer["tid"] == tid and answer["key_mode"] == str(mode), answer
        tmk = bytes.fromhex(answer["tmk"])
        self.server.vault[f"tmk {tid}"] = answer["tmk"]
        return Registered(tid, mid, mode, tmk, answer["kcv"])

    def terminal_for(self, reg: Registered, *, mode: KeyMode | None = None) -> CertTerminal:
        """A terminal holding `reg`'s master key, not signed on (`mode` may differ from the
        registered one, to ask for the wrong key mode)."""
        term = CertTerminal(
            host=self.server.gateway_host,
            port=self.server.gateway_port,
            tid=reg.tid,
            mid=reg.mid,
            tmk=reg.tmk,
            mode=reg.mode if mode is None else mode,
            timeout_s=REPLY_S_MAX,
            vault=self.server.vault,
        )
        self.terminals.append(term)
        return term

    async def terminal(self, mode: KeyMode = KeyMode.AES) -> CertTerminal:
        """A newly registered terminal, signed on."""
        term = self.terminal_for(await self.register(mode))
        reply = await term.sign_on()
        assert reply.code == "00", reply.fields
        return term

    async def cards(self, count: int, balance: int, balance_max: int = 0) -> list[Issued]:
        body = {
            "legal_entity": LEGAL_ENTITY,
            "count": count,
            "balance": balance,
            "balance_max": balance_max,
        }
        answer = await self.post("/internal/v1/cards", body)
        issued = [Issued(str(c["pan"]), int(c["account_id"])) for c in answer["cards"]]
        assert len(issued) == count, answer
        for card in issued:
            self.server.vault[f"pan of account {card.account_id}"] = card.pan
        return issued

    async def card(self, balance: int) -> Issued:
        return (await self.cards(1, balance))[0]

    async def account(self, account_id: int) -> dict[str, Any]:
        url = f"{self.server.url}/internal/v1/accounts/{account_id}"
        async with self.session.get(url) as response:
            document = await response.json()
            assert response.status == 200, document
            assert isinstance(document, dict)
            return document

    async def available(self, account_id: int) -> int:
        return available(await self.account(account_id))

    async def wait_available(self, account_id: int, expected: int, timeout_s: float = 5) -> None:
        """Poll the account until its available balance is `expected` (fail after timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = await self.available(account_id)
            if now == expected:
                return
            assert time.monotonic() < deadline, f"balance stays {now}, expected {expected}"
            await asyncio.sleep(0.02)


# --- the terminal -------------------------------------------------------------------------------


def reply_mac_ok(mode: KeyMode, mak: bytes, reply: Reply) -> bool:
    """Whether the reply carries F64 and it verifies under `mak`, over the bytes received."""
    tag = reply.fields.get("64")
    if tag is None:
        return False
    body = reply.raw[codec.LENGTH_BYTES + codec.TPDU_BYTES + codec.HEADER_BYTES :]
    if body[-codec.MAC_BYTES :] != bytes.fromhex(tag):
        return False  # F64 is not the message's last 8 bytes
    return security.verify_mac(mode, mak, codec.mac_input(body), bytes.fromhex(tag))


def reply_problems(
    sent: Mapping[str, str], reply: Reply, mode: KeyMode, mak: bytes | None, *, maced: bool
) -> list[str]:
    """What is wrong with `reply` as the answer to `sent` (empty when nothing is)."""
    f = reply.fields
    problems = []
    if f.get("t") != f"{int(sent['t']) + 10:04d}":
        problems.append(f"MTI {f.get('t')} answers {sent['t']}")
    for name in ("3", "11", "41", "42"):
        if name in sent and f.get(name) != sent[name]:
            problems.append(f"F{name} {f.get(name)!r} does not echo {sent[name]!r}")
    if "39" not in f:
        problems.append("no F39")
    head = reply.raw[codec.LENGTH_BYTES + codec.TPDU_BYTES :][: codec.HEADER_BYTES]
    if head[:2] != HEADER[:2] or head[3:] != HEADER[3:] or head[2] >> 4 != HEADER[2] >> 4:
        problems.append(f"header {head.hex()} does not echo {HEADER.hex()}")
    needs_mac = maced and mak is not None and reply.code not in UNMACED_CODES
    if needs_mac and mak is not None and not reply_mac_ok(mode, mak, reply):
        problems.append(f"reply {reply.code} has no MAC verifying under the session MAK")
    return problems


@dataclass
class CertTerminal(PosTerminal):
    """The reference terminal, strict about every reply; keeps its secrets in `vault`."""

    vault: dict[str, str] = field(default_factory=dict, repr=False)
    replies_checked: int = 0

    def _check_reply(self, sent: dict[str, str], reply: Reply, *, mac: bool) -> None:
        super()._check_reply(sent, reply, mac=mac)
        mak = None if self.keys is None else self.keys.mak
        problems = reply_problems(sent, reply, self.mode, mak, maced=mac)
        assert not problems, (problems, reply.fields)
        self.replies_checked += 1

    async def sign_on(self) -> Reply:
        reply = await super().sign_on()
        if self.keys is not None:
            self.vault[f"pik {self.tid} {self.stan}"] = self.keys.pik.hex()
            self.vault[f"mak {self.tid} {self.stan}"] = self.keys.mak.hex()
        return reply

    def owe_reversal(self, reversal: dict[str, str]) -> None:
        """Remember a reversal to send before the next financial request (as after a lost
        reply)."""
        self.pending_reversal = reversal

    async def send(self, fields: dict[str, str]) -> Reply:
        """One hand-made MAC'd request and its (strictly checked) reply."""
        return await self.exchange(fields, mac=True)

    async def send_macd(self, fields: dict[str, str]) -> Reply:
        """One hand-made MAC'd request (a 0320 line or end, a 0500), its reply's MAC checked."""
        return await self.exchange(fields, mac=True)

    def frame(self, fields: dict[str, str]) -> bytes:
        return codec.pack_frame(TPDU, HEADER, self.encode(fields, mac=True))

    async def send_and_drop(self, fields: dict[str, str]) -> None:
        """Send a MAC'd request and close the line before any reply: the reply is lost."""
        await self.send_raw(self.frame(fields))
        await self.close()

    async def send_bad_mac(self, fields: dict[str, str]) -> Reply:
        """Send `fields` with a wrong MAC; the reply (not checked: it carries no MAC)."""
        await self.send_raw(bad_mac_frame(self, fields))
        return await self.read_reply()


# --- hand-made messages -------------------------------------------------------------------------


def ordered(fields: Mapping[str, str]) -> dict[str, str]:
    return {k: fields[k] for k in sorted(fields, key=lambda n: -1 if n == "t" else int(n))}


def message(
    term: PosTerminal,
    mti: str,
    pcode: str | None,
    txn_type: str,
    *,
    pan: str | None = None,
    amount: int | None = None,
    net: str = "000",
    **extra: str,
) -> dict[str, str]:
    """A request as the terminal would build it (next STAN, its batch), plus `extra` fields
    by number (`**{"61": ...}`); extra wins over the defaults (F12/F13 for other dates)."""
    now = time.localtime()
    fields = {"t": mti, "11": term.next_stan()}
    if pcode is not None:
        fields["3"] = pcode
    fields["12"] = time.strftime("%H%M%S", now)
    fields["13"] = time.strftime("%m%d", now)
    fields["41"] = term.tid
    fields["42"] = term.mid
    fields["60"] = codec.format_f60(codec.Field60(txn_type, term.batch, net))
    if pan is not None:
        fields["2"] = pan
        fields["22"] = "011"
    if amount is not None:
        fields["4"] = f"{amount:012d}"
    if mti in ("0200", "0220"):
        fields["25"] = "00"
        fields["49"] = "156"
    fields.update(extra)
    return ordered(fields)


def purchase_fields(term: PosTerminal, pan: str, amount: int, **extra: str) -> dict[str, str]:
    return message(term, "0200", "000000", "22", pan=pan, amount=amount, **extra)


def reversal_of(original: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The 0400 a terminal sends for `original` (reason 98: no reply): the same STAN and
    batch, no card data, PIN or RRN."""
    kept = {k: v for k, v in original.items() if k not in ("2", "35", "52", "53", "37", "64")}
    return ordered({**kept, "t": "0400", "39": "98", **extra})


def bad_mac_frame(term: PosTerminal, fields: dict[str, str]) -> bytes:
    """The framed request with every bit of its MAC flipped."""
    body = term.encode(fields, mac=True)
    wrong = bytes(b ^ 0xFF for b in body[-codec.MAC_BYTES :])
    return codec.pack_frame(TPDU, HEADER, codec.set_mac(body, wrong))


def amount12(amount: int) -> str:
    return f"{amount:012d}"


def random_pin_block(size: int) -> str:
    return os.urandom(size).hex().upper()


# --- the module fixtures ------------------------------------------------------------------------


def server_fixtures(prefix: str) -> tuple[Any, Any, Any, Any]:
    """A module's `sqlite_server` and `postgresql_server` (one real server each for the
    module, started once), `server` (the test's backend: both, by parameter) and `kit`:
        sqlite_server, postgresql_server, server, kit = server_fixtures("pos-cards")"""

    @pytest.fixture(scope="module")
    def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CardcoreServer]:
        work = tmp_path_factory.mktemp(f"{prefix}-sqlite")
        url = f"sqlite:///{work / 'pos.db'}"
        migrate.upgrade(url)
        running = CardcoreServer(url, work)
        running.start()
        yield running
        running.kill()

    @pytest.fixture(scope="module")
    def postgresql_server(
        tmp_path_factory: pytest.TempPathFactory, pg_template: str
    ) -> Iterator[CardcoreServer]:
        name = new_pg_database(pg_template)
        url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
        running = CardcoreServer(url, tmp_path_factory.mktemp(f"{prefix}-postgresql"))
        try:
            running.start()
            yield running
        finally:
            running.kill()
            drop_pg_database(name)

    @pytest.fixture(params=("sqlite", "postgresql"))
    def server(request: pytest.FixtureRequest) -> CardcoreServer:
        running: CardcoreServer = request.getfixturevalue(f"{request.param}_server")
        return running

    @pytest.fixture
    async def kit(server: CardcoreServer) -> AsyncIterator[Kit]:
        async with Kit(server, aiohttp.ClientSession()) as k:
            yield k

    return sqlite_server, postgresql_server, server, kit
