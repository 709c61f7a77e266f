"""Fuzz the terminal gateway in process: a real `GatewayServer` on loopback and its `Processor`,
in front of a fake host that answers at once.

Two oracles. The listener: the bytes of each connection are run through a model of the
listener's framing (`server_view`) and of the processor's reply-or-not rule
(`Read.expects_reply`), so every connection must get exactly the predicted replies, in order,
each a well-formed frame with the request's TPDU swapped, its header echoed and its MTI + 10, and
then be closed; afterwards a terminal still signs on, echoes and buys. The processor: tens of
thousands of mutated and structurally random messages straight into `Processor.handle`, which
answers None exactly when the model says so, else a reply that decodes. Neither may log an
error or a traceback, and every wait is bounded.

The fake host also checks that every request the processor makes survives the wire of the
HTTP host (`request_json` then `parse_request`, what `cardcore gateway` and the ledger do).

The tests at the end of this file pin bugs the fuzz found that are fixed since.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import logging
import random
import string
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cardcore import limits
from cardcore.cards.model import (
    Kind,
    Outcome,
    PosRequest,
    PosRequestError,
    PosResult,
    parse_request,
    request_json,
)
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.host import HostUnavailable, InProcessHost
from cardcore.frontend_gateway.processor import Processor
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.security import KeyMode, WorkingKeys
from cardcore.frontend_gateway.server import GatewayServer
from cardcore.frontend_gateway.terminal import PosTerminal
from cardcore.metrics import Metrics

pytestmark = pytest.mark.timeout(120)

SEED = 8583
KEK = bytes(range(32))
# Terminals the fake host knows, two characters apart so that one flipped byte does not turn
# one into another: two fuzz connections at a time per terminal, and one left untouched.
TIDS = ("FUZZA001", "FUZZB002", "FUZZC003")
TID = TIDS[0]
MID = "FUZZMERCHANT001"
TMK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
BATCH = "000001"
PAN = "6288881234567890123"
MAC_KINDS = frozenset({"0200", "0220", "0400"})
REPLY_WAIT_S = 5  # one message through the processor, or one reply on the line
CONNECTION_S_MAX = 15  # one fuzz connection, from connect to the server's close
PROCESSOR_CASES = 20_000
SERVER_WORKERS = 4  # connections open at the same time, two per terminal
SERVER_ROUNDS = 40  # connections per worker, one after the other
JUNK_CONNECTIONS = 40  # connections that carry only random bytes

_DIGITS = string.digits
_ALNUM = string.ascii_letters + string.digits
_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


# --- the fake host -------------------------------------------------------------------------------


@dataclass
class FakeHost:
    """Signs on TIDS (AES), approves everything else at once. With `rng` it also answers other
    outcomes, UNAVAILABLE, or nothing (HostUnavailable) now and then."""

    rng: random.Random | None = None
    sealed: dict[str, str] = field(
        default_factory=lambda: {
            tid: security.seal(KEK, TMK, b"tmk:" + tid.encode()).hex() for tid in TIDS
        }
    )
    requests: int = 0
    wire_problems: list[str] = field(default_factory=list)

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        self.requests += len(requests)
        for r in requests:
            self._check_wire(r)
        if self.rng is not None and self.rng.random() < 0.01:
            raise HostUnavailable("fuzz: the host does not answer")
        return [self._answer(r) for r in requests]

    async def close(self) -> None:
        return None

    def _check_wire(self, r: PosRequest) -> None:
        """What `HttpHost` sends and the ledger's `POST /internal/v1/pos` reads back."""
        try:
            back: PosRequest | None = parse_request(request_json(r), "requests[0]")
        except PosRequestError as exc:
            back, problem = None, f"{r.kind} refused by the host's wire: {exc}"
        else:
            problem = f"{r.kind} changed on the wire: {r} -> {back}"
        if back != r:
            self.wire_problems.append(problem)

    def _answer(self, r: PosRequest) -> PosResult:
        if r.kind is Kind.SIGN_ON:
            sealed = self.sealed.get(r.terminal)
            if sealed is None:
                return PosResult(Outcome.TERMINAL_UNKNOWN)
            return PosResult(
                Outcome.APPROVED, batch=BATCH, mid=MID, key_mode="aes", tmk_sealed=sealed
            )
        rng = self.rng or random.Random(0)
        if self.rng is not None and rng.random() < 0.1:
            outcome = rng.choice(list(Outcome))
            return PosResult(outcome, batch=BATCH if outcome is Outcome.BATCH_MISMATCH else "")
        if r.kind is Kind.SETTLE:
            totals = r.totals if rng.random() < 0.5 else (rng.randrange(10**12), 1, 0, 0)
            return PosResult(Outcome.APPROVED, totals=totals, balanced=totals == r.totals)
        if r.kind is Kind.UPLOAD:
            unmatched = tuple(stan for stan, _ in r.lines if rng.random() < 0.3)
            return PosResult(Outcome.APPROVED, balanced=not unmatched, unmatched=unmatched)
        return PosResult(
            Outcome.APPROVED,
            # F54 carries twelve digits: now and then a balance it cannot carry
            balance=rng.randrange(10**12)
            if rng.random() < 0.95
            else rng.randrange(-(10**15), 10**15),
            amount=r.amount,
            rrn=f"{rng.randrange(10**12):012d}",
            auth_code=f"{rng.randrange(10**6):06d}",
        )


# --- messages ------------------------------------------------------------------------------------


def _text(rng: random.Random, alphabet: str, size: int) -> str:
    return "".join(rng.choices(alphabet, k=size))


def random_value(rng: random.Random, key: str) -> str:
    """A value that `codec.encode` accepts for field `key`, of any length the layout allows."""
    f = codec.LAYOUT[key]
    size = f.max_len if f.prefix_bytes == 0 else rng.randint(f.min_len, f.max_len)
    if key == "11":  # STAN, time and date must make sense too; mutations break them
        return f"{rng.randrange(1, 10**6):06d}"
    if key == "12":
        return f"{rng.randrange(24):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
    if key == "14":
        return f"{rng.randrange(100):02d}{rng.randint(1, 12):02d}"
    if key in ("13", "15"):
        month = rng.randint(1, 12)
        return f"{month:02d}{rng.randint(1, calendar.monthrange(2024, month)[1]):02d}"  # 0229 too
    if f.kind == "n":
        return _text(rng, _DIGITS, size)
    if f.kind == "z":
        pan = _text(rng, _DIGITS, rng.randint(codec.PAN_DIGITS_MIN, codec.PAN_DIGITS_MAX))
        return pan + "=" + _text(rng, _DIGITS, rng.randint(0, f.max_len - len(pan) - 1))
    if f.kind == "an":
        return _text(rng, _ALNUM, size)
    if f.kind == "ans":
        return _text(rng, _PRINTABLE, size)
    if key == "52":
        size = rng.choice((8, 16))
    return rng.randbytes(size).hex().upper()


def _ordered(fields: dict[str, str]) -> dict[str, str]:
    return {k: fields[k] for k in sorted(fields, key=lambda n: -1 if n == "t" else int(n))}


def base(
    rng: random.Random, mti: str, pcode: str | None, txn: str, net: str, tid: str = TID
) -> dict[str, str]:
    fields = {"t": mti}
    if pcode is not None:
        fields["3"] = pcode
    fields |= {
        "11": f"{rng.randrange(1, 10**6):06d}",
        "12": "123456",
        "13": "0601",
        "41": tid,
        "42": MID,
        "60": txn + BATCH + net,
    }
    return fields


def _card(rng: random.Random, fields: dict[str, str], keys: WorkingKeys | None) -> None:
    if rng.random() < 0.2:
        fields["35"] = PAN + "=2512"
    else:
        fields["2"] = PAN
    fields["22"] = "021"
    if keys is not None and rng.random() < 0.2:
        fields["52"] = security.pin_block_4("1234", PAN, keys.pik).hex().upper()


def template(rng: random.Random, keys: WorkingKeys | None, tid: str) -> dict[str, str]:
    """One of the messages a terminal sends, valid, with random STAN, amount and originals."""
    amount = f"{rng.randrange(1, 10**6):012d}"
    original = BATCH + f"{rng.randrange(1, 10**6):06d}"
    kind = rng.randrange(15)
    if kind == 0:
        return base(rng, "0820", None, "00", "301", tid)
    if kind == 1:
        return base(rng, "0820", None, "00", rng.choice(("002", "999")), tid)
    if kind == 2:
        return base(rng, "0800", None, "00", rng.choice(("005", "005", "003")), tid)
    if kind in (3, 4, 5, 6):
        pcode = rng.choice(("000000", "310000", "630000", "900000", "910000", "920000", "930000"))
        fields = base(rng, "0200", pcode, "22", "000", tid)
        _card(rng, fields, keys)
        return fields | {"4": amount, "25": "00", "49": "156"}
    if kind == 7:
        fields = base(rng, "0200", "200000", "23", "000", tid)
        _card(rng, fields, keys)
        return fields | {"4": amount, "25": "00", "49": "156", "61": original}
    if kind == 8:
        fields = base(rng, "0220", "200000", "25", "000", tid)
        _card(rng, fields, keys)
        rrn = f"{rng.randrange(10**12):012d}"
        return fields | {"4": amount, "25": "00", "37": rrn, "49": "156", "61": original}
    if kind == 9:
        fields = base(rng, "0220", rng.choice(("630000", "000000")), "49", "000", tid)
        return fields | {"4": amount, "25": "00", "49": "156", "61": original}
    if kind == 10:
        fields = base(rng, "0400", "000000", "22", "000", tid)
        return fields | {"4": amount, "25": "00", "39": "98"}
    if kind == 11:
        totals = codec.Totals(rng.randrange(10**12), rng.randrange(1000), 0, 0)
        fields = base(rng, "0500", None, "00", "201", tid)
        return fields | {"48": codec.format_totals(totals, "0"), "49": "156"}
    if kind == 12:
        lines = "".join(
            f"{rng.randrange(1, 10**6):06d}{rng.randrange(10**12):012d}"
            for _ in range(rng.randint(1, 8))
        )
        return base(rng, "0320", None, "00", "201", tid) | {"48": lines}
    if kind == 13:
        totals = codec.Totals(rng.randrange(10**12), rng.randrange(1000), 0, 0)
        fields = base(rng, "0320", None, "00", rng.choice(("202", "207")), tid)
        return fields | {"48": codec.format_totals(totals, "0")}
    return {"t": rng.choice(sorted(codec.MTIS))} | {
        key: random_value(rng, key) for key in rng.sample(sorted(codec.LAYOUT), rng.randint(0, 8))
    }


def perturb(rng: random.Random, fields: dict[str, str]) -> dict[str, str]:
    """Valid but unexpected content: fields replaced by random values, dropped or added."""
    out = dict(fields)
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        key = rng.choice(sorted(codec.LAYOUT))
        action = rng.random()
        if action < 0.4 and key in out:
            del out[key]
        else:
            out[key] = random_value(rng, key)
    if rng.random() < 0.05:
        out["41"] = random_value(rng, "41")
    if rng.random() < 0.05:
        out["42"] = random_value(rng, "42")
    return out


def encode(rng: random.Random, fields: dict[str, str], keys: WorkingKeys | None) -> bytes:
    """The message, MAC'd under `keys` where a terminal would MAC it (now and then not)."""
    fields = _ordered({k: v for k, v in fields.items() if k != "64"})
    if fields["t"] not in MAC_KINDS or keys is None or rng.random() < 0.05:
        if rng.random() < 0.3:
            fields["64"] = random_value(rng, "64")
        return codec.encode(_ordered(fields))
    return maced(fields, keys)


def maced(fields: dict[str, str], keys: WorkingKeys) -> bytes:
    body = codec.encode(codec.with_mac_placeholder(_ordered(fields)))
    return codec.set_mac(body, security.mac(KeyMode.AES, keys.mak, codec.mac_input(body)))


def structured(rng: random.Random, keys: WorkingKeys | None, tid: str = TID) -> bytes:
    return encode(rng, perturb(rng, template(rng, keys, tid)), keys)


def mutate(rng: random.Random, body: bytes, other: bytes) -> bytes:
    """`body` with bytes flipped, cut, added, moved or replaced; or random bytes."""
    data = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(11)
        at = rng.randrange(len(data) + 1)
        if choice == 0 and data:  # flip bits
            data[min(at, len(data) - 1)] ^= rng.randrange(1, 256)
        elif choice == 1:  # truncate
            del data[at:]
        elif choice == 2:  # extend
            data += rng.randbytes(rng.randint(1, 24))
        elif choice == 3:  # insert
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice == 4:  # delete a slice
            del data[at : at + rng.randint(1, 8)]
        elif choice == 5:  # splice with another message
            data = data[:at] + other[rng.randrange(len(other) + 1) :]
        elif choice == 6 and len(data) >= 10:  # bitmap bits
            data[2 + rng.randrange(8)] ^= 1 << rng.randrange(8)
        elif choice == 7 and len(data) >= 2:  # another MTI, known or not
            mti = rng.choice([*sorted(codec.MTIS), "0100", "0140", "0420", "0210", "9999", "0A00"])
            data[0:2] = bytes.fromhex(mti)
        elif choice == 8 and data:  # a nibble A-F into a BCD spot
            data[min(at, len(data) - 1)] |= 0x0A
        elif choice == 9:  # duplicate a slice
            piece = data[at : at + rng.randint(1, 16)]
            data[at:at] = piece
        else:  # random bytes
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(data)


@dataclass(frozen=True, slots=True)
class Read:
    """What the processor reads in a message: its fields, else the MTI its FormatError names."""

    fields: dict[str, str] | None
    mti: str | None

    @property
    def expects_reply(self) -> bool:
        """The processor answers every message whose MTI is a request or an advice (served
        or not: 12 to one we do not serve), no other."""
        if self.mti is None:
            return False
        try:
            codec.response_mti(self.mti)
        except ValueError:
            return False
        return True


def read(body: bytes) -> Read:
    try:
        fields = codec.decode(body)
    except codec.FormatError as exc:
        return Read(None, exc.mti)
    return Read(fields, fields["t"])


def decode_reply(body: bytes) -> dict[str, str]:
    """A reply's fields. The 12 to an MTI we do not serve goes out under that MTI + 10
    (0110), which decode refuses: its fields are read under 0210."""
    mti = body[: codec.MTI_BYTES].hex()
    if mti in codec.MTIS:
        return codec.decode(body)
    return codec.decode(bytes.fromhex("0210") + body[codec.MTI_BYTES :]) | {"t": mti}


def check_reply(sent: Read, reply_body: bytes) -> dict[str, str]:
    """The reply decodes, answers the request's MTI + 10, and carries a response code (12
    to an MTI we do not serve)."""
    fields = decode_reply(reply_body)
    assert sent.mti is not None
    assert fields["t"] == codec.response_mti(sent.mti), (sent, fields)
    assert len(fields.get("39", "")) == 2, fields
    if sent.mti not in codec.MTIS:
        assert fields["39"] == "12", fields
    return fields


# --- logs ----------------------------------------------------------------------------------------


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at ERROR or above, or carrying a traceback, from cardcore or asyncio."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith(("cardcore", "asyncio")) and (r.levelno >= logging.ERROR or r.exc_info)
    ]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="cardcore")
    caplog.set_level(logging.WARNING, logger="asyncio")
    return caplog


@pytest.fixture
def fast_terminals(monkeypatch: pytest.MonkeyPatch) -> None:
    """No rate limit, so that fuzzed messages reach MAC checks, routing and the host."""
    monkeypatch.setattr(limits, "GATEWAY_TERMINAL_RATE_PER_S", 10**9)
    monkeypatch.setattr(limits, "GATEWAY_SIGN_ONS_PER_S", 10**9)


# --- the processor -------------------------------------------------------------------------------


def sign_on_body(rng: random.Random) -> bytes:
    return codec.encode(base(rng, "0800", None, "00", "005"))


def keys_of(fields: dict[str, str]) -> WorkingKeys | None:
    """The working keys an approved sign-on reply carries (None for any other reply)."""
    if fields["t"] != "0810" or fields.get("39") != "00" or "62" not in fields:
        return None
    return security.read_working_keys(KeyMode.AES, TMK, bytes.fromhex(fields["62"]))


async def sign_on(processor: Processor, rng: random.Random) -> WorkingKeys:
    """Sign TID on (the host fails now and then: try again)."""
    for _ in range(10):
        reply = await asyncio.wait_for(processor.handle(sign_on_body(rng)), REPLY_WAIT_S)
        assert reply is not None
        keys = keys_of(codec.decode(reply.body))
        if keys is not None:
            return keys
    pytest.fail("TID does not sign on")


@pytest.fixture
async def saf(tmp_path: Path) -> AsyncIterator[ReversalQueue]:
    queue = ReversalQueue(tmp_path / "saf.jsonl")
    queue.open()
    yield queue
    await queue.close()


@pytest.mark.usefixtures("fast_terminals")
async def test_processor_answers_mutated_messages_or_nothing_and_never_raises(
    saf: ReversalQueue, logs: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(SEED)
    host = FakeHost(rng)
    processor = Processor(host, saf, KEK, Metrics())
    keys: WorkingKeys | None = None
    codes: dict[str, int] = {}
    previous = sign_on_body(rng)
    replies = 0
    for case in range(PROCESSOR_CASES):
        session = processor.sessions.get(TID)
        if session is None or session.keys is None:
            keys = await sign_on(processor, rng)
        body = structured(rng, keys)
        if case % 2:
            body = mutate(rng, body, previous)
        previous = body
        sent = read(body)
        reply = await asyncio.wait_for(processor.handle(body), REPLY_WAIT_S)  # never raises
        assert (reply is not None) == sent.expects_reply, body.hex()
        if reply is None:
            continue
        replies += 1
        assert reply.processing in (codec.PROCESSING_NONE, codec.PROCESSING_SIGN_ON)
        fields = check_reply(sent, reply.body)
        codes[fields["39"]] = codes.get(fields["39"], 0) + 1
        if "64" in fields and keys is not None and fields["t"] != "0810":
            # A MAC'd reply verifies under the keys the terminal holds.
            assert security.verify_mac(
                KeyMode.AES, keys.mak, codec.mac_input(reply.body), bytes.fromhex(fields["64"])
            ), fields
        keys = keys_of(fields) or keys
    assert not errors_logged(logs), errors_logged(logs)[:5]
    assert not host.wire_problems, host.wire_problems[:5]
    # The fuzz went deep: approvals from the host, MAC failures, format errors, slow-downs
    # are off here, reversals stored and forwarded.
    assert replies > PROCESSOR_CASES // 2, replies
    assert {"00", "30", "A0", "12", "96", "77"} <= codes.keys(), codes
    assert host.requests > PROCESSOR_CASES // 10, host.requests
    assert saf.pending, "no reversal was ever stored"


# --- the listener --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    tpdu: bytes
    header: bytes
    read: Read


def server_view(stream: bytes, frame_bytes_max: int) -> list[Sent]:
    """The frames the listener takes from `stream` (followed by EOF) before it closes: it
    stops at a length under the minimum or over the cap, a bad TPDU id, a truncated frame, or
    GATEWAY_BAD_FRAMES_MAX messages in a row that get no reply."""
    frames: list[Sent] = []
    pos = 0
    bad_in_a_row = 0
    while pos + codec.LENGTH_BYTES <= len(stream):
        length = int.from_bytes(stream[pos : pos + codec.LENGTH_BYTES], "big")
        if not codec.FRAME_PAYLOAD_BYTES_MIN <= length <= frame_bytes_max:
            break
        payload = stream[pos + codec.LENGTH_BYTES : pos + codec.LENGTH_BYTES + length]
        if len(payload) < length or payload[0] != codec.TPDU_ID:
            break
        pos += codec.LENGTH_BYTES + length
        head = codec.TPDU_BYTES + codec.HEADER_BYTES
        sent = Sent(
            payload[: codec.TPDU_BYTES], payload[codec.TPDU_BYTES : head], read(payload[head:])
        )
        frames.append(sent)
        if sent.read.expects_reply:
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
            if bad_in_a_row >= limits.GATEWAY_BAD_FRAMES_MAX:
                break
    return frames


def frame(rng: random.Random, body: bytes) -> bytes:
    """A frame around `body` with a random TPDU (id 0x60) and header; once in a while with a
    wrong length or TPDU id, or cut short (the listener closes there)."""
    tpdu = bytes([codec.TPDU_ID]) + rng.randbytes(4)
    payload = tpdu + rng.randbytes(codec.HEADER_BYTES) + body
    prefix = len(payload).to_bytes(2, "big")
    roll = rng.random()
    if roll < 0.002:
        prefix = rng.randbytes(2)
    elif roll < 0.004:
        prefix = max(0, len(payload) + rng.randint(-3, 3)).to_bytes(2, "big")
    elif roll < 0.005:
        payload = rng.randbytes(1) + payload[1:]
    elif roll < 0.006:
        payload = payload[: rng.randrange(len(payload) + 1)]
    return prefix + payload


def stream_of(rng: random.Random, keys: WorkingKeys | None, tid: str) -> bytes:
    """One connection's bytes: valid, mutated and random frames, sometimes a bad ending."""
    parts = []
    previous = structured(rng, keys, tid)
    for _ in range(rng.randint(40, 160)):
        body = structured(rng, keys, tid)
        roll = rng.random()
        if roll < 0.5:
            body = mutate(rng, body, previous)
        elif roll < 0.55:
            body = rng.randbytes(rng.randint(0, 64))
        previous = body
        parts.append(frame(rng, body))
    ending = rng.randrange(8)
    if ending == 0:
        parts.append(rng.choice((b"\x00\x00", b"\xff\xff", b"\x00\x0c", b"\x08\x01")))
    elif ending == 1:
        parts.append(frame(rng, structured(rng, keys, tid))[: -rng.randint(1, 10)])
    elif ending == 2:
        parts.append(rng.randbytes(rng.randint(1, 200)))
    return b"".join(parts)


class Line(asyncio.Protocol):
    """A client connection that keeps every byte it receives, and when the server closed."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def read_frames(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """The reply frames in `data`: (TPDU, header, body) each; every byte belongs to one."""
    out = []
    pos = 0
    while pos < len(data):
        assert pos + codec.LENGTH_BYTES <= len(data), f"a torn length prefix at {pos}"
        length = int.from_bytes(data[pos : pos + codec.LENGTH_BYTES], "big")
        payload = data[pos + codec.LENGTH_BYTES : pos + codec.LENGTH_BYTES + length]
        assert len(payload) == length, f"a torn reply at {pos}"
        split = codec.split_frame(payload)
        out.append((split.tpdu, split.header, split.body))
        pos += codec.LENGTH_BYTES + length
    return out


async def exchange(port: int, stream: bytes) -> bytes:
    """Send `stream`, then EOF; everything the server sent back before it closed."""
    loop = asyncio.get_running_loop()
    transport, line = await asyncio.wait_for(
        loop.create_connection(Line, "127.0.0.1", port), REPLY_WAIT_S
    )
    try:
        transport.write(stream)
        if transport.can_write_eof():
            transport.write_eof()
        await asyncio.wait_for(asyncio.shield(line.closed), CONNECTION_S_MAX)
    finally:
        transport.abort()
    return bytes(line.received)


def check_connection(stream: bytes, received: bytes, frame_bytes_max: int) -> int:
    """Exactly the predicted replies, in order, each well-formed; their number."""
    expected = [s for s in server_view(stream, frame_bytes_max) if s.read.expects_reply]
    replies = read_frames(received)
    assert len(replies) == len(expected), (len(replies), len(expected), stream.hex())
    for sent, (tpdu, header, body) in zip(expected, replies, strict=True):
        assert tpdu == codec.reply_tpdu(sent.tpdu), (sent, tpdu)
        processing = header[2] & 0x0F
        assert processing in (codec.PROCESSING_NONE, codec.PROCESSING_SIGN_ON), header
        assert header == codec.reply_header(sent.header, processing=processing), (sent, header)
        check_reply(sent.read, body)
    return len(replies)


@pytest.fixture
async def gateway(saf: ReversalQueue) -> AsyncIterator[GatewayServer]:
    metrics = Metrics()
    processor = Processor(FakeHost(), saf, KEK, metrics)
    server = GatewayServer(processor, metrics, host="127.0.0.1", port=0)
    await server.start()
    yield server
    await asyncio.wait_for(server.close(grace_s=1), 10)


async def signed_on_terminal(port: int, tid: str) -> PosTerminal:
    terminal = PosTerminal("127.0.0.1", port, tid, MID, TMK, KeyMode.AES, timeout_s=REPLY_WAIT_S)
    reply = await asyncio.wait_for(terminal.sign_on(), REPLY_WAIT_S * 2)
    assert reply.code == "00", reply
    return terminal


@pytest.mark.usefixtures("fast_terminals")
async def test_listener_answers_exactly_what_frames_and_survives_fuzzed_connections(
    gateway: GatewayServer, logs: pytest.LogCaptureFixture
) -> None:
    totals = {"frames": 0, "replies": 0, "connections": 0}

    async def worker(seed: int, rounds: int, tid: str | None) -> None:
        """`rounds` connections one after the other: fuzz of terminal `tid` (signed on
        first, so that MAC'd messages get far; another worker fuzzes it at the same time),
        or random bytes when `tid` is None."""
        rng = random.Random(seed)
        keys = None
        if tid is not None:
            terminal = await signed_on_terminal(gateway.port, tid)
            keys = terminal.keys
            await terminal.close()
        for _ in range(rounds):
            if tid is None:
                stream = rng.randbytes(rng.randint(0, 3000))
                if rng.random() < 0.5:  # junk behind a plausible length and TPDU id
                    stream = b"\x00\x40\x60" + stream
            else:
                stream = stream_of(rng, keys, tid)
            view = server_view(stream, gateway.frame_bytes_max)
            received = await exchange(gateway.port, stream)
            totals["connections"] += 1
            totals["frames"] += len(view)
            totals["replies"] += check_connection(stream, received, gateway.frame_bytes_max)

    workers = [worker(SEED + i, SERVER_ROUNDS, TIDS[i % 2]) for i in range(SERVER_WORKERS)]
    workers.append(worker(SEED - 1, JUNK_CONNECTIONS, None))
    await asyncio.wait_for(asyncio.gather(*workers), 60)

    assert totals["frames"] > 8_000, totals
    assert totals["replies"] > 5_000, totals
    # Nothing of the fuzz lingers, and well-behaved terminals are served as before: one the
    # fuzz used and one it never touched.
    await _no_connections(gateway)
    for tid in (TIDS[0], TIDS[-1]):
        terminal = await signed_on_terminal(gateway.port, tid)
        try:
            assert (await asyncio.wait_for(terminal.echo(), REPLY_WAIT_S)).code == "00"
            purchase = await asyncio.wait_for(terminal.purchase(PAN, 2_500), REPLY_WAIT_S)
            assert purchase.code == "00", purchase
            assert purchase.balance is not None
        finally:
            await terminal.close()
    assert not errors_logged(logs), errors_logged(logs)[:5]


async def _no_connections(server: GatewayServer, within_s: float = 5) -> None:
    for _ in range(int(within_s / 0.01)):
        if not server.connections:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{len(server.connections)} connections still open after {within_s} s")


# --- bugs the fuzz found, fixed since (3aa896d) --------------------------------------------------


async def _signed_on_processor(host: FakeHost, saf: ReversalQueue) -> tuple[Processor, WorkingKeys]:
    processor = Processor(host, saf, KEK, Metrics())
    reply = await processor.handle(sign_on_body(random.Random(1)))
    assert reply is not None
    keys = keys_of(codec.decode(reply.body))
    assert keys is not None
    return processor, keys


def purchase_body(rng: random.Random, keys: WorkingKeys) -> bytes:
    fields = base(rng, "0200", "000000", "22", "000")
    fields |= {"2": PAN, "4": "000000000100", "22": "021", "25": "00", "49": "156"}
    return maced(fields, keys)


class PurchaseAtTheHost(FakeHost):
    """A host that holds every call with a purchase in it (`entered` set) until `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        if any(r.kind is Kind.PURCHASE for r in requests):
            self.entered.set()
            await self.release.wait()
        return await super().pos(requests)


async def test_a_sign_off_waits_for_the_requests_ahead_of_it_and_later_ones_get_77(
    saf: ReversalQueue, logs: pytest.LogCaptureFixture
) -> None:
    """A sign-off while a purchase is at the host and another waits for the terminal: both
    are answered 00 under the keys they were checked with (MAC'd; the keys do not change
    under a request in flight), then the sign-off is answered, and a request after it gets
    77 with processing nibble 3. (Was: the keys were checked before the wait for the session
    lock and asserted after, so the waiting request tripped an AssertionError.)"""
    host = PurchaseAtTheHost()
    entered, release = host.entered, host.release

    processor, keys = await _signed_on_processor(host, saf)
    rng = random.Random(4)
    first = asyncio.create_task(processor.handle(purchase_body(rng, keys)))
    await asyncio.wait_for(entered.wait(), REPLY_WAIT_S)
    second = asyncio.create_task(processor.handle(purchase_body(rng, keys)))
    await asyncio.sleep(0.1)  # no I/O on its way: it is waiting for the lock by now
    off = asyncio.create_task(processor.handle(maced(base(rng, "0820", None, "00", "002"), keys)))
    await asyncio.sleep(0.1)
    assert not off.done()  # the sign-off waits its turn
    release.set()
    answered = await asyncio.wait_for(asyncio.gather(first, second, off), REPLY_WAIT_S)
    for reply in answered:
        assert reply is not None
        assert codec.decode(reply.body)["39"] == "00"
    for reply in answered[:2]:
        assert reply is not None and "64" in codec.decode(reply.body)
    late = await processor.handle(purchase_body(rng, keys))
    assert late is not None
    assert codec.decode(late.body)["39"] == "77"
    assert late.processing == codec.PROCESSING_SIGN_ON
    assert not errors_logged(logs), errors_logged(logs)


async def test_a_sign_off_queued_behind_a_replacing_sign_on_signs_off_the_new_session(
    saf: ReversalQueue,
) -> None:
    """A purchase in flight, the terminal's master key rotated, then a sign-on (which makes
    a new session) and a sign-off wait their turns: the sign-off follows the session to the
    new one, whose keys it was not MAC'd under, so it is A0 and ends nothing (a sign-off
    ends only the keys it proves); the new session stays signed on, and the gauge says so."""
    host = PurchaseAtTheHost()
    entered, release = host.entered, host.release

    processor, keys = await _signed_on_processor(host, saf)
    tid = TIDS[0]
    rng = random.Random(4)
    first = asyncio.create_task(processor.handle(purchase_body(rng, keys)))
    await asyncio.wait_for(entered.wait(), REPLY_WAIT_S)
    host.sealed[tid] = security.seal(KEK, b"\x11" * 16, b"tmk:" + tid.encode()).hex()
    on = asyncio.create_task(processor.handle(sign_on_body(random.Random(7))))
    await asyncio.sleep(0.05)
    off = asyncio.create_task(processor.handle(maced(base(rng, "0820", None, "00", "002"), keys)))
    await asyncio.sleep(0.05)
    release.set()
    replies = await asyncio.wait_for(asyncio.gather(first, on, off), REPLY_WAIT_S)
    assert [codec.decode(r.body)["39"] for r in replies if r is not None] == ["00", "00", "A0"]
    assert processor.sessions[tid].keys is not None
    assert processor.metrics.gateway_signed_on._value.get() == 1


async def test_upload_end_with_bad_totals_is_answered_30_without_an_error_logged(
    saf: ReversalQueue, logs: pytest.LogCaptureFixture
) -> None:
    """Was: parse_totals' FormatError escaped Processor._upload (traceback logged, 96)."""
    processor, keys = await _signed_on_processor(FakeHost(), saf)
    fields = base(random.Random(2), "0320", None, "00", "202") | {"48": "NOT TOTALS"}
    body = maced(_ordered(fields), keys)
    reply = await processor.handle(body)
    assert reply is not None
    assert codec.decode(reply.body)["39"] == "30"
    assert not errors_logged(logs), errors_logged(logs)


async def test_an_approved_purchase_with_a_huge_balance_is_answered_00_or_reversed(
    saf: ReversalQueue, logs: pytest.LogCaptureFixture
) -> None:
    """Was: a balance F54 cannot carry (10**12 fen or more) made format_balance raise after
    the host had applied the purchase: 96 to the terminal, and no reversal queued."""

    class RichHost(FakeHost):
        async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
            answers = await super().pos(requests)
            return [
                dataclasses.replace(a, balance=10**12) if r.kind is Kind.PURCHASE else a
                for r, a in zip(requests, answers, strict=True)
            ]

    processor, keys = await _signed_on_processor(RichHost(), saf)
    reply = await processor.handle(purchase_body(random.Random(3), keys))
    assert reply is not None
    code = codec.decode(reply.body)["39"]
    assert code == "00" or saf.pending, code
    assert not errors_logged(logs), errors_logged(logs)


def test_an_upload_end_keeps_its_totals_on_the_http_host_wire() -> None:
    """Was: request_json wrote totals for SETTLE only, so `cardcore gateway` closed every
    uploaded batch with terminal totals 0/0/0/0."""
    sent = PosRequest(
        kind=Kind.UPLOAD, terminal=TID, batch=BATCH, stan="000009", totals=(2500, 1, 0, 0)
    )
    assert parse_request(request_json(sent), "requests[0]") == sent


# --- the listener's timeouts (one watchdog for all connections) ----------------------------------

WATCHDOG_S = limits.GATEWAY_WATCHDOG_MS / 1000


async def _raw(port: int) -> tuple[asyncio.Transport, Line]:
    transport, line = await asyncio.get_running_loop().create_connection(Line, "127.0.0.1", port)
    return transport, line


async def _closed_after(line: Line, started: float, limit_s: float) -> float:
    await asyncio.wait_for(asyncio.shield(line.closed), limit_s + WATCHDOG_S + 2)
    return asyncio.get_running_loop().time() - started


def _dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "cardcore_gateway_frames_dropped_total", {"reason": reason}
    )
    return value or 0.0


SLOW_AMOUNT = 4_321  # SlowHost takes longer than the idle limit over a purchase of this


class SlowHost(FakeHost):
    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        if any(r.kind is Kind.PURCHASE and r.amount == SLOW_AMOUNT for r in requests):
            await asyncio.sleep(1.6)
        return await super().pos(requests)


@pytest.mark.usefixtures("fast_terminals")
async def test_idle_and_slow_connections_are_closed_in_time_and_busy_ones_are_kept(
    saf: ReversalQueue, logs: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    server = GatewayServer(
        Processor(SlowHost(), saf, KEK, metrics), metrics, host="127.0.0.1", port=0,
        idle_s=1.0, frame_read_s=1.5,
    )  # fmt: skip
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        _, idle = await _raw(server.port)  # says nothing at all
        slow_transport, slow = await _raw(server.port)
        slow_transport.write(b"\x00\x40\x60")  # a frame begun, never ended
        terminal = await signed_on_terminal(server.port, TID)
        try:
            # A terminal that talks more often than the idle limit is never closed, and is
            # served while the others wait for their ends.
            while loop.time() - started < 3.0:
                assert (await asyncio.wait_for(terminal.echo(), REPLY_WAIT_S)).code == "00"
                await asyncio.sleep(0.3)
            assert idle.closed.done() and slow.closed.done()
            # A request the host takes longer than the idle limit over is not idling.
            reply = await asyncio.wait_for(terminal.purchase(PAN, SLOW_AMOUNT), REPLY_WAIT_S)
            assert reply.code == "00", reply
            assert (await asyncio.wait_for(terminal.echo(), REPLY_WAIT_S)).code == "00"
        finally:
            await terminal.close()
        assert not idle.received and not slow.received
        assert _dropped(metrics, "slow") == 1
        assert _dropped(metrics, "truncated") == 0
    finally:
        await asyncio.wait_for(server.close(grace_s=1), 10)
    assert not errors_logged(logs), errors_logged(logs)[:5]


@pytest.mark.parametrize(
    ("idle_s", "frame_read_s", "begin"), [(1.0, 30.0, b""), (30.0, 1.0, b"\x00")]
)
async def test_a_timeout_closes_no_sooner_than_its_limit_and_within_a_watchdog_period(
    saf: ReversalQueue, idle_s: float, frame_read_s: float, begin: bytes
) -> None:
    metrics = Metrics()
    server = GatewayServer(
        Processor(FakeHost(), saf, KEK, metrics), metrics, host="127.0.0.1", port=0,
        idle_s=idle_s, frame_read_s=frame_read_s,
    )  # fmt: skip
    await server.start()
    try:
        transport, line = await _raw(server.port)
        started = asyncio.get_running_loop().time()
        if begin:
            transport.write(begin)
        limit = min(idle_s, frame_read_s)
        elapsed = await _closed_after(line, started, limit)
        assert limit - 0.05 <= elapsed <= limit + WATCHDOG_S + 2, elapsed
        assert _dropped(metrics, "slow") == (1 if begin else 0)
        await _no_connections(server)
    finally:
        await asyncio.wait_for(server.close(grace_s=1), 10)


async def test_the_in_process_host_fails_every_caller_of_a_late_call_and_lets_it_finish() -> None:
    """One timer per call to `PosService.handle`: at the limit its callers get
    HostUnavailable (the gateway then answers 96 and reverses); the call is not cancelled."""
    release = asyncio.Event()
    finished: list[int] = []

    async def handle(requests: Sequence[PosRequest]) -> list[PosResult]:
        await release.wait()
        finished.append(len(requests))
        return [PosResult(Outcome.APPROVED) for _ in requests]

    host = InProcessHost(handle, timeout_ms=300)
    request = PosRequest(kind=Kind.INQUIRY, terminal=TID, batch=BATCH, stan="000001")
    loop = asyncio.get_running_loop()
    started = loop.time()
    calls = [asyncio.create_task(host.pos([request])) for _ in range(3)]
    calls.append(asyncio.create_task(host.pos([request, request])))
    done = await asyncio.gather(*calls, return_exceptions=True)
    elapsed = loop.time() - started
    assert all(isinstance(d, HostUnavailable) for d in done), done
    assert 0.29 <= elapsed < 2, elapsed
    release.set()
    for _ in range(100):
        if finished:
            break
        await asyncio.sleep(0.01)
    assert finished == [5]  # one call for the five requests of the loop turn, not cancelled
    # A call in time answers.
    assert (await host.pos([request]))[0].outcome is Outcome.APPROVED
    # A call that ends without answering (here cancelled by close) fails its callers at
    # once: none waits for a timer, or for ever.
    release.clear()
    waiting = asyncio.create_task(host.pos([request]))
    await asyncio.sleep(0.05)
    started = loop.time()
    await host.close()
    with pytest.raises(HostUnavailable):
        await asyncio.wait_for(waiting, 1)
    assert loop.time() - started < 0.25


async def test_a_hanging_in_process_host_holds_at_most_its_queue_of_undecided_requests() -> None:
    """A host that never answers: requests past `queue_max` undecided ones (waiting, or in
    calls that go on after their time limit) are refused at once; once the calls end, the
    room is back."""
    hang = asyncio.Event()

    async def handle(requests: Sequence[PosRequest]) -> list[PosResult]:
        await hang.wait()
        return [PosResult(Outcome.APPROVED) for _ in requests]

    host = InProcessHost(handle, timeout_ms=50, queue_max=3)

    def ask(stan: str) -> Coroutine[Any, Any, list[PosResult]]:
        return host.pos([PosRequest(kind=Kind.INQUIRY, terminal=TID, batch=BATCH, stan=stan)])

    first = await asyncio.gather(*(ask(f"00000{i}") for i in range(1, 5)), return_exceptions=True)
    assert all(isinstance(x, HostUnavailable) for x in first)  # 3 timed out, 1 refused at once
    started = asyncio.get_running_loop().time()
    with pytest.raises(HostUnavailable):
        await ask("000005")  # the three calls still go on: no room, no wait
    assert asyncio.get_running_loop().time() - started < 0.04
    hang.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert (await ask("000006"))[0].outcome is Outcome.APPROVED
    await host.close()


async def test_each_call_of_a_split_loop_turn_has_its_own_timer() -> None:
    """More requests in a turn than one call takes: each call is timed on its own, and a
    call that answers in time answers even when its neighbour is late."""
    late = asyncio.Event()

    async def handle(requests: Sequence[PosRequest]) -> list[PosResult]:
        if any(r.stan == "000009" for r in requests):
            await late.wait()
        return [PosResult(Outcome.APPROVED) for _ in requests]

    host = InProcessHost(handle, timeout_ms=300, batch_max=2)
    stans = ["000001", "000002", "000003", "000004", "000009"]
    calls = [
        asyncio.create_task(
            host.pos([PosRequest(kind=Kind.INQUIRY, terminal=TID, batch=BATCH, stan=s)])
        )
        for s in stans
    ]
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert [d[0].outcome if isinstance(d, list) else type(d) for d in done] == [
        Outcome.APPROVED, Outcome.APPROVED, Outcome.APPROVED, Outcome.APPROVED, HostUnavailable,
    ]  # fmt: skip
    late.set()
    await host.close()


async def test_a_second_listener_on_the_port_is_refused_unless_the_port_is_shared(
    gateway: GatewayServer,
) -> None:
    """Two `cardcore serve` on different databases both listened on the terminal port
    (SO_REUSEPORT always on) and the kernel spread the terminals between two hosts (an
    operations review). Sharing the port is asked for (`gateway_shared_port`), else the
    second listener fails, address in use."""
    second = GatewayServer(gateway.processor, Metrics(), host="127.0.0.1", port=gateway.port)
    with pytest.raises(OSError, match=r"[Aa]ddress already in use"):
        await second.start()
    metrics = Metrics()
    first = GatewayServer(gateway.processor, metrics, host="127.0.0.1", port=0, shared_port=True)
    await first.start()
    try:
        other = GatewayServer(
            gateway.processor, metrics, host="127.0.0.1", port=first.port, shared_port=True
        )
        await other.start()
        await asyncio.wait_for(other.close(grace_s=1), 10)
    finally:
        await asyncio.wait_for(first.close(grace_s=1), 10)
