"""docs/card-protocol.md checked against the code, byte for byte.

The worked examples of the doc are produced here: the reference terminal
(`terminal.PosTerminal`) talks to a real `processor.Processor` in memory, with a fake host that
gives fixed answers, a fixed clock, fixed keys (`security.new_key` is patched so that the
sign-on reply carries known working keys) and the reply framing of `server.GatewayServer`.
Every ```hex example=NAME``` block of the doc must equal the frame built here, and every
```text breakdown=NAME``` block must equal `render_breakdown` of that frame. The one random
input is the fill of the format 4 PIN block: the doc's block is checked by deciphering it,
then fed back in so that the rest of the frame (its MAC included) can be compared.

The doc's tables are checked too: every field of `codec.LAYOUT` with its type, length prefix
and maximum; every response code the gateway can answer, and no other; the routing table
(`processor.ROUTES`); every `GATEWAY_*` bound with its value.

After a deliberate protocol change, regenerate the example blocks with
`.venv/bin/python -m tests.unit.test_card_protocol_doc` and paste them into the doc.
"""

from __future__ import annotations

import ast
import asyncio
import calendar
import contextlib
import re
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cardcore import demo, limits
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult
from cardcore.frontend_gateway import codec, processor, security, terminal
from cardcore.frontend_gateway.host import HostUnavailable
from cardcore.frontend_gateway.processor import Processor
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.security import KeyMode, WorkingKeys
from cardcore.frontend_gateway.terminal import PosTerminal, Reply, TerminalError
from cardcore.metrics import Metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "card-protocol.md"

# --- the fixed inputs of every example (the doc lists them) ------------------------------------
KEK = bytes(range(32))  # the gateway's key-encrypting key: seals TMKs at rest, never on the wire
AES_TMK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
AES_PIK = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
AES_MAK = bytes.fromhex("F0E1D2C3B4A5968778695A4B3C2D1E0F")
TDES_TMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")  # odd parity, K1 != K2
TDES_PIK = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
TDES_MAK = bytes.fromhex("456789ABCDEF01233210FEDCBA987654")
WRONG_MAK = bytes(16)  # the MAC-error example
CARD = "6288880000000013"
PIN = "123456"
MID = "898310048990001"
AES_TID = "POS00001"
TDES_TID = "POS00002"
DISCOUNT_BP = 500  # the card class's discount in the examples: 5 % off
COUPON = "7KQ2-M9XR-4TPW-8HNB"  # a coupon code as printed (Crockford base32 + check symbol)
MANAGER_CARD = "6288880000000021"  # a manager's special-discount authorization card
POINTS_EARN_RRN = "000000001011"  # the 900000's reference, which the points return names
AES_BATCH = "000042"  # the batch the host hands each terminal at sign-on
TDES_BATCH = "000007"
DAY = (2025, 3, 15)
SHANGHAI_S = 8 * 3600
APPROVED = Outcome.APPROVED


# --- the gateway in memory ---------------------------------------------------------------------


class FakeHost:
    """The host side of the examples: answers queued in advance, requests kept."""

    def __init__(self) -> None:
        self.answers: list[PosResult | Exception] = []
        self.seen: list[PosRequest] = []

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        self.seen.extend(requests)
        out = []
        for _ in requests:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            out.append(answer)
        return out

    async def close(self) -> None:
        return None


class Clock:
    """Terminal and host clocks: the terminal sends at `at(...)`, the host answers 1 s later."""

    def __init__(self) -> None:
        self.epoch = 0.0

    def at(self, hhmmss: str) -> None:
        year, month, day = DAY
        hour, minute, second = int(hhmmss[:2]), int(hhmmss[2:4]), int(hhmmss[4:])
        local = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        self.epoch = local - SHANGHAI_S

    def terminal_localtime(self) -> time.struct_time:
        return time.gmtime(self.epoch + SHANGHAI_S)

    def host_now(self) -> float:
        return self.epoch + 1


@dataclass
class LoopbackTerminal(PosTerminal):
    """The reference terminal with its line replaced by the processor, framed as the server
    frames replies (TPDU addresses swapped, header nibble set)."""

    gateway: Processor | None = None
    drop_reply: bool = False  # lose the next reply on the line
    exchanges: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    _reply_frame: bytes | None = None

    async def send_raw(self, frame: bytes) -> None:
        assert self.gateway is not None
        parts = codec.split_frame(frame[codec.LENGTH_BYTES :])
        reply = await self.gateway.handle(parts.body)
        out = None
        if reply is not None and not self.drop_reply:
            out = codec.pack_frame(
                codec.reply_tpdu(parts.tpdu),
                codec.reply_header(parts.header, processing=reply.processing),
                reply.body,
            )
        self.drop_reply = False
        self.exchanges.append((frame, out))
        self._reply_frame = out

    async def read_reply(self) -> Reply:
        out, self._reply_frame = self._reply_frame, None
        if out is None:
            raise TerminalError("no reply: lost on the line")
        parts = codec.split_frame(out[codec.LENGTH_BYTES :])
        return Reply(codec.decode(parts.body), parts.header[2] & 0x0F, out)


def sign_on_answer(tid: str, mode: KeyMode, tmk: bytes, batch: str) -> PosResult:
    sealed = security.seal(KEK, tmk, b"tmk:" + tid.encode())
    return PosResult(APPROVED, batch=batch, mid=MID, key_mode=str(mode), tmk_sealed=sealed.hex())


def _fixed_format_4(block: bytes | None) -> Callable[[str, str, bytes], bytes]:
    """`security.pin_block_4` that returns `block` for the terminal's PIK once it deciphers to
    the PIN (the random fill cannot be compared by bytes); the real one otherwise."""
    original = security.pin_block_4

    def pin_block_4(pin: str, pan: str, pik: bytes) -> bytes:
        if block is None or pik != AES_PIK:
            return original(pin, pan, pik)
        assert security.read_pin_block_4(block, pan, pik) == pin
        return block

    return pin_block_4


@dataclass(frozen=True)
class Example:
    name: str
    frame: bytes
    mode: KeyMode


@dataclass
class Built:
    examples: list[Example]
    seen: list[PosRequest]  # what the gateway asked the host, in order
    gateway: Processor


class _Recorder:
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples
        self.taken: dict[int, int] = {}

    def skip(self, pos: LoopbackTerminal) -> None:
        """The exchanges since the last named ones are in no example."""
        self.taken[id(pos)] = len(pos.exchanges)

    def name(self, pos: LoopbackTerminal, *names: str) -> None:
        start = self.taken.get(id(pos), 0)
        new = pos.exchanges[start:]
        assert len(new) == len(names), (names, len(new))
        self.taken[id(pos)] = len(pos.exchanges)
        for name, (request, reply) in zip(names, new, strict=True):
            self.examples.append(Example(f"{name}-request", request, pos.mode))
            if reply is not None:
                self.examples.append(Example(f"{name}-reply", reply, pos.mode))


async def build_examples(saf_dir: Path, aes_pin_block: bytes | None = None) -> Built:
    """Every worked example of the doc, in the doc's order."""
    clock, host = Clock(), FakeHost()
    saf = ReversalQueue(saf_dir / "saf.jsonl")
    saf.open()
    gateway = Processor(host, saf, KEK, Metrics(), clock=clock.host_now)
    fresh = {KeyMode.AES: [AES_PIK, AES_MAK], KeyMode.TDES: [TDES_PIK, TDES_MAK]}
    examples: list[Example] = []
    rec = _Recorder(examples)
    answer = host.answers.append
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(security, "new_key", lambda mode: fresh[mode].pop(0))
        mp.setattr(security, "pin_block_4", _fixed_format_4(aes_pin_block))
        fake_time = types.SimpleNamespace(
            localtime=clock.terminal_localtime, strftime=time.strftime
        )
        mp.setattr(terminal, "time", fake_time)
        pos = LoopbackTerminal("gateway", 0, AES_TID, MID, AES_TMK, KeyMode.AES, gateway=gateway)

        clock.at("093000")
        answer(sign_on_answer(AES_TID, KeyMode.AES, AES_TMK, AES_BATCH))
        assert (await pos.sign_on()).code == "00"
        rec.name(pos, "sign-on")

        clock.at("093010")
        await pos.echo()
        rec.name(pos, "echo")

        clock.at("093020")
        answer(PosResult(APPROVED, balance=10_000))
        await pos.inquiry(CARD)
        rec.name(pos, "inquiry")

        clock.at("093030")
        answer(PosResult(APPROVED, 7_650, 2_350, "000000001001", "001001"))
        await pos.purchase(CARD, 2_350)
        rec.name(pos, "purchase")

        clock.at("093040")
        answer(PosResult(APPROVED, 10_000, 2_350, "000000001002", "001002"))
        await pos.void(CARD, 2_350, "000004")
        rec.name(pos, "void")

        clock.at("093050")
        answer(PosResult(APPROVED, 8_800, 1_200, "000000001003", "001003"))
        pos.drop_reply = True
        with contextlib.suppress(TerminalError):
            await pos.purchase(CARD, 1_200, PIN)
        assert pos.pending_reversal is not None
        rec.name(pos, "purchase-pin")

        clock.at("093125")
        answer(PosResult(APPROVED, rrn="000000001004"))
        assert (await pos.send_pending_reversal()).code == "00"
        rec.name(pos, "reversal")

        clock.at("093130")
        answer(PosResult(APPROVED, 10_500, 500, "000000001005", "001005"))
        await pos.refund(CARD, 500, "000000000987", "000041", "000017")
        rec.name(pos, "refund")

        clock.at("093140")
        answer(PosResult(APPROVED, 10_500, 5_000, "000000001006", "001006"))
        await pos.topup(CARD, 5_000)
        rec.name(pos, "topup")

        clock.at("093150")
        answer(PosResult(APPROVED, None, 5_000, "000000001007", "001007"))
        await pos.topup_confirm("000008", 5_000)
        rec.name(pos, "topup-confirm")

        clock.at("093200")
        answer(PosResult(APPROVED, 14_700, 800, "000000001008", "001008"))
        advice = pos._base("0220", "000000", "22")
        pos._card(advice, CARD, None)
        advice |= {"4": "000000000800", "25": "00", "49": "156"}
        assert (await pos.financial(terminal._ordered(advice))).code == "00"
        lines = [
            {"stan": x.stan, "kind": x.kind, "amount": x.amount, "voided": x.voided}
            for x in pos.lines
        ]
        lines.append({"stan": advice["11"], "kind": "purchase", "amount": 800, "voided": False})
        pos.restore_lines(lines)
        rec.name(pos, "offline-advice")

        clock.at("093210")
        answer(PosResult(APPROVED, rrn=POINTS_EARN_RRN, auth_code=POINTS_EARN_RRN[-6:], points=23,
                           points_balance=523))  # fmt: skip
        await pos.points_earn(CARD, 2_350, [("FOOD", 1_350), ("TOYS", 1_000)])
        rec.name(pos, "points-earn")

        clock.at("093220")
        good = pos.keys
        assert good is not None
        pos.keys = WorkingKeys(pik=good.pik, mak=WRONG_MAK)
        await pos.purchase(CARD, 2_350)
        pos.keys = good
        rec.name(pos, "mac-error")
        answer(PosResult(APPROVED))  # the reversal the unMAC'd A0 left owed (section 8)
        await pos.send_pending_reversal()
        rec.skip(pos)  # a reversal of an unknown original: the doc's 0400 examples show one

        clock.at("180000")
        answer(PosResult(APPROVED, totals=(800, 1, 5_000, 1), balanced=False))
        await pos.settle()
        rec.name(pos, "settle")

        clock.at("180010")
        answer(PosResult(APPROVED, balanced=False, unmatched=("000007",)))
        answer(PosResult(APPROVED, totals=(800, 1, 5_000, 1), balanced=False))
        await pos.upload()
        rec.name(pos, "upload-detail", "upload-end")

        clock.at("180020")
        await pos.sign_off()
        rec.name(pos, "sign-off")

        clock.at("180030")
        pos.keys = good  # a terminal that did not notice its sign-off
        await pos.purchase(CARD, 2_350)
        rec.name(pos, "purchase-after-sign-off")

        legacy = LoopbackTerminal(
            "gateway", 0, TDES_TID, MID, TDES_TMK, KeyMode.TDES, gateway=gateway
        )
        clock.at("100000")
        answer(sign_on_answer(TDES_TID, KeyMode.TDES, TDES_TMK, TDES_BATCH))
        assert (await legacy.sign_on()).code == "00"
        rec.name(legacy, "tdes-sign-on")

        clock.at("100010")
        answer(PosResult(APPROVED, 48_800, 1_200, "000000001009", "001009"))
        await legacy.purchase(CARD, 1_200, PIN)
        rec.name(legacy, "tdes-purchase")

        clock.at("100020")
        answer(PosResult(APPROVED, balance=48_800, discount_bp=DISCOUNT_BP))
        await legacy.inquiry(CARD)
        rec.name(legacy, "discount-inquiry")

        clock.at("100030")
        answer(
            PosResult(
                Outcome.PARTIAL_APPROVED,
                0,
                48_800,
                "000000001010",
                "001010",
                remainder=60_000 - 48_800,
            )
        )
        assert (await legacy.purchase(CARD, 60_000, PIN, partial=True)).code == "10"
        rec.name(legacy, "split-tender")

        clock.at("100040")
        answer(PosResult(Outcome.CARD_LOST))
        await legacy.purchase(CARD, 1_000, PIN)
        rec.name(legacy, "lost-card")

        await _issue_5_examples(legacy, clock, answer, rec)
    await saf.close()
    assert not host.answers, "every queued host answer is used"
    return Built(examples, host.seen, gateway)


async def _issue_5_examples(
    legacy: LoopbackTerminal,
    clock: Clock,
    answer: Callable[[PosResult | Exception], None],
    rec: _Recorder,
) -> None:
    """Points redemption, the coupon messages, service and manager cards (section 5.11)."""
    clock.at("100050")
    answer(PosResult(APPROVED, amount=500, rrn="000000001012", auth_code="001012", points=500,
                     points_balance=23))  # fmt: skip
    await legacy.points_redeem(CARD, 500, PIN)
    rec.name(legacy, "points-redeem")

    bill, basket = 12_000, [("FOOD", 12_000)]
    clock.at("100100")
    answer(PosResult(APPROVED, discount=2_000, forfeited=0, campaign="SPRING25"))
    await legacy.coupon("920000", COUPON, bill, CARD, basket)
    rec.name(legacy, "coupon-query")

    clock.at("100110")
    answer(PosResult(APPROVED, discount=2_000, forfeited=0, campaign="SPRING25"))
    await legacy.coupon("950000", COUPON, bill, CARD, basket)
    rec.name(legacy, "coupon-reserve")

    clock.at("100120")
    answer(PosResult(APPROVED, discount=2_000, forfeited=0, campaign="SPRING25"))
    redeemed = await legacy.coupon("930000", COUPON, bill, CARD, basket)
    rec.name(legacy, "coupon-redeem")

    clock.at("100130")
    answer(PosResult(Outcome.COUPON_USED, refusal="coupon_used"))
    await legacy.coupon("930000", COUPON, bill)
    rec.name(legacy, "coupon-used")

    clock.at("100140")
    answer(PosResult(APPROVED, discount=2_000, campaign="SPRING25"))  # what it gave back
    await legacy.coupon_reverse(redeemed.fields["11"], COUPON)
    rec.name(legacy, "coupon-reverse")

    clock.at("100150")
    answer(PosResult(APPROVED, uses_left=9))
    await legacy.service_redeem(CARD, 1, "WASH10")
    rec.name(legacy, "service-redeem")

    clock.at("100200")
    answer(PosResult(APPROVED, discount=1_500))
    await legacy.manager_auth(MANAGER_CARD, PIN, 30_000, 1_500, "price_match")
    rec.name(legacy, "manager-auth")

    clock.at("100210")
    answer(PosResult(Outcome.OVER_LIMIT, refusal="manager_over_percent"))
    await legacy.manager_auth(MANAGER_CARD, PIN, 30_000, 9_000, "price_match")
    rec.name(legacy, "manager-over-limit")

    # Half of the cash purchase of 12.12 (RRN 000000001011, 23 points) comes back.
    clock.at("100220")
    answer(PosResult(APPROVED, rrn="000000001013", auth_code="001013", points=-11,
                     points_balance=12))  # fmt: skip
    await legacy.points_return(CARD, 1_175, POINTS_EARN_RRN)
    rec.name(legacy, "points-return")


# --- the field-by-field breakdown --------------------------------------------------------------

_HEX_ROW_BYTES = 16
_TXN_TYPE = {
    "00": "network management",
    "01": "balance inquiry",
    "22": "purchase",
    "23": "void",
    "25": "refund",
    "48": "top-up",
    "49": "top-up confirmation",
    "90": "points / coupons",
}
_NET_CODE = {
    "000": "none",
    "002": "sign off",
    "003": "sign on, 3DES keys",
    "004": "sign on, 3DES keys",
    "005": "sign on, AES keys",
    "201": "settlement / upload detail",
    "202": "upload end",
    "207": "upload end",
    "301": "echo",
}
_REVERSAL_REASON = {"98": "no reply", "A0": "reply MAC wrong", "06": "other"}
_MTI = {
    "0200": "financial request",
    "0210": "financial reply",
    "0220": "advice / confirmation",
    "0230": "advice / confirmation reply",
    "0320": "batch upload",
    "0330": "batch upload reply",
    "0400": "reversal",
    "0410": "reversal reply",
    "0500": "settlement",
    "0510": "settlement reply",
    "0800": "sign-on",
    "0810": "sign-on reply",
    "0820": "network management",
    "0830": "network management reply",
}
_SETTLE_FLAG = {"1": "balanced", "2": "unbalanced", "3": "error"}


def _hex(data: bytes) -> str:
    return data.hex().upper()


def _rows(label: str, prefix: bytes, parts: list[tuple[bytes, str]]) -> list[str]:
    """Rows of `label`: the length prefix, then each part's bytes (16 a row) and its text."""
    lead = _hex(prefix) + " " if prefix else ""
    out = []
    first = True
    for data, text in parts:
        chunks = [data[i : i + _HEX_ROW_BYTES] for i in range(0, len(data), _HEX_ROW_BYTES)]
        for i, chunk in enumerate(chunks or [b""]):
            head = lead if first else " " * len(lead)
            cell = head + _hex(chunk)
            note = text if i == 0 else ""
            out.append(f"{label if first else '':<8}{cell:<38}{note}".rstrip())
            first = False
    return out


def _quoted(value: str, text: str) -> str:
    return f'"{value}"  {text}' if text else f'"{value}"'


def _describe(key: str, value: str, mti: str, f: dict[str, str]) -> str:
    reply = mti[2] in "13"
    request_mti = f"{int(mti) - 10:04d}" if reply else mti
    if key == "2":
        return f"PAN, {len(value)} digits"
    if key == "3":
        kind = processor.ROUTES.get((request_mti, value))
        if request_mti == "0400":
            return "processing code of the original"
        if kind is Kind.PURCHASE and request_mti == "0220":
            return "processing code: purchase (offline advice)"
        return f"processing code: {kind}" if kind else "processing code"
    if key == "4":
        what = "amount taken" if reply and f.get("39") == "10" else "amount"
        return f"{what}: {int(value)} fen = {terminal.money(int(value))} CNY"
    if key == "11":
        return "STAN"
    if key == "12":
        return f"{value[:2]}:{value[2:4]}:{value[4:]} " + ("host time" if reply else "local time")
    if key == "13":
        return f"{value[:2]}-{value[2:]} " + ("host date" if reply else "local date")
    if key == "22":
        return "POS entry mode (not read by the gateway)"
    if key == "25":
        return "POS condition code: normal"
    if key == "26":
        return "PIN capture code: up to 6 digits"
    if key == "37":
        return "retrieval reference number" + ("" if reply else " of the original")
    if key == "38":
        return "authorization code"
    if key == "39":
        if mti == "0400":
            return f"reversal reason: {_REVERSAL_REASON[value]}"
        return f"response code: {terminal.RESPONSE_TEXT[value]}"
    if key == "41":
        return "terminal id"
    if key == "42":
        return "merchant id"
    if key == "49":
        return "currency: CNY"
    if key == "54":
        return "; ".join(
            _describe_amount(value[i : i + codec.BALANCE_CHARS])
            for i in range(0, len(value), codec.BALANCE_CHARS)
        )
    if key == "60":
        f60 = codec.parse_f60(value)
        text = (
            f"60.1 {f60.txn_type} {_TXN_TYPE[f60.txn_type]}, 60.2 batch {f60.batch}, "
            f"60.3 {f60.net_code} {_NET_CODE[f60.net_code]}"
        )
        if len(value) > 11:
            takes = "takes" if f60.partial_approval else "takes no"
            text += f", 60.6 {value[13]} {takes} partial approval"
        return text
    if key == "61":
        f61 = codec.parse_f61(value)
        return f"original batch {f61.batch}, STAN {f61.stan}"
    if key == "48":
        return _describe_48(value, mti, f)
    return ""


_AMOUNT_TYPE = {"02": ("available", "balance"), "04": ("amount due", "still due")}


def _describe_amount(entry: str) -> str:
    kind, what = _AMOUNT_TYPE[entry[2:4]]
    amount = codec.parse_balance(entry)
    return (
        f"account 00, amount type {entry[2:4]} ({kind}), currency {entry[4:7]}, {entry[7]}, "
        f"{abs(amount)} fen: {what} {terminal.money(amount)} CNY"
    )


def _describe_48(value: str, mti: str, f: dict[str, str]) -> str:
    net = codec.parse_f60(f["60"]).net_code if "60" in f else ""
    if mti in ("0500", "0510") or (mti in ("0320", "0330") and net in ("202", "207")):
        t = codec.parse_totals(value)
        return (
            f"debit {terminal.money(t.debit_amount)} x{t.debit_count}, "
            f"credit {terminal.money(t.credit_amount)} x{t.credit_count}, "
            f"flag {value[30]} {_SETTLE_FLAG[value[30]] if mti == '0510' else 'ignored'}"
        )
    if mti == "0320":
        return f"{len(value) // 18} lines of STAN n6 + amount n12"
    if mti == "0330":
        return "STANs the host does not match"
    if mti in ("0200", "0210", "0230"):
        return "TLV " + "; ".join(_tlv_item(tag, item) for tag, item in codec.tlv_decode(value))
    return ""


_TLV_TEXT = {
    codec.TLV_BASKET_LINE: "basket line",
    codec.TLV_COUPON: "coupon",
    codec.TLV_PRODUCT: "service product",
    codec.TLV_USES: "uses",
    codec.TLV_REASON: "reason",
    codec.TLV_POINTS_BALANCE: "points balance",
    codec.TLV_CAMPAIGN: "campaign",
    codec.TLV_USES_LEFT: "uses left",
    codec.TLV_REFUSAL: "refused by",
}
_TLV_MONEY = {
    codec.TLV_MANAGER_DISCOUNT: "discount asked",
    codec.TLV_DISCOUNT: "discount",
    codec.TLV_FORFEITED: "forfeited",
}


def _tlv_item(tag: str, item: str) -> str:
    if tag == codec.TLV_DISCOUNT_BP:
        return f"{tag} class discount {item} bp = {terminal.money(int(item))} % off"
    if tag == codec.TLV_POINTS:
        return f"{tag} points {item}"
    if tag in _TLV_MONEY:
        return f"{tag} {_TLV_MONEY[tag]} {terminal.money(int(item))} CNY"
    return f"{tag} {_TLV_TEXT[tag]} {item}"


def _field_parts(
    key: str, data: bytes, value: str, mti: str, f: dict[str, str], mode: KeyMode
) -> list[tuple[bytes, str]]:
    spec = codec.LAYOUT[key]
    if key == "62":
        size = security.WRAPPED_KEY_BYTES[mode]
        kcv = security.KCV_BYTES
        wrap = "RFC 3394 AES key wrap" if mode is KeyMode.AES else "3DES-ECB"
        return [
            (b"", f"working keys, {len(data)} bytes"),
            (data[:size], f"PIK under the TMK ({wrap})"),
            (data[size : size + kcv], "PIK check value"),
            (data[size + kcv : 2 * size + kcv], f"MAK under the TMK ({wrap})"),
            (data[2 * size + kcv :], "MAK check value"),
        ]
    if key == "52":
        fmt = "format 4, AES, random fill" if len(data) == 16 else "format 0, 3DES"
        return [(data, f"PIN block, ISO 9564 {fmt}")]
    if key == "64":
        how = "AES-CMAC, first 8 bytes" if mode is KeyMode.AES else "ISO 9797-1 algorithm 3"
        return [(data, f"MAC ({how})")]
    text = _describe(key, value, mti, f)
    if spec.kind == "b":
        return [(data, text)]
    return [(data, _quoted(value, text))]


def render_breakdown(frame: bytes, mode: KeyMode) -> str:
    """The doc's field-by-field view of one frame."""
    payload = frame[codec.LENGTH_BYTES :]
    parts = codec.split_frame(payload)
    tpdu, header, body = parts.tpdu, parts.header, parts.body
    fields = codec.decode(body)
    mti = fields["t"]
    processing = header[2] & 0x0F
    rows = _rows("length", b"", [(frame[:2], f"{len(payload)} bytes follow")])
    rows += _rows(
        "TPDU",
        b"",
        [(tpdu, f"id 60, destination {_hex(tpdu[1:3])}, source {_hex(tpdu[3:5])}")],
    )
    sign_on = " = sign on again" if processing == codec.PROCESSING_SIGN_ON else ""
    rows += _rows(
        "header",
        b"",
        [
            (
                header,
                f"application {header[0]:02X}, version {header[1]:02X}, "
                f"status {header[2] >> 4}, processing {processing}{sign_on}",
            )
        ],
    )
    rows += _rows("MTI", b"", [(body[:2], _MTI[mti])])
    present = [k for k in codec.LAYOUT if k in fields]
    rows += _rows("bitmap", b"", [(body[2:10], "fields " + " ".join(present))])
    pos = codec.MTI_BYTES + codec.BITMAP_BYTES
    for key in present:
        spec = codec.LAYOUT[key]
        prefix = body[pos : pos + spec.prefix_bytes]
        pos += spec.prefix_bytes
        length = int(_hex(prefix)) if prefix else spec.max_len
        size = (length + 1) // 2 if spec.kind in ("n", "z") else length
        data = body[pos : pos + size]
        pos += size
        rows += _rows(f"F{key}", prefix, _field_parts(key, data, fields[key], mti, fields, mode))
    assert pos == len(body)
    return "\n".join(rows)


# --- the doc -----------------------------------------------------------------------------------

_EXAMPLE_BLOCK = re.compile(r"^```hex example=([a-z0-9-]+)\n(.*?)^```", re.M | re.S)
_BREAKDOWN_BLOCK = re.compile(r"^```text breakdown=([a-z0-9-]+)\n(.*?)^```", re.M | re.S)


def _doc() -> str:
    return DOC.read_text(encoding="utf-8") if DOC.exists() else ""


def doc_examples(text: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, block in _EXAMPLE_BLOCK.findall(text):
        assert name not in out, f"example {name} appears twice"
        out[name] = bytes.fromhex("".join(block.split()))
    return out


def doc_breakdowns(text: str) -> dict[str, str]:
    return {name: block.rstrip("\n") for name, block in _BREAKDOWN_BLOCK.findall(text)}


def doc_table(text: str, header: str) -> list[list[str]]:
    """The rows of the table whose header row starts with `header` (cells stripped of `)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"no table starting {header!r} in {DOC.name}"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return rows


def _format_4_block(examples: dict[str, bytes]) -> bytes | None:
    frame = examples.get("purchase-pin-request")
    if frame is None:
        return None
    fields = codec.decode(codec.split_frame(frame[codec.LENGTH_BYTES :]).body)
    return bytes.fromhex(fields["52"])


@pytest.fixture(scope="module")
def doc_text() -> str:
    text = _doc()
    assert text, f"{DOC} is missing"
    return text


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    block = _format_4_block(doc_examples(_doc()))
    return asyncio.run(build_examples(tmp_path_factory.mktemp("saf"), block))


_DOC_NAMES = sorted(doc_examples(_doc()))


# --- the examples ------------------------------------------------------------------------------


def test_the_doc_shows_every_example_in_order(doc_text: str, built: Built) -> None:
    assert list(doc_examples(doc_text)) == [x.name for x in built.examples]
    assert list(doc_breakdowns(doc_text)) == [x.name for x in built.examples]


@pytest.mark.parametrize("name", _DOC_NAMES)
def test_example_frame_is_what_the_code_builds(name: str, doc_text: str, built: Built) -> None:
    mine = {x.name: x for x in built.examples}
    assert _hex(doc_examples(doc_text)[name]) == _hex(mine[name].frame)


@pytest.mark.parametrize("name", _DOC_NAMES)
def test_example_breakdown_is_the_frame_field_by_field(
    name: str, doc_text: str, built: Built
) -> None:
    mine = {x.name: x for x in built.examples}
    assert doc_breakdowns(doc_text)[name] == render_breakdown(mine[name].frame, mine[name].mode)


def test_format_4_pin_block_of_the_doc_deciphers_to_the_pin(doc_text: str) -> None:
    block = _format_4_block(doc_examples(doc_text))
    assert block is not None
    assert len(block) == 16
    assert security.read_pin_block_4(block, CARD, AES_PIK) == PIN
    assert security.pin_block_4(PIN, CARD, AES_PIK) != block  # random fill: never twice the same


def test_sign_on_reply_keys_unwrap_under_the_tmk_with_their_check_values(built: Built) -> None:
    for name, mode, tmk, keys in (
        ("sign-on-reply", KeyMode.AES, AES_TMK, (AES_PIK, AES_MAK)),
        ("tdes-sign-on-reply", KeyMode.TDES, TDES_TMK, (TDES_PIK, TDES_MAK)),
    ):
        frame = next(x.frame for x in built.examples if x.name == name)
        fields = codec.decode(codec.split_frame(frame[codec.LENGTH_BYTES :]).body)
        payload = bytes.fromhex(fields["62"])
        assert len(payload) == 2 * (security.WRAPPED_KEY_BYTES[mode] + security.KCV_BYTES)
        working = security.read_working_keys(mode, tmk, payload)
        assert (working.pik, working.mak) == keys


def test_host_requests_behind_the_examples(built: Built) -> None:
    """What the gateway asks the host for each example (the doc's 'host does' column)."""
    seen = built.seen
    kinds = [r.kind for r in seen]
    assert kinds == [
        Kind.SIGN_ON,
        Kind.INQUIRY,
        Kind.PURCHASE,
        Kind.VOID,
        Kind.PURCHASE,
        Kind.REVERSE,
        Kind.REFUND,
        Kind.TOPUP,
        Kind.TOPUP_CONFIRM,
        Kind.PURCHASE,  # the offline advice
        Kind.POINTS_EARN,
        Kind.REVERSE,  # the reversal the unMAC'd A0 left owed: an unknown original
        Kind.SETTLE,
        Kind.UPLOAD,
        Kind.UPLOAD,
        Kind.SIGN_ON,
        Kind.PURCHASE,
        Kind.INQUIRY,
        Kind.PURCHASE,
        Kind.PURCHASE,
        Kind.POINTS_REDEEM,
        Kind.COUPON_QUERY,
        Kind.COUPON_RESERVE,
        Kind.COUPON_REDEEM,
        Kind.COUPON_REDEEM,
        Kind.COUPON_REVERSE,
        Kind.SERVICE_REDEEM,
        Kind.MANAGER_AUTH,
        Kind.MANAGER_AUTH,
        Kind.POINTS_RETURN,
    ]  # the MAC error, the sign-off and the purchase after it never reach the host
    reversal = seen[5]
    assert (reversal.batch, reversal.stan) == (AES_BATCH, "000006")  # the lost purchase
    void, refund, confirm = seen[3], seen[6], seen[8]
    assert (void.original_batch, void.original_stan) == (AES_BATCH, "000004")
    assert (refund.rrn, refund.original_batch, refund.original_stan) == (
        "000000000987",
        "000041",
        "000017",
    )
    assert (confirm.original_batch, confirm.original_stan) == (AES_BATCH, "000008")
    assert seen[14].lines == () and seen[13].lines == (
        ("000007", 500),
        ("000009", 5_000),
        ("000010", 800),
    )
    zpk = built.gateway.zpk
    for purchase in (seen[4], seen[16], seen[18], seen[19]):  # PIN: under the zone key
        assert security.read_zone_pin_block(bytes.fromhex(purchase.pin_block), CARD, zpk) == PIN
        assert security.zone_pin_reader(KEK)(CARD, purchase.pin_block) == PIN  # the host's
    # Only the split tender said (F60.6) that the terminal takes a partial approval.
    assert [r.partial for r in seen] == [False] * 18 + [True] + [False] * 11
    # Section 5.11: what F48 carried to the host.
    earn = seen[10]
    assert (earn.amount, earn.basket) == (2_350, (("FOOD", 1_350), ("TOYS", 1_000)))
    redeem, query, reserve, coupon, used, reverse, service, manager = seen[20:28]
    assert (redeem.points, redeem.amount) == (500, 0)
    assert security.zone_pin_reader(KEK)(CARD, redeem.pin_block) == PIN
    for r in (query, reserve, coupon):
        assert (r.coupon, r.amount, r.card, r.basket) == (COUPON, 12_000, CARD, (("FOOD", 12_000),))
    assert (used.coupon, used.card, used.basket) == (COUPON, "", ())
    assert (reverse.original_batch, reverse.original_stan) == (TDES_BATCH, coupon.stan)
    assert (service.uses, service.product, service.card) == (1, "WASH10", CARD)
    assert (manager.card, manager.amount, manager.discount, manager.reason) == (
        MANAGER_CARD, 30_000, 1_500, "price_match")  # fmt: skip
    assert security.zone_pin_reader(KEK)(MANAGER_CARD, manager.pin_block) == PIN
    back = seen[29]
    assert (back.card, back.amount, back.rrn, back.points) == (CARD, 1_175, POINTS_EARN_RRN, 0)


# --- behaviour the doc promises, beyond the examples ------------------------------------------


async def _signed_on(tmp_path: Path) -> tuple[LoopbackTerminal, FakeHost, Processor]:
    host = FakeHost()
    saf = ReversalQueue(tmp_path / "saf.jsonl")
    saf.open()
    gateway = Processor(host, saf, KEK, Metrics())
    pos = LoopbackTerminal("gateway", 0, AES_TID, MID, AES_TMK, KeyMode.AES, gateway=gateway)
    host.answers.append(sign_on_answer(AES_TID, KeyMode.AES, AES_TMK, AES_BATCH))
    assert (await pos.sign_on()).code == "00"
    return pos, host, gateway


async def test_gateway_answers_96_and_reverses_itself_when_the_host_is_silent(
    tmp_path: Path,
) -> None:
    pos, host, gateway = await _signed_on(tmp_path)
    host.answers.append(HostUnavailable("no answer in time"))
    reply = await pos.purchase(CARD, 2_350)
    assert reply.code == "96"
    assert "64" in reply.fields  # MAC'd like any reply to a signed-on financial request
    owed = list(gateway.saf.pending.values())
    assert [(r.kind, r.batch, r.stan) for r in owed] == [(Kind.REVERSE, AES_BATCH, "000002")]
    await gateway.saf.close()


@pytest.mark.parametrize(
    ("pcode", "kind"),
    [("900000", Kind.POINTS_EARN), ("930000", Kind.COUPON_REDEEM),
     ("950000", Kind.COUPON_RESERVE), ("970000", Kind.MANAGER_AUTH)],
)  # fmt: skip
async def test_a_silent_host_gets_private_requests_that_change_something_reversed(
    tmp_path: Path, pcode: str, kind: Kind
) -> None:
    pos, host, gateway = await _signed_on(tmp_path)
    host.answers.append(HostUnavailable("no answer in time"))
    tlv = [(codec.TLV_COUPON, COUPON), (codec.TLV_MANAGER_DISCOUNT, "100")]
    reply = await pos.private(pcode, CARD, 1_000, tlv)
    assert (reply.code, host.seen[-1].kind) == ("96", kind)
    owed = list(gateway.saf.pending.values())
    assert [(r.kind, r.batch, r.stan) for r in owed] == [(Kind.REVERSE, AES_BATCH, "000002")]
    await gateway.saf.close()


async def test_a_points_return_without_its_reference_or_amount_never_reaches_the_host(
    tmp_path: Path,
) -> None:
    pos, host, gateway = await _signed_on(tmp_path)
    for rrn, amount, code in ((None, 1_000, "30"), ("00000000101X", 1_000, "30"),
                              (POINTS_EARN_RRN, 0, "13")):  # fmt: skip
        reply = await pos.private("980000", CARD, amount, rrn=rrn)
        assert (reply.code, "64" in reply.fields) == (code, True)
    assert [r.kind for r in host.seen] == [Kind.SIGN_ON]
    # A silent host: 96, and the gateway owes the host the return's reversal.
    host.answers.append(HostUnavailable("no answer in time"))
    reply = await pos.points_return(CARD, 1_000, POINTS_EARN_RRN)
    assert (reply.code, host.seen[-1].kind, host.seen[-1].rrn) == (
        "96", Kind.POINTS_RETURN, POINTS_EARN_RRN)  # fmt: skip
    owed = list(gateway.saf.pending.values())
    assert [(r.kind, r.stan) for r in owed] == [(Kind.REVERSE, reply.fields["11"])]
    await gateway.saf.close()


async def test_a_silent_host_leaves_a_coupon_query_and_a_coupon_reverse_alone(
    tmp_path: Path,
) -> None:
    pos, host, gateway = await _signed_on(tmp_path)
    host.answers += [HostUnavailable("no answer"), HostUnavailable("no answer")]
    assert (await pos.coupon("920000", COUPON, 1_000)).code == "96"
    assert (await pos.coupon_reverse("000002", COUPON)).code == "96"
    assert not gateway.saf.pending
    await gateway.saf.close()


@pytest.mark.parametrize(
    ("pcode", "f48"),
    [
        ("910000", None),  # points redeem without PT
        ("910000", "PT0010"),  # zero points
        ("910000", "PT003500PT003500"),  # a tag twice
        ("920000", "BL009FOOD=1200"),  # a query without its coupon
        ("920000", "CP004ABCDBL005FOOD="),  # a basket line without its amount
        ("920000", "CP004ABCDBL010FOOD=12.00"),  # an amount that is not fen digits
        ("920000", "CP004ABCDBL012bad line=100"),  # a department with a space
        ("920000", "CP004ABCDBL015FOOD/DAIRY/X=1"),  # two categories
        ("920000", "CP004ABCDBL007/DAIRY=1"),  # a category without its department
        ("930000", "CP004ABC"),  # TLV running past the end
        ("960000", "SU0050"),  # zero uses
        ("970000", "MR011price_match"),  # a manager authorization without its discount
        ("970000", "MD0041500MR011Price_Match"),  # a reason in capitals
        ("970000", "MD0041500MR017price_match_12345"),  # longer than a card's reasons can be
    ],
)
async def test_malformed_private_data_is_answered_30_and_never_reaches_the_host(
    tmp_path: Path, pcode: str, f48: str | None
) -> None:
    pos, host, gateway = await _signed_on(tmp_path)
    fields = pos._base("0200", pcode, "90")
    pos._card(fields, CARD, None)
    fields |= {"4": "000000001000", "25": "00", "49": "156"}
    if f48 is not None:
        fields["48"] = f48
    reply = await pos.financial(terminal._ordered(fields))
    assert reply.code == "30"
    assert [r.kind for r in host.seen] == [Kind.SIGN_ON]
    await gateway.saf.close()


async def test_a_basket_line_may_name_its_category_after_its_department(tmp_path: Path) -> None:
    pos, host, gateway = await _signed_on(tmp_path)
    host.answers.append(PosResult(APPROVED, points=1))
    assert (await pos.points_earn(CARD, 1_000, [("FOOD/DAIRY", 600), ("TOYS", 400)])).code == "00"
    assert host.seen[-1].basket == (("FOOD/DAIRY", 600), ("TOYS", 400))
    await gateway.saf.close()


async def test_too_many_basket_lines_are_answered_30(tmp_path: Path) -> None:
    pos, host, gateway = await _signed_on(tmp_path)
    lines = [("D", 1)] * (limits.POS_BASKET_LINES_MAX + 1)
    assert (await pos.points_earn(CARD, 1_000, lines)).code == "30"
    host.answers.append(PosResult(APPROVED, points=1))
    assert (await pos.points_earn(CARD, 1_000, lines[:-1])).code == "00"
    assert len(host.seen[-1].basket) == limits.POS_BASKET_LINES_MAX
    await gateway.saf.close()


async def test_unknown_request_tags_are_skipped_and_reply_tags_round_trip(
    tmp_path: Path,
) -> None:
    pos, host, gateway = await _signed_on(tmp_path)
    host.answers.append(
        PosResult(APPROVED, points=-5, points_balance=-5, discount=100, forfeited=0,
                  uses_left=0, refusal="", campaign="C-1")
    )  # fmt: skip
    reply = await pos.private("900000", CARD, 1_000, [("ZZ", "ignored"), ("BL", "D=1000")])
    assert reply.code == "00"
    assert host.seen[-1].basket == (("D", 1_000),)
    assert (reply.points, reply.points_balance, reply.discount, reply.forfeited) == (-5, -5, 100, 0)
    assert (reply.uses_left, reply.tlv.get("CC"), reply.refusal) == (0, "C-1", "")
    host.answers.append(PosResult(Outcome.NOT_PERMITTED, refusal="coupon_wrong_store"))
    refused = await pos.coupon("920000", COUPON, 1_000)
    assert (refused.code, refused.refusal) == ("57", "coupon_wrong_store")
    await gateway.saf.close()


MAC_FAILURES = limits.GATEWAY_MAC_FAILURES_MAX


async def test_third_wrong_mac_in_a_row_drops_the_keys(tmp_path: Path) -> None:
    pos, _host, gateway = await _signed_on(tmp_path)
    good = pos.keys
    assert good is not None
    pos.keys = WorkingKeys(pik=good.pik, mak=WRONG_MAK)
    replies = [await pos.purchase(CARD, 100)]
    # An unMAC'd A0 settles nothing (section 8): the reversal owed goes next, same wrong MAK.
    replies += [await pos.send_pending_reversal() for _ in range(MAC_FAILURES - 1)]
    assert [(r.code, r.processing, "64" in r.fields) for r in replies] == [
        ("A0", 0, False),
        ("A0", 0, False),
        ("A0", codec.PROCESSING_SIGN_ON, False),
    ]
    pos.keys = good
    after = await pos.send_pending_reversal()
    assert (after.code, after.processing) == ("77", codec.PROCESSING_SIGN_ON)
    assert pos.pending_reversal is not None  # until the terminal signs on again
    await gateway.saf.close()


# --- the tables --------------------------------------------------------------------------------

_PREFIX_NAME = {0: "fixed", 1: "LLVAR", 2: "LLLVAR"}


def test_field_table_has_every_layout_field_with_its_format(doc_text: str) -> None:
    rows = doc_table(doc_text, "| Field | Name | Type | Length |")
    table = {row[0]: row for row in rows}
    assert set(table) == set(codec.LAYOUT)
    for key, spec in codec.LAYOUT.items():
        row = table[key]
        wanted = (spec.kind, _PREFIX_NAME[spec.prefix_bytes], str(spec.max_len))
        assert (row[2], row[3], row[4]) == wanted, key


def _answerable_codes() -> set[str]:
    """Every F39 the gateway can send: the outcome table, the codec's codes, and every code
    `processor.py` passes to `_reply` or returns from `_pos_request`, read from its source."""
    codes = set(processor.CODE_OF_OUTCOME.values())
    codes |= {v for k, v in vars(codec).items() if k.startswith("CODE_") and isinstance(v, str)}

    def value(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and isinstance(getattr(processor, node.id, None), str):
            return str(getattr(processor, node.id))
        return None  # a variable: a code from CODE_OF_OUTCOME or from _pos_request

    tree = ast.parse(Path(processor.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "_reply"
        ):
            codes.add(value(node.args[1]) or "")
        if isinstance(node, ast.FunctionDef) and node.name == "_pos_request":
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    codes.add(value(ret.value) or "")
    codes.discard("")
    return codes


def test_response_code_table_lists_exactly_the_codes_the_gateway_answers(doc_text: str) -> None:
    rows = doc_table(doc_text, "| Code | Meaning |")
    listed = [row[0] for row in rows]
    assert len(listed) == len(set(listed))
    assert set(listed) == _answerable_codes()
    assert set(listed) == set(terminal.RESPONSE_TEXT)  # the reference terminal knows each
    assert set(processor.CODE_OF_OUTCOME) == set(Outcome)


def test_routing_table_is_processor_routes(doc_text: str) -> None:
    rows = doc_table(doc_text, "| MTI | F3 | Host request |")
    assert {(row[0], row[1]): row[2] for row in rows} == {
        key: str(kind) for key, kind in processor.ROUTES.items()
    }


def test_limits_table_names_every_gateway_bound_with_its_value(doc_text: str) -> None:
    rows = doc_table(doc_text, "| Bound | Value |")
    listed = {row[0]: int(row[1].replace(",", "")) for row in rows}
    wanted = {k: v for k, v in vars(limits).items() if k.startswith("GATEWAY_")}
    assert listed == wanted


def test_host_bounds_table_names_every_host_bound_the_doc_mentions(doc_text: str) -> None:
    rows = doc_table(doc_text, "| Host bound | Value |")
    listed = {row[0].strip("`"): int(row[1].replace(",", "")) for row in rows}
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", doc_text)) & set(vars(limits))
    wanted = {k: getattr(limits, k) for k in named if not k.startswith("GATEWAY_")}
    assert listed == wanted


def test_readme_gives_the_demo_terminal_what_a_vendor_needs_to_sign_on() -> None:
    readme = (DOC.parents[1] / "README.md").read_text()
    for value in (demo.DEMO_TERMINAL, demo.DEMO_MERCHANT, demo.DEMO_TMK.hex().upper()):
        assert f"`{value}`" in readme


def test_derived_values_table_is_what_the_code_computes(doc_text: str) -> None:
    aes, tdes = KeyMode.AES, KeyMode.TDES
    computed = {
        "AES TMK check value": security.check_value(aes, AES_TMK),
        "AES PIK check value": security.check_value(aes, AES_PIK),
        "AES MAK check value": security.check_value(aes, AES_MAK),
        "3DES TMK check value": security.check_value(tdes, TDES_TMK),
        "3DES PIK check value": security.check_value(tdes, TDES_PIK),
        "3DES MAK check value": security.check_value(tdes, TDES_MAK),
        "format 0 PIN field, PIN 123456": security._pin_field("0", PIN, "F"),
        "format 0 PAN field, PAN 6288880000000013": security._pan_field_0(CARD),
        "format 0 PIN block under the 3DES PIK": security.pin_block_0(PIN, CARD, TDES_PIK),
        "format 4 PIN field (first 8 bytes), PIN 123456": security._pin_field("4", PIN, "A"),
        "format 4 PAN field, PAN 6288880000000013": security._pan_field_4(CARD),
    }
    wanted = {name: _hex(value) for name, value in computed.items()}
    wanted["F48 TLV of PT=100, MB=M0001"] = codec.tlv_encode([("PT", "100"), ("MB", "M0001")])
    rows = doc_table(doc_text, "| Derived value | Value |")
    assert {row[0]: row[1] for row in rows} == wanted


def test_fixed_inputs_table_is_what_the_test_uses(doc_text: str) -> None:
    rows = {row[0]: row[1] for row in doc_table(doc_text, "| Input | Value |")}
    assert rows["AES TMK"] == _hex(AES_TMK)
    assert rows["AES PIK, MAK (issued at sign-on)"] == f"{_hex(AES_PIK)}, {_hex(AES_MAK)}"
    assert rows["3DES TMK"] == _hex(TDES_TMK)
    assert rows["3DES PIK, MAK (issued at sign-on)"] == f"{_hex(TDES_PIK)}, {_hex(TDES_MAK)}"
    assert rows["Card, PIN"] == f"{CARD}, {PIN}"
    assert (
        rows["TPDU, header"]
        .replace(" ", "")
        .startswith(_hex(terminal.TPDU) + "," + _hex(terminal.HEADER))
    )


def test_sign_on_and_network_codes_are_the_processors(doc_text: str) -> None:
    rows = doc_table(doc_text, "| 60.3 | Message |")
    listed = {row[0] for row in rows}
    assert set(processor.KEY_MODE_OF_NET_CODE) <= listed
    assert {processor.NET_SIGN_OFF, processor.NET_ECHO, processor.NET_SETTLE} <= listed
    assert listed >= processor.NET_UPLOAD_END


# --- regeneration --------------------------------------------------------------------------------


def main() -> None:
    """Print every example block (frame + breakdown) for pasting into the doc."""
    old = doc_examples(_doc())
    with tempfile.TemporaryDirectory() as tmp:
        built = asyncio.run(build_examples(Path(tmp), _format_4_block(old)))
    for x in built.examples:
        frame = " ".join(_hex(x.frame[i : i + 1]) for i in range(len(x.frame)))
        wrapped = "\n".join(frame[i : i + 48].strip() for i in range(0, len(frame), 48))
        sys.stdout.write(f"<!-- {x.name} -->\n```hex example={x.name}\n{wrapped}\n```\n\n")
        breakdown = render_breakdown(x.frame, x.mode)
        sys.stdout.write(f"```text breakdown={x.name}\n{breakdown}\n```\n\n")


if __name__ == "__main__":
    main()
