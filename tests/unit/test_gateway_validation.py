"""Decodable but bad content is answered with its code, never with silence: an MTI we do not
serve gets 12 under its MTI + 10; a STAN of 000000, an impossible time (F12), date (F13) or
settlement date (F15), an expiry (F14) whose month is not 01..12, and settlement totals whose
flag is not 0 get 30. None of them reaches the host."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cardcore import limits
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.processor import Processor, Reply
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.server import GatewayServer
from cardcore.frontend_gateway.terminal import HEADER, TPDU, PosTerminal
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


# Where each fixed date field starts in `_purchase`'s body with F14 and F15 added: MTI, bitmap,
# F2 (LL + 8 bytes), F3 (3), F4 (6), then F11, F12, F13, F14, F15 (BCD: hex = digits).
_AT = {"11": 28, "12": 31, "13": 34, "14": 36, "15": 38}


def _with_bytes(body: bytes, key: str, good: str, value: str) -> bytes:
    """`body` with field `key`'s BCD digits `good` overwritten by `value` (which `encode`
    would refuse to write)."""
    at, old = _AT[key], bytes.fromhex(good)
    assert body[at : at + len(old)] == old
    return body[:at] + bytes.fromhex(value) + body[at + len(old) :]


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
    reply = await gateway.processor.handle(_with_bytes(body, key, fields[key], value))
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


# --- expiry (F14, YYMM) and settlement date (F15, MMDD): 30 -------------------------------------

_GOOD_EXPIRY, _GOOD_SETTLEMENT = "2512", "1112"
IMPOSSIBLE_EXPIRY_OR_SETTLEMENT_DATE = [
    ("14", "2500"), ("14", "2513"), ("14", "0099"),
    ("15", "0000"), ("15", "0015"), ("15", "1301"), ("15", "9901"), ("15", "0100"),
    ("15", "0132"), ("15", "0230"), ("15", "0231"), ("15", "0431"), ("15", "1131"),
]  # fmt: skip


def _purchase_with_dates(t: PosTerminal, expiry: str, settlement: str) -> dict[str, str]:
    fields = _purchase(t) | {"11": "123456", "12": "101010", "13": "1112"}
    return fields | {"14": expiry, "15": settlement}


@pytest.mark.parametrize(("key", "value"), IMPOSSIBLE_EXPIRY_OR_SETTLEMENT_DATE)
async def test_an_impossible_expiry_month_or_settlement_date_is_answered_30(
    gateway: Gateway, key: str, value: str
) -> None:
    fields = _purchase_with_dates(gateway.terminal, _GOOD_EXPIRY, _GOOD_SETTLEMENT)
    body = gateway.terminal.encode(fields, mac=True)
    reply = await gateway.processor.handle(_with_bytes(body, key, fields[key], value))
    answer = _fields(reply)
    assert (answer["t"], answer["39"]) == ("0210", "30")
    for echoed in ("3", "4", "11", "41", "42", "60"):
        assert answer[echoed] == fields[echoed], echoed
    assert not {"2", "14", "15", "64"} & answer.keys()  # no card data back, no MAC
    assert gateway.host.seen == []
    assert _messages_counted(gateway.metrics, "0200", "30") == 1


@pytest.mark.parametrize(("key", "value"), IMPOSSIBLE_EXPIRY_OR_SETTLEMENT_DATE)
def test_decode_names_the_impossible_expiry_or_settlement_date(key: str, value: str) -> None:
    fields = {"t": "0200", "11": "000001", "14": _GOOD_EXPIRY, "15": _GOOD_SETTLEMENT}
    body = codec.encode(fields)
    at = codec.MTI_BYTES + codec.BITMAP_BYTES + 3 + {"14": 0, "15": 2}[key]  # after F11
    with pytest.raises(codec.FormatError) as caught:
        codec.decode(body[:at] + bytes.fromhex(value) + body[at + 2 :])
    error = caught.value
    assert (error.code, error.field, error.mti) == ("30", key, "0200")
    assert error.fields == {"t": "0200", "11": "000001"}
    with pytest.raises(ValueError, match=f"field {key} must be"):
        codec.encode(fields | {key: value})


@pytest.mark.parametrize(
    ("expiry", "settlement"),
    [("2512", "0229"), ("0001", "1231"), ("9912", "0101"), ("2601", "0430"), ("4907", "0831")],
)
async def test_a_real_expiry_and_settlement_date_go_through(
    gateway: Gateway, expiry: str, settlement: str
) -> None:
    fields = _purchase_with_dates(gateway.terminal, expiry, settlement)
    answer = _fields(await gateway.processor.handle(gateway.terminal.encode(fields, mac=True)))
    assert answer["39"] == "00"
    assert [r.kind for r in gateway.host.seen] == [Kind.PURCHASE]


async def test_an_expiry_in_the_past_is_not_the_gateways_to_judge(gateway: Gateway) -> None:
    """F14 is accepted and not used: the host declines an expired card (54) by its own
    record, so a well-formed expiry long past (January 2020) goes to the host like any other
    purchase, and the host request carries no expiry."""
    fields = _purchase_with_dates(gateway.terminal, "2001", _GOOD_SETTLEMENT)
    answer = _fields(await gateway.processor.handle(gateway.terminal.encode(fields, mac=True)))
    assert answer["39"] == "00"
    [request] = gateway.host.seen
    assert (request.kind, request.card, request.amount) == (Kind.PURCHASE, PAN, 100)
    assert not any("expir" in name for name in PosRequest.__dataclass_fields__)


async def test_a_frame_with_an_impossible_expiry_is_answered_and_the_connection_stays_open(
    gateway: Gateway,
) -> None:
    server = GatewayServer(gateway.processor, gateway.metrics, host="127.0.0.1", port=0)
    await server.start()
    terminal = gateway.terminal
    terminal.host, terminal.port, terminal.timeout_s = "127.0.0.1", server.port, 10
    try:
        fields = _purchase_with_dates(terminal, _GOOD_EXPIRY, _GOOD_SETTLEMENT)
        body = terminal.encode(fields, mac=True)
        bad = _with_bytes(body, "14", _GOOD_EXPIRY, "2513")
        await terminal.send_raw(codec.pack_frame(TPDU, HEADER, bad))
        line = terminal._writer
        reply = await terminal.read_reply()
        assert (reply.fields["t"], reply.code, reply.fields["11"]) == ("0210", "30", "123456")
        sale = await terminal.purchase(PAN, 100)
        assert sale.code == "00", sale.fields
        assert terminal._writer is line  # the same connection: it stayed open
        assert [r.kind for r in gateway.host.seen] == [Kind.PURCHASE]
    finally:
        await terminal.close()
        await server.close(grace_s=0)


# --- the flag of settlement totals: 0, else 30 -------------------------------------------------


Message = Callable[[PosTerminal, str], bytes]


def _settlement(t: PosTerminal, flag: str) -> bytes:
    fields = t._base("0500", None, "00", "201")
    fields["48"] = codec.format_totals(codec.Totals(0, 0, 0, 0), flag)
    return t.encode(fields, mac=True)


def _upload_end(t: PosTerminal, flag: str) -> bytes:
    fields = t._base("0320", None, "00", "202")
    fields["48"] = codec.format_totals(codec.Totals(0, 0, 0, 0), flag)
    return t.encode(fields, mac=True)


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


async def test_a_strangers_sign_ons_never_spend_the_terminals_budget_for_sales(
    gateway: Gateway,
) -> None:
    """Anyone who knows a terminal's id and merchant id may send sign-ons (unMAC'd): 25 of
    them are answered 91 past their own budget, and the terminal's next sale is approved
    (it was answered 91: the sign-ons had spent its budget)."""
    stranger = PosTerminal("unused", 0, TID, MID, bytes(16), KeyMode.AES)  # not its TMK
    codes = []
    for _ in range(25):
        reply = await gateway.processor.handle(
            codec.encode(stranger._base("0800", None, "00", "005"))
        )
        assert reply is not None
        codes.append(codec.decode(reply.body)["39"])
    assert codes.count("00") == limits.GATEWAY_SIGN_ONS_PER_S and set(codes) == {"00", "91"}
    sale = gateway.terminal.encode(_purchase(gateway.terminal), mac=True)
    answered = await gateway.processor.handle(sale)
    assert answered is not None
    assert codec.decode(answered.body)["39"] == "00"
