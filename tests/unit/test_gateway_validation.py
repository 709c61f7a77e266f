"""Decodable but bad content is answered with its code, never with silence: an MTI we do not
serve gets 12 under its MTI + 10; a STAN of 000000, an impossible time (F12) or date (F13),
and settlement totals whose flag is not 0 get 30. None of them reaches the host."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.processor import Processor, Reply
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import PosTerminal
from cardcore.metrics import Metrics

KEK = bytes(range(32))
TMK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
TID, MID, PAN = "CHECKS01", "CHECKSMERCHANT1", "6288880000000013"


@dataclass
class Host:
    """Answers sign-on, approves the rest and keeps every other request it is asked."""

    seen: list[PosRequest] = field(default_factory=list)

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        out = []
        for r in requests:
            if r.kind is Kind.SIGN_ON:
                sealed = security.seal(KEK, TMK, b"tmk:" + TID.encode()).hex()
                out.append(
                    PosResult(Outcome.APPROVED, batch="000001", mid=MID, key_mode="aes",
                              tmk_sealed=sealed)
                )  # fmt: skip
                continue
            self.seen.append(r)
            out.append(
                PosResult(Outcome.APPROVED, rrn="000000000009", totals=(0, 0, 0, 0), balanced=True)
            )
        return out

    async def close(self) -> None:
        return None


@dataclass
class Gateway:
    processor: Processor
    host: Host
    terminal: PosTerminal
    metrics: Metrics


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    host = Host()
    saf = ReversalQueue(tmp_path / "saf.jsonl")
    saf.open()
    metrics = Metrics()
    processor = Processor(host, saf, KEK, metrics)
    terminal = PosTerminal("unused", 0, TID, MID, TMK, KeyMode.AES)
    reply = await processor.handle(codec.encode(terminal._base("0800", None, "00", "005")))
    assert reply is not None
    fields = codec.decode(reply.body)
    terminal.keys = security.read_working_keys(KeyMode.AES, TMK, bytes.fromhex(fields["62"]))
    yield Gateway(processor, host, terminal, metrics)
    await saf.close()


def _fields(reply: Reply | None) -> dict[str, str]:
    """The reply's fields; one to an MTI we do not serve is read under 0210 (decode takes
    no 0110 from a terminal), its own MTI kept."""
    assert reply is not None
    mti = reply.body[: codec.MTI_BYTES].hex()
    if mti in codec.MTIS:
        return codec.decode(reply.body)
    return codec.decode(bytes.fromhex("0210") + reply.body[codec.MTI_BYTES :]) | {"t": mti}


def _purchase(t: PosTerminal) -> dict[str, str]:
    fields = t._base("0200", "000000", "22")
    return fields | {"2": PAN, "4": "000000000100", "22": "012", "25": "00", "49": "156"}


def _messages_counted(metrics: Metrics, mti: str, code: str) -> float | None:
    labels = {"mti": mti, "code": code}
    return metrics.registry.get_sample_value("cardcore_gateway_messages_total", labels)


# --- an MTI we do not serve: 12 -------------------------------------------------------------


@pytest.mark.parametrize(("mti", "reply_mti"), [("0100", "0110"), ("0420", "0430")])
async def test_an_mti_we_do_not_serve_is_answered_12_under_its_mti_plus_10(
    gateway: Gateway, mti: str, reply_mti: str
) -> None:
    fields = _purchase(gateway.terminal)
    body = bytes.fromhex(mti) + gateway.terminal.encode(fields, mac=True)[codec.MTI_BYTES :]
    reply = await gateway.processor.handle(body)
    answer = _fields(reply)
    assert answer["t"] == reply_mti
    assert answer["39"] == "12"
    for echoed in ("3", "4", "11", "41", "42", "60"):
        assert answer[echoed] == fields[echoed], echoed
    assert "2" not in answer and "64" not in answer  # no card number back, no MAC
    assert gateway.host.seen == []
    assert _messages_counted(gateway.metrics, "other", "12") == 1  # one label for them all


@pytest.mark.parametrize("mti", ["0110", "0140", "0190", "0210", "0810"])
async def test_an_mti_without_a_response_form_gets_no_reply(gateway: Gateway, mti: str) -> None:
    fields = _purchase(gateway.terminal)
    body = bytes.fromhex(mti) + codec.encode(fields)[codec.MTI_BYTES :]
    assert await gateway.processor.handle(body) is None
    assert gateway.host.seen == []


# --- STAN, time and date: 30 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("11", "000000"), ("12", "240000"), ("12", "236000"), ("12", "235960"), ("13", "1301"),
     ("13", "0000"), ("13", "0230"), ("13", "0431")],
)  # fmt: skip
async def test_an_impossible_stan_time_or_date_is_answered_30(
    gateway: Gateway, key: str, value: str
) -> None:
    fields = _purchase(gateway.terminal) | {"11": "123456", "12": "101010", "13": "1112"}
    body = gateway.terminal.encode(fields, mac=True)
    # MTI, bitmap, F2 (LL + 8 bytes), F3 (3), F4 (6), then F11, F12, F13 (BCD: hex = digits).
    at = {"11": 28, "12": 31, "13": 34}[key]
    good = bytes.fromhex(fields[key])
    assert body[at : at + len(good)] == good
    reply = await gateway.processor.handle(
        body[:at] + bytes.fromhex(value) + body[at + len(good) :]
    )
    answer = _fields(reply)
    assert (answer["t"], answer["39"]) == ("0210", "30")
    assert answer.get("11") == (None if key == "11" else "123456")  # an invalid STAN is not echoed
    assert "64" not in answer
    assert gateway.host.seen == []


@pytest.mark.parametrize("mmdd", ["0229", "1231", "0101"])
async def test_a_real_date_goes_through(gateway: Gateway, mmdd: str) -> None:
    fields = _purchase(gateway.terminal) | {"13": mmdd}
    answer = _fields(await gateway.processor.handle(gateway.terminal.encode(fields, mac=True)))
    assert answer["39"] == "00"
    assert [(r.kind, r.date) for r in gateway.host.seen] == [(Kind.PURCHASE, mmdd)]


# --- the flag of settlement totals: 0, else 30 -------------------------------------------------


Message = Callable[[PosTerminal, str], bytes]


def _settlement(t: PosTerminal, flag: str) -> bytes:
    fields = t._base("0500", None, "00", "201")
    fields["48"] = codec.format_totals(codec.Totals(0, 0, 0, 0), flag)
    return codec.encode(fields)


def _upload_end(t: PosTerminal, flag: str) -> bytes:
    fields = t._base("0320", None, "00", "202")
    fields["48"] = codec.format_totals(codec.Totals(0, 0, 0, 0), flag)
    return codec.encode(fields)


@pytest.mark.parametrize("message", [_settlement, _upload_end])
@pytest.mark.parametrize("flag", ["1", "2", "3", "9"])
async def test_request_totals_whose_flag_is_not_0_are_answered_30(
    gateway: Gateway, message: Message, flag: str
) -> None:
    answer = _fields(await gateway.processor.handle(message(gateway.terminal, flag)))
    assert answer["39"] == "30"
    assert gateway.host.seen == []


@pytest.mark.parametrize("message", [_settlement, _upload_end])
async def test_request_totals_with_the_flag_0_reach_the_host(
    gateway: Gateway, message: Message
) -> None:
    answer = _fields(await gateway.processor.handle(message(gateway.terminal, "0")))
    assert answer["39"] == "00"
    assert [r.kind for r in gateway.host.seen] in ([Kind.SETTLE], [Kind.UPLOAD])
